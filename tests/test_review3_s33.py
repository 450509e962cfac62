"""Review of session 33's ConvNorm eval cache (commit 2fab41d): ``V`` (and a 1 x 1 layer's scale) kept for eval-mode
forwards without gradients is keyed by the conv's parameters, but is made of ``conv.weight``, which need not be one
of them: a weight held as a buffer (an in-place write bumped its version, which the key did not see) or the
attribute ``torch.nn.utils.prune`` sets next to ``weight_orig`` (pruning again assigns a new tensor) kept the ``V``
of the weight before.

Each output is checked against a float64 reference written here (1 x 1: the plain conv with channel ``m`` scaled by
``(||w_m||^2 + eps)^(-1/2)``; k x k: the filter from the FFT of each zero-padded kernel) and, bit for bit, against
the functional ``conv_norm``, which keeps nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn
from torch.nn import functional as F

from orthofx.nn.convnorm import ConvNormConv2d, conv_norm


def reference_output(conv: nn.Conv2d, eps: float, x: torch.Tensor) -> torch.Tensor:
    """ConvNorm of a 1 x 1 conv at padding 0 in float64: the conv with each output channel scaled."""
    w = conv.weight.detach().double()
    scale = (w.flatten(1).square().sum(1) + eps).rsqrt()
    y = F.conv2d(x.double(), w) * scale.view(1, -1, 1, 1)
    return y if conv.bias is None else y + conv.bias.detach().double().view(1, -1, 1, 1)


def reference_filter(weight: torch.Tensor, grid, eps: float, dilation=(1, 1)) -> torch.Tensor:
    """``(sum_c |FFT(K_{m,c} dilated, zero-padded onto the grid)|^2 + eps)^(-1/2)``, rfft half spectrum, float64."""
    w = weight.detach().double()
    padded = w.new_zeros(w.shape[:2] + tuple(grid))
    (a, b), (k, l) = dilation, w.shape[2:]
    padded[:, :, : a * (k - 1) + 1 : a, : b * (l - 1) + 1 : b] = w
    power = torch.fft.fft2(padded).abs().square().sum(1)
    return (power[..., : grid[-1] // 2 + 1] + eps).rsqrt()


def fresh(layer: ConvNormConv2d, x: torch.Tensor) -> torch.Tensor:
    conv = layer.conv
    return conv_norm(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                     eps=layer.eps, padding_mode=conv.padding_mode)


def kept_values(layer: ConvNormConv2d) -> dict:
    entry = layer.__dict__.get("_eval_cache")
    return {} if entry is None else entry[3]


def check(layer: ConvNormConv2d, x: torch.Tensor) -> None:
    with torch.no_grad():
        y = layer(x)
        assert torch.equal(y, fresh(layer, x))
        if layer.conv.kernel_size == (1, 1):
            torch.testing.assert_close(y.double(), reference_output(layer.conv, layer.eps, x), rtol=1e-5, atol=1e-5)
        else:
            (kind, grid), v = next(iter(kept_values(layer).items()))
            assert kind == "filter"
            dilation = layer.conv.dilation
            dilation = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
            torch.testing.assert_close(v.double(), reference_filter(layer.conv.weight, grid, layer.eps, dilation),
                                       rtol=1e-5, atol=0)


def buffer_weight_layer(k: int) -> ConvNormConv2d:
    conv = nn.Conv2d(3, 4, k, padding=k // 2)
    weight = conv.weight.detach().clone()
    del conv.weight
    conv.register_buffer("weight", weight)  # a frozen conv: its weight is state, not a parameter
    return ConvNormConv2d(conv).eval()


@pytest.mark.parametrize("k", [3, 1])
def test_in_place_write_to_a_buffer_weight_drops_the_kept_filter(k):
    torch.manual_seed(0)
    layer = buffer_weight_layer(k)
    x = torch.randn(2, 3, 8, 8)
    check(layer, x)
    with torch.no_grad():
        layer.conv.weight.mul_(3.0).add_(torch.randn_like(layer.conv.weight))  # bumps the buffer's version
    check(layer, x)


@pytest.mark.parametrize("k", [3, 1])
def test_pruning_again_drops_the_kept_filter(k):
    # prune keeps the parameter as weight_orig and sets conv.weight = weight_orig * weight_mask, a new tensor at
    # each call: the conv's parameters (weight_orig, bias) are the same objects, untouched, the second time
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, k, padding=k // 2)
    layer = ConvNormConv2d(conv).eval()
    x = torch.randn(2, 3, 8, 8)
    prune.l1_unstructured(conv, "weight", amount=0.25)
    check(layer, x)
    prune.l1_unstructured(conv, "weight", amount=0.5)
    check(layer, x)


def test_a_buffer_weight_still_keeps_its_filter_while_unchanged():
    torch.manual_seed(0)
    layer = buffer_weight_layer(3)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        layer(x)
        (key, v), = kept_values(layer).items()
        layer(x)
        assert kept_values(layer)[key] is v


@pytest.mark.parametrize("k", [3, 1])
def test_dilation_set_to_an_int_after_construction(k):
    # the forward takes conv.dilation = 2 (as the constructor does); the cache's key made tuple(2) of it and every
    # eval forward without gradients raised TypeError: 'int' object is not iterable
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, k, padding=k // 2)
    layer = ConvNormConv2d(conv).eval()
    x = torch.randn(2, 3, 9, 9)
    conv.dilation = 2
    check(layer, x)
    check(layer, x)  # kept
    conv.dilation = [1, 1]
    check(layer, x)
    conv.dilation[0] = 2  # in place: the key holds a copy
    check(layer, x)


# ---- ConditionMonitor.update without its no_grad decorator (commit 8467070): buffers that require grad


def test_monitor_buffer_that_requires_grad_is_written_out_of_autograd():
    from orthofx.nn import ConditionMonitor

    monitor = ConditionMonitor(history_size=3)
    monitor.running_max.requires_grad_(True)  # a leaf: an in-place write under autograd raises
    lam = torch.tensor([0.5, 1.0, 2.0], requires_grad=True)
    kappa = monitor(lam)
    assert float(kappa) == 2.0 / 0.5 and not kappa.requires_grad
    assert monitor.running_max.item() == 4.0 and monitor.running_max.grad_fn is None
    assert int(monitor.updates) == 1


def test_monitor_substituted_buffers_carry_no_gradient():
    from orthofx.nn import ConditionMonitor

    monitor = ConditionMonitor(history_size=3)
    source = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    running_max = source * 1.0  # a non-leaf that requires grad, e.g. a state handed to functional_call
    history = torch.zeros(3, dtype=torch.float64) + source
    kappa = torch.func.functional_call(monitor, {"running_max": running_max, "history_buffer": history},
                                       (torch.tensor([[1.0, 10.0], [1.0, 2.0]]),))
    assert float(kappa) == 10.0 and not kappa.requires_grad
    assert running_max.item() == 10.0 and history.tolist() == [10.0, 3.0, 3.0]
    # no node of the monitor's writes in the graph: the tensors keep the nodes that made them
    assert type(running_max.grad_fn).__name__ == "MulBackward0"
    assert type(history.grad_fn).__name__ == "AddBackward0"
