"""Regressions and guarantees found by fuzzing transformed models inside the training-loop utilities a researcher
uses: ``AveragedModel`` (EMA / SWA), gradient clipping, LR schedulers and resuming, activation checkpointing,
``GradScaler`` and gradient accumulation, each against a plain-torch reference computed by hand in float64."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.checkpoint import checkpoint

import orthofx
import orthofx.passes.pre_svd  # noqa: F401  (registers the pass)
import orthofx.passes.riemannian  # noqa: F401  (registers the pass)
from references import lorth64, polar64, tangent64

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)

RIEMANNIAN = {"rules": [{"match": {"type": "Linear"}, "apply": "riemannian", "with": {"only_square": True}}]}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batch(step: int, rows: int = 8, features: int = 6) -> torch.Tensor:
    return torch.randn(rows, features, generator=torch.Generator().manual_seed(step), dtype=torch.float64)


def _riemannian_sgd_reference(model: nn.Module, grads: dict[str, torch.Tensor], lr: float,
                              constrained: tuple[str, ...]) -> None:
    """One plain SGD step of ``model`` by hand: P1's ``W <- polar(W - lr P_W(G))`` for the ``constrained``
    weights, ``p <- p - lr g`` for the others."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in constrained:
                p.copy_(polar64(p - lr * tangent64(p, grads[name])))
            else:
                p.sub_(lr * grads[name])


# --------------------------------------------------------------------------------------- AveragedModel (EMA)

class _WithEma(nn.Module):
    """A training wrapper holding the transformed model and an EMA of it, as Lightning-style modules do."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)

    def forward(self, x):
        return self.net(x)


def test_an_ema_of_a_hard_orthogonal_model_is_the_average_of_its_parameters_and_stays_orthogonal():
    """``AveragedModel`` averages the *parameters*: for hard orthogonal layers those are the unconstrained factors,
    so the averaged model's weights are exactly orthogonal (an average of Stiefel points would not be). Its eval
    output (orthogonal layers cache their weight in eval mode) must follow each ``update_parameters``: checked
    against the model rebuilt from parameters averaged by hand."""
    gm = orthofx.transform(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
                           .double(), "orthogonal")
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
    ema = AveragedModel(gm, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    ema.eval()
    by_hand: dict[str, torch.Tensor] = {}
    x = _batch(99)
    for step in range(3):
        optimizer.zero_grad()
        (gm(_batch(step)) - 1).square().mean().backward()
        optimizer.step()
        with torch.no_grad():
            ema(x)  # fills the eval caches, which the next update must invalidate
        ema.update_parameters(gm)
        # the first update copies the weights, the later ones average: p_ema <- 0.5 p_ema + 0.5 p
        by_hand = {name: p.detach().clone() if not by_hand else 0.5 * by_hand[name] + 0.5 * p.detach()
                   for name, p in gm.named_parameters()}
    reference = copy.deepcopy(gm)
    reference.load_state_dict(by_hand, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(ema(x), reference(x), atol=1e-12, rtol=0)
        for site in ("0", "2", "4"):
            w = ema.module.get_submodule(site).weight
            gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
            torch.testing.assert_close(gram, torch.eye(gram.shape[0], dtype=torch.float64), atol=1e-10, rtol=0)


def test_attach_of_a_model_holding_an_ema_copy_hooks_the_trained_model_only():
    """A model holding the transformed net and ``AveragedModel(net)``: ``attach(optimizer, model)`` found the EMA
    copy as a second transformed part, whose weights (not in the optimizer, still requiring grad) it refused with
    "build the optimizer from gm.parameters()". The copy's weights are averages that no optimizer steps, so attach
    now hooks the trained part only; its step is P1's Riemannian SGD step, and the EMA copy is left alone."""
    model = _WithEma(orthofx.transform(_mlp(), RIEMANNIAN))
    optimizer = torch.optim.SGD(model.net.parameters(), lr=0.2)
    handle = orthofx.attach(optimizer, model)
    assert sorted(hook.site for hook in handle.hooks) == ["0", "2"]
    reference = copy.deepcopy(model.net)
    averaged = {name: p.detach().clone() for name, p in model.ema.named_parameters()}
    optimizer.zero_grad()
    (model(_batch(0)) - 1).square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.net.named_parameters()}
    optimizer.step()
    _riemannian_sgd_reference(reference, grads, 0.2, ("0.weight", "2.weight"))
    for (name, p), q in zip(model.net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-12, rtol=0, msg=name)
    for name, p in model.ema.named_parameters():
        assert torch.equal(p.detach(), averaged[name]), name


