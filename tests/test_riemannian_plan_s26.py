"""The ``riemannian`` pass seen before it runs: ``orthofx.explain`` refuses the conflicting tied weights that
``orthofx.transform`` refuses (with the same PlanError, raised while planning), and a gain an earlier
``isometric_init`` gave a weight that the pass puts on the Stiefel manifold is reported lost (ScaleLostWarning and
the site's Change) instead of silently undone."""

import math
import warnings

import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import PlanError
from orthofx.nn import stiefel
from orthofx.errors import ScaleLostWarning
from test_riemannian_tied import (OTHER_SETTINGS, GroupedConvTiedToConv, GruTiedToLinear, LstmTiedToLinear,
                                  TiedLinears, inputs, rule)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices (tests/conftest.py)

H = 6


def plan_error(call) -> str:
    with pytest.raises(PlanError) as caught:
        call()
    return str(caught.value)


# ------------------------------------------------------------------------- explain refuses conflicting ties

@pytest.mark.parametrize("model_class, types, refused, constrains", [
    (GruTiedToLinear, ["GRUCell", "Linear"], "'lin' (Linear", "'cell.weight_hh' (GRUCell"),
    (LstmTiedToLinear, ["LSTM", "Linear"], "'lstm.weight_hh_l0' (LSTM", "'lin' (Linear"),
    (GroupedConvTiedToConv, ["Conv2d"], "'dense' (Conv2d", "'grouped' (Conv2d"),
])
def test_explain_refuses_a_tied_weight_cut_into_other_matrices(model_class, types, refused, constrains):
    """explain showed both sites as 'apply'; transform then refused the plan. Now explain raises transform's
    error, word for word."""
    policy = {"rules": [rule({"type": types})]}
    explained = plan_error(lambda: orthofx.explain(model_class(), policy))
    transformed = plan_error(lambda: orthofx.transform(model_class(), policy,
                                                       example_inputs=(inputs(model_class()),)))
    assert explained == transformed
    assert explained.startswith(f"riemannian: {refused}, rule 'riemannian[0]') shares its weight with {constrains}")
    assert "cut it into different matrices" in explained


@pytest.mark.parametrize("setting, value, differs", OTHER_SETTINGS)
def test_explain_refuses_a_tied_weight_with_other_settings(setting, value, differs):
    policy = {"rules": [rule({"name": "a"}, name="first"), rule({"name": "b"}, name="second", **{setting: value})]}
    explained = plan_error(lambda: orthofx.explain(TiedLinears(), policy))
    assert explained == plan_error(lambda: orthofx.transform(TiedLinears(), policy))
    assert explained.startswith("riemannian: 'b' (Linear, rule 'second') shares its weight with 'a' (Linear, rule "
                                "'first'), which this pass constrains already, with other settings "
                                f"({differs}; both cut it into one 6x6 matrix with orthonormal columns)")


@pytest.mark.parametrize("free_first", [True, False])
def test_explain_refuses_a_weight_one_rule_leaves_free_and_another_constrains(free_first):
    free_rule = rule({"name": "a"}, name="free", free="first")
    constrained_rule = rule({"name": "b"}, name="constrained")
    policy = {"rules": [free_rule, constrained_rule] if free_first else [constrained_rule, free_rule]}
    assert plan_error(lambda: orthofx.explain(TiedLinears(), policy)) == (
        "riemannian: 'b' (Linear, rule 'constrained') shares its weight with 'a', which rule 'free' leaves free "
        "(free: first); constraining 'b' would project and retract that free weight too. Untie the weights, or "
        "select both layers with one rule (a site tied to the rule's free site is left free with it)")


def test_conflicting_tie_is_refused_before_any_pass_writes_a_weight():
    """With inplace=True, isometric_init used to rewrite the user's weights before riemannian's apply refused the
    plan: the transform failed and the model was changed anyway."""
    torch.manual_seed(0)
    model = TiedLinears()
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    policy = {"rules": [{"match": {"type": "Linear"}, "apply": "isometric_init"},
                        rule({"name": "a"}, name="first"), rule({"name": "b"}, name="second", retraction="qr")]}
    message = plan_error(lambda: orthofx.transform(model, policy, inplace=True))
    assert "with other settings (retraction qr vs polar" in message
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), original[name]), name


# ------------------------------------------------------------------------- a gain the Stiefel constraint drops

def deep_linears():
    return nn.Sequential(nn.Linear(H, H), nn.ReLU(), nn.Linear(H, H), nn.ReLU(), nn.Linear(H, 2))


