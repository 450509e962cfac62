"""Capture mode export on leaves whose calls are written in different forms (positionally, by keyword, with
different keywords): torch.export keeps one call signature per module, orthofx gives it every call in one form
and puts each call back in the graph as the forward wrote it, so hooks see the call as written and run once per
call. References: the same layer run eagerly by the model's own forward, the untransformed model, fx mode."""

import copy
import warnings

import pytest
import torch
from torch import nn

import orthofx
from orthofx.capture import capture
from orthofx.errors import CaptureError


def _form(args: tuple, kwargs: dict) -> tuple:
    return len(args), tuple(kwargs)


class _BothWays(nn.Module):
    """A hooked conv called once positionally and once by keyword; ``calls`` records the form each hook saw."""

    def __init__(self, hook: str | None = "forward"):
        super().__init__()
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.calls = []
        if hook == "forward":
            self.c.register_forward_hook(
                lambda m, a, k, o: (self.calls.append(_form(a, k)), o * 0.5)[1], with_kwargs=True)
        elif hook == "pre_kwargs":
            self.c.register_forward_pre_hook(
                lambda m, a, k: (self.calls.append(_form(a, k)),
                                 (tuple(t * 2 for t in a), {n: v * 2 for n, v in k.items()}))[1], with_kwargs=True)

    def forward(self, x):
        return _both_ways(self.c, x)


