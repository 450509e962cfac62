"""Stiefel math, the ``riemannian`` and ``isometric_init`` passes, the isometric blocks, the ``isometric`` preset and
the orthonormal_linear example (P1, P2)."""

import copy
import itertools
import math
import os
import pickle
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import orthofx
import orthofx.passes.isometric_init  # noqa: F401  (registers the pass)
import orthofx.passes.riemannian  # noqa: F401  (registers the pass)
from orthofx import metrics
from orthofx.nn import stiefel
from orthofx.nn.isometric import OrthogonalActivationBlock, ReflectionResidualBlock
from orthofx.passes.riemannian import StiefelHook

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices (tests/conftest.py)


def orthonormal(m, n, *batch, dtype=torch.float64, seed=0):
    return stiefel.random_orthonormal(m, n, *batch, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def randn(*shape, dtype=torch.float64, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def is_tangent(w, xi):
    """W^T xi + xi^T W for tall W (W xi^T + xi W^T for wide)."""
    if stiefel.is_wide(w):
        w, xi = w.transpose(-2, -1), xi.transpose(-2, -1)
    return w.transpose(-2, -1) @ xi + xi.transpose(-2, -1) @ w


SHAPES = [(6, 6), (9, 4), (4, 9), (3, 7, 5), (2, 5, 8)]


# --------------------------------------------------------------------------------------------- the math

@pytest.mark.parametrize("shape", SHAPES)
def test_tangent_projection_is_tangent_and_idempotent(shape):
    w = orthonormal(*shape[-2:], *shape[:-2])
    g = randn(*shape)
    xi = stiefel.tangent_projection(w, g)
    assert is_tangent(w, xi).abs().max() < 1e-12
    torch.testing.assert_close(stiefel.tangent_projection(w, xi), xi, atol=1e-12, rtol=0)
    # Orthogonal projection: the residual G - xi is orthogonal to every tangent vector.
    other = stiefel.tangent_projection(w, randn(*shape, seed=7))
    assert float(((g - xi) * other).sum()) == pytest.approx(0.0, abs=1e-10)
    assert stiefel.tangent_projection(w, w).abs().max() < 1e-12  # weight decay's direction is normal


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 7), n=st.integers(1, 7), seed=st.integers(0, 10_000))
def test_tangent_projection_any_shape(m, n, seed):
    w = orthonormal(m, n, seed=seed)
    xi = stiefel.tangent_projection(w, randn(m, n, seed=seed + 1))
    assert is_tangent(w, xi).abs().max() < 1e-12
    for method in stiefel.RETRACTIONS:
        assert float(stiefel.orthogonality_defect(stiefel.retract(w, xi, method))) < 1e-12


