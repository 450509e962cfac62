"""Lazy regularisation's two schedules together (session 36): ``orth_regularizer``'s ``every: 3`` (the model counts
``orthofx.penalty`` calls) and ``jacobian_isometry``'s ``every: 2`` (the probe counts its training forwards) in one
model, one L_orth site inside the probe's block. Checked against float64 references written here from the
definitions (L_orth ``||W W^T - I||_F^2`` of the smaller Gram; the probe's estimate ``||(J^T J - I) v||_F^2`` of the
batch map's Jacobian ``J`` for the fixed probe ``v`` of ``fixed_probe_signs``):

* over lcm(3, 2) = 6 steps the summed penalty and its gradient are 3 Jacobian estimates plus every L_orth term
  twice, each step's value the due terms', also when the steps are interleaved with what must not move either
  schedule (``torch.no_grad()`` forwards and penalties, eval-mode forwards, ``penalty_terms``, ``orthofx.report``,
  a call that raises), and when the run is resumed mid-period from ``gm.state_dict()``, from a bigger model's
  state dict (prefix ``backbone.``, loaded into a bigger model or, the prefix consumed, into the part) or through
  ``orthofx.export(.pt)`` + ``orthofx.load``;
* ``torch.compile(backend="aot_eager")`` of the model alone and of the whole loss (fullgraph) gives the same values;
* ``orthofx.freeze`` drops both counts, and tied weights, lazy layers and an LSTM take the period; gradient
  accumulation needs the penalty at each micro-batch (documented in ``orthofx.passes.jacobian_isometry``);
* under DDP (gloo, 2 processes) both ranks evaluate the same terms on the same steps, the replicas equal a
  single-process float64 reference, and a run resumed from a state dict loaded on every rank is the straight run.

Bugs found. (1) A call that raised was counted: ``orthofx.penalty`` counted its call before computing the terms
(a lazy layer that had not run raises), and the probe counted its forward before its estimate (an input of the
wrong shape raises there), so the run that called again after the fix was one step off its schedule for good.
(2) A resumed run restored the count but not the call each term is due on: the transform spreads the terms by
their weights' shapes, which lazy layers have only after a run, so ``orthofx.load`` (or a transform) without
``example_inputs`` spread them otherwise than the run that was saved, and evaluated other terms on each call.
"""

from __future__ import annotations

import functools

import pytest
import torch
from ddp_util import run_jobs, shared_dir
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

import orthofx
from orthofx.nn.jacobian import PHASE_METADATA_KEY, JacobianProbe
from orthofx.transform import PENALTY_CALLS_METADATA_KEY, PENALTY_PHASES_METADATA_KEY

pytestmark = pytest.mark.usefixtures("one_thread")

W_JAC, W_LORTH, JAC_EVERY, LORTH_EVERY, LCM = 0.5, 0.1, 2, 3, 6
POLICY = {"rules": [
    {"match": {"kind": "block", "name": "body"}, "apply": "jacobian_isometry",
     "with": {"weight": W_JAC, "every": JAC_EVERY}},
    {"match": {"type": "Linear"}, "apply": "orth_regularizer", "with": {"weight": W_LORTH, "every": LORTH_EVERY}},
]}
LINEARS = ("body.0", "a", "head")
X = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 6), nn.Tanh())  # the probe's block; body.0 also has an L_orth term
        self.a = nn.Linear(6, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.a(self.body(x))))


def _plain(seed=0):
    torch.manual_seed(seed)
    return _Net().double()


def _transformed(seed=0):
    return orthofx.transform(_plain(seed), POLICY, example_inputs=(X,))


def _lorth64(w: torch.Tensor) -> torch.Tensor:
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return (gram - torch.eye(gram.shape[0], dtype=w.dtype)).square().sum()


def _signs(like: torch.Tensor) -> torch.Tensor:
    """The first probe ``fixed_probe_signs`` draws: -1 at the flat indices divisible by 3, else +1."""
    flips = torch.arange(like.numel()).remainder(3).eq(0).to(like.dtype)
    return (1 - 2 * flips).reshape(like.shape)


def _jacobian64(weight, bias, x) -> torch.Tensor:
    """``||(J^T J - I) v||^2`` of ``x -> tanh(x W^T + b)`` on the batch (block-diagonal J), ``v`` the fixed probe."""
    v = _signs(x)
    slope = 1 - torch.tanh(x @ weight.T + bias).square()
    return ((slope * slope * (v @ weight.T)) @ weight - v).square().sum()


