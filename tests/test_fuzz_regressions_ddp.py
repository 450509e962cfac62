"""Fuzzing orthofx under DistributedDataParallel beyond tests/test_ddp.py (gloo, 2 processes on 127.0.0.1, CPU).

One spawn (:func:`ddp_util.run_jobs`) runs every configuration below in one process group; each job returns what
its rank ended with, and the tests compare it with a single-process reference computed here on both ranks' data
(float64 where the check allows, so that the comparison is tight: the all-reduce of two float64 gradients and the
reference's gradient of the concatenated batch differ by rounding only), or replica with replica.

``accumulate``  gradient accumulation with ``ddp.no_sync()`` (2 micro-batches per step, the last one synchronised)
                and the hooks ``orthofx.attach`` runs (Riemannian on one Linear, NOG + OLR on another), SGD with
                momentum: equal to a single process that accumulates the gradients of the concatenated
                micro-batches (float64), Riemannian weights orthonormal to 1e-5 in float32, and the same with
                ``gradient_as_bucket_view=True`` (the hooks rewrite gradients that are views of DDP's buckets);
``jacobian``    the Jacobian regulariser with ``every: 2`` and ``per_sample`` (steps without an estimate, where the
                penalty is a zero), under plain DDP, ``find_unused_parameters=True`` and ``static_graph=True``:
                no DDP error, replicas in sync, each rank's penalty equal to the reference's;
``convnorm``    the convnorm preset with running filters (``momentum=0.1``, one per FFT grid, made by the first
                forward of an input size, so after DDP was built; not buffers, so DDP does not broadcast them) and
                a buffer of the model's own, so that DDP broadcasts buffers before each forward: in sync and equal
                to the reference when every rank sees the same size at a step; when the ranks train on sizes of
                their own (in a spawn of its own: ranks that held different buffer sets aborted in DDP's
                broadcast), no abort, and each rank's running filters are the exponential average of the filters
                of the reference's weights at the steps that rank trained on each size;
``syncbn``      replicas trained apart first (weights, BatchNorm statistics, the orthogonal layers' eval-mode kernel
                cache), then wrapped: DDP's initial broadcast must leave identical replicas, no stale cache; and
                ``SyncBatchNorm.convert_sync_batchnorm`` of a transformed model (BatchNorm inside a JacobianProbe's
                block too): converted, it trains like the unconverted model in one process, while DDP refuses
                SyncBatchNorm on the CPU (torch: GPU modules only), so the synchronised statistics are not
                tested here;
``modes``       the orthogonal and lorth presets with ``find_unused_parameters=True`` and ``static_graph=True``;
``checkpoint``  ``orthofx.export`` of the DDP-wrapped model on rank 0 (``ddp.module`` and the wrapper itself) and
                ``orthofx.load`` on both ranks, with the optimizer state (OLR's own param group, momentum), then
                training on: the same as training on without the checkpoint;
``zero``        ``ZeroRedundancyOptimizer`` (sharded optimizer state) with the Riemannian, NOG and OLR hooks: equal
                to the single-process run when the Pre-SVD weight has a param group of its own; OLR's split of a
                group ZeRO already partitioned, and ZeRO overlapped with DDP (no ``step()`` call, so no hook),
                refused at attach.

About 30 s on two busy cores (the spawned jobs ~15 s, the references the rest); marked slow.
"""

from __future__ import annotations

import contextlib
import functools
import os

import pytest
import torch
from ddp_util import WORLD, run_jobs, shared_dir
from torch import nn

import orthofx
import orthofx.passes.pre_svd  # noqa: F401  (registers the pass)
import orthofx.passes.riemannian  # noqa: F401  (registers the pass)

# one intra-op thread for the references computed here (tiny tensors; see conftest.one_thread)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

LR = 0.05
STEPS = 3
F64_ATOL = 1e-10  # float64 all-reduce vs the reference: ~1e-16 measured; the plausible bugs move weights by > 1e-3
F32_ATOL = 1e-6   # float32: ~1e-7 measured


# ------------------------------------------------------------------------------------------ shared by both sides

def _transformed(name: str, kwargs: dict, policy, shape: tuple, dtype=torch.float64):
    """The transformed built-in model, the same on every rank and in the reference (seeded)."""
    torch.manual_seed(0)
    model = orthofx.models.get(name, **kwargs).to(dtype)
    return orthofx.transform(model, policy, example_inputs=(torch.randn(shape, dtype=dtype),))


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _olr_lrs(optimizer) -> list[float]:
    return [float(g["orthofx_olr_lr"]) for g in optimizer.param_groups if "orthofx_olr_lr" in g]


def _gram_defect(weight: torch.Tensor) -> float:
    """max |W W^T - I| (or W^T W for a tall W), in float64."""
    w = weight.detach().double()
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return float((gram - torch.eye(gram.shape[0], dtype=gram.dtype)).abs().max())


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _ok(results, job: str) -> list[dict]:
    ranks = results[job]
    for rank, result in enumerate(ranks):
        assert "error" not in result, f"{job} failed on rank {rank}:\n{result['error']}"
    return ranks


