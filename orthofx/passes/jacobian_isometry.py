"""Pass ``jacobian_isometry``: regularise blocks towards an orthogonal input-output Jacobian (P2).

Each selected block (a ``kind: block`` site, or a ``kind: module`` site such as a single layer) is wrapped in
a :class:`orthofx.nn.jacobian.JacobianProbe`. In training mode the probe returns the block's output and also
estimates, with Rademacher probes, one of

* ``full``:    ||J^T J - I||_F^2    (the Jacobian is orthogonal: P2's perfect dynamical isometry),
* ``partial``: ||J J^T J - J||_F^2  (a partial isometry, e.g. ``relu(Q x + b)``, P2's extension),
* ``offdiag``: sum_{i != j} (J^T J)_ij^2  (orthogonal Jacobian columns of any norm, OroJaR),

differentiable with respect to the block's parameters (estimators and their costs:
:func:`orthofx.metrics.jacobian_isometry`). The pass records a :class:`JacobianTerm` per block, so
``orthofx.penalty(gm)`` adds ``weight * estimate`` after each training-mode forward; in eval mode the probe only
runs the block and the term is zero. The penalty reads the estimate of the last forward, so it is added after
the forward, ``criterion(gm(x), y) + orthofx.penalty(gm)``: in ``orthofx.penalty(gm) + criterion(gm(x), y)``
Python evaluates it first and reads the last step's estimate, which raises a
:class:`~orthofx.errors.LayerArgumentError` at backward (after an optimizer step, or once a backward freed it)
saying so.

Where the probe goes. The probe replaces the block at the block's own path (``setattr`` on the parent), and
the graph still calls that path. The probe shares the block's parameters, buffers and submodules instead of
holding the block as a child, so no state_dict key and no module path changes (``layer1.0.conv1.weight`` stays
as it is): checkpoints of the original model load into the transformed one and back, ``orthofx.load`` replays
the policy on weights saved from either, and other passes' penalty terms and hooks, which find their layers by
path, keep working. ``orthofx.freeze`` swaps the probe back for the block (``JacobianProbe.to_plain``).

Targeting. Blocks are submodules named by a ``kind: block`` rule (capture keeps them as fx leaves), e.g.::

    rules:
      - match: {kind: block, name: "layer*"}          # ResNet stages layer1..layer4
        apply: jacobian_isometry
        with: {weight: 0.1, kind: full, per_sample: true, normalize: true}

The model's root is not a site. To regularise the whole model's Jacobian, select its top-level children (the
``jacobian`` preset takes every top-level ``Sequential``), or wrap the model, ``nn.Sequential(model)``, and
select the block ``"0"``. A module called several times in one forward is estimated at each call (the term is
the sum). A block whose input is not floating point (an embedding fed token ids), or that returns a tuple or
dict (``nn.MultiheadAttention``, a block returning ``(y, aux)``), has no single Jacobian to regularise. With
example inputs the pass sees it on their run and leaves it unwrapped (``orthofx.report``: ``skipped: ...``),
and an :class:`~orthofx.errors.OrthofxWarning` names the blocks left out, unless the rule is ``optional``
(``explain``, which runs nothing, shows them as ``apply``; a warning, not planning's error for a rule whose pass
can handle none of its sites: a ``.pt`` file written with such a rule loads). Without example inputs the block
is wrapped, and its first training-mode forward raises a :class:`~orthofx.errors.LayerArgumentError` naming it.
A probe estimates only where its block is called as a module: ``nn.MultiheadAttention`` reads its ``out_proj``'s
weight without calling it, so a probe there adds 0 at every step. When the run on the example inputs (eval mode)
did not call a wrapped block, an :class:`~orthofx.errors.OrthofxWarning` (one per rule) names it; the layers of
``nn.TransformerEncoderLayer``, which torch's eval fast path skips, are called in that run (its hooks keep the
fast path off), as in training.

Parameters: ``weight`` (>= 0, default 0.1), ``probes`` (>= 1, default 1), ``kind`` (full | partial | offdiag),
``every`` (>= 1: estimate on every ``every``-th training step only), ``per_sample`` (mean over samples instead
of the whole-batch value), ``normalize`` (divide by the input dimension, so one weight suits blocks of any size)
``route`` (auto | jvp | double_vjp: how the Jacobian products are computed) and ``batch_fraction`` (in (0, 1],
default 1: estimate on a random subset of that fraction of the batch).

Cost. With one probe, ``full`` adds about three forward-and-backward passes of the block to a training step
(forward, tangent and VJP, each differentiated again for the parameters' gradient; the forward is
differentiated too because the tangent and the VJP depend on its activations). A step of a model whose blocks
carry most of the compute therefore costs about 4x a plain step, whatever the implementation. The two ways to
make it cheaper change the sampling, not the quantity estimated: ``every: k`` (estimate on one step in ``k``,
with ``weight`` multiplied by ``k`` to keep the average strength) and ``batch_fraction: f`` (estimate on a random
``f`` of the samples; unbiased for independent samples, cost about ``f`` of the full estimate). The probe's steps
are its training-mode forwards with gradients (L_orth's ``every`` counts ``orthofx.penalty`` calls in training mode
instead; neither counts a validation pass in eval mode), and
each forward replaces the last one's estimate: with gradient accumulation add the penalty at each micro-batch.
Added once, after the last micro-batch, it carries only that micro-batch's estimate, and none at all when
``every`` divides the number of micro-batches (``every: 2``, two micro-batches: the last is always skipped).

With BatchNorm in training mode the subset of ``batch_fraction`` is normalised with its own batch statistics, so
``batch_fraction`` then estimates the quantity of the smaller batch's map (see
:func:`orthofx.metrics.jacobian_isometry`).
"""

