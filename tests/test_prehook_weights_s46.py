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

REASON = "its weight is not a parameter: a forward pre-hook of the layer (_Masked) recomputes it at each call"
FIX = "make weight a registered nn.Parameter of the layer"


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
    assert "its bias is not a parameter: a forward pre-hook of the layer (_Masked)" in outcome
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
    """No pre-hook recomputes it, but no optimizer holds it either: the reason says so."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    model[2].weight = model[2]._parameters.pop("weight").detach().clone()
    x = _inputs(model)
    explained = orthofx.explain(model, "isometric", example_inputs=(x,))
    gm = orthofx.transform(model, "isometric", example_inputs=(x,))
    plan = orthofx.manifest_of(gm).plan
    _same_plan(explained, plan)
    reasons = {reason for (site, _), reason in _skipped(plan).items() if site == "2"}
    assert reasons and all(r.startswith("its weight is a plain tensor, not a parameter of the layer, so no "
                                        "optimizer holds it") for r in reasons)
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
