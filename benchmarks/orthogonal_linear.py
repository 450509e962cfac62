"""Orthogonal linear layers: ``orthofx.nn.OrthogonalLinear`` against torch's ``parametrizations.orthogonal``
(its three maps) and ``nn.Linear``, on square, thin and wide weights (a script, not a test).

For each shape ``in -> out`` and batch: median wall time of one training step of the layer alone (forward of a
batch, ``sum`` of a fixed projection of the output, backward, which is where a parametrization pays for its
weight), timed side by side (interleaved repeats), the ratio to ``nn.Linear``, and the orthogonality defect of the
weight each one uses, ``max |W W^T - I|`` (rows, ``out <= in``) or ``max |W^T W - I|`` (columns), computed in
float64 after a few optimizer steps (Adam, lr 1e-2) so that the parameters are away from their initial values.

Candidates: ``nn.Linear`` (no constraint); ``OrthogonalLinear`` with its default float64 build and with
``compute_dtype=torch.float32``; ``torch.nn.utils.parametrizations.orthogonal`` with ``orthogonal_map``
``matrix_exp``, ``cayley`` (both act on an ``n x n`` matrix, ``n = max(in, out)``, also for thin weights) and
``householder`` (``min(in, out)`` reflections of length ``max(in, out)``). geotorch is measured when installed.
torch's ``n x n`` maps are skipped above ``--square-max-n`` (default 1024; on a 4096 -> 64 weight they would
exponentiate or invert a 4096 x 4096 matrix at every step, minutes per step on one CPU thread).

    python benchmarks/orthogonal_linear.py --threads 1

Writes ``benchmarks/results/orthogonal_linear_<device>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn.utils import parametrizations

from orthofx.nn import OrthogonalLinear
from timing import common_arguments, interleaved, positive_int, setup, write_results

# (in_features, out_features): square, a thin projection down, a wide embedding up, a mild rectangle
SHAPES = [(256, 256), (1024, 1024), (4096, 64), (64, 4096), (1024, 256)]
TORCH_MAPS = ("matrix_exp", "cayley", "householder")


def torch_orthogonal(in_features: int, out_features: int, orthogonal_map: str, device) -> nn.Module:
    layer = nn.Linear(in_features, out_features, device=device)
    return parametrizations.orthogonal(layer, orthogonal_map=orthogonal_map)


def geotorch_orthogonal(in_features: int, out_features: int, device) -> nn.Module | None:
    try:
        import geotorch
    except ImportError:
        return None
    layer = nn.Linear(in_features, out_features, device=device)
    geotorch.orthogonal(layer, "weight")
    return layer


def candidates(in_features: int, out_features: int, device, skip: set[str], square_max_n: int
               ) -> dict[str, nn.Module]:
    if max(in_features, out_features) > square_max_n:
        skip = skip | {"torch matrix_exp", "torch cayley"}
    make = {
        "nn.Linear": lambda: nn.Linear(in_features, out_features, device=device),
        "orthofx": lambda: OrthogonalLinear(in_features, out_features, device=device),
        "orthofx (build f32)": lambda: OrthogonalLinear(in_features, out_features, device=device,
                                                        compute_dtype=torch.float32),
        **{f"torch {name}": (lambda name=name: torch_orthogonal(in_features, out_features, name, device))
           for name in TORCH_MAPS},
        "geotorch": lambda: geotorch_orthogonal(in_features, out_features, device),
    }
    layers = {name: build() for name, build in make.items() if name not in skip}
    return {name: layer for name, layer in layers.items() if layer is not None}


def orthogonality_defect(weight: torch.Tensor) -> float:
    w = weight.detach().double()
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return float((gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)).abs().max())


def train_a_little(layer: nn.Module, x: torch.Tensor, target: torch.Tensor, steps: int = 5) -> None:
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(layer(x), target).backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=positive_int, default=256)
    parser.add_argument("--repeats", type=positive_int, default=9)
    parser.add_argument("--square-max-n", type=positive_int, default=1024,
                        help="skip torch's n x n maps (matrix_exp, cayley) above this n = max(in, out)")
    parser.add_argument("--skip", nargs="*", default=[], help="candidate names to leave out")
    common_arguments(parser, "orthogonal_linear_<device>.json", device="auto")
    args = parser.parse_args()
    device, sync = setup(parser, args)
    rows = []
    for in_features, out_features in SHAPES:
        torch.manual_seed(0)
        layers = candidates(in_features, out_features, device, set(args.skip), args.square_max_n)
        x = torch.randn(args.batch, in_features, device=device)
        target = torch.randn(args.batch, out_features, device=device)
        projection = torch.randn(args.batch, out_features, device=device)

        def step(layer: nn.Module) -> None:
            (layer(x) * projection).sum().backward()
            for p in layer.parameters():
                p.grad = None

        seconds = interleaved({name: (lambda layer=layer: step(layer)) for name, layer in layers.items()},
                              args.repeats, sync)
        base = seconds.get("nn.Linear")
        for name, layer in layers.items():
            train_a_little(layer, x, target)
            row = {"shape": f"{in_features}->{out_features}", "candidate": name, "ms": seconds[name] * 1e3,
                   "ratio_to_linear": seconds[name] / base if base else None,
                   "defect": None if name == "nn.Linear" else orthogonality_defect(layer.weight)}
            rows.append(row)
            ratio = "" if base is None else f"{row['ratio_to_linear']:7.2f}x"
            defect = "" if row["defect"] is None else f"defect {row['defect']:.1e}"
            print(f"{row['shape']:>11}  {name:<20} {row['ms']:9.2f} ms  {ratio}  {defect}", flush=True)
    write_results(args.out, device, rows, batch=args.batch, repeats=args.repeats, square_max_n=args.square_max_n)


if __name__ == "__main__":
    main()
