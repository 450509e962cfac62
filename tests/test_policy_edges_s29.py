"""Three edges of the policy format: errors about content reached through YAML aliases, null as "not given", and
MODEL / policy arguments naming a Python file without ':factory'.

Positions are checked against the policy text itself (the line and column where a token is written, found with
str.index here), and null handling against the same policy with the key left out and against the documented
defaults (the ``Param.default`` of each pass parameter, the dataclass defaults of the policy model)."""

import sys
import textwrap

import pytest
import torch
from torch import nn

from orthofx.cli import load_model, main
from orthofx.errors import PolicyError
from orthofx.passes import Pass, register_pass, registry, unregister_pass
from orthofx.passes.base import Param
from orthofx.policy import CaptureConfig, Match, Policy
from references import nested_replaced, text_position


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _load_error(tmp_path, text: str) -> PolicyError:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        Policy.from_yaml(path)
    assert info.value.file == str(path)
    return info.value


# ----------------------------------------------------------------------------------------------- aliases

def test_a_key_wrong_only_where_an_alias_uses_a_mapping_is_placed_at_the_anchor_and_names_the_alias(tmp_path):
    # rules[1]'s mistake was located at line 5 (rules[0]'s 'with', where &w is written), and nothing said that the
    # content was used at line 8 by rules[1]: the message named rules[1] and pointed at rules[0]
    text = textwrap.dedent("""\
        orthofx: 1
        rules:
          - match: {type: Conv2d}
            apply: orth_regularizer
            with: &w {weight: 0.1}
          - match: {op: linalg.eigh}
            apply: svd_conditioning
            with: *w
        """)
    err = _load_error(tmp_path, text)
    assert (err.line, err.column) == text_position(text, "weight")  # the key as written, inside the anchored mapping
    line, column = text_position(text, "*w")
    assert err.reason.startswith("unknown key 'weight' in rules[1].with for pass 'svd_conditioning'")
    assert err.reason.endswith(f"(used through the alias *w at line {line}, column {column})")
    assert (line, column) == (8, 11)


def test_a_value_wrong_only_where_an_alias_uses_a_scalar_is_placed_at_the_anchor(tmp_path):
    text = textwrap.dedent("""\
        orthofx: 1
        rules:
          - match: {name: "layer1*", kind: block}
            apply: jacobian_isometry
            with: {kind: &k partial}
          - match: {type: Conv2d}
            apply: orth_regularizer
            with: {case: *k}
        """)
    err = _load_error(tmp_path, text)
    assert (err.line, err.column) == text_position(text, "&k")  # PyYAML marks an anchored node at its anchor
    line, column = text_position(text, "*k")
    assert err.reason.startswith("rules[1].with.case: parameter 'case' must be one of 'auto', 'RO', 'CO'")
    assert err.reason.endswith(f"(used through the alias *k at line {line}, column {column})")


def test_an_alias_inside_aliased_content_names_both_uses_innermost_first(tmp_path):
    text = textwrap.dedent("""\
        orthofx: 1
        rules:
          - match: {type: Conv2d}
            apply: orth_regularizer
            with: {weight: &g 0.5}
          - match: {type: Linear}
            apply: orth_regularizer
            with: &o {weight: *g}
          - match: {feeds: linalg.eigh}
            apply: pre_svd
            with: *o
        """)
    err = _load_error(tmp_path, text)
    assert (err.line, err.column) == text_position(text, "&g")
    inner, outer = text_position(text, "*g"), text_position(text, "*o")
    assert err.reason.startswith("rules[2].with.weight: parameter 'weight' must be one of 'none', ")
    assert err.reason.endswith(f"(used through the alias *g at line {inner[0]}, column {inner[1]}, inside *o at line "
                               f"{outer[0]}, column {outer[1]})")


def test_a_whole_rule_used_twice_through_an_alias_names_the_second_use(tmp_path):
    text = textwrap.dedent("""\
        orthofx: 1
        rules:
          - &r
            name: soft
            match: {type: Conv2d}
            apply: orth_regularizer
          - *r
        """)
    err = _load_error(tmp_path, text)
    assert (err.line, err.column) == text_position(text, "soft")
    line, column = text_position(text, "*r")
    assert err.reason.startswith("duplicate rule name 'soft' in rules[1]; already used by rules[0] (line 3)")
    assert err.reason.endswith(f"(used through the alias *r at line {line}, column {column})")


