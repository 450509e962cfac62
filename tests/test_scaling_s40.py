"""Scaling with model depth (s40): work that grows with the number of layers must grow linearly.

Not timing tests: they count the calls of the function that was the hot spot, so they pin the O(n) behaviour on any
machine. PassContext.add_penalty used to ask every earlier term for its penalised tensors (PenaltyTerm.penalised,
a get_submodule walk each) for every new term: n(n+1)/2 calls for an n-layer model, 22 of the 33 s of transforming
a 1600-layer MLP with the lorth preset. It now keeps an index, updated with each new term and rebuilt when a layer
is replaced; the tests below also check that the index answers what a fresh scan would (tied weights counted once).
"""
from __future__ import annotations

import torch
from torch import fx, nn

import orthofx
from orthofx.passes.base import Manifest, PassContext
from orthofx.passes.orth_regularizer import LorthTerm, RecurrentLorthTerm


def _deep_mlp(n: int, width: int = 4) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(n):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


def _count_penalised(monkeypatch, cls) -> list[int]:
    """Count the calls of ``cls.penalised`` (wrapping the real method, so the results are unchanged)."""
    calls = [0]
    original = cls.penalised

    def counted(self, root):
        calls[0] += 1
        return original(self, root)

    monkeypatch.setattr(cls, "penalised", counted)
    return calls


def _context(model: nn.Module) -> PassContext:
    return PassContext(gm=fx.symbolic_trace(model), manifest=Manifest(policy=None, plan=None, capture=None))


def test_lorth_transform_asks_each_term_once(monkeypatch):
    """n Linear layers: the old code made n(n+1)/2 = 1830 calls for n = 60; now one per term."""
    n = 60
    calls = _count_penalised(monkeypatch, LorthTerm)
    model = _deep_mlp(n)
    gm = orthofx.transform(model, "lorth", example_inputs=(torch.randn(2, 4),))
    assert len(orthofx.manifest_of(gm).penalties) == n
    assert calls[0] <= 2 * n, calls[0]  # add_penalty once, _evaluation_cost once


def test_tied_weights_counted_once_at_depth(monkeypatch):
    """Every other Linear shares the weight of the one before: a term for each distinct weight only (as the fresh
    scan found), and the penalty is the sum of L_orth over the distinct weights, computed here directly."""
    n = 40
    calls = _count_penalised(monkeypatch, LorthTerm)
    model = _deep_mlp(n)
    for i in range(2, 2 * n, 4):
        model[i].weight = model[i - 2].weight
    gm = orthofx.transform(model, "lorth", example_inputs=(torch.randn(2, 4),))
    manifest = orthofx.manifest_of(gm)
    assert [t.site for t in manifest.penalties] == [str(i) for i in range(0, 2 * n, 4)]
    tied = [c for c in manifest.changes if "tied weight" in c.what]
    assert [c.site for c in tied] == [str(i) for i in range(2, 2 * n, 4)]
    assert all(f"attached at {int(c.site) - 2}" in c.what for c in tied)
    assert calls[0] <= 2 * n, calls[0]  # add_penalty once, _evaluation_cost once
    expected = torch.zeros((), dtype=torch.float64)
    for i in range(0, 2 * n, 4):
        w = model[i].weight.detach().double()
        expected += 0.01 * ((w @ w.T - torch.eye(4, dtype=torch.float64)) ** 2).sum()
    torch.testing.assert_close(orthofx.penalty(gm).double(), expected, rtol=1e-5, atol=1e-6)


