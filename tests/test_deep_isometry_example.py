"""examples/deep_isometry.py: --quick prints a table row per variant for both networks, with the numbers its
docstring claims at that budget, and writes a PNG; the Jacobian spectra it reports agree with dense Jacobians; bad
arguments stop it before any work."""

import math
import os

import pytest
import torch

import orthofx
from example_scripts import import_example, run_main_in_process

VARIANTS = ("default", "isometric", "jacobian", "isometric+jacobian", "abs+isometric", "residual")
COLUMNS = ("lr", "train_loss", "test_acc", "m1", "m2", "sigma_min", "sigma_max", "seconds")


def _example():
    return import_example("deep_isometry")


def _tables(stdout):
    """{network title prefix: {variant: {column: float}}} from the printed tables."""
    tables, current = {}, None
    for line in stdout.splitlines():
        if line.startswith(("64-layer plain MLP", "32-layer plain CNN")):
            current = tables.setdefault(line[:18], {})
        elif current is not None and line.split() and line.split()[0] in VARIANTS:
            fields = line.split()
            assert len(fields) == 1 + len(COLUMNS), line
            assert fields[0] not in current, f"two {fields[0]!r} rows in one table"
            current[fields[0]] = dict(zip(COLUMNS, map(float, fields[1:])))
    return tables


@pytest.mark.slow
def test_deep_isometry_quick(tmp_path, monkeypatch, capsys):
    """``main(["--quick", ...])`` in this process (the script's start as a command, ``python
    examples/deep_isometry.py``, is tests/test_examples.py's, up to its dependency check)."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path / "x.png"
    monkeypatch.chdir(tmp_path)
    _, stdout = run_main_in_process("deep_isometry", ["--quick", "--out", str(out)], monkeypatch, capsys)
    assert f": {_example().QUICK_STEPS} SGD steps" in stdout
    tables = _tables(stdout)
    assert sorted(tables) == ["32-layer plain CNN", "64-layer plain MLP"], stdout
    for rows in tables.values():
        assert sorted(rows) == sorted(VARIANTS), stdout
        for row in rows.values():
            assert 0.0 <= row["test_acc"] <= 1.0 and math.isfinite(row["train_loss"])
            assert 0.0 <= row["sigma_min"] <= row["sigma_max"] and row["m1"] > 0 and row["m2"] > 0
        # Default initialisation: the signal dies (Jacobian ~1e-12 and below), the network stays at chance
        # (cross-entropy ln 10); the regulariser starts from the same weights (same spectrum) and cannot rescue it.
        assert rows["default"]["sigma_max"] < 1e-6
        assert rows["default"]["train_loss"] == pytest.approx(math.log(10), abs=0.01)
        assert rows["jacobian"]["train_loss"] == pytest.approx(math.log(10), abs=0.01)
        for same, start in (("jacobian", "default"), ("isometric+jacobian", "isometric")):
            assert all(rows[same][c] == rows[start][c] for c in ("m1", "m2", "sigma_min", "sigma_max"))
        # Isometric initialisation keeps the signal alive by many orders of magnitude.
        assert rows["isometric"]["m1"] > 1e15 * rows["default"]["m1"]
    mlp, cnn = tables["64-layer plain MLP"], tables["32-layer plain CNN"]
    # P2's |Q x + b| layers: the MLP's Jacobian is exactly orthogonal (all singular values 1, printed to 3 digits).
    assert all(mlp["abs+isometric"][c] == 1.0 for c in ("m1", "m2", "sigma_min", "sigma_max"))
    assert 0.9 < cnn["abs+isometric"]["m1"] <= 1.0  # a few pixels are zero in every image: sigma 0 there
    # After the quick run's 14 steps the residual MLP is far ahead; the isometric MLP has started to learn, the
    # default has not.
    assert mlp["residual"]["train_loss"] < 0.5 < mlp["isometric"]["train_loss"] < 2.2 < mlp["default"]["train_loss"]
    with open(out, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_example_variants_match_the_test():
    assert tuple(_example().VARIANTS) == VARIANTS


@pytest.mark.parametrize("variant", ["isometric", "abs+isometric", "residual"])
def test_reported_spectrum_matches_a_dense_jacobian(variant, one_thread):
    """The singular values the table summarises are those of the body's Jacobian, computed here densely with
    torch.autograd.functional.jacobian (float64) on the weights of the module the example trains."""
    example = _example()
    trained, body, _ = example.build("mlp", variant, seed=0)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    reported = example.spectrum(body, x)
    assert reported.shape == (2, 64)
    # The eager body holds the trained module's weights (the GraphModule inlines the body, so the example
    # measures the eager one).
    trained_state = trained.state_dict()
    for key, value in body.state_dict().items():
        assert torch.equal(value, trained_state[f"layers.{key}"]), key
    reference = body.double()
    for i in range(len(x)):
        jac = torch.autograd.functional.jacobian(reference, x[i:i + 1].double()).reshape(64, 64)
        expected = torch.linalg.svdvals(jac)
        assert torch.allclose(reported[i].sort(descending=True).values, expected, rtol=1e-6, atol=1e-12)
    if variant == "abs+isometric":
        # P2: sigma(Q x + b) with Q orthogonal and |sigma'| = 1 has an exactly orthogonal Jacobian.
        assert torch.allclose(reported, torch.ones_like(reported), atol=1e-10)
        m1, m2 = orthofx.metrics.isometry_moments(reported)
        assert torch.allclose(m1, torch.ones_like(m1)) and torch.allclose(m2, torch.ones_like(m2))


def test_jacobian_variants_carry_the_jacobian_presets_regulariser():
    example = _example()
    for arch, body in (("mlp", "layers"), ("cnn", "features")):
        for variant in VARIANTS:
            trained, _, with_penalty = example.build(arch, variant, seed=0)
            sites = {t.site for t in orthofx.manifest_of(trained).penalties} if orthofx.is_transformed(trained) \
                else set()
            assert with_penalty == ("jacobian" in variant)
            assert sites == ({body} if with_penalty else set()), (arch, variant, sites)


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps: expected an integer >= 1"),
    (["--steps", "-3"], "--steps: expected an integer >= 1"),
    (["--lr", "0"], "--lr: expected a finite number > 0"),
    (["--lr", "nan"], "--lr: expected a finite number > 0"),
    (["--seed", "-1"], "--seed: expected an integer >= 0"),
    (["--lr", "0.01", "--tune"], "not allowed with argument"),
    (["--out", "spectra.pdf"], "must end in .png"),
    (["--out", os.path.join("no", "such", "folder", "x.png")], "does not exist"),
])
def test_bad_arguments_stop_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        _example().main(["--quick", *argv])
    assert raised.value.code == 2
    assert message in capsys.readouterr().err
