"""Transformed models under DistributedDataParallel, FSDP2 (``fully_shard``) and FSDP1: gloo, 2 processes on 127.0.0.1.

One ``torch.multiprocessing.spawn`` runs every scenario in one process group (startup is the expensive part);
each rank trains ``STEPS`` SGD steps on its own data and writes what it ends with (parameters, buffers, the data
it saw, the learning rates OLR used) to ``tmp_path``. The scenarios:

``lorth``       small_cnn, ``lorth`` preset: loss + ``orthofx.penalty(ddp_model)``;
``orthogonal``  small_cnn, ``orthogonal`` preset: hard orthogonal convs and linear;
``riemannian``  deep_linear, ``riemannian`` on every Linear, ``orthofx.attach(optimizer, ddp_model)``, momentum;
``jacobian``    deep_mlp, ``jacobian`` preset (the Jacobian isometry penalty, probes computed in DDP's forward);
``pre_svd``     gcp_cnn, ``svd`` preset: NOG + OLR on the Pre-SVD layer via ``attach``, momentum;
``dbn``         dbn_cnn, ``svd`` preset: a two-graph ``ModalGraphModule`` (decorrelated BatchNorm branches on
                ``self.training``) with NOG + OLR.

For each scenario the tests check that

* the replicas' parameters (and, after an eval forward, buffers) are bitwise identical, although each replica
  saw its own data (their losses differ);
* the result equals a **single-process reference computed here, in the test process**, on both ranks' data:
  for models without batch-coupled layers on the concatenated batch, for models with BatchNorm /
  decorrelated BatchNorm / per-call Jacobian probes on the mean of the two replicas' losses (which is what DDP
  averages: BatchNorm normalises each replica's batch with its own statistics). The reference is built by
  the same ``orthofx.transform`` with the same seed, and the same optimizer with ``attach``. Matching it shows
  that the penalty's gradient is all-reduced (averaged) like the task loss's and that NOG, OLR and the
  Riemannian updates act on the all-reduced gradient (NOG and OLR are non-linear in the gradient, so hooks on a
  replica's own gradient would give other weights and the replicas could still agree; the Riemannian tangent
  projection is linear, so for it the comparison checks the whole update, retraction and momentum transport
  included). Each comparison is checked to be sensitive: the reference
  without the hooks, or with the penalty's gradient halved / doubled (one rank's penalty only / summed instead
  of averaged), is far outside the tolerance;
* hard orthogonal layers and Riemannian weights stay orthogonal (max |sigma - 1| <= 1e-5 in float32, exact FFT
  singular values for convs; ``W W^T`` / ``W^T W`` within 1e-5 of I for linears);
* OLR actually chose ``eta* < base lr`` on some step, and chose the same lr on both replicas and in the
  reference.

Each scenario runs again under FSDP2 (``test_fsdp2_training_matches_single_process``): the same data, the same
references and sensitivity checks, on the whole parameters gathered at the end. Four run under FSDP2 with a bf16
``MixedPrecisionPolicy`` against a single-process bf16 reference (``_mixed_step``; equal to it bitwise, 7e-5 to
2e-4 away from the float32 result), and under the older ``FullyShardedDataParallel`` (FSDP1) the orthogonal and
Jacobian scenarios train like the reference while the others are refused with orthofx's error.

About 15-30 s in all on two busy cores (two interpreters importing torch; the references take ~1.5 s), so not
marked slow. The processes are spawned by :func:`ddp_util.run_jobs` (shared with test_fuzz_regressions_ddp.py),
which also makes sure nothing can hang.
"""

from __future__ import annotations

import functools

import pytest
import torch
from ddp_util import WORLD, run_jobs

STEPS = 3
LR = 0.05
# DDP's averaged float32 gradient and the reference's differ by rounding: after STEPS steps the parameters
# agree to 6e-8 (measured; 0 for the "mean" scenarios). The plausible bugs (penalty on one replica / summed,
# hooks on a replica's own gradient, no hooks) move them by 5e-4 and more; see _assert_sensitive.
REF_ATOL = 1e-6
REF_RTOL = 1e-6

