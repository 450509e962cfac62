"""State-dict hooks on a layer a pass replaces (session 38).

``move_call_hooks`` moves a replaced layer's forward/backward hooks to its replacement but leaves its state-dict
hooks behind, and nothing said so: the hooks of an ``nn.Conv2d`` that the orthogonal preset swaps for an
``OrthogonalConv2d`` silently stopped running. They are not moved (the replacement's entries have other names);
transform now warns. A wrapper that keeps the layer inside (ConvNorm keeps it as ``conv``) keeps its hooks running.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import orthofx
from orthofx import OrthofxWarning
from orthofx.passes.base import replace_module

KINDS = ("register_state_dict_pre_hook", "register_state_dict_post_hook", "register_load_state_dict_pre_hook",
         "register_load_state_dict_post_hook")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


def _hooked(calls: list):
    """A model whose ``conv`` has one hook of each state-dict kind; each records its call in ``calls``."""
    torch.manual_seed(0)
    model = _Net()
    conv = model.conv
    conv.register_state_dict_pre_hook(lambda module, prefix, keep_vars: calls.append(("pre", prefix)))

    def post(module, state, prefix, local_metadata):
        calls.append(("post", prefix))
        state[prefix + "doubled_weight"] = 2 * state[prefix + "weight"]  # reads the layer's own key

    conv.register_state_dict_post_hook(post)
    conv.register_load_state_dict_pre_hook(lambda module, state, prefix, *rest: calls.append(("load_pre", prefix)))
    conv.register_load_state_dict_post_hook(lambda module, keys: calls.append(("load_post", None)))
    return model


def _transform(model, preset):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = orthofx.transform(model, preset, example_inputs=(torch.randn(2, 3, 8, 8),))
    return gm, [str(w.message) for w in caught
                if issubclass(w.category, OrthofxWarning) and "state-dict hook" in str(w.message)]


def test_orthogonal_replacement_warns_that_the_layers_state_dict_hooks_are_not_carried_over():
    calls = []
    gm, caught = _transform(_hooked(calls), "orthogonal")
    assert type(gm.conv).__name__ == "OrthogonalConv2d"
    assert len(caught) == 1, caught
    message = caught[0]
    assert "'conv'" in message and "gm.get_submodule('conv')" in message and "not carried over" in message
    for kind in KINDS:
        assert kind in message
    assert message in orthofx.manifest_of(gm).capture.warnings  # next to the root's state-dict hook warning
    # what the warning says is true: gm's state_dict runs none of the hooks (they were not moved)
    calls.clear()
    state = gm.state_dict()
    assert calls == [] and "conv.doubled_weight" not in state


def test_a_hook_without_other_hooks_names_only_its_kind():
    model = _Net()
    model.conv._register_state_dict_hook(lambda module, state, prefix, local_metadata: None)  # the older name
    _, caught = _transform(model, "orthogonal")
    assert len(caught) == 1
    assert "register_state_dict_post_hook" in caught[0]
    assert all(kind not in caught[0] for kind in KINDS if kind != "register_state_dict_post_hook")


def test_convnorm_keeps_the_layer_and_its_state_dict_hooks_run_without_a_warning():
    calls = []
    model = _hooked(calls)
    reference = model.conv.state_dict()  # the hooks on the untransformed layer, prefix ''
    assert calls == [("pre", ""), ("post", "")]
    calls.clear()
    gm, caught = _transform(model, "convnorm")
    assert type(gm.conv).__name__ == "ConvNormConv2d"  # (on a copy of the model: transform is not in place)
    assert caught == []
    calls.clear()
    state = gm.state_dict()
    assert calls == [("pre", "conv.conv."), ("post", "conv.conv.")]
    torch.testing.assert_close(state["conv.conv.doubled_weight"], reference["doubled_weight"], rtol=0, atol=0)
    torch.testing.assert_close(state["conv.conv.doubled_weight"], 2 * model.conv.weight.detach(), rtol=0, atol=0)
    calls.clear()
    gm.load_state_dict({k: v for k, v in state.items() if k != "conv.conv.doubled_weight"})
    assert ("load_pre", "conv.conv.") in calls and ("load_post", None) in calls


@pytest.mark.parametrize("preset", ["lorth"])
def test_no_replacement_no_warning(preset):
    calls = []
    gm, caught = _transform(_hooked(calls), preset)
    assert caught == [] and gm.conv is not None
    calls.clear()
    assert "conv.doubled_weight" in gm.state_dict() and calls == [("pre", "conv."), ("post", "conv.")]


class _ProbedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.features(x))


def test_a_jacobian_probe_takes_over_the_blocks_state_dict_hooks_without_a_warning():
    """The probe adopts its block's registries (same state-dict keys) but is not its parent: the block's hooks
    stopped running on gm.state_dict(); they move to the probe, and back to the block on freeze."""
    torch.manual_seed(0)
    model, calls = _ProbedNet(), []

    def post(module, state, prefix, local_metadata):
        calls.append(prefix)
        state[prefix + "norm"] = state[prefix + "0.weight"].norm()

    model.features.register_state_dict_post_hook(post)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = orthofx.transform(model, "jacobian", example_inputs=(torch.randn(4, 6),))
    assert type(gm.features).__name__ == "JacobianProbe"
    assert not [w for w in caught if "state-dict hook" in str(w.message)]
    calls.clear()
    state = gm.state_dict()
    key = [k for k in state if k.endswith("norm")]
    assert len(calls) == 1 and key == [calls[0] + "norm"] and calls[0].startswith("features.")
    torch.testing.assert_close(state[key[0]], model.features[0].weight.detach().norm(), rtol=0, atol=0)
    # the probe has the block's entries, so the hook moved to it; freeze gives the block back, with the hook
    frozen = orthofx.freeze(gm)
    assert type(frozen.features) is nn.Sequential
    calls.clear()
    assert "features.norm" in frozen.state_dict() and calls == ["features."]


def test_replace_module_moves_state_dict_hooks_only_to_a_module_with_the_same_entries():
    from orthofx.nn.jacobian import JacobianProbe
    root = nn.Sequential(nn.Linear(3, 3))
    calls = []
    handle = root[0].register_load_state_dict_post_hook(lambda module, keys: calls.append(type(module).__name__))
    state = root.state_dict()
    probe = JacobianProbe(root[0])
    replace_module(root, "0", probe)
    root.load_state_dict(state)
    assert calls == ["JacobianProbe"]
    handle.remove()  # the user's handle still removes the moved hook
    root.load_state_dict(state)
    assert calls == ["JacobianProbe"]
    root[0].register_state_dict_pre_hook(lambda module, prefix, keep_vars: calls.append(prefix))
    old = replace_module(root, "0", nn.Linear(3, 3))  # other tensors: the hook stays with the old layer
    root.state_dict()
    assert calls == ["JacobianProbe"] and len(old._state_dict_pre_hooks) == 1
