"""ConvNorm wrapping a conv that has forward pre-hooks (session 34).

ConvNorm convolves with ``conv.weight`` itself and never called the conv, so the conv's forward pre-hooks never ran:
a pruned conv (``torch.nn.utils.prune``: ``weight = weight_orig * weight_mask`` recomputed by a pre-hook) kept the
weight tensor of the last recomputation, whose graph the first backward freed, so the second training step raised
"Trying to backward through the graph a second time"; a pre-hook changing the input was skipped. The reference is
a ConvNorm around a plain conv holding the weight the hooks compute, and the input they pass on.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

from orthofx.errors import OrthofxError
from orthofx.nn.convnorm import ConvNormConv1d, ConvNormConv2d


def _plain_twin(conv: nn.Module, weight: torch.Tensor) -> nn.Module:
    twin = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                      padding_mode=conv.padding_mode, dtype=weight.dtype)
    with torch.no_grad():
        twin.weight.copy_(weight)
        if conv.bias is not None:
            twin.bias.copy_(conv.bias)
    return twin


@pytest.mark.parametrize("momentum", [None, 0.1])
def test_a_pruned_conv_trains_several_steps_like_a_plain_conv_with_the_masked_weight(momentum):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1, stride=2, dtype=torch.float64)
    prune.l1_unstructured(conv, "weight", amount=0.5)
    mask = conv.weight_mask.clone()
    layer = ConvNormConv2d(conv, momentum=momentum)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    for _ in range(3):
        twin = ConvNormConv2d(_plain_twin(conv, conv.weight_orig.detach() * mask))
        y = layer(x)
        torch.testing.assert_close(y, twin(x), rtol=1e-12, atol=1e-12)
        signs = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
        opt.zero_grad()
        (y * signs).sum().backward()  # the second step raised: the weight of the first step's graph
        (twin(x) * signs).sum().backward()
        # d/d weight_orig of f(weight_orig * mask) = mask * f'(weight)
        torch.testing.assert_close(conv.weight_orig.grad, mask * twin.conv.weight.grad, rtol=1e-10, atol=1e-12)
        opt.step()
    if momentum is None:  # eval recomputes V of the weight the hook computes now, not of the last training one
        layer.eval()
        with torch.no_grad():
            expected = ConvNormConv2d(_plain_twin(conv, conv.weight_orig * mask))(x)
            torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_old_style_weight_norm_conv_trains_two_steps_with_the_weight_it_recomputes():
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated
        conv = nn.utils.weight_norm(nn.Conv1d(4, 5, 3, padding=1, dtype=torch.float64))
    layer = ConvNormConv1d(conv)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(3, 4, 11, dtype=torch.float64)
    for _ in range(2):
        g, v = conv.weight_g.detach(), conv.weight_v.detach()
        expected = g * v / v.flatten(1).norm(dim=1).reshape(-1, 1, 1)
        torch.testing.assert_close(layer(x), ConvNormConv1d(_plain_twin(conv, expected))(x), rtol=1e-12, atol=1e-12)
        opt.zero_grad()
        layer(x).square().sum().backward()
        opt.step()
    assert conv.weight_g.grad is not None and conv.weight_v.grad is not None


def test_an_input_pre_hook_of_the_conv_changes_what_convnorm_filters():
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, 3, padding=1, dtype=torch.float64)
    twin = ConvNormConv2d(_plain_twin(conv, conv.weight.detach()))
    layer = ConvNormConv2d(conv)
    x = torch.randn(2, 2, 7, 7, dtype=torch.float64)
    handle = conv.register_forward_pre_hook(lambda module, args: (2 * args[0] + 1,))
    torch.testing.assert_close(layer(x), twin(2 * x + 1), rtol=1e-12, atol=1e-12)
    handle.remove()
    conv.register_forward_pre_hook(lambda module, args, kwargs: ((args[0].flip(-1),), kwargs), with_kwargs=True)
    conv.register_forward_pre_hook(lambda module, args: None)  # None keeps the input
    torch.testing.assert_close(layer(x), twin(x.flip(-1)), rtol=1e-12, atol=1e-12)


def test_a_pre_hook_returning_two_inputs_is_refused_with_the_reason():
    conv = nn.Conv2d(2, 3, 3)
    conv.register_forward_pre_hook(lambda module, args: (args[0], args[0]))
    with pytest.raises(OrthofxError, match="returned 2 inputs.*one tensor"):
        ConvNormConv2d(conv)(torch.randn(1, 2, 5, 5))


def test_forward_hooks_of_the_conv_do_not_run():
    conv = nn.Conv2d(2, 3, 3)
    seen = []
    conv.register_forward_hook(lambda module, args, out: seen.append(out))
    ConvNormConv2d(conv)(torch.randn(1, 2, 5, 5))
    assert seen == []


def test_a_pre_hook_returning_a_non_tensor_or_keywords_is_refused_with_what_it_returned():
    conv = nn.Conv2d(2, 3, 3)
    handle = conv.register_forward_pre_hook(lambda module, args: 3.0)
    with pytest.raises(OrthofxError, match="returned a float, not a tensor"):
        ConvNormConv2d(conv)(torch.randn(1, 2, 5, 5))
    handle.remove()
    # nn.Module's call would pass the keywords to conv.forward, which takes none (a TypeError); ConvNorm dropped them
    conv.register_forward_pre_hook(lambda module, args, kwargs: (args, {"scale": 2}), with_kwargs=True)
    with pytest.raises(TypeError):
        conv(torch.randn(1, 2, 5, 5))
    with pytest.raises(OrthofxError, match=r"keyword arguments \['scale'\]"):
        ConvNormConv2d(conv)(torch.randn(1, 2, 5, 5))


def test_a_with_kwargs_pre_hook_returning_no_pair_is_refused_with_what_torch_requires():
    conv = nn.Conv2d(2, 3, 3)
    conv.register_forward_pre_hook(lambda module, args, kwargs: args, with_kwargs=True)
    with pytest.raises(OrthofxError, match=r"with_kwargs=True returned a tuple.*\(args, kwargs\)"):
        ConvNormConv2d(conv)(torch.randn(1, 2, 5, 5))
