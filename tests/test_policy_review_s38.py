"""Session 38 review of the policy format: Policy objects built or edited in code are checked where they are used,
register_pass refuses malformed passes, YAML's None and signed leading-dot floats, README's parameter table against
the passes' specs, and round trips of random policies."""

from __future__ import annotations

import copy
import math
import pickle
import random
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import orthofx
from orthofx import Policy
from orthofx.errors import OrthofxError, PolicyError
from orthofx.passes import Param, Pass, available_passes, register_pass, unregister_pass
from orthofx.policy import Match, Rule

README = Path(__file__).resolve().parents[1] / "README.md"
HEAD = "orthofx: 1\nrules:\n"


def _rule_text(apply: str, with_text: str = "", match: str = "{type: Conv2d}", extra: str = "") -> str:
    text = HEAD + f"  - match: {match}\n    apply: {apply}\n"
    if with_text:
        text += f"    with: {with_text}\n"
    return text + extra


def _convs() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))


# ------------------------------------------------------------------------------- 1. Policy objects are checked again

def test_a_parameter_edited_on_a_policy_object_is_checked_where_it_is_used():
    policy = Policy.preset("lorth")
    policy.rules[0].params["weight"] = -1.0  # a regulariser that would reward non-orthogonal weights
    for use in (lambda: orthofx.transform(_convs(), policy), lambda: orthofx.explain(_convs(), policy),
                lambda: Policy.load(policy)):
        with pytest.raises(PolicyError) as caught:
            use()
        assert caught.value.reason.startswith("rules[0].with.weight: parameter 'weight' must be a number >= 0.0")
        assert "built or changed in code" in caught.value.reason
    assert policy.rules[0].params["weight"] == -1.0  # the check reads the policy only


def test_a_policy_object_with_the_from_dict_values_transforms_as_the_dict():
    data = {"rules": [{"match": {"type": "Conv2d"}, "apply": "orth_regularizer", "with": {"weight": 0.5}}]}
    built = Policy(rules=[Rule(name="orth_regularizer[0]", match=Match(type=("Conv2d",)), apply="orth_regularizer",
                               params={"weight": 0.5, "case": "auto", "every": 1}, given_params={"weight": 0.5})])
    assert Policy.load(built) is built and built == Policy.from_dict(data)
    a, b = orthofx.transform(_convs(), built), orthofx.transform(_convs(), data)
    torch.testing.assert_close(orthofx.penalty(a), orthofx.penalty(b), rtol=0, atol=0)
    assert orthofx.penalty(a).item() > 0


@pytest.mark.parametrize("name", list(orthofx.presets()))
def test_every_preset_object_passes_the_check_unchanged(name):
    policy = Policy.preset(name)
    before = copy.deepcopy(policy)
    assert Policy.load(policy) is policy and policy == before


def test_a_policy_object_without_rules_still_plans_nothing():
    plan = orthofx.explain(_convs(), Policy())
    assert not plan.entries


def test_a_rule_built_without_its_defaults_names_them():
    policy = Policy(rules=[Rule(name="r", match=Match(type=("Conv2d",)), apply="orth_regularizer")])
    with pytest.raises(PolicyError) as caught:
        orthofx.transform(_convs(), policy)  # was: TransformError from inside the pass, KeyError: 'case'
    assert caught.value.reason.startswith("rules[0].params lack 'weight', 'case', 'every' of pass 'orth_regularizer'")


def test_a_match_given_a_bare_string_is_refused_with_the_fix():
    policy = Policy(rules=[Rule(name="r", match=Match(type="Conv2d"), apply="orth_regularizer",
                                params=orthofx.passes.get_pass("orth_regularizer").validate_params({}))])
    with pytest.raises(PolicyError) as caught:
        orthofx.explain(_convs(), policy)  # was: PlanError about the classes 'C', 'o', 'n', 'v', '2', 'd'
    assert caught.value.reason.startswith("rules[0].match.type must be a tuple of strings, found a string "
                                          "('Conv2d'): write ('Conv2d',)")


def test_an_op_alias_on_a_match_object_names_the_canonical_name():
    params = orthofx.passes.get_pass("svd_conditioning").validate_params({})
    policy = Policy(rules=[Rule(name="r", match=Match(op=("eigh",)), apply="svd_conditioning", params=params)])
    with pytest.raises(PolicyError) as caught:
        Policy.load(policy)
    assert "rules[0].match.op holds ['eigh'], but sites are named by the canonical op names ['linalg.eigh']" in str(
        caught.value)


