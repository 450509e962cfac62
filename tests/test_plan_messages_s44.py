"""Session 44 (h_plan): messages that sent users the wrong way, each with its remedy run and checked.

* a ``jacobian_isometry`` rule on blocks returning a tuple (``nn.MultiheadAttention``, a block returning
  ``(y, aux)``) did nothing silently: explain said 'apply', transform neither warned nor raised, the penalty was 0;
* a ``kind: block`` rule naming a layer inside ``nn.TransformerEncoder`` (kept whole) was told to check its name
  against ``named_modules()``, which lists it;
* ``pre_svd`` with NOG / OLR on a weight that is a buffer suggested 'nog: false' and 'olr: false' alone, after which
  the rule did nothing.
"""

import warnings

import pytest
import torch
from torch import nn

import orthofx
from orthofx.nn import JacobianProbe


class _Pair(nn.Module):
    """A block returning ``(y, aux)``; ``body`` is a diagonal linear map, whose Jacobian is known exactly."""

    def __init__(self, diag):
        super().__init__()
        self.body = nn.Linear(len(diag), len(diag), bias=False)
        with torch.no_grad():
            self.body.weight.copy_(torch.diag(diag))

    def forward(self, x):
        y = self.body(x)
        return y, y.pow(2).mean()


class _PairModel(nn.Module):
    def __init__(self, diag):
        super().__init__()
        self.blk = _Pair(diag)
        self.head = nn.Linear(len(diag), 2)

    def forward(self, x):
        y, aux = self.blk(x)
        return self.head(y) + aux


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.mha(x, x, x, need_weights=False)[0])


def _rule(name, optional=False, **params):
    rule = {"match": {"kind": "block", "name": name}, "apply": "jacobian_isometry", "with": params}
    if optional:
        rule["optional"] = True
    return {"rules": [rule]}


DIAG = torch.tensor([0.5, 1.0, 1.5, 2.0])


def test_a_jacobian_rule_on_multihead_attention_warns_and_the_model_loads_from_a_pt(tmp_path):
    """A rule whose every block returns a tuple warns (it raised planning's PlanError at first: a review found the
    .pt files written before then no longer loaded, and an optional preset rule noisy)."""
    torch.manual_seed(0)
    x = torch.randn(3, 8, 16)
    with pytest.warns(orthofx.OrthofxWarning, match=r"rule 'jacobian_isometry\[0\]'.*1 of its 1 block\(s\) to have "
                                                    r"no Jacobian.*mha: it returns a tuple.*out_proj"):
        gm = orthofx.transform(_Attention(), _rule("mha"), example_inputs=(x,))
    gm.train()(x)
    assert orthofx.penalty_terms(gm) == {}
    path = str(tmp_path / "m.pt")
    orthofx.export(gm, path)
    with pytest.warns(orthofx.OrthofxWarning, match="mha: it returns a tuple"):
        loaded = orthofx.load(_Attention(), path, example_inputs=(x,))
    torch.testing.assert_close(loaded.eval()(x), gm.eval()(x))
    # planning's refusal of a pass that can handle none of its sites is unchanged (riemannian on the same layer)
    with pytest.raises(orthofx.PlanError, match=r"\(apply: riemannian\) matched 1 site\(s\) but its pass can handle "
                                                r"none of them: mha: "):
        orthofx.transform(_Attention(), {"rules": [{"match": {"type": "MultiheadAttention"}, "apply": "riemannian"}]},
                          example_inputs=(x,))


