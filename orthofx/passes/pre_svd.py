"""Pass ``pre_svd``: orthogonality for the Pre-SVD layers (P4), the convolutions / linears feeding a decomposition.

Select the layers with ``match: {feeds: linalg.eigh}`` (or any decomposition op); each Conv1d / Conv2d / Conv3d /
Linear gets, by its parameters (every treatment reads the weight as ``out x rest``, per group, so a video model's
Conv3d is treated as a Conv2d is: its kernel's depth is one more factor of ``rest``):

``weight`` (the orthogonal-weight treatment, P4's "OW"; default ``none``)
    ``orthogonal``: the layer is replaced, under the same name, by the exactly orthogonal layer of
    :mod:`orthofx.nn.orthogonal` (``OrthogonalConv{1,2,3}d.from_conv`` / ``OrthogonalLinear.from_linear`` with
    ``init="nearest"``; ``padding: keep`` keeps the conv's own zero/circular padding, ``circular`` uses circular
    "same" padding, exact but a different boundary). When no orthogonal layer exists for the architecture (P0
    Theorem 4), none that trains (one input and one output channel per group and taps reading only one input per
    stride window, e.g. a stride-1 depthwise conv feeding an ``eigh``: its orthogonal versions are fixed signed
    shifts of each channel), the layer cannot be built, or the new layer would change the output shape, the pass
    falls back to the L_orth regulariser and the Change's status says so; ``explain`` says so too (``apply: L_orth
    instead: <reason>``) where the layer's shape or a tied weight tells it before the run
    (:func:`hard_layer_problem`). The hard layer's weight is a function of other
    parameters, so NOG / OLR are not attached to it (status says so); combine NOG with ``lorth`` or ``srip``
    for P4's NOG + OW. A layer whose weight is frozen (``requires_grad=False``) is skipped unless the rule says
    ``frozen: overwrite`` (as for ``orthogonal_conv``).
    ``lorth``: P0's L_orth (:class:`orthofx.passes.orth_regularizer.LorthTerm`), weighted by ``penalty_weight``.
    ``srip``: SRIP, the spectral restricted isometry penalty (Bansal et al., NeurIPS 2018): with ``W`` the weight
    reshaped to ``out x rest`` (per group), ``sigma_max(W W^T - I)`` when ``out <= rest`` and
    ``sigma_max(W^T W - I)`` otherwise (the smaller Gram matrix, so that a wide matrix is not charged for its null
    space), the largest |eigenvalue| of the symmetric ``M = Gram - I``, estimated from ``power_iterations`` vectors
    of the power iteration (without autograd; started from ``M``'s largest column plus a fixed pseudo-random vector)
    and the unit ``y`` of the largest ``||M y||`` in the Krylov space they span; the final ``||M y||`` is
    differentiable in ``W`` (the spectral-norm trick) and never above the exact value. On conv weights, with the
    default 10, the power iteration's last vector alone was 5 % low on average and up to 13 % low; the Krylov space
    is 1 %, up to 4 %. A Gram matrix up to 128 x 128 (or ``power_iterations``) takes ``y`` from the whole space
    instead, exact (up to rounding), in float64 for a float32 weight: on near-orthogonal weights the Krylov
    estimate's gradient was up to 139 % off the exact one (see :func:`_srip_top_vector` for the rule and its cost).
    Summed over groups; see :class:`SripTerm`. A weight tied between several sites is counted once (as L_orth is).
``nog`` (default true): Nearest Orthogonal Gradient. An optimizer hook (:class:`NearestOrthogonalGradient`)
    replaces, before every ``optimizer.step()``, the weight's gradient ``G`` (reshaped to ``out x rest``) by its
    polar factor ``U V^T`` from the SVD ``G = U S V^T`` (float64). A grouped conv's gradient is
    ``groups x (out / groups) x rest`` and each group's block gets its own polar factor: the group's rows act on
    its own input channels only, which is the sense in which L_orth, SRIP, the hard orthogonal conv and the
    Riemannian pass make a grouped conv orthogonal (one polar factor of the stacked blocks mixed the groups' rows:
    a group's step depended on the other groups' gradients, and a depthwise conv's was not of unit norm).
    Directions with a zero singular value (at most ``min(max(m, n) * eps, sqrt(eps)) * s_max``, ``eps`` of the
    gradient's dtype; see :func:`polar_factor`) are dropped, so a rank-deficient gradient gives the partial
    isometry ``U_r V_r^T`` and a zero gradient stays zero. On a layer whose weight is not a parameter (a buffer),
    which no optimizer steps, NOG and OLR are refused at planning. A sparse gradient (a leaf layer whose forward
    calls ``F.embedding(..., sparse=True)`` on its weight) is refused at the step, by NOG and by OLR, with an
    ``OrthofxError`` naming the site, as the Riemannian hooks refuse it (it was stepped unchanged).
``olr`` (default false): Optimal Learning Rate. With ``w``, ``g`` the flattened weight and gradient (the gradient
    after NOG when both are on), ``a = w.w``, ``b = g.w``, ``c = g.g``: ``eta* = a b / (a c + 2 b^2)``; the layer's
    learning rate for the step is ``eta*`` when ``0 < eta* < base lr`` and the base lr otherwise, a Python float
    (no autograd history). ``eta*`` is the minimiser of ``||w - eta g||^2 + 2 eta^2 (g.w)^2 / (w.w)`` (derived by
    us from the reference formula; see tests/test_svd_passes.py). That is the step ``w - eta g`` of plain SGD: with
    momentum or Adam the step taken is not ``eta g`` (Adam's per-entry scaling also undoes most of NOG's polar
    factor), and ``eta*`` is P4's rule applied as it is, not the minimiser. Implemented by :class:`OptimalLearningRate`:
    ``orthofx.attach`` **edits the optimizer's param groups**: the weight is moved into a param group of its own
    (a copy of its group's settings, marked ``"orthofx_olr": site``); before each step that group's ``lr`` is set,
    after the step it is put back to the base lr, so LR schedulers keep scaling the base lr (create schedulers
    after ``attach``: a scheduler created before it does not know the new group, and ``attach`` refuses it). An
    optimizer built from ``named_parameters()`` gets the weight's name moved along into the new group. Parameters
    are matched by identity, so DataParallel / DDP prefixes do not matter (the reference's OLR matched none under
    DataParallel). LBFGS (which reads its lr before the closure computes the gradient), Rprop (which uses its lr
    only as the first step size) and ASGD (which steps by a size computed from the previous step's lr) would never
    use ``eta*``: ``attach`` refuses OLR with them. A ``ZeroRedundancyOptimizer`` partitions its groups over the
    ranks when it is built and cannot take a weight out of one later: build it with the weight in a param group
    of its own (OLR then needs no split; ``attach`` refuses the split otherwise). The split happens at ``attach``
    only: a weight frozen then (its hooks skipped) and added to the optimizer later must come in a param group of
    its own, as one regrouped after ``attach`` must (inside ``optimizer.step()`` the split is refused).
``penalty_weight`` (default 0.01): weight of the ``lorth`` / ``srip`` term in ``orthofx.penalty``.

Several layers feeding one decomposition each get their own hooks (and param groups); a layer feeding several
decompositions is one module site, treated once. The Change per layer lists the decomposition sites it feeds.
A transposed conv that a ``feeds`` rule selects (a decoder's) is skipped, saying why: it is not P4's Pre-SVD layer,
its ``in x out/groups x kernel`` weight is the adjoint's layout, and ``padding: keep`` has no transposed counterpart;
the ``orth_regularizer`` and ``orthogonal_conv`` passes treat its weight.

Example::

    import torch, orthofx, orthofx.passes.pre_svd, orthofx.passes.svd_conditioning
    model = orthofx.models.get("dbn_cnn")
    gm = orthofx.transform(model, "svd", example_inputs=(orthofx.models.example_input("dbn_cnn"),))
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
    orthofx.attach(optimizer, gm)          # NOG + OLR on conv1, run inside optimizer.step()
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn

from ..errors import ArgumentError, OrthofxError
from ..nn.convnorm import ConvNormConv1d, ConvNormConv2d, ConvNormConv3d, ConvNormConvNd
from ..nn.precision import HALF_PRECISION
from .base import (TORCH_CONV_TYPES, Change, OptimizerHook, Param, Pass, PassContext, PenaltyTerm, PlanEntry,
                   decompositions_fed, derived_weight, describe_module, is_uninitialised, parameter_owners,
                   replaced_after_attach, weight_groups, whole, sparse_gradient_error, write_whole)
from .convnorm import ConvNormPass
from .isometric_init import frozen_reason
from .orth_regularizer import lorth_term
from .orthogonal_conv import OffGridLayers, _hard_status, _impossibility, orthogonal_layer
from .registry import register_pass
from .riemannian import is_zero_redundancy

__all__ = ["PreSVD", "SripTerm", "NearestOrthogonalGradient", "OptimalLearningRate", "srip", "polar_factor",
           "optimal_learning_rate"]

_LAYER_TYPES = TORCH_CONV_TYPES + (nn.Linear,)
#: Param-group key marking the group OLR created; the value is the site.
OLR_GROUP_KEY = "orthofx_olr"
_BASE_LR_KEY = "orthofx_olr_base_lr"
_LAST_LR_KEY = "orthofx_olr_lr"
#: Marks (in the optimizer's ``__dict__``) that OLR registered its load-state-dict check on it.
_LOAD_CHECK_KEY = "_orthofx_olr_load_check"
#: The optimizer's ``__dict__`` entry of :func:`_group_of`'s parameter positions (not in ``state_dict``, and not
#: copied with the optimizer: ``Optimizer.__getstate__`` keeps only its defaults, state and groups).
_POSITIONS_KEY = "_orthofx_param_positions"


# ----------------------------------------------------------------------------------------------------- math

def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The polar factor ``U V^T`` of a 2-D ``matrix = U S V^T`` (float64 SVD, returned in ``matrix``'s dtype),
    with the directions of zero singular values dropped: a rank-``r`` matrix gives ``U_r V_r^T``, a zero matrix
    gives zero. Zero means ``<= min(max(m, n) * eps, sqrt(eps)) * s_max`` with ``eps`` of ``matrix``'s dtype:
    rounding noise of a low-rank gradient is not a direction, and the cap keeps a half-precision gradient's real
    directions (``max(m, n) * eps`` alone reaches 1 for a 128-wide bfloat16 matrix and dropped every one).
    A ``(..., m, n)`` stack gives each matrix its own polar factor (and its own ``s_max``)."""
    if matrix.dim() < 2:
        raise ArgumentError(f"polar_factor expects a 2-D matrix (or a stack of them), got shape "
                            f"{tuple(matrix.shape)}")
    m64 = matrix.detach().to(torch.float64)
    U, S, Vh = torch.linalg.svd(m64, full_matrices=False)
    eps = torch.finfo(matrix.dtype).eps if matrix.is_floating_point() else torch.finfo(torch.float64).eps
    tol = S[..., :1] * min(max(matrix.shape[-2:]) * eps, math.sqrt(eps))
    keep = (S > tol).to(m64.dtype)
    return ((U * keep.unsqueeze(-2)) @ Vh).to(matrix.dtype)