from __future__ import annotations

import warnings
from collections import Counter

import torch
from torch import nn

from .. import metrics
from ..errors import OrthofxError, OrthofxWarning, caller_stacklevel, first_few
from ..nn.jacobian import JacobianProbe
from .base import Change, Param, Pass, PassContext, PenaltyTerm, PlanEntry, Site, entries_by_rule
from .registry import register_pass

__all__ = ["JacobianIsometry", "JacobianTerm"]


class JacobianTerm(PenaltyTerm):
    """The last Jacobian estimate of the :class:`JacobianProbe` at ``site`` (zero before any training forward,
    after an eval-mode forward and on the calls that ``every`` skips)."""

    def value(self, root: nn.Module) -> torch.Tensor:
        value, dtype = self.full_precision_value(root)
        return value.to(dtype)

    def full_precision_value(self, root: nn.Module) -> tuple[torch.Tensor, torch.dtype]:
        """``(estimate, dtype)`` of the probe (:meth:`JacobianProbe._estimate_and_dtype`): a half-precision block's
        estimate in float32, and the dtype its penalty is returned in (``orthofx.penalty`` weights the float32
        value, then rounds: a float16 estimate above 65504 is inf where ``weight * estimate`` fits)."""
        probe = root.get_submodule(self.site)
        if not isinstance(probe, JacobianProbe):
            raise OrthofxError(f"the module at {self.site!r} is a {type(probe).__name__}, not the JacobianProbe "
                               "that pass 'jacobian_isometry' put there; was it replaced after the transform?")
        # a stale estimate (an earlier step's) raises at backward, saying so; none: a zero in the block's dtype
        return probe._estimate_and_dtype()


def _no_jacobian(ctx: PassContext, name: str) -> str | None:
    """Why the example run showed the block at ``name`` to have no Jacobian to regularise, or None (also when
    there was no example run: the probe then says so at its first training step)."""
    inputs = ctx.site_inputs.get(name)
    if inputs and not (isinstance(inputs[0], torch.Tensor) and inputs[0].is_floating_point()):
        got = inputs[0].dtype if isinstance(inputs[0], torch.Tensor) else type(inputs[0]).__name__
        return (f"its first input is {got}, not a floating-point tensor: there is no Jacobian to regularise "
                "(select the blocks after it)")
    if name in ctx.manifest.input_shapes and name not in ctx.manifest.output_shapes:
        # the example run records the output shape of a block that returns one tensor only
        return ("it returns a tuple, dict or other non-tensor, not one tensor: there is no single input-output "
                "Jacobian to regularise (select a module of yours that calls it and returns one tensor, such as the "
                "block holding it with its residual, or the layers after it; nn.MultiheadAttention reads its "
                "out_proj's weight without calling it)")
    return None


