"""Policy loading and validation: round trips, load() dispatch, presets, and malformed policies with positions."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orthofx.errors import OrthofxError, PolicyError
from orthofx.passes import registry
from orthofx.passes.base import Param, Pass
from orthofx.policy import (
    CANONICAL_OPS,
    OP_ALIASES,
    CaptureConfig,
    Location,
    Match,
    Policy,
    Rule,
    canonical_op,
    match_pattern,
    presets,
)

# ----------------------------------------------------------------------------------------------- test passes


class _SoftPass(Pass):
    name = "tpolicy_soft"
    params = (
        Param("weight", 0.01, (float,), "multiplier", minimum=0.0),
        Param("case", "auto", (str,), "case", choices=("auto", "RO", "CO")),
        Param("probes", 1, (int,), "probes", minimum=1),
        Param("flags", [], (list,), "a list parameter"),
    )
    site_kinds = frozenset({"module"})

    def apply(self, ctx, entries):  # pragma: no cover - never run here
        pass


class _EigPass(Pass):
    name = "tpolicy_eig"
    params = (Param("eps", 1e-5, (float,), "eps", minimum=0.0, exclusive_minimum=True),)
    site_kinds = frozenset({"function"})
    ops = ("linalg.eigh", "linalg.svd", "svd")

    def apply(self, ctx, entries):  # pragma: no cover
        pass


class _BlockPass(Pass):
    name = "tpolicy_block"
    params = (Param("weight", 0.1, (float,), "w", minimum=0.0),)
    site_kinds = frozenset({"block", "module"})

    def apply(self, ctx, entries):  # pragma: no cover
        pass


class _LorthStandIn(Pass):
    """Stand-in for the built-in orth_regularizer when it is not registered (same name and parameters)."""

    name = "orth_regularizer"
    params = (Param("weight", 0.01, (float,), "w", minimum=0.0),
              Param("case", "auto", (str,), "c", choices=("auto", "RO", "CO")))
    site_kinds = frozenset({"module"})

    def apply(self, ctx, entries):  # pragma: no cover
        pass


@pytest.fixture(scope="module", autouse=True)
def test_passes():
    added = [_SoftPass, _EigPass, _BlockPass]
    if "orth_regularizer" not in registry.available_passes():
        added.append(_LorthStandIn)
    for cls in added:
        registry.register_pass(cls)
    yield
    for cls in added:
        registry.unregister_pass(cls.name)


BASIC = """\
orthofx: 1
rules:
  - match: {type: Conv2d}
    apply: tpolicy_soft
"""

FULL = """\
orthofx: 1
description: everything at once
capture:
  mode: fx
  leaf_modules: [MyAttention, blocks.0.attn]
rules:
  - name: soft
    match:
      type: [Conv2d, mypkg.layers.MyConv]
      name: ["layer[34].*", "re:features\\\\.\\\\d+"]
      exclude: fc
      where: {groups: 1, kernel_size: [3, 3], padding_mode: "1e-2"}
    apply: tpolicy_soft
    with: {weight: 1e-2, case: RO, probes: 2, flags: [a, b]}
  - match: {op: [torch.linalg.eigh, svd]}
    apply: tpolicy_eig
    optional: true
  - match: {feeds: eigh}
    apply: tpolicy_soft
    with: {weight: .5}
  - match: {name: "layer1.*", kind: block}
    apply: tpolicy_block
    with: {weight: 1}
