"""The other paths of shared modules in plan and transform: the rules' name patterns, block_paths, the leaf entries
and ``inplace=True`` checked against a brute-force enumeration of every attribute path on small random shared
models, and a module shared at every level of a nesting of depth 25 (2^25 paths) transformed in well under a
second. Before, plan.module_aliases and transform._share_replaced_layers listed every path of every shared module:
0.8 s at depth 16, 3.5 s at depth 18, and no end at depth 25."""

from __future__ import annotations

import fnmatch
import random
import time
import warnings

import pytest
import torch
from torch import nn

import orthofx
from orthofx import plan as plan_module
from orthofx.errors import OrthofxWarning
from orthofx.plan import _edge_aliases, block_paths, module_aliases, unused_leaf_entries

#: 2^25 paths: code walking every path takes hours, code linear in the model's edges milliseconds. A bound far
#: from both, so that a loaded CI machine cannot fail a linear walk (not a timing test).
HANG_SECONDS = 20.0

# ------------------------------------------------------------------------------------------- models, reference


class _Node(nn.Module):
    """Holds children under the names given (one child may be held under several); calls each distinct child
    once, in the order of its first name."""

    def __init__(self, children: list[tuple[str, nn.Module]]):
        super().__init__()
        for name, child in children:
            setattr(self, name, child)

    def forward(self, x):
        seen = set()
        for child in self._modules.values():
            if id(child) not in seen:
                seen.add(id(child))
                x = child(x)
        return x


class _Level(nn.Module):
    """Holds its child under two names; calls it by the first."""

    def __init__(self, child):
        super().__init__()
        self.a = child
        self.b = child

    def forward(self, x):
        return self.a(x)


def _deep(depth: int) -> nn.Module:
    model = nn.Linear(4, 4)
    for _ in range(depth):
        model = _Level(model)
    return model


def _random_model(rng: random.Random) -> nn.Module:
    """A few Linear(4, 4) layers and containers, each container holding 1-3 of the modules made before it under
    1-2 names each: a DAG sharing modules at several depths."""
    pool: list[nn.Module] = [nn.Linear(4, 4) for _ in range(rng.randint(1, 3))]
    for _ in range(rng.randint(2, 5)):
        picked = rng.sample(pool, rng.randint(1, min(3, len(pool))))
        names = iter(rng.sample("abcdefgh", 8))
        children = [(next(names), child) for child in picked for _ in range(rng.randint(1, 2))]
        rng.shuffle(children)
        pool.append(_Node(children))
    used = {id(c) for m in pool for c in m.children()}
    # the root holds every module nothing else holds (the last container at least), so that all are called
    return _Node([(f"r{i}", m) for i, m in enumerate(pool) if id(m) not in used])


def _every_path(model: nn.Module) -> dict[str, nn.Module]:
    """Every attribute path of every submodule, by walking each one (2^depth of them under deep sharing)."""
    paths: dict[str, nn.Module] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module._modules.items():
            path = f"{prefix}.{name}" if prefix else name
            paths[path] = child
            walk(child, path)

    walk(model, "")
    return paths


def _paths_by_first(model: nn.Module) -> dict[str, list[str]]:
    """named_modules() name -> every path of that module (the name first)."""
    first = {id(m): name for name, m in model.named_modules()}
    out: dict[str, list[str]] = {name: [name] for name in first.values() if name}
    for path, module in _every_path(model).items():
        if path != first[id(module)]:
            out[first[id(module)]].append(path)
    return out


def _selected_by_every_path(model: nn.Module, names: list[str], exclude: list[str], kind: type) -> set[str]:
    """The named_modules() names of the ``kind`` modules that a rule of these patterns selects when they are
    compared with every path of each module (the reference)."""
    modules = dict(model.named_modules())
    out = set()
    for first, paths in _paths_by_first(model).items():
        if not isinstance(modules[first], kind):
            continue
        if names and not any(fnmatch.fnmatchcase(p, n) for p in paths for n in names):
            continue
        if any(fnmatch.fnmatchcase(p, e) for p in paths for e in exclude):
            continue
        out.add(first)
    return out


def _patterns(rng: random.Random, model: nn.Module, count: int) -> list[str]:
    """Patterns written against random paths (other paths included): the path itself, or one segment a glob."""
    paths = sorted(_every_path(model))
    out = []
    for path in rng.sample(paths, min(count, len(paths))):
        parts = path.split(".")
        if rng.random() < 0.4:
            parts[rng.randrange(len(parts))] = rng.choice(["*", "?"])
        out.append(".".join(parts))
    return out


def _rule_policy(names: list[str], exclude: list[str], *, kind: str | None = None,
                 apply: str = "orth_regularizer") -> dict:
    match: dict = {"name": names} if names else {"type": "Linear"}
    if exclude:
        match["exclude"] = exclude
    if kind:
        match["kind"] = kind
    return {"rules": [{"name": "r", "match": match, "apply": apply, "optional": True}]}


def _planned(model: nn.Module, policy: dict) -> set[str]:
    return {entry.site.name for entry in orthofx.explain(model, policy).entries if entry.rule_name == "r"}


