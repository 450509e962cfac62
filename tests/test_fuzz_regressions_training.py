"""Regressions found by fuzzing ``orthofx.attach``'s hooks and ``orthofx.penalty`` inside real training loops
(GradScaler, autocast, unfreezing, several optimizers, resuming): every test here failed before its fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthofx
import orthofx.passes.pre_svd  # noqa: F401  (registers the pass)
import orthofx.passes.riemannian  # noqa: F401  (registers the pass)
from orthofx.errors import ArgumentError
from references import polar64, tangent64

from test_fuzz_regressions_optim import LinearEigvalsh

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)

RIEMANNIAN = {"rules": [{"match": {"type": "Linear"}, "apply": "riemannian"}]}


def _mlp(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def _batch(step: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(8, 6, generator=torch.Generator().manual_seed(step), dtype=dtype)


def _pre_svd(**params) -> nn.Module:
    torch.manual_seed(0)
    policy = {"rules": [{"match": {"feeds": "linalg.eigvalsh"}, "apply": "pre_svd", "with": params}]}
    return orthofx.transform(LinearEigvalsh(), policy, example_inputs=(torch.randn(16, 6),))


# ---------------------------------------------------------------------------------------------- GradScaler

@pytest.mark.parametrize("make", [lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=True),
                                  lambda p: torch.optim.Adam(p, lr=1e-2, fused=True)], ids=["SGD", "Adam"])
def test_a_step_the_grad_scaler_skips_leaves_a_fused_optimizers_weights_and_state_alone(make):
    """GradScaler skips a step with inf gradients; for a fused optimizer it does so by handing the kernel
    ``found_inf`` and still calls ``step()``. The Riemannian hooks ran anyway: NaN tangent projections written into
    the gradients, and the unchanged weights and first moments re-retracted and re-projected, which moved them by
    rounding (6e-8) where plain torch (and the non-fused path, which never calls step) leaves them bitwise alone."""
    gm = orthofx.transform(_mlp(), RIEMANNIAN)
    optimizer = make(gm.parameters())
    orthofx.attach(optimizer, gm)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for step in range(3):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (gm(_batch(step)).float() - 1).square().mean()
        if step == 2:
            loss = loss * float("inf")
            weights = {name: p.detach().clone() for name, p in gm.named_parameters()}
            state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    assert scaler.get_scale() == 2.0 ** 9  # the scaler did see the inf and skip the step
    for name, p in gm.named_parameters():
        assert torch.equal(p.detach(), weights[name]), name
    for p, s in optimizer.state.items():
        for key, value in s.items():
            assert torch.equal(value, state[id(p)][key]), key
    for site in ("0", "2", "4"):  # the weights' gradients were not projected: nothing finite came out of inf
        assert not torch.isfinite(gm.get_submodule(site).weight.grad).any()


# ------------------------------------------------------------------------------------------------ unfreezing

def test_a_frozen_weight_added_to_the_optimizer_later_gets_its_riemannian_hook():
    """Gradual unfreezing: attach skips the hook of a frozen weight the optimizer leaves out, and kept skipping it
    after ``add_param_group`` added the unfrozen weight, which then trained by plain SGD and left the Stiefel
    manifold unnoticed (defect 0.13 after five steps). Its steps are now P1's ``W <- polar(W + P_W(-lr G))``."""
    gm = orthofx.transform(_mlp(torch.float64), RIEMANNIAN)
    first = gm.get_submodule("0")
    first.weight.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.05)
    handle = orthofx.attach(optimizer, gm)
    assert [hook.site for hook in handle.skipped] == ["0"]
    first.weight.requires_grad_(True)
    optimizer.add_param_group({"params": [first.weight], "lr": 0.3})
    for step in range(3):
        optimizer.zero_grad()
        (gm(_batch(step, torch.float64)) - 1).square().mean().backward()
        w, g = first.weight.detach().clone(), first.weight.grad.clone()
        optimizer.step()
        torch.testing.assert_close(first.weight.detach(), polar64(w + tangent64(w, -0.3 * g)), atol=1e-12, rtol=0)
    assert handle.skipped == [] and [hook.site for hook in handle.hooks] == ["0", "2", "4"]


