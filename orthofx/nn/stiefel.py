"""The Stiefel manifold of matrices with orthonormal columns (or rows), as plain functions on tensors.

These are the building blocks of Riemannian training (P1) and of isometric initialisation; they know nothing of
graphs or optimizers and can be used on their own.

Convention (one rule for every function here)
---------------------------------------------
A matrix ``W`` of shape ``(m, n)`` is *orthonormal* when

* ``m >= n`` (tall or square): its columns are orthonormal, ``W^T W = I_n``;
* ``m < n`` (wide): its rows are orthonormal, ``W W^T = I_m``.

So a Linear weight ``(out, in)`` is column-orthonormal when ``out >= in`` (an isometry, ``|W x| = |x|``) and
row-orthonormal when ``out < in`` (a co-isometry, ``W^T`` is an isometry). The formulas below are written for
the tall case ``n x p`` with ``n >= p``; a wide matrix is transposed, treated as tall, and transposed back, which
is the same as working on the Stiefel manifold of its transpose.

Every function takes ``(..., m, n)`` tensors: leading dimensions are a batch (e.g. the groups of a grouped
convolution). A convolution weight ``(out, in, k, k)`` is therefore *not* a matrix to these functions: flatten it
first with :func:`flatten_weight`, which gives ``(out, in * k * k)`` (``(groups, out / groups, in_per_group * k
* k)`` for a grouped one), and undo it with :func:`unflatten_weight`. Orthonormality of that flattened matrix is
orthonormality of the kernel as a matrix ("kernel orthogonality"); it is orthogonality of the convolution
operator only for 1x1 and delta (centre-tap) kernels, see P0.

Formulas (P1)
-------------
* tangent space at ``W`` (tall, ``W^T W = I``): ``T_W = {xi : W^T xi + xi^T W = 0}``;
* tangent projection: ``P_W(G) = G - W sym(W^T G)``, ``sym(A) = (A + A^T) / 2``;
* polar retraction: ``R_W(xi) = (W + xi)(I + xi^T xi)^(-1/2)``;
* QR retraction: ``R_W(xi) = qf(W + xi)``, the Q factor with the signs chosen so that ``R``'s diagonal is
  positive (Cholesky QR on CUDA, Householder QR elsewhere: :func:`qr_retraction`);
* nearest orthonormal matrix (in Frobenius norm): the polar factor ``U V^T`` of ``W = U S V^T``.

The polar retraction is computed as the polar factor ``U V^T`` of ``A = W + xi``. For a tangent ``xi``,
``A^T A = I + xi^T xi`` because ``W^T xi`` is skew, so both expressions are the same matrix; the polar-factor form
is the stable one: its result is orthonormal to working precision whatever the round-off in ``W`` and ``xi`` (an
error in the tangency of ``xi`` does not accumulate from step to step, as it would with the explicit
``(I + xi^T xi)^(-1/2)`` factor). Three routes give the polar factor, the same matrix to working precision:

* Newton-Schulz, ``X_0 = A``, ``X_{k+1} = X_k (3 I - X_k^T X_k) / 2``: it keeps ``A``'s singular vectors and
  maps each singular value ``sigma`` to ``sigma (3 - sigma^2) / 2``, so with ``delta = sigma^2 - 1`` the error
  goes to ``-(3/4) delta^2 + delta^3 / 4``: quadratic convergence. An optimizer step makes ``delta =
  s_i^2`` small (``s_i`` the singular values of ``xi``), so two or three iterations, all matrix products,
  reach working precision. Used when ``||A^T A - I||_F <= 1/2``; the iteration stops once that error is below
  ``sqrt(eps)`` of the dtype, after one more iteration (which squares it).
* otherwise (a far-from-orthonormal matrix, e.g. at initialisation) the eigendecomposition of the Gram matrix,
  ``A^T A = V L V^T`` in float64, gives ``A V L^(-1/2) V^T``: a symmetric eigensolver of the small side plus
  two matrix products, about half the time of the SVD (a 2048 x 512 float64 matrix, one CPU thread: 91 vs
  209 ms). Forming ``A^T A`` squares the condition number, so the result is orthonormal to about
  ``kappa(A)^2`` float64 ulps: the route is taken when ``L_min >= 1e-8 L_max`` (``kappa <= 10^4``; then ``max |Q^T Q -
  I| <= 1e-9``, measured) and returns in ``A``'s dtype.
* the thin SVD ``A = U S V^T`` for the rest (ill-conditioned or rank-deficient ``A``); well conditioned for a
  retraction, since ``W + xi`` has singular values ``sqrt(1 + s_i^2) >= 1``.

Matrix products are cheap and batch well (a batch of same-shaped matrices is one ``bmm``), while small SVDs run
one LAPACK call per matrix: on a 64-layer MLP of 64 x 64 weights the Newton-Schulz retraction of all layers
costs a few percent of their SVDs. Half precision inputs are computed in float32 and cast back (except by
:func:`orthonormal`, which stays traceable by ``torch.fx`` and takes float32 or float64).

Under ``torch.compile`` the polar factor is the SVD's: choosing the route reads the errors on the host, which a
``fullgraph=True`` trace cannot do ("Could not guard on data-dependent expression"), and the SVD route has no
data-dependent branch; the values agree with the other routes to working precision (a NaN or inf entry makes
torch's SVD raise ``torch.linalg.LinAlgError`` there). Inside ``torch.func.vmap`` the polar factor's vmap rule
factors the whole batch at once, by the usual routes; a vmapped tensor that reaches the routes anyway (nested
transforms) takes the SVD, since it cannot be read on the host ("vmap: It looks like you're calling .item()").
For the same reasons :func:`qr_retraction` uses Householder QR inside ``vmap`` and ``torch.compile`` on every
device, and returns NaN columns there for a NaN or inf entry instead of refusing it.

Gradients: the polar factor (:func:`project_to_stiefel`, :func:`polar_retraction`) is differentiated by its exact
derivative (:func:`_polar_differential`, backward and forward mode) whichever route computed it; it is smooth at
every full-rank matrix, also where singular values repeat (an orthonormal or scaled orthonormal matrix), where the
routes' own derivatives (torch's SVD and eigh backward) were NaN or wrong; near rank deficiency it is large
(``1 / s_min``) and still accurate (``s`` from the SVD there, not the Gram matrix). :func:`qr_retraction` is
differentiated by QR's backward:

>>> w = random_orthonormal(5, 3, dtype=torch.float64).requires_grad_()
>>> g, = torch.autograd.grad(project_to_stiefel(3 * w).sum(), w)   # torch's eigh backward: NaN
>>> bool(torch.isfinite(g).all())
True
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as _forward_ad

from orthofx.errors import LayerArgumentError
from orthofx.nn.precision import HALF_PRECISION
from orthofx.nn.tracing import in_func_transform, in_vmap
from orthofx.theory import _positive_int

__all__ = [
    "sym",
    "is_wide",
    "tangent_projection",
    "polar_retraction",
    "qr_retraction",
    "retract",
    "project_to_stiefel",
    "orthonormal",
    "orthogonality_defect",
    "random_orthonormal",
    "flatten_weight",
    "unflatten_weight",
    "RETRACTIONS",
]

#: Names accepted by :func:`retract`.
RETRACTIONS = ("polar", "qr")
#: Device types on which :func:`qr_retraction` uses Cholesky QR (one batched launch sequence) rather than
#: Householder QR (cuSOLVER factors a batch matrix by matrix: 2.8 ms per 256 x 256 float64 matrix on an H200).
CHOLESKY_QR_DEVICES = ("cuda",)


def _check_matrix(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise LayerArgumentError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise LayerArgumentError(f"{name} must be a matrix or a batch of matrices (..., m, n), "
                                 f"got shape {tuple(x.shape)}")
    if x.is_complex() or not x.is_floating_point():
        raise LayerArgumentError(f"{name} must be a real floating-point tensor, got dtype {x.dtype} (the Stiefel "
                                 "functions are for real weights)")


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in HALF_PRECISION else x.dtype


def sym(a: torch.Tensor) -> torch.Tensor:
    """Symmetric part ``(A + A^T) / 2`` of a (batch of) square matrices."""
    return 0.5 * (a + a.transpose(-2, -1))


def is_wide(w: torch.Tensor) -> bool:
    """Whether ``w`` (``(..., m, n)``) has more columns than rows, i.e. is orthonormal by rows (``m < n``)."""
    return w.shape[-2] < w.shape[-1]


def _tall(x: torch.Tensor, wide: bool) -> torch.Tensor:
    return x.transpose(-2, -1) if wide else x


def tangent_projection(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Orthogonal projection of ``g`` onto the tangent space of the Stiefel manifold at ``w``.

    ``P_W(G) = G - W sym(W^T G)`` for tall ``W`` (``W^T W = I``); a wide ``W`` is transposed (see the module
    docstring). The result ``xi`` satisfies ``W^T xi + xi^T W = 0`` and ``P_W(P_W(G)) = P_W(G)``. NaN or inf
    entries are not checked (the optimizer projects every step; the retraction that follows refuses them): they
    propagate, as NaN, into the result. Half-precision inputs are computed in float32 and returned in ``w``'s dtype.
    """
    _check_matrix(w, "w")
    _check_matrix(g, "g")
    if g.shape != w.shape:
        raise LayerArgumentError(f"g must have the shape of w {tuple(w.shape)}, got {tuple(g.shape)}")
    wide = is_wide(w)
    work = _work_dtype(w)  # half precision cancels most bits of G - W sym(W^T G): computed in float32
    wt, gt = _tall(w.to(work), wide), _tall(g.to(work), wide)
    out = gt - wt @ sym(wt.transpose(-2, -1) @ gt)
    return _tall(out, wide).to(w.dtype)


