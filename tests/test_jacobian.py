"""Jacobian isometry (P2): estimators against dense float64 Jacobians, the JacobianProbe layer, the pass and the
``jacobian`` preset.

References are built here from ``torch.autograd.functional.jacobian`` (reverse mode, one backward per output):
``J`` is the Jacobian of the flattened map, ``A = J^T J``, and the three quantities are
``||A - I||_F^2``, ``||J A - J||_F^2`` and ``sum_{i != j} A_ij^2``. Tolerances for the stochastic estimators
are five standard errors of the mean over many single-probe estimates (seeded, hence deterministic).
"""

from __future__ import annotations

import copy
import itertools
import math
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from references import central_difference

import orthofx
import orthofx.passes.jacobian_isometry  # noqa: F401  (registers the pass until orthofx.passes imports it)
from orthofx import metrics, models
from orthofx.metrics import isometry_moments, jacobian_isometry, jacobian_singular_values
from orthofx.nn.jacobian import JacobianProbe
from orthofx.transform import manifest_of
from orthofx.passes.jacobian_isometry import JacobianTerm

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny float64 problems (tests/conftest.py)


# ------------------------------------------------------------------------------------------- references


def dense_jacobian(fn, x: torch.Tensor) -> torch.Tensor:
    """``(m, n)`` Jacobian of the flattened map; a module is copied first (its buffers are left alone)."""
    if isinstance(fn, nn.Module):
        fn = copy.deepcopy(fn)
    y = fn(x)
    jac = torch.autograd.functional.jacobian(fn, x)
    return jac.reshape(y.numel(), x.numel())


def exact_quantity(J: torch.Tensor, kind: str) -> float:
    A = J.T @ J
    if kind == "full":
        return float(((A - torch.eye(A.shape[0], dtype=A.dtype)) ** 2).sum())
    if kind == "partial":
        return float(((J @ A - J) ** 2).sum())
    return float((A ** 2).sum() - (A.diagonal() ** 2).sum())


def exact_per_sample(fn, x: torch.Tensor, kind: str) -> float:
    """Mean over samples of the quantity of the per-sample Jacobian (fn applied to one sample at a time)."""
    return sum(exact_quantity(dense_jacobian(fn, x[b:b + 1]), kind) for b in range(x.shape[0])) / x.shape[0]


def samples(fn, x, kind, count, seed=0, **kw) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([jacobian_isometry(fn, x, kind=kind, generator=gen, create_graph=False, **kw)
                        for _ in range(count)])


def value(t: torch.Tensor) -> float:
    return float(t.detach())


def assert_unbiased(values: torch.Tensor, expected: float) -> None:
    n = values.numel()
    stderr = float(values.std()) / math.sqrt(n)
    assert abs(float(values.mean()) - expected) <= 5 * stderr + 1e-10 * (1 + abs(expected)), \
        (float(values.mean()), expected, stderr)


def tanh_mlp(n_in=4, hidden=6, n_out=3, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out)).to(D)


