"""Capture mode export on a hooked module inside a leaf block that the forward also calls on its own
(``self.block.lin(x)`` beside ``self.block(x)``): torch.export inlined that call, the hooks run once at capture
and their ops baked into the graph, so the transformed model ran the hooks one time fewer per forward than the
model (and a hook removed later still acted). Reference: the untransformed model (its outputs, gradients and the
calls its hooks saw, in order), and fx mode, which makes such a call a leaf call of its own."""

import warnings

import pytest
import torch
from torch import nn

import orthofx


def _transform(model: nn.Module, x: torch.Tensor, leaves: tuple, mode: str = "export") -> nn.Module:
    policy = orthofx.Policy.preset("lorth").to_dict()
    policy["capture"] = {"mode": mode, "leaf_modules": list(leaves)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # capture's notes on hooked layers
        return orthofx.transform(model, policy, example_inputs=(x,))


def _same_as_model(gm: nn.Module, model: nn.Module, x: torch.Tensor, calls: list, training: bool = False) -> None:
    """``gm`` computes ``model``'s output and gradients (input and parameters), and its hooks see the same calls in
    the same order. In training mode each runs from the same buffers (BatchNorm's running statistics)."""
    model.train(training)
    gm.train(training)
    names = [name for name, _ in model.named_parameters()]
    assert names and set(names) <= dict(gm.named_parameters()).keys()
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    results = []
    for run in (model, gm):
        for name, b in run.named_buffers():
            if name in buffers:
                b.copy_(buffers[name])
        calls.clear()
        inp = x.clone().requires_grad_(True)
        out = run(inp)
        params = dict(run.named_parameters())
        grads = torch.autograd.grad(out.square().sum(), [inp, *(params[name] for name in names)])
        results.append((out, grads, list(calls)))
    (out_ref, grads_ref, calls_ref), (out, grads, seen) = results
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=0)
    assert seen == calls_ref
    assert calls_ref  # the hooks ran at all


def _form(args: tuple, kwargs: dict) -> tuple:
    return len(args), tuple(kwargs)


def _hook(module: nn.Module, kind: str, calls: list, label: str = "lin") -> None:
    """Register a hook of ``kind`` on ``module`` that records its calls and changes what it acts on."""
    if kind == "forward":
        module.register_forward_hook(lambda m, a, o: (calls.append(label), o * 0.5 + 0.1)[1])
    elif kind == "pre":
        module.register_forward_pre_hook(
            lambda m, a: (calls.append("pre " + label), (a[0] * 2,) + a[1:] if a else None)[1])
    elif kind == "forward_kwargs":
        module.register_forward_hook(lambda m, a, k, o: (calls.append((label, _form(a, k))), o - 1)[1],
                                     with_kwargs=True)
    elif kind == "pre_kwargs":
        module.register_forward_pre_hook(
            lambda m, a, k: (calls.append(("pre " + label, _form(a, k))),
                             (tuple(t + 1 for t in a), {n: v + 1 for n, v in k.items()}))[1], with_kwargs=True)
    elif kind == "backward":
        module.register_full_backward_hook(lambda m, gi, go: calls.append("backward " + label))
    else:
        raise ValueError(kind)


class _Block(nn.Module):
    def __init__(self, lin: nn.Module | None = None):
        super().__init__()
        self.lin = nn.Linear(4, 4) if lin is None else lin

    def forward(self, x):
        return torch.relu(self.lin(x)) * 2


class _CallsInnerLayer(nn.Module):
    """The leaf block's layer called by the forward too, before or after the block, by its path in the block or
    by another name it is registered under (``self.other``)."""

    def __init__(self, order: str, name: str):
        super().__init__()
        self.block = _Block()
        self.head = nn.Linear(4, 4)
        if name == "alias":
            self.other = self.block.lin
        self.order, self.name = order, name

    def forward(self, x):
        inner = self.other if self.name == "alias" else self.block.lin
        if self.order == "before":
            return self.head(self.block(inner(x)))
        return self.head(inner(input=self.block(x)))


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the layer called by keyword: no inputs
@pytest.mark.parametrize("name", ["path", "alias"])
@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("kind", ["forward", "pre", "forward_kwargs", "pre_kwargs", "backward"])
def test_export_inner_layer_called_on_its_own_runs_its_hooks_as_the_model(kind, order, name):
    torch.manual_seed(0)
    model = _CallsInnerLayer(order, name)
    calls = []
    _hook(model.block.lin, kind, calls)
    x = torch.randn(3, 4)
    gm = _transform(model, x, ("_Block",))
    _same_as_model(gm, model, x, calls)
    # the call on its own is a call of the layer, as in fx mode; the block's call of it is the block's
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets.count("block.lin") == 1 and targets.count("block") == 1
    _same_as_model(_transform(model, x, ("_Block",), "fx"), model, x, calls)


