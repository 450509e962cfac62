"""Review of ``orth_regularizer``'s ``every`` (session 35): lazy layers spread over the period, activation
checkpointing's recomputation of a forward that calls ``orthofx.penalty``, and a large ``every``."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import orthofx


def _policy(every, weight=0.1, types=("Conv2d", "Linear")):
    return {"rules": [{"match": {"type": list(types)}, "apply": "orth_regularizer",
                       "with": {"weight": weight, "every": every}}]}


def _lorth_linear_float64(weight: torch.Tensor) -> torch.Tensor:
    """P0's L_orth of a Linear weight from its definition, in float64: ``||G - I||_F^2`` of the smaller Gram
    matrix; differentiable in ``weight``."""
    w = weight.double()
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return (gram - torch.eye(gram.shape[0], dtype=w.dtype)).square().sum()


def _linears():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(),
                         nn.Linear(5, 3))


def _due_layers(value: torch.Tensor, layers: dict[str, nn.Module]) -> list[str]:
    """The layers whose weights the penalty ``value`` reaches (the terms this call evaluated)."""
    if not value.requires_grad:
        return []
    grads = torch.autograd.grad(value, [m.weight for m in layers.values()], allow_unused=True)
    return [site for site, grad in zip(layers, grads) if grad is not None and bool(grad.abs().sum() > 0)]


def test_lazy_layers_are_dealt_out_over_the_period_not_all_on_its_first_call():
    # lazy layers have no shapes at transform time (cost 0 each): the old spreading put every term on call 0,
    # so one step in every paid the whole penalty and the others nothing
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(8), nn.Tanh(), nn.LazyLinear(8), nn.Tanh(), nn.LazyLinear(5), nn.Tanh(),
                          nn.LazyLinear(3))
    gm = orthofx.transform(model, _policy(4, types=("LazyLinear", "Linear")))
    gm(torch.randn(2, 6))  # the lazy layers take their shapes
    layers = {term.site: gm.get_submodule(term.site) for term in orthofx.manifest_of(gm).penalties}
    assert len(layers) == 4
    for call in range(4):
        value = orthofx.penalty(gm)
        due = _due_layers(value, layers)
        assert len(due) == 1, (call, due)
        expected = 0.1 * _lorth_linear_float64(layers[due[0]].weight.detach())
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)


def test_a_large_every_neither_allocates_its_period_nor_fails():
    # the old spreading built a list of every's length per rule: every = 10**12 raised MemoryError
    gm = orthofx.transform(_linears(), _policy(10**12))
    terms = orthofx.manifest_of(gm).penalties
    assert sorted(t.phase for t in terms) == [0, 1, 2, 3]
    layers = {t.site: gm.get_submodule(t.site) for t in terms}
    first = next(t.site for t in terms if t.phase == 0)
    value = orthofx.penalty(gm)
    assert _due_layers(value, layers) == [first]
    torch.testing.assert_close(value.double(), 0.1 * _lorth_linear_float64(layers[first].weight.detach()),
                               rtol=1e-5, atol=1e-6)


class _PenalisedNet(nn.Module):
    """A model whose forward adds the penalty of its transformed body, as a checkpointed step computes it."""

    def __init__(self, every: int):
        super().__init__()
        self.body = orthofx.transform(_linears(), _policy(every, types=("Linear",)))

    def forward(self, x):
        return self.body(x).square().mean() + orthofx.penalty(self.body)


def test_non_reentrant_checkpointing_recomputes_the_terms_of_the_forwards_call():
    # the recomputation inside backward called penalty again: it counted a second call and evaluated the next
    # call's terms, so torch.utils.checkpoint raised a CheckpointError (other tensors saved than in the forward)
    net = _PenalisedNet(every=2)
    layers = {t.site: net.body.get_submodule(t.site) for t in orthofx.manifest_of(net.body).penalties}
    phases = {t.site: t.phase for t in orthofx.manifest_of(net.body).penalties}
    x = torch.randn(4, 6)
    for call in range(4):
        net.zero_grad()
        loss = checkpoint(net, x, use_reentrant=False)
        loss.backward()
        assert orthofx.manifest_of(net.body).penalty_calls == (call + 1) % 2
        # reference: the task loss and weight * L_orth of the layers due at this call, in float64 by hand
        weights = {name: p.detach().double().requires_grad_() for name, p in net.named_parameters()}
        h = x.double()
        for index in range(0, 7, 2):
            h = h @ weights[f"body.{index}.weight"].T + weights[f"body.{index}.bias"]
            h = torch.tanh(h) if index < 6 else h
        reference = h.square().mean() + sum(0.1 * _lorth_linear_float64(weights[f"body.{site}.weight"])
                                            for site in layers if phases[site] == call % 2)
        reference.backward()
        torch.testing.assert_close(loss.double(), reference.detach(), rtol=1e-5, atol=1e-6)
        for name, p in net.named_parameters():
            torch.testing.assert_close(p.grad.double(), weights[name].grad, rtol=1e-5, atol=1e-6, msg=name)


def test_reentrant_checkpointing_still_counts_one_call_per_step():
    # its forward runs without gradients (every term, nothing counted); the recomputation in backward is the
    # step's one counted call
    net = _PenalisedNet(every=3)
    x = torch.randn(4, 6)
    for call in range(4):
        checkpoint(net, x.requires_grad_(), use_reentrant=True).backward()
        assert orthofx.manifest_of(net.body).penalty_calls == (call + 1) % 3


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_steps_carry_each_term_once_per_period(reentrant):
    net = _PenalisedNet(every=2)
    x = torch.randn(4, 6, requires_grad=True)
    penalised = {t.site: 0 for t in orthofx.manifest_of(net.body).penalties}
    for _ in range(4):
        plain = _PenalisedNet(every=2)  # the same weights, no penalty: the task part of the gradient
        plain.load_state_dict(net.state_dict())
        net.zero_grad()
        checkpoint(net, x, use_reentrant=reentrant).backward()
        task = torch.autograd.grad(plain.body(x).square().mean(), [plain.body.get_submodule(s).weight
                                                                   for s in penalised])
        for (site, _), task_grad in zip(penalised.items(), task):
            penalised[site] += not torch.allclose(net.body.get_submodule(site).weight.grad, task_grad, atol=1e-7)
    assert penalised == {site: 2 for site in penalised}