def test_index_follows_a_replaced_layer():
    """A layer replaced after its term was added (its weight goes with it): the index must not answer with the old
    tensor, nor miss the new one."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    ctx = _context(model)
    assert ctx.add_penalty(LorthTerm("0", "r", 0.01)) is None
    # layer 0 now holds layer 2's weight: a term on layer 2 penalises a tensor the term at 0 penalises
    new = nn.Linear(4, 4)
    new.weight = ctx.gm.get_submodule("2").weight
    ctx.replace_module("0", new)
    assert ctx.add_penalty(LorthTerm("2", "r", 0.01)) == "0"
    # and layer 0's original weight is no longer penalised: a layer tied to it gets a term of its own
    other = nn.Linear(4, 4)
    other.weight = model[0].weight
    ctx.replace_module("1", other)
    assert ctx.add_penalty(LorthTerm("1", "r", 0.01)) is None
    assert [t.site for t in ctx.manifest.penalties] == ["0", "1"]


def test_index_sees_terms_appended_directly_and_returns_a_copy():
    """Terms a pass appends to manifest.penalties itself are indexed too; penalised_tensors's dict is the caller's
    to change (OrthRegularizer._apply_recurrent adds to it)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    ctx = _context(model)
    ctx.manifest.penalties.append(LorthTerm("0", "r", 0.01))
    form = LorthTerm("0", "r", 0.01).penalised(ctx.gm)[0][2]
    found = ctx.penalised_tensors(form)
    assert found == {id(model[0].weight): "0"}
    found[123] = "mine"
    assert 123 not in ctx.penalised_tensors(form)
    assert ctx.add_penalty(LorthTerm("1", "r", 0.01)) == "0"
    # a new list of terms (a pass rebuilding it) is indexed from scratch
    ctx.manifest.penalties = []
    assert ctx.penalised_tensors(form) == {}
    assert ctx.add_penalty(LorthTerm("1", "r", 0.01)) is None


def test_recurrent_terms_ask_each_term_once(monkeypatch):
    """GRU layers (the recurrent path asks penalised_tensors before each term): linear in the layers, and a tied
    hidden weight is left out as before."""
    n = 30
    grus = [nn.GRU(4, 4) for _ in range(n)]
    grus[1].weight_hh_l0 = grus[0].weight_hh_l0

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnns = nn.ModuleList(grus)

        def forward(self, x):
            for rnn in self.rnns:
                x = rnn(x)[0]
            return x

    calls = _count_penalised(monkeypatch, RecurrentLorthTerm)
    policy = {"rules": [{"match": {"type": "GRU"}, "apply": "orth_regularizer"}]}
    gm = orthofx.transform(Stack(), policy, example_inputs=(torch.randn(3, 2, 4),))
    manifest = orthofx.manifest_of(gm)
    assert len(manifest.penalties) == n - 1
    assert "tied to rnns.0.weight_hh_l0" in next(c.what for c in manifest.changes if c.site == "rnns.1")
    assert calls[0] <= 2 * n, calls[0]  # add_penalty once, _evaluation_cost once


def _nested(depth: int) -> nn.Module:
    """A Linear inside ``depth`` Sequentials, each adding a ReLU: it runs, but copying and tracing it recurse
    several frames per level."""
    module: nn.Module = nn.Linear(4, 4)
    for _ in range(depth):
        module = nn.Sequential(module, nn.ReLU())
    return module


def test_deep_nesting_is_a_capture_error_saying_what_to_do():
    """Nested 260 deep: transform and explain used to let a bare RecursionError out of copy.deepcopy."""
    import pytest

    import sys

    model = _nested(260)
    x = torch.randn(2, 4)
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)  # Python's default: a test runner's workers (xdist) may run with another
    try:
        for call in (orthofx.transform, orthofx.explain):
            with pytest.raises(orthofx.errors.CaptureError, match=r"recursion limit .* nests modules 260 deep") as info:
                call(model, "lorth", example_inputs=(x,))
            assert "sys.setrecursionlimit(" in str(info.value)
    finally:
        sys.setrecursionlimit(old)


