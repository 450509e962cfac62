"""Overhead of P4's Pre-SVD optimizer hooks, NOG and OLR, per training step of ``dbn_cnn`` (a script, not a test).

Every variant is the built-in ``dbn_cnn`` transformed with the stable decomposition (pass ``svd_conditioning``,
Taylor order 9, condition-number monitor on, as in the ``svd`` preset); the Pre-SVD layer ``conv1`` then gets:

* ``plain``      no pre_svd rule (the baseline: stable eigh + monitor only);
* ``+NOG``       Nearest Orthogonal Gradient (the gradient of conv1 becomes its polar factor: one float64 SVD);
* ``+OLR``       Optimal Learning Rate (three dot products and the lr of conv1's own param group);
* ``+NOG+OLR``   both (the ``svd`` preset's Pre-SVD treatment).

``eager`` (the untransformed model: plain ``torch.linalg.eigh``, no monitor) is timed alongside for reference.

One training step = forward, cross-entropy (plus ``orthofx.penalty``: zero here, a few microseconds),
``zero_grad``, ``backward``, ``optimizer.step()`` (SGD with momentum; ``orthofx.attach`` runs the hooks inside
``step``) on a fixed random batch of 1x8x8 inputs: ``timing.training_step``. The variants run in
round-robin, ``--inner`` steps per variant per round, so that all of them see the same machine state; the table
gives the median and the minimum over the rounds of the time per step, and the median's ratio to ``plain``.
The step-time differences are small against a shared machine's noise, so the hooks are also timed on their own:
each hook's ``before_step`` + ``after_step`` on conv1 after a backward pass (median of ``--hook-calls`` calls, the
hooks taking turns).

    python benchmarks/svd_passes.py            # batches 64 and 256, 30 rounds of 10 steps
    python benchmarks/svd_passes.py --quick    # batch 64, 10 rounds of 5 steps

Writes ``benchmarks/results/local/svd_passes.json`` (ignored by git) or ``--out``. Uses one CPU thread by default
(``--threads``): the matrices are tiny and thread synchronisation would dominate on a shared machine.

``--export`` measures instead the ONNX inference form of the meta-layer (needs onnx, onnxscript, onnxruntime):
a Linear (5 -> 6) and the per-sample 6 x 6 covariance ``+ eps I`` of its outputs, whose square root and inverse
square root are computed through ``torch.linalg.eigh``, transformed with the ``svd`` preset and exported with
``orthofx.export(gm, "m.onnx")``, for ``eps`` from 1e-1 to 1e-5 (kappa from ~10 to ~1e5). For each: kappa, the
Newton-Schulz iterations ``export`` chose, the PyTorch Newton-Schulz form's and onnxruntime's largest difference
from the exact frozen model, the float32 exact model's own difference from a float64 eigendecomposition, and
whether the export passed its 1e-4 check. Writes ``benchmarks/results/local/svd_export.json`` or ``--out``.

    python benchmarks/svd_passes.py --export
    python benchmarks/svd_passes.py --export --eps 1e-1 1e-4    # two of the five (a smoke run: one passes)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics

import torch
import torch.nn.functional as F

import orthofx
from timing import (common_arguments, default_out, interleaved, json_path, positive_float, positive_int, samples, setup,
                    training_step, write_results)

VARIANTS = {
    "plain": None,
    "+NOG": {"weight": "none", "nog": True, "olr": False},
    "+OLR": {"weight": "none", "nog": False, "olr": True},
    "+NOG+OLR": {"weight": "none", "nog": True, "olr": True},
}


def policy(pre_svd: dict | None) -> dict:
    rules = [{"name": "stable-eigh", "match": {"op": "linalg.eigh"}, "apply": "svd_conditioning",
              "with": {"method": "taylor", "taylor_order": 9, "monitor": True}}]
    if pre_svd is not None:
        rules.append({"name": "pre-svd", "match": {"feeds": "linalg.eigh"}, "apply": "pre_svd", "with": pre_svd})
    return {"rules": rules}


def build_steps(batch: int, width: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 8, 8, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    steps = {}
    torch.manual_seed(seed)
    eager = orthofx.models.get("dbn_cnn", width=width)
    for name, pre_svd in VARIANTS.items():
        torch.manual_seed(seed)
        model = orthofx.models.get("dbn_cnn", width=width)
        gm = orthofx.transform(model, policy(pre_svd), example_inputs=(x[:8],))
        hooks = [type(h).__name__ for h in orthofx.manifest_of(gm).optimizer_hooks]
        expected = (["NearestOrthogonalGradient"] if pre_svd and pre_svd["nog"] else []) + (
            ["OptimalLearningRate"] if pre_svd and pre_svd["olr"] else [])
        if sorted(hooks) != sorted(expected):
            raise RuntimeError(f"{name}: expected hooks {expected}, the transform recorded {hooks}")
        steps[name] = training_step(gm, x, y, orthofx_terms=True)
    steps["eager"] = training_step(eager, x, y, orthofx_terms=False)
    return steps


def per_step(steps: dict, rounds: int, inner: int) -> dict[str, list[float]]:
    """Seconds per step of each variant, one sample per round of ``inner`` steps; the variants take turns within
    a round (``timing.samples``)."""
    def run(step):
        for _ in range(inner):
            step()

    times = samples({name: (lambda step=step: run(step)) for name, step in steps.items()}, rounds)
    return {name: [seconds / inner for seconds in values] for name, values in times.items()}


def hook_times(batch: int, width: int, calls: int, seed: int = 0) -> dict[str, float]:
    """Median seconds of each Pre-SVD hook's before_step + after_step (conv1, with its gradient), alone."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 8, 8, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    torch.manual_seed(seed)
    gm = orthofx.transform(orthofx.models.get("dbn_cnn", width=width), policy(VARIANTS["+NOG+OLR"]),
                           example_inputs=(x[:8],))
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.01, momentum=0.9)
    handle = orthofx.attach(optimizer, gm)
    F.cross_entropy(gm(x), y).backward()

    def hook_step(hook):
        hook.before_step(gm, optimizer)
        hook.after_step(gm, optimizer)

    out = interleaved({type(hook).__name__: (lambda hook=hook: hook_step(hook)) for hook in handle.hooks}, calls)
    handle.remove()
    return out


