"""Edge cases of the less-used construction methods of orthofx's hard orthogonal layers.

Corners not covered by ``test_orthogonal_layers.py``: non-square kernels and strides, 1-D layers with stride > k,
dilation next to a stride (other dimension) and groups, ``rko``'s domain and ``auto``'s choice, ``cayley_fft`` on
odd / even / non-square input sizes with strides and groups, empty batches and too small inputs, gradients
(finite differences in float64), bias, float64 / bfloat16 parameters, ``compute_dtype=float32``, state_dict,
deepcopy, pickle, ``.to(dtype)`` and freezing.

References are built here, independently of the library: the dense operator of a layer is read off its forward
pass on basis inputs (float64 where the layer supports it), its singular values come from numpy's SVD; Theorem 4's
condition is written out per dimension (:func:`admitted`); a frozen conv is compared with a plain ``nn.Conv`` with
``padding_mode="circular"`` (or an explicit ``F.pad(mode="circular")``) holding the same kernel.
"""

from __future__ import annotations

import copy
import itertools
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import orthofx
from orthofx.errors import ImpossibleLayerError, LayerArgumentError
from orthofx.nn.orthogonal import FourierConv, OrthogonalConv1d, OrthogonalConv2d, OrthogonalLinear

CLS = {1: OrthogonalConv1d, 2: OrthogonalConv2d}
TORCH_CONV = {1: nn.Conv1d, 2: nn.Conv2d}


# ------------------------------------------------------------------------------------------- references


def forward_matrix(module: nn.Module, in_shape: tuple, dtype=torch.float64) -> np.ndarray:
    """The module's operator (bias removed) from its forward pass on the basis inputs, as a float64 matrix."""
    n = math.prod(in_shape)
    basis = torch.eye(n, dtype=dtype).reshape(n, *in_shape)
    with torch.no_grad():
        out = module(basis) - module(torch.zeros(1, *in_shape, dtype=dtype))
    return out.reshape(n, -1).T.double().numpy()


def max_sigma_error(A: np.ndarray, gain: float = 1.0) -> float:
    """max |sigma_i / gain - 1| over the min(rows, cols) singular values (numpy's SVD)."""
    s = np.linalg.svd(A, compute_uv=False)
    return float(np.abs(s / gain - 1).max())


def gram_error(A: np.ndarray, case: str) -> float:
    G = A @ A.T if case == "RO" else A.T @ A
    return float(np.abs(G - np.eye(G.shape[0])).max())


def admitted(C: int, M: int, k: tuple, S: tuple) -> tuple[bool, str]:
    """P0 Theorem 4 per group, written out per dimension: RO (M <= C prod S_i) iff M <= C prod min(k_i, S_i),
    CO iff S_i <= k_i in every dimension."""
    if M <= C * math.prod(S):
        return M <= C * math.prod(min(a, b) for a, b in zip(k, S)), "RO"
    return all(s <= a for a, s in zip(k, S)), "CO"


