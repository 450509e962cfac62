"""Orthonormal columns from an unconstrained matrix: Householder QR (``orthofx.nn.stiefel.orthonormal``, what the
layers use) against Cholesky QR, a decision record (a script, not a test).

Cholesky QR gives the same ``Q`` as sign-corrected Householder QR (the QR factor with a positive ``R`` diagonal is
unique): ``R^T R = A^T A`` (Cholesky), ``Q = A R^{-1}`` (triangular solve). Done twice (CholeskyQR2) it is
orthonormal to working precision when ``kappa(A)^2 * eps < 1``; a shifted first pass (Fukaya et al.'s sCholeskyQR3,
shift ``11 (pq + q(q+1)) eps ||A||_F^2``) extends that to ``kappa(A) * eps < 1``. It is only matrix products,
one Cholesky and one triangular solve per pass, which is why it was measured against cuSOLVER's QR on a GPU.

For each shape and dtype: median wall time of forward + backward (interleaved), GPU kernel time (torch.profiler,
CUDA only), the largest difference from the Householder ``Q`` and the orthogonality defect ``max|Q^T Q - I|``.

    python benchmarks/orthonormal.py --device cuda

Writes ``benchmarks/results/local/orthonormal_<device>.json`` (ignored by git) or ``--out``.
"""

from __future__ import annotations

import argparse

import torch

from orthofx.nn.stiefel import orthonormal
from timing import common_arguments, interleaved, positive_int, setup, write_results

SHAPES = [(64, 32), (128, 64), (256, 128), (512, 256), (256, 256), (4, 128, 64)]


def cholesky_qr(a: torch.Tensor) -> torch.Tensor:
    """``A R^{-1}`` with ``R^T R = A^T A``: one pass of Cholesky QR of a tall ``A``."""
    lower = torch.linalg.cholesky(a.mT @ a)
    return torch.linalg.solve_triangular(lower, a.mT, upper=False).mT


def cholesky_qr2(a: torch.Tensor) -> torch.Tensor:
    return cholesky_qr(cholesky_qr(a))


def shifted_cholesky_qr3(a: torch.Tensor) -> torch.Tensor:
    p, q = a.shape[-2:]
    gram = a.mT @ a
    shift = 11 * (p * q + q * (q + 1)) * torch.finfo(a.dtype).eps * gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    lower = torch.linalg.cholesky(gram + shift[..., None, None] * torch.eye(q, dtype=a.dtype, device=a.device))
    return cholesky_qr2(torch.linalg.solve_triangular(lower, a.mT, upper=False).mT)


ROUTES = {"householder": lambda a: orthonormal(a, tall=True), "cholesky_qr2": cholesky_qr2,
          "shifted_cholesky_qr3": shifted_cholesky_qr3}


def gpu_ms(fn, device: torch.device, calls: int = 10) -> float | None:
    """Mean CUDA kernel time of one call, from the profiler (None off CUDA)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / calls / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_int, default=20)
    common_arguments(parser, "orthonormal_<device>.json", device="auto", threads=None)
    args = parser.parse_args()
    device, sync = setup(parser, args)
    rows = []
    for dtype in (torch.float64, torch.float32):
        for shape in SHAPES:
            torch.manual_seed(0)
            # a well-conditioned matrix near the Stiefel manifold, as a trained layer's parameters are
            a = torch.linalg.qr(torch.randn(*shape, dtype=dtype, device=device))[0]
            a = (a + 0.1 * torch.randn_like(a)).requires_grad_(True)
            upstream = torch.randn_like(a)

            def step(route):
                (route(a) * upstream).sum().backward()
                a.grad = None

            fns = {name: (lambda route=route: step(route)) for name, route in ROUTES.items()}
            seconds = interleaved(fns, args.repeats, sync)
            reference = orthonormal(a.detach(), tall=True)
            eye = torch.eye(shape[-1], dtype=dtype, device=device)
            for name, route in ROUTES.items():
                q = route(a.detach())
                row = {"dtype": str(dtype).removeprefix("torch."), "shape": list(shape), "route": name,
                       "ms": seconds[name] * 1e3, "gpu_ms": gpu_ms(fns[name], device),
                       "max_diff_from_householder": float((q - reference).abs().max()),
                       "orthogonality_defect": float((q.mT @ q - eye).abs().max())}
                rows.append(row)
                print(row, flush=True)
    # ``device`` is written as its name (the GPU's, or "cpu"); ``device_spec`` keeps the argument (a CUDA index)
    write_results(args.out, device, rows, device_spec=str(device))


if __name__ == "__main__":
    main()