#: Newton-Schulz is used for the polar factor when ``||A^T A - I||_F`` is at most this (all ``sigma^2`` in
#: ``[1/2, 3/2]``; the iteration converges for ``sigma^2 < 3``), with at most this many iterations.
_NS_START = 0.5
_NS_MAX_ITER = 8


def _polar_newton_schulz(a: torch.Tensor, gram: torch.Tensor | None = None, also: list | None = None
                         ) -> torch.Tensor | None:
    """Polar factor of a tall (batch of) ``a`` by Newton-Schulz (module docstring), or ``None`` when ``a`` is too
    far from orthonormal or does not converge (the caller then uses another route). ``gram``: ``a^T a`` when the
    caller has it. ``also``: a list holding a 0-d tensor on ``a``'s device that the first host read reads too
    (:func:`_polar_retraction_reading`); its value (a float) replaces it in the list."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    target = math.sqrt(torch.finfo(a.dtype).eps)
    x = a
    gram = x.mT @ x if gram is None else gram
    first = torch.linalg.matrix_norm(gram - eye).amax()
    if also:
        error, also[0] = torch.stack((first, also[0].to(first))).tolist()
    else:
        error = float(first)
    if not error <= _NS_START:  # also NaN / inf
        return None
    for _ in range(_NS_MAX_ITER):
        x = x @ (1.5 * eye - 0.5 * gram)
        if error <= target:  # the iteration just made squared the error: working precision
            return x
        gram = x.mT @ x
        error = float(torch.linalg.matrix_norm(gram - eye).amax())
    return None


#: The Gram route is taken when the smallest eigenvalue of ``A^T A`` is at least this fraction of the largest.
_GRAM_MIN_RATIO = 1e-8


def _polar_from_gram(a: torch.Tensor, gram: torch.Tensor | None = None) -> torch.Tensor | None:
    """Polar factor ``a (a^T a)^(-1/2)`` of a tall (batch of) ``a`` from the float64 eigendecomposition of its
    Gram matrix (module docstring), in ``a``'s dtype; ``None`` when some matrix of the batch is too
    ill-conditioned for it. ``gram``: the float64 ``a^T a`` when the caller has it."""
    a64 = a.to(torch.float64)
    spectrum = _conditioned_gram_eigh(a64, gram)
    if spectrum is None:
        return None
    eigenvalues, vectors = spectrum
    return (a64 @ ((vectors * eigenvalues.rsqrt().unsqueeze(-2)) @ vectors.mT)).to(a.dtype)


def _conditioned_gram_eigh(a: torch.Tensor, gram: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``eigh(a^T a)`` (``gram``: that matrix when the caller has it), or ``None`` when some matrix of the batch is
    too ill-conditioned for the Gram route (:data:`_GRAM_MIN_RATIO`; also a zero matrix, 0 / 0, and NaN): one host
    read."""
    eigenvalues, vectors = torch.linalg.eigh(a.mT @ a if gram is None else gram)
    # (detached: ``a`` requires grad under create_graph, and float() of such a tensor warns)
    ratio = (eigenvalues[..., 0] / eigenvalues[..., -1]).amin().detach()
    return (eigenvalues, vectors) if float(ratio) >= _GRAM_MIN_RATIO else None


