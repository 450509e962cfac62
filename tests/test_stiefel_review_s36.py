"""Adversarial review of orthofx.nn.stiefel, orthofx.nn.isometric and OrthogonalLinear (session 36).

References are independent of orthofx: float64 ``torch.linalg`` (SVD for the polar factor, Householder QR with a
positive ``R`` diagonal for the QR retraction), central finite differences of those references, and
``torch.autograd.functional.jacobian`` in float64 for the blocks. Fixed here (each test marked "fix" fails on the
code before this session):

* the polar factor's gradient was NaN or wrong where singular values repeat (a scaled orthonormal matrix in
  eager mode through eigh's backward; any orthonormal point under ``vmap(grad)`` through the SVD's backward);
* ``project_to_stiefel`` / ``polar_retraction`` failed under ``torch.compile(fullgraph=True)``;
* ``qr_retraction`` ran under ``torch.no_grad()``: no gradient (``torch.func.grad`` silently returned zeros);
* ``qr_retraction`` turned NaN / inf into NaN columns where ``polar_retraction`` raised;
* half-precision retractions rounded ``W + xi`` before retracting, and ``polar_retraction`` returned the promoted
  dtype of mixed inputs where ``qr_retraction`` and ``tangent_projection`` return ``w``'s;
* ``random_orthonormal`` accepted an integer dtype (entries truncated to 0 and +-1) and raised raw torch errors.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch.func import functional_call, grad, jacfwd, jacrev, vmap

import orthofx
from orthofx.errors import LayerArgumentError
from orthofx.nn import OrthogonalLinear, stiefel
from orthofx.nn.isometric import OrthogonalActivationBlock, ReflectionResidualBlock
from tests.references import polar64

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, dtype=F64) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=F64).to(dtype)


def _orthonormal64(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A Haar-ish orthonormal matrix from numpy-free float64 Householder QR (columns if m >= n, else rows)."""
    q, r = torch.linalg.qr(_randn(max(m, n), min(m, n), seed=seed))
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(-2)
    return q if m >= n else q.T


def _qf64(a: torch.Tensor) -> torch.Tensor:
    """``qf(a)`` in float64: Householder QR of the tall orientation with ``R``'s diagonal made positive."""
    a = a.to(F64)
    wide = a.shape[-2] < a.shape[-1]
    tall = a.mT if wide else a
    q, r = torch.linalg.qr(tall)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    return q.mT if wide else q


def _fd_gradient(fn, a: torch.Tensor, weights: torch.Tensor, eps: float) -> torch.Tensor:
    """Central differences of ``sum(fn(a) * weights)`` with respect to every entry of ``a`` (float64)."""
    out = torch.zeros(a.shape, dtype=F64)
    for i in range(a.numel()):
        step = torch.zeros(a.numel(), dtype=F64)
        step[i] = eps
        step = step.view(a.shape)
        out.view(-1)[i] = float(((fn(a + step) - fn(a - step)) * weights).sum()) / (2 * eps)
    return out


# ------------------------------------------------------------------------ polar factor: exact derivative (fix)

_W = _orthonormal64(6, 3, seed=1)
_POLAR_POINTS = {
    # a scaled orthonormal matrix: far from the manifold (Gram route), all singular values 3
    "scaled-orthonormal": (lambda a: stiefel.project_to_stiefel(a), 3 * _W, polar64, 1e-6),
    # kappa 1e5 (SVD route) with a repeated singular value 1
    "ill-conditioned-repeated": (lambda a: stiefel.project_to_stiefel(a),
                                 _W * torch.tensor([1.0, 1.0, 1e-5], dtype=F64), polar64, 1e-9),
    # a retraction's zero step at an orthonormal point (Newton-Schulz eagerly, all singular values 1)
    "retraction-zero-step": (lambda xi: stiefel.polar_retraction(_W, xi), torch.zeros(6, 3, dtype=F64),
                             lambda xi: polar64(_W + xi), 1e-6),
    "wide-orthonormal": (lambda a: stiefel.project_to_stiefel(a), _W.T.clone(), polar64, 1e-6),
}


