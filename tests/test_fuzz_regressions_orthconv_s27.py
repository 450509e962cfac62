"""Regressions found by fuzzing the orthogonal_conv pass (session 27), each checked against a dense float64
reference (tests/references.py) or a precise error."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthofx
from orthofx.nn.orthogonal import OrthogonalConv1d, OrthogonalConv2d
from references import circular_operator64, lorth64


def rule(kind, **params):
    return {"rules": [{"match": {"type": kind}, "apply": "orthogonal_conv", "with": params}]}


def dilated64(weight: torch.Tensor, dilation: int) -> torch.Tensor:
    """A 1-D kernel with ``dilation - 1`` zeros between its taps (float64): the undilated kernel of the same
    operator, so that the dense references, which know no dilation, apply."""
    w = weight.detach().to(torch.float64)
    out = w.new_zeros(*w.shape[:2], dilation * (w.shape[2] - 1) + 1)
    out[..., ::dilation] = w
    return out


def max_sigma_error(operator: torch.Tensor) -> float:
    return float((torch.linalg.svdvals(operator) - 1).abs().max())


# --- method rko with a dilation that shares a factor with the stride -----------------------------------------
# k = S = D = 2 reads one residue mod S, so the kernel is built for stride S / gcd(D, S) = 1 and needs blocks,
# which rko has none of. The pass checked k <= S only: the layer's constructor then raised a LayerArgumentError
# that on_impossible (skip, regularize) did not handle and that named no site.

def test_rko_with_dilation_sharing_the_stride_follows_on_impossible():
    torch.manual_seed(0)
    conv = nn.Conv1d(6, 4, 2, stride=2, dilation=2, padding=1)
    model = nn.Sequential(conv)
    with pytest.raises(orthofx.ImpossibleLayerError) as info:
        orthofx.transform(model, rule("Conv1d", method="rko"))
    message = str(info.value)
    assert "0 (Conv1d(6->4, k=2, s=2, d=2))" in message
    assert "kernel_size <= stride / gcd(dilation, stride) = (1,)" in message
    assert "kernel_size=(2,), stride=(2,), dilation=(2,)" in message and "on_impossible: regularize" in message

    skipped = orthofx.transform(model, rule("Conv1d", method="rko", on_impossible="skip"))
    assert type(skipped.get_submodule("0")) is nn.Conv1d
    assert orthofx.manifest_of(skipped).changes[0].status.startswith("skipped: method rko")

    regularized = orthofx.transform(model, rule("Conv1d", method="rko", on_impossible="regularize",
                                                regularize_weight=1.0))
    expected = lorth64(dilated64(conv.weight, 2), stride=2)  # the dense operator's Gram error
    assert float(orthofx.penalty(regularized).detach()) == pytest.approx(expected, rel=1e-5)

    # the layer exists (Theorem 4 with dilation): method auto builds it, exactly orthogonal on the dense operator
    auto = orthofx.transform(model, rule("Conv1d")).get_submodule("0")
    assert isinstance(auto, OrthogonalConv1d) and auto.method == "bcop"
    assert max_sigma_error(circular_operator64(dilated64(auto.weight, 2), stride=2, grid=(8,))) <= 1e-5

    # a dilation coprime to the stride (gcd(3, 2) = 1) still takes rko where k <= S
    conv = nn.Conv1d(2, 4, 2, stride=2, dilation=3, padding=1)
    layer = orthofx.transform(nn.Sequential(conv), rule("Conv1d", method="rko")).get_submodule("0")
    assert layer.method == "rko"
    assert max_sigma_error(circular_operator64(dilated64(layer.weight, 3), stride=2, grid=(8,))) <= 1e-5
    # with the dilated taps at nn.Conv1d's offsets: the layer is that circular operator
    x = torch.randn(3, 2, 8, dtype=torch.float64)
    ref = F.conv1d(F.pad(x, (1, 1), mode="circular"), layer.weight.detach().double(), layer.bias.detach().double(),
                   stride=2, dilation=3)
    assert torch.allclose(layer.double()(x), ref, atol=1e-12)


def test_rko_transposed_with_dilation_sharing_the_stride_follows_on_impossible():
    module = nn.ConvTranspose1d(4, 6, 2, stride=2, dilation=2, padding=1, output_padding=1)
    model = nn.Sequential(module)
    with pytest.raises(orthofx.ImpossibleLayerError, match=r"stride / gcd\(dilation, stride\) = \(1,\)"):
        orthofx.transform(model, rule("ConvTranspose1d", method="rko"))
    skipped = orthofx.transform(model, rule("ConvTranspose1d", method="rko", on_impossible="skip"))
    assert type(skipped.get_submodule("0")) is nn.ConvTranspose1d


# --- padding: keep for a reflect / replicate conv that pads nothing ------------------------------------------
# 'padding: keep' refused every padding_mode but zeros and circular ("use 'padding: circular'"), and 'padding:
# circular' refused the 'valid' conv ("use 'padding: keep'"): no setting replaced it, although such a conv has no
# boundary at all.

def test_padding_keep_of_replicate_conv_without_padding():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3, padding=0, padding_mode="replicate")
    x = torch.randn(2, 2, 6, 6)
    gm = orthofx.transform(nn.Sequential(conv), rule("Conv2d", padding="keep"), example_inputs=(x,))
    layer = gm.get_submodule("0")
    assert isinstance(layer, OrthogonalConv2d)
    out = gm(x)
    # no padding: the plain convolution with the layer's kernel, the outputs whose windows fit
    ref = F.conv2d(x.double(), layer.weight.detach().double(), layer.bias.detach().double())
    assert out.shape == conv(x).shape and torch.allclose(out.double(), ref, atol=1e-5)
    change = orthofx.manifest_of(gm).changes[0]
    before = conv(x).detach().double()
    expected = float((out.detach().double() - before).norm() / before.norm())
    assert change.after["output_change"] == pytest.approx(expected, rel=1e-5)
    # those outputs are rows of the circular operator, which is orthogonal (CO here: 4 > 2)
    assert max_sigma_error(circular_operator64(layer.weight, grid=(6, 6))) <= 1e-5
    # a conv that does pad with its reflect / replicate boundary is still refused 'padding: keep'
    padded = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
    with pytest.raises(orthofx.PlanError, match="padding_mode='reflect' with 'padding: keep'"):
        orthofx.transform(nn.Sequential(padded), rule("Conv2d", padding="keep"))


def test_padding_keep_of_reflect_pointwise_conv_is_exactly_orthogonal():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 1, padding="valid", padding_mode="reflect", bias=False)
    x = torch.randn(1, 4, 5, 5)
    gm = orthofx.transform(nn.Sequential(conv), rule("Conv2d", padding="keep"), example_inputs=(x,))
    assert orthofx.manifest_of(gm).changes[0].status == "hard"
    layer = gm.get_submodule("0")
    assert max_sigma_error(circular_operator64(layer.weight, grid=(5, 5))) <= 1e-5
    ref = F.conv2d(x.double(), layer.weight.detach().double())
    assert torch.allclose(gm(x).double(), ref, atol=1e-5)

