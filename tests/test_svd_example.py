"""examples/svd_conditioning.py (P4 at small scale) runs in its quick form: a row per model and variant, the PNG."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "svd_conditioning.py")
MODELS = ("dbn_cnn", "gcp_cnn")
VARIANTS = ("plain", "+NOG", "+OLR", "+OW", "+NOG+OLR+OW")


def test_svd_conditioning_example_quick(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path / "k.png"
    result = subprocess.run([sys.executable, SCRIPT, "--quick", "--out", str(out)], capture_output=True, text=True,
                            timeout=300, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    table = {(r[0], r[1]): r for r in rows if len(r) >= 8 and r[0] in MODELS}
    assert sorted(table) == sorted((m, v) for m in MODELS for v in VARIANTS)
    for (model, variant), row in table.items():
        accuracy, kappa_median, kappa_max, nan = float(row[2]), float(row[3]), float(row[4]), int(row[5])
        assert 0.0 <= accuracy <= 1.0
        assert 1.0 <= kappa_median <= kappa_max  # kappa >= 1 for a positive definite matrix
        assert nan == 0
    # The hard orthogonal Pre-SVD layer is what the +OW variant reports having applied.
    assert all("orthogonal (hard)" in " ".join(table[(m, "+OW")]) for m in MODELS)
    with open(out, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
