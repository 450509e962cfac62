"""Pass ``svd_conditioning``: the conditioning-aware SVD meta-layer (P4) at every eigendecomposition / SVD call.

Each selected function site (``torch.linalg.eigh``, ``eigvalsh``, ``svd``, ``svdvals``, ``torch.svd`` and the
``Tensor.svd`` method) is rewritten in the graph, by one of three methods:

``taylor`` (default)
    the call is replaced by the stand-in of :mod:`orthofx.nn.conditioning` with the same outputs
    (``stable_eigh`` ... ``stable_torch_svd``), which runs the custom op ``orthofx::eigh_stable`` /
    ``orthofx::svd_stable`` with P4's Taylor-form backward of order ``taylor_order``: the gradient stays bounded
    (never NaN/inf) on repeated eigenvalues. Forward values are torch's.
``clamp``
    the same ops with the exact backward ``1/(lambda_i - lambda_j)``, the gap clamped from below by
    ``clamp_gap`` (or, when null, by ``eps * max|lambda|``).
``newton_schulz``
    SVD-free: where the graph computes a matrix power from the decomposition, ``V diag(f(lambda)) V^T`` with
    ``f(lambda) = lambda^(1/2)`` or ``lambda^(-1/2)``, the whole pattern *and the decomposition* are replaced by
    :func:`orthofx.nn.conditioning.power_newton_schulz` (coupled Newton-Schulz, ``iterations`` steps, matmuls
    only, so exportable to ONNX). It assumes a symmetric positive definite matrix (covariances): clamps of the
    eigenvalues at ``min >= 0`` are dropped (exact for PD matrices; a clamp at ``c > 0`` differs where eigenvalues
    are below ``c``, recorded in the Change), ``lambda + c`` becomes ``A + c I``. When no such pattern covers every
    use of the decomposition (eigvalsh/svdvals, other powers, the eigenvectors used elsewhere ...), ``fallback``
    decides: ``stable`` (default) applies ``taylor`` and the Change's status says why Newton-Schulz was skipped;
    ``keep`` leaves the site untouched (status ``skipped: <reason>``); ``error`` raises, before any pass runs.
    These checks read the graph only, so ``orthofx.explain`` shows the fallback each site gets.

Graph patterns recognised for the power (``V``: eigenvectors, or for an SVD ``U`` / ``V``; ``L``: eigenvalues or
singular values; ``T(.)``: ``.mT``, ``.transpose(-2, -1)`` / ``(-1, -2)`` / ``(1, 2)`` / ``(0, 1)``, ``swapaxes``,
``.T`` / ``.t()`` (2-D), ``permute`` swapping the last two dims; ``@``: ``@``, ``matmul``, ``bmm``, ``mm``; in a
graph captured by torch.export also the ATen overloads it keeps, ``aten.swapaxes``, ``aten.numpy_T``,
``aten.div.Tensor``, and full ``aten.slice`` s before an unsqueeze; the torch functions also with their tensors
passed by keyword, ``torch.pow(input=L, exponent=-0.5)``, ``torch.mul(V, other=D)``)::

    D = f(L)                       f: sqrt, rsqrt, pow(+-0.5), ** +-0.5, 1 / sqrt(.), reciprocal(sqrt(.))
                                      (also times 1.0, as torch.export records 1 / x),
                                      applied to L through clamp(min=c) / clamp_min / relu / + c
    V @ diag_embed(D) @ T(V)       (either association; torch.diag(D) for 2-D)
    (V * D.unsqueeze(-2)) @ T(V)   (also D[..., None, :], unsqueeze(k) with k = ndim - 2; either operand order;
                                    V * D for 2-D matrices, where D broadcasts along the columns)
    V @ (D.unsqueeze(-1) * T(V))   (also D[..., None], unsqueeze(ndim - 1))
    V / D...                       (any of the scalings above written as a division: the power negated)
    einsum("pq,q,rq->pr", V, D, V) (also with T(V) as "qr" on the right or "qp" on the left, "..." batch dims)

``V`` and ``L`` may each be cast back from a decomposition run in another precision (``eigh_stable(A,
float64=True)``, or ``torch.linalg.eigh(A.double())`` with ``.to(A.dtype)`` / ``.float()`` on both outputs): the
power is then computed from the decomposed (float64) matrix and cast the same way.

For SVDs the left factor may be ``U`` or ``V`` and the right one ``Vh``, ``T(U)`` or ``T(V)`` (equal for a
symmetric PD input; a matrix that is not symmetric is refused when the replacement runs, see
:func:`orthofx.nn.conditioning.power_newton_schulz` with ``uplo=None``: a square data matrix's ``U diag(S^p) Vh``
is no power of it, and the rewrite gave other values). Ranks are usually unknown to an fx graph: index arithmetic
that is only right for some ranks (``unsqueeze(0)``, ``transpose(0, 1)``, ``.T``) is recorded in the replacement's
``layout`` argument and checked against the input's rank on the first call (a ``LayerArgumentError``, which is a
``ValueError``, naming the mismatch, at transform time when example inputs are given); it is checked at transform
time when the graph's nodes carry shapes (export capture), and so is a non-square decomposed matrix (an SVD of a
data matrix), which then goes to ``fallback``. Index arithmetic that is right for no rank (``V *
L.rsqrt().unsqueeze(-1)`` scales the rows of ``V``: ``diag(D) V V^T``, no power) is no pattern at all.

Monitoring (``monitor: true``): a :class:`orthofx.nn.conditioning.DecompositionMonitor` is registered in the
GraphModule as ``orthofx_monitor_<n>`` and called on the decomposition's result (a pass-through), recording
``kappa`` of the matrix entering the site (eigenvalues; for SVDs the covariance's, ``(s_max/s_min)^2`` for a data
matrix and ``s_max/s_min`` for a symmetric input; for Newton-Schulz a forward-only ``eigvalsh``) and NaN/inf
events, with tensor ops only (``torch.compile(fullgraph=True)`` keeps it in one graph). Read it with
``gm.get_submodule(change.after["monitor"]).summary()``; ``orthofx.report.monitors(gm)`` lists them by site.
A matrix holding a NaN/inf does not raise: the stable ops give it NaN outputs, and the monitor counts a NaN event.

Inference forms (used by :func:`orthofx.freeze` and :func:`orthofx.export`, not by the pass):

* :func:`fold_constant_decompositions` (exact; ``freeze`` calls it): a decomposition of a matrix that does not
  depend on the model's inputs (decorrelated BatchNorm's running covariance in eval mode) is evaluated once and
  what is computed from it (the whitening matrix) becomes a buffer.
* :func:`to_newton_schulz` (approximate; ``export`` to ``.onnx`` calls it on the frozen copy): the same power
  patterns as ``method: newton_schulz``, in an already transformed (or plain, or frozen) GraphModule, become
  Newton-Schulz iterations, for ONNX, which has no eigendecomposition. Decompositions without such a pattern
  (``eigvalsh``, ``svdvals``, eigenvectors used elsewhere) have no matmul-only form: ONNX export names them.

Example::

    import torch, orthofx
    model = orthofx.models.get("gcp_cnn")
    x = orthofx.models.example_input("gcp_cnn", batch=4)
    gm = orthofx.transform(model, {"rules": [{"match": {"op": "linalg.eigh"}, "apply": "svd_conditioning",
                                              "with": {"method": "newton_schulz", "iterations": 10}}]},
                           example_inputs=(x,))
    print(orthofx.report(gm))        # kappa, kappa_max and NaN events of the site (orthofx.report.monitors)
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from ..errors import ArgumentError, TransformError
from ..nn import conditioning as cond
from .base import Change, Param, Pass, PassContext, PlanEntry, each_mode
from .registry import register_pass

__all__ = ["SVDConditioning", "to_newton_schulz", "fold_constant_decompositions", "plain_decompositions",
           "decomposition_op", "DECOMPOSITIONS", "MONITOR_PREFIX"]

#: Submodule names of the inserted monitors: ``orthofx_monitor_<n>``.
MONITOR_PREFIX = "orthofx_monitor_"

_OPS = ("linalg.eigh", "linalg.eigvalsh", "linalg.svd", "linalg.svdvals", "svd")


# ------------------------------------------------------------------------------------------ op descriptions

@dataclass(frozen=True)
class _OpInfo:
    """How one decomposition is called and what it returns."""

    params: tuple[tuple[str, Any], ...]       # positional parameters after the input, with defaults
    stable: Any                               # the stand-in of orthofx.nn.conditioning
    fields: tuple[str, ...] = ()              # names of the tuple outputs (empty: a single tensor)
    values: int | None = None                 # index of the eigen/singular values in the tuple
    left: frozenset[int] = frozenset()        # outputs that are V-like factors (columns = vectors)
    right: frozenset[int] = frozenset()       # outputs that are V^T-like factors
    return_type: str = ""                     # torch.return_types class name
    monitor_source: str = "eigenvalues"
    label: str = ""                           # name in statuses


_INFO: dict[str, _OpInfo] = {
    "linalg.eigh": _OpInfo((("UPLO", "L"),), cond.stable_eigh, ("eigenvalues", "eigenvectors"), 0,
                           frozenset({1}), frozenset(), "linalg_eigh", "eigenvalues", "eigh"),
    "linalg.eigvalsh": _OpInfo((("UPLO", "L"),), cond.stable_eigvalsh, label="eigvalsh"),
    "linalg.svd": _OpInfo((("full_matrices", True),), cond.stable_linalg_svd, ("U", "S", "Vh"), 1,
                          frozenset({0}), frozenset({2}), "linalg_svd", "singular_values", "svd"),
    "linalg.svdvals": _OpInfo((), cond.stable_svdvals, monitor_source="singular_values", label="svdvals"),
    "svd": _OpInfo((("some", True), ("compute_uv", True)), cond.stable_torch_svd, ("U", "S", "V"), 1,
                   frozenset({0, 2}), frozenset(), "svd", "singular_values", "torch.svd"),
}

# Targets of already rewritten (stable) or plain decompositions, for to_newton_schulz (the ATen overloads a
# torch.export graph holds take the same arguments and return the same tuples as the torch functions).
_TARGET_OPS: dict[Any, str] = {
    torch.linalg.eigh: "linalg.eigh", cond.stable_eigh: "linalg.eigh",
    torch.linalg.svd: "linalg.svd", cond.stable_linalg_svd: "linalg.svd",
    torch.svd: "svd", cond.stable_torch_svd: "svd",
    torch.ops.aten.linalg_eigh.default: "linalg.eigh", torch.ops.aten.linalg_svd.default: "linalg.svd",
}
_STABLE_EXTRA = ("taylor_order", "float64", "clamp_gap", "plain")

#: The custom ops of :mod:`orthofx.nn.decompositions` (what a traced forward calling ``orthofx.nn.eigh_stable`` /
#: ``svd_stable`` holds, one node; the target prints as ``orthofx.eigh_stable(.default)``), by name: the stand-in
#: of :mod:`orthofx.nn.conditioning` computing the same values, the stand-in's keyword for each of the op's
#: arguments after the matrix, and the stand-in's options that give the op's outputs (``svd_stable`` is reduced).
#: ``float64=True`` is no argument of the op: ``eigh_stable`` casts the matrix before the call and the outputs
#: back after it, casts that the power patterns read through (:func:`_output_of`).
_CUSTOM_OPS: dict[str, tuple[Any, tuple[str, ...], dict[str, Any]]] = {
    "orthofx.eigh_stable": (cond.stable_eigh, ("taylor_order", "clamp_gap", "UPLO"), {}),
    "orthofx.svd_stable": (cond.stable_linalg_svd, ("taylor_order", "clamp_gap"), {"full_matrices": False}),
}
_CUSTOM_SCHEMA = ("A", "taylor_order", "clamp_gap", "uplo")  # the custom ops' arguments (svd_stable's lack uplo)


def stand_in_call(node: fx.Node) -> tuple[Any, tuple, dict[str, Any]] | None:
    """``(stand-in, args, kwargs)``: the call of the stand-in of :mod:`orthofx.nn.conditioning` that computes what
    ``node``'s call of the custom op ``orthofx::eigh_stable`` / ``orthofx::svd_stable`` computes (``None`` for any
    other node), so that the code reading the stand-ins' calls reads the custom ops' too.

    Example: ``torch.ops.orthofx.eigh_stable.default(A, 9, None, "U")`` is ``stable_eigh(A, taylor_order=9,
    clamp_gap=None, UPLO="U")``; ``torch.ops.orthofx.svd_stable.default(A, 9, None)`` is
    ``stable_linalg_svd(A, full_matrices=False, taylor_order=9, clamp_gap=None)``."""
    if node.op != "call_function":
        return None
    entry = _CUSTOM_OPS.get(str(node.target).removesuffix(".default"))
    if entry is None:
        return None
    stand_in, names, options = entry
    given = dict(zip(_CUSTOM_SCHEMA, node.args)) | dict(node.kwargs)
    kwargs = {new: given[old] for old, new in zip(_CUSTOM_SCHEMA[1:], names) if old in given}
    return stand_in, (given["A"],), {**options, **kwargs}


class _Unsupported(Exception):
    """A call this pass cannot rewrite; the message is the reason."""


def _call_options(node: fx.Node, op: str) -> tuple[fx.Node, dict[str, Any]]:
    """The decomposed matrix's node and the call's options (torch's defaults filled in)."""
    info = _INFO[op]
    custom = stand_in_call(node)  # a custom op's call, read as its stand-in's
    args = list(custom[1] if custom else node.args)
    kwargs = dict(custom[2] if custom else node.kwargs)
    matrix = args.pop(0) if args else kwargs.pop("input", kwargs.pop("A", None))
    if not isinstance(matrix, fx.Node):
        raise _Unsupported("the decomposed matrix is not a traced value")
    if kwargs.pop("out", None) is not None:
        raise _Unsupported("calls with out= are not rewritten")
    kwargs.pop("driver", None)  # a cuSOLVER choice; the stable op picks its own
    options: dict[str, Any] = {}
    for i, (name, default) in enumerate(info.params):
        value = args[i] if i < len(args) else kwargs.pop(name, default)
        if isinstance(value, fx.Node):
            raise _Unsupported(f"argument {name} is a traced value, not a constant")
        options[name] = value
    if isinstance(options.get("UPLO"), str):
        options["UPLO"] = options["UPLO"].upper()  # torch accepts "l" / "u" too
    for name in _STABLE_EXTRA:  # a stand-in already in the graph (to_newton_schulz)
        kwargs.pop(name, None)
    if len(args) > len(info.params) or kwargs:
        raise _Unsupported(f"unexpected arguments {args[len(info.params):] or ''}{kwargs or ''}")
    return matrix, options


# ------------------------------------------------------------------------------------------ node predicates

_MATMUL_FNS = {operator.matmul, torch.matmul, torch.bmm, torch.mm}
_MATMUL_METHODS = {"matmul", "bmm", "mm", "__matmul__"}
_MUL_FNS = {operator.mul, torch.mul}
_MUL_METHODS = {"mul", "__mul__"}
_DIV_FNS = {operator.truediv, torch.div, torch.true_divide, torch.ops.aten.div.Tensor}
_DIV_METHODS = {"div", "__truediv__", "true_divide"}
_ADD_FNS = {operator.add, torch.add}
_ADD_METHODS = {"add", "__add__", "__radd__"}
# torch.export capture keeps some views as ATen overloads (same arguments as the torch functions): a graph
# captured that way wrote V.swapaxes(-1, -2) as aten.swapaxes, V.T as aten.numpy_T and L[:, None] as a full
# aten.slice before the unsqueeze, and none of its patterns was recognised
_ATEN = torch.ops.aten
_TRANSPOSE_FNS = {torch.transpose, torch.swapaxes, torch.swapdims, _ATEN.transpose.int, _ATEN.swapaxes.default,
                  _ATEN.swapdims.default}
_TRANSPOSE_METHODS = {"transpose", "swapaxes", "swapdims"}
_T_FNS = {torch.t, _ATEN.t.default, _ATEN.numpy_T.default}  # a transpose of 2-D matrices only
_PERMUTE_FNS = {torch.permute, _ATEN.permute.default}
_UNSQUEEZE_FNS = {torch.unsqueeze, _ATEN.unsqueeze.default}
_DIAG_EMBED_FNS = {torch.diag_embed, _ATEN.diag_embed.default}
_DIAG_FNS = {torch.diag, _ATEN.diag.default}
_EINSUM_FNS = {torch.einsum, _ATEN.einsum.default}
_NUMBER = (int, float)
# torch.export's check of a tensor's dtype before it casts it (older torch has no such op)
_METADATA_CHECKS = {_ATEN._assert_tensor_metadata.default} if hasattr(_ATEN, "_assert_tensor_metadata") else set()


def _is(node: Any, fns: set = frozenset(), methods: set = frozenset()) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target in fns) or (node.op == "call_method" and node.target in methods))