@pytest.mark.parametrize("method", ["polar", "qr"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_retractions_land_on_the_manifold(method, shape, dtype, tol):
    w = orthonormal(*shape[-2:], *shape[:-2], dtype=dtype)
    xi = stiefel.tangent_projection(w, randn(*shape, dtype=dtype))
    out = stiefel.retract(w, xi, method)
    assert out.shape == w.shape and out.dtype == dtype
    assert float(stiefel.orthogonality_defect(out).max()) < tol
    torch.testing.assert_close(stiefel.retract(w, torch.zeros_like(w), method), w,
                               atol=10 * tol, rtol=0)  # R_W(0) = W


@pytest.mark.parametrize("method", ["polar", "qr"])
@pytest.mark.parametrize("shape", [(6, 6), (9, 4), (4, 9)])
def test_retractions_agree_to_first_order(method, shape):
    w = orthonormal(*shape)
    xi = stiefel.tangent_projection(w, randn(*shape))
    errors = []
    for t in (1e-2, 5e-3, 2.5e-3):
        errors.append(float((stiefel.retract(w, t * xi, method) - w - t * xi).norm()))
    # R_W(t xi) = W + t xi + O(t^2): halving t divides the remainder by ~4, and remainder / t -> 0.
    assert errors[0] / errors[1] == pytest.approx(4.0, rel=0.05)
    assert errors[1] / errors[2] == pytest.approx(4.0, rel=0.05)
    assert errors[2] / 2.5e-3 < 1e-2 * float(xi.norm())


def test_polar_retraction_is_the_formula_of_p1():
    w = orthonormal(7, 4)
    xi = stiefel.tangent_projection(w, randn(7, 4))
    evals, evecs = torch.linalg.eigh(torch.eye(4, dtype=torch.float64) + xi.T @ xi)
    formula = (w + xi) @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    torch.testing.assert_close(stiefel.polar_retraction(w, xi), formula, atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", [1e-3, 0.1, 0.6])
def test_polar_retraction_by_newton_schulz_is_the_svd_polar_factor(shape, size):
    w = orthonormal(*shape[-2:], *shape[:-2])
    xi = stiefel.tangent_projection(w, randn(*shape))
    xi = xi * (size / xi.norm(dim=(-2, -1), keepdim=True))  # ||xi||_F = size per matrix: a training step
    a = w + xi
    tall = a.transpose(-2, -1) if stiefel.is_wide(a) else a
    assert stiefel._polar_newton_schulz(tall) is not None  # the fast path is the one taken
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    torch.testing.assert_close(stiefel.polar_retraction(w, xi), u @ vh, atol=1e-13, rtol=0)
    # float32: orthonormal to working precision and the float64 polar factor to a few ulps
    out32 = stiefel.polar_retraction(w.float(), xi.float())
    assert float(stiefel.orthogonality_defect(out32).max()) < 1e-6
    torch.testing.assert_close(out32.double(), u @ vh, atol=2e-6, rtol=0)


def test_polar_factor_far_from_the_manifold_uses_the_svd():
    a = randn(6, 4) * 3  # singular values far from 1: Newton-Schulz would diverge or crawl
    assert stiefel._polar_newton_schulz(a) is None
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    torch.testing.assert_close(stiefel.project_to_stiefel(a), u @ vh, atol=1e-12, rtol=0)
    bad = a.clone()
    bad[0, 0] = float("nan")
    assert stiefel._polar_newton_schulz(bad) is None


def _svd_polar(a):
    u, _, vh = torch.linalg.svd(a.double(), full_matrices=False)
    return u @ vh


def _with_condition(m, n, kappa, seed=3):
    """An ``m x n`` float64 matrix with singular values spread log-uniformly over ``[1 / kappa, 1] * 3.7``."""
    k = min(m, n)
    u = orthonormal(m, k, seed=seed)
    v = orthonormal(n, k, seed=seed + 1)
    s = torch.logspace(0, -math.log10(kappa), k, dtype=torch.float64) * 3.7
    return (u * s) @ v.T


@pytest.mark.parametrize("shape", [(9, 4), (4, 9), (3, 6, 6), (2, 5, 3)])
def test_polar_factor_far_from_the_manifold_takes_the_gram_route(shape):
    a = randn(*shape) * 3
    tall = a.mT if stiefel.is_wide(a) else a
    assert stiefel._polar_newton_schulz(tall) is None
    assert stiefel._polar_from_gram(tall) is not None
    torch.testing.assert_close(stiefel.project_to_stiefel(a), _svd_polar(a), atol=1e-12, rtol=0)
    # a float32 input: computed in float64, returned in float32
    out32 = stiefel.project_to_stiefel(a.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), _svd_polar(a), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kappa", [1e2, 1e3, 9e3])
def test_polar_factor_by_the_gram_route_is_orthonormal_up_to_its_condition_bound(kappa):
    a = _with_condition(40, 12, kappa)
    polar = stiefel._polar_from_gram(a)
    assert polar is not None
    assert float(stiefel.orthogonality_defect(polar)) < 1e-9
    torch.testing.assert_close(polar, _svd_polar(a), atol=1e-9, rtol=0)


def test_polar_factor_of_ill_conditioned_or_rank_deficient_matrices_uses_the_svd():
    for a in (_with_condition(40, 12, 1e6), _with_condition(12, 40, 1e6).mT,
              randn(30, 8) @ randn(8, 10), torch.zeros(6, 4, dtype=torch.float64)):
        assert stiefel._polar_from_gram(a) is None  # kappa^2 beyond the route's bound: the SVD instead
    ill = _with_condition(40, 12, 1e6)
    out = stiefel.project_to_stiefel(ill)
    assert float(stiefel.orthogonality_defect(out)) < 1e-12
    torch.testing.assert_close(out, _svd_polar(ill), atol=1e-9, rtol=0)
    # one ill-conditioned matrix in a batch sends the whole batch to the SVD, with the same result
    batch = torch.stack([randn(40, 12) * 3, ill])
    assert stiefel._polar_from_gram(batch) is None
    torch.testing.assert_close(stiefel.project_to_stiefel(batch), _svd_polar(batch), atol=1e-9, rtol=0)


def test_qr_retraction_has_positive_r_diagonal():
    w = orthonormal(8, 3)
    xi = stiefel.tangent_projection(w, randn(8, 3))
    q = stiefel.qr_retraction(w, xi)
    r = q.T @ (w + xi)
    torch.testing.assert_close(q @ r, w + xi, atol=1e-12, rtol=0)
    assert (torch.diagonal(r) > 0).all()
    torch.testing.assert_close(r, torch.triu(r), atol=1e-12, rtol=0)


@pytest.fixture
def cholesky_qr_on_cpu(monkeypatch):
    """The CUDA route of the QR retraction (Cholesky QR), taken on the CPU."""
    monkeypatch.setattr(stiefel, "CHOLESKY_QR_DEVICES", ("cuda", "cpu"))


@pytest.mark.parametrize("route", ["householder", "cholesky"])
@pytest.mark.parametrize("shape", [(8, 3), (3, 8), (5, 5), (4, 30, 12)])
def test_qr_retraction_is_householder_qf_in_float64(shape, route, request):
    # both routes against numpy's Householder QR with R's diagonal made positive
    import numpy as np
    if route == "cholesky":
        request.getfixturevalue("cholesky_qr_on_cpu")
    torch.manual_seed(1)
    w = stiefel.orthonormal(randn(*shape))
    xi = stiefel.tangent_projection(w, 0.7 * randn(*shape))
    a = (w + xi).numpy()
    wide = shape[-2] < shape[-1]
    tall = np.swapaxes(a, -1, -2) if wide else a
    q, r = np.linalg.qr(tall)
    q = q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[..., None, :]
    expected = torch.from_numpy(np.swapaxes(q, -1, -2) if wide else q)
    torch.testing.assert_close(stiefel.qr_retraction(w, xi), expected, atol=1e-13, rtol=0)
    if route == "cholesky":  # the route itself, not its Householder fallback
        by_cholesky = stiefel._cholesky_qr2(torch.from_numpy(tall))
        assert by_cholesky is not None
        torch.testing.assert_close(by_cholesky, torch.from_numpy(q), atol=1e-13, rtol=0)
    in32 = stiefel.qr_retraction(w.float(), xi.float())
    assert in32.dtype == torch.float32
    assert float(stiefel.orthogonality_defect(in32).max()) < 2e-6


def test_qr_retraction_of_a_rank_deficient_point_falls_back_to_householder(cholesky_qr_on_cpu):
    # an xi far from tangent that makes W + xi rank-deficient: the Cholesky factorisation fails, QR takes over
    w = torch.eye(5, 3, dtype=torch.float64)
    xi = torch.zeros(5, 3, dtype=torch.float64)
    xi[:, 2] = w[:, 0] - w[:, 2]  # third column of W + xi equals the first
    assert stiefel._cholesky_qr2(w + xi) is None
    q = stiefel.qr_retraction(w, xi)
    torch.testing.assert_close(q, stiefel.orthonormal(w + xi), atol=0, rtol=0)
    assert torch.isfinite(q).all()
    # kappa 1e10 > 1 / sqrt(eps): whether or not Cholesky fails, the result is orthonormal to working precision
    a = _with_condition(40, 12, 1e10)
    assert stiefel._cholesky_qr2(a) is None
    q = stiefel.qr_retraction(torch.zeros_like(a), a)
    assert float(stiefel.orthogonality_defect(q)) < 1e-13


def test_cholesky_qr_result_that_is_not_orthonormal_is_refused(monkeypatch, cholesky_qr_on_cpu):
    # a factorisation that reports success but is wrong (what round-off can do past kappa ~ 1 / sqrt(eps))
    def wrong_factor(gram):
        return 2 * torch.eye(gram.shape[-1], dtype=gram.dtype), torch.zeros(gram.shape[:-2], dtype=torch.int32)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", wrong_factor)
    w = orthonormal(8, 3)
    xi = stiefel.tangent_projection(w, randn(8, 3))
    assert stiefel._cholesky_qr2(w + xi) is None
    torch.testing.assert_close(stiefel.qr_retraction(w, xi), stiefel.orthonormal(w + xi), atol=0, rtol=0)


def test_project_to_stiefel_is_the_nearest_orthonormal_matrix():
    q = orthonormal(6, 4)
    s = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(stiefel.project_to_stiefel(q * s), q, atol=1e-12, rtol=0)  # polar factor of Q S
    a = randn(6, 4)
    p = stiefel.project_to_stiefel(a)
    assert float(stiefel.orthogonality_defect(p)) < 1e-12
    for seed in range(20):  # no other orthonormal matrix is closer
        assert (a - p).norm() <= (a - orthonormal(6, 4, seed=seed + 100)).norm() + 1e-12
    assert float(stiefel.orthogonality_defect(stiefel.project_to_stiefel(randn(3, 8)))) < 1e-12  # rows


def test_orthogonality_defect_and_weight_flattening():
    w = torch.eye(3, dtype=torch.float64) * torch.tensor([1.0, 1.0, 1.5], dtype=torch.float64)
    assert float(stiefel.orthogonality_defect(w)) == pytest.approx(1.25)
    assert float(stiefel.orthogonality_defect(orthonormal(3, 8))) < 1e-12  # wide: rows
    assert stiefel.orthogonality_defect(orthonormal(3, 8, 4)).shape == (4,)
    conv = torch.randn(6, 2, 3, 3)
    assert stiefel.flatten_weight(conv).shape == (6, 18)
    assert stiefel.flatten_weight(conv, groups=3).shape == (3, 2, 18)
    torch.testing.assert_close(stiefel.unflatten_weight(stiefel.flatten_weight(conv, 3), conv), conv)
    with pytest.raises(ValueError, match="matrix"):
        stiefel.tangent_projection(torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="unknown retraction"):
        stiefel.retract(w, w, "cayley")


# ------------------------------------------------------------------------------------ the riemannian pass

class Small(nn.Module):
    """A square, a wide and a tall Linear and a conv, so every shape convention is exercised."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.square = nn.Linear(16, 16)
        self.wide = nn.Linear(16, 6)
        self.tall = nn.Linear(6, 9)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).mean((2, 3))
        h = torch.tanh(self.square(h.repeat(1, 4)))
        return self.tall(torch.tanh(self.wide(h)))


def riemannian(**params):
    return {"rules": [{"name": "stiefel", "match": {"type": ["Linear", "Conv2d"]}, "apply": "riemannian",
                       "with": params}]}


def weights(gm):
    return {name: stiefel.flatten_weight(module.weight.detach(), getattr(module, "groups", 1))
            for name, module in gm.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))}


def train(gm, optimizer, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 2, 5, 5, generator=generator)
        loss = (gm(x) - 1.0).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss.detach())


OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "sgd-nesterov-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("optimizer_name,retraction,steps", [
    ("sgd-momentum", "polar", 1000), ("adam", "polar", 1000), ("adamw", "qr", 1000),
    ("sgd-nesterov-wd", "qr", 200), ("sgd-momentum", "qr", 200), ("adam", "qr", 200), ("adamw", "polar", 200),
])
def test_riemannian_training_keeps_weights_orthonormal(optimizer_name, retraction, steps):
    make_optimizer = OPTIMIZERS[optimizer_name]
    torch.manual_seed(0)
    gm = orthofx.transform(Small(), riemannian(retraction=retraction))
    for w in weights(gm).values():
        assert float(stiefel.orthogonality_defect(w)) < 1e-5  # init: project
    start = {k: v.clone() for k, v in weights(gm).items()}
    optimizer = make_optimizer(gm.parameters())
    orthofx.attach(optimizer, gm)
    train(gm, optimizer, steps)
    for name, w in weights(gm).items():
        assert float(stiefel.orthogonality_defect(w)) < 1e-5, name
        assert (w - start[name]).abs().max() > 1e-2, name  # and the weights did move


def test_sparse_gradient_is_a_clear_error():
    gm = orthofx.transform(Small(), riemannian())
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    orthofx.attach(optimizer, gm)
    weight = gm.square.weight
    weight.grad = torch.zeros_like(weight).to_sparse()
    with pytest.raises(orthofx.OrthofxError, match="sparse gradient.*dense"):
        optimizer.step()


def test_sgd_step_is_exact_riemannian_gradient_descent():
    torch.manual_seed(0)
    gm = orthofx.transform(Small().double(), riemannian())
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.3)
    orthofx.attach(optimizer, gm)
    x = torch.randn(8, 2, 5, 5, dtype=torch.float64)
    loss = gm(x).square().sum()
    loss.backward()
    expected = {}
    before = {name: w.clone() for name, w in weights(gm).items()}
    for name, w in before.items():
        g = stiefel.flatten_weight(gm.get_submodule(name).weight.grad)
        expected[name] = stiefel.polar_retraction(w, -0.3 * stiefel.tangent_projection(w, g))
    optimizer.step()
    for name, w in weights(gm).items():
        torch.testing.assert_close(w, expected[name], atol=1e-12, rtol=0)
        # the gradient the optimizer used is the Riemannian one: tangent at the pre-step point
        g = stiefel.flatten_weight(gm.get_submodule(name).weight.grad)
        assert is_tangent(before[name], g).abs().max() < 1e-12


@pytest.mark.parametrize("make_optimizer,key", [
    (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), "momentum_buffer"),
    (lambda p: torch.optim.Adam(p, lr=1e-2), "exp_avg"),
])
def test_momentum_is_projected_onto_the_new_tangent_space(make_optimizer, key):
    torch.manual_seed(0)
    gm = orthofx.transform(Small(), riemannian())
    optimizer = make_optimizer(gm.parameters())
    orthofx.attach(optimizer, gm)
    train(gm, optimizer, 5)
    for name, w in weights(gm).items():
        module = gm.get_submodule(name)
        buf = stiefel.flatten_weight(optimizer.state[module.weight][key])
        assert buf.abs().max() > 0
        assert is_tangent(w, buf).abs().max() < 1e-5 * max(1.0, float(buf.abs().max())), name
    # keep: the state is left as the optimizer made it (not tangent in general)
    gm2 = orthofx.transform(Small(), riemannian(momentum="keep"))
    optimizer2 = make_optimizer(gm2.parameters())
    orthofx.attach(optimizer2, gm2)
    train(gm2, optimizer2, 5)
    w = weights(gm2)["wide"]
    buf = stiefel.flatten_weight(optimizer2.state[gm2.get_submodule("wide").weight][key])
    assert is_tangent(w, buf).abs().max() > 1e-4 * float(buf.abs().max())


def test_adam_second_moment_is_left_alone():
    torch.manual_seed(0)
    gm = orthofx.transform(Small(), riemannian())
    optimizer = torch.optim.Adam(gm.parameters(), lr=1e-2)
    orthofx.attach(optimizer, gm)
    train(gm, optimizer, 3)
    weight = gm.get_submodule("square").weight
    before = optimizer.state[weight]["exp_avg_sq"].clone()
    train(gm, optimizer, 1, seed=5)
    after = optimizer.state[weight]["exp_avg_sq"]
    projected = weight.grad  # the hook replaced the gradient by its projection before Adam used it
    torch.testing.assert_close(after, 0.999 * before + 0.001 * projected.square(), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("free,site", [("first", "conv"), ("last", "tall")])
def test_free_first_or_last_leaves_that_layer_unconstrained(free, site):
    torch.manual_seed(0)
    model = Small()
    original = model.get_submodule(site).weight.detach().clone()
    gm = orthofx.transform(model, riemannian(free=free))
    manifest = orthofx.manifest_of(gm)
    assert sorted(h.site for h in manifest.optimizer_hooks) == sorted({"conv", "square", "wide", "tall"} - {site})
    (free_change,) = [c for c in manifest.changes if c.what.startswith("left free")]
    assert free_change.site == site and free_change.after["free_site"] == site
    assert all(c.after["free_site"] == site for c in manifest.changes)
    torch.testing.assert_close(gm.get_submodule(site).weight.detach(), original)  # not projected
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    orthofx.attach(optimizer, gm)
    train(gm, optimizer, 50)
    for name, w in weights(gm).items():
        defect = float(stiefel.orthogonality_defect(w))
        assert (defect > 0.05) if name == site else (defect < 1e-5), name


def test_free_counts_the_sites_of_each_rule():
    torch.manual_seed(0)
    policy = {"rules": [
        {"name": "a", "match": {"name": "square"}, "apply": "riemannian", "with": {"free": "first"}},
        {"name": "b", "match": {"type": "Linear"}, "apply": "riemannian", "with": {"free": "last"}},
    ]}
    gm = orthofx.transform(Small(), policy)
    assert sorted(h.site for h in orthofx.manifest_of(gm).optimizer_hooks) == ["wide"]


def test_only_square_and_init_keep():
    torch.manual_seed(0)
    model = Small()
    policy = riemannian(only_square=True, init="keep")
    # explain and report say "skipped: not square" for the layers only_square leaves out, not "apply"
    status = {row["site"]: row["status"] for row in orthofx.explain(model, policy).rows()}
    assert status["square"] == "apply"
    assert status["conv"] == "skipped: not square (4x18; only_square: true)"
    assert status["wide"].startswith("skipped: not square (6x16")
    assert status["tall"].startswith("skipped: not square (9x6")
    gm = orthofx.transform(model, policy)
    manifest = orthofx.manifest_of(gm)
    assert [h.site for h in manifest.optimizer_hooks] == ["square"]
    assert [c.site for c in manifest.changes] == ["square"] and manifest.changes[0].status == "Stiefel, polar"
    passes = {row["site"]: row["pass"] for row in orthofx.report(gm).rows}
    assert passes["square"] == "riemannian (Stiefel, polar)"
    assert {passes[s] for s in ("conv", "wide", "tall")} == {status[s] for s in ("conv", "wide", "tall")}
    torch.testing.assert_close(gm.get_submodule("square").weight, model.square.weight)  # init: keep
    assert float(stiefel.orthogonality_defect(weights(gm)["square"])) > 0.1
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.01)
    orthofx.attach(optimizer, gm)
    train(gm, optimizer, 1)  # the first retraction lands on the manifold
    assert float(stiefel.orthogonality_defect(weights(gm)["square"])) < 1e-5
    # free counts the sites the rule constrains: the first square layer, not the (already free) conv
    gm = orthofx.transform(model, riemannian(only_square=True, free="first"))
    (change,) = orthofx.manifest_of(gm).changes
    assert change.site == "square" and change.status == "free" and not orthofx.manifest_of(gm).optimizer_hooks
    # a rule whose sites are all declined is a plan error unless it is optional
    rule = {"name": "tall-only", "match": {"name": "tall"}, "apply": "riemannian", "with": {"only_square": True}}
    with pytest.raises(orthofx.PlanError, match="not square"):
        orthofx.transform(model, {"rules": [rule]})
    gm = orthofx.transform(model, {"rules": [dict(rule, optional=True)]})
    assert not orthofx.manifest_of(gm).optimizer_hooks


def test_conv3d_weight_stays_on_the_stiefel_manifold():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 4, 2), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(3, 2, 3, 3, 3)
    gm = orthofx.transform(model, {"rules": [{"match": {"type": "Conv3d"}, "apply": "riemannian"}]},
                           example_inputs=(x,))
    matrix = lambda: stiefel.flatten_weight(gm.get_submodule("0").weight.detach())
    assert matrix().shape == (4, 16) and float(stiefel.orthogonality_defect(matrix())) < 1e-6  # projected
    start = matrix().clone()
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
    orthofx.attach(optimizer, gm)
    for _ in range(5):
        optimizer.zero_grad()
        gm(x).square().mean().backward()
        optimizer.step()
    assert float((matrix() - start).abs().max()) > 1e-3 and float(stiefel.orthogonality_defect(matrix())) < 1e-5


def test_grouped_conv_is_constrained_per_group_and_layers_without_gradient_are_left_alone():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 6, 3, groups=2, padding=1)
            self.head = nn.Linear(6, 6)

        def forward(self, x):
            return self.head(self.conv(x).mean(-1))

    torch.manual_seed(0)
    gm = orthofx.transform(Grouped(), {"rules": [{"match": {"type": ["Conv1d", "Linear"]},
                                                  "apply": "riemannian"}]})
    optimizer = torch.optim.Adam(gm.parameters(), lr=1e-2)
    orthofx.attach(optimizer, gm)
    for _ in range(20):
        loss = gm(torch.randn(5, 4, 7)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    per_group = stiefel.flatten_weight(gm.get_submodule("conv").weight.detach(), groups=2)
    assert per_group.shape == (2, 3, 6) and float(stiefel.orthogonality_defect(per_group).max()) < 1e-5
    # A weight without a gradient this step: the optimizer skips it, and so do the hooks.
    head = gm.get_submodule("head").weight
    frozen = head.detach().clone()
    loss = gm(torch.randn(5, 4, 7)).square().mean()
    optimizer.zero_grad()
    loss.backward()
    head.grad = None
    optimizer.step()
    torch.testing.assert_close(head.detach(), frozen, rtol=0, atol=0)
    assert all(not hook._pre for hook in orthofx.manifest_of(gm).optimizer_hooks)


@pytest.mark.parametrize("retraction,make_optimizer", [
    ("polar", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    ("qr", lambda p: torch.optim.Adam(p, lr=1e-2)),
])
def test_attach_batches_same_shaped_layers_without_changing_the_result(retraction, make_optimizer):
    """attach hands all StiefelHooks over at once and they stack same-shaped weights (here two 8x8 among 8x5 and
    3x8): the result is that of running every hook on its own."""
    torch.manual_seed(0)
    model = orthofx.models.get("deep_linear", depth=4, width=8, in_features=5, out_features=3).double()
    gm = orthofx.transform(model, {"rules": [{"match": {"type": "Linear"}, "apply": "riemannian",
                                              "with": {"retraction": retraction}}]})
    one_by_one = copy.deepcopy(gm)
    start = {name: p.detach().clone() for name, p in gm.named_parameters()}
    batched_optimizer = make_optimizer(gm.parameters())
    orthofx.attach(batched_optimizer, gm)
    optimizer = make_optimizer(one_by_one.parameters())
    hooks = orthofx.manifest_of(one_by_one).optimizer_hooks
    assert len(hooks) == 4

    def before(opt, args, kwargs):
        for hook in hooks:
            hook.before_step(one_by_one, opt)

    def after(opt, args, kwargs):
        for hook in hooks:
            hook.after_step(one_by_one, opt)

    optimizer.register_step_pre_hook(before)
    optimizer.register_step_post_hook(after)
    generator = torch.Generator().manual_seed(1)
    for _ in range(10):
        x = torch.randn(16, 5, generator=generator, dtype=torch.float64)
        for net, opt in ((gm, batched_optimizer), (one_by_one, optimizer)):
            loss = net(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (name, p), (_, q) in zip(gm.named_parameters(), one_by_one.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=0, msg=name)
        assert float((p.detach() - start[name]).abs().max()) > 1e-3  # and training moved them


def test_hooks_hold_no_tensors_when_copied():
    torch.manual_seed(0)
    gm = orthofx.transform(Small(), riemannian())
    hook = orthofx.manifest_of(gm).optimizer_hooks[0]
    assert isinstance(hook, StiefelHook)
    hook._pre[0] = torch.ones(3)
    assert pickle.loads(pickle.dumps(hook))._pre == {}
    assert copy.deepcopy(hook)._pre == {}
    hook._pre.clear()
    copied = copy.deepcopy(gm)
    assert len(orthofx.manifest_of(copied).optimizer_hooks) == 4


def p1_losses(steps, lr=0.2, momentum=0.0, mode="project", width=6, depth=3):
    """P1's teacher-student instance: an orthonormal deep linear net (first layer free) fitting a linear teacher
    on whitened data, trained by Riemannian SGD; returns the losses (float64) and the transformed model."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4 * width, width, generator=generator, dtype=torch.float64)
    x = x - x.mean(0)
    evals, evecs = torch.linalg.eigh(x.T @ x / len(x))
    x = x @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    teacher = orthonormal(width, width, seed=3) * torch.linspace(0.5, 1.5, width, dtype=torch.float64)
    y = x @ teacher.T
    model = orthofx.models.get("deep_linear", depth=depth, width=width, in_features=width, out_features=width)
    policy = {"rules": [{"match": {"type": "Linear"}, "apply": "isometric_init", "with": {"seed": 1}},
                        {"match": {"type": "Linear"}, "apply": "riemannian",
                         "with": {"free": "first", "momentum": mode}}]}
    gm = orthofx.transform(model.double(), policy)
    optimizer = torch.optim.SGD(gm.parameters(), lr=lr, momentum=momentum)
    orthofx.attach(optimizer, gm)
    losses = []
    for _ in range(steps):
        loss = 0.5 * (gm(x) - y).square().sum(1).mean()
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return torch.tensor(losses, dtype=torch.float64), gm


def max_defect(gm):
    return max(float(stiefel.orthogonality_defect(gm.get_submodule(hook.site).weight.detach()))
               for hook in orthofx.manifest_of(gm).optimizer_hooks)


def test_riemannian_gd_converges_linearly_on_a_p1_instance():
    """Orthonormal deep linear net, first layer free, whitened data: log loss is a straight line."""
    losses, gm = p1_losses(60)
    ratios = losses[1:] / losses[:-1]
    assert (ratios < 1).all()
    assert losses[-1] < 1e-8 * losses[0]
    tail = losses[10:].log()
    steps = torch.arange(len(tail), dtype=torch.float64)
    slope, intercept = torch.linalg.lstsq(torch.stack([steps, torch.ones_like(steps)], 1), tail[:, None]).solution
    residual = tail - (slope * steps + intercept)
    assert residual.abs().max() < 0.05  # a straight line in log loss: linear convergence
    rate = math.exp(float(slope))
    assert rate < 0.9
    assert ratios[10:].sub(rate).abs().max() < 0.02  # the per-step ratio stays constant
    assert max_defect(gm) < 1e-12


def test_riemannian_heavy_ball_converges_linearly_and_faster():
    """SGD momentum with the momentum projected onto the new tangent space (a vector transport): on the same P1
    instance the loss still falls geometrically, at a better rate than plain Riemannian descent."""
    plain, _ = p1_losses(60)
    heavy, gm = p1_losses(60, momentum=0.5)
    # heavy ball need not decrease every step, but every window of 10 steps shrinks the loss by a similar factor
    windows = heavy[20::10] / heavy[10:-10:10]
    assert (windows < 1e-2).all() and windows.max() / windows.min() < 10, windows
    assert heavy[-1] < 1e-6 * plain[-1]  # faster than plain descent at the same learning rate
    assert max_defect(gm) < 1e-12


def test_riemannian_rejects_other_layers():
    class WithNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.norm = nn.LayerNorm(3)

        def forward(self, x):
            return self.norm(self.lin(x))

    plan = orthofx.explain(WithNorm(), {"rules": [{"match": {"type": ["Linear", "LayerNorm"]},
                                                   "apply": "riemannian"}]})
    assert [e.site.name for e in plan.entries] == ["lin"]
    assert plan.skipped[0][0].name == "norm"
    with pytest.raises(orthofx.PolicyError, match="retraction"):
        orthofx.transform(WithNorm(), {"rules": [{"match": {"type": "Linear"}, "apply": "riemannian",
                                                  "with": {"retraction": "cayley"}}]})


# ---------------------------------------------------------------------------------- isometric init

def isometric(**params):
    return {"rules": [{"match": {"type": ["Linear", "Conv1d", "Conv2d", "Conv3d"]}, "apply": "isometric_init",
                       "with": params}]}


def test_isometric_init_gives_orthonormal_linears():
    model = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 9), nn.Tanh(), nn.Linear(9, 3))
    gm = orthofx.transform(model, isometric(seed=0))
    for name in ("0", "2", "4"):
        layer = gm.get_submodule(name)
        assert float(stiefel.orthogonality_defect(layer.weight.detach())) < 1e-6
        assert layer.bias.abs().max() == 0
        singular = torch.linalg.svdvals(layer.weight.detach())
        torch.testing.assert_close(singular, torch.ones_like(singular), atol=1e-6, rtol=0)
    changes = orthofx.manifest_of(gm).changes
    assert all(c.after["orth_defect"] < 1e-6 < c.before["orth_defect"] for c in changes)
    assert "orthonormal columns" in changes[0].what and "orthonormal rows" in changes[2].what


def test_isometric_init_gain_activation_seed_and_bias():
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
    a = orthofx.transform(model, isometric(seed=3, activation="relu", gain=0.5, bias="keep"))
    b = orthofx.transform(model, isometric(seed=3, activation="relu", gain=0.5, bias="keep"))
    c = orthofx.transform(model, isometric(seed=4))
    wa, wb, wc = (g.get_submodule("0").weight.detach() for g in (a, b, c))
    torch.testing.assert_close(wa, wb, rtol=0, atol=0)  # seeded: reproducible
    assert (wa - wc).abs().max() > 0.1
    scale = 0.5 * math.sqrt(2.0)
    torch.testing.assert_close(wa.T @ wa, scale ** 2 * torch.eye(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(a.get_submodule("0").bias, model[0].bias)  # bias: keep
    assert orthofx.manifest_of(a).changes[0].after["scale"] == pytest.approx(scale)
    tanh = orthofx.transform(model, isometric(activation="tanh"))
    w = tanh.get_submodule("2").weight.detach()
    torch.testing.assert_close(w @ w.T, (5 / 3) ** 2 * torch.eye(6), atol=1e-5, rtol=0)
    torch.manual_seed(11)  # seed null: the global RNG
    d = orthofx.transform(model, isometric())
    torch.manual_seed(11)
    e = orthofx.transform(model, isometric())
    torch.testing.assert_close(d.get_submodule("0").weight, e.get_submodule("0").weight, rtol=0, atol=0)
    with pytest.raises(orthofx.PolicyError, match="gain"):
        orthofx.transform(model, isometric(gain=0.0))
    for seed in (2**70, -1):  # outside torch.Generator's range: a policy error, not an overflow inside the pass
        with pytest.raises(orthofx.PolicyError, match="seed"):
            orthofx.transform(model, isometric(seed=seed))


def jacobian(module, x):
    return torch.autograd.functional.jacobian(lambda t: module(t[None])[0].reshape(-1), x).reshape(-1, x.numel())


@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 5, 3, padding=1),          # M > C: columns orthonormal, J^T J = I
    nn.Conv2d(5, 3, 5, padding=2),          # M < C: rows orthonormal, J J^T = I
    nn.Conv2d(4, 4, 3, padding="same", dilation=2),
    nn.Conv2d(4, 6, 3, padding=1, groups=2),
    nn.Conv1d(3, 3, 3, padding=1),
    nn.Conv2d(4, 4, 4, padding="same"),    # even kernel: the tap 'same' padding aligns
], ids=["co", "ro", "dilated", "grouped", "conv1d", "even"])
def test_delta_orthogonal_conv_has_an_orthogonal_jacobian(conv):
    gm = orthofx.transform(nn.Sequential(conv.double()), isometric(seed=0))
    layer = gm.get_submodule("0")
    spatial = (5,) * (layer.weight.dim() - 2)
    x = torch.randn(layer.in_channels, *spatial, dtype=torch.float64)
    j = jacobian(layer, x)
    groups = layer.groups
    m, c = layer.out_channels // groups, layer.in_channels // groups
    gram = j.T @ j if m >= c else j @ j.T
    torch.testing.assert_close(gram, torch.eye(len(gram), dtype=torch.float64), atol=1e-10, rtol=0)
    change = orthofx.manifest_of(gm).changes[0]
    assert "delta-orthogonal" in change.what and abs(change.after["lorth"]) < 1e-10
    nonzero = layer.weight.detach().abs().flatten(2).sum((0, 1)) > 0
    assert int(nonzero.sum()) == 1  # a single tap


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 8, 3, stride=2, padding=1),   # C < M <= C S^2: L_orth's RO case, two taps per dimension
    nn.Conv2d(4, 8, 4, stride=2, padding=1),   # even kernel
    nn.Conv1d(3, 5, 5, stride=3),
    nn.Conv2d(6, 4, 3, stride=2, groups=2),
    nn.Conv2d(4, 6, 3, stride=(1, 2), padding=1),  # a stride per dimension (the report had no L_orth for it)
], ids=["strided", "even", "conv1d", "grouped", "per-dimension"])
def test_isometric_init_reports_the_l_orth_of_the_whole_written_kernel(conv):
    gm = orthofx.transform(nn.Sequential(conv.double()), isometric(seed=0))
    layer = gm.get_submodule("0")
    change = orthofx.manifest_of(gm).changes[0]
    whole = metrics.lorth(layer.weight.detach() / change.after["scale"], stride=tuple(layer.stride),
                          groups=layer.groups)
    assert change.before["lorth"] is not None
    assert change.after["lorth"] == pytest.approx(float(whole), rel=1e-10, abs=1e-20)


