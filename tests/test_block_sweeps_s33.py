"""Block sweeps in O(blocks) (session 33): ``_OrthogonalConvNd._block_sweeps`` keeps the chain's forward states
and the target pulled back through it, instead of a gradient through the whole kernel build per block.

The references are written here: the kernel as dense float64 polynomial products of explicit projectors (any
number of spatial dimensions, the blocks on either side, a strided reshaped kernel), the best projector of each
block from finite differences of that polynomial (the score is affine in the projector, so they are exact to
rounding), and the count of matrix products (``tests.references.OpCount``), which grew as the square of the
blocks before (1-D, 8 -> 16 blocks: 135 -> 459 ``bmm``).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from orthofx.nn import OrthogonalConv1d, OrthogonalConv2d, OrthogonalConv3d
from tests.references import polynomial_product as _times, OpCount, polar64

F64 = torch.float64
LAYERS = {1: OrthogonalConv1d, 2: OrthogonalConv2d, 3: OrthogonalConv3d}


def _projector(raw: torch.Tensor) -> torch.Tensor:
    """The orthogonal projector onto the column span of ``raw`` (n x r), by the normal equations."""
    return raw @ torch.linalg.solve(raw.T @ raw, raw.T)




def _block(P: torch.Tensor, dim: int, d: int) -> dict:
    """``P + (I - P) z_dim``."""
    zero, one = (0,) * d, tuple(int(i == dim) for i in range(d))
    return {zero: P, one: torch.eye(P.shape[0], dtype=F64) - P}


def _kernel(layer, projectors: dict, W: torch.Tensor) -> torch.Tensor:
    """The unit kernel ``(M, C, *k)`` written out: ``A = T_1 ... T_d`` with ``T_i = B_m ... B_1`` (the blocks of
    dimension ``i``), then ``A W`` (stride 1, ``M > C``), ``W A`` (stride 1) or ``R * A`` (strided: ``R[q]`` the
    ``M x C`` slices of ``W`` reshaped to ``(M, C, *r)``). One group."""
    d, n = layer._dims, layer._n
    A = {(0,) * d: torch.eye(n, dtype=F64)}
    for dim in range(d):
        T = {(0,) * d: torch.eye(n, dtype=F64)}
        for block in layer._block_index[dim]:
            T = _times(_block(projectors[block], dim, d), T)
        A = _times(A, T)
    if layer._embed:
        K = _times(A, {(0,) * d: W})
    elif not layer._strided:
        K = _times({(0,) * d: W}, A)
    else:
        R = W.reshape(layer._M, layer._C, *layer._r)
        K = _times({q: R[(slice(None), slice(None)) + q] for q in itertools.product(*map(range, layer._r))}, A)
    out = torch.zeros(layer._M, layer._C, *layer.kernel_size, dtype=F64)
    for tap, matrix in K.items():
        out[(slice(None), slice(None)) + tap] = matrix
    return out


def _score(layer, projectors: dict, W: torch.Tensor, target: torch.Tensor) -> float:
    return float((_kernel(layer, projectors, W) * target).sum())


def _best_score(layer, projectors: dict, block, W: torch.Tensor, target: torch.Tensor, rank: int) -> float:
    """The largest score over rank-``rank`` projectors for ``block``, the others fixed: the score is affine in the
    projector, so central differences along the symmetric basis give ``S = G + G^T`` to rounding; the optimum is
    the base score plus half the top ``rank`` eigenvalues of ``S``, less ``tr(P S) / 2`` of the current one."""
    n = layer._n
    S = torch.zeros(n, n, dtype=F64)
    for a in range(n):
        for b in range(a, n):
            E = torch.zeros(n, n, dtype=F64)
            E[a, b] = E[b, a] = 1.0

            def at(eps):
                return _score(layer, {**projectors, block: projectors[block] + eps * E}, W, target)
            slope = (at(1e-3) - at(-1e-3)) / 2e-3
            S[a, b] = S[b, a] = slope if a != b else 2 * slope
    base = _score(layer, projectors, W, target) - float((projectors[block] * S).sum()) / 2
    return base + float(torch.linalg.eigvalsh(S)[-rank:].sum()) / 2


def _parameters_projectors(layer) -> dict:
    raw = {"a": layer.proj_a, "b": layer.proj_b}
    return {block: _projector(raw[block[0]][0, block[1]].detach().double())
            for blocks in layer._block_index for block in blocks}


def _matrix(layer) -> torch.Tensor:
    """The matrix parameter's orthonormal factor (one group): QR with R's diagonal positive, of its transpose
    when it is wide."""
    raw = layer.matrix[0].detach().double()
    Q, R = torch.linalg.qr(raw if layer._matrix_tall else raw.T)
    Q = Q * torch.sign(torch.diagonal(R))
    return Q if layer._matrix_tall else Q.T


@pytest.mark.parametrize("d, C, M, k, stride", [
    (2, 2, 5, (3, 4), 1),     # embedded, n = 5 odd (ranks 2, 3), three blocks in dimension 2
    (3, 2, 4, (3, 2, 3), 1),  # embedded, three dimensions
    (2, 3, 3, (3, 3), 1),     # square: the blocks on the right, K = W A
    (1, 2, 6, 5, 2),          # strided: K = R * A
])
def test_one_sweep_reaches_each_block_optimum_written_out(d, C, M, k, stride):
    torch.manual_seed(sum(M * i for i in range(d)) + C)
    layer = LAYERS[d](C, M, k, stride=stride, bias=False, dtype=F64)
    target = torch.randn(M, C, *layer.kernel_size, dtype=F64)
    projectors, W = _parameters_projectors(layer), _matrix(layer)
    # precondition: the written-out polynomial is the layer's kernel (and so the blocks' order and sides)
    torch.testing.assert_close(_kernel(layer, projectors, W), layer.weight.detach(), rtol=0, atol=1e-12)
    before = _score(layer, projectors, W, target)

    layer._block_sweeps(target.reshape(1, M, C, *layer.kernel_size))
    chosen = _parameters_projectors(layer)

    # blocks in the sweep's order (dimension 1 first, its first block first): each chosen projector reaches the
    # optimum with the blocks before it at their chosen values and those after it at their old ones
    ranks = {"a": layer._ra, "b": layer._rb}
    for block in [block for blocks in layer._block_index for block in blocks]:
        best = _best_score(layer, projectors, block, W, target, ranks[block[0]])
        projectors[block] = chosen[block]
        assert abs(_score(layer, projectors, W, target) - best) < 1e-9 * max(1.0, abs(best)), block
    # then the Procrustes step: W maximises <K, target>, linear in W (the kernel written out for W = each unit
    # matrix gives the adjoint)
    shape = W.shape
    adjoint = torch.zeros(shape, dtype=F64)
    for i, j in itertools.product(range(shape[0]), range(shape[1])):
        E = torch.zeros(shape, dtype=F64)
        E[i, j] = 1.0
        adjoint[i, j] = _score(layer, projectors, E, target)
    expected = _kernel(layer, projectors, polar64(adjoint))
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=0, atol=1e-10)
    assert float((expected * target).sum()) > before


def test_a_sweep_costs_matrix_products_linear_in_the_blocks():
    # 1-D, 2 -> 6 channels: k = 9 has 8 blocks, k = 17 has 16. A gradient through the whole kernel per block
    # cost 135 -> 459 products (3.4x); the kept states cost 57 -> 113
    counts = []
    for k in (9, 17):
        torch.manual_seed(k)
        layer = OrthogonalConv1d(2, 6, k, bias=False, dtype=F64)
        target = torch.randn(1, 6, 2, k, dtype=F64)
        with OpCount() as ops:
            layer._block_sweeps(target)
        counts.append(ops.counts["bmm"] + ops.counts["mm"])
    assert counts[1] <= 2.1 * counts[0], counts
    assert counts[0] <= 8 * 8, counts  # a few products per block (step, pull-back, gradient, projector)


@pytest.mark.parametrize("d, C, M, k, stride", [(2, 3, 8, 3, 1), (1, 2, 5, 4, 2)])
def test_sweeps_in_one_call_equal_one_call_per_sweep(d, C, M, k, stride):
    # the target pulled back through the blocks is kept across the sweeps of one call (it does not depend on the
    # matrix); the forward states are rebuilt from the new matrix. One call of 3 sweeps = 3 calls of 1, and the
    # distance never grows (each update an exact optimum)
    torch.manual_seed(d + C + M)
    layer = LAYERS[d](C, M, k, stride=stride, bias=False, dtype=F64)
    target = torch.randn(1, M, C, *layer.kernel_size, dtype=F64)
    state = {name: value.clone() for name, value in layer.state_dict().items()}
    distances = [float((layer.weight.detach() - target[0]).norm())]
    for _ in range(3):
        layer._block_sweeps(target)
        distances.append(float((layer.weight.detach() - target[0]).norm()))
    one_by_one = layer.weight.detach().clone()
    layer.load_state_dict(state)
    layer._block_sweeps(target, sweeps=3)
    torch.testing.assert_close(layer.weight.detach(), one_by_one, rtol=0, atol=1e-12)
    assert all(b <= a + 1e-12 for a, b in zip(distances, distances[1:])), distances
    assert distances[-1] < distances[0]


def test_the_block_part_applied_as_before():
    # the block step taken out of _apply_blocks for the sweep: the kernel is the polynomial written out (float64),
    # for both sides, a strided layer and a wide matrix
    for d, C, M, k, stride in ((2, 2, 6, 3, 1), (2, 4, 4, 3, 1), (1, 3, 6, 5, 2), (2, 4, 2, 3, 1)):
        torch.manual_seed(C * M)
        layer = LAYERS[d](C, M, k, stride=stride, bias=False, dtype=F64)
        expected = _kernel(layer, _parameters_projectors(layer), _matrix(layer))
        torch.testing.assert_close(layer.weight.detach(), expected, rtol=0, atol=1e-12)
