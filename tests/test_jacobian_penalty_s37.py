"""Session 37: the penalty's bookkeeping around the training step. A penalty call in eval mode (validation) is no
step of an ``every`` period; a penalty that reads a stale Jacobian estimate (``orthofx.penalty(gm) + task(gm(x))``)
raises an orthofx error at backward; activation-checkpointed micro-batches before one backward replay each
forward's own period call and random draws. References: the uninterrupted run, and float64 by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import orthofx
from orthofx.nn import JacobianProbe


def _policy(every, weight=0.1):
    return {"rules": [{"match": {"type": "Linear"}, "apply": "orth_regularizer",
                       "with": {"weight": weight, "every": every}}]}


def _linears():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(),
                         nn.Linear(5, 3))


def _lorth_linear_float64(weight: torch.Tensor) -> torch.Tensor:
    """``||G - I||_F^2`` of the smaller Gram matrix of a Linear weight, in float64 (differentiable)."""
    w = weight.double()
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return (gram - torch.eye(gram.shape[0], dtype=w.dtype)).square().sum()


def _due_sites(value: torch.Tensor, layers: dict[str, nn.Module]) -> list[str]:
    """The layers whose weights the penalty ``value`` reaches (the terms that call evaluated)."""
    if not value.requires_grad:
        return []
    grads = torch.autograd.grad(value, [m.weight for m in layers.values()], allow_unused=True)
    return [site for site, grad in zip(layers, grads) if grad is not None and bool(grad.abs().sum() > 0)]


# ------------------------------------------------------------------------------ 1. eval mode is no step

class _Holder(nn.Module):
    """A model orthofx.transform did not return, holding a transformed part (its terms are the holder's)."""

    def __init__(self, every):
        super().__init__()
        self.body = orthofx.transform(_linears(), _policy(every))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("holder", [False, True])
def test_eval_mode_penalty_calls_leave_the_every_schedule_of_the_uninterrupted_run(holder):
    # a validation pass logging orthofx.penalty with gradients enabled counted a call: the training run then
    # evaluated other terms on its steps than the run without validation
    def run(validate: bool) -> list[list[str]]:
        model = _Holder(every=3) if holder else orthofx.transform(_linears(), _policy(3))
        body = model.body if holder else model
        layers = {t.site: body.get_submodule(t.site) for t in orthofx.manifest_of(body).penalties}
        schedule = []
        for _ in range(7):
            schedule.append(_due_sites(orthofx.penalty(model), layers))
            if validate:
                model.eval()
                value = orthofx.penalty(model)  # gradients enabled, as a careless validation loop has them
                # the whole regulariser, as under no_grad: every term at its weight (float64 by hand)
                expected = sum(0.1 * _lorth_linear_float64(m.weight.detach()) for m in layers.values())
                torch.testing.assert_close(value.detach().double(), expected, rtol=1e-5, atol=1e-6)
                model.train()
        return schedule

    reference = run(validate=False)
    assert sorted(len(due) for due in reference[:3]) == [1, 1, 2]  # four terms spread over a period of three
    assert run(validate=True) == reference


def test_eval_mode_forwards_are_no_step_of_a_probes_every_either():
    # the rule both counts share: only training-mode calls with gradients are steps
    def run(validate: bool) -> list[bool]:
        torch.manual_seed(0)
        probe = JacobianProbe(nn.Sequential(nn.Linear(4, 4), nn.Tanh()), every=3)
        estimated = []
        for _ in range(7):
            probe.train()(torch.randn(5, 4))
            estimated.append(probe.estimate is not None)
            if validate:
                probe.eval()(torch.randn(5, 4))
        return estimated

    assert run(False) == [True, False, False] * 2 + [True]
    assert run(True) == run(False)


# ------------------------------------------------------------------------------ 2. stale estimates

def _probed(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(JacobianProbe(nn.Sequential(nn.Linear(4, 4), nn.Tanh()), weight=0.5), nn.Linear(4, 1))


def _transformed_probe():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Tanh()), nn.Linear(4, 1))
    return orthofx.transform(model, {"rules": [{"match": {"kind": "block", "name": "0"},
                                                "apply": "jacobian_isometry", "with": {"weight": 0.5}}]},
                             example_inputs=(torch.randn(2, 4),))


