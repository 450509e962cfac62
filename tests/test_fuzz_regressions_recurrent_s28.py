"""Regressions found by fuzzing recurrent layers under ``riemannian`` / ``isometric_init`` / ``orth_regularizer``
(session 28): every test here failed before its fix.

* A NaN / inf step in one gate block of a recurrent hidden weight (a weight cut into several matrices, shape
  ``(gates, H, c)``) made the retraction's clean-up index the failed *blocks* as if they were weights: an
  IndexError out of ``optimizer.step()`` (block 2 of the first weight gave index 2 in a batch of one or two
  weights), or the wrong weights named as diverged with the diverged weight put back only in its bad block.
  Grouped convs (one matrix per group) had the same fault.

References: dense float64 per-gate-block polar factors and tangent projections (tests/references.py).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthofx
from recurrent_models import CellLoop, RnnTiedToLinear, Sequence
from references import polar64, tangent64

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices (tests/conftest.py)


def _rule(kind: str) -> dict:
    return {"rules": [{"match": {"type": kind}, "apply": "riemannian"}]}


def _blocks(weight: torch.Tensor, gates: int) -> torch.Tensor:
    w = weight.detach().to(torch.float64)
    return w.reshape(gates, w.shape[0] // gates, w.shape[1])


def _worst_gate_defect(weight: torch.Tensor, gates: int) -> float:
    worst = 0.0
    for block in _blocks(weight, gates):
        gram = block.T @ block if block.shape[0] >= block.shape[1] else block @ block.T
        worst = max(worst, float((gram - torch.eye(gram.shape[0], dtype=torch.float64)).abs().max()))
    return worst


def _sgd_step_reference(weight: torch.Tensor, grad: torch.Tensor, gates: int, lr: float) -> torch.Tensor:
    """P1's step per gate block, ``polar(W - lr P_W(G))``, in float64, stacked back to the weight's shape."""
    return torch.cat([polar64(w - lr * tangent64(w, g)) for w, g in zip(_blocks(weight, gates), _blocks(grad, gates))])


def _diverge_one_block(gm: nn.Module, bad: str, block: int, gates: int, lr: float):
    """One SGD step of ``gm`` (attached) whose gradient of ``bad`` holds a NaN in gate block ``block``; returns the
    pre-step hidden weights and gradients (float64 copies), by name."""
    optimizer = torch.optim.SGD(gm.parameters(), lr=lr)
    orthofx.attach(optimizer, gm)
    x = torch.randn(3, 4, 3, generator=torch.Generator().manual_seed(1))
    gm(x).square().sum().backward()
    rows = getattr(gm.rnn, bad).shape[0] // gates
    getattr(gm.rnn, bad).grad[block * rows + 1, 0] = float("nan")
    names = [n for n, _ in gm.rnn.named_parameters() if n.startswith("weight_hh")]
    before = {n: (getattr(gm.rnn, n).detach().clone(), getattr(gm.rnn, n).grad.detach().clone()) for n in names}
    return optimizer, before


@pytest.mark.parametrize("block", [0, 2])
def test_a_nan_in_one_gate_block_of_a_cell_puts_its_weight_back_and_names_it(block):
    """GRUCell: one hidden weight of 3 gate blocks. A NaN in block 2 gave index 2 in a batch of one weight
    (IndexError); the weight is put back whole, bit for bit, and named in the OrthofxError."""
    torch.manual_seed(0)
    gm = orthofx.transform(CellLoop(nn.GRUCell(3, 4)), _rule("GRUCell"), example_inputs=(torch.randn(2, 4, 3),))
    optimizer, before = _diverge_one_block(gm, "weight_hh", block, 3, lr=0.1)
    with pytest.raises(orthofx.OrthofxError,
                       match=r"left the weights of site 'rnn\.weight_hh' \(rule '[^']+'\) NaN or inf \(their"):
        optimizer.step()
    assert torch.equal(gm.rnn.weight_hh, before["weight_hh"][0])


@pytest.mark.parametrize("bad, good", [("weight_hh_l0", "weight_hh_l1"), ("weight_hh_l1", "weight_hh_l0")])
def test_a_nan_in_one_gate_block_leaves_the_other_hidden_weight_its_step(bad, good):
    """A two-layer GRU: its two hidden weights (3 gate blocks of 5x5 each) are retracted as one batch. A NaN in
    gate block 1 of weight_hh_l0 named both weights as diverged (indices (0, 1) read as weights 0 and 1) and put
    back only that block, leaving weight_hh_l0 part stepped; one in block 2 of weight_hh_l1 raised an IndexError.
    Now the bad weight alone is named and put back whole, and the good one takes P1's step gate block by gate
    block (float64 polar reference, 1e-6 in float32)."""
    torch.manual_seed(0)
    gm = orthofx.transform(Sequence(nn.GRU(3, 5, num_layers=2, batch_first=True), 5), _rule("GRU"),
                           example_inputs=(torch.randn(2, 4, 3),))
    lr = 0.2
    optimizer, before = _diverge_one_block(gm, bad, 1 if bad.endswith("l0") else 2, 3, lr)
    with pytest.raises(orthofx.OrthofxError,
                       match=rf"left the weights of site 'rnn\.{bad}' \(rule '[^']+'\) NaN or inf \(their"):
        optimizer.step()
    assert torch.equal(getattr(gm.rnn, bad), before[bad][0])
    expected = _sgd_step_reference(*before[good], 3, lr)
    torch.testing.assert_close(getattr(gm.rnn, good).detach().double(), expected, rtol=0, atol=1e-6)
    assert _worst_gate_defect(getattr(gm.rnn, good), 3) < 1e-6


def test_a_nan_in_one_group_of_a_grouped_conv_names_that_conv_alone():
    """The same clean-up for a grouped conv (a weight cut into one matrix per group, as a recurrent weight into
    gate blocks): a NaN in group 1 of conv '0' named '0' and '2' as diverged, put back only group 1 of '0' and
    kept group 0's step. Now '0' is put back whole and '2' takes its step per group (float64 polar reference)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 1, groups=2), nn.Tanh(), nn.Conv2d(4, 4, 1, groups=2))
    gm = orthofx.transform(model, _rule("Conv2d"))
    lr = 0.1
    optimizer = torch.optim.SGD(gm.parameters(), lr=lr)
    orthofx.attach(optimizer, gm)
    gm(torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))).square().sum().backward()
    bad, good = gm.get_submodule("0").weight, gm.get_submodule("2").weight
    bad.grad[3, 0] = float("nan")  # group 1 (output channels 2, 3)
    bad_before, w, g = bad.detach().clone(), good.detach().clone(), good.grad.clone()
    with pytest.raises(orthofx.OrthofxError, match=r"left the weights of site '0' \(rule '[^']+'\) NaN or inf \(their"):
        optimizer.step()
    assert torch.equal(bad, bad_before)
    expected = _sgd_step_reference(w.flatten(1), g.flatten(1), 2, lr)  # per group: 2x2 blocks of the (4, 2) matrix
    torch.testing.assert_close(good.detach().double().flatten(1), expected, rtol=0, atol=1e-6)


