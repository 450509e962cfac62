"""Regressions found by fuzzing policy loading and the ``orthofx`` command (session 28; one test per bug).

Each test throws one reduced input at :class:`orthofx.Policy` or :func:`orthofx.cli.main` and checks the exact
outcome: the value the input means, or an orthofx error naming the place (line and column counted by hand in
the test's own text) and the fix.
"""

from __future__ import annotations

import enum
import fnmatch
import io
import os
import random
import select
import sys
import warnings
from pathlib import Path

import pytest

from orthofx import Policy
from orthofx.cli import main
from orthofx.errors import OrthofxWarning, PolicyError

RULE = "  - match: {type: Conv2d}\n    apply: orth_regularizer\n"


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------------------- positions

@pytest.mark.parametrize("newline", ["\r", "\x85", "\u2028", "\u2029", "\r\n"])
def test_a_control_character_is_placed_on_its_line_whatever_the_line_breaks(newline):
    # only '\n' was counted: with CR-only line breaks (an old Mac editor) or YAML's NEL / LS / PS the error was
    # reported at line 1, column 30 (all three lines as one)
    text = newline.join(["orthofx: 1", "rules:", "  - name: a\x01", ""])
    with pytest.raises(PolicyError) as info:
        Policy.from_yaml(text)
    # '  - name: a' is 11 characters: the control character is the 12th of line 3
    assert (info.value.line, info.value.column) == (3, 12)
    assert "special characters are not allowed" in info.value.reason


def test_a_byte_order_mark_takes_no_column():
    # PyYAML's own marks skip the BOM; the reader error's column counted it (column 5 for the 4th character)
    with pytest.raises(PolicyError) as info:
        Policy.from_yaml("\ufeffx: \x01\n")
    assert (info.value.line, info.value.column) == (1, 4)


def test_a_file_that_is_not_utf8_names_the_line_and_column_of_the_bad_byte(tmp_path):
    # the error had no line or column (only "at byte 33"), with a byte offset counted after a BOM
    path = tmp_path / "p.yaml"
    path.write_bytes(b"orthofx: 1\r\nrules:\r\n  - name: caf\xe9\r\n")  # Latin-1 e-acute
    with pytest.raises(PolicyError) as info:
        Policy.load(path)
    err = info.value
    # 12 + 8 bytes of the first two lines, then '  - name: caf' (13 bytes): byte 33, column 14 of line 3
    assert (err.file, err.line, err.column) == (str(path), 3, 14)
    assert "not UTF-8 text (invalid continuation byte at byte 33)" in err.reason

    path.write_bytes(b"\xef\xbb\xbfa: \xc3\xa9\xff\n")  # BOM, 'a: ', a two-byte e-acute, then a bad byte
    with pytest.raises(PolicyError) as info:
        Policy.load(path)
    # the bad byte is byte 8 of the file (3 BOM + 3 + 2) and the 5th character of line 1 (the BOM takes none)
    assert (info.value.line, info.value.column) == (1, 5) and "at byte 8" in info.value.reason

    path.write_bytes("orthofx: 1\n".encode("utf-16"))
    with pytest.raises(PolicyError, match=r"it is UTF-16 text; save it as UTF-8") as info:
        Policy.load(path)
    assert (info.value.line, info.value.column) == (1, 1)


# ----------------------------------------------------------------------------------------- files

@pytest.mark.skipif(not os.path.isdir("/dev/fd"), reason="needs /dev/fd")
def test_a_policy_can_be_read_from_a_pipe(tmp_path, capsys):
    # 'orthofx check <(make_policy)' passes /dev/fd/63, a pipe: it was reported as "policy file not found"
    text = "orthofx: 1\nrules:\n" + RULE + "    with: {weight: 0.5}\n"
    expected = Policy.from_yaml(text)
    for load in (lambda path: Policy.load(path), lambda path: Policy.from_yaml(Path(path))):
        read, write = os.pipe()
        try:
            os.write(write, text.encode())
            os.close(write)
            policy = load(f"/dev/fd/{read}")
        finally:
            os.close(read)
        assert policy == expected and policy.rules[0].params["weight"] == 0.5
        assert policy.source == f"/dev/fd/{read}"

    read, write = os.pipe()
    try:
        os.write(write, text.encode())
        os.close(write)
        code, out, err = _cli(capsys, "check", f"/dev/fd/{read}")
    finally:
        os.close(read)
    assert (code, err) == (0, "") and out.startswith(f"ok: /dev/fd/{read}: 1 rule(s)")


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_device_is_not_a_policy_file_and_is_not_read():
    # /dev/null was "not found" though it exists; /dev/zero, were it read, would never end
    for device in ("/dev/null", "/dev/zero"):
        for load in (Policy.load, lambda path: Policy.from_yaml(Path(path))):
            with pytest.raises(PolicyError) as info:
                load(device)
            assert f"{device!r} is a character device, not a policy file" in str(info.value)