@pytest.mark.parametrize("make", [_probed, _transformed_probe], ids=["probe", "transformed"])
def test_penalty_before_the_forward_after_an_optimizer_step_is_an_orthofx_error(make):
    # torch raised "one of the variables needed for gradient computation has been modified by an inplace
    # operation" at the second step's backward, naming no layer and no cause
    model = make()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    loss = orthofx.penalty(model) + model(x).square().mean()  # first step: no estimate yet, a zero
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    loss = orthofx.penalty(model) + model(x).square().mean()  # reads the first step's estimate
    with pytest.raises(orthofx.LayerArgumentError, match=r"parameters changed.*after this step's forward"):
        loss.backward()


def test_penalty_before_the_forward_without_a_step_is_an_orthofx_error_too():
    # micro-batches before the step: the second reads the first's estimate, whose graph its backward freed
    # (torch: "Trying to backward through the graph a second time")
    model = _probed()
    x = torch.randn(8, 4)
    (model(x).square().mean() + orthofx.penalty(model)).backward()
    loss = orthofx.penalty(model) + model(x).square().mean()
    with pytest.raises(orthofx.LayerArgumentError, match="freed its graph"):
        loss.backward()


def test_a_stale_penalty_can_still_be_logged():
    model = _probed()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    (model(torch.randn(8, 4)).square().mean() + orthofx.penalty(model)).backward()
    estimate = float(model[0].estimate.detach())
    optimizer.step()
    assert float(orthofx.penalty(model)) == pytest.approx(0.5 * estimate)  # gradients enabled: no error, the value
    with torch.no_grad():
        assert float(orthofx.penalty(model)) == pytest.approx(0.5 * estimate)


def _accumulated_grads(model, batches, every_step_penalty=True, retain=False):
    """Gradients of micro-batches summed by backward, each ``task + penalty`` added after its forward."""
    model.zero_grad()
    for x in batches:
        out = model(x)
        loss = out.square().mean() + orthofx.penalty(model) if every_step_penalty else out.square().mean()
        loss.backward(retain_graph=retain)
        if retain:  # a second backward through the retained graph, the penalty read again: not stale
            orthofx.penalty(model).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_valid_training_patterns_are_not_refused():
    torch.manual_seed(1)
    batches = [torch.randn(8, 4) for _ in range(3)]
    model = _probed()
    model[0].seed = 3  # the same probes at each estimate: the runs below compare exactly
    plain = _accumulated_grads(model, batches)
    # the reference: each micro-batch's loss by hand, the estimate read right after its forward
    reference = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for x in batches:
        out = model(x)
        grads = torch.autograd.grad(out.square().mean() + 0.5 * model[0].estimate, list(model.parameters()))
        for (name, _), grad in zip(model.named_parameters(), grads):
            reference[name] += grad
    for name in plain:
        torch.testing.assert_close(plain[name], reference[name])
    # retain_graph and a second backward with the penalty read again: the graph is there, nothing is stale
    retained = _accumulated_grads(model, batches, retain=True)
    penalty_only = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for x in batches:
        model(x)
        for (name, _), grad in zip(model.named_parameters(),
                                   torch.autograd.grad(0.5 * model[0].estimate, list(model.parameters()),
                                                       allow_unused=True, materialize_grads=True)):
            penalty_only[name] += grad
    for name in plain:
        torch.testing.assert_close(retained[name], plain[name] + penalty_only[name])
    # every = 2 with accumulation: the skipped micro-batches add zeros
    model[0].every, model[0].calls = 2, 0
    _accumulated_grads(model, batches)


# ------------------------------------------------------------------------------ 3. checkpointed micro-batches

class _PenalisedNet(nn.Module):
    """A forward that adds the penalty of its transformed body, as a checkpointed micro-batch computes it."""

    def __init__(self, every):
        super().__init__()
        self.body = orthofx.transform(_linears(), _policy(every))

    def forward(self, x):
        return self.body(x).square().mean() + orthofx.penalty(self.body)


