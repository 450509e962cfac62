"""ConvNorm (P3) fuzz round 28: regressions for extreme weight scales and ``eps``, and the functional bias check.

The reference (:func:`reference`) is ConvNorm by its definition (``orthofx.nn.convnorm`` module docstring), in numpy
float64 for zero padding: the stride-1 correlation ``f`` with padding ``Q = max(p, k_e - 1)`` per side by loops over
the dilated taps, ``V_m = (sum_c |K_hat_{m,c}|^2 + eps)^(-1/2)`` from ``np.fft.fftn`` of each kernel placed on the
``L``-grid, ``f' = ifftn(V . fftn(f))``, the outputs ``f'[Q - p + S i]``, then the bias.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orthofx.errors import LayerArgumentError
from orthofx.nn.convnorm import ConvNormConv1d, ConvNormConv2d, channel_gains, conv_norm, convnorm_filter

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(x: torch.Tensor, conv: nn.Module, eps: float, scale: float = 1.0) -> np.ndarray:
    """ConvNorm of ``conv`` (zero padding given as numbers) with its weight multiplied by ``scale``, float64."""
    x = x.detach().double().numpy()
    w = conv.weight.detach().double().numpy() * scale
    d, ks = w.ndim - 2, w.shape[2:]
    ke = [di * (k - 1) + 1 for k, di in zip(ks, conv.dilation)]
    q = [max(p, e - 1) for p, e in zip(conv.padding, ke)]
    grid = [n + 2 * qi - e + 1 for n, qi, e in zip(x.shape[2:], q, ke)]
    xp = np.pad(x, [(0, 0), (0, 0)] + [(qi, qi) for qi in q])
    m_out, c_in = w.shape[:2]
    per_group = m_out // conv.groups
    f = np.zeros((x.shape[0], m_out) + tuple(grid))
    kernel_on_grid = np.zeros((m_out, c_in) + tuple(grid))
    for tap in np.ndindex(*ks):
        at = tuple(di * t for di, t in zip(conv.dilation, tap))
        kernel_on_grid[(slice(None), slice(None)) + at] = w[(slice(None), slice(None)) + tap]
        window = tuple(slice(a, a + g) for a, g in zip(at, grid))
        for m in range(m_out):
            for c in range(c_in):
                f[:, m] += w[(m, c) + tap] * xp[(slice(None), (m // per_group) * c_in + c) + window]
    axes = tuple(range(2, 2 + d))
    v = (np.abs(np.fft.fftn(kernel_on_grid, axes=axes)) ** 2).sum(1) + eps
    f = np.fft.ifftn(np.fft.fftn(f, axes=axes) * v[None] ** -0.5, axes=axes).real
    out = [(n + 2 * p - e) // s + 1 for n, p, e, s in zip(x.shape[2:], conv.padding, ke, conv.stride)]
    keep = tuple(slice(qi - p, qi - p + s * (o - 1) + 1, s) for qi, p, s, o in zip(q, conv.padding, conv.stride, out))
    y = f[(slice(None), slice(None)) + keep]
    if conv.bias is not None:
        y = y + conv.bias.detach().double().numpy().reshape((1, -1) + (1,) * d)
    return y


def assert_close_to(got: torch.Tensor, want: np.ndarray, rtol: float):
    assert tuple(got.shape) == want.shape
    got = got.detach().double().numpy()
    assert np.isfinite(got).all()
    err = np.abs(got - want).max()
    assert err <= rtol * np.abs(want).max(), f"off by {err:.3g} (output size {np.abs(want).max():.3g})"


LAYERS = [
    (nn.Conv2d, dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, stride=2), (7, 6)),
    (nn.Conv1d, dict(in_channels=4, out_channels=4, kernel_size=2, dilation=2, groups=2, bias=False), (9,)),
    (nn.Conv2d, dict(in_channels=3, out_channels=5, kernel_size=1, padding=1, stride=2), (5, 6)),  # one tap
]


@pytest.mark.parametrize("scale", [1e20, 1e30])
@pytest.mark.parametrize("cls, kwargs, size", LAYERS)
def test_float32_weights_of_any_magnitude_are_normalised(cls, kwargs, size, scale):
    # sum_c |K_hat|^2 of float32 weights of magnitude 1e19 and more overflowed float32 (it was computed in float64
    # and rounded before the inverse square root): V was 0 and the layer returned its bias alone (1 x 1 kernels:
    # the square of the weight overflowed the same way). ConvNorm is scale invariant up to eps: the output must be
    # the reference's for the scaled weight, in train, eval and frozen form.
    torch.manual_seed(3)
    conv = cls(**kwargs)
    x = torch.randn((2, conv.in_channels) + size)
    want = reference(x, conv, 1e-5, scale)
    with torch.no_grad():
        conv.weight.mul_(scale)
    layer = (ConvNormConv1d if cls is nn.Conv1d else ConvNormConv2d)(conv, eps=1e-5)
    assert_close_to(layer(x), want, 1e-5)
    layer.eval()
    assert_close_to(layer(x), want, 1e-5)
    assert_close_to(layer.to_plain()(x), want, 1e-5)
    # the scale invariance itself: the unscaled weight's output with eps scaled alike
    assert_close_to(layer(x), reference(x, conv, 1e-5 / scale ** 2, 1 / scale), 1e-5)


def test_filter_and_gains_of_huge_float32_weights_are_finite_and_exact():
    torch.manual_seed(4)
    w = torch.randn(3, 2, 3, 3) * 1e25
    grid = (6, 7)
    v = convnorm_filter(w, grid, eps=1e-5)
    gains = channel_gains(w, grid)
    power = (np.abs(np.fft.fft2(np.pad(w.double().numpy(), [(0, 0), (0, 0), (0, 3), (0, 4)]))) ** 2).sum(1)
    power = power[..., : grid[1] // 2 + 1]
    assert v.dtype == gains.dtype == torch.float32
    np.testing.assert_allclose(v.double().numpy(), (power + 1e-5) ** -0.5, rtol=1e-5)
    np.testing.assert_allclose(gains.double().numpy(), power ** 0.5, rtol=1e-5)


@pytest.mark.parametrize("eps", [1e-46, 1e-60, 1e-100])
@pytest.mark.parametrize("kernel", [3, 1])
def test_an_eps_below_float32_subnormals_keeps_a_vanishing_channel_finite(eps, kernel):
    # eps is checked to be > 0 as a Python float, but in a float32 layer it was added in float32: below 1.4e-45 it
    # rounded to 0, V of a channel whose kernels all vanish was inf, and 0 * inf made that channel NaN (on every
    # input, in train, eval and frozen form). Now V is computed in float64 and clamped to float32's largest value:
    # the vanishing channel gives its bias, the others the reference's output.
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 3, kernel, padding=kernel // 2)
    with torch.no_grad():
        conv.weight[1].zero_()
    x = torch.randn(2, 3, 6, 5)
    want = reference(x, conv, eps)
    want[:, 1] = conv.bias[1].item()  # the reference's own V is huge there; its conv output is exactly 0
    layer = ConvNormConv2d(conv, eps=eps)
    assert_close_to(layer(x), want, 1e-5)
    assert_close_to(layer.eval().to_plain()(x), want, 1e-5)
    v = convnorm_filter(conv.weight, (8, 7), eps=eps)
    assert torch.isfinite(v).all()


@pytest.mark.parametrize("bias_shape", [(1,), (4, 1), (5,), ()])
def test_functional_conv_norm_refuses_a_bias_that_is_not_one_per_output_channel(bias_shape):
    # the bias is added after the normalisation by broadcasting: a 1-entry or (M, 1) bias was accepted silently
    # (a (1,) bias added one number to every channel) where torch's convolutions refuse it
    x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    bias = torch.randn(bias_shape)
    with pytest.raises(RuntimeError):
        F.conv2d(x, w, bias)
    with pytest.raises(LayerArgumentError, match="one entry per output channel"):
        conv_norm(x, w, bias, padding=1)
    # the right bias: the reference's output
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(w)
    assert_close_to(conv_norm(x, w, conv.bias, padding=1), reference(x, conv, 1e-5), 1e-5)