# ----------------------------------------------------------------------------------------- dict input

class _Layer(str, enum.Enum):
    CONV = "Conv2d"


class _Text(str):
    pass


def test_str_subclasses_in_a_dict_become_plain_strings():
    # an enum member or a str subclass was kept as is: to_yaml() raised yaml's RepresenterError, and
    # str() of the member is 'Layer.CONV', not the text it holds
    match = {"type": _Layer.CONV, "where": {_Text("padding_mode"): _Text("zeros")}}
    d = {"description": _Text("d"), "rules": [{"name": _Text("r"), "match": match, "apply": _Text("orth_regularizer"),
                                               "with": {_Text("case"): _Text("RO")}}]}
    policy = Policy.from_dict(d)
    rule = policy.rules[0]
    values = [policy.description, rule.name, rule.apply, *rule.match.type, *rule.match.where,
              *rule.match.where.values(), *rule.given_params, *rule.given_params.values()]
    assert values == ["d", "r", "orth_regularizer", "Conv2d", "padding_mode", "zeros", "case", "RO"]
    assert all(type(value) is str for value in values)
    assert Policy.from_yaml(policy.to_yaml()) == policy and Policy.from_dict(policy.to_dict()) == policy


def test_an_unsupported_value_names_its_type_with_the_module():
    # NumPy's bool was named 'bool', which reads as if a Python bool had been refused
    np = pytest.importorskip("numpy")
    with pytest.raises(PolicyError, match=r"rules\[0\]\.optional: unsupported value of type numpy\.bool"):
        Policy.from_dict({"rules": [{"match": {"type": "Conv2d"}, "apply": "orth_regularizer",
                                     "optional": np.bool_(True)}]})


# ----------------------------------------------------------------------------------------- YAML values

def test_an_integer_with_a_leading_zero_is_refused_when_yaml_versions_disagree():
    # YAML 1.1 (PyYAML) read 064 as the octal 52, silently: a filter on out_channels: 064 matched 52 channels
    text = "orthofx: 1\nrules:\n  - match: {type: Conv2d, where: {out_channels: [007, 064]}}\n" \
           "    apply: orth_regularizer\n"
    with pytest.raises(PolicyError) as info:
        Policy.from_yaml(text)
    err = info.value
    assert (err.line, err.column) == (3, 55)  # the '0' of '064'
    assert err.reason.startswith("rules[0].match.where.out_channels[1]: 064 has a leading zero")
    assert "octal number 52 in YAML 1.1" in err.reason and "64 in YAML 1.2" in err.reason
    # 007 and 00 mean the same in both
    policy = Policy.from_yaml(text.replace("064", "00"))
    assert policy.rules[0].match.where == {"out_channels": (7, 0)}


def test_a_null_pass_or_version_is_described_as_null():
    with pytest.raises(PolicyError, match=r"rules\[0\]\.apply must name a pass, found null; available: "):
        Policy.from_yaml("orthofx: 1\nrules:\n  - {match: {type: Conv2d}, apply: }\n")
    with pytest.raises(PolicyError, match=r"unsupported policy schema version null .*write 'orthofx: 1'") as info:
        Policy.from_yaml("orthofx:\nrules:\n" + RULE)
    assert (info.value.line, info.value.column) == (1, 9)


