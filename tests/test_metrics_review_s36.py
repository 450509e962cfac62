"""Session 36 review of orthofx.metrics and orthofx.theory against independent float64 references.

References (tests/references.py): ``wrapped_operator64``, the dense matrix of the circular strided / dilated /
grouped convolution on any grid (torch's 'valid' convolution of periodically tiled basis inputs),
``lorth64`` (P0's L_orth from the dense operator, Theorem 7), ``jacobian_quantities64`` (the estimator's targets
from a dense Jacobian) and P0's definitions written out here.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch

from orthofx.errors import ArgumentError, ImpossibleLayerError
from orthofx.metrics import (
    _frequency_matrices,
    conv_singular_values,
    dilated_kernel,
    jacobian_isometry,
    lorth,
    spectral_norm_bound,
)
from orthofx.nn import OrthogonalConv1d, OrthogonalConv2d, OrthogonalConv3d
from orthofx.theory import orthogonal_conv_exists, theorem8_constants
from references import jacobian_quantities64, lorth64, wrapped_operator64


def _dense_lorth(weight, stride, groups, dilation=1):
    """P0 Theorem 7 on the dense operator ``A`` on a grid with ``S N >= 2 k_eff - 1``: ``{"RO": ||A A^T - I||^2 / N^d,
    "CO": ||A^T A - I||^2 / N^d}`` (either case, forced or not)."""
    d = weight.dim() - 2
    ss = (stride,) * d if isinstance(stride, int) else tuple(stride)
    ds = (dilation,) * d if isinstance(dilation, int) else tuple(dilation)
    span = [D * (k - 1) + 1 for k, D in zip(weight.shape[2:], ds)]
    grid = tuple(s * -(-(2 * k - 1) // s) for k, s in zip(span, ss))
    A = wrapped_operator64(weight, grid, ss, groups, ds)
    positions = A.shape[0] // weight.shape[0]
    return {case: float((G - torch.eye(G.shape[0], dtype=torch.float64)).square().sum()) / positions
            for case, G in (("RO", A @ A.T), ("CO", A.T @ A))}


# ------------------------------------------------------------------------------------------- regressions


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,stride,groups", [((3, 2, 3, 3), 1, 1), ((4, 2, 3), 1, 2), ((8, 2, 3, 3), 1, 1),
                                                 ((3, 2, 3, 3), 2, 1)])
def test_lorth_under_vmap_matches_the_dense_reference(dtype, shape, stride, groups):
    """torch.vmap(lorth) of a multi-tap kernel at stride 1 without a derivative raised torch's "Cannot access data
    pointer of Tensor that doesn't have storage": the trim of all-zero border taps read the batched weight on the
    host. vmap(grad(lorth)) is the batched gradient."""
    gen = torch.Generator().manual_seed(0)
    ws = torch.randn(3, *shape, generator=gen, dtype=dtype) / 2
    ws[1, ..., 0] = 0  # a zero border tap (what the trim drops)
    values = torch.vmap(lambda w: lorth(w, stride, groups))(ws)
    assert values.dtype == dtype
    for value, w in zip(values, ws):
        ref = lorth64(w, stride, groups)
        assert float(value) == pytest.approx(ref, rel=1e-4 if dtype == torch.float32 else 1e-10)
    grads = torch.vmap(torch.func.grad(lambda w: lorth(w, stride, groups)))(ws)
    for grad, w in zip(grads, ws):
        leaf = w.clone().requires_grad_(True)
        (ref,) = torch.autograd.grad(lorth(leaf, stride, groups, fast_backward=False), leaf)
        torch.testing.assert_close(grad, ref)


def test_strides_far_past_the_kernel_cost_nothing_and_keep_their_values():
    """A stride past the kernel only adds residues no tap reads, all-zero columns of the space-to-depth kernel. They
    were formed: lorth of a float64 3 x 3 kernel at stride 10^6 (the value-only Fourier route) tried to allocate
    terabytes, conv_singular_values / spectral_norm_bound of a 1 x 1 conv at stride 512 formed an 8 x 2^21 matrix
    (0.9 s). References: P0's Definition 1 written out (with S_i >= k_i, P = 0 and conv(K, K, 0, S) is the one shift
    0, the Gram matrix of the flattened filters), and the dense operator."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64)
    flat = w.reshape(3, -1)
    defect = float((flat @ flat.T - torch.eye(3, dtype=torch.float64)).square().sum())
    S = 10 ** 6
    assert float(lorth(w, S)) == pytest.approx(defect, rel=1e-12)  # RO: 3 <= 2 S^2
    assert float(lorth(w, S, case="CO")) == pytest.approx(defect - (3 - 2 * S * S), rel=1e-12)
    assert float(lorth(w.float(), S)) == pytest.approx(defect, rel=1e-5)
    # the frequency matrices hold the read residues only: C * prod(min(k, S)) columns
    mats = [m for m, _ in _frequency_matrices(w, (3000, 6), (3000, 2), 1, torch.float64)]
    assert all(m.shape[-1] == 2 * 3 * 2 for m in mats)
    # values against the dense operator: a tall per-frequency matrix (M = 6 > C k = 2) has its zero singular values
    # back, and a group holding a NaN gets NaN for all of its values, the added ones too
    for weight, grid, stride, groups in [(torch.randn(6, 1, 2, generator=gen, dtype=torch.float64), (10,), (5,), 1),
                                         (torch.randn(4, 2, 1, 3, generator=gen, dtype=torch.float64), (6, 6), (3, 2),
                                          2),
                                         (torch.randn(2, 1, 2, 1, 2, generator=gen, dtype=torch.float64), (3, 2, 4),
                                          (3, 1, 4), 1)]:
        ref = torch.linalg.svdvals(wrapped_operator64(weight, grid, stride, groups))
        torch.testing.assert_close(conv_singular_values(weight, grid, stride, groups), ref, rtol=0, atol=1e-10)
        bound = spectral_norm_bound(weight, grid, stride, iterations=12, groups=groups)
        assert float(ref[0]) * (1 - 1e-12) <= bound <= float(ref[0]) * 1.001
    w1 = torch.randn(8, 8, 1, 1, generator=gen, dtype=torch.float64)
    sv = conv_singular_values(w1, 512, 512)
    assert sv.shape == (8,)
    torch.testing.assert_close(sv, torch.linalg.svdvals(w1.reshape(8, 8)))
    bad = torch.randn(4, 1, 2, generator=gen, dtype=torch.float64)
    bad[0, 0, 0] = float("nan")  # group 0 of 2: channels 0, 1
    sv = conv_singular_values(bad, 8, 4, groups=2)  # per group min(2, 1 * 4) = 2 values per frequency, 1 read
    assert sv.shape == (2 * 2 * 2,) and int(sv.isnan().sum()) == 4
    finite = sv[~sv.isnan()]
    torch.testing.assert_close(finite, torch.linalg.svdvals(wrapped_operator64(bad[2:], 8, 4)), rtol=0, atol=1e-12)