def test_attach_of_a_model_whose_only_transformed_model_is_an_ema_copy_says_what_to_attach():
    model = nn.ModuleDict({"ema": AveragedModel(orthofx.transform(_mlp(), RIEMANNIAN))})
    with pytest.raises(orthofx.OrthofxError, match=r"only inside averaged copies \(ema: AveragedModel, an EMA or SWA "
                                                   r"of the trained weights\).*attach the optimizer to the model it "
                                                   r"trains"):
        orthofx.attach(torch.optim.SGD(model.parameters(), lr=0.1), model)


def test_the_penalty_of_a_model_holding_an_ema_copy_is_the_trained_models():
    """``orthofx.penalty(model)`` summed the EMA copy's L_orth too: the logged loss was off, and the penalty's
    gradient reached the averaged weights, which an optimizer built from ``model.parameters()`` (the usual
    ``self.parameters()``) then stepped, where plain torch leaves them alone (no gradient, no step)."""
    model = _WithEma(orthofx.transform(_mlp(), "lorth"))
    with torch.no_grad():  # an EMA that differs from the net, so that its L_orth would show
        for p in model.ema.parameters():
            p.mul_(0.5)
    net = model.net
    weights = [net.get_submodule(site).weight for site in ("0", "2", "4")]
    by_hand = sum(lorth64(w) for w in weights) * 0.01  # the trained net's weights only, by P0's definition
    total = orthofx.penalty(model)
    assert float(total) == pytest.approx(by_hand, rel=1e-5)
    total.backward()
    assert all(p.grad is None for p in model.ema.parameters())


# ------------------------------------------------------------------------------ clipping and GradScaler

@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_grad_scaler_unscale_clip_then_step_is_the_riemannian_step_of_the_clipped_gradient(fused):
    """The loop ``scaler.scale(loss).backward(); scaler.unscale_(opt); clip_grad_norm_(...); scaler.step(opt)``:
    the hooks project the clipped, unscaled gradient, and a step with an inf gradient moves nothing (the scaler
    skips it; a fused optimizer still calls step, and the hooks must skip it too). Reference by hand in float64."""
    gm = orthofx.transform(_mlp(), RIEMANNIAN)
    reference = copy.deepcopy(gm)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.3, fused=fused)
    orthofx.attach(optimizer, gm)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for step in range(3):
        optimizer.zero_grad()
        loss = (3 * gm(_batch(step)) - 1).square().mean()
        scaler.scale(loss * float("inf") if step == 1 else loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(gm.parameters(), 0.5)
        before = [p.detach().clone() for p in gm.parameters()]
        scaler.step(optimizer)
        scaler.update()
        if step == 1:
            assert all(torch.equal(p, q) for p, q in zip(gm.parameters(), before))
            continue
        reference.zero_grad()
        (3 * reference(_batch(step)) - 1).square().mean().backward()
        grads = {name: p.grad for name, p in reference.named_parameters()}
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))
        scale = min(1.0, 0.5 / (float(norm) + 1e-6))  # clip_grad_norm_'s coefficient
        _riemannian_sgd_reference(reference, {n: g * scale for n, g in grads.items()}, 0.3, ("0.weight", "2.weight"))
    assert scaler.get_scale() == 2.0 ** 7  # the inf step was seen and skipped
    for (name, p), q in zip(gm.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-12, rtol=0, msg=name)


