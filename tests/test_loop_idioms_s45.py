"""Training-loop idioms around the Riemannian hooks (session 45, found by an audit).

* An EMA / SWA copy (``AveragedModel``) of Riemannian weights is off the Stiefel manifold. README advised
  ``orthofx.nn.stiefel.project_to_stiefel`` of the weight, which is right for a Linear only: it takes a conv weight's
  leading dimensions as a batch of ``k x k`` matrices (defect 47 after it) and an LSTM's ``4H x H`` weight as one
  matrix (each gate block 0.75 off). ``orthofx.optim.project_stiefel_weights(ema)`` projects each weight as its hook
  cuts it: per conv group, per gate block.
* The forgot-``attach`` warning looked at an optimizer's first step only: a backbone frozen for a head warm-up and
  then unfrozen trained its Stiefel weights as plain parameters (0.4 off the manifold after 10 steps), silently.
* ``gm.load_state_dict(sd, assign=True)`` after ``attach`` replaces the weights; the Riemannian hooks warned once per
  site that the weights were "taken out of its param groups" and advised ``add_param_group`` (which leaves the
  replaced biases untrained). Now one warning names ``assign=True`` and the remedy, in OLR's words.
* Review of that: the replaced / taken-out question was asked per site, so one hidden weight of a 2-layer or
  bidirectional recurrent site taken out was called replaced (now per site and parameter); the bias sentence was
  said where no bias was replaced; a copy attached without a penalty had no weights registered (``attach`` registers
  them); an optimizer holding no hooked weight walked its state at every step (now one comparison).

References: float64 polar factors by SVD (tests/references.py), cut into matrices here, independently of orthofx.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import orthofx
import orthofx.optim
from references import polar64

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices (tests/conftest.py)

_RIEMANNIAN = {"rules": [{"match": {"type": ["Conv2d", "Linear", "LSTM"]}, "apply": "riemannian"}]}


class ConvLstm(nn.Module):
    """A 3x3 conv (tall, 24 x 18), a grouped 3x3 conv (groups=2: two wide 4 x 108 matrices), an LSTM (H=5: four
    5 x 5 gate blocks in weight_hh_l0) over the spatial positions, and a Linear (7 x 5, tall)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 24, 3)
        self.grouped = nn.Conv2d(24, 8, 3, groups=2)
        self.lstm = nn.LSTM(8, 5)
        self.fc = nn.Linear(5, 7)

    def forward(self, x):
        h = self.grouped(torch.tanh(self.conv(x)))           # (B, 8, 2, 2)
        sequence = h.flatten(2).permute(2, 0, 1)             # (4, B, 8)
        out, _ = self.lstm(sequence)
        return self.fc(out[-1])


def _data(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 2, 6, 6, generator=g), torch.randn(6, 7, generator=g)