@pytest.mark.parametrize("mode", ["eager", "vmap-grad"])
@pytest.mark.parametrize("point", list(_POLAR_POINTS))
def test_polar_gradient_is_the_finite_difference_one_where_singular_values_repeat(point, mode):
    # fix: eager gradient NaN at 3 W (eigh backward, equal eigenvalues) and at kappa 1e5 (SVD backward);
    # vmap(grad) NaN or wrong at the orthonormal and scaled orthonormal ones (the SVD's 1 / (s_i^2 - s_j^2))
    fn, a, reference, eps = _POLAR_POINTS[point]
    weights = _randn(*a.shape, seed=7)
    expected = _fd_gradient(reference, a, weights, eps)
    if mode == "eager":
        x = a.clone().requires_grad_()
        (fn(x) * weights).sum().backward()
        got = x.grad
    else:
        got = vmap(grad(lambda x: (fn(x) * weights).sum()))(a.unsqueeze(0))[0]
    assert torch.isfinite(got).all()
    err = float((got - expected).abs().max() / expected.abs().max())
    assert err < 1e-6, err


def test_polar_forward_mode_matches_reverse_mode_and_finite_differences():
    # fix: jacfwd at a point where singular values repeat; forward and reverse use the same exact derivative
    a = 3 * _W
    jf = jacfwd(stiefel.project_to_stiefel)(a)
    jr = jacrev(stiefel.project_to_stiefel)(a)
    torch.testing.assert_close(jf, jr, atol=1e-12, rtol=0)
    direction = _randn(6, 3, seed=3)
    eps = 1e-6
    fd = (polar64(a + eps * direction) - polar64(a - eps * direction)) / (2 * eps)
    torch.testing.assert_close(torch.einsum("ijkl,kl->ij", jf, direction), fd, atol=1e-8, rtol=0)


def test_polar_values_and_gradients_are_unchanged_where_they_were_right():
    # a generic far matrix (Gram route) and a near one (Newton-Schulz), tall and wide, batched: the values are the
    # float64 SVD's, the gradients the finite-difference ones (the routes' values are bit for bit the old ones)
    for seed, shape, scale in [(11, (2, 7, 4), 2.0), (12, (4, 7), 2.0)]:
        a = _randn(*shape, seed=seed) * scale
        torch.testing.assert_close(stiefel.project_to_stiefel(a), polar64(a), atol=1e-12, rtol=0)
    near = _W + 0.05 * _randn(6, 3, seed=13)
    weights = _randn(6, 3, seed=14)
    x = near.clone().requires_grad_()
    (stiefel.project_to_stiefel(x) * weights).sum().backward()
    torch.testing.assert_close(x.grad, _fd_gradient(polar64, near, weights, 1e-6), atol=1e-7, rtol=0)
    # Q(c a) = Q(a): the gradient at c a is the one at a divided by c, for entries of any size
    far = 2 * _randn(6, 3, seed=15)
    expected = _fd_gradient(polar64, far, weights, 1e-6)
    for scale in (1e-200, 1e200):
        x = (far * scale).requires_grad_()
        (stiefel.project_to_stiefel(x) * weights).sum().backward()
        torch.testing.assert_close(x.grad * scale, expected, atol=1e-7, rtol=0)


