"""examples/deep_isometry.py --quick runs, prints a table row per variant for both networks and writes a PNG."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "deep_isometry.py")
VARIANTS = ("default", "isometric", "jacobian", "isometric+jacobian", "abs+isometric", "residual")


@pytest.mark.slow
def test_deep_isometry_quick(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path / "x.png"
    result = subprocess.run([sys.executable, SCRIPT, "--quick", "--out", str(out)], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    for title in ("64-layer plain MLP", "32-layer plain CNN"):
        assert any(line.startswith(title) for line in lines), result.stdout
    for variant in VARIANTS:
        rows = [line for line in lines if line.split() and line.split()[0] == variant]
        assert len(rows) == 2, f"expected one {variant!r} row per network:\n{result.stdout}"
        for row in rows:
            fields = row.split()
            assert len(fields) == 9, row  # variant, lr, train loss, test acc, m1, m2, sigma min, sigma max, train s
            float(fields[2]), float(fields[3])
    with open(out, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_example_variants_match_the_test():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import deep_isometry
    finally:
        sys.path.remove(os.path.join(ROOT, "examples"))
    assert tuple(deep_isometry.VARIANTS) == VARIANTS
