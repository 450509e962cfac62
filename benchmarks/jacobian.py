"""Jacobian isometry (P2) and Riemannian (P1) training costs, side by side in one run (never as timed tests).

1. Jacobian regulariser: a training step (forward, loss + ``orthofx.penalty``, backward, SGD step) of a model
   transformed with the ``jacobian_isometry`` pass (``kind: full``, per sample, normalised; 1 and 4 Rademacher
   probes; the jacobian preset's blocks: every top-level Sequential) against the plain step of the same model.
   Models: the ResNet-18-like built-in (width 16, batch 8 under ``--quick``; width 64, batch 64 in full) and the
   64-layer plain MLP (``deep_mlp``, width 64, batch 64). Quality bar (DESIGN.md): under 2.5x with one probe.
   The one-probe case is also timed on the reverse-mode-only route (``route: double_vjp``), on a random quarter
   of the batch (``batch_fraction: 0.25``) and with lazy regularisation (``every: 4``, weight x4: one estimate
   every 4 steps; a timed call runs 4 steps and the figure is per step, next to 4 plain steps per call as a
   check of that accounting). ``--compile`` adds the plain step and the one-probe step with their loss compiled
   (``torch.compile(fullgraph=True)``, inductor; the estimate's torch.func route), each cold compile untimed (it
   happens in the warm-up call).
2. Riemannian hooks: the ``riemannian`` pass (polar and QR retractions) on the square Linears of ``deep_linear``
   and ``deep_mlp``, run by ``orthofx.attach`` inside ``optimizer.step()``, against the plain step of the same
   optimizer (SGD, momentum 0.9) on the unconstrained model and, when ``geoopt`` imports, geoopt's
   ``RiemannianSGD`` with the same weights as ``ManifoldParameter``s on ``EuclideanStiefel`` (projection and
   QR retraction, the closest match of orthofx's ``qr``). Timed twice: the optimizer step alone (gradients from
   one backward kept) and the whole training step.

Every group of candidates is timed interleaved (each repeat runs all of them in turn, so machine noise hits all
alike) and the median is reported with its ratio to the plain candidate.

    python benchmarks/jacobian.py                    # full, on CUDA when available
    python benchmarks/jacobian.py --quick            # smaller ResNet and batch, fewer repeats, for a CPU smoke run
    python benchmarks/jacobian.py --device cpu --out /tmp/jacobian_cpu.json

``--device`` (default ``cuda`` when available, else ``cpu``) runs everything there; CUDA timings synchronise
after every timed call. ``--flush-denormal`` flushes subnormal floats to zero: the 64-layer tanh MLP's Jacobian
vanishes, the estimate's second-order terms underflow, and some x86 CPUs (a Xeon here, not an AMD EPYC) then
run its backward about twice as slowly. ``--part jacobian|riemannian`` runs one half. Writes ``--out``
(default ``benchmarks/results/local/jacobian.json``, ignored by git).
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import torch
from torch import nn

import orthofx
from timing import common_arguments, interleaved, positive_int, setup, synchronizer, training_step, write_results


# ------------------------------------------------------------------------------------- Jacobian regulariser


def jacobian_policy(probes: int, route: str = "auto", every: int = 1, batch_fraction: float = 1.0) -> dict:
    """The ``jacobian`` preset's rule with ``probes``, ``route``, ``every`` and ``batch_fraction`` set."""
    return {"rules": [{"name": "jacobian",
                       "match": {"kind": "block", "type": "Sequential", "name": "re:[^.]+", "exclude": ["fc"]},
                       "apply": "jacobian_isometry",
                       "with": {"weight": 0.1 * every, "probes": probes, "kind": "full", "per_sample": True,
                                "normalize": True, "route": route, "every": every,
                                "batch_fraction": batch_fraction}}]}