def optimal_learning_rate(weight: torch.Tensor, grad: torch.Tensor) -> float | None:
    """P4's ``eta* = a b / (a c + 2 b^2)`` with ``a = w.w``, ``b = g.w``, ``c = g.g`` (float64, as a Python float);
    ``None`` when the denominator is zero (a zero gradient)."""
    a, b, c = _olr_dots(weight, grad).tolist()
    return _eta(a, b, c)


def _olr_dots(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``(a, b, c)`` of :func:`optimal_learning_rate`, a float64 tensor on the weight's device (not read)."""
    w = weight.detach().reshape(-1).to(torch.float64)
    g = grad.detach().reshape(-1).to(torch.float64)
    return torch.stack([w.dot(w), g.dot(w), g.dot(g)])


def _eta(a: float, b: float, c: float) -> float | None:
    denominator = a * c + 2.0 * b * b
    if not denominator > 0.0:
        return None
    return a * b / denominator


def _power_iteration_start(groups: int, n: int, like: torch.Tensor) -> torch.Tensor:
    """A fixed ``(groups, n, 1)`` start vector with entries spread over ``(-0.5, 0.5)`` (the fractional part of
    ``43758.5453 sin(12.9898 i + 78.233)``, a hash of the index), made on ``like``'s device in its dtype: no
    generator (a CPU one cost a host-to-device copy per penalty and broke ``torch.compile(fullgraph=True)``), and
    like a random start, orthogonal to the top eigenvector only by coincidence."""
    index = torch.arange(groups * n, device=like.device, dtype=torch.float64)
    hashed = torch.sin(index * 12.9898 + 78.233) * 43758.5453
    return (hashed - hashed.floor() - 0.5).reshape(groups, n, 1).to(like.dtype)


#: Squarings of the k x k matrix whose top eigenvector :func:`_top_eigenvector_psd` takes: ``2^12`` powers leave an
#: eigenvalue ``rho`` times the top one a weight ``~ rho^(2^13)`` in the column taken, which lowers ``||M y||`` by
#: at most ``max_rho k (1 - rho) rho^(2^13) / 2 ~ k / 2^15`` of its value (0.03 % for k = 10), and only where the
#: two largest ``|eigenvalues|`` seen lie within ~1e-4 of each other; 8 squarings already gave the same estimates
#: on the measured conv weights.
_SQUARINGS = 12


def _top_eigenvector_psd(matrix: torch.Tensor, squarings: int = _SQUARINGS) -> torch.Tensor:
    """A unit top eigenvector ``(..., k, 1)`` of a symmetric positive semi-definite ``(..., k, k)`` stack, by repeated
    squaring (``P <- (P / tr P)^4``: ``P`` tends to a multiple of the projector onto the top eigenspace) and the
    column ``P e_i`` of the largest diagonal entry (``P_ii = ||P e_i||^2`` for a projector). Matrix products only: no
    ``eigh``, whose error check is a host sync on a GPU. A zero matrix gives zero."""
    tiny = torch.finfo(matrix.dtype).tiny
    P = matrix
    for _ in range(0, squarings, 2):
        # the trace of a PSD matrix bounds its top eigenvalue: P's top one in [1/k, 1], its 4th power above 1/k^4
        # (no overflow, and no underflow of the top one for any k <= 2^20 in float32)
        P = torch.linalg.matrix_power(P / P.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None].clamp_min(tiny), 4)
    column = P.diagonal(dim1=-2, dim2=-1).argmax(dim=-1, keepdim=True)  # P_ii = ||P e_i||^2 for a projector
    s = torch.gather(P, -1, column.unsqueeze(-2).expand(*P.shape[:-1], 1))
    return s / s.norm(dim=-2, keepdim=True).clamp_min(tiny)


def _krylov_start(matrix: torch.Tensor) -> torch.Tensor:
    """The unit start vector of :func:`_krylov_top_vector`, ``M e_i / ||M e_i|| + h / ||h||`` normalised, with ``e_i``
    the column of ``M`` of the largest norm (``(M^2)_ii`` largest: the coordinate vector of the largest Rayleigh
    quotient of ``M^2``, and ``M e_i`` a free product) and ``h`` the fixed hash :func:`_power_iteration_start`, which
    keeps a share of every eigenvector where ``M e_i`` lies in an invariant subspace (a decoupled channel). With 10
    products on conv weights the column took the worst estimate from 7.0 % low (the hash alone) to 3.9 % low."""
    tiny = torch.finfo(matrix.dtype).tiny
    norms = matrix.norm(dim=-2, keepdim=True)  # (groups, 1, n)
    largest, index = norms.max(dim=-1, keepdim=True)
    column = torch.gather(matrix, -1, index.expand(*matrix.shape[:-1], 1))
    h = _power_iteration_start(matrix.shape[0], matrix.shape[-1], matrix)
    v = column / largest.clamp_min(tiny) + h / h.norm(dim=-2, keepdim=True)
    return v / v.norm(dim=-2, keepdim=True).clamp_min(tiny)


