"""One-element conv size tuples (``stride=(2,)``, ``dilation=(2,)``, ``padding=(1,)``, ``output_padding=(1,)``),
which torch's convs apply to every dimension, read the same way by metrics, theory and the orthogonal layers
(``orthofx.nn.padding.per_dimension``). Before, metrics._tuple, theory._sizes and nn.orthogonal._tuple refused
them (the orthogonal and lorth presets failed on such a torch model) and the orthogonal module's size helpers
zipped them against the kernel size, reading one dimension only."""

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthofx
from orthofx import metrics, theory
from orthofx.errors import ArgumentError, LayerArgumentError
from orthofx.nn.orthogonal import (OrthogonalConv2d, build_stride, rko_problem, transposed_keeps_output_size,
                                   transposed_size_keeping_padding)
from orthofx.nn.padding import per_dimension


def _sizes(full: bool, value: int, d: int):
    return (value,) * d if full else (value,)


# ------------------------------------------------------------------------------------------ presets

PRESET_MODELS = {
    "strided conv and transposed conv": (
        lambda f: nn.Sequential(
            nn.Conv2d(4, 8, 3, stride=_sizes(f, 2, 2), padding=_sizes(f, 1, 2)), nn.Tanh(),
            nn.ConvTranspose2d(8, 4, 3, stride=_sizes(f, 2, 2), padding=_sizes(f, 1, 2),
                               output_padding=_sizes(f, 1, 2))),
        (2, 4, 8, 8)),
    "dilated conv": (
        lambda f: nn.Sequential(nn.Conv2d(4, 4, 3, padding=_sizes(f, 2, 2), dilation=_sizes(f, 2, 2))),
        (2, 4, 8, 8)),
    "strided dilated 3-d conv": (
        lambda f: nn.Sequential(nn.Conv3d(2, 8, 3, stride=_sizes(f, 2, 3), padding=3, dilation=_sizes(f, 3, 3))),
        (1, 2, 8, 8, 8)),
}


def _transformed(build, full: bool, preset: str, x: torch.Tensor):
    torch.manual_seed(0)
    model = build(full)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = orthofx.transform(model, preset, example_inputs=(x,))
    return model, gm


@pytest.mark.parametrize("name", list(PRESET_MODELS))
def test_orthogonal_preset_reads_one_element_sizes_as_torch_does(name):
    build, shape = PRESET_MODELS[name]
    torch.manual_seed(2)
    x = torch.randn(shape)
    short_model, short = _transformed(build, False, "orthogonal", x)
    full_model, full = _transformed(build, True, "orthogonal", x)
    # the same torch model either way (torch applies the one element to every dimension)
    assert torch.equal(short_model(x), full_model(x))
    # before: ArgumentError "orthogonal_conv_exists: stride must be an int or a tuple of 2 ints (dims=2), got (2,)"
    assert torch.equal(short(x), full(x))
    assert str(orthofx.report(short)) == str(orthofx.report(full))
    assert not any(type(m) in (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d) for m in short.modules())


def test_orthogonal_layer_keeping_a_one_element_padding():
    policy = {"orthofx": 1, "rules": [{"name": "keep", "match": {"type": ["Conv2d"]}, "apply": "orthogonal_conv",
                                       "with": {"padding": "keep", "fit_steps": 0}}]}

    def build(f):
        return nn.Sequential(nn.Conv2d(4, 8, 3, stride=_sizes(f, 2, 2), padding=_sizes(f, 1, 2)))

    x = torch.randn(2, 4, 8, 8)
    _, short = _transformed(build, False, policy, x)
    _, full = _transformed(build, True, policy, x)
    # before: LayerArgumentError "padding must be an int or a tuple of 2 ints for a 2-D convolution, got (1,)"
    assert torch.equal(short(x), full(x))
    assert str(orthofx.report(short)) == str(orthofx.report(full))


