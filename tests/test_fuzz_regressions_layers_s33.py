"""Fuzz round 33 (layers used directly in hand-written models): regressions.

* ``bias=None``: torch's layers take it as "no bias" (``nn.Conv2d(..., bias=None)``, ``nn.Linear(..., bias=None)``
  test ``if bias:``), and the orthogonal layers, which take torch's signatures, refused it with
  ``LayerArgumentError: bias must be True or False, got None``. They now build no bias, as torch does; non-bool
  values that are truthy (``bias="no"``) are still refused.
* ``ConditionMonitor`` called in a hand-written forward: ``orthofx.export(model, "m.pt2")`` raised an ``ExportError``
  (torch.export.load: "SpecViolationError: Node.meta wrap_with_set_grad_enabled is missing val field") where the
  monitor's return value was not used: its ``update`` ran under ``@torch.no_grad()``. It works on detached values
  only, so the region is gone.
"""

import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import LayerArgumentError


@pytest.mark.parametrize("build, reference, shape", [
    (lambda bias: orthofx.nn.OrthogonalConv2d(4, 4, 3, bias=bias), lambda bias: nn.Conv2d(4, 4, 3, bias=bias),
     (2, 4, 8, 8)),
    (lambda bias: orthofx.nn.OrthogonalConv1d(4, 4, 3, bias=bias, method="cayley_fft", input_size=8),
     lambda bias: nn.Conv1d(4, 4, 3, bias=bias), (2, 4, 8)),
    (lambda bias: orthofx.nn.OrthogonalConv3d(2, 2, 3, bias=bias), lambda bias: nn.Conv3d(2, 2, 3, bias=bias),
     (2, 2, 4, 4, 4)),
    (lambda bias: orthofx.nn.OrthogonalConvTranspose2d(8, 4, 4, stride=2, padding=1, bias=bias),
     lambda bias: nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1, bias=bias), (2, 8, 4, 4)),
    (lambda bias: orthofx.nn.OrthogonalLinear(4, 3, bias=bias), lambda bias: nn.Linear(4, 3, bias=bias), (2, 4)),
])
def test_bias_none_builds_no_bias_as_in_torch(build, reference, shape):
    torch.manual_seed(0)
    assert reference(None).bias is None  # torch's reading of bias=None, the reference
    layer = build(None)
    assert layer.bias is None
    assert not any(name.endswith("bias") for name in layer.state_dict())
    # the forward has no bias term: an orthogonal operator with no offset maps 0 to 0
    assert torch.count_nonzero(layer(torch.zeros(shape))) == 0
    with pytest.raises(LayerArgumentError, match=r"Orthogonal\w+: bias must be True or False, got 'no'"):
        build("no")


# ------------------------------------------------------------------------------------------ condition monitor


class _MonitoredWhitening(torch.nn.Module):
    """A hand-written model calling a ConditionMonitor on the eigenvalues of its features' covariance."""

    def __init__(self):
        super().__init__()
        self.fc = orthofx.nn.OrthogonalLinear(6, 6, dtype=torch.float64)
        self.monitor = orthofx.nn.ConditionMonitor()

    def forward(self, x):
        h = self.fc(x)
        cov = h.mT @ h / h.shape[0] + 1e-3 * torch.eye(6, dtype=h.dtype)
        self.monitor(torch.linalg.eigvalsh(cov))  # recorded for the report; the forward does not use it
        return h


def _reference_kappa(model, x):
    """lambda_max / lambda_min of the covariance, from the layer's baked weight (float64, no orthofx op)."""
    with torch.no_grad():
        h = x @ model.fc.weight.mT + model.fc.bias
        lam = torch.linalg.eigvalsh(h.mT @ h / h.shape[0] + 1e-3 * torch.eye(6, dtype=h.dtype))
    return (lam.max() / lam.min()).item()


def test_a_model_calling_a_condition_monitor_exports_to_pt2(tmp_path):
    # ConditionMonitor.update ran under @torch.no_grad(): torch.export wrote that region as a
    # wrap_with_set_grad_enabled node that torch.export.load refused ("SpecViolationError: Node.meta
    # wrap_with_set_grad_enabled is missing val field"), so orthofx.export to .pt2 raised an ExportError
    torch.manual_seed(0)
    model = _MonitoredWhitening().eval()
    x = torch.randn(16, 6, dtype=torch.float64)
    expected = _reference_kappa(model, x)
    orthofx.export(model, str(tmp_path / "m.pt2"), example_inputs=(x,))
    loaded = torch.export.load(str(tmp_path / "m.pt2")).module()
    y = loaded(x)
    torch.testing.assert_close(y, x @ model.fc.weight.detach().mT + model.fc.bias.detach(), rtol=1e-12, atol=1e-12)
    # the program keeps the monitor's buffer writes: the loaded module records the covariance's kappa
    assert float(loaded.get_buffer("monitor.last")) == pytest.approx(expected, rel=1e-9)


def test_condition_monitor_still_records_and_returns_kappa_without_its_no_grad_region():
    torch.manual_seed(0)
    model = _MonitoredWhitening()
    x = torch.randn(16, 6, dtype=torch.float64)
    kappa = model.monitor(torch.linalg.eigvalsh(torch.eye(3, dtype=torch.float64) * torch.tensor([1.0, 2, 8])))
    assert kappa.item() == 8.0 and not kappa.requires_grad
    model.monitor.reset()
    model(x).sum().backward()
    assert model.fc.raw_weight.grad is not None
    assert not model.monitor.last.requires_grad and not model.monitor.history_buffer.requires_grad
    assert model.monitor.history == pytest.approx([_reference_kappa(model, x)], rel=1e-9)
    assert int(model.monitor.updates) == 1