def jacobian_overhead(quick: bool, repeats: int, device: torch.device, compile: bool = False) -> list[dict]:
    width, batch = (16, 8) if quick else (64, 64)
    cases = {
        f"resnet18(width={width})": (lambda: orthofx.models.get("resnet18", width=width), (batch, 3, 32, 32)),
        "deep_mlp(depth=64, width=64)": (lambda: orthofx.models.get("deep_mlp", depth=64, width=64), (64, 64)),
    }
    # label: (probes, route, every, batch_fraction)
    candidates = {"probes=1": (1, "auto", 1, 1.0), "probes=4": (4, "auto", 1, 1.0),
                  "probes=1 double_vjp": (1, "double_vjp", 1, 1.0), "probes=1 every=4": (1, "auto", 4, 1.0),
                  "probes=1 batch_fraction=0.25": (1, "auto", 1, 0.25)}
    lazy = max(every for _, _, every, _ in candidates.values())
    rows = []
    for model_name, (make, shape) in cases.items():
        torch.manual_seed(0)
        model = make()
        x = torch.randn(*shape, device=device)
        y = torch.randint(0, 10, (shape[0],), device=device)
        fns = {"plain step": training_step(copy.deepcopy(model).to(device), x, y, False)}
        per_call = {"plain step": 1}
        for label, (probes, route, every, fraction) in candidates.items():
            gm = orthofx.transform(model, jacobian_policy(probes, route, every, fraction)).to(device)
            fns[f"jacobian {label}"] = training_step(gm, x, y, True, steps=every)
            per_call[f"jacobian {label}"] = every
        if compile:
            fns["plain step (compiled)"] = training_step(copy.deepcopy(model).to(device), x, y, False, compile=True)
            per_call["plain step (compiled)"] = 1
            gm = orthofx.transform(model, jacobian_policy(1)).to(device)
            fns["jacobian probes=1 (compiled)"] = training_step(gm, x, y, True, compile=True)
            per_call["jacobian probes=1 (compiled)"] = 1
        if lazy > 1:  # the plain step at the same number of steps per call, for the lazy candidates' ratio
            fns[f"plain step x{lazy}"] = training_step(copy.deepcopy(model).to(device), x, y, False, steps=lazy)
            per_call[f"plain step x{lazy}"] = lazy
        timed = interleaved(fns, repeats, sync=synchronizer(device))
        times = {name: seconds / per_call[name] for name, seconds in timed.items()}
        base = times["plain step"]
        for method, seconds in times.items():
            rows.append({"benchmark": "jacobian_step", "model": model_name, "batch": shape[0], "method": method,
                         "device": device.type, "seconds": seconds, "ratio": seconds / base})
    return rows


# ---------------------------------------------------------------------------------------- Riemannian hooks


def riemannian_policy(retraction: str) -> dict:
    return {"rules": [{"name": "stiefel", "match": {"type": "Linear"}, "apply": "riemannian",
                       "with": {"retraction": retraction, "only_square": True}}]}


def _square_linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.in_features == m.out_features]


def geoopt_model(model: nn.Module, geoopt) -> nn.Module:
    """A copy of ``model`` whose square Linear weights are geoopt ManifoldParameters on EuclideanStiefel
    (projected onto the manifold first, as orthofx's ``init: project`` does)."""
    from orthofx.nn.stiefel import project_to_stiefel

    clone = copy.deepcopy(model)
    manifold = geoopt.EuclideanStiefel()
    for layer in _square_linears(clone):
        with torch.no_grad():
            start = project_to_stiefel(layer.weight.detach()).to(layer.weight.dtype)
        layer.weight = geoopt.ManifoldParameter(start, manifold=manifold)
    return clone


