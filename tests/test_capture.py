"""Tests for orthofx.capture: leaf rules, leaf fallback on untraceable submodules, errors, unwrapping, purity."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from orthofx.capture import ModalGraphModule, OrthofxTracer, capture, unwrap_model
from orthofx.errors import CaptureError


# ------------------------------------------------------------------------------------------------ test models

class Gate(nn.Module):
    """Data-dependent branch: symbolic tracing cannot follow it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return -x


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.lin(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.gate = Gate()
        self.post = Plain()

    def forward(self, x):
        return self.post(self.gate(self.pre(x)))


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = Gate()
        self.c = Plain()

    def forward(self, x):
        return self.c(self.b(x)) + x


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Outer()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.a(x))


class TopBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        if y.mean() > 0:
            return y
        return y * 2


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(4, 4)

    def forward(self, x):
        return self.q(x).softmax(-1)


class SubAttention(Attention):
    pass


class FakeOrthoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x)


FakeOrthoLayer.__module__ = "orthofx.nn.fake"


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.att = Attention()
        self.sub = SubAttention()
        self.plain = Plain()
        self.ortho = FakeOrthoLayer()
        self.seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    def forward(self, x):
        return self.seq(self.ortho(self.plain(self.sub(self.att(x)))))


class WithConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("scale", torch.full((4,), 2.0))

    def forward(self, x):
        return self.lin(x) * self.scale + torch.ones(4)


def call_module_targets(gm):
    return {n.target for n in gm.graph.nodes if n.op == "call_module"}


# ----------------------------------------------------------------------------------------- leaf fallback

def test_data_dependent_submodule_becomes_leaf():
    torch.manual_seed(0)
    model = Net()
    gm, info = capture(model)
    assert info.mode == "fx"
    assert [p for p, _ in info.leaf_fallbacks] == ["gate"]
    reason = info.leaf_fallbacks[0][1]
    assert "control flow" in reason and "test_capture.py" in reason and "x.sum() > 0" in reason
    assert "gate" in call_module_targets(gm)
    assert "post.lin" in call_module_targets(gm)  # Plain stays traced through
    assert "post" not in call_module_targets(gm)
    # Both branches of the gate: pre's output sign decides; check many inputs and make sure both happen.
    branches = set()
    for _ in range(40):
        x = torch.randn(3, 4) * 3
        with torch.no_grad():
            branches.add(bool(model.pre(x).sum() > 0))
            torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    assert branches == {True, False}
    assert type(gm).__name__ == "Net"


def test_nested_failure_only_inner_becomes_leaf():
    model = Nested()
    gm, info = capture(model)
    assert [p for p, _ in info.leaf_fallbacks] == ["a.b"]
    targets = call_module_targets(gm)
    assert "a.b" in targets and "a.c.lin" in targets and "head" in targets
    assert "a" not in targets and "a.c" not in targets
    for sign in (1.0, -1.0):
        x = sign * torch.rand(2, 4)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_top_level_failure_raises_capture_error():
    with pytest.raises(CaptureError) as info:
        capture(TopBranch())
    err = info.value
    msg = str(err)
    assert err.module_path == ""
    assert "top-level forward" in msg and "TopBranch" in msg
    assert "control flow" in msg and "y.mean() > 0" in msg and "test_capture.py:" in msg
    assert "leaf_modules" in msg and "concrete_args" in msg and "submodule" in msg
    assert isinstance(err.__cause__, torch.fx.proxy.TraceError)
    assert isinstance(err, RuntimeError)


def test_other_exception_cause_and_max_retries():
    class Boom(nn.Module):
        def forward(self, x):
            raise TypeError("unsupported thing\nsecond line")

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.boom = Boom()
            self.gate = Gate()

        def forward(self, x):
            return self.gate(self.boom(x))

    gm, info = capture(M())
    assert dict(info.leaf_fallbacks).keys() == {"boom", "gate"}
    assert "raised TypeError: unsupported thing" in dict(info.leaf_fallbacks)["boom"]
    assert "\n" not in dict(info.leaf_fallbacks)["boom"]  # one line

    with pytest.raises(CaptureError) as err:
        capture(M(), max_retries=1)
    assert err.value.module_path in ("boom", "gate")
    assert "max_retries=1" in str(err.value) and "leaf_modules" in str(err.value)


