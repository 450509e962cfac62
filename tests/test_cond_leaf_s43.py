"""Export capture of a model whose ``torch.cond`` branch calls a leaf layer (a lambda, a nested def, the modules
themselves as branches, a Conv2d): the capture succeeds, as a plain torch.export does; the call inside the branch
stays as ATen ops in export's nested graph (no site, a capture warning naming the layer and torch.cond), the
layer's calls outside the branch are sites; outputs and gradients equal the untransformed model's for inputs
taking each branch; freeze and the .pt2 export keep both branches. Before, torch.export's and capture's own
forward hooks on the leaves mutated Python state inside the branch, which TorchDynamo refuses ("HOP: Unsafe side
effect"), and the capture failed with a CaptureError."""

import copy
import io
import os
import pickle
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthofx
from orthofx.errors import CaptureError
from tests.test_capture_export import CondNet


class LambdaBranches(nn.Module):
    """``a`` called in both lambda branches and once outside; ``b`` only outside."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda z: self.a(z), lambda z: -self.a(z), (x,)) + self.b(x) + self.a(x)


class DefBranches(nn.Module):
    """Nested defs as branches; ``a`` is called only inside them."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        def t(z):
            return self.a(z)

        def f(z):
            return self.a(z) * -1.0

        return torch.cond(x.sum() > 0, t, f, (x,)) + self.b(x)


class ModuleBranches(nn.Module):
    """The branches are the modules themselves: a Conv2d and a Sequential (Conv2d, ReLU)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        y = torch.cond(x.sum() > 0, self.a, self.b, (x,))
        return self.fc(y.mean((2, 3)))


class ConvInBranch(nn.Module):
    """A Conv2d called in one branch and once more outside the cond."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.stem = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = torch.cond(x.sum() > 0, lambda z: torch.relu(self.conv(z)), lambda z: z * 2.0, (self.stem(x),))
        return self.conv(y)


# model class, input shape, leaves called in a branch, leaves called outside it (sites), call_module count per site
CASES = {
    "lambda": (LambdaBranches, (3, 4), ["a"], {"a": 1, "b": 1}),
    "def": (DefBranches, (3, 4), ["a"], {"b": 1}),
    "modules": (ModuleBranches, (2, 3, 6, 6), ["a", "b.0"], {"fc": 1}),
    "conv": (ConvInBranch, (2, 3, 6, 6), ["conv"], {"conv": 1, "stem": 1}),
}

POLICY_RULES = [{"apply": "orth_regularizer", "match": {"type": ["Linear", "Conv2d"]}}]


def _policy(mode: str = "export") -> dict:
    return {"orthofx": 1, "capture": {"mode": mode}, "rules": POLICY_RULES}


def _branch_inputs(model: nn.Module, shape: tuple) -> list[torch.Tensor]:
    """One input taking the true branch and one taking the false branch (the predicate is ``x.sum() > 0`` on the
    cond's input; for ConvInBranch on the stem's output, found by trying)."""
    gen = torch.Generator().manual_seed(1)
    base = torch.rand(shape, generator=gen) + 0.1
    found = {}
    for x in (base, -base, base * 3.0, -base * 3.0):
        with torch.no_grad():
            probe = model.stem(x) if isinstance(model, ConvInBranch) else x
        found.setdefault(bool(probe.sum() > 0), x)
    assert set(found) == {True, False}, "inputs for both branches"
    return [found[True], found[False]]


