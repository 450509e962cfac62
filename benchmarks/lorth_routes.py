"""The differentiated L_orth by its two routes, side by side in one run (session 34): the convolution
``conv(K, K)`` (``metrics._conv_defect``, ``fast_backward``) against the products of the kernel's taps
(``metrics._TapPairsDefect``, what ``metrics.lorth`` takes on a CPU above ``_TAP_PAIRS_MIN_PAIR_BACKWARD``).

1. Forward + backward of ``metrics.lorth`` for the ResNet-18-like model's 3 x 3 conv shapes (stride 1 and 2).
2. ``orthofx.penalty(gm).backward()`` of the built-in ``resnet18`` transformed with the ``lorth`` preset.
3. Non-view ATen ops of one penalty call (forward + backward), counted with a ``TorchDispatchMode``: each one a
   kernel launch on a GPU (``empty``-like ones allocations only).
4. The training step of ``benchmarks/core.py --only steps`` (width 32, batch 32, 32x32, SGD with momentum,
   ``orthofx.penalty`` and ``orthofx.attach``) by each route, against the untransformed model's step: what is
   left against DESIGN.md's bar (L_orth: under 10 % extra time per step).

The convolution route is timed by raising the threshold past every shape (the same code as before session 34).

    python benchmarks/lorth_routes.py --threads 1
    python benchmarks/lorth_routes.py --quick --repeats 1    # a smoke run

Writes ``benchmarks/results/local/lorth_routes.json`` (ignored by git) or ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import orthofx
from orthofx import metrics
from timing import common_arguments, positive_int, samples, setup, training_step, write_results


@contextlib.contextmanager
def route(name: str):
    """``"conv"``: the convolution route for every shape; ``"taps"``: the library's own choice."""
    saved = metrics._TAP_PAIRS_MIN_PAIR_BACKWARD
    if name == "conv":
        metrics._TAP_PAIRS_MIN_PAIR_BACKWARD = math.inf
    try:
        yield
    finally:
        metrics._TAP_PAIRS_MIN_PAIR_BACKWARD = saved


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched, views (``aten.view``, ``permute``, ``_unsafe_view``, ...) left out."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        view = not func._schema.is_mutable and any(r.alias_info is not None for r in func._schema.returns)
        if not view and func is not torch.ops.aten._unsafe_view.default:  # a reshape's view of a fresh result
            self.count += 1
        return func(*args, **(kwargs or {}))


def paired(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each route, alternating them (``timing.samples``), and the median of paired ratios."""
    times = samples(fns, repeats, alternate=True)
    out = {name: statistics.median(v) for name, v in times.items()}
    out["ratio"] = statistics.median(c / t for c, t in zip(times["conv"], times["taps"]))
    return out


def per_shape(quick: bool, repeats: int) -> list[dict]:
    shapes = [(32, 32, 1), (64, 32, 2), (64, 64, 1), (128, 64, 2), (128, 128, 1)]
    if not quick:
        shapes += [(256, 128, 2), (256, 256, 1), (512, 256, 2), (512, 512, 1)]
    rows = []
    torch.manual_seed(0)
    for out_c, in_c, stride in shapes:
        w = (torch.randn(out_c, in_c, 3, 3) / (3 * in_c ** 0.5)).requires_grad_()

        def step(name, w=w, stride=stride):
            with route(name):
                w.grad = None
                metrics.lorth(w, stride=stride).backward()

        t = paired({name: (lambda name=name: step(name)) for name in ("conv", "taps")},
                   repeats if out_c < 256 else max(1, repeats // 3))
        rows.append({"benchmark": "lorth_shape", "shape": f"{out_c}<-{in_c} 3x3 s{stride}", "conv_s": t["conv"],
                     "taps_s": t["taps"], "speedup": t["ratio"]})
    return rows


def whole_penalty(quick: bool, repeats: int) -> list[dict]:
    rows = []
    for width in ((8, 16) if quick else (32, 64)):
        torch.manual_seed(0)
        gm = orthofx.transform(orthofx.models.get("resnet18", width=width), "lorth")

        def step(name, gm=gm):
            with route(name):
                gm.zero_grad(set_to_none=True)
                orthofx.penalty(gm).backward()

        t = paired({name: (lambda name=name: step(name)) for name in ("conv", "taps")}, repeats)
        ops = {}
        for name in ("conv", "taps"):
            with OpCounter() as counter:
                step(name)
            ops[name] = counter.count
        rows.append({"benchmark": "penalty_backward", "model": f"resnet18(width={width})", "conv_s": t["conv"],
                     "taps_s": t["taps"], "speedup": t["ratio"], "conv_ops": ops["conv"], "taps_ops": ops["taps"]})
    return rows


def steps(quick: bool, repeats: int) -> list[dict]:
    width, batch = (8, 4) if quick else (32, 32)
    torch.manual_seed(0)
    model = orthofx.models.get("resnet18", width=width)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    plain = training_step(model, x, y, orthofx_terms=False)
    lorth = training_step(orthofx.transform(model, "lorth", example_inputs=(x[:2],)), x, y, orthofx_terms=True)

    def by(name):
        with route(name):
            lorth()

    times = samples({"plain": plain, "conv": lambda: by("conv"), "taps": lambda: by("taps")}, repeats,
                    alternate=True)
    base = statistics.median(times["plain"])
    return [{"benchmark": "training_step", "model": f"resnet18(width={width})", "batch": batch,
             "plain_s": base, "conv_s": statistics.median(times["conv"]), "taps_s": statistics.median(times["taps"]),
             "speedup": statistics.median(c / t for c, t in zip(times["conv"], times["taps"])),
             "conv_over_plain": statistics.median(times["conv"]) / base,
             "taps_over_plain": statistics.median(times["taps"]) / base}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes and widths (a smoke run)")
    parser.add_argument("--repeats", type=positive_int, default=None, help="timed calls per route (default 9)")
    common_arguments(parser, "lorth_routes.json", device=None, threads=1)
    args = parser.parse_args()
    setup(parser, args)
    repeats = args.repeats or (3 if args.quick else 9)
    rows = per_shape(args.quick, repeats) + whole_penalty(args.quick, repeats) + steps(args.quick, repeats)
    for row in rows:
        name = row.get("shape") or row["model"]
        ops = f"   ATen ops {row['conv_ops']} -> {row['taps_ops']}" if "conv_ops" in row else ""
        if "plain_s" in row:
            ops = (f"   / plain ({1e3 * row['plain_s']:.1f} ms) {row['conv_over_plain']:.2f} -> "
                   f"{row['taps_over_plain']:.2f}")
        print(f"{row['benchmark']:18s} {name:22s} conv {1e3 * row['conv_s']:9.2f} ms   taps "
              f"{1e3 * row['taps_s']:9.2f} ms   {row['speedup']:.2f}x{ops}")
    write_results(args.out, "cpu", rows, quick=args.quick, repeats=repeats)


if __name__ == "__main__":
    main()