def _krylov_top_vector(matrix: torch.Tensor, products: int) -> torch.Tensor:
    """Unit vectors ``y`` (``(groups, n, 1)``) maximising ``||M y||`` over the Krylov space
    ``K_k = span{v, M v, ..., M^(k-1) v}`` of each symmetric ``M`` of the ``(groups, n, n)`` stack ``matrix``,
    ``k = min(products, n)``, ``v`` from :func:`_krylov_start`. The ``k - 1`` products are the power iteration's
    (normalised iterates, the sequential part); a Householder QR of the ``k`` iterates gives an orthonormal basis
    ``Q`` of ``K_k`` (Lanczos with full reorthogonalisation builds one vector at a time: the same estimates on the
    measured weights, at over twice the small kernels per product), one batched product ``M Q`` (``k`` more
    matrix-vector products' flops, in one kernel: nothing next to forming the Gram matrix) and ``y = Q s`` with ``s``
    the top eigenvector of ``(M Q)^T (M Q) = Q^T M^2 Q``: ``||M y||`` is the largest ``|eigenvalue|`` of ``M`` seen from
    ``K_k``, where the power iteration saw one vector of it. The whole space catches both ends of the spectrum
    (``M = W W^T - I`` has its largest ``|eigenvalue|`` at either end) and converges like a Chebyshev polynomial,
    not like ``(lambda_2/lambda_1)^k``. Iterates that rounding made dependent (an invariant subspace reached, or a
    converged iteration) leave ``Q`` orthonormal, its extra columns arbitrary directions, so ``Q^T M^2 Q`` stays a
    Rayleigh-Ritz projection and ``||M y|| <= sigma_max(M)``. No ``eigh`` (a host sync on a GPU, for its error
    check); ``linalg.qr`` checks none (pytorch#56248). Call without autograd (the value's gradient comes from the
    caller's product ``M y``)."""
    n = matrix.shape[-1]
    tiny = torch.finfo(matrix.dtype).tiny
    v = _krylov_start(matrix)
    iterates = [v]
    for _ in range(min(products, n) - 1):
        v = matrix @ v
        v = v / v.norm(dim=-2, keepdim=True).clamp_min(tiny)
        iterates.append(v)
    Q = torch.linalg.qr(torch.cat(iterates, dim=-1))[0]
    MQ = matrix @ Q
    y = Q @ _top_eigenvector_psd(MQ.mT @ MQ)
    return y / y.norm(dim=-2, keepdim=True).clamp_min(tiny)


#: Gram matrices up to this size (``n x n``) take SRIP's top vector from the whole space, not a Krylov space:
#: :func:`_srip_top_vector`.
_WHOLE_SPACE_MAX = 128


def _srip_top_vector(matrix: torch.Tensor, products: int) -> torch.Tensor:
    """The unit ``y`` (``(groups, n, 1)``) whose ``||M y||`` is SRIP's estimate of ``sigma_max(M)`` for the symmetric
    ``(groups, n, n)`` stack ``matrix``: from the whole space when ``n <= max(products, 128)``, else from the Krylov
    space of ``products`` products (:func:`_krylov_top_vector`).

    The whole space is exact: ``y`` is the top eigenvector of ``M^T M = M^2`` (:func:`_top_eigenvector_psd`, matrix
    products only, no ``eigh``). The Krylov space of 10 products is not, where it matters most: a near-orthogonal
    weight has ``|eigenvalues|`` of ``M = Gram - I`` clustered together, which a Krylov space separates slowly, and
    the gradient ``sign(lambda) u u^T`` needs the top eigenvector ``u`` itself, not just a vector of nearly the
    top value. Measured (orthogonal rows plus noise of 1e-4..1e-1, 32 x 32 to 256 x 256): the value up to 5 % low
    and the gradient up to 139 % off the exact one in float64 (80 % at 32 x 288, 66 % at 64 x 64, 22 % at
    32 x 32), and float32 and float64 gradients up to 7 % apart; from the whole space both agree with
    ``torch.linalg.matrix_norm(M, ord=2)`` and its gradient to 1e-12 in float64 (a float32 weight is measured in
    float64 here: :func:`srip`). Its cost is ``13 n^3`` (``M^2`` and 12 squarings) where the Krylov space's is
    ``~ 2 products n^2`` in ``products`` sequential steps (the whole space is fewer, larger kernels on a GPU): on one
    CPU thread, srip of a float32 weight with its backward (the Gram matrix in float64) took 0.4 ms instead of
    0.6 ms at 32 x 32, about the same at 64 x 64 and 64 x 576, 2.3 ms instead of 0.8 ms at 128 x 128 and 13 ms
    instead of 2.2 ms at 128 x 1152, where at 256 x 256 the squarings alone would add 13 ms: larger Gram matrices
    keep the Krylov estimate, whose cost is small next to forming them."""
    if matrix.shape[-1] <= max(products, _WHOLE_SPACE_MAX):
        return _top_eigenvector_psd(matrix @ matrix)
    return _krylov_top_vector(matrix, products)


def srip(weight: torch.Tensor, groups: int = 1, iterations: int = 10) -> torch.Tensor:
    """SRIP of a (conv or linear) weight: sum over groups of ``sigma_max(Gram - I)`` (see the module docstring), as
    the differentiable ``||(Gram - I) y||`` of a unit ``y`` found without autograd (:func:`_srip_top_vector`): the top
    eigenvector for a Gram matrix up to 128 x 128 (or ``iterations``), exact, else the best vector of the Krylov
    space of ``iterations`` products with ``Gram - I`` (:func:`_krylov_top_vector`); the gradient is
    ``sign(lambda) u u^T`` in ``Gram - I`` at the top eigenvector ``u``. Never above the exact value (up to
    rounding). A bfloat16 / float16 weight is measured in float32 and the value rounded to its dtype, as
    :func:`orthofx.metrics.lorth` does: ``Gram - I`` of a near-orthogonal weight cancels most of bfloat16's 8 bits;
    a float32 one whose Gram matrix takes the exact path is measured in float64, for the same reason.

    Example::

        import torch
        from orthofx.passes.pre_svd import srip
        w = torch.linalg.qr(torch.randn(64, 64))[0] * 1.1     # every singular value 1.1
        srip(w)                                               # 1.1^2 - 1 = 0.21
    """
    if iterations < 1:
        raise ArgumentError(f"iterations must be >= 1, got {iterations}")
    if weight.dtype in HALF_PRECISION:
        return srip(weight.float(), groups, iterations).to(weight.dtype)
    out = weight.shape[0]
    if out % groups:
        raise ArgumentError(f"{out} output channels are not divisible into {groups} groups")
    W = weight.reshape(groups, out // groups, -1)
    if weight.dtype == torch.float32 and min(W.shape[1:]) <= max(iterations, _WHOLE_SPACE_MAX):
        # the exact top vector of a float32 Gram - I is that of its rounding: on a near-orthogonal weight (noise
        # 1e-4) the cancellation left the value up to 1e-5 above the exact one and the gradient up to 1 % off the
        # float64 one; the whole-space path is exact, so it gets a float64 Gram, as NOG's SVD does
        return srip(weight.double(), groups, iterations).to(weight.dtype)
    gram = W @ W.mT if W.shape[1] <= W.shape[2] else W.mT @ W
    n = gram.shape[-1]
    M = gram - torch.eye(n, dtype=gram.dtype, device=gram.device)
    with torch.no_grad():
        # y does not depend on M's scale: with M's entries scaled to at most 1, neither (M Q)^T (M Q), which squares
        # M, nor the norm's sum of squares overflows (a weight of entries 1e10 gave inf)
        peak = M.detach().abs().amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(M.dtype).tiny)
        y = _srip_top_vector(M.detach() / peak, iterations)
    return (peak[..., 0, 0] * ((M / peak) @ y).norm(dim=(-2, -1))).sum()