def _both_ways(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """_BothWays's forward on ``layer`` (the untransformed model's, or the layer a pass put in its place)."""
    return layer(input=torch.tanh(layer(x))).mean((2, 3))


_WRITTEN = [(1, ()), (0, ("input",))]


def _policy(preset: str, mode: str) -> dict:
    policy = orthofx.Policy.preset(preset).to_dict()
    policy["capture"] = {"mode": mode}
    return policy


def _transform(model: nn.Module, policy: dict, x: torch.Tensor) -> torch.fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # capture's notes on hooked layers
        return orthofx.transform(model, policy, example_inputs=(x,))


def _grads(out: torch.Tensor, params: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(out.square().sum(), params)


@pytest.mark.parametrize("preset", ["lorth", "orthogonal", "isometric", "convnorm"])
def test_export_hooked_layer_called_both_ways_every_preset(preset):
    torch.manual_seed(0)
    model = _BothWays()
    x = torch.randn(2, 4, 8, 8)
    gm = _transform(model, _policy(preset, "export"), x)
    manifest = orthofx.manifest_of(gm)
    assert "c" in {c.site for c in manifest.changes} | {p.site for p in manifest.penalties}
    layer = gm.get_submodule("c")
    gm.eval()
    model.calls.clear()
    out = gm(x)
    assert model.calls == _WRITTEN  # the hook ran once per call and saw it as written
    model.calls.clear()
    ref = _both_ways(layer, x)
    assert model.calls == _WRITTEN
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    params = [p for p in layer.parameters() if p.requires_grad]
    for g, g_ref in zip(_grads(gm(x), params), _grads(_both_ways(layer, x), params)):
        torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-6)
    gm.train()  # the training-mode graph makes the calls as written too
    model.calls.clear()
    out = gm(x)
    assert model.calls == _WRITTEN
    torch.testing.assert_close(out, _both_ways(layer, x), rtol=0, atol=1e-6)
    gm.eval()
    if preset in ("orthogonal", "convnorm"):  # replacements made from the weights (isometric draws new ones)
        torch.manual_seed(0)
        gm_fx = _transform(_BothWays(), _policy(preset, "fx"), x).eval()
        with torch.no_grad():  # fx mode's transform of the same model computes the same
            torch.testing.assert_close(gm(x), gm_fx(x), rtol=0, atol=1e-6)
    if preset == "lorth":  # a penalty only: the forward and its gradients are the untransformed model's
        model.eval()
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
        own = list(model.c.parameters())
        for g, g_ref in zip(_grads(gm(x), params), _grads(model(x), own)):
            torch.testing.assert_close(g, g_ref, rtol=0, atol=0)


def test_export_with_kwargs_pre_hook_called_both_ways():
    torch.manual_seed(0)
    model = _BothWays("pre_kwargs")
    x = torch.randn(2, 4, 8, 8)
    gm = _transform(model, _policy("lorth", "export"), x)
    model.calls.clear()
    out = gm(x)
    assert model.calls == _WRITTEN
    model.calls.clear()
    ref = model(x)
    assert model.calls == _WRITTEN
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    calls = [(n.args, n.kwargs) for n in gm.graph.nodes if n.op == "call_module" and n.target == "c"]
    assert [_form(a, k) for a, k in calls] == _WRITTEN


class _Block(nn.Module):
    """A hooked Sequential block (a jacobian-preset site) called both ways, then a head."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Tanh())
        self.head = nn.Linear(4, 3)
        self.calls = []
        self.block.register_forward_hook(
            lambda m, a, k, o: (self.calls.append(_form(a, k)), o * 0.5)[1], with_kwargs=True)

    def forward(self, x):
        return self.head(self.block(input=self.block(x)).mean((2, 3)))


def test_export_hooked_block_called_both_ways_jacobian():
    torch.manual_seed(0)
    model = _Block()
    x = torch.randn(2, 4, 8, 8)
    gm = _transform(model, _policy("jacobian", "export"), x)
    assert "block" in {p.site for p in orthofx.manifest_of(gm).penalties}
    gm.eval()
    model.eval()
    model.calls.clear()
    out = gm(x)
    assert model.calls == _WRITTEN
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    params = list(gm.parameters())
    own = [dict(model.named_parameters())[name] for name, _ in gm.named_parameters()]
    for g, g_ref in zip(_grads(gm(x), params), _grads(model(x), own)):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["export", "auto"])
@pytest.mark.parametrize("hook", ["forward", None])
def test_capture_layer_called_both_ways_modes(mode, hook):
    torch.manual_seed(0)
    model = _BothWays(hook)
    x = torch.randn(2, 4, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm, info = capture(model, mode=mode, example_inputs=(x,))
    assert info.mode == ("export" if mode == "export" else "fx")
    model.calls.clear()
    out = gm(x)
    assert model.calls == (_WRITTEN if hook else [])
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    forms = [_form(n.args, n.kwargs) for n in gm.graph.nodes if n.op == "call_module"]
    # hooks see the call as written; an unhooked layer's calls are made positional (fx mode's form too)
    assert forms == (_WRITTEN if hook else [(1, ()), (1, ())])


class _Attention(nn.Module):
    """A hooked attention layer called positionally, then by keyword with a keyword the first call left out."""

    def __init__(self):
        super().__init__()
        self.a = nn.MultiheadAttention(8, 2, batch_first=True)
        self.calls = []
        self.a.register_forward_hook(lambda m, a, k, o: self.calls.append(_form(a, k)), with_kwargs=True)

    def forward(self, x):
        y = self.a(x, x, x)[0]
        return self.a(query=torch.tanh(y), key=x, value=x, need_weights=False)[0].mean(1)


def test_export_hooked_attention_called_with_other_keywords():
    torch.manual_seed(0)
    model = _Attention()
    x = torch.randn(2, 5, 8)
    gm, info = capture(model, mode="export", example_inputs=(x,))
    assert info.mode == "export"
    written = [(3, ()), (0, ("query", "key", "value", "need_weights"))]
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert [n.target for n in calls] == ["a", "a"] and [_form(n.args, n.kwargs) for n in calls] == written
    assert calls[1].kwargs["need_weights"] is False  # the keyword's value, not the default
    model.calls.clear()
    out = gm(x)
    assert model.calls == written
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    params = list(model.a.parameters())
    for g, g_ref in zip(_grads(gm(x), params), _grads(model(x), params)):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=0)


class _Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, scale=1.0, shift=0.0):
        return self.lin(x) * scale + shift


class _Gated(nn.Module):
    """A hooked leaf of the caller's class called by keyword twice, with different keyword names."""

    def __init__(self):
        super().__init__()
        self.g = _Gate()
        self.calls = []
        self.g.register_forward_hook(
            lambda m, a, k, o: (self.calls.append(_form(a, k) + (tuple(k.values())[1:],)), o)[1], with_kwargs=True)

    def forward(self, x):
        return self.g(x=self.g(x=x, scale=2.0), shift=0.5)


def test_export_hooked_leaf_called_with_different_keyword_names():
    torch.manual_seed(0)
    model = _Gated()
    x = torch.randn(3, 4)
    gm, _ = capture(model, mode="export", example_inputs=(x,), leaf_types=(_Gate,))
    written = [(0, ("x", "scale"), (2.0,)), (0, ("x", "shift"), (0.5,))]
    assert [_form(n.args, n.kwargs) + (tuple(n.kwargs.values())[1:],)
            for n in gm.graph.nodes if n.op == "call_module"] == written
    model.calls.clear()
    out = gm(x)
    assert model.calls == written
    torch.testing.assert_close(out, (model.g.lin(model.g.lin(x) * 2.0) + 0.5), rtol=0, atol=0)


class _Aliased(nn.Module):
    """A hooked conv registered under two names, called by both, both ways."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.first = self.c
        self.calls = []
        self.c.register_forward_hook(
            lambda m, a, k, o: (self.calls.append(_form(a, k)), o * 0.5)[1], with_kwargs=True)

    def forward(self, x):
        return self.first(input=self.c(x) + self.c(input=x)).mean((2, 3))


def test_export_aliased_hooked_layer_called_both_ways():
    torch.manual_seed(0)
    model = _Aliased()
    x = torch.randn(2, 4, 8, 8)
    gm = _transform(model, _policy("lorth", "export"), x)
    written = [(1, ()), (0, ("input",)), (0, ("input",))]
    model.calls.clear()
    out = gm(x)
    assert model.calls == written
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)


class _OutputSize(nn.Module):
    """A transposed conv called once with output_size and once without: no one call signature can hold both."""

    def __init__(self):
        super().__init__()
        self.t = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1)

    def forward(self, x):
        y = self.t(input=x, output_size=[16, 16])
        return self.t(input=y[..., :8, :8]).mean((2, 3))


def test_export_calls_of_different_structure_say_why():
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(CaptureError) as caught:
        capture(_OutputSize(), mode="export", example_inputs=(x,))
    message = str(caught.value)
    assert caught.value.module_path == "t"
    for part in ("'t' (ConvTranspose2d)", "t(input=..., output_size=...)", "t(input=...)", "keyword",
                 "capture: {mode: fx}", "{mode: auto}"):
        assert part in message, message
    assert "branch on a tensor" not in message
    # what the message advises: fx mode captures it, and computes the model's output
    gm, info = capture(_OutputSize(), mode="auto", example_inputs=(x,))
    assert info.mode == "fx"


def test_export_calls_fill_no_default_torch_export_cannot_take():
    """A default that is not a constant torch.export takes as an argument (a dtype here: "Only Tensors or scalars
    are supported as pytree flattened inputs") is not filled in; the call is only made positional."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, dtype=torch.float32):
            return self.lin(x).to(dtype) * 3

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = Scaled()
            self.s.register_forward_hook(lambda m, a, o: o + 1)

        def forward(self, x):
            return self.s(x=self.s(x))

    model = Model()
    x = torch.randn(3, 4)
    gm, _ = capture(copy.deepcopy(model), mode="export", example_inputs=(x,), leaf_types=(Scaled,))
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    assert [_form(n.args, n.kwargs) for n in gm.graph.nodes if n.op == "call_module"] == [(1, ()), (0, ("x",))]


class _CountsRows(nn.Module):
    """A leaf returning its batch size as a Python int: torch.export's dynamic-batch attempt fails after the calls
    before it ran, and the static one captures the model."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        y = self.fc(x)
        return y, y.shape[0]


class _Retried(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.block = _CountsRows()
        self.calls = []
        self.fc.register_forward_hook(lambda m, a, k, o: self.calls.append(_form(a, k)), with_kwargs=True)

    def forward(self, x):
        y, rows = self.block(self.fc(x))
        return self.fc(input=y) / rows


def test_export_call_forms_come_from_the_attempt_that_captured():
    """The calls the failed dynamic-batch attempt made before failing are not counted: the second call of ``fc``
    is made by keyword (counting them, it took the form of the first call of the static attempt)."""
    torch.manual_seed(0)
    model = _Retried()
    x = torch.randn(4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm, info = capture(model, mode="export", example_inputs=(x,), leaf_types=(_CountsRows,))
    assert any("batch size 4" in warning for warning in info.warnings)  # the static attempt captured it
    model.calls.clear()
    out = gm(x)
    assert model.calls == [(1, ()), (0, ("input",))]
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, both=False):
        y = self.lin(x)
        return (y, y * 2) if both else y


class _Pairs(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = _Pair()

    def forward(self, x):
        a, b = self.p(x, both=True)
        return self.p(a + b)


def test_export_calls_returning_different_structures_say_why():
    x = torch.randn(3, 4)
    with pytest.raises(CaptureError) as caught:
        capture(_Pairs(), mode="export", example_inputs=(x,), leaf_types=(_Pair,))
    message = str(caught.value)
    assert caught.value.module_path == "p"
    for part in ("'p' (_Pair) return results of different structures", "p(<1 positional>, both=...)",
                 "capture: {mode: fx}"):
        assert part in message, message
    gm, info = capture(_Pairs(), mode="auto", example_inputs=(x,), leaf_types=(_Pair,))
    assert info.mode == "fx"
