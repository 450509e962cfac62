"""Pass ``riemannian``: train Linear / Conv1d / Conv2d / Conv3d weights, and the hidden-to-hidden weights of
recurrent layers gate by gate, on the Stiefel manifold (P1).

The graph is not changed. At transform time the pass (optionally) projects each selected weight onto the
manifold and records a :class:`StiefelHook` per constrained layer; ``orthofx.attach(optimizer, gm)`` runs the
hooks inside ``optimizer.step()``. Any optimizer works (SGD with or without momentum, Adam, AdamW, ...), because
the hooks turn the step the optimizer actually took into a Riemannian one:

before the step
    the weight's gradient ``G`` is replaced (in place) by its tangent projection ``P_W(G) = G - W sym(W^T G)``,
    and the pre-step weight ``W`` is kept (a clone, held only until the step ends);
the optimizer
    takes its usual step ``W -> W + d`` (``d = -lr P_W(G)`` for plain SGD; momentum, Adam's scaling and weight
    decay make ``d`` something else);
after the step
    ``xi = P_W(d)`` with ``d = W_after - W_before`` (the step's component normal to the manifold, weight decay
    included, since ``P_W(W) = 0``, is dropped), and the weight becomes ``R_W(xi)``, retracted from the *pre-step*
    point with the polar or QR retraction of :mod:`orthofx.nn.stiefel`. For plain SGD this is exactly Riemannian
    gradient descent, ``W <- R_W(-lr grad_R f(W))`` with the Riemannian gradient ``grad_R f = P_W(G)``.
    With ``momentum: project`` the optimizer's first-moment state is then projected onto the tangent space at the
    new point, ``m <- P_{W_new}(m)``: SGD's ``momentum_buffer`` and Adam/AdamW's ``exp_avg`` (a vector transport
    by projection, so momentum keeps pointing along the manifold). The state is found by name: any entry called
    ``momentum_buffer`` or ``exp_avg`` with the weight's shape is projected, so also RMSprop's
    ``momentum_buffer`` and NAdam / RAdam / Adamax's ``exp_avg``. Adam's second moment ``exp_avg_sq`` is a
    per-entry scale, not a direction, and is left as is; other state is left as is too.

Matrices and shapes follow :mod:`orthofx.nn.stiefel`: a Linear weight ``(out, in)`` has orthonormal columns when
``out >= in`` and orthonormal rows when ``out < in``; a convolution weight is flattened to ``(out, in * k * k)``
(per group for grouped convs) and that matrix is kept orthonormal (kernel orthogonality, which is orthogonality
of the convolution itself only for 1x1 and delta kernels, see P0). Biases are not constrained. A recurrent layer
(``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``, or a cell) has its hidden-to-hidden weights constrained
(:func:`recurrent_hidden_weights`; one hook per weight, named in the manifest): each stacks one ``H x H`` block per
gate (4 for an LSTM, 3 for a GRU, 1 for an RNN; ``H x proj_size`` for an LSTM with ``proj_size``), and each block
is kept orthonormal on its own (the per-gate orthogonal recurrence of orthogonal RNNs; ``torch``'s
``parametrizations.orthogonal`` on ``weight_hh_l0`` would instead make the ``4H x H`` stack's columns orthonormal).
Input weights (``weight_ih_*``), biases and an LSTM's projections (``weight_hr_*``) train freely; a hidden weight
computed by a torch parametrization, or recomputed by a forward pre-hook (the older ``torch.nn.utils.weight_norm`` /
``spectral_norm``, ``torch.nn.utils.prune``), makes the pass decline the layer. Half-precision
(float16 / bfloat16) weights, gradients and first moments are projected and retracted in float32 and written
back once, in their own dtype.

Parameters (``with:``):

* ``retraction``: ``polar`` (default; P1's retraction, by Newton-Schulz matrix products near the manifold, see
  :mod:`orthofx.nn.stiefel`) or ``qr`` (the sign-fixed Q factor: one Householder QR per matrix, which is
  slower than ``polar``'s batched products on CPU and much slower on GPU; benchmarks/jacobian.py).
* ``free``: ``none`` (default), ``first`` or ``last``. P1 leaves one layer unconstrained (it carries the
  scale the orthonormal layers cannot, and the proof of linear convergence needs it): ``first`` / ``last``
  leaves the first / last site this *rule* would constrain, in graph order, unconstrained (no projection, no
  hook). Each rule counts its own sites (after ``only_square``); the manifest records a Change for the free
  site ("left free", status ``free``) and names it in the Changes of the constrained ones
  (``after["free_site"]``). A site of the rule whose weight is tied to the free site's (the same parameter) is
  left free too, since constraining it would constrain the free weight; a site of *another* rule sharing it
  is a :class:`~orthofx.errors.PlanError` (that rule would constrain this rule's free weight). A rule whose
  ``free`` leaves all it selected free (one site, or sites all sharing the free one's weight) constrains nothing:
  it warns (:class:`~orthofx.errors.OrthofxWarning`).
* ``momentum``: ``project`` (default, described above) or ``keep`` (the optimizer's state is left alone).
  Projection is a vector transport: ``P_{W_new}`` maps the old tangent space onto the new one, is linear, and
  is the identity when the point does not move (the standard transport of Riemannian heavy-ball and Adam
  methods on embedded manifolds). It is the one orthofx offers: the differentiated retraction is a transport
  too but costs another matrix decomposition per step, and for small steps the two differ by ``O(|xi|^2)``.
  With ``keep`` the buffer also carries directions of earlier tangent spaces that are normal at the current
  point; each step's projection of ``d`` discards them, so steps are shorter than the optimizer's. ``keep`` is
  there for comparison.
* ``init``: ``project`` (default): at transform time the weight is replaced by its nearest orthonormal matrix
  (polar factor), so the constraint holds from step 0, except a frozen weight (``requires_grad=False``), which
  is left as the user froze it; ``keep``: the weight is left as is and lands on the manifold at the first step's
  retraction. Either way the weight ends on the manifold, with all singular values 1: a gain an earlier pass
  gave it is lost (see below).
* ``only_square``: ``false`` (default); ``true`` constrains only layers whose (flattened, per group) weight is
  square. The others are declined at planning time (:meth:`Riemannian.accepts_params`), so ``explain`` and
  ``report`` show them as ``skipped: not square (out x in)`` and they train unconstrained; a rule (not
  ``optional``) whose sites are all non-square is a plan error, as for any rule whose pass can handle none of
  its sites. The policy's ``where:`` filters compare one attribute with a value and cannot say
  ``in_features == out_features``; this parameter is how the ``isometric`` preset trains only the square
  Linears on the manifold.

A weight tied between selected sites (``b.weight = a.weight``, also across rules) gets one hook, at the first
of them in plan order; the others record in their Change that the weight is tied to it and constrained there
(``after["tied_to"]``), since two hooks on one tensor would each retract it from the pre-step point. Where the
sites would cut the weight into different matrices (a ``GRUCell``'s ``weight_hh``, 3 gate blocks of ``H x H``, tied
to an ``nn.Linear(H, 3H)``'s one ``3H x H`` matrix; convs with other ``groups``) or step it with another
``retraction``, ``momentum`` or ``init``, planning stops with a :class:`~orthofx.errors.PlanError` naming both
sites: the manifolds do not meet, so whichever hook ran last would decide which constraint holds. These checks
run when the plan is built (:meth:`Riemannian.check_plan`), so ``orthofx.explain`` raises the same error as
``orthofx.transform``.

A weight an earlier pass of the policy scaled (``isometric_init`` with a ``gain`` or ``activation: relu``: all its
singular values equal the scale) loses that scale here, since the Stiefel constraint fixes every singular value at
1 (with ``init: keep`` at the first step's retraction): the pass warns (:class:`ScaleLostWarning`) and the site's
Change says so (``after["scale_lost"]``). Give the layers this pass constrains scale 1, or leave out (or
``free``) the layer that should carry a gain.

Under DDP the hooks run inside ``optimizer.step()``, so after the gradients were all-reduced; every replica
computes the same projection and retraction, nothing else is needed. With ``ZeroRedundancyOptimizer`` each rank
steps its shard of the weights and keeps their state in its local optimizer: the hooks retract every weight on
every rank (after ZeRO's broadcast), and the rank that owns a weight transports its first moment.

A weight taken out of the attached optimizer's groups after ``attach`` (frozen and dropped, then unfrozen into
another optimizer) is stepped there as a plain parameter, and one replaced after ``attach``
(``gm.load_state_dict(sd, assign=True)``) is stepped by nothing (the optimizer steps the old tensor): the attached
optimizer's next step warns, once per weight, one warning per cause for all of a model's sites, each with its remedy
(:func:`_warn_stepped_elsewhere`; found among the weights its step left unmoved, so a step that moved every weight
pays nothing).

An EMA / SWA copy of the model (``torch.optim.swa_utils.AveragedModel``) averages the weights off the manifold:
:func:`orthofx.optim.project_stiefel_weights` puts each back as its hook cuts it (:meth:`StiefelHook.projection`).

Example::

    import torch, orthofx
    model = orthofx.models.get("deep_linear", depth=4, width=16, in_features=16, out_features=16)
    gm = orthofx.transform(model, {"rules": [{"match": {"type": "Linear"}, "apply": "riemannian",
                                              "with": {"free": "first"}}]})
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
    orthofx.attach(optimizer, gm)
    x = torch.randn(32, 16)
    loss = (gm(x) - x).square().mean(); loss.backward(); optimizer.step()   # layers 1..3 stay orthonormal
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from ..errors import (ArgumentError, LayerArgumentError, OrthofxError, OrthofxWarning, PlanError, ScaleLostWarning,
                      TransformError, caller_stacklevel, first_few)
from ..nn import stiefel
from ..nn.precision import describe_nonfinite
from .base import (TORCH_CONV_TYPES, RECURRENT_TYPES, Change, OptimizerHook, Param, Pass, PassContext, PlanEntry, Site,
                   TiedUse, check_tied, entries_by_rule, first_warning_outside, gate_blocks_text, hooked_weight,
                   is_uninitialised, matrices_text, recurrent_hidden_weights, recurrent_weights_reason,
                   registered_weights_held, replaced_after_attach, replaced_neighbours_held, require_initialised,
                   weight_groups, warned_outside, weight_label, whole, sparse_gradient_error, write_whole)
from .registry import register_pass

__all__ = ["Riemannian", "ScaleLostWarning", "StiefelHook", "scale_lost_note",
           "recurrent_hidden_weights"]  # the latter from .base, named here as before

_LAYER_TYPES = (nn.Linear,) + TORCH_CONV_TYPES
#: Optimizer state entries that hold a first moment (a direction) and are projected with ``momentum: project``.
MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")
#: The values of the ``momentum`` parameter (module docstring).
MOMENTUM_MODES = ("project", "keep")


def is_zero_redundancy(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is a ``torch.distributed.optim.ZeroRedundancyOptimizer``. The class is looked up in
    ``sys.modules`` only: such an optimizer exists only once its module was imported, and importing
    ``torch.distributed.optim`` at every step would cost time for nothing."""
    module = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    zero = getattr(module, "ZeroRedundancyOptimizer", None)
    return zero is not None and isinstance(optimizer, zero)


