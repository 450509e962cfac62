"""Review of the built-in models (session 38): docstring figures, architecture, registry arguments, presets.

Found and fixed: ``orthofx.models`` raised plain ``ValueError`` (not ``ArgumentError``) until something else had
imported ``orthofx.errors`` (the package loads its submodules lazily); ``get(name, **kwargs)`` let a misspelt
keyword through to Python's ``TypeError``; ``example_input`` let an out-of-range seed reach torch's raw
'Overflow when unpacking long long'; ``ResNet18`` / ``ResNet50`` / ``VGG11`` took no ``in_channels`` (ResNet's
base class and DeepCNN do).
"""

from __future__ import annotations

import copy
import re
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import orthofx
from orthofx import errors, models

pytestmark = pytest.mark.usefixtures("one_thread")

# the smallest sizes that still have every layer
SMALL = {
    "resnet18": {"width": 1},
    "resnet50": {"width": 1},
    "vgg11": {"width": 1},
    "small_cnn": {"width": 2},
    "dbn_cnn": {"width": 2},
    "gcp_cnn": {"width": 2, "dim": 3},
    "deep_mlp": {"depth": 2, "width": 4},
    "deep_cnn": {"depth": 2, "width": 2},
    "deep_linear": {"depth": 2, "width": 4},
}