def _warn_skips(ctx: PassContext, entries: list[PlanEntry], reasons: dict[int, str | None]) -> None:
    """Speak for the blocks the example run showed to have no Jacobian to regularise (``reasons``: by ``id`` of
    the entry, from :func:`_no_jacobian`), which planning, running nothing, had planned as 'apply': an
    :class:`~orthofx.errors.OrthofxWarning` per rule names the blocks left unwrapped (they add nothing to the
    penalty), except for an ``optional`` rule (a preset's), whose report rows say it."""
    policy = ctx.manifest.policy
    for position, rule_entries in entries_by_rule(entries).items():
        skipped = [(entry.site.name, reasons[id(entry)]) for entry in rule_entries if reasons[id(entry)] is not None]
        if not skipped:
            continue
        rule_name = rule_entries[0].rule_name
        rule = policy.rules[position] if policy is not None and position < len(policy.rules) else None
        if rule is not None and rule.name == rule_name and rule.optional:
            continue
        listed = "; ".join(f"{name}: {why}" for name, why in skipped[:5])
        more = f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else ""
        warnings.warn(f"jacobian_isometry (rule '{rule_name}'): the run on the example inputs showed "
                      f"{len(skipped)} of its {len(rule_entries)} block(s) to have no Jacobian to regularise, so "
                      f"they are left unwrapped and add nothing to orthofx.penalty: {listed}{more}. Narrow the "
                      "rule's match to leave them out", OrthofxWarning, stacklevel=caller_stacklevel())


def _warn_uncalled(ctx: PassContext, entries: list[PlanEntry], reasons: dict[int, str | None]) -> None:
    """Warn (:class:`~orthofx.errors.OrthofxWarning`, once per rule) of the blocks to be wrapped that the run on the
    example inputs did not call as modules (:attr:`PassContext.called_sites`; no run, no warning): a probe runs
    only where its block is called, so the block adds 0 to the penalty at every step unless training calls it.
    ``nn.MultiheadAttention`` never calls its ``out_proj`` (its forward reads the weight). The eval fast path of
    ``nn.TransformerEncoderLayer``, which skips calling its sublayers where training calls them, is not taken in
    that run by a layer holding a site (``transform``'s ``_observe`` hooks the sites, and torch takes it only for
    a layer without hooks), so a sublayer selected there is seen called. A module that the captured training-mode
    graph calls (the model's forward branching on ``self.training``) is not reported either."""
    if ctx.called_sites is None:
        return
    from ..plan import called_modules  # plan imports the passes

    # a module the training-mode graph calls (a branch on self.training in the model's forward) is called there
    graphed = called_modules(ctx.gm)
    for rule_entries in entries_by_rule(entries).values():
        rule_name = rule_entries[0].rule_name
        wrapped = [entry.site.name for entry in rule_entries if reasons[id(entry)] is None]
        uncalled = [name for name in wrapped if name not in ctx.called_sites and name not in graphed]
        if not uncalled:
            continue
        listed = first_few([repr(name) for name in uncalled], 5)
        why = ""
        for name in uncalled:
            parent, _, leaf = name.rpartition(".")
            if leaf == "out_proj" and isinstance(ctx.gm.get_submodule(parent), nn.MultiheadAttention):
                why = (f" ({name!r}: nn.MultiheadAttention reads its out_proj's weight directly, in training too, "
                       "and never calls it)")
                break
        warnings.warn(f"jacobian_isometry (rule '{rule_name}'): the run on the example inputs (eval mode, without "
                      f"gradients) did not call {len(uncalled)} of its {len(wrapped)} block(s) as a module: "
                      f"{listed}{why}. A probe estimates only when its block is called, so their Jacobian "
                      "penalty stays 0 unless training calls them (a branch on self.training in the forward of a "
                      "module kept whole); select instead a module that is called and returns one tensor, e.g. a "
                      "block holding them ({kind: block, name: ...})",
                      OrthofxWarning, stacklevel=caller_stacklevel())


