"""Review of session 34's fuzz-round commits (548175e CLI ONNX data file, c93bd7c frozen report rows). Each test
failed before its fix.

- ``orthofx.report`` of a frozen model took a user's own ``nn.Sequential(pad, conv)`` block (a site of the
  ``jacobian`` preset's block rule, captured as the Sequential it still is) for the frozen form of an orthogonal
  layer: the site got a second row, its conv's figures on the block's input grid, with no pass. Reference: the rows
  of the same model's report before freezing (freezing changes no weight of these layers).
- ``orthofx transform --export m.onnx``: the check against ``m.onnx.data`` (where the exporter's weights land,
  moved there with ``os.replace``, which replaces a symbolic link rather than following it) compared resolved
  paths. ``--json m.onnx.data`` with ``m.onnx.data`` a link to ``out.json`` passed, and the weights replaced the
  link the report was asked to be at; a link ``m.onnx.data -> policy.yaml`` was refused although the policy file
  is never touched. Reference: the files left in the folder after the command.
- An existing directory named ``m.onnx.data`` failed only after the transform, in the final move (``[Errno 21] Is a
  directory``), with ``--json``'s file already moved into place: now refused before anything runs.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import orthofx
from orthofx.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(report) -> list[tuple[str, str, object, object]]:
    return [(row["site"], row["layer"], row.get("sigma_min"), row.get("sigma_max")) for row in report.rows]


def test_a_users_pad_then_conv_block_keeps_its_rows_when_frozen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(4, 4, 3)), nn.ReLU(),
                          nn.Sequential(nn.CircularPad2d(1), nn.Conv2d(4, 4, 3)), nn.Flatten(), nn.Linear(144, 3))
    x = torch.randn(2, 4, 6, 6)
    gm = orthofx.transform(model, "jacobian", example_inputs=(x,))
    frozen = orthofx.freeze(gm, example_inputs=(x,))
    assert type(frozen.get_submodule("0")) is nn.Sequential   # the user's block, not a frozen orthogonal layer
    before, after = _rows(orthofx.report(gm)), _rows(orthofx.report(frozen))
    assert [row[:2] for row in after] == [row[:2] for row in before]
    assert [site for site, *_ in after].count("0") == 1 and [site for site, *_ in after].count("2") == 1
    for (_, _, lo, hi), (_, _, lo_before, hi_before) in zip(after, before):
        assert (lo, hi) == pytest.approx((lo_before, hi_before), rel=1e-6) if lo_before is not None else lo is None


_TRANSFORM = ["transform", "small_cnn", "--policy", "lorth", "--input-shape", "2,1,8,8"]


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_json_report_linked_at_the_onnx_data_file_is_refused(capsys, tmp_path):
    (tmp_path / "out.json").write_text("{}")
    os.symlink("out.json", tmp_path / "m.onnx.data")
    code, _, err = _run(capsys, *_TRANSFORM, "--export", str(tmp_path / "m.onnx"),
                        "--json", str(tmp_path / "m.onnx.data"))
    assert code == 2 and "--json" in err and "external weights" in err and "give each its own file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx.data", "out.json"]
    assert os.readlink(tmp_path / "m.onnx.data") == "out.json"


def test_a_directory_at_the_onnx_data_file_is_refused_before_the_transform(capsys, tmp_path):
    (tmp_path / "m.onnx.data").mkdir()
    code, out, err = _run(capsys, *_TRANSFORM, "--json", str(tmp_path / "r.json"),
                          "--export", str(tmp_path / "m.onnx"))
    assert code == 2 and err.count("\n") == 1 and "existing directory" in err and "--export" in err
    assert "transformed in" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx.data"]   # no r.json left behind


def test_a_link_to_the_policy_at_the_onnx_data_file_does_not_refuse_the_export(capsys, tmp_path):
    policy = tmp_path / "policy.yaml"
    text = "orthofx: 1\nrules:\n  - match: {type: Conv2d}\n    apply: orth_regularizer\n"
    policy.write_text(text)
    os.symlink("policy.yaml", tmp_path / "m.onnx.data")   # os.replace puts the weights in place of the link
    code, _, err = _run(capsys, *_TRANSFORM[:2], "--policy", str(policy), "--input-shape", "2,1,8,8",
                        "--export", str(tmp_path / "m.onnx"))
    assert code == 0, err
    assert policy.read_text() == text
    assert not os.path.islink(tmp_path / "m.onnx.data") and (tmp_path / "m.onnx.data").stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data", "policy.yaml"]