def test_gradient_accumulation_with_zero_grad_to_zeros_steps_once_on_the_summed_gradient():
    """Three backward calls, one step: the hooks act once, on the summed gradient; with ``zero_grad(set_to_none=
    False)`` a layer unused in a step has a zero gradient (not None), so SGD still moves it by its momentum, and
    the hooks retract that step. Reference: Riemannian heavy ball by hand (projected gradient into the buffer,
    ``W <- polar(W + P_W(-lr m))``, then ``m <- P_{W_new}(m)``)."""
    gm = orthofx.transform(nn.Sequential(nn.Linear(6, 6, bias=False), nn.Tanh(), nn.Linear(6, 6, bias=False))
                           .double(), {"rules": [{"match": {"type": "Linear"}, "apply": "riemannian"}]})
    reference = copy.deepcopy(gm)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.2, momentum=0.9)
    orthofx.attach(optimizer, gm)
    buffers: dict[str, torch.Tensor] = {}

    def loss_of(model, step, micro):
        x = _batch(10 * step + micro, rows=4)
        out = model(x) if step == 0 else torch.tanh(model.get_submodule("0")(x))  # step 1 leaves layer 2 unused
        return (out - 1).square().mean() / 3  # not invariant under W -> QW: a non-zero Riemannian gradient

    for step in range(2):
        optimizer.zero_grad(set_to_none=False)
        for micro in range(3):
            loss_of(gm, step, micro).backward()
        optimizer.step()
        grads = {name: torch.zeros_like(p) for name, p in reference.named_parameters()}
        for micro in range(3):
            reference.zero_grad()
            loss_of(reference, step, micro).backward()
            for name, p in reference.named_parameters():
                if p.grad is not None:
                    grads[name] += p.grad
        with torch.no_grad():
            for name, p in reference.named_parameters():
                g = tangent64(p, grads[name])
                buffers[name] = g if name not in buffers else 0.9 * buffers[name] + g
                p.copy_(polar64(p + tangent64(p, -0.2 * buffers[name])))
                buffers[name] = tangent64(p, buffers[name])
    for (name, p), q in zip(gm.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-12, rtol=0, msg=name)


# ------------------------------------------------------------------------------------ schedulers, resuming

class _PreSvdAndSquare(nn.Module):
    """A square Linear (Riemannian) feeding a Pre-SVD Linear (NOG + OLR) whose features feed an eigvalsh."""

    def __init__(self):
        super().__init__()
        self.sq = nn.Linear(6, 6)
        self.a = nn.Linear(6, 4)

    def forward(self, x):
        f = self.a(torch.tanh(self.sq(x)))
        return f.sum() + torch.linalg.eigvalsh(f.T @ f / 16 + torch.eye(4)).sum()


_PRE_SVD_AND_RIEMANNIAN = {"rules": [
    {"match": {"feeds": "linalg.eigvalsh"}, "apply": "pre_svd", "with": {"nog": True, "olr": True}},
    {"match": {"name": "sq"}, "apply": "riemannian"}]}


