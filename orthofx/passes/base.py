"""The vocabulary passes speak: sites, plan entries, parameters, changes, penalty terms and the manifest.

A *site* is a place in a captured graph that a rule can target: a module call (``kind="module"``), a function
call such as ``torch.linalg.eigh`` (``kind="function"``) or a submodule taken as a whole (``kind="block"``).
A *plan entry* pairs a site with the rule that matched it and the rule's validated parameters. A pass turns its
plan entries into graph edits and records each one as a :class:`Change` in the :class:`Manifest` kept at
``gm.meta["orthofx"]``; passes that add a regulariser record a :class:`PenaltyTerm`, which
``orthofx.penalty(gm)`` sums.

Everything here is plain data (picklable, deep-copyable), so a transformed model can be copied and saved.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Hashable, Iterator, NamedTuple

import torch
from torch import fx, nn
from torch.nn.utils import prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import SITE_ATTRIBUTE, OrthofxError, OrthofxWarning, PlanError, caller_stacklevel
from ..nn.jacobian import JacobianProbe
from ..nn.orthogonal import gain_range_problem
from ..nn.tracing import is_orthofx_module

__all__ = [
    "Param",
    "Site",
    "PlanEntry",
    "Change",
    "PenaltyTerm",
    "OptimizerHook",
    "CaptureInfo",
    "Manifest",
    "PassContext",
    "Pass",
    "MANIFEST_KEY",
    "replace_module",
    "describe_module",
    "parameter_owners",
    "require_initialised",
    "call_hook_count",
    "move_call_hooks",
    "state_dict_hook_kinds",
    "same_state_dict_entries",
    "move_state_dict_hooks",
    "lost_state_dict_hooks_warning",
    "derived_weight",
    "current_weight",
    "is_uninitialised",
    "RECURRENT_TYPES",
    "recurrent_hidden_weights",
    "recurrent_weights_reason",
    "reads_only_metadata",
    "default_device_set_aside",
]

#: Key of the manifest in ``GraphModule.meta``.
MANIFEST_KEY = "orthofx"

SITE_KINDS = ("module", "function", "block")


@dataclass(frozen=True)
class Param:
    """One parameter a pass accepts under a rule's ``with:``.

    ``types`` are the accepted Python types (an ``int`` is accepted where ``float`` is, and converted);
    ``choices`` restricts the value to a set; ``minimum`` / ``maximum`` bound numbers (inclusive unless
    ``exclusive_minimum``).
    """

    name: str
    default: Any
    types: tuple[type, ...]
    doc: str = ""
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False

    def describe(self) -> str:
        """Human-readable description of the allowed values, used in error messages."""
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        names = " or ".join(_type_name(t) for t in self.types)
        bounds = []
        if self.minimum is not None:
            bounds.append(("> " if self.exclusive_minimum else ">= ") + repr(self.minimum))
        if self.maximum is not None:
            bounds.append("<= " + repr(self.maximum))
        return names + (" " + " and ".join(bounds) if bounds else "")

    def validate(self, value: Any) -> Any:
        """Return ``value`` converted to the parameter's type, or raise ``ValueError`` saying what is allowed."""
        if self.choices is not None:
            # True == 1 in Python; a choice matches only a value of the same boolean-ness.
            if not any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in self.choices):
                raise ValueError(f"parameter '{self.name}' must be {self.describe()}, got {value!r}")
            return value
        try:
            accepted = _accepts(self.types, value)
        except OverflowError:  # float() of an integer beyond float range
            raise ValueError(f"parameter '{self.name}' must be finite, got an integer too large for a float "
                             f"({str(value)[:20]}...)") from None
        if accepted is _REJECT:
            raise ValueError(f"parameter '{self.name}' must be {self.describe()}, got {value!r} "
                             f"({_type_name(type(value))})")
        value = accepted
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"parameter '{self.name}' must be finite, got {value!r}")
            low_fails = self.minimum is not None and (
                value <= self.minimum if self.exclusive_minimum else value < self.minimum)
            if low_fails or (self.maximum is not None and value > self.maximum):
                raise ValueError(f"parameter '{self.name}' must be {self.describe()}, got {value!r}")
        return value


_REJECT = object()


def _accepts(types: tuple[type, ...], value: Any) -> Any:
    if isinstance(value, bool):
        return value if bool in types else _REJECT
    for t in types:
        if t is float and isinstance(value, (int, float)):
            return float(value)
        if t is not bool and isinstance(value, t):
            return value
    return _REJECT


def _type_name(t: type) -> str:
    return {float: "a number", int: "an integer", bool: "true/false", str: "a string",
            list: "a list", dict: "a mapping", type(None): "null"}.get(t, t.__name__)


@dataclass(frozen=True)
class Site:
    """A place in the graph a rule can target.

    ``name`` is the module's qualified name as in ``model.named_modules()`` for module and block sites; for a
    function site it is ``"<scope>:<op>"`` (``scope`` the qualified name of the module whose forward makes the
    call, empty at top level, so a top-level call is just ``"<op>"``), with ``#k`` appended for the k-th repeated
    call in the same scope (k >= 2). ``target`` is the module's class name or the canonical op name
    (``"linalg.eigh"``); ``node`` the fx node name (``None`` for a block, which may span no single node).

    ``mode`` is empty for sites of the graph a model was captured in, and ``"train"`` or ``"eval"`` for sites
    found only in the graph of the other training mode (a model whose forward branches on ``self.training``,
    see :class:`orthofx.capture.ModalGraphModule`); such function sites are named ``"<scope>:<op>@<mode>"``.
    """

    kind: str
    name: str
    target: str
    node: str | None = None
    module_type: type | None = None
    mode: str = ""

    def __str__(self) -> str:
        return self.name or "<root>"


@dataclass
class PlanEntry:
    """A site, the rule that claimed it and the pass parameters (validated, defaults filled in)."""

    site: Site
    rule_name: str
    rule_index: int
    pass_name: str
    params: dict[str, Any]
    reason: str = ""  # why this rule won the site (shown by explain)
    outcome: str = ""  # what applying will do, when it is not the pass's usual change (Pass.planned_outcome)
    # the error applying will raise, known while planning (Pass.check_plan): transform raises it before any pass
    # runs, so that no earlier rule has written a weight; explain shows the outcome instead
    refusal: Exception | None = None
    # whether transform runs the model on example inputs before the passes, so that they can read each module
    # site's input shape (PassContext.manifest.input_shapes): a pass that needs one refuses the entry without them
    # in its check_plan (orthogonal_conv's cayley_fft), before any pass runs, rather than in its apply
    has_example_inputs: bool = False
    # (rule name, pass name) of an earlier rule of the policy that replaces or wraps this site's layer (convnorm's
    # ConvNorm layer), set by planning: this entry's pass then gets that replacement, not the layer the site
    # describes, and its check_plan can say what it will do there (pre_svd's 'weight: orthogonal' falls back to L_orth)
    replaced_by: tuple[str, str] | None = None


def entries_by_rule(entries: list[PlanEntry]) -> dict[int, list[PlanEntry]]:
    """``entries`` grouped by their rule's index in the policy, in the order the rules first appear (a rule's
    entries keep their order, the graph's)."""
    by_rule: dict[int, list[PlanEntry]] = {}
    for entry in entries:
        by_rule.setdefault(entry.rule_index, []).append(entry)
    return by_rule


@dataclass
class Change:
    """One edit a pass made, recorded in the manifest and shown by ``orthofx.report``."""

    site: str
    rule: str
    pass_name: str
    what: str
    params: dict[str, Any] = field(default_factory=dict)
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    status: str = ""  # short verdict the report shows next to the pass, e.g. "hard", "regularised", "skipped"


def _first_defining(cls: type, name: str) -> int:
    """The index in ``cls.__mro__`` of the first class defining the attribute ``name`` (past the end: none)."""
    return next((i for i, klass in enumerate(cls.__mro__) if name in vars(klass)), len(cls.__mro__))


class PenaltyTerm:
    """A differentiable regulariser a pass attached to a site; ``orthofx.penalty`` sums ``weight * value``.

    Subclasses implement :meth:`value`, computing the unweighted term from the transformed model ``root``
    (looked up by site name at call time, so the term holds no tensors and survives copies and saving). That is
    the hook to override. A term that computes half-precision weights' value in float32 may also implement
    :meth:`full_precision_value` (its :meth:`value` then rounds that one, as ``LorthTerm``'s does), which
    ``orthofx.penalty`` calls instead, to weight the float32 value before rounding; a subclass overriding
    :meth:`value` below the class defining :meth:`full_precision_value` (a ``LorthTerm`` subclass changing
    ``value``) is evaluated by its :meth:`value`, in its value's dtype.

    A term with ``every = k > 1`` is evaluated by ``orthofx.penalty`` on one call in ``k`` only, the calls ``c``
    with ``c % k == phase`` (``c`` counts the model's penalty calls with gradients in training mode,
    ``Manifest.penalty_calls``), at
    ``1 / k`` of its cost ("lazy regularisation": a weight ``k`` times larger keeps the average strength).
    """

    #: evaluated on one call of orthofx.penalty in ``every`` (class defaults: terms pickled before they existed)
    every: int = 1
    phase: int = 0
    #: whether the class defines :meth:`value` below the class defining :meth:`full_precision_value`, so that
    #: ``orthofx.penalty`` evaluates its :meth:`value`; set once per class (looked up at every term of every step)
    value_overridden: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.value_overridden = _first_defining(cls, "value") < _first_defining(cls, "full_precision_value")

    def __init__(self, site: str, rule: str, weight: float):
        self.site = site
        self.rule = rule
        self.weight = float(weight)

    def value(self, root: nn.Module) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def full_precision_value(self, root: nn.Module) -> tuple[torch.Tensor, torch.dtype]:
        """``(value, dtype)``: the unweighted value before its rounding to half precision, and the dtype
        :meth:`value` returns. A term of half-precision weights computed in float32 (L_orth, SRIP, a Jacobian
        estimate's sums) returns the float32 value and the weights' dtype: ``orthofx.penalty`` multiplies it by
        the weight and sums in float32, then rounds once (a float16 L_orth above 65504 is inf where
        ``0.01 * L_orth`` fits). The default: :meth:`value` and its dtype."""
        value = self.value(root)
        return value, value.dtype

    def form(self) -> tuple | None:
        """What makes two terms of this class on one weight tensor the same regulariser, so that a weight tied
        between sites is counted once (as weight decay counts a shared parameter once); ``None`` (the default):
        the term is not a function of its site's weight alone and is never merged."""
        return None

    def penalised(self, root: nn.Module) -> list[tuple[str, torch.Tensor, tuple]]:
        """``(name, tensor, form)`` for each tensor of ``root`` this term is a sum of regularisers of: two terms
        that penalise one tensor in equal forms (of any classes) count it once (:meth:`PassContext.add_penalty`).
        The default: the site's ``weight``, named by the site, in the form ``(class name, *form())``; nothing when
        :meth:`form` is ``None``."""
        form = self.form()
        weight = getattr(root.get_submodule(self.site), "weight", None) if form is not None else None
        return [] if weight is None else [(self.site, weight, (type(self).__name__, *form))]

    def __repr__(self) -> str:
        period = f", every={self.every}, phase={self.phase}" if self.every > 1 else ""
        return f"{type(self).__name__}(site={self.site!r}, weight={self.weight}{period})"


def _dtensor_type() -> type | None:
    """``torch.distributed.tensor.DTensor``, or None on a torch built without distributed support."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor
    return DTensor


def flattened_by_fsdp1(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is (a view of) the flat parameter of the older ``FullyShardedDataParallel`` (FSDP1).

    Outside its forward FSDP1 keeps a layer's weight as a 1-d slice of its rank's shard
    (``use_orig_params=True``) or as a view of a flat parameter the optimizer does not see (the default): no
    whole weight, and no ``DTensor`` to gather it from."""
    return bool(getattr(tensor, "_fsdp_flattened", False) or getattr(tensor._base, "_fsdp_flattened", False))


