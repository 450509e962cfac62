"""Regressions found by fuzzing ``orthofx.attach`` and the Pre-SVD pass's optimizer hooks (NOG, OLR) against plain
torch references: every test here failed before its fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthofx
import orthofx.passes.pre_svd as pre_svd
from orthofx.errors import ArgumentError


class LinearEigvalsh(nn.Module):
    """A Linear whose output feeds an eigvalsh (the Pre-SVD site 'a'), and a head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        f = self.a(x)
        return self.head(f).sum() + torch.linalg.eigvalsh(f.T @ f / x.shape[0] + torch.eye(4)).sum()


def _transformed(**params):
    torch.manual_seed(0)
    x = torch.randn(16, 6)
    policy = {"rules": [{"match": {"feeds": "linalg.eigvalsh"}, "apply": "pre_svd", "with": params}]}
    return orthofx.transform(LinearEigvalsh(), policy, example_inputs=(x,)), x


def test_olr_moves_the_weights_name_into_its_param_group():
    """An optimizer built from ``named_parameters()`` keeps ``param_names`` parallel to ``params``. OLR moved the
    weight into a group of its own but copied the whole name list into it and left it in the old group, so both
    groups (and the saved state) paired parameters with the wrong names: 4 names for the new group's 1 parameter."""
    gm, _ = _transformed(nog=False, olr=True)
    optimizer = torch.optim.SGD(gm.named_parameters(), lr=0.5)
    orthofx.attach(optimizer, gm)
    name_of = {id(p): name for name, p in gm.named_parameters()}
    assert len(optimizer.param_groups) == 2
    for group in optimizer.param_groups:
        assert group["param_names"] == [name_of[id(p)] for p in group["params"]]
    saved = optimizer.state_dict()["param_groups"]
    assert [g["param_names"] for g in saved] == [["a.bias", "head.weight", "head.bias"], ["a.weight"]]


def test_attach_skips_the_hooks_of_a_frozen_weight_left_out_of_the_optimizer():
    """Fine-tuning builds the optimizer from the trainable parameters only; attach refused such an optimizer
    ("build the optimizer from gm.parameters()") although no step can change the frozen weight."""
    gm, x = _transformed(nog=True, olr=True)
    gm.a.weight.requires_grad_(False)
    trainable = [p for p in gm.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    handle = orthofx.attach(optimizer, gm)
    assert handle.hooks == []
    assert [type(h).__name__ for h in handle.skipped] == ["NearestOrthogonalGradient", "OptimalLearningRate"]
    assert len(optimizer.param_groups) == 1  # OLR did not touch the groups
    before = {name: p.detach().clone() for name, p in gm.named_parameters()}
    optimizer.zero_grad()
    gm(x).backward()
    grads = {name: p.grad.clone() for name, p in gm.named_parameters() if p.grad is not None}
    optimizer.step()
    assert torch.equal(gm.a.weight, before["a.weight"])
    for name, grad in grads.items():  # plain SGD: delta = -lr g
        torch.testing.assert_close(before[name] - gm.get_parameter(name).detach(), 0.1 * grad)
    # a trainable weight left out is still a mistake
    gm.a.weight.requires_grad_(True)
    with pytest.raises(ArgumentError, match=r"site 'a'.*\['weight'\] are not optimised by this optimizer"):
        orthofx.attach(torch.optim.SGD(trainable, lr=0.1), gm)


@pytest.mark.parametrize("make", [lambda params: torch.optim.LBFGS(params, lr=10.0, max_iter=1),
                                  lambda params: torch.optim.Rprop(params, lr=10.0),
                                  lambda params: torch.optim.ASGD(params, lr=10.0)],
                         ids=["LBFGS", "Rprop", "ASGD"])
def test_olr_refuses_optimizers_that_do_not_step_by_the_lr_it_sets(make):
    """LBFGS reads its lr before it calls the closure (which computes the gradient eta* needs), Rprop only at its
    first step, ASGD steps by a size computed from the previous step's lr: with the weight alone in LBFGS's one
    group, attach passed and every step used the base lr 10 while the group recorded eta* (0.03) as the lr used."""
    gm, _ = _transformed(nog=False, olr=True)
    optimizer = make([gm.a.weight])
    name = type(optimizer).__name__
    message = rf"site 'a'.*{name} .*no step would use the eta\* of its own gradient.*'olr: false'"
    with pytest.raises(ArgumentError, match=message):
        orthofx.attach(optimizer, gm)
    assert len(optimizer.param_groups) == 1 and pre_svd.OLR_GROUP_KEY not in optimizer.param_groups[0]
    nog_only, _ = _transformed(nog=True, olr=False)
    assert len(orthofx.attach(make([nog_only.a.weight]), nog_only).hooks) == 1  # NOG alone is fine


def test_attach_raises_argument_errors_for_bad_arguments():
    """attach raised the bare base class OrthofxError, which ``except ValueError`` (what every other bad argument
    of orthofx raises, through ArgumentError) did not catch."""
    gm, _ = _transformed(nog=True, olr=False)
    with pytest.raises(ValueError, match="attach expects a torch.optim.Optimizer, got list"):
        orthofx.attach([torch.optim.SGD(gm.parameters(), lr=0.1)], gm)
    with pytest.raises(ValueError, match="not optimised by this optimizer"):
        orthofx.attach(torch.optim.SGD(gm.head.parameters(), lr=0.1), gm)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    orthofx.attach(optimizer, gm)
    with pytest.raises(ArgumentError, match="already attached to this optimizer; call handle.remove()"):
        orthofx.attach(optimizer, gm)


def test_olr_refuses_an_lr_scheduler_created_before_attach():
    """A scheduler holds one base lr per param group from its creation on; the group OLR added made its next step
    fail with torch's "zip() argument 2 is longer than argument 1" (LambdaLR), long after attach."""
    gm, x = _transformed(nog=False, olr=True)
    optimizer = torch.optim.SGD(gm.parameters(), lr=1.0)
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5 ** epoch)
    with pytest.raises(ArgumentError, match=r"site 'a'.*param group 0 has 'initial_lr'.*Create the LR scheduler "
                                            r"after orthofx.attach"):
        orthofx.attach(optimizer, gm)
    assert len(optimizer.param_groups) == 1  # refused before changing anything
    # created after attach, the scheduler scales every group's base lr, OLR's too: 0.5^epoch after the step
    optimizer = torch.optim.SGD(gm.parameters(), lr=1.0)
    orthofx.attach(optimizer, gm)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5 ** epoch)
    for epoch in range(1, 4):
        optimizer.zero_grad()
        gm(x).backward()
        optimizer.step()
        scheduler.step()
        assert [group["lr"] for group in optimizer.param_groups] == [0.5 ** epoch] * 2