class NoJvpTanh(torch.autograd.Function):
    """tanh with a backward but no jvp: forward-mode AD cannot go through it."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class NoJvpNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a = nn.Linear(4, 5).to(D)
        self.b = nn.Linear(5, 4).to(D)

    def forward(self, x):
        return self.b(NoJvpTanh.apply(self.a(x)))


# ------------------------------------------------------------------------------------------- estimators


@pytest.mark.parametrize("kind", ["full", "partial", "offdiag"])
def test_estimators_are_unbiased(kind):
    net = tanh_mlp()
    x = torch.randn(2, 4, dtype=D, generator=torch.Generator().manual_seed(1))
    expected = exact_quantity(dense_jacobian(net, x), kind)
    assert expected > 1e-3
    assert_unbiased(samples(net, x, kind, 1500, route="double_vjp"), expected)
    assert_unbiased(samples(net, x, kind, 300, seed=1, route="jvp"), expected)


@pytest.mark.parametrize("kind", ["full", "partial"])
def test_variance_matches_the_rademacher_formula(kind):
    """Var(v^T M v) = 2 sum_{i != j} M_ij^2 for Rademacher v, with M = (A - I)^2 (full) or (A - I) A (A - I)."""
    net = tanh_mlp(seed=2)
    x = torch.randn(2, 4, dtype=D, generator=torch.Generator().manual_seed(2))
    J = dense_jacobian(net, x)
    A = J.T @ J
    E = A - torch.eye(A.shape[0], dtype=D)
    M = E @ E if kind == "full" else E @ A @ E
    variance = 2 * float((M ** 2).sum() - (M.diagonal() ** 2).sum())
    values = samples(net, x, kind, 2000, seed=5, route="double_vjp")
    assert 0.8 < float(values.var()) / variance < 1.25


def test_offdiag_several_probes_is_an_unbiased_sample_variance():
    net = tanh_mlp(seed=4)
    x = torch.randn(3, 4, dtype=D, generator=torch.Generator().manual_seed(4))
    expected = exact_quantity(dense_jacobian(net, x), "offdiag")
    assert_unbiased(samples(net, x, "offdiag", 400, probes=5, route="double_vjp"), expected)
    # probes=1 still gives an estimate (it uses two probes: a variance needs two)
    one = jacobian_isometry(net, x, kind="offdiag", probes=1, generator=torch.Generator().manual_seed(0))
    two = jacobian_isometry(net, x, kind="offdiag", probes=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(one, two)


@pytest.mark.parametrize("shape", [(5, 3), (3, 5)])
def test_non_square_jacobians_use_the_input_identity(shape):
    n_in, n_out = shape
    torch.manual_seed(6)
    lin = nn.Linear(n_in, n_out).to(D)
    x = torch.randn(n_in, dtype=D)
    W = lin.weight.detach()
    expected = float(((W.T @ W - torch.eye(n_in, dtype=D)) ** 2).sum())
    assert_unbiased(samples(lin, x, "full", 800, route="double_vjp"), expected)
    if n_out < n_in:  # wide: ||J^T J - I_n||^2 = ||J J^T - I_m||^2 + n - m
        row = float(((W @ W.T - torch.eye(n_out, dtype=D)) ** 2).sum())
        assert expected == pytest.approx(row + n_in - n_out)


def test_exact_isometries_give_zero():
    """abs(Qx + b) has an orthogonal Jacobian; relu(Qx + b) a partial isometry (P2)."""
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=D, generator=torch.Generator().manual_seed(7)))
    b = torch.randn(6, dtype=D)
    x = torch.randn(4, 6, dtype=D)
    iso = lambda z: torch.abs(z @ q.T + b)  # noqa: E731
    part = lambda z: torch.relu(z @ q.T + b)  # noqa: E731
    assert value(jacobian_isometry(iso, x, kind="full", probes=3)) < 1e-20
    assert value(jacobian_isometry(iso, x, kind="offdiag", probes=3)) < 1e-20
    assert value(jacobian_isometry(part, x, kind="partial", probes=3)) < 1e-20
    assert value(jacobian_isometry(part, x, kind="full", probes=3)) > 1.0  # the inactive units count


def test_per_sample_means_per_sample_jacobians():
    net = tanh_mlp(seed=8)
    x = torch.randn(3, 4, dtype=D, generator=torch.Generator().manual_seed(8))
    for kind in ("full", "partial"):
        # independent samples: the per-sample value is the batch value over B, probe for probe
        batch = jacobian_isometry(net, x, kind=kind, generator=torch.Generator().manual_seed(1))
        mean = jacobian_isometry(net, x, kind=kind, per_sample=True, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(mean, batch / 3)
    for kind in ("full", "partial", "offdiag"):
        values = samples(net, x, kind, 600, per_sample=True, route="double_vjp")
        assert_unbiased(values, exact_per_sample(net, x, kind))
    normalized = samples(net, x, "full", 600, per_sample=True, normalize=True, route="double_vjp")
    assert_unbiased(normalized, exact_per_sample(net, x, "full") / 4)


def test_batchnorm_coupling_and_running_statistics():
    """In training mode BatchNorm couples the samples: per_sample=False estimates the coupled batch Jacobian,
    per_sample=True its per-sample split (the mean over B). The estimate leaves the running statistics alone."""
    torch.manual_seed(9)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh()).to(D).train()
    x = torch.randn(4, 3, dtype=D)
    J = dense_jacobian(net, x)
    coupled = exact_quantity(J, "full")
    blocks = J.reshape(4, 4, 4, 3)
    assert float(blocks[0, :, 1, :].abs().max()) > 1e-3  # the samples really are coupled
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert_unbiased(samples(net, x, "full", 600, route="double_vjp"), coupled)
    assert_unbiased(samples(net, x, "full", 200, per_sample=True, route="jvp"), coupled / 4)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_double_vjp_fallback_matches_the_jvp_route():
    net = tanh_mlp(seed=10)
    x = torch.randn(2, 4, dtype=D)
    for kind in ("full", "partial", "offdiag"):
        a = jacobian_isometry(net, x, kind=kind, probes=2, route="jvp", generator=torch.Generator().manual_seed(3))
        b = jacobian_isometry(net, x, kind=kind, probes=2, route="double_vjp",
                              generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_forward_mode_gap_falls_back_to_double_vjp():
    net = NoJvpNet()
    x = torch.randn(3, 4, dtype=D)
    with pytest.raises((NotImplementedError, RuntimeError), match="jvp"):
        jacobian_isometry(net, x, route="jvp")
    for kind in ("full", "partial", "offdiag"):
        value, route = metrics._jacobian_isometry(net, x, kind=kind, generator=torch.Generator().manual_seed(4))
        assert route == "double_vjp"
        reference = jacobian_isometry(net, x, kind=kind, route="double_vjp",
                                      generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(value, reference)
    assert_unbiased(samples(net, x, "full", 800), exact_quantity(dense_jacobian(net, x), "full"))


def test_attention_runs_with_the_math_backend():
    """The fused CPU attention kernel has no forward-mode AD and no double backward; the estimator uses the math
    backend of scaled_dot_product_attention."""
    torch.manual_seed(11)
    proj = nn.Linear(4, 4).to(D)

    def attention(z):
        h = proj(z)
        return torch.nn.functional.scaled_dot_product_attention(h, h, h)

    x = torch.randn(1, 3, 4, dtype=D)
    values = samples(attention, x, "full", 300, route="jvp")
    assert_unbiased(values, exact_quantity(dense_jacobian(attention, x), "full"))
    est = jacobian_isometry(attention, x)
    est.backward()
    assert proj.weight.grad is not None and torch.isfinite(proj.weight.grad).all()


@pytest.mark.parametrize("kind", ["full", "partial", "offdiag"])
def test_gradient_against_finite_differences(kind):
    """With a fixed probe the estimate is a smooth function of the parameters; autograd (create_graph) must
    agree with central differences."""
    torch.manual_seed(12)
    block = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).to(D)
    x = torch.randn(2, 3, dtype=D)

    def estimate():
        return jacobian_isometry(block, x, kind=kind, probes=2, generator=torch.Generator().manual_seed(0))

    params = list(block.parameters())
    grads = torch.autograd.grad(estimate(), params, allow_unused=True)  # the last bias does not change J
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    for p, g in zip(params, grads):
        for index in itertools.product(*map(range, p.shape)):
            assert central_difference(estimate, p, index) == pytest.approx(float(g[index]), rel=1e-5, abs=1e-7)


NORM_BLOCKS = {
    "batchnorm1d": lambda: (nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Tanh()), (5, 3)),
    "layernorm": lambda: (nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)), (4, 3)),
    "batchnorm2d": lambda: (nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU()),
                            (3, 2, 3, 3)),
    "instancenorm": lambda: (nn.Sequential(nn.Conv1d(2, 2, 3, padding=1), nn.InstanceNorm1d(2, affine=True)),
                             (2, 2, 5)),
}


@pytest.mark.parametrize("route", ["jvp", "double_vjp"])
@pytest.mark.parametrize("norm", sorted(NORM_BLOCKS))
def test_gradient_through_normalisation_layers_against_finite_differences(norm, route):
    """torch's layer / batch / instance norm kernels differentiate wrongly through forward mode (and to third
    order); the estimate's gradient must still match central differences, in training mode."""
    torch.manual_seed(5)
    block, shape = NORM_BLOCKS[norm]()
    block = block.to(D).train()
    x = torch.randn(*shape, dtype=D)
    weight = block[0].weight

    def estimate():
        return jacobian_isometry(block, x, route=route, generator=torch.Generator().manual_seed(0))

    (grad,) = torch.autograd.grad(estimate(), weight)
    for index in list(itertools.product(*map(range, weight.shape)))[::2]:
        assert central_difference(estimate, weight, index) == pytest.approx(float(grad[index]), rel=1e-5, abs=1e-6)
    # the running statistics are the block's own and the estimate leaves them alone
    for name, buffer in block.named_buffers():
        if name.endswith("running_mean"):
            assert torch.equal(buffer, torch.zeros_like(buffer))