def refuse_fsdp1(tensor: torch.Tensor, where: str) -> None:
    """Raise :class:`orthofx.OrthofxError` when ``where`` (a site and what it needs) would read a weight that
    FSDP1 keeps flattened and sharded (:func:`flattened_by_fsdp1`)."""
    if flattened_by_fsdp1(tensor):
        raise OrthofxError(
            f"{where} needs the whole weight outside the forward, and FullyShardedDataParallel (FSDP1) keeps it "
            f"flattened and sharded there (this rank holds a {tuple(tensor.shape)} slice). Wrap the model with "
            "FSDP2 (torch.distributed.fsdp.fully_shard, on the layers the graph calls and the root) or with "
            "DistributedDataParallel; under FSDP1 only the hard orthogonal layers and the Jacobian penalty, which "
            "work inside the forward, are supported")


def whole(tensor: torch.Tensor, where: str = "this orthofx term") -> torch.Tensor:
    """The whole value of a parameter, gradient or optimizer state: a sharded ``DTensor`` (FSDP2's
    ``fully_shard`` keeps parameters, their gradients and the optimizer's state sharded outside forward and
    backward) is all-gathered into a plain tensor, the same on every rank; any other tensor is returned as is.
    The optimizer hooks compute on whole matrices (a polar factor, a tangent projection, a global dot product),
    and so do the penalty terms of a weight, for which the gather is differentiable: each rank's shard gets its
    part of the gradient, the same on every rank. A weight FSDP1 flattened is refused (:func:`refuse_fsdp1`,
    ``where`` names the reader)."""
    refuse_fsdp1(tensor, where)
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(tensor, dtensor):
        return tensor.full_tensor()
    return tensor


@torch.no_grad()
def write_whole(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)`` for a ``value`` computed from :func:`whole` tensors: a sharded ``DTensor`` target
    takes its own shard of ``value`` (every rank computed the same whole value, so no communication)."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(target, dtensor):
        from torch.distributed.tensor import Replicate
        mesh = target.device_mesh
        value = dtensor.from_local(value.to(target.dtype), mesh, [Replicate()] * mesh.ndim, run_check=False)
        value = value.redistribute(mesh, target.placements)
    target.copy_(value)


def sparse_gradient_error(where: str, needs: str, fix: str) -> OrthofxError:
    """The refusal of an optimizer hook whose weight has a sparse gradient (``where``: the pass, site and rule;
    ``needs``: what the hook computes from the gradient; ``fix``: what to do), one wording for every hook: stepping
    it unchanged would leave the hook's Change untrue."""
    return OrthofxError(f"{where}: the weight has a sparse gradient, and {needs} needs a dense one; {fix}")