def test_export_hooks_removed_after_transform_stop_acting():
    """Baked into the graph as ops, the hook went on doubling the output after its removal."""
    torch.manual_seed(0)
    model = _CallsInnerLayer("before", "path")
    handle = model.block.lin.register_forward_hook(lambda m, a, o: o * 2)
    x = torch.randn(3, 4)
    gm = _transform(model, x, ("_Block",))
    handle.remove()
    layer = gm.get_submodule("block.lin")
    for hook in list(layer._forward_hooks):
        del layer._forward_hooks[hook]
    model.eval()
    gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


class _Sequenced(nn.Module):
    """Hooked block, hooked inner layer (called on its own positionally, by the block, then by keyword) and head;
    a hooked BatchNorm held by the block and called by the forward only, whose statistics one call updates once."""

    def __init__(self):
        super().__init__()
        self.block = _Block()
        self.block.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        h = self.block.lin(x)
        h = self.block.bn(self.block(h))
        return self.head(self.block.lin(input=h))


@pytest.mark.parametrize("training", [False, True])
def test_export_hooks_of_block_inner_layers_and_head_keep_their_order(training):
    torch.manual_seed(0)
    model = _Sequenced()
    calls = []
    _hook(model.block, "forward", calls, "block")
    _hook(model.block.lin, "pre_kwargs", calls)
    _hook(model.block.lin, "forward_kwargs", calls)
    _hook(model.block.bn, "forward", calls, "bn")
    _hook(model.head, "forward", calls, "head")
    x = torch.randn(3, 4)
    gm = _transform(model, x, ("_Block",))
    _same_as_model(gm, model, x, calls, training)
    tracked = gm.get_submodule("block.bn").num_batches_tracked
    before = int(tracked)
    gm.train()(x)
    assert int(tracked) == before + 1


class _Sub(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x).sigmoid()


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.sub = _Sub()

    def forward(self, x):
        return self.sub(x) * 3


class _CallsInnerLeaf(nn.Module):
    """A leaf inside a leaf called on its own; the hooked layer is inside that inner leaf (no hook of its own)."""

    def __init__(self):
        super().__init__()
        self.outer = _Outer()
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        return self.head(self.outer(x) + self.outer.sub(x))


def test_export_leaf_inside_a_leaf_called_on_its_own_runs_the_hooks_below_it():
    torch.manual_seed(0)
    model = _CallsInnerLeaf()
    calls = []
    _hook(model.outer.sub.lin, "pre", calls)
    _hook(model.outer.sub.lin, "forward", calls)
    x = torch.randn(3, 4)
    gm = _transform(model, x, ("_Outer", "_Sub"))
    _same_as_model(gm, model, x, calls)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["outer", "outer.sub", "head"]


class _IdentityBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.idt = nn.Identity()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(self.idt(x))


class _CallsInnerIdentity(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _IdentityBlock()

    def forward(self, x):
        return self.block(x) + self.block.idt(x)


@pytest.mark.parametrize("reads", [False, True])
def test_export_hooked_identity_in_block_called_on_its_own(reads):
    """A hook reading a value (``float(o.sum())``) made torch.export fail; one changing the output of a call that
    returns its input was lost on the direct call."""
    torch.manual_seed(0)
    model = _CallsInnerIdentity()
    calls = []
    if reads:
        model.block.idt.register_forward_hook(lambda m, a, o: calls.append(round(float(o.detach().sum()), 4)))
    else:
        _hook(model.block.idt, "pre", calls, "idt")
        _hook(model.block.idt, "forward", calls, "idt")
    x = torch.randn(3, 4)
    _same_as_model(_transform(model, x, ("_IdentityBlock",)), model, x, calls)


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.lin(x))


