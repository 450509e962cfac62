"""Regressions found by the session-34 fuzz round (combined policies of several passes on odd layers: Conv1d /
Conv3d with groups, dilation, ``padding="same"``, reflect / replicate padding, ``bias=False``; float64, bfloat16,
``channels_last`` and non-contiguous inputs, batch size 1; the life cycle transform -> train with ``penalty`` and
``attach`` -> report -> freeze -> export -> load; policy YAML with typos; the command line). Each test failed before
its fix.

- A YAML glob starting with ``*`` (``name: *conv``, ``exclude: [*fc]``) is a YAML alias: the PolicyError said only
  "found undefined alias 'conv'" (or "while scanning an alias"), with no word of the fix; a regular expression in
  double quotes (``"re:conv\\d"``) failed with "unknown escape character 'd'". Both now say how to quote.
  Reference: the quoted policy loads and selects what the glob / regex selects in ``named_modules()``.
- A ``match.type`` list entry naming no class (``type: [Conv2d, Linaer]``, or ``nn.Linear`` as Python code writes
  it, which no module path resolves) selected nothing in silence while the rule's other entries matched, so every
  Linear stayed untreated; ``explain`` / ``report`` now warn, with the class
  meant. Reference: the classes of ``model.named_modules()``.
- ``orthofx.report`` of a frozen model lost the figures of orthogonal layers whose frozen form is not one conv:
  ``nn.Sequential(pad, conv)`` (``padding="same"`` with an even kernel, a wide or dilated kernel) and the frozen
  orthogonal transposed conv (a transposed conv, then a circular fold), and the ``FourierConv`` of a frozen
  ``method: cayley_fft`` layer: L_orth, sigma and existence were empty, with no note. Reference: the dense float64
  operator of the frozen layer (its Jacobian on the input grid).
- ``orthofx.report`` of ``orthofx.freeze(model)`` for a model written with ``OrthogonalConvTranspose2d`` raised
  ``AttributeError: _FrozenConvTranspose has no attribute `conv``` (the manifest kept the site of the layer's inner
  conv, which freezing removes), and its rows had no singular values although ``freeze`` ran the example inputs (the
  note said to pass them to ``orthofx.transform``): freeze now records the input sizes as transform does.
- ``orthofx transform ... --export m.onnx`` also writes ``m.onnx.data`` (torch's exporter keeps the weights there),
  which the command's output checks did not know: ``--json m.onnx.data`` was replaced by it (the report lost, exit
  0, "wrote m.onnx.data"), and ``--policy m.onnx.data`` (the policy file read) was overwritten with the weights.
"""

from __future__ import annotations

import fnmatch

import pytest
import torch
from torch import nn

import orthofx
from orthofx.cli import main
from orthofx.nn import OrthogonalConv2d, OrthogonalConvTranspose2d

pytestmark = pytest.mark.usefixtures("one_thread")


def _policy(match: str) -> str:
    return f"orthofx: 1\nrules:\n  - match: {match}\n    apply: orth_regularizer\n"


def _warnings(plan) -> list[str]:
    return [line for line in str(plan).splitlines() if line.strip().startswith("warning:")]


# ------------------------------------------------------------------------------------------- YAML quoting

@pytest.mark.parametrize("match, quoted", [
    ("{name: *conv*}", "{name: '*conv*'}"),
    ("{name: *}", "{name: '*'}"),
    ("{type: Conv2d, exclude: [*3]}", "{type: Conv2d, exclude: ['*3']}"),
])
def test_a_glob_starting_with_a_star_says_to_quote_it(match, quoted):
    with pytest.raises(orthofx.PolicyError) as info:
        orthofx.Policy.from_yaml(_policy(match))
    message = str(info.value)
    assert "<string>:3:" in message and "alias" in message
    assert "quote a glob that starts with '*'" in message
    # the fix it gives works: the quoted glob selects what fnmatch selects among the model's module names
    model = orthofx.models.get("small_cnn")
    plan = orthofx.explain(model, _policy(quoted), example_inputs=(torch.randn(2, 1, 8, 8),))
    pattern = quoted.split("'")[1]
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if "exclude" in quoted:
        expected = [n for n in convs if isinstance(model.get_submodule(n), nn.Conv2d)
                    and not fnmatch.fnmatchcase(n, pattern)]
    else:
        expected = [n for n in convs if fnmatch.fnmatchcase(n, pattern)]
    assert sorted(e.site.name for e in plan.entries) == sorted(expected)