def _fresh(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = CASES[name][0]()
    if isinstance(model, ConvInBranch):
        with torch.no_grad():  # a stem whose output's sign follows the input's
            model.stem.weight.copy_(torch.eye(3).reshape(3, 3, 1, 1))
            model.stem.bias.zero_()
    return model


@pytest.mark.parametrize("mode", ["export", "auto"])
@pytest.mark.parametrize("name", list(CASES))
def test_outputs_warning_and_sites(name, mode):
    model = _fresh(name)
    reference = copy.deepcopy(model)  # the untransformed model, parameters of its own
    shape, in_branch, sites = CASES[name][1:]
    x_true, x_false = _branch_inputs(reference, shape)
    gm = orthofx.transform(model, _policy(mode), example_inputs=(x_true,))
    info = orthofx.manifest_of(gm).capture
    assert info.mode == "export"
    for x in (x_true, x_false):
        torch.testing.assert_close(gm(x), reference(x), rtol=1e-6, atol=1e-6)
    # the capture warning names each leaf called in a branch, and torch.cond
    for leaf in in_branch:
        named = [w for w in info.warnings if f"leaf module '{leaf}'" in w]
        assert len(named) == 1, info.warnings
        assert "torch.cond branch" in named[0] and "rules do not see it" in named[0]
    assert not [w for w in info.warnings if "leaf module" in w and not any(f"'{p}'" in w for p in in_branch)]
    # the calls outside the branch are call_module nodes (sites), those inside are not
    calls = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and not str(node.target).startswith("_orthofx_export_"):
            calls[node.target] = calls.get(node.target, 0) + 1
    assert calls == sites
    plan = orthofx.explain(_fresh(name), _policy(mode), example_inputs=(x_true,))
    assert sorted(site.name for site in plan.sites if site.kind == "module") == sorted(sites)
    assert any("torch.cond branch" in w and f"'{in_branch[0]}'" in w for w in plan.capture.warnings)
    assert "torch.cond branch" in str(plan)


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_match_the_model(name):
    model = _fresh(name)
    reference = copy.deepcopy(model)
    shape = CASES[name][1]
    inputs = _branch_inputs(reference, shape)
    gm = orthofx.transform(model, _policy(), example_inputs=(inputs[0],))
    ours = dict(gm.named_parameters())
    for x in inputs:
        gm.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        gm(xa).pow(2).sum().backward()
        reference(xb).pow(2).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad)
        for pname, param in reference.named_parameters():
            if param.grad is None:  # a layer of the branch not taken
                assert ours[pname].grad is None or not ours[pname].grad.any()
            else:
                assert ours[pname] is not param
                torch.testing.assert_close(ours[pname].grad, param.grad)


def test_branch_layer_gradient_against_dense_math():
    """The in-branch Linear's weight gradient against the closed form, float64: out = s * (x W^T + b) + ...,
    loss = sum(out): dL/dW = s * 1^T x summed over rows (s = +1 true branch, -1 false), plus the outside call's."""
    model = DefBranches().double()
    gm = orthofx.transform(model, _policy(), example_inputs=(torch.ones(3, 4, dtype=torch.float64),))
    for sign in (1.0, -1.0):
        x = sign * (torch.rand(3, 4, dtype=torch.float64) + 0.1)
        gm.zero_grad(set_to_none=True)
        gm(x).sum().backward()
        expected = sign * torch.ones(4, 1, dtype=torch.float64) @ x.sum(0, keepdim=True)
        torch.testing.assert_close(dict(gm.named_parameters())["a.weight"].grad, expected)
        torch.testing.assert_close(dict(gm.named_parameters())["a.bias"].grad,
                                   torch.full((4,), 3.0 * sign, dtype=torch.float64))


