"""Pass ``orth_regularizer``: attach P0's L_orth regulariser to convolutions and linears.

For a convolution with kernel K (M out, C in channels, stride S) the term is P0's Definition 1,

    L_orth(K) = || conv(K, K, padding P, stride S) - I_r0 ||_F^2            (row-orthogonal case, M <= C S^d)
    L_orth(K) = || conv(K, K, padding P, stride S) - I_r0 ||_F^2 - (M - C S^d)   (column-orthogonal case)

with P = floor((k - 1) / S) * S (not the padding 1 of the widely copied OCNN code, which misses shifts of +-2
and measures nothing at stride 2). It is zero exactly when the convolution is orthogonal, and by P0's Theorem 7
``N^d * L_orth`` is the squared Frobenius orthogonality error of the layer on an N-grid. Grouped convolutions
are penalised per group, Conv1d, Conv2d and Conv3d alike. A dilated convolution gets the L_orth of the
undilated kernel it applies (taps D apart, zeros between; along stride-1 dimensions the dilation changes nothing),
and a transposed convolution (ConvTranspose1d/2d/3d) that of the convolution with its weight, whose adjoint it
is (the same singular values; its RO case is the transposed layer's CO case). A Linear layer with weight W
(out x in) gets ||W W^T - I||_F^2 when out <= in and ||W^T W - I||_F^2 otherwise.

A recurrent layer (nn.RNN / nn.LSTM / nn.GRU, or nn.RNNCell / nn.LSTMCell / nn.GRUCell) gets the soft form of
what the ``riemannian`` pass imposes: each hidden-to-hidden weight (``weight_hh_l<k>`` and ``weight_hh_l<k>_reverse``,
a cell's ``weight_hh``; :func:`orthofx.passes.base.recurrent_hidden_weights`) stacks one block W_g per gate
(4 for an LSTM: input, forget, cell, output; 3 for a GRU; 1 for an RNN), each ``H x H`` (``H x proj_size`` for an
LSTM with ``proj_size``), and the term is

    L(layer) = sum over its hidden weights, sum over their gate blocks W_g of
               ||W_g W_g^T - I||_F^2   (W_g wide or square)      ||W_g^T W_g - I||_F^2   (W_g tall),

zero exactly when every gate block has orthonormal rows or columns (``case`` RO / CO forces one form, as for a
Linear). Only the recurrence is penalised: the input-to-hidden weights (``weight_ih_*``), the biases and an LSTM's
projections (``weight_hr_*``) are not. A layer whose hidden weight is computed (a torch parametrization) or
recomputed by a forward pre-hook (``weight_norm`` / ``spectral_norm`` / ``prune``), or has ``hidden_size=0``, is
declined, as ``riemannian`` declines it. A hidden weight tied between layers is penalised once.

The graph is not changed: the pass records a :class:`LorthTerm` per layer, and ``orthofx.penalty(gm)`` returns
``sum(weight * L_orth)`` over all terms, differentiable with respect to the layers' weights.

Cost, and ``every``. The terms do not depend on the batch: on a ResNet-18 (width 64) they cost about as much as a
training step on about 40 CIFAR images (by multiply-adds, most of them in the 512-channel layers), so at batch 64 on
a CPU they add about 70 % to a step. With ``every: k`` each term is evaluated on one call of ``orthofx.penalty`` in
``k`` (the calls with gradients enabled on the model in training mode: one per training step), at its weight: lazy
regularisation, as the Jacobian pass's ``every``, so multiply ``weight`` by ``k`` to keep the average pull on the
weights (``weight: 0.08, every: 8`` for the preset's 0.01). The terms (of every rule with that ``k``) are spread
over the ``k`` calls by their cost (the costliest first, each to the call with the least cost so far), so that every
step pays about ``1 / k`` of the penalty, not one step in ``k`` all of it. Under ``torch.no_grad()``, and on a model
in eval mode (a validation pass, gradients enabled or not), ``orthofx.penalty`` evaluates every term (a logged value
is the whole regulariser, not one call's share), and ``orthofx.penalty_terms`` always does; neither counts as a
call, so validation between training steps does not move the schedule. The count of calls is training state: it
travels in the model's state-dict metadata with the call each term is due on (the spreading sees a lazy layer's
shape only once it ran, so a model rebuilt with or without ``example_inputs`` may spread otherwise), so a resumed
run evaluates the same terms on the same steps (load it on every rank of a data-parallel run); a call that raises is
no call. Call ``orthofx.penalty`` once per step: each training-mode call with gradients counts, so with gradient
accumulation each micro-batch's call is a step of the period, and an optimizer that evaluates the loss several times
per step (LBFGS's closure, SAM's two passes) moves the period at each evaluation. Activation checkpointing's
recomputation of a forward that calls it is no new call (non-reentrant: it evaluates the terms of that forward's
call, also with several checkpointed micro-batches before one backward).
Under ``torch.compile`` of a loss that calls ``orthofx.penalty`` each call of the period is a graph of its own:
keep ``every`` (plus the loss's other variants, such as a ``torch.no_grad()`` evaluation) within dynamo's
recompile limit (``torch._dynamo.config.recompile_limit``, 8), or compile the model and call the penalty
outside (``orthofx.transform(..., compile=True)``). A Jacobian probe's ``every`` in the same compiled loss counts
too: the graphs are the least common multiple of all the periods (``every: 3`` next to a probe's ``every: 2``: 6).

Example::

    import torch, orthofx
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
    gm = orthofx.transform(model, {"rules": [{"match": {"type": "Conv2d"}, "apply": "orth_regularizer",
                                              "with": {"weight": 0.1}}]})
    loss = gm(torch.randn(2, 3, 8, 8)).square().mean() + orthofx.penalty(gm)
    loss.backward()

    gm = orthofx.transform(model, {"rules": [{"match": {"type": "Conv2d"}, "apply": "orth_regularizer",
                                              "with": {"weight": 0.4, "every": 4}}]})
    terms = [orthofx.penalty(gm) for _ in range(4)]   # one layer: 0.4 * L_orth on its call, zeros on the others
    with torch.no_grad():
        assert torch.allclose(sum(terms), orthofx.penalty(gm))   # every term, counting no call

    class Tagger(torch.nn.Module):           # a recurrent layer: its weight_hh_l0, gate by gate
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.LSTM(3, 8, batch_first=True)
            self.head = torch.nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0])

    gm = orthofx.transform(Tagger(), {"rules": [{"match": {"type": "LSTM"}, "apply": "orth_regularizer",
                                                 "with": {"weight": 0.1}}]})
    loss = gm(torch.randn(2, 5, 3)).square().mean() + orthofx.penalty(gm)   # + 0.1 * sum of 4 gate terms
    loss.backward()
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .. import metrics, theory
from ..errors import ArgumentError
from ..nn.convnorm import FROZEN_FILTERS_MARKER, FrozenConvNormNd
from .base import (PARAMETER_WEIGHT_LAYERS, RECURRENT_TYPES, TORCH_TRANSPOSED_CONV_TYPES, Change, Param, Pass,
                   PassContext, PenaltyTerm, PlanEntry, current_weight, gate_blocks_text, recurrent_hidden_weights,
                   recurrent_weights_reason, whole)
from .registry import register_pass

__all__ = ["OrthRegularizer", "LorthTerm", "RecurrentLorthTerm", "lorth_term", "gate_blocks_lorth",
           "restate_period"]


class LorthTerm(PenaltyTerm):
    """L_orth of the weight of the module at ``site`` (a Linear, Conv or ConvTranspose layer)."""

    def __init__(self, site: str, rule: str, weight: float, stride: int | tuple[int, ...] = 1, groups: int = 1,
                 case: str | None = None, dilation: int | tuple[int, ...] = 1):
        super().__init__(site, rule, weight)
        self.stride = stride
        self.groups = groups
        self.case = case
        self.dilation = dilation

    def value(self, root: nn.Module) -> torch.Tensor:
        value, dtype = self.full_precision_value(root)
        return value.to(dtype)  # metrics.lorth's own rounding of a half-precision weight's L_orth

    def full_precision_value(self, root: nn.Module) -> tuple[torch.Tensor, torch.dtype]:
        """``(L_orth, dtype)``: of a half-precision weight in float32, as :func:`orthofx.metrics.lorth` computes
        it before rounding to the weight's dtype, and that dtype (``orthofx.penalty`` weights the float32 value,
        then rounds: a float16 L_orth above 65504 is inf where ``weight * L_orth`` fits)."""
        # current_weight: a weight that prune / the older weight_norm / spectral_norm set in a pre-hook, recomputed
        # from its parameters (the tensor the last forward left can be one without history, or with a freed graph)
        module = root.get_submodule(self.site)
        layer_weight = whole(current_weight(module),  # FSDP2 shards: gathered, differentiably
                             f"site '{self.site}' (rule '{self.rule}'): the L_orth penalty")
        stride, dilation = self.stride, self.dilation
        # read from the instance dict: getattr goes through nn.Module.__getattr__ and an AttributeError on every
        # other layer, at each penalty call (3.5 us against 0.4 us)
        if module.__dict__.get(FROZEN_FILTERS_MARKER, False):
            # looked up here too, not only when the term was built (lorth_term reads the layer then): a term pickled
            # before it did holds the inner conv's stride 1
            owner = frozen_convnorm_owner(root, self.site)
            if owner is not None:
                stride, dilation = _conv_geometry(owner)
        value = metrics.lorth(metrics._in_opmath(layer_weight), stride=stride, groups=self.groups, case=self.case,
                              dilation=dilation)
        return value, layer_weight.dtype

    def form(self) -> tuple:
        # not the case: L_orth's RO and CO forms differ by the constant M - C S^d (P0), so they are one regulariser
        # (the same gradient); a tensor tied between sites that force other cases was penalised twice
        return (self.stride, self.groups, self.dilation)

    def penalised(self, root: nn.Module) -> list[tuple[str, torch.Tensor, tuple]]:
        """A Linear's weight in the form of one gate block (:func:`gate_blocks_lorth`): its L_orth is that block's,
        so a Linear tied to a one-gate RNN's hidden weight is one regulariser; other layers as the base class."""
        layer = root.get_submodule(self.site)
        if isinstance(layer, nn.Linear):
            return [(self.site, layer.weight, _gate_blocks_form(1))]
        return super().penalised(root)