def test_errors_not_reached_through_an_alias_say_nothing_of_aliases(tmp_path):
    # wrong where the anchor is written (its first use): the place is the anchor, and no alias is involved
    text = textwrap.dedent("""\
        orthofx: 1
        rules:
          - match: {type: Conv2d}
            apply: orth_regularizer
            with: &w {weight: -1}
          - match: {type: Linear}
            apply: orth_regularizer
            with: *w
        """)
    err = _load_error(tmp_path, text)
    assert (err.line, err.column) == text_position(text, "-1")
    assert err.reason.startswith("rules[0].with.weight:") and "alias" not in err.reason
    # a key written next to an alias is located at the key, where it is written: no alias note either
    text = text.replace("with: *w", "wiht: *w")
    err = _load_error(tmp_path, text.replace("weight: -1", "weight: 1"))
    assert (err.line, err.column) == text_position(text, "wiht")
    assert err.reason.startswith("unknown key 'wiht' in rules[1]") and "alias" not in err.reason


def test_the_command_line_prints_the_alias_note_on_its_one_line(capsys, tmp_path):
    text = "orthofx: 1\nrules:\n  - {match: {type: Conv2d}, apply: orth_regularizer, with: &w {weight: 0.1}}\n" \
           "  - {match: {op: eigh}, apply: svd_conditioning, with: *w}\n"
    (tmp_path / "p.yaml").write_text(text)
    code, out, err = _cli(capsys, "check", str(tmp_path / "p.yaml"))
    line, column = text_position(text, "weight")
    assert (code, out) == (2, "") and err.count("\n") == 1
    assert f"p.yaml:{line}:{column}: unknown key 'weight'" in err
    alias_line, alias_column = text_position(text, "*w")
    assert err.endswith(f"(used through the alias *w at line {alias_line}, column {alias_column})\n")


# ----------------------------------------------------------------------------------------------- null

_BASE = {"orthofx": 1, "description": "d", "capture": {"mode": "fx", "leaf_modules": ["X"]},
         "rules": [{"name": "r", "match": {"type": "Conv2d", "name": "c*", "exclude": ["fc"], "where": {"groups": 1},
                                           "kind": "module"},
                    "apply": "orth_regularizer", "with": {"weight": 0.1}, "optional": True}]}

# every key with a default: its path, and what the policy holds when the key is left out (the documented default)
_DEFAULTED = [
    (("orthofx",), lambda p: p.version == 1),
    (("description",), lambda p: p.description == ""),
    (("capture",), lambda p: p.capture == CaptureConfig()),
    (("capture", "mode"), lambda p: p.capture.mode == "auto"),
    (("capture", "leaf_modules"), lambda p: p.capture.leaf_modules == ()),
    (("rules", 0, "name"), lambda p: p.rules[0].name == "orth_regularizer[0]"),
    (("rules", 0, "with"), lambda p: p.rules[0].params == {"weight": 0.01, "case": "auto", "every": 1}),
    (("rules", 0, "optional"), lambda p: p.rules[0].optional is False),
    (("rules", 0, "match", "type"), lambda p: p.rules[0].match.type == ()),
    (("rules", 0, "match", "name"), lambda p: p.rules[0].match.name == ()),
    (("rules", 0, "match", "exclude"), lambda p: p.rules[0].match.exclude == ()),
    (("rules", 0, "match", "where"), lambda p: p.rules[0].match.where == {}),
    (("rules", 0, "match", "kind"), lambda p: p.rules[0].match.kind is None),
]


@pytest.mark.parametrize("path, holds_default", _DEFAULTED, ids=[".".join(map(str, p)) for p, _ in _DEFAULTED])
def test_null_means_the_key_is_not_given(path, holds_default):
    # capture.mode, capture.leaf_modules, a rule's name and optional, and match type/name/exclude were refused
    # ('must be a string or a list of strings, found null'), while with, where, kind and capture took null
    given_null = Policy.from_dict(nested_replaced(_BASE, path))
    left_out = Policy.from_dict(nested_replaced(_BASE, path, drop=True))
    assert given_null == left_out and holds_default(given_null)
    assert Policy.from_yaml(given_null.to_yaml()) == given_null