class OptimizerHook:
    """Work a pass needs done around ``optimizer.step()`` (Riemannian updates, NOG, OLR).

    ``orthofx.attach(optimizer, gm)`` calls :meth:`setup` once, then :meth:`before_step` and :meth:`after_step`
    around every step. Like :class:`PenaltyTerm`, a hook finds its parameters by site name on the transformed
    model ``root`` at call time and holds no tensors of its own, so the manifest stays plain data. Parameters
    are matched to the optimizer's by identity, not by name, so wrapper prefixes (DDP's ``module.``) are
    irrelevant; with DDP the hooks run after gradients were all-reduced, on every replica alike. With FSDP2
    (``fully_shard``) parameters, gradients and optimizer state are sharded ``DTensor`` s: hooks read them
    through :func:`whole` and write through :func:`write_whole`, after the gradients were reduce-scattered.
    """

    #: Attributes of the site's module that the hook updates; ``attach`` checks the optimizer owns them.
    parameter_names: tuple[str, ...] = ("weight",)
    #: With ``GradScaler`` and a fused optimizer, half-precision gradients stay scaled by ``optimizer.grad_scale``
    #: (the kernel unscales them in float32). A hook whose class sets this reads the scale itself (NOG, OLR); one
    #: that sets ``gradient_linear`` acts on scaled gradients as on true ones (a projection). Where any hook sets
    #: neither, every gradient is divided by the scale before the hooks run, so that such a hook (a user's pass)
    #: sees the true gradients.
    reads_grad_scale: bool = False
    gradient_linear: bool = False

    def __init__(self, site: str, rule: str):
        self.site = site
        self.rule = rule

    def _weight(self, root: nn.Module) -> torch.Tensor:
        """The site's weight the hook acts on (:func:`hooked_weight`: refused once pruned or parametrized)."""
        return hooked_weight(root.get_submodule(self.site), "weight", lambda: (
            f"site '{self.site}' (rule '{self.rule}'): {getattr(self, 'treatment', type(self).__name__)}"))

    def check(self, root: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Called by ``attach`` for every hook before any :meth:`setup`: raise :class:`orthofx.OrthofxError` when
        the hook cannot work with this optimizer (nothing has been changed yet)."""

    def setup(self, root: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Called once by ``attach``; may, for example, move a parameter into a param group of its own."""

    def before_step(self, root: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Called before each ``optimizer.step()``, after the gradients are final."""

    def after_step(self, root: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Called after each ``optimizer.step()``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(site={self.site!r}, rule={self.rule!r})"


# Stepping hooked weights without ``orthofx.attach``. The hooks run only from attach, so a forgotten attach (or an
# optimizer copied with ``copy.deepcopy`` / ``torch.save``, whose ``__getstate__`` keeps no hooks) trains the
# weights as plain parameters: Stiefel weights drift off the manifold (0.2 after 5 SGD steps), NOG / OLR never run.
#: hooked parameter -> its :class:`WatchedWeight` (model, site, rule, attribute name); keys by identity, held weakly
_HOOKED_WEIGHTS = WeakIdKeyDictionary()
#: the other parameters of the hooked sites' modules (a bias, an LSTM's input weights) -> their :class:`WatchedWeight`:
#: a weight replaced after attach is told apart from its site's other parameters replaced with it
#: (:func:`replaced_neighbours_held`)
_SITE_NEIGHBOURS = WeakIdKeyDictionary()
#: transformed models whose hooked weights are registered (``watch_hooked_weights`` once per model)
_WATCHED_MODELS: weakref.WeakSet = weakref.WeakSet()
#: transformed model -> the optimizers ``orthofx.attach`` attached to it (both held weakly, by identity: an optimizer
#: class defining ``__eq__`` is not hashable)
_ATTACHED_OPTIMIZERS = WeakIdKeyDictionary()
#: transformed models one of whose attachments was removed (``handle.remove()``: deliberate, not forgotten)
_RELEASED_MODELS = WeakIdKeyDictionary()
#: hooked weights some orthofx warning said are stepped outside the attached optimizers: one warning per weight
_WARNED_OUTSIDE = WeakIdKeyDictionary()
#: an attached optimizer's ``__dict__`` entry: its steps so far (:func:`count_attached_step`)
_ATTACHED_STEPS = "_orthofx_attached_steps"
#: the step of another optimizer at which a weight it steps, held at its first step by an attached optimizer that
#: has not stepped since, is warned about (:func:`_warn_unattached_step`)
_HOLDERS_RECHECKED_AT = 3
_UNATTACHED_STEP_HOOK: list = []
#: an optimizer's ``__dict__`` entry: True once :func:`_warn_unattached_step` is done with it (one dict read per
#: later step), the weights it waits to look at again (:func:`_recheck_holders`), until a step gives one of its
#: hooked weights a gradient, those weights (:class:`_NoHookedGradientYet`), or, holding none, its number of param
#: groups (an int: a step compares it and returns; every plain optimizer of the process is there)
_UNATTACHED_CHECKED = "_orthofx_unattached_checked"


class WatchedWeight(NamedTuple):
    """A parameter registered by :func:`watch_hooked_weights`: ``model``, a weak reference to its transformed model;
    the ``site`` and ``rule`` of the hook acting at its module; ``parameter``, its attribute name there (``weight``,
    ``weight_hh_l1``: an LSTM site holds several hooked weights)."""

    model: weakref.ref
    site: str
    rule: str
    parameter: str


def watch_hooked_weights(root: nn.Module, hooks: list, current: bool = False) -> None:
    """Register the parameters ``hooks`` (a transformed model ``root``'s optimizer hooks) act on, so that the first
    ``step()`` of an optimizer that updates one of them while no optimizer was ever attached to ``root`` warns
    (:class:`orthofx.OrthofxWarning`), and the other parameters of their modules (biases), so that a warning can
    tell what ``load_state_dict(..., assign=True)`` replaced. Called by ``transform`` / ``load`` and by
    ``orthofx.penalty`` (which reaches deep copies of a model too), once per model; by ``orthofx.attach`` with
    ``current``: the weights the model holds then (those the optimizer holds), whether or not it was registered
    before (a copy no penalty has seen; weights assigned between ``transform`` and ``attach``). Registers a global
    optimizer step post hook the first time.

    Example::

        import torch, orthofx
        gm = orthofx.transform(torch.nn.Sequential(torch.nn.Linear(8, 8)), "isometric")
        optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)   # orthofx.attach(optimizer, gm) forgotten
        gm(torch.randn(4, 8)).sum().backward()
        optimizer.step()    # OrthofxWarning: ... steps the weight(s) of site '0' ... without orthofx.attach
    """
    if torch.compiler.is_compiling() or not hooks or (root in _WATCHED_MODELS and not current):
        return
    _WATCHED_MODELS.add(root)
    model = weakref.ref(root)
    hooked_names: dict[str, set[str]] = {}  # site -> the names its hooks act on
    for hook in hooks:
        hooked_names.setdefault(hook.site, set()).update(hook.parameter_names)
    rules: dict[str, str] = {}  # site -> the rule of its first hook, for its other parameters
    for hook in hooks:
        try:
            module = root.get_submodule(hook.site)
        except AttributeError:
            continue
        rules.setdefault(hook.site, hook.rule)
        for name in hook.parameter_names:
            parameter = getattr(module, name, None)
            if isinstance(parameter, nn.Parameter):
                _HOOKED_WEIGHTS[parameter] = WatchedWeight(model, hook.site, hook.rule, name)
    for site, rule in rules.items():
        for name, parameter in root.get_submodule(site).named_parameters(recurse=False):
            if name not in hooked_names[site]:
                _SITE_NEIGHBOURS[parameter] = WatchedWeight(model, site, rule, name)
    if not _UNATTACHED_STEP_HOOK:
        _UNATTACHED_STEP_HOOK.append(register_optimizer_step_post_hook(_warn_unattached_step))


def mark_attached(root: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Record that ``orthofx.attach`` attached ``optimizer`` to the transformed model ``root``: its hooked weights
    stepped by another optimizer are not warned about while an attached one holds them and steps too (ZeRO's
    local optimizers, an inner optimizer a wrapper delegates to)."""
    _ATTACHED_OPTIMIZERS.setdefault(root, WeakIdKeyDictionary())[optimizer] = True
    _RELEASED_MODELS.pop(root, None)  # attached again after a handle.remove(): checked again


def mark_released(root: nn.Module) -> None:
    """Record that an attachment to ``root`` was removed (``handle.remove()``): its hooked weights stepped by any
    optimizer from now on are the user's choice, not warned about."""
    _RELEASED_MODELS[root] = True


def count_attached_step(optimizer: torch.optim.Optimizer) -> None:
    """Count a step of an attached optimizer (from its step hook): another optimizer stepping weights it holds
    is warned about when it stops stepping (:func:`_warn_unattached_step`)."""
    optimizer.__dict__[_ATTACHED_STEPS] = optimizer.__dict__.get(_ATTACHED_STEPS, 0) + 1


def warned_outside(weight: torch.Tensor) -> bool:
    """Whether a warning already said ``weight`` is stepped outside the attached optimizers."""
    return weight in _WARNED_OUTSIDE


def first_warning_outside(weights: list) -> bool:
    """Whether none of ``weights`` (one site's) has been warned about as stepped outside the attached optimizers;
    marks them. The attached optimizer's step (a weight it left out) and another optimizer's first step (a weight
    it steps that no attached optimizer holds) may both see the same weight: the user gets one warning."""
    tensors = [w for w in weights if isinstance(w, torch.Tensor)]
    if any(w in _WARNED_OUTSIDE for w in tensors):
        return False
    for w in tensors:
        _WARNED_OUTSIDE[w] = True
    return True


class _NoHookedGradientYet(NamedTuple):
    """:func:`_warn_unattached_step`'s state of an optimizer none of whose steps so far gave a hooked weight a
    gradient: ``hooked``, weak references to the hooked weights it holds (found once), and ``groups``, how many
    param groups it had then (``add_param_group`` when unfreezing makes them stale: found again)."""

    hooked: list
    groups: int

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer) -> _NoHookedGradientYet | int:
        """The state of ``optimizer``; for one that holds no hooked weight, its number of param groups alone, which
        a step compares and returns (no list to walk, no ``is_compiling`` call: a plain optimizer, of a model
        orthofx never saw, pays one dict read and one comparison per step). Hooked weights of a model this
        optimizer is attached to are left out, as :func:`_warn_unattached_step` skips them: an attached optimizer
        whose hooked weights never get a gradient (a frozen backbone) would otherwise walk them at every step."""
        hooked = [weakref.ref(p) for group in optimizer.param_groups for p in group["params"]
                  if p in _HOOKED_WEIGHTS and not _attached_to_model_of(optimizer, p)]
        groups = len(optimizer.param_groups)
        return cls(hooked, groups) if hooked else groups

    def stepped(self) -> bool:
        """Whether a hooked weight it holds has a gradient (one per weight: no parameter but these is read)."""
        for reference in self.hooked:
            parameter = reference()
            if parameter is not None and parameter.grad is not None:
                return True
        return False


def _attached_to_model_of(optimizer: torch.optim.Optimizer, parameter: torch.Tensor) -> bool:
    """Whether ``optimizer`` is attached to the transformed model of ``parameter``, a hooked weight."""
    root = _HOOKED_WEIGHTS[parameter].model()
    attached = None if root is None else _ATTACHED_OPTIMIZERS.get(root)
    return attached is not None and optimizer in attached


def _warn_unattached_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Global step post hook: at an optimizer's first step that updates a hooked weight (one with a gradient), warn
    when it is a hooked weight of a transformed model that no optimizer was ever attached to, or one that no
    optimizer attached to its model holds (a weight taken out of the attached optimizer and handed to this one; the
    attached optimizer gone). Until such a step, the hooked weights it holds are kept (:class:`_NoHookedGradientYet`)
    and only their gradients are read at each step: a backbone frozen for the first steps (a head warm-up) and then
    unfrozen is looked at once unfrozen (a check done at the very first step alone saw no gradient and never looked
    again: the weights left the manifold, 0.4 after 10 steps, with no word). Where an attached optimizer still holds
    the weight (an optimizer rebuilt for a second phase and not attached, the old one not yet garbage: a plain
    optimizer is freed by the cycle collector only, and a scheduler keeps it), the check waits: at this optimizer's
    step :data:`_HOLDERS_RECHECKED_AT` after that one, it warns if none of those holders stepped since
    (:func:`count_attached_step`). Once done, a step costs one dict read; for an optimizer that holds no hooked
    weight (every plain optimizer of the process), a dict read and a comparison of its group count. Models one of
    whose attachments was removed (``handle.remove()``, and not attached again since) are not warned about. A wrapper
    optimizer holding the weights beside an attached inner optimizer that it steps less often than every third call
    would be warned about (not a known pattern)."""
    state = optimizer.__dict__.get(_UNATTACHED_CHECKED)
    if state is True:
        return
    groups = len(optimizer.param_groups)
    if state.__class__ is int and state == groups:  # holds no hooked weight, and no group was added since
        return
    if torch.compiler.is_compiling():
        return
    if isinstance(state, dict):
        _recheck_holders(optimizer, state)
        return
    if state is None or state.__class__ is int or state.groups != groups:  # param groups added: found again
        state = optimizer.__dict__[_UNATTACHED_CHECKED] = _NoHookedGradientYet.of(optimizer)
        if state.__class__ is int:
            return
    if not state.stepped():  # no hooked weight updated yet: look again at the next step
        return
    optimizer.__dict__[_UNATTACHED_CHECKED] = True
    found: dict[int, tuple] = {}
    outside: dict[int, list] = {}  # model -> its entries: attached optimizers exist, none holds the weight
    pending: dict[int, dict] = {}  # model -> entries, weights and holders' step counts, to look at again
    held: dict[int, set[int]] = {}  # attached optimizer -> the ids of its parameters (built once per check)

    def holds(other: torch.optim.Optimizer, parameter: torch.Tensor) -> bool:
        if id(other) not in held:
            held[id(other)] = {id(p) for g in other.param_groups for p in g["params"]}
        return id(parameter) in held[id(other)]

    for group in optimizer.param_groups:
        for parameter in group["params"]:
            entry = _HOOKED_WEIGHTS.get(parameter)
            if entry is None or parameter.grad is None:
                continue
            root = entry.model()
            if root is None:
                continue
            attached = _ATTACHED_OPTIMIZERS.get(root)
            if attached is None:
                found.setdefault(id(root), entry)
                continue
            if optimizer in attached or root in _RELEASED_MODELS or warned_outside(parameter):
                continue
            holders = [other for other in list(attached.keys()) if holds(other, parameter)]
            if not holders:
                if first_warning_outside([parameter]):
                    outside.setdefault(id(root), []).append(entry)
                continue
            waiting = pending.setdefault(id(root), {"entries": [], "weights": [], "holders": {}})
            waiting["entries"].append(entry)
            waiting["weights"].append(weakref.ref(parameter))  # the optimizer may drop it before the recheck
            for other in holders:
                waiting["holders"][id(other)] = (weakref.ref(other), other.__dict__.get(_ATTACHED_STEPS, 0))
    if pending:
        optimizer.__dict__[_UNATTACHED_CHECKED] = {"steps": 1, "pending": list(pending.values())}
    for entries in outside.values():  # one warning per model, as below
        _warn_outside(optimizer, entries, "no optimizer attached to this model holds them any more (taken out "
                      "of its param groups, or the attached optimizer is gone)")
    for entry in found.values():
        warnings.warn(f"{type(optimizer).__name__}.step() updated the weight(s) of site '{entry.site}' (rule "
                      f"'{entry.rule}'), "
                      "whose orthofx optimizer hooks (Riemannian updates, NOG, OLR) run only in an optimizer "
                      "passed to orthofx.attach, and no optimizer was attached to this model: the weights train "
                      "as plain parameters (Riemannian ones leave the Stiefel manifold). Call "
                      "orthofx.attach(optimizer, gm) after building the optimizer (again for a copy of an attached "
                      "optimizer: copy.deepcopy and torch.save keep no optimizer hooks)", OrthofxWarning,
                      stacklevel=caller_stacklevel(skip_torch=True))  # the user's step(), past torch's wrappers


def _recheck_holders(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """:func:`_warn_unattached_step` at a later step of ``optimizer``: at step :data:`_HOLDERS_RECHECKED_AT`, warn
    about the weights whose attached holders (alive at its first step) have none of them stepped since."""
    state["steps"] += 1
    if state["steps"] < _HOLDERS_RECHECKED_AT:
        return
    optimizer.__dict__[_UNATTACHED_CHECKED] = True
    for waiting in state["pending"]:
        stepped = False
        for reference, steps in waiting["holders"].values():
            holder = reference()
            stepped = stepped or (holder is not None and holder.__dict__.get(_ATTACHED_STEPS, 0) > steps)
        if stepped:
            continue
        # per weight: one warned about another way since the first step leaves the model's others to this one
        entries = [entry for entry, weight in zip(waiting["entries"], waiting["weights"])
                   if (alive := weight()) is not None and first_warning_outside([alive])]
        if entries:
            _warn_outside(optimizer, entries, "the optimizer attached to this model that holds them has not "
                          f"stepped in this one's first {_HOLDERS_RECHECKED_AT} steps (an optimizer rebuilt for a "
                          "second phase?)")


def _warn_outside(optimizer: torch.optim.Optimizer, entries: list, why: str) -> None:
    """The warning of :func:`_warn_unattached_step` about hooked weights (``entries``: one model's) that
    ``optimizer``, not attached, steps while the model's attached optimizers do not."""
    first = entries[0]
    more = len({entry.site for entry in entries}) - 1
    others = f" (and of {more} other site(s))" if more else ""
    warnings.warn(f"{type(optimizer).__name__}.step() updated the weight(s) of site '{first.site}' (rule "
                  f"'{first.rule}')"
                  f"{others}, whose orthofx optimizer hooks (Riemannian updates, NOG, OLR) run only in an optimizer "
                  f"passed to orthofx.attach, and {why}: they train as plain parameters (Riemannian ones leave the "
                  "Stiefel manifold). Call orthofx.attach(optimizer, gm) for this optimizer if it holds the model's "
                  "trainable hooked weights (a rebuilt optimizer), else give these weights back to the attached "
                  "optimizer (optimizer.add_param_group)", OrthofxWarning,
                  stacklevel=caller_stacklevel(skip_torch=True))


def replaced_after_attach(what: str, many: bool = False) -> str:
    """Why a hooked weight (``what``: ``"the layer's weight"``; ``many``: several, ``"the weights"``) is in no
    param group of the attached optimizer when it was replaced after ``attach``, and what to do: one wording for
    every hook that finds it (OLR / NOG refuse the step, :func:`orthofx.passes.pre_svd._group_of`; the Riemannian
    hooks warn, :func:`orthofx.passes.riemannian._warn_stepped_elsewhere`). ``load_state_dict(sd, assign=True)``
    registers new Parameters (biases too); the optimizer keeps stepping the old ones."""
    be, they, tensor, train = (("are", "they were", "the old tensors", "no longer train") if many else
                               ("is", "it was", "the old tensor", "no longer trains"))
    return (f"{what} {be} not in any param group of this optimizer: {they} replaced after orthofx.attach "
            "(load_state_dict(..., assign=True), or a new nn.Parameter assigned to the layer), and the optimizer "
            f"holds {tensor}, which {train} the model. Load or assign the weights before building the optimizer "
            "(then attach it), or load them in place (load_state_dict without assign=True)")


def registered_weights_held(optimizer: torch.optim.Optimizer, root: nn.Module) -> set[tuple[str, str]]:
    """The ``(site, parameter)`` pairs of the transformed model ``root`` (``("lstm", "weight_hh_l1")``) whose hooked
    weight as registered by :func:`watch_hooked_weights` (at ``transform`` / ``load``, at ``attach``, at the first
    ``orthofx.penalty`` of a copy) ``optimizer`` holds. Asked about a weight the optimizer does not hold now, it tells
    one replaced after ``attach`` (``load_state_dict(..., assign=True)``: the optimizer holds the old tensor, and the
    pair is here) from one taken out of the optimizer's groups (not here: per parameter, as an LSTM site's other
    weights may still be held). Reads every parameter of the optimizer: for a warning's path only."""
    pairs = set()
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            entry = _HOOKED_WEIGHTS.get(parameter)
            if entry is not None and entry.model() is root:
                pairs.add((entry.site, entry.parameter))
    return pairs


def replaced_neighbours_held(optimizer: torch.optim.Optimizer, root: nn.Module, sites: set[str]) -> list[str]:
    """The labels (``'0.bias'``) of the other parameters of ``sites`` (a bias, an LSTM's input weights; registered
    by :func:`watch_hooked_weights`) that were replaced as well: ``optimizer`` holds the registered tensor while the
    module holds another one, which it does not hold (``load_state_dict(..., assign=True)`` loaded them with the
    weights). Those stay untrained if only the weights are given back to the optimizer. For a warning's path only."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    labels = []
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            entry = _SITE_NEIGHBOURS.get(parameter)
            if entry is None or entry.model() is not root or entry.site not in sites:
                continue
            try:
                current = getattr(root.get_submodule(entry.site), entry.parameter, None)
            except AttributeError:  # the site's module itself was replaced: not assign=True's doing
                continue
            if isinstance(current, torch.Tensor) and current is not parameter and id(current) not in held:
                labels.append(weight_label(entry.site, entry.parameter))
    return labels


@dataclass
class CaptureInfo:
    """How the graph was obtained: the mode used (``"fx"`` or ``"export"``), submodules kept as leaves after a
    failed trace, warnings, and, when capture mode ``auto`` fell back to torch.export, why fx tracing failed."""

    mode: str
    leaf_fallbacks: list[tuple[str, str]] = field(default_factory=list)  # (module path, one-line reason)
    warnings: list[str] = field(default_factory=list)
    fx_error: str = ""  # mode "auto" -> "export": the fx failure (without its list of fixes)
    # Modules whose forward differs between train and eval mode: the graph module holds one graph per mode
    # (orthofx.capture.ModalGraphModule).
    mode_dependent: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for ``explain`` and ``report``: ``"fx"``, ``"export"`` or ``"export (auto: ...)"``, and the
        modules traced in both modes."""
        text = self.mode
        if self.fx_error:
            text = f"{self.mode} (auto: symbolic tracing failed: {self.fx_error})"
        if self.mode_dependent:
            text += f"; train and eval graphs (self.training branches in {', '.join(self.mode_dependent)})"
        return text


@dataclass
class Manifest:
    """Everything orthofx did to a model; stored at ``gm.meta["orthofx"]``."""

    policy: Any
    plan: Any
    capture: CaptureInfo
    changes: list[Change] = field(default_factory=list)
    penalties: list[PenaltyTerm] = field(default_factory=list)
    optimizer_hooks: list[OptimizerHook] = field(default_factory=list)
    # Input shape of each module call seen on the example inputs (first call), keyed by qualified name.
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    output_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # Every distinct input shape of each module's calls on the example inputs, in the order first seen (a layer
    # called on two input sizes); input_shapes keeps the first. Absent from manifests pickled before it existed:
    # __setstate__ gives those an empty one (readers fall back to input_shapes).
    all_input_shapes: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)
    frozen: bool = False  # set by orthofx.freeze: plain layers, no penalties or hooks
    # Relative change ||f_new(x) - f(x)|| / ||f(x)|| of the model's outputs on the example inputs (eval mode).
    output_change: float | None = None
    # Calls of orthofx.penalty with gradients so far, modulo penalty_period(): where the terms with every > 1 are
    # in their periods (training state: saved in the model's state-dict metadata, PENALTY_CALLS_METADATA_KEY).
    penalty_calls: int = 0
    # The modules of the original model whose forward its graph ran or called whole (the sites a kind: block rule
    # could select there, capture keeping a selected one as a leaf): path -> the "module.qualname" of each class of
    # the module's MRO (strings, so that a class defined in a function pickles). Set by transform (kept from the
    # model it transformed when that came from orthofx too) and carried through freeze: what
    # orthofx.plan.inlined_blocks checks before telling a block rule that tracing inlined the blocks it names.
    # None where unknown (manifests pickled before it existed, a model frozen without a transform): no such claim.
    original_blocks: dict[str, tuple[str, ...]] | None = None

    def __setstate__(self, state: dict) -> None:
        # a model pickled (torch.save) before a field existed: the field's default
        self.__dict__.update(state)
        self.__dict__.setdefault("all_input_shapes", {})
        self.__dict__.setdefault("original_blocks", None)

    def penalty_period(self) -> int:
        """The least common multiple of the terms' ``every`` (1 when every term is evaluated at each call): the
        calls of orthofx.penalty after which the pattern of evaluated terms repeats."""
        period = 1
        for term in self.penalties:
            period = period * term.every // math.gcd(period, term.every)
        return period


@contextlib.contextmanager
def default_device_set_aside() -> Iterator[None]:
    """Tensors created without a ``device`` inside go to the CPU, whatever ``torch.set_default_device`` the user
    chose (restored on exit, errors included).

    orthofx's own code sizes, draws and computes scratch tensors (Haar draws, frequency grids, gain figures) on the
    CPU and moves results to the layer's device, so that a seed gives the same weights on every device. A user's
    default device took those calls elsewhere: with ``'meta'`` they had no values (``orthofx.transform`` of a CPU
    model failed in ``geqrf`` or ``.item()``), with ``'cuda'`` they drew from another random stream. Only
    orthofx's own computations run under this: the user's forward (capture, example runs) keeps the user's
    default, which its own factory calls may rely on. Without a default device set, nothing changes (no torch
    function mode is entered)."""
    if torch.get_default_device().type == "cpu":
        yield
        return
    with torch.device("cpu"):  # a DeviceContext replaces the user's for the block and puts it back on exit
        yield


class EvalRun:
    """Run a module in eval mode without gradients, restoring every submodule's training flag afterwards
    (a forward in training mode would update BatchNorm statistics of the user's model), and the buffers of the
    user's own modules (:class:`UserBuffers`: a step counter or an EMA that the forward advances even in eval
    mode comes back to what it held, so ``transform``'s runs on the example inputs leave no trace in the
    returned model or, with ``inplace=True``, in the user's).

    The flags are set directly, on entry as on exit, not through ``train()`` / ``eval()``: those calls drop the
    kernel caches of orthofx's orthogonal layers, so each run of a train-mode model would rebuild every kernel.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.flags: list[tuple[nn.Module, bool]] = []
        self.buffers: UserBuffers | None = None

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.module.modules()]
        for m, _ in self.flags:
            m.training = False
        self._grad = torch.no_grad()
        self._grad.__enter__()
        self.buffers = UserBuffers(self.module)
        return self.module

    def __exit__(self, *exc):
        try:
            if self.buffers is not None:
                self.buffers.restore()
        finally:
            self.buffers = None
            self._grad.__exit__(*exc)
            for m, flag in self.flags:
                m.training = flag
        return False


def owns_user_buffers(module: nn.Module) -> bool:
    """Whether the buffers registered directly on ``module`` are the user's: not those of orthofx's own modules
    (:func:`orthofx.nn.tracing.is_orthofx_module`: ConvNorm's per-input-size filters, a monitor's statistics,
    which a run legitimately fills). A JacobianProbe adopts its wrapped block's registries (its buffers *are*
    the block's), so the block decides."""
    owner = module._block if isinstance(module, JacobianProbe) else module
    return not is_orthofx_module(owner)


class UserBuffers:
    """The buffers of the user's modules in ``root`` (:func:`owns_user_buffers`) as they are now, to be put back by
    :meth:`restore` after a run that may change them.

    Saved: each such module's buffer registry (name -> tensor object, so a buffer the forward *replaces*,
    ``self.buf = new``, or registers anew is undone) and a copy of each tensor's values (so one it *mutates*,
    ``self.count += 1``, ``self.ema.lerp_(x, m)``, is written back in place with ``copy_``: the tensor objects the
    model, its graph module and an optimizer hold stay the same). The cost is one copy of those buffers each way;
    no forward. Not saved: lazy layers' uninitialised buffers (the run is what initialises them, with their
    initial values) and inference tensors (nothing outside ``torch.inference_mode`` can write them in place).
    """

    def __init__(self, root: nn.Module):
        self.registries: list[tuple[nn.Module, dict[str, torch.Tensor | None], set[str]]] = []
        self.values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        seen: set[int] = set()
        with torch.no_grad():
            for module in root.modules():
                if id(module._buffers) in seen or not owns_user_buffers(module):
                    continue
                seen.add(id(module._buffers))
                buffers = dict(module._buffers.items())  # a TorchScript module's BufferDict cannot be iterated
                if not isinstance(module, torch.jit.ScriptModule):  # compiled code registers no buffers
                    self.registries.append((module, buffers, set(module._non_persistent_buffers_set)))
                for tensor in buffers.values():
                    if (tensor is None or id(tensor) in self.values
                            or isinstance(tensor, nn.parameter.UninitializedTensorMixin) or tensor.is_inference()):
                        continue
                    self.values[id(tensor)] = (tensor, tensor.clone())

    def restore(self) -> None:
        """Put every saved buffer back: the same tensor objects under the same names (buffers registered since
        are removed), holding the saved values."""
        with torch.no_grad():
            for module, entries, non_persistent in self.registries:
                registry = module._buffers
                for name in [name for name in registry if name not in entries]:
                    del registry[name]
                for name, tensor in entries.items():
                    if registry.get(name, _MISSING) is not tensor:
                        registry[name] = tensor
                if module._non_persistent_buffers_set != non_persistent:
                    module._non_persistent_buffers_set.clear()
                    module._non_persistent_buffers_set.update(non_persistent)
            for tensor, saved in self.values.values():
                tensor.copy_(saved)


_MISSING = object()


class ParametrizationState(UserBuffers):
    """The buffers of the torch parametrizations in ``root`` (``torch.nn.utils.parametrize``: the
    ``ParametrizationList`` of each parametrized tensor) as they are now, put back by :meth:`restore`.

    Reading a parametrized weight runs its parametrization, and in training mode ``spectral_norm``'s advances its
    power iteration (``_u``, ``_v``: ``u <- W v / ||W v||``) at each read. Planning, the passes and the report read
    weights many times (tens of reads for a 4-layer model); without this, a training-mode model came back from
    ``transform`` (and from ``report``) with other ``_u`` / ``_v`` than the model's, so other outputs
    (``sigma`` estimated after more iterations). Only the parametrizations' buffers are kept: a forward is their
    only intended writer.

    Example::

        import torch
        from orthofx.passes.base import ParametrizationState

        conv = torch.nn.utils.parametrizations.spectral_norm(torch.nn.Conv2d(3, 4, 3))   # training mode
        u = conv.parametrizations.weight[0]._u.clone()
        with ParametrizationState.kept(conv):
            conv.weight                  # one more power iteration: u changes ...
        assert torch.equal(conv.parametrizations.weight[0]._u, u)   # ... and is put back on exit
    """

    def __init__(self, root: nn.Module):
        modules = root.modules() if isinstance(root, nn.Module) else ()  # the callers refuse other objects
        lists = [owner for module in modules if torch.nn.utils.parametrize.is_parametrized(module)
                 for owner in module.parametrizations.values()]
        super().__init__(nn.ModuleList(lists))

    @classmethod
    @contextlib.contextmanager
    def kept(cls, root: nn.Module):
        state = cls(root)
        try:
            yield state
        finally:
            state.restore()


def per_dimension_text(values) -> str:
    """A conv's per-dimension kernel size or stride in words: ``3`` where it is the same in every dimension, ``3x1``
    otherwise."""
    values = tuple(values)
    return str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))


