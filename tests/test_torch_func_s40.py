"""torch.func with transformed models (functional_call, vmap / grad per-sample gradients, jacrev / jvp, ensembles),
each against an independent reference: the model itself or a copy loaded with the substituted values, a loop of
per-example backward passes, dense autograd Jacobians, finite differences."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vmap

import orthofx
from orthofx.errors import LayerArgumentError, OrthofxWarning

pytestmark = pytest.mark.usefixtures("one_thread")

D = torch.float64


def _convnorm_model(momentum):
    """Two ConvNorm layers (momentum: running filters per grid) in float64, and an input of 6 x 6 pixels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 3, padding=1)).double()
    x = torch.randn(2, 2, 6, 6, dtype=D)
    policy = {"orthofx": 1, "rules": [{"match": {"type": "Conv2d"}, "apply": "convnorm",
                                       "with": {"momentum": momentum}}]}
    return orthofx.transform(model, policy, example_inputs=(x,)), x


def _trained_member(gm, x, scale, seed):
    """A copy of ``gm`` with perturbed weights whose running filters two training forwards moved, in eval; the
    weights are perturbed again after them, so that its filters are not ``V`` of its weights (what a layer without
    a filter for the grid computes)."""
    member = copy.deepcopy(gm).train()
    torch.manual_seed(seed)
    for _ in range(2):
        with torch.no_grad():
            for p in member.parameters():
                p.add_(scale * torch.randn_like(p))
        member(x)
    with torch.no_grad():
        for p in member.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return member.eval()


def _running_names(layer):
    return [name for name in layer.__dict__ if name.startswith("running_v_")]


# ------------------------------------------------------------------------------ ConvNorm running filters


def test_functional_call_takes_the_running_filters_of_a_state_dict():
    # functional_call assigns each key of its dict with setattr: a state dict's running_v_* keys became plain
    # attributes in the layer's __dict__, which the forward ignored (the base model's own filters ran: off by
    # ~0.6 here) and which stayed behind, answering getattr with that stale tensor after the layer moved on
    gm, x = _convnorm_model(0.5)
    base = _trained_member(gm, x, 0.0, 0)
    member = _trained_member(gm, x, 0.3, 1)
    with torch.no_grad():
        expected = member(x)
        got = functional_call(base, member.state_dict(), (x,))
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    layer = base.get_submodule("0")
    assert _running_names(layer) == []
    (grid,) = layer.running_grids
    own = layer.running_filter(grid).clone()
    base.float()
    assert getattr(layer, layer._buffer_name(grid)) is layer.running_filter(grid)
    torch.testing.assert_close(layer.running_filter(grid), own.float(), atol=0, rtol=0)


def test_vmap_over_stacked_state_dicts_runs_each_members_running_filters():
    # model ensembling with the members' state dicts stacked (stack_module_state leaves the filters out, as they
    # are no buffers): every member ran with the base's filters, silently
    gm, x = _convnorm_model(0.5)
    members = [_trained_member(gm, x, 0.3, seed) for seed in range(3)]
    states = [m.state_dict() for m in members]
    stacked = {key: torch.stack([s[key] for s in states]) for key in states[0]}
    base = copy.deepcopy(gm).eval()
    outputs = vmap(lambda state: functional_call(base, state, (x,)))(stacked)
    with torch.no_grad():
        for output, member in zip(outputs, members):
            torch.testing.assert_close(output, member(x), atol=1e-12, rtol=0)
    assert base.get_submodule("0").running_grids == [] and _running_names(base.get_submodule("0")) == []


