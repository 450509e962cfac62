"""orthofx.report on ConvNorm-wrapped convs (the conv's own L_orth and singular values) and
orthofx.report.monitors on a model written with orthofx.nn layers (no manifest).

References are independent of orthofx: the dense float64 matrix of the circular conv, built here by applying
torch's conv to every basis vector of a circularly padded input, its singular values and Gram matrix (P0
Theorem 7's L_orth), and the condition number of a covariance from torch.linalg.eigvalsh in float64.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

import orthofx
import orthofx.passes.convnorm  # noqa: F401  (registers the pass)
from orthofx.errors import OrthofxError
from orthofx.nn import ConvNormConv2d, OrthogonalConv2d
from orthofx.nn.conditioning import DecompositionMonitor, stable_eigh
from orthofx.nn.decompositions import ConditionMonitor

pytestmark = pytest.mark.usefixtures("one_thread")

CONVNORM_TEXT = "(figures: its conv, without ConvNorm)"


# ------------------------------------------------------------------------------ independent references

def circular_matrix(weight: torch.Tensor, stride: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """The circular 2-D conv of ``weight`` (no bias, no dilation, one group) on an input grid ``size`` as a dense
    float64 matrix: row ``j`` is the conv of basis vector ``j``, circularly padded by ``k - 1`` on the right."""
    w = weight.detach().double()
    c_in = w.shape[1]
    basis = torch.eye(c_in * math.prod(size), dtype=torch.float64).reshape(-1, c_in, *size)
    kh, kw = w.shape[-2:]
    padded = nn.functional.pad(basis, [0, kw - 1, 0, kh - 1], mode="circular")
    columns = nn.functional.conv2d(padded, w, stride=stride)
    return columns.reshape(columns.shape[0], -1).T


def singular_values(weight: torch.Tensor, stride: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    grid = tuple(-(-n // s) * s for n, s in zip(size, stride))  # the report rounds the grid up to the stride
    return torch.linalg.svdvals(circular_matrix(weight, stride, grid))


def lorth_reference(weight: torch.Tensor, stride: tuple[int, int]) -> float:
    """P0 Theorem 7: ||A A^T - I||_F^2 (RO) or ||A^T A - I||_F^2 (CO) of the circular operator on the smallest
    grid N with S N >= 2k - 1, divided by N^2."""
    k = weight.shape[-2:]
    n = [math.ceil((2 * e - 1) / s) for e, s in zip(k, stride)]
    A = circular_matrix(weight, stride, tuple(a * s for a, s in zip(n, stride)))
    row_orthogonal = weight.shape[0] <= weight.shape[1] * math.prod(stride)
    gram = A @ A.T if row_orthogonal else A.T @ A
    return float((gram - torch.eye(gram.shape[0], dtype=gram.dtype)).square().sum()) / math.prod(n)


# ------------------------------------------------------------------------------ ConvNorm rows

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)  # column orthogonal (4 * 1 outputs per 3 inputs)
        self.b = nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False)  # row orthogonal
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.b(torch.relu(self.a(x))).mean((2, 3)))


def _convnorm_with(rule: dict) -> orthofx.Policy:
    """The convnorm preset's rules followed by ``rule`` (README, "Combining policies")."""
    return orthofx.Policy.from_dict({"orthofx": 1, "rules": [*orthofx.Policy.preset("convnorm").to_dict()["rules"],
                                                             rule]})


def _check_conv_rows(rows: dict, gm: nn.Module, size: tuple[int, int]) -> None:
    for site, stride in (("a", (1, 1)), ("b", (2, 2))):
        row = rows[site]
        assert row["layer"].startswith("ConvNormConv2d(") and row["layer"].endswith(CONVNORM_TEXT), site
        weight = gm.get_submodule(site).conv.weight
        sv = singular_values(weight, stride, size)
        assert row["input"] == size
        assert row["sigma_max"] == pytest.approx(float(sv.max()), rel=1e-9), site
        assert row["sigma_min"] == pytest.approx(float(sv.min()), rel=1e-9, abs=1e-12), site
        assert row["lorth"] == pytest.approx(lorth_reference(weight, stride), rel=1e-9), site
    assert rows["a"]["exists"] == "yes (CO)" and rows["b"]["exists"] == "yes (RO)"


def test_convnorm_rows_regularised_with_lorth_show_the_conv_figures():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    rule = {"name": "lorth", "match": {"type": ["Conv2d", "Linear"]}, "apply": "orth_regularizer",
            "with": {"weight": 0.5}}
    gm = orthofx.transform(Net(), _convnorm_with(rule), example_inputs=(x,))
    rows = {r["site"]: r for r in orthofx.report(gm).rows}
    assert rows["a"]["pass"] == "convnorm; orth_regularizer"
    _check_conv_rows(rows, gm, (6, 6))
    # the row's L_orth is the penalty term of its site, unweighted
    terms = orthofx.penalty_terms(gm)
    for site in ("a", "b"):
        assert float(terms[f"lorth/{site}"].detach()) == pytest.approx(0.5 * rows[site]["lorth"], rel=1e-6)


def test_convnorm_rows_retracted_by_riemannian_show_the_conv_figures():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 6, 6)
    rule = {"name": "stiefel", "match": {"type": "Conv2d"}, "apply": "riemannian"}
    gm = orthofx.transform(Net(), _convnorm_with(rule), example_inputs=(x,))
    rows = {r["site"]: r for r in orthofx.report(gm).rows}
    assert rows["b"]["pass"].startswith("convnorm; riemannian")
    _check_conv_rows(rows, gm, (6, 6))


