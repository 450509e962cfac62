"""``orthofx.attach`` under a compiled optimizer step (torch.compile of ``opt.step``, of a function calling it, or of
the whole training step: forward, loss + ``orthofx.penalty``, backward, step).

The hooks (Riemannian projection and retraction, NOG, OLR) run eagerly, as one graph break each side of the step
(``torch.compiler.disable`` in orthofx/optim.py), so

* the weights after 20 compiled steps equal those of the same 20 eager steps, and the Riemannian weights stay
  orthonormal (float64 check of ``W^T W - I``);
* attaching adds no graph: the compiled loop compiles as many graphs as the same loop without ``attach`` (plain
  torch). Traced by dynamo, the hooks' data-dependent work (Newton-Schulz's stopping test, NOG's finiteness check)
  was split into a dozen graphs, recompiled on new floats;
* a frozen OLR weight added to the optimizer between compiled steps gets its param group split off outside any
  trace (traced, the split made dynamo's restarted analysis diverge: SpeculationLogDivergence).

Models are a 3-layer MLP of square 6 x 6 Linears; dynamo is reset before each compile. The default cells cover each
optimizer, entry point and policy once; the rest of the matrix and inductor run under ``slow``.
"""

from __future__ import annotations

import functools
import itertools
import warnings

import pytest
import torch
from torch import nn

import orthofx

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)

STEPS = 20
WIDTH = 6
NOG = {"rules": [{"match": {"type": "Linear"}, "apply": "pre_svd", "with": {"nog": True}}]}
NOG_OLR = {"rules": [{"match": {"type": "Linear"}, "apply": "pre_svd", "with": {"nog": True, "olr": True}}]}
POLICIES = {"isometric": "isometric", "nog": NOG}
HOWS = ("step_fn", "step_method", "train_step")
OPTIMIZERS = ("sgd", "adam", "adamw")
# foreach=None only: on CPU tensors torch resolves it to False (torch.optim.optimizer._default_to_fused_or_foreach:
# foreach kernels on cuda/xpu/mtia only), eagerly and under dynamo, so a False column ran the same single-tensor
# steps (measured: bitwise equal weights in every cell) at twice the cost.
FOREACH = (None,)
DEFAULT_CELLS = {("isometric", "sgd", None, "step_fn"), ("isometric", "adam", None, "step_method"),
                 ("isometric", "adamw", None, "train_step"), ("nog", "sgd", None, "train_step"),
                 ("nog", "adam", None, "step_fn"), ("nog", "adamw", None, "step_method")}
CELLS = [pytest.param(*cell, marks=() if cell in DEFAULT_CELLS else pytest.mark.slow,
                      id="-".join(str(part) for part in cell))
         for cell in itertools.product(POLICIES, OPTIMIZERS, FOREACH, HOWS)]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(),
                         nn.Linear(WIDTH, WIDTH))


def _optimizer(kind: str, foreach, params) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, foreach=foreach)
    if kind == "adam":
        return torch.optim.Adam(params, lr=0.05, foreach=foreach)
    return torch.optim.AdamW(params, lr=0.05, weight_decay=0.1, foreach=foreach)


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(i)
    return torch.randn(8, WIDTH, generator=generator), torch.randn(8, WIDTH, generator=generator)


class _CountingBackend:
    """A torch.compile backend that counts the graphs dynamo hands it (recompilations included) and compiles them
    with ``backend``."""

    def __init__(self, backend: str):
        self.compile = torch._dynamo.lookup_backend(backend)
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return self.compile(graph_module, example_inputs)


def _train(policy, kind: str, foreach, how: str, backend: str | None, attach: bool = True):
    """``STEPS`` training steps, eager (``backend`` None) or compiled the way ``how`` says; returns the weights and
    the number of graphs compiled."""
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = orthofx.transform(_mlp(), policy)
    optimizer = _optimizer(kind, foreach, gm.parameters())
    if attach:
        orthofx.attach(optimizer, gm)
    counter = _CountingBackend(backend) if backend else None

    def loss_of(x, y):
        return (gm(x) - y).square().mean() + orthofx.penalty(gm)

    def step_fn():
        optimizer.step()

    def train_step(x, y):
        loss = loss_of(x, y)
        loss.backward()
        optimizer.step()
        return loss

    step = optimizer.step if how == "step_method" else step_fn
    if counter is not None:
        step = torch.compile(step, backend=counter)  # fullgraph=False: torch's own optimizer step breaks the graph
        train_step = torch.compile(train_step, backend=counter)
    for i in range(STEPS):
        optimizer.zero_grad()
        if how == "train_step":
            train_step(*_batch(i))
        else:
            loss_of(*_batch(i)).backward()
            step()
    weights = {name: value.detach().clone() for name, value in gm.state_dict().items()}
    return weights, (counter.graphs if counter else 0)


