"""A layer weight recomputed by a forward pre-hook of the user's own (the pattern of torch's older weight_norm and
pruning: ``del layer.weight``, a ``weight_raw`` parameter, a pre-hook setting ``layer.weight = weight_raw * mask``).

It was not recognised as computed: ``isometric`` said ``apply``, wrote an orthogonal matrix the next call overwrote
(``|W W^T - I|`` 2.29) and put the Riemannian hook on a tensor no optimizer holds; the ``orthogonal`` preset failed
with a TransformError (``'OrthogonalLinear' object has no attribute 'weight_raw'``). Now the passes that write,
step or replace the weight skip the layer with the reason (``orthogonal`` regularises it, as for prune's weights),
``explain`` says what ``transform`` does, and L_orth reads the weight the hook computes (float64 references).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthofx
from references import lorth64

pytestmark = pytest.mark.usefixtures("one_thread")

OUTSIDE = ("is not a parameter of the layer: something outside the layer sets it (a forward pre-hook, the parent's "
           "forward")
REASON = f"its weight {OUTSIDE}; the layer's forward pre-hooks: _Masked)"
FIX = ("write what a hook computes as a parametrization with "
       "torch.nn.utils.parametrize.register_parametrization(layer, 'weight', module)")


class _Masked:
    """A user's reparametrization: ``layer.<name> = layer.<name>_raw * mask`` before each call."""

    def __init__(self, name: str, mask: torch.Tensor):
        self.name, self.mask = name, mask

    def __call__(self, module, inputs):
        setattr(module, self.name, getattr(module, f"{self.name}_raw") * self.mask)


def _mask(layer: nn.Module, name: str = "weight") -> nn.Module:
    """Turn ``layer.<name>`` into a tensor a :class:`_Masked` pre-hook recomputes from ``<name>_raw``."""
    value = layer._parameters.pop(name).detach().clone()
    mask = (torch.rand(value.shape) > 0.3).to(value.dtype)
    layer.register_parameter(f"{name}_raw", nn.Parameter(value))
    setattr(layer, name, getattr(layer, f"{name}_raw") * mask)
    layer.register_forward_pre_hook(_Masked(name, mask))
    return layer


def _linear_model(name: str = "weight") -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    _mask(model[2], name)
    return model


def _conv_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    _mask(model[2])
    return model


def _snapshot(model: nn.Module) -> tuple:
    """The user's model as the tests compare it: its state, layer 2's computed tensors (by value: the hook sets
    new ones at each call), registered tensors (by identity), pre-hooks and module types."""
    layer = model[2]
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [layer.weight.detach().clone(), layer.bias.detach().clone()], dict(layer._parameters),
            list(layer._forward_pre_hooks.values()), [type(m) for m in model.modules()])


def _assert_unmodified(model: nn.Module, before: tuple) -> None:
    state, computed, parameters, hooks, types = before
    after = _snapshot(model)
    assert after[0].keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(after[0][key], value), key
    assert all(torch.equal(now, then) for now, then in zip(after[1], computed))
    assert after[2].keys() == parameters.keys() and all(after[2][k] is parameters[k] for k in parameters)
    assert after[3] == hooks and after[4] == types


def _skipped(plan) -> dict[tuple[str, str], str]:
    return {(site.name, rule): reason for site, rule, reason in plan.skipped}


def _same_plan(explained, transformed) -> None:
    """``explain`` decides what ``transform`` did: the same entries (and outcomes) and the same skips."""
    assert _skipped(explained) == _skipped(transformed)
    assert ([(e.site.name, e.rule_name, e.outcome) for e in explained.entries]
            == [(e.site.name, e.rule_name, e.outcome) for e in transformed.entries])


def _inputs(model: nn.Module) -> torch.Tensor:
    return torch.randn(4, 8) if isinstance(model[0], nn.Linear) else torch.randn(2, 3, 6, 6)


def _layer_input(model: nn.Module) -> torch.Tensor:
    return torch.randn(4, 8) if isinstance(model[0], nn.Linear) else torch.randn(2, 8, 6, 6)


def _assert_layer_kept(gm: nn.Module, model: nn.Module) -> None:
    """The transformed model's layer 2 is the user's, computing what it did through its hook."""
    layer = gm.get_submodule("2")
    assert type(layer) is type(model[2])
    assert torch.equal(layer.weight_raw, model[2].weight_raw)
    hidden = _layer_input(model)
    with torch.no_grad():
        torch.testing.assert_close(layer(hidden), model[2](hidden), rtol=0, atol=0)