def test_resuming_an_olr_split_optimizer_and_its_one_cycle_schedule_is_bitwise():
    """Save model, optimizer (OLR's split param groups) and OneCycleLR (lr and momentum per group) mid-run, load
    them into a freshly attached optimizer and a new scheduler, and continue: the weights are bitwise those of the
    uninterrupted run (OLR's per-step lr must not leak into the saved groups, nor the Riemannian hooks keep state)."""
    def build():
        torch.manual_seed(0)
        gm = orthofx.transform(_PreSvdAndSquare(), _PRE_SVD_AND_RIEMANNIAN, example_inputs=(torch.randn(16, 6),))
        optimizer = torch.optim.SGD(gm.parameters(), lr=0.02, momentum=0.9)
        orthofx.attach(optimizer, gm)
        return gm, optimizer, lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=10)

    def train(gm, optimizer, scheduler, steps):
        for step in steps:
            optimizer.zero_grad()
            gm(_batch(step, rows=16).float()).backward()
            optimizer.step()
            scheduler.step()

    gm, optimizer, scheduler = build()
    assert len(optimizer.param_groups) == 2  # OLR gave the Pre-SVD weight a group of its own
    train(gm, optimizer, scheduler, range(3))
    saved = io.BytesIO()
    torch.save({"model": gm.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               saved)
    train(gm, optimizer, scheduler, range(3, 6))
    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    resumed, resumed_optimizer, resumed_scheduler = build()
    resumed.load_state_dict(state["model"])
    resumed_optimizer.load_state_dict(state["optimizer"])
    resumed_scheduler.load_state_dict(state["scheduler"])
    train(resumed, resumed_optimizer, resumed_scheduler, range(3, 6))
    for (name, p), q in zip(gm.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in resumed_optimizer.param_groups]


# ------------------------------------------------------------------------------ activation checkpointing

class _Whitened(nn.Module):
    """A Linear whose batch covariance is decomposed (eigh) and one whose features are decomposed (svd)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        f = self.a(x)
        values, vectors = torch.linalg.eigh(f.T @ f / 8 + 0.1 * torch.eye(4, dtype=x.dtype))
        u, s, vh = torch.linalg.svd(self.b(x), full_matrices=False)
        return (f @ vectors * values).sum() + (u * s).sum() + vh.sum()


_CHECKPOINT_CASES = [
    *(pytest.param(policy, reentrant, id=f"{policy}-{name}") for policy in ("lorth", "orthogonal")
      for reentrant, name in ((False, "non_reentrant"), (True, "reentrant"))),
    *(pytest.param("svd", reentrant, id=f"svd-{name}")
      for reentrant, name in ((False, "non_reentrant"), (True, "reentrant"))),
]


@pytest.mark.parametrize(("policy", "reentrant"), _CHECKPOINT_CASES)
def test_checkpointed_transformed_model_has_the_unchecked_gradients(policy, reentrant):
    """``checkpoint(gm, x)`` + penalty: the same loss and gradients as without checkpointing. The stable eigh /
    svd backward read ``ctx.saved_tensors`` twice (once for its dtype, once for the tensors), which non-reentrant
    checkpointing refuses ("Unpack is being triggered for a tensor that was already unpacked once")."""
    torch.manual_seed(0)
    gm = orthofx.transform(_Whitened().double(), policy, example_inputs=(_batch(0, features=5),))
    checked = copy.deepcopy(gm)
    x = _batch(1, features=5)
    loss = gm(x) + orthofx.penalty(gm)
    loss.backward()
    checked_loss = checkpoint(checked, x.clone().requires_grad_(reentrant), use_reentrant=reentrant)
    checked_loss = checked_loss + orthofx.penalty(checked)
    checked_loss.backward()
    torch.testing.assert_close(checked_loss.detach(), loss.detach(), atol=1e-12, rtol=0)
    for (name, p), q in zip(gm.named_parameters(), checked.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-12, rtol=0, msg=name)


# ---------------------------------------------------------------------------- Pre-SVD sites and shape reads

class _CovarianceOverBatch(nn.Module):
    """``stem`` -> relu -> ``proj`` -> covariance divided by the batch size read from ``proj``'s *input*."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(6, 6)
        self.proj = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        f = self.proj(h)
        return torch.linalg.eigvalsh(f.T @ f / h.shape[0] + torch.eye(4)).sum()


def test_a_shape_read_does_not_make_a_layer_feed_a_decomposition_in_its_change():
    """The Pre-SVD Change lists the decompositions a layer feeds; its walk went through ``h.shape[0]`` (the batch
    size, none of ``h``'s values), so ``stem`` was said to feed the eigvalsh. Torch's own data flow is the
    reference: the eigenvalues' gradient reaches ``proj``, not ``stem`` (whose output only gives the shape)."""
    model = _CovarianceOverBatch()
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    gm = orthofx.transform(model, {"rules": [{"match": {"name": ["stem", "proj"]}, "apply": "pre_svd"}]},
                           example_inputs=(x,))
    feeds = {change.site: change.before["feeds"] for change in orthofx.manifest_of(gm).changes}
    assert feeds == {"stem": [], "proj": ["linalg.eigvalsh"]}
    f = model.proj(torch.relu(model.stem(x)).detach())  # stem's values cut off: the loss still depends on proj
    torch.linalg.eigvalsh(f.T @ f / 8 + torch.eye(4)).sum().backward()
    assert model.proj.weight.grad is not None and model.stem.weight.grad is None


def test_a_layer_whose_output_only_gives_the_batch_size_is_not_a_pre_svd_layer():
    """``match: {feeds: linalg.eigvalsh}`` selected ``stem`` through ``h.shape[0]`` under symbolic tracing (not
    under torch.export, whose ``sym_size`` reads the model input): ``stem`` got NOG and OLR, and the rule shadowed
    the Riemannian rule meant for it. Both capture modes must select ``proj`` alone."""
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    for mode in ("fx", "export"):
        policy = {"capture": {"mode": mode}, "rules": [
            {"match": {"feeds": "linalg.eigvalsh"}, "apply": "pre_svd"},
            {"match": {"name": "stem"}, "apply": "riemannian"}]}
        gm = orthofx.transform(_CovarianceOverBatch(), policy, example_inputs=(x,))
        applied = {(change.site, change.pass_name) for change in orthofx.manifest_of(gm).changes}
        assert applied == {("proj", "pre_svd"), ("stem", "riemannian")}, mode