def _calls_per_step(calls: Counter, name: str) -> int:
    """Calls of the module at ``name`` in one forward of the graph: its own ``call_module`` nodes, or, for a
    module inside a leaf of the graph (a block nested in another selected block), the calls of the nearest
    enclosing leaf (assumed to call it once per call)."""
    path = name
    while path:
        if calls.get(path):
            return calls[path]
        path = path.rpartition(".")[0]
    return 1


@register_pass
class JacobianIsometry(Pass):
    """Wrap blocks in :class:`JacobianProbe` and attach their Jacobian isometry estimates as penalty terms."""

    name = "jacobian_isometry"
    params = (
        Param("weight", 0.1, (float,), "multiplier of the term in orthofx.penalty", minimum=0.0),
        Param("probes", 1, (int,), "Rademacher probes per estimate (offdiag uses at least 2)", minimum=1,
              maximum=metrics.MAX_JACOBIAN_PROBES),
        Param("kind", "full", (str,), "full: ||J^T J - I||_F^2; partial: ||J J^T J - J||_F^2; offdiag: "
              "off-diagonal part of J^T J", choices=metrics.JACOBIAN_KINDS),
        Param("every", 1, (int,), "estimate on every every-th training step", minimum=1),
        Param("per_sample", False, (bool,), "mean over samples instead of the whole-batch value"),
        Param("normalize", False, (bool,), "divide by the input dimension (per sample with per_sample)"),
        Param("route", "auto", (str,), "auto: forward mode with double-VJP fallback; jvp; double_vjp",
              choices=("auto", "jvp", "double_vjp")),
        Param("batch_fraction", 1.0, (float,), "estimate on a random subset of this fraction of the batch "
              "(unbiased for independent samples; 1: the whole batch)", minimum=0.0, maximum=1.0,
              exclusive_minimum=True),
    )
    site_kinds = frozenset({"block", "module"})
    hides_layer = True  # the probe's type, not the layer's, is what a later pass at the site would get

    def replaces_layer(self, params) -> bool:
        """The probe takes the block's place (not counted as ``replaces_module``: the block itself stays, wrapped,
        so lazy and parametrized layers are fine)."""
        return True

    def accepts(self, site: Site, module: nn.Module | None) -> str | None:
        reason = super().accepts(site, module)
        if reason is not None:
            return reason
        if not site.name:
            return "the model's root cannot be wrapped; select its top-level children"
        if isinstance(module, JacobianProbe):
            return f"{site.name} is already a JacobianProbe"
        if module is not None and not any(True for _ in module.parameters()):
            return f"{site.name} ({type(module).__name__}) has no parameters for the regulariser to act on"
        return None

    def apply(self, ctx: PassContext, entries: list[PlanEntry]) -> None:
        calls = Counter(node.target for node in ctx.gm.graph.nodes if node.op == "call_module")
        reasons = {id(entry): _no_jacobian(ctx, entry.site.name) for entry in entries}
        _warn_skips(ctx, entries, reasons)  # before any block is wrapped
        _warn_uncalled(ctx, entries, reasons)
        for entry in entries:
            p = entry.params
            name = entry.site.name
            block = ctx.module(entry.site)
            reason = reasons[id(entry)]
            if reason is not None:
                ctx.record(Change(site=name, rule=entry.rule_name, pass_name=self.name, what="left unchanged: " +
                                  reason, params=dict(p), status=f"skipped: {reason}"))
                continue
            probe = JacobianProbe(block, weight=p["weight"], probes=p["probes"], kind=p["kind"], every=p["every"],
                                  per_sample=p["per_sample"], normalize=p["normalize"], route=p["route"],
                                  batch_fraction=p["batch_fraction"])
            probe.calls_per_step = _calls_per_step(calls, name)
            ctx.replace_module(name, probe)
            ctx.add_penalty(JacobianTerm(name, entry.rule_name, p["weight"]))
            before = {}
            if name in ctx.manifest.input_shapes:
                before["input_shape"] = list(ctx.manifest.input_shapes[name])
            if name in ctx.manifest.output_shapes:
                before["output_shape"] = list(ctx.manifest.output_shapes[name])
            ctx.record(Change(site=name, rule=entry.rule_name, pass_name=self.name,
                              what=f"wrapped {type(block).__name__} in JacobianProbe ({p['kind']} Jacobian "
                                   "isometry regulariser)",
                              params=dict(p), before=before))