def _exactly_orthogonal(layer, size):
    """Dense float64 Jacobian of the layer at one input of ``size``: an isometry or a co-isometry."""
    x = torch.randn(layer.in_channels, *size, dtype=torch.float64)
    j = jacobian(layer, x)
    eye = (torch.eye(j.shape[1], dtype=j.dtype), torch.eye(j.shape[0], dtype=j.dtype))
    return bool((j.T @ j - eye[0]).abs().max() < 1e-9 or (j @ j.T - eye[1]).abs().max() < 1e-9)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 8, 3, stride=2, padding=1),    # ResNet's downsampling conv: taps 1 and 2 read each 2 x 2 block
    nn.Conv2d(4, 16, 3, stride=2, padding=1),   # M = C S^2: square space-to-depth matrix
    nn.Conv2d(4, 32, 4, stride=2, padding=1),   # column-orthogonal case
    nn.Conv2d(8, 4, 1, stride=2),               # k < S: part of each block, rows orthonormal
    nn.Conv1d(3, 5, 5, stride=3, padding=1),
    nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2),
    nn.Conv3d(2, 8, 3, stride=(1, 2, 2), padding=1),  # taps 1..1 x 1..2 x 1..2: a 2 * 4 -> 8 square matrix
    nn.Conv3d(3, 3, 3, padding=1, groups=3),          # depthwise, stride 1: the centre tap
], ids=["resnet", "square", "co", "k<S", "conv1d", "grouped", "conv3d", "conv3d-depthwise"])
def test_isometric_init_of_strided_convs_is_exactly_orthogonal(conv):
    gm = orthofx.transform(nn.Sequential(conv.double()), isometric(seed=0))
    layer = gm.get_submodule("0")
    assert orthofx.manifest_of(gm).changes[0].after["exact"] is True
    assert orthofx.manifest_of(gm).changes[0].after["lorth"] < 1e-20
    assert _exactly_orthogonal(layer, (6,) * (layer.weight.dim() - 2) if layer.weight.dim() < 5 else (4, 4, 4))


