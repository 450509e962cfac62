"""Side-by-side speed and orthogonality of hard orthogonal convolutions (a script, not a test).

For each shape, every layer is timed on forward + backward (loss = mean of squared outputs, gradients to the
parameters and the input) in round-robin, so that all layers see the same machine state; the median over the
repetitions is reported (and the minimum, less sensitive to other processes on a shared machine), with its
ratio to a plain ``nn.Conv2d`` (zero padding) and the layer's exact
``max |sigma - 1|`` (``orthofx.metrics.conv_singular_values`` on the explicit kernel, circular operator on the
input grid). Layers:

* ``nn.Conv2d``               the baseline (zero padding, not orthogonal);
* ``nn.Conv2d circular``      same with ``padding_mode='circular'`` (what an exactly orthogonal layer pays for
                              its boundary);
* ``orthofx <method>``        :class:`orthofx.nn.orthogonal.OrthogonalConv2d` for each method that applies;
* ``orthofx <method> (build f32)``  the same with ``compute_dtype=torch.float32`` (kernel built in float32);
* ``orthofx frozen``          its ``to_conv()`` (inference form), forward + backward through the plain conv;
* ``orthofx cayley_fft``      ``OrthogonalConv2d(method="cayley_fft", input_size=(n, n))`` (Cayley transform per
                              frequency, solves in float64; ``(build f32)``: in float32), and its frozen
                              ``FourierConv`` (``cayley_fft frozen``: precomputed per-frequency matrices). Its
                              max |sigma - 1| is measured on the effective n x n kernel. On CPU the per-frequency
                              solves are slow for N = max(M, C S^2) >= 256 (tens of seconds per step):
                              ``--cayley-max-n`` skips those shapes (default 128 with ``--quick``, no limit
                              otherwise);
* ``torch orthogonal(flat)``  ``torch.nn.utils.parametrizations.orthogonal`` on the kernel flattened to
                              ``M x (C k^2)`` (orthonormal rows of the flattened kernel: not an orthogonal conv);
* ``orthofx convnorm``         :class:`orthofx.nn.convnorm.ConvNormConv2d` around the zero-padded ``nn.Conv2d``
                              (P3's normalisation, computed on every training forward from the detached kernel;
                              not an orthogonal conv: rows orthonormal per output channel, so no max|sigma - 1|);
* ``orthogonium AOC`` / ``torchlip SpectralConv2d`` when those packages import (optional; a note says when not);
* ``... (compiled)``           with ``--compile MODE``: ``torch.compile(layer, mode=MODE)`` of nn.Conv2d, of
                              orthofx's first exact method (build f32) and of orthogonium's AOC, at the first
                              input size only (a cold compile per layer costs seconds to tens of seconds).
                              ``reduce-overhead`` replays CUDA graphs: the kernel build is many small launches,
                              which is what a graph removes.

Usage::

    python benchmarks/orthogonal_layers.py            # batch 64
    python benchmarks/orthogonal_layers.py --quick    # batch 8, fewer repetitions (CPU)
    python benchmarks/orthogonal_layers.py --smoke    # 8-16 channels on an 8x8 input, batch 2, one repetition:
                                                      # checks that every layer runs, in seconds (no figures)

Peers: ``pip install -e ".[bench]"`` (orthogonium, deel-torchlip; torch stays within orthofx's bound).

Writes ``benchmarks/results/local/orthogonal_layers.json`` (ignored by git) or ``--out``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

from orthofx.metrics import conv_singular_values
from orthofx.nn.convnorm import ConvNormConvNd, with_convnorm
from orthofx.nn.orthogonal import OrthogonalConv2d
from timing import common_arguments, positive_int, samples, setup, write_results

SHAPES = [  # (C, M, k, S)
    (64, 64, 3, 1),
    (64, 128, 3, 2),
    (256, 256, 3, 1),
]
SIZES = [32, 16]
#: ``--smoke``'s shapes and input size: stride 1, a strided ``bcop`` (k > S) and one where ``rko`` applies (k <= S)
SMOKE_SHAPES = [(8, 8, 3, 1), (8, 16, 3, 2), (8, 16, 2, 2)]
SMOKE_SIZES = [8]
EXACT_METHODS = ("bcop", "rko")  # OrthogonalConv2d methods for any input size, tried in this order
COMPILE_MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
#: every layer name a run can time (what ``--skip`` is checked against); ``build_layers`` makes them
LAYER_NAMES = ["nn.Conv2d", "nn.Conv2d circular", *(f"orthofx {m}" for m in EXACT_METHODS),
               *(f"orthofx {m} (build f32)" for m in EXACT_METHODS), "orthofx frozen", "orthofx cayley_fft",
               "orthofx cayley_fft (build f32)", "orthofx cayley_fft frozen", "orthofx convnorm",
               "torch orthogonal(flat)", "orthogonium AOC", "torchlip SpectralConv2d"]


class FlatOrthogonalConv2d(nn.Module):
    """``torch.nn.utils.parametrizations.orthogonal`` on the flattened ``M x (C k^2)`` kernel."""

    def __init__(self, c_in, c_out, k, stride):
        super().__init__()
        self.shape = (c_out, c_in, k, k)
        self.stride = stride
        self.padding = (k - 1) // 2
        self.flat = nn.Linear(c_in * k * k, c_out, bias=False)
        torch.nn.utils.parametrizations.orthogonal(self.flat, "weight")
        self.bias = nn.Parameter(torch.zeros(c_out))

    @property
    def weight(self):
        return self.flat.weight.reshape(self.shape)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)


def peer_factories() -> tuple[dict, list[str]]:
    """The peer packages' layers that import here (name -> constructor of ``(c_in, c_out, k, stride)``; their own
    weight conventions) and a note for each that does not."""
    factories, notes = {}, []
    try:  # orthogonium 0.0.4 (AOC: BCOP composed with RKO); padding="same" is refused at stride > 1, so explicit
        from orthogonium.layers.conv.AOC import AdaptiveOrthoConv2d  # type: ignore
    except ImportError as exc:
        notes.append(f'orthogonium AOC not timed: orthogonium does not import ({exc}); pip install -e ".[bench]"')
    else:
        factories["orthogonium AOC"] = lambda c_in, c_out, k, stride: AdaptiveOrthoConv2d(
            c_in, c_out, k, stride=stride, padding=(k - 1) // 2, padding_mode="circular")
    try:  # deel-torchlip 1.0.5 (spectral normalisation + Bjorck on the flattened kernel; zero padding)
        from deel.torchlip import SpectralConv2d  # type: ignore
    except ImportError as exc:
        notes.append(f"torchlip SpectralConv2d not timed: deel-torchlip does not import ({exc}); "
                     'pip install -e ".[bench]"')
    else:
        factories["torchlip SpectralConv2d"] = lambda c_in, c_out, k, stride: SpectralConv2d(
            c_in, c_out, k, stride=stride, padding=(k - 1) // 2)
    return factories, notes


def optional_peers(c_in, c_out, k, stride, factories: dict):
    """The peers of ``peer_factories`` that accept this shape; name -> module."""
    peers = {}
    for name, make in factories.items():
        try:
            peers[name] = make(c_in, c_out, k, stride)
        except Exception as exc:  # noqa: BLE001 - e.g. k < S, which AOC refuses
            print(f"({name} skipped for {c_in}->{c_out} k{k} s{stride}: {exc})")
    return peers


def kernel_of(module):
    """The explicit kernel of a layer, or None when it has none we can read (ConvNorm's operator has none)."""
    if isinstance(module, ConvNormConvNd):
        return None
    if isinstance(module, nn.Sequential):
        return kernel_of(module[-1])
    try:
        w = module.weight
    except Exception:  # noqa: BLE001
        return None
    return w if isinstance(w, torch.Tensor) and w.ndim == 4 else None


def sigma_error(module, n, stride):
    with torch.no_grad():
        w = kernel_of(module)
        if w is None:
            return None
        sv = conv_singular_values(w.detach().float(), n, stride=stride)
        return float((sv - 1).abs().max())


def build_layers(c_in, c_out, k, stride, device, n, cayley_max_n=None, peers=None):
    layers = {
        "nn.Conv2d": nn.Conv2d(c_in, c_out, k, stride=stride, padding=(k - 1) // 2),
        "nn.Conv2d circular": nn.Conv2d(c_in, c_out, k, stride=stride, padding=(k - 1) // 2,
                                        padding_mode="circular"),
    }
    ours = None
    for method in EXACT_METHODS:
        try:
            layer = OrthogonalConv2d(c_in, c_out, k, stride=stride, method=method)
        except ValueError:
            continue  # the method does not apply to this shape (e.g. rko with k > S)
        layers[f"orthofx {method}"] = layer
        ours = ours or layer
    if ours is not None:
        fast = OrthogonalConv2d(c_in, c_out, k, stride=stride, method=ours.method, compute_dtype=torch.float32)
        layers[f"orthofx {ours.method} (build f32)"] = fast
        layers["orthofx frozen"] = ours.to_conv()
    big = max(c_out, c_in * stride * stride)
    if cayley_max_n is None or big <= cayley_max_n:
        cayley = OrthogonalConv2d(c_in, c_out, k, stride=stride, method="cayley_fft", input_size=(n, n))
        layers["orthofx cayley_fft"] = cayley
        layers["orthofx cayley_fft (build f32)"] = OrthogonalConv2d(
            c_in, c_out, k, stride=stride, method="cayley_fft", input_size=(n, n), compute_dtype=torch.float32)
        layers["orthofx cayley_fft frozen"] = cayley.to_plain()
    else:
        print(f"(skipping cayley_fft for {c_in}->{c_out} s{stride}: N = {big} > --cayley-max-n {cayley_max_n})")
    layers["orthofx convnorm"] = with_convnorm(nn.Conv2d(c_in, c_out, k, stride=stride, padding=(k - 1) // 2))
    layers["torch orthogonal(flat)"] = FlatOrthogonalConv2d(c_in, c_out, k, stride)
    layers.update(optional_peers(c_in, c_out, k, stride, peers or {}))
    return {name: m.to(device) for name, m in layers.items()}


def compiled_layers(layers: dict, mode: str) -> dict:
    """``torch.compile`` of the baseline, of orthofx's first exact method (build f32) and of orthogonium's AOC."""
    picked = ["nn.Conv2d"] + [name for name in layers if name.endswith("(build f32)")][:1] + \
        [name for name in layers if name.startswith("orthogonium")]
    return {f"{name} (compiled)": torch.compile(layers[name], mode=mode) for name in picked}


def step(module, x):
    module.zero_grad(set_to_none=True)
    x.grad = None
    y = module(x)
    y.square().mean().backward()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 8 and fewer repetitions (CPU)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes (8-16 channels, 8x8 input), batch 2, one repetition: a check that every "
                             "layer runs, in seconds (its times are not figures)")
    parser.add_argument("--batch", type=positive_int, default=None, help="batch size (default 64; 8 with --quick)")
    parser.add_argument("--reps", type=positive_int, default=None,
                        help="timed repetitions (default 20; 7 with --quick)")
    parser.add_argument("--skip", nargs="*", default=[],
                        help="skip layers whose name contains any of these strings (e.g. 'flat'; the nn.Conv2d "
                             "baseline is always timed)")
    parser.add_argument("--cayley-max-n", type=positive_int, default=None,
                        help="skip cayley_fft where N = max(M, C S^2) exceeds this (default: 128 with --quick)")
    parser.add_argument("--compile", default=None, metavar="MODE", choices=COMPILE_MODES,
                        help="also time torch.compile(mode=MODE) forms at the first input size "
                             f"({', '.join(COMPILE_MODES)})")
    common_arguments(parser, "orthogonal_layers.json", device="auto")
    args = parser.parse_args(argv)
    device, sync = setup(parser, args)
    names = LAYER_NAMES + [f"{name} (compiled)" for name in LAYER_NAMES]
    unknown = [part for part in args.skip if not any(part in name for name in names)]
    if unknown:
        parser.error(f"--skip {' '.join(unknown)}: no layer name contains it; the layers are "
                     f"{', '.join(LAYER_NAMES)} (and '... (compiled)' with --compile)")
    batch = args.batch or (2 if args.smoke else 8 if args.quick else 64)
    reps = args.reps or (1 if args.smoke else 7 if args.quick else 20)
    shapes, sizes = (SMOKE_SHAPES, SMOKE_SIZES) if args.smoke else (SHAPES, SIZES)
    cayley_max_n = args.cayley_max_n if args.cayley_max_n is not None else (128 if args.quick else None)
    peers, notes = peer_factories()
    for note in notes:
        print(f"note: {note}")
    torch.manual_seed(0)

    rows = []
    for (c_in, c_out, k, stride) in shapes:
        for n in sizes:
            layers = build_layers(c_in, c_out, k, stride, device, n, cayley_max_n, peers)
            layers = {name: m for name, m in layers.items()
                      if name == "nn.Conv2d" or not any(part in name for part in args.skip)}
            if args.compile and n == sizes[0]:
                layers.update(compiled_layers(layers, args.compile))
            x = torch.randn(batch, c_in, n, n, device=device, requires_grad=True)
            # interleaved: one step of each layer per repetition
            times = samples({name: (lambda m=m: step(m, x)) for name, m in layers.items()}, reps, sync)
            base = statistics.median(times["nn.Conv2d"])
            base_min = min(times["nn.Conv2d"])
            for name, m in layers.items():
                med = statistics.median(times[name])
                rows.append({
                    "shape": f"{c_in}->{c_out} k{k} s{stride}",
                    "input": f"{n}x{n}",
                    "layer": name,
                    "ms": med * 1e3,
                    "ratio_to_conv": med / base,
                    "min_ms": min(times[name]) * 1e3,
                    "min_ratio_to_conv": min(times[name]) / base_min,
                    # a compiled form shares its layer's kernel: its row would repeat the figure
                    "max_abs_sigma_minus_1": None if name.endswith("(compiled)") else sigma_error(m.cpu(), n,
                                                                                                  stride),
                })
                m.to(device)
            print_rows(rows[-len(layers):])
            sys.stdout.flush()
    for note in notes:  # again below the tables, where a reader of the run looks
        print(f"note: {note}")

    print()
    # ``device`` is written as its name (the GPU's, or "cpu"); ``device_spec`` keeps the argument (a CUDA index)
    write_results(args.out, device, rows, device_spec=str(device), batch=batch, reps=reps,
                  platform=platform.platform(), quick=args.quick, smoke=args.smoke, cayley_max_n=cayley_max_n,
                  compile=args.compile, notes=notes,
                  timing="median and min forward+backward (loss = mean(y^2)), layers interleaved round-robin")


def print_rows(rows):
    from tabulate import tabulate

    table = [[r["shape"], r["input"], r["layer"], f"{r['ms']:.2f}", f"{r['ratio_to_conv']:.2f}x",
              f"{r['min_ms']:.2f}", f"{r['min_ratio_to_conv']:.2f}x",
              "-" if r["max_abs_sigma_minus_1"] is None else f"{r['max_abs_sigma_minus_1']:.1e}"] for r in rows]
    headers = ["shape", "input", "layer", "median ms", "vs nn.Conv2d", "min ms", "vs nn.Conv2d (min)",
               "max|sigma-1|"]
    print(tabulate(table, headers=headers))
    print()


if __name__ == "__main__":
    main()