def _defect64(w: torch.Tensor) -> float:
    w = w.detach().to(torch.float64)
    return float((w.T @ w - torch.eye(w.shape[1], dtype=torch.float64)).abs().max())


@pytest.mark.parametrize("linear_first", [False, True], ids=["rnn-first", "linear-first"])
def test_isometric_init_before_figures_of_a_hidden_weight_tied_to_a_linear(linear_first):
    """The Changes' ``before["orth_defect"]`` is each layer's weights' figure before the pass wrote them. The
    recurrent path measured all its hidden weights at once and before looking at ties: rnn-first, the Linear
    reported the RNN's max over weight_hh_l0 *and* weight_hh_l1 (3.0, the untied l1's, instead of its own 0.21);
    linear-first, the RNN measured weight_hh_l0 after the Linear had written it (0.21, l1's, instead of 3.0)."""
    torch.manual_seed(0)
    model = RnnTiedToLinear(linear_first, num_layers=2)
    q0, q1 = (torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0] for _ in range(2))
    tied_scale, other_scale = (2.0, 1.1) if linear_first else (1.1, 2.0)  # defects |s^2 - 1|: 3.0 and 0.21
    with torch.no_grad():
        model.lin.weight.copy_(tied_scale * q0)
        model.rnn.weight_hh_l1.copy_(other_scale * q1)
    tied_before, other_before = _defect64(model.lin.weight), _defect64(model.rnn.weight_hh_l1)
    policy = {"rules": [{"match": {"type": ["Linear", "RNN"]}, "apply": "isometric_init"}]}
    gm = orthofx.transform(model, policy, example_inputs=(torch.randn(5, 2, 4),))
    before = {c.site: c.before["orth_defect"] for c in orthofx.manifest_of(gm).changes}
    assert before["lin"] == pytest.approx(tied_before, rel=1e-6)
    assert before["rnn"] == pytest.approx(max(tied_before, other_before), rel=1e-6)
    for w in (gm.lin.weight, gm.rnn.weight_hh_l1):  # and both written once, orthonormal
        assert _defect64(w) < 1e-6
    assert gm.rnn.weight_hh_l0 is gm.lin.weight
