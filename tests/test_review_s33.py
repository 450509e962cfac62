"""Review of the O(d N) block sweeps (session 33, ``_OrthogonalConvNd._block_sweeps``): the cases
``tests/test_block_sweeps_s33.py`` leaves out, checked against a reference written here.

No bug was found; these tests pass on the reviewed commit too and guard the bookkeeping of the kept forward
states and pulled-back targets where it is least exercised: several groups (one optimum per group), one channel
per group (every listed block a rank-0 delay, the identity blocks' zero taps at the end of each dimension, so the
chain has no block to choose and the pulled-back target must still drop those taps), the blocks on the right over
two and three dimensions (updates against the chain, a rebuild at each new dimension), and several sweeps in one
call (the pulled-back states kept across the Procrustes step).

The reference is the kernel written out as dense float64 matrix polynomials per group, with the identity blocks
and delays placed by the construction's rule (block ``j`` of a dimension has rank ``n // 2`` for even ``j``,
``n - n // 2`` for odd ``j``), not read from the layer's ``_identity_taps``. The score ``<K, K_0>`` is affine in a
block's projector ``P``, so ``G[a, b] = score(E_ab) - score(0)`` is exact, and the best rank-``r`` projector is
worth ``score(0) + (top r eigenvalues of G + G^T) / 2``.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from orthofx.nn import OrthogonalConv1d, OrthogonalConv2d, OrthogonalConv3d
from tests.references import polynomial_product as _times, polar64

F64 = torch.float64
LAYERS = {1: OrthogonalConv1d, 2: OrthogonalConv2d, 3: OrthogonalConv3d}




def _kernel(layer, projectors: dict, W: torch.Tensor) -> torch.Tensor:
    """One group's unit kernel ``(M, C, *k)``: ``T_i = B_m \\cdots B_1``, ``B = P + (I - P) z`` with ``P`` from
    ``projectors`` (listed blocks of rank ``0 < r < n``), ``0`` (rank 0) or ``I`` (rank ``n``)."""
    d, n, M, C = layer._dims, layer._n, layer._M, layer._C
    zero, eye = (0,) * d, torch.eye(n, dtype=F64)
    A = {zero: eye}
    for dim in range(d):
        one = tuple(int(i == dim) for i in range(d))
        listed = iter(layer._block_index[dim])
        T = {zero: eye}
        for j in range(layer._kp[dim] - 1):
            rank = n // 2 if j % 2 == 0 else n - n // 2
            P = eye if rank == n else projectors.get(next(listed), torch.zeros(n, n, dtype=F64))
            T = _times({zero: P, one: eye - P}, T)
        A = _times(A, T)
    if layer._embed:
        K = _times(A, {zero: W})
    elif not layer._strided:
        K = _times({zero: W}, A)
    else:
        R = W.reshape(M, C, *layer._r)
        K = _times({q: R[(slice(None), slice(None)) + q] for q in itertools.product(*map(range, layer._r))}, A)
    out = torch.zeros(M, C, *layer.kernel_size, dtype=F64)
    for tap, matrix in K.items():
        out[(slice(None), slice(None)) + tap] = matrix
    return out


def _state(layer) -> tuple[list[dict], list[torch.Tensor]]:
    """Per group: the listed blocks' projectors (from an SVD of the parameter) and the orthonormal matrix."""
    raw = {"a": layer.proj_a, "b": layer.proj_b}
    projectors, matrices = [], []
    for g in range(layer.groups):
        found = {}
        for block in (block for blocks in layer._block_index for block in blocks):
            if raw[block[0]] is not None:
                U = torch.linalg.svd(raw[block[0]][g, block[1]].detach().double(), full_matrices=False)[0]
                found[block] = U @ U.T
        projectors.append(found)
        m = layer.matrix[g].detach().double()
        Q, R = torch.linalg.qr(m if layer._matrix_tall else m.T)
        Q = Q * torch.sign(torch.diagonal(R))
        matrices.append(Q if layer._matrix_tall else Q.T)
    return projectors, matrices


def _score(layer, projectors: dict, W: torch.Tensor, target: torch.Tensor) -> float:
    return float((_kernel(layer, projectors, W) * target).sum())


