"""Capture mode export on a layer inside a leaf block that the forward also calls on its own (``self.block.lin(x)``
beside ``self.block(x)``), the layer without hooks. Symbolic tracing makes that call a ``call_module`` node of the
layer; torch.export inlined it as ATen ops on the layer's weights, so the plan's site had no node, a pass wrapping
or replacing the layer (ConvNorm, a Jacobian probe, an orthogonal layer) acted on the block's call only, and the
direct call computed the old layer's ops. Reference: fx mode (its sites, call_module targets, outputs, gradients,
penalty and training run), and the untransformed model."""

import warnings

import pytest
import torch
from torch import nn

import orthofx
import orthofx.capture as capture_module
# models shared with the hooked cases
from tests.test_capture_hooks_s40 import _Inner, _ModalBlock, _OnlyInsideBlock, _Outer, _SharesInnerLayer


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


def _policy(rules, leaves: tuple, mode: str) -> dict:
    policy = orthofx.Policy.preset(rules).to_dict() if isinstance(rules, str) else {"rules": rules}
    policy["capture"] = {"mode": mode, "leaf_modules": list(leaves)}
    return policy


def _transform(model: nn.Module, x: torch.Tensor, rules, leaves: tuple, mode: str) -> nn.Module:
    torch.manual_seed(0)  # passes draw random numbers (an orthogonal conv's parametrisation): the same in each mode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # notes on the policy's fit
        return orthofx.transform(model, _policy(rules, leaves, mode), example_inputs=(x,))


def _explain(model: nn.Module, x: torch.Tensor, rules, leaves: tuple, mode: str) -> orthofx.Plan:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return orthofx.explain(model, _policy(rules, leaves, mode), example_inputs=(x,))


def _module_calls(gm: nn.Module) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "call_module"]


def _outputs_and_grads(gm: nn.Module, x: torch.Tensor, training: bool = False) -> tuple:
    gm.train(training)
    inp = x.clone().requires_grad_(True)
    torch.manual_seed(1)  # a Jacobian probe's random vectors
    out = gm(inp)
    loss = out.square().sum() + orthofx.penalty(gm)
    params = dict(gm.named_parameters())
    names = sorted(params)
    grads = torch.autograd.grad(loss, [inp, *(params[n] for n in names)])
    return out.detach(), loss.detach(), dict(zip(["input", *names], grads))


def _assert_same_results(gm: nn.Module, ref: nn.Module, x: torch.Tensor, training: bool = False) -> None:
    out, loss, grads = _outputs_and_grads(gm, x, training)
    out_ref, loss_ref, grads_ref = _outputs_and_grads(ref, x, training)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(loss, loss_ref)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], msg=name)


# ------------------------------------------------------------------------------------------------ models

class _Block(nn.Module):
    def __init__(self, conv: bool = False):
        super().__init__()
        self.lin = nn.Conv2d(4, 4, 3, padding=1) if conv else nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.lin(x)) * 2


class _CallsInnerLayer(nn.Module):
    """The block's layer called by the forward too, before or after the block, by its path in the block or by
    another name it is registered under (``self.other``)."""

    def __init__(self, order: str = "before", name: str = "path", conv: bool = False):
        super().__init__()
        self.block = _Block(conv)
        self.head = nn.Conv2d(4, 4, 1) if conv else nn.Linear(4, 4)
        if name == "alias":
            self.other = self.block.lin
        self.order, self.name = order, name

    def forward(self, x):
        inner = self.other if self.name == "alias" else self.block.lin
        if self.order == "before":
            return self.head(self.block(inner(x)))
        return self.head(inner(input=self.block(x)) + x)


class _SeqBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(4, 4), nn.Tanh())

    def forward(self, x):
        return self.seq(x) * 2


class _CallsLayerInContainer(nn.Module):
    """The layer sits in a Sequential inside the block (no leaf of its own): ``self.block.seq[0](x)``."""

    def __init__(self):
        super().__init__()
        self.block = _SeqBlock()
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        return self.head(self.block(x) + self.block.seq[0](x))


class _CallsInnerLeaf(nn.Module):
    """A leaf block inside a leaf block, called on its own."""

    def __init__(self):
        super().__init__()
        self.outer = _Outer()
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        return self.head(self.outer(x) + self.outer.sub(x))


_CASES = {
    "before": (lambda: _CallsInnerLayer("before"), ("_Block",)),
    "after-keyword": (lambda: _CallsInnerLayer("after"), ("_Block",)),
    "alias": (lambda: _CallsInnerLayer("before", "alias"), ("_Block",)),
    "in-container": (_CallsLayerInContainer, ("_SeqBlock",)),
    "inner-leaf": (_CallsInnerLeaf, ("_Outer", "_Sub")),
    "shared-batchnorm": (_SharesInnerLayer, ("_Inner",)),
}