def _operands(node: fx.Node) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a call with torch's leading tensor parameters moved to ``args``: fx records a call as
    written, and ``torch.pow(input=L, exponent=-0.5)``, ``torch.unsqueeze(input=D, dim=-2)``, ``torch.clamp(input=L,
    min=0)`` ... have no positional argument, where the patterns read ``node.args[0]`` (an ``IndexError`` that
    failed the whole transform). ``other`` / ``mat2`` follow ``input`` (``torch.mul(V, other=D)``, ``torch.bmm(input=X,
    mat2=Y)``)."""
    args, kwargs = node.args, node.kwargs
    if node.op != "call_function" or not (("input" in kwargs and not args) or (
            len(args) == 1 and ("other" in kwargs or "mat2" in kwargs))):
        return args, kwargs
    kwargs = dict(kwargs)
    if not args:
        args = (kwargs.pop("input"),)
    for name in ("other", "mat2"):
        if name in kwargs:
            args += (kwargs.pop(name),)
            break
    return args, kwargs


def _input(node: fx.Node) -> Any:
    """The first operand of a call (:func:`_operands`), ``None`` when it has none."""
    args = _operands(node)[0]
    return args[0] if args else None


def _unary(node: fx.Node) -> bool:
    """Whether the call has exactly one operand and no other argument (``torch.sqrt(L)``, ``sqrt(input=L)``)."""
    args, kwargs = _operands(node)
    return len(args) == 1 and not kwargs


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    args, kwargs = _operands(node)
    return args[index] if len(args) > index else kwargs.get(name, default)


def _binary(node: fx.Node, fns: set, methods: set) -> tuple[Any, Any] | None:
    if not _is(node, fns, methods):
        return None
    args, kwargs = _operands(node)
    if len(args) != 2 or kwargs:
        return None
    return args[0], args[1]


def _out_index(node: Any, dec: fx.Node, info: _OpInfo) -> int | None:
    """``i`` when ``node`` is ``dec[i]`` or ``dec.<field i>``."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.args and node.args[0] is dec):
        return None
    n = len(info.fields)
    if node.target is operator.getitem and isinstance(node.args[1], int) and -n <= node.args[1] < n:
        return node.args[1] % n
    if node.target is getattr and node.args[1] in info.fields:
        return info.fields.index(node.args[1])
    return None


_CAST_METHODS = {"float": torch.float32, "double": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16}


def _cast_of(node: Any) -> tuple[fx.Node, Any] | None:
    """``(source, dtype)`` when ``node`` only converts the dtype of ``source``: ``source.to(dtype)`` with a
    ``torch.dtype`` or a ``x.dtype`` node (``eigh_stable(A, float64=True)`` casts its results back that way),
    ``.float()`` / ``.double()`` / ``.half()`` / ``.bfloat16()``, torch.export's ``aten.to.dtype(source, dtype)``
    (after an ``aten._assert_tensor_metadata`` of ``source``, see :func:`_output_of`) and ``aten._to_copy(source,
    dtype=)``."""
    if not isinstance(node, fx.Node) or not node.args:
        return None
    if node.op == "call_method" and node.target in _CAST_METHODS and len(node.args) == 1 and not node.kwargs:
        return node.args[0], _CAST_METHODS[node.target]
    if node.op == "call_method" and node.target == "to" and len(node.args) + len(node.kwargs) == 2:
        dtype = node.args[1] if len(node.args) == 2 else node.kwargs.get("dtype")
    elif node.op == "call_function" and node.target is _ATEN._to_copy.default and len(node.args) == 1 and set(
            node.kwargs) == {"dtype"}:
        dtype = node.kwargs["dtype"]
    elif node.op == "call_function" and node.target is _ATEN.to.dtype and len(node.args) == 2 and not node.kwargs:
        dtype = node.args[1]  # how torch.export records x.to(dtype), x.float(), x.double()
    else:
        return None
    if isinstance(dtype, torch.dtype) or _dtype_read(dtype) is not None:
        return node.args[0], dtype
    return None  # .to(device), .to(other_tensor): more than a dtype