def test_checkpointed_micro_batches_before_one_backward_each_replay_their_own_call():
    # the recomputations all replayed the last call counted: torch raised a CheckpointError (other tensors saved
    # than in the forward) and, where the counts happened to match, the gradients were the wrong terms'
    net = _PenalisedNet(every=3)
    terms = orthofx.manifest_of(net.body).penalties
    phases = {t.site: t.phase for t in terms}
    torch.manual_seed(2)
    batches = [torch.randn(4, 6) for _ in range(4)]  # 4 calls: across a period of 3
    loss = sum(checkpoint(net, x, use_reentrant=False) for x in batches)
    loss.backward()
    assert orthofx.manifest_of(net.body).penalty_calls == 4 % 3
    # reference: the same micro-batches by hand in float64, micro-batch i evaluating the terms due at call i
    weights = {name: p.detach().double().requires_grad_() for name, p in net.named_parameters()}
    reference = 0
    for call, x in enumerate(batches):
        h = x.double()
        for index in range(0, 7, 2):
            h = h @ weights[f"body.{index}.weight"].T + weights[f"body.{index}.bias"]
            h = torch.tanh(h) if index < 6 else h
        reference = reference + h.square().mean() + sum(
            0.1 * _lorth_linear_float64(weights[f"body.{site}.weight"]) for site in phases
            if phases[site] == call % 3)
    reference.backward()
    torch.testing.assert_close(loss.double(), reference.detach(), rtol=1e-5, atol=1e-6)
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad.double(), weights[name].grad, rtol=1e-5, atol=1e-6, msg=name)


def _dropout_grads(checkpointed: bool, every: int, after: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(4, 6), nn.Tanh()) if after else \
        nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5))
    probe = JacobianProbe(block, every=every, weight=0.3)
    head = nn.Linear(6, 2)
    drop = nn.Dropout(0.3)

    def region(x):
        return head(drop(probe(x)) if after else probe(x)).sin()

    torch.manual_seed(1)
    batches = [torch.randn(5, 4) for _ in range(3)]
    loss = 0
    for x in batches:
        out = checkpoint(region, x, use_reentrant=False) if checkpointed else region(x)
        loss = loss + out.sum() + probe.penalty()
    loss.backward()
    return {name: p.grad for name, p in [*probe.named_parameters(), *head.named_parameters()]}


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("after", [False, True], ids=["dropout_in_block", "dropout_after_probe"])
def test_checkpointed_probe_recomputes_the_forwards_dropout_masks(every, after):
    # the recomputation restored the region's starting random state and ran only the block, whose dropout then
    # drew other masks than the forward (the estimate's draws came first there): silently wrong gradients
    reference = _dropout_grads(checkpointed=False, every=every, after=after)
    checked = _dropout_grads(checkpointed=True, every=every, after=after)
    for name in reference:
        torch.testing.assert_close(checked[name], reference[name], msg=name)


def test_a_checkpoint_nested_in_another_counts_one_call_per_step():
    # the inner region's forward, run again inside the outer one's recomputation, counted a second call per step
    # (torch puts the inner region's forward hooks on top there, which the old test for a replay did not know)
    def run(checkpointed: bool) -> tuple[list[int], list[dict[str, torch.Tensor]]]:
        gm = orthofx.transform(_linears(), _policy(3))

        def inner(h):
            return gm(h).square().mean() + orthofx.penalty(gm)

        def outer(x):
            # the product saves the inner region's output: the outer recomputation runs the inner forward again
            return (checkpoint(inner, x.sin(), use_reentrant=False) if checkpointed else inner(x.sin())) * x.cos().sum()

        torch.manual_seed(3)
        counts, grads = [], []
        for _ in range(4):
            gm.zero_grad()
            x = torch.randn(4, 6, requires_grad=True)
            (checkpoint(outer, x, use_reentrant=False) if checkpointed else outer(x)).backward()
            counts.append(orthofx.manifest_of(gm).penalty_calls)
            grads.append({name: p.grad.clone() for name, p in gm.named_parameters()})
        return counts, grads

    reference_counts, reference_grads = run(checkpointed=False)
    assert reference_counts == [1, 2, 0, 1]
    counts, grads = run(checkpointed=True)
    assert counts == reference_counts
    for got, expected in zip(grads, reference_grads):
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], msg=name)


def test_a_region_that_keeps_no_random_state_is_not_given_one():
    # preserve_rng_state=False: the recomputation draws on from the global state, which the probe must not rewind
    # to the forward's (that would hand out the same random numbers twice)
    torch.manual_seed(0)
    probe = JacobianProbe(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Dropout(0.5)))
    out = checkpoint(probe, torch.randn(5, 4), use_reentrant=False, preserve_rng_state=False)
    after_forward = torch.get_rng_state()
    (out.sum() + probe.penalty()).backward()
    assert not torch.equal(torch.get_rng_state(), after_forward)  # the recomputation's dropout drew on
