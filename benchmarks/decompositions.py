"""Forward + backward time of orthofx's stable decompositions against torch's, side by side.

    python benchmarks/decompositions.py [--dims 64 256 512] [--batch 8] [--dtype float32] [--budget 1.0] [--threads N]
                                        [--device cuda]

Pairs (candidate vs baseline), each timed on the same inputs and interleaved run by run (A, B, then B, A, ...)
so that drift in machine load hits both alike and neither always runs after the other:
- eigh_stable (Taylor order 9)  vs torch.linalg.eigh
- svd_stable (Taylor order 9)   vs torch.linalg.svd(full_matrices=False)
- sqrtm_newton_schulz (5 it.)   vs the eigh-based square root V diag(sqrt L) V^T (torch.linalg.eigh)
for every dim, unbatched and batched. One timed run = forward, then backward with fixed random output
gradients (torch.autograd.grad). Prints a table of medians and ratios (median over adjacent run pairs of
candidate / baseline, robust to machine load that drifts) and writes
benchmarks/results/local/decompositions.json (ignored by git) or ``--out``. Quality bar (DESIGN.md): stable ops
within 1.5x of torch's.
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch

from orthofx.nn.decompositions import eigh_stable, sqrtm_newton_schulz, svd_stable
from timing import common_arguments, once, positive_float, positive_int, samples, setup, synchronizer, write_results


def _spd(batch, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(*batch, n, 2 * n, generator=g, dtype=torch.float64)
    S = X @ X.mT / (2 * n) + 1e-3 * torch.eye(n, dtype=torch.float64)
    return S.to(dtype)


def _general(batch, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*batch, n, n, generator=g, dtype=torch.float64).to(dtype)


def _eigh_sqrt(A):
    L, V = torch.linalg.eigh(A)
    return V @ torch.diag_embed(L.clamp_min(0).sqrt()) @ V.mT


PAIRS = {
    # name: (input maker, candidate, baseline)
    "eigh": (_spd, lambda A: eigh_stable(A, taylor_order=9), torch.linalg.eigh),
    "svd": (_general, lambda A: svd_stable(A, taylor_order=9),
            lambda A: torch.linalg.svd(A, full_matrices=False)),
    "sqrtm": (_spd, lambda A: sqrtm_newton_schulz(A, iterations=5), _eigh_sqrt),
}


def _runner(fn, A):
    with torch.no_grad():
        outs = fn(A)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(1234)
    grads = tuple(torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype).to(o.device) for o in outs)

    def run():
        X = A.detach().requires_grad_(True)
        res = fn(X)
        res = res if isinstance(res, tuple) else (res,)
        (gA,) = torch.autograd.grad(res, X, grads)
        return gA

    return run


def measure(name, n, batch, dtype, budget, device="cpu"):
    make, cand, base = PAIRS[name]
    A = make(batch, n, dtype, seed=n + len(batch)).to(device)
    run_c, run_b = _runner(cand, A), _runner(base, A)
    sync = synchronizer(device)
    run_c()  # warm-up (first calls allocate / dispatch-cache) before the estimate that sizes the row
    run_b()
    est = once(run_c, sync)[0] + once(run_b, sync)[0]
    reps = max(3, min(50, int(budget / max(est, 1e-6))))
    times = samples({"candidate": run_c, "baseline": run_b}, reps, sync, alternate=True)
    tc, tb = times["candidate"], times["baseline"]
    mc, mb = statistics.median(tc), statistics.median(tb)
    # the ratio is the median of the ratios of adjacent runs: robust to load that drifts during the row
    ratio = statistics.median(c / b for c, b in zip(tc, tb))
    return {"op": name, "n": n, "batch": batch[0] if batch else None, "dtype": str(dtype).replace("torch.", ""),
            "reps": reps, "candidate_ms": mc * 1e3, "baseline_ms": mb * 1e3, "ratio": ratio}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=positive_int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--budget", type=positive_float, default=1.0,
                        help="seconds of timed runs per row (about; 3 to 50 runs of each)")
    common_arguments(parser, "decompositions.json")
    args = parser.parse_args(argv)
    setup(parser, args)
    dtype = getattr(torch, args.dtype)
    rows = []
    header = f"{'op':6} {'n':>4} {'batch':>5} {'orthofx ms':>11} {'baseline ms':>12} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for n in args.dims:
        for batch in ((), (args.batch,)):
            for name in PAIRS:
                row = measure(name, n, batch, dtype, args.budget, args.device)
                rows.append(row)
                print(f"{name:6} {n:>4} {str(row['batch'] or '-'):>5} {row['candidate_ms']:>11.3f} "
                      f"{row['baseline_ms']:>12.3f} {row['ratio']:>6.2f}", flush=True)
    stable = [r for r in rows if r["op"] in ("eigh", "svd")]
    worst = max(stable, key=lambda r: r["ratio"])
    print(f"\nworst stable-op ratio: {worst['ratio']:.2f} ({worst['op']}, n={worst['n']}, batch={worst['batch']}); "
          f"bar 1.5x: {'met' if worst['ratio'] <= 1.5 else 'NOT met'}")
    write_results(
        args.out, args.device, rows, machine=platform.machine(), processor=platform.processor(),
        python=platform.python_version(),
        baselines={"eigh": "torch.linalg.eigh", "svd": "torch.linalg.svd(full_matrices=False)",
                   "sqrtm": "eigh-based V diag(sqrt L) V^T"},
        candidates={"eigh": "eigh_stable(taylor_order=9)", "svd": "svd_stable(taylor_order=9)",
                    "sqrtm": "sqrtm_newton_schulz(iterations=5)"},
        timing="forward+backward, runs interleaved (A B, B A, ...); ms = medians; ratio = median of "
               "candidate/baseline over adjacent run pairs")
    return rows


if __name__ == "__main__":
    main()