def test_raising_the_limit_as_told_lets_transform_run():
    """Nested 180 deep: refused under a limit of 1000; under the limit the message names, the transformed model
    computes what the model computes and its penalty is the one Linear's L_orth (computed here in float64)."""
    import re
    import sys

    import pytest

    model = _nested(180)
    x = torch.randn(2, 4)
    before = sys.getrecursionlimit()
    try:
        sys.setrecursionlimit(1000)
        with pytest.raises(orthofx.errors.CaptureError) as info:
            orthofx.transform(model, "lorth", example_inputs=(x,))
        sys.setrecursionlimit(int(re.search(r"setrecursionlimit\((\d+)\)", str(info.value)).group(1)))
        gm = orthofx.transform(model, "lorth", example_inputs=(x,))
        torch.testing.assert_close(gm(x), model(x))
        linear = [m for m in model.modules() if isinstance(m, nn.Linear)][0]
        w = linear.weight.detach().double()
        expected = 0.01 * ((w @ w.T - torch.eye(4, dtype=torch.float64)) ** 2).sum()
        torch.testing.assert_close(orthofx.penalty(gm).double(), expected, rtol=1e-5, atol=1e-6)
    finally:
        sys.setrecursionlimit(before)


def _graph_node_reads(monkeypatch, model: nn.Module, x: torch.Tensor, preset: str) -> int:
    """How many times transforming ``model`` reads a graph's node list (each read is a walk over every node)."""
    reads = [0]
    original = fx.Graph.nodes

    def counted(graph):
        reads[0] += 1
        return original.fget(graph)

    monkeypatch.setattr(fx.Graph, "nodes", property(counted))
    orthofx.transform(model, preset, example_inputs=(x,))
    monkeypatch.setattr(fx.Graph, "nodes", original)
    return reads[0]


def _expanding_convs(n: int) -> nn.Sequential:
    """3 x 3 convs alternating 2 -> 4 channels (expanding: isometric_init asks which decompositions each feeds,
    decompositions_fed) and 4 -> 2."""
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [nn.Conv2d(2, 4, 3, padding=1) if i % 2 == 0 else nn.Conv2d(4, 2, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers)


def test_decompositions_fed_does_not_walk_the_graph_per_layer(monkeypatch):
    """The isometric preset on expanding convs: decompositions_fed used to scan every graph node for each expanding
    conv (n/2 scans more for n layers); now the graph reads do not grow with the depth."""
    x = torch.randn(1, 2, 4, 4)
    torch.manual_seed(0)
    shallow = _graph_node_reads(monkeypatch, _expanding_convs(10), x, "isometric")
    torch.manual_seed(0)
    deep = _graph_node_reads(monkeypatch, _expanding_convs(50), x, "isometric")
    assert deep - shallow <= 4, (shallow, deep)


def test_decompositions_fed_finds_the_decompositions_a_layer_feeds():
    """What decompositions_fed answers, against the graph read by hand: conv a feeds the eigh through a ReLU and a
    reshape, conv b (after a) feeds it too, and conv c feeds only the output."""
    from orthofx.passes.base import decompositions_fed

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 1)
            self.c = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            h = self.b(torch.relu(self.a(x))).flatten(2)
            cov = h @ h.transpose(1, 2) + torch.eye(4)
            return torch.linalg.eigh(cov)[0].sum() + self.c(x).sum()

    x = torch.randn(1, 2, 4, 4)
    policy = {"rules": [{"match": {"type": "Conv2d"}, "apply": "orth_regularizer"},
                        {"match": {"op": "linalg.eigh"}, "apply": "svd_conditioning"}]}
    gm = orthofx.transform(Net(), policy, example_inputs=(x,))
    manifest = orthofx.manifest_of(gm)
    eigh = [s.name for s in manifest.plan.sites if s.kind == "function"]
    assert len(eigh) == 1
    ctx = PassContext(gm=gm, manifest=manifest)
    assert decompositions_fed(ctx, "a") == []  # the walk stops at the next conv (b)
    assert decompositions_fed(ctx, "b") == eigh
    assert decompositions_fed(ctx, "c") == []
    assert ctx.function_sites() is ctx.function_sites()
