"""Session 45: the ``pre_svd`` pass (P4's NOG / OLR / orthogonal weights, the ``svd`` preset) on Conv3d.

A video covariance-pooling model (Conv3d -> covariance -> eigh) got ``skipped: pass 'pre_svd' handles Conv1d,
Conv2d, Linear, not Conv3d`` from ``explain`` and no warning from ``transform``: no NOG, no OLR. Every treatment
reads the weight as ``out x rest`` per group (NOG's polar factor, OLR's flattened dots, SRIP / L_orth, the
orthogonality error of the report), and the hard orthogonal layer, ``_impossibility`` and freezing exist for
Conv3d, so the pass now takes Conv3d. A transposed conv stays out, with its own reason (not P4's Pre-SVD layer).

References: NOG and OLR recomputed by hand in float64 from the weight and the raw gradient (P4's formulas: the
polar factor ``U V^T`` per group of the gradient reshaped ``groups x out/groups x rest``; ``eta* = a b / (a c +
2 b^2)``); the Conv2d code path on the same layer with a kernel of depth 1 on one frame; the dense Jacobian of the
hard orthogonal Conv3d.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import orthofx

BASE_LR = 1.0


class CovPool(nn.Module):
    """A Pre-SVD conv (``a``, 2-D or 3-D) feeding the eigendecomposition of its channel covariance (GCP)."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.a = conv

    def forward(self, x):
        h = self.a(x).flatten(2)
        h = h - h.mean(-1, keepdim=True)
        cov = h @ h.mT / h.shape[-1]
        cov = cov + 1e-3 * torch.diag_embed(torch.ones_like(cov[..., 0]))
        values, vectors = torch.linalg.eigh(cov)
        return (vectors * values.clamp_min(1e-6).sqrt().unsqueeze(-2)) @ vectors.mT


def _video(batch=2, channels=4, frames=3, size=6, seed=0):
    return torch.randn(batch, channels, frames, size, size, generator=torch.Generator().manual_seed(seed))


def _grouped_conv3d(seed=0):
    torch.manual_seed(seed)
    return nn.Conv3d(4, 6, 3, padding=1, groups=2)


def _pre_svd_changes(gm):
    return [c for c in gm.meta["orthofx"].changes if c.pass_name == "pre_svd"]


def _attached_step(gm, x):
    """One plain SGD step (no momentum, lr 1) of ``orthofx.attach``'s optimizer; the loss's ``||W||^2`` term keeps
    ``b = g.w`` of the step positive, so that OLR's ``eta*`` (in ``(0, lr)``) is the lr taken. Returns the weight
    and bias before the step, their raw gradients (what NOG and OLR read), and the OLR lr the step logged."""
    optimizer = torch.optim.SGD(gm.parameters(), lr=BASE_LR)
    orthofx.attach(optimizer, gm)
    conv = gm.get_submodule("a")
    before = {name: p.detach().clone() for name, p in conv.named_parameters()}
    loss = gm(x).square().mean() + conv.weight.square().sum()
    optimizer.zero_grad()
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in conv.named_parameters()}
    optimizer.step()
    (olr_group,) = [group for group in optimizer.param_groups if "orthofx_olr" in group]
    assert olr_group["orthofx_olr"] == "a" and olr_group["lr"] == BASE_LR  # put back after the step
    return before, grads, olr_group["orthofx_olr_lr"]


