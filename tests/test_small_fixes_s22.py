"""Session 22: init_error after reset_parameters, and the one reader of a torch conv's zero padding."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orthofx.errors import LayerArgumentError
from orthofx.nn import OrthogonalConv2d, OrthogonalConvTranspose2d, OrthogonalLinear
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
