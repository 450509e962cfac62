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


# ----------------------------------------------------------------------------------------------- audit: bad input


@pytest.mark.parametrize("argv, fragment", [
    (["demo", "--steps", "0"], "--steps"),
    (["demo", "--steps", "-3"], "--steps"),
    (["demo", "--batch-size", "0"], "--batch-size"),
    (["demo", "--lr", "-0.1"], "--lr"),
    (["demo", "--lr", "nan"], "--lr"),
    (["demo", "--lr", "inf"], "--lr"),
])
def test_demo_rejects_bad_numbers_before_loading_anything(capsys, argv, fragment):
    # --steps 0 used to crash with a raw TypeError after the explain; --batch-size 0 trained on empty batches
    # (task loss nan); --lr -0.1 got Adam's raw ValueError
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    assert info.value.code == 2 and fragment in err and "explain" not in out


def test_model_spec_with_an_empty_module_name_exits_2(capsys):
    code, _, err = run(capsys, "explain", ":build", "--policy", "lorth")
    assert code == 2 and "':build'" in err and err.count("\n") == 1


def test_model_module_that_raises_on_import_exits_2(capsys, tmp_path, monkeypatch):
    (tmp_path / "orthofx_cli_broken_mod.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = run(capsys, "explain", "orthofx_cli_broken_mod:build", "--policy", "lorth")
    assert code == 2 and "no GPU here" in err and err.count("\n") == 1


def test_model_file_that_fails_to_load_exits_2(capsys, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def build(:\n")
    code, _, err = run(capsys, "explain", f"{broken}:build", "--policy", "lorth")
    assert code == 2 and "cannot load model file" in err and "SyntaxError" in err and err.count("\n") == 1
    raising = tmp_path / "raising.py"
    raising.write_text("import torch\ndef build():\n    raise ValueError('bad width')\n")
    code, _, err = run(capsys, "explain", f"{raising}:build", "--policy", "lorth")
    assert code == 2 and "bad width" in err and err.count("\n") == 1


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_output_path_that_is_a_directory_fails_before_the_transform(capsys, tmp_path, option):
    code, out, err = run(capsys, "transform", "small_cnn", "--policy", "lorth", option, str(tmp_path))
    assert code == 2 and option in err and "directory" in err and "transformed in" not in out


def test_help_and_missing_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0 and "transform" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def test_missing_policy_file_exits_2(capsys, tmp_path):
    code, _, err = run(capsys, "explain", "small_cnn", "--policy", str(tmp_path / "nope.yaml"))
    assert code == 2 and "policy file not found" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------------------------- orthofx.penalty
# (the demo's training loop adds it to the task loss)

import torch  # noqa: E402
from torch import nn  # noqa: E402

import orthofx  # noqa: E402
from orthofx import metrics  # noqa: E402
from references import lorth64  # noqa: E402


class _PenaltyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, stride=2, groups=2, padding=1)
        self.b = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.b(torch.relu(self.a(x)))).flatten(1))


_PENALTY_POLICY = {"rules": [
    {"name": "a", "match": {"name": "a"}, "apply": "orth_regularizer", "with": {"weight": 0.3}},
    {"name": "b", "match": {"name": "b"}, "apply": "orth_regularizer", "with": {"weight": 0.7}},
    {"name": "fc", "match": {"name": "fc"}, "apply": "orth_regularizer", "with": {"weight": 0.0}},
]}


def _penalty_model(dtype=torch.float64):
    torch.manual_seed(0)
    model = _PenaltyNet().to(dtype)
    return orthofx.transform(model, _PENALTY_POLICY, example_inputs=(torch.randn(2, 4, 8, 8, dtype=dtype),))


