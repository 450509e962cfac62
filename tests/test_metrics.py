"""Tests of orthofx.metrics against independent references built here with slow explicit loops.

The reference for everything is the dense matrix of the circular (strided, grouped) convolution,
y[m, i] = sum_c sum_p K[m, c, p] x[c, (S i + p) mod n], written entry by entry in ``dense_conv_matrix``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from orthofx import metrics
from orthofx.errors import ArgumentError, OrthofxError
from orthofx.metrics import (
    conv_singular_values,
    linear_singular_values,
    lorth,
    orthogonality_error,
    spectral_norm_bound,
)

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# ------------------------------------------------------------------------------------------- references


def dense_conv_matrix(K: np.ndarray, n: tuple[int, ...], S: tuple[int, ...], groups: int = 1) -> np.ndarray:
    """The operator matrix, rows (m, i) and columns (c, x) in C order, one entry at a time."""
    M, Cg = K.shape[:2]
    ks = K.shape[2:]
    d = len(ks)
    out_grid = tuple(ni // si for ni, si in zip(n, S))
    n_out, n_in = math.prod(out_grid), math.prod(n)
    A = np.zeros((M * n_out, Cg * groups * n_in))
    per = M // groups
    for m in range(M):
        grp = m // per
        for i in itertools.product(*[range(g) for g in out_grid]):
            row = m * n_out + int(np.ravel_multi_index(i, out_grid))
            for cl in range(Cg):
                c = grp * Cg + cl
                for p in itertools.product(*[range(k) for k in ks]):
                    x = tuple((S[j] * i[j] + p[j]) % n[j] for j in range(d))
                    col = c * n_in + int(np.ravel_multi_index(x, n))
                    A[row, col] += K[(m, cl) + p]
    return A


def singular_values_np(A: np.ndarray) -> np.ndarray:
    return np.sort(np.linalg.svd(A, compute_uv=False))[::-1]


def gram_error(A: np.ndarray, case: str) -> np.ndarray:
    G = A @ A.T if case == "RO" else A.T @ A
    return G - np.eye(G.shape[0])


@st.composite
def conv_configs(draw, dims=(1, 2), max_k=4, max_s=3, max_grid=3):
    """A random small conv: weight (float64), stride, groups, input size n (a multiple of the stride)."""
    d = draw(st.sampled_from(dims))
    groups = draw(st.integers(1, 2))
    Mg = draw(st.integers(1, 3))
    Cg = draw(st.integers(1, 3))
    square = draw(st.booleans())
    if square:
        ks = (draw(st.integers(1, max_k)),) * d
        ss = (draw(st.integers(1, max_s)),) * d
    else:
        ks = tuple(draw(st.integers(1, max_k)) for _ in range(d))
        ss = tuple(draw(st.integers(1, max_s)) for _ in range(d))
    grid = tuple(draw(st.integers(1, max_grid)) for _ in range(d))
    n = tuple(g * s for g, s in zip(grid, ss))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(Mg * groups, Cg, *ks, generator=gen, dtype=torch.float64)
    return w, ss, groups, n


def as_arg(t: tuple[int, ...]):
    """Pass tuples as ints when isotropic, to exercise both forms of the API."""
    return t[0] if len(set(t)) == 1 else t


# ------------------------------------------------------------------------------------------- the test's builder


@settings(max_examples=40, deadline=None)
@given(conv_configs())
def test_dense_builder_matches_torch_circular_conv(cfg):
    w, ss, groups, n = cfg
    ks = w.shape[2:]
    if any(k - 1 > ni for k, ni in zip(ks, n)):  # F.pad circular cannot wrap more than once
        return
    d = len(ks)
    C = w.shape[1] * groups
    x = torch.randn(1, C, *n, dtype=torch.float64)
    pad = []
    for k in reversed(ks):
        pad += [0, k - 1]
    y = CONV[d](F.pad(x, pad, mode="circular"), w, stride=ss, groups=groups)
    A = dense_conv_matrix(w.numpy(), n, ss, groups)
    np.testing.assert_allclose(A @ x.reshape(-1).numpy(), y.reshape(-1).numpy(), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------- exact spectra


@settings(max_examples=60, deadline=None)
@given(conv_configs())
def test_conv_singular_values_equal_dense_svd(cfg):
    w, ss, groups, n = cfg
    A = dense_conv_matrix(w.numpy(), n, ss, groups)
    ref = singular_values_np(A)
    sv = conv_singular_values(w, as_arg(n), stride=as_arg(ss), groups=groups)
    assert sv.dtype == torch.float64 and sv.ndim == 1
    assert sv.shape[0] == min(A.shape) == ref.shape[0]
    assert torch.all(sv[:-1] >= sv[1:])  # descending
    np.testing.assert_allclose(sv.numpy(), ref, rtol=0, atol=1e-9 * max(1.0, ref[0]))


@settings(max_examples=40, deadline=None)
@given(conv_configs(dims=(1, 2, 3), max_k=3, max_s=2, max_grid=4), st.integers(1, 40))
def test_conv_singular_values_in_chunks_equal_dense_svd(cfg, budget):
    """A tiny per-chunk budget forces the chunked direct DFT (every chunk size down to one frequency)."""
    w, ss, groups, n = cfg
    ref = singular_values_np(dense_conv_matrix(w.numpy(), n, ss, groups))
    chunks = list(metrics._frequency_matrices(w, n, ss, groups, torch.float64, max_elements=budget))
    total = sum(int(c.sum()) for _, c in chunks) // groups
    assert total == math.prod(ni // si for ni, si in zip(n, ss))  # every frequency counted once per group
    # each chunk within the budget, or no larger than the smallest chunk there is (one first-axis frequency)
    floor = max(m.numel() for m, _ in metrics._frequency_matrices(w, n, ss, groups, torch.float64, max_elements=1))
    assert all(m.numel() <= max(budget, floor) for m, _ in chunks)
    old = metrics._MAX_FREQUENCY_ELEMENTS
    metrics._MAX_FREQUENCY_ELEMENTS = budget
    try:
        sv = conv_singular_values(w, as_arg(n), stride=as_arg(ss), groups=groups)
        bound = spectral_norm_bound(w, as_arg(n), stride=as_arg(ss), groups=groups, iterations=10)
    finally:
        metrics._MAX_FREQUENCY_ELEMENTS = old
    np.testing.assert_allclose(sv.numpy(), ref, rtol=0, atol=1e-9 * max(1.0, ref[0]))
    assert ref[0] * (1 - 1e-9) <= bound <= ref[0] * 1.01 + 1e-12


def test_one_tap_conv_is_decomposed_once():
    """1 x 1 and k <= S kernels are one matrix at every frequency: one matrix per group, counted n^d / S^d times."""
    w = torch.randn(6, 2, 2, 1, dtype=torch.float64)  # k = (2, 1) <= S = (2, 1)
    chunks = list(metrics._frequency_matrices(w, (8, 5), (2, 1), 3, torch.float64))
    assert len(chunks) == 1 and chunks[0][0].shape == (3, 2, 4) and chunks[0][1].tolist() == [20, 20, 20]
    ref = singular_values_np(dense_conv_matrix(w.numpy(), (8, 5), (2, 1), 3))
    np.testing.assert_allclose(conv_singular_values(w, (8, 5), stride=(2, 1), groups=3).numpy(), ref, atol=1e-10)


def test_conv_singular_values_3d_and_folding():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(3, 2, 2, 3, 1, generator=gen, dtype=torch.float64)
    n, ss = (2, 4, 3), (1, 2, 1)  # kernel depth 3 folds onto a 2-wide output grid in dim 2
    ref = singular_values_np(dense_conv_matrix(w.numpy(), n, ss))
    sv = conv_singular_values(w, n, stride=ss)
    np.testing.assert_allclose(sv.numpy(), ref, atol=1e-10)
    # a kernel much larger than the grid wraps around several times
    w = torch.randn(2, 2, 7, generator=gen, dtype=torch.float64)
    ref = singular_values_np(dense_conv_matrix(w.numpy(), (2,), (1,)))
    np.testing.assert_allclose(conv_singular_values(w, 2).numpy(), ref, atol=1e-10)


def test_conv_singular_values_float32_and_no_grad():
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    sv32 = conv_singular_values(w, 8, stride=2, dtype=torch.float32)
    sv64 = conv_singular_values(w, 8, stride=2)
    assert sv32.dtype == torch.float32 and not sv64.requires_grad
    torch.testing.assert_close(sv32.double(), sv64, rtol=1e-4, atol=1e-4)


def test_groups_are_the_union_of_the_groups():
    gen = torch.Generator().manual_seed(0)
    g = 3
    w = torch.randn(6, 2, 3, 3, generator=gen, dtype=torch.float64)
    whole = conv_singular_values(w, 6, stride=2, groups=g)
    parts = torch.cat([conv_singular_values(w[2 * i:2 * i + 2], 6, stride=2) for i in range(g)])
    torch.testing.assert_close(whole, torch.sort(parts, descending=True).values)
    total = lorth(w, stride=2, groups=g)
    torch.testing.assert_close(total, sum(lorth(w[2 * i:2 * i + 2], stride=2) for i in range(g)))
    # depthwise (one channel per group), 1-D
    w = torch.randn(5, 1, 4, generator=gen, dtype=torch.float64)
    parts = torch.cat([conv_singular_values(w[i:i + 1], 6) for i in range(5)])
    torch.testing.assert_close(conv_singular_values(w, 6, groups=5), torch.sort(parts, descending=True).values)
    torch.testing.assert_close(lorth(w, groups=5), sum(lorth(w[i:i + 1]) for i in range(5)))


def test_linear_singular_values_and_orthogonality_error():
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    ref = np.sort(np.linalg.svd(W.numpy(), compute_uv=False))[::-1]
    np.testing.assert_allclose(linear_singular_values(W).numpy(), ref, atol=1e-12)
    assert orthogonality_error(W) == pytest.approx(np.max(np.abs(ref - 1)), abs=1e-12)
    Q = torch.linalg.qr(torch.randn(7, 5, generator=gen, dtype=torch.float64))[0]
    assert orthogonality_error(Q) < 1e-12 and orthogonality_error(Q.T) < 1e-12
    # convolution: max |sigma - 1| of the dense operator
    w = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64)
    ref = singular_values_np(dense_conv_matrix(w.numpy(), (4, 4), (2, 2)))
    assert orthogonality_error(w, 4, stride=2) == pytest.approx(np.max(np.abs(ref - 1)), abs=1e-9)


# ------------------------------------------------------------------------------------------- L_orth vs P0 theorems


@st.composite
def theorem_configs(draw, dims=(1, 2)):
    """Random conv with an output grid N such that S*N >= 2k - 1 in every dimension, and a random scale."""
    w, ss, groups, _ = draw(conv_configs(dims=dims, max_k=4, max_s=3))
    ks = w.shape[2:]
    N = tuple(-(-(2 * k - 1) // s) + draw(st.integers(0, 1)) for k, s in zip(ks, ss))
    scale = draw(st.sampled_from([0.05, 0.3, 1.0, 3.0]))
    return w * scale, ss, groups, N


@settings(max_examples=50, deadline=None)
@given(theorem_configs())
def test_theorem7_frobenius_error_equals_Nd_lorth(cfg):
    w, ss, groups, N = cfg
    M, C = w.shape[0], w.shape[1] * groups
    case = "RO" if M <= C * math.prod(ss) else "CO"
    n = tuple(Ni * si for Ni, si in zip(N, ss))
    A = dense_conv_matrix(w.numpy(), n, ss, groups)
    errF2 = float(np.sum(gram_error(A, case) ** 2))
    L = float(lorth(w, stride=as_arg(ss), groups=groups))
    assert errF2 == pytest.approx(math.prod(N) * L, rel=1e-9, abs=1e-9)


@settings(max_examples=50, deadline=None)
@given(conv_configs(dims=(1, 2, 3), max_k=4, max_s=3), st.sampled_from([None, "RO", "CO"]))
def test_lorth_fourier_route_equals_convolution_route(cfg, case):
    """Float64 without gradient takes Theorem 7's per-frequency Gram matrices; with gradient, the convolution."""
    w, ss, groups, _ = cfg
    fourier = lorth(w, stride=as_arg(ss), groups=groups, case=case)
    conv = lorth(w.clone().requires_grad_(), stride=as_arg(ss), groups=groups, case=case)
    assert conv.requires_grad and not fourier.requires_grad
    assert fourier.dtype == torch.float64 and fourier.shape == ()
    assert float(fourier) == pytest.approx(float(conv), rel=1e-10, abs=1e-10)
    with torch.no_grad():  # no gradient mode: the Fourier route for a weight that requires grad too
        assert float(lorth(w.clone().requires_grad_(), stride=as_arg(ss), groups=groups, case=case)) == \
            pytest.approx(float(conv), rel=1e-10, abs=1e-10)


