"""isometric_init on recurrent layers: each gate block of the hidden-to-hidden weights scale * orthonormal.

References: the gate blocks are sliced by hand from the weight (rows ``g H .. (g + 1) H``) and checked in float64
against the identity and by their singular values; the one-step Jacobian of an nn.RNNCell comes from torch.func.
"""

import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import CaptureError, PlanError

from references import state_copy


def _rule(types, **params):
    rule = {"match": {"type": types}, "apply": "isometric_init"}
    if params:
        rule["with"] = params
    return {"rules": [rule]}


class Seq(nn.Module):
    """A recurrent layer (or cell) followed by a Linear head, as models use them."""

    def __init__(self, layer: nn.Module, out: int):
        super().__init__()
        self.layer = layer
        self.head = nn.Linear(out, 2)
        # decided here, not in forward: symbolic tracing cannot ask what a traced call returned
        self.kind = ("cell-pair" if isinstance(layer, nn.LSTMCell) else
                     "cell" if isinstance(layer, nn.RNNCellBase) else "sequence")

    def forward(self, x):
        if self.kind == "sequence":
            y = self.layer(x)[0][-1]
        elif self.kind == "cell-pair":
            y = self.layer(x[0])[0]
        else:
            y = self.layer(x[0])
        return self.head(y)


def _gate_blocks(weight: torch.Tensor, gates: int) -> list[torch.Tensor]:
    rows = weight.shape[0] // gates
    return [weight.detach().double()[g * rows:(g + 1) * rows] for g in range(gates)]


def _block_defect(block: torch.Tensor, scale: float) -> float:
    b = block / scale
    gram = b.T @ b if b.shape[0] >= b.shape[1] else b @ b.T
    return float((gram - torch.eye(gram.shape[0], dtype=gram.dtype)).abs().max())


CASES = [
    ("LSTM", lambda: nn.LSTM(3, 5, num_layers=2, bidirectional=True), 10, 4,
     ["weight_hh_l0", "weight_hh_l0_reverse", "weight_hh_l1", "weight_hh_l1_reverse"]),
    ("GRU", lambda: nn.GRU(3, 6), 6, 3, ["weight_hh_l0"]),
    ("RNN", lambda: nn.RNN(3, 4, num_layers=3, nonlinearity="relu"), 4, 1,
     ["weight_hh_l0", "weight_hh_l1", "weight_hh_l2"]),
    ("LSTM", lambda: nn.LSTM(3, 6, proj_size=2), 2, 4, ["weight_hh_l0"]),
    ("LSTMCell", lambda: nn.LSTMCell(3, 5), 5, 4, ["weight_hh"]),
    ("GRUCell", lambda: nn.GRUCell(3, 4), 4, 3, ["weight_hh"]),
    ("RNNCell", lambda: nn.RNNCell(3, 7), 7, 1, ["weight_hh"]),
]


@pytest.mark.parametrize("type_name, make, out, gates, names", CASES,
                         ids=["lstm-2layer-bi", "gru", "rnn-relu-3layer", "lstm-proj", "lstmcell", "grucell",
                              "rnncell"])
@pytest.mark.parametrize("gain", [1.0, 0.7])
def test_each_gate_block_is_scaled_orthonormal(type_name, make, out, gates, names, gain):
    torch.manual_seed(0)
    model = Seq(make(), out)
    original = state_copy(model)
    x = torch.randn(4, 2, 3)
    gm = orthofx.transform(model, _rule(type_name, gain=gain), example_inputs=(x,))
    layer = gm.layer
    for name in names:
        weight = getattr(layer, name)
        for block in _gate_blocks(weight, gates):
            assert _block_defect(block, gain) < 1e-6
            # all singular values equal the scale: the block is gain times an isometry on its smaller side
            torch.testing.assert_close(torch.linalg.svdvals(block), torch.full((min(block.shape),), gain,
                                                                               dtype=torch.float64), atol=1e-6, rtol=0)
    for name, value in layer.named_parameters():
        if name.startswith("bias_"):
            assert float(value.detach().abs().max()) == 0.0, name
        elif not name.startswith("weight_hh"):  # input weights and LSTM projections keep their values
            torch.testing.assert_close(value, original[f"layer.{name}"], rtol=0, atol=0)
    for name, value in model.state_dict().items():  # the user's model is left as it was
        assert torch.equal(value, original[name]), name
    change = next(c for c in orthofx.manifest_of(gm).changes if c.site == "layer")
    assert change.after["orth_defect"] < 1e-6 and change.before["orth_defect"] > 1e-2
    assert change.after["scale"] == pytest.approx(gain)
    assert ", ".join(names) in change.what
    assert (f"{gates} gate blocks" if gates > 1 else "one block") in change.what
    assert torch.isfinite(gm(x)).all()