@pytest.mark.parametrize("stride, dilation", [((2,), 1), (1, (2,)), ((2,), (3,))])
def test_lorth_preset_penalty_of_one_element_sizes(stride, dilation):
    def build(f):
        s = stride if not f else (stride[0],) * 2 if isinstance(stride, tuple) else stride
        dl = dilation if not f else (dilation[0],) * 2 if isinstance(dilation, tuple) else dilation
        return nn.Sequential(nn.Conv2d(4, 8, 3, stride=s, dilation=dl, padding=2))

    x = torch.randn(2, 4, 12, 12)
    _, short = _transformed(build, False, "lorth", x)
    model, full = _transformed(build, True, "lorth", x)
    assert torch.equal(short(x), full(x))
    # before: ArgumentError "stride must be an int or a tuple of 2 ints for a 2-D convolution, got (2,)"
    p_short, p_full = orthofx.penalty(short), orthofx.penalty(full)
    assert p_short.item() > 0 and p_short.item() == p_full.item()
    g_short = torch.autograd.grad(p_short, [p for p in short.parameters() if p.dim() == 4])
    g_full = torch.autograd.grad(p_full, [p for p in full.parameters() if p.dim() == 4])
    assert all(torch.equal(a, b) for a, b in zip(g_short, g_full))
    # independent of the rewrite: L_orth of the conv's dilated kernel at the full stride, times the preset's weight
    weight = model[0].weight.detach().double()
    s = (stride[0],) * 2 if isinstance(stride, tuple) else (stride,) * 2
    dl = (dilation[0],) * 2 if isinstance(dilation, tuple) else (dilation,) * 2
    reference = metrics.lorth(metrics.dilated_kernel(weight, dl), stride=s)
    assert float(p_short) == pytest.approx(0.01 * float(reference), rel=1e-5)


def test_lorth_preset_report_of_a_one_element_dilation():
    def build(f):
        return nn.Sequential(nn.Conv2d(4, 8, 3, dilation=_sizes(f, 2, 2), padding=2))

    x = torch.randn(2, 4, 12, 12)
    _, short = _transformed(build, False, "lorth", x)
    _, full = _transformed(build, True, "lorth", x)
    # before: the report's L_orth column raised "dilation must be an int or a tuple of 2 ints ..., got (2,)"
    assert str(orthofx.report(short)) == str(orthofx.report(full))


# ------------------------------------------------------------------------------------------ the orthogonal layer


def test_orthogonal_layer_takes_one_element_sizes():
    torch.manual_seed(0)
    short = OrthogonalConv2d(4, 8, 3, stride=(2,), padding=(1,), dilation=(1,))
    torch.manual_seed(0)
    full = OrthogonalConv2d(4, 8, 3, stride=(2, 2), padding=(1, 1), dilation=(1, 1))
    assert (short.stride, short.padding, short.dilation) == ((2, 2), (1, 1), (1, 1))
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(short(x), full(x))


def test_size_helpers_read_every_dimension():
    # a 3 x 5 kernel with padding=(1,), stride=(2,), output_padding=(1,): the second dimension gives torch's
    # transposed conv 2 n + 2 outputs, not 2 n; the zip over the one-element tuples read the first dimension only
    conv = nn.ConvTranspose2d(2, 2, (3, 5), stride=(2,), padding=(1,), output_padding=(1,))
    assert conv(torch.randn(1, 2, 4, 4)).shape[-2:] == (8, 10)
    assert not transposed_keeps_output_size((1,), (1,), (3, 5), (2,), (1,))
    assert transposed_keeps_output_size((1,), (1,), (3, 3), (2,), (1,))
    assert transposed_size_keeping_padding((3, 5), (2,), (1,)) == ((1, 2), (1, 1))
    assert transposed_size_keeping_padding((3, 5), (2,), (1,)) == transposed_size_keeping_padding((3, 5), (2, 2),
                                                                                                 (1, 1))
    assert build_stride((3, 3), (2,), (2,)) == (1, 1) == build_stride((3, 3), (2, 2), (2, 2))
    assert rko_problem((2, 3), (2,), (1,)) == rko_problem((2, 3), (2, 2), (1, 1)) is not None