def _matrices64(weight: torch.Tensor, blocks: int) -> torch.Tensor:
    """The weight as the hooks' matrices, in float64, written out here: ``blocks`` row blocks (conv groups, LSTM
    gates) of the weight flattened to ``out x rest``."""
    w = weight.detach().to(torch.float64)
    return w.reshape(blocks, w.shape[0] // blocks, -1)


def _polar_blocks64(weight: torch.Tensor, blocks: int) -> torch.Tensor:
    """The float64 polar factor of each matrix (tests/references.polar64), back in the weight's shape."""
    return torch.stack([polar64(m) for m in _matrices64(weight, blocks)]).reshape(weight.shape)


def _defect64(weight: torch.Tensor, blocks: int) -> float:
    """max |Q^T Q - I| (tall) or |Q Q^T - I| (wide) over the matrices, in float64."""
    worst = 0.0
    for m in _matrices64(weight, blocks):
        gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
        worst = max(worst, (gram - torch.eye(gram.shape[0], dtype=torch.float64)).abs().max().item())
    return worst


#: attribute path -> how many matrices the hooks cut it into
_CONSTRAINED = {"conv.weight": 1, "grouped.weight": 2, "lstm.weight_hh_l0": 4, "fc.weight": 1}


def _trained_with_average():
    torch.manual_seed(0)
    gm = orthofx.transform(ConvLstm(), _RIEMANNIAN, example_inputs=(_data(0)[0],))
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    orthofx.attach(optimizer, gm)
    swa = AveragedModel(gm)
    for step in range(8):
        x, y = _data(step)
        optimizer.zero_grad()
        (gm(x) - y).square().sum().backward()  # a sum: steps large enough to move every layer
        optimizer.step()
        swa.update_parameters(gm)
    return gm, swa


def _get(model: nn.Module, path: str) -> torch.Tensor:
    module, name = path.rsplit(".", 1)
    return getattr(model.get_submodule(module), name)


# ------------------------------------------------------------------------------------ 1. projecting an average


def test_an_averaged_copy_is_projected_per_group_and_per_gate_onto_float64_polar_factors():
    """After ``project_stiefel_weights(swa)`` each constrained weight of the copy is the float64 polar factor of its
    average, matrix by matrix as the hooks cut it (conv flattened to ``out x in k k``, per group; LSTM per gate
    block), with defect < 1e-6; everything else (biases, the input weights, the trained model) is untouched."""
    gm, swa = _trained_with_average()
    for path, blocks in _CONSTRAINED.items():  # the trained weights are on the manifold, their average is not
        assert _defect64(_get(gm, path), blocks) < 1e-5
        assert _defect64(_get(swa.module, path), blocks) > 1e-3, path
    averaged = {name: p.detach().clone() for name, p in swa.module.named_parameters()}
    trained = {name: p.detach().clone() for name, p in gm.named_parameters()}

    assert orthofx.optim.project_stiefel_weights(swa) == len(_CONSTRAINED)

    for path, blocks in _CONSTRAINED.items():
        weight = _get(swa.module, path)
        expected = _polar_blocks64(averaged[path], blocks)
        torch.testing.assert_close(weight.detach().double(), expected, atol=2e-6, rtol=0)
        assert _defect64(weight, blocks) < 1e-6, path
        assert weight.dtype == torch.float32 and isinstance(weight, nn.Parameter)
    for name, p in swa.module.named_parameters():
        if name not in _CONSTRAINED:
            assert torch.equal(p.detach(), averaged[name]), name
    for name, p in gm.named_parameters():
        assert torch.equal(p.detach(), trained[name]), name


def test_project_to_stiefel_of_the_tensor_is_not_the_hooks_geometry():
    """Why README's old advice was wrong beyond a Linear: ``project_to_stiefel`` of the conv weight treats it as a
    batch of 3x3 matrices and of the LSTM weight as one 20 x 5 matrix; the per-gate blocks stay off the manifold."""
    _, swa = _trained_with_average()
    from orthofx.nn.stiefel import project_to_stiefel
    conv = project_to_stiefel(swa.module.conv.weight.detach())
    assert _defect64(conv, 1) > 1.0
    lstm = project_to_stiefel(swa.module.lstm.weight_hh_l0.detach())
    assert _defect64(lstm, 4) > 0.1


def test_an_ema_of_a_bigger_model_with_a_transformed_part():
    """``AveragedModel`` of a model holding a transformed part (a backbone inside a wrapper) with an EMA average:
    the part's weights are found through the copy's manifest and projected; the head (not transformed) is not."""
    torch.manual_seed(1)
    backbone = orthofx.transform(nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)), _RIEMANNIAN)
    model = nn.Sequential(backbone, nn.Linear(6, 6))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    orthofx.attach(optimizer, model)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5))
    for step in range(5):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        ema.update_parameters(model)
    head = ema.module[1].weight.detach().clone()
    before = {i: ema.module[0].get_submodule(i).weight.detach().clone() for i in ("0", "2")}
    assert orthofx.optim.project_stiefel_weights(ema) == 2
    for i, w in before.items():
        torch.testing.assert_close(ema.module[0].get_submodule(i).weight.detach().double(), polar64(w), atol=2e-6,
                                   rtol=0)
    assert torch.equal(ema.module[1].weight.detach(), head)