def test_training_functional_call_updates_the_substituted_filter_as_torch_updates_a_substituted_buffer():
    # a training-mode call (no transform) moves the running filter it was given, as BatchNorm moves a substituted
    # running mean, and leaves the layer's own: before, the layer's own filter moved and the given one was ignored
    gm, x = _convnorm_model(0.5)
    base = _trained_member(gm, x, 0.0, 0).train()
    member = _trained_member(gm, x, 0.3, 1)
    state = {key: value.clone() for key, value in member.state_dict().items()}
    own = {grid: base.get_submodule("0").running_filter(grid).clone()
           for grid in base.get_submodule("0").running_grids}
    out = functional_call(base, state, (x,))
    reference = copy.deepcopy(member).train()
    torch.testing.assert_close(out, reference(x), atol=1e-12, rtol=0)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(state[key], value, atol=1e-12, rtol=0)
    for grid, v in own.items():
        torch.testing.assert_close(base.get_submodule("0").running_filter(grid), v, atol=0, rtol=0)


def test_running_filter_assignment_is_refused_where_it_cannot_be_a_filter():
    gm, x = _convnorm_model(0.5)
    gm.train()(x)
    name = "0." + gm.get_submodule("0")._buffer_name(gm.get_submodule("0").running_grids[0])
    with pytest.raises(LayerArgumentError, match=r"ConvNormConv2d at '0': size mismatch for running_v_"):
        functional_call(gm.eval(), {name: torch.ones(3, 2, 2, dtype=D)}, (x,))
    plain, _ = _convnorm_model(None)
    with pytest.raises(LayerArgumentError, match=r"ConvNormConv2d at '0' has momentum=None: .* leave the running_v_"):
        functional_call(plain, gm.state_dict(), (x,))
    # the refused call left the models as they were
    assert _running_names(plain.get_submodule("0")) == [] and plain.get_submodule("0").running_grids == []


# ------------------------------------------------------------------------------ computed weights


def _replaced(kind):
    torch.manual_seed(0)
    if kind == "linear":
        model, x, policy = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)), torch.randn(2, 4), "orthogonal"
    elif kind == "transposed":
        model = nn.Sequential(nn.ConvTranspose2d(2, 2, 2, stride=2), nn.Tanh())
        x, policy = torch.randn(2, 2, 4, 4), "orthogonal"
    else:
        model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Tanh())
        x, policy = torch.randn(2, 2, 4, 4), kind
    return orthofx.transform(model, policy, example_inputs=(x,)), model, x


@pytest.mark.parametrize("kind, layer, keys", [
    ("orthogonal", "OrthogonalConv2d", "'proj_a'"), ("linear", "OrthogonalLinear", "'raw_weight', 'bias'"),
    ("transposed", "OrthogonalConvTranspose2d", "'bias', 'conv.matrix'"), ("convnorm", "ConvNormConv2d", "'conv.weight'")])
def test_functional_call_with_the_original_models_weight_names_the_layer_and_its_keys(kind, layer, keys):
    # a dict keyed by the names of the model before the transform ("0.weight" of the nn.Conv2d it replaced): torch
    # said "property 'weight' of 'OrthogonalConv2d' object has no setter", naming neither the site nor the keys
    gm, model, x = _replaced(kind)
    before = gm(x)
    with pytest.raises(LayerArgumentError, match=rf"^{layer} at '0': its weight .*cannot be assigned .*{keys}") as info:
        functional_call(gm, dict(model.named_parameters()), (x,))
    assert isinstance(info.value, AttributeError)  # what assigning the read-only property raised before
    with pytest.raises(AttributeError):
        gm.get_submodule("0").weight = torch.zeros(1)
    torch.testing.assert_close(gm(x), before, atol=0, rtol=0)


@pytest.mark.parametrize("block", ["OrthogonalActivationBlock", "ReflectionResidualBlock"])
def test_isometric_blocks_refuse_a_weight_key_and_give_per_sample_gradients(block):
    torch.manual_seed(0)
    layer = getattr(orthofx.nn, block)(*((4,) if block == "OrthogonalActivationBlock" else (4, 2)), dtype=D)
    net = nn.Sequential(layer, nn.Linear(4, 2, dtype=D))
    x = torch.randn(3, 4, dtype=D)
    with pytest.raises(LayerArgumentError, match=rf"^{block}: its weight .*'raw', 'bias'.*write raw"):
        functional_call(net, {"0.weight": torch.eye(4, dtype=D)}, (x,))
    params = {k: v.detach() for k, v in net.named_parameters()}
    per_sample = vmap(grad(lambda p, sample: functional_call(net, p, (sample,)).sin().sum()), in_dims=(None, 0))(
        params, x)
    for i in range(len(x)):
        one = copy.deepcopy(net)
        one(x[i]).sin().sum().backward()
        for name, p in one.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------ penalty under transforms


