"""How orthofx's layers meet PyTorch's tracers when a user's own code traces a model holding them.

- :func:`fx_tracer_of` and :func:`record_as_leaf`: a layer whose computation depends on runtime shapes or values
  (ConvNorm's grid, a monitor's buffer writes, a Jacobian probe's nested autograd) records itself as one
  ``call_module`` node when ``torch.fx.symbolic_trace`` hands it a Proxy, as fx does for ``nn.Conv2d``.
- :func:`exported_as_plain_module`: ``torch.export`` of a GraphModule root (a transformed model captured again)
  keeps its submodules' call signatures, so orthofx's layers stay leaves in export capture too.
- :func:`in_func_transform`: whether a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``) is running the
  call, where in-place buffer writes and nested autograd cannot run.
- :func:`recomputing_in_backward` and :func:`checkpoint_region`: whether activation checkpointing recomputes the
  call, and in which region; :func:`record_for_recomputation` / :func:`recorded_for_recomputation` replay a
  decision a region's forward took (``orthofx.penalty``'s ``every`` call, a probe's random state) in its
  recomputation.
- What counts as orthofx's own module, the one definition the rest of orthofx asks (three questions, three
  answers, each a superset of the one before):

  * :func:`is_orthofx_layer`: a *public layer*, an instance of a module class ``orthofx.nn`` exports in its
    ``__all__`` (user subclasses included). These carry what ``orthofx.penalty`` and ``orthofx.report`` measure.
  * :func:`is_orthofx_nn_class`: a class *defined* in the package ``orthofx.nn`` (``orthofx.nn`` itself or a
    module ``orthofx.nn.<x>``), public or not: the layers, their frozen forms (``FourierConv``,
    ``FrozenConvNormNd``, ``PassThrough``), internal helpers (``CircularPad``, ``CircularFold``). Capture keeps
    such a class as a tracing leaf (see its docstring for why that is broader than the public layers).
  * :func:`is_orthofx_module`: either of the two: a module whose state orthofx's code owns (its buffers are
    caches and statistics of orthofx's, not the user's).

  Whether a module must be *frozen* is another question (``orthofx.export``: it offers ``to_plain()``).

Example::

    import torch
    from orthofx.nn import ConvNormConv2d
    model = torch.nn.Sequential(ConvNormConv2d(torch.nn.Conv2d(3, 8, 3, padding=1)), torch.nn.ReLU())
    gm = torch.fx.symbolic_trace(model)     # the ConvNorm layer is one call_module node "0"
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import weakref
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn

from orthofx.errors import CaptureError, LayerArgumentError, layer_label

__all__ = ["fx_tracer_of", "record_as_leaf", "exported_as_plain_module", "in_export", "in_func_transform",
           "recomputing_in_backward", "checkpoint_region", "record_for_recomputation", "recorded_for_recomputation",
           "NOT_RECORDED", "is_orthofx_layer", "orthofx_layer_types", "is_orthofx_nn_class",
           "is_orthofx_module", "FuncTransformRefusal", "ForwardModeRefusal"]

#: The package whose classes are orthofx's layers and their helpers.
ORTHOFX_NN_PACKAGE = "orthofx.nn"


def fx_tracer_of(args, kwargs=None) -> torch.fx.Tracer | None:
    """The ``torch.fx`` tracer symbolically tracing these call arguments (of the first Proxy among them), or
    ``None`` when they hold no Proxy (an eager call, ``torch.compile``, ``torch.export``)."""
    for leaf in pytree.tree_leaves((args, kwargs or {})):
        if isinstance(leaf, torch.fx.Proxy):
            return leaf.tracer
    return None


def record_as_leaf(module: nn.Module, tracer: torch.fx.Tracer, args: tuple, kwargs: dict, why: str):
    """Record the call ``module(*args, **kwargs)`` as one ``call_module`` node of the graph ``tracer`` builds
    and return its Proxy: what ``torch.fx`` does for a leaf module, done by a layer whose computation depends on
    runtime values the Proxies do not carry (``why``), so that ``torch.fx.symbolic_trace`` of a model holding it
    gives a GraphModule that calls the layer itself (same outputs, gradients and state updates, in every mode)
    instead of failing inside its forward with a raw "symbolically traced variables cannot be used as inputs to
    control flow". A layer traced as the root itself (``symbolic_trace(layer)``), or one that is not a submodule
    of the traced root, cannot be a node: :class:`~orthofx.errors.CaptureError` says so."""
    try:
        path = tracer.path_of_module(module)
    except NameError:
        path = ""
    if not path:
        raise CaptureError(
            f"{layer_label(module)} cannot be traced symbolically by itself: {why}. Trace a model that holds it as a "
            f"submodule (torch.fx then records the layer as one call_module node), or use the layer as it is",
            module_path="")
    return tracer.create_proxy("call_module", path, tuple(args), dict(kwargs))


@contextlib.contextmanager
def exported_as_plain_module(model: nn.Module):
    """Let ``torch.export.export(model, ..., preserve_module_call_signature=...)`` keep the call signatures of
    ``model``'s submodules when ``model`` is a ``torch.fx.GraphModule`` (a model that ``orthofx.transform`` or
    ``orthofx.capture`` returned, captured again).

    torch.export runs a GraphModule root through ``torch.fx.Interpreter`` and skips the submodule wrapping that
    records call signatures, so every leaf of it, orthofx's monitors included, came back as inlined ATen ops (the
    eigvalsh inside a :class:`~orthofx.nn.conditioning.DecompositionMonitor` then looked like a decomposition site of
    the user's). Inside this context ``model``'s class is a plain ``nn.Module`` subclass with the same ``forward``
    (the GraphModule's generated code, which reads only the module's submodules, parameters, buffers and
    attributes); the class is restored on exit, also when the export fails. Other modules pass through unchanged.

    Example::

        import torch
        from torch import nn
        from orthofx.nn.tracing import exported_as_plain_module

        gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
        x = torch.randn(2, 3)
        with exported_as_plain_module(gm):
            ep = torch.export.export(gm, (x,), preserve_module_call_signature=("0",))
        assert isinstance(gm, torch.fx.GraphModule)  # its class is back
        assert torch.equal(ep.module()(x), gm(x))
    """
    if not isinstance(model, torch.fx.GraphModule):
        yield model
        return
    graph_class = type(model)
    real_recompile = getattr(model, "real_recompile", None)
    if callable(real_recompile) and getattr(graph_class, "_needs_recompile", lambda: False)():
        real_recompile()  # a lazy GraphModule compiles its forward on the first call, through its own class
    model.__class__ = type(graph_class.__name__, (nn.Module,), {"forward": graph_class.forward,
                                                                  "__module__": graph_class.__module__})
    try:
        yield model
    finally:
        model.__class__ = graph_class


def in_export() -> bool:
    """Whether ``torch.export`` is capturing this call, eagerly or under dynamo. ``torch.compiler.is_exporting()``
    is the public query, but torch 2.11's dynamo answers it ``True`` under every ``torch.compile`` (a compiled
    Jacobian probe refused to estimate); the flag export sets, which the query returns eagerly, is read instead
    where torch has it."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