def zero_redundancy_local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer | None:
    """The local optimizer of a ``ZeroRedundancyOptimizer`` (``None`` for any other optimizer). ZeRO partitions
    the parameters over the ranks; each rank steps its shard with this local optimizer (``optimizer.optim``), which
    holds that shard's state, and broadcasts the result; ZeRO's own ``state`` stays empty."""
    return getattr(optimizer, "optim", None) if is_zero_redundancy(optimizer) else None


def optimizer_state(optimizer: torch.optim.Optimizer, parameter: torch.Tensor) -> dict:
    """The optimizer's state of ``parameter`` (empty if it has none yet). For a ZeroRedundancyOptimizer, the state
    its local optimizer keeps on the rank that owns the parameter (the other ranks hold none, as they never step
    it)."""
    state = optimizer.state.get(parameter)
    if state is None:
        local = zero_redundancy_local_optimizer(optimizer)
        if local is not None:
            state = local.state.get(parameter)
    return state or {}


def _site_weights(module: nn.Module) -> list[tuple[str, int]]:
    """``(name, groups)`` of the weights the pass keeps on the Stiefel manifold at a site, each flattened to
    ``groups`` matrices (:func:`orthofx.nn.stiefel.flatten_weight`): a Linear's or conv's ``weight`` (per conv
    group), a recurrent layer's hidden-to-hidden weights (per gate, :func:`recurrent_hidden_weights`)."""
    if isinstance(module, RECURRENT_TYPES):
        return recurrent_hidden_weights(module)
    return [("weight", weight_groups(module))]


def _not_square(module: nn.Module) -> str | None:
    for name, groups in _site_weights(module):
        rows, cols = stiefel.flatten_weight(getattr(module, name).detach(), groups).shape[-2:]
        if rows != cols:
            return f"not square ({rows}x{cols}; only_square: true)"
    return None