def test_penalty_outside_functional_call_under_grad_warns_that_it_is_a_constant_there():
    torch.manual_seed(0)
    x = torch.randn(2, 2, 4, 4, dtype=D)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 2)).double()
    gm = orthofx.transform(model, "lorth", example_inputs=(x,))
    params = {k: v.detach() + 0.1 for k, v in gm.named_parameters()}

    def outside(p):
        return functional_call(gm, p, (x,)).square().sum() + orthofx.penalty(gm)

    with pytest.warns(OrthofxWarning, match="orthofx.penalty ran inside a torch.func transform that differentiates"):
        missing = grad(outside)(params)

    class WithPenalty(nn.Module):
        def __init__(self):
            super().__init__()
            self.gm = gm

        def forward(self, inp):
            return self.gm(inp).square().sum() + orthofx.penalty(self.gm)

    with warnings.catch_warnings():
        warnings.simplefilter("error", OrthofxWarning)
        inside = grad(lambda p: functional_call(WithPenalty(), {"gm." + k: v for k, v in p.items()}, (x,)))(params)
        vmap(lambda inp: functional_call(gm, params, (inp,)).sum() + orthofx.penalty(gm))(x.unsqueeze(1))  # no grad
    reference = copy.deepcopy(gm)
    reference.load_state_dict(params, strict=False)
    (reference(x).square().sum() + orthofx.penalty(reference)).backward()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(inside[name], p.grad, atol=1e-12, rtol=0)
    assert not torch.allclose(missing["0.weight"], inside["0.weight"])  # what the warning is about


# ------------------------------------------------------------------------------ what works (regression guards)


def _orthogonal_cnn():
    torch.manual_seed(0)
    model = orthofx.models.get("small_cnn", width=2).double()
    x = orthofx.models.example_input("small_cnn", batch=3).double()
    return orthofx.transform(model, "orthogonal", example_inputs=(x,)).eval(), x


def test_functional_call_with_new_parameters_is_not_served_the_eval_kernel_cache():
    gm, x = _orthogonal_cnn()
    torch.manual_seed(1)
    new = {k: v.detach() + 0.05 * torch.randn_like(v) for k, v in gm.named_parameters()}
    reference = copy.deepcopy(gm)
    reference.load_state_dict(new, strict=False)
    with torch.no_grad():
        own = gm(x)  # builds and keeps the eval kernels
        torch.testing.assert_close(functional_call(gm, new, (x,)), reference(x), atol=1e-12, rtol=0)
        torch.testing.assert_close(gm(x), own, atol=0, rtol=0)


def test_per_sample_gradients_and_input_jacobians_of_an_orthogonal_model():
    gm, x = _orthogonal_cnn()
    params = {k: v.detach() for k, v in gm.named_parameters()}

    def loss(p, sample):
        return functional_call(gm, p, (sample.unsqueeze(0),)).sin().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(len(x)):
        one = copy.deepcopy(gm)
        one(x[i:i + 1]).sin().sum().backward()
        for name, p in one.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, atol=1e-10, rtol=0)
    dense = torch.autograd.functional.jacobian(gm, x)
    torch.testing.assert_close(jacrev(gm)(x), dense, atol=1e-10, rtol=0)
    v = torch.randn_like(x)
    _, tangent = jvp(gm, (x,), (v,))
    torch.testing.assert_close(tangent, (dense.reshape(-1, x.numel()) @ v.reshape(-1)).reshape(tangent.shape),
                               atol=1e-10, rtol=0)
    eps = 1e-6
    with torch.no_grad():
        differences = (gm(x + eps * v) - gm(x - eps * v)) / (2 * eps)
    torch.testing.assert_close(tangent, differences, atol=1e-6, rtol=0)