def _build(name: str, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return models.get(name, **{**SMALL[name], **overrides})


def _convs(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


# ------------------------------------------------------------------------------------------------ error types


def test_package_models_raise_orthofx_errors_before_orthofx_errors_is_imported(monkeypatch):
    """``import orthofx`` is lazy: in a fresh process ``orthofx.models.get("resnt18")`` raised a plain ValueError,
    so ``except orthofx.ArgumentError`` did not catch it (the models looked their error types up in sys.modules
    only). Reproduced in-process by hiding orthofx.errors from sys.modules; monkeypatch puts the real one back."""
    real = errors
    monkeypatch.delitem(sys.modules, "orthofx.errors")
    monkeypatch.setattr(orthofx, "errors", real)  # importing a fresh copy rebinds the package attribute
    calls = [(lambda: models.get("resnt18"), "ArgumentError"), (lambda: models.DeepMLP(num_classes=0), "ArgumentError"),
             (lambda: models.UpperTriangle(2)(torch.ones(3)), "LayerArgumentError")]
    for call, expected in calls:
        with pytest.raises(ValueError) as info:
            call()
        fresh = sys.modules.get("orthofx.errors")
        assert fresh is not None and fresh is not real, "orthofx.models did not import orthofx.errors"
        assert type(info.value) is getattr(fresh, expected)


# ------------------------------------------------------------------------------------------------ registry


def test_get_refuses_an_unknown_keyword_with_the_valid_ones():
    """``get("resnet18", widht=8)`` raised Python's TypeError ('unexpected keyword argument')."""
    with pytest.raises(errors.ArgumentError) as info:
        models.get("resnet18", widht=8)
    message = str(info.value)
    assert message.startswith("ResNet18: unknown argument 'widht' (did you mean 'width'?)")
    assert "width=64, num_classes=10, in_channels=3" in message
    with pytest.raises(errors.ArgumentError, match=r"DeepLinear: unknown argument 'num_classes'.*out_features=64"):
        models.get("deep_linear", num_classes=3)  # a regression model: out_features, not num_classes
    with pytest.raises(errors.ArgumentError, match="unknown argument 'activation'"):
        models.get("small_cnn", activation="relu")


@pytest.mark.parametrize("name", models.names())
def test_every_keyword_get_lists_builds_the_model(name):
    """The keywords the error lists are the ones the model takes: each given alone (at its listed default) builds
    the same model as no keyword, and the listed defaults are the constructor's."""
    with pytest.raises(errors.ArgumentError) as info:
        models.get(name, not_an_argument=1)
    listed = re.search(r"takes (.*)$", str(info.value)).group(1)
    pairs = dict(item.split("=", 1) for item in listed.split(", "))
    cls = type(_build(name))
    for key, text in pairs.items():
        value = eval(text)  # the listed defaults are literals (ints, floats, strings)
        kwargs = {k: v for k, v in SMALL[name].items() if k != key}
        torch.manual_seed(1)
        given = models.get(name, **kwargs, **{key: value})
        torch.manual_seed(1)
        plain = cls(**kwargs)
        assert type(given) is cls and given.state_dict().keys() == plain.state_dict().keys(), key
        assert all(torch.equal(a, b) for a, b in zip(given.state_dict().values(), plain.state_dict().values())), key


def test_example_input_seeds_at_the_ends_of_torchs_range():
    """seed=2**64 raised torch's raw ValueError 'Overflow when unpacking long long'."""
    for seed in (-2**63, 2**64 - 1):
        a, b = models.example_input("deep_mlp", seed=seed), models.example_input("deep_mlp", seed=seed)
        assert a.shape == (2, 64) and a.dtype == torch.float32 and torch.equal(a, b)
    for seed in (2**64, -2**63 - 1):
        with pytest.raises(errors.ArgumentError, match=r"example_input: seed must be an integer in \[-2\*\*63"):
            models.example_input("deep_mlp", seed=seed)


@pytest.mark.parametrize("function", [models.example_input, models.input_shape, models.num_classes, models.get])
def test_bad_names_are_argument_errors_listing_every_model(function):
    for bad in ("VGG11", "resnet-18", None, 18):
        with pytest.raises(errors.ArgumentError) as info:
            function(bad)
        assert str(info.value).endswith("available models: " + ", ".join(sorted(SMALL)))
    with pytest.raises(errors.ArgumentError, match="did you mean 'vgg11'"):
        function("VGG11")


def test_example_input_is_standard_normal_of_the_models_shape():
    for name in models.names():
        x = models.example_input(name, batch=3, seed=7)
        reference = torch.randn((3,) + models.input_shape(name), generator=torch.Generator().manual_seed(7))
        assert x.dtype == torch.float32 and torch.equal(x, reference), name
        assert models.get(name, **SMALL[name]).eval()(x).shape[0] == 3


# -------------------------------------------------------------------------------------------- in_channels


@pytest.mark.parametrize("name, depths, block", [("resnet18", [2, 2, 2, 2], models.BasicBlock),
                                                ("resnet50", [3, 4, 6, 3], models.Bottleneck)])
def test_resnets_take_in_channels_like_their_base_class(name, depths, block):
    """ResNet(in_channels=...) existed, but ResNet18 / ResNet50 (and so ``get``) refused the keyword."""
    model = _build(name, width=2, in_channels=1)
    torch.manual_seed(0)
    reference = models.ResNet(block, depths, width=2, in_channels=1)
    assert model.conv1.weight.shape == (2, 1, 3, 3)
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(model.eval()(x), reference.eval()(x), rtol=0, atol=0)
    with pytest.raises(errors.ArgumentError, match=f"{type(model).__name__}: in_channels must be a positive"):
        models.get(name, width=2, in_channels=0)


def test_vgg11_takes_in_channels():
    model = _build("vgg11", width=2, in_channels=1).eval()
    first = model.features[0]
    assert isinstance(first, nn.Conv2d) and first.weight.shape == (2, 1, 3, 3)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    with pytest.raises(errors.ArgumentError, match="VGG11: in_channels must be a positive integer"):
        models.get("vgg11", in_channels=True)


# ------------------------------------------------------------------------------ documented figures, structure


def _resnet_parameter_count(expansion: int, depths: list[int], width: int, classes: int = 10) -> int:
    """Parameters of the CIFAR ResNet counted from the architecture (conv weights, BatchNorm affine, fc)."""
    conv_bn = lambda c_in, c_out, k: c_in * c_out * k * k + 2 * c_out  # noqa: E731 - conv (no bias) + BN
    total, c_in = conv_bn(3, width, 3), width
    for stage, blocks in enumerate(depths):
        planes = width * 2**stage
        for j in range(blocks):
            out = planes * expansion
            if expansion == 1:
                total += conv_bn(c_in, planes, 3) + conv_bn(planes, planes, 3)
            else:
                total += conv_bn(c_in, planes, 1) + conv_bn(planes, planes, 3) + conv_bn(planes, out, 1)
            if (stage > 0 and j == 0) or c_in != out:
                total += conv_bn(c_in, out, 1)
            c_in = out
    return total + c_in * classes + classes


def _documented(cls: type, what: str) -> int:
    return int(re.search(rf"([0-9][0-9,]*) {what}", " ".join(cls.__doc__.split())).group(1).replace(",", ""))


def test_documented_conv_and_parameter_counts():
    """The docstrings' figures (20 / 53 convs, parameter counts at width 64) against counts of the built models
    and, for the ResNets, against a count from the architecture."""
    for name, expansion, depths, convs in (("resnet18", 1, [2, 2, 2, 2], 20), ("resnet50", 4, [3, 4, 6, 3], 53)):
        model = models.get(name)
        cls = type(model)
        assert len(_convs(model)) == convs == _documented(cls, "convs")
        count = sum(p.numel() for p in model.parameters())
        assert count == _resnet_parameter_count(expansion, depths, 64) == _documented(cls, "parameters")
    vgg = models.get("vgg11")
    convs = [m for m in vgg.features if isinstance(m, nn.Conv2d)]
    by_hand = sum(c.in_channels * c.out_channels * 9 + 2 * c.out_channels for c in convs) + 512 * 513 + 513 * 10
    assert sum(p.numel() for p in vgg.parameters()) == by_hand == _documented(models.VGG11, "parameters")


def test_bottleneck_block_matches_a_functional_reference():
    """Expansion 4, the stride on the 3x3 conv (conv2), a strided 1x1 + BatchNorm shortcut: the block's output
    against the same computation written with torch.nn.functional (eval-mode BatchNorm, float64)."""
    torch.manual_seed(0)
    block = models.Bottleneck(6, 3, stride=2).double().eval()
    for bn in (block.bn1, block.bn2, block.bn3, block.shortcut[1]):  # non-trivial running statistics
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)

    def bn(t, m):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    out = F.relu(bn(F.conv2d(x, block.conv1.weight), block.bn1))
    out = F.relu(bn(F.conv2d(out, block.conv2.weight, stride=2, padding=1), block.bn2))
    out = bn(F.conv2d(out, block.conv3.weight), block.bn3)
    shortcut = bn(F.conv2d(x, block.shortcut[0].weight, stride=2), block.shortcut[1])
    expected = F.relu(out + shortcut)
    assert expected.shape == (2, 12, 4, 4)
    torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)
    assert block.conv1.stride == (1, 1) and block.conv3.stride == (1, 1)


