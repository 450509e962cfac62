"""ConvNorm (P3) review, session 38: the layer against a dense float64 *operator* reference, and the regressions it
found.

The reference (:func:`reference`) builds, for each output channel ``m``, the circular row operator
``A_m = [A_{m,1} ... A_{m,C}]`` of the dilated kernel on the FFT grid ``L`` (``Q = max(p, k_e - 1)`` per side, the
padded input for non-zero padding modes) as a dense float64 matrix from shift matrices, with no convolution and no
FFT, and normalises it by the matrix function ``(A_m A_m^T + eps I)^(-1/2)`` of the *detached* operator (``eigh``),
which is what ``V_m(w) = (sum_c |K_hat_{m,c}(w)|^2 + eps)^(-1/2)`` is in the Fourier basis. Outputs are the rows at
``Q_l - p_l + S i``; the bias follows. Autograd through it gives the reference gradients (the filter carries none).
A running filter is the exponential average of those matrices; the report's ``row_gain_min`` / ``_max`` are the
extreme singular values of the ``A_m``.

Findings fixed here: a conv keeping a one-element ``stride`` / ``dilation`` tuple (``nn.Conv2d(..., stride=(2,))``,
which torch applies to every dimension) was refused by every ConvNorm forward; an int ``padding`` set on the conv
after construction made ``to_plain`` / ``orthofx.freeze`` fail with a raw ``TypeError``.
"""

from __future__ import annotations

import copy
import io
import itertools
import math
import random

import pytest
import torch
from torch import nn

import orthofx
from orthofx.nn.convnorm import conv_norm, with_convnorm
from references import padded_source

pytestmark = pytest.mark.usefixtures("one_thread")

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


# ------------------------------------------------------------------------------------------------ reference

def _per_dim(value, d):
    if isinstance(value, int):
        return (value,) * d
    value = tuple(value)
    return value * d if len(value) == 1 else value