def test_a_double_quoted_regex_escape_says_to_use_single_quotes():
    with pytest.raises(orthofx.PolicyError) as info:
        orthofx.Policy.from_yaml(_policy('{name: "re:conv\\d"}'))
    message = str(info.value)
    assert "<string>:3:" in message and "unknown escape character 'd'" in message
    assert "single quotes" in message
    policy = orthofx.Policy.from_yaml(_policy("{name: 're:conv\\d'}"))
    assert policy.rules[0].match.name == ("re:conv\\d",)


# ------------------------------------------------------------------------------- a type entry with a typo

@pytest.mark.parametrize("entry", ["Linaer", "nn.Linear"])   # a typo; torch's class as Python code names it
def test_a_type_entry_naming_no_class_is_warned_with_the_class_meant(entry):
    model = orthofx.models.get("small_cnn")
    x = torch.randn(2, 1, 8, 8)
    plan = orthofx.explain(model, _policy(f"{{type: [Conv2d, {entry}]}}"), example_inputs=(x,))
    # the rule matched the convs only (plain torch: the Conv2d layers of named_modules), so no PlanError
    convs = sorted(n for n, m in model.named_modules() if type(m) is nn.Conv2d)
    assert sorted(e.site.name for e in plan.entries) == convs
    warned = _warnings(plan)
    assert len(warned) == 1, warned
    assert f"match.type entry '{entry}'" in warned[0] and "did you mean Linear?" in warned[0]
    assert "<string>:3:5" in warned[0]
    gm = orthofx.transform(model, _policy(f"{{type: [Conv2d, {entry}]}}"), example_inputs=(x,))
    assert any(f"'{entry}'" in w for w in orthofx.manifest_of(gm).capture.warnings)
    assert any(f"'{entry}'" in w for w in _warnings(orthofx.report(gm)))


def test_type_entries_of_known_classes_are_not_warned():
    """torch.nn classes the model does not have (a policy for several models, like the presets), orthofx.nn
    layers, base classes and dotted paths are no slips."""
    model = orthofx.models.get("small_cnn")
    x = torch.randn(2, 1, 8, 8)
    types = ("[Conv2d, Conv3d, ConvTranspose1d, LSTM, Module, OrthogonalConv2d, torch.nn.Linear, "
             "torch.nn.modules.conv.Conv2d]")
    plan = orthofx.explain(model, _policy("{type: " + types + "}"), example_inputs=(x,))
    assert not [w for w in _warnings(plan) if "match.type" in w]
    for preset in ("lorth", "orthogonal", "isometric"):
        plan = orthofx.explain(model, preset, example_inputs=(x,))
        assert not [w for w in _warnings(plan) if "match.type" in w]


# ----------------------------------------------------------------------------- report of frozen models

