"""ConvNorm (P3) fuzzed against a slow direct reference: 1-D / 2-D / 3-D convolutions, channel counts, kernels
(1 x k, k x 1, even), strides, dilations, groups, padding modes and strings, bias, affine, eps, batch sizes,
float32 / float64, train / eval with running filters, the frozen form, gradients, state_dict round trips and
torch.compile; plus the regressions the fuzzing found.

The reference (:func:`reference_convnorm`) follows P3's definition as ``orthofx.nn.convnorm`` states it, in float64
with explicit loops and explicit DFT matrices (no convolution and no FFT routine of torch):

* the input is padded by hand (zeros / reflect / replicate / circular by index arithmetic); for padding modes
  other than zeros the layer's padding is applied first and the zero padding ``p`` is then 0;
* ``f[j] = sum_t K_D[t] x[j + t]`` is the full stride-1 linear correlation of the padded input with the dilated
  kernel, ``j = -(k_e - 1) .. N - 1``, placed on the periodic grid ``L = N + max(p_l, k_e - 1) + max(p_r, k_e - 1)
  - k_e + 1``;
* ``V_m(w) = (sum_c |K_hat_{m,c}(w)|^2 + eps)^(-1/2)`` by explicit sums over the taps of the *detached* weight
  (or a given running filter);
* ``f' = IDFT(V . DFT(f))`` with dense DFT matrices, ``y[i] = f'[(S i - p_l) mod L]``, then the bias.
"""

from __future__ import annotations

import copy
import io
import itertools
import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
import torch
from torch import nn

import orthofx
from orthofx.nn.convnorm import ConvNormConv1d, ConvNormConv2d, ConvNormConv3d, conv_norm
from references import conv_pads, padded_source

pytestmark = pytest.mark.usefixtures("one_thread")

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
LAYER = {1: ConvNormConv1d, 2: ConvNormConv2d, 3: ConvNormConv3d}


# ------------------------------------------------------------------------------------------------ reference


def pad_by_hand(x: torch.Tensor, pads, mode: str) -> torch.Tensor:
    """``x`` padded by ``pads`` (per spatial dimension) in ``mode``, one dimension at a time by index lists."""
    d = len(pads)
    for i, (left, right) in enumerate(pads):
        dim = x.ndim - d + i
        n = x.shape[dim]
        shape = list(x.shape)
        shape[dim] = n + left + right
        out = torch.zeros(shape, dtype=x.dtype)
        for j in range(-left, n + right):
            src = padded_source(j, n, mode)
            if src is not None:
                out.select(dim, j + left).copy_(x.select(dim, src))
        x = out
    return x


def dft_matrix(n: int, sign: int) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64)
    return torch.exp(sign * 2j * math.pi * torch.outer(k, k) / n)


def along(t: torch.Tensor, matrix: torch.Tensor, dim: int) -> torch.Tensor:
    """``matrix`` applied along dimension ``dim`` of ``t``."""
    return torch.movedim(torch.tensordot(t, matrix.T, dims=([dim], [0])), -1, dim)


def reference_filter(w: torch.Tensor, grid, dilation, eps) -> torch.Tensor:
    """``V`` on the full grid (M, L_1 .. L_d) by explicit sums over the dilated taps of the detached weight."""
    w = w.detach().double()
    d = w.ndim - 2
    freqs = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in grid], indexing="ij")
    khat = torch.zeros(w.shape[:2] + tuple(grid), dtype=torch.complex128)
    for tap in itertools.product(*[range(k) for k in w.shape[2:]]):
        angle = sum(f * di * t / n for f, di, t, n in zip(freqs, dilation, tap, grid))
        khat += w[(slice(None), slice(None)) + tap][(...,) + (None,) * d] * torch.exp(-2j * math.pi * angle)
    return (khat.abs().square().sum(1) + eps).rsqrt()


