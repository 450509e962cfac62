"""``penalty(gm)``: the sum of every regulariser a transformed model carries, weighted per rule.

    loss = criterion(gm(x), y) + orthofx.penalty(gm)

Each pass that attaches a regulariser records a penalty term in the manifest (``gm.meta["orthofx"]``); the
penalty is ``sum_i weight_i * term_i(gm)``, differentiable with respect to the model's parameters. It works on
the result of ``torch.compile`` and on DDP/DataParallel wrappers too (the terms are evaluated on the wrapped
module's parameters, outside the compiled graph).

A model that ``orthofx.transform`` did not return has no manifest of its own. When it holds transformed models
(a transformed backbone inside a bigger model, or a wrapper module whose forward runs one, as
``torch.func.functional_call`` needs), their terms are its terms, keyed ``"<rule>/<path>.<site>"`` with the
transformed model's path in it (the outermost ones: a transformed model inside another counts through that one's
manifest). Its other orthofx layers (``orthofx.nn``) contribute ``sum_p p.penalty()`` over the
:class:`~orthofx.nn.JacobianProbe` modules ``p`` outside the transformed models (each the probe's ``weight *
estimate`` after a training-mode forward; zero before it, in eval mode and on the calls ``every`` skips), keyed
``"JacobianProbe/<module path>"``. A model holding neither raises :class:`~orthofx.OrthofxError` ("an orthofx
layer": :func:`orthofx.nn.tracing.is_orthofx_layer`).

A term with ``every = k > 1`` (``orth_regularizer``'s parameter) is evaluated on one call in ``k`` of
``penalty`` with gradients enabled on a model in training mode, at its weight, not scaled (lazy regularisation, as
the Jacobian pass's ``every``: set the rule's ``weight`` ``k`` times larger to keep the average strength); the
transformed model counts those calls (``Manifest.penalty_calls``, saved in its state-dict metadata; a call that
raises counts nothing). Under ``torch.no_grad()``, and on a model in eval mode (``gm.eval()``; for a bigger model,
each transformed part's own mode), ``penalty`` evaluates every term at its weight and counts nothing: a
validation pass that logs the penalty, even with gradients enabled, leaves the training schedule as it was, as a
JacobianProbe in eval mode makes no estimate and counts no step. ``penalty_terms`` never counts.

A Jacobian term is the estimate the probe made in its last training-mode forward: call ``penalty`` after the
forward (``criterion(gm(x), y) + orthofx.penalty(gm)``). Written the other way round, Python evaluates the
penalty first, which reads the last step's estimate; trained on after an optimizer step (or after a backward
freed it) that estimate raises a :class:`~orthofx.errors.LayerArgumentError` at backward, saying so
(:meth:`orthofx.nn.JacobianProbe._estimate_for_penalty`).

The terms are looked up by module path at each call and read the parameters there, so under
``torch.func.functional_call`` of a module whose forward calls ``orthofx.penalty`` (or of the bigger model
holding the transformed one) they are the substituted tensors, and ``torch.func.grad`` differentiates them.
Called outside the ``functional_call`` (``grad(lambda p: loss(functional_call(gm, p, (x,))) + orthofx.penalty(gm))``)
it reads the parameters the model holds, which the transform does not see: its gradient would be missing from the
result, so ``penalty`` warns (``OrthofxWarning``) when it runs under a differentiating ``torch.func`` transform
(``grad``, ``vjp``, ``jacrev``, ``jvp`` ...) on none of the transform's tensors.

Precision. A term of half-precision weights (a float16 / bfloat16 model) is computed in float32 (its L_orth, its
Jacobian estimate's sums), weighted there, and the terms are summed in float32; the sum is rounded once to the
dtype the terms' own values have (the weights' dtype; a Jacobian estimate under ``torch.autocast``: float32), as
is each of ``penalty_terms``' values. Rounded before the weight, a float16 L_orth above 65504 (a pretrained 256 x
256 layer's: 2.6e5) was inf where ``0.01 * L_orth`` fits (:meth:`PenaltyTerm.full_precision_value
<orthofx.passes.base.PenaltyTerm.full_precision_value>`).

A frozen model (``orthofx.freeze``) keeps a manifest without terms: its penalty is a zero, its ``penalty_terms``
empty. Frozen layers (``to_plain()``'s ``FourierConv``, ``FrozenConvNormNd`` ...) are not orthofx layers: a model
assembled from them without that manifest is a plain model, refused like any other.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from .capture import unwrap_model
from .errors import ArgumentError, OrthofxError, OrthofxWarning, caller_stacklevel
from .nn.jacobian import JacobianProbe
from .nn.precision import HALF_PRECISION, autocast_off
from .nn.tracing import (NOT_RECORDED, checkpoint_region, in_func_transform, is_orthofx_layer, is_orthofx_module,
                         record_for_recomputation, recorded_for_recomputation, recomputing_in_backward)
from .nn.precision import zero_like_parameters
from .passes.base import Manifest, PenaltyTerm, watch_hooked_weights
from .transform import is_transformed, manifest_of

__all__ = ["penalty", "penalty_terms", "is_orthofx_layer", "holding_orthofx_layers", "lazy_site_module",
           "transformed_parts", "trained_parts", "averaged_copies", "part_site_path", "module_path_within"]

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


def module_path_within(name: str, path: str) -> bool:
    """Whether the module path ``name`` is ``path`` or lies below it."""
    return name == path or name.startswith(path + ".")


def transformed_parts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(module path, module)`` of the outermost submodules of ``model`` (not ``model`` itself) that
    ``orthofx.transform`` returned, possibly wrapped (torch.compile, DDP): a transformed backbone inside a bigger
    model. Their penalty terms are the bigger model's (see the module docs).

    A part reached twice, bare and through a wrapper (``self.fast = torch.compile(self.backbone)``), is listed
    once, at its first path: its weights, terms, report rows and optimizer hooks are one model's."""
    root = unwrap_model(model)
    parts: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    for name, module in root.named_modules():
        if module is root or any(module_path_within(name, path) for path, _ in parts):
            continue
        if is_transformed(module) and id(part := unwrap_model(module)) not in seen:
            seen.add(id(part))
            parts.append((name, module))
    return parts


