"""isometric_init places a conv's delta taps by the pads torch's layer applies (session 40).

In a padding mode other than zeros, ``nn.Conv`` pads by the list its constructor computed
(``_reversed_padding_repeated_twice``), not by ``conv.padding`` as it reads now: a padding set after construction
does not change it, and ``padding="same"`` with a one-element dilation pads the first spatial dimension only. The
pass read ``conv.padding``, so a reflect conv built with padding 1 and then given padding 0 got its tap on the
mirrored border, and the layer torch runs had singular values from 0 to 2, not 1. The references are torch's own
layers: dense float64 Jacobians of their forward (autograd), and the conv's output against its input read where the module
docstring says an output position reads (``S o - p + t d``, with ``p`` torch's left pad).
"""

import math

import pytest
import torch
from torch import nn

import orthofx


def initialised(conv: nn.Module) -> nn.Module:
    """``conv`` (float64) after ``isometric_init`` (seeded; bias zeroed), as the transformed model holds it."""
    policy = {"rules": [{"match": {"type": ["Conv1d", "Conv2d"]}, "apply": "isometric_init", "with": {"seed": 0}}]}
    return orthofx.transform(nn.Sequential(conv.double()), policy).get_submodule("0")


@pytest.mark.parametrize("build", [
    lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
    lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="replicate"),
    lambda: nn.Conv1d(3, 3, 5, padding=2, padding_mode="reflect"),
], ids=["reflect-2d", "replicate-2d", "reflect-1d"])
def test_a_padding_set_after_construction_keeps_the_layer_orthogonal(build):
    conv = build()
    conv.padding = (0,) * len(conv.kernel_size)  # torch still pads by the constructor's list
    layer = initialised(conv)
    size = (5,) * len(conv.kernel_size)
    x = torch.randn(1, layer.in_channels, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    j = torch.autograd.functional.jacobian(layer, x)  # torch's own forward, differentiated by autograd
    j = j.reshape(-1, x.numel())
    assert j.shape[0] == layer.out_channels * math.prod(size)  # torch's layer keeps the size
    # orthonormal columns (out >= in): every singular value 1; the tap on the mirrored border gave 0 to 2
    torch.testing.assert_close(torch.linalg.svdvals(j), torch.ones(j.shape[1], dtype=torch.float64),
                               atol=1e-12, rtol=0)


def test_same_with_a_one_element_dilation_reads_the_output_positions_input():
    # torch pads the first spatial dimension by 2 (dilation 2, k = 3) and the second not at all, so output (i, j)
    # reads input (i, j) at tap (1, 0); the tap (1, 1) of conv.padding's reading took input (i, j + 2)
    conv = nn.Conv2d(4, 4, 3, padding="same", dilation=(2,), padding_mode="reflect")
    layer = initialised(conv)
    x = torch.randn(2, 4, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (2, 4, 5, 3)
    q = layer.weight.detach()[:, :, 1, 0]
    torch.testing.assert_close(y, torch.einsum("oi,nihw->nohw", q, x[..., :3]), atol=1e-12, rtol=0)
    assert bool(q.abs().sum() > 0)
    torch.testing.assert_close(q @ q.T, torch.eye(4, dtype=torch.float64), atol=1e-12, rtol=0)


def test_a_list_torch_cannot_pad_by_still_reads_the_padding_attribute():
    # padding=(1,) on a Conv2d in reflect mode: torch's two-entry list is one F.pad refuses for a 4-d input, so
    # the layer cannot run; the pass initialises it from conv.padding as before instead of raising
    conv = nn.Conv2d(4, 4, 3, padding=(1,), padding_mode="reflect")
    layer = initialised(conv)
    w = layer.weight.detach()
    assert bool(w[:, :, 1, 1].abs().sum() > 0) and float(w.abs().sum() - w[:, :, 1, 1].abs().sum()) == 0.0