@pytest.mark.parametrize("key", ["op", "feeds"])
def test_null_op_and_feeds_are_not_given(key):
    policy = Policy.from_dict({"rules": [{"match": {"type": "Conv2d", key: None}, "apply": "orth_regularizer"}]})
    assert policy.rules[0].match == Match(type=("Conv2d",))


def _rule_for(pass_cls) -> dict:
    if "function" in pass_cls.site_kinds:
        return {"match": {"op": pass_cls.ops[0]}, "apply": pass_cls.name}
    return {"match": {"type": "Conv2d"} if "module" in pass_cls.site_kinds else {"kind": "block"},
            "apply": pass_cls.name}


_PARAMS = [(cls, p) for cls in registry.available_passes().values() for p in cls.params]


@pytest.mark.parametrize("pass_cls, param", _PARAMS, ids=[f"{c.name}.{p.name}" for c, p in _PARAMS])
def test_a_null_pass_parameter_takes_its_default(pass_cls, param):
    # was "parameter 'weight' must be a number >= 0.0, got None (null)" for every parameter without None among its
    # values; the reference is the Param's declared default
    rule = {**_rule_for(pass_cls), "with": {param.name: None}}
    policy = Policy.from_dict({"rules": [rule]})
    assert policy.rules[0].params[param.name] == param.default
    assert policy.rules[0].params == Policy.from_dict({"rules": [_rule_for(pass_cls)]}).rules[0].params
    text = f"orthofx: 1\nrules:\n  - match: {rule['match']}\n    apply: {pass_cls.name}\n    with: {{{param.name}: }}\n"
    assert Policy.from_yaml(text.replace("'", "")).rules[0].params[param.name] == param.default


def test_null_stays_a_value_for_a_parameter_that_takes_null_and_in_where():
    @register_pass
    class Limited(Pass):
        name = "limited_for_null_test"
        params = (Param("limit", 10, (int, type(None)), "None: no limit"),)

        def apply(self, ctx, entries):
            pass

    try:
        policy = Policy.from_dict({"rules": [{"match": {"type": "Conv2d"}, "apply": "limited_for_null_test",
                                              "with": {"limit": None}}]})
        assert policy.rules[0].params == {"limit": None} and policy.rules[0].given_params == {"limit": None}
    finally:
        unregister_pass("limited_for_null_test")
    policy = Policy.from_dict({"rules": [{"match": {"type": "Conv2d", "where": {"bias": None}},
                                          "apply": "orth_regularizer"}]})
    assert policy.rules[0].match.where == {"bias": None}


def test_null_parameters_are_left_out_of_the_written_policy():
    policy = Policy.from_yaml("orthofx: 1\nrules:\n  - match: {type: Conv2d}\n    apply: orth_regularizer\n"
                              "    name:\n    optional: null\n    with: {weight: ~, case: RO}\n")
    assert policy.rules[0].given_params == {"case": "RO"}
    assert policy.to_dict()["rules"] == [{"match": {"type": "Conv2d"}, "apply": "orth_regularizer",
                                          "with": {"case": "RO"}}]


@pytest.mark.parametrize("text, token, fragment", [
    ("orthofx:\nrules: [{match: {type: Conv2d}, apply: orth_regularizer}]\n", None,
     "unsupported policy schema version null (key 'orthofx'); this orthofx reads version 1: write 'orthofx: 1'"),
    ("orthofx: 1\nrules: ~\n", "~", "rules must be a list of rules (each with 'match' and 'apply'), found null"),
    ("orthofx: 1\nrules:\n  - null\n", "null", "rules[0] must be a mapping with keys 'match' and 'apply'"),
    ("orthofx: 1\nrules:\n  - {match: null, apply: orth_regularizer}\n", "null",
     "rules[0].match must be a mapping of selectors (type, name, exclude, where, op, feeds, kind), found null"),
    ("orthofx: 1\nrules:\n  - {match: {type: Conv2d}, apply: null}\n", "null",
     "rules[0].apply must name a pass, found null; available: convnorm, "),
], ids=["orthofx", "rules", "rule", "match", "apply"])
def test_a_required_key_that_is_null_is_a_policy_error_naming_it(text, token, fragment):
    with pytest.raises(PolicyError) as info:
        Policy.from_yaml(text)
    err = info.value
    assert err.reason.startswith(fragment)
    # an empty value is marked where the line ends (after 'orthofx:'), a written null where it is written
    assert (err.line, err.column) == (text_position(text, token) if token else (1, len("orthofx:") + 1))


