"""Tests of orthofx.nn.orthogonal: exactly orthogonal convolutions and linear layers.

The reference is the dense matrix of the layer's operator written entry by entry here
(``dense_operator``: circular, strided, dilated, grouped, with the layer's padding offset), in float64:
its Gram matrix must be the identity (A A^T = I in the row-orthogonal case, A^T A = I in the column-orthogonal
one) and the layer's forward must be that matrix applied to the input.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from orthofx.errors import ImpossibleLayerError, OrthofxError
from orthofx.metrics import conv_singular_values
from orthofx.errors import LayerArgumentError
from orthofx.nn.orthogonal import OrthogonalConv1d, OrthogonalConv2d, OrthogonalConv3d, OrthogonalLinear, orthonormal
from orthofx.nn.stiefel import project_to_stiefel
from orthofx.theory import orthogonal_conv_exists
from references import circular_pad_loop

CLS = {1: OrthogonalConv1d, 2: OrthogonalConv2d, 3: OrthogonalConv3d}
TORCH_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


# ------------------------------------------------------------------------------------------- references


def dense_operator(K: np.ndarray, n: int, stride: tuple, dilation: tuple, groups: int, lefts: tuple) -> np.ndarray:
    """Matrix of y[m, i] = sum_{c in group(m), p} K[m, c, p] x[c, (S i + D p - left) mod n], one entry at a time.

    Rows (m, i) and columns (c, x) in C order; the output grid is n / S per dimension.
    """
    M, Cg = K.shape[:2]
    ks = K.shape[2:]
    d = len(ks)
    C = Cg * groups
    Mg = M // groups
    out_grid = tuple(n // s for s in stride)
    n_out, n_in = math.prod(out_grid), n ** d
    A = np.zeros((M * n_out, C * n_in))
    for m in range(M):
        group = m // Mg
        for io, i in enumerate(itertools.product(*(range(q) for q in out_grid))):
            row = m * n_out + io
            for cl in range(Cg):
                c = group * Cg + cl
                for p in itertools.product(*(range(k) for k in ks)):
                    pos = [(stride[t] * i[t] + dilation[t] * p[t] - lefts[t]) % n for t in range(d)]
                    col = c * n_in + int(np.ravel_multi_index(pos, (n,) * d))
                    A[row, col] += K[(m, cl) + p]
    return A


def operator_of(layer) -> np.ndarray:
    n = layer._test_grid
    return dense_operator(layer.weight.detach().double().numpy(), n, layer.stride, layer.dilation, layer.groups,
                          tuple(l for l, _ in layer.pads))


def gram_error(A: np.ndarray, case: str) -> float:
    G = A @ A.T if case == "RO" else A.T @ A
    return float(np.abs(G - np.eye(G.shape[0])).max())


def undilated(K: torch.Tensor, dilation: tuple) -> torch.Tensor:
    """The kernel a dilated convolution applies: the taps of ``K`` spread ``dilation`` apart, zeros between."""
    size = [(k - 1) * dl + 1 for k, dl in zip(K.shape[2:], dilation)]
    out = K.new_zeros(*K.shape[:2], *size)
    out[(slice(None), slice(None)) + tuple(slice(None, None, dl) for dl in dilation)] = K
    return out


def max_sigma_error(layer, n: int) -> float:
    K = undilated(layer.weight.detach(), layer.dilation)
    sv = conv_singular_values(K, n, stride=layer.stride, groups=layer.groups)
    return float((sv / layer.gain - 1).abs().max())


# ------------------------------------------------------------------------------------------- the domain grid


@st.composite
def architectures(draw):
    d = draw(st.sampled_from([1, 2]))
    g = draw(st.sampled_from([1, 1, 2]))
    C = draw(st.integers(1, 3))
    M = draw(st.integers(1, 6 if d == 2 else 5))
    k = draw(st.integers(1, 4))
    S = draw(st.integers(1, 3))
    D = draw(st.sampled_from([1, 1, 2, 3]))  # also next to a stride: gcd(D, S) = 1 or > 1
    return d, g, C, M, k, S, D


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=architectures(), seed=st.integers(0, 2 ** 16))
def test_orthogonal_inside_domain_impossible_outside(arch, seed):
    d, g, C, M, k, S, D = arch
    cls = CLS[d]
    exists, case, reason = orthogonal_conv_exists(C * g, M * g, k, S, dims=d, groups=g, dilation=D)
    torch.manual_seed(seed)
    if not exists:
        with pytest.raises(ImpossibleLayerError) as info:
            cls(C * g, M * g, k, stride=S, dilation=D, groups=g)
        assert reason in str(info.value)
        assert "Theorem 4" in str(info.value) and "Fix:" in str(info.value)
        return
    layer = cls(C * g, M * g, k, stride=S, dilation=D, groups=g, dtype=torch.float64)
    assert layer.case == case
    keff = D * (k - 1) + 1
    n = S * max(1, math.ceil(keff / S)) if d == 2 else S * max(2, math.ceil(keff / S) + 1)
    layer._test_grid = n
    A = operator_of(layer)
    assert gram_error(A, case) < 1e-10
    x = torch.randn(2, C * g, *(n,) * d, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (2, M * g) + (n // S,) * d
    expected = (A @ x.reshape(2, -1).numpy().T).T.reshape(y.shape)
    np.testing.assert_allclose(y.detach().numpy() - layer.bias.detach().numpy().reshape(-1, *(1,) * d),
                               expected, atol=1e-10)
    # float32: exact FFT singular values within 1e-5 on a grid divisible by the stride
    layer32 = cls(C * g, M * g, k, stride=S, dilation=D, groups=g)
    assert max_sigma_error(layer32, 2 * S * max(k, 2)) <= 1e-5


@pytest.mark.parametrize("d, C, M, k, S", [
    (2, 4, 4, 3, 1),    # square, odd k
    (2, 4, 4, 2, 1),    # even k
    (2, 3, 5, 4, 1),    # CO at stride 1 (embedding), even k
    (2, 6, 2, 3, 1),    # RO at stride 1 (rows of a square one)
    (2, 2, 8, 2, 2),    # k = S, square operator
    (2, 3, 12, 3, 2),   # CO strided (12 = 3 * 2^2 is square; 3 * 4 = 12)
    (2, 2, 9, 3, 2),    # CO strided, M > C S^2
    (2, 4, 6, 3, 2),    # RO strided
    (2, 4, 4, 1, 2),    # k < S, RO: M <= C k^d
    (2, 2, 7, 2, 3),    # k < S, RO: 7 <= 2 * 2^2
    (1, 2, 5, 3, 3),    # 1-D, k = S, RO
    (1, 3, 2, 5, 2),    # 1-D, k > S, RO
])
def test_cases_dense_gram_and_forward(d, C, M, k, S):
    torch.manual_seed(0)
    layer = CLS[d](C, M, k, stride=S, dtype=torch.float64)
    n = 2 * S * max(1, math.ceil(k / S)) if d == 1 else S * max(2, math.ceil(k / S))
    layer._test_grid = n
    A = operator_of(layer)
    assert gram_error(A, layer.case) < 1e-10
    x = torch.randn(3, C, *(n,) * d, dtype=torch.float64)
    expected = (A @ x.reshape(3, -1).numpy().T).T
    got = (layer(x) - layer.bias.reshape(-1, *(1,) * d)).reshape(3, -1).detach().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-10)


@pytest.mark.parametrize("C, M, k, S, g", [
    (64, 64, 3, 1, 1), (32, 64, 3, 2, 1), (64, 32, 5, 1, 1), (16, 96, 4, 2, 1), (32, 32, 3, 1, 8),
    (48, 48, 3, 1, 48), (24, 40, 2, 1, 1), (16, 128, 1, 1, 1), (64, 128, 1, 2, 1),
])
def test_float32_exact_at_realistic_sizes(C, M, k, S, g):
    if not orthogonal_conv_exists(C, M, k, S, groups=g).exists:
        # the message names the layer with its arguments and quotes the theorem's condition
        with pytest.raises(ImpossibleLayerError, match=rf"OrthogonalConv2d\(in_channels={C}, out_channels={M}, "
                                                       rf".*no orthogonal convolution exists \(P0 Theorem 4"):
            OrthogonalConv2d(C, M, k, S, groups=g)
        return
    torch.manual_seed(1)
    layer = OrthogonalConv2d(C, M, k, stride=S, groups=g)
    for n in (S * 3, 8 * S):
        assert max_sigma_error(layer, n) <= 1e-5


# ------------------------------------------------------------------------------------------- outside the domain


@pytest.mark.parametrize("d, C, M, k, S, g", [
    (2, 8, 16, 1, 2, 1),   # ResNet strided shortcut (2C, C, 1, 2)
    (2, 2, 9, 2, 3, 1),    # k < S with M > C k^d (RO case: 9 <= 2 * 9)
    (2, 1, 5, 1, 2, 1),    # CO with S > k
    (1, 2, 5, 1, 2, 1),    # 1-D CO with S > k
    (2, 4, 16, 1, 2, 2),   # per group: (M, C) = (8, 2), RO, 8 > 2
])
def test_impossible_configurations(d, C, M, k, S, g):
    reason = orthogonal_conv_exists(C, M, k, S, dims=d, groups=g).reason
    with pytest.raises(ImpossibleLayerError) as info:
        CLS[d](C, M, k, stride=S, groups=g)
    message = str(info.value)
    assert reason in message and "Theorem 4" in message and "Fix:" in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, OrthofxError)


def test_shortcut_message_quotes_numbers():
    with pytest.raises(ImpossibleLayerError, match=r"M <= C\*k\^d, here 16 > 8") as info:
        OrthogonalConv2d(8, 16, 1, stride=2)
    assert "kernel_size >= 2" in str(info.value) and "out_channels <= 8" in str(info.value)


# ------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("C, M, k, S, g", [(6, 6, 3, 1, 1), (4, 10, 3, 2, 1), (6, 4, 2, 1, 2), (3, 7, 4, 1, 1),
                                           (4, 4, 1, 2, 1)])
def test_gradients_and_adam_keep_orthogonality(C, M, k, S, g):
    torch.manual_seed(2)
    layer = OrthogonalConv2d(C, M, k, stride=S, groups=g)
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    target = torch.randn(4, M, 8 // S, 8 // S)
    for step in range(5):
        x = torch.randn(4, C, 8, 8)
        loss = (layer(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        for name, p in layer.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
        opt.step()
        assert max_sigma_error(layer, 8) <= 1e-5
    before = layer.weight.detach().clone()
    assert not torch.equal(before, OrthogonalConv2d(C, M, k, stride=S, groups=g).weight.detach())


def test_gain_scales_singular_values():
    layer = OrthogonalConv2d(4, 8, 3, stride=2, gain=2.5)
    sv = conv_singular_values(layer.weight.detach(), 8, stride=2)
    assert float((sv - 2.5).abs().max()) < 3e-5
    assert layer.orthogonality_error(8) < 1e-5


# ------------------------------------------------------------------------------------------- padding, dilation


@pytest.mark.parametrize("k, S, D, expected", [
    (3, 1, 1, ((1, 1),)), (2, 1, 1, ((0, 1),)), (4, 1, 1, ((1, 2),)), (3, 2, 1, ((1, 1),)), (4, 2, 1, ((1, 1),)),
    (5, 2, 1, ((2, 2),)), (1, 2, 1, ((0, 0),)), (2, 3, 1, ((0, 0),)), (3, 1, 2, ((2, 2),)), (2, 1, 3, ((1, 2),)),
    (3, 3, 1, ((1, 1),)), (4, 3, 1, ((1, 1),)), (6, 2, 1, ((2, 2),)),
])
def test_same_padding_offsets(k, S, D, expected):
    layer = OrthogonalConv1d(2, 2, k, stride=S, dilation=D)
    assert layer.pads == expected
    for n in (6 * S, 6 * S + 1):
        y = layer(torch.randn(1, 2, n))
        if n % S == 0:
            assert y.shape == (1, 2, n // S)
        if all(l == r for l, r in expected):  # nn.Conv's output size and alignment with padding (k_eff - 1) // 2
            ref = nn.Conv1d(2, 2, k, stride=S, dilation=D, padding=expected[0][0], padding_mode="circular")
            with torch.no_grad():
                ref.weight.copy_(layer.weight)
                ref.bias.copy_(layer.bias)
                torch.testing.assert_close(ref(torch.ones(1, 2, n)), layer(torch.ones(1, 2, n)))
                x = torch.randn(1, 2, n)
                torch.testing.assert_close(ref(x), layer(x))


def test_dilation_at_stride_one_even_kernel():
    torch.manual_seed(3)
    layer = OrthogonalConv2d(3, 3, 2, dilation=2, dtype=torch.float64)
    for n in (6, 7):  # a grid divisible by the dilation, and one that is not (the symbol stays unitary)
        layer._test_grid = n
        assert gram_error(operator_of(layer), "RO") < 1e-10


@pytest.mark.parametrize("d, C, M, k, S, D, case", [
    (1, 4, 8, 3, 2, 3, "RO"),             # gcd(D, S) = 1: built for stride 2, as undilated
    (1, 4, 12, 3, 2, 3, "CO"),            # gcd 1, column orthogonal
    (1, 3, 3, 2, 2, 5, "RO"),             # k = S
    (1, 2, 6, 4, 3, 2, "RO"),
    (1, 4, 4, 3, 2, 2, "RO"),             # gcd 2: every other input read, a stride-1 kernel there
    (1, 4, 2, 3, 2, 2, "RO"),
    (1, 2, 4, 3, 4, 2, "RO"),             # gcd 2: stride-2 kernel on the even inputs, 4 <= 2 * min(3, 2)
    (2, 2, 6, (3, 2), (2, 3), (3, 2), "RO"),
    (2, 2, 2, (3, 3), (2, 2), (2, 1), "RO"),  # gcd 2 along one dimension
    (2, 2, 10, 3, 2, 3, "CO"),
])
def test_dilation_next_to_a_stride_dense_gram_and_forward(d, C, M, k, S, D, case):
    """Dilation ``D`` in a strided dimension (module docs, item 5): the layer's dense operator, written entry by
    entry with its dilation and stride, is row or column orthogonal, and its forward is that operator."""
    torch.manual_seed(0)
    layer = CLS[d](C, M, k, stride=S, dilation=D, dtype=torch.float64)
    assert layer.case == case
    strides = layer.stride
    keff = max(dl * (kk - 1) + 1 for kk, dl in zip(layer.kernel_size, layer.dilation))
    n = math.lcm(*strides) * max(2, math.ceil(keff / min(strides)))
    layer._test_grid = n
    A = operator_of(layer)
    assert gram_error(A, case) < 1e-10
    x = torch.randn(2, C, *(n,) * d, dtype=torch.float64)
    y = (layer(x) - layer.bias.reshape(-1, *(1,) * d)).detach()
    np.testing.assert_allclose(y.reshape(2, -1).numpy(), (A @ x.reshape(2, -1).numpy().T).T, atol=1e-10)
    assert layer.orthogonality_error(n) < 1e-10


@pytest.mark.parametrize("d, C, M, k, S, D", [
    (1, 4, 8, 3, 2, 2),      # gcd 2: one residue of two read, 8 > 4 * 1
    (1, 2, 4, 3, 2, 4),      # CO shape, gcd 2: no column-orthogonal layer reads half the inputs
    (2, 2, 8, 3, 2, (2, 1)),
])
def test_dilation_next_to_a_stride_outside_the_domain_is_impossible(d, C, M, k, S, D):
    with pytest.raises(ImpossibleLayerError, match="Theorem 4") as info:
        CLS[d](C, M, k, stride=S, dilation=D)
    message = str(info.value)
    assert "dilation" in message and "gcd" in message and "Fix:" in message
    exists, _, reason = orthogonal_conv_exists(C, M, k, S, dims=d, dilation=D)
    assert not exists and reason in message


@pytest.mark.parametrize("C, M, k, S, D, g, case", [
    (2, 2, 3, 1, 1, 1, "RO"),                       # square, stride 1
    (2, 4, 2, 1, 1, 1, "CO"),                       # embedding at stride 1, even k
    (2, 8, 2, 2, 1, 1, "RO"),                       # k = S: 8 = 2 * 2^3 / 2
    (4, 8, 3, 2, 1, 1, "RO"),                       # strided, blocks and reshaped kernel
    (2, 20, (3, 2, 2), 2, 1, 1, "CO"),              # 20 > 2 * 2^3, S <= k everywhere
    (2, 2, (3, 1, 2), (2, 1, 2), 1, 1, "RO"),       # per-dimension kernel and stride, k < S on one axis
    (4, 4, 3, (1, 2, 1), (2, 3, 1), 2, "RO"),       # groups, dilation next to a stride
])
def test_conv3d_dense_gram_and_forward(C, M, k, S, D, g, case):
    """OrthogonalConv3d: the construction of the module docs in three dimensions, against the dense operator."""
    torch.manual_seed(0)
    layer = OrthogonalConv3d(C, M, k, stride=S, dilation=D, groups=g, dtype=torch.float64)
    assert layer.case == case
    n = 4
    layer._test_grid = n
    A = operator_of(layer)
    assert gram_error(A, case) < 1e-10
    x = torch.randn(2, C, n, n, n, dtype=torch.float64)
    y = (layer(x) - layer.bias.reshape(-1, 1, 1, 1)).detach()
    np.testing.assert_allclose(y.reshape(2, -1).numpy(), (A @ x.reshape(2, -1).numpy().T).T, atol=1e-10)
    plain = layer.to_conv()   # nn.Conv3d(padding_mode="circular"), or a padding and a conv for pads of 2 or more
    assert isinstance(plain if isinstance(plain, nn.Conv3d) else plain[-1], nn.Conv3d)
    torch.testing.assert_close(plain(x), layer(x))


def test_conv3d_outside_the_domain_is_impossible():
    with pytest.raises(ImpossibleLayerError, match="Theorem 4"):
        OrthogonalConv3d(2, 17, 1, stride=2)        # CO (17 > 16) with k < S


def test_dilation_with_a_one_tap_kernel_is_ignored():
    layer = OrthogonalConv2d(4, 4, 1, stride=(1, 2), dilation=(2, 1), dtype=torch.float64)
    layer._test_grid = 4
    assert gram_error(operator_of(layer), layer.case) < 1e-10


def test_zero_padding_mode_is_orthogonal_away_from_borders():
    torch.manual_seed(4)
    circ = OrthogonalConv2d(3, 5, 3, padding=1, padding_mode="circular", dtype=torch.float64)
    zero = OrthogonalConv2d(3, 5, 3, padding=1, padding_mode="zeros", dtype=torch.float64)
    zero.load_state_dict(circ.state_dict())
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    yc, yz = circ(x), zero(x)
    assert yz.shape == yc.shape
    torch.testing.assert_close(yz[..., 1:-1, 1:-1], yc[..., 1:-1, 1:-1])
    assert not torch.allclose(yz, yc)
    ref = nn.Conv2d(3, 5, 3, padding=1).double()
    with torch.no_grad():
        ref.weight.copy_(zero.weight)
        ref.bias.copy_(zero.bias)
    torch.testing.assert_close(ref(x), yz)


@pytest.mark.parametrize("kwargs", [
    dict(k=3, S=1, padding="same", mode="circular"), dict(k=2, S=1, padding="same", mode="circular"),
    dict(k=3, S=2, padding="same", mode="circular"), dict(k=4, S=2, padding="same", mode="zeros"),
    dict(k=3, S=2, padding="same", mode="zeros"), dict(k=3, S=1, padding=1, mode="zeros"),
    dict(k=3, S=1, padding="valid", mode="circular"), dict(k=1, S=2, padding="same", mode="circular", M=4),
])
@pytest.mark.parametrize("d", [1, 2])
def test_to_conv_identical_outputs(kwargs, d):
    torch.manual_seed(5)
    layer = CLS[d](4, kwargs.get("M", 6), kwargs["k"], stride=kwargs["S"], padding=kwargs["padding"],
                   padding_mode=kwargs["mode"])
    frozen = layer.to_conv()
    symmetric = all(l == r for l, r in layer.pads)
    assert isinstance(frozen, TORCH_CONV[d] if symmetric else nn.Sequential)
    conv = frozen if symmetric else frozen[1]
    assert not any(isinstance(m, (OrthogonalConv1d, OrthogonalConv2d)) for m in frozen.modules())
    if symmetric and any(l for l, _ in layer.pads):
        assert conv.padding_mode == kwargs["mode"]
    x = torch.randn(2, 4, *(8,) * d)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), layer(x), atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------- from_conv


@pytest.mark.parametrize("C, M, k, S", [(6, 6, 1, 1), (4, 2, 1, 1), (3, 8, 1, 1), (4, 16, 2, 2), (4, 9, 2, 2),
                                        (3, 5, 2, 3)])
def test_from_conv_nearest_is_exact_for_1x1_and_k_le_s(C, M, k, S):
    torch.manual_seed(6)
    source = OrthogonalConv2d(C, M, k, stride=S)
    conv = source.to_conv()
    layer = OrthogonalConv2d.from_conv(conv)
    assert layer.method == "rko"
    torch.testing.assert_close(layer.weight, source.weight, atol=1e-6, rtol=0)
    assert layer.init_error < 1e-6
    torch.testing.assert_close(layer.bias, source.bias)
    # a non-orthogonal conv gets its polar factor: no orthogonal kernel is closer
    plain = nn.Conv2d(C, M, k, stride=S)
    near = OrthogonalConv2d.from_conv(plain)
    for _ in range(3):
        other = OrthogonalConv2d.from_conv(plain, init="random")
        assert near.init_error <= other.init_error + 1e-12


def test_from_conv_nearest_best_effort_for_general_k():
    torch.manual_seed(7)
    source = OrthogonalConv2d(8, 8, 3)
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(source.weight)
    near = OrthogonalConv2d.from_conv(conv, fit_steps=60)
    rand = OrthogonalConv2d.from_conv(conv, init="random")
    assert near.bias is None
    assert near.init_error < 0.5 * rand.init_error
    assert max_sigma_error(near, 8) <= 1e-5
    strided = nn.Conv1d(3, 5, 4, stride=2)
    with torch.no_grad():  # as a pass might call it
        layer = OrthogonalConv1d.from_conv(strided, fit_steps=20)
    assert 0 < layer.init_error < OrthogonalConv1d.from_conv(strided, init="random").init_error + 1e-9


@pytest.mark.parametrize("d, C, M, k, S, g", [
    (2, 6, 6, 3, 1, 1), (2, 4, 7, 3, 1, 1), (2, 7, 4, 3, 1, 1), (2, 4, 9, 4, 2, 1), (2, 4, 4, (3, 5), (1, 2), 2),
    (1, 3, 6, 6, 2, 1), (2, 4, 4, (3, 4), (1, 2), 2), (1, 3, 6, 5, 2, 1), (1, 1, 1, 4, 1, 1), (1, 2, 2, 4, 1, 1), (2, 4, 4, 2, 1, 1), (1, 1, 3, 5, 1, 1)])
def test_nearest_start_reads_the_shift_window_as_the_block_product_does(d, C, M, k, S, g):
    # right after the blocks are paired, the Procrustes target read at the shift (no block product) must give the
    # matrix the general form gives with the block product formed; odd block counts (k - S + 1 even) have no shift
    torch.manual_seed(3)
    layer = CLS[d](C, M, k, stride=S, groups=g, dtype=torch.float64, bias=False)
    target = torch.randn(g, M // g, C // g, *layer.kernel_size, dtype=torch.float64)
    layer._reset_blocks_centre()
    shift = layer._paired_shift()
    blocks = [kp - 1 for kp in layer._kp]
    assert (shift is None) == (layer._n > 1 and any(b % 2 for b in blocks))
    if shift is None:
        return
    with torch.no_grad():  # the block part is the identity at the shift, zero elsewhere
        for p, block in _explicit_block_part(layer).items():
            expected = torch.eye(layer._n, dtype=torch.float64) if p == shift else torch.zeros_like(block)
            torch.testing.assert_close(block, expected.expand_as(block), rtol=0, atol=1e-12)
    layer._procrustes(target)
    general = layer.matrix.detach().clone()
    layer._procrustes(target, shift)
    torch.testing.assert_close(layer.matrix.detach(), general, rtol=0, atol=1e-10)
    # the kernel at the shift is the layer's kernel, built without the block product
    with torch.no_grad():
        torch.testing.assert_close(layer._explicit_kernel(shift), layer.weight, rtol=0, atol=1e-12)
    # from_conv's nearest start with fit_steps=0 fills the eval cache with that kernel: the same outputs
    conv = TORCH_CONV[d](C, M, k, stride=S, groups=g, padding=tuple(kk // 2 for kk in layer.kernel_size))
    built = CLS[d].from_conv(conv, fit_steps=0)
    x = torch.randn(2, C, *(4 * s for s in layer.stride))
    with torch.no_grad():
        cached = built.eval()(x)
        built.__dict__.pop("_eval_cache")
        torch.testing.assert_close(cached, built(x), rtol=0, atol=1e-6)
        assert built.init_error == pytest.approx(float((built.weight - conv.weight).norm() / conv.weight.norm()),
                                                 abs=1e-6)


def test_from_conv_padding_keep_and_errors():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    layer = OrthogonalConv2d.from_conv(conv, padding="keep", fit_steps=0)
    assert layer.padding == (1, 1) and layer.padding_mode == "zeros"
    x = torch.randn(1, 4, 6, 6)
    assert layer(x).shape == conv(x).shape
    with pytest.raises(LayerArgumentError, match="padding_mode"):
        OrthogonalConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), padding="keep")
    with pytest.raises(LayerArgumentError, match="Conv2d"):
        OrthogonalConv2d.from_conv(nn.Conv1d(4, 4, 3))
    with pytest.raises(LayerArgumentError, match="init"):
        OrthogonalConv2d.from_conv(conv, init="closest")
    with pytest.raises(ImpossibleLayerError, match=r"in_channels=8, out_channels=16, kernel_size=\(1, 1\), "
                                                   r"stride=\(2, 2\).*exists iff M <= C\*k\^d, here 16 > 8"):
        OrthogonalConv2d.from_conv(nn.Conv2d(8, 16, 1, stride=2))


# ------------------------------------------------------------------------------------------- linear


@pytest.mark.parametrize("n_in, n_out", [(64, 64), (300, 7), (7, 300), (128, 96), (2000, 16), (1, 5), (5, 1)])
def test_linear_orthonormal_float32(n_in, n_out):
    torch.manual_seed(8)
    layer = OrthogonalLinear(n_in, n_out)
    W = layer.weight.detach().double()
    G = W @ W.T if n_out <= n_in else W.T @ W
    assert float((G - torch.eye(G.shape[0], dtype=torch.float64)).abs().max()) < 1e-6
    assert layer.case == ("RO" if n_out <= n_in else "CO")
    x = torch.randn(3, n_in)
    y = layer(x)
    torch.testing.assert_close(y, x @ layer.weight.T + layer.bias)
    y.square().sum().backward()
    assert torch.isfinite(layer.raw_weight.grad).all() and layer.raw_weight.grad.abs().sum() > 0
    torch.testing.assert_close(layer.to_linear()(x), y.detach())


def test_linear_adam_and_from_linear():
    torch.manual_seed(9)
    layer = OrthogonalLinear(32, 48, gain=2.0)
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    for _ in range(5):
        loss = layer(torch.randn(8, 32)).sin().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    W = layer.weight.detach().double() / 2.0
    assert float((W.T @ W - torch.eye(32, dtype=torch.float64)).abs().max()) < 1e-6
    plain = nn.Linear(32, 48)
    near = OrthogonalLinear.from_linear(plain)
    u, _, vh = torch.linalg.svd(plain.weight.detach().double(), full_matrices=False)  # the polar factor
    torch.testing.assert_close(near.weight, (u @ vh).float(), atol=1e-6, rtol=0)
    assert near.init_error <= OrthogonalLinear.from_linear(plain, init="random").init_error
    exact = OrthogonalLinear.from_linear(layer.to_linear(), gain=2.0)
    torch.testing.assert_close(exact.weight, layer.weight, atol=1e-6, rtol=0)
    assert exact.init_error < 1e-6
    with pytest.raises(LayerArgumentError,
                       match=r"OrthogonalLinear\.from_linear expects a torch\.nn\.Linear, got Conv1d"):
        OrthogonalLinear.from_linear(nn.Conv1d(2, 2, 1))


def test_orthonormal_helper():
    w = orthonormal(torch.randn(3, 2, 9, 4, dtype=torch.float64))
    eye = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(w.mT @ w, eye.expand(3, 2, 4, 4))
    torch.testing.assert_close(orthonormal(w), w)
    wide = orthonormal(torch.randn(4, 9, dtype=torch.float64))
    torch.testing.assert_close(wide @ wide.T, eye)


def _sign_fixed_q(a: torch.Tensor) -> torch.Tensor:
    """Q of a = QR with diag(R) >= 0 (a column-by-column sign fix, written here)."""
    Q, R = torch.linalg.qr(a)
    for j in range(Q.shape[1]):
        if R[j, j] < 0:
            Q[:, j] = -Q[:, j]
    return Q


def _bcop_kernel_by_definition(layer) -> torch.Tensor:
    r"""The kernel of a square stride-1 BCOP layer (groups 1) from its parameters, tap by tap in float64.

    Per dimension a chain of blocks :math:`P_j + (I - P_j) z` (``P_j = Q_j Q_j^T``; block ``j`` takes the next
    unused basis of ``proj_a`` for even ``j`` and ``proj_b`` for odd ``j``, counting across dimensions, a zero
    projector where the class has rank 0 and the identity where it has rank n), each new block on the left; the kernel is
    ``K[p_1, ..., p_d] = W T_1[p_1] ... T_d[p_d]`` with ``W`` the orthonormal ``matrix``."""
    n = layer.in_channels
    eye = torch.eye(n, dtype=torch.float64)
    used = {"a": 0, "b": 0}
    chains = []
    for k in layer.kernel_size:
        taps = [eye]
        for j in range(k - 1):
            cls = "a" if j % 2 == 0 else "b"
            raw = getattr(layer, f"proj_{cls}")
            if raw is None:  # no parameter: rank 0 (a delay) or rank n (the identity), by the class's rank
                rank = n // 2 if cls == "a" else n - n // 2
                P = eye.clone() if rank == n else torch.zeros(n, n, dtype=torch.float64)
            else:
                Q = _sign_fixed_q(raw[0, used[cls]].detach().double())
                P = Q @ Q.T
            used[cls] += 1
            zero = torch.zeros(n, n, dtype=torch.float64)
            taps = [(P @ taps[p] if p < len(taps) else zero) + ((eye - P) @ taps[p - 1] if p > 0 else zero)
                    for p in range(len(taps) + 1)]
        chains.append(taps)
    W = _sign_fixed_q(layer.matrix[0].detach().double())
    K = torch.zeros(n, n, *layer.kernel_size, dtype=torch.float64)
    for p in itertools.product(*(range(k) for k in layer.kernel_size)):
        product = W
        for chain, tap in zip(chains, p):
            product = product @ chain[tap]
        K[(slice(None), slice(None)) + p] = product
    return K


@pytest.mark.parametrize("d, n, k", [(1, 6, 4), (1, 5, 4), (1, 1, 3), (2, 4, 3), (2, 5, (2, 4)), (2, 3, 3)])
def test_bcop_kernel_is_the_product_of_its_blocks(d, n, k):
    # both QR paths (even n: one QR for both projector classes; odd n: one each) and rank-0 blocks (n = 1)
    torch.manual_seed(0)
    layer = CLS[d](n, n, k, method="bcop", dtype=torch.float64, bias=False)
    expected = _bcop_kernel_by_definition(layer)
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("kwargs, match", [
    (dict(in_channels=4, out_channels=6, kernel_size=3, groups=4), "groups"),
    (dict(in_channels=4, out_channels=4, kernel_size=3, padding_mode="reflect"), "padding_mode"),
    (dict(in_channels=4, out_channels=4, kernel_size=3, padding="full"), "padding"),
    (dict(in_channels=4, out_channels=4, kernel_size=3, method="cayley"), "method"),
    (dict(in_channels=4, out_channels=4, kernel_size=3, method="rko"), "rko"),
    (dict(in_channels=4, out_channels=4, kernel_size=0), "kernel_size"),
    (dict(in_channels=4, out_channels=4, kernel_size=(3, 3, 3)), "kernel_size"),
    (dict(in_channels=0, out_channels=4, kernel_size=3), "in_channels"),
    (dict(in_channels=4, out_channels=4, kernel_size=3, gain=0.0), "gain"),
    (dict(in_channels=4, out_channels=4, kernel_size=3, dtype=torch.int64), "dtype"),
    (dict(in_channels=4, out_channels=4, kernel_size=3, stride=2.5), "stride"),
    (dict(in_channels=4, out_channels=4, kernel_size=3, compute_dtype=torch.float16), "compute_dtype"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(LayerArgumentError, match=match) as info:
        OrthogonalConv2d(**kwargs)
    assert isinstance(info.value, ValueError) and isinstance(info.value, OrthofxError)


def test_bad_linear_arguments_and_reset():
    with pytest.raises(LayerArgumentError, match="out_features"):
        OrthogonalLinear(3, 0)
    with pytest.raises(LayerArgumentError, match="init"):
        OrthogonalConv2d(2, 2, 3).reset_parameters("ones")


def test_state_dict_round_trip_and_centre_init():
    torch.manual_seed(10)
    a = OrthogonalConv2d(4, 4, 3)
    b = OrthogonalConv2d(4, 4, 3)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a.weight, b.weight)
    a.reset_parameters("centre")
    w = a.weight.detach()
    assert float(w[..., 1, 1].abs().sum()) > 0
    torch.testing.assert_close(w[..., 0, :], torch.zeros_like(w[..., 0, :]), atol=1e-6, rtol=0)
    assert max_sigma_error(a, 6) <= 1e-5


def test_float32_build_is_within_tolerance():
    torch.manual_seed(11)
    for C, M, k, S in [(64, 64, 3, 1), (32, 64, 4, 2)]:
        layer = OrthogonalConv2d(C, M, k, stride=S, compute_dtype=torch.float32)
        assert layer.compute_dtype == torch.float32
        assert max_sigma_error(layer, 8) <= 1e-5
    lin = OrthogonalLinear(256, 64, compute_dtype=torch.float32)
    W = lin.weight.detach().double()
    assert float((W @ W.T - torch.eye(64, dtype=torch.float64)).abs().max()) < 1e-5


def test_symbolic_trace_and_pickle():
    import io

    torch.manual_seed(12)
    model = nn.Sequential(OrthogonalConv2d(4, 8, 3, stride=2), nn.ReLU(), OrthogonalConv2d(8, 16, 2),
                          OrthogonalConv2d(16, 16, 1, groups=2), nn.Flatten(), OrthogonalLinear(16 * 16, 10))
    x = torch.randn(2, 4, 8, 8)
    gm = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(gm(x), model(x))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(x), model(x))


# ------------------------------------------------------------------------------------------- Cayley-FFT


def cayley_reference(layer, x: torch.Tensor) -> np.ndarray:
    """The Cayley-FFT layer recomputed from its parameters with numpy, one frequency at a time (float64).

    Space-to-depth by strided slicing, full ``np.fft.fftn`` (not the half spectrum), per frequency
    ``A = V_hat - V_hat^H`` with ``V_hat(f) = sum_p V[p] exp(-2 pi i <p - (k_p - 1) // 2, f / grid>)``,
    ``Q = (I - A) inv(I + A)``, ``Y(f) = gain * Q[:M, :C S^d] X(f)``, inverse FFT, plus the bias.
    """
    V = layer.cayley_kernel.detach().double().numpy()
    g, N = V.shape[:2]
    kp = V.shape[3:]
    d = len(kp)
    S = layer.stride
    grid = tuple(n // s for n, s in zip(layer.input_size, S))
    C, M = layer.in_channels // g, layer.out_channels // g
    cp = C * math.prod(S)
    xn = x.detach().double().numpy()
    B = xn.shape[0]
    xs = np.zeros((B, g, cp) + grid)
    for gi in range(g):
        for c in range(C):
            for j, r in enumerate(itertools.product(*(range(s) for s in S))):
                window = (slice(None), gi * C + c) + tuple(slice(ri, None, si) for ri, si in zip(r, S))
                xs[:, gi, c * math.prod(S) + j] = xn[window]
    X = np.fft.fftn(xs, axes=tuple(range(3, 3 + d)))
    Y = np.zeros((B, g, M) + grid, dtype=complex)
    eye = np.eye(N)
    for f in itertools.product(*(range(n) for n in grid)):
        for gi in range(g):
            Vh = np.zeros((N, N), dtype=complex)
            for p in itertools.product(*(range(k) for k in kp)):
                phase = sum((p[t] - (kp[t] - 1) // 2) * f[t] / grid[t] for t in range(d))
                Vh += V[(gi, slice(None), slice(None)) + p] * np.exp(-2j * np.pi * phase)
            A = Vh - Vh.conj().T
            Q = (eye - A) @ np.linalg.inv(eye + A)
            index = (slice(None), gi, slice(None)) + f
            Y[index] = layer.gain * (Q[:M, :cp] @ X[index].T).T
    y = np.fft.ifftn(Y, axes=tuple(range(3, 3 + d)))
    assert np.abs(y.imag).max() < 1e-10  # a real operator: A(-f) = conj(A(f))
    y = y.real.reshape(B, g * M, *grid)
    if layer.bias is not None:
        y = y + layer.bias.detach().double().numpy().reshape(-1, *(1,) * d)
    return y


def forward_matrix(layer, in_shape) -> np.ndarray:
    """The layer's operator as a dense matrix, from its forward pass on the basis vectors (bias removed)."""
    n = math.prod(in_shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
    with torch.no_grad():
        out = layer(basis) - layer(torch.zeros(1, *in_shape, dtype=torch.float64))
    return out.reshape(n, -1).T.numpy()


CAYLEY_CASES = [  # d, C, M, k, S, n, groups
    (2, 4, 4, 3, 1, 6, 1),    # square, even grid
    (2, 4, 6, 3, 1, 5, 1),    # CO, odd grid
    (2, 6, 4, 2, 1, 7, 1),    # RO, even kernel
    (2, 4, 8, 3, 2, 8, 1),    # strided RO
    (2, 2, 12, 3, 2, 6, 1),   # strided CO (M > C S^2)
    (2, 4, 8, 1, 2, 6, 1),    # the strided 1x1 shortcut (M = 2C): no k x k orthogonal kernel exists
    (2, 4, 6, 3, 1, 4, 2),    # groups
    (1, 3, 5, 3, 2, 8, 1),    # 1-D strided
    (1, 4, 4, 5, 1, 9, 1),    # 1-D, kernel 5
]


@pytest.mark.parametrize("d, C, M, k, S, n, g", CAYLEY_CASES)
def test_cayley_fft_against_reference_dense_gram_and_effective_kernel(d, C, M, k, S, n, g):
    torch.manual_seed(20 + C + M + k + S + n)
    layer = CLS[d](C, M, k, stride=S, groups=g, method="cayley_fft", input_size=n, dtype=torch.float64, gain=1.5)
    with torch.no_grad():
        layer.bias.normal_()
    assert layer.case == ("RO" if M // g <= (C // g) * S ** d else "CO")
    x = torch.randn(2, C, *(n,) * d, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (2, M, *(n // S,) * d)
    np.testing.assert_allclose(y.detach().numpy(), cayley_reference(layer, x), atol=1e-12, rtol=0)
    A = forward_matrix(layer, (C,) + (n,) * d)
    assert gram_error(A / 1.5, layer.case) < 1e-12
    # the effective full-size kernel (weight, used by to_conv and the metrics) is the same operator
    K = layer.weight.detach().numpy()
    assert K.shape == (M, C // g) + (n,) * d
    expected = dense_operator(K, n, layer.stride, (1,) * d, g, tuple(l for l, _ in layer.pads))
    np.testing.assert_allclose(A, expected, atol=1e-12, rtol=0)
    np.testing.assert_allclose(forward_matrix(layer.to_conv(), (C,) + (n,) * d), A, atol=1e-12, rtol=0)


@pytest.mark.parametrize("C, M, k, S, n, g", [(32, 32, 3, 1, 16, 1), (16, 32, 3, 2, 16, 1), (16, 32, 1, 2, 16, 1),
                                              (24, 48, 3, 1, 12, 3)])
def test_cayley_fft_float32_sigma_and_norm_preservation(C, M, k, S, n, g):
    torch.manual_seed(30)
    layer = OrthogonalConv2d(C, M, k, stride=S, groups=g, method="cayley_fft", input_size=(n, n), bias=False)
    sv = conv_singular_values(layer.weight.detach(), n, stride=S, groups=g)
    assert sv.numel() == min(M, C * S * S) * (n // S) ** 2
    assert float((sv - 1).abs().max()) <= 1e-5
    x = torch.randn(8, C, n, n)
    y = layer(x)
    norms_in, norms_out = x.flatten(1).norm(dim=1), y.flatten(1).norm(dim=1)
    if layer.case == "CO":  # an isometry: every input keeps its norm
        torch.testing.assert_close(norms_out, norms_in, rtol=1e-5, atol=0)
    else:                   # rows orthonormal: the adjoint is an isometry, and no output is longer than its input
        assert bool((norms_out <= norms_in * (1 + 1e-5)).all())
        z = torch.randn(8, M, n // S, n // S)
        xt = torch.zeros_like(x, requires_grad=True)
        (back,) = torch.autograd.grad(layer(xt), xt, z)
        torch.testing.assert_close(back.flatten(1).norm(dim=1), z.flatten(1).norm(dim=1), rtol=1e-5, atol=0)


def test_cayley_fft_gradients_and_adam_keep_orthogonality():
    torch.manual_seed(31)
    layer = OrthogonalConv2d(8, 16, 3, stride=2, method="cayley_fft", input_size=(8, 8))
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    x = torch.randn(4, 8, 8, 8)
    target = torch.randn(4, 16, 4, 4)
    losses = []
    for _ in range(5):
        loss = (layer(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        assert layer.cayley_kernel.grad is not None and float(layer.cayley_kernel.grad.abs().sum()) > 0
        opt.step()
        losses.append(float(loss.detach()))
        sv = conv_singular_values(layer.weight.detach(), 8, stride=2)
        assert float((sv - 1).abs().max()) <= 1e-5
    assert losses[-1] < losses[0]


def test_cayley_fft_to_plain_is_a_fourier_conv_with_identical_outputs():
    import io

    from orthofx.nn.orthogonal import FourierConv

    torch.manual_seed(32)
    layer = OrthogonalConv2d(4, 8, 3, stride=2, method="cayley_fft", input_size=(8, 6))
    x = torch.randn(3, 4, 8, 6)
    frozen = layer.to_plain()
    assert isinstance(frozen, FourierConv) and not list(frozen.buffers())[0].is_complex()
    torch.testing.assert_close(frozen(x), layer(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(frozen(x[0]), layer(x[0]), atol=1e-6, rtol=0)  # unbatched
    torch.testing.assert_close(layer.to_conv()(x), layer(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(frozen.double()(x.double()), layer.double()(x.double()), atol=1e-6, rtol=0)
    buf = io.BytesIO()
    torch.save(frozen, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(x.double()), frozen(x.double()))
    with pytest.raises(LayerArgumentError, match=r"built for inputs of spatial size \(8, 6\)"):
        frozen(torch.randn(1, 4, 8, 8, dtype=torch.float64))


def test_cayley_fft_state_dict_centre_init_and_from_conv():
    torch.manual_seed(33)
    a = OrthogonalConv2d(4, 4, 3, method="cayley_fft", input_size=(6, 6))
    b = OrthogonalConv2d(4, 4, 3, method="cayley_fft", input_size=(6, 6))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.weight, a.weight)
    assert set(a.state_dict()) == {"cayley_kernel", "bias"}
    a.reset_parameters("centre")  # A = 0, Q = I: the identity map
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(a(x), x + a.bias.view(1, -1, 1, 1), atol=1e-6, rtol=0)
    # nearest start from an existing conv: closer than the identity, refined by Adam steps
    conv = OrthogonalConv2d(6, 6, 3).to_conv()  # an orthogonal 3x3 conv (which a 3x3 Cayley kernel cannot match)
    identity = OrthogonalConv2d(6, 6, 3, method="cayley_fft", input_size=(8, 8))
    identity.reset_parameters("centre")
    start = identity._relative_error(conv.weight.detach())
    closed = OrthogonalConv2d.from_conv(conv, method="cayley_fft", input_size=(8, 8), fit_steps=0)
    fitted = OrthogonalConv2d.from_conv(conv, method="cayley_fft", input_size=(8, 8), fit_steps=60)
    assert closed.init_error <= start and fitted.init_error < closed.init_error < 1.5
    torch.testing.assert_close(fitted.bias, conv.bias)
    assert max_sigma_error(fitted, 8) <= 1e-5


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="cayley_fft"), "needs input_size"),
    (dict(method="cayley_fft", input_size=(8, 8), padding_mode="zeros"), "padding_mode='circular'"),
    (dict(method="cayley_fft", input_size=(8, 8), padding="valid"), "padding='same'"),
    (dict(method="cayley_fft", input_size=(8, 8), dilation=2), "dilation"),
    (dict(method="cayley_fft", input_size=(9, 8), stride=2), "divisible by stride"),
    (dict(method="cayley_fft", input_size=(2, 2), kernel_size=5), "too large"),
    (dict(method="cayley_fft", input_size=(8, 8, 8)), "input_size"),
    (dict(method="bcop", input_size=(8, 8)), "only used by method='cayley_fft'"),
])
def test_cayley_fft_bad_arguments(kwargs, match):
    args = dict(in_channels=4, out_channels=4, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(LayerArgumentError, match=match):
        OrthogonalConv2d(**args)


def test_cayley_fft_wrong_input_size_at_forward():
    layer = OrthogonalConv2d(4, 4, 3, method="cayley_fft", input_size=(8, 8))
    with pytest.raises(LayerArgumentError, match=r"built for inputs of spatial size \(8, 8\), got \(16, 16\)"):
        layer(torch.randn(1, 4, 16, 16))
    with pytest.raises(LayerArgumentError, match="defined on input_size"):
        layer.orthogonality_error(16)
    assert layer.orthogonality_error((8, 8)) <= 1e-5
    with pytest.raises(LayerArgumentError, match="method='cayley_fft' only"):
        OrthogonalConv2d(4, 4, 3).frequency_response()


def test_cayley_fft_compiles_fullgraph():
    torch.manual_seed(34)
    layer = OrthogonalConv2d(4, 8, 3, stride=2, method="cayley_fft", input_size=(8, 8))
    x = torch.randn(2, 4, 8, 8)

    def loss_and_grad(fn):
        layer.zero_grad(set_to_none=True)
        loss = fn(x)
        loss.backward()
        return loss.detach(), layer.cayley_kernel.grad.clone()

    fn = lambda inp: layer(inp).square().sum()  # noqa: E731
    eager = loss_and_grad(fn)
    torch._dynamo.reset()
    try:
        compiled = loss_and_grad(torch.compile(fn, fullgraph=True, backend="aot_eager"))
        frozen = layer.to_plain()
        torch.testing.assert_close(torch.compile(frozen, fullgraph=True, backend="aot_eager")(x), frozen(x))
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(compiled[1], eager[1], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------- eval-mode kernel cache


@pytest.mark.parametrize("make", [
    lambda: OrthogonalConv2d(6, 6, 3),
    lambda: OrthogonalConv2d(4, 8, 3, stride=2),
    lambda: OrthogonalConv2d(4, 4, 3, method="cayley_fft", input_size=(8, 8)),
    lambda: OrthogonalLinear(5, 7),
], ids=["bcop", "strided", "cayley_fft", "linear"])
def test_eval_cache_gives_the_uncached_outputs_and_follows_parameter_changes(make):
    torch.manual_seed(0)
    layer = make().double().eval()
    x = torch.randn(2, 5, dtype=torch.float64) if isinstance(layer, OrthogonalLinear) \
        else torch.randn(2, layer.in_channels, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        first = layer(x)
        assert "_eval_cache" in layer.__dict__
        assert torch.equal(layer(x), first)
        # an in-place update (what an optimizer step does) must rebuild the kernel
        weight_param = next(layer.parameters())
        weight_param.add_(0.3 * torch.randn_like(weight_param))
        changed = layer(x)
    with torch.enable_grad():  # no cache with autograd on: the reference
        expected = layer(x)
    assert not torch.allclose(changed, first)
    torch.testing.assert_close(changed, expected, atol=1e-12, rtol=0)
    layer.train()
    assert "_eval_cache" not in layer.__dict__


def test_eval_cache_is_not_used_in_training_or_with_grad():
    layer = OrthogonalConv2d(4, 4, 3)
    x = torch.randn(1, 4, 6, 6)
    layer(x)  # training mode
    layer.eval()
    layer(x)  # autograd on
    assert "_eval_cache" not in layer.__dict__
    out = layer(x)
    out.sum().backward()
    assert layer.matrix.grad is not None


# ------------------------------------------------------------------------------------------ circular padding

@pytest.mark.parametrize("shape, pads", [((2, 3, 7), ((1, 1),)), ((2, 3, 5), ((2, 0),)),
                                         ((1, 2, 4, 5), ((1, 1), (1, 1))), ((2, 1, 4, 5), ((0, 1), (2, 1))),
                                         ((1, 2, 3, 3), ((3, 3), (0, 3))), ((3, 4, 4), ((1, 2), (0, 0)))])
def test_circular_pad_values_and_all_derivatives(shape, pads):
    from orthofx.nn.padding import circular_pad as _circular_pad
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    out = _circular_pad(x, pads)
    torch.testing.assert_close(out, circular_pad_loop(x.detach(), pads), atol=0, rtol=0)
    # backward (the fold), double backward, forward mode and batched gradients against finite differences
    assert torch.autograd.gradcheck(lambda t: _circular_pad(t, pads), (x,), check_forward_ad=True,
                                    check_batched_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: _circular_pad(t, pads), (x,), check_fwd_over_rev=True,
                                        check_batched_grad=True)
    # the adjoint exactly: <pad(x), g> = <x, fold(g)>
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close((out * g).sum(), (x * grad).sum(), atol=1e-12, rtol=0)
    # torch.func: jvp and the Jacobian by vmap over vjp (the Jacobian regulariser's routes)
    v = torch.randn_like(x)
    _, tangent = torch.func.jvp(lambda t: _circular_pad(t, pads), (x.detach(),), (v,))
    torch.testing.assert_close(tangent, circular_pad_loop(v, pads), atol=0, rtol=0)
    jac = torch.func.jacrev(lambda t: _circular_pad(t, pads))(x.detach())
    dense = torch.autograd.functional.jacobian(lambda t: circular_pad_loop(t, pads), x.detach())
    torch.testing.assert_close(jac, dense, atol=0, rtol=0)


def test_circular_pad_of_an_orthogonal_layer_keeps_its_gradients():
    # the layer's training step through the faster padding: the same gradients as through F.pad's
    import torch.nn.functional as F
    torch.manual_seed(0)
    layer = OrthogonalConv2d(4, 6, 3, stride=1, dtype=torch.float64)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    reference = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), layer.weight, layer.bias)
    reference.square().sum().backward()
    for a, b in zip(grads, [x.grad] + [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_hessian_through_the_circular_padding():
    # forward mode over vmap (torch.func.hessian = jacfwd(jacrev)) through the layer's padding Functions
    import torch.nn.functional as F
    torch.manual_seed(1)
    layer = OrthogonalConv2d(3, 3, 3, dtype=torch.float64)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    w, b = layer.weight.detach(), layer.bias.detach()
    hessian = torch.func.hessian(lambda t: layer(t).pow(3).sum())(x)
    reference = torch.func.hessian(lambda t: F.conv2d(F.pad(t, (1, 1, 1, 1), mode="circular"), w, b).pow(3).sum())(x)
    torch.testing.assert_close(hessian, reference, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("method", ["auto", "cayley_fft"])
def test_eval_cache_is_not_stale_after_a_fused_optimizer_step(method):
    # fused optimizers write parameters without bumping version counters; a training pass in eval mode (frozen
    # BatchNorm) before the step must drop the cached kernel
    torch.manual_seed(2)
    layer = OrthogonalConv2d(4, 4, 3, method=method, input_size=8 if method == "cayley_fft" else None).eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        layer(x)  # validation fills the cache
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5, fused=True)
    layer(x).square().mean().backward()
    optimizer.step()
    with torch.no_grad():
        cached = layer(x)
    fresh = layer(x).detach()  # with gradients: rebuilt from the parameters
    torch.testing.assert_close(cached, fresh, atol=0, rtol=0)


def test_eval_mode_under_torch_func_and_inference_mode():
    from torch.func import functional_call, stack_module_state, vmap
    torch.manual_seed(3)
    x = torch.randn(2, 4, 8, 8)
    layers = [OrthogonalConv2d(4, 4, 3).eval() for _ in range(3)]
    params, buffers = stack_module_state(layers)
    with torch.no_grad():
        batched = vmap(lambda p, b: functional_call(layers[0], (p, b), (x,)))(params, buffers)
        for i, layer in enumerate(layers):
            torch.testing.assert_close(batched[i], layer(x), atol=1e-6, rtol=1e-6)
    with torch.inference_mode():
        layer = OrthogonalConv2d(4, 4, 3).eval()  # inference tensors: no version counter, no cache
        assert layer(x).shape == (2, 4, 8, 8)
        assert OrthogonalLinear.from_linear(nn.Linear(5, 3)).init_error > 0
        with pytest.raises(LayerArgumentError, match="inference_mode"):
            OrthogonalConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1))  # the nearest fit needs autograd
        assert OrthogonalConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1), fit_steps=0).init_error > 0


# --------------------------------------------------------------------- the block part, against explicit products

def _explicit_block_part(layer) -> dict:
    """``A[p] = T_1[p_1] ... T_d[p_d]`` with ``T_i = B_m ... B_1`` and ``B = P + (I - P) z`` (``B = z`` for a rank-0
    projector), formed by explicit polynomial products, tap by tap (float64, loops): the reference the layer's
    block-by-block application (``_apply_blocks``) is checked against."""
    g, n = layer.groups, layer._n
    eye = torch.eye(n, dtype=torch.float64).expand(g, n, n)
    zero = torch.zeros(g, n, n, dtype=torch.float64)
    bases = layer._projector_bases(torch.float64)
    chains = []
    for dim_blocks in layer._block_index:
        T = [eye]
        for cls, idx in dim_blocks:
            if (layer.proj_a if cls == "a" else layer.proj_b) is None:
                B = [zero, eye]
            else:
                P = bases[cls][idx] @ bases[cls][idx].mT
                B = [P, eye - P]
            product = [zero] * (len(T) + 1)
            for i, b in enumerate(B):
                for j, t in enumerate(T):
                    product[i + j] = product[i + j] + b @ t
            T = product
        chains.append(T)
    A = {}
    for p in itertools.product(*(range(len(c)) for c in chains)):
        term = eye
        for chain, tap in zip(chains, p):
            term = term @ chain[tap]
        A[p] = term
    return A


def _explicit_kernel(layer) -> torch.Tensor:
    """The unit kernel ``(g, M, C, *k)`` from :func:`_explicit_block_part`: ``W A[p]`` (stride 1), ``A[p] W``
    (``M > C`` at stride 1, the orthonormal columns embedded) or ``sum_a R[a] A[p - a]`` (strided, ``R`` the
    ``S``-tap reshaped matrix)."""
    g, M, C = layer.groups, layer._M, layer._C
    W = orthonormal(layer.matrix.detach().double(), tall=layer._matrix_tall)
    A = _explicit_block_part(layer)
    K = torch.zeros(g, M, C, *layer.kernel_size, dtype=torch.float64)
    if layer._strided:
        R = W.reshape(g, M, C, *layer._r)
        for a in itertools.product(*(range(r) for r in layer._r)):
            for q, block in A.items():
                p = tuple(x + y for x, y in zip(a, q))
                K[(Ellipsis,) + p] += R[(Ellipsis,) + a] @ block
        return K
    for p, block in A.items():
        K[(Ellipsis,) + p] = block @ W if layer._embed else W @ block
    return K


BLOCK_CASES = [(d, C, M, k, S, g) for d, C, M, k, S, g in itertools.product(
    (1, 2), (1, 2, 3, 4), (1, 2, 4, 6), (1, 2, 3, 4), (1, 2), (1, 2)) if C % g == 0 and M % g == 0]


@pytest.mark.parametrize("d, C, M, k, S, g", BLOCK_CASES[::4] + [(2, 4, 4, (3, 5), (1, 2), 2), (2, 3, 8, (4, 2), (2, 1), 1)])
def test_kernel_built_block_by_block_equals_the_explicit_block_product(d, C, M, k, S, g):
    # generic projectors (not paired into shifts): every block acts, in the stride-1 (right), embedded (left) and
    # strided forms; the Procrustes step (the adjoint application) gives the optimum of the explicit form
    torch.manual_seed(5)
    try:
        layer = CLS[d](C, M, k, stride=S, groups=g, dtype=torch.float64, bias=False)
    except ImpossibleLayerError:
        return
    with torch.no_grad():
        for p in (layer.proj_a, layer.proj_b):
            if p is not None:
                p.normal_()
        torch.testing.assert_close(layer._unit_kernel(torch.float64), _explicit_kernel(layer), rtol=0, atol=1e-12)
        # the Procrustes step applies the adjoint: its matrix is the polar factor of the explicit correlation
        target = torch.randn(g, M // g, C // g, *layer.kernel_size, dtype=torch.float64)
        A = _explicit_block_part(layer)
        if layer._strided:
            G = torch.zeros(g, M // g, C // g, *layer._r, dtype=torch.float64)
            for a in itertools.product(*(range(r) for r in layer._r)):
                for q, block in A.items():
                    p = tuple(x + y for x, y in zip(a, q))
                    G[(Ellipsis,) + a] += target[(Ellipsis,) + p] @ block.mT
        else:
            G = sum(block.mT @ target[(Ellipsis,) + p] if layer._embed else target[(Ellipsis,) + p] @ block.mT
                    for p, block in A.items())
        layer._procrustes(target)
        expected = project_to_stiefel(G.reshape(layer.matrix.shape))
        torch.testing.assert_close(layer.matrix, expected, rtol=0, atol=1e-10)
