"""Session 32: the isometric preset's transform latency (benchmarks/RESULTS.md, "Transform latency of every preset").

- L_orth's value without a derivative from the products of the kernel's taps (``metrics._tap_pairs_defect``),
  checked against conv(K, K, P, S) summed tap by tap in float64 (a slow loop, P0 Definition 1 written out).
- The Haar sampler split into ``geqrf`` + ``householder_product`` (``stiefel._haar_factor``) and the isometric
  init's writes with the signs folded into the scale: the same matrices bit for bit as the old formula
  (``torch.linalg.qr`` of the float64 Gaussian, sign-fixed, scaled, cast), written out here.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from orthofx import metrics
from orthofx.nn import stiefel
from orthofx.passes import isometric_init


def _lorth_loop(weight: torch.Tensor, strides: tuple[int, ...], groups: int) -> float:
    """||conv(K, K, P, S) - I_r0||_F^2 in float64, every shift j (a multiple of S) and tap t by hand:
    conv_j = sum_t K_t K_{t + S j}^T per group (zero outside the kernel), I at j = 0."""
    w = weight.detach().double()
    M, Cg = w.shape[:2]
    m, ks = M // groups, tuple(w.shape[2:])
    total = 0.0
    spans = [range(-((k - 1) // s), (k - 1) // s + 1) for k, s in zip(ks, strides)]
    for g in range(groups):
        block = w[g * m:(g + 1) * m]
        for j in itertools.product(*spans):
            conv = torch.zeros(m, m, dtype=torch.float64)
            for t in itertools.product(*(range(k) for k in ks)):
                u = tuple(a + s * b for a, s, b in zip(t, strides, j))
                if all(0 <= a < k for a, k in zip(u, ks)):
                    conv += block[(slice(None), slice(None)) + t] @ block[(slice(None), slice(None)) + u].T
            if all(b == 0 for b in j):
                conv -= torch.eye(m, dtype=torch.float64)
            total += float(conv.square().sum())
    return total


_SHAPES = [  # (weight shape, strides, groups)
    ((24, 16, 3, 3), (1, 1), 1),
    ((24, 16, 3, 3), (2, 2), 1),
    ((12, 10, 4, 3), (2, 3), 2),
    ((9, 6, 5), (1,), 3),
    ((8, 8, 3, 2, 3), (1, 2, 1), 1),
    ((6, 4, 7, 7), (3, 3), 1),
    ((10, 4, 1, 3), (1, 1), 2),
]


@pytest.mark.parametrize("shape, strides, groups", _SHAPES)
def test_tap_pairs_defect_is_conv_k_k_minus_identity_in_float64(shape, strides, groups):
    torch.manual_seed(0)
    w = torch.randn(*shape, dtype=torch.float64) * 0.3
    expected = _lorth_loop(w, strides, groups)
    got = float(metrics._tap_pairs_defect(w, strides, groups))
    assert got == pytest.approx(expected, rel=1e-12)


def test_tap_pairs_defect_near_orthogonality_and_zero_taps():
    # a delta-orthogonal kernel (the isometric init's): conv(K, K) is I at j = 0 and zero elsewhere
    w = isometric_init.delta_orthogonal_(torch.empty(16, 16, 3, 3, dtype=torch.float64),
                                         generator=torch.Generator().manual_seed(1))
    assert float(metrics._tap_pairs_defect(w, (1, 1), 1)) < 1e-26
    assert _lorth_loop(w, (1, 1), 1) < 1e-26
    # a kernel with identical taps: every shift has the same Gram matrix, counted once per overlap
    tap = torch.randn(5, 7, dtype=torch.float64)
    w = tap[:, :, None].expand(5, 7, 3).contiguous()
    assert float(metrics._tap_pairs_defect(w, (1,), 1)) == pytest.approx(_lorth_loop(w, (1,), 1), rel=1e-12)


@pytest.mark.parametrize("shape, stride, groups", [((128, 96, 3, 3), 1, 1), ((128, 64, 3, 3), 2, 1),
                                                   ((128, 128, 3, 3), 1, 2), ((64, 128, 5, 5), 1, 1)])
def test_float32_value_only_lorth_takes_the_tap_pairs_and_matches_float64(shape, stride, groups, monkeypatch):
    torch.manual_seed(2)
    w = torch.randn(*shape) * 0.05
    M, Cg = shape[:2]
    pair = M * (M // groups) * Cg  # the route below is taken
    assert pair >= metrics._TAP_PAIRS_MIN_PAIR and pair * math.prod(shape[2:]) >= metrics._TAP_PAIRS_MIN_WORK
    expected = float(metrics.lorth(w.double(), stride=stride, groups=groups))  # float64: Theorem 7's route
    calls = []
    original = metrics._tap_pairs_defect
    monkeypatch.setattr(metrics, "_tap_pairs_defect", lambda *a: calls.append(a) or original(*a))
    got = metrics.lorth(w, stride=stride, groups=groups)
    assert calls and got.dtype == torch.float32
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # the differentiated value keeps the convolution (its gradient needs every shift), and agrees
    wg = w.clone().requires_grad_(True)
    calls.clear()
    value = metrics.lorth(wg, stride=stride, groups=groups)
    assert not calls and float(value.detach()) == pytest.approx(expected, rel=1e-5)


def _old_random_orthonormal(m, n, *batch, generator=None):
    """random_orthonormal before session 32, written out: linalg.qr of the float64 Gaussian, sign-fixed."""
    gauss = torch.randn(*batch, max(m, n), min(m, n), generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss, mode="reduced")
    diag = torch.diagonal(r, dim1=-2, dim2=-1)
    q = q * torch.copysign(torch.ones_like(diag), diag).unsqueeze(-2)
    return (q.transpose(-2, -1) if m < n else q).contiguous()


@pytest.mark.parametrize("m, n, batch", [(7, 5, ()), (5, 7, ()), (64, 64, ()), (6, 20, (3,)), (30, 4, (2, 2))])
def test_haar_sampler_is_bit_identical_to_the_qr_formula(m, n, batch):
    old = _old_random_orthonormal(m, n, *batch, generator=torch.Generator().manual_seed(7))
    new = stiefel.random_orthonormal(m, n, *batch, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert torch.equal(old, new)
    # the global RNG: torch.manual_seed reproduces, and the stream advances by the same draw
    torch.manual_seed(3)
    old = _old_random_orthonormal(m, n, *batch)
    after_old = torch.rand(())
    torch.manual_seed(3)
    new = stiefel.random_orthonormal(m, n, *batch, dtype=torch.float64)
    assert torch.equal(old, new) and torch.equal(after_old, torch.rand(()))
    eye = torch.eye(min(m, n), dtype=torch.float64)
    tall = new if m >= n else new.mT
    assert torch.allclose(tall.mT @ tall, eye.expand(*batch, -1, -1), atol=1e-13)


def test_haar_sampler_empty_matrices():
    assert stiefel.random_orthonormal(0, 3).shape == (0, 3)
    assert stiefel.random_orthonormal(4, 0, 2).shape == (2, 4, 0)


@pytest.mark.parametrize("scale", [1.0, 2.5, 0.3])
def test_isometric_writes_are_bit_identical_to_the_old_formula(scale):
    # delta_orthogonal_: per group Q of shape (out / g, in / g * prod(count)) on the taps, scaled, cast
    for shape, groups, taps in [((12, 8, 3, 3), 1, ((1, 2), (1, 2))), ((12, 4, 3, 3), 3, None), ((6, 16, 3), 1, None),
                                ((20, 2, 3), 2, ((1, 1),))]:
        w = torch.empty(shape)
        isometric_init.delta_orthogonal_(w, scale, torch.Generator().manual_seed(5), groups, taps)
        taps_ = taps or tuple(((k - 1) // 2, 1) for k in shape[2:])
        counts = tuple(c for _, c in taps_)
        q = _old_random_orthonormal(shape[0] // groups, shape[1] * math.prod(counts), groups,
                                    generator=torch.Generator().manual_seed(5))
        expected = torch.zeros(shape)
        index = (slice(None), slice(None)) + tuple(slice(a, a + c) for a, c in taps_)
        expected[index] = (scale * q).reshape(shape[0], shape[1], *counts).float()
        # float32: Q from the triangular solve, within 1e-13 of Householder's before rounding, so the same entries
        # but where one falls within 1e-13 of a rounding boundary (4 of 23 million for a ResNet-50): one ulp
        torch.testing.assert_close(w, expected, rtol=2.0 ** -23, atol=1e-30)
        w64 = isometric_init.delta_orthogonal_(torch.empty(shape, dtype=torch.float64), scale,
                                               torch.Generator().manual_seed(5), groups, taps)
        expected[index] = 0
        expected = expected.double()
        expected[index] = (scale * q).reshape(shape[0], shape[1], *counts)
        assert torch.equal(w64, expected)  # float64: Householder's Q, bit for bit
    # orthogonal_: a Linear's weight, tall and wide, float64 bit for bit, float32 to one ulp
    for shape in [(9, 5), (5, 9)]:
        q = scale * _old_random_orthonormal(*shape, generator=torch.Generator().manual_seed(6))
        w = isometric_init.orthogonal_(torch.empty(shape, dtype=torch.float64), scale, torch.Generator().manual_seed(6))
        assert torch.equal(w, q)
        w = isometric_init.orthogonal_(torch.empty(shape), scale, torch.Generator().manual_seed(6))
        torch.testing.assert_close(w, q.float(), rtol=2.0 ** -23, atol=1e-30)


@pytest.mark.parametrize("n, k, batch", [(40, 12, ()), (16, 16, (3,)), (64, 64, ())])
def test_haar_by_triangular_solve_is_the_householder_q(n, k, batch):
    # Q = G R^{-1} for a weight rounded to float32: the Householder Q of the same draw, to float64 round-off
    q, s = stiefel._haar_factor(n, k, *batch, generator=torch.Generator().manual_seed(9), rounded_to=torch.float32)
    old = _old_random_orthonormal(n, k, *batch, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(q * s.unsqueeze(-2), old, rtol=0, atol=1e-12)


def test_haar_by_triangular_solve_falls_back_on_an_ill_conditioned_draw(monkeypatch):
    # a Gaussian draw with kappa ~ 1e14 (two columns nearly equal): G R^{-1} is then visibly not orthonormal in
    # float32, and the Householder Q is used instead, bit for bit the old formula's
    torch.manual_seed(4)
    g = torch.randn(30, 6, dtype=torch.float64)
    g[:, 5] = g[:, 4] + 1e-14 * g[:, 3]
    randn = torch.randn
    monkeypatch.setattr(torch, "randn",
                        lambda *a, **kw: g.clone() if kw.get("dtype") == torch.float64 else randn(*a, **kw))
    q, s = stiefel._haar_factor(30, 6, rounded_to=torch.float32)
    reference, r = torch.linalg.qr(g)
    assert torch.equal(q, reference)
    monkeypatch.undo()
    solve = torch.linalg.solve_triangular(torch.geqrf(g)[0][:6].triu(), g, upper=True, left=False)
    assert float((solve.mT @ solve - torch.eye(6, dtype=torch.float64)).abs().max()) > 1e-6  # what was refused


@pytest.mark.parametrize("k, n, g", [(256, 300, 1), (300, 256, 2), (257, 1024, 1), (1, 5, 3)])
def test_gram_defect_blocks_is_the_whole_gram_in_float64(k, n, g):
    torch.manual_seed(5)
    x = torch.randn(g, k, n, dtype=torch.float64) / n ** 0.5
    expected = sum(float((x[i] @ x[i].T - torch.eye(k, dtype=torch.float64)).square().sum()) for i in range(g))
    assert float(metrics._gram_defect_blocks(x)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("shape, stride, case", [((512, 256, 1, 1), 1, None), ((256, 512, 1, 1), 2, None),
                                                 ((300, 260), 1, None), ((400, 300, 1), 1, "RO")])
def test_float32_value_only_one_tap_lorth_takes_the_blocks_and_matches_float64(shape, stride, case, monkeypatch):
    torch.manual_seed(6)
    w = torch.randn(*shape) / shape[1] ** 0.5
    expected = float(metrics.lorth(w.double(), stride=stride, case=case))
    # the old formula written out, in float64: the smaller Gram, plus the integer part
    m, c = shape[0], shape[1] * stride ** (len(shape) - 2)
    x = w.double().reshape(shape[0], -1)
    small = x @ x.T if shape[0] <= shape[1] else x.T @ x
    by_hand = float((small - torch.eye(small.shape[0], dtype=torch.float64)).square().sum())
    by_hand += max(shape[0] - shape[1], 0) - ((m - c) if (case or ("RO" if m <= c else "CO")) == "CO" else 0)
    assert expected == pytest.approx(by_hand, rel=1e-12)
    calls = []
    original = metrics._gram_defect_blocks
    monkeypatch.setattr(metrics, "_gram_defect_blocks", lambda *a: calls.append(a) or original(*a))
    got = metrics.lorth(w, stride=stride, case=case)
    assert calls and got.dtype == torch.float32 and float(got) == pytest.approx(expected, rel=1e-5)
    calls.clear()
    value = metrics.lorth(w.clone().requires_grad_(True), stride=stride, case=case)  # differentiated: one product
    assert not calls and float(value.detach()) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("shape, stride", [((128, 128, 3, 3), 2), ((512, 256, 1, 1), 1), ((300, 400), 1)])
def test_value_only_routes_under_vmap_and_on_meta(shape, stride):
    # lorth runs vmapped and on the meta device (metrics._beyond_range_as_inf); the two new routes too
    torch.manual_seed(8)
    w = torch.randn(2, *shape) * 0.05
    batched = torch.func.vmap(lambda x: metrics.lorth(x, stride=stride))(w)
    one_by_one = torch.stack([metrics.lorth(x, stride=stride) for x in w])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-6, atol=0)
    assert metrics.lorth(torch.empty(shape, device="meta"), stride=stride).is_meta