def test_polar_and_project_compile_with_fullgraph():
    # fix: dynamo "Could not guard on data-dependent expression" (the route's host-side choice)
    torch._dynamo.reset()
    try:
        a = _randn(6, 3, seed=21) * 2
        xi = stiefel.tangent_projection(_W, 0.1 * _randn(6, 3, seed=22))
        project = torch.compile(stiefel.project_to_stiefel, backend="aot_eager", fullgraph=True)
        retract = torch.compile(stiefel.polar_retraction, backend="aot_eager", fullgraph=True)
        qr = torch.compile(stiefel.qr_retraction, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(project(a), polar64(a), atol=1e-12, rtol=0)
        torch.testing.assert_close(retract(_W, xi), polar64(_W + xi), atol=1e-12, rtol=0)
        torch.testing.assert_close(qr(_W, xi), _qf64(_W + xi), atol=1e-12, rtol=0)
        # the compiled gradient at an orthonormal point (repeated singular values: the SVD route's own backward
        # would be NaN) is the eager one
        weights = _randn(6, 3, seed=23)
        x = _W.clone().requires_grad_()
        (project(x) * weights).sum().backward()
        torch.testing.assert_close(x.grad, _fd_gradient(polar64, _W, weights, 1e-6), atol=1e-7, rtol=0)
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------------------------------- QR retraction (fix)

def test_qr_retraction_is_differentiable():
    # fix: decorated with torch.no_grad(): autograd raised "does not require grad", torch.func.grad gave zeros
    w = _orthonormal64(7, 3, seed=31)
    xi0 = stiefel.tangent_projection(w, 0.3 * _randn(7, 3, seed=32))
    weights = _randn(7, 3, seed=33)
    expected = _fd_gradient(lambda xi: _qf64(w + xi), xi0, weights, 1e-6)
    x = xi0.clone().requires_grad_()
    (stiefel.qr_retraction(w, x) * weights).sum().backward()
    torch.testing.assert_close(x.grad, expected, atol=1e-7, rtol=0)
    functional = grad(lambda xi: (stiefel.qr_retraction(w, xi) * weights).sum())(xi0)
    torch.testing.assert_close(functional, expected, atol=1e-7, rtol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("method", ["polar", "qr"])
def test_both_retractions_refuse_a_non_finite_step_alike(method, bad):
    # fix (qr): NaN columns silently, where the polar retraction raised
    w = _orthonormal64(5, 3, seed=41)
    xi = torch.zeros(5, 3, dtype=F64)
    xi[1, 1] = bad
    with pytest.raises(LayerArgumentError, match=r"\(5, 3\) matrix with NaN or inf entries.*learning rate"):
        stiefel.retract(w, xi, method)
    # inside vmap nothing can be read on the host: the QR retraction returns NaN columns there (documented)
    if method == "qr":
        out = vmap(stiefel.qr_retraction)(w.unsqueeze(0), xi.unsqueeze(0))
        assert torch.isnan(out).any()


def test_riemannian_rollback_still_sees_the_qr_refusal():
    # orthofx.passes.riemannian._finite_retraction catches the error and puts the failed weight back
    from orthofx.passes.riemannian import _finite_retraction
    w = torch.stack([_orthonormal64(5, 3, seed=s) for s in (42, 43)])
    xi = 0.1 * torch.stack([_randn(5, 3, seed=s) for s in (44, 45)])
    xi = stiefel.tangent_projection(w, xi)
    xi[1, 0, 0] = float("nan")
    new, failed, _ = _finite_retraction(w, xi, "qr", torch.ones(2, dtype=torch.bool))
    assert failed == [1]
    torch.testing.assert_close(new[0], _qf64(w[0] + xi[0]), atol=1e-13, rtol=0)
    assert torch.equal(new[1], w[1])


# ---------------------------------------------------------------------------- dtypes of the retractions (fix)

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["polar", "qr"])
def test_half_precision_retraction_rounds_once(method, dtype):
    # fix: W + xi was summed (rounded) in half precision before the retraction; now every entry is the float64
    # retraction of the exact half-precision inputs, rounded once (within half an ulp, plus float32 round-off)
    reference = polar64 if method == "polar" else _qf64
    worst = 0.0
    for seed in range(40):
        w = _orthonormal64(32, 8, seed=100 + seed).to(dtype)
        xi = stiefel.tangent_projection(w, 0.3 * _randn(32, 8, seed=200 + seed, dtype=dtype))
        exact = reference(w.to(F64) + xi.to(F64))
        got = stiefel.retract(w, xi, method)
        assert got.dtype == dtype
        # half an ulp of each exact entry: |exact| in [2^(e-1), 2^e) has spacing 2^(e - 1 - p) (p mantissa bits)
        _, exponent = torch.frexp(exact.abs().clamp_min(torch.finfo(dtype).tiny))
        half_ulp = torch.ldexp(torch.ones_like(exact), exponent - 2 - {torch.bfloat16: 7, torch.float16: 10}[dtype])
        excess = ((got.to(F64) - exact).abs() - half_ulp).max()
        worst = max(worst, float(excess))
    assert worst <= 1e-6, worst


def test_retractions_return_the_dtype_of_w():
    # fix (polar): a float32 w with a float64 xi gave a float64 matrix (the promoted sum), unlike qr_retraction
    # and tangent_projection, which return w's dtype
    w = _orthonormal64(6, 3, seed=51)
    xi = stiefel.tangent_projection(w, 0.1 * _randn(6, 3, seed=52))
    for method in ("polar", "qr"):
        out = stiefel.retract(w.float(), xi, method)
        assert out.dtype == torch.float32
        ref = polar64 if method == "polar" else _qf64
        torch.testing.assert_close(out.to(F64), ref(w.float().to(F64) + xi), atol=1e-7, rtol=0)
        assert stiefel.retract(w, xi.float(), method).dtype == F64


# ------------------------------------------------------------------------------ random_orthonormal args (fix)

@pytest.mark.parametrize("args, kwargs", [
    ((-1, 3), {}), ((2.5, 3), {}), (("3", 3), {}), ((True, 2), {}), ((3, 2, -1), {}),
    ((3, 2), {"dtype": torch.int64}), ((3, 2), {"dtype": torch.complex64}), ((3, 2), {"dtype": "float32"}),
])
def test_random_orthonormal_refuses_bad_arguments(args, kwargs):
    # fix: an integer dtype returned entries truncated to 0 / +-1, a bool size counted as 1, the rest raw errors
    with pytest.raises(LayerArgumentError, match="random_orthonormal"):
        stiefel.random_orthonormal(*args, **kwargs)


def test_random_orthonormal_shapes_and_dtypes():
    import numpy as np
    for args in [(1, 5), (5, 1), (0, 3), (3, 0), (4, 4, 2), (4, 4, 0), (3, 5, np.int64(2), 2)]:
        q = stiefel.random_orthonormal(*args, dtype=F64, generator=_gen(0))
        m, n = args[:2]
        assert q.shape == (*[int(b) for b in args[2:]], m, n)
        if q.numel():
            gram = q @ q.mT if m < n else q.mT @ q
            torch.testing.assert_close(gram, torch.eye(min(m, n), dtype=F64).expand_as(gram), atol=1e-14, rtol=0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert stiefel.random_orthonormal(4, 3, dtype=dtype).dtype == dtype


# ----------------------------------------------------------------------------------- what held (coverage)

@pytest.mark.parametrize("shape", [(1, 5), (5, 1), (1, 1), (4, 4), (120, 3), (3, 120), (2, 3, 5, 4)])
def test_functions_on_edge_shapes_against_float64_references(shape):
    a = _randn(*shape, seed=61)
    p = stiefel.project_to_stiefel(a)
    torch.testing.assert_close(p, polar64(a), atol=1e-12, rtol=0)
    g = _randn(*shape, seed=62)
    xi = stiefel.tangent_projection(p, g)
    tall = (lambda t: t.mT) if shape[-2] < shape[-1] else (lambda t: t)
    skew = tall(p).mT @ tall(xi)
    torch.testing.assert_close(skew + skew.mT, torch.zeros_like(skew), atol=1e-12, rtol=0)  # tangent
    torch.testing.assert_close(stiefel.tangent_projection(p, xi), xi, atol=1e-12, rtol=0)  # idempotent
    step = 0.1 * xi
    torch.testing.assert_close(stiefel.polar_retraction(p, step), polar64(p + step), atol=1e-12, rtol=0)
    torch.testing.assert_close(stiefel.qr_retraction(p, step), _qf64(p + step), atol=1e-12, rtol=0)
    assert float(stiefel.orthogonality_defect(p).max()) < 1e-13


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0, 0), (7, 0, 3, 3), (2, 0, 4)])
def test_functions_on_empty_matrices(shape):
    a = torch.zeros(shape, dtype=F64)
    for out in (stiefel.project_to_stiefel(a), stiefel.polar_retraction(a, a), stiefel.qr_retraction(a, a),
                stiefel.tangent_projection(a, a), stiefel.orthonormal(a)):
        assert out.shape == a.shape
    assert stiefel.orthogonality_defect(a).shape == shape[:-2]


