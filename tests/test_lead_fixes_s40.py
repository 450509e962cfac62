"""Fixes made by the lead in session 40, each against an independent reference."""
import pytest
import torch

from orthofx.nn import stiefel


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (2, 0, 3), (0, 0), (0, 4, 2), (2, 5, 0)])
def test_cholesky_qr_route_takes_empty_matrices_as_householder_does(monkeypatch, shape):
    # The Cholesky route (CUDA in use) checked Q by an amax over its columns, which an empty matrix lacks:
    # IndexError where the Householder route returns the empty retraction.
    w = torch.zeros(shape, dtype=torch.float64)
    reference = stiefel.qr_retraction(w, torch.zeros_like(w))  # Householder: CPU is not a Cholesky device
    monkeypatch.setattr(stiefel, "CHOLESKY_QR_DEVICES", ("cpu",))
    got = stiefel.qr_retraction(w, torch.zeros_like(w))
    assert got.shape == reference.shape == w.shape and got.dtype == w.dtype


def test_cholesky_qr_route_still_matches_householder_on_nonempty(monkeypatch):
    torch.manual_seed(0)
    w = stiefel.orthonormal(torch.randn(7, 3, dtype=torch.float64), tall=True)
    xi = 0.1 * torch.randn(7, 3, dtype=torch.float64)
    reference = stiefel.qr_retraction(w, xi)
    monkeypatch.setattr(stiefel, "CHOLESKY_QR_DEVICES", ("cpu",))
    torch.testing.assert_close(stiefel.qr_retraction(w, xi), reference, rtol=0, atol=1e-12)