def _unit_scaled(a: torch.Tensor) -> torch.Tensor:
    """``a`` (a finite batch of matrices) times ``2^-e`` per matrix, ``e`` the exponent of its largest entry, so
    that this entry lies in ``[1/2, 1)``: exact (a power of two), and the same polar factor. ``a`` itself (no
    copy) when every matrix is already so (or zero), the common case near the manifold."""
    # max |a| per matrix as the larger of |max| and |min|: the same number, without a full-size |a|
    peak = torch.maximum(a.amax(dim=(-2, -1), keepdim=True).abs(), a.amin(dim=(-2, -1), keepdim=True).abs())
    _, exponent = torch.frexp(peak)  # peak = m 2^e, m in [1/2, 1); e = 0 for a zero matrix
    if not bool(exponent.any()):
        return a
    # in two halves: 2^-e alone overflows for a subnormal peak (float32: e = -132, 2^132 > max)
    half = torch.div(exponent, 2, rounding_mode="floor")
    two = torch.full_like(peak, 2.0)
    return (a * two.pow(-half)).mul_(two.pow(half - exponent))  # in place: one full-size temporary, not two


#: :func:`_far_column_norms` calls a matrix far when the squared deviations of its columns' squared norms from 1
#: sum to more than this: then ``||A^T A - I||_F^2`` (at least that sum, the squares of its diagonal) exceeds
#: ``_NS_START^2 = 0.25`` with a margin that no rounding of either sum bridges.
_FAR_DIAGONAL = 0.3


def _far_column_norms(tall: torch.Tensor) -> torch.Tensor | None:
    r"""The squared column norms ``(..., n)`` of a tall (batch of) ``tall`` when some matrix of the batch is
    certainly too far from orthonormal for Newton-Schulz (:data:`_FAR_DIAGONAL`), else ``None``.

    Newton-Schulz is tried when :math:`\max \|A^T A - I\|_F \le 1/2` over the batch, which needs the Gram matrix,
    :math:`O(m n^2)`; the diagonal alone, :math:`O(m n)`, already rules out a matrix whose columns are far from
    unit length, such as a layer's weights at initialisation or after training (the nearest start of
    ``from_conv``). Such a matrix then takes the Gram route with the Gram matrix of the scaled matrix only: the
    one it had before this test existed, so the same polar factor bit for bit, for one matrix product instead of
    two (a 2048 x 512 float64 one takes 11 ms on one CPU thread). A NaN answers ``None`` (the caller's full
    path reports it).

    >>> _far_column_norms(torch.eye(4, 3, dtype=torch.float64)) is None
    True
    >>> _far_column_norms(torch.full((4, 3), 0.05, dtype=torch.float64))
    tensor([0.0100, 0.0100, 0.0100], dtype=torch.float64)
    """
    if tall.stride(-2) == 1:  # a wide matrix's transposed view: the columns are contiguous rows
        squares = torch.linalg.vector_norm(tall, dim=-2).square()
    else:  # vector_norm across rows took 7 ms for a 2048 x 512 float64 matrix, squares and a sum 1 ms
        squares = tall.square().sum(-2)
    far = (squares - 1).square().sum(-1) > _FAR_DIAGONAL
    return squares if bool(far.any()) else None


def _polar_factor(a: torch.Tensor, far_first: bool = False, also: list | None = None) -> torch.Tensor:
    """``U V^T`` of ``a = U S V^T`` (thin): by Newton-Schulz near the manifold, from the Gram matrix's
    eigendecomposition when ``a`` is well conditioned, and by the SVD otherwise and under ``torch.compile``
    (module docstring), differentiated by :class:`_PolarFactor`'s exact formula whichever route
    gave the value. ``far_first``: rule Newton-Schulz out by the columns' norms first (:func:`_far_column_norms`),
    for callers whose matrices are usually far from orthonormal (:func:`project_to_stiefel`); a retraction, near
    the manifold, would pay one more reduction and host synchronisation per step for nothing. ``also``: see
    :func:`_polar_newton_schulz` (read only on the routes that read the host: not under autograd, ``vmap`` or
    ``torch.compile``, nor for an empty matrix)."""
    work = a.to(_work_dtype(a))
    wide = is_wide(work)
    tall = _tall(work, wide)
    if tall.numel() and _may_differentiate(tall):  # (an empty matrix: the routes' own empty gradient)
        # dynamo cannot trace an autograd.Function that defines a jvp ("Unsupported custom jvp")
        function = _PolarFactor if torch.compiler.is_compiling() else _PolarFactorDual
        polar = function.apply(tall, far_first, tuple(a.shape))
    else:  # the optimizer's retractions (no_grad): autograd.Function.apply took 50 us more than a 16 x 16 one's 30
        polar = _polar_value(tall, far_first, a.shape, also)
    return _tall(polar, wide).to(a.dtype)


