"""Session 36: an adversarial review of policy loading, planning and the command line as a user who makes mistakes.

1. A parameter given to the wrong pass (``on_impossible`` under ``orth_regularizer``) was "unknown key ... allowed:
   case, every, weight" with no word of the pass that takes it; the error now names it.
2. A pass parameter refused for a likely slip said only what it got: a number or true/false written in quotes (a
   string), an integer parameter given ``1e3`` (YAML reads a float), a choice in another case (``method: Taylor``).
   The error now says the fix.
3. A key given twice, the second time through an alias (``*k : ...``), was placed at the anchor, i.e. at the first
   key, and said "first given" there too; it is placed at the alias now.
4. A no-break space (U+00A0, pasted from a web page) in an indentation gave PyYAML's "expected <block end>, but found
   '<block mapping start>'" on the next line, with nothing visible to fix; the error now names the character and
   its place.
5. A rule that matched nothing because its ``match.type`` was misspelt (``conv2d``, ``Linaer``) got the graph's
   types but no suggestion, though orthofx suggests the class in the warning it gives for a rule that matches
   elsewhere; the PlanError (explain's and transform's alike) now carries it. A slip in case only is matched in
   any case first: the warning suggested ``Bilinear`` for ``linear`` (difflib ranks it above ``Linear``).
6. The command line printed orthofx's warnings in Python's form: orthofx's own file and line, then that line of its
   source (``gm = transform(model, args.policy, ...)``). They are one line now, ``orthofx: warning: ...``, like its
   errors (``--debug`` keeps Python's form).
8. A ``feeds:`` rule that matched nothing listed the graph's module types, which cannot show why: the graph calls
   none of its ops (``feeds: svd`` on a model that calls ``linalg.eigh``), no conv/linear layer feeds them, or its
   other selectors left out the layers that do. The error now says which.
9. YAML text given on the command line with ``\\n`` for line breaks (``--policy 'orthofx: 1\\nrules: ...'``: the
   shell passes a backslash and an n) failed with PyYAML's "mapping values are not allowed here"; the error now
   says what happened and the fix.
10. ``orthofx check -`` / ``--policy -`` (the Unix convention for standard input) said "'-' is neither a preset
    nor an existing file", as if a file named '-' were missing; it now says how standard input is given
    (``/dev/stdin``, or a process substitution). A file named '-' is still read.
11. A key one level of indentation off (``weight:`` beside ``apply:``, ``apply:`` inside ``match:``, ``mode:`` at
    the top level, ``optional:`` inside ``with:``) was "unknown key" with the closest spelling of the level it was
    found at (``weight`` -> "did you mean 'with'?"), or "rules[0] has no 'apply'" for an apply written inside the
    match; the error now says where the key belongs.
7. The warning for a regular expression that a later Python may read otherwise (``re:[[a]``) came from ``re``'s
   FutureWarning, which ``re`` gives only when it parses the pattern, not when its cache holds it: a policy loaded a
   second time in one process (a notebook, a test run) passed without it.
12. Two of 11's and 2's hints were false. ``kind`` is a selector and a parameter of jacobian_isometry (``kind:
    full|partial|offdiag``): beside ``apply: jacobian_isometry`` it was called a selector only, so the user's
    ``kind: partial`` moved under match: was refused there; the hint now names both places (and ``match: {kind:
    partial}`` names the parameter). A quoted number an integer parameter refuses unquoted too (``fit_steps: '1e3'``,
    the float 1000.0, or ``'1.5'``) was told to lose its quotes; it now gets the hint the unquoted value gets, and
    "write the integer N" is given only where N is accepted (``probes: 2e3`` is over probes' maximum).

Positions are found in the policy text (``text_position``), never read back from orthofx.
"""

import contextlib
import warnings

import pytest
import torch
from torch import nn

import orthofx
from orthofx.cli import main
from orthofx.errors import OrthofxWarning, PlanError, PolicyError
from orthofx.policy import Policy
from references import text_position

HEAD = "orthofx: 1\nrules:\n"


