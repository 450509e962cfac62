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
``householder`` (``min(in, out)`` reflections of length ``max(in, out)``). geotorch is measured when installed
(else a note says it was not). torch's ``n x n`` maps are skipped above ``--square-max-n`` (default 1024; on a
4096 -> 64 weight they would exponentiate or invert a 4096 x 4096 matrix at every step, minutes per step on one
CPU thread).

    python benchmarks/orthogonal_linear.py --threads 1            # the full run: several minutes on one CPU thread
    python benchmarks/orthogonal_linear.py --quick --threads 1    # smoke run: small shapes, batch 16, 3 repeats

``--quick`` times the same kinds of shape (square, thin, wide, a rectangle) at sizes of 256 and below, where every
candidate takes milliseconds. Writes ``benchmarks/results/local/orthogonal_linear_<device>.json`` (ignored by git)
or ``--out``, after every shape: a run stopped early (Ctrl-C, a time limit) keeps the shapes it finished.
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
#: ``--quick``'s shapes: the same four kinds, small enough for torch's n x n maps on every one
QUICK_SHAPES = [(64, 64), (256, 16), (16, 256), (128, 32)]
TORCH_MAPS = ("matrix_exp", "cayley", "householder")


def torch_orthogonal(in_features: int, out_features: int, orthogonal_map: str, device) -> nn.Module:
    layer = nn.Linear(in_features, out_features, device=device)
    return parametrizations.orthogonal(layer, orthogonal_map=orthogonal_map)


def geotorch_available() -> tuple[bool, list[str]]:
    """Whether geotorch imports, and the note to print and record when it does not (the peer is optional)."""
    try:
        import geotorch  # noqa: F401
    except ImportError as exc:
        return False, [f"geotorch not timed: it does not import ({exc}); pip install geotorch to add it"]
    return True, []


def geotorch_orthogonal(in_features: int, out_features: int, device) -> nn.Module:
    import geotorch
    layer = nn.Linear(in_features, out_features, device=device)
    geotorch.orthogonal(layer, "weight")
    return layer


def candidates(in_features: int, out_features: int, device, skip: set[str], square_max_n: int
               ) -> dict[str, nn.Module]:
    """The layers timed on one shape, by name, less ``skip`` (geotorch's only where it imports)."""
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
    return {name: build() for name, build in make.items() if name not in skip}


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
    parser.add_argument("--batch", type=positive_int, default=None, help="default 256; 16 with --quick")
    parser.add_argument("--repeats", type=positive_int, default=None, help="default 9; 3 with --quick")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: shapes {', '.join(f'{i}->{o}' for i, o in QUICK_SHAPES)}, batch 16, "
                             "3 repeats (about 10 s on one idle CPU thread)")
    parser.add_argument("--square-max-n", type=positive_int, default=1024,
                        help="skip torch's n x n maps (matrix_exp, cayley) above this n = max(in, out)")
    parser.add_argument("--skip", nargs="*", default=[], help="candidate names to leave out")
    common_arguments(parser, "orthogonal_linear_<device>.json", device="auto")
    args = parser.parse_args()
    device, sync = setup(parser, args)
    args.batch = args.batch or (16 if args.quick else 256)
    args.repeats = args.repeats or (3 if args.quick else 9)
    has_geotorch, notes = geotorch_available()
    skip = set(args.skip) | (set() if has_geotorch else {"geotorch"})
    for note in notes:
        print(f"note: {note}", flush=True)
    rows: list[dict] = []

    def write() -> None:
        write_results(args.out, device, rows, batch=args.batch, repeats=args.repeats, quick=args.quick,
                      square_max_n=args.square_max_n, notes=notes)

    for in_features, out_features in QUICK_SHAPES if args.quick else SHAPES:
        torch.manual_seed(0)
        layers = candidates(in_features, out_features, device, skip, args.square_max_n)
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
        write()  # after every shape: a run cut short keeps the shapes it finished
    for note in notes:  # again below the table, where a reader of the run looks
        print(f"note: {note}")


if __name__ == "__main__":
    main()
