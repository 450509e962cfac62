"""Shared layers and planning-time checks (session 27).

* A lazy layer that has not run (no example inputs) under a pass that writes, steps or replaces its weight was
  refused only by that pass's ``apply``: ``explain`` showed 'apply', and ``transform(..., inplace=True)`` had run
  the passes of the earlier rules on the user's weights by then. Planning refuses it now, for both.
* One module under two names (``self.b = self.a``, an ``nn.Sequential`` holding one layer twice) is one site,
  named by its first path: a rule naming the other path matched nothing, and ``exclude`` of the other path left
  the module selected.
"""

import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import PlanError


def _dense_lorth(weight: torch.Tensor) -> float:
    """||W W^T - I||_F^2 (wide or square W) or ||W^T W - I||_F^2 (tall), in float64."""
    w = weight.detach().double()
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return float((gram - torch.eye(gram.shape[0], dtype=torch.float64)).square().sum())


class _PlainThenLazy(nn.Module):
    def __init__(self, lazy: nn.Module):
        super().__init__()
        self.c = nn.Linear(6, 6)
        self.d = lazy

    def forward(self, x):
        return self.d(self.c(x).unsqueeze(-1).unsqueeze(-1) if isinstance(self.d, nn.Conv2d) else self.c(x))


@pytest.mark.parametrize("apply, lazy, needs", [
    ("riemannian", lambda: nn.LazyLinear(6), "riemannian has no weight to write or to step"),
    ("isometric_init", lambda: nn.LazyLinear(6), "isometric_init has no weight to write or to step"),
    ("orthogonal_conv", lambda: nn.LazyLinear(6), "orthogonal_conv has no shape to build its replacement from"),
    ("convnorm", lambda: nn.LazyConv2d(4, 1), "convnorm has no shape to build its replacement from"),
], ids=["riemannian", "isometric_init", "orthogonal_conv", "convnorm"])
def test_explain_refuses_a_lazy_layer_as_transform_does_before_any_weight_is_written(apply, lazy, needs):
    policy = {"rules": [{"match": {"name": "c"}, "apply": "isometric_init"},
                        {"match": {"name": "d"}, "apply": apply}]}
    expected = (f"rule '{apply}[1]': d ({type(lazy()).__name__}) is a lazy layer that has not run yet, so {needs}. "
                "Pass example_inputs=(x,) to orthofx.transform (the model runs once before the rewrite), or run "
                "the model once before transforming it")
    with pytest.raises(PlanError) as from_explain:
        orthofx.explain(_PlainThenLazy(lazy()), policy)
    assert str(from_explain.value) == expected
    model = _PlainThenLazy(lazy())
    weight, bias = model.c.weight.detach().clone(), model.c.bias.detach().clone()
    with pytest.raises(PlanError) as from_transform:
        orthofx.transform(model, policy, inplace=True)
    assert str(from_transform.value) == expected
    # isometric_init (the first rule) did not write the user's layer before the refusal
    assert torch.equal(model.c.weight, weight) and torch.equal(model.c.bias, bias)
    assert model.d.has_uninitialized_params()
    # a pass that only reads the weight when the penalty is computed still takes the lazy layer
    plan = orthofx.explain(_PlainThenLazy(lazy()), {"rules": [{"match": {"name": "d"}, "apply": "orth_regularizer"}]})
    assert [entry.site.name for entry in plan.entries] == ["d"]


