"""Exactly orthogonal transposed convolutions (``orthofx.nn.OrthogonalConvTranspose2d``) against
``nn.ConvTranspose2d`` on decoder-like upsampling layers (a script, not a test).

For each shape: median wall time of forward + backward (loss = mean of squared outputs, gradients to the
parameters and the input), timed side by side (interleaved repeats), the ratio to ``nn.ConvTranspose2d`` with the
same arguments (zero padding, not orthogonal), and each orthogonal layer's exact ``max |sigma - 1|``
(``layer.orthogonality_error``: its adjoint conv's FFT singular values on the output grid). Candidates: the
orthogonal layer with its default float64 kernel build and with ``compute_dtype=torch.float32``, and its frozen
form (``to_plain()``: ``nn.ConvTranspose2d(padding=0)`` then ``CircularFold``, the circular boundary's cost).

    python benchmarks/orthogonal_transposed.py --threads 1

Writes ``benchmarks/results/local/orthogonal_transposed_<device>.json`` (ignored by git) or ``--out``.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from orthofx.nn import OrthogonalConvTranspose2d
from timing import common_arguments, interleaved, positive_int, setup, write_results

# (in_channels, out_channels, kernel_size, stride, padding, input size): U-Net / DCGAN-style upsampling
SHAPES = [(128, 64, 4, 2, 1, 16), (64, 32, 4, 2, 1, 32), (64, 64, 2, 2, 0, 16), (256, 128, 4, 2, 1, 8)]


def candidates(c_in: int, c_out: int, k: int, s: int, p: int, device) -> dict[str, nn.Module]:
    layers = {"nn.ConvTranspose2d": nn.ConvTranspose2d(c_in, c_out, k, stride=s, padding=p, device=device)}
    orthogonal = OrthogonalConvTranspose2d(c_in, c_out, k, stride=s, padding=p, device=device)
    layers["orthofx"] = orthogonal
    layers["orthofx (build f32)"] = OrthogonalConvTranspose2d(c_in, c_out, k, stride=s, padding=p, device=device,
                                                              compute_dtype=torch.float32)
    layers["orthofx frozen"] = orthogonal.to_plain()
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=positive_int, default=64)
    parser.add_argument("--repeats", type=positive_int, default=7)
    common_arguments(parser, "orthogonal_transposed_<device>.json", device="auto")
    args = parser.parse_args()
    device, sync = setup(parser, args)
    rows = []
    for c_in, c_out, k, s, p, n in SHAPES:
        torch.manual_seed(0)
        layers = candidates(c_in, c_out, k, s, p, device)
        x = torch.randn(args.batch, c_in, n, n, device=device, requires_grad=True)

        def step(layer: nn.Module) -> None:
            layer(x).square().mean().backward()
            x.grad = None
            for q in layer.parameters():
                q.grad = None

        seconds = interleaved({name: (lambda layer=layer: step(layer)) for name, layer in layers.items()},
                              args.repeats, sync)
        base = seconds["nn.ConvTranspose2d"]
        shape = f"{c_in}->{c_out} k{k} s{s} p{p} {n}x{n}"
        for name, layer in layers.items():
            error = layer.orthogonality_error((n, n)) if isinstance(layer, OrthogonalConvTranspose2d) else None
            row = {"shape": shape, "candidate": name, "ms": seconds[name] * 1e3, "ratio": seconds[name] / base,
                   "max_sigma_error": error}
            rows.append(row)
            sigma = "" if error is None else f"max|sigma-1| {error:.1e}"
            print(f"{shape:>26}  {name:<20} {row['ms']:9.2f} ms  {row['ratio']:6.2f}x  {sigma}", flush=True)
    write_results(args.out, device, rows, batch=args.batch, repeats=args.repeats)


if __name__ == "__main__":
    main()