# ----------------------------------------------------------------------------------------------- file.py specs

_MODEL_FILE = textwrap.dedent("""\
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 5)

        def forward(self, x):
            return self.fc(x)

    def build():
        torch.manual_seed(0)
        return Net()
    """)


@pytest.mark.parametrize("definition", ["model = build()", "model = build", "model = Net"])
def test_a_model_file_without_factory_uses_its_model(capsys, tmp_path, monkeypatch, definition):
    # was "unknown model '.../m.py'; ... or give package.module:factory or file.py:factory"
    monkeypatch.setattr(sys, "path", list(sys.path))
    path = tmp_path / "m.py"
    path.write_text(_MODEL_FILE + definition + "\n")
    model = load_model(str(path))
    assert type(model).__name__ == "Net" and model.fc.weight.shape == (5, 3)
    if definition != "model = Net":  # seeded: the same weights as nn.Linear(3, 5) after manual_seed(0)
        torch.manual_seed(0)
        assert torch.equal(model.fc.weight, nn.Linear(3, 5).weight)
    code, out, err = _cli(capsys, "explain", str(path), "--policy", "lorth")
    assert code == 0, err
    assert "Linear(3->5)" in out


def test_a_model_file_without_factory_or_model_says_what_to_write(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    path = tmp_path / "m.py"
    path.write_text(_MODEL_FILE)
    code, out, err = _cli(capsys, "explain", str(path), "--policy", "lorth")
    assert (code, out) == (2, "") and err.count("\n") == 1
    assert f"model file '{path}' is given without ':factory', so its attribute 'model' is used, but it defines " \
           f"none (it defines Net, build); give {path}:Net naming a callable" in err
    assert "nn" not in err.split("it defines ")[1].split(")")[0]  # imported names are not offered


def test_a_model_file_given_alone_is_an_input_transform_must_not_overwrite(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.py").write_text(_MODEL_FILE + "model = build\n")
    code, out, err = _cli(capsys, "transform", "m.py", "--policy", "lorth", "--input-shape", "2,3", "--json", "m.py")
    assert (code, out) == (2, "")
    assert err == "orthofx: error: --json m.py is the model file (MODEL): the output would replace it; choose " \
                  "another path\n"
    assert (tmp_path / "m.py").read_text().startswith("import torch")


def test_a_non_python_file_without_factory_is_not_run(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.txt").write_text("raise SystemExit('ran')\n")
    code, _, err = _cli(capsys, "explain", "m.txt", "--policy", "lorth")
    assert code == 2 and "unknown model 'm.txt'" in err and "file.py (its 'model')" in err


@pytest.mark.parametrize("spec", ["p.py", "p.py:make", "missing.py", "my policy.py"])
def test_a_policy_given_as_python_is_refused_and_not_run(capsys, tmp_path, monkeypatch, spec):
    # p.py was read as YAML ('the top level of a policy must be a mapping ...; found a string'), and
    # p.py:make as YAML text
    monkeypatch.chdir(tmp_path)
    for name in ("p.py", "my policy.py"):
        (tmp_path / name).write_text("open('ran', 'w').close()\nmake = lambda: {'rules': []}\n")
    code, out, err = _cli(capsys, "check", spec)
    assert (code, out) == (2, "") and err.count("\n") == 1
    assert f"{spec!r} names Python code, but a policy is YAML text or a .yaml file" in err
    assert "to_yaml()" in err
    assert not (tmp_path / "ran").exists()
    with pytest.raises(PolicyError, match="names Python code"):
        Policy.load(tmp_path / "p.py")
    assert issubclass(PolicyError, ValueError)
