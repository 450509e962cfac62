"""ConvNorm (P3): the layer against a slow direct float64 construction, 1x1 kernels, gradients, train/eval and
running filters, and the ``convnorm`` pass / preset on built-in models."""

import copy
import io
import itertools
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F
from torch import nn

import orthofx
import orthofx.passes.convnorm  # noqa: F401  (registers the pass until orthofx.passes imports it)
from orthofx import models
from orthofx.nn.convnorm import (ConvNormConv1d, ConvNormConv2d, ConvNormConv3d, conv_norm, convnorm_filter,
                                 convnorm_geometry, with_convnorm)
from orthofx.passes import get_pass
from references import lorth64

# ------------------------------------------------------------------------------------- direct construction


def _pads(padding, kernel, dilation):
    if padding == "valid":
        return [(0, 0), (0, 0)]
    if padding == "same":
        out = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            out.append((total // 2, total - total // 2))
        return out
    return [(p, p) for p in padding]


def direct_convnorm(x, w, bias, stride, padding, dilation, groups, eps):
    """ConvNorm by its definition, in float64 with explicit sums (no conv, no FFT routines).

    f = full stride-1 linear cross-correlation (support -(ke-1) .. N-1), periodised with period
    L = N + max(pl, ke-1) + max(pr, ke-1) - ke + 1; V by explicit DFT sums over the taps; the spatial filter
    v = IDFT(V) by explicit DFT matrices; f' = v circularly convolved with f (sum of shifts); y[i] = f'[S i - pl mod L].
    """
    x, w = x.double(), w.double()
    B, C, N1, N2 = x.shape
    M, Cg, k1, k2 = w.shape
    D = dilation
    ke = [D[0] * (k1 - 1) + 1, D[1] * (k2 - 1) + 1]
    pads = _pads(padding, (k1, k2), D)
    N = [N1, N2]
    # full linear correlation f[a] for natural positions j = a - (ke - 1)
    full = [N[i] + ke[i] - 1 for i in range(2)]
    xp = torch.zeros(B, C, N1 + 2 * (ke[0] - 1), N2 + 2 * (ke[1] - 1), dtype=torch.float64)
    xp[:, :, ke[0] - 1: ke[0] - 1 + N1, ke[1] - 1: ke[1] - 1 + N2] = x
    f = torch.zeros(B, M, *full, dtype=torch.float64)
    per_group = M // groups
    for m in range(M):
        g = m // per_group
        for c in range(Cg):
            for p1 in range(k1):
                for p2 in range(k2):
                    o1, o2 = D[0] * p1, D[1] * p2
                    f[:, m] += w[m, c, p1, p2] * xp[:, g * Cg + c, o1: o1 + full[0], o2: o2 + full[1]]
    L = [N[i] + max(pads[i][0], ke[i] - 1) + max(pads[i][1], ke[i] - 1) - ke[i] + 1 for i in range(2)]
    fper = torch.zeros(B, M, *L, dtype=torch.float64)
    for a1 in range(full[0]):
        for a2 in range(full[1]):
            fper[:, :, (a1 - ke[0] + 1) % L[0], (a2 - ke[1] + 1) % L[1]] += f[:, :, a1, a2]
    # V by explicit DFT sums over the (dilated) taps
    w1 = torch.arange(L[0], dtype=torch.float64).view(-1, 1)
    w2 = torch.arange(L[1], dtype=torch.float64).view(1, -1)
    khat = torch.zeros(M, Cg, L[0], L[1], dtype=torch.complex128)
    for p1 in range(k1):
        for p2 in range(k2):
            phase = torch.exp(-2j * math.pi * (w1 * D[0] * p1 / L[0] + w2 * D[1] * p2 / L[1]))
            khat += w[:, :, p1, p2, None, None] * phase
    V = (khat.abs().square().sum(1) + eps) ** -0.5  # (M, L1, L2)
    e1 = torch.exp(2j * math.pi * torch.outer(torch.arange(L[0]), torch.arange(L[0])).double() / L[0])
    e2 = torch.exp(2j * math.pi * torch.outer(torch.arange(L[1]), torch.arange(L[1])).double() / L[1])
    v = (e1 @ V.to(torch.complex128) @ e2.T) / (L[0] * L[1])
    assert v.imag.abs().max() < 1e-10
    v = v.real
    fn = torch.zeros_like(fper)
    for s1 in range(L[0]):
        for s2 in range(L[1]):
            fn += v[:, s1, s2, None, None] * torch.roll(fper, shifts=(s1, s2), dims=(2, 3))
    out = []
    for i in range(2):
        n_out = (N[i] + pads[i][0] + pads[i][1] - ke[i]) // stride[i] + 1
        out.append([(stride[i] * j - pads[i][0]) % L[i] for j in range(n_out)])
    y = fn[:, :, out[0]][:, :, :, out[1]]
    if bias is not None:
        y = y + bias.double().view(1, -1, 1, 1)
    return y


CASES = [
    # (kernel, stride, padding, dilation, groups, bias, input size)
    ((3, 3), (1, 1), (1, 1), (1, 1), 1, False, (7, 7)),
    ((3, 3), (2, 2), (1, 1), (1, 1), 1, False, (9, 8)),
    ((1, 3), (1, 2), (0, 1), (1, 1), 1, True, (6, 9)),
    ((3, 1), (1, 1), (2, 0), (2, 1), 2, False, (8, 5)),
    ((1, 4), (1, 1), "same", (1, 2), 1, False, (4, 10)),
    ((5, 5), (2, 3), "valid", (1, 1), 1, True, (11, 12)),
    ((3, 3), (2, 2), (2, 2), (2, 2), 2, True, (9, 10)),
    ((3, 3), (1, 1), (3, 2), (1, 1), 1, False, (5, 6)),  # padding larger than k - 1
    ((2, 2), (1, 2), (0, 1), (1, 1), 1, False, (6, 7)),  # even kernel
    ((1, 1), (2, 2), (1, 1), (1, 1), 2, True, (7, 8)),   # one tap: a per-channel scale, no FFT
    ((1, 1), (1, 2), (0, 0), (1, 1), 1, False, (5, 6)),
]


@pytest.mark.parametrize("kernel,stride,padding,dilation,groups,bias,size", CASES)
def test_layer_matches_direct_construction(kernel, stride, padding, dilation, groups, bias, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
    with torch.no_grad():
        if bias:
            conv.bias.normal_()
    x = torch.randn(2, 4, *size)
    layer = ConvNormConv2d(copy.deepcopy(conv).double(), eps=1e-3)
    got = layer(x.double())
    want = direct_convnorm(x, conv.weight, conv.bias, stride, padding, dilation, groups, 1e-3)
    assert got.shape == conv(x).shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # float32 module, same numbers
    got32 = ConvNormConv2d(conv, eps=1e-3)(x)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel,stride,padding,dilation,groups,bias,size", CASES)
def test_geometry_reproduces_the_conv_without_normalisation(kernel, stride, padding, dilation, groups, bias, size):
    """With V = 1 the FFT grid, crop offset and subsampling give the conv's output exactly."""
    conv = nn.Conv2d(4, 6, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                     bias=bias).double()
    x = torch.randn(3, 4, *size, dtype=torch.float64)
    geo = convnorm_geometry(size, kernel, stride, padding, dilation)
    ones = torch.ones((6,) + geo.grid[:-1] + (geo.grid[-1] // 2 + 1,), dtype=torch.float64)
    out = conv_norm(x, conv.weight, conv.bias, stride, padding, dilation, groups, filter=ones)
    torch.testing.assert_close(out, conv(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_modes_pad_first(mode):
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, padding_mode=mode).double()
    x = torch.randn(2, 3, 8, 7, dtype=torch.float64)
    got = ConvNormConv2d(conv, eps=1e-4)(x)
    want = direct_convnorm(F.pad(x, [1, 1, 1, 1], mode=mode), conv.weight, conv.bias, (2, 2), (0, 0), (1, 1),
                           1, 1e-4)
    assert got.shape == conv(x).shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_modes_input_gradient(mode):
    # the explicit padding is part of the input gradient (circular: orthofx's own padding Function)
    conv = nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 1), padding_mode=mode).double()
    layer = ConvNormConv2d(conv, eps=1e-3)
    x = torch.randn(2, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    assert torch.autograd.gradcheck(lambda t: conv_norm(t, conv.weight.detach(), None, (2, 1), (1, 1), 1, 1, eps=1e-3,
                                                        padding_mode=mode), (x,))


def test_conv1d_and_conv3d():
    conv1 = nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2).double()
    x = torch.randn(2, 3, 11, dtype=torch.float64)
    got = ConvNormConv1d(conv1)(x)
    want = direct_convnorm(x.unsqueeze(2), conv1.weight.unsqueeze(2), conv1.bias, (1, 2), (0, 2), (1, 2), 1, 1e-5)
    assert got.shape == conv1(x).shape
    torch.testing.assert_close(got, want.squeeze(2), rtol=1e-10, atol=1e-10)
    # unbatched input, like torch's convs
    torch.testing.assert_close(ConvNormConv1d(conv1)(x[0]), got[0])
    conv3 = nn.Conv3d(2, 3, (1, 3, 3), padding=(0, 1, 1))
    x3 = torch.randn(1, 2, 3, 5, 5)
    y = ConvNormConv3d(conv3)(x3)
    assert y.shape == (1, 3, 3, 5, 5) and torch.isfinite(y).all()
    # a kernel of depth 1 has the same spectrum at every depth frequency, so V is a delta in depth: each depth
    # slice is the 2-D ConvNorm of the 3 x 3 kernel (the direct float64 construction)
    want = torch.stack([direct_convnorm(x3[:, :, t], conv3.weight[:, :, 0].detach(), conv3.bias.detach(), (1, 1),
                                        (1, 1), (1, 1), 1, 1e-5) for t in range(3)], dim=2)
    torch.testing.assert_close(y.double(), want, rtol=0, atol=1e-5)
    assert isinstance(with_convnorm(conv3), ConvNormConv3d)


def test_1x1_divides_by_channel_norm():
    conv = nn.Conv2d(5, 7, 1, stride=2, bias=False).double()
    x = torch.randn(2, 5, 9, 9, dtype=torch.float64)
    norms = conv.weight.flatten(1).norm(dim=1).view(1, -1, 1, 1)
    eps = 1e-6
    got = ConvNormConv2d(conv, eps=eps)(x)
    torch.testing.assert_close(got, conv(x) / (norms.square() + eps).sqrt(), rtol=1e-12, atol=1e-12)
    # and the filter is that constant at every frequency
    V = convnorm_filter(conv.weight, (5, 5), eps=eps)
    torch.testing.assert_close(V, (norms.view(-1, 1, 1).square() + eps).rsqrt().expand_as(V))


def _filter_by_dft_sums(w, grid, dilation, eps):
    """V on the grid (rfft half spectrum) by explicit float64 DFT sums over every tap of every kernel."""
    w = w.double()
    d = w.ndim - 2
    frequencies = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in grid], indexing="ij")
    khat = torch.zeros(w.shape[:2] + tuple(grid), dtype=torch.complex128)
    for tap in itertools.product(*[range(k) for k in w.shape[2:]]):
        angle = sum(f * di * t / n for f, di, t, n in zip(frequencies, dilation, tap, grid))
        khat += w[(slice(None), slice(None)) + tap][(...,) + (None,) * d] * torch.exp(-2j * math.pi * angle)
    v = (khat.abs().square().sum(1) + eps).rsqrt()
    return v[..., : grid[-1] // 2 + 1]


@pytest.mark.parametrize("shape, grid, dilation", [
    ((6, 5, 3, 3), (9, 8), (1, 1)),
    ((4, 3, 3, 3), (3, 3), (1, 1)),       # grid = kernel extent: tap differences wrap around
    ((5, 4, 3, 2), (11, 7), (2, 3)),      # dilation, even kernel
    ((3, 4, 5), (12,), (2,)),             # 1-D
    ((3, 2, 2, 3, 2), (4, 6, 5), (1, 2, 1)),  # 3-D
])
def test_filter_matches_dft_sums_where_the_kernels_vanish(shape, grid, dilation):
    # zero-mean kernels: sum_c |K_hat(0)|^2 is 0, so V(0) = eps^(-1/2), where a float32 autocorrelation sum
    # would be off by far more than eps
    torch.manual_seed(0)
    w = torch.randn(shape)
    w = w - w.flatten(2).mean(-1).view(shape[:2] + (1,) * (len(shape) - 2))
    eps = 1e-5
    expected = _filter_by_dft_sums(w, grid, dilation, eps)
    got = convnorm_filter(w, grid, dilation, eps)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)
    assert float(expected.flatten(1)[:, 0].min()) > 0.99 * eps ** -0.5  # the case is the one described
    torch.testing.assert_close(convnorm_filter(w.double(), grid, dilation, eps), expected, rtol=1e-8, atol=0)


def test_bias_is_added_after_normalisation():
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    bias = conv.bias.detach().clone()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    with_bias = ConvNormConv2d(copy.deepcopy(conv))(x)
    conv.bias = None
    without = ConvNormConv2d(conv)(x)
    torch.testing.assert_close(with_bias - without, bias.view(1, -1, 1, 1).expand_as(with_bias))


@settings(max_examples=40, deadline=None)
@given(k=st.tuples(st.integers(1, 4), st.integers(1, 4)), s=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       p=st.tuples(st.integers(0, 4), st.integers(0, 4)), d=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       n=st.tuples(st.integers(1, 9), st.integers(1, 9)))
def test_geometry_property(k, s, p, d, n):
    """For random kernels, strides, paddings, dilations and sizes: output shape = the conv's, and with V = 1 the
    result is the conv's output (no wrap-around, right crop and subsampling)."""
    extent = [d[i] * (k[i] - 1) + 1 for i in range(2)]
    assume(all(n[i] + 2 * p[i] >= extent[i] for i in range(2)))
    conv = nn.Conv2d(2, 3, k, stride=s, padding=p, dilation=d).double()
    x = torch.randn(1, 2, *n, dtype=torch.float64)
    geo = convnorm_geometry(n, k, s, p, d)
    assert all(geo.grid[i] >= n[i] + extent[i] - 1 for i in range(2))
    ones = torch.ones((3,) + geo.grid[:-1] + (geo.grid[-1] // 2 + 1,), dtype=torch.float64)
    ref = conv(x)
    torch.testing.assert_close(conv_norm(x, conv.weight, conv.bias, s, p, d, filter=ones), ref, rtol=1e-12,
                               atol=1e-12)
    assert ConvNormConv2d(conv)(x).shape == ref.shape


# ------------------------------------------------------------------------------------- gradients


def _filter_with_grad(weight, grid, dilation, eps):
    """V computed from the weight WITHOUT detaching (what the paper avoids)."""
    d = weight.ndim - 2
    spec = torch.fft.rfftn(weight, s=grid, dim=tuple(range(-d, 0)))
    return (spec.abs().square().sum(1) + eps).rsqrt()


def test_no_gradient_through_v():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    g = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    layer = ConvNormConv2d(conv, eps=1e-3)
    (layer(x) * g).sum().backward()
    grad = conv.weight.grad.clone()

    geo = layer.geometry((8, 8))
    w = conv.weight.detach().clone().requires_grad_(True)
    v = _filter_with_grad(w.detach(), geo.grid, (1, 1), 1e-3)  # detached by hand
    (conv_norm(x, w, None, 2, 1, 1, 1, filter=v) * g).sum().backward()
    torch.testing.assert_close(grad, w.grad, rtol=1e-10, atol=1e-12)

    w2 = conv.weight.detach().clone().requires_grad_(True)
    v2 = _filter_with_grad(w2, geo.grid, (1, 1), 1e-3)  # gradient through V: must differ
    (conv_norm(x, w2, None, 2, 1, 1, 1, filter=v2) * g).sum().backward()
    assert (w2.grad - grad).abs().max() > 1e-3 * grad.abs().max()


def test_input_gradient_is_exact():
    conv = nn.Conv2d(2, 3, (1, 3), stride=(2, 1), padding=(0, 2), dilation=(1, 2)).double()
    layer = ConvNormConv2d(conv, affine=True)
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


# ------------------------------------------------------------------------------------- train / eval


def test_train_and_eval_agree_without_momentum():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    layer = ConvNormConv2d(conv)
    x = torch.randn(2, 3, 8, 8)
    y_train = layer.train()(x)
    y_eval = layer.eval()(x)
    torch.testing.assert_close(y_train, y_eval)
    assert not list(layer.buffers())
    # a new input size works in eval
    assert layer(torch.randn(1, 3, 5, 7)).shape == (1, 4, 5, 7)


def test_running_filter_with_momentum():
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
    layer = ConvNormConv2d(conv, momentum=0.25).train()
    x = torch.randn(2, 3, 8, 8)
    grid = layer.geometry((8, 8)).grid
    assert grid == (10, 10)
    layer(x)
    v0 = convnorm_filter(conv.weight, grid)
    torch.testing.assert_close(layer.running_filter(grid), v0)
    assert layer.running_grids == [grid]
    assert "running_v_10x10" in layer.state_dict()
    with torch.no_grad():
        conv.weight.mul_(1.5).add_(0.1)
    y_train = layer(x)
    v1 = convnorm_filter(conv.weight, grid)
    running = 0.75 * v0 + 0.25 * v1
    torch.testing.assert_close(layer.running_filter(grid), running)
    torch.testing.assert_close(y_train, conv_norm(x, conv.weight, None, 2, 1, filter=v1))
    layer.eval()
    y_eval = layer(x)
    torch.testing.assert_close(y_eval, conv_norm(x, conv.weight, None, 2, 1, filter=running))
    assert (y_eval - y_train).abs().max() > 1e-4
    torch.testing.assert_close(layer.filter((8, 8)), running)
    # an unseen size in eval falls back to the weight's filter, and stores nothing
    x2 = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(layer(x2), conv_norm(x2, conv.weight, None, 2, 1))
    assert layer.running_grids == [grid]
    # the running filters load into a fresh module
    fresh = ConvNormConv2d(nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), momentum=0.25).eval()
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh(x), y_eval)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(copy.deepcopy(fresh)(x), y_eval)
    layer.reset_running_stats()
    assert layer.running_grids == []


def test_running_filters_made_under_inference_mode_keep_training():
    layer = ConvNormConv2d(nn.Conv2d(3, 4, 3, padding=1), momentum=0.1).train()
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        layer(x)
    assert not layer.running_filter((10, 10)).is_inference()
    layer(x).sum().backward()  # updated in place: failed when the buffer was an inference tensor
    assert layer.conv.weight.grad is not None


def test_loading_replaces_the_running_filters():
    torch.manual_seed(4)
    source = ConvNormConv2d(nn.Conv2d(3, 4, 3, padding=1), momentum=0.5).train()
    source(torch.randn(2, 3, 8, 8))
    target = ConvNormConv2d(nn.Conv2d(3, 4, 3, padding=1), momentum=0.5).train()
    target(torch.randn(2, 3, 6, 6))  # a filter of other weights, on another grid
    target.load_state_dict(source.state_dict())  # strict: was "Missing key(s)" for the 6 x 6 filter
    assert target.running_grids == source.running_grids == [(10, 10)]
    x6 = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(target.eval()(x6), source.eval()(x6))  # not the stale 6 x 6 filter
    # a float32 state loaded into a float64 layer keeps float64 running filters
    double = ConvNormConv2d(nn.Conv2d(3, 4, 3, padding=1), momentum=0.5).double()
    double.load_state_dict(source.state_dict())
    assert double.running_filter((10, 10)).dtype == torch.float64


def test_affine_part_starts_at_identity_and_learns():
    conv = nn.Conv2d(3, 4, (1, 3), padding=(0, 1))
    plain, affine = ConvNormConv2d(copy.deepcopy(conv)), ConvNormConv2d(conv, affine=True)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(plain(x), affine(x))
    assert affine.affine.groups == 4 and affine.affine.kernel_size == (1, 3)
    assert {"conv.weight", "conv.bias", "affine.weight", "affine.bias"} == set(affine.state_dict())
    affine(x).square().sum().backward()
    assert affine.affine.weight.grad.abs().sum() > 0


def test_half_precision_and_properties():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    ref = ConvNormConv2d(copy.deepcopy(conv))(torch.ones(1, 3, 6, 6))
    layer = ConvNormConv2d(conv).to(torch.bfloat16)
    y = layer(torch.ones(1, 3, 6, 6, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)
    assert layer.weight is conv.weight and layer.stride == (1, 1) and layer.groups == 1
    assert layer.out_channels == 4 and layer.kernel_size == (3, 3)


@pytest.mark.parametrize("stride", [1, 2])
def test_autocast_normalises_in_float32(stride):
    # under autocast the conv runs in bfloat16 (autocast's choice) but the Fourier normalisation must not: the
    # reference takes that same bfloat16 conv output and normalises it in float64 with V from explicit DFT sums
    torch.manual_seed(0)
    layer = ConvNormConv2d(nn.Conv2d(4, 6, 3, stride=stride, padding=1, bias=False))
    x = torch.randn(2, 4, 9, 9)
    geo = convnorm_geometry((9, 9), (3, 3), (stride, stride), (1, 1), (1, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        z = F.conv2d(F.pad(x, (geo.pad_left[1], geo.pad_right[1], geo.pad_left[0], geo.pad_right[0])),
                     layer.weight)
    assert z.dtype == torch.bfloat16 and tuple(z.shape[2:]) == geo.grid
    v = _filter_by_dft_sums(layer.weight.detach(), geo.grid, (1, 1), layer.eps)
    full = torch.fft.irfftn(torch.fft.rfftn(z.double(), s=geo.grid) * v, s=geo.grid)
    rows, cols = [slice(st, st + sd * (no - 1) + 1, sd)
                  for st, sd, no in zip(geo.start, geo.stride, geo.output_size)]
    expected = full[..., rows, cols]
    # returned in autocast's dtype, as nn.Conv2d is: each value is the float32 result rounded once to bfloat16
    # (relative error <= 2^-8, 8 significant bits); a normalisation computed in bfloat16 would be off by several ulps
    assert y.dtype == torch.bfloat16 and y.shape == expected.shape
    bound = 2.0 ** -8 * expected.abs() + 1e-5 * float(expected.abs().max())
    assert bool(((y.detach().double() - expected).abs() <= bound).all())


@pytest.mark.parametrize("kernel, stride, affine", [(3, 1, False), (3, 2, False), (1, 1, False), (3, 1, True)])
def test_autocast_output_dtype_is_that_of_nn_conv(kernel, stride, affine):
    # nn.Conv2d returns bfloat16 under CPU autocast; so do the layer, its frozen form and the functional form,
    # which returned float32 before (the float32 normalisation's result was cast back to the float32 input's dtype)
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, kernel, stride=stride, padding=kernel // 2)
    layer = ConvNormConv2d(conv, affine=affine)
    x = torch.randn(2, 4, 9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_dtype = conv(x).dtype
        y = layer(x)
        frozen = layer.to_plain(input_sizes=[(9, 9)])
        y_frozen = frozen(x)
        y_functional = conv_norm(x, conv.weight, conv.bias, stride, kernel // 2)
    assert expected_dtype == torch.bfloat16
    assert y.dtype == y_frozen.dtype == y_functional.dtype == expected_dtype
    reference = layer(x)  # float32 outside autocast: the autocast result is within bfloat16's rounding of it
    for out in (y, y_frozen):
        torch.testing.assert_close(out.float(), reference, rtol=0.03, atol=0.03)
    # a half-precision input without autocast still comes back in its own dtype
    assert layer(x.bfloat16()).dtype == torch.bfloat16 and frozen(x.bfloat16()).dtype == torch.bfloat16


def test_bad_arguments():
    with pytest.raises(TypeError, match="transposed"):
        ConvNormConv2d(nn.ConvTranspose2d(3, 4, 3))
    with pytest.raises(TypeError, match="Conv2d"):
        ConvNormConv2d(nn.Conv1d(3, 4, 3))
    with pytest.raises(ValueError, match="eps"):
        ConvNormConv2d(nn.Conv2d(3, 4, 3), eps=0.0)
    with pytest.raises(ValueError, match="momentum"):
        ConvNormConv2d(nn.Conv2d(3, 4, 3), momentum=1.5)
    with pytest.raises(ValueError, match="smaller"):
        ConvNormConv2d(nn.Conv2d(3, 4, 5))(torch.randn(1, 3, 3, 3))
    for size in (0, -1):
        with pytest.raises(orthofx.LayerArgumentError, match="affine_kernel_size"):
            ConvNormConv2d(nn.Conv2d(2, 3, 3), affine=True, affine_kernel_size=size)
    with pytest.raises(orthofx.LayerArgumentError, match="5 channels"):
        ConvNormConv2d(nn.Conv2d(3, 4, 3))(torch.randn(1, 5, 8, 8))
    # the functional forms check eps like the layer (a bad one made every output NaN)
    x, w = torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)
    for eps in (0.0, -1.0, float("nan")):
        with pytest.raises(orthofx.LayerArgumentError, match="eps"):
            conv_norm(x, w, padding=1, eps=eps)
        with pytest.raises(orthofx.LayerArgumentError, match="eps"):
            convnorm_filter(w, (7, 7), eps=eps)
    # torch refuses a strided 'same' convolution; so does the functional form
    with pytest.raises(orthofx.LayerArgumentError, match="'same' needs stride 1"):
        conv_norm(x, w, stride=2, padding="same")


def test_refused_inputs_are_no_sizes_to_freeze_for():
    model = nn.Sequential(nn.Conv2d(3, 4, 5), nn.ReLU())
    x = torch.randn(1, 3, 8, 8)
    gm = orthofx.transform(model, "convnorm", example_inputs=(x,))
    for bad, message in [(torch.randn(1, 3, 3, 3), r"ConvNormConv2d at '0': input size \(3, 3\).*smaller than the "
                                                  r"dilated kernel extent 5"),
                         (torch.randn(8), r"ConvNormConv2d at '0': expected a 4-D \(batched\) or 3-D \(unbatched\) "
                                          r"input for a 2-D convolution, got shape \(8,\)")]:
        with pytest.raises(orthofx.LayerArgumentError, match=message):
            gm(bad)
    assert gm.get_submodule("0").input_sizes == [(8, 8)]
    gm.eval()
    torch.testing.assert_close(orthofx.freeze(gm)(x), gm(x), rtol=0, atol=1e-6)
    # to_plain takes a 1-D size as an int
    layer = ConvNormConv1d(nn.Conv1d(2, 3, 3)).eval()
    frozen = layer.to_plain(input_sizes=[9])
    y = torch.randn(2, 2, 9)
    torch.testing.assert_close(frozen(y), layer(y), rtol=0, atol=1e-6)


def test_conv_subclasses_freeze():
    class StdConv(nn.Conv2d):  # a constructor without nn.Conv2d's arguments
        def __init__(self, c, k):
            super().__init__(c, c, k, padding=k // 2)

    torch.manual_seed(3)
    x = torch.randn(1, 3, 8, 8)
    for k in (3, 1):
        gm = orthofx.transform(nn.Sequential(StdConv(3, k)), "convnorm", example_inputs=(x,)).eval()
        frozen = orthofx.freeze(gm)
        assert type(frozen.get_submodule("0").conv) is nn.Conv2d
        torch.testing.assert_close(frozen(x), gm(x), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------- the pass


def _conv_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("name", ["resnet18", "vgg11"])
def test_preset_on_builtin_models(name):
    torch.manual_seed(0)
    model = models.get(name, width=8)
    x = models.example_input(name, batch=2)
    convs = _conv_names(model)
    with torch.no_grad():
        before = model.eval()(x)
    gm = orthofx.transform(model, "convnorm", example_inputs=(x,))
    # the user's model is untouched
    assert _conv_names(model) == convs
    manifest = gm.meta["orthofx"]
    changes = [c for c in manifest.changes if c.pass_name == "convnorm"]
    assert [c.site for c in changes] == convs
    for c in changes:
        layer = gm.get_submodule(c.site)
        assert isinstance(layer, ConvNormConv2d)
        torch.testing.assert_close(layer.conv.weight, model.get_submodule(c.site).weight)
        assert c.before["weight_key"] == f"{c.site}.weight" and c.after["weight_key"] == f"{c.site}.conv.weight"
        assert 0.99 < c.after["row_gain_min"] <= c.after["row_gain_max"] <= 1.0
        assert c.params == {"eps": 1e-5, "affine": False, "momentum": None}
    keys = set(gm.state_dict())
    assert all(f"{n}.conv.weight" in keys and f"{n}.weight" not in keys for n in convs)
    gm.eval()
    with torch.no_grad():
        after = gm(x)
    assert after.shape == before.shape and torch.isfinite(after).all()
    # trains
    gm.train()
    out = gm(x)
    out.square().mean().backward()
    grads = [gm.get_submodule(n).conv.weight.grad for n in convs]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_preset_loads():
    policy = orthofx.Policy.load("convnorm")
    (rule,) = policy.rules
    assert rule.apply == "convnorm" and rule.match.type == ("Conv1d", "Conv2d", "Conv3d")
    assert rule.params == {"eps": 1e-5, "affine": False, "momentum": None}
    assert orthofx.Policy.from_yaml(policy.to_yaml()) == policy


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(3, 6, (1, 3), stride=2, padding=(0, 1), groups=3), nn.ReLU(),
                                  nn.ConvTranspose2d(6, 3, 2, stride=2))

    def forward(self, x, s):
        return self.body(x), self.c1(s)


def test_pass_params_conv1d_affine_and_skips():
    model = Mixed()
    x, s = torch.randn(2, 3, 8, 8), torch.randn(2, 2, 7)
    policy = {"rules": [{"match": {"type": ["Conv1d", "Conv2d", "ConvTranspose2d"]}, "apply": "convnorm",
                         "with": {"eps": 1e-3, "affine": True}}]}
    plan = orthofx.explain(model, policy)
    assert any("transposed" in reason for _, _, reason in plan.skipped)
    gm = orthofx.transform(model, policy, example_inputs=(x, s))
    body0 = gm.get_submodule("body.0")
    assert isinstance(gm.c1, ConvNormConv1d) and isinstance(body0, ConvNormConv2d)
    assert body0.affine is not None and body0.eps == 1e-3
    assert isinstance(gm.get_submodule("body.2"), nn.ConvTranspose2d)
    a, b = gm(x, s)
    assert a.shape == (2, 3, 8, 8) and b.shape == (2, 4, 7)
    # a transformed model's inner convs are refused
    again = get_pass("convnorm")().accepts(orthofx.passes.Site("module", "c1.conv", "Conv1d"), gm.c1.conv)
    assert again is not None and "already" in again
    with pytest.raises(ValueError, match="eps"):
        orthofx.Policy.load({"rules": [{"match": {"type": "Conv2d"}, "apply": "convnorm", "with": {"eps": 0}}]})


def test_composes_with_lorth_penalty():
    model = models.get("vgg11", width=8)
    x = models.example_input("vgg11", batch=2)
    policy = {"rules": [{"match": {"type": "Conv2d"}, "apply": "convnorm"},
                        {"match": {"type": "Conv2d"}, "apply": "orth_regularizer", "with": {"weight": 0.1}}]}
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    pen = orthofx.penalty(gm)
    # 0.1 L_orth of every conv weight (the one ConvNorm wraps, unchanged), each from its dense circular operator
    expected = 0.1 * sum(lorth64(m.weight, stride=m.stride, groups=m.groups)
                         for m in model.modules() if isinstance(m, nn.Conv2d))
    assert float(pen) == pytest.approx(expected, rel=1e-5)
    pen.backward()
    assert gm.get_submodule(_conv_names(model)[0]).conv.weight.grad is not None


# ---------------------------------------------------------------------------------------------- freezing


def _frozen_types():
    from orthofx.nn.convnorm import ConvNormConvNd, FrozenConvNormNd
    return ConvNormConvNd, FrozenConvNormNd


def _eval_and_frozen(seed, kernel, stride, padding, dilation, groups, bias, size):
    """A 4 -> 6 ConvNorm layer (eps 1e-4) of one CASES row in eval mode: its conv, the layer, an input, the
    layer's output on it, and the layer's frozen form."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(4, 6, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
    layer = ConvNormConv2d(conv, eps=1e-4).eval()
    x = torch.randn(2, 4, *size)
    return conv, layer, x, layer(x), layer.to_plain()


@pytest.mark.parametrize("kernel, stride, padding, dilation, groups, bias, size", CASES[:6])
def test_to_plain_matches_the_direct_construction_and_eval(kernel, stride, padding, dilation, groups, bias, size):
    conv, layer, x, y, frozen = _eval_and_frozen(7, kernel, stride, padding, dilation, groups, bias, size)
    _, FrozenConvNormNd = _frozen_types()
    assert isinstance(frozen, FrozenConvNormNd) and not frozen.training
    assert type(frozen.conv) is nn.Conv2d and frozen.conv.stride == (1, 1) and frozen.conv.bias is None
    torch.testing.assert_close(frozen.conv.weight, conv.weight, rtol=0, atol=0)
    assert frozen.grids == [layer.geometry(size).grid]
    torch.testing.assert_close(frozen(x), y, rtol=0, atol=1e-6)
    expected = direct_convnorm(x, conv.weight.detach(), conv.bias, stride, padding, dilation, groups, 1e-4)
    torch.testing.assert_close(frozen(x).double(), expected, rtol=0, atol=1e-5)


def test_to_plain_never_transforms_the_weight(monkeypatch):
    import orthofx.nn.convnorm as cn

    torch.manual_seed(8)
    layer = ConvNormConv2d(nn.Conv2d(3, 5, 3, stride=2, padding=1), affine=True).eval()
    with torch.no_grad():
        layer.affine.weight.normal_()
    x = torch.randn(2, 3, 10, 10)
    y = layer(x)
    frozen = layer.to_plain()

    def fail(*args, **kwargs):
        raise AssertionError("the frozen layer computed an FFT of the weight")

    monkeypatch.setattr(cn, "_power", fail)
    torch.testing.assert_close(frozen(x), y, rtol=0, atol=1e-6)
    torch.testing.assert_close(frozen(x[0]), y[0], rtol=0, atol=1e-5)  # unbatched
    assert type(frozen.affine) is nn.Conv2d


@pytest.mark.parametrize("kernel, stride, padding, dilation, groups, bias, size", CASES[-2:])
def test_one_tap_layers_freeze_into_their_own_conv_with_scaled_weights(kernel, stride, padding, dilation, groups,
                                                                       bias, size, monkeypatch):
    # A 1 x 1 kernel's spectrum is its weight at every frequency, so V is 1 / ||w_m|| per channel: the frozen layer
    # is the layer's own conv (stride, padding) with scaled weights, no FFT at all and every input size works
    # (it was a stride-1 conv on the whole grid plus an FFT filter: 4x the conv's work at stride 2).
    import orthofx.nn.convnorm as cn

    conv, layer, x, y, frozen = _eval_and_frozen(9, kernel, stride, padding, dilation, groups, bias, size)
    assert frozen.conv.stride == conv.stride and frozen.conv.padding == conv.padding and frozen.grids == []

    def fail(*args, **kwargs):
        raise AssertionError("the frozen one-tap layer computed an FFT")

    monkeypatch.setattr(torch.fft, "rfft", fail)
    monkeypatch.setattr(torch.fft, "rfftn", fail)
    monkeypatch.setattr(cn, "_power", fail)
    torch.testing.assert_close(frozen(x), y, rtol=0, atol=1e-6)
    other = torch.randn(3, 4, size[0] + 3, size[1] + 1)  # a size the layer never ran on
    expected = direct_convnorm(other, conv.weight.detach(), conv.bias, stride, padding, dilation, groups, 1e-4)
    torch.testing.assert_close(frozen(other).double(), expected, rtol=0, atol=1e-5)
    monkeypatch.undo()
    # a reflect-padded 1-D layer with an affine part
    conv1 = nn.Conv1d(4, 4, 1, padding=2, padding_mode="reflect")
    layer1 = cn.ConvNormConv1d(conv1, affine=True).eval()
    with torch.no_grad():
        layer1.affine.weight.normal_()
    x1 = torch.randn(2, 4, 9)
    torch.testing.assert_close(layer1.to_plain()(x1), layer1(x1), rtol=0, atol=1e-6)
    half = frozen(x.half())  # computed in float32, returned in the input's precision like the unfrozen layer
    assert half.dtype == torch.float16
    torch.testing.assert_close(half, layer(x.half()), rtol=0, atol=1e-3)
    # running filters (momentum) keep the filter form: they are averages the scale would not reproduce
    kept = ConvNormConv2d(nn.Conv2d(4, 6, 1), momentum=0.5)
    kept(x)
    assert kept.eval().to_plain().grids == [kept.geometry(size).grid]


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_to_plain_padding_modes_conv1d_conv3d(mode):
    torch.manual_seed(9)
    layers = [ConvNormConv2d(nn.Conv2d(2, 4, 3, padding=1, padding_mode=mode)),
              ConvNormConv1d(nn.Conv1d(2, 3, 5, stride=2, padding=2, padding_mode=mode)),
              ConvNormConv3d(nn.Conv3d(2, 3, (1, 3, 3), padding=(0, 1, 1), padding_mode=mode))]
    inputs = [torch.randn(2, 2, 7, 6), torch.randn(2, 2, 11), torch.randn(1, 2, 3, 5, 6)]
    for layer, x in zip(layers, inputs):
        layer.eval()
        y = layer(x)
        torch.testing.assert_close(layer.to_plain()(x), y, rtol=0, atol=1e-6)


def test_to_plain_with_running_filters_and_unknown_sizes():
    torch.manual_seed(10)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    layer = ConvNormConv2d(conv, momentum=0.5).train()
    x8, x6 = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 6, 6)
    layer(x8)
    with torch.no_grad():
        conv.weight.mul_(1.3).add_(0.05)  # the running filter now differs from the weight's
    layer(x8)
    layer.eval()
    y8, y6 = layer(x8), layer(x6)  # 6x6: no running filter, eval uses the weight's
    assert layer.input_sizes == [(8, 8), (6, 6)]
    frozen = layer.to_plain()
    assert set(frozen.grids) == {(10, 10), (8, 8)}
    torch.testing.assert_close(frozen.filter_for((10, 10)), layer.running_filter((10, 10)))
    torch.testing.assert_close(frozen(x8), y8, rtol=0, atol=1e-6)
    torch.testing.assert_close(frozen(x6), y6, rtol=0, atol=1e-6)
    assert (frozen(x8) - conv_norm(x8, conv.weight, conv.bias, 2, 1)).abs().max() > 1e-4  # the running one
    x5 = torch.randn(1, 3, 5, 5)
    with pytest.raises(orthofx.LayerArgumentError) as info:
        frozen(x5)
    message = str(info.value)
    assert "input size (5, 5) (FFT grid (7, 7))" in message and "(8, 8)" in message
    assert "before orthofx.freeze" in message and "to_plain(input_sizes=[(5, 5)])" in message
    torch.testing.assert_close(layer.to_plain(input_sizes=[(5, 5)])(x5), layer(x5), rtol=0, atol=1e-6)
    # the frozen layer is a state_dict / pickle round trip like any module
    buf = io.BytesIO()
    torch.save(frozen, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(x8), y8)


def test_remembered_sizes_are_bounded_and_compile_does_not_record():
    from orthofx.nn.convnorm import MAX_REMEMBERED_SIZES

    layer = ConvNormConv1d(nn.Conv1d(2, 2, 3, padding=1)).eval()
    for n in range(4, 4 + MAX_REMEMBERED_SIZES + 3):
        layer(torch.randn(1, 2, n))
    assert len(layer.input_sizes) == MAX_REMEMBERED_SIZES and layer.input_sizes[-1] == (MAX_REMEMBERED_SIZES + 6,)
    fresh = ConvNormConv1d(nn.Conv1d(2, 2, 3, padding=1)).eval()
    torch._dynamo.reset()
    try:
        torch.compile(fresh, fullgraph=True, backend="eager")(torch.randn(1, 2, 9))
    finally:
        torch._dynamo.reset()
    assert fresh.input_sizes == []


def test_freeze_of_the_convnorm_preset(tmp_path, one_thread):
    ConvNormConvNd, FrozenConvNormNd = _frozen_types()
    torch.manual_seed(11)
    model = models.get("resnet18", width=4)
    x = models.example_input("resnet18", batch=2)
    gm = orthofx.transform(model, "convnorm", example_inputs=(x,))
    gm.eval()
    y = gm(x)
    frozen = orthofx.freeze(gm)
    assert not any(isinstance(m, ConvNormConvNd) for m in frozen.modules())
    assert sum(isinstance(m, FrozenConvNormNd) for m in frozen.modules()) == len(_conv_names(model))
    torch.testing.assert_close(frozen(x), y, rtol=0, atol=1e-5)
    bigger = torch.randn(1, 3, 40, 40)
    with pytest.raises(orthofx.LayerArgumentError, match="input size"):
        frozen(bigger)
    expected = gm(bigger)  # the unfrozen model remembers the new size: freezing again covers it
    torch.testing.assert_close(orthofx.freeze(gm)(bigger), expected, rtol=0, atol=1e-5)
    small = orthofx.transform(models.get("small_cnn", width=4), "convnorm",
                              example_inputs=(models.example_input("small_cnn", batch=2),))
    result = orthofx.export(small, tmp_path / "m.pt2", example_inputs=(models.example_input("small_cnn", batch=2),))
    assert result.max_abs_diff <= 1e-6


@pytest.mark.slow
def test_frozen_convnorm_exports_to_onnx(tmp_path, one_thread):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(12)
    model = models.get("small_cnn", width=4)
    x = models.example_input("small_cnn", batch=2)
    gm = orthofx.transform(model, "convnorm", example_inputs=(x,))
    result = orthofx.export(gm, tmp_path / "m.onnx", example_inputs=(x,))
    assert result.max_abs_diff <= 1e-5


def test_layer_errors_name_the_layer_path_in_the_model():
    """A model holds many ConvNorm layers of one class: a wrong input names the one that refused it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 4, 3, padding=1)))
    gm = orthofx.transform(model, "convnorm", example_inputs=(torch.randn(2, 3, 8, 8),)).eval()
    with pytest.raises(orthofx.LayerArgumentError, match=r"ConvNormConv2d at '0': the input has 5 channels"):
        gm(torch.randn(2, 5, 8, 8))
    frozen = orthofx.freeze(gm)
    # the 1 x 1 layer freezes for every size; the 3 x 3 one has a filter for 8 x 8 only
    with pytest.raises(orthofx.LayerArgumentError, match=r"at '2\.0': no precomputed ConvNorm filter for input "
                                                         r"size \(9, 9\)"):
        frozen(torch.randn(2, 3, 9, 9))
    with pytest.raises(orthofx.LayerArgumentError, match=r"^conv_norm: the input has 5 channels"):
        conv_norm(torch.randn(1, 5, 6, 6), torch.randn(4, 3, 3, 3))
    assert "orthofx_site" not in ConvNormConv2d(nn.Conv2d(3, 4, 3)).__dict__  # a layer built by hand has no path


# ------------------------------------------------------------------------------------- audit: edge cases


@pytest.mark.parametrize("kernel, stride", [(3, 1), (3, 2), (1, 2)])
def test_empty_batch_gives_the_convs_empty_output(kernel, stride):
    # a batch of 0 crashed in the FFT (MKL: "Inconsistent configuration parameters") where torch's conv returns an
    # empty output; the frozen layer did the same
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, kernel, stride=stride, padding=1)
    layer = ConvNormConv2d(conv)
    x = torch.randn(0, 3, 8, 7)
    y = layer(x)
    assert y.shape == conv(x).shape
    y.sum().backward()
    assert conv.weight.grad is not None and float(conv.weight.grad.abs().sum()) == 0.0
    layer.eval()
    layer(torch.randn(2, 3, 8, 7))
    assert layer.to_plain()(x).shape == conv(x).shape


def test_non_floating_inputs_are_refused():
    # an integer input was silently normalised in float32 and truncated back to integers (all zeros / -1 here);
    # torch's conv refuses it
    torch.manual_seed(0)
    layer = ConvNormConv2d(nn.Conv2d(3, 4, 3, padding=1)).eval()
    x = torch.randint(-3, 4, (2, 3, 8, 8))
    with pytest.raises(orthofx.LayerArgumentError, match="floating"):
        layer(x)
    with pytest.raises(orthofx.LayerArgumentError, match="floating"):
        conv_norm(x, layer.weight, padding=1)
    layer(x.float())
    with pytest.raises(orthofx.LayerArgumentError, match="floating"):
        layer.to_plain()(x)
    with pytest.raises(orthofx.LayerArgumentError, match="floating"):
        layer(x.to(torch.complex64))


@pytest.mark.parametrize("kernel", [3, 1])
def test_frozen_layer_checks_its_input_like_the_layer(kernel):
    # the frozen layer gave torch's raw channel error, and for a wrong number of dimensions
    # "kernel_size must be an int or 3 ints, got (3, 3)"
    layer = ConvNormConv2d(nn.Conv2d(3, 4, kernel, padding=1)).eval()
    layer(torch.randn(2, 3, 8, 8))
    frozen = layer.to_plain()
    with pytest.raises(orthofx.LayerArgumentError, match="the input has 5 channels"):
        frozen(torch.randn(2, 5, 8, 8))
    for shape in [(1, 2, 3, 8, 8), (3, 8)]:
        with pytest.raises(orthofx.LayerArgumentError, match="expected a 4-D"):
            frozen(torch.randn(shape))


def test_geometry_of_a_size_with_the_wrong_number_of_dimensions():
    # said "kernel_size must be an int or 1 ints, got (3, 3)" for a 1-D size given to a 2-D layer
    layer = ConvNormConv2d(nn.Conv2d(3, 4, 3, padding=1))
    for call in (layer.geometry, layer.filter):
        with pytest.raises(orthofx.LayerArgumentError, match=r"input size \(8,\).*2 spatial"):
            call((8,))


def test_frozen_parameters_keep_requires_grad():
    # a conv whose weights were frozen (requires_grad=False) froze into parameters that require gradients
    conv = nn.Conv2d(3, 4, 3, padding=1)
    conv.requires_grad_(False)
    layer = ConvNormConv2d(conv).eval()
    layer(torch.randn(1, 3, 6, 6))
    frozen = layer.to_plain()
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = ConvNormConv2d(nn.Conv2d(3, 4, 1)).eval().to_plain()
    assert all(p.requires_grad for p in trainable.parameters())


def test_running_filters_stay_float32_when_the_layer_is_cast_to_half():
    # .bfloat16() turned the running filters into bfloat16: their exponential average then stalled (off by 1.6 %
    # from the float64 average after 20 steps), while a layer built in bfloat16 keeps them in float32
    torch.manual_seed(0)
    layer = ConvNormConv2d(nn.Conv2d(3, 4, 3, padding=1), momentum=0.1).train()
    x = torch.randn(2, 3, 8, 8)
    layer(x)
    start = layer.running_filter((10, 10)).clone()
    layer.bfloat16()
    assert layer.running_filter((10, 10)).dtype == torch.float32
    torch.testing.assert_close(layer.running_filter((10, 10)), start, rtol=0, atol=0)  # not rounded on the way
    expected = start.double()
    for _ in range(20):
        with torch.no_grad():
            layer.conv.weight.mul_(1.02)
        layer(x.bfloat16())
        expected = 0.9 * expected + 0.1 * _filter_by_dft_sums(layer.conv.weight.detach(), (10, 10), (1, 1), layer.eps)
    torch.testing.assert_close(layer.running_filter((10, 10)).double(), expected, rtol=1e-5, atol=0)
    # the frozen layer's filters likewise: cast with the model, they keep their float32 values
    plain = ConvNormConv2d(nn.Conv2d(3, 4, 3, padding=1)).eval()
    plain(x)
    frozen = plain.to_plain()
    v = frozen.filter_for((10, 10)).clone()
    frozen.bfloat16()
    torch.testing.assert_close(frozen.filter_for((10, 10)), v, rtol=0, atol=0)
    assert frozen(x.bfloat16()).dtype == torch.bfloat16
    frozen.double()
    assert frozen.filter_for((10, 10)).dtype == torch.float64


def test_compiles_with_dynamic_shapes_in_one_graph():
    """torch.compile(dynamic=True) makes the float eps symbolic; the forward no longer re-checks it with
    math.isfinite (a graph break, an error under fullgraph=True). Two input sizes, one compiled function, both
    equal to eager."""
    torch.manual_seed(0)
    layer = ConvNormConv2d(nn.Conv2d(3, 4, 3, padding=1))
    compiled = torch.compile(layer, dynamic=True, fullgraph=True, backend="eager")
    for n in (8, 10):
        x = torch.randn(2, 3, n, n + 1)
        torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=1e-6)


def test_to_plain_refuses_a_flat_size_that_reads_two_ways():
    """``input_sizes=(8, 6)`` on a 2-d layer is one 8 x 6 input or two square ones: refused with both spellings;
    ``[(8, 6)]`` gives the 8 x 6 grid only, ``[8, 6]`` on a 1-d layer two lengths."""
    layer = ConvNormConv2d(nn.Conv2d(3, 4, 3, padding=1)).eval()
    for ambiguous in ((8, 6), [8, 6], torch.Size([8, 6])):
        with pytest.raises(orthofx.LayerArgumentError) as info:
            layer.to_plain(input_sizes=ambiguous)
        assert "[(8, 6)]" in str(info.value) and "[(8, 8), (6, 6)]" in str(info.value)
    with pytest.raises(orthofx.LayerArgumentError, match="list of spatial sizes"):
        layer.to_plain(input_sizes=8)
    frozen = layer.to_plain(input_sizes=[(8, 6)])
    assert set(frozen.grids) == {tuple(layer.geometry((8, 6)).grid)}
    x = torch.randn(2, 3, 8, 6)
    torch.testing.assert_close(frozen(x), layer(x), rtol=0, atol=1e-6)
    line = ConvNormConv1d(nn.Conv1d(3, 4, 3, padding=1)).eval()
    assert set(line.to_plain(input_sizes=[8, 6]).grids) == {tuple(line.geometry((n,)).grid) for n in (8, 6)}