def test_theorem7_in_3d():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(3, 2, 2, 3, 2, generator=gen, dtype=torch.float64)
    ss, N = (1, 2, 2), (3, 3, 2)
    A = dense_conv_matrix(w.numpy(), tuple(a * b for a, b in zip(N, ss)), ss)
    case = "RO"  # M = 3 <= C * S1 S2 S3 = 8
    assert float(np.sum(gram_error(A, case) ** 2)) == pytest.approx(math.prod(N) * float(lorth(w, ss)), rel=1e-10)


@settings(max_examples=50, deadline=None)
@given(theorem_configs())
def test_theorem8_spectral_error_bounds(cfg):
    from orthofx.theory import theorem8_constants

    w, ss, groups, N = cfg
    M, Cg = w.shape[:2]
    C = Cg * groups
    ks = tuple(w.shape[2:])
    d = len(ks)
    case = "RO" if M <= C * math.prod(ss) else "CO"
    n = tuple(Ni * si for Ni, si in zip(N, ss))
    A = dense_conv_matrix(w.numpy(), n, ss, groups)
    err_s2 = float(np.max(np.abs(np.linalg.eigvalsh(gram_error(A, case))))) ** 2
    L = float(lorth(w, stride=ss, groups=groups))
    lo, hi = theorem8_constants(C, M, ks, ss, dims=d, groups=groups)
    assert lo == pytest.approx(1 / min(M, C * math.prod(ss)))
    assert lo * L <= err_s2 * (1 + 1e-9) + 1e-12
    assert err_s2 <= hi * L * (1 + 1e-9) + 1e-12