class _Aliased(nn.Module):
    """One Linear under two attribute names (its site is 'a', the first path), and another Linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = self.a
        self.c = nn.Linear(6, 6)

    def forward(self, x):
        return self.c(self.b(torch.relu(self.a(x))))


def test_a_rule_naming_the_second_path_of_a_module_selects_it():
    model = _Aliased()
    gm = orthofx.transform(model, {"rules": [{"match": {"name": "b"}, "apply": "orth_regularizer",
                                              "with": {"weight": 0.5}}]})
    assert [term.site for term in orthofx.manifest_of(gm).penalties] == ["a"]
    assert float(orthofx.penalty(gm).detach()) == pytest.approx(0.5 * _dense_lorth(model.a.weight), rel=1e-5)


def test_excluding_the_second_path_of_a_module_leaves_it_alone():
    model = _Aliased()
    gm = orthofx.transform(model, {"rules": [{"match": {"type": "Linear", "exclude": ["b"]},
                                              "apply": "orth_regularizer", "with": {"weight": 0.5}}]})
    assert [term.site for term in orthofx.manifest_of(gm).penalties] == ["c"]
    assert float(orthofx.penalty(gm).detach()) == pytest.approx(0.5 * _dense_lorth(model.c.weight), rel=1e-5)


def test_a_sequential_holding_one_layer_twice_is_selected_by_either_index():
    layer = nn.Linear(5, 5)
    model = nn.Sequential(layer, nn.Tanh(), layer)
    gm = orthofx.transform(model, {"rules": [{"match": {"name": "2"}, "apply": "riemannian"}]})
    assert [hook.site for hook in orthofx.manifest_of(gm).optimizer_hooks] == ["0"]
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    orthofx.attach(optimizer, gm)
    x = torch.randn(8, 5)
    gm(x).square().sum().backward()
    optimizer.step()
    w = gm.get_submodule("0").weight.detach().double()
    torch.testing.assert_close(w.T @ w, torch.eye(5, dtype=torch.float64), atol=1e-5, rtol=0)


class _AliasedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = self.a  # one module, two names: fx calls it 'a'

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_inplace_replaces_a_module_under_every_name_it_has():
    """With inplace=True the replaced layer went to the first path only: the user's model called the new layer as
    'a' and the old one as 'b', and its output differed from the returned model's by about 1."""
    torch.manual_seed(0)
    model = _AliasedConv()
    x = torch.randn(2, 4, 8, 8)
    gm = orthofx.transform(model, {"rules": [{"match": {"name": "a"}, "apply": "orthogonal_conv"}]},
                           example_inputs=(x,), inplace=True)
    assert model.a is model.b is gm.get_submodule("a")
    assert type(model.a).__name__ == "OrthogonalConv2d"
    with torch.no_grad():
        torch.testing.assert_close(model(x), gm(x), rtol=0, atol=0)
        # reference: the replacement applied twice, as written in the model's forward
        layer = gm.get_submodule("a")
        torch.testing.assert_close(model(x), layer(torch.relu(layer(x))), rtol=0, atol=0)


class _TiedTall(nn.Module):
    """Two Linears sharing one tall 6 x 4 weight, each feeding an eigh (so pre_svd selects both)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6, bias=False)
        self.b = nn.Linear(4, 6, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        h, g = self.a(x), self.b(x)
        eye = 1e-3 * torch.eye(6)
        return torch.linalg.eigh(h.T @ h + eye)[0].sum() + torch.linalg.eigh(g.T @ g + eye)[0].sum()


def test_a_tied_weight_under_two_lorth_cases_is_one_regulariser():
    """RO and CO differ by the constant M - C (P0), the same gradient: a weight tied between a site with case RO
    and one with case auto (CO for a tall weight) was penalised twice, its gradient doubled."""
    torch.manual_seed(0)
    model = _TiedTall()
    policy = {"rules": [{"match": {"name": "a"}, "apply": "orth_regularizer", "with": {"weight": 0.1, "case": "RO"}},
                        {"match": {"name": "b"}, "apply": "orth_regularizer", "with": {"weight": 0.1}}]}
    gm = orthofx.transform(model, policy)
    assert len(orthofx.manifest_of(gm).penalties) == 1
    w = gm.a.weight
    value = orthofx.penalty(gm)
    value.backward()
    # reference: the RO form once, ||W W^T - I||^2 of the 6 x 4 weight, and its gradient 4 (W W^T - I) W
    wd = w.detach().double()
    defect = wd @ wd.T - torch.eye(6, dtype=torch.float64)
    assert float(value) == pytest.approx(0.1 * float(defect.square().sum()), rel=1e-5)
    torch.testing.assert_close(w.grad.double(), 0.1 * 4 * defect @ wd, rtol=1e-4, atol=1e-6)


def test_a_tied_weight_under_two_srip_weights_is_one_regulariser():
    """SRIP's form held the rule's weight: tied sites with weights 0.1 and 0.1000001 counted the tensor twice
    (with equal weights, once). The first site's weight counts, as for L_orth."""
    torch.manual_seed(0)
    model = _TiedTall()
    rules = [{"match": {"feeds": "linalg.eigh", "name": site}, "apply": "pre_svd",
              "with": {"weight": "srip", "penalty_weight": weight, "nog": False, "power_iterations": 50}}
             for site, weight in (("a", 0.1), ("b", 0.1000001))]
    gm = orthofx.transform(model, {"rules": rules})
    terms = orthofx.manifest_of(gm).penalties
    assert [term.site for term in terms] == ["a"]
    b_change = next(c for c in orthofx.manifest_of(gm).changes if c.site == "b")
    assert b_change.after["penalty"] == "counted once, at a (tied weight)"
    # reference: SRIP of the tall weight, sigma_max(W^T W - I) from the smaller Gram, dense in float64
    wd = gm.a.weight.detach().double()
    sigma = torch.linalg.svdvals(wd.T @ wd - torch.eye(4, dtype=torch.float64))[0]
    assert float(orthofx.penalty(gm)) == pytest.approx(0.1 * float(sigma), rel=1e-3)


