"""padding="same" with a one-element dilation and a non-zeros padding_mode.

torch keeps ``nn.Conv2d(..., padding="same", dilation=(2,), padding_mode="reflect")``'s dilation as given: its conv
dilates every dimension, but the explicit pads of the non-zeros modes (``_reversed_padding_repeated_twice``) zip the
one-element dilation with the kernel size, so only the first spatial dimension is padded and an 8 x 8 input gives
8 x 4. ConvNorm spread the dilation over every dimension (8 x 8 out: a shape error after rewriting); the
orthogonal pass built an 8 x 8 circular layer and failed with a raw broadcast RuntimeError. References: torch's own
layer and its ``_reversed_padding_repeated_twice`` (via ``F.pad``), and a dense float64 ConvNorm by explicit sums.
"""

import copy
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthofx
from orthofx.errors import ImpossibleLayerError, LayerArgumentError
from orthofx.nn.convnorm import ConvNormConv2d, ConvNormConv3d, conv_norm, convnorm_geometry
from orthofx.nn.orthogonal import OrthogonalConv2d, keeps_output_size
from test_convnorm import direct_convnorm

pytestmark = pytest.mark.usefixtures("one_thread")

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _torch_pads(conv) -> tuple:
    """torch's explicit pads of a non-zeros padding mode as (left, right) per spatial dimension, first first."""
    flat = list(conv._reversed_padding_repeated_twice)
    return tuple(reversed([(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]))


def test_mode_pads_are_torchs_own():
    """conv_mode_pads against the pads torch's layer computes, for every dimensionality and dilation form."""
    from orthofx.nn.padding import conv_mode_pads  # new in s39: imported here so the other tests run on old code
    checked = 0
    for d, dilation, kernel, padding in itertools.product(
            (1, 2, 3), ((1,), (2,), (3,), 2, "full"), (3, 2, "mixed"), ("same", "valid", 1, "tuple")):
        kernel = kernel if kernel != "mixed" else (3, 1, 4)[:d]
        dilation = tuple(range(1, d + 1)) if dilation == "full" else dilation
        padding = tuple(range(d)) if padding == "tuple" else padding
        conv = _CONV[d](1, 1, kernel, padding=padding, dilation=dilation, padding_mode="reflect")
        assert conv_mode_pads(conv.padding, conv.kernel_size, conv.dilation) == _torch_pads(conv), (
            d, dilation, kernel, padding)
        checked += 1
    assert checked == 3 * 5 * 3 * 4


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("dilation", [(2,), (1,)])
def test_convnorm_pads_one_dimension_as_torch_does(mode, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding="same", dilation=dilation, padding_mode=mode).double()
    x = torch.randn(2, 3, 8, 9, dtype=torch.float64)
    layer = ConvNormConv2d(copy.deepcopy(conv), eps=1e-3)
    got = layer(x)
    full = (dilation[0], dilation[0])
    want = direct_convnorm(F.pad(x, conv._reversed_padding_repeated_twice, mode=mode), conv.weight, conv.bias,
                           (1, 1), "valid", full, 1, 1e-3)
    assert got.shape == conv(x).shape == want.shape == (2, 4, 8, 9 - 2 * dilation[0])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # the geometry the report and freezing use, and the frozen layer (eval) on it
    assert layer.geometry((8, 9)).output_size == tuple(conv(x).shape[2:])
    frozen = layer.eval().to_plain(input_sizes=[(8, 9)])
    torch.testing.assert_close(frozen(x), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_functional_and_3d_follow_torchs_layer(mode):
    """With V = 1 ConvNorm's padding, grid and crop give the conv's output exactly: compared with torch's layer."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, (3, 2), padding="same", dilation=(2,), padding_mode=mode).double()
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64)
    padded = tuple(n + a + b for n, (a, b) in zip((7, 6), _torch_pads(conv)))
    geo = convnorm_geometry(padded, conv.kernel_size, 1, 0, 2)
    ones = torch.ones((3,) + geo.grid[:-1] + (geo.grid[-1] // 2 + 1,), dtype=torch.float64)
    out = conv_norm(x, conv.weight, conv.bias, 1, "same", (2,), padding_mode=mode, filter=ones)
    torch.testing.assert_close(out, conv(x), rtol=1e-12, atol=1e-12)
    conv3 = nn.Conv3d(2, 3, 3, padding="same", dilation=(2,), padding_mode=mode).double()
    x3 = torch.randn(1, 2, 6, 7, 8, dtype=torch.float64)
    valid = nn.Conv3d(2, 3, 3, dilation=2).double()
    valid.load_state_dict(conv3.state_dict())
    want = ConvNormConv3d(valid)(F.pad(x3, conv3._reversed_padding_repeated_twice, mode=mode))
    got = ConvNormConv3d(conv3)(x3)
    assert got.shape == conv3(x3).shape == (1, 3, 6, 3, 4)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_convnorm_refuses_an_input_the_unpadded_dimension_cannot_hold():
    """The second dimension is not padded: an input narrower than the dilated kernel there fails in torch's layer,
    and ConvNorm says so with the pads torch uses (it padded that dimension too and gave an output)."""
    conv = nn.Conv2d(2, 2, 3, padding="same", dilation=(2,), padding_mode="replicate")
    x = torch.randn(1, 2, 8, 4)
    with pytest.raises(RuntimeError):
        conv(x)
    with pytest.raises(LayerArgumentError, match=r"input size \(8, 4\) \(padded by \[\(2, 2\), \(0, 0\)\]\) is "
                                                  r"smaller than the dilated kernel extent 5"):
        ConvNormConv2d(conv)(x)


def test_convnorm_preset_records_torchs_grid():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding="same", dilation=(2,), padding_mode="reflect")
    x = torch.randn(2, 4, 8, 8)
    gm = orthofx.transform(nn.Sequential(conv), "convnorm", example_inputs=(x,))
    with torch.no_grad():
        assert gm(x).shape == conv(x).shape == (2, 4, 8, 4)
    (change,) = [c for c in gm.meta["orthofx"].changes if c.pass_name == "convnorm"]
    # L = padded size + (k_e - 1) per dimension, torch's pads: (8 + 4) + 4 and 8 + 4
    assert change.after["grid"] == [16, 12]


def _orthogonal_policy(padding, on_impossible="error"):
    return {"rules": [{"match": {"type": ["Conv1d", "Conv2d"]}, "apply": "orthogonal_conv",
                       "with": {"padding": padding, "on_impossible": on_impossible}}]}


@pytest.mark.parametrize("mode,padding", [("reflect", "circular"), ("circular", "circular"),
                                          ("circular", "keep"), ("replicate", "circular")])
def test_orthogonal_pass_refuses_with_the_cause_and_fix(mode, padding):
    conv = nn.Conv2d(4, 4, 3, padding="same", dilation=(2,), padding_mode=mode)
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ImpossibleLayerError) as info:
        orthofx.transform(nn.Sequential(conv), _orthogonal_policy(padding), example_inputs=(x,))
    text = str(info.value)
    assert f"padding_mode={mode!r}" in text and "dilation=(2,)" in text and "write dilation=(2, 2)" in text
    assert "RuntimeError" not in text and "0 (Conv2d(4->4, k=3, s=1, d=2))" in text  # names the layer


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_orthogonal_preset_keeps_the_layer_and_its_outputs(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding="same", dilation=(2,), padding_mode=mode))
    x = torch.randn(2, 4, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = orthofx.transform(model, "orthogonal", example_inputs=(x,))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
    (change,) = gm.meta["orthofx"].changes
    assert change.status.startswith("regularised") and "dilation=(2,)" in change.what


def test_orthogonal_from_conv_keep_refuses_and_the_fix_works():
    conv = nn.Conv2d(4, 4, 3, padding="same", dilation=(2,), padding_mode="circular")
    assert not keeps_output_size(conv)
    with pytest.raises(LayerArgumentError, match=r"padding_mode='circular' and the one-element dilation=\(2,\).*"
                                                  r"write dilation=\(2, 2\)"):
        OrthogonalConv2d.from_conv(conv, padding="keep")
    fixed = nn.Conv2d(4, 4, 3, padding="same", dilation=(2, 2), padding_mode="circular")
    assert keeps_output_size(fixed)
    x = torch.randn(1, 4, 8, 8)
    layer = OrthogonalConv2d.from_conv(fixed, padding="keep", fit_steps=0)
    with torch.no_grad():
        assert layer(x).shape == fixed(x).shape == (1, 4, 8, 8)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 4, 3, padding="same", dilation=(2,)),                                # zeros: F.conv pads both
    nn.Conv2d(4, 4, (3, 1), padding="same", dilation=(2,), padding_mode="circular"),  # nothing to pad in dim 2
    nn.Conv1d(4, 4, 3, padding="same", dilation=(2,), padding_mode="circular"),
], ids=["zeros", "k1-later", "conv1d"])
def test_one_element_dilation_that_stays_same_is_replaced(conv):
    """Where torch's layer does keep the size, the orthogonal layer replaces it with the same output shape."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, *(8,) * (conv.weight.dim() - 2))
    assert keeps_output_size(conv)
    gm = orthofx.transform(nn.Sequential(conv), _orthogonal_policy("circular"), example_inputs=(x,))
    (change,) = gm.meta["orthofx"].changes
    assert change.status == "hard"
    with torch.no_grad():
        assert gm(x).shape == conv(x).shape


def test_transposed_one_element_dilation_matches_torch():
    """ConvTranspose takes zeros padding only (no 'same'): the one-element dilation broadcasts as in torch."""
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(4, 4, 4, stride=2, padding=1, dilation=(1,))
    x = torch.randn(2, 4, 6, 6)
    gm = orthofx.transform(nn.Sequential(conv), "orthogonal", example_inputs=(x,))
    with torch.no_grad():
        assert gm(x).shape == conv(x).shape == (2, 4, 12, 12)



@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_isometric_init_does_not_claim_an_isometry(mode):
    """isometric_init read such a conv as size-keeping (keeps_output_size) and recorded 'exact': True (orthonormal
    Jacobian columns) for a layer mapping 4 x 8 x 8 inputs to 4 x 8 x 4 outputs, which no isometry does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding="same", dilation=(2,), padding_mode=mode, bias=False))
    x = torch.randn(1, 4, 8, 8)
    policy = {"rules": [{"match": {"type": "Conv2d"}, "apply": "isometric_init"}]}
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    (change,) = gm.meta["orthofx"].changes
    jac = torch.autograd.functional.jacobian(lambda v: gm(v.view(1, 4, 8, 8)).reshape(-1),
                                             x.reshape(-1)).double()
    # 128 outputs of 256 inputs: J^T J has rank at most 128, so no such layer is an isometry
    assert jac.shape == (4 * 8 * 4, 4 * 8 * 8)
    assert change.after["exact"] is False


def test_zero_padding_with_a_one_element_dilation_is_still_read_as_padding():
    """padding_mode='zeros' pads every dimension (F.conv's own 'same'): 'padding: keep' gives the zero-padded layer
    of torch's output size, reported as orthogonal away from the borders only."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, (1, 3), padding="same", dilation=(2,))
    x = torch.randn(2, 4, 8, 8)
    gm = orthofx.transform(nn.Sequential(conv), _orthogonal_policy("keep"), example_inputs=(x,))
    (change,) = gm.meta["orthofx"].changes
    assert change.status == "hard (zero padding: not at borders)"
    with torch.no_grad():
        assert gm(x).shape == conv(x).shape == (2, 4, 8, 8)


@pytest.mark.parametrize("conv", [
    lambda: nn.Conv2d(4, 4, 3, padding=0),
    lambda: nn.Conv2d(4, 4, 3, padding="same", dilation=(2,), padding_mode="reflect"),
], ids=["valid", "one_element_same"])
def test_pre_svd_hard_layer_without_example_inputs_keeps_the_output_size(conv):
    """pre_svd's 'weight: orthogonal' checked the hard layer's output size on the example inputs only: without
    them a circular 'same' layer replaced a conv of another output size (6 x 6 -> 8 x 8, 8 x 4 -> 8 x 8)."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = conv()

        def forward(self, x):
            return torch.linalg.svdvals(self.c(x).flatten(2))

    torch.manual_seed(0)
    model = Model()
    x = torch.randn(2, 4, 8, 8)
    policy = {"rules": [{"match": {"feeds": ["linalg.svdvals"]}, "apply": "pre_svd",
                         "with": {"weight": "orthogonal", "padding": "circular", "nog": False, "olr": False}}]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = orthofx.transform(model, policy)
    (change,) = gm.meta["orthofx"].changes
    assert "fallback" in change.after and "L_orth" in change.status
    with torch.no_grad():
        assert gm.c(x).shape == model.c(x).shape
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
