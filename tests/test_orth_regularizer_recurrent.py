"""The ``orth_regularizer`` pass on recurrent layers: soft orthogonality of the hidden-to-hidden weights of
nn.RNN / nn.LSTM / nn.GRU and their cells, gate block by gate block.

References are written here in float64: each gate block sliced by hand from the stacked weight, its smaller Gram
matrix formed densely, the squared distances to the identity summed; the gradient against central finite
differences."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import orthofx
from orthofx.errors import PlanError
from recurrent_models import CellLoop, Sequence

TYPES = ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"]
WEIGHT = 0.5


def _rule(weight: float = WEIGHT, case: str = "auto", optional: bool = False) -> dict:
    return {"rules": [{"name": "soft", "match": {"type": TYPES}, "apply": "orth_regularizer",
                       "with": {"weight": weight, "case": case}, "optional": optional}]}


# name -> (model factory, gates, the hidden-to-hidden weights by torch's documented names)
MODELS = {
    "rnn": (lambda: Sequence(nn.RNN(3, 5, batch_first=True), 5), 1, ["weight_hh_l0"]),
    "lstm2": (lambda: Sequence(nn.LSTM(3, 4, num_layers=2, batch_first=True), 4), 4,
              ["weight_hh_l0", "weight_hh_l1"]),
    "gru2_bidirectional": (lambda: Sequence(nn.GRU(3, 4, num_layers=2, batch_first=True, bidirectional=True), 8), 3,
                           ["weight_hh_l0", "weight_hh_l0_reverse", "weight_hh_l1", "weight_hh_l1_reverse"]),
    "lstm_proj": (lambda: Sequence(nn.LSTM(3, 6, batch_first=True, proj_size=4), 4), 4, ["weight_hh_l0"]),
    "rnn_cell": (lambda: CellLoop(nn.RNNCell(3, 5)), 1, ["weight_hh"]),
    "lstm_cell": (lambda: CellLoop(nn.LSTMCell(3, 4)), 4, ["weight_hh"]),
    "gru_cell": (lambda: CellLoop(nn.GRUCell(3, 4)), 3, ["weight_hh"]),
}


def _build(name: str, dtype=torch.float64):
    torch.manual_seed(0)
    factory, gates, names = MODELS[name]
    return factory().to(dtype), gates, names


def _x(dtype=torch.float64, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 4, 3, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _reference(weights: list[torch.Tensor], gates: int, case: str = "auto") -> torch.Tensor:
    """sum over the weights and their gate blocks (rows g H .. (g+1) H) of ||B B^T - I||^2 (wide or square B, or
    RO) or ||B^T B - I||^2 (tall B, or CO), dense float64."""
    total = torch.zeros((), dtype=torch.float64)
    for weight in weights:
        weight = weight.detach().to(torch.float64)
        hidden = weight.shape[0] // gates
        for g in range(gates):
            block = weight[g * hidden:(g + 1) * hidden, :]
            wide = block.shape[0] <= block.shape[1] if case == "auto" else case == "RO"
            gram = block @ block.T if wide else block.T @ block
            total = total + (gram - torch.eye(gram.shape[0], dtype=torch.float64)).square().sum()
    return total


def _gate_defect(layer: nn.Module, names: list[str], gates: int) -> float:
    return float(_reference([getattr(layer, n) for n in names], gates))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_penalty_is_the_sum_of_the_gate_blocks_defects_of_the_hidden_weights_only(name):
    model, gates, names = _build(name)
    gm = orthofx.transform(model, _rule(), example_inputs=(_x(),))
    expected = WEIGHT * _reference([getattr(model.rnn, n) for n in names], gates)
    penalty = orthofx.penalty(gm)
    torch.testing.assert_close(penalty, expected, rtol=1e-12, atol=0)
    assert list(orthofx.penalty_terms(gm)) == ["soft/rnn"]
    penalty.backward()
    for pname, param in gm.rnn.named_parameters():
        if pname in names:
            assert param.grad is not None and bool(param.grad.abs().sum() > 0), pname
        else:  # input weights, biases, LSTM projections (weight_hr): not penalised
            assert param.grad is None, pname


def test_gradient_matches_central_finite_differences_on_a_gru_cell():
    torch.manual_seed(0)
    model = CellLoop(nn.GRUCell(2, 2)).double()
    gm = orthofx.transform(model, _rule(weight=1.0), example_inputs=(torch.randn(2, 3, 2, dtype=torch.float64),))
    weight = gm.rnn.weight_hh  # 6 x 2: three 2 x 2 gate blocks
    orthofx.penalty(gm).backward()
    numeric = torch.zeros_like(weight)
    eps = 1e-6
    with torch.no_grad():
        for index in range(weight.numel()):
            entry = weight.view(-1)[index].item()
            weight.view(-1)[index] = entry + eps
            plus = float(orthofx.penalty(gm))
            weight.view(-1)[index] = entry - eps
            minus = float(orthofx.penalty(gm))
            weight.view(-1)[index] = entry
            numeric.view(-1)[index] = (plus - minus) / (2 * eps)
    torch.testing.assert_close(weight.grad, numeric, rtol=1e-6, atol=1e-8)
    assert gm.rnn.weight_ih.grad is None


@pytest.mark.parametrize("case", ["auto", "CO", "RO"])
def test_lstm_with_proj_size_penalises_its_tall_hidden_by_proj_blocks(case):
    """weight_hh_l0 of LSTM(3, 6, proj_size=4) is 24 x 4: four 6 x 4 gate blocks, tall, so ||B^T B - I_4||^2
    (auto and CO); RO forces ||B B^T - I_6||^2 = ||B^T B - I_4||^2 + 2 per block."""
    model, gates, names = _build("lstm_proj")
    gm = orthofx.transform(model, _rule(case=case), example_inputs=(_x(),))
    (term,) = orthofx.manifest_of(gm).penalties
    assert term.parameters == ("weight_hh_l0",) and term.gates == 4
    change = next(c for c in orthofx.manifest_of(gm).changes if c.site == "rnn")
    assert change.what == "attached L_orth regulariser to weight_hh_l0 (4 gate blocks of 6x4)"
    expected = _reference([model.rnn.weight_hh_l0], 4, case)
    torch.testing.assert_close(orthofx.penalty(gm), WEIGHT * expected, rtol=1e-12, atol=0)
    if case == "RO":
        torch.testing.assert_close(expected, _reference([model.rnn.weight_hh_l0], 4) + 4 * 2, rtol=1e-12, atol=0)


def test_bidirectional_two_layer_gru_penalises_its_four_hidden_weights_in_one_term():
    model, gates, names = _build("gru2_bidirectional")
    gm = orthofx.transform(model, _rule(), example_inputs=(_x(),))
    (term,) = orthofx.manifest_of(gm).penalties
    assert term.parameters == tuple(names) and term.gates == 3
    change = next(c for c in orthofx.manifest_of(gm).changes if c.site == "rnn")
    assert change.what == ("attached L_orth regulariser to weight_hh_l0, weight_hh_l0_reverse, weight_hh_l1, "
                           "weight_hh_l1_reverse (3 gate blocks of 4x4 each)")
    # each weight on its own: the reverse direction and the second layer count as much as the first
    each = [float(WEIGHT * _reference([getattr(model.rnn, n)], 3)) for n in names]
    assert float(orthofx.penalty(gm)) == pytest.approx(sum(each), rel=1e-12)


class TiedPair(nn.Module):
    """Two 2-layer LSTMs whose first layers share their hidden-to-hidden weight (the second layers do not)."""

    def __init__(self):
        super().__init__()
        self.a = nn.LSTM(3, 4, num_layers=2, batch_first=True)
        self.b = nn.LSTM(3, 4, num_layers=2, batch_first=True)
        self.b.weight_hh_l0 = self.a.weight_hh_l0

    def forward(self, x):
        return self.a(x)[0] + self.b(x)[0]


class TiedCells(nn.Module):
    """Two GRU cells with one hidden-to-hidden weight."""

    def __init__(self):
        super().__init__()
        self.a = nn.GRUCell(3, 4)
        self.b = nn.GRUCell(3, 4)
        self.b.weight_hh = self.a.weight_hh

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_a_hidden_weight_tied_between_layers_is_counted_once():
    torch.manual_seed(0)
    model = TiedPair().double()
    gm = orthofx.transform(model, _rule(), example_inputs=(_x(),))
    assert gm.b.weight_hh_l0 is gm.a.weight_hh_l0
    a, b = orthofx.manifest_of(gm).penalties
    assert (a.site, a.parameters, b.site, b.parameters) == ("a", ("weight_hh_l0", "weight_hh_l1"),
                                                             "b", ("weight_hh_l1",))
    expected = WEIGHT * _reference([model.a.weight_hh_l0, model.a.weight_hh_l1, model.b.weight_hh_l1], 4)
    torch.testing.assert_close(orthofx.penalty(gm), expected, rtol=1e-12, atol=0)
    change = next(c for c in orthofx.manifest_of(gm).changes if c.site == "b")
    assert change.what == ("attached L_orth regulariser to weight_hh_l1 (4 gate blocks of 4x4); weight_hh_l0 "
                           "(tied to a.weight_hh_l0) already penalised (tied weight: counted once)")


def test_cells_sharing_their_whole_hidden_weight_get_one_term():
    torch.manual_seed(0)
    model = TiedCells().double()
    gm = orthofx.transform(model, _rule(), example_inputs=(torch.randn(2, 3, dtype=torch.float64),))
    (term,) = orthofx.manifest_of(gm).penalties
    assert term.site == "a"
    torch.testing.assert_close(orthofx.penalty(gm), WEIGHT * _reference([model.a.weight_hh], 3), rtol=1e-12, atol=0)
    change = next(c for c in orthofx.manifest_of(gm).changes if c.site == "b")
    assert change.what == ("L_orth of its hidden-to-hidden weights is already attached; weight_hh (tied to "
                           "a.weight_hh) already penalised (tied weight: counted once)")


def test_a_parametrized_hidden_weight_is_declined_with_the_way_to_undo_it():
    torch.manual_seed(0)
    model = Sequence(nn.GRU(3, 4, batch_first=True), 4)
    parametrizations.orthogonal(model.rnn, "weight_hh_l0")
    with pytest.raises(PlanError, match=r"rnn: its weight_hh_l0 is computed by a torch parametrization "
                                         r"\(Orthogonal; undo with torch\.nn\.utils\.parametrize\."
                                         r"remove_parametrizations\(layer, 'weight_hh_l0'\)\)"):
        orthofx.transform(model, _rule(), example_inputs=(_x(torch.float32),))


def test_a_cell_of_hidden_size_zero_is_skipped_by_an_optional_rule():
    model = nn.Sequential(nn.GRUCell(3, 0), nn.Linear(0, 2))
    x = torch.randn(2, 3)
    text = str(orthofx.explain(model, _rule(optional=True), example_inputs=(x,)))
    assert any(line.startswith("0 ") and "skipped: empty hidden-to-hidden weights" in line
               for line in text.splitlines()), text


@pytest.mark.parametrize("name", ["gru_cell", "gru2_bidirectional"])
def test_training_loss_with_the_penalty_compiles_with_fullgraph_and_matches_eager(name):
    """``task loss + orthofx.penalty(gm)`` under ``torch.compile(fullgraph=True)``: value and gradients of the
    penalised hidden weights as in eager mode. Dynamo wraps nn.RNN / nn.LSTM / nn.GRU modules only with its
    experimental ``allow_rnn`` (their forward needs it as much as the penalty, which looks the layer up); cells need
    nothing."""
    model, gates, names = _build(name, torch.float32)
    x = _x(torch.float32)
    gm = orthofx.transform(model, _rule(), example_inputs=(x,))
    hidden = [getattr(gm.rnn, n) for n in names]

    def loss(x):
        return gm(x).square().mean() + orthofx.penalty(gm)

    eager = loss(x)
    eager_grads = torch.autograd.grad(eager, hidden)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(allow_rnn=isinstance(gm.rnn, nn.RNNBase)):
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(x)
    compiled_grads = torch.autograd.grad(compiled, hidden)
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want)


_FSDP2_SCRIPT = textwrap.dedent("""
    import torch, torch.distributed as dist, orthofx
    from torch.distributed.fsdp import fully_shard
    from test_orth_regularizer_recurrent import _build, _rule, _x
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model, gates, names = _build("gru2_bidirectional", torch.float32)
        gm = orthofx.transform(model, _rule(), example_inputs=(_x(torch.float32),))
        eager = orthofx.penalty(gm)
        grads = torch.autograd.grad(eager, [getattr(gm.rnn, n) for n in names])
        fully_shard(gm.rnn)
        fully_shard(gm)
        sharded = [getattr(gm.rnn, n) for n in names]
        assert all(type(w).__name__ == "DTensor" for w in sharded)
        value = orthofx.penalty(gm)
        assert type(value) is torch.Tensor, type(value)
        torch.testing.assert_close(value, eager)
        value.backward()
        for w, g in zip(sharded, grads):
            torch.testing.assert_close(w.grad.full_tensor(), g)
    finally:
        dist.destroy_process_group()
    print("ok")
