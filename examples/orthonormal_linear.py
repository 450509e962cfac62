"""P1 at small scale: Riemannian gradient descent on orthonormal deep linear networks converges linearly, and
more slowly the deeper the network.

Teacher-student regression on whitened synthetic data: inputs x ~ N(0, I) (the sample is whitened exactly, so
X^T X / n = I), targets y = W_teacher x with W_teacher = Q diag(s), Q Haar-orthogonal and s evenly spaced in
[0.5, 1.5] (orthonormal up to a spread of scales, which only the free layer can supply). The student is
``orthofx.models.get("deep_linear", depth=N)``: N bias-free square Linears. The policy

    isometric_init on every Linear (orthogonal initialisation, seeded)
    riemannian on every Linear with free: first (W_1 unconstrained, W_2 .. W_N on the Stiefel manifold, as in P1)

is applied with ``orthofx.transform``; plain full-batch SGD runs with ``orthofx.attach``, so every step is a
Riemannian gradient step with the polar retraction. Loss: 0.5 * mean_i ||f(x_i) - y_i||^2.

For each depth the script tries a grid of learning rates and keeps the one that reaches the target loss in the
fewest steps (runs that blow up, or that have not gained two orders of magnitude after 100 steps, are dropped).
It prints a table (depth, learning rate, steps to reach loss 1e-6, final loss, the per-step rate fitted to
log loss over the linear phase, the constrained layers' orthogonality defect) and writes a PNG of log loss
against step per depth (straight lines: linear convergence).

    python examples/orthonormal_linear.py [--out orthonormal_linear.png] [--quick]

What it shows (width 16, 64 samples; measured): the best step size halves as the depth doubles (0.5, 0.25, 0.12
for depth 2, 4, 8; larger steps stall or blow up), and log loss falls on a straight line whose slope is the free
layer's contraction (1 - lr)^2 per step: rates 0.25, 0.56, 0.77, so 12, 28 and 61 steps to reach 1e-6. The
constrained layers stay orthonormal to 1e-15.

Runs in well under a minute on a CPU (``--quick``: two small depths and a short grid, for the tests). Matrices
are tiny, so the script uses one CPU thread: thread synchronisation would cost more than the work.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import orthofx
from orthofx.nn.stiefel import flatten_weight, orthogonality_defect, random_orthonormal

from _cli import description, png_path, positive_int, require  # examples/_cli.py: argument checks

TARGET = 1e-6      # loss level whose step count the table reports
STOP = 1e-11       # runs stop here (float64), so the plot shows the straight line well below TARGET
LEARNING_RATES = (1.0, 0.7, 0.5, 0.35, 0.25, 0.18, 0.12, 0.08)


def make_data(width: int, samples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly whitened inputs (n x d, X^T X / n = I) and teacher outputs y = W_teacher x."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, width, generator=generator, dtype=torch.float64)
    x = x - x.mean(0)
    evals, evecs = torch.linalg.eigh(x.T @ x / samples)
    x = x @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    teacher = random_orthonormal(width, width, generator=generator, dtype=torch.float64)
    teacher = teacher * torch.linspace(0.5, 1.5, width, dtype=torch.float64)
    return x, x @ teacher.T


def policy(seed: int) -> dict:
    return {"rules": [
        {"name": "init", "match": {"type": "Linear"}, "apply": "isometric_init", "with": {"seed": seed}},
        {"name": "stiefel", "match": {"type": "Linear"}, "apply": "riemannian", "with": {"free": "first"}},
    ]}


def train(depth: int, width: int, lr: float, x: torch.Tensor, y: torch.Tensor, max_steps: int,
          seed: int = 1) -> dict:
    """Full-batch Riemannian SGD; returns the loss curve and the constrained layers' final defect."""
    model = orthofx.models.get("deep_linear", depth=depth, width=width, in_features=width, out_features=width)
    gm = orthofx.transform(model.double(), policy(seed))
    optimizer = torch.optim.SGD(gm.parameters(), lr=lr)
    handle = orthofx.attach(optimizer, gm)
    losses: list[float] = []
    ok = True
    for step in range(max_steps + 1):
        loss = 0.5 * (gm(x) - y).square().sum(1).mean()
        value = float(loss.detach())
        losses.append(value)
        if not math.isfinite(value) or value > 1e3 * losses[0] or (step >= 100 and value > 1e-2 * losses[0]):
            ok = False  # diverged or stalled: the step size is too large for this depth
            break
        if value < STOP or step == max_steps:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    handle.remove()
    constrained = [hook.site for hook in orthofx.manifest_of(gm).optimizer_hooks]
    defect = max((float(orthogonality_defect(flatten_weight(gm.get_submodule(s).weight.detach())))
                  for s in constrained), default=0.0)
    return {"depth": depth, "lr": lr, "losses": losses, "ok": ok and losses[-1] < TARGET, "defect": defect}


