"""Capture: module paths of shared modules resolved without walking every path, and a leaf called both with its own
parameters and through torch.func.functional_call in export mode."""

import copy
import random
import time
import warnings

import pytest
import torch
from torch import nn

import orthofx
from orthofx import capture as capture_module
from orthofx.capture import _ModulePaths, capture, first_module_paths

#: 2^25 paths: code walking every path takes hours, code linear in the model's edges milliseconds. A bound far
#: from both, so that a loaded CI machine cannot fail a linear walk (not a timing test).
HANG_SECONDS = 20.0


def _all_paths(model: nn.Module) -> dict[str, nn.Module]:
    """Brute force: every attribute path of every module (a path never revisits a module on it) -> the module."""
    found = {}

    def walk(module, path, on_path):
        found[path] = module
        for name, child in module._modules.items():
            if child is not None and id(child) not in on_path:
                walk(child, f"{path}.{name}" if path else name, on_path | {id(child)})

    walk(model, "", {id(model)})
    return found


def _random_shared_model(seed: int) -> nn.Module:
    """Containers wired as a random DAG (children shared by parents at different depths), Linear leaves."""
    rng = random.Random(seed)
    count = rng.randint(3, 7)
    modules = [nn.Module() for _ in range(count)] + [nn.Linear(2, 2) for _ in range(rng.randint(1, 3))]
    for i in range(count):
        later = list(range(i + 1, len(modules)))
        for k in range(rng.randint(1, 3)):
            modules[i].add_module(f"c{k}", modules[rng.choice(later)])
    return modules[0]


@pytest.mark.parametrize("seed", range(40))
def test_canonical_path_of_every_path_is_the_named_modules_name(seed):
    model = _random_shared_model(seed)
    first = {id(module): name for name, module in model.named_modules()}
    paths = _all_paths(model)
    resolver = _ModulePaths(model)
    for path, module in paths.items():
        assert resolver.canonical(path) == first[id(module)], path
        for name, _ in module.named_parameters(recurse=False):
            full = f"{path}.{name}" if path else name
            assert resolver.canonical(full) == f"{first[id(module)]}.{name}".lstrip(".")
    # the map of other paths is still every path below an alias, as before
    assert first_module_paths(model) == {p: first[id(m)] for p, m in paths.items() if p and p != first[id(m)]}
    # the resolver holds one entry at most per (module, child name) edge
    assert len(resolver.edges) <= sum(len(m._modules) for m in model.modules())


def test_chained_aliases_resolve_through_both():
    # y.z is x.inner, and inside it w is u.v: y.z.w.lin goes through two aliases at different depths
    model = nn.Module()
    model.u = nn.Module()
    model.u.v = nn.Module()
    model.u.v.lin = nn.Linear(2, 2)
    model.x = nn.Module()
    model.x.inner = nn.Module()
    model.x.inner.w = model.u.v
    model.y = nn.Module()
    model.y.z = model.x.inner
    assert _ModulePaths(model).canonical("y.z.w.lin.weight") == "u.v.lin.weight"


class _Level(nn.Module):
    """Holds its child under two names; calls it by ``use``."""

    def __init__(self, child, use="a"):
        super().__init__()
        self.a = child
        self.b = child
        self.use = use

    def forward(self, x):
        return getattr(self, self.use)(x)


def _deep(depth, use="a"):
    model = nn.Linear(4, 4)
    for _ in range(depth):
        model = _Level(model, use)
    return model


def test_paths_of_a_module_shared_at_every_level_resolve_in_linear_time():
    model = _deep(25)  # 2^25 paths to the Linear
    start = time.perf_counter()
    resolver = _ModulePaths(model)
    assert resolver.canonical(".".join("ab" * 12 + "b") + ".weight") == ".".join("a" * 25) + ".weight"
    assert time.perf_counter() - start < HANG_SECONDS
    assert len(resolver.edges) == 25
    assert first_module_paths(model, limit=1000) is None


def test_fx_capture_of_a_deeply_shared_model_is_fast():
    model, x = _deep(25), torch.randn(2, 4)
    start = time.perf_counter()
    gm, _ = capture(model, mode="fx", example_inputs=(x,))
    assert time.perf_counter() - start < HANG_SECONDS
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("use", ["a", "b"])
def test_export_of_a_deeply_shared_model_gives_torch_export_only_the_names_used(monkeypatch, use):
    # Before: every one of the Linear's 2^depth - 1 other names was given to preserve_module_call_signature, each
    # adding hooks (and tracepoints) to every call: 3.3 s at depth 8, 19 s at depth 10, 113 s at depth 12
    model, x = _deep(6, use), torch.randn(2, 4)
    given = []
    run_export = capture_module._run_export

    def spy(source, inputs, preserved, *args, **kwargs):
        given.append(list(preserved))
        return run_export(source, inputs, preserved, *args, **kwargs)

    monkeypatch.setattr(capture_module, "_run_export", spy)
    monkeypatch.setattr(capture_module, "_ALIAS_PATHS_WALKED", 16)  # the depth-6 model has 126 paths
    gm, info = capture(model, mode="export", example_inputs=(x,))
    assert max(len(names) for names in given) <= 2
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == [".".join("a" * 6)]
    assert info.warnings == []
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_transform_of_a_deeply_shared_model_is_fast():
    model, x = _deep(25), torch.randn(2, 4)
    start = time.perf_counter()
    orthofx.transform(model, "lorth", example_inputs=(x,))
    assert time.perf_counter() - start < HANG_SECONDS


