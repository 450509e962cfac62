"""The benchmark and example scripts' output paths and smoke runs (session 46).

* A benchmark run without ``--out`` writes into ``benchmarks/results/local/``, which ``.gitignore`` ignores: it
  never replaces the committed JSON that ``benchmarks/RESULTS.md`` cites (they were overwritten by every smoke
  run before).
* ``--out`` is checked when the command line is parsed (``examples/_cli.output_file``, shared with the examples'
  ``--out``): a folder, a missing folder or another suffix stops the script before it runs (``--out .`` used to
  run the whole benchmark, then fail with ``IsADirectoryError``; a missing folder was created silently).
* ``orthogonal_linear.py --quick`` is a short run (the defaults take many minutes on one CPU thread) that writes its
  rows after every shape; ``compile.py --quick`` narrows the presets and precisions unless they are given.
* ``export.py`` explains the blank cells of an export that failed (``.onnx`` without the onnx extra).

The scripts run on the CPU with one thread, as in ``test_benchmark_scripts.py``.
"""

import argparse
import hashlib
import importlib.util
import json
import os
import re
import runpy
import shutil
import subprocess
import sys

import pytest
import torch

from example_scripts import ROOT

BENCHMARKS = os.path.join(ROOT, "benchmarks")
RESULTS = os.path.join(BENCHMARKS, "results")
LOCAL = os.path.join(RESULTS, "local")
SCRIPTS = sorted(name[:-3] for name in os.listdir(BENCHMARKS) if name.endswith(".py") and name != "timing.py")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
       "OMP_NUM_THREADS": "1"}


def _ignored_by_the_repository_rules(relative_path, tmp_path):
    """Whether ``.gitignore`` of this checkout ignores ``relative_path`` (a path from the repository root), asked of
    a fresh repository holding only that ``.gitignore``: the answer does not depend on where the checkout lies (a
    copy under an ignored folder would make every path look ignored) nor on what is tracked."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "rules"
    if not (repo / ".git").exists():
        repo.mkdir()
        subprocess.run(["git", "init", "-q", str(repo)], check=True, capture_output=True)
        shutil.copy(os.path.join(ROOT, ".gitignore"), repo / ".gitignore")
    answer = subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", "--no-index", relative_path],
                            capture_output=True, text=True)
    assert answer.returncode in (0, 1), answer.stderr
    return answer.returncode == 0


def _committed_results():
    """Each JSON file in ``benchmarks/results`` (the committed ones) and the digest of its bytes."""
    return {name: hashlib.sha256(open(os.path.join(RESULTS, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(RESULTS)) if name.endswith(".json")}


@pytest.fixture
def local_results_restored():
    """Put ``benchmarks/results/local`` back as it was: a file a test's run replaced gets its old bytes back, a new
    one is removed, and the folder too if the test made it."""
    existed = os.path.isdir(LOCAL)
    before = {name: open(os.path.join(LOCAL, name), "rb").read() for name in os.listdir(LOCAL)} if existed else {}
    yield
    if not os.path.isdir(LOCAL):
        return
    for name in os.listdir(LOCAL):
        path = os.path.join(LOCAL, name)
        if name in before:
            with open(path, "wb") as f:
                f.write(before[name])
        elif os.path.isfile(path):
            os.remove(path)
    if not existed and not os.listdir(LOCAL):
        os.rmdir(LOCAL)


def _load_script(name, monkeypatch):
    """``benchmarks/<name>.py`` as a module (its ``main`` not run); it imports ``timing`` from its folder."""
    monkeypatch.syspath_prepend(BENCHMARKS)
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}_s46", os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _main_in_process(name, argv, monkeypatch):
    """``benchmarks/<name>.py``'s ``main()`` with ``argv``; torch's thread count put back (``--threads``)."""
    module = _load_script(name, monkeypatch)
    monkeypatch.setattr(sys, "argv", [os.path.join(BENCHMARKS, f"{name}.py"), *argv])
    threads = torch.get_num_threads()
    try:
        return module.main()
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------- the default --out


@pytest.mark.slow
def test_a_run_without_out_writes_an_ignored_file_and_leaves_the_committed_results(tmp_path, local_results_restored):
    """svd_passes.py at its smallest settings (seconds), as the RESULTS.md smoke commands run, without --out."""
    committed = _committed_results()
    proc = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "svd_passes.py"), "--quick", "--batches", "8",
                           "--rounds", "1", "--inner", "1", "--hook-calls", "1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    written = re.search(r"^wrote (.+)$", proc.stdout, re.M).group(1)
    relative = os.path.relpath(os.path.abspath(os.path.join(ROOT, written)), ROOT)
    assert relative == os.path.join("benchmarks", "results", "local", "svd_passes.json")
    assert json.load(open(os.path.join(ROOT, relative)))["rows"]
    assert _ignored_by_the_repository_rules(relative, tmp_path)
    assert _committed_results() == committed  # not one committed result rewritten


def test_setup_fills_the_default_out_into_the_ignored_folder(tmp_path, monkeypatch, local_results_restored):
    """timing.setup's default for every script that uses common_arguments, ``<device>`` filled in."""
    timing = _load_script("timing", monkeypatch)
    parser = argparse.ArgumentParser()
    timing.common_arguments(parser, "anything_<device>.json", threads=None)
    args = parser.parse_args(["--device", "cpu"])
    timing.setup(parser, args)
    assert os.path.abspath(args.out) == os.path.join(LOCAL, "anything_cpu.json")
    assert os.path.isdir(LOCAL)  # made for the default (a folder the user names must exist)
    assert _ignored_by_the_repository_rules(os.path.relpath(args.out, ROOT), tmp_path)


