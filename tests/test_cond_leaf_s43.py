"""Export capture of a model whose ``torch.cond`` branch calls a leaf layer (a lambda, a nested def, the modules
themselves as branches, a Conv2d): the capture succeeds, as a plain torch.export does; the call inside the branch
stays as ATen ops in export's nested graph (no site, a capture warning naming the layer and torch.cond), the
layer's calls outside the branch are sites; outputs and gradients equal the untransformed model's for inputs
taking each branch; freeze and the .pt2 export keep both branches. Before, torch.export's and capture's own
forward hooks on the leaves mutated Python state inside the branch, which TorchDynamo refuses ("HOP: Unsafe side
effect"), and the capture failed with a CaptureError."""

import copy
import os
import pickle

import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import CaptureError


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
        assert "torch.cond branch" in named[0] and "rules do not see this call" in named[0]
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


@pytest.mark.xfail(strict=True, reason="pickling an export-captured graph holding a torch.cond fails (torch.fx "
                   "re-traces the branch subgraphs with torch.export's _ModuleStackTracer, and the top-level "
                   "re-trace calls the cond HOP on proxies); pre-existing, also for a cond without leaf calls")
def test_pickle_of_cond_graph():
    model = _fresh("def")
    reference = copy.deepcopy(model)
    x_true, x_false = _branch_inputs(reference, CASES["def"][1])
    gm = orthofx.transform(model, _policy(), example_inputs=(x_true,))
    copy_ = pickle.loads(pickle.dumps(gm))
    for x in (x_true, x_false):
        torch.testing.assert_close(copy_(x), reference(x))