# ------------------------------------------------------------------------------------------ metrics and theory


def _dense_circular_conv(weight: torch.Tensor, n: int, stride: int) -> torch.Tensor:
    """The matrix of the circular strided conv ``y[m, i] = sum K[m, c, p] x[c, (S i + p) mod n]``, column by
    column through F.conv2d (a slow reference)."""
    M, C, k, _ = weight.shape
    basis = torch.eye(C * n * n, dtype=torch.float64).reshape(-1, C, n, n)
    padded = F.pad(basis, [0, k - 1, 0, k - 1], mode="circular")
    return F.conv2d(padded, weight, stride=stride).reshape(C * n * n, -1).T


def test_conv_singular_values_of_a_one_element_stride():
    torch.manual_seed(0)
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    short = metrics.conv_singular_values(weight, 6, stride=(2,))
    full = metrics.conv_singular_values(weight, (6, 6), stride=(2, 2))
    dense = torch.linalg.svdvals(_dense_circular_conv(weight, 6, 2))
    assert torch.equal(short, full)
    assert torch.allclose(short.sort(descending=True).values, dense.sort(descending=True).values, atol=1e-10)


def test_lorth_and_dilated_kernel_of_one_element_sizes():
    torch.manual_seed(0)
    weight = torch.randn(8, 3, 3, 3, dtype=torch.float64)
    for stride, dilation in (((2,), (1,)), ((1,), (2,)), ((2,), (3,)), ((3,), 2)):
        full_stride = (stride[0],) * 2
        full_dilation = (dilation[0],) * 2 if isinstance(dilation, tuple) else dilation
        assert metrics.lorth(weight, stride=stride, dilation=dilation) == \
            metrics.lorth(weight, stride=full_stride, dilation=full_dilation)
    reference = torch.zeros(8, 3, 5, 5, dtype=torch.float64)
    reference[:, :, ::2, ::2] = weight
    assert torch.equal(metrics.dilated_kernel(weight, (2,)), reference)


def test_theory_of_one_element_sizes():
    for c_in, c_out, k, s, dl in ((4, 8, 3, 2, 1), (4, 16, 3, 2, 2), (4, 12, 2, 2, 2), (2, 16, 3, 3, 3),
                                  (16, 8, 1, 2, 1), (4, 32, 3, 2, 1)):
        for dims in (1, 2, 3):
            short = theory.orthogonal_conv_exists(c_in, c_out, k, stride=(s,), dims=dims, dilation=(dl,))
            full = theory.orthogonal_conv_exists(c_in, c_out, (k,) * dims, stride=(s,) * dims, dims=dims,
                                                 dilation=(dl,) * dims)
            assert short == full
            assert theory.orthogonality_case(c_in, c_out, stride=(s,), dims=dims) == full.case
            assert theory.theorem8_constants(c_in, c_out, k, stride=(s,), dims=dims) == \
                theory.theorem8_constants(c_in, c_out, k, stride=(s,) * dims, dims=dims)
    # the stride squares into the case: 12 > 4 * 2 but 12 <= 4 * 2 ** 2
    assert theory.orthogonality_case(4, 12, stride=(2,), dims=2) == "RO"


# ------------------------------------------------------------------------------------------ bad sizes


@pytest.mark.parametrize("bad, message", [
    (0, "stride must be >= 1, got 0"),
    (-2, "stride must be >= 1, got -2"),
    ((0,), "stride must be >= 1, got 0"),
    ((2, 2, 2), "stride must be an int or a tuple of 2 ints for a 2-D convolution, got (2, 2, 2)"),
    ((), "stride must be an int or a tuple of 2 ints for a 2-D convolution, got ()"),
    (1.5, "stride must be a positive integer, got 1.5"),
    ((2.0,), "stride must be a positive integer, got 2.0"),
    (True, "stride must be a positive integer, got True"),
    ((True,), "stride must be a positive integer, got True"),
])
def test_metrics_refuse_bad_sizes(bad, message):
    weight = torch.randn(4, 2, 3, 3)
    with pytest.raises(ArgumentError, match=re.escape(message) + "$"):
        metrics.lorth(weight, stride=bad)
    with pytest.raises(ArgumentError, match=re.escape(message.replace("stride", "dilation")) + "$"):
        metrics.dilated_kernel(weight, bad)
    with pytest.raises(ArgumentError, match=re.escape(message) + "$"):
        metrics.conv_singular_values(weight, 8, stride=bad)


