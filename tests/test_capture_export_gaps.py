"""Capture mode ``export`` (and ``auto``'s fallback to it) on forwards it could not capture, or captured wrongly:
keyword inputs, leaf layers called inside ``torch.no_grad()`` / ``torch.autocast(...)``, a ``*args`` forward called
with another number of inputs, lazy layers, and example inputs that are the same tensor. Every captured graph is
compared with the eager model at the example's batch size and at another one."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthofx
from orthofx.capture import capture
from orthofx.errors import ArgumentError


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


def _input(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ keyword inputs

class KeywordInputs(nn.Module):
    """A keyword-only tensor ``scale``, an optional ``mask`` and a string option; the shape branch makes symbolic
    tracing fail at the top level, so ``auto`` falls back to export."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x, mask=None, *, scale, reduce="sum"):
        y = self.embed(x) * scale
        if mask is not None:
            y = y * mask
        if y.shape[-1] > 4:
            y = torch.relu(y)
        y = self.head(y)
        return y.sum(-1) if reduce == "sum" else y.mean(-1)


@pytest.mark.parametrize("mode", ["export", "auto"])
def test_export_capture_takes_keyword_inputs(mode):
    torch.manual_seed(0)
    model = KeywordInputs()
    gm, info = capture(model, mode=mode, example_inputs=(_input(3, 4),), example_kwargs={"scale": _input(3, 1, seed=1)})
    assert info.mode == "export"
    assert not any("batch size" in w for w in info.warnings)  # the batch stays dynamic, for the keyword input too
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["embed", "head"]
    for batch in (3, 5):
        x, scale = _input(batch, 4, seed=batch), _input(batch, 1, seed=10 + batch)
        torch.testing.assert_close(gm(x, scale=scale), model(x, scale=scale))
        torch.testing.assert_close(gm(x, scale=scale, reduce="sum"), model(x, scale=scale, reduce="sum"))
    # the example left mask and reduce at their defaults: the graph computes with them, and refuses others
    x, scale = _input(5, 4), _input(5, 1, seed=1)
    with pytest.raises(ArgumentError, match=r"input 'mask'.*left at its default \(None\).*got a Tensor of shape "
                                            r"\(5, 6\)"):
        gm(x, mask=torch.ones(5, 6), scale=scale)
    with pytest.raises(ArgumentError, match=r"input 'reduce'.*left at its default \('sum'\).*got a str \('mean'\)"):
        gm(x, scale=scale, reduce="mean")
    # unpickling re-traces the graph's code: inputs, defaults and checks stay
    clone = pickle.loads(pickle.dumps(gm))
    torch.testing.assert_close(clone(x, scale=scale), model(x, scale=scale))
    with pytest.raises(ArgumentError, match="input 'mask'"):
        clone(x, mask=torch.ones(5, 6), scale=scale)


def test_keyword_input_given_in_the_example_is_an_input_of_the_graph():
    torch.manual_seed(0)
    model = KeywordInputs()
    x, mask, scale = _input(3, 4), _input(3, 6, seed=1), _input(3, 1, seed=2)
    gm, _ = capture(model, mode="export", example_inputs=(x,),
                    example_kwargs={"mask": mask, "scale": scale, "reduce": "mean"})
    for batch in (3, 6):
        x, mask, scale = _input(batch, 4, seed=3), _input(batch, 6, seed=4), _input(batch, 1, seed=5)
        torch.testing.assert_close(gm(x, mask=mask, scale=scale, reduce="mean"),
                                   model(x, mask=mask, scale=scale, reduce="mean"))
    with pytest.raises(ArgumentError, match=r"input 'reduce'.*reduce='mean' only"):
        gm(x, mask=mask, scale=scale, reduce="sum")


def test_example_kwargs_must_be_a_dict_of_names():
    with pytest.raises(orthofx.CaptureError, match=r"example_kwargs must be a dict.*got tuple"):
        capture(KeywordInputs(), mode="export", example_inputs=(_input(3, 4),), example_kwargs=(_input(3, 1),))


# ------------------------------------------------------------------------------- no_grad and autocast regions