def test_concrete_args_resolve_control_flow():
    class Flag(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, double=False):
            y = self.lin(x)
            if double:
                y = y * 2
            return y

    model = Flag()
    gm, info = capture(model, concrete_args={"double": True})
    x = torch.randn(2, 4)
    torch.testing.assert_close(gm(x, True), model(x, True))
    assert info.leaf_fallbacks == []


def test_unknown_mode():
    with pytest.raises(CaptureError) as err:
        capture(Plain(), mode="export-ish")
    assert "'auto'" in str(err.value) and "'fx'" in str(err.value) and "'export'" in str(err.value)


# ------------------------------------------------------------------------------------------------ leaf rules

def test_default_leaves():
    gm, _ = capture(Mixed())
    targets = call_module_targets(gm)
    assert "ortho" in targets  # orthofx.nn classes are leaves
    assert "ortho.lin" not in targets
    assert {"seq.0", "seq.1"} <= targets and "seq" not in targets  # Sequential is traced through
    assert {"att.q", "sub.q", "plain.lin"} <= targets


def test_leaf_types_by_name_dotted_path_and_subclass():
    gm, _ = capture(Mixed(), leaf_types=["Attention"])
    targets = call_module_targets(gm)
    assert {"att", "sub"} <= targets  # SubAttention is a subclass of Attention
    assert "att.q" not in targets and "plain" not in targets

    gm, _ = capture(Mixed(), leaf_types=[f"{SubAttention.__module__}.{SubAttention.__qualname__}"])
    targets = call_module_targets(gm)
    assert "sub" in targets and "att" not in targets

    gm, _ = capture(Mixed(), leaf_types=[Plain])
    assert "plain" in call_module_targets(gm)

    gm, _ = capture(Mixed(), leaf_types=["Sequential"])
    assert "seq" in call_module_targets(gm)


def test_leaf_paths():
    gm, _ = capture(Mixed(), leaf_paths=["att", "seq"])
    targets = call_module_targets(gm)
    assert {"att", "seq"} <= targets and "sub" not in targets and "sub.q" in targets


def test_tracer_is_leaf_module_directly():
    tracer = OrthofxTracer(leaf_types=("Attention",), leaf_paths=("x.y",))
    assert tracer.is_leaf_module(nn.Conv2d(1, 1, 1), "c")
    assert not tracer.is_leaf_module(nn.Sequential(), "s")
    assert not tracer.is_leaf_module(nn.ModuleList(), "l")
    assert tracer.is_leaf_module(SubAttention(), "s")
    assert tracer.is_leaf_module(Plain(), "x.y")
    assert not tracer.is_leaf_module(Plain(), "x")
    assert tracer.is_leaf_module(FakeOrthoLayer(), "o")


def test_nn_module_stack_metadata():
    gm, _ = capture(Nested())
    stacks = {n.target: n.meta.get("nn_module_stack") for n in gm.graph.nodes if n.op == "call_module"}
    assert stacks["a.c.lin"] is not None
    assert list(stacks["a.c.lin"]) == ["a", "a.c", "a.c.lin"]
    assert stacks["a.b"] is not None and "a.b" in stacks["a.b"]


# -------------------------------------------------------------------------------------------------- unwrap

@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's first import of dynamo warns
def test_unwrap_wrappers():
    model = Plain()
    assert unwrap_model(model) is model
    assert unwrap_model(nn.DataParallel(model)) is model
    compiled = torch.compile(model)
    assert compiled is not model
    assert unwrap_model(compiled) is model
    assert unwrap_model(torch.compile(nn.DataParallel(model))) is model
    gm, _ = capture(torch.compile(nn.DataParallel(model)))
    assert type(gm).__name__ == "Plain"


@pytest.mark.parametrize("bad", [None, {"w": torch.zeros(1)}, Plain, lambda x: x])
def test_unwrap_rejects_non_modules(bad):
    with pytest.raises(CaptureError, match="expected a torch.nn.Module"):
        capture(bad)


# ------------------------------------------------------------------------------------------------- purity

def test_model_not_modified():
    torch.manual_seed(0)
    for model in (Net(), Nested(), WithConstant()):
        model.eval()
        before_state = {k: v.clone() for k, v in model.state_dict().items()}
        before_params = [(n, p) for n, p in model.named_parameters()]
        before_dict = {m: dict(vars(m)) for m in model.modules()}
        gm, _ = capture(model)
        assert model.training is False and gm.training is False
        after_state = model.state_dict()
        assert before_state.keys() == after_state.keys()
        for k, v in before_state.items():
            assert torch.equal(v, after_state[k]) and v.dtype == after_state[k].dtype
        assert [(n, p) for n, p in model.named_parameters()] == before_params
        for m, d in before_dict.items():
            assert set(vars(m)) == set(d), type(m).__name__
        assert not any(k.startswith("_tensor_constant") for k in vars(model))