def riemannian_overhead(quick: bool, repeats: int, device: torch.device) -> tuple[list[dict], list[str]]:
    notes = []
    try:
        import geoopt
    except ImportError:
        geoopt = None
        notes.append("geoopt is not importable here: its RiemannianSGD was skipped (pip install geoopt to add it)")
    linear_depth, linear_width = (8, 64) if quick else (16, 256)
    cases = {
        f"deep_linear(depth={linear_depth}, width={linear_width})":
            (lambda: orthofx.models.get("deep_linear", depth=linear_depth, width=linear_width,
                                        in_features=linear_width, out_features=linear_width),
             (64, linear_width), "regression"),
        "deep_mlp(depth=64, width=64)":
            (lambda: orthofx.models.get("deep_mlp", depth=64, width=64), (64, 64), "classification"),
    }
    rows = []
    for model_name, (make, shape, task) in cases.items():
        torch.manual_seed(0)
        model = make().to(device)
        x = torch.randn(*shape, device=device)
        target = x.clone() if task == "regression" else torch.randint(0, 10, (shape[0],), device=device)

        def loss_of(module: nn.Module) -> torch.Tensor:
            out = module(x)
            return (out - target).square().mean() if task == "regression" else \
                nn.functional.cross_entropy(out, target)

        models: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
        plain = copy.deepcopy(model)
        models["plain SGD"] = (plain, torch.optim.SGD(plain.parameters(), lr=1e-3, momentum=0.9))
        for retraction in ("polar", "qr"):
            gm = orthofx.transform(model, riemannian_policy(retraction))
            optimizer = torch.optim.SGD(gm.parameters(), lr=1e-3, momentum=0.9)
            orthofx.attach(optimizer, gm)
            models[f"orthofx riemannian ({retraction})"] = (gm, optimizer)
        if geoopt is not None:
            constrained = geoopt_model(model, geoopt)
            models["geoopt RiemannianSGD"] = (constrained, geoopt.optim.RiemannianSGD(
                constrained.parameters(), lr=1e-3, momentum=0.9))
        n_square = len(_square_linears(model))

        def whole_step(module: nn.Module, optimizer: torch.optim.Optimizer):
            def step() -> None:
                loss = loss_of(module)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            return step

        for module, optimizer in models.values():  # gradients for the step-only timing, kept from here on
            optimizer.zero_grad()
            loss_of(module).backward()
        sync = synchronizer(device)
        step_only = interleaved({name: optimizer.step for name, (_, optimizer) in models.items()}, repeats, sync)
        whole = interleaved({name: whole_step(*pair) for name, pair in models.items()}, repeats, sync)
        for what, times in (("optimizer step", step_only), ("training step", whole)):
            base = times["plain SGD"]
            for method, seconds in times.items():
                rows.append({"benchmark": f"riemannian {what}", "model": model_name, "square_linears": n_square,
                             "method": method, "device": device.type, "seconds": seconds, "ratio": seconds / base})
    return rows, notes


def _geoopt_version() -> str | None:
    try:
        import geoopt
    except ImportError:
        return None
    return getattr(geoopt, "__version__", "unknown")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="also time the plain and the one-probe steps with their loss compiled (fullgraph)")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timed repeats (default 10 with --quick, else 20)")
    parser.add_argument("--flush-denormal", action="store_true",
                        help="torch.set_flush_denormal(True): on some x86 CPUs subnormal floats (the vanishing "
                        "second-order terms of a deep tanh MLP's estimate) are very slow")
    parser.add_argument("--part", choices=("all", "jacobian", "riemannian"), default="all",
                        help="run only the Jacobian regulariser or only the Riemannian hook timings")
    common_arguments(parser, "jacobian.json", device="auto", threads=1)
    args = parser.parse_args()
    device, _ = setup(parser, args)
    if args.flush_denormal and not torch.set_flush_denormal(True):
        print("note: this CPU does not support flushing subnormal floats; --flush-denormal has no effect")
    repeats = args.repeats or (10 if args.quick else 20)
    start = time.perf_counter()
    jacobian_rows = jacobian_overhead(args.quick, repeats, device, args.compile) if args.part != "riemannian" else []
    riemannian_rows, notes = (riemannian_overhead(args.quick, repeats, device) if args.part != "jacobian"
                              else ([], []))
    rows = jacobian_rows + riemannian_rows
    from tabulate import tabulate
    print(tabulate(jacobian_rows, headers="keys", floatfmt=".4g"))
    print()
    print(tabulate(riemannian_rows, headers="keys", floatfmt=".4g"))
    for note in notes:
        print(f"note: {note}")
    one_probe = [r for r in jacobian_rows if r["method"].startswith("jacobian probes=1")
                 and "double_vjp" not in r["method"]]
    for r in one_probe:
        verdict = "meets" if r["ratio"] < 2.5 else "misses"
        setting = r["method"][len("jacobian probes=1"):].strip().strip("()") or "whole batch, every step"
        print(f"{r['model']}: one probe ({setting}) {r['ratio']:.2f}x the plain step ({verdict} the 2.5x bar)")
    # ``device`` is written as its name (the GPU's, or "cpu"); ``device_spec`` keeps the argument (a CUDA index)
    write_results(args.out, device, rows, machine=platform.machine(), device_spec=str(device),
                  device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                  geoopt=_geoopt_version(), quick=args.quick, compile=args.compile, part=args.part,
                  flush_denormal=args.flush_denormal, repeats=repeats, notes=notes)
    print(f"took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