class _SharesInnerLayer(nn.Module):
    """The block's BatchNorm registered a second time (``self.bn``) and called by that name too."""

    def __init__(self):
        super().__init__()
        self.blk = _Inner()
        self.bn = self.blk.bn
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        h = self.blk(x)
        return self.head(self.bn(h) + h)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("block_hooked", [False, True])
def test_export_hooked_layer_shared_under_two_names(training, block_hooked):
    """The graph failed to run ("Module [Module] is missing the required forward"), or with the block hooked as
    well the capture was refused."""
    torch.manual_seed(0)
    model = _SharesInnerLayer()
    calls = []
    _hook(model.blk.bn, "forward", calls, "bn")
    if block_hooked:
        _hook(model.blk, "forward", calls, "blk")
    x = torch.randn(3, 4)
    gm = _transform(model.train(training), x, ("_Inner",))
    _same_as_model(gm, model, x, calls, training)


class _Modal(nn.Module):
    def forward(self, x, how="a"):
        return x * 2 if how == "a" else x + 2


class _ModalBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.g = _Modal()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(self.g(x, "b"))


class _CallsModalDirectly(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _ModalBlock()

    def forward(self, x):
        return self.block(self.block.g(x, "b"))


def test_export_hooked_inner_module_given_a_str_on_its_own_is_refused():
    """torch.export cannot keep a str in a call signature: such a call cannot be a call of the module, and
    inlined it ran the hook one time fewer than the model. The error names the module and capture mode fx."""
    torch.manual_seed(0)
    model = _CallsModalDirectly()
    calls = []
    _hook(model.block.g, "forward", calls, "g")
    x = torch.randn(3, 4)
    with pytest.raises(orthofx.CaptureError, match=r"'block\.g'.*mode: fx") as info:
        _transform(model, x, ("_ModalBlock",))
    assert info.value.module_path == "block.g"
    _same_as_model(_transform(model, x, ("_ModalBlock",), "fx"), model, x, calls)


class _OnlyInsideBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _Block()
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        return self.head(self.block(x))


def test_export_hooked_inner_layer_only_called_by_its_block_stays_inside_it():
    torch.manual_seed(0)
    model = _OnlyInsideBlock()
    calls = []
    _hook(model.block.lin, "forward", calls)
    _hook(model.block.lin, "backward", calls)
    x = torch.randn(3, 4)
    gm = _transform(model, x, ("_Block",))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["block", "head"]
    _same_as_model(gm, model, x, calls)


class _CallsInnerLayerWhenTraining(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _Block()
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        h = self.block(x)
        if self.training:
            h = self.block.lin(h)
        return self.head(h)


@pytest.mark.parametrize("captured_training", [False, True])
def test_export_inner_layer_called_on_its_own_in_the_other_mode_only(captured_training):
    """The graph of the other training mode is exported on its own: its direct call is kept as a call too."""
    torch.manual_seed(0)
    model = _CallsInnerLayerWhenTraining().train(captured_training)
    calls = []
    _hook(model.block.lin, "forward", calls)
    x = torch.randn(3, 4)
    gm = _transform(model, x, ("_Block",))
    _same_as_model(gm, model, x, calls, training=True)
    _same_as_model(gm, model, x, calls, training=False)


class _Helper(nn.Module):
    def __init__(self, lin: nn.Module):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x) + 1


class _CallsInnerLayerThroughHelper(nn.Module):
    """The block's layer registered in a second (non-leaf) module too, whose forward calls it."""

    def __init__(self):
        super().__init__()
        self.block = _Block()
        self.helper = _Helper(self.block.lin)
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        return self.head(self.helper(self.block(x)))


def test_export_inner_layer_called_through_a_module_holding_it_under_another_name():
    torch.manual_seed(0)
    model = _CallsInnerLayerThroughHelper()
    calls = []
    _hook(model.block.lin, "pre", calls)
    _hook(model.block.lin, "forward", calls)
    x = torch.randn(3, 4)
    _same_as_model(_transform(model, x, ("_Block",)), model, x, calls)
