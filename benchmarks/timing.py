"""Side-by-side timing shared by the benchmark scripts (run them from the repository root)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import nn

import orthofx


def synchronizer(device: str | torch.device) -> Callable[[], None]:
    """What to call before reading the clock on ``device``: CUDA kernels run asynchronously."""
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def interleaved(fns: dict[str, Callable[[], object]], repeats: int,
                sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median seconds of each function; every repeat runs all of them in turn (after one warm-up call each),
    so that drifting machine load hits every candidate alike. ``sync`` (see :func:`synchronizer`) is called
    before each clock read so that asynchronous devices are timed to completion."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    sync()
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, orthofx_terms: bool,
                  steps: int = 1) -> Callable[[], None]:
    """A function running ``steps`` SGD steps (momentum 0.9) of ``cross_entropy(model(x), y)``, plus
    ``orthofx.penalty(model)`` and the optimizer hooks (``orthofx.attach``) when ``orthofx_terms``. Several steps
    per call amortise what happens on one step in k (the Jacobian pass's ``every: k``)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    if orthofx_terms:
        orthofx.attach(optimizer, model)

    def step() -> None:
        for _ in range(steps):
            loss = nn.functional.cross_entropy(model(x), y)
            if orthofx_terms:
                loss = loss + orthofx.penalty(model)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return step