def gate_blocks_lorth(weights: list[torch.Tensor], gates: int, case: str | None = None) -> torch.Tensor:
    r"""Sum over the hidden-to-hidden ``weights`` (each ``gates * H x c``, all of one shape) and their gate blocks
    :math:`W_g` (rows ``g H .. (g + 1) H``) of :math:`\|W_g W_g^T - I\|_F^2` (wide or square :math:`W_g`, or
    ``case="RO"``) or :math:`\|W_g^T W_g - I\|_F^2` (tall, or ``case="CO"``); differentiable.

    Every block is the weight of one group of a grouped one-tap convolution (all weights stacked, ``(B H, c, 1)``
    with ``B`` blocks in all), whose :func:`orthofx.metrics.lorth` is exactly this sum: each group's Gram matrix
    (the smaller of the two), one batched product for all blocks, in float32 for a half-precision weight."""
    stacked = torch.cat(weights) if len(weights) > 1 else weights[0]
    return metrics.lorth(stacked.unsqueeze(-1), groups=len(weights) * gates, case=case)


class RecurrentLorthTerm(PenaltyTerm):
    """:func:`gate_blocks_lorth` of the hidden-to-hidden weights ``parameters`` (attribute names, e.g.
    ``("weight_hh_l0", "weight_hh_l0_reverse")``) of the recurrent layer at ``site``, ``gates`` blocks each. Input
    weights, biases and LSTM projections (``weight_hr_*``) are not penalised. A hidden weight tied to one another
    term penalises already is left out of ``parameters`` (:meth:`OrthRegularizer.apply`)."""

    def __init__(self, site: str, rule: str, weight: float, parameters: tuple[str, ...], gates: int,
                 case: str | None = None):
        super().__init__(site, rule, weight)
        self.parameters = tuple(parameters)
        self.gates = gates
        self.case = case

    def value(self, root: nn.Module) -> torch.Tensor:
        value, dtype = self.full_precision_value(root)
        return value.to(dtype)

    def full_precision_value(self, root: nn.Module) -> tuple[torch.Tensor, torch.dtype]:
        """``(value, dtype)``: of half-precision weights in float32 (:meth:`LorthTerm.full_precision_value`),
        and their dtype."""
        layer = root.get_submodule(self.site)
        weights = [whole(getattr(layer, name),  # FSDP2 shards: gathered, differentiably
                         f"site '{self.site}' (rule '{self.rule}'): the L_orth penalty of {name}")
                   for name in self.parameters]
        return gate_blocks_lorth([metrics._in_opmath(w) for w in weights], self.gates, self.case), weights[0].dtype

    def penalised(self, root: nn.Module) -> list[tuple[str, torch.Tensor, tuple]]:
        layer = root.get_submodule(self.site)
        return [(f"{self.site}.{name}", getattr(layer, name), _gate_blocks_form(self.gates))
                for name in self.parameters]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(site={self.site!r}, weight={self.weight}, parameters={self.parameters}, "
                f"gates={self.gates})")