# --------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("seed", range(12))
def test_module_aliases_and_its_bound_agree_with_every_path(seed):
    model = _random_model(random.Random(seed))
    every = {first: tuple(paths[1:]) for first, paths in _paths_by_first(model).items() if len(paths) > 1}
    assert module_aliases(model) == every
    count = sum(map(len, every.values()))
    assert module_aliases(model, count) == every
    if count:
        assert module_aliases(model, count - 1) is None
    # the linear cut: one path per edge, each a path of its module
    paths = _every_path(model)
    modules = dict(model.named_modules())
    for first, others in _edge_aliases(model).items():
        assert all(paths[o] is modules[first] for o in others)


@pytest.mark.parametrize("seed", range(12))
def test_name_patterns_on_other_paths_select_as_on_every_path(seed):
    rng = random.Random(100 + seed)
    model = _random_model(rng)
    for _ in range(3):
        names = _patterns(rng, model, rng.randint(1, 2))
        exclude = _patterns(rng, model, rng.randint(0, 1))
        expected = _selected_by_every_path(model, names, exclude, nn.Linear)
        assert _planned(model, _rule_policy(names, exclude)) == expected, (names, exclude)


@pytest.mark.parametrize("seed", range(8))
def test_block_paths_select_as_on_every_path(seed):
    rng = random.Random(200 + seed)
    model = _random_model(rng)
    names = _patterns(rng, model, 2)
    policy = orthofx.Policy.from_dict(_rule_policy(names, [], kind="block", apply="jacobian_isometry"))
    expected = _selected_by_every_path(model, names, [], nn.Module)
    assert set(block_paths(model, policy)) == expected


@pytest.mark.parametrize("seed", range(8))
def test_past_the_bound_patterns_see_the_names_and_one_other_name_per_edge_with_a_warning(monkeypatch, seed):
    rng = random.Random(300 + seed)
    model = _random_model(rng)
    while sum(len(p) - 1 for p in _paths_by_first(model).values()) < 3:
        model = _random_model(rng)
    monkeypatch.setattr(plan_module, "_alias_paths_listed", lambda model: 2)
    # the reference cut: a module's name, and for each edge (parent, child name) the parent's name + the child's
    # name where that is not the child's own name
    first = {id(m): name for name, m in model.named_modules()}
    cut = {name: [name] for name in first.values() if name}
    for parent_name, parent in model.named_modules():
        for child_name, child in parent._modules.items():
            path = f"{parent_name}.{child_name}" if parent_name else child_name
            if path != first[id(child)]:
                cut[first[id(child)]].append(path)
    names = _patterns(rng, model, 2)
    expected = {f for f, paths in cut.items() if isinstance(model.get_submodule(f), nn.Linear)
                and any(fnmatch.fnmatchcase(p, n) for p in paths for n in names)}
    with pytest.warns(OrthofxWarning, match=r"more than 2 attribute paths besides.*rule\(s\) 'r'.*named_modules"):
        plan = orthofx.explain(model, _rule_policy(names, []))
    assert {e.site.name for e in plan.entries} == expected
    assert any("named_modules() names" in w for w in plan.capture.warnings)


def test_a_model_of_many_modules_and_no_sharing_is_no_case_of_the_bound(monkeypatch):
    # the bound counts other paths, not modules
    monkeypatch.setattr(plan_module, "_alias_paths_listed", lambda model: 2)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(5)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", OrthofxWarning)
        plan = orthofx.explain(model, _rule_policy(["*.0"], []))
    assert {e.site.name for e in plan.entries} == {f"{i}.0" for i in range(5)}


@pytest.mark.parametrize("seed", range(8))
def test_inplace_puts_the_new_layer_at_every_path_of_the_old(seed):
    torch.manual_seed(seed)
    model = _random_model(random.Random(400 + seed))
    before = _every_path(model)
    first = {id(m): name for name, m in model.named_modules()}
    x = torch.randn(3, 4)
    out = orthofx.transform(model, {"rules": [{"match": {"type": "Linear"}, "apply": "orthogonal_conv"}]},
                            inplace=True)
    for path, old in before.items():
        if isinstance(old, nn.Linear):
            new = out.get_submodule(first[id(old)])
            assert new is not old and model.get_submodule(path) is new, path
        else:
            assert model.get_submodule(path) is old
    torch.testing.assert_close(model(x), out(x), rtol=0, atol=0)


def test_inplace_labels_a_shared_layer_with_its_first_path():
    # Before: the path put last, the other name ('other'): the layer's errors named a path the plan never shows
    model = nn.Sequential()
    model.lin = nn.Linear(4, 4)
    model.other = model.lin
    orthofx.transform(model, {"rules": [{"match": {"type": "Linear"}, "apply": "orthogonal_conv"}]}, inplace=True)
    assert model.lin is model.other
    assert model.lin.__dict__["orthofx_site"] == "lin"


# ------------------------------------------------------------------------------------- deep sharing (2^25 paths)


