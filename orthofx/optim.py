"""``attach(optimizer, gm)``: run the optimizer hooks that passes recorded (Riemannian updates, NOG, OLR).

    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
    handle = orthofx.attach(optimizer, gm)
    ...
    loss.backward(); optimizer.step()      # the hooks run inside step()
    handle.remove()                         # detach again

The hooks are registered with ``Optimizer.register_step_pre_hook`` / ``register_step_post_hook``, so they run in
``optimizer.step()`` after gradients are final (after DDP's all-reduce) and need no change to the training loop.
With ``optimizer.step(closure)`` the gradients are computed inside the step, so the "before" hooks run right
after the closure's first evaluation (``attach`` wraps the closure), not before the step.
The hooks run with autocast switched off, so that an ``optimizer.step()`` inside a ``torch.autocast`` block computes
them, like torch's own updates, as it would outside it.
If the step raises (in the optimizer or in a hook), the "after" hooks still run before the exception propagates,
so that what the "before" hooks changed is undone (OLR's lr); torch skips post-hooks then, so ``attach`` also wraps
``optimizer.step`` on the instance (as torch's LR schedulers do; ``handle.remove()`` unwraps it).
A hook class may define classmethods ``before_step_group(hooks, root, optimizer)`` and
``after_step_group(hooks, root, optimizer)``: ``attach`` then hands it all its hooks at once, so that it can batch
their work (the Riemannian hooks retract all same-shaped weights in one batched call). An optional classmethod
``attach_warning(hooks, parts, optimizer)`` returns the text of a warning (or None) about all the hooks of its class
in every attached part (``parts``: each hook's part path): ``attach`` gives it once per call, not once per part
(the Riemannian hooks' warning about LBFGS with ``max_iter > 1``). An optional method ``check_added(root,
optimizer)`` runs before ``check`` for a hook activated inside a step (its weight, frozen at ``attach``, added to the
optimizer since): it refuses what ``setup`` may do at ``attach`` but not inside ``step()`` (OLR splitting a group).

A model that ``orthofx.transform`` did not return but that holds transformed models (a transformed backbone inside
a bigger model: :func:`orthofx.penalty.transformed_parts`) gets the hooks of every such part, each run on its part
as ``attach(optimizer, part)`` would run them; one handle removes them all.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import types
import warnings
import weakref

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .capture import unwrap_model
from .errors import ArgumentError, OrthofxError, OrthofxWarning, caller_stacklevel
from .nn.precision import HALF_PRECISION, autocast_enabled
from .passes.base import (count_attached_step, first_warning_outside, hooked_weight, mark_attached, mark_released,
                          refuse_fsdp1, watch_hooked_weights, whole, write_whole)
from .passes.pre_svd import pending_learning_rates
from .passes.riemannian import StiefelHook, is_zero_redundancy
from .penalty import averaged_copies, part_site_path, trained_parts, transformed_parts
from .transform import is_transformed, manifest_of

__all__ = ["attach", "AttachHandle", "project_stiefel_weights"]


_ATTACHMENT_KEYS = itertools.count()


class AttachHandle:
    """What :func:`attach` returns: the hooks it registered (``hooks``) and those it left out (``skipped``);
    :meth:`remove` unregisters them.

    Example::

        import torch, orthofx
        gm = orthofx.transform(torch.nn.Sequential(torch.nn.Linear(8, 8)), "isometric")
        optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
        handle = orthofx.attach(optimizer, gm)
        print(handle)               # AttachHandle(1 hook(s): [...])
        handle.remove()             # the optimizer steps as plain SGD again
        orthofx.attach(optimizer, gm)   # and may be attached again
    """

    def __init__(self, optimizer: torch.optim.Optimizer, hooks: list, handles: list, skipped: list | None = None,
                 roots: list | None = None):
        self.optimizer = optimizer
        self._roots = [weakref.ref(root) for root in roots or ()]  # the models attached (see remove)
        # the key of this attachment in the optimizer's registry: a number, not id(self), which a handle created
        # after this one is dropped (without remove(): its hooks stay) may reuse, overwriting its entry
        self._key = next(_ATTACHMENT_KEYS)
        self.hooks = hooks
        #: hooks left out because their parameters are frozen and not in the optimizer (see :func:`attach`); one
        #: whose parameters are added to the optimizer later (``add_param_group`` when unfreezing) moves to
        #: ``hooks`` at the next step (attach's step hooks update these two lists in place)
        self.skipped = [] if skipped is None else skipped
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.optimizer.__dict__.get("_orthofx_attached", {}).pop(self._key, None)
        for reference in self._roots:  # their weights stepped by other optimizers from now on: deliberate
            root = reference()
            if root is not None:
                mark_released(root)

    def __repr__(self) -> str:
        return f"AttachHandle({len(self.hooks)} hook(s): {self.hooks!r})"


class _StepGuard:
    """Wraps ``optimizer.step`` on the instance so that ``finish(optimizer)`` runs when the step ends, also when it
    raises (torch then skips the post-hooks). The wrapper is bound to a weak reference to the optimizer (no
    reference cycle) and also works rebound to the optimizer itself (what an LR scheduler created later does).
    :meth:`remove` unwraps it unless something wrapped the step after it; it then stays in the chain, and
    ``finish`` must be a no-op once the hooks are removed."""

    def __init__(self, optimizer: torch.optim.Optimizer, finish):
        self._optimizer = optimizer
        own = self._own = optimizer.__dict__.get("step")  # an instance-level step already there, or None

        def step(owner, *args, **kwargs):
            opt = owner() if isinstance(owner, weakref.ref) else owner
            try:
                return type(opt).step(opt, *args, **kwargs) if own is None else own(*args, **kwargs)
            finally:
                finish(opt)

        # name, docstring, signature and markers of the wrapped step (an LR scheduler checks its own marker)
        functools.update_wrapper(step, type(optimizer).step if own is None else own)
        self._step = types.MethodType(step, weakref.ref(optimizer))
        optimizer.step = self._step

    def remove(self) -> None:
        if self._optimizer.__dict__.get("step") is self._step:
            if self._own is None:
                del self._optimizer.step
            else:
                self._optimizer.step = self._own


#: The device types whose autocast the hooks switch off where it is on (``autocast_enabled`` skips the ones this build
#: of torch has no autocast for).
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "mtia", "maia", "ipu", "privateuseone")


@contextlib.contextmanager
def _autocast_off():
    """Autocast switched off, for every device type where it is on, while the hooks run. ``optimizer.step()``
    inside a ``torch.autocast`` block (a whole training step in one ``with``) leaves torch's optimizers as they are
    (their updates use no autocast op) but ran the hooks' matrix products in bfloat16 / float16: a Riemannian step
    of a float32 weight was 5e-4 off P1's (1e-7 outside autocast) and its transported momentum 2e-2 off the tangent
    space."""
    with contextlib.ExitStack() as stack:
        for device in _AUTOCAST_DEVICE_TYPES:
            if autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


def _run_eagerly(function):
    """``function`` outside any torch.compile graph (``torch.compiler.disable``): dynamo stops its graph before the
    call and resumes after it, and ``function`` runs as plain Python, once per call, as it would without compile."""
    return torch.compiler.disable(function, recursive=True)


def _unscale_for_hooks(optimizer: torch.optim.Optimizer, parts: list[_PartHooks]) -> None:
    """Unscale the gradients a ``GradScaler`` left scaled for a fused optimizer, where the hooks of ``parts`` (each
    the hooks of one attached transformed model) could not act on them scaled.

    For optimizers whose kernels unscale (``fused=True``), ``GradScaler.step`` does not unscale the gradients
    first: it sets ``optimizer.grad_scale`` and the kernel divides by it, in float32 for half-precision gradients.
    Where no gradient is half precision, all are divided here (exact, for the power-of-two scales ``GradScaler``
    uses) and the kernel is left nothing to undo (``grad_scale`` None; ``found_inf`` still skips a step with
    non-finite gradients): the hooks see the true gradients, as without a fused optimizer.

    Where one is, no gradient is divided in place (float32 ones stay scaled too, for the kernel): a float16 gradient
    of 2^16 G divided in place stores ``G``, whose entries below 2^-24 flush to zero and below 2^-14 lose bits (an
    8 x 8 Riemannian layer trained by fused Adam on a loss of size 1e-6 stepped 7e-3 off the float64 step of 1e-2, now
    3e-4, the float16 rounding of the weight; NOG's polar factor was 9 % off, and an OLR weight's gradient, divided
    for OLR and multiplied back, 3 % off the one plain torch steps by). The kernel keeps ``grad_scale`` and unscales
    in float32, as it does without orthofx, and the hooks act on the scaled gradients, each knowing how:

    * a hook whose class sets ``gradient_linear`` (the Riemannian projection, ``P_W(s G) = s P_W(G)``) acts on
      the scaled gradient, unless ``||s G||_F`` exceeds half the dtype's range, where the projection's result
      could overflow (``||P_W(X)||_F <= ||X||_F``): then every gradient is divided here as for float32;
    * a hook of any other class (a user's pass) gets true gradients: every gradient is divided here, as for
      float32 (:func:`_hooks_take_scaled_gradients`);
    * NOG and OLR read ``optimizer.grad_scale`` (:func:`orthofx.passes.pre_svd._gradient_scale`): NOG's polar
      factor does not depend on the scale and is written back times it (or, where that overflows, every other
      gradient is divided instead: :func:`_rescale_after_hooks`); OLR divides the gradient by it in float64.
    """
    scale = getattr(optimizer, "grad_scale", None)
    if scale is None:
        return
    half = any(p.grad is not None and p.grad.dtype in HALF_PRECISION
               for group in optimizer.param_groups for p in group["params"])
    if not (half and _hooks_take_scaled_gradients(parts) and _scaled_projections_fit(parts)):
        _divide_all(optimizer, scale)


def _hooks_take_scaled_gradients(parts: list[_PartHooks]) -> bool:
    """Whether every hook of ``parts`` can act on gradients still scaled by ``optimizer.grad_scale``: it reads the
    scale itself or is linear in the gradient (``OptimizerHook.reads_grad_scale`` / ``gradient_linear``). A hook of
    a user's pass that declares neither would see the gradients times the scale (2^16 by default)."""
    return all(getattr(type(hook), "reads_grad_scale", False) or getattr(type(hook), "gradient_linear", False)
               for part in parts for hook in part.hooks)


def _divide_all(optimizer: torch.optim.Optimizer, scale, keep: tuple = ()) -> None:
    """Divide every gradient but those in ``keep`` (ids) by ``scale`` in place; the kernel then unscales nothing."""
    with torch.no_grad():
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and id(p.grad) not in keep:
                    p.grad.div_(scale.to(p.grad.device) if isinstance(scale, torch.Tensor) else scale)
    optimizer.grad_scale = None


def _scaled_projections_fit(parts: list[_PartHooks]) -> bool:
    """Whether every half-precision gradient a ``gradient_linear`` hook of ``parts`` projects is small enough to be
    projected still scaled (:func:`_unscale_for_hooks`): ``False`` where one is too large or non-finite. One host
    read of those gradients' norms, none without linear hooks."""
    norms = []
    seen: set[int] = set()
    for part in parts:
        for hook in part.hooks:
            if not getattr(type(hook), "gradient_linear", False):
                continue
            module = part.root.get_submodule(hook.site)
            for name in hook.parameter_names:
                grad = getattr(getattr(module, name, None), "grad", None)
                if (isinstance(grad, torch.Tensor) and grad.dtype in HALF_PRECISION and not grad.is_sparse
                        and id(grad) not in seen):
                    seen.add(id(grad))
                    limit = torch.finfo(grad.dtype).max / 2
                    # whole: the norm of a sharded (FSDP2) gradient is that of the whole matrix the hook projects
                    norms.append(torch.linalg.vector_norm(whole(grad), dtype=torch.float32) / limit)
    # a NaN or inf norm compares False: divided here, as before
    return not norms or bool(torch.stack([n.to(norms[0].device) for n in norms]).max() <= 1.0)


def _rescale_after_hooks(optimizer: torch.optim.Optimizer, grads: list[torch.Tensor],
                         valid: torch.Tensor | None = None) -> None:
    """Multiply ``grads`` (a hook's results in true units, such as NOG's polar factor, written while the other
    gradients stay scaled: :func:`_unscale_for_hooks`) by the ``grad_scale`` the fused kernel will divide them by.
    Where a result times the scale overflows its dtype, the other gradients are divided instead and the kernel
    unscales nothing. ``valid``: a 0-d bool tensor, false where the hook left ``grads`` as they were (then nothing
    is done), read on the host with the products' check (one device sync for both)."""
    scale = getattr(optimizer, "grad_scale", None)
    if scale is None or not grads:
        return
    with torch.no_grad():
        # out of place: the gradients stay as they are until every product is known finite (float() of a float32
        # gradient is the gradient itself, which mul_ scaled before a failed check left it so); half precision
        # multiplies in float32, the others in their own dtype
        scaled = [(g.float() if g.dtype in HALF_PRECISION else g)
                  .mul(scale.to(g.device) if isinstance(scale, torch.Tensor) else scale).to(g.dtype) for g in grads]
        finite = torch.stack([torch.isfinite(t).all().to(scaled[0].device) for t in scaled]).all()
        if valid is not None:
            valid, finite = torch.stack((valid.to(finite.device), finite)).tolist()
            if not valid:
                return
        if bool(finite):
            for g, t in zip(grads, scaled):
                g.copy_(t)
            return
    _divide_all(optimizer, scale, keep=tuple(id(g) for g in grads))


def _step_will_be_skipped(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a ``GradScaler`` found inf/NaN gradients for this step of a fused optimizer.

    For optimizers whose kernels unscale (``fused=True``) ``GradScaler.step`` does not skip ``optimizer.step()``
    itself: it sets ``optimizer.found_inf`` and the kernel leaves parameters and state alone when it is non-zero.
    The hooks must then do nothing either: a Riemannian hook would write NaN projections into the gradients and
    re-retract (move by rounding) the unchanged weight and its momentum, where the step without fused kernels
    (which ``GradScaler`` skips entirely) leaves all of them bitwise as they were. One host sync per step, as
    ``GradScaler`` itself makes for non-fused optimizers.
    """
    found_inf = getattr(optimizer, "found_inf", None)
    return isinstance(found_inf, torch.Tensor) and bool(found_inf.ne(0).any())


def _warn_unfrozen_left_out(optimizer: torch.optim.Optimizer, part: _PartHooks, hook) -> None:
    """The warning of :func:`attach`'s step for a weight frozen at attach, unfrozen since, that the attached
    optimizer does not hold."""
    treatment = getattr(hook, "treatment", None) or type(hook).__name__
    warnings.warn(
        f"site '{part.site(hook)}' (rule '{hook.rule}'): the weight(s) {list(hook.parameter_names)} were frozen when "
        f"orthofx.attach attached this {type(optimizer).__name__}, which does not hold them, so their orthofx hook "
        f"({treatment}) was skipped; they are trainable now and got a gradient, but the hook runs only once this "
        "optimizer holds them. Another optimizer stepping them trains them as plain parameters (a Riemannian weight "
        "leaves the Stiefel manifold, a NOG one steps by its raw gradient). Give them to the attached optimizer, in "
        f"a param group of their own for their own lr: optimizer.add_param_group({{'params': [gm.get_submodule("
        f"{part.site(hook)!r}).{hook.parameter_names[0]}], 'lr': ...}}); the hook runs from the next step on",
        OrthofxWarning, stacklevel=caller_stacklevel(skip_torch=True))


def _frozen(parameter) -> bool:
    return isinstance(parameter, torch.Tensor) and not parameter.requires_grad


def _optimizer_parameters(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


# transform(..., inplace=True) sets the layers a pass replaced (orthogonal_conv's OrthogonalConv2d, ConvNorm, ...) in
# the user's model too, and an optimizer built before the transform holds the replaced layer's parameters: read by no
# forward any more, or kept inside the new layer (ConvNorm's conv) beside parameters of its own (its affine part).
# _REPLACED_PARAMETERS: each parameter of a replaced layer -> a weak reference to the layer now in its place;
# _FORMER_PARAMETERS: that layer -> the ids of the replaced layer's parameters. Weak: the registries keep nothing
# alive, and gm (its pickling, deepcopy, torch.save) holds nothing of them.
_REPLACED_PARAMETERS = WeakIdKeyDictionary()
_FORMER_PARAMETERS = WeakIdKeyDictionary()


def note_replaced_layer(old: nn.Module, new: nn.Module) -> None:
    """Record that a pass put ``new`` in place of ``old`` (the model's own layer with ``transform(..., inplace=True)``)
    for :func:`attach` to warn about an optimizer that holds ``old``'s parameters and none of ``new``'s own
    (:func:`_stale_replaced_layers`)."""
    former = frozenset(id(p) for p in old.parameters())
    if not former:
        return
    _FORMER_PARAMETERS[new] = former
    for parameter in old.parameters():
        # the first replacement names the layer: a later one wraps it whole (a Jacobian probe around a block holding
        # a ConvNorm layer, a second transform), which has no parameters of its own to miss
        known = _REPLACED_PARAMETERS.get(parameter)
        if known is None or known() is None:  # a layer swapped back by the user and replaced again: a new record
            _REPLACED_PARAMETERS[parameter] = weakref.ref(new)


def _stale_replaced_layers(parts: list[_PartHooks], optimizer: torch.optim.Optimizer, owned: set[int]) -> list[str]:
    """The layers (``'path' (now Type)``) that ``transform(..., inplace=True)`` put in place of layers whose
    parameters ``optimizer`` holds (``owned``: their ids, :func:`_optimizer_parameters`), when it holds none of the
    trainable parameters a new layer has of its own: an optimizer built before the transform, whose steps never
    update them (the model's other layers, shared, train: nothing else tells)."""
    layers: dict[int, nn.Module] = {}  # id -> a layer in place of one whose parameters the optimizer holds
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            layer = _REPLACED_PARAMETERS.get(parameter)
            layer = layer() if layer is not None else None
            if layer is not None:
                layers[id(layer)] = layer
    if not layers:
        return []
    stale: list[str] = []
    for part in parts:
        for path, module in part.root.named_modules():
            if id(module) not in layers:
                continue
            del layers[id(module)]  # one site, named by its first path (in the first part holding it)
            former = _FORMER_PARAMETERS.get(module, frozenset())
            own = [p for p in module.parameters() if p.requires_grad and id(p) not in former]
            if own and not any(id(p) in owned for p in own):
                stale.append(f"'{part_site_path(part.path, path)}' (now {type(module).__name__})")
    return stale


def _replaced_layers_text(stale: list[str]) -> str:
    return (f"the optimizer holds parameters of layer(s) that orthofx.transform(..., inplace=True) replaced: "
            f"{', '.join(stale)}, and none of the new layers' own parameters, which its steps never update. "
            "inplace=True keeps the model's own parameters only in the layers no rule replaces (orthogonal_conv and "
            "the 'orthogonal' preset replace them, ConvNorm adds its affine part)")


def _missing_parameters(hook, root: nn.Module, owned: set[int]) -> list[str]:
    """The names of ``hook``'s parameters that the optimizer (its parameters' ids: ``owned``) does not hold."""
    module = root.get_submodule(hook.site)
    # hooked_weight: refused where pruned / parametrized since transform (the optimizer holds what computes it)
    weights = {name: hooked_weight(module, name, lambda: f"site '{hook.site}' (rule '{hook.rule}')")
               if hasattr(module, name) else None for name in hook.parameter_names}
    return [name for name, weight in weights.items() if id(weight) not in owned]


def _not_optimised_message(site: str, hook, missing: list[str], holds_any: bool) -> str:
    """Why ``attach`` refuses an optimizer that leaves out a trainable parameter a hook acts on, and the fix.
    ``site``: the hook's site as the attached model names it; ``holds_any``: whether the optimizer holds any of the
    parameters the hooks act on. An optimizer holding none of them is most often the second optimizer of a split
    (one for the orthogonal weights, one for the rest), which needs no attach at all."""
    where = f"site '{site}' (rule '{hook.rule}'): its parameter(s) {missing} are not optimised by this optimizer"
    if not holds_any:
        return (f"{where}, which holds none of the parameters orthofx's optimizer hooks act on: attach the "
                "optimizer that optimises them (with several optimizers, an optimizer for the other parameters "
                "needs no attach), or build the optimizer from gm.parameters()")
    return (f"{where}; build the optimizer from gm.parameters() before calling orthofx.attach (a frozen "
            "parameter, requires_grad=False, may be left out). All the hooked parameters must be in the one "
            "attached optimizer: with several optimizers, give the hooked weights to one of them and attach that one, "
            "or, for a model of several transformed parts with an optimizer each (a GAN's generator and "
            "discriminator), attach each optimizer to its own part (orthofx.attach(optimizer_g, model.G))")


def _batches(hooks: list) -> list[tuple[type | None, list]]:
    """The hooks as ``(class, hooks)`` batches: a hook class with ``before_step_group`` / ``after_step_group``
    classmethods (e.g. ``StiefelHook``, which stacks same-shaped weights into one batched retraction) gets all its
    hooks in one batch, at the place of its first hook; any other hook is a batch of one, ``(None, [hook])``, run
    through its own ``before_step`` / ``after_step``. Hooks of one class act on different parameters, so running
    them together changes no result."""
    batches: list[tuple[type | None, list]] = []
    grouped: dict[type, list] = {}
    for hook in hooks:
        cls = type(hook)
        if callable(getattr(cls, "before_step_group", None)) and callable(getattr(cls, "after_step_group", None)):
            if cls not in grouped:
                grouped[cls] = []
                batches.append((cls, grouped[cls]))
            grouped[cls].append(hook)
        else:
            batches.append((None, [hook]))
    return batches


def _attach_warnings(checked: list[tuple[_PartHooks, list]], optimizer: torch.optim.Optimizer, given: set[type],
                     stacklevel: int) -> None:
    """Give the ``attach_warning`` of each hook class among ``checked`` (``(part, hooks)`` pairs: the hooks just
    checked, of every part) once for all the parts together, unless ``given`` (the classes already warned about by
    this attach call) holds the class: a model holding several transformed parts gets one warning per attach."""
    by_class: dict[type, tuple[list, list[str]]] = {}
    for part, hooks in checked:
        for hook in hooks:
            cls = type(hook)
            if cls not in given and callable(getattr(cls, "attach_warning", None)):
                found, paths = by_class.setdefault(cls, ([], []))
                found.append(hook)
                paths.append(part.path)
    for cls, (found, paths) in by_class.items():
        text = cls.attach_warning(found, paths, optimizer)
        if text:
            given.add(cls)
            warnings.warn(text, OrthofxWarning, stacklevel=stacklevel + 1)


class _PartHooks:
    """The optimizer hooks of one transformed model that an ``attach`` serves: the attached model itself (``path``
    ""), or a transformed part of it at ``path`` (:func:`orthofx.penalty.transformed_parts`). ``root`` is that
    transformed model without its wrappers: its hooks find their parameters there by site, exactly as
    ``attach(optimizer, part)`` would run them. ``hooks`` run at every step, in ``batches``; ``skipped`` wait until
    their frozen parameters are added to the optimizer (:meth:`activate`)."""

    def __init__(self, path: str, model: nn.Module):
        self.path = path
        self.root = unwrap_model(model)
        self.recorded = list(manifest_of(model).optimizer_hooks)
        self.hooks: list = []
        self.skipped: list = []
        self.batches: list[tuple[type | None, list]] = []
        self._position = {id(hook): i for i, hook in enumerate(self.recorded)}

    def site(self, hook) -> str:
        """``hook``'s site as the attached model names it (the part's path in front)."""
        return part_site_path(self.path, hook.site)

    def holds_any(self, owned: set[int]) -> bool:
        """Whether the optimizer (its parameters' ids: ``owned``) holds a parameter some hook of this part acts on."""
        return any(len(_missing_parameters(h, self.root, owned)) < len(h.parameter_names) for h in self.recorded)

    def sort_out(self, owned: set[int], holds_any) -> None:
        """Split the recorded hooks into ``hooks`` and ``skipped`` (every parameter frozen and not in the optimizer:
        no step changes it, which is the usual fine-tuning optimizer); refuse an FSDP1 parameter and a trainable
        parameter the optimizer leaves out (``holds_any()``: whether it holds any hooked parameter of the model)."""
        for hook in self.recorded:
            module = self.root.get_submodule(hook.site)
            for name in hook.parameter_names:
                parameter = getattr(module, name, None)
                if isinstance(parameter, torch.Tensor):
                    refuse_fsdp1(parameter, f"site '{self.site(hook)}' (rule '{hook.rule}'): {type(hook).__name__}")
            missing = _missing_parameters(hook, self.root, owned)
            if missing and len(missing) == len(hook.parameter_names) and all(
                    _frozen(getattr(module, name, None)) for name in missing):
                self.skipped.append(hook)  # until the weight is added to the optimizer: see activate
                continue
            if missing:
                raise ArgumentError(_not_optimised_message(self.site(hook), hook, missing, holds_any()))
            self.hooks.append(hook)
        self.batches = _batches(self.hooks)

    def check(self, optimizer: torch.optim.Optimizer, hooks: list, at_step: bool = False) -> None:
        """Each hook's ``check``; ``at_step``: the hooks are being activated inside ``optimizer.step()`` (their
        weights added since ``attach``), where a hook's optional ``check_added`` runs first: it refuses what
        ``setup`` may do at ``attach`` but not inside a step (OLR splitting a param group)."""
        for _, batch in _batches(hooks):
            for hook in batch:
                if at_step and callable(getattr(hook, "check_added", None)):
                    hook.check_added(self.root, optimizer)
                hook.check(self.root, optimizer)

    def setup(self, optimizer: torch.optim.Optimizer, hooks: list) -> None:
        for hook in hooks:
            hook.setup(self.root, optimizer)

    def added(self, owned: set[int]) -> list:
        """The skipped hooks whose parameters the optimizer (``owned``) now holds: a weight frozen at attach time,
        added since (``add_param_group`` when unfreezing layers), is trained from this step on."""
        return [hook for hook in self.skipped if not _missing_parameters(hook, self.root, owned)]

    def activate(self, added: list) -> None:
        """Move ``added`` (checked and set up) from ``skipped`` to ``hooks``, in the recorded order (NOG before OLR
        on one weight). In place: the handle's lists are rebuilt from these after each change."""
        self.skipped[:] = [hook for hook in self.skipped if all(hook is not a for a in added)]
        self.hooks.extend(added)
        self.hooks.sort(key=lambda hook: self._position[id(hook)])
        self.batches[:] = _batches(self.hooks)

    def run(self, optimizer: torch.optim.Optimizer, stage: str, errors: list[Exception] | None = None) -> None:
        """Run the hooks' ``stage`` ("before" / "after") work; a hook class with a ``<stage>_step_group``
        classmethod gets its hooks of this part at once. With ``errors`` (a list), a batch that raises does not
        stop the others: its exception is appended there for the caller to raise."""
        for cls, batch in self.batches:
            try:
                if cls is None:
                    getattr(batch[0], f"{stage}_step")(self.root, optimizer)
                else:
                    getattr(cls, f"{stage}_step_group")(batch, self.root, optimizer)
            except Exception as error:
                if errors is None:
                    raise
                errors.append(error)


def _attached_parts(model: nn.Module) -> list[_PartHooks]:
    """The transformed models whose hooks ``attach(optimizer, model)`` registers: ``model`` itself when
    ``orthofx.transform`` returned it, else its transformed parts (:func:`orthofx.penalty.transformed_parts`, which
    lists a part reached twice, bare and through a ``torch.compile`` wrapper, once: its hooks would run twice);
    raises :class:`~orthofx.OrthofxError` for a model holding none. A part inside an EMA / SWA copy
    (``torch.optim.swa_utils.AveragedModel``, :func:`orthofx.penalty.averaged_copies`) is left out: its weights
    are averages that ``update_parameters`` sets, which no optimizer steps."""
    if is_transformed(model):
        return [_PartHooks("", model)]
    parts = [_PartHooks(path, part) for path, part in trained_parts(model)]
    if not parts:
        name = type(unwrap_model(model)).__name__
        if transformed_parts(model):
            raise OrthofxError(f"{name} holds transformed models only inside averaged copies "
                               f"({', '.join(averaged_copies(model))}: "
                               "AveragedModel, an EMA or SWA of the trained weights), which no optimizer steps; "
                               "attach the optimizer to the model it trains (the one update_parameters reads)")
        raise OrthofxError(f"{name} was not produced by orthofx.transform and holds no "
                           "model it returned (a transformed part), so it has no optimizer hooks to attach; call "
                           "orthofx.transform(model, policy) first, or attach the optimizer to the transformed model")
    return parts


def _already_attached(parts: list[_PartHooks], optimizer: torch.optim.Optimizer) -> str | None:
    """Why ``attach`` refuses ``parts`` because the hooks of one of them are attached to ``optimizer`` already
    (directly or through a bigger model holding it: the updates would run twice); ``None`` when none is."""
    attached = [roots for roots in optimizer.__dict__.get("_orthofx_attached", {}).values()]
    for part in parts:
        if not any(id(part.root) in roots for roots in attached):
            continue
        if not part.path:
            return ("this model's hooks are already attached to this optimizer; call handle.remove() before "
                    "attaching again (an attach of a model holding it as a part attaches its hooks too)")
        return (f"the hooks of '{part.path}', a transformed part of this model, are already attached to this "
                "optimizer (by an attach of that part, or of another model holding it), and would run twice; call "
                "handle.remove() on that attachment before attaching again, or attach only one of the two")
    return None


def attach(optimizer: torch.optim.Optimizer, model: nn.Module) -> AttachHandle:
    """Register the optimizer hooks of a transformed model on ``optimizer``; returns a removable handle.

    Every parameter a hook acts on must be optimised by ``optimizer`` (matched by identity, so DDP and
    DataParallel name prefixes do not matter); otherwise :class:`orthofx.errors.ArgumentError` names the site.
    Only a frozen parameter (``requires_grad=False``) may be left out of the optimizer: no step changes it, so
    its hooks are skipped (listed in ``handle.skipped``) until it is added to the optimizer (``add_param_group``
    when unfreezing): from the next step on they run like the others (an OLR weight in a param group of its own:
    OLR splits a shared group at ``attach``, never inside a step, where it is refused). Such a weight unfrozen and
    given a gradient but not added (handed to an optimizer of its own, which would train it as a plain parameter,
    or to none) is warned about (:class:`~orthofx.OrthofxWarning`, once per weight) at the attached optimizer's next
    step; so is a Riemannian weight trainable at ``attach`` and taken out of its groups since (NOG and OLR refuse
    the step). With
    ``GradScaler`` and a fused optimizer, a step whose gradients hold inf/NaN (``optimizer.found_inf``, which the
    fused kernel skips) runs no hook either. Attaching the same model twice to one optimizer is an error (the
    updates would run twice). A model that ``orthofx.transform`` did not return but that holds
    transformed models (``nn.Sequential(gm, head)``, a wrapper with ``self.backbone = orthofx.transform(...)``) gets
    the hooks of each of them, run on it as ``attach(optimizer, part)`` would (``handle.hooks``' sites are relative
    to their part), except the copies inside an EMA / SWA ``torch.optim.swa_utils.AveragedModel``, which no
    optimizer steps; attaching a part that is attached already, directly or through another model, is refused too.
    An optimizer built before ``transform(..., inplace=True)`` replaced layers of the model (orthogonal_conv, the
    ``orthogonal`` preset, ConvNorm's affine part) that holds the replaced layers' parameters and none of the new
    layers' own gets an :class:`~orthofx.OrthofxWarning` naming them (build the optimizer from ``gm.parameters()``
    after the transform; another optimizer may train them).
    OLR moves each Pre-SVD weight into a parameter group of its own, so an
    optimizer state saved after ``attach`` loads (``optimizer.load_state_dict``) after ``attach``; create LR
    schedulers after ``attach`` too. A ``ZeroRedundancyOptimizer`` works (each rank's hooks see the whole
    all-reduced gradients and weights), except with ``overlap_with_ddp=True``, whose steps run inside DDP's
    communication hook instead of ``step()``: refused. Under ``torch.compile`` (of ``optimizer.step`` or of a
    whole training step, ``fullgraph=False``) the hooks run eagerly between the compiled graphs, with the eager
    results. Forgetting ``attach`` is not silent: the first ``step()`` of an optimizer that updates a hooked weight of
    a transformed model no optimizer was ever attached to gives an :class:`~orthofx.OrthofxWarning`
    (:func:`orthofx.passes.base.watch_hooked_weights`; also for a ``copy.deepcopy`` of an attached optimizer, which
    keeps no hooks).

    Example::

        import torch, orthofx
        gm = orthofx.transform(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8)),
                               "isometric")     # square linears: orthogonal init + Riemannian updates
        optimizer = torch.optim.Adam(gm.parameters(), lr=1e-2)
        orthofx.attach(optimizer, gm)           # the hooks run inside optimizer.step()
        for _ in range(5):
            optimizer.zero_grad()
            gm(torch.randn(16, 8)).square().mean().backward()
            optimizer.step()
        weight = gm.get_submodule("0").weight
        torch.testing.assert_close(weight @ weight.T, torch.eye(8), atol=1e-5, rtol=0)   # still orthogonal
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ArgumentError(f"attach expects a torch.optim.Optimizer, got {type(optimizer).__name__}; call "
                            "orthofx.attach(optimizer, gm)")
    parts = _attached_parts(model)
    # read only: the registry is written once the checks have passed, so a refused attach leaves the optimizer as
    # it was
    refusal = _already_attached(parts, optimizer)
    if refusal is not None:
        raise ArgumentError(refusal)
    owned = _optimizer_parameters(optimizer)
    stale = _stale_replaced_layers(parts, optimizer, owned)
    trainable = [p for part in parts for p in part.root.parameters() if p.requires_grad]
    if trainable and not any(id(p) in owned for p in trainable):
        # with a policy without hooks nothing else would notice: gm would never train
        which = "the model's" if parts[0].path == "" else \
            f"the transformed parts' ({', '.join(repr(part.path) for part in parts)})"
        before = (f"It was built before the transform: {_replaced_layers_text(stale)}." if stale else
                  "Was it built from the model before orthofx.transform, which rewrites a copy?")
        raise ArgumentError(
            f"attach: the optimizer holds none of {which} trainable parameters, so optimizer.step() would never "
            f"update them. {before} Build the optimizer from gm.parameters() after the transform, then attach it "
            "(inplace=True to transform keeps the model's own parameters only in the layers no rule replaces: a "
            "replaced layer, such as orthogonal_conv's, has new ones). With several optimizers, one for the other "
            "parameters only needs no attach")
    first = next(((part, part.recorded[0]) for part in parts if part.recorded), None)
    if first is not None and is_zero_redundancy(optimizer) and getattr(optimizer, "_overlap_with_ddp", False):
        # its steps run inside DDP's communication hook (ZeRO's _local_step), per bucket, and step() is not
        # called: no pre- or post-step hook would ever run, so the weights would train unconstrained, silently
        part, hook = first
        raise ArgumentError(
            f"site '{part.site(hook)}' (rule '{hook.rule}'): this ZeroRedundancyOptimizer was built with "
            "overlap_with_ddp=True, so its steps run inside DDP's communication hook and optimizer.step() is never "
            "called: orthofx's optimizer hooks (Riemannian updates, NOG, OLR) would never run. Build it with "
            "overlap_with_ddp=False (the default) and call optimizer.step() after backward")

    def holds_any() -> bool:  # asked only for the message of a refusal
        return any(part.holds_any(owned) for part in parts)

    for part in parts:
        part.sort_out(owned, holds_any)
    for part in parts:
        part.check(optimizer, part.hooks)
    warned: set[type] = set()  # the hook classes whose attach_warning this call gave (once, for all the parts)
    _attach_warnings([(part, part.hooks) for part in parts], optimizer, warned, stacklevel=2)
    if stale:  # another optimizer may train them: no refusal
        warnings.warn(f"attach: {_replaced_layers_text(stale)}: unless another optimizer trains them, those layers "
                      "never train. Build the optimizer after the transform, from gm.parameters() (or the "
                      "parameters of the model holding gm), then attach it", OrthofxWarning, stacklevel=2)
    for part in parts:
        part.setup(optimizer, part.hooks)
        mark_attached(part.root, optimizer)  # its hooked weights stepped by another now warn only if none holds them
        # the weights it holds now, which the optimizer holds: a weight replaced later (load_state_dict(...,
        # assign=True)) is then told from one taken out of the optimizer, also in a copy no penalty has registered
        watch_hooked_weights(part.root, part.recorded, current=True)
    # the handle's lists: every part's hooks, rebuilt in place when a skipped hook starts to run (the closures hold
    # these lists, not the handle, which would make a reference cycle through the optimizer's hook dicts)
    hooks = [hook for part in parts for hook in part.hooks]
    skipped = [hook for part in parts for hook in part.skipped]

    def activate_added(opt):
        # A weight frozen at attach time (its hook skipped) that has since been added to the optimizer
        # (``add_param_group`` when unfreezing layers) is trained from this step on: its hook runs from now on too,
        # or the weight would leave the manifold (Riemannian) or step by its raw gradient (NOG) unnoticed.
        owned_now = _optimizer_parameters(opt)
        added = [(part, part.added(owned_now)) for part in parts]
        if not any(hooks_added for _, hooks_added in added):
            return
        for part, hooks_added in added:
            part.check(opt, hooks_added, at_step=True)
        _attach_warnings(added, opt, warned, stacklevel=1)  # inside optimizer.step(): no user frame to point at
        for part, hooks_added in added:
            part.setup(opt, hooks_added)
        for part, hooks_added in added:
            part.activate(hooks_added)
        hooks[:] = [hook for part in parts for hook in part.hooks]
        skipped[:] = [hook for part in parts for hook in part.skipped]

    def warn_unfrozen_left_out():
        # A weight skipped at attach (frozen) that is trainable again and got a gradient, but that this optimizer
        # still does not hold: its hooks never run. Handed to an optimizer of its own (a backbone's lr), it trains
        # as a plain parameter (a Riemannian weight leaves the manifold, a NOG one steps by its raw gradient). One
        # warning per weight (NOG and OLR wait on the same one; another optimizer's first step may have said it).
        for part in parts:
            for hook in part.skipped:
                module = part.root.get_submodule(hook.site)
                weights = [getattr(module, name, None) for name in hook.parameter_names]
                if (any(isinstance(w, torch.Tensor) and w.requires_grad and w.grad is not None for w in weights)
                        and first_warning_outside(weights)):
                    _warn_unfrozen_left_out(optimizer, part, hook)

    def run_hooks(opt, stage: str):
        # stage "before" / "after"; the parts act on different parameters, so their order changes no result.
        # Every "after" hook runs even when one raises (a Riemannian step gone NaN): each undoes or completes what
        # its "before" hook and the step did (OLR's lr, another weight's retraction back onto the manifold), and
        # one that did not run would leave that behind for the steps after the error; the first error follows.
        errors: list[Exception] | None = [] if stage == "after" else None
        # OLR's lrs are set once all "before" hooks have run (one host read a step) only where every hook is
        # orthofx's own, none of which reads an lr: a user's pass hook running after an OLR hook sees this step's eta*
        defer = stage == "before" and all(type(hook).__module__.startswith("orthofx.") for hook in hooks)
        with _autocast_off(), (pending_learning_rates(opt) if defer else contextlib.nullcontext()):
            for part in parts:
                part.run(opt, stage, errors)
        if errors:
            raise errors[0]

    started = []  # non-empty from the "before" hooks of a step until its "after" hooks

    # Under torch.compile (of ``optimizer.step`` or of a whole training step) the hooks run eagerly, as a graph
    # break: their work is data-dependent (the Newton-Schulz loop stops on a measured error, NOG checks its
    # gradient for NaN, OLR's lr is a Python float read from the gradient), so dynamo would split it into many
    # small graphs and recompile them on every new float; OLR's param-group edits and the registry of added
    # hooks are Python state that must change exactly once per step. The optimizer's own update stays compiled.
    @_run_eagerly
    def run_before(opt):
        count_attached_step(opt)  # another optimizer stepping weights this one holds is looked at by its steps
        if skipped:
            activate_added(opt)
            warn_unfrozen_left_out()
        # a fused kernel will skip this step: so do the hooks, before and after, and the gradients stay as they are
        if _step_will_be_skipped(opt):
            return
        _unscale_for_hooks(opt, parts)
        started.append(True)
        run_hooks(opt, "before")

    @_run_eagerly
    def run_after(opt):
        # from the post-hook, or from the step guard when the step raised (then the post-hook never ran)
        if started:
            started.clear()
            run_hooks(opt, "after")

    def before(opt, args, kwargs):
        # ``optimizer.step(closure)``: torch runs this pre-hook *before* the step calls the closure, which
        # recomputes the gradients (zero_grad + backward inside it). Running the hooks here would act on the
        # previous step's gradients (or on none: a first step would skip the Riemannian retraction and leave the
        # manifold), and the optimizer would then use the closure's raw gradients. So the closure is wrapped:
        # the hooks run right after its first evaluation, on the gradients at the step's starting point. A later
        # evaluation in the same step (LBFGS's line search) leaves them alone, so OLR's base lr and the
        # Riemannian pre-step weight are taken once per step.
        closure = kwargs.get("closure") if "closure" in kwargs else (args[1] if len(args) > 1 else None)
        if not callable(closure):  # no closure (or an optimizer whose step takes something else)
            run_before(opt)
            return None
        done = []

        def closure_then_hooks():
            loss = closure()
            if not done:
                done.append(True)
                run_before(opt)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_hooks}
        return (args[0], closure_then_hooks, *args[2:]), kwargs

    def after(opt, args, kwargs):
        run_after(opt)

    handles = [optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after),
               _StepGuard(optimizer, run_after)]
    handle = AttachHandle(optimizer, hooks, handles, skipped, roots=[part.root for part in parts])
    # the roots whose hooks this attachment runs: an attach of any of them again is refused (_already_attached)
    optimizer.__dict__.setdefault("_orthofx_attached", {})[handle._key] = tuple(id(part.root) for part in parts)
    return handle


def project_stiefel_weights(model: nn.Module) -> int:
    """Put every weight that the Riemannian hooks of ``model`` keep on the Stiefel manifold back onto it, in place,
    as those hooks see it; returns how many weights were projected. For an EMA or SWA copy of a transformed model
    (``torch.optim.swa_utils.AveragedModel``), whose averaged weights are off the manifold, as ``update_bn`` after
    SWA (and :func:`orthofx.nn.update_running_filters` for ConvNorm's running filters): once, before evaluating or
    saving the copy, not after each ``update_parameters``, where the next update would average the projected copy
    (another average: entries about 1 apart after 30 steps of SGD, both for SWA and an EMA with decay 0.9).

    Each constrained weight is cut into the matrices its hook keeps orthonormal
    (:meth:`orthofx.passes.riemannian.StiefelHook.projection`): a Linear's ``(out, in)`` weight is one matrix; a
    convolution's ``(out, in / groups, *kernel)`` one ``out / groups x (in / groups * prod(kernel))`` matrix per group;
    a recurrent layer's hidden-to-hidden weight one block per gate (an LSTM's ``4H x H`` is four ``H x H``). Each
    matrix ``A = U S V^T`` (thin SVD) becomes its polar factor ``Q = U V^T``, the nearest point of the Stiefel
    manifold in Frobenius norm, ``Q = argmin ||A - Q'||_F`` over ``Q'^T Q' = I`` (``Q' Q'^T = I`` for a wide
    matrix). An average of points of the manifold lies inside it (the mean of ``Q_t`` has singular values <= 1),
    so an averaged weight needs this; a weight on the manifold already comes back unchanged up to rounding.
    (``orthofx.nn.stiefel.project_to_stiefel`` of the weight tensor itself is that only for a Linear: it takes a
    conv weight's leading dimensions as a batch of ``k x k`` matrices, and an LSTM's ``4H x H`` as one matrix.)

    ``model``: a transformed model, a copy of one (``AveragedModel(gm)`` deep-copies ``gm`` with its manifest, which
    names the sites), or a model holding such (``AveragedModel`` itself): every transformed model in it is projected,
    so pass the copy, not a model that holds both the copy and the trained one (the trained weights are on the
    manifold, and would only move by rounding). Frozen weights are projected too, and the weights of a rule's
    ``free`` site, which has no hook, are not. Nothing is written before every weight is found finite: a weight
    with NaN / inf raises :class:`~orthofx.OrthofxError` naming it. A model with no such weight (not transformed,
    or a policy without a riemannian rule that constrains one) raises :class:`~orthofx.OrthofxError`.

    Example::

        import torch, orthofx
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        gm = orthofx.transform(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8)),
                               "isometric")     # square linears: orthogonal init + Riemannian updates
        optimizer = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
        orthofx.attach(optimizer, gm)
        ema = AveragedModel(gm, multi_avg_fn=get_ema_multi_avg_fn(0.9))
        for _ in range(5):
            optimizer.zero_grad()
            gm(torch.randn(16, 8)).square().mean().backward()
            optimizer.step()
            ema.update_parameters(gm)
        assert orthofx.optim.project_stiefel_weights(ema) == 2     # the averaged copies of '0' and '2'
        weight = ema.module.get_submodule("0").weight
        torch.testing.assert_close(weight @ weight.T, torch.eye(8), atol=1e-5, rtol=0)
    """
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"project_stiefel_weights takes an nn.Module (a transformed model, or its EMA / SWA copy: "
                            f"an AveragedModel), got a {type(model).__qualname__}")
    parts = [("", model)] if is_transformed(model) else transformed_parts(model)
    name = type(unwrap_model(model)).__name__
    if not parts:
        raise OrthofxError(f"project_stiefel_weights: {name} was not produced by orthofx.transform and holds no model "
                           "it returned (or a copy of one), so no weight of it is kept on the Stiefel manifold; pass "
                           "the transformed model or its EMA / SWA copy (the AveragedModel)")
    hooked = [(unwrap_model(part), hook) for _, part in parts for hook in manifest_of(part).optimizer_hooks
              if isinstance(hook, StiefelHook)]
    if not hooked:
        raise OrthofxError(f"project_stiefel_weights: {name}'s policy keeps no weight on the Stiefel manifold (no "
                           "riemannian rule constrains one: a rule's free site has no hook), so there is nothing to "
                           "project; it is for the weights riemannian rules train (the isometric preset's square "
                           "linears, {apply: riemannian} rules)")
    projections: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    for root, hook in hooked:  # all computed (and checked finite) before any is written
        weight, projected = hook.projection(root)
        projections.setdefault(id(weight), (weight, projected))
    with torch.no_grad():
        for weight, projected in projections.values():
            write_whole(weight, projected)
    return len(projections)
