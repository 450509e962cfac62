"""Regressions: isometry_moments in half precision, orthogonality_error's messages naming it, and frozen layers
keeping their original's requires_grad."""

import pytest
import torch
from torch import nn

import orthofx
from orthofx import metrics
from orthofx.errors import ArgumentError
from orthofx.nn import OrthogonalConv2d, OrthogonalConvTranspose2d, OrthogonalLinear


# ------------------------------------------------------------------------------------------ isometry_moments


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_isometry_moments_of_half_precision_singular_values_match_float64(dtype):
    # sigma up to 100: sigma^4 = 1e8 overflows float16 (max 65504) once sigma > 16
    sigma = torch.tensor([[0.5, 3.0, 17.0, 40.0, 100.0], [1.0, 1.0, 2.0, 16.5, 99.0]]).to(dtype)
    m1, m2 = metrics.isometry_moments(sigma, n=7)
    assert m1.dtype == m2.dtype == torch.float32
    # reference: the same (rounded) values, moments summed one by one in Python floats (float64)
    for row, a, b in zip(sigma.tolist(), m1, m2):
        ref1 = sum(s ** 2 for s in row) / 7
        ref2 = sum(s ** 4 for s in row) / 7
        assert float(a) == pytest.approx(ref1, rel=1e-6)
        assert float(b) == pytest.approx(ref2, rel=1e-6)
    # wider inputs are not narrowed: float64 stays float64 (exact against the same sum)
    m1, m2 = metrics.isometry_moments(sigma.double(), n=7)
    assert m2.dtype == torch.float64 and float(m2[0]) == sum(s ** 4 for s in sigma[0].tolist()) / 7


# ------------------------------------------------------------------------------------------ orthogonality_error


@pytest.mark.parametrize("weight, size", [(torch.randn(4, 4, 3, 3), 4), (torch.randn(3, 5), None)],
                         ids=["conv", "linear"])
def test_orthogonality_error_of_meta_weights_names_itself(weight, size):
    with pytest.raises(ArgumentError, match=r"^orthogonality_error: the weight is on the meta device"):
        metrics.orthogonality_error(weight.to("meta"), input_size=size)
    # the function called directly still names itself
    call = (lambda w: metrics.conv_singular_values(w, size)) if size else metrics.linear_singular_values
    with pytest.raises(ArgumentError, match=r"^(conv|linear)_singular_values: the weight is on the meta device"):
        call(weight.to("meta"))


def test_orthogonality_error_of_a_huge_grid_names_itself():
    weight = torch.randn(64, 64, 1, 1)
    with pytest.raises(ArgumentError, match=r"^orthogonality_error: the operator on an input of size "
                                            r"\(32768, 32768\) .* more than 2147483648"):
        metrics.orthogonality_error(weight, input_size=(1 << 15, 1 << 15))


# ------------------------------------------------------------------------------------------ requires_grad


def _cayley():
    return OrthogonalConv2d(4, 4, 3, method="cayley_fft", input_size=(6, 6))


LAYERS = {
    "conv": lambda: OrthogonalConv2d(4, 4, 3),
    "conv-even-kernel": lambda: OrthogonalConv2d(4, 4, 2),  # asymmetric padding: Sequential(pad, conv)
    "cayley_fft": _cayley,  # FourierConv: the bias only (the symbol is a buffer)
    "transposed": lambda: OrthogonalConvTranspose2d(4, 4, 4, stride=2, padding=1),  # ConvTranspose + CircularFold
    "linear": lambda: OrthogonalLinear(6, 4),
}


def _freeze_part(layer: nn.Module, part: str) -> None:
    """``part``: "all" (requires_grad_(False)), "bias" or "weight" (the parameters standing for the weight)."""
    for name, p in layer.named_parameters():
        is_bias = name.rsplit(".", 1)[-1] == "bias"
        if part == "all" or (part == "bias") == is_bias:
            p.requires_grad_(False)


def _flags(frozen: nn.Module) -> dict[str, set[bool]]:
    flags = {"weight": set(), "bias": set()}
    for name, p in frozen.named_parameters():
        flags["bias" if name.rsplit(".", 1)[-1] == "bias" else "weight"].add(p.requires_grad)
    return flags


def _expected(kind: str, part: str) -> dict[str, set[bool]]:
    weight = {True} if part == "bias" else {False}
    return {"weight": set() if kind == "cayley_fft" else weight, "bias": {part == "weight"}}


@pytest.mark.parametrize("part", ["all", "bias", "weight"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_to_plain_keeps_the_layers_requires_grad(kind, part):
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    _freeze_part(layer, part)
    assert _flags(layer.to_plain()) == _expected(kind, part)
    trainable = LAYERS[kind]()
    assert _flags(trainable.to_plain()) == {"weight": set() if kind == "cayley_fft" else {True}, "bias": {True}}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_freeze_of_a_model_with_a_frozen_orthogonal_layer_keeps_it_frozen(kind):
    torch.manual_seed(0)
    layer = LAYERS[kind]().requires_grad_(False)
    if kind == "linear":
        model, x = nn.Sequential(layer, nn.Linear(4, 2)), torch.randn(2, 6)
    else:
        side = 3 if kind == "transposed" else 6  # the transposed conv doubles it to the head's 6 x 6
        model, x = nn.Sequential(layer, nn.Flatten(), nn.Linear(4 * 6 * 6, 2)), torch.randn(2, 4, side, side)
    head = model[-1]
    frozen = orthofx.freeze(model, example_inputs=(x,))
    head_copy = [p for p in frozen.parameters() if p.shape == head.weight.shape or p.shape == head.bias.shape]
    baked = [p for p in frozen.parameters() if all(p is not q for q in head_copy)]
    assert len(head_copy) == 2 and all(p.requires_grad for p in head_copy)
    assert baked and not any(p.requires_grad for p in baked), [(n, p.requires_grad)
                                                               for n, p in frozen.named_parameters()]
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model.eval()(x), atol=1e-5, rtol=1e-5)
