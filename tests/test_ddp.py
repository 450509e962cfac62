"""Transformed models under DistributedDataParallel: gloo, 2 processes on 127.0.0.1.

One ``torch.multiprocessing.spawn`` runs four scenarios in one process group (startup is the expensive part);
each rank trains a few steps on its own data and writes what it ends with to ``tmp_path``:

(a) ``lorth``: loss + ``orthofx.penalty(ddp_model)`` -> the two replicas' parameters are identical;
(b) ``orthogonal``: the same, and the hard layers stay exactly orthogonal (max |sigma - 1| <= 1e-5, exact FFT
    singular values; ``OrthogonalLinear`` weights orthonormal);
(c) the ``riemannian`` pass through ``orthofx.attach(optimizer, ddp_model)`` on ``deep_linear``: identical
    replicas, weights orthonormal after SGD-with-momentum steps;
(d) the ``svd`` preset (P4's NOG + OLR on the Pre-SVD layer, via ``attach``) on ``gcp_cnn``: identical replicas;
(e) the ``svd`` preset on ``dbn_cnn``, whose decorrelated BatchNorm branches on ``self.training`` (a two-graph
    ``ModalGraphModule``): identical replicas, and identical eval outputs (running whitening, buffers broadcast
    by DDP from rank 0).

About 6 s in all (two interpreters importing torch), so not marked slow. Nothing can hang: ``init_process_group(timeout=60 s)`` and the spawn is joined with a deadline, after which the
workers are terminated (by their own process ids).
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback

import pytest
import torch

WORLD = 2
STEPS = 3
JOIN_DEADLINE_S = 240
SCENARIOS = ("lorth", "orthogonal", "riemannian", "pre_svd", "dbn")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------- worker side

def _build(scenario: str):
    """(transformed model, optimizer factory arguments, inputs per step, loss) of a scenario; same on every rank."""
    import orthofx

    torch.manual_seed(0)
    if scenario in ("lorth", "orthogonal"):
        model = orthofx.models.get("small_cnn", width=4)
        x = orthofx.models.example_input("small_cnn", batch=4)
        policy = scenario
    elif scenario == "riemannian":
        model = orthofx.models.get("deep_linear", depth=3, width=8, in_features=8, out_features=8)
        x = torch.randn(4, 8)
        policy = {"rules": [{"match": {"type": "Linear"}, "apply": "riemannian"}]}
    elif scenario == "dbn":
        model = orthofx.models.get("dbn_cnn", width=4)
        x = orthofx.models.example_input("dbn_cnn", batch=8)
        policy = "svd"
    else:
        model = orthofx.models.get("gcp_cnn", width=4, dim=4)
        x = orthofx.models.example_input("gcp_cnn", batch=4)
        policy = "svd"
    return orthofx.transform(model, policy, example_inputs=(x,)), x.shape


def _loss(scenario, output, target):
    if scenario == "riemannian":
        return (output - target).square().mean()
    return torch.nn.functional.cross_entropy(output, target)


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


def _run(scenario: str, rank: int) -> dict:
    import orthofx
    from torch.nn.parallel import DistributedDataParallel as DDP

    gm, shape = _build(scenario)
    initial = {k: v.detach().clone() for k, v in gm.named_parameters()}
    ddp = DDP(gm)
    momentum = 0.9 if scenario in ("riemannian", "pre_svd", "dbn") else 0.0
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=momentum)
    handle = orthofx.attach(optimizer, ddp) if scenario in ("riemannian", "pre_svd", "dbn") else None
    generator = torch.Generator().manual_seed(100 + rank)  # each replica sees its own data
    losses = []
    for _ in range(STEPS):
        x = torch.randn(shape, generator=generator)
        if scenario == "riemannian":
            target = torch.randn(shape, generator=generator)
        else:
            target = torch.randint(0, 10, (shape[0],), generator=generator)
        loss = _loss(scenario, ddp(x), target) + orthofx.penalty(ddp)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    params = {k: v.detach().clone() for k, v in gm.named_parameters()}
    moved = max(float((params[k] - initial[k]).abs().max()) for k in params)
    fixed = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        evaluation = ddp.eval()(fixed)
        # the untransformed model with the replica's weights and (broadcast) buffers: the eval reference
        reference = orthofx.models.get("dbn_cnn", width=4) if scenario == "dbn" else None
        if reference is not None:
            reference.load_state_dict(gm.state_dict(), strict=False)
            reference = reference.eval()(fixed)
    ddp.train()
    result = {"params": params, "losses": losses, "moved": moved, "orthogonality": _orthogonality(gm),
              "eval": evaluation, "eval_reference": reference,
              "modal": isinstance(gm, orthofx.capture.ModalGraphModule),
              "hooks": [type(h).__name__ for h in (handle.hooks if handle is not None else [])],
              "olr_groups": sum(1 for g in optimizer.param_groups if "orthofx_olr" in g)}
    return result


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for scenario in SCENARIOS:
            try:
                result = _run(scenario, rank)
            except Exception:  # noqa: BLE001 - reported to the test, which fails with the traceback
                result = {"error": traceback.format_exc()}
            torch.save(result, os.path.join(out_dir, f"{scenario}_rank{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------- test side

@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    import torch.multiprocessing as mp

    out_dir = tmp_path_factory.mktemp("ddp")
    context = mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + JOIN_DEADLINE_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish within {JOIN_DEADLINE_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
    results = {}
    for scenario in SCENARIOS:
        results[scenario] = [torch.load(out_dir / f"{scenario}_rank{r}.pt", weights_only=False)
                             for r in range(WORLD)]
    return results


def _replicas(results, scenario):
    ranks = results[scenario]
    for rank, result in enumerate(ranks):
        assert "error" not in result, f"{scenario} failed on rank {rank}:\n{result['error']}"
    return ranks


def _assert_identical(ranks):
    first, second = ranks[0]["params"], ranks[1]["params"]
    assert first.keys() == second.keys() and first
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert not different, f"replicas differ in {different}"
    assert ranks[0]["moved"] > 0, "training did not change the parameters"
    assert all(torch.isfinite(v).all() for v in first.values())
    # each replica saw its own data, so the losses differ while the parameters agree
    assert ranks[0]["losses"] != ranks[1]["losses"]


def test_lorth_replicas_identical(ddp_results):
    _assert_identical(_replicas(ddp_results, "lorth"))


def test_orthogonal_replicas_identical_and_layers_orthogonal(ddp_results):
    ranks = _replicas(ddp_results, "orthogonal")
    _assert_identical(ranks)
    orthogonality = ranks[0]["orthogonality"]
    assert set(orthogonality) == {"conv1", "conv2", "conv3", "fc"}
    assert max(orthogonality.values()) <= 1e-5, orthogonality


def test_riemannian_attach_replicas_identical_and_orthonormal(ddp_results):
    ranks = _replicas(ddp_results, "riemannian")
    _assert_identical(ranks)
    assert ranks[0]["hooks"] == ["StiefelHook"] * 3
    orthogonality = ranks[0]["orthogonality"]
    assert set(orthogonality) == {"layers.0", "layers.1", "layers.2"}
    assert max(orthogonality.values()) <= 1e-5, orthogonality


def test_pre_svd_nog_olr_attach_replicas_identical(ddp_results):
    ranks = _replicas(ddp_results, "pre_svd")
    _assert_identical(ranks)
    assert sorted(ranks[0]["hooks"]) == ["NearestOrthogonalGradient", "OptimalLearningRate"]
    assert ranks[0]["olr_groups"] == 1


def test_two_mode_model_replicas_identical_with_the_running_whitening_in_eval(ddp_results):
    ranks = _replicas(ddp_results, "dbn")
    _assert_identical(ranks)
    assert ranks[0]["modal"] and ranks[1]["modal"]
    assert sorted(ranks[0]["hooks"]) == ["NearestOrthogonalGradient", "OptimalLearningRate"]
    assert torch.equal(ranks[0]["eval"], ranks[1]["eval"]) and torch.isfinite(ranks[0]["eval"]).all()
    for rank in ranks:  # eval ran the eval graph: the original model's running whitening
        torch.testing.assert_close(rank["eval"], rank["eval_reference"], atol=1e-5, rtol=1e-4)
