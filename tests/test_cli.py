"""The orthofx command: exit codes, one-line errors, model specs, and the demo."""

import subprocess
import sys
import textwrap

import pytest

from orthofx.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_presets_lists_lorth(capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0 and "lorth" in out


def test_check_accepts_a_good_policy_and_rejects_a_bad_one(capsys, tmp_path):
    code, out, _ = run(capsys, "check", "lorth")
    assert code == 0 and "ok:" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("orthofx: 1\nrules:\n  - match: {type: Conv2d}\n    apply: orth_regularizer\n    with: {wieght: 1}\n")
    code, out, err = run(capsys, "check", str(bad))
    assert code == 2
    assert err.count("\n") == 1 and "bad.yaml:5" in err and "wieght" in err
    assert "Traceback" not in err


def test_explain_and_transform_builtin_models(capsys, tmp_path):
    code, out, _ = run(capsys, "explain", "small_cnn", "--policy", "lorth")
    assert code == 0 and "orth_regularizer" in out
    report_path = tmp_path / "report.json"
    code, out, _ = run(capsys, "transform", "small_cnn", "--policy", "lorth", "--input-shape", "2,1,8,8",
                       "--json", str(report_path))
    assert code == 0 and "sigma_max" in out and report_path.exists()


def test_model_from_a_file(capsys, tmp_path):
    source = tmp_path / "mymodel.py"
    source.write_text(textwrap.dedent("""
        import torch
        def build():
            return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
        def not_a_model():
            return 3
    """))
    code, out, _ = run(capsys, "transform", f"{source}:build", "--policy",
                       "{orthofx: 1, rules: [{match: {type: Conv2d}, apply: orth_regularizer}]}",
                       "--input-shape", "1,3,6,6")
    assert code == 0 and "Conv2d(3->4, k=3, s=1)" in out
    code, _, err = run(capsys, "transform", f"{source}:not_a_model", "--policy", "lorth")
    assert code == 2 and "not a torch.nn.Module" in err


@pytest.mark.parametrize("argv, fragment", [
    (["explain", "no_such_model", "--policy", "lorth"], "no_such_model"),
    (["explain", "small_cnn", "--policy", "no_such_preset_or_file"], "no_such_preset_or_file"),
    (["transform", "small_cnn", "--policy", "lorth", "--input-shape", "1,a"], "--input-shape"),
    (["transform", "missing.py:f", "--policy", "lorth"], "does not exist"),
    (["transform", "small_cnn", "--policy", "lorth", "--export", "m.txt"], "unknown export format"),
    (["transform", "small_cnn", "--policy", "lorth", "--export", "no/such/dir/m.onnx"], "does not exist"),
    (["transform", "small_cnn", "--policy", "lorth", "--json", "no/such/dir/r.json"], "--json"),
])
def test_bad_input_exits_2_with_one_line(capsys, argv, fragment):
    code, _, err = run(capsys, *argv)
    assert code == 2 and fragment in err and err.count("\n") == 1


def test_demo_trains_and_reports(capsys):
    pytest.importorskip("sklearn")
    code, out, err = run(capsys, "demo", "--steps", "30")
    assert code == 0
    assert "test accuracy" in out and "sigma_max" in out
    before, after = out.split("penalty ")[1].split(";")[0].split(" -> ")
    assert float(after) < float(before)


@pytest.mark.parametrize("module", ["orthofx.cli", "orthofx"])
def test_console_script_entry_point_runs(module):
    result = subprocess.run([sys.executable, "-m", module, "presets"], capture_output=True, text=True)
    assert result.returncode == 0 and "lorth" in result.stdout


def test_bad_export_path_fails_before_the_transform(capsys, tmp_path):
    (tmp_path / "d.pt").mkdir()
    code, out, err = run(capsys, "transform", "small_cnn", "--policy", "lorth", "--export", str(tmp_path / "d.pt"))
    assert code == 2 and "existing directory" in err and "transformed in" not in out


def test_transform_exports(capsys, tmp_path):
    path = tmp_path / "m.pt2"
    code, out, _ = run(capsys, "transform", "small_cnn", "--policy", "lorth", "--input-shape", "2,1,8,8",
                       "--export", str(path))
    assert code == 0 and path.exists() and "pt2 ->" in out
