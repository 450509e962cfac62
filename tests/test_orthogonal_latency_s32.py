"""Session 32: the orthogonal preset's transform latency (benchmarks/RESULTS.md, "Transform latency of every preset").

- The polar factor of a matrix whose columns' norms already rule out Newton-Schulz (``stiefel._far_column_norms``)
  skips the Gram matrix formed only for Newton-Schulz's test and forms the one of the scaled matrix alone: the
  same polar factor bit for bit as the old route (written out here), and the float64 SVD's ``U V^T``.
- The complementary projector pairs of the nearest start take the Q factor of their float64 Gaussian from
  ``geqrf`` + ``householder_product`` (``stiefel._haar_factor``): the same draw and the same Q as
  ``torch.linalg.qr``, written out here.
- ``_in_safe_range``'s peak by one ``aminmax`` and the matrix written with ``copy_`` (no ``.to`` temporary): the
  same numbers as before.
"""

from __future__ import annotations

import pytest
import torch

from orthofx.errors import LayerArgumentError
from orthofx.nn import OrthogonalConv2d, stiefel
from orthofx.nn.orthogonal import _in_safe_range

pytestmark = pytest.mark.usefixtures("one_thread")


def _old_polar_factor(a: torch.Tensor) -> torch.Tensor:
    """``stiefel._polar_factor`` before session 32, written out (outside vmap, finite entries): the Gram matrix
    for Newton-Schulz's test always, and on the Gram route that of the scaled matrix."""
    work = a.to(torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype)
    wide = work.shape[-2] < work.shape[-1]
    tall = work.mT if wide else work
    gram = tall.mT @ tall
    polar = stiefel._polar_newton_schulz(tall, gram)
    if polar is None:
        scaled = stiefel._unit_scaled(tall)
        if scaled is not tall:
            tall, gram = scaled, None
        polar = stiefel._polar_from_gram(tall, gram if work.dtype == torch.float64 else None)
    if polar is None:
        u, _, vh = torch.linalg.svd(work, full_matrices=False)
        return (u @ vh).to(a.dtype)
    return (polar.mT if wide else polar).to(a.dtype)