# ------------------------------------------------------------------------------------------ penalties, hooks

class SripTerm(PenaltyTerm):
    """SRIP of the weight of the module at ``site``: ``sum_groups sigma_max(W W^T - I)`` (smaller Gram)."""

    def __init__(self, site: str, rule: str, weight: float, groups: int = 1, iterations: int = 10):
        super().__init__(site, rule, weight)
        self.groups = int(groups)
        self.iterations = int(iterations)

    def value(self, root: nn.Module) -> torch.Tensor:
        value, dtype = self.full_precision_value(root)
        return value.to(dtype)  # srip's own rounding of a half-precision weight's value

    def full_precision_value(self, root: nn.Module) -> tuple[torch.Tensor, torch.dtype]:
        """``(SRIP, dtype)``: of a half-precision weight in float32, as :func:`srip` computes it before rounding
        to the weight's dtype, and that dtype (``orthofx.penalty`` weights the float32 value, then rounds)."""
        weight = whole(root.get_submodule(self.site).weight,
                       f"site '{self.site}' (rule '{self.rule}'): the SRIP penalty")
        return srip(weight.float() if weight.dtype in HALF_PRECISION else weight, self.groups,
                    self.iterations), weight.dtype

    def form(self) -> tuple:
        # not the rule's weight: a tensor is one regulariser whatever it is multiplied by (two tied sites with
        # weights 0.1 and 0.1000001 counted twice, with equal weights once); the first site's weight counts
        return (self.groups, self.iterations)


def _sparse_gradient_error(hook: OptimizerHook, treatment: str, needs: str, flag: str) -> OrthofxError:
    """:func:`~orthofx.passes.base.sparse_gradient_error` of NOG / OLR (a layer whose forward makes a sparse
    gradient, such as an ``nn.Linear`` subclass calling ``F.embedding(..., sparse=True)`` kept as a leaf)."""
    return sparse_gradient_error(f"pre_svd ({hook.site}, rule '{hook.rule}'): {treatment}", needs,
                                 "make the layer's gradient dense (e.g. F.embedding(..., sparse=False) in its "
                                 f"forward) or set '{flag}: false' in the rule")


