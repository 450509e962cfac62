"""Capture hints of session 44 that did not work when followed; each test follows the remedies the new message names
and checks them against the untransformed model (``orth_regularizer`` changes no weight: the same function).

- After torch.export fixed a str / bool input (``reduce="mean"``), a call with another value was told to use
  ``concrete_args``, which neither the policy nor ``orthofx.transform`` takes (and which fixes the value too).
- A top-level forward that registers a buffer / parameter (or sets a submodule) while it runs was told to capture
  with torch.export, which fails the same way. A submodule set in forward was not recognised at all: symbolic
  tracing reported "not installed as a submodule" with unrelated fixes, and torch.export recorded the layer's
  construction (fresh random weights at every call) and left a layer of fake tensors on the user's model.
- A tensor attribute set in forward (``self.scale = torch.ones(8)``) captured by torch.export was left on the
  model as torch.export's fake tensor: transform then failed in torch's GuardOnDataDependentSymNode.
- ``if double:`` on a bool argument was called "a traced tensor in Python control flow".
"""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthofx
import orthofx.capture

pytestmark = pytest.mark.usefixtures("one_thread")

RULES = [{"name": "l", "match": {"type": "Linear"}, "apply": "orth_regularizer"}]


def _policy(mode=None):
    policy = {"orthofx": 1, "rules": RULES}
    if mode is not None:
        policy["capture"] = {"mode": mode}
    return policy


# ---- 1. a non-tensor input fixed by torch.export


class _Reduce(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x, reduce: str = "mean"):
        h = self.a(x)
        if reduce == "mean":
            return h.mean(0)
        return h.sum(0)