def test_lorth_transform_of_a_module_shared_at_every_level_of_25_is_fast_and_exact():
    model, x = _deep(25), torch.randn(2, 4)
    start = time.perf_counter()
    out = orthofx.transform(model, "lorth", example_inputs=(x,))
    assert time.perf_counter() - start < HANG_SECONDS
    torch.testing.assert_close(out(x), model(x), rtol=0, atol=0)
    assert [e.site.name for e in orthofx.manifest_of(out).plan.entries] == [".".join("a" * 25)]


def test_inplace_transform_of_the_deep_model_replaces_the_layer_at_every_path():
    torch.manual_seed(0)
    model, x = _deep(25), torch.randn(2, 4)
    old = model.get_submodule(".".join("a" * 25))
    start = time.perf_counter()
    out = orthofx.transform(model, {"rules": [{"match": {"type": "Linear"}, "apply": "orthogonal_conv"}]},
                            inplace=True)
    assert time.perf_counter() - start < HANG_SECONDS
    new = out.get_submodule(".".join("a" * 25))
    assert new is not old
    rng = random.Random(0)
    for _ in range(50):
        assert model.get_submodule(".".join(rng.choice("ab") for _ in range(25))) is new
    torch.testing.assert_close(model(x), out(x), rtol=0, atol=0)


def test_name_rules_on_the_deep_model_warn_and_match_names_and_one_other_name():
    model = _deep(25)
    deep = ".".join("a" * 25)
    for pattern, selected in [(deep, True), ("re:(a\\.)*a", True), (".".join("a" * 24) + ".b", True),
                              ("b." + ".".join("a" * 24), False)]:
        start = time.perf_counter()
        with pytest.warns(OrthofxWarning, match="rule\\(s\\) 'r'.*not with every path") as caught:
            plan = orthofx.explain(model, _rule_policy([pattern], []))
        assert time.perf_counter() - start < HANG_SECONDS
        assert [e.site.name for e in plan.entries] == ([deep] if selected else []), pattern
        assert len([w for w in caught if issubclass(w.category, OrthofxWarning)]) == 1


def test_a_rule_without_name_patterns_on_the_deep_model_gives_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", OrthofxWarning)
        plan = orthofx.explain(_deep(25), {"rules": [{"name": "r", "match": {"type": "Linear"},
                                                      "apply": "orth_regularizer"}]})
    assert [e.site.name for e in plan.entries] == [".".join("a" * 25)]


def test_leaf_entries_naming_deep_other_paths_are_resolved_without_listing_them():
    model = _deep(25)
    other = ".".join("b" * 25)
    policy = orthofx.Policy.from_dict({"capture": {"leaf_modules": [other, "a.a.q"]},
                                       "rules": [{"match": {"type": "Linear"}, "apply": "orth_regularizer"}]})
    start = time.perf_counter()
    notes = unused_leaf_entries(policy, model)
    assert time.perf_counter() - start < HANG_SECONDS
    assert notes[0].startswith(f"capture.leaf_modules entry {other!r} is another path of the submodule "
                               f"{'.'.join('a' * 25)!r}")
    assert notes[1].startswith("capture.leaf_modules entry 'a.a.q' names no submodule path")


def test_freeze_of_a_deeply_shared_model_holding_a_transformed_part_is_fast():
    torch.manual_seed(0)
    part = orthofx.transform(nn.Sequential(nn.Linear(4, 4)), "lorth")
    model, x = part, torch.randn(2, 4)
    for _ in range(25):  # 2^25 paths
        model = _Level(model)
    start = time.perf_counter()
    frozen = orthofx.freeze(model, example_inputs=(x,))
    assert time.perf_counter() - start < HANG_SECONDS
    torch.testing.assert_close(frozen(x), model.eval()(x), rtol=0, atol=0)


class _BigBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(2, 2), nn.Linear(2, 2)
        self.spare = nn.ModuleList(nn.Identity() for _ in range(2100))

    def forward(self, x):
        return self.lin1(torch.tanh(self.lin0(x)))


def test_an_alias_of_a_big_subtree_lists_every_path_and_does_not_warn():
    """The bound on the paths listed grows with the model (16 per edge): two aliases of a big backbone have 4206
    other paths, past a flat 4096, and an exclude rule written against an alias lost them (the excluded layer was
    transformed, with a warning blaming deep sharing). The reference is the rule applied to the first
    names, which name the same modules."""
    # two Linear sites and 2100 modules the forward does not call: 2 x 2103 other paths ('backbone.*', 'encoder.*')
    model = nn.Sequential(_BigBackbone())
    model.backbone = model[0]  # named_modules: '0.*'
    model.encoder = model[0]
    rule = {"name": "r", "match": {"type": "Linear", "exclude": ["encoder.lin1"]}, "apply": "orth_regularizer"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = orthofx.explain(model, {"rules": [rule]})
    reference = orthofx.explain(model, {"rules": [{**rule, "match": {"type": "Linear", "exclude": ["0.lin1"]}}]})
    sites = {entry.site.name for entry in plan.entries}
    assert sites == {entry.site.name for entry in reference.entries} == {"0.lin0"}
