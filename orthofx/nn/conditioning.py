"""What the ``svd_conditioning`` pass puts into a graph: stable stand-ins for torch's decompositions with torch's
output conventions, the SVD-free matrix power, and the monitor that records the condition number at a site.

Everything here is usable on its own (no graph knowledge); the pass only inserts calls to it.

Stable stand-ins (same arguments and outputs as the torch call they replace, plus the stable op's options
``taylor_order``, ``float64``, ``clamp_gap`` of :func:`orthofx.nn.decompositions.eigh_stable`):

===========================  ====================================  ===============================================
function                     replaces                              returns
===========================  ====================================  ===============================================
:func:`stable_eigh`          ``torch.linalg.eigh(A, UPLO)``        ``(L, V)`` (a plain tuple; index 0 / 1)
:func:`stable_eigvalsh`      ``torch.linalg.eigvalsh(A, UPLO)``    ``L``
:func:`stable_linalg_svd`    ``torch.linalg.svd(A, full_matrices)`` ``(U, S, Vh)``
:func:`stable_svdvals`       ``torch.linalg.svdvals(A)``           ``S``
:func:`stable_torch_svd`     ``torch.svd(A, some, compute_uv)``    ``(U, S, V)`` (``V``, not ``Vh``, as torch.svd)
===========================  ====================================  ===============================================

``UPLO`` is passed on to ``torch.linalg.eigh`` (the same triangle read, the same eigenvector signs). Full matrices
(``full_matrices=True`` / ``some=False`` on a non-square input) are the reduced factors completed by the columns
torch's own full SVD of the detached input gives (made orthogonal to the reduced factor, which leaves them as they
are unless the matrix is rank-deficient); as in torch, no gradient flows through the completing columns (torch
raises for them, here they are constants).
``torch.svd(compute_uv=False)`` returns zero-filled ``U`` (``m x m``) and ``V`` (``n x n``) like torch.

SVD-free power: :func:`power_newton_schulz` computes ``(A + shift I)^p`` for ``p = 1/2`` or ``-1/2`` with
:func:`~orthofx.nn.decompositions.sqrtm_newton_schulz` / :func:`~orthofx.nn.decompositions.inv_sqrtm_newton_schulz`
(matmuls only; valid for symmetric positive definite matrices). With ``uplo=None`` (an SVD site's replacement) a
matrix far from symmetric is refused (a ``LayerArgumentError`` in eager calls on CPU; NaN results on other
devices, where the check's host read would stall the device's queue at every call, and under ``torch.compile`` /
export), where ``U diag(S^p) Vh`` is no power of it.

Monitor: :class:`DecompositionMonitor`, a :class:`~orthofx.nn.decompositions.ConditionMonitor` that passes its
first argument through unchanged (so the graph keeps it by data flow, not as a dead node) and records ``kappa``:

* ``source="eigenvalues"`` (eigh, eigvalsh): ``lambda_max / lambda_min`` of the decomposed matrix.
* ``source="singular_values"`` (svd, svdvals, torch.svd): the condition number of the *covariance* the SVD
  stands for. When the decomposed matrix is square and symmetric (to ``max(1e-2, eps^(1/4))`` relative, checked
  per matrix with tensor ops: a covariance up to its rounding, see :func:`_asymmetric`) it is taken to be the
  covariance itself and ``kappa = s_max / s_min``; otherwise it is taken to be a data matrix
  ``X`` whose covariance is ``X X^T`` (or ``X^T X``), and ``kappa = (s_max / s_min)^2``
  (the nonzero eigenvalues of both Gram matrices are ``s^2``).
* ``source="matrix"`` (the Newton-Schulz form, which has no eigenvalues): ``torch.linalg.eigvalsh`` of the
  detached input in float64 (a forward-only decomposition, no backward; turn the monitor off to run without any
  decomposition), reading the triangle ``uplo`` names (``"U"`` for a site ``eigh(A, UPLO="U")``, like the
  replaced decomposition and :func:`power_newton_schulz`; ``"L"`` otherwise). A matrix holding a NaN/inf (in that
  triangle) is not decomposed: it counts as a NaN event.

Non-finite values: the stable ops give NaN outputs for a matrix holding a NaN or an inf instead of raising (see
:mod:`orthofx.nn.decompositions`), so every monitor records such a call as a NaN event (``nan_events``, shown
by ``orthofx.report``) and the model's output is NaN; nothing raises in the middle of a training run.

The monitor records in training and in eval mode, with tensor ops only (no host synchronisation, no Python side
effects), so ``torch.compile(fullgraph=True)`` traces it. ``to_plain()`` returns a :class:`PassThrough`, which is
what :func:`orthofx.freeze` puts in its place.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from orthofx.errors import LayerArgumentError
from orthofx.nn.precision import HALF_PRECISION

from .decompositions import (ConditionMonitor, _check_input, _finite_part, _nan_where, eigh_stable,
                             inv_sqrtm_newton_schulz, sqrtm_newton_schulz, svd_stable)
from .tracing import fx_tracer_of, in_export, in_func_transform, record_as_leaf

__all__ = [
    "stable_eigh",
    "stable_eigvalsh",
    "stable_linalg_svd",
    "stable_svdvals",
    "stable_torch_svd",
    "power_newton_schulz",
    "check_layout",
    "as_return_type",
    "DecompositionMonitor",
    "PassThrough",
    "MONITOR_SOURCES",
]

#: What a :class:`DecompositionMonitor` reads its eigenvalues from.
MONITOR_SOURCES = ("eigenvalues", "singular_values", "matrix")


# ------------------------------------------------------------------------------------------- stand-ins


def _recorded_when_traced(function):
    """``function``, recorded as one ``call_function`` node of itself when ``torch.fx`` traces a call of it (a
    Proxy among the arguments), as a ``torch.fx.wrap``-ped function is, and run otherwise.

    The graph ``svd_conditioning`` writes calls these stand-ins, and its code is traced again whenever the module
    is unpickled (``torch.save(gm)`` / ``torch.load``: fx rebuilds a GraphModule by tracing its code) or a model
    holding it is transformed again. Traced into, a stand-in broke that: ``stable_linalg_svd(A,
    full_matrices=True)`` branches on shapes (``TraceError``) and ``stable_eigh`` came back as the bare
    ``torch.ops.orthofx.eigh_stable`` op, no longer a site of its decomposition. (``fx.wrap`` cannot do this: it
    patches the globals of the module calling it, not those of a graph's generated code.)

    Example::

        import torch
        from orthofx.nn.conditioning import stable_eigh

        gm = torch.fx.symbolic_trace(lambda A: stable_eigh(A)[1])
        assert [n.target for n in gm.graph.nodes if n.op == "call_function"][0] is stable_eigh   # one node
    """

    @functools.wraps(function)
    def traced_or_run(*args, **kwargs):
        # the first argument is the matrix (the decomposition's result for as_return_type), a Proxy whenever fx
        # traces the call: one isinstance, where fx_tracer_of's walk over every argument cost ~5 % of a small eigh.
        # A user's forward may pass it by keyword (stable_linalg_svd(A=x)): traced into, that raised TraceError.
        first = args[0] if args else kwargs.get("A", kwargs.get("result"))
        if isinstance(first, torch.fx.Proxy):
            return first.tracer.create_proxy("call_function", traced_or_run, args, kwargs)
        return function(*args, **kwargs)

    return traced_or_run


def _uplo(uplo, what: str = "UPLO", allowed: str = "'L' or 'U'") -> str:
    """``"L"`` or ``"U"``; like torch, the lower-case letters are accepted too."""
    if not isinstance(uplo, str) or uplo.upper() not in ("L", "U"):
        raise LayerArgumentError(f"{what} must be {allowed}, got {uplo!r}")
    return uplo.upper()


def _lower(A: Tensor, uplo: str) -> Tensor:
    return A if _uplo(uplo) == "L" else A.mT


@_recorded_when_traced
def stable_eigh(A: Tensor, UPLO: str = "L", taylor_order: int | None = 9, float64: bool = False,
                clamp_gap: float | None = None, plain: bool = False) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` with a bounded gradient: ``(eigenvalues ascending, eigenvectors in columns)``.
    ``plain=True`` (every stand-in here): the same values from plain torch operations, as frozen models run."""
    return eigh_stable(A, taylor_order=taylor_order, float64=float64, clamp_gap=clamp_gap, plain=plain,
                       uplo=_uplo(UPLO))


@_recorded_when_traced
def stable_eigvalsh(A: Tensor, UPLO: str = "L", taylor_order: int | None = 9, float64: bool = False,
                    clamp_gap: float | None = None, plain: bool = False) -> Tensor:
    """``torch.linalg.eigvalsh`` through the stable op (the values' gradient is exact: it needs no gap kernel)."""
    return stable_eigh(A, UPLO, taylor_order, float64, clamp_gap, plain)[0]


def _complement(Q: Tensor, torch_tail: Tensor) -> Tensor:
    """Orthonormal columns spanning the orthogonal complement of the (orthonormal) columns of ``Q`` (detached):
    ``torch_tail`` (the completing columns of torch's own full SVD) with its components along ``Q`` projected out,
    which leaves torch's values up to rounding where ``Q`` spans the space that the leading columns of torch's full
    factor span (``|Q^T tail| <= sqrt(eps)``: orthonormal to ``O(eps)`` after the projection). A matrix where it does
    not (``Q``'s columns for the zero singular values of a rank-deficient matrix are an arbitrary basis, torch's
    full call may pick another) gets the basis of a complete QR of ``Q`` instead (on CPU, computed only when some
    matrix needs it)."""
    m, k, dtype = Q.shape[-2], Q.shape[-1], Q.dtype
    work = torch.float32 if dtype in HALF_PRECISION else dtype  # no half-precision QR kernel
    Q, tail = Q.detach().to(work), torch_tail.to(work)
    overlap = Q.mT @ tail
    projected = tail - Q @ overlap
    far = (overlap.abs() > torch.finfo(work).eps ** 0.5).flatten(-2).any(-1)  # any() of an empty matrix: False
    if _may_sync(Q) and not bool(far.any()):  # the usual case, known at the cost of one host read on CPU
        return projected.to(dtype)
    fallback = torch.linalg.qr(Q, mode="complete").Q[..., :, k:m]
    return torch.where(far.unsqueeze(-1).unsqueeze(-1), fallback, projected).to(dtype)


def _completed(A: Tensor, U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """The full factors of ``A = U diag(S) Vh`` (reduced), completed with the columns torch's full SVD gives.

    torch's completing columns are one basis of the complement among many; a model using them as they are
    (``U[..., k:]`` as features, not only ``U U^T``) computed other values after the rewrite when the complement
    came from a QR of ``U`` alone (a different basis, up to 0.76 off in ``U``'s entries). They are taken from
    torch's own ``linalg.svd(A, full_matrices=True)`` (no gradient flows there, as in torch) of the detached
    input (float32 for half precision, as the stable op decomposes it; a matrix holding a NaN/inf, whose factors are
    NaN already, is decomposed as the identity instead of reaching LAPACK)."""
    m, k, n = U.shape[-2], U.shape[-1], Vh.shape[-1]
    if m == k and n == k:
        return U, Vh
    ref = A.detach()
    if ref.dtype in HALF_PRECISION:
        ref = ref.float()
    ref, _ = _finite_part(ref, sync=False)
    Uf, _, Vhf = torch.linalg.svd(ref, full_matrices=True)
    if m > k:
        U = torch.cat([U, _complement(U, Uf[..., :, k:])], dim=-1)
    if n > k:
        Vh = torch.cat([Vh, _complement(Vh.mT, Vhf[..., k:, :].mT).mT], dim=-2)
    return U, Vh


@_recorded_when_traced
def stable_linalg_svd(A: Tensor, full_matrices: bool = True, taylor_order: int | None = 9, float64: bool = False,
                      clamp_gap: float | None = None, plain: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.svd`` with a bounded gradient: ``(U, S descending, Vh)``; see the module docstring for
    ``full_matrices=True`` on non-square inputs."""
    U, S, Vh = svd_stable(A, taylor_order=taylor_order, float64=float64, clamp_gap=clamp_gap, plain=plain)
    if full_matrices:
        U, Vh = _completed(A, U, Vh)
    return U, S, Vh


@_recorded_when_traced
def stable_svdvals(A: Tensor, taylor_order: int | None = 9, float64: bool = False,
                   clamp_gap: float | None = None, plain: bool = False) -> Tensor:
    """``torch.linalg.svdvals`` through the stable op (descending)."""
    return svd_stable(A, taylor_order=taylor_order, float64=float64, clamp_gap=clamp_gap, plain=plain)[1]


@_recorded_when_traced
def stable_torch_svd(A: Tensor, some: bool = True, compute_uv: bool = True, taylor_order: int | None = 9,
                     float64: bool = False, clamp_gap: float | None = None,
                     plain: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.svd`` with a bounded gradient: ``(U, S, V)`` with ``A = U diag(S) V^T`` (``V``, not ``Vh``)."""
    U, S, Vh = svd_stable(A, taylor_order=taylor_order, float64=float64, clamp_gap=clamp_gap, plain=plain)
    if not compute_uv:
        m, n = A.shape[-2], A.shape[-1]
        batch = A.shape[:-2]
        return A.new_zeros((*batch, m, m)), S, A.new_zeros((*batch, n, n))
    if not some:
        U, Vh = _completed(A, U, Vh)
    return U, S, Vh.mT


@_recorded_when_traced
def as_return_type(result: tuple, name: str):
    """``torch.return_types.<name>`` (``linalg_eigh``, ``linalg_svd``, ``svd``) built from a plain tuple, for graph
    users that need the named tuple itself (attribute access is rewritten to indexing by the pass)."""
    return getattr(torch.return_types, name)(tuple(result))


# ------------------------------------------------------------------------------------------- Newton-Schulz


def check_layout(ndim: int, layout: tuple) -> str | None:
    """``None`` when the recorded index arithmetic of a matched ``V diag(f(lambda)) V^T`` pattern means the last two
    dimensions of ``ndim``-dimensional matrices; otherwise why not. Entries of ``layout``:

    ``("transpose", i, j)``: a transpose of dims ``i, j`` (must be the last two); ``("ndim", k)``: an op that does
    what the pattern needs only for ``k``-D matrices (``.T``, ``.t()``, ``permute`` transpose the last two dims,
    ``torch.diag`` builds ``diag(L)``, ``V * L`` scales the columns only when ``L`` is 1-D); ``("col", d)``:
    ``unsqueeze(d)`` of the eigenvalues must scale columns (``d`` is ``-2`` or ``ndim - 2``); ``("row", d)``: it
    must scale rows (``-1`` or ``ndim - 1``)."""
    for entry in layout:
        kind = entry[0]
        if kind == "transpose":
            i, j = entry[1], entry[2]
            in_range = all(-ndim <= d < ndim for d in (i, j))
            if not in_range or {i % ndim, j % ndim} != {ndim - 2, ndim - 1}:
                return f"transpose{entry[1:]} of {ndim}-D matrices does not swap the last two dimensions"
        elif kind == "ndim":
            if ndim != entry[1]:
                return (f"an op written for {entry[1]}-D matrices (.T, .t(), torch.diag, permute, V * L with the "
                        f"eigenvalues broadcast along the columns) is applied to {ndim}-D matrices")
        elif kind in ("col", "row"):
            want = ndim - 2 if kind == "col" else ndim - 1
            d = entry[1] if entry[1] >= 0 else entry[1] + ndim
            if d != want:
                what = "columns" if kind == "col" else "rows"
                return (f"unsqueeze({entry[1]}) of the eigenvalues of {ndim}-D matrices does not scale the "
                        f"eigenvectors' {what}")
        else:  # pragma: no cover - the pass writes only the kinds above
            return f"unknown layout entry {entry!r}"
    return None


def _check_square(A: Tensor, what: str) -> None:
    """The Newton-Schulz form stands for ``V diag(f(lambda)) V^T`` of a square symmetric matrix; an SVD site's
    ``U diag(f(S)) U^T`` of a non-square data matrix ``X`` is ``f`` of ``(X X^T)^(1/2)`` instead, which the
    iteration on ``X`` cannot give (torch would fail deep inside with an unrelated message)."""
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise LayerArgumentError(f"{what}: the Newton-Schulz replacement of V diag(lambda^p) V^T needs square "
                                 f"symmetric positive definite matrices [..., n, n], got shape {tuple(A.shape)} (an "
                                 "SVD of a non-square data matrix); transform with method 'taylor' for this site")


def _symmetry_tolerance(dtype: torch.dtype) -> float:
    """``max(1e-2, eps^(1/4))`` of ``dtype`` (0 for a non-floating one): how far from symmetric, relative to its
    largest entry, a matrix may be and still count as a covariance (:func:`_asymmetric`)."""
    return max(1e-2, torch.finfo(dtype).eps ** 0.25) if dtype.is_floating_point else 0.0


def _asymmetric(matrix: Tensor) -> Tensor:
    """Mask (shape ``matrix.shape[:-2]``) of the square matrices that are far from symmetric:
    ``max|M - M^T| > max(1e-2, eps^(1/4)) max|M|`` (tensor ops only). A square data matrix is asymmetric by about
    its own size; a covariance is symmetric up to its rounding, which a covariance formed by cancellation
    (``E[x x^T] - mu mu^T`` of float32 data with a large mean: 1e-3 relative) makes far larger than ``sqrt(eps)``,
    the tolerance first used here, which refused such covariances."""
    m = matrix.detach()
    tol = _symmetry_tolerance(m.dtype)
    asym = (m - m.mT).abs().amax(dim=(-2, -1))
    return asym > tol * m.abs().amax(dim=(-2, -1))


def _may_sync(A: Tensor) -> bool:
    """Whether a value of ``A`` may be read on the host here at no cost: an eager call on a CPU tensor, not one
    that ``torch.compile``, ``torch.export``, ``torch.jit.trace`` or a ``torch.func`` transform traces (where it
    would break the graph, fail as data-dependent or be baked in). On a GPU the read would wait for the queue at
    every call of a replacement chosen for its speed."""
    return A.device.type == "cpu" and not (torch.compiler.is_compiling() or in_export() or torch.jit.is_tracing()
                                           or in_func_transform())


def _refuse_asymmetric(A: Tensor) -> Tensor | None:
    """For ``uplo=None`` (the replacement of an SVD site's ``U diag(S^p) U^T`` / ``U diag(S^p) Vh`` ...): the
    iteration computes a power of ``A`` itself, which is the pattern's value only for a symmetric (positive
    definite) ``A``, where ``U = V``. For a square non-symmetric ``A`` (a data matrix with as many rows as columns)
    ``U diag(S^p) U^T`` is ``(A A^T)^(p/2)`` and ``U diag(S^p) Vh`` is ``(A A^T)^((p-1)/2) A``: the replacement
    silently gave other values. Raise in eager calls on CPU (one host read); elsewhere (:func:`_may_sync`) return
    the mask of such matrices, whose results are then NaN."""
    asymmetric = _asymmetric(A)
    if not _may_sync(A):
        return asymmetric
    if bool(asymmetric.any()):
        count = int(asymmetric.sum())
        raise LayerArgumentError(
            f"power_newton_schulz (uplo=None): {count} of {max(1, asymmetric.numel())} matrices (input shape "
            f"{tuple(A.shape)}) are far from symmetric (max |A - A^T| above {_symmetry_tolerance(A.dtype):.2g} "
            "of max |A|). The Newton-Schulz replacement of an SVD site's U diag(S^p) U^T (or U diag(S^p) Vh) equals "
            "it only for a symmetric positive definite matrix (a covariance), where U = V; for this input it would "
            "compute something else. Transform with method 'taylor' for this site (or export to .pt2, which keeps "
            "the exact SVD)")
    return None


def power_newton_schulz(A: Tensor, power: float, iterations: int = 5, shift: float = 0.0, float64: bool = False,
                        uplo: str | None = None, layout: tuple = ()) -> Tensor:
    """``(A + shift I)^power`` for ``power`` in ``{0.5, -0.5}`` by the coupled Newton-Schulz iteration.

    ``uplo="L"`` / ``"U"``: like ``torch.linalg.eigh``, read only that triangle of ``A`` (the matrix is rebuilt
    symmetric from it); ``None``: use the symmetric part of ``A`` (replacing an SVD of a symmetric matrix, which a
    covariance is up to rounding; a matrix far from symmetric is refused, see :func:`_asymmetric` and
    :func:`_refuse_asymmetric`).

    ``layout`` (from the pass) is checked against ``A.dim()`` with :func:`check_layout`: when the replaced code's
    transposes or unsqueezes do not act on the last two dimensions the replacement would not be equivalent, and a
    :class:`~orthofx.errors.LayerArgumentError` (a ``ValueError``) says so (this depends only on shapes, so it fails
    on the first call, at transform time when example inputs are given).

    Under ``torch.fx.symbolic_trace`` (``A`` a Proxy, e.g. a second ``orthofx.transform`` of a model that
    ``method: newton_schulz`` rewrote) the call is recorded as one ``call_function`` node, as a
    ``torch.fx.wrap``-ped function is: the checks above read ``A``'s shape, which a Proxy does not carry, and
    tracing into the iteration would only expose its matmuls. Example::

        import torch
        from orthofx.nn.conditioning import power_newton_schulz

        A = torch.eye(3, dtype=torch.float64) * 4
        root = power_newton_schulz(A, -0.5, iterations=20)   # A^(-1/2) = 0.5 * I
        assert torch.allclose(root, 0.5 * torch.eye(3, dtype=torch.float64))
    """
    tracer = fx_tracer_of((A,))
    if tracer is not None:
        # the keyword form svd_conditioning writes, so a re-captured node reads as the pass's own
        return tracer.create_proxy("call_function", power_newton_schulz, (A,),
                                   {"power": power, "iterations": iterations, "shift": shift, "float64": float64,
                                    "uplo": uplo, "layout": layout})
    problem = check_layout(A.dim(), tuple(layout))
    if problem is not None:
        raise LayerArgumentError(f"the Newton-Schulz replacement of V diag(lambda^p) V^T does not fit this input: "
                                 f"{problem}; transform with method 'taylor' for this site")
    _check_square(A, "power_newton_schulz")
    # the matrix is rebuilt from one triangle by transposes (real symmetric only) and the result cast back to A's
    # dtype: a complex Hermitian site (V diag(lambda^p) V^T is no power of it either) gave other values, 0.78 off
    # on a 5 x 5 matrix, and an integer one was truncated (sqrt(9) -> 2); torch.linalg.eigh refuses integers
    _check_input(A, "power_newton_schulz", square=True)
    asymmetric = _refuse_asymmetric(A) if uplo is None else None
    dtype = A.dtype
    if float64:
        A = A.to(torch.float64)
    if uplo is not None and _uplo(uplo, "uplo", "'L', 'U' or None") == "L":
        A = A.tril() + A.tril(-1).mT
    elif uplo is not None:
        A = A.triu() + A.triu(1).mT
    else:  # a covariance symmetric up to rounding (see _asymmetric): the power of its symmetric part
        A = 0.5 * (A + A.mT)
    if shift:
        A = A + torch.diag_embed(A.new_full(A.shape[:-1], float(shift)))
    if power == 0.5:
        out = sqrtm_newton_schulz(A, iterations)
    elif power == -0.5:
        out = inv_sqrtm_newton_schulz(A, iterations)
    else:
        raise LayerArgumentError(f"power must be 0.5 or -0.5, got {power!r}")
    if asymmetric is not None:
        out = out.masked_fill(asymmetric.unsqueeze(-1).unsqueeze(-1), float("nan"))
    return out.to(dtype)


# ------------------------------------------------------------------------------------------- monitor


class PassThrough(nn.Module):
    """Returns its first argument unchanged (what a :class:`DecompositionMonitor` becomes in a frozen model)."""

    def forward(self, x, *args):
        return x


class DecompositionMonitor(ConditionMonitor):
    """Condition-number monitor at a decomposition site; ``forward(x, matrix=None)`` returns ``x`` unchanged.

    ``source`` says where the eigenvalues come from (see the module docstring); ``values_index`` picks the values
    out of ``x`` when ``x`` is a decomposition's tuple (``None``: ``x`` is the values themselves). ``matrix`` is the
    decomposed matrix, needed for ``source="singular_values"`` (symmetry test); for ``source="matrix"`` ``x`` is
    the matrix; ``uplo`` (``"L"`` or ``"U"``, for ``source="matrix"``) is the triangle of it that is read. Buffers
    and their meaning are :class:`~orthofx.nn.decompositions.ConditionMonitor`'s.
    """

    _is_impure = True  # torch.fx dead-code elimination must not drop it
    uplo: str = "L"  # class default: monitors pickled before the attribute existed

    def __init__(self, source: str = "eigenvalues", values_index: int | None = None, op: str = "",
                 history_size: int = 1000, uplo: str = "L") -> None:
        super().__init__(history_size)
        if source not in MONITOR_SOURCES:
            raise LayerArgumentError(f"source must be one of {', '.join(MONITOR_SOURCES)}, got {source!r}")
        self.source = source
        self.values_index = values_index
        self.op = op
        self.uplo = _uplo(uplo, "uplo")

    @staticmethod
    def covariance_eigenvalues(singular_values: Tensor, matrix: Tensor) -> Tensor:
        """Eigenvalues of the covariance an SVD stands for: ``s`` for a square symmetric matrix, else ``s^2``
        (float64: squared in a half-precision or float32 dtype, ``s > 256`` in float16 or ``s > 1.8e19`` in float32
        overflowed to inf, and the monitor reported a NaN kappa and NaN/inf events for a finite matrix)."""
        s = singular_values.detach().to(torch.float64)
        m = matrix.detach()
        if m.shape[-1] != m.shape[-2]:
            return s * s
        return torch.where(_asymmetric(m).unsqueeze(-1), s * s, s)

    def forward(self, x, matrix: Tensor | None = None):
        tracer = fx_tracer_of((x, matrix))
        if tracer is not None:
            kwargs = {} if matrix is None else {"matrix": matrix}
            return record_as_leaf(self, tracer, (x,), kwargs,
                                  "it records the condition number in its buffers, branching on shapes and values")
        if self.source == "matrix":
            _check_square(x, f"DecompositionMonitor({self.op or 'matrix'})")
            # a complex matrix lost its imaginary part in the float64 cast below (a ComplexWarning and a wrong kappa)
            _check_input(x, f"DecompositionMonitor({self.op or 'matrix'})", square=True)
            with torch.no_grad():
                # a matrix with a NaN/inf gets NaN eigenvalues (a NaN event) instead of a LAPACK error
                matrix = _lower(x.detach(), self.uplo).to(torch.float64)
                finite, bad = _finite_part(matrix, "L", sync=False)
                (lam,) = _nan_where(bad, torch.linalg.eigvalsh(finite))
            self.update(lam)
            return x
        values = x if self.values_index is None else x[self.values_index]
        if self.source == "singular_values":
            if matrix is None:
                raise LayerArgumentError("a singular-value monitor needs the decomposed matrix (forward(x, matrix))")
            values = self.covariance_eigenvalues(values, matrix)
        self.update(values)
        return x

    def to_plain(self) -> nn.Module:
        return PassThrough()

    def extra_repr(self) -> str:
        op = f", op={self.op!r}" if self.op else ""
        uplo = ", uplo='U'" if self.uplo == "U" else ""
        return f"source={self.source!r}{op}{uplo}, " + super().extra_repr()
