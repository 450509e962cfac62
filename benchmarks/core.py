"""Core-engine measurements, side by side in one run (never as timed tests).

1. Transform latency (``--only transform``): ``orthofx.transform`` with the ``lorth`` preset against torch.ao's
   ``prepare_fx`` on the same model (a 50-conv plain CNN and the ResNet-50-like built-in), and against a bare
   ``torch.fx.symbolic_trace``.
   Quality bar (DESIGN.md): under 0.5 s for a 50-conv model and no slower than ``prepare_fx``.
   The same for every preset that acts on the ResNet-50-like model (``--only presets``): presets that initialise
   layers from the originals (``orthogonal``: the nearest orthogonal layer; ``isometric``: random orthogonal
   weights) do linear algebra per layer, and every preset's report figures are computed on the example input.
2. Training step of each preset (``--only steps``): the ResNet-18-like built-in transformed with each preset,
   one SGD step (loss + ``orthofx.penalty``, optimizer hooks by ``orthofx.attach``) against the plain model's
   step, interleaved. The Jacobian preset's costs are in ``jacobian.py``.
3. L_orth overhead (``--only lorth``): a training step (SGD, momentum 0.9) of the ResNet-18-like built-in
   transformed with ``lorth``, with and without ``orthofx.penalty``. Quality bar: under 10 % extra time per step.

    python benchmarks/core.py            # full
    python benchmarks/core.py --quick    # smaller widths and batches, for a CPU smoke run
    python benchmarks/core.py --quick --repeats 1    # one timed call per candidate: a test's smoke run

Writes ``benchmarks/results/local/core.json`` (ignored by git) or ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import platform

import torch
from torch import nn

import orthofx
from timing import common_arguments, interleaved, positive_int, setup, synchronizer, training_step, write_results


def plain_cnn(depth: int = 50, width: int = 16) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1)]
    for _ in range(depth - 1):
        layers += [nn.ReLU(), nn.Conv2d(width, width, 3, padding=1)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


def transform_latency(quick: bool, repeats: int | None = None) -> list[dict]:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    rows = []
    cases = {"plain_cnn_50": (plain_cnn(50), (1, 3, 32, 32)),
             "resnet50": (orthofx.models.get("resnet50", width=16 if quick else 64), (1, 3, 32, 32))}
    for name, (model, shape) in cases.items():
        model.eval()
        x = torch.randn(*shape)
        qconfig = get_default_qconfig_mapping("fbgemm")
        fns = {
            "symbolic_trace": lambda: torch.fx.symbolic_trace(model),
            "orthofx.transform": lambda: orthofx.transform(model, "lorth"),
            "orthofx.transform+inputs": lambda: orthofx.transform(model, "lorth", example_inputs=(x,)),
            "prepare_fx": lambda: prepare_fx(model, qconfig, (x,)),
        }
        times = interleaved(fns, repeats=repeats or (5 if quick else 10))
        n_conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
        for fn_name, seconds in times.items():
            rows.append({"benchmark": "transform", "model": name, "convs": n_conv, "method": fn_name,
                         "seconds": seconds, "ratio_to_prepare_fx": seconds / times["prepare_fx"]})
    return rows


PRESETS_ON_RESNET = ("lorth", "orthogonal", "convnorm", "isometric", "jacobian")


def preset_latency(quick: bool, repeats: int | None = None) -> list[dict]:
    """``orthofx.transform(resnet50, preset, example_inputs=...)`` for each preset against ``prepare_fx``."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    width = 16 if quick else 64
    model = orthofx.models.get("resnet50", width=width).eval()
    x = torch.randn(1, 3, 32, 32)
    qconfig = get_default_qconfig_mapping("fbgemm")
    fns = {f"transform {preset}": (lambda preset=preset: orthofx.transform(model, preset, example_inputs=(x,)))
           for preset in PRESETS_ON_RESNET}
    fns["prepare_fx"] = lambda: prepare_fx(model, qconfig, (x,))
    times = interleaved(fns, repeats=repeats or 3)
    return [{"benchmark": "transform_preset", "model": f"resnet50(width={width})", "method": name,
             "seconds": seconds, "ratio_to_prepare_fx": seconds / times["prepare_fx"]}
            for name, seconds in times.items()]