def _dtype_read(node: Any) -> fx.Node | None:
    """``x`` when ``node`` is ``x.dtype``."""
    if (isinstance(node, fx.Node) and node.op == "call_function" and node.target is getattr
            and node.args[1:] == ("dtype",)):
        return node.args[0]
    return None


def _same_dtype(a: Any, b: Any) -> bool:
    """Whether two cast targets are the same dtype: equal constants, or reads of the same tensor's dtype."""
    if isinstance(a, torch.dtype) or isinstance(b, torch.dtype):
        return a == b
    return a is b or (_dtype_read(a) is not None and _dtype_read(a) is _dtype_read(b))


def _output_of(node: Any, dec: fx.Node, info: _OpInfo) -> tuple[int, list[fx.Node], Any] | None:
    """``(i, nodes, cast)`` when ``node`` is output ``i`` of ``dec`` (:func:`_out_index`), or a dtype cast of it
    (``cast``: its target dtype, else ``None``); ``nodes``: the output's node and the cast."""
    idx = _out_index(node, dec, info)
    if idx is not None:
        return idx, [node], None
    cast = _cast_of(node)
    if cast is not None:
        idx = _out_index(cast[0], dec, info)
        if idx is not None:
            # torch.export checks the source's dtype before each cast (aten._assert_tensor_metadata, a user of the
            # output without users of its own): part of the casts, erased with them
            checks = [user for user in cast[0].users if _is(user, _METADATA_CHECKS)]
            return idx, [cast[0], *checks, node], cast[1]
    return None


def _transpose_of(node: Any) -> tuple[fx.Node, list] | None:
    """``(source, layout constraints)`` when ``node`` swaps the last two dims of ``source``."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2:
        if node.args[1] == "mT":
            return node.args[0], []
        if node.args[1] == "T":
            return node.args[0], [("ndim", 2)]
        return None
    if not isinstance(_input(node), fx.Node):
        return None
    if _is(node, _TRANSPOSE_FNS, _TRANSPOSE_METHODS):
        i, j = _arg(node, 1, "dim0"), _arg(node, 2, "dim1")
        if isinstance(i, int) and isinstance(j, int):
            return _input(node), [("transpose", i, j)]
        return None
    if _is(node, _T_FNS, {"t"}) and _unary(node):
        return _input(node), [("ndim", 2)]
    if _is(node, _PERMUTE_FNS, {"permute"}):
        args, kwargs = _operands(node)
        rest = args[1:]
        if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
            dims = tuple(rest[0])
        elif rest:
            dims = tuple(rest)
        else:
            dims = tuple(kwargs.get("dims", ()))
        k = len(dims)
        if k >= 2 and all(isinstance(d, int) for d in dims) and [d % k for d in dims] == (
                list(range(k - 2)) + [k - 1, k - 2]):
            return _input(node), [("ndim", k)]
    return None


def _unsqueeze_of(node: Any) -> tuple[fx.Node, int, list[fx.Node]] | None:
    """``(source, dim, slices)`` for ``source.unsqueeze(dim)`` and the equivalent indexing with a single ``None``;
    ``slices``: the full slices between ``source`` and the unsqueeze (torch.export records ``L[:, None]`` as one
    before ``unsqueeze(L, 1)``), which are skipped."""
    if _is(node, _UNSQUEEZE_FNS, {"unsqueeze"}):
        dim = _arg(node, 1, "dim")
        if not isinstance(dim, int) or _input(node) is None:
            return None
        source, slices = _through_full_slices(_input(node))
        return source, dim, slices
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem:
        src, index = node.args
        if not isinstance(index, tuple):
            index = (index,)
        full = slice(None, None, None)
        if index.count(None) != 1 or any(i not in (None, full, Ellipsis) for i in index) or index.count(Ellipsis) > 1:
            return None
        if Ellipsis in index:
            if index[0] is not Ellipsis:
                return None
            tail = index[1:]  # (..., None, :) -> -2, (..., None) -> -1
            return src, tail.index(None) - len(tail), []
        return src, index.index(None), []
    return None


def _through_full_slices(node: Any) -> tuple[Any, list[fx.Node]]:
    """``(x, slices)``: ``x`` for ``aten.slice.Tensor(x, dim, start, end, step)`` taking all of ``dim`` (start 0 or
    None, end None or at least 2^62, step 1), repeatedly, and the slices passed; ``(node, [])`` for other nodes.
    Such a slice is the identity."""
    slices: list[fx.Node] = []
    while (isinstance(node, fx.Node) and node.op == "call_function" and node.target is _ATEN.slice.Tensor
           and not node.kwargs and len(node.args) <= 5):
        start = node.args[2] if len(node.args) > 2 else None
        end = node.args[3] if len(node.args) > 3 else None
        step = node.args[4] if len(node.args) > 4 else 1
        if start not in (0, None) or step != 1 or not (end is None or (isinstance(end, int) and end >= 2 ** 62)):
            break
        slices.append(node)
        node = node.args[0]
    return node, slices


def _diag_of(node: Any) -> tuple[fx.Node, list] | None:
    if not isinstance(node, fx.Node) or _input(node) is None:
        return None
    if _is(node, _DIAG_EMBED_FNS, {"diag_embed"}):
        offset = _arg(node, 1, "offset", 0)
        dim1, dim2 = _arg(node, 2, "dim1", -2), _arg(node, 3, "dim2", -1)
        if offset == 0 and dim1 == -2 and dim2 == -1:
            return _input(node), []
        return None
    if _is(node, _DIAG_FNS, {"diag"}) and _arg(node, 1, "diagonal", 0) == 0:
        return _input(node), [("ndim", 2)]
    return None


@dataclass
class _Power:
    values: fx.Node
    power: float
    shift: float = 0.0
    notes: list[str] = field(default_factory=list)
    nodes: list[fx.Node] = field(default_factory=list)
    cast: Any = None  # the dtype the values were cast to (see _output_of)


def _base_of(node: Any, dec: fx.Node, info: _OpInfo) -> _Power | None:
    """Walk from ``node`` through clamps / relu / ``+ c`` down to the decomposition's values."""
    nodes, notes, shift = [], [], 0.0
    cur = node
    while isinstance(cur, fx.Node) and ((out := _output_of(cur, dec, info)) is None or out[0] != info.values):
        if _is(cur, {torch.clamp, torch.clip}, {"clamp", "clip"}):
            low, high = _arg(cur, 1, "min"), _arg(cur, 2, "max")
            if high is not None or not isinstance(low, _NUMBER):
                return None
            notes.append(f"clamp(min={low}) dropped" + ("" if low <= 0 else
                                                        f" (differs where an eigenvalue is below {low})"))
        elif _is(cur, {torch.clamp_min}, {"clamp_min"}):
            low = _arg(cur, 1, "min")
            if not isinstance(low, _NUMBER):
                return None
            notes.append(f"clamp_min({low}) dropped" + ("" if low <= 0 else
                                                        f" (differs where an eigenvalue is below {low})"))
        elif _is(cur, {torch.relu, F.relu}, {"relu"}) and _unary(cur):
            notes.append("relu dropped")
        elif (pair := _binary(cur, _ADD_FNS, _ADD_METHODS)) is not None:
            a, b = pair
            if isinstance(b, _NUMBER) and isinstance(a, fx.Node):
                shift += float(b)
            elif isinstance(a, _NUMBER) and isinstance(b, fx.Node):
                shift += float(a)
                a = b
            else:
                return None
            nodes.append(cur)
            cur = a
            continue
        else:
            return None
        nodes.append(cur)
        cur = _input(cur)
    if not isinstance(cur, fx.Node):
        return None
    return _Power(values=cur, power=0.0, shift=shift, notes=notes, nodes=nodes + out[1], cast=out[2])


def _power_of(node: Any, dec: fx.Node, info: _OpInfo) -> _Power | None:
    """``f(L)`` with ``f(x) = (x [+ c])^p``, ``p = +-1/2``, in the forms listed in the module docstring."""
    if not isinstance(node, fx.Node):
        return None
    p = None
    inner = None
    if _is(node, {torch.sqrt}, {"sqrt"}) and _unary(node):
        p, inner = 0.5, _input(node)
    elif _is(node, {torch.rsqrt}, {"rsqrt"}) and _unary(node):
        p, inner = -0.5, _input(node)
    elif _is(node, {torch.pow, operator.pow}, {"pow", "__pow__"}):
        exponent = _arg(node, 1, "exponent")
        if isinstance(exponent, _NUMBER) and float(exponent) in (0.5, -0.5):
            p, inner = float(exponent), _input(node)
    elif (pair := _binary(node, _MUL_FNS, _MUL_METHODS)) is not None and any(
            isinstance(v, _NUMBER) and not isinstance(v, bool) and float(v) == 1.0 for v in pair):
        # x * 1.0: how torch.export records 1 / x (mul(reciprocal(x), 1.0))
        other = pair[1] if isinstance(pair[0], _NUMBER) else pair[0]
        sub = _power_of(other, dec, info)
        if sub is not None:
            sub.nodes.append(node)
        return sub
    elif _is(node, {torch.reciprocal}, {"reciprocal"}) and _unary(node):
        sub = _power_of(_input(node), dec, info)
        if sub is not None:
            sub.power = -sub.power
            sub.nodes.append(node)
        return sub
    elif _is(node, _DIV_FNS, {"__rtruediv__"}):
        args, kwargs = _operands(node)
        num, den = (args + (None, None))[:2]
        if node.op == "call_method":  # x.__rtruediv__(1) == 1 / x
            num, den = den, num
        if isinstance(num, _NUMBER) and float(num) == 1.0 and not kwargs:
            sub = _power_of(den, dec, info)
            if sub is not None:
                sub.power = -sub.power
                sub.nodes.append(node)
            return sub
    if p is None:
        return None
    base = _base_of(inner, dec, info)
    if base is None:
        return None
    base.power = p
    base.nodes.append(node)
    return base


