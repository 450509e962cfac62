"""attach and an optimizer built before ``transform(..., inplace=True)`` replaced layers (session 44, found by an
audit). A replacing rule (orthogonal_conv, the 'orthogonal' preset) puts a new layer with parameters of its own in
the model; the optimizer built before the transform holds the replaced layer's old ones. With a mixed policy
(orthogonal_conv + riemannian) attach succeeded and the orthogonal conv silently never trained: attach now warns
(another optimizer may train the new layers: a review found a refusal wrong there); attach's message for an optimizer
holding none of gm's parameters offered inplace=True as a fix, which does not help such policies."""

import copy
import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

import orthofx

MIXED = {"orthofx": 1, "rules": [
    {"name": "oc", "match": {"type": "Conv2d"}, "apply": "orthogonal_conv"},
    {"name": "st", "match": {"type": "Linear"}, "apply": "riemannian"}]}
RIEMANNIAN = {"orthofx": 1, "rules": [{"name": "st", "match": {"type": "Linear"}, "apply": "riemannian"}]}


class ConvFc(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(2)[..., :8])


class Outer(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.backbone(x))


def example():
    return torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))


def orthogonality_error64(weight):
    """max |W^T W - I| in float64 (W: out x in, out >= in)."""
    w = weight.detach().double()
    return (w.T @ w - torch.eye(w.shape[1], dtype=torch.float64)).abs().max().item()


