"""Regressions found by fuzzing the Jacobian-isometry regulariser (P2) with odd blocks: a block fed by keyword, a
block returning a tuple, reentrant checkpointing inside a block, probes nested in probes, a block with a
submodule named ``block``, and non-boolean switches.

References: the dense float64 Jacobian from ``torch.autograd.functional.jacobian`` (``||J^T J - I||_F^2``), the
mean over many seeded single-probe estimates within five standard errors, and central finite differences of
the seeded (hence deterministic) penalty in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from references import central_difference

import orthofx
import orthofx.passes.jacobian_isometry  # noqa: F401  (registers the pass)
from orthofx.nn.jacobian import JacobianProbe
from orthofx.transform import manifest_of


def _full_defect(fn, x: torch.Tensor) -> float:
    """||J^T J - I||_F^2 of the flattened map ``fn`` at ``x``, from the dense Jacobian."""
    jac = torch.autograd.functional.jacobian(fn, x).reshape(-1, x.numel())
    gram = jac.T @ jac
    return float((gram - torch.eye(x.numel(), dtype=jac.dtype)).square().sum())


class _KeywordBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, inp, scale=1.0):
        return torch.tanh(self.lin(inp)) * scale


class _CallsByKeyword(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = _KeywordBlock()
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.b(inp=x, scale=0.5))


def _keyword_model():
    torch.manual_seed(0)
    policy = {"rules": [{"match": {"kind": "block", "name": "b"}, "apply": "jacobian_isometry",
                         "with": {"weight": 1.0}}]}
    x = torch.randn(2, 3, dtype=torch.float64)
    gm = orthofx.transform(_CallsByKeyword().double(), policy, example_inputs=(x,)).train()
    return gm, x


def test_a_block_fed_by_keyword_is_estimated_without_bias():
    # fx keeps ``self.b(inp=x)`` as a keyword call; the probe took the first *positional* argument and raised
    gm, x = _keyword_model()
    probe = gm.b
    exact = _full_defect(lambda t: torch.tanh(probe.lin(t)) * 0.5, x)
    values = []
    for seed in range(200):
        probe.seed = seed
        gm(x)
        values.append(float(orthofx.penalty(gm).detach()))
    values = torch.tensor(values, dtype=torch.float64)
    assert abs(float(values.mean()) - exact) < 5 * float(values.std()) / len(values) ** 0.5 + 1e-12


def test_the_penalty_of_a_block_fed_by_keyword_matches_finite_differences():
    gm, x = _keyword_model()
    gm.b.seed = 3

    def penalty():  # central_difference runs it under no_grad, where the probe makes no estimate
        with torch.enable_grad():
            gm(x)
            return orthofx.penalty(gm)

    weight = gm.b.lin.weight
    (grad,) = torch.autograd.grad(penalty(), weight)
    for index in [(0, 0), (1, 2), (2, 1)]:
        assert float(grad[index]) == pytest.approx(central_difference(penalty, weight, index), rel=1e-6, abs=1e-8)


class _TupleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x), x.sum()


class _UsesTuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.t = _TupleBlock()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.Tanh())

    def forward(self, x):
        y, _ = self.t(x)
        return self.body(y)


def test_a_block_returning_a_tuple_is_named_by_the_probe_and_skipped_by_the_pass():
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    with pytest.raises(orthofx.LayerArgumentError, match=r"\(_TupleBlock\): the block returns a tuple, not one "
                       r"tensor.*Select a module of yours that calls it and returns one"):
        JacobianProbe(_TupleBlock())(x)
    policy = {"rules": [{"match": {"kind": "block", "name": "re:t|body"}, "apply": "jacobian_isometry"}]}
    # with example inputs the pass sees the tuple and leaves the block alone (it used to wrap it, and the first
    # training step failed inside the estimator)
    gm = orthofx.transform(_UsesTuple(), policy, example_inputs=(x,)).train()
    statuses = {c.site: c.status for c in manifest_of(gm).changes}
    assert "not one tensor" in statuses["t"] and not isinstance(gm.t, JacobianProbe)
    assert isinstance(gm.body, JacobianProbe)
    gm(x)
    assert float(orthofx.penalty(gm).detach()) > 0
    # without example inputs the first training step names the block
    gm = orthofx.transform(_UsesTuple(), policy).train()
    with pytest.raises(orthofx.LayerArgumentError, match="JacobianProbe at 't'.*returns a tuple"):
        gm(x)


class _ReentrantCheckpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return checkpoint(lambda t: torch.tanh(self.lin(t)), x, use_reentrant=True)


def test_reentrant_checkpointing_inside_a_block_is_an_orthofx_error_that_says_how_to_fix_it():
    # torch's RuntimeError ("incompatible with .grad()") came out of the estimator unexplained
    probe = JacobianProbe(_ReentrantCheckpointed())
    with pytest.raises(orthofx.LayerArgumentError, match=r"use_reentrant=True.*Pass use_reentrant=False"):
        probe(torch.randn(3, 4))


def _nested_policy(every: int = 1):
    return {"rules": [{"match": {"kind": "block", "name": "0"}, "apply": "jacobian_isometry",
                       "with": {"weight": 1.0, "every": every}},
                      {"match": {"kind": "module", "name": "0.0"}, "apply": "jacobian_isometry",
                       "with": {"weight": 1.0, "every": every}}]}


class _TwiceThrough(nn.Module):
    def __init__(self):
        super().__init__()
        self.add_module("0", nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)))

    def forward(self, x):
        block = getattr(self, "0")
        return block(block(x))


def test_a_probe_nested_in_another_probes_block_gives_both_estimates():
    # the inner probe ran its own estimate inside the outer one's forward-mode transform and raised
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)), nn.Linear(3, 2)).double()
    plain_outer = nn.Sequential(*[m for m in model[0]])  # the same layers, without probes
    x = torch.randn(2, 3, dtype=torch.float64)
    gm = orthofx.transform(model, _nested_policy(), example_inputs=(x,)).train()
    outer, inner = gm.get_submodule("0"), gm.get_submodule("0.0")
    assert isinstance(outer, JacobianProbe) and isinstance(inner, JacobianProbe)
    exact_outer = _full_defect(plain_outer, x)
    exact_inner = _full_defect(plain_outer[0], x)
    outer_values, inner_values = [], []
    for seed in range(150):
        outer.seed, inner.seed = seed, seed + 1000
        gm(x)
        outer_values.append(float(outer.estimate.detach()))
        inner_values.append(float(inner.estimate.detach()))
    for values, exact in ((outer_values, exact_outer), (inner_values, exact_inner)):
        values = torch.tensor(values, dtype=torch.float64)
        assert abs(float(values.mean()) - exact) < 5 * float(values.std()) / len(values) ** 0.5 + 1e-12


def test_a_nested_site_counts_the_calls_of_the_block_around_it():
    # the inner module is not in the graph (its block is a leaf): it is called as often as the block, twice here,
    # so with every: 2 both probes estimate on the same steps (the inner one used to count each call as a step)
    torch.manual_seed(0)
    gm = orthofx.transform(_TwiceThrough(), _nested_policy(every=2)).train()
    outer, inner = gm.get_submodule("0"), gm.get_submodule("0.0")
    assert outer.calls_per_step == inner.calls_per_step == 2
    x = torch.randn(2, 3)
    pattern = []
    for _ in range(4):
        gm(x)
        pattern.append((outer.estimate is not None, inner.estimate is not None))
    assert pattern == [(True, True), (False, False), (True, True), (False, False)]


class _HasBlockChild(nn.Module):
    """Like torchvision's MBConv: its layers sit in a submodule named ``block``."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())

    def forward(self, x):
        return self.block(x) + x