def reference_convnorm(x, w, bias, stride, padding, dilation, groups, eps, padding_mode="zeros", v_full=None):
    """ConvNorm by its definition (module docstring); differentiable in ``x`` and ``w`` except through ``V``.

    ``v_full``: a filter on the whole grid ``(M, L_1, .., L_d)`` to use instead of ``V`` of the weight (a running
    average of such filters, for eval with ``momentum``).
    """
    x, w = x.double(), w.double()
    d = w.ndim - 2
    ks = tuple(w.shape[2:])
    pads = conv_pads(padding, ks, dilation)
    if padding_mode != "zeros":
        x = pad_by_hand(x, pads, padding_mode)
        pads = [(0, 0)] * d
    n = x.shape[2:]
    ke = [di * (k - 1) + 1 for k, di in zip(ks, dilation)]
    full = [ni + e - 1 for ni, e in zip(n, ke)]
    xz = pad_by_hand(x, [(e - 1, e - 1) for e in ke], "zeros")
    m_out, c_in = w.shape[:2]
    per_group = m_out // groups
    channels = []
    for m in range(m_out):
        g = m // per_group
        acc = torch.zeros((x.shape[0],) + tuple(full), dtype=torch.float64)
        for c in range(c_in):
            for tap in itertools.product(*[range(k) for k in ks]):
                window = tuple(slice(di * t, di * t + f) for di, t, f in zip(dilation, tap, full))
                acc = acc + w[(m, c) + tap] * xz[(slice(None), g * c_in + c) + window]
        channels.append(acc)
    f = torch.stack(channels, 1)                                    # natural position j = a - (ke - 1)
    grid = [ni + max(pl, e - 1) + max(pr, e - 1) - e + 1 for ni, (pl, pr), e in zip(n, pads, ke)]
    for i in range(d):                                              # place on the period-L grid
        dim = 2 + i
        idx = torch.tensor([(a - ke[i] + 1) % grid[i] for a in range(full[i])])
        shape = list(f.shape)
        shape[dim] = grid[i]
        f = torch.zeros(shape, dtype=f.dtype).index_add(dim, idx, f)
    v = reference_filter(w, grid, dilation, eps) if v_full is None else v_full.double()
    spectrum = f.to(torch.complex128)
    for i in range(d):
        spectrum = along(spectrum, dft_matrix(grid[i], -1), 2 + i)
    spectrum = spectrum * v.unsqueeze(0)
    for i in range(d):
        spectrum = along(spectrum, dft_matrix(grid[i], 1) / grid[i], 2 + i)
    fn = spectrum.real
    for i in range(d):
        n_out = (n[i] + pads[i][0] + pads[i][1] - ke[i]) // stride[i] + 1
        fn = fn.index_select(2 + i, torch.tensor([(stride[i] * j - pads[i][0]) % grid[i] for j in range(n_out)]))
    if bias is not None:
        fn = fn + bias.double().view((1, -1) + (1,) * d)
    return fn


# ------------------------------------------------------------------------------------------------ the grid