def test_project_to_stiefel_over_scales_and_rank_deficiency():
    base = _randn(5, 3, seed=71)
    for scale in (1e-300, 1e-200, 1e200, 1e300):
        torch.testing.assert_close(stiefel.project_to_stiefel(base * scale), polar64(base), atol=1e-13, rtol=0)
    rank2 = _randn(6, 2, seed=72) @ _randn(2, 4, seed=73)
    assert float(stiefel.orthogonality_defect(stiefel.project_to_stiefel(rank2))) < 1e-13
    assert float(stiefel.orthogonality_defect(stiefel.project_to_stiefel(torch.zeros(5, 3)))) == 0.0
    with pytest.raises(LayerArgumentError, match="NaN or inf"):
        stiefel.project_to_stiefel(torch.full((5, 3), float("inf")))


def test_functions_under_vmap_match_the_batched_call():
    a = _randn(4, 6, 3, seed=81)
    w = stiefel.project_to_stiefel(a)
    xi = stiefel.tangent_projection(w, 0.1 * _randn(4, 6, 3, seed=82))
    torch.testing.assert_close(vmap(stiefel.project_to_stiefel)(a), polar64(a), atol=1e-12, rtol=0)
    torch.testing.assert_close(vmap(stiefel.polar_retraction)(w, xi), polar64(w + xi), atol=1e-12, rtol=0)
    torch.testing.assert_close(vmap(stiefel.qr_retraction)(w, xi), _qf64(w + xi), atol=1e-12, rtol=0)
    torch.testing.assert_close(vmap(stiefel.tangent_projection)(w, a), stiefel.tangent_projection(w, a))


