"""Fuzz regressions (session 28) of L_orth's numerics: forward-mode derivatives, autocast, the column-orthogonal
value in float32, and the error messages of the metrics. References are independent of orthofx's routes: the dense
float64 operator of the circular convolution (built from basis inputs) and central differences."""

from __future__ import annotations

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from orthofx import metrics
from orthofx.errors import ArgumentError
from references import lorth64

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # torch loads its forward-mode decompositions through torch.jit.script on first use, which warns
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")]


def dense_lorth(weight: torch.Tensor, stride, groups: int = 1) -> torch.Tensor:
    """P0's L_orth from the dense circular operator ``A`` on the Theorem 7 grid, differentiable w.r.t. ``weight``:
    ``||A A^T - I||_F^2 / N^d`` (``M <= C prod(S)``) or ``||A^T A - I||_F^2 / N^d``. The operator is the conv applied
    to every basis input, circularly padded by ``k - 1`` on the right."""
    d = weight.dim() - 2
    ss = (stride,) * d if isinstance(stride, int) else tuple(stride)
    ks = weight.shape[2:]
    grid = tuple(s * -(-(2 * k - 1) // s) for k, s in zip(ks, ss))
    channels = weight.shape[1] * groups
    basis = torch.eye(channels * math.prod(grid), dtype=weight.dtype).reshape(-1, channels, *grid)
    pad = [p for k in reversed(ks) for p in (0, k - 1)]
    columns = (F.conv1d, F.conv2d, F.conv3d)[d - 1](F.pad(basis, pad, mode="circular"), weight, stride=ss,
                                                     groups=groups)
    a = columns.reshape(columns.shape[0], -1).T
    gram = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
    positions = a.shape[0] // weight.shape[0]
    return (gram - torch.eye(gram.shape[0], dtype=weight.dtype)).square().sum() / positions


# (M, C/g, kernel, stride, groups): row and column orthogonal cases, strided, grouped, 1-D and 2-D
SHAPES = [((4, 3, 3, 3), 1, 1), ((4, 3, 3, 3), 2, 1), ((6, 2, 3), 1, 1), ((6, 1, 3, 2), (2, 1), 3),
          ((5, 2, 4), 3, 1)]


@pytest.mark.parametrize("shape, stride, groups", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("fast_backward", [True, False])
def test_forward_mode_derivative_is_the_directional_derivative(shape, stride, groups, dtype, fast_backward):
    """torch.func.jvp of lorth was 0 for a float64 conv weight (weight.requires_grad is False under forward mode, so
    the value-only Fourier route ran under no_grad) and half the true value for a float32 one with the default
    fast_backward (the detached filters carried no tangent and the doubling ran only when out.requires_grad)."""
    gen = torch.Generator().manual_seed(len(shape) + groups)
    w = torch.randn(*shape, generator=gen, dtype=torch.float64)
    t = torch.randn(*shape, generator=gen, dtype=torch.float64)
    h = 1e-6
    with torch.no_grad():
        ref = float(dense_lorth(w + h * t, stride, groups) - dense_lorth(w - h * t, stride, groups)) / (2 * h)

    def f(x):
        return metrics.lorth(x, stride, groups, fast_backward=fast_backward)

    _, jvp = torch.func.jvp(f, (w.to(dtype),), (t.to(dtype),))
    with fwAD.dual_level():
        dual = fwAD.unpack_dual(f(fwAD.make_dual(w.to(dtype), t.to(dtype)))).tangent
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    assert float(jvp) == pytest.approx(ref, rel=tol, abs=tol)
    assert float(dual) == pytest.approx(ref, rel=tol, abs=tol)


def test_jacfwd_of_a_float64_conv_weight_is_its_gradient():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64)
    reference = torch.func.grad(lambda x: dense_lorth(x, 2))(w)
    jacobian = torch.func.jacfwd(lambda x: metrics.lorth(x, 2))(w)  # was all zeros
    torch.testing.assert_close(jacobian, reference, rtol=1e-9, atol=1e-9)


def _near_orthogonal(M, C, ks, stride, eps, seed):
    """A kernel ``(M, C, *ks)`` whose strided circular conv is orthogonal (every S_i <= k_i), then ``eps`` of noise:
    tap ``r`` (< S) of input channel ``c`` carries column ``(c, r)`` of an ``M x C prod(S)`` matrix with orthonormal
    rows (M <= C prod(S)) or columns, other taps zero (space-to-depth). An empty ``ks`` gives a Linear weight."""
    gen = torch.Generator().manual_seed(seed)
    ss = (stride,) * len(ks)
    n = max(M, C * math.prod(ss))
    q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0][:M, :C * math.prod(ss)]
    w = torch.zeros(M, C, *ks, dtype=torch.float64)
    w[(slice(None), slice(None)) + tuple(slice(0, s) for s in ss)] = q.reshape(M, C, *ss)
    return w + eps * torch.randn(w.shape, generator=gen, dtype=torch.float64)


def linear_lorth(w: torch.Tensor) -> torch.Tensor:
    """``||W W^T - I||_F^2`` (wide) or ``||W^T W - I||_F^2`` (tall) of a 2-D weight, differentiable."""
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return (gram - torch.eye(gram.shape[0], dtype=w.dtype)).square().sum()


@pytest.mark.parametrize("M, C, ks, stride", [(16, 16, (1, 3), 1), (8, 16, (), 1), (12, 4, (3, 3), 2)])
def test_lorth_under_autocast_runs_in_the_weights_dtype(M, C, ks, stride):
    """Under torch.autocast (CPU, bfloat16) lorth ran its convolution / Gram product in bfloat16: a bfloat16 value
    for a float32 weight and a gradient 39 % off in direction near orthogonality. orthofx.penalty switched autocast
    off for its terms; lorth called directly now does so itself."""
    w64 = _near_orthogonal(M, C, ks, stride, 1e-3, seed=M + C)

    def reference(x):
        return dense_lorth(x, stride) if ks else linear_lorth(x)

    ref_grad = torch.func.grad(reference)(w64)
    w = w64.float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = metrics.lorth(w, stride) if ks else metrics.lorth(w)
        (grad,) = torch.autograd.grad(value, w)
    assert value.dtype == torch.float32
    with torch.no_grad():
        assert float(value.detach()) == pytest.approx(float(reference(w64)), rel=1e-3)
    assert float((grad.double() - ref_grad).norm() / ref_grad.norm()) < 1e-2


@pytest.mark.parametrize("M, C, ks, stride", [(128, 8, (3, 3), 1), (256, 16, (3, 3), 1), (96, 4, (3,), 2)])
def test_column_orthogonal_value_keeps_its_digits_in_float32(M, C, ks, stride):
    """The CO value was ||conv(K, K) - I||^2 - (M - C S^d), the difference of two numbers of order M - C S^d: in
    float32 near orthogonality it lost its digits (an L_orth of 1.3e-5 for 8 -> 128 channels came out 7.6e-6). The
    tall operator's smaller Gram matrix (A^T A) now stands in, as the one-tap and Fourier routes already did."""
    w = _near_orthogonal(M, C, ks, stride, 1e-4, seed=M)
    ref = lorth64(w, stride=stride)
    assert 1e-7 < ref < 1e-3
    for grad in (False, True):
        value = float(metrics.lorth(w.float().requires_grad_(grad), stride).detach())
        assert value == pytest.approx(ref, rel=2e-3)


@pytest.mark.parametrize("shape, stride, groups, case", [((12, 2, 3, 3), 1, 1, None), ((12, 2, 3, 3), 1, 1, "RO"),
                                                         ((18, 2, 5), 2, 3, None), ((9, 1, 3, 2), (2, 1), 1, "RO")])
def test_tall_route_value_and_gradient_match_the_dense_operator(shape, stride, groups, case):
    """The tall route (M > C S^d per group: the Gram matrix of the transposed space-to-depth kernel) against the
    dense operator, in the natural CO case and with RO forced (L_orth then adds M - C S^d), value and gradient."""
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(*shape, generator=gen, dtype=torch.float64)
    shift = 0.0
    if case == "RO":
        ss = (stride,) * (len(shape) - 2) if isinstance(stride, int) else stride
        shift = shape[0] - shape[1] * groups * math.prod(ss)
    ref = torch.func.grad(lambda x: dense_lorth(x, stride, groups))(w)
    with torch.no_grad():
        ref_value = float(dense_lorth(w, stride, groups)) + shift
    for fast in (True, False):
        x = w.clone().requires_grad_(True)
        value = metrics.lorth(x, stride, groups, case, fast_backward=fast)
        value.backward()
        assert float(value.detach()) == pytest.approx(ref_value, rel=1e-10)
        torch.testing.assert_close(x.grad, ref, rtol=1e-9, atol=1e-9)
        x32 = w.float().requires_grad_(True)
        metrics.lorth(x32, stride, groups, case, fast_backward=fast).backward()
        torch.testing.assert_close(x32.grad.double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("call, message", [
    (lambda: metrics.lorth([[1.0]]), r"^lorth: weight must be a torch.Tensor"),
    (lambda: metrics.lorth(torch.zeros(0, 3)), r"^lorth: weight is empty"),
    (lambda: metrics.lorth(torch.ones(3, 3, dtype=torch.long)), r"^lorth: weight must be a real floating-point"),
    (lambda: metrics.linear_singular_values(torch.zeros(0, 3)), r"^linear_singular_values: weight is empty"),
    (lambda: metrics.orthogonality_error(torch.ones(2, 2, dtype=torch.complex64)), r"^orthogonality_error: weight"),
    (lambda: metrics.spectral_norm_bound("w"), r"^spectral_norm_bound: weight must be a torch.Tensor"),
    (lambda: metrics.conv_singular_values(torch.ones(2, 2, 3, dtype=torch.int32), 4),
     r"^conv_singular_values: weight must be a real floating-point"),
    (lambda: metrics.conv_singular_values(torch.ones(2, 2, 3), 4, dtype=torch.int64),
     r"^conv_singular_values: dtype must be a real floating-point torch.dtype"),
])
def test_weight_errors_name_the_function(call, message):
    """The weight checks every metric shares said 'weight is empty, shape (0, 3)' with no function named."""
    with pytest.raises(ArgumentError, match=message):
        call()