def averaged_copies(model: nn.Module) -> list[str]:
    """Module paths of the ``torch.optim.swa_utils.AveragedModel`` s inside ``model`` (below it, through its
    wrappers): an EMA or SWA copy kept next to the trained model (``self.ema = AveragedModel(self.net)``).

    Such a copy's weights are set by ``update_parameters`` (averages of the trained weights, ``p_avg <-
    lerp(p_avg, p, 1 - decay)`` for an EMA), never by a gradient step: a transformed model or a JacobianProbe
    inside it has no penalty to train and no optimizer step to hook (:func:`trained_parts`). ``orthofx.penalty``
    of the averaged model itself (``orthofx.penalty(ema)``) still measures it: there it is the root, not a copy
    inside."""
    root = unwrap_model(model)
    return [name for name, module in root.named_modules() if module is not root and isinstance(module, AveragedModel)]


def trained_parts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """:func:`transformed_parts` of ``model`` outside its EMA / SWA copies (:func:`averaged_copies`): the parts
    whose terms ``orthofx.penalty`` adds and whose hooks ``orthofx.attach`` registers."""
    averaged = averaged_copies(model)
    return [(path, part) for path, part in transformed_parts(model)
            if not any(module_path_within(path, copy) for copy in averaged)]


def _untransformed_sources(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, JacobianProbe]]]:
    """What the penalty of a model that ``orthofx.transform`` did not return is made of: its trained transformed
    parts (:func:`trained_parts`) and the JacobianProbes outside them and outside EMA / SWA copies (a probe inside a
    transformed part is one of that part's terms); raises like :func:`holding_orthofx_layers` for a model holding
    neither."""
    root = unwrap_model(model)
    parts = trained_parts(root)
    if not parts:
        holding_orthofx_layers(root)
    outside = [path for path, _ in parts] + averaged_copies(root)
    probes = [(name, m) for name, m in root.named_modules()
              if isinstance(m, JacobianProbe) and not any(module_path_within(name, path) for path in outside)]
    return parts, probes


def part_site_path(path: str, site: str) -> str:
    """``site`` of a transformed part at ``path``, as a path in the bigger model."""
    return ".".join(p for p in (path, site) if p)


