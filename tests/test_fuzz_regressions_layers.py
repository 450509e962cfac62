"""Regressions found by fuzzing the convolution layers and their passes (random small models, every preset).

Each test reduces one defect to its minimal case and checks against an independent reference (a dense float64
operator built by applying the layer to basis vectors, or torch's own convolution).
"""

import copy
import math

import pytest
import torch
from torch import nn

import orthofx
from orthofx.nn.orthogonal import OrthogonalConv1d, OrthogonalConv2d


def dense_singular_values(layer: nn.Module, in_shape: tuple[int, ...]) -> torch.Tensor:
    """All singular values of the layer's linear part on inputs of shape ``in_shape`` (no batch), float64:
    the matrix whose columns are the layer applied to the basis vectors, minus its bias."""
    layer = copy.deepcopy(layer).double()
    n = math.prod(in_shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
    with torch.no_grad():
        columns = layer(basis) - layer(torch.zeros(1, *in_shape, dtype=torch.float64))
    return torch.linalg.svdvals(columns.reshape(n, -1).T)


@pytest.mark.parametrize("conv, size", [
    (nn.Conv2d(4, 4, 1, padding="valid"), (6, 6)),              # a 1 x 1 channel mixing
    (nn.Conv2d(2, 8, 2, stride=2, padding="valid"), (6, 4)),    # a k = S patch embedding, RO = CO here
    (nn.Conv1d(3, 2, 3, stride=3, padding="valid"), (9,)),      # k = S, M < C S
])
def test_valid_padding_that_keeps_the_size_gets_an_exact_layer(conv, size):
    """padding='valid' is padding 0: a conv whose windows are at most one stride long keeps the output size
    n / S with it, so 'orthogonal' must replace it by an exactly orthogonal layer, as it does for padding=0.
    It used to regularise it instead ("padding=valid gives another output size ..."), a wrong reason."""
    torch.manual_seed(0)
    model = nn.Sequential(conv)
    x = torch.randn(2, conv.in_channels, *size)
    zero = copy.deepcopy(conv)
    zero.padding = (0,) * len(size)
    assert zero(x).shape == conv(x).shape  # torch: 'valid' is padding 0

    gm = orthofx.transform(model, "orthogonal", example_inputs=(x,))
    layer = gm.get_submodule("0")
    assert isinstance(layer, (OrthogonalConv1d, OrthogonalConv2d))
    row = orthofx.report(gm).rows[0]
    assert row["pass"] == "orthogonal_conv (hard)"
    assert gm(x).shape == model(x).shape
    sv = dense_singular_values(layer, (conv.in_channels, *size))
    assert (sv - 1).abs().max() < 1e-5
    assert abs(row["sigma_min"] - float(sv.min())) < 1e-5 and abs(row["sigma_max"] - float(sv.max())) < 1e-5
    # k <= S: the nearest orthogonal layer is the polar factor of the reshaped kernel (Procrustes)
    w = conv.weight.detach().double().reshape(conv.out_channels, -1)
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    assert torch.allclose(layer.weight.detach().double().reshape(w.shape), u @ vh, atol=1e-5)


def test_lorth_skips_a_layer_with_an_empty_weight_instead_of_failing_in_penalty():
    """A Linear(3, 0) was given an L_orth term that orthofx.penalty then refused ('weight is empty'): the pass now
    skips it with the reason, and the penalty is the other layer's term alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 0))
    gm = orthofx.transform(model, "lorth", example_inputs=(torch.randn(2, 4),))
    w = model[0].weight.detach().double()
    expected = 0.01 * (w @ w.T - torch.eye(3, dtype=torch.float64)).square().sum()
    torch.testing.assert_close(orthofx.penalty(gm).double(), expected, rtol=1e-5, atol=1e-7)
    assert "weight is empty" in str(orthofx.explain(model, "lorth"))