def test_penalty_is_the_weighted_sum_of_the_terms_by_hand():
    gm = _penalty_model()
    a, b = gm.get_submodule("a").weight, gm.get_submodule("b").weight
    expected = 0.3 * metrics.lorth(a, stride=2, groups=2) + 0.7 * metrics.lorth(b)
    # the terms by hand are P0's L_orth: the dense circular operator's Gram error (Theorem 7), float64
    dense = 0.3 * lorth64(a, stride=2, groups=2) + 0.7 * lorth64(b)
    assert float(expected) == pytest.approx(dense, rel=1e-10)
    value = orthofx.penalty(gm)
    assert value.dtype == torch.float64 and value.shape == ()
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
    value.backward()
    assert a.grad is not None and b.grad is not None
    assert gm.get_submodule("fc").weight.grad is None  # a term of weight 0 is left out of the graph
    terms = orthofx.penalty_terms(gm)
    assert set(terms) == {"a/a", "b/b", "fc/fc"} and float(terms["fc/fc"]) == 0.0
    torch.testing.assert_close(sum(terms.values()), expected.detach(), rtol=1e-12, atol=0)
    # the same value under no_grad, in eval mode and through a DataParallel wrapper
    with torch.no_grad():
        quiet = orthofx.penalty(gm)
    assert not quiet.requires_grad
    torch.testing.assert_close(quiet, expected.detach(), rtol=1e-12, atol=0)
    gm.eval()
    torch.testing.assert_close(orthofx.penalty(gm).detach(), expected.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(orthofx.penalty(nn.DataParallel(gm)).detach(), expected.detach(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_penalty_without_terms_is_a_zero_in_the_models_dtype(dtype):
    # only weight-0 terms, and no terms at all: 0-dim zeros in the model's dtype (it was float32 for a float64 model)
    torch.manual_seed(0)
    model = _PenaltyNet().to(dtype)
    inputs = (torch.randn(2, 4, 8, 8, dtype=dtype),)
    zero_weight = {"rules": [{"match": {"type": "Conv2d"}, "apply": "orth_regularizer", "with": {"weight": 0.0}}]}
    no_terms = {"rules": [{"match": {"type": "Linear"}, "apply": "riemannian"}]}
    for policy in (zero_weight, no_terms):
        gm = orthofx.transform(model, policy, example_inputs=inputs)
        value = orthofx.penalty(gm)
        assert value.shape == () and value.dtype == dtype and float(value) == 0.0
        assert value.device == next(gm.parameters()).device
        (value + gm(*inputs).sum()).backward()  # adds to a task loss of the same dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_penalty_without_terms_is_on_the_models_device():
    torch.manual_seed(0)
    model = _PenaltyNet().cuda()
    gm = orthofx.transform(model, {"rules": [{"match": {"type": "Linear"}, "apply": "riemannian"}]},
                           example_inputs=(torch.randn(2, 4, 8, 8, device="cuda"),))
    value = orthofx.penalty(gm)
    assert value.device.type == "cuda" and value.dtype == torch.float32 and float(value) == 0.0


# ----------------------------------------------------------------------------------------------- audit: model files,
# input shapes and usage errors

import os  # noqa: E402
import pickle  # noqa: E402

from orthofx.cli import CliError, load_model  # noqa: E402


@pytest.fixture
def restored_import_state(monkeypatch):
    """sys.path as it was after the test, and the sibling modules a test imports removed from sys.modules."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    names = []
    yield names
    for name in names:
        sys.modules.pop(name, None)


def test_model_file_imports_a_sibling_module(capsys, tmp_path, restored_import_state):
    # like `python dir/model.py`: the file's directory is importable while it runs and while the factory builds
    # the model (it was not: ModuleNotFoundError: No module named ...)
    restored_import_state.extend(["orthofx_cli_sibling_blocks", "orthofx_cli_lazy_sibling"])
    (tmp_path / "orthofx_cli_sibling_blocks.py").write_text(
        "import torch\nclass Block(torch.nn.Conv2d):\n    pass\n")
    (tmp_path / "orthofx_cli_lazy_sibling.py").write_text("WIDTH = 5\n")
    (tmp_path / "model.py").write_text(textwrap.dedent("""
        import torch
        from orthofx_cli_sibling_blocks import Block
        def build():
            from orthofx_cli_lazy_sibling import WIDTH  # imported when the factory runs
            return torch.nn.Sequential(Block(3, WIDTH, 3))
    """))
    code, out, err = run(capsys, "explain", f"{tmp_path / 'model.py'}:build", "--policy", "lorth")
    assert code == 0, err
    assert "(3->5, k=3, s=1)" in out
    folder = os.path.realpath(tmp_path)
    assert sys.path.count(folder) == 1
    model = load_model(f"{tmp_path / 'model.py'}:build")  # loading again does not add the directory twice
    assert sys.path.count(folder) == 1 and model[0].out_channels == 5


def test_two_model_files_with_the_same_name_stay_distinct(tmp_path, restored_import_state):
    # both were registered as sys.modules['orthofx_user_model_model']: the second replaced the first, and
    # pickling (torch.save) the first model failed with "it's not the same object as ..."
    for folder, width in (("a", 2), ("b", 3)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "model.py").write_text(
            f"import torch\nclass Net(torch.nn.Linear):\n    pass\ndef build():\n    return Net(4, {width})\n")
    first = load_model(f"{tmp_path / 'a' / 'model.py'}:build")
    second = load_model(f"{tmp_path / 'b' / 'model.py'}:build")
    assert type(first) is not type(second)
    for model, width in ((first, 2), (second, 3)):
        assert sys.modules[type(model).__module__].Net is type(model)
        assert pickle.loads(pickle.dumps(model)).out_features == width


def test_model_file_that_fails_leaves_no_module_behind(tmp_path, restored_import_state):
    broken = tmp_path / "orthofx_cli_half_loaded.py"
    broken.write_text("import torch\nraise RuntimeError('half way')\n")
    before = set(sys.modules)
    with pytest.raises(CliError, match="half way"):
        load_model(f"{broken}:build")
    assert not [name for name in set(sys.modules) - before if "orthofx_cli_half_loaded" in name]


@pytest.mark.parametrize("argv", [
    ["explain", "small_cnn", "--policy", "lorth", "--input-shape", "1,3,32,32"],
    ["check", "lorth", "--model", "small_cnn", "--input-shape", "1,3,32,32"],
    ["transform", "small_cnn", "--policy", "lorth", "--input-shape", "1,3,32,32"],
])
def test_an_input_shape_the_model_cannot_take_exits_2(capsys, argv):
    # explain and check printed the plan and exited 0 for an input small_cnn (1 channel) cannot take
    code, out, err = run(capsys, *argv)
    assert code == 2 and err.count("\n") == 1
    assert "--input-shape 1,3,32,32" in err and "3 channels" in err
    assert "planned" not in out and "transformed in" not in out


def test_check_input_shape_without_model_is_a_usage_error(capsys):
    # --input-shape was silently ignored
    code, out, err = run(capsys, "check", "lorth", "--input-shape", "1,3,32,32")
    assert code == 2 and err.count("\n") == 1
    assert "--input-shape needs --model" in err and out == ""


@pytest.mark.parametrize("command", ["explain", "transform"])
def test_example_input_follows_the_models_dtype(capsys, tmp_path, command):
    # the example input was float32 whatever the model: a float64 model failed with a dtype mismatch
    source = tmp_path / "wide.py"
    source.write_text("import torch\ndef build():\n    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3),"
                      " torch.nn.Flatten(), torch.nn.Linear(16, 2)).double()\n")
    code, out, err = run(capsys, command, f"{source}:build", "--policy", "lorth", "--input-shape", "2,3,4,4")
    assert code == 0, err
    assert "Linear(16->2)" in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_example_input_follows_the_models_device(capsys, tmp_path):
    source = tmp_path / "on_gpu.py"
    source.write_text("import torch\ndef build():\n    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).cuda()\n")
    code, out, err = run(capsys, "transform", f"{source}:build", "--policy", "lorth", "--input-shape", "2,3,6,6")
    assert code == 0, err


def test_debug_after_the_subcommand_shows_the_traceback(capsys):
    # the messages say "--debug shows the traceback", but `orthofx explain ... --debug` was refused by argparse
    # and with the same exit status as without (a re-raised error ended the process with 1 instead of 2)
    argv = ["explain", "missing.py:f", "--policy", "lorth"]
    for debug_argv in (argv + ["--debug"], ["--debug"] + argv):  # after the subcommand, or before it as before
        code, _, err = run(capsys, *debug_argv)
        assert code == 2 and "Traceback (most recent call last)" in err and "CliError" in err
        assert err.rstrip().splitlines()[-1].startswith("orthofx: error: ") and "does not exist" in err
    code, _, err = run(capsys, *argv)
    assert code == 2 and "Traceback" not in err


def test_plot_without_matplotlib_fails_before_the_transform(capsys, tmp_path, monkeypatch):
    # the ImportError was raised after the transform, as a raw traceback
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, out, err = run(capsys, "transform", "small_cnn", "--policy", "lorth", "--plot", str(tmp_path / "s.png"))
    assert code == 2 and err.count("\n") == 1
    assert "--plot" in err and "matplotlib" in err and "transformed in" not in out


@pytest.mark.parametrize("shape", ["1,99999999999999999999", "100000,100000,100000"])
def test_an_input_shape_too_large_to_create_exits_2(capsys, shape):
    # a raw TypeError (integer overflow) or RuntimeError (4e15 bytes) traceback before
    code, _, err = run(capsys, "explain", "small_cnn", "--policy", "lorth", "--input-shape", shape)
    assert code == 2 and err.count("\n") == 1 and f"--input-shape {shape}" in err


@pytest.mark.slow
def test_demo_progress_goes_to_the_current_stderr(capsys):
    # the progress bar's stream was sys.stderr as it was when orthofx.cli was imported: a redirected (or
    # replaced) sys.stderr did not get it
    pytest.importorskip("sklearn")
    import contextlib
    import io
    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        code = main(["demo", "--steps", "2", "--batch-size", "8"])
    assert code == 0
    assert "2/2 task" in buffer.getvalue()


@pytest.mark.parametrize("model, fragment", [("resnet18", "cannot take the demo's inputs"),
                                             ("deep_cnn", "cannot take the demo's inputs")])
def test_demo_refuses_a_model_that_cannot_classify_digits_before_the_explain(capsys, model, fragment):
    """The demo's data is fixed (1x8x8 digits, 10 classes): such a model used to fail in transform, after the
    explain, with advice to check input shapes that the demo does not let the user choose."""
    pytest.importorskip("sklearn")
    code, out, err = run(capsys, "demo", "--model", model, "--steps", "2")
    assert code == 2 and fragment in err and "small_cnn" in err and "explain" not in out


def test_version_prints_orthofx_and_torch_versions_and_exits_0(capsys):
    import importlib.metadata
    import platform

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    line = capsys.readouterr().out.strip()
    assert line == (f"orthofx {importlib.metadata.version('orthofx')} (torch {torch.__version__}, "
                    f"Python {platform.python_version()})")
