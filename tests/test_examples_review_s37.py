"""What README.md and the example scripts promise a new user, checked where no other test did (session 37 review).

- Each script's ``--help`` gives the whole first paragraph of its docstring (it printed the first line only, which
  stops mid-sentence: "... converges linearly, and") and a help text for every option.
- The README's pass table lists exactly the parameters each registered pass declares, with the defaults and
  choices the code has; its preset list is ``orthofx presets``; its match keys are accepted by ``orthofx.Policy``;
  the command line's built-in model names are ``orthofx.models.names()``.
- The README's P1 figures (loss 1e-6 in 12 / 28 / 61 steps at depth 2 / 4 / 8, per-step rate (1 - lr)^2) are what
  ``examples/orthonormal_linear.py`` measures with its defaults (the quick run in ``tests/test_examples.py`` covers
  depths 2 and 4 at width 8 only); the rate is checked against the analytic (1 - lr)^2 and the step counts against
  the numbers written in the README.
"""

from __future__ import annotations

import os
import re

import pytest

import orthofx
from example_scripts import ROOT, import_example
from orthofx.passes import available_passes

pytestmark = pytest.mark.usefixtures("one_thread")

with open(os.path.join(ROOT, "README.md")) as _handle:
    README = _handle.read()

SCRIPTS = ("orthonormal_linear", "deep_isometry", "svd_conditioning")


def _words(text: str) -> str:
    return " ".join(text.split())


# ------------------------------------------------------------------------------------------------------ --help


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_gives_the_docstrings_first_paragraph_and_documents_every_option(name, capsys):
    example = import_example(name)
    with pytest.raises(SystemExit) as raised:
        example.main(["--help"])
    assert raised.value.code == 0
    text = capsys.readouterr().out
    first_paragraph = example.__doc__.strip().split("\n\n")[0]
    assert _words(first_paragraph) in _words(text), text
    # argparse lays out "  --opt METAVAR   help" with the help on the same line or indented on the next: an
    # option line followed by another option line (or the end) has no help text.
    lines = text.split("options:", 1)[1].splitlines()[1:]
    for i, line in enumerate(lines):
        if re.match(r"^  -", line) and not re.search(r"\S\s{2,}\S", line.strip()):
            following = lines[i + 1] if i + 1 < len(lines) else ""
            assert re.match(r"^\s{6,}\S", following), f"{name}: no help for {line.strip()!r}\n{text}"


# ------------------------------------------------------------------------------------------- README vs the code