def test_nothing_to_project_is_an_orthofx_error_and_a_nan_weight_leaves_every_weight_unchanged():
    with pytest.raises(orthofx.OrthofxError, match="not produced by orthofx.transform"):
        orthofx.optim.project_stiefel_weights(nn.Linear(3, 3))
    lorth = orthofx.transform(nn.Sequential(nn.Linear(4, 4)), "lorth")  # a penalty, no Stiefel hook
    with pytest.raises(orthofx.OrthofxError, match="keeps no weight on the Stiefel manifold"):
        orthofx.optim.project_stiefel_weights(AveragedModel(lorth))
    with pytest.raises(orthofx.ArgumentError, match="takes an nn.Module"):
        orthofx.optim.project_stiefel_weights({"0.weight": torch.eye(3)})

    _, swa = _trained_with_average()
    with torch.no_grad():
        swa.module.fc.weight[0, 0] = float("nan")
    before = {name: p.detach().clone() for name, p in swa.module.named_parameters()}
    with pytest.raises(orthofx.OrthofxError, match=r"fc.*1 NaN"):
        orthofx.optim.project_stiefel_weights(swa)
    for name, p in swa.module.named_parameters():
        assert torch.equal(p.detach(), before[name]) or name == "fc.weight", name


# --------------------------------------------------------------------- 2. forgot attach, backbone frozen first


def _warmup_then_unfreeze(attach: bool, add_group: bool = False):
    """A head trained for 3 steps with the hooked layers frozen, then all unfrozen for 4 more; per step, the
    OrthofxWarnings it gave. ``add_group``: the optimizer holds only the head at first (a fine-tuning optimizer)
    and the backbone is added with add_param_group when unfrozen."""
    torch.manual_seed(0)
    x = torch.randn(24, 8)
    y = torch.randint(0, 3, (24,))
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    gm = orthofx.transform(model, "isometric", example_inputs=(x,))
    backbone = [p for name, p in gm.named_parameters() if not name.startswith("4.")]
    head = [p for name, p in gm.named_parameters() if name.startswith("4.")]
    optimizer = torch.optim.SGD(head if add_group else gm.parameters(), lr=0.2, momentum=0.9)
    for p in backbone:
        p.requires_grad_(False)
    if attach:
        orthofx.attach(optimizer, gm)
    per_step = []
    for step in range(7):
        if step == 3:
            for p in backbone:
                p.requires_grad_(True)
            if add_group:
                optimizer.add_param_group({"params": backbone})
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            optimizer.zero_grad()
            nn.functional.cross_entropy(gm(x), y).backward()
            optimizer.step()  # the warning names this line
        per_step.append([w for w in record if issubclass(w.category, orthofx.OrthofxWarning)])
    return gm, per_step


@pytest.mark.parametrize("add_group", [False, True], ids=["all-in-optimizer", "add_param_group"])
def test_forgot_attach_warns_at_the_first_step_with_a_hooked_gradient(add_group):
    gm, per_step = _warmup_then_unfreeze(attach=False, add_group=add_group)
    assert [len(w) for w in per_step] == [0, 0, 0, 1, 0, 0, 0]
    warning = per_step[3][0]
    assert "no optimizer was attached to this model" in str(warning.message)
    assert warning.filename == __file__


@pytest.mark.parametrize("add_group", [False, True], ids=["all-in-optimizer", "add_param_group"])
def test_the_same_loop_attached_gives_no_warning_and_stays_on_the_manifold(add_group):
    gm, per_step = _warmup_then_unfreeze(attach=True, add_group=add_group)
    assert per_step == [[]] * 7
    for site in ("0", "2"):
        assert _defect64(gm.get_submodule(site).weight, 1) < 1e-5


# ---------------------------------------------------------------- 3. load_state_dict(assign=True) after attach


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))


