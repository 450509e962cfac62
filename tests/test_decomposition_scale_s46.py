"""``eigh_stable`` / ``svd_stable`` float32 gradients of well-conditioned matrices at any scale (s46).

The backwards clamped every denominator at ``max(eps * max|lambda|, sqrt(tiny))``; ``sqrt(tiny)`` (1.1e-19 in
float32) does not scale with the matrix, so a kappa = 5 matrix scaled by 1e-20 had every gap clamped and its eigh
gradient was 44-99 % off (torch's float32 one: 1e-6), and the ``S^-1`` terms of a non-square SVD 57-83 %. The
kernels are now built from the spectrum divided by a power of two ``c`` near its maximum.

References: torch's own float64 gradients (exact mode), and for the Taylor form the formulas of the module
docstring written out in float64 with plain loops (checked against torch with the exact kernel first)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import orthofx
from orthofx.nn import eigh_stable, svd_stable
from orthofx.nn.decompositions import pair_kernel

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices (tests/conftest.py)

F64 = torch.float64
EPS32 = torch.finfo(torch.float32).eps


def _tolerance(kappa: float, dtype: torch.dtype = torch.float32) -> float:
    """Float accuracy of an eigen/singular-vector gradient: a few hundred ulps times the condition number of the
    vectors (largest magnitude over smallest gap); measured errors are about 2 eps kappa, the bug's 0.4 and up."""
    return 50 * torch.finfo(dtype).eps * kappa


def _relative(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).abs().max() / ref.abs().max())


def _orthogonal(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, dtype=F64, generator=g))[0]


# ------------------------------------------------------------------------------------------- references


def _taylor_magnitude(a: float, b: float, order: int | None) -> float:
    """|K| of a pair of eigenvalues as the module docstring states it, one pair at a time."""
    if order is None:
        return 1.0 / abs(a - b)
    if (a > 0) != (b > 0) or a == 0 or b == 0:  # opposite signs (or a zero): the exact value (a * b underflows)
        return 1.0 / (abs(a) + abs(b))
    big, small = max(abs(a), abs(b)), min(abs(a), abs(b))
    return sum((small / big) ** k for k in range(order + 1)) / big


def _kernel(lam: torch.Tensor, order: int | None) -> torch.Tensor:
    """``K[i, j] ~ 1 / (lam_j - lam_i)`` (distinct eigenvalues), entry by entry in float64."""
    n = lam.shape[-1]
    K = torch.zeros(n, n, dtype=F64)
    for i in range(n):
        for j in range(n):
            if i != j:
                a, b = float(lam[i]), float(lam[j])
                K[i, j] = (1.0 if b > a else -1.0) * _taylor_magnitude(a, b, order)
    return K


def _leaf_cotangents(loss, *outputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The loss's gradients with respect to the decomposition's outputs (float64 leaves)."""
    leaves = [t.detach().requires_grad_() for t in outputs]
    return torch.autograd.grad(loss(*leaves), leaves)


def _eigh_formula_gradient(A: torch.Tensor, loss, order: int | None) -> torch.Tensor:
    """``dA = V (diag(dL) + K o skew(V^T dV)) V^T``, symmetrised, from torch's float64 eigh."""
    L, V = torch.linalg.eigh(A)
    gL, gV = _leaf_cotangents(loss, L, V)
    X = V.mT @ gV
    G = V @ (torch.diag(gL) + _kernel(L, order) * (X - X.mT) / 2) @ V.mT
    return (G + G.mT) / 2


def _svd_formula_gradient(A: torch.Tensor, loss, order: int | None) -> torch.Tensor:
    """The reduced-SVD backward of the module docstring with ``K`` from ``s^2``, from torch's float64 SVD."""
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    gU, gS, gVh = _leaf_cotangents(loss, U, S, Vh)
    V, gV = Vh.mT, gVh.mT
    K = _kernel(S * S, order)
    JU, JV = U.mT @ gU, V.mT @ gV
    inner = (K * (JU - JU.mT)) @ torch.diag(S) + torch.diag(S) @ (K * (JV - JV.mT)) + torch.diag(gS)
    s_inv = torch.diag(1.0 / S)
    m, n = A.shape
    grad = U @ inner @ Vh
    grad = grad + (torch.eye(m, dtype=F64) - U @ U.mT) @ gU @ s_inv @ Vh
    return grad + U @ s_inv @ gV.mT @ (torch.eye(n, dtype=F64) - V @ V.mT)


def _gradient(A: torch.Tensor, decompose, loss, create_graph: bool = False) -> torch.Tensor:
    """``d loss(decompose(A)) / dA``; ``create_graph`` runs the backward's out-of-place (differentiable) form,
    ``False`` the in-place one."""
    A = A.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss(*decompose(A)), A, create_graph=create_graph)
    return grad.detach()


