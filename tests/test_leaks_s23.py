"""Memory held across training steps (session 23's leak hunt).

A ``JacobianProbe``'s estimate carries its autograd graph (the block's extra passes, with their saved
activations) from the forward until the loss's backward frees them. When nothing backpropagates through it (a
step whose loss leaves the penalty out, e.g. the micro-batches of gradient accumulation that add it once), that
graph was kept alive until the next estimate had been made, so the next forward's peak held two estimates' graphs.
The reference values are exact: for a linear block ``y = x W^T + b`` with a diagonal ``W = diag(s)``, the
whole-batch Jacobian is block diagonal with blocks ``W``, so ``J^T J - I`` is diagonal and every Rademacher probe
``v`` (``v_i^2 = 1``) gives ``||(J^T J - I) v||^2 = B * sum_i (s_i^2 - 1)^2`` exactly.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

from orthofx.nn.jacobian import JacobianProbe

D = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny float64 problems (tests/conftest.py)


def _diagonal_probe(scales: torch.Tensor) -> JacobianProbe:
    block = nn.Linear(len(scales), len(scales), dtype=D)
    with torch.no_grad():
        block.weight.copy_(torch.diag(scales))
    return JacobianProbe(block, seed=0)


def _exact_defect(scales: torch.Tensor, batch: int) -> torch.Tensor:
    """||J^T J - I||_F^2 of the whole batch for W = diag(scales): B * sum (s^2 - 1)^2."""
    return batch * (scales.square() - 1).square().sum()


@pytest.mark.parametrize("calls_per_step", [1, 2])
def test_probe_drops_the_last_estimate_before_making_the_next(calls_per_step):
    scales = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=D)
    probe = _diagonal_probe(scales)
    probe.calls_per_step = calls_per_step  # a block called that many times per forward (the pass sets it)
    x = torch.randn(3, 4, dtype=D)
    for _ in range(calls_per_step):  # one step, training mode with gradients, and no backward through it
        probe(x)
    torch.testing.assert_close(probe.estimate, calls_per_step * _exact_defect(scales, 3), rtol=1e-12, atol=0)
    last = weakref.ref(probe.estimate)
    alive_at_block_calls = []
    hook = probe.block.register_forward_pre_hook(lambda module, args: alive_at_block_calls.append(last() is not None))
    try:
        probe(x)  # the next step: its estimate runs the block first (on copies), then the block runs for the output
    finally:
        hook.remove()
    assert alive_at_block_calls, "the estimate did not run the block"
    # the last step's estimate (and the activations its graph saved) is gone before the new one is made
    assert alive_at_block_calls == [False] * len(alive_at_block_calls)
    assert last() is None
    for _ in range(calls_per_step - 1):
        probe(x)
    torch.testing.assert_close(probe.estimate, calls_per_step * _exact_defect(scales, 3), rtol=1e-12, atol=0)
