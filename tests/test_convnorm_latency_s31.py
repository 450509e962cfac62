"""The convnorm transform's faster figures (session 31): the report's per-layer gain range from the extremes of the
power spectrum only, one-tap (1 x 1) powers and scales from a float64-accumulated norm without an FFT or a float64
copy of the weight, and the tap Gram matrix in blocks of output channels on CPU. Every figure is checked against
a float64 reference written here: the FFT of each zero-padded, dilated kernel (numpy), or a dense float64 sum."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import orthofx
from orthofx.nn.convnorm import (ConvNormConv2d, _one_tap_scale, channel_gain_range,
                                 channel_gains, convnorm_filter)


def reference_power(weight: torch.Tensor, grid, dilation) -> np.ndarray:
    """``sum_c |FFT_L(K_D{m,c})|^2`` on the grid, rfft half spectrum, from each kernel separately (float64)."""
    w = weight.detach().double().numpy()
    d = w.ndim - 2
    dilation = (dilation,) * d if isinstance(dilation, int) else tuple(dilation)
    padded = np.zeros(w.shape[:2] + tuple(grid))
    index = (slice(None), slice(None)) + tuple(slice(0, di * (k - 1) + 1, di) for k, di in zip(w.shape[2:], dilation))
    padded[index] = w
    power = (np.abs(np.fft.fftn(padded, axes=tuple(range(2, 2 + d)))) ** 2).sum(1)
    return power[..., : grid[-1] // 2 + 1]


def varied_model() -> nn.Sequential:
    torch.manual_seed(31)
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1),
        nn.Conv2d(64, 256, 3, padding=1),                      # 64 * 9 taps per channel: the Gram in blocks
        nn.Conv2d(256, 16, 1),                                 # one tap
        nn.Conv2d(16, 16, (1, 3), dilation=2, padding=(0, 2)),
        nn.Conv2d(16, 8, 3, stride=2, groups=2, padding=1, padding_mode="reflect"),
        nn.Conv2d(8, 8, 1, stride=2, bias=False),              # one tap, strided
        nn.Conv2d(8, 4, 3, padding=1),                         # zero-mean kernels: a gain of 0 at frequency 0
    )
    with torch.no_grad():
        last = model[-1].weight
        last.sub_(last.mean(dim=(2, 3), keepdim=True))
    return model.eval()


def test_report_gain_figures_equal_a_float64_fft_of_every_kernel():
    model = varied_model()
    x = torch.randn(2, 3, 12, 10)
    gm = orthofx.transform(model, "convnorm", example_inputs=(x,))
    changes = orthofx.manifest_of(gm).changes
    assert len(changes) == len(model)
    for change in changes:
        layer = gm.get_submodule(change.site)
        grid = change.before["grid"]
        gains = np.sqrt(reference_power(layer.conv.weight, grid, layer.conv.dilation))
        low, high = gains.min(), gains.max()
        after = np.sqrt(gains ** 2 / (gains ** 2 + layer.eps))
        # float32 weights: the gains are rounded to float32 (as channel_gains returns them)
        assert change.before["row_gain_min"] == pytest.approx(low, rel=1e-6, abs=1e-6 * high)
        assert change.before["row_gain_max"] == pytest.approx(high, rel=1e-6)
        assert change.after["row_gain_min"] == pytest.approx(after.min(), rel=1e-6, abs=1e-6)
        assert change.after["row_gain_max"] == pytest.approx(after.max(), rel=1e-6)
    # the zero-mean layer: exactly no gain at frequency 0 in the reference, below rounding in the figure
    assert changes[-1].before["row_gain_min"] < 1e-6 * changes[-1].before["row_gain_max"]


def test_report_gain_figures_equal_the_extremes_of_the_full_gains():
    # the old figures: every gain computed, rounded to the weight's dtype, squared in float64, then min / max;
    # the range from the extremes of the power only gives the same numbers bit for bit
    model = varied_model()
    gm = orthofx.transform(model, "convnorm", example_inputs=(torch.randn(1, 3, 9, 11),))
    for change in orthofx.manifest_of(gm).changes:
        layer = gm.get_submodule(change.site)
        g2 = channel_gains(layer.conv.weight, change.before["grid"], layer.conv.dilation).double().square()
        after = (g2 / (g2 + layer.eps)).sqrt()
        g = g2.sqrt()
        assert change.before["row_gain_min"] == float(g.min())
        assert change.before["row_gain_max"] == float(g.max())
        assert change.after["row_gain_min"] == float(after.min())
        assert change.after["row_gain_max"] == float(after.max())


@pytest.mark.parametrize("shape, grid, dilation", [
    ((5, 3, 1, 1), (6, 7), 1),
    ((4, 2, 1, 1), (5, 4), 3),
    ((300, 40, 3, 3), (9, 8), 1),        # 360 taps per channel: Gram blocks of 364 rows, one block
    ((600, 80, 3, 3), (7, 6), (1, 2)),   # 720 per channel: blocks of 182 rows, four blocks
    ((7, 3, 5), (11,), 2),
    ((3, 2, 3, 1, 2), (4, 3, 5), 1),
])
def test_filter_and_gains_equal_the_fft_reference(shape, grid, dilation):
    torch.manual_seed(0)
    w = torch.randn(shape)
    power = reference_power(w, grid, dilation)
    v = convnorm_filter(w, grid, dilation, eps=1e-5)
    gains = channel_gains(w, grid, dilation)
    assert v.shape == gains.shape == power.shape and v.is_contiguous() and gains.is_contiguous()
    np.testing.assert_allclose(v.double().numpy(), (power + 1e-5) ** -0.5, rtol=2e-7)
    np.testing.assert_allclose(gains.double().numpy(), power ** 0.5, rtol=2e-7)
    low, high = channel_gain_range(w, grid, dilation)
    assert (low, high) == (float(gains.min()), float(gains.max()))


@pytest.mark.parametrize("magnitude, eps", [(1.0, 1e-5), (1e25, 1e-5), (1e-25, 1e-60)])
def test_one_tap_scale_and_filter_of_huge_and_tiny_weights(magnitude, eps):
    # float32 squares of 1e25 overflow and of 1e-25 underflow: the norms accumulate in float64
    torch.manual_seed(2)
    w = torch.randn(6, 50, 1, 1) * magnitude
    squares = (w.double().numpy().reshape(6, -1) ** 2).sum(1)
    want = (squares + eps) ** -0.5
    scale = _one_tap_scale(w, eps)
    assert scale.dtype == torch.float32 and torch.isfinite(scale).all()
    np.testing.assert_allclose(scale.double().numpy(), want, rtol=2e-7)
    v = convnorm_filter(w, (5, 6), eps=eps)
    np.testing.assert_allclose(v.double().numpy(), np.broadcast_to(want[:, None, None], v.shape), rtol=2e-7)
    low, high = channel_gain_range(w, (5, 6))
    assert low == pytest.approx(squares.min() ** 0.5, rel=2e-7)
    assert high == pytest.approx(squares.max() ** 0.5, rel=2e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_one_tap_scale_of_other_dtypes(dtype):
    torch.manual_seed(3)
    w = torch.randn(4, 9, 1, 1).to(dtype)
    want = ((w.double().numpy().reshape(4, -1) ** 2).sum(1) + 1e-5) ** -0.5
    scale = _one_tap_scale(w, 1e-5)
    assert scale.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    np.testing.assert_allclose(scale.double().numpy(), want, rtol=1e-15 if dtype == torch.float64 else 2e-7)


def test_one_tap_running_filter_is_a_real_tensor_updated_in_place():
    # the one-tap power is a broadcast view; the filter made of it (stored, then lerp_-ed in place) is not
    torch.manual_seed(4)
    conv = nn.Conv2d(4, 6, 1)
    layer = ConvNormConv2d(conv, momentum=0.5).train()
    x = torch.randn(2, 4, 5, 5)
    layer(x)
    running = layer.running_filter((5, 5))
    assert running.is_contiguous() and running.stride()[-1] == 1
    with torch.no_grad():
        conv.weight.mul_(2.0)
    layer(x)
    assert layer.running_filter((5, 5)) is running
    squares = (conv.weight.detach().double().numpy().reshape(6, -1) ** 2).sum(1)
    now, before = (squares + 1e-5) ** -0.5, (squares / 4 + 1e-5) ** -0.5
    np.testing.assert_allclose(running[:, 0, 0].double().numpy(), 0.5 * before + 0.5 * now, rtol=1e-6)
