"""A transformed model whose forward raises inside its own ``no_grad`` / ``autocast`` block (session 42).

The captured graph enters and leaves the forward's blocks with calls, not ``with`` statements: before this session
a call that raised between the two left the caller inside the block (gradients off, or autocast's nesting one too
high, after which no autocast block of the thread cleared torch's cache of weight casts: a training loop that went
on after a failed batch trained on the bfloat16 weights cast before its first step). The reference is the
untransformed model, whose ``with`` statements leave their blocks when the forward raises.
"""

import copy
import io
import pickle
import threading

import pytest
import torch
from torch import nn

import orthofx
from tests.test_test_isolation_s41 import _bf16_step_follows_the_weights, _nesting, reset_modes

pytestmark = pytest.mark.usefixtures("one_thread")


class _Blocks(nn.Module):
    """A float32 block (autocast off) holding a ``no_grad`` block; ``inner`` picks where a wrong input fails."""

    def __init__(self, inner="grad"):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        self.inner = inner

    def forward(self, x):
        with torch.autocast("cpu", enabled=False):
            h = torch.relu(self.c1(x))
            if self.inner == "grad":
                with torch.no_grad():
                    h = self.c2(h)
            else:
                with torch.enable_grad():
                    h = self.c2(h)
        return self.fc(h.mean((2, 3)))


class _Branching(_Blocks):
    """Another forward in training mode (a ModalGraphModule holds both graphs)."""

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                x = x * 2.0
        return super().forward(x)


def _x(channels=3):
    return torch.randn(2, channels, 6, 6, generator=torch.Generator().manual_seed(3))


def _modes():
    return (_nesting(), torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), torch.is_grad_enabled(),
            torch.is_autocast_cache_enabled())


def _modes_after_failing_call(model, outer):
    """The modes inside the caller's ``outer`` block before and after ``model`` raised, and after the block."""
    with outer():
        before = _modes()
        with pytest.raises(RuntimeError):
            model(_x(channels=5))  # the model takes 3 channels: c1 fails inside the autocast(enabled=False) block
        after = _modes()
    return before, after, _modes()


_OUTER = {"plain": lambda: torch.autocast("cpu", enabled=False),
          "bf16 autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
          "no_grad": torch.no_grad}


@pytest.fixture
def modes_reset():
    """A failing test must not leave its blocks open for the next ones."""
    yield
    reset_modes()


@pytest.mark.parametrize("outer", sorted(_OUTER))
@pytest.mark.parametrize("inner", ["grad", "enable_grad"])
def test_failed_call_leaves_its_blocks_as_the_model_does(outer, inner, modes_reset):
    model = _Blocks(inner).eval()
    reference = _modes_after_failing_call(model, _OUTER[outer])
    assert reference[0] == reference[1]  # the reference is right: the model's with statements left their blocks
    gm = orthofx.transform(model, "lorth", example_inputs=(_x(),))
    assert _modes_after_failing_call(gm, _OUTER[outer]) == reference
    assert _nesting() == 0 and _bf16_step_follows_the_weights()