def _weighted_terms(model: nn.Module, skip_zero: bool = False, amortised: bool = False,
                    counted: list[tuple[Manifest, int]] | None = None
                    ) -> list[tuple[PenaltyTerm, torch.Tensor, torch.dtype]]:
    """``(term, weight * value, dtype)`` of every term of the transformed ``model``: the weighted value in float32
    for half-precision weights, and the dtype to round it to (:func:`_weighted`); without the terms of weight 0 when
    ``skip_zero``. ``amortised``: one call of the training loss, which, on a model in training mode, evaluates only
    the terms due at this call (:func:`_due_terms`) and counts it, once every term is computed: a call that raises
    (a lazy layer that has not run) is no call of the period, so the run that calls again after the fix keeps the
    uninterrupted schedule.
    With ``counted`` the count is not stored but appended to it, ``(manifest, new count)``, for the caller to
    store once all the parts it sums are computed (:func:`penalty` of a bigger model)."""
    root = unwrap_model(model)
    reference = _first_float_parameter(root)
    manifest = manifest_of(model)
    # a deep copy of a transformed model (with its optimizer: copies keep no hooks) is registered here, at the
    # penalty every training step adds, so that stepping it without orthofx.attach warns too
    watch_hooked_weights(root, manifest.optimizer_hooks)
    terms = manifest.penalties
    # a model in eval mode is validated, not trained: its penalty (logged with gradients enabled, say) must not move
    # the training schedule, as a JacobianProbe in eval mode makes no estimate and counts no step
    period = manifest.penalty_period() if amortised and root.training else 1
    if amortised and not root.training:
        _warn_eval_mode_training(manifest)
    count = None
    if period > 1:
        terms, count = _due_terms(manifest, period)
    weighted = [(t, *_weighted(t.weight, *_term_value(root, t, reference))) for t in terms
                if not (skip_zero and t.weight == 0.0)]
    if count is not None:
        if counted is None:
            manifest.penalty_calls = count
        else:
            counted.append((manifest, count))
    return weighted


def _warn_eval_mode_training(manifest: Manifest) -> None:
    """Warn where a penalty with gradients on a model in eval mode evaluates terms with ``every = k > 1`` at every
    call: a validation pass that logs it is not counted (as a probe's eval-mode call is not), but a loss trained
    on in eval mode (fine-tuning with frozen normalisation) would then carry those terms ``k`` times as strongly as
    the training schedule does, at ``k`` times the cost."""
    if torch.compiler.is_compiling() or manifest.penalty_period() == 1:
        return
    warnings.warn(
        "orthofx.penalty: the model is in eval mode with gradients enabled, so every term is evaluated at its weight "
        "and no call of 'every' is counted (a validation pass); trained on, the terms with every: k > 1 weigh k "
        "times their training-mode average. To train with frozen BatchNorm / Dropout keep the model in training "
        "mode and call .eval() on those layers only; to log a validation penalty, compute it under "
        "torch.no_grad()", OrthofxWarning, stacklevel=caller_stacklevel())


#: Key of a transformed model's records (with its manifest's id) for checkpointing's recomputation: the call of
#: the ``every`` periods each ``penalty`` call evaluated.
_PENALTY_RECORD = "orthofx.penalty call"


def _due_terms(manifest: Manifest, period: int) -> tuple[list[PenaltyTerm], int | None]:
    """The terms this call of the training penalty evaluates, and the count after it (``None``: the call counts
    nothing), which the caller stores once the terms are computed: a term with ``every = k`` is due at the calls
    ``c`` with ``c % k == term.phase``; a term with ``every = 1`` at every call. ``period``:
    ``manifest.penalty_period()``.

    The count is kept modulo the terms' common period: under torch.compile it is a guarded constant, so a bounded
    count gives one graph per call of the period instead of a recompilation at each step.

    Activation checkpointing's non-reentrant recomputation of a forward that called ``penalty`` (inside
    backward) is that call again, not a new one: it evaluates the terms that call evaluated and counts nothing, so
    that it saves the tensors the forward saved (torch raises a CheckpointError otherwise). The forward records its
    call for its own region (:func:`~orthofx.nn.tracing.record_for_recomputation`), so several checkpointed
    forwards before one backward (micro-batches summed), recomputed in any order, each replay their own call. A
    region whose forward ran inside another's recomputation (nested checkpoints) has no record: it replays the last
    call counted. The reentrant recomputation is counted: its forward ran without gradients, which counted
    nothing."""
    key = (_PENALTY_RECORD, id(manifest))
    region = checkpoint_region()
    if region is not None and recomputing_in_backward():
        # a non-reentrant recomputation, or the forward of a region nested in one: no new call
        call = recorded_for_recomputation(key)
        if call is NOT_RECORDED:
            call = (manifest.penalty_calls - 1) % period
        count = None
    else:
        call = manifest.penalty_calls % period
        count = (call + 1) % period
    record_for_recomputation(key, call, region)  # for a region's recomputation (nothing outside a region's forward)
    return [t for t in manifest.penalties if call % t.every == t.phase], count


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


