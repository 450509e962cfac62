"""Regressions found by fuzzing the stable decompositions and condition monitors in session 28 (each failed before
its fix), plus a guard on the documented backward at (near-)ties that the fuzzing checked.

* ``clamp_gap=True`` (a bool, which Python counts as an int) was taken for a gap of 1 by ``eigh_stable``,
  ``svd_stable`` and ``pair_kernel``, where ``taylor_order=True`` was refused: now a LayerArgumentError.
* ``ConditionMonitor(history_size=True)`` (and ``DecompositionMonitor``) reached ``torch.full`` and raised a bare
  TypeError; now a LayerArgumentError naming ``history_size``.
"""

from __future__ import annotations

import pytest
import torch

from orthofx.errors import LayerArgumentError
from orthofx.nn.conditioning import DecompositionMonitor
from orthofx.nn.decompositions import ConditionMonitor, eigh_stable, pair_kernel, svd_stable

from references import eigh_backward64, stable_kernel64


@pytest.mark.parametrize("call", [
    lambda: eigh_stable(torch.eye(3), clamp_gap=True),
    lambda: svd_stable(torch.eye(3), clamp_gap=True),
    lambda: pair_kernel(torch.tensor([1.0, 2.0]), clamp_gap=True),
])
def test_bool_clamp_gap_is_refused(call):
    with pytest.raises(LayerArgumentError, match="clamp_gap"):
        call()


def test_int_clamp_gap_still_bounds_the_kernel_as_documented():
    lam = torch.tensor([0.1, 0.1 + 1e-3, 2.0], dtype=torch.float64)
    K = pair_kernel(lam, taylor_order=None, clamp_gap=1)
    assert torch.allclose(K, stable_kernel64(lam, None, 1.0), rtol=1e-12, atol=0)
    assert float(K.abs().max()) <= 1.0


@pytest.mark.parametrize("cls", [ConditionMonitor, DecompositionMonitor])
def test_bool_history_size_is_refused(cls):
    with pytest.raises(LayerArgumentError, match="history_size"):
        cls(history_size=True)


@pytest.mark.parametrize("order", [None, 0, 9])
def test_float32_eigh_backward_at_ties_and_zeros_matches_the_documented_formula(order):
    # batch: an exact tie, a near tie (relative 1e-7, below the float32 floor), a double zero, mixed signs
    gen = torch.Generator().manual_seed(28)
    spectra = torch.tensor([[1.0, 1.0, 3.0, -2.0], [0.5, 0.5 * (1 + 1e-7), 2.0, 4.0],
                            [0.0, 0.0, 1.0, 5.0], [-3.0, -1.0, 0.0, 2.0]], dtype=torch.float64)
    Q = torch.linalg.qr(torch.randn(4, 4, 4, generator=gen, dtype=torch.float64)).Q
    A = (Q * spectra.unsqueeze(-2)) @ Q.mT
    A = ((A + A.mT) / 2).float().requires_grad_()
    L, V = eigh_stable(A, taylor_order=order, clamp_gap=None)
    gL = torch.randn(4, 4, generator=gen)
    gV = torch.randn(4, 4, 4, generator=gen)
    (gA,) = torch.autograd.grad((L * gL).sum() + (V * gV).sum(), A)
    assert bool(gA.isfinite().all())
    for b in range(4):
        K = stable_kernel64(L[b], order, None, dtype=torch.float32)
        ref = eigh_backward64(L[b], V[b], gL[b], gV[b], K)
        assert torch.allclose(gA[b].double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
