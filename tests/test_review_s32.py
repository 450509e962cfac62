"""Session 32 review of the nearest start's block sweeps (c884991) and of the value-only L_orth / Haar routes
(3303b3a): the bugs found, with their regressions.

- ``from_conv(init="nearest", compute_dtype=torch.float32)`` of a float32 conv whose entries reach ``1e38`` (finite,
  accepted by the NaN / inf check) failed: the block sweep's gradient ``G`` (a sum of target entries over channels
  and taps) overflowed, so ``torch.linalg.eigh`` raised a bare ``_LinAlgError`` (1 -> 16 channels, 5 x 5), or the
  Procrustes step that ends the sweep (its adjoint is such a sum too) raised "the polar factor of a matrix with
  NaN or inf entries is undefined" (8 -> 64, 5 x 5); with ``fit_steps > 0`` the final Procrustes step failed the
  same way already before the sweep existed. Both steps' optima do not change when the target is scaled, so the
  target is now brought into range by a power of two first (``orthogonal._in_safe_range``; exact, and a no-op for
  every target with entries in ``[2^-64, 2^64]``).
- Under ``torch.autocast`` with ``compute_dtype=torch.float32`` the nearest start's products (the sweep's kernel
  builds and gradients, the Procrustes adjoint) ran in bfloat16, so the "exact" optima were those of a rounded
  problem: the embedded 2 -> 8 layer's kernel moved by 0.4, a strided one by 3e-3. The start is now computed with
  autocast off, as the layer builds its kernel.

References: dense float64 circular operators (orthogonality), and the old one-tap start written out (the centre
tap's float64 polar factor), which the sweep must beat.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from orthofx.nn import OrthogonalConv2d
from tests.references import circular_operator64, polar64


def _conv(C: int, M: int, k: int, stride: int, scale: float, seed: int) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(C, M, k, stride=stride, padding=k // 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape).clamp(-3, 3) * scale)
    return conv


def _centre_start(w0: torch.Tensor) -> torch.Tensor:
    """The nearest start before the sweep (stride 1, odd k): the centre tap's polar factor (float64), zero elsewhere."""
    k = w0.shape[-1]
    centre = torch.zeros_like(w0, dtype=torch.float64)
    centre[:, :, k // 2, k // 2] = polar64(w0[:, :, k // 2, k // 2].double())
    return centre


def _distance(w: torch.Tensor, w0: torch.Tensor) -> float:
    return float((w.double() - w0.double()).norm() / w0.double().norm())


def _isometry_error(weight: torch.Tensor, stride: int) -> float:
    """max |sigma - 1| of the dense circular operator (float64), over its min(rows, columns) singular values."""
    sv = torch.linalg.svdvals(circular_operator64(weight.detach(), stride))
    return float((sv - 1).abs().max())


@pytest.mark.parametrize("C, M, k, fit_steps", [(4, 16, 3, 0), (1, 16, 5, 0), (8, 64, 5, 0), (4, 16, 3, 2),
                                                (8, 8, 3, 2)])
def test_nearest_start_of_float32_weights_near_the_top_of_the_range(C, M, k, fit_steps):
    huge = _conv(C, M, k, 1, 1.1e38, seed=C + M + k)  # entries up to 3.3e38, all finite (float32 max 3.4e38)
    assert bool(torch.isfinite(huge.weight).all()) and float(huge.weight.detach().abs().max()) > 2e38
    torch.manual_seed(7)
    layer = OrthogonalConv2d.from_conv(huge, fit_steps=fit_steps, compute_dtype=torch.float32)
    w = layer.weight.detach()
    assert bool(torch.isfinite(w).all())
    assert _isometry_error(w, 1) < 1e-5
    assert layer.init_error == pytest.approx(1.0, abs=1e-6)  # ||K|| is nothing beside ||K0||
    if fit_steps == 0:
        # the sweep ran on the scaled target: every tap used, and nearer to the weight's direction (the weight
        # divided by a power of two, exactly) than the old one-tap start, the centre tap's polar factor
        exponent = math.frexp(float(huge.weight.detach().abs().max()))[1]
        direction = huge.weight.detach().double() * 2.0 ** -exponent
        assert int((w.double().square().sum((0, 1)) > 1e-12).sum()) == k * k
        assert _distance(w, direction) < _distance(_centre_start(direction), direction) - 0.01


@pytest.mark.parametrize("C, M, stride, fit_steps", [(2, 8, 1, 0), (1, 16, 1, 0), (4, 8, 2, 0), (2, 8, 1, 3)])
def test_nearest_start_is_computed_with_autocast_off(C, M, stride, fit_steps):
    conv = _conv(C, M, 3, stride, 0.3, seed=11)
    torch.manual_seed(3)
    outside = OrthogonalConv2d.from_conv(conv, fit_steps=fit_steps, compute_dtype=torch.float32)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = OrthogonalConv2d.from_conv(conv, fit_steps=fit_steps, compute_dtype=torch.float32)
    assert torch.equal(inside.weight.detach(), outside.weight.detach())
    assert inside.init_error == outside.init_error
    assert _isometry_error(outside.weight, stride) < 1e-5
    if stride == 1:
        # and the sweep's start is the better one: below the old one-tap start (the centre tap's polar factor)
        w0 = conv.weight.detach().double()
        assert outside.init_error < _distance(_centre_start(w0), w0)
