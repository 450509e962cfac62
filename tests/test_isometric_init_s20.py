"""isometric_init on transposed convolutions (delta-orthogonal kernels of the adjoint conv) and on frozen layers.

A ``ConvTranspose{d}d`` is the adjoint of the conv with its weight, stride, padding, dilation and groups, so the
delta-orthogonal kernel of that conv gives it the same singular values. The references below are dense float64
Jacobians built from unit vectors through plain ``nn.ConvTranspose{d}d`` (the layer is linear: its bias is
zeroed), never the pass's own tap arithmetic."""

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import orthofx
from orthofx import metrics

TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def init_policy(types=("ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Conv2d", "Linear"), **params):
    return {"rules": [{"match": {"type": list(types)}, "apply": "isometric_init", "with": params}]}


def dense_jacobian(layer: nn.Module, size: tuple[int, ...]) -> torch.Tensor:
    """``(outputs, inputs)`` matrix of the linear layer on one input of ``size``: its columns are the layer's
    responses to the unit inputs."""
    inputs = layer.in_channels * math.prod(size)
    units = torch.eye(inputs, dtype=torch.float64).reshape(inputs, layer.in_channels, *size)
    with torch.no_grad():
        return layer(units).reshape(inputs, -1).T


def singular_values_equal(j: torch.Tensor, scale: float, tol: float = 1e-10) -> bool:
    return bool((torch.linalg.svdvals(j) - scale).abs().max() < tol)


def initialised(layer: nn.Module, **params):
    """The layer after the pass (float64, bias zeroed) and its Change."""
    gm = orthofx.transform(nn.Sequential(layer.double()), init_policy(seed=0, **params))
    return gm.get_submodule("0"), orthofx.manifest_of(gm).changes[0]


# ------------------------------------------------------------------------------------ transposed convolutions

DECODERS = [  # (in, out, kernel, stride, padding, output_padding, groups, dims): the usual upsampling layers
    (8, 4, 4, 2, 1, 0, 1, 2),    # DCGAN's k = 4, S = 2, p = 1: in < out S^2, an isometry
    (16, 4, 4, 2, 1, 0, 1, 2),   # in = out S^2: orthogonal (square space-to-depth matrix)
    (32, 4, 4, 2, 1, 0, 1, 2),   # in > out S^2: a co-isometry
    (6, 4, 2, 2, 0, 0, 2, 2),    # k = S, p = 0 (U-Net's up-convolution), grouped
    (4, 4, 3, 2, 1, 1, 1, 2),    # k = 3, S = 2, p = 1, output_padding = 1: output n S
    (4, 6, 3, 1, 1, 0, 2, 1),    # stride 1 'same': the centre tap
    (3, 2, 4, 2, 1, 0, 1, 1),
    (4, 2, 3, 2, 1, 1, 2, 3),
    (8, 2, 2, 2, 0, 0, 1, 3),
]


@pytest.mark.parametrize("case", DECODERS, ids=lambda c: "C{}-M{}-k{}-s{}-p{}-o{}-g{}-{}d".format(*c))
def test_decoder_layers_get_an_exactly_orthogonal_jacobian(case):
    C, M, k, s, p, o, g, dims = case
    layer, change = initialised(TRANSPOSED[dims](C, M, k, stride=s, padding=p, output_padding=o, groups=g),
                                gain=0.5, activation="relu")
    scale = 0.5 * math.sqrt(2.0)
    j = dense_jacobian(layer, (3,) * dims)
    assert j.shape[0] == M * (3 * s) ** dims  # output size n S
    assert change.after["exact"] is True and change.after["scale"] == pytest.approx(scale)
    assert singular_values_equal(j, scale)
    # the side the Change names: columns (J^T J = s^2 I) when in <= out S^d, the transposed conv's isometry case
    gram = j.T @ j if "orthonormal columns" in change.what else j @ j.T
    assert ("orthonormal columns" in change.what) == (C <= M * s ** dims)
    torch.testing.assert_close(gram, scale ** 2 * torch.eye(len(gram), dtype=torch.float64), atol=1e-10, rtol=0)
    assert "transposed conv" in change.what and change.after["lorth"] < 1e-12
    assert layer.bias.abs().max() == 0