def _params64(model):
    return {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}


def _reference(params, steps=range(LCM), phases=None):
    """Float64 sum over ``steps`` of the penalty: the estimate on the steps ``s % 2 == 0``, each L_orth term on
    the steps ``s % 3 == phase`` (the phases the transform chose: one per term, which the test checks apart)."""
    total = torch.zeros((), dtype=torch.float64)
    for s in steps:
        if s % JAC_EVERY == 0:
            total = total + W_JAC * _jacobian64(params["body.0.weight"], params["body.0.bias"], X)
        for site in LINEARS:
            if s % LORTH_EVERY == phases[site]:
                total = total + W_LORTH * _lorth64(params[f"{site}.weight"])
    return total


def _phases(gm):
    terms = orthofx.manifest_of(gm).penalties
    lorth = {t.site: t.phase for t in terms if t.rule.startswith("orth_regularizer")}
    assert sorted(lorth) == sorted(LINEARS) and all(t.every == LORTH_EVERY for t in terms if t.site in lorth)
    return lorth


def _step(model, grads, values):
    """One training step without an update: forward, penalty, the penalty's gradient added to ``grads``."""
    model(X)
    value = orthofx.penalty(model)
    values.append(float(value.detach()))
    params = dict(model.named_parameters())
    if value.requires_grad:
        for name, grad in zip(params, torch.autograd.grad(value, list(params.values()), allow_unused=True)):
            if grad is not None:
                grads[name] = grads.get(name, 0) + grad


def _probe(model) -> JacobianProbe:
    probes = [m for m in model.modules() if isinstance(m, JacobianProbe)]
    assert len(probes) == 1
    return probes[0]


def _no_grad(gm):
    with torch.no_grad():
        gm(X)
        orthofx.penalty(gm)


def _eval_forward(gm):
    gm.eval()
    gm(X)
    gm.train()


def _logging(gm):
    orthofx.penalty_terms(gm)
    str(orthofx.report(gm))


def _failed_calls(gm):
    with pytest.raises(RuntimeError):
        gm(X[:, :5])  # the probe's estimate raises on the wrong input size


def _from_state_dict(gm, tmp_path):
    fresh = _transformed(seed=9)
    fresh.load_state_dict(gm.state_dict())
    return fresh


class _Outer(nn.Module):
    def __init__(self, gm):
        super().__init__()
        self.backbone = gm

    def forward(self, x):
        return self.backbone(x)


def _from_outer_state_dict(gm, tmp_path):
    state = _Outer(gm).state_dict()
    assert state._metadata["backbone"][PENALTY_CALLS_METADATA_KEY] == orthofx.manifest_of(gm).penalty_calls
    assert state._metadata["backbone.body"][PHASE_METADATA_KEY] == _probe(gm).calls
    fresh = _Outer(_transformed(seed=9))
    fresh.load_state_dict(state)
    return fresh.backbone


def _from_outer_state_dict_into_a_part(gm, tmp_path):
    state = _Outer(gm).state_dict()
    consume_prefix_in_state_dict_if_present(state, "backbone.")  # keys and metadata paths
    fresh = _transformed(seed=9)
    fresh.load_state_dict(state)
    return fresh


def _through_pt(gm, tmp_path):
    orthofx.export(gm, tmp_path / "m.pt")
    return orthofx.load(_plain(seed=9), tmp_path / "m.pt", example_inputs=(X,))


BETWEEN = {"no_grad": _no_grad, "eval_forward": _eval_forward, "logging": _logging, "failed_calls": _failed_calls}
RESUME = {"state_dict": _from_state_dict, "outer_state_dict": _from_outer_state_dict,
          "outer_state_dict_into_a_part": _from_outer_state_dict_into_a_part, "pt": _through_pt}


