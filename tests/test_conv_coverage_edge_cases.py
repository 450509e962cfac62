"""Edge cases of the conv coverage (Conv1d/2d/3d, strides, groups, dilation, transposed convs) against independent
dense float64 references built here by explicit index loops (not by the library's own code paths)."""

import itertools
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthofx
from orthofx import metrics
from orthofx.errors import ArgumentError
from orthofx.passes.orth_regularizer import lorth_term
from references import lorth64

pytestmark = pytest.mark.usefixtures("one_thread")

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


# ------------------------------------------------------------------------------------------------ references


def dense_conv(w, n, stride, groups=1, dilation=1):
    """Matrix (float64) of the circular conv ``y[m, i] = sum_{c,p} K[m, c, p] x[c, (S i + D p) mod n]`` on the grid
    ``n``, built tap by tap with explicit index arithmetic; the output grid is ``ceil(n / S)``."""
    w = np.asarray(w.detach().double().numpy() if isinstance(w, torch.Tensor) else w, dtype=np.float64)
    d = w.ndim - 2
    n = (n,) * d if isinstance(n, int) else tuple(n)
    S = (stride,) * d if isinstance(stride, int) else tuple(stride)
    D = (dilation,) * d if isinstance(dilation, int) else tuple(dilation)
    M, Cg = w.shape[:2]
    C = Cg * groups
    out = tuple(-(-ni // si) for ni, si in zip(n, S))
    A = np.zeros((M * math.prod(out), C * math.prod(n)))
    outs = list(itertools.product(*[range(o) for o in out]))
    for m in range(M):
        grp = m // (M // groups)
        for c in range(Cg):
            cin = grp * Cg + c
            for p in itertools.product(*[range(k) for k in w.shape[2:]]):
                for i in outs:
                    src = tuple((S[a] * i[a] + D[a] * p[a]) % n[a] for a in range(d))
                    row = m * math.prod(out) + int(np.ravel_multi_index(i, out))
                    col = cin * math.prod(n) + int(np.ravel_multi_index(src, n))
                    A[row, col] += w[(m, c) + p]
    return A


def definition1_lorth(w, stride, groups=1, case=None):
    """P0 Definition 1 by explicit loops: conv(K, K, P, S)[m1, m2, j] = sum_{c,p} K[m2, c, p] K[m1, c, S j + p - P],
    per group, minus I_r0; minus (M - C S^d) in the CO case."""
    w = w.detach().double().numpy()
    d = w.ndim - 2
    S = (stride,) * d if isinstance(stride, int) else tuple(stride)
    M, Cg = w.shape[:2]
    ks = w.shape[2:]
    P = [((k - 1) // s) * s for k, s in zip(ks, S)]
    J = [2 * p // s + 1 for p, s in zip(P, S)]
    m = M // groups
    total = 0.0
    for g in range(groups):
        K = w[g * m:(g + 1) * m]
        for j in itertools.product(*[range(x) for x in J]):
            for m1 in range(m):
                for m2 in range(m):
                    v = 0.0
                    for p in itertools.product(*[range(k) for k in ks]):
                        q = tuple(S[a] * j[a] + p[a] - P[a] for a in range(d))
                        if all(0 <= q[a] < ks[a] for a in range(d)):
                            v += float(K[(m2, slice(None)) + p] @ K[(m1, slice(None)) + q])
                    centre = all(j[a] == P[a] // S[a] for a in range(d))
                    total += (v - (1.0 if centre and m1 == m2 else 0.0)) ** 2
    if case is None:
        case = "RO" if M <= Cg * groups * math.prod(S) else "CO"
    if case == "CO":
        total -= M - Cg * groups * math.prod(S)
    return total


def dilate_np(w, dilation):
    d = w.ndim - 2
    D = (dilation,) * d if isinstance(dilation, int) else tuple(dilation)
    size = [(k - 1) * Di + 1 for k, Di in zip(w.shape[2:], D)]
    out = torch.zeros(*w.shape[:2], *size, dtype=w.dtype)
    for p in itertools.product(*[range(k) for k in w.shape[2:]]):
        out[(slice(None), slice(None)) + tuple(pi * Di for pi, Di in zip(p, D))] = w[(slice(None), slice(None)) + p]
    return out


def svals(A):
    return np.sort(np.linalg.svd(A, compute_uv=False))[::-1]


def frob_err(A, rows):
    G = A @ A.T if rows else A.T @ A
    return float(np.square(G - np.eye(G.shape[0])).sum())


# ------------------------------------------------------------------------------------ the references themselves


def test_dense_reference_matches_torch_conv_with_circular_padding():
    gen = torch.Generator().manual_seed(0)
    for shape, n, S, g, D in [((4, 3, 3), (7,), (2,), 1, (2,)), ((4, 1, 2, 3), (6, 5), (3, 1), 2, (1, 2)),
                              ((2, 2, 2, 1, 3), (3, 4, 5), (1, 2, 1), 1, (1, 1, 2))]:
        w = torch.randn(*shape, generator=gen, dtype=torch.float64)
        d = len(n)
        x = torch.randn(1, shape[1] * g, *n, generator=gen, dtype=torch.float64)
        pad = []
        for k, Di in reversed(list(zip(shape[2:], D))):
            pad += [0, Di * (k - 1)]
        y = CONV[d](F.pad(x, pad, mode="circular"), w, stride=S, groups=g, dilation=D)
        A = dense_conv(w, n, S, g, D)
        np.testing.assert_allclose(A @ x.reshape(-1).numpy(), y.reshape(-1).numpy(), atol=1e-12)


def test_transposed_conv_is_the_adjoint_of_the_dense_conv():
    """torch's ConvTranspose (no padding; overflow beyond n S wrapped) equals the transpose of the loop-built conv."""
    gen = torch.Generator().manual_seed(1)
    for shape, N, S, g, D, op in [((6, 2, 3), (5,), (2,), 1, (1,), (1,)), ((4, 3, 3, 2), (3, 2), (2, 3), 2, (2, 1),
                                                                            (1, 2)),
                                  ((2, 3, 2, 1, 2), (2, 3, 2), (1, 2, 2), 1, (1, 1, 2), (0, 1, 0))]:
        w = torch.randn(*shape, generator=gen, dtype=torch.float64)
        d = len(N)
        x = torch.randn(1, shape[0], *N, generator=gen, dtype=torch.float64)
        full = CONV_T[d](x, w, stride=S, groups=g, dilation=D, output_padding=op)
        out = tuple(n * s for n, s in zip(N, S))
        folded = torch.zeros(1, shape[1] * g, *out, dtype=torch.float64)
        for idx in itertools.product(*[range(s) for s in full.shape[2:]]):
            tgt = tuple(i % o for i, o in zip(idx, out))
            folded[(0, slice(None)) + tgt] += full[(0, slice(None)) + idx]
        A = dense_conv(w, out, S, g, D)  # conv: in = out grid (n S), out = N
        np.testing.assert_allclose(A.T @ x.reshape(-1).numpy(), folded.reshape(-1).numpy(), atol=1e-12)


# ---------------------------------------------------------------------------------------------- exact spectra

SPECTRUM_CASES = [
    # (weight shape, grid n, stride S, groups, dilation)
    ((3, 2, 3), (7,), (1,), 1, (1,)),  # odd grid: rfft counts 1, 2, 2, 2
    ((3, 2, 3), (8,), (1,), 1, (1,)),  # even grid: the Nyquist frequency counted once
    ((5, 2, 4), (9,), (3,), 1, (1,)),  # k > S, S not a power of 2, odd output grid
    ((4, 2, 2), (8,), (2,), 2, (1,)),  # k = S: one tap after space-to-depth
    ((4, 3, 1), (6,), (3,), 1, (1,)),  # k < S (1 x 1 strided)
    ((2, 2, 2), (6,), (3,), 1, (1,)),  # k < S, not 1
    ((6, 2, 3), (10,), (2,), 3, (2,)),  # dilation with stride, groups
    ((4, 3, 2, 3), (6, 5), (2, 1), 1, (1, 1)),  # rectangular kernel, per-dimension stride, odd last axis
    ((4, 3, 3, 2), (5, 6), (1, 2), 1, (1, 1)),  # even last axis, strided
    ((6, 1, 3, 3), (4, 4), (1, 1), 6, (1, 1)),  # depthwise
    ((8, 2, 1, 3), (4, 6), (2, 3), 2, (1, 2)),  # k = 1 < S on one axis, dilated on the other
    ((4, 2, 5, 3), (3, 4), (1, 1), 2, (1, 1)),  # kernel larger than the grid (taps wrap)
    ((3, 2, 2, 3, 2), (4, 3, 4), (2, 1, 2), 1, (1, 1, 1)),  # Conv3d, mixed strides
    ((4, 2, 3, 1, 2), (3, 4, 5), (1, 2, 1), 2, (1, 1, 2)),  # Conv3d, groups, dilation, odd last axis
    ((2, 2, 1, 1, 1), (2, 4, 6), (2, 2, 3), 1, (1, 1, 1)),  # Conv3d one-tap strided (k < S)
]


@pytest.mark.parametrize("shape,n,S,g,D", SPECTRUM_CASES)
def test_conv_singular_values_equal_the_dense_operators(shape, n, S, g, D):
    gen = torch.Generator().manual_seed(sum(shape) + sum(n))
    w = torch.randn(*shape, generator=gen, dtype=torch.float64)
    ref = svals(dense_conv(w, n, S, g, D))
    kernel = metrics.dilated_kernel(w, D)
    sv = metrics.conv_singular_values(kernel, n, stride=S, groups=g)
    assert sv.shape == ref.shape
    np.testing.assert_allclose(sv.numpy(), ref, atol=1e-10 * ref[0])
    bound = metrics.spectral_norm_bound(kernel, n, stride=S, groups=g, iterations=12)
    assert ref[0] * (1 - 1e-12) <= bound <= ref[0] * (1 + 1e-6)
    # chunking: a tiny budget splits every configuration into many chunks (down to one frequency each)
    old = metrics._MAX_FREQUENCY_ELEMENTS
    try:
        for budget in (1, 7, 50):
            metrics._MAX_FREQUENCY_ELEMENTS = budget
            chunked = metrics.conv_singular_values(kernel, n, stride=S, groups=g)
            np.testing.assert_allclose(chunked.numpy(), sv.numpy(), atol=1e-12 * ref[0])
            assert metrics.spectral_norm_bound(kernel, n, stride=S, groups=g, iterations=12) == pytest.approx(
                bound, rel=1e-12)
    finally:
        metrics._MAX_FREQUENCY_ELEMENTS = old
    chunks = list(metrics._frequency_matrices(kernel, n, S, g, torch.float64, max_elements=1))
    assert sum(int(c.sum()) for _, c in chunks) == g * math.prod(ni // si for ni, si in zip(n, S))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compute", [torch.float32, torch.float64])
def test_conv_singular_values_of_low_precision_weights(dtype, compute):
    """The weight's values (whatever its dtype) are decomposed exactly in ``compute``; the input is not changed."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(4, 3, 3, 2, generator=gen).to(dtype)
    copy = w.clone()
    ref = svals(dense_conv(w.double(), (6, 4), (2, 2)))
    for budget in (None, 3):
        old = metrics._MAX_FREQUENCY_ELEMENTS
        if budget:
            metrics._MAX_FREQUENCY_ELEMENTS = budget
        try:
            sv = metrics.conv_singular_values(w, (6, 4), stride=(2, 2), dtype=compute)
        finally:
            metrics._MAX_FREQUENCY_ELEMENTS = old
        assert sv.dtype == compute
        np.testing.assert_allclose(sv.double().numpy(), ref, atol=(1e-5 if compute == torch.float32 else 1e-12)
                                   * ref[0])
    assert torch.equal(w, copy) and w.dtype == dtype
    assert metrics.spectral_norm_bound(w, (6, 4), stride=2, iterations=12) == pytest.approx(ref[0], rel=1e-6)


def test_grid_not_divisible_by_the_stride_is_an_argument_error():
    w = torch.randn(2, 2, 3, 3)
    with pytest.raises(ArgumentError, match="divisible by the stride"):
        metrics.conv_singular_values(w, (7, 8), stride=2)
    with pytest.raises(ArgumentError, match="divisible by the stride"):
        metrics.spectral_norm_bound(w, (8, 9), stride=(1, 2))


# ------------------------------------------------------------------------------------------------------ L_orth

LORTH_CASES = [
    # (weight shape, stride, groups, dilation)
    ((3, 2, 3), (1,), 1, (1,)),
    ((5, 2, 4), (2,), 1, (1,)),  # even kernel, stride 2, CO (5 > 4)
    ((3, 2, 5), (3,), 1, (2,)),  # dilation with stride 3
    ((6, 2, 3, 2), (2, 1), 3, (1, 1)),  # groups, rectangular
    ((4, 2, 3, 3), (2, 2), 2, (2, 1)),  # dilation on one strided axis
    ((3, 1, 3, 2), (1, 1), 1, (2, 3)),  # dilation at stride 1 changes nothing
    ((2, 4, 2, 3), (3, 2), 1, (1, 1)),  # k < S on one axis
    ((4, 2, 1, 1), (2, 2), 1, (1, 1)),  # one tap, strided
    ((3, 2, 2, 3, 2), (1, 2, 2), 1, (1, 1, 2)),  # Conv3d
    ((4, 1, 3, 1, 2), (2, 1, 1), 2, (1, 1, 1)),  # Conv3d grouped
]


def dense_lorth(w, S, g, D, case):
    """N^-d ||A A^T - I||^2 (RO) / ||A^T A - I||^2 (CO) of the dense operator of the dilated kernel on the smallest
    N grid with S N >= 2 k_eff - 1 (P0 Theorem 7)."""
    eff = [Di * (k - 1) + 1 for k, Di in zip(w.shape[2:], D)]
    N = [math.ceil((2 * e - 1) / s) for e, s in zip(eff, S)]
    A = dense_conv(w, tuple(n * s for n, s in zip(N, S)), S, g, D)
    return frob_err(A, case == "RO") / math.prod(N)


@pytest.mark.parametrize("shape,S,g,D", LORTH_CASES)
def test_lorth_equals_definition_1_and_theorem_7(shape, S, g, D):
    gen = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(*shape, generator=gen, dtype=torch.float64) / math.sqrt(math.prod(shape[1:]))
    M, C = shape[0], shape[1] * g
    auto = "RO" if M <= C * math.prod(S) else "CO"
    for case in (None, "RO", "CO"):
        ref = definition1_lorth(dilate_np(w, D), S, g, case)
        assert ref == pytest.approx(dense_lorth(w, S, g, D, case or auto), rel=1e-10, abs=1e-10)
        fourier = metrics.lorth(w, stride=S, groups=g, case=case, dilation=D)  # float64 without grad
        assert float(fourier) == pytest.approx(ref, rel=1e-10, abs=1e-10)
        old = metrics._MAX_FREQUENCY_ELEMENTS
        metrics._MAX_FREQUENCY_ELEMENTS = 5  # the Fourier route in many chunks
        try:
            chunked = metrics.lorth(w, stride=S, groups=g, case=case, dilation=D)
        finally:
            metrics._MAX_FREQUENCY_ELEMENTS = old
        assert float(chunked) == pytest.approx(ref, rel=1e-10, abs=1e-10)
        wg = w.clone().requires_grad_()
        for fast in (True, False):
            conv = metrics.lorth(wg, stride=S, groups=g, case=case, dilation=D, fast_backward=fast)
            assert float(conv.detach()) == pytest.approx(ref, rel=1e-10, abs=1e-10)
        f32 = metrics.lorth(w.float(), stride=S, groups=g, case=case, dilation=D)
        assert float(f32) == pytest.approx(ref, rel=1e-4, abs=1e-4)
    # the public dilated kernel is the undilated operator's kernel
    assert torch.equal(metrics.dilated_kernel(w, D), dilate_np(w, D))


def test_lorth_gradient_with_dilation_and_groups_matches_finite_differences():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(4, 2, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    for S, D in (((2, 1), (2, 3)), ((3, 2), (1, 2))):
        assert torch.autograd.gradcheck(lambda x: metrics.lorth(x, stride=S, groups=2, dilation=D), (w,))


def test_dilated_kernel_rejects_bad_dilation_and_keeps_the_input():
    w = torch.randn(2, 2, 3)
    copy = w.clone()
    out = metrics.dilated_kernel(w, 2)
    assert out.shape == (2, 2, 5) and torch.equal(w, copy)
    assert metrics.dilated_kernel(w, 1) is w or torch.equal(metrics.dilated_kernel(w, 1), w)
    # each message names the argument and quotes the bad value (a tuple of the wrong length: the expected length)
    for bad, why in ((0, ">= 1"), (-1, ">= 1"), ((1, 2), "an int or a tuple of 1 ints for a 1-D convolution"),
                     (1.5, "a positive integer"), (True, "a positive integer")):
        with pytest.raises(ArgumentError, match=rf"dilation must be {why}, got {re.escape(repr(bad))}$"):
            metrics.dilated_kernel(w, bad)
    with pytest.raises(ArgumentError, match=r"dilation must be >= 1, got 0$"):
        metrics.lorth(w, dilation=0)


# ----------------------------------------------------------------------------------------- transposed convs

TRANSPOSED = [
    # (dims, in, out, kernel, stride, groups, dilation, output_padding, input grid N)
    (1, 6, 2, 3, 2, 1, 1, 1, (5,)),  # in != out, RO as a transposed layer (2 * 2 outputs per 6 inputs)
    (1, 2, 6, 3, 2, 2, 1, 0, (3,)),  # CO, groups
    (2, 4, 6, (3, 2), (2, 3), 2, (1, 2), (1, 1), (3, 5)),  # rectangular, groups, dilation, output padding
    (2, 3, 1, 2, 2, 1, 2, 1, (5, 4)),  # dilated strided
    (3, 2, 3, (2, 1, 3), (1, 2, 1), 1, (1, 1, 2), (0, 1, 1), (3, 3, 3)),  # ConvTranspose3d
]


def transposed_layer(dims, cin, cout, k, S, g, D, op):
    cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
    return cls(cin, cout, k, stride=S, groups=g, dilation=D, output_padding=op, bias=False).double()


def as_tuple(v, d):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * d


@pytest.mark.parametrize("dims,cin,cout,k,S,g,D,op,N", TRANSPOSED)
def test_transposed_lorth_terms_are_the_layers_own_orthogonality_error(dims, cin, cout, k, S, g, D, op, N):
    """The term of a ConvTranspose layer is N^-d ||T T^T - I||^2 (its RO case) or N^-d ||T^T T - I||^2 (CO), T the
    transposed layer's own operator (the adjoint of the loop-built conv), on the smallest N grid of Theorem 7."""
    torch.manual_seed(sum(as_tuple(k, dims)) + cin)
    layer = transposed_layer(dims, cin, cout, k, S, g, D, op)
    S, D = as_tuple(S, dims), as_tuple(D, dims)
    eff = [Di * (ki - 1) + 1 for ki, Di in zip(layer.kernel_size, D)]
    grid = [math.ceil((2 * e - 1) / s) for e, s in zip(eff, S)]
    T = dense_conv(layer.weight, tuple(n * s for n, s in zip(grid, S)), S, g, D).T
    root = nn.Sequential(layer)
    for case in (None, "RO", "CO"):
        rows = {"RO": True, "CO": False, None: T.shape[0] <= T.shape[1]}[case]
        ref = frob_err(T, rows) / math.prod(grid)
        term = lorth_term(layer, "0", "r", 1.0, case=case)
        assert float(term.value(root).detach()) == pytest.approx(ref, rel=1e-9, abs=1e-10), case
        with torch.enable_grad():
            w = layer.weight.detach().clone().requires_grad_()
            value = metrics.lorth(w, stride=term.stride, groups=term.groups, case=term.case, dilation=term.dilation)
        assert float(value.detach()) == pytest.approx(ref, rel=1e-9, abs=1e-10), case


@pytest.mark.parametrize("dims,cin,cout,k,S,g,D,op,N", TRANSPOSED)
def test_report_rows_of_transposed_convs_use_the_grid_input_times_stride(dims, cin, cout, k, S, g, D, op, N):
    """The report's sigmas of a ConvTranspose layer are those of its operator on the input grid N (output N S),
    also when N is not a multiple of the stride (nothing to round: the transposed layer's input is the adjoint
    conv's output grid)."""
    torch.manual_seed(cin + cout)
    layer = transposed_layer(dims, cin, cout, k, S, g, D, op)
    x = torch.randn(1, cin, *N, dtype=torch.float64)
    policy = {"rules": [{"match": {"type": f"ConvTranspose{dims}d"}, "apply": "orth_regularizer"}]}
    gm = orthofx.transform(nn.Sequential(layer), policy, example_inputs=(x,))
    (row,) = orthofx.report(gm).rows
    S, D = as_tuple(S, dims), as_tuple(D, dims)
    T = dense_conv(layer.weight, tuple(n * s for n, s in zip(N, S)), S, g, D).T
    ref = svals(T)
    assert row["input"] == N
    assert row["sigma_max"] == pytest.approx(ref[0], rel=1e-9)
    assert row["sigma_min"] == pytest.approx(ref[-1], rel=1e-9, abs=1e-9)
    values = orthofx.report(gm).spectra["0"]
    np.testing.assert_allclose(np.sort(values.numpy())[::-1], ref, atol=1e-9 * ref[0])


# --------------------------------------------------------------------------- Conv3d: isometric init, riemannian


def dense_jacobian(layer, size):
    x = torch.randn(1, layer.in_channels, *size, dtype=torch.float64)
    j = torch.autograd.functional.jacobian(layer, x)
    return j.reshape(-1, x.numel())


def all_singular_values_equal(j, scale, tol=1e-9):
    """All min(m, n) singular values of j equal scale: j j^T = scale^2 I (wide) or j^T j = scale^2 I (tall)."""
    G = j @ j.T if j.shape[0] <= j.shape[1] else j.T @ j
    return bool((G - scale ** 2 * torch.eye(G.shape[0], dtype=G.dtype)).abs().max() < tol)


def test_isometric_init_of_conv3d_is_exact_wherever_the_change_says_so():
    """Per-dimension mixes of kernel, stride, padding and dilation, groups and padding modes: every Conv3d the
    Change marks exact has a dense Jacobian with all singular values equal to the scale (on an input grid divisible
    by the stride), under zero and circular padding."""
    rng = np.random.default_rng(0)
    claimed = unclaimed = 0
    for trial in range(60):
        ks = tuple(int(v) for v in rng.integers(1, 5, 3))
        ss = tuple(int(v) for v in rng.integers(1, 3, 3))
        ds = tuple(int(v) for v in rng.choice([1, 1, 2], 3))
        pads = []
        for k, s, d in zip(ks, ss, ds):
            low, high = -(-(d * (k - 1) + 1 - s) // 2), d * (k - 1) // 2  # the output size n / S
            keep = max(low, 0) <= high and rng.random() < 0.8
            pads.append(int(rng.integers(max(low, 0), high + 1) if keep else rng.integers(0, d * (k - 1) + 1)))
        pads = tuple(pads)
        groups = int(rng.choice([1, 2]))
        cin, cout = groups * int(rng.integers(1, 3)), groups * int(rng.choice([1, 2, 4]))
        mode = str(rng.choice(["zeros", "circular"]))
        conv = nn.Conv3d(cin, cout, ks, stride=ss, padding=pads, dilation=ds, groups=groups, bias=True,
                         padding_mode=mode).double()
        policy = {"rules": [{"match": {"type": "Conv3d"}, "apply": "isometric_init",
                             "with": {"seed": trial, "activation": "relu"}}]}
        gm = orthofx.transform(nn.Sequential(conv), policy)
        (change,) = orthofx.manifest_of(gm).changes
        assert change.after["scale"] == pytest.approx(math.sqrt(2))
        layer = gm.get_submodule("0")
        assert float(layer.bias.detach().abs().max()) == 0.0
        size = tuple(2 * s for s in ss) if trial % 2 else tuple(4 if s == 1 else 2 * s for s in ss)
        size = tuple(max(n, d * (k - 1) + 1 - 2 * p) + (-max(n, d * (k - 1) + 1 - 2 * p)) % s
                     for n, k, s, d, p in zip(size, ks, ss, ds, pads))  # at least one output position
        if change.after["exact"]:
            claimed += 1
            j = dense_jacobian(layer, size)
            out = layer(torch.zeros(1, cin, *size, dtype=torch.float64)).shape[2:]
            assert tuple(out) == tuple(n // s for n, s in zip(size, ss)), (ks, ss, ds, pads)
            assert all_singular_values_equal(j, math.sqrt(2)), (ks, ss, ds, pads, groups, cin, cout, mode)
            assert change.after["lorth"] < 1e-20
        else:
            unclaimed += 1
    assert claimed >= 10 and unclaimed >= 5


def test_isometric_init_before_measure_of_a_dilated_strided_conv_is_the_dilated_operators():
    """The Change's ``before`` lorth is the layer's own L_orth (its dilated kernel at its stride), as
    orth_regularizer and report measure it."""
    torch.manual_seed(0)
    for conv in (nn.Conv3d(2, 4, 3, stride=(2, 1, 2), dilation=(2, 1, 3), padding=1),
                 nn.Conv2d(3, 4, 2, stride=2, dilation=3), nn.Conv1d(2, 3, 3, stride=4, dilation=2, padding=1),
                 nn.Conv2d(2, 6, (3, 2), stride=(3, 2), dilation=(2, 1))):
        conv = conv.double()
        w = conv.weight.detach().clone()
        ref = definition1_lorth(dilate_np(w, tuple(d if s > 1 else 1 for d, s in zip(conv.dilation, conv.stride))),
                                tuple(conv.stride))
        policy = {"rules": [{"match": {"type": ["Conv1d", "Conv2d", "Conv3d"]}, "apply": "isometric_init"}]}
        gm = orthofx.transform(nn.Sequential(conv), policy)
        (change,) = orthofx.manifest_of(gm).changes
        assert change.before["lorth"] == pytest.approx(ref, rel=1e-9)
        # the written kernel's: its tap block stands in for the whole kernel, dilation included
        layer = gm.get_submodule("0")
        whole = metrics.lorth(layer.weight.detach() / change.after["scale"], stride=tuple(layer.stride),
                              groups=layer.groups, dilation=tuple(layer.dilation))
        assert change.after["lorth"] == pytest.approx(float(whole), rel=1e-10, abs=1e-20)
        # P0's L_orth from the dense circular operator of the dilated kernel (tests/references.py), not only the
        # library's own lorth: the written kernel is near orthogonal, hence the absolute tolerance
        dense = lorth64(dilate_np(layer.weight.detach() / change.after["scale"], tuple(layer.dilation)),
                        stride=tuple(layer.stride), groups=layer.groups)
        assert change.after["lorth"] == pytest.approx(dense, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("retraction", ["polar", "qr"])
def test_riemannian_keeps_conv3d_weights_on_the_stiefel_manifold(retraction):
    """Grouped, strided, tall and wide Conv3d weights (flattened per group) stay orthonormal through SGD with
    momentum and Adam steps; the momentum buffers stay tangent."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 4, (1, 2, 3), stride=(1, 2, 1), groups=2),  # per group 2 x 6: wide
                          nn.Conv3d(4, 32, 1),  # 32 x 4: tall
                          nn.Conv3d(32, 8, 2, groups=4)).double()  # per group 2 x 64: wide
    policy = {"rules": [{"match": {"type": "Conv3d"}, "apply": "riemannian", "with": {"retraction": retraction}}]}
    x = torch.randn(2, 2, 3, 4, 5, dtype=torch.float64)
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    for opt in (torch.optim.SGD(gm.parameters(), lr=0.3, momentum=0.9), torch.optim.Adam(gm.parameters(), lr=0.05)):
        handle = orthofx.attach(opt, gm)
        for _ in range(3):
            opt.zero_grad()
            gm(x).square().mean().backward()
            opt.step()
        for name, groups in (("0", 2), ("1", 1), ("2", 4)):
            layer = gm.get_submodule(name)
            w = layer.weight.detach().reshape(groups, layer.out_channels // groups, -1)
            G = w @ w.mT if w.shape[1] <= w.shape[2] else w.mT @ w
            assert (G - torch.eye(G.shape[-1], dtype=G.dtype)).abs().max() < 1e-10, (name, retraction)
            buf = opt.state[layer.weight].get("momentum_buffer")
            if buf is not None:
                b = buf.reshape(w.shape)
                sym = w @ b.mT + b @ w.mT if w.shape[1] <= w.shape[2] else w.mT @ b + b.mT @ w
                assert sym.abs().max() < 1e-10
        handle.remove()


def test_lorth_refuses_a_dilation_for_a_linear_weight():
    """A Linear has no taps to spread: a dilation there is a mistake (like a stride), not silently ignored."""
    w = torch.randn(3, 4)
    assert float(metrics.lorth(w, dilation=1)) == pytest.approx(float((w @ w.T - torch.eye(3)).square().sum()),
                                                                rel=1e-5)
    for bad in (2, (2,), (1, 1)):
        with pytest.raises(ArgumentError, match="dilation"):
            metrics.lorth(w, dilation=bad)