def test_a_tensor_put_into_a_policy_object_is_refused():
    policy = Policy.preset("lorth")
    policy.rules[0].params["weight"] = torch.tensor(0.1)
    with pytest.raises(PolicyError, match=r"rules\[0\]\.with\.weight: unsupported value of type torch\.Tensor"):
        Policy.load(policy)


def test_duplicate_rule_objects_are_refused():
    rule = Policy.preset("lorth").rules[0]
    with pytest.raises(PolicyError, match="duplicate rule name 'lorth'"):
        Policy.load(Policy(rules=[rule, rule]))


# ------------------------------------------------------------------------------- 2. register_pass refuses bad passes

def _pass(name: str, **attrs) -> type[Pass]:
    attrs.setdefault("apply", lambda self, ctx, entries: None)
    return type(f"Pass_{name}", (Pass,), {"name": name, **attrs})


@pytest.mark.parametrize("attrs, message", [
    ({"params": (Param("a", 1, (int,)), Param("a", "x", (str,)))}, "params declare 'a' twice"),
    ({"params": ("a",)}, "params must be a tuple of orthofx.passes.Param, and holds 'a'"),
    ({"params": Param("a", 1, (int,))}, "params must be a tuple of orthofx.passes.Param, got Param("),
    ({"params": (Param("a", -1.0, (float,), minimum=0.0),)},
     "the default of Param 'a' is refused by its own spec (parameter 'a' must be a number >= 0.0, got -1.0)"),
    ({"params": (Param("c", "z", (str,), choices=("x", "y")),)}, "the default of Param 'c' is refused"),
    ({"params": (Param("a", 1, int),)}, "Param 'a': types must be a non-empty tuple of types"),
    ({"module_types": ("Conv2d",)}, "module_types must be a tuple of classes"),
    ({"ops": "linalg.eigh", "site_kinds": frozenset({"function"})}, "ops must be a tuple of op names"),
    ({"group": 3}, "group must be a string"),
    ({"apply": Pass.apply}, "it does not implement apply(self, ctx, entries)"),
])
def test_register_pass_refuses_a_malformed_pass(attrs, message):
    name = "s38_malformed"
    with pytest.raises(OrthofxError) as caught:
        register_pass(_pass(name, **attrs))
    assert message in str(caught.value)
    assert name not in available_passes()


def test_register_pass_still_takes_a_well_formed_pass():
    cls = _pass("s38_fine", params=[Param("a", None, (int, type(None))), Param("b", [], (list,))],
                module_types=(nn.Linear,), group="weight")
    try:
        assert register_pass(cls) is cls
        rule = Policy.from_dict({"rules": [{"match": {"type": "Linear"}, "apply": "s38_fine"}]}).rules[0]
        assert rule.params == {"a": None, "b": []}
    finally:
        unregister_pass("s38_fine")


def test_every_built_in_pass_is_well_formed():
    from orthofx.passes.registry import _malformed
    built_in = {name: cls for name, cls in available_passes().items() if cls.__module__.startswith("orthofx.passes.")}
    assert len(built_in) == 8
    assert {name: _malformed(cls) for name, cls in built_in.items()} == dict.fromkeys(built_in, "")


# ------------------------------------------------------------------------------- 3. None in YAML

@pytest.mark.parametrize("text, hint", [
    (_rule_text("isometric_init", "{seed: None}", "{type: Linear}"),
     "got 'None' (a string); None is no null in YAML but the string 'None': write null (or ~) for null"),
    (_rule_text("orth_regularizer", "{case: None}"),
     "got 'None'; None is no null in YAML but the string 'None': leave the parameter out, or write null, for its "
     "default 'auto'"),
    (_rule_text("orth_regularizer", "{weight: None}"),
     "None is no null in YAML but the string 'None': leave the parameter out, or write null, for its default 0.01"),
    (_rule_text("orth_regularizer", extra="    optional: None\n"),
     "found a string ('None'); None is no null in YAML but the string 'None': leave the key out, or write null, for "
     "its default false"),
    (_rule_text("orth_regularizer", match="{type: Conv2d, kind: None}"),
     "None is no null in YAML but the string 'None': leave the key out, or write null, for the kind the other "
     "selectors imply"),
    ("orthofx: 1\ncapture: {mode: None}\n" + _rule_text("orth_regularizer")[len(HEAD) - len("rules:\n"):],
     "None is no null in YAML but the string 'None': leave the key out, or write null, for its default auto"),
])
def test_python_none_in_yaml_says_to_write_null(text, hint):
    with pytest.raises(PolicyError) as caught:
        Policy.from_yaml(text)
    assert caught.value.reason.endswith(hint)
    fixed = Policy.from_yaml(text.replace("None", "null"))  # the fix named is accepted
    assert fixed == Policy.from_yaml(text.replace(": None", ": ~"))