@pytest.mark.parametrize("M, Cg, groups, stride, d", [
    (3, 5, 1, 1, 2), (7, 3, 1, 1, 2), (8, 2, 1, 2, 2), (12, 2, 1, 2, 2), (6, 4, 2, 1, 2), (10, 2, 2, 2, 1),
    (4, 4, 1, 3, 1), (9, 2, 3, 1, 1),
])
def test_lorth_of_one_tap_kernels_equals_the_convolution_route(M, Cg, groups, stride, d):
    # a 1 x 1 kernel takes a Gram-matrix shortcut; the same taps as the centre of a 3 x 3 kernel (zeros around
    # it) go through the convolution route and must give the same value and gradient, in both cases RO / CO
    gen = torch.Generator().manual_seed(M * 100 + Cg)
    w = torch.randn(M, Cg, *(1,) * d, generator=gen, dtype=torch.float64, requires_grad=True)
    padded = F.pad(w, (1, 1) * d)
    assert padded.shape[2:] == (3,) * d
    for case in (None, "RO", "CO"):
        one_tap = lorth(w, stride=stride, groups=groups, case=case)
        by_conv = lorth(padded, stride=stride, groups=groups, case=case)
        torch.testing.assert_close(one_tap, by_conv, rtol=1e-12, atol=1e-12)
        grad_one, = torch.autograd.grad(one_tap, w)
        grad_conv, = torch.autograd.grad(by_conv, w)
        torch.testing.assert_close(grad_one, grad_conv, rtol=1e-12, atol=1e-12)