def _pass_table() -> dict[str, str]:
    """README's "Passes and presets" table: pass name -> its parameters cell."""
    start = README.index("| pass | sites | what it does | parameters |")
    rows = {}
    for line in README[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        rows[cells[0].strip("`")] = cells[-1]
    return rows


def _top_level_items(cell: str) -> list[str]:
    """Split ``cell`` at the commas outside parentheses."""
    items, depth, current = [], 0, ""
    for char in cell:
        depth += (char == "(") - (char == ")")
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += char
    return items + [current.strip()] if current.strip() else items


_LITERALS = {"true": True, "false": False, "null": None}


@pytest.mark.parametrize("pass_name", sorted(_pass_table()))
def test_readme_pass_table_lists_each_passs_parameters_with_the_codes_defaults(pass_name):
    cls = available_passes()[pass_name]
    declared = {p.name: p for p in cls.params}
    listed = {}
    for item in _top_level_items(_pass_table()[pass_name]):
        match = re.fullmatch(r"`(\w+)`(?: \((.*)\))?", item, re.S)
        assert match, f"{pass_name}: cannot read {item!r}"
        listed[match.group(1)] = match.group(2)
    assert sorted(listed) == sorted(declared), pass_name
    for name, note in listed.items():
        if note is None:
            continue
        spec = declared[name]
        head = note.split(":")[0].strip()            # "(`skip`, `overwrite`: for ...)", "(null: eval ...)"
        choices = re.findall(r"`([^`]+)`", head)
        if choices:                                   # the choices, the default first
            assert set(choices) == set(spec.choices) and choices[0] == spec.default, (pass_name, name, spec)
        elif head in _LITERALS:
            assert spec.default is _LITERALS[head], (pass_name, name, spec.default)
        elif re.fullmatch(r"[0-9.]+", head):
            assert float(head) == spec.default, (pass_name, name, spec.default)
        elif re.fullmatch(r"\d+ to \d+", head):
            low, high = map(int, head.split(" to "))
            assert (spec.minimum, spec.maximum) == (low, high), (pass_name, name, spec)
        else:
            pytest.fail(f"{pass_name}.{name}: unread note {note!r}")


def test_readme_pass_table_has_every_registered_builtin_pass():
    builtin = {name for name, cls in available_passes().items() if cls.__module__.startswith("orthofx.passes.")}
    assert set(_pass_table()) == builtin


def test_readme_presets_are_orthofx_presets():
    start = README.index("Presets (`orthofx presets`):")
    paragraph = README[start:README.index("\n\n", start)].split(":", 1)[1]
    depth, names, chunk = 0, [], ""
    for char in paragraph:               # backticked names outside the parenthesised descriptions
        depth += (char == "(") - (char == ")")
        chunk += char if depth == 0 else ""
    names = re.findall(r"`(\w+)`", chunk)
    assert sorted(names) == sorted(orthofx.presets())


_MATCH_VALUES = {"type": "Conv2d", "name": "conv1", "exclude": ["fc"], "where": {"groups": 1},
                 "op": "linalg.eigh", "feeds": "linalg.eigh", "kind": "module"}


def test_readme_match_keys_are_the_ones_a_policy_accepts():
    start = README.index("| key | selects |")
    keys = re.findall(r"^\| `(\w+)` \|", README[start:README.index("\n\n", start)], re.M)
    assert sorted(keys) == sorted(_MATCH_VALUES)
    for key, value in _MATCH_VALUES.items():
        apply = "svd_conditioning" if key == "op" else "orth_regularizer"
        rule = {"match": {key: value}, "apply": apply}
        policy = orthofx.Policy.from_dict({"rules": [rule]})
        assert key in policy.to_dict()["rules"][0]["match"], key   # kept (a one-item list may come back bare)
    with pytest.raises(orthofx.PolicyError, match="selects|selector|key"):
        orthofx.Policy.from_dict({"rules": [{"match": {"types": "Conv2d"}, "apply": "orth_regularizer"}]})


def test_readme_command_line_models_are_the_built_in_ones():
    start = README.index("MODEL is a built-in name (")
    listed = re.findall(r"`(\w+)`", README[start:README.index(")", start)])
    assert sorted(listed) == orthofx.models.names()


# ------------------------------------------------------------------------------ P1 figures of the README's table


@pytest.mark.slow
def test_orthonormal_linear_defaults_give_the_readme_figures(tmp_path):
    pytest.importorskip("matplotlib")
    row = next(line for line in README.splitlines() if line.startswith("| `examples/orthonormal_linear.py`"))
    steps, depths = re.search(r"loss 1e-6 in ([\d / ]+) steps at depth ([\d / ]+),", row).groups()
    claimed = dict(zip(map(int, depths.split(" / ")), map(int, steps.split(" / "))))
    runs = import_example("orthonormal_linear").main(["--out", str(tmp_path / "p1.png")])
    example = import_example("orthonormal_linear")
    measured = {run["depth"]: example.steps_to(run["losses"], example.TARGET) for run in runs}
    assert measured == claimed
    for run in runs:
        # The free layer's gradient step contracts its residual by (1 - lr) per step once the constrained layers
        # have settled: loss ratio (1 - lr)^2 (whitened data, orthogonal product of the other layers).
        assert run["rate"] == pytest.approx((1 - run["lr"]) ** 2, rel=2e-3), run["depth"]
        assert run["defect"] < 1e-12
    # The docstring's step sizes: the best one halves as the depth doubles.
    assert [run["lr"] for run in runs] == [0.5, 0.25, 0.12]
