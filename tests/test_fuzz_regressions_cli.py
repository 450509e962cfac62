"""Regressions found by fuzzing the orthofx command (orthofx/cli.py): each test failed before its fix.

Every command runs in-process through ``orthofx.cli.main(argv)``, as in tests/test_cli.py.
"""

import os
import re
import sys
import textwrap

import pytest

from orthofx.cli import main

TRANSFORM = ["transform", "small_cnn", "--policy", "lorth", "--input-shape", "2,1,8,8"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def files_in(folder):
    """Every entry under ``folder``, hidden ones (a staging folder left behind) included."""
    return sorted(os.listdir(folder))


# ------------------------------------------------------------------------------------------------ output files


def test_plot_with_an_unknown_image_suffix_fails_before_the_transform(capsys, tmp_path):
    # matplotlib's raw ValueError ("Format 'txt' is not supported") came as a traceback after the transform
    pytest.importorskip("matplotlib")
    code, out, err = run(capsys, *TRANSFORM, "--plot", str(tmp_path / "spectra.txt"))
    assert code == 2 and err.count("\n") == 1
    assert "--plot" in err and "unknown image format .txt" in err and ".png" in err
    assert "transformed in" not in out and files_in(tmp_path) == []


def test_plot_without_a_suffix_is_refused_instead_of_writing_another_file(capsys, tmp_path):
    # matplotlib wrote 'spectra.png' while the command printed "wrote .../spectra" and exited 0
    pytest.importorskip("matplotlib")
    code, out, err = run(capsys, *TRANSFORM, "--plot", str(tmp_path / "spectra"))
    assert code == 2 and err.count("\n") == 1 and "no suffix" in err
    assert files_in(tmp_path) == []


_LEAF_MODEL = """
import torch
from torch import nn


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # a branch on a tensor's value: fx keeps Gate as a leaf, torch.export cannot take it
            return x
        return -x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.fc(x))


def build():
    torch.manual_seed(0)
    return Net()
"""


@pytest.fixture
def unexportable_model(tmp_path):
    """A model that transforms (fx, a leaf) but that torch.export cannot export: a failure after the transform."""
    source = tmp_path / "models" / "leafy.py"
    source.parent.mkdir()
    source.write_text(_LEAF_MODEL)
    return f"{source}:build"


def test_a_failed_export_leaves_none_of_the_outputs_behind(capsys, tmp_path, unexportable_model):
    # --json and --plot were written before --export failed: exit 2 with report.json and spectra.png on disk
    pytest.importorskip("matplotlib")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, out, err = run(capsys, "transform", unexportable_model, "--policy", "lorth", "--input-shape", "2,4",
                         "--json", str(out_dir / "report.json"), "--plot", str(out_dir / "spectra.png"),
                         "--export", str(out_dir / "model.pt2"))
    assert files_in(out_dir) == []  # no output, no half-written one, no staging folder
    assert code == 2 and "--export" in err and "torch.export failed" in err
    assert "transformed in" in out  # the failure came after the transform


def test_a_failed_export_prints_the_one_line_error_only(capsys, tmp_path, unexportable_model):
    # torch.export prints the partial graph of a failed export to stderr (27 lines here) before the error line
    code, _, err = run(capsys, "transform", unexportable_model, "--policy", "lorth", "--input-shape", "2,4",
                       "--export", str(tmp_path / "model.pt2"))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("orthofx: error: --export")


def test_an_output_name_the_file_system_refuses_fails_before_the_transform(capsys, tmp_path):
    # [Errno 36] File name too long came after the transform, without saying which option it was about
    name = "r" * 300 + ".json"
    code, out, err = run(capsys, *TRANSFORM, "--json", str(tmp_path / name))
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("orthofx: error: --json") and "too long" in err
    assert "transformed in" not in out and files_in(tmp_path) == []


def test_an_export_path_with_a_nul_byte_is_refused(capsys, tmp_path):
    # torch.save cut the name at the NUL: the command printed "pt -> .../m\x00.pt", exited 0, and wrote '.../m'
    code, out, err = run(capsys, *TRANSFORM, "--export", str(tmp_path / "m") + "\0.pt")
    assert code == 2 and "NUL byte" in err and err.count("\n") == 1
    assert files_in(tmp_path) == []


def test_two_outputs_naming_the_same_file_are_refused(capsys, tmp_path):
    # the plot silently overwrote the JSON report (exit 0, report lost)
    pytest.importorskip("matplotlib")
    path = tmp_path / "out.png"
    same = os.path.join(str(tmp_path), ".", "out.png")
    code, out, err = run(capsys, *TRANSFORM, "--json", str(path), "--plot", same)
    assert code == 2 and "--json and --plot both name" in err
    assert not path.exists()


# ------------------------------------------------------------------------------------------------ model specs


@pytest.mark.parametrize("source, fragment", [
    ("raise SystemExit('no GPU')\n", "called sys.exit('no GPU') while being imported"),
    ("import sys, torch\ndef build():\n    sys.exit(3)\n", "called sys.exit(3)"),
])
def test_a_model_that_calls_sys_exit_exits_2_with_one_line(capsys, tmp_path, source, fragment):
    # SystemExit is no Exception: it went through main() and ended orthofx with the user's status and message
    path = tmp_path / "exiting.py"
    path.write_text(source)
    code, _, err = run(capsys, "explain", f"{path}:build", "--policy", "lorth")
    assert code == 2 and fragment in err and err.count("\n") == 1


def test_a_model_script_that_parses_its_command_line_at_import_sees_no_arguments(capsys, tmp_path, monkeypatch):
    # the script's parse_args() read orthofx's own arguments and exited 2 with the script's usage message
    path = tmp_path / "train.py"
    path.write_text(textwrap.dedent("""
        import argparse
        import torch
        parser = argparse.ArgumentParser()
        parser.add_argument("--width", type=int, default=5)
        args = parser.parse_args()
        def build():
            return torch.nn.Sequential(torch.nn.Linear(3, args.width))
    """))
    argv = ["explain", f"{path}:build", "--policy", "lorth"]
    monkeypatch.setattr(sys, "argv", ["orthofx"] + argv)  # as `orthofx explain ...` from a shell
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert "Linear(3->5)" in out
    assert sys.argv == ["orthofx"] + argv  # restored


def test_a_model_spec_without_a_factory_name_says_so(capsys, tmp_path):
    # was "'model.py' has no attribute ''"
    path = tmp_path / "model.py"
    path.write_text("import torch\ndef build():\n    return torch.nn.Linear(3, 3)\n")
    code, _, err = run(capsys, "explain", f"{path}:", "--policy", "lorth")
    assert code == 2 and "names no factory after ':'" in err and err.count("\n") == 1


def test_a_model_file_without_the_py_suffix_is_read_as_python(capsys, tmp_path):
    # an existing file was taken for a module name: "cannot import ... No module named 'model'"
    path = tmp_path / "model.txt"
    path.write_text("import torch\ndef build():\n    return torch.nn.Sequential(torch.nn.Linear(3, 6))\n")
    code, out, err = run(capsys, "explain", f"{path}:build", "--policy", "lorth")
    assert code == 0, err
    assert "Linear(3->6)" in out


def test_a_directory_as_model_file_says_so(capsys, tmp_path):
    # the directory was imported as a namespace package: "'<dir>' has no attribute 'build'"
    code, _, err = run(capsys, "explain", f"{tmp_path}:build", "--policy", "lorth")
    assert code == 2 and "is a directory" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------------------ other arguments


@pytest.mark.parametrize("shape", ["1_0,1,8,8", "\u0661,1,8,8", "\uff11,1,8,8"])
def test_input_shape_takes_plain_digits_only(capsys, shape):
    # int() took '1_0' as 10 and Arabic-Indic or full-width digits as 1: the command ran on a shape not written
    code, out, err = run(capsys, "explain", "small_cnn", "--policy", "lorth", "--input-shape", shape)
    assert code == 2 and "--input-shape must be comma-separated positive integers" in err and out == ""


def test_input_shape_with_a_negative_size_says_sizes_are_positive(capsys):
    # it said "must be comma-separated integers", which -8 is
    code, out, err = run(capsys, "explain", "small_cnn", "--policy", "lorth", "--input-shape", "2,1,-8,8")
    assert code == 2 and "positive integers" in err and out == ""


def test_check_with_an_empty_model_is_an_error(capsys):
    # --model "" (an unset shell variable) was taken for no --model: exit 0 without planning anything
    code, out, err = run(capsys, "check", "lorth", "--model", "")
    assert code == 2 and "unknown model ''" in err and out == ""


@pytest.mark.parametrize("argv", [
    ["check", "lorth", "--model", "no_such_model"],
    ["check", "lorth", "--model", "small_cnn", "--input-shape", "1,3,8,8"],
    ["demo", "--policy", "no_such_policy", "--steps", "1"],
])
def test_a_failing_command_prints_nothing_on_stdout(capsys, argv):
    # check printed "ok: <preset:lorth>: ..." and the demo its "== explain" heading before failing
    if argv[0] == "demo":
        pytest.importorskip("sklearn")
    code, out, err = run(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and out == ""


def test_demo_seed_out_of_torch_range_is_a_usage_error(capsys):
    # torch.manual_seed raised a raw "ValueError: Overflow when unpacking long long" traceback
    with pytest.raises(SystemExit) as info:
        main(["demo", "--seed", str(2 ** 64), "--steps", "1"])
    assert info.value.code == 2 and "--seed" in capsys.readouterr().err


def test_an_unexpected_failure_exits_1_with_one_line(capsys, monkeypatch):
    # any exception but OrthofxError and OSError came out as a traceback without --debug
    import orthofx.cli

    def broken_report(gm):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(orthofx.cli, "report", broken_report)
    code, _, err = run(capsys, *TRANSFORM)
    assert code == 1 and err.count("\n") == 1
    assert "unexpected RuntimeError: boom second line" in err and "--debug" in err
    code, _, err = run(capsys, *TRANSFORM, "--debug")  # the traceback, then the same line and status
    assert code == 1 and "Traceback (most recent call last)" in err and "RuntimeError: boom" in err
    assert err.rstrip().splitlines()[-1] == "orthofx: error: unexpected RuntimeError: boom second line"


# ------------------------------------------------------------------------------------------------ Ctrl-C


def run_interrupted(capsys, *argv):
    """``run``, with a KeyboardInterrupt that escapes main() turned into a failure of this test (not an abort of
    the whole pytest session)."""
    try:
        return run(capsys, *argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped orthofx.cli.main")


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("argv, step", [
    (["presets"], "presets"),
    (["check", "lorth", "--model", "small_cnn"], "explain"),
    (["explain", "small_cnn", "--policy", "lorth"], "explain"),
    (TRANSFORM, "transform"),
    (["demo", "--steps", "2", "--batch-size", "8"], "load_digits_tensors"),
])
def test_ctrl_c_exits_130_with_one_line(capsys, monkeypatch, argv, step):
    # Ctrl-C came out as a Python traceback (and the shell's status of a crash)
    import orthofx.cli

    monkeypatch.setattr(orthofx.cli, step, interrupt)
    code, out, err = run_interrupted(capsys, *argv)
    assert (code, out, err) == (130, "", "orthofx: interrupted\n")
    code, out, err = run_interrupted(capsys, *argv, "--debug")  # the traceback too, the same status
    assert code == 130 and "Traceback (most recent call last)" in err and err.endswith("orthofx: interrupted\n")


def test_ctrl_c_while_writing_the_outputs_leaves_no_file_behind(capsys, monkeypatch, tmp_path):
    # the interrupt escaped main() as a traceback; the staged report.json and the half-written model must go
    import orthofx.cli

    def half_written_export(gm, path, inputs):
        with open(path, "wb") as handle:
            handle.write(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(orthofx.cli, "_export", half_written_export)
    code, _, err = run_interrupted(capsys, *TRANSFORM, "--json", str(tmp_path / "report.json"),
                                   "--export", str(tmp_path / "model.pt"))
    assert (code, err) == (130, "orthofx: interrupted\n")
    assert files_in(tmp_path) == []  # no output, no staging folder


@pytest.mark.skipif(not hasattr(os, "kill") or sys.platform == "win32", reason="needs SIGINT by os.kill")
def test_ctrl_c_while_moving_the_outputs_into_place_moves_all_of_them(capsys, monkeypatch, tmp_path):
    # a real SIGINT after the first output was moved into place stopped the move halfway: report.json was kept,
    # model.pt discarded (and the interrupt escaped main() as a traceback)
    import signal

    real_replace = os.replace
    moved = []

    def replace_then_ctrl_c(source, target):
        real_replace(source, target)
        moved.append(os.path.basename(target))
        if len(moved) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "replace", replace_then_ctrl_c)
    code, _, err = run_interrupted(capsys, *TRANSFORM, "--json", str(tmp_path / "report.json"),
                                   "--export", str(tmp_path / "model.pt"))
    monkeypatch.undo()
    assert (code, err) == (130, "orthofx: interrupted\n")
    assert moved == ["report.json", "model.pt"]
    assert files_in(tmp_path) == ["model.pt", "report.json"]  # all of them, no staging folder


def test_ctrl_c_during_the_demo_training_ends_the_progress_line(capsys, monkeypatch):
    # 'orthofx: interrupted' (or any error) was appended to the unfinished progress bar line
    pytest.importorskip("sklearn")
    import orthofx.cli

    calls = []

    def penalty_interrupted_at_step_2(gm):
        calls.append(gm)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return orthofx.penalty(gm)

    monkeypatch.setattr(orthofx.cli, "penalty", penalty_interrupted_at_step_2)
    code, out, err = run_interrupted(capsys, "demo", "--steps", "3", "--batch-size", "8")
    assert code == 130 and "test accuracy" not in out
    assert re.fullmatch(r"\r\[[#.]+\] +1/3 task [^\n]*\northofx: interrupted\n", err), err


# ------------------------------------------------------------------------------------------------ demo numbers


def test_demo_stops_at_the_first_non_finite_loss(capsys):
    # --lr 1e308 overflowed the weights at step 1: the demo trained on nan, printed a table of nan and exited 0
    pytest.importorskip("sklearn")
    code, out, err = run(capsys, "demo", "--lr", "1e308", "--steps", "3", "--batch-size", "8")
    assert code == 1 and "test accuracy" not in out and "== report" not in out
    assert err.endswith("\n") and err.split("\n")[-2] == (
        "orthofx: error: training diverged at step 2 of 3: the loss is nan (task nan, penalty nan); "
        "try a smaller --lr than 1e+308 (the default is 0.01)")


def test_demo_whose_last_update_overflows_the_weights_fails(capsys):
    # with one step the loss was finite, the update was not: exit 0 with a report of nan
    pytest.importorskip("sklearn")
    code, out, err = run(capsys, "demo", "--lr", "1e308", "--steps", "1", "--batch-size", "8")
    assert code == 1 and "test accuracy" not in out
    assert err.split("\n")[-2] == ("orthofx: error: training diverged at step 1 of 1: the update left parameters "
                                   "that are not finite; try a smaller --lr than 1e+308 (the default is 0.01)")


def test_demo_batch_larger_than_the_training_data_is_a_usage_error(capsys):
    # batches are drawn with replacement: --batch-size 100000 trained on a batch of the same images repeated
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    train_size = int(0.8 * len(sklearn_datasets.load_digits().images))  # the demo's 80 % training split
    with pytest.raises(SystemExit) as info:
        main(["demo", "--steps", "1", "--batch-size", str(train_size + 1)])
    out, err = capsys.readouterr()
    assert info.value.code == 2 and out == ""
    assert err.startswith("usage: orthofx demo") and err.split("\n")[-2] == (
        f"orthofx demo: error: argument --batch-size: expected at most {train_size} (the images of the digits "
        f"training split), got {train_size + 1}")
    # as large as the split is allowed
    assert main(["demo", "--steps", "1", "--batch-size", str(train_size)]) == 0