# ------------------------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("case", sorted(_CASES))
def test_export_sites_and_calls_of_inner_layer_called_on_its_own_match_fx(case):
    """The plan's sites (their graph nodes: None for the inlined call before), the planned passes and the
    graph's module calls are fx mode's; the transformed model computes fx mode's outputs, loss with the
    penalty, and gradients."""
    make, leaves = _CASES[case]
    torch.manual_seed(0)
    model = make()
    x = torch.randn(3, 4)
    plans = {mode: _explain(model, x, "lorth", leaves, mode) for mode in ("fx", "export")}
    sites = {mode: [(s.kind, s.name, s.node) for s in plan.sites] for mode, plan in plans.items()}
    assert sites["export"] == sites["fx"]
    entries = {mode: [(e.site.name, e.pass_name) for e in plan.entries] for mode, plan in plans.items()}
    assert entries["export"] == entries["fx"]
    assert plans["export"].capture.warnings == []  # no call left inlined
    gm = _transform(model, x, "lorth", leaves, "export")
    ref = _transform(model, x, "lorth", leaves, "fx")
    assert _module_calls(gm) == _module_calls(ref)
    # the regulariser leaves the function as it is: the untransformed model's output (before a training-mode
    # forward updates BatchNorm's statistics)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm.eval()(x), model(x))
    for training in (False, True):
        _assert_same_results(gm, ref, x, training)


_CONVNORM = [{"match": {"type": "Conv2d", "name": "block.lin"}, "apply": "convnorm"},
             {"match": {"name": "head"}, "apply": "orth_regularizer", "with": {"weight": 0.1}}]


@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("rules", ["convnorm", "orthogonal"])
def test_export_layer_put_in_place_of_inner_conv_matches_fx_through_training(rules, order):
    """ConvNorm put in place of the block's conv normalised the block's call only: the direct call stayed an
    unnormalised conv on the conv's weight (output 2.1 off fx mode's). An orthogonal conv (circular padding)
    left the direct call a zero-padded conv on the orthogonal kernel: the same output while the kernel is the
    nearest to a 1x1 one, not once training spreads it."""
    torch.manual_seed(0)
    model = _CallsInnerLayer(order, conv=True)
    x = torch.randn(2, 4, 8, 8)
    policy = _CONVNORM if rules == "convnorm" else rules
    gms = {mode: _transform(model, x, policy, ("_Block",), mode) for mode in ("fx", "export")}
    assert type(gms["export"].block.lin) is type(gms["fx"].block.lin)
    for gm in gms.values():
        gm.train()
        opt = torch.optim.SGD(gm.parameters(), lr=0.2)
        for step in range(3):
            opt.zero_grad()
            (gm(x + step).square().mean() + orthofx.penalty(gm)).backward()
            opt.step()
    for training in (False, True):
        _assert_same_results(gms["export"], gms["fx"], x, training)
    assert _module_calls(gms["export"]) == _module_calls(gms["fx"])


def test_export_jacobian_probe_on_inner_layer_sees_its_direct_call():
    """The probe wrapping the layer saw the block's call only: the penalty (the estimate over the calls of the
    last forward) was not fx mode's."""
    torch.manual_seed(0)
    model = _CallsInnerLayer("before")
    x = torch.randn(3, 4)
    rules = [{"match": {"name": "block.lin"}, "apply": "jacobian_isometry", "with": {"weight": 0.1, "probes": 2}}]
    gms = {mode: _transform(model, x, rules, ("_Block",), mode) for mode in ("fx", "export")}
    _assert_same_results(gms["export"], gms["fx"], x, training=True)


@pytest.mark.parametrize("preset", ["orthogonal", "lorth"])
def test_export_layer_put_in_place_of_inner_layer_runs_at_both_calls(preset):
    """After a pass replaces the block's Linear (preset orthogonal: an OrthogonalLinear), both calls run the new
    module, as in fx mode; the direct call read its weight into an inlined ``aten.linear`` before."""
    torch.manual_seed(0)
    model = _CallsInnerLayer("before")
    x = torch.randn(3, 4)
    counts = {}
    for mode in ("fx", "export"):
        gm = _transform(model, x, preset, ("_Block",), mode)
        if preset == "orthogonal":
            assert type(gm.block.lin).__name__ == "OrthogonalLinear"
        seen = []
        handle = gm.block.lin.register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
        gm.eval()
        with torch.no_grad():
            gm(x)
        handle.remove()
        counts[mode] = len(seen)
        # no weight of the layer is read by the graph itself
        assert not [n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith("block.lin.")]
    assert counts["export"] == counts["fx"] == 2


