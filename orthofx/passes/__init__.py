"""Graph passes: one module per pass, all registered by name in :mod:`orthofx.passes.registry`."""

from .base import (Change, CaptureInfo, Manifest, OptimizerHook, Param, Pass, PassContext, PenaltyTerm, PlanEntry,
                   Site)
from .registry import UnknownPassError, available_passes, get_pass, register_pass, unregister_pass
from . import (convnorm, isometric_init, jacobian_isometry, orth_regularizer,  # noqa: F401  (registration)
               orthogonal_conv, pre_svd, riemannian, svd_conditioning)

__all__ = [
    "Change", "CaptureInfo", "Manifest", "OptimizerHook", "Param", "Pass", "PassContext", "PenaltyTerm", "PlanEntry",
    "Site",
    "UnknownPassError", "available_passes", "get_pass", "register_pass", "unregister_pass",
]