def _copies(gm, tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(gm, path)
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    return {"deepcopy": copy.deepcopy(gm), "copy": copy.copy(gm), "pickle": pickle.loads(pickle.dumps(gm)),
            "torch.load": torch.load(path, weights_only=False),
            "deepcopy of a deepcopy": copy.deepcopy(copy.deepcopy(gm))}


@pytest.mark.parametrize("cls", [_Blocks, _Branching])
def test_copies_and_frozen_models_leave_their_blocks(cls, tmp_path, modes_reset):
    model = cls().train()
    gm = orthofx.transform(model, "lorth", example_inputs=(_x(),))
    if cls is _Branching:
        assert isinstance(gm, orthofx.capture.ModalGraphModule)
    reference = _modes_after_failing_call(model, _OUTER["bf16 autocast"])
    models = {**_copies(gm, tmp_path), "frozen": orthofx.freeze(gm), "eval": copy.deepcopy(gm).eval()}
    for name, candidate in models.items():
        assert _modes_after_failing_call(candidate, _OUTER["bf16 autocast"]) == reference, name
        torch.testing.assert_close(candidate.eval()(_x()), model.eval()(_x()), msg=name)
        model.train()
    assert _nesting() == 0 and _bf16_step_follows_the_weights()


def test_outputs_and_training_after_failed_calls_match_the_model(modes_reset):
    """Failed batches between training steps: the transformed model follows the model's own trajectory."""
    torch.manual_seed(0)
    model = _Blocks().train()
    gm = orthofx.transform(copy.deepcopy(model), "lorth", example_inputs=(_x(),))
    for candidate in (model, gm):
        optimizer = torch.optim.SGD(candidate.parameters(), lr=0.1)
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                with pytest.raises(RuntimeError):
                    candidate(_x(channels=5))
                loss = candidate(_x()).float().square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for p, q in zip(model.parameters(), gm.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0)


def test_transformed_model_inside_another_keeps_the_outer_blocks(modes_reset):
    """A transformed model called inside another transformed model's block: each call leaves only its own."""
    inner = orthofx.transform(_Blocks().eval(), "lorth", example_inputs=(_x(),))

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            with torch.no_grad():
                return self.inner(x)

    outer = Outer().eval()
    plain_inner = Outer().eval()
    plain_inner.inner = orthofx.freeze(inner)  # a transformed part cannot be transformed again with its terms
    for model in (outer, plain_inner, orthofx.transform(plain_inner, "lorth", example_inputs=(_x(),))):
        before = _modes()
        with pytest.raises(RuntimeError):
            model(_x(channels=5))
        assert _modes() == before


def test_no_warning_about_hooks_when_transforming_a_transformed_model():
    """orthofx's own hooks on the graph are not the user's: no hook warning, and the inner graph is traced through."""
    inner = orthofx.transform(_Blocks().eval(), "lorth", example_inputs=(_x(),))
    assert len(inner._forward_pre_hooks) == 1 and len(inner._forward_hooks) == 2

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * 2

    def call_hook_warnings(warnings):
        return [w for w in warnings if "forward/backward hook" in w or "because forward/backward hooks" in w]

    gm, info = orthofx.capture.capture(Outer(), mode="fx")
    assert not call_hook_warnings(info.warnings)
    assert not [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "inner"]  # traced through
    assert not call_hook_warnings(orthofx.capture.capture(inner, mode="fx")[1].warnings)
    hooked = nn.Linear(2, 2)
    hooked.register_forward_hook(lambda *a: None)
    assert orthofx.passes.base.call_hook_count(hooked) == 1  # the user's hooks are still counted


def test_failed_call_in_another_thread_leaves_this_thread_alone(modes_reset):
    gm = orthofx.transform(_Blocks().eval(), "lorth", example_inputs=(_x(),))
    errors, seen = [], []

    def failing():
        try:
            gm(_x(channels=5))
        except RuntimeError as exc:
            errors.append(exc)
        seen.append(_modes())

    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = _modes()
        thread = threading.Thread(target=failing)
        thread.start()
        thread.join()
        assert _modes() == before
    assert len(errors) == 1 and seen == [(0, False, torch.bfloat16, True, True)]


def test_graph_without_blocks_gets_no_hooks():
    gm = orthofx.transform(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), "lorth")
    assert not gm._forward_pre_hooks and not gm._forward_hooks


def test_compiled_model_has_no_graph_break_and_matches(modes_reset):
    torch._dynamo.reset()
    gm = orthofx.transform(_Blocks().eval(), "lorth", example_inputs=(_x(),))
    explained = torch._dynamo.explain(gm)(_x())
    assert explained.graph_break_count == 0
    compiled = torch.compile(gm, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(_x()), gm(_x()))
    assert _modes() == (0, False, torch.bfloat16, True, True)
    torch._dynamo.reset()


# ------------------------------------------------------------------ review of the first version (session 42)


class _SwitchOff(nn.Module):
    """Turns gradients off as a function call: the mode stays off after the forward, in the model too."""

    def __init__(self):
        super().__init__()
        self.fc, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc(x)
        torch.set_grad_enabled(False)
        return self.fc2(h)


class _BlockThenSwitchOn(_SwitchOff):
    """A no_grad block, then gradients on as a function call (left on after the forward)."""

    def forward(self, x):
        with torch.no_grad():
            h = self.fc(x)
        torch.set_grad_enabled(True)
        return self.fc2(h)


@pytest.mark.parametrize("cls,grad_before", [(_SwitchOff, True), (_BlockThenSwitchOn, False)])
def test_successful_call_keeps_the_switches_the_forward_leaves_on_purpose(cls, grad_before, modes_reset):
    x = torch.randn(4, 8)
    left = []
    for model in (cls().eval(), orthofx.transform(cls().eval(), "lorth", example_inputs=(x,))):
        torch._C._set_grad_enabled(grad_before)
        for _ in range(3):
            model(x)
        left.append(torch.is_grad_enabled())
    assert left[0] == (not grad_before) and left[1] == left[0]
    assert not orthofx.capture._OPEN_BLOCKS.blocks and not orthofx.capture._OPEN_BLOCKS.marks


