"""Compiled-equals-eager fuzzing of the state orthofx modules write (session 35): the Jacobian probe's estimate
with several Rademacher probes under ``torch.compile``.

Under compile the probes came from ``torch.randint_like``, which aot_autograd's common-subexpression elimination
(torch 2.13, ``torch._functorch.compile_utils.fx_graph_cse``: its list of random ops has ``randint`` but not
``randint_like``) treated as pure in any graph with a backward: the probes of one estimate were merged into the
first, so a compiled ``offdiag`` estimate (a variance over the probes) was exactly 0 and a compiled ``full``
estimate with ``probes=k`` averaged one probe k times. Each probe is now drawn like the previous one (different
arguments: no merge). The reference is the dense float64 Jacobian with the probes drawn from the same seed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from orthofx.nn import JacobianProbe

_CASES = [("offdiag", 2), ("offdiag", 3), ("full", 3)]


def _block() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 5), nn.Tanh()).double()


def _dense_estimate(block: nn.Module, x: torch.Tensor, kind: str, probes: int, seed: int) -> float:
    """``offdiag``: Var_v(||J v||^2) / 2 (unbiased over the probes); ``full``: mean_v ||J^T J v - v||^2, with J the
    dense Jacobian of the whole batch and v the Rademacher probes the global RNG gives after ``seed`` (eagerly
    and, on the CPU generator, in an aot_eager graph alike)."""
    n = x.numel()
    J = torch.autograd.functional.jacobian(block, x).reshape(n, n)
    torch.manual_seed(seed)
    vs = [(torch.randint(0, 2, x.shape, dtype=torch.float64) * 2 - 1).reshape(n) for _ in range(probes)]
    if kind == "offdiag":
        return float(torch.stack([(J @ v).square().sum() for v in vs]).var(correction=1) / 2)
    return float(torch.stack([(J.T @ (J @ v) - v).square().sum() for v in vs]).mean())


def _x() -> torch.Tensor:
    return torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind,probes", _CASES)
def test_eager_probe_estimate_matches_the_dense_jacobian(kind, probes):
    """The eager estimate against the dense reference (the check that the reference draws the same probes)."""
    block, x = _block(), _x()
    probe = JacobianProbe(block, kind=kind, probes=probes)
    torch.manual_seed(7)
    probe(x)
    assert float(probe.estimate) == pytest.approx(_dense_estimate(block, x, kind, probes, 7), rel=1e-9)


@pytest.mark.parametrize("kind,probes", _CASES)
def test_compiled_probe_estimate_uses_every_probe(kind, probes):
    """The compiled estimate (aot_eager, fullgraph) against the dense reference: each probe its own draw (before
    the fix offdiag gave 0.0 and full the one-probe value)."""
    torch._dynamo.reset()
    block, x = _block(), _x()
    probe = JacobianProbe(block, kind=kind, probes=probes)
    compiled = torch.compile(probe, backend="aot_eager", fullgraph=True)
    try:
        torch.manual_seed(7)
        compiled(x)
    finally:
        torch._dynamo.reset()
    assert probe.route_used == "double_vjp"  # the compiled route
    expected = _dense_estimate(block, x, kind, probes, 7)
    assert expected > 1e-3
    assert float(probe.estimate) == pytest.approx(expected, rel=1e-9)


class _TwoProbesOfOneInput(nn.Module):
    """Two probes around equal blocks reading the same tensor: parallel branches, each with its own estimate."""

    def __init__(self):
        super().__init__()
        self.a = JacobianProbe(_block(), kind="full")
        self.b = JacobianProbe(_block(), kind="full")

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_two_compiled_probes_of_one_input_draw_their_own_probes():
    """Their draws had equal arguments (``randint_like`` of one input), which the same CSE merged: both estimates
    came out identical under compile. Each now equals its eager value from the same seed (eager draws a's probe,
    then b's), and the two differ (the estimates against the dense Jacobian: the eager test above)."""
    model, x = _TwoProbesOfOneInput(), _x()
    torch.manual_seed(3)
    model(x)
    eager = (float(model.a.estimate), float(model.b.estimate))
    assert eager[0] != eager[1]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    try:
        torch.manual_seed(3)
        compiled(x)
    finally:
        torch._dynamo.reset()
    assert (float(model.a.estimate), float(model.b.estimate)) == pytest.approx(eager, rel=1e-9)
