"""Session 30: one place each for the policy's Python refusal, its null handling and the reading of MODEL; alias
notes on planning errors about a rule; a weight tied across two passes that hook it.

1. A policy named as Python code was refused by four separate checks (one of them by suffix only). One helper
   refuses it now at every entry point with one message. Before, ``Policy.from_yaml('my policy.py ')`` (an existing
   file, given with a trailing space, as ``Policy.load`` finds it) was read as YAML text, and
   ``Policy.load(Path(' p.py '))`` / ``Path('my policy.py ')`` said "policy file not found".
2. null as "not given" is decided in one step (``_drop_nulls``); checked per position against the same policy with
   the key left out and against the documented defaults (``Param.default``, the dataclass defaults).
3. ``load_model`` and ``transform``'s check of the files it must not overwrite each parsed MODEL; one parser
   (``ModelSpec``) now. Checked against the file system: the file the model was built from (``__file__`` recorded
   by the factory) is the file the check protects.
4. Planning errors about a rule whose match (or whole mapping) came through a YAML alias pointed at the alias's
   rule with no word of the anchor, or at the anchor with no word of the alias; they now place it as the policy's
   own errors do. Positions are found in the policy text (str.index), not read back from orthofx.
5. One nn.Parameter reached through two layers, under ``riemannian`` at one and ``pre_svd`` (NOG / OLR) at the
   other, got both kinds of optimizer hooks: the step depended on the order of the rules (measured: the weights after
   one SGD step differ by 0.06 between the two orders). Planning refuses it now.
"""

import argparse
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import orthofx
from orthofx import models
from orthofx.cli import DEFAULT_MODEL_ATTRIBUTE, ModelSpec, _input_files, load_model, main
from orthofx.errors import PlanError, PolicyError
from orthofx.passes import Pass, register_pass, registry, unregister_pass
from orthofx.passes.base import Param
from orthofx.policy import CaptureConfig, Policy, _drop_nulls
from references import nested_replaced, text_position

pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------------------------- 1. Python policies

_REFUSAL = ("names Python code, but a policy is YAML text or a .yaml file (or, in Python, a dict or a Policy), never "
            "code orthofx runs; write the policy out as YAML and give that file (in Python: "
            "Path('policy.yaml').write_text(orthofx.Policy.load(d).to_yaml()) for a dict or Policy d), or pass the "
            "dict or Policy itself to orthofx.transform")

_SMALL = nn.Sequential(nn.Linear(3, 3))

_API = {
    "Policy.load(str)": lambda spec: Policy.load(spec),
    "Policy.load(Path)": lambda spec: Policy.load(Path(spec)),
    "Policy.from_yaml(str)": lambda spec: Policy.from_yaml(spec),
    "Policy.from_yaml(Path)": lambda spec: Policy.from_yaml(Path(spec)),
    "transform": lambda spec: orthofx.transform(_SMALL, spec),
    "explain": lambda spec: orthofx.explain(_SMALL, spec),
}

_CLI = {
    "check": lambda spec: ("check", spec),
    "explain": lambda spec: ("explain", "small_cnn", "--policy", spec),
    "transform": lambda spec: ("transform", "small_cnn", "--policy", spec),
    "demo": lambda spec: ("demo", "--steps", "1", "--policy", spec),
}

# spec as given -> (the name the message quotes, the file it names)
_SPECS = {
    "p.py": ("p.py", "p.py"),
    "p.py:make": ("p.py:make", "p.py"),
    " p.py ": ("p.py", "p.py"),
    "missing.py": ("missing.py", "missing.py"),
    "my policy.py": ("my policy.py", "my policy.py"),
    "my policy.py ": ("my policy.py", "my policy.py"),  # from_yaml read this as YAML text
}


@pytest.fixture
def python_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("p.py", "my policy.py"):
        (tmp_path / name).write_text("open('ran', 'w').close()\nmake = lambda: {'rules': []}\n")
    yield tmp_path
    assert not (tmp_path / "ran").exists()  # nothing was run


@pytest.mark.parametrize("spec", list(_SPECS), ids=list(_SPECS))
@pytest.mark.parametrize("entry", list(_API), ids=list(_API))
def test_every_api_entry_point_refuses_a_python_policy_with_the_one_message(python_files, entry, spec):
    shown, file = _SPECS[spec]
    with pytest.raises(PolicyError) as info:
        _API[entry](spec)
    assert (info.value.file, info.value.line, info.value.column) == (file, None, None)
    assert str(info.value) == f"{file}: {shown!r} {_REFUSAL}"