@pytest.mark.parametrize("variant", ["straight", *BETWEEN, *(f"resume_{k}" for k in RESUME)])
def test_two_periods_over_their_lcm_match_the_float64_definitions(variant, fixed_probe_signs, tmp_path):
    gm = _transformed()
    phases = _phases(gm)
    assert sorted(phases.values()) == [0, 1, 2]  # three terms spread over three calls
    params = _params64(gm)
    grads, values, jac_steps = {}, [], []
    step = fixed_probe_signs.from_first_probe(_step)
    for s in range(LCM):
        if variant.startswith("resume_") and s in (1, 4):  # mid-period for both counts (1 of 3 / 1 of 2; 1 of 3 / 0)
            gm = RESUME[variant[len("resume_"):]](gm, tmp_path)
        step(gm, grads, values)
        jac_steps.append(_probe(gm).estimate is not None)
        if variant in BETWEEN:
            BETWEEN[variant](gm)
    assert jac_steps == [s % JAC_EVERY == 0 for s in range(LCM)]
    for s, value in enumerate(values):  # each step: the estimate on even steps, the terms of its phase
        torch.testing.assert_close(torch.tensor(value, dtype=torch.float64),
                                   _reference(params, [s], phases).detach(), rtol=1e-12, atol=1e-12)
    expected = _reference(params, phases=phases)
    full = sum(W_LORTH * _lorth64(params[f"{site}.weight"]) for site in LINEARS)
    jacobian = W_JAC * _jacobian64(params["body.0.weight"], params["body.0.bias"], X)
    torch.testing.assert_close(expected, 3 * jacobian + 2 * full)  # each L_orth term twice, 3 estimates
    reference = dict(zip(params, torch.autograd.grad(expected, list(params.values()), allow_unused=True)))
    for name, grad in reference.items():
        got = grads.get(name)
        if grad is None:
            assert got is None, name
        else:
            torch.testing.assert_close(got, grad, rtol=1e-12, atol=1e-12, msg=name)


def test_a_penalty_call_that_raises_is_not_counted():
    # old code: the count moved before the terms were computed, so the call that raised (a lazy layer that had
    # not run) was a call of the period, and every later call evaluated the next call's terms
    torch.manual_seed(0)
    gm = orthofx.transform(nn.Sequential(nn.LazyLinear(6), nn.Tanh(), nn.LazyLinear(6), nn.Tanh(), nn.LazyLinear(3)),
                           {"rules": [{"match": {"type": "LazyLinear"}, "apply": "orth_regularizer",
                                       "with": {"weight": W_LORTH, "every": 3}}]})
    with pytest.raises(orthofx.errors.ArgumentError, match="lazy layer that has not run"):
        orthofx.penalty(gm)
    assert orthofx.manifest_of(gm).penalty_calls == 0
    gm(torch.randn(2, 5))
    phases = {t.site: t.phase for t in orthofx.manifest_of(gm).penalties}
    for call in range(3):  # call c carries the term of phase c (the phases the transform dealt out: 0, 1, 2)
        value = orthofx.penalty(gm)
        site = next(site for site, phase in phases.items() if phase == call)
        expected = W_LORTH * _lorth64(gm.get_submodule(site).weight.detach().double())
        torch.testing.assert_close(value.detach().double(), expected, rtol=1e-5, atol=1e-7)


def test_a_parts_call_that_raises_counts_no_part():
    # a bigger model's penalty is one call of all its parts: a part that raises leaves the parts before it too
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = orthofx.transform(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), {"rules": [
                {"match": {"type": "Linear"}, "apply": "orth_regularizer", "with": {"every": 2}}]})
            self.second = orthofx.transform(nn.Sequential(nn.LazyLinear(4)), {"rules": [
                {"match": {"type": "LazyLinear"}, "apply": "orth_regularizer", "with": {"every": 2}}]})

    net = Two()
    with pytest.raises(orthofx.errors.ArgumentError):
        orthofx.penalty(net)
    assert orthofx.manifest_of(net.first).penalty_calls == 0


def _lazy_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.LazyLinear(16), nn.Tanh(), nn.LazyLinear(4), nn.Tanh(), nn.LazyLinear(32), nn.Tanh(),
                         nn.LazyLinear(3))


LAZY_POLICY = {"rules": [{"match": {"type": ["LazyLinear", "Linear"]}, "apply": "orth_regularizer",
                          "with": {"weight": W_LORTH, "every": 2}}]}


def _lazy_call_values(gm, calls):
    """Each call's penalty and the float64 L_orth of the layers its gradient reaches (the terms it evaluated)."""
    layers = {t.site: gm.get_submodule(t.site) for t in orthofx.manifest_of(gm).penalties}
    out = []
    for _ in range(calls):
        value = orthofx.penalty(gm)
        grads = torch.autograd.grad(value, [m.weight for m in layers.values()], allow_unused=True)
        due = sorted(site for site, grad in zip(layers, grads) if grad is not None)
        expected = sum(W_LORTH * _lorth64(layers[site].weight.detach().double()) for site in due)
        torch.testing.assert_close(value.detach().double(), expected, rtol=1e-5, atol=1e-7)
        out.append(due)
    return out