def lorth_term(module: nn.Module, site: str, rule: str, weight: float, case: str | None = None,
               root: nn.Module | None = None) -> LorthTerm:
    """The L_orth penalty term of ``module`` at ``site``; ``case`` ("RO" / "CO") is the layer's own. A transposed
    conv is the adjoint of the conv with its weight (the same singular values): its term is that conv's L_orth,
    with RO and CO swapped. The conv of a frozen ConvNorm layer (:func:`frozen_convnorm_owner`, looked up in
    ``root``, the model holding ``site``) has the stride and dilation of the layer that owns it: the term keeps
    those (its ``stride``, ``dilation`` and :meth:`~LorthTerm.form` say them) and measures the convolution that
    layer applies. Such a conv needs ``root``: on its own it tells neither. ``ArgumentError`` (a ``ValueError``)
    for other layer types, and for such a conv without ``root``."""
    if isinstance(module, nn.Linear):
        return LorthTerm(site, rule, weight, case=case)
    # conv-like by what it has (a layer a pass installed in place of a conv, e.g. ConvNorm's, qualifies too)
    if not all(hasattr(module, a) for a in ("stride", "groups", "dilation")) or getattr(module, "weight", None) is None:
        raise ArgumentError(f"L_orth is defined for Linear, Conv1d/2d/3d and ConvTranspose1d/2d/3d layers, not "
                            f"{type(module).__name__} ('{site}')")
    if isinstance(module, TORCH_TRANSPOSED_CONV_TYPES) and case is not None:
        case = theory.adjoint_case(case)
    if root is None and module.__dict__.get(FROZEN_FILTERS_MARKER, False):
        raise ArgumentError(f"'{site}' is the conv of a frozen ConvNorm layer, whose own stride and padding are "
                            "those of the stride-1 correlation the layer normalises, not the layer's: pass "
                            "root=<the model holding it> to lorth_term, so that the term takes the layer's stride "
                            "and dilation")
    owner = None if root is None else frozen_convnorm_owner(root, site)
    stride, dilation = _conv_geometry(module if owner is None else owner)
    return LorthTerm(site, rule, weight, stride=stride, groups=module.groups, case=case, dilation=dilation)


