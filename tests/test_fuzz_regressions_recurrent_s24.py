"""Regressions found by fuzzing the ``riemannian`` pass on recurrent layers (session 24).

Each test failed before its fix; references are plain torch (the hidden weights, a float64 Gram matrix per gate)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import orthofx
from orthofx.errors import PlanError
from recurrent_models import Sequence
from test_riemannian_recurrent import _worst_gate_defect


def _rule(kind: str, optional: bool = False) -> dict:
    return {"rules": [{"match": {"type": kind}, "apply": "riemannian", "optional": optional}]}


def _pruned_gru() -> Sequence:
    torch.manual_seed(0)
    model = Sequence(nn.GRU(3, 5, batch_first=True), 5)
    prune.random_unstructured(model.rnn, "weight_hh_l0", amount=0.3)
    return model


def test_a_pruned_hidden_weight_is_declined_with_the_way_to_undo_it():
    """torch.nn.utils.prune keeps weight_hh_l0 as a plain tensor that a forward pre-hook recomputes from
    weight_hh_l0_orig and the mask. The pass took the layer ("Riemannian training on the Stiefel manifold ...;
    weight_hh_l0 frozen"), attach then skipped its hook as a frozen weight's, and the GRU trained unconstrained
    without a word (gate defect 0.99 after one SGD step)."""
    x = torch.randn(2, 4, 3)
    with pytest.raises(PlanError, match=r"rnn: its weight_hh_l0 is not a parameter: a forward pre-hook "
                                         r"\(RandomUnstructured\) recomputes it from weight_hh_l0_orig at each call "
                                         r"\(undo with torch\.nn\.utils\.prune\.remove\(layer, 'weight_hh_l0'\)\)"):
        orthofx.transform(_pruned_gru(), _rule("GRU"), example_inputs=(x,))


@pytest.mark.filterwarnings("ignore:.*no optimizer was attached to this model")  # trained without attach on purpose
def test_an_optional_rule_leaves_the_pruned_layer_as_plain_torch_trains_it():
    """With ``optional: true`` the layer is skipped, with the reason, and trains as the untransformed model does
    (no hook claims to keep it on the manifold)."""
    x, y = torch.randn(4, 4, 3), torch.randn(4, 3)
    model = _pruned_gru()
    text = str(orthofx.explain(model, _rule("GRU", optional=True), example_inputs=(x,)))
    assert any(line.startswith("rnn ") and "skipped: its weight_hh_l0 is not a parameter" in line
               for line in text.splitlines()), text
    gm = orthofx.transform(model, _rule("GRU", optional=True), example_inputs=(x,))
    assert orthofx.manifest_of(gm).optimizer_hooks == []
    # the reference: one plain SGD step of the untouched model
    (model(x) - y).square().mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    orthofx.attach(optimizer, gm)
    (gm(x) - y).square().mean().backward()
    optimizer.step()
    torch.testing.assert_close(gm.rnn.weight_hh_l0_orig, model.rnn.weight_hh_l0_orig, rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize("make", ["weight_norm", "spectral_norm"])
def test_a_hidden_weight_of_the_older_norm_hooks_is_declined_with_the_way_to_undo_it(make):
    """The older torch.nn.utils.weight_norm / spectral_norm on a cell's weight_hh: the same silent failure as
    pruning (the hook stepped a tensor the next call recomputes)."""
    torch.manual_seed(0)
    cell = nn.LSTMCell(3, 4)
    getattr(torch.nn.utils, make)(cell, "weight_hh")
    kind = {"weight_norm": "WeightNorm", "spectral_norm": "SpectralNorm"}[make]
    with pytest.raises(PlanError, match=rf"its weight_hh is not a parameter: a forward pre-hook \({kind}\) "
                                        rf"recomputes it from weight_hh_[\w, ]+ at each call \(undo with "
                                        rf"torch\.nn\.utils\.remove_{make}\(layer, 'weight_hh'\)\)"):
        orthofx.transform(nn.Sequential(cell), _rule("LSTMCell"), example_inputs=(torch.randn(2, 3),))


def test_the_change_of_a_multi_layer_rnn_says_each_weight_is_one_block():
    """nn.RNN(num_layers=2) has two hidden weights of one 4x4 block each; the Change said "weight_hh_l0,
    weight_hh_l1: one block of 4x4", one block for both."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3)
    gm = orthofx.transform(Sequence(nn.RNN(3, 4, num_layers=2, batch_first=True), 4), _rule("RNN"),
                           example_inputs=(x,))
    what = orthofx.manifest_of(gm).changes[0].what
    assert what == ("Riemannian training on the Stiefel manifold (weight_hh_l0, weight_hh_l1: one block of 4x4 each, "
                    "orthonormal columns, polar retraction)")
    for name in ("weight_hh_l0", "weight_hh_l1"):  # what the text claims: each weight one orthonormal 4x4 block
        assert getattr(gm.rnn, name).shape == (4, 4) and _worst_gate_defect(getattr(gm.rnn, name), 1) < 1e-6
    # one weight: no "each"; an LSTM with proj_size: its H x proj_size gate blocks
    cell = orthofx.transform(nn.Sequential(nn.RNNCell(3, 4)), _rule("RNNCell"), example_inputs=(x[:, 0],))
    assert "(weight_hh: one block of 4x4, orthonormal columns" in orthofx.manifest_of(cell).changes[0].what
    lstm = orthofx.transform(Sequence(nn.LSTM(3, 6, batch_first=True, proj_size=4), 4), _rule("LSTM"),
                             example_inputs=(x,))
    assert "(weight_hh_l0: 4 gate blocks of 6x4 each, orthonormal columns" in orthofx.manifest_of(lstm).changes[0].what
    assert _worst_gate_defect(lstm.rnn.weight_hh_l0, 4) < 1e-6