def test_create_graph_false_is_detached_and_bad_input_is_refused():
    net = tanh_mlp()
    x = torch.randn(2, 4, dtype=D)
    assert not jacobian_isometry(net, x, create_graph=False).requires_grad
    assert jacobian_isometry(net, x).requires_grad
    with pytest.raises(ValueError, match="kind"):
        jacobian_isometry(net, x, kind="diag")
    with pytest.raises(ValueError, match="probes"):
        jacobian_isometry(net, x, probes=0)
    with pytest.raises(ValueError, match="floating"):
        jacobian_isometry(net, torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="single tensor"):
        jacobian_isometry(lambda z: (z, z), x)
    with pytest.raises(ValueError, match="batch"):
        jacobian_isometry(lambda z: z.sum(0), x, per_sample=True)


# --------------------------------------------------------------------------- batch_fraction, zero tangents


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kind,per_sample", [("full", False), ("offdiag", False), ("full", True),
                                             ("partial", True)])
def test_batch_fraction_is_unbiased_for_the_whole_batch(kind, per_sample):
    """On a random half of the samples, scaled by B / b (or averaged per sample), the estimate is unbiased for the
    whole batch's quantity; the randomness is the subset and the probes together."""
    net = tanh_mlp(n_out=4, seed=13)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)  # strong weights: tanh saturates for some samples, so the per-sample values differ
    x = torch.randn(6, 4, dtype=D, generator=gen(13)) * torch.linspace(0.2, 2.0, 6, dtype=D)[:, None]
    expected = exact_per_sample(net, x, kind) if per_sample else exact_quantity(dense_jacobian(net, x), kind)
    values = samples(net, x, kind, 800, per_sample=per_sample, batch_fraction=0.5, probes=4, route="double_vjp")
    assert_unbiased(values, expected)
    # the subsample's own spread is part of the variance: the subset must really vary
    spread = [exact_quantity(dense_jacobian(net, x[i:i + 1]), kind) for i in range(6)]
    assert max(spread) > 2 * min(spread)