"""


# ----------------------------------------------------------------------------------------------- loading


def test_full_policy_content():
    p = Policy.from_yaml(FULL)
    assert p.version == 1 and p.description == "everything at once" and p.source == "<string>"
    assert p.capture == CaptureConfig(mode="fx", leaf_modules=("MyAttention", "blocks.0.attn"))
    soft, eig, feeds, block = p.rules
    assert soft.name == "soft" and soft.index == 0
    assert soft.match.type == ("Conv2d", "mypkg.layers.MyConv")
    assert soft.match.name == ("layer[34].*", r"re:features\.\d+")
    assert soft.match.exclude == ("fc",)
    assert soft.match.where == {"groups": 1, "kernel_size": (3, 3), "padding_mode": "1e-2"}
    assert soft.params == {"weight": 0.01, "case": "RO", "probes": 2, "flags": ["a", "b"]}
    assert isinstance(soft.params["weight"], float)
    assert soft.given_params == {"weight": 0.01, "case": "RO", "probes": 2, "flags": ["a", "b"]}
    assert soft.location == Location("<string>", 7, 5)
    assert eig.name == "tpolicy_eig[1]" and eig.optional and eig.match.op == ("linalg.eigh", "svd")
    assert eig.match.site_kind == "function" and eig.params == {"eps": 1e-5}
    assert feeds.match.feeds == ("linalg.eigh",) and feeds.match.site_kind == "module"
    assert feeds.params["weight"] == 0.5
    assert block.match.kind == "block" and block.params == {"weight": 1.0}
    assert block.given_params == {"weight": 1} and isinstance(block.params["weight"], float)


@pytest.mark.parametrize("text, value", [("1e-2", 0.01), ("1E-3", 0.001), (".5", 0.5), ("1.0e5", 1e5),
                                          ("+2e1", 20.0), ("3", 3.0), ("0.25", 0.25)])
def test_yaml_numbers_become_floats(text, value):
    p = Policy.from_yaml(BASIC + f"    with: {{weight: {text}}}\n")
    assert p.rules[0].params["weight"] == value
    assert isinstance(p.rules[0].params["weight"], float)


def test_round_trip_yaml_and_dict():
    p = Policy.from_yaml(FULL)
    text = p.to_yaml()
    q = Policy.from_yaml(text)
    assert q == p
    assert q.to_yaml() == text
    assert Policy.from_dict(p.to_dict()) == p
    # the string that looks like a number stays a string through the dump
    assert q.rules[0].match.where["padding_mode"] == "1e-2"
    # default rule names are not written out
    assert "tpolicy_eig[1]" not in text
    # source and locations do not take part in equality
    assert q.source == "<string>" and p.rules[0].location != Policy.from_dict(p.to_dict()).rules[0].location


def test_round_trip_minimal_policy_to_dict():
    p = Policy.from_yaml(BASIC)
    assert p.to_dict() == {"orthofx": 1, "rules": [{"match": {"type": "Conv2d"}, "apply": "tpolicy_soft"}]}
    assert p.rules[0].name == "tpolicy_soft[0]"
    assert p.rules[0].params == {"weight": 0.01, "case": "auto", "probes": 1, "flags": []}


def test_from_dict_defaults_version_and_names_source():
    p = Policy.from_dict({"rules": [{"match": {"type": "Linear"}, "apply": "tpolicy_soft"}]})
    assert p.version == 1 and p.source == "<dict>"
    assert p.rules[0].location == Location("<dict>", None, None)
    assert Policy.from_dict(p.to_dict(), source="mine").source == "mine"


def test_from_dict_accepts_tuples_and_scalars():
    p = Policy.from_dict({"orthofx": 1, "rules": ({"match": {"type": ("Conv2d", "Linear"),
                                                               "where": {"kernel_size": (3, 3)}},
                                                     "apply": "tpolicy_soft", "with": {"flags": ("x",)}},)})
    assert p.rules[0].match.type == ("Conv2d", "Linear")
    assert p.rules[0].match.where == {"kernel_size": (3, 3)}
    assert p.rules[0].given_params == {"flags": ["x"]}


def test_load_dispatch(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(BASIC)
    from_path = Policy.load(path)
    assert from_path.source == str(path)
    assert Policy.load(str(path)) == from_path
    assert Policy.from_yaml(path) == from_path and Policy.from_yaml(str(path)) == from_path
    assert Policy.load(BASIC) == from_path and Policy.load(BASIC).source == "<string>"
    d = {"orthofx": 1, "rules": [{"match": {"type": "Conv2d"}, "apply": "tpolicy_soft"}]}
    assert Policy.load(d) == from_path
    p = Policy.load("lorth")
    assert p.source == "<preset:lorth>"
    assert Policy.load(p) is p


def test_load_errors():
    with pytest.raises(PolicyError, match="policy file not found: 'missing.yaml'"):
        Policy.load("missing.yaml")
    with pytest.raises(PolicyError, match="policy file not found"):
        Policy.from_yaml(Path("/nonexistent/p.yaml"))
    with pytest.raises(PolicyError, match="policy file not found"):
        Policy.from_yaml("nope.yml")
    with pytest.raises(PolicyError, match=r"'lorht' is neither a preset nor an existing file \(did you mean 'lorth'\?\)"):
        Policy.load("lorht")
    with pytest.raises(PolicyError, match="unknown preset 'nope'; available presets: .*lorth"):
        Policy.preset("nope")
    with pytest.raises(PolicyError, match="got int"):
        Policy.load(3)
    with pytest.raises(PolicyError, match="must be a mapping"):
        Policy.from_dict([1, 2])  # type: ignore[arg-type]


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BASIC.replace("apply", "aply"))
    with pytest.raises(PolicyError) as info:
        Policy.load(path)
    err = info.value
    assert (err.file, err.line, err.column) == (str(path), 4, 5)
    assert str(err).startswith(f"{path}:4:5: unknown key 'aply' in rules[0]")
    path.write_bytes(b"orthofx: 1\nrules: \xff\xfe\n")
    with pytest.raises(PolicyError, match="not UTF-8"):
        Policy.load(path)


def test_presets():
    listed = presets()
    assert "lorth" in listed
    assert "L_orth" in listed["lorth"] and "\n" not in listed["lorth"]
    p = Policy.preset("lorth")
    assert p.description.splitlines()[0] == listed["lorth"]
    (rule,) = p.rules
    assert rule.apply == "orth_regularizer" and not rule.optional
    assert rule.match.type == ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
                               "Linear") and not rule.match.exclude
    assert rule.params["weight"] == 0.01
    assert Policy.from_yaml(p.to_yaml()) == p


# ----------------------------------------------------------------------------------------------- malformed

R = "orthofx: 1\nrules:\n"

MALFORMED = [
    # (id, text, message fragment, line, column)
    ("yaml-syntax", R + "  - match: {type: Conv2d\n    apply: tpolicy_soft\n",
     "invalid YAML: while parsing a flow mapping", 4, 10),
    ("yaml-tab", R + "\t- match: {type: Conv2d}\n", "spaces, not tabs", 3, 1),
    ("two-documents", BASIC + "---\northofx: 1\n", "expected a single document", 5, 1),
    ("empty", "", "the policy is empty", None, None),
    ("top-level-list", "- match: {type: Conv2d}\n  apply: tpolicy_soft\n",
     "the top level of a policy must be a mapping", 1, 1),
    ("missing-version", "rules:\n  - match: {type: Conv2d}\n    apply: tpolicy_soft\n",
     "missing schema version: add 'orthofx: 1'", 1, 1),
    ("version-2", BASIC.replace("orthofx: 1", "orthofx: 2"), "unsupported policy schema version 2", 1, 10),
    ("version-string", BASIC.replace("orthofx: 1", "orthofx: one"), "unsupported policy schema version 'one'",
     1, 10),
    ("version-key", "version: 1\n" + BASIC[len("orthofx: 1\n"):],
     "unknown key 'version' at the top level; allowed: orthofx, description, capture, rules "
     "(the schema version is given as 'orthofx: 1')", 1, 1),
    ("unknown-top-key", "orthofx: 1\nrule:\n  - match: {type: Conv2d}\n    apply: tpolicy_soft\n",
     "unknown key 'rule' at the top level; allowed: orthofx, description, capture, rules "
     "(did you mean 'rules'?)", 2, 1),
    ("description-type", "orthofx: 1\ndescription: [a]\n" + BASIC[11:], "description must be a string", 2, 14),
    ("capture-key", "orthofx: 1\ncapture: {mode: fx, leaf: [A]}\n" + BASIC[11:],
     "unknown key 'leaf' in capture; allowed: mode, leaf_modules", 2, 21),
    ("capture-mode", "orthofx: 1\ncapture: {mode: trace}\n" + BASIC[11:],
     "capture.mode must be one of auto, fx, export; found a string ('trace')", 2, 17),
    ("capture-leaf-type", "orthofx: 1\ncapture:\n  leaf_modules: [A, 3]\n" + BASIC[11:],
     "capture.leaf_modules[1] must be a string, found an integer (3)", 3, 21),
    ("rules-missing", "orthofx: 1\ndescription: x\n", "missing 'rules'", 1, 1),
    ("rules-empty", "orthofx: 1\nrules: []\n", "rules is empty", 2, 8),
    ("rules-not-list", "orthofx: 1\nrules: {match: {type: Conv2d}, apply: tpolicy_soft}\n",
     "rules must be a list of rules", 2, 8),
    ("rule-not-mapping", R + "  - tpolicy_soft\n", "rules[0] must be a mapping", 3, 5),
    ("rule-unknown-key", BASIC.replace("apply", "aply"),
     "unknown key 'aply' in rules[0]; allowed: name, match, apply, with, optional (did you mean 'apply'?)", 4, 5),
    ("rule-missing-match", R + "  - apply: tpolicy_soft\n", "rules[0] has no 'match'", 3, 5),
    ("rule-missing-apply", R + "  - match: {type: Conv2d}\n", "rules[0] has no 'apply': name the pass", 3, 5),
    ("unknown-pass", BASIC.replace("apply: tpolicy_soft", "apply: tpolicy_sotf"),
     "unknown pass 'tpolicy_sotf' in rules[0].apply; available: ", 4, 12),
    ("unknown-pass-hint", BASIC.replace("apply: tpolicy_soft", "apply: tpolicy_sotf"),
     "(did you mean 'tpolicy_soft'?)", 4, 12),
    ("match-not-mapping", R + "  - match: Conv2d\n    apply: tpolicy_soft\n",
     "rules[0].match must be a mapping of selectors", 3, 12),
    ("match-unknown-key", R + "  - match: {typ: Conv2d}\n    apply: tpolicy_soft\n",
     "unknown key 'typ' in rules[0].match; allowed: type, name, exclude, where, op, feeds, kind "
     "(did you mean 'type'?)", 3, 13),
    ("match-type-not-string", R + "  - match: {type: [Conv2d, 7]}\n    apply: tpolicy_soft\n",
     "rules[0].match.type[1] must be a string, found an integer (7)", 3, 28),
    ("match-type-bad-name", R + "  - match: {type: 'Conv 2d'}\n    apply: tpolicy_soft\n",
     "'Conv 2d' is not a class name or dotted class path", 3, 19),
    ("match-empty-type-list", R + "  - match: {type: []}\n    apply: tpolicy_soft\n",
     "rules[0].match.type is an empty list", 3, 19),
    ("unknown-param", BASIC + "    with: {wieght: 0.1}\n",
     "unknown key 'wieght' in rules[0].with for pass 'tpolicy_soft'; allowed: case, flags, probes, weight "
     "(did you mean 'weight'?)", 5, 12),
    ("param-type", BASIC + "    with: {weight: heavy}\n",
     "rules[0].with.weight: parameter 'weight' must be a number >= 0.0, got 'heavy' (a string)", 5, 20),
    ("param-range", BASIC + "    with: {weight: -1}\n",
     "rules[0].with.weight: parameter 'weight' must be a number >= 0.0, got -1.0", 5, 20),
    ("param-int-type", BASIC + "    with:\n      weight: 0.5\n      probes: 1.5\n",
     "parameter 'probes' must be an integer >= 1, got 1.5", 7, 15),
    ("param-choice", BASIC + "    with: {case: ro}\n", "parameter 'case' must be one of 'auto', 'RO', 'CO'", 5, 18),
    ("param-bool-for-number", BASIC + "    with: {weight: true}\n", "got True (true/false)", 5, 20),
    ("with-not-mapping", BASIC + "    with: 0.1\n", "rules[0].with must be a mapping of parameters", 5, 11),
    ("bad-regex", R + "  - match: {name: 're:layer[1'}\n    apply: tpolicy_soft\n",
     "rules[0].match.name: invalid regular expression 'layer[1'", 3, 19),
    ("empty-regex", R + "  - match: {exclude: ['fc', 're:']}\n    apply: tpolicy_soft\n",
     "rules[0].match.exclude[1]: empty regular expression", 3, 29),
    ("empty-pattern", R + "  - match: {name: ''}\n    apply: tpolicy_soft\n",
     "rules[0].match.name is an empty string", 3, 19),
    ("unknown-op", R + "  - match: {op: linalg.eig}\n    apply: tpolicy_eig\n",
     "rules[0].match.op: unknown op 'linalg.eig'; accepted: linalg.svd, linalg.svdvals, linalg.eigh", 3, 17),
    ("unknown-feeds-op", R + "  - match: {feeds: [eigh, qr]}\n    apply: tpolicy_soft\n",
     "rules[0].match.feeds[1]: unknown op 'qr'", 3, 27),
    ("bad-kind", R + "  - match: {name: a, kind: blok}\n    apply: tpolicy_block\n",
     "rules[0].match.kind must be one of module, block, function; found a string ('blok') "
     "(did you mean 'block'?)", 3, 28),
    ("op-and-feeds", R + "  - match: {op: eigh, feeds: eigh}\n    apply: tpolicy_soft\n",
     "'op' and 'feeds' cannot be combined", 3, 23),
    ("function-needs-op", R + "  - match: {name: x, kind: function}\n    apply: tpolicy_eig\n",
     "kind 'function' needs 'op'", 3, 28),
    ("op-with-kind-module", R + "  - match: {op: eigh, kind: module}\n    apply: tpolicy_eig\n",
     "'op' selects function calls and cannot be used with kind 'module'", 3, 29),
    ("feeds-with-kind-block", R + "  - match: {feeds: eigh, kind: block}\n    apply: tpolicy_block\n",
     "'feeds' selects modules (the layers feeding the calls) and cannot be used with kind 'block'", 3, 32),
    ("type-with-op", R + "  - match: {op: eigh, type: Linear}\n    apply: tpolicy_eig\n",
     "'type' filters modules and cannot be combined with 'op'", 3, 23),
    ("pass-site-kind", R + "  - match: {op: eigh}\n    apply: tpolicy_soft\n",
     "pass 'tpolicy_soft' handles module sites, but rules[0].match selects function sites (it has 'op')", 4, 12),
    ("pass-ops", R + "  - match: {op: [eigh, svdvals]}\n    apply: tpolicy_eig\n",
     "pass 'tpolicy_eig' handles the ops linalg.eigh, linalg.svd, svd, not linalg.svdvals", 3, 17),
    ("where-not-mapping", R + "  - match: {where: groups}\n    apply: tpolicy_soft\n",
     "rules[0].match.where must be a mapping", 3, 20),
    ("where-nested-mapping", R + "  - match: {where: {groups: {a: 1}}}\n    apply: tpolicy_soft\n",
     "rules[0].match.where.groups must be a value or a list of values, found a mapping", 3, 29),
    ("optional-not-bool", BASIC + "    optional: maybe\n",
     "rules[0].optional must be true or false, found a string ('maybe')", 5, 15),
    ("name-not-string", BASIC + "    name: [a]\n", "rules[0].name must be a non-empty string", 5, 11),
    ("duplicate-rule-names", R + "  - name: a\n    match: {type: Conv2d}\n    apply: tpolicy_soft\n"
     "  - name: a\n    match: {type: Linear}\n    apply: tpolicy_soft\n",
     "duplicate rule name 'a' in rules[1]; already used by rules[0] (line 3)", 6, 11),
    ("duplicate-yaml-key", BASIC + "    apply: tpolicy_block\n",
     "duplicate key 'apply' in rules[0] (first given at line 4, column 5)", 5, 5),
    ("duplicate-top-key", BASIC + "orthofx: 1\n", "duplicate key 'orthofx' in the top level", 5, 1),
    ("duplicate-flow-key", R + "  - match: {type: Conv2d, type: Linear}\n    apply: tpolicy_soft\n",
     "duplicate key 'type' in rules[0].match", 3, 27),
    ("python-tag", "orthofx: 1\nrules: !!python/object/apply:os.system ['true']\n",
     "YAML tag '!!python/object/apply:os.system' is not allowed in a policy", 2, 8),
    ("custom-tag", BASIC + "    with: {weight: !expr 2*3}\n", "YAML tag '!expr' is not allowed", 5, 20),
    ("set-tag", BASIC + "    with: !!set {a, b}\n", "YAML tag '!!set' is not allowed", 5, 11),
    ("merge-key", "orthofx: 1\nbase: &b {type: Conv2d}\n", "unknown key 'base' at the top level", 2, 1),
    ("merge-key-in-match", R + "  - match: {<<: {type: Conv2d}}\n    apply: tpolicy_soft\n",
     "YAML merge keys ('<<') are not supported", 3, 13),
    ("complex-key", R + "  - match: {[a]: 1}\n    apply: tpolicy_soft\n", "must be plain names, found a list", 3, 13),
    ("bad-int", BASIC + "    with: {probes: !!int abc}\n", "invalid !!int value 'abc'", 5, 20),
]


@pytest.mark.parametrize("text, fragment, line, column", [case[1:] for case in MALFORMED],
                         ids=[case[0] for case in MALFORMED])
def test_malformed_policies(text, fragment, line, column):
    with pytest.raises(PolicyError) as info:
        Policy.from_yaml(text)
    err = info.value
    assert fragment in err.reason
    assert (err.file, err.line, err.column) == ("<string>", line, column)
    where = ":".join(str(p) for p in ("<string>", line, column) if p is not None)
    assert str(err) == f"{where}: {err.reason}"
    assert isinstance(err, ValueError)


def test_malformed_ids_unique_and_many():
    ids = [case[0] for case in MALFORMED]
    assert len(ids) == len(set(ids)) and len(ids) >= 15


def test_from_dict_errors_name_the_path():
    d = {"rules": [{"match": {"type": "Conv2d"}, "apply": "tpolicy_soft", "with": {"weight": -2}}]}
    with pytest.raises(PolicyError) as info:
        Policy.from_dict(d)
    err = info.value
    assert "rules[0].with.weight" in err.reason and ">= 0.0" in err.reason
    assert (err.file, err.line, err.column) == ("<dict>", None, None)
    assert str(err).startswith("<dict>: rules[0].with.weight: ")

    d = {"rules": [{"match": {"type": "Conv2d"}, "apply": "tpolicy_soft"},
                   {"match": {"type": "Linear"}, "apply": "tpolicy_soft", "with": {"wieght": 1}}]}
    with pytest.raises(PolicyError, match=r"unknown key 'wieght' in rules\[1\]\.with for pass 'tpolicy_soft'"):
        Policy.from_dict(d)
    with pytest.raises(PolicyError, match=r"rules\[0\]\.match\.where\.groups: unsupported value of type object"):
        Policy.from_dict({"rules": [{"match": {"where": {"groups": object()}}, "apply": "tpolicy_soft"}]})
    with pytest.raises(PolicyError, match="unsupported policy schema version 2"):
        Policy.from_dict({"orthofx": 2, "rules": [{"match": {}, "apply": "tpolicy_soft"}]})
    with pytest.raises(PolicyError, match="unsupported policy schema version True"):
        Policy.from_dict({"orthofx": True, "rules": [{"match": {}, "apply": "tpolicy_soft"}]})


def test_python_tags_are_rejected_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    payloads = [
        f"orthofx: 1\nrules: !!python/object/apply:os.system ['touch {marker}']\n",
        f"orthofx: 1\nrules:\n  - match: {{type: Conv2d}}\n    apply: tpolicy_soft\n"
        f"    with: {{weight: !!python/object/apply:os.system ['touch {marker}']}}\n",
        "orthofx: !!python/name:os.system\nrules: []\n",
        f"orthofx: 1\nrules: !!python/object/new:subprocess.Popen [['touch', '{marker}']]\n",
    ]
    for text in payloads:
        with pytest.raises(PolicyError, match="is not allowed in a policy"):
            Policy.from_yaml(text)
        path = tmp_path / "evil.yaml"
        path.write_text(text)
        with pytest.raises(PolicyError, match="is not allowed in a policy"):
            Policy.load(path)
    assert not marker.exists()


def test_alias_bomb_is_rejected_quickly():
    lines = ["orthofx: 1", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        prev = f"*a{i - 1}"
        lines.append(f"a{i}: &a{i} [{', '.join([prev] * 10)}]")
    with pytest.raises(PolicyError, match="too large"):
        Policy.from_yaml("\n".join(lines) + "\n")


def test_policy_shares_no_state_with_input():
    d = {"orthofx": 1, "description": "d",
         "capture": {"leaf_modules": ["A"]},
         "rules": [{"name": "r", "match": {"type": ["Conv2d"], "where": {"kernel_size": [3, 3]}},
                    "apply": "tpolicy_soft", "with": {"weight": 0.5, "flags": ["x"]}}]}
    before = copy.deepcopy(d)
    p = Policy.from_dict(d)
    assert d == before  # the input is not mutated
    snapshot = copy.deepcopy(p)
    d["rules"][0]["with"]["flags"].append("y")
    d["rules"][0]["with"]["weight"] = 9
    d["rules"][0]["match"]["where"]["kernel_size"].append(5)
    d["rules"].append({"match": {}, "apply": "tpolicy_soft"})
    d["capture"]["leaf_modules"].append("B")
    assert p == snapshot
    p.rules[0].given_params["flags"].append("z")
    p.rules[0].params["flags"].append("z")
    assert d["rules"][0]["with"]["flags"] == ["x", "y"]
    # params defaults are not shared with the pass's Param defaults either
    q = Policy.from_dict({"rules": [{"match": {}, "apply": "tpolicy_soft"}]})
    q.rules[0].params["flags"].append("oops")
    assert _SoftPass.param_spec()["flags"].default == []
    # to_dict hands out fresh data
    out = snapshot.to_dict()
    out["rules"][0]["with"]["flags"].append("w")
    assert snapshot.rules[0].given_params["flags"] == ["x"]


def test_policy_pickles_and_copies():
    p = Policy.from_yaml(FULL)
    assert pickle.loads(pickle.dumps(p)) == p
    assert copy.deepcopy(p) == p


def test_rule_and_match_helpers():
    p = Policy.from_yaml(FULL)
    assert p.rules[0].pass_class is _SoftPass
    m = p.rules[0].match
    assert m.matches_name("layer3.0.conv1") and m.matches_name("features.12")
    assert not m.matches_name("features.x") and not m.matches_name("fc") and not m.matches_name("layer2.conv")
    assert Match(exclude=("fc",)).matches_name("conv") and not Match(exclude=("re:f.",)).matches_name("fc")
    assert match_pattern("re:a|b", "b") and not match_pattern("re:a|b", "ab")
    assert match_pattern("layer?", "layer1") and not match_pattern("Layer?", "layer1")
    assert Rule(name="x", match=Match(), apply="tpolicy_soft").location == Location()


def test_type_accepts_dotted_paths_of_local_classes():
    class Local:
        pass

    dotted = f"{Local.__module__}.{Local.__qualname__}"
    assert "<locals>" in dotted
    p = Policy.from_dict({"rules": [{"match": {"type": dotted}, "apply": "tpolicy_soft"}]})
    assert p.rules[0].match.type == (dotted,)
    with pytest.raises(PolicyError, match="is not a class name or dotted class path"):
        Policy.from_dict({"rules": [{"match": {"type": "a.<lokals>.B"}, "apply": "tpolicy_soft"}]})


def test_op_aliases():
    for op in CANONICAL_OPS:
        assert canonical_op(op) == op and canonical_op("torch." + op) == op
    assert canonical_op("eigh") == canonical_op("symeig") == canonical_op("torch.symeig") == "linalg.eigh"
    assert canonical_op("svdvals") == "linalg.svdvals" and canonical_op("eigvalsh") == "linalg.eigvalsh"
    assert canonical_op("torch.svd") == "svd"
    assert set(OP_ALIASES.values()) == set(CANONICAL_OPS)
    with pytest.raises(ValueError, match=r"unknown op 'linalg.eigg'.*did you mean 'linalg.eigh'"):
        canonical_op("linalg.eigg")


# ----------------------------------------------------------------------------------------------- properties

_name = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
_pattern = st.one_of(st.from_regex(r"[a-z0-9_.*?]{1,10}", fullmatch=True),
                     st.from_regex(r"re:[a-z0-9_.]{1,8}", fullmatch=True))
_scalar = st.one_of(st.integers(-5, 5), st.floats(-1e6, 1e6, allow_nan=False), st.booleans(), st.none(),
                    st.text(min_size=0, max_size=6))


@st.composite
def _rules(draw):
    if draw(st.booleans()):
        match = {"op": draw(st.lists(st.sampled_from(["eigh", "linalg.svd", "torch.linalg.eigh"]),
                                     min_size=1, max_size=2))}
        apply, params = "tpolicy_eig", {"eps": draw(st.floats(1e-9, 1.0))}
    else:
        match = {}
        if draw(st.booleans()):
            match["type"] = draw(st.lists(_name, min_size=1, max_size=3))
        if draw(st.booleans()):
            match["name"] = draw(st.lists(_pattern, min_size=1, max_size=2))
        if draw(st.booleans()):
            match["exclude"] = draw(st.lists(_pattern, max_size=2))
        if draw(st.booleans()):
            match["where"] = draw(st.dictionaries(_name, st.one_of(_scalar, st.lists(_scalar, max_size=3)),
                                                  max_size=2))
        apply = "tpolicy_soft"
        params = draw(st.fixed_dictionaries({}, optional={
            "weight": st.floats(0, 10), "case": st.sampled_from(["auto", "RO", "CO"]),
            "probes": st.integers(1, 9), "flags": st.lists(st.text(max_size=4), max_size=2)}))
    rule = {"match": match, "apply": apply, "with": params}
    if draw(st.booleans()):
        rule["optional"] = True
    return rule


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rules=st.lists(_rules(), min_size=1, max_size=3), description=st.text(max_size=20))
def test_round_trip_property(rules, description):
    p = Policy.from_dict({"description": description, "rules": rules})
    assert Policy.from_yaml(p.to_yaml()) == p
    assert Policy.from_dict(p.to_dict()) == p


# ----------------------------------------------------------------------------------------------- audit: edge inputs


def test_load_preset_name_with_surrounding_whitespace():
    # a preset name read from a file or an environment variable often carries a newline
    assert Policy.load(" lorth\n") == Policy.preset("lorth")


def test_load_missing_yaml_path_with_a_space_says_not_found(tmp_path):
    missing = tmp_path / "my policies" / "p.yaml"
    with pytest.raises(PolicyError, match="policy file not found") as info:
        Policy.load(str(missing))
    assert info.value.file == str(missing)


def test_directory_is_not_a_policy_file(tmp_path):
    for call in (Policy.load, Policy.from_yaml):
        for arg in (tmp_path, str(tmp_path)):
            with pytest.raises(PolicyError, match="is a directory"):
                call(arg)


def _with(value):
    return {"rules": [{"match": {"type": "Conv2d"}, "apply": "tpolicy_soft", "with": {"weight": value}}]}


@pytest.mark.parametrize("build, path", [
    (lambda big: {"orthofx": big, "rules": [{"match": {}, "apply": "tpolicy_soft"}]}, "orthofx"),
    (lambda big: {"rules": [{"match": {"where": {"groups": big}}, "apply": "tpolicy_soft"}]},
     "rules[0].match.where.groups"),
    (lambda big: _with(big), "rules[0].with.weight"),
    (lambda big: {"rules": [{"match": {}, "apply": "tpolicy_soft", "with": {"probes": -big}}]},
     "rules[0].with.probes"),
])
def test_huge_integers_in_a_dict_are_policy_errors(build, path):
    big = 10 ** 5000  # str() of it raises ValueError in Python >= 3.11
    with pytest.raises(PolicyError) as info:
        Policy.from_dict(build(big))
    assert path in info.value.reason and "too large" in info.value.reason
    assert len(str(info.value)) < 400


def test_huge_integer_in_yaml_is_a_short_policy_error():
    for digits in (400, 5000):
        text = BASIC + f"    with: {{probes: {'9' * digits}}}\n"
        with pytest.raises(PolicyError) as info:
            Policy.from_yaml(text)
        err = info.value
        assert (err.line, err.column) == (5, 20) and "too large" in err.reason and len(err.reason) < 300


def test_integers_that_fit_a_float_still_load_and_round_trip():
    p = Policy.from_dict({"rules": [{"match": {"where": {"groups": 2 ** 62}}, "apply": "tpolicy_soft",
                                     "with": {"weight": 10 ** 30}}]})
    assert p.rules[0].params["weight"] == 1e30 and p.rules[0].match.where == {"groups": 2 ** 62}
    assert Policy.from_yaml(p.to_yaml()) == p


@pytest.mark.parametrize("value", [float("nan"), [3, float("nan")]])
def test_nan_in_where_is_rejected(value):
    # NaN equals nothing: the filter could never match, and the policy would not survive a YAML round trip
    with pytest.raises(PolicyError, match=r"rules\[0\]\.match\.where\.kernel_size.*NaN"):
        Policy.from_dict({"rules": [{"match": {"where": {"kernel_size": value}}, "apply": "tpolicy_soft"}]})
    text = R + "  - match: {where: {kernel_size: .nan}}\n    apply: tpolicy_soft\n"
    with pytest.raises(PolicyError, match="NaN") as info:
        Policy.from_yaml(text)
    assert (info.value.line, info.value.column) == (3, 34)


def test_infinite_where_value_round_trips():
    p = Policy.from_dict({"rules": [{"match": {"where": {"eps": float("inf")}}, "apply": "tpolicy_soft"}]})
    assert Policy.from_yaml(p.to_yaml()) == p


@pytest.mark.parametrize("name", sorted(presets()))
def test_every_preset_validates_and_round_trips(name):
    p = Policy.preset(name)
    assert p.rules and p.source == f"<preset:{name}>"
    assert Policy.from_yaml(p.to_yaml()) == p and Policy.from_dict(p.to_dict()) == p
    assert Policy.load(name) == p and Policy.load(p.to_dict()) == p


def test_presets_cover_3d_and_transposed_convs():
    """lorth puts L_orth on Conv3d and ConvTranspose layers; orthogonal makes all of them hard orthogonal layers
    (no penalty left); isometric gives the Conv3d a delta-orthogonal kernel."""
    import orthofx
    import torch
    from torch import nn

    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.Flatten(1, 2), nn.Conv2d(16, 16, 3, padding=1),
                          nn.ConvTranspose2d(16, 3, 2, stride=2))
    x = torch.randn(1, 2, 4, 4, 4)
    for preset in ("lorth", "orthogonal"):
        terms = orthofx.penalty_terms(orthofx.transform(model, preset, example_inputs=(x,)))
        expected = {"0", "2", "3"} if preset == "lorth" else set()  # orthogonal: every layer is hard
        assert {key.split("/")[1] for key in terms} == expected, preset
        assert all(float(value) > 0 for value in terms.values())
    gm = orthofx.transform(model, "isometric", example_inputs=(x,))
    change = [c for c in orthofx.manifest_of(gm).changes if c.site == "0"][0]
    assert "delta-orthogonal" in change.what and change.after["lorth"] < 1e-10


def test_get_pass_of_an_unknown_name_raises_an_orthofx_error_that_is_still_a_key_error():
    from orthofx.passes import UnknownPassError, get_pass
    for name in ("orthogonal_cnov", ["not", "hashable"]):
        with pytest.raises(UnknownPassError) as caught:
            get_pass(name)
        assert isinstance(caught.value, OrthofxError) and isinstance(caught.value, KeyError)
        text = str(caught.value)
        assert text.startswith(f"unknown pass {name!r}; available: ") and "orthogonal_conv" in text
        assert "register_pass" in text