def describe_module(module: nn.Module, *, layer: nn.Module | None = None, note: str = "") -> str:
    """Short description of a layer, e.g. ``Conv2d(64->128, k=3, s=2)`` or ``Linear(512->10)``; orthofx's own
    conv-like and linear-like layers (same attributes as torch's) are described the same way.

    ``layer``: the module whose stride and dilation a conv is shown with, where they are not the conv's own (a
    frozen ConvNorm layer's, for its inner conv: that conv runs the layer's stride-1 correlation, its L_orth is
    the layer's); ``note``: said after them, ``Conv2d(4->8, k=3, s=2; frozen ConvNorm conv)``."""
    name = type(module).__name__
    if all(hasattr(module, a) for a in ("in_channels", "out_channels", "kernel_size", "stride")):
        geometry = module if layer is None else layer
        ks, ss = per_dimension_text(module.kernel_size), per_dimension_text(geometry.stride)
        groups = getattr(module, "groups", 1)
        extra = f", g={groups}" if groups != 1 else ""
        dilation = tuple(getattr(geometry, "dilation", (1,)))
        if any(d != 1 for d in dilation):
            extra += f", d={dilation[0] if len(set(dilation)) == 1 else dilation}"
        extra += f"; {note}" if note else ""
        return f"{name}({module.in_channels}->{module.out_channels}, k={ks}, s={ss}{extra})"
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return f"{name}({module.in_features}->{module.out_features})"
    return name


def weight_groups(module: nn.Module) -> int:
    """The number of independent blocks of ``module.weight``: a conv's ``groups`` (its weight is ``groups`` blocks
    ``out/groups x rest``, each acting on its own input channels), 1 for a linear. Read as an attribute, so that
    a wrapper at the site that keeps its conv's ``groups`` (ConvNorm's) counts too."""
    groups = getattr(module, "groups", 1)
    weight = getattr(module, "weight", None)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or weight is None:
        return 1
    return groups if weight.shape[0] % groups == 0 else 1


def is_uninitialised(module: nn.Module) -> bool:
    """Whether ``module`` is a lazy layer that has not run yet (its weight has no shape)."""
    return isinstance(getattr(module, "weight", None), nn.parameter.UninitializedParameter)