def _may_differentiate(x: torch.Tensor) -> bool:
    """Whether a derivative of a function of ``x`` may be taken: autograd records it, a ``torch.func`` transform
    or forward-mode AD (a dual level) runs, or dynamo traces (it records whatever it is given)."""
    return ((torch.is_grad_enabled() and x.requires_grad) or in_func_transform() or torch.compiler.is_compiling()
            or _forward_ad._current_level >= 0)


def _polar_value(tall: torch.Tensor, far_first: bool, shape: tuple, also: list | None = None) -> torch.Tensor:
    """The polar factor of a tall (batch of) ``tall`` by the route :func:`_polar_factor` describes, in ``tall``'s
    dtype; ``shape``: the caller's matrix shape, for the error message; ``also``: see :func:`_polar_newton_schulz`."""
    dtype = tall.dtype
    if tall.numel() and not in_vmap() and not torch.compiler.is_compiling():
        # (compiling: the routes' choice reads errors on the host, which a fullgraph trace cannot do)
        squares = _far_column_norms(tall) if far_first else None
        if squares is None:
            gram = tall.mT @ tall
            polar = _polar_newton_schulz(tall, gram, also)
            squares = gram.diagonal(dim1=-2, dim2=-1)
        else:  # Newton-Schulz would refuse it: its Gram matrix is formed below, once, scaled
            gram = polar = None
        if polar is None:
            # checked off the fast path only (a host sync), and on the columns' squared norms first: a NaN or inf
            # entry makes its column's squared norm NaN or inf, so finite norms clear ``tall`` without a pass
            # over it (a norm that overflowed from finite entries falls through to the full check)
            if not bool(torch.isfinite(squares).all()) and not bool(torch.isfinite(tall).all()):
                raise _nonfinite_error("polar factor", shape)
            # far from the manifold the entries may be of any size: a float64 matrix of entries ~1e200 had an
            # infinite Gram matrix, on which eigh failed inside LAPACK. The polar factor does not change under
            # a positive scaling, and a power of two scales exactly
            scaled = _unit_scaled(tall)
            if scaled is not tall:
                tall, gram = scaled, None
            polar = _polar_from_gram(tall, gram if dtype == torch.float64 else None)
        if polar is not None:
            return polar
    u, _, vh = torch.linalg.svd(tall, full_matrices=False)
    return u @ vh


def _nonfinite_error(what: str, shape: tuple) -> LayerArgumentError:
    """The error of a retraction or projection handed a matrix with NaN or inf entries (one message for both)."""
    return LayerArgumentError(f"the {what} of a {tuple(shape)} matrix with NaN or inf entries is undefined; in "
                              "training this is a diverged step (lower the learning rate, check the loss for NaN)")