class Counter(nn.Module):
    """A buffer updated in place with no traced value involved (a call counter)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls.add_(1)
        return self.lin(x)


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_buffer_updates_are_recorded_not_run_at_capture(mode):
    model = Counter()
    gm, _ = capture(model, mode=mode, example_inputs=(torch.randn(2, 4),))
    assert int(model.calls) == 0  # capture ran nothing on the model
    gm(torch.randn(2, 4))
    gm(torch.randn(3, 4))
    assert int(gm.calls) == 2 and gm.calls is model.calls  # the graph updates the (shared) buffer


def test_graph_module_shares_submodules():
    model = Net()
    gm, _ = capture(model)
    assert gm.get_submodule("gate") is model.gate
    assert gm.get_submodule("pre") is model.pre


def test_factory_constant_warning_and_output():
    model = WithConstant()
    gm, info = capture(model)
    assert any("_tensor_constant0" in w and "device=" in w for w in info.warnings)
    x = torch.randn(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
    assert not hasattr(model, "_tensor_constant0")
    # no warning when nothing is baked in
    assert capture(Plain())[1].warnings == []


def test_graph_module_pickles():
    gm, _ = capture(Net())
    clone = pickle.loads(pickle.dumps(gm))
    x = torch.randn(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), gm(x))


class _ModeBranch(nn.Module):
    def forward(self, x):
        if self.training:
            return x * 2
        return x


class _WithModeBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.branch = _ModeBranch()
        self.drop = nn.Dropout(0.5)  # a leaf: it switches with gm.eval() and is no reason to warn

    def forward(self, x):
        return self.drop(self.branch(self.lin(x)))


def test_mode_dependent_forward_gets_two_graphs_and_flags_are_restored():
    model = _WithModeBranch().train()
    model.lin.eval()  # a mixed state must come back exactly
    flags = [m.training for m in model.modules()]
    gm, info = capture(model)
    assert [m.training for m in model.modules()] == flags
    assert isinstance(gm, ModalGraphModule) and info.mode_dependent == ["branch"]
    assert info.warnings == [] and "train and eval graphs (self.training branches in branch)" in info.summary()
    plain = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.BatchNorm1d(3))
    plain_gm, plain_info = capture(plain)
    assert not isinstance(plain_gm, ModalGraphModule) and plain_info.mode_dependent == []
    assert capture(plain)[1].warnings == []


@pytest.mark.parametrize("mode", ["fx", "export"])
@pytest.mark.parametrize("training", [False, True])
def test_captured_containers_take_the_models_training_mode(mode, training):
    # fx creates a fresh nn.Module (training mode) for every container path such as "body.0"; an eval-mode
    # model must come back in eval mode throughout, and a model with one submodule in the other mode keeps it
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()),
                          nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), nn.Linear(4, 2)))
    model.train(training)
    model[1][0].train(not training)
    gm, _ = capture(model, mode=mode, example_inputs=(torch.randn(3, 4),))
    flags = {path: module.training for path, module in model.named_modules()}
    for path, module in gm.named_modules():
        assert module.training == flags.get(path, training), path
    assert [m.training for m in model.modules()] == list(flags.values())  # the model is left as it was


# ---------------------------------------------------------------------------------- stores on self while tracing

class _Keeps(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(4, 4)

    def forward(self, x):
        w = torch.softmax(self.q(x), -1)
        self.last_weights = w  # kept for visualisation
        return w * x


class _Steps(nn.Module):
    def __init__(self):
        super().__init__()
        self.keeps = _Keeps()
        self.gate = _StoresThenBranches()
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.steps += 1  # rebinds the buffer to a traced value under fx
        return self.gate(self.keeps(x)) + self.steps


class _StoresThenBranches(nn.Module):
    def forward(self, x):
        self.seen = x  # stored before the trace of this forward fails (it becomes a leaf)
        if x.sum() > 0:
            return x
        return -x


def test_stores_on_self_leave_no_proxies_and_buffer_rebinds_are_recorded():
    model = _Steps()
    gm, info = capture(model, mode="fx")
    assert info.leaf_fallbacks[0][0] == "gate"
    assert type(model._buffers["steps"]) is torch.Tensor and int(model.steps) == 0
    assert "last_weights" not in vars(model.keeps) and "seen" not in vars(model.gate)
    for module in list(gm.modules()) + list(model.modules()):
        assert not any(isinstance(v, torch.fx.Proxy) for v in vars(module).values())
        assert not any(isinstance(v, torch.fx.Proxy) for v in module._buffers.values())
    assert any("'keeps'" in w and "last_weights" in w for w in info.warnings)
    reference = _Steps()
    reference.load_state_dict(model.state_dict())
    for _ in range(2):
        x = torch.randn(2, 4)
        torch.testing.assert_close(gm(x), reference(x))
    assert int(gm.steps) == int(reference.steps) == 2  # the graph updates the buffer as the forward does
    pickle.loads(pickle.dumps(gm))
    assert list(gm.state_dict()) == list(model.state_dict())


class _Scripted(nn.Module):
    def __init__(self):
        super().__init__()
        self.j = torch.jit.script(nn.Linear(4, 4))
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.j(x))


def test_scripted_submodule_is_a_leaf_and_keeps_its_parameters():
    model = _Scripted()
    gm, _ = capture(model, mode="fx")
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["j", "fc"]
    assert [n for n, _ in gm.named_parameters()] == [n for n, _ in model.named_parameters()]
    x = torch.randn(3, 4)
    torch.testing.assert_close(gm(x), model(x))


class _NumpyScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(4, 4)
        self.d = 4

    def forward(self, x):
        import numpy as np
        return self.q(x) / np.sqrt(self.d) + np.float32(0.5)


def test_numpy_scalars_become_python_numbers():
    model = _NumpyScale()
    gm, _ = capture(model, mode="fx")
    assert "np." not in gm.code and "numpy" not in gm.code
    x = torch.randn(3, 4)
    torch.testing.assert_close(gm(x), model(x))


def test_hooks_on_the_model_itself_are_reported_in_fx_mode():
    model = Plain()
    model.register_forward_pre_hook(lambda module, args: (args[0] * 10,))
    _, info = capture(model, mode="fx")
    assert any("hook" in w and "mode: export" in w for w in info.warnings)
    sub = Plain()
    sub.lin.register_forward_pre_hook(lambda module, args: (args[0] * 10,))  # on a leaf: in the graph
    assert capture(sub, mode="fx")[1].warnings == []


class _Positional(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("inv_freq", torch.arange(1.0, 5.0), persistent=False)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x * self.inv_freq)


class _WithPlainTensor(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos = _Positional()
        self.causal = torch.tril(torch.ones(3, 3))  # a plain tensor attribute, not a buffer
        self.register_buffer("scale", torch.ones(4))

    def forward(self, x):
        return (self.causal @ self.pos(x)) * self.scale


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_state_dict_has_the_models_keys(mode):
    model = _WithPlainTensor()
    x = torch.randn(2, 3, 4)
    gm, _ = capture(model, mode=mode, example_inputs=(x,))
    assert set(gm.state_dict()) == set(model.state_dict())
    gm.load_state_dict(model.state_dict())
    torch.testing.assert_close(gm(x), model(x))


def test_submodules_in_the_other_training_mode_are_reported():
    model = _WithModeBranch().train()
    model.branch.eval()  # traced through: its self.training branch is fixed in the graph
    _, info = capture(model, mode="fx")
    assert any("eval mode" in w and "self.training branches in branch" in w for w in info.warnings)
    model.branch.train()
    assert capture(model, mode="fx")[1].warnings == []


class _TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(Plain(), Plain())
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.enc(x))


def test_policy_leaf_modules_accept_module_paths():
    import orthofx
    policy = {"orthofx": 1, "capture": {"leaf_modules": ["enc.0"]},
              "rules": [{"match": {"type": "Linear"}, "apply": "orth_regularizer"}]}
    gm = orthofx.transform(_TwoBlocks(), policy, example_inputs=(torch.randn(3, 4),))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert "enc.0" in targets and "enc.1.lin" in targets


@pytest.mark.parametrize("kwargs, says", [
    ({"leaf_types": [3]}, "leaf_types must hold class names"),
    ({"leaf_types": [nn.Conv2d, None]}, "got None"),
    ({"leaf_paths": [nn.Conv2d]}, "leaf_paths must hold module paths"),
])
def test_bad_leaf_arguments_are_argument_errors(kwargs, says):
    from orthofx.errors import ArgumentError
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    with pytest.raises(ArgumentError, match=says):
        capture(model, **kwargs)
    with pytest.raises(ArgumentError, match=says):
        OrthofxTracer(**kwargs)
