"""Regressions found by fuzzing the recurrent features of isometric_init, orth_regularizer and report.

References: hand-written float64 Gram matrices of the weights (rows or columns by shape) and the weights'
identity (``is``) for ties."""

import pytest
import torch
from torch import nn

import orthofx
from recurrent_models import RnnTiedToLinear


def _gram_defect_sq(w: torch.Tensor) -> float:
    """``||W W^T - I||_F^2`` (wide or square ``W``) or ``||W^T W - I||_F^2`` (tall), in float64."""
    w = w.detach().double()
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return float((gram - torch.eye(gram.shape[0], dtype=torch.float64)).square().sum())


@pytest.mark.parametrize("linear_first", [False, True], ids=["rnn-first", "linear-first"])
def test_isometric_init_of_an_rnn_hidden_weight_tied_to_a_linear_writes_it_once(linear_first):
    # was a PlanError: 'needs another matrix (one orthonormal matrix vs one gate block)', though one gate block is
    # one orthonormal matrix, as a Linear's weight
    torch.manual_seed(0)
    model = RnnTiedToLinear(linear_first)
    policy = {"rules": [{"match": {"type": ["Linear", "RNN"]}, "apply": "isometric_init", "with": {"gain": 0.5}}]}
    gm = orthofx.transform(model, policy, example_inputs=(torch.randn(5, 2, 4),))
    assert gm.rnn.weight_hh_l0 is gm.lin.weight
    w = gm.lin.weight.detach().double() / 0.5
    assert float((w.T @ w - torch.eye(4, dtype=torch.float64)).abs().max()) < 1e-6
    changes = {c.site: c.what for c in orthofx.manifest_of(gm).changes}
    second = "rnn" if linear_first else "lin"
    assert "tied to" in changes[second] and "written there" in changes[second]


@pytest.mark.parametrize("linear_first", [False, True], ids=["rnn-first", "linear-first"])
@pytest.mark.parametrize("case", ["auto", "CO"])
def test_orth_regularizer_counts_an_rnn_hidden_weight_tied_to_a_linear_once(linear_first, case):
    # was counted twice: once in the RNN's gate-block term, once in the Linear's L_orth term
    torch.manual_seed(1)
    policy = {"rules": [{"match": {"type": ["Linear", "RNN"]}, "apply": "orth_regularizer",
                         "with": {"weight": 1.0, "case": case}}]}
    gm = orthofx.transform(RnnTiedToLinear(linear_first), policy, example_inputs=(torch.randn(5, 2, 4),))
    expected = _gram_defect_sq(gm.lin.weight)  # square: RO and CO alike
    torch.testing.assert_close(float(orthofx.penalty(gm).detach()), expected, rtol=1e-5, atol=1e-6)
    assert len(orthofx.manifest_of(gm).penalties) == 1
    second = "rnn" if linear_first else "lin"
    assert "counted once" in next(c.what for c in orthofx.manifest_of(gm).changes if c.site == second)


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def test_report_shows_a_frozen_recurrent_layer_isometric_init_skipped():
    # the recurrent layer had no row at all, where a frozen conv or Linear shows 'skipped: frozen (...)' (as the
    # isometric_init docs promise)
    torch.manual_seed(2)
    model = Tagger()
    model.rnn.weight_hh_l0.requires_grad_(False)
    policy = {"rules": [{"match": {"type": ["LSTM", "Linear"]}, "apply": "isometric_init"}]}
    gm = orthofx.transform(model, policy, example_inputs=(torch.randn(2, 5, 3),))
    row = next(r for r in orthofx.report(gm).rows if r["site"] == "rnn")
    assert row["pass"].startswith("skipped: frozen (weight_hh_l0 requires_grad=False")
    blocks = gm.rnn.weight_hh_l0.detach().double().view(4, 4, 4)
    expected = sum(_gram_defect_sq(b) for b in blocks)  # the weight as it was: not initialised
    assert torch.equal(gm.rnn.weight_hh_l0, model.rnn.weight_hh_l0)
    assert row["lorth"] == pytest.approx(expected, rel=1e-9)
