"""Review of the conditioning-aware SVD meta-layer (P4), session 38: eigh_stable's backward, the Newton-Schulz powers,
the stand-ins' output conventions and the svd_conditioning pass's pattern matching.

Fixed here:

* A power pattern written with keyword arguments (``torch.pow(input=L, exponent=-0.5)``, ``torch.unsqueeze(input=D,
  dim=-2)``, ``torch.transpose(input=V, ...)``, ``torch.diag_embed(input=D)``, ``torch.clamp(input=L, min=0)``)
  failed the whole transform with ``IndexError: tuple index out of range`` (the matchers read ``node.args[0]``).
* ``(V * L.rsqrt().unsqueeze(-1)) @ V.mT`` (rows of ``V`` scaled: ``diag(D)``, no matrix power) was rewritten to
  Newton-Schulz anyway; the rank check at run time then made the rewritten model raise on every call (and the
  transform with example inputs failed) instead of the site falling back to the stable op.
* ``stable_linalg_svd(full_matrices=True)`` / ``stable_torch_svd(some=False)`` of a non-square matrix completed
  ``U`` / ``Vh`` with a basis from a QR of the reduced factor, not torch's: a model reading the completing columns
  computed other values after the rewrite (entries up to 0.76 apart).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import LayerArgumentError
from orthofx.nn import conditioning as cond
from orthofx.nn.decompositions import eigh_stable, inv_sqrtm_newton_schulz, sqrtm_newton_schulz
from references import eigh_backward64, stable_kernel64


def _spd(n=5, batch=(3,), kappa=10.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(*batch, n, n, generator=g, dtype=torch.float64))
    lam = torch.logspace(0, math.log10(kappa), n, dtype=torch.float64)
    return (Q * lam.unsqueeze(-2)) @ Q.mT


def _policy(op="linalg.eigh", **params):
    return {"rules": [{"match": {"op": op}, "apply": "svd_conditioning", "with": params}]}


def _status(gm):
    (change,) = [c for c in gm.meta["orthofx"].changes if c.pass_name == "svd_conditioning"]
    return change.status


class Power(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form = form

    def forward(self, a):
        L, V = torch.linalg.eigh(a)
        return self.form(L, V)


# ----------------------------------------------------------------------------------------- pattern matching

KEYWORD_FORMS = {
    "pow": lambda L, V: (V * torch.pow(input=L, exponent=-0.5).unsqueeze(-2)) @ V.mT,
    "unsqueeze": lambda L, V: (V * torch.unsqueeze(input=L.rsqrt(), dim=-2)) @ V.mT,
    "transpose": lambda L, V: (V * L.rsqrt().unsqueeze(-2)) @ torch.transpose(input=V, dim0=-2, dim1=-1),
    "diag_embed": lambda L, V: V @ torch.diag_embed(input=L.rsqrt()) @ V.mT,
    "clamp": lambda L, V: (V * torch.clamp(input=L, min=0).rsqrt().unsqueeze(-2)) @ V.mT,
    "bmm": lambda L, V: torch.bmm(input=V * torch.rsqrt(input=L).unsqueeze(-2), mat2=V.mT),
    "div": lambda L, V: torch.div(input=V, other=torch.sqrt(input=L).unsqueeze(-2)) @ V.mT,
    "other": lambda L, V: torch.matmul(torch.mul(V, other=torch.add(L, other=0.5).rsqrt().unsqueeze(-2)),
                                       other=V.mT),
}


@pytest.mark.parametrize("name", list(KEYWORD_FORMS))
def test_keyword_argument_patterns_are_rewritten_with_the_same_outputs(name):
    a = _spd()
    model = Power(KEYWORD_FORMS[name])
    gm = orthofx.transform(model, _policy(method="newton_schulz", iterations=30), example_inputs=(a,))
    assert _status(gm) == "newton_schulz (inverse sqrt, 30 iterations)"
    assert cond.power_newton_schulz in {n.target for n in gm.graph.nodes}
    torch.testing.assert_close(gm(a), model(a), atol=1e-10, rtol=0)


ROW_SCALINGS = {
    # rows of V scaled: diag(D) V V^T = diag(D), no power of the matrix
    "left": lambda L, V: (V * L.rsqrt().unsqueeze(-1)) @ V.mT,
    # columns of V^T scaled: V V^T diag(D)
    "right": lambda L, V: V @ (L.rsqrt().unsqueeze(-2) * V.mT),
}


@pytest.mark.parametrize("name", list(ROW_SCALINGS))
@pytest.mark.parametrize("with_example", [True, False])
def test_row_scaling_is_not_rewritten_to_newton_schulz(name, with_example):
    a = _spd()
    model = Power(ROW_SCALINGS[name])
    gm = orthofx.transform(model, _policy(method="newton_schulz"), example_inputs=(a,) if with_example else None)
    assert _status(gm).startswith("stable eigh") and "newton_schulz skipped" in _status(gm)
    assert cond.power_newton_schulz not in {n.target for n in gm.graph.nodes}
    torch.testing.assert_close(gm(a), model(a), atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------- stand-ins

SHAPES = [(6, 4), (4, 6), (2, 7, 3), (2, 3, 7), (2, 2, 5, 4), (0, 3), (3, 0), (2, 0, 3)]


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_full_factors_are_torchs(shape):
    a = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for got, ref in ((cond.stable_linalg_svd(a, full_matrices=True), torch.linalg.svd(a, full_matrices=True)),
                     (cond.stable_torch_svd(a, some=False), torch.svd(a, some=False))):
        for x, y in zip(got, ref):
            assert x.shape == y.shape and x.dtype == y.dtype
            torch.testing.assert_close(x, y, atol=1e-12, rtol=0)


def test_full_factors_of_a_rank_deficient_matrix_stay_orthonormal():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(3, 7, 2, generator=g, dtype=torch.float64) @ torch.randn(3, 2, 5, generator=g,
                                                                          dtype=torch.float64)
    a[0] = 0.0
    U, S, Vh = cond.stable_linalg_svd(a, full_matrices=True)
    eye7, eye5 = torch.eye(7, dtype=torch.float64), torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(U.mT @ U, eye7.expand(3, 7, 7), atol=1e-12, rtol=0)
    torch.testing.assert_close(Vh @ Vh.mT, eye5.expand(3, 5, 5), atol=1e-12, rtol=0)
    torch.testing.assert_close((U[..., :5] * S.unsqueeze(-2)) @ Vh, a, atol=1e-12, rtol=0)


class NullSpaceFeatures(nn.Module):
    """Reads the completing columns themselves (not only through U U^T)."""

    def forward(self, x):
        U, S, Vh = torch.linalg.svd(x)
        return U[..., S.shape[-1]:].sum(-1), S


def test_rewrite_keeps_outputs_that_read_the_completing_columns():
    x = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    model = NullSpaceFeatures()
    gm = orthofx.transform(model, _policy("linalg.svd"), example_inputs=(x,))
    assert _status(gm).startswith("stable svd")
    for got, ref in zip(gm(x), model(x)):
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", ["taylor", "newton_schulz"])
def test_freeze_keeps_the_eval_outputs(method):
    """Frozen copies (plain stand-ins, pass-throughs for monitors) give the untransformed model's outputs."""
    x = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    a = _spd()
    for model, op, data in ((NullSpaceFeatures(), "linalg.svd", x), (Power(KEYWORD_FORMS["other"]), "linalg.eigh", a),
                            (Power(ROW_SCALINGS["left"]), "linalg.eigh", a)):
        gm = orthofx.transform(model, _policy(op, method=method, iterations=30), example_inputs=(data,)).eval()
        frozen = orthofx.freeze(gm)
        assert not any(isinstance(m, cond.DecompositionMonitor) for m in frozen.modules())
        leaves = torch.utils._pytree.tree_leaves
        for got, ref in zip(leaves(frozen(data)), leaves(model(data)), strict=True):
            torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)


