"""torch 2.11 compatibility of compiled models (found on the lent H200, whose image has torch 2.11).

Two queries behaved differently under torch 2.11's dynamo than under the pinned torch, so ``tests/test_cuda.py``'s
fullgraph compiles failed there while CPU CI passed: ``torch.amp.is_autocast_available`` could not be traced (a
graph break in every orthogonal layer's kernel build and in the penalty), and ``torch.compiler.is_exporting()``
answered ``True`` under every ``torch.compile`` (a training-mode Jacobian probe refused to estimate, saying it ran
under torch.export). These tests make the pinned torch behave that way and check the compiled results.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthofx
from orthofx.nn.tracing import in_export


@pytest.fixture
def torch211_is_exporting(monkeypatch):
    """``torch.compiler.is_exporting`` as torch 2.11's dynamo answered it: ``True`` whenever dynamo traces."""
    # a function of its own: dynamo answers torch.compiler.is_exporting itself by identity
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: torch.compiler.is_compiling())


@pytest.fixture
def untraceable_autocast_query(monkeypatch):
    """``torch.amp.is_autocast_available`` as torch 2.11's dynamo saw it: a call it cannot trace."""
    original = torch.amp.is_autocast_available
    monkeypatch.setattr(torch.amp, "is_autocast_available", torch.compiler.disable(original))


def _jacobian_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)), nn.Linear(6, 3))
    return orthofx.transform(model, "jacobian", example_inputs=(torch.randn(2, 6),))


def test_in_export_follows_the_flag_export_sets_not_the_compile_answer(torch211_is_exporting):
    assert not in_export()
    compiled = torch.compile(lambda x: x + float(in_export()), fullgraph=True, backend="eager")
    assert torch.equal(compiled(torch.zeros(2)), torch.zeros(2))


def test_real_export_is_still_seen_as_export():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(in_export())
            return x * 2

    torch.export.export(Probe(), (torch.randn(2, 3),))
    assert seen and all(seen)
    assert not in_export()


def test_compiled_jacobian_probe_estimates_when_is_exporting_answers_true_under_compile(torch211_is_exporting):
    gm = _jacobian_mlp().train()
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])

    def loss_fn(inputs):
        return F.cross_entropy(gm(inputs), y), orthofx.penalty(gm)

    torch.manual_seed(1)
    _, eager_penalty = loss_fn(x)
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="eager")
    torch.manual_seed(1)
    _, compiled_penalty = compiled(x)
    assert compiled_penalty.item() > 0  # the estimate ran (a zero penalty: the probe was skipped)
    # both penalties are one-probe estimates of the same functional: finite and of the same magnitude
    assert torch.isfinite(compiled_penalty) and torch.isfinite(eager_penalty)


@pytest.mark.parametrize("preset", ["orthogonal", "lorth"])
def test_fullgraph_compile_when_autocast_availability_cannot_be_traced(untraceable_autocast_query, preset):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(2, 4, 6, 6)
    gm = orthofx.transform(model, preset, example_inputs=(x,)).train()

    def loss_fn(inputs):
        return gm(inputs).square().mean() + orthofx.penalty(gm)

    expected = loss_fn(x)
    torch._dynamo.reset()
    got = torch.compile(loss_fn, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