def test_the_cropping_decoder_without_output_padding_is_exact_only_as_a_co_isometry():
    """k = 3, S = 2, p = 1, output_padding = 0 writes n S - 1 entries: the last block's second tap writes past
    the output, so the layer is no isometry; it is a co-isometry where Q has orthonormal columns (in >= out S^d),
    which reads every output entry once."""
    wide, change = initialised(nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1))
    j = dense_jacobian(wide, (3, 3))
    assert j.shape == (4 * 25, 4 * 9)
    assert change.after["exact"] is False and not singular_values_equal(j, 1.0, tol=1e-3)
    tall, change = initialised(nn.ConvTranspose2d(16, 4, 3, stride=2, padding=1))
    j = dense_jacobian(tall, (3, 3))
    assert change.after["exact"] is True
    torch.testing.assert_close(j @ j.T, torch.eye(len(j), dtype=torch.float64), atol=1e-10, rtol=0)


@st.composite
def transposed_layers(draw):
    dims = draw(st.integers(1, 3))
    per_dim = []
    for _ in range(dims):
        k, s, d = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
        p, o = draw(st.integers(0, 2)), draw(st.integers(0, max(s, d) - 1))  # torch: output_padding < max(S, D)
        per_dim.append((k, s, d, p, o))
    groups = draw(st.integers(1, 2))
    C, M = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3 if dims < 3 else 2))
    k, s, d, p, o = (tuple(v) for v in zip(*per_dim))
    n = draw(st.integers(2, 4 if dims < 3 else 2))
    return TRANSPOSED[dims](C, M, k, stride=s, dilation=d, padding=p, output_padding=o, groups=groups), (n,) * dims


def output_size(layer: nn.Module, size: tuple[int, ...]) -> list[int]:
    return [(n - 1) * s - 2 * p + d * (k - 1) + o + 1 for n, k, s, d, p, o in
            zip(size, layer.kernel_size, layer.stride, layer.dilation, layer.padding, layer.output_padding)]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(layer_and_size=transposed_layers(), gain=st.sampled_from([1.0, 0.3, 2.5]))
def test_exact_says_whether_every_singular_value_is_the_scale(layer_and_size, gain):
    """The Change's ``exact`` against the dense Jacobian, both ways: an exact layer has all singular values equal
    to the scale on every input size; another has some other one (Q is random, so no coincidence) on some size
    (a layer with one or two outputs can be exact by accident: k = 2, S = 2, p = 2, o = 1 writes one entry at
    n = 2, and leaves every other one unwritten from n = 3 on)."""
    layer, size = layer_and_size
    assume(min(output_size(layer, size)) > 0)
    layer, change = initialised(layer, gain=gain)
    sizes = (size, (5,) * len(size) if len(size) < 3 else (3, 3, 3))
    equal = [singular_values_equal(dense_jacobian(layer, n), gain) for n in sizes]
    if change.after["exact"]:
        assert all(equal), (layer, equal)
    else:
        assert not all(equal), layer
    # the orthogonality measure is L_orth of the whole written kernel at the layer's stride and dilation
    whole = metrics.lorth(layer.weight.detach() / gain, stride=tuple(layer.stride), groups=layer.groups,
                          dilation=tuple(layer.dilation))
    assert change.after["lorth"] == pytest.approx(float(whole), rel=1e-9, abs=1e-14)


@pytest.mark.slow
def test_exact_on_a_whole_one_dimensional_grid():
    """Every 1-d configuration of a small grid (the hypothesis test samples it): no false claim, no missed one."""
    checked = claimed = 0
    for C, M in ((2, 2), (4, 2), (2, 6)):
        for k in range(1, 5):
            for s in range(1, 4):
                for d in (1, 2):
                    for p in range(3):
                        for o in range(max(s, d)):
                            if 3 * s - 2 * p + d * (k - 1) + o + 1 <= 0:
                                continue
                            layer, change = initialised(nn.ConvTranspose1d(C, M, k, s, p, o, dilation=d))
                            exact = singular_values_equal(dense_jacobian(layer, (4,)), 1.0)
                            assert change.after["exact"] is exact, (C, M, k, s, d, p, o)
                            checked, claimed = checked + 1, claimed + exact
    assert checked > 400 and claimed > 150