def _assert_replicas_identical(ranks, key="params"):
    first, second = ranks[0][key], ranks[1][key]
    assert first.keys() == second.keys() and first
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert not different, f"replicas differ in {key}: {different}"


# ----------------------------------------------------------------------------------- accumulate (no_sync + hooks)

ACC_MODEL = ("deep_linear", {"depth": 3, "width": 8, "in_features": 8, "out_features": 8})
ACC_POLICY = {"rules": [{"match": {"name": "layers.0"}, "apply": "riemannian"},
                        {"match": {"name": "layers.1"}, "apply": "pre_svd", "with": {"nog": True, "olr": True}}]}
MICRO, MICRO_BATCH = 2, 3
ACC_VARIANTS = {"float64": (torch.float64, {}), "float32": (torch.float32, {}),
                "bucket_view": (torch.float32, {"gradient_as_bucket_view": True})}


def _acc_model(dtype):
    return _transformed(*ACC_MODEL, ACC_POLICY, (MICRO_BATCH, 8), dtype)


def _acc_data(rank: int, dtype) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per step, the replica's ``MICRO`` micro-batches (input, regression target)."""
    generator = torch.Generator().manual_seed(200 + rank)
    return [[(torch.randn(MICRO_BATCH, 8, generator=generator, dtype=dtype),
              torch.randn(MICRO_BATCH, 8, generator=generator, dtype=dtype)) for _ in range(MICRO)]
            for _ in range(STEPS)]


def _acc_optimizer(model, hooks: bool = True):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    handle = orthofx.attach(optimizer, model) if hooks else None
    return optimizer, handle