def plain_circular_conv(layer) -> nn.Module:
    """A plain torch conv with the layer's kernel and bias and circular padding, built here: one
    ``nn.Conv(padding_mode='circular')`` where the pads are symmetric, else ``F.pad(mode='circular')`` first."""
    d = layer._dims
    pads = layer.pads
    size = layer.weight.shape[2:]
    symmetric = all(l == r for l, r in pads)
    conv = TORCH_CONV[d](layer.in_channels, layer.out_channels, tuple(size), stride=layer.stride,
                         padding=tuple(l for l, _ in pads) if symmetric else 0, dilation=layer.dilation,
                         groups=layer.groups, bias=layer.bias is not None, padding_mode="circular",
                         dtype=layer.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(layer.weight)
        if layer.bias is not None:
            conv.bias.copy_(layer.bias)
    if symmetric:
        return conv
    flat = [v for l, r in reversed(pads) for v in (l, r)]
    return nn.Sequential(_Pad(flat), conv)


class _Pad(nn.Module):
    def __init__(self, flat):
        super().__init__()
        self.flat = flat

    def forward(self, x):
        return F.pad(x, self.flat, mode="circular")


def layer_input_shape(layer, grid_factor=(3, 4)) -> tuple:
    if getattr(layer, "input_size", None) is not None:
        return (layer.in_channels, *layer.input_size)
    return (layer.in_channels, *(s * f for s, f in zip(layer.stride, grid_factor)))


# ------------------------------------------------------------------------------------------- explicit kernels


EXPLICIT_CASES = [  # d, C, M, k, S, groups, dilation
    (2, 2, 3, (1, 3), (1, 2), 1, 1),           # non-square k and S, RO
    (2, 2, 4, (3, 1), (2, 1), 1, 1),           # non-square, the other way
    (2, 3, 5, (4, 2), (2, 2), 1, 1),           # k > S in one dimension, k = S in the other
    (2, 2, 12, (2, 3), (2, 3), 1, 1),          # k = S non-square, square operator (12 = 2 * 6)
    (2, 1, 8, (3, 4), (2, 3), 1, 1),           # CO with non-square S <= k (8 > 1 * 6)
    (2, 2, 7, (2, 2), (3, 3), 1, 1),           # k < S, RO: 7 <= 2 * 2 * 2
    (2, 4, 2, 1, (2, 2), 2, 1),                # 1x1 strided, RO per group (1 <= 2 * 1)
    (2, 4, 4, 3, (2, 1), 2, (1, 2)),           # stride in one dimension, dilation in the other, groups
    (2, 2, 3, 3, (1, 2), 1, (2, 1)),           # the same, transposed
    (2, 4, 6, (3, 2), (1, 2), 2, (3, 1)),      # dilation 3 with an even kernel elsewhere, groups
    (2, 6, 6, 3, (3, 1), 3, 1),                # stride 3 in one dimension, groups of 2 channels
    (2, 3, 3, (2, 5), 1, 1, (2, 1)),           # stride 1, non-square even / odd kernel, dilation
    (2, 3, 5, 1, 1, 1, 1),                     # 1x1 at stride 1, M > C: rko embedding
    (1, 2, 3, 2, 3, 1, 1),                     # 1-D, stride > k, RO: 3 <= 2 * 2
    (1, 3, 3, 1, 3, 1, 1),                     # 1-D, 1-tap kernel at stride 3
    (1, 4, 4, 2, 4, 2, 1),                     # 1-D, stride 4 > k = 2, groups: 2 <= 2 * 2
    (1, 2, 6, 4, 3, 1, 1),                     # 1-D CO with S < k: 6 = 2 * 3 (square)
    (1, 2, 8, 5, 3, 2, 1),                     # 1-D CO per group: 4 > 1 * 3, S = 3 <= 5
    (1, 3, 2, 6, 1, 1, 3),                     # 1-D, M < C at stride 1, even kernel, dilation 3
]


@pytest.mark.parametrize("d, C, M, k, S, g, D", EXPLICIT_CASES)
def test_explicit_methods_dense_operator_is_orthogonal_on_odd_and_even_grids(d, C, M, k, S, g, D):
    torch.manual_seed(C + 3 * M + 7 * g)
    layer = CLS[d](C, M, k, stride=S, groups=g, dilation=D, dtype=torch.float64, gain=1.25)
    ks, ss = layer.kernel_size, layer.stride
    ok, case = admitted(C // g, M // g, ks, ss)
    assert ok and layer.case == case
    assert layer.method == ("rko" if all(a <= b for a, b in zip(ks, ss)) else "bcop")
    with torch.no_grad():
        layer.bias.normal_()
    for factors in ((3, 4), (4, 3), (1, 5)):  # odd and even multiples of the stride, a grid of one block
        shape = layer_input_shape(layer, factors)
        A = forward_matrix(layer, shape)
        assert A.shape == (M * math.prod(n // s for n, s in zip(shape[1:], ss)), math.prod(shape))
        assert gram_error(A / 1.25, case) < 1e-10
        # the frozen layer is the same operator, and so is a plain circular conv with the layer's kernel
        x = torch.randn(2, *shape, dtype=torch.float64)
        with torch.no_grad():
            y = layer(x)
            torch.testing.assert_close(layer.to_conv()(x), y, rtol=0, atol=1e-12)
            if all(max(l, r) <= n for (l, r), n in zip(layer.pads, shape[1:])):  # nn.Conv wraps at most once
                torch.testing.assert_close(plain_circular_conv(layer)(x), y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("d", [1, 2])
def test_construction_succeeds_exactly_where_theorem_4_admits_it(d):
    # every small architecture, non-square kernels and strides included (2-D: k_i, S_i in 1..3)
    sizes = [(a,) for a in range(1, 5)] if d == 1 else list(itertools.product(range(1, 4), repeat=2))
    strides = [(a,) for a in range(1, 5)] if d == 1 else list(itertools.product(range(1, 4), repeat=2))
    checked = 0
    for k, S, (C, M) in itertools.product(sizes, strides, [(1, 1), (1, 3), (2, 1), (2, 5), (3, 8)]):
        ok, case = admitted(C, M, k, S)
        if not ok:
            with pytest.raises(ImpossibleLayerError, match="Theorem 4") as info:
                CLS[d](C, M, k, stride=S, bias=False)
            assert "Fix:" in str(info.value)
            continue
        layer = CLS[d](C, M, k, stride=S, bias=False)
        assert layer.case == case
        checked += 1
    assert checked > 10


@pytest.mark.parametrize("d, k, S, D", [(1, 3, 2, 2), (1, 2, 3, 2), (2, (3, 3), (2, 1), (2, 1)),
                                        (2, (1, 3), (2, 3), (1, 2))])
def test_dilation_in_a_strided_dimension_is_exactly_orthogonal(d, k, S, D):
    """These four were refused (dilation next to a stride in one dimension); each is admitted by Theorem 4 with
    dilation, so the layer and its nearest start from a plain conv are orthogonal: the forward's matrix on
    basis inputs has singular values 1 (row-orthogonal: 2 channels out of 2 read at most 2 residues)."""
    torch.manual_seed(0)
    n = 12
    shape = (2,) + (n,) * d
    layer = CLS[d](2, 2, k, stride=S, dilation=D, dtype=torch.float64)
    A = forward_matrix(layer, shape)
    assert A.shape[0] == 2 * math.prod(n // s for s in (S if isinstance(S, tuple) else (S,)))
    assert gram_error(A, "RO") < 1e-12
    conv = TORCH_CONV[d](2, 2, k, stride=S, dilation=D, padding="valid", dtype=torch.float64)
    near = CLS[d].from_conv(conv, padding="same")
    assert gram_error(forward_matrix(near, shape), "RO") < 1e-12


def test_auto_picks_rko_where_no_blocks_are_needed_and_rko_is_refused_elsewhere():
    torch.manual_seed(0)
    for d, C, M, k, S in [(2, 2, 4, (1, 2), (2, 2)), (2, 2, 7, 2, 3), (1, 3, 5, 1, 1), (1, 2, 3, 2, 3)]:
        auto = CLS[d](C, M, k, stride=S)
        assert auto.method == "rko" and auto.proj_a is None and auto.proj_b is None
        rko = CLS[d](C, M, k, stride=S, method="rko")
        assert {n for n, _ in rko.named_parameters()} == {"matrix", "bias"}
    for d, k, S in [(2, (2, 3), (2, 2)), (1, 3, 2), (2, (3, 1), 1)]:
        assert CLS[d](4, 4, k, stride=S).method == "bcop"
        with pytest.raises(LayerArgumentError, match="rko"):
            CLS[d](4, 4, k, stride=S, method="rko")


# ------------------------------------------------------------------------------------------- cayley_fft


CAYLEY_CASES = [  # d, C, M, k, S, input size, groups
    (2, 2, 3, 3, 1, (5, 6), 1),           # odd x even grid, RO
    (2, 3, 5, 2, 1, (7, 3), 1),           # odd x odd, even kernel, CO
    (2, 2, 4, 3, (2, 1), (6, 5), 1),      # non-square stride, odd second dimension, RO (4 <= 2 * 2)
    (2, 2, 6, (3, 1), (1, 3), (4, 9), 1),  # non-square kernel and stride, square operator
    (2, 4, 10, 3, (2, 1), (4, 3), 2),     # groups, CO per group (5 > 2 * 2)
    (2, 4, 4, 1, 2, (2, 4), 2),           # 1x1 strided with groups, a grid of one row of blocks
    (2, 1, 2, 1, 2, (4, 4), 1),           # strided shortcut M = 2C (no k x k kernel exists)
    (1, 2, 3, 1, 3, (9,), 1),             # 1-D stride > k
    (1, 2, 4, 2, 1, (7,), 2),             # 1-D odd grid, groups
    (1, 1, 5, 4, 2, (6,), 1),             # 1-D CO strided, even kernel
]


@pytest.mark.parametrize("d, C, M, k, S, n, g", CAYLEY_CASES)
def test_cayley_fft_dense_operator_and_frozen_forms(d, C, M, k, S, n, g):
    torch.manual_seed(C + M + sum(n))
    layer = CLS[d](C, M, k, stride=S, groups=g, method="cayley_fft", input_size=n, dtype=torch.float64, gain=0.5)
    with torch.no_grad():
        layer.bias.normal_()
    Mg, cp = M // g, (C // g) * math.prod(layer.stride)
    assert layer.case == ("RO" if Mg <= cp else "CO")
    A = forward_matrix(layer, (C, *n))
    assert gram_error(A / 0.5, layer.case) < 1e-12
    for frozen in (layer.to_conv(), layer.to_plain(), plain_circular_conv(layer)):
        torch.testing.assert_close(torch.from_numpy(forward_matrix(frozen, (C, *n))), torch.from_numpy(A),
                                   rtol=0, atol=1e-12)
    x = torch.randn(3, C, *n, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
        torch.testing.assert_close(layer.to_plain()(x), y, rtol=0, atol=1e-12)
        torch.testing.assert_close(plain_circular_conv(layer)(x), y, rtol=0, atol=1e-12)
    # float32: exact FFT singular values within 1e-5
    layer32 = CLS[d](C, M, k, stride=S, groups=g, method="cayley_fft", input_size=n)
    assert max_sigma_error(forward_matrix(layer32, (C, *n), torch.float32)) <= 1e-5


def test_cayley_fft_float32_build_stays_orthogonal_for_large_skew_parameters():
    # compute_dtype=float32: the complex64 solve alone is orthogonal only to eps * |A|, and |A| grows in training
    # (here scaled to ~800, reached after a few Adam steps at lr 0.1); the old code gave 4.7e-5
    torch.manual_seed(0)
    layer = OrthogonalConv2d(4, 16, 3, stride=2, method="cayley_fft", input_size=(6, 6),
                             compute_dtype=torch.float32, bias=False)
    with torch.no_grad():
        layer.cayley_kernel.mul_(300)
    assert max_sigma_error(forward_matrix(layer, (4, 6, 6), torch.float32)) <= 1e-5
    # and while training with float32 builds
    layer = OrthogonalConv1d(8, 8, 3, method="cayley_fft", input_size=8, compute_dtype=torch.float32)
    opt = torch.optim.Adam(layer.parameters(), lr=0.3)
    for _ in range(5):
        loss = layer(torch.randn(4, 8, 8)).sin().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert max_sigma_error(forward_matrix(layer, (8, 8), torch.float32)) <= 1e-5


# ------------------------------------------------------------------------------------------- gradients, training


def _gradcheck_layers():
    f64 = dict(dtype=torch.float64)
    return [
        ("bcop-nonsquare", lambda: OrthogonalConv2d(2, 3, (2, 3), stride=(1, 2), **f64)),
        ("bcop-embed", lambda: OrthogonalConv2d(2, 5, 2, **f64)),
        ("bcop-dilated-groups", lambda: OrthogonalConv2d(4, 4, 3, stride=(2, 1), groups=2, dilation=(1, 2), **f64)),
        ("rko-1d-k<S", lambda: OrthogonalConv1d(2, 3, 2, stride=3, **f64)),
        ("bcop-1d-gain", lambda: OrthogonalConv1d(3, 3, 4, gain=1.3, **f64)),
        ("cayley-strided", lambda: OrthogonalConv2d(2, 4, 3, stride=2, method="cayley_fft", input_size=(4, 6), **f64)),
        ("cayley-1d-groups", lambda: OrthogonalConv1d(2, 4, 2, groups=2, method="cayley_fft", input_size=5, **f64)),
        ("linear-CO", lambda: OrthogonalLinear(3, 5, **f64)),
        ("linear-RO-nobias", lambda: OrthogonalLinear(5, 3, bias=False, **f64)),
    ]


@pytest.mark.parametrize("name, make", _gradcheck_layers(), ids=[n for n, _ in _gradcheck_layers()])
def test_gradients_match_finite_differences_in_float64(name, make):
    torch.manual_seed(1)
    layer = make()
    if isinstance(layer, OrthogonalLinear):
        x = torch.randn(2, layer.in_features, dtype=torch.float64)
    else:
        x = torch.randn(2, *layer_input_shape(layer, (2, 2)), dtype=torch.float64)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in layer.parameters())

    def f(*ps):
        return functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("make", [
    lambda: OrthogonalConv2d(4, 6, 3, stride=(2, 1), groups=2, method="cayley_fft", input_size=(6, 5)),
    lambda: OrthogonalConv1d(4, 6, 2, stride=3),
    lambda: OrthogonalConv2d(4, 6, (3, 2), stride=(1, 2), dilation=(2, 1), groups=2),
    lambda: OrthogonalConv2d(2, 8, (3, 4), stride=(2, 3)),
    lambda: OrthogonalConv1d(3, 7, 4, compute_dtype=torch.float32),
], ids=["cayley-groups", "rko-1d", "bcop-dilated", "bcop-CO-nonsquare", "bcop-1d-cd32"])
def test_adam_steps_reach_every_parameter_and_keep_sigma(make):
    torch.manual_seed(2)
    layer = make()
    # grids of 3 blocks: on a grid of 2 a dilation of 2 folds all taps onto one pixel, where the block
    # product sums to the identity and the projectors' gradients vanish (correctly)
    shape = layer_input_shape(layer, (3, 3))
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(4):
        loss = layer(torch.randn(3, *shape)).sin().sum()
        opt.zero_grad()
        loss.backward()
        for name, p in layer.named_parameters():
            assert p.grad is not None and bool(torch.isfinite(p.grad).all()) and float(p.grad.abs().sum()) > 0, name
        opt.step()
        assert max_sigma_error(forward_matrix(layer, shape, torch.float32)) <= 1e-5


# ------------------------------------------------------------------------------------------- input corners


@pytest.mark.parametrize("make", [
    lambda: OrthogonalConv2d(4, 6, 3, stride=2),
    lambda: OrthogonalConv1d(2, 4, 2, stride=3, padding_mode="zeros"),
    lambda: OrthogonalConv2d(4, 6, 3, stride=(2, 1), method="cayley_fft", input_size=(6, 5)),
    lambda: OrthogonalConv1d(4, 2, 3, method="cayley_fft", input_size=5).to_plain(),
], ids=["bcop", "rko-zeros", "cayley", "fourier-conv"])
def test_empty_batch_gives_an_empty_output_like_nn_conv(make):
    layer = make()
    d = len(layer.input_size) if getattr(layer, "input_size", None) else layer._dims
    size = layer.input_size if getattr(layer, "input_size", None) else (6,) * d
    y = layer(torch.randn(0, layer.in_channels, *size))
    stride = layer.stride
    assert y.shape == (0, layer.out_channels, *(n // s for n, s in zip(size, stride)))
    y.sum().backward()  # zero gradients, as nn.Conv's on an empty batch
    for p in layer.parameters():
        assert p.grad is None or float(p.grad.abs().sum()) == 0


@pytest.mark.parametrize("kwargs, size", [
    (dict(kernel_size=3, padding="valid"), (2, 6)),
    (dict(kernel_size=4, stride=2), (1, 6)),                  # "same" at stride 2 on a map smaller than the stride
    (dict(kernel_size=3, dilation=3, padding=1), (4, 4)),     # dilated extent 7 > 4 + 2
    (dict(kernel_size=(1, 3), padding="valid", padding_mode="zeros"), (5, 2)),
])
def test_too_small_inputs_raise_a_layer_argument_error(kwargs, size):
    layer = OrthogonalConv2d(2, 2, **kwargs)
    with pytest.raises(LayerArgumentError, match="too small") as info:
        layer(torch.randn(1, 2, *size))
    assert "OrthogonalConv2d" in str(info.value) and "Use inputs of spatial size" in str(info.value)


# ------------------------------------------------------------------------------------------- from_conv


@pytest.mark.parametrize("d, C, M, k, S, g", [(1, 4, 6, 2, 3, 1), (2, 4, 6, (2, 3), (2, 3), 2), (1, 4, 4, 1, 2, 2),
                                              (2, 3, 6, (1, 2), (2, 2), 1)])
def test_from_conv_nearest_rko_is_the_polar_factor_of_the_reshaped_kernel(d, C, M, k, S, g):
    torch.manual_seed(3)
    conv = TORCH_CONV[d](C, M, k, stride=S, groups=g)
    layer = CLS[d].from_conv(conv)
    assert layer.method == "rko"
    W0 = conv.weight.detach().double().reshape(g, M // g, -1).numpy()
    expected = np.stack([u @ vh for u, _, vh in (np.linalg.svd(w, full_matrices=False) for w in W0)])
    got = layer.weight.detach().double().reshape(g, M // g, -1).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    assert layer.init_error == pytest.approx(
        float(np.linalg.norm(expected - W0) / np.linalg.norm(W0)), abs=1e-6)
    torch.testing.assert_close(layer.bias, conv.bias)
    for _ in range(3):
        assert layer.init_error <= CLS[d].from_conv(conv, init="random").init_error + 1e-9


@pytest.mark.parametrize("conv, kwargs", [
    (nn.Conv2d(4, 4, 3, stride=(2, 1), dilation=(1, 2), groups=2, padding=(1, 2)), {}),
    (nn.Conv1d(3, 5, 4, stride=2, bias=False), dict(compute_dtype=torch.float32)),
    (nn.Conv2d(4, 8, 3, stride=2, padding=1).to(torch.bfloat16), {}),
    (nn.Conv2d(4, 6, (3, 1), stride=(2, 1), padding=(1, 0)), dict(method="cayley_fft", input_size=(6, 5))),
], ids=["dilated-groups", "1d-cd32-nobias", "bf16", "cayley-nonsquare"])
def test_from_conv_corner_configs_are_orthogonal_and_keep_dtype_bias_mode(conv, kwargs):
    torch.manual_seed(4)
    conv.eval()
    d = conv.weight.dim() - 2
    near = CLS[d].from_conv(conv, fit_steps=5, **kwargs)
    rand = CLS[d].from_conv(conv, init="random", **kwargs)
    for layer in (near, rand):
        assert layer.weight.dtype == conv.weight.dtype and not layer.training
        assert (layer.bias is None) == (conv.bias is None)
        if conv.bias is not None:
            torch.testing.assert_close(layer.bias, conv.bias)
        shape = layer_input_shape(layer, (2, 3))
        if conv.weight.dtype == torch.bfloat16:  # orthogonal to bfloat16 rounding of the kernel
            assert max_sigma_error(forward_matrix(layer.float(), shape, torch.float32)) <= 2e-2
        else:
            assert max_sigma_error(forward_matrix(layer, shape, torch.float32)) <= 1e-5
    assert near.init_error < rand.init_error


# ------------------------------------------------------------------------------------------- dtypes, copies


def _layers():
    return [
        ("bcop", lambda **kw: OrthogonalConv2d(4, 6, 3, stride=2, **kw)),
        ("rko-nobias", lambda **kw: OrthogonalConv2d(4, 6, 2, stride=2, bias=False, **kw)),
        ("embed-1d", lambda **kw: OrthogonalConv1d(2, 5, 3, **kw)),
        ("cayley", lambda **kw: OrthogonalConv2d(4, 6, 3, stride=2, method="cayley_fft", input_size=(6, 4), **kw)),
        ("linear", lambda **kw: OrthogonalLinear(6, 4, **kw)),
    ]


def _input(layer, dtype, batch=3):
    if isinstance(layer, OrthogonalLinear):
        return torch.randn(batch, layer.in_features, dtype=dtype)
    return torch.randn(batch, *layer_input_shape(layer, (3, 2)), dtype=dtype)


@pytest.mark.parametrize("name, make", _layers(), ids=[n for n, _ in _layers()])
def test_copies_state_dict_across_dtypes_and_to_dtype(name, make):
    torch.manual_seed(5)
    layer = make().eval()
    x = _input(layer, torch.float32)
    with torch.no_grad():
        y = layer(x)  # fills the eval cache
        for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            assert "_eval_cache" not in other.__dict__
            torch.testing.assert_close(other(x), y, rtol=0, atol=0)
        wide = make(dtype=torch.float64)
        wide.load_state_dict(layer.state_dict())   # float32 -> float64 parameters
        torch.testing.assert_close(wide.eval()(x.double()), y.double(), rtol=0, atol=1e-6)
        layer.to(torch.float64)                    # .to(dtype) rebuilds in the new dtype (the cache key changes)
        y64 = layer(x.double())
        assert y64.dtype == torch.float64
        torch.testing.assert_close(y64, y.double(), rtol=0, atol=1e-6)
        back = make()
        back.load_state_dict(layer.state_dict())   # float64 -> float32
        torch.testing.assert_close(back.eval()(x), y, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name, make", _layers(), ids=[n for n, _ in _layers()])
def test_bfloat16_parameters_forward_backward_and_freeze(name, make):
    torch.manual_seed(6)
    layer = make(dtype=torch.bfloat16)
    x = _input(layer, torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16 and bool(torch.isfinite(p.grad).all()), pname
    reference = copy.deepcopy(layer).double()(x.double())   # same parameters, built and applied in float64
    assert float((y.double() - reference).abs().max() / reference.abs().max()) < 2e-2
    frozen = layer.to_plain()
    assert not isinstance(frozen, (OrthogonalConv1d, OrthogonalConv2d, OrthogonalLinear))
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), y.detach(), rtol=0, atol=0)


def test_freeze_of_a_transformed_model_with_corner_layers_matches_it():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, stride=(2, 1), padding=1, groups=2), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, dilation=(1, 2), padding=(1, 2), groups=4), nn.ReLU(),
                          nn.Conv2d(8, 16, (2, 1), stride=(2, 1)), nn.ReLU(),
                          nn.Conv2d(16, 16, 1, groups=2)).double()
    x = torch.randn(2, 4, 8, 6, dtype=torch.float64)
    policy = {"rules": [{"match": {"type": "Conv2d"}, "apply": "orthogonal_conv"}]}
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    layers = [m for m in gm.modules() if isinstance(m, OrthogonalConv2d)]
    assert [m.method for m in layers] == ["bcop", "bcop", "rko", "rko"]
    frozen = orthofx.freeze(gm)
    assert not any(isinstance(m, OrthogonalConv2d) for m in frozen.modules())
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), gm.eval()(x), rtol=0, atol=1e-12)
    cayley = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2), nn.ReLU(),
                           nn.Conv2d(8, 12, 3, stride=(1, 2), padding=1)).double()
    policy = {"rules": [{"match": {"type": "Conv2d"}, "apply": "orthogonal_conv", "with": {"method": "cayley_fft"}}]}
    x = torch.randn(2, 4, 8, 12, dtype=torch.float64)
    gm = orthofx.transform(cayley, policy, example_inputs=(x,))
    frozen = orthofx.freeze(gm)
    assert sum(isinstance(m, FourierConv) for m in frozen.modules()) == 2
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), gm.eval()(x), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------- one channel per group


ONE_CHANNEL_CASES = [  # d, C, M, k, S, groups, dilation: one input channel per group (n = 1), k - S + 1 >= 3
    (1, 1, 2, 4, 2, 1, 1),                 # strided RO 1 -> 2: blocks a (delay), b (identity)
    (1, 2, 2, 5, 2, 2, 1),                 # groups == channels, strided: blocks a, b, a
    (1, 1, 2, 5, 2, 1, 3),                 # dilation 3 next to stride 2
    (1, 1, 1, 6, 3, 1, 1),                 # 1 -> 1 at stride 3 (the matrix is 1 x 3)
    (2, 1, 3, (3, 4), (1, 2), 1, 1),       # CO, strided in one dimension only
    (2, 3, 6, (2, 4), 2, 3, 1),            # groups, blocks in one dimension only
]


@pytest.mark.parametrize("d, C, M, k, S, g, D", ONE_CHANNEL_CASES)
def test_one_channel_per_group_every_parameter_gets_a_gradient_and_sigma_stays_1(d, C, M, k, S, g, D):
    """With one channel per group a rank-1 projector is the identity whatever its 1 x 1 basis: the layer registers
    no parameter for it (it would never receive a gradient), every parameter it has gets one, and the dense
    operator stays orthogonal."""
    torch.manual_seed(C + 5 * M + 11 * D)
    layer = CLS[d](C, M, k, stride=S, groups=g, dilation=D, dtype=torch.float64)
    assert layer.method == "bcop"
    shape = layer_input_shape(layer, (3, 3))
    y = layer(torch.randn(2, *shape, dtype=torch.float64))
    (y * torch.randn_like(y)).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and float(p.grad.abs().max()) > 1e-8, name
    ok, case = admitted(C // g, M // g, layer.kernel_size, layer.stride)
    assert ok and layer.case == case
    assert gram_error(forward_matrix(layer, shape), case) < 1e-10
    fresh = CLS[d](C, M, k, stride=S, groups=g, dilation=D, dtype=torch.float64)
    fresh.load_state_dict(layer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.weight, layer.weight, rtol=0, atol=0)


@pytest.mark.parametrize("d, k", [(1, 3), (1, 6), (2, (3, 5))])
def test_depthwise_stride_1_kernel_is_a_signed_tap_without_block_parameters(d, k):
    """Depthwise at stride 1 (1 -> 1 per group): the blocks alternate a delay (rank 0) and the identity (rank 1),
    so each channel's kernel is the sign of its 1 x 1 matrix at tap (k - 1) - (k - 1) // 2 (the delays), and no
    block parameter exists. A state_dict that still holds the old, dead proj_b loads (strictly)."""
    torch.manual_seed(4)
    layer = CLS[d](4, 4, k, groups=4, dtype=torch.float64)
    assert {name for name, _ in layer.named_parameters()} == {"matrix", "bias"}
    ks = layer.kernel_size
    expected = torch.zeros(4, 1, *ks, dtype=torch.float64)
    tap = tuple((kk - 1) - (kk - 1) // 2 for kk in ks)
    expected[(slice(None), 0) + tap] = torch.sign(layer.matrix.detach().reshape(4))
    with torch.no_grad():
        torch.testing.assert_close(layer.weight, expected, rtol=0, atol=1e-15)
    assert max_sigma_error(forward_matrix(layer, layer_input_shape(layer, (3, 4)))) < 1e-12
    legacy = dict(layer.state_dict())
    legacy["proj_b"] = torch.randn(4, sum((kk - 1) // 2 for kk in ks), 1, 1, dtype=torch.float64)
    fresh = CLS[d](4, 4, k, groups=4, dtype=torch.float64)
    fresh.load_state_dict(legacy)
    with torch.no_grad():
        torch.testing.assert_close(fresh.weight, expected, rtol=0, atol=1e-15)