def frozen_convnorm_owner(root: nn.Module, site: str) -> FrozenConvNormNd | None:
    """The :class:`~orthofx.nn.convnorm.FrozenConvNormNd` whose ``conv`` is the module at ``site`` of ``root``, or
    ``None`` when that module is no such conv (or sits elsewhere than under its layer).

    The layer keeps its conv's stride and dilation, which L_orth of that conv's weight is to use (the convolution
    the layer applies). The frozen conv's own ``stride`` need not be the layer's: a layer with filters convolves
    at stride 1 with padding ``Q`` (the correlation ConvNorm's filters act on), so L_orth read from that conv was
    the stride-1 figure of a stride-2 layer (0.0133 for 0.0405 on one layer), another case (RO / CO) too. A
    one-tap (1 x 1) layer without filters keeps the layer's stride and padding in its conv, whose weight is
    ``w * s``, the layer's weight with each output channel scaled by its constant filter (what that conv computes,
    and what L_orth then measures)."""
    module = root.get_submodule(site)
    if not module.__dict__.get(FROZEN_FILTERS_MARKER, False) or "." not in site:
        return None
    owner = root.get_submodule(site.rpartition(".")[0])
    return owner if isinstance(owner, FrozenConvNormNd) and owner.conv is module else None


def _conv_geometry(layer: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A conv-like layer's stride and dilation as tuples (what :class:`LorthTerm` keeps)."""
    return tuple(layer.stride), tuple(layer.dilation)


@register_pass
class OrthRegularizer(Pass):
    """Soft orthogonality: P0's L_orth for Conv1d/2d/3d and ConvTranspose1d/2d/3d (per group, dilated ones through
    their undilated equivalent kernel), ||WW^T - I||_F^2 for Linear, and the same per gate block of the
    hidden-to-hidden weights of RNN / LSTM / GRU layers and their cells."""

    name = "orth_regularizer"
    params = (
        Param("weight", 0.01, (float,), "multiplier of the term in orthofx.penalty (P0: 1e-2 .. 1e-1 on CIFAR-10)",
              minimum=0.0),
        Param("case", "auto", (str,), "RO (row orthogonal), CO (column orthogonal) or auto (by the shapes)",
              choices=("auto", "RO", "CO")),
        Param("every", 1, (int,), "evaluate each term on one call of orthofx.penalty in `every` (lazy: multiply "
              "weight by every to keep the strength), the terms spread over the calls by cost; calls in eval mode "
              "or under no_grad evaluate every term and are not counted", minimum=1),
    )
    site_kinds = frozenset({"module"})
    module_types = PARAMETER_WEIGHT_LAYERS + RECURRENT_TYPES
    group = "weight"
    complex_weights = "measures real weights only (L_orth)"

    def accepts(self, site, module):
        reason = super().accepts(site, module)
        if reason is not None:
            return reason
        if isinstance(module, RECURRENT_TYPES):
            # the layers riemannian declines, declined alike (one rule of the weight group treats a recurrent layer
            # as either pass would): no hidden weight to measure (hidden_size 0), or one a parametrization or a
            # forward pre-hook computes
            return recurrent_weights_reason(module)
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and not isinstance(weight, nn.parameter.UninitializedParameter) \
                and weight.numel() == 0:
            # a layer with zero inputs or outputs: no operator to make orthogonal (penalty() would refuse it)
            return f"its weight is empty (shape {tuple(weight.shape)}): L_orth has nothing to measure"
        return None

    def apply(self, ctx: PassContext, entries: list[PlanEntry]) -> None:
        attached: list[tuple[PenaltyTerm, Change]] = []  # the terms to spread over their periods
        for entry in entries:
            case = None if entry.params["case"] == "auto" else entry.params["case"]
            if isinstance(ctx.module(entry.site), RECURRENT_TYPES):
                term, change = self._apply_recurrent(ctx, entry, case)
            else:
                term, change = self._apply_layer(ctx, entry, case)
            if term is not None:
                term.every = entry.params["every"]
                attached.append((term, change))
        # all rules' terms at once: rules of one period (one per stage, say) share its calls, which spread per rule
        # would each load with their costliest term first
        _spread_over_period([term for term, _ in attached], [_evaluation_cost(ctx, term) for term, _ in attached])
        for term, change in attached:
            change.what = restate_period(change.what, term)

    def _apply_layer(self, ctx: PassContext, entry: PlanEntry, case: str | None
                     ) -> tuple[PenaltyTerm | None, Change]:
        """The :class:`LorthTerm` of a Linear / conv layer (``None`` when a tied weight has one already) and its
        recorded change."""
        module = ctx.module(entry.site)
        term = lorth_term(module, entry.site.name, entry.rule_name, entry.params["weight"], case=case, root=ctx.gm)
        # No L_orth value is computed here: on wide layers it costs as much as a training step's penalty,
        # and orthofx.report computes it when asked.
        shared = ctx.add_penalty(term)
        what = ("attached L_orth regulariser" if shared is None else
                f"L_orth of this weight is already attached at {shared} (tied weight: counted once)")
        change = Change(site=entry.site.name, rule=entry.rule_name, pass_name=self.name, what=what,
                        params=dict(entry.params))
        ctx.record(change)
        return (term if shared is None else None), change

    def _apply_recurrent(self, ctx: PassContext, entry: PlanEntry, case: str | None
                         ) -> tuple[PenaltyTerm | None, Change]:
        """One :class:`RecurrentLorthTerm` for the layer's hidden weights, less those a term penalises already in
        the same form (tied weights: counted once); ``None`` for the term when all are."""
        module = ctx.module(entry.site)
        hidden = recurrent_hidden_weights(module)
        gates = hidden[0][1]
        penalised = ctx.penalised_tensors(_gate_blocks_form(gates))
        own, tied = [], []
        for name, _ in hidden:
            tensor = getattr(module, name)
            if id(tensor) in penalised:
                tied.append(f"{name} (tied to {penalised[id(tensor)]})")
            else:
                own.append(name)
                penalised[id(tensor)] = f"{entry.site.name}.{name}"  # tied within the layer: counted once too
        term = None
        if own:
            term = RecurrentLorthTerm(entry.site.name, entry.rule_name, entry.params["weight"], tuple(own), gates,
                                      case=case)
            ctx.add_penalty(term)
        what = (f"attached L_orth regulariser to {_describe_blocks(module, own, gates)}" if own else
                "L_orth of its hidden-to-hidden weights is already attached")
        if tied:
            what += f"; {', '.join(tied)} already penalised (tied weight: counted once)"
        change = Change(site=entry.site.name, rule=entry.rule_name, pass_name=self.name, what=what,
                        params=dict(entry.params))
        ctx.record(change)
        return term, change


def _evaluation_cost(ctx: PassContext, term: PenaltyTerm) -> int:
    """Multiply-adds of the Gram products ``term`` computes, roughly: each penalised weight's entries times the
    smaller side of its (per group, per gate block) Gram matrix, times its taps for a convolution (every tap meets
    about as many others in ``conv(K, K)``); only the ratios matter (:func:`_spread_over_period`). A lazy layer,
    whose weight has no shape yet, counts as free."""
    cost = 0
    for _, weight, _ in term.penalised(ctx.gm):
        if isinstance(weight, nn.parameter.UninitializedParameter) or weight.dim() < 2:
            continue
        if isinstance(term, RecurrentLorthTerm):  # gate blocks (H x c) of a matrix: no taps
            rows, columns, taps = weight.shape[0] // term.gates, weight.shape[1], 1
        else:
            taps = weight[0, 0].numel()
            rows, columns = weight.shape[0] // getattr(term, "groups", 1), weight.shape[1] * taps
        cost += weight.numel() * min(rows, columns) * taps
    return cost


def _spread_over_period(terms: list[PenaltyTerm], costs: list[int]) -> None:
    """Give each term with ``every = k > 1`` the call of its period it is evaluated on (``term.phase``), so that
    the calls share the cost evenly: the costliest first, each to the call with the least cost so far (ties: the
    one with the fewest terms, then the earliest), the terms of each ``every`` (from any rule) among its calls.
    Costs that tie (lazy layers, all free) are dealt out one per call in turn, not all on the first call.

    Example: costs 4, 3, 1, 0 at ``every = 2`` give phases 0, 1, 1, 0 (loads 4 and 4); costs 0, 0, 0 at
    ``every = 3`` give 0, 1, 2."""
    loads: dict[int, list[tuple[int, int]]] = {}  # by every: (cost, terms) of each call of the period
    for index in sorted(range(len(terms)), key=lambda i: -costs[i]):  # stable: equal costs keep the graph order
        term = terms[index]
        if term.every == 1:
            continue
        # n terms fill at most the first n calls (an empty call is the least loaded): no list of every's length,
        # which a large every (10**9) would make a MemoryError of
        load = loads.setdefault(term.every, [(0, 0)] * min(term.every, len(terms)))
        term.phase = min(range(len(load)), key=load.__getitem__)
        cost, count = load[term.phase]
        load[term.phase] = (cost + costs[index], count + 1)


_PERIOD_NOTE = re.compile(r"; evaluated on one orthofx\.penalty call in \d+ \(call \d+ of each period\)")


def restate_period(what: str, term: PenaltyTerm) -> str:
    """``what`` (a Change's text) with the note of the call of its period ``term`` is evaluated on (``every > 1``):
    added, or put in place of the note it had (the phases a loaded state dict brings: ``orthofx.transform``'s
    ``_load_penalty_calls``).

    >>> term = PenaltyTerm("fc", "r", 0.1); term.every, term.phase = 4, 2
    >>> restate_period("attached L_orth regulariser", term)
    'attached L_orth regulariser; evaluated on one orthofx.penalty call in 4 (call 2 of each period)'
    """
    note = f"; evaluated on one orthofx.penalty call in {term.every} (call {term.phase} of each period)"
    what, found = _PERIOD_NOTE.subn(note if term.every > 1 else "", what, count=1)
    return what if found or term.every == 1 else what + note


def _gate_blocks_form(gates: int) -> tuple:
    """The form (:meth:`~orthofx.passes.base.PenaltyTerm.penalised`) of :func:`gate_blocks_lorth` on one weight;
    without the case, as for :meth:`LorthTerm.form` (each block's RO and CO forms differ by a constant)."""
    return ("gate blocks", gates)


def _describe_blocks(module: nn.Module, names: list[str], gates: int) -> str:
    """``weight_hh_l0, weight_hh_l1 (4 gate blocks of 6x6 each)``; ``weight_hh (one block of 5x5)`` for an RNN
    cell."""
    rows, cols = getattr(module, names[0]).shape
    blocks = gate_blocks_text(gates, f"{rows // gates}x{cols}")
    return f"{', '.join(names)} ({blocks}{' each' if len(names) > 1 else ''})"