@functools.lru_cache(maxsize=None)
def _plain_graphs(kind: str, foreach, how: str) -> int:
    """The graphs of the same loop without ``attach`` (plain torch): both policies leave the MLP the same plain
    graph without penalty terms, and only ``attach`` differs between them
    (test_both_policies_leave_the_same_plain_mlp), so one count serves the cells of both."""
    _, graphs = _train(POLICIES["isometric"], kind, foreach, how, "aot_eager", attach=False)
    return graphs


def test_both_policies_leave_the_same_plain_mlp():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        isometric, nog = (orthofx.transform(_mlp(), POLICIES[policy]) for policy in ("isometric", "nog"))
    assert isometric.code == nog.code
    layers = {n: type(m) for n, m in nog.named_modules() if n}
    assert layers == {n: type(m) for n, m in isometric.named_modules() if n}
    assert all(t.__module__.startswith("torch.nn.modules.") for t in layers.values()), set(layers.values())
    for gm in (isometric, nog):
        assert not orthofx.manifest_of(gm).penalties
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in gm.modules())
        assert {type(p) for p in gm.parameters()} == {nn.Parameter}
        assert not any(getattr(p, "_backward_hooks", None) or getattr(p, "_post_accumulate_grad_hooks", None)
                       for p in gm.parameters())


def _orthogonality_defect(weight: torch.Tensor) -> float:
    w = weight.detach().to(torch.float64)
    return float((w.T @ w - torch.eye(w.shape[1], dtype=torch.float64)).abs().max())


@pytest.mark.parametrize("policy, kind, foreach, how", CELLS)
def test_compiled_step_matches_eager_and_adds_no_graph(policy, kind, foreach, how):
    eager, _ = _train(POLICIES[policy], kind, foreach, how, None)
    compiled, graphs = _train(POLICIES[policy], kind, foreach, how, "aot_eager")
    plain_graphs = _plain_graphs(kind, foreach, how)
    # torch's compiled Adam alone already differs from its eager step by ~6e-6 after these 20 steps (no orthofx)
    atol = 1e-5 if kind == "sgd" else 3e-5
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], atol=atol, rtol=0, msg=name)
    if policy == "isometric":  # all three Linears are square: every weight is on the manifold
        for name, weight in compiled.items():
            if name.endswith("weight"):
                assert _orthogonality_defect(weight) <= 1e-5, name
    assert graphs == plain_graphs, f"attach added {graphs - plain_graphs} compiled graph(s) to the step"


@pytest.mark.slow
@pytest.mark.parametrize("policy, how", [("isometric", "step_method"), ("nog", "train_step")])
def test_inductor_compiled_step_matches_eager(policy, how):
    eager, _ = _train(POLICIES[policy], "adam", None, how, None)
    compiled, graphs = _train(POLICIES[policy], "adam", None, how, "inductor")
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], atol=3e-5, rtol=0, msg=name)
    if policy == "isometric":
        assert max(_orthogonality_defect(w) for n, w in compiled.items() if n.endswith("weight")) <= 1e-5
    assert graphs == (2 if how == "train_step" else 1)  # forward+loss, and the optimizer's update


def _unfreeze_olr_run(compiled: bool) -> dict[str, torch.Tensor]:
    """NOG + OLR; the last Linear frozen (its hooks skipped) until step 3, then added to the optimizer
    (``add_param_group``): OLR's setup splits it off into a param group of its own at the next step."""
    torch._dynamo.reset()
    gm = orthofx.transform(_mlp(), NOG_OLR)
    last = gm.get_submodule("4").weight
    last.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    orthofx.attach(optimizer, gm)
    step = torch.compile(optimizer.step, backend="aot_eager") if compiled else optimizer.step
    for i in range(6):
        if i == 3:
            last.requires_grad_(True)
            optimizer.add_param_group({"params": [last]})
        optimizer.zero_grad()
        x, y = _batch(i)
        (gm(x) - y).square().mean().backward()
        step()
    assert [group.get("orthofx_olr") for group in optimizer.param_groups][-1] == "4"
    return {name: value.detach().clone() for name, value in gm.state_dict().items()}


def test_unfreezing_an_olr_weight_between_compiled_steps():
    eager = _unfreeze_olr_run(compiled=False)
    compiled = _unfreeze_olr_run(compiled=True)
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], atol=1e-6, rtol=0, msg=name)