class _Gelu(nn.Module):
    """A str input the forward only passes to a torch function: symbolic tracing keeps it an argument."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x, approximate: str = "none"):
        return F.gelu(self.a(x), approximate=approximate)


def test_another_value_of_a_fixed_str_input_names_remedies_that_work():
    torch.manual_seed(0)
    model, x = _Reduce(), torch.randn(4, 8)
    gm = orthofx.transform(model, _policy(), example_inputs=(x, "mean"))
    assert orthofx.report(gm).to_dict()["capture"]["mode"] == "export"
    torch.testing.assert_close(gm(x, "mean"), model(x, "mean"), rtol=0, atol=1e-6)
    with pytest.raises(orthofx.ArgumentError) as caught:
        gm(x, "sum")
    message = str(caught.value)
    assert "concrete_args" not in message, message  # neither the policy nor transform takes it
    assert "example inputs holding reduce='sum'" in message, message
    # the remedy: transform again with the other value
    other = orthofx.transform(model, _policy(), example_inputs=(x, "sum"))
    torch.testing.assert_close(other(x, "sum"), model(x, "sum"), rtol=0, atol=1e-6)
    # the warning of the capture says the same
    _, info = orthofx.capture.capture(model, example_inputs=(x, "mean"))
    fixed = [w for w in info.warnings if "fixed the non-tensor inputs" in w]
    assert fixed and "concrete_args" not in fixed[0] and "transform once per value" in fixed[0], info.warnings


def test_the_symbolic_tracing_remedy_keeps_a_str_input_the_forward_does_not_branch_on():
    torch.manual_seed(0)
    model, x = _Gelu(), torch.randn(4, 8)
    gm = orthofx.transform(model, _policy("export"), example_inputs=(x, "none"))
    with pytest.raises(orthofx.ArgumentError) as caught:
        gm(x, "tanh")
    message = str(caught.value)
    assert "capture: {mode: fx}" in message and "concrete_args" not in message, message
    _, info = orthofx.capture.capture(model, mode="export", example_inputs=(x, "none"))
    assert any("capture: {mode: fx}" in w and "concrete_args" not in w for w in info.warnings), info.warnings
    traced = orthofx.transform(model, _policy("fx"), example_inputs=(x, "none"))
    for value in ("none", "tanh"):
        torch.testing.assert_close(traced(x, value), model(x, value), rtol=0, atol=1e-6)


# ---- 2. state created by the forward while it runs


class _Buffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x):
        if not hasattr(self, "scale"):
            self.register_buffer("scale", torch.linspace(0.5, 1.5, 8))
        return self.a(x) * self.scale


class _Parameter(_Buffer):
    def forward(self, x):
        if not hasattr(self, "scale"):
            self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        return self.a(x) * self.scale


class _Submodule(_Buffer):
    def forward(self, x):
        if not hasattr(self, "head"):
            self.head = nn.Linear(8, 8)
        return self.head(self.a(x))


STATE = {"_Buffer": ("scale", _Buffer), "_Parameter": ("scale", _Parameter), "_Submodule": ("head", _Submodule)}


@pytest.mark.parametrize("kind", sorted(STATE))
@pytest.mark.parametrize("mode, with_example", [("auto", False), ("auto", True), ("fx", False), ("fx", True),
                                                ("export", True)])
def test_a_top_level_forward_creating_state_names_fixes_that_work(kind, mode, with_example):
    name, cls = STATE[kind]
    torch.manual_seed(0)
    model, x = cls(), torch.randn(4, 8)
    example = {"example_inputs": (x,)} if with_example else {}
    keys = list(model.state_dict())
    with pytest.raises(orthofx.CaptureError) as caught:
        orthofx.transform(model, _policy(mode), **example)
    message = str(caught.value)
    assert f"'{name}'" in message and "__init__" in message and "call the model once" in message, message
    if mode != "export":
        assert "torch.export" not in message, message  # it fails the same way: no remedy to offer
    assert list(model.state_dict()) == keys and not hasattr(model, name)  # the user's model gained nothing
    # the remedy: call the model once first (the reference: a copy of the model, called the same way)
    torch.manual_seed(1)
    model(x)
    reference = copy.deepcopy(model)
    gm = orthofx.transform(model, _policy(mode), **example)
    x2 = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(gm(x2), reference(x2), rtol=0, atol=1e-6)


def test_a_submodule_that_sets_a_layer_in_forward_is_kept_as_a_leaf():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 8), _Submodule()), torch.randn(4, 8)
    reference = copy.deepcopy(model)
    gm = orthofx.transform(model, _policy("fx"))
    fallbacks = orthofx.report(gm).to_dict()["capture"]["leaf_fallbacks"]
    assert [path for path, _ in fallbacks] == ["1"] and "sets submodule 'head'" in fallbacks[0][1], fallbacks
    torch.manual_seed(2)
    out = gm(x)
    torch.manual_seed(2)
    torch.testing.assert_close(out, reference(x), rtol=0, atol=1e-6)
    assert not hasattr(model[1], "head")


class _PlainTensor(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x):
        if not hasattr(self, "scale"):
            self.scale = torch.linspace(0.5, 1.5, 8)
        return self.a(x) * self.scale


def test_export_capture_leaves_no_fake_tensor_on_the_model():
    torch.manual_seed(0)
    model, x = _PlainTensor(), torch.randn(4, 8)
    gm, _ = orthofx.capture.capture(model, mode="export", example_inputs=(x,))
    assert "scale" not in vars(model)  # not torch.export's fake tensor
    torch.testing.assert_close(gm(x), _PlainTensor.forward(copy.deepcopy(model), x), rtol=0, atol=1e-6)
    fresh = _PlainTensor()
    fresh.load_state_dict(model.state_dict())
    gm = orthofx.transform(model, _policy("export"), example_inputs=(x,))
    torch.testing.assert_close(gm(x), fresh(x), rtol=0, atol=1e-6)


# ---- 3. a branch on a plain bool argument


class _Flag(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x, double=True):
        h = self.a(x)
        if double:
            h = self.b(h)
        return h


class _Part(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = nn.Linear(8, 8)

    def forward(self, h, double):
        return self.b(h) if double else h


class _FlagWrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.p = _Part()

    def forward(self, x, double=True):
        return self.p(self.a(x), double)


@pytest.mark.parametrize("mode", ["fx", "auto"])
def test_a_branch_on_a_bool_argument_is_named_as_such_and_its_fixes_work(mode):
    torch.manual_seed(0)
    model, x = _Flag(), torch.randn(4, 8)
    with pytest.raises(orthofx.CaptureError) as caught:
        orthofx.transform(model, _policy(mode))
    message = str(caught.value)
    assert "non-tensor argument 'double' (a bool)" in message and "traced tensor" not in message, message
    assert "control flow (if/while/bool/len)" in message
    # concrete_args to orthofx.capture.capture
    captured, _ = orthofx.capture.capture(model, concrete_args={"double": True})
    gm = orthofx.transform(captured, _policy())
    torch.testing.assert_close(gm(x), model(x, True), rtol=0, atol=1e-6)
    # torch.export with example inputs
    gm = orthofx.transform(model, _policy(), example_inputs=(x, False))
    torch.testing.assert_close(gm(x, False), model(x, False), rtol=0, atol=1e-6)
    # the branch in a submodule listed under leaf_modules (the layer inside stays a site)
    wrapped = _FlagWrapped()
    gm = orthofx.transform(wrapped, {**_policy(mode), "capture": {"mode": mode, "leaf_modules": ["_Part"]}})
    for double in (True, False):
        torch.testing.assert_close(gm(x, double), wrapped(x, double), rtol=0, atol=1e-6)
    assert len(orthofx.report(gm).to_dict()["rows"]) == 2


def test_a_branch_on_a_tensor_computed_from_an_argument_still_names_a_tensor():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)

        def forward(self, x, gate: float = 0.5):
            if self.a(x).mean() > gate:
                return x
            return -x

    with pytest.raises(orthofx.CaptureError) as caught:
        orthofx.transform(Branch(), _policy("fx"))
    assert "traced tensor in Python control flow" in str(caught.value)


# --- a review of the first version: a submodule set under a new name in forward is created state only when it holds
# tensors the model did not hold (an alias of a child, or a module without weights, captured as before)


class _TopAlias(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Linear(4, 4)

    def forward(self, x):
        self._last = self.block  # which block ran: no new weights
        return self._last(x)


class _LoopAlias(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        for layer in self.layers:
            self.current = layer
            x = layer(x)
        return self.head(x)


class _StatelessCreated(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        if not hasattr(self, "act"):
            self.act = nn.GELU()  # no parameters or buffers: nothing the graph must keep
        return self.act(self.a(x))


@pytest.mark.parametrize("mode", ["fx", "auto", "export"])
@pytest.mark.parametrize("cls", [_TopAlias, _LoopAlias, _StatelessCreated], ids=lambda c: c.__name__)
def test_a_submodule_set_in_forward_without_new_tensors_is_no_created_state(cls, mode):
    if cls is _StatelessCreated and mode == "fx":
        pytest.skip("symbolic tracing cannot call a module it has not seen installed (torch.fx); auto takes export")
    torch.manual_seed(0)
    model = cls()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 4)
    policy = {"orthofx": 1, "capture": {"mode": mode},
              "rules": [{"match": {"type": "Linear"}, "apply": "orth_regularizer"}]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = orthofx.transform(model, policy, example_inputs=(x,))
    torch.testing.assert_close(gm(x), reference(x), rtol=0, atol=0)
    # every Linear stays a site: nothing was made a leaf
    assert {row["site"] for row in orthofx.report(gm).rows} >= {
        name for name, m in reference.named_modules() if isinstance(m, nn.Linear)}


class _CreatedHolder(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if not hasattr(self, "noise"):
            self.noise = nn.Module()  # no parameters or buffers, but a tensor the model did not hold
            self.noise.scale = torch.full((8,), 0.5)
        return self.fc(x) * self.noise.scale


def test_a_submodule_created_in_forward_holding_a_plain_tensor_is_created_state():
    """A second review: counting a new submodule by its parameters and buffers only let this one through, and
    export left torch's fake tensor in the graph (transform then failed with GuardOnDataDependentSymNode)."""
    policy = {"orthofx": 1, "capture": {"mode": "export"},
              "rules": [{"match": {"type": "Linear"}, "apply": "orth_regularizer"}]}
    model = _CreatedHolder()
    with pytest.raises(orthofx.CaptureError, match=r"sets submodule 'noise' while it runs.*call the model once"):
        orthofx.transform(model, policy, example_inputs=(torch.randn(4, 8),))
    assert not hasattr(model, "noise")
    # the remedy: one call first
    x = torch.randn(4, 8)
    model(x)
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
