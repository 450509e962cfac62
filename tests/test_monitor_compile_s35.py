"""The condition-number monitor under torch.compile: torch 2.13 dropped in-place writes into its 0-d float64
buffers (``last``, ``running_max``) in compiled graphs, so a compiled model's report showed the kappa of the last
eager call while the history moved on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthofx
from orthofx.nn import ConditionMonitor


class _Monitored(nn.Module):
    def __init__(self):
        super().__init__()
        self.monitor = ConditionMonitor(history_size=8)

    def forward(self, eigenvalues):
        return self.monitor(eigenvalues)


def _kappa(eigenvalues) -> float:
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64)
    return float(lam.max() / lam.min())


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_monitor_records_the_last_and_largest_kappa(backend):
    torch._dynamo.reset()
    model = _Monitored()
    model(torch.tensor([1.0, 2.0]))  # one eager call first, as transform's run on the example inputs makes
    compiled = torch.compile(model, backend=backend)
    seen = [[1.0, 2.0]]
    for lam in ([1.0, 5.0], [2.0, 3.0], [0.5, 1.0]):
        compiled(torch.tensor(lam))
        seen.append(lam)
        summary = model.monitor.summary()
        assert summary["kappa"] == pytest.approx(_kappa(lam), rel=1e-12)
        assert summary["kappa_max"] == pytest.approx(max(_kappa(s) for s in seen), rel=1e-12)
    assert model.monitor.history == pytest.approx([_kappa(s) for s in seen], rel=1e-12)


class _Whitening(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)

    def forward(self, x):
        h = self.proj(x)
        cov = h.T @ h / h.shape[0] + 1e-3 * torch.eye(6)
        return torch.linalg.eigvalsh(cov)


def test_report_of_a_model_transformed_with_compile_shows_the_current_kappa():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Whitening()
    x = torch.randn(16, 6)
    compiled = orthofx.transform(model, "svd", example_inputs=(x,), compile={"backend": "aot_eager"})
    batches = [torch.randn(16, 6) * scale for scale in (1.0, 3.0)]
    expected = []
    for batch in batches:
        with torch.no_grad():
            compiled(batch)
            h = model.proj(batch).double()
            cov = h.T @ h / h.shape[0] + 1e-3 * torch.eye(6, dtype=torch.float64)
            expected.append(_kappa(torch.linalg.eigvalsh(cov)))
    (row,) = [r for r in orthofx.report(compiled).rows if r.get("kappa") is not None]
    assert row["kappa"] == pytest.approx(expected[-1], rel=1e-4)
