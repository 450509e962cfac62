"""orthofx.report: rows per layer, exact singular values, existence, JSON and the spectra plot."""

import json

import pytest
import torch
from torch import nn

import orthofx
from orthofx import metrics

POLICY = {"rules": [{"match": {"type": ["Conv2d", "Linear"], "exclude": ["head"]}, "apply": "orth_regularizer"}]}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.ortho = nn.Conv2d(4, 4, 1, bias=False)
        self.down = nn.Conv2d(4, 8, 1, stride=2, bias=False)  # the ResNet strided shortcut: no orthogonal version
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.conv(self.down(self.ortho(x))).mean((2, 3)))


def build():
    torch.manual_seed(0)
    model = Net()
    q, _ = torch.linalg.qr(torch.randn(4, 4))
    with torch.no_grad():
        model.ortho.weight.copy_(q.view(4, 4, 1, 1))
    return model


def test_rows_cover_every_conv_and_linear_with_exact_singular_values():
    model = build()
    x = torch.randn(2, 4, 12, 12)
    rep = orthofx.report(orthofx.transform(model, POLICY, example_inputs=(x,)))
    rows = {r["site"]: r for r in rep.rows}
    assert list(rows) == ["ortho", "down", "conv", "head"]
    assert rows["ortho"]["sigma_min"] == pytest.approx(1.0, abs=1e-5)
    assert rows["ortho"]["sigma_max"] == pytest.approx(1.0, abs=1e-5)
    assert rows["ortho"]["lorth"] == pytest.approx(0.0, abs=1e-9)
    sv = metrics.conv_singular_values(model.conv.weight.detach(), (6, 6))
    assert rows["conv"]["sigma_max"] == pytest.approx(float(sv.max()), rel=1e-6)
    assert rows["conv"]["input"] == (6, 6)
    assert rows["down"]["exists"].startswith("no")
    assert rows["conv"]["exists"].startswith("yes")
    assert rows["head"]["pass"] is None and rows["conv"]["pass"] == "orth_regularizer"
    text = str(rep)
    assert "Conv2d(4->8, k=1, s=2)" in text and "sigma_max" in text
    json.dumps(rep.to_dict())  # plain data


def test_report_without_example_inputs_leaves_conv_sigmas_blank():
    rep = orthofx.report(orthofx.transform(build(), POLICY))
    rows = {r["site"]: r for r in rep.rows}
    assert rows["conv"]["sigma_max"] is None and rows["conv"]["lorth"] is not None
    assert rows["head"]["sigma_max"] is not None  # a linear layer needs no input size


def test_penalty_summary_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    gm = orthofx.transform(build(), POLICY, example_inputs=(torch.randn(1, 4, 8, 8),))
    rep = orthofx.report(gm)
    assert rep.penalties and sum(p["weighted"] for p in rep.penalties) == pytest.approx(float(orthofx.penalty(gm)))
    path = rep.plot(str(tmp_path / "spectra.png"))
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