def test_gate_blocks_are_independent_draws():
    # one Haar matrix per gate, not one matrix repeated: the blocks differ
    model = Seq(nn.LSTM(3, 5), 5)
    gm = orthofx.transform(model, _rule("LSTM", seed=3), example_inputs=(torch.randn(4, 2, 3),))
    blocks = _gate_blocks(gm.layer.weight_hh_l0, 4)
    for i in range(4):
        for j in range(i + 1, 4):
            assert float((blocks[i] - blocks[j]).abs().max()) > 1e-2


def test_rnn_step_jacobian_is_orthogonal_at_zero_state():
    # dh'/dh of h' = tanh(W_ih x + b_ih + W_hh h + b_hh) at x = 0, h = 0 with zeroed biases is W_hh: all singular
    # values 1, so the recurrence neither grows nor shrinks a perturbation of the state there
    torch.manual_seed(1)
    model = Seq(nn.RNNCell(3, 6), 6)
    gm = orthofx.transform(model, _rule("RNNCell"), example_inputs=(torch.randn(1, 2, 3),))
    cell = gm.layer.double()

    def step(h):
        return cell(torch.zeros(1, 3, dtype=torch.float64), h.unsqueeze(0)).squeeze(0)

    jacobian = torch.func.jacrev(step)(torch.zeros(6, dtype=torch.float64))
    torch.testing.assert_close(torch.linalg.svdvals(jacobian), torch.ones(6, dtype=torch.float64), atol=1e-6,
                               rtol=0)


def test_bias_keep_leaves_biases():
    model = Seq(nn.GRU(3, 4), 4)
    original = state_copy(model)
    gm = orthofx.transform(model, _rule("GRU", bias="keep"), example_inputs=(torch.randn(3, 2, 3),))
    for name in ("bias_ih_l0", "bias_hh_l0"):
        torch.testing.assert_close(getattr(gm.layer, name), original[f"layer.{name}"], rtol=0, atol=0)


def test_seed_reproduces_and_leaves_the_global_rng():
    model = Seq(nn.LSTM(3, 5), 5)
    x = torch.randn(3, 2, 3)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    first = orthofx.transform(model, _rule("LSTM", seed=11), example_inputs=(x,))
    assert torch.equal(torch.get_rng_state(), state)
    second = orthofx.transform(model, _rule("LSTM", seed=11), example_inputs=(x,))
    other = orthofx.transform(model, _rule("LSTM", seed=12), example_inputs=(x,))
    assert torch.equal(first.layer.weight_hh_l0, second.layer.weight_hh_l0)
    assert not torch.equal(first.layer.weight_hh_l0, other.layer.weight_hh_l0)


def test_activation_gain_skips_recurrent_layers_with_the_reason():
    model = Seq(nn.LSTM(3, 5), 5)
    policy = _rule(["LSTM", "Linear"], activation="relu")
    text = str(orthofx.explain(model, policy))
    assert "recurrent layer under activation: relu" in text
    gm = orthofx.transform(model, policy, example_inputs=(torch.randn(3, 2, 3),))
    assert [c.site for c in orthofx.manifest_of(gm).changes if not c.status.startswith("skipped")] == ["head"]
    assert torch.equal(gm.layer.weight_hh_l0, model.layer.weight_hh_l0)
    with pytest.raises(PlanError, match="recurrent layer under activation: tanh"):
        orthofx.transform(model, _rule("LSTM", activation="tanh"))


