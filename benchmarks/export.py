"""Frozen-model inference against the original model, and export time (a script, not a test).

Issue 6's benchmarks: for each built-in model and preset, ``orthofx.freeze`` of the transformed model is timed in
eval mode (``torch.no_grad``) side by side with the original, untransformed model on the same input (goal: ratio
<= 1.05; a preset that changes the architecture, e.g. ConvNorm's extra normalisation, is expected to cost more),
and ``orthofx.export`` is timed once per format (``.pt``, ``.pt2``, ``.onnx``: the export's own parity check
included). The maximum difference each export reports is recorded (none for ``.pt``, which is not checked;
``.pt2``'s has been 0 in every run so far: the exported program runs the frozen model's own ATen ops on the same
device); a failed export (``.onnx`` without the ``onnx`` extra, say) records its error instead of a time, and a
note under the printed table says why its cells are blank.

    python benchmarks/export.py                 # width 32, batch 32 (CPU)
    python benchmarks/export.py --quick         # width 8, batch 8, fewer repeats
    python benchmarks/export.py --quick --models deep_mlp   # one model's presets only
    python benchmarks/export.py --device cuda   # inference timing on a GPU (exports run on the CPU)

Writes ``benchmarks/results/local/export.json`` (ignored by git) or ``--out``.

On CPU with glibc, fx GraphModules run about 1.2x slower than their source modules because of allocator churn
(``benchmarks/RESULTS.md``); to time the models without it::

    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 python benchmarks/export.py --formats

(``--formats`` with no value: the inference timing only, no export.)
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import warnings

import torch

import orthofx
from timing import common_arguments, interleaved, once, positive_int, setup, write_results

FORMATS = [".pt", ".pt2", ".onnx"]

#: (model, constructor kwargs as a function of the width, presets that have sites in it)
CASES = [
    ("resnet18", lambda w: {"width": w}, ["lorth", "orthogonal", "convnorm", "isometric", "jacobian"]),
    ("vgg11", lambda w: {"width": w}, ["lorth", "orthogonal", "convnorm", "isometric"]),
    ("gcp_cnn", lambda w: {"width": w, "dim": min(w, 32)}, ["orthogonal", "svd"]),
    ("deep_mlp", lambda w: {"depth": 16, "width": 4 * w}, ["orthogonal", "isometric", "jacobian"]),
]


def _export_seconds(gm: torch.nn.Module, suffix: str, x: torch.Tensor) -> tuple[float | None, float | None,
                                                                               str | None]:
    """Seconds of ``orthofx.export(gm, "model<suffix>")`` (its parity check included), the largest difference
    it reports (None where the format is not checked) and, when the export fails, no time and the error."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            seconds, result = once(lambda: orthofx.export(gm, os.path.join(tmp, "model" + suffix),
                                                          example_inputs=(x,)))
        except orthofx.OrthofxError as exc:
            return None, None, str(exc).splitlines()[0][:200]
        return seconds, result.max_abs_diff, None


def export_failures(rows: list[dict]) -> list[str]:
    """One line per distinct export error (the table leaves those cells blank): the format, the error, and the
    rows it failed on (all of them, for a format that cannot export here at all, as ``.onnx`` without onnx)."""
    failures: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        for key, error in row.items():
            if key.endswith("_error"):
                suffix = key[len("export"):-len("_error")]
                failures.setdefault((suffix, error), []).append(f"{row['model']} {row['preset']}")
    lines = []
    for (suffix, error), where in failures.items():
        which = "every row" if len(where) == len(rows) else ", ".join(where)
        lines.append(f"{suffix} export failed ({which}), so its cells are blank: {error}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=positive_int, default=32)
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--repeats", type=positive_int, default=20)
    parser.add_argument("--formats", nargs="*", choices=FORMATS, default=FORMATS,
                        help="export formats to time (none: no export)")
    parser.add_argument("--quick", action="store_true", help="width 8, batch 8, 5 repeats")
    parser.add_argument("--models", nargs="+", choices=[name for name, _, _ in CASES], metavar="MODEL",
                        default=[name for name, _, _ in CASES],
                        help=f"built-in models to time (of {', '.join(name for name, _, _ in CASES)}; default: all)")
    common_arguments(parser, "export.json", threads=1)
    args = parser.parse_args()
    _, sync = setup(parser, args)
    if args.quick:
        args.width, args.batch, args.repeats = 8, 8, 5
    rows = []
    for name, kwargs, presets in (case for case in CASES if case[0] in args.models):
        torch.manual_seed(0)
        original = orthofx.models.get(name, **kwargs(args.width)).eval()
        x = orthofx.models.example_input(name, batch=args.batch)
        for preset in presets:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gm = orthofx.transform(original, preset, example_inputs=(x[:2],))
            gm.eval()
            frozen = orthofx.freeze(gm)
            on_device = original.to(args.device), frozen.to(args.device)
            xd = x.to(args.device)

            def run(model):
                with torch.no_grad():
                    return model(xd)

            times = interleaved({"original": lambda: run(on_device[0]), "frozen": lambda: run(on_device[1])},
                                args.repeats, sync)
            row = {"model": name, "preset": preset, "device": args.device,
                   "original_ms": times["original"] * 1e3, "frozen_ms": times["frozen"] * 1e3,
                   "frozen_vs_original": times["frozen"] / times["original"]}
            original.cpu()
            for suffix in args.formats:
                seconds, diff, error = _export_seconds(gm, suffix, x[:2])
                row[f"export{suffix}_s"] = seconds
                row[f"export{suffix}_diff"] = diff
                if error:
                    row[f"export{suffix}_error"] = error
            print(row, flush=True)
            rows.append(row)
    from tabulate import tabulate
    table = [{k: v for k, v in r.items() if not k.endswith("_error")} for r in rows]
    print(tabulate(table, headers="keys", floatfmt=".3g"))
    notes = export_failures(rows)
    for note in notes:
        print(f"note: {note}")
    write_results(args.out, args.device, rows, machine=platform.machine(), width=args.width, batch=args.batch,
                  repeats=args.repeats, notes=notes)


if __name__ == "__main__":
    main()