@pytest.mark.parametrize("name", ["lambda", "modules"])
def test_freeze_and_pt2_keep_both_branches(name, tmp_path):
    model = _fresh(name)
    reference = copy.deepcopy(model).eval()
    shape = CASES[name][1]
    inputs = _branch_inputs(reference, shape)
    gm = orthofx.transform(model, _policy(), example_inputs=(inputs[0],)).eval()
    frozen = orthofx.freeze(gm, (inputs[0],))
    path = os.path.join(tmp_path, "m.pt2")
    orthofx.export(gm, path, (inputs[0],))
    loaded = torch.export.load(path).module()
    with torch.no_grad():
        for x in inputs:
            torch.testing.assert_close(frozen(x), reference(x), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(loaded(x), reference(x), rtol=1e-6, atol=1e-6)


def test_hooked_leaf_in_branch_is_refused():
    """The leaves' hooks are taken off while torch.export runs (the graph's call of the module runs them): a hooked
    leaf called in a branch would lose its hook there, so capture refuses it with the reason."""
    model = LambdaBranches()
    model.a.register_forward_hook(lambda module, args, out: out * 2.0)
    with pytest.raises(CaptureError, match=r"'a' \(Linear\) made inside a torch.cond branch.*hooks"):
        orthofx.transform(model, _policy(), example_inputs=(torch.randn(3, 4),))
    assert len(model.a._forward_hooks) == 1  # the user's hook is back


class _HookedActivation(torch.nn.Module):
    """A weightless leaf (ReLU) with the user's hook, called in the true branch only (a review found its hook
    dropped silently there: nothing of it reaches the branch's graph to warn about)."""

    def __init__(self, pre: bool):
        super().__init__()
        self.a, self.act = torch.nn.Linear(4, 4), torch.nn.ReLU()
        if pre:
            self.act.register_forward_pre_hook(lambda module, args: (args[0] * 3.0,))
        else:
            self.act.register_forward_hook(lambda module, args, out: out * 10.0)

    def forward(self, x):
        return self.a(torch.cond(x.sum() > 0, lambda z: self.act(z), lambda z: -z, (x,)))


@pytest.mark.parametrize("pre", [False, True])
def test_hooked_weightless_leaf_in_branch_is_refused(pre):
    model = _HookedActivation(pre)
    with pytest.raises(CaptureError, match=r"'act' \(ReLU\) made inside a torch.cond branch.*hooks"):
        orthofx.transform(model, _policy("export"), example_inputs=(torch.rand(3, 4) + 0.1,))
    hooks = model.act._forward_pre_hooks if pre else model.act._forward_hooks
    assert len(hooks) == 1  # the user's hook is back
    x = torch.rand(3, 4) + 0.1  # the model itself still runs its hook
    expected = model.a(F.relu(x * 3.0) if pre else F.relu(x) * 10.0)
    torch.testing.assert_close(model(x), expected)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.act = torch.nn.Linear(4, 4), torch.nn.Tanh()

    def forward(self, x):
        return self.act(self.lin(x))


class _InnerCalledInBranch(torch.nn.Module):
    """A hooked module inside a leaf (``capture.leaf_modules: [_Block]``) called by a branch."""

    def __init__(self, inner: str):
        super().__init__()
        self.blk, self.inner = _Block(), inner
        getattr(self.blk, inner).register_forward_hook(lambda module, args, out: out * 10.0)

    def forward(self, x):
        return self.blk(x) + torch.cond(x.sum() > 0, lambda z: getattr(self.blk, self.inner)(z), lambda z: -z, (x,))


@pytest.mark.parametrize("inner, kind", [("lin", "Linear"), ("act", "Tanh")])
def test_hooked_module_inside_a_leaf_called_in_branch_is_refused(inner, kind):
    """A review found the retry with the hooks inside the leaves on tracing the user's hook into the branch once,
    at capture (the graph kept multiplying by 10 after the hook was removed)."""
    model = _InnerCalledInBranch(inner)
    policy = {"capture": {"mode": "export", "leaf_modules": ["_Block"]},
              "rules": [{"apply": "orth_regularizer", "match": {"type": "Linear"}}]}
    with pytest.raises(CaptureError, match=rf"'blk.{inner}' \({kind}\) made inside a torch.cond branch.*hooks"):
        orthofx.transform(model, policy, example_inputs=(torch.rand(3, 4) + 0.1,))
    assert len(getattr(model.blk, inner)._forward_hooks) == 1


class _ReadsWeightInBranch(torch.nn.Module):
    """A branch that reads a hooked leaf's weight without calling the leaf (``F.linear`` on ``a.weight``)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.a.register_forward_hook(lambda module, args, out: out * 2.0)

    def forward(self, x):
        y = torch.cond(x.sum() > 0, lambda z: F.linear(z, self.a.weight.t()), lambda z: -z, (x,))
        return self.a(y)


def test_weights_read_in_a_branch_are_not_a_call_of_the_hooked_leaf():
    torch.manual_seed(0)
    model = _ReadsWeightInBranch()
    reference = copy.deepcopy(model)
    x = torch.rand(3, 4) + 0.1
    gm = orthofx.transform(model, _policy("export"), example_inputs=(x,))
    for inputs in (x, -x):
        torch.testing.assert_close(gm(inputs), reference(inputs), rtol=1e-6, atol=1e-6)
    warned = [w for w in orthofx.manifest_of(gm).capture.warnings if "leaf module 'a'" in w]
    assert len(warned) == 1 and "or its weights are read there" in warned[0]


def test_signature_patch_is_undone_when_captures_of_two_threads_overlap():
    """Thread A enters, thread B enters, A leaves, B leaves: torch's own function is back (each restoring what it
    found left the other thread's patch in place)."""
    from torch._export import wrappers

    from orthofx.capture import _signatures_outside_branches

    original = wrappers._wrap_submodule
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    patched_inside = []

    def first():
        with _signatures_outside_branches():
            patched_inside.append(wrappers._wrap_submodule is not original)
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def second():
        a_in.wait(10)
        with _signatures_outside_branches():
            b_in.set()
            a_out.wait(10)
            patched_inside.append(wrappers._wrap_submodule is not original)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert patched_inside == [True, True]
    assert wrappers._wrap_submodule is original


def test_transform_replacing_the_layer_still_runs_both_branches():
    """orthogonal_conv replaces the Conv2d called in the branch and outside it: the capture and the transformed
    model run for both branches (the branch's call computes with the module's weights, as the warning says)."""
    model = _fresh("conv")
    x_true, x_false = _branch_inputs(copy.deepcopy(model), CASES["conv"][1])
    gm = orthofx.transform(model, "orthogonal", example_inputs=(x_true,))
    for x in (x_true, x_false):
        out = gm(x)
        assert out.shape == x.shape and torch.isfinite(out).all()
    assert any("'conv'" in w and "torch.cond" in w for w in orthofx.manifest_of(gm).capture.warnings)


def test_pickle_of_cond_graph():
    model = _fresh("def")
    reference = copy.deepcopy(model)
    x_true, x_false = _branch_inputs(reference, CASES["def"][1])
    gm = orthofx.transform(model, _policy(), example_inputs=(x_true,))
    copy_ = pickle.loads(pickle.dumps(gm))
    for x in (x_true, x_false):
        torch.testing.assert_close(copy_(x), reference(x))


# ----------------------------------------------------------- copies (pickle, torch.save, deepcopy) of cond graphs

PlainCond = CondNet  # a cond without layer calls in its branches


class ModalCond(nn.Module):
    """A forward that branches on ``self.training`` (a graph per mode: ModalGraphModule) around a cond whose
    branch calls a layer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        x = x * 0.5 if self.training else x * 2.0
        return torch.cond(x.sum() > 0, lambda z: self.a(z), lambda z: z.tanh(), (x,)) + self.b(x)


def _copy_model(name: str) -> tuple[nn.Module, tuple]:
    """A fresh model of ``name`` (a key of CASES, ``plain`` or ``modal``) and its input shape."""
    if name == "plain":
        torch.manual_seed(0)
        return PlainCond(), (2, 3, 6, 6)
    if name == "modal":
        torch.manual_seed(0)
        return ModalCond(), (3, 4)
    return _fresh(name), CASES[name][1]


def _two_branches(model: nn.Module, shape: tuple) -> list[torch.Tensor]:
    """An input taking each branch of ``model``'s cond, found with hooks-free probes of the untransformed model."""
    if isinstance(model, PlainCond):
        gen = torch.Generator().manual_seed(2)
        found = {}
        for scale in (1.0, -1.0, 3.0, -3.0, 10.0, -10.0):
            x = scale * (torch.rand(shape, generator=gen) + 0.1)
            with torch.no_grad():
                found.setdefault(bool(model.conv(x).mean() > 0), x)
        assert set(found) == {True, False}, "inputs for both branches"
        return [found[True], found[False]]
    return _branch_inputs(model, shape)


def _copies(gm: nn.Module) -> dict[str, nn.Module]:
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    return {"pickle": pickle.loads(pickle.dumps(gm)),
            "torch.save": torch.load(buffer, weights_only=False),
            "deepcopy": copy.deepcopy(gm),
            "pickle of a pickle": pickle.loads(pickle.dumps(pickle.loads(pickle.dumps(gm))))}


def _cond_calls(graph: torch.fx.Graph) -> int:
    """The calls of the cond op in ``graph``: the op itself, or the call of an orthofx helper naming it."""
    count = 0
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.higher_order.cond or (node.args and node.args[0] == "cond"
                                                           and getattr(node.target, "__module__", "") == "orthofx"
                                                           ".capture"):
            count += 1
    return count


def _graphs(gm: nn.Module) -> list[torch.fx.Graph]:
    if isinstance(gm, orthofx.capture.ModalGraphModule):
        return [gm.graph_for(True), gm.graph_for(False)]
    return [gm.graph]


def _same_outputs_and_gradients(got: nn.Module, want: nn.Module, inputs: list[torch.Tensor], label: str) -> None:
    mine = dict(got.named_parameters())
    for x in inputs:
        got.zero_grad(set_to_none=True)
        want.zero_grad(set_to_none=True)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_a, out_b = got(xa), want(xb)
        torch.testing.assert_close(out_a, out_b, rtol=1e-6, atol=1e-6, msg=lambda m: f"{label}: {m}")
        out_a.pow(2).sum().backward()
        out_b.pow(2).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=1e-6, msg=lambda m: f"{label}: {m}")
        for pname, param in want.named_parameters():
            assert mine[pname] is not param
            if param.grad is None:  # a layer of the branch not taken
                assert mine[pname].grad is None or not mine[pname].grad.any(), label
            else:
                torch.testing.assert_close(mine[pname].grad, param.grad, rtol=1e-6, atol=1e-6,
                                           msg=lambda m: f"{label} {pname}: {m}")


