"""ConvNorm of a conv module in a non-zeros padding mode pads by the pads torch's layer uses: the list nn.Conv
computes once in its constructor (``_reversed_padding_repeated_twice``), not ``conv.padding`` read again.
Derived from ``conv.padding``, ``padding=(1,)`` on a Conv2d (torch's F.pad refuses its 2-entry list) ran, and a
padding set after construction (torch keeps the constructor's pads) gave another output size. The references are
torch's own layer (its output shape, its explicit pads through F.pad) and the float64 ``direct_convnorm``."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthofx
from orthofx.errors import LayerArgumentError
from orthofx.nn.convnorm import ConvNormConv1d, ConvNormConv2d, conv_norm
from orthofx.nn.padding import conv_mode_pads, stale_mode_pads, torch_mode_pads

from test_convnorm import direct_convnorm

MODES = ["reflect", "replicate", "circular"]


def _reference(conv, x, eps):
    """ConvNorm of ``conv`` by its definition, on the input padded exactly as torch's layer pads it."""
    xp = F.pad(x.double(), list(conv._reversed_padding_repeated_twice), mode=conv.padding_mode)
    dil = conv.dilation * 2 if len(conv.dilation) == 1 else conv.dilation
    return direct_convnorm(xp, conv.weight.detach(), conv.bias, conv.stride, (0, 0), dil, conv.groups, eps)


@pytest.mark.parametrize("mode", MODES)
def test_one_element_padding_refused_as_torch_refuses_it(mode):
    conv = nn.Conv2d(2, 2, 3, padding=(1,), padding_mode=mode)
    x = torch.randn(1, 2, 6, 6)
    with pytest.raises(NotImplementedError):
        conv(x)  # torch's own layer: F.pad refuses 2 pads for a 4-d input
    layer = ConvNormConv2d(conv)
    for run in (lambda: layer.train()(x), lambda: layer.eval()(x), lambda: layer.geometry((6, 6)),
                lambda: layer.to_plain([(6, 6)])):
        with pytest.raises(LayerArgumentError, match=r"torch's own layer cannot run with it either") as info:
            run()
        text = str(info.value)
        assert "ConvNormConv2d" in text and "padding=(1,)" in text and f"padding_mode={mode!r}" in text
        assert "padding=(1, 1)" in text  # the fix
    # transform without example inputs: the result no longer runs where the original cannot
    model = orthofx.transform(nn.Sequential(nn.Conv2d(2, 2, 3, padding=(1,), padding_mode=mode)), "convnorm")
    with pytest.raises(LayerArgumentError, match="cannot run with it either"):
        model(x)
    # a 1-d conv's one-element padding is its whole padding: it runs, as torch's does
    conv1 = nn.Conv1d(2, 2, 3, padding=(1,), padding_mode=mode)
    x1 = torch.randn(1, 2, 7)
    assert ConvNormConv1d(conv1)(x1).shape == conv1(x1).shape


@pytest.mark.parametrize("mode", MODES)
def test_padding_set_after_construction_pads_as_torch(mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode)
    conv.padding = (2, 2)  # torch's layer keeps padding by 1
    x = torch.randn(2, 2, 6, 6)
    expected = conv(x).shape
    assert expected[2:] == (6, 6)
    model = nn.Sequential(copy.deepcopy(conv), nn.Flatten())  # deepcopy keeps torch's list
    layer = ConvNormConv2d(conv, eps=1e-3)
    ref = _reference(conv, x, 1e-3)
    assert layer.geometry((6, 6)).output_size == (6, 6)
    y = layer.train()(x)
    assert y.shape == expected
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.eval()(x).double(), ref, rtol=1e-4, atol=1e-5)
    frozen = layer.to_plain([(6, 6)])
    torch.testing.assert_close(frozen(x).double(), ref, rtol=1e-4, atol=1e-5)
    # transform with the example input: the original's shapes, so no "a pass broke the model's shapes"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = orthofx.transform(model, "convnorm", x)(x)
    assert out.shape == model(x).shape