def test_assign_true_after_attach_is_one_warning_naming_assign_and_the_remedy():
    from orthofx.passes.base import replaced_after_attach  # here: each test of this file fails on its own before
    x = torch.randn(24, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randn(24, 8, generator=torch.Generator().manual_seed(1))
    saved = copy.deepcopy(orthofx.transform(_mlp(0), "isometric").state_dict())
    gm = orthofx.transform(_mlp(1), "isometric")
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
    orthofx.attach(optimizer, gm)
    gm.load_state_dict(saved, assign=True)
    with pytest.warns(orthofx.OrthofxWarning) as record:
        optimizer.zero_grad()
        (gm(x) - y).square().mean().backward()
        optimizer.step()  # the warning names this line
    ours = [w for w in record if issubclass(w.category, orthofx.OrthofxWarning)]
    assert len(ours) == 1  # one per model and step, not one per site
    text = str(ours[0].message)
    assert ours[0].filename == __file__
    assert "sites '0', '2', '4'" in text and "Riemannian update" in text
    assert replaced_after_attach("the weights", many=True) in text
    assert "load_state_dict(..., assign=True)" in text and "before building the optimizer" in text
    assert "load_state_dict without assign=True" in text
    assert "taken out of its param groups" not in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        for _ in range(2):
            optimizer.zero_grad()
            (gm(x) - y).square().mean().backward()
            optimizer.step()


def test_olrs_refusal_of_a_weight_replaced_after_attach_names_the_cause_and_the_remedy():
    """The Pre-SVD preset refuses the step (OLR) of a model whose weights ``load_state_dict(sd, assign=True)``
    replaced after ``attach``: the raised text itself names the site, the cause and both remedies (checked as
    written here, not against the helper that builds it)."""
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    gm = orthofx.transform(orthofx.models.get("gcp_cnn"), "svd", example_inputs=(x[:4],))
    saved = copy.deepcopy(gm.state_dict())
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.05)
    orthofx.attach(optimizer, gm)
    gm.load_state_dict(saved, assign=True)
    nn.functional.cross_entropy(gm(x), y).backward()
    with pytest.raises(orthofx.OrthofxError) as error:
        optimizer.step()
    text = str(error.value)
    assert "site 'conv_last' (rule 'pre-svd')" in text and "OLR" in text
    assert "not in any param group of this optimizer" in text
    assert "replaced after orthofx.attach (load_state_dict(..., assign=True)" in text
    assert "the optimizer holds the old tensor" in text
    assert "Load or assign the weights before building the optimizer (then attach it)" in text
    assert "load_state_dict without assign=True" in text