def _factor_of(node: Any, dec: fx.Node, info: _OpInfo) -> tuple[str, list, list[fx.Node], Any] | None:
    """``("left" | "right", layout, nodes, cast)``: ``node`` is an orthogonal factor of ``dec`` or its transpose
    (``cast``: the dtype the factor was cast to, see :func:`_output_of`)."""
    out = _output_of(node, dec, info)
    if out is not None:
        idx, nodes, cast = out
        if idx in info.left:
            return "left", [], nodes, cast
        if idx in info.right:
            return "right", [], nodes, cast
        return None
    t = _transpose_of(node)
    if t is None:
        return None
    sub = _factor_of(t[0], dec, info)
    if sub is None:
        return None
    side, layout, nodes, cast = sub
    return ("right" if side == "left" else "left"), layout + t[1], nodes + [node], cast


@dataclass
class _Match:
    """One ``V diag(f(L)) V^T`` found in the graph: the output node and every node it consists of."""

    output: fx.Node
    power: _Power
    layout: list
    nodes: list[fx.Node]  # internal nodes (output excluded)
    cast: Any = None  # the dtype every output of the decomposition in the pattern was cast to (float64=True)


def _scaled_factor(node: Any, side: str, dec: fx.Node, info: _OpInfo):
    """``(power, layout, nodes, casts)`` when ``node`` is a ``side`` factor scaled by ``f(L)``: ``V *
    D.unsqueeze(-2)`` / ``V @ diag(D)`` / ``V * D`` (2-D matrices: ``D`` broadcasts along the columns) for the left
    side, ``D.unsqueeze(-1) * V^T`` / ``diag(D) @ V^T`` for the right side, and ``V / D...``, ``V^T / D...`` (the
    power negated); ``casts``: the factor's and the values' dtype casts (:func:`_output_of`)."""
    scalings = []  # (factor, scale, sign of the power)
    if (pair := _binary(node, _MUL_FNS, _MUL_METHODS) if isinstance(node, fx.Node) else None) is not None:
        scalings = [(pair[0], pair[1], 1), (pair[1], pair[0], 1)]
    elif (pair := _binary(node, _DIV_FNS, _DIV_METHODS) if isinstance(node, fx.Node) else None) is not None:
        scalings = [(pair[0], pair[1], -1)]  # D / V scales nothing
    for fac, other, sign in scalings:
        f = _factor_of(fac, dec, info)
        if f is None or f[0] != side:
            continue
        u = _unsqueeze_of(other)
        if u is None and side == "left":
            # V * D scales V's columns when D is 1-D (the matrix 2-D); on the right, D * V^T would scale the
            # columns of V^T, which is no V diag(f(L)) V^T
            pw, layout, extra = _power_of(other, dec, info), [("ndim", 2)], []
        elif u is not None:
            kind = "col" if side == "left" else "row"
            pw, layout, extra = _power_of(u[0], dec, info), [(kind, u[1])], u[2] + [other]
        else:
            continue
        if pw is None:
            continue
        pw.power *= sign
        return pw, f[1] + layout, f[2] + extra + [node], [f[3], pw.cast]
    if scalings:
        return None
    pair = _binary(node, _MATMUL_FNS, _MATMUL_METHODS) if isinstance(node, fx.Node) else None
    if pair is not None:
        fac, other = pair if side == "left" else pair[::-1]
        f = _factor_of(fac, dec, info)
        d = _diag_of(other)
        if f is None or f[0] != side or d is None:
            return None
        pw = _power_of(d[0], dec, info)
        if pw is None:
            return None
        return pw, f[1] + d[1], f[2] + [other, node], [f[3], pw.cast]
    return None


def _consistent_cast(casts: list) -> tuple[bool, Any]:
    """``(ok, cast)`` for the dtype casts of a pattern's outputs (:func:`_output_of`): every output cast alike
    (eigh in float64, its results cast back) or none. The product of mixed dtypes would be promoted, which the
    rewrite's one cast cannot reproduce."""
    if any(c is None for c in casts):
        return all(c is None for c in casts), None
    return all(_same_dtype(casts[0], c) for c in casts[1:]), casts[0]