@pytest.mark.parametrize("how", ["load_without_example", "transform_without_example"])
def test_a_resumed_run_keeps_the_phases_of_the_run_it_resumes(how, tmp_path):
    # the transform spreads the terms by their weights' shapes, which lazy layers have only after a run: with
    # example_inputs (shapes: 0 | 2, 4, 6) and without (no shapes, dealt in turn: 0, 4 | 2, 6). Old code: the
    # count was restored but not the phases, so the resumed run evaluated other terms on each call
    x = torch.randn(2, 20)
    gm = orthofx.transform(_lazy_mlp(), LAZY_POLICY, example_inputs=(x,))
    straight = _lazy_call_values(gm, 1)
    orthofx.export(gm, tmp_path / "m.pt")
    straight += _lazy_call_values(gm, 3)
    if how == "load_without_example":
        resumed = orthofx.load(_lazy_mlp(), tmp_path / "m.pt")
    else:
        resumed = orthofx.transform(_lazy_mlp(), LAZY_POLICY)
        resumed(x)
        resumed.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True)["state_dict"])
    assert straight[0] == ["0"] and straight[1] == ["2", "4", "6"]  # balanced by cost: 0 is the widest
    assert straight[:1] + _lazy_call_values(resumed, 3) == straight
    changes = {c.site: c.what for c in orthofx.manifest_of(resumed).changes}
    assert changes["4"].endswith("call in 2 (call 1 of each period)") and changes["4"].count("call in 2") == 1


def test_phases_of_another_policy_are_ignored_and_damaged_ones_refused():
    gm = orthofx.transform(_lazy_mlp(), LAZY_POLICY, example_inputs=(torch.randn(2, 20),))
    state = gm.state_dict()
    other = orthofx.transform(_lazy_mlp(), {"rules": [dict(LAZY_POLICY["rules"][0], **{"with": {"every": 3}})]},
                              example_inputs=(torch.randn(2, 20),))
    own = [t.phase for t in orthofx.manifest_of(other).penalties]
    other.load_state_dict(state)  # every 2's phases do not fit every 3's terms: its own stay
    assert [t.phase for t in orthofx.manifest_of(other).penalties] == own
    state._metadata[""][PENALTY_PHASES_METADATA_KEY] = ((2, 5),) * 4
    with pytest.raises(orthofx.errors.ArgumentError, match="remove the entry"):
        gm.load_state_dict(state)


def test_freeze_drops_both_counts_and_export_load_keeps_them(tmp_path):
    gm = _transformed()
    for _ in range(2):
        gm(X)
        orthofx.penalty(gm)
    state = gm.state_dict()
    assert state._metadata[""][PENALTY_CALLS_METADATA_KEY] == 2 and state._metadata["body"][PHASE_METADATA_KEY] == 0
    frozen = orthofx.freeze(gm)
    assert all(PENALTY_CALLS_METADATA_KEY not in m and PHASE_METADATA_KEY not in m
               for m in frozen.state_dict()._metadata.values())
    assert float(orthofx.penalty(frozen)) == 0.0
    frozen.load_state_dict(state)  # a training checkpoint loads into the frozen model: the counts are ignored
    orthofx.export(gm, tmp_path / "m.pt")
    restored = orthofx.load(_plain(seed=5), tmp_path / "m.pt", example_inputs=(X,))
    assert orthofx.manifest_of(restored).penalty_calls == 2 and _probe(restored).calls == 0


@pytest.mark.parametrize("how", ["model", "loss"])
def test_compiled_model_or_loss_keeps_both_schedules(how, fixed_probe_signs):
    eager, compiled = _transformed(), _transformed()
    if how == "model":
        module = torch.compile(compiled, backend="aot_eager")
        loss = lambda x: module(x).square().mean() + orthofx.penalty(module)  # noqa: E731
    else:
        counter = CompileCounterWithBackend("aot_eager")
        loss = torch.compile(lambda x: compiled(x).square().mean() + orthofx.penalty(compiled), backend=counter,
                             fullgraph=True)
    run_eager = fixed_probe_signs.from_first_probe(lambda x: eager(x).square().mean() + orthofx.penalty(eager))
    run_compiled = fixed_probe_signs.from_first_probe(loss)
    for _ in range(LCM + 1):
        torch.testing.assert_close(run_compiled(X), run_eager(X), rtol=1e-12, atol=1e-12)
        assert _probe(compiled).calls == _probe(eager).calls
        assert orthofx.manifest_of(compiled).penalty_calls == orthofx.manifest_of(eager).penalty_calls
    if how == "loss":  # one graph per pair of phases: lcm(3, 2) = 6 of the 3 x 2, within dynamo's limit of 8
        assert counter.frame_count == LCM