""")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed support")
def test_penalty_of_hidden_weights_sharded_by_fsdp2_gathers_them():
    """Under FSDP2 (``fully_shard``, one gloo rank: the parameters become DTensors) the term reads each hidden weight
    through ``whole``: the same plain-tensor value as before sharding, and the shard's gradient is the eager one.
    In a child process, so that the process group does not outlive the test."""
    tests = Path(__file__).parent
    path = os.pathsep.join(p for p in (str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")) if p)
    result = subprocess.run([sys.executable, "-c", _FSDP2_SCRIPT], capture_output=True, text=True, timeout=120,
                            cwd=tests, env={**os.environ, "PYTHONPATH": path})
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


def test_report_row_and_penalty_of_a_recurrent_site_give_its_gate_defect():
    model, gates, names = _build("lstm2")
    gm = orthofx.transform(model, _rule(), example_inputs=(_x(),))
    rep = orthofx.report(gm)
    row = next(r for r in rep.rows if r["site"] == "rnn")
    expected = float(_reference([getattr(model.rnn, n) for n in names], gates))
    assert row["layer"] == "LSTM (lorth: hidden-to-hidden weights, per gate block)"
    assert row["lorth"] == pytest.approx(expected, rel=1e-12)
    (entry,) = rep.penalties
    assert entry["value"] == pytest.approx(expected, rel=1e-12)
    assert entry["weighted"] == pytest.approx(WEIGHT * expected, rel=1e-12)


def test_training_with_a_large_penalty_weight_reduces_the_gate_defect():
    """25 SGD steps on a small LSTM: with the penalty at weight 1 the hidden weights' gate defect (the float64
    reference) falls far below where it started, where the task loss alone leaves it."""
    generator = torch.Generator().manual_seed(2)
    # float64: torch's float32 CPU LSTM (oneDNN) runs 10x slower on a busy two-core machine
    x = torch.randn(8, 4, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(8, 3, generator=generator, dtype=torch.float64)
    names = ["weight_hh_l0"]

    def train(penalised: bool) -> tuple[float, float]:
        torch.manual_seed(0)
        model = Sequence(nn.LSTM(3, 5, batch_first=True), 5).double()
        gm = orthofx.transform(model, _rule(weight=1.0), example_inputs=(x[:2],))
        start = _gate_defect(gm.rnn, names, 4)
        optimizer = torch.optim.SGD(gm.parameters(), lr=0.05)
        for _ in range(25):
            optimizer.zero_grad()
            loss = (gm(x) - y).square().mean()
            (loss + orthofx.penalty(gm) if penalised else loss).backward()
            optimizer.step()
        return start, _gate_defect(gm.rnn, names, 4)

    start, with_penalty = train(True)
    _, without = train(False)
    assert start > 5  # torch's uniform initialisation is far from orthonormal gate blocks (11 here)
    # measured: 0.0068 after 25 steps with the penalty; 10.95 without (the task loss barely moves it)
    assert with_penalty < 0.01 * start and without > 0.9 * start, (start, with_penalty, without)