def test_a_transposed_conv_tied_to_its_encoder_is_the_encoder_s_adjoint():
    """A tied autoencoder (decoder.weight = encoder.weight): one matrix, written once; the decoder's Jacobian is
    the transpose of the encoder's, both exact."""
    encoder = nn.Conv2d(2, 8, 4, stride=2, padding=1, bias=False).double()
    decoder = nn.ConvTranspose2d(8, 2, 4, stride=2, padding=1, bias=False).double()
    decoder.weight = encoder.weight
    gm = orthofx.transform(nn.Sequential(encoder, decoder), init_policy(seed=1))
    changes = orthofx.manifest_of(gm).changes
    assert [c.after["exact"] for c in changes] == [True, True]
    assert "weight tied to 0" in changes[1].what
    enc, dec = gm.get_submodule("0"), gm.get_submodule("1")
    assert dec.weight is enc.weight
    j_enc, j_dec = dense_jacobian(enc, (4, 4)), dense_jacobian(dec, (2, 2))
    torch.testing.assert_close(j_dec, j_enc.T, atol=0, rtol=0)
    assert singular_values_equal(j_dec, 1.0)


# ---------------------------------------------------------------------------------------------- frozen layers

def frozen_backbone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    model[0].requires_grad_(False)  # a pretrained stem kept fixed
    return model


def test_a_frozen_layer_is_skipped_and_left_bitwise_unchanged():
    model = frozen_backbone()
    stem = {name: value.clone() for name, value in model[0].state_dict().items()}
    gm = orthofx.transform(model, init_policy(types=("Conv2d", "Linear")), inplace=True)
    for layer in (model[0], gm.get_submodule("0")):  # inplace: the user's own layer is the one rewritten
        for name, value in layer.state_dict().items():
            assert torch.equal(value, stem[name]), name
    reasons = {site.name: reason for site, _, reason in orthofx.manifest_of(gm).plan.skipped}
    assert reasons == {"0": "frozen (weight and bias requires_grad=False; with: {frozen: overwrite} initialises it)"}
    assert {c.site for c in orthofx.manifest_of(gm).changes} == {"2", "5"}  # the trainable layers still are
    assert "skipped: frozen (weight and bias" in str(orthofx.report(gm))
    w = gm.get_submodule("5").weight.detach()
    torch.testing.assert_close(w @ w.T, torch.eye(5), atol=1e-5, rtol=0)


def test_frozen_overwrite_initialises_the_frozen_layer():
    model = frozen_backbone()
    gm = orthofx.transform(model, init_policy(types=("Conv2d",), frozen="overwrite"))
    stem = gm.get_submodule("0")
    assert not torch.equal(stem.weight, model[0].weight) and not stem.weight.requires_grad
    assert [c.site for c in orthofx.manifest_of(gm).changes] == ["0", "2"]
    assert orthofx.manifest_of(gm).changes[0].after["exact"] is True
    j = dense_jacobian(stem.double(), (4, 4))
    assert singular_values_equal(j, 1.0, tol=1e-6)  # written in the model's float32


def test_a_frozen_bias_counts_only_where_the_pass_would_zero_it():
    layer = nn.Linear(4, 6)
    layer.bias.requires_grad_(False)
    with pytest.raises(orthofx.PlanError, match=r"frozen \(bias requires_grad=False"):
        orthofx.transform(nn.Sequential(layer), init_policy(types=("Linear",)))
    bias = layer.bias.detach().clone()
    gm = orthofx.transform(nn.Sequential(layer), init_policy(types=("Linear",), bias="keep"))
    assert torch.equal(gm.get_submodule("0").bias, bias)
    assert [c.site for c in orthofx.manifest_of(gm).changes] == ["0"]


def test_a_rule_selecting_only_frozen_layers_says_so_and_bad_values_are_refused():
    model = nn.Sequential(nn.ConvTranspose2d(4, 2, 4, stride=2, padding=1))
    model.requires_grad_(False)
    with pytest.raises(orthofx.PlanError, match=r"0: frozen \(weight and bias requires_grad=False; with: "
                                                r"\{frozen: overwrite\}"):
        orthofx.transform(model, init_policy(types=("ConvTranspose2d",)))
    optional = {"rules": [{**init_policy(types=("ConvTranspose2d",))["rules"][0], "optional": True}]}
    gm = orthofx.transform(model, optional)
    assert not orthofx.manifest_of(gm).changes
    assert torch.equal(gm.get_submodule("0").weight, model[0].weight)
    with pytest.raises(orthofx.PolicyError, match="parameter 'frozen' must be one of 'skip', 'overwrite'"):
        orthofx.transform(model, init_policy(frozen="yes"))