class NearestOrthogonalGradient(OptimizerHook):
    """NOG (P4): before each step the weight's gradient (``out x rest``; per group for a grouped conv,
    ``groups x out/groups x rest``) becomes its polar factor ``U V^T``."""

    reads_grad_scale = True  # _gradient_scale

    treatment = "NOG"
    #: Whether the rule also turns OLR on, whose ``before_step`` (next) checks the weight's param group itself.
    olr_follows = False

    def before_step(self, root: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        module = root.get_submodule(self.site)
        weight = self._weight(root)
        grad = weight.grad
        if grad is None:  # not used this step: the optimizer skips it too
            return
        if optimizer is not None and _frozen_out_of(optimizer, weight):
            return
        if optimizer is not None and not self.olr_follows:  # None: the hook called on its own, on a gradient
            # a weight replaced after attach (load_state_dict(..., assign=True), a new nn.Parameter) is in no param
            # group: NOG rewrote the gradient of a tensor nothing steps, and the layer never trained, silently
            _group_of(optimizer, weight, self)
        if grad.is_sparse:
            raise _sparse_gradient_error(self, "NOG", "the polar factor U V^T of the gradient", "nog")
        groups = weight_groups(module)
        G = whole(grad).reshape(groups, grad.shape[0] // groups, -1)
        # A NaN/inf gradient is left as it was, for the user's own checks; chosen on the device, where a host read
        # was a device sync per layer and step. The SVD, which fails on such a gradient, factors zeros instead.
        # U V^T of s G is that of G (the zero-direction cut is relative to s_max too): a gradient a GradScaler left
        # scaled needs no unscaling, which in float16 flushed its small entries (the factor came out 9 % off)
        finite = torch.isfinite(G).all()
        polar = polar_factor(torch.where(finite, G, 0))
        write_whole(grad, torch.where(finite, polar, G).reshape(grad.shape))
        if _gradient_scale(optimizer) is not None:
            from ..optim import _rescale_after_hooks  # here: orthofx.optim imports the passes

            # the factor is in true units, the other gradients still scaled: back to the kernel's scale (where
            # finite: read with the products' own check, one host read)
            _rescale_after_hooks(optimizer, [grad], valid=finite)


def _gradient_scale(optimizer: torch.optim.Optimizer | None) -> torch.Tensor | float | None:
    """The factor the gradients that the hooks see are multiplied by: the ``grad_scale`` a ``GradScaler`` sets on a
    fused optimizer, whose kernel unscales, where ``orthofx.attach`` leaves half-precision gradients scaled (see
    :func:`orthofx.optim._unscale_for_hooks`); ``None`` for true gradients."""
    return None if optimizer is None else getattr(optimizer, "grad_scale", None)


def _group_or_none(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict | None:
    """The param group holding ``param``, or ``None`` where no group holds it (:func:`_group_of` raises there)."""
    try:
        return _group_of(optimizer, param)
    except OrthofxError:
        return None


def _adopt_group(hook: "OptimalLearningRate", optimizer: torch.optim.Optimizer, group: dict) -> None:
    """Take ``group``, which ``attach`` did not set up, as the OLR weight's own, where it holds the weight alone;
    refuse it where it holds other parameters too, since ``eta*`` set as that group's lr would step them by it (the
    bias of a layer moved into a group of its own lr). Splitting the weight off here, inside a step, would change
    the number of param groups after the user's LR schedulers and checkpoints counted them."""
    if len(group["params"]) == 1:
        group[OLR_GROUP_KEY] = hook.site
        return
    raise _shared_group_error(hook, group)


def _shared_group_error(hook: "OptimalLearningRate", group: dict) -> ArgumentError:
    """The refusal of an OLR weight found at a step in a param group with other parameters (:func:`_adopt_group`,
    :meth:`OptimalLearningRate.check_added`): ``eta*`` set as the group's lr would step them too, and splitting the
    weight off inside the step would change the param groups under the user's LR schedulers and checkpoints."""
    return ArgumentError(
        f"site '{hook.site}' (rule '{hook.rule}'): OLR sets this weight's lr at each step from its own gradient, "
        f"and the weight is in a param group with {len(group['params']) - 1} other parameter(s) (regrouped or added "
        "back with add_param_group after orthofx.attach), which that lr would step too. Add the weight in a group "
        f"of its own: optimizer.add_param_group({{'params': [gm.get_submodule({hook.site!r}).weight], 'lr': ...}}), "
        "its bias in another")


def _frozen_out_of(optimizer: torch.optim.Optimizer, weight: torch.Tensor) -> bool:
    """Whether ``weight`` is frozen (``requires_grad=False``) and in no param group: dropped from the optimizer
    when it was frozen after ``attach`` (fine-tuning), so nothing steps it and its NOG / OLR hooks have nothing to
    do (a gradient it kept from before is stale). Every step raised that the weight was replaced after ``attach``.
    A weight that was replaced (``load_state_dict(..., assign=True)``) is trainable and still refused."""
    return not weight.requires_grad and _group_or_none(optimizer, weight) is None


def _group_of(optimizer: torch.optim.Optimizer, param: torch.Tensor, hook: OptimizerHook | None = None) -> dict:
    """The param group holding ``param``. ``attach`` checked that the optimizer holds the weight, so at a step
    (``hook``: the NOG or OLR hook asking) a weight in no group was replaced after ``attach``: the optimizer still
    steps the old tensor (as it would without orthofx: the new weight never trains).

    A scan of every group's parameters per lookup cost 3.4 ms for the 400 lookups of a step at 400 NOG layers in
    one group, and 147 ms at 400 OLR layers (a group each; OLR looks up twice a step). The position of every parameter
    (group index, index in the group) is kept on the optimizer, keyed by ``id``, and a hit is used only where that
    position still holds this very tensor. A group added (``add_param_group``, OLR's split), removed or reordered,
    or a parameter replaced, makes a position stale or unknown: the miss rebuilds the positions once, so the
    answer is always the current one (and the group, read at each call, has its current lr)."""
    groups = optimizer.param_groups
    positions = optimizer.__dict__.get(_POSITIONS_KEY)
    at = None if positions is None else positions.get(id(param))
    if at is not None and at[0] < len(groups):
        params = groups[at[0]]["params"]
        if at[1] < len(params) and params[at[1]] is param:
            return groups[at[0]]
    # ids only, no tensors: the positions keep nothing alive (and a reused id fails the identity check)
    positions = {id(p): (i, j) for i, group in enumerate(groups) for j, p in enumerate(group["params"])}
    optimizer.__dict__[_POSITIONS_KEY] = positions
    at = positions.get(id(param))
    if at is not None:
        return groups[at[0]]
    treatment = getattr(hook, "treatment", type(hook).__name__)
    where = "" if hook is None else f"site '{hook.site}' (rule '{hook.rule}'): {treatment}: "
    raise OrthofxError(where + replaced_after_attach("the layer's weight") + ". If instead it was taken out of the "
                       "optimizer's groups (another optimizer for it would train it without this hook), give it back "
                       "to this one: "
                       "optimizer.add_param_group({'params': [weight]}), a group of its own")


def _split_off(optimizer: torch.optim.Optimizer, group: dict, param: torch.Tensor) -> dict:
    """Move ``param`` out of ``group`` into a new param group with the same settings; returns the new group.

    An optimizer built from ``named_parameters()`` keeps the names in ``"param_names"``, parallel to
    ``"params"``: the parameter's name moves with it (a load-state-dict hook that maps state by name, and the
    saved state itself, would otherwise pair the group's parameters with the wrong names).
    """
    index = next(i for i, p in enumerate(group["params"]) if p is param)
    settings = {key: value for key, value in group.items()
                if key not in ("params", "param_names") and not key.startswith("orthofx_")}
    new_group = {"params": [param], **settings}
    names = group.get("param_names")
    if names is not None:
        new_group["param_names"] = [names[index]]
        group["param_names"] = names[:index] + names[index + 1:]
    # removed first: torch refuses a parameter that is in two groups
    group["params"] = group["params"][:index] + group["params"][index + 1:]
    optimizer.add_param_group(new_group)
    return optimizer.param_groups[-1]


def _own_lr_tensor(optimizer: torch.optim.Optimizer, group: dict) -> None:
    """Give ``group`` a tensor ``lr`` of its own where its ``lr`` is a tensor that another param group or the
    optimizer's defaults (which ``add_param_group`` hands to new groups) also hold. OLR sets it in place for a
    step: shared, every holder stepped with ``eta*``, and kept another OLR group's ``eta*`` as its lr after the
    step (that group stored it as its base lr). ``setup`` gave the group its own tensor, but
    ``optimizer.load_state_dict`` shares one again among the groups that shared it in the saved state (a state
    saved before ``attach`` with the weight in a group of its own already)."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor) and (optimizer.defaults.get("lr") is lr or any(
            other is not group and other["lr"] is lr for other in optimizer.param_groups)):
        group["lr"] = lr.clone()


def _refuse_state_saved_before_split(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """``optimizer.load_state_dict`` pre-hook: an optimizer state saved before ``attach`` (or by an optimizer
    never attached) has fewer param groups than this optimizer, whose OLR weights ``attach`` moved into groups of
    their own; torch would refuse it only with "loaded state dict has a different number of parameter groups"."""
    saved = state_dict.get("param_groups", [])
    olr = [group[OLR_GROUP_KEY] for group in optimizer.param_groups if OLR_GROUP_KEY in group]
    if len(saved) == len(optimizer.param_groups) or not olr or any(OLR_GROUP_KEY in group for group in saved):
        return
    raise ArgumentError(f"this optimizer state has {len(saved)} param group(s) and the optimizer "
                        f"{len(optimizer.param_groups)}: orthofx.attach gave the OLR weight(s) of site(s) "
                        f"{', '.join(map(repr, olr))} param groups of their own, and the state was saved before "
                        "attach (or by an optimizer never attached). Load it before calling orthofx.attach (attach "
                        "then moves the weights' state along), or save the state after attach")


#: The optimizer's ``__dict__`` entry where, while ``orthofx.attach`` runs the "before" hooks of a step, the OLR
#: hooks leave their eta* inputs, read on the host at once when all have run (:func:`pending_learning_rates`).
_PENDING_KEY = "_orthofx_olr_pending"


def _set_learning_rate(group: dict, base: float, dots: list[float] | None) -> None:
    """Set ``group``'s lr for a step: ``eta*`` of ``dots`` (``a, b, c``; None without a gradient) where
    ``0 < eta* < base``, else ``base``."""
    lr = base
    eta = None if dots is None else _eta(*dots)
    if eta is not None and 0.0 < eta < base:
        lr = eta
    group[_LAST_LR_KEY] = lr
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


@contextlib.contextmanager
def pending_learning_rates(optimizer: torch.optim.Optimizer):
    """While the "before" hooks of a step run, the OLR hooks leave their ``a, b, c`` (tensors) on ``optimizer``;
    at the end of the block they are read on the host at once, one device sync per step instead of one per OLR
    layer, and the lrs set. OLR changes no weight or gradient, so each reads what it would alone; nothing else
    reads a split-off OLR group's lr before the step. Where the block raises, no lr is set (each OLR group keeps its
    base lr, which the "after" hooks restore)."""
    pending = optimizer.__dict__[_PENDING_KEY] = []
    try:
        yield
        ready = [dots for _, _, dots in pending if dots is not None]
        values = torch.cat([dots.to(ready[0].device) for dots in ready]).tolist() if ready else []
        at = 0
        for group, base, dots in pending:
            _set_learning_rate(group, base, None if dots is None else values[at:at + 3])
            at += 0 if dots is None else 3
    finally:
        optimizer.__dict__.pop(_PENDING_KEY, None)


class OptimalLearningRate(OptimizerHook):
    """OLR (P4): the weight gets its own param group, whose lr is ``eta*`` for a step when ``0 < eta* < base lr``.

    ``setup`` moves the weight out of its param group into a new one with the same settings (``attach`` therefore
    edits the optimizer's param groups; ``handle.remove()`` does not merge them back). ``before_step`` reads the
    group's current lr as the base lr (the lr at ``attach``, or what an LR scheduler made of it), stores it under
    ``"orthofx_olr_base_lr"`` and sets ``lr``; ``after_step`` restores the base lr. The lr used is kept under
    ``"orthofx_olr_lr"`` for logging.
    """

    treatment = "OLR"
    reads_grad_scale = True  # _gradient_scale

    def check(self, root: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        weight = self._weight(root)
        where = f"site '{self.site}' (rule '{self.rule}')"
        if isinstance(optimizer, torch.optim.LBFGS) and len(_group_of(optimizer, weight)["params"]) > 1:
            raise ArgumentError(f"{where}: OLR gives the weight a param group of its own, and LBFGS takes exactly "
                                "one param group. Set 'olr: false' in the rule (NOG and the other hooks work with "
                                "LBFGS)")
        # eta* needs this step's gradient, which the closure computes; LBFGS reads its lr before it calls the
        # closure, Rprop reads it only at its first step (then it adapts its own step sizes), and ASGD steps by a
        # size it computed from the previous step's lr: the lr OLR set would never be the one used
        ignores = {torch.optim.LBFGS: "reads its lr before it evaluates the closure that computes the gradient",
                   torch.optim.Rprop: "uses its lr only as the first step size and then adapts its own",
                   torch.optim.ASGD: "steps by a size computed from the previous step's lr"}
        for kind, why in ignores.items():
            if isinstance(optimizer, kind):
                raise ArgumentError(f"{where}: OLR sets the weight's lr from this step's gradient, and "
                                    f"{kind.__name__} {why}, so no step would use the eta* of its own gradient. "
                                    "Set 'olr: false' in the rule (NOG and the other hooks still work), or use "
                                    "SGD, Adam, AdamW or RMSprop")
        # ZeroRedundancyOptimizer partitions its param groups over the ranks when it is built, and its local
        # optimizers keep their shards; it supports adding a group of new parameters only. Moving a weight out of
        # a group re-partitions the old groups under the local optimizers' feet: another layer's weight was then
        # stepped by the wrong rank's shard (2e-2 off after one step), silently.
        if is_zero_redundancy(optimizer) and len(_group_of(optimizer, weight)["params"]) > 1:
            raise ArgumentError(f"{where}: OLR sets this weight's lr in a param group of its own, and a "
                                "ZeroRedundancyOptimizer cannot move a weight out of a group after it partitioned "
                                "its groups over the ranks. Build it with the weight in a group of its own, e.g. "
                                "ZeroRedundancyOptimizer([{'params': others}, {'params': [gm.get_submodule("
                                f"{self.site!r}).weight]}}], optimizer_class=..., ...), or set 'olr: false' in the "
                                "rule")
        # An LR scheduler stores one base lr per param group when it is created ('initial_lr' in every group) and
        # pairs them with the groups at each step: the group setup() adds would fail its next step with "zip()
        # argument 2 is longer than argument 1" (LambdaLR, CosineAnnealingLR, CyclicLR, ...) or go unscheduled.
        group = _group_of(optimizer, weight)
        if len(group["params"]) > 1:
            scheduled = [i for i, group in enumerate(optimizer.param_groups) if "initial_lr" in group]
            if scheduled and "initial_lr" not in group:
                # the weight's group came after the scheduler (add_param_group before attach; added when
                # unfreezing a weight frozen at attach, check_added gives this message first, at the step)
                raise self._added_after_scheduler_error(where)
            if scheduled:
                raise ArgumentError(f"{where}: OLR moves the weight into a param group of its own, and an LR "
                                    f"scheduler already holds the optimizer's groups (param group {scheduled[0]} "
                                    "has 'initial_lr'), so it would not schedule the new group. Create the LR "
                                    "scheduler after orthofx.attach(optimizer, gm) (and load checkpoints of the "
                                    "optimizer and scheduler after both)")

    def _added_after_scheduler_error(self, where: str) -> ArgumentError:
        return ArgumentError(f"{where}: OLR moves the weight into a param group of its own, and its group "
                             "was added to the optimizer after an LR scheduler was created (add_param_group "
                             "when unfreezing), so the scheduler would not schedule the split-off group. "
                             "Add the weight in a group of its own, optimizer.add_param_group({'params': "
                             f"[gm.get_submodule({self.site!r}).weight]}}) (its bias in another), or create "
                             "the LR scheduler after adding the groups")

    def check_added(self, root: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """``attach``'s check, at a step, of a weight frozen at ``attach`` (this hook skipped) and added to the
        optimizer since (``add_param_group`` when unfreezing), before :meth:`check` and before anything changes.
        :meth:`setup` would split the weight off a group it shares, as ``attach`` does; here that would run inside
        ``optimizer.step()``, after the user's LR schedulers and checkpoints counted the groups: a state saved after
        that step had one group more than the same script's optimizer before its first step, whose
        ``load_state_dict`` then failed, and a scheduler created after ``add_param_group`` got advice to create it
        after ``attach``, which it was. So the split is refused here, as :func:`_adopt_group` refuses a weight
        regrouped after ``attach``: the weight must come in a group of its own."""
        weight = self._weight(root)
        group = _group_of(optimizer, weight)
        if len(group["params"]) == 1:
            return
        if "initial_lr" not in group and any("initial_lr" in other for other in optimizer.param_groups):
            # added after an LR scheduler too: check's message, which names that as well (same advice)
            raise self._added_after_scheduler_error(f"site '{self.site}' (rule '{self.rule}')")
        raise _shared_group_error(self, group)

    def setup(self, root: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        weight = self._weight(root)
        group = _group_of(optimizer, weight)
        if len(group["params"]) == 1:
            group[OLR_GROUP_KEY] = self.site
            own = group
        else:
            own = _split_off(optimizer, group, weight)
            own[OLR_GROUP_KEY] = self.site
        # A tensor lr may be one object shared by every group (torch hands each group the default's tensor), or
        # by another optimizer: the step sets this group's lr in place, so it gets a tensor of its own.
        if isinstance(own["lr"], torch.Tensor):
            own["lr"] = own["lr"].clone()
        if not optimizer.__dict__.get(_LOAD_CHECK_KEY):
            optimizer.__dict__[_LOAD_CHECK_KEY] = True
            optimizer.register_load_state_dict_pre_hook(_refuse_state_saved_before_split)

    def before_step(self, root: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        weight = self._weight(root)
        if weight.grad is not None and weight.grad.is_sparse:  # before the group's lr is touched
            raise _sparse_gradient_error(self, "OLR", "eta* = a b / (a c + 2 b^2) of the flattened gradient", "olr")
        if _frozen_out_of(optimizer, weight):  # nothing steps it: no lr to set
            return
        group = _group_of(optimizer, weight, self)
        if OLR_GROUP_KEY not in group:
            # the weight is back in the optimizer in a group attach did not give it (dropped when frozen, then
            # add_param_group when unfrozen again, or regrouped for another lr)
            _adopt_group(self, optimizer, group)
        if _BASE_LR_KEY in group:
            # a weight shared by two sites has two OLR hooks: the first set this step's lr (from the same weight
            # and gradient); the base lr it stored is the one to restore, not the eta* it wrote
            return
        _own_lr_tensor(optimizer, group)
        base = group["lr"]
        base = float(base) if isinstance(base, torch.Tensor) else base
        group[_BASE_LR_KEY] = base
        dots = None
        if weight.grad is not None:
            # maximize=True steps along +g: eta* of the step direction -(-g)
            grad = whole(weight.grad)
            scale = _gradient_scale(optimizer)
            if scale is not None:
                # eta* of s g is eta* / s: the true gradient, divided in float64 (not in place in float16, where it
                # lost its small entries, and the gradient the optimizer then stepped by kept the loss)
                grad = grad.to(torch.float64) / (scale.to(grad.device, torch.float64)
                                                 if isinstance(scale, torch.Tensor) else scale)
            dots = _olr_dots(whole(weight), -grad if group.get("maximize") else grad)
        pending = optimizer.__dict__.get(_PENDING_KEY)
        if pending is not None:  # orthofx.attach's hooks: read with the others' (pending_learning_rates)
            pending.append((group, base, dots))
        else:
            _set_learning_rate(group, base, None if dots is None else dots.tolist())

    def after_step(self, root: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        weight = self._weight(root)
        group = _group_or_none(optimizer, weight)
        if group is None:  # before_step set no lr (or raised, naming the weight): nothing to put back
            return
        base = group.pop(_BASE_LR_KEY, None)
        if base is None:
            return
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(base)
        else:
            group["lr"] = base


# ---------------------------------------------------------------------------------------------------- pass

def _first_sentence(text: str) -> str:
    head = text.split(". ")[0].strip()
    return head[:200]


_NOTHING_ASKED = "nothing to apply (weight none, nog and olr off)"


def hard_layer_problem(module: nn.Module | None, name: str, padding: str,
                       owners: dict[int, list[tuple[str, nn.Module]]] | None = None) -> str | None:
    """Why ``weight: orthogonal`` will put L_orth on the layer ``module`` at site ``name`` instead of the hard
    orthogonal layer, as far as the layer and the model's other layers tell (``None``: the hard layer is built), in
    ``apply``'s order: the layer an earlier rule wrapped (a ConvNorm layer), a weight tied to other layers
    (``owners``: :func:`~orthofx.passes.base.parameter_owners` of the model; ``None`` leaves ties out), a conv no
    (trainable) orthogonal version of exists (orthogonal_conv's own reasons). ``apply`` asks it before building the
    layer (which may still fail, or change the output shape on the example inputs); planning asks it so that
    ``explain`` shows ``apply: L_orth instead: <reason>`` as orthogonal_conv's rows do.

    Example::

        from torch import nn
        from orthofx.passes.pre_svd import hard_layer_problem
        hard_layer_problem(nn.Conv2d(4, 8, 1, stride=2), "c", "keep")   # 'no orthogonal convolution exists ...'
        hard_layer_problem(nn.Conv2d(8, 8, 3, padding=1), "c", "keep")  # None
    """
    if module is None or getattr(module, "weight", None) is None or is_uninitialised(module):
        return None  # planning refuses these for the pass, with its own reasons
    tied = [] if owners is None else [other for other, m in owners.get(id(module.weight), []) if m is not module]
    if isinstance(module, ConvNormConvNd) and any(other.startswith(f"{name}.") for other in tied):
        # its conv's weight, not a tie between layers
        return _wrapped_problem(type(module).__name__)
    if tied:  # a hard layer holds its own parameters: the other layers would keep the old weight
        return f"its weight is tied to {', '.join(tied)} (a hard orthogonal layer would untie them)"
    if isinstance(module, nn.Linear):
        return None
    # the output-shape check of apply needs example inputs: without them a circular layer of another output size (a
    # conv with padding=0) replaced the layer silently; refuse what orthogonal_conv refuses
    return _impossibility(module, padding)


def _wrapped_problem(wrapper: str) -> str:
    """:func:`hard_layer_problem`'s reason for a layer an earlier rule wrapped in the ConvNorm class ``wrapper``."""
    return (f"the layer is a {wrapper} now (an earlier rule wrapped it), and a hard orthogonal layer would replace "
            "the ConvNorm wrapper")


def _convnorm_wrapper(module: nn.Module) -> type | None:
    """The ConvNorm class the convnorm pass wraps the conv ``module`` in (as :func:`~orthofx.nn.with_convnorm` picks
    it), ``None`` for a layer it does not wrap."""
    return next((cls for cls in (ConvNormConv1d, ConvNormConv2d, ConvNormConv3d) if isinstance(module, cls._conv_type)),
                None)


def _on_meta_device(module: nn.Module | None) -> bool:
    """Whether ``module`` has a parameter or buffer on the meta device. ``apply`` reads the weight's values
    whatever it does (its orthogonality error, in the Change), so there the outcome is planning's MetaWeightError,
    which an outcome of the pass's own keeps from being given (transform then failed inside torch)."""
    return module is not None and any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def _fallback_outcome(module: nn.Module | None, name: str, params: dict[str, Any],
                      owners: dict[int, list[tuple[str, nn.Module]]] | None = None) -> str | None:
    """``explain``'s outcome of a site where ``weight: orthogonal`` will put L_orth on the layer
    (:func:`hard_layer_problem`; orthogonal_conv's words for its ``on_impossible: regularize``), else ``None``
    (also for a layer on the meta device: :func:`_on_meta_device`)."""
    if params["weight"] != "orthogonal" or module is None or _on_meta_device(module):
        return None
    problem = hard_layer_problem(module, name, params["padding"], owners)
    return None if problem is None else f"L_orth instead: {problem}"


#: Why a transposed conv is skipped. Its weight is ``in x out/groups x kernel`` (the adjoint's layout), which NOG's
#: ``out x rest`` gradient would read as the adjoint conv's matrix, and the hard orthogonal transposed layer takes
#: its alignment from the layer's output size, not from ``padding: keep``: neither is P4's Pre-SVD layer (a conv
#: or linear computing the features), so the pass leaves it to the passes made for it.
_TRANSPOSED_REASON = ("{kind} is a transposed convolution, which pre_svd does not treat (P4's Pre-SVD layer is a "
                      "Conv1d/2d/3d or Linear, whose weight NOG reads as out x rest; 'padding: keep' has no "
                      "transposed counterpart); for its orthogonality use the orth_regularizer or orthogonal_conv "
                      "pass")


def _treats_weight(params: dict) -> bool:
    """Whether a rule's ``params`` ask the Pre-SVD pass for anything (a weight treatment, NOG or OLR)."""
    return params["weight"] != "none" or params["nog"] or params["olr"]


@register_pass
class PreSVD(Pass):
    """P4's treatments of the layer feeding an SVD meta-layer: orthogonal weights (hard, L_orth or SRIP), NOG, OLR."""

    name = "pre_svd"
    params = (
        Param("weight", "none", (str,), "orthogonal-weight treatment: none, orthogonal (hard layer), lorth or srip",
              choices=("none", "orthogonal", "lorth", "srip")),
        Param("penalty_weight", 0.01, (float,), "weight of the lorth / srip term in orthofx.penalty", minimum=0.0),
        Param("nog", True, (bool,), "Nearest Orthogonal Gradient: the gradient becomes its polar factor"),
        Param("olr", False, (bool,), "Optimal Learning Rate for this layer (own param group)"),
        Param("power_iterations", 10, (int,), "matrix products (Krylov space size) of the SRIP estimate of a Gram "
              "matrix larger than 128 x 128 (smaller ones are exact)", minimum=1),
        Param("padding", "keep", (str,), "weight: orthogonal: keep the conv's padding, or circular 'same' (exact)",
              choices=("keep", "circular")),
        Param("frozen", "skip", (str,), "weight: orthogonal on a layer whose weight has requires_grad=False: skip "
              "it (left as it is) or overwrite it (replaced, still frozen)", choices=("skip", "overwrite")),
    )
    site_kinds = frozenset({"module"})
    module_types = _LAYER_TYPES
    group = "weight"
    complex_weights = "treats real weights only (NOG, OLR, SRIP and orthogonal weights)"
    needs_weight_parameter = True  # except where handles_derived_weight says the rule only reads it

    def accepts(self, site, module):
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            # a 'feeds' rule selects a decoder's transposed conv too (a producer); the generic "handles ..., not
            # ConvTranspose2d" read as an omission, as Conv3d's was, where this one is a choice
            return _TRANSPOSED_REASON.format(kind=type(module).__name__)
        reason = super().accepts(site, module)
        if reason is not None:
            return reason
        if not site.name:
            return "the Pre-SVD treatment needs a named layer, not the root module"
        if is_uninitialised(module):
            return f"{site.name} is a lazy layer that has not run yet; run the model once first"
        return None

    def weight_values_read(self, params):
        return "measures the weight's orthogonality error"

    def planned_outcome(self, site, module, params):
        # explain said 'apply' where apply records that it did nothing (the same words as its Change), and where
        # 'weight: orthogonal' falls back to L_orth; ties need the whole model: check_plan
        if _on_meta_device(module):
            return None
        if not _treats_weight(params):
            return f"left unchanged: {_NOTHING_ASKED}"
        return _fallback_outcome(module, site.name, params)

    def check_plan(self, gm: nn.Module, entries: list[PlanEntry]) -> None:
        """The outcome of a ``weight: orthogonal`` site whose weight another layer shares, or whose layer an earlier
        rule wraps in a ConvNorm layer (``entry.replaced_by``: planning sees the conv, ``apply`` will get the
        wrapper): ``apply`` puts L_orth on it (:func:`hard_layer_problem`, which :meth:`planned_outcome` asked
        without the model's other layers and the policy's other rules)."""
        owners = parameter_owners(gm)
        for entry in entries:
            module = gm.get_submodule(entry.site.name)
            replacer = entry.replaced_by[1] if entry.replaced_by is not None else None
            wrapper = _convnorm_wrapper(module) if replacer == ConvNormPass.name else None
            if wrapper is not None and entry.params["weight"] == "orthogonal" and not _on_meta_device(module):
                entry.outcome = f"L_orth instead: {_wrapped_problem(wrapper.__name__)}"  # apply's first check
                continue
            outcome = _fallback_outcome(module, entry.site.name, entry.params, owners)
            entry.outcome = outcome or entry.outcome

    def accepts_params(self, site, module, params):
        # 'weight: orthogonal' replaces the layer by its nearest orthogonal one, another function: a frozen weight
        # (a pretrained layer kept fixed) was replaced silently, as orthogonal_conv's 'frozen' option now prevents
        frozen = frozen_reason(module, False, "replaces it (weight: orthogonal)") \
            if params["weight"] == "orthogonal" and params["frozen"] == "skip" else None
        if frozen is not None:
            return frozen
        # NOG and OLR act on the weight around optimizer.step(): a weight that is a buffer (or None) is in no
        # optimizer, so attach would skip their hooks as if the weight were frozen, while the Change said
        # "NOG + OLR". A weight a parametrization computes is refused by planning, with its own reason.
        if not (params["nog"] or params["olr"]) or derived_weight(module) is not None:
            return None
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            return None
        if weight is None:
            return ("its weight is None, so no optimizer steps it and the NOG / OLR optimizer hooks would never run; "
                    "make the weight an nn.Parameter of the layer, or leave the layer out of the rule (exclude: "
                    f"'{site.name}')")
        return (f"its weight is a {type(weight).__name__} that is not an nn.Parameter (a buffer?), so no optimizer "
                "steps it and the NOG / OLR optimizer hooks would never run; make the weight an nn.Parameter of the "
                "layer, or set 'nog: false' and 'olr: false' in the rule with 'weight: orthogonal' (the hard "
                "orthogonal layer takes the layer's place, its weight the nearest orthogonal one to this buffer, "
                "kept fixed as the buffer was; without a weight treatment the rule does nothing, and 'lorth' / "
                "'srip' would only measure this weight: their penalty's gradient reaches no parameter)")

    def handles_derived_weight(self, params):
        # NOG and OLR act on the weight around optimizer.step(), and the hard orthogonal layer replaces the layer;
        # lorth and srip only read it, so a weight a parametrization computes is fine for them alone
        return not (params["nog"] or params["olr"] or params["weight"] == "orthogonal")

    def replaces_layer(self, params: dict[str, Any]) -> bool:
        """``weight: orthogonal`` puts the hard orthogonal layer in place (or L_orth where none exists: planning
        counts it as a replacement either way, so a later pass needing the original layer is refused, not
        handed an OrthogonalConv2d)."""
        return params["weight"] == "orthogonal"

    def optimizer_hooked_weights(self, gm: nn.Module, entries: list[PlanEntry]) -> list[tuple[PlanEntry, str, str]]:
        """The weight of every site whose rule turns NOG or OLR on (a weight tied to another layer never becomes
        the hard orthogonal layer, which would carry no hooks: the pass falls back to L_orth and keeps them)."""
        return [(entry, "weight", " + ".join(name for name in ("nog", "olr") if entry.params[name]).upper())
                for entry in entries if entry.params["nog"] or entry.params["olr"]]

    def apply(self, ctx: PassContext, entries: list[PlanEntry]) -> None:
        # hard layers not orthogonal on the example's inputs: orthogonal_conv's status, report keys and warning
        off_grid = OffGridLayers(self.name)
        for entry in entries:
            self._apply_one(ctx, entry, off_grid)
        off_grid.warn()

    def _apply_one(self, ctx: PassContext, entry: PlanEntry, off_grid: OffGridLayers) -> None:
        name, params = entry.site.name, entry.params
        module = ctx.module(name)
        before: dict[str, Any] = {"layer": describe_module(module), "feeds": decompositions_fed(ctx, name)}
        with torch.no_grad():
            before["orthogonality_error"] = _flat_orthogonality_error(module.weight, weight_groups(module))
        after: dict[str, Any] = {}
        parts: list[str] = []
        hooks_allowed = True
        treatment = params["weight"]

        if treatment == "orthogonal":
            layer, reason = self._try_hard(ctx, name, module, params["padding"])
            if layer is not None:
                # the orthogonal_conv pass's status for the same layer: zero padding kept is not orthogonal at the
                # borders, nor is a strided layer on example inputs not divisible by its stride, and it says so
                after["layer"] = type(layer).__name__
                after["init_error"] = getattr(layer, "init_error", None)
                status = off_grid.mark(ctx.manifest, name, layer, _hard_status(module, params["padding"]), after)
                parts.append("orthogonal (hard)" if status == "hard" else f"orthogonal: {status}")
                hooks_allowed = False
                if params["nog"] or params["olr"]:
                    after["hooks"] = "NOG/OLR not attached: the hard layer's weight is not a parameter"
            else:
                treatment = "lorth"
                after["fallback"] = reason
                parts.append(f"L_orth (fallback: {reason})")
        elif treatment in ("lorth", "srip"):
            parts.append("L_orth" if treatment == "lorth" else "SRIP")

        if treatment == "lorth":
            term = lorth_term(module, name, entry.rule_name, params["penalty_weight"], root=ctx.gm)
            shared = ctx.add_penalty(term)
            if shared is not None:
                after["penalty"] = f"counted once, at {shared} (tied weight)"
            with torch.no_grad():
                after["lorth"] = float(term.value(ctx.gm))
        elif treatment == "srip":
            term = SripTerm(name, entry.rule_name, params["penalty_weight"], groups=weight_groups(module),
                            iterations=params["power_iterations"])
            shared = ctx.add_penalty(term)
            if shared is not None:
                after["penalty"] = f"counted once, at {shared} (tied weight)"
            with torch.no_grad():
                after["srip"] = float(term.value(ctx.gm))

        if hooks_allowed:
            if params["nog"]:
                nog = NearestOrthogonalGradient(name, entry.rule_name)
                nog.olr_follows = params["olr"]
                ctx.add_optimizer_hook(nog)
                parts.append("NOG")
            if params["olr"]:
                ctx.add_optimizer_hook(OptimalLearningRate(name, entry.rule_name))
                parts.append("OLR")
        elif params["nog"] or params["olr"]:
            parts.append("no NOG/OLR on a hard layer")

        status = " + ".join(parts) if parts else f"skipped: {_NOTHING_ASKED}"
        feeds = ", ".join(before["feeds"]) or "a decomposition"
        ctx.record(Change(site=name, rule=entry.rule_name, pass_name=self.name,
                          what=f"Pre-SVD layer feeding {feeds}: {status}", params=dict(params), before=before,
                          after=after, status=status))

    def _try_hard(self, ctx: PassContext, name: str, module: nn.Module, padding: str):
        """The hard orthogonal layer put in place of ``module``, or ``(None, reason)``."""
        problem = hard_layer_problem(module, name, padding, parameter_owners(ctx.gm))
        if problem is not None:
            return None, problem
        try:
            # from_conv's default nearest-kernel fit (200 steps), as before the helper was shared
            layer = orthogonal_layer(module, padding=padding, fit_steps=200)
        except (OrthofxError, ValueError, TypeError) as exc:
            return None, _first_sentence(str(exc))
        layer.train(module.training)
        inputs = ctx.site_inputs.get(name)
        expected = ctx.manifest.output_shapes.get(name)
        if inputs is not None and expected is not None:
            was = layer.training
            layer.eval()
            with torch.no_grad():
                shape = tuple(layer(*inputs).shape)
            layer.train(was)
            if shape != tuple(expected):
                return None, (f"the orthogonal layer would change the output shape from {tuple(expected)} to "
                              f"{shape}")
        ctx.replace_module(name, layer)
        return layer, None


def _flat_orthogonality_error(weight: torch.Tensor, groups: int = 1) -> float:
    """``||W W^T - I||_F`` (or ``W^T W``, the smaller Gram) of the weight reshaped to ``out x rest``; for a grouped
    conv, of each ``out/groups x rest`` block, combined as the Frobenius norm of the block-diagonal ``Gram - I``
    (``sqrt(sum_g ||Gram_g - I||_F^2)``)."""
    W = weight.detach().reshape(groups, weight.shape[0] // groups, -1).to(torch.float64)
    gram = W @ W.mT if W.shape[1] <= W.shape[2] else W.mT @ W
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return float(torch.linalg.vector_norm(gram - eye))

