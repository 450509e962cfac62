"""Session 22: init_error after reset_parameters, and the one reader of a torch conv's zero padding."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orthofx.errors import LayerArgumentError
from orthofx.nn import ConvNormConv2d, OrthogonalConv2d, OrthogonalConvTranspose2d, OrthogonalLinear
from orthofx.nn.padding import conv_zero_pads, flat_pads


@pytest.mark.parametrize("make", [
    lambda: OrthogonalConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1), fit_steps=0),
    lambda: OrthogonalConvTranspose2d.from_conv_transpose(nn.ConvTranspose2d(4, 4, 2, stride=2), fit_steps=0),
    lambda: OrthogonalLinear.from_linear(nn.Linear(5, 3)),
], ids=["conv", "transposed", "linear"])
def test_reset_parameters_forgets_the_init_error_of_the_start_it_replaces(make):
    torch.manual_seed(0)
    layer = make()
    assert layer.init_error > 0
    layer.reset_parameters()
    # the distance was to the original layer's weights, which the re-initialised layer no longer starts from
    assert layer.init_error is None


@pytest.mark.parametrize("kernel, dilation", [((3, 3), (1, 1)), ((4, 2), (1, 1)), ((4, 3), (1, 2)), ((2, 5), (3, 1))])
def test_conv_zero_pads_of_same_matches_torch_split(kernel, dilation):
    torch.manual_seed(0)
    x, w = torch.randn(1, 2, 9, 10, dtype=torch.float64), torch.randn(3, 2, *kernel, dtype=torch.float64)
    pads = conv_zero_pads("same", kernel, dilation)
    expected = F.conv2d(x, w, padding="same", dilation=dilation)
    torch.testing.assert_close(F.conv2d(F.pad(x, flat_pads(pads)), w, dilation=dilation), expected, rtol=0, atol=1e-12)


def test_conv_zero_pads_of_numbers_and_valid():
    assert conv_zero_pads(2, (3, 3), (1, 1)) == ((2, 2), (2, 2))
    assert conv_zero_pads((0, 1), (3, 3), (1, 1)) == ((0, 0), (1, 1))
    assert conv_zero_pads("valid", (3,), (1,)) == ((0, 0),)


@pytest.mark.parametrize("padding, stride, message", [
    ("same", (2, 1), "needs stride 1"), ("full", (1, 1), "'same' or 'valid'"), ((1, 2, 3), (1, 1), "2 ints"),
    (1.5, (1, 1), "2 ints"), (-1, (1, 1), "non-negative")])
def test_conv_zero_pads_refuses_what_torch_refuses(padding, stride, message):
    with pytest.raises(LayerArgumentError, match=message):
        conv_zero_pads(padding, (3, 3), (1, 1), stride)


# ------------------------------------------------------------- ConvNorm running filters seen by torch's tooling

def _convnorm_with_filter(momentum=0.5):
    torch.manual_seed(0)
    layer = ConvNormConv2d(nn.Conv2d(3, 4, 3, padding=1), momentum=momentum).train()
    layer(torch.randn(2, 3, 8, 8))  # one training forward: a running filter for the 10 x 10 grid
    return layer


def test_running_filters_are_reachable_by_their_state_dict_names():
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    model = nn.Sequential(_convnorm_with_filter(), nn.BatchNorm2d(4))
    layer = model[0]
    assert layer.running_v_10x10 is layer.running_filter((10, 10))
    # torch.distributed.checkpoint looks every state_dict key up with getattr ("has no attribute running_v_10x10")
    expected = model.state_dict()
    got = get_model_state_dict(model)
    assert list(got) == list(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    # an unknown grid, or a name that is no grid, is the plain "no attribute" error naming that attribute (not one
    # raised on the way, e.g. by parsing "axb")
    with pytest.raises(AttributeError, match=r"^'ConvNormConv2d' object has no attribute 'running_v_12x12'$"):
        layer.running_v_12x12  # no filter for that grid
    with pytest.raises(AttributeError, match=r"^'ConvNormConv2d' object has no attribute 'running_v_axb'$"):
        layer.running_v_axb


def test_a_data_parallel_replica_keeps_its_filters_to_itself():
    layer = _convnorm_with_filter()
    before = {grid: v.clone() for grid, v in layer._running_filters.items()}
    # what nn.DataParallel's replicate does for a replica on another device, with 'meta' for that device (no
    # second GPU here): a shallow copy of the module, parameters of its own on its device
    replica = layer._replicate_for_data_parallel()
    replica.conv = layer.conv._replicate_for_data_parallel()
    replica.conv.weight = nn.Parameter(layer.conv.weight.detach().to("meta"))
    replica.conv.bias = nn.Parameter(layer.conv.bias.detach().to("meta"))
    replica(torch.randn(2, 3, 8, 8, device="meta"))  # trains on the known grid: updates the replica's copy
    replica(torch.randn(2, 3, 6, 6, device="meta"))  # a new grid, stored on the replica
    assert replica.running_filter((10, 10)).is_meta and replica.running_filter((8, 8)).is_meta
    # the layer's own filters: unchanged, on its device, and no filter of the replica's grid (before, the replica
    # wrote a meta tensor into the layer's dict and updated the layer's CPU filter with a meta one: an error)
    assert layer.running_grids == [(10, 10)]
    torch.testing.assert_close(layer.running_filter((10, 10)), before[(10, 10)], rtol=0, atol=0)
    # a replica on the layer's own device (DataParallel's first) updates the layer's tensors in place: recorded
    first = layer._replicate_for_data_parallel()
    with torch.no_grad():
        layer.conv.weight.mul_(2.0)  # as an optimizer step would: V of the weight moves, and the average with it
    first(torch.randn(2, 3, 8, 8))
    assert first.running_filter((10, 10)) is layer.running_filter((10, 10))
    assert not torch.equal(layer.running_filter((10, 10)), before[(10, 10)])


def test_numpy_integer_padding_is_read_as_torch_reads_it():
    import numpy as np
    from orthofx.passes.isometric_init import delta_taps
    assert conv_zero_pads(np.int64(1), (3, 3), (1, 1)) == ((1, 1), (1, 1))
    assert conv_zero_pads((np.int32(0), 2), (3, 3), (1, 1)) == ((0, 0), (2, 2))
    # torch's conv runs with a numpy padding, and the isometric initialiser reads the same layer
    assert delta_taps(nn.Conv2d(4, 4, 3, padding=np.int64(1))) == delta_taps(nn.Conv2d(4, 4, 3, padding=1))
    with pytest.raises(LayerArgumentError, match="2 ints"):
        conv_zero_pads(True, (3, 3), (1, 1))
