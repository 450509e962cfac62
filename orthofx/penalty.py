"""``penalty(gm)``: the sum of every regulariser a transformed model carries, weighted per rule.

    loss = criterion(gm(x), y) + orthofx.penalty(gm)

Each pass that attaches a regulariser records a penalty term in the manifest (``gm.meta["orthofx"]``); the
penalty is ``sum_i weight_i * term_i(gm)``, differentiable with respect to the model's parameters. It works on
the result of ``torch.compile`` and on DDP/DataParallel wrappers too (the terms are evaluated on the wrapped
module's parameters, outside the compiled graph).

A model written with orthofx's layers (``orthofx.nn``) that ``orthofx.transform`` did not return has no manifest:
its penalty is ``sum_p p.penalty()`` over its :class:`~orthofx.nn.JacobianProbe` modules ``p`` (each the probe's
``weight * estimate`` after a training-mode forward; zero before it, in eval mode and on the calls ``every``
skips), its terms keyed ``"JacobianProbe/<module path>"``. A model holding no orthofx layer raises
:class:`~orthofx.OrthofxError` ("an orthofx layer": :func:`orthofx.nn.tracing.is_orthofx_layer`).

A frozen model (``orthofx.freeze``) keeps a manifest without terms: its penalty is a zero, its ``penalty_terms``
empty. Frozen layers (``to_plain()``'s ``FourierConv``, ``FrozenConvNormNd`` ...) are not orthofx layers: a model
assembled from them without that manifest is a plain model, refused like any other.
"""

from __future__ import annotations

import torch
from torch import nn

from .capture import unwrap_model
from .errors import ArgumentError, OrthofxError
from .nn.jacobian import JacobianProbe
from .nn.precision import autocast_off
from .nn.tracing import is_orthofx_layer, is_orthofx_module
from .passes.base import PenaltyTerm, zero_like_parameters
from .transform import is_transformed, manifest_of

__all__ = ["penalty", "penalty_terms", "is_orthofx_layer", "holding_orthofx_layers", "lazy_site_module"]

# ``is_orthofx_layer`` (defined in orthofx.nn.tracing, the one definition) stays importable from here.


def holding_orthofx_layers(model: nn.Module) -> nn.Module:
    """The module inside ``model``'s wrappers (torch.compile, DDP), when it holds an orthofx layer (itself
    included); raises :class:`~orthofx.OrthofxError` otherwise. For models not returned by ``orthofx.transform``."""
    root = unwrap_model(model)
    if not any(is_orthofx_layer(module) for module in root.modules()):
        raise OrthofxError(
            f"{type(root).__name__} was not produced by orthofx.transform and holds no orthofx layer "
            f"(orthofx.nn: OrthogonalConv2d, ConvNormConv2d, JacobianProbe ...){_frozen_note(root)}, so orthofx has "
            "nothing to measure or regularise in it: call orthofx.transform(model, policy) first, or build the "
            "model with orthofx.nn layers (wrap a block in orthofx.nn.JacobianProbe for a Jacobian penalty)")
    return root


def _frozen_note(root: nn.Module) -> str:
    """`` (its FourierConv ... are frozen forms ...)`` when ``root`` holds modules of orthofx.nn that are not
    layers (what ``to_plain()`` and ``orthofx.freeze`` leave), which is why it has nothing to regularise."""
    frozen = sorted({type(m).__name__ for m in root.modules() if is_orthofx_module(m)})
    if not frozen:
        return ""
    return (f"; its {', '.join(frozen)} are frozen forms or helpers of orthofx layers (what to_plain() and "
            "orthofx.freeze leave), which carry no regulariser (orthofx.penalty of a model orthofx.freeze returned "
            "is zero)")


def _probes(model: nn.Module) -> list[tuple[str, JacobianProbe]]:
    """``(module path, probe)`` of every JacobianProbe of a model holding orthofx layers (not transformed)."""
    return [(name, m) for name, m in holding_orthofx_layers(model).named_modules() if isinstance(m, JacobianProbe)]