def _reference_step(weight, grad, groups):
    """P4's NOG + OLR step in float64: ``G`` (``groups x out/groups x rest``) becomes ``U V^T`` per group, then
    ``eta*`` of the flattened weight and new gradient, used where ``0 < eta* < lr``."""
    w = weight.double()
    G = grad.double().reshape(groups, grad.shape[0] // groups, -1)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    g = (U @ Vh).reshape(grad.shape)
    a, b, c = float((w * w).sum()), float((g * w).sum()), float((g * g).sum())
    eta = a * b / (a * c + 2 * b * b)
    lr = eta if 0 < eta < BASE_LR else BASE_LR
    return w - lr * g, lr, eta


# -------------------------------------------------------------------------------------- planning and status

def test_svd_preset_gives_a_conv3d_nog_and_olr_in_explain_transform_and_report():
    model, x = CovPool(_grouped_conv3d()), _video()
    plan = orthofx.explain(model, "svd", example_inputs=(x,))
    assert plan.skipped == []
    assert [e.site.name for e in plan.entries_for("pre_svd")] == ["a"]
    gm = orthofx.transform(model, "svd", example_inputs=(x,))
    (change,) = _pre_svd_changes(gm)
    assert change.site == "a" and change.status == "NOG + OLR"
    assert change.before["layer"] == "Conv3d(4->6, k=3, s=1, g=2)"
    # the orthogonality error of the Change: per group, ||W_g W_g^T - I||_F combined (3 x 54 blocks)
    W = model.a.weight.detach().double().reshape(2, 3, -1)
    want = torch.linalg.vector_norm(W @ W.mT - torch.eye(3, dtype=W.dtype))
    assert change.before["orthogonality_error"] == pytest.approx(float(want), rel=1e-12)
    (row,) = [row for row in orthofx.report(gm).rows if row["site"] == "a"]
    assert row["pass"] == "pre_svd (NOG + OLR)" and row["layer"].startswith("Conv3d")
    assert [hook.site for hook in gm.meta["orthofx"].optimizer_hooks] == ["a", "a"]


def test_transposed_conv_is_skipped_with_its_own_reason():
    model = CovPool(nn.ConvTranspose3d(4, 6, 3, padding=1))
    plan = orthofx.explain(model, "svd", example_inputs=(_video(),))
    ((site, rule, reason),) = plan.skipped
    assert site.name == "a" and rule == "pre-svd"
    assert reason.startswith("ConvTranspose3d is a transposed convolution, which pre_svd does not treat")
    assert "orth_regularizer or orthogonal_conv" in reason


# ---------------------------------------------------------------------------------------------- one step

def test_one_attached_sgd_step_is_nog_per_group_and_olr_by_hand():
    model, x = CovPool(_grouped_conv3d(seed=1)), _video(seed=1)
    gm = orthofx.transform(model, "svd", example_inputs=(x,))
    before, grads, logged_lr = _attached_step(gm, x)
    want, lr, eta = _reference_step(before["weight"], grads["weight"], groups=2)
    assert 0 < eta < BASE_LR and logged_lr == pytest.approx(eta, rel=1e-6)  # OLR's eta*, not the base lr
    # (OLR reads NOG's float32 polar factor; the reference's is float64)
    torch.testing.assert_close(gm.a.weight.detach().double(), want, rtol=0, atol=1e-6)
    # the bias is in the base group: plain SGD at the base lr
    torch.testing.assert_close(gm.a.bias.detach(), before["bias"] - BASE_LR * grads["bias"], rtol=0, atol=1e-7)
    # per group: one polar factor of the whole 6 x 54 gradient is another step (the test tells them apart)
    whole, _, _ = _reference_step(before["weight"], grads["weight"], groups=1)
    assert (whole - want).abs().max() > 1e-3


def test_conv3d_of_kernel_depth_one_on_one_frame_steps_as_the_conv2d():
    torch.manual_seed(2)
    conv3d = nn.Conv3d(4, 6, (1, 3, 3), padding=(0, 1, 1), groups=2)
    conv2d = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    with torch.no_grad():
        conv2d.weight.copy_(conv3d.weight.squeeze(2))
        conv2d.bias.copy_(conv3d.bias)
    x3 = _video(frames=1, seed=2)
    x2 = x3.squeeze(2)
    gm3 = orthofx.transform(CovPool(conv3d), "svd", example_inputs=(x3,))
    gm2 = orthofx.transform(CovPool(conv2d), "svd", example_inputs=(x2,))
    assert [c.status for c in _pre_svd_changes(gm3)] == [c.status for c in _pre_svd_changes(gm2)] == ["NOG + OLR"]
    _, grads3, lr3 = _attached_step(gm3, x3)
    _, grads2, lr2 = _attached_step(gm2, x2)
    torch.testing.assert_close(grads3["weight"].squeeze(2), grads2["weight"], rtol=1e-4, atol=1e-6)
    assert lr3 == pytest.approx(lr2, rel=1e-5)
    torch.testing.assert_close(gm3.a.weight.detach().squeeze(2), gm2.a.weight.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(gm3.a.bias.detach(), gm2.a.bias.detach(), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ weight treatments

def _pre_svd_policy(optional=False, **params):
    return {"rules": [{"match": {"feeds": ["linalg.eigh"]}, "apply": "pre_svd", "with": params,
                       "optional": optional}]}


def test_weight_orthogonal_puts_an_exactly_orthogonal_conv3d_in_place():
    from orthofx.nn.orthogonal import OrthogonalConv3d

    torch.manual_seed(3)
    model = CovPool(nn.Conv3d(4, 8, 3, padding=1, bias=False))
    x = _video(frames=4, size=4, seed=3)
    # padding: circular, exact at the borders ('keep' keeps the zero padding, an isometry away from them only)
    gm = orthofx.transform(model, _pre_svd_policy(weight="orthogonal", padding="circular"), example_inputs=(x,))
    (change,) = _pre_svd_changes(gm)
    assert change.status == "orthogonal (hard) + no NOG/OLR on a hard layer"
    layer = gm.get_submodule("a")
    assert isinstance(layer, OrthogonalConv3d) and gm.meta["orthofx"].optimizer_hooks == []
    # 4 -> 8 channels: an isometry, J^T J = I on the example input's size (dense Jacobian, float64: 256 x 512)
    layer64 = copy.deepcopy(layer).double().eval()
    inputs = x[:1].double()
    J = torch.autograd.functional.jacobian(lambda v: layer64(v.reshape(inputs.shape)).reshape(-1),
                                           inputs.reshape(-1))
    torch.testing.assert_close(J.T @ J, torch.eye(J.shape[1], dtype=J.dtype), rtol=0, atol=1e-8)


@pytest.mark.parametrize("treatment, status", [("srip", "SRIP + NOG + OLR"), ("lorth", "L_orth + NOG + OLR")])
def test_weight_penalties_measure_the_conv3d_per_group(treatment, status):
    model, x = CovPool(_grouped_conv3d(seed=4)), _video(seed=4)
    gm = orthofx.transform(model, _pre_svd_policy(weight=treatment, penalty_weight=1.0, olr=True),
                           example_inputs=(x,))
    (change,) = _pre_svd_changes(gm)
    assert change.status == status
    if treatment == "srip":
        W = model.a.weight.detach().double().reshape(2, 3, -1)
        gram = W @ W.mT  # 3 x 54 per group: the smaller Gram matrix
        want = torch.linalg.matrix_norm(gram - torch.eye(3, dtype=W.dtype), ord=2).sum()
        assert orthofx.penalty(gm).item() == pytest.approx(float(want), rel=1e-5)
    else:
        assert orthofx.penalty(gm).item() > 0


def test_frozen_conv3d_is_left_alone_by_weight_orthogonal_unless_overwritten():
    from orthofx.nn.orthogonal import OrthogonalConv3d

    torch.manual_seed(5)
    model, x = CovPool(nn.Conv3d(4, 8, 3, padding=1)), _video(frames=4, size=4, seed=5)
    model.a.weight.requires_grad_(False)
    policy = _pre_svd_policy(optional=True, weight="orthogonal", nog=False)
    plan = orthofx.explain(model, policy, example_inputs=(x,))
    ((site, _, reason),) = plan.skipped
    assert site.name == "a" and "requires_grad=False" in reason
    with pytest.warns(orthofx.errors.OrthofxWarning, match="policy changes nothing"):
        gm = orthofx.transform(model, policy, example_inputs=(x,))
    assert type(gm.get_submodule("a")) is nn.Conv3d and torch.equal(gm.a.weight, model.a.weight)
    gm = orthofx.transform(model, _pre_svd_policy(weight="orthogonal", nog=False, frozen="overwrite",
                                                  padding="circular"), example_inputs=(x,))
    layer = gm.get_submodule("a")
    frozen = [p.requires_grad for name, p in layer.named_parameters() if name != "bias"]
    assert isinstance(layer, OrthogonalConv3d) and frozen and not any(frozen)  # the kernel's, still frozen
    assert layer.bias.requires_grad  # as the conv's bias was


# ----------------------------------------------------------------------------------------- freeze, export

def test_trained_conv3d_model_freezes_and_exports_to_pt2(tmp_path):
    torch.manual_seed(6)
    model = CovPool(nn.Conv3d(2, 4, 3, stride=(1, 2, 2), padding=1))
    x = _video(channels=2, frames=4, size=8, seed=6)
    gm = orthofx.transform(model, "svd", example_inputs=(x,))
    assert [c.status for c in _pre_svd_changes(gm)] == ["NOG + OLR"]  # a strided Conv3d too
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.01, momentum=0.9)
    orthofx.attach(optimizer, gm)
    start = gm.a.weight.detach().clone()
    for step in range(2):
        optimizer.zero_grad()
        gm(_video(channels=2, frames=4, size=8, seed=10 + step)).square().mean().backward()
        optimizer.step()
    assert not torch.equal(gm.a.weight, start)
    gm.eval()
    with torch.no_grad():
        expected = gm(x)
    frozen = orthofx.freeze(gm, example_inputs=(x,))
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), expected, rtol=1e-5, atol=1e-6)
    path = tmp_path / "video_gcp.pt2"
    orthofx.export(gm, path, example_inputs=(x,))
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(str(path)).module()(x), expected, rtol=1e-5, atol=1e-6)
