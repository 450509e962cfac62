"""Optimizer-hook review fixes (session 22): a NaN / inf step under Riemannian training, and OLR on a weight
unfrozen after an LR scheduler was created."""

import pytest
import torch
from torch import nn

import orthofx
from orthofx.passes.pre_svd import OLR_GROUP_KEY


def _riemannian(retraction):
    torch.manual_seed(0)
    policy = {"rules": [{"match": {"type": "Linear"}, "apply": "riemannian", "with": {"retraction": retraction}}]}
    return orthofx.transform(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 6)).double(), policy)


@pytest.mark.parametrize("retraction", ["polar", "qr"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_step_is_undone_and_named(retraction, bad):
    gm = _riemannian(retraction)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    orthofx.attach(optimizer, gm)
    gm(torch.randn(3, 4, dtype=torch.float64)).sum().backward()
    first, second = gm.get_submodule("0").weight, gm.get_submodule("1").weight
    before, other = first.detach().clone(), second.detach().clone()
    first.grad[0, 0] = bad
    # qr used to write the NaN weight silently (every later step NaN); polar raised without naming the layer
    with pytest.raises(orthofx.OrthofxError, match=r"weights of site '0' \(rule '[^']+'\) NaN or inf"):
        optimizer.step()
    assert torch.equal(first.detach(), before)  # back where the step started
    # the other layer (finite gradient, a batch of its own shape) took its step and stayed on the manifold
    assert not torch.equal(second.detach(), other)
    torch.testing.assert_close(second.T @ second, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-12)


def _olr_with_frozen_last_layer():
    torch.manual_seed(0)
    policy = {"rules": [{"match": {"type": "Linear"}, "apply": "pre_svd", "with": {"nog": True, "olr": True}}]}
    gm = orthofx.transform(nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)), policy)
    last = gm.get_submodule("2")
    last.weight.requires_grad_(False)
    last.bias.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    orthofx.attach(optimizer, gm)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.5)  # after attach, as the README asks
    return gm, last, optimizer, scheduler


def _step(gm, optimizer, scheduler):
    optimizer.zero_grad()
    gm(torch.randn(8, 6)).square().mean().backward()
    optimizer.step()
    scheduler.step()


def test_olr_weight_unfrozen_into_a_shared_group_after_the_scheduler_gets_advice_it_can_follow():
    gm, last, optimizer, scheduler = _olr_with_frozen_last_layer()
    _step(gm, optimizer, scheduler)
    last.weight.requires_grad_(True)
    last.bias.requires_grad_(True)
    optimizer.add_param_group({"params": [last.weight, last.bias]})
    # the message used to ask for the scheduler to be created after attach, which it was
    with pytest.raises(orthofx.ArgumentError, match=r"added to the optimizer after an LR scheduler.*group of its own"):
        _step(gm, optimizer, scheduler)


def test_olr_weight_unfrozen_into_a_group_of_its_own_trains_with_its_hook():
    gm, last, optimizer, scheduler = _olr_with_frozen_last_layer()
    _step(gm, optimizer, scheduler)
    last.weight.requires_grad_(True)
    last.bias.requires_grad_(True)
    optimizer.add_param_group({"params": [last.weight]})  # the advice
    optimizer.add_param_group({"params": [last.bias]})
    before = last.weight.detach().clone()
    _step(gm, optimizer, scheduler)
    assert not torch.equal(last.weight.detach(), before)
    assert [group.get(OLR_GROUP_KEY) for group in optimizer.param_groups if OLR_GROUP_KEY in group] == ["0", "2"]