@pytest.mark.parametrize("spec", list(_SPECS), ids=list(_SPECS))
@pytest.mark.parametrize("command", list(_CLI), ids=list(_CLI))
def test_every_command_refuses_a_python_policy_with_the_one_message(python_files, capsys, command, spec):
    shown, file = _SPECS[spec]
    code, out, err = _cli(capsys, *_CLI[command](spec))
    assert code == 2 and "== " not in out  # refused before the first heading (demo) or any table
    assert err == f"orthofx: error: {file}: {shown!r} {_REFUSAL}\n"


def test_yaml_files_and_text_that_mention_python_are_still_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = ("orthofx: 1\ndescription: made by make_policy.py\n"
            "rules: [{match: {type: Linear}, apply: orth_regularizer}]\n")
    (tmp_path / "policy.py.yaml").write_text(text)
    for given in ("policy.py.yaml", Path("policy.py.yaml"), text):
        assert Policy.load(given).description == "made by make_policy.py"


# ----------------------------------------------------------------------------------------------- 2. null

_FULL = {"orthofx": 1, "description": "d", "capture": {"mode": "fx", "leaf_modules": ["X"]},
         "rules": [{"name": "r", "match": {"type": "Conv2d", "name": "c*", "exclude": ["fc"], "where": {"groups": 1},
                                           "kind": "module"},
                    "apply": "orth_regularizer", "with": {"weight": 0.1, "case": "RO"}, "optional": True}]}
_FEEDS = {"rules": [{"match": {"feeds": "linalg.eigh", "op": None}, "apply": "pre_svd"}]}

# (position, path, what the policy holds with the key left out: the documented default)
_POSITIONS = [
    ("top-level key", ("orthofx",), lambda p: p.version == 1),
    ("top-level key", ("description",), lambda p: p.description == ""),
    ("top-level key", ("capture",), lambda p: p.capture == CaptureConfig(mode="auto", leaf_modules=())),
    ("capture key", ("capture", "mode"), lambda p: p.capture.mode == "auto"),
    ("capture key", ("capture", "leaf_modules"), lambda p: p.capture.leaf_modules == ()),
    ("rule key", ("rules", 0, "name"), lambda p: p.rules[0].name == "orth_regularizer[0]"),
    ("rule key", ("rules", 0, "with"), lambda p: p.rules[0].params == {"weight": 0.01, "case": "auto", "every": 1}),
    ("rule key", ("rules", 0, "optional"), lambda p: p.rules[0].optional is False),
    ("match key", ("rules", 0, "match", "name"), lambda p: p.rules[0].match.name == ()),
    ("match key", ("rules", 0, "match", "exclude"), lambda p: p.rules[0].match.exclude == ()),
    ("match key", ("rules", 0, "match", "where"), lambda p: p.rules[0].match.where == {}),
    ("match key", ("rules", 0, "match", "kind"), lambda p: p.rules[0].match.kind is None),
    ("pass parameter", ("rules", 0, "with", "weight"), lambda p: p.rules[0].params["weight"] == 0.01),
    ("pass parameter", ("rules", 0, "with", "case"), lambda p: p.rules[0].params["case"] == "auto"),
]


@pytest.mark.parametrize("position, path, holds_default", _POSITIONS,
                         ids=[f"{pos}:{'.'.join(map(str, path))}" for pos, path, _ in _POSITIONS])
def test_a_null_in_each_position_is_the_key_left_out(position, path, holds_default):
    given_null, left_out = nested_replaced(_FULL, path), nested_replaced(_FULL, path, drop=True)
    policy = Policy.from_dict(given_null)
    assert policy == Policy.from_dict(left_out) and holds_default(policy)
    assert given_null == nested_replaced(_FULL, path)  # the caller's dict is not changed
    if path != ("orthofx",):  # YAML: the same, with null written as '~'
        text = Policy.from_dict(left_out).to_yaml()
        assert Policy.from_yaml(_yaml_with_null(given_null, path)) == Policy.from_yaml(text)


