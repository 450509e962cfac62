"""``to_newton_schulz`` on a plain trace of a forward calling ``orthofx.nn.eigh_stable`` / ``svd_stable`` (session 35).

``torch.fx.symbolic_trace`` records those functions as one node of their custom op
(``torch.ops.orthofx.eigh_stable.default(A, taylor_order, clamp_gap, uplo)``; ``float64=True`` as casts around it).
``decomposition_op`` named that node an eigendecomposition, but ``to_newton_schulz`` then refused it ("a call of
orthofx.eigh_stable.default (not the torch function or a stand-in) is not rewritten"): only ``orthofx.freeze``,
which puts the stand-in ``stable_eigh`` in its place, made the power reach the Newton-Schulz (ONNX) form. The
custom op's call is now read as its stand-in's (``svd_conditioning.stand_in_call``, which freeze uses too).

The reference is the matrix power computed here from a float64 ``torch.linalg.eigh`` (``V diag(lambda^p) V^T``).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from torch import fx, nn

from orthofx.nn import eigh_stable, svd_stable
from orthofx.passes.svd_conditioning import to_newton_schulz

N = 5
SHIFT = 0.5
# the lower triangle of the matrix handed to eigh_stable(uplo="U"): not read, so no part of the result
LOWER_NOISE = 3.0

EIGH_CALLS = {
    "defaults": lambda A: eigh_stable(A),
    "float64=True": lambda A: eigh_stable(A, float64=True),
    "positional float64": lambda A: eigh_stable(A, 9, True),
    "exact gradient, clamp_gap": lambda A: eigh_stable(A, taylor_order=None, clamp_gap=1e-3),
    "taylor_order=0, float64": lambda A: eigh_stable(A, 0, True, 1e-4),
    "uplo=U": lambda A: eigh_stable(A, uplo="U"),
    "uplo=U, float64": lambda A: eigh_stable(A, float64=True, uplo="U"),
}


class EighPower(nn.Module):
    """``V diag(lambda^p) V^T`` of ``h^T h / n + SHIFT I`` from ``eigh_stable`` (batched ``h`` too)."""

    def __init__(self, call: str, power: float):
        super().__init__()
        self.call, self.power = EIGH_CALLS[call], power
        self.upper = 1.0 if "uplo=U" in call else 0.0
        self.lin = nn.Linear(N, N)

    def forward(self, x):
        h = self.lin(x)
        cov = h.mT @ h / h.shape[-2] + SHIFT * torch.eye(N)
        # below the diagonal: read by uplo="L", so only the uplo="U" calls get a non-symmetric matrix
        A = cov + LOWER_NOISE * torch.ones(N, N).tril(-1) * self.upper
        L, V = self.call(A)
        D = L.rsqrt() if self.power == -0.5 else L.sqrt()
        return (V * D.unsqueeze(-2)) @ V.mT


def _power64(model: nn.Module, x: torch.Tensor, power: float) -> torch.Tensor:
    """``cov^power`` in float64 by ``torch.linalg.eigh`` (the covariance the model builds; only its upper
    triangle is the matrix for uplo="U", and the covariance is symmetric, so it is the matrix either way)."""
    with torch.no_grad():
        h = model.lin(x).double()
        cov = h.mT @ h / h.shape[-2] + SHIFT * torch.eye(N, dtype=torch.float64)
        L, V = torch.linalg.eigh(cov)
        return (V * L.pow(power).unsqueeze(-2)) @ V.mT


def _decompositions_left(gm: fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes
            if n.op == "call_function" and ("eigh" in str(n.target) or "svd" in str(n.target))]


@pytest.mark.parametrize("power", [-0.5, 0.5])
@pytest.mark.parametrize("call", list(EIGH_CALLS))
def test_a_plain_trace_of_eigh_stable_becomes_newton_schulz(call, power):
    torch.manual_seed(0)
    model = EighPower(call, power).eval()
    gm = fx.symbolic_trace(model)
    assert any("orthofx.eigh_stable" in t for t in _decompositions_left(gm))  # the custom op, as one node
    results = to_newton_schulz(gm, iterations=25)
    assert list(results.values()) == ["replaced"], results
    assert _decompositions_left(gm) == []
    for x in (torch.randn(32, N), torch.randn(3, 32, N)):  # one matrix, and a batch of them
        y = gm(x)
        assert y.dtype == torch.float32  # cast back as eigh_stable(float64=True) casts its results
        torch.testing.assert_close(y.double(), _power64(model, x, power), rtol=2e-5, atol=2e-6)


class SvdPower(nn.Module):
    """``U diag(S^p) Vh`` of a symmetric positive definite matrix from ``svd_stable``: its ``A^p``."""

    def __init__(self, float64: bool, power: float):
        super().__init__()
        self.float64, self.power = float64, power
        self.lin = nn.Linear(N, N)

    def forward(self, x):
        h = self.lin(x)
        U, S, Vh = svd_stable(h.mT @ h / h.shape[-2] + SHIFT * torch.eye(N), float64=self.float64)
        return U @ torch.diag_embed(S.pow(self.power)) @ Vh


@pytest.mark.parametrize("float64", [False, True])
def test_a_plain_trace_of_svd_stable_becomes_newton_schulz(float64):
    torch.manual_seed(1)
    model = SvdPower(float64, -0.5).eval()
    gm = fx.symbolic_trace(model)
    results = to_newton_schulz(gm, iterations=25)
    assert list(results.values()) == ["replaced"], results
    assert _decompositions_left(gm) == []
    x = torch.randn(32, N)
    torch.testing.assert_close(gm(x).double(), _power64(model, x, -0.5), rtol=2e-5, atol=2e-6)


def test_eigenvectors_used_elsewhere_leave_the_custom_op_in_place():
    """No power covers every use of the decomposition: the custom op stays and computes what it did."""

    class AlsoVectors(nn.Module):
        def forward(self, h):
            L, V = eigh_stable(h.mT @ h / h.shape[-2] + SHIFT * torch.eye(N), float64=True)
            return (V * L.rsqrt().unsqueeze(-2)) @ V.mT, V

    gm = fx.symbolic_trace(AlsoVectors())
    (reason,) = to_newton_schulz(gm, iterations=25).values()
    assert reason != "replaced" and "not rewritten" not in reason, reason
    assert any("orthofx.eigh_stable" in t for t in _decompositions_left(gm))
    h = torch.randn(32, N)
    for got, expected in zip(gm(h), AlsoVectors()(h)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None,
                    reason="needs onnx and onnxruntime")
@pytest.mark.parametrize("call", ["defaults", "float64=True"])
def test_the_rewritten_trace_exports_to_onnx(call, tmp_path):
    """The rewritten trace holds matmuls only: torch.onnx.export takes it as it is, and onnxruntime's result is
    the float64 power within 1e-4."""
    import onnxruntime

    torch.manual_seed(2)
    model = EighPower(call, -0.5).eval()
    gm = fx.symbolic_trace(model)
    assert list(to_newton_schulz(gm, iterations=25).values()) == ["replaced"]
    x = torch.randn(32, N)
    path = os.path.join(tmp_path, "whiten.onnx")
    torch.onnx.export(gm, (x,), path, input_names=["x"], dynamo=True)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y).double(), _power64(model, x, -0.5), rtol=0, atol=1e-4)