def test_none_as_a_choice_spelt_otherwise_keeps_the_closest_choice():
    with pytest.raises(PolicyError) as caught:
        Policy.from_yaml(_rule_text("pre_svd", "{weight: None}"))
    assert caught.value.reason.endswith("got 'None' (did you mean 'none'?)")


# ------------------------------------------------------------------------------- 4. -.5 and +.5

@pytest.mark.parametrize("written", ["-.5", "+.5", "+.25e1", "-.1_5"])
def test_a_signed_leading_dot_number_is_a_number(written):
    where = Policy.from_yaml(_rule_text("orth_regularizer", match="{type: Conv2d, where: {x: %s}}" % written))
    expected = float(written.replace("_", ""))  # Python's (and YAML 1.2's) reading
    assert where.rules[0].match.where == {"x": expected}
    gain = Policy.from_yaml(_rule_text("isometric_init", "{gain: %s}" % written.lstrip("-+"), "{type: Linear}"))
    assert gain.rules[0].params["gain"] == abs(expected)


def test_a_quoted_signed_leading_dot_number_stays_a_string_through_a_round_trip():
    policy = Policy.from_dict({"description": "-.5", "rules": [
        {"name": "+.5", "match": {"type": "Conv2d", "where": {"a": "-.5", "b": -0.5}}, "apply": "orth_regularizer"}]})
    again = Policy.from_yaml(policy.to_yaml())
    assert again == policy and again.description == "-.5" and again.rules[0].match.where == {"a": "-.5", "b": -0.5}


def test_the_quoted_form_gets_the_unquoting_hint():
    with pytest.raises(PolicyError) as caught:
        Policy.from_yaml(_rule_text("isometric_init", "{gain: '+.5'}", "{type: Linear}"))
    assert caught.value.reason.endswith("; a number in quotes is a string: write +.5 without quotes")


# ------------------------------------------------------------------------------- 5. README's parameters

def _readme_pass_parameters() -> dict[str, set[str]]:
    text = README.read_text(encoding="utf-8")
    table = text[text.index("| pass | sites | what it does | parameters |"):]
    table = table[:table.index("\n\n")]
    out = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = cells[0].strip("`")
        params = re.sub(r"\([^()]*\)", "", cells[-1])  # the defaults and choices in parentheses
        out[name] = set(re.findall(r"`([a-z_0-9]+)`", params))
    return out


def test_readme_documents_every_parameter_of_every_pass_and_no_other():
    documented = _readme_pass_parameters()
    # other tests of a session may have registered passes of their own
    built_in = {name for name, cls in available_passes().items() if cls.__module__.startswith("orthofx.passes.")}
    assert set(documented) == built_in
    for name in built_in:
        assert documented[name] == set(available_passes()[name].param_spec()), name


@pytest.mark.parametrize("name", sorted(_readme_pass_parameters()))
def test_each_documented_parameter_is_accepted_and_a_near_miss_refused(name):
    cls = available_passes()[name]
    match = {"op": "linalg.eigh"} if "module" not in cls.site_kinds else {"type": "Conv2d"}
    for key, param in cls.param_spec().items():
        rule = {"match": match, "apply": name, "with": {key: param.default}}
        assert Policy.from_dict({"rules": [rule]}).rules[0].params[key] == param.default
        with pytest.raises(PolicyError) as caught:
            Policy.from_dict({"rules": [{**rule, "with": {key + "s": param.default}}]})
        assert f"unknown key '{key}s' in rules[0].with" in caught.value.reason
        assert "did you mean" in caught.value.reason or "is a parameter of" in caught.value.reason


# ------------------------------------------------------------------------------- 6. round trips and the user's dict

_STRINGS = ["yes", "No", "null", "~", "None", "1e3", "-.5", "+.5", "010", "0x10", "1:30", ".inf", "2020-01-01", "=",
            "<<", "a #b", "a: b", "*a", "&a", "!a", "'a", "a\nb", " lead", "", "\u2028x", "x\x85", "conv[12]", "re:.*"]


