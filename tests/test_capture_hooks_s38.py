"""Regressions from a review of capture (session 38): layers with hooks called by keyword, and hooks on the
model after a transform.

Capture records ``self.c(input=x)`` as the positional call ``c(x)`` so that a replacement layer (whose forward
names its input ``x``) takes it; for a layer with hooks, it kept the keyword call, and the orthogonal and convnorm
presets failed on it (TransformError: unexpected keyword argument 'input'). The graph now calls such a layer
positionally too, and its hooks are given the call as the forward wrote it.

References: the untransformed model (float64 copy) where the layer is kept (``lorth``), and, where a pass
replaces it, the hooks applied by hand around the replacement's own ``forward`` (which runs no hook)."""

import copy
import io

import pytest
import torch
from torch import nn

import orthofx
from orthofx.capture import capture

pytestmark = pytest.mark.usefixtures("one_thread")

PASSES = {"lorth": "orth_regularizer", "orthogonal": "orthogonal_conv", "convnorm": "convnorm"}
MODES = ("fx", "export")


def _policy(apply: str, mode: str) -> dict:
    return {"capture": {"mode": mode}, "rules": [{"match": {"type": "Conv2d"}, "apply": apply}]}


def _double(module, args, output):
    return output * 2


def _double_keyword_input(module, args, kwargs):
    """Written for ``conv(input=x)``: a positional call has no ``kwargs["input"]`` (KeyError)."""
    return args, {**kwargs, "input": 2 * kwargs["input"]}


def _add_keyword_input_mean(module, args, kwargs, output):
    return output + kwargs["input"].mean()


def _triple_positional(module, args):
    """Scales the positional inputs: the forward's keyword call gives it none, so it changes nothing there."""
    return tuple(3 * a for a in args)


def _scale_by_positional_count(module, args, output):
    return output * (1 + len(args))


HOOKS = {
    "forward": lambda c: c.register_forward_hook(_double),
    "pre_kwargs": lambda c: c.register_forward_pre_hook(_double_keyword_input, with_kwargs=True),
    "forward_kwargs": lambda c: c.register_forward_hook(_add_keyword_input_mean, with_kwargs=True),
    "pre_positional": lambda c: c.register_forward_pre_hook(_triple_positional),
    "forward_positional": lambda c: c.register_forward_hook(_scale_by_positional_count),
}


def _by_hand(layer: nn.Module, hooks: list[str], x: torch.Tensor) -> torch.Tensor:
    """What the hooks do around ``layer.forward`` for the call ``layer(input=x)``, written out: the pre-hooks
    see no positional input and ``kwargs == {"input": x}``; the forward hooks see the input after the pre-hooks."""
    if "pre_kwargs" in hooks:
        x = 2 * x
    y = layer.forward(x)
    if "forward" in hooks:
        y = 2 * y
    if "forward_kwargs" in hooks:
        y = y + x.mean()
    return y  # the positional-only hooks see args == (): no change


class _KeywordCall(nn.Module):
    def __init__(self, hooks: list[str] = ("forward",)):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.handles = [HOOKS[name](self.c) for name in hooks]

    def forward(self, x):
        return self.c(input=x)


