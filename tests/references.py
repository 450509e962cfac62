"""Independent float64 references shared by several test files (written here, not taken from orthofx)."""

from __future__ import annotations

import collections
import copy
import itertools
import math

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode


def polar64(a: torch.Tensor) -> torch.Tensor:
    """``U V^T`` of ``a = U S V^T`` by a float64 SVD: the nearest matrix with orthonormal columns."""
    u, _, vh = torch.linalg.svd(a.to(torch.float64), full_matrices=False)
    return u @ vh


def tangent64(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``G - W sym(W^T G)`` (square ``W``), in float64: ``G`` projected on the tangent space at ``W``."""
    w, g = w.to(torch.float64), g.to(torch.float64)
    s = w.T @ g
    return g - w @ (s + s.T) / 2


def circular_operator64(weight: torch.Tensor, stride=1, groups: int = 1, grid=None) -> torch.Tensor:
    """The dense matrix (float64) of the circular convolution ``x -> conv(x, weight, stride, groups)`` on inputs of
    spatial size ``grid`` (default: the smallest ``S N`` with ``S N >= 2 k - 1``, P0 Theorem 7), built one basis
    vector at a time: input ``e_j`` padded circularly by ``k - 1`` on the right gives column ``j``."""
    w = weight.detach().to(torch.float64)
    d = w.dim() - 2
    ks = w.shape[2:]
    ss = (stride,) * d if isinstance(stride, int) else tuple(stride)
    if grid is None:
        grid = tuple(s * -(-(2 * k - 1) // s) for k, s in zip(ks, ss))
    channels = w.shape[1] * groups
    basis = torch.eye(channels * math.prod(grid), dtype=torch.float64).reshape(-1, channels, *grid)
    pad = [p for k in reversed(ks) for p in (0, k - 1)]
    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    columns = conv(F.pad(basis, pad, mode="circular"), w, stride=ss, groups=groups)
    return columns.reshape(columns.shape[0], -1).T


def lorth64(weight: torch.Tensor, stride=1, groups: int = 1) -> float:
    """P0's L_orth from its definition on the dense operator (float64): a Linear weight ``W`` gives
    ``||W W^T - I||_F^2`` (out <= in) or ``||W^T W - I||_F^2``; a conv weight gives ``||A A^T - I||_F^2`` (row
    orthogonal case, ``M <= C prod(S)``) or ``||A^T A - I||_F^2`` of the circular operator ``A`` on the Theorem 7
    grid, divided by the number of output positions ``N^d`` (Theorem 7: ``N^d L_orth`` is that Frobenius error)."""
    w = weight.detach().to(torch.float64)
    if w.dim() == 2:
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        return float((gram - torch.eye(gram.shape[0], dtype=torch.float64)).square().sum())
    d = w.dim() - 2
    ss = (stride,) * d if isinstance(stride, int) else tuple(stride)
    a = circular_operator64(w, ss, groups)
    row_orthogonal = w.shape[0] <= w.shape[1] * groups * math.prod(ss)
    gram = a @ a.T if row_orthogonal else a.T @ a
    positions = a.shape[0] // w.shape[0]
    return float((gram - torch.eye(gram.shape[0], dtype=torch.float64)).square().sum()) / positions


def polynomial_product(a: dict, b: dict) -> dict:
    """The product of two matrix polynomials in ``d`` variables, each given as ``{tap tuple: matrix}``:
    ``(AB)[t] = sum_{p + q = t} A[p] B[q]``."""
    out: dict = {}
    for (p, x), (q, y) in itertools.product(a.items(), b.items()):
        tap = tuple(i + j for i, j in zip(p, q))
        out[tap] = out.get(tap, 0) + x @ y
    return out


def central_difference(fn, tensor: torch.Tensor, index, eps: float = 1e-6) -> float:
    """``(fn() with tensor[index] + eps  -  fn() with tensor[index] - eps) / (2 eps)``; the entry is restored.
    ``tensor.view(-1)`` takes a flat index."""
    with torch.no_grad():
        old = float(tensor[index])
        tensor[index] = old + eps
        up = float(fn().detach())
        tensor[index] = old - eps
        down = float(fn().detach())
        tensor[index] = old
    return (up - down) / (2 * eps)


def stable_kernel64(lam: torch.Tensor, taylor_order: int | None, clamp_gap: float | None = None,
                    descending: bool = False, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The gradient weights ``K[i, j] ~ 1 / (lam_j - lam_i)`` of orthofx's bounded eigh / SVD backward as the module
    docstring of ``orthofx.nn.decompositions`` states them, one pair at a time in float64 (``lam`` sorted, one
    matrix). ``dtype`` is the working dtype of the op, whose ``eps`` / ``tiny`` set the smallest denominator
    ``floor = max(eps max|lam|, sqrt(tiny))``:

    * exact (``taylor_order=None``): ``1 / max(|lam_j - lam_i|, floor, clamp_gap)``;
    * Taylor form of order ``T``: with ``a`` the larger and ``b`` the smaller of ``|lam_i|, |lam_j|``, the minimum
      of ``(1/a) sum_{k<=T} (b/a)^k`` (``a`` clamped at ``floor``) and the exact value above;
    * the sign is the index order's (sorted values: the sign of ``lam_j - lam_i`` where they differ), ``+`` above
      the diagonal for ascending ``lam``, ``-`` for descending."""
    lam = [float(v) for v in lam.detach().to(torch.float64)]
    info = torch.finfo(dtype)
    floor = max(info.eps * max((abs(v) for v in lam), default=0.0), math.sqrt(info.tiny))
    gap_floor = floor if clamp_gap is None else max(floor, clamp_gap)
    n = len(lam)
    K = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            mag = 1.0 / max(abs(lam[j] - lam[i]), gap_floor)
            if taylor_order is not None:
                a, b = max(abs(lam[i]), abs(lam[j])), min(abs(lam[i]), abs(lam[j]))
                a = max(a, floor)
                mag = min(mag, sum((b / a) ** k for k in range(taylor_order + 1)) / a)
            K[i, j], K[j, i] = (-mag, mag) if descending else (mag, -mag)
    return K


def eigh_backward64(L, V, gL, gV, K) -> torch.Tensor:
    """``sym(V (diag(gL) + K o skew(V^T gV)) V^T)`` in float64: the documented backward of ``eigh_stable`` for
    its outputs ``L, V`` and their gradients ``gL, gV`` (``K`` from :func:`stable_kernel64`)."""
    L, V, gL, gV = (t.detach().to(torch.float64) for t in (L, V, gL, gV))
    X = V.T @ gV
    G = V @ (torch.diag(gL) + K * (X - X.T) / 2) @ V.T
    return (G + G.T) / 2


def svd_backward64(U, S, Vh, gU, gS, gVh, K, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The documented backward of ``svd_stable`` (reduced SVD ``A = U diag(S) Vh``, ``k = len(S)``) in float64::

        U [ (K o (U^T gU - gU^T U)) S + S (K o (V^T gV - gV^T V)) + diag(gS) ] V^T
          + (I - U U^T) gU S^-1 V^T  (m > k)  +  U S^-1 gV^T (I - V V^T)  (n > k)

    with ``V = Vh^T``, ``gV = gVh^T``, ``K`` from :func:`stable_kernel64` of ``S^2`` (descending) and ``S^-1``
    clamped at ``max(eps max S, sqrt(tiny))`` (``eps``, ``tiny`` of the op's ``dtype``)."""
    U, S, Vh, gU, gS, gVh = (t.detach().to(torch.float64) for t in (U, S, Vh, gU, gS, gVh))
    V, gV = Vh.T, gVh.T
    m, n, k = U.shape[0], V.shape[0], S.shape[0]
    D = torch.diag(S)
    inner = (K * (U.T @ gU - gU.T @ U)) @ D + D @ (K * (V.T @ gV - gV.T @ V)) + torch.diag(gS)
    gA = U @ inner @ V.T
    info = torch.finfo(dtype)
    s_inv = torch.diag(1 / S.clamp_min(max(info.eps * (float(S.max()) if k else 0.0), math.sqrt(info.tiny))))
    if m > k:
        gA = gA + (torch.eye(m, dtype=torch.float64) - U @ U.T) @ gU @ s_inv @ V.T
    if n > k:
        gA = gA + U @ s_inv @ gV.T @ (torch.eye(n, dtype=torch.float64) - V @ V.T)
    return gA


# ------------------------------------------------------------------------------------------------ state snapshots

def penalised_sgd_steps(gm: torch.nn.Module, x: torch.Tensor, steps: int, lr: float, attach: bool = False) -> None:
    """``steps`` plain SGD steps on ``mean(gm(x)^2) + orthofx.penalty(gm)`` in the mode ``gm`` is in (with
    orthofx's optimizer hooks when ``attach``), so that a saved state differs from a fresh transform's."""
    import orthofx

    optimizer = torch.optim.SGD(gm.parameters(), lr=lr)
    handle = orthofx.attach(optimizer, gm) if attach else None
    for _ in range(steps):
        loss = gm(x).square().mean() + orthofx.penalty(gm)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if handle is not None:
        handle.remove()


def state_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``module.state_dict()``: what a call that must leave the module alone is checked against."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Two state dicts with the same keys, and tensors of the same dtype, shape and bytes (so NaN equals NaN: a
    monitor's history starts as NaN, and ``torch.equal`` says NaN != NaN)."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].detach().contiguous().view(-1).view(torch.uint8),
                        b[k].detach().contiguous().view(-1).view(torch.uint8)) for k in a)


def circular_pad_loop(x: torch.Tensor, pads) -> torch.Tensor:
    """Periodic extension by ``(left, right)`` per trailing dimension, one dimension at a time: entry ``j`` of a
    dimension of size ``n`` is ``x[(j - left) % n]``."""
    d = len(pads)
    for i, (l, r) in enumerate(pads):
        dim = x.dim() - d + i
        n = x.shape[dim]
        x = torch.stack([x.select(dim, (j - l) % n) for j in range(n + l + r)], dim=dim)
    return x


def text_position(text: str, token: str, occurrence: int = 0) -> tuple[int, int]:
    """1-based (line, column) of the ``occurrence``-th ``token`` in ``text``: where an editor shows it."""
    start = -1
    for _ in range(occurrence + 1):
        start = text.index(token, start + 1)
    before = text[:start]
    return before.count("\n") + 1, start - (before.rfind("\n") + 1) + 1


def nested_replaced(data: dict, path: tuple, value=None, *, drop: bool = False) -> dict:
    """A deep copy of ``data`` with the entry at ``path`` (keys and indices) set to ``value``, or deleted."""
    out = copy.deepcopy(data)
    holder = out
    for part in path[:-1]:
        holder = holder[part]
    if drop:
        del holder[path[-1]]
    else:
        holder[path[-1]] = value
    return out


class OpCount(TorchDispatchMode):
    """How many times each ATen op (by packet name, e.g. ``"nonzero"``) ran inside the ``with`` block: ``counts``
    (each op a kernel launch on a GPU)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def running_grids_lru(sizes, bound: int | None) -> list[tuple[int, int]]:
    """The grids a ConvNorm layer (3 x 3, padding 1) bounded by ``bound`` running filters keeps after training on
    ``sizes`` (n x n inputs, grid n + 2), least recently updated first: a plain list, each training step moving its
    grid to the end, the first dropped when a new grid finds the list full."""
    kept: list[tuple[int, int]] = []
    for n in sizes:
        grid = (n + 2, n + 2)
        if grid in kept:
            kept.remove(grid)
        elif bound is not None and len(kept) >= bound:
            kept.pop(0)
        kept.append(grid)
    return kept


def conv_pads(padding, kernel, dilation) -> list[tuple[int, int]]:
    """``(left, right)`` per spatial dimension of a torch conv's ``padding`` (an int tuple, ``'valid'`` or
    ``'same'``, whose odd extra goes on the right)."""
    if padding == "valid":
        return [(0, 0)] * len(kernel)
    if padding == "same":
        return [(dl * (k - 1) // 2, dl * (k - 1) - dl * (k - 1) // 2) for k, dl in zip(kernel, dilation)]
    return [(p, p) for p in padding]


def padded_source(i: int, n: int, mode: str) -> int | None:
    """The entry of a length-``n`` input that position ``i`` of its padded copy (``i < 0`` or ``i >= n``: the
    padding) holds in ``padding_mode`` ``mode``; ``None`` for a zero."""
    if 0 <= i < n:
        return i
    if mode == "zeros":
        return None
    if mode == "circular":
        return i % n
    if mode == "replicate":
        return min(max(i, 0), n - 1)
    period = 2 * (n - 1)  # reflect, without repeating the edge
    j = i % period
    return j if j < n else period - j


def wrapped_operator64(weight: torch.Tensor, grid, stride=1, groups: int = 1, dilation=1) -> torch.Tensor:
    """The dense float64 matrix of ``y[m, i] = sum_{c, p} K[m, c, p] x[c, (S i + D p) mod n]`` (circular, strided,
    dilated, grouped) on inputs of spatial size ``grid``, any grid divisible by the stride: also one smaller than the
    kernel's span, where :func:`circular_operator64`'s padding cannot reach. Each basis input is tiled periodically
    until the span fits, then a 'valid' torch convolution gives the column; its first ``n / S`` outputs are the
    circular ones."""
    w = weight.detach().to(torch.float64)
    d = w.dim() - 2
    ss = (stride,) * d if isinstance(stride, int) else tuple(stride)
    ds = (dilation,) * d if isinstance(dilation, int) else tuple(dilation)
    grid = (grid,) * d if isinstance(grid, int) else tuple(grid)
    channels = w.shape[1] * groups
    basis = torch.eye(channels * math.prod(grid), dtype=torch.float64).reshape(-1, channels, *grid)
    reps = [-(-(D * (k - 1)) // n) + 1 for k, D, n in zip(w.shape[2:], ds, grid)]
    tiled = basis.repeat(1, 1, *reps)
    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    columns = conv(tiled, w, stride=ss, dilation=ds, groups=groups)
    columns = columns[(slice(None), slice(None)) + tuple(slice(0, n // s) for n, s in zip(grid, ss))]
    return columns.reshape(columns.shape[0], -1).T


def jacobian_quantities64(jac: torch.Tensor, samples: int | None = None) -> dict[str, float]:
    """The quantities ``jacobian_isometry`` estimates, from a dense Jacobian ``jac`` (``m x n``), with
    ``A = J^T J``: ``full`` ``||A - I||_F^2``, ``partial`` ``||J A - J||_F^2``, ``offdiag`` ``sum_{i != j} A_ij^2``.
    With ``samples = B`` (``per_sample=True``; rows and columns ordered by sample) the mean over ``b`` of each
    sample's share, as the estimator's section comment defines it: ``full`` the rows of ``A - I`` of input sample
    ``b``; ``partial`` the rows of ``J A - J`` of output sample ``b``; ``offdiag`` that of ``J_b`` (the rows of
    output sample ``b``, every column: with coupled samples, the cross-sample blocks too)."""
    J = jac.detach().to(torch.float64)
    A = J.T @ J
    full = A - torch.eye(A.shape[0], dtype=torch.float64)
    partial = J @ A - J
    if samples is None:
        return {"full": float(full.square().sum()), "partial": float(partial.square().sum()),
                "offdiag": float((A - torch.diag(torch.diag(A))).square().sum())}
    rows, cols = J.shape[0] // samples, J.shape[1] // samples
    out = {"full": 0.0, "partial": 0.0, "offdiag": 0.0}
    for b in range(samples):
        out["full"] += float(full[b * cols:(b + 1) * cols].square().sum()) / samples
        out["partial"] += float(partial[b * rows:(b + 1) * rows].square().sum()) / samples
        Jb = J[b * rows:(b + 1) * rows]
        Ab = Jb.T @ Jb
        out["offdiag"] += float((Ab - torch.diag(torch.diag(Ab))).square().sum()) / samples
    return out