def test_a_submodule_named_block_keeps_its_path_through_the_probe():
    torch.manual_seed(0)
    model = nn.Sequential(_HasBlockChild(), nn.Linear(4, 2))
    policy = {"rules": [{"match": {"kind": "block", "name": "0"}, "apply": "jacobian_isometry"}]}
    gm = orthofx.transform(model, policy).train()
    assert isinstance(gm.get_submodule("0"), JacobianProbe)
    # get_submodule("0.block.0") reached the probe's wrapped _HasBlockChild instead of its Linear
    for name, module in gm.named_modules():
        assert gm.get_submodule(name) is module, name
    assert isinstance(gm.get_submodule("0.block.0"), nn.Linear)
    assert torch.equal(gm.get_submodule("0.block.0").weight, model[0].block[0].weight)
    assert type(gm.get_submodule("0").to_plain()) is _HasBlockChild
    x = torch.randn(3, 4)
    assert torch.equal(gm(x), model(x))
    assert float(orthofx.penalty(gm).detach()) > 0


def test_members_the_probe_would_hide_are_refused_and_switches_must_be_booleans():
    block = nn.Sequential()
    block.add_module("penalty", nn.Linear(2, 2))
    with pytest.raises(orthofx.LayerArgumentError, match="member.*penalty would be hidden"):
        JacobianProbe(block)
    # bool("no") is True: the string switched the per-sample estimate on
    with pytest.raises(orthofx.LayerArgumentError, match="per_sample must be True or False, got 'no'"):
        JacobianProbe(nn.Linear(2, 2), per_sample="no")
    with pytest.raises(orthofx.LayerArgumentError, match="normalize must be True or False, got 2"):
        JacobianProbe(nn.Linear(2, 2), normalize=2)
    # 0 and 1 are flags, as theory._flag reads every other orthofx switch
    probe = JacobianProbe(nn.Linear(2, 2), per_sample=1, normalize=np.bool_(False))
    assert probe.per_sample is True and probe.normalize is False



def test_batch_norm_left_with_one_sample_by_batch_fraction_is_refused():
    """batch_fraction 0.5 of a batch of 2 leaves one sample: the estimate's own BatchNorm normalised it to zero,
    a Jacobian of 0 and an estimate without gradient, where torch's BatchNorm refuses one value per channel."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()
    with pytest.raises(orthofx.ArgumentError, match=r"one value per channel \(input \(1, 4\)\).*larger "
                                                    r"batch_fraction"):
        orthofx.metrics.jacobian_isometry(block, torch.randn(2, 4), batch_fraction=0.5)
    # two samples are fine, and match the dense float64 Jacobian of the batch-coupled block in expectation
    x = torch.randn(2, 4, dtype=torch.float64)
    block = block.double()
    jac = torch.autograd.functional.jacobian(lambda z: block(z).reshape(-1), x).reshape(8, 8)
    exact = float((jac.T @ jac - torch.eye(8, dtype=torch.float64)).square().sum())
    estimates = [float(orthofx.metrics.jacobian_isometry(block, x, probes=64, per_sample=False,
                                                         generator=torch.Generator().manual_seed(s)))
                 for s in range(8)]
    assert abs(sum(estimates) / len(estimates) - exact) < 0.25 * exact