def test_input_size_and_kernel_size_keep_one_value_per_dimension():
    # torch's nn.Conv2d(2, 2, (3,)) builds a 1-d weight that its forward refuses; an input size cut to one
    # dimension is a mistake, not a square grid
    weight = torch.randn(4, 2, 3, 3)
    with pytest.raises(ArgumentError, match=re.escape("input_size must be an int or a tuple of 2 ints for a 2-D "
                                                      "convolution, got (8,)")):
        metrics.conv_singular_values(weight, (8,))
    with pytest.raises(ArgumentError, match=re.escape("orthogonal_conv_exists: kernel_size must be an int or a "
                                                      "tuple of 2 ints (dims=2), got (3,)")):
        theory.orthogonal_conv_exists(4, 8, (3,), stride=(2,))
    with pytest.raises(LayerArgumentError, match=re.escape("kernel_size must be an int or a tuple of 2 ints for a "
                                                           "2-D convolution, got (3,)")):
        OrthogonalConv2d(4, 8, (3,))


@pytest.mark.parametrize("bad, message", [
    ((0,), "stride must be >= 1, got 0"),
    ((-1,), "stride must be >= 1, got -1"),
    ((2, 2, 2), "stride must be an int or a tuple of 2 ints (dims=2), got (2, 2, 2)"),
    ((1.5,), "stride must be a positive integer, got 1.5"),
    ((False,), "stride must be a positive integer, got False"),
    (range(1, 3), "stride must be an int or a tuple of 2 ints (dims=2), got range(1, 3)"),
])
def test_theory_refuses_bad_sizes(bad, message):
    with pytest.raises(ArgumentError, match="^" + re.escape("orthogonal_conv_exists: " + message) + "$"):
        theory.orthogonal_conv_exists(4, 8, 3, stride=bad)
    with pytest.raises(ArgumentError, match="^" + re.escape("orthogonal_conv_exists: " + message.replace(
            "stride", "dilation")) + "$"):
        theory.orthogonal_conv_exists(4, 8, 3, dilation=bad)


@pytest.mark.parametrize("bad, message", [
    ((0,), "stride must be an integer >= 1, got 0"),
    ((2, 2, 2), "stride must be an int or a tuple of 2 ints for a 2-D convolution, got (2, 2, 2)"),
    ((2.0,), "stride must be an integer >= 1, got 2.0"),
    ((True,), "stride must be an integer >= 1, got True"),
])
def test_orthogonal_layer_refuses_bad_sizes(bad, message):
    with pytest.raises(LayerArgumentError, match=re.escape(message) + "$"):
        OrthogonalConv2d(4, 8, 3, stride=bad)
    with pytest.raises(LayerArgumentError, match=re.escape(message.replace("stride", "dilation")) + "$"):
        OrthogonalConv2d(4, 8, 3, dilation=bad)


def test_per_dimension_options():
    assert per_dimension((2,), 3, "stride") == (2, 2, 2)
    assert per_dimension([1, 2], 2, "stride") == (1, 2)
    with pytest.raises(LayerArgumentError, match=re.escape("stride must be an int or 2 ints (one per spatial "
                                                           "dimension), got (1, 2, 3)")):
        per_dimension((1, 2, 3), 2, "stride")
    with pytest.raises(ArgumentError, match=re.escape("kernel_size must be two ints, got (3,)")):
        per_dimension((3,), 2, "kernel_size", broadcast=False, error=ArgumentError, expected="two ints")
    assert per_dimension(3, 2, "kernel_size", broadcast=False) == (3, 3)
    assert per_dimension(("4",), 2, "size", item=int) == (4, 4)
