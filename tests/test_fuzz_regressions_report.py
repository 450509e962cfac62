"""Regressions found by fuzzing ``orthofx.report`` / ``orthofx.explain``'s outputs (str, rows, to_dict, plot)."""

import json
import math
import re

import pytest
import torch
from torch import nn

import orthofx
from orthofx.plan import Plan
from orthofx.report import Report


class _TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def _x():
    return torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))


def test_report_of_orthogonal_layers_moved_to_the_meta_device_has_rows_without_figures():
    # An orthofx layer computes ``weight`` from its parameters; reading it on meta raised a RuntimeError (autocast).
    gm = orthofx.transform(_TinyCNN(), "orthogonal", example_inputs=(_x(),))
    before = orthofx.report(gm)
    gm.to("meta")
    rep = orthofx.report(gm)
    assert [r["site"] for r in rep.rows] == ["conv", "fc"]
    for row, old in zip(rep.rows, before.rows):
        assert row["lorth"] is None and row["sigma_min"] is None and row["sigma_max"] is None
        assert row["exists"] == old["exists"] and row["layer"] == old["layer"]
    assert rep.spectra == {}
    json.dumps(rep.to_dict(), allow_nan=False)


def test_to_dict_is_strict_json_when_figures_are_not_finite():
    layer = nn.Linear(4, 3)
    gm = orthofx.transform(nn.Sequential(layer), "lorth", example_inputs=(torch.randn(2, 4),))
    with torch.no_grad():
        gm.get_submodule("0").weight[0, 0] = float("inf")
    rep = orthofx.report(gm)
    data = json.loads(json.dumps(rep.to_dict(), allow_nan=False))  # json refuses NaN / inf with allow_nan=False
    row = data["rows"][0]
    # ||W W^T - I||_F^2 in plain float64: the inf entry makes it inf
    w = gm.get_submodule("0").weight.detach().double()
    reference = float(((w @ w.T - torch.eye(3, dtype=torch.float64)) ** 2).sum())
    assert math.isinf(reference) and float(row["lorth"]) == reference and row["lorth"] == "inf"
    assert math.isnan(float(row["sigma_min"])) and math.isnan(rep.rows[0]["sigma_min"])  # rows keep floats
    assert data["penalties"][0]["value"] == "inf" and data["penalties"][0]["weighted"] == "inf"


def test_to_dict_of_a_monitor_that_saw_a_nan_input_is_strict_json():
    x = orthofx.models.example_input("gcp_cnn", batch=4)
    gm = orthofx.transform(orthofx.models.get("gcp_cnn", width=4), "svd", example_inputs=(x,)).eval()
    with torch.no_grad():
        gm(torch.full_like(x, float("nan")))
    rep = orthofx.report(gm)
    data = json.loads(json.dumps(rep.to_dict(), allow_nan=False))
    site = next(iter(rep.conditioning))
    history = rep.conditioning[site]  # the monitor's own record, floats with a NaN last
    assert math.isnan(history[-1])
    assert [float(v) for v in data["conditioning"][site]][:-1] == history[:-1]
    assert data["conditioning"][site][-1] == "nan"
    row = next(r for r in data["rows"] if r["site"] == site)
    assert row["kappa"] == "nan" and row["nan_events"] == 1


def test_report_without_example_inputs_says_why_conv_sigmas_are_missing():
    rep = orthofx.report(orthofx.transform(_TinyCNN(), "lorth"))
    conv = next(r for r in rep.rows if r["site"] == "conv")
    assert conv["sigma_min"] is None and conv["lorth"] is not None
    note = [line for line in str(rep).splitlines() if line.startswith("note: ")]
    assert len(note) == 1 and "no sigma_min / sigma_max for conv:" in note[0] and "example_inputs" in note[0]
    assert rep.to_dict()["notes"] == [note[0][len("note: "):]]
    assert orthofx.report(orthofx.transform(_TinyCNN(), "lorth", example_inputs=(_x(),))).notes == []


def test_report_with_no_rows_says_so_instead_of_an_empty_table():
    class NoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(x)

    policy = {"rules": [{"match": {"type": "Conv2d"}, "apply": "orth_regularizer", "optional": True}]}
    rep = orthofx.report(orthofx.transform(NoLayers(), policy, example_inputs=(_x(),)))
    assert rep.rows == []
    text = str(rep)
    assert "sigma_min" not in text and "(no rows: the model has no conv / linear layer" in text


def _documented(doc: str | None, keys) -> list[str]:
    """The keys not named as ``key`` in ``doc``."""
    named = set(re.findall(r"``(\w+)``", doc or ""))
    return [k for k in keys if k not in named]


def test_row_and_dict_keys_are_documented():
    plan = orthofx.explain(_TinyCNN(), "lorth", example_inputs=(_x(),))
    plan_keys = {k for row in plan.rows() for k in row}
    assert plan_keys == {"site", "kind", "layer", "rule", "pass", "params", "status"}
    assert all(isinstance(v, str) for row in plan.rows() for v in row.values())
    assert _documented(Plan.rows.__doc__, plan_keys) == []
    x = orthofx.models.example_input("gcp_cnn", batch=4)
    data = orthofx.report(orthofx.transform(orthofx.models.get("gcp_cnn", width=4), "svd",
                                            example_inputs=(x,))).to_dict()
    keys = set(data) | {k for row in data["rows"] for k in row} | {k for p in data["penalties"] for k in p} \
        | set(data["capture"])
    assert _documented(Report.to_dict.__doc__, keys) == []


@pytest.mark.parametrize("layer", [lambda: orthofx.nn.OrthogonalConv2d(4, 4, 3),
                                   lambda: orthofx.nn.OrthogonalConv2d(4, 8, 2, stride=2),
                                   lambda: orthofx.nn.OrthogonalLinear(4, 6)])
def test_orthofx_layers_build_their_weight_and_run_on_the_meta_device(layer):
    # torch.is_autocast_enabled("meta") raises: the kernel build's autocast check failed on meta
    plain = layer()
    meta = layer().to("meta")
    assert meta.weight.is_meta and meta.weight.shape == plain.weight.shape
    x = torch.randn(2, 4, 8, 8) if meta.weight.dim() == 4 else torch.randn(2, 4)
    out = meta(x.to("meta"))
    assert out.is_meta and out.shape == plain(x).shape
