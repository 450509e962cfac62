"""Regressions found by fuzzing the stable decompositions and the SVD passes (each failed before its fix).

* The SVD backward squared the singular values in the input's dtype: for ``s > 1.8e19`` (float32) the squares
  overflowed to inf and the gap kernel, hence the whole gradient, was NaN.
* A singular-value monitor squared half-precision singular values in their own dtype: ``s > 256`` in float16
  overflowed, and a finite matrix was recorded as a NaN kappa with NaN and inf events.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthofx
from orthofx.nn import conditioning as cond
from orthofx.nn.decompositions import svd_stable


def _matrix(m, n, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g, dtype=dtype)


@pytest.mark.parametrize("dtype,exponent", [(torch.float32, 70), (torch.float64, 520)])
@pytest.mark.parametrize("taylor_order", [None, 9])
def test_svd_gradient_of_huge_singular_values_is_the_scaled_gradient(dtype, exponent, taylor_order):
    """``A = 2^e B``: the SVD factors of A are B's, ``S_A = 2^e S_B``, so for ``f = <W, U Vh> + <w, S>`` the gradient
    at A is ``(dU Vh term of B) / 2^e + (S term of B)``; reference: torch.linalg.svd's gradient at B in float64."""
    B = _matrix(5, 3, 0)
    W, w = _matrix(5, 3, 1), _matrix(1, 3, 2)[0]
    scale = 2.0 ** exponent

    def terms(svd, X):
        U, S, Vh = svd(X)
        return (W.to(X.dtype) * (U @ Vh)).sum(), (w.to(X.dtype) * S).sum()

    Bg = B.clone().requires_grad_(True)
    rotation, values = terms(lambda X: torch.linalg.svd(X, full_matrices=False), Bg)
    g_rot = torch.autograd.grad(rotation, Bg, retain_graph=True)[0]
    g_val = torch.autograd.grad(values, Bg)[0]
    expected = g_rot / scale + g_val

    A = (B * scale).to(dtype).requires_grad_(True)
    rotation, values = terms(lambda X: svd_stable(X, taylor_order=taylor_order), A)
    got = torch.autograd.grad(rotation + values, A)[0]
    assert torch.isfinite(got).all()
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    if taylor_order is None:
        assert torch.allclose(got.double(), expected, rtol=tol, atol=tol)
    else:  # the Taylor kernel is scale-invariant: the same as at B itself (times 1 / 2^e for the rotation part)
        Bs = B.to(dtype).requires_grad_(True)
        rotation, values = terms(lambda X: svd_stable(X, taylor_order=taylor_order), Bs)
        at_b = torch.autograd.grad(rotation, Bs, retain_graph=True)[0].double() / scale + torch.autograd.grad(values, Bs)[0].double()
        assert torch.allclose(got.double(), at_b, rtol=tol, atol=tol)


def test_svd_gradient_with_clamp_gap_on_huge_singular_values_keeps_its_bound():
    """``clamp_gap`` bounds ``|K|`` in the input's units also when the kernel is rescaled: a float32 matrix with two
    equal singular values ``2^70`` and clamp_gap ``g 2^140`` has ``2^-70`` times the gradient of the float64 matrix
    with singular values 1 and clamp_gap ``g`` (``K`` scales as ``1 / s^2``, the rotation terms by ``s K``)."""
    B = torch.linalg.qr(_matrix(3, 3, 3))[0][:, :2]  # 3 x 2, both singular values 1
    W = _matrix(3, 2, 4)
    scale, g_small = 2.0 ** 70, 0.5

    def loss(X, gap):
        U, S, Vh = svd_stable(X, taylor_order=None, clamp_gap=gap)
        return (W.to(X.dtype) * (U @ Vh)).sum()  # basis-invariant on the repeated pair

    Bg = B.clone().requires_grad_(True)
    ref = torch.autograd.grad(loss(Bg, g_small), Bg)[0]
    A = (B * scale).float().requires_grad_(True)
    got = torch.autograd.grad(loss(A, g_small * scale * scale), A)[0]
    assert torch.isfinite(got).all()
    assert torch.allclose(got.double() * scale, ref, rtol=1e-4, atol=1e-4)


class _Svdvals(nn.Module):
    def forward(self, x):
        return torch.linalg.svdvals(x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_singular_value_monitor_of_a_half_precision_model(dtype):
    x = _matrix(4, 64, 5, torch.float32).unsqueeze(0) * 40  # singular values ~ 300 > 256
    gm = orthofx.transform(_Svdvals(), {"rules": [{"match": {"op": "linalg.svdvals"},
                                                   "apply": "svd_conditioning"}]}, example_inputs=(x,))
    (monitor,) = [m for m in gm.modules() if isinstance(m, cond.DecompositionMonitor)]
    monitor.reset()
    s = gm(x.to(dtype))
    assert s.dtype == dtype and float(s.max()) > 256
    expected = float((s[0, 0].double() / s[0, -1].double()) ** 2)  # kappa of the covariance, from what entered
    summary = monitor.summary()
    assert summary["nan_events"] == 0 and summary["inf_events"] == 0
    assert summary["kappa"] == pytest.approx(expected, rel=1e-12)