def attach_without_warning(optimizer, model):
    """orthofx.attach, failing the test on any OrthofxWarning (the stale-optimizer warning among them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", orthofx.OrthofxWarning)
        return orthofx.attach(optimizer, model)


def sgd_step(model, optimizer, x):
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()


def test_mixed_policy_inplace_optimizer_built_before_is_warned_about_naming_the_conv():
    torch.manual_seed(0)
    model = ConvFc()
    stale = torch.optim.SGD(model.parameters(), lr=0.1)
    gm = orthofx.transform(model, MIXED, example_inputs=(example(),), inplace=True)
    assert type(gm.get_submodule("conv")).__name__ == "OrthogonalConv2d"
    with pytest.warns(orthofx.OrthofxWarning, match=r"replaced: 'conv' \(now OrthogonalConv2d\).*never train.*"
                                                    r"Build the optimizer after the transform, from gm.parameters\(\)"):
        orthofx.attach(stale, gm)
    # what the warning says: the new conv's parameters get gradients and the optimizer leaves them as they are
    conv = [p.detach().clone() for p in gm.get_submodule("conv").parameters()]
    sgd_step(gm, stale, example())
    assert all(torch.equal(a, p) for a, p in zip(conv, gm.get_submodule("conv").parameters()))
    assert all(p.grad is not None for p in gm.get_submodule("conv").parameters())


def test_a_second_optimizer_training_the_new_layer_is_no_refusal():
    """The attached optimizer built before the transform (it trains fc, a Riemannian weight) and a second one built
    after for the new conv: every layer trains; attach warns (it cannot see the other optimizer) but attaches."""
    torch.manual_seed(0)
    model = ConvFc()
    main = torch.optim.SGD(model.parameters(), lr=0.1)
    gm = orthofx.transform(model, MIXED, example_inputs=(example(),), inplace=True)
    conv_optimizer = torch.optim.Adam(gm.get_submodule("conv").parameters(), lr=1e-2)
    with pytest.warns(orthofx.OrthofxWarning, match="unless another optimizer trains them"):
        orthofx.attach(main, gm)
    conv = [p.detach().clone() for p in gm.get_submodule("conv").parameters()]
    for _ in range(3):
        conv_optimizer.zero_grad()
        sgd_step(gm, main, example())
        conv_optimizer.step()
    assert all(not torch.equal(a, p) for a, p in zip(conv, gm.get_submodule("conv").parameters()))
    assert orthogonality_error64(gm.get_submodule("fc").weight) < 1e-5


def test_convnorm_affine_part_of_an_optimizer_built_before_is_warned_about():
    """ConvNorm keeps the conv (its parameters are the optimizer's) and adds an affine part of its own."""
    torch.manual_seed(0)
    model = ConvFc()
    stale = torch.optim.SGD(model.parameters(), lr=0.1)
    policy = {"orthofx": 1, "rules": [
        {"match": {"type": "Conv2d"}, "apply": "convnorm", "with": {"affine": True}},
        {"match": {"type": "Linear"}, "apply": "riemannian"}]}
    gm = orthofx.transform(model, policy, example_inputs=(example(),), inplace=True)
    assert model.conv.conv is not None  # the original conv, inside the new layer
    with pytest.warns(orthofx.OrthofxWarning, match=r"replaced: 'conv' \(now ConvNormConv2d\)"):
        orthofx.attach(stale, gm)
    # without the affine part nothing of the new layer is left out: no warning
    model = ConvFc()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    policy["rules"][0]["with"] = {"affine": False}
    gm = orthofx.transform(model, policy, example_inputs=(example(),), inplace=True)
    attach_without_warning(optimizer, gm)


def test_mixed_policy_optimizer_built_after_transform_trains_every_parameter():
    torch.manual_seed(0)
    model = ConvFc()
    gm = orthofx.transform(model, MIXED, example_inputs=(example(),), inplace=True)
    lr = 0.1
    optimizer = torch.optim.SGD(gm.parameters(), lr=lr)
    orthofx.attach(optimizer, gm)
    conv = list(gm.get_submodule("conv").named_parameters())
    assert conv
    x = example()
    for _ in range(3):
        before = {name: p.detach().clone() for name, p in conv}
        sgd_step(gm, optimizer, x)
        for name, p in conv:
            assert p.grad is not None and p.grad.abs().max() > 0, name
            # plain SGD (no hook acts on the conv): the reference update, by hand
            torch.testing.assert_close(p.detach(), before[name] - lr * p.grad, rtol=1e-6, atol=1e-7)
            assert not torch.equal(p.detach(), before[name]), name
    assert orthogonality_error64(gm.get_submodule("fc").weight) < 1e-5
    # the user's model holds the same layers (inplace=True)
    assert model.conv is gm.get_submodule("conv") and model.fc is gm.get_submodule("fc")


def test_riemannian_only_inplace_optimizer_built_before_still_attaches_and_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    gm = orthofx.transform(model, RIEMANNIAN, example_inputs=(x,), inplace=True)
    handle = orthofx.attach(optimizer, gm)
    assert len(handle.hooks) > 0
    before = [p.detach().clone() for p in gm.parameters()]
    for _ in range(3):
        sgd_step(gm, optimizer, x)
    assert all(not torch.equal(a, p.detach()) for a, p in zip(before, gm.parameters()))
    for index in ("0", "2"):
        assert orthogonality_error64(gm.get_submodule(index).weight) < 1e-5


def test_shared_layers_with_the_new_layers_parameters_added_attach():
    """An optimizer built before the transform to which the new layer's parameters were added trains it: no
    warning (the old parameters in it are only dead weight)."""
    torch.manual_seed(0)
    model = ConvFc()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gm = orthofx.transform(model, MIXED, example_inputs=(example(),), inplace=True)
    optimizer.add_param_group({"params": list(gm.get_submodule("conv").parameters())})
    attach_without_warning(optimizer, gm)


@pytest.mark.parametrize("inplace", [False, True])
def test_the_hint_for_an_optimizer_of_the_model_before_the_transform_no_longer_offers_inplace(inplace):
    """The 'orthogonal' preset replaces every layer: inplace=True gives an optimizer built before no parameter of gm.
    The copy (default) transform keeps its message; inplace=True now names the replaced layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    stale = torch.optim.SGD(model.parameters(), lr=0.1)
    gm = orthofx.transform(model, "orthogonal", example_inputs=(torch.randn(3, 8),), inplace=inplace)
    with pytest.raises(orthofx.ArgumentError) as info:
        orthofx.attach(stale, gm)
    message = str(info.value)
    assert "or pass inplace=True" not in message
    assert "gm.parameters()" in message and "after the transform" in message
    if inplace:
        assert "It was built before the transform" in message and "'0' (now OrthogonalLinear)" in message
    else:
        assert "holds none of the model's trainable parameters" in message
        assert "only in the layers no rule replaces" in message


def test_copy_transform_with_a_mixed_policy_keeps_the_holds_none_message():
    torch.manual_seed(0)
    model = ConvFc()
    stale = torch.optim.SGD(model.parameters(), lr=0.1)
    gm = orthofx.transform(model, MIXED, example_inputs=(example(),))
    with pytest.raises(orthofx.ArgumentError, match=r"holds none of the model's trainable parameters.*before "
                                                    r"orthofx.transform"):
        orthofx.attach(stale, gm)


def test_outer_model_holding_an_inplace_transformed_part():
    torch.manual_seed(0)
    outer = Outer(ConvFc())
    stale = torch.optim.SGD(outer.parameters(), lr=0.1)
    outer.backbone = orthofx.transform(outer.backbone, MIXED, example_inputs=(example(),), inplace=True)
    with pytest.warns(orthofx.OrthofxWarning, match=r"replaced: 'backbone.conv' \(now OrthogonalConv2d\)"):
        orthofx.attach(stale, outer)
    optimizer = torch.optim.SGD(outer.parameters(), lr=0.1)
    orthofx.attach(optimizer, outer)
    conv = list(outer.backbone.get_submodule("conv").parameters())
    before = [p.detach().clone() for p in conv]
    sgd_step(outer, optimizer, example())
    assert all(not torch.equal(a, p.detach()) for a, p in zip(before, conv))
    assert orthogonality_error64(outer.backbone.get_submodule("fc").weight) < 1e-5


def test_the_record_keeps_no_replaced_parameter_alive_and_copies_of_gm_attach():
    torch.manual_seed(0)
    model = ConvFc()
    old_weight = weakref.ref(model.conv.weight)
    old_conv = weakref.ref(model.conv)
    gm = orthofx.transform(model, MIXED, example_inputs=(example(),), inplace=True)
    gc.collect()
    assert old_weight() is None and old_conv() is None  # neither gm, the model nor the record holds them
    # gm's copies hold their own layers: an optimizer of the copy attaches to it
    twin = copy.deepcopy(gm)
    orthofx.attach(torch.optim.SGD(twin.parameters(), lr=0.1), twin)
    # an optimizer built before the transform: the record goes when the optimizer (the last holder) goes
    model = ConvFc()
    stale = torch.optim.SGD(model.parameters(), lr=0.1)
    old_weight = weakref.ref(model.conv.weight)
    gm = orthofx.transform(model, MIXED, example_inputs=(example(),), inplace=True)
    with pytest.warns(orthofx.OrthofxWarning, match="'conv'"):
        orthofx.attach(stale, gm)
    del stale
    gc.collect()
    assert old_weight() is None
    # the new layer is not kept by the record either
    new_conv = weakref.ref(gm.get_submodule("conv"))
    del gm, model
    gc.collect()
    assert new_conv() is None


class _BlockModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Tanh())
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.body(x).flatten(2)[..., :8])


def _with_block_probe(conv_rule):
    return {"orthofx": 1, "rules": [
        conv_rule,
        {"match": {"kind": "block", "name": "body"}, "apply": "jacobian_isometry"},
        {"match": {"type": "Linear"}, "apply": "riemannian"}]}


@pytest.mark.parametrize("conv_rule", [
    {"match": {"type": "Conv2d"}, "apply": "orthogonal_conv"},
    {"match": {"type": "Conv2d"}, "apply": "convnorm", "with": {"affine": True}}], ids=["orthogonal", "convnorm"])
def test_a_replaced_layer_inside_a_probed_block_is_warned_about(conv_rule):
    """A review: the pass replaced the conv inside the model's own Sequential (inplace=True), and the probe then
    wrapped that Sequential; only the Sequential -> probe replacement was recorded, so no warning."""
    torch.manual_seed(0)
    model = _BlockModel()
    stale = torch.optim.SGD(model.parameters(), lr=0.1)
    gm = orthofx.transform(model, _with_block_probe(conv_rule), example_inputs=(example(),), inplace=True)
    with pytest.warns(orthofx.OrthofxWarning, match=r"replaced: 'body.0' \(now (OrthogonalConv2d|ConvNormConv2d)\)"):
        orthofx.attach(stale, gm)


def test_two_inplace_transforms_keep_the_first_replacement_named():
    """convnorm (affine) in a first inplace transform, a probe around its block in a second: the conv's parameters
    still name the ConvNorm layer, whose affine part the optimizer built before both lacks."""
    torch.manual_seed(0)
    model = _BlockModel()
    stale = torch.optim.SGD(model.parameters(), lr=0.1)
    first = {"orthofx": 1, "rules": [{"match": {"type": "Conv2d"}, "apply": "convnorm", "with": {"affine": True}}]}
    orthofx.transform(model, first, example_inputs=(example(),), inplace=True)
    second = {"orthofx": 1, "rules": [{"match": {"kind": "block", "name": "body"}, "apply": "jacobian_isometry"},
                                      {"match": {"type": "Linear"}, "apply": "riemannian"}]}
    gm = orthofx.transform(model, second, example_inputs=(example(),), inplace=True)
    with pytest.warns(orthofx.OrthofxWarning, match=r"'body.0' \(now ConvNormConv2d\)"):
        orthofx.attach(stale, gm)
    # an optimizer built after both transforms: no warning
    attach_without_warning(torch.optim.SGD(gm.parameters(), lr=0.1), gm)


def test_a_copy_transform_records_nothing_so_a_split_optimizer_gets_no_warning():
    """A second review: with the default copy, the conv inside gm's ConvNorm layer is gm's own; an optimizer holding
    it (and fc) while another trains the affine part was warned about 'inplace=True replaced' layers."""
    torch.manual_seed(0)
    policy = {"orthofx": 1, "rules": [{"match": {"type": "Conv2d"}, "apply": "convnorm", "with": {"affine": True}},
                                      {"match": {"type": "Linear"}, "apply": "riemannian"}]}
    gm = orthofx.transform(ConvFc(), policy, example_inputs=(example(),))
    layer = gm.get_submodule("conv")
    first = torch.optim.SGD(list(layer.conv.parameters()) + list(gm.get_submodule("fc").parameters()), lr=0.1)
    attach_without_warning(first, gm)


def test_a_layer_swapped_back_and_replaced_again_is_named_again():
    torch.manual_seed(0)
    model = ConvFc()
    stale = torch.optim.SGD(model.parameters(), lr=0.1)
    conv = model.conv
    orthofx.transform(model, MIXED, example_inputs=(example(),), inplace=True)
    model.conv = conv  # the user puts the original back; the first replacement is gone
    gc.collect()
    gm = orthofx.transform(model, MIXED, example_inputs=(example(),), inplace=True)
    with pytest.warns(orthofx.OrthofxWarning, match=r"'conv' \(now OrthogonalConv2d\)"):
        orthofx.attach(stale, gm)