# scenario -> (model name, model kwargs, per-rank batch, policy, optimizer hooks via attach, SGD momentum,
#              reference batching: "concat" (no batch-coupled layers) or "mean" (mean of the replicas' losses))
SPECS = {
    "lorth": ("small_cnn", {"width": 4}, 4, "lorth", False, 0.0, "concat"),
    "orthogonal": ("small_cnn", {"width": 4}, 4, "orthogonal", False, 0.0, "concat"),
    "riemannian": ("deep_linear", {"depth": 3, "width": 8, "in_features": 8, "out_features": 8}, 4,
                   {"rules": [{"match": {"type": "Linear"}, "apply": "riemannian"}]}, True, 0.9, "concat"),
    "jacobian": ("deep_mlp", {"depth": 2, "width": 8, "in_features": 8}, 4, "jacobian", False, 0.0, "mean"),
    "pre_svd": ("gcp_cnn", {"width": 4, "dim": 4}, 4, "svd", True, 0.9, "mean"),
    "dbn": ("dbn_cnn", {"width": 4}, 8, "svd", True, 0.9, "mean"),
}
SCENARIOS = tuple(SPECS)
# FSDP1 trains the scenarios whose orthogonality lives in the forward, and must refuse the others' (see _run_fsdp1)
FSDP1_TRAINS = ("orthogonal", "jacobian")
FSDP1_SCENARIOS = ("orthogonal", "jacobian", "lorth", "riemannian", "pre_svd")
# FSDP2 with a bf16 MixedPrecisionPolicy (the models without BatchNorm: torch's CPU batch_norm refuses bf16
# parameters with float32 running statistics, with or without orthofx)
MIXED_SCENARIOS = ("lorth", "orthogonal", "riemannian", "jacobian")
# the mixed-precision result against its own reference, and how far it must be from the float32 one (bf16
# forward and backward move the weights by about 1e-3 in these runs; see test_fsdp2_mixed_precision_...)
MIXED_ATOL = 1e-6


# ------------------------------------------------------------------------------------- shared by both sides

def _build(scenario: str):
    """(transformed model, input shape) of a scenario; the same on every rank and in the reference."""
    import orthofx
    from orthofx.nn.jacobian import JacobianProbe

    name, kwargs, _, policy, *_ = SPECS[scenario]
    torch.manual_seed(0)
    model = orthofx.models.get(name, **kwargs)
    x = torch.randn(_input_shape(scenario))
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    for module in gm.modules():
        if isinstance(module, JacobianProbe):
            module.seed = 0  # the same Rademacher probes for each replica's forward and each reference forward
    return gm, tuple(x.shape)


def _input_shape(scenario: str) -> tuple[int, ...]:
    """One replica's input batch shape."""
    import orthofx

    name, kwargs, batch, *_ = SPECS[scenario]
    if name in ("deep_linear", "deep_mlp"):  # their registered input shape is for the default in_features
        return (batch, kwargs["in_features"])
    return (batch, *orthofx.models.input_shape(name))