def test_calls_without_the_hooks_note_nothing(modes_reset):
    """gm.forward called directly (no hooks) and unbalanced forwards leave no notes behind in the thread."""
    gm = orthofx.transform(_Blocks().eval(), "lorth", example_inputs=(_x(),))
    switch = orthofx.transform(_SwitchOff().eval(), "lorth", example_inputs=(torch.randn(4, 8),))
    for _ in range(20):
        with pytest.raises(RuntimeError):
            gm.forward(_x(channels=5))
        reset_modes()
        switch(torch.randn(4, 8))
        switch.forward(torch.randn(4, 8))
        gm(_x())
    assert not orthofx.capture._OPEN_BLOCKS.blocks and not orthofx.capture._OPEN_BLOCKS.marks


def test_pickles_do_not_name_the_private_hooks_and_loads_get_them(tmp_path, modes_reset):
    for cls in (_Blocks, _Branching):
        gm = orthofx.transform(cls().train(), "lorth", example_inputs=(_x(),))
        data = pickle.dumps(gm)
        for name in (b"_mark_open_blocks", b"_forget_blocks_left_open", b"_close_blocks_left_open",
                     b"close_blocks_on_error"):
            assert name not in data
        assert len(gm._forward_pre_hooks) == 1 and len(gm._forward_hooks) == 2  # the model keeps its own
        loaded = pickle.loads(data)
        assert len(loaded._forward_pre_hooks) == 1 and len(loaded._forward_hooks) == 2
        assert _modes_after_failing_call(loaded, _OUTER["bf16 autocast"]) == _modes_after_failing_call(
            cls().train(), _OUTER["bf16 autocast"])


def test_frozen_part_of_a_bigger_model_has_one_set_of_hooks(modes_reset):
    gm = orthofx.transform(_Blocks().eval(), "lorth", example_inputs=(_x(),))
    frozen = orthofx.freeze(nn.Sequential(gm, nn.Linear(3, 3)).eval(), (_x(),))
    for model in (frozen[0], orthofx.freeze(frozen, (_x(),))[0]):
        assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 2
        assert len(model._forward_hooks_always_called) == 1
    assert len(gm._forward_pre_hooks) == 1 and len(gm._forward_hooks) == 2
    reference = _modes_after_failing_call(nn.Sequential(_Blocks(), nn.Linear(3, 3)).eval(), _OUTER["bf16 autocast"])
    assert _modes_after_failing_call(frozen, _OUTER["bf16 autocast"]) == reference


# ------------------------------------------------------------------ second review (session 42)


def test_failed_torch_export_leaves_no_note_that_a_later_call_would_act_on(modes_reset):
    """Non-strict torch.export runs no always_call hook when it fails: nothing may be noted while it traces, or
    the next call (inside the user's autocast block) would exit a stale context and switch autocast off."""
    gm = orthofx.transform(_Blocks().eval(), "lorth", example_inputs=(_x(),))
    with pytest.raises(Exception):
        torch.export.export(nn.Sequential(gm), (_x(channels=5),))
    reset_modes()  # the failed trace left the graph's block open (torch runs no always_call hook while exporting;
    # orthofx.export puts the modes back itself)
    assert not orthofx.capture._OPEN_BLOCKS.blocks and not orthofx.capture._OPEN_BLOCKS.marks
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = _modes()
        gm(_x())
        assert _modes() == before
    assert _nesting() == 0 and _bf16_step_follows_the_weights()


def test_a_call_made_by_a_pre_hook_keeps_the_outer_call_guarded(modes_reset):
    """A user's forward pre-hook that calls the same model once: the outer call, failing, still closes its
    blocks (the inner call takes off its own mark only), as the model's with statements do."""
    def outcome(model):
        calls = []

        def calls_once(module, args):
            if not calls:
                calls.append(1)
                module(_x())

        handle = model.register_forward_pre_hook(calls_once)
        try:
            return _modes_after_failing_call(model, _OUTER["bf16 autocast"])
        finally:
            handle.remove()

    reference = outcome(_Blocks().eval())
    assert reference[0] == reference[1]
    assert outcome(orthofx.transform(_Blocks().eval(), "lorth", example_inputs=(_x(),))) == reference