def test_a_frozen_weight_added_to_the_optimizer_later_gets_nog():
    """The same for NOG: the unfrozen weight stepped by its raw gradient instead of the polar factor ``U V^T``."""
    gm = _pre_svd(nog=True, olr=False)
    gm.a.weight.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.1)
    orthofx.attach(optimizer, gm)
    gm.a.weight.requires_grad_(True)
    optimizer.add_param_group({"params": [gm.a.weight]})
    gm(torch.randn(16, 6, generator=torch.Generator().manual_seed(1))).backward()
    w, g = gm.a.weight.detach().clone(), gm.a.weight.grad.clone()
    optimizer.step()
    torch.testing.assert_close(gm.a.weight.detach().double(), w.double() - 0.1 * polar64(g), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ attach's errors

def test_attaching_the_optimizer_of_the_other_parameters_says_it_needs_no_attach():
    """One optimizer for the orthogonal weights, one for the rest: attaching the second told the user to "build
    the optimizer from gm.parameters()", which would train every weight twice."""
    gm = orthofx.transform(_mlp(), RIEMANNIAN)
    weights = [gm.get_submodule(site).weight for site in ("0", "2", "4")]
    rest = [p for p in gm.parameters() if all(p is not w for w in weights)]
    orthofx.attach(torch.optim.SGD(weights, lr=0.1), gm)
    with pytest.raises(ArgumentError, match=r"site '0'.*holds none of the parameters orthofx's optimizer hooks act "
                                            r"on: attach the optimizer that optimises them \(with several "
                                            r"optimizers, an optimizer for the other parameters needs no attach\)"):
        orthofx.attach(torch.optim.Adam(rest, lr=1e-3), gm)


def test_an_optimizer_state_saved_before_olr_split_its_group_is_refused_with_the_fix():
    """OLR moves its weight into a param group of its own; a state saved before attach then failed to load with
    torch's bare "loaded state dict has a different number of parameter groups". Loaded before attach, as the
    error now says, it resumes the training exactly (the weight's Adam state moves into the new group)."""
    def train(gm, optimizer, steps):
        for step in steps:
            optimizer.zero_grad()
            gm(torch.randn(16, 6, generator=torch.Generator().manual_seed(step))).backward()
            optimizer.step()

    plain = _pre_svd(nog=False, olr=True)
    optimizer = torch.optim.Adam(plain.parameters(), lr=1e-2)
    train(plain, optimizer, range(2))  # not attached: one param group
    saved, weights = optimizer.state_dict(), {k: v.clone() for k, v in plain.state_dict().items()}

    gm = _pre_svd(nog=False, olr=True)
    gm.load_state_dict(weights)
    optimizer = torch.optim.Adam(gm.parameters(), lr=1e-2)
    orthofx.attach(optimizer, gm)
    with pytest.raises(ArgumentError, match=r"has 1 param group\(s\) and the optimizer 2: orthofx.attach gave the "
                                            r"OLR weight\(s\) of site\(s\) 'a' param groups of their own.*Load it "
                                            r"before calling orthofx.attach"):
        optimizer.load_state_dict(saved)
    assert optimizer.state == {}  # refused before torch touched anything

    resumed = _pre_svd(nog=False, olr=True)
    resumed.load_state_dict(weights)
    optimizer = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    optimizer.load_state_dict(saved)
    orthofx.attach(optimizer, resumed)
    assert float(optimizer.state[resumed.a.weight]["step"]) == 2.0


# ----------------------------------------------------------------------------------------- penalty, autocast

def test_penalty_inside_autocast_is_computed_in_the_weights_dtype():
    """``loss = criterion(gm(x), y) + orthofx.penalty(gm)`` written inside ``torch.autocast`` ran the L_orth conv
    and SRIP's products in bfloat16, which cannot resolve the small defect of a near-orthogonal weight: the L_orth
    gradient of a 1x1 conv was off by tens of percent, SRIP's value by a factor 4. Reference: the dense float64
    formulas, ``||W W^T - I||_F^2`` (a 1x1 conv's L_orth), its gradient ``4 (W W^T - I) W``, and
    ``sigma_max(W W^T - I)`` (SRIP of a wide weight)."""
    torch.manual_seed(0)
    gm = orthofx.transform(nn.Sequential(nn.Conv2d(8, 8, 1), nn.Flatten()), "lorth",
                           example_inputs=(torch.randn(2, 8, 3, 3),))
    conv = gm.get_submodule("0")
    with torch.no_grad():
        q = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0]
        conv.weight.copy_((q + 1e-3 * torch.randn(8, 8, dtype=torch.float64)).reshape(8, 8, 1, 1))
    w = conv.weight.detach().reshape(8, 8).double()
    defect = w @ w.T - torch.eye(8, dtype=torch.float64)
    (term_weight,) = [t.weight for t in orthofx.manifest_of(gm).penalties]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = orthofx.penalty(gm)
    value.backward()
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), term_weight * defect.square().sum(), rtol=1e-4, atol=0)
    torch.testing.assert_close(conv.weight.grad.reshape(8, 8).double(), term_weight * 4 * defect @ w,
                               rtol=0, atol=1e-3 * float((term_weight * 4 * defect @ w).abs().max()))

    srip = _pre_svd(weight="srip", nog=False, penalty_weight=1.0)
    with torch.no_grad():
        srip.a.weight.copy_(torch.linalg.qr(srip.a.weight.T.double())[0].T * 1.001)
    a = srip.a.weight.detach().double()
    expected = torch.linalg.eigvalsh(a @ a.T - torch.eye(4, dtype=torch.float64)).abs().max()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = orthofx.penalty_terms(srip)
    (value,) = terms.values()
    torch.testing.assert_close(value.double(), expected, rtol=1e-3, atol=0)
