"""The nearest start of embedded (stride 1, M > C) block layers: one sweep of exact block-by-block optimisation.

``from_conv(init="nearest", fit_steps=0)`` (the ``orthogonal_conv`` pass's default) used to start every layer with
blocks from complementary projector pairs, a pure shift: a one-tap kernel. At stride 1 with ``M > C`` (the embedded
column-orthogonal case) every output pixel then lies in a ``C``-dimensional subspace of the ``M`` channels:
the built-in ``dbn_cnn``'s ``conv1`` (1 -> 16, 5 x 5) had rank-1 outputs, its decorrelated BatchNorm 15 tied
eigenvalues, and ``eigh``'s backward NaN gradients (``tests/test_fuzz_regressions2_s31.py``). The references here
are written in the test: dense polynomial products of explicit projectors, finite differences, float64 SVDs and
dense circular operators.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from orthofx.nn import OrthogonalConv1d, OrthogonalConv2d
from tests.references import circular_operator64, polar64


def _projector(raw: torch.Tensor) -> torch.Tensor:
    """The orthogonal projector onto the column span of ``raw`` (n x r), by the normal equations."""
    return raw @ torch.linalg.solve(raw.T @ raw, raw.T)


def _times(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
    """The product of two matrix polynomials given by their taps."""
    out = [torch.zeros(a[0].shape[0], b[0].shape[1], dtype=torch.float64) for _ in range(len(a) + len(b) - 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i + j] = out[i + j] + x @ y
    return out


def _kernel(projectors: list[torch.Tensor], W: torch.Tensor) -> list[torch.Tensor]:
    """``B_m ... B_1 W`` with ``B = P + (I - P) z``: the embedded 1-D kernel (``projectors`` in order B_1..B_m)."""
    eye = torch.eye(W.shape[0], dtype=torch.float64)
    poly = [W]
    for P in projectors:
        poly = _times([P, eye - P], poly)
    return poly


def _score(taps: list[torch.Tensor], target: torch.Tensor) -> float:
    return float(sum((tap * target[:, :, p]).sum() for p, tap in enumerate(taps)))


def _best_projector(projectors: list[torch.Tensor], i: int, W: torch.Tensor, target: torch.Tensor,
                    rank: int) -> torch.Tensor:
    """The rank-``rank`` projector maximising <K, target> with the other blocks fixed: the score is affine in
    ``P_i``, so central differences along the symmetric basis give ``G + G^T`` exactly (to rounding)."""
    n = W.shape[0]
    S = torch.zeros(n, n, dtype=torch.float64)
    for a in range(n):
        for b in range(a, n):
            E = torch.zeros(n, n, dtype=torch.float64)
            E[a, b] = E[b, a] = 1.0

            def at(eps):
                trial = list(projectors)
                trial[i] = projectors[i] + eps * E
                return _score(_kernel(trial, W), target)
            slope = (at(1e-3) - at(-1e-3)) / 2e-3  # tr(E G) = G_ab + G_ba, or G_aa on the diagonal
            S[a, b] = S[b, a] = slope if a != b else 2 * slope
    vectors = torch.linalg.eigh(S)[1][:, -rank:]
    return vectors @ vectors.T


def test_one_sweep_matches_the_block_optima_written_out():
    torch.manual_seed(0)
    layer = OrthogonalConv1d(2, 6, 3, bias=False, dtype=torch.float64)  # embedded: K[p] = A[p] W, n = 6
    assert layer.case == "CO" and layer._embed and [cls for cls, _ in layer._block_index[0]] == ["a", "b"]
    target = torch.randn(6, 2, 3, dtype=torch.float64)
    raw = [layer.proj_a[0, 0].detach().clone(), layer.proj_b[0, 0].detach().clone()]
    projectors = [_projector(r) for r in raw]
    Q, R = torch.linalg.qr(layer.matrix[0].detach())
    W = Q * torch.sign(torch.diagonal(R))  # the matrix parameter's orthonormal factor: QR, R's diagonal positive
    taps = _kernel(projectors, W)
    # precondition: the written-out polynomial is the layer's kernel
    torch.testing.assert_close(torch.stack(taps, -1), layer.weight.detach(), rtol=0, atol=1e-12)
    before = _score(taps, target)

    layer._block_sweeps(target.reshape(1, 6, 2, 3))
    chosen = [_projector(layer.proj_a[0, 0].detach()), _projector(layer.proj_b[0, 0].detach())]

    # B_1 then B_2, as the sweep visits them: each chosen projector scores as the optimum written out (the
    # optimum's projector itself need not be unique: with C = 2 the gradient has rank <= 4 of 6, tied zeros)
    for i, rank in enumerate((layer._ra, layer._rb)):
        best = _best_projector(projectors, i, W, target, rank)
        with_best = _score(_kernel([best if j == i else P for j, P in enumerate(projectors)], W), target)
        projectors[i] = chosen[i]
        assert abs(_score(_kernel(projectors, W), target) - with_best) < 1e-9
    A = _kernel(projectors, torch.eye(6, dtype=torch.float64))
    W = polar64(sum(A[p].T @ target[:, :, p] for p in range(3)))  # Procrustes: max sum_p tr(W^T A[p]^T t[p])
    expected = torch.stack(_kernel(projectors, W), -1)
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=0, atol=1e-10)
    assert _score(list(expected.unbind(-1)), target) > before


def _centre_start_error(w0: torch.Tensor) -> float:
    """The old start's distance: the nearest one-tap kernel, the polar factor of the centre tap."""
    k = w0.shape[-1]
    centre = torch.zeros_like(w0, dtype=torch.float64)
    centre[:, :, k // 2, k // 2] = polar64(w0[:, :, k // 2, k // 2])
    return float((centre - w0.double()).norm() / w0.double().norm())


def test_embedded_nearest_start_uses_every_tap_and_stays_orthogonal():
    for C, M, k in ((1, 16, 5), (3, 16, 3), (2, 12, 3)):
        torch.manual_seed(C * M + k)
        conv = nn.Conv2d(C, M, k, padding=k // 2, bias=False, dtype=torch.float64)
        layer = OrthogonalConv2d.from_conv(conv, fit_steps=0)
        assert layer.case == "CO"
        w = layer.weight.detach()
        used = int((w.square().sum((0, 1)) > 1e-20).sum())  # float64 rounding leaves ~1e-32
        assert used == k * k, (C, M, k, used)
        # column orthogonal: the dense operator on the Theorem 7 grid is an isometry
        sv = torch.linalg.svdvals(circular_operator64(w))
        assert sv.numel() == C * (2 * k - 1) ** 2 and float((sv - 1).abs().max()) < 1e-10
        # a pixel's output channels span more than the C directions of the one-tap start
        outputs = nn.functional.conv2d(torch.randn(64, C, 12, 12, dtype=torch.float64), w)
        rank = int(torch.linalg.matrix_rank(outputs.transpose(0, 1).flatten(1)))
        assert rank > C, (C, M, k, rank)
        assert layer.init_error < _centre_start_error(conv.weight.detach()) - 0.05


def test_square_row_orthogonal_and_strided_layers_skip_the_sweep(monkeypatch):
    swept = []
    monkeypatch.setattr(OrthogonalConv2d, "_block_sweeps", lambda self, *args: swept.append(self))
    torch.manual_seed(3)
    for C, M, stride in ((8, 8, 1), (8, 4, 1), (8, 16, 2), (2, 12, 2)):  # square, RO, RO strided, CO strided
        conv = nn.Conv2d(C, M, 3, stride=stride, padding=1, bias=False)
        layer = OrthogonalConv2d.from_conv(conv, fit_steps=0)
        if stride == 1:  # the pure shift: one tap, the polar factor of the centre tap (rounding leaves ~1e-16)
            weight = layer.weight.detach().double()
            assert int((weight.square().sum((0, 1)) > 1e-12).sum()) == 1
            torch.testing.assert_close(weight[:, :, 1, 1], polar64(conv.weight.detach()[:, :, 1, 1].T).T,
                                       rtol=0, atol=1e-6)
    assert not swept


def test_the_sweep_runs_under_inference_mode():
    torch.manual_seed(5)
    conv = nn.Conv2d(2, 8, 3, padding=1, bias=False)
    torch.manual_seed(6)
    outside = OrthogonalConv2d.from_conv(conv, fit_steps=0).weight.detach()
    torch.manual_seed(6)
    with torch.inference_mode():
        inside = OrthogonalConv2d.from_conv(conv, fit_steps=0).weight
    torch.testing.assert_close(inside.clone(), outside, rtol=0, atol=0)
    assert int((outside.double().square().sum((0, 1)) > 1e-12).sum()) == 9


def test_the_start_does_not_depend_on_the_thread_count():
    # 16 -> 128 channels: the gradient's symmetric part has a null space at the rank cut, where LAPACK's choice of
    # eigenvectors moved with the thread count (0.08 in the kernel) before the nudge towards the current projector
    conv = nn.Conv2d(16, 128, 3, padding=1)
    threads = torch.get_num_threads()
    kernels = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            torch.manual_seed(0)
            kernels.append(OrthogonalConv2d.from_conv(conv, fit_steps=0).weight.detach())
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(kernels[0], kernels[1], rtol=0, atol=1e-6)