@pytest.mark.parametrize("first, second", [("convnorm", "orthogonal_conv"), ("orthogonal_conv", "convnorm")])
def test_two_replacing_passes_on_one_layer_do_not_advise_each_others_order(first, second):
    """Each order skipped the second rule with 'put this rule before' the first: following the advice skipped the
    other one with the opposite advice."""
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1))
    policy = {"rules": [{"name": "one", "match": {"type": "Conv2d"}, "apply": first},
                        {"name": "two", "match": {"type": "Conv2d"}, "apply": second, "optional": True}]}
    plan = orthofx.explain(model, policy)
    [(site, rule, reason)] = plan.skipped
    assert (site.name, rule) == ("0", "two")
    assert reason == (f"rule 'one' ({first}) replaces this layer earlier in the policy, and {second} needs the "
                      "original layer: a layer takes one replacement: narrow one of the matches")


def test_on_impossible_error_refuses_before_an_earlier_rule_writes_the_users_weights():
    """explain showed 'fails:' for a layer orthogonal_conv cannot make orthogonal (P0 Theorem 4) with
    on_impossible: error, but transform raised only inside the pass: with inplace=True the isometric_init rule
    before it had rewritten the user's first layer by then."""
    torch.manual_seed(0)
    # a strided 1 x 1 shortcut, 4 -> 8 at stride 2: P0's Theorem 4 admits no orthogonal kernel of that shape
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 8, 1, stride=2))
    original = [p.detach().clone() for p in model.parameters()]
    policy = {"rules": [{"match": {"name": "0"}, "apply": "isometric_init"},
                        {"match": {"name": "1"}, "apply": "orthogonal_conv", "with": {"on_impossible": "error"}}]}
    [_, entry] = orthofx.explain(model, policy).entries
    assert entry.outcome.startswith("fails: no orthogonal convolution exists (P0 Theorem 4)")
    with pytest.raises(orthofx.ImpossibleLayerError) as raised:
        orthofx.transform(model, policy, inplace=True)
    assert str(raised.value).startswith("rule 'orthogonal_conv[1]': 1 (Conv2d(4->8, k=1, s=2)): no orthogonal "
                                        "convolution exists (P0 Theorem 4)")
    assert str(raised.value).endswith("Set 'on_impossible: regularize' (L_orth instead) or 'skip' in the rule's "
                                      "'with:', or exclude the layer from the rule's match")
    for before, after in zip(original, model.parameters()):
        assert torch.equal(before, after.detach())
    assert type(model[1]) is nn.Conv2d