def test_batch_fraction_takes_a_seeded_subset_and_scales_it():
    net = tanh_mlp(seed=14)
    x = torch.randn(6, 4, dtype=D, generator=gen(14))
    value_half = jacobian_isometry(net, x, batch_fraction=0.5, generator=gen(5))
    g = gen(5)
    index = torch.randperm(6, generator=g)[:3]  # the subset is drawn first, then the probes, from one generator
    torch.testing.assert_close(value_half, 2 * jacobian_isometry(net, x[index], generator=g))
    per_sample = jacobian_isometry(net, x, batch_fraction=0.4, per_sample=True, normalize=True, generator=gen(6))
    g = gen(6)
    index = torch.randperm(6, generator=g)[:3]  # ceil(0.4 * 6) = 3 samples
    torch.testing.assert_close(per_sample, jacobian_isometry(net, x[index], per_sample=True, normalize=True,
                                                             generator=g))
    # a fraction that rounds up to the whole batch, or 1, is the plain estimate
    for fraction in (1.0, 0.99):
        torch.testing.assert_close(jacobian_isometry(net, x, batch_fraction=fraction, generator=gen(7)),
                                   jacobian_isometry(net, x, generator=gen(7)))
    for bad in (0, 1.5, -0.1, True, "half"):
        with pytest.raises(ValueError, match="batch_fraction"):
            jacobian_isometry(net, x, batch_fraction=bad)
    with pytest.raises(ValueError, match="batch"):
        jacobian_isometry(lambda z: z.sum(0), x, batch_fraction=0.5)  # the output has no sample dimension


def test_batch_fraction_with_batchnorm_estimates_the_subset_map():
    """BatchNorm in training mode normalises the subset with the subset's statistics: the estimate is that of the
    b-sample map (scaled by B / b), a different and here much larger quantity than the coupled B-sample one
    (small batches have small variances); the running statistics are left alone."""
    torch.manual_seed(15)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh()).to(D).train()
    x = torch.randn(8, 3, dtype=D)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for seed in range(3):
        g = gen(seed)
        index = torch.randperm(8, generator=g)[:4]
        torch.testing.assert_close(jacobian_isometry(net, x, batch_fraction=0.5, generator=gen(seed)),
                                   2 * jacobian_isometry(net, x[index], generator=g))
    subsets = list(itertools.combinations(range(8), 4))
    over_subsets = sum(exact_quantity(dense_jacobian(net, x[list(c)]), "full") for c in subsets) / len(subsets)
    coupled = exact_quantity(dense_jacobian(net, x), "full")
    assert 2 * over_subsets > 2 * coupled  # the mean of what batch_fraction=0.5 estimates, vs the coupled value
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_probe_batch_fraction_subsamples_the_other_batched_arguments():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, z, mask, scale=1.0):
            return torch.tanh(self.lin(z)) * mask * scale

    torch.manual_seed(16)
    probe = JacobianProbe(Masked().to(D), batch_fraction=0.5, per_sample=True, seed=3)
    assert "batch_fraction=0.5" in repr(probe)
    probe.train()
    x = torch.randn(6, 4, dtype=D)
    mask = torch.rand(6, 1, dtype=D) + 0.5
    scale = torch.full((4,), 2.0, dtype=D)  # dimension 0 is not the batch: passed as it is
    out = probe(x, mask, scale=scale)
    torch.testing.assert_close(out, probe.block(x, mask, scale=scale))  # the output covers the whole batch
    g = gen(3)
    index = torch.randperm(6, generator=g)[:3]
    reference = jacobian_isometry(lambda z: probe.block(z, mask[index], scale=scale), x[index], per_sample=True,
                                  generator=g)
    torch.testing.assert_close(probe.estimate, reference)
    with pytest.raises(ValueError, match="batch_fraction"):
        JacobianProbe(Masked(), batch_fraction=0.0)


def test_broadcast_parameters_get_zero_tangents_without_changing_the_estimate(monkeypatch):
    """The forward-mode route passes biases and normalisation scales as jvp primals with zero tangents (a speed
    measure); the estimate and its gradient are those of the plain jvp."""
    torch.manual_seed(17)
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).to(D).train()
    x = torch.randn(6, 4, dtype=D)
    assert set(metrics._Call(net).tangent_parameters()) == {"0.bias", "1.weight", "1.bias", "3.bias"}
    assert metrics._Call(lambda z: z).tangent_parameters() == {}
    params = list(net.parameters())

    def run(kind):
        estimate = jacobian_isometry(net, x, kind=kind, probes=2, route="jvp", generator=gen(2))
        grads = torch.autograd.grad(estimate, params, allow_unused=True)
        return estimate, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    with_tangents = {kind: run(kind) for kind in metrics.JACOBIAN_KINDS}
    monkeypatch.setattr(metrics._Call, "tangent_parameters", lambda self: {})
    for kind in metrics.JACOBIAN_KINDS:
        estimate, grads = run(kind)
        torch.testing.assert_close(with_tangents[kind][0], estimate, rtol=1e-12, atol=1e-12)
        for a, b in zip(with_tangents[kind][1], grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert any(float(g.abs().max()) > 0 for g in grads)


def test_pass_batch_fraction_parameter():
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Tanh()), nn.Linear(4, 2))
    policy = {"rules": [{"match": {"kind": "block", "name": "0"}, "apply": "jacobian_isometry",
                         "with": {"batch_fraction": 0.25}}]}
    gm = orthofx.transform(model, policy)
    assert gm.get_submodule("0").batch_fraction == 0.25
    gm.train()
    gm(torch.randn(8, 4))
    assert value(orthofx.penalty(gm)) > 0
    for bad in (0, 1.5):
        with pytest.raises(orthofx.errors.OrthofxError, match="batch_fraction"):
            orthofx.Policy.from_dict({"rules": [dict(policy["rules"][0], **{"with": {"batch_fraction": bad}})]})