def test_isometric_skips_the_hooked_weight_and_attaches_no_hook_to_it():
    """isometric_init wrote an orthogonal matrix that the next call replaced (``|W W^T - I|`` 2.29 against 1.6e-7
    for layer 0), and riemannian put a Stiefel hook on the recomputed tensor (attach then listed it in
    ``handle.skipped``, as if frozen). Both rules now skip the layer with the reason; layer 0 is treated as before."""
    model = _linear_model()
    x = _inputs(model)
    before = _snapshot(model)
    explained = orthofx.explain(model, "isometric", example_inputs=(x,))
    gm = orthofx.transform(model, "isometric", example_inputs=(x,))
    manifest = orthofx.manifest_of(gm)
    _same_plan(explained, manifest.plan)
    skipped = _skipped(manifest.plan)
    assert set(skipped) == {("2", "isometric-init"), ("2", "stiefel-square-linears")}
    for reason in skipped.values():
        assert reason.startswith(REASON) and FIX in reason and "a write to the weight is lost" in reason
    assert {change.site for change in manifest.changes} == {"0"}
    assert [hook.site for hook in manifest.optimizer_hooks] == ["0"]
    _assert_layer_kept(gm, model)
    first = gm.get_submodule("0").weight.detach().double()
    torch.testing.assert_close(first @ first.T, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-6)
    handle = orthofx.attach(torch.optim.SGD(gm.parameters(), lr=0.1), gm)
    assert [hook.site for hook in handle.hooks] == ["0"] and handle.skipped == []
    _assert_unmodified(model, before)


def test_the_orthogonal_preset_regularises_the_hooked_weight_with_its_penalty_on_the_computed_weight():
    """The orthogonal layer took the user's pre-hook and the transform failed (TransformError ...
    ``'OrthogonalLinear' object has no attribute 'weight_raw'``). Now the layer is kept and regularised
    (on_impossible: regularize), as for a pruned weight; its L_orth term is that of ``weight_raw * mask``, and its
    gradient reaches ``weight_raw`` (float64 references)."""
    model = _linear_model()
    x = _inputs(model)
    before = _snapshot(model)
    explained = orthofx.explain(model, "orthogonal", example_inputs=(x,))
    gm = orthofx.transform(model, "orthogonal", example_inputs=(x,))
    manifest = orthofx.manifest_of(gm)
    _same_plan(explained, manifest.plan)
    outcome = {entry.site.name: entry.outcome for entry in manifest.plan.entries}["2"]
    assert outcome.startswith("L_orth instead: " + REASON) and "replacing the layer would drop it" in outcome
    assert {change.site: change.status for change in manifest.changes} == {"0": "hard",
                                                                          "2": "regularised (computed weight)"}
    _assert_layer_kept(gm, model)
    _assert_unmodified(model, before)

    layer = gm.get_submodule("2")
    gm(x)  # the hook sets layer.weight from weight_raw
    (name, term), = [(n, t) for n, t in orthofx.penalty_terms(gm).items() if n.endswith("/2")]
    raw = layer.weight_raw.detach().double().requires_grad_()
    reference = raw * next(iter(layer._forward_pre_hooks.values())).mask.double()
    strength = next(e for e in manifest.plan.entries if e.site.name == "2").params["regularize_weight"]
    (strength * (reference @ reference.T - torch.eye(8, dtype=torch.float64)).square().sum()).backward()
    assert float(term.detach()) == pytest.approx(strength * lorth64(reference), rel=1e-5)
    term.backward()
    torch.testing.assert_close(layer.weight_raw.grad.double(), raw.grad, rtol=1e-4, atol=1e-7)


def test_the_orthogonal_preset_keeps_a_layer_whose_bias_a_user_pre_hook_recomputes():
    """The orthogonal layer copied the bias and took the hook, which failed on ``bias_raw`` (TransformError)."""
    model = _linear_model("bias")
    x = _inputs(model)
    before = _snapshot(model)
    explained = orthofx.explain(model, "orthogonal", example_inputs=(x,))
    gm = orthofx.transform(model, "orthogonal", example_inputs=(x,))
    manifest = orthofx.manifest_of(gm)
    _same_plan(explained, manifest.plan)
    outcome = {entry.site.name: entry.outcome for entry in manifest.plan.entries}["2"]
    assert f"its bias {OUTSIDE}; the layer's forward pre-hooks: _Masked)" in outcome
    assert {change.site: change.status for change in manifest.changes} == {"0": "hard",
                                                                          "2": "regularised (computed bias)"}
    layer = gm.get_submodule("2")
    assert type(layer) is nn.Linear and torch.equal(layer.bias_raw, model[2].bias_raw)
    _assert_unmodified(model, before)