def _svd_polar(a: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(a.double(), full_matrices=False)
    return u @ vh


def _weights(shape, scale, seed=0) -> torch.Tensor:
    """float32 weights times ``scale`` (a float32 number), as float64 (the nearest start's target)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float32) * 2 - 1).mul_(scale).double()


@pytest.mark.parametrize("shape, scale, wide", [
    ((64, 16), 0.03, False), ((64, 16), 0.03, True), ((2, 48, 48), 0.2, False), ((30, 10), 7.0, True),
    ((30, 10), 1e-30, False), ((25, 25), 3e38, False), ((16, 8), 1e-44, False), ((12, 4), 0.5, False)])
def test_polar_factor_is_the_old_routes_bit_for_bit_and_the_svds(shape, scale, wide):
    a = _weights(shape, scale, seed=3)
    if wide:
        a = a.mT.contiguous()
    # unit columns on average at scale 0.5 (12 x 4): not ruled out by the diagonal, refused by Newton-Schulz
    assert (stiefel._far_column_norms(a.mT if wide else a) is None) == (scale == 0.5)
    polar = stiefel.project_to_stiefel(a)
    assert torch.equal(polar, _old_polar_factor(a))
    torch.testing.assert_close(polar, _svd_polar(a), rtol=0, atol=1e-11)
    # in float32 (compute_dtype=float32): the float32 Gram matrix of the test is skipped, the result the same
    assert torch.equal(stiefel.project_to_stiefel(a.float()), _old_polar_factor(a.float()))


def _near(shape, noise, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(shape, generator=g, dtype=torch.float64))[0]
    return q + noise * torch.randn(shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("noise", [0.0, 1e-3, 0.02, 0.05])
def test_far_test_never_refuses_a_matrix_newton_schulz_takes(noise):
    # near the manifold (a retraction) Newton-Schulz stays the route, with its own Gram matrix
    a = _near((3, 40, 12), noise)
    gram = a.mT @ a
    takes = float(torch.linalg.matrix_norm(gram - torch.eye(12, dtype=torch.float64)).amax()) <= 0.5
    assert takes == (noise <= 0.02)
    assert not takes or stiefel._far_column_norms(a) is None
    assert torch.equal(stiefel.project_to_stiefel(a), _old_polar_factor(a))


def test_far_test_agrees_with_the_frobenius_bound_near_its_threshold():
    # columns scaled so that sum_i (|c_i|^2 - 1)^2 runs through the threshold: whenever the test says far, the
    # float64 ||A^T A - I||_F (Newton-Schulz's test, written out) exceeds 1/2
    # (one column scaled by s: error |s^2 - 1|, Newton-Schulz up to s = 1.2247, the test far from s = 1.2442)
    q = _near((20, 5), 0.0)
    seen = set()
    for s in torch.linspace(1.0, 1.4, 161, dtype=torch.float64):
        a = q.clone()
        a[:, 0] *= s
        far = stiefel._far_column_norms(a) is not None
        error = float(torch.linalg.matrix_norm(a.mT @ a - torch.eye(5, dtype=torch.float64)))
        assert not far or error > 0.5
        seen.add((far, error > 0.5))
        assert torch.equal(stiefel.project_to_stiefel(a), _old_polar_factor(a))
    assert seen == {(False, False), (False, True), (True, True)}


def test_a_batch_with_one_far_matrix_takes_the_gram_route_for_all_as_before():
    a = torch.stack([_near((30, 6), 0.0), _weights((30, 6), 0.05)])
    assert stiefel._far_column_norms(a) is not None
    assert torch.equal(stiefel.project_to_stiefel(a), _old_polar_factor(a))


def test_non_finite_and_huge_entries_are_reported_and_scaled_as_before():
    a = _weights((20, 6), 0.1)
    for bad in (float("nan"), float("inf")):
        b = a.clone()
        b[4, 1] = bad
        with pytest.raises(LayerArgumentError, match="NaN or inf"):
            stiefel.project_to_stiefel(b)
    huge = a * 1e200  # squared norms overflow: the full finiteness check, then the scaled Gram route
    assert torch.equal(stiefel.project_to_stiefel(huge), _old_polar_factor(huge))
    torch.testing.assert_close(stiefel.project_to_stiefel(huge), _svd_polar(a), rtol=0, atol=1e-11)


def test_paired_blocks_are_torch_linalg_qrs_of_the_same_draw():
    torch.manual_seed(5)
    layer = OrthogonalConv2d(6, 6, 5, bias=False)  # two pairs per dimension
    state = torch.get_rng_state()
    layer._pair_blocks()
    after = torch.get_rng_state()
    torch.set_rng_state(state)
    ra = layer._ra
    for dim_blocks in layer._block_index:
        for t in range(len(dim_blocks) // 2):
            (_, ia), (_, ib) = dim_blocks[2 * t], dim_blocks[2 * t + 1]
            full = torch.linalg.qr(torch.randn(1, 6, 6, dtype=torch.float64))[0]
            assert torch.equal(layer.proj_a[:, ia], full[..., :ra].float())
            assert torch.equal(layer.proj_b[:, ib], full[..., ra:].float())
            # complementary projectors (independent of either factorisation): P_a + P_b = I
            qa = torch.linalg.qr(layer.proj_a[0, ia].double())[0]
            qb = torch.linalg.qr(layer.proj_b[0, ib].double())[0]
            torch.testing.assert_close(qa @ qa.T + qb @ qb.T, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-6)
    assert torch.equal(torch.get_rng_state(), after)  # the stream advanced as much as before


def test_in_safe_range_keeps_its_cases():
    t = torch.full((1, 2, 1, 3), 2.0 ** 100)
    assert float(_in_safe_range(t).abs().amax()) == 0.5
    u = t / 2.0 ** 90
    assert _in_safe_range(u) is u
    nan = t.clone()
    nan[0, 0, 0, 0] = float("nan")
    assert _in_safe_range(nan) is nan
    neg = -t
    assert float(_in_safe_range(neg).abs().amax()) == 0.5


@pytest.mark.parametrize("gain", [1.0, 2.0])
def test_from_conv_matrix_is_the_rounded_polar_factor_of_the_target(gain):
    torch.manual_seed(2)
    conv = torch.nn.Conv2d(48, 24, 1, bias=False)
    layer = OrthogonalConv2d.from_conv(conv, gain=gain)
    target = conv.weight.detach().double().reshape(24, 48) / gain
    assert torch.equal(layer.matrix.detach()[0], _old_polar_factor(target).float())
    torch.testing.assert_close(layer.matrix.detach()[0].double(), _svd_polar(target), rtol=0, atol=1e-7)
    kernel = layer.weight.detach().double().reshape(24, 48)
    expected = float((kernel - conv.weight.detach().double().reshape(24, 48)).norm()
                     / conv.weight.detach().double().norm())
    assert layer.init_error == pytest.approx(expected, rel=1e-12)


def test_a_retraction_keeps_its_route_without_the_far_test(monkeypatch):
    # the retraction runs near the manifold at every Riemannian step: no extra reduction or host sync there
    def refuse(tall):
        raise AssertionError("the far test ran in a retraction")
    w = _near((24, 6), 0.0)
    xi = 0.01 * torch.randn(24, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = _old_polar_factor(w + xi)
    monkeypatch.setattr(stiefel, "_far_column_norms", refuse)
    assert torch.equal(stiefel.polar_retraction(w, xi), expected)
    far = _weights((24, 6), 0.05)  # far from the manifold too (a diverging step): the old route, bit for bit
    assert torch.equal(stiefel.polar_retraction(far, torch.zeros_like(far)), _old_polar_factor(far))