@pytest.mark.parametrize("d, C, M, k, stride, groups", [
    (1, 1, 2, 5, 2, 2),           # one channel per group: delays and identity taps only, strided
    (2, 1, 1, (3, 4), 1, 3),      # depthwise: delays and identity taps only, stride 1
    (2, 1, 3, (3, 2), 1, 2),      # embedded, n = 3 odd, two groups
    (2, 3, 2, (3, 3), 1, 2),      # row-orthogonal: the blocks on the right over two dimensions, two groups
    (3, 3, 3, (2, 3, 2), 1, 1),   # square, three dimensions
])
def test_one_sweep_reaches_each_block_optimum_per_group(d, C, M, k, stride, groups):
    torch.manual_seed(7 * d + C + M)
    layer = LAYERS[d](C * groups, M * groups, k, stride=stride, groups=groups, bias=False, dtype=F64)
    target = torch.randn(groups, M, C, *layer.kernel_size, dtype=F64)
    old_projectors, old_matrices = _state(layer)
    weight = layer.weight.detach().reshape(target.shape)
    for g in range(groups):  # precondition: the reference is the layer's kernel
        torch.testing.assert_close(_kernel(layer, old_projectors[g], old_matrices[g]), weight[g], rtol=0, atol=1e-12)

    layer._block_sweeps(target)
    new_projectors, new_matrices = _state(layer)
    ranks = {"a": layer._ra, "b": layer._rb}
    n = layer._n
    for g in range(groups):
        projectors = dict(old_projectors[g])
        for block in (block for blocks in layer._block_index for block in blocks):  # the sweep's order
            if block not in projectors:
                continue
            base = _score(layer, {**projectors, block: torch.zeros(n, n, dtype=F64)}, old_matrices[g], target[g])
            G = torch.zeros(n, n, dtype=F64)
            for a, b in itertools.product(range(n), range(n)):
                E = torch.zeros(n, n, dtype=F64)
                E[a, b] = 1.0
                G[a, b] = _score(layer, {**projectors, block: E}, old_matrices[g], target[g]) - base
            best = base + float(torch.linalg.eigvalsh(G + G.T)[-ranks[block[0]]:].sum()) / 2
            projectors[block] = new_projectors[g][block]
            reached = _score(layer, projectors, old_matrices[g], target[g])
            assert abs(reached - best) <= 1e-9 * max(1.0, abs(best)), (g, block, reached, best)
        # the Procrustes step: the polar factor of the adjoint of W -> <K(W), target>, read off unit matrices
        shape = old_matrices[g].shape
        adjoint = torch.zeros(shape, dtype=F64)
        for i, j in itertools.product(range(shape[0]), range(shape[1])):
            E = torch.zeros(shape, dtype=F64)
            E[i, j] = 1.0
            adjoint[i, j] = _score(layer, projectors, E, target[g])
        expected = _kernel(layer, projectors, polar64(adjoint))
        got = layer.weight.detach().reshape(target.shape)[g]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
        torch.testing.assert_close(_kernel(layer, new_projectors[g], new_matrices[g]), got, rtol=0, atol=1e-12)


@pytest.mark.parametrize("d, C, M, k, stride, groups", [
    (2, 3, 3, (3, 4), 1, 2),      # square, two groups: the blocks on the right, two dimensions
    (2, 4, 2, (4, 3), 1, 1),      # row-orthogonal
    (3, 2, 3, (2, 3, 3), 1, 1),   # embedded, three dimensions, n = 3 odd
    (1, 1, 2, 5, 2, 1),           # delays and identity taps only
    (2, 2, 6, (3, 4), (1, 2), 2),  # strided in one dimension, two groups
])
def test_several_sweeps_in_one_call_equal_one_call_each(d, C, M, k, stride, groups):
    # within one call the pulled-back targets outlive the Procrustes step and the states are rebuilt only past an
    # update; one call per sweep rebuilds everything, so any stale state would show as a difference
    torch.manual_seed(11 * d + C + M)
    layer = LAYERS[d](C * groups, M * groups, k, stride=stride, groups=groups, bias=False, dtype=F64)
    target = torch.randn(groups, M, C, *layer.kernel_size, dtype=F64)
    state = {name: value.clone() for name, value in layer.state_dict().items()}
    distances = [float((layer.weight.detach().reshape(target.shape) - target).norm())]
    for _ in range(3):
        layer._block_sweeps(target)
        distances.append(float((layer.weight.detach().reshape(target.shape) - target).norm()))
    one_by_one = layer.weight.detach().clone()
    layer.load_state_dict(state)
    with torch.inference_mode():  # no autograd needed: the same inside inference mode
        layer._block_sweeps(target, sweeps=3)
    torch.testing.assert_close(layer.weight.detach(), one_by_one, rtol=0, atol=1e-12)
    assert all(b <= a + 1e-12 for a, b in zip(distances, distances[1:])), distances
