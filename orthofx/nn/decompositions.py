"""Numerically stable eigendecomposition / SVD with bounded gradients, SVD-free matrix square roots, and a
condition-number monitor (P4, "Improving covariance conditioning of the SVD meta-layer by orthogonality").

Ops
---
``eigh_stable(A, taylor_order=9, float64=False, clamp_gap=None, *, uplo="L") -> (L, V)``
    ``torch.linalg.eigh`` of a symmetric (batched) matrix: eigenvalues ``L`` ascending, eigenvectors in the
    columns of ``V``. Only the lower triangle of ``A`` is read (``uplo="U"``: the upper one, as torch's ``UPLO``);
    the gradient is symmetric.
``svd_stable(A, taylor_order=9, float64=False, clamp_gap=None) -> (U, S, Vh)``
    Reduced SVD (``full_matrices=False``) of a real (batched) ``m x n`` matrix; ``S`` descending.

Both are ``torch.library.custom_op`` s (``torch.ops.orthofx.eigh_stable`` / ``torch.ops.orthofx.svd_stable``) with
``register_autograd`` and ``register_fake``, so that torch.fx symbolic tracing, ``torch.compile(fullgraph=True)``
and ``torch.export`` keep them as one node and keep their custom backward (an ``autograd.Function`` would be
inlined and its backward dropped). The real kernels return contiguous (row-major) outputs and the
fake kernels describe exactly those strides.

Backward (eigh)
---------------
With ``X = V^T dV`` and ``skew(X) = (X - X^T) / 2``::

    dA = V (diag(dL) + K o skew(X)) V^T,          K_ij ~ 1 / (lambda_j - lambda_i),  K_ii = 0,

symmetrised at the end ((dA + dA^T) / 2). ``K`` is antisymmetric, so ``K o skew(X)`` is symmetric.

* ``taylor_order=None``: the exact ``K_ij = 1 / (lambda_j - lambda_i)``, with the gap's magnitude clamped from
  below by ``max(clamp_gap, floor)``, ``floor = eps * max|lambda|`` (``eps`` of the dtype; see "Tiny and huge
  matrices" for its absolute lower bound), so that exactly repeated eigenvalues give a large but finite gradient
  instead of inf/NaN.
* ``taylor_order=T`` (an int >= 0; P4's Taylor form): for a pair with eigenvalues of the same sign, write
  ``a`` for the one of larger magnitude and ``b`` for the other; then ``1/(a - b) = (1/a) sum_k (b/a)^k`` and the
  series is truncated after ``k = T``::

      |K_ij| = (1/|a|) sum_{k=0..T} (|b|/|a|)^k      (<= (T+1)/|a|; for positive spectra |a| = max(lambda_i, lambda_j))

  which is P4's ``(1/lambda_i) sum_k (lambda_j/lambda_i)^k`` for positive eigenvalues (covariances), and the same
  form on the magnitudes for two negative ones. A pair of *opposite* signs (or with a zero) is already
  well separated (``|lambda_i - lambda_j| = |lambda_i| + |lambda_j| >= |a|``): it gets the exact value
  ``1/(|lambda_i| + |lambda_j|)``. Denominators are clamped from below by the same ``floor`` (a pair of
  (near-)zero eigenvalues, e.g. a rank-deficient covariance, gives a large but finite value).
  ``taylor_order=0`` is the one-term form ``1/|a|``; it is *not* the exact K (use ``None`` for that).
  (Computed as ``min(series, exact)``: for the same sign the truncated series of positive terms is below the
  exact value, for opposite signs the exact value is below ``1/|a|``, so one minimum covers both cases.)
* The sign of ``K_ij`` is the sign of ``lambda_j - lambda_i``; at an exact tie it follows the index order
  (``+`` for ``j > i``, eigenvalues being ascending), which makes the Taylor form continuous across ties.
* ``clamp_gap=g`` (a float > 0): in every mode, ``|K_ij| <= 1/g`` (for the exact mode this is the same as
  clamping ``|lambda_i - lambda_j|`` from below by ``g``).
* At an exact tie the result is a bounded surrogate, not the derivative: inside a repeated eigenspace the
  exact term ``K o skew(X)`` is a 0/0 whose limit carries part of the gradient, and the clamped ``K`` does not
  recover it. ``L = 1^T A^2 1`` computed from ``eigh`` at ``A = I`` (eigenvectors ``V = I``): ``skew(X) = 0``,
  so the backward gives ``diag(dL) = 2 I`` where the true gradient is ``2 * 1 1^T``; torch's is NaN there.
  Near a tie the gradient is the exact one until the gap falls below the clamp.

Backward (SVD)
--------------
The standard reduced-SVD backward, with the exact ``1/(s_k^2 - s_j^2)`` replaced by the same kernel ``K`` built
from ``lambda = s^2`` (the eigenvalues of ``A^T A``, all >= 0, so the Taylor form is P4's for covariances)::

    dA = U [ (K o (U^T dU - dU^T U)) S + S (K o (V^T dV - dV^T V)) + diag(dS) ] V^T
         + (I - U U^T) dU S^-1 V^T     (only when m > k)
         + U S^-1 dV^T (I - V V^T)     (only when n > k)

with ``K_jk ~ 1/(s_k^2 - s_j^2)``, ``k = min(m, n)``, ``V = Vh^T``, and ``S`` in ``S^-1`` clamped from below by
``eps * max(S)``. ``K o S`` is computed as ``(K' / c) o (S / c)`` with ``K'`` built from ``(S / c)^2`` (see "Tiny and
huge matrices" for ``c``): the same values, without overflowing ``S^2`` for huge singular values or underflowing
it for tiny ones. It equals torch's gradient for full-rank real matrices with distinct singular values
(``taylor_order=None``) and is finite for repeated ones. Complex (and integer) inputs are not supported: both ops raise
:class:`orthofx.errors.LayerArgumentError` for them, as for a non-matrix (and, for eigh, a non-square) input.

Tiny and huge matrices
----------------------
Both backwards build their kernels (``K``, and the SVD's ``S^-1``) from the spectrum divided by ``c``, a power of
two with ``max < c <= 2 max`` per matrix (``max``: ``max|lambda|`` for eigh, ``max(S)`` for the SVD), and divide
the result by ``c`` (``c^2``) again. The scaling is exact, so for matrices of ordinary scale the gradient is the
same bit for bit as without it, and the clamps are relative to the matrix (``eps * max``). ``c`` is bounded
below by ``2^-37`` (7.3e-12) in float32 and ``2^-456`` (5.4e-138) in float64, which keeps the kernels finite for
near-zero spectra: for a smaller ``max`` the scaled spectrum is no longer near 1, and once ``eps * max / c`` falls
below ``sqrt(tiny)`` (float32: ``max`` below 2^-77, 6.6e-24) the clamp ``sqrt(tiny)`` on it (:func:`_floor`)
comes back, ``c * sqrt(tiny)`` in the matrix's units (an all-zero matrix keeps ``c = 1``, the bound it always
had). The float32 gradients of well-conditioned matrices are right (float32 accuracy, as
torch's own) in these ranges:

* eigh, ``floor = max(eps * max|lambda|, 2^-100)`` (7.9e-31; ``|K| <= 1.3e30``): for eigenvalue gaps above
  ~1e-30, so matrices of scale 1e-30 up to 1e36 (torch's float32 gradient is right down to 1e-38; below 1e-30 the
  gaps are clamped, a bounded surrogate). In float64 the absolute part is ``2^-967`` (5.4e-292).
* SVD: for singular values from ~1e-20 to 1e36 (torch's float32 gradient is NaN or wrong below ~1e-21, where the
  squares underflow, and NaN above 1e19, where they overflow). Below 1e-21 the squares ``(S / c)^2`` of the
  bounded ``c`` fall below ``sqrt(tiny)`` and every gap is clamped: ``|K o S|`` stays finite but is wrong.

Before the scaling, a float32 matrix at scale 1e-20 had every eigen-gap clamped at ``sqrt(tiny)`` (1.1e-19): the
eigh gradient was 44-99 % off, the SVD's ``S^-1`` terms of a 6 x 4 matrix 57-83 %, and covariance pooling of
features ~1e-9 under the svd preset gave a conv weight gradient 44 % off (``c`` stopping at 1 for ``(S / c)^2``
made the square SVD's gradient 8 % off at 1e-10 and 49 % at 1e-12).

Non-finite inputs
-----------------
A matrix holding a NaN or an inf (a NaN in the model's input, weights gone to NaN after a bad step) is not
handed to LAPACK, which would raise from deep inside the op (for eigh with the misleading message that the
matrix is "ill-conditioned or has too many repeated eigenvalues") and end the training run. Its outputs (and
therefore its gradient) are NaN instead, as for any elementwise torch op; the other matrices of a batch are
decomposed as usual. The condition-number monitor that ``svd_conditioning`` places after the op counts the call
as a NaN event (``orthofx.report`` shows the count), and the training loop sees a NaN loss it can skip::

    L, V = eigh_stable(torch.full((2, 2), float("nan")))      # L, V all NaN; no exception

``float64=True`` casts the input to float64, runs the op (forward and backward) in float64 and casts the outputs
back; the casts are ordinary autograd ops outside the custom op.

The backward formulas are written with differentiable, out-of-place torch ops, so ``create_graph=True`` (double
backward) works; with ``taylor_order=None`` it is the exact second derivative (gradgradcheck passes), with the
Taylor form it differentiates the approximate backward (using the approximate backward again for ``L``, ``V``).

Square roots
------------
``sqrtm_newton_schulz`` / ``inv_sqrtm_newton_schulz``: the coupled Newton-Schulz iteration (iSQRT-COV, as stated in
P4): ``A = Sigma / tr(Sigma)``, ``Y0 = A (3I - A) / 2``, ``Z0 = (3I - A) / 2`` (this is already one step from
``Y = A, Z = I``), then ``iterations`` times ``ZY = (3I - Z Y)/2; Y <- Y ZY; Z <- ZY Z``; ``sqrt(Sigma) ~ Y
sqrt(tr Sigma)``, ``Sigma^(-1/2) ~ Z / sqrt(tr Sigma)``. Matmuls only (exportable to ONNX), batched,
differentiated by autograd. It converges for symmetric positive definite ``Sigma``; the error after ``T`` steps
grows with the condition number (small eigenvalues of ``A`` converge slowly), so ill-conditioned inputs need
more iterations.

``torch.func``: inside a transform (``grad``, ``vmap``, ``jacrev``: per-sample gradients) the ops run as an
``autograd.Function`` with ``setup_context`` and a generated vmap rule (:func:`_func_transform_function`), the
same forward values and backward formulas: torch refuses the custom ops' registered
autograd there ("it must override the setup_context staticmethod", pytorch/pytorch#168393).

Monitor
-------
``ConditionMonitor`` (an ``nn.Module`` whose state lives in buffers, so ``state_dict`` / ``load_state_dict`` carry
it): ``update(eigenvalues)`` records ``kappa = lambda_max / lambda_min``.
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as _fwad
import torch.fx
from torch import Tensor, nn

from orthofx.errors import LayerArgumentError, layer_label
from orthofx.nn.precision import HALF_PRECISION, autocast_enabled, autocast_off
from orthofx.nn.tracing import (ForwardModeRefusal, FuncTransformRefusal, fx_tracer_of, in_func_transform,
                                record_as_leaf, recomputing_in_backward)
from orthofx.theory import _flag, _positive_int, _real

__all__ = [
    "eigh_stable",
    "svd_stable",
    "sqrtm_newton_schulz",
    "inv_sqrtm_newton_schulz",
    "ConditionMonitor",
    "pair_kernel",
]


# ------------------------------------------------------------------------------------------- the K kernel


def _floor(absmax: Tensor) -> Tensor:
    """Smallest denominator allowed: eps * max|lambda| per matrix, at least sqrt(tiny); shape [..., 1, 1]. The
    callers hand it spectra scaled to a maximum near 1 (:func:`_power_of_two_scale`), where sqrt(tiny) decides
    nothing but for (near-)zero matrices."""
    info = torch.finfo(absmax.dtype)
    return (absmax * info.eps).clamp_min(math.sqrt(info.tiny)).unsqueeze(-1).unsqueeze(-1)


def _amax_last(x: Tensor) -> Tensor:
    """``x.amax(-1)``, and zeros for an empty last dimension (0 x 0 matrices, an SVD of a matrix with a zero
    dimension), where ``amax`` raises: such matrices have no pair, the floor is never used."""
    return x.amax(-1) if x.shape[-1] else x.new_zeros(x.shape[:-1])


def _geometric_sum(r: Tensor, order: int, inplace: bool) -> Tensor:
    """``sum_{k=0..order} r^k`` for ``0 <= r <= 1`` in O(log order) tensor ops and without cancellation (no
    ``(1 - r^(T+1)) / (1 - r)``): ``S_T(r) = (1 + r) S_{(T-1)/2}(r^2)`` for odd ``T``, ``1 + r S_{T-1}(r)`` for even.
    ``r`` itself is never modified."""
    return _geometric(r, order, inplace, False)


def _geometric(r: Tensor, order: int, inplace: bool, owned: bool) -> Tensor:
    # owned: r is a temporary of this recursion and may be overwritten (in-place mode only)
    if order == 0:
        return torch.ones_like(r)
    if order == 1:
        return r.add_(1.0) if (inplace and owned) else r + 1.0
    if order % 2 == 1:
        inner = _geometric(r * r, (order - 1) // 2, inplace, True)
        return inner.addcmul_(inner, r) if inplace else torch.addcmul(inner, inner, r)
    inner = _geometric(r, order - 1, inplace, False)  # r is still needed below
    return inner.mul_(r).add_(1.0) if inplace else torch.addcmul(r.new_ones(()), r, inner)


def _pair_magnitude(lam: Tensor, taylor_order: int | None, clamp_gap: float | Tensor | None) -> Tensor:
    """Symmetric ``|K[..., i, j]|`` (the diagonal is meaningless); ``clamp_gap`` may also be a tensor of shape
    ``[..., 1, 1]`` (one gap per matrix, the SVD's rescaled one). Uses in-place ops on its own temporaries
    unless grad mode is on (a double backward), where it stays out-of-place and differentiable: on CPU every
    temporary of a large batch is a fresh mmap with page faults, which dominates at small sizes."""
    inplace = not torch.is_grad_enabled()
    absl = lam.abs()
    floor = _floor(_amax_last(absl))
    if clamp_gap is None:
        floor_gap = floor
    else:
        floor_gap = floor.clamp_min(clamp_gap if isinstance(clamp_gap, Tensor) else float(clamp_gap))
    # exact magnitude 1/|lam_j - lam_i|, the gap clamped from below
    gap = lam.unsqueeze(-2) - lam.unsqueeze(-1)
    if inplace:
        mag = gap.abs_().clamp_min_(floor_gap).reciprocal_()
    else:
        mag = gap.abs().clamp_min(floor_gap).reciprocal()
    if taylor_order is None:
        return mag
    ai, aj = absl.unsqueeze(-1), absl.unsqueeze(-2)
    big, small = torch.maximum(ai, aj), torch.minimum(ai, aj)
    if inplace:
        inv_big = big.clamp_min_(floor).reciprocal_()
        ratio = small.mul_(inv_big)
    else:
        inv_big = big.clamp_min(floor).reciprocal()
        ratio = small * inv_big
    series = _geometric_sum(ratio, int(taylor_order), inplace)
    # same signs: the truncated series of positive terms, below the exact value; opposite signs (or a zero):
    # the exact value 1/(|a| + |b|) <= 1/|a| <= the series; the minimum picks each case's value
    if inplace:
        return torch.minimum(series.mul_(inv_big), mag, out=mag)
    return torch.minimum(series * inv_big, mag)


def _power_of_two_scale(values: Tensor) -> Tensor:
    """``c [..., 1]``: a power of two with ``max(values) < c <= 2 max(values)`` per matrix (``values >= 0``: the
    singular values, or the eigenvalues' magnitudes), but at least ``2^-37`` in float32 (``2^-456`` in float64: the
    power of two above ``4 sqrt(tiny) / eps``), 1 for a zero matrix, and at most the dtype's largest power of two
    (``2 max`` is inf above 1.7e38 in float32, and ``values / c`` was 0). The backward kernels are built from
    ``values / c``, whose largest entry lies in ``[1/2, 1)``: the floor ``eps * max`` then decides every clamp,
    never the absolute ``sqrt(tiny)`` (which clamped every gap of a float32 matrix scaled by 1e-20), and dividing
    the result by ``c`` (``c^2``) is exact. The lower bound keeps the kernels finite for (near-)zero matrices (see
    "Tiny and huge matrices" in the module docstring). A constant of the backward: not differentiated."""
    info = torch.finfo(values.dtype)
    _, exponent = torch.frexp(_amax_last(values.detach()))
    smallest = math.frexp(4 * math.sqrt(info.tiny) / info.eps)[1]
    largest = math.frexp(info.max)[1] - 1
    return torch.ldexp(values.new_ones(exponent.shape), exponent.clamp(smallest, largest)).unsqueeze(-1)


def _gap_in_scaled_units(clamp_gap: float | None, c: Tensor, power: int, dtype: torch.dtype) -> Tensor | None:
    """``clamp_gap / c^power`` as ``[..., 1, 1]`` in ``dtype`` (the user's gap in the units of the kernel built
    from ``values / c``), computed in float64: ``c^2`` may overflow float32, and a float32 clamp_gap above 3.4e38
    is still valid here."""
    if clamp_gap is None:
        return None
    gap = torch.full_like(c.unsqueeze(-1), float(clamp_gap), dtype=torch.float64)
    for _ in range(power):  # one division at a time: c^2 may overflow even float64
        gap = gap / c.unsqueeze(-1)
    return gap.to(dtype)


def _scaled_pair_magnitude(lam: Tensor, taylor_order: int | None, clamp_gap: float | None) -> Tensor:
    """:func:`_pair_magnitude` of ``lam`` built from ``lam / c`` (:func:`_power_of_two_scale` of ``|lam|``) and
    divided by ``c``: the same values where ``max|lam|`` is of normal size (bit for bit: the scaling is exact), and
    the relative floor ``eps * max|lam|`` instead of the absolute ``sqrt(tiny)`` for tiny spectra (a float32
    matrix at scale 1e-20 had every gap clamped, the gradient 44-99 % off). Differentiable (``c`` is a constant)
    when grad mode is on, in place on its own temporaries otherwise, as :func:`_pair_magnitude`."""
    c = _power_of_two_scale(lam.abs())
    mag = _pair_magnitude(lam / c, taylor_order, _gap_in_scaled_units(clamp_gap, c, 1, lam.dtype))
    c = c.unsqueeze(-1)
    return mag.div_(c) if not torch.is_grad_enabled() else mag / c


def pair_kernel(lam: Tensor, taylor_order: int | None = 9, clamp_gap: float | None = None,
                descending: bool = False) -> Tensor:
    """``K[..., i, j] ~ 1 / (lam_j - lam_i)`` (zero diagonal, antisymmetric, always finite) as described in the
    module docstring. ``lam`` holds sorted eigenvalues, ascending unless ``descending``; the order only decides
    the sign at exact ties (+ above the diagonal for ascending, - for descending)."""
    taylor_order, clamp_gap = _check_args(taylor_order, clamp_gap)
    upper = _scaled_pair_magnitude(lam, taylor_order, clamp_gap).triu(1)
    return upper.mT - upper if descending else upper - upper.mT


def _check_input(A, what: str, square: bool, complex_ok: bool = False) -> None:
    """A real floating-point tensor of (batched) matrices, square for eigh. Anything else used to fail late and far
    from the call: a 1-D input with an IndexError, an integer one inside LAPACK, a non-square one with
    ``linalg.eigh``'s message, and a complex one (which the backward formulas do not cover) returned complex
    eigenvalues and crashed in the backward. A torch.fx Proxy (symbolic tracing) is let through. ``complex_ok``:
    complex matrices too (the Newton-Schulz powers are matmuls, right for a Hermitian positive definite one)."""
    if isinstance(A, torch.fx.Proxy):
        return
    if not isinstance(A, Tensor):
        raise LayerArgumentError(f"{what} expects a torch.Tensor of matrices [..., m, n], got {type(A).__name__}")
    if complex_ok and not A.is_floating_point() and not A.is_complex():
        raise LayerArgumentError(f"{what} supports floating-point matrices only (real, or complex Hermitian), got "
                                 f"dtype {A.dtype}: cast it with .double() or .float() (a root of an integer "
                                 "matrix is no integer matrix)")
    if not complex_ok and (A.is_complex() or not A.is_floating_point()):
        raise LayerArgumentError(f"{what} supports real floating-point matrices only, got dtype {A.dtype}. Cast "
                                 "integer ones with .float(); for complex ones call torch.linalg's own function, "
                                 "and where the svd_conditioning pass put this stand-in in place of that call, "
                                 "leave the site out of the rule (match.exclude), whose stable backward covers "
                                 "real matrices only")
    if A.dim() < 2 or (square and A.shape[-1] != A.shape[-2]):
        kind = "square matrices [..., n, n]" if square else "matrices [..., m, n]"
        raise LayerArgumentError(f"{what} expects {kind}, got shape {tuple(A.shape)}")


def _forward_mode_error(what: str) -> ForwardModeRefusal:
    """The error for a forward-mode derivative of a stable decomposition (see :func:`_refuse_forward_mode`)."""
    return ForwardModeRefusal(
        f"{what}: forward-mode AD (torch.func.jvp, jacfwd, hessian = jacfwd(jacrev) / torch.autograd.forward_ad) is "
        "not supported: the bounded gradient is a backward formula, and the custom op would get a zero tangent; "
        "use reverse mode (torch.autograd.grad, .backward(), torch.func.jacrev; second derivatives by "
        "jacrev(jacrev) or torch.autograd.functional.hessian), or plain=True (torch.linalg, exact forward mode)")


def _refuse_forward_mode(A, what: str) -> None:
    """The custom ops have a backward formula only, and torch gives a custom op without a forward-mode formula a
    zero tangent (``torch.func.jvp``) or none (``torch.autograd.forward_ad``) instead of an error: a JVP through
    the decomposition silently treated it as a constant. Raise instead (``NotImplementedError``, the usual signal
    of a missing forward-mode formula, on which orthofx's Jacobian estimate falls back to reverse mode).

    Inside a ``torch.func`` transform the ops run as :func:`_func_transform_function`'s ``autograd.Function``,
    whose ``jvp`` raises this error itself, at whatever level the tangent is: the check here sees only the
    innermost level (``hessian``'s forward level lies under ``jacrev``'s and torch raised its own "You must
    implement the jvp function"), and under ``vmap`` it failed itself ("Batching rule not implemented for
    aten::_unpack_dual")."""
    if (isinstance(A, Tensor) and not torch.compiler.is_compiling() and not in_func_transform()
            and _fwad.unpack_dual(A).tangent is not None):
        raise _forward_mode_error(what)


def _check_args(taylor_order, clamp_gap) -> tuple[int | None, float | None]:
    """``(taylor_order, clamp_gap)`` as a Python int and float (or None): numpy's and 0-d tensors' numbers too, as
    torch.nn layers take them (``np.int64(9)`` read from an array was refused), never a bool (``clamp_gap=True``
    passed as a gap of 1). The custom ops take Python numbers only."""
    if taylor_order is not None:
        try:
            taylor_order = _positive_int(taylor_order, "taylor_order", LayerArgumentError, minimum=0)
        except LayerArgumentError:
            raise LayerArgumentError(f"taylor_order must be None (exact gradient) or an int >= 0, got "
                                     f"{taylor_order!r}") from None
    if clamp_gap is not None:
        gap = _real(clamp_gap)
        if gap is None or not gap > 0:  # NaN too
            raise LayerArgumentError(f"clamp_gap must be None or a float > 0, got {clamp_gap!r}")
        clamp_gap = gap
    return taylor_order, clamp_gap


def _flags(what: str, float64, plain) -> tuple[bool, bool]:
    """``float64`` and ``plain`` as bools (:func:`orthofx.theory._flag`): read by truthiness, ``plain="no"`` switched
    the bounded gradient off and ``float64="no"`` computed in float64, and a tensor flag failed with torch's
    "Boolean value of Tensor" error."""
    return (_flag(float64, f"{what}: float64", LayerArgumentError),
            _flag(plain, f"{what}: plain", LayerArgumentError))


def _working_dtypes(A: Tensor, float64: bool) -> tuple[torch.dtype, torch.dtype]:
    """(dtype the decomposition runs in, dtype it returns). Half-precision inputs (what ``torch.autocast`` hands
    over after a bfloat16 matmul) are decomposed in float32 (LAPACK and cuSOLVER have no half kernels, and
    bfloat16's 8-bit mantissa would swamp the condition number); the result stays float32 under autocast, like
    autocast's own float32 ops, and is cast back to the input's dtype outside it."""
    if not isinstance(A, Tensor):  # a torch.fx Proxy: its dtype is unknown at trace time, keep the plain call
        return (torch.float64 if float64 else None), None
    if A.dtype in HALF_PRECISION:
        returned = torch.float32 if autocast_enabled(A.device.type) else A.dtype
        return (torch.float64 if float64 else torch.float32), returned
    return (torch.float64 if float64 else A.dtype), A.dtype


def _run_in(op, A: Tensor, work: torch.dtype | None, returned: torch.dtype | None, *args) -> tuple[Tensor, ...]:
    out = op(A if work is None else A.to(work), *args)
    n = 2 if op in (_eigh_op, _eigh_plain, _eigh_function) else 3  # index, not iterate: under fx ``out`` is a Proxy
    if returned is None:  # traced: cast back to the input's dtype only when float64 was asked for
        return tuple(out[i] if work is None else out[i].to(A.dtype) for i in range(n))
    return tuple(out[i].to(returned) for i in range(n))


# ------------------------------------------------------------------------------------------- eigh


def _finite_part(A: Tensor, uplo: str | None = None, sync: bool = True) -> tuple[Tensor, Tensor | None]:
    """``(A', bad)``: ``A`` with every matrix holding a NaN/inf (in the triangle eigh reads for ``uplo`` "L" or
    "U") replaced by the identity (``m x n``), and the mask of those matrices (shape ``A.shape[:-2]``). With
    ``sync`` (inside the custom ops' kernels) ``(A, None)`` when all are finite, which costs a host sync;
    ``sync=False`` always substitutes, with tensor ops only (for code that torch.compile traces). LAPACK raises
    on such matrices (with a misleading "ill-conditioned" message for eigh), so the kernels decompose the
    identity instead and give the affected matrices NaN outputs (see "Non-finite inputs" in the module
    docstring)."""
    if sync and bool(torch.isfinite(A.sum(dim=(-2, -1))).all()):
        return A, None  # a NaN or inf entry makes the sum non-finite: no matrix has one (one reduction)
    nonfinite = ~torch.isfinite(A)
    if uplo is not None:
        nonfinite = nonfinite.tril() if uplo == "L" else nonfinite.triu()
    bad = nonfinite.any(dim=-1).any(dim=-1)
    if sync and not bool(bad.any()):
        return A, None  # the sum overflowed, or the non-finite entries are in the triangle eigh ignores
    eye = torch.eye(A.shape[-2], A.shape[-1], dtype=A.dtype, device=A.device)
    return torch.where(bad.unsqueeze(-1).unsqueeze(-1), eye, A), bad


def _nan_where(bad: Tensor | None, *outputs: Tensor) -> tuple[Tensor, ...]:
    """Fill the outputs of the matrices flagged in ``bad`` with NaN (values ``[..., k]``, factors ``[..., m, k]``)."""
    if bad is None:
        return outputs
    filled = []
    for out in outputs:
        mask = bad.reshape(bad.shape + (1,) * (out.dim() - bad.dim()))
        filled.append(out.masked_fill(mask, float("nan")))
    return tuple(filled)


@torch.library.custom_op("orthofx::eigh_stable", mutates_args=())
def _eigh_op(A: Tensor, taylor_order: int | None, clamp_gap: float | None, uplo: str = "L") -> tuple[Tensor, Tensor]:
    if A.dtype in HALF_PRECISION:
        # only a graph that holds the op itself (fx tracing keeps the plain call, which cannot see the dtype)
        # hands half precision to the kernel: decompose in float32 (no half LAPACK / cuSOLVER kernel), return
        # the input's dtype as the fake kernel says; the backward runs in float32 too (_without_autocast)
        return tuple(t.to(A.dtype) for t in _eigh_op(A.float(), taylor_order, clamp_gap, uplo))
    A, bad = _finite_part(A, uplo)
    # UPLO is LAPACK's: eigh of the transposed lower triangle is the same matrix, but its eigenvectors can come
    # with other signs, and a model's later layers were trained on torch's signs
    L, V = torch.linalg.eigh(A, UPLO=uplo)
    # LAPACK's V is column-major; the fake kernel promises row-major
    return _nan_where(bad, L, V.contiguous())


def _eigh_plain(A: Tensor, taylor_order: int | None, clamp_gap: float | None,
                uplo: str = "L") -> tuple[Tensor, Tensor]:
    """The op's forward in plain torch operations (no host sync, no gradient kernel): what frozen models run, so
    that an exported program holds ``linalg_eigh`` and needs no orthofx to load."""
    A, bad = _finite_part(A, uplo, sync=False)
    L, V = torch.linalg.eigh(A, UPLO=uplo)
    return _nan_where(bad, L, V)


@_eigh_op.register_fake
def _eigh_fake(A: Tensor, taylor_order: int | None, clamp_gap: float | None,
               uplo: str = "L") -> tuple[Tensor, Tensor]:
    torch._check(A.shape[-1] == A.shape[-2], lambda: "eigh_stable expects square matrices")
    return A.new_empty(A.shape[:-1]), torch.empty_like(A, memory_format=torch.contiguous_format)


def _eigh_setup(ctx, inputs, output) -> None:
    taylor_order, clamp_gap = inputs[1:3]
    L, V = output
    ctx.save_for_backward(L, V)
    ctx.taylor_order = taylor_order
    ctx.clamp_gap = clamp_gap


def _in_working_dtype(saved: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The saved outputs in the backward's working dtype: float32 for half-precision ones (a traced
    graph's plain op call on half-precision input, see _eigh_op)."""
    return tuple(t.float() if t.dtype in HALF_PRECISION else t for t in saved)


def _without_autocast(backward):
    """Run a backward in the saved tensors' dtype (float32 for half-precision ones, the gradient cast back to
    theirs) with autocast off: called inside ``torch.autocast`` (a training loop that calls ``backward()`` in the
    autocast block), matmuls would otherwise drop to bfloat16 and clash with the float32 buffers, and the
    gradient of a decomposition needs float32 anyway. ``backward(ctx, saved, *grads)`` gets the saved tensors
    (:func:`_in_working_dtype`) from here: ``ctx.saved_tensors`` is read once per backward, since non-reentrant
    activation checkpointing refuses a second unpack of the same saved tensor."""

    def wrapped(ctx, *grads):
        saved = ctx.saved_tensors
        reference = saved[0]
        work = torch.float32 if reference.dtype in HALF_PRECISION else reference.dtype
        grads = tuple(g if g is None else g.to(work) for g in grads)
        with autocast_off(reference):
            gA, *rest = backward(ctx, _in_working_dtype(saved), *grads)
        return (gA if gA is None else gA.to(reference.dtype), *rest)

    wrapped.__name__ = backward.__name__
    wrapped.__doc__ = backward.__doc__
    return wrapped


@_without_autocast
def _eigh_backward(ctx, saved, gL, gV):
    L, V = saved
    if gV is None and gL is None:
        return None, None, None, None
    inplace = not torch.is_grad_enabled()
    # With U = triu(|K|, 1) (so K = U - U^T for ascending eigenvalues) and P = U o (X - X^T), X = V^T gV:
    # K o skew(X) = (P + P^T) / 2, hence dA = (G + G^T) / 2 with G = V (P + diag(gL)) V^T.
    if gV is None:
        G = V @ torch.diag_embed(gL) @ V.mT
        return (G + G.mT) * 0.5, None, None, None
    if inplace:
        try:
            return _eigh_backward_in_place(L, V, gL, gV, ctx.taylor_order, ctx.clamp_gap), None, None, None
        except RuntimeError:
            # vmap over the backward (torch.autograd.grad(is_grads_batched=True), jacobian(vectorize=True)):
            # batched gradients cannot be written into unbatched buffers, nor matmul(out=) be batched, and the
            # batching is not visible from Python; the out-of-place form below works there
            pass
    X = V.mT @ gV
    Q = X - X.mT
    # differentiable (double backward)
    Q = Q * _scaled_pair_magnitude(L, ctx.taylor_order, ctx.clamp_gap).triu(1)
    if gL is not None:
        Q = Q + torch.diag_embed(gL)
    G = V @ Q @ V.mT
    return (G + G.mT) * 0.5, None, None, None


def _eigh_backward_in_place(L: Tensor, V: Tensor, gL: Tensor | None, gV: Tensor, taylor_order, clamp_gap) -> Tensor:
    """:func:`_eigh_backward`'s ``dA`` with in-place ops and buffer reuse (fewer n x n temporaries); writes only
    its own temporaries."""
    X = V.mT @ gV
    Q = X - X.mT
    Q.mul_(_scaled_pair_magnitude(L, taylor_order, clamp_gap).triu_(1))
    if gL is not None:
        Q.diagonal(dim1=-2, dim2=-1).add_(gL)
    torch.matmul(V, Q, out=X)
    torch.matmul(X, V.mT, out=Q)
    return torch.add(Q, Q.mT, out=X).mul_(0.5)


torch.library.register_autograd("orthofx::eigh_stable", _eigh_backward, setup_context=_eigh_setup)


# ------------------------------------------------------------------------------------------- torch.func


def _func_transform_function(plain, setup_context, backward, name: str,
                             what: str) -> type[torch.autograd.Function]:
    """A stable decomposition as an ``autograd.Function`` with a separate ``setup_context`` and a vmap rule, for
    calls inside ``torch.func`` transforms (per-sample gradients: ``vmap(grad(functional_call))``). The custom
    op's registered autograd is a generated ``autograd.Function`` without ``setup_context``, which ``torch.func``
    refuses ("it must override the setup_context staticmethod", pytorch/pytorch#168393). Same forward values
    (``plain``, the host-sync-free form: a vmapped kernel cannot branch on data) and the same backward formula as
    the op; its ``jvp`` raises :func:`_forward_mode_error` (``what``: the op's name), as the op does outside the
    transforms.

    The vmap rule moves the vmapped dimension to the front, where the decompositions batch anyway, and applies the
    function again one level down. A generated rule (``generate_vmap_rule``) would also vmap the ``jvp``, and
    torch's generated vmapped ``jvp`` fails before calling it ("flat_bdims must not be None", a forward-mode
    derivative of a vmapped call, ``jacfwd(vmap(f))``), so the refusal never came."""

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(A, *options):
            return plain(A, *options)

        @staticmethod
        def vmap(info, in_dims, A, *options):
            outputs = Function.apply(A.movedim(in_dims[0], 0), *options)
            return outputs, (0,) * len(outputs)

        @staticmethod
        def jvp(ctx, *tangents):
            raise _forward_mode_error(what)

    Function.setup_context = staticmethod(setup_context)
    Function.backward = staticmethod(backward)
    Function.__name__ = Function.__qualname__ = name
    return Function


_EighFunction = _func_transform_function(_eigh_plain, _eigh_setup, _eigh_backward, "_EighFunction",
                                         "eigh_stable")


def _eigh_function(A: Tensor, taylor_order: int | None, clamp_gap: float | None,
                   uplo: str = "L") -> tuple[Tensor, Tensor]:
    return _EighFunction.apply(A, taylor_order, clamp_gap, uplo)


def eigh_stable(A: Tensor, taylor_order: int | None = 9, float64: bool = False,
                clamp_gap: float | None = None, *, plain: bool = False, uplo: str = "L") -> tuple[Tensor, Tensor]:
    """Eigendecomposition of symmetric ``A`` (``[..., n, n]``) with a bounded gradient.

    Returns ``(eigenvalues [..., n] ascending, eigenvectors [..., n, n] in columns)`` like
    ``torch.linalg.eigh``. ``taylor_order=None`` gives the exact gradient (gap-clamped); an int ``T`` gives
    P4's Taylor form of order ``T``; ``clamp_gap`` bounds every ``|K_ij|`` by ``1/clamp_gap``;
    ``float64=True`` computes in float64 and casts back. Half-precision input (bfloat16 / float16, e.g. under
    ``torch.autocast``) is decomposed in float32; the outputs are float32 under autocast and the input's dtype
    otherwise. See the module docstring for the formulas. ``plain=True``: the same values from plain torch
    operations, with torch's own gradient instead of the bounded one (what :func:`orthofx.freeze` writes: an
    exported frozen model then needs no orthofx to load). ``uplo`` (``"L"`` or ``"U"``, torch's ``UPLO``): the
    triangle of ``A`` that is read; the eigenvectors' signs are torch's for the same ``UPLO``.

    >>> import torch
    >>> from orthofx.nn import eigh_stable
    >>> A = torch.diag(torch.tensor([1.0, 1.0, 2.0])).requires_grad_()   # a repeated eigenvalue
    >>> values, vectors = eigh_stable(A)
    >>> values.detach()
    tensor([1., 1., 2.])
    >>> (vectors.sum() + values.sum()).backward()
    >>> bool(A.grad.isfinite().all())                          # torch.linalg.eigh's is NaN here
    True
    """
    _check_input(A, "eigh_stable", square=True)
    taylor_order, clamp_gap = _check_args(taylor_order, clamp_gap)
    float64, plain = _flags("eigh_stable", float64, plain)
    if uplo not in ("L", "U"):
        raise LayerArgumentError(f"eigh_stable: uplo must be 'L' or 'U' (the triangle of A that is read), got "
                                 f"{uplo!r}")
    if not plain:
        _refuse_forward_mode(A, "eigh_stable")
    clamp = None if clamp_gap is None else float(clamp_gap)
    work, returned = _working_dtypes(A, float64)
    op = _eigh_plain if plain else (_eigh_function if in_func_transform() else _eigh_op)
    L, V = _run_in(op, A, work, returned, taylor_order, clamp, uplo)
    return L, V


# ------------------------------------------------------------------------------------------- svd


@torch.library.custom_op("orthofx::svd_stable", mutates_args=())
def _svd_op(A: Tensor, taylor_order: int | None, clamp_gap: float | None) -> tuple[Tensor, Tensor, Tensor]:
    if A.dtype in HALF_PRECISION:  # a traced graph's plain op call, as in _eigh_op
        return tuple(t.to(A.dtype) for t in _svd_op(A.float(), taylor_order, clamp_gap))
    A, bad = _finite_part(A)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return _nan_where(bad, U.contiguous(), S, Vh.contiguous())


def _svd_plain(A: Tensor, taylor_order: int | None, clamp_gap: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """The op's forward in plain torch operations, like :func:`_eigh_plain`."""
    A, bad = _finite_part(A, sync=False)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return _nan_where(bad, U, S, Vh)


@_svd_op.register_fake
def _svd_fake(A: Tensor, taylor_order: int | None, clamp_gap: float | None) -> tuple[Tensor, Tensor, Tensor]:
    m, n = A.shape[-2], A.shape[-1]
    k = min(m, n)
    batch = A.shape[:-2]
    return (A.new_empty((*batch, m, k)), A.new_empty((*batch, k)), A.new_empty((*batch, k, n)))


def _svd_setup(ctx, inputs, output) -> None:
    _, taylor_order, clamp_gap = inputs
    U, S, Vh = output
    ctx.save_for_backward(U, S, Vh)
    ctx.taylor_order = taylor_order
    ctx.clamp_gap = clamp_gap


@_without_autocast
def _svd_backward(ctx, saved, gU, gS, gVh):
    U, S, Vh = saved
    if gU is None and gS is None and gVh is None:
        return None, None, None
    if not torch.is_grad_enabled():
        try:
            return _svd_grad(U, S, Vh, gU, gS, gVh, ctx.taylor_order, ctx.clamp_gap, True), None, None
        except RuntimeError:  # vmap over the backward, see _eigh_backward: the out-of-place form works there
            pass
    return _svd_grad(U, S, Vh, gU, gS, gVh, ctx.taylor_order, ctx.clamp_gap, False), None, None


def _svd_grad(U, S, Vh, gU, gS, gVh, taylor_order, clamp_gap, inplace: bool) -> Tensor:
    """:func:`_svd_backward`'s ``dA``; ``inplace``: with in-place ops on its own temporaries (not differentiable)."""
    m, n, k = U.shape[-2], Vh.shape[-1], S.shape[-1]
    inner = torch.diag_embed(gS) if gS is not None else None
    XU = XV = None
    c = _power_of_two_scale(S)
    Sc = S / c
    if gU is not None or gVh is not None:
        # K o S with K_jk ~ 1/(s_k^2 - s_j^2) is (K' / c) o (S / c) with K' built from (S / c)^2: for a power of two
        # c >= max(S) the squares cannot overflow (S * S was inf for s > 1.8e19 in float32, 1.3e154 in float64,
        # and K NaN) nor fall below the floor's sqrt(tiny); the result is the same (c is exact, the floor scales)
        upper = _pair_magnitude(Sc * Sc, taylor_order, _gap_in_scaled_units(clamp_gap, c, 2, S.dtype)).triu(1)
        K = (upper.mT - upper) / c.unsqueeze(-1)  # K'_jk / c, singular values descending
        if gU is not None:
            XU = U.mT @ gU
            T = XU - XU.mT
            T = T.mul_(K).mul_(Sc.unsqueeze(-2)) if inplace else T * K * Sc.unsqueeze(-2)
            inner = T if inner is None else (inner.add_(T) if inplace else inner + T)
        if gVh is not None:
            XV = Vh @ gVh.mT  # V^T dV with V = Vh^T, dV = dVh^T
            T = XV - XV.mT
            T = T.mul_(K).mul_(Sc.unsqueeze(-1)) if inplace else T * K * Sc.unsqueeze(-1)
            inner = T if inner is None else (inner.add_(T) if inplace else inner + T)
    gA = U @ inner @ Vh
    if (gU is not None and m > k) or (gVh is not None and n > k):
        # 1 / S with the floor of S / c (eps * max(S) for max(S) above 2^-77 = 6.6e-24 in float32, c sqrt(tiny)
        # below: c stops at 2^-37 and sqrt(tiny) = 2^-63 then exceeds eps * max(S) / c), as for
        # K o S: the floor of S itself, sqrt(tiny), clamped every singular value of a float32 matrix at 1e-20 (the
        # gradient 57-83 % off for a 6 x 4 one); the same values at normal scale
        s_inv = S.clamp_min(_floor(_amax_last(Sc)).squeeze(-1) * c).reciprocal()
        if gU is not None and m > k:
            gA = gA + ((gU - U @ XU) * s_inv.unsqueeze(-2)) @ Vh
        if gVh is not None and n > k:
            gA = gA + (U * s_inv.unsqueeze(-2)) @ (gVh - XV.mT @ Vh)
    return gA


torch.library.register_autograd("orthofx::svd_stable", _svd_backward, setup_context=_svd_setup)


_SvdFunction = _func_transform_function(_svd_plain, _svd_setup, _svd_backward, "_SvdFunction",
                                        "svd_stable")


def _svd_function(A: Tensor, taylor_order: int | None, clamp_gap: float | None) -> tuple[Tensor, Tensor, Tensor]:
    return _SvdFunction.apply(A, taylor_order, clamp_gap)


def svd_stable(A: Tensor, taylor_order: int | None = 9, float64: bool = False,
               clamp_gap: float | None = None, *, plain: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Reduced SVD ``A = U diag(S) Vh`` of a real ``[..., m, n]`` matrix with a bounded gradient.

    Same arguments as :func:`eigh_stable` (``plain`` too); the gradient kernel is built from ``S**2`` (the
    eigenvalues of ``A^T A``). See the module docstring for the formulas.

    >>> import torch
    >>> from orthofx.nn import svd_stable
    >>> A = torch.linalg.qr(torch.randn(4, 3)).Q.requires_grad_()   # all singular values equal 1
    >>> U, S, Vh = svd_stable(A)
    >>> torch.allclose(U @ torch.diag(S) @ Vh, A, atol=1e-6)
    True
    >>> (U.sum() + Vh.sum()).backward()
    >>> bool(A.grad.isfinite().all())                          # torch.linalg.svd's is NaN / inf here
    True
    """
    _check_input(A, "svd_stable", square=False)
    taylor_order, clamp_gap = _check_args(taylor_order, clamp_gap)
    float64, plain = _flags("svd_stable", float64, plain)
    if not plain:
        _refuse_forward_mode(A, "svd_stable")
    clamp = None if clamp_gap is None else float(clamp_gap)
    work, returned = _working_dtypes(A, float64)
    op = _svd_plain if plain else (_svd_function if in_func_transform() else _svd_op)
    U, S, Vh = _run_in(op, A, work, returned, taylor_order, clamp)
    return U, S, Vh


# ------------------------------------------------------------------------------------------- Newton-Schulz


def _zero_matrices(A: Tensor) -> Tensor:
    """``[..., 1, 1]`` mask of the all-zero matrices of ``A``."""
    return (A == 0).all(-1, keepdim=True).all(-2, keepdim=True)


def _newton_schulz(A: Tensor, iterations: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(Y, Z, trace, zero)``: the coupled iteration on ``A / tr A`` (``Y -> (A / tr A)^(1/2)``,
    ``Z -> (A / tr A)^(-1/2)``), the trace and the ``[..., 1, 1]`` mask of all-zero matrices, in ``A``'s dtype."""
    n = A.shape[-1]
    trace = A.diagonal(dim1=-2, dim2=-1).sum(-1).unsqueeze(-1).unsqueeze(-1)  # [..., 1, 1]
    # A zero matrix is normalised by 1 instead of its trace 0 (then Y = 0, its square root), so no 0/0 reaches
    # the result or the gradient; sqrtm_newton_schulz masks it to exactly 0.
    zero = _zero_matrices(A)
    An = A / torch.where(zero, torch.ones_like(trace), trace)
    eye3 = 3.0 * torch.eye(n, dtype=A.dtype, device=A.device)
    Z = (eye3 - An) * 0.5
    Y = An @ Z
    for _ in range(iterations):
        ZY = (eye3 - Z @ Y) * 0.5
        Y = Y @ ZY
        Z = ZY @ Z
    return Y, Z, trace, zero


def _newton_schulz_power(A: Tensor, iterations: int, inverse: bool, what: str) -> Tensor:
    """``A^(1/2)`` (``A^(-1/2)`` when ``inverse``) from :func:`_newton_schulz`."""
    _check_input(A, what, square=True, complex_ok=True)
    try:  # numpy's and 0-d tensors' integers too; never a bool or a float
        iterations = _positive_int(iterations, "iterations", LayerArgumentError, minimum=0)
    except LayerArgumentError:
        raise LayerArgumentError(f"iterations must be an int >= 0, got {iterations!r}") from None
    work, returned = _working_dtypes(A, float64=False)
    if returned is not None and (work != A.dtype or autocast_enabled(A.device.type)):
        # bfloat16 matmuls would lose the iteration's accuracy: run it in float32 with autocast off; the trace
        # and the final scaling stay in float32 too (a float16 trace above 65504 was inf, and so was the result)
        with autocast_off(A):
            return _newton_schulz_power(A.to(work), iterations, inverse, what).to(returned)
    Y, Z, trace, zero = _newton_schulz(A, iterations)
    if inverse:
        return Z * trace.rsqrt()
    out = Y * torch.where(zero, torch.ones_like(trace), trace).sqrt()
    return torch.where(zero, torch.zeros_like(out), out)


def sqrtm_newton_schulz(A: Tensor, iterations: int = 5) -> Tensor:
    """``A^(1/2)`` of symmetric positive definite ``A`` (``[..., n, n]``) by the coupled Newton-Schulz iteration
    (matmuls only); ``iterations`` counts the steps after ``Y0, Z0`` (so ``iterations + 1`` steps in all).
    ``A`` is floating-point (half precision runs in float32), or complex Hermitian; an integer matrix raises
    :class:`~orthofx.errors.LayerArgumentError` (it was rounded to a float32 result).

    The zero matrix (the one positive semi-definite matrix of trace 0) gives exactly 0, with a zero gradient.

    >>> import torch
    >>> from orthofx.nn import sqrtm_newton_schulz
    >>> X = torch.randn(64, 4, dtype=torch.float64)
    >>> A = X.T @ X / 64 + 0.1 * torch.eye(4, dtype=torch.float64)    # a covariance, well conditioned
    >>> R = sqrtm_newton_schulz(A, iterations=10)
    >>> torch.allclose(R @ R, A, atol=1e-6), torch.allclose(R, R.T)
    (True, True)
    """
    return _newton_schulz_power(A, iterations, inverse=False, what="sqrtm_newton_schulz")


def inv_sqrtm_newton_schulz(A: Tensor, iterations: int = 5) -> Tensor:
    """``A^(-1/2)`` of symmetric positive definite ``A`` by the same iteration (``Z / sqrt(tr A)``), with the same
    dtypes as :func:`sqrtm_newton_schulz`; the zero matrix has none and gives non-finite values.

    >>> import torch
    >>> from orthofx.nn import inv_sqrtm_newton_schulz
    >>> X = torch.randn(64, 4, dtype=torch.float64)
    >>> A = X.T @ X / 64 + 0.1 * torch.eye(4, dtype=torch.float64)
    >>> W = inv_sqrtm_newton_schulz(A, iterations=10)          # ZCA whitening matrix
    >>> torch.allclose(W @ A @ W, torch.eye(4, dtype=torch.float64), atol=1e-6)
    True
    """
    return _newton_schulz_power(A, iterations, inverse=True, what="inv_sqrtm_newton_schulz")


# ------------------------------------------------------------------------------------------- monitor


class ConditionMonitor(nn.Module):
    """Records the condition number ``kappa = lambda_max / lambda_min`` of the matrix entering a site.

    An ``nn.Module`` so that its state is made of buffers (saved by ``state_dict``, moved by ``.to``) and it can
    sit in a GraphModule; it has no parameters. ``update(eigenvalues)`` (or calling the module) takes the
    eigenvalues ``[..., n]`` of one (batched) matrix; for a batch the recorded value is the largest kappa in it.
    ``kappa`` is ``inf`` when ``lambda_min <= 0`` (< ``lambda_max``) and NaN when the eigenvalues hold a NaN.

    Buffers: ``last`` (the latest kappa), ``running_max`` (largest kappa seen, NaN ignored), ``updates`` (number
    of calls), ``nan_events`` (calls whose eigenvalues held a NaN), ``inf_events`` (calls whose eigenvalues held
    an inf, or with an infinite kappa), ``history_buffer`` (ring of the last ``history_size`` kappas; read it
    oldest first with :attr:`history`). Everything is computed with tensor ops (no host sync in ``update``).

    ``torch.fx.symbolic_trace`` records a monitor as one ``call_module`` node
    (:func:`orthofx.nn.tracing.record_as_leaf`: its update branches on shapes and writes its buffers); inside a
    ``torch.func`` transform the in-place writes cannot run and :meth:`update` raises
    :class:`~orthofx.errors.LayerArgumentError` naming the fixes.

    >>> import torch
    >>> from orthofx.nn import ConditionMonitor
    >>> monitor = ConditionMonitor(history_size=3)
    >>> monitor(torch.tensor([0.5, 1.0, 2.0]))                    # kappa = 2 / 0.5
    tensor(4., dtype=torch.float64)
    >>> _ = monitor(torch.tensor([[1.0, 10.0], [1.0, 2.0]]))      # a batch of two matrices: the worst kappa
    >>> monitor.summary()
    {'kappa': 10.0, 'kappa_max': 10.0, 'updates': 2, 'nan_events': 0, 'inf_events': 0}
    >>> monitor.history                                         # oldest first
    [4.0, 10.0]
    """

    def __init__(self, history_size: int = 1000) -> None:
        super().__init__()
        # the project's integer check (numpy / 0-d tensor integers too, as torch.nn takes them; never a bool, which
        # reached torch.full and raised a bare TypeError)
        self.history_size = _positive_int(history_size, f"{layer_label(self)}: history_size", LayerArgumentError)
        f64 = torch.float64
        self.register_buffer("last", torch.tensor(float("nan"), dtype=f64))
        self.register_buffer("running_max", torch.tensor(float("nan"), dtype=f64))
        self.register_buffer("updates", torch.tensor(0, dtype=torch.long))
        self.register_buffer("nan_events", torch.tensor(0, dtype=torch.long))
        self.register_buffer("inf_events", torch.tensor(0, dtype=torch.long))
        self.register_buffer("history_buffer", torch.full((history_size,), float("nan"), dtype=f64))

    def _apply(self, fn, recurse=True):
        """``.to(device)`` moves the buffers; a dtype conversion of the model (``model.half()``, ``.bfloat16()``,
        ``.to(torch.float16)``) leaves them float64: ``update`` writes float64 kappas into them (a float16 history
        made it raise), and a float16 kappa would saturate to inf above 65504."""
        kept = {name: buf for name, buf in self._buffers.items() if buf is not None and buf.dtype == torch.float64}
        result = super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers.get(name)
            if new is not None and new.dtype != torch.float64:
                self._buffers[name] = old.to(device=new.device)
        return result

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A history saved with another ``history_size`` is laid into this monitor's ring (the latest
        ``min(saved, history_size)`` kappas, where this ring would hold them after the saved ``updates``; entries
        the saved ring no longer held read NaN), instead of torch's size-mismatch error."""
        key, count_key = prefix + "history_buffer", prefix + "updates"
        saved = state_dict.get(key)
        if (isinstance(saved, torch.Tensor) and saved.dim() == 1 and saved.numel() != self.history_size
                and saved.numel() > 0 and isinstance(state_dict.get(count_key), torch.Tensor)):
            count = int(state_dict[count_key])
            size = saved.numel()
            start = count % size if count > size else 0
            ordered = torch.cat([saved[start:], saved[:start]])[:min(count, size)]  # oldest first
            kept = ordered[max(0, ordered.numel() - self.history_size):]
            ring = torch.full((self.history_size,), float("nan"), dtype=saved.dtype, device=saved.device)
            first = count - kept.numel()  # the update number of kept[0]
            positions = torch.arange(first, count, device=saved.device) % self.history_size
            ring[positions] = kept
            state_dict[key] = ring
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def summary(self) -> dict:
        """Plain numbers for reports: last and largest kappa (NaN before the first update), number of updates,
        NaN and inf events."""
        return {"kappa": float(self.last), "kappa_max": float(self.running_max), "updates": int(self.updates),
                "nan_events": int(self.nan_events), "inf_events": int(self.inf_events)}

    @staticmethod
    def kappa(eigenvalues: Tensor) -> Tensor:
        """``lambda_max / lambda_min`` per matrix (``inf`` when ``lambda_min <= 0``; NaN propagates)."""
        lam = eigenvalues.detach().to(torch.float64)
        lmax, lmin = lam.amax(-1), lam.amin(-1)
        kappa = lmax / lmin
        kappa = torch.where(lmin <= 0, torch.full_like(kappa, float("inf")), kappa)
        has_nan = lam.isnan().any(-1)
        return torch.where(has_nan, torch.full_like(kappa, float("nan")), kappa)

    def update(self, eigenvalues: Tensor) -> Tensor:
        """Record the (worst, over the batch) kappa of ``eigenvalues`` ``[..., n]`` and return it (0-dim); an empty
        batch or ``n = 0`` (0 x 0 matrices, which torch decomposes) records nothing and returns NaN. Activation
        checkpointing's recomputation of the forward during backward records nothing either (the forward did).
        Everything here is computed from the detached eigenvalues, so no ``torch.no_grad()`` region is needed, and
        none is opened unless the buffers themselves require grad (never in a traced graph): ``torch.export``
        writes one as a ``wrap_with_set_grad_enabled`` node that its own loader refused (``SpecViolationError: ...
        missing val field``), so a model calling a monitor could not be saved to ``.pt2``."""
        if not isinstance(eigenvalues, Tensor):  # None or a list met a raw AttributeError on .dim()
            raise LayerArgumentError(f"{layer_label(self)}: update takes the eigenvalues of a (batch of) matrices as a "
                                     f"torch.Tensor of shape [..., n], got {type(eigenvalues).__name__}")
        if eigenvalues.dim() < 1:
            raise LayerArgumentError(f"expected eigenvalues of shape [..., n], got {tuple(eigenvalues.shape)}")
        if in_func_transform():
            # torch refuses the in-place buffer writes there ("attempted to call in-place operation ... that
            # would mutate a captured Tensor"), and under vmap one call sees one sample, not the batch
            raise FuncTransformRefusal(
                f"{layer_label(self)}: a condition-number monitor records into its buffers in place, which cannot "
                f"run inside a torch.func transform (vmap, grad, jacrev ... e.g. per-sample gradients of a "
                f"functional_call). Transform the model with the svd_conditioning option monitor: false, or put "
                f"orthofx.nn.conditioning.PassThrough() (what monitor.to_plain() returns) in the monitors' places "
                f"for the transformed call")
        lam = eigenvalues.detach().to(torch.float64)
        if lam.shape[-1] == 0:  # 0 x 0 matrices: no eigenvalue, no condition number
            return torch.full((), float("nan"), dtype=torch.float64, device=lam.device)
        k = self.kappa(lam).reshape(-1)
        if k.numel() == 0:  # an empty batch: no matrix, nothing to record
            return torch.full((), float("nan"), dtype=torch.float64, device=lam.device)
        has_nan = k.isnan().any()
        finite_max = torch.where(k.isnan(), torch.zeros_like(k), k).amax()
        worst = torch.where(has_nan, torch.full_like(k[0], float("nan")), finite_max)
        if recomputing_in_backward():  # activation checkpointing's recomputation: this call is recorded already
            return worst
        if any(b.requires_grad for b in self.buffers(recurse=False)):
            # buffers that require grad (float ones given to functional_call): the writes stay out of autograd, as
            # under the no_grad decorator before (a leaf's in-place write raised; a non-leaf's running_max carried
            # gradients through fmax). Never the case in a traced graph, which so gets no grad-mode region
            with torch.no_grad():
                self._record(lam, k, has_nan, worst)
        else:
            self._record(lam, k, has_nan, worst)
        return worst

    def _record(self, lam: Tensor, k: Tensor, has_nan: Tensor, worst: Tensor) -> None:
        self.nan_events += has_nan.long()
        self.inf_events += (lam.isinf().any() | k.isinf().any()).long()
        # through a one-element view: torch.compile (2.13, aot_eager and inductor) drops in-place writes into a 0-d
        # float64 buffer (last and running_max kept their eager values while the history moved on)
        self.last.view(1).copy_(worst.reshape(1))
        self.running_max.view(1).copy_(torch.fmax(self.running_max, worst).reshape(1))
        self.history_buffer.index_copy_(0, (self.updates % self.history_size).reshape(1), worst.reshape(1))
        self.updates += 1

    def forward(self, eigenvalues: Tensor) -> Tensor:
        tracer = fx_tracer_of((eigenvalues,))
        if tracer is not None:
            return record_as_leaf(self, tracer, (eigenvalues,), {},
                                  "its update branches on the eigenvalues' shape and writes its buffers in place")
        return self.update(eigenvalues)

    @property
    def history(self) -> list[float]:
        """The recorded kappas, oldest first (at most ``history_size``)."""
        count = int(self.updates)
        buf = self.history_buffer.tolist()
        if count <= self.history_size:
            return buf[:count]
        start = count % self.history_size
        return buf[start:] + buf[:start]

    def reset(self) -> None:
        """Forget every recorded kappa (the state of a new monitor)."""
        self.last.fill_(float("nan"))
        self.running_max.fill_(float("nan"))
        self.updates.zero_()
        self.nan_events.zero_()
        self.inf_events.zero_()
        self.history_buffer.fill_(float("nan"))

    def reset_parameters(self) -> None:
        """:meth:`reset`, under the name deferred initialisation calls (``to_empty()`` after building on the meta
        device leaves the buffers uninitialised: a garbage ``updates`` count, history and events; torch's own
        stateful layers, e.g. BatchNorm, reset their running statistics there too)."""
        self.reset()

    def extra_repr(self) -> str:
        return f"history_size={self.history_size}"
