"""Regression tests for capture bugs found by fuzzing hand-made models (one test per bug)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import ArgumentError


class _BatchSizeBranch(nn.Module):
    """A Python branch on the batch size: torch.export keeps the example's branch and narrows the dynamic batch."""

    def __init__(self):
        super().__init__()
        self.big = nn.Linear(4, 4)
        self.small = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[0] > 2:
            return self.big(x)
        return self.small(x)


def test_export_capture_refuses_batch_outside_the_branch_export_narrowed_to():
    """Bug: export capture with a dynamic batch kept only the branch of the example (batch 4: ``big``) and ran it
    for batch 2 too, returning ``big(x)`` where the model computes ``small(x)``, without error or warning."""
    torch.manual_seed(0)
    model = _BatchSizeBranch().eval()
    policy = {"capture": {"mode": "export"}, "rules": [{"match": {"type": "Linear"}, "apply": "orth_regularizer"}]}
    gm = orthofx.transform(model, policy, example_inputs=(torch.randn(4, 4),)).eval()
    capture = orthofx.manifest_of(gm).capture
    assert any("narrowed dynamic input sizes" in w and "x dimension 0: 3.." in w for w in capture.warnings)
    with torch.no_grad():
        x7 = torch.randn(7, 4)  # inside the range: same branch, same result as the model
        assert torch.equal(gm(x7), model(x7))
        for batch in (1, 2):
            with pytest.raises(ArgumentError, match=r"dimension 0 is %d, outside 3\.\." % batch):
                gm(torch.randn(batch, 4))
    # export's default range (it only specialises sizes 0 and 1 apart) is no guard: batch 1 still runs there
    plain = nn.Sequential(nn.Linear(4, 4), nn.Tanh()).eval()
    gm_plain = orthofx.transform(plain, policy, example_inputs=(torch.randn(4, 4),)).eval()
    x1 = torch.randn(1, 4)
    with torch.no_grad():
        assert torch.equal(gm_plain(x1), plain(x1))


class _StarArgs(nn.Module):
    """A forward taking ``x, *rest``: torch.export wants the ``*rest`` inputs' dynamic shapes as one tuple."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, *rest):
        y = self.lin(x)
        for r in rest:
            y = y + r
        return y


def test_export_capture_keeps_the_batch_dynamic_for_a_star_args_forward():
    """Bug: the dynamic batch spec had one entry per input, which torch.export refuses for a ``*args`` forward; the
    static retry then fixed the batch to the example's (4), and batch 3 raised 'captured for batch size 4 only'
    with a warning blaming the forward's code."""
    torch.manual_seed(0)
    model = _StarArgs().eval()
    policy = {"capture": {"mode": "export"}, "rules": [{"match": {"type": "Linear"}, "apply": "orth_regularizer"}]}
    gm = orthofx.transform(model, policy, example_inputs=(torch.randn(4, 4), torch.randn(4, 4), torch.randn(4, 4)))
    gm.eval()
    assert not any("batch size" in w for w in orthofx.manifest_of(gm).capture.warnings)
    inputs = (torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4))
    with torch.no_grad():
        assert torch.equal(gm(*inputs), model(*inputs))


class _TensorDefault(nn.Module):
    """A forward whose optional argument defaults to a tensor."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, scale=torch.tensor([1.0, 2.0, 3.0, 4.0])):
        return self.lin(x) * scale


def test_fx_capture_of_a_tensor_default_argument():
    """Bug: fx wrote the default into ``def forward(self, x, scale = _tensor_constant0)``, which names no global:
    transform raised a bare NameError."""
    torch.manual_seed(0)
    model = _TensorDefault().eval()
    gm = orthofx.transform(model, {"capture": {"mode": "fx"}, "rules": [
        {"match": {"type": "Linear"}, "apply": "orth_regularizer"}]}).eval()
    x, scale = torch.randn(3, 4), torch.randn(4)
    with torch.no_grad():
        assert torch.equal(gm(x), model.lin(x) * torch.tensor([1.0, 2.0, 3.0, 4.0]))
        assert torch.equal(gm(x, scale), model.lin(x) * scale)
        assert torch.equal(copy.deepcopy(gm)(x), model(x))
        assert torch.equal(pickle.loads(pickle.dumps(gm))(x), model(x))  # unpickling re-traces the code


class _FrozenBranchAndAutocast(nn.Module):
    """A forward with a ``torch.no_grad()`` block (a frozen branch) and a bfloat16 ``torch.autocast`` block."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 4)
        self.low = nn.Linear(4, 4)
        self.out = nn.Linear(4, 4)

    def forward(self, x):
        with torch.no_grad():
            f = self.frozen(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.low(x)
        return self.out(h.float()) + f


def test_fx_capture_keeps_no_grad_and_autocast_blocks():
    """Bug: symbolic tracing dropped ``with torch.no_grad():`` and ``with torch.autocast(...):``: the captured graph
    trained the frozen branch (its weight got a gradient) and ran the bfloat16 block in float32, silently."""
    torch.manual_seed(0)
    model = _FrozenBranchAndAutocast()
    gm = orthofx.transform(model, {"capture": {"mode": "fx"}, "rules": [
        {"match": {"type": "Linear"}, "apply": "orth_regularizer"}]})
    x = torch.randn(3, 4)
    # plain-torch reference of the forward
    f = x @ model.frozen.weight.detach().T + model.frozen.bias.detach()
    h = torch.nn.functional.linear(x.bfloat16(), model.low.weight.bfloat16(), model.low.bias.bfloat16()).float()
    expected = model.out(h) + f
    for module in (gm, pickle.loads(pickle.dumps(gm))):
        y = module(x)
        assert torch.equal(y, expected)
        y.sum().backward()
        assert module.frozen.weight.grad is None and module.low.weight.grad is not None
    with torch.no_grad():  # leaving the block restores the mode the graph runs in, not the traced one
        gm(x)
        assert not torch.is_grad_enabled()


def test_recorded_no_grad_and_autocast_blocks_compile_and_export(tmp_path):
    """The recorded mode switches must not break what worked when capture dropped them: torch.compile with
    fullgraph=True (dynamo cannot call autocast.__enter__ itself) and .pt2 export give the eager outputs."""
    torch.manual_seed(0)
    model = _FrozenBranchAndAutocast()
    x = torch.randn(3, 4)
    gm = orthofx.transform(model, {"capture": {"mode": "fx"}, "rules": [
        {"match": {"type": "Linear"}, "apply": "orth_regularizer"}]}, example_inputs=(x,))
    compiled = torch.compile(gm, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), gm(x))
    assert torch._dynamo.explain(gm)(x).graph_break_count == 0
    result = orthofx.export(gm, tmp_path / "m.pt2", example_inputs=(x,))
    assert result.max_abs_diff == 0.0
