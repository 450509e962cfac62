"""Fixtures shared by several test files."""

import os

import pytest
import torch


def _threads_per_xdist_worker() -> None:
    """Under pytest-xdist (``pytest -n N``), give each worker its share of the cores as torch threads: N workers
    of the default (every core) each would oversubscribe the machine N times, and a small op then waits for
    spinning OpenMP peers (see ``one_thread``)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // int(workers)))


_threads_per_xdist_worker()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests: with two threads on a busy 2-core machine each small
    op waits for a spinning OpenMP peer (~30 ms instead of ~0.1 ms), which made such files several times slower.
    Use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



class _FixedSigns:
    """A deterministic stand-in for ``orthofx.metrics._rademacher``: the n-th probe drawn since ``count`` was last
    set to 0 is a fixed +-1 pattern shifted by n (so the probes of one estimate differ, as ``offdiag`` needs)."""

    def __init__(self):
        self.count = 0

    def from_first_probe(self, fn):
        """``fn`` with the count set to 0 before each call (each run compared draws the same patterns)."""
        def run(*args, **kwargs):
            self.count = 0
            return fn(*args, **kwargs)
        return run

    def __call__(self, like, generator=None, shift=0):  # shift: only makes compiled draws distinct
        shift = self.count
        self.count += 1
        flips = (torch.arange(like.numel(), device=like.device) + shift).remainder(3).eq(0).to(like.dtype)
        return (1 - 2 * flips).reshape(like.shape)


@pytest.fixture
def fixed_probe_signs(monkeypatch):
    """Fixed Jacobian probes (:class:`_FixedSigns`) instead of random draws, for comparisons of an eager with a
    compiled estimate, whose graph may draw its random numbers otherwise (inductor has its own generator on CUDA;
    aot_autograd drew other values than eager with torch.randint_like). Wrap each compared run in
    ``.from_first_probe`` (a compiled graph holds the patterns it was traced with)."""
    from orthofx import metrics

    signs = _FixedSigns()
    monkeypatch.setattr(metrics, "_rademacher", signs)
    return signs