def test_the_committed_results_are_not_ignored(tmp_path):
    """The rule that ignores the local folder leaves the committed results beside it tracked."""
    for name in ("export.json", "core_steps.json"):
        assert not _ignored_by_the_repository_rules(os.path.join("benchmarks", "results", name), tmp_path)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_documents_an_ignored_default_out(script, tmp_path, monkeypatch, capsys):
    """``--help`` of each script: its ``--out`` default lies in the ignored folder, and none names a committed
    file (``benchmarks/results/<name>.json``)."""
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: the default path is not wrapped
    monkeypatch.syspath_prepend(BENCHMARKS)
    monkeypatch.setattr(sys, "argv", [os.path.join(BENCHMARKS, f"{script}.py"), "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(os.path.join(BENCHMARKS, f"{script}.py"), run_name="__main__")
    assert done.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    defaults = re.findall(r"default: (benchmarks/results/\S+?\.json)", help_text)
    assert defaults, help_text
    for path in defaults:
        assert path.startswith("benchmarks/results/local/"), path
        assert _ignored_by_the_repository_rules(path.replace("<device>", "cpu"), tmp_path)


# ------------------------------------------------------------------------------------ --out checked when parsed


@pytest.mark.parametrize("script, argv", [
    ("core", ["--quick", "--device", "cpu"]),        # the shared option (timing.common_arguments)
    ("svd_passes", ["--quick"]),                     # the script's own --out
])
@pytest.mark.parametrize("out, message", [
    (".", "'.' is a folder; give a file path ending in .json"),
    (os.path.join("missing", "results.json"), "does not exist; create it first"),
    ("results.txt", "the path must end in .json, got 'results.txt'"),
])
def test_a_bad_out_stops_the_script_before_it_runs(script, argv, out, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        _main_in_process(script, [*argv, "--out", out], monkeypatch)
    assert stopped.value.code == 2
    captured = capsys.readouterr()
    assert "error: argument --out: " in captured.err and message in captured.err
    assert captured.out == ""  # nothing timed, nothing printed
    assert list(tmp_path.iterdir()) == []  # no folder made, no file written


def test_the_examples_png_check_is_the_same_helper(tmp_path):
    """examples/_cli.png_path goes through the same checks (a folder first, then the suffix)."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import _cli
    finally:
        sys.path.remove(os.path.join(ROOT, "examples"))
    with pytest.raises(argparse.ArgumentTypeError, match="is a folder; give a file path ending in .png"):
        _cli.png_path(str(tmp_path))
    with pytest.raises(argparse.ArgumentTypeError, match="must end in .json"):
        _cli.json_path(str(tmp_path / "x.png"))
    assert _cli.json_path(str(tmp_path / "x.json")) == str(tmp_path / "x.json")


# ------------------------------------------------------------------------------------- orthogonal_linear --quick


@pytest.mark.slow
def test_orthogonal_linear_quick_runs_every_candidate_on_small_shapes(tmp_path):
    out = tmp_path / "orthogonal_linear.json"
    proc = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "orthogonal_linear.py"), "--quick",
                           "--repeats", "1", "--threads", "1", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["quick"] is True and results["batch"] == 16 and results["repeats"] == 1
    shapes = ["64->64", "256->16", "16->256", "128->32"]
    has_geotorch = importlib.util.find_spec("geotorch") is not None
    candidates = ["nn.Linear", "orthofx", "orthofx (build f32)", "torch matrix_exp", "torch cayley",
                  "torch householder", *(["geotorch"] if has_geotorch else [])]
    assert [(r["shape"], r["candidate"]) for r in results["rows"]] == [(s, c) for s in shapes for c in candidates]
    for row in results["rows"]:
        base = next(r for r in results["rows"] if r["shape"] == row["shape"] and r["candidate"] == "nn.Linear")
        assert row["ms"] > 0 and row["ratio_to_linear"] == pytest.approx(row["ms"] / base["ms"], rel=1e-9)
        if row["candidate"] != "nn.Linear":  # orthonormal rows or columns after a few Adam steps
            assert 0 <= row["defect"] < (1e-6 if row["candidate"] == "orthofx" else 1e-4), row
    # the rows are written after every shape (a run cut short keeps what it finished)
    assert proc.stdout.count(f"wrote {out}") == len(shapes)
    if not has_geotorch:  # the optional peer's absence is said, not silent
        assert any(note.startswith("geotorch not timed") for note in results["notes"])
        assert "note: geotorch not timed" in proc.stdout


def test_compile_quick_narrows_the_presets_and_precisions_unless_given(monkeypatch):
    """Parsed only (the run itself is test_benchmark_scripts' smoke test): the quick defaults, and options given
    explicitly kept."""
    compile_script = _load_script("compile", monkeypatch)
    seen = {}

    def stop_at_the_inputs(*args, **kwargs):  # torch.randn of the batch: the first work after the options
        raise SystemExit("parsed")

    monkeypatch.setattr(compile_script.torch, "randn", stop_at_the_inputs)
    # a full run turns inductor's caches off for the process: put the setting back after the test
    monkeypatch.setattr(torch.compiler.config, "force_disable_caches", torch.compiler.config.force_disable_caches)
    monkeypatch.setattr(compile_script, "setup", lambda parser, args: seen.setdefault("args", args))
    for argv, presets, precisions in ((["--quick"], ["lorth"], ["fp32"]),
                                      ([], ["lorth", "orthogonal", "convnorm"], ["fp32", "bf16"]),
                                      (["--quick", "--presets", "svd", "--precisions", "bf16"], ["svd"], ["bf16"])):
        seen.clear()
        monkeypatch.setattr(sys, "argv", ["compile.py", *argv, "--device", "cpu"])
        with pytest.raises(SystemExit, match="parsed"):
            compile_script.main()
        assert (seen["args"].presets, seen["args"].precisions) == (presets, precisions), argv


# ----------------------------------------------------------------------------------------- export.py's notes


def test_export_says_why_the_onnx_cells_are_blank(tmp_path, monkeypatch, capsys):
    """With onnx not importable, every .onnx export fails: one note under the table names the error."""
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if the onnx extra were not installed
    out = tmp_path / "export.json"
    _main_in_process("export", ["--quick", "--repeats", "1", "--models", "deep_mlp", "--formats", ".onnx",
                                "--device", "cpu", "--out", str(out)], monkeypatch)
    stdout = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert [r["export.onnx_s"] for r in results["rows"]] == [None, None, None]
    error = results["rows"][0]["export.onnx_error"]
    assert "pip install 'orthofx[onnx]'" in error
    note = f".onnx export failed (every row), so its cells are blank: {error}"
    assert results["notes"] == [note] and stdout.count(f"note: {note}") == 1


def test_export_failures_names_the_rows_of_an_error_that_not_every_row_had(monkeypatch):
    export = _load_script("export", monkeypatch)
    rows = [{"model": "m", "preset": "a", "export.pt2_error": "E1"}, {"model": "m", "preset": "b"},
            {"model": "n", "preset": "a", "export.pt2_error": "E1", "export.onnx_error": "E2"}]
    assert export.export_failures(rows) == [".pt2 export failed (m a, n a), so its cells are blank: E1",
                                            ".onnx export failed (n a), so its cells are blank: E2"]
    assert export.export_failures([{"model": "m", "preset": "a"}]) == []


# --------------------------------------------------------------------------------------------------- examples


def test_a_bare_import_registers_every_pass_the_examples_apply():
    """The examples no longer import ``orthofx.passes.<module>`` to register a pass: ``import orthofx`` does (a
    fresh interpreter, nothing else imported)."""
    code = ("import orthofx; from orthofx.passes import available_passes; "
            "print(' '.join(sorted(available_passes())))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"isometric_init", "jacobian_isometry", "riemannian", "pre_svd", "svd_conditioning"} <= set(
        proc.stdout.split())
    for name in ("deep_isometry", "orthonormal_linear", "svd_conditioning"):
        source = open(os.path.join(ROOT, "examples", f"{name}.py")).read()
        assert "import orthofx.passes." not in source, name


def test_the_examples_default_figures_are_ignored(tmp_path):
    for name in ("deep_isometry", "orthonormal_linear", "svd_conditioning"):
        assert _ignored_by_the_repository_rules(f"{name}.png", tmp_path)
