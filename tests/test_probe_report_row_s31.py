"""The report row of a layer that a ``jacobian_isometry`` rule wrapped whole (``kind: block`` naming one conv or
linear layer) has the layer's figures (L_orth, sigma_min / sigma_max at its input size, existence), as a module
site's row has; it used to show only the pass and its parameters. References: P0's L_orth and the singular values
of the dense circular operator, float64 (tests/references.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthofx
from references import circular_operator64, lorth64

pytestmark = pytest.mark.usefixtures("one_thread")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), nn.ReLU(), nn.Flatten(1),
                         nn.Linear(144, 10), nn.Sequential(nn.Linear(10, 10), nn.Tanh()))


def test_a_probed_layer_row_has_the_layer_figures():
    model = _model()
    x = torch.randn(2, 3, 6, 6)
    rules = [{"match": {"kind": "block", "name": name}, "apply": "jacobian_isometry"} for name in ("0", "3", "4")]
    gm = orthofx.transform(model, {"rules": rules}, example_inputs=(x,))
    rows = {row["site"]: row for row in orthofx.report(gm).rows}

    conv = model[0].weight
    sigma = torch.linalg.svdvals(circular_operator64(conv, grid=(6, 6)))
    assert rows["0"]["input"] == (6, 6)
    assert rows["0"]["lorth"] == pytest.approx(lorth64(conv), rel=1e-6)
    assert rows["0"]["sigma_min"] == pytest.approx(float(sigma.min()), rel=1e-5)
    assert rows["0"]["sigma_max"] == pytest.approx(float(sigma.max()), rel=1e-5)
    assert rows["0"]["exists"].startswith("yes")

    linear = model[3].weight
    sigma = torch.linalg.svdvals(linear.detach().double())
    assert rows["3"]["lorth"] == pytest.approx(lorth64(linear), rel=1e-6)
    assert rows["3"]["sigma_min"] == pytest.approx(float(sigma.min()), rel=1e-5)
    assert rows["3"]["sigma_max"] == pytest.approx(float(sigma.max()), rel=1e-5)
    for row in (rows["0"], rows["3"]):
        assert row["pass"] == "jacobian_isometry"

    # a probe of a larger block keeps the block row (no single operator to measure)
    assert rows["4"]["pass"] == "jacobian_isometry" and rows["4"].get("lorth") is None