# ------------------------------------------------------------------------------- singular values, moments


def test_singular_values_are_exact():
    torch.manual_seed(13)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))  # float32 module
    x = torch.randn(2, 4)
    sv = jacobian_singular_values(net, x, dtype=D)
    assert sv.dtype == D and sv.shape == (6,)
    ref = torch.linalg.svdvals(dense_jacobian(net.to(D), x.to(D)))
    torch.testing.assert_close(sv, ref)
    per = jacobian_singular_values(net, x.to(D), per_sample=True)
    assert per.shape == (2, 3)
    for b in range(2):
        torch.testing.assert_close(per[b], torch.linalg.svdvals(dense_jacobian(net, x[b:b + 1].to(D))))


def test_singular_values_of_coupled_batchnorm_are_the_diagonal_blocks():
    torch.manual_seed(14)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(D).train()
    x = torch.randn(5, 3, dtype=D)
    before = net[1].running_mean.clone()
    blocks = dense_jacobian(net, x).reshape(5, 4, 5, 3)
    per = jacobian_singular_values(net, x, per_sample=True)
    for b in range(5):
        torch.testing.assert_close(per[b], torch.linalg.svdvals(blocks[b, :, b, :]))
    assert torch.equal(net[1].running_mean, before)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 6), n=st.integers(1, 6), seed=st.integers(0, 2 ** 16))
def test_moments_identity(m, n, seed):
    """||J^T J - I_n||_F^2 = n [(m1 - 1)^2 + (m2 - m1^2)], the n - rank missing eigenvalues being zeros."""
    J = torch.randn(m, n, dtype=D, generator=torch.Generator().manual_seed(seed))
    m1, m2 = isometry_moments(torch.linalg.svdvals(J), n=n)
    lhs = float(((J.T @ J - torch.eye(n, dtype=D)) ** 2).sum())
    assert lhs == pytest.approx(float(n * ((m1 - 1) ** 2 + (m2 - m1 ** 2))), rel=1e-9, abs=1e-9)
    eig = torch.linalg.eigvalsh(J.T @ J)
    assert float(m1) == pytest.approx(float(eig.mean()), abs=1e-9)
    assert float(m2) == pytest.approx(float((eig ** 2).mean()), abs=1e-9)


def test_moments_from_jacobian_singular_values():
    net = tanh_mlp(n_in=4, hidden=6, n_out=4, seed=15)
    x = torch.randn(4, dtype=D)
    m1, m2 = isometry_moments(jacobian_singular_values(net, x))
    assert float(4 * ((m1 - 1) ** 2 + (m2 - m1 ** 2))) == pytest.approx(
        exact_quantity(dense_jacobian(net, x), "full"), rel=1e-9)
    with pytest.raises(ValueError, match="n must be"):
        isometry_moments(torch.ones(3), n=2)


# ------------------------------------------------------------------------------------------ JacobianProbe


def small_block(seed=16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 4)).to(D)


def test_probe_is_transparent():
    block = small_block()
    keys = list(block.state_dict())
    probe = JacobianProbe(block, weight=0.5)
    assert list(probe.state_dict()) == keys
    assert [n for n, _ in probe.named_parameters()] == [n for n, _ in block.named_parameters()]
    assert probe[0] is block[0] and len(probe) == 4 and list(probe) == list(block)
    assert probe.block is block and probe.to_plain() is block
    probe.load_state_dict(small_block(seed=17).state_dict())
    assert torch.equal(block[0].weight, small_block(seed=17)[0].weight)
    lin = JacobianProbe(nn.Linear(3, 2))
    assert lin.in_features == 3 and lin.weight.shape == (2, 3)
    assert "kind=full" in repr(lin)
    with pytest.raises(ValueError, match="already"):
        JacobianProbe(lin)


def test_probe_training_eval_every_and_running_stats():
    block, twin = small_block(), small_block()
    probe = JacobianProbe(block, weight=0.5, every=2, seed=0)
    x = torch.randn(8, 4, dtype=D)
    probe.train()
    twin.train()
    torch.testing.assert_close(probe(x), twin(x))
    # BatchNorm statistics moved exactly once, as without the probe
    torch.testing.assert_close(block[1].running_mean, twin[1].running_mean)
    assert int(block[1].num_batches_tracked) == 1
    assert probe.estimate is not None and probe.estimate.requires_grad
    torch.testing.assert_close(probe.penalty(), 0.5 * probe.estimate)
    probe(x)  # second call: skipped by every=2
    assert probe.estimate is None and value(probe.penalty()) == 0.0
    probe(x)
    assert probe.estimate is not None
    probe.eval()
    assert not block.training and not block[1].training
    torch.testing.assert_close(probe(x), block(x))
    assert probe.estimate is None
    with torch.no_grad():
        probe.train()
        probe(x)
    assert probe.estimate is None