def _random_policy(rng: random.Random) -> dict:
    passes = available_passes()
    rules = []
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(sorted(passes))
        cls = passes[name]
        match = {"op": "linalg.eigh"} if "module" not in cls.site_kinds else {"type": rng.choice(["Conv2d", "a.B"])}
        if "module" in cls.site_kinds and rng.random() < 0.6:
            match["where"] = {"k": rng.choice([rng.choice(_STRINGS), -0.5, 1e-300, 2 ** 62, None, True, [1, "-.5"]])}
        rule = {"match": match, "apply": name}
        if rng.random() < 0.5:
            rule["name"] = rng.choice(_STRINGS) or "n"
        given = {}
        for key, param in cls.param_spec().items():
            if rng.random() < 0.5:
                given[key] = rng.choice(param.choices) if param.choices else param.default
        if given:
            rule["with"] = given
        rules.append(rule)
    return {"description": rng.choice(_STRINGS), "rules": rules}


def test_random_policies_round_trip_through_yaml_and_dict():
    rng = random.Random(38)
    checked = 0
    for _ in range(120):
        data = _random_policy(rng)
        try:
            policy = Policy.from_dict(data)
        except PolicyError:  # e.g. two rules given the same name
            continue
        assert Policy.from_yaml(policy.to_yaml()) == policy, policy.to_yaml()
        assert Policy.from_dict(policy.to_dict()) == policy
        checked += 1
    assert checked > 90


def test_the_users_dict_is_never_changed():
    data = {"orthofx": 1, "description": None, "capture": {"mode": "fx", "leaf_modules": ("X",)}, "rules": [
        {"name": None, "match": {"type": ("Conv2d",), "name": ["*"], "where": {"kernel_size": (3, 3)}, "kind": None},
         "apply": "orth_regularizer", "with": {"weight": 0.1, "every": None}},
        {"match": {"type": "Linear"}, "apply": "isometric_init", "with": {"seed": None}, "optional": True}]}
    before = pickle.dumps(data)
    policy = Policy.from_dict(data)
    orthofx.explain(_convs(), data)
    orthofx.transform(_convs(), data)
    policy.rules[0].given_params["weight"] = 5.0
    policy.rules[0].match.where["groups"] = 2
    assert pickle.dumps(data) == before
    assert math.isclose(Policy.from_dict(data).rules[0].params["weight"], 0.1)


def test_a_rule_taken_from_another_policy_keeps_its_name_through_a_pt_file(tmp_path):
    both = Policy.from_dict({"rules": [{"match": {"type": "Linear"}, "apply": "isometric_init"},
                                       {"match": {"type": "Conv2d"}, "apply": "orth_regularizer"}]})
    alone = Policy(rules=[both.rules[1]])  # named 'orth_regularizer[1]' by its place in `both`
    assert Policy.from_yaml(alone.to_yaml()).rules[0].name == "orth_regularizer[1]"
    assert Policy.from_dict(both.to_dict()) == both  # names at their own places are still left out
    assert all("name" not in rule for rule in both.to_dict()["rules"])
    gm = orthofx.transform(_convs(), alone)
    orthofx.export(gm, tmp_path / "m.pt")
    loaded = orthofx.load(_convs(), tmp_path / "m.pt")
    assert [t.rule for t in orthofx.manifest_of(loaded).penalties] == ["orth_regularizer[1]"] * 2


@pytest.mark.parametrize("edit, shown", [
    (lambda rule: rule.params.update(weight=0.5), "('weight': params 0.5, given_params 0.01)"),
    (lambda rule: rule.given_params.update(weight=0.5), "('weight': params 0.01, given_params 0.5)"),
    (lambda rule: rule.params.update(every=4), "('every': params 4, given_params leave it out (the default))"),
])
def test_params_and_what_a_pt_file_replays_must_agree(edit, shown):
    policy = Policy.preset("lorth")
    edit(policy.rules[0])
    with pytest.raises(PolicyError) as caught:
        orthofx.transform(_convs(), policy)  # was: transform with one value, orthofx.load replays the other
    assert shown in caught.value.reason
    edited = Policy.preset("lorth")
    edited.rules[0].params["weight"] = edited.rules[0].given_params["weight"] = 0.5  # both: accepted
    assert Policy.load(edited) is edited and Policy.from_yaml(edited.to_yaml()) == edited


def test_an_unknown_key_in_given_params_is_refused_before_a_pt_file_holds_it():
    policy = Policy.preset("lorth")
    policy.rules[0].given_params["wieght"] = 0.5
    with pytest.raises(PolicyError, match=r"rules\[0\]\.given_params \(what to_yaml and \.pt files write\): unknown "
                                          r"parameter 'wieght'"):
        Policy.load(policy)