# ------------------------------------------------------------------------- a leaf also called via functional_call


class _AlsoFunctional(nn.Module):
    """``lin`` called with its own parameters, then through functional_call with ``other``'s (doubled)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.other = nn.Linear(4, 4)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        fast = {"weight": self.other.weight * 2, "bias": self.other.bias}
        return torch.func.functional_call(self.lin, fast, (h,)) + h


def _policy(preset, mode):
    return orthofx.Policy.from_dict({**orthofx.Policy.preset(preset).to_dict(), "capture": {"mode": mode}})


def test_export_keeps_the_own_call_and_inlines_the_functional_call():
    # Before: refused as a whole ("parameters other than its own"), though only the second call is substituted
    torch.manual_seed(0)
    model, x = _AlsoFunctional(), torch.randn(3, 4)
    gm, info = capture(model, mode="export", example_inputs=(x,))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["lin"]
    assert any("'lin@1'" in w and "functional_call" in w for w in info.warnings)
    for train in (False, True):
        gm.train(train)
        model.train(train)
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("preset", ["lorth", "orthogonal"])
def test_export_transform_with_a_functional_call_computes_as_written_while_training(preset):
    # fx mode cannot trace functional_call: the reference is the forward's formula on the graph's current weights,
    # tanh(lin(x)) then F.linear(h, 2 W_other, b_other) + h, in float64
    torch.manual_seed(0)
    model, x, y = _AlsoFunctional(), torch.randn(5, 4), torch.randn(5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = orthofx.transform(copy.deepcopy(model), _policy(preset, "export"), example_inputs=(x,))
    if preset == "lorth":
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=1e-6)
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        ((gm(x) - y).square().mean() + orthofx.penalty(gm)).backward()
        opt.step()
        with torch.no_grad():
            h = torch.tanh(gm.lin(x)).double()
            expected = torch.nn.functional.linear(h, 2 * gm.other.weight.double(), gm.other.bias.double()) + h
            torch.testing.assert_close(gm(x).double(), expected, rtol=0, atol=1e-5)
    assert not torch.equal(gm.other.weight, model.other.weight)  # the steps reached the substituted weights


class _FunctionalFirst(nn.Module):
    """``lin`` first through functional_call with only its weight substituted (its own bias), then as itself."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.other = nn.Linear(4, 4)

    def forward(self, x):
        h = torch.func.functional_call(self.lin, {"weight": self.other.weight * 2}, (x,))
        return self.lin(torch.tanh(h)) + h


@pytest.mark.parametrize("preset", ["lorth", "orthogonal"])
def test_export_inlines_a_first_functional_call_that_keeps_the_module_bias(preset):
    torch.manual_seed(0)
    model, x = _FunctionalFirst(), torch.randn(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = orthofx.transform(copy.deepcopy(model), _policy(preset, "export"), example_inputs=(x,))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["lin"]
    with torch.no_grad():
        h = torch.nn.functional.linear(x.double(), 2 * gm.other.weight.double(), gm.lin.bias.double())
        expected = gm.lin(torch.tanh(h).float()).double() + h
        torch.testing.assert_close(gm(x).double(), expected, rtol=0, atol=1e-5)
        if preset == "lorth":
            torch.testing.assert_close(gm(x), model(x), rtol=0, atol=1e-6)


class _Retied(nn.Module):
    """Assigns ``lin.weight`` another parameter between its two calls (the module keeps it)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.tied = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        h = self.lin(x)
        self.lin.weight = self.tied
        return self.lin(h)


def test_export_refusal_of_rebound_parameters_names_the_call_and_the_rebinding():
    with pytest.raises(orthofx.CaptureError, match="leaf module 'lin' with parameters other than its own") as info:
        capture(_Retied(), mode="export", example_inputs=(torch.randn(3, 4),))
    assert info.value.module_path == "lin"
    assert "'lin@1'" in str(info.value) and "module.weight = other" in str(info.value)
    assert "functional_call" not in str(info.value).split(" Fix: ")[0]