def steps_to(losses: list[float], level: float) -> int | None:
    return next((i for i, v in enumerate(losses) if v < level), None)


def fitted_rate(losses: list[float]) -> float:
    """exp(slope) of a least-squares line through log loss over the linear phase (loss between
    1e-2 * initial and the end of the run): the loss ratio per step."""
    start = steps_to(losses, 1e-2 * losses[0]) or 0
    tail = torch.tensor(losses[start:], dtype=torch.float64).log()
    if len(tail) < 3:
        return float("nan")
    steps = torch.arange(len(tail), dtype=torch.float64)
    slope = ((steps - steps.mean()) * (tail - tail.mean())).sum() / (steps - steps.mean()).square().sum()
    return float(slope.exp())


def best_run(depth: int, width: int, rates: tuple[float, ...], x, y, max_steps: int) -> dict | None:
    """The learning rate of ``rates`` that reaches TARGET in the fewest steps."""
    best = None
    for lr in rates:
        run = train(depth, width, lr, x, y, max_steps)
        if run["ok"] and (best is None or steps_to(run["losses"], TARGET) < steps_to(best["losses"], TARGET)):
            best = run
    return best


def plot(runs: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        ax.semilogy(run["losses"], label=f"depth {run['depth']} (lr {run['lr']:g}, rate {run['rate']:.3f}/step)")
    ax.axhline(TARGET, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Riemannian GD, orthonormal deep linear nets, first layer free (P1)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--out", type=png_path, default="orthonormal_linear.png",
                        help="PNG path (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="depths 2 and 4, width 8, short grid (for tests)")
    parser.add_argument("--width", type=positive_int, default=None,
                        help="layer width (default 16; 8 with --quick)")
    args = parser.parse_args(argv)
    require(parser, "matplotlib")

    torch.set_num_threads(1)
    width = args.width if args.width is not None else (8 if args.quick else 16)
    depths = (2, 4) if args.quick else (2, 4, 8)
    rates = (0.5, 0.25, 0.12) if args.quick else LEARNING_RATES
    max_steps = 200 if args.quick else 400
    x, y = make_data(width, samples=4 * width)

    start = time.perf_counter()
    runs = []
    print(f"teacher-student, width {width}, {4 * width} whitened samples, float64; learning rate: the fastest of "
          f"{', '.join(f'{r:g}' for r in rates)}")
    header = (f"{'depth':>5}  {'lr':>5}  {'steps to 1e-6':>13}  {'final loss':>10}  {'rate/step':>9}  "
              f"{'orth defect':>11}")
    print(header)
    for depth in depths:
        run = best_run(depth, width, rates, x, y, max_steps)
        if run is None:
            print(f"{depth:>5}  no learning rate of the grid converged within {max_steps} steps")
            continue
        run["rate"] = fitted_rate(run["losses"])
        runs.append(run)
        print(f"{depth:>5}  {run['lr']:>5g}  {steps_to(run['losses'], TARGET):>13}  {run['losses'][-1]:>10.2e}  "
              f"{run['rate']:>9.4f}  {run['defect']:>11.1e}")
    plot(runs, args.out)
    print(f"wrote {args.out} ({time.perf_counter() - start:.1f} s)")
    return runs


if __name__ == "__main__":
    main()
