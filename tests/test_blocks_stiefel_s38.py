"""Adversarial review of orthofx.nn.stiefel and orthofx.nn.isometric against independent references (session 38).

References: float64 ``torch.linalg.svd`` (the polar factor ``U V^T`` and torch's own SVD derivative of it), central
finite differences, ``torch.func.jacrev`` Jacobians in float64, Householder QR, plain slicing of conv weights.
Fixed here (each test marked "fix" fails on the code before this session):

* the polar factor's derivative (``_polar_differential``, backward and forward mode) took the singular values from
  the eigenvalues of ``A^T A``, which lose ``s_min`` below ``sqrt(eps) s_max``: NaN at ``s = (1, 0.5, 1e-9)``,
  3e-5 off at ``1e-6``, where the derivative is large but finite;
* ``random_orthonormal`` with a generator that is not a ``torch.Generator`` failed inside the draw
  (AttributeError), and on the meta device inside LAPACK (NotImplementedError: geqrf has no meta kernel);
* ``flatten_weight`` of a non-tensor and ``unflatten_weight`` of a matrix of the wrong size raised raw errors;
* ``orthonormal`` of a half-precision tensor raised torch's NotImplementedError ("geqrf_cpu").
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwad
from torch.func import grad, jacrev, jvp, vmap

import orthofx
from orthofx.errors import LayerArgumentError
from orthofx.nn import stiefel
from orthofx.nn.isometric import OrthogonalActivationBlock, ReflectionResidualBlock

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _randn(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _svd_polar(a: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    return u @ vh


def _with_singular_values(m: int, values: list[float], seed: int = 0) -> torch.Tensor:
    u, _ = torch.linalg.qr(_randn(m, len(values), seed=seed))
    v, _ = torch.linalg.qr(_randn(len(values), len(values), seed=seed + 1))
    return u @ torch.diag(torch.tensor(values, dtype=F64)) @ v.mT


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------------------------- polar derivative


@pytest.mark.parametrize("smallest", [1e-6, 1e-9])
@pytest.mark.parametrize("wide", [False, True])
def test_fix_polar_derivative_near_rank_deficiency_is_the_svd_one(smallest, wide):
    a = _with_singular_values(6, [1.0, 0.5, smallest])
    a = a.mT.contiguous() if wide else a
    d = _randn(*a.shape, seed=5)
    reference = jvp(_svd_polar, (a,), (d,))[1]  # torch's SVD derivative, accurate for s_min >> eps s_max
    # ... and it is the derivative: central differences, a step well inside s_min
    step = smallest * 1e-3
    fd = (_svd_polar(a + step * d) - _svd_polar(a - step * d)) / (2 * step)
    assert _rel(reference, fd) < 1e-3
    assert float(reference.norm()) > 0.1 / smallest  # large (1 / s_min), which is what made it worth checking

    with fwad.dual_level():
        dual = stiefel.project_to_stiefel(fwad.make_dual(a, d))
        forward = fwad.unpack_dual(dual).tangent
    assert _rel(forward, reference) < 1e-6

    loss_ref = grad(lambda x: (_svd_polar(x) * d).sum())(a)
    leaf = a.clone().requires_grad_()
    backward, = torch.autograd.grad((stiefel.project_to_stiefel(leaf) * d).sum(), leaf)
    assert _rel(backward, loss_ref) < 1e-6
    batched = vmap(grad(lambda x: (stiefel.project_to_stiefel(x) * d).sum()))(a.unsqueeze(0))[0]
    assert _rel(batched, loss_ref) < 1e-6
    # the retraction shares the derivative: R(W, xi) = polar(W + xi)
    w = stiefel.random_orthonormal(*a.shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    retraction = jvp(lambda x: stiefel.polar_retraction(w, x), (a - w,), (d,))[1]
    assert _rel(retraction, reference) < 1e-6


def test_fix_polar_derivative_in_a_mixed_batch_and_where_well_conditioned():
    """One ill-conditioned matrix in a batch sends the batch to the SVD; the well-conditioned one keeps its value."""
    a = torch.stack([_randn(5, 3, seed=1), _with_singular_values(5, [2.0, 1.0, 1e-8], seed=2)])
    d = _randn(2, 5, 3, seed=3)
    reference = jvp(_svd_polar, (a,), (d,))[1]
    got = jvp(stiefel.project_to_stiefel, (a,), (d,))[1]
    for i in range(2):
        assert _rel(got[i], reference[i]) < 1e-6
    assert torch.autograd.gradcheck(stiefel.project_to_stiefel, (_randn(4, 3, seed=4).requires_grad_(),),
                                     check_forward_ad=True)


# ------------------------------------------------------------------------------------------------- random_orthonormal


def test_fix_random_orthonormal_refuses_a_non_generator_and_serves_meta():
    with pytest.raises(LayerArgumentError, match="random_orthonormal: generator must be a torch.Generator or None, "
                                                 "got int 3"):
        stiefel.random_orthonormal(3, 3, generator=3)
    meta = stiefel.random_orthonormal(3, 5, 2, device="meta", dtype=F64)
    assert meta.is_meta and meta.shape == (2, 3, 5) and meta.dtype == F64


def test_random_orthonormal_is_haar_like_exact_and_reproducible():
    q = stiefel.random_orthonormal(4, 4, 3000, generator=torch.Generator().manual_seed(0), dtype=F64)
    trace = q.diagonal(dim1=-2, dim2=-1).sum(-1)  # Haar on O(4): E tr = 0, Var tr = 1
    assert abs(float(trace.mean())) < 0.08 and abs(float(trace.var()) - 1) < 0.1
    assert abs(float((torch.linalg.det(q) > 0).double().mean()) - 0.5) < 0.05  # both components
    assert abs(float((q[:, 0, 0] > 0).double().mean()) - 0.5) < 0.05  # sign symmetry
    for m, n in [(6, 3), (3, 6)]:
        w = stiefel.random_orthonormal(m, n, generator=torch.Generator().manual_seed(1), dtype=F64)
        gram = w.mT @ w if m >= n else w @ w.mT
        assert float((gram - torch.eye(min(m, n), dtype=F64)).abs().max()) < 1e-14
    state = torch.get_rng_state()
    a = stiefel.random_orthonormal(5, 3, generator=torch.Generator().manual_seed(7))
    b = stiefel.random_orthonormal(5, 3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.equal(state, torch.get_rng_state())


# -------------------------------------------------------------------------------------------- flatten / orthonormal


@pytest.mark.parametrize("conv", [torch.nn.Conv2d(4, 6, 3, groups=2), torch.nn.Conv1d(4, 8, 2, groups=4),
                                  torch.nn.ConvTranspose2d(4, 6, 3, groups=2), torch.nn.ConvTranspose1d(6, 4, 3)],
                         ids=["conv2d", "conv1d", "tconv2d", "tconv1d"])
def test_flatten_weight_groups_are_the_slices_and_round_trip(conv):
    w = conv.weight.detach()
    matrix = stiefel.flatten_weight(w, conv.groups)
    rows = w.shape[0] // conv.groups
    slices = [w[i * rows:(i + 1) * rows].reshape(rows, -1) for i in range(conv.groups)]
    assert torch.equal(matrix, slices[0] if conv.groups == 1 else torch.stack(slices))
    assert torch.equal(stiefel.unflatten_weight(matrix, w), w)


def test_fix_flatten_unflatten_and_orthonormal_refuse_bad_input():
    with pytest.raises(LayerArgumentError, match="flatten_weight: weight must be a tensor, got list"):
        stiefel.flatten_weight([[1.0, 2.0]])
    with pytest.raises(LayerArgumentError, match=r"unflatten_weight: a \(5, 3\) matrix \(15 entries\) is not a "
                                                 r"flattened \(6, 2, 3, 3\) weight"):
        stiefel.unflatten_weight(torch.zeros(5, 3), torch.zeros(6, 2, 3, 3))
    for dtype in (torch.float16, torch.bfloat16):
        with pytest.raises(LayerArgumentError, match="orthonormal: torch has no .* QR; pass raw.float()"):
            stiefel.orthonormal(torch.randn(4, 3).to(dtype))
    # the suggested route works, and orthonormal still traces (a Proxy is not checked)
    q = stiefel.orthonormal(torch.randn(4, 3).half().float()).half()
    assert q.dtype == torch.float16
    traced = torch.fx.symbolic_trace(lambda x: stiefel.orthonormal(x, tall=True))
    x = _randn(5, 3)
    assert torch.equal(traced(x), stiefel.orthonormal(x))


# --------------------------------------------------------------------------------------------- retractions / project


@pytest.mark.parametrize("shape", [(6, 3), (3, 6), (4, 4), (2, 5, 2)])
def test_retractions_are_first_order_and_project_is_the_svd_polar_factor(shape):
    w = stiefel.random_orthonormal(*shape[-2:], *shape[:-2], generator=torch.Generator().manual_seed(2), dtype=F64)
    xi = stiefel.tangent_projection(w, _randn(*shape, seed=4))
    tall_w, tall_xi = (w, xi) if shape[-2] >= shape[-1] else (w.mT, xi.mT)
    skew = tall_w.mT @ tall_xi
    assert float((skew + skew.mT).abs().max()) < 1e-13
    for method in stiefel.RETRACTIONS:
        errors = [float((stiefel.retract(w, t * xi, method) - (w + t * xi)).norm()) for t in (1e-2, 1e-3)]
        assert 80 < errors[0] / errors[1] < 120  # O(t^2)
        stepped = stiefel.retract(w.float(), xi.float(), method)
        assert float(stiefel.orthogonality_defect(stepped).max()) < 1e-6
    a = _randn(*shape, seed=6)
    assert float((stiefel.project_to_stiefel(a) - _svd_polar(a)).abs().max()) < 1e-12


# ---------------------------------------------------------------------------------------------------------- blocks


def _blocks():
    yield "abs-bias", lambda dt: OrthogonalActivationBlock(5, dtype=dt)
    yield "identity", lambda dt: OrthogonalActivationBlock(3, activation="identity", bias=False, dtype=dt)
    yield "abs-1", lambda dt: OrthogonalActivationBlock(1, dtype=dt)
    yield "reflect-3", lambda dt: ReflectionResidualBlock(6, 3, dtype=dt)
    yield "reflect-full", lambda dt: ReflectionResidualBlock(4, 4, bias=False, dtype=dt)
    yield "reflect-1", lambda dt: ReflectionResidualBlock(5, 1, dtype=dt)


@pytest.mark.parametrize("name,make", list(_blocks()), ids=[n for n, _ in _blocks()])
def test_block_jacobians_are_orthogonal_per_sample(name, make):
    torch.manual_seed(0)
    for dtype, tol in ((F64, 1e-12), (torch.float32, 1e-5)):
        block = make(dtype)
        if block.bias is not None:
            with torch.no_grad():
                block.bias.normal_()  # some units active, some not
        x = torch.randn(4, block.features, dtype=dtype)
        eye = torch.eye(block.features, dtype=dtype)
        jac = vmap(jacrev(block))(x)
        assert float((jac.mT @ jac - eye).abs().max().detach()) < tol
        single = jacrev(block)(x[0])  # unbatched input
        assert float((single.mT @ single - eye).abs().max()) < tol
        assert block(x.reshape(2, 2, -1)).shape == (2, 2, block.features)


@pytest.mark.parametrize("name,make", list(_blocks()), ids=[n for n, _ in _blocks()])
def test_blocks_freeze_trace_copy_and_seed(name, make):
    torch.manual_seed(1)
    block = make(torch.float32).eval()
    if block.bias is not None:
        with torch.no_grad():
            block.bias.normal_()
    model = torch.nn.Sequential(torch.nn.Linear(block.features, block.features), block).eval()
    x = torch.randn(3, block.features)
    y = model(x)
    torch.testing.assert_close(orthofx.freeze(copy.deepcopy(model))(x), y, atol=1e-6, rtol=0)
    torch.testing.assert_close(block.to_plain()(model[0](x)), y, atol=1e-6, rtol=0)
    assert torch.equal(torch.fx.symbolic_trace(model)(x), y)
    assert torch.equal(copy.deepcopy(model)(x), y)
    twin = make(torch.float32).eval()
    twin.load_state_dict(block.state_dict())
    hidden = model[0](x)
    assert torch.equal(twin(hidden), block(hidden))
    double = copy.deepcopy(model).double()
    assert double[1].weight.dtype == F64
    torch.testing.assert_close(double(x.double()), y.double(), atol=1e-5, rtol=0)
    torch.manual_seed(5)
    first = make(torch.float32)
    torch.manual_seed(5)
    assert torch.equal(first.raw, make(torch.float32).raw)
    torch.manual_seed(5)
    first.reset_parameters()
    torch.manual_seed(5)
    assert torch.equal(first.raw, make(torch.float32).raw)


def test_block_gradients_against_finite_differences():
    torch.manual_seed(2)
    for block in (OrthogonalActivationBlock(4, dtype=F64), ReflectionResidualBlock(5, 2, dtype=F64)):
        with torch.no_grad():
            block.bias.normal_()
        x = torch.randn(3, block.features, dtype=F64, requires_grad=True)
        raw, bias = (block.raw.detach().clone().requires_grad_(), block.bias.detach().clone().requires_grad_())
        assert torch.autograd.gradcheck(
            lambda r, b, v: torch.func.functional_call(block, {"raw": r, "bias": b}, (v,)), (raw, bias, x))


def test_blocks_refuse_bad_input_and_non_isometric_activations():
    with pytest.raises(LayerArgumentError, match="activation 'tanh' does not keep the Jacobian orthogonal"):
        OrthogonalActivationBlock(3, activation="tanh")
    with pytest.raises(LayerArgumentError, match=r"hidden \(4\) must not exceed features \(3\)"):
        ReflectionResidualBlock(3, 4)
    for block in (OrthogonalActivationBlock(4), ReflectionResidualBlock(4, 2)):
        for bad in (torch.randn(()), torch.randn(3), torch.randn(2, 5)):
            with pytest.raises(LayerArgumentError, match=r"expected an input of shape \(\.\.\., 4\)"):
                block(bad)