def test_theorem8_constants_beyond_float_range():
    """``float(int)`` of a constant past float's range raised OverflowError (``1.0 / 10**400`` too); the constants
    are the correctly rounded floats of P0's exact fractions: 0.0 and inf at the ends of the range."""
    def exact(c_in, c_out, k, s):
        M, C = c_out, c_in
        lower = float(Fraction(1, min(M, C * s * s)))
        upper = (2 * ((k - 1) // s) + 1) ** 2 * M if M <= C * s * s else (2 * k - 1) ** 2 * C
        return lower, (float(upper) if upper < 2 ** 1024 - 2 ** 970 else math.inf)

    for args in [(10 ** 200, 10 ** 200, 10 ** 200, 1), (10 ** 400, 10 ** 400, 1, 1), (3, 10 ** 400, 10 ** 200, 2),
                 (2 ** 1023, 2 ** 1023, 1, 1), (4, 8, 3, 1), (8, 4, 3, 2)]:
        c_in, c_out, k, s = args
        assert theorem8_constants(c_in, c_out, k, stride=s) == exact(*args)


# ------------------------------------------------------------------------------------------- singular values


def _conv_configs(seed, count):
    rng = random.Random(seed)
    for _ in range(count):
        d = rng.choice([1, 1, 2, 2, 3])
        g = rng.choice([1, 1, 2, 3])
        small = d == 3
        Mg, Cg = rng.randint(1, 2 if small else 3), rng.randint(1, 2 if small else 3)
        ks = tuple(rng.randint(1, 3 if small else 4) for _ in range(d))  # even kernels too
        ss = tuple(rng.randint(1, 2 if small else 4) for _ in range(d))  # strides past the kernel too
        grid = tuple(s * rng.randint(1, 2 if small else 3) for s in ss)  # grids below the kernel span too
        yield d, g, Mg, Cg, ks, ss, grid, rng.random()


@pytest.mark.parametrize("seed", range(3))
def test_conv_singular_values_equal_the_dense_operator(seed):
    gen = torch.Generator().manual_seed(seed)
    for d, g, Mg, Cg, ks, ss, grid, u in _conv_configs(seed, 18):
        w = torch.randn(Mg * g, Cg, *ks, generator=gen, dtype=torch.float64)
        if d == 2 and u < 0.3:
            w = w.to(memory_format=torch.channels_last)
        elif u > 0.8:
            w = w.transpose(0, 1).contiguous().transpose(0, 1)  # a non-contiguous layout, the same values
        ref = torch.linalg.svdvals(wrapped_operator64(w, grid, ss, g))
        sv = conv_singular_values(w, grid, ss, g)
        assert sv.shape == ref.shape and sv.dtype == torch.float64
        torch.testing.assert_close(sv, ref, rtol=0, atol=1e-10 * max(1.0, float(ref[0])))
        low = w.to(torch.bfloat16 if u < 0.5 else torch.float16)  # the rounded weight's own values, in float64
        torch.testing.assert_close(conv_singular_values(low, grid, ss, g),
                                   torch.linalg.svdvals(wrapped_operator64(low.double(), grid, ss, g)),
                                   rtol=0, atol=1e-10 * max(1.0, float(ref[0])))
        f32 = conv_singular_values(w.float(), grid, ss, g, dtype=torch.float32)
        assert f32.dtype == torch.float32
        torch.testing.assert_close(f32.double(), ref, rtol=0, atol=1e-5 * max(1.0, float(ref[0])))


def test_dilated_kernels_and_requires_grad_weights():
    gen = torch.Generator().manual_seed(3)
    for ks, ss, ds, grid, g in [((3,), (2,), (2,), (6,), 1), ((2, 3), (1, 2), (3, 2), (4, 4), 2),
                                ((2, 2, 2), (2, 1, 1), (2, 2, 1), (4, 3, 2), 1)]:
        w = torch.randn(2 * g, 2, *ks, generator=gen, dtype=torch.float64, requires_grad=True)
        sv = conv_singular_values(dilated_kernel(w, ds), grid, ss, g)
        assert not sv.requires_grad
        torch.testing.assert_close(sv, torch.linalg.svdvals(wrapped_operator64(w, grid, ss, g, ds)), rtol=0,
                                   atol=1e-10)


def test_meta_weights_and_unreadable_inputs_raise_orthofx_errors():
    meta = torch.empty(3, 2, 3, 3, device="meta")
    with pytest.raises(ArgumentError, match="meta device"):
        conv_singular_values(meta, 6)
    assert lorth(meta).is_meta  # documented: a meta value, no error
    with pytest.raises(ArgumentError, match="divisible by the stride"):
        conv_singular_values(torch.randn(2, 2, 3), 7, 2)
    with pytest.raises(ArgumentError, match="2-D weight is a Linear"):
        conv_singular_values(torch.randn(2, 2), 4)
    with pytest.raises(ArgumentError, match="real floating-point"):
        lorth(torch.ones(2, 2, 3, dtype=torch.int64))


# ------------------------------------------------------------------------------------------- L_orth


@pytest.mark.parametrize("seed", range(2))
def test_lorth_every_route_and_forced_case_equal_the_dense_operator(seed):
    """float64 without a derivative (Theorem 7's Fourier route), float64 differentiated (the convolution, the tall
    route), float32, exact backward; dilation, groups, strides past the kernel; both cases forced; channels_last and
    non-contiguous weights."""
    rng = random.Random(10 + seed)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(12):
        d, g = rng.choice([1, 2]), rng.choice([1, 2])
        Mg, Cg = rng.randint(1, 5), rng.randint(1, 3)
        ks = tuple(rng.randint(1, 3) for _ in range(d))
        ss = tuple(rng.randint(1, 3) for _ in range(d))
        ds = tuple(rng.randint(1, 3) for _ in range(d))
        w = torch.randn(Mg * g, Cg, *ks, generator=gen, dtype=torch.float64) / 2
        if d == 2 and rng.random() < 0.5:
            w = w.to(memory_format=torch.channels_last)  # (and its float32 copy)
        elif rng.random() < 0.3:
            w = w.transpose(0, 1).contiguous().transpose(0, 1)
        natural = "RO" if Mg <= Cg * math.prod(ss) else "CO"
        refs = _dense_lorth(w, ss, g, ds)
        for case in (None, "RO", "CO"):
            ref = refs[case or natural]
            for variant in ("value64", "grad64", "exact64", "float32"):
                x = w.float() if variant == "float32" else w.clone().requires_grad_(variant != "value64")
                value = lorth(x, ss, g, case, dilation=ds, fast_backward=variant != "exact64")
                tol = 2e-4 if variant == "float32" else 1e-9
                assert float(value.detach()) == pytest.approx(ref, rel=tol, abs=tol), (ks, ss, ds, g, case, variant)


@pytest.mark.parametrize("shape,stride,groups,dilation", [((4, 3, 3), 2, 1, 1), ((6, 2, 3, 2), (2, 1), 2, 1),
                                                          ((4, 4, 2, 2, 2), 1, 2, 1), ((2, 3, 3, 3), 3, 1, 1),
                                                          ((4, 2, 3, 3), (2, 2), 1, (3, 2)), ((5, 3), 1, 1, 1)])
def test_lorth_gradient_equals_central_differences_of_the_dense_reference(shape, stride, groups, dilation):
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(*shape, generator=gen, dtype=torch.float64) / 2
    d = w.dim() - 2
    ss = (stride,) * d if isinstance(stride, int) else stride
    ds = (dilation,) * d if isinstance(dilation, int) else dilation

    def reference(x):
        if x.dim() == 2:
            return lorth64(x)
        return _dense_lorth(x, ss, groups, ds)["RO" if x.shape[0] // groups <= x.shape[1] * math.prod(ss) else "CO"]

    for fast in (True, False):
        leaf = w.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(lorth(leaf, stride, groups, dilation=dilation, fast_backward=fast), leaf)
        for i in torch.randint(0, w.numel(), (4,), generator=gen).tolist():
            eps = 1e-5
            up, down = w.clone().reshape(-1), w.clone().reshape(-1)
            up[i] += eps
            down[i] -= eps
            fd = (reference(up.reshape(shape)) - reference(down.reshape(shape))) / (2 * eps)
            assert float(grad.reshape(-1)[i]) == pytest.approx(fd, rel=1e-6, abs=1e-6)


# ------------------------------------------------------------------------------------------- theory


def test_existence_agrees_with_what_the_orthogonal_layers_build():
    """Theorem 4 (with strides, dilation, groups; 1-D, 2-D, 3-D) says yes: the layer builds and its forward map is
    orthogonal (every singular value of its dense float64 Jacobian is 1, on grids of one and two strides, below the
    kernel's span too); says no: the layer refuses with an ImpossibleLayerError quoting the same reason."""
    rng = random.Random(5)
    built = refused = 0
    for trial in range(40):
        cls, d = rng.choice([(OrthogonalConv2d, 2), (OrthogonalConv1d, 1), (OrthogonalConv3d, 3)])
        g = rng.choice([1, 2])
        Cg, Mg = rng.randint(1, 3 if d < 3 else 2), rng.randint(1, 4 if d < 3 else 3)
        ks = tuple(rng.randint(1, 4 if d < 3 else 3) for _ in range(d))
        ss = tuple(rng.randint(1, 3 if d < 3 else 2) for _ in range(d))
        ds = tuple(rng.choice([1, 1, 2, 3]) for _ in range(d))
        exists, case, reason = orthogonal_conv_exists(Cg * g, Mg * g, ks, ss, dims=d, groups=g, dilation=ds)
        torch.manual_seed(trial)
        if not exists:
            with pytest.raises(ImpossibleLayerError) as info:
                cls(Cg * g, Mg * g, ks, ss, dilation=ds, groups=g)
            assert reason in str(info.value)
            refused += 1
            continue
        layer = cls(Cg * g, Mg * g, ks, ss, dilation=ds, groups=g, bias=False, dtype=torch.float64)
        built += 1
        for mult in (1, 2):
            x = torch.randn(Cg * g, *(s * mult for s in ss), dtype=torch.float64)
            jac = torch.autograd.functional.jacobian(lambda t: layer(t[None])[0], x).reshape(-1, x.numel())
            assert (jac.shape[0] <= jac.shape[1]) == (case == "RO")
            sv = torch.linalg.svdvals(jac)
            assert float((sv - 1).abs().max()) < 1e-9, (cls.__name__, Cg, Mg, ks, ss, ds, g, mult)
    assert built >= 10 and refused >= 3


_BAD = [0, -1, True, False, 1.0, 2.5, "2", None, [], (), (0, 1), (2, 2, 2, 2), float("nan"), torch.tensor(2.0),
        np.array([2, 2]), torch.tensor([2, 2]), b"2", {}, (True, 1), (1.0, 1)]


@pytest.mark.parametrize("name", ["c_in", "c_out", "kernel_size", "stride", "dims", "groups", "dilation"])
def test_orthogonal_conv_exists_refuses_every_bad_argument(name):
    base = dict(c_in=4, c_out=4, kernel_size=3, stride=1, dims=2, groups=1, dilation=1)
    for value in _BAD:
        with pytest.raises(ArgumentError):
            orthogonal_conv_exists(**{**base, name: value})
    # integer types torch.nn accepts give the int's answer
    for value in (np.int64(2), torch.tensor(2)):
        assert orthogonal_conv_exists(**{**base, name: value}) == orthogonal_conv_exists(**{**base, name: 2})
    for padding in ("CIRCULAR", "same", 0, None, ["circular"], np.array(["circular"])):
        with pytest.raises(ArgumentError):
            orthogonal_conv_exists(4, 4, 3, padding=padding)


# ------------------------------------------------------------------------------------------- Jacobian estimates


def _z_score(fn, x, kind, per_sample, reference, repeats=20, probes=32, seed=0, **kwargs):
    """How many standard errors the mean of ``repeats`` estimates lies from ``reference`` (fixed seed)."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.stack([jacobian_isometry(fn, x, probes=probes, kind=kind, per_sample=per_sample, generator=gen,
                                            **kwargs).detach() for _ in range(repeats)])
    return (float(values.mean()) - reference) / (float(values.std()) / math.sqrt(repeats) + 1e-300)


def _mlp(seed):
    gen = torch.Generator().manual_seed(seed)
    W1 = torch.randn(4, 5, generator=gen, dtype=torch.float64) / 2
    W2 = torch.randn(5, 3, generator=gen, dtype=torch.float64) / 2
    return lambda x: torch.tanh(x @ W1) @ W2


@pytest.mark.parametrize("kind", ["full", "partial", "offdiag"])
def test_jacobian_isometry_is_unbiased_against_the_exact_jacobian(kind):
    """Independent samples (a tanh MLP), batch 3 and batch 1, whole-batch and per-sample, both routes; means of
    fixed-seed estimates within 4.5 standard errors of the exact quantity."""
    f = _mlp(0)
    for batch in (3, 1):
        x = torch.randn(batch, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(batch))
        jac = torch.autograd.functional.jacobian(f, x).reshape(batch * 3, batch * 4)
        for per_sample in (False, True):
            reference = jacobian_quantities64(jac, batch if per_sample else None)[kind]
            for route in ("auto", "double_vjp"):
                z = _z_score(f, x, kind, per_sample, reference, route=route, create_graph=False)
                assert abs(z) < 4.5, (batch, per_sample, route, z)


@pytest.mark.parametrize("kind", ["full", "partial", "offdiag"])
def test_jacobian_isometry_with_batchnorm_in_training_mode_is_the_coupled_quantity(kind):
    """Documented: with batch statistics J is the Jacobian of the whole batch map (cross-sample blocks included),
    per_sample the mean of its per-sample shares; the module's buffers do not move."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5), torch.nn.Tanh(),
                              torch.nn.Linear(5, 3)).double().train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(4, 4, dtype=torch.float64)

    def written_out(t):  # training-mode BatchNorm1d, from its definition
        h = t @ net[0].weight.T + net[0].bias
        h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + net[1].eps) * net[1].weight + net[1].bias
        return torch.tanh(h) @ net[3].weight.T + net[3].bias

    jac = torch.autograd.functional.jacobian(written_out, x).reshape(12, 16)
    for per_sample in (False, True):
        reference = jacobian_quantities64(jac, 4 if per_sample else None)[kind]
        for create_graph in (True, False):
            z = _z_score(net, x, kind, per_sample, reference, repeats=10,
                        create_graph=create_graph)
            assert abs(z) < 4.5, (per_sample, create_graph, z)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    with pytest.raises(ArgumentError, match="one value per channel"):
        jacobian_isometry(net, x[:1])


def test_jacobian_isometry_outputs_and_inputs():
    x = torch.randn(2, 3, dtype=torch.float64)
    for fn in (lambda t: {"y": t}, lambda t: (t, t), lambda t: [t], lambda t: None, lambda t: t.long()):
        with pytest.raises(ArgumentError):
            jacobian_isometry(fn, x)
    # an input requiring grad: the estimate's gradient reaches fn's parameters, never x's producer
    lin = torch.nn.Linear(3, 3).double()
    source = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    jacobian_isometry(lin, source * 2).backward()
    assert source.grad is None and lin.weight.grad is not None
    # a 0-d map x -> 3 x: every probe v = +-1 gives (J^T J v - v)^2 = (9 - 1)^2 exactly
    assert float(jacobian_isometry(lambda t: 3 * t, torch.tensor(2.0, dtype=torch.float64))) == 64.0


@pytest.mark.parametrize("norm", ["group", "rms"])
def test_jacobian_isometry_gradient_through_uncomposed_normalisations(norm):
    """GroupNorm and RMSNorm are not among the normalisations the estimate recomposes (torch's layer / batch /
    instance norms had wrong second derivatives through forward mode): the estimate's gradient with respect to a
    parameter still equals central differences of the fixed-seed estimate."""
    torch.manual_seed(1)
    layer = torch.nn.GroupNorm(2, 4) if norm == "group" else torch.nn.RMSNorm(4)
    block = torch.nn.Sequential(torch.nn.Linear(4, 4), layer, torch.nn.Tanh()).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    p = block[0].weight
    for kind in ("full", "partial", "offdiag"):
        def estimate():
            return jacobian_isometry(block, x, probes=2, kind=kind, generator=torch.Generator().manual_seed(5))

        (grad,) = torch.autograd.grad(estimate(), p)
        for i in (0, 5, 11):
            eps = 1e-6
            with torch.no_grad():
                old = float(p.view(-1)[i])
                p.view(-1)[i] = old + eps
                up = float(estimate())
                p.view(-1)[i] = old - eps
                down = float(estimate())
                p.view(-1)[i] = old
            assert float(grad.reshape(-1)[i]) == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-7)