def each_mode(gm: nn.Module):
    """Yield ``""`` with ``gm.graph`` the graph ``gm`` was captured in, then, for a two-mode graph module
    (``orthofx.capture.ModalGraphModule``: a forward branching on ``self.training``), ``"@<mode>"`` with
    ``gm.graph`` the other mode's graph (the root's ``training`` flag is set for that, and restored): for code that
    rewrites or walks every graph of ``gm`` (on the current one alone, a two-mode model's other mode kept its
    decompositions: ``gm.eval()`` ran the eigh that ``svd_conditioning.to_newton_schulz`` reported as replaced)."""
    if getattr(gm, "other_graph", None) is None:
        yield ""
        return
    training = gm.training
    try:
        for flag in (gm.graph_training, not gm.graph_training):
            gm.training = flag
            yield "" if flag == gm.graph_training else f"@{gm.other_mode}"
    finally:
        gm.training = training


def weight_label(site: str, name: str) -> str:
    """How messages name a weight of a site: the site for a layer's ``weight``, ``site.name`` for one of several
    (``rnn.weight_hh_l0``)."""
    return site if name == "weight" else f"{site}.{name}"


def require_initialised(entry: PlanEntry, module: nn.Module, purpose: str) -> None:
    """Refuse a lazy layer that has not run yet (``purpose``: what its missing shape or weight prevents).

    For a pass's ``apply``, not ``accepts``: the example inputs run between planning and the passes, and that run
    is what initialises a lazy layer, so only a transform without example inputs ends here.
    """
    if is_uninitialised(module):
        raise PlanError(f"rule '{entry.rule_name}': {entry.site.name} ({type(module).__name__}) is a lazy layer that "
                        f"has not run yet, so {purpose}. Pass example_inputs=(x,) to orthofx.transform (the model "
                        "runs once before the rewrite), or run the model once before transforming it")


#: Tensor attributes, methods and functions whose result says what a tensor is (its shape, dtype, device), not
#: what it holds: a graph node computing one of them carries none of the tensor's values.
_METADATA_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim", "layout", "is_cuda", "is_sparse", "is_meta",
                                  "is_quantized", "requires_grad"})
_METADATA_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "stride", "storage_offset",
                               "get_device", "is_contiguous", "is_floating_point", "is_complex", "element_size"})
_METADATA_FUNCTIONS = frozenset({torch.numel, torch.is_tensor, torch.is_floating_point, torch.is_complex,
                                 torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default,
                                 torch.ops.aten.sym_stride.int, torch.ops.aten.sym_storage_offset.default})


# torch's convolutions, one tuple each for the passes and the report to test against.
TORCH_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TORCH_TRANSPOSED_CONV_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# Layers whose weights shape their output linearly: where a walk between a layer and a decomposition stops.
PRODUCER_TYPES = TORCH_CONV_TYPES + (nn.Linear,) + TORCH_TRANSPOSED_CONV_TYPES


def stops_producer_walk(module: nn.Module | None) -> bool:
    """Whether a walk between layers and the decompositions they feed (``plan.producers_feeding``, pre_svd's
    Change) stops at ``module``: a torch conv / linear, or a module of orthofx's own
    (:func:`~orthofx.nn.tracing.is_orthofx_module`: its layers, their subclasses and frozen forms) that has a weight
    (orthogonal convs and linears, ConvNorm, a JacobianProbe around a linear). Looked up without reading it:
    orthofx's layers compute ``weight`` as a property (the orthogonal kernel)."""
    if module is None:
        return False
    if isinstance(module, PRODUCER_TYPES):
        return True
    has_weight = (hasattr(type(module), "weight") or "weight" in module._parameters
                  or "weight" in module._buffers)
    return has_weight and is_orthofx_module(module)


def reads_only_metadata(node: fx.Node) -> bool:
    """Whether ``node`` reads only its input's metadata: ``x.shape``, ``x.size(0)``, ``x.dim()``, ``x.numel()``
    (symbolic tracing) or ``aten.sym_size`` (torch.export). Its value depends on the input's shape, not its
    values, so a data-flow walk (which layers feed a decomposition) must not pass through it: ``cov / x.shape[0]``
    divides by the batch size, and the layer producing ``x`` does not feed the covariance by that."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _METADATA_ATTRIBUTES
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    return node.op == "call_function" and node.target in _METADATA_FUNCTIONS


def decompositions_fed(ctx: PassContext, name: str) -> list[str]:
    """Function sites (decompositions) downstream of module ``name`` before another conv/linear intervenes, in the
    captured graph and in the other training mode's graph of a two-mode model; a read of a tensor's shape
    (``x.shape[0]``, :func:`reads_only_metadata`) carries none of its values, so the walk does not pass through
    it (``pre_svd`` lists these sites; ``isometric_init`` warns when it narrows a layer feeding one). A node is
    named by the site a pass recorded on it, else by the plan's site of that node name *in the same mode's graph*
    (both graphs of a two-mode model hold a node named ``linalg_eigh``)."""
    sites = ctx.function_sites()
    found: list[str] = []
    for suffix in each_mode(ctx.gm):  # ctx.gm.graph is that mode's graph
        by_node = {s.node: s.name for s in sites if s.mode == suffix[1:]}
        # fx's index of the call_module nodes, not a scan of every node: this runs once per layer of some passes.
        # The walk's result is a set (sorted at the end), so the order of the start nodes does not matter.
        calls = ctx.gm.graph.find_nodes(op="call_module", target=name, sort=False)
        stack = [u for n in calls for u in n.users]
        seen: set[fx.Node] = set()
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            site = node.meta.get("orthofx_site") or by_node.get(node.name)
            if site and site not in found and not site == name:
                found.append(site)
            if node.op == "call_module":
                try:
                    module = ctx.gm.get_submodule(str(node.target))
                except AttributeError:
                    module = None
                if stops_producer_walk(module):
                    continue
            if reads_only_metadata(node):
                continue
            stack.extend(node.users)
    return sorted(found)


def parameter_owners(root: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """``id(parameter) -> [(module path, module), ...]`` for every directly registered parameter: a parameter
    with several owners is tied (``b.weight = a.weight``)."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in root.named_modules():
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append((name, module))
    return owners


#: The hook registries ``nn.Module.__call__`` runs (forward pre-hooks, forward hooks, backward hooks) with the
#: per-hook flags torch keeps next to them (keyed by the same handle ids).
CALL_HOOK_REGISTRIES = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                         "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
                         "_backward_hooks")
_CALL_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def own_hook(function: Callable) -> Callable:
    """Mark ``function`` as a hook orthofx registers for its own bookkeeping (``orthofx.capture``'s
    :func:`~orthofx.capture.close_blocks_on_error`): :func:`call_hook_count` and the checks built on it leave it out,
    and pickles of a captured graph drop it (its rebuild registers it again)."""
    function.orthofx_own_hook = True  # type: ignore[attr-defined]
    return function


def is_own_hook(hook: Any) -> bool:
    """Whether ``hook`` is marked by :func:`own_hook`."""
    return getattr(hook, "orthofx_own_hook", False)


def call_hook_count(module: nn.Module) -> int:
    """How many hooks are registered on ``module`` itself that its ``__call__`` runs: forward pre-hooks, forward
    hooks and backward hooks (``register_forward_hook`` ...; global hooks, state-dict hooks and orthofx's own hooks
    on a captured graph, ``orthofx.capture.close_blocks_on_error``, not counted)."""
    return sum(not is_own_hook(hook)
               for name in _CALL_HOOKS for hook in (getattr(module, name, None) or {}).values())


#: The registries of state-dict hooks a module runs for its own entries, with the call that registers each kind.
STATE_DICT_HOOK_REGISTRIES = (("_state_dict_pre_hooks", "register_state_dict_pre_hook"),
                              ("_state_dict_hooks", "register_state_dict_post_hook"),
                              ("_load_state_dict_pre_hooks", "register_load_state_dict_pre_hook"),
                              ("_load_state_dict_post_hooks", "register_load_state_dict_post_hook"))


def state_dict_hook_kinds(module: nn.Module) -> list[str]:
    """The kinds of state-dict hook registered on ``module`` itself (not its submodules), each named by the call
    that registers it (``_register_state_dict_hook`` counts as ``register_state_dict_post_hook``)."""
    return [kind for name, kind in STATE_DICT_HOOK_REGISTRIES if module.__dict__.get(name)]


def lost_state_dict_hooks_warning(path: str, old: nn.Module, new: nn.Module) -> str | None:
    """What to tell the user when ``new`` replaces ``old`` at ``path`` and ``old``'s state-dict hooks are lost
    (``None`` when it has none, when ``new`` keeps ``old`` as a submodule, whose hooks then still run, or when
    they move to ``new``, :func:`move_state_dict_hooks`)."""
    kinds = state_dict_hook_kinds(old)
    if not kinds or new is old or same_state_dict_entries(old, new) or any(m is old for m in new.modules()):
        return None
    return (f"the layer '{path}' has state-dict hook(s) ({', '.join(kinds)}) that are not carried over to the "
            f"{type(new).__name__} replacing the {type(old).__name__}: its state_dict() entries have other names "
            "and tensors, so a hook written for the old entries would break or act on the wrong ones; adapt the "
            f"hooks and register them on gm.get_submodule('{path}')")


def move_call_hooks(old: nn.Module, new: nn.Module) -> None:
    """Make the forward / backward hooks registered on ``old`` run on ``new``, the layer that replaces it.

    A hook on a layer is about the place the layer has in the model (a feature extractor storing its output, a
    pre-hook scaling its input); the replacement computes that place's output, so the hooks go with it. The
    registries themselves move (not copies of them): a ``RemovableHandle`` refers to its registry, so the user's
    handle still removes the hook, and ``old`` is left with empty registries, so a replacement that still calls
    ``old`` (a Jacobian probe around a block) does not run them twice. Hooks ``new`` has of its own run after the
    moved ones. State-dict hooks stay behind: they are about ``old``'s parameters, which the replacement does not
    have under the same names (:func:`lost_state_dict_hooks_warning`), unless ``new`` shares them
    (:func:`move_state_dict_hooks`).
    """
    if old is new:
        return
    _move_registries(old, new, CALL_HOOK_REGISTRIES)
    _one_of_each_own_hook(new)
    if new.__dict__.get("_is_full_backward_hook") is None:
        new.__dict__["_is_full_backward_hook"] = old.__dict__.get("_is_full_backward_hook")


def _one_of_each_own_hook(module: nn.Module) -> None:
    """Keep one registration of each of orthofx's own hooks on ``module`` (:func:`own_hook`: a captured graph's,
    ``orthofx.capture.close_blocks_on_error``), where a replaced GraphModule's moved onto one that has
    them too: each one's work is per call, not per registration."""
    seen = set()
    for name in ("_forward_pre_hooks", "_forward_hooks"):
        registry = module.__dict__.get(name) or {}
        for key, hook in list(registry.items()):
            if not is_own_hook(hook):
                continue
            if hook in seen:
                del registry[key]
                module.__dict__.get("_forward_hooks_always_called", {}).pop(key, None)
            seen.add(hook)


def same_state_dict_entries(old: nn.Module, new: nn.Module) -> bool:
    """Whether ``new`` holds ``old``'s very parameter, buffer and submodule registries (a Jacobian probe adopts
    its block's, and ``to_plain`` gives the block back), so that its state_dict() has ``old``'s entries."""
    return all(new.__dict__.get(name) is old.__dict__.get(name) for name in ("_parameters", "_buffers", "_modules"))


def move_state_dict_hooks(old: nn.Module, new: nn.Module) -> None:
    """Make the state-dict hooks registered on ``old`` run on ``new`` when ``new`` has ``old``'s state-dict
    entries (:func:`same_state_dict_entries`): a hook written for those entries is right for ``new`` too, and
    ``old``'s own ``state_dict`` no longer runs once it is out of the model. Moved as :func:`move_call_hooks`
    moves the call hooks (the user's handles still remove them). Any other replacement keeps them on ``old``
    (:func:`lost_state_dict_hooks_warning`)."""
    if old is not new and same_state_dict_entries(old, new):
        _move_registries(old, new, tuple(name for name, _ in STATE_DICT_HOOK_REGISTRIES))


def _move_registries(old: nn.Module, new: nn.Module, names: tuple[str, ...]) -> None:
    for name in names:
        moved = old.__dict__.get(name)
        if not moved:
            continue
        own = new.__dict__.get(name)
        if own is moved:
            continue
        if own:
            moved.update(own)  # handle ids are unique across modules: no key is overwritten
        new.__dict__[name] = moved
        old.__dict__[name] = OrderedDict()