def test_gradient_accumulation_needs_the_penalty_at_each_micro_batch(fixed_probe_signs):
    # the probe's steps are its forwards (documented in orthofx.passes.jacobian_isometry): added at each of two
    # micro-batches, the penalty carries the estimate of every other micro-batch; added once after the last one,
    # never (every: 2 divides the 2 micro-batches), while the L_orth terms keep their period of penalty calls
    params = None
    for each in (True, False):
        gm = _transformed()
        params = params or _params64(gm)
        phases, estimates = _phases(gm), []
        for step in range(LCM):
            for micro in range(2):
                fixed_probe_signs.from_first_probe(gm)(X)
                if each or micro == 1:
                    value = orthofx.penalty(gm)
                    estimates.append(_probe(gm).estimate is not None)
                    calls = len(estimates) - 1
                    expected = W_LORTH * sum(_lorth64(params[f"{site}.weight"]) for site in LINEARS
                                             if calls % LORTH_EVERY == phases[site])
                    if estimates[-1]:
                        expected = expected + W_JAC * _jacobian64(params["body.0.weight"], params["body.0.bias"], X)
                    torch.testing.assert_close(value.detach(), expected.detach(), rtol=1e-12, atol=1e-12)
        assert estimates == ([c % 2 == 0 for c in range(2 * LCM)] if each else [False] * LCM)


def _gates64(weight, gates):
    rows = weight.shape[0] // gates
    return sum(_lorth64(weight[g * rows:(g + 1) * rows]) for g in range(gates))


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.c(self.b(torch.tanh(self.a(x))))