COPY_CASES = [("def", "export"), ("lambda", "export"), ("modules", "export"), ("conv", "export"),
              ("plain", "export"), ("modal", "export"), ("lambda", "auto"), ("plain", "auto"), ("modal", "auto")]


@pytest.mark.parametrize("name,mode", COPY_CASES)
def test_copies_of_a_cond_graph_run_both_branches(name, mode, tmp_path):
    """pickle, torch.save + torch.load, deepcopy and a pickle of a pickle of the transformed model: outputs and
    gradients equal the untransformed model's for inputs taking each branch, in train and eval mode; the copy's
    graph still calls the cond (not one branch baked in) and exports to .pt2. Before, pickling failed
    (torch.fx re-traced the branches with torch.export's tracer class, and the cond op refused traced values)."""
    model, shape = _copy_model(name)
    reference = copy.deepcopy(model)  # the untransformed model, parameters of its own
    inputs = _two_branches(reference, shape)
    gm = orthofx.transform(model, _policy(mode), example_inputs=(inputs[0],))
    assert orthofx.manifest_of(gm).capture.mode == "export"
    assert isinstance(gm, orthofx.capture.ModalGraphModule) == (name == "modal")
    calls = [_cond_calls(graph) for graph in _graphs(gm)]
    assert all(count == 1 for count in calls), calls
    for label, copied in _copies(gm).items():
        assert isinstance(copied, orthofx.capture.ModalGraphModule) == isinstance(gm, orthofx.capture.ModalGraphModule)
        assert [_cond_calls(graph) for graph in _graphs(copied)] == calls, label
        for training in (True, False):
            copied.train(training)
            reference.train(training)
            _same_outputs_and_gradients(copied, reference, inputs, f"{label} {'train' if training else 'eval'}")
        path = os.path.join(tmp_path, f"{label.replace(' ', '_')}.pt2")
        orthofx.export(copied, path, (inputs[0],))
        loaded = torch.export.load(path).module()
        with torch.no_grad():
            for x in inputs:
                torch.testing.assert_close(loaded(x), reference(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["def", "plain", "modal"])
def test_frozen_cond_model_pickles(name):
    model, shape = _copy_model(name)
    reference = copy.deepcopy(model).eval()
    inputs = _two_branches(reference, shape)
    gm = orthofx.transform(model, _policy(), example_inputs=(inputs[0],)).eval()
    frozen = orthofx.freeze(gm, (inputs[0],))
    assert [_cond_calls(graph) for graph in _graphs(frozen)] == [1]
    for label, copied in _copies(frozen).items():
        assert [_cond_calls(graph) for graph in _graphs(copied)] == [1], label
        with torch.no_grad():
            for x in inputs:
                torch.testing.assert_close(copied(x), reference(x), rtol=1e-6, atol=1e-6,
                                           msg=lambda m: f"{label}: {m}")


def test_copy_of_the_copy_keeps_the_branch_graphs_own_tensors():
    """The unpickled model has parameters of its own (training the copy leaves the original alone), and the
    branch graphs hold no tensor of the original."""
    model, shape = _copy_model("def")
    inputs = _two_branches(model, shape)
    gm = orthofx.transform(model, _policy(), example_inputs=(inputs[0],))
    copied = pickle.loads(pickle.dumps(gm))
    with torch.no_grad():
        for param in copied.parameters():
            param.add_(1.0)
    original = {id(t) for t in list(gm.parameters()) + list(gm.buffers())}
    assert not any(id(t) in original for t in list(copied.parameters()) + list(copied.buffers()))
    assert not torch.allclose(copied(inputs[0]), gm(inputs[0]))


class NestedCond(nn.Module):
    """A cond inside a cond's branch (export's nested graph holds nested graphs of its own)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        def outer_true(z):
            return torch.cond(z.mean() > 1.0, lambda w: w * 3.0, lambda w: w - 1.0, (z,)) + 1.0

        return self.b(torch.cond(x.sum() > 0, outer_true, lambda z: -z, (self.a(x),)))


class WhileLoop(nn.Module):
    """Another higher-order op with nested graphs: ``while_loop``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        from torch._higher_order_ops.while_loop import while_loop

        _, z = while_loop(lambda i, z: i < 3, lambda i, z: (i + 1, z * 0.5 + 1.0), (torch.tensor(0), self.a(x)))
        return z


@pytest.mark.parametrize("cls", [NestedCond, WhileLoop])
def test_copies_of_nested_graphs_of_other_forms(cls, tmp_path):
    torch.manual_seed(0)
    model = cls()
    if cls is NestedCond:  # ``a`` near the identity: the inner predicate follows the input's mean
        with torch.no_grad():
            model.a.weight.copy_(torch.eye(4) + 0.01 * model.a.weight)
    reference = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.rand(3, 4, generator=gen) + 0.1, -(torch.rand(3, 4, generator=gen) + 0.1),
              torch.rand(3, 4, generator=gen) + 20.0]
    if cls is NestedCond:  # the three paths: outer true / inner true, outer true / inner false, outer false
        with torch.no_grad():
            inner = [bool(reference.a(x).mean() > 1.0) for x in inputs if x.sum() > 0]
        assert sorted(inner) == [False, True] and any(x.sum() <= 0 for x in inputs)
    gm = orthofx.transform(model, _policy(), example_inputs=(inputs[0],))
    for label, copied in _copies(gm).items():
        _same_outputs_and_gradients(copied, reference, inputs, label)
        path = os.path.join(tmp_path, f"{label.replace(' ', '_')}.pt2")
        orthofx.export(copied, path, (inputs[0],))
        with torch.no_grad():
            for x in inputs:
                torch.testing.assert_close(torch.export.load(path).module()(x), reference(x), rtol=1e-6, atol=1e-6)
