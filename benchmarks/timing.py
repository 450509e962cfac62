"""Side-by-side timing, the command-line options and their checks shared by the benchmark scripts (run them from
the repository root).

Where results go: a run writes ``benchmarks/results/local/<name>.json`` unless ``--out`` names a file. That folder
is ignored by git, so a smoke or exploratory run never replaces the committed results in ``benchmarks/results/``
that ``benchmarks/RESULTS.md`` cites; re-measuring one of those is asked for by name (``--out
benchmarks/results/<name>.json``, as RESULTS.md's commands write it). ``--out`` is checked when the command line is
parsed (a ``.json`` file in an existing, writable folder), not after the benchmark has run."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable

import torch
from torch import nn

import orthofx

# The argparse types of counts, durations and output files are the examples' (one place for them): ``positive_int``
# (an integer >= 1), ``positive_float`` (a finite number > 0) and ``json_path`` (``--out``), re-exported for the
# benchmark scripts.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples"))
from _cli import json_path, positive_float, positive_int  # noqa: E402,F401


def synchronizer(device: str | torch.device) -> Callable[[], None]:
    """What to call before reading the clock on ``device``: CUDA kernels run asynchronously."""
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def device_name(device: str | torch.device) -> str:
    """What the results' metadata calls ``device``: the GPU's name for a CUDA device, else ``"cpu"``."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def samples(fns: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None] = lambda: None,
            alternate: bool = False) -> dict[str, list[float]]:
    """Seconds of each call of each function; every repeat runs all of them in turn (after one warm-up call
    each), so that drifting machine load hits every candidate alike, and the i-th samples of two candidates were
    taken next to each other (a paired ratio can use them). ``sync`` (see :func:`synchronizer`) is called before
    each clock read so that asynchronous devices are timed to completion. ``alternate`` reverses the order on
    every other repeat, so that no candidate always runs right after the same other one."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    sync()
    order = list(fns.items())
    for repeat in range(repeats):
        for name, fn in (order[::-1] if alternate and repeat % 2 else order):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def interleaved(fns: dict[str, Callable[[], object]], repeats: int,
                sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median seconds of each function over :func:`samples`' interleaved repeats."""
    return {name: statistics.median(values) for name, values in samples(fns, repeats, sync).items()}


def once(fn: Callable[[], object], sync: Callable[[], None] = lambda: None) -> tuple[float, object]:
    """Seconds of one call of ``fn`` (what cannot be repeated alike: a cold compile, an export) and its result."""
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - start, result


def training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, orthofx_terms: bool,
                  steps: int = 1, compile: bool = False) -> Callable[[], None]:
    """A function running ``steps`` SGD steps (momentum 0.9) of ``cross_entropy(model(x), y)``, plus
    ``orthofx.penalty(model)`` and the optimizer hooks (``orthofx.attach``) when ``orthofx_terms``. Several steps
    per call amortise what happens on one step in k (the Jacobian pass's ``every: k``). ``compile``: the loss
    (forward and penalty) goes through ``torch.compile(fullgraph=True)``; the first call compiles it."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    if orthofx_terms:
        orthofx.attach(optimizer, model)

    def loss_of() -> torch.Tensor:
        loss = nn.functional.cross_entropy(model(x), y)
        return loss + orthofx.penalty(model) if orthofx_terms else loss

    if compile:
        loss_of = torch.compile(loss_of, fullgraph=True)

    def step() -> None:
        for _ in range(steps):
            loss = loss_of()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return step


def write_results(out: str, device: str | torch.device, rows: list[dict], **meta) -> None:
    """Write a benchmark's ``rows`` to the JSON file ``out`` (its folder exists: :func:`setup` checked ``--out`` or
    made the default's) with the run's metadata: torch's version, :func:`device_name`, the thread count and ``meta``
    (the script's own settings); say where."""
    with open(out, "w") as f:
        json.dump({"torch": torch.__version__, "device": device_name(device), "threads": torch.get_num_threads(),
                   **meta, "rows": rows}, f, indent=1)
    print(f"wrote {out}")


# ------------------------------------------------------------------------------------------- argument checks


def checked_device(parser: argparse.ArgumentParser, device: str) -> torch.device:
    """``--device`` as a ``torch.device``; ``parser.error`` for a malformed name, a type the scripts do not time
    (they synchronise CUDA only) or CUDA where it is not available."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        parser.error(f"--device {device!r} is not a device name (cpu, cuda, cuda:1)")
    if parsed.type not in ("cpu", "cuda"):
        parser.error(f"--device {device!r}: the benchmarks time cpu and cuda only")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {device!r}: CUDA is not available here")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            parser.error(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return parsed


# ------------------------------------------------------------------------------------- the scripts' shared options

#: The folder of the committed JSON results that RESULTS.md cites (written only when ``--out`` names a file in it).
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
#: The folder of a run's results when ``--out`` is not given: ignored by git (``.gitignore``), made on first use.
LOCAL_RESULTS = os.path.join(RESULTS, "local")


def default_out(name: str) -> str:
    """``benchmarks/results/local/<name>``, the folder made if missing (it is the scripts' own, ignored by git; a
    folder the user names in ``--out`` must exist, :func:`json_path`)."""
    os.makedirs(LOCAL_RESULTS, exist_ok=True)
    return os.path.join(LOCAL_RESULTS, name)


def common_arguments(parser: argparse.ArgumentParser, results: str | None, *, device: str | None = "cpu",
                     threads: int | str | None = "torch", device_use: str = "") -> None:
    """Add the options the scripts share, as a group of their own in ``--help``; :func:`setup` acts on them.

    * ``--device``: ``device`` is its default, ``"auto"`` for cuda when available (``None``: no option, the
      script times the CPU); ``device_use`` says what runs there, where that is not everything.
    * ``--threads`` (``torch.set_num_threads``): ``threads`` is its default count, ``"torch"`` for torch's own
      (nothing set); ``None``: no option.
    * ``--out`` (checked by :func:`json_path` when parsed): ``results`` is the default file's name in
      ``benchmarks/results/local`` (ignored by git), ``<device>`` in it standing for the device type (``cpu``,
      ``cuda``); ``None``: no option (the script has its own).
    """
    group = parser.add_argument_group("options shared by the benchmark scripts")
    if device is not None:
        default = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        shown = "cuda when available" if device == "auto" else device
        use = f": {device_use}" if device_use else ""
        group.add_argument("--device", default=default, help=f"cpu or cuda[:index]{use} (default: {shown})")
    if threads is not None:
        shown = "default: torch's" if threads == "torch" else f"default {threads}: steadier on a shared machine"
        group.add_argument("--threads", type=positive_int, default=None if threads == "torch" else threads,
                           help=f"torch.set_num_threads ({shown})")
    if results is not None:
        group.add_argument("--out", type=json_path, default=None,
                           help=f"JSON file for the results, in an existing folder (default: "
                                f"benchmarks/results/local/{results}, ignored by git; the committed "
                                f"benchmarks/results/*.json are written only when named here)")
        parser.set_defaults(out_template=results)  # read by setup, which knows the device


def setup(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[torch.device, Callable[[], None]]:
    """Act on :func:`common_arguments`' options: check ``--device`` (``parser.error`` if it cannot be timed; the
    CPU where the script has no ``--device``), set ``--threads``, fill in ``--out``'s default path
    (:func:`default_out`); return the device and its :func:`synchronizer`."""
    device = checked_device(parser, args.device) if "device" in vars(args) else torch.device("cpu")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if getattr(args, "out_template", None) and args.out is None:
        args.out = default_out(args.out_template.replace("<device>", device.type))
    return device, synchronizer(device)