# ------------------------------------------------------------------------------- isometric blocks (held)

def _blocks(dtype=torch.float32):
    torch.manual_seed(91)
    blocks = [OrthogonalActivationBlock(12, dtype=dtype), OrthogonalActivationBlock(12, "identity", dtype=dtype),
              ReflectionResidualBlock(12, hidden=7, dtype=dtype), ReflectionResidualBlock(12, hidden=12, dtype=dtype)]
    with torch.no_grad():
        for block in blocks:
            block.bias.normal_()
    return blocks


def test_isometric_jacobians_are_orthogonal_for_random_inputs():
    for block in _blocks():
        for seed in range(4):
            x = _randn(12, seed=seed, dtype=torch.float32)
            jac = torch.autograd.functional.jacobian(block, x).to(F64)
            sv = torch.linalg.svdvals(jac)
            assert float((sv - 1).abs().max()) < 1e-5, (type(block).__name__, sv)


def test_isometric_jacobians_at_the_kinks_float64():
    # units exactly at 0 (bias 0 at x = 0): the reflection stays a reflection (relu'(0) = 0 counts the unit
    # inactive), abs gets a zero row there (documented), relu is a partial isometry
    torch.manual_seed(92)
    x = torch.zeros(10, dtype=F64)
    for make in (lambda: ReflectionResidualBlock(10, 6, dtype=F64), lambda: OrthogonalActivationBlock(10, dtype=F64),
                 lambda: OrthogonalActivationBlock(10, "relu", dtype=F64)):
        block = make()
        with torch.no_grad():
            block.bias.normal_()
            block.bias[::2] = 0.0
        jac = torch.autograd.functional.jacobian(block, x)
        if isinstance(block, ReflectionResidualBlock):
            torch.testing.assert_close(jac @ jac, torch.eye(10, dtype=F64), atol=1e-13, rtol=0)
            torch.testing.assert_close(jac, jac.T, atol=1e-13, rtol=0)
        else:
            torch.testing.assert_close(jac @ jac.T @ jac, jac, atol=1e-13, rtol=0)
            assert int((jac.abs().sum(1) == 0).sum()) >= 3  # the units at 0 (and, for relu, below)