@pytest.mark.parametrize("name, sizes", [("resnet18", [32, 16, 8, 4]), ("resnet50", [32, 16, 8, 4])])
def test_resnet_stage_resolutions_and_channels(name, sizes):
    model = _build(name, width=2).eval()
    seen = {}
    for i in range(1, 5):
        getattr(model, f"layer{i}").register_forward_hook(lambda m, a, out, i=i: seen.update({i: out.shape}))
    model(models.example_input(name, batch=1))
    expansion = 1 if name == "resnet18" else 4
    assert [seen[i][2:] for i in range(1, 5)] == [(s, s) for s in sizes]
    assert [seen[i][1] for i in range(1, 5)] == [2 * 2**i * expansion for i in range(4)]


# --------------------------------------------------------------------------- modes, batch 1, float64, tracing


@pytest.mark.parametrize("name", models.names())
def test_batch_one_train_and_eval_float64(name):
    """Batch 1 in train mode works for every built-in model at its input size: each BatchNorm still sees more than
    one value per channel (the smallest map is VGG's 2x2 before its last pool, ResNet's 4x4 in layer4); the
    float64 model computes the float32 model's output, in both modes, traced with torch.fx or not."""
    model = _build(name)
    x = models.example_input(name, batch=1)
    for training in (True, False):
        single = copy.deepcopy(model).train(training)
        double = copy.deepcopy(model).double().train(training)
        traced = torch.fx.symbolic_trace(copy.deepcopy(model).double().train(training))
        y, y64, yt = single(x), double(x.double()), traced(x.double())
        assert y.shape == (1, 64 if name == "deep_linear" else 10) and torch.isfinite(y).all()
        assert y64.dtype == torch.float64 and torch.equal(y64, yt)
        torch.testing.assert_close(y64.float(), y, rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", ["resnet18", "vgg11"])
def test_every_preset_transforms_resnet18_and_vgg11(name):
    """Each preset: same output shape, finite outputs, a report row for every conv; lorth and jacobian only add
    penalties, so the transformed model computes the original's output; svd finds no decomposition."""
    torch.manual_seed(0)
    model = models.get(name, width=1).eval()
    x = models.example_input(name, batch=2)
    expected = model(x)
    convs = _convs(model)
    assert len(convs) == {"resnet18": 20, "vgg11": 8}[name]
    for preset in orthofx.presets():
        if preset == "svd":
            with pytest.raises(errors.PlanError, match="decompositions: none"):
                orthofx.transform(model, preset, example_inputs=(x,))
            continue
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", errors.OrthofxWarning)
            gm = orthofx.transform(model, preset, example_inputs=(x,)).eval()
        y = gm(x)
        assert y.shape == expected.shape and torch.isfinite(y).all(), preset
        sites = {row["site"] for row in orthofx.report(gm).rows}
        assert set(convs) <= sites, (preset, sorted(set(convs) - sites))
        if preset in ("lorth", "jacobian"):
            torch.testing.assert_close(y, expected, rtol=0, atol=0, msg=preset)