@st.composite
def layer_cases(draw, dims=(1, 2, 3)):
    """One conv layer and input size: channels 1..8 (M below, equal to and above C), kernels 1..5 (1 x k, k x 1,
    even), stride and dilation 1..3, groups dividing both, every padding mode, numbers / 'same' / 'valid', sizes
    not divisible by the stride, eps from 1e-5 to 0.5, batch 1 or 3."""
    d = draw(st.sampled_from(dims))
    groups = draw(st.sampled_from([1, 1, 2, 3, 4]))
    c = groups * draw(st.integers(1, 8 // groups))
    m = groups * draw(st.integers(1, 8 // groups))
    kernel = tuple(draw(st.lists(st.integers(1, 5 if d < 3 else 3), min_size=d, max_size=d)))
    dilation = tuple(draw(st.lists(st.integers(1, 3), min_size=d, max_size=d)))
    mode = draw(st.sampled_from(["zeros", "zeros", "circular", "reflect", "replicate"]))
    padding_kind = draw(st.sampled_from(["numbers", "numbers", "same", "valid"]))
    stride = tuple(draw(st.lists(st.integers(1, 3), min_size=d, max_size=d)))
    if padding_kind == "same":
        padding, stride = "same", (1,) * d
    elif padding_kind == "valid":
        padding = "valid"
    else:
        padding = tuple(draw(st.lists(st.integers(0, 3), min_size=d, max_size=d)))
    pads = conv_pads(padding, kernel, dilation)
    size = []
    for (left, right), k, di in zip(pads, kernel, dilation):
        smallest = max(1, di * (k - 1) + 1 - left - right)
        if mode == "reflect":  # torch's reflect padding needs pads below the size, as the conv's does
            smallest = max(smallest, max(left, right) + 1)
        size.append(draw(st.integers(smallest, smallest + (6 if d < 3 else 3))))
    return dict(d=d, c=c, m=m, kernel=kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                mode=mode, bias=draw(st.booleans()), size=tuple(size), batch=draw(st.sampled_from([1, 3])),
                eps=draw(st.sampled_from([1e-5, 1e-3, 0.5])))


def make_conv(case, dtype=torch.float64):
    conv = CONV[case["d"]](case["c"], case["m"], case["kernel"], stride=case["stride"], padding=case["padding"],
                           dilation=case["dilation"], groups=case["groups"], bias=case["bias"],
                           padding_mode=case["mode"]).to(dtype)
    if case["bias"]:
        with torch.no_grad():
            conv.bias.normal_()
    return conv


def conv_output_shape(case) -> tuple[int, ...]:
    """The conv's output shape, by torch's formula (a circular pad larger than the input, which ConvNorm wraps
    around as often as needed like orthofx's circular layers, is one torch's conv refuses to run)."""
    pads = conv_pads(case["padding"], case["kernel"], case["dilation"])
    size = [(n + left + right - di * (k - 1) - 1) // s + 1
            for n, (left, right), k, di, s in zip(case["size"], pads, case["kernel"], case["dilation"], case["stride"])]
    return (case["batch"], case["m"], *size)


def reference_of(conv, x, eps, v_full=None, affine=None):
    """:func:`reference_convnorm` for the layer's conv (and affine part, a plain depthwise conv run in float64)."""
    y = reference_convnorm(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups, eps,
                           conv.padding_mode, v_full)
    return y if affine is None else copy.deepcopy(affine).double()(y)


def assert_near(got, want, rel):
    """``got`` within ``rel`` of ``want``, relative to the larger of 1 and the reference's largest entry (outputs
    that are all padding are zero up to rounding)."""
    if not want.numel():
        return
    err = float((got.detach().double() - want.detach()).abs().max())
    assert err <= rel * (1 + float(want.detach().abs().max())), f"off by {err:.3g}"


@settings(max_examples=50, deadline=None, database=None)
@given(case=layer_cases())
@example(case=dict(d=1, c=2, m=3, kernel=(1,), stride=(2,), padding=(4,), dilation=(1,), groups=1, mode="circular",
                   bias=True, size=(3,), batch=3, eps=1e-3))  # a circular pad wider than the input: frozen 1-tap
def test_layer_matches_the_reference_with_gradients(case):
    """Output (the conv's shape), the weight's gradient (through the conv only: V from the detached weight) and
    the input's gradient equal the reference's autograd; the float32 layer agrees to float32 rounding; the
    frozen form gives the eval output."""
    torch.manual_seed(0)
    conv = make_conv(case)
    layer = LAYER[case["d"]](conv, eps=case["eps"])
    x = torch.randn(case["batch"], case["c"], *case["size"], dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == conv_output_shape(case)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = conv.weight.detach().clone().requires_grad_(True)
    reference = reference_convnorm(x_ref, w_ref, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                                   case["eps"], conv.padding_mode)
    assert_near(y, reference, 1e-10)
    probe = torch.randn_like(reference)
    (y * probe).sum().backward()
    (reference * probe).sum().backward()
    torch.testing.assert_close(conv.weight.grad, w_ref.grad, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-8, atol=1e-9)
    single = copy.deepcopy(layer).float()
    # float32 rounding, amplified where V is large (a channel whose kernels nearly vanish at some frequency)
    v_max = float(reference_filter(conv.weight, layer.geometry(case["size"]).grid, conv.dilation, case["eps"]).max())
    assert_near(single(x.detach().float()), reference, 2e-5 * max(1.0, v_max))
    layer.eval()
    torch.testing.assert_close(layer.to_plain()(x.detach()), layer(x.detach()), rtol=1e-10, atol=1e-10)


@settings(max_examples=25, deadline=None, database=None)
@given(case=layer_cases(), momentum=st.sampled_from([0.3, 1.0]), affine=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_running_filters_per_input_size_through_eval_freeze_and_state_dict(case, momentum, affine, dtype):
    """With ``momentum``: training on two input sizes keeps one running V per FFT grid (the reference: the
    exponential average of V of each weight seen on that grid); eval uses it; an eval size never seen in training
    falls back to V of the current weight (the documented behaviour); the frozen form (``to_plain`` and
    ``orthofx.freeze``) and a state_dict round trip through ``torch.save`` into a fresh layer give the same eval
    outputs; the weight's gradient in training is the reference's (V detached)."""
    torch.manual_seed(1)
    conv = make_conv(case, dtype)
    layer = LAYER[case["d"]](conv, eps=case["eps"], momentum=momentum, affine=affine)
    if affine:
        with torch.no_grad():
            layer.affine.weight.normal_()
            layer.affine.bias.normal_()
    rel = 1e-9 if dtype == torch.float64 else 1e-4 * max(1.0, case["eps"] ** -0.5 / 100)
    seen = tuple(case["size"])
    other = tuple(n + 1 for n in seen)
    inputs = [torch.randn(case["batch"], case["c"], *seen, dtype=dtype), torch.randn(2, case["c"], *other, dtype=dtype)]
    running = {}
    for x in inputs + inputs[:1]:
        layer.train()
        w_ref = conv.weight.detach().clone().requires_grad_(True)
        probe = torch.randn_like(layer(x))
        (layer(x) * probe).sum().backward()
        reference = reference_convnorm(x, w_ref, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                                       case["eps"], conv.padding_mode)
        reference = reference if not affine else copy.deepcopy(layer.affine).double()(reference)
        (reference * probe).sum().backward()
        assert_near(conv.weight.grad, w_ref.grad, rel * 10)
        conv.weight.grad = None
        grid = layer.geometry(x.shape[2:]).grid
        v = reference_filter(conv.weight, grid, conv.dilation, case["eps"])
        # two forwards per step above: the running filter moved twice towards the same V
        for _ in range(2):
            running[grid] = v if grid not in running else (1 - momentum) * running[grid] + momentum * v
        with torch.no_grad():
            conv.weight.mul_(1.1).add_(0.05)  # the next step's weight: its V differs from the running one
    assert sorted(layer.running_grids) == sorted(running)
    layer.eval()
    unseen = torch.randn(1, case["c"], *(n + 2 for n in seen), dtype=dtype)
    for x, v_full in [(inputs[0], running[layer.geometry(seen).grid]),
                      (inputs[1], running[layer.geometry(other).grid]), (unseen, None)]:
        assert_near(layer(x), reference_of(conv, x, case["eps"], v_full, layer.affine), rel)
    assert sorted(layer.running_grids) == sorted(running)  # eval stores nothing
    frozen, frozen_model = layer.to_plain(), orthofx.freeze(nn.Sequential(copy.deepcopy(layer)))
    atol = 1e-10 if dtype == torch.float64 else 1e-5
    for x in inputs + [unseen]:
        torch.testing.assert_close(frozen(x), layer(x), rtol=1e-5, atol=atol)
        torch.testing.assert_close(frozen_model(x), layer(x), rtol=1e-5, atol=atol)
    fresh = LAYER[case["d"]](make_conv(case, dtype), eps=case["eps"], momentum=momentum, affine=affine).eval()
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert sorted(fresh.running_grids) == sorted(running)
    for x in inputs + [unseen]:
        torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


COMPILE_CASES = [
    # (d, C, M, kernel, stride, padding, dilation, groups, padding mode, momentum, affine)
    (2, 4, 6, (1, 3), (2, 1), (0, 2), (1, 2), 2, "zeros", None, True),
    (2, 6, 3, (4, 1), (1, 3), "valid", (2, 1), 3, "reflect", 0.5, False),
    (1, 3, 5, (4,), (1,), "same", (3,), 1, "circular", None, False),
    (3, 2, 2, (2, 1, 3), (1, 2, 1), (1, 0, 2), (1, 1, 2), 2, "replicate", 0.5, True),
    (2, 5, 4, (1, 1), (3, 2), (1, 0), (1, 1), 1, "zeros", None, False),
]


@pytest.mark.parametrize("d, c, m, kernel, stride, padding, dilation, groups, mode, momentum, affine", COMPILE_CASES)
def test_compiled_fullgraph_matches_eager_and_the_reference(d, c, m, kernel, stride, padding, dilation, groups, mode,
                                                            momentum, affine):
    """``torch.compile(fullgraph=True)`` on CPU (aot_eager: dynamo and aot_autograd, no C++ toolchain needed) gives
    eager's outputs, input and weight gradients and running filters, in train and eval; both match the reference."""
    torch.manual_seed(2)
    conv = CONV[d](c, m, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                   padding_mode=mode)
    layer = LAYER[d](conv, eps=1e-3, momentum=momentum, affine=affine)
    eager = copy.deepcopy(layer)
    x = torch.randn(2, c, *([7] * d), requires_grad=True)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        for training in (True, False):
            layer.train(training)
            eager.train(training)
            y, want = compiled(x), eager(x)
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
            assert_near(want, reference_of(eager.conv, x.detach(), 1e-3,
                                           None if training or momentum is None else
                                           reference_filter(eager.conv.weight, eager.geometry(x.shape[2:]).grid,
                                                            eager.conv.dilation, 1e-3), eager.affine), 1e-5)
            probe = torch.randn_like(y)
            got = torch.autograd.grad((y * probe).sum(), (x, layer.conv.weight))
            expected = torch.autograd.grad((want * probe).sum(), (x, eager.conv.weight))
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
            for grid in eager.running_grids:
                torch.testing.assert_close(layer.running_filter(grid), eager.running_filter(grid), rtol=0, atol=0)
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------ regressions


@pytest.mark.parametrize("kernel", [3, 1])
@pytest.mark.parametrize("layer_dtype, input_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64),
                                                      (torch.float64, torch.float16)])
def test_input_and_weight_precisions_must_agree(kernel, layer_dtype, input_dtype):
    """A float32 input to a float64 layer was silently computed in float32 (the weight rounded to float32), and a
    float64 input to a float32 layer in float64, where torch's conv raises ("Input type (float) and bias type
    (double) should be the same"). Refused like the channel checks, by the layer, its frozen form and
    ``conv_norm``, naming both dtypes and the fix."""
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, kernel, padding=1).to(layer_dtype)
    x = torch.randn(2, 3, 6, 5, dtype=input_dtype)
    with pytest.raises(RuntimeError, match="should be the same"):
        conv(x)
    layer = ConvNormConv2d(conv).eval()
    layer(x.to(layer_dtype))
    frozen = layer.to_plain()
    message = rf"input is {input_dtype}.*weight is {layer_dtype}"
    for call in (layer, frozen, lambda t: conv_norm(t, conv.weight, conv.bias, padding=1)):
        with pytest.raises(orthofx.LayerArgumentError, match=message):
            call(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast does not cast float64: torch's conv raises too
        with pytest.raises(orthofx.LayerArgumentError, match=message):
            layer(x)
    # what stays accepted: matching precisions (checked against the reference), and a half-precision input to a
    # float32 layer (computed in float32 and returned in half precision, as before)
    want = reference_convnorm(x.double(), conv.weight, conv.bias, (1, 1), (1, 1), (1, 1), 1, layer.eps)
    assert_near(layer(x.to(layer_dtype)), want, 1e-10 if layer_dtype == torch.float64 else 1e-5)
    if layer_dtype == torch.float32:
        assert layer(x.half()).dtype == frozen(x.half()).dtype == torch.float16


@pytest.mark.parametrize("size", [2, 3])
def test_one_tap_frozen_layer_wraps_a_circular_pad_larger_than_the_input(size):
    """A 1 x 1 conv with circular padding larger than the input: the layer wraps the pad around as often as
    needed (orthofx's circular padding, as for k-tap kernels and the frozen k-tap form), but its frozen form ran
    torch's own circular padding and raised "Padding value causes wrapping around more than once"."""
    torch.manual_seed(4)
    conv = nn.Conv1d(3, 4, 1, padding=4, padding_mode="circular").double()
    layer = ConvNormConv1d(conv, eps=1e-3, affine=True).eval()
    x = torch.randn(2, 3, size, dtype=torch.float64)
    want = reference_of(conv, x, 1e-3, affine=layer.affine)
    assert_near(layer(x), want, 1e-10)
    assert_near(layer.to_plain()(x), want, 1e-10)
    wide = ConvNormConv2d(nn.Conv2d(3, 4, 3, padding=(4, 1), padding_mode="circular").double(), eps=1e-3).eval()
    x2 = torch.randn(1, 3, size, 5, dtype=torch.float64)
    wide(x2)
    assert_near(wide.to_plain()(x2), reference_of(wide.conv, x2, 1e-3), 1e-10)
