"""Independent float64 references shared by several test files (written here, not taken from orthofx)."""

from __future__ import annotations

import torch


def polar64(a: torch.Tensor) -> torch.Tensor:
    """``U V^T`` of ``a = U S V^T`` by a float64 SVD: the nearest matrix with orthonormal columns."""
    u, _, vh = torch.linalg.svd(a.to(torch.float64), full_matrices=False)
    return u @ vh


def tangent64(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``G - W sym(W^T G)`` (square ``W``), in float64: ``G`` projected on the tangent space at ``W``."""
    w, g = w.to(torch.float64), g.to(torch.float64)
    s = w.T @ g
    return g - w @ (s + s.T) / 2