def test_eigh_stand_ins_match_torch_in_every_layout():
    g = torch.Generator().manual_seed(6)
    for shape in [(4, 4), (3, 4, 4), (2, 1, 3, 3), (0, 2, 2), (1, 1)]:
        a = torch.randn(*shape, generator=g, dtype=torch.float64)
        for uplo in ("L", "U", "u"):
            for got, ref in zip(cond.stable_eigh(a, uplo), torch.linalg.eigh(a, UPLO=uplo)):
                assert got.shape == ref.shape
                torch.testing.assert_close(got, ref, atol=0, rtol=0)
            torch.testing.assert_close(cond.stable_eigvalsh(a, uplo), torch.linalg.eigvalsh(a, UPLO=uplo))


# ----------------------------------------------------------------------------------------- eigh backward

@pytest.mark.parametrize("uplo", ["L", "U"])
@pytest.mark.parametrize("taylor_order", [None, 0, 3, 9])
def test_eigh_backward_is_the_documented_formula_batched(uplo, taylor_order):
    g = torch.Generator().manual_seed(7)
    Q, _ = torch.linalg.qr(torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64))
    lam = torch.tensor([-2.0, 1.0, 1.0 + 1e-9, 2.0, 3.0], dtype=torch.float64)  # a near-tie and a sign change
    a = ((Q * lam) @ Q.mT).requires_grad_()
    L, V = eigh_stable(a, taylor_order, uplo=uplo)
    gL, gV = torch.randn(L.shape, generator=g, dtype=torch.float64), torch.randn(V.shape, generator=g,
                                                                               dtype=torch.float64)
    (grad,) = torch.autograd.grad((L * gL).sum() + (V * gV).sum(), a)
    assert grad.isfinite().all()
    for i in range(2):
        for j in range(3):
            K = stable_kernel64(L[i, j], taylor_order)
            ref = eigh_backward64(L[i, j], V[i, j], gL[i, j], gV[i, j], K)
            torch.testing.assert_close(grad[i, j], ref, atol=1e-9 * ref.abs().max().item(), rtol=0)