def _data(scenario: str, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What replica ``rank`` trains on: (input, target) per step; each replica sees its own data."""
    shape = _input_shape(scenario)
    generator = torch.Generator().manual_seed(100 + rank)
    steps = []
    for _ in range(STEPS):
        x = torch.randn(shape, generator=generator)
        if scenario == "riemannian":
            target = torch.randn(shape, generator=generator)
        else:
            target = torch.randint(0, 10, (shape[0],), generator=generator)
        steps.append((x, target))
    return steps


def _loss(scenario, output, target):
    if scenario == "riemannian":
        return (output - target).square().mean()
    return torch.nn.functional.cross_entropy(output, target)


def _optimizer(scenario, module, parameters):
    import orthofx

    *_, hooks, momentum, _ = SPECS[scenario]
    optimizer = torch.optim.SGD(parameters, lr=LR, momentum=momentum)
    handle = orthofx.attach(optimizer, module) if hooks else None
    return optimizer, handle


def _olr_lrs(optimizer) -> list[float]:
    return [float(g["orthofx_olr_lr"]) for g in optimizer.param_groups if "orthofx_olr_lr" in g]


def _orthogonality(gm) -> dict[str, float]:
    """Per layer, the largest deviation from orthogonality of what the scenario keeps orthogonal."""
    from orthofx import metrics

    found = {}
    for name, module in gm.named_modules():
        kind = type(module).__name__
        if kind == "OrthogonalConv2d":
            w = module.weight.detach()
            sv = metrics.conv_singular_values(w, 8, stride=module.stride[0], groups=module.groups)
            found[name] = float((sv - 1).abs().max())
        elif kind in ("OrthogonalLinear", "Linear") and name:
            w = module.weight.detach().double()
            gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
            found[name] = float((gram - torch.eye(gram.shape[0], dtype=gram.dtype)).abs().max())
    return found


# ------------------------------------------------------------------------------------------- worker side

def _train(scenario: str, model, optimizer, data) -> tuple[list[float], list[list[float]]]:
    """One replica's training: loss + ``orthofx.penalty(model)`` per step of ``data``; (losses, OLR lrs)."""
    import orthofx

    losses, olr = [], []
    for x, target in data:
        loss = _loss(scenario, model(x), target) + orthofx.penalty(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        olr.append(_olr_lrs(optimizer))
    return losses, olr


def _run_fsdp(scenario: str, rank: int, mixed: bool = False) -> dict:
    """The scenario under FSDP2: ``fully_shard`` on each layer the graph calls and on the root (each rank owning
    half of every parameter; the layers' parameters are resharded after their forward, so the penalty and the
    hooks meet sharded DTensors); what is compared is the whole parameters gathered at the end. ``mixed``: with
    ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`` (forward and backward on bf16 copies
    of the parameters, float32 sharded parameters, gradients and optimizer steps)."""
    from orthofx.passes.base import whole
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    gm, _ = _build(scenario)
    mesh = init_device_mesh("cpu", (WORLD,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed else None
    options = {"mesh": mesh} if policy is None else {"mesh": mesh, "mp_policy": policy}
    graphs = [gm.graph] + ([gm.other_graph] if hasattr(gm, "other_graph") else [])
    called = sorted({node.target for graph in graphs for node in graph.nodes if node.op == "call_module"})
    for name in called:
        layer = gm.get_submodule(name)
        if next(layer.parameters(recurse=False), None) is not None:
            fully_shard(layer, **options)
    fully_shard(gm, **options)
    sharded = [type(p).__name__ for p in gm.parameters()]
    optimizer, handle = _optimizer(scenario, gm, gm.parameters())
    losses, olr = _train(scenario, gm, optimizer, _data(scenario, rank))
    params = {k: whole(v).detach().clone() for k, v in gm.named_parameters()}
    plain, _ = _build(scenario)  # the gathered weights in an unsharded copy, to measure orthogonality on
    plain.load_state_dict(params, strict=False)
    return {"params": params, "losses": losses, "olr": olr, "sharded": sharded,
            "orthogonality": _orthogonality(plain),
            "hooks": [type(h).__name__ for h in (handle.hooks if handle is not None else [])]}


def _run_fsdp1(scenario: str, rank: int) -> dict:
    """The scenario under the older ``FullyShardedDataParallel`` on the CPU (root wrapped, original parameters
    exposed). What works inside the forward (hard orthogonal layers, the Jacobian penalty) trains; what reads
    whole weights outside it (the L_orth penalty, the optimizer hooks) must be refused with orthofx's error, with
    the flattened views of ``use_orig_params=True`` and of the default alike."""
    import orthofx
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if scenario not in FSDP1_TRAINS:
        refusals = {}
        for use_orig_params in (True, False):
            gm, shape = _build(scenario)
            model = FSDP(gm, device_id=torch.device("cpu"), use_orig_params=use_orig_params)
            optimizer = torch.optim.SGD(model.parameters(), lr=LR)
            try:
                if SPECS[scenario][4]:
                    orthofx.attach(optimizer, model)
                else:
                    model(torch.randn(shape))
                    orthofx.penalty(model)
            except orthofx.OrthofxError as error:
                refusals[use_orig_params] = str(error)
        return {"refusals": refusals}
    gm, _ = _build(scenario)
    model = FSDP(gm, device_id=torch.device("cpu"), use_orig_params=True)
    optimizer, handle = _optimizer(scenario, model, model.parameters())
    losses, olr = _train(scenario, model, optimizer, _data(scenario, rank))
    with FSDP.summon_full_params(model):
        params = {k: v.detach().clone() for k, v in gm.named_parameters()}
        orthogonality = _orthogonality(gm)
    return {"params": params, "losses": losses, "orthogonality": orthogonality}


def _run(scenario: str, rank: int) -> dict:
    import orthofx
    from torch.nn.parallel import DistributedDataParallel as DDP

    gm, shape = _build(scenario)
    initial = {k: v.detach().clone() for k, v in gm.named_parameters()}
    ddp = DDP(gm)
    optimizer, handle = _optimizer(scenario, ddp, ddp.parameters())
    data = _data(scenario, rank)
    losses, olr = _train(scenario, ddp, optimizer, data)
    params = {k: v.detach().clone() for k, v in gm.named_parameters()}
    moved = max(float((params[k] - initial[k]).abs().max()) for k in params)
    fixed = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        evaluation = ddp.eval()(fixed)  # DDP broadcasts rank 0's buffers first
        # the untransformed model with the replica's weights and (broadcast) buffers: the eval reference
        reference = orthofx.models.get("dbn_cnn", width=4) if scenario == "dbn" else None
        if reference is not None:
            reference.load_state_dict(gm.state_dict(), strict=False)
            reference = reference.eval()(fixed)
    ddp.train()
    buffers = {k: v.detach().clone() for k, v in gm.named_buffers()}
    return {"params": params, "buffers": buffers, "data": data, "losses": losses, "moved": moved, "olr": olr,
            "orthogonality": _orthogonality(gm), "eval": evaluation, "eval_reference": reference,
            "modal": isinstance(gm, orthofx.capture.ModalGraphModule),
            "hooks": [type(h).__name__ for h in (handle.hooks if handle is not None else [])],
            "olr_groups": sum(1 for g in optimizer.param_groups if "orthofx_olr" in g)}


def _run_fsdp_mixed(scenario: str, rank: int) -> dict:
    return _run_fsdp(scenario, rank, mixed=True)


WRAPPERS = (("ddp", _run, SCENARIOS), ("fsdp", _run_fsdp, SCENARIOS), ("fsdp1", _run_fsdp1, FSDP1_SCENARIOS),
            ("fsdp_mixed", _run_fsdp_mixed, MIXED_SCENARIOS))


# --------------------------------------------------------------------------------------------- test side

@pytest.fixture(scope="module")
def ddp_results(all_results):
    return all_results["ddp"]


@pytest.fixture(scope="module")
def fsdp_results(all_results):
    return all_results["fsdp"]


@pytest.fixture(scope="module")
def all_results(tmp_path_factory):
    jobs = [(f"{wrapper}_{scenario}", functools.partial(run, scenario))
            for wrapper, run, scenarios in WRAPPERS for scenario in scenarios]
    results = run_jobs(jobs, tmp_path_factory.mktemp("ddp"))
    return {wrapper: {scenario: results[f"{wrapper}_{scenario}"] for scenario in scenarios}
            for wrapper, _, scenarios in WRAPPERS}


@pytest.fixture(scope="module")
def references(ddp_results):
    """Single-process references, computed lazily per (scenario, variant) in this process."""
    cache = {}

    def get(scenario, **variant):
        key = (scenario, tuple(sorted(variant.items())))
        if key not in cache:
            data = [ddp_results[scenario][r]["data"] for r in range(WORLD)]
            cache[key] = _reference(scenario, data, **variant)
        return cache[key]

    return get


def _mixed_step(scenario, gm, low, step, penalty_scale: float) -> None:
    """The gradients of one FSDP2 mixed-precision step, into ``gm``'s float32 parameters: each replica's forward
    and backward on a bf16 copy of the parameters (``low``) and a bf16 input, its gradients cast to float32 and
    averaged over replicas; the Jacobian penalty is estimated in that bf16 forward, the weight penalties
    (L_orth) are taken on the float32 parameters, as FSDP2 keeps them outside the forward."""
    import orthofx

    low_params = dict(low.named_parameters())
    for name, p in gm.named_parameters():
        low_params[name].data = p.detach().to(torch.bfloat16)
    in_forward = SPECS[scenario][3] == "jacobian"
    for x, target in step:
        low.zero_grad(set_to_none=True)
        loss = _loss(scenario, low(x.to(torch.bfloat16)), target)
        if in_forward:
            loss = loss + penalty_scale * orthofx.penalty(low)
        loss.backward()
        for name, p in gm.named_parameters():
            grad = low_params[name].grad
            if grad is not None:
                grad = grad.float() / len(step)
                p.grad = grad if p.grad is None else p.grad + grad
    penalty = orthofx.penalty(gm)
    if not in_forward and penalty.requires_grad:  # (without terms the penalty is a constant zero)
        (penalty_scale * penalty).backward()


def _reference(scenario, data, *, penalty_scale: float = 1.0, hooks: bool = True, mixed: bool = False) -> dict:
    """Train the scenario's model in this process on both replicas' data: on the concatenated batch, or on the
    mean of the per-replica losses (see the module docstring); ``mixed``: FSDP2's bf16 mixed precision
    (:func:`_mixed_step`). ``penalty_scale`` and ``hooks=False`` give the wrong results a broken DDP integration
    would produce (used to check the comparison's sensitivity)."""
    import orthofx

    batching = SPECS[scenario][-1]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gm, _ = _build(scenario)
        low = _build(scenario)[0] if mixed else None
        optimizer = torch.optim.SGD(gm.parameters(), lr=LR, momentum=SPECS[scenario][5])
        if SPECS[scenario][4] and hooks:
            orthofx.attach(optimizer, gm)
        olr = []
        for step in zip(*data):
            if mixed:
                optimizer.zero_grad(set_to_none=True)
                _mixed_step(scenario, gm, low, step, penalty_scale)
                optimizer.step()
                olr.append(_olr_lrs(optimizer))
                continue
            if batching == "concat":
                x = torch.cat([x for x, _ in step])
                target = torch.cat([t for _, t in step])
                loss = _loss(scenario, gm(x), target) + penalty_scale * orthofx.penalty(gm)
            else:
                loss = 0.0
                for x, target in step:  # the penalty right after each forward (Jacobian probes estimate there)
                    replica = _loss(scenario, gm(x), target) + penalty_scale * orthofx.penalty(gm)
                    loss = loss + replica / len(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            olr.append(_olr_lrs(optimizer))
    finally:
        torch.set_num_threads(threads)
    return {"params": {k: v.detach().clone() for k, v in gm.named_parameters()}, "olr": olr}


def _replicas(results, scenario):
    ranks = results[scenario]
    for rank, result in enumerate(ranks):
        assert "error" not in result, f"{scenario} failed on rank {rank}:\n{result['error']}"
    return ranks


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, NaN equal to NaN (an unset entry of a monitor's history)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def _assert_identical(ranks):
    first, second = ranks[0]["params"], ranks[1]["params"]
    assert first.keys() == second.keys() and first
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert not different, f"replicas differ in {different}"
    assert ranks[0]["buffers"].keys() == ranks[1]["buffers"].keys()
    # DDP broadcasts rank 0's buffers at each forward, so after the eval forward they agree (NaN where unset)
    different = [k for k, v in ranks[0]["buffers"].items() if not _same(v, ranks[1]["buffers"][k])]
    assert not different, f"replicas' buffers differ in {different}"
    assert ranks[0]["moved"] > 1e-3, "training hardly changed the parameters"
    assert all(torch.isfinite(v).all() for v in first.values())
    # each replica saw its own data, so the losses differ while the parameters agree
    assert not torch.equal(ranks[0]["data"][0][0], ranks[1]["data"][0][0])
    assert ranks[0]["losses"] != ranks[1]["losses"]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _assert_matches_reference(ranks, reference):
    params = ranks[0]["params"]
    assert params.keys() == reference["params"].keys()
    for name in params:
        torch.testing.assert_close(params[name], reference["params"][name], atol=REF_ATOL, rtol=REF_RTOL,
                                   msg=lambda m, name=name: f"{name}: DDP differs from the reference: {m}")


def _assert_sensitive(ranks, wrong, what):
    """The reference comparison can tell ``wrong`` (a plausible bug's result) from the DDP result."""
    diff = _max_diff(ranks[0]["params"], wrong["params"])
    assert diff > 100 * REF_ATOL, f"the comparison could not detect {what} (max diff {diff:.2e})"


def _check_penalty_allreduced(ranks, scenario, references):
    _assert_matches_reference(ranks, references(scenario))
    _assert_sensitive(ranks, references(scenario, penalty_scale=0.5), "the penalty on one replica only")
    _assert_sensitive(ranks, references(scenario, penalty_scale=2.0), "the penalty summed over replicas")


def test_lorth_penalty_allreduced_like_the_task_loss(ddp_results, references):
    ranks = _replicas(ddp_results, "lorth")
    _assert_identical(ranks)
    _check_penalty_allreduced(ranks, "lorth", references)


def test_orthogonal_replicas_identical_and_layers_orthogonal(ddp_results, references):
    ranks = _replicas(ddp_results, "orthogonal")
    _assert_identical(ranks)
    for rank in ranks:
        orthogonality = rank["orthogonality"]
        assert set(orthogonality) == {"conv1", "conv2", "conv3", "fc"}
        assert max(orthogonality.values()) <= 1e-5, orthogonality
    _assert_matches_reference(ranks, references("orthogonal"))


def test_riemannian_attach_matches_single_process_and_stays_orthonormal(ddp_results, references):
    ranks = _replicas(ddp_results, "riemannian")
    _assert_identical(ranks)
    assert ranks[0]["hooks"] == ["StiefelHook"] * 3
    for rank in ranks:
        orthogonality = rank["orthogonality"]
        assert set(orthogonality) == {"layers.0", "layers.1", "layers.2"}
        assert max(orthogonality.values()) <= 1e-5, orthogonality
    _assert_matches_reference(ranks, references("riemannian"))
    _assert_sensitive(ranks, references("riemannian", hooks=False), "missing Riemannian updates")


def test_jacobian_penalty_allreduced_like_the_task_loss(ddp_results, references):
    ranks = _replicas(ddp_results, "jacobian")
    _assert_identical(ranks)
    _check_penalty_allreduced(ranks, "jacobian", references)


def _check_nog_olr(ranks, scenario, references):
    assert sorted(ranks[0]["hooks"]) == ["NearestOrthogonalGradient", "OptimalLearningRate"]
    assert ranks[0]["olr_groups"] == 1
    reference = references(scenario)
    _assert_matches_reference(ranks, reference)
    _assert_sensitive(ranks, references(scenario, hooks=False), "missing NOG / OLR")
    # OLR chose one lr per step, the same on both replicas and in the reference, and eta* < base lr at least once
    # (otherwise OLR would have been a no-op and the comparison would say nothing about it)
    assert ranks[0]["olr"] == ranks[1]["olr"]
    assert all(len(lrs) == 1 for lrs in ranks[0]["olr"])
    torch.testing.assert_close(torch.tensor(ranks[0]["olr"]), torch.tensor(reference["olr"]), rtol=1e-4, atol=0)
    assert any(lrs[0] < LR for lrs in ranks[0]["olr"]), ranks[0]["olr"]


def test_pre_svd_nog_olr_act_on_the_allreduced_gradient(ddp_results, references):
    ranks = _replicas(ddp_results, "pre_svd")
    _assert_identical(ranks)
    _check_nog_olr(ranks, "pre_svd", references)


def test_two_mode_model_replicas_identical_with_the_running_whitening_in_eval(ddp_results, references):
    ranks = _replicas(ddp_results, "dbn")
    _assert_identical(ranks)
    assert ranks[0]["modal"] and ranks[1]["modal"]
    _check_nog_olr(ranks, "dbn", references)
    assert torch.equal(ranks[0]["eval"], ranks[1]["eval"]) and torch.isfinite(ranks[0]["eval"]).all()
    for rank in ranks:  # eval ran the eval graph: the original model's running whitening
        torch.testing.assert_close(rank["eval"], rank["eval_reference"], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ FSDP2

@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fsdp2_training_matches_single_process(scenario, fsdp_results, references):
    """Under ``fully_shard`` (each rank holds half of every parameter as a DTensor) the penalty, the orthogonal
    layers and the optimizer hooks (which gather whole matrices, ``passes.base.whole``) give the single-process
    reference's weights, the same on both ranks; each comparison tells the plausible bugs apart."""
    ranks = _replicas(fsdp_results, scenario)
    assert all(kind == "DTensor" for kind in ranks[0]["sharded"]) and ranks[0]["sharded"]
    first, second = ranks[0]["params"], ranks[1]["params"]
    assert not [k for k in first if not torch.equal(first[k], second[k])]
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each rank trained on its own data
    _assert_matches_reference(ranks, references(scenario))
    name, _, _, policy, hooks, _, batching = SPECS[scenario]
    if hooks:
        _assert_sensitive(ranks, references(scenario, hooks=False), "missing optimizer hooks")
        assert ranks[0]["hooks"] and ranks[0]["hooks"] == ranks[1]["hooks"]
    if policy in ("lorth", "jacobian"):
        _assert_sensitive(ranks, references(scenario, penalty_scale=0.5), "the penalty on one rank only")
        _assert_sensitive(ranks, references(scenario, penalty_scale=2.0), "the penalty summed over ranks")
    if scenario in ("pre_svd", "dbn"):  # OLR: one lr per step from the whole weight and gradient
        assert ranks[0]["olr"] == ranks[1]["olr"]
        torch.testing.assert_close(torch.tensor(ranks[0]["olr"]), torch.tensor(references(scenario)["olr"]),
                                   rtol=1e-4, atol=0)
    if scenario in ("orthogonal", "riemannian"):
        for rank in ranks:
            assert rank["orthogonality"] and max(rank["orthogonality"].values()) <= 1e-5, rank["orthogonality"]


@pytest.mark.parametrize("scenario", MIXED_SCENARIOS)
def test_fsdp2_mixed_precision_matches_a_bf16_reference(scenario, all_results, references):
    """FSDP2 with a bf16 ``MixedPrecisionPolicy``: the result is the single-process computation with bf16
    forward and backward and float32 weights, penalties on the float32 weights and hooks (:func:`_mixed_step`);
    it is far from the float32 result (so bf16 was really used); orthogonal layers and Riemannian weights (the
    float32 sharded parameters) stay orthogonal to float32 accuracy."""
    ranks = _replicas(all_results["fsdp_mixed"], scenario)
    first, second = ranks[0]["params"], ranks[1]["params"]
    assert not [k for k in first if not torch.equal(first[k], second[k])]
    assert all(v.dtype == torch.float32 for v in first.values())
    mixed = references(scenario, mixed=True)
    diff = _max_diff(first, mixed["params"])
    assert diff <= MIXED_ATOL, f"{scenario}: FSDP2 mixed precision differs from its reference by {diff:.2e}"
    away = _max_diff(first, references(scenario)["params"])
    assert away > 20 * MIXED_ATOL, f"{scenario}: the bf16 run is {away:.2e} from the float32 one"
    if SPECS[scenario][4]:
        assert ranks[0]["hooks"]
        assert _max_diff(first, references(scenario, mixed=True, hooks=False)["params"]) > 20 * MIXED_ATOL
    if SPECS[scenario][3] in ("lorth", "jacobian"):
        assert _max_diff(first, references(scenario, mixed=True, penalty_scale=2.0)["params"]) > 20 * MIXED_ATOL
    if scenario in ("orthogonal", "riemannian"):
        for rank in ranks:
            assert rank["orthogonality"] and max(rank["orthogonality"].values()) <= 1e-5, rank["orthogonality"]


# ------------------------------------------------------------------------------------------------ FSDP1

@pytest.mark.parametrize("scenario", FSDP1_TRAINS)
def test_fsdp1_trains_what_works_in_the_forward(scenario, all_results, references):
    """Under the older ``FullyShardedDataParallel`` the hard orthogonal layers and the Jacobian penalty (both
    computed inside the forward, where FSDP1 has unsharded the weights) give the single-process reference."""
    ranks = _replicas(all_results["fsdp1"], scenario)
    first, second = ranks[0]["params"], ranks[1]["params"]
    assert first and not [k for k in first if not torch.equal(first[k], second[k])]
    assert ranks[0]["losses"] != ranks[1]["losses"]
    _assert_matches_reference(ranks, references(scenario))
    if scenario == "jacobian":
        _assert_sensitive(ranks, references(scenario, penalty_scale=0.5), "the penalty on one rank only")
        _assert_sensitive(ranks, references(scenario, penalty_scale=2.0), "the penalty summed over ranks")
    else:
        for rank in ranks:
            assert rank["orthogonality"] and max(rank["orthogonality"].values()) <= 1e-5, rank["orthogonality"]


@pytest.mark.parametrize("scenario", [s for s in FSDP1_SCENARIOS if s not in FSDP1_TRAINS])
def test_fsdp1_refuses_what_reads_whole_weights_outside_the_forward(scenario, all_results):
    """The L_orth penalty and the optimizer hooks would read FSDP1's flattened shards (a 1-d slice per rank, or a
    view the optimizer does not update): ``orthofx.penalty`` and ``orthofx.attach`` refuse, naming the site and
    the fix, whether or not FSDP1 exposes the original parameters."""
    for rank in _replicas(all_results["fsdp1"], scenario):
        refusals = rank["refusals"]
        assert set(refusals) == {True, False}, refusals
        for message in refusals.values():
            assert "FSDP1" in message and "fully_shard" in message and "site '" in message, message
