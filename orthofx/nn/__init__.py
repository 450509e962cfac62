"""Layers and ops that passes insert, usable on their own (like geotorch's): exactly orthogonal convolutions,
transposed convolutions and linears, ConvNorm wrappers, stable
eigh/svd custom ops with Taylor-form backward, Newton-Schulz matrix square roots, a condition-number monitor."""

from .convnorm import ConvNormConv1d, ConvNormConv2d, ConvNormConv3d, update_running_filters, with_convnorm
from .isometric import OrthogonalActivationBlock, ReflectionResidualBlock
from .jacobian import JacobianProbe
from .orthogonal import (OrthogonalConv1d, OrthogonalConv2d, OrthogonalConv3d, OrthogonalConvTranspose1d,
                         OrthogonalConvTranspose2d, OrthogonalConvTranspose3d, OrthogonalLinear)
from .decompositions import (ConditionMonitor, eigh_stable, inv_sqrtm_newton_schulz, sqrtm_newton_schulz,
                             svd_stable)

__all__ = ["ConvNormConv1d", "ConvNormConv2d", "ConvNormConv3d", "with_convnorm", "update_running_filters",
           "ConditionMonitor", "eigh_stable",
           "svd_stable", "sqrtm_newton_schulz", "inv_sqrtm_newton_schulz", "OrthogonalActivationBlock",
           "ReflectionResidualBlock", "JacobianProbe", "OrthogonalConv1d", "OrthogonalConv2d",
           "OrthogonalConv3d", "OrthogonalConvTranspose1d", "OrthogonalConvTranspose2d",
           "OrthogonalConvTranspose3d", "OrthogonalLinear"]
