"""Regressions found by fuzzing Riemannian training and ``orthofx.attach``'s step hooks (session 28): every test
here failed before its fix.

* A NaN / inf step of one weight sent every weight of its shape (one batched retraction) back to its pre-step
  value and named them all as diverged.
* When an "after" hook raised (that diverged step), the hooks after it did not run: another transformed part's
  weights stayed off the Stiefel manifold, OLR's learning rate stayed at the failed step's eta*.
* A complex weight under ``riemannian`` failed inside the pass with "w must be a real floating-point tensor",
  naming no layer.
* ``StiefelHook`` took any ``momentum`` value; an unknown one acted as ``keep``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import PlanError
from orthofx.passes.riemannian import StiefelHook
from orthofx.passes.pre_svd import OLR_GROUP_KEY
from references import polar64, tangent64

from test_fuzz_regressions_optim import LinearEigvalsh

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices (tests/conftest.py)


def _qf64(a: torch.Tensor) -> torch.Tensor:
    """The Q factor of ``a`` (tall) with the signs that make R's diagonal positive, in float64."""
    q, r = torch.linalg.qr(a.to(torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def _square_pair(rules: list[dict]) -> nn.Module:
    torch.manual_seed(0)
    return orthofx.transform(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double(), {"rules": rules})


def _loss(gm: nn.Module) -> torch.Tensor:
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return (gm(x) - 1).square().sum()


@pytest.mark.parametrize("retraction", ["polar", "qr"])
def test_a_diverged_weight_leaves_the_same_shaped_weights_their_step(retraction):
    """Same-shaped weights are retracted as one batch; a NaN in one of them made the whole batch fail, so the
    finite weight '2' was put back too and reported as 'NaN or inf'. Now '2' takes P1's step
    ``R_W(P_W(-lr G))`` (float64 SVD / QR reference) and its momentum is transported, '0' alone is put back."""
    gm = _square_pair([{"match": {"type": "Linear"}, "apply": "riemannian", "with": {"retraction": retraction}}])
    lr = 0.2
    optimizer = torch.optim.SGD(gm.parameters(), lr=lr, momentum=0.9)
    orthofx.attach(optimizer, gm)
    _loss(gm).backward()
    bad, good = gm.get_submodule("0").weight, gm.get_submodule("2").weight
    bad_before, w, g = bad.detach().clone(), good.detach().clone(), good.grad.clone()
    bad.grad[1, 2] = float("nan")
    with pytest.raises(orthofx.OrthofxError, match=r"left the weights of site '0' \(rule '[^']+'\) NaN or inf \(their"):
        optimizer.step()
    assert torch.equal(bad.detach(), bad_before)
    retract = polar64 if retraction == "polar" else _qf64
    expected = retract(w + tangent64(w, -lr * g))
    torch.testing.assert_close(good.detach(), expected, atol=1e-12, rtol=0)
    buffer = optimizer.state[good]["momentum_buffer"]  # tangent at the new point: W^T m + m^T W = 0
    assert float(buffer.abs().max()) > 1e-3
    torch.testing.assert_close(expected.T @ buffer + buffer.T @ expected, torch.zeros(4, 4, dtype=torch.float64),
                               atol=1e-12, rtol=0)


def test_diverged_weights_of_two_rules_are_named_with_their_rules():
    """The message named the first diverged weight's rule for all of them."""
    gm = _square_pair([{"name": "first", "match": {"name": "0"}, "apply": "riemannian"},
                       {"name": "second", "match": {"name": "2"}, "apply": "riemannian"}])
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    orthofx.attach(optimizer, gm)
    _loss(gm).backward()
    gm.get_submodule("0").weight.grad[0, 0] = float("inf")
    gm.get_submodule("2").weight.grad[0, 0] = float("nan")
    with pytest.raises(orthofx.OrthofxError, match=r"^riemannian: the optimizer step left the weights of sites '0' "
                                                   r"\(rule 'first'\), '2' \(rule 'second'\) NaN or inf"):
        optimizer.step()


def test_every_after_hook_runs_when_one_raises():
    """A model holding two transformed parts: part 'a' diverging stopped the after hooks, so part 'b''s weight kept
    its raw SGD step (off the manifold: max |W^T W - I| = 4.9) and its hook the pre-step clone."""
    policy = {"rules": [{"match": {"type": "Linear"}, "apply": "riemannian"}]}
    torch.manual_seed(0)
    a = orthofx.transform(nn.Sequential(nn.Linear(4, 4)).double(), policy)
    b = orthofx.transform(nn.Sequential(nn.Linear(4, 6)).double(), policy)
    model = nn.Sequential(a, b)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    handle = orthofx.attach(optimizer, model)
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model(x).square().sum().backward()
    a.get_submodule("0").weight.grad[0, 0] = float("nan")
    weight = b.get_submodule("0").weight
    w, g = weight.detach().clone(), weight.grad.clone()
    with pytest.raises(orthofx.OrthofxError, match=r"left the weights of site '0' \(rule '[^']+'\) NaN or inf"):
        optimizer.step()
    torch.testing.assert_close(weight.detach(), polar64(w + tangent64(w, -0.5 * g)), atol=1e-12, rtol=0)
    assert all(hook._pre == {} for hook in handle.hooks)


class RiemannianAndOlr(LinearEigvalsh):
    """A Riemannian Linear 'r' in front of the Pre-SVD layer 'a' (OLR)."""

    def __init__(self):
        super().__init__()
        self.r = nn.Linear(6, 6)

    def forward(self, x):
        return super().forward(torch.tanh(self.r(x)))


def test_olr_lr_is_restored_when_a_riemannian_step_of_the_same_model_diverges():
    """The Riemannian hooks' error stopped the hooks after them: the OLR group kept the failed step's eta* as its lr
    (and its base lr key, so that the next step reused that eta* instead of computing its own)."""
    torch.manual_seed(0)
    x = torch.randn(16, 6)
    gm = orthofx.transform(RiemannianAndOlr(), {"rules": [
        {"match": {"name": "r"}, "apply": "riemannian"},
        {"match": {"feeds": "linalg.eigvalsh"}, "apply": "pre_svd", "with": {"nog": False, "olr": True}}]},
        example_inputs=(x,))
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.5)
    orthofx.attach(optimizer, gm)
    gm(x).backward()
    gm.r.weight.grad[0, 0] = float("nan")
    with pytest.raises(orthofx.OrthofxError, match=r"left the weights of site 'r' \(rule '[^']+'\) NaN or inf"):
        optimizer.step()
    (olr_group,) = [group for group in optimizer.param_groups if OLR_GROUP_KEY in group]
    assert olr_group["lr"] == 0.5
    assert sorted(key for key in olr_group if key.startswith("orthofx")) == ["orthofx_olr", "orthofx_olr_lr"]


def test_a_complex_weight_is_declined_with_its_reason():
    """transform raised the Stiefel functions' "w must be a real floating-point tensor", naming no layer (and
    warned about discarding imaginary parts first). The layer is now declined while planning: explain shows why,
    a rule with nothing else to constrain is a PlanError naming the site, and the real layers next to it train."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Linear(4, 4, dtype=torch.complex64)
            self.r = nn.Linear(4, 4)

        def forward(self, x):
            return self.c(x.to(torch.complex64)).real + self.r(x)

    policy = {"rules": [{"match": {"type": "Linear"}, "apply": "riemannian"}]}
    reason = r"complex weight \(torch.complex64\): riemannian keeps real weights on the real Stiefel manifold"
    with pytest.raises(PlanError, match=rf"can handle none of them: 0: {reason}.*match.exclude"):
        orthofx.transform(nn.Sequential(nn.Linear(4, 4, dtype=torch.complex64)), policy)
    torch.manual_seed(0)
    model = Mixed()
    complex_before = model.c.weight.detach().clone()
    gm = orthofx.transform(model, policy)
    statuses = {change.site: change.status for change in orthofx.manifest_of(gm).changes}
    assert statuses == {"r": "Stiefel, polar"}
    assert "skipped: complex weight (torch.complex64)" in str(orthofx.explain(Mixed(), policy))
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    orthofx.attach(optimizer, gm)
    gm(torch.randn(3, 4)).square().sum().backward()
    optimizer.step()
    r = gm.r.weight.detach().double()
    torch.testing.assert_close(r.T @ r, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.equal(model.c.weight.detach(), complex_before)


def test_a_stiefel_hook_refuses_an_unknown_momentum_mode():
    """``StiefelHook`` checked its retraction but took any ``momentum``: 'projected' (a typo of 'project') left the
    optimizer's first moments untransported, as 'keep' does, without a word."""
    with pytest.raises(orthofx.ArgumentError, match=r"unknown momentum 'projected'; choose one of project, keep"):
        StiefelHook("fc", "rule", momentum="projected")
    assert StiefelHook("fc", "rule", momentum="keep").momentum == "keep"