def init_then_riemannian(init="project", **init_options):
    return {"rules": [{"name": "init", "match": {"type": "Linear"}, "apply": "isometric_init",
                       "with": {"seed": 5, **init_options}},
                      {"name": "stiefel", "match": {"type": "Linear"}, "apply": "riemannian",
                       "with": {"only_square": True, "init": init}}]}


def scale_lost_warnings(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [str(w.message) for w in caught if issubclass(w.category, ScaleLostWarning)]


def test_relu_gain_undone_by_init_project_warns_naming_site_and_scale():
    model = deep_linears()
    gm, messages = scale_lost_warnings(lambda: orthofx.transform(model, init_then_riemannian(activation="relu")))
    # the two square Linears the riemannian rule constrains; the 6 -> 2 head keeps its gain (skipped: not square)
    assert [m.split(":")[0] for m in messages] == ["riemannian (rule 'stiefel')"] * 2
    for site, message in zip(["0", "2"], messages):
        assert message.startswith(f"riemannian (rule 'stiefel'): '{site}' (Linear): isometric_init (rule 'init') "
                                  "gave its weight scale 1.414, but the Stiefel constraint fixes all its singular "
                                  "values at 1: init: project replaces the weight by its polar factor now")
        assert "drop the gain for it (isometric_init with gain: 1, activation: linear)" in message
    # reference: isometric_init alone (same seed) writes sqrt(2) Q; the polar factor of sqrt(2) Q is Q
    scaled = orthofx.transform(model, {"rules": [init_then_riemannian(activation="relu")["rules"][0]]})
    for site in ["0", "2"]:
        w = gm.get_submodule(site).weight.detach().double()
        q = scaled.get_submodule(site).weight.detach().double() / math.sqrt(2)
        torch.testing.assert_close(w, q, rtol=0, atol=1e-6)
        torch.testing.assert_close(w.T @ w, torch.eye(H, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(gm.get_submodule("4").weight, scaled.get_submodule("4").weight, rtol=0, atol=0)
    changes = {c.site: c for c in orthofx.manifest_of(gm).changes if c.pass_name == "riemannian"}
    assert changes["0"].after["scale_lost"] == pytest.approx(math.sqrt(2), rel=1e-12)
    assert changes["0"].what.endswith("; the scale 1.414 that isometric_init (rule 'init') gave the weight is lost "
                                      "(the Stiefel constraint fixes all singular values at 1)")


def test_gain_one_does_not_warn():
    gm, messages = scale_lost_warnings(lambda: orthofx.transform(deep_linears(), init_then_riemannian()))
    assert messages == []
    changes = [c for c in orthofx.manifest_of(gm).changes if c.pass_name == "riemannian"]
    assert changes and all("scale_lost" not in c.after for c in changes)
    w = gm.get_submodule("0").weight.detach().double()
    torch.testing.assert_close(w.T @ w, torch.eye(H, dtype=torch.float64), rtol=0, atol=1e-6)


def test_init_keep_warns_that_the_first_step_drops_the_gain():
    """init: keep leaves sqrt(2) Q at transform time (singular values sqrt(2)); the first step's retraction takes
    them to 1, so the gain is lost all the same."""
    gm, messages = scale_lost_warnings(
        lambda: orthofx.transform(deep_linears(), init_then_riemannian(init="keep", activation="relu")))
    assert len(messages) == 2
    assert ("init: keep leaves it until the first optimizer step, whose retraction puts it on the manifold"
            in messages[0])
    sv = torch.linalg.svdvals(gm.get_submodule("0").weight.detach().double())
    torch.testing.assert_close(sv, torch.full((H,), math.sqrt(2), dtype=torch.float64), rtol=0, atol=1e-6)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.01)
    orthofx.attach(optimizer, gm)
    gm(torch.randn(4, H)).square().mean().backward()
    optimizer.step()
    sv = torch.linalg.svdvals(gm.get_submodule("0").weight.detach().double())
    torch.testing.assert_close(sv, torch.ones(H, dtype=torch.float64), rtol=0, atol=1e-5)


def test_recurrent_gain_warns_naming_the_hidden_weights():
    model = nn.Sequential(nn.LSTM(H, H, batch_first=True))
    policy = {"rules": [{"name": "init", "match": {"type": "LSTM"}, "apply": "isometric_init",
                         "with": {"gain": 2.0}},
                        {"name": "stiefel", "match": {"type": "LSTM"}, "apply": "riemannian"}]}
    gm, messages = scale_lost_warnings(lambda: orthofx.transform(model, policy))
    assert len(messages) == 1
    assert messages[0].startswith("riemannian (rule 'stiefel'): '0 (weight_hh_l0)' (LSTM): isometric_init (rule "
                                  "'init') gave its weight scale 2,")
    blocks = stiefel.flatten_weight(gm.get_submodule("0").weight_hh_l0.detach().double(), 4)
    eye = torch.eye(H, dtype=torch.float64).expand(4, H, H)
    torch.testing.assert_close(blocks.transpose(-2, -1) @ blocks, eye, rtol=0, atol=1e-6)


# ------------------------------------------------------------- isometric_init: ties at planning, reverse order

def _init_rule(site, **params):
    return {"match": {"name": site}, "apply": "isometric_init", "with": params}


def test_explain_refuses_an_isometric_init_tie_with_two_scales_before_any_write():
    """explain listed both layers as 'apply'; transform refused only after writing the first layer (with
    inplace=True the user's own weight). Now both raise the same PlanError while planning, the weights untouched."""
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    model = nn.Sequential(first, nn.ReLU(), second)
    original = first.weight.detach().clone()
    policy = {"rules": [_init_rule("0", activation="relu"), _init_rule("2")]}
    from_explain = plan_error(lambda: orthofx.explain(model, policy))
    from_transform = plan_error(lambda: orthofx.transform(model, policy, inplace=True))
    assert from_explain == from_transform
    assert "2 shares its weight with 0" in from_explain and "scale 1 (rule" in from_explain
    torch.testing.assert_close(first.weight.detach(), original, rtol=0, atol=0)


def test_explain_refuses_a_recurrent_weight_tied_to_a_linear_of_another_layout():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.GRUCell(4, 4)
            self.b = nn.Linear(4, 12)
            self.b.weight = self.a.weight_hh  # 12 x 4: three gate blocks there, one matrix here

        def forward(self, x):
            return self.a(x) + self.b(x)[:, :4]

    policy = {"rules": [{"match": {"type": ["GRUCell", "Linear"]}, "apply": "isometric_init"}]}
    message = plan_error(lambda: orthofx.explain(Two(), policy))
    assert "b shares its weight with a" in message
    assert "one orthonormal matrix vs 3 gate blocks, one orthonormal matrix each" in message


def test_isometric_init_after_riemannian_warns_that_the_first_step_drops_its_gain():
    """riemannian first, isometric_init with a relu gain second: the weight is sqrt(2) Q after the transform, and
    the first step's retraction takes it back to Q without a word before."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(H, H), nn.ReLU(), nn.Linear(H, 3))
    policy = {"rules": [{"match": {"name": "0"}, "apply": "riemannian"},
                        _init_rule("0", activation="relu")]}
    with pytest.warns(ScaleLostWarning, match=r"isometric_init \(rule .*'0' \(Linear\): scale 1\.414, but "
                                              r"riemannian .* first optimizer step's retraction drops the scale"):
        gm = orthofx.transform(model, policy, example_inputs=(torch.randn(2, H),))
    w = gm.get_submodule("0").weight.detach().double()
    torch.testing.assert_close(w.T @ w, 2.0 * torch.eye(H, dtype=torch.float64), rtol=0, atol=1e-5)
    # one SGD step through attach: back on the manifold, singular values 1
    optimizer = torch.optim.SGD(gm.parameters(), lr=1e-3)
    orthofx.attach(optimizer, gm)
    gm(torch.randn(4, H)).square().mean().backward()
    optimizer.step()
    singular = torch.linalg.svdvals(gm.get_submodule("0").weight.detach().double())
    torch.testing.assert_close(singular, torch.ones(H, dtype=torch.float64), rtol=0, atol=1e-5)
    change = next(c for c in orthofx.manifest_of(gm).changes if c.pass_name == "isometric_init")
    assert "first step's retraction drops this scale" in change.what


def test_isometric_init_after_riemannian_with_gain_one_is_quiet():
    model = nn.Sequential(nn.Linear(H, H), nn.Tanh(), nn.Linear(H, 3))
    policy = {"rules": [{"match": {"name": "0"}, "apply": "riemannian"}, _init_rule("0")]}
    with warnings.catch_warnings():
        warnings.simplefilter("error", orthofx.OrthofxWarning)
        orthofx.transform(model, policy, example_inputs=(torch.randn(2, H),))