# ------------------------------------------------------------------------------------------- eigh

SPECTRA = {"covariance": [1.0, 2.0, 3.0, 4.0, 5.0], "mixed_signs": [-2.0, 1.0, 2.0, 4.0, 5.0]}  # kappa 5: gaps >= 1


def _symmetric(spectrum: list[float], seed: int = 0) -> torch.Tensor:
    Q = _orthogonal(len(spectrum), len(spectrum), seed)
    return Q @ torch.diag(torch.tensor(spectrum, dtype=F64)) @ Q.mT


def _eigh_loss(scale: float, seed: int = 1):
    """Sign-invariant in the eigenvectors (float32 and float64 decompositions may pick other signs)."""
    g = torch.Generator().manual_seed(seed)
    W, w = torch.randn(5, 5, dtype=F64, generator=g), torch.randn(5, dtype=F64, generator=g)

    def loss(L, V):
        return (V * V * W.to(V.dtype)).sum() + (L * (w / scale).to(L.dtype)).sum()

    return loss


@pytest.mark.parametrize("order", [None, 9, 0])
def test_eigh_reference_formula(order):
    """The float64 formula reference is torch's gradient with the exact kernel, and that of eigh_stable (at the
    ordinary scale, where nothing was wrong) with the Taylor one."""
    A, loss = _symmetric(SPECTRA["mixed_signs"]), _eigh_loss(1.0)
    reference = _eigh_formula_gradient(A, loss, order)
    if order is None:
        torch.testing.assert_close(reference, _gradient(A, torch.linalg.eigh, loss), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(reference, _gradient(A, lambda a: eigh_stable(a, taylor_order=order), loss),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("create_graph", [False, True], ids=["in_place", "differentiable"])
@pytest.mark.parametrize("order", [None, 9], ids=["exact", "taylor9"])
@pytest.mark.parametrize("spectrum", list(SPECTRA))
@pytest.mark.parametrize("exponent", range(-30, 31, 5))
def test_eigh_float32_gradient_at_any_scale(exponent, spectrum, order, create_graph):
    scale = 10.0 ** exponent
    A, loss = _symmetric(SPECTRA[spectrum]) * scale, _eigh_loss(scale)
    reference = _eigh_formula_gradient(A, loss, order)
    got = _gradient(A.float(), lambda a: eigh_stable(a, taylor_order=order), loss, create_graph)
    assert got.isfinite().all()
    assert _relative(got, reference) < _tolerance(5.0)


@pytest.mark.parametrize("order", [None, 9], ids=["exact", "taylor9"])
@pytest.mark.parametrize("scale", [1e-160, 1e-250])
def test_eigh_float64_gradient_below_sqrt_tiny(scale, order):
    """Float64's sqrt(tiny) is 1.5e-154: spectra below it had every gap clamped too."""
    A, loss = _symmetric(SPECTRA["covariance"]) * scale, _eigh_loss(scale)
    got = _gradient(A, lambda a: eigh_stable(a, taylor_order=order), loss)
    assert _relative(got, _eigh_formula_gradient(A, loss, order)) < _tolerance(5.0, F64)


def test_eigh_scale_is_per_matrix():
    """One batch holding matrices of very different scales: each gets its own c."""
    scales = [1e-20, 1.0, 1e20]
    A = torch.stack([_symmetric(SPECTRA["covariance"], seed) * s for seed, s in enumerate(scales)])
    losses = [_eigh_loss(s, seed) for seed, s in enumerate(scales)]

    def batch_loss(L, V):
        return sum(loss(L[i], V[i]) for i, loss in enumerate(losses))

    got = _gradient(A.float(), lambda a: eigh_stable(a, taylor_order=None), batch_loss)
    for i, loss in enumerate(losses):
        assert _relative(got[i], _gradient(A[i], torch.linalg.eigh, loss)) < _tolerance(5.0), scales[i]


@pytest.mark.parametrize("order", [None, 9])
def test_pair_kernel_of_a_tiny_spectrum(order):
    lam = torch.tensor(SPECTRA["mixed_signs"], dtype=F64) * 1e-25
    got = pair_kernel(lam.float(), taylor_order=order)
    assert _relative(got, _kernel(lam, order)) < _tolerance(1.0)


# ------------------------------------------------------------------------------------------- svd

SHAPES = [(6, 4), (4, 6), (4, 4)]


def _matrix(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Singular values 4, 3, 2, 1: kappa 4, relative gaps of the squares >= 3/4."""
    m, n = shape
    k = min(m, n)
    S = torch.arange(k, 0, -1, dtype=F64)
    return _orthogonal(m, k, seed) @ torch.diag(S) @ _orthogonal(n, k, seed + 100).mT


def _svd_loss(shape: tuple[int, int], scale: float, seed: int = 1):
    """Invariant under the sign of each singular pair; ``U @ Vh`` reaches the ``S^-1`` terms of both sides."""
    m, n = shape
    k = min(m, n)
    g = torch.Generator().manual_seed(seed)
    W0, W1 = torch.randn(m, n, dtype=F64, generator=g), torch.randn(m, k, dtype=F64, generator=g)
    W2, w = torch.randn(k, n, dtype=F64, generator=g), torch.randn(k, dtype=F64, generator=g)

    def loss(U, S, Vh):
        dtype = U.dtype
        return ((U @ Vh * W0.to(dtype)).sum() + (U * U * W1.to(dtype)).sum() + (Vh * Vh * W2.to(dtype)).sum()
                + (S * (w / scale).to(dtype)).sum())

    return loss


def _torch_svd(a: torch.Tensor):
    return torch.linalg.svd(a, full_matrices=False)


@pytest.mark.parametrize("order", [None, 9, 0])
@pytest.mark.parametrize("shape", SHAPES)
def test_svd_reference_formula(shape, order):
    A, loss = _matrix(shape), _svd_loss(shape, 1.0)
    reference = _svd_formula_gradient(A, loss, order)
    if order is None:
        torch.testing.assert_close(reference, _gradient(A, _torch_svd, loss), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(reference, _gradient(A, lambda a: svd_stable(a, taylor_order=order), loss),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("create_graph", [False, True], ids=["in_place", "differentiable"])
@pytest.mark.parametrize("order", [None, 9], ids=["exact", "taylor9"])
@pytest.mark.parametrize("shape", SHAPES, ids=["tall", "wide", "square"])
@pytest.mark.parametrize("exponent", range(-20, 31, 5))
def test_svd_float32_gradient_at_any_scale(exponent, shape, order, create_graph):
    """From singular values 1e-20 (below it the squares of the bounded c's scaling are clamped, and torch's own
    float32 gradient is NaN) to 1e30 (torch's is NaN from 1e20, where the squares overflow)."""
    scale = 10.0 ** exponent
    A, loss = _matrix(shape) * scale, _svd_loss(shape, scale)
    reference = _svd_formula_gradient(A, loss, order)
    got = _gradient(A.float(), lambda a: svd_stable(a, taylor_order=order), loss, create_graph)
    assert got.isfinite().all()
    assert _relative(got, reference) < _tolerance(4.0)


def test_svd_scale_is_per_matrix():
    scales = [1e-20, 1e15]
    A = torch.stack([_matrix((6, 4), seed) * s for seed, s in enumerate(scales)])
    losses = [_svd_loss((6, 4), s, seed) for seed, s in enumerate(scales)]

    def batch_loss(U, S, Vh):
        return sum(loss(U[i], S[i], Vh[i]) for i, loss in enumerate(losses))

    got = _gradient(A.float(), lambda a: svd_stable(a, taylor_order=None), batch_loss)
    for i, loss in enumerate(losses):
        assert _relative(got[i], _gradient(A[i], _torch_svd, loss)) < _tolerance(4.0), scales[i]


def test_largest_float32_spectra():
    """Singular values / eigenvalues up to 3e38 (the next power of two above 1.7e38 is inf in float32: the SVD's
    scale c was inf and its kernel 0)."""
    B = _matrix((4, 4)) * 0.75e38
    loss = _svd_loss((4, 4), 1e38)
    got = _gradient(B.float(), lambda a: svd_stable(a, taylor_order=None), loss)
    assert _relative(got, _gradient(B, _torch_svd, loss)) < _tolerance(4.0)
    A = _symmetric(SPECTRA["covariance"]) * 0.6e38
    loss = _eigh_loss(1e38)
    got = _gradient(A.float(), lambda a: eigh_stable(a, taylor_order=None), loss)
    assert _relative(got, _gradient(A, torch.linalg.eigh, loss)) < _tolerance(5.0)


# ------------------------------------------------------------------------------------------- zero matrices


@pytest.mark.parametrize("scale", [0.0, 1e-35])
def test_zero_and_near_zero_matrices_keep_a_finite_gradient(scale):
    """The lower bound of c keeps the kernels finite where every gap is (nearly) zero."""
    A = torch.eye(5) * scale
    A[0, 0] = 2 * scale
    grad = _gradient(A, lambda a: eigh_stable(a, taylor_order=None), _eigh_loss(1.0))
    assert grad.isfinite().all()
    B = torch.zeros(6, 4)
    B[:4, :4] = A[:4, :4]
    for order in (None, 9):
        grad = _gradient(B, lambda a: svd_stable(a, taylor_order=order), _svd_loss((6, 4), 1.0))
        assert grad.isfinite().all()


# ------------------------------------------------------------------------------------------- the svd preset


class CovPool(nn.Module):
    """Covariance pooling: the eigenvectors of the features' covariance (a ResNet head's second-order pooling)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1, bias=False)
        self.fc = nn.Linear(64, 2)

    def forward(self, x):
        f = self.conv(x).flatten(2)
        f = f - f.mean(-1, keepdim=True)
        _, V = torch.linalg.eigh(f @ f.mT / f.shape[-1])
        return self.fc((V * V).flatten(1))


def test_svd_preset_covariance_pooling_of_small_features():
    """Features ~1e-9 (covariance eigenvalues ~1e-18): the conv weight's float32 gradient is the float64 one. The
    eigenvectors do not depend on the features' scale, so the float64 model at feature scale 1 gives the same
    gradient (and so does the float64 model at 1e-9)."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, 8, 8)
    gm = orthofx.transform(CovPool(), "svd", example_inputs=(x,))
    assert any("eigh" in str(node.target) for node in gm.graph.nodes if node.op == "call_function")
    gm64 = copy.deepcopy(gm).double()

    def conv_gradient(model, inputs):
        return torch.autograd.grad(model(inputs).sum(), model.conv.weight)[0].double()

    got = conv_gradient(gm, x * 1e-9)
    assert _relative(got, conv_gradient(gm64, x.double())) < 1e-3
    assert _relative(got, conv_gradient(gm64, x.double() * 1e-9)) < 1e-3