class _SideBySide(nn.Module):
    """Independent layers, each applied to the input: one transform initialises all of them (a transform of each
    alone costs ~20 ms, mostly tracing and planning)."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        return [layer(x) for layer in self.layers]


def test_isometric_init_says_where_the_layer_is_not_exact():
    torch.manual_seed(0)
    cases = [(C, M, k, s, d, pad) for C, M, k, s, d, pad in itertools.product(
        (2, 4), (2, 4, 8), (1, 2, 3, 4), (1, 2, 3), (1, 2), ("same", "valid", 0, 1, 2))
        if not (pad == "same" and s > 1)]  # torch refuses 'same' with a stride
    convs = [nn.Conv1d(C, M, k, stride=s, dilation=d, padding=pad, bias=False).double()
             for C, M, k, s, d, pad in cases]
    gm = orthofx.transform(_SideBySide(convs), isometric(seed=0))
    changes = {change.site: change for change in orthofx.manifest_of(gm).changes}
    assert sorted(changes) == sorted(f"layers.{i}" for i in range(len(cases)))  # one change per layer
    claimed = 0
    for i, case in enumerate(cases):
        layer = gm.get_submodule(f"layers.{i}")
        assert (layer.in_channels, layer.out_channels, *layer.kernel_size, *layer.stride, *layer.dilation) \
            == case[:5], case
        if changes[f"layers.{i}"].after["exact"]:  # never a false claim
            claimed += 1
            assert _exactly_orthogonal(layer, (12,)), case
    assert claimed > 100
    # an even kernel with a dilation under 'same' padding: no tap is aligned with the output position
    gm = orthofx.transform(nn.Sequential(nn.Conv1d(2, 2, 2, dilation=2, padding="same").double()), isometric())
    assert orthofx.manifest_of(gm).changes[0].after["exact"] is False
    assert not _exactly_orthogonal(gm.get_submodule("0"), (8,))


def test_isometric_init_and_the_preset_on_lazy_layers():
    model = nn.Sequential(nn.Flatten(), nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 4))
    x = torch.randn(2, 4)
    gm = orthofx.transform(model, "isometric", example_inputs=(x,))  # the square check waits for the shapes
    assert {c.site for c in orthofx.manifest_of(gm).changes if c.pass_name == "riemannian"} == {"1", "3"}
    wide = nn.Sequential(nn.Flatten(), nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 4))
    manifest = orthofx.manifest_of(orthofx.transform(wide, "isometric", example_inputs=(torch.randn(2, 6),)))
    # the example runs the lazy layer before planning, so the plan itself skips it (with the shape it takes)
    assert not [c for c in manifest.changes if c.pass_name == "riemannian" and c.site == "1"]
    skipped = [reason for site, rule, reason in manifest.plan.skipped
               if site.name == "1" and rule == "stiefel-square-linears"]
    assert skipped == ["not square (4x6; only_square: true)"]
    with pytest.raises(orthofx.PlanError, match="lazy layer that has not run yet.*example_inputs"):
        orthofx.transform(nn.Sequential(nn.LazyLinear(4)), isometric())


def test_isometric_init_helpers_refuse_bad_weights():
    from orthofx.passes.isometric_init import activation_gain, delta_orthogonal_, orthogonal_
    # each message names the function and the argument, and says what it accepts
    for call, message in [
        (lambda: activation_gain("gelu"), r"activation_gain: unknown activation 'gelu'; choose one of"),
        (lambda: delta_orthogonal_(torch.empty(4, 2, 3, 3), groups=3),
         r"delta_orthogonal_: groups=3 must be a positive integer dividing the 4 output channels"),
        (lambda: delta_orthogonal_(torch.empty(5)),
         r"delta_orthogonal_: expected a floating-point weight with at least 3 dimensions, got torch\.float32 \(5,\)"),
        (lambda: orthogonal_(torch.zeros(4, 4, dtype=torch.int64)),
         r"orthogonal_: expected a floating-point weight with at least 2 dimensions, got torch\.int64 \(4, 4\)"),
        (lambda: delta_orthogonal_(torch.empty(4, 4, 3), taps=((2, 2),)),
         r"delta_orthogonal_: taps=\(\(2, 2\),\) must give \(first, count\) inside the kernel \(3,\)"),
    ]:
        with pytest.raises(orthofx.ArgumentError, match=message):
            call()

def test_isometric_init_float32_jacobian_of_a_deep_stack():
    torch.manual_seed(0)
    model = orthofx.models.get("deep_linear", depth=6, width=8, in_features=8, out_features=8)
    gm = orthofx.transform(model, isometric(seed=2))
    j = torch.autograd.functional.jacobian(gm, torch.randn(1, 8))[0, :, 0, :]
    torch.testing.assert_close(j.T @ j, torch.eye(8), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------- isometric blocks

@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
@pytest.mark.parametrize("activation", ["abs", "identity"])
def test_orthogonal_activation_block_has_an_orthogonal_jacobian(dtype, tol, activation):
    torch.manual_seed(0)
    block = OrthogonalActivationBlock(7, activation=activation, dtype=dtype)
    with torch.no_grad():
        block.bias.normal_()
    q = block.weight.detach()
    torch.testing.assert_close(q.T @ q, torch.eye(7, dtype=dtype), atol=tol, rtol=0)
    for _ in range(3):
        x = torch.randn(7, dtype=dtype)
        j = torch.autograd.functional.jacobian(block, x)
        torch.testing.assert_close(j.T @ j, torch.eye(7, dtype=dtype), atol=tol, rtol=0)
        torch.testing.assert_close(j @ j.T, torch.eye(7, dtype=dtype), atol=tol, rtol=0)
    assert block(torch.randn(4, 3, 7, dtype=dtype)).shape == (4, 3, 7)


def test_relu_block_is_a_partial_isometry_and_other_activations_are_refused():
    torch.manual_seed(0)
    block = OrthogonalActivationBlock(6, activation="relu", dtype=torch.float64)
    j = torch.autograd.functional.jacobian(block, torch.randn(6, dtype=torch.float64))
    torch.testing.assert_close(j @ j.T @ j, j, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="abs, identity, relu"):
        OrthogonalActivationBlock(6, activation="tanh")


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
@pytest.mark.parametrize("hidden", [1, 4, 9])
def test_reflection_residual_block_has_an_orthogonal_jacobian(dtype, tol, hidden):
    torch.manual_seed(0)
    block = ReflectionResidualBlock(9, hidden, dtype=dtype)
    with torch.no_grad():
        block.bias.normal_()
    w = block.weight.detach()
    assert w.shape == (hidden, 9)
    torch.testing.assert_close(w @ w.T, torch.eye(hidden, dtype=dtype), atol=tol, rtol=0)
    for _ in range(3):
        j = torch.autograd.functional.jacobian(block, torch.randn(9, dtype=dtype))
        torch.testing.assert_close(j.T @ j, torch.eye(9, dtype=dtype), atol=tol, rtol=0)
        torch.testing.assert_close(j, j.T, atol=tol, rtol=0)  # a reflection
    with pytest.raises(ValueError, match="must not exceed"):
        ReflectionResidualBlock(3, 4)


def test_isometric_blocks_train_and_trace():
    torch.manual_seed(0)
    model = nn.Sequential(OrthogonalActivationBlock(5), ReflectionResidualBlock(5, 3), nn.Linear(5, 2))
    gm = orthofx.transform(model, "lorth", example_inputs=(torch.randn(4, 5),))
    optimizer = torch.optim.Adam(gm.parameters(), lr=1e-2)
    for _ in range(5):
        loss = gm(torch.randn(4, 5)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for block in (gm.get_submodule("0"), gm.get_submodule("1")):
        w = block.weight.detach()
        torch.testing.assert_close(w @ w.T, torch.eye(len(w)), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------ preset, example

def test_isometric_preset():
    assert "isometric" in orthofx.presets()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 10))
    x = torch.randn(2, 1, 4, 4)
    gm = orthofx.transform(model, "isometric", example_inputs=(x,))
    manifest = orthofx.manifest_of(gm)
    assert [h.site for h in manifest.optimizer_hooks] == ["2"]
    init = {c.site for c in manifest.changes if c.pass_name == "isometric_init"}
    assert init == {"0", "2", "4"}
    (skipped,) = manifest.plan.skipped  # (site, rule, reason): the head is not square
    assert skipped[0].name == "4" and skipped[1] == "stiefel-square-linears" and "10x64" in skipped[2]
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
    orthofx.attach(optimizer, gm)
    for _ in range(20):
        loss = gm(torch.randn(8, 1, 4, 4)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(stiefel.orthogonality_defect(gm.get_submodule("2").weight.detach())) < 1e-5
    convs_only = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1))
    orthofx.transform(convs_only, "isometric")  # the Stiefel rule is optional


def test_orthonormal_linear_example_runs(tmp_path, capsys):
    """The example's main() in this process (tests/test_examples.py runs the same --quick command as a script)."""
    pytest.importorskip("matplotlib")
    from example_scripts import import_example

    out = tmp_path / "curves.png"
    threads = torch.get_num_threads()
    try:
        import_example("orthonormal_linear").main(["--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # main() sets one thread
    stdout = capsys.readouterr().out
    assert out.stat().st_size > 1000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line.split() for line in stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [2, 4]
    rates = [float(r[4]) for r in rows]
    assert all(0 < r < 1 for r in rates) and rates[0] < rates[1]  # linear, and slower when deeper


def test_stiefel_functions_refuse_what_they_cannot_handle():
    from orthofx.errors import LayerArgumentError
    with pytest.raises(LayerArgumentError, match="NaN or inf"):
        stiefel.project_to_stiefel(torch.full((3, 3), float("nan")))
    with pytest.raises(LayerArgumentError, match="NaN or inf"):
        stiefel.polar_retraction(orthonormal(4, 3), torch.full((4, 3), float("inf"), dtype=torch.float64))
    for bad in (torch.randn(6, 4, dtype=torch.complex128), torch.ones(3, 3, dtype=torch.int64)):
        with pytest.raises(LayerArgumentError, match="real floating-point"):
            stiefel.project_to_stiefel(bad)
    with pytest.raises(LayerArgumentError, match="groups"):
        stiefel.flatten_weight(torch.zeros(4, 2, 3, 3), 0)
    with pytest.raises(LayerArgumentError, match="g must be a tensor"):
        stiefel.tangent_projection(torch.eye(3), [[1.0]])


def test_a_float64_gradient_of_a_float32_weight_is_projected_in_float32():
    w = orthonormal(5, 3).float()
    xi = stiefel.tangent_projection(w, randn(5, 3))  # a float64 gradient for a float32 weight
    assert xi.dtype == torch.float32
    torch.testing.assert_close(xi.double(), stiefel.tangent_projection(w.double(), randn(5, 3)), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------ audit: dtypes, ties, edge cases

def tangent_reference(w, g):
    """P_W(G) from P1's formula, in float64, written out for the tall orientation (a wide W is transposed)."""
    w, g = w.double(), g.double()
    wide = w.shape[-2] < w.shape[-1]
    if wide:
        w, g = w.mT, g.mT
    wtg = w.mT @ g
    out = g - w @ ((wtg + wtg.mT) / 2)
    return out.mT if wide else out


def polar_reference(a):
    """U V^T of the float64 thin SVD of ``a``."""
    u, _, vh = torch.linalg.svd(a.double(), full_matrices=False)
    return u @ vh


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_half_precision_gradient_is_projected_to_the_accuracy_of_its_dtype(dtype, shape):
    """A half-precision weight's gradient with a large normal component (an L2 term: G = c W + tangent) was
    projected in that dtype: the cancellation in G - W sym(W^T G) left a 15% error in bfloat16. The projection of
    the exact bf16 inputs, rounded once, is off by about one ulp."""
    out, inp = shape
    gm = orthofx.transform(nn.Sequential(nn.Linear(inp, out)).to(dtype), {"rules": [
        {"match": {"type": "Linear"}, "apply": "riemannian"}]})
    weight = gm.get_submodule("0").weight
    w = weight.detach()
    tangent = tangent_reference(w, randn(out, inp))
    grad = (w.double() + 0.01 * tangent / tangent.norm() * w.double().norm()).to(dtype)
    expected = tangent_reference(w, grad)
    optimizer = torch.optim.SGD([weight], lr=0.0)
    orthofx.attach(optimizer, gm)
    weight.grad = grad.clone()
    optimizer.step()
    error = float((weight.grad.double() - expected).norm() / expected.norm())
    assert error < 4 * torch.finfo(dtype).eps, error


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tangent_projection_of_half_precision_inputs_is_rounded_once(dtype):
    # stiefel.tangent_projection itself computes in float32 and returns the input dtype
    w = stiefel.random_orthonormal(24, 10, generator=torch.Generator().manual_seed(2)).to(dtype)
    tangent = tangent_reference(w, randn(24, 10))
    g = (w.double() + 0.01 * tangent / tangent.norm() * w.double().norm()).to(dtype)
    out = stiefel.tangent_projection(w, g)
    expected = tangent_reference(w, g)
    assert out.dtype == dtype
    assert float((out.double() - expected).norm() / expected.norm()) < 4 * torch.finfo(dtype).eps


class TiedLinears(nn.Module):
    """Three 8x8 Linears; the first and the last share one weight."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.m = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.m(torch.tanh(self.a(x)))))


def test_free_layer_whose_weight_is_tied_to_a_constrained_one_stays_free():
    """free: first left site 'a' "unconstrained" in the manifest, but its weight is also 'b''s, which got a hook
    and the init projection: the "free" weight was projected (moved by 0.52) and trained on the manifold."""
    torch.manual_seed(0)
    model = TiedLinears()
    original = model.a.weight.detach().clone()
    gm = orthofx.transform(model, {"rules": [{"match": {"type": "Linear"}, "apply": "riemannian",
                                              "with": {"free": "first"}}]})
    assert gm.a.weight is gm.b.weight
    manifest = orthofx.manifest_of(gm)
    assert [h.site for h in manifest.optimizer_hooks] == ["m"]
    status = {c.site: c for c in manifest.changes}
    assert status["a"].status == status["b"].status == "free"
    assert "tied" in status["b"].what and "'a'" in status["b"].what
    torch.testing.assert_close(gm.a.weight.detach(), original, rtol=0, atol=0)  # not projected
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    orthofx.attach(optimizer, gm)
    for _ in range(20):
        loss = (gm(torch.randn(4, 8)) - 1).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(stiefel.orthogonality_defect(gm.a.weight.detach())) > 0.05
    assert float(stiefel.orthogonality_defect(gm.m.weight.detach())) < 1e-5


def test_layers_with_an_empty_weight_are_skipped_with_a_reason():
    """A Linear with no inputs or no outputs has nothing to keep orthonormal; the pass failed on it with a raw
    reshape / amax error (TransformError "cannot reshape tensor of 0 elements") and no model was returned."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "Initializing zero-element tensors is a no-op"
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 0), nn.Linear(0, 3))
    policy = {"rules": [{"match": {"type": "Linear"}, "apply": "riemannian"}]}
    status = {row["site"]: row["status"] for row in orthofx.explain(model, policy).rows()}
    assert status["0"] == "apply"
    assert status["1"].startswith("skipped: empty weight (0x4)")
    assert status["2"].startswith("skipped: empty weight (3x0)")
    gm = orthofx.transform(model, policy)
    assert [h.site for h in orthofx.manifest_of(gm).optimizer_hooks] == ["0"]
    optimizer = torch.optim.Adam(gm.parameters(), lr=1e-2)
    orthofx.attach(optimizer, gm)
    loss = (gm(torch.randn(5, 4)) - 1).square().sum()
    loss.backward()
    optimizer.step()
    assert float(stiefel.orthogonality_defect(gm.get_submodule("0").weight.detach())) < 1e-5


def test_sgd_nesterov_groups_scheduler_and_closure_match_a_slow_reference():
    """Param groups with their own lr, an LR scheduler created after attach, weight decay, nesterov, steps with and
    without a closure: every step is, per weight, P1's update written out below (float64, dense formulas)."""
    torch.manual_seed(0)
    gm = orthofx.transform(nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double(), {"rules": [
        {"match": {"type": "Linear"}, "apply": "riemannian"}]})
    first, last = gm.get_submodule("0"), gm.get_submodule("2")
    mu, wd, lrs = 0.9, 1e-2, [0.2, 0.05]
    optimizer = torch.optim.SGD([{"params": first.parameters(), "lr": lrs[0]},
                                 {"params": last.parameters(), "lr": lrs[1]}],
                                momentum=mu, nesterov=True, weight_decay=wd)
    orthofx.attach(optimizer, gm)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    reference = copy.deepcopy(gm)
    ref_params = [[reference.get_submodule("0").weight, reference.get_submodule("0").bias],
                  [reference.get_submodule("2").weight, reference.get_submodule("2").bias]]
    buffers = {}
    generator = torch.Generator().manual_seed(3)
    for step in range(6):
        x = torch.randn(9, 5, generator=generator, dtype=torch.float64)

        def closure():
            optimizer.zero_grad()
            loss = (gm(x) - 1).square().mean()
            loss.backward()
            return loss

        if step % 2:
            optimizer.step(closure)
        else:
            closure()
            optimizer.step()
        scheduler.step()
        # the reference step
        grads = torch.autograd.grad((reference(x) - 1).square().mean(), [p for ps in ref_params for p in ps])
        with torch.no_grad():
            for (weight, bias), (gw, gb), lr in zip(ref_params, (grads[:2], grads[2:]), lrs):
                lr = lr * 0.7 ** step
                w = weight.detach().clone()
                for key, p, g in ((("w", lr), weight, tangent_reference(w, gw)), (("b", lr), bias, gb)):
                    g = g + wd * p
                    name = (key[0], id(p))
                    buffers[name] = g.clone() if name not in buffers else mu * buffers[name] + g
                    d = g + mu * buffers[name]
                    if key[0] == "b":
                        p -= lr * d
                    else:
                        p.copy_(polar_reference(w + tangent_reference(w, -lr * d)))
                        buffers[name] = tangent_reference(p, buffers[name])
    for (name, p), (_, q) in zip(gm.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-11, rtol=0, msg=name)
    for module in (first, last):
        buf = optimizer.state[module.weight]["momentum_buffer"]
        torch.testing.assert_close(buf, buffers[("w", id(ref_params[module is last][0]))], atol=1e-11, rtol=0)