def preset_steps(quick: bool, device: str = "cpu", repeats: int | None = None) -> list[dict]:
    """Eager training step of each preset against the plain step (CPU: width 32, batch 32; CUDA: width 64,
    batch 128, the shape of ``compile.py``)."""
    torch.manual_seed(0)
    on_gpu = device.startswith("cuda")
    width, batch = (16, 8) if quick else ((64, 128) if on_gpu else (32, 32))
    model = orthofx.models.get("resnet18", width=width)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))

    fns = {"plain step": training_step(copy.deepcopy(model).to(device), x.to(device), y.to(device),
                                       orthofx_terms=False)}
    for preset in PRESETS_ON_RESNET:
        gm = orthofx.transform(model, preset, example_inputs=(x[:2],)).to(device)
        fns[f"{preset} step"] = training_step(gm, x.to(device), y.to(device), orthofx_terms=True)
    times = interleaved(fns, repeats=repeats or (5 if quick else 9), sync=synchronizer(device))
    base = times["plain step"]
    return [{"benchmark": "preset_step", "model": f"resnet18(width={width})", "batch": batch, "device": device,
             "method": name, "seconds": seconds, "ratio_to_plain": seconds / base} for name, seconds in times.items()]


def lorth_overhead(quick: bool, device: str = "cpu", repeats: int | None = None) -> list[dict]:
    """The lorth-transformed model's step with and without ``orthofx.penalty``: the same graph on both sides, so
    the ratio is the penalty's alone (``preset_steps`` compares with the untransformed model instead). Then with
    the rule's ``every: k`` (each term on one penalty call in ``k``, spread by cost): the mean step over a period
    (``k`` steps per timed call, divided by ``k``), and each call of an ``every: 8`` period alone (the count set
    before the step), whose slowest is the worst step."""
    torch.manual_seed(0)
    width, batch = (16, 16) if quick else (64, 64)
    model = orthofx.models.get("resnet18", width=width)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    gm = orthofx.transform(model, "lorth").to(device)
    steps = {"plain step": 1, "step + penalty": 1}
    fns = {"plain step": training_step(copy.deepcopy(gm), x, y, orthofx_terms=False),
           "step + penalty": training_step(gm, x, y, orthofx_terms=True)}
    for every in (4, 8):
        policy = orthofx.Policy.preset("lorth").to_dict()
        for rule in policy["rules"]:
            rule["with"] = {**rule.get("with", {}), "every": every,  # lazy regularisation: the same average strength
                            "weight": rule.get("with", {}).get("weight", 0.01) * every}
        amortised = orthofx.transform(model, policy).to(device)
        name = f"step + penalty every {every} (mean)"
        fns[name], steps[name] = training_step(amortised, x, y, orthofx_terms=True, steps=every), every
    manifest = orthofx.manifest_of(amortised)  # every 8
    for call in range(8):
        def at_call(call=call, step=training_step(amortised, x, y, orthofx_terms=True)):
            manifest.penalty_calls = call
            step()
        fns[f"every 8, call {call}"], steps[f"every 8, call {call}"] = at_call, 1
    times = interleaved(fns, repeats=repeats or (5 if quick else 20), sync=synchronizer(device))
    per_step = {k: v / steps[k] for k, v in times.items()}
    base = per_step["plain step"]
    return [{"benchmark": "lorth_overhead", "model": f"resnet18(width={width})", "batch": batch, "device": device,
             "method": k, "seconds": v, "ratio_to_plain": v / base} for k, v in per_step.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["transform", "presets", "steps", "lorth"], default=None,
                        help="run one part only")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timed calls per candidate in every part (default: 10, 3, 9, 20; 5, 3, 5, 5 with --quick)")
    common_arguments(parser, "core.json", device_use="where the L_orth and per-preset step timings run")
    args = parser.parse_args()
    setup(parser, args)
    rows = []
    if args.only in (None, "transform"):
        rows += transform_latency(args.quick, args.repeats)
    if args.only in (None, "presets"):
        rows += preset_latency(args.quick, args.repeats)
    if args.only in (None, "steps"):
        rows += preset_steps(args.quick, args.device, args.repeats)
    if args.only in (None, "lorth"):
        rows += lorth_overhead(args.quick, args.device, args.repeats)
    from tabulate import tabulate
    print(tabulate(rows, headers="keys", floatfmt=".4g"))
    write_results(args.out, args.device, rows, machine=platform.machine(), quick=args.quick, repeats=args.repeats)


if __name__ == "__main__":
    main()
