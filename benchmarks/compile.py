"""torch.compile against eager for transformed models, training and inference steps (a script, not a test).

Issue 6 asks, where a GPU is available, for compiled vs eager figures of a ResNet-18-like model at batch 128 in
float32 and bfloat16 (``torch.autocast``). For each variant x precision x mode the same step is timed eagerly and
compiled (``torch.compile(fullgraph=True)``, inductor, default mode or ``--mode``), interleaved run by run:

* ``train``: ``loss = cross_entropy(gm(x), y) + orthofx.penalty(gm)`` compiled as one function, then the eager
  backward and an SGD step (what a user writes);
* ``eval``: ``gm(x)`` under ``torch.no_grad()``; for every preset, also its frozen model (``orthofx.freeze``,
  variant ``<preset> frozen``), whose ratio to the plain model is the frozen-inference figure.

Every cell uses ``fullgraph=True``; the ``jacobian`` preset's estimate is compiled too (its reverse-only
``torch.func`` route, see ``orthofx.metrics``).

Variants: ``plain`` (the untransformed built-in), and the presets given by ``--presets`` (default ``lorth
orthogonal convnorm``). Each row also records the cold compile time (first compiled call, with inductor's caches
off so that no earlier compile serves it; ``--quick`` keeps them), the relative difference between compiled and
eager outputs, and the eager and compiled times' ratios to the plain model's in the same precision and mode.

    python benchmarks/compile.py --device cuda                    # everything
    python benchmarks/compile.py --device cuda --precisions bf16  # one precision
    python benchmarks/compile.py --quick --device cpu             # smoke run (see below): minutes on a CPU
    python benchmarks/compile.py --quick --backend aot_eager      # the same, no code generated: about a minute

``--quick`` is a smoke run: width 8, batch 8, 3 repeats, inductor's caches kept, and unless given, ``--presets
lorth`` and ``--precisions fp32`` (plain and lorth, train and eval, and lorth's frozen model: five cells; every
default preset and precision take 22 cells, over 7 minutes on two CPU cores even with ``aot_eager``).

Writes ``benchmarks/results/local/compile.json`` (ignored by git) or ``--out``.
"""

from __future__ import annotations

import argparse
import platform
import warnings
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import orthofx
from timing import common_arguments, interleaved, once, positive_int, setup, synchronizer, write_results

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
PRESETS = ["lorth", "orthogonal", "convnorm"]
#: ``--quick``'s defaults: one preset, one precision (the smoke run's cells are compiled on every call)
QUICK_PRESETS, QUICK_PRECISIONS = ["lorth"], ["fp32"]
COMPILE_MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
BACKENDS = ["inductor", "aot_eager"]