# ------------------------------------------------------------------------------- 7. names that are no YAML text

@pytest.mark.parametrize("text", ["lorth", " svd\n"])
def test_from_yaml_given_a_preset_name_names_the_loaders(text):
    with pytest.raises(PolicyError) as caught:
        Policy.from_yaml(text)  # was: "the top level of a policy must be a mapping ...; found a string"
    word = text.strip()
    assert caught.value.reason == (f"{word!r} is the name of a preset, not YAML text or a file; load it with "
                                   f"Policy.preset({word!r}) or Policy.load({word!r})")
    assert Policy.load(text) == Policy.preset(word)


def test_a_home_relative_path_names_the_file_it_would_be(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "p.yaml").write_text(_rule_text("orth_regularizer"))
    for given in ("~/p.yaml", Path("~/p.yaml")):
        with pytest.raises(PolicyError) as caught:
            Policy.load(given)
        assert caught.value.reason.endswith(f"('~' is not expanded in Python: the file is "
                                            f"{str(tmp_path / 'p.yaml')!r}; pass os.path.expanduser('~/p.yaml') or "
                                            "pathlib.Path('~/p.yaml').expanduser())")
    assert Policy.load(Path("~/p.yaml").expanduser()) == Policy.from_yaml(_rule_text("orth_regularizer"))
    with pytest.raises(PolicyError) as caught:
        Policy.load("~/missing.yaml")
    assert caught.value.reason == "policy file not found: '~/missing.yaml'"


# ------------------------------------------------------------------------------- 8. building on a preset

@pytest.mark.parametrize("text, at, source", [
    ("orthofx: 1\nextends: svd\n" + _rule_text("orth_regularizer")[len("orthofx: 1\n"):], "unknown key 'extends' at "
     "the top level", "Policy.preset('svd')"),
    ("orthofx: 1\ninclude: [base.yaml]\n" + _rule_text("orth_regularizer")[len("orthofx: 1\n"):], "unknown key "
     "'include' at the top level", "Policy.load(other)"),
    (HEAD + "  - lorth\n", "rules[0] must be a mapping", "Policy.preset('lorth')"),
])
def test_extending_a_preset_says_how_to_combine_policies(text, at, source):
    with pytest.raises(PolicyError) as caught:
        Policy.from_yaml(text)
    assert caught.value.reason.startswith(at)
    assert caught.value.reason.endswith(f"concatenate them: Policy.from_dict({{'rules': [*{source}.to_dict()"
                                        "['rules'], ...]}))")
    # the idiom named works: a preset's rules and one of the user's, in one policy
    combined = Policy.from_dict({"rules": [*Policy.preset("lorth").to_dict()["rules"],
                                           {"match": {"type": "Linear"}, "apply": "isometric_init"}]})
    assert [rule.name for rule in combined.rules] == ["lorth", "isometric_init[1]"]


def test_a_rule_that_is_some_other_string_gets_no_such_hint():
    with pytest.raises(PolicyError) as caught:
        Policy.from_yaml(HEAD + "  - conv1\n")
    assert caught.value.reason.endswith("found a string ('conv1')")


def test_a_pass_declaring_an_op_alias_is_named_as_the_mistake():
    cls = _pass("s38_alias_ops", site_kinds=frozenset({"function"}), ops=("eigh",))
    register_pass(cls)
    try:
        with pytest.raises(PolicyError) as caught:
            Policy.from_dict({"rules": [{"match": {"op": "eigh"}, "apply": "s38_alias_ops"}]})
        # was: "pass 's38_alias_ops' handles the ops eigh, not linalg.eigh", a contradiction to its reader
        assert caught.value.reason.startswith("pass 's38_alias_ops' declares ops eigh, which no site is named by: a "
                                              "pass's ops are canonical op names (linalg.svd, ")
        assert orthofx.policy.canonical_op("eigh") == "linalg.eigh"
    finally:
        unregister_pass("s38_alias_ops")


@pytest.mark.parametrize("apply, with_text, match", [
    ("riemannian", "{free: no}", "{type: Linear}"),
    ("pre_svd", "{weight: off}", "{type: Conv2d}"),
])
def test_a_yaml_boolean_word_for_a_choice_says_how_yaml_read_it(apply, with_text, match):
    with pytest.raises(PolicyError) as caught:
        Policy.from_yaml(_rule_text(apply, with_text, match))
    assert caught.value.reason.endswith("got False; YAML reads yes, no, on and off (also y and n) as true / false: "
                                        "write one of the choices")