class Block(nn.Module):
    """A user block kept as a leaf by ``leaf_modules``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.tanh(self.lin(x))


class Regions(nn.Module):
    """An orthofx layer called inside ``torch.no_grad()`` and a leaf block inside ``torch.autocast``; the Python
    branch on a shape makes symbolic tracing fail."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.frozen = orthofx.nn.OrthogonalLinear(4, 4)
        self.block = Block()

    def forward(self, x):
        y = self.stem(x)
        with torch.no_grad():
            z = self.frozen(y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            w = self.block(y + z)
        w = w.float()
        return w * 2 if x.shape[-1] > 2 else w


def test_leaves_called_inside_no_grad_and_autocast_are_module_calls():
    torch.manual_seed(0)
    model = Regions()
    gm, info = capture(model, mode="export", leaf_types=["Block"], example_inputs=(_input(3, 4),))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["stem", "frozen", "block"]
    assert info.warnings == []  # no "stays as inlined ATen ops", no device warning for export's dtype checks
    for batch in (3, 5):
        x = _input(batch, 4, seed=batch)
        got, expected = gm(x), model(x)
        torch.testing.assert_close(got, expected, atol=0, rtol=0)  # the block ran in bfloat16 in both
        # the no_grad region stays one: gradients reach the stem, not the frozen layer
        model.zero_grad()
        got.sum().backward()
        assert model.frozen.raw_weight.grad is None and model.stem.weight.grad is not None
    # the graph restores the grad mode it is run in (not the one it was captured in)
    with torch.no_grad():
        assert not gm(x).requires_grad
    assert torch.is_grad_enabled()


def test_rules_on_leaves_inside_no_grad_and_autocast_find_their_sites():
    torch.manual_seed(0)
    policy = {"capture": {"mode": "export", "leaf_modules": ["Block"]},
              "rules": [{"match": {"type": ["OrthogonalLinear", "Block"]}, "apply": "jacobian_isometry"}]}
    plan = orthofx.explain(Regions(), policy, example_inputs=(_input(3, 4),))  # was: PlanError "module sites: none"
    assert sorted(entry.site.name for entry in plan.entries) == ["block", "frozen"]


# ------------------------------------------------------------------------------------------- a *args forward

class StarArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, *args):
        y = self.lin(args[0])
        for extra in args[1:]:
            y = y + extra
        return y


def test_star_args_forward_refuses_another_number_of_inputs():
    torch.manual_seed(0)
    model = StarArgs()
    gm, info = capture(model, mode="export", example_inputs=(_input(3, 4), _input(3, 4, seed=1)))
    assert not any("batch size" in w for w in info.warnings)
    for batch in (3, 5):
        inputs = (_input(batch, 4, seed=2), _input(batch, 4, seed=3))
        torch.testing.assert_close(gm(*inputs), model(*inputs))
    clone = pickle.loads(pickle.dumps(gm))
    for module in (gm, clone):
        for count in (1, 3):
            with pytest.raises(ArgumentError, match=rf"input '\*args'.*for 2 input\(s\) in \*args.*got {count}\b"
                                                    r".*transform the model again"):
                module(*[_input(3, 4, seed=i) for i in range(count)])


# ------------------------------------------------------------------------------------------------- lazy layers

class LazyNet(nn.Module):
    """Lazy layers, and a Python branch on a shape (symbolic tracing fails at the top level)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.LazyConv2d(4, 3, padding=1)
        self.fc = nn.LazyLinear(3)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        if x.shape[-1] > 4:
            x = F.avg_pool2d(x, 2)
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("mode", ["export", "auto"])
def test_export_capture_of_lazy_layers(mode):
    torch.manual_seed(0)
    model = LazyNet()
    torch.manual_seed(1)
    gm, info = capture(model, mode=mode, example_inputs=(_input(2, 3, 6, 6),))
    drawn = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(drawn, torch.rand(3))  # the capture drew no random numbers (the copy's init was forked)
    assert info.mode == "export"
    # as in fx mode: the model's lazy layers are left as they are and initialise on the graph's first call
    assert isinstance(model.conv, nn.LazyConv2d) and model.conv.has_uninitialized_params()
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv", "fc"]
    for batch in (2, 5):
        x = _input(batch, 3, 6, 6, seed=batch)
        got = gm(x)
        torch.testing.assert_close(got, model(x))
    assert type(model.conv) is nn.Conv2d and model.fc.in_features == 4 * 3 * 3


def test_transform_of_lazy_layers_in_export_mode():
    torch.manual_seed(0)
    model = LazyNet()
    reference = copy.deepcopy(model)
    policy = {"capture": {"mode": "export"},
              "rules": [{"match": {"type": ["Conv2d", "Linear"]}, "apply": "orth_regularizer"}]}
    x = _input(2, 3, 6, 6)
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    assert model.conv.has_uninitialized_params()  # transform rewrote a copy
    assert {t.site for t in orthofx.manifest_of(gm).penalties} == {"conv", "fc"}
    reference(x)  # initialise, then take the transformed model's weights
    reference.load_state_dict(gm.state_dict())
    for batch in (2, 4):
        x = _input(batch, 3, 6, 6, seed=batch)
        torch.testing.assert_close(gm(x), reference(x))


def test_lazy_layers_that_cannot_run_on_the_example_say_so():
    model = LazyNet()
    with pytest.raises(orthofx.CaptureError, match=r"lazy layers that have not run yet \('conv', 'fc'\).*"
                                                   r"RuntimeError.*model\(x\)"):
        capture(model, mode="export", example_inputs=(_input(2, 3),))  # a conv needs 3 or 4 dimensions
    assert model.conv.has_uninitialized_params()


# ---------------------------------------------------------------------------------------- aliased example inputs

class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, y):
        return self.lin(x) + y


def test_example_inputs_that_are_one_tensor_stay_two_inputs():
    # torch.export took (x, x) as one tensor and read the second everywhere: lin(y) + y for lin(x) + y
    torch.manual_seed(0)
    model = TwoInputs()
    x = _input(3, 4)
    gm, _ = capture(model, mode="export", example_inputs=(x, x))
    for batch in (3, 5):
        a, b = _input(batch, 4, seed=1), _input(batch, 4, seed=2)
        torch.testing.assert_close(gm(a, b), model(a, b))