@pytest.mark.parametrize("policy", [
    "convnorm",
    {"rules": [{"match": {"type": "Conv2d"}, "apply": "orthogonal_conv", "with": {"on_impossible": "error"}}]},
    {"rules": [{"match": {"type": "Conv2d"}, "apply": "pre_svd", "with": {"nog": True}}]},
    {"rules": [{"match": {"type": "Conv2d"}, "apply": "riemannian", "with": {"only_square": False}}]},
], ids=["convnorm", "orthogonal_conv", "pre_svd_nog", "riemannian"])
def test_conv_passes_that_write_step_or_replace_skip_the_hooked_weight(policy):
    """convnorm and orthogonal_conv moved the user's hook to their layer, which failed on ``weight_raw``
    (TransformError); pre_svd said the weight was 'a buffer?'; riemannian hooked the recomputed tensor. Each now
    skips the layer, says why and how to fix it, and explain agrees."""
    model = _conv_model()
    x = _inputs(model)
    before = _snapshot(model)
    explained = orthofx.explain(model, policy, example_inputs=(x,))
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    plan = orthofx.manifest_of(gm).plan
    _same_plan(explained, plan)
    reasons = [reason for (site, _), reason in _skipped(plan).items() if site == "2"]
    assert len(reasons) == 1 and reasons[0].startswith(REASON) and FIX in reasons[0]
    assert "2" not in {change.site for change in orthofx.manifest_of(gm).changes}
    assert "2" not in {hook.site for hook in orthofx.manifest_of(gm).optimizer_hooks}
    _assert_layer_kept(gm, model)
    _assert_unmodified(model, before)


def test_lorth_reads_the_weight_the_user_hook_computes():
    """orth_regularizer only reads the weight: it keeps the layer, and its term is L_orth of ``weight_raw * mask``
    (the dense circular operator, float64), with the gradient reaching ``weight_raw``."""
    model = _conv_model()
    x = _inputs(model)
    gm = orthofx.transform(model, "lorth", example_inputs=(x,))
    assert {change.site for change in orthofx.manifest_of(gm).changes} == {"0", "2"}
    layer = gm.get_submodule("2")
    gm(x)
    term = orthofx.penalty_terms(gm)["lorth/2"]
    mask = next(iter(layer._forward_pre_hooks.values())).mask
    assert float(term.detach()) == pytest.approx(0.01 * lorth64(layer.weight_raw * mask), rel=1e-5)
    term.backward()
    assert layer.weight_raw.grad is not None and layer.weight_raw.grad.abs().sum() > 0
    assert torch.equal(layer.weight_raw.grad == 0, mask == 0)  # masked entries get no gradient