class CovarianceRoots(torch.nn.Module):
    """Per-sample covariance of a Linear's outputs + eps I; its square root and its inverse square root (eigh)."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps
        self.proj = torch.nn.Linear(5, 6, bias=False)

    def forward(self, x):
        f = self.proj(x)
        cov = f.mT @ f / f.shape[1] + self.eps * torch.eye(6)
        evals, evecs = torch.linalg.eigh(cov)
        return ((evecs * evals.sqrt().unsqueeze(-2)) @ evecs.mT).flatten(1), \
            ((evecs * evals.rsqrt().unsqueeze(-2)) @ evecs.mT @ f.mT).flatten(1)


#: The ``--export`` eps values: kappa from ~10 to ~1e5.
EXPORT_EPS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)


def export_accuracy(out: str, batch: int = 4, vectors: int = 40, epsilons=EXPORT_EPS) -> list[dict]:
    """The ``--export`` measurement (see the module docstring)."""
    import tempfile
    import warnings

    rows = []
    x = torch.randn(batch, vectors, 5, generator=torch.Generator().manual_seed(0))
    print(f"{'eps':>7}  {'kappa':>8}  {'T':>3}  {'NS vs exact':>11}  {'onnx vs exact':>13}  {'f32 vs f64':>10}  result")
    for eps in epsilons:
        torch.manual_seed(0)
        model = CovarianceRoots(eps)
        with torch.no_grad():
            f = x.double() @ model.proj.weight.double().T
            cov = f.mT @ f / vectors + eps * torch.eye(6, dtype=torch.float64)
            lam, vec = torch.linalg.eigh(cov)
            exact64 = [((vec * lam.sqrt().unsqueeze(-2)) @ vec.mT).flatten(1),
                       ((vec * lam.rsqrt().unsqueeze(-2)) @ vec.mT @ f.mT).flatten(1)]
            own = max(float((a.double() - b).abs().max()) for a, b in zip(model(x), exact64))
        kappa = float((lam[:, -1] / lam[:, 0]).max())
        gm = orthofx.transform(model, "svd", example_inputs=(x,))
        row = {"eps": eps, "kappa": kappa, "float32_exact_vs_float64": own}
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                result = orthofx.export(gm, os.path.join(tmp, "m.onnx"), example_inputs=(x,))
                row.update(passed=True, iterations=result.newton_schulz.iterations,
                           newton_schulz_vs_exact=result.newton_schulz.max_abs_diff, onnx_vs_exact=result.max_abs_diff)
            except orthofx.ExportError as exc:
                row.update(passed=False, error=str(exc)[:200])
        rows.append(row)
        fmt = lambda key: f"{row[key]:.2g}" if key in row else "-"  # noqa: E731
        print(f"{eps:>7.0e}  {kappa:>8.3g}  {row.get('iterations', '-'):>3}  {fmt('newton_schulz_vs_exact'):>11}  "
              f"{fmt('onnx_vs_exact'):>13}  {own:>10.2g}  {'ok' if row['passed'] else 'ExportError'}")
        if not row["passed"]:
            print(f"         {row['error']}")
    write_results(out, "cpu", rows)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 64 only, 10 rounds of 5 steps")
    parser.add_argument("--batches", type=positive_int, nargs="+", default=None,
                        help="batch sizes (default 64 256)")
    parser.add_argument("--width", type=positive_int, default=16, help="dbn_cnn width (conv1's output channels)")
    parser.add_argument("--rounds", type=positive_int, default=None, help="rounds (default 30; 10 quick)")
    parser.add_argument("--inner", type=positive_int, default=None,
                        help="steps per variant per round (default 10; 5 quick)")
    parser.add_argument("--hook-calls", type=positive_int, default=200, help="calls per hook in the isolated timing")
    parser.add_argument("--out", type=json_path, default=None,
                        help="JSON file for the results, in an existing folder (default: benchmarks/results/local/"
                             "svd_passes.json, svd_export.json with --export; ignored by git)")
    parser.add_argument("--export", action="store_true", help="measure the ONNX inference form instead")
    parser.add_argument("--eps", type=positive_float, nargs="+", default=None,
                        help="with --export: the eps values measured (default 1e-1 1e-2 1e-3 1e-4 1e-5)")
    common_arguments(parser, None, device=None, threads=1)  # CPU only; --out above: two defaults
    args = parser.parse_args(argv)
    setup(parser, args)
    if args.eps is not None and not args.export:
        parser.error("--eps sets the covariances of --export; it does not apply without --export")
    if args.export:
        return export_accuracy(args.out or default_out("svd_export.json"), epsilons=args.eps or EXPORT_EPS)
    args.out = args.out or default_out("svd_passes.json")
    batches = args.batches or ([64] if args.quick else [64, 256])
    rounds = args.rounds or (10 if args.quick else 30)
    inner = args.inner or (5 if args.quick else 10)
    print(f"dbn_cnn width {args.width}, 1x8x8 inputs; torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
          f"{rounds} rounds x {inner} steps per variant, interleaved")
    rows = []
    header = f"{'batch':>5}  {'variant':<9}  {'median ms':>9}  {'min ms':>7}  {'vs plain':>8}  {'overhead ms':>11}"
    print(header)
    for batch in batches:
        times = per_step(build_steps(batch, args.width), rounds, inner)
        base = statistics.median(times["plain"])
        for name, values in times.items():
            median = statistics.median(values)
            row = {"batch": batch, "variant": name, "median_s": median, "min_s": min(values),
                   "ratio_to_plain": median / base, "overhead_s": median - base}
            rows.append(row)
            print(f"{batch:>5}  {name:<9}  {median * 1e3:>9.3f}  {min(values) * 1e3:>7.3f}  {median / base:>8.3f}  "
                  f"{(median - base) * 1e3:>+11.3f}")
    hooks = []
    for batch in batches[:1]:  # the hooks see only conv1's weight and gradient: the batch size does not matter
        for name, seconds in hook_times(batch, args.width, args.hook_calls).items():
            hooks.append({"hook": name, "median_s": seconds})
    plain = next(r["median_s"] for r in rows if r["variant"] == "plain" and r["batch"] == batches[0])
    for hook in hooks:
        hook["fraction_of_plain_step"] = hook["median_s"] / plain
        print(f"hook alone: {hook['hook']:<26} {hook['median_s'] * 1e3:.3f} ms per step "
              f"({100 * hook['fraction_of_plain_step']:.1f}% of the plain step at batch {batches[0]})")
    write_results(args.out, "cpu", rows, machine=platform.machine(), cpus=os.cpu_count(), quick=args.quick,
                  width=args.width, rounds=rounds, inner=inner, hooks=hooks)
    return rows


if __name__ == "__main__":
    main()