def _first_step_warnings(gm: nn.Module, optimizers: list, x: torch.Tensor) -> list[str]:
    """The OrthofxWarnings of one training step stepping ``optimizers`` in order."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for optimizer in optimizers:
            optimizer.zero_grad()
        gm(x).square().mean().backward()
        for optimizer in optimizers:
            optimizer.step()
    return [str(w.message) for w in record if issubclass(w.category, orthofx.OrthofxWarning)]


def _attached_mlp():
    gm = orthofx.transform(_mlp(1), "isometric")
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
    orthofx.attach(optimizer, gm)
    return gm, optimizer


def test_the_bias_sentence_only_where_assign_replaced_the_biases_the_optimizer_holds():
    """``assign=True`` of a whole state dict replaces the biases too, which the optimizer holds only as their old
    tensors: the warning names them. Loading only the weights (``strict=False``), or assigning a new
    ``nn.Parameter``, leaves the biases trained: no such sentence. No variant calls the new weights "unmoved" (a
    second optimizer may step them)."""
    x = torch.randn(24, 8, generator=torch.Generator().manual_seed(0))
    saved = copy.deepcopy(orthofx.transform(_mlp(0), "isometric").state_dict())

    gm, optimizer = _attached_mlp()
    gm.load_state_dict(saved, assign=True)
    whole, = _first_step_warnings(gm, [optimizer], x)
    assert "'0.bias', '2.bias', '4.bias'" in whole and "add_param_group would leave those untrained" in whole

    gm, optimizer = _attached_mlp()
    gm.load_state_dict({k: v for k, v in saved.items() if k in ("0.weight", "2.weight")}, strict=False, assign=True)
    weights_only, = _first_step_warnings(gm, [optimizer], x)
    assert "sites '0', '2' (rule" in weights_only and "replaced after orthofx.attach" in weights_only

    gm, optimizer = _attached_mlp()
    gm.get_submodule("2").weight = nn.Parameter(saved["2.weight"].clone())
    second = torch.optim.SGD([gm.get_submodule("2").weight], lr=0.1)  # steps the new weight
    new_parameter, = _first_step_warnings(gm, [optimizer, second], x)
    assert "site '2' (rule" in new_parameter and "replaced after orthofx.attach" in new_parameter

    for text in (weights_only, new_parameter):
        assert "bias" not in text and "add_param_group" not in text, text
    for text in (whole, weights_only, new_parameter):
        assert "unmoved" not in text and "taken out" not in text, text


def test_a_deepcopy_attached_without_a_penalty_then_assigned_is_told_replaced():
    """A ``copy.deepcopy`` of a transformed model, attached and trained without ``orthofx.penalty`` (which used to
    be what registered a copy's weights), then loaded with ``assign=True``: the warning says replaced, not taken
    out (``attach`` registers the weights it holds)."""
    x = torch.randn(24, 8, generator=torch.Generator().manual_seed(0))
    saved = copy.deepcopy(orthofx.transform(_mlp(0), "isometric").state_dict())
    gm = copy.deepcopy(orthofx.transform(_mlp(1), "isometric"))
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    orthofx.attach(optimizer, gm)
    gm.load_state_dict(saved, assign=True)
    text, = _first_step_warnings(gm, [optimizer], x)
    assert "sites '0', '2', '4'" in text and "replaced after orthofx.attach" in text
    assert "taken out of its param groups" not in text


# ------------------------------------------------ 4. one weight of a site with several (2-layer LSTM, bidirectional)


class Recurrent(nn.Module):
    def __init__(self, kind: str, **options):
        super().__init__()
        self.rnn = getattr(nn, kind)(6, 6, **options)

    def forward(self, x):
        return self.rnn(x)[0]


def _attached_recurrent(kind: str, **options):
    x = torch.randn(5, 3, 6, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    gm = orthofx.transform(Recurrent(kind, **options), {"rules": [{"match": {"type": [kind]}, "apply": "riemannian"}]},
                           example_inputs=(x,))
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    orthofx.attach(optimizer, gm)
    return gm, optimizer, x


@pytest.mark.parametrize("kind, options, name", [("LSTM", {"num_layers": 2}, "weight_hh_l1"),
                                                 ("GRU", {"bidirectional": True}, "weight_hh_l0_reverse")],
                         ids=["lstm-2-layers", "gru-bidirectional"])
def test_one_hidden_weight_taken_out_of_a_recurrent_site_is_taken_out_not_replaced(kind, options, name):
    """One hidden-to-hidden weight of a recurrent site taken out of the attached optimizer into a second one, while
    the attached optimizer still holds the site's other hidden weights: the warning is the taken-out one for that
    weight (it was reported as replaced by ``assign=True``, the site being held)."""
    gm, optimizer, x = _attached_recurrent(kind, **options)
    weight = getattr(gm.rnn, name)
    optimizer.param_groups[0]["params"] = [p for p in optimizer.param_groups[0]["params"] if p is not weight]
    second = torch.optim.SGD([weight], lr=0.1)
    text, = _first_step_warnings(gm, [optimizer, second], x)
    assert f"site 'rnn.{name}'" in text and "taken out of its param groups" in text
    assert "assign=True" not in text and "replaced after orthofx.attach" not in text


def test_one_hidden_weight_of_a_two_layer_lstm_replaced_is_told_replaced_without_a_bias_sentence():
    gm, optimizer, x = _attached_recurrent("LSTM", num_layers=2)
    gm.rnn.weight_hh_l1 = nn.Parameter(gm.rnn.weight_hh_l1.detach().clone())
    text, = _first_step_warnings(gm, [optimizer], x)
    assert "site 'rnn.weight_hh_l1'" in text and "replaced after orthofx.attach" in text
    assert "weight_hh_l0" not in text and "bias" not in text and "taken out" not in text


def test_a_whole_lstm_assigned_names_its_other_replaced_parameters():
    gm, optimizer, x = _attached_recurrent("LSTM", num_layers=2)
    gm.load_state_dict(copy.deepcopy(gm.state_dict()), assign=True)
    text, = _first_step_warnings(gm, [optimizer], x)
    assert "'rnn.weight_hh_l0', 'rnn.weight_hh_l1' (rule" in text and "replaced after orthofx.attach" in text
    # the first 4 of the 6 other parameters (input weights, biases) of both layers
    assert "nor the new 'rnn.weight_ih_l0', 'rnn.bias_ih_l0', 'rnn.bias_hh_l0', 'rnn.weight_ih_l1' and 2 more" in text


# -------------------------------------------------------------- 5. projecting: GRU gates, a weight on the manifold


def test_a_gru_average_is_projected_per_gate_onto_float64_polar_factors():
    """A 2-layer GRU's hidden weights (3H x H: three H x H gate blocks each) averaged by SWA: projected block by
    block onto the float64 polar factors; the input weights and biases are not touched."""
    gm, optimizer, x = _attached_recurrent("GRU", num_layers=2)
    swa = AveragedModel(gm)
    for step in range(6):
        optimizer.zero_grad()
        (gm(x + step) - step).square().sum().mul(10).backward()  # steps large enough to spread the average
        optimizer.step()
        swa.update_parameters(gm)
    averaged = {name: p.detach().clone() for name, p in swa.module.named_parameters()}
    hidden = ("rnn.weight_hh_l0", "rnn.weight_hh_l1")
    for path in hidden:
        assert _defect64(averaged[path], 3) > 1e-3, path
    assert orthofx.optim.project_stiefel_weights(swa) == 2
    for name, p in swa.module.named_parameters():
        if name in hidden:
            torch.testing.assert_close(p.detach().double(), _polar_blocks64(averaged[name], 3), atol=2e-6, rtol=0)
            assert _defect64(p, 3) < 1e-6
        else:
            assert torch.equal(p.detach(), averaged[name]), name


def test_weights_on_the_manifold_come_back_unchanged_to_rounding():
    """A trained model's weights are on the manifold (defect < 1e-5): projecting a copy of it moves each by no more
    than that order, matching the float64 polar factor of the weight (itself, to rounding)."""
    gm, _ = _trained_with_average()
    copied = copy.deepcopy(gm)
    assert orthofx.optim.project_stiefel_weights(copied) == len(_CONSTRAINED)
    for path, blocks in _CONSTRAINED.items():
        before, after = _get(gm, path).detach(), _get(copied, path).detach()
        assert (after - before).abs().max().item() < 1e-6, path  # 1e-7 seen: float32 rounding
        torch.testing.assert_close(after.double(), _polar_blocks64(before, blocks), atol=2e-6, rtol=0)


# ---------------------------------------------------- 6. a plain optimizer: one comparison per step, found again


def test_an_optimizer_holding_no_hooked_weight_returns_before_any_other_check(monkeypatch):
    """An optimizer holding no hooked weight (any plain optimizer of the process) keeps only its group count: the
    global step hook compares it and returns, without calling ``torch.compiler.is_compiling`` or walking its
    weights. A group added with the hooked weights of a transformed model no optimizer was attached to is found at
    the next step, which warns."""
    from orthofx.passes import base
    gm = orthofx.transform(_mlp(1), "isometric")
    plain = nn.Linear(8, 8)
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.1)
    for _ in range(2):
        plain(torch.randn(4, 8)).sum().backward()
        optimizer.step()
    calls = []
    real = torch.compiler.is_compiling
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: calls.append(1) or real())
    for _ in range(50):
        base._warn_unattached_step(optimizer, (), {})  # as torch calls it after each step
    assert calls == []
    monkeypatch.undo()

    optimizer.add_param_group({"params": list(gm.parameters())})
    with pytest.warns(orthofx.OrthofxWarning, match="no optimizer was attached to this model"):
        gm(torch.randn(4, 8)).sum().backward()
        optimizer.step()
