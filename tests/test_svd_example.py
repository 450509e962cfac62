"""examples/svd_conditioning.py (P4 at small scale) runs in its quick form: a row per model and variant with the
hard orthogonal Pre-SVD layer conditioning best, the PNG; the kappa it reports is the condition number of the
matrix entering eigh, checked against an independent computation; bad arguments stop it before any work."""

import os
import re

import pytest
import torch

import orthofx
from example_scripts import import_example, run_main_in_process

MODELS = ("dbn_cnn", "gcp_cnn")
VARIANTS = ("plain", "+NOG", "+OLR", "+OW", "+NOG+OLR+OW")


def _example():
    return import_example("svd_conditioning")


def test_svd_conditioning_example_quick(tmp_path, monkeypatch, capsys):
    """``main(["--quick", ...])`` in this process (the script's start as a command, ``python
    examples/svd_conditioning.py``, is tests/test_examples.py's, up to its dependency check)."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path / "k.png"
    monkeypatch.chdir(tmp_path)
    _, stdout = run_main_in_process("svd_conditioning", ["--quick", "--out", str(out)], monkeypatch, capsys)
    rows = [line.split() for line in stdout.splitlines()]
    table = {(r[0], r[1]): r for r in rows if len(r) >= 8 and r[0] in MODELS}
    assert f"kappa recorded at {_example().QUICK_STEPS} training steps per run" in stdout
    assert sorted(table) == sorted((m, v) for m in MODELS for v in VARIANTS)
    median = {}
    for (model, variant), row in table.items():
        accuracy, kappa_median, kappa_max, nan, inf = (float(row[2]), float(row[3]), float(row[4]), int(row[5]),
                                                       int(row[6]))
        assert 0.0 <= accuracy <= 1.0
        assert 1.0 <= kappa_median <= kappa_max  # kappa >= 1 for a positive definite matrix
        assert nan == 0 and inf == 0
        median[model, variant] = kappa_median
    # The hard orthogonal Pre-SVD layer is what the +OW variant reports having applied ...
    # (dbn_cnn's Pre-SVD layer is a zero-padded 5x5 conv kept so: 'orthogonal: hard (zero padding: not at borders)')
    assert all(re.search(r"orthogonal( \(|: )hard", " ".join(table[(m, "+OW")])) for m in MODELS)
    # ... and the docstring's main result: it conditions the covariance best (dbn_cnn: ~4.5x lower median than
    # plain already after the quick run's 40 steps; gcp_cnn: lower).
    for model in MODELS:
        assert median[model, "+OW"] == min(median[model, v] for v in VARIANTS), median
    assert median["dbn_cnn", "+OW"] < median["dbn_cnn", "plain"] / 3
    with open(out, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("model_name, layer, per_sample, eps", [("dbn_cnn", "conv1", False, 1e-2),
                                                                ("gcp_cnn", "bn_last", True, 1e-5)])
def test_reported_kappa_is_the_condition_number_of_the_covariance(model_name, layer, per_sample, eps, one_thread):
    """The monitor the example reads records lambda_max / lambda_min of ``cov + eps I`` (dbn_cnn: over the batch;
    gcp_cnn: the worst sample), recomputed here in float64 from the Pre-SVD layer's output (models.py's formulas)."""
    example = _example()
    torch.manual_seed(0)
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    gm = orthofx.transform(orthofx.models.get(model_name), example.policy("plain", "lorth", 0.01),
                           example_inputs=(x[:8],))
    _, monitor = example.the_monitor(gm)
    outputs = []
    gm.get_submodule(layer).register_forward_hook(lambda module, args, output: outputs.append(output.detach()))
    gm.train()
    gm(x)
    assert len(outputs) == 1
    features = outputs[0].double()
    flat = features.flatten(2) if per_sample else features.transpose(0, 1).flatten(1)[None]  # (B or 1, C, N)
    centred = flat - flat.mean(2, keepdim=True)
    cov = centred @ centred.transpose(1, 2) / flat.shape[2]
    evals = torch.linalg.eigvalsh(cov + eps * torch.eye(cov.shape[-1], dtype=cov.dtype))
    expected = float((evals[:, -1] / evals[:, 0]).max())
    assert monitor.history[-1] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps: expected an integer >= 1"),
    (["--steps", "-1"], "--steps: expected an integer >= 1"),
    (["--penalty-weight", "-1"], "--penalty-weight: expected a finite number >= 0"),
    (["--penalty-weight", "nan"], "--penalty-weight: expected a finite number >= 0"),
    (["--seed", "-1"], "--seed: expected an integer >= 0"),
    (["--out", "kappa.jpg"], "must end in .png"),
    (["--out", os.path.join("no", "such", "folder", "k.png")], "does not exist"),
])
def test_bad_arguments_stop_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        _example().main(["--quick", *argv])
    assert raised.value.code == 2
    assert message in capsys.readouterr().err