def derived_weight(module: nn.Module, name: str = "weight") -> str | None:
    """Why ``module.<name>`` (``weight``, or e.g. a recurrent layer's ``weight_hh_l0``) is computed rather than a
    parameter of the module's own, and how to undo that (``None`` when it is a parameter): a torch parametrization
    (``torch.nn.utils.parametrizations.weight_norm`` / ``spectral_norm`` / ``orthogonal``,
    ``torch.nn.utils.parametrize.register_parametrization``) or a forward pre-hook that rebuilds it before each call
    (the older ``torch.nn.utils.weight_norm`` and ``spectral_norm``, ``torch.nn.utils.prune``). A torch conv / Linear
    layer's weight or bias that is a tensor but neither a parameter nor a buffer of the layer is computed too: code of
    the user's own sets it (a forward pre-hook, as those hooks do, the parent's forward, a property;
    :func:`_plain_tensor_weight_reason`).

    A pass may read such a weight (L_orth of the weight the layer applies, differentiable down to the underlying
    parameters), but it cannot write it, step it or replace the layer without dropping what computes it."""
    what = "its weight" if name == "weight" else f"its {name}"
    parametrizations = getattr(module, "parametrizations", None)
    if isinstance(parametrizations, nn.ModuleDict) and name in parametrizations:
        kinds = ", ".join(type(p).__name__.lstrip("_") for p in parametrizations[name])
        return (f"{what} is computed by a torch parametrization ({kinds}; undo with "
                f"torch.nn.utils.parametrize.remove_parametrizations(layer, {name!r}))")
    if name in module._parameters or not isinstance(getattr(module, name, None), torch.Tensor):
        return None
    # what the older hooks keep instead of the weight: <name>_g / <name>_v (weight_norm), <name>_orig
    stored = sorted(n for n, p in module._parameters.items()
                    if p is not None and n in (f"{name}_g", f"{name}_v", f"{name}_orig"))
    hooks = [h for h in module._forward_pre_hooks.values()
             if getattr(h, "name", None) == name or getattr(h, "_tensor_name", None) == name]
    if not stored or not hooks:
        return _plain_tensor_weight_reason(module, name)
    kinds = [type(h).__name__ for h in hooks]
    undo = next((call for kind, call in _HOOK_UNDO.items() if kind in kinds), None)
    if undo is None and any(hasattr(h, "_tensor_name") for h in hooks):
        undo = "torch.nn.utils.prune.remove(layer, {name!r})"
    argument = "" if name == "weight" else f", {name!r}"
    return (f"{what} is not a parameter: a forward pre-hook ({', '.join(kinds)}) recomputes it from "
            f"{', '.join(stored)} at each call"
            + (f" (undo with {undo.format(name=name, argument=argument)})" if undo else ""))


#: The torch layers whose ``weight`` / ``bias`` the weight passes expect to be parameters of the layer's own (also
#: the layer types of ``orth_regularizer``'s L_orth term).
PARAMETER_WEIGHT_LAYERS = (nn.Linear,) + TORCH_CONV_TYPES + TORCH_TRANSPOSED_CONV_TYPES


def _plain_tensor_weight_reason(module: nn.Module, name: str) -> str | None:
    """:func:`derived_weight`'s reason for a torch conv / Linear layer whose ``<name>`` is a tensor but neither a
    parameter nor a buffer of the layer (:func:`_set_outside_text`): a reparametrization of the user's own, as torch's
    older weight_norm and pruning were written (``del layer.weight``, a ``weight_raw`` parameter, a forward pre-hook
    setting ``layer.weight = layer.weight_raw * mask``), a parent's forward tying it (``dec.weight =
    enc.weight.t()``), a ``weight`` property of a subclass. A write to such a tensor is lost at the next call (an
    orthogonal initialisation was: ``|W W^T - I|`` 2.29 after it), an optimizer hook steps a tensor that is not what
    the optimizer holds, and a replacement layer loses the computation (an ``OrthogonalLinear`` took the hook, and
    failed on ``weight_raw``). ``None`` for any other layer (an orthofx layer computes its weight by design), and
    for FSDP1's views of its flat parameter (:func:`flattened_by_fsdp1`, refused where they are read)."""
    if not isinstance(module, PARAMETER_WEIGHT_LAYERS) or name in module._buffers:
        return None
    tensor = getattr(module, name, None)
    if not isinstance(tensor, torch.Tensor) or flattened_by_fsdp1(tensor):
        return None
    return _set_outside_text(module, name)


def _set_outside_text(module: nn.Module, name: str) -> str:
    """Why ``module.<name>``, a tensor that is no parameter of the module's own, is computed, and the fixes.

    Which code sets it is not known: a pre-hook of the layer may or may not be the one (a logging hook is not), so
    the hooks are listed as the layer's, not blamed. A parameter named ``<name>`` next to a hook assigning it is no
    fix (torch refuses to assign a tensor to a parameter at every call); a parametrization is, and it keeps the
    computation (ConvNorm wraps such a layer, L_orth reads it)."""
    what = "its weight" if name == "weight" else f"its {name}"
    parametrization = f"with torch.nn.utils.parametrize.register_parametrization(layer, {name!r}, module)"
    exclude = "or leave the layer out of the rule with match.exclude"
    if isinstance(getattr(type(module), name, None), property):
        return (f"{what} is not a parameter of the layer: {type(module).__name__}.{name} is a property computing it "
                f"(write that computation as a parametrization {parametrization} instead, {exclude})")
    hooks = [getattr(hook, "__qualname__", type(hook).__name__) for hook in module._forward_pre_hooks.values()]
    outside = (f"{what} is not a parameter of the layer: something outside the layer sets it (a forward pre-hook, "
               "the parent's forward")
    if not hooks:
        return (f"{outside}, an assignment) (make {name} an nn.Parameter of the layer, compute it as a "
                f"parametrization {parametrization}, {exclude})")
    return (f"{outside}; the layer's forward pre-hooks: {', '.join(hooks)}) (write what a hook computes as a "
            f"parametrization {parametrization}, or drop the hook and make {name} an nn.Parameter of the layer, "
            f"{exclude})")


def hooked_weight(module: nn.Module, name: str, where: Callable[[], str]) -> torch.Tensor:
    """``module.<name>``, the weight an optimizer hook (Riemannian, NOG, OLR) acts on (``where()``: its site, for
    the error). A parametrization, ``torch.nn.utils.prune`` or code of the user's own (a pre-hook setting a plain
    tensor) added after ``orthofx.transform`` (:func:`derived_weight`) makes it a tensor computed from other
    parameters, which the optimizer steps instead: the hook saw no gradient of its own and did nothing, so the
    weight left the manifold silently (a Riemannian site's ``max |W^T W - I|``: 0.017 after three SGD steps,
    1.8e-7 unpruned). That raises an :class:`~orthofx.errors.OrthofxError` with the reason and the undo (for code of
    the user's own too: ``attach`` said the weight was missing from the optimizer, built from gm.parameters()),
    unless what it is computed from is frozen (nothing trains it: the hook is skipped as for any frozen weight)."""
    weight = module._parameters.get(name)
    if weight is not None:  # the usual case, checked first: the hooks run at every step
        return weight
    reason = derived_weight(module, name)
    if reason is not None and _trained_source(module, name):
        sources = _derived_from(module, name)
        steps = ("the optimizer steps the parameters it is computed from" if sources else
                 "the optimizer steps whatever it is computed from, not the weight")
        raise OrthofxError(
            f"{where()}: {reason}, added after orthofx.transform: {steps}, and orthofx's optimizer hook for this "
            "weight would see no gradient of its own and do nothing. Undo it before training with the attached "
            "optimizer, or apply it before orthofx.transform (the pass then declines the layer and says why)")
    return getattr(module, name)


def _trained_source(module: nn.Module, name: str) -> bool:
    """Whether something trains what ``module.<name>``, a computed weight (:func:`derived_weight`), is computed
    from. For a parametrization and torch's older hooks, their parameters (:func:`_derived_from`). For code of the
    user's own the sources are unknown: the layer's own parameters stand for them (its ``weight_raw``), as the tensor
    the last call left tells nothing (one computed under ``torch.no_grad()`` requires no gradient although its
    ``weight_raw`` trains; one computed before the layer was frozen still requires one). Only a layer without
    parameters of its own (a tied weight, no bias) is judged by that tensor."""
    sources = _derived_from(module, name)
    if sources:
        return any(p.requires_grad for p in sources)
    own = list(module.parameters(recurse=False))
    return any(p.requires_grad for p in own) if own else getattr(module, name).requires_grad


def _derived_from(module: nn.Module, name: str) -> list[torch.Tensor]:
    """The parameters ``module.<name>`` is computed from (:func:`derived_weight`): a parametrization's, or the older
    hooks' ``<name>_orig`` / ``<name>_g`` / ``<name>_v``."""
    parametrizations = getattr(module, "parametrizations", None)
    if isinstance(parametrizations, nn.ModuleDict) and name in parametrizations:
        return list(parametrizations[name].parameters())
    stored = (f"{name}_g", f"{name}_v", f"{name}_orig")
    return [p for n, p in module._parameters.items() if p is not None and n in stored]


_HOOK_UNDO = {"WeightNorm": "torch.nn.utils.remove_weight_norm(layer{argument})",
              "SpectralNorm": "torch.nn.utils.remove_spectral_norm(layer{argument})"}


def current_weight(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """``module.<name>`` as the layer's next call would compute it from its parameters now, differentiably.

    torch's older weight hooks (``torch.nn.utils.prune``, ``weight_norm``, ``spectral_norm``) set the attribute in a
    forward pre-hook, so between calls it holds the tensor of the last forward: after a ``torch.no_grad()``
    validation pass one without autograd history (an L_orth penalty read from it sent no gradient to
    ``weight_orig``), after ``backward()`` one whose graph is freed (a penalty computed before the forward failed
    inside torch), after an optimizer step the values before the step. Those hooks are recomputed here with the
    functions torch gives them, without side effects: pruning's ``apply_mask`` (``weight_orig * weight_mask``),
    ``WeightNorm.compute_weight`` and spectral_norm's ``W / sigma`` without a power-iteration step (``sigma`` from
    its current ``u``, ``v``, as it applies it in eval mode; a training forward's step is the forward's to take).
    A parameter, a parametrization (torch computes it at each access) or a user's own hook is read as it is
    (``None`` where the layer has no such attribute)."""
    if name in module._parameters:
        return module._parameters[name]
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod) and getattr(hook, "_tensor_name", None) == name:
            return hook.apply_mask(module)
        if isinstance(hook, WeightNorm) and hook.name == name:
            return hook.compute_weight(module)
        if isinstance(hook, SpectralNorm) and hook.name == name:
            # compute_weight(do_power_iteration=False) with u, v cloned: the next training forward steps them in
            # place, which failed the backward of a penalty computed before it
            original = getattr(module, f"{name}_orig")
            u, v = getattr(module, f"{name}_u").clone(), getattr(module, f"{name}_v").clone()
            return original / torch.dot(u, torch.mv(hook.reshape_weight_to_matrix(original), v))
    return getattr(module, name, None)


#: Recurrent layers: their hidden-to-hidden weights stack one block per gate (:func:`recurrent_hidden_weights`).
RECURRENT_TYPES = (nn.RNNBase, nn.RNNCellBase)


