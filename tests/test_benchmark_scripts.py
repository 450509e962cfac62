"""Every benchmark script (benchmarks/*.py) runs end to end on the CPU at its smallest settings, so that a change
of orthofx's API that breaks one is caught here rather than at the next benchmark run.

Each test runs one script as a subprocess (one thread, ``--out`` into ``tmp_path``; where two tests run the same
script, one of them calls its ``main()`` in the test's process) and checks its exit status, the JSON it writes
(the rows and fields its docstring documents, times finite and positive, each ratio recomputed from the times it
divides) and the table it prints. Optional peers (geoopt, geotorch, orthogonium, deel-torchlip) are
checked to be skipped with a note when they do not import; ONNX exports need the ``onnx`` extra. The scripts time
the CPU here (``--device cpu``): their CUDA paths are not run.
"""

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch

from example_scripts import ROOT

pytestmark = pytest.mark.slow

BENCHMARKS = os.path.join(ROOT, "benchmarks")
# orthofx from this checkout, whatever an installed copy points at; one intra-op thread for the scripts that have
# no --threads (on a busy 2-core machine two threads spin against each other on small ops)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
       "OMP_NUM_THREADS": "1"}


def _run(script, tmp_path, *args, timeout=240):
    """Run ``benchmarks/<script>.py args --out tmp_path/<script>.json``; its stdout and the JSON it wrote."""
    out = tmp_path / f"{script}.json"
    proc = subprocess.run([sys.executable, os.path.join(BENCHMARKS, f"{script}.py"), *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=ENV)
    assert proc.returncode == 0, f"{script}.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert f"wrote {out}" in proc.stdout
    results = json.loads(out.read_text())
    assert results["device"] == "cpu" and results["torch"] == torch.__version__
    assert results["rows"], f"{script}.py wrote no rows"
    return proc.stdout, results


def _run_in_process(script, tmp_path, monkeypatch, capsys, *args):
    """``_run``'s checks on ``benchmarks/<script>.py``'s ``main()`` called in this process, for a script that another
    test runs as a subprocess (this saves the interpreter's start and the imports, ~3 s); one thread, as there."""
    out = tmp_path / f"{script}.json"
    path = os.path.join(BENCHMARKS, f"{script}.py")
    monkeypatch.syspath_prepend(BENCHMARKS)  # the scripts import timing.py from their folder; sys.path is restored
    monkeypatch.setattr(sys, "argv", [path, *args, "--out", str(out)])
    spec = importlib.util.spec_from_file_location(f"benchmark_{script}", path)
    module = importlib.util.module_from_spec(spec)
    threads = torch.get_num_threads()
    try:
        spec.loader.exec_module(module)
        torch.set_num_threads(1)
        module.main()
    finally:
        torch.set_num_threads(threads)  # the scripts' setup() sets --threads
    stdout = capsys.readouterr().out
    assert f"wrote {out}" in stdout
    results = json.loads(out.read_text())
    assert results["device"] == "cpu" and results["torch"] == torch.__version__
    assert results["rows"], f"{script}.py wrote no rows"
    return stdout, results


def _positive(value):
    """A finite number > 0 (not a bool, not None)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _assert_positive(rows, *fields):
    for row in rows:
        for field in fields:
            assert _positive(row[field]), (field, row)


def _assert_ratio(rows, ratio, numerator, group, is_base):
    """``row[ratio] == row[numerator] / base[numerator]`` for the row ``is_base`` picks in each ``group``."""
    bases = {group(row): row[numerator] for row in rows if is_base(row)}
    for row in rows:
        assert row[ratio] == pytest.approx(row[numerator] / bases[group(row)], rel=1e-9), row


def _tables(stdout):
    """The tables printed in ``stdout``, each the list of its body lines: the lines after a ruler of dashes (a
    header's underline, as tabulate and the scripts draw it) that keep to its columns (blank where the ruler has a
    gap between columns), up to the first that does not."""
    lines = stdout.splitlines()
    tables = []
    for i, ruler in enumerate(lines):
        if i == 0 or not lines[i - 1].strip() or not ruler.strip() or not set(ruler) <= {"-", " "}:
            continue
        gaps = [j for j, char in enumerate(ruler) if char == " "]
        body = []
        for line in lines[i + 1:]:
            if not line.strip() or any(j < len(line) and line[j] != " " for j in gaps):
                break
            body.append(line)
        tables.append(body)
    return tables


def _printed_rows(stdout):
    return [line for table in _tables(stdout) for line in table]


def _importable(*modules):
    return all(importlib.util.find_spec(module) is not None for module in modules)


ONNX = ("onnx", "onnxscript", "onnxruntime")


# --------------------------------------------------------------------------------------------------- core.py


def test_core_quick(tmp_path):
    stdout, results = _run("core", tmp_path, "--quick", "--repeats", "1", "--threads", "1", "--device", "cpu")
    rows = results["rows"]
    assert results["quick"] is True and results["threads"] == 1 and results["repeats"] == 1
    _assert_positive(rows, "seconds")
    by = {}
    for row in rows:
        by.setdefault(row["benchmark"], []).append(row)
    assert sorted(by) == ["lorth_overhead", "preset_step", "transform", "transform_preset"]
    # 1. transform latency: both models, the four methods, ratios to prepare_fx; the plain CNN has 50 convs
    transform = by["transform"]
    assert {(r["model"], r["method"]) for r in transform} == {
        (model, method) for model in ("plain_cnn_50", "resnet50")
        for method in ("symbolic_trace", "orthofx.transform", "orthofx.transform+inputs", "prepare_fx")}
    assert {r["convs"] for r in transform if r["model"] == "plain_cnn_50"} == {50}
    _assert_ratio(transform, "ratio_to_prepare_fx", "seconds", lambda r: r["model"],
                  lambda r: r["method"] == "prepare_fx")
    # the presets on the ResNet-50-like model, and their training steps against the plain step
    presets = ["lorth", "orthogonal", "convnorm", "isometric", "jacobian"]
    assert sorted(r["method"] for r in by["transform_preset"]) == sorted(
        ["prepare_fx", *(f"transform {p}" for p in presets)])
    _assert_ratio(by["transform_preset"], "ratio_to_prepare_fx", "seconds", lambda r: r["model"],
                  lambda r: r["method"] == "prepare_fx")
    assert sorted(r["method"] for r in by["preset_step"]) == sorted(["plain step", *(f"{p} step" for p in presets)])
    assert sorted(r["method"] for r in by["lorth_overhead"]) == sorted(
        ["plain step", "step + penalty", "step + penalty every 4 (mean)", "step + penalty every 8 (mean)",
         *(f"every 8, call {call}" for call in range(8))])
    for part in ("preset_step", "lorth_overhead"):
        assert {r["device"] for r in by[part]} == {"cpu"}
        _assert_ratio(by[part], "ratio_to_plain", "seconds", lambda r: r["model"],
                      lambda r: r["method"] == "plain step")
    assert len(_printed_rows(stdout)) == len(rows)


# ------------------------------------------------------------------------------------------------ compile.py


def test_compile_smoke_with_aot_eager(tmp_path):
    """The plain and lorth models, train and eval, fp32 (``--quick``'s presets and precisions), through
    ``torch.compile(fullgraph=True)`` with the aot_eager backend (inductor's code generation would take minutes on
    two CPU cores)."""
    stdout, results = _run("compile", tmp_path, "--quick", "--backend", "aot_eager", "--device", "cpu")
    rows = results["rows"]
    assert results["backend"] == "aot_eager" and results["width"] == 8 and results["repeats"] == 3
    # a cell that failed to compile is written as an error row: here each must have compiled
    assert [r for r in rows if "error" in r] == []
    assert [(r["variant"], r["mode"]) for r in rows] == [
        ("plain", "train"), ("plain", "eval"), ("lorth", "train"), ("lorth", "eval"), ("lorth frozen", "eval")]
    _assert_positive(rows, "eager_ms", "compiled_ms", "speedup", "cold_compile_s")
    for row in rows:
        assert row["precision"] == "fp32" and row["fullgraph"] is True and row["compile_mode"] == "default"
        assert row["speedup"] == pytest.approx(row["eager_ms"] / row["compiled_ms"], rel=1e-9)
        # aot_eager runs the eager kernels: compiled and eager outputs agree to float32 rounding
        assert 0 <= row["rel_diff"] < 1e-5, row
    _assert_ratio(rows, "eager_vs_plain_eager", "eager_ms", lambda r: r["mode"], lambda r: r["variant"] == "plain")
    _assert_ratio(rows, "compiled_vs_plain_compiled", "compiled_ms", lambda r: r["mode"],
                  lambda r: r["variant"] == "plain")
    assert len(_printed_rows(stdout)) == len(rows)


def test_compile_refuses_an_inductor_mode_with_another_backend():
    proc = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "compile.py"), "--backend", "aot_eager",
                           "--mode", "max-autotune", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=ENV)
    assert proc.returncode == 2
    assert "--mode max-autotune is an inductor mode; it does not apply to --backend aot_eager" in proc.stderr


# ---------------------------------------------------------------------------------------- decompositions.py


def test_decompositions_smallest(tmp_path):
    stdout, results = _run("decompositions", tmp_path, "--dims", "8", "--batch", "2", "--budget", "0.01",
                           "--threads", "1", "--device", "cpu")
    rows = results["rows"]
    assert results["threads"] == 1
    assert sorted((r["op"], r["n"], r["batch"] or 0) for r in rows) == sorted(
        (op, 8, batch) for op in ("eigh", "svd", "sqrtm") for batch in (0, 2))
    _assert_positive(rows, "candidate_ms", "baseline_ms", "ratio", "reps")
    assert all(r["dtype"] == "float32" and r["reps"] >= 3 for r in rows)
    assert len(_printed_rows(stdout)) == len(rows)
    worst = max(r["ratio"] for r in rows if r["op"] in ("eigh", "svd"))
    assert f"worst stable-op ratio: {worst:.2f}" in stdout


# ------------------------------------------------------------------------------------------------- export.py

EXPORT_CASES = {"resnet18": ["lorth", "orthogonal", "convnorm", "isometric", "jacobian"],
                "vgg11": ["lorth", "orthogonal", "convnorm", "isometric"],
                "gcp_cnn": ["orthogonal", "svd"],
                "deep_mlp": ["orthogonal", "isometric", "jacobian"]}


def _check_export_rows(rows, models):
    assert [(r["model"], r["preset"]) for r in rows] == [(m, p) for m in models for p in EXPORT_CASES[m]]
    _assert_positive(rows, "original_ms", "frozen_ms", "frozen_vs_original")
    for row in rows:
        assert row["device"] == "cpu"
        assert row["frozen_vs_original"] == pytest.approx(row["frozen_ms"] / row["original_ms"], rel=1e-9)
        assert [key for key in row if key.endswith("_error")] == [], row


def test_export_quick_every_model_pt(tmp_path, monkeypatch, capsys):
    stdout, results = _run_in_process("export", tmp_path, monkeypatch, capsys, "--quick", "--repeats", "1",
                                      "--formats", ".pt", "--device", "cpu")
    rows = results["rows"]
    assert results["width"] == 8 and results["threads"] == 1
    _check_export_rows(rows, list(EXPORT_CASES))
    _assert_positive(rows, "export.pt_s")
    assert all(r["export.pt_diff"] is None for r in rows)  # a .pt export is not parity-checked
    assert len(_printed_rows(stdout)) == len(rows)


def test_export_quick_one_model_every_format(tmp_path):
    if not _importable(*ONNX):
        pytest.skip("the .onnx export needs the onnx extra (onnx, onnxscript, onnxruntime)")
    stdout, results = _run("export", tmp_path, "--quick", "--repeats", "1", "--models", "deep_mlp",
                           "--device", "cpu")
    rows = results["rows"]
    _check_export_rows(rows, ["deep_mlp"])
    _assert_positive(rows, "export.pt_s", "export.pt2_s", "export.onnx_s")
    for row in rows:  # each checked export's own parity figure, within its 1e-4 check
        assert 0 <= row["export.pt2_diff"] < 1e-4 and 0 <= row["export.onnx_diff"] < 1e-4, row
    assert len(_printed_rows(stdout)) == len(rows)


# ----------------------------------------------------------------------------------------------- jacobian.py


def test_jacobian_quick(tmp_path):
    stdout, results = _run("jacobian", tmp_path, "--quick", "--repeats", "1", "--threads", "1", "--device", "cpu")
    rows = results["rows"]
    assert results["part"] == "all" and results["repeats"] == 1 and results["threads"] == 1
    _assert_positive(rows, "seconds", "ratio")
    assert {r["device"] for r in rows} == {"cpu"}
    jacobian = [r for r in rows if r["benchmark"] == "jacobian_step"]
    candidates = ["probes=1", "probes=4", "probes=1 double_vjp", "probes=1 every=4", "probes=1 batch_fraction=0.25"]
    methods = ["plain step", *(f"jacobian {c}" for c in candidates), "plain step x4"]
    for model in ("resnet18(width=16)", "deep_mlp(depth=64, width=64)"):
        assert [r["method"] for r in jacobian if r["model"] == model] == methods
    _assert_ratio(jacobian, "ratio", "seconds", lambda r: r["model"], lambda r: r["method"] == "plain step")
    # the Riemannian hooks: orthofx's two retractions against plain SGD; geoopt's when it imports, else a note
    riemannian = [r for r in rows if r["benchmark"].startswith("riemannian")]
    has_geoopt = _importable("geoopt")
    methods = ["plain SGD", "orthofx riemannian (polar)", "orthofx riemannian (qr)"] + (
        ["geoopt RiemannianSGD"] if has_geoopt else [])
    for benchmark in ("riemannian optimizer step", "riemannian training step"):
        for model in ("deep_linear(depth=8, width=64)", "deep_mlp(depth=64, width=64)"):
            assert [r["method"] for r in riemannian if (r["benchmark"], r["model"]) == (benchmark, model)] == methods
    assert {r["square_linears"] for r in riemannian if r["model"].startswith("deep_linear")} == {8}
    _assert_ratio(riemannian, "ratio", "seconds", lambda r: (r["benchmark"], r["model"]),
                  lambda r: r["method"] == "plain SGD")
    geoopt_notes = [n for n in results["notes"] if "geoopt" in n]
    assert (results["geoopt"] is not None, len(geoopt_notes)) == (has_geoopt, 0 if has_geoopt else 1)
    assert len(_printed_rows(stdout)) == len(rows)
    assert stdout.count("the 2.5x bar)") == 6  # one-probe verdicts: three settings x two models


# --------------------------------------------------------------------------------------- orthogonal_layers.py


def test_orthogonal_layers_smoke(tmp_path):
    stdout, results = _run("orthogonal_layers", tmp_path, "--smoke", "--threads", "1", "--device", "cpu")
    rows = results["rows"]
    assert results["smoke"] is True and results["batch"] == 2 and results["reps"] == 1
    _assert_positive(rows, "ms", "ratio_to_conv", "min_ms", "min_ratio_to_conv")
    shapes = ["8->8 k3 s1", "8->16 k3 s2", "8->16 k2 s2"]
    assert sorted({r["shape"] for r in rows}) == sorted(shapes) and {r["input"] for r in rows} == {"8x8"}
    ours = ["orthofx bcop", "orthofx bcop (build f32)", "orthofx frozen", "orthofx cayley_fft",
            "orthofx cayley_fft (build f32)", "orthofx cayley_fft frozen", "orthofx convnorm"]
    for shape in shapes:
        layers = [r["layer"] for r in rows if r["shape"] == shape]
        expected = ["nn.Conv2d", "nn.Conv2d circular", *ours, "torch orthogonal(flat)"]
        # rko (reshaped kernel only) applies where kernel_size <= stride only
        assert sorted(la for la in layers if not la.startswith(("orthogonium", "torchlip"))) == sorted(
            expected + (["orthofx rko"] if shape == "8->16 k2 s2" else []))
    _assert_ratio(rows, "ratio_to_conv", "ms", lambda r: r["shape"], lambda r: r["layer"] == "nn.Conv2d")
    for row in rows:
        sigma = row["max_abs_sigma_minus_1"]
        if row["layer"] in ("orthofx convnorm", "orthofx cayley_fft frozen"):
            assert sigma is None  # no explicit kernel to measure
        elif row["layer"].startswith("orthofx"):  # exactly orthogonal: float64 build, float32 build or kernel
            assert 0 <= sigma < 1e-5, row
        elif row["layer"] == "nn.Conv2d":  # the measure is not trivially zero: a random conv is far from it
            assert sigma > 0.1, row
    # the optional peers are skipped, with a note, when they do not import
    for package, layer in (("orthogonium", "orthogonium AOC"), ("deel", "torchlip SpectralConv2d")):
        if not _importable(package):
            assert not any(r["layer"] == layer for r in rows)
            assert any(note.startswith(f"{layer} not timed") for note in results["notes"])
            assert f"note: {layer} not timed" in stdout
    assert len(_printed_rows(stdout)) == len(rows)


# --------------------------------------------------------------------------------------- orthogonal_linear.py


def test_orthogonal_linear_small(tmp_path):
    """torch's matrix_exp and householder maps and the n x n maps above n = 256 are left out: they take seconds
    to minutes per step on one CPU thread."""
    stdout, results = _run("orthogonal_linear", tmp_path, "--batch", "1", "--repeats", "1", "--threads", "1",
                           "--device", "cpu", "--square-max-n", "256", "--skip", "torch matrix_exp",
                           "torch householder")
    rows = results["rows"]
    assert results["batch"] == 1 and results["square_max_n"] == 256
    shapes = ["256->256", "1024->1024", "4096->64", "64->4096", "1024->256"]
    extra = ["geotorch"] if _importable("geotorch") else []
    for shape in shapes:
        cayley = ["torch cayley"] if shape == "256->256" else []
        assert [r["candidate"] for r in rows if r["shape"] == shape] == [
            "nn.Linear", "orthofx", "orthofx (build f32)", *cayley, *extra]
    _assert_positive(rows, "ms", "ratio_to_linear")
    _assert_ratio(rows, "ratio_to_linear", "ms", lambda r: r["shape"], lambda r: r["candidate"] == "nn.Linear")
    for row in rows:
        if row["candidate"] == "nn.Linear":
            assert row["defect"] is None
        else:  # orthonormal rows or columns after a few Adam steps (float64 build: to float64 rounding)
            assert 0 <= row["defect"] < (1e-6 if row["candidate"] == "orthofx" else 1e-4), row
        assert f"{row['shape']:>11}  {row['candidate']:<20} {row['ms']:9.2f} ms" in stdout, row


# ----------------------------------------------------------------------------------- orthogonal_transposed.py


def test_orthogonal_transposed_small(tmp_path):
    stdout, results = _run("orthogonal_transposed", tmp_path, "--batch", "1", "--repeats", "1", "--threads", "1",
                           "--device", "cpu")
    rows = results["rows"]
    assert results["batch"] == 1 and results["threads"] == 1
    shapes = ["128->64 k4 s2 p1 16x16", "64->32 k4 s2 p1 32x32", "64->64 k2 s2 p0 16x16", "256->128 k4 s2 p1 8x8"]
    candidates = ["nn.ConvTranspose2d", "orthofx", "orthofx (build f32)", "orthofx frozen"]
    assert [(r["shape"], r["candidate"]) for r in rows] == [(s, c) for s in shapes for c in candidates]
    _assert_positive(rows, "ms", "ratio")
    _assert_ratio(rows, "ratio", "ms", lambda r: r["shape"], lambda r: r["candidate"] == "nn.ConvTranspose2d")
    for row in rows:
        if row["candidate"] in ("orthofx", "orthofx (build f32)"):
            assert 0 <= row["max_sigma_error"] < (1e-6 if row["candidate"] == "orthofx" else 1e-4), row
        else:
            assert row["max_sigma_error"] is None
        assert f"{row['shape']:>26}  {row['candidate']:<20} {row['ms']:9.2f} ms  {row['ratio']:6.2f}x" in stdout


# ---------------------------------------------------------------------------------------------- orthonormal.py


def test_orthonormal_one_repeat(tmp_path):
    stdout, results = _run("orthonormal", tmp_path, "--repeats", "1", "--device", "cpu")
    rows = results["rows"]
    routes = ["householder", "cholesky_qr2", "shifted_cholesky_qr3"]
    shapes = [[64, 32], [128, 64], [256, 128], [512, 256], [256, 256], [4, 128, 64]]
    assert [(r["dtype"], r["shape"], r["route"]) for r in rows] == [
        (d, s, route) for d in ("float64", "float32") for s in shapes for route in routes]
    _assert_positive(rows, "ms")
    for row in rows:
        assert row["gpu_ms"] is None  # the kernel time is profiled on CUDA only
        # Q^T Q = I and the same Q as Householder's, to the dtype's rounding (all inputs are well conditioned)
        bound = 1e-12 if row["dtype"] == "float64" else 1e-4
        assert 0 <= row["orthogonality_defect"] < bound and 0 <= row["max_diff_from_householder"] < bound, row
        if row["route"] == "householder":
            assert row["max_diff_from_householder"] == 0
    assert sum(line.startswith("{'dtype'") for line in stdout.splitlines()) == len(rows)


# ----------------------------------------------------------------------------------------------- svd_passes.py


def test_svd_passes_quick(tmp_path, monkeypatch, capsys):
    stdout, results = _run_in_process("svd_passes", tmp_path, monkeypatch, capsys, "--quick", "--batches", "8",
                                      "--rounds", "1", "--inner", "1", "--hook-calls", "1", "--threads", "1")
    rows = results["rows"]
    assert results["threads"] == 1 and results["rounds"] == 1 and results["inner"] == 1
    assert [(r["batch"], r["variant"]) for r in rows] == [
        (8, v) for v in ("plain", "+NOG", "+OLR", "+NOG+OLR", "eager")]
    _assert_positive(rows, "median_s", "min_s", "ratio_to_plain")
    _assert_ratio(rows, "ratio_to_plain", "median_s", lambda r: r["batch"], lambda r: r["variant"] == "plain")
    plain = statistics.median(r["median_s"] for r in rows if r["variant"] == "plain")
    for row in rows:
        assert row["overhead_s"] == pytest.approx(row["median_s"] - plain, abs=1e-12)
    hooks = results["hooks"]
    assert sorted(h["hook"] for h in hooks) == ["NearestOrthogonalGradient", "OptimalLearningRate"]
    for hook in hooks:
        assert _positive(hook["median_s"])
        assert hook["fraction_of_plain_step"] == pytest.approx(hook["median_s"] / plain, rel=1e-9)
    for row in rows:  # the table's line of each row: batch, variant, median ms
        assert f"{row['batch']:>5}  {row['variant']:<9}  {row['median_s'] * 1e3:>9.3f}" in stdout, row
    assert stdout.count("hook alone: ") == 2


def test_svd_passes_export(tmp_path):
    """Two of the five eps values (each an ONNX export of its own through the same loop body; the default five take
    three times as long): 1e-1 (kappa ~ 14), which passes, and 1e-4 (kappa ~ 1e4), which today fails the export's
    1e-4 check (the ExportError row and line)."""
    if not _importable(*ONNX):
        pytest.skip("--export needs the onnx extra (onnx, onnxscript, onnxruntime)")
    stdout, results = _run("svd_passes", tmp_path, "--export", "--eps", "1e-1", "1e-4", "--threads", "1")
    rows = results["rows"]
    assert [r["eps"] for r in rows] == [1e-1, 1e-4]
    kappas = [r["kappa"] for r in rows]
    assert all(_positive(k) and k >= 1 for k in kappas) and kappas == sorted(kappas)
    assert rows[0]["passed"]  # kappa ~ 14: Newton-Schulz converges well within the export's 1e-4 check
    for row in rows:
        assert 0 <= row["float32_exact_vs_float64"] < 1e-2, row
        if row["passed"]:
            assert isinstance(row["iterations"], int) and row["iterations"] >= 1
            assert 0 <= row["newton_schulz_vs_exact"] < 1e-4 and 0 <= row["onnx_vs_exact"] < 1e-4, row
        else:  # a finding, not a failure of the script: the export's own ExportError message
            assert "differs from the frozen model" in row["error"], row
        result = "ok" if row["passed"] else "ExportError"
        assert any(line.split()[:1] == [f"{row['eps']:.0e}"] and line.endswith(result)
                   for line in stdout.splitlines()), row


# ------------------------------------------------------------------------------------------------- lorth_routes.py

def test_lorth_routes_quick(tmp_path):
    _, results = _run("lorth_routes", tmp_path, "--quick", "--repeats", "1", "--threads", "1")
    rows = results["rows"]
    assert results["threads"] == 1 and results["repeats"] == 1
    assert {r["benchmark"] for r in rows} == {"lorth_shape", "penalty_backward", "training_step"}
    _assert_positive(rows, "conv_s", "taps_s", "speedup")
    for row in rows:
        assert row["speedup"] == pytest.approx(row["conv_s"] / row["taps_s"], rel=1e-9)
    for row in (r for r in rows if r["benchmark"] == "penalty_backward"):
        # the tap route adds ATen ops where it is taken, and none where every site stays on the convolution
        assert row["taps_ops"] >= row["conv_ops"] > 0
    step = next(r for r in rows if r["benchmark"] == "training_step")
    assert step["taps_over_plain"] == pytest.approx(step["taps_s"] / step["plain_s"], rel=1e-9)