def _yaml_with_null(data: dict, path: tuple) -> str:
    return yaml.safe_dump(data, sort_keys=False).replace(f"{path[-1]}: null", f"{path[-1]}: ~")


def test_a_null_where_null_is_a_value_stays_and_a_required_null_is_refused():
    @register_pass
    class Limited(Pass):
        name = "limited_for_null_test_s30"
        params = (Param("limit", 10, (int, type(None)), "None: no limit"), Param("scale", 2.0, (float,), "a scale"))

        def apply(self, ctx, entries):
            pass

    try:
        raw = {"rules": [{"match": {"type": "Conv2d", "where": {"bias": None}}, "apply": Limited.name,
                          "with": {"limit": None, "scale": None}}]}
        rule = Policy.from_dict(raw).rules[0]
        assert rule.params == {"limit": None, "scale": 2.0} and rule.given_params == {"limit": None}
        assert rule.match.where == {"bias": None}
        assert _drop_nulls(raw, require_version=False)["rules"][0]["with"] == {"limit": None}
    finally:
        unregister_pass(Limited.name)
    for path, fragment in [(("rules",), "rules must be a list of rules"),
                           (("rules", 0, "match"), "rules[0].match must be a mapping of selectors"),
                           (("rules", 0, "apply"), "rules[0].apply must name a pass, found null")]:
        with pytest.raises(PolicyError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            Policy.from_dict(nested_replaced(_FULL, path))
    with pytest.raises(PolicyError, match="unsupported policy schema version null"):
        Policy.from_yaml("orthofx: ~\nrules: [{match: {type: Conv2d}, apply: orth_regularizer}]\n")
    # an unknown key given as null is still an unknown key
    with pytest.raises(PolicyError, match="unknown key 'wieght' in rules\\[0\\].with"):
        Policy.from_dict(nested_replaced(_FULL, ("rules", 0, "with", "wieght")))
    assert Policy.from_dict(_FEEDS).rules[0].match.feeds == ("linalg.eigh",)


@pytest.mark.parametrize("pass_name", sorted(registry.available_passes()))
def test_a_null_parameter_of_each_pass_is_its_declared_default(pass_name):
    pass_cls = registry.available_passes()[pass_name]
    if "function" in pass_cls.site_kinds:
        rule = {"match": {"op": pass_cls.ops[0]}, "apply": pass_name}
    else:
        rule = {"match": {"type": "Conv2d"} if "module" in pass_cls.site_kinds else {"kind": "block"},
                "apply": pass_name}
    nulls = {p.name: None for p in pass_cls.params}
    params = Policy.from_dict({"rules": [{**rule, "with": nulls}]}).rules[0].params
    assert params == {p.name: p.default for p in pass_cls.params}


# ----------------------------------------------------------------------------------------------- 3. MODEL specs

_MODEL_SOURCE = textwrap.dedent("""\
    import torch
    from torch import nn

    def _made(factory):
        net = nn.Sequential(nn.Linear(3, 4))
        net.origin, net.factory = __file__, factory
        return net

    def build():
        return _made("build")

    def model():
        return _made("model")
    """)


@pytest.fixture
def model_files(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nets").mkdir()
    (tmp_path / "nets" / "m.py").write_text(_MODEL_SOURCE)
    (tmp_path / "nets" / "m.txt").write_text(_MODEL_SOURCE)
    (tmp_path / "s30_model_module.py").write_text(_MODEL_SOURCE)
    sys.path.insert(0, str(tmp_path))
    yield tmp_path
    sys.modules.pop("s30_model_module", None)


# spec -> (built-in, file read (relative to tmp_path) or None, factory used)
_MODEL_SPECS = {
    "small_cnn": (True, None, None),
    "nets/m.py:build": (False, "nets/m.py", "build"),
    "nets/m.py": (False, "nets/m.py", DEFAULT_MODEL_ATTRIBUTE),
    "nets/m.txt:build": (False, "nets/m.txt", "build"),
    "s30_model_module:build": (False, None, "build"),
    "s30_model_module:model": (False, None, "model"),
}


@pytest.mark.parametrize("spec", list(_MODEL_SPECS), ids=list(_MODEL_SPECS))
def test_load_model_and_the_output_check_read_model_specs_alike(model_files, spec):
    builtin, file, factory = _MODEL_SPECS[spec]
    parsed = ModelSpec.parse(spec)
    assert (parsed.builtin, parsed.factory) == (builtin, factory)
    assert parsed.is_file == (file is not None)
    protected = dict((what, path) for what, path in _input_files(argparse.Namespace(policy="lorth", model=spec)))
    model = load_model(spec)
    if builtin:
        assert type(model) is type(models.get(spec)) and "the model file (MODEL)" not in protected
        return
    assert model.factory == factory
    if file is None:  # imported as a module: no file named on the command line
        assert "the model file (MODEL)" not in protected
        assert os.path.samefile(model.origin, model_files / "s30_model_module.py")
    else:  # the file transform protects is the file the model came from
        assert os.path.samefile(protected["the model file (MODEL)"], model_files / file)
        assert os.path.samefile(model.origin, model_files / file)


def test_model_spec_forms_that_load_nothing_agree_too(model_files):
    for spec in ("nets/gone.py", "nets/gone.py:build", "nets:build"):
        parsed = ModelSpec.parse(spec)
        assert _input_files(argparse.Namespace(policy="lorth", model=spec)) == []
        with pytest.raises(orthofx.OrthofxError):
            load_model(spec)
        assert parsed.is_file == spec.startswith("nets/gone.py")


# ----------------------------------------------------------------------------------------------- 4. alias notes

def test_a_rule_whose_match_is_an_alias_is_placed_at_the_anchor_with_the_alias(tmp_path):
    text = textwrap.dedent("""\
        orthofx: 1
        rules:
          - match: &m {type: Conv3d}
            apply: orth_regularizer
            optional: true
          - match: *m
            apply: riemannian
        """)
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(PlanError) as info:
        orthofx.explain(nn.Sequential(nn.Linear(3, 3)), path)
    (line, column), (alias_line, alias_column) = text_position(text, "&m"), text_position(text, "*m")
    assert str(info.value).startswith(
        f"rule 'riemannian[1]' ({path}:{line}:{column}, used through the alias *m at line {alias_line}, column "
        f"{alias_column}) matched no module site; the graph's module sites: Linear x1.")


def test_a_rule_used_through_an_alias_names_the_alias_in_planning_errors(tmp_path):
    text = textwrap.dedent("""\
        orthofx: 1
        rules:
          - &r
            match: {type: Conv3d}
            apply: orth_regularizer
          - *r
        """)
    path = tmp_path / "p.yaml"
    path.write_text(text)
    policy = Policy.from_yaml(path)
    # PyYAML marks an anchored node at its anchor
    (line, column), (alias_line, alias_column) = text_position(text, "&r"), text_position(text, "*r")
    assert (policy.rules[1].location.line, policy.rules[1].location.column) == (line, column)
    assert policy.rules[1].location.aliases == (("r", alias_line, alias_column),)
    # the anchored rule itself, planned first, has no alias to name
    with pytest.raises(PlanError, match=rf"^rule 'orth_regularizer\[0\]' \({path}:{line}:{column}\) matched no"):
        orthofx.explain(nn.Sequential(nn.Linear(3, 3)), policy)
    alone = Policy(rules=[policy.rules[1]], source=policy.source)
    with pytest.raises(PlanError) as info:
        orthofx.explain(nn.Sequential(nn.Linear(3, 3)), alone)
    assert str(info.value).startswith(f"rule 'orth_regularizer[1]' ({path}:{line}:{column}, used through the alias "
                                      f"*r at line {alias_line}, column {alias_column}) matched no module site")
    # a where value that cannot be compared: the same place
    path.write_text(text.replace("{type: Conv3d}", "{type: Linear, where: {weight: 1}}"))
    with pytest.raises(PlanError) as info:
        orthofx.explain(nn.Sequential(nn.Linear(3, 3)), Policy(rules=[Policy.from_yaml(path).rules[1]]))
    assert str(info.value).startswith(f"rule 'orth_regularizer[1]' ({path}:{line}:{column}, used through the alias "
                                      f"*r at line {alias_line}, column {alias_column}): match.where")


def test_rules_without_aliases_keep_their_place_without_a_note(tmp_path):
    text = "orthofx: 1\nrules:\n  - match: {type: Conv3d}\n    apply: orth_regularizer\n"
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(PlanError) as info:
        orthofx.explain(nn.Sequential(nn.Linear(3, 3)), path)
    assert str(info.value).startswith(f"rule 'orth_regularizer[0]' ({path}:3:5) matched no module site")
    assert "used through" not in str(info.value)


# ----------------------------------------------------------------------------------------------- 5. tied weights

class _Tied(nn.Module):
    """Two Linears sharing one square weight; only ``b`` feeds an eigh (pre_svd's site)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        h, g = self.a(x), self.b(x)
        return h.sum() + torch.linalg.eigh(g.T @ g + 1e-3 * torch.eye(4))[0].sum()


_RIE = {"name": "rie", "match": {"name": "a"}, "apply": "riemannian"}
_NOG = {"name": "nog", "match": {"feeds": "linalg.eigh"}, "apply": "pre_svd"}


@pytest.mark.parametrize("order", ["riemannian first", "pre_svd first"])
@pytest.mark.parametrize("hooks", [{}, {"nog": False, "olr": True}])
def test_a_weight_tied_across_riemannian_and_pre_svd_hooks_is_refused(order, hooks):
    nog = {**_NOG, "with": hooks} if hooks else _NOG
    rules = [_RIE, nog] if order == "riemannian first" else [nog, _RIE]
    x = torch.randn(8, 4)
    with pytest.raises(PlanError) as from_explain:
        orthofx.explain(_Tied(), {"rules": rules}, example_inputs=(x,))
    message = str(from_explain.value)
    first, second = (("rie", "riemannian", "a"), ("nog", "pre_svd", "b")) if order == "riemannian first" else \
        (("nog", "pre_svd", "b"), ("rie", "riemannian", "a"))
    assert message.startswith(f"'{first[2]}' and '{second[2]}' are one weight (the same nn.Parameter")
    for rule, pass_name, site in (first, second):
        assert f"rule '{rule}' applies {pass_name} at '{site}'" in message
    assert ("OLR" if hooks else "NOG") in message and "Riemannian update, polar retraction" in message
    assert "match.exclude" in message and "untie the weights" in message
    model = _Tied()
    before = model.a.weight.detach().clone()
    with pytest.raises(PlanError):
        orthofx.transform(model, {"rules": rules}, example_inputs=(x,), inplace=True)
    assert torch.equal(model.a.weight, before)  # refused before riemannian projected the weight


def test_the_tied_check_names_yaml_places():
    text = textwrap.dedent("""\
        orthofx: 1
        rules:
          - {name: rie, match: {name: a}, apply: riemannian}
          - {name: nog, match: {feeds: linalg.eigh}, apply: pre_svd}
        """)
    with pytest.raises(PlanError) as info:
        orthofx.explain(_Tied(), text, example_inputs=(torch.randn(8, 4),))
    assert "rule 'rie' (<string>:3:5) applies riemannian at 'a'" in str(info.value)
    assert "rule 'nog' (<string>:4:5) applies pre_svd at 'b'" in str(info.value)


@pytest.mark.parametrize("rules", [
    [_RIE, {**_NOG, "with": {"nog": False, "weight": "lorth"}}],          # pre_svd without hooks
    [{**_RIE, "with": {"free": "first"}}, _NOG],                           # riemannian leaves 'a' free
    [{**_RIE, "match": {"name": "a", "exclude": ["a"]}, "optional": True}, _NOG],  # the advised fix
], ids=["no-nog-olr", "riemannian-free", "excluded"])
def test_a_tied_weight_with_one_hooking_pass_is_planned(rules):
    x = torch.randn(8, 4)
    gm = orthofx.transform(_Tied(), {"rules": rules}, example_inputs=(x,))
    hooks = orthofx.manifest_of(gm).optimizer_hooks
    assert len({type(hook).__name__ for hook in hooks} & {"StiefelHook", "NearestOrthogonalGradient"}) <= 1


def test_an_untied_pair_under_both_passes_is_planned():
    model = _Tied()
    model.b.weight = nn.Parameter(model.a.weight.detach().clone())
    gm = orthofx.transform(model, {"rules": [_RIE, _NOG]}, example_inputs=(torch.randn(8, 4),))
    kinds = sorted(type(hook).__name__ for hook in orthofx.manifest_of(gm).optimizer_hooks)
    assert kinds == ["NearestOrthogonalGradient", "StiefelHook"]