@pytest.mark.parametrize("mode", MODES)
def test_extra_zero_entries_follow_torch(mode):
    # padding=(0, 0, 1) on a Conv2d: torch's list pads the last dimension only and the channels by 0; it runs
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 2, 3, padding=(0, 0, 1), padding_mode=mode)
    x = torch.randn(1, 2, 6, 5)
    assert torch_mode_pads(conv, "conv") == ((0, 0), (1, 1))
    layer = ConvNormConv2d(conv, eps=1e-3)
    xp = F.pad(x.double(), [1, 1, 0, 0], mode=mode)
    ref = direct_convnorm(xp, conv.weight.detach(), conv.bias, (1, 1), (0, 0), (1, 1), 1, 1e-3)
    y = layer(x)
    assert y.shape == conv(x).shape == (1, 2, 4, 5)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.to_plain([(6, 5)])(x).double(), ref, rtol=1e-4, atol=1e-5)
    # a non-zero channel pad: torch's layer fails on the channel count; ConvNorm names the cause
    bad = nn.Conv2d(2, 2, 3, padding=(1, 1, 1), padding_mode=mode)
    with pytest.raises(RuntimeError):
        bad(x)
    with pytest.raises(LayerArgumentError, match="pads the channels"):
        ConvNormConv2d(bad)(x)


def test_torch_mode_pads_is_torchs_list_and_functional_form_unchanged():
    for cls, d in ((nn.Conv1d, 1), (nn.Conv2d, 2), (nn.Conv3d, 3)):
        for padding in (0, 2, "same", "valid", (1,) * d, tuple(range(d))):
            for dilation in (1, 2, (2,), (1,) * d):
                conv = cls(1, 1, 3, padding=padding, dilation=dilation, padding_mode="reflect")
                flat = []
                for pair in reversed(torch_mode_pads(conv, "conv")):
                    flat += list(pair)
                assert flat == list(conv._reversed_padding_repeated_twice)
                assert torch_mode_pads(conv, "conv") == conv_mode_pads(padding, conv.kernel_size, dilation)
    # the functional form has no module: padding=(1,) applies to every dimension, as before
    x, w = torch.randn(1, 2, 6, 6), torch.randn(2, 2, 3, 3)
    y = conv_norm(x, w, padding=(1,), padding_mode="reflect", eps=1e-3)
    ref = direct_convnorm(F.pad(x.double(), [1, 1, 1, 1], mode="reflect"), w, None, (1, 1), (0, 0), (1, 1), 1, 1e-3)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["circular", "reflect"])
def test_orthogonal_pass_refuses_a_padding_torch_does_not_pad_by(mode):
    # built with padding=0 (torch's list pads nothing), then padding=(1, 1) set: the layer maps 8 x 8 to 6 x 6; an
    # orthogonal layer rebuilt from conv.padding gave 8 x 8 (silently without example inputs)
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 4, 3, padding=0, padding_mode=mode)
    conv.padding = (1, 1)
    model = nn.Sequential(conv)
    x = torch.randn(1, 4, 8, 8)
    expected = model(x)
    assert expected.shape == (1, 4, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for inputs in ((x,), ()):
            out = orthofx.transform(copy.deepcopy(model), "orthogonal", *inputs)(x)
            assert out.shape == expected.shape
    assert "pads by [(0, 0), (0, 0)]" in stale_mode_pads(conv)
    assert stale_mode_pads(nn.Conv2d(4, 4, 3, padding=1, padding_mode=mode)) is None
    # a conv torch's layer cannot run: the orthogonal preset no longer returns a model that runs
    broken = nn.Sequential(nn.Conv2d(4, 4, 3, padding=(1,), padding_mode=mode))
    with pytest.raises(NotImplementedError):
        broken(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = orthofx.transform(broken, "orthogonal")
    with pytest.raises(NotImplementedError):
        model(x)


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_isometric_init_does_not_call_a_stale_padding_exact(mode):
    """keeps_output_size read conv.padding: a conv built with padding=0 and given padding=(1, 1) afterwards (torch
    still pads by 0: 8 x 8 -> 6 x 6) was read as size-keeping, and isometric_init recorded 'exact': True for a map
    of 256 inputs to 144 outputs, which no isometry is."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=0, padding_mode=mode, bias=False)
    conv.padding = (1, 1)
    model = nn.Sequential(conv)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert model(x).shape == (1, 4, 6, 6)  # torch's layer: the pads of its constructor
    policy = {"rules": [{"match": {"type": "Conv2d"}, "apply": "isometric_init"}]}
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    (change,) = gm.meta["orthofx"].changes
    assert change.after["exact"] is False
    with torch.no_grad():
        assert gm(x).shape == (1, 4, 6, 6)
