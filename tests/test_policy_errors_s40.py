"""Session 40: policies of custom passes whose validate_params converts values round-trip through to_yaml; errors
about a rule say which rule where no line does (its name in PolicyErrors, its position in PlanErrors); the hints
for a rule's names, excludes and leaf_modules entries know the other paths of a shared submodule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthofx
from orthofx import Policy
from orthofx.errors import PlanError, PolicyError
from orthofx.passes import Param, Pass, register_pass, unregister_pass

# ------------------------------------------------------------------- 1. validate_params that converts its input


class _SplitNames(Pass):
    """Takes a comma-separated string and gives the pass a list: validating its own output raises (a list is no
    string)."""

    name = "s40_split_names"
    params = (Param("layers", "a", (str,), "comma-separated names"), Param("weight", 0.5, (float,), minimum=0.0))

    @classmethod
    def validate_params(cls, given):
        out = super().validate_params(given)
        out["layers"] = out["layers"].split(",")
        return out

    def apply(self, ctx, entries):
        pass


class _PercentRate(Pass):
    """Takes a share as a fraction and gives the pass a percentage: its own output (20.0 for 0.2) is out of the
    range it takes."""

    name = "s40_percent_rate"
    params = (Param("share", 0.5, (float,), "a fraction", minimum=0.0, maximum=1.0),)

    @classmethod
    def validate_params(cls, given):
        out = super().validate_params(given)
        out["share"] = out["share"] * 100.0
        return out

    def apply(self, ctx, entries):
        pass


@pytest.fixture
def converting_passes():
    for cls in (_SplitNames, _PercentRate):
        register_pass(cls)
    yield
    for cls in (_SplitNames, _PercentRate):
        unregister_pass(cls.name)


def _one_rule(apply: str, given: dict) -> dict:
    return {"rules": [{"match": {"type": "Linear"}, "apply": apply, "with": given}]}


@pytest.mark.parametrize("apply, given, expected", [
    ("s40_split_names", {"layers": "enc,dec"}, {"layers": "enc,dec".split(","), "weight": 0.5}),
    ("s40_percent_rate", {"share": 0.2}, {"share": 0.2 * 100.0}),
])
def test_a_policy_of_a_pass_converting_its_params_round_trips(converting_passes, apply, given, expected):
    # to_yaml / to_dict / Policy.load checked the params (the pass's output) as if written under with:, and raised
    # (a list for a string; a percentage of 20 above a fraction's maximum 1); they must write what the user gave
    policy = Policy.from_dict(_one_rule(apply, given))
    assert policy.rules[0].params == expected
    assert policy.to_dict()["rules"][0]["with"] == given
    text = policy.to_yaml()
    again = Policy.from_yaml(text)
    assert again == policy and again.rules[0].params == expected
    assert Policy.from_dict(policy.to_dict()) == policy
    assert Policy.load(policy) is policy


def test_a_converting_pass_runs_from_a_policy_object(converting_passes):
    policy = Policy.from_dict(_one_rule("s40_split_names", {"layers": "x,y"}))
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(4, 3)
    gm = orthofx.transform(model, policy)
    torch.testing.assert_close(gm(x), model(x))


def test_params_edited_alone_on_a_converting_pass_are_still_refused(converting_passes):
    policy = Policy.from_dict(_one_rule("s40_split_names", {"layers": "x,y"}))
    policy.rules[0].params["layers"] = ["z"]  # what to_yaml writes ('x,y') would run with ['x', 'y']
    with pytest.raises(PolicyError, match=r"rules\[0\]\.params and rules\[0\]\.given_params, .* disagree"):
        policy.to_yaml()
    policy.rules[0].given_params = {"layers": "z"}  # both set: the params are what validate_params makes of it
    assert Policy.from_yaml(policy.to_yaml()).rules[0].params == {"layers": ["z"], "weight": 0.5}


def test_edited_params_of_a_built_in_pass_keep_their_message():
    policy = Policy.from_dict(_one_rule("orth_regularizer", {}))
    policy.rules[0].params["weight"] = -1.0
    with pytest.raises(PolicyError) as caught:
        policy.to_yaml()
    assert caught.value.reason.startswith("rules[0].with.weight: parameter 'weight' must be a number >= 0.0")


# ------------------------------------------------------------------- 2. PolicyErrors name the rule

_SOFT = {"match": {"type": "Conv2d"}, "apply": "orth_regularizer"}


def _rules(bad: dict) -> dict:
    return {"rules": [_SOFT, {**_SOFT, "match": {"type": "Linear"}}, {"name": "late", **_SOFT, **bad}]}


@pytest.mark.parametrize("bad, start", [
    ({"with": {"weight": -1}}, "rules[2].with.weight: parameter 'weight' must be a number >= 0.0"),
    ({"with": {"wieght": 1}}, "unknown key 'wieght' in rules[2].with for pass 'orth_regularizer'"),
    ({"with": 3}, "rules[2].with must be a mapping of parameters for pass 'orth_regularizer'"),
    ({"optional": "yes"}, "rules[2].optional must be true or false"),
    ({"match": {"type": "Conv2d", "kind": "blok"}}, "rules[2].match.kind must be one of module, block, function"),
])
def test_a_dict_rule_error_names_the_rule(bad, start):
    with pytest.raises(PolicyError) as caught:
        Policy.from_dict(_rules(bad))
    reason = caught.value.reason
    assert reason.startswith(start) and reason.endswith(" (in rule 'late')"), reason


def test_a_policy_object_error_names_the_rule_before_its_note():
    policy = Policy.from_dict(_rules({}))
    policy.rules[2].params["weight"] = 0.5  # given_params left as they were
    with pytest.raises(PolicyError) as caught:
        policy.to_yaml()
    assert "; set both (in rule 'late') (checked when the Policy is used" in caught.value.reason


@pytest.mark.parametrize("policy", [
    {"rules": [{"name": "late", **_SOFT, "with": {"weight": -1}}]},          # one rule: nothing to tell apart
    {"rules": [_SOFT, {**_SOFT, "with": {"weight": -1}}]},                   # the default name says the position
])
def test_rules_the_index_tells_apart_get_no_name(policy):
    with pytest.raises(PolicyError) as caught:
        Policy.from_dict(policy)
    assert "(in rule" not in caught.value.reason


def test_a_yaml_rule_error_is_placed_by_its_line_alone():
    text = ("orthofx: 1\nrules:\n  - {match: {type: Conv2d}, apply: orth_regularizer}\n"
            "  - name: late\n    match: {type: Linear}\n    apply: orth_regularizer\n    with: {weight: -1}\n")
    with pytest.raises(PolicyError) as caught:
        Policy.from_yaml(text)
    assert (caught.value.line, caught.value.column) == (7, 20)
    assert caught.value.reason == "rules[1].with.weight: parameter 'weight' must be a number >= 0.0, got -1.0"


def test_a_duplicate_name_is_not_repeated():
    with pytest.raises(PolicyError) as caught:
        Policy.from_dict({"rules": [{"name": "late", **_SOFT}, {"name": "late", **_SOFT}]})
    assert caught.value.reason.count("'late'") == 1


# ------------------------------------------------------------------- 3. PlanErrors give a named rule's position


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))


_LINEAR = {"match": {"type": "Linear"}, "apply": "orth_regularizer"}


@pytest.mark.parametrize("late, start", [
    ({"match": {"type": "Conv2d"}, "apply": "riemannian"}, "rule 'late' (rules[1]) matched no module site; "),
    ({"match": {"type": "Linear", "where": {"bias": 3}}, "apply": "riemannian"},
     "rule 'late' (rules[1]): match.where.bias: attribute 'bias' of Linear is a tensor"),
    ({"match": {"type": "ReLU"}, "apply": "orth_regularizer"},
     "rule 'late' (rules[1]) (apply: orth_regularizer) matched 1 site(s) but its pass can handle none of them"),
])
def test_a_plan_error_gives_a_named_dict_rule_its_position(late, start):
    with pytest.raises(PlanError) as caught:
        orthofx.explain(_mlp(), {"rules": [_LINEAR, {"name": "late", **late}]})
    assert str(caught.value).startswith(start), str(caught.value)


def test_a_plan_warning_gives_a_named_dict_rule_its_position():
    policy = {"rules": [_LINEAR, {"name": "late", "match": {"type": ["Linear", "Linaer"]}, "apply": "riemannian"}]}
    plan = orthofx.explain(_mlp(), policy)
    assert any(w.startswith("rule 'late' (rules[1]): match.type entry 'Linaer' names no class")
               for w in plan.capture.warnings), plan.capture.warnings


@pytest.mark.parametrize("policy, start", [
    ({"rules": [_LINEAR, {"match": {"type": "Conv2d"}, "apply": "riemannian"}]}, "rule 'riemannian[1]' matched"),
    ({"rules": [{"name": "late", "match": {"type": "Conv2d"}, "apply": "riemannian"}]}, "rule 'late' matched"),
])
def test_a_plan_error_adds_no_position_the_name_or_policy_makes_plain(policy, start):
    with pytest.raises(PlanError) as caught:
        orthofx.explain(_mlp(), policy)
    assert str(caught.value).startswith(start)


# ------------------------------------------------------------------- 4. hints know a shared module's other paths


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.lin(x))


class _Shared(nn.Module):
    """One block under two names, called twice (a tied encoder / decoder)."""

    def __init__(self):
        super().__init__()
        self.encoder = _Block()
        self.decoder = self.encoder
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.decoder(self.encoder(x)))


def _other_paths(model: nn.Module) -> dict[str, str]:
    """Reference: every path of a module that named_modules() leaves out -> the path it gives the module."""
    first = {id(m): name for name, m in model.named_modules()}
    return {name: first[id(m)] for name, m in model.named_modules(remove_duplicate=False) if name not in first.values()}


def _no_match(match: dict) -> str:
    with pytest.raises(PlanError) as caught:
        orthofx.explain(_Shared(), {"rules": [{"match": match, "apply": "orth_regularizer"}]})
    return str(caught.value)


def test_the_reference_sees_the_other_paths():
    assert _other_paths(_Shared()) == {"decoder": "encoder", "decoder.lin": "encoder.lin"}


def test_a_name_in_another_case_is_found_among_a_shared_modules_paths():
    message = _no_match({"type": "Linear", "name": "Decoder.lin"})
    assert "'Decoder.lin' matches decoder.lin (a path of encoder.lin) in another case" in message
    assert "otherwise: encoder.lin (also decoder.lin), head" in message


def test_the_closest_name_is_found_among_a_shared_modules_paths():
    assert "the closest name to 'decoder.lim' is decoder.lin (a path of encoder.lin)" in _no_match(
        {"type": "Linear", "name": "decoder.lim"})


def test_an_exclude_matching_a_shared_modules_other_path_is_named_as_the_cause():
    # the rule selects encoder.lin by its path decoder.lin and leaves it out by encoder.lin: the hint blamed the
    # name pattern and listed only 'head'
    message = _no_match({"type": "Linear", "name": "decoder.*", "exclude": "encoder.*"})
    assert "Its exclude (encoder.*) left out all 1 site(s) it selects otherwise: encoder.lin (also decoder.lin)." \
        in message


def _leaf_warnings(entry: str) -> tuple[list[str], list[str]]:
    policy = {"capture": {"leaf_modules": [entry]}, "rules": [_LINEAR]}
    plan = orthofx.explain(_Shared(), policy, example_inputs=(torch.randn(2, 4),))
    leaves = [s.name for s in plan.sites if s.node is None]  # submodules of a leaf have no node of their own
    return [w for w in plan.capture.warnings if "leaf_modules" in w], leaves


def test_a_leaf_entry_naming_a_shared_modules_other_path_says_which_path_to_write():
    other, first = next(iter(_other_paths(_Shared()).items()))
    warnings, leaves = _leaf_warnings(other)
    assert leaves == []  # what the warning says: the other path keeps nothing as a leaf ...
    assert warnings == [f"capture.leaf_modules entry {other!r} is another path of the submodule {first!r} (one "
                        "module under two names), and a module is kept as a leaf by its path in "
                        f"model.named_modules(), so it keeps nothing as a leaf: write {first!r} instead"]
    warnings, leaves = _leaf_warnings(first)
    assert warnings == [] and leaves == [f"{first}.lin"]  # ... and the path it names does


def test_a_misspelt_leaf_entry_is_matched_against_a_shared_modules_paths():
    warnings, _ = _leaf_warnings("decodr")
    assert warnings == ["capture.leaf_modules entry 'decodr' names no submodule path and no class of the model, so "
                        "it keeps nothing as a leaf (did you mean encoder, also named decoder?)"]


# ------------------------------------------------------------------- 5. how to fix an unknown pass of one's own


def test_an_unknown_pass_without_a_close_name_says_to_register_it():
    with pytest.raises(PolicyError) as caught:
        Policy.from_dict(_one_rule("my_own_pass", {}))
    assert caught.value.reason.startswith("unknown pass 'my_own_pass' in rules[0].apply; available: ")
    assert caught.value.reason.endswith("(a pass of your own must be registered with orthofx.passes.register_pass, "
                                        "i.e. the module defining it imported, before the policy is read)")
    with pytest.raises(PolicyError) as caught:  # a misspelt built-in pass keeps its one hint
        Policy.from_dict(_one_rule("orth_regulariser", {}))
    assert caught.value.reason.endswith("(did you mean 'orth_regularizer'?)")
