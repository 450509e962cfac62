"""Session 44 (h_called): a ``jacobian_isometry`` probe on a module that the example run never called.

``nn.MultiheadAttention``'s forward reads ``out_proj.weight`` inside ``F.multi_head_attention_forward`` and never
calls ``out_proj``: a probe there never runs and adds 0 to the penalty at every step. ``transform`` now warns,
once per rule, naming the blocks the example run did not call. A sublayer of ``nn.TransformerEncoderLayer``,
which torch's eval fast path computes with without calling it, is not reported: the example run's hooks keep a
layer holding a site off that fast path (torch takes it only for a layer without hooks), and training calls it.
"""

import warnings

import pytest
import torch
from torch import nn

import orthofx
from orthofx.nn import JacobianProbe

DIAG = torch.tensor([0.5, 1.0, 1.5, 2.0])


class _Attention(nn.Module):
    def __init__(self, heads=2):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, heads, batch_first=True)
        self.mha2 = nn.MultiheadAttention(16, heads, batch_first=True)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        y = self.mha(x, x, x, need_weights=False)[0]
        return self.fc(self.mha2(y, y, y, need_weights=False)[0])


def _jacobian(names, weight=0.1):
    return {"rules": [{"match": {"kind": "module", "name": names}, "apply": "jacobian_isometry",
                       "with": {"weight": weight}}]}


def _ours(caught):
    return [str(w.message) for w in caught if issubclass(w.category, orthofx.OrthofxWarning)
            and "did not call" in str(w.message)]


def test_torch_never_calls_out_proj_as_a_module_in_training_either():
    # the premise of the warning's wording, checked on torch's own layer with a forward hook
    mha = nn.MultiheadAttention(16, 2, batch_first=True).train()
    calls = []
    mha.out_proj.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(3, 8, 16)
    mha(x, x, x)[0].sum().backward()
    assert calls == [] and mha.out_proj.weight.grad is not None


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_a_probe_on_out_proj_warns_once_per_rule_naming_the_sites(mode):
    torch.manual_seed(0)
    x = torch.randn(3, 8, 16)
    policy = _jacobian(["mha.out_proj", "mha2.out_proj", "fc"])
    policy["capture"] = {"mode": mode}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = orthofx.transform(_Attention(), policy, example_inputs=(x,))
    ours = _ours(caught)
    assert len(ours) == 1, ours
    message = ours[0]
    assert "rule 'jacobian_isometry[0]'" in message
    assert "(eval mode, without gradients) did not call 2 of its 3 block(s) as a module: 'mha.out_proj', " \
           "'mha2.out_proj'" in message
    assert "nn.MultiheadAttention reads its out_proj's weight directly" in message
    assert "stays 0 unless training calls them" in message and "{kind: block, name: ...}" in message
    assert "'fc'" not in message
    # what it warns of: both probes are in place and never estimate; fc's does
    assert isinstance(gm.mha.out_proj, JacobianProbe) and isinstance(gm.mha2.out_proj, JacobianProbe)
    gm.train()(x)
    terms = {key.rpartition("/")[2]: float(term.detach()) for key, term in orthofx.penalty_terms(gm).items()}
    assert terms["mha.out_proj"] == 0.0 and terms["mha2.out_proj"] == 0.0
    assert terms["fc"] > 0.0


def test_the_warning_matches_with_pytest_warns():
    x = torch.randn(3, 8, 16)
    with pytest.warns(orthofx.OrthofxWarning, match=r"did not call 1 of its 1 block\(s\) as a module: 'mha\.out_proj'"):
        orthofx.transform(_Attention(), _jacobian("mha.out_proj"), example_inputs=(x,))