def _polar_differential(a: torch.Tensor, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    r"""The derivative of the polar factor ``Q`` of a tall (batch of) full-rank ``a`` in the direction ``d``; the
    same linear map is its own adjoint, so ``d = dL/dQ`` gives ``dL/da``. Computed in float64, returned in
    ``d``'s dtype.

    With ``a = Q H``, ``H = (a^T a)^{1/2} = V \operatorname{diag}(s) V^T`` (the eigendecomposition of the Gram
    matrix, or the SVD of ``a`` where that is inaccurate: :func:`_gram_spectrum`) and ``X = Q^T d``::

        dQ = Q V [(V^T (X - X^T) V) o K] V^T + (d - Q X) V diag(1/s) V^T,     K_ij = 1 / (s_i + s_j)

    (the second term only for ``m > n``: it is zero for a square ``a``). Unlike the SVD's backward, whose
    ``1 / (s_i^2 - s_j^2)`` is infinite for repeated singular values (torch then returns NaN, or a finite but
    wrong gradient: 12 % off the finite differences under ``vmap(grad)`` at a scaled orthonormal ``a``), ``K``
    stays finite for every full-rank ``a``: the polar factor is smooth there. At a rank-deficient ``a`` (a zero
    ``s``) it is not differentiable and the result holds inf or NaN.
    """
    a64, q64, d64 = a.to(torch.float64), q.to(torch.float64), d.to(torch.float64)
    # Q(c a) = Q(a) for c > 0, so the derivative at a is the one at a / c divided by c: a unit scale keeps the
    # Gram matrix finite and nonzero for the entries of any size the value's routes accept (1e-300 .. 1e300)
    scale = a64.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    a64 = a64 / scale
    s, v = _gram_spectrum(a64)
    x = q64.mT @ d64
    kernel = 1.0 / (s.unsqueeze(-1) + s.unsqueeze(-2))
    out = q64 @ (v @ ((v.mT @ (x - x.mT) @ v) * kernel) @ v.mT)
    if a.shape[-2] > a.shape[-1]:
        out = out + ((d64 - q64 @ x) @ (v / s.unsqueeze(-2))) @ v.mT
    return (out / scale).to(d.dtype)


def _gram_spectrum(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The singular values ``s`` and right singular vectors ``V`` of a float64 (batch of) tall ``a`` of unit
    scale, for :func:`_polar_differential`: from the eigendecomposition of ``a^T a`` (half the time of the SVD),
    unless some matrix of the batch is too ill-conditioned for it (:data:`_GRAM_MIN_RATIO`, the value's rule),
    and by the SVD where the condition cannot be read on the host (``vmap``, ``torch.compile``). The Gram matrix
    loses ``s_min`` below ``sqrt(eps) s_max``: at ``s = (1, 0.5, 1e-9)`` its eigenvalue ``1e-18`` came out as 0
    or negative and the derivative as NaN, and at ``1e-6`` 3e-5 off the SVD's; the derivative there is large
    (``1 / s_min``) but finite and defined."""
    host = not torch.compiler.is_compiling() and not in_vmap() and not _is_fake(a)
    spectrum = _conditioned_gram_eigh(a) if host else None
    if spectrum is not None:
        return spectrum[0].sqrt(), spectrum[1]
    _, s, vh = torch.linalg.svd(a, full_matrices=False)
    return s, vh.mT


def _is_fake(x: torch.Tensor) -> bool:
    """Whether ``x`` has no data to read (a fake tensor of ``torch.compile``'s backward trace)."""
    return torch._subclasses.fake_tensor.is_fake(x)


class _PolarFactor(torch.autograd.Function):
    """:func:`_polar_value` with the exact derivative :func:`_polar_differential`, whichever route computed the
    value: the routes' own derivatives were a truncated Newton-Schulz iteration's and torch's eigh / SVD backward,
    NaN or wrong where eigenvalues or singular values repeat (a scaled orthonormal matrix). Its vmap rule applies it
    to the batched matrices at once (they are a batch already). Backward mode only: what ``torch.compile`` runs
    (dynamo refuses a function with a ``jvp``); eagerly :class:`_PolarFactorDual`."""

    @staticmethod
    def forward(tall, far_first, shape):
        return _polar_value(tall, far_first, shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output)

    @staticmethod
    def backward(ctx, grad):
        a, q = ctx.saved_tensors
        return _polar_differential(a, q, grad), None, None

    @staticmethod
    def vmap(info, in_dims, tall, far_first, shape):
        return _PolarFactor.apply(tall.movedim(in_dims[0], 0), far_first, shape), 0


class _PolarFactorDual(_PolarFactor):
    """:class:`_PolarFactor` with forward mode too (``torch.func.jvp`` / ``jacfwd``, ``torch.autograd.forward_ad``),
    by the same derivative."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output)
        ctx.save_for_forward(inputs[0], output)

    @staticmethod
    def jvp(ctx, tangent, *_):
        a, q = ctx.saved_tensors
        return _polar_differential(a, q, tangent)

    @staticmethod
    def vmap(info, in_dims, tall, far_first, shape):
        return _PolarFactorDual.apply(tall.movedim(in_dims[0], 0), far_first, shape), 0


def polar_retraction(w: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    """Polar retraction ``R_W(xi) = (W + xi)(I + xi^T xi)^(-1/2)``, computed as the polar factor of ``W + xi``.

    Exact for a tangent ``xi``; for any ``xi`` the result is the orthonormal matrix nearest to ``W + xi``.
    Returned in ``w``'s dtype (half-precision inputs are added and retracted in float32, rounded once at the end);
    differentiable (:func:`_polar_factor`). NaN or inf entries in ``W + xi`` raise
    :class:`~orthofx.errors.LayerArgumentError` (under ``torch.compile``: torch's ``LinAlgError``, module
    docstring).
    """
    return _polar_factor(_step_sum(w, xi)).to(w.dtype)


def _polar_retraction_reading(w: torch.Tensor, xi: torch.Tensor, also: list) -> torch.Tensor:
    """:func:`polar_retraction`, whose first host read (Newton-Schulz's error, made on every eager call without
    gradient that has entries) also reads ``also[0]``, a 0-d tensor on ``w``'s device, and puts its value (a float)
    in its place: the Riemannian hooks' "did every matrix move?" without a device sync of its own. ``also`` keeps
    the tensor where nothing was read (an empty matrix, a recorded gradient, ``vmap``, ``torch.compile``)."""
    return _polar_factor(_step_sum(w, xi), also=also).to(w.dtype)


def _step_sum(w: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    """``W + xi`` for a retraction, checked, in the working dtype of both: a bfloat16 sum rounded ``W + xi``
    before the retraction and again after it (1.3 times the error of rounding the exact result once)."""
    _check_matrix(w, "w")
    _check_matrix(xi, "xi")
    if xi.shape != w.shape:
        raise LayerArgumentError(f"xi must have the shape of w {tuple(w.shape)}, got {tuple(xi.shape)}")
    if w.dtype == xi.dtype and w.dtype not in HALF_PRECISION:
        return w + xi
    dtype = torch.promote_types(w.dtype, xi.dtype)
    work = torch.float32 if dtype in HALF_PRECISION else dtype
    return w.to(work) + xi.to(work)


def orthonormal(raw: torch.Tensor, tall: bool | None = None) -> torch.Tensor:
    r"""Orthonormal columns (``p >= q``) or rows (``p < q``) from an unconstrained ``(..., p, q)`` tensor.

    :math:`A = QR` (reduced Householder QR of the tall orientation), then :math:`Q \operatorname{diag}(s)`
    with :math:`s = \operatorname{sign}(\operatorname{diag} R)` (``+1`` for ``+0``): smooth where ``A`` has full
    rank, differentiable (QR's backward), and the identity on matrices that are already orthonormal, so a
    parameter set to an orthonormal matrix gives back that matrix. Cost :math:`O(pq\min(p, q))`; batched over
    the leading dimensions. ``tall`` (``p >= q``) may be passed when known, which keeps the function free of
    shape-dependent control flow (``torch.fx`` symbolic tracing), and so also free of a dtype test: ``raw``
    must be float32 or float64 (torch has no half-precision QR; the layers cast before calling it).

    >>> import torch
    >>> w = orthonormal(torch.randn(5, 3, dtype=torch.float64))
    >>> bool(torch.allclose(w.T @ w, torch.eye(3, dtype=torch.float64)))
    True
    >>> bool(torch.allclose(orthonormal(w), w))
    True
    """
    if isinstance(raw, torch.Tensor) and raw.dtype in HALF_PRECISION:  # (a Proxy while tracing: not a tensor)
        raise LayerArgumentError(f"orthonormal: torch has no {raw.dtype} QR; pass raw.float() and round the result "
                                 "back (orthonormal(raw.float()).to(raw.dtype))")
    if tall is None:
        p, q = raw.shape[-2:]
        tall = p >= q
    a = raw if tall else raw.mT
    Q, R = torch.linalg.qr(a, mode="reduced")
    diag = torch.diagonal(R, dim1=-2, dim2=-1).detach()
    sign = torch.copysign(torch.ones_like(diag), diag)
    Q = Q * sign.unsqueeze(-2)
    return Q if tall else Q.mT


def _cholesky_qr2(a: torch.Tensor) -> torch.Tensor | None:
    """``qf(a)`` of a tall ``(..., p, q)`` ``a`` by Cholesky QR applied twice, or None where a Cholesky
    factorisation fails (``a`` numerically rank-deficient): :func:`_cholesky_qr2_unread`, read on the host."""
    q, failed = _cholesky_qr2_unread(a)
    return None if bool(failed) else q


def _cholesky_qr2_unread(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, failed)``: ``qf(a)`` of a tall ``(..., p, q)`` ``a`` by Cholesky QR applied twice, and a 0-d bool
    tensor, true where a Cholesky factorisation failed (``a`` numerically rank-deficient) or ``Q`` fails its check.

    One pass: ``L L^T = a^T a``, ``Q = a L^{-T}``; ``L^T`` is the ``R`` of ``a = QR`` with a positive diagonal, so
    ``Q`` is the same matrix as sign-corrected Householder QR's. Its orthogonality error is about ``kappa(a)^2``
    ulps; the second pass, on a ``Q`` with ``kappa ~ 1``, brings it to working precision. Matrix products, one
    batched Cholesky and one triangular solve per pass: on a GPU this is one launch sequence for a whole batch,
    where cuSOLVER's Householder QR runs matrix by matrix (``benchmarks/RESULTS.md``). The result is checked
    (``max |Q^T Q - I| <= 16 q eps``); reading ``failed`` costs one device synchronisation.
    """
    q, failed = a, None
    for _ in range(2):
        lower, info = torch.linalg.cholesky_ex(q.mT @ q)
        q = torch.linalg.solve_triangular(lower, q.mT, upper=False).mT
        failed = info != 0 if failed is None else failed | (info != 0)
    # kappa(a) beyond 1 / sqrt(eps) can pass both factorisations and leave Q far from orthonormal
    if q.shape[-1] == 0:  # no columns: nothing to check (and amax refuses an empty reduction)
        return q, failed.any()
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    defect = (q.mT @ q - eye).abs().amax(dim=(-2, -1))
    tolerance = 16 * q.shape[-1] * torch.finfo(q.dtype).eps
    return q, (failed | ~(defect <= tolerance)).any()  # ~(<=): a NaN defect fails too


def qr_retraction(w: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    """QR retraction ``R_W(xi) = qf(W + xi)``: the Q factor of the thin QR decomposition, with the signs of
    ``Q``'s columns chosen so that ``R``'s diagonal is positive (which makes ``qf`` unique and smooth, and
    ``R_W(0) = W`` for orthonormal ``W``). Wide matrices are transposed (rows orthonormal).

    On the devices in :data:`CHOLESKY_QR_DEVICES` (CUDA) it is computed by Cholesky QR (two passes): for a
    tangent ``xi``, ``(W + xi)^T (W + xi) = I + xi^T xi`` has eigenvalues ``>= 1``, so the Gram matrix is always
    well conditioned here, and Householder QR (:func:`orthonormal`) takes over where a factorisation fails (an
    ``xi`` far from tangent that makes ``W + xi`` rank-deficient). Elsewhere Householder QR, which LAPACK runs
    faster than Cholesky QR (``benchmarks/RESULTS.md``). Both give the same matrix to working precision.

    Returned in ``w``'s dtype (half-precision inputs are added and factored in float32); differentiable (QR's
    backward), as :func:`polar_retraction` is. NaN or inf entries in ``W + xi`` raise
    :class:`~orthofx.errors.LayerArgumentError`, as in :func:`polar_retraction` (inside ``vmap`` or
    ``torch.compile``, which cannot read them on the host: NaN columns)."""
    # Cholesky QR checks its result on the host, which vmap and a fullgraph compile cannot: Householder QR there,
    # unchecked (module docstring)
    if in_vmap() or torch.compiler.is_compiling():
        return _qr_factor(w, xi, householder=True, check=False)[0]
    r, redo = _qr_factor(w, xi)
    redo = bool(redo)  # the first route's host read: Cholesky QR's check, or the NaN test of Householder's Q
    if redo and r.device.type in CHOLESKY_QR_DEVICES:
        # Cholesky QR failed its check (an xi far from tangent that makes W + xi rank-deficient): Householder QR
        r, redo = _qr_factor(w, xi, householder=True)
        redo = bool(redo)
    if redo:  # Householder QR turns a NaN or inf into NaN columns silently
        raise _nonfinite_error("QR retraction", w.shape)
    return r


def _qr_retraction_unread(w: torch.Tensor, xi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`qr_retraction` with its host read left to a caller that reads the result anyway (the Riemannian
    hooks: one device synchronisation per step instead of two): ``(R, redo)``, ``redo`` a 0-d bool tensor, false
    where ``R`` is what :func:`qr_retraction` returns; where true (Cholesky QR failed its check, or Householder's
    ``Q`` holds a NaN or inf) call :func:`qr_retraction`, which takes another route or raises. None inside
    ``vmap`` or ``torch.compile``, where :func:`qr_retraction` reads nothing."""
    if in_vmap() or torch.compiler.is_compiling():
        return None
    return _qr_factor(w, xi)


def _qr_factor(w: torch.Tensor, xi: torch.Tensor, householder: bool = False, check: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(R, redo)`` with nothing read on the host, the one computation of :func:`qr_retraction` and
    :func:`_qr_retraction_unread`: ``R = qf(W + xi)`` in ``w``'s dtype, by Cholesky QR on the devices of
    :data:`CHOLESKY_QR_DEVICES` unless ``householder``, by Householder QR (:func:`orthonormal`) otherwise; ``redo``
    a 0-d bool tensor, true where ``R`` is not the retraction (Cholesky QR failed its check, or Householder's ``Q``
    holds a NaN or inf), None without ``check`` (inside ``vmap`` or ``torch.compile``, where it cannot be read)."""
    a = _step_sum(w, xi)
    wide = is_wide(a)
    tall = _tall(a, wide)
    if not householder and tall.device.type in CHOLESKY_QR_DEVICES:
        q, redo = _cholesky_qr2_unread(tall)
    else:
        q = orthonormal(tall, tall=True)
        # the entries of an orthonormal Q are at most 1, so their sum is finite unless one is not
        redo = ~torch.isfinite(q.sum()) if check else None
    return _tall(q, wide).to(w.dtype), redo


def retract(w: torch.Tensor, xi: torch.Tensor, method: str = "polar") -> torch.Tensor:
    """``polar_retraction`` or ``qr_retraction`` by name (``"polar"`` or ``"qr"``)."""
    if method == "polar":
        return polar_retraction(w, xi)
    if method == "qr":
        return qr_retraction(w, xi)
    raise LayerArgumentError(f"unknown retraction {method!r}; choose one of {', '.join(RETRACTIONS)}")


def project_to_stiefel(w: torch.Tensor) -> torch.Tensor:
    """The orthonormal matrix nearest to ``w`` in Frobenius norm: the polar factor ``U V^T`` of ``w = U S V^T``.

    Rows or columns come out orthonormal by ``w``'s shape (module docstring). A rank-deficient ``w`` gets one of
    the nearest orthonormal matrices (the SVD picks the basis of the null directions).
    """
    _check_matrix(w, "w")
    return _polar_factor(w, far_first=True)


def orthogonality_defect(w: torch.Tensor) -> torch.Tensor:
    """``max |W^T W - I|`` (tall/square ``W``) or ``max |W W^T - I|`` (wide ``W``), per matrix of the batch.

    Returns a 0-d tensor for a single matrix, a tensor of the batch shape otherwise; computed without gradient
    tracking in at least float32.
    """
    _check_matrix(w, "w")
    with torch.no_grad():
        x = _tall(w.detach().to(_work_dtype(w)), is_wide(w))
        gram = x.transpose(-2, -1) @ x
        if gram.shape[-1] == 0:  # no columns (an empty weight): vacuously orthonormal, and amax has no identity
            return gram.new_zeros(gram.shape[:-2])
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        return (gram - eye).abs().amax(dim=(-2, -1))


def random_orthonormal(m: int, n: int, *batch: int, generator: torch.Generator | None = None,
                       dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
                       ) -> torch.Tensor:
    """A random ``(*batch, m, n)`` orthonormal matrix (columns if ``m >= n``, rows otherwise), uniformly
    (Haar) distributed: the sign-fixed Q factor of a Gaussian matrix. ``m``, ``n`` and ``batch`` are integers
    ``>= 0`` and ``dtype`` a real floating-point one (an integer dtype truncated the entries to 0 and +-1, a
    complex one gave a real matrix with zero imaginary parts); anything else raises
    :class:`~orthofx.errors.LayerArgumentError`.

    >>> q = random_orthonormal(3, 5, 2, dtype=torch.float64)
    >>> q.shape, bool(orthogonality_defect(q).max() < 1e-14)
    (torch.Size([2, 3, 5]), True)
    """
    m = _positive_int(m, "random_orthonormal: m", LayerArgumentError, 0)
    n = _positive_int(n, "random_orthonormal: n", LayerArgumentError, 0)
    batch = tuple(_positive_int(b, "random_orthonormal: a batch size", LayerArgumentError, 0) for b in batch)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise LayerArgumentError(f"random_orthonormal: dtype must be a real floating-point torch.dtype (e.g. "
                                 f"torch.float32), got {dtype!r}: an orthonormal matrix has real entries in [-1, 1]")
    if generator is not None and not isinstance(generator, torch.Generator):  # failed inside the draw otherwise
        raise LayerArgumentError(f"random_orthonormal: generator must be a torch.Generator or None, got "
                                 f"{type(generator).__name__} {generator!r}; e.g. torch.Generator().manual_seed(0)")
    # device=None under torch.set_default_device('meta') is meta too (the draw had no values, geqrf failed)
    target = torch.device(device) if device is not None else torch.get_default_device()
    if generator is None and target.type == "meta":
        # deferred construction: a meta tensor has a shape and no values (geqrf has no meta kernel)
        return torch.empty(*batch, m, n, dtype=dtype, device=device)
    q, signs = _haar_factor(m, n, *batch, generator=generator, device=device)
    q = q * signs.unsqueeze(-2)
    if m < n:
        q = q.transpose(-2, -1)
    return q.to(device=device, dtype=dtype).contiguous()


def _haar_factor(m: int, n: int, *batch: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None,
                 rounded_to: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(Q, s)`` with :math:`Q \operatorname{diag}(s)` the float64 ``(*batch, max(m, n), min(m, n))`` Haar
    matrix of :func:`random_orthonormal` (before its transpose and cast): ``Q`` the Q factor of a Gaussian matrix
    ``G = QR`` drawn from ``generator`` (on its device: a seed gives the same matrix whatever ``device`` is), ``s``
    the signs of ``R``'s diagonal (``+1`` for ``+0``), which make the factorisation unique and the distribution
    Haar. A caller that scales the matrix folds ``s`` into its scale, one multiplication instead of two
    (``(c s) Q = c (s Q)`` bit for bit: ``s = +-1``). ``Q`` is in LAPACK's column-major layout.

    ``R`` from ``geqrf``, then ``Q`` from ``householder_product``: the two LAPACK calls ``torch.linalg.qr``
    makes, without its copy of ``R`` (on CPU the same ``Q`` bit for bit; 5-20 % faster on one thread for the shapes
    of a ResNet-50). When the caller rounds ``Q`` to a lower precision (``rounded_to``: float32, bfloat16,
    float16), ``Q = G R^{-1}`` by a triangular solve instead, the same matrix in exact arithmetic (so exactly
    Haar) at 0.6x the time of ``householder_product``, with an orthogonality error of about
    :math:`\kappa(G)` float64 ulps: the two differ by at most ``2e-13`` on a ResNet-50's layers, where float32
    rounds at ``6e-8`` relative, so the rounded weights are the same but where an entry lies that close to a
    rounding boundary (4 of the 23.6 million float32 weights of the built-in ResNet-50 under the ``isometric``
    preset, each by one ulp, all in entries below ``3e-4``). The random stream is the same draw. A Gaussian
    ill-conditioned enough to show in float32 (``|Q^T Q v - v| > 1e-9`` for ``v`` the vector of ones: a cheap
    probe, not a bound) takes ``householder_product`` after all.

    >>> import torch
    >>> q, s = _haar_factor(6, 4, generator=torch.Generator().manual_seed(0))
    >>> g = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> q2, r = torch.linalg.qr(g)
    >>> bool(torch.equal(q, q2)), bool(torch.equal(s, torch.sign(torch.diagonal(r))))
    (True, True)
    """
    tall = (max(m, n), min(m, n))
    gen_device = generator.device if generator is not None else device
    gauss = torch.randn(*batch, *tall, generator=generator, dtype=torch.float64, device=gen_device)
    if gauss.numel() == 0:  # LAPACK's calls want at least one entry: orthonormal's QR handles empty matrices
        q = orthonormal(gauss, tall=True)
        return q, q.new_ones(*batch, tall[1])
    reflectors, tau = torch.geqrf(gauss)
    diag = torch.diagonal(reflectors, dim1=-2, dim2=-1)  # R's diagonal: geqrf stores R in the upper triangle
    signs = torch.copysign(torch.ones_like(diag), diag)
    if rounded_to != torch.float64:
        r = reflectors[..., :tall[1], :].triu()
        q = torch.linalg.solve_triangular(r, gauss, upper=True, left=False)
        probe = q.new_ones(tall[1], 1)
        if bool(((q.mT @ (q @ probe)) - probe).abs().amax() <= 1e-9):  # ~(<=): a NaN takes the other route
            return q, signs
    return torch.linalg.householder_product(reflectors, tau), signs


def flatten_weight(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """A layer weight as the matrix (batch) the Stiefel functions work on.

    Linear ``(out, in)``: unchanged. Convolution ``(out, in / groups, *kernel)``: ``(out, in / groups * prod(kernel))``
    for ``groups == 1``, ``(groups, out / groups, in / groups * prod(kernel))`` otherwise (one matrix per group).
    A view when ``weight`` is contiguous. A transposed convolution's weight ``(in, out / groups, *kernel)`` is split
    the same way, by its first dimension: one matrix per group, rows the group's input channels.
    """
    if not isinstance(weight, torch.Tensor):
        raise LayerArgumentError(f"flatten_weight: weight must be a tensor, got {type(weight).__name__}")
    if weight.dim() < 2:
        raise LayerArgumentError(f"a layer weight has at least 2 dimensions, got shape {tuple(weight.shape)}")
    out = weight.shape[0]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise LayerArgumentError(f"groups must be a positive integer, got {groups!r}")
    columns = math.prod(weight.shape[1:])  # not -1: a weight with no output channels has no inferable size
    if groups == 1:
        return weight.reshape(out, columns)
    if out % groups:
        raise LayerArgumentError(f"{out} output channels are not divisible by groups={groups}")
    return weight.reshape(groups, out // groups, columns)


def unflatten_weight(matrix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`flatten_weight`: ``matrix`` reshaped to the shape of the layer weight ``like``."""
    if matrix.numel() != like.numel():  # reshape's own error named neither function nor cause
        raise LayerArgumentError(f"unflatten_weight: a {tuple(matrix.shape)} matrix ({matrix.numel()} entries) is not "
                                 f"a flattened {tuple(like.shape)} weight ({like.numel()} entries); pass the weight "
                                 "it was flattened from as like")
    return matrix.reshape(like.shape)