def test_frozen_hidden_weight_is_skipped_unless_overwrite():
    model = Seq(nn.GRU(3, 4, num_layers=2), 4)
    model.layer.weight_hh_l1.requires_grad_(False)
    with pytest.raises(PlanError, match=r"frozen \(weight_hh_l1 requires_grad=False"):
        orthofx.transform(model, _rule("GRU"))
    model.layer.weight_hh_l1.requires_grad_(True)
    model.layer.bias_hh_l0.requires_grad_(False)
    with pytest.raises(PlanError, match=r"frozen \(bias_hh_l0 requires_grad=False"):
        orthofx.transform(model, _rule("GRU"))
    gm = orthofx.transform(model, _rule("GRU", bias="keep"))  # the frozen bias is not written: accepted
    assert _block_defect(_gate_blocks(gm.layer.weight_hh_l1, 3)[2], 1.0) < 1e-6
    gm = orthofx.transform(model, _rule("GRU", frozen="overwrite"))
    assert float(gm.layer.bias_hh_l0.abs().max()) == 0.0


def test_parametrized_hidden_weight_is_declined():
    model = Seq(nn.LSTM(3, 4), 4)
    torch.nn.utils.parametrizations.weight_norm(model.layer, "weight_hh_l0")
    with pytest.raises(PlanError, match=r"weight_hh_l0 is computed by a torch parametrization .*remove_param"):
        orthofx.transform(model, _rule("LSTM"))


def test_tied_hidden_weights():
    class Two(nn.Module):
        def __init__(self, other: nn.Module, name: str):
            super().__init__()
            self.a = nn.GRUCell(4, 4)
            self.b = other
            setattr(self.b, name, self.a.weight_hh)  # the 12 x 4 weight, shared

        def forward(self, x):
            return self.a(x) + self.b(x)[:, :4]

    # two GRU cells sharing weight_hh: written once, with the same gate blocks
    gm = orthofx.transform(Two(nn.GRUCell(4, 4), "weight_hh"), _rule("GRUCell"))
    assert gm.a.weight_hh is gm.b.weight_hh
    changes = {c.site: c for c in orthofx.manifest_of(gm).changes}
    assert "weight_hh tied to a, written there" in changes["b"].what
    assert max(_block_defect(b, 1.0) for b in _gate_blocks(gm.a.weight_hh, 3)) < 1e-6
    # a Linear(4 -> 12) sharing the cell's 12 x 4 weight would need one tall matrix, not three blocks
    message = r"b shares its weight with a.*\(one orthonormal matrix vs 3 gate blocks, one orthonormal matrix each\)"
    with pytest.raises(PlanError, match=message + ".*Untie the weights first"):
        orthofx.transform(Two(nn.Linear(4, 12), "weight"), _rule(["GRUCell", "Linear"]))


def test_isometric_preset_initialises_recurrent_layers_and_stays_quiet_about_them():
    model = Seq(nn.LSTM(3, 5), 5)
    gm = orthofx.transform(model, "isometric", example_inputs=(torch.randn(3, 2, 3),))
    assert max(_block_defect(b, 1.0) for b in _gate_blocks(gm.layer.weight_hh_l0, 4)) < 1e-6
    # the plan warning about recurrent weights no pass handles is for layers no rule treats
    assert "no rule of the policy treats the recurrent" not in str(orthofx.explain(model, "isometric"))
    unhandled = str(orthofx.explain(model, "lorth"))
    assert "no rule of the policy treats the recurrent" in unhandled and "or apply: orth_regularizer, a penalty" in unhandled


def test_a_bare_layer_as_the_model_says_to_wrap_it():
    with pytest.raises(PlanError, match=r"The model is itself one layer \(Linear\).*Sequential\(layer\)"):
        orthofx.transform(nn.Linear(4, 4), "lorth")
    with pytest.raises(CaptureError, match=r"\(LSTM, a torch layer\).*torch.nn.Sequential\(layer\)"):
        orthofx.transform(nn.LSTM(4, 4), _rule("LSTM"))
    gm = orthofx.transform(nn.Sequential(nn.LSTM(4, 4)), _rule("LSTM"))  # the fix the messages give
    assert max(_block_defect(b, 1.0) for b in _gate_blocks(gm.get_submodule("0").weight_hh_l0, 4)) < 1e-6