def test_probe_gradient_reaches_the_block_and_matches_finite_differences():
    torch.manual_seed(18)
    block = nn.Sequential(nn.Linear(3, 3), nn.Tanh()).to(D)
    probe = JacobianProbe(block, seed=1, kind="partial")
    x = torch.randn(2, 3, dtype=D)

    def estimate():
        probe(x)
        return probe.estimate

    weight = block[0].weight
    (grad,) = torch.autograd.grad(estimate(), weight)
    assert float(grad.abs().max()) > 0
    eps = 1e-6
    with torch.no_grad():
        for i in range(weight.numel()):
            old = float(weight.view(-1)[i])
            weight.view(-1)[i] = old + eps
            with torch.enable_grad():
                up = value(estimate())
            weight.view(-1)[i] = old - eps
            with torch.enable_grad():
                down = value(estimate())
            weight.view(-1)[i] = old
            assert (up - down) / (2 * eps) == pytest.approx(float(grad.view(-1)[i]), rel=1e-5, abs=1e-7)


def test_probe_copies_and_pickles_after_a_training_step():
    probe = JacobianProbe(small_block(), seed=0)
    probe.train()
    probe(torch.randn(4, 4, dtype=D))
    assert probe.estimate is not None
    for clone in (copy.deepcopy(probe), pickle.loads(pickle.dumps(probe))):
        assert clone.estimate is None
        assert clone._modules is clone.block._modules and clone._parameters is clone.block._parameters
        assert list(clone.state_dict()) == list(probe.state_dict())
        assert clone[0].weight is not probe[0].weight


def test_probe_falls_back_once_and_remembers():
    probe = JacobianProbe(NoJvpNet(), seed=0)
    probe.train()
    x = torch.randn(2, 4, dtype=D)
    probe(x)
    assert probe.route_used == "double_vjp"
    reference = jacobian_isometry(NoJvpNet(), x, route="double_vjp", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(probe.estimate, reference)


# --------------------------------------------------------------------------------------------- the pass


def test_pass_with_a_dict_policy_on_a_small_model():
    torch.manual_seed(19)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Sequential(nn.Linear(6, 6), nn.Tanh()), nn.Linear(6, 2))
    x = torch.randn(5, 6)
    policy = {"rules": [{"match": {"kind": "block", "name": "2"}, "apply": "jacobian_isometry",
                         "with": {"weight": 0.3, "kind": "offdiag", "probes": 2}},
                        {"match": {"type": "Linear", "name": "0"}, "apply": "jacobian_isometry"}]}
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    assert list(gm.state_dict()) == list(model.state_dict())
    assert isinstance(gm.get_submodule("2"), JacobianProbe) and isinstance(gm.get_submodule("0"), JacobianProbe)
    terms = manifest_of(gm).penalties
    assert [type(t) for t in terms] == [JacobianTerm, JacobianTerm] and terms[0].weight == 0.3
    assert value(orthofx.penalty(gm)) == 0.0
    gm.train()
    out = gm(x)
    torch.testing.assert_close(out, model(x))
    total = orthofx.penalty(gm)
    assert value(total) > 0
    total.backward()
    assert gm.get_submodule("2.0").weight.grad is not None and gm.get_submodule("0").weight.grad is not None
    gm.eval()
    gm(x)
    assert value(orthofx.penalty(gm)) == 0.0
    changes = [c for c in manifest_of(gm).changes
               if c.pass_name == "jacobian_isometry"]
    assert {c.site for c in changes} == {"0", "2"} and changes[0].before["input_shape"]


def test_pass_rejects_parameterless_blocks_and_bad_parameters():
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.Tanh()))
    with pytest.raises(orthofx.errors.OrthofxError, match="no parameters"):
        orthofx.transform(model, {"rules": [{"match": {"kind": "block", "name": "1"},
                                             "apply": "jacobian_isometry"}]})
    with pytest.raises(orthofx.errors.OrthofxError, match="kind"):
        orthofx.Policy.from_dict({"rules": [{"match": {"kind": "block", "name": "1"},
                                             "apply": "jacobian_isometry", "with": {"kind": "diag"}}]})
    with pytest.raises(orthofx.errors.OrthofxError, match="every"):
        orthofx.Policy.from_dict({"rules": [{"match": {"kind": "block", "name": "1"},
                                             "apply": "jacobian_isometry", "with": {"every": 0}}]})


