"""Review of session 35's ConvNorm pre-hook change (review_s35b).

``ConvNormConvNd.gain_range`` / ``filter`` and ``update_running_filters`` ran every forward pre-hook of the conv on
a probe of zeros (shape ``1 x C_in x kernel``) so as to read the weight the hooks compute (prune, the older
weight_norm). On a conv whose weight is its own parameter no hook can have replaced the weight, yet the hooks ran
anyway: a hook checking its input's size raised ``AssertionError`` out of ``gain_range``, and a counting or
input-statistics hook saw one call (of zeros) per query. They run now only where ``conv.weight`` is no parameter
(``_refresh_hooked_weight``). The reference is a float64 FFT of the weight, computed here.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

from orthofx.nn import ConvNormConv2d, update_running_filters

EPS = 1e-5


def _power64(weight: torch.Tensor, grid) -> torch.Tensor:
    """``sum_c |K_hat_{m,c}(w)|^2`` on the rfft half of ``grid`` (float64)."""
    spectrum = torch.fft.rfftn(weight.detach().double(), s=tuple(grid), dim=(2, 3))
    return spectrum.abs().square().sum(1)


class _CheckingHook:
    """A pre-hook that checks the input's spatial size and records each input's mean absolute value."""

    def __init__(self):
        self.seen: list[float] = []

    def __call__(self, module, args):
        assert args[0].shape[-1] >= 8, f"input of width {args[0].shape[-1]}: expected at least 8"
        self.seen.append(float(args[0].detach().abs().mean()))


def _layer_with_checking_hook(momentum=None):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    hook = _CheckingHook()
    conv.register_forward_pre_hook(hook)
    layer = ConvNormConv2d(conv, momentum=momentum)
    layer(torch.randn(2, 3, 8, 8))
    assert len(hook.seen) == 1  # the forward runs the hook, on the real input
    return layer, hook


@pytest.mark.parametrize("training", [True, False])
def test_gain_range_and_filter_leave_the_pre_hooks_of_a_parameter_weight_unrun(training):
    layer, hook = _layer_with_checking_hook()
    layer.train(training)
    geo, low, high = layer.gain_range((8, 8))
    power = _power64(layer.conv.weight, geo.grid)
    assert low == pytest.approx(power.min().sqrt().item(), rel=1e-6)
    assert high == pytest.approx(power.max().sqrt().item(), rel=1e-6)
    v = layer.filter((8, 8))
    torch.testing.assert_close(v.double(), (power + EPS).rsqrt(), rtol=1e-5, atol=0)
    assert len(hook.seen) == 1  # no probe call of zeros


def test_update_running_filters_leaves_the_pre_hooks_of_a_parameter_weight_unrun():
    layer, hook = _layer_with_checking_hook(momentum=0.1)
    with torch.no_grad():
        layer.conv.weight.mul_(torch.linspace(0.5, 2.0, 4).reshape(4, 1, 1, 1))
    assert update_running_filters(layer) == 1
    (grid,) = layer.running_grids
    running = layer.running_filter(grid)
    torch.testing.assert_close(running.double(), (_power64(layer.conv.weight, grid) + EPS).rsqrt(), rtol=1e-5,
                               atol=0)
    assert len(hook.seen) == 1


def test_a_pruned_conv_is_still_read_as_its_hooks_compute_it():
    """The weight prune's hook sets (``weight_orig * weight_mask``) after an optimizer step, not the last forward's."""
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune.random_unstructured(conv, "weight", amount=0.4)
    layer = ConvNormConv2d(conv)
    layer(torch.randn(2, 3, 8, 8)).square().sum().backward()
    torch.optim.SGD(layer.parameters(), lr=0.5).step()
    geo, low, high = layer.gain_range((8, 8))
    power = _power64(conv.weight_orig * conv.weight_mask, geo.grid)
    assert low == pytest.approx(power.min().sqrt().item(), rel=1e-6)
    assert high == pytest.approx(power.max().sqrt().item(), rel=1e-6)


def test_gain_range_keeps_the_mode_of_each_submodule_of_the_conv():
    """A pre-hook computing the weight with a submodule of the conv kept in eval (its dropout off): running the hooks
    in eval and back left that submodule in the conv's training mode, so the next forward dropped weights."""
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    base = conv.weight.detach().clone()
    del conv._parameters["weight"]
    conv.base = nn.Parameter(base)
    conv.generator = nn.Dropout(0.5)
    conv.register_forward_pre_hook(lambda module, args: setattr(module, "weight", module.generator(module.base) * 1.0))
    conv.weight = conv.base * 1.0
    layer = ConvNormConv2d(conv).train()
    conv.generator.eval()
    geo, low, high = layer.gain_range((8, 8))
    assert conv.training and not conv.generator.training
    power = _power64(base, geo.grid)  # the generator in eval is the identity
    assert low == pytest.approx(power.min().sqrt().item(), rel=1e-6)
    assert high == pytest.approx(power.max().sqrt().item(), rel=1e-6)
    torch.testing.assert_close(layer.conv.weight.detach(), base, rtol=0, atol=0)  # no weight dropped