def _autocast(device: str, precision: str):
    dtype = PRECISIONS[precision]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _variant(name: str, width: int, x: torch.Tensor, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = orthofx.models.get("resnet18", width=width)
    if name == "plain":
        return model.to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return orthofx.transform(model, name, example_inputs=(x.cpu()[:2],)).to(device)


def _train_rows(name, model, x, y, device, precision, repeats, compile_mode=None, backend="inductor") -> list[dict]:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    carries_penalty = orthofx.is_transformed(model)

    def loss_fn(inputs):
        loss = F.cross_entropy(model(inputs), y)
        return loss + orthofx.penalty(model) if carries_penalty else loss

    compiled = torch.compile(loss_fn, fullgraph=True, mode=compile_mode, backend=backend)
    sync = synchronizer(device)

    def step(fn):
        if fn is compiled:  # CUDA graphs (reduce-overhead) reuse their output memory: one step per replay
            torch.compiler.cudagraph_mark_step_begin()
        with _autocast(device, precision):
            loss = fn(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    cold, _ = once(lambda: step(compiled), sync)
    with torch.no_grad(), _autocast(device, precision):
        eager_loss = loss_fn(x).float().clone()
        torch.compiler.cudagraph_mark_step_begin()
        compiled_loss = compiled(x).float().clone()
    times = interleaved({"eager": lambda: step(loss_fn), "compiled": lambda: step(compiled)}, repeats, sync)
    return [{"variant": name, "precision": precision, "mode": "train", "eager_ms": times["eager"] * 1e3,
             "compiled_ms": times["compiled"] * 1e3, "speedup": times["eager"] / times["compiled"],
             "cold_compile_s": cold, "fullgraph": True, "compile_mode": compile_mode or "default",
             "rel_diff": float((compiled_loss - eager_loss).abs() / eager_loss.abs().clamp_min(1e-12))}]


def _eval_rows(name, model, x, device, precision, repeats, compile_mode=None, backend="inductor") -> list[dict]:
    model.eval()
    compiled = torch.compile(model, fullgraph=True, mode=compile_mode, backend=backend)
    sync = synchronizer(device)

    def infer(fn):
        with torch.no_grad(), _autocast(device, precision):
            return fn(x)

    cold, _ = once(lambda: infer(compiled), sync)
    eager_out = infer(model).float().clone()
    torch.compiler.cudagraph_mark_step_begin()
    compiled_out = infer(compiled).float().clone()  # a CUDA graph's output is overwritten by its next replay
    times = interleaved({"eager": lambda: infer(model), "compiled": lambda: infer(compiled)}, repeats, sync)
    row = {"variant": name, "precision": precision, "mode": "eval", "eager_ms": times["eager"] * 1e3,
           "compiled_ms": times["compiled"] * 1e3, "speedup": times["eager"] / times["compiled"],
           "cold_compile_s": cold, "fullgraph": True, "compile_mode": compile_mode or "default",
           "rel_diff": float((compiled_out - eager_out).norm() / eager_out.norm().clamp_min(1e-12))}
    return [row]


def _error_row(variant: str, precision: str, mode: str, exc: Exception) -> dict:
    return {"variant": variant, "precision": precision, "mode": mode,
            "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}


def _cell(variant: str, precision: str, mode: str, measure) -> list[dict]:
    """``measure()``'s rows, from a fresh dynamo state; a failed cell is a finding: its error is the row."""
    torch._dynamo.reset()
    try:
        return measure()
    except Exception as exc:  # noqa: BLE001
        return [_error_row(variant, precision, mode, exc)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="*", choices=sorted(orthofx.presets()), metavar="PRESET", default=None,
                        help=f"presets timed besides the plain model (of {', '.join(sorted(orthofx.presets()))}; "
                             f"default: {' '.join(PRESETS)}; lorth with --quick)")
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=None,
                        help=f"default: {' '.join(PRECISIONS)}; fp32 with --quick")
    parser.add_argument("--modes", nargs="+", choices=["train", "eval"], default=["train", "eval"],
                        help="which steps to time (not the torch.compile mode: that is --mode)")
    parser.add_argument("--width", type=positive_int, default=64)
    parser.add_argument("--batch", type=positive_int, default=128)
    parser.add_argument("--repeats", type=positive_int, default=30)
    parser.add_argument("--mode", default=None, choices=COMPILE_MODES,
                        help="torch.compile mode (default; reduce-overhead: CUDA graphs; max-autotune)")
    parser.add_argument("--backend", default="inductor", choices=BACKENDS,
                        help="torch.compile backend (default inductor; aot_eager: the same fullgraph capture and "
                             "autograd graphs without generating code, a smoke run whose cells compile in seconds "
                             "on a CPU: its times are not figures)")
    parser.add_argument("--quick", action="store_true",
                        help="width 8, batch 8, 3 repeats, inductor's caches kept, --presets lorth and --precisions "
                             "fp32 unless given (smoke run: the cold compile times are not figures)")
    common_arguments(parser, "compile.json", device="auto", threads=None)
    args = parser.parse_args()
    setup(parser, args)
    if args.mode is not None and args.backend != "inductor":
        parser.error(f"--mode {args.mode} is an inductor mode; it does not apply to --backend {args.backend}")
    if args.quick:
        args.width, args.batch, args.repeats = 8, 8, 3
    if args.presets is None:
        args.presets = QUICK_PRESETS if args.quick else PRESETS
    if args.precisions is None:
        args.precisions = QUICK_PRECISIONS if args.quick else list(PRECISIONS)
    else:
        # cold means cold: inductor's caches (on disk, kept between runs, and in memory) would serve a graph
        # compiled before (by an earlier run, or by an earlier cell: the frozen lorth model is the lorth eval graph)
        # in a fraction of the time; measured on CPU, 3.2 s against 26 s for the plain training step. A --quick
        # smoke run keeps them: with them off it takes over 10 minutes on 2 CPU cores, nearly all compiling.
        torch.compiler.config.force_disable_caches = True
        warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")  # that setting's notice, per cell
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: orthogonality figures stay comparable
        torch.backends.cudnn.allow_tf32 = False
    x = torch.randn(args.batch, 3, 32, 32, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    rows: list[dict] = []
    for name in ["plain", *args.presets]:
        try:
            model = _variant(name, args.width, x, args.device)
        except orthofx.OrthofxError as exc:  # e.g. svd: the model has no decomposition for it to act on
            rows.append(_error_row(name, "-", "transform", exc))
            print(rows[-1], flush=True)
            continue
        for precision in args.precisions:
            for mode in args.modes:
                if mode == "train":
                    new = _cell(name, precision, mode, lambda: _train_rows(
                        name, model, x, y, args.device, precision, args.repeats, args.mode, args.backend))
                else:
                    new = _cell(name, precision, mode, lambda: _eval_rows(
                        name, model, x, args.device, precision, args.repeats, args.mode, args.backend))
                    if name != "plain":  # its own cell: a failure of the frozen model keeps the row above
                        new += _cell(f"{name} frozen", precision, mode, lambda: _eval_rows(
                            f"{name} frozen", orthofx.freeze(model), x, args.device, precision, args.repeats,
                            args.mode, args.backend))
                for row in new:
                    print(row, flush=True)
                rows += new
                _write(args, rows)  # after every cell: a run cut short by a time limit keeps what it measured
    plain = {(r["precision"], r["mode"]): r for r in rows if r["variant"] == "plain" and "eager_ms" in r}
    for row in rows:
        base = plain.get((row["precision"], row["mode"]))
        if base is not None and "eager_ms" in row:
            row["eager_vs_plain_eager"] = row["eager_ms"] / base["eager_ms"]
            row["compiled_vs_plain_compiled"] = row["compiled_ms"] / base["compiled_ms"]
    from tabulate import tabulate
    print(tabulate(rows, headers="keys", floatfmt=".3g"))
    _write(args, rows)


def _write(args, rows: list[dict]) -> None:
    """The rows so far, with the run's settings, to ``args.out``."""
    write_results(args.out, args.device, rows, machine=platform.machine(), width=args.width, batch=args.batch,
                  repeats=args.repeats, tf32=False, compile_caches=args.quick, backend=args.backend)


if __name__ == "__main__":
    main()
