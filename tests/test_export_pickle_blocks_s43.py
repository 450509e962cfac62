"""Pickled and torch.save'd copies of an export-captured model keep its ``no_grad`` / ``autocast`` blocks (session 43).

Unpickling a GraphModule traces its generated code again. fx's autowrap records a call only when an argument is a
traced value, so the tracer of export-captured graphs ran the graph's ``set_grad_mode(False)`` /
``enter_autocast('cpu', ...)`` calls at trace time and kept none of them: the copy trained the layer the model runs
without gradients and computed its autocast block in float32 (a dtype error on the first call). The reference is
always the untransformed model: which parameters get gradients, outputs and their dtypes, and the grad / autocast
modes after a call and after a call that raises inside the block.
"""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import orthofx
from tests.test_test_isolation_s41 import _nesting, reset_modes

pytestmark = pytest.mark.usefixtures("one_thread")


class _Switch(nn.Module):
    """A leaf (``capture.leaf_modules``) that raises while ``fail`` is set: a call that fails inside the block."""

    def __init__(self):
        super().__init__()
        self.fail = False

    def forward(self, x):
        if self.fail:
            raise RuntimeError("switch failed")
        return x * 2.0


def _block(kind):
    return torch.no_grad() if kind == "no_grad" else torch.autocast("cpu", dtype=torch.bfloat16)


class _Net(nn.Module):
    """``b`` runs inside the block (and the leaf that can fail after it); returns the sum and the block's output."""

    def __init__(self, kind):
        super().__init__()
        self.a, self.b, self.switch = nn.Linear(4, 4), nn.Linear(4, 4), _Switch()
        self.kind = kind

    def inner(self, h, kind):
        with _block(kind):
            h2 = self.switch(self.b(h))
        return h + h2.float(), h2

    def forward(self, x):
        return self.inner(self.a(x), self.kind)


class _Branching(_Net):
    """The block differs per mode (a ModalGraphModule: both graphs hold one)."""

    def forward(self, x):
        other = "autocast" if self.kind == "no_grad" else "no_grad"
        return self.inner(self.a(x), self.kind if self.training else other)


class _Checked(_Net):
    """A default argument read in Python control flow: capture mode auto falls back to torch.export."""

    def forward(self, x, check=False):
        if check:
            raise ValueError("check")
        return super().forward(x)


class _CheckedBranching(_Branching):
    def forward(self, x, check=False):
        if check:
            raise ValueError("check")
        return super().forward(x)


def _x():
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(5))


def _policy(mode):
    return {"capture": {"mode": mode, "leaf_modules": ["_Switch"]},
            "rules": [{"match": {"type": "Linear"}, "apply": "orth_regularizer"}]}


def _model(mode, kind, branching):
    torch.manual_seed(0)
    if mode == "auto":
        return (_CheckedBranching if branching else _Checked)(kind)
    return (_Branching if branching else _Net)(kind)


def _modes():
    return (_nesting(), torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), torch.is_grad_enabled())


def _behaviour(model, training):
    """What the model does in mode ``training``: outputs, which of a / b get gradients (and a's), the modes after
    a call, and after a call that raises inside the block (plain and inside the caller's bfloat16 autocast)."""
    model.train(training)
    model.zero_grad(set_to_none=True)
    out, inner = model(_x())
    after_call = _modes()
    (out.sum() + inner.float().sum()).backward()
    grads = {f"{path}.{name}": getattr(model.get_submodule(path), name).grad
             for path in ("a", "b") for name in ("weight", "bias")}
    model.get_submodule("switch").fail = True
    try:
        failed = []
        for outer in ({"enabled": False}, {"dtype": torch.bfloat16}):
            with torch.autocast("cpu", **outer):
                before = _modes()
                with pytest.raises(RuntimeError, match="switch failed"):
                    model(_x())
                failed.append((before, _modes()))
    finally:
        model.get_submodule("switch").fail = False
    return {"out": out.detach(), "inner": inner.detach(), "dtypes": (out.dtype, inner.dtype), "grads": grads,
            "after call": after_call, "after failed calls": failed, "after": _modes()}