class _Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 5, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(10, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def _lazy():
    return nn.Sequential(nn.LazyConv2d(4, 3, padding=1), nn.ReLU(), nn.LazyConv2d(2, 3, padding=1), nn.Flatten(),
                         nn.LazyLinear(3))


def _conv_lorth64(w):
    out = nn.functional.conv2d(w, w, padding=w.shape[-1] - 1)
    centre = out.shape[-1] // 2
    identity = torch.zeros_like(out)
    identity[:, :, centre, centre] = torch.eye(w.shape[0], dtype=w.dtype)
    return (out - identity).square().sum() - max(0, w.shape[0] - w.shape[1])


_HIDDEN = ("weight_hh_l0", "weight_hh_l0_reverse", "weight_hh_l1", "weight_hh_l1_reverse")
# model, types, example input, penalised tensors, float64 L_orth of them (P0's definitions)
CASES = {
    "tied": (_Tied, ["Linear"], torch.randn(2, 6), lambda gm: [gm.a.weight, gm.c.weight],
             lambda a, c: _lorth64(a) + _lorth64(c)),  # the tied weight once
    "lazy": (_lazy, ["LazyConv2d", "Conv2d", "LazyLinear", "Linear"], torch.randn(2, 3, 5, 5),
             lambda gm: [gm.get_submodule(s).weight for s in ("0", "2", "4")],
             lambda c0, c2, fc: _conv_lorth64(c0) + _conv_lorth64(c2) + _lorth64(fc)),
    "lstm": (_Tagger, ["LSTM", "Linear"], torch.randn(2, 4, 3),
             lambda gm: [getattr(gm.rnn, n) for n in _HIDDEN] + [gm.head.weight],
             lambda *w: sum(_gates64(h, 4) for h in w[:4]) + _lorth64(w[4])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tied_lazy_and_recurrent_terms_sum_to_the_full_penalty_over_a_period(case):
    make, types, x, tensors, lorth64 = CASES[case]
    torch.manual_seed(0)
    gm = orthofx.transform(make(), {"rules": [{"match": {"type": types}, "apply": "orth_regularizer",
                                               "with": {"weight": W_LORTH, "every": 3}}]}, example_inputs=(x,))
    penalised = tensors(gm)
    total = sum(orthofx.penalty(gm) for _ in range(3))
    grads = torch.autograd.grad(total, penalised)
    leaves = [t.detach().double().requires_grad_() for t in penalised]
    expected = W_LORTH * lorth64(*leaves)
    torch.testing.assert_close(total.detach().double(), expected.detach(), rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, torch.autograd.grad(expected, leaves)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert orthofx.manifest_of(gm).penalty_calls == 0


# --------------------------------------------------------------------------------------------------------- DDP

DDP_STEPS, DDP_RESUME_AT, LR = 6, 1, 0.05


def _ddp_data(rank):
    g = torch.Generator().manual_seed(50 + rank)
    return [(torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (5,), generator=g))
            for _ in range(DDP_STEPS)]


def _ddp_model():
    gm = _transformed()
    _probe(gm).seed = 0  # the same Rademacher probes on each replica and in the reference
    return gm


def _ddp_train(ddp, data, record):
    optimizer = torch.optim.SGD(ddp.parameters(), lr=LR)
    gm = ddp.module
    for x, target in data:
        loss = nn.functional.cross_entropy(ddp(x), target) + orthofx.penalty(ddp)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        record.append((orthofx.manifest_of(gm).penalty_calls, _probe(gm).calls, _probe(gm).estimate is not None))


def _ddp_job(resume: bool, rank: int) -> dict:
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    data, record = _ddp_data(rank), []
    ddp = DDP(_ddp_model())
    if resume:
        _ddp_train(ddp, data[:DDP_RESUME_AT], record)
        path = os.path.join(shared_dir(), "state.pt")
        if rank == 0:
            torch.save(ddp.state_dict(), path)
        dist.barrier()
        ddp = DDP(orthofx.transform(_plain(seed=9), POLICY, example_inputs=(X,)))
        _probe(ddp.module).seed = 0
        ddp.load_state_dict(torch.load(path, weights_only=True))  # on every rank
        data = data[DDP_RESUME_AT:]
    _ddp_train(ddp, data, record)
    return {"params": {k: v.detach().clone() for k, v in ddp.module.named_parameters()}, "record": record}


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    jobs = [(name, functools.partial(_ddp_job, resume)) for name, resume in (("straight", False), ("resume", True))]
    return run_jobs(jobs, tmp_path_factory.mktemp("every_ddp"))


def _ddp_reference(lorth_every=LORTH_EVERY):
    """One process, float64: the mean of the replicas' task losses and Jacobian estimates (each at its own
    batch, the probe set to the step's phase) plus the L_orth terms due (from their definition)."""
    gm = _ddp_model()
    phases = _phases(gm)
    probe = _probe(gm)
    optimizer = torch.optim.SGD(gm.parameters(), lr=LR)
    for s, batches in enumerate(zip(_ddp_data(0), _ddp_data(1))):
        loss = 0.0
        for x, target in batches:
            probe.calls = s % JAC_EVERY
            loss = loss + (nn.functional.cross_entropy(gm(x), target) + probe.penalty()) / len(batches)
        for site in LINEARS:
            if s % lorth_every == phases[site] % lorth_every:
                loss = loss + W_LORTH * _lorth64(gm.get_submodule(site).weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {k: v.detach() for k, v in gm.named_parameters()}


def _max_diff(a, b):
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_ddp_ranks_share_both_schedules_and_a_resumed_run_continues_them(ddp_results):
    runs = {}
    for name, ranks in ddp_results.items():
        for rank, result in enumerate(ranks):
            assert "error" not in result, f"{name} failed on rank {rank}:\n{result['error']}"
        assert ranks[0]["record"] == ranks[1]["record"], name  # the same terms and estimates on the same steps
        assert all(torch.equal(ranks[0]["params"][k], ranks[1]["params"][k]) for k in ranks[0]["params"]), name
        runs[name] = ranks[0]
    assert runs["resume"]["record"] == runs["straight"]["record"]
    assert [estimated for _, _, estimated in runs["straight"]["record"]] == [s % 2 == 0 for s in range(DDP_STEPS)]
    for key, value in runs["straight"]["params"].items():
        assert torch.equal(runs["resume"]["params"][key], value), key
    reference = _ddp_reference()
    assert _max_diff(runs["straight"]["params"], reference) <= 1e-12
    assert _max_diff(runs["straight"]["params"], _ddp_reference(lorth_every=1)) > 1e-6  # the check sees the period