def test_the_remedy_a_submodule_returning_one_tensor_is_regularised_exactly():
    torch.manual_seed(0)
    model = _PairModel(DIAG)
    x = torch.randn(5, 4)
    with pytest.warns(orthofx.OrthofxWarning, match=r"blk: it returns a tuple.*select a module of yours that calls "
                                                    r"it and returns one tensor"):
        orthofx.transform(model, _rule("blk"), example_inputs=(x,))
    gm = orthofx.transform(model, _rule("blk.body", weight=1.0), example_inputs=(x,))
    assert isinstance(gm.get_submodule("blk.body"), JacobianProbe)
    gm.train()
    out = gm(x)
    # J of the whole batch is I_5 (x) diag(d), so J^T J - I is diagonal and every Rademacher probe gives the exact
    # ||J^T J - I||_F^2 = 5 * sum (d_i^2 - 1)^2 (float64 reference)
    reference = 5 * float(((DIAG.double() ** 2 - 1) ** 2).sum())
    assert float(orthofx.penalty(gm).detach()) == pytest.approx(reference, rel=1e-6)
    # and the transformed model computes what the model computes
    torch.testing.assert_close(out, model(x))


def test_some_blocks_returning_a_tuple_warn_and_an_optional_rule_is_silent():
    torch.manual_seed(0)
    model = _PairModel(DIAG)
    x = torch.randn(5, 4)
    with pytest.warns(orthofx.OrthofxWarning, match=r"rule 'jacobian_isometry\[0\]'.*1 of its 2 block\(s\).*blk: it "
                                                    r"returns a tuple"):
        gm = orthofx.transform(model, _rule(["blk", "head"]), example_inputs=(x,))
    assert [key.rpartition("/")[2] for key in orthofx.penalty_terms(gm)] == ["head"]
    assert not isinstance(gm.blk, JacobianProbe)
    assert any(row.startswith("blk ") and "skipped: it returns a tuple" in row
               for row in str(orthofx.report(gm)).splitlines())
    with warnings.catch_warnings():  # an optional rule (a preset's) is silent: its report row says it
        warnings.simplefilter("error", orthofx.OrthofxWarning)
        gm = orthofx.transform(model, _rule("blk", optional=True), example_inputs=(x,))
    assert orthofx.penalty_terms(gm) == {}
    assert any(row.startswith("blk ") and "skipped: it returns a tuple" in row
               for row in str(orthofx.report(gm)).splitlines())


def test_without_example_inputs_the_first_training_step_names_the_block():
    torch.manual_seed(0)
    model = _PairModel(DIAG)
    x = torch.randn(5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", orthofx.OrthofxWarning)
        gm = orthofx.transform(model, _rule("blk"))  # nothing ran: the pass cannot know
    assert isinstance(gm.blk, JacobianProbe)
    torch.testing.assert_close(gm.eval()(x), model(x))  # eval mode runs the block only
    with pytest.raises(orthofx.LayerArgumentError, match=r"JacobianProbe at 'blk'.*returns a tuple"):
        gm.train()(x)


class _Enc(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.enc(x))


def _encoder():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    return _Enc(layer)


@pytest.mark.parametrize("match", [{"name": "enc.layers.0"}, {"type": "TransformerEncoderLayer"},
                                   {"name": r"re:enc\.layers\.[0-9]+"}])
def test_a_block_rule_inside_a_torch_layer_names_the_enclosing_leaf(match):
    torch.manual_seed(0)
    model = _encoder()
    x = torch.randn(2, 3, 8)
    assert "enc.layers.0" in dict(model.named_modules())
    policy = {"rules": [{"match": {"kind": "block", **match}, "apply": "jacobian_isometry"}]}
    with pytest.raises(orthofx.PlanError, match=r"matched no block site.*It selects enc\.layers\.0.* inside enc "
                                                r"\(TransformerEncoder\).*keeps that module whole.*select the "
                                                r"enclosing module instead \(e\.g\. \{kind: block, name: \"enc\"\}\)"):
        orthofx.transform(model, policy, example_inputs=(x,))


def test_the_remedy_selecting_the_encoder_regularises_its_jacobian():
    torch.manual_seed(0)
    model = _encoder().double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    gm = orthofx.transform(model, _rule("enc", weight=1.0, probes=64), example_inputs=(x,))
    assert isinstance(gm.enc, JacobianProbe)
    torch.testing.assert_close(gm.eval()(x), model.eval()(x))  # torch's own layers compute the same
    # the estimate is unbiased for ||J^T J - I||_F^2 of the whole batch: compare the mean of estimates with the dense
    # float64 Jacobian of the untransformed encoder
    jac = torch.autograd.functional.jacobian(lambda t: model.enc(t), x).reshape(x.numel(), x.numel())
    exact = float((jac.T @ jac - torch.eye(x.numel(), dtype=torch.float64)).pow(2).sum())
    gm.train()
    estimates = []
    for _ in range(8):
        gm(x)
        estimates.append(float(orthofx.penalty(gm).detach()))
    assert sum(estimates) / len(estimates) == pytest.approx(exact, rel=0.05)


def test_nested_block_rules_say_blocks_do_not_nest():
    model = nn.Sequential(nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Tanh()), nn.Linear(4, 4)), nn.Linear(4, 2))
    policy = {"rules": [{"match": {"kind": "block", "name": "0"}, "apply": "jacobian_isometry"},
                        {"match": {"kind": "block", "name": "0.0"}, "apply": "jacobian_isometry"}]}
    with pytest.raises(orthofx.PlanError, match=r"It selects 0\.0 inside 0, a block that another rule selects.*"
                                                r"blocks do not nest"):
        orthofx.transform(model, policy, example_inputs=(torch.randn(3, 4),))


class _BufferWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)
        weight = torch.randn(6, 6, generator=torch.Generator().manual_seed(1))
        del self.proj.weight
        self.proj.register_buffer("weight", weight)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = self.proj(x)
        cov = h.T @ h / h.shape[0] + 1e-2 * torch.eye(6)
        return self.head(h).sum() + torch.linalg.eigvalsh(cov).log().sum()


def test_pre_svd_on_a_buffer_weight_names_a_remedy_that_acts():
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    model = _BufferWeight()

    def policy(**params):
        return {"rules": [{"name": "ps", "match": {"feeds": "linalg.eigvalsh"}, "apply": "pre_svd", "with": params}]}

    with pytest.raises(orthofx.PlanError, match=r"'nog: false' and 'olr: false' in the rule with 'weight: orthogonal'"
                                                r".*without a weight treatment the rule does nothing.*'lorth' / "
                                                r"'srip' would only measure this weight"):
        orthofx.transform(model, policy(), example_inputs=(x,))
    # what the message warns of: lorth's penalty has no gradient to give
    gm = orthofx.transform(model, policy(nog=False, olr=False, weight="lorth"), example_inputs=(x,))
    assert not orthofx.penalty(gm).requires_grad
    # the remedy it names: the hard orthogonal layer, its weight the polar factor of the buffer (float64 SVD), fixed
    gm = orthofx.transform(model, policy(nog=False, olr=False, weight="orthogonal"), example_inputs=(x,))
    u, _, vh = torch.linalg.svd(model.proj.weight.double())
    torch.testing.assert_close(gm.proj.weight.detach().double(), u @ vh, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for name, p in gm.named_parameters() if name.startswith("proj.weight")
                   or name.startswith("proj.raw"))
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    gm.train()
    gm(x).backward()
    opt.step()
    gm(x)  # a training forward rebuilds the weight
    torch.testing.assert_close(gm.proj.weight.detach().double(), u @ vh, atol=1e-6, rtol=0)


def test_a_probe_on_a_module_never_called_is_not_silent():
    torch.manual_seed(0)
    x = torch.randn(3, 8, 16)
    policy = {"rules": [{"match": {"kind": "module", "name": "mha.out_proj"}, "apply": "jacobian_isometry"}]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = orthofx.transform(_Attention(), policy, example_inputs=(x,))
    gm.train()(x)
    assert float(orthofx.penalty(gm).detach()) == 0.0  # what happens: nothing regularised
    assert any(issubclass(w.category, orthofx.OrthofxWarning) and "mha.out_proj" in str(w.message) for w in caught)