def test_lorth_matches_dense_frobenius_in_square_case_both_ways():
    """At M = C S^d the RO and CO formulas agree (the subtracted term is zero)."""
    w = torch.randn(8, 2, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(lorth(w, 2, case="RO"), lorth(w, 2, case="CO"))


# ------------------------------------------------------------------------------------------- known orthogonal kernels


def _paraunitary_taps(C: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Taps of a k = 3 orthogonal 1-D conv: the product of two (I - P + P z) factors, P orthogonal projectors."""
    def projector():
        V = torch.linalg.qr(torch.randn(C, C, generator=gen, dtype=torch.float64))[0][:, : max(1, C // 2)]
        return V @ V.T

    P1, P2 = projector(), projector()
    I = torch.eye(C, dtype=torch.float64)
    return [(I - P1) @ (I - P2), (I - P1) @ P2 + P1 @ (I - P2), P1 @ P2]


def test_lorth_zero_for_orthogonal_convolutions():
    gen = torch.Generator().manual_seed(7)
    # 1x1 convs with orthonormal rows (RO) / columns (CO)
    for M, C in [(3, 5), (5, 3), (4, 4)]:
        Q = torch.linalg.qr(torch.randn(max(M, C), min(M, C), generator=gen, dtype=torch.float64))[0]
        W = Q if M >= C else Q.T
        assert float(lorth(W.reshape(M, C, 1, 1))) == pytest.approx(0, abs=1e-10)
        assert orthogonality_error(W.reshape(M, C, 1, 1), 5) < 1e-10
    # a permutation of channels with a different spatial shift per channel (k = 3, 2-D)
    K = torch.zeros(3, 3, 3, 3, dtype=torch.float64)
    for m, (c, p, q) in enumerate([(2, 0, 2), (0, 1, 1), (1, 2, 0)]):
        K[m, c, p, q] = 1.0
    assert float(lorth(K.clone().requires_grad_())) == 0.0  # the convolution route: exact
    assert float(lorth(K)) < 1e-30  # float64 without gradient, the Fourier route: the DFT's cos / sin rounded
    assert orthogonality_error(K, 6) < 1e-12
    # a non-trivial 3x3 orthogonal kernel: vertical then horizontal paraunitary convs
    A, B = _paraunitary_taps(4, gen), _paraunitary_taps(4, gen)
    K = torch.stack([torch.stack([A[p] @ B[q] for q in range(3)], -1) for p in range(3)], -2)
    assert K.shape == (4, 4, 3, 3) and (K[:, :, 0, 0].abs().max() > 1e-3)  # spatially spread
    assert float(lorth(K)) == pytest.approx(0, abs=1e-10)
    assert orthogonality_error(K, (5, 6)) < 1e-10
    # strided: space-to-depth with an orthogonal mixing (k = S = 2): RO, square and CO shapes
    for M, C in [(6, 2), (8, 2), (12, 2)]:
        Q = torch.linalg.qr(torch.randn(max(M, 4 * C), min(M, 4 * C), generator=gen, dtype=torch.float64))[0]
        W = (Q if M >= 4 * C else Q.T).reshape(M, C, 2, 2)
        assert float(lorth(W, stride=2)) == pytest.approx(0, abs=1e-10)
        assert orthogonality_error(W, 6, stride=2) < 1e-10


def test_lorth_positive_for_random_kernels():
    gen = torch.Generator().manual_seed(11)
    for shape, S in [((4, 4, 3, 3), 1), ((8, 2, 3, 3), 2), ((16, 2, 3), 1), ((3, 2, 5, 1), (2, 1))]:
        w = torch.randn(*shape, generator=gen, dtype=torch.float64) / math.sqrt(math.prod(shape[1:]))
        assert float(lorth(w, S)) > 1e-2


def test_ocnn_padding_bug_is_not_reproduced():
    """x[i] + x[i+2] (normalised): orthogonal at shifts 0 and 1, not at shift 2. OCNN's padding-1 formula
    sees nothing; L_orth with P = 2 sees the two shift-2 correlations (1/2 each)."""
    K = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    K[0, 0, 1, 0] = K[0, 0, 1, 2] = 1 / math.sqrt(2)
    ocnn = F.conv2d(K, K, padding=1)
    target = torch.zeros_like(ocnn)
    target[0, 0, 1, 1] = 1
    assert float((ocnn - target).square().sum()) == pytest.approx(0, abs=1e-15)  # the bug: looks orthogonal
    assert float(lorth(K)) == pytest.approx(0.5, abs=1e-12)
    assert orthogonality_error(K, 8) > 0.25  # and it is not: sigma ranges over |a + b w^2|
    # 1-D, with more channels: mixing at tap 0 and tap 2 of a 3-tap kernel
    gen = torch.Generator().manual_seed(2)
    Q = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))[0]
    K = torch.zeros(4, 4, 3, dtype=torch.float64)
    K[:, :, 0] = Q / math.sqrt(2)
    K[:, :, 2] = Q / math.sqrt(2)
    ocnn = F.conv1d(K, K, padding=1)
    t = torch.zeros_like(ocnn)
    t[:, :, 1] = torch.eye(4, dtype=torch.float64)
    assert float((ocnn - t).square().sum()) == pytest.approx(0, abs=1e-12)
    assert float(lorth(K)) == pytest.approx(2 * 4 * 0.25, abs=1e-12)


# ------------------------------------------------------------------------------------------- linear layers


def test_linear_lorth_direct_formula():
    gen = torch.Generator().manual_seed(4)
    for out_f, in_f in [(3, 5), (5, 3), (4, 4)]:
        W = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64)
        if out_f <= in_f:
            ref = torch.sum((W @ W.T - torch.eye(out_f, dtype=torch.float64)) ** 2)
        else:
            ref = torch.sum((W.T @ W - torch.eye(in_f, dtype=torch.float64)) ** 2)
        torch.testing.assert_close(lorth(W), ref)
        torch.testing.assert_close(lorth(W), lorth(W[:, :, None, None]))  # a 1x1 conv at stride 1
        torch.testing.assert_close(lorth(W), lorth(W[:, :, None]))


# ------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("fast", [True, False])
def test_lorth_gradcheck(fast):
    gen = torch.Generator().manual_seed(9)
    cases = [((3, 2, 3, 3), 1, 1), ((5, 1, 3, 2), 2, 1), ((4, 2, 3), 2, 2), ((6, 2, 2, 2), (1, 2), 3)]
    for shape, S, g in cases:
        w = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x: lorth(x, S, g, fast_backward=fast), (w,))
    W = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: lorth(x, fast_backward=fast), (W,))


def test_lorth_gradgradcheck_exact_mode():
    w = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: lorth(x, 2, fast_backward=False), (w,))


def test_lorth_fast_backward_same_value_and_gradient():
    w = torch.randn(16, 8, 3, 3, requires_grad=True)
    a = lorth(w, 2)
    (ga,) = torch.autograd.grad(a, w)
    b = lorth(w, 2, fast_backward=False)
    (gb,) = torch.autograd.grad(b, w)
    assert float(a.detach()) == float(b.detach())
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-4)
    assert lorth(w.detach()).requires_grad is False


# ------------------------------------------------------------------------------------------- Gram iteration


@settings(max_examples=30, deadline=None)
@given(conv_configs(max_grid=4))
def test_gram_iteration_bound(cfg):
    w, ss, groups, n = cfg
    s1 = float(conv_singular_values(w, n, stride=ss, groups=groups)[0])
    b = spectral_norm_bound(w, n, stride=ss, groups=groups)
    assert b >= s1 * (1 - 1e-12)
    # per matrix: bound <= rank^(1/64) sigma_1, and the rank is at most 3 * 3 * 9 here
    assert b <= 1.1 * s1 + 1e-12
    rank = min(w.shape[0] // groups, w.shape[1] * math.prod(ss))
    assert b <= rank ** (1 / 64) * s1 * (1 + 1e-9) + 1e-12
    assert spectral_norm_bound(w, n, stride=ss, groups=groups, iterations=8) <= b * (1 + 1e-12)


def test_gram_iteration_linear_and_realistic_conv():
    gen = torch.Generator().manual_seed(12)
    W = torch.randn(64, 40, generator=gen, dtype=torch.float64)
    s1 = float(torch.linalg.matrix_norm(W, 2))
    b = spectral_norm_bound(W)
    assert s1 <= b <= 1.03 * s1
    assert spectral_norm_bound(W, iterations=0) == pytest.approx(float(torch.linalg.matrix_norm(W)))
    w = torch.randn(16, 16, 3, 3, generator=gen)
    s1 = float(conv_singular_values(w, 16)[0])
    b = spectral_norm_bound(w, 16)
    assert s1 <= b <= 1.03 * s1
    assert spectral_norm_bound(torch.zeros(3, 3, 3, 3), 4) == 0.0
    huge = torch.randn(8, 8, 3, 3, generator=gen, dtype=torch.float64) * 1e200  # rescaling avoids overflow
    s1 = float(conv_singular_values(huge, 6)[0])
    assert s1 * (1 - 1e-12) <= spectral_norm_bound(huge, 6) <= 1.05 * s1  # up to float64 rounding


# ------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_value_errors():
    with pytest.raises(ArgumentError, match="3 \\(Conv1d\\), 4 \\(Conv2d\\)"):
        conv_singular_values(torch.randn(3, 3), 4)
    with pytest.raises(ArgumentError, match="Conv1d"):
        lorth(torch.randn(3))
    with pytest.raises(ArgumentError, match="Conv1d"):
        lorth(torch.randn(2, 2, 2, 2, 2, 2))
    with pytest.raises(ArgumentError, match="divisible by the stride"):
        conv_singular_values(torch.randn(2, 2, 3, 3), 7, stride=2)
    with pytest.raises(ArgumentError, match="divisible by the stride"):
        orthogonality_error(torch.randn(2, 2, 3, 3), (8, 9), stride=2)
    with pytest.raises(ArgumentError, match="input_size"):
        orthogonality_error(torch.randn(2, 2, 3, 3))
    with pytest.raises(ArgumentError, match="input_size"):
        spectral_norm_bound(torch.randn(2, 2, 3, 3))
    with pytest.raises(ArgumentError, match="groups=4 must divide"):
        lorth(torch.randn(6, 1, 3, 3), groups=4)
    with pytest.raises(ArgumentError, match="stride"):
        lorth(torch.randn(6, 1, 3, 3), stride=(1, 2, 3))
    with pytest.raises(ArgumentError, match="stride"):
        lorth(torch.randn(6, 1, 3, 3), stride=0)
    with pytest.raises(ArgumentError, match="case"):
        lorth(torch.randn(6, 1, 3, 3), case="row")
    with pytest.raises(ArgumentError, match="floating-point"):
        lorth(torch.ones(2, 2, 3, 3, dtype=torch.int64))
    with pytest.raises(ArgumentError, match="2-D"):
        linear_singular_values(torch.randn(2, 2, 3))
    with pytest.raises(ArgumentError, match="Linear"):
        lorth(torch.randn(3, 4), stride=2)
    for fn in (lorth, linear_singular_values, orthogonality_error, spectral_norm_bound):
        with pytest.raises(OrthofxError, match="empty"):
            fn(torch.randn(0, 3))
    with pytest.raises(OrthofxError, match="iterations=64"):
        spectral_norm_bound(torch.randn(4, 4), iterations=64)
    with pytest.raises(OrthofxError, match="torch.dtype"):
        conv_singular_values(torch.randn(2, 2, 3), 4, dtype="float64")
    with pytest.raises(OrthofxError, match="integer"):
        metrics.isometry_moments(torch.ones(3), n=2.7)
    with pytest.raises(OrthofxError, match="torch.dtype"):
        metrics.jacobian_singular_values(torch.nn.Linear(2, 2), torch.randn(3, 2), dtype="x")


def test_gram_iterations_up_to_the_limit_stay_an_upper_bound():
    for seed in range(5):
        w = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        top = float(torch.linalg.matrix_norm(w, ord=2))
        # converged to sigma_max: an upper bound up to float64 rounding (it came out 1 ulp below the SVD's value)
        assert top * (1 - 1e-14) <= spectral_norm_bound(w, iterations=60) <= top * (1 + 1e-12)


def test_public_names():
    assert set(metrics.__all__) >= {"lorth", "conv_singular_values", "linear_singular_values",
                                    "orthogonality_error", "spectral_norm_bound"}


def test_half_precision_compute_dtype_and_meta_weights_raise_clear_errors():
    w = torch.randn(2, 2, 3, 3)
    for dt in (torch.float16, torch.bfloat16):  # LAPACK has no half-precision SVD
        with pytest.raises(OrthofxError, match="float32 or float64"):
            conv_singular_values(w, 4, dtype=dt)
        with pytest.raises(OrthofxError, match="float32 or float64"):
            linear_singular_values(w[:, :, 0, 0], dtype=dt)
    # half-precision *weights* are fine: computed in float64
    torch.testing.assert_close(conv_singular_values(w.half(), 4), conv_singular_values(w.half().double(), 4))
    meta = w.to("meta")
    for call in (lambda: conv_singular_values(meta, 4), lambda: linear_singular_values(meta[:, :, 0, 0]),
                 lambda: spectral_norm_bound(meta, 4), lambda: orthogonality_error(meta, 4)):
        with pytest.raises(OrthofxError, match="meta"):
            call()
    assert lorth(meta).device.type == "meta"  # shape inference through the regulariser still works


def test_jacobian_singular_values_of_half_precision_and_meta_inputs():
    lin = torch.nn.Linear(4, 3, bias=False).to(torch.bfloat16)
    x = torch.randn(2, 4).to(torch.bfloat16)
    # the Jacobian of x -> x W^T (batch of 2) is block-diagonal with two copies of W
    ref = torch.linalg.svdvals(lin.weight.detach().double())
    sv = metrics.jacobian_singular_values(lin, x)
    assert sv.dtype == torch.float32 and sv.shape == (6,)
    # float32 singular values (of the float32 Jacobian of bf16 entries) against float64 ones: float32's tolerance
    torch.testing.assert_close(sv.double(), torch.cat([ref, ref]).sort(descending=True).values, rtol=1e-5, atol=1e-6)
    per = metrics.jacobian_singular_values(lin, x, per_sample=True)
    torch.testing.assert_close(per.double(), torch.stack([ref, ref]), rtol=1e-5, atol=1e-6)
    with pytest.raises(OrthofxError, match="meta"):
        metrics.jacobian_singular_values(torch.nn.Linear(4, 3).to("meta"), torch.randn(2, 4, device="meta"))