def test_preset_on_deep_mlp_keeps_state_dict_and_trains():
    model = models.get("deep_mlp", depth=3, width=8)
    x = models.example_input("deep_mlp", batch=4)
    gm = orthofx.transform(model, "jacobian", example_inputs=(x,))
    assert isinstance(gm.layers, JacobianProbe) and gm.layers.per_sample and gm.layers.normalize
    assert list(gm.state_dict()) == list(model.state_dict())
    gm.load_state_dict(model.state_dict())
    model.load_state_dict(gm.state_dict())
    gm.train()
    loss = gm(x).logsumexp(1).mean() + orthofx.penalty(gm)
    loss.backward()
    assert gm.layers[0].weight.grad is not None
    x64 = x.to(D)
    gm64 = copy.deepcopy(gm).to(D)
    exact = exact_per_sample(copy.deepcopy(model).to(D).layers, x64, "full") / 64
    values = torch.stack([jacobian_isometry(gm64.layers.block, x64, per_sample=True, normalize=True,
                                            create_graph=False) for _ in range(200)])
    assert_unbiased(values, exact)


def test_preset_on_resnet18_wraps_the_four_stages():
    model = models.get("resnet18", width=2)
    x = models.example_input("resnet18", batch=2)
    plan = orthofx.explain(model, "jacobian", example_inputs=(x,))
    assert [e.site.name for e in plan.entries] == ["layer1", "layer2", "layer3", "layer4"]
    gm = orthofx.transform(model, "jacobian", example_inputs=(x,))
    assert list(gm.state_dict()) == list(model.state_dict())
    assert [n for n, _ in gm.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert all(isinstance(gm.get_submodule(f"layer{i}"), JacobianProbe) for i in range(1, 5))
    assert orthofx.explain(models.get("small_cnn"), "jacobian").entries == []  # optional rule, no Sequential


def test_preset_round_trips_and_freeze_removes_the_probes():
    policy = orthofx.Policy.preset("jacobian")
    (rule,) = policy.rules
    assert rule.apply == "jacobian_isometry" and rule.optional and rule.match.kind == "block"
    assert orthofx.Policy.from_yaml(policy.to_yaml()) == policy
    export = pytest.importorskip("orthofx.export")
    model = models.get("deep_mlp", depth=2, width=8)
    x = models.example_input("deep_mlp", batch=3)
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    frozen = export.freeze(gm)
    assert type(frozen.layers) is nn.Sequential
    assert not any(isinstance(m, JacobianProbe) for m in frozen.modules())
    assert list(frozen.state_dict()) == list(model.state_dict())
    torch.testing.assert_close(frozen(x), model.eval()(x))
    assert isinstance(gm.layers, JacobianProbe)  # the transformed model is left as it was


def test_a_block_opening_with_an_in_place_op_is_measured_at_its_input():
    torch.manual_seed(0)
    block = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(3, 3)).to(D)
    out_of_place = nn.Sequential(nn.ReLU(), block[1])
    x = torch.randn(16, 3, dtype=D)
    reference = jacobian_isometry(out_of_place, x, probes=8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(jacobian_isometry(block, x, probes=8, generator=torch.Generator().manual_seed(1)),
                               reference)
    probe = JacobianProbe(block, probes=8, seed=1).train()
    y = probe(x.clone())  # the block overwrites its input in place; the estimate must see the original
    torch.testing.assert_close(probe.estimate, reference)
    torch.testing.assert_close(y, out_of_place(x))


@pytest.mark.parametrize("kind, exact", [("full", 9.0), ("partial", 36.0), ("offdiag", 0.0)])
def test_per_sample_with_scalar_samples(kind, exact):
    # J = 2 per sample: ||J^T J - I||^2 = 9, ||J J^T J - J||^2 = 36, no off-diagonal entries
    x = torch.randn(5, dtype=D)
    assert value(jacobian_isometry(lambda t: 2 * t, x, kind=kind, per_sample=True)) == pytest.approx(exact)


# ---------------------------------------------------------------------------------- audit fixes

class _Whitening(nn.Module):
    """x (B, n) -> x Q^T, Q the eigenvectors of the batch's covariance plus a learned shift: a decomposition in
    the block, as a decorrelated normalisation has."""

    def __init__(self, n: int, decompose):
        super().__init__()
        self.lin = nn.Linear(n, n).double()
        self.decompose = decompose

    def forward(self, x):
        h = self.lin(x)
        cov = h.T @ h / h.shape[0] + torch.eye(h.shape[1], dtype=h.dtype)
        _, vectors = self.decompose(cov)
        return h @ vectors


@pytest.mark.parametrize("decompose", ["eigh_stable", "linalg_eigh"])
def test_forward_mode_gaps_fall_back_to_the_double_vjp_route(decompose):
    # torch.func.jvp gave a zero tangent through orthofx's custom eigh (a biased estimate) and a NaN gradient
    # through torch.linalg.eigh; the auto route now takes the double-VJP route for both
    from orthofx.nn.decompositions import eigh_stable
    torch.manual_seed(0)
    block = _Whitening(4, eigh_stable if decompose == "eigh_stable" else torch.linalg.eigh)
    x = torch.randn(6, 4, dtype=torch.float64)
    auto, route = metrics._jacobian_isometry(block, x, probes=3, generator=torch.Generator().manual_seed(1))
    reference = jacobian_isometry(block, x, probes=3, generator=torch.Generator().manual_seed(1), route="double_vjp")
    assert route == "double_vjp"
    torch.testing.assert_close(auto, reference)
    (grad,) = torch.autograd.grad(auto, block.lin.weight)
    assert torch.isfinite(grad).all()
    with pytest.raises(NotImplementedError, match="forward-mode"):
        jacobian_isometry(block, x, route="jvp")


def test_a_block_called_twice_is_estimated_at_both_calls_on_the_scheduled_steps():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())

        def forward(self, x):
            return self.block(self.block(x))

    torch.manual_seed(0)
    policy = {"rules": [{"match": {"kind": "block", "name": "block"}, "apply": "jacobian_isometry",
                         "with": {"every": 2, "weight": 1.0}}]}
    gm = orthofx.transform(Twice(), policy).train()
    probe = gm.get_submodule("block")
    assert probe.calls_per_step == 2
    x = torch.randn(8, 4)
    penalties = []
    for _ in range(4):
        gm(x)
        penalties.append(float(orthofx.penalty(gm).detach()))
    assert penalties[0] > 0 and penalties[2] > 0 and penalties[1] == penalties[3] == 0.0
    # the term is the sum of the two calls' estimates (each at its own input), checked with fixed probes
    probe.seed, probe.calls = 3, 0
    gm(x)
    inner = probe.block(x).detach()
    expected = sum(jacobian_isometry(probe.block, t, generator=torch.Generator().manual_seed(3)) for t in (x, inner))
    torch.testing.assert_close(probe.estimate, expected)