def in_func_transform() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev`` ...) is running this call eagerly
    (under ``torch.compile`` the query is not traced, and answers no)."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


class FuncTransformRefusal(LayerArgumentError):
    """A layer that writes its state in place (a ConvNorm layer's running filter in training mode, a
    condition-number monitor's records) refusing to run inside a ``torch.func`` transform
    (:func:`in_func_transform`), where torch refuses such writes. A caller that can run the call without a
    transform catches it: ``orthofx.metrics.jacobian_singular_values`` falls back to autograd's loop."""


class ForwardModeRefusal(NotImplementedError):
    """An orthofx op refusing a forward-mode derivative (``eigh_stable`` / ``svd_stable``: their bounded gradient
    is a backward formula). The ``NotImplementedError`` torch raises for an op without a forward-AD formula, so
    callers that fall back to reverse mode at such ops (``orthofx.metrics.jacobian_isometry``) treat it alike."""


def recomputing_in_backward() -> bool:
    """Whether this call runs inside a backward pass, as activation checkpointing's recomputation of a forward
    (``torch.utils.checkpoint``, reentrant or not) does, eagerly. State that a forward updates (running filters,
    condition-number records, Jacobian estimates) must not be updated again there: the step's forward already did,
    and BatchNorm's double update of its running statistics is the behaviour to avoid. (A forward that user code
    runs from inside a backward hook looks the same and updates nothing either.) Under ``torch.compile`` the
    query is not traced and answers no (compiled checkpointing recomputes the graph's operations, not the module's
    Python code)."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


# torch.utils.checkpoint (use_reentrant=False) runs a region's forward once, then again inside backward to recompute
# its saved tensors, and requires the two to save the same tensors (CheckpointError otherwise) and, for correct
# gradients, to draw the same random numbers. A decision the forward took from state that moves on (the call of an
# ``every`` period, the random draws of a Jacobian estimate) must therefore be replayed in the recomputation as the
# forward took it, per region: several checkpointed micro-batches run before one backward, which then recomputes
# them in any order. torch does not expose the region; its saved-tensor hooks on top (``_checkpoint_hook`` in the
# forward, ``_recomputation_hook`` in the recomputation) hold its ``_CheckpointFrame`` in their closures.

#: ``frame -> (records, replayed)``: ``records[key]`` the values the region's forward kept, one per call in call
#: order; ``replayed[(key, backward id)]`` how many of them its recomputation in that backward has read (a graph
#: kept with retain_graph is recomputed again by the next backward). Weak: a region's records go with its graph.
_CHECKPOINT_RECORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

#: What :func:`recorded_for_recomputation` returns where nothing was recorded.
NOT_RECORDED = object()

def checkpoint_region() -> tuple[Any, Any] | None:
    """The non-reentrant ``torch.utils.checkpoint`` region this call runs in, read from the saved-tensor hooks on
    top: ``(frame, None)`` in its forward, ``(frame, backward id)`` in its recomputation inside backward; ``None``
    elsewhere, under torch.compile (which recomputes graphs, not Python code), in reentrant checkpointing (no hooks),
    or where other hooks are on top (``save_on_cpu`` inside the region): callers then fall back to their defaults."""
    if torch.compiler.is_compiling():
        return None
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is None:
        return None
    pack = inspect.unwrap(hooks[0])  # the recomputation's hook is wrapped by torch._dynamo.disable
    code, closure = getattr(pack, "__code__", None), getattr(pack, "__closure__", None)
    if code is None or not closure:
        return None
    cells = dict(zip(code.co_freevars, closure))
    name = getattr(pack, "__qualname__", "")
    try:
        if name.startswith("_checkpoint_hook.") and "frame" in cells:
            return cells["frame"].cell_contents, None
        if name.startswith("_recomputation_hook.") and {"target_frame_ref", "gid"} <= cells.keys():
            frame = cells["target_frame_ref"].cell_contents()
            return None if frame is None else (frame, cells["gid"].cell_contents)
    except (ValueError, TypeError):  # an empty cell, or not the weak reference expected
        return None
    return None


def record_for_recomputation(key: Any, value: Any, region: tuple[Any, Any] | None) -> None:
    """Keep ``value`` (what this call decided) for the recomputation of the checkpointed ``region`` whose forward
    runs this call (:func:`checkpoint_region`); nothing outside a region's forward (``region`` None or a
    recomputation). The recomputation's ``n``-th call with ``key`` reads the ``n``-th value
    (:func:`recorded_for_recomputation`)."""
    if region is None or region[1] is not None:
        return
    records, _ = _CHECKPOINT_RECORDS.setdefault(region[0], ({}, {}))
    records.setdefault(key, []).append(value)


def recorded_for_recomputation(key: Any) -> Any:
    """In the recomputation of a checkpointed region inside backward: the value its forward recorded at the same
    call (:func:`record_for_recomputation`); :data:`NOT_RECORDED` elsewhere, or when the forward recorded none
    (a region whose forward ran inside another region's recomputation: nested checkpoints)."""
    region = checkpoint_region()
    if region is None or region[1] is None:
        return NOT_RECORDED
    frame, backward = region
    found = _CHECKPOINT_RECORDS.get(frame)
    if found is None:
        return NOT_RECORDED
    records, replayed = found
    index = replayed.get((key, backward), 0)
    replayed[(key, backward)] = index + 1
    values = records.get(key, ())
    return values[index] if index < len(values) else NOT_RECORDED


def _in_transform(kind) -> bool:
    """Whether a ``torch.func`` transform of ``kind`` (a ``torch._C._functorch.TransformType``) runs this call
    eagerly, at any level of the transform stack (under ``torch.compile`` the query is not traced: no)."""
    if torch.compiler.is_compiling():
        return False
    stack = torch._C._functorch.get_interpreter_stack()
    return bool(stack) and any(level.key() == kind for level in stack)


def in_vmap() -> bool:
    """Whether ``torch.func.vmap`` runs this call eagerly, at any level of the transform stack (in
    ``vmap(grad(f))`` the top level is ``grad``, and the tensors are still batched): no tensor can be read on the
    host there (``.item()``, ``bool(t)``)."""
    return _in_transform(torch._C._functorch.TransformType.Vmap)


def in_jvp() -> bool:
    """Whether a forward-mode ``torch.func`` transform (``jvp``, ``jacfwd``, ``hessian``'s forward level) runs this
    call eagerly, at any level of the transform stack: tensors then carry tangents that ``requires_grad`` does not
    show."""
    return _in_transform(torch._C._functorch.TransformType.Jvp)


# --------------------------------------------------------------------------------------- orthofx's own modules

_LAYER_TYPES: tuple[type, ...] | None = None


def orthofx_layer_types() -> tuple[type, ...]:
    """The ``nn.Module`` classes named in ``orthofx.nn.__all__`` (its other exports are functions such as
    ``svd_stable``): ConvNorm, orthogonal convs / transposed convs / linears, JacobianProbe, ConditionMonitor,
    the isometric blocks. Read from ``__all__`` once, when first asked (the package imports this module, so the
    list cannot be built here at import time); kept in a tuple so ``isinstance`` against it compiles."""
    global _LAYER_TYPES
    if _LAYER_TYPES is None:
        package = importlib.import_module(ORTHOFX_NN_PACKAGE)
        _LAYER_TYPES = tuple(obj for obj in (getattr(package, name) for name in package.__all__)
                             if isinstance(obj, type) and issubclass(obj, nn.Module))
    return _LAYER_TYPES


def is_orthofx_layer(module: nn.Module) -> bool:
    """Whether ``module`` is one of ``orthofx.nn``'s public layers: an instance of a module class that
    ``orthofx.nn.__all__`` names (:func:`orthofx_layer_types`), subclasses included (a user's
    ``class MyConv(OrthogonalConv2d)``, a pass's ``DecompositionMonitor``, which is a ``ConditionMonitor``).

    These are the modules a model written with ``orthofx.nn`` holds that orthofx can measure or regularise
    (``orthofx.penalty`` of a model that ``orthofx.transform`` did not return, ``orthofx.report``). The frozen
    forms ``to_plain()`` returns (``FourierConv``, ``FrozenConvNormNd``, ``PassThrough``) and the internal
    helpers (``CircularPad``, ``CircularFold``) are not layers: they carry no regulariser and nothing to
    measure, and a model made of them is a plain model (:func:`is_orthofx_module` covers them)."""
    return isinstance(module, orthofx_layer_types())


def is_orthofx_nn_class(cls: type) -> bool:
    """Whether the class ``cls`` is defined in the package ``orthofx.nn``: its ``__module__`` is ``orthofx.nn`` or
    starts with ``orthofx.nn.`` (a user's module named ``orthofx.nnx_user`` is not it). Public layers, their frozen
    forms and private helpers all count; subclasses defined elsewhere do not (the class's own module decides).

    This is capture's leaf rule for orthofx's classes, broader than :func:`is_orthofx_layer` on purpose: every
    module ``orthofx.nn`` defines computes only what its documented forward says, and several depend on runtime
    shapes or values that symbolic tracing cannot follow (ConvNorm's grid, a monitor's buffer writes), so one
    ``call_module`` node is always right for them, frozen helpers included (a frozen model is captured again by
    ``freeze``/``export`` and by a second ``transform``), and tracing into their code would only expose orthofx's
    internals as sites."""
    name = getattr(cls, "__module__", None) or ""
    return name == ORTHOFX_NN_PACKAGE or name.startswith(ORTHOFX_NN_PACKAGE + ".")


def is_orthofx_module(module: nn.Module) -> bool:
    """Whether orthofx's code owns ``module``'s state: a public layer (:func:`is_orthofx_layer`, subclasses
    included) or any module of a class ``orthofx.nn`` defines (:func:`is_orthofx_nn_class`: frozen forms, helpers).

    Used where orthofx must tell its own modules from the user's: the buffers such a module holds are orthofx's
    caches and statistics (ConvNorm's per-input-size filters, an orthogonal layer's kernel cache, a monitor's
    history), which a run of the model legitimately fills, and a weight-bearing one is a linear layer as
    ``nn.Conv2d`` is (``plan.producers_feeding`` stops at it)."""
    return is_orthofx_nn_class(type(module)) or is_orthofx_layer(module)