def _weighted(weight: float, value: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.dtype]:
    """``(weight * value, dtype)`` with the product in float32 at least (a term's ``value`` is float32 already where
    its weights are half precision: :func:`_term_value`), so that it is rounded once, to ``dtype``, by the caller
    (after the sum, for :func:`penalty`)."""
    return weight * (value.float() if value.dtype in HALF_PRECISION else value), dtype


def _term_value(root: nn.Module, term: PenaltyTerm,
                reference: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.dtype]:
    """``term``'s unweighted value and the dtype of its weighted value
    (:meth:`~orthofx.passes.base.PenaltyTerm.full_precision_value`: float32 and the weights' dtype for
    half-precision weights); a lazy layer that has not run is refused with the fix, not torch's error.
    Looked for only when the term fails: penalty runs at every training step, and a layer stays initialised.

    Computed with autocast off for ``reference``'s device (:func:`~orthofx.nn.precision.autocast_off`): the usual
    training step evaluates ``criterion(gm(x), y) + orthofx.penalty(gm)`` inside ``torch.autocast``, which would
    run a term's convolutions and products in bfloat16 / float16. Each term measures a small defect ``W^T W - I``
    of a near-orthogonal weight, which those 8 or 11 bits cannot resolve (a conv L_orth's gradient came out 25%
    off); the terms are tiny next to the forward, so they run in the weights' own dtype (float32 for
    half-precision weights, rounded once after weighting: module docs)."""
    try:
        if reference is None:
            return _evaluated(root, term)
        with autocast_off(reference):
            return _evaluated(root, term)
    except Exception as exc:
        lazy = lazy_site_module(root, term)
        if lazy is None:
            raise
        raise ArgumentError(f"site '{term.site}' (rule '{term.rule}'): {type(lazy).__name__} is a lazy layer that "
                            "has not run yet, so its weight has no values to penalise. Run the model once "
                            "(gm(x)) before orthofx.penalty, or pass example_inputs=(x,) to orthofx.transform"
                            ) from exc


def _evaluated(root: nn.Module, term: PenaltyTerm) -> tuple[torch.Tensor, torch.dtype]:
    """``(value, dtype)`` of ``term``: its :meth:`~orthofx.passes.base.PenaltyTerm.full_precision_value`, unless
    its class overrides :meth:`~orthofx.passes.base.PenaltyTerm.value` below the class that defines that (a
    subclass of ``LorthTerm`` changing ``value``, the documented hook, was silently ignored): its ``value`` then,
    and that value's dtype."""
    if term.value_overridden:  # PenaltyTerm.__init_subclass__
        value = term.value(root)
        return value, value.dtype
    return term.full_precision_value(root)


