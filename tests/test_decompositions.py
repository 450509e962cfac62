"""Tests of orthofx.nn.decompositions: stable eigh/svd custom ops (gradients, tracing, compile, export, fake
kernels), Newton-Schulz square roots and the condition monitor.

References are torch.linalg.eigh / torch.linalg.svd (gradients on well-separated spectra) and finite
differences (gradcheck, float64)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orthofx.errors import LayerArgumentError
from orthofx.nn.decompositions import (
    ConditionMonitor,
    eigh_stable,
    inv_sqrtm_newton_schulz,
    pair_kernel,
    sqrtm_newton_schulz,
    svd_stable,
)
from references import eigh_backward64, stable_kernel64, svd_backward64

F64 = torch.float64


def _rotation(n: int, seed: int, dtype=F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return Q.to(dtype)


def spd_with_spectrum(eigenvalues, seed: int = 0, dtype=F64) -> torch.Tensor:
    lam = torch.as_tensor(eigenvalues, dtype=F64)
    Q = _rotation(lam.shape[-1], seed)
    A = Q @ torch.diag(lam) @ Q.T
    return ((A + A.T) / 2).to(dtype)


def _sym(A: torch.Tensor) -> torch.Tensor:
    return (A + A.mT) / 2


def eigh_loss(L: torch.Tensor, V: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """A loss that depends on eigenvalues and on the eigenvectors, invariant to their signs."""
    n = L.shape[-1]
    w = torch.arange(1, n + 1, dtype=L.dtype)
    P = V @ torch.diag_embed(w.expand_as(L)) @ V.mT
    return (L * w).sum() + (V.square() * W).sum() + (P * W).sum()


def eigh_grad(fn, A: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    X = A.detach().clone().requires_grad_(True)
    L, V = fn(X)
    (g,) = torch.autograd.grad(eigh_loss(L, V, W), X)
    return g


def svd_outputs(U, S, Vh):
    """Sign-invariant functions of the SVD (U and Vh only through squares and U Vh)."""
    return U.square(), S, Vh.square(), U @ Vh


def svd_loss(U, S, Vh, W_u, W_v):
    k = S.shape[-1]
    w = torch.arange(1, k + 1, dtype=S.dtype)
    return ((U.square() * W_u).sum() + (Vh.square() * W_v).sum() + (S * w).sum()
            + ((U * w) @ Vh).sum())


def svd_grad(fn, A, W_u, W_v):
    X = A.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(svd_loss(*fn(X), W_u, W_v), X)
    return g


# ------------------------------------------------------------------------------------------- gradcheck


def test_eigh_gradcheck_exact():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(2, 5, 5, generator=g, dtype=F64)
    A = A @ A.mT + torch.eye(5, dtype=F64)  # symmetric; spectra separated with probability 1

    def fn(X):
        L, V = eigh_stable(_sym(X), taylor_order=None)
        return L, V.square(), V @ torch.diag(torch.arange(5.0, dtype=F64)) @ V.mT

    assert torch.autograd.gradcheck(fn, (A.requires_grad_(),))


@pytest.mark.parametrize("shape", [(5, 5), (7, 4), (4, 7), (2, 6, 3)])
def test_svd_gradcheck_exact(shape):
    g = torch.Generator().manual_seed(2)
    A = torch.randn(*shape, generator=g, dtype=F64)

    def fn(X):
        return svd_outputs(*svd_stable(X, taylor_order=None))

    assert torch.autograd.gradcheck(fn, (A.requires_grad_(),))


def test_eigh_gradcheck_taylor_high_order_and_float64_flag():
    # high Taylor order == exact on a positive, well separated spectrum: gradcheck passes too
    A = spd_with_spectrum([1.0, 2.0, 4.0, 8.0], seed=3)

    def fn(X):
        L, V = eigh_stable(_sym(X), taylor_order=80)
        return L, V.square()

    assert torch.autograd.gradcheck(fn, (A.clone().requires_grad_(),))


# ------------------------------------------------------------------------------------------- vs torch


@pytest.mark.parametrize("batch", [(), (3,)])
def test_eigh_taylor_matches_torch_on_separated_positive_spectra(batch):
    spectra = torch.tensor([[0.5, 1.0, 2.0, 3.5, 5.0, 8.0], [1.0, 1.5, 2.5, 4.0, 6.0, 9.0],
                            [0.1, 0.3, 0.9, 2.7, 8.1, 24.3]], dtype=F64)
    mats = torch.stack([spd_with_spectrum(s, seed=i) for i, s in enumerate(spectra)])
    A = mats[0] if batch == () else mats
    W = torch.randn(6, 6, generator=torch.Generator().manual_seed(4), dtype=F64)
    ref = eigh_grad(torch.linalg.eigh, A, W)
    exact = eigh_grad(lambda X: eigh_stable(X, taylor_order=None), A, W)
    taylor = eigh_grad(lambda X: eigh_stable(X, taylor_order=400), A, W)
    assert torch.allclose(exact, ref, rtol=1e-9, atol=1e-9)
    assert torch.allclose(taylor, ref, rtol=1e-7, atol=1e-8)
    # forward is torch's
    L, V = eigh_stable(A)
    L_ref, V_ref = torch.linalg.eigh(A)
    assert torch.equal(L, L_ref) and torch.equal(V, V_ref)
    assert torch.allclose(_sym(A), V @ torch.diag_embed(L) @ V.mT, atol=1e-10)


def test_eigh_taylor_error_shrinks_with_order():
    A = spd_with_spectrum([1.0, 1.5, 2.0, 4.0], seed=5)
    W = torch.randn(4, 4, generator=torch.Generator().manual_seed(5), dtype=F64)
    ref = eigh_grad(torch.linalg.eigh, A, W)
    errs = [(eigh_grad(lambda X, t=t: eigh_stable(X, taylor_order=t), A, W) - ref).abs().max().item()
            for t in (1, 3, 9, 27, 81)]
    assert all(b < a for a, b in zip(errs, errs[1:]))
    assert errs[-1] < 1e-8 < errs[0]


@pytest.mark.parametrize("shape", [(6, 6), (8, 5), (5, 8), (2, 7, 4)])
def test_svd_matches_torch_on_distinct_singular_values(shape):
    g = torch.Generator().manual_seed(6)
    A = torch.randn(*shape, generator=g, dtype=F64)
    k = min(shape[-2:])
    W_u = torch.randn(shape[-2], k, generator=g, dtype=F64)
    W_v = torch.randn(k, shape[-1], generator=g, dtype=F64)
    ref = svd_grad(lambda X: torch.linalg.svd(X, full_matrices=False), A, W_u, W_v)
    exact = svd_grad(lambda X: svd_stable(X, taylor_order=None), A, W_u, W_v)
    assert torch.allclose(exact, ref, rtol=1e-8, atol=1e-9)
    # Taylor form with a high order on the (positive, separated) spectrum of A^T A
    S = torch.linalg.svdvals(A)
    ratio = (S[..., 1:] / S[..., :-1]).square().max().item()
    order = int(math.log(1e-14) / math.log(ratio)) + 1
    taylor = svd_grad(lambda X: svd_stable(X, taylor_order=order), A, W_u, W_v)
    assert torch.allclose(taylor, ref, rtol=1e-6, atol=1e-7)
    U, S, Vh = svd_stable(A)
    assert torch.allclose(U @ torch.diag_embed(S) @ Vh, A, atol=1e-10)
    assert U.is_contiguous() and Vh.is_contiguous()


# ------------------------------------------------------------------------------------------- repeated eigenvalues


def _repeated_cases(dtype):
    n = 6
    u = torch.randn(n, 2, generator=torch.Generator().manual_seed(7), dtype=F64).to(dtype)
    return {
        "diag-repeated": torch.diag(torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0, 3.0], dtype=dtype)),
        "identity": torch.eye(n, dtype=dtype),
        "identity+low-rank": torch.eye(n, dtype=dtype) + u @ u.T,
        "identity+ones": torch.eye(n, dtype=dtype) + torch.ones(n, n, dtype=dtype),
    }


def _linear_v_loss(L, V, W):
    return (L * L).sum() + (V * W).sum()  # the gradient sees the whole of V^T dV, degenerate blocks included


def _documented_eigh_grad(A, W, taylor_order, clamp_gap=None, working=None):
    """The gradient of ``_linear_v_loss`` through eigh that the module docstring promises (tests/references.py):
    the documented backward at the eigenvectors torch returns (the op's forward is torch.linalg.eigh), with the
    kernel ``K`` of the given mode. At a repeated eigenvalue the gradient of a V-dependent loss is undefined (the
    basis of the eigenspace is arbitrary); this is the finite value the docstring defines instead."""
    working = working or A.dtype
    L, V = torch.linalg.eigh(A.detach().to(working))
    K = stable_kernel64(L, taylor_order, clamp_gap, dtype=working)
    return eigh_backward64(L, V, 2 * L, W, K)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_eigh_repeated_eigenvalues_finite_where_torch_is_not(dtype):
    W = torch.randn(6, 6, generator=torch.Generator().manual_seed(8), dtype=F64).to(dtype)
    torch_nonfinite = []
    modes = [(eigh_stable, dict(taylor_order=9)),
             (lambda X: eigh_stable(X, taylor_order=None), dict(taylor_order=None)),
             (lambda X: eigh_stable(X, clamp_gap=1e-3), dict(taylor_order=9, clamp_gap=1e-3)),
             (lambda X: eigh_stable(X, float64=True), dict(taylor_order=9, working=F64))]
    for name, A in _repeated_cases(dtype).items():
        for fn, mode in [(torch.linalg.eigh, None)] + modes:
            X = A.clone().requires_grad_(True)
            L, V = fn(X)
            (g,) = torch.autograd.grad(_linear_v_loss(L, V, W), X)
            if fn is torch.linalg.eigh:
                torch_nonfinite.append(not bool(g.isfinite().all()))
                continue
            assert g.isfinite().all(), name
            assert g.dtype == dtype
            # (the same eigenvectors as the op: its forward is torch.linalg.eigh in the working dtype)
            expected = _documented_eigh_grad(A, W, **mode)
            # entry by entry in float64 (the exact kernel at exact ties gives entries ~ 1 / (eps max|lambda|) next to
            # entries ~ 1); in float32 relative to the gradient's size, the kernel amplifying the op's rounding
            tol = dict(atol=1e-9, rtol=1e-9) if dtype == F64 else dict(atol=1e-4 * float(expected.abs().max()), rtol=0)
            torch.testing.assert_close(g.double(), expected, **tol, msg=lambda m: f"{name} {mode}: {m}")
        # the Taylor form is bounded: |K| <= (T+1)/lambda_max(pair) with lambda >= 1 here
        X = A.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(_linear_v_loss(*eigh_stable(X), W), X)
        assert g.abs().max() < 10 * 6 * W.abs().sum() + 100, name
    # the test bites: torch's own gradient is NaN/inf on (at least) the exactly repeated spectra
    assert torch_nonfinite[0] and torch_nonfinite[1]


def test_eigh_zero_and_negative_eigenvalues_finite():
    for spectrum in ([0.0, 0.0, 0.0, 1.0, 2.0], [-2.0, -2.0, -1.0, 0.0, 3.0], [-1.0, -1.0, 1.0, 1.0, 0.0]):
        A = torch.diag(torch.tensor(spectrum, dtype=F64))
        W = torch.randn(5, 5, generator=torch.Generator().manual_seed(9), dtype=F64)
        for t in (None, 0, 9):
            X = A.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(_linear_v_loss(*eigh_stable(X, taylor_order=t), W), X)
            assert g.isfinite().all()
            # the documented value: pairs with a zero or of opposite signs take 1 / (|lambda_i| + |lambda_j|), a
            # pair of zeros the floor's 1 / (eps max|lambda|)
            expected = _documented_eigh_grad(A, W, t)
            torch.testing.assert_close(g, expected, atol=1e-9, rtol=1e-9,
                                       msg=lambda m: f"{spectrum} order {t}: {m}")
    # rank-deficient covariance (floating-point zeros of either sign)
    u = torch.randn(6, 2, generator=torch.Generator().manual_seed(10))
    X = (u @ u.T).requires_grad_(True)
    (g,) = torch.autograd.grad(_linear_v_loss(*eigh_stable(X), torch.ones(6, 6)), X)
    assert g.isfinite().all()
    expected = _documented_eigh_grad(X, torch.ones(6, 6), 9)
    torch.testing.assert_close(g.double(), expected, atol=1e-4 * float(expected.abs().max()), rtol=0)


def test_svd_repeated_singular_values_finite():
    Q1, Q2 = _rotation(6, 11), _rotation(4, 12)
    cases = [torch.eye(6, 4, dtype=F64), Q1[:, :4] @ torch.diag(torch.tensor([2.0, 2.0, 1.0, 1.0], dtype=F64)) @ Q2,
             torch.zeros(5, 3, dtype=F64), torch.ones(4, 4, dtype=F64)]
    for A in cases:
        for B in (A, A.T):
            k = min(B.shape)
            W_u = torch.ones(B.shape[0], k, dtype=F64)
            W_v = torch.ones(k, B.shape[1], dtype=F64)
            for t in (None, 9):
                X = B.clone().requires_grad_(True)
                U, S, Vh = svd_stable(X, taylor_order=t)
                loss = (U * W_u).sum() + (Vh * W_v).sum() + S.sum()
                (g,) = torch.autograd.grad(loss, X)
                assert g.isfinite().all()
                # the documented backward at the factors torch returns (the op's forward is torch.linalg.svd):
                # at repeated singular values, U and V depend on the arbitrary basis, so this is the value defined
                # by the docstring (K from S^2, S^-1 clamped), not a derivative
                U0, S0, Vh0 = torch.linalg.svd(B, full_matrices=False)
                expected = svd_backward64(U0, S0, Vh0, W_u, torch.ones_like(S0), W_v,
                                          stable_kernel64(S0.square(), t, descending=True))
                torch.testing.assert_close(g, expected, atol=1e-9, rtol=1e-9,
                                           msg=lambda m: f"{tuple(B.shape)} order {t}: {m}")
    # torch's is not finite on an exactly repeated spectrum: the test above bites
    X = torch.eye(6, 4, dtype=F64).requires_grad_(True)
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    (g,) = torch.autograd.grad((U * torch.arange(24.0, dtype=F64).reshape(6, 4)).sum() + Vh.sum(), X)
    assert not g.isfinite().all()


# ------------------------------------------------------------------------------------------- the kernel


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=7),
       st.one_of(st.none(), st.integers(0, 12)), st.one_of(st.none(), st.floats(1e-3, 1.0)))
def test_pair_kernel_properties(values, order, clamp):
    lam = torch.tensor(sorted(values), dtype=F64)
    K = pair_kernel(lam, order, clamp)
    assert K.isfinite().all()
    assert torch.equal(K.diagonal(), torch.zeros_like(lam))
    assert torch.allclose(K, -K.T)
    gap = lam.unsqueeze(0) - lam.unsqueeze(1)  # [i, j] = lam_j - lam_i
    sep = gap.abs() > 1e-9
    assert ((K[sep] * gap[sep]) > 0).all()  # sign of lam_j - lam_i
    if clamp is not None:
        assert (K.abs() <= 1 / clamp * (1 + 1e-12)).all()
    if order is not None:
        # bounded by (T+1)/max(|lam_i|, |lam_j|), and never above the exact value (series of positive terms)
        big = torch.maximum(lam.abs().unsqueeze(0), lam.abs().unsqueeze(1))
        nz = big > 1e-6
        assert (K.abs()[nz] <= (order + 1) / big[nz] * (1 + 1e-12)).all()
        assert (K.abs()[sep] <= 1 / gap.abs()[sep] * (1 + 1e-9)).all()
    elif clamp is None:
        far = gap.abs() > 1e-6
        assert torch.allclose(K[far], 1 / gap[far])


@pytest.mark.parametrize("inplace", [False, True])
def test_geometric_sum(inplace):
    from orthofx.nn.decompositions import _geometric_sum

    r = torch.rand(200, generator=torch.Generator().manual_seed(27), dtype=F64)
    r[:3] = torch.tensor([0.0, 1.0, 1.0 - 1e-12], dtype=F64)
    r0 = r.clone()
    for order in range(0, 41):
        expected = sum(r0**k for k in range(order + 1))
        assert torch.allclose(_geometric_sum(r, order, inplace), expected, rtol=1e-13), order
        assert torch.equal(r, r0)  # the input is never modified


@pytest.mark.parametrize("order", [None, 0, 1, 2, 5, 9, 16])
def test_pair_kernel_same_with_and_without_grad_mode(order):
    # the backward runs the in-place path (no grad mode); a double backward runs the differentiable one
    lam = torch.tensor([[-3.0, -1.0, 0.0, 0.0, 1e-9, 2.0, 2.0, 5.0], [0.5, 1.0, 1.1, 1.2, 2.0, 4.0, 8.0, 9.0]],
                       dtype=F64)
    with torch.no_grad():
        fast = pair_kernel(lam, order, 0.05)
    with torch.enable_grad():
        slow = pair_kernel(lam, order, 0.05)
    assert torch.allclose(fast, slow, rtol=1e-14, atol=0)


def test_pair_kernel_taylor_form_matches_paper_for_positive_spectra():
    lam = torch.tensor([0.5, 1.0, 3.0], dtype=F64)
    T = 4
    K = pair_kernel(lam, T)
    for i in range(3):
        for j in range(3):
            if i == j:
                continue
            hi, lo = max(lam[i], lam[j]), min(lam[i], lam[j])
            expected = sum((lo / hi) ** k for k in range(T + 1)) / hi
            assert math.isclose(K[i, j].item(), math.copysign(expected, (lam[j] - lam[i]).item()))
    # ties: (T+1)/lambda, continuous with near-ties
    tied = pair_kernel(torch.tensor([2.0, 2.0], dtype=F64), T)
    near = pair_kernel(torch.tensor([2.0, 2.0 + 1e-12], dtype=F64), T)
    assert math.isclose(tied[0, 1].item(), (T + 1) / 2) and math.isclose(near[0, 1].item(), (T + 1) / 2)


def test_argument_validation():
    A = torch.eye(3)
    with pytest.raises(ValueError, match="taylor_order"):
        eigh_stable(A, taylor_order=-1)
    with pytest.raises(ValueError, match="clamp_gap"):
        svd_stable(A, clamp_gap=0.0)
    with pytest.raises(ValueError, match="iterations"):
        sqrtm_newton_schulz(A, iterations=-2)
    with pytest.raises(ValueError, match="square"):
        inv_sqrtm_newton_schulz(torch.ones(2, 3))


def test_float64_flag():
    A = spd_with_spectrum([1e-3, 1e-3 + 1e-6, 1.0, 2.0], seed=13, dtype=torch.float32).requires_grad_(True)
    L, V = eigh_stable(A, float64=True)
    assert L.dtype == V.dtype == torch.float32
    L64, _ = torch.linalg.eigh(A.detach().double())
    assert torch.allclose(L.double(), L64, rtol=0, atol=1e-6)
    W = torch.randn(4, 4, generator=torch.Generator().manual_seed(14), dtype=F64)
    (g,) = torch.autograd.grad(L.sum() + (V.square() * W.float()).sum(), A)  # sign-invariant in V
    assert g.dtype == torch.float32 and g.isfinite().all()
    # the documented backward run in float64 (Taylor kernel ~ 1e4 on the close pair), cast back to float32
    L64, V64 = torch.linalg.eigh(A.detach().double())
    expected = eigh_backward64(L64, V64, torch.ones(4, dtype=F64), 2 * V64 * W, stable_kernel64(L64, 9))
    torch.testing.assert_close(g.double(), expected, atol=1e-5 * float(expected.abs().max()), rtol=0)
    U, S, Vh = svd_stable(torch.randn(5, 3), float64=True)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32


# ------------------------------------------------------------------------------------------- tracing


class _EighSite(torch.nn.Module):
    def __init__(self, n: int, taylor_order=2):
        super().__init__()
        self.taylor_order = taylor_order
        self.W = torch.nn.Parameter(torch.randn(n, n, generator=torch.Generator().manual_seed(14), dtype=F64))

    def forward(self, A):
        L, V = eigh_stable(A, taylor_order=self.taylor_order)
        return eigh_loss(L, V, self.W)


class _SvdSite(torch.nn.Module):
    def forward(self, A):
        U, S, Vh = svd_stable(A, taylor_order=2)
        k = S.shape[-1]
        return (S * torch.arange(1, k + 1, dtype=S.dtype)).sum() + U.square()[..., 0].sum() + (U @ Vh).sum()


def _near_degenerate():
    """A positive spectrum with close eigenvalues: the order-2 Taylor gradient is far from the exact one."""
    return spd_with_spectrum([1.0, 1.05, 1.1, 3.0, 3.2], seed=15)


def _input_grad(fn, A):
    X = A.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(X), X)
    return g


@pytest.fixture(scope="module")
def site_and_reference():
    m = _EighSite(5)
    A = _near_degenerate()
    eager = _input_grad(m, A)
    exact = _input_grad(lambda X: eigh_loss(*torch.linalg.eigh(X), m.W), A)
    assert (eager - exact).abs().max() > 1.0  # an inlined/exact backward would be detected
    return m, A, eager


def test_fx_symbolic_trace_keeps_custom_backward(site_and_reference):
    m, A, eager = site_and_reference
    gm = torch.fx.symbolic_trace(m)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.orthofx.eigh_stable.default in targets
    assert not any("linalg" in str(t) for t in targets)
    assert torch.allclose(_input_grad(gm, A), eager, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_keeps_custom_backward(site_and_reference, backend):
    m, A, eager = site_and_reference
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend=backend)
    assert torch.allclose(_input_grad(compiled, A), eager, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")
def test_compile_inductor_keeps_custom_backward(site_and_reference):
    # about 20 s cold (empty inductor cache) on a 2-core CPU, a few seconds warm
    m, A, eager = site_and_reference
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True)
    assert torch.allclose(_input_grad(compiled, A), eager, rtol=1e-8, atol=1e-8)


def test_export_keeps_custom_backward(site_and_reference):
    m, A, eager = site_and_reference
    ep = torch.export.export(m, (A,))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.orthofx.eigh_stable.default in targets
    assert torch.allclose(_input_grad(ep.module(), A), eager, rtol=1e-12, atol=1e-12)


def test_svd_trace_compile_export_keep_custom_backward():
    m = _SvdSite()
    A = _rotation(5, 16)[:, :4] @ torch.diag(torch.tensor([2.0, 1.9, 1.85, 0.5], dtype=F64)) @ _rotation(4, 17)
    eager = _input_grad(m, A)
    exact = _input_grad(lambda X: (lambda U, S, Vh: (S * torch.arange(1, 5, dtype=F64)).sum()
                                   + U.square()[..., 0].sum() + (U @ Vh).sum())(
        *torch.linalg.svd(X, full_matrices=False)), A)
    assert (eager - exact).abs().max() > 0.1
    gm = torch.fx.symbolic_trace(m)
    assert torch.ops.orthofx.svd_stable.default in [n.target for n in gm.graph.nodes]
    assert torch.allclose(_input_grad(gm, A), eager, rtol=1e-12, atol=1e-12)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    assert torch.allclose(_input_grad(compiled, A), eager, rtol=1e-10, atol=1e-10)
    ep = torch.export.export(m, (A,))
    assert torch.allclose(_input_grad(ep.module(), A), eager, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------- fake kernels


def test_opcheck_eigh():
    A = spd_with_spectrum([1.0, 2.0, 3.0, 5.0], seed=18)
    for args in [(A, 9, None), (A, None, None), (A, 3, 0.01), (torch.stack([A, 2 * A]).float(), 9, None)]:
        torch.library.opcheck(torch.ops.orthofx.eigh_stable.default, args)


def test_opcheck_svd():
    g = torch.Generator().manual_seed(19)
    for shape in [(5, 5), (6, 3), (3, 6), (2, 4, 3)]:
        A = torch.randn(*shape, generator=g, dtype=F64)
        torch.library.opcheck(torch.ops.orthofx.svd_stable.default, (A, 9, None))
        torch.library.opcheck(torch.ops.orthofx.svd_stable.default, (A.float(), None, 0.1))


def test_fake_kernel_strides_match_real():
    from torch._subclasses.fake_tensor import FakeTensorMode

    g = torch.Generator().manual_seed(20)
    cases = [(torch.ops.orthofx.eigh_stable.default, _sym(torch.randn(3, 6, 6, generator=g))),
             (torch.ops.orthofx.svd_stable.default, torch.randn(2, 7, 4, generator=g)),
             (torch.ops.orthofx.svd_stable.default, torch.randn(4, 7, generator=g))]
    for op, A in cases:
        real = op(A, 9, None)
        with FakeTensorMode() as mode:
            fake = op(mode.from_tensor(A), 9, None)
        for r, f in zip(real, fake):
            assert r.shape == f.shape and r.stride() == f.stride() and r.dtype == f.dtype
    # torch's own eigh V is column-major: the reason the real kernel copies
    assert not torch.linalg.eigh(cases[0][1])[1].is_contiguous()


# ------------------------------------------------------------------------------------------- Newton-Schulz


def _eigh_sqrt(A, power):
    L, V = torch.linalg.eigh(A)
    return V @ torch.diag_embed(L.pow(power)) @ V.mT


def test_newton_schulz_matches_eigh_batched():
    g = torch.Generator().manual_seed(21)
    n = 8
    mats = []
    for b in range(4):
        lam = 1.0 + 3.0 * torch.rand(n, generator=g, dtype=F64)  # kappa <= 4
        mats.append(spd_with_spectrum(lam, seed=100 + b))
    A = torch.stack(mats) * torch.tensor([1.0, 10.0, 0.1, 3.0], dtype=F64).reshape(4, 1, 1)
    ref_sqrt, ref_isqrt = _eigh_sqrt(A, 0.5), _eigh_sqrt(A, -0.5)
    for iters, tol in ((7, 1e-3), (12, 1e-10)):
        S = sqrtm_newton_schulz(A, iterations=iters)
        Z = inv_sqrtm_newton_schulz(A, iterations=iters)
        rel_s = (torch.linalg.matrix_norm(S - ref_sqrt) / torch.linalg.matrix_norm(ref_sqrt)).max()
        rel_z = (torch.linalg.matrix_norm(Z - ref_isqrt) / torch.linalg.matrix_norm(ref_isqrt)).max()
        assert rel_s < tol and rel_z < tol, (iters, rel_s, rel_z)
    assert torch.allclose(S @ S, A, rtol=1e-9, atol=1e-9)
    # single matrix, float32
    S32 = sqrtm_newton_schulz(A[0].float(), iterations=12)
    assert S32.dtype == torch.float32 and torch.allclose(S32.double(), ref_sqrt[0], rtol=1e-4, atol=1e-4)


def test_newton_schulz_error_decreases_with_iterations():
    A = spd_with_spectrum(torch.linspace(0.5, 4.0, 6), seed=22)
    ref = _eigh_sqrt(A, 0.5)
    errs = [(sqrtm_newton_schulz(A, iterations=t) - ref).abs().max().item() for t in range(0, 9)]
    assert all(b <= a * 1.0001 for a, b in zip(errs, errs[1:]))
    assert errs[-1] < 1e-8


def test_newton_schulz_gradient_matches_eigh_based():
    A = spd_with_spectrum([1.0, 1.5, 2.0, 3.0, 3.5], seed=23)
    W = torch.randn(5, 5, generator=torch.Generator().manual_seed(23), dtype=F64)
    for ns, p in ((sqrtm_newton_schulz, 0.5), (inv_sqrtm_newton_schulz, -0.5)):
        g_ns = _input_grad(lambda X: (ns(X, iterations=14) * W).sum(), A)
        g_ref = _input_grad(lambda X: (_eigh_sqrt(_sym(X), p) * W).sum(), A)
        assert torch.allclose(_sym(g_ns), g_ref, rtol=1e-6, atol=1e-8)
    assert torch.autograd.gradcheck(lambda X: sqrtm_newton_schulz(X, 3), (A.clone().requires_grad_(),))


def test_newton_schulz_traces_to_matmuls_only():
    class Whiten(torch.nn.Module):
        def forward(self, A):
            return inv_sqrtm_newton_schulz(A, iterations=3)

    A = spd_with_spectrum([1.0, 2.0, 3.0], seed=24)
    ep = torch.export.export(Whiten(), (A,))
    names = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("linalg" in s or "eig" in s or "svd" in s for s in names)
    assert torch.allclose(ep.module()(A), inv_sqrtm_newton_schulz(A, 3))


# ------------------------------------------------------------------------------------------- monitor


def test_condition_monitor_records_kappa():
    mon = ConditionMonitor(history_size=3)
    assert mon.history == []
    k = mon.update(torch.tensor([1.0, 2.0, 10.0]))
    assert k.item() == pytest.approx(10.0) and mon.last.item() == pytest.approx(10.0)
    mon.update(torch.tensor([[2.0, 4.0], [1.0, 50.0]]))  # batch: the worst one
    assert mon.last.item() == pytest.approx(50.0)
    mon(torch.tensor([4.0, 8.0]))
    assert mon.last.item() == pytest.approx(2.0) and mon.running_max.item() == pytest.approx(50.0)
    assert mon.history == pytest.approx([10.0, 50.0, 2.0])
    mon.update(torch.tensor([1.0, 3.0]))
    assert mon.history == pytest.approx([50.0, 2.0, 3.0])  # bounded, oldest first
    assert int(mon.updates) == 4 and int(mon.nan_events) == 0 and int(mon.inf_events) == 0


def test_condition_monitor_records_nothing_for_zero_by_zero_matrices():
    # torch.linalg.eigh takes 0 x 0 matrices (no eigenvalue); the monitor must not break such a site
    mon = ConditionMonitor(history_size=4)
    eigenvalues = torch.linalg.eigvalsh(torch.zeros(3, 0, 0))
    assert eigenvalues.shape == (3, 0)
    assert math.isnan(mon.update(eigenvalues).item())
    assert int(mon.updates) == 0 and mon.history == [] and math.isnan(mon.last.item())
    with pytest.raises(LayerArgumentError, match=r"\[\.\.\., n\]"):
        mon.update(torch.tensor(1.0))  # a 0-dim tensor is not a list of eigenvalues


def test_condition_monitor_counts_nan_and_inf_events_and_state_dict():
    mon = ConditionMonitor(history_size=10)
    mon.update(torch.tensor([1.0, 5.0]))
    mon.update(torch.tensor([float("nan"), 5.0]))
    assert math.isnan(mon.last.item()) and mon.running_max.item() == pytest.approx(5.0)
    mon.update(torch.tensor([1.0, float("inf")]))
    mon.update(torch.tensor([-1e-7, 5.0]))  # lambda_min <= 0: kappa = inf
    mon.update(torch.tensor([[1.0, 2.0], [float("nan"), 1.0]]))
    assert int(mon.nan_events) == 2 and int(mon.inf_events) == 2 and int(mon.updates) == 5
    assert math.isinf(mon.running_max.item())
    # eigenvalues from eigh_stable with gradients attached: no graph is built
    A = spd_with_spectrum([1.0, 4.0], seed=25).requires_grad_(True)
    L, _ = eigh_stable(A)
    assert not mon.update(L).requires_grad
    state = mon.state_dict()
    assert set(state) == {"last", "running_max", "updates", "nan_events", "inf_events", "history_buffer"}
    other = ConditionMonitor(history_size=10)
    other.load_state_dict(state)
    assert other.history == pytest.approx(mon.history, nan_ok=True)
    assert int(other.nan_events) == 2 and other.last.item() == pytest.approx(4.0)
    other.reset()
    assert other.history == [] and int(other.updates) == 0


def test_double_backward_exact_mode():
    # the backward is made of differentiable ops, so create_graph=True works (e.g. under a Jacobian regulariser)
    A = spd_with_spectrum([1.0, 2.0, 3.5, 5.0], seed=26).requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda X: (lambda L, V: (L, V.square()))(*eigh_stable(_sym(X), None)), (A,))
    B = torch.randn(5, 3, generator=torch.Generator().manual_seed(26), dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda X: svd_outputs(*svd_stable(X, None))[:3], (B,))


# ------------------------------------------------------------------------------------------- non-finite inputs


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_nonfinite_matrix_gives_nan_outputs_instead_of_a_lapack_error(bad_value):
    good = spd_with_spectrum([1.0, 2.0, 4.0], seed=30)
    bad = good.clone()
    bad[2, 0] = bad_value  # the lower triangle, which eigh reads
    A = torch.stack([good, bad]).requires_grad_(True)
    L, V = eigh_stable(A, taylor_order=None)  # exact backward, to compare with torch's gradient
    assert torch.isnan(L[1]).all() and torch.isnan(V[1]).all()
    L_ref, V_ref = torch.linalg.eigh(good)
    torch.testing.assert_close(L[0], L_ref)
    torch.testing.assert_close(V[0].abs(), V_ref.abs())
    W = torch.randn(3, 3, generator=torch.Generator().manual_seed(30), dtype=F64)
    (eigh_loss(L[0], V[0], W) + 0 * eigh_loss(L[1], V[1], W).nan_to_num()).backward()
    torch.testing.assert_close(A.grad[0], eigh_grad(lambda X: torch.linalg.eigh(X), good, W))

    U, S, Vh = svd_stable(torch.stack([good[:, :2], bad[:, :2]]))
    assert torch.isnan(S[1]).all() and torch.isnan(U[1]).all() and torch.isnan(Vh[1]).all()
    torch.testing.assert_close(S[0], torch.linalg.svdvals(good[:, :2]))


def test_nonfinite_entry_eigh_does_not_read_is_ignored_like_torch():
    A = spd_with_spectrum([1.0, 3.0, 5.0], seed=31)
    A[0, 2] = float("nan")  # strict upper triangle: torch.linalg.eigh never reads it
    L, _ = eigh_stable(A)
    torch.testing.assert_close(L, torch.linalg.eigh(A).eigenvalues)
    assert torch.isfinite(L).all()


# ------------------------------------------------------------------------------- half precision (autocast)


def _spd_batch(n=6, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(batch, n, 2 * n, generator=g, dtype=torch.float64)
    return X @ X.mT / (2 * n) + 0.1 * torch.eye(n, dtype=torch.float64)


def test_half_precision_input_is_decomposed_in_float32():
    """LAPACK / cuSOLVER have no bfloat16 eigh: the stable ops decompose in float32 (what autocast hands them
    after a bfloat16 covariance matmul) and return float32 under autocast, the input's dtype outside it."""
    A = _spd_batch().to(torch.bfloat16)
    reference = torch.linalg.eigvalsh(A.double())  # the same bfloat16 values, decomposed exactly
    L, V = eigh_stable(A)
    assert L.dtype == V.dtype == torch.bfloat16
    torch.testing.assert_close(L.double(), reference, atol=0.02, rtol=0.02)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        L32, V32 = eigh_stable(A)
        U, S, Vh = svd_stable(A)
    assert L32.dtype == V32.dtype == S.dtype == U.dtype == torch.float32
    torch.testing.assert_close(L32.double(), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(S.double().sort(-1).values, reference, atol=1e-5, rtol=1e-5)


def test_newton_schulz_under_autocast_keeps_float32_accuracy():
    A = _spd_batch(seed=1)
    L, V = torch.linalg.eigh(A)
    exact = V @ torch.diag_embed(L.sqrt()) @ V.mT
    with torch.autocast("cpu", dtype=torch.bfloat16):
        Y = sqrtm_newton_schulz(A.float(), iterations=15)
    assert Y.dtype == torch.float32
    # bfloat16 matmuls would leave errors around 1e-2; float32 ones reach ~1e-6
    assert float((Y.double() - exact).abs().max()) < 1e-4


@pytest.mark.parametrize("shape", [(2, 0, 0), (0, 3, 3), (2, 1, 1)])
def test_eigh_backward_on_empty_and_one_by_one_matrices_like_torch(shape):
    """A 0 x 0 matrix has no eigenvalue: the gap floor's max over an empty dim used to raise an IndexError in the
    backward, where torch's eigh gives an empty gradient."""
    for taylor_order in (None, 9):
        A = torch.randn(shape, dtype=F64, requires_grad=True)
        L, V = eigh_stable(A, taylor_order=taylor_order)
        (g,) = torch.autograd.grad(L.sum() + V.sum(), A)
        B = A.detach().clone().requires_grad_(True)
        L2, V2 = torch.linalg.eigh(B)
        (g2,) = torch.autograd.grad(L2.sum() + V2.abs().sum(), B)
        assert g.shape == g2.shape == shape
        if shape[-1] == 1:  # V = +-1: only the eigenvalue contributes
            torch.testing.assert_close(g, torch.ones(shape, dtype=F64))


@pytest.mark.parametrize("shape", [(2, 0, 3), (2, 3, 0), (0, 3, 2)])
def test_svd_backward_on_matrices_with_a_zero_dimension_like_torch(shape):
    for taylor_order in (None, 9):
        A = torch.randn(shape, dtype=F64, requires_grad=True)
        U, S, Vh = svd_stable(A, taylor_order=taylor_order)
        (g,) = torch.autograd.grad(U.sum() + S.sum() + Vh.sum(), A)
        assert g.shape == shape and not g.any()


class _HalfSite(torch.nn.Module):
    def forward(self, A, X):
        L, V = eigh_stable(A, taylor_order=None)
        U, S, Vh = svd_stable(X, taylor_order=None)
        return L, S


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_traced_op_call_on_half_precision_input_runs_in_float32(dtype):
    """fx tracing keeps the plain custom-op call (the Python wrapper's upcast cannot see a Proxy's dtype), so the
    kernels themselves get half-precision input: they raised "linalg_eigh_cpu not implemented for 'BFloat16'"."""
    gm = torch.fx.symbolic_trace(_HalfSite())
    A = _spd_batch(seed=3).to(dtype).requires_grad_(True)
    X = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(4)).to(dtype).requires_grad_(True)
    L, S = gm(A, X)
    assert L.dtype == S.dtype == dtype
    A64, X64 = A.detach().double(), X.detach().double()  # the same half-precision values, exactly
    torch.testing.assert_close(L.double(), torch.linalg.eigvalsh(A64), atol=0.02, rtol=0.02)
    torch.testing.assert_close(S.double(), torch.linalg.svdvals(X64), atol=0.02, rtol=0.02)
    w = torch.randn(L.shape, dtype=F64, generator=torch.Generator().manual_seed(5))
    gA, gX = torch.autograd.grad((L * w.to(dtype)).sum() + S.sum(), (A, X))
    assert gA.dtype == gX.dtype == dtype
    A_ref, X_ref = A64.clone().requires_grad_(True), X64.clone().requires_grad_(True)
    ref_A, ref_X = torch.autograd.grad((torch.linalg.eigvalsh(A_ref) * w).sum()
                                       + torch.linalg.svdvals(X_ref).sum(), (A_ref, X_ref))
    torch.testing.assert_close(gA.double(), ref_A, atol=0.03, rtol=0.03)
    torch.testing.assert_close(gX.double(), ref_X, atol=0.03, rtol=0.03)


def test_newton_schulz_float16_input_with_trace_above_float16_range():
    """The iteration ran in float32 but handed its trace back in float16: a trace above 65504 became inf, so the
    square root was inf everywhere (its entries are ~100) and the inverse one 0."""
    Q = _rotation(8, seed=6)
    lam = torch.linspace(5e3, 1.2e4, 8, dtype=F64)  # trace 6.8e4: entries fit float16, the trace does not
    A = (Q @ torch.diag(lam) @ Q.T).to(torch.float16)
    L, V = torch.linalg.eigh(A.double())  # the float16 matrix's exact square roots
    exact = V @ torch.diag_embed(L.sqrt()) @ V.mT
    exact_inv = V @ torch.diag_embed(L.rsqrt()) @ V.mT
    Y = sqrtm_newton_schulz(A, iterations=10)
    Z = inv_sqrtm_newton_schulz(A, iterations=10)
    assert Y.dtype == Z.dtype == torch.float16
    torch.testing.assert_close(Y.double(), exact, atol=0.1, rtol=2e-3)
    torch.testing.assert_close(Z.double(), exact_inv, atol=1e-5, rtol=2e-3)


@pytest.mark.parametrize("convert", [lambda m: m.half(), lambda m: m.bfloat16(), lambda m: m.to(torch.float16)])
def test_condition_monitor_state_stays_float64_when_the_model_is_converted(convert):
    """``model.half()`` converted the monitor's buffers: the next update raised in ``index_copy_`` (Half vs
    Double), and a float16 kappa above 65504 would have been inf."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), ConditionMonitor(history_size=4))
    model[1].update(torch.tensor([1e-3, 1.0], dtype=F64))
    convert(model)
    monitor = model[1]
    assert model[0].weight.dtype != F64  # the model itself was converted
    assert all(b.dtype in (F64, torch.long) for b in monitor.buffers())
    kappa = monitor.update(torch.tensor([1e-6, 1.0], dtype=torch.float16))
    expected = 1.0 / float(torch.tensor(1e-6, dtype=torch.float16))
    assert float(kappa) == pytest.approx(expected, rel=1e-12)
    assert monitor.history == pytest.approx([1e3, expected], rel=1e-12)
    restored = ConditionMonitor(history_size=4)
    restored.load_state_dict(monitor.state_dict())
    assert restored.summary() == monitor.summary()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 5, 3), (2, 3, 5)])
def test_full_matrices_svd_stand_ins_on_half_precision_input(dtype, shape):
    """The stable op decomposes half precision in float32, but the completion of ``U``/``Vh`` (full_matrices=True,
    torch's default, and torch.svd(some=False)) ran a QR in the input's dtype: "geqrf_cpu not implemented"."""
    from orthofx.nn.conditioning import stable_linalg_svd, stable_torch_svd

    X = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    m, n = shape[-2:]
    U, S, Vh = stable_linalg_svd(X, full_matrices=True)
    U2, S2, V2 = stable_torch_svd(X, some=False)
    assert U.shape == U2.shape == (2, m, m) and Vh.shape == V2.shape == (2, n, n)
    assert U.dtype == Vh.dtype == S.dtype == dtype
    torch.testing.assert_close(S.double(), torch.linalg.svdvals(X.double()), atol=0.03, rtol=0.03)
    for Q in (U, Vh, U2, V2):  # orthogonal to half precision
        eye = torch.eye(Q.shape[-1], dtype=F64).expand_as(Q)
        torch.testing.assert_close(Q.double().mT @ Q.double(), eye, atol=0.03, rtol=0)
    k = min(m, n)
    rebuilt = U[..., :, :k].double() @ torch.diag_embed(S.double()) @ Vh[..., :k, :].double()
    torch.testing.assert_close(rebuilt, X.double(), atol=0.05, rtol=0.05)


def _signed_eigh(decompose):
    def fn(A):
        L, V = decompose(A)
        return L, V * V[..., :1, :].sign()
    return fn


def _signed_svd(decompose):
    def fn(X):
        U, S, Vh = decompose(X)
        s = U[..., :1, :].sign()
        return U * s, S, Vh * s.mT
    return fn


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("outputs", [(0,), (1,), (0, 1), (0, 2)])
def test_vectorized_jacobian_through_the_backward_matches_torch(outputs):
    """``torch.autograd.functional.jacobian(vectorize=True)`` (vmap over the backward, is_grads_batched) failed in
    the in-place backward: "vmap: aten::add_ ... not possible" / "Batching rule not implemented for
    aten::matmul.out"."""
    A = spd_with_spectrum([0.5, 1.0, 2.0, 4.0], seed=8)
    X = torch.randn(2, 5, 3, dtype=F64, generator=torch.Generator().manual_seed(9))
    for inputs, ours, ref in (
            (A, _signed_eigh(lambda a: eigh_stable(a, taylor_order=None)), _signed_eigh(torch.linalg.eigh)),
            (X, _signed_svd(lambda x: svd_stable(x, taylor_order=None)),
             _signed_svd(lambda x: torch.linalg.svd(x, full_matrices=False)))):
        keep = [i for i in outputs if i < (2 if inputs is A else 3)]

        def pick(fn):
            return lambda x: tuple(fn(x)[i] for i in keep)
        J = torch.autograd.functional.jacobian(pick(ours), inputs, vectorize=True)
        J_ref = torch.autograd.functional.jacobian(pick(ref), inputs)
        for got, want in zip(J, J_ref):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("which", ["eigh", "svd"])
def test_forward_mode_ad_raises_instead_of_a_zero_tangent(which):
    """The custom ops have no forward-mode formula and torch gave them a zero tangent (torch.func.jvp) or none
    (forward_ad): a JVP through the decomposition silently came out 0 where torch's eigh gives the tangent."""
    import torch.autograd.forward_ad as fwAD

    A = spd_with_spectrum([0.5, 1.0, 2.0, 4.0], seed=10)
    T = torch.eye(4, dtype=F64)  # d lambda_i = v_i^T T v_i = 1, d s_i = u_i^T T v_i = 1

    def values(a, plain=False):
        return eigh_stable(a, plain=plain)[0] if which == "eigh" else svd_stable(a, plain=plain)[1]

    with pytest.raises(NotImplementedError, match="forward-mode"):
        torch.func.jvp(values, (A,), (T,))
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode"):
        values(fwAD.make_dual(A, T))
    _, tangent = torch.func.jvp(lambda a: values(a, plain=True), (A,), (T,))  # plain: torch's forward mode
    torch.testing.assert_close(tangent, torch.ones(4, dtype=F64))
    L = values(A.clone().requires_grad_(True))  # reverse mode unaffected
    assert L.requires_grad


@pytest.mark.parametrize("saved_size, size", [(5, 3), (3, 5), (4, 10), (6, 6)])
def test_condition_monitor_loads_a_history_saved_with_another_size(saved_size, size):
    """A state saved with ``history_size=a`` loads into a monitor of size ``b`` (torch raised a size mismatch):
    it then holds what a size-``b`` monitor fed the same kappas would hold, and keeps agreeing with it after
    more updates; kappas the saved ring had dropped read NaN."""
    kappas = [float(k) for k in torch.arange(2.0, 10.0)]  # 8 updates: the saved ring wraps when a < 8

    def fed(monitor, values):
        for k in values:
            monitor.update(torch.tensor([1.0, k], dtype=torch.float64))
        return monitor

    saved = fed(ConditionMonitor(history_size=saved_size), kappas)
    state = saved.state_dict()
    before = {k: v.clone() for k, v in state.items()}
    loaded = ConditionMonitor(history_size=size)
    loaded.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in state.items())  # the caller's state is not modified
    reference = fed(ConditionMonitor(history_size=size), kappas)
    lost = max(0, min(size, len(kappas)) - saved_size)  # entries this ring would hold that the saved one dropped
    expected = [float("nan")] * lost + reference.history[lost:]
    assert loaded.history == pytest.approx(expected, nan_ok=True)
    assert int(loaded.updates) == len(kappas) and loaded.summary()["kappa_max"] == kappas[-1]
    more = [11.0, 12.0, 13.0, 14.0, 15.0, 16.0]
    fed(loaded, more), fed(reference, more)
    assert loaded.history == pytest.approx(reference.history, nan_ok=True)
    assert torch.equal(loaded.history_buffer.isnan(), reference.history_buffer.isnan())