def test_conv_inside_a_written_convnorm_layer_is_measured_at_the_layer_input_size():
    """A ConvNorm layer the model was written with: its conv is a site of its own, run through the functional
    conv (no input shape of its own); its row takes the wrapper's input size."""
    torch.manual_seed(2)
    model = nn.Sequential(ConvNormConv2d(nn.Conv2d(3, 4, 3, padding=1)), nn.Conv2d(4, 4, 1))
    policy = {"orthofx": 1, "rules": [{"match": {"type": "Conv2d"}, "apply": "orth_regularizer"}]}
    gm = orthofx.transform(model, policy, example_inputs=(torch.randn(1, 3, 5, 5),))
    row = next(r for r in orthofx.report(gm).rows if r["site"] == "0.conv")
    sv = singular_values(model[0].conv.weight, (1, 1), (5, 5))
    assert row["input"] == (5, 5)
    assert row["sigma_max"] == pytest.approx(float(sv.max()), rel=1e-9)
    assert row["sigma_min"] == pytest.approx(float(sv.min()), rel=1e-9)


def test_untransformed_convnorm_layer_row_has_the_conv_lorth():
    torch.manual_seed(3)
    model = nn.Sequential(ConvNormConv2d(nn.Conv2d(4, 4, 3, stride=2, padding=1)))
    (row,) = orthofx.report(model).rows
    assert row["pass"] == "orthofx layer" and row["layer"].endswith(CONVNORM_TEXT)
    assert row["lorth"] == pytest.approx(lorth_reference(model[0].conv.weight, (2, 2)), rel=1e-9)
    assert row["exists"] == "yes (RO)" and row["sigma_max"] is None  # not run: no input size


# ------------------------------------------------------------------------------ monitors without a manifest

class Whitened(nn.Module):
    """A user's model with a condition-number monitor on its eigh (nested one level down)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 4, bias=False)
        self.stats = nn.ModuleDict({"monitor": DecompositionMonitor("eigenvalues", values_index=0, op="eigh")})

    def covariance(self, x):
        z = self.lin(x)
        return z.mT @ z / z.shape[0] + 0.1 * torch.eye(4)

    def forward(self, x):
        L, V = self.stats["monitor"](stable_eigh(self.covariance(x)))
        return self.lin(x) @ V * L.rsqrt()


def _kappa64(model: Whitened, x: torch.Tensor) -> float:
    z = x.double() @ model.lin.weight.detach().double().T
    lam = torch.linalg.eigvalsh(z.T @ z / z.shape[0] + 0.1 * torch.eye(4, dtype=torch.float64))
    return float(lam.max() / lam.min())


def test_monitors_of_an_untransformed_model_read_its_monitor_layers():
    from orthofx.report import monitors

    torch.manual_seed(4)
    model = Whitened()
    generator = torch.Generator().manual_seed(5)
    batches = [torch.randn(16, 5, generator=generator) * torch.tensor(s) for s in ([4.0, 1, 1, 0.2, 1], [1.0] * 5)]
    for x in batches:
        model(x)
    found = monitors(model)
    assert list(found) == ["stats.monitor"]
    figures = found["stats.monitor"]
    kappas = [_kappa64(model, x) for x in batches]
    assert kappas[0] > 2 * kappas[1]
    assert figures["kappa"] == pytest.approx(kappas[1], rel=1e-4)
    assert figures["kappa_max"] == pytest.approx(kappas[0], rel=1e-4)
    assert figures["updates"] == 2 and figures["nan_events"] == 0 and figures["inf_events"] == 0
    assert model.get_submodule(figures["monitor"]) is model.stats["monitor"]
    assert orthofx.report.monitors(nn.DataParallel(model)) == found  # through wrappers
    # the report's kappa columns of the same model agree
    (row,) = [r for r in orthofx.report(model).rows if "kappa" in r]
    assert row["site"] == "stats.monitor" and row["kappa"] == figures["kappa"]


def test_monitors_of_untransformed_models_without_monitors():
    from orthofx.report import monitors

    fresh = nn.Sequential(ConditionMonitor())  # not called yet: NaN kappas, no updates
    assert monitors(fresh)["0"]["updates"] == 0 and math.isnan(monitors(fresh)["0"]["kappa"])
    # orthofx layers but no monitor: nothing to list, as for a transformed model without monitors
    assert monitors(nn.Sequential(OrthogonalConv2d(2, 2, 3), nn.ReLU())) == {}
    with pytest.raises(OrthofxError, match=r"Sequential was not produced by orthofx.transform and holds no "
                                           r"orthofx layer.*orthofx.transform\(model, policy\)"):
        monitors(nn.Sequential(nn.Conv2d(2, 2, 3), nn.ReLU()))


@pytest.mark.parametrize("name", ["spectra.txt", "spectra"])
def test_plot_refuses_a_path_matplotlib_would_not_write_as_named(tmp_path, name):
    # matplotlib raised its own ValueError after drawing (.txt), or wrote spectra.png for "spectra"
    pytest.importorskip("matplotlib")
    rep = orthofx.report(orthofx.transform(orthofx.models.get("small_cnn"), "lorth"))
    with pytest.raises(orthofx.ArgumentError, match="give a path ending in .png"):
        rep.plot(str(tmp_path / name))
    assert list(tmp_path.iterdir()) == []


def test_plot_without_an_importable_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    # with matplotlib's submodules already imported, a check importing only a submodule passed
    pytest.importorskip("matplotlib.backend_bases")
    rep = orthofx.report(orthofx.transform(orthofx.models.get("small_cnn"), "lorth"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'orthofx\[plot\]'"):
        rep.plot(str(tmp_path / "s.png"))