def test_a_default_rule_name_taken_by_an_earlier_rule_says_it_is_the_default():
    # the rule without a name was told its name 'orth_regularizer[1]' was a duplicate, a name it never wrote
    text = "orthofx: 1\nrules:\n  - name: orth_regularizer[1]\n    match: {type: Linear}\n" \
           "    apply: orth_regularizer\n" + RULE
    with pytest.raises(PolicyError) as info:
        Policy.from_yaml(text)
    err = info.value
    assert (err.line, err.column) == (6, 5)
    assert err.reason.startswith("rules[1] has no name, and its default name 'orth_regularizer[1]' "
                                 "('<apply>[<index>]') is already the name of rules[0] (line 3)")
    assert "give rules[1] a name" in err.reason


# ----------------------------------------------------------------------------------------- patterns

@pytest.mark.parametrize("key, pattern, at", [("name", "conv[1", 5), ("exclude", "layer[12].conv[", 15),
                                              ("exclude", "a[]", 2), ("name", "[!]x", 1)])
def test_a_glob_with_an_unclosed_bracket_is_refused(key, pattern, at):
    # fnmatch matches an unclosed '[' literally, and no module name holds one: 'exclude: conv[1' left out nothing
    assert "\\[" in fnmatch.translate(pattern)  # the premise: fnmatch reads it as a literal '['
    text = f"orthofx: 1\nrules:\n  - match: {{type: Conv2d, {key}: '{pattern}'}}\n    apply: orth_regularizer\n"
    with pytest.raises(PolicyError) as info:
        Policy.from_yaml(text)
    err = info.value
    assert (err.line, err.column) == (3, 29 + len(key))  # '  - match: {type: Conv2d, ' is 26 characters
    assert err.reason.startswith(f"rules[0].match.{key}: the '[' at position {at} of the glob {pattern!r} is never "
                                 "closed")


def test_closed_bracket_sets_are_accepted_as_fnmatch_reads_them():
    # independent reference: fnmatch.translate escapes a '[' outside any set exactly when it is left unclosed
    def literal_bracket(regex):
        i, in_set = 0, False
        while i < len(regex):
            if regex[i] == "\\":
                if regex[i + 1] == "[" and not in_set:
                    return True
                i += 2
                continue
            if not in_set and regex[i] == "[":
                in_set, i = True, i + 1
                i += regex[i:i + 1] == "^"
                i += regex[i:i + 1] == "]"
                continue
            in_set = in_set and regex[i] != "]"
            i += 1
        return False

    rng = random.Random(0)
    for _ in range(400):
        pattern = "x" + "".join(rng.choice("a[]!*?-") for _ in range(rng.randint(0, 7)))
        rule = {"match": {"type": "Conv2d", "exclude": pattern}, "apply": "orth_regularizer"}
        if literal_bracket(fnmatch.translate(pattern)):
            with pytest.raises(PolicyError, match="is never closed"):
                Policy.from_dict({"rules": [rule]})
        else:
            assert Policy.from_dict({"rules": [rule]}).rules[0].match.exclude == (pattern,)


def test_a_future_warning_about_a_regex_names_the_policy_place():
    # re's FutureWarning ("Possible nested set") named a line of orthofx/policy.py, not the policy
    text = "orthofx: 1\nrules:\n  - match: {type: Conv2d, name: 're:[[a]b'}\n    apply: orth_regularizer\n"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Policy.from_yaml(text)
    messages = [str(w.message) for w in caught if issubclass(w.category, OrthofxWarning)]
    assert len(messages) == 1 and not [w for w in caught if issubclass(w.category, FutureWarning)]
    assert messages[0].startswith("<string>:3:33: rules[0].match.name: regular expression '[[a]b': Possible nested set")


@pytest.mark.parametrize("text, key, fix", [
    (RULE + "    params: {weight: 1}\n", "params", "with"),
    ("  - {select: {type: Conv2d}, apply: orth_regularizer}\n", "select", "match"),
    ("  - {match: {class: Conv2d}, apply: orth_regularizer}\n", "class", "type"),
], ids=["params", "select", "class"])
def test_unknown_keys_other_tools_use_get_a_suggestion(text, key, fix):
    with pytest.raises(PolicyError, match=rf"unknown key '{key}' .*\(did you mean '{fix}'\?\)"):
        Policy.from_yaml("orthofx: 1\nrules:\n" + text)