def _assert_same(got, want, label):
    for key in ("dtypes", "after call", "after failed calls", "after"):
        assert got[key] == want[key], (label, key)
    assert {k: v is None for k, v in got["grads"].items()} == {k: v is None for k, v in want["grads"].items()}, label
    for key in ("out", "inner"):
        torch.testing.assert_close(got[key], want[key], msg=f"{label}: {key}")
    for name, grad in want["grads"].items():
        if grad is not None:
            torch.testing.assert_close(got["grads"][name], grad, msg=f"{label}: grad of {name}")


def _copies(gm):
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    return {"pickle": pickle.loads(pickle.dumps(gm)), "torch.save/load": torch.load(buffer, weights_only=False),
            "deepcopy": copy.deepcopy(gm), "pickle of a pickle": pickle.loads(pickle.dumps(pickle.loads(
                pickle.dumps(gm))))}


@pytest.fixture
def modes_reset():
    yield
    reset_modes()


@pytest.mark.parametrize("branching", [False, True], ids=["one graph", "two graphs"])
@pytest.mark.parametrize("kind", ["no_grad", "autocast"])
@pytest.mark.parametrize("mode", ["fx", "export", "auto"])
def test_copies_keep_the_blocks_as_the_model_does(mode, kind, branching, modes_reset):
    model = _model(mode, kind, branching)
    reference = copy.deepcopy(model)
    gm = orthofx.transform(model, _policy(mode), example_inputs=(_x(),))
    assert isinstance(gm, orthofx.capture.ModalGraphModule) == branching
    want = {training: _behaviour(reference, training) for training in (True, False)}
    # the reference is right: the block's layer gets no gradient / runs in bfloat16 where the model says so
    for training in (True, False):
        block = kind if not branching or training else ("autocast" if kind == "no_grad" else "no_grad")
        assert (want[training]["grads"]["b.weight"] is None) == (block == "no_grad")
        assert want[training]["dtypes"][1] == (torch.bfloat16 if block == "autocast" else torch.float32)
    for label, candidate in {"original": gm, **_copies(gm)}.items():
        for training in (True, False):
            _assert_same(_behaviour(candidate, training), want[training], f"{mode} {label} training={training}")
    assert _nesting() == 0 and torch.is_grad_enabled()


def _calls(graph):
    return [(node.op, node.target) for node in graph.nodes]


@pytest.mark.parametrize("branching", [False, True], ids=["one graph", "two graphs"])
def test_auto_falls_back_to_export_and_the_copy_has_the_same_calls(branching):
    model = _model("auto", "autocast", branching)
    explained = str(orthofx.explain(model, _policy("auto"), example_inputs=(_x(),)))
    assert explained.splitlines()[0].startswith("capture: export (auto: symbolic tracing failed")
    gm = orthofx.transform(model, _policy("auto"), example_inputs=(_x(),))
    loaded = pickle.loads(pickle.dumps(gm))
    for training in (True, False):
        for m in (gm, loaded):
            m.train(training)
        assert _calls(loaded.graph) == _calls(gm.graph)  # the same calls, the block's among them (node names differ)
        assert {orthofx.capture.enter_autocast, orthofx.capture.set_grad_mode} & {t for _, t in _calls(loaded.graph)}
    # the hooks that close a block a failed call left open are registered on the copy as on the original
    assert len(loaded._forward_pre_hooks) == len(gm._forward_pre_hooks) == 1
    assert len(loaded._forward_hooks) == len(gm._forward_hooks) == 2


def test_frozen_export_model_pickles_with_its_blocks(modes_reset):
    model = _model("export", "no_grad", False)
    reference = copy.deepcopy(model)
    frozen = orthofx.freeze(orthofx.transform(model, _policy("export"), example_inputs=(_x(),)))
    want = _behaviour(reference, False)
    for label, candidate in {"frozen": frozen, **_copies(frozen)}.items():
        _assert_same(_behaviour(candidate, False), want, label)