class StiefelHook(OptimizerHook):
    """Riemannian update of the weight of the layer at ``site`` (see the module docstring).

    Holds no tensors between steps: the pre-step weight lives only from ``before_step`` to ``after_step`` (keyed
    by optimizer, so one model attached to two optimizers does not mix them up) and is dropped on copy/pickle.
    """

    parameter_names = ("weight",)
    #: What the hook does, in messages naming it (as NOG's and OLR's ``treatment``).
    treatment = "Riemannian update"
    #: The attribute of the site's module that the hook keeps orthonormal (a recurrent layer has several hooks,
    #: one per hidden-to-hidden weight).
    parameter = "weight"
    #: ``before_step`` maps the gradient linearly (``P_W(s G) = s P_W(G)``) and ``after_step`` reads no gradient:
    #: ``attach`` may run the hooks on gradients a ``GradScaler`` left scaled for a fused optimizer, whose kernel
    #: unscales them afterwards in float32 (``orthofx.optim._unscale_for_hooks``; float16 gradients unscaled in
    #: place before the projection flushed small entries to zero).
    gradient_linear = True

    def __init__(self, site: str, rule: str, retraction: str = "polar", momentum: str = "project",
                 groups: int = 1, parameter: str = "weight"):
        super().__init__(site, rule)
        if retraction not in stiefel.RETRACTIONS:
            raise ArgumentError(f"unknown retraction {retraction!r}; choose one of {', '.join(stiefel.RETRACTIONS)}")
        if momentum not in MOMENTUM_MODES:  # any other value would leave the state alone, as 'keep' does
            raise ArgumentError(f"unknown momentum {momentum!r}; choose one of {', '.join(MOMENTUM_MODES)}")
        self.retraction = retraction
        self.momentum = momentum
        self.groups = groups
        if parameter != "weight":
            self.parameter = parameter
            self.parameter_names = (parameter,)
        self._pre: dict[int, torch.Tensor] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pre"] = {}
        return state

    def _weight(self, root: nn.Module) -> nn.Parameter:
        return hooked_weight(root.get_submodule(self.site), self.parameter,
                             lambda: f"riemannian ({self._label()}, rule '{self.rule}')")

    def _label(self) -> str:
        """The site, and the weight's name where the site has several (``rnn.weight_hh_l0``)."""
        return weight_label(self.site, self.parameter)

    def _matrix(self, tensor: torch.Tensor) -> torch.Tensor:
        return stiefel.flatten_weight(tensor, self.groups)

    def projection(self, root: nn.Module) -> tuple[nn.Parameter, torch.Tensor]:
        """The weight and its nearest point of the manifold this hook keeps it on (not written: the caller writes,
        :func:`write_whole`): each matrix of :meth:`_matrix` (the weight flattened per conv group, per gate block)
        replaced by its polar factor ``U V^T``, the nearest matrix with orthonormal columns (rows, for a wide one) in
        Frobenius norm, computed in at least float32 and returned in the weight's shape and dtype. For a copy whose
        weights were set otherwise than by this hook's step (an EMA / SWA average,
        :func:`orthofx.optim.project_stiefel_weights`). Raises :class:`~orthofx.OrthofxError` where the weight holds
        NaN / inf (no nearest orthonormal matrix)."""
        weight = self._weight(root)
        with torch.no_grad():
            full = whole(weight.detach())
            matrix = self._matrix(full)
            nonfinite = describe_nonfinite(matrix)
            if nonfinite is not None:
                raise OrthofxError(
                    f"riemannian ({self._label()}, rule '{self.rule}'): the weight has {nonfinite}, so it has no "
                    "nearest orthonormal matrix to project onto. Average or load finite weights (a diverged run?)")
            return weight, stiefel.unflatten_weight(stiefel.project_to_stiefel(matrix), full)

    @classmethod
    def attach_warning(cls, hooks: list[StiefelHook], parts: list[str], optimizer: torch.optim.Optimizer
                       ) -> str | None:
        """The :class:`~orthofx.OrthofxWarning` that ``attach`` gives once per call for these ``hooks``, all the
        StiefelHooks of every transformed part it attaches (``parts[i]``: the path of ``hooks[i]``'s part, ``""``
        for the attached model itself), or None. LBFGS with ``max_iter > 1`` takes several inner steps per
        ``optimizer.step()`` and the hooks run only around the call (the projection after the closure's first
        evaluation), so the inner steps are Euclidean and the curvature history LBFGS keeps stops matching the
        retracted weights. The weights still end each step on the manifold, but training may diverge where plain
        LBFGS converges (lr 1, max_iter 20, no line search: the loss went from 1.5 to 1e8 in 8 steps). The advice,
        ``max_iter=1``, needs ``max_eval`` with ``line_search_fn='strong_wolfe'``: torch's default ``max_eval``,
        ``max_iter * 5 // 4``, is 1 there, so the line search may evaluate nothing and returns step 0 from the second
        step on (a 16-wide MLP stayed at loss 2.29 for 20 steps, plain torch too; with ``max_eval=10`` it reached
        1e-4)."""
        inner = [group["max_iter"] for group in optimizer.param_groups if group["max_iter"] > 1] \
            if isinstance(optimizer, torch.optim.LBFGS) else []
        if not hooks or not inner:
            return None
        rules = [f"'{rule}'" for rule in dict.fromkeys(hook.rule for hook in hooks)]
        # sites as the attached model names them: one warning covers every part, whose own site names may repeat
        sites = first_few([f"'{'.'.join(p for p in (part, hook._label()) if p)}'" for hook, part in zip(hooks, parts)],
                          4)
        return (f"riemannian (rule{'s' * (len(rules) > 1)} {', '.join(rules)}: {sites}): LBFGS with "
                f"max_iter={inner[0]} takes {inner[0]} steps inside one optimizer.step(), and the Riemannian "
                "projection and retraction run only around the call: its inner steps are Euclidean and its curvature "
                "history stops matching the retracted weights, which can make training diverge. Build LBFGS with "
                "max_iter=1, or use SGD / Adam; with line_search_fn='strong_wolfe' give max_eval too (e.g. "
                "max_eval=10: its default, max_iter * 5 // 4, is 1 at max_iter=1 and leaves the line search no "
                "evaluation, so LBFGS stops moving after its first step, with or without orthofx)")

    def before_step(self, root: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        type(self).before_step_group([self], root, optimizer)

    def after_step(self, root: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        type(self).after_step_group([self], root, optimizer)

    # ``orthofx.attach`` runs all the StiefelHooks of a model through these two: the matrices of one shape (and
    # dtype, device, retraction) are stacked and projected / retracted as one batch, which turns one small
    # matrix call per layer into one batched call per shape (see orthofx.nn.stiefel on the retraction's cost).

    @classmethod
    def before_step_group(cls, hooks: list[StiefelHook], root: nn.Module,
                          optimizer: torch.optim.Optimizer) -> None:
        """:meth:`before_step` of every hook in ``hooks``, batched by matrix shape."""
        key = id(optimizer)
        batches: dict[tuple, list[tuple[StiefelHook, nn.Parameter]]] = {}
        for hook in hooks:
            weight = hook._weight(root)
            if weight.grad is None:  # not used this step: the optimizer skips it too
                hook._pre.pop(key, None)
                continue
            if weight.grad.is_sparse:
                raise sparse_gradient_error(f"riemannian ({hook._label()}, rule '{hook.rule}')",
                                            "a tangent projection", "use a dense layer for this site (e.g. "
                                            "nn.Embedding(sparse=False)) or exclude it from the rule")
            shape = hook._matrix(weight.detach()).shape
            batches.setdefault((shape, weight.dtype, weight.device), []).append((hook, weight))
        with torch.no_grad():
            for items in batches.values():
                # a copy, in float32 for a half-precision weight: the projection of the exact half-precision
                # inputs, rounded once when written back (G - W sym(W^T G) in bfloat16 cancels most of its bits)
                w = torch.stack([hook._matrix(whole(weight.detach())) for hook, weight in items])
                w = w.to(stiefel._work_dtype(w))
                g = torch.stack([hook._matrix(whole(weight.grad)) for hook, weight in items]).to(w.dtype)
                projected = stiefel.tangent_projection(w, g)
                for i, (hook, weight) in enumerate(items):
                    write_whole(weight.grad, projected[i].reshape(weight.grad.shape))
                    hook._pre[key] = w[i]

    @classmethod
    def after_step_group(cls, hooks: list[StiefelHook], root: nn.Module,
                         optimizer: torch.optim.Optimizer) -> None:
        """:meth:`after_step` of every hook in ``hooks``, batched by matrix shape and retraction."""
        key = id(optimizer)
        batches: dict[tuple, list[tuple[StiefelHook, nn.Parameter, torch.Tensor]]] = {}
        for hook in hooks:
            pre = hook._pre.pop(key, None)
            if pre is None:
                continue
            batches.setdefault((hook.retraction, pre.shape, pre.dtype, pre.device), []).append(
                (hook, hook._weight(root), pre))
        diverged: list[StiefelHook] = []
        outside: list[tuple[StiefelHook, nn.Parameter]] = []  # unmoved trainable weights: held by the optimizer?
        with torch.no_grad():
            for (retraction, *_), items in batches.items():
                w0 = torch.stack([pre for _, _, pre in items])  # float32 for a half-precision weight
                w1 = torch.stack([hook._matrix(whole(weight.detach())) for hook, weight, _ in items]).to(w0.dtype)
                xi = stiefel.tangent_projection(w0, w1 - w0)
                # per matrix: whether the step changed any entry (NaN != NaN: a NaN step counts as moved)
                moved = (w1 != w0).flatten(-2).any(-1)
                # a NaN / inf step: that weight goes back to where the step started (the error follows); the
                # others of the batch are retracted as they would be alone
                new, failed, all_moved = _finite_retraction(w0, xi, retraction, moved)
                diverged += [items[i][0] for i in failed]
                # a weight the step did not move (lr 0, a layer unused with zero_grad(set_to_none=False)) keeps
                # its bits where it is on the manifold already: a retraction of a zero step gives it back only to
                # rounding (1e-7 per step in float32). One that is not (init: keep before its first retraction)
                # is retracted: the first step puts it on the manifold, whatever the step. Known from the host
                # read the retraction makes anyway: when every matrix moved (a training step), nothing to compare
                if not all_moved:
                    unmoved = _on_manifold_unmoved(w0, moved, new, [weight.dtype for _, weight, _ in items])
                    new = torch.where(unmoved, w0, new)
                    # a weight this optimizer does not hold never moves in its step: found here, on the path a
                    # step with an unmoved weight takes anyway, at no cost to a step in which every weight moved
                    still = (~moved).tolist()
                    outside += [(hook, weight) for i, (hook, weight, _) in enumerate(items)
                                if still[i] and weight.requires_grad and not warned_outside(weight)]
                for i, (_, weight, _) in enumerate(items):
                    write_whole(weight, new[i].reshape(weight.shape))
                # momentum: project the first moments onto the tangent spaces at the new points (a transport)
                index, buffers, matrices = [], [], []
                for i, (hook, weight, _) in enumerate(items):
                    if hook.momentum != "project" or i in failed:
                        continue
                    state = optimizer_state(optimizer, weight)  # ZeRO: its local optimizer's, on the owning rank
                    for name in MOMENTUM_KEYS:
                        buf = state.get(name)
                        if isinstance(buf, torch.Tensor) and buf.shape == weight.shape:
                            index.append(i)
                            buffers.append(buf)
                            matrices.append(hook._matrix(whole(buf)).to(new.dtype))
                if buffers:
                    moved = stiefel.tangent_projection(new[index], torch.stack(matrices))
                    for j, buf in enumerate(buffers):
                        write_whole(buf, moved[j].reshape(buf.shape))
        if outside:
            _warn_stepped_elsewhere(optimizer, root, outside)
        if diverged:
            raise OrthofxError(
                f"riemannian: the optimizer step left the weights of {_sites_text(diverged)} NaN or inf "
                "(their gradients or the optimizer's state hold NaN / inf: a diverged step), so there is no point "
                "of the Stiefel manifold to retract to. Those weights are back at their values before the step; "
                "lower the learning rate, look for a NaN loss, or train with torch.amp.GradScaler, which skips "
                "such steps before orthofx's hooks run")

    def __repr__(self) -> str:
        parameter = "" if self.parameter == "weight" else f", parameter={self.parameter!r}"
        return (f"StiefelHook(site={self.site!r}{parameter}, rule={self.rule!r}, retraction={self.retraction!r}, "
                f"momentum={self.momentum!r})")


def _warn_stepped_elsewhere(optimizer: torch.optim.Optimizer, root: nn.Module,
                            weights: list[tuple[StiefelHook, nn.Parameter]]) -> None:
    """Warn (:class:`~orthofx.OrthofxWarning`) about those of ``weights`` (trainable, with a gradient, left unmoved by
    this step of the attached ``optimizer``) that ``optimizer`` does not hold: one warning per call (one model's
    step) for all of them, naming their sites, and each weight once
    (:func:`~orthofx.passes.base.first_warning_outside`). Two causes, told apart per weight by whether the optimizer
    holds its registered tensor (:func:`~orthofx.passes.base.registered_weights_held`: by site and parameter, as an
    LSTM site's other weights may still be held), each with its own remedy:

    replaced
        ``gm.load_state_dict(sd, assign=True)`` (or a new ``nn.Parameter``) after ``attach``: the optimizer holds
        the site's old weight and steps it, and the new one does not train. Where ``assign`` loaded the site's other
        parameters too (biases: the optimizer holds their old tensors), adding only the weights back to the
        optimizer would leave those untrained, which the warning says (:func:`_warn_replaced`). The text is OLR /
        NOG's for the same mistake (:func:`~orthofx.passes.base.replaced_after_attach`), which they refuse; the
        Riemannian hooks warn, as for the other cause.
    taken out
        a weight trainable at ``attach``, taken out of the optimizer's groups later (frozen and dropped) and unfrozen
        into another optimizer, which steps it as a plain parameter. The hook still runs at the attached optimizer's
        steps: it projects the gradient and, the step not moving the weight, retracts it back onto the manifold, so
        depending on which optimizer steps last the weight ends each iteration off the manifold (5e-2 after 5 steps of
        SGD with momentum) or on it, but never by P1's step (the other optimizer's momentum is not transported).

    Only weights the step left unmoved are looked up (:func:`orthofx.passes.pre_svd._group_of`'s cached positions):
    a step in which every weight moved pays nothing."""
    from .pre_svd import _group_or_none  # pre_svd imports this module

    unheld = [(hook, weight) for hook, weight in weights
              if _group_or_none(optimizer, weight) is None and first_warning_outside([weight])]
    if not unheld:
        return
    held = registered_weights_held(optimizer, root)  # per (site, parameter): an LSTM site holds several weights
    replaced = [hook for hook, _ in unheld if (hook.site, hook.parameter) in held]
    taken_out = [hook for hook, _ in unheld if (hook.site, hook.parameter) not in held]
    if replaced:
        _warn_replaced(optimizer, root, replaced)
    if taken_out:
        first = taken_out[0]
        what = (f"the weight(s) {list(first.parameter_names)} were" if len(taken_out) == 1 else "their weights were")
        more = ", ..." if len(taken_out) > 1 else ""
        warnings.warn(
            f"{_sites_text(taken_out)}: {what} in this {type(optimizer).__name__} when orthofx.attach attached it (or "
            "added since), and have been taken out of its param groups; they are trainable and got a gradient, but "
            "their orthofx hook (Riemannian update) acts only on what this optimizer steps. Another optimizer stepping "
            "them trains them as plain parameters: they leave the Stiefel manifold between this optimizer's steps, and "
            "no step is P1's. Give them back to the attached optimizer, in a param group of their own for their own lr "
            "(and out of the other optimizer): optimizer.add_param_group({'params': "
            f"[gm.get_submodule({first.site!r}).{first.parameter}{more}], 'lr': ...}}); attaching orthofx to the other "
            "optimizer instead is refused while this one holds the model's other hooked weights",
            OrthofxWarning, stacklevel=caller_stacklevel(skip_torch=True))


def _warn_replaced(optimizer: torch.optim.Optimizer, root: nn.Module, replaced: list[StiefelHook]) -> None:
    """:func:`_warn_stepped_elsewhere`'s warning about weights replaced after ``attach``, in OLR / NOG's words. Where
    the optimizer still holds the old tensors of those sites' other parameters (``assign=True`` loaded the biases
    too), it says so: adding only the weights back would leave those untrained. Not where none was replaced (only
    the weights loaded, ``strict=False``; a new ``nn.Parameter`` assigned)."""
    many = len(replaced) > 1
    neighbours = replaced_neighbours_held(optimizer, root, {hook.site for hook in replaced})
    also = ""
    if neighbours:
        also = (f", nor the new {first_few([repr(label) for label in neighbours], 4)}, replaced too (it holds the "
                "old tensors): adding only the weights back with add_param_group would leave those untrained")
    warnings.warn(
        f"{_sites_text(replaced)}: {StiefelHook.treatment}: "
        f"{replaced_after_attach('the weights' if many else 'the weight', many)}. This {type(optimizer).__name__} "
        f"steps none of the new weights{also}. The Riemannian hooks still retract the new weights onto the Stiefel "
        "manifold at its steps", OrthofxWarning, stacklevel=caller_stacklevel(skip_torch=True))


def _sites_text(hooks: list[StiefelHook]) -> str:
    """``site '0' (rule 'r')``, ``sites '0', '2' (rule 'r')``, ``sites 'a' (rule 'r'), 'b' (rule 's')``: where the
    ``hooks`` are, for a message about all of them (the first 4 named)."""
    rules = list(dict.fromkeys(hook.rule for hook in hooks))
    if len(rules) == 1:
        sites = first_few([f"'{hook._label()}'" for hook in hooks], 4)
        return f"site{'s' * (len(hooks) > 1)} {sites} (rule '{rules[0]}')"
    return "sites " + first_few([f"'{hook._label()}' (rule '{hook.rule}')" for hook in hooks], 4)


def _on_manifold_unmoved(w0: torch.Tensor, moved: torch.Tensor, new: torch.Tensor, dtypes: list[torch.dtype]
                         ) -> torch.Tensor:
    """Per matrix of a batch (shape ``(batch, 1, 1)``): the step left it where it was (not ``moved``: every entry
    after the step equals ``w0``'s) and its retraction ``new`` is ``w0`` to rounding, so ``w0`` is a point of the
    manifold already. Rounding: within ``sqrt(eps)`` of the computation dtype times ``max |w0|`` (a float64
    projection at transform time left a 6 x 6 weight 1e-14 off, ~100 eps), or ``4 eps`` of a half-precision weight's
    own dtype (``dtypes``, the weights' dtypes: the float32 retraction sees their storage rounding; one factor for
    the batch, the largest, so that no tensor is sent to the device at every step). A weight off the manifold
    (``init: keep``) is off by far more: ``max |polar(W) - W| / max |W|`` is 0.6 to 3 for torch's default Linear
    init. Only called when some matrix did not move: a training step in which all moved skips it."""
    factor = max(max(torch.finfo(w0.dtype).eps ** 0.5, 4 * torch.finfo(d).eps) for d in dtypes)
    tolerance = factor * w0.abs().flatten(-2).amax(-1)
    unmoved = ~moved & ((new - w0).abs().flatten(-2).amax(-1) <= tolerance)
    return unmoved[..., None, None]


def _finite_retraction(w: torch.Tensor, xi: torch.Tensor, retraction: str, moved: torch.Tensor
                       ) -> tuple[torch.Tensor, list[int], bool]:
    """``stiefel.retract(w, xi, retraction)`` of a batch of weights (``(batch, r, c)``, or ``(batch, blocks, r, c)``
    for weights cut into several matrices), the indices of those whose step is not finite (NaN / inf in
    ``w + xi`` or in its retraction, in any of its matrices: no point of the manifold to retract to), which keep
    ``w``; every other weight is retracted as it would be alone; and whether ``moved`` (a bool per matrix) is true
    throughout, read with the finiteness (False, unread, for a batch holding a non-finite step). For a finite batch
    no host read of its own: the polar retraction's first read (Newton-Schulz's) carries "moved?", and the QR
    retraction's check is read with the finiteness and "moved?" (one read where there were two); a batch holding a
    non-finite step is retracted again without it."""
    unread = stiefel._qr_retraction_unread(w, xi) if retraction == "qr" else None
    if unread is not None:
        # the QR retraction's own check (Cholesky QR's on CUDA, a NaN test of Householder's Q elsewhere) read with
        # this one: one device sync per step, not two. Where it fails, the checked retraction below decides
        new, redo = unread
        finite, all_moved, redo = torch.stack((torch.isfinite(new).all(), moved.all(), redo)).tolist()
        if finite and not redo:
            return new, [], all_moved
    also = [moved.all()]
    try:
        if retraction == "polar":
            new = stiefel._polar_retraction_reading(w, xi, also)
        else:
            new = stiefel.retract(w, xi, retraction)
    except LayerArgumentError:  # the polar factor refuses NaN / inf; anything else is a real error
        if bool(torch.isfinite(w + xi).all()):
            raise
        new = None
    if new is not None and retraction == "polar":
        # a polar factor the retraction returns is finite (that of a matrix with NaN / inf raised above, and the
        # routes of finite ones give finite factors), so only "every matrix moved?" is left, which the retraction's
        # first host read (Newton-Schulz's) has read with its own
        return new, [], bool(also[0])
    if new is not None:
        finite, all_moved = torch.stack((torch.isfinite(new).all(), moved.all())).tolist()
        if finite:
            return new, [], all_moved
    # per weight of the batch (dim 0), over all its matrices: a recurrent weight's gate blocks or a conv's groups
    # (``(batch, gates, r, c)``) fail or step together, so a weight is never left part stepped, part put back, and
    # the indices are the weights' (per block they named other weights, or none: an IndexError)
    finite = torch.isfinite(w + xi).flatten(1).all(-1)
    out = w.clone()
    if bool(finite.any()):
        out[finite] = stiefel.retract(w[finite], xi[finite], retraction)
    failed = ~(finite & torch.isfinite(out).flatten(1).all(-1))
    out[failed] = w[failed]
    return out, failed.nonzero().flatten().tolist(), False


def scale_lost_note(change: Change) -> str:
    """The report's (and explain's) note for a site whose scale a Stiefel constraint undoes
    (``Change.after["scale_lost"]``, recorded by ``riemannian`` or ``isometric_init``, whichever came second), which
    the table's ``lorth`` of the current weight does not show before the first optimizer step."""
    return (f"{change.site}: {change.pass_name} (rule '{change.rule}'): the scale {change.after['scale_lost']:.4g} "
            "is lost: riemannian keeps the weight on the Stiefel manifold, where all singular values are 1 "
            "(ScaleLostWarning)")


@register_pass
class Riemannian(Pass):
    """Riemannian training on the Stiefel manifold (P1): tangent-projected gradients and retractions, run by
    ``orthofx.attach``; optionally one free layer per rule."""

    name = "riemannian"
    params = (
        Param("retraction", "polar", (str,), "polar (P1) or qr (sign-fixed Q factor)", choices=("polar", "qr")),
        Param("free", "none", (str,), "leave the first/last site of this rule (graph order) unconstrained (P1)",
              choices=("none", "first", "last")),
        Param("momentum", "project", (str,), "project the optimizer's first moment (SGD momentum_buffer, Adam "
              "exp_avg) onto the new tangent space after each step, or keep it", choices=MOMENTUM_MODES),
        Param("init", "project", (str,), "replace the weight by its nearest orthonormal matrix at transform time, "
              "or keep it", choices=("project", "keep")),
        Param("only_square", False, (bool,), "constrain only layers whose (flattened) weight is square"),
    )
    site_kinds = frozenset({"module"})
    module_types = _LAYER_TYPES + RECURRENT_TYPES
    group = "weight"
    complex_weights = "keeps real weights on the real Stiefel manifold (W^T W = I)"
    needs_weight_parameter = True  # it projects and retracts the weight around optimizer.step()
    sees_through_wrappers = True  # its hooks step the weight tensors, which a Jacobian probe adopts

    def accepts(self, site: Site, module: nn.Module | None) -> str | None:
        """Also declines a layer whose weight has no entries (``Linear(4, 0)``): nothing to keep orthonormal; and
        one whose weight is complex: the manifold here is the real Stiefel manifold (``W^T W = I``), which a complex
        weight is not on, and no real retraction keeps it there."""
        reason = super().accepts(site, module)
        if reason is None and isinstance(module, RECURRENT_TYPES):
            return recurrent_weights_reason(module)
        if reason is None and isinstance(module, _LAYER_TYPES):
            weight = module.weight
            if not isinstance(weight, nn.parameter.UninitializedParameter) and weight.numel() == 0:
                shape = "x".join(str(s) for s in (weight.shape[0], math.prod(weight.shape[1:])))
                return f"empty weight ({shape}): nothing to keep orthonormal"
        return reason

    def weight_values_read(self, params: dict[str, Any]) -> str | None:
        return "measures the weight's orthogonality defect (and init: project projects it)"

    def accepts_params(self, site: Site, module: nn.Module | None, params: dict[str, Any]) -> str | None:
        """Decline non-square weights when the rule says ``only_square: true`` (shown as ``skipped: not square``).
        A lazy layer has no shape yet: it is accepted here and checked in :meth:`apply`, after the example inputs
        have initialised it."""
        if not params.get("only_square") or not isinstance(module, _LAYER_TYPES + RECURRENT_TYPES):
            return None
        if is_uninitialised(module):
            return None
        return _not_square(module)

    def check_plan(self, gm: nn.Module, entries: list[PlanEntry]) -> None:
        """Refuse, when the plan is built, the tied weights :meth:`apply` would refuse (:func:`_tie_decisions`: a
        weight two sites cut into other matrices or step with other settings, or one that a rule leaves free and
        another constrains), so that ``orthofx.explain`` raises the PlanError ``orthofx.transform`` raises instead
        of showing both sites as ``apply``. Reads only shapes and which tensors are shared. A lazy layer that has
        not run has no shape yet: then the decision waits for :meth:`apply` (after the example inputs ran)."""
        modules = {entry.site.name: gm.get_submodule(entry.site.name) for entry in entries}
        if any(is_uninitialised(module) for module in modules.values()):
            return
        # planning declined the non-square layers of only_square rules already (accepts_params): all are kept
        _tie_decisions(list(entries_by_rule(entries).values()), modules.__getitem__)

    def optimizer_hooked_weights(self, gm: nn.Module, entries: list[PlanEntry]) -> list[tuple[PlanEntry, str, str]]:
        """The weights of every site its rule does not leave free (:func:`_tie_decisions`, as :meth:`check_plan`
        decided them); none while a lazy layer has no shape (its decisions wait for :meth:`apply`)."""
        modules = {entry.site.name: gm.get_submodule(entry.site.name) for entry in entries}
        if any(is_uninitialised(module) for module in modules.values()):
            return []
        return [(d.entry, name, f"Riemannian update, {d.entry.params['retraction']} retraction")
                for decisions in _tie_decisions(list(entries_by_rule(entries).values()), modules.__getitem__)
                for d in decisions if d.free_what is None
                for name, _ in _site_weights(modules[d.entry.site.name])]

    def apply(self, ctx: PassContext, entries: list[PlanEntry]) -> None:
        by_rule = list(entries_by_rule(entries).values())
        kept_by_rule = []
        for rule_entries in by_rule:
            for entry in rule_entries:
                require_initialised(entry, ctx.module(entry.site), "its weight has no shape to keep orthonormal")
            kept_by_rule.append([e for e in rule_entries if _lazy_not_square(ctx, e) is None])
        # every tie is decided (and refused) before any weight is projected
        decisions = _tie_decisions(kept_by_rule, ctx.module)
        defects: dict[int, float] = {}  # id(weight) -> its defect before this pass projected it
        for rule_entries, kept, rule_decisions in zip(by_rule, kept_by_rule, decisions):
            kept_ids = {id(e) for e in kept}
            for entry in rule_entries:
                if id(entry) not in kept_ids:
                    self._record_lazy_skip(ctx, entry)
            for decision in rule_decisions:
                self._apply_one(ctx, decision, defects)
            _warn_constrains_nothing(rule_decisions)

    def _record_lazy_skip(self, ctx: PassContext, entry: PlanEntry) -> None:
        """A lazy layer that turned out non-square under ``only_square: true`` (accepts_params could not tell):
        recorded as skipped, like the layers planning declined."""
        reason = _lazy_not_square(ctx, entry)
        ctx.record(Change(site=entry.site.name, rule=entry.rule_name, pass_name=self.name,
                          what=f"left unchanged: {reason}", params=dict(entry.params), status=f"skipped: {reason}"))

    def _apply_one(self, ctx: PassContext, decision: _Decision, defects: dict[int, float]) -> None:
        """Constrain the site's weights as ``decision`` says (:func:`_tie_decisions`), or leave them free
        (``free``). ``defects``: ``id(weight) ->`` its ``max |W^T W - I|`` before this pass changed it, filled at the
        first site holding the weight (a tied weight is projected at its first constrained site, so a later site
        reads the figure from before that projection)."""
        entry, free_site = decision.entry, decision.free_site
        params = dict(entry.params)
        name = entry.site.name
        module = ctx.module(entry.site)
        weights = [(pname, groups, getattr(module, pname)) for pname, groups in _site_weights(module)]
        matrices = [stiefel.flatten_weight(weight.detach(), groups) for _, groups, weight in weights]
        # in float64: a float32 weight of entries ~1e30 has a Gram matrix beyond float32, so the defect was NaN
        for (_, _, weight), matrix in zip(weights, matrices):
            if id(weight) not in defects:
                defects[id(weight)] = float(stiefel.orthogonality_defect(matrix.double()).max())
        before = {"orth_defect": max(defects[id(w)] for _, _, w in weights)}
        if decision.free_what is not None:
            ctx.record(Change(site=name, rule=entry.rule_name, pass_name=self.name, what=decision.free_what,
                              params=params, before=before, after={"free_site": free_site}, status="free"))
            return
        own, tied_to = decision.own, decision.tied_to
        # a frozen weight is left as it is (the user froze those values; attach gives it no hooks while it is
        # frozen): if it is unfrozen later, the first step's retraction puts it on the manifold, as init: keep does
        frozen = [pname for pname, _, weight in weights if not weight.requires_grad]
        lost = _scale_lost(ctx, entry, module, [p for p in own if p not in frozen])
        for (pname, groups, weight), matrix in zip(weights, matrices):
            if params["init"] != "project" or pname in frozen or pname not in own:
                continue
            nonfinite = describe_nonfinite(matrix)
            if nonfinite is not None:
                # the polar factor refused it with its message for a diverged training step, naming no layer
                label = weight_label(name, pname)
                raise TransformError(
                    f"riemannian (rule '{entry.rule_name}'): {label}: its weight has {nonfinite}, so it has no "
                    "nearest orthonormal matrix to project onto (init: project). "
                    "Load finite weights (a diverged or corrupted checkpoint?), or re-initialise the layer (e.g. "
                    "with the isometric_init pass before this rule)")
            with torch.no_grad():
                weight.copy_(stiefel.unflatten_weight(stiefel.project_to_stiefel(matrix), weight))
        after = {"orth_defect": max(float(stiefel.orthogonality_defect(stiefel.flatten_weight(w.detach(), g)).max())
                                    for _, g, w in weights),
                 "free_site": free_site}
        if tied_to:
            after["tied_to"] = tied_to
        if lost is not None:
            after["scale_lost"] = lost.scale
        for pname, groups, _ in weights:
            if pname in own:  # one hook per tensor: a tied weight takes one update per step, at its first site
                ctx.add_optimizer_hook(StiefelHook(name, entry.rule_name, retraction=params["retraction"],
                                                   momentum=params["momentum"], groups=groups, parameter=pname))
        ctx.record(Change(site=name, rule=entry.rule_name, pass_name=self.name,
                          what=f"Riemannian training on the Stiefel manifold ({_describe_matrices(module, weights)}, "
                               f"{params['retraction']} retraction){_tied_note(tied_to)}"
                               f"{_frozen_note(module, frozen, params)}{'' if lost is None else lost.note}",
                          params=params, before=before, after=after, status=f"Stiefel, {params['retraction']}"))


def _warn_constrains_nothing(decisions: list[_Decision]) -> None:
    """Warn (:class:`~orthofx.errors.OrthofxWarning`) when a rule's ``free`` leaves every site it kept free: its
    only site, or sites all tied to the free one. P1 leaves one layer free *beside* the constrained ones; a rule
    that constrains nothing trains every layer it selected as plain parameters, while its Change reads like the
    usual ``free`` one."""
    if not decisions or any(d.free_what is None for d in decisions):
        return
    entry, free_site = decisions[0].entry, decisions[0].free_site
    tied = [f"'{d.entry.site.name}'" for d in decisions if d.entry.site.name != free_site]
    which = (f"'{free_site}', its only site" if not tied else
             f"'{free_site}' and the sites sharing its weight ({', '.join(tied)}), all it selected")
    warnings.warn(
        f"riemannian (rule '{entry.rule_name}'): free: {entry.params['free']} leaves {which}, unconstrained, so the "
        "rule constrains nothing and no weight of it trains on the Stiefel manifold (P1 leaves one layer free beside "
        "constrained ones). Widen the rule's match to the layers to constrain, or drop free (free: none) to "
        f"constrain '{free_site}'", OrthofxWarning, stacklevel=caller_stacklevel())


def _lazy_not_square(ctx: PassContext, entry: PlanEntry) -> str | None:
    """Why a lazy layer is declined under ``only_square: true`` once initialised (``None`` when it is not)."""
    return _not_square(ctx.module(entry.site)) if entry.params["only_square"] else None


# ------------------------------------------------------------------------------------------- tied weights

#: The parameters that decide how a tied weight is stepped; two sites sharing a weight must agree on them.
_TIED_SETTINGS = ("retraction", "momentum", "init")


class _Decision(NamedTuple):
    """What :meth:`Riemannian.apply` does at one site (:func:`_tie_decisions`): leave it free (``free_what``: the
    Change's text, ``None`` for a constrained site), or constrain it, with the hooks of the weights named in
    ``own`` here and ``tied_to``: ``weight name ->`` the earlier site whose hook steps that (tied) weight.
    ``free_site``: the free site of the entry's rule, if any."""

    entry: PlanEntry
    free_site: str | None
    free_what: str | None
    own: tuple[str, ...]
    tied_to: dict[str, str]


def _tie_decisions(kept_by_rule: list[list[PlanEntry]], module_of: Callable[[str], nn.Module]
                   ) -> list[list[_Decision]]:
    """Per rule (its kept entries, in graph order), a :class:`_Decision` per site: its rule's ``free`` site and
    the sites of that rule sharing its weight are left free; every other weight gets its one hook at the first
    site holding it, in plan order. Raises the PlanErrors of :func:`_check_not_free_elsewhere` (a weight one rule
    leaves free and another constrains) and :func:`_check_tied` (a weight two sites cut into other matrices or
    step with other settings). The one place these are decided: planning runs it (:meth:`Riemannian.check_plan`,
    so ``explain`` refuses what ``transform`` refuses), and ``apply`` again on the layers as the passes found
    them. ``module_of``: site name -> module. Reads shapes and tensor identities, no values."""
    rules = []
    for kept in kept_by_rule:
        free = kept[0].params["free"] if kept else "none"
        free_site = None
        if free != "none":
            free_site = (kept[0] if free == "first" else kept[-1]).site.name
        # the free layer's weight stays free also where another site of the rule shares it (tied weights):
        # constraining that site would project and retract the free weight too
        free_module = module_of(free_site) if free_site is not None else None
        free_weights = [getattr(free_module, n) for n, _ in _site_weights(free_module)] if free_module else []
        rules.append((kept, free_site, free_weights))
    # every rule's free weights are known before any site is decided, so that a site of another rule tied to a
    # free weight is refused whichever rule comes first
    left_free = {id(weight): (free_site, kept[0]) for kept, free_site, weights in rules for weight in weights}
    constrained: dict[int, _Constrained] = {}  # id(weight) -> the site whose hook steps it
    return [[_decide(entry, module_of(entry.site.name), free_site, free_weights, left_free, constrained)
             for entry in kept] for kept, free_site, free_weights in rules]


def _decide(entry: PlanEntry, module: nn.Module, free_site: str | None, free_weights: list[torch.Tensor],
            left_free: dict[int, tuple[str, PlanEntry]], constrained: dict[int, _Constrained]) -> _Decision:
    """One site's :class:`_Decision`. ``left_free``: ``id(weight) -> (free site, an entry of its rule)`` over all
    rules; ``constrained``: ``id(weight) ->`` the site whose hook steps that weight, filled here."""
    name = entry.site.name
    weights = [(pname, groups, getattr(module, pname)) for pname, groups in _site_weights(module)]
    if name == free_site or any(w is f for _, _, w in weights for f in free_weights):
        what = f"left free (unconstrained, free: {entry.params['free']})"
        if name != free_site:
            what = f"left free (its weight is tied to the free site '{free_site}', free: {entry.params['free']})"
        return _Decision(entry, free_site, what, (), {})
    _check_not_free_elsewhere(entry, module, weights, left_free)
    own, tied_to = [], {}
    for pname, groups, weight in weights:
        this = _Constrained.at(entry, module, pname, groups)
        first = constrained.setdefault(id(weight), this)
        if first is this:
            own.append(pname)
        else:
            _check_tied(this, first)
            tied_to[pname] = first.label
    return _Decision(entry, free_site, None, tuple(own), tied_to)


class _Constrained(NamedTuple):
    """A weight as one site of the pass constrains it: where (``entry``, ``label``: ``site`` or
    ``site.weight_hh_l0``, ``module``, ``pname``: the weight's name there) and how (``groups``: the number of
    matrices :func:`stiefel.flatten_weight` cuts it into, which fixes them for one tensor; ``settings``:
    :data:`_TIED_SETTINGS`)."""

    entry: PlanEntry
    label: str
    module: nn.Module
    pname: str
    groups: int
    settings: tuple

    @classmethod
    def at(cls, entry: PlanEntry, module: nn.Module, pname: str, groups: int) -> _Constrained:
        label = weight_label(entry.site.name, pname)
        settings = tuple(entry.params[key] for key in _TIED_SETTINGS)
        return cls(entry, label, module, pname, groups, settings)

    def use(self) -> TiedUse:
        """The weight's use here, as :func:`~orthofx.passes.base.check_tied` compares it with another site's."""
        settings = tuple((key, value, str(value)) for key, value in zip(_TIED_SETTINGS, self.settings))
        return TiedUse(f"'{self.label}'", f"'{self.label}' ({type(self.module).__name__}, rule "
                       f"'{self.entry.rule_name}')", self.groups, self.matrices, settings)

    def matrices(self) -> str:
        """The matrices the pass keeps orthonormal in the weight (:func:`stiefel.flatten_weight` with ``groups``),
        in words: ``one 18x6 matrix with orthonormal columns``, ``3 gate blocks of 6x6, each with orthonormal
        columns`` (a recurrent layer), ``2 groups of 2x2, each ...`` (a grouped conv)."""
        matrix = stiefel.flatten_weight(getattr(self.module, self.pname).detach(), self.groups)
        side = "rows" if stiefel.is_wide(matrix) else "columns"
        blocks = "gate blocks" if isinstance(self.module, RECURRENT_TYPES) else "groups"
        return matrices_text(self.groups, blocks, "x".join(str(s) for s in matrix.shape[-2:]), side)


def _check_tied(this: _Constrained, first: _Constrained) -> None:
    """Refuse a weight tied to one that ``first``, an earlier site, constrains already, unless both cut it into
    the same matrices with the same settings (then ``first``'s hook is its only one).

    Two hooks on one tensor each project its gradient and retract it from the pre-step point onto their own
    manifold: with different layouts (a GRU's 3 gate blocks of ``H x H`` vs a Linear's one ``3H x H`` matrix,
    whose orthonormal columns make the blocks' ``B_i^T B_i`` sum to ``I``, not each equal ``I``) the two
    manifolds do not meet, and the last retraction decides which constraint holds. With another retraction the
    second hook retracts again from the pre-step point, along the projection of the first one's result; with
    ``momentum: keep`` against ``project`` the one buffer is transported anyway; with ``init: keep`` against
    ``project`` the weight is projected anyway. Either way a Change describes an update that is not the one
    made."""
    check_tied(
        "riemannian", this.use(), first.use(), "constrains already",
        other_matrices=(
            ", but the two cut it into different matrices: {this} into {this_matrices}, {first} into "
            "{first_matrices}. Their updates would retract the one tensor onto two manifolds that do not meet at "
            "every step, so one of the two constraints would never hold. Untie the weights, or leave one of the two "
            "layers out of the riemannian rules (match.exclude) so that one layout applies"),
        other_settings=(
            ", with other settings ({differs}; both cut it into {this_matrices}). The one tensor takes one "
            "Riemannian update per step, which cannot follow both. Give both rules the same retraction, momentum "
            "and init, or untie the weights"))


def _check_not_free_elsewhere(entry: PlanEntry, module: nn.Module, weights: list[tuple[str, int, torch.Tensor]],
                              left_free: dict[int, tuple[str, PlanEntry]]) -> None:
    """Refuse to constrain a weight that another rule's ``free`` leaves unconstrained (a site of the same rule
    tied to its free site is left free instead): that rule's free layer would be projected and retracted too."""
    for pname, _, weight in weights:
        free_site, free_entry = left_free.get(id(weight), (None, None))
        if free_entry is None or free_entry.rule_index == entry.rule_index:
            continue
        label = weight_label(entry.site.name, pname)
        raise PlanError(
            f"riemannian: '{label}' ({type(module).__name__}, rule '{entry.rule_name}') shares its weight with "
            f"'{free_site}', which rule '{free_entry.rule_name}' leaves free (free: {free_entry.params['free']}); "
            f"constraining '{label}' would project and retract that free weight too. Untie the weights, or select "
            "both layers with one rule (a site tied to the rule's free site is left free with it)")


class _ScaleLost(NamedTuple):
    """The scale an earlier pass gave a weight this site constrains (``scale``), and the note for its Change."""

    scale: float
    note: str


def scale_kept_or_dropped(scaler: str) -> str:
    """The two ways out when a rule's Stiefel constraint meets a scale that ``scaler`` (a pass name) gave the
    weight: the advice of :class:`ScaleLostWarning`, from either pass."""
    return ("To keep the gain, leave this layer out of the riemannian rule (match.exclude, or free: first / last for "
            f"the layer that carries the scale, as in P1); to constrain it, drop the gain for it ({scaler} with "
            "gain: 1, activation: linear).")


def _scale_lost(ctx: PassContext, entry: PlanEntry, module: nn.Module, stepped: list[str]) -> _ScaleLost | None:
    """Warn (:class:`ScaleLostWarning`) when an earlier pass of the policy recorded a scale other than 1 for this
    site (``Change.after["scale"]``: ``isometric_init``'s ``gain * activation_gain``, whose weight has all singular
    values equal to it) and the site's weights (``stepped``: those this site projects and steps) go onto the
    Stiefel manifold, where ``W^T W = I`` (or ``W W^T = I``) fixes every singular value at 1: the polar factor
    ``U V^T`` of ``s Q`` is ``Q``, so the scale ``s`` is dropped, now (``init: project``) or at the first step's
    retraction (``init: keep``). Read from the manifest, not the weight: the recorded scale names the pass and
    rule that set it, and costs no decomposition."""
    if not stepped:
        return None
    scaled = [c for c in ctx.manifest.changes if c.site == entry.site.name and c.pass_name != Riemannian.name
              and isinstance(c.after.get("scale"), (int, float)) and not isinstance(c.after["scale"], bool)]
    if not scaled or math.isclose(scaled[-1].after["scale"], 1.0, rel_tol=1e-9):
        return None
    earlier, scale = scaled[-1], float(scaled[-1].after["scale"])
    by = f"{earlier.pass_name} (rule '{earlier.rule}')"
    when = ("init: project replaces the weight by its polar factor now" if entry.params["init"] == "project" else
            "init: keep leaves it until the first optimizer step, whose retraction puts it on the manifold")
    label = entry.site.name if stepped == ["weight"] else f"{entry.site.name} ({', '.join(stepped)})"
    warnings.warn(
        f"riemannian (rule '{entry.rule_name}'): '{label}' ({type(module).__name__}): {by} gave its weight scale "
        f"{scale:.4g}, but the Stiefel constraint fixes all its singular values at 1: {when}, so the layer is back "
        f"at scale 1 and that gain is lost. {scale_kept_or_dropped(earlier.pass_name)} init: keep does not keep it: "
        f"the first step's retraction drops it", ScaleLostWarning, stacklevel=caller_stacklevel())
    note = (f"; the scale {scale:.4g} that {by} gave the weight is lost (the Stiefel constraint fixes all "
            "singular values at 1)")
    return _ScaleLost(scale, note)


def _tied_note(tied_to: dict[str, str]) -> str:
    """``; its weight is tied to 'a', constrained there`` (``; weight_hh_l1 tied to 'lstm.weight_hh_l0',
    constrained there`` for a recurrent weight): what this site's Change adds for weights whose one hook is at an
    earlier site."""
    if not tied_to:
        return ""
    if list(tied_to) == ["weight"]:
        return f"; its weight is tied to '{tied_to['weight']}', constrained there (one update per step)"
    ties = "; ".join(f"{pname} tied to '{first}'" for pname, first in tied_to.items())
    return f"; {ties}, constrained there (one update per step)"


def _describe_matrices(module: nn.Module, weights: list[tuple[str, int, torch.Tensor]]) -> str:
    """``64x64, orthonormal columns`` for a layer; ``weight_hh_l0, weight_hh_l1: 4 gate blocks of 32x32 each,
    orthonormal columns`` for a recurrent layer (``weight_hh_l0, weight_hh_l1: one block of 32x32 each, ...`` for a
    two-layer nn.RNN, ``weight_hh: one block of 32x32, ...`` for an nn.RNNCell)."""
    matrix = stiefel.flatten_weight(weights[0][2].detach(), weights[0][1])
    shape = "x".join(str(s) for s in matrix.shape[-2:])
    rows = "rows" if stiefel.is_wide(matrix) else "columns"
    if not isinstance(module, RECURRENT_TYPES):
        return f"{shape}, orthonormal {rows}"
    gates = weights[0][1]
    # "one block" alone would read as one block for all the named weights (an RNN with 3 layers has 3)
    each = " each" if len(weights) > 1 or gates > 1 else ""
    blocks = gate_blocks_text(gates, shape) + each
    return f"{', '.join(pname for pname, _, _ in weights)}: {blocks}, orthonormal {rows}"


def _frozen_note(module: nn.Module, frozen: list[str], params: dict) -> str:
    """What ``init: project`` left alone because it is frozen (``""`` when nothing is)."""
    if not frozen or params["init"] != "project":
        return ""
    if not isinstance(module, RECURRENT_TYPES):
        return "; the weight is frozen (requires_grad=False), so init: project left it as it is"
    return (f"; {', '.join(frozen)} frozen (requires_grad=False): init: project left "
            f"{'it' if len(frozen) == 1 else 'them'} as is")