def test_two_rules_warn_once_each():
    x = torch.randn(3, 8, 16)
    policy = {"rules": [{"name": "a", "match": {"kind": "module", "name": "mha.out_proj"},
                         "apply": "jacobian_isometry"},
                        {"name": "b", "match": {"kind": "module", "name": "mha2.out_proj"},
                         "apply": "jacobian_isometry"}]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        orthofx.transform(_Attention(), policy, example_inputs=(x,))
    ours = _ours(caught)
    assert len(ours) == 2
    assert "rule 'a'" in ours[0] and "'mha.out_proj'" in ours[0] and "mha2" not in ours[0]
    assert "rule 'b'" in ours[1] and "'mha2.out_proj'" in ours[1]


def test_without_example_inputs_nothing_is_known_and_nothing_warns():
    with warnings.catch_warnings():
        warnings.simplefilter("error", orthofx.OrthofxWarning)
        gm = orthofx.transform(_Attention(), _jacobian("mha.out_proj"))
    assert isinstance(gm.mha.out_proj, JacobianProbe)


def test_a_called_linear_gives_no_warning_and_its_exact_penalty():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.diag(DIAG))
    x = torch.randn(5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", orthofx.OrthofxWarning)
        gm = orthofx.transform(model, _jacobian("0", weight=1.0), example_inputs=(x,))
    gm.train()(x)
    # J of the whole batch is I_5 (x) diag(d): every Rademacher probe gives ||J^T J - I||_F^2 exactly (float64)
    reference = 5 * float(((DIAG.double() ** 2 - 1) ** 2).sum())
    assert float(orthofx.penalty(gm).detach()) == pytest.approx(reference, rel=1e-6)


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(4, 2, 4, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            for block in self.enc.layers:
                block.linear1.weight.copy_(torch.diag(DIAG))
                block.linear2.weight.copy_(torch.diag(DIAG))

    def forward(self, x, mask=None):
        return self.fc(self.enc(x, src_key_padding_mask=mask))


def test_torch_calls_the_encoder_layers_linears_in_training_not_in_the_eval_fast_path(monkeypatch):
    # the premise: training calls linear1 as a module; eval without gradients and without hooks takes the fast path
    model = _Encoder()
    x = torch.randn(3, 5, 4)
    fast = []
    real = torch._transformer_encoder_layer_fwd
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", lambda *a: fast.append(1) or real(*a))
    with torch.no_grad():
        model.eval()(x)
    assert len(fast) == 2
    calls = []
    model.enc.layers[0].linear1.register_forward_hook(lambda *_: calls.append(1))
    model.train()(x)
    assert calls == [1] and len(fast) == 2


@pytest.mark.parametrize("mode", ["fx", "export"])
@pytest.mark.parametrize("masked", [False, True])
def test_an_encoder_layers_linears_give_no_warning_and_the_exact_penalty(mode, masked):
    torch.manual_seed(0)
    model = _Encoder()
    x = torch.randn(3, 5, 4)
    args = (x,)
    if masked:
        mask = torch.zeros(3, 5, dtype=torch.bool)
        mask[0, 3:] = True
        mask[2, 4:] = True
        args = (x, mask)
    policy = _jacobian("enc.layers.*.linear*", weight=1.0)
    policy["capture"] = {"mode": mode}
    with warnings.catch_warnings():
        warnings.simplefilter("error", orthofx.OrthofxWarning)
        warnings.filterwarnings("ignore", message=".*nested tensors is in prototype", category=UserWarning)
        gm = orthofx.transform(model, policy, example_inputs=args)
    assert len(orthofx.penalty_terms(gm)) == 4
    gm.train()
    out = gm(*args)
    # training calls each of the 4 linears once on all 3 * 5 tokens (padded ones too): J = I_15 (x) diag(d)
    reference = 4 * 15 * float(((DIAG.double() ** 2 - 1) ** 2).sum())
    assert float(orthofx.penalty(gm).detach()) == pytest.approx(reference, rel=1e-6)
    torch.testing.assert_close(out, model.train()(*args))


class _TrainingOnly(nn.Module):
    """``aux`` (diagonal) is called in training mode only."""

    def __init__(self):
        super().__init__()
        self.aux = nn.Linear(4, 4, bias=False)
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.aux.weight.copy_(torch.diag(DIAG))

    def forward(self, x):
        if self.training:
            x = self.aux(x)
        return self.fc(x)


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.blk = _TrainingOnly()

    def forward(self, x):
        return self.blk(x)


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_a_module_the_training_graph_calls_gives_no_warning(mode):
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    policy = _jacobian("aux", weight=1.0)
    policy["capture"] = {"mode": mode}
    with warnings.catch_warnings():
        warnings.simplefilter("error", orthofx.OrthofxWarning)
        gm = orthofx.transform(_TrainingOnly(), policy, example_inputs=(x,))
    gm.train()(x)
    reference = 5 * float(((DIAG.double() ** 2 - 1) ** 2).sum())  # J = I_5 (x) diag(d), exact for any probe
    assert float(orthofx.penalty(gm).detach()) == pytest.approx(reference, rel=1e-6)


def test_a_training_only_call_inside_a_module_kept_whole_warns_with_that_caveat():
    # the graphs do not show what a leaf's forward calls: the warning says training may still call it, as here
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    policy = _jacobian("blk.aux", weight=1.0)
    policy["capture"] = {"mode": "fx", "leaf_modules": ["blk"]}
    with pytest.warns(orthofx.OrthofxWarning, match=r"did not call 1 of its 1 block\(s\) as a module: 'blk\.aux'.*"
                                                    r"stays 0 unless training calls them \(a branch on self\.training"):
        gm = orthofx.transform(_Outer(), policy, example_inputs=(x,))
    gm.train()(x)
    reference = 5 * float(((DIAG.double() ** 2 - 1) ** 2).sum())
    assert float(orthofx.penalty(gm).detach()) == pytest.approx(reference, rel=1e-6)