def _accumulate(variant: str, rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    dtype, options = ACC_VARIANTS[variant]
    gm = _acc_model(dtype)
    ddp = DDP(gm, **options)
    optimizer, handle = _acc_optimizer(ddp)
    data = _acc_data(rank, dtype)
    olr = []
    for micro in data:
        optimizer.zero_grad(set_to_none=True)
        for k, (x, target) in enumerate(micro):
            # the gradients of the first micro-batches accumulate locally; the last backward all-reduces the sum
            with contextlib.nullcontext() if k == len(micro) - 1 else ddp.no_sync():
                loss = (ddp(x) - target).square().mean() + orthofx.penalty(ddp)
                loss.backward()
        optimizer.step()
        olr.append(_olr_lrs(optimizer))
    return {"params": _params(gm), "data": data, "olr": olr, "hooks": sorted(type(h).__name__ for h in handle.hooks),
            "defect": _gram_defect(gm.get_submodule("layers.0").weight)}


def _acc_reference(data, dtype, *, hooks: bool = True, last_only: bool = False) -> dict:
    """One process, the replicas' micro-batches concatenated, their gradients accumulated over the micro-batches
    (``last_only``: only the last one's, what a DDP that dropped the accumulated gradient would step with)."""
    gm = _acc_model(dtype)
    optimizer, _ = _acc_optimizer(gm, hooks)
    olr = []
    for step in zip(*data):
        optimizer.zero_grad(set_to_none=True)
        for k, micro in enumerate(zip(*step)):
            if last_only and k < MICRO - 1:
                continue
            x = torch.cat([x for x, _ in micro])
            target = torch.cat([t for _, t in micro])
            ((gm(x) - target).square().mean() + orthofx.penalty(gm)).backward()
        optimizer.step()
        olr.append(_olr_lrs(optimizer))
    return {"params": _params(gm), "olr": olr}


# --------------------------------------------------------------------------- jacobian (every: 2, per_sample)

JAC_MODEL = ("deep_mlp", {"depth": 2, "width": 8, "in_features": 8})
JAC_EVERY = 2
JAC_POLICY = {"rules": [{"match": {"kind": "block", "name": "layers"}, "apply": "jacobian_isometry",
                         "with": {"weight": 0.1, "every": JAC_EVERY, "per_sample": True, "normalize": True}}]}
JAC_STEPS = 4  # two steps with an estimate, two without
DDP_MODES = {"default": {}, "find_unused": {"find_unused_parameters": True}, "static": {"static_graph": True}}


def _jac_model():
    from orthofx.nn.jacobian import JacobianProbe

    gm = _transformed(*JAC_MODEL, JAC_POLICY, (4, 8))
    probes = [m for m in gm.modules() if isinstance(m, JacobianProbe)]
    assert len(probes) == 1
    probes[0].seed = 0  # the same Rademacher probes on each replica and in the reference
    return gm, probes[0]


def _jac_data(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(300 + rank)
    return [(torch.randn(4, 8, generator=generator, dtype=torch.float64),
             torch.randint(0, 10, (4,), generator=generator)) for _ in range(JAC_STEPS)]


def _jacobian(mode: str, rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    gm, probe = _jac_model()
    ddp = DDP(gm, **DDP_MODES[mode])
    optimizer = torch.optim.SGD(ddp.parameters(), lr=LR)
    data = _jac_data(rank)
    penalties = []
    for x, target in data:
        output = ddp(x)
        penalty = orthofx.penalty(ddp)
        loss = nn.functional.cross_entropy(output, target) + penalty
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        penalties.append(float(penalty.detach()))
    return {"params": _params(gm), "data": data, "penalties": penalties}


def _jac_reference(data, *, every: int = JAC_EVERY, penalty_scale: float = 1.0) -> dict:
    """The mean of the replicas' losses (each replica's penalty estimated right after its own forward, as the
    probes are per call), the probe's step phase reset for each replica's forward."""
    gm, probe = _jac_model()
    probe.every = every
    optimizer = torch.optim.SGD(gm.parameters(), lr=LR)
    penalties = []
    for s, step in enumerate(zip(*data)):
        loss, replica_penalties = 0.0, []
        for x, target in step:
            probe.calls = s % every  # each replica's forward is the step's first call of the block
            output = gm(x)
            penalty = orthofx.penalty(gm)
            replica_penalties.append(float(penalty.detach()))
            loss = loss + (nn.functional.cross_entropy(output, target) + penalty_scale * penalty) / len(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        penalties.append(replica_penalties)
    return {"params": _params(gm), "penalties": penalties}


# ------------------------------------------------------------------------- convnorm (running filters per grid)

CN_SIZES = {"same": [[(8, 8), (12, 12), (8, 8)]] * WORLD,   # both ranks: the same size at each step
            "per_rank": [[(8, 8), (12, 12), (8, 8)], [(8, 8), (10, 10), (8, 8)]]}   # 12 x 12 and 10 x 10: one rank
CN_EVAL_SIZES = ((8, 8), (12, 12), (10, 10))  # the last one never trained on in "same": V of the current weight
CN_MOMENTUM = 0.1


def _cn_model():
    from orthofx.nn.convnorm import ConvNormConvNd

    gm = _transformed("small_cnn", {"width": 4}, "convnorm", (2, 1, 8, 8))
    layers = [m for m in gm.modules() if isinstance(m, ConvNormConvNd)]
    assert len(layers) == 3
    for layer in layers:
        layer.momentum = CN_MOMENTUM  # P3's running filters (the preset recomputes V and keeps none)
    return gm


def _cn_data(rank: int, sizes) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(400 + rank)
    return [(torch.randn(4, 1, *size, generator=generator, dtype=torch.float64),
             torch.randint(0, 10, (4,), generator=generator)) for size in sizes]


def _cn_eval(model) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        return [model(torch.randn(2, 1, *size, generator=generator, dtype=torch.float64)) for size in CN_EVAL_SIZES]


def _cn_running(model) -> dict[str, torch.Tensor]:
    """The running filters, by state_dict key (they are state, not buffers)."""
    return {k: v.clone() for k, v in model.state_dict().items() if ".running_v_" in k}


def _convnorm(case: str, rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    gm = _cn_model()
    # a buffer of the model's own (a BatchNorm's statistics would do the same): DDP then broadcasts rank 0's buffers
    # before every forward, where ranks holding different sets of running-filter buffers aborted
    gm.register_buffer("steps", torch.zeros((), dtype=torch.int64))
    ddp = DDP(gm)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=LR)
    data = _cn_data(rank, CN_SIZES[case][rank])
    for x, target in data:
        loss = nn.functional.cross_entropy(ddp(x), target) + orthofx.penalty(ddp)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        gm.steps += 1
    evaluation = _cn_eval(ddp.eval())
    return {"params": _params(gm), "running": _cn_running(gm), "buffers": [n for n, _ in gm.named_buffers()],
            "data": data, "eval": evaluation}


def _cn_reference(data) -> dict:
    gm = _cn_model()
    optimizer = torch.optim.SGD(gm.parameters(), lr=LR)
    for step in zip(*data):
        x = torch.cat([x for x, _ in step])
        target = torch.cat([t for _, t in step])
        loss = nn.functional.cross_entropy(gm(x), target) + orthofx.penalty(gm)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {"params": _params(gm), "running": _cn_running(gm), "eval": _cn_eval(gm.eval())}


def _cn_grids(size: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """The FFT grid of each ConvNorm layer of small_cnn for an input size: 3 x 3 kernels with padding 1 have the
    grid ``n + 2`` (stride-1 correlation padded by 2 on each side); conv2 has stride 2, so conv3 sees
    ``(n - 1) // 2 + 1``."""
    n = size[0]
    half = (n - 1) // 2 + 1
    return {"conv1": (n + 2, n + 2), "conv2": (n + 2, n + 2), "conv3": (half + 2, half + 2)}


def _dense_filter(weight: torch.Tensor, grid: tuple[int, int], eps: float) -> torch.Tensor:
    """ConvNorm's V from a dense FFT of the zero-padded kernel (float64): (sum_c |K_hat_mc|^2 + eps)^(-1/2)."""
    spectrum = torch.fft.rfft2(weight.detach().double(), s=grid)
    return (spectrum.abs().square().sum(1) + eps).rsqrt()


def _cn_per_rank_reference(data) -> dict:
    """One process that steps with the mean of both ranks' losses (what DDP's averaged gradient is; the ranks'
    inputs differ in size, so they cannot be concatenated), and each rank's running filters recomputed from the
    weights before each step: per layer and grid, V of the weights at the first step that rank trained on the
    grid, then ``(1 - m) running + m V`` at each later one (independent of orthofx's filter code)."""
    gm = _cn_model()
    eps = {name: gm.get_submodule(name).eps for name in ("conv1", "conv2", "conv3")}
    optimizer = torch.optim.SGD(gm.parameters(), lr=LR)
    running = [{} for _ in data]
    for step in zip(*data):
        for rank, (x, _) in enumerate(step):
            for name, grid in _cn_grids(tuple(x.shape[2:])).items():
                v = _dense_filter(gm.get_submodule(name).weight, grid, eps[name])
                key = f"{name}.running_v_{grid[0]}x{grid[1]}"
                old = running[rank].get(key)
                running[rank][key] = v if old is None else (1 - CN_MOMENTUM) * old + CN_MOMENTUM * v
        losses = [nn.functional.cross_entropy(gm(x), target) for x, target in step]
        loss = sum(losses) / len(losses) + orthofx.penalty(gm)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {"params": _params(gm), "running": running}


# --------------------------------------------------------------------------------------- syncbn (conversion)

def _bn_mlp() -> nn.Module:
    """A top-level Sequential holding BatchNorm (the jacobian preset wraps it in a JacobianProbe) and a head."""
    return nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Tanh()), nn.Linear(8, 4))


SYNCBN_CASES = {"orthogonal": (("gcp_cnn", {"width": 4, "dim": 4}), "orthogonal", (4, 1, 8, 8)),
                "jacobian": (None, "jacobian", (4, 8))}


def _syncbn_model(case: str):
    from orthofx.nn.jacobian import JacobianProbe

    source, policy, shape = SYNCBN_CASES[case]
    if source is None:
        torch.manual_seed(0)
        gm = orthofx.transform(_bn_mlp().double(), policy, example_inputs=(torch.randn(shape, dtype=torch.float64),))
        probes = [m for m in gm.modules() if isinstance(m, JacobianProbe)]
        assert len(probes) == 1
        probes[0].seed = 0  # the same probes in each run compared
        return gm
    return _transformed(*source, policy, shape)


def _syncbn_input(case: str, seed: int) -> torch.Tensor:
    return torch.randn(SYNCBN_CASES[case][2], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _syncbn(case: str, rank: int) -> dict:
    """Replicas trained apart, then wrapped: DDP's first broadcast must make them identical (orthogonal layers
    cache their kernel in an eval forward without gradients, keyed by the parameters' version counters, which
    the broadcast's in-place writes must invalidate). Then convert_sync_batchnorm + DDP, which torch refuses on
    the CPU."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    gm = _syncbn_model(case)
    # each replica trains one step on its own (weights and running statistics diverge), then evaluates once
    # without gradients: orthogonal layers cache their kernel there
    optimizer = torch.optim.SGD(gm.parameters(), lr=LR)
    out = gm(_syncbn_input(case, 500 + rank))
    (out.square().mean() + orthofx.penalty(gm)).backward()
    optimizer.step()
    fixed = _syncbn_input(case, 9)
    with torch.no_grad():
        apart = gm.eval()(fixed)
    ddp = DDP(gm)  # broadcasts rank 0's parameters and buffers
    with torch.no_grad():
        evaluation = ddp(fixed)  # still in eval mode
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(_syncbn_model(case))
    kinds = sorted({type(m).__name__ for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)})
    try:
        DDP(converted)
        refused = None
    except ValueError as error:
        refused = str(error)
    return {"params": _params(gm), "buffers": {k: v.clone() for k, v in gm.named_buffers()}, "apart": apart,
            "eval": evaluation, "kinds": kinds, "refused": refused}


def _syncbn_train(model, case: str) -> dict:
    """Two single-process training steps (loss + penalty), for the converted / unconverted comparison."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for seed in (11, 12):
        loss = model(_syncbn_input(case, seed)).square().mean() + orthofx.penalty(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {**_params(model), **{k: v.clone() for k, v in model.named_buffers()}}


# ---------------------------------------------------------------------- modes (find_unused / static_graph)

MODE_PRESETS = ("orthogonal", "lorth")


def _modes_data(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(600 + rank)
    return [(torch.randn(4, 1, 8, 8, generator=generator, dtype=torch.float64),
             torch.randint(0, 10, (4,), generator=generator)) for _ in range(STEPS)]


def _modes(preset: str, mode: str, rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    gm = _transformed("small_cnn", {"width": 4}, preset, (2, 1, 8, 8))
    ddp = DDP(gm, **DDP_MODES[mode])
    optimizer = torch.optim.SGD(ddp.parameters(), lr=LR)
    data = _modes_data(rank)
    for x, target in data:
        loss = nn.functional.cross_entropy(ddp(x), target) + orthofx.penalty(ddp)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {"params": _params(gm), "data": data}


def _modes_reference(preset: str, data, penalty_scale: float = 1.0) -> dict:
    gm = _transformed("small_cnn", {"width": 4}, preset, (2, 1, 8, 8))
    optimizer = torch.optim.SGD(gm.parameters(), lr=LR)
    for step in zip(*data):
        x = torch.cat([x for x, _ in step])
        target = torch.cat([t for _, t in step])
        loss = nn.functional.cross_entropy(gm(x), target) + penalty_scale * orthofx.penalty(gm)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {"params": _params(gm)}


# -------------------------------------------------------------------------- checkpoint (export / load)

CKPT_STEPS = 2  # steps before the checkpoint, and after it


def _ckpt_train(ddp, optimizer, data) -> None:
    for x, target in data:
        loss = (ddp(x) - target).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def _checkpoint(save_wrapper: bool, rank: int) -> dict:
    """Train, checkpoint on rank 0 (model by orthofx.export, optimizer by torch.save), reload on both ranks into a
    fresh model and optimizer, train on; and train on without the checkpoint, for comparison."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    data = [batch for step in _acc_data(rank, torch.float64) for batch in step][:2 * CKPT_STEPS]
    gm = _acc_model(torch.float64)
    ddp = DDP(gm)
    optimizer, _ = _acc_optimizer(ddp)
    _ckpt_train(ddp, optimizer, data[:CKPT_STEPS])
    model_path = os.path.join(shared_dir(), f"model_{save_wrapper}.pt")
    optimizer_path = os.path.join(shared_dir(), f"optimizer_{save_wrapper}.pt")
    if rank == 0:
        orthofx.export(ddp if save_wrapper else ddp.module, model_path)
        torch.save(optimizer.state_dict(), optimizer_path)
    dist.barrier()
    saved = {k: v.detach().clone() for k, v in gm.state_dict().items()}
    torch.manual_seed(1000 + rank)  # a fresh model with other weights than the saved ones
    fresh = orthofx.models.get(ACC_MODEL[0], **ACC_MODEL[1]).double()
    loaded = orthofx.load(fresh, model_path)
    # before DDP, whose first broadcast would hide a rank that loaded something else
    load_diff = max(float((v - saved[k]).abs().max()) for k, v in loaded.state_dict().items())
    load_keys = sorted(loaded.state_dict()) == sorted(saved)
    resumed = DDP(loaded)
    resumed_optimizer, _ = _acc_optimizer(resumed)
    resumed_optimizer.load_state_dict(torch.load(optimizer_path, weights_only=True))
    _ckpt_train(resumed, resumed_optimizer, data[CKPT_STEPS:])
    _ckpt_train(ddp, optimizer, data[CKPT_STEPS:])
    return {"params": _params(loaded), "continued": _params(gm), "load_diff": load_diff, "load_keys": load_keys,
            "olr": _olr_lrs(resumed_optimizer), "olr_continued": _olr_lrs(optimizer)}


# ------------------------------------------------------------------------------------ ZeroRedundancyOptimizer

def _zero(case: str, rank: int) -> dict:
    """The accumulate model and data with ``ZeroRedundancyOptimizer`` (each rank steps, and keeps the optimizer
    state of, its shard of the parameters, then broadcasts them). ``own_group``: the Pre-SVD weight in a param
    group of its own from the start (what OLR needs); ``shared_group``: one group for all, which OLR would have
    to split after ZeRO partitioned it; ``overlap``: ``overlap_with_ddp=True``, whose steps run inside DDP's
    communication hook, not in ``step()``."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    if case == "overlap":  # Riemannian hooks only (ZeRO overlapped with DDP takes one param group)
        gm = _transformed(*ACC_MODEL, {"rules": ACC_POLICY["rules"][:1]}, (MICRO_BATCH, 8))
    else:
        gm = _acc_model(torch.float64)
    ddp = DDP(gm)
    pre_svd = gm.get_submodule("layers.1").weight
    others = [p for p in gm.parameters() if p is not pre_svd]
    params = [{"params": others}, {"params": [pre_svd]}] if case == "own_group" else list(gm.parameters())
    optimizer = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.SGD, overlap_with_ddp=case == "overlap",
                                        lr=LR, momentum=0.9)
    try:
        orthofx.attach(optimizer, ddp)
    except orthofx.ArgumentError as error:
        return {"refused": str(error)}
    data = _acc_data(rank, torch.float64)
    olr = []
    for micro in data:
        optimizer.zero_grad(set_to_none=True)
        for k, (x, target) in enumerate(micro):
            with contextlib.nullcontext() if k == len(micro) - 1 else ddp.no_sync():
                ((ddp(x) - target).square().mean() + orthofx.penalty(ddp)).backward()
        optimizer.step()
        olr.append(_olr_lrs(optimizer))
    return {"params": _params(gm), "data": data, "olr": olr, "refused": None}


ZERO_CASES = ("own_group", "shared_group", "overlap")


# --------------------------------------------------------------------------------------------------- jobs

JOBS = ([(f"accumulate_{v}", functools.partial(_accumulate, v)) for v in ACC_VARIANTS]
        + [(f"jacobian_{m}", functools.partial(_jacobian, m)) for m in DDP_MODES]
        + [("convnorm_same", functools.partial(_convnorm, "same"))]
        + [(f"syncbn_{c}", functools.partial(_syncbn, c)) for c in SYNCBN_CASES]
        + [(f"modes_{p}_{m}", functools.partial(_modes, p, m)) for p in MODE_PRESETS for m in ("find_unused", "static")]
        + [(f"checkpoint_{w}", functools.partial(_checkpoint, w)) for w in (False, True)]
        + [(f"zero_{c}", functools.partial(_zero, c)) for c in ZERO_CASES])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_jobs(JOBS, tmp_path_factory.mktemp("ddp_fuzz"))


@pytest.fixture(scope="module")
def per_rank_results(tmp_path_factory):
    """The ConvNorm job whose ranks train on sizes of their own, in a spawn of its own: when the running filters
    were buffers, DDP's broadcast of sets that differ across ranks aborted the workers (gloo: 'Received data size
    doesn't match expected size'), which would have taken every other job's results with it."""
    jobs = [("convnorm_per_rank", functools.partial(_convnorm, "per_rank"))]
    return run_jobs(jobs, tmp_path_factory.mktemp("ddp_fuzz_convnorm"))


# --------------------------------------------------------------------------------------------------- tests

def test_no_sync_accumulation_with_hooks_matches_the_summed_gradient(results):
    """no_sync accumulation + Riemannian / NOG / OLR hooks: the replicas agree bitwise, the weights are those of one
    process stepping with the accumulated gradient of the concatenated micro-batches (float64), and the comparison
    tells a dropped accumulated gradient or missing hooks apart."""
    ranks = _ok(results, "accumulate_float64")
    _assert_replicas_identical(ranks)
    assert ranks[0]["hooks"] == ["NearestOrthogonalGradient", "OptimalLearningRate", "StiefelHook"]
    data = [rank["data"] for rank in ranks]
    reference = _acc_reference(data, torch.float64)
    assert _max_diff(ranks[0]["params"], reference["params"]) <= F64_ATOL
    assert ranks[0]["olr"] == ranks[1]["olr"]
    torch.testing.assert_close(torch.tensor(ranks[0]["olr"]), torch.tensor(reference["olr"]), rtol=1e-10, atol=0)
    assert any(lrs[0] < LR for lrs in ranks[0]["olr"]), ranks[0]["olr"]  # OLR acted on some step
    assert _max_diff(ranks[0]["params"], _acc_reference(data, torch.float64, last_only=True)["params"]) > 1e-4
    assert _max_diff(ranks[0]["params"], _acc_reference(data, torch.float64, hooks=False)["params"]) > 1e-4


@pytest.mark.parametrize("variant", ["float32", "bucket_view"])
def test_no_sync_accumulation_float32_stays_orthonormal(results, variant):
    """The same in float32, also with gradient_as_bucket_view=True (the hooks rewrite gradients that are views of
    DDP's buckets): replicas identical, the Riemannian weight orthonormal to 1e-5, the reference to 1e-6."""
    ranks = _ok(results, f"accumulate_{variant}")
    _assert_replicas_identical(ranks)
    for rank in ranks:
        assert rank["defect"] <= 1e-5
    reference = _acc_reference([rank["data"] for rank in ranks], torch.float32)
    assert _max_diff(ranks[0]["params"], reference["params"]) <= F32_ATOL


@pytest.mark.parametrize("mode", list(DDP_MODES))
def test_jacobian_every_and_per_sample_under_ddp(results, mode):
    """``every: 2`` + ``per_sample``: on the steps without an estimate the penalty is exactly zero and DDP raises
    nothing (also with find_unused_parameters / static_graph); each rank's penalty equals the reference's for its
    data; the weights equal the reference's (the penalty's gradient averaged like the task loss's)."""
    ranks = _ok(results, f"jacobian_{mode}")
    _assert_replicas_identical(ranks)
    data = [rank["data"] for rank in ranks]
    reference = _jac_reference(data)
    for r, rank in enumerate(ranks):
        penalties = rank["penalties"]
        assert [p == 0.0 for p in penalties] == [s % JAC_EVERY != 0 for s in range(JAC_STEPS)], penalties
        torch.testing.assert_close(torch.tensor(penalties), torch.tensor([p[r] for p in reference["penalties"]]),
                                   rtol=1e-10, atol=0)
    assert ranks[0]["penalties"] != ranks[1]["penalties"]  # each replica's own data
    assert _max_diff(ranks[0]["params"], reference["params"]) <= F64_ATOL
    assert _max_diff(ranks[0]["params"], _jac_reference(data, every=1)["params"]) > 1e-5
    assert _max_diff(ranks[0]["params"], _jac_reference(data, penalty_scale=2.0)["params"]) > 1e-5


def test_convnorm_running_filters_same_sizes(results):
    """Running ConvNorm filters made at the first forward of each input size (after DDP was built): both replicas
    hold the same ones, equal to the single-process run's, and evaluate alike on every size."""
    ranks = _ok(results, "convnorm_same")
    assert ranks[0]["buffers"] == ranks[1]["buffers"] == ["steps"]  # the running filters are no buffers
    _assert_replicas_identical(ranks)
    _assert_replicas_identical(ranks, "running")
    assert sorted(ranks[0]["running"]) == sorted(f"conv{i}.running_v_{g}" for i, g in
                                                 ((1, "10x10"), (1, "14x14"), (2, "10x10"), (2, "14x14"),
                                                  (3, "6x6"), (3, "8x8")))
    reference = _cn_reference([rank["data"] for rank in ranks])
    assert _max_diff(ranks[0]["params"], reference["params"]) <= F64_ATOL
    assert _max_diff(ranks[0]["running"], reference["running"]) <= F64_ATOL
    for ours, theirs, other in zip(ranks[0]["eval"], reference["eval"], ranks[1]["eval"]):
        assert torch.equal(ours, other)
        torch.testing.assert_close(ours, theirs, atol=F64_ATOL, rtol=0)


def test_convnorm_running_filters_per_rank_sizes(per_rank_results):
    """Each rank trains on sizes of its own (8 x 8 at the same steps on both, then 12 x 12 on rank 0 and 10 x 10
    on rank 1) under a DDP that broadcasts buffers: no abort, the weights agree with each other and with one
    process stepping on the mean of both ranks' losses, and each rank holds the running filters of the grids it
    trained on, the exponential average of V of those weights at its own steps (so both ranks hold the same
    filters for 8 x 8 and evaluate alike on it, and differ on 12 x 12, which only rank 0 trained on)."""
    ranks = _ok(per_rank_results, "convnorm_per_rank")
    assert ranks[0]["buffers"] == ranks[1]["buffers"] == ["steps"]
    _assert_replicas_identical(ranks)
    reference = _cn_per_rank_reference([rank["data"] for rank in ranks])
    assert _max_diff(ranks[0]["params"], reference["params"]) <= F64_ATOL
    for rank, expected in zip(ranks, reference["running"]):
        assert sorted(rank["running"]) == sorted(expected)
        for key, v in expected.items():
            torch.testing.assert_close(rank["running"][key], v, rtol=1e-10, atol=0, msg=key)
    shared = {key for key in ranks[0]["running"] if key in ranks[1]["running"]}
    assert shared == {f"conv{i}.running_v_{g}" for i, g in ((1, "10x10"), (2, "10x10"), (3, "6x6"))}
    for key in shared:
        torch.testing.assert_close(ranks[0]["running"][key], ranks[1]["running"][key], rtol=1e-12, atol=0)
    (ours8, ours12, _), (other8, other12, _) = ranks[0]["eval"], ranks[1]["eval"]
    torch.testing.assert_close(ours8, other8, rtol=1e-12, atol=0)
    assert (ours12 - other12).abs().max() > 1e-6  # rank 1 never trained on 12 x 12: V of the current weight


@pytest.mark.parametrize("case", list(SYNCBN_CASES))
def test_replicas_trained_apart_are_synced_by_ddp(results, case):
    """Replicas that diverged (one local step each, then an eval forward that fills the orthogonal layers' kernel
    cache) are made identical by DDP's first broadcast: parameters, buffers (BatchNorm statistics, inside a
    JacobianProbe's block too) and the eval output (no stale cache), equal to rank 0's state evaluated here."""
    ranks = _ok(results, f"syncbn_{case}")
    assert not torch.equal(ranks[0]["apart"], ranks[1]["apart"])  # they had diverged
    _assert_replicas_identical(ranks)
    _assert_replicas_identical(ranks, "buffers")
    assert torch.equal(ranks[0]["eval"], ranks[1]["eval"])
    model = _syncbn_model(case)
    model.load_state_dict({**ranks[0]["params"], **ranks[0]["buffers"]})
    with torch.no_grad():
        expected = model.eval()(_syncbn_input(case, 9))
    torch.testing.assert_close(ranks[0]["eval"], expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("case", list(SYNCBN_CASES))
def test_convert_sync_batchnorm_of_a_transformed_model(results, case):
    """convert_sync_batchnorm turns every BatchNorm of a transformed model into SyncBatchNorm, the one inside a
    JacobianProbe's block too (the probe shares its block's submodules); single-process (where SyncBatchNorm is
    BatchNorm) the converted model trains bitwise like the unconverted one, penalty included. Under DDP torch
    accepts SyncBatchNorm on GPU modules only: on the CPU the workers got torch's refusal."""
    ranks = _ok(results, f"syncbn_{case}")
    for rank in ranks:
        assert rank["kinds"] == ["SyncBatchNorm"]
        assert rank["refused"] is not None and "GPU" in rank["refused"], rank["refused"]
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(_syncbn_model(case))
    plain = _syncbn_model(case)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in plain.modules())
    trained, expected = _syncbn_train(converted, case), _syncbn_train(plain, case)
    assert trained.keys() == expected.keys()
    assert all(torch.equal(trained[k], expected[k]) for k in trained)
    initial = _params(_syncbn_model(case))
    assert _max_diff({k: trained[k] for k in initial}, initial) > 1e-3  # it did train


@pytest.mark.parametrize("mode", ["find_unused", "static"])
@pytest.mark.parametrize("preset", MODE_PRESETS)
def test_presets_with_find_unused_parameters_and_static_graph(results, preset, mode):
    """The orthogonal and lorth presets train under find_unused_parameters=True and static_graph=True like the
    single-process run on the concatenated batch (the lorth penalty averaged like the task loss)."""
    ranks = _ok(results, f"modes_{preset}_{mode}")
    _assert_replicas_identical(ranks)
    data = [rank["data"] for rank in ranks]
    assert _max_diff(ranks[0]["params"], _modes_reference(preset, data)["params"]) <= F64_ATOL
    if preset == "lorth":
        assert _max_diff(ranks[0]["params"], _modes_reference(preset, data, 2.0)["params"]) > 1e-5
    else:
        from orthofx import metrics
        from orthofx.nn.orthogonal import OrthogonalConv2d

        gm = _transformed("small_cnn", {"width": 4}, preset, (2, 1, 8, 8))
        gm.load_state_dict(ranks[0]["params"], strict=False)
        convs = [m for m in gm.modules() if isinstance(m, OrthogonalConv2d)]
        assert len(convs) == 3
        for conv in convs:
            sv = metrics.conv_singular_values(conv.weight.detach(), 8, stride=conv.stride[0], groups=conv.groups)
            assert float((sv - 1).abs().max()) <= 1e-10


@pytest.mark.parametrize("save_wrapper", [False, True])
def test_checkpoint_on_rank0_reload_on_both(results, save_wrapper):
    """orthofx.export on rank 0 (of ddp.module, or of the DDP wrapper) and orthofx.load on both ranks restore the
    trained weights exactly; with the optimizer state (momentum, OLR's group) the resumed run equals the run that
    went on without the checkpoint, bitwise, on both replicas."""
    ranks = _ok(results, f"checkpoint_{save_wrapper}")
    _assert_replicas_identical(ranks)
    for rank in ranks:
        assert rank["load_keys"] and rank["load_diff"] == 0.0
        assert _max_diff(rank["params"], rank["continued"]) == 0.0
        assert rank["olr"] == rank["olr_continued"] and rank["olr"]


def test_zero_redundancy_optimizer_with_hooks_matches_the_single_process_run(results):
    """ZeroRedundancyOptimizer keeps each rank's shard of the optimizer state in its local optimizer: the
    Riemannian hook must transport the momentum found there (it looked in ``optimizer.state`` only, found nothing
    and left the momentum unprojected, 3.5e-7 off the single-process run after 3 steps); with the Pre-SVD weight in
    a param group of its own OLR needs no split, and the run equals the single-process one (float64)."""
    ranks = _ok(results, "zero_own_group")
    assert ranks[0]["refused"] is None
    _assert_replicas_identical(ranks)
    data = [rank["data"] for rank in ranks]
    reference = _acc_reference(data, torch.float64)
    assert _max_diff(ranks[0]["params"], reference["params"]) <= F64_ATOL
    assert ranks[0]["olr"] == ranks[1]["olr"]
    torch.testing.assert_close(torch.tensor(ranks[0]["olr"]), torch.tensor(reference["olr"]), rtol=1e-10, atol=0)


def test_zero_redundancy_optimizer_refuses_olr_split(results):
    """OLR's move of the weight into a param group of its own, after ZeroRedundancyOptimizer partitioned its
    groups over the ranks, left ZeRO's local shards stale (another layer's weight stepped 2e-2 off after one
    step, silently): refused at attach, naming the site and the fix (the weight in a group of its own)."""
    for rank in _ok(results, "zero_shared_group"):
        message = rank["refused"]
        assert message is not None, "attach accepted OLR on a ZeroRedundancyOptimizer group it must split"
        assert "site 'layers.1'" in message and "ZeroRedundancyOptimizer" in message and "own" in message, message


def test_zero_redundancy_optimizer_overlapped_with_ddp_is_refused(results):
    """With ``overlap_with_ddp=True`` ZeRO steps inside DDP's communication hook and ``step()`` is never called, so
    no optimizer hook would ever run (the weights would train unconstrained): refused at attach, with the fix."""
    for rank in _ok(results, "zero_overlap"):
        message = rank["refused"]
        assert message is not None, "attach accepted a ZeroRedundancyOptimizer with overlap_with_ddp=True"
        assert "overlap_with_ddp=False" in message and "site 'layers.0'" in message, message