def lazy_site_module(root: nn.Module, term: PenaltyTerm) -> nn.Module | None:
    """The module at ``term``'s site when it is a lazy layer that has not run yet (``nn.LazyLinear`` ...: its
    parameters have no shape or values, so no term of it can be computed); ``None`` otherwise, also for a site
    that is not a module (a graph function site)."""
    try:
        module = root.get_submodule(term.site)
    except AttributeError:
        return None
    # isinstance rather than nn.parameter.is_lazy, which dynamo cannot trace (penalty runs in compiled steps)
    if any(isinstance(t, nn.parameter.UninitializedTensorMixin) for t in (*module.parameters(), *module.buffers())):
        return module
    return None


def _first_float_parameter(root: nn.Module) -> torch.Tensor | None:
    """``root``'s first floating-point parameter (the device autocast is switched off for), or ``None``."""
    return next((p for p in root.parameters() if p.is_floating_point()), None)


def _term_value(root: nn.Module, term: PenaltyTerm, reference: torch.Tensor | None = None) -> torch.Tensor:
    """``term``'s unweighted value; a lazy layer that has not run is refused with the fix, not torch's error.
    Looked for only when the term fails: penalty runs at every training step, and a layer stays initialised.

    Computed with autocast off for ``reference``'s device (:func:`~orthofx.nn.precision.autocast_off`): the usual
    training step evaluates ``criterion(gm(x), y) + orthofx.penalty(gm)`` inside ``torch.autocast``, which would
    run a term's convolutions and products in bfloat16 / float16. Each term measures a small defect ``W^T W - I``
    of a near-orthogonal weight, which those 8 or 11 bits cannot resolve (a conv L_orth's gradient came out 25%
    off); the terms are tiny next to the forward, so they run in the weights' own dtype."""
    try:
        if reference is None:
            return term.value(root)
        with autocast_off(reference):
            return term.value(root)
    except Exception as exc:
        lazy = lazy_site_module(root, term)
        if lazy is None:
            raise
        raise ArgumentError(f"site '{term.site}' (rule '{term.rule}'): {type(lazy).__name__} is a lazy layer that "
                            "has not run yet, so its weight has no values to penalise. Run the model once "
                            "(gm(x)) before orthofx.penalty, or pass example_inputs=(x,) to orthofx.transform"
                            ) from exc


def penalty_terms(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each term's weighted value, keyed ``"<rule>/<site>"`` (for logging which layers dominate); for a model
    holding orthofx layers but not transformed, ``"JacobianProbe/<module path>"``: ``probe.penalty()``, or a zero
    like the probe's parameters when it has no current estimate.

    Example::

        import torch, orthofx
        model = orthofx.models.get("small_cnn")
        gm = orthofx.transform(model, "lorth")
        terms = orthofx.penalty_terms(gm)    # {'lorth/conv1': tensor(...), ...}
        torch.testing.assert_close(sum(terms.values()), orthofx.penalty(gm))
    """
    if not is_transformed(model):
        return {f"JacobianProbe/{name}": zero_like_parameters(probe) if probe.estimate is None else probe.penalty()
                for name, probe in _probes(model)}
    root = unwrap_model(model)
    reference = _first_float_parameter(root)
    return {f"{t.rule}/{t.site}": t.weight * _term_value(root, t, reference)
            for t in manifest_of(model).penalties}


def penalty(model: nn.Module) -> torch.Tensor:
    """Sum of all weighted regularisers attached by the policy (for a model holding orthofx layers but not
    transformed: of its JacobianProbes' ``penalty()``); a zero scalar (in the dtype and on the device of the
    model's parameters) when there are none or all have weight 0. Inside ``torch.autocast`` the terms still run in
    the weights' dtype (autocast is switched off for them).

    Example::

        import torch, orthofx
        model = orthofx.models.get("small_cnn")
        x, y = orthofx.models.example_input("small_cnn", batch=8), torch.randint(0, 10, (8,))
        gm = orthofx.transform(model, "lorth")
        loss = torch.nn.functional.cross_entropy(gm(x), y) + orthofx.penalty(gm)
        loss.backward()
    """
    root = unwrap_model(model)
    if is_transformed(model):
        reference = _first_float_parameter(root)
        weighted = [term.weight * _term_value(root, term, reference) for term in manifest_of(model).penalties
                    if term.weight != 0.0]
    else:
        weighted = [probe.penalty() for _, probe in _probes(model)
                    if probe.estimate is not None and probe.penalty_weight != 0.0]
    if not weighted:
        return zero_like_parameters(root)
    return sum(weighted[1:], weighted[0])
