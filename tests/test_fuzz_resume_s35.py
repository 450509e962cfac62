"""Resume fuzzing (session 35): a run saved after k steps, rebuilt and loaded continues exactly as the run that was
never interrupted (the reference is that run itself: same batches, same RNG, bitwise weights and losses).

The fuzz (about 3,300 resumed runs: small_cnn, resnet18 width 8, an MLP, a GRU model, a Linear feeding
``torch.linalg.eigh``, a block called twice per forward, a model branching on ``self.training``; presets and dict
policies with ``every``; SGD / Adam / NAdam / RMSprop / LBFGS / tensor learning rates with StepLR, OneCycleLR
and warm restarts; gradient accumulation; float64 and bfloat16; ``transform(compile=...)``; resume through
``orthofx.export`` + ``orthofx.load``, ``gm.state_dict()`` into a fresh transform, ``copy.deepcopy``,
``torch.save(gm)`` and a rollback into the same objects) found no divergence in the weights or losses. These
tests keep the combinations no earlier test resumed: terms of several ``every`` periods next to a Jacobian probe
of another period with ``batch_fraction`` (global RNG), NOG + OLR + Riemannian hooks with Adam, all inside a
bigger model, through ``.pt`` and through a pickled module.
"""

from __future__ import annotations

import copy
import io

import torch
from torch import nn

import orthofx


class _Net(nn.Module):
    """A square Linear (Riemannian), a Pre-SVD Linear whose covariance ``eigh`` decomposes (NOG + OLR), a
    Sequential block (Jacobian probe) and a head (L_orth every 3)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
        self.sq = nn.Linear(6, 6)
        self.a = nn.Linear(6, 4)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        f = self.a(torch.tanh(self.sq(self.body(x))))
        values, vectors = torch.linalg.eigh(f.T @ f / f.shape[0] + 0.1 * torch.eye(4))
        return self.head(f @ vectors * values.sqrt())


_POLICY = {"rules": [
    {"match": {"kind": "block", "name": "body"}, "apply": "jacobian_isometry",
     "with": {"every": 2, "batch_fraction": 0.5}},
    {"match": {"feeds": "linalg.eigh"}, "apply": "pre_svd", "with": {"nog": True, "olr": True}},
    {"match": {"name": "sq"}, "apply": "riemannian"},
    {"match": {"name": "head"}, "apply": "orth_regularizer", "with": {"every": 3}},
    {"match": {"name": "a"}, "apply": "orth_regularizer", "with": {"weight": 0.02, "every": 5}},
]}


class _Outer(nn.Module):
    """The transformed model as a part of the trained one (penalty and attach take the whole model)."""

    def __init__(self, gm):
        super().__init__()
        self.backbone = gm
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.backbone(x) * self.scale


_X = torch.randn(6, 6, generator=torch.Generator().manual_seed(3))


def _model(seed):
    torch.manual_seed(seed)
    return _Net()


def _optimizer(net):
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    orthofx.attach(optimizer, net)  # before the scheduler and before loading the optimizer's state
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.5)


def _batches(n):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(6, 6, generator=g), torch.randint(0, 5, (6,), generator=g)) for _ in range(n)]


def _train(net, optimizer, scheduler, batches, losses):
    for x, y in batches:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y) + orthofx.penalty(net)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())


def _run(resume, steps=8, at=3, tmp_path=None):
    batches = _batches(steps)
    net = _Outer(orthofx.transform(_model(0), _POLICY, example_inputs=(_X,)))
    optimizer, scheduler = _optimizer(net)
    torch.manual_seed(123)  # the probes' draws and batch_fraction's subsets
    losses = []
    _train(net, optimizer, scheduler, batches[:at] if resume else batches, losses)
    if resume:
        rng, opt_state, sched_state = torch.get_rng_state(), optimizer.state_dict(), scheduler.state_dict()
        if resume == "pt":
            orthofx.export(net.backbone, tmp_path / "backbone.pt")
            scale = net.scale.detach().clone()
            del net, optimizer, scheduler
            net = _Outer(orthofx.load(_model(7), tmp_path / "backbone.pt", example_inputs=(_X,)))
            with torch.no_grad():
                net.scale.copy_(scale)
        else:  # the whole module pickled (README: torch.save(gm) works like a deep copy)
            buffer = io.BytesIO()
            torch.save(net, buffer)
            del net, optimizer, scheduler
            buffer.seek(0)
            net = torch.load(buffer, weights_only=False)
        optimizer, scheduler = _optimizer(net)
        optimizer.load_state_dict(copy.deepcopy(opt_state))
        scheduler.load_state_dict(sched_state)
        torch.set_rng_state(rng)
        _train(net, optimizer, scheduler, batches[at:], losses)
    return losses, {k: v.detach().clone() for k, v in net.state_dict().items()}


def _assert_same(straight, resumed):
    assert resumed[0] == straight[0]  # every step's loss, bitwise
    assert list(resumed[1]) == list(straight[1])
    for key, value in straight[1].items():
        assert torch.equal(resumed[1][key], value), key


def test_a_run_resumed_from_pt_files_continues_as_the_uninterrupted_run(tmp_path):
    straight = _run(None)
    # the resumed run must carry: the Jacobian probe's step (every 2), the penalty count (periods 3 and 5), OLR's
    # own param group and Adam's transported moments
    for at in (1, 3, 4):
        _assert_same(straight, _run("pt", at=at, tmp_path=tmp_path))


def test_a_run_resumed_from_a_pickled_module_continues_as_the_uninterrupted_run():
    straight = _run(None)
    for at in (2, 5):
        _assert_same(straight, _run("pickle", at=at))