def _einsum_power(node: fx.Node, dec: fx.Node, info: _OpInfo) -> _Match | None:
    """``torch.einsum("pq,q,rq->pr", V, D, V)`` (``V diag(D) V^T``; also ``"pq,q,qr->pr"`` with a right factor such
    as ``Vh``, either factor given transposed by its subscripts, and ``...`` batch dimensions on every operand and
    the output)."""
    operands = list(node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    equation = node.args[0] if node.args else None
    if not isinstance(equation, str) or len(operands) != 3 or any(v is not None for v in node.kwargs.values()):
        return None
    inputs, arrow, output = equation.replace(" ", "").partition("->")
    terms = inputs.split(",") + [output]
    batched = [t.startswith("...") for t in terms]
    if not arrow or len(terms) != 4 or (any(batched) and not all(batched)):
        return None
    a, d, b, out = (t[3:] if batched[0] else t for t in terms)
    if len(a) != 2 or len(d) != 1 or len(b) != 2 or len(set(a + b)) != 3 or d not in a or d not in b \
            or "." in a + b + d + out or out != a.replace(d, "") + b.replace(d, ""):
        return None
    x, y = _factor_of(operands[0], dec, info), _factor_of(operands[2], dec, info)
    pw = _power_of(operands[1], dec, info)
    # x[p, q] D[q] y[r, q] is X diag(D) Y^T: x must be the left factor when q is its column, the right one (its
    # transpose) when q is its row; likewise y the left factor's transpose side
    if x is None or pw is None or y is None or x[0] != ("left" if a[1] == d else "right") \
            or y[0] != ("left" if b[1] == d else "right"):
        return None
    ok, cast = _consistent_cast([x[3], pw.cast, y[3]])
    if not ok:
        return None
    layout = x[1] + y[1] + ([] if batched[0] else [("ndim", 2)])
    return _Match(node, pw, layout, x[2] + y[2] + pw.nodes, cast=cast)


def _match_power(node: fx.Node, dec: fx.Node, info: _OpInfo) -> _Match | None:
    if _is(node, _EINSUM_FNS):
        return _einsum_power(node, dec, info)
    pair = _binary(node, _MATMUL_FNS, _MATMUL_METHODS)
    if pair is None:
        return None
    x, y = pair
    # (V scaled) @ V^T, or V @ (V^T scaled)
    for scaled, plain, side in ((_scaled_factor(x, "left", dec, info), _factor_of(y, dec, info), "right"),
                                (_scaled_factor(y, "right", dec, info), _factor_of(x, dec, info), "left")):
        if scaled is None or plain is None or plain[0] != side:
            continue
        pw, layout, nodes, casts = scaled
        ok, cast = _consistent_cast(casts + [plain[3]])
        if not ok:
            return None
        return _Match(node, pw, layout + plain[1], nodes + plain[2] + pw.nodes, cast=cast)
    return None


def _fits_some_rank(layout: list) -> bool:
    """Whether the index arithmetic of a match means ``V diag(f(L)) V^T`` for matrices of some rank (torch allows
    at most 64 dimensions). ``V * L.unsqueeze(-1)`` scales the rows of ``V`` whatever the rank: it is another
    computation, which the pass used to rewrite all the same, and the rewritten model then raised on every call
    (the rank check that runs with the input) instead of the site falling back."""
    layout = tuple(tuple(entry) for entry in layout)
    return any(cond.check_layout(ndim, layout) is None for ndim in range(2, 65))


def _find_powers(dec: fx.Node, info: _OpInfo) -> tuple[list[_Match], str | None]:
    """Every power pattern using ``dec`` (in ``dec``'s graph: a two-mode model's other graph is no ``gm.graph``
    while planning), and ``None``, or why the decomposition cannot be removed."""
    if info.values is None:
        return [], "the op returns only the values; there is no V diag(f(lambda)) V^T to replace"
    for user in dec.users:
        if _out_index(user, dec, info) is None:
            return [], f"the decomposition's result is used whole (by node '{user.name}'), not per output"
    matches = []
    for node in dec.graph.nodes:
        m = _match_power(node, dec, info)
        if m is not None and _fits_some_rank(m.layout):
            matches.append(m)
    if not matches:
        return [], "no V diag(lambda^(1/2) or lambda^(-1/2)) V^T computed from the decomposition was found"
    inside = {n for m in matches for n in m.nodes} | {m.output for m in matches}
    internal = {n for m in matches for n in m.nodes}
    for n in internal:
        for user in n.users:
            if user not in inside:
                return [], (f"node '{n.name}' of the pattern is also used by node '{user.name}' outside "
                            "V diag(f(lambda)) V^T, so the decomposition must stay")
    for user in dec.users:
        # an output nobody reads (``U, S, Vh = svd(A)`` with ``Vh`` unused) is erased with the decomposition
        if user not in inside and user.users:
            return [], f"output '{user.name}' of the decomposition is used outside V diag(f(lambda)) V^T"
    return matches, None


def _static_shape(node: fx.Node) -> tuple | None:
    """The shape a node's metadata records (export capture), else ``None`` (symbolic tracing records none)."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(val.shape)
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    return tuple(shape) if shape is not None else None


def _static_ndim(node: fx.Node) -> int | None:
    shape = _static_shape(node)
    return len(shape) if shape is not None else None


def _erase_dead(graph: fx.Graph, nodes) -> int:
    """Erase the nodes of ``nodes`` that have no users, repeatedly (last first); returns how many."""
    pending = [n for n in graph.nodes if n in set(nodes)]
    erased = 0
    changed = True
    while changed:
        changed = False
        for n in reversed(pending):
            if n.graph is graph and not n.users and n in pending:
                graph.erase_node(n)
                pending.remove(n)
                erased += 1
                changed = True
    return erased


def _copy_meta(new: fx.Node, old: fx.Node, site: str | None = None) -> None:
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in old.meta:
            new.meta[key] = old.meta[key]
    if site is not None:
        new.meta["orthofx_site"] = site


# ------------------------------------------------------------------------------------------------ rewriting

def _free_attribute_name(gm: torch.nn.Module, prefix: str) -> str:
    """``prefix`` followed by the smallest number ``n >= 0`` that names no attribute of ``gm`` yet."""
    n = 0
    while hasattr(gm, f"{prefix}{n}"):
        n += 1
    return f"{prefix}{n}"


def _add_monitor(gm: fx.GraphModule, monitor: cond.DecompositionMonitor,
                 default_device: torch.device | None = None) -> str:
    """Add ``monitor`` to ``gm`` on the device of ``gm``'s tensors, or, for a model with none (a parameter-free
    covariance head), on ``default_device`` (the user's default device: the monitor is built on the CPU)."""
    name = _free_attribute_name(gm, MONITOR_PREFIX)
    ref = next(iter(gm.parameters()), None)
    if ref is None:
        ref = next(iter(gm.buffers()), None)
    device = ref.device if ref is not None else default_device
    if device is not None:
        monitor.to(device)
    monitor.train(gm.training)  # a new module is in training mode; the transformed model keeps the model's mode
    gm.add_submodule(name, monitor)
    return name


def _rewrite_powers(gm: fx.GraphModule, dec: fx.Node, matrix: fx.Node, uplo: str | None,
                    matches: list[_Match], iterations: int, float64: bool, monitor: str | None,
                    site: str | None) -> int:
    """Replace every match by ``power_newton_schulz(matrix)`` and erase the decomposition; returns nodes erased."""
    graph = gm.graph
    source = matrix
    if monitor is not None:
        with graph.inserting_before(dec):
            source = graph.call_module(monitor, (matrix,))
        _copy_meta(source, dec, site)
    ndim = _static_ndim(matrix)
    for m in matches:
        layout = tuple(tuple(entry) for entry in m.layout)
        if ndim is not None:
            problem = cond.check_layout(ndim, layout)
            if problem is not None:  # pragma: no cover - callers check first
                raise TransformError(problem)
            layout = ()
        kwargs = {"power": m.power.power, "iterations": iterations, "shift": m.power.shift, "float64": float64,
                  "uplo": uplo, "layout": layout}
        with graph.inserting_before(m.output):
            ns = graph.call_function(cond.power_newton_schulz, (source,), kwargs)
            _copy_meta(ns, m.output, site)
            if m.cast is not None:  # the pattern was computed from outputs cast to another dtype
                ns = graph.call_method("to", (ns, m.cast))
                _copy_meta(ns, m.output, site)
        m.output.replace_all_uses_with(ns)
    # the casts' reads of x.dtype (x.to(x_in.dtype)), left without users once the casts are gone
    dtype_reads = [cast[1] for m in matches for n in m.nodes
                   if (cast := _cast_of(n)) is not None and isinstance(cast[1], fx.Node)]
    doomed = [m.output for m in matches] + [n for m in matches for n in m.nodes] + list(dec.users) + [dec]
    return _erase_dead(graph, doomed) + _erase_dead(graph, dtype_reads)


def _layout_problem(matrix: fx.Node, matches: list[_Match]) -> str | None:
    """Why the matches cannot become Newton-Schulz iterations on ``matrix``, as far as its recorded shape tells:
    index arithmetic that does not act on its last two dimensions, or a non-square matrix (an SVD of a data matrix
    ``X``, whose ``U diag(f(S)) U^T`` is ``f`` of ``(X X^T)^(1/2)``, not of ``X``), so that ``fallback`` applies
    instead of the rewritten model failing on its first call."""
    shape = _static_shape(matrix)
    if shape is None:
        return None
    ndim = len(shape)
    rows, cols = shape[-2:] if ndim >= 2 else (None, None)
    if isinstance(rows, int) and isinstance(cols, int) and rows != cols:
        return (f"the decomposed matrix has shape {shape}, not square (an SVD of a data matrix): Newton-Schulz "
                "computes powers of square symmetric positive definite matrices only")
    for m in matches:
        problem = cond.check_layout(ndim, tuple(tuple(e) for e in m.layout))
        if problem is not None:
            return problem
    return None


def _newton_schulz_matches(dec: fx.Node, op: str, matrix: fx.Node,
                           options: dict[str, Any]) -> tuple[list[_Match], str | None]:
    """The power patterns that Newton-Schulz iterations on ``matrix`` replace, with the decomposition ``dec``, and
    ``None``; or ``[]`` and why they cannot. The checks of ``method: newton_schulz`` before it rewrites, which
    planning runs too (:meth:`SVDConditioning.check_plan`), so that ``explain`` shows the ``fallback`` that
    ``transform`` takes."""
    if op == "svd" and not options.get("compute_uv", True):
        return [], "torch.svd(compute_uv=False) has no singular vectors"
    matches, reason = _find_powers(dec, _INFO[op])
    return matches, reason or _layout_problem(matrix, matches)


def _fallback_error(entry: PlanEntry, reason: str) -> TransformError:
    return TransformError(f"site '{entry.site.name}' (rule '{entry.rule_name}'): method newton_schulz cannot be "
                          f"applied: {reason}. Use method taylor, or fallback: stable")


def _fallback_outcome(op: str, reason: str, fallback: str) -> str:
    """What ``explain`` shows for a ``method: newton_schulz`` site that ``fallback`` decides, as ``apply`` records
    it."""
    if fallback == "error":
        return f"fails: newton_schulz cannot be applied: {reason} (fallback: error)"
    if fallback == "keep":
        return f"left unchanged: newton_schulz cannot be applied: {reason} (fallback: keep)"
    return f"stable {_INFO[op].label} (taylor) instead of newton_schulz: {reason} (fallback: stable)"


def _site_node(gm: torch.nn.Module, site) -> fx.Node | None:
    """The node of function site ``site`` in the graph that ``transform`` rewrites it in (a two-mode graph module's
    other graph for a site of its other mode, as the plan collected it), or ``None``."""
    other = getattr(gm, "other_graph", None)
    graph = gm.graph if other is None else other if site.mode else gm.graph_for(gm.graph_training)
    return next((n for n in graph.nodes if n.name == site.node), None)


def _power_name(p: float) -> str:
    return "sqrt" if p == 0.5 else "inverse sqrt"


@register_pass
class SVDConditioning(Pass):
    """Stable eigh/svd (Taylor or clamped backward) with a condition-number monitor, or Newton-Schulz powers."""

    name = "svd_conditioning"
    params = (
        Param("method", "taylor", (str,), "taylor (P4's Taylor-form backward), clamp (exact, gap-clamped) or "
              "newton_schulz (SVD-free matrix power)", choices=("taylor", "clamp", "newton_schulz")),
        Param("taylor_order", 9, (int,), "order of the Taylor form of 1/(lambda_i - lambda_j)", minimum=0),
        Param("float64", False, (bool,), "run the decomposition (or the iteration) in float64 (a float32 model's "
              "eigen- / singular vectors can then come with other signs than its own call's)"),
        Param("clamp_gap", None, (float, type(None)), "bound every gradient weight by 1/clamp_gap",
              minimum=0.0, exclusive_minimum=True),
        Param("iterations", 5, (int,), "Newton-Schulz iterations (method newton_schulz)", minimum=1),
        Param("monitor", True, (bool,), "record the condition number at the site (orthofx_monitor_<n>)"),
        Param("fallback", "stable", (str,), "newton_schulz where no matrix-power pattern is found: stable "
              "(use the taylor method), keep (leave the site) or error", choices=("stable", "keep", "error")),
    )
    site_kinds = frozenset({"function"})
    ops = _OPS
    group = "decomposition"

    def check_plan(self, gm: torch.nn.Module, entries: list[PlanEntry]) -> None:
        """Give each entry that ``apply`` will not rewrite as its method says the outcome ``explain`` shows (a call
        it cannot read; for ``method: newton_schulz`` a site without a matrix power to replace: eigvalsh, svdvals,
        ``torch.svd(compute_uv=False)``, eigenvectors used elsewhere ..., which ``fallback`` decides), by the checks
        ``apply`` runs. ``fallback: error`` is the entry's refusal: ``transform`` raises it before any pass runs
        (it was raised by ``apply``, after the passes of earlier rules had run). Passes change no graph node but
        this one's own, and its rewrite of one site leaves the nodes other sites' checks read."""
        for entry in entries:
            node = _site_node(gm, entry.site)
            if node is None or entry.outcome or entry.refusal is not None:
                continue
            op = entry.site.target
            try:
                matrix, options = _call_options(node, op)
            except _Unsupported as exc:
                entry.outcome = f"left unchanged: {exc}"
                continue
            if entry.params["method"] != "newton_schulz":
                continue
            _, reason = _newton_schulz_matches(node, op, matrix, options)
            if reason is None:
                continue
            entry.outcome = _fallback_outcome(op, reason, entry.params["fallback"])
            if entry.params["fallback"] == "error":
                entry.refusal = _fallback_error(entry, reason)

    def apply(self, ctx: PassContext, entries: list[PlanEntry]) -> None:
        for entry in entries:
            node = ctx.node(entry.site)
            params = entry.params
            op = entry.site.target
            try:
                matrix, options = _call_options(node, op)
            except _Unsupported as exc:
                self._skip(ctx, entry, str(exc))
                continue
            reason = None
            if params["method"] == "newton_schulz":
                matches, reason = _newton_schulz_matches(node, op, matrix, options)
                if reason is None:
                    self._newton_schulz(ctx, entry, node, op, matrix, options, matches)
                    continue
                if params["fallback"] == "error":
                    raise _fallback_error(entry, reason)
                if params["fallback"] == "keep":
                    self._skip(ctx, entry, f"newton_schulz: {reason}")
                    continue
            self._stabilise(ctx, entry, node, op, matrix, options, reason)

    # -------------------------------------------------------------------------------------------- helpers

    def _skip(self, ctx: PassContext, entry: PlanEntry, reason: str) -> None:
        ctx.record(Change(site=entry.site.name, rule=entry.rule_name, pass_name=self.name,
                          what=f"left {entry.site.target} unchanged: {reason}", params=dict(entry.params),
                          after={"reason": reason}, status=f"skipped: {reason}"))

    def _stabilise(self, ctx: PassContext, entry: PlanEntry, node: fx.Node, op: str, matrix: fx.Node,
                   options: dict, ns_reason: str | None) -> None:
        params = entry.params
        info = _INFO[op]
        graph = ctx.gm.graph
        method = "clamp" if params["method"] == "clamp" else "taylor"
        kwargs = dict(options)
        kwargs.update(taylor_order=None if method == "clamp" else params["taylor_order"],
                      float64=params["float64"], clamp_gap=params["clamp_gap"])
        with graph.inserting_after(node):
            new = graph.call_function(info.stable, (matrix,), kwargs)
        _copy_meta(new, node, entry.site.name)
        result = new
        monitor_name = None
        if params["monitor"]:
            monitor = cond.DecompositionMonitor(info.monitor_source, info.values, op)
            monitor_name = _add_monitor(ctx.gm, monitor, ctx.user_default_device)
            args = (new, matrix) if info.monitor_source == "singular_values" else (new,)
            with graph.inserting_after(new):
                result = graph.call_module(monitor_name, args)
            _copy_meta(result, node, entry.site.name)
        named = None
        for user in list(node.users):
            idx = _out_index(user, node, info) if info.fields else None
            if idx is not None and user.target is getattr:
                # attribute access on the named tuple (r.eigenvalues) becomes indexing of the plain tuple
                with graph.inserting_after(user):
                    item = graph.call_function(operator.getitem, (result, idx))
                user.replace_all_uses_with(item)
                graph.erase_node(user)
            elif idx is None and info.fields:
                # a user of the named tuple itself (returned, passed on) gets one
                if named is None:
                    with graph.inserting_after(result):
                        named = graph.call_function(cond.as_return_type, (result, info.return_type))
                user.replace_input_with(node, named)
        node.replace_all_uses_with(result)
        graph.erase_node(node)

        if method == "clamp":
            gap = params["clamp_gap"]
            detail = f"clamp, gap {gap:g}" if gap is not None else "clamp, gap eps*max|lambda|"
        else:
            detail = f"taylor, order {params['taylor_order']}"
            if params["clamp_gap"] is not None:
                detail += f", gap {params['clamp_gap']:g}"
        if params["float64"]:
            detail += ", float64"
        status = f"stable {info.label} ({detail})"
        after: dict[str, Any] = {"op": f"orthofx.nn.conditioning.{info.stable.__name__}", "node": new.name}
        if monitor_name is not None:
            after["monitor"] = monitor_name
        if ns_reason is not None:
            status += f"; newton_schulz skipped: {ns_reason}"
            after["newton_schulz"] = f"skipped: {ns_reason}"
        what = (f"replaced {op} by the stable op with the "
                + ("gap-clamped exact backward" if method == "clamp" else
                   f"Taylor-form backward (order {params['taylor_order']})"))
        ctx.record(Change(site=entry.site.name, rule=entry.rule_name, pass_name=self.name, what=what,
                          params=dict(params), before={"op": op}, after=after, status=status))

    def _newton_schulz(self, ctx: PassContext, entry: PlanEntry, node: fx.Node, op: str, matrix: fx.Node,
                       options: dict, matches: list[_Match]) -> None:
        """Replace the decomposition's matrix powers (``matches``, :func:`_newton_schulz_matches`) by
        Newton-Schulz."""
        params = entry.params
        uplo = options.get("UPLO") if op == "linalg.eigh" else None
        monitor_name = None
        if params["monitor"]:  # it reads the triangle the replaced eigh read
            monitor = cond.DecompositionMonitor("matrix", None, op, uplo="U" if uplo == "U" else "L")
            monitor_name = _add_monitor(ctx.gm, monitor, ctx.user_default_device)
        removed = _rewrite_powers(ctx.gm, node, matrix, uplo, matches, params["iterations"], params["float64"],
                                  monitor_name, entry.site.name)
        powers = sorted({_power_name(m.power.power) for m in matches})
        notes = sorted({note for m in matches for note in m.power.notes})
        shifts = sorted({m.power.shift for m in matches if m.power.shift})
        after: dict[str, Any] = {"op": "orthofx.nn.conditioning.power_newton_schulz", "powers": powers,
                                 "patterns": len(matches), "nodes_removed": removed}
        if notes:
            after["notes"] = notes
        if shifts:
            after["shift"] = shifts
        if monitor_name is not None:
            after["monitor"] = monitor_name
        status = f"newton_schulz ({' + '.join(powers)}, {params['iterations']} iterations"
        status += ", float64)" if params["float64"] else ")"
        ctx.record(Change(site=entry.site.name, rule=entry.rule_name, pass_name=self.name,
                          what=f"replaced {op} and V diag(lambda^p) V^T by Newton-Schulz iterations (matmuls only)",
                          params=dict(params), before={"op": op}, after=after, status=status))


# ------------------------------------------------------------------------------------------------ public helpers

#: Every decomposition call this module recognises in a graph (torch's, their ATen overloads and the stable
#: stand-ins), by op name; ``Tensor.svd`` appears as a ``call_method`` node named ``svd``.
DECOMPOSITIONS: dict[Any, str] = {
    torch.linalg.eigh: "linalg.eigh", torch.linalg.eigvalsh: "linalg.eigvalsh", torch.linalg.svd: "linalg.svd",
    torch.linalg.svdvals: "linalg.svdvals", torch.svd: "svd",
    cond.stable_eigh: "linalg.eigh", cond.stable_eigvalsh: "linalg.eigvalsh",
    cond.stable_linalg_svd: "linalg.svd", cond.stable_svdvals: "linalg.svdvals", cond.stable_torch_svd: "svd",
    torch.ops.aten.linalg_eigh.default: "linalg.eigh", torch.ops.aten._linalg_eigh.default: "linalg.eigh",
    torch.ops.aten.linalg_eigvalsh.default: "linalg.eigvalsh", torch.ops.aten.linalg_svd.default: "linalg.svd",
    torch.ops.aten._linalg_svd.default: "linalg.svd", torch.ops.aten.linalg_svdvals.default: "linalg.svdvals",
    torch.ops.aten.svd.default: "svd",
}


def decomposition_op(node: fx.Node) -> str | None:
    """The op name (``linalg.eigh`` ...) when ``node`` calls a decomposition (torch's, a stable stand-in, the
    ``Tensor.svd`` method, or the custom ops ``orthofx::eigh_stable`` / ``orthofx::svd_stable`` directly)."""
    if node.op == "call_method":
        return "svd" if node.target == "svd" else None
    if node.op != "call_function":
        return None
    try:
        op = DECOMPOSITIONS.get(node.target)
    except TypeError:  # an unhashable target
        return None
    if op is not None:
        return op
    custom = stand_in_call(node)
    return None if custom is None else DECOMPOSITIONS[custom[0]]


def _graph_modules(gm: fx.GraphModule):
    """``(path, GraphModule)`` for ``gm`` and every GraphModule nested in it (a graph inside a leaf)."""
    for path, module in gm.named_modules():
        if isinstance(module, fx.GraphModule):
            yield path, module


def _qualified(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def to_newton_schulz(gm: fx.GraphModule, iterations: int = 5, float64: bool = False) -> dict[str, str]:
    """Rewrite, in place, every ``V diag(lambda^(+-1/2)) V^T`` computed from an eigh/SVD of ``gm`` (torch's, the
    stable stand-ins this pass inserts, or the custom ops ``orthofx::eigh_stable`` / ``svd_stable`` that a plain
    trace of a forward calling ``orthofx.nn.eigh_stable`` / ``svd_stable`` holds) into Newton-Schulz iterations,
    and recompile ``gm``.

    This is the SVD-free form of the meta-layer (matmuls only, so ONNX can express it): with ``A`` the decomposed
    matrix (symmetric positive definite), ``V diag(lambda^(1/2)) V^T = A^(1/2)`` and ``V diag(lambda^(-1/2)) V^T =
    A^(-1/2)`` are computed by :func:`orthofx.nn.conditioning.power_newton_schulz` (``iterations`` steps; the
    error after ``T`` steps grows with the condition number of ``A``). :func:`orthofx.export` uses it for
    ``.onnx`` files, choosing ``iterations`` on the example inputs. A monitor (or the pass-through a frozen model
    has in its place) between a stable decomposition and its users is removed with the decomposition. Graphs
    nested in ``gm`` (GraphModule submodules) are rewritten too, and so is the other training mode's graph of a
    model whose forward branches on ``self.training``. Returns ``{node name: "replaced" or the reason it was
    left}`` for every decomposition node found (nested ones as ``<submodule path>.<node name>``, those of the other
    mode's graph as ``<node name>@<mode>``). A traced-into ``orthofx.nn.eigh_stable(A, plain=True)`` /
    ``svd_stable(A, plain=True)`` (``torch.linalg.eigh`` of ``torch.where(bad, I, A)``, each output
    ``masked_fill``-ed with NaN) is first read back as the one stand-in call with ``plain=True`` it computes
    (:func:`_collapse_plain_forms`; the same values), so its powers are found too.

    Example::

        import orthofx
        from orthofx.passes.svd_conditioning import to_newton_schulz
        x = orthofx.models.example_input("gcp_cnn", batch=4)
        gm = orthofx.transform(orthofx.models.get("gcp_cnn"), "svd", example_inputs=(x,))
        to_newton_schulz(gm, iterations=15)   # {'stable_eigh': 'replaced'}
    """
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise ArgumentError(f"iterations must be an int >= 1, got {iterations!r}")
    results: dict[str, str] = {}
    for path, module in list(_graph_modules(gm)):
        for suffix in each_mode(module):
            for name, outcome in _to_newton_schulz(module, iterations, float64).items():
                results[_qualified(path, name) + suffix] = outcome
    return results


_ISFINITE_FNS = {torch.isfinite, _ATEN.isfinite.default}
_WHERE_FNS = {torch.where, _ATEN.where.self}
_EYE_FNS = {torch.eye, _ATEN.eye.default, _ATEN.eye.m}
_MASKED_FILL_FNS = {torch.masked_fill, _ATEN.masked_fill.Scalar}
_GUARD_STEPS = {"unsqueeze", "any", "tril", "triu", "invert", "bitwise_not", "logical_not"}  # ATen's too
_PLAIN_FORMS = {"linalg.eigh": (cond.stable_eigh, 2), "linalg.svd": (cond.stable_linalg_svd, 3)}


def _guarded_matrix(node: Any) -> fx.Node | None:
    """``X`` when ``node`` is ``torch.where(mask, eye, X)`` with ``mask`` computed from ``isfinite(X)``: how
    :func:`orthofx.nn.decompositions._finite_part` (``sync=False``) hands a matrix to LAPACK."""
    if not (_is(node, _WHERE_FNS) and len(node.args) == 3 and not node.kwargs):
        return None
    mask, eye, matrix = node.args
    if not (_is(eye, _EYE_FNS) and isinstance(matrix, fx.Node) and isinstance(mask, fx.Node)):
        return None
    # ~isfinite(X) [.tril() / .triu()] .any(-1).any(-1) .unsqueeze(-1).unsqueeze(-1): "some entry is not finite"
    cur, negations = mask, 0
    while isinstance(cur, fx.Node) and not _is(cur, _ISFINITE_FNS):
        name = _target_name(cur).split(".")[0]  # any.dim, bitwise_not.default: ATen overloads
        if name not in _GUARD_STEPS or not cur.args:
            return None
        negations += name in ("invert", "bitwise_not", "logical_not")
        cur = cur.args[0]
    return matrix if isinstance(cur, fx.Node) and cur.args[0] is matrix and negations == 1 else None


_BROADCASTS = {"expand", "expand_as", "broadcast_to"}  # ATen's too: keep each batch index at its place


def _appends_ones(shape: Any, source: fx.Node, step: fx.Node) -> bool:
    """Whether ``reshape(source, shape)`` (the node ``step``) only appends size-1 dimensions to ``source``'s
    shape: ``source.shape + (1,) * k`` as fx traces it, or a fixed shape that the recorded shapes of ``source``
    and ``step`` (``meta["val"]``, torch.export's) show to be that."""
    if isinstance(shape, fx.Node):  # source.shape + (1,) * k, with k a traced int or an int
        if not (shape.op == "call_function" and shape.target is operator.add and len(shape.args) == 2):
            return False
        head, tail = shape.args
        if not (isinstance(head, fx.Node) and head.op == "call_function" and head.target is getattr
                and head.args == (source, "shape")):
            return False
        if isinstance(tail, tuple):
            return all(d == 1 for d in tail)
        return (isinstance(tail, fx.Node) and tail.op == "call_function" and tail.target is operator.mul
                and len(tail.args) == 2 and (1,) in [a for a in tail.args if isinstance(a, tuple)])
    before, after = source.meta.get("val"), step.meta.get("val")
    if not (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)):
        return False
    k = after.dim() - before.dim()
    return k >= 0 and list(after.shape) == [*before.shape, *(1,) * k]


def _trailing_ones_source(mask: Any) -> fx.Node | None:
    """The node ``mask`` is computed from through steps that only append size-1 dimensions (``unsqueeze(-1)``, a
    reshape to ``bad.shape + (1,) * k``) or broadcast (``expand``): steps after which ``mask[i, ...]`` is still
    the flag of batch index ``i``, as in ``_nan_where``'s ``bad.reshape(...)`` and ``_finite_part``'s
    ``bad.unsqueeze(-1).unsqueeze(-1)``. ``bad.unsqueeze(0)`` or any computation (``~bad``, ``bad | x``) stops
    the walk at itself. Example: ``bad.unsqueeze(-1).expand(-1, 3)`` -> the node ``bad``."""
    cur = mask
    while isinstance(cur, fx.Node) and cur.op in ("call_function", "call_method") and cur.args:
        source = cur.args[0]
        name = _target_name(cur).split(".")[0]  # unsqueeze.default, reshape.default: ATen overloads
        if not isinstance(source, fx.Node):
            break
        if name == "unsqueeze":
            dim = _arg(cur, 1, "dim")
            meta = source.meta.get("val")
            if not (dim == -1 or (isinstance(meta, torch.Tensor) and dim == meta.dim())):
                break
        elif name in ("reshape", "view"):
            shape = cur.args[1:] if len(cur.args) > 2 else _arg(cur, 1, "shape")
            if isinstance(shape, torch.dtype) or not _appends_ones(shape, source, cur):
                break
        elif name not in _BROADCASTS:
            break
        cur = source
    return cur if isinstance(cur, fx.Node) else None


def _collapse_plain_forms(gm: fx.GraphModule) -> int:
    """Read every traced-into ``eigh_stable(X, plain=True)`` / ``svd_stable(X, plain=True)`` back as one stand-in
    call: ``torch.linalg.eigh(torch.where(bad, eye, X))`` (or the stand-in ``stable_eigh`` the pass put there, with
    its monitor or a frozen model's pass-through after it) whose every output ``o`` is read only as
    ``o.masked_fill(bad..., nan)`` (and by ``o.dim()`` for that mask's shape; ``bad...``: the guard's own flag
    ``bad`` given trailing size-1 dimensions, see :func:`_trailing_ones_source`) becomes ``stable_eigh(X, UPLO=...,
    plain=True)`` (the stand-in's own call on ``X``), its outputs read directly. The same values (the stand-ins give
    a matrix holding a NaN/inf NaN outputs themselves), but a graph :func:`_to_newton_schulz` can read: the
    ``masked_fill`` between the decomposition and ``V diag(f(lambda)) V^T`` hid the pattern, and the site was
    left. A site whose outputs are filled under another mask (a model's own ``L.masked_fill(L < 0, nan)`` after
    such a guard) is left as it is: dropping that fill would change the model's values. Returns how many."""
    graph = gm.graph
    collapsed = 0
    for node in list(graph.nodes):
        op = decomposition_op(node)
        if op not in _PLAIN_FORMS or node.op != "call_function" or node.target not in _TARGET_OPS:
            continue
        try:
            guarded, options = _call_options(node, op)
        except _Unsupported:
            continue
        matrix = _guarded_matrix(guarded)
        stand_in, count = _PLAIN_FORMS[op]
        if matrix is None or (op == "linalg.svd" and options.get("full_matrices")):
            continue
        dec = node
        if len(node.users) == 1 and (user := next(iter(node.users))).op == "call_module" and isinstance(
                gm.get_submodule(str(user.target)), (cond.DecompositionMonitor, cond.PassThrough)):
            dec = user  # the outputs are read through the monitor
        # a fill under the guard's own flag (``bad`` reshaped) is the one the plain form computes; one under another
        # mask (``L < 0``, ``~bad``) is the model's own, and the collapse would silently drop it
        flag = _trailing_ones_source(guarded.args[0])
        fills: dict[int, fx.Node] = {}
        for user in dec.users:
            idx = _out_index(user, dec, _INFO[op])
            readers = [u for u in user.users if not (u.op == "call_method" and u.target == "dim")]
            fill = readers[0] if len(readers) == 1 else None
            if idx is None or idx in fills or fill is None or not (
                    _is(fill, _MASKED_FILL_FNS, {"masked_fill"}) and len(fill.args) == 3 and fill.args[0] is user
                    and isinstance(fill.args[2], float) and fill.args[2] != fill.args[2]  # the value is NaN
                    and flag is not None and _trailing_ones_source(fill.args[1]) is flag):
                break
            fills[idx] = fill
        else:
            if len(fills) != count:
                continue
            if node.target in _STAND_INS:  # the stand-in decomposes X itself (and keeps its options)
                node.replace_input_with(guarded, matrix)
            else:
                kwargs = {"full_matrices": False} if op == "linalg.svd" else {"UPLO": options.get("UPLO", "L")}
                with graph.inserting_before(node):
                    new = graph.call_function(stand_in, (matrix,), {**kwargs, "plain": True})
                _copy_meta(new, node, node.meta.get("orthofx_site"))
                node.replace_all_uses_with(new)
            for fill in fills.values():
                fill.replace_all_uses_with(fill.args[0])
            # the fills, the mask, the identity and the shape reads, now without users
            doomed = [n for n in _ancestors([*fills.values(), guarded, node])
                      if n.op in ("call_function", "call_method")]
            _erase_dead(graph, doomed)
            collapsed += 1
    return collapsed


def _ancestors(nodes) -> set[fx.Node]:
    """``nodes`` and every node they are computed from."""
    found: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        cur = stack.pop()
        if cur not in found:
            found.add(cur)
            stack.extend(cur.all_input_nodes)
    return found


def _to_newton_schulz(gm: fx.GraphModule, iterations: int, float64: bool) -> dict[str, str]:
    results: dict[str, str] = {}
    if _collapse_plain_forms(gm):
        gm.graph.lint()
    for node in list(gm.graph.nodes):
        if node.graph is not gm.graph:
            continue  # erased by an earlier rewrite
        op = decomposition_op(node)
        if op is None:
            continue
        name = node.name
        if op in ("linalg.eigvalsh", "linalg.svdvals"):
            results[name] = (f"{op} returns only the values: there is no V diag(f(lambda)) V^T to compute without "
                             "the decomposition")
            continue
        if node.op == "call_function" and node.target not in _TARGET_OPS and stand_in_call(node) is None:
            results[name] = (f"a call of {node.target} (not the torch function, a stand-in or orthofx's custom op) "
                             "is not rewritten")
            continue
        try:
            matrix, options = _call_options(node, op)
        except _Unsupported as exc:
            results[name] = str(exc)
            continue
        dec = node
        passthrough = None
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and isinstance(
                gm.get_submodule(str(users[0].target)), (cond.DecompositionMonitor, cond.PassThrough)):
            passthrough = users[0]
            dec = passthrough
        matches, reason = _newton_schulz_matches(dec, op, matrix, options)
        if reason is not None:
            results[name] = reason
            continue
        uplo = options.get("UPLO") if op == "linalg.eigh" else None
        _rewrite_powers(gm, dec, matrix, uplo, matches, iterations, float64, None,
                        node.meta.get("orthofx_site"))
        if passthrough is not None:
            _erase_dead(gm.graph, [node])
        results[name] = "replaced"
    gm.graph.lint()
    gm.recompile()
    return results


# ------------------------------------------------------------------------------------------------ constant folding

_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor,
                      operator.setitem}
