"""Riemannian training of recurrent layers: the hidden-to-hidden weights of nn.RNN / nn.LSTM / nn.GRU (and their
cells) kept orthonormal per gate block. Checked against float64 references written here (per-gate Gram matrices,
the polar factor of the SVD, the tangent projection ``G - W sym(W^T G)``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import orthofx
from orthofx.errors import PlanError
from orthofx.passes.riemannian import recurrent_hidden_weights
from references import bitwise_equal, polar64, state_copy, tangent64
from recurrent_models import CellLoop, Sequence

RULE = {"rules": [{"match": {"type": ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"]},
                   "apply": "riemannian"}]}


def _gate_blocks(weight: torch.Tensor, gates: int) -> torch.Tensor:
    return weight.detach().to(torch.float64).reshape(gates, weight.shape[0] // gates, weight.shape[1])


def _worst_gate_defect(weight: torch.Tensor, gates: int) -> float:
    """max |B^T B - I| (tall or square blocks) or |B B^T - I| (wide) over the gate blocks, dense float64."""
    worst = 0.0
    for block in _gate_blocks(weight, gates):
        gram = block.T @ block if block.shape[0] >= block.shape[1] else block @ block.T
        worst = max(worst, float((gram - torch.eye(gram.shape[0], dtype=torch.float64)).abs().max()))
    return worst


MODELS = {
    "lstm2_bidirectional": (lambda: Sequence(nn.LSTM(3, 6, num_layers=2, batch_first=True, bidirectional=True), 12),
                            4, ["weight_hh_l0", "weight_hh_l0_reverse", "weight_hh_l1", "weight_hh_l1_reverse"]),
    "gru": (lambda: Sequence(nn.GRU(3, 5, batch_first=True), 5), 3, ["weight_hh_l0"]),
    "rnn_relu": (lambda: Sequence(nn.RNN(3, 5, batch_first=True, nonlinearity="relu"), 5), 1, ["weight_hh_l0"]),
    "lstm_proj": (lambda: Sequence(nn.LSTM(3, 6, batch_first=True, proj_size=4), 4), 4, ["weight_hh_l0"]),
    "lstm_cell": (lambda: CellLoop(nn.LSTMCell(3, 5)), 4, ["weight_hh"]),
    "gru_cell": (lambda: CellLoop(nn.GRUCell(3, 5)), 3, ["weight_hh"]),
}


def _build(name):
    torch.manual_seed(0)
    factory, gates, names = MODELS[name]
    return factory(), gates, names


def test_recurrent_hidden_weights_names_every_hidden_weight_and_its_gate_count():
    assert recurrent_hidden_weights(nn.LSTM(3, 5, num_layers=2, bidirectional=True)) == [
        ("weight_hh_l0", 4), ("weight_hh_l0_reverse", 4), ("weight_hh_l1", 4), ("weight_hh_l1_reverse", 4)]
    assert recurrent_hidden_weights(nn.GRU(3, 5)) == [("weight_hh_l0", 3)]
    assert recurrent_hidden_weights(nn.RNN(3, 5, num_layers=3)) == [(f"weight_hh_l{k}", 1) for k in range(3)]
    assert recurrent_hidden_weights(nn.LSTM(3, 6, proj_size=2)) == [("weight_hh_l0", 4)]
    assert recurrent_hidden_weights(nn.LSTMCell(3, 5)) == [("weight_hh", 4)]
    assert recurrent_hidden_weights(nn.RNNCell(3, 5)) == [("weight_hh", 1)]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_init_projects_each_gate_block_and_leaves_the_rest(name):
    model, gates, names = _build(name)
    before = state_copy(model)
    x = torch.randn(2, 4, 3)
    gm = orthofx.transform(model, RULE, example_inputs=(x,))
    assert bitwise_equal(state_copy(model), before)  # the user's model is not modified
    rnn = gm.rnn
    original = model.rnn
    for pname, param in rnn.named_parameters():
        if pname in names:
            assert _worst_gate_defect(param, gates) < 1e-6
            # the nearest orthonormal block: the polar factor of the original gate block (float64 SVD)
            expected = torch.stack([polar64(b) for b in _gate_blocks(getattr(original, pname), gates)])
            torch.testing.assert_close(_gate_blocks(param, gates), expected, rtol=0, atol=1e-6)
        else:  # input weights, biases, LSTM projections: untouched
            assert torch.equal(param, getattr(original, pname)), pname
    change = orthofx.manifest_of(gm).changes[0]
    assert change.pass_name == "riemannian" and all(n in change.what for n in names)
    assert change.after["orth_defect"] < 1e-6 < change.before["orth_defect"]
    hooks = orthofx.manifest_of(gm).optimizer_hooks
    assert [h.parameter for h in hooks] == names and all(h.groups == gates for h in hooks)


def test_one_sgd_step_is_riemannian_gradient_descent_per_gate():
    model, gates, names = _build("lstm2_bidirectional")
    gm = orthofx.transform(model, RULE, example_inputs=(torch.randn(2, 4, 3),))
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.05)
    orthofx.attach(optimizer, gm)
    x, y = torch.randn(8, 5, 3), torch.randn(8, 3)
    (gm(x) - y).square().mean().backward()
    pre = {n: (getattr(gm.rnn, n).detach().clone(), getattr(gm.rnn, n).grad.clone()) for n in names}
    ih_before = gm.rnn.weight_ih_l0.detach().clone()
    ih_grad = gm.rnn.weight_ih_l0.grad.clone()
    optimizer.step()
    for n, (w, g) in pre.items():
        expected = torch.stack([polar64(wb - 0.05 * tangent64(wb, gb))
                                for wb, gb in zip(_gate_blocks(w, gates), _gate_blocks(g, gates))])
        torch.testing.assert_close(_gate_blocks(getattr(gm.rnn, n), gates), expected, rtol=0, atol=2e-6)
    # an input weight takes the plain SGD step
    torch.testing.assert_close(gm.rnn.weight_ih_l0.detach(), ih_before - 0.05 * ih_grad)


@pytest.mark.parametrize("name", ["lstm2_bidirectional", "gru_cell", "lstm_proj"])
@pytest.mark.parametrize("optimizer_name", ["sgd_momentum", "adam"])
def test_training_keeps_every_gate_block_orthonormal(name, optimizer_name):
    model, gates, names = _build(name)
    gm = orthofx.transform(model, RULE, example_inputs=(torch.randn(2, 4, 3),))
    if optimizer_name == "adam":
        optimizer = torch.optim.Adam(gm.parameters(), lr=1e-2)
    else:
        optimizer = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
    orthofx.attach(optimizer, gm)
    generator = torch.Generator().manual_seed(1)
    # sequences of the example's length: the cell loop over x.shape[1] is captured by torch.export, for that length
    x, y = torch.randn(16, 4, 3, generator=generator), torch.randn(16, 3, generator=generator)
    rnn = gm.rnn
    start = {n: getattr(rnn, n).detach().clone() for n in names}
    losses = []
    for _ in range(40):
        loss = (gm(x) - y).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    for n in names:
        assert _worst_gate_defect(getattr(rnn, n), gates) < 1e-5
    # they did move (a reverse direction's last layer gets no gradient from the last step's output: its hidden
    # state there is the zero initial state)
    assert not torch.allclose(getattr(rnn, names[0]), start[names[0]])


def test_explain_and_warnings_for_recurrent_layers():
    model, _, _ = _build("lstm2_bidirectional")
    x = torch.randn(2, 4, 3)
    linear_only = {"rules": [{"match": {"type": "Linear"}, "apply": "orth_regularizer"}]}
    warnings = orthofx.manifest_of(orthofx.transform(model, linear_only, example_inputs=(x,))).capture.warnings
    assert any("rnn (LSTM): no rule of the policy treats the recurrent weights" in w
               and "{match: {type: LSTM}, apply: riemannian}" in w for w in warnings)
    both = {"rules": [linear_only["rules"][0], {"match": {"type": "LSTM"}, "apply": "riemannian"}]}
    warnings = orthofx.manifest_of(orthofx.transform(model, both, example_inputs=(x,))).capture.warnings
    assert not any("recurrent weights" in w for w in warnings)
    text = str(orthofx.explain(model, both, example_inputs=(x,)))
    assert any("rnn" in line and "riemannian" in line and "apply" in line for line in text.splitlines()), text


def test_a_parametrized_hidden_weight_is_declined_with_the_way_to_undo_it():
    model, _, _ = _build("gru")
    parametrizations.orthogonal(model.rnn, "weight_hh_l0")
    x = torch.randn(2, 4, 3)
    with pytest.raises(PlanError, match=r"rnn: its weight_hh_l0 is computed by a torch parametrization "
                                         r"\(Orthogonal; undo with torch\.nn\.utils\.parametrize\."
                                         r"remove_parametrizations\(layer, 'weight_hh_l0'\)\)"):
        orthofx.transform(model, {"rules": [{"match": {"type": "GRU"}, "apply": "riemannian"}]},
                          example_inputs=(x,))


def test_free_first_frozen_and_only_square():
    torch.manual_seed(0)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.GRU(3, 5, batch_first=True)
            self.b = nn.LSTM(5, 6, batch_first=True, proj_size=4)

        def forward(self, x):
            return self.b(self.a(x)[0])[0]

    model = Two()
    model.a.weight_hh_l0.requires_grad_(False)
    x = torch.randn(2, 4, 3)
    free = {"rules": [{"match": {"type": ["GRU", "LSTM"]}, "apply": "riemannian", "with": {"free": "first"}}]}
    gm = orthofx.transform(model, free, example_inputs=(x,))
    statuses = {c.site: c.status for c in orthofx.manifest_of(gm).changes}
    assert statuses == {"a": "free", "b": "Stiefel, polar"}
    assert torch.equal(gm.a.weight_hh_l0, model.a.weight_hh_l0)
    # frozen: init: project leaves it as the user froze it
    plain = {"rules": [{"match": {"type": "GRU"}, "apply": "riemannian"}]}
    gm = orthofx.transform(model, plain, example_inputs=(x,))
    assert torch.equal(gm.a.weight_hh_l0, model.a.weight_hh_l0)
    assert "weight_hh_l0 frozen (requires_grad=False)" in orthofx.manifest_of(gm).changes[0].what
    # only_square: the projected LSTM's 6 x 4 gate blocks are not square
    square = {"rules": [{"match": {"type": ["GRU", "LSTM"]}, "apply": "riemannian",
                         "with": {"only_square": True}}]}
    gm = orthofx.transform(model, square, example_inputs=(x,))
    assert [c.site for c in orthofx.manifest_of(gm).changes] == ["a"]
    lines = str(orthofx.explain(model, square, example_inputs=(x,))).splitlines()
    assert any(line.startswith("b ") and "skipped: not square (6x4; only_square: true)" in line for line in lines)
