"""Independent float64 references shared by several test files (written here, not taken from orthofx)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