def recurrent_hidden_weights(module: nn.Module) -> list[tuple[str, int]]:
    """``(name, gates)`` of each hidden-to-hidden weight of a recurrent layer: ``weight_hh_l<k>`` (and
    ``weight_hh_l<k>_reverse``) of ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``, ``weight_hh`` of their cells. Such a
    weight stacks one ``hidden x hidden`` block per gate along dimension 0 (``hidden x proj_size`` for an LSTM with
    ``proj_size``): ``gates`` = 4 (LSTM: input, forget, cell, output), 3 (GRU: reset, update, new), 1 (RNN).

    >>> [(name, gates) for name, gates in recurrent_hidden_weights(nn.LSTM(3, 5, num_layers=2))]
    [('weight_hh_l0', 4), ('weight_hh_l1', 4)]
    """
    if isinstance(module, nn.RNNBase):  # torch's documented names (a parametrized one is no direct parameter)
        directions = ("", "_reverse") if module.bidirectional else ("",)
        names = [f"weight_hh_l{layer}{suffix}" for layer in range(module.num_layers) for suffix in directions]
    else:
        names = ["weight_hh"]
    if module.hidden_size < 1:
        return []
    return [(name, getattr(module, name).shape[0] // module.hidden_size) for name in names]


def treated_weight_names(module: nn.Module) -> list[str]:
    """The names of the weights the weight passes treat at a layer: a recurrent layer's hidden-to-hidden weights
    (:func:`recurrent_hidden_weights`), any other layer's ``weight``."""
    if isinstance(module, RECURRENT_TYPES):
        return [name for name, _ in recurrent_hidden_weights(module)]
    return ["weight"]


def check_scale_range(entry: PlanEntry, module: nn.Module, scale: float, name: str = "gain", note: str = "") -> None:
    """:class:`PlanError` for a ``scale`` (a rule's ``gain``) that the dtype of a weight the pass writes at
    ``module`` (:func:`treated_weight_names`) cannot hold times an orthogonal matrix
    (:func:`~orthofx.nn.orthogonal.gain_range_problem`: gain 1e39 filled a float32 weight with inf, 1e-40 left it
    zero, without a word), while planning; ``name`` is what the message calls it, ``note`` follows the problem."""
    for weight_name in treated_weight_names(module):
        weight = module._parameters.get(weight_name)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            problem = gain_range_problem(scale, weight.dtype, name)
            if problem is not None:
                raise PlanError(f"rule '{entry.rule_name}': {entry.site.name} ({describe_module(module)}): "
                                f"{problem}{note}; set 'gain' in the rule's 'with:'")


def complex_weight_reason(module: nn.Module, why: str) -> str | None:
    """``skipped``'s reason for a layer whose weight (a recurrent layer: a hidden-to-hidden weight) is complex, a
    pass ``why`` cannot treat; ``None`` for real ones. Read from the registered tensors' dtype alone: also for a
    lazy layer that has not run (it keeps the dtype it was built with), and without computing a weight that a
    property or a parametrization builds."""
    for name in treated_weight_names(module):
        weight = module._parameters.get(name, module._buffers.get(name))
        if isinstance(weight, torch.Tensor) and weight.is_complex():
            return (f"complex weight ({weight.dtype}): {why}; leave this layer out of the rule (match.exclude) or "
                    "give it a real dtype")
    return None


def gate_blocks_text(gates: int, block_shape: str) -> str:
    """How passes name the blocks a recurrent weight is cut into (:func:`recurrent_hidden_weights`):
    ``4 gate blocks of 6x6``, ``one block of 6x6`` (an ``nn.RNN``'s single gate)."""
    return f"{gates} gate blocks of {block_shape}" if gates > 1 else f"one block of {block_shape}"


def matrices_text(count: int, blocks: str = "groups", shape: str | None = None, side: str | None = None) -> str:
    """How passes name the orthonormal matrices they cut a weight into: ``count`` of them, called ``blocks``
    (``"groups"`` of a conv, ``"gate blocks"`` of a recurrent weight), each ``shape`` (``"6x6"``) with orthonormal
    ``side`` (``"rows"`` / ``"columns"``) where the pass names them: ``one 18x6 matrix with orthonormal columns``,
    ``3 gate blocks of 6x6, each with orthonormal columns``; ``one orthonormal matrix``, ``3 gate blocks, one
    orthonormal matrix each`` without them."""
    if count == 1:
        return f"one {shape} matrix with orthonormal {side}" if shape and side else "one orthonormal matrix"
    several = f"{count} {blocks}" + (f" of {shape}" if shape else "")
    return f"{several}, each with orthonormal {side}" if side else f"{several}, one orthonormal matrix each"


class TiedUse(NamedTuple):
    """How one site of a pass treats a weight it shares with other sites (tied weights), as :func:`check_tied`
    compares two of them. ``name``: the site (or ``site.weight_hh_l0``); ``where``: how a message introduces it
    (``'lin' (Linear, rule 'r')``, or just ``name``); ``layout``: what fixes the matrices the pass cuts the weight
    into (equal layouts, the same matrices); ``matrices``: those matrices in words (:func:`matrices_text`), a
    callable, run for an error only; ``settings``: ``(name, value, shown)`` for each other choice that decides what
    the pass does to the weight (``shown``: the value as a message writes it)."""

    name: str
    where: str
    layout: Hashable
    matrices: Callable[[], str]
    settings: tuple[tuple[str, Any, str], ...] = ()


def _same_setting(value: Any, other: Any) -> bool:
    """Settings agree: numbers (a scale) to 12 significant digits, anything else by ``==``."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (value, other)):
        return math.isclose(value, other, rel_tol=1e-12)
    return value == other


def check_tied(pass_name: str, this: TiedUse, first: TiedUse, done: str, *, other_matrices: str,
               other_settings: str) -> None:
    """Raise :class:`PlanError` unless ``this`` site treats a weight it shares with ``first`` (an earlier site,
    which this pass ``done`` already: ``"constrains already"``) as ``first`` does: the same matrices (``layout``)
    and the same ``settings``. Then the weight gets the pass's work once, at ``first``; otherwise whichever site
    came second would undo or redo the other's.

    The message reads ``<pass>: <this> shares its weight with <first>, which this pass <done>`` and goes on with
    ``other_matrices`` (the layouts differ) or ``other_settings`` (a setting differs), format strings that may
    name ``{this}`` / ``{first}`` (the sites' names), ``{this_matrices}`` / ``{first_matrices}`` (their
    ``matrices()``) and ``{differs}`` (``<setting> <this one's> vs <first's>`` for each setting that differs)."""
    if this.layout != first.layout:
        rest = other_matrices
    elif any(not _same_setting(mine[1], theirs[1]) for mine, theirs in zip(this.settings, first.settings)):
        rest = other_settings
    else:
        return
    differs = ", ".join(f"{mine[0]} {mine[2]} vs {theirs[2]}" for mine, theirs in zip(this.settings, first.settings)
                        if not _same_setting(mine[1], theirs[1]))
    needs = {"this": this.name, "first": first.name, "differs": differs}
    if "matrices}" in rest:  # built for the message only (a reshape of a non-contiguous weight copies it)
        needs.update(this_matrices=this.matrices(), first_matrices=first.matrices())
    raise PlanError(f"{pass_name}: {this.where} shares its weight with {first.where}, which this pass {done}"
                    + rest.format(**needs))


def recurrent_weights_reason(module: nn.Module) -> str | None:
    """Why a pass cannot treat a recurrent layer's hidden-to-hidden weights (``None`` when it can): none to treat
    (``hidden_size=0``), or one computed by a torch parametrization or recomputed by a forward pre-hook (the
    older ``weight_norm`` / ``spectral_norm``, ``prune``), which an optimizer hook could not step and a write
    would not reach (the penalty of ``orth_regularizer`` declines them alike, so one rule treats a recurrent
    layer as any of the passes would)."""
    weights = recurrent_hidden_weights(module)
    if not weights or any(getattr(module, name).numel() == 0 for name, _ in weights):
        return "empty hidden-to-hidden weights (hidden_size=0): nothing to make orthogonal"
    for name, _ in weights:
        reason = derived_weight(module, name)
        if reason is None and name in module._buffers:  # stored, but no optimizer holds it
            reason = f"its {name} is not a parameter: register it as an nn.Parameter of the layer"
        elif reason is None and name not in module._parameters:  # set by code of the user's own
            reason = _set_outside_text(module, name)
        if reason is not None:
            return reason
    return None


# How many times :func:`replace_module` has run, or a parameter was registered while passes run
# (:func:`parameters_watched`): a :class:`PassContext` rebuilds its index of the penalised tensors when this moved,
# as a replaced layer takes its weight with it and a new parameter (a pass of the user's untying or tying weights)
# changes which tensor a term penalises.
_MODULE_REPLACEMENTS = [0]


@contextlib.contextmanager
def parameters_watched() -> Iterator[None]:
    """While the passes run (inside ``transform``'s trace lock): every parameter registration (``m.weight =
    nn.Parameter(...)``, ``b.weight = a.weight``, a parametrization, ``load_state_dict(assign=True)``) moves
    :data:`_MODULE_REPLACEMENTS`, so that :class:`PassContext`'s index of penalised tensors is not read stale."""
    def registered(module, name, parameter):
        _MODULE_REPLACEMENTS[0] += 1

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(registered)
    try:
        yield
    finally:
        handle.remove()


def replace_module(root: nn.Module, qualname: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``qualname`` in ``root`` (setattr on the parent) and return the module it replaced.

    Graph nodes that call ``qualname`` now call ``new``; this is how passes swap a layer for its orthogonal,
    normalised or probed version, and how ``freeze`` swaps it back for a plain one. The forward and backward hooks
    registered on the replaced module move to ``new`` (:func:`move_call_hooks`), so they keep firing; so do its
    state-dict hooks where ``new`` has its state-dict entries (:func:`move_state_dict_hooks`).
    """
    parent_name, _, child = qualname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    move_call_hooks(old, new)
    move_state_dict_hooks(old, new)
    setattr(parent, child, new)
    _MODULE_REPLACEMENTS[0] += 1  # the tensors cached penalty indexes hold may have left (PassContext)
    if type(new).__module__.startswith("orthofx."):
        new.__dict__[SITE_ATTRIBUTE] = qualname  # the layer's errors name it (errors.layer_label)
    return old


@dataclass
class PassContext:
    """What a pass works with: the graph module being rewritten and the manifest to record into."""

    gm: torch.fx.GraphModule
    manifest: Manifest
    # Positional inputs of each planned module site's first call on the example inputs (eval mode, detached);
    # empty without example inputs. Held only while the passes run, never stored in the manifest.
    site_inputs: dict[str, tuple] = field(default_factory=dict)
    # The module sites the run on the example inputs called as modules (eval mode, no gradients; calls inside a
    # torch.cond branch are not seen); None without example inputs. Held only while the passes run.
    called_sites: set[str] | None = None
    # transform(..., inplace=True): the modules the passes replace are the user's own, whose parameters an optimizer
    # built before the transform may hold (recorded for attach's warning, optim.note_replaced_layer)
    replaces_user_layers: bool = False
    # where a module added to a model with no tensor to take the device from goes: the example inputs' device, else
    # torch's default device where the user called transform (the passes run with the CPU as default device)
    user_default_device: torch.device | None = None
    # ``form -> {id(tensor): (name, tensor)}`` of the tensors the penalty's terms penalise (first term first), built
    # incrementally so that adding n terms costs O(n) calls of PenaltyTerm.penalised, not O(n^2); the tensors are
    # held so that their ids stay theirs. See :meth:`_penalised_index`.
    _index: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _index_key: tuple = field(default=(), init=False, repr=False, compare=False)
    _function_sites: tuple = field(default=(None, 0, ()), init=False, repr=False, compare=False)

    def function_sites(self) -> list[Site]:
        """The plan's function sites (decompositions), kept while the plan's site list is the same one: a pass that
        asks for each of its layers (:func:`decompositions_fed`) would otherwise scan every site each time."""
        sites = getattr(self.manifest.plan, "sites", ())
        kept, count, found = self._function_sites
        if kept is not sites or count != len(sites):
            found = [s for s in sites if s.kind == "function"]
            self._function_sites = (sites, len(sites), found)
        return found

    def module(self, site: Site | str) -> nn.Module:
        name = site.name if isinstance(site, Site) else site
        return self.gm.get_submodule(name)

    def replace_module(self, site: Site | str, new: nn.Module) -> nn.Module:
        """Swap the module at ``site`` for ``new`` (see :func:`replace_module`); returns the old module.

        State-dict hooks on the old module do not go with it: an :class:`~orthofx.OrthofxWarning` names them,
        and the capture warnings of the manifest keep the message next to the one about the root's."""
        from ..optim import note_replaced_layer  # optim imports this module

        name = site.name if isinstance(site, Site) else site
        message = lost_state_dict_hooks_warning(name, self.gm.get_submodule(name), new)
        old = replace_module(self.gm, name, new)
        if self.replaces_user_layers:
            note_replaced_layer(old, new)
        if message is not None:
            warnings.warn(message, OrthofxWarning, stacklevel=caller_stacklevel())
            capture = getattr(self.manifest, "capture", None)
            if capture is not None and message not in capture.warnings:
                capture.warnings.append(message)
        return old

    def node(self, site: Site) -> torch.fx.Node:
        for n in self.gm.graph.nodes:
            if n.name == site.node:
                return n
        raise KeyError(f"no node {site.node!r} in the graph for site {site.name!r}")

    def record(self, change: Change) -> None:
        self.manifest.changes.append(change)

    def add_penalty(self, term: PenaltyTerm) -> str | None:
        """Add ``term`` to the penalty, unless the terms there already penalise every tensor it penalises in the
        same form (:meth:`~PenaltyTerm.penalised`: layers with a tied weight); returns the name the earlier terms
        give that tensor, or ``None`` when ``term`` was added."""
        index = self._penalised_index()
        penalised = term.penalised(self.gm)
        earlier = [index.get(form, {}).get(id(tensor), (None,))[0] for _, tensor, form in penalised]
        if earlier and all(earlier):
            return earlier[0]
        self.manifest.penalties.append(term)
        self._index_term(penalised, len(self.manifest.penalties))  # known already: no second call
        return None

    def penalised_tensors(self, form: tuple) -> dict[int, str]:
        """``id(tensor) -> name`` of the tensors the penalty's terms so far penalise in ``form``, for a pass that
        leaves those out of a term of its own (a tied weight is counted once). A new dict: the caller may add
        to it."""
        return {key: name for key, (name, _) in self._penalised_index().get(form, {}).items()}

    def _penalised_index(self) -> dict:
        """The index of :attr:`_index`, brought up to date: the terms appended since it was built are added; it is
        built again from all terms when the penalty list is another one, lost or replaced terms, or when a layer
        was replaced (:func:`replace_module`) since, whose weight an indexed term may no longer penalise."""
        penalties = self.manifest.penalties
        key = self._index_key
        fresh = (key and key[0] is penalties and key[1] <= len(penalties) and key[3] == _MODULE_REPLACEMENTS[0]
                 and (key[1] == 0 or penalties[key[1] - 1] is key[2]))
        start = key[1] if fresh else 0
        if not fresh:  # from scratch; the key names the terms indexed so far (a penalised() may raise)
            self._index, self._index_key = {}, ()
        for count, term in enumerate(penalties[start:], start + 1):
            self._index_term(term.penalised(self.gm), count)
        return self._index

    def _index_term(self, penalised: list[tuple[str, torch.Tensor, tuple]], count: int) -> None:
        """Add what the ``count``-th term of the penalty penalises to the index (an earlier term keeps its name),
        which then holds the first ``count`` terms."""
        for name, tensor, form in penalised:
            self._index.setdefault(form, {}).setdefault(id(tensor), (name, tensor))
        penalties = self.manifest.penalties
        self._index_key = (penalties, count, penalties[count - 1], _MODULE_REPLACEMENTS[0])

    def add_optimizer_hook(self, hook: OptimizerHook) -> None:
        """Record ``hook``; refused (:class:`PlanError`) for a layer whose weight is computed
        (:func:`derived_weight`): the hook would step a tensor the next forward recomputes, and no optimizer
        holds it."""
        try:
            module = self.module(hook.site)
        except AttributeError:  # a hook of a function site
            module = None
        reason = derived_weight(module) if module is not None and "weight" in hook.parameter_names else None
        if reason is not None:
            raise PlanError(f"rule '{hook.rule}': {hook.site} ({describe_module(module)}): {reason}, so "
                            f"{type(hook).__name__} cannot update it around optimizer.step(): exclude the layer "
                            "from the rule (match.exclude)")
        self.manifest.optimizer_hooks.append(hook)


class Pass:
    """Base class of graph passes. Subclass, set the class attributes, implement :meth:`apply`, and decorate
    with :func:`orthofx.passes.register_pass`.

    Class attributes:
        name: the name rules use under ``apply:``.
        params: the :class:`Param` specs accepted under ``with:``.
        site_kinds: which site kinds the pass handles (``"module"``, ``"function"``, ``"block"``).
        module_types: for module sites, the layer types it can rewrite (subclasses included); empty means any.
        ops: for function sites, the canonical op names it can rewrite; empty means any.
        group: passes of one group compete for a site (the first matching rule in the policy wins); passes of
            different groups all apply. Empty means the pass's own name. Built-in passes that govern a layer's
            weights (L_orth, hard orthogonal layers, Riemannian training, Pre-SVD treatments) share ``"weight"``.

    Example::

        import torch, orthofx
        from orthofx.passes import Pass, Param, register_pass, unregister_pass, Change

        @register_pass
        class ScaleWeights(Pass):
            name = "scale_weights"
            params = (Param("factor", 1.0, (float,), "multiplier", minimum=0.0),)
            site_kinds = frozenset({"module"})
            module_types = (torch.nn.Linear,)

            def apply(self, ctx, entries):
                for e in entries:
                    with torch.no_grad():
                        ctx.module(e.site).weight.mul_(e.params["factor"])
                    ctx.record(Change(e.site.name, e.rule_name, self.name, "scaled weight", e.params))

        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        gm = orthofx.transform(model, {"rules": [{"match": {"type": "Linear"}, "apply": "scale_weights",
                                                  "with": {"factor": 0.5}}]})
        torch.testing.assert_close(gm.get_submodule("0").weight, 0.5 * model[0].weight)
        unregister_pass("scale_weights")
    """

    name: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    site_kinds: ClassVar[frozenset[str]] = frozenset({"module"})
    module_types: ClassVar[tuple[type, ...]] = ()
    ops: ClassVar[tuple[str, ...]] = ()
    group: ClassVar[str] = ""
    #: The pass puts another module at the site (an orthogonal layer, a ConvNorm wrapper).
    replaces_module: ClassVar[bool] = False
    #: What the pass puts at the site wraps the layer under another type (a Jacobian probe), so no later pass of
    #: another group can act on the layer there: planning refuses such a rule (the other order works).
    hides_layer: ClassVar[bool] = False
    #: The pass acts on the layer's weights through such a wrapper (a Jacobian probe adopts the layer's parameters),
    #: so planning lets it follow one.
    sees_through_wrappers: ClassVar[bool] = False
    #: The pass needs the site's original layer (it writes the weight in place, or rebuilds the layer): a rule
    #: of another group that replaced the layer earlier in the policy leaves it nothing to act on.
    needs_original_module: ClassVar[bool] = False
    #: The pass writes the layer's weight or updates it around ``optimizer.step()``, so the weight must be a
    #: parameter of the layer's own. Planning skips layers whose weight is computed (:func:`derived_weight`: torch
    #: parametrizations, weight_norm / spectral_norm / pruning hooks) for such passes, and for passes that replace
    #: the layer or need the original one (which would drop what computes the weight).
    needs_weight_parameter: ClassVar[bool] = False
    #: The replacement holds the original layer and computes with its ``weight`` attribute (ConvNorm's wrapper), so
    #: a weight a torch parametrization computes stays computed: planning does not skip such layers for the pass
    #: (it still skips weights that a forward pre-hook of the layer recomputes: the wrapper does not call it).
    wraps_original_module: ClassVar[bool] = False
    #: Why the pass cannot treat a layer whose weight is complex, as the end of a sentence (``None``: it can);
    #: planning then declines such a layer (:func:`complex_weight_reason`), rather than the pass failing on it
    #: with an error that names no site.
    complex_weights: ClassVar[str | None] = None

    @classmethod
    def param_spec(cls) -> dict[str, Param]:
        return {p.name: p for p in cls.params}

    @classmethod
    def validate_params(cls, given: dict[str, Any]) -> dict[str, Any]:
        """Defaults filled in and every given value validated; ``KeyError``/``ValueError`` name the problem.

        A pass may override it to convert values (a string ``'a,b'`` into a list, a fraction into a percentage):
        the rule's ``params`` are then its output and ``given_params`` what was written, which ``Policy.to_yaml``
        writes. It need not accept its own output, but must give equal params for equal input: a Policy object
        whose ``params`` are not what this gives for its ``given_params`` is refused where it is used."""
        spec = cls.param_spec()
        out = {name: p.default for name, p in spec.items()}
        for key, value in given.items():
            if key not in spec:
                allowed = ", ".join(sorted(spec)) or "none"
                raise KeyError(f"unknown parameter '{key}' for pass '{cls.name}'; allowed: {allowed}")
            out[key] = spec[key].validate(value)
        return out

    def accepts(self, site: Site, module: nn.Module | None) -> str | None:
        """``None`` if the pass can handle ``site``; otherwise a short reason why not."""
        if site.kind not in self.site_kinds:
            return f"pass '{self.name}' handles {', '.join(sorted(self.site_kinds))} sites, not {site.kind} sites"
        if site.kind == "module" and self.module_types and not isinstance(module, self.module_types):
            names = ", ".join(t.__name__ for t in self.module_types)
            return f"pass '{self.name}' handles {names}, not {type(module).__name__}"
        if site.kind == "function" and self.ops and site.target not in self.ops:
            return f"pass '{self.name}' handles {', '.join(self.ops)}, not {site.target}"
        if site.kind == "module" and self.complex_weights and module is not None:
            return complex_weight_reason(module, f"{self.name} {self.complex_weights}")
        return None

    def accepts_params(self, site: Site, module: nn.Module | None, params: dict[str, Any]) -> str | None:
        """Like :meth:`accepts`, for reasons that depend on the rule's validated parameters (e.g. the
        ``riemannian`` pass's ``only_square``): ``None`` (the default) accepts. A site declined here is
        skipped like one :meth:`accepts` declines: ``explain`` and ``report`` show ``skipped: <reason>``."""
        return None

    def planned_outcome(self, site: Site, module: nn.Module | None, params: dict[str, Any]) -> str | None:
        """What applying the pass to a site it accepts will do, when that is not its usual change and can be
        told before running it (``orthogonal_conv`` on a layer no orthogonal version of exists: its
        ``on_impossible``); ``explain`` shows ``apply: <outcome>``. ``None`` (the default): the usual change."""
        return None

    def weight_values_read(self, params: dict[str, Any]) -> str | None:
        """What the pass, run with ``params``, reads of a layer's weight values, as words following its name
        (``"measures the weight's orthogonality defect"``; a parenthesis after it is shown in errors only), or
        ``None`` (the default) when it reads none: it wraps the layer, or reads the weight only when the penalty is
        computed. Planning gives a layer on the meta device (shapes without values) a
        :class:`~orthofx.errors.MetaWeightError` for such a pass, which ``transform`` raises before any pass runs
        and ``explain`` shows as ``apply: fails: ...``: the pass would fail inside torch after the passes before it
        had run (with ``inplace=True``, having written the user's weights)."""
        return None

    def handles_derived_weight(self, params: dict[str, Any]) -> bool:
        """Whether the pass, with the rule's ``params``, takes a layer whose weight is computed
        (:func:`derived_weight`) that planning would skip for it (``needs_weight_parameter``, or a pass that replaces
        the layer): ``orthogonal_conv`` with ``on_impossible: regularize`` puts L_orth on it instead."""
        return False

    def check_plan(self, gm: nn.Module, entries: list[PlanEntry]) -> None:
        """Raise :class:`PlanError` for a combination of this pass's ``entries`` (all of them, in plan order, as
        :meth:`apply` gets them) that :meth:`apply` would refuse, e.g. a weight tied between two sites that need
        different matrices; called when the plan is built, so that ``explain`` refuses what ``transform`` refuses,
        before any pass runs. Reads shapes and tensor identities, not values. The default accepts everything."""

    def replaces_layer(self, params: dict[str, Any]) -> bool:
        """Whether the pass, run with ``params``, puts another module at its sites, so that a later rule of another
        group that needs the original layer is refused at planning. Default: :attr:`replaces_module`; a pass
        that replaces the layer for some parameters only (``pre_svd`` with ``weight: orthogonal``) says so."""
        return self.replaces_module

    def optimizer_hooked_weights(self, gm: nn.Module, entries: list[PlanEntry]) -> list[tuple[PlanEntry, str, str]]:
        """``(entry, weight name at the entry's module, what its hook does)`` for each weight this pass's ``entries``
        (all of them, in plan order) will step with an optimizer hook (``orthofx.attach`` runs them around
        ``optimizer.step()``). The plan refuses one weight that two passes hook: the update would depend on the
        order of the rules. The default hooks nothing."""
        return []

    def apply(self, ctx: PassContext, entries: list[PlanEntry]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError
