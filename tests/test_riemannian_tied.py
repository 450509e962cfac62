"""The ``riemannian`` pass on a weight tied between selected sites: one hook per tensor where the sites agree, a
PlanError naming both sites where they would cut the weight into other matrices or step it otherwise, and the
``free`` logic for tied weights."""

import pytest
import torch
from torch import nn

import orthofx
import orthofx.passes.riemannian  # noqa: F401  (registers the pass)
from orthofx.errors import PlanError
from orthofx.nn import stiefel

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices (tests/conftest.py)

H = 6


def rule(match, name=None, **options):
    out = {"match": match, "apply": "riemannian", "with": options}
    if name is not None:
        out["name"] = name
    return out


def polar_reference(x):
    """The polar factor ``U V^T`` of ``x`` in float64 (thin SVD): the nearest matrix with orthonormal columns."""
    u, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return u @ vh


def riemannian_sgd_reference(w, g, lr):
    """One step of Riemannian gradient descent from ``w`` in float64: ``polar(W - lr (G - W sym(W^T G)))``."""
    w, g = w.double(), g.double()
    wtg = w.T @ g
    return polar_reference(w - lr * (g - w @ (wtg + wtg.T) / 2))


# ---------------------------------------------------------------------------------- models with tied weights

class GruTiedToLinear(nn.Module):
    """A GRUCell(H, H) whose weight_hh (3 gate blocks of H x H) is also the weight of a Linear(H, 3H)."""

    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(H, H)
        self.lin = nn.Linear(H, 3 * H)
        self.lin.weight = self.cell.weight_hh

    def forward(self, x):
        return self.lin(self.cell(x))


class LstmTiedToLinear(nn.Module):
    """An LSTM's weight_hh_l0 (4 gate blocks of H x H) tied to a Linear(H, 4H)'s weight, the Linear first."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(H, 4 * H)
        self.lstm = nn.LSTM(4 * H, H, batch_first=True)
        self.lin.weight = self.lstm.weight_hh_l0

    def forward(self, x):
        return self.lstm(self.lin(x).unsqueeze(1))[0]


class GroupedConvTiedToConv(nn.Module):
    """A Conv2d(4, 4, 1, groups=2) and a Conv2d(2, 4, 1) sharing one (4, 2, 1, 1) weight."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(4, 4, 1, groups=2)
        self.dense = nn.Conv2d(2, 4, 1)
        self.dense.weight = self.grouped.weight

    def forward(self, x):
        return self.dense(self.grouped(x)[:, :2])


class TiedLinears(nn.Module):
    """Three H x H Linears ``m``, ``a``, ``b`` in this order; ``b`` shares ``a``'s weight."""

    def __init__(self):
        super().__init__()
        self.m = nn.Linear(H, H)
        self.a = nn.Linear(H, H)
        self.b = nn.Linear(H, H)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(torch.tanh(self.m(x)))))


class RnnCellTiedToLinear(nn.Module):
    """An RNNCell(H, H) (one H x H gate block) whose weight_hh is also a Linear(H, H)'s weight: one layout."""

    def __init__(self):
        super().__init__()
        self.cell = nn.RNNCell(H, H)
        self.lin = nn.Linear(H, H)
        self.lin.weight = self.cell.weight_hh

    def forward(self, x):
        return self.lin(self.cell(x))


def inputs(model):
    return torch.randn(4, 4, 3, 3) if isinstance(model, GroupedConvTiedToConv) else torch.randn(4, H)


# ------------------------------------------------------------------------------------ the errors

@pytest.mark.parametrize("model_class, types, first, second", [
    (GruTiedToLinear, ["GRUCell", "Linear"],
     ("'cell.weight_hh' (GRUCell", "3 gate blocks of 6x6, each with orthonormal columns"),
     ("'lin' (Linear", "one 18x6 matrix with orthonormal columns")),
    (LstmTiedToLinear, ["LSTM", "Linear"],
     ("'lin' (Linear", "one 24x6 matrix with orthonormal columns"),
     ("'lstm.weight_hh_l0' (LSTM", "4 gate blocks of 6x6, each with orthonormal columns")),
    (GroupedConvTiedToConv, ["Conv2d"],
     ("'grouped' (Conv2d", "2 groups of 2x2, each with orthonormal columns"),
     ("'dense' (Conv2d", "one 4x2 matrix with orthonormal columns")),
])
def test_tied_weight_cut_into_other_matrices_is_a_plan_error(model_class, types, first, second):
    """Each site's hook retracted the one tensor onto its own manifold, and the two do not meet (the 3 gate blocks
    B_i of a GRU cannot each have B_i^T B_i = I when the 18x6 stack has orthonormal columns, sum B_i^T B_i = I):
    after 5 SGD steps the GRU's gate defect was 0.667 while the manifest said both constraints hold."""
    torch.manual_seed(0)
    with pytest.raises(PlanError) as caught:
        orthofx.transform(model_class(), {"rules": [rule({"type": types})]}, example_inputs=(inputs(model_class()),))
    message = str(caught.value)
    # the later site in graph order is refused, naming the earlier one that constrains the weight already
    assert message.startswith(f"riemannian: {second[0]}, rule 'riemannian[0]') shares its weight with {first[0]}")
    assert f"cut it into different matrices: {second[0].split(' ')[0]} into {second[1]}" in message
    assert f"{first[0].split(' ')[0]} into {first[1]}" in message
    assert "Untie the weights, or leave one of the two layers out of the riemannian rules (match.exclude)" in message


#: A setting a tied site may not differ in: (name, the other value, how the error says it differs).
OTHER_SETTINGS = [
    ("retraction", "qr", "retraction qr vs polar"),
    ("momentum", "keep", "momentum keep vs project"),
    ("init", "keep", "init keep vs project"),
]


@pytest.mark.parametrize("setting, value, differs", OTHER_SETTINGS)
def test_tied_weight_with_other_settings_is_a_plan_error(setting, value, differs):
    """Two rules stepping one tensor with another retraction (or momentum, init): the polar hook retracted the
    weight, then the qr hook retracted again from the pre-step point along the projection of the polar result,
    and the momentum buffer was transported (project) although one rule said keep."""
    policy = {"rules": [rule({"name": "a"}, name="first"), rule({"name": "b"}, name="second", **{setting: value})]}
    with pytest.raises(PlanError) as caught:
        orthofx.transform(TiedLinears(), policy)
    message = str(caught.value)
    assert message.startswith("riemannian: 'b' (Linear, rule 'second') shares its weight with 'a' (Linear, rule "
                              "'first'), which this pass constrains already")
    assert f"with other settings ({differs}; both cut it into one 6x6 matrix with orthonormal columns)" in message
    assert "Give both rules the same retraction, momentum and init, or untie the weights" in message


@pytest.mark.parametrize("free_first", [True, False])
def test_weight_left_free_by_one_rule_and_constrained_by_another_is_a_plan_error(free_first):
    """Rule 'free' leaves 'a' unconstrained (free: first) while rule 'constrained' selects 'b', which shares its
    weight: 'b''s hook projected and retracted the free weight, and the manifest called 'a' free."""
    free_rule = rule({"name": "a"}, name="free", free="first")
    constrained_rule = rule({"name": "b"}, name="constrained")
    rules = [free_rule, constrained_rule] if free_first else [constrained_rule, free_rule]
    with pytest.raises(PlanError) as caught:
        orthofx.transform(TiedLinears(), {"rules": rules})
    assert str(caught.value) == (
        "riemannian: 'b' (Linear, rule 'constrained') shares its weight with 'a', which rule 'free' leaves free "
        "(free: first); constraining 'b' would project and retract that free weight too. Untie the weights, or "
        "select both layers with one rule (a site tied to the rule's free site is left free with it)")


# ------------------------------------------------------------------------------------ agreeing sites

def train(gm, steps, lr=0.05):
    """``steps`` SGD-momentum steps under attach; returns, for the first step, each constrained weight's value and
    gradient before it and its value after it (float64 copies)."""
    optimizer = torch.optim.SGD(gm.parameters(), lr=lr, momentum=0.9)
    orthofx.attach(optimizer, gm)
    generator = torch.Generator().manual_seed(3)
    first = None
    for step in range(steps):
        x = torch.randn(8, H, generator=generator)
        loss = (gm(x) - 1).square().mean()
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            first = {p: (p.detach().double().clone(), p.grad.double().clone()) for p in gm.parameters()
                     if p.dim() == 2}
        optimizer.step()
        if step == 0:
            first = {p: (w, g, p.detach().double().clone()) for p, (w, g) in first.items()}
    return first


@pytest.mark.parametrize("model_class, hooked, tied_site, tied_to", [
    (TiedLinears, [("m", "weight"), ("a", "weight")], "b", "a"),
    (RnnCellTiedToLinear, [("cell", "weight_hh")], "lin", "cell.weight_hh"),
])
def test_agreeing_tied_sites_get_one_hook_and_train_on_the_manifold(model_class, hooked, tied_site, tied_to):
    """Sites cutting a shared weight into the same matrices, with the same settings: one hook, at the first site,
    and the second's Change says so. Both sites had a hook; the result matched only because the two landed in one
    batch of the grouped hooks (run one after the other, the second retraction started from the first's result)."""
    torch.manual_seed(0)
    types = ["RNNCell", "Linear"] if model_class is RnnCellTiedToLinear else ["Linear"]
    gm = orthofx.transform(model_class(), {"rules": [rule({"type": types})]})
    manifest = orthofx.manifest_of(gm)
    assert [(h.site, h.parameter) for h in manifest.optimizer_hooks] == hooked
    change = {c.site: c for c in manifest.changes}[tied_site]
    assert change.status == "Stiefel, polar"
    assert f"tied to '{tied_to}', constrained there (one update per step)" in change.what
    assert change.after["tied_to"] == {"weight": tied_to}
    tied_weight = gm.get_submodule(tied_site).weight

    first_step = train(gm, 20)
    # the first step is Riemannian SGD on the tied weight's whole gradient (momentum: the buffer is the gradient)
    w, g, after = first_step[tied_weight]
    torch.testing.assert_close(after, riemannian_sgd_reference(w, g, 0.05), atol=1e-6, rtol=0)
    for site, pname in hooked:
        weight = getattr(gm.get_submodule(site), pname).detach()
        assert float(stiefel.orthogonality_defect(weight.double())) < 1e-5


def test_weight_tied_twice_within_one_recurrent_layer_gets_one_hook():
    """An LSTM whose two layers share one hidden-to-hidden weight: one hook, the second weight's tie named."""
    torch.manual_seed(0)
    lstm = nn.LSTM(H, H, num_layers=2, batch_first=True)
    lstm.weight_hh_l1 = lstm.weight_hh_l0
    model = nn.Sequential(lstm)
    gm = orthofx.transform(model, {"rules": [rule({"type": "LSTM"})]}, example_inputs=(torch.randn(2, 3, H),))
    manifest = orthofx.manifest_of(gm)
    assert [(h.site, h.parameter) for h in manifest.optimizer_hooks] == [("0", "weight_hh_l0")]
    change = manifest.changes[0]
    assert "weight_hh_l1 tied to '0.weight_hh_l0', constrained there" in change.what
    assert change.after["tied_to"] == {"weight_hh_l1": "0.weight_hh_l0"}


# ------------------------------------------------------------------------------------ free and tied

def test_free_site_and_its_tied_site_stay_free_with_free_last():
    """Unchanged: the free site of a rule ('b', last) and a site of the same rule tied to it ('a') both stay free;
    the weight is neither projected nor stepped on the manifold."""
    torch.manual_seed(0)
    model = TiedLinears()
    original = model.a.weight.detach().clone()
    gm = orthofx.transform(model, {"rules": [rule({"type": "Linear"}, free="last")]})
    manifest = orthofx.manifest_of(gm)
    assert [h.site for h in manifest.optimizer_hooks] == ["m"]
    status = {c.site: c for c in manifest.changes}
    assert status["a"].status == status["b"].status == "free"
    assert status["a"].what == "left free (its weight is tied to the free site 'b', free: last)"
    torch.testing.assert_close(gm.a.weight.detach(), original, rtol=0, atol=0)


def test_tied_pair_next_to_the_free_site_is_constrained_once():
    """free: first leaves 'm' free; the tied 'a' and 'b' are constrained by one hook at 'a' and stay on the
    manifold."""
    torch.manual_seed(0)
    gm = orthofx.transform(TiedLinears(), {"rules": [rule({"type": "Linear"}, free="first")]})
    manifest = orthofx.manifest_of(gm)
    assert [h.site for h in manifest.optimizer_hooks] == ["a"]
    status = {c.site: c for c in manifest.changes}
    assert status["m"].status == "free"
    assert status["b"].after == {"orth_defect": status["a"].after["orth_defect"], "free_site": "m",
                                 "tied_to": {"weight": "a"}}
    train(gm, 20)
    assert float(stiefel.orthogonality_defect(gm.a.weight.detach().double())) < 1e-5
    assert float(stiefel.orthogonality_defect(gm.m.weight.detach().double())) > 0.05