def test_a_weight_that_is_a_plain_tensor_without_a_hook_is_skipped_too():
    """No pre-hook recomputes it; whatever set it is outside the layer: the reason says so, and proposes a parameter
    (no hook to keep) or a parametrization."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    model[2].weight = model[2]._parameters.pop("weight").detach().clone()
    x = _inputs(model)
    explained = orthofx.explain(model, "isometric", example_inputs=(x,))
    gm = orthofx.transform(model, "isometric", example_inputs=(x,))
    plan = orthofx.manifest_of(gm).plan
    _same_plan(explained, plan)
    reasons = {reason for (site, _), reason in _skipped(plan).items() if site == "2"}
    assert reasons and all(r.startswith(f"its weight {OUTSIDE}, an assignment) (make weight an nn.Parameter of the "
                                        "layer, compute it as a parametrization with torch.nn.utils.parametrize."
                                        "register_parametrization(layer, 'weight', module)") for r in reasons)
    assert torch.equal(gm.get_submodule("2").weight, model[2].weight)


def test_a_buffer_weight_is_not_taken_for_a_computed_one():
    """A weight registered as a buffer is stored, not recomputed: isometric_init still initialises it (the
    fallback for plain tensors leaves buffers to the passes' own checks)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    model[2].register_buffer("weight", model[2]._parameters.pop("weight").detach().clone())
    x = _inputs(model)
    policy = {"rules": [{"match": {"type": "Linear"}, "apply": "isometric_init"}]}
    plan = orthofx.manifest_of(orthofx.transform(model, policy, example_inputs=(x,))).plan
    assert not any(site.name == "2" for site, _, _ in plan.skipped)


def _riemannian_model() -> nn.Module:
    """A transformed model whose Linear layers carry a Riemannian optimizer hook (layer 2 is square: hooked)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    policy = {"rules": [{"match": {"type": "Linear"}, "apply": "riemannian"}]}
    gm = orthofx.transform(model, policy, example_inputs=(torch.randn(4, 8),))
    assert [hook.site for hook in orthofx.manifest_of(gm).optimizer_hooks] == ["0", "2"]
    return gm


@pytest.mark.parametrize("last_call", ["none", "train", "no_grad"])
def test_a_pre_hook_added_after_transform_to_a_hooked_weight_is_refused_at_attach_with_the_reason(last_call):
    """attach said ``its parameter(s) ['weight'] are not optimised by this optimizer; build the optimizer from
    gm.parameters()`` (ArgumentError), although it was built so: the hooked weight had become a tensor the pre-hook
    sets. Now it raises the OrthofxError a prune added after transform gets: the reason, 'added after
    orthofx.transform' and the fixes; also when the last call ran under no_grad (the tensor it left needs no
    gradient, though weight_raw trains)."""
    from orthofx.errors import ArgumentError, OrthofxError
    gm = _riemannian_model()
    _mask(gm.get_submodule("2"))
    x = torch.randn(4, 8)
    if last_call == "train":
        gm(x)
    elif last_call == "no_grad":
        with torch.no_grad():
            gm(x)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    with pytest.raises(OrthofxError) as raised:
        orthofx.attach(optimizer, gm)
    message = str(raised.value)
    assert not isinstance(raised.value, ArgumentError) and "not optimised by this optimizer" not in message
    assert message.startswith(f"site '2' (rule 'riemannian[0]'): {REASON}")
    assert FIX in message
    assert "added after orthofx.transform: the optimizer steps whatever it is computed from" in message

    pruned = _riemannian_model()  # the same form as prune's
    torch.nn.utils.prune.random_unstructured(pruned.get_submodule("2"), "weight", amount=0.3)
    with pytest.raises(OrthofxError) as raised_prune:
        orthofx.attach(torch.optim.SGD(pruned.parameters(), lr=0.1), pruned)
    assert type(raised_prune.value) is type(raised.value)
    assert "added after orthofx.transform" in str(raised_prune.value)


def test_a_pre_hook_added_after_attach_to_a_hooked_weight_is_refused_at_the_step():
    """Between attach and a step: the step raises with the reason rather than leave the weight off the manifold."""
    from orthofx.errors import OrthofxError
    gm = _riemannian_model()
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    orthofx.attach(optimizer, gm)
    _mask(gm.get_submodule("2"))
    x = torch.randn(4, 8)
    gm(x).square().sum().backward()
    with pytest.raises(OrthofxError, match=r"the layer's forward pre-hooks: _Masked\).*added after orthofx.transform"):
        optimizer.step()


def test_a_frozen_layer_given_a_pre_hook_after_transform_is_skipped_as_frozen():
    """Nothing trains what the hook computes from (the layer's parameters are frozen): attach skips the hook, as for
    a frozen pruned weight, and the other site keeps its hook."""
    gm = _riemannian_model()
    layer = _mask(gm.get_submodule("2"))
    layer.requires_grad_(False)
    gm(torch.randn(4, 8))  # the hook's tensor now needs no gradient
    handle = orthofx.attach(torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.1), gm)
    assert [hook.site for hook in handle.hooks] == ["0"] and [hook.site for hook in handle.skipped] == ["2"]


def test_an_unrelated_pre_hook_is_not_blamed_for_a_fixed_plain_weight():
    """A logging pre-hook was named as the one recomputing the weight ('a forward pre-hook of the layer (log_shapes)
    recomputes it at each call'). The reason lists the layer's pre-hooks without saying any of them sets it."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    layer.weight = layer._parameters.pop("weight").detach().clone()

    def log_shapes(module, inputs):
        return None

    layer.register_forward_pre_hook(log_shapes)
    reason = orthofx.passes.base.derived_weight(layer)
    assert reason.startswith(f"its weight {OUTSIDE}; the layer's forward pre-hooks: ")
    assert "log_shapes" in reason and "recomputes" not in reason


class _TiedAutoencoder(nn.Module):
    """The decoder's weight is the encoder's, transposed, set in the parent's forward."""

    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(8, 4), nn.Linear(4, 8)
        del self.dec.weight
        self.dec.weight = self.enc.weight.t()

    def forward(self, x):
        self.dec.weight = self.enc.weight.t()
        return self.dec(torch.tanh(self.enc(x)))


def test_a_weight_the_parent_ties_is_not_said_to_be_held_by_no_optimizer():
    """'so no optimizer holds it' was false (the gradient reaches enc.weight, which the optimizer steps); the reason
    says that something outside the layer sets it, the parent's forward among the candidates."""
    torch.manual_seed(0)
    model = _TiedAutoencoder()
    x = torch.randn(4, 8)
    skipped = _skipped(orthofx.explain(model, "isometric", example_inputs=(x,)))
    reason = skipped[("dec", "isometric-init")]
    assert reason.startswith(f"its weight {OUTSIDE}, an assignment)") and "no optimizer" not in reason
    model(x).sum().backward()
    assert model.enc.weight.grad is not None  # what the reason no longer denies


class _PropertyMaskedLinear(nn.Linear):
    """A Linear whose weight is a property: ``weight_raw * mask``."""

    def __init__(self, features: int):
        super().__init__(features, features)
        value = self.weight.detach().clone()
        del self.weight
        self.weight_raw = nn.Parameter(value)
        self.register_buffer("mask", (torch.rand(value.shape) > 0.3).to(value.dtype))

    @property
    def weight(self):
        return self.weight_raw * self.mask


def test_a_weight_property_is_named_as_such():
    """It was called 'a plain tensor, not a parameter of the layer': the reason names the property."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), _PropertyMaskedLinear(8))
    skipped = _skipped(orthofx.explain(model, "isometric", example_inputs=(torch.randn(4, 8),)))
    reason = skipped[("2", "isometric-init")]
    assert reason.startswith("its weight is not a parameter of the layer: _PropertyMaskedLinear.weight is a property "
                             "computing it (write that computation as a parametrization with torch.nn.utils."
                             "parametrize.register_parametrization(layer, 'weight', module) instead")
    assert "plain tensor" not in reason


class _MaskParametrization(nn.Module):
    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight):
        return weight * self.mask


def test_the_proposed_fix_keeps_the_mask_and_convnorm_then_treats_the_layer():
    """The first fix proposed was 'make weight a registered nn.Parameter of the layer', which the hook then fails
    on at every call (torch refuses to assign a tensor to a parameter). The fix the reason gives now, a
    parametrization computing ``weight_raw * mask``, keeps the mask, and ConvNorm applies to the layer (it skipped
    the hooked one): the transformed layer convolves with the masked weight."""
    model = _conv_model()
    x = _inputs(model)
    reason = _skipped(orthofx.explain(model, "convnorm", example_inputs=(x,)))[("2", "convnorm")]
    assert FIX in reason and "registered nn.Parameter" not in reason

    layer = model[2]
    mask = next(iter(layer._forward_pre_hooks.values())).mask
    with pytest.raises(TypeError, match="cannot assign"):  # the former first fix, followed with the hook kept
        layer.weight = nn.Parameter(layer.weight_raw.detach() * mask)
        layer(_layer_input(model))
    torch.manual_seed(0)
    fixed = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    torch.nn.utils.parametrize.register_parametrization(fixed[2], "weight", _MaskParametrization(mask))
    gm = orthofx.transform(fixed, "convnorm", example_inputs=(x,))
    assert "2" in {change.site for change in orthofx.manifest_of(gm).changes}
    conv = gm.get_submodule("2").conv
    torch.testing.assert_close(conv.weight, conv.parametrizations.weight.original * mask, rtol=0, atol=0)
    assert bool((conv.weight[mask == 0] == 0).all()) and bool((conv.weight[mask == 1] != 0).all())


def test_a_recurrent_hidden_weight_a_pre_hook_sets_has_the_same_reason():
    """recurrent_weights_reason's fallback said 'register it as an nn.Parameter of the layer' (which fails with the
    hook kept); it now gives the wording and fixes of conv / Linear layers."""
    torch.manual_seed(0)
    rnn = nn.RNN(6, 6, batch_first=True)
    _mask(rnn, "weight_hh_l0")
    reason = orthofx.passes.base.recurrent_weights_reason(rnn)
    assert reason == (f"its weight_hh_l0 {OUTSIDE}; the layer's forward pre-hooks: _Masked) (write what a hook "
                      "computes as a parametrization with torch.nn.utils.parametrize.register_parametrization(layer, "
                      "'weight_hh_l0', module), or drop the hook and make weight_hh_l0 an nn.Parameter of the layer, "
                      "or leave the layer out of the rule with match.exclude)")