def penalty_terms(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each term's weighted value, keyed ``"<rule>/<site>"`` (for logging which layers dominate): every term at its
    own weight, also one with ``every > 1``, and no call counted (module docs). For a model not
    transformed itself: the terms of the transformed models it holds, keyed ``"<rule>/<path>.<site>"``, and for
    each JacobianProbe outside them ``"JacobianProbe/<module path>"``: ``probe.penalty()``, or a zero like the
    probe's parameters when it has no current estimate (module docs).

    Example::

        import torch, orthofx
        model = orthofx.models.get("small_cnn")
        gm = orthofx.transform(model, "lorth")
        terms = orthofx.penalty_terms(gm)    # {'lorth/conv1': tensor(...), ...}
        torch.testing.assert_close(sum(terms.values()), orthofx.penalty(gm))
    """
    if is_transformed(model):
        return {f"{t.rule}/{t.site}": value.to(dtype) for t, value, dtype in _weighted_terms(model)}
    parts, probes = _untransformed_sources(model)
    terms = {f"{t.rule}/{part_site_path(path, t.site)}": value.to(dtype)
             for path, part in parts for t, value, dtype in _weighted_terms(part)}
    terms.update({f"JacobianProbe/{name}": probe.penalty() for name, probe in probes})
    return terms


def penalty(model: nn.Module) -> torch.Tensor:
    """Sum of all weighted regularisers attached by the policy (for a model not transformed itself: those of the
    transformed models it holds, plus the ``penalty()`` of its JacobianProbes outside them; module docs); a zero
    scalar (in the dtype and on the device of the model's parameters) when there are none or all have weight 0.
    Inside ``torch.autocast`` the terms still run in the weights' dtype (autocast is switched off for them).

    With gradients enabled each call on a model in training mode is one training step for the terms with
    ``every = k > 1``: only those due at this call are evaluated (at ``1 / k`` of their cost); under
    ``torch.no_grad()`` or in eval mode every term counts and no call is counted (module docs). Call it after the
    forward: a Jacobian term is the estimate of the last training-mode forward (module docs).

    Example::

        import torch, orthofx
        model = orthofx.models.get("small_cnn")
        x, y = orthofx.models.example_input("small_cnn", batch=8), torch.randint(0, 10, (8,))
        gm = orthofx.transform(model, "lorth")
        loss = torch.nn.functional.cross_entropy(gm(x), y) + orthofx.penalty(gm)
        loss.backward()
    """
    root = unwrap_model(model)
    amortised = torch.is_grad_enabled()  # a training loss: terms with every > 1 are due on some calls only
    if is_transformed(model):
        weighted = [(value, dtype) for _, value, dtype in _weighted_terms(model, skip_zero=True, amortised=amortised)]
    else:
        parts, probes = _untransformed_sources(model)
        counted: list[tuple[Manifest, int]] = []  # stored once every part's terms are computed: one call for all
        weighted = [(value, dtype) for _, part in parts
                    for _, value, dtype in _weighted_terms(part, skip_zero=True, amortised=amortised, counted=counted)]
        weighted += [_weighted(probe.penalty_weight, *probe._estimate_and_dtype()) for _, probe in probes
                     if probe.estimate is not None and probe.penalty_weight != 0.0]
        for manifest, count in counted:
            manifest.penalty_calls = count
    if not weighted:
        return zero_like_parameters(root)
    if in_func_transform():
        _warn_constant_under_transform(root)
    return _rounded_sum(weighted)


def _rounded_sum(weighted: list[tuple[torch.Tensor, torch.dtype]]) -> torch.Tensor:
    """The sum of the weighted terms (each at least float32: :func:`_weighted`), rounded once to the dtype their
    values have (the promotion of the ``dtype`` s: a float16 model's penalty is float16)."""
    values = [value for value, _ in weighted]
    total = sum(values[1:], values[0])
    return total.to(functools.reduce(torch.promote_types, [dtype for _, dtype in weighted]))


def _differentiating_transform() -> bool:
    """Whether a ``torch.func`` transform that differentiates (``grad``, ``vjp``, ``jacrev``: a Grad level;
    ``jvp``, ``jacfwd``: a Jvp level) runs this call, at any level of the transform stack."""
    kinds = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)
    return any(level.key() in kinds for level in torch._C._functorch.get_interpreter_stack() or ())


def _warn_constant_under_transform(root: nn.Module) -> None:
    """Warn when ``penalty`` runs inside a differentiating ``torch.func`` transform on the model's own parameters:
    ``grad(lambda p: loss(functional_call(gm, p, (x,))) + orthofx.penalty(gm))(params)`` (MAML, per-sample
    gradients) evaluates the penalty outside the ``functional_call``, on the parameters the model holds, not on
    the tensors ``p`` it substituted during the call, so the penalty is a constant to the transform and its
    gradient is silently missing from the result. Inside the call (a module whose forward returns the loss plus
    ``orthofx.penalty``) the parameters are the transform's wrapped tensors, and nothing is said."""
    if not _differentiating_transform():
        return
    if any(torch._C._functorch.is_functorch_wrapped_tensor(p) for p in root.parameters()):
        return
    warnings.warn(
        f"orthofx.penalty ran inside a torch.func transform that differentiates (grad, vjp, jacrev, jvp ...) on the "
        f"parameters {type(root).__name__} holds, none of which the transform sees: called outside "
        f"torch.func.functional_call, it does not read the tensors functional_call substituted, so it is a "
        f"constant there and its gradient is missing from the transform's result. Compute it inside the call: a "
        f"module whose forward returns the loss plus orthofx.penalty (e.g. forward(self, x): return "
        f"criterion(self.gm(x), y) + orthofx.penalty(self.gm)), given to functional_call with the parameters "
        f"prefixed by its attribute ('gm.'). (A transform differentiating only inputs loses nothing: the "
        f"penalty does not depend on them.)", OrthofxWarning, stacklevel=caller_stacklevel())