def test_reflection_keeps_orthonormal_rows_whatever_raw_holds():
    block = ReflectionResidualBlock(8, 5, dtype=F64)
    with torch.no_grad():
        block.raw[:, 1] = block.raw[:, 0]  # rank-deficient raw
        block.raw[:, 3] = 0.0
    w = block.weight
    torch.testing.assert_close(w @ w.T, torch.eye(5, dtype=F64), atol=1e-13, rtol=0)


def test_isometric_blocks_round_trips_freeze_compile_and_func():
    x = _randn(3, 12, seed=93, dtype=torch.float32)
    for block in _blocks():
        y = block(x)
        clone = type(block)(12, *([block.hidden] if isinstance(block, ReflectionResidualBlock) else
                                  [block.activation]))
        clone.load_state_dict(block.state_dict())
        buffer = io.BytesIO()
        torch.save(block, buffer)
        buffer.seek(0)
        for other in (clone, copy.deepcopy(block), pickle.loads(pickle.dumps(block)),
                      torch.load(buffer, weights_only=False)):
            assert torch.equal(other(x), y)
        model = torch.nn.Sequential(copy.deepcopy(block)).eval()
        torch.testing.assert_close(orthofx.freeze(model)(x), model(x), atol=1e-5, rtol=0)
        w64 = copy.deepcopy(block).to(F64).weight
        gram = w64 @ w64.T
        torch.testing.assert_close(gram, torch.eye(gram.shape[0], dtype=F64), atol=1e-12, rtol=0)
        params = dict(block.named_parameters())
        assert torch.equal(functional_call(block, params, (x,)), y)
        torch.testing.assert_close(vmap(block)(x), y)
        torch._dynamo.reset()
        try:
            compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
            torch.testing.assert_close(compiled(x), y, atol=1e-6, rtol=0)
        finally:
            torch._dynamo.reset()


# --------------------------------------------------------------------------------- OrthogonalLinear (held)

@pytest.mark.parametrize("sizes", [(5, 1), (1, 5), (6, 6), (40, 3), (3, 40)])
def test_orthogonal_linear_round_trips(sizes):
    torch.manual_seed(94)
    layer = OrthogonalLinear(*sizes)
    x = torch.randn(4, sizes[0])
    loaded = OrthogonalLinear(*sizes)
    loaded.load_state_dict(copy.deepcopy(layer.state_dict()))
    assert torch.equal(loaded.weight, layer.weight)
    assert torch.equal(copy.deepcopy(layer).weight, layer.weight)
    assert torch.equal(pickle.loads(pickle.dumps(layer)).weight, layer.weight)
    w64 = copy.deepcopy(layer).to(F64).weight
    gram = w64 @ w64.T if sizes[1] <= sizes[0] else w64.T @ w64
    torch.testing.assert_close(gram, torch.eye(gram.shape[0], dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(w64, layer.weight.to(F64), atol=1e-7, rtol=0)
    model = torch.nn.Sequential(copy.deepcopy(layer), torch.nn.Tanh()).eval()
    torch.testing.assert_close(orthofx.freeze(model)(x), model(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(vmap(layer)(x), layer(x), atol=1e-6, rtol=0)
    # eval cache: a load_state_dict after an eval forward is seen
    layer.eval()
    with torch.no_grad():
        layer(x)
        other = OrthogonalLinear(*sizes)
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, other.weight, other.bias))


@pytest.mark.parametrize("shape", [(5, 0), (0, 3), (2, 0, 4)])
def test_the_polar_factor_of_an_empty_matrix_has_an_empty_gradient(shape):
    """The exact derivative's scale (an amax over the matrix) raised IndexError on an empty matrix, whose gradient
    the routes had given (an empty tensor of its shape)."""
    a = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    stiefel.project_to_stiefel(a).sum().backward()
    assert a.grad is not None and a.grad.shape == a.shape