def _pads(padding, kernel, dilation):
    if padding == "valid":
        return [(0, 0)] * len(kernel)
    if padding == "same":
        return [(dl * (k - 1) // 2, dl * (k - 1) - dl * (k - 1) // 2) for k, dl in zip(kernel, dilation)]
    return [(p, p) for p in _per_dim(padding, len(kernel))]


def _pad_by_index(x, pads, mode):
    for axis, (left, right) in enumerate(pads, start=2):
        n = x.shape[axis]
        x = x.index_select(axis, torch.tensor([padded_source(i, n, mode) for i in range(-left, n + right)]))
    return x


def _geometry(size, kernel, stride, pads, dilation):
    """``(Q_l, grid, first output, output size)`` per dimension, written out from P3's construction."""
    out = []
    for n, k, s, (pl, pr), dl in zip(size, kernel, stride, pads, dilation):
        ke = dl * (k - 1) + 1
        ql, qr = max(pl, ke - 1), max(pr, ke - 1)
        out.append((ql, n + ql + qr - ke + 1, ql - pl, (n + pl + pr - ke) // s + 1))
    return [list(v) for v in zip(*out)]


def _operator(weight, grid, dilation):
    """``(M, G, C_g, G)``: row ``g`` of ``A_{m,c}`` holds ``K[m, c, t]`` at column ``g + D t (mod L)``."""
    kernel = tuple(weight.shape[2:])
    positions = list(itertools.product(*[range(n) for n in grid]))
    taps = list(itertools.product(*[range(k) for k in kernel]))
    shift = torch.zeros(len(taps), len(positions), len(positions), dtype=torch.float64)
    for ti, tap in enumerate(taps):
        for g, pos in enumerate(positions):
            h = 0
            for p, t, dl, n in zip(pos, tap, dilation, grid):
                h = h * n + (p + dl * t) % n
            shift[ti, g, h] = 1.0
    return torch.einsum("mct,tgh->mgch", weight.flatten(2).to(torch.float64), shift)


def inverse_sqrt_gram(weight, grid, dilation, eps):
    """``(A_m A_m^T + eps I)^(-1/2)`` per channel ``(M, G, G)`` and the eigenvalues of ``A_m A_m^T``."""
    a = _operator(weight.detach(), grid, _per_dim(dilation, weight.ndim - 2))
    a = a.reshape(a.shape[0], a.shape[1], -1)
    lam, u = torch.linalg.eigh(a @ a.mT)
    lam = lam.clamp_min(0)
    return u @ torch.diag_embed((lam + eps) ** -0.5) @ u.mT, lam


def reference_grid(size, weight, stride, padding, dilation, padding_mode):
    d = weight.ndim - 2
    kernel, stride, dilation = tuple(weight.shape[2:]), _per_dim(stride, d), _per_dim(dilation, d)
    pads = _pads(padding, kernel, dilation)
    if padding_mode != "zeros":
        size, pads = [n + a + b for n, (a, b) in zip(size, pads)], [(0, 0)] * d
    return tuple(_geometry(size, kernel, stride, pads, dilation)[1])


def reference(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros", eps=1e-5,
              filters=None):
    """ConvNorm of the conv, float64, differentiable in ``x``, ``weight`` and ``bias``; ``filters`` ``(M, G, G)``
    replaces ``(A A^T + eps)^(-1/2)`` (a running filter)."""
    d = weight.ndim - 2
    kernel, stride, dilation = tuple(weight.shape[2:]), _per_dim(stride, d), _per_dim(dilation, d)
    x = x.to(torch.float64)
    pads = _pads(padding, kernel, dilation)
    if padding_mode != "zeros":
        x, pads = _pad_by_index(x, pads, padding_mode), [(0, 0)] * d
    size = tuple(x.shape[2:])
    ql, grid, start, out = _geometry(size, kernel, stride, pads, dilation)
    u = x.new_zeros(tuple(x.shape[:2]) + tuple(grid))
    u[(slice(None), slice(None)) + tuple(slice(a, a + n) for a, n in zip(ql, size))] = x
    g = math.prod(grid)
    a = _operator(weight, grid, dilation)
    m_out, c_g = weight.shape[:2]
    norm = inverse_sqrt_gram(weight, grid, dilation, eps)[0] if filters is None else filters
    per_group = m_out // groups
    rows = []
    for m in range(m_out):
        block = u[:, (m // per_group) * c_g:(m // per_group + 1) * c_g].reshape(u.shape[0], c_g * g)
        rows.append(block @ (norm[m] @ a[m].reshape(g, c_g * g)).mT)
    f = torch.stack(rows, 1).reshape((u.shape[0], m_out) + tuple(grid))
    y = f[(slice(None), slice(None)) + tuple(slice(st, st + s * (o - 1) + 1, s)
                                             for st, s, o in zip(start, stride, out))]
    return y if bias is None else y + bias.to(torch.float64).view((1, -1) + (1,) * d)


def layer_reference(layer, x, filters=None):
    conv = layer.conv
    return reference(x, conv.weight.detach(), None if conv.bias is None else conv.bias.detach(), conv.stride,
                     conv.padding, conv.dilation, conv.groups, conv.padding_mode, layer.eps, filters)


def assert_close(got, expected, rtol=1e-9):
    err = (got.double() - expected).abs().max().item()
    assert err <= rtol * max(1.0, expected.abs().max().item()), err


# ------------------------------------------------------------------------------------------------ fuzz

def random_case(seed: int):
    """A conv torch's own layer runs, and an input for it: 1-d / 2-d / 3-d, 1 x k and k x 1, even kernels,
    dilation, stride 2 / 3 with sizes not divisible by it, groups and depthwise, all padding modes, 'same',
    bias, eps."""
    rng = random.Random(seed)
    while True:
        d = rng.choice([1, 2, 2, 2, 3])
        kernel = tuple(rng.choice([1, 2, 3, 4] if d < 3 else [1, 2]) for _ in range(d))
        if d == 2 and rng.random() < 0.4:
            kernel = rng.choice([(1, rng.choice([2, 3, 4])), (rng.choice([2, 3, 4]), 1)])
        dilation = tuple(rng.choice([1, 1, 2, 3] if d < 3 else [1, 2]) for _ in range(d))
        if rng.random() < 0.2:
            padding, stride = "same", (1,) * d
        else:
            stride = tuple(rng.choice([1, 2, 3]) for _ in range(d))
            padding = rng.choice(["valid", tuple(rng.choice([0, 1, 2, 3]) for _ in range(d))])
        kind = rng.choice(["plain", "groups", "depthwise"])
        c_in, c_out, groups = rng.choice([1, 2, 3]), rng.choice([1, 2, 3]), 1
        if kind == "groups":
            c_in, c_out, groups = 2 * rng.choice([1, 2]), 2 * rng.choice([1, 2]), 2
        elif kind == "depthwise":
            c_out, groups = c_in * rng.choice([1, 2]), c_in
        size = tuple(rng.randint(max(2, dl * (k - 1) + 1), dl * (k - 1) + (6 if d < 3 else 3))
                     for k, dl in zip(kernel, dilation))
        conv = CONV[d](c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                       bias=rng.random() < 0.5, padding_mode=rng.choice(["zeros", "zeros", "circular", "reflect",
                                                                          "replicate"]))
        torch.manual_seed(seed)
        x = torch.randn((2, c_in) + size)
        try:
            expected_shape = conv(x).shape
        except (RuntimeError, NotImplementedError):
            continue  # a conv torch refuses (reflect / circular padding wider than the input)
        return conv, x, expected_shape, rng.choice([1e-5, 1e-2, 0.5]), rng.random() < 0.3


@pytest.mark.parametrize("seed", range(24))
def test_train_eval_frozen_outputs_and_gradients_match_the_dense_operator(seed):
    conv, x, shape, eps, affine = random_case(seed)
    conv, x = conv.double(), x.double().requires_grad_(True)
    layer = with_convnorm(conv, eps=eps, affine=affine)
    if affine:
        with torch.no_grad():
            layer.affine.weight.normal_()
            layer.affine.bias.normal_()
    y = layer(x)
    assert y.shape == shape
    w = conv.weight.detach().clone().requires_grad_(True)
    b = None if conv.bias is None else conv.bias.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    expected = reference(xr, w, b, conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode, eps)
    if affine:
        expected = layer.affine(expected)
    assert_close(y, expected)
    probe = torch.randn_like(y)
    (y * probe).sum().backward()
    (expected * probe).sum().backward()
    assert_close(x.grad, xr.grad)
    assert_close(conv.weight.grad, w.grad)
    if b is not None:
        assert_close(conv.bias.grad, b.grad)
    layer.eval()
    with torch.no_grad():
        first, kept = layer(x), layer(x)
    assert_close(first, expected)
    assert torch.equal(first, kept)
    with torch.no_grad():
        assert_close(orthofx.freeze(nn.Sequential(layer))(x), expected)


@pytest.mark.parametrize("seed", range(100, 108))
def test_report_gain_figures_and_float32_outputs_match_the_dense_operator(seed):
    conv, x, _, eps, _ = random_case(seed)
    gm = orthofx.transform(nn.Sequential(conv), {"orthofx": 1, "rules": [
        {"name": "cn", "match": {"type": type(conv).__name__}, "apply": "convnorm", "with": {"eps": eps}}]},
        example_inputs=(x,))
    change = gm.meta["orthofx"].changes[0]
    grid = reference_grid(x.shape[2:], conv.weight, conv.stride, conv.padding, conv.dilation, conv.padding_mode)
    lam = inverse_sqrt_gram(conv.weight.double(), grid, conv.dilation, eps)[1]
    low, high = lam.min().sqrt().item(), lam.max().sqrt().item()
    assert change.before["grid"] == list(grid)
    assert change.before["row_gain_min"] == pytest.approx(low, rel=1e-5, abs=1e-6 * high)
    assert change.before["row_gain_max"] == pytest.approx(high, rel=1e-5)
    for before, gain in [("row_gain_min", low), ("row_gain_max", high)]:
        assert change.after[before] == pytest.approx((gain ** 2 / (gain ** 2 + eps)) ** 0.5, rel=1e-5, abs=1e-6)
    layer = gm.get_submodule("0")
    expected = layer_reference(layer, x)
    tol = 2e-5 * (1 + (1e-2 / eps) ** 0.5)
    assert_close(layer.train()(x), expected, tol)
    with torch.no_grad():
        assert_close(layer.eval()(x), expected, tol)


@pytest.mark.parametrize("d", [1, 2])
def test_running_filters_per_input_size_are_the_average_of_dense_inverse_square_roots(d):
    torch.manual_seed(d)
    if d == 1:
        conv = nn.Conv1d(3, 4, 4, stride=3, padding=2, dilation=2, padding_mode="replicate")
        sizes, unseen = [(9,), (10,), (9,), (9,), (10,)], (11,)
    else:
        conv = nn.Conv2d(3, 4, (1, 3), stride=(2, 1), padding=(0, 2), dilation=(1, 2))
        sizes, unseen = [(5, 7), (6, 6), (5, 7), (5, 7), (6, 6)], (7, 5)
    layer = with_convnorm(conv.double(), eps=1e-3, momentum=0.3)
    running = {}
    for size in sizes:
        grid = reference_grid(size, conv.weight, conv.stride, conv.padding, conv.dilation, conv.padding_mode)
        v = inverse_sqrt_gram(conv.weight, grid, conv.dilation, layer.eps)[0]
        running[size] = v if size not in running else 0.7 * running[size] + 0.3 * v
        x = torch.randn((2, 3) + size, dtype=torch.float64)
        y = layer(x)
        assert_close(y, layer_reference(layer, x))
        y.square().sum().backward()
        with torch.no_grad():
            for p in layer.parameters():
                p -= 0.05 * p.grad
                p.grad = None
    layer.eval()
    inputs = {size: torch.randn((2, 3) + size, dtype=torch.float64) for size in (sizes[0], sizes[1], unseen)}
    outputs = {}
    for size, x in inputs.items():
        # eval with gradients: the running filter is a constant; a size never trained on uses V of the weight
        x = x.clone().requires_grad_(True)
        y = layer(x)
        w = conv.weight.detach().clone().requires_grad_(True)
        xr = x.detach().clone().requires_grad_(True)
        expected = reference(xr, w, conv.bias.detach(), conv.stride, conv.padding, conv.dilation, 1,
                             conv.padding_mode, layer.eps, running.get(size))
        assert_close(y, expected)
        y.sum().backward()
        expected.sum().backward()
        assert_close(x.grad, xr.grad)
        assert_close(conv.weight.grad, w.grad)
        conv.weight.grad = None
        with torch.no_grad():
            outputs[size] = layer(inputs[size])
        assert_close(outputs[size], expected)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    loaded = with_convnorm(copy.deepcopy(conv), eps=1e-3, momentum=0.3).eval()
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    frozen = orthofx.freeze(nn.Sequential(layer))
    with torch.no_grad():
        for size, x in inputs.items():
            assert torch.equal(loaded(x), outputs[size])
            assert_close(frozen(x), outputs[size], 1e-12)


def _change_sgd(layer, x):
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).square().sum().backward()  # eval mode, with gradients
    with torch.no_grad():
        layer(x)  # kept again between backward and step
    optimizer.step()


def _change_fused_adam(layer, x):
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1, fused=True)
    for p in layer.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()


def _change_load_layer(layer, x):
    layer.load_state_dict({k: v + 0.3 for k, v in layer.state_dict().items()})


def _change_load_conv(layer, x):
    layer.conv.load_state_dict({k: v * 1.7 - 0.1 for k, v in layer.conv.state_dict().items()})


def _change_load_assign(layer, x):
    parent = nn.Sequential(layer)
    parent.load_state_dict({k: v - 0.2 for k, v in parent.state_dict().items()}, assign=True)


def _change_data_assign(layer, x):
    layer.conv.weight.data = layer.conv.weight.data * 2 + 0.1


def _change_data_copy_then_eval(layer, x):
    layer.conv.weight.data.copy_(torch.randn_like(layer.conv.weight))  # bumps no version counter
    nn.Sequential(layer).eval()


def _change_in_place(layer, x):
    with torch.no_grad():
        layer.conv.weight.mul_(1.3).add_(0.05)


def _change_float_and_back(layer, x):
    layer.float()
    with torch.no_grad():
        layer(x.float())
        layer.conv.weight.add_(0.1)
    layer.double()


def _change_vector_to_parameters(layer, x):
    count = sum(p.numel() for p in layer.parameters())
    torch.nn.utils.vector_to_parameters(torch.randn(count, dtype=torch.float64), layer.parameters())


def _change_new_parameter(layer, x):
    layer.conv.weight = nn.Parameter(torch.randn_like(layer.conv.weight))


def _change_eps(layer, x):
    layer.eps = 0.3


def _change_dilation(layer, x):
    layer.conv.dilation = (1, 2)


CHANGES = [_change_sgd, _change_fused_adam, _change_load_layer, _change_load_conv, _change_load_assign,
           _change_data_assign, _change_data_copy_then_eval, _change_in_place, _change_float_and_back,
           _change_vector_to_parameters, _change_new_parameter, _change_eps, _change_dilation]


@pytest.mark.parametrize("kernel", [(3, 3), (1, 1), (1, 4)])
@pytest.mark.parametrize("change", CHANGES, ids=[c.__name__[len("_change_"):] for c in CHANGES])
def test_kept_eval_filter_follows_every_weight_change(kernel, change):
    torch.manual_seed(0)
    layer = with_convnorm(nn.Conv2d(3, 4, kernel, padding=1).double()).eval()
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    with torch.no_grad():
        before = layer(x)
        assert torch.equal(layer(x), before)  # the kept filter (or one-tap scale)
    change(layer, x)
    with torch.no_grad():
        after = layer(x)
    assert_close(after, layer_reference(layer, x))
    if not (change is _change_dilation and kernel == (1, 1)):  # a single tap has no spacing
        assert after.shape != before.shape or not torch.allclose(after, before)


@pytest.mark.parametrize("kernel", [(3, 3), (1, 1)])
def test_kept_eval_filter_is_not_used_for_functional_call_weights(kernel):
    torch.manual_seed(1)
    layer = with_convnorm(nn.Conv2d(3, 4, kernel, padding=1).double()).eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    other = copy.deepcopy(layer)
    with torch.no_grad():
        other.conv.weight.normal_()
        layer(x)
        got = torch.func.functional_call(layer, {"conv.weight": other.conv.weight}, (x,))
        assert_close(got, layer_reference(other, x))
        assert_close(layer(x), layer_reference(layer, x))


def test_double_backward_matches_the_dense_operator():
    # a gradient penalty (P3's GAN use) differentiates the input gradient again, through V's constant filter
    torch.manual_seed(2)
    for kernel, mode in [((1, 3), "circular"), (2, "reflect"), (1, "zeros")]:
        conv = nn.Conv2d(3, 4, kernel, padding=1, stride=2, padding_mode=mode).double()
        layer = with_convnorm(conv)
        x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
        w = conv.weight.detach().clone().requires_grad_(True)

        def penalty(fn):
            grad, = torch.autograd.grad(fn(x).square().sum(), x, create_graph=True)
            return grad.square().sum()

        got = penalty(layer)
        expected = penalty(lambda t: reference(t, w, conv.bias.detach(), 2, 1, 1, 1, mode))
        assert_close(got, expected)
        assert_close(torch.autograd.grad(got, conv.weight)[0], torch.autograd.grad(expected, w)[0], 1e-8)


# ------------------------------------------------------------------------------------------------ regressions

@pytest.mark.parametrize("d, kernel, settings", [
    (2, 3, dict(stride=(2,))),
    (2, 3, dict(dilation=(2,), padding="same")),
    (2, (1, 3), dict(stride=(2,), dilation=(2,), padding=(2,))),
    (2, 1, dict(stride=(3,), dilation=(2,), padding=(1,))),
    (3, 2, dict(stride=(2,), dilation=(2,), padding=1, padding_mode="replicate")),
])
def test_one_element_stride_and_dilation_apply_to_every_dimension(d, kernel, settings):
    # torch's convs keep stride=(2,) as given and apply it to every dimension; every ConvNorm forward refused it
    # ("stride must be an int or 2 ints, got (2,)")
    torch.manual_seed(3)
    conv = CONV[d](2, 3, kernel, **settings).double()
    x = torch.randn((2, 2) + (7 if d < 3 else 3,) * d, dtype=torch.float64)
    expected = layer_reference(with_convnorm(copy.deepcopy(conv)), x)
    layer = with_convnorm(conv)
    y = layer(x)
    assert y.shape == conv(x).shape == expected.shape
    assert_close(y, expected)
    assert_close(conv_norm(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                           padding_mode=conv.padding_mode), expected)
    layer.eval()
    with torch.no_grad():
        assert_close(layer(x), expected)
        assert_close(orthofx.freeze(nn.Sequential(layer))(x), expected)


@pytest.mark.parametrize("kernel", [3, 1])
@pytest.mark.parametrize("padding_mode", ["zeros", "replicate"])
def test_int_padding_set_on_the_conv_after_construction_freezes(kernel, padding_mode):
    # the conv and the layer take conv.padding = 1; to_plain raised "TypeError: 'int' object is not iterable"
    torch.manual_seed(4)
    # torch's non-zeros modes pad by the list built with the layer, not by conv.padding (which zeros mode reads):
    # built with padding=1 there, so that torch's layer pads as conv.padding = 1 says
    conv = nn.Conv2d(2, 3, kernel, padding=0 if padding_mode == "zeros" else 1, padding_mode=padding_mode).double()
    conv.padding = 1
    layer = with_convnorm(conv).eval()
    x = torch.randn(2, 2, 6, 7, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
        assert_close(y, layer_reference(layer, x))
        assert_close(orthofx.freeze(nn.Sequential(layer))(x), y, 1e-12)
