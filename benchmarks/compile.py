"""torch.compile against eager for transformed models, training and inference steps (a script, not a test).

Issue 6 asks, where a GPU is available, for compiled vs eager figures of a ResNet-18-like model at batch 128 in
float32 and bfloat16 (``torch.autocast``). For each variant x precision x mode the same step is timed eagerly and
compiled (``torch.compile(fullgraph=True)``, inductor, default mode), interleaved run by run:

* ``train``: ``loss = cross_entropy(gm(x), y) + orthofx.penalty(gm)`` compiled as one function, then the eager
  backward and an SGD step (what a user writes);
* ``eval``: ``gm(x)`` under ``torch.no_grad()``; for the ``orthogonal`` variant, also the frozen model
  (``orthofx.freeze``: plain convolutions), whose ratio to the plain model is the frozen-inference figure.

Every cell uses ``fullgraph=True``; the ``jacobian`` preset's estimate is compiled too (its reverse-only
``torch.func`` route, see ``orthofx.metrics``).

Variants: ``plain`` (the untransformed built-in), and the presets given by ``--presets`` (default ``lorth
orthogonal convnorm``). Each row also records the cold compile time (first compiled call) and the relative
difference between compiled and eager outputs.

    python benchmarks/compile.py --device cuda                    # everything
    python benchmarks/compile.py --device cuda --precisions bf16  # one precision
    python benchmarks/compile.py --quick                          # CPU smoke run (width 8, batch 8)

Writes ``benchmarks/results/compile.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import orthofx
from timing import interleaved, synchronizer

HERE = os.path.dirname(os.path.abspath(__file__))
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


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


def _train_rows(name, model, x, y, device, precision, repeats, mode=None) -> list[dict]:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    carries_penalty = orthofx.is_transformed(model)

    def loss_fn(inputs):
        loss = F.cross_entropy(model(inputs), y)
        return loss + orthofx.penalty(model) if carries_penalty else loss

    compiled = torch.compile(loss_fn, fullgraph=True, mode=mode)
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

    sync()
    start = time.perf_counter()
    step(compiled)
    sync()
    cold = time.perf_counter() - start
    with torch.no_grad(), _autocast(device, precision):
        eager_loss = loss_fn(x).float().clone()
        torch.compiler.cudagraph_mark_step_begin()
        compiled_loss = compiled(x).float().clone()
    times = interleaved({"eager": lambda: step(loss_fn), "compiled": lambda: step(compiled)}, repeats, sync)
    return [{"variant": name, "precision": precision, "mode": "train", "eager_ms": times["eager"] * 1e3,
             "compiled_ms": times["compiled"] * 1e3, "speedup": times["eager"] / times["compiled"],
             "cold_compile_s": cold, "fullgraph": True, "compile_mode": mode or "default",
             "rel_diff": float((compiled_loss - eager_loss).abs() / eager_loss.abs().clamp_min(1e-12))}]


def _eval_rows(name, model, x, device, precision, repeats, mode=None) -> list[dict]:
    model.eval()
    compiled = torch.compile(model, fullgraph=True, mode=mode)
    sync = synchronizer(device)

    def infer(fn):
        with torch.no_grad(), _autocast(device, precision):
            return fn(x)

    sync()
    start = time.perf_counter()
    infer(compiled)
    sync()
    cold = time.perf_counter() - start
    eager_out = infer(model).float().clone()
    torch.compiler.cudagraph_mark_step_begin()
    compiled_out = infer(compiled).float().clone()  # a CUDA graph's output is overwritten by its next replay
    times = interleaved({"eager": lambda: infer(model), "compiled": lambda: infer(compiled)}, repeats, sync)
    row = {"variant": name, "precision": precision, "mode": "eval", "eager_ms": times["eager"] * 1e3,
           "compiled_ms": times["compiled"] * 1e3, "speedup": times["eager"] / times["compiled"],
           "cold_compile_s": cold, "compile_mode": mode or "default",
           "rel_diff": float((compiled_out - eager_out).norm() / eager_out.norm().clamp_min(1e-12))}
    return [row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--presets", nargs="*", default=["lorth", "orthogonal", "convnorm"])
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    parser.add_argument("--modes", nargs="+", choices=["train", "eval"], default=["train", "eval"])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--mode", default=None, help="torch.compile mode (default, reduce-overhead: CUDA graphs, "
                                                     "max-autotune)")
    parser.add_argument("--quick", action="store_true", help="width 8, batch 8, 3 repeats (CPU smoke run)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "compile.json"))
    args = parser.parse_args()
    if args.quick:
        args.width, args.batch, args.repeats = 8, 8, 3
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: orthogonality figures stay comparable
        torch.backends.cudnn.allow_tf32 = False
    x = torch.randn(args.batch, 3, 32, 32, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    rows: list[dict] = []
    for name in ["plain", *args.presets]:
        model = _variant(name, args.width, x, args.device)
        for precision in args.precisions:
            for mode in args.modes:
                torch._dynamo.reset()
                try:
                    if mode == "train":
                        new = _train_rows(name, model, x, y, args.device, precision, args.repeats, args.mode)
                    else:
                        new = _eval_rows(name, model, x, args.device, precision, args.repeats, args.mode)
                        if name != "plain" and hasattr(orthofx, "freeze"):
                            torch._dynamo.reset()
                            frozen = orthofx.freeze(model)
                            new += _eval_rows(f"{name} frozen", frozen, x, args.device, precision, args.repeats,
                                              args.mode)
                except Exception as exc:  # a failed cell is a finding: record it, go on
                    new = [{"variant": name, "precision": precision, "mode": mode,
                            "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}]
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
    print(f"wrote {args.out}")


def _write(args, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump({"torch": torch.__version__, "machine": platform.machine(),
                   "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                   "width": args.width, "batch": args.batch, "repeats": args.repeats, "tf32": False,
                   "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