class _CallsModalDirectly(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _ModalBlock()

    def forward(self, x):
        return self.block(self.block.g(x, "b") + self.block.lin(x))


def test_export_inner_leaf_given_a_str_on_its_own_stays_inlined_with_a_warning():
    """torch.export cannot keep a call given a str as a call of the module: without hooks the call stays inlined
    (the capture is not refused, as it is for a leaf called so) and the capture warns that rules do not see it;
    the other direct call (the Linear's) is a call of its own."""
    torch.manual_seed(0)
    model = _CallsModalDirectly()
    x = torch.randn(3, 4)
    leaves = ("_ModalBlock", "_Modal")
    plan = _explain(model, x, "lorth", leaves, "export")
    assert len(plan.capture.warnings) == 1
    assert "'block.g'" in plan.capture.warnings[0] and "mode: fx" in plan.capture.warnings[0]
    gm = _transform(model, x, "lorth", leaves, "export")
    assert _module_calls(gm) == ["block.lin", "block"]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm.eval()(x), model(x), rtol=0, atol=0)


def test_export_hooked_inner_leaf_given_a_str_on_its_own_is_still_refused():
    torch.manual_seed(0)
    model = _CallsModalDirectly()
    model.block.g.register_forward_hook(lambda m, a, o: o * 2)
    with pytest.raises(orthofx.CaptureError, match=r"'block\.g'.*mode: fx") as info:
        _transform(model, torch.randn(3, 4), "lorth", ("_ModalBlock", "_Modal"), "export")
    assert info.value.module_path == "block.g"


def test_export_of_leaf_blocks_without_direct_calls_runs_torch_export_as_often_as_without_leaf_blocks(
        monkeypatch):
    """The direct calls are found while torch.export runs: a model without them is not exported again."""
    runs = []
    original = capture_module._run_export

    def counted(*args, **kwargs):
        runs.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(capture_module, "_run_export", counted)
    x = torch.randn(3, 4)
    counts = {}
    for name, model, leaves in [("plain", _OnlyInsideBlock(), ()), ("blocks", _OnlyInsideBlock(), ("_Block",)),
                                ("direct", _CallsInnerLayer("before"), ("_Block",))]:
        runs.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            capture_module.capture(model, mode="export", example_inputs=(x,), leaf_types=leaves)
        counts[name] = len(runs)
    assert counts["blocks"] == counts["plain"] < counts["direct"]


def test_export_inner_layer_called_on_its_own_in_the_other_mode_only():
    """The graph of the other training mode is exported on its own: its direct call is a call too."""

    class CallsWhenTraining(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = _Block()
            self.head = nn.Linear(4, 4)

        def forward(self, x):
            h = self.block(x)
            if self.training:
                h = self.block.lin(h)
            return self.head(h)

    torch.manual_seed(0)
    x = torch.randn(3, 4)
    for captured_training in (False, True):
        model = CallsWhenTraining().train(captured_training)
        rules = [{"match": {"name": "block.lin"}, "apply": "jacobian_isometry", "with": {"weight": 0.1}}]
        gm = _transform(model, x, rules, ("_Block",), "export")
        ref = _transform(model, x, rules, ("_Block",), "fx")
        for training in (True, False):
            _assert_same_results(gm, ref, x, training)


class _UpdatesStatsOutside(nn.Module):
    """The block's BatchNorm counter updated in place by the forward outside the block: torch.export cannot keep
    the block's call as one call (its update node is used outside it)."""

    def __init__(self):
        super().__init__()
        self.blk = _Inner()
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        h = self.blk(x)
        self.blk.bn.num_batches_tracked.add_(1)
        return self.head(h)


@pytest.mark.parametrize("hooked", [None, "blk", "blk.lin"])
def test_export_leaf_that_cannot_stay_one_call_is_inlined_unless_hooks_are_inside(hooked):
    """The layers inside every leaf are now watched for direct calls; only the hooked ones make an inlined leaf
    call a refusal (the block's BatchNorm, without hooks, is not named)."""
    torch.manual_seed(0)
    model = _UpdatesStatsOutside().train()
    x = torch.randn(3, 4)
    if hooked is None:
        plan = _explain(model, x, "lorth", ("_Inner",), "export")
        assert any("'blk' stays as inlined ATen ops" in w for w in plan.capture.warnings)
        return
    model.get_submodule(hooked).register_forward_hook(lambda m, a, o: o * 2)
    with pytest.raises(orthofx.CaptureError, match="hooks") as info:
        _transform(model, x, "lorth", ("_Inner",), "export")
    assert info.value.module_path == "blk"
    assert "blk.bn" not in str(info.value)
