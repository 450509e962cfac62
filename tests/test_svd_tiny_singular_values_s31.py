"""``svd_stable``'s exact-mode gradient for float32 matrices whose singular values are all tiny.

The backward forms the squares of ``S / c``, ``c`` a power of two above ``max(S)``; ``c`` used to stop at 1, so the
squares of singular values around 1e-10 (1e-20) fell below the floor ``sqrt(tiny)`` (1.1e-19 in float32) and every
gap was clamped: the gradient was 8 % off at 1e-10 and 49 % at 1e-12. Reference: torch's own SVD gradient in
float64 (distinct singular values, where it is exact)."""

from __future__ import annotations

import pytest
import torch

from orthofx.nn import svd_stable

pytestmark = pytest.mark.usefixtures("one_thread")


def _gradients(a: torch.Tensor, decompose, cotangents) -> torch.Tensor:
    a = a.clone().requires_grad_()
    U, S, Vh = decompose(a)
    gU, gS, gVh = (g.to(a.dtype) for g in cotangents)
    ((U * gU).sum() + (S * gS).sum() + (Vh * gVh).sum()).backward()
    return a.grad


@pytest.mark.parametrize("scale", [1.0, 1e-6, 1e-10, 1e-12, 1e-15])
@pytest.mark.parametrize("shape", [(5, 5), (7, 4), (4, 6)])
def test_float32_gradient_with_tiny_singular_values_matches_float64_torch(scale, shape):
    g = torch.Generator().manual_seed(0)
    m, n = shape
    k = min(m, n)
    a = scale * torch.randn(m, n, dtype=torch.float64, generator=g)
    cotangents = (torch.randn(m, k, dtype=torch.float64, generator=g), torch.randn(k, dtype=torch.float64, generator=g),
                  torch.randn(k, n, dtype=torch.float64, generator=g))
    reference = _gradients(a, lambda t: torch.linalg.svd(t, full_matrices=False), cotangents)
    got = _gradients(a.float(), lambda t: svd_stable(t, taylor_order=None), cotangents).double()
    assert got.isfinite().all()
    assert float((got - reference).norm() / reference.norm()) < 1e-4
