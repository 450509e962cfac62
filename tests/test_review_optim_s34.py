"""Session-34 adversarial review of the optimizer-side code (``optim.attach``, ``passes/riemannian.py``,
``passes/pre_svd.py``), checked against dense float64 references written here from P1 / P4's formulas:
``P_W(G) = G - W sym(W^T G)``, the polar retraction ``(W + xi)(I + xi^T xi)^(-1/2)``, NOG's ``U V^T`` and OLR's
``eta* = a b / (a c + 2 b^2)`` (used when ``0 < eta* < base lr``).
"""

import pytest
import torch
from torch import nn

import orthofx


# ------------------------------------------------------------------------------------------ references (float64)

def _tall(a: torch.Tensor) -> tuple[torch.Tensor, bool]:
    wide = a.shape[-2] < a.shape[-1]
    return (a.mT if wide else a), wide


def tangent64(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``G - W sym(W^T G)`` (rows orthonormal for a wide ``W``: the transposes)."""
    (w, wide), (g, _) = _tall(w.double()), _tall(g.double())
    s = w.mT @ g
    out = g - w @ (s + s.mT) / 2
    return out.mT if wide else out


def retract64(w: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    """P1's polar retraction ``(W + xi)(I + xi^T xi)^(-1/2)``, the inverse square root by a float64 eigh."""
    (w, wide), (xi, _) = _tall(w.double()), _tall(xi.double())
    lam, v = torch.linalg.eigh(torch.eye(w.shape[-1], dtype=torch.float64) + xi.mT @ xi)
    out = (w + xi) @ (v * lam.rsqrt().unsqueeze(-2)) @ v.mT
    return out.mT if wide else out


def olr64(weight: torch.Tensor, grad: torch.Tensor, base: float) -> float:
    w, g = weight.detach().reshape(-1).double(), grad.detach().reshape(-1).double()
    a, b, c = float(w @ w), float(g @ w), float(g @ g)
    eta = a * b / (a * c + 2 * b * b) if a * c + 2 * b * b > 0 else None
    return eta if eta is not None and 0 < eta < base else base


class LinearEigh(nn.Module):
    """Two Pre-SVD linears (``a``, ``b``) feed a whitening eigh; ``head`` is a plain layer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 4, bias=False)
        self.b = nn.Linear(6, 3)
        self.head = nn.Linear(7, 2)

    def forward(self, x):
        f = torch.cat([self.a(x), self.b(x)], dim=1)
        cov = f.T @ f / x.shape[0] + 1e-2 * torch.eye(7, dtype=x.dtype)
        lam, v = torch.linalg.eigh(cov)
        return self.head(f @ ((v * lam.rsqrt().unsqueeze(-2)) @ v.T)).square().mean()


def _pre_svd_model(nog: bool, olr: bool) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(16, 6)
    policy = {"rules": [{"match": {"feeds": "linalg.eigh"}, "apply": "pre_svd", "with": {"nog": nog, "olr": olr}}]}
    return orthofx.transform(LinearEigh(), policy, example_inputs=(x,)), x


def _own_groups(gm: nn.Module) -> list[dict]:
    """The Pre-SVD weights in groups of their own (OLR needs no split)."""
    return [{"params": [p for n, p in gm.named_parameters() if n not in ("a.weight", "b.weight")]},
            {"params": [gm.a.weight]}, {"params": [gm.b.weight]}]


# ------------------------------------------------------------------------------------------------ OLR findings

def test_olr_with_a_tensor_lr_that_load_state_dict_shares_again_sets_only_its_own_group():
    # attach gave each OLR group an lr tensor of its own, but optimizer.load_state_dict of a state saved before
    # attach (the groups shared torch's one default tensor) shares one tensor again: OLR's in-place eta* became
    # every group's lr for the step, and after it every lr stayed at the first OLR weight's eta* (the second OLR
    # group had stored that as its base lr). Expected: the head steps by lr 10, and every lr is 10 again.
    gm, x = _pre_svd_model(nog=False, olr=True)
    saved = torch.optim.SGD(_own_groups(gm), lr=torch.tensor(10.0)).state_dict()
    optimizer = torch.optim.SGD(_own_groups(gm), lr=torch.tensor(10.0))
    orthofx.attach(optimizer, gm)
    optimizer.load_state_dict(saved)
    seen = []
    optimizer.register_step_pre_hook(lambda opt, *_: seen.append([float(g["lr"]) for g in opt.param_groups]))
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    optimizer.zero_grad()
    gm(x).backward()
    grads = {n: p.grad.clone() for n, p in gm.named_parameters()}
    optimizer.step()
    lr_a, lr_b = (olr64(before[n], grads[n], 10.0) for n in ("a.weight", "b.weight"))
    assert lr_a < 10.0  # eta* is used for a
    assert seen[-1] == pytest.approx([10.0, lr_a, lr_b], rel=1e-6)
    for name, lr in (("head.weight", 10.0), ("a.weight", lr_a), ("b.weight", lr_b)):
        torch.testing.assert_close(before[name] - gm.get_parameter(name).detach(), lr * grads[name], rtol=1e-4,
                                   atol=1e-7)
    assert [float(g["lr"]) for g in optimizer.param_groups] == [10.0, 10.0, 10.0]



def test_olr_names_the_site_and_the_fix_when_its_weight_was_replaced_after_attach():
    # load_state_dict(..., assign=True) after attach puts new tensors in the layers; the optimizer steps the old
    # ones. OLR noticed at the next step but said only "the weight is not in any param group of this optimizer".
    gm, x = _pre_svd_model(nog=True, olr=True)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.5)
    orthofx.attach(optimizer, gm)
    gm.load_state_dict({k: v.clone() for k, v in gm.state_dict().items()}, assign=True)
    optimizer.zero_grad()
    gm(x).backward()
    with pytest.raises(orthofx.OrthofxError, match=r"site 'a' \(rule 'pre_svd\[0\]'\): OLR: .*replaced after "
                                                   r"orthofx.attach.*assign=True.*before building the optimizer"):
        optimizer.step()


# ------------------------------------------------------------------------------------------ Riemannian findings

def _riemannian_model(dtype=torch.float32, seed=0, **params) -> nn.Module:
    """Square, tall and wide Linears (6x6, 9x6, 4x9) on the Stiefel manifold."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4)).to(dtype)
    return orthofx.transform(model, {"rules": [{"match": {"type": "Linear"}, "apply": "riemannian", "with": params}]})


def _stiefel_weights(gm: nn.Module) -> list[nn.Parameter]:
    return [gm.get_submodule(name).weight for name in ("0", "2", "4")]


def test_riemannian_step_inside_autocast_is_the_float64_reference():
    # optimizer.step() inside torch.autocast (the whole training step in one with-block): torch's updates are as
    # outside it, but the hooks' tangent projections ran in bfloat16: the step was 5e-4 off the reference and the
    # transported momentum 2e-2 off the tangent space (float32 outside autocast: 1e-7).
    gm = _riemannian_model()
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
    orthofx.attach(optimizer, gm)
    weights = _stiefel_weights(gm)
    buffers = [None] * 3
    torch.manual_seed(1)
    for _ in range(3):
        w0 = [w.detach().double().clone() for w in weights]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            optimizer.zero_grad()
            gm(torch.randn(5, 6)).float().square().sum().backward()
            grads = [w.grad.double().clone() for w in weights]
            optimizer.step()
        for i, (w, w_pre, g) in enumerate(zip(weights, w0, grads)):
            g = tangent64(w_pre, g)
            buffers[i] = g if buffers[i] is None else 0.9 * buffers[i] + g
            new = retract64(w_pre, tangent64(w_pre, -0.1 * buffers[i]))
            buffers[i] = tangent64(new, buffers[i])
            torch.testing.assert_close(w.detach().double(), new, rtol=0, atol=2e-6)
            torch.testing.assert_close(optimizer.state[w]["momentum_buffer"].double(), buffers[i], rtol=0, atol=2e-6)
            with torch.no_grad():  # the next step starts from the reference (no float32 drift in the comparison)
                w.copy_(new)
                optimizer.state[w]["momentum_buffer"].copy_(buffers[i])


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.Adam(p, lr=0.02, amsgrad=True, weight_decay=0.05),
    lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.1, fused=True, maximize=True),
], ids=["adam-amsgrad-l2", "adamw-fused-maximize"])
def test_adam_family_steps_are_the_float64_reference_with_missing_and_accumulated_gradients(make_optimizer):
    """Adam / AdamW on square, tall and wide weights, steps in which some gradients are None
    (``zero_grad(set_to_none=True)``, the weight skipped) and steps accumulating two backward passes: every step
    is, per weight, P1's update written out here: ``g = P_W(G)``; Adam's (or AdamW's) step ``d`` from ``g``;
    ``W <- R_W(P_W(d))``; ``exp_avg <- P_{W_new}(exp_avg)``; ``exp_avg_sq`` left as Adam made it."""
    gm = _riemannian_model(torch.float64)
    optimizer = make_optimizer(gm.parameters())
    orthofx.attach(optimizer, gm)
    group = optimizer.param_groups[0]
    (beta1, beta2), eps, lr, wd = group["betas"], group["eps"], group["lr"], group["weight_decay"]
    adamw, sign = isinstance(optimizer, torch.optim.AdamW), -1.0 if group["maximize"] else 1.0
    weights = _stiefel_weights(gm)
    state = {i: (torch.zeros_like(w, dtype=torch.float64),) * 3 + (0,) for i, w in enumerate(weights)}
    torch.manual_seed(1)
    for step in range(6):
        optimizer.zero_grad(set_to_none=True)
        for _ in range(1 + step % 2):
            gm(torch.randn(5, 6, dtype=torch.float64)).square().sum().backward()
        skipped = {step % 3} if step in (1, 2) else set()
        for i in skipped:
            weights[i].grad = None
        expected = {}
        for i, w in enumerate(weights):
            if i in skipped:
                expected[i] = w.detach().clone()
                continue
            m, v, v_max, t = state[i]
            w0, t = w.detach().double().clone(), t + 1
            g = sign * tangent64(w0, w.grad) + (0 if adamw else wd * w0)
            m, v = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g * g
            v_max = torch.maximum(v_max, v)
            v_used = v_max if group["amsgrad"] else v
            d = -lr * (m / (1 - beta1 ** t)) / ((v_used / (1 - beta2 ** t)).sqrt() + eps)
            d = d - lr * wd * w0 if adamw else d  # AdamW's decay: normal to the manifold, projected away
            expected[i] = retract64(w0, tangent64(w0, d))
            state[i] = (tangent64(expected[i], m), v, v_max, t)
        optimizer.step()
        for i, w in enumerate(weights):
            torch.testing.assert_close(w.detach(), expected[i], rtol=0, atol=1e-12)
            if state[i][3]:
                torch.testing.assert_close(optimizer.state[w]["exp_avg"], state[i][0], rtol=0, atol=1e-12)
                torch.testing.assert_close(optimizer.state[w]["exp_avg_sq"], state[i][1], rtol=0, atol=1e-12)