def test_eigh_backward_matches_finite_differences():
    a0 = _spd(5, (), kappa=30.0, seed=8)
    g = torch.Generator().manual_seed(8)
    w = torch.randn(5, 5, generator=g, dtype=torch.float64)
    e = torch.randn(5, 5, generator=g, dtype=torch.float64)
    e = e + e.mT

    def loss(L, V):
        return (V * V[:1].sign() * w).sum() + L.square().sum()  # sign-fixed eigenvectors

    a = a0.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss(*eigh_stable(a, None, uplo="U")), a)
    h = 1e-6
    fd = (loss(*torch.linalg.eigh(a0 + h * e)) - loss(*torch.linalg.eigh(a0 - h * e))) / (2 * h)
    assert abs((grad * e).sum().item() - fd.item()) < 1e-6 * max(1.0, abs(fd.item()))


# ----------------------------------------------------------------------------------------- Newton-Schulz

def test_newton_schulz_powers_converge_to_the_eigh_powers():
    a = _spd(5, (2, 2), kappa=100.0, seed=9) * 37.0
    L, V = torch.linalg.eigh(a)
    for fn, p in ((sqrtm_newton_schulz, 0.5), (inv_sqrtm_newton_schulz, -0.5)):
        ref = (V * L.pow(p).unsqueeze(-2)) @ V.mT
        errors = [((fn(a, t) - ref).abs().max() / ref.abs().max()).item() for t in (3, 6, 12)]
        assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-12, (p, errors)
    spd = _spd(4, (2,), kappa=5.0, seed=10).requires_grad_()
    assert torch.autograd.gradcheck(lambda m: inv_sqrtm_newton_schulz(m, 4), (spd,))


def test_newton_schulz_refuses_complex_and_integer_matrices():
    """The replacement rebuilds the matrix by transposes and casts back to its dtype: a complex Hermitian site gave
    other values (0.78 off) and an integer matrix a truncated root; both raise now, as the stable stand-ins do."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 4, 4, generator=g, dtype=torch.complex128)
    a = x @ x.mH + torch.eye(4)
    model = Power(lambda L, V: (V * L.rsqrt().unsqueeze(-2)) @ V.mT)
    gm = orthofx.transform(model, _policy(method="newton_schulz", iterations=30, monitor=False))
    with pytest.raises(LayerArgumentError, match="real floating-point matrices only"):
        gm(a)
    with pytest.raises(LayerArgumentError, match="real floating-point matrices only"):
        cond.power_newton_schulz(torch.tensor([[4, 0], [0, 9]]), 0.5, iterations=20, uplo="L")
    monitor = cond.DecompositionMonitor("matrix")
    with pytest.raises(LayerArgumentError, match="real floating-point matrices only"):
        monitor(a)
    assert monitor.summary()["updates"] == 0


def test_completion_falls_back_to_an_orthonormal_complement_where_torchs_basis_does_not_fit():
    """Per matrix: torch's completing columns where they are orthogonal to the reduced factor (kept as they are),
    a QR complement of the reduced factor where they are not (reduced and full calls that chose different vectors
    for zero singular values)."""
    g = torch.Generator().manual_seed(13)
    basis, _ = torch.linalg.qr(torch.randn(2, 6, 6, generator=g, dtype=torch.float64))
    Q = basis[..., :2]
    other, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    tail = torch.stack([basis[0, :, 2:], other[:, 2:]])  # fits the first matrix only
    out = cond._complement(Q, tail)
    torch.testing.assert_close(out[0], tail[0], atol=1e-14, rtol=0)
    full = torch.cat([Q, out], dim=-1)
    torch.testing.assert_close(full.mT @ full, torch.eye(6, dtype=torch.float64).expand(2, 6, 6), atol=1e-13, rtol=0)