def _dense_singular_values(module: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    """The singular values of ``module``'s linear operator (bias removed) on one input of ``input_shape``, from its
    dense float64 Jacobian."""
    module = module.double().eval()
    x = torch.zeros((1, *input_shape), dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(module, x)
    matrix = jac.reshape(module(x).numel(), x.numel())
    return torch.linalg.svdvals(matrix)


@pytest.mark.parametrize("layer, input_shape, method", [
    (nn.Conv2d(4, 4, 2, padding="same"), (4, 6, 6), "auto"),                 # even kernel: asymmetric pads
    (nn.Conv2d(4, 4, 3, padding=2, dilation=2), (4, 6, 6), "auto"),          # circular pads of 2
    (nn.Conv1d(3, 6, 5, padding=2, bias=False), (3, 8), "auto"),             # wide kernel, 1-D
    (nn.ConvTranspose2d(4, 4, 4, stride=2, padding=1), (4, 4, 4), "auto"),   # transposed: conv, circular fold
    (nn.ConvTranspose1d(4, 2, 2, stride=2, bias=False), (4, 5), "auto"),
    (nn.Conv2d(4, 8, 3, stride=2, padding=1), (4, 8, 6), "cayley_fft"),     # frozen into a FourierConv
])
def test_report_of_a_frozen_model_keeps_the_figures_of_every_orthogonal_layer(layer, input_shape, method):
    torch.manual_seed(0)
    model = nn.Sequential(layer).double()
    x = torch.randn((2, *input_shape), dtype=torch.float64)
    policy = {"rules": [{"match": {"type": type(layer).__name__}, "apply": "orthogonal_conv",
                         "with": {"method": method}}]}
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    frozen = orthofx.freeze(gm, example_inputs=(x,))
    rep = orthofx.report(frozen)
    row = rep.rows[0]
    values = _dense_singular_values(frozen.get_submodule("0"), input_shape)
    assert row["sigma_min"] == pytest.approx(values.min().item(), abs=1e-9)
    assert row["sigma_max"] == pytest.approx(values.max().item(), abs=1e-9)
    assert abs(row["sigma_max"] - 1) < 1e-9 and abs(row["sigma_min"] - 1) < 1e-9   # still exactly orthogonal
    # every singular value, as many as the operator has (those of the unfrozen layer)
    assert rep.spectra["0"].numel() == values.numel()
    torch.testing.assert_close(rep.spectra["0"].sort().values, values.sort().values, atol=1e-9, rtol=0)
    if method == "cayley_fft":
        assert row["lorth"] is None and row["exists"] == "yes (full-size kernel)"   # as before freezing
    else:
        assert row["lorth"] is not None and row["lorth"] < 1e-12 and row["exists"].startswith("yes")
    assert tuple(row["input"]) == input_shape[1:]


def test_report_of_a_frozen_model_written_with_an_orthogonal_transposed_conv():
    torch.manual_seed(0)
    model = nn.Sequential(OrthogonalConvTranspose2d(8, 4, 4, stride=2, padding=1), nn.ReLU(),
                          OrthogonalConv2d(4, 4, 2))
    x = torch.randn(2, 8, 4, 4)
    frozen = orthofx.freeze(model, example_inputs=(x,))
    rep = orthofx.report(frozen)
    rows = {row["site"]: row for row in rep.rows}
    assert sorted(rows) == ["0", "2"]   # one row per frozen layer, none for the removed inner conv
    assert rows["0"]["exists"] == "yes (CO)" and rows["2"]["exists"] == "yes (RO)"
    assert rows["0"]["lorth"] < 1e-10 and rows["2"]["lorth"] < 1e-10
    # freeze ran the example inputs: the input sizes are known, so are the singular values
    assert not rep.notes
    for site, shape in (("0", (8, 4, 4)), ("2", (4, 8, 8))):
        values = _dense_singular_values(frozen.get_submodule(site), shape)
        assert rows[site]["input"] == shape[1:]
        assert rows[site]["sigma_min"] == pytest.approx(values.min().item(), abs=1e-6)
        assert rows[site]["sigma_max"] == pytest.approx(values.max().item(), abs=1e-6)


# ------------------------------------------------------------------------------- the CLI's ONNX data file

_TRANSFORM = ["transform", "small_cnn", "--policy", "lorth", "--input-shape", "2,1,8,8"]


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_json_report_named_like_the_onnx_data_file_is_refused(capsys, tmp_path):
    model = tmp_path / "m.onnx"
    code, out, err = _run(capsys, *_TRANSFORM, "--export", str(model), "--json", str(tmp_path / "m.onnx.data"))
    assert code == 2 and err.count("\n") == 1
    assert "--json" in err and "external weights" in err and "give each its own file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []   # refused before anything was written


def test_an_onnx_export_never_replaces_the_policy_file_with_its_data(capsys, tmp_path):
    policy = tmp_path / "m.onnx.data"
    text = "orthofx: 1\nrules:\n  - match: {type: Conv2d}\n    apply: orth_regularizer\n"
    policy.write_text(text)
    code, out, err = _run(capsys, *_TRANSFORM[:2], "--policy", str(policy), "--input-shape", "2,1,8,8",
                          "--export", str(tmp_path / "m.onnx"))
    assert code == 2 and "the policy file (--policy)" in err and "external weights" in err
    assert policy.read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx.data"]
