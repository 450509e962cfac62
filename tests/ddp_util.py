"""Running jobs in a 2-process gloo process group on 127.0.0.1 (CPU), for the DDP / FSDP tests.

    results = run_jobs([("lorth", functools.partial(_run, "lorth")), ...], tmp_path)
    results["lorth"]      # [what the job returned on rank 0, ... on rank 1]

One ``torch.multiprocessing.spawn`` runs every job, in order, in one process group (starting two interpreters that
import torch is the expensive part, seconds on a busy machine). A job is a picklable callable ``job(rank) -> dict``
(a module-level function, or a ``functools.partial`` of one); what it returns is saved with ``torch.save`` and
loaded back in the test process. A job that raises returns ``{"error": <traceback>}`` instead, so that the test
fails with the worker's traceback; the next job still runs. :func:`shared_dir` is a directory both ranks see
(for files one rank writes and the other reads, e.g. a checkpoint).

Nothing can hang: the process group is rendezvoused through a file (no TCP port to pick, so no port race),
``init_process_group`` has a timeout that also bounds every collective, each worker destroys its process group in
``finally`` (and, after its last job, exits without the interpreter's finalisation), and the spawn is joined with a
deadline after which the workers are terminated (by their own process objects).
"""

from __future__ import annotations

import datetime
import os
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

WORLD = 2
PG_TIMEOUT_S = 60
JOIN_DEADLINE_S = 240

_SHARED_DIR: str | None = None  # set in each worker


def shared_dir() -> str:
    """A directory both ranks of the running jobs see (inside the test's ``tmp_path``)."""
    if _SHARED_DIR is None:
        raise RuntimeError("shared_dir() is only available inside a job run by run_jobs")
    return _SHARED_DIR


def _result_path(out_dir: str, name: str, rank: int) -> str:
    return os.path.join(out_dir, f"{name}_rank{rank}.pt")


def _worker(rank: int, store: str, out_dir: str, jobs: list) -> None:
    import torch.distributed as dist

    global _SHARED_DIR
    _SHARED_DIR = os.path.join(out_dir, "shared")
    os.makedirs(_SHARED_DIR, exist_ok=True)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    try:
        for name, job in jobs:
            try:
                result = job(rank)
            except Exception:  # noqa: BLE001 - reported to the test, which fails with the traceback
                result = {"error": traceback.format_exc()}
            torch.save(result, _result_path(out_dir, name, rank))
            dist.barrier()
    finally:
        dist.destroy_process_group()
    # Every result is saved and both ranks passed the last barrier. Leave without the interpreter's finalisation:
    # gloo's threads can still hold work objects whose tensors need the GIL there, and a rank then died with
    # SIGABRT ("terminate called without an active exception") once under load, after its jobs had all finished.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_jobs(jobs: list, out_dir: str | os.PathLike, deadline_s: float = JOIN_DEADLINE_S) -> dict[str, list]:
    """Run ``jobs`` (``(name, job)`` pairs) on ``WORLD`` gloo ranks; ``{name: [result of rank 0, of rank 1]}``."""
    import torch.multiprocessing as mp

    out_dir = Path(out_dir)
    store = out_dir / "store"  # a FileStore rendezvous: must not exist yet, and names no port
    context = mp.spawn(_worker, args=(str(store), str(out_dir), list(jobs)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + deadline_s
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the distributed workers did not finish within {deadline_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
    return {name: [torch.load(_result_path(str(out_dir), name, r), weights_only=False) for r in range(WORLD)]
            for name, _ in jobs}