def test_the_probe_under_activation_checkpointing_matches_the_plain_step():
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(1)
        probe = JacobianProbe(nn.Sequential(nn.Linear(4, 4), nn.Tanh()), seed=5, every=3)
        y = checkpoint(probe, x, use_reentrant=False) if checkpointed else probe(x)
        (y.sum() + probe.penalty()).backward()
        assert probe.calls == 1  # the recomputation in backward is not a call (phase 1 of 3 next)
        grads.append(probe.block[0].weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])


def test_data_parallel_replication_of_a_probe_is_refused(monkeypatch):
    """nn.DataParallel over several devices replicates the model at each forward (torch.nn.parallel.replicate); a
    probe's replica would run the original block and lose its estimate, so replication raises with the fix. The
    device copies are made here by cloning (the real broadcast needs CUDA); the rest is torch's replicate."""
    import importlib

    # the module (torch.nn.parallel's attribute of that name is the function)
    replicate_module = importlib.import_module("torch.nn.parallel.replicate")

    def cloned(tensors, devices, detach=False):
        return [[t.detach().clone() if detach else t.clone() for t in tensors] for _ in devices]

    monkeypatch.setattr(replicate_module, "_broadcast_coalesced_reshape", cloned)
    plain = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    copies = replicate_module.replicate(plain, [0, 1])  # the patched path works for plain modules
    torch.testing.assert_close(copies[1](torch.ones(2, 4)), plain(torch.ones(2, 4)))
    model = nn.Sequential(JacobianProbe(nn.Sequential(nn.Linear(4, 4), nn.Tanh())), nn.Linear(4, 2))
    with pytest.raises(orthofx.LayerArgumentError, match="DistributedDataParallel"):
        replicate_module.replicate(model, [0, 1])


def test_the_penalty_reaches_only_the_blocks_own_parameters():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, gate):
            return torch.tanh(self.lin(x)) * gate

    torch.manual_seed(0)
    upstream = nn.Linear(4, 4)
    probe = JacobianProbe(Gated())
    x = torch.randn(8, 4)
    probe(x, upstream(x))
    probe.penalty().backward()
    assert upstream.weight.grad is None and probe.lin.weight.grad is not None


def test_blocks_without_a_jacobian_are_skipped_or_named():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("embed", nn.Sequential(nn.Embedding(10, 4)))
    model.add_module("body", nn.Sequential(nn.Linear(4, 4), nn.Tanh()))
    tokens = torch.randint(0, 10, (3, 5))
    gm = orthofx.transform(model, "jacobian", example_inputs=(tokens,))
    statuses = {c.site: c.status for c in manifest_of(gm).changes}
    assert "not a floating-point tensor" in statuses["embed"] and isinstance(gm.body, JacobianProbe)
    gm.train()(tokens)
    assert float(orthofx.penalty(gm).detach()) > 0
    # without example inputs the pass cannot know: the first training step names the block
    gm = orthofx.transform(model, "jacobian").train()
    with pytest.raises(orthofx.LayerArgumentError, match="JacobianProbe at 'embed'.*floating-point"):
        gm(tokens)
    with pytest.raises(orthofx.LayerArgumentError, match="finite"):
        JacobianProbe(nn.Linear(2, 2), weight=math.inf)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_term_without_an_estimate_is_a_zero_in_the_blocks_dtype(dtype):
    # before any training forward the term was a float32 zero whatever the model's dtype
    gm = orthofx.transform(orthofx.models.get("deep_mlp", depth=4).to(dtype), "jacobian")
    terms = orthofx.penalty_terms(gm)
    assert terms and all(t.dtype == dtype and float(t) == 0.0 for t in terms.values())
    assert orthofx.penalty(gm).dtype == dtype