def _call_nodes(gm) -> list[tuple[int, list[str]]]:
    return [(len(n.args), list(n.kwargs)) for n in gm.graph.nodes if n.op == "call_module"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("preset", list(PASSES))
def test_a_hooked_layer_called_by_keyword_is_called_positionally_and_its_hook_still_applies(preset, mode):
    """Bug: orthogonal / convnorm raised TransformError ("unexpected keyword argument 'input'") on a conv with a
    forward hook called as ``self.c(input=x)``; lorth kept the layer and worked."""
    torch.manual_seed(0)
    model = _KeywordCall()
    x = torch.randn(2, 3, 8, 8)
    gm = orthofx.transform(model, _policy(PASSES[preset], mode), example_inputs=(x,))
    assert _call_nodes(gm) == [(1, [])]
    out = gm(x)
    assert len(gm.c._forward_hooks) == 1  # moved to the replacement, not doubled
    torch.testing.assert_close(out, _by_hand(gm.c, ["forward"], x), rtol=0, atol=1e-6)
    if preset == "lorth":
        reference = copy.deepcopy(model).double()
        torch.testing.assert_close(out.double(), reference(x.double()), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("preset", ["lorth", "orthogonal"])
def test_hooks_see_the_keyword_call_as_the_forward_wrote_it(preset, mode):
    """Pre-hooks and forward hooks, with and without kwargs, written for ``self.c(input=x)``: a pre-hook with
    kwargs finds and replaces ``kwargs["input"]``, one without sees no positional input, and so do the forward
    hooks (a naive positional call gave KeyError and scaled inputs and outputs the model leaves alone)."""
    torch.manual_seed(0)
    hooks = list(HOOKS)
    model = _KeywordCall(hooks)
    x = torch.randn(2, 3, 8, 8)
    gm = orthofx.transform(model, _policy(PASSES[preset], mode), example_inputs=(x,))
    assert _call_nodes(gm) == [(1, [])]
    out = gm(x)
    torch.testing.assert_close(out, _by_hand(gm.c, hooks, x), rtol=0, atol=1e-6)
    if preset == "lorth":
        reference = copy.deepcopy(model).double()
        torch.testing.assert_close(out.double(), reference(x.double()), rtol=0, atol=1e-5)


class _TwiceByKeyword(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.c(input=torch.tanh(self.c(input=x)))


@pytest.mark.parametrize("mode", MODES)
def test_a_full_backward_hook_sees_no_gradient_of_a_keyword_input_as_in_the_model(mode):
    """torch gives a full backward hook the gradients of the positional inputs only: none for ``c(input=x)``, so
    a hook scaling them changes nothing in the model; the graph's positional call must not change that."""
    seen = []

    def triple_grad_input(module, grad_input, grad_output):
        seen.append(len(grad_input))
        return tuple(None if g is None else 3 * g for g in grad_input)

    torch.manual_seed(0)
    model = _TwiceByKeyword()
    model.c.register_full_backward_hook(triple_grad_input)
    x = torch.randn(2, 3, 8, 8)
    gm = orthofx.transform(model, _policy("orth_regularizer", mode), example_inputs=(x,))
    assert _call_nodes(gm) == [(1, []), (1, [])]
    grads = []
    for module in (model, gm):
        seen.clear()
        xx = x.clone().requires_grad_()
        with pytest.warns(UserWarning, match="Full backward hook") if module is model else _no_warning():
            module(xx).sum().backward()
        grads.append(xx.grad)
        assert seen == [0, 0]
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-6)


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("mode", MODES)
def test_hooks_of_a_layer_called_twice_run_at_each_call_and_their_handle_removes_them_after_transform(mode):
    """``inplace=True``: the user's handle still removes the (wrapped) hook from the replacement."""
    calls = []
    torch.manual_seed(0)
    model = _TwiceByKeyword()
    handle = model.c.register_forward_hook(_double)
    model.c.register_forward_pre_hook(lambda module, args: calls.append(len(args)))
    x = torch.randn(2, 3, 8, 8)
    gm = orthofx.transform(model, _policy("orthogonal_conv", mode), example_inputs=(x,), inplace=True)
    calls.clear()
    out = gm(x)
    assert calls == [0, 0]  # twice per forward, each seeing the keyword call's empty args
    conv = gm.c.forward
    torch.testing.assert_close(out, 2 * conv(torch.tanh(2 * conv(x))), rtol=0, atol=1e-6)
    handle.remove()
    assert len(gm.c._forward_hooks) == 0
    torch.testing.assert_close(gm(x), conv(torch.tanh(conv(x))), rtol=0, atol=1e-6)


def test_transform_and_explain_leave_the_models_hooks_as_they_are():
    torch.manual_seed(0)
    model = _KeywordCall(["pre_kwargs", "forward"])
    before = {name: dict(getattr(model.c, name)) for name in ("_forward_pre_hooks", "_forward_hooks")}
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    orthofx.explain(model, "orthogonal", example_inputs=(x,))
    orthofx.transform(model, "orthogonal", example_inputs=(x,))
    assert {name: dict(getattr(model.c, name)) for name in before} == before
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_capture_wraps_the_hooks_once_and_the_models_own_keyword_calls_reach_them_unchanged():
    """capture shares the model's modules: the wrapped hooks take the model's own call ``c(input=x)`` as it is,
    and a second capture does not wrap them again."""
    torch.manual_seed(0)
    model = _KeywordCall(["pre_kwargs", "forward_kwargs"])
    x = torch.randn(2, 3, 8, 8)
    expected = _by_hand(model.c, ["pre_kwargs", "forward_kwargs"], x)
    for _ in range(2):
        gm, info = capture(model, mode="fx")
        assert info.warnings == []
        torch.testing.assert_close(gm(x), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)
    wrapped = list(model.c._forward_pre_hooks.values())[0]
    assert getattr(wrapped, "hook", None) is _double_keyword_input


@pytest.mark.parametrize("mode", MODES)
def test_a_hooked_layer_called_positionally_and_by_keyword_is_captured_with_a_warning(mode):
    """Export mode raised CaptureError ("in_spec mismatch") for a hooked leaf called both ways; in both modes the
    graph cannot tell the hooks which call was which, and says so."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 3, 3, padding=1)
            self.c.register_forward_hook(_double)

        def forward(self, x):
            return self.c(torch.tanh(self.c(input=x)))

    torch.manual_seed(0)
    model = Mixed()
    x = torch.randn(2, 3, 8, 8)
    gm = orthofx.transform(model, _policy("orthogonal_conv", mode), example_inputs=(x,))
    assert _call_nodes(gm) == [(1, []), (1, [])]
    warnings = orthofx.manifest_of(gm).capture.warnings
    assert any("'c' (Conv2d" in w and "c(input=x)" in w for w in warnings), warnings
    conv = gm.c.forward
    torch.testing.assert_close(gm(x), 2 * conv(torch.tanh(2 * conv(x))), rtol=0, atol=1e-6)


def _module_level_double(module, args, output):  # picklable
    return output * 2


@pytest.mark.parametrize("mode", MODES)
def test_a_block_with_a_keyword_pre_hook_copies_pickles_and_freezes_with_its_hooks(mode):
    """A Sequential block (``forward(self, input)``) with a kwargs pre-hook, called by keyword; its layers are
    sites. The copy, the unpickled module and the frozen module run the hooks as the transformed one."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.blk = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1))
            self.blk.register_forward_pre_hook(_double_keyword_input, with_kwargs=True)
            self.blk.register_forward_hook(_module_level_double)

        def forward(self, x):
            return self.blk(input=x)

    torch.manual_seed(0)
    model = Block()
    x = torch.randn(2, 3, 8, 8)
    reference = copy.deepcopy(model).double()
    gm = orthofx.transform(model, _policy("orth_regularizer", mode), example_inputs=(x,))
    expected = reference(x.double())
    torch.testing.assert_close(gm(x).double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(copy.deepcopy(gm)(x).double(), expected, rtol=0, atol=1e-5)
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False)(x).double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(orthofx.freeze(gm)(x).double(), expected, rtol=0, atol=1e-5)


def test_torch_weight_norm_hook_is_not_wrapped_and_is_still_found():
    """torch's own hook objects read no input and are found by type (remove_weight_norm, orthofx's derived-weight
    check): they stay as registered."""
    torch.manual_seed(0)
    model = _KeywordCall(["forward"])
    with pytest.warns(FutureWarning):
        torch.nn.utils.weight_norm(model.c)
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    gm = orthofx.transform(model, "orthogonal", example_inputs=(x,))
    row = next(r for r in orthofx.report(gm).rows if r["site"] == "c")
    assert type(gm.c) is nn.Conv2d and "computed weight" in row["pass"], row["pass"]  # regularised, not replaced
    torch.testing.assert_close(gm(x), expected, rtol=0, atol=1e-6)
    torch.nn.utils.remove_weight_norm(gm.c)