# ops whose values are not a function of their arguments (random draws, uninitialised memory)
_NONDETERMINISTIC = ("rand", "dropout", "bernoulli", "multinomial", "normal", "uniform", "poisson", "empty",
                     "exponential", "cauchy", "geometric", "seed")


def _target_name(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else str(getattr(target, "__name__", target))


def _writes_first_argument(node: fx.Node) -> bool:
    """Whether ``node`` may write its first argument (``x.add_(y)``, ``x += y``, ``x[i] = y``, ``out=``,
    ``inplace=True``)."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    if node.op == "call_function":
        return node.target in _INPLACE_FUNCTIONS or _target_name(node).endswith("_") or "out" in node.kwargs
    return False


def _mutated_attributes(graph: fx.Graph, views_only: bool = False) -> set[str]:
    """Targets of every ``get_attr`` an in-place op may write (through views too: every attribute upstream of the
    written tensor counts). ``views_only``: only those the written tensor is reached from through first arguments
    (a view is of its first argument: ``w.T``, ``w[0]``, ``w.type_as(x)``; ``x += y`` returns ``x``), but not
    through a ``clone``: ``y = F.conv2d(x, layer.weight); y += 1`` and ``layer.weight.clone().mul_(2)`` write new
    tensors, not ``layer.weight``, while ``layer.weight.t().mul_(2)`` writes it. (Other ops with a new result are
    walked through on purpose: freeze rebinds a node computed from a layer's state, ``(Q * s).to(dtype)``, to the
    plain form's weight, which a write to a view of that node would then change.)"""
    mutated: set[str] = set()
    for node in graph.nodes:
        if not _writes_first_argument(node):
            continue
        written = [a for a in (node.args[:1] + (node.kwargs.get("out"),)) if isinstance(a, fx.Node)]
        stack, seen = written, set()
        while stack:
            cur = stack.pop()
            if cur in seen:
                continue
            seen.add(cur)
            if cur.op == "get_attr":
                mutated.add(str(cur.target))
            elif not views_only:
                stack.extend(cur.all_input_nodes)
            elif cur.args and not (cur.op in ("call_method", "call_function") and _target_name(cur) == "clone"):
                fx.node.map_arg(cur.args[0], stack.append)  # the nodes in it (a list for torch.cat)
    return mutated


def _constant_nodes(gm: fx.GraphModule, mutated: set[str] | None = None) -> tuple[set[fx.Node], dict[fx.Node, fx.Node]]:
    """Nodes whose value does not depend on the inputs: attributes no op writes, and pure calls of constants
    (monitors and their pass-throughs included, as identities); and the casts ``c.type_as(t)`` of a constant to
    the dtype and device of a traced value ``t`` (``{cast: t}``; models write ``buffer.type_as(x)`` to follow the
    input's dtype), which count as constants whose value is ``c`` cast at run time. ``mutated``: the attribute
    targets taken as written (default :func:`_mutated_attributes`, which takes every attribute upstream of a
    written tensor)."""
    if mutated is None:
        mutated = _mutated_attributes(gm.graph)
    const: set[fx.Node] = set()
    casts: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        inputs_const = all(i in const for i in node.all_input_nodes)
        if node.op == "get_attr":
            ok = str(node.target) not in mutated
        elif (node.op == "call_method" and node.target == "type_as" and len(node.args) == 2 and not node.kwargs
              and node.args[0] in const and isinstance(node.args[1], fx.Node) and node.args[1] not in const):
            casts[node] = node.args[1]
            ok = True
        elif node.op in ("call_function", "call_method"):
            name = _target_name(node).lower()
            ok = (inputs_const and not _writes_first_argument(node) and not node.is_impure()
                  and not any(fragment in name for fragment in _NONDETERMINISTIC))
        elif node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            ok = inputs_const and isinstance(module, (cond.PassThrough, cond.DecompositionMonitor))
        else:
            ok = False
        if ok:
            const.add(node)
    return const, casts


def _constant_ancestors(nodes, const: set[fx.Node], casts: dict[fx.Node, fx.Node]) -> set[fx.Node]:
    """``nodes`` and every constant node they are computed from (a cast's traced dtype source excluded)."""
    found: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        cur = stack.pop()
        if cur in found:
            continue
        found.add(cur)
        stack.extend(i for i in ([cur.args[0]] if cur in casts else cur.all_input_nodes) if i in const)
    return found


def _run_constants(gm: fx.GraphModule, wanted: list[fx.Node], const: set[fx.Node],
                   casts: dict[fx.Node, fx.Node]) -> dict[fx.Node, Any]:
    """Values of the constant nodes ``wanted`` (and of the constant nodes they need), without gradients; a cast
    ``c.type_as(t)`` is evaluated as ``c`` (the caller casts the folded result at run time)."""
    needed = _constant_ancestors(wanted, const, casts)
    env: dict[fx.Node, Any] = {}
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node not in needed:
                continue
            if node in casts:
                env[node] = env[node.args[0]]
                continue
            args = fx.node.map_arg(node.args, env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
            if node.op == "get_attr":
                value: Any = gm
                for part in str(node.target).split("."):
                    value = getattr(value, part)
            elif node.op == "call_function":
                value = node.target(*args, **kwargs)
            elif node.op == "call_method":
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:  # a monitor or its pass-through: its first argument (nothing is recorded for the folded call)
                value = args[0]
            env[node] = value
    return env


_STAND_INS = frozenset({cond.stable_eigh, cond.stable_eigvalsh, cond.stable_linalg_svd, cond.stable_svdvals,
                        cond.stable_torch_svd})


def plain_decompositions(gm: fx.GraphModule) -> int:
    """Make every stable stand-in call of ``gm`` (and of the graph modules inside it) run its plain form
    (``plain=True``: the same values from ``torch.linalg`` and tensor ops instead of orthofx's custom ops, with
    torch's gradient): a frozen model's exported program then holds ``linalg_eigh`` / ``linalg_svd`` and loads
    without orthofx. Both graphs of a two-mode model are changed. In place; returns the number of calls changed."""
    changed = 0
    for _, module in list(_graph_modules(gm)):
        for _ in each_mode(module):
            nodes = [n for n in module.graph.nodes if n.op == "call_function" and n.target in _STAND_INS
                     and not n.kwargs.get("plain")]
            for node in nodes:
                node.kwargs = {**node.kwargs, "plain": True}
            if nodes:
                module.recompile()
                changed += len(nodes)
    return changed


def fold_constant_decompositions(gm: fx.GraphModule, prefix: str = "orthofx_folded_") -> dict[str, list[str]]:
    """Evaluate, once, every decomposition of ``gm`` whose input does not depend on the model's inputs, together
    with what is computed from it before it meets the inputs, and store the results as buffers (in place;
    ``gm`` is recompiled). Exact: the same ops run once, so the model's outputs do not change. Newton-Schulz
    matrix powers of such matrices (:func:`orthofx.nn.conditioning.power_newton_schulz`, which
    ``method: newton_schulz`` puts in a decomposition's place) are folded the same way.

    This is the inference form of decorrelated BatchNorm in eval mode: its whitening matrix
    ``(running_cov + eps I)^(-1/2)``, computed from the running covariance by an eigendecomposition on every
    call, becomes a constant buffer (the "running whitening matrix"), and the exported graph has no
    decomposition left. Only safe on a model that will not be trained any more (the buffers and parameters it
    reads are assumed fixed): :func:`orthofx.freeze` calls it. Attributes written by an in-place op in the graph
    (running statistics updated in training mode) are not constants; nor are random or uninitialised values.
    Nested GraphModules are folded too.

    Returns ``{node name: [buffer names]}`` for every decomposition folded (nested ones as
    ``<submodule path>.<node name>``; the buffers belong to that submodule).

    Example::

        import torch, orthofx
        x = orthofx.models.example_input("dbn_cnn", batch=4)
        gm = orthofx.transform(orthofx.models.get("dbn_cnn").eval(), "svd", example_inputs=(x,))
        frozen = orthofx.freeze(gm)          # calls fold_constant_decompositions(frozen)
        # DBN traced in eval mode: frozen.orthofx_folded_0 is the whitening matrix, no eigh is left
        assert torch.linalg.eigh not in {node.target for node in frozen.graph.nodes}
    """
    folded: dict[str, list[str]] = {}
    for path, module in list(_graph_modules(gm)):
        for name, buffers in _fold(module, prefix).items():
            folded[_qualified(path, name)] = buffers
    return folded


def foldable_seed(node: fx.Node) -> bool:
    """Whether a constant ``node`` starts a folded region: a decomposition, or a Newton-Schulz matrix power
    (what ``method: newton_schulz`` puts in a decomposition's place; the same ops run once, as exact)."""
    return decomposition_op(node) is not None or (node.op == "call_function"
                                                  and node.target is cond.power_newton_schulz)


def _fold(gm: fx.GraphModule, prefix: str) -> dict[str, list[str]]:
    graph = gm.graph
    folded: dict[str, list[str]] = {}
    const, casts = _constant_nodes(gm)
    done: set[fx.Node] = set()
    for seed in [n for n in graph.nodes if n in const and foldable_seed(n)]:
        if seed in done:
            continue
        region: set[fx.Node] = set()
        stack = [seed]
        while stack:
            cur = stack.pop()
            if cur in region:
                continue
            region.add(cur)
            stack.extend(u for u in cur.users if u in const)
        boundary = [n for n in graph.nodes if n in region and any(u not in region for u in n.users)]
        upstream = _constant_ancestors(region, const, casts)
        sources = {casts[n] for n in upstream if n in casts}
        if not boundary or len(sources) > 1:
            continue  # nothing leaves the region, or casts to the dtypes of several traced values
        values = _run_constants(gm, boundary, const, casts)
        if not all(isinstance(values[n], torch.Tensor) for n in boundary):
            continue  # a tuple or a Python value leaves the region: keep the decomposition
        done |= region
        names = []
        for node in boundary:
            buffer = _free_attribute_name(gm, prefix)
            gm.register_buffer(buffer, values[node].detach().clone())
            with graph.inserting_before(node):
                replacement = graph.get_attr(buffer)
                if sources:  # computed from c.type_as(t): cast the result the same way
                    replacement = graph.call_method("type_as", (replacement, next(iter(sources))))
            _copy_meta(replacement, node, node.meta.get("orthofx_site") or seed.meta.get("orthofx_site"))
            node.replace_all_uses_with(replacement)
            names.append(buffer)
        _erase_dead(graph, upstream)
        folded[seed.name] = names
    if folded:
        graph.lint()
        gm.recompile()
    return folded


def __getattr__(name: str):
    if name == "monitors":
        raise AttributeError("orthofx.passes.svd_conditioning.monitors moved to orthofx.report.monitors "
                             "(from orthofx.report import monitors): the monitors are found through the manifest, "
                             "which sits above the passes")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