def _rule(apply: str, with_text: str, match: str = "{type: Conv2d}") -> str:
    return HEAD + f"  - match: {match}\n    apply: {apply}\n    with: {with_text}\n"


def _error(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        Policy.from_yaml(text)
    return info.value


# ------------------------------------------------------------------------------------ 1. the wrong pass's parameter

@pytest.mark.parametrize("apply, key, owners", [
    ("orth_regularizer", "on_impossible", "orthogonal_conv"),
    ("orth_regularizer", "method", "orthogonal_conv, svd_conditioning"),
    ("riemannian", "gain", "isometric_init, orthogonal_conv"),
])
def test_a_parameter_of_another_pass_names_the_passes_that_take_it(apply, key, owners):
    text = _rule(apply, f"{{{key}: 1}}")
    err = _error(text)
    assert (err.line, err.column) == text_position(text, key)
    assert err.reason.startswith(f"unknown key {key!r} in rules[0].with for pass {apply!r}; allowed: ")
    assert err.reason.endswith(f" ({key!r} is a parameter of {owners}, not of {apply})")
    # the reference: the registry's own parameter lists
    passes = orthofx.passes.registry.available_passes()
    assert owners.split(", ") == [name for name, cls in passes.items() if key in cls.param_spec()]


def test_a_misspelt_parameter_still_gets_the_closest_name():
    err = _error(_rule("riemannian", "{retracton: qr}"))
    assert err.reason.endswith("(did you mean 'retraction'?)") and "is a parameter of" not in err.reason


# ------------------------------------------------------------------------------------ 2. the value's likely slip

@pytest.mark.parametrize("apply, with_text, hint", [
    ("orth_regularizer", "{weight: '1e-2'}", "; a number in quotes is a string: write 1e-2 without quotes"),
    ("orth_regularizer", '{every: "2"}', "; a number in quotes is a string: write 2 without quotes"),
    ("riemannian", "{only_square: 'yes'}", "; true and false in quotes are strings: write true without quotes"),
    ("riemannian", "{only_square: 'False'}", "; true and false in quotes are strings: write false without quotes"),
    ("orthogonal_conv", "{fit_steps: 1e3}", "; write the integer 1000, without a decimal point or exponent"),
    ("orth_regularizer", "{case: ro}", " (did you mean 'RO'?)"),
])
def test_a_refused_value_names_the_slip(apply, with_text, hint):
    text = _rule(apply, with_text)
    err = _error(text)
    key = with_text[1:].split(":")[0]
    assert err.reason.startswith(f"rules[0].with.{key}: parameter '{key}' must be ")
    assert err.reason.endswith(hint)
    # the value as written: what YAML reads it as (a string, or 1e3 the float 1000.0)
    assert (err.line, err.column) == text_position(text, with_text[len(key) + 3:-1])


def test_svd_conditioning_choice_in_another_case():
    err = _error(_rule("svd_conditioning", "{method: Taylor}", match="{op: eigh}"))
    assert err.reason.endswith("got 'Taylor' (did you mean 'taylor'?)")


@pytest.mark.parametrize("with_text", ["{weight: abc}", "{weight: -1}", "{weight: '.nan'}"])
def test_no_hint_where_there_is_no_slip_to_name(with_text):
    err = _error(_rule("orth_regularizer", with_text))
    assert "without quotes" not in err.reason and "did you mean" not in err.reason


def test_a_dict_policy_gets_the_same_hints():
    with pytest.raises(PolicyError, match="got '0.1' \\(a string\\); a number in quotes is a string: write 0.1"):
        Policy.from_dict({"rules": [{"match": {"type": "Conv2d"}, "apply": "orth_regularizer",
                                     "with": {"weight": "0.1"}}]})


# ------------------------------------------------------------------------------------ 3. a duplicate key by alias

def test_a_key_repeated_through_an_alias_is_placed_at_the_alias():
    text = HEAD + "  - &k match: {type: Conv2d}\n    apply: orth_regularizer\n    *k : {type: Linear}\n"
    err = _error(text)
    first = text_position(text, "&k")  # a key's node starts at its anchor
    assert (err.line, err.column) == text_position(text, "*k")
    assert err.reason == (f"duplicate key 'match' in rules[0] (first given at line {first[0]}, column {first[1]}); "
                          "give each key once")


def test_a_key_repeated_through_an_alias_in_a_flow_mapping():
    text = _rule("orth_regularizer", "{&w weight: 1, *w : 2}")
    err = _error(text)
    assert (err.line, err.column) == text_position(text, "*w")
    assert "first given at line {}, column {}".format(*text_position(text, "&w")) in err.reason


# ------------------------------------------------------------------------------------ 4. a no-break space

@pytest.mark.parametrize("line", [
    "\u00a0 - match: {type: Conv2d}\n    apply: orth_regularizer\n",
    "  - match: {type: Conv2d}\n    apply:\u00a0orth_regularizer\n",
])
def test_a_no_break_space_is_named_with_its_place(line):
    text = HEAD + line
    err = _error(text)
    at = text_position(text, "\u00a0")
    assert err.reason.startswith("invalid YAML: ")
    assert err.reason.endswith(f" (line {at[0]}, column {at[1]} holds a NO-BREAK SPACE (U+00A0), which YAML does "
                               "not read as a space: type a plain space)")


def test_a_byte_order_mark_is_no_such_mistake():
    policy = Policy.from_yaml("\ufeff" + HEAD + "  - match: {type: Conv2d}\n    apply: orth_regularizer\n")
    assert policy.rules[0].apply == "orth_regularizer"
    err = _error("\ufeff" + HEAD + "  - match: {type: Conv2d\n")
    assert "holds a" not in err.reason


# ------------------------------------------------------------------------------------ 5. a misspelt type

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("types, expected", [
    ("conv2d", [("conv2d", "Conv2d")]),
    (["Conv3d", "Linaer"], [("Linaer", "Linear")]),
    ("Zqxwv", [("Zqxwv", None)]),
])
def test_a_rule_matching_nothing_for_a_misspelt_type_suggests_the_class(types, expected):
    policy = {"rules": [{"match": {"type": types}, "apply": "orth_regularizer"}]}
    x = torch.randn(2, 2, 5, 5)
    with pytest.raises(PlanError) as from_explain:
        orthofx.explain(_Net(), policy, example_inputs=(x,))
    with pytest.raises(PlanError) as from_transform:
        orthofx.transform(_Net(), policy, example_inputs=(x,))
    message = str(from_explain.value)
    assert message == str(from_transform.value)  # one verdict, one message
    assert message.startswith("rule 'orth_regularizer[0]' matched no module site; ")
    for entry, close in expected:
        hint = f" (did you mean {close}?)" if close else ""
        assert f" Its match.type entry {entry!r} names no class of the model, torch.nn or orthofx.nn{hint}." in message
        # the reference: the class exists where the hint says, under that exact name
        assert close is None or isinstance(getattr(nn, close), type)
    assert "'Conv3d' names" not in message  # a real torch.nn class, just not in this model


def test_a_rule_that_matches_keeps_the_warning_and_no_error():
    plan = orthofx.explain(_Net(), {"rules": [{"match": {"type": ["Conv2d", "linear"]}, "apply": "orth_regularizer"}]})
    assert [entry.site.name for entry in plan.entries] == ["conv"]
    assert any("match.type entry 'linear'" in w and "(did you mean Linear?)" in w for w in plan.capture.warnings)


# ------------------------------------------------------------------------------------ 6. warnings on the command line

def _regex_warning_policy(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(HEAD + "  - match: {name: 're:[[a]'}\n    apply: orth_regularizer\n", encoding="utf-8")
    return path


def test_cli_prints_an_orthofx_warning_as_one_line(tmp_path, capsys):
    path = _regex_warning_policy(tmp_path)
    assert main(["check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"ok: {path}: 1 rule(s)")
    where = "{}:{}".format(*text_position(path.read_text(encoding="utf-8"), "'re:"))
    assert err.startswith(f"orthofx: warning: {path}:{where}: rules[0].match.name: regular expression '[[a]': ")
    assert err.count("\n") == 1 and "policy.py" not in err and "_patterns(" not in err


def test_cli_with_debug_keeps_pythons_form(tmp_path, capsys):
    path = _regex_warning_policy(tmp_path)
    with pytest.warns(OrthofxWarning, match="regular expression"):
        assert main(["--debug", "check", str(path)]) == 0
    assert "orthofx: warning:" not in capsys.readouterr().err


def test_cli_leaves_other_warnings_and_the_callers_handler_alone(tmp_path, capsys):
    shown = warnings.showwarning
    path = _regex_warning_policy(tmp_path)
    assert main(["check", str(path)]) == 0
    assert warnings.showwarning is shown
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("not orthofx's", UserWarning)
    assert [str(w.message) for w in caught] == ["not orthofx's"]


# ------------------------------------------------------------------------------------ 7. a regex warning, twice

def test_a_regex_note_is_given_each_time_the_policy_is_loaded():
    text = HEAD + "  - match: {name: 're:[[a]'}\n    apply: orth_regularizer\n"
    for _ in range(2):
        with pytest.warns(OrthofxWarning, match=r"regular expression '\[\[a\]': Possible nested set") as caught:
            Policy.from_yaml(text)
        assert str(caught[0].message).startswith("<string>:{}:{}: ".format(*text_position(text, "'re:")))


# ------------------------------------------------------------------------------------ 8. a feeds rule matching nothing

class _Whiten(nn.Module):
    def __init__(self, first: nn.Module):
        super().__init__()
        self.first = first

    def forward(self, x):
        h = self.first(x)
        return torch.linalg.eigh(h.T @ h).eigenvalues


@pytest.mark.parametrize("first, match, reason", [
    (nn.Linear(3, 3), {"feeds": "svd"}, " Its feeds (svd): the graph calls no svd; its decompositions: linalg.eigh."),
    (nn.Linear(3, 3), {"feeds": ["svd", "linalg.svdvals"]},
     " Its feeds (svd, linalg.svdvals): the graph calls no svd or linalg.svdvals; its decompositions: linalg.eigh."),
    (nn.Tanh(), {"feeds": "eigh"}, " Its feeds (linalg.eigh): no conv or linear layer feeds the graph's linalg.eigh "
                                   "calls"),
    (nn.Linear(3, 3), {"feeds": "eigh", "type": "Conv2d"},
     " Its feeds (linalg.eigh) select 'first', which the rule's other selectors (type, name, exclude, where) leave "
     "out."),
])
def test_a_feeds_rule_matching_nothing_says_why(first, match, reason):
    model, x = _Whiten(first), torch.randn(5, 3)
    # the reference: what the model calls, read from its own graph by torch.fx
    calls = {str(node.target) for node in torch.fx.symbolic_trace(model).graph.nodes if node.op == "call_function"}
    assert any("eigh" in call for call in calls) and not any("svd" in call for call in calls)
    policy = {"rules": [{"match": match, "apply": "pre_svd"}]}
    with pytest.raises(PlanError) as from_explain:
        orthofx.explain(model, policy, example_inputs=(x,))
    with pytest.raises(PlanError) as from_transform:
        orthofx.transform(model, policy, example_inputs=(x,))
    assert str(from_explain.value) == str(from_transform.value)
    assert reason in str(from_explain.value)


# ------------------------------------------------------------------------------------ 9. '\\n' from a shell

@pytest.mark.parametrize("text", [r"orthofx: 1\nrules: []",
                                  r"orthofx: 1\nrules:\n  - match: {type: Conv2d}\n    apply: orth_regularizer"])
def test_a_backslash_n_for_a_line_break_is_named(text, capsys):
    err = _error(text)
    assert err.reason.startswith("invalid YAML: ")
    assert err.reason.endswith(" (the text holds '\\n', a backslash and an n, where a line break was meant: a shell "
                               "passes them as written; put the policy in a .yaml file, or in bash write $'...' to "
                               "make line breaks of them)")
    assert main(["explain", "small_cnn", "--policy", text]) == 2
    assert "a backslash and an n" in capsys.readouterr().err
    # with line breaks the text parses: YAML was no problem but the two characters
    fixed = text.replace("\\n", "\n")
    with pytest.raises(PolicyError, match="rules is empty") if "[]" in text else contextlib.nullcontext():
        Policy.from_yaml(fixed)


def test_an_escaped_line_break_inside_quotes_gets_no_such_hint():
    err = _error('a: "x\\ny": 2')  # YAML reads \n in double quotes as a line break: no shell slip
    assert "backslash" not in err.reason


# ------------------------------------------------------------------------------------ 10. '-' for standard input

@pytest.mark.parametrize("argv, option", [
    (["check", "-"], "POLICY -"),
    (["explain", "small_cnn", "--policy", "-"], "--policy -"),
    (["transform", "small_cnn", "--policy", " - "], "--policy -"),
])
def test_a_dash_for_standard_input_says_how_to_give_it(argv, option, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no file named '-' here
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"orthofx: error: {option}: a policy is not read from standard input by the "
                                        "name '-'; pipe it in as the file /dev/stdin")
    assert err.count("\n") == 1


def test_a_file_named_dash_is_still_read(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-").write_text(HEAD + "  - match: {type: Conv2d}\n    apply: orth_regularizer\n", encoding="utf-8")
    assert main(["check", "-"]) == 0
    assert capsys.readouterr().out.startswith("ok: -: 1 rule(s): orth_regularizer[0] -> orth_regularizer")


# ------------------------------------------------------------------------------------ 11. a key at the wrong level

@pytest.mark.parametrize("text, token, reason", [
    (HEAD + "  - match: {type: Conv2d}\n    apply: orth_regularizer\n    weight: 0.1\n", "weight",
     "unknown key 'weight' in rules[0]; allowed: name, match, apply, with, optional ('weight' is a parameter of "
     "orth_regularizer: put it under the rule's with:, as in with: {weight: ...})"),
    (HEAD + "  - match: {type: Conv2d}\n    apply: riemannian\n    gain: 2\n", "gain",
     "unknown key 'gain' in rules[0]; allowed: name, match, apply, with, optional ('gain' is a parameter of "
     "isometric_init, orthogonal_conv (not of riemannian), which passes take under with:)"),
    (HEAD + "  - match: {type: Conv2d}\n    apply: orth_regularizer\n    exclude: fc\n", "exclude",
     "unknown key 'exclude' in rules[0]; allowed: name, match, apply, with, optional ('exclude' is a selector: put "
     "it under the rule's match:, as in match: {exclude: ...})"),
    (HEAD + "  - match:\n      type: Conv2d\n      apply: orth_regularizer\n", "apply",
     "rules[0] has no 'apply', but its match: holds one: 'apply' belongs to the rule, beside match:, not inside it"),
    (HEAD + "  - match: {type: Conv2d, optional: true}\n    apply: orth_regularizer\n", "optional",
     "unknown key 'optional' in rules[0].match; allowed: type, name, exclude, where, op, feeds, kind ('optional' "
     "belongs to the rule, beside match:, not inside it)"),
    (HEAD + "  - match: {type: Conv2d}\n    apply: orth_regularizer\n    with: {weight: 1, optional: true}\n",
     "optional", "unknown key 'optional' in rules[0].with for pass 'orth_regularizer'; allowed: case, every, weight "
                 "('optional' belongs to the rule, beside with:, not inside it)"),
    (HEAD + "  - match: {type: Conv2d}\n    apply: orth_regularizer\nmode: fx\n", "mode",
     "unknown key 'mode' at the top level; allowed: orthofx, description, capture, rules ('mode' belongs under "
     "capture:, as in capture: {mode: ...})"),
])
def test_a_key_at_the_wrong_level_says_where_it_belongs(text, token, reason):
    err = _error(text)
    assert err.reason == reason
    assert (err.line, err.column) == text_position(text, token)
    # the reference: the same key at the level named is accepted
    fixed = {
        "weight": HEAD + "  - match: {type: Conv2d}\n    apply: orth_regularizer\n    with: {weight: 0.1}\n",
        "gain": HEAD + "  - match: {type: Conv2d}\n    apply: isometric_init\n    with: {gain: 2}\n",
        "exclude": HEAD + "  - match: {type: Conv2d, exclude: fc}\n    apply: orth_regularizer\n",
        "apply": HEAD + "  - match:\n      type: Conv2d\n    apply: orth_regularizer\n",
        "optional": HEAD + "  - match: {type: Conv2d}\n    apply: orth_regularizer\n    optional: true\n",
        "mode": "capture: {mode: fx}\n" + HEAD + "  - match: {type: Conv2d}\n    apply: orth_regularizer\n",
    }[token]
    assert Policy.from_yaml(fixed).rules


def test_a_misspelt_rule_key_still_gets_the_closest_name():
    err = _error(HEAD + "  - match: {type: Conv2d}\n    apply: orth_regularizer\n    wiht: {weight: 1}\n")
    assert err.reason.endswith("(did you mean 'with'?)")


# ------------------------------------------------------------------ 12. a key that is a selector and a parameter

def _selector_params() -> list[tuple[str, str]]:
    """(key, pass) for every selector name that some pass also takes as a parameter, from the registry."""
    from orthofx.policy import _MATCH_KEYS
    passes = orthofx.passes.registry.available_passes()
    return [(key, name) for key in _MATCH_KEYS for name, cls in passes.items() if key in cls.param_spec()]


def _site_match(apply: str) -> str:
    kinds = orthofx.passes.registry.available_passes()[apply].site_kinds
    return "{type: Conv2d}" if "module" in kinds else "{op: eigh}"


def _a_valid_value(apply: str, key: str):
    param = orthofx.passes.registry.available_passes()[apply].param_spec()[key]
    return param.choices[-1] if param.choices else param.default


def test_the_selector_parameters_are_known():
    assert ("kind", "jacobian_isometry") in _selector_params()


@pytest.mark.parametrize("key, apply", _selector_params())
def test_a_selector_parameter_beside_apply_names_both_places(key, apply):
    value = _a_valid_value(apply, key)
    text = HEAD + f"  - match: {_site_match(apply)}\n    apply: {apply}\n    {key}: {value}\n"
    err = _error(text)
    assert err.reason == (f"unknown key '{key}' in rules[0]; allowed: name, match, apply, with, optional ('{key}' is "
                          f"both a selector and a parameter of {apply}: put it under the rule's with: for the "
                          f"parameter, as in with: {{{key}: ...}}, or under match: for the selector, as in "
                          f"match: {{{key}: ...}})")
    assert (err.line, err.column) == text_position(text, f"{key}: {value}")
    # the reference: under with: the pass takes the value as written
    fixed = Policy.from_yaml(_rule(apply, f"{{{key}: {value}}}", match=_site_match(apply)))
    assert fixed.rules[0].params[key] == value


@pytest.mark.parametrize("key, apply", _selector_params())
def test_a_selector_parameter_without_a_known_pass_names_both_places(key, apply):
    for rule in ["", "    apply: no_such_pass\n"]:
        err = _error(HEAD + f"  - match: {{type: Conv2d}}\n{rule}    {key}: x\n")
        assert err.reason.endswith(f" ('{key}' is a selector, which goes under the rule's match:, as in match: "
                                   f"{{{key}: ...}}, and a parameter of {apply}, which goes under with:)")


@pytest.mark.parametrize("key, owner", _selector_params())
def test_a_selector_parameter_beside_another_pass_is_a_selector(key, owner):
    passes = orthofx.passes.registry.available_passes()
    for apply, cls in passes.items():
        if key in cls.param_spec():
            continue
        err = _error(HEAD + f"  - match: {_site_match(apply)}\n    apply: {apply}\n    {key}: x\n")
        assert err.reason.endswith(f" ('{key}' is a selector: put it under the rule's match:, as in match: "
                                   f"{{{key}: ...}})")
        # under with: of a pass that does not take it: a selector, or the parameter of the passes that do
        owners = ", ".join(name for name, c in passes.items() if key in c.param_spec())
        err = _error(_rule(apply, f"{{{key}: x}}", match=_site_match(apply)))
        assert err.reason.endswith(f" ('{key}' is a selector: put it under the rule's match:; it is also a parameter "
                                   f"of {owners}, not of {apply})")


def test_a_parameters_value_under_match_names_the_parameter():
    text = HEAD + "  - match: {type: Conv2d, kind: partial}\n    apply: jacobian_isometry\n"
    err = _error(text)
    assert err.reason == ("rules[0].match.kind must be one of module, block, function; found a string ('partial') "
                          "('partial' is a value of the parameter 'kind' of jacobian_isometry, which goes under the "
                          "rule's with:)")
    assert (err.line, err.column) == text_position(text, "partial")
    assert "did you mean 'block'" in _error(text.replace("partial", "blok")).reason  # a selector's misspelling
    fixed = Policy.from_yaml(_rule("jacobian_isometry", "{kind: partial}"))
    assert fixed.rules[0].params["kind"] == "partial"


# ------------------------------------------------------------ 12. a quoted number an integer parameter refuses

def _int_params() -> list[tuple[str, str]]:
    """(pass, parameter) for every parameter that takes integers and no floats, from the registry."""
    passes = orthofx.passes.registry.available_passes()
    return [(name, key) for name, cls in passes.items() for key, p in cls.param_spec().items()
            if int in p.types and float not in p.types and p.choices is None]


def _loads(apply: str, key: str, written: str) -> bool:
    try:
        Policy.from_yaml(_rule(apply, f"{{{key}: {written}}}", match=_site_match(apply)))
    except PolicyError:
        return False
    return True


def test_the_integer_parameters_are_known():
    assert {("orthogonal_conv", "fit_steps"), ("jacobian_isometry", "probes"), ("orth_regularizer", "every"),
            ("svd_conditioning", "iterations")} <= set(_int_params())


@pytest.mark.parametrize("apply, key", _int_params())
@pytest.mark.parametrize("written, hint, fix", [
    ("'1e2'", "; write the integer 100, without quotes, a decimal point or exponent", "100"),
    ("'1.5'", "; 1.5 is not an integer, with or without quotes", None),
    ("'3'", "; a number in quotes is a string: write 3 without quotes", "3"),
])
def test_a_quoted_number_gets_the_hint_of_the_number(apply, key, written, hint, fix):
    text = _rule(apply, f"{{{key}: {written}}}", match=_site_match(apply))
    err = _error(text)
    assert err.reason.startswith(f"rules[0].with.{key}: parameter '{key}' must be ")
    assert err.reason.endswith(hint)
    assert (err.line, err.column) == text_position(text, written)
    # the reference: the value without quotes is refused too, and the fix named is accepted
    assert _loads(apply, key, written[1:-1]) == (written == "'3'")
    if fix is not None:
        assert _loads(apply, key, fix)


@pytest.mark.parametrize("written", ["2e3", "'2e3'"])
def test_no_integer_is_named_that_the_parameter_refuses(written):
    err = _error(_rule("jacobian_isometry", f"{{probes: {written}}}"))  # probes is at most 1024
    assert err.reason.startswith("rules[0].with.probes: parameter 'probes' must be an integer >= 1 and <= 1024")
    assert "write" not in err.reason
    assert not _loads("jacobian_isometry", "probes", "2000")  # the reference: the integer is refused


@pytest.mark.parametrize("written", ["'-1'", "'010'", "'1:20'"])
def test_no_unquoting_is_named_that_the_parameter_refuses(written):
    err = _error(_rule("orthogonal_conv", f"{{fit_steps: {written}}}"))
    assert err.reason == f"rules[0].with.fit_steps: parameter 'fit_steps' must be an integer >= 0, got {written} " \
                         "(a string)"
    assert not _loads("orthogonal_conv", "fit_steps", written[1:-1])