# ----------------------------------------------------------------------------------------- command line

@pytest.mark.parametrize("shape, fragment", [
    ("1," + "9" * 5000, "the dimension 999999999999... (5000 digits) is too large"),
    ("9223372036854775808,1", "the dimension 9223372036854775808 is too large (at most 2^63 - 1)"),
], ids=["5000-digits", "2^63"])
def test_an_input_shape_dimension_too_large_exits_2_with_one_line(capsys, shape, fragment):
    # over 4300 digits, int() raised ValueError: "unexpected ValueError ... (--debug shows the traceback)", exit 1
    code, out, err = _cli(capsys, "check", "lorth", "--model", "small_cnn", "--input-shape", shape)
    assert (code, out) == (2, "") and err.count("\n") == 1 and fragment in err
    assert len(err) < 300


def test_an_input_shape_with_thousands_of_leading_zeros_is_its_number(capsys):
    code, out, err = _cli(capsys, "check", "lorth", "--model", "small_cnn", "--input-shape", "0" * 5000 + "2,1,8,8")
    assert (code, err) == (0, "") and out.startswith("ok: <preset:lorth>")


@pytest.mark.skipif(not hasattr(select, "poll"), reason="needs poll()")
@pytest.mark.parametrize("buffered", [False, True])
def test_output_into_a_closed_pipe_ends_quietly_with_status_1(monkeypatch, buffered):
    # 'orthofx presets | head -0': "orthofx: error: [Errno 32] Broken pipe" with status 2 (bad input), or, with
    # buffered output, status 0 and "Exception ignored ... BrokenPipeError" when the interpreter flushed at exit
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    stdout = io.TextIOWrapper(io.FileIO(write, "w"), encoding="utf-8", line_buffering=not buffered,
                              write_through=not buffered)
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", stderr)
    try:
        code = main(["presets"])
        stdout.write("more\n")
        stdout.flush()  # what is left goes to the null device now, not into an error at exit
    finally:
        monkeypatch.undo()
        try:
            stdout.close()
        except OSError:
            pass
    assert (code, stderr.getvalue()) == (1, "")


@pytest.mark.skipif(not hasattr(select, "poll"), reason="needs poll()")
def test_a_failure_with_a_closed_pipe_keeps_its_status_and_message(monkeypatch):
    read, write = os.pipe()
    os.close(read)
    stdout = io.TextIOWrapper(io.FileIO(write, "w"), encoding="utf-8")
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", stderr)
    try:
        code = main(["check", "nope"])
    finally:
        monkeypatch.undo()
        stdout.close()
    assert code == 2 and stderr.getvalue().startswith("orthofx: error: <policy>: 'nope' is neither a preset")


MODEL_FILE = """\
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
"""


@pytest.mark.parametrize("option, name, what", [("--json", "p.yaml", "the policy file (--policy)"),
                                                ("--json", "m.py", "the model file (MODEL)"),
                                                ("--plot", "link.png", "the policy file (--policy)")])
def test_an_output_that_would_replace_an_input_file_is_refused(capsys, tmp_path, monkeypatch, option, name, what):
    # 'transform m.py:make --policy p.yaml --json p.yaml' replaced the policy (or the model's source) by the report
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the model file's folder is put first on it
    policy_text = "orthofx: 1\nrules:\n" + RULE
    (tmp_path / "p.yaml").write_text(policy_text)
    (tmp_path / "m.py").write_text(MODEL_FILE)
    (tmp_path / "link.png").symlink_to(tmp_path / "p.yaml")  # the same file under another name
    code, out, err = _cli(capsys, "transform", "m.py:make", "--policy", "p.yaml", "--input-shape", "1,1,4,4",
                          option, name)
    assert (code, out) == (2, "") and err == f"orthofx: error: {option} {name} is {what}: the output would " \
                                             "replace it; choose another path\n"
    assert (tmp_path / "p.yaml").read_text() == policy_text and (tmp_path / "m.py").read_text() == MODEL_FILE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.png", "m.py", "p.yaml"]  # no staging folder left
