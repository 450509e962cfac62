"""Model -> ``torch.fx.GraphModule``: orthofx's tracer, leaf fallback, torch.export capture and diagnostics.

Three capture modes (``capture: {mode: ...}`` in a policy):

``fx``
    :func:`capture` traces a model symbolically with :class:`OrthofxTracer`. torch.nn's built-in layers,
    orthofx's own layers (``orthofx.nn``) and the classes / module paths the caller names are *leaves*: they
    appear in the graph as one ``call_module`` node each. When the forward of some other submodule cannot be
    traced (Python control flow on a traced tensor, iteration over a tensor, an op fx cannot record, a custom
    ``torch.autograd.Function`` whose backward a trace would drop: :func:`_autograd_functions_intercepted`), that
    submodule is retried as a leaf, and :class:`~orthofx.passes.base.CaptureInfo` records the fallback. A failure
    in the model's own top-level forward cannot be worked around this way and raises
    :class:`~orthofx.errors.CaptureError`, which names the place, the cause (with the line of user code when it
    can be found) and the fixes.
``export``
    the graph is built with ``torch.export.export(..., strict=False)`` on the example inputs (batch dimension
    dynamic when the model allows it), which follows Python control flow on shapes, ``x.size(0)`` in Python
    arithmetic and code from other libraries. The exported ATen-level graph is turned back into a GraphModule of the
    same form as fx mode: every call of a leaf module (the same leaf rule) becomes one ``call_module`` node calling
    the model's module at its qualified name (found with ``preserve_module_call_signature`` and the nodes'
    ``nn_module_stack``; torch.export keeps one signature per module, so it is given every call of a leaf in one
    form, :func:`_export_call_form`, and the node makes the call as the forward wrote it), parameters and buffers
    are ``get_attr`` nodes at their original names (so ``named_modules()``, ``state_dict()`` keys and site names are
    fx mode's), and decompositions and the ops around them are put back in their ``torch.*`` form
    (``torch.linalg.eigh`` ...) so that every pass handles both kinds of graph. The other ops stay ATen ops
    (``torch.ops.aten.*``). What export fixed to the example inputs (every static dimension of a tensor input, the
    value of a non-tensor input) is checked first thing in the graph (:func:`require_input_shape`,
    :func:`require_input_value`): other inputs raise :class:`~orthofx.errors.ArgumentError` instead of running with
    the example's sizes or values. So do another number of inputs for a ``*args`` forward
    (:func:`require_input_count`) and a value for a parameter the example left at its default
    (:func:`require_default_argument`); keyword inputs (``example_kwargs``) are inputs by name. ``torch.no_grad()``
    and ``torch.autocast(...)`` blocks stay flat (fx mode's :func:`set_grad_mode` ... calls), so leaf calls inside
    them are ``call_module`` nodes too; lazy layers that have not run yet are exported from a copy that ran once on
    the example inputs (:func:`_materialised`).
``auto`` (the default)
    fx first (with the leaf fallback); when the top-level trace fails (or cannot follow the example call's branch
    of ``if mask is None:``, see below) and example inputs were given, export.
    :attr:`CaptureInfo.mode` says which one was used and :attr:`CaptureInfo.fx_error` why fx was not.

Train and eval: a trace resolves ``if self.training:`` (and ``F.dropout(x, training=self.training)``) in the mode
the model is in. Both modes therefore capture the model a second time in the other training mode; when the two
graphs differ, :func:`capture` returns a :class:`ModalGraphModule` holding both, whose forward runs the graph of
its current mode, and :attr:`CaptureInfo.mode_dependent` names the modules whose code differs.

Inputs: the returned module's forward takes its inputs as the model's does, with the same names, order, kinds
(positional-only, keyword-only, ``*args``) and defaults (:func:`keep_parameter_kinds`). A traced input is never None,
so symbolic tracing of ``if mask is not None:`` (or ``if mask is None: mask = ...``) keeps one branch: for a forward
that branches on whether a parameter defaulting to None is given (:func:`_none_branches`), fx mode captures the
branch of the example call (the given value, or None when the example leaves it out; without example inputs, a given
value) and the graph refuses the other with an :class:`~orthofx.errors.ArgumentError` naming the argument
(:func:`require_argument_given`, :func:`require_default_argument`); when the example's branch cannot be traced,
``auto`` captures with torch.export. Export mode keeps the example's values the same way.

Capturing never modifies the model: the returned GraphModule shares the model's leaf submodules, parameters and
buffers (as ``torch.fx.GraphModule(model, graph)`` does); callers that rewrite the graph copy it first. What a
traced forward stores on ``self`` is undone after the trace: a buffer rebound to a computed value
(``self.steps += 1``) becomes a ``copy_`` into the buffer in the graph, other stores are dropped with a warning.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import io
import itertools
import keyword
import math
import operator
import os
import re
import sys
import sysconfig
import threading
import traceback
import types
from typing import Any, Callable, Iterable, NamedTuple

import torch
import torch.utils.checkpoint
from torch.amp.autocast_mode import _enter_autocast, _exit_autocast
from torch import nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.fx.graph_module import _CodeOnlyModule, _format_import_block, _forward_from_src
from torch.package import sys_importer
from torch.fx.proxy import TraceError

from .errors import ArgumentError, CaptureError, first_few, first_line
from .passes.base import CALL_HOOK_REGISTRIES, CaptureInfo, call_hook_count, is_own_hook, own_hook
from .nn.tracing import exported_as_plain_module, is_orthofx_nn_class

__all__ = ["capture", "unwrap_model", "copy_model", "OrthofxTracer", "ModalGraphModule", "module_scopes",
           "CAPTURE_MODES"]

#: Capture modes ``capture`` understands.
CAPTURE_MODES = ("auto", "fx", "export")

_CONSTANT_PREFIX = "_tensor_constant"
#: The ``nn_module_stack`` key torch.export's metadata hook gives nodes made by its own passes (no module).
_EMPTY_STACK_KEY = "_empty_nn_module_stack_from_metadata_hook"


# --------------------------------------------------------------------------------------------------- unwrapping

def unwrap_model(model: Any) -> nn.Module:
    """The user's module inside ``torch.compile`` / ``nn.DataParallel`` / ``DistributedDataParallel`` wrappers.

    Wrappers are removed repeatedly (``torch.compile(nn.DataParallel(m))`` gives ``m``). Anything that is not an
    ``nn.Module`` raises :class:`CaptureError`.
    """
    seen = 0
    while True:
        if not isinstance(model, nn.Module):
            raise CaptureError(
                f"expected a torch.nn.Module, got {type(model).__module__}.{type(model).__qualname__}; "
                "pass the model object itself (not its state_dict, a function or a class)")
        inner = _wrapped_module(model)
        if inner is None:
            return model
        model = inner
        seen += 1
        if seen > 100:  # a wrapper that wraps itself; cannot happen with torch's own wrappers
            raise CaptureError("cannot unwrap the model: more than 100 nested wrappers")


def _wrapped_module(model: nn.Module) -> nn.Module | None:
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    # torch.compile's OptimizedModule; torch._dynamo is only loaded when something was compiled, so checking
    # sys.modules avoids importing it (slow) for the common case.
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    optimized = getattr(dynamo, "OptimizedModule", None) if dynamo is not None else None
    if optimized is not None and isinstance(model, optimized):
        return model._orig_mod
    return None


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also for a model whose modules hold a computed tensor as a plain attribute.

    The older ``torch.nn.utils.weight_norm`` and ``torch.nn.utils.prune`` keep a layer's ``weight`` as a non-leaf
    tensor (``g * v / ||v||``, ``weight_orig * mask``) that a forward pre-hook recomputes before each call, and
    ``deepcopy`` refuses non-leaf tensors ("Only Tensors created explicitly by the user ... support the deepcopy
    protocol"). Such tensors are copied detached: the copy's own hook recomputes them from the copied parameters at
    its first call, as the model's does (the same for such tensors in a list attribute: an RNN's ``_flat_weights``
    after a forward through a parametrized weight). Parameters, buffers and every other attribute are copied as by
    ``deepcopy``.

    A lazy layer's buffers before its first call (``nn.LazyBatchNorm1d``'s ``running_mean``, a ``UninitializedBuffer``)
    refuse ``deepcopy`` too ("Attempted to use an uninitialized parameter"); the copy gets new uninitialised buffers
    of the same dtype and device, which its own first call materialises, as the model's does.
    """
    memo: dict[int, Any] = {}
    uninitialised = torch.nn.parameter.UninitializedBuffer
    for module in model.modules():
        for value in vars(module).values():
            # a list of them too: an RNN's _flat_weights holds the weight a torch parametrization computed at the
            # last forward (the copy's first forward refreshes it, as the RNN does whenever a weight changed)
            for item in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(item, torch.Tensor) and not item.is_leaf and id(item) not in memo:
                    memo[id(item)] = item.detach().clone()
        for value in module._buffers.values():
            if isinstance(value, uninitialised) and id(value) not in memo:
                memo[id(value)] = uninitialised(requires_grad=value.requires_grad, device=value.device,
                                                dtype=value.dtype)
    return copy.deepcopy(model, memo)


# ------------------------------------------------------------------------------------------------------- tracer

def _is_torch_layer(cls: type) -> bool:
    return cls.__module__.startswith(("torch.nn.", "torch.ao.nn."))


class OrthofxTracer(torch.fx.Tracer):
    """``torch.fx.Tracer`` with orthofx's leaf rules and failure location.

    Leaves are: torch.nn's built-in layers (fx's default rule, except the containers ``Sequential``,
    ``ModuleList`` and ``ModuleDict``) and user subclasses of them that keep the base class's forward,
    orthofx's own layers (classes defined under ``orthofx.nn``), classes named in ``leaf_types`` (a class name
    such as ``"MyAttention"`` or a dotted ``"package.module.MyAttention"``, matched against every class in the
    module's MRO so subclasses count; class objects are accepted too) and the module paths in ``leaf_paths``
    (qualified names as in ``model.named_modules()``).

    While tracing, the tracer keeps the stack of qualified names of the modules whose forward is being traced;
    :meth:`failure_location` uses it to say in which submodule an exception was raised. Tensors that appear in
    the trace without belonging to the model (e.g. made by a factory call such as ``torch.zeros(3)``) are kept in
    :attr:`constants` instead of being set on the model, so tracing leaves the model untouched.
    """

    #: Buffers read in a traced forward are ``get_attr`` nodes, so an in-place update that involves no traced
    #: value (a call counter ``self.calls.add_(1)``) is recorded instead of run on the model at trace time.
    proxy_buffer_attributes = True

    def __init__(self, leaf_types: Iterable[str | type] = (), leaf_paths: Iterable[str] = (),
                 autowrap_functions: tuple[Callable[..., Any], ...] = ()):
        # default_argument and the argument checks stay calls when a captured graph's code is traced again
        # (unpickling, a copy)
        super().__init__(autowrap_functions=tuple(autowrap_functions) + (default_argument,) + _GRAPH_HELPERS
                         + _ARGUMENT_CHECKS + tuple(_SEQUENCE_FUNCTIONS.values()))
        leaf_types = tuple(leaf_types)
        self.leaf_type_names = frozenset(t for t in leaf_types if isinstance(t, str))
        self.leaf_type_classes = tuple(t for t in leaf_types if isinstance(t, type))
        _check_leaves(leaf_types, leaf_paths)
        self.leaf_paths = frozenset(leaf_paths)
        self.constants: dict[str, torch.Tensor] = {}
        self.constant_scopes: dict[str, str] = {}
        self._leaf_type_cache: dict[type, bool] = {}
        self._forward_stack: list[tuple[str, type]] = []
        self._failures: dict[int, tuple[BaseException, tuple[tuple[str, type], ...]]] = {}
        self._buffer_ids: set[int] = set()
        #: ``(module path, attribute)`` of the traced values the forward stored on a module (``self.w = w``);
        #: the captured graph does not keep them (see :meth:`trace`).
        self.attribute_stores: list[tuple[str, str]] = []
        #: ``(module path, table, name)`` of the buffers / parameters the forward registered while traced
        #: (``register_buffer`` on a first call): the graph cannot create them (see :func:`_created_state_message`).
        self.created_state: list[tuple[str, str, str]] = []
        #: The modules whose forward called torch.utils.checkpoint, traced as plain code, and the custom
        #: autograd.Function calls refused, in the last trace (see :func:`_autograd_functions_intercepted`).
        self.checkpoints: list[str] = []
        self.refused: list[_AutogradFunctionCall] = []
        #: The grad mode and autocast blocks the last trace's forward started and ended with
        #: (:func:`_check_mode_switches`).
        self.mode_bounds: _ModeBounds | None = None

    # ---- leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths:
            return True
        if module_qualified_name and call_hook_count(m):
            # Tracing through a module runs its hooks once on proxies and inlines them: a hook with a side effect
            # (storing activations) would never fire again, and one holding a proxy would leak it. As a leaf it is
            # called, hooks and all, at each forward (see hooked_module_warnings).
            return True
        cls = type(m)
        cached = self._leaf_type_cache.get(cls)
        if cached is None:
            cached = self._is_leaf_type(cls)
            self._leaf_type_cache[cls] = cached
        return cached

    def _is_leaf_type(self, cls: type) -> bool:
        if cls is nn.Module:  # a plain ``nn.Module()`` holds submodules and has no forward: never called itself
            return False
        if issubclass(cls, torch.jit.ScriptModule):
            # TorchScript code cannot be traced symbolically: fx would keep the compiled object as an opaque
            # constant, and its parameters would vanish from the GraphModule's parameters() and state_dict()
            return True
        if is_orthofx_nn_class(cls):
            return True
        if self.leaf_type_classes and issubclass(cls, self.leaf_type_classes):
            return True
        if self.leaf_type_names:
            for klass in cls.__mro__:
                if (klass.__name__ in self.leaf_type_names
                        or f"{klass.__module__}.{klass.__qualname__}" in self.leaf_type_names):
                    return True
        if issubclass(cls, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        if _is_torch_layer(cls):
            return True
        # A user subclass that keeps its torch.nn base's forward (e.g. ``class MyConv(nn.Conv2d)`` adding only
        # an attribute) behaves as that layer: keep it a leaf so rules on ``type: Conv2d`` still see it.
        owner = next((klass for klass in cls.__mro__ if "forward" in vars(klass)), None)
        return owner is not None and owner is not nn.Module and _is_torch_layer(owner)

    # ---- failure location

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        path = self.path_of_module(m)
        if self.is_leaf_module(m, path):
            return super().call_module(m, forward, args, kwargs)
        self._forward_stack.append((path, type(m)))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            # The innermost traced forward an exception passes through is where it was raised.
            self._failures.setdefault(id(exc), (exc, tuple(self._forward_stack)))
            raise
        finally:
            self._forward_stack.pop()

    def failure_location(self, exc: BaseException) -> tuple[str, type | None]:
        """``(qualified name, class)`` of the innermost submodule whose forward raised ``exc``.

        ``("", None)`` when ``exc`` was raised by the top-level forward itself (or outside any submodule).
        Exceptions re-raised as a new one (``raise New from old``) are located through their chain when the new
        exception itself was not seen inside a submodule.
        """
        for e in _exception_chain(exc):
            hit = self._failures.get(id(e))
            if hit is not None and hit[0] is e and hit[1]:
                return hit[1][-1]
        return "", None

    def caught_failure(self) -> tuple[str, type, BaseException] | None:
        """``(qualified name, class, exception)`` of the first exception that tracing caused in a submodule's
        forward (a :class:`~torch.fx.proxy.TraceError`, or an error about a ``Proxy``) and that the model's own code
        then caught, in a trace that succeeded; None when there was none.

        ``try: h = self.block(x)`` / ``except Exception: h = x`` traces the except branch when ``block`` cannot be
        traced: the graph silently skips a block the model runs. Call after :meth:`trace`."""
        for exc, stack in self._failures.values():
            if stack and any(isinstance(e, TraceError) or "Proxy" in str(e) for e in _exception_chain(exc)):
                path, cls = stack[-1]
                return path, cls, exc
        return None

    # ---- constants (kept off the model)

    def create_arg(self, a: Any) -> Any:
        numpy = sys.modules.get("numpy")  # a numpy scalar can only exist once numpy was imported
        if numpy is not None and isinstance(a, numpy.generic):
            # ``x / np.sqrt(d)``: fx would write ``np.float64(...)`` into code that does not import numpy
            return super().create_arg(a.item())
        if isinstance(a, dict) and type(a) is not dict:
            rebuilt = _mapping_node(self, a)
            if rebuilt is not None:
                return rebuilt
        if (isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter)
                and id(a) not in self._buffer_ids and a not in self.tensor_attrs):
            name = self._fresh_constant_name()
            self.tensor_attrs[a] = name
            self.constants[name] = a
            self.constant_scopes[name] = self.scope.module_path
            return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def _fresh_constant_name(self) -> str:
        i = len(self.constants)
        while True:
            name = f"{_CONSTANT_PREFIX}{i}"
            if name not in self.constants and not hasattr(self.root, name):
                return name
            i += 1

    # ---- trace

    def trace(self, root: nn.Module | Callable[..., Any], concrete_args: dict[str, Any] | None = None):
        self._forward_stack = []
        self._failures = {}
        self.constants = {}
        self.constant_scopes = {}
        self.attribute_stores = []
        self.created_state = []
        self.checkpoints = []
        self.refused = []
        self.mode_bounds = None
        if not isinstance(root, nn.Module):
            return super().trace(root, concrete_args)
        self._buffer_ids = {id(b) for b in root.buffers()}
        states = [_ModuleState(path, module) for path, module in root.named_modules()]
        grad_before, autocast_before = torch.is_grad_enabled(), _autocast_nesting()
        try:
            with _recording_mode_switches(self), _sequence_helpers_recorded(self), _autograd_functions_intercepted(
                    lambda args, kwargs: _holds((args, kwargs), torch.fx.Proxy), self._calling_module,
                    self.checkpoints, self.refused):
                graph = super().trace(root, concrete_args)
                self.mode_bounds = _ModeBounds(grad_before, torch.is_grad_enabled(),
                                               _autocast_nesting() - autocast_before)
        except BaseException:
            self._restore(states, None)  # a failed trace (retried with a leaf) must leave no proxies either
            raise
        self._restore(states, graph)
        _sequence_calls_as_helpers(graph)
        _move_tensor_defaults(graph)
        _name_concrete_placeholders(graph, concrete_args)
        keep_parameter_kinds(graph, forward_parameter_kinds(root.forward))
        return graph

    def _calling_module(self) -> str:
        """The path of the module whose forward is being traced ('' for the model's own)."""
        return self._forward_stack[-1][0] if self._forward_stack else ""

    def _restore(self, states: list[_ModuleState], graph: torch.fx.Graph | None) -> None:
        """Put every module's attributes back as they were before the trace.

        A forward that stores on ``self`` ran on proxies: ``self.steps += 1`` rebinds a buffer to a Proxy and
        ``self.last_weights = w`` sets one as an attribute. A buffer rebound to a traced value becomes a
        ``copy_`` into the buffer at the end of ``graph`` (the GraphModule then updates it as the model does);
        other stores of traced values are dropped and listed in :attr:`attribute_stores`. fx's own constants of
        kinds other than tensors (script objects, proxyable classes), which it sets on the root, move to
        :attr:`constants`.
        """
        updates: list[tuple[str, torch.fx.Node]] = []
        held = _ModuleState.held_tensors(states)
        for state in states:
            for table, key, value, new in state.changes():
                if _ModuleState.registers_state(table, new, value, held):
                    # registered by the forward itself (on its first call): the graph would read a tensor that
                    # only the trace created, and the model does not hold
                    self.created_state.append((state.path, table, key))
                elif table == "_buffers" and not new and isinstance(value, torch.fx.Proxy) and value.tracer is self:
                    updates.append((_join(state.path, key), value.node))
                elif _holds(value, torch.fx.Proxy):
                    self.attribute_stores.append((state.path, key))
                elif not state.path and table == "__dict__" and new:
                    self.constants[key] = value
                    self.constant_scopes.setdefault(key, "")
            state.restore()
        if graph is not None and updates:
            _record_buffer_updates(graph, updates)


def _mapping_node(tracer: torch.fx.Tracer, mapping: dict) -> torch.fx.Node | None:
    """A node that builds ``mapping``'s own class again from its traced values, for a dict subclass in the graph
    (a forward returning ``collections.OrderedDict`` or a ``ModelOutput``-style class, an OrderedDict subclass
    with attribute access, often also a dataclass); ``None`` when the class cannot be rebuilt that way.

    fx records any dict as a plain ``dict``, so ``out.logits`` on the captured model's output would fail where it
    works on the model's. A dataclass is rebuilt from its keys as keyword arguments (as fx does for dataclasses
    that are not dicts), any other class from its ``(key, value)`` pairs, as ``dict(pairs)`` takes them; the
    constructor is tried first on placeholder values, and a class that does not give back the same keys that way
    (a ``defaultdict``, a constructor with other arguments) stays a plain dict."""
    cls = type(mapping)
    if cls.__module__.startswith("torch.fx"):  # fx's own immutable_dict
        return None
    as_fields = dataclasses.is_dataclass(cls) and all(isinstance(k, str) for k in mapping)
    placeholders = {k: object() for k in mapping}
    try:
        trial = cls(**placeholders) if as_fields else cls(list(placeholders.items()))
        same = type(trial) is cls and list(trial.keys()) == list(mapping.keys()) and all(
            trial[k] is v for k, v in placeholders.items())
    except Exception:  # noqa: BLE001 - any failure: keep fx's plain dict
        return None
    if not same:
        return None
    if as_fields:
        return tracer.create_node("call_function", cls, (), {k: tracer.create_arg(v) for k, v in mapping.items()})
    pairs = [(tracer.create_arg(k), tracer.create_arg(v)) for k, v in mapping.items()]
    return tracer.create_node("call_function", cls, (pairs,), {})


@contextlib.contextmanager
def _sequence_helpers_recorded(tracer: torch.fx.Tracer):
    """While ``tracer`` traces, a call of ``torch.nn.utils.rnn.<helper>`` (module attribute, e.g.
    ``nn.utils.rnn.pack_padded_sequence(...)``) on traced values becomes a :func:`sequence_helper` node. A helper
    imported by name into a forward's module (``from torch.nn.utils.rnn import ...``) is fx's autowrap's: the
    tracer lists the functions, and :func:`_sequence_calls_as_helpers` renames those nodes afterwards.

    So does a ``PackedSequence(data, batch_sizes, ...)`` built from traced values (``PackedSequence(f(p.data),
    p.batch_sizes, p.sorted_indices, p.unsorted_indices)``): its constructor checks ``batch_sizes.device`` in a
    Python branch, which a traced value cannot decide. The class's ``__new__`` is replaced rather than the name,
    so the class imported by name works as well and ``isinstance(x, PackedSequence)`` keeps working."""
    def stand_in(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if _holds((args, kwargs), torch.fx.Proxy):
                return tracer.create_proxy("call_function", sequence_helper, (name,) + args, kwargs, name=name)
            return function(*args, **kwargs)
        return call

    packed = torch.nn.utils.rnn.PackedSequence
    real_new = packed.__dict__["__new__"]
    construct = packed.__new__

    def new(cls: type, *args: Any, **kwargs: Any) -> Any:
        if cls is packed and _holds((args, kwargs), torch.fx.Proxy):
            # a Proxy is not an instance of cls, so Python calls no __init__ on it
            return tracer.create_proxy("call_function", sequence_helper, (_PACKED_SEQUENCE,) + args, kwargs,
                                       name="packed_sequence")
        return construct(cls, *args, **kwargs)

    module = torch.nn.utils.rnn
    for name, function in _SEQUENCE_FUNCTIONS.items():
        setattr(module, name, stand_in(name, function))
    packed.__new__ = staticmethod(new)
    try:
        yield
    finally:
        for name, function in _SEQUENCE_FUNCTIONS.items():
            setattr(module, name, function)
        packed.__new__ = real_new


def _sequence_calls_as_helpers(graph: torch.fx.Graph) -> None:
    """Calls of torch's sequence helpers (fx's autowrap names the function itself as the target) as
    :func:`sequence_helper` calls (see there why)."""
    names = {function: name for name, function in _SEQUENCE_FUNCTIONS.items()}
    for node in graph.nodes:
        if node.op == "call_function" and node.target in names:
            node.args = (names[node.target],) + tuple(node.args)
            node.target = sequence_helper


@contextlib.contextmanager
def _recording_mode_switches(tracer: torch.fx.Tracer):
    """Record the forward's grad-mode and autocast switches as graph nodes while ``tracer`` traces it.

    Symbolic tracing runs ``with torch.no_grad():`` and ``with torch.autocast(...):`` blocks for real but records
    nothing of them, so the graph would compute the block with gradients (a frozen branch would train) and in
    full precision. Every ``torch._C._set_grad_enabled`` call (which ``no_grad``, ``enable_grad`` and
    ``set_grad_enabled`` make on entry and exit) and every autocast entry and exit of the tracing thread
    becomes a call in the graph: an entry :func:`set_grad_mode` / :func:`enter_autocast`, the matching exit
    :func:`restore_grad_mode` / :func:`exit_autocast` (restoring the mode the graph was *run* in, not the one it
    was traced in).
    """
    thread = threading.get_ident()
    real_set_grad = torch._C._set_grad_enabled
    autocast = torch.amp.autocast_mode.autocast
    real_enter, real_exit = autocast.__enter__, autocast.__exit__
    # (node giving the mode before the switch, trace-time mode before it) per grad-mode switch still open
    open_switches: list[tuple[torch.fx.Node, bool]] = []

    def set_grad(mode: bool) -> None:
        before = torch.is_grad_enabled()
        real_set_grad(mode)
        if threading.get_ident() != thread:
            return
        if open_switches and bool(mode) == open_switches[-1][1]:  # a block's exit: back to the mode before it
            entry, _ = open_switches.pop()
            tracer.create_node("call_function", restore_grad_mode, (entry,), {})
        else:
            entry = tracer.create_node("call_function", set_grad_mode, (bool(mode),), {})
            open_switches.append((entry, before))

    def enter(self_: Any) -> Any:
        result = real_enter(self_)
        if threading.get_ident() == thread:
            self_._orthofx_node = tracer.create_node(
                "call_function", enter_autocast,
                (self_.device, self_.fast_dtype, self_._enabled, self_._cache_enabled), {})
        return result

    def exit_(self_: Any, *exc: Any) -> Any:
        entry = self_.__dict__.pop("_orthofx_node", None)
        if entry is not None:
            tracer.create_node("call_function", exit_autocast, (entry,), {})
        return real_exit(self_, *exc)

    torch._C._set_grad_enabled = set_grad
    autocast.__enter__, autocast.__exit__ = enter, exit_
    try:
        yield
    finally:
        torch._C._set_grad_enabled = real_set_grad
        autocast.__enter__, autocast.__exit__ = real_enter, real_exit


class _AutogradFunctionCall(TraceError):
    """Raised where a forward being captured calls a custom ``torch.autograd.Function`` on traced values (see
    :func:`_autograd_functions_intercepted`). A TraceError, so that a forward catching it is still seen
    (:meth:`OrthofxTracer.caught_failure`). ``path``: the module whose forward made the call ('' for the model's
    own)."""

    def __init__(self, function: type, path: str):
        self.function = function
        self.path = path
        super().__init__(
            f"its forward calls the autograd.Function {_function_name(function)} on traced values: a trace follows "
            f"{function.__name__}.forward and drops {function.__name__}.backward, so the graph's gradients might not "
            "be the Function's")


def _function_name(function: type) -> str:
    """``GradReverse (mymodels.GradReverse)``: an autograd.Function's name and where it is defined."""
    return f"{function.__name__} ({function.__module__}.{function.__qualname__})"


def _is_checkpoint_function(function: type) -> bool:
    """Whether ``function`` is torch's reentrant activation checkpointing (``checkpoint(..., use_reentrant=True)``,
    the default where ``use_reentrant`` is not passed, and ``checkpoint_sequential``'s segments)."""
    checkpoint_function = getattr(torch.utils.checkpoint, "CheckpointFunction", None)
    return checkpoint_function is not None and issubclass(function, checkpoint_function)


def _is_torch_function(function: type) -> bool:
    """Whether ``function`` is one of torch's own (a higher-order op's autograd, as ``torch.cond`` runs it under
    torch.export, which records it as the op): those are torch's to trace."""
    return function.__module__ == "torch" or function.__module__.startswith("torch.")


def _var_positional_name(function: Callable[..., Any]) -> str | None:
    return next((p.name for p in inspect.signature(function).parameters.values()
                 if p.kind is inspect.Parameter.VAR_POSITIONAL), None)


@contextlib.contextmanager
def _autograd_functions_intercepted(traced: Callable[[tuple, dict], bool], calling_module: Callable[[], str | None],
                                    checkpoints: list[str], refused: list[_AutogradFunctionCall]):
    """Keep the gradients of the ``torch.autograd.Function`` calls of a forward that capture traces in this thread.

    A trace (symbolic, or torch.export's) runs a Function's ``forward`` and records its operations; its ``backward``
    never runs, so the graph differentiates the forward's operations instead (a gradient reversal layer would
    reverse nothing, a straight-through estimator would pass zero), and torch's C++ ``apply`` runs ``forward``
    with gradients off without any switch a trace can record (a ``no_grad`` block inside it was recorded as an
    entry without its exit: gradients off for the whole process after one call). So, for each call of
    ``Function.apply`` on traced values (``traced(args, kwargs)``) made by the forward of ``calling_module()`` (a
    module path, '' for the model's own; None inside a module whose own code the graph runs, which is left alone):

    - torch's reentrant activation checkpointing (:func:`_is_checkpoint_function`) runs the checkpointed function
      as plain code, whose operations the trace records with their gradients, and the non-reentrant one
      (``torch.utils.checkpoint._checkpoint_without_reentrant_generator``) does the same: a graph computes without
      recomputing; ``checkpoints`` gets the module path, for the capture's warning;
    - any other Function not of torch's own (:func:`_is_torch_function`) raises :class:`_AutogradFunctionCall`
      (also appended to ``refused``, for a forward that catches it): capture keeps the calling module as a leaf, or
      refuses a call in the model's own forward.
    """
    thread = threading.get_ident()
    function_class = torch.autograd.Function
    real_apply = function_class.__dict__["apply"]
    checkpointing = torch.utils.checkpoint
    real_region = getattr(checkpointing, "_checkpoint_without_reentrant_generator", None)
    region_inputs = _var_positional_name(real_region) if real_region is not None else None

    def caller(args: tuple, kwargs: dict) -> str | None:
        if threading.get_ident() != thread or not traced(args, kwargs):
            return None
        return calling_module()

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        path = caller(args, kwargs)
        if path is not None:
            if _is_checkpoint_function(cls) and len(args) >= 2 and not kwargs:
                checkpoints.append(path)
                function, _preserve_rng_state, *inputs = args
                return function(*inputs)
            if not _is_torch_function(cls):
                refused.append(_AutogradFunctionCall(cls, path))
                raise refused[-1]
        return real_apply.__func__(cls, *args, **kwargs)

    def region(*args: Any, **kwargs: Any) -> Any:
        # checkpoint(..., use_reentrant=False): torch's generator runs before and after the checkpointed function
        bound = inspect.signature(real_region).bind(*args, **kwargs)
        path = caller(bound.arguments.get(region_inputs, ()), kwargs)
        if path is None:
            yield from real_region(*args, **kwargs)
            return
        checkpoints.append(path)
        yield

    function_class.apply = classmethod(apply)
    if region_inputs is not None:
        checkpointing._checkpoint_without_reentrant_generator = region
    try:
        yield
    finally:
        function_class.apply = real_apply
        if region_inputs is not None:
            checkpointing._checkpoint_without_reentrant_generator = real_region


def _checkpoint_warnings(model: nn.Module, paths: Iterable[str]) -> list[str]:
    """The capture warning for each module whose forward calls torch.utils.checkpoint (see
    :func:`_autograd_functions_intercepted`)."""
    warnings = []
    for path in dict.fromkeys(paths):
        name = type(model.get_submodule(path)).__name__
        if path:
            where = f"submodule '{path}' ({name}) calls torch.utils.checkpoint in its forward"
            keep = (f"list its class under capture.leaf_modules (leaf_modules: [{name}]): its forward then runs as "
                    "written, checkpointing included, and the layers inside it stay sites, while its own code is not "
                    "in the graph (function rules and op: / feeds: rules do not see it)")
        else:
            where = f"the model's forward ({name}) calls torch.utils.checkpoint"
            keep = ("move the checkpoint call into a submodule's forward and list that submodule's class under "
                    "capture.leaf_modules: its forward then runs as written, checkpointing included, and the layers "
                    "inside it stay sites, while its own code is not in the graph")
        warnings.append(
            f"{where}: capture traced the checkpointed code as plain operations, so the transformed model keeps its "
            "activations for backward instead of recomputing them there (the same values and gradients, more "
            f"memory). To keep the recomputation, {keep}")
    return warnings


def _refused_call(exc: BaseException) -> _AutogradFunctionCall | None:
    """The refused autograd.Function call that ``exc`` is, or was raised from or while handling; None if none."""
    return next((e for e in _exception_chain(exc) if isinstance(e, _AutogradFunctionCall)), None)


def _refused_function_error(model: nn.Module, call: _AutogradFunctionCall) -> CaptureError:
    """The CaptureError for a custom autograd.Function called in the model's own forward, which no leaf can keep."""
    location = _user_location(call)
    name = call.function.__name__
    error = CaptureError(
        f"the model's own forward ({type(model).__name__}) calls the autograd.Function {_function_name(call.function)}"
        f"{f' at {location}' if location else ''}: a trace follows {name}.forward and drops {name}.backward, so the "
        "transformed model's gradients might not be the Function's, and capture keeps such a call whole only by "
        "keeping the submodule whose forward makes it as a leaf, which the model's own forward is not. Fix: move the "
        f"call into a submodule (a small nn.Module whose forward returns {name}.apply(...)), which capture then keeps "
        "as a leaf by itself, or list that submodule's class under capture.leaf_modules in the policy",
        module_path="")
    error.same_in_export = True  # capture mode auto: torch.export would inline the call the same way
    return error


class _KeptInOtherMode(Exception):
    """Raised by a capture of the other training mode (see :func:`_with_other_mode`) whose forward calls a custom
    autograd.Function in submodules that the first capture traced through (``if self.training: x =
    GradReverse.apply(x)``): ``kept`` holds ``(path, cause)`` for each, and capture starts again with them as leaves,
    so that both modes' graphs keep the same modules whole and the Function's backward runs in either mode."""

    def __init__(self, kept: list[tuple[str, str]]):
        self.kept = kept
        super().__init__(", ".join(path for path, _ in kept))


def _with_kept_leaves(info: CaptureInfo, kept: list[tuple[str, str]]) -> CaptureInfo:
    """``info`` of a capture run again with the leaves of :class:`_KeptInOtherMode` (passed as leaf paths), listing
    them first among its leaf fallbacks."""
    known = {path for path, _ in info.leaf_fallbacks}
    info.leaf_fallbacks[:0] = [(path, cause) for path, cause in kept if path not in known]
    return info


class _ModeBounds(NamedTuple):
    """The grad mode when a captured forward started and when it returned, and how many autocast blocks it left
    open (at capture, on the trace's values)."""

    grad_before: bool
    grad_after: bool
    autocast_left_open: int


def _graph_mode_bounds(graph: torch.fx.Graph, grad_before: bool) -> tuple[bool, int]:
    """The grad mode after a run of ``graph``'s switches (:func:`set_grad_mode` ... :func:`exit_autocast`) from
    ``grad_before``, and how many autocast blocks the run leaves open."""
    mode = grad_before
    before_entry: dict[torch.fx.Node, bool] = {}
    autocast_open: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is set_grad_mode:
            before_entry[node] = mode
            mode = bool(node.args[0])
        elif node.target is restore_grad_mode:
            mode = before_entry.get(node.args[0], mode)
        elif node.target is enter_autocast:
            autocast_open.add(node)
        elif node.target is exit_autocast:
            autocast_open.discard(node.args[0])
    return mode, len(autocast_open)


def _check_mode_switches(graph: torch.fx.Graph, bounds: _ModeBounds | None, how: str) -> None:
    """Refuse a graph whose grad-mode / autocast switches leave another mode behind than the forward did at capture.

    Capture records the forward's ``no_grad`` / ``autocast`` blocks as switches in the graph; a switch made where
    a trace cannot record it (in C++, as torch's ``autograd.Function.apply`` turns gradients off around
    ``forward``) pairs the recorded ones wrongly, and the graph then leaves gradients off (or an autocast block
    open) for the whole process after each call: an error here rather than a silent leak. A forward that leaves a
    mode changed on purpose (``torch.set_grad_enabled(False)`` as a call) did so at capture as well."""
    if bounds is None:
        return
    grad_after, autocast_left_open = _graph_mode_bounds(graph, bounds.grad_before)
    if grad_after == bounds.grad_after and autocast_left_open == bounds.autocast_left_open:
        return
    if grad_after != bounds.grad_after:
        what = (f"gradients {'on' if grad_after else 'off'} after each call, where the model's forward leaves them "
                f"{'on' if bounds.grad_after else 'off'}")
    else:
        what = (f"{autocast_left_open} autocast block(s) open after each call, where the model's forward leaves "
                f"{bounds.autocast_left_open}")
    raise CaptureError(
        f"the graph {how} captured would leave {what}: the forward switches grad mode or autocast where capture "
        "cannot record the switch (in C++ code, such as torch.autograd.Function.apply or torch.inference_mode), so "
        "the switches it recorded do not pair up. Fix: keep the submodule whose forward makes such a switch as a "
        "leaf (capture.leaf_modules in the policy), or capture with the other mode (capture: {mode: fx} or "
        "{mode: export})", module_path="")


@torch.fx.node.has_side_effect  # no user may read its result (a block that returns nothing): keep it
def set_grad_mode(mode: bool) -> bool:
    """Enter a ``torch.no_grad()`` / ``torch.enable_grad()`` block of the traced forward; returns the mode before
    it, for :func:`restore_grad_mode`."""
    before = torch.is_grad_enabled()
    torch._C._set_grad_enabled(mode)
    if _OPEN_BLOCKS.marks and not torch.compiler.is_compiling():
        _OPEN_BLOCKS.blocks.append(before)
    return before


@torch.fx.node.has_side_effect  # kept by dead-code elimination: it has no users
def restore_grad_mode(before: bool) -> None:
    """Leave a grad-mode block of the traced forward (see :func:`set_grad_mode`)."""
    torch._C._set_grad_enabled(before)
    if _OPEN_BLOCKS.blocks and not torch.compiler.is_compiling():
        _block_left(None)


@torch.fx.node.has_side_effect  # no user may read its result: keep it
def enter_autocast(device: str, dtype: torch.dtype, enabled: bool, cache_enabled: bool) -> Any:
    """Enter a ``torch.autocast(...)`` block of the traced forward; returns the context for
    :func:`exit_autocast`. Under dynamo through torch's ``_enter_autocast``, which it traces (``autocast.__enter__``
    called directly is an unsupported method there); otherwise the context itself, which torch.export traces (a
    bare ``_enter_autocast`` call confuses its dtype checks)."""
    if torch.compiler.is_dynamo_compiling():
        return _enter_autocast(device, dtype, enabled, cache_enabled)
    context = torch.autocast(device, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)
    context.__enter__()
    if _OPEN_BLOCKS.marks and not torch.compiler.is_compiling():
        _OPEN_BLOCKS.blocks.append(context)
    return context


@torch.fx.node.has_side_effect  # kept by dead-code elimination: it has no users
def exit_autocast(context: Any) -> None:
    """Leave a ``torch.autocast(...)`` block of the traced forward (see :func:`enter_autocast`)."""
    if torch.compiler.is_dynamo_compiling():
        _exit_autocast(context)
    else:
        context.__exit__(None, None, None)
        if _OPEN_BLOCKS.blocks and not torch.compiler.is_compiling():
            _block_left(context)


class _OpenBlocks(threading.local):
    """The calling thread's calls of GraphModules that :func:`close_blocks_on_error` guards, and the grad-mode and
    autocast blocks graphs entered during them (:func:`set_grad_mode`, :func:`enter_autocast`) and have not left
    yet. ``marks``: per running guarded call, innermost last, ``(id(module), how many blocks were open when it
    started)``, the count ``None`` once its forward returned. ``blocks``: innermost last, the grad mode before each
    grad-mode block (a bool) or the context of each autocast block; nothing is noted while no guarded call runs (no
    hook would close it)."""

    def __init__(self) -> None:
        self.blocks: list[Any] = []
        self.marks: list[tuple[int, int | None]] = []


_OPEN_BLOCKS = _OpenBlocks()


def _block_left(context: Any) -> None:
    """Take the block just left off :data:`_OPEN_BLOCKS`: the autocast ``context``, or (``None``) the innermost
    grad-mode block. Searched from the innermost; a block entered before the guarded call is not there."""
    blocks = _OPEN_BLOCKS.blocks
    for i in range(len(blocks) - 1, -1, -1):
        if blocks[i] is context or (context is None and isinstance(blocks[i], bool)):
            del blocks[i]
            return


@own_hook
def _mark_open_blocks(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of :func:`close_blocks_on_error`: the call starts. Not while torch compiles or exports,
    whose ``Module.__call__`` runs no ``always_call`` hook on an error (nothing would take the mark off)."""
    if not torch.compiler.is_compiling():
        _OPEN_BLOCKS.marks.append((id(module), len(_OPEN_BLOCKS.blocks)))


@own_hook
def _forget_blocks_left_open(module: nn.Module, args: tuple, output: Any) -> None:
    """Forward hook of :func:`close_blocks_on_error`, run when the forward returned: a mode switch it made
    without leaving it (``torch.set_grad_enabled(False)`` called as a function) is the forward's to make, as in
    the model. The call's mark stays, with its count ``None``, for :func:`_close_blocks_left_open` to take off:
    a call of the same module made by another hook of this call (a pre-hook) has its own mark above."""
    marks = _OPEN_BLOCKS.marks
    if marks and marks[-1][0] == id(module) and marks[-1][1] is not None and not torch.compiler.is_compiling():
        del _OPEN_BLOCKS.blocks[marks[-1][1]:]
        marks[-1] = (id(module), None)


@own_hook
def _close_blocks_left_open(module: nn.Module, args: tuple, output: Any) -> None:
    """Forward hook (``always_call``) of :func:`close_blocks_on_error`, registered after
    :func:`_forget_blocks_left_open`: takes the call's mark off; where that one did not run, the forward raised,
    and the blocks it entered and did not leave are left, innermost first, as their ``with`` statements would
    have left them. (torch runs ``always_call`` hooks for an ``Exception``, not for a ``KeyboardInterrupt``.)"""
    marks = _OPEN_BLOCKS.marks
    if not marks or marks[-1][0] != id(module) or torch.compiler.is_compiling():
        return
    _, mark = marks.pop()
    if mark is None:
        return
    blocks = _OPEN_BLOCKS.blocks
    while len(blocks) > mark:
        block = blocks.pop()
        if isinstance(block, bool):
            torch._C._set_grad_enabled(block)
        else:
            block.__exit__(None, None, None)


def _enters_blocks(gm: torch.fx.GraphModule) -> bool:
    graphs = (gm.graph, gm.__dict__.get("other_graph"))
    return any(node.op == "call_function" and node.target in (set_grad_mode, enter_autocast)
               for graph in graphs if graph is not None for node in graph.nodes)


def close_blocks_on_error(gm: torch.fx.GraphModule) -> None:
    """Make a call of ``gm`` that raises leave the ``no_grad`` / ``autocast`` blocks its forward entered, as the
    model's ``with`` statements do (nothing for a graph without such blocks).

    The graph enters and leaves them with calls (:func:`set_grad_mode` ... :func:`exit_autocast`), so a forward
    that raised between the two left the caller in the block: gradients off, or autocast's nesting one too high,
    after which no autocast block of the thread cleared torch's cache of weight casts again (a training loop that
    went on after a failed batch used the bfloat16 weights cast before its first optimizer step, silently).
    A forward pre-hook notes the call, the graph's blocks note themselves while it runs, a forward hook forgets
    them when the forward returned, and one run even when it raised (``always_call``) leaves those still open: a
    few microseconds per call of a model with such blocks. Not under torch.compile, whose compiled graph holds no
    Python calls to undo (and runs no hook on an error; an eager part after a graph break is not closed either).
    ``gm.forward(x)`` called directly bypasses the hooks. Registered once; again on copies (fx's rebuilds drop
    forward hooks: :func:`_register_root_hooks`, and a deepcopy hook); not pickled (the rebuild registers them)."""
    if not _enters_blocks(gm) or _mark_open_blocks in gm._forward_pre_hooks.values():
        return
    gm.register_forward_pre_hook(_mark_open_blocks, prepend=True)
    gm.register_forward_hook(_forget_blocks_left_open)
    gm.register_forward_hook(_close_blocks_left_open, always_call=True)
    if close_blocks_on_error not in gm.__dict__.get("_deepcopy_hooks", []):
        gm._register_deepcopy_hook(close_blocks_on_error)


def _without_own_hooks(body: dict) -> dict:
    """``body`` (a GraphModule's ``__dict__`` being pickled) without orthofx's own hooks
    (:func:`close_blocks_on_error`), which the unpickling rebuild registers again: a pickle that named them would
    load only where orthofx has these private functions. The module's own registries are left as they are."""
    own = {key for name in ("_forward_pre_hooks", "_forward_hooks") for key, hook in body.get(name, {}).items()
           if is_own_hook(hook)}
    body = dict(body)
    for name in ("_forward_pre_hooks", "_forward_hooks", "_forward_hooks_always_called"):
        if own and name in body:
            body[name] = type(body[name])((key, value) for key, value in body[name].items() if key not in own)
    if close_blocks_on_error in body.get("_deepcopy_hooks", ()):
        body["_deepcopy_hooks"] = [hook for hook in body["_deepcopy_hooks"] if hook is not close_blocks_on_error]
    return body


#: torch's variable-length sequence helpers, by name. They read lengths as Python numbers (pack_padded_sequence
#: sorts them, pad_packed_sequence sizes its output by them), which a traced tensor cannot give, so symbolic
#: tracing keeps each call as a :func:`sequence_helper` node (:func:`_sequence_helpers_recorded`), and a recurrent
#: layer that takes their PackedSequence stays a site.
_SEQUENCE_FUNCTIONS = {name: getattr(torch.nn.utils.rnn, name) for name in (
    "pack_padded_sequence", "pad_packed_sequence", "pack_sequence", "unpack_sequence", "pad_sequence",
    "unpad_sequence")}
#: The name :func:`sequence_helper` calls ``PackedSequence``'s constructor by (see :func:`_sequence_helpers_recorded`).
_PACKED_SEQUENCE = "PackedSequence"


def sequence_helper(name: str, *args: Any, **kwargs: Any) -> Any:
    """``torch.nn.utils.rnn.<name>(*args, **kwargs)``: the graph's call of one of torch's sequence helpers, or of
    the ``PackedSequence`` constructor.

    A call of orthofx's own rather than of torch's function: fx writes a wrapped torch function into the
    generated code under its dotted name, which it then cannot find among the code's globals when it traces
    anything else in the process (a KeyError in every later trace)."""
    if name == _PACKED_SEQUENCE:
        return torch.nn.utils.rnn.PackedSequence(*args, **kwargs)
    return _SEQUENCE_FUNCTIONS[name](*args, **kwargs)


def higher_order_op(name: str, *args: Any, **kwargs: Any) -> Any:
    """``torch.ops.higher_order.<name>(*args, **kwargs)``: an export-captured graph's call of a higher-order op
    (``torch.cond``'s ``cond``, ``while_loop`` ..., whose nested graphs are submodules of the graph module).

    A call of orthofx's own rather than of the op: unpickling a GraphModule traces its code again
    (:class:`_RetraceTracer`), and a higher-order op refuses the traced values it would be given there (the pickle
    failed); the re-trace records this function as a call instead (:func:`_helper_calls_kept`)."""
    return getattr(torch.ops.higher_order, name)(*args, **kwargs)


#: Functions a captured fx graph calls that must stay calls when its code is traced again (unpickling, copies).
_GRAPH_HELPERS = (set_grad_mode, restore_grad_mode, enter_autocast, exit_autocast, sequence_helper, higher_order_op)
#: torch.export's autocast calls -> fx mode's (see :func:`_flat_mode_regions`); the same arguments.
_MODE_SWITCHES = {_enter_autocast: enter_autocast, _exit_autocast: exit_autocast}


def _move_tensor_defaults(graph: torch.fx.Graph) -> None:
    """Turn forward defaults that hold tensors (``def forward(self, x, scale=torch.tensor(2.0))``) into graph code.

    fx writes a placeholder's default into the generated ``def forward(...)`` line, where a tensor (kept as the
    constant ``_tensor_constant0``, a ``get_attr`` node) cannot be named: compiling the GraphModule would raise
    ``NameError``. The placeholder's default becomes None and :func:`default_argument` puts the tensor back,
    first thing in the graph. (None itself is no value such an argument can take in the traced graph: the trace
    ran with a tensor there.)
    """
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for placeholder in placeholders:
        if not placeholder.args:
            continue
        default = placeholder.args[0]
        held: list[torch.fx.Node] = []
        torch.fx.node.map_arg(default, held.append)
        if not held:
            continue
        placeholder.args = (None,)
        for node in held:  # the get_attr nodes were made while fx built the placeholder, before it
            placeholders[-1].append(node)
        with graph.inserting_after(held[-1]):
            value = graph.call_function(default_argument, (placeholder, default))
        placeholder.replace_all_uses_with(value, delete_user_cb=lambda user, value=value: user is not value)


def default_argument(value: Any, default: Any) -> Any:
    """``value``, or the forward's default ``default`` when the caller left the argument out (None)."""
    return default if value is None else value


# ---------------------------------------------------------------------------------------------- parameter kinds

_P = inspect.Parameter
#: The order of parameter kinds in a ``def`` line, as Python requires it.
_KIND_RANK = {_P.POSITIONAL_ONLY: 0, _P.POSITIONAL_OR_KEYWORD: 1, _P.VAR_POSITIONAL: 2, _P.KEYWORD_ONLY: 3,
              _P.VAR_KEYWORD: 4}


def forward_parameters(forward: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """A forward's parameters by name (empty when it has no readable signature)."""
    try:
        return dict(inspect.signature(forward).parameters)
    except (TypeError, ValueError):  # a builtin or C forward without a signature
        return {}


def forward_parameter_kinds(forward: Callable[..., Any]) -> dict[str, Any]:
    """``{name: inspect.Parameter kind}`` of a forward's parameters (empty when it has no readable signature)."""
    return {name: p.kind for name, p in forward_parameters(forward).items()}


def _placeholder_name(node: torch.fx.Node) -> str:
    return str(node.target).lstrip("*")


def keep_parameter_kinds(graph: torch.fx.Graph, kinds: dict[str, Any]) -> None:
    """Make ``graph``'s code take its inputs with the forward's parameter kinds (``kinds``: placeholder name ->
    ``inspect.Parameter`` kind; other placeholders are positional-or-keyword).

    torch.fx writes every placeholder as a positional-or-keyword parameter, in the order it made them: keyword-only
    ones before ``*args`` (``def forward(self, x, scale=1.0, *args)`` for ``forward(self, x, *args, scale=1.0)``,
    so that ``gm(x, a, b)`` binds ``a`` to ``scale``), and a positional-only or keyword-only parameter accepts
    calls the model refuses. The placeholders are put in the order of their kinds (stable within a kind) and the
    code's ``def`` line gets ``/`` after the positional-only parameters and ``*`` before the keyword-only ones
    (when no ``*args`` precedes them). The order of placeholders is the order of the ``def`` line, so a call
    bound to ``inspect.signature(gm.forward)`` gives ``fx.Interpreter`` its inputs in placeholder order. Graphs
    whose inputs are taken apart by pytree code (torch.export of nested inputs) keep their code.
    """
    codegen = graph._codegen
    if type(codegen) is not torch.fx.graph.CodeGen:
        return
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]

    def kind(node: torch.fx.Node) -> Any:
        return kinds.get(_placeholder_name(node), _P.POSITIONAL_OR_KEYWORD)

    order = sorted(placeholders, key=lambda node: _KIND_RANK[kind(node)])
    if order != placeholders:
        first = next(n for n in graph.nodes if n.op != "placeholder")
        for node in order:
            first.prepend(node)
    positional_only = tuple(_placeholder_name(n) for n in order if kind(n) is _P.POSITIONAL_ONLY)
    keyword_only = tuple(_placeholder_name(n) for n in order if kind(n) is _P.KEYWORD_ONLY)
    if not positional_only and not keyword_only:
        vars(codegen).pop("gen_fn_def", None)
        return
    # The codegen stays a plain CodeGen (code elsewhere tells pytree code apart by the codegen's type); its
    # gen_fn_def is replaced on the instance, which copies (deepcopy of the graph) keep.
    codegen.orthofx_parameter_kinds = (positional_only, keyword_only)
    codegen.gen_fn_def = types.MethodType(_def_line_with_kinds, codegen)


def _def_line_with_kinds(codegen: torch.fx.graph.CodeGen, free_vars: list[str], maybe_return_annotation: str,
                         *, expanded_def: bool = False) -> str:
    """fx's ``def`` line with ``/`` after the positional-only parameters and ``*`` before the keyword-only ones
    (``codegen.orthofx_parameter_kinds``; see :func:`keep_parameter_kinds`)."""
    positional_only, keyword_only = codegen.orthofx_parameter_kinds
    # a free variable is written 'name', 'name : type = default' or '*name'
    names = [re.split(r"[:=#]", v, maxsplit=1)[0].strip().lstrip("*") for v in free_vars]
    marked = list(free_vars)
    first_keyword = next((i for i, name in enumerate(names) if name in keyword_only), None)
    if first_keyword is not None and not any(v.startswith("*") for v in free_vars[:first_keyword]):
        marked.insert(first_keyword, "*")
    last_positional = max((i for i, name in enumerate(names) if name in positional_only), default=None)
    if last_positional is not None:  # before the '*' above, so its index is still right
        marked.insert(last_positional + 1, "/")
    return torch.fx.graph.CodeGen.gen_fn_def(codegen, marked, maybe_return_annotation, expanded_def=expanded_def)


def _name_concrete_placeholders(graph: torch.fx.Graph, concrete_args: dict[str, Any] | None) -> None:
    """Give the placeholder fx makes for a concrete argument (``mask_1`` for ``concrete_args={"mask": None}``)
    the parameter's name again, so that the graph takes the argument by its name as the model does."""
    if not concrete_args:
        return
    taken = {str(n.target) for n in graph.nodes if n.op == "placeholder"}
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        name = str(node.target)
        base = name[:-2] if name.endswith("_1") else None
        if base in concrete_args and base not in taken and f"{base}_2" not in taken:
            node.target = base
            taken.add(base)


_MISSING = object()


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _holds(value: Any, kind: type) -> bool:
    """Whether ``value`` is a ``kind`` (an fx Proxy, torch.export's fake tensor) or a tuple / list / dict holding
    one."""
    return any(isinstance(leaf, kind) for leaf in torch.utils._pytree.tree_leaves(value))


class _ModuleState:
    """One module's attributes before a trace (``__dict__`` and its parameter, buffer and submodule tables),
    so that :meth:`OrthofxTracer.trace` can see what the forward changed on ``self`` and undo it: the user's
    model must come out of a capture as it went in."""

    _TABLES = ("_parameters", "_buffers", "_modules")

    def __init__(self, path: str, module: nn.Module):
        self.path = path
        tables = [("__dict__", module.__dict__)]
        tables += [(name, module.__dict__[name]) for name in self._TABLES
                   if isinstance(module.__dict__.get(name), dict)]
        # (name, the live table, a copy of its entries); the live tables are kept in case the forward rebinds one
        self.tables = [(name, table, dict(table)) for name, table in tables]

    def changes(self) -> list[tuple[str, str, Any, bool]]:
        """``(table, key, value now, whether the key is new)`` for every entry the trace added or rebound."""
        found = []
        for name, table, saved in self.tables:
            for key, value in table.items():
                before = saved.get(key, _MISSING)
                if value is not before:
                    found.append((name, key, value, before is _MISSING))
        return found

    @staticmethod
    def held_tensors(states: list[_ModuleState]) -> set[int]:
        """``id`` of every tensor the modules of ``states`` held before the trace: parameters, buffers and plain
        tensor attributes."""
        return {id(t) for state in states for _, _, saved in state.tables for t in saved.values()
                if isinstance(t, torch.Tensor)}

    @staticmethod
    def registers_state(table: str, new: bool, value: Any, held: set[int]) -> bool:
        """Whether a change (:meth:`changes`) registered a parameter or buffer, or set a submodule holding tensors
        the model did not hold (``held``: :meth:`held_tensors`; parameters, buffers, plain tensor attributes): state
        that a forward creating it while it runs made (:func:`_drop_created_state`, the tracer's ``created_state``).
        A submodule set under a new name that holds only the model's own tensors (``self.last = self.block``) or
        none (``self.act = nn.GELU()``) creates none."""
        if not new:
            return False
        if table in ("_buffers", "_parameters"):
            return True
        return table == "_modules" and isinstance(value, nn.Module) and any(
            isinstance(t, torch.Tensor) and id(t) not in held
            for module in value.modules() for t in itertools.chain(
                module._parameters.values(), module._buffers.values(), module.__dict__.values()))

    def restore(self) -> None:
        for _, table, saved in self.tables:
            for key in [k for k in table if k not in saved]:
                del table[key]
            for key, value in saved.items():
                if table.get(key, _MISSING) is not value:
                    table[key] = value


def _record_buffer_updates(graph: torch.fx.Graph, updates: list[tuple[str, torch.fx.Node]]) -> None:
    """End ``graph`` with a ``copy_`` of each traced value into the buffer the forward rebound to it
    (``self.steps += 1`` on a buffer), as the model's own buffer would be updated by the forward."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    with graph.inserting_before(output):
        for target, value in updates:
            node = graph.call_function(torch.ops.aten.copy_.default, (graph.get_attr(target), value))
            if "nn_module_stack" in value.meta:
                node.meta["nn_module_stack"] = dict(value.meta["nn_module_stack"])


class _Overlay(nn.Module):
    """Read-only view of a model plus extra attributes, used as the root when building the GraphModule so that
    the tracer's constants never have to be set on the user's model."""

    def __init__(self, model: nn.Module, extras: dict[str, Any]):
        super().__init__()
        self.__dict__["_orthofx_model"] = model
        self.__dict__["_orthofx_extras"] = extras
        self.training = model.training

    def __getattr__(self, name: str) -> Any:
        extras = self.__dict__["_orthofx_extras"]
        if name in extras:
            return extras[name]
        return getattr(self.__dict__["_orthofx_model"], name)


# --------------------------------------------------------------------------------------- two-mode graph modules

class ModalGraphModule(torch.fx.GraphModule):
    """A GraphModule with one graph per training mode, for models whose forward branches on ``self.training``.

    Tracing (fx or torch.export) resolves ``if self.training:`` in the mode the model is in, so one graph cannot
    switch between the branches of, e.g., a decorrelated BatchNorm (batch statistics in training, running
    statistics in eval) the way the original model does. :func:`capture` traces such models in both modes and
    returns this module, holding the graph of the mode the model was captured in (:attr:`graph_training`) and
    :attr:`other_graph`, that of the other mode. ``forward`` runs the one whose mode is the root's
    ``self.training`` now, so ``gm.train()`` / ``gm.eval()`` behave as on the model, and :attr:`graph` and
    :attr:`code` are that same graph and its code (tools that read ``gm.graph``, such as ``torch.export``, see the
    current mode's graph; :meth:`graph_for` gives either). Both graphs call the same submodules, parameters and
    buffers. Passes rewrite the captured mode's graph; ``orthofx.transform`` applies the function-site rewrites
    to :attr:`other_graph` too.

    It copies (``copy.deepcopy``, ``copy.copy``) and pickles with both graphs (and its buffers' persistence);
    :meth:`single_mode` gives a plain ``GraphModule`` of one of them (``orthofx.freeze`` keeps the eval graph).

    Example::

        import torch, orthofx.capture

        class Noisy(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(4, 4)

            def forward(self, x):
                if self.training:                      # a Python branch on the mode: one graph per mode
                    x = x + 0.1 * torch.randn_like(x)
                return self.fc(x)

        model, x = Noisy(), torch.randn(2, 4)
        gm, info = orthofx.capture.capture(model)
        torch.testing.assert_close(gm.eval()(x), model.eval()(x))   # the eval-mode branch, as model.eval() runs
    """

    def __init__(self, root: nn.Module | dict, graph: torch.fx.Graph, other_graph: torch.fx.Graph,
                 graph_training: bool, class_name: str = "GraphModule", other_root: nn.Module | None = None):
        # Set before GraphModule.__init__, whose graph assignment already calls recompile().
        self.__dict__["other_graph"] = other_graph
        self.__dict__["graph_training"] = bool(graph_training)
        super().__init__(root, graph, class_name)
        copy_targets(root if other_root is None else other_root, self, other_graph)
        other_graph.owning_module = self
        self.training = bool(getattr(root, "training", graph_training))

    @property
    def other_mode(self) -> str:
        """``"train"`` or ``"eval"``: the mode of :attr:`other_graph`."""
        return _mode_name(not self.graph_training)

    def graph_for(self, training: bool) -> torch.fx.Graph:
        """The graph that runs when the root's ``training`` flag is ``training``."""
        return self._graph if bool(training) == self.graph_training else self.other_graph

    @property
    def code(self) -> str:
        """The Python code of the current mode's graph."""
        if self.training == self.graph_training or "_other_code" not in self.__dict__:
            return torch.fx.GraphModule.code.fget(self)
        return self.__dict__["_other_code"]

    @property
    def graph(self) -> torch.fx.Graph:
        """The graph of the current mode (``self.training``)."""
        if "_graph" not in self.__dict__:
            return torch.fx.GraphModule.graph.fget(self)
        return self.graph_for(self.training)

    @graph.setter
    def graph(self, g: torch.fx.Graph) -> None:
        """Replace the current mode's graph (and recompile)."""
        if "_graph" in self.__dict__ and self.training != self.graph_training:
            if not isinstance(g, torch.fx.Graph):
                raise TypeError(f"expected a torch.fx.Graph, got {type(g).__name__}")
            self.__dict__["other_graph"] = g
            g.owning_module = self
            self.recompile()
        else:
            torch.fx.GraphModule.graph.fset(self, g)

    def single_mode(self, training: bool) -> torch.fx.GraphModule:
        """A plain ``torch.fx.GraphModule`` running the graph of mode ``training`` (sharing the submodules and
        tensors, with the persistence of the buffers; ``meta`` is copied)."""
        graph = copy.deepcopy(self.graph_for(training))
        gm = torch.fx.GraphModule(self, graph, type(self).__name__)
        gm.meta = dict(self.meta)
        gm.train(self.training)
        _match_persistence(gm, self)
        close_blocks_on_error(gm)
        return gm

    def recompile(self):
        code = super().recompile()
        other = self.__dict__.get("other_graph")
        if other is None:
            return code
        other_code = other.python_code(root_module="self")
        self.__dict__["_other_code"] = other_code.src
        other_forward = _forward_from_src(other_code.src, other_code.globals, getattr(other, "_co_fields", {}))
        graph_forward = type(self).forward
        graph_training = self.graph_training

        @functools.wraps(graph_forward)
        def forward(self, *args, **kwargs):
            if self.training == graph_training:
                return graph_forward(self, *args, **kwargs)
            return other_forward(self, *args, **kwargs)

        type(self).forward = forward
        return code

    def _deepcopy_init(self):
        def init(res, fake_mod, graph):
            ModalGraphModule.__init__(res, fake_mod, graph, fake_mod.__dict__["other_graph"],
                                      fake_mod.__dict__["graph_training"])
        return init

    def __copy__(self):
        res = ModalGraphModule(_CodeOnlyModule(dict(self.__dict__)), self._graph, self.other_graph,
                               self.graph_training)
        res.meta = getattr(self, "meta", {})
        _match_persistence(res, self)
        _register_root_hooks(res)
        return res

    def __reduce__(self):
        rebuild, (body, import_block) = super().__reduce__()
        body = _without_own_hooks(body)
        other_code = self.other_graph.python_code(root_module="self")
        body.pop("other_graph", None)
        return (_rebuild_modal_graph_module,
                (rebuild, body, import_block, other_code.src,
                 _format_import_block(other_code.globals, sys_importer), self.graph_training))


def _mode_name(training: bool) -> str:
    return "train" if training else "eval"


class _RetraceTracer(torch.fx.Tracer):
    """The tracer unpickling re-traces an export-captured graph's code with: buffers stay ``get_attr`` nodes
    (fx's default tracer would run ``buffer * 2`` once and keep the result as a constant), the input guards
    (:func:`require_input_shape` ...) stay calls instead of being run on proxies, and so do the graph's
    grad-mode and autocast switches and higher-order ops (:func:`_helper_calls_kept`)."""

    proxy_buffer_attributes = True

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("autowrap_functions", _ARGUMENT_CHECKS + (default_argument,) + _GRAPH_HELPERS)
        super().__init__(*args, **kwargs)

    def trace(self, root: nn.Module | Callable[..., Any], concrete_args: dict[str, Any] | None = None):
        forward = root.forward if isinstance(root, nn.Module) else root
        with _helper_calls_kept(self, getattr(forward, "__globals__", {})):
            graph = super().trace(root, concrete_args)
        # the graph's code has the parameter kinds of the model's forward (keep_parameter_kinds); fx's trace of it
        # makes them positional-or-keyword again
        keep_parameter_kinds(graph, forward_parameter_kinds(forward))
        return graph


@contextlib.contextmanager
def _helper_calls_kept(tracer: torch.fx.Tracer, scope: dict[str, Any]):
    """While ``tracer`` traces a captured graph's code whose globals are ``scope`` (:class:`_RetraceTracer`), each
    call of a graph helper (:data:`_GRAPH_HELPERS`: the mode switches :func:`set_grad_mode` ...
    :func:`exit_autocast`, :func:`higher_order_op`) becomes a node of the new graph, whatever its arguments.

    fx's autowrap records a call only when an argument is a traced value; ``set_grad_mode(False)`` has none, so
    the trace would run it (and the ``restore_grad_mode`` / ``enter_autocast`` ... after it, on its real result)
    and keep nothing: the unpickled module would compute a ``no_grad`` block with gradients and an autocast block
    in full precision, and register no :func:`close_blocks_on_error` hooks. The names in ``scope`` stand for
    recording calls while the trace runs, and are put back after it. (The re-trace of an fx-captured graph,
    :class:`OrthofxTracer`, runs the switches and records the mode changes they make instead:
    :func:`_recording_mode_switches`.) The calls of :func:`higher_order_op` (a ``torch.cond`` ...) are recorded
    the same way, whatever their arguments: run at trace time, ``torch.ops.higher_order.cond`` refuses the traced
    values it is given."""
    # every graph helper (sequence_helper is never in an export-captured graph: torch.export refuses packed
    # sequences, so only the mode switches and higher-order ops are there to keep)
    held = {name: value for name, value in scope.items() if any(value is helper for helper in _GRAPH_HELPERS)}

    def recording(helper: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> torch.fx.Proxy:
            # a higher-order op's node is named after the op ('cond'), as in the captured graph
            name = args[0] if helper is higher_order_op and args and isinstance(args[0], str) else None
            return tracer.create_proxy("call_function", helper, args, kwargs, name=name)
        return call

    scope.update({name: recording(helper) for name, helper in held.items()})
    try:
        yield
    finally:
        scope.update(held)


def _rebuild_modal_graph_module(rebuild: Callable, body: dict, import_block: str, other_src: str,
                                other_import_block: str, graph_training: bool) -> ModalGraphModule:
    """Unpickling of :class:`ModalGraphModule`: each graph is re-traced from its code as torch.fx does, and the
    module holds the pickled one's submodules, parameters and buffers in their order, with their persistence
    (:func:`_match_persistence`)."""
    other = rebuild({**body, "_code": other_src}, other_import_block)
    plain = rebuild(body, import_block)
    for rebuilt in (other, plain):
        if _rename_self_nodes(rebuilt.graph):  # fx's re-trace of the code names the call of a module 'self' so
            rebuilt.recompile()
    _rename_clashing_constants(plain, other.graph, other, _mode_name(not graph_training))
    pickled = _CodeOnlyModule(body)
    # a code-only root hands over every child and tensor of the pickled module in its order, as fx's own unpickling
    # does (a module root would hand over the graph's targets only, in the order the graph first reads them)
    res = ModalGraphModule(pickled, plain.graph, other.graph, graph_training, other_root=other)
    for key, value in plain.__dict__.items():
        res.__dict__.setdefault(key, value)
    res.training = bool(body.get("training", graph_training))
    res.meta = body.get("meta", res.meta)
    _match_persistence(res, pickled)
    _register_root_hooks(res)
    return res


def _register_root_hooks(res: nn.Module) -> None:
    """Register on ``res``, a GraphModule rebuilt from another's ``__dict__`` (a copy, or the unpickled module),
    the root's state-dict hooks ``orthofx.transform`` gave the original (the count of penalty calls saved with the
    model: :func:`orthofx.transform.keep_penalty_calls_in_state_dict`) and the forward hooks that close the blocks
    a failed call left open (:func:`close_blocks_on_error`): torch.fx's rebuild makes a new root without hooks.
    Registered anew rather than copied: a load hook holds a reference to its module, which would be the
    original's."""
    from .transform import keep_penalty_calls_in_state_dict  # transform imports this module
    keep_penalty_calls_in_state_dict(res)
    close_blocks_on_error(res)


def _has_attribute_at(root: Any, target: str) -> bool:
    try:
        _fetch(root, target)
    except AttributeError:
        return False
    return True


def copy_targets(root: Any, gm: nn.Module, graph: torch.fx.Graph) -> None:
    """Give ``gm`` the submodules and tensors ``graph`` reads from ``root`` that it does not have yet (as
    ``torch.fx.GraphModule(root, graph)`` does for its own graph)."""
    missing = sorted({str(n.target) for n in graph.nodes if n.op in ("call_module", "get_attr")
                      and not _has_attribute_at(gm, str(n.target))}, key=lambda t: t.count("."))
    for target in missing:
        value = root[target] if isinstance(root, dict) else _fetch(root, target)
        *path, field = target.split(".")
        owner = gm
        for atom in path:
            if not hasattr(owner, atom):
                owner.add_module(atom, nn.Module())
            owner = getattr(owner, atom)
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            owner.register_buffer(field, value)
        else:
            setattr(owner, field, value)


def _with_other_mode(model: nn.Module, gm: torch.fx.GraphModule, info: CaptureInfo,
                     capture_other_mode: Callable[[], tuple[torch.fx.Graph, nn.Module]]) -> torch.fx.GraphModule:
    """``gm`` when the model's forward is the same in both training modes; otherwise a
    :class:`ModalGraphModule` holding ``gm``'s graph and the other mode's (``info`` records the modules).
    ``capture_other_mode`` returns the other mode's graph and the module its ``get_attr`` targets live on."""
    info.warnings.extend(_mixed_mode_warnings(model, gm, capture_other_mode))
    try:
        graph, root = _in_other_mode(model, capture_other_mode)
    except _KeptInOtherMode:
        raise
    except Exception as exc:  # noqa: BLE001 - the other mode's forward may not trace; nothing to compare then
        if _refused_call(exc) is not None:
            # an autograd.Function called in the model's own forward in that mode only: refused as in this mode
            raise
        info.warnings.append(
            f"the {'eval' if model.training else 'training'}-mode forward could not be captured "
            f"({type(exc).__name__}: {first_line(str(exc), 200)}): if the model branches on self.training, "
            f"gm.train()/gm.eval() do not switch the branch; transform the model in the mode it will run in")
        return gm
    scopes = _differing_scopes(gm.graph, gm, graph, root)
    if not scopes:
        if isinstance(root, torch.fx.GraphModule):
            root.graph.owning_module = None  # no cycle left to keep the model's modules alive until a gc pass
        return gm
    info.mode_dependent = scopes
    for checked in (gm.graph, graph):
        _check_graph_names(checked, model, modal=True)
    _rename_clashing_constants(gm, graph, root, _mode_name(not model.training))
    modal = ModalGraphModule(gm, gm.graph, graph, model.training, class_name=type(model).__name__,
                             other_root=root)
    modal.training = model.training
    return modal


def _rename_clashing_constants(gm: torch.fx.GraphModule, graph: torch.fx.Graph, root: nn.Module,
                               mode: str) -> None:
    """Give the tensors ``graph`` reads from ``root`` that have a name ``gm`` uses for another object a fresh
    name ending in ``mode`` (each trace numbers its constants from 0)."""
    for node in graph.nodes:
        if node.op != "get_attr" or not _has_attribute_at(gm, str(node.target)):
            continue
        value = _fetch(root, str(node.target))
        if _fetch(gm, str(node.target)) is value:
            continue
        i = 0
        while _has_attribute_at(gm, f"{node.target}_{mode}{i}") or _has_attribute_at(
                root, f"{node.target}_{mode}{i}"):
            i += 1
        name = f"{node.target}_{mode}{i}"
        setattr(root, name, value)
        node.target = name


# ------------------------------------------------------------------------------------------------------ capture

def _drop_string_annotations(graph: torch.fx.Graph) -> None:
    """Forget type annotations that are strings (``from __future__ import annotations`` in the user's file).

    fx copies them into the generated code as globals, and ``torch.save`` of the GraphModule then fails inside
    torch.fx (it expects every global to be an object with a ``__name__``).
    """
    for node in graph.nodes:
        if isinstance(node.type, str):
            node.type = None


def module_scopes(node: torch.fx.Node) -> list[str]:
    """Qualified paths of the modules whose forwards were running when ``node`` was recorded, outermost first
    (``node.meta["nn_module_stack"]``, as fx and torch.export write it); empty at top level."""
    paths = []
    for key, value in (node.meta.get("nn_module_stack") or {}).items():
        if key == _EMPTY_STACK_KEY:
            continue  # torch.export's mark for nodes its own passes added outside any module: the top level
        path = value[0] if isinstance(value, tuple) else key
        paths.append(path if isinstance(path, str) else str(key))
    return paths


def _node_scope(node: torch.fx.Node) -> str:
    """The module whose forward made the call (for a leaf's call, its parent); empty at top level."""
    scopes = module_scopes(node)
    if node.op == "call_module" and scopes and scopes[-1] == node.target:
        scopes.pop()
    return scopes[-1] if scopes else ""


def _node_keys(graph: torch.fx.Graph) -> set[tuple[str, str]]:
    """``(scope, op)`` of every node but size computations (``sym_size``), which torch.export shares between
    modules and often places outside any (the module whose code differs is named by its other nodes)."""
    return {(_node_scope(n), f"{n.op}:{getattr(n.target, '__name__', n.target)}") for n in graph.nodes
            if not _is_symbolic_size(n)}


class _NodeIndex(int):
    """A node's position, standing for the node in a graph signature (never equal to a plain int argument)."""

    def __eq__(self, other):
        return isinstance(other, _NodeIndex) and int(self) == int(other)

    __hash__ = int.__hash__


def _graph_signature(graph: torch.fx.Graph, stand_ins: dict[torch.fx.Node, Any] | None = None) -> list[tuple]:
    """Per node: op, target and arguments (other nodes by position); equal for graphs of the same code. The nodes
    of ``stand_ins`` are left out, and their value stands for them in the arguments of the others."""
    stand_ins = stand_ins or {}
    index: dict[torch.fx.Node, Any] = dict(stand_ins)
    signature = []
    for node in graph.nodes:
        if node in stand_ins:
            continue
        index[node] = _NodeIndex(len(signature))
        args = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: index[n])
        signature.append((node.op, node.target, args))
    return signature


def _same_entry(a: tuple, b: tuple) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an argument whose == is not a bool (a tensor): compare the text
        return repr(a) == repr(b)


def _same_constant(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))
    if isinstance(a, torch.fx.GraphModule) and isinstance(b, torch.fx.GraphModule):
        return _same_graph_module(a, b)
    return False


def _same_graph_module(a: torch.fx.GraphModule, b: torch.fx.GraphModule) -> bool:
    """Whether two nested graphs (torch.export keeps a ``torch.no_grad()`` region as one) are the same code
    reading the same tensors: each trace makes its own GraphModule object for the same region."""
    if a.code != b.code:
        return False
    targets = {str(n.target) for n in a.graph.nodes if n.op in ("get_attr", "call_module")}
    return all(_has_attribute_at(b, t) and _same_constant(_fetch(a, t), _fetch(b, t)) for t in targets)


def _differing_scopes(graph: torch.fx.Graph, root: nn.Module, other: torch.fx.Graph,
                      other_root: nn.Module) -> list[str]:
    """Module paths whose code differs between two traces of one model (train and eval mode), ``root`` and
    ``other_root`` holding their attributes; empty when the graphs are the same (ops, arguments, constants)."""
    signature, other_signature = _graph_signature(graph), _graph_signature(other)
    differing: list[torch.fx.Node] = []
    if len(signature) == len(other_signature):
        for node, mine, theirs in zip(graph.nodes, signature, other_signature):
            if not _same_entry(mine, theirs) or (node.op == "get_attr" and not _same_constant(
                    _fetch(root, str(node.target)), _fetch(other_root, str(node.target)))):
                differing.append(node)
        if not differing:
            return []
    changed = _node_keys(graph) ^ _node_keys(other)
    scopes = {scope for scope, _ in changed} or {_node_scope(n) for n in differing}
    return sorted(scope or "<top level>" for scope in scopes)


def _mixed_mode_warnings(model: nn.Module, gm: torch.fx.GraphModule,
                         capture: Callable[[], tuple[torch.fx.Graph, nn.Module]]) -> list[str]:
    """A warning when submodules traced through (not leaves) are not in the model's training mode and the graph
    depends on it: their ``self.training`` branches are fixed in the captured graph as they are now, and neither
    graph of a :class:`ModalGraphModule` is the one ``model.train()`` / ``model.eval()`` would run. Found by
    capturing once more with every flag set to the model's (only when such submodules exist)."""
    leaves = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    mixed = [path for path, module in model.named_modules() if path and module.training != model.training
             and not any(path == leaf or path.startswith(leaf + ".") for leaf in leaves)]
    if not mixed:
        return []
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.train(model.training)
        graph, root = capture()
    except Exception:  # noqa: BLE001 - nothing to compare with; the mix is then not reported
        return []
    finally:
        for module, flag in flags:
            module.training = flag
    scopes = _differing_scopes(gm.graph, gm, graph, root)
    if not scopes:
        return []
    mode, other = _mode_name(model.training), _mode_name(not model.training)
    return [f"some submodules are in {other} mode while the model is in {mode} mode ({', '.join(mixed)}), and the "
            f"captured graph keeps that mix (self.training branches in {', '.join(scopes)}): gm.train() / gm.eval() "
            f"do not switch those branches the way model.train() / model.eval() would; put the whole model in one "
            f"mode (model.train() or model.eval()) before transforming it, or list those submodules under "
            f"capture.leaf_modules"]


def _in_other_mode(model: nn.Module, run: Callable[[], Any]) -> Any:
    """``run()`` with every submodule's training flag flipped as ``model.train(not model.training)`` would set
    them; the flags (a mixed state too) are restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.train(not model.training)
        return run()
    finally:
        for module, flag in flags:
            module.training = flag


def _unwritable_in_code(name: str) -> bool:
    """Whether torch.fx's generated code cannot hold ``name`` (a module / parameter / buffer name): it writes names
    between ``"`` unescaped, so a double quote, a backslash or a line break (a ModuleDict key ``"a\\nb"``) gives a
    SyntaxError or a wrong attribute lookup (a tab, a space or any other printable character is fine)."""
    return any(c in name for c in '"\\\n\r')


def replaced_forward(model: nn.Module) -> Callable | None:
    """The callable that replaces ``model.forward`` on the instance (``model.forward = f``, as some libraries'
    wrappers do), or ``None`` where there is none or it is the class's own forward bound to ``model``
    (``types.MethodType(type(model).forward, model)``), which tracing follows. A ``functools.wraps`` of the bound
    forward is a replacement: its body may do anything."""
    forward = vars(model).get("forward")
    if forward is None:
        return None
    if getattr(forward, "__self__", None) is model and getattr(forward, "__func__", None) is type(model).forward:
        return None
    return forward


def _keyword_part(name: str) -> str | None:
    """The first dotted part of ``name`` that is a Python keyword (``class`` in ``heads.class``): torch.fx writes an
    identifier part as an attribute, ``self.heads.class``, a SyntaxError in the generated code."""
    return next((part for part in name.split(".") if keyword.iskeyword(part)), None)


def _check_attribute_names(model: nn.Module) -> None:
    """CaptureError naming the first module, parameter or buffer whose name the graph's code cannot hold."""
    named = itertools.chain(((name, "module") for name, _ in model.named_modules()),
                            ((name, "parameter") for name, _ in model.named_parameters()),
                            ((name, "buffer") for name, _ in model.named_buffers()))
    for name, kind in named:
        if _unwritable_in_code(name):
            raise CaptureError(f"the {kind} name {name!r} holds a double quote, a backslash or a line break, "
                               "which torch.fx's generated code cannot hold (a SyntaxError or a wrong attribute "
                               "lookup): rename it (e.g. the nn.ModuleDict key)", module_path=name)


@functools.lru_cache(maxsize=None)
def _graph_module_names(modal: bool) -> frozenset[str]:
    """The attribute names a GraphModule (``modal``: a :class:`ModalGraphModule`) has of its own, beyond
    ``nn.Module``'s: ``graph``, ``code``, ``meta``, ``recompile`` ... (and ``other_graph`` ...). A submodule,
    parameter or buffer the graph reads at the top level under one of them cannot be set on it."""
    cls = ModalGraphModule if modal else torch.fx.GraphModule
    names = {name for name in dir(cls) if not hasattr(nn.Module, name)}
    names |= set(vars(torch.fx.GraphModule(nn.Module(), torch.fx.Graph()))) - set(vars(nn.Module()))
    if modal:
        names |= {"other_graph", "graph_training", "_other_code"}  # set in ModalGraphModule.__init__
    return frozenset(name for name in names if not name.startswith("__"))


def _check_graph_names(graph: torch.fx.Graph, model: nn.Module, modal: bool = False) -> None:
    """Before a GraphModule is built on ``graph``: a CaptureError for a submodule, parameter or buffer the graph
    uses whose path has a Python keyword in it (:func:`_keyword_part`) or, at the top level, is one of the
    GraphModule's own attributes (:func:`_graph_module_names`); and a node named ``self`` renamed
    (:func:`_rename_self_nodes`).

    Example: a GNN's ``self.graph = GraphConv(...)`` is refused naming ``graph`` (``GraphModule.graph`` is the
    graph); ``nn.Sequential(model)`` is captured, with the layer at ``0.graph``."""
    reserved = _graph_module_names(modal)
    cls = "orthofx.capture.ModalGraphModule" if modal else "torch.fx.GraphModule"
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            part = _keyword_part(str(node.target))
            if part is not None:
                what = "a module the forward calls" if node.op == "call_module" else "a tensor it reads"
                error = CaptureError(
                    f"the name {node.target!r} ({what}) has the part {part!r}, a Python keyword, which torch.fx's "
                    f"generated code cannot hold (it writes self.{node.target}, a SyntaxError). Fix: rename it in "
                    f"the model (e.g. the nn.ModuleDict key {part + '_'!r})", module_path=str(node.target))
                error.same_in_export = True  # capture mode auto: export would write the same code
                raise error
            top = str(node.target).split(".", 1)[0]
            if top in reserved:
                what = "submodule" if node.op == "call_module" or "." in str(node.target) else \
                    "parameter" if top in model._parameters else "buffer" if top in model._buffers else "attribute"
                error = CaptureError(
                    f"the model's {what} '{top}' has the name of an attribute of {cls} ({cls}.{top}), the class "
                    f"of the captured model, which cannot hold it under that name. "
                    f"Fix: rename the attribute in the model (e.g. self.{top}_layer), or transform the model inside "
                    f"a container, torch.nn.Sequential(model) (site names then start with '0.')", module_path=top)
                error.same_in_export = True  # capture mode auto: export would build the same GraphModule
                raise error
    _rename_self_nodes(graph)


def _rename_self_nodes(graph: torch.fx.Graph) -> bool:
    """Rename a node named ``self`` (the call of a submodule named ``self``: fx names a call by its target), which
    the generated forward would bind over its ``self``; whether there was one."""
    found = False
    for node in graph.nodes:
        if node.name == "self":
            node._rename("self_1")
            found = True
    return found


def _check_leaves(leaf_types: Iterable, leaf_paths: Iterable) -> None:
    """ArgumentError unless every leaf type is a class name or a class and every leaf path a string."""
    bad = [t for t in leaf_types if not isinstance(t, (str, type))]
    if bad:
        raise ArgumentError(f"leaf_types must hold class names (e.g. 'MyAttention') or classes, got {bad[0]!r} "
                            f"({type(bad[0]).__name__})")
    bad = [p for p in leaf_paths if not isinstance(p, str)]
    if bad:
        raise ArgumentError(f"leaf_paths must hold module paths such as 'encoder.layers.0' (strings), got "
                            f"{bad[0]!r} ({type(bad[0]).__name__})")


#: Held by every orthofx call that traces a model, for the whole call (:func:`one_trace_at_a_time`). Tracing patches
#: process-wide functions (torch.fx: ``nn.Module.__call__`` and ``__getattr__``; :func:`_recording_mode_switches`:
#: ``torch._C._set_grad_enabled``, autocast's ``__enter__`` / ``__exit__``) and puts back what it found: two calls
#: overlapping in two threads failed ("not installed as a submodule") and left the patches installed. Reentrant:
#: ``transform`` captures, ``load`` transforms.
_TRACE_LOCK = threading.RLock()


def one_trace_at_a_time(function: Callable) -> Callable:
    """``function`` run holding :data:`_TRACE_LOCK`: orthofx's calls that trace (``capture``, ``transform``,
    ``explain``, ``freeze``, ``export``, ``load``) run one at a time across threads, each with the model runs it
    makes (which another thread's trace would send through its patches). Another thread that runs a model while
    one of them traces still meets torch.fx's patches: that is torch's, and no lock of orthofx's can hold it. A
    model whose forward starts a thread that calls one of them and waits for it would wait forever: call it from the
    forward's own thread (the lock is reentrant)."""
    @functools.wraps(function)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with _TRACE_LOCK, _modes_restored_on_error():
            return function(*args, **kwargs)
    return locked


#: Device types whose autocast state :func:`_modes_restored_on_error` keeps (those torch's autocast supports here).
_AUTOCAST_DEVICES = tuple(d for d in ("cpu", "cuda", "xpu", "mps") if torch.amp.is_autocast_available(d))


def _autocast_nesting() -> int:
    """The calling thread's count of open autocast blocks (torch has no plain getter)."""
    nesting = torch.autocast_increment_nesting() - 1
    torch.autocast_decrement_nesting()
    return nesting


@contextlib.contextmanager
def _modes_restored_on_error():
    """Grad mode and autocast state (each device type's enabled flag and dtype, the cast cache flag, the count of
    open blocks) put back as they were when the block raises.

    A captured graph enters and leaves its forward's ``no_grad`` / ``autocast`` blocks with calls
    (:func:`set_grad_mode` ... :func:`exit_autocast`), not ``with`` statements: a run that raises between the two
    leaves the block open. ``freeze(gm, bad_inputs)`` left the autocast nesting at 1, so no later autocast block
    ever cleared torch's cache of weight casts: every forward under bfloat16 autocast reused the weights cast before
    the first optimizer step, and training went on from stale weights without a warning. Whatever the call's runs
    left open, its caller's modes are the ones it entered with; the cache is cleared as ``autocast.__exit__`` does
    when the count gets back to 0."""
    grad = torch.is_grad_enabled()
    autocast = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES]
    cache, nesting = torch.is_autocast_cache_enabled(), _autocast_nesting()
    open_blocks, marks = len(_OPEN_BLOCKS.blocks), len(_OPEN_BLOCKS.marks)
    try:
        yield
    except BaseException:
        del _OPEN_BLOCKS.blocks[open_blocks:], _OPEN_BLOCKS.marks[marks:]  # put back below instead
        torch._C._set_grad_enabled(grad)
        for device, enabled, dtype in autocast:
            torch.set_autocast_enabled(device, enabled)
            torch.set_autocast_dtype(device, dtype)
        torch.set_autocast_cache_enabled(cache)
        left_open = _autocast_nesting() - nesting
        for _ in range(left_open):
            if torch.autocast_decrement_nesting() == 0:
                torch.clear_autocast_cache()
        raise


@one_trace_at_a_time
def capture(model: Any, *, leaf_types: Iterable[str | type] = (), leaf_paths: Iterable[str] = (),
            concrete_args: dict[str, Any] | None = None, mode: str = "auto",
            max_retries: int | None = None,
            example_inputs: Any = None,
            example_kwargs: dict[str, Any] | None = None) -> tuple[torch.fx.GraphModule, CaptureInfo]:
    """Turn ``model`` into a ``torch.fx.GraphModule`` and say how it was obtained.

    Args:
        model: an ``nn.Module``, possibly wrapped by ``torch.compile`` / ``DataParallel`` / DDP (unwrapped first).
        leaf_types: class names (or dotted paths, or classes) kept as single ``call_module`` nodes.
        leaf_paths: module qualified names kept as leaves.
        concrete_args: values for forward arguments that should not be traced (see ``torch.fx.symbolic_trace``);
            fx mode only.
        mode: ``"fx"`` (symbolic tracing with :class:`OrthofxTracer`), ``"export"`` (``torch.export`` on
            ``example_inputs``) or ``"auto"`` (fx, then export when the top-level trace fails and
            ``example_inputs`` are given); see the module docstring.
        max_retries: how many submodules may be turned into leaves after a failed fx trace (default: the number
            of submodules).
        example_inputs: a tensor or a tuple of positional inputs; needed by export capture.
        example_kwargs: the keyword inputs of the example call (``{"mask": m}`` for ``model(x, mask=m)``), for
            export capture; the captured graph takes them by name too. Arguments the example leaves out keep
            their default: the graph is captured for that value, and refuses another.

    Returns:
        ``(gm, info)``: the GraphModule (sharing the model's submodules and weights; the model is not modified)
        and a :class:`CaptureInfo` with the mode used, the leaf fallbacks and warnings.

    Raises:
        CaptureError: the model is not a module or is a TorchScript module, the mode is unknown, fx tracing
            failed in the model's top-level forward (or more than ``max_retries`` times) and export was not
            possible or failed too, or export mode has no example inputs; the message names the module, the
            cause(s) and the fixes.
    """
    model = unwrap_model(model)
    if isinstance(model, torch.jit.ScriptModule):
        # neither tracer can follow compiled TorchScript: fx failed with advice about leaf_modules and
        # concrete_args, export with torch's bare "get_submodule is not supported on ScriptModules"
        raise CaptureError(f"the model is a TorchScript module ({type(model).__name__}, made by torch.jit.script or "
                           "torch.jit.trace), whose forward is compiled code that orthofx can neither trace nor "
                           "rewrite: transform the nn.Module it was made from, then script the result if you "
                           "need to (or export it with orthofx.export to .pt2 / .onnx)", module_path="")
    if mode not in CAPTURE_MODES:
        raise CaptureError(f"unknown capture mode {mode!r}; allowed: "
                           + ", ".join(repr(m) for m in CAPTURE_MODES))
    if isinstance(leaf_types, (str, type)):
        leaf_types = (leaf_types,)
    if isinstance(leaf_paths, str):
        leaf_paths = (leaf_paths,)
    leaf_types = tuple(leaf_types)
    leaf_paths = tuple(leaf_paths)
    _check_leaves(leaf_types, leaf_paths)
    _check_attribute_names(model)
    inputs = input_tuple(example_inputs)
    kwargs = keyword_inputs(example_kwargs)
    if kwargs and inputs is None:
        inputs = ()  # a forward taking keyword inputs only
    if mode == "export":
        if concrete_args:
            raise CaptureError("concrete_args is for capture mode 'fx'; with mode 'export', pass every input's "
                               "value in example_inputs instead", module_path="")
        return _finish(_capture_export(model, leaf_types, leaf_paths, inputs, kwargs), model, leaf_types, leaf_paths)
    try:
        return _finish(_capture_fx(model, leaf_types, leaf_paths, concrete_args, max_retries, inputs, kwargs), model,
                       leaf_types, leaf_paths)
    except CaptureError as fx_error:
        if getattr(fx_error, "same_in_export", False) or (mode == "fx" and "torch.export" in str(fx_error)):
            raise  # export would fail the same way, or the message already points to it
        if mode == "fx":
            # orthofx.transform takes no concrete_args: for its users torch.export is the way to fix a flag
            raise CaptureError(f"{fx_error} Or capture the model with torch.export: capture: {{mode: auto}} (the "
                               "default) or {mode: export} in the policy, with example_inputs=(x,); it takes a "
                               "non-tensor input (a flag, a count) at its example value.",
                               module_path=fx_error.module_path) from (fx_error.__cause__ or fx_error)
        if inputs is None:
            raise CaptureError(f"{fx_error} Or capture the model with torch.export instead: pass "
                               "example_inputs=(x,) (capture mode 'auto' then falls back to export, or set "
                               "capture: {mode: export} in the policy).",
                               module_path=fx_error.module_path) from (fx_error.__cause__ or fx_error)
        try:
            gm, info = _capture_export(model, leaf_types, leaf_paths, inputs, kwargs)
        except CaptureError as export_error:
            raise CaptureError(
                f"cannot capture the model: symbolic tracing (fx) failed: {fx_error} -- and torch.export failed "
                f"too: {export_error}", module_path=fx_error.module_path) from export_error
        info.fx_error = _short_reason(str(fx_error))
        return _finish((gm, info), model, leaf_types, leaf_paths)


def _finish(captured: tuple[torch.fx.GraphModule, CaptureInfo], model: nn.Module, leaf_types: tuple = (),
            leaf_paths: tuple = ()) -> tuple[torch.fx.GraphModule, CaptureInfo]:
    """What every capture mode does last: the model's training flags and buffer persistence on the
    GraphModule's own containers, and the warnings about what a graph cannot reproduce."""
    gm, info = _with_model_flags(captured, model)
    _match_persistence(gm, model)
    close_blocks_on_error(gm)
    _positional_layer_inputs(gm)
    fallbacks = tuple(path for path, _ in info.leaf_fallbacks)
    info.warnings.extend(hooked_module_warnings(model, leaf_types, tuple(leaf_paths) + fallbacks))
    if info.mode == "fx":
        info.warnings.extend(_root_hook_warnings(model))
    info.warnings.extend(_state_dict_hook_warnings(model))
    return gm, info


def _positional_layer_inputs(gm: torch.fx.GraphModule) -> None:
    """Pass the required inputs of every module call positionally: ``self.conv(input=x)`` becomes ``conv(x)``.

    Graph code reads a layer's input as ``node.args[0]``; a call by keyword bound the same values to the same
    parameters, so moving them is the same call. Only required parameters (no default) that directly follow the
    positional ones move (``output_size=`` stays a keyword), and modules with call hooks keep their call as
    written: a forward pre-hook sees the call as the forward made it (the layers passes put in place of torch's
    take torch's argument names, ``input``, so such a call reaches them too; code that observes a hooked layer's
    call reads its input through :func:`positional_call`). Both graphs of a :class:`ModalGraphModule` are
    rewritten.

    Example: ``nn.Linear`` called as ``self.fc(input=h)`` is recorded as ``fc(h)``."""
    graphs = [gm.graph_for(True), gm.graph_for(False)] if isinstance(gm, ModalGraphModule) else [gm.graph]
    changed = False
    for graph in dict.fromkeys(graphs):
        for node in graph.nodes:
            if node.op != "call_module" or not node.kwargs:
                continue
            try:
                module = gm.get_submodule(node.target)
            except AttributeError:
                continue
            if call_hook_count(module):
                continue
            args, kwargs = positional_call(module, node.args, node.kwargs)
            if len(args) != len(node.args):
                node.args, node.kwargs = args, kwargs
                changed = True
    if changed:
        gm.recompile()


def positional_call(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` of a call of ``module`` with the required parameters given by keyword that directly
    follow the positional ones moved into ``args`` (the same call; see :func:`_positional_layer_inputs`)."""
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):  # no signature (a builtin)
        return tuple(args), dict(kwargs)
    args, kwargs = list(args), dict(kwargs)
    for parameter in parameters[len(args):]:
        if (parameter.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD
                or parameter.default is not inspect.Parameter.empty or parameter.name not in kwargs):
            break
        args.append(kwargs.pop(parameter.name))
    return tuple(args), kwargs


#: What torch.export takes as a leaf of a module call's flattened arguments besides tensors (wrappers.py).
_CALL_CONSTANT_TYPES = (str, int, float, bool, type(None))


#: Defaults filled in: a str argument of a preserved call fails in torch.export ("Expected code to be unreachable").
_FILLED_DEFAULT_TYPES = (int, float, bool, type(None))


def _export_call_form(module: nn.Module, args: tuple, kwargs: dict[str, Any]
                      ) -> tuple[tuple, dict[str, Any], tuple[str, ...]]:
    """``(args, kwargs, names)``: the call of ``module`` torch.export is given, and the names of its positional
    arguments (shorter than ``args`` by the values of a ``*args`` parameter).

    Every parameter of the forward is given, positionally where it can be, those the call left out at their
    default, so that calls written in different forms (``self.t(x)``, ``self.t(input=y)``,
    ``self.a(q, k, v, need_weights=False)``) have one structure. Where a default is not a constant torch.export
    can take as an argument (a tensor, an object), the call is :func:`positional_call`'s instead."""
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):  # no signature (a builtin), or a call the forward refuses: as written
        return tuple(args), dict(kwargs), ()
    given = set(bound.arguments)
    bound.apply_defaults()
    filled = [value for name, value in bound.arguments.items() if name not in given]
    # the exact types: a subclass (an IntEnum, numpy's float64) fails in torch.export's tracepoint (no weak
    # reference), so a default of one that the call left out stays out
    if not all(type(leaf) in _FILLED_DEFAULT_TYPES for leaf in torch.utils._pytree.tree_leaves(filled)):
        new_args, new_kwargs = positional_call(module, args, kwargs)
        # positional_call moves only named parameters that directly follow the positional arguments
        moved = len(new_args) > len(args)
        return new_args, new_kwargs, tuple(bound.signature.parameters)[:len(new_args)] if moved else ()
    names = tuple(p.name for p in bound.signature.parameters.values()
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))
    return tuple(bound.args), dict(bound.kwargs), names


class _WrittenCall(NamedTuple):
    """One leaf call as :func:`_export_call_recorded` saw it: ``count`` arguments given positionally, the keywords
    ``keys`` in their order, ``names`` those of the positional arguments torch.export was given, and the form it was
    given (``spec`` of its flattened arguments, ``leaves`` their constants, :data:`_NOT_CONSTANT` for the others),
    which tells the call's signature in the exported program (:func:`_written_form_fits`)."""

    count: int
    keys: tuple[str, ...]
    names: tuple[str, ...]
    spec: Any
    leaves: tuple


#: A leaf of a recorded call's arguments that torch.export does not keep as a constant (a tensor, a SymInt).
_NOT_CONSTANT = object()


def _export_call_recorded(written: list, module: nn.Module, args: tuple, kwargs: dict[str, Any]
                          ) -> tuple[tuple, dict[str, Any]]:
    """A forward pre-hook (``with_kwargs=True``, ``written`` bound) making the call :func:`_export_call_form`'s.

    Appends a :class:`_WrittenCall` to ``written`` per call, which :func:`_call_as_written` takes to give the call
    back its form."""
    new_args, new_kwargs, names = _export_call_form(module, args, kwargs)
    flat, spec = torch.utils._pytree.tree_flatten((new_args, new_kwargs))
    leaves = tuple(leaf if type(leaf) in _CALL_CONSTANT_TYPES else _NOT_CONSTANT for leaf in flat)
    written.append(_WrittenCall(len(args), tuple(kwargs), names, spec, leaves))
    return new_args, new_kwargs


def _written_form_fits(record: _WrittenCall, signature: Any) -> bool:
    """Whether ``record`` is the form of a call whose signature in the exported program is ``signature``: the same
    structure, and the same constants of the same types (so that the arguments :func:`_call_as_written` drops are
    the defaults the call left out)."""
    if record.spec != signature.in_spec or len(record.leaves) != len(signature.inputs):
        return False
    for leaf, arg in zip(record.leaves, signature.inputs):
        if not _is_constant_argument(arg):
            if leaf is not _NOT_CONSTANT:
                return False
        elif leaf is _NOT_CONSTANT or type(leaf) is not type(arg.value) or not _same_value(leaf, arg.value):
            return False
    return True


def _call_as_written(args: tuple, kwargs: dict[str, Any], written: _WrittenCall) -> tuple[tuple, dict[str, Any]]:
    """The call :func:`_export_call_recorded` was given as the forward wrote it (``written``): its first ``count``
    positional arguments, and its keywords in their order, read from the positional arguments named ``names`` or
    the keywords (the defaults it filled in are dropped)."""
    values = dict(zip(written.names, args))
    values.update(kwargs)
    return tuple(args[:written.count]), {key: values[key] for key in written.keys}


def _written_call_text(path: str, count: int, keys: tuple[str, ...]) -> str:
    """``conv(<1 positional>)``, ``conv(input=...)``: the form of a recorded call, for messages."""
    parts = ([f"<{count} positional>"] if count else []) + [f"{key}=..." for key in keys]
    return f"{path}({', '.join(parts)})"


def _match_persistence(gm: torch.fx.GraphModule, model: nn.Module) -> None:
    """Make the buffers of ``gm``'s own containers persistent exactly where the model's are, on ``gm`` and on its
    copies and unpickled copies.

    ``torch.fx.GraphModule`` registers every tensor its graph reads as a persistent buffer: a non-persistent
    buffer of the model (``register_buffer(..., persistent=False)``), a plain tensor attribute and a constant of
    the trace would otherwise be keys of ``gm.state_dict()`` the model's has not, and
    ``gm.load_state_dict(model.state_dict())`` would fail. A deep copy (an EMA copy, ``freeze``'s copy), a
    ``copy.copy`` and unpickling (``pickle``, ``torch.save`` of the whole module) rebuild those containers the
    same way: a deepcopy hook (kept by copies of copies) marks the same names there, and copying and unpickling
    call this function again with the original (the pickled module's ``__dict__``) as ``model``
    (:func:`_copy_graph_module`, :func:`_rebuild_graph_module`, and :class:`ModalGraphModule`'s own).

    Example::

        import pickle, torch, orthofx

        class Scaled(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(4, 3)
                self.register_buffer("scale", torch.tensor(0.5), persistent=False)

            def forward(self, x):
                return self.fc(x) * self.scale

        gm = orthofx.transform(Scaled(), "lorth")
        assert list(pickle.loads(pickle.dumps(gm)).state_dict()) == ["fc.weight", "fc.bias"]
    """
    marked: dict[str, tuple[str, ...]] = {}
    for path, module in gm.named_modules():
        try:
            source = model.get_submodule(path) if path else model
        except AttributeError:
            source = None
        if source is module:
            continue  # a module the GraphModule shares with the model
        for name in module._buffers:
            if (source is not None and name in source._buffers
                    and name not in source._non_persistent_buffers_set):
                module._non_persistent_buffers_set.discard(name)
            else:
                module._non_persistent_buffers_set.add(name)
        if module._non_persistent_buffers_set:
            marked[path] = tuple(sorted(module._non_persistent_buffers_set))
    hooks = gm.__dict__.get("_deepcopy_hooks", [])
    hooks[:] = [hook for hook in hooks if getattr(hook, "func", None) is not _mark_non_persistent]  # one, the last
    gm._register_deepcopy_hook(functools.partial(_mark_non_persistent, marked))
    _copy_and_pickle_with_persistence(gm)


def _mark_non_persistent(marked: dict[str, tuple[str, ...]], gm: torch.fx.GraphModule) -> None:
    """The deepcopy hook of :func:`_match_persistence`: the buffers ``marked`` (``{module path: names}``) that the
    copy still holds are non-persistent again (only added: a layer a pass put in place keeps its own flags)."""
    for path, names in marked.items():
        try:
            module = gm.get_submodule(path) if path else gm
        except AttributeError:
            continue  # the container is gone (a pass replaced or removed it)
        module._non_persistent_buffers_set.update(name for name in names if name in module._buffers)
    _copy_and_pickle_with_persistence(gm)  # a deep copy has a class of its own


def _copy_and_pickle_with_persistence(gm: torch.fx.GraphModule) -> None:
    """Let ``copy.copy``, ``pickle`` and ``torch.save`` of the plain GraphModule ``gm`` keep what
    :func:`_match_persistence` set up.

    torch.fx gives each GraphModule a class of its own (``GraphModuleImpl``, made by ``GraphModule.__new__``) and
    puts the instance's ``forward`` there; ``__copy__`` and ``__reduce__`` go there too. A
    :class:`ModalGraphModule` has them in its class, and a subclass of GraphModule other than those two is left as
    it is (its own ``__reduce__`` rules).
    """
    cls = type(gm)
    if cls.__qualname__.endswith("GraphModuleImpl") and cls.__bases__ == (torch.fx.GraphModule,):
        cls.__copy__ = _copy_graph_module
        cls.__reduce__ = _reduce_graph_module


def _copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``copy.copy`` of a plain GraphModule :func:`capture` returned: torch.fx's (sharing submodules, tensors and
    the graph), holding every child and tensor of ``gm`` in its order, with their persistence."""
    res = torch.fx.GraphModule(_CodeOnlyModule(dict(gm.__dict__)), gm.graph, type(gm).__name__)
    res.meta = getattr(gm, "meta", {})
    _match_persistence(res, gm)
    _register_root_hooks(res)
    return res


def _reduce_graph_module(gm: torch.fx.GraphModule) -> tuple:
    """Pickling of a plain GraphModule :func:`capture` returned: torch.fx's (the graph's code and ``__dict__``,
    re-traced when unpickled), rebuilt by :func:`_rebuild_graph_module`."""
    rebuild, (body, import_block) = torch.fx.GraphModule.__reduce__(gm)
    return (_rebuild_graph_module, (rebuild, _without_own_hooks(body), import_block))


def _rebuild_graph_module(rebuild: Callable, body: dict, import_block: str) -> torch.fx.GraphModule:
    """Unpickling of :func:`_reduce_graph_module`: torch.fx's ``rebuild``, which registers the tensors of the
    pickled root as persistent buffers and starts an empty ``meta``, then the pickled module's persistence
    (:func:`_match_persistence`) and ``meta``."""
    gm = rebuild(body, import_block)
    if _rename_self_nodes(gm.graph):  # fx's re-trace of the code names the call of a module 'self' so again
        gm.recompile()
    gm.meta = body.get("meta", gm.meta)  # fx's rebuild keeps its own, empty one (a deep copy keeps the original's)
    _match_persistence(gm, _CodeOnlyModule(body))
    _register_root_hooks(gm)
    return gm


def hooked_module_warnings(model: nn.Module, leaf_types: Iterable[str | type] = (),
                           leaf_paths: Iterable[str] = ()) -> list[str]:
    """Say which submodules capture keeps as leaves only because hooks are registered on them
    (:meth:`OrthofxTracer.is_leaf_module`): their hooks keep firing, but their forward is not in the graph, so
    the function sites inside it (``torch.linalg.eigh`` ...) are not reachable (their layers still are module
    sites). Modules inside another leaf are left out: their hooks fire when that leaf calls them."""
    tracer = OrthofxTracer(leaf_types=leaf_types, leaf_paths=leaf_paths)
    hooked: list[str] = []
    leaves: set[str] = set()
    for name, module in model.named_modules():
        parts = name.split(".")
        # inside a leaf: one of its prefixes is one (a set lookup per prefix, not a scan of the leaves per module)
        if not name or any(".".join(parts[:i]) in leaves for i in range(1, len(parts))):
            continue
        if not tracer.is_leaf_module(module, name):
            continue
        leaves.add(name)
        if name not in tracer.leaf_paths and not tracer._is_leaf_type(type(module)):
            hooked.append(f"{name} ({type(module).__name__}, {call_hook_count(module)} hook(s))")
    if not hooked:
        return []
    return [f"kept as leaves because forward/backward hooks are registered on them, which tracing through would "
            f"run once and drop: {', '.join(hooked)}; their hooks fire at each call, but the operations inside "
            "their forward are not graph nodes (their layers are still module sites; function sites such as "
            "linalg.eigh inside them are not reachable). Remove the hooks before transforming, and register them "
            "on the returned module, to trace through them"]


def _state_dict_hook_warnings(model: nn.Module) -> list[str]:
    """The returned GraphModule is a new root module: state-dict hooks registered on the model itself (not on its
    submodules, which the GraphModule shares) are not carried over."""
    names = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
    hooks = sum(len(getattr(model, name, None) or {}) for name in names)
    if not hooks:
        return []
    return [f"the model itself has {hooks} state-dict hook(s) (register_state_dict_post_hook, "
            "register_load_state_dict_pre_hook, ...), which the returned module does not have (it is a new root "
            "module): state_dict() and load_state_dict() on it run without them; register them on it again"]


def _root_hook_warnings(model: nn.Module) -> list[str]:
    """Symbolic tracing calls the model's ``forward`` itself, so hooks registered on the model are not traced."""
    hooks = call_hook_count(model)
    if not hooks:
        return []
    return [f"the model itself has {hooks} forward/backward hook(s) (register_forward_hook, "
            f"register_forward_pre_hook, ...): symbolic tracing calls the model's forward directly, so the captured "
            f"graph runs without them; register them on the returned module, or on a submodule of the model, or "
            f"capture with torch.export (capture: {{mode: export}} with example inputs), which traces them"]


def _with_model_flags(captured: tuple[torch.fx.GraphModule, CaptureInfo], model: nn.Module
                      ) -> tuple[torch.fx.GraphModule, CaptureInfo]:
    """``captured`` with every submodule of its GraphModule in the training mode of the module at the same path
    in ``model`` (the root's where ``model`` has none). The containers a GraphModule creates for the paths of
    its submodules are new ``nn.Module``s in training mode: an eval-mode model would otherwise come back with
    ``layer1``, ``layer1.0`` ... in training mode."""
    gm, _ = captured
    for path, module in gm.named_modules():
        if not path:
            continue
        try:
            source = model.get_submodule(path)
        except AttributeError:
            source = model
        if source is not module:
            module.training = source.training
    return captured


def input_tuple(example_inputs: Any,
                error: Callable[[str], Exception] = lambda message: CaptureError(message, module_path="")
                ) -> tuple | None:
    """``example_inputs`` as a tuple of the model's positional inputs (a single tensor is wrapped; None stays
    None); anything else raises ``error`` (transform passes its own error type)."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise error(f"example_inputs must be a tensor or a tuple of the model's positional inputs, got "
                f"{type(example_inputs).__name__}; pass example_inputs=(x,)")


def keyword_inputs(example_kwargs: Any,
                   error: Callable[[str], Exception] = lambda message: CaptureError(message, module_path="")
                   ) -> dict[str, Any]:
    """``example_kwargs`` as a dict of keyword inputs (None: none); anything else raises ``error`` (transform
    passes its own error type), as :func:`input_tuple` does."""
    if example_kwargs is None:
        return {}
    if not isinstance(example_kwargs, dict) or not all(isinstance(k, str) for k in example_kwargs):
        raise error(f"example_kwargs must be a dict of the model's keyword inputs by name (e.g. {{'mask': m}} "
                    f"for model(x, mask=m)), got {type(example_kwargs).__name__}")
    return dict(example_kwargs)


def _short_reason(message: str) -> str:
    """The cause part of a CaptureError message (without the list of fixes)."""
    return message.split(" Fix: ", 1)[0].rstrip(".")


def _capture_fx(model: nn.Module, leaf_types: tuple, leaf_paths: tuple, concrete_args: dict[str, Any] | None,
                max_retries: int | None, inputs: tuple | None = None,
                kwargs: dict[str, Any] | None = None) -> tuple[torch.fx.GraphModule, CaptureInfo]:
    """Symbolic tracing with leaf fallback (capture mode ``fx``).

    ``inputs`` / ``kwargs``: the example call, if any. A forward that branches on whether a parameter defaulting to
    None was given (``if mask is not None:``) is traced for the example's choice (see :func:`_none_branches`)."""
    if replaced_forward(model) is not None:
        # torch.fx traces type(model).forward; model(x) runs the instance's (a submodule's is followed: its call
        # goes through nn.Module.__call__)
        raise CaptureError(
            f"the model's forward is replaced on the instance (model.forward = ..., e.g. by a library's hooks), and "
            f"symbolic tracing traces the class's, {type(model).__name__}.forward: the graph would not compute what "
            "model(x) computes. Fix: capture with torch.export, which makes the model's own call: capture mode "
            "auto (the default) or export, with example_inputs=(x,); or move the replacing code into a subclass's "
            "forward", module_path="")
    paths = set(leaf_paths)
    if max_retries is None:
        max_retries = sum(1 for _ in model.modules()) - 1
    info = CaptureInfo(mode="fx")
    graph, tracer = _trace_with_fallbacks(model, leaf_types, paths, concrete_args, max_retries, info)
    branching = _none_branches(model, leaf_types, paths, concrete_args, graph, tracer)
    left_out = _left_out(model, branching, inputs, kwargs)
    if left_out:
        concrete_args = {**(concrete_args or {}), **dict.fromkeys(left_out)}
        try:
            graph, tracer = _trace_with_fallbacks(model, leaf_types, paths, concrete_args, max_retries, info)
        except CaptureError as exc:
            raise CaptureError(
                f"symbolic tracing cannot capture the forward of {type(model).__name__} with "
                f"{_names(left_out)} left out, as the example inputs leave {'it' if len(left_out) == 1 else 'them'} "
                f"(the forward branches on whether {_names(left_out, 'or')} is None, and a trace keeps one branch): "
                f"{exc} Or pass {_names(left_out)} in the example inputs (the graph is then captured for calls "
                f"that pass {'it' if len(left_out) == 1 else 'them'}), or capture the model with torch.export "
                f"(capture: {{mode: export}}), which captures the example's call",
                module_path=exc.module_path) from (exc.__cause__ or exc)
    _check_none_arguments(graph, branching, left_out)
    info.warnings.extend(_none_branch_warnings(branching, left_out))

    _drop_string_annotations(graph)
    _check_graph_names(graph, model)
    _check_mode_switches(graph, tracer.mode_bounds, "symbolic tracing")
    gm = torch.fx.GraphModule(_Overlay(model, tracer.constants), graph, type(model).__name__)
    info.warnings.extend(_constant_warnings(gm, tracer))
    info.warnings.extend(_store_warnings(tracer.attribute_stores))
    info.warnings.extend(_checkpoint_warnings(model, tracer.checkpoints))

    def trace_other_mode() -> tuple[torch.fx.Graph, nn.Module]:
        other_tracer = OrthofxTracer(leaf_types=leaf_types, leaf_paths=paths)
        try:
            other_graph = other_tracer.trace(model, concrete_args)
        except Exception as exc:  # noqa: BLE001 - only a refused autograd.Function call is handled here
            _keep_refused_in_other_mode(model, other_tracer, exc)
            raise
        caught = other_tracer.caught_failure()
        _keep_refused_in_other_mode(model, other_tracer, caught[2] if caught is not None else None)
        if caught is not None:  # the graph would hold the except branch of the model's try/except
            raise CaptureError(f"submodule '{caught[0]}': {_describe_cause(caught[2])}, which the calling code "
                               "caught", module_path=caught[0]) from caught[2]
        _check_none_arguments(other_graph, branching, left_out)
        _drop_string_annotations(other_graph)
        _check_graph_names(other_graph, model)
        _check_mode_switches(other_graph, other_tracer.mode_bounds, "symbolic tracing")
        info.warnings.extend(w for w in _checkpoint_warnings(model, other_tracer.checkpoints)
                             if w not in info.warnings)
        return other_graph, _Overlay(model, other_tracer.constants)

    try:
        return _with_other_mode(model, gm, info, trace_other_mode), info
    except _KeptInOtherMode as kept:
        gm, info = _capture_fx(model, leaf_types, leaf_paths + tuple(path for path, _ in kept.kept), concrete_args,
                               max_retries, inputs, kwargs)
        return gm, _with_kept_leaves(info, kept.kept)


def _keep_refused_in_other_mode(model: nn.Module, tracer: OrthofxTracer, failure: BaseException | None) -> None:
    """Handle the custom autograd.Function calls that the other training mode's trace refused (see
    :func:`_with_other_mode`) as :func:`_trace_with_fallbacks` does in the first: CaptureError for a call in the
    model's own forward, :class:`_KeptInOtherMode` for a submodule's (``failure``: the trace's exception, or the
    one a forward caught in a trace that succeeded; None if none)."""
    at_top = [call for call in tracer.refused if not call.path]
    if at_top:
        raise _refused_function_error(model, at_top[0]) from at_top[0]
    refused = _refused_call(failure) if failure is not None else None
    if refused is not None:
        path = tracer.failure_location(failure)[0] or refused.path
        raise _KeptInOtherMode([(path, _describe_cause(failure))]) from failure


def _trace_with_fallbacks(model: nn.Module, leaf_types: tuple, paths: set[str],
                          concrete_args: dict[str, Any] | None, max_retries: int,
                          info: CaptureInfo) -> tuple[torch.fx.Graph, OrthofxTracer]:
    """Trace ``model``, making each submodule whose forward cannot be traced a leaf (added to ``paths`` and
    ``info.leaf_fallbacks``) and tracing again; CaptureError when the top-level forward fails or after
    ``max_retries`` fallbacks."""
    while True:
        tracer = OrthofxTracer(leaf_types=leaf_types, leaf_paths=paths)
        try:
            graph = tracer.trace(model, concrete_args)
        except Exception as exc:  # noqa: BLE001 - every trace failure is reported as a CaptureError
            failure = exc  # `exc` is unbound after the except block
            path, cls = tracer.failure_location(failure)
            cause = _describe_cause(failure)
            refused = _refused_call(failure)
            if tracer.created_state:
                # a forward that sets a new submodule and calls it: fx fails on the call ("not installed as a
                # submodule"), which the created state explains
                path, cls, cause = _created_state_leaf(model, tracer.created_state, failure)
            elif refused is not None and not refused.path:
                raise _refused_function_error(model, refused) from failure
            elif not path:
                raise CaptureError(_failure_message("", type(model), cause, info.leaf_fallbacks),
                                   module_path="") from failure
        else:
            at_top = [call for call in tracer.refused if not call.path]
            if at_top:  # the model's own forward caught the refusal (try/except): its graph would lack the call
                raise _refused_function_error(model, at_top[0]) from at_top[0]
            caught = tracer.caught_failure()
            if caught is None and not tracer.created_state:
                return graph, tracer
            if caught is None:  # a module that registers state in its forward
                failure = None
                path, cls, cause = _created_state_leaf(model, tracer.created_state, failure)
            else:
                # a failure the model's own try/except hid: the graph would hold the except branch
                path, cls, failure = caught
                cause = (f"{_describe_cause(failure)}, which the calling code caught (a trace would have followed "
                         "its except branch)")
        if path in paths or len(info.leaf_fallbacks) >= max_retries:
            message = _failure_message(path, cls, cause, info.leaf_fallbacks)
            raise CaptureError(f"{message} (gave up after {len(info.leaf_fallbacks)} leaf fallbacks: "
                               f"max_retries={max_retries})", module_path=path) from failure
        paths.add(path)
        info.leaf_fallbacks.append((path, cause))


# ---- forward parameters that default to None

def _none_branches(model: nn.Module, leaf_types: tuple, paths: set[str], concrete_args: dict[str, Any] | None,
                   graph: torch.fx.Graph, tracer: OrthofxTracer) -> list[str]:
    """The forward's parameters defaulting to None whose None-ness changes what it computes, for ``graph``, its
    trace with every parameter a traced input.

    A traced input is never None, so ``if mask is not None:`` takes its branch in the trace and ``if mask is
    None: mask = causal_mask(x)`` does not: called without the argument, the graph would fail inside, or compute
    silently without the default the model would make. Python's ``is`` cannot be intercepted, so the forward is
    traced once more with such parameters fixed to None: when that trace is ``graph`` with None in place of the
    parameters (the same ops on the same arguments), the graph computes what the model does in both cases
    (``F.scaled_dot_product_attention(q, k, v, attn_mask=mask)`` passes None through); otherwise the parameters
    are traced one at a time to find those that differ, and all of them count when none does alone (a branch
    on two of them together). A trace that fails with None counts as differing."""
    candidates = _none_default_parameters(model, concrete_args)
    if not candidates or not _root_traced_with_proxies(graph, candidates):
        return []

    def alike(names: list[str]) -> bool:
        trial = OrthofxTracer(leaf_types=leaf_types, leaf_paths=paths)
        try:
            other = trial.trace(model, {**(concrete_args or {}), **dict.fromkeys(names)})
        except Exception:  # noqa: BLE001 - the forward cannot be traced with None there: not alike
            return False
        return _same_computation(graph, _Overlay(model, tracer.constants), _as_none(graph, names),
                                 other, _Overlay(model, trial.constants), _as_none(other, names))

    if alike(candidates):
        return []
    if len(candidates) == 1:
        return candidates
    differing = [name for name in candidates if not alike([name])]
    return differing or candidates


def _none_default_parameters(model: nn.Module, concrete_args: dict[str, Any] | None) -> list[str]:
    """Names of the forward's parameters whose default is None (those in ``concrete_args`` excepted)."""
    return [p.name for p in forward_parameters(model.forward).values()
            if p.default is None and p.name not in (concrete_args or {})
            and p.kind not in (_P.VAR_POSITIONAL, _P.VAR_KEYWORD)]


def _root_traced_with_proxies(graph: torch.fx.Graph, names: list[str]) -> bool:
    """Whether ``graph`` has a placeholder for one of ``names`` (fx traced the parameter as an input)."""
    return any(n.op == "placeholder" and n.target in names for n in graph.nodes)


def _as_none(graph: torch.fx.Graph, names: list[str]) -> dict[torch.fx.Node, Any]:
    """The nodes of ``graph`` that :func:`_same_computation` leaves out: the placeholders of ``names`` (None in
    their place where a node uses them) and fx's checks that such a placeholder is None (concrete_args)."""
    stand_ins: dict[torch.fx.Node, Any] = {}
    for node in graph.nodes:
        if node.op == "placeholder" and node.target in names:
            stand_ins[node] = None
        elif (node.op == "call_function" and node.target is torch.fx._symbolic_trace._assert_is_none
              and node.args and node.args[0] in stand_ins):
            stand_ins[node] = None
    return stand_ins


def _same_computation(graph: torch.fx.Graph, root: nn.Module, stand_ins: dict[torch.fx.Node, Any],
                      other: torch.fx.Graph, other_root: nn.Module,
                      other_stand_ins: dict[torch.fx.Node, Any]) -> bool:
    """Whether two traces make the same calls on the same arguments and constants, the nodes of ``stand_ins``
    (``other_stand_ins``) left out and replaced by their value where used."""
    signature, other_signature = _graph_signature(graph, stand_ins), _graph_signature(other, other_stand_ins)
    if len(signature) != len(other_signature):
        return False
    kept = [n for n in graph.nodes if n not in stand_ins]
    other_kept = [n for n in other.nodes if n not in other_stand_ins]
    for node, other_node, mine, theirs in zip(kept, other_kept, signature, other_signature):
        if not _same_entry(mine, theirs):
            return False
        if node.op == "get_attr" and not _same_constant(_fetch(root, str(node.target)),
                                                        _fetch(other_root, str(other_node.target))):
            return False
    return True


def _left_out(model: nn.Module, names: list[str], inputs: tuple | None, kwargs: dict[str, Any] | None) -> list[str]:
    """Those of ``names`` the example call leaves out or passes as None (none without an example call, or when
    it does not bind to the forward's signature)."""
    if not names or inputs is None:
        return []
    try:
        bound = inspect.signature(model.forward).bind(*inputs, **(kwargs or {}))
    except (TypeError, ValueError):  # the call does not fit the forward: running the example will say so
        return []
    return [name for name in names if bound.arguments.get(name) is None]


def _check_none_arguments(graph: torch.fx.Graph, branching: list[str], left_out: list[str]) -> None:
    """First thing in ``graph``: refuse None for each parameter of ``branching`` traced as an input
    (:func:`require_argument_given`), and a value for each of ``left_out``, traced as None
    (:func:`require_default_argument`, in place of fx's own check, an AssertionError that says no fix)."""
    if not branching:
        return
    placeholders = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    for node in list(graph.nodes):
        if (node.op == "call_function" and node.target is torch.fx._symbolic_trace._assert_is_none
                and node.args and getattr(node.args[0], "target", None) in left_out):
            graph.erase_node(node)
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first):
        for name in branching:
            node = placeholders.get(name)
            if node is None:
                continue
            if name in left_out:
                how = f"symbolic tracing (the forward branches on whether {name} is None)"
                graph.call_function(require_default_argument, (node, name, None, "None", how))
            else:
                graph.call_function(require_argument_given, (node, name))


def _none_branch_warnings(branching: list[str], left_out: list[str]) -> list[str]:
    found = []
    given = [name for name in branching if name not in left_out]
    if given:
        found.append(
            f"the forward branches on whether {_names(given, 'or')} is None, and symbolic tracing keeps the branch "
            f"for a given value: the captured model requires {_names(given)} (None raises an error); for calls "
            f"without {'it' if len(given) == 1 else 'them'}, transform the model with example inputs that leave "
            f"{'it' if len(given) == 1 else 'them'} out")
    if left_out:
        found.append(
            f"the forward branches on whether {_names(left_out, 'or')} is None, and the example inputs leave "
            f"{'it' if len(left_out) == 1 else 'them'} out: the captured model computes with "
            f"{_names(left_out)}=None and refuses a value (an error); for calls that pass "
            f"{'it' if len(left_out) == 1 else 'them'}, transform the model with {_names(left_out)} in the example "
            f"inputs")
    return found


def _names(names: list[str], joiner: str = "and") -> str:
    quoted = [f"'{name}'" for name in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} {joiner} {quoted[-1]}"


# ------------------------------------------------------------------------------------------------ export capture

#: torch.export names the entries of ``node.meta["nn_module_stack"]`` by this prefix and the call's name in
#: ``ExportedProgram.module_call_graph`` (``"conv"``, ``"block.bn@1"`` for the second call of ``block.bn``).
_STACK_KEY_PREFIX = "L__self__"
_EXPORT_ATTR_PREFIX = "_orthofx_export_"


def _torch_forms() -> dict[Any, Any]:
    """ATen overloads -> the ``torch`` callables with the same arguments and results.

    Export capture writes these nodes in their ``torch.*`` form, as symbolic tracing records them: the
    decompositions (so function sites, ``op:`` rules and the ``svd_conditioning`` replacements see the calls
    they know) and the ops of the ``V diag(f(L)) V^T`` patterns the Newton-Schulz rewrite looks for.
    """
    aten = torch.ops.aten
    pairs = [
        ("linalg_eigh", "default", torch.linalg.eigh), ("linalg_eigvalsh", "default", torch.linalg.eigvalsh),
        ("linalg_svd", "default", torch.linalg.svd), ("linalg_svdvals", "default", torch.linalg.svdvals),
        ("svd", "default", torch.svd),
        ("matmul", "default", torch.matmul), ("bmm", "default", torch.bmm), ("mm", "default", torch.mm),
        ("mul", "Tensor", torch.mul), ("mul", "Scalar", torch.mul),
        ("add", "Tensor", torch.add), ("add", "Scalar", torch.add),
        ("transpose", "int", torch.transpose), ("permute", "default", torch.permute), ("t", "default", torch.t),
        ("unsqueeze", "default", torch.unsqueeze), ("diag_embed", "default", torch.diag_embed),
        ("diag", "default", torch.diag), ("sqrt", "default", torch.sqrt), ("rsqrt", "default", torch.rsqrt),
        ("reciprocal", "default", torch.reciprocal), ("pow", "Tensor_Scalar", torch.pow),
        ("clamp", "default", torch.clamp), ("clamp_min", "default", torch.clamp_min),
        ("relu", "default", torch.relu),
    ]
    table: dict[Any, Any] = {}
    for packet, overload, fn in pairs:
        op = getattr(getattr(aten, packet, None), overload, None)
        if op is not None:
            table[op] = fn
    return table


_TORCH_FORMS: dict[Any, Any] | None = None
_SYM_OPS_NAMES = ("sym_size", "sym_stride", "sym_numel", "sym_storage_offset")


def _export_leaves(model: nn.Module, leaf_types: tuple, leaf_paths: tuple,
                   opened: Iterable[str] = ()) -> list[str]:
    """Qualified names of the outermost submodules that the fx leaf rule keeps as leaves.

    ``opened``: leaves the forward does not call (a ``kind: block`` Sequential whose layers the forward reaches by
    index, ``self.stages[0]``), which symbolic tracing never meets as a call: the leaves inside them are taken
    instead, as fx mode sees their calls."""
    tracer = OrthofxTracer(leaf_types=leaf_types, leaf_paths=leaf_paths)
    opened = set(opened)
    leaves: list[str] = []
    found: set[str] = set()
    for name, module in model.named_modules():
        if not name:
            continue
        parts = name.split(".")
        if any(".".join(parts[:i]) in found for i in range(1, len(parts))):
            continue
        if name not in opened and tracer.is_leaf_module(module, name):
            leaves.append(name)
            found.add(name)
    return leaves


def _inner_leaves(model: nn.Module, leaf_types: tuple, leaf_paths: tuple, leaves: list[str]) -> list[str]:
    """Qualified names of the submodules inside ``leaves`` that the fx leaf rule would keep as leaves themselves
    (a block's ``nn.Linear``, a hooked module).

    Called by the block, such a module runs inside the block's call; called by the forward outside any leaf
    (``self.block.lin(x)``), symbolic tracing makes it a call of its own: a site that rules match, whose module
    (its hooks, or the layer a pass puts in its place) runs at each forward. torch.export would instead inline
    that call as ATen ops on the module's weights (a hook's work recorded once, a replaced layer's padding or
    normalisation lost): see :class:`_DirectCalls`."""
    tracer = OrthofxTracer(leaf_types=leaf_types, leaf_paths=leaf_paths)
    names = {id(module): name for name, module in model.named_modules()}
    taken = {id(model.get_submodule(path)) for path in leaves}
    inner = []
    for leaf in leaves:
        for module in model.get_submodule(leaf).modules():
            # named as named_modules() names it (a module also registered outside the leaf has that name)
            name = names[id(module)]
            if id(module) not in taken and tracer.is_leaf_module(module, name):
                taken.add(id(module))
                inner.append(name)
    return inner


def _held(module: nn.Module) -> list[int]:
    """The ids of the parameters ``module`` holds (its submodules' too), in order. Not its buffers: a forward may
    assign a registered buffer a new tensor at each call (a cache), which is the module's own doing."""
    return [id(t) for t in module.parameters()]


def _holds_call_hooks(module: nn.Module) -> bool:
    """Whether ``module`` or a module inside it has forward / backward hooks."""
    return any(call_hook_count(m) for m in module.modules())


def _refused_in_branches(path: str) -> Callable:
    """A forward pre-hook for a module whose own hooks capture took off (:func:`_stash_call_hooks`): called inside
    a ``torch.cond`` branch (where TorchDynamo traces the hook), the call would stay as ATen ops that run none of
    its hooks, so it fails the export, as any change to Python state there does; the capture's error says why."""
    def refuse(module: nn.Module, args: tuple) -> None:
        if torch.compiler.is_dynamo_compiling():
            raise RuntimeError(f"{_HOOKED_IN_BRANCH} '{path}'")

    return refuse


#: The start of the error of :func:`_refused_in_branches`.
_HOOKED_IN_BRANCH = "a torch.cond branch (or another higher-order op's body) calls the hooked module"


def _outside_branches(hook: Callable) -> Callable:
    """``hook`` (a forward pre-hook or hook that capture puts on a module while torch.export runs) doing nothing
    where TorchDynamo traces it: inside a ``torch.cond`` branch, whose body torch.export (non-strict) has dynamo
    trace as a whole graph, refusing any change to a Python object from outside the branch ("HOP: Unsafe side
    effect": the hooks' records, torch.export's own call signatures). Such a call is not a call of the module in
    the graph: it stays as ATen ops in the branch's nested graph (see :func:`_leaves_in_branches`)."""
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_dynamo_compiling():
            return None
        return hook(*args, **kwargs)

    return guarded


class _DirectCalls:
    """Forward pre-hooks and hooks on the leaves and on :func:`_inner_leaves` while torch.export runs: which inner
    leaves the forward called outside any leaf's call (``self.block.lin(x)`` beside ``self.block(x)``).

    Such a call is then kept as a leaf call too (exported again with the module among the leaves), as fx mode
    keeps it. Inlined, rules would not see it and a pass replacing the module would leave it computing with the
    old layer's ops on the new layer's weight (an orthogonal conv's circular padding, a ConvNorm lost there);
    the hooks would run once at capture, their ops baked into the graph (a hook counting calls runs one time
    fewer per forward than in the model, a hook removed later still acts). Its calls made inside the block are
    left to the block's module (see :class:`_ExportRebuilder`). A forward without such calls is exported once."""

    def __init__(self, model: nn.Module, leaves: list[str], inner: list[str]):
        self.active: list[str] = []  # the leaf calls being made
        self.own_call: list[bool] = []  # per call in ``active``: made with the module's own parameters
        self.direct: list[str] = []  # inner leaves called outside them
        self.substituted: list[str] = []  # leaves called (outside any leaf) with parameters other than their own
        # ... of those, the calls that got them for the call only (functional_call puts the module's own back when
        # it returns), by call name (``lin@1``, numbered as _capture_export numbers the leaf calls)
        self.swapped: list[str] = []
        self.count: dict[str, int] = {}  # calls of each leaf made so far
        # the parameters each leaf and inner leaf holds when the forward starts (torch.export has put its own in by
        # then): a call made with others (torch.func.functional_call substitutes them) computes with those, which a
        # call of the module would not: an inner leaf's stays inlined, so does a leaf's given them for the call only
        # (swapped) where the leaf has calls of its own; a leaf's otherwise is refused (substituted, or all swapped)
        self.own: dict[str, list[int]] = {}

        def held_at_start(module: nn.Module, args: tuple) -> None:
            self.own = {path: _held(model.get_submodule(path)) for path in (*leaves, *inner)}

        def held_at_end(module: nn.Module, args: tuple, output: Any) -> None:
            # functional_call puts the module's own parameters back once the call (hooks included) returned
            swapped = [name for name in self.substituted
                       if _held(model.get_submodule(name.split("@")[0])) == self.own.get(name.split("@")[0])]
            self.swapped += swapped
            self.substituted[:] = [name for name in self.substituted if name not in swapped]

        self.handles = [model.register_forward_pre_hook(_outside_branches(held_at_start)),
                        model.register_forward_hook(_outside_branches(held_at_end), always_call=True)]
        inner_set = set(inner)
        for path in [*leaves, *inner]:
            module = model.get_submodule(path)
            self.handles += [
                module.register_forward_pre_hook(_outside_branches(functools.partial(self._enter, path,
                                                                                     path in inner_set))),
                module.register_forward_hook(_outside_branches(functools.partial(self._exit, path)),
                                             always_call=True)]

    def _enter(self, path: str, inner: bool, module: nn.Module, args: tuple) -> None:
        own = path not in self.own or _held(module) == self.own[path]
        k = self.count.get(path, 0)
        if not inner:
            self.count[path] = k + 1
        if not self.active and not own:
            if not inner:
                self.substituted.append(path if k == 0 else f"{path}@{k}")
        elif inner and not self.active:
            self.direct.append(path)
        self.active.append(path)
        self.own_call.append(own)

    def _exit(self, path: str, module: nn.Module, args: tuple, output: Any) -> None:
        if self.active:
            self.active.pop()
            # a module that rebinds its own parameters in its forward holds those from now on (functional_call
            # puts the module's back after the call, so a substituted call changes nothing here)
            if self.own_call.pop() and path in self.own:
                self.own[path] = _held(module)


def _direct_calls_left_inlined(model: nn.Module, failed: CaptureError, added: set[str]) -> set[str]:
    """The inner leaves of ``added`` (called outside their leaf block, kept as calls for the first time in the
    export that failed with ``failed``) to leave inlined, as they were before: the one the error names, or all of
    them where it names none of them. Empty where one with hooks is to blame (inlined, its hooks would run once
    at capture only: the error stands) or none was added (the error is not theirs)."""
    where = failed.module_path or ""
    named = [path for path in added if where == path or where.startswith(path + ".")]
    blamed = named or sorted(added)
    if any(_holds_call_hooks(model.get_submodule(path)) for path in named):
        return set()
    return {path for path in blamed if not _holds_call_hooks(model.get_submodule(path))}


def _uncalled_outer_leaves(model: nn.Module, leaves: list[str], called: set[str]) -> list[str]:
    """The ``leaves`` the forward did not call that hold other submodules (whose calls fx mode would see)."""
    return [path for path in leaves
            if path not in called and any(name for name, _ in model.get_submodule(path).named_modules())]


def batch_dynamic_shapes(model: nn.Module, inputs: tuple, kwargs: dict[str, Any] | None = None,
                         batch_dims: dict[int, RecurrentBatch] | None = None) -> Any:
    """``dynamic_shapes`` marking the batch dimension of every tensor input ``Dim.AUTO`` (dynamic unless the
    model's code needs the batch size as a constant, which export then specialises without an error); None
    without ``Dim.AUTO``. The batch dimension is 0, or ``batch_dims[id(tensor)].dim`` where given
    (:func:`recurrent_batch_dims`: 1 for the input ``(L, N, H_in)`` of a seq-first recurrent layer and a hidden
    state ``(D * num_layers, N, H_out)``; None, sizes that cannot tell: dimension 0 as for any input).

    torch.export matches ``dynamic_shapes`` against the forward's parameters, so the inputs a ``*args`` parameter
    collects get one entry together (a tuple), as they are one argument. With keyword inputs the entries are a dict
    by parameter name (the inputs bound to the forward's signature, as torch.export binds them)."""
    auto = getattr(torch.export.Dim, "AUTO", None)
    if auto is None:  # pragma: no cover - torch < 2.6
        return None
    dims = batch_dims or {}

    def spec(value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or value.dim() < 1:
            return None
        return {batch_dim(value, dims): auto}

    if kwargs:
        try:
            bound = inspect.signature(model.forward).bind(*inputs, **kwargs)
        except (TypeError, ValueError):  # inputs the forward does not take: export says so, with static shapes
            return None
        return {name: _shapes_tree(spec, value) for name, value in bound.arguments.items()}
    specs = tuple(_shapes_tree(spec, value) for value in inputs)
    named = _var_positional_index(model)
    if named is None or len(specs) <= named:  # no input for ``*args``: torch.export's binding has no entry for it
        return specs
    return specs[:named] + (specs[named:],)


@contextlib.contextmanager
def buffers_kept(module: nn.Module):
    """Put every buffer of ``module`` back as it was (the same tensor, the same values) when the block ends.

    A forward may update a buffer in eval mode too (a step counter, a running mean written in place). The runs on
    the example inputs that freezing, the export checks and :func:`recurrent_batch_dims` make must not do so: the
    frozen model would hold the state after one more call than the model it was frozen from (other eval outputs),
    and an ONNX graph, which cannot keep state, computes every call from the state it was exported with."""
    # a lazy layer's uninitialised buffers have no values: the run materialises them, as it should
    lazy = torch.nn.parameter.UninitializedTensorMixin
    saved = [(owner, name, value, value.detach().clone()) for owner in module.modules()
             for name, value in owner._buffers.items() if value is not None and not isinstance(value, lazy)]
    try:
        yield
    finally:
        with torch.no_grad():
            for owner, name, value, before in saved:
                owner._buffers[name] = value  # the tensor itself, should the forward have rebound the name
                value.copy_(before)


# A hidden state h_0 / c_0 of nn.RNN / LSTM / GRU is (D * num_layers, N, H_out) whatever ``batch_first``.
_HIDDEN_BATCH_AXIS = 1


def recurrent_input_dims(batch_first: bool, batched: bool) -> tuple[str, ...]:
    """What ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` reads in the dimensions of its input before the features H_in:
    ``("batch N", "sequence length L")`` for ``batch_first=True`` (input ``(N, L, H_in)``), ``("sequence length
    L", "batch N")`` for a seq-first layer (``(L, N, H_in)``), ``("sequence length L",)`` for an unbatched input
    ``(L, H_in)``. The one place that reads ``batch_first``: the graph walk (:func:`recurrent_layout`, for
    messages) and the hooked run (:func:`recurrent_batch_dims`, for export's dynamic batch) both use it.

    Example: ``recurrent_input_dims(False, True).index("batch N")`` is 1."""
    if not batched:
        return ("sequence length L",)
    return ("batch N", "sequence length L") if batch_first else ("sequence length L", "batch N")


def recurrent_batch_axis(module: nn.RNNBase, x: torch.Tensor) -> int | None:
    """The dimension of ``x`` that the recurrent layer ``module`` reads as the batch N when ``x`` is its input
    (:func:`recurrent_input_dims`; a 2-D input is unbatched: None). E.g. 1 for ``nn.GRU(4, 6)`` (seq-first) on
    ``(5, 3, 4)``, 0 with ``batch_first=True``."""
    names = recurrent_input_dims(bool(module.batch_first), x.dim() != 2)
    return names.index("batch N") if x.dim() == 3 and "batch N" in names else None


def _recurrent_label(name: str, module: nn.Module) -> str:
    """How messages name a recurrent layer, e.g. ``"GRU 'rnn'"``."""
    return f"{type(module).__name__} '{name}'"


@dataclasses.dataclass(frozen=True)
class RecurrentBatch:
    """How a recurrent layer reads an input of the model (:func:`recurrent_batch_dims`): ``dim``, its batch
    dimension (1), or None where its sizes cannot tell (dimension 0 and 1 of equal size); ``layer``, e.g. ``"GRU
    'rnn'"``; ``role``, ``"input"`` (of a seq-first layer, ``(L, N, H_in)``) or ``"hidden state"``
    (``(D * num_layers, N, H_out)``, whatever ``batch_first``)."""
    dim: int | None
    layer: str
    role: str

    def text(self) -> str:
        """E.g. ``"the input of the seq-first GRU 'rnn' (batch_first=False: input (L, N, H_in))"``."""
        if self.role == "input":
            subject, layout = layout_text((self.layer, False, True))
            return f"the input of {subject} ({layout})"
        return f"the hidden state of the {self.layer} (h_0 / c_0: (D * num_layers, N, H_out))"


def batch_dim(x: torch.Tensor, batch_dims: dict[int, RecurrentBatch]) -> int:
    """The batch dimension of the input tensor ``x``: ``batch_dims[id(x)].dim`` (:func:`recurrent_batch_dims`: 1
    for a seq-first recurrent layer's input or a hidden state), 0 otherwise and where the sizes cannot tell."""
    read = batch_dims.get(id(x))
    return read.dim if read is not None and read.dim is not None else 0


def recurrent_batch_dims(model: nn.Module, inputs: tuple, kwargs: dict[str, Any] | None = None
                         ) -> dict[int, RecurrentBatch]:
    """``{id(tensor): RecurrentBatch}`` for each tensor of the call ``model(*inputs, **kwargs)`` (nested ones
    included) whose batch is not dimension 0: the input ``(L, N, H_in)`` of a seq-first recurrent layer
    (``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` with ``batch_first=False``) and a batched hidden state ``h_0`` (and
    ``c_0``), ``(D * num_layers, N, H_out)``, of any of them: both have the batch N in dimension 1.

    Found by one run of ``model`` on a copy of the inputs (no gradients, buffers and random state kept) with
    hooks on its recurrent layers: a tensor is a layer's input when its dimensions 0 and 1 are the sizes ``(L, N)``
    of the layer's input (an embedding or dropout in between keeps them), a hidden state when its shape is that
    of the layer's ``hx``. Where dimensions 0 and 1 have equal sizes the run cannot tell them apart: ``dim`` is
    None. Empty for a model without a recurrent layer or whose run fails (the export reports that).

    Example: ``nn.GRU(4, 6)`` (seq-first) called on ``x`` of shape ``(5, 3, 4)`` (L = 5, N = 3) gives
    ``{id(x): RecurrentBatch(1, "GRU 'rnn'", "input")}``; with ``batch_first=True`` and ``x`` of shape ``(3, 5,
    4)``, ``{}``."""
    root = unwrap_model(model)
    layers = [(name, module) for name, module in root.named_modules() if isinstance(module, nn.RNNBase)]
    if not layers:
        return {}
    kwargs = kwargs or {}
    inputs_of: dict[tuple[int, int], str] = {}  # (L, N) -> layer
    hidden_of: dict[tuple[int, ...], str] = {}  # shape -> layer
    # the tensors a layer was called with (the run's copies): an input of the call passed on as it is is read by
    # what it is, not by a shape it shares (a batch-first input shaped as the hidden state, both (2, 2, 8))
    called_with: dict[int, RecurrentBatch | None] = {}  # id -> its reading (None: batch in dimension 0)

    def hook(label: str, module: nn.RNNBase):
        def record(_, args, call_kwargs):
            x = args[0] if args else call_kwargs.get("input")
            hx = args[1] if len(args) > 1 else call_kwargs.get("hx")
            if isinstance(x, torch.Tensor):
                first = recurrent_batch_axis(module, x) == 1
                if first:
                    inputs_of.setdefault(tuple(x.shape[:2]), label)
                called_with.setdefault(id(x), RecurrentBatch(1, label, "input") if first else None)
            for h in (hx if isinstance(hx, (tuple, list)) else (hx,)):
                if isinstance(h, torch.Tensor) and h.dim() == 3:
                    hidden_of.setdefault(tuple(h.shape), label)
                    called_with.setdefault(id(h), RecurrentBatch(_HIDDEN_BATCH_AXIS, label, "hidden state"))
        return record

    handles = [module.register_forward_pre_hook(hook(_recurrent_label(name, module), module), with_kwargs=True)
               for name, module in layers]
    leaves = [leaf for leaf in torch.utils._pytree.tree_leaves((inputs, kwargs)) if isinstance(leaf, torch.Tensor)]
    devices = sorted({t.device.index or 0 for t in leaves if t.device.type == "cuda"})
    copies = torch.utils._pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, (inputs, kwargs))
    # before the run, beside ``leaves``: a forward that changes a list it is given (state.pop(0)) would shift them
    copied = [leaf for leaf in torch.utils._pytree.tree_leaves(copies) if isinstance(leaf, torch.Tensor)]
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), buffers_kept(root):
            root(*copies[0], **copies[1])
    except Exception:  # noqa: BLE001 - no layout known: the capture or export reports the failure itself
        return {}
    finally:
        for handle in handles:
            handle.remove()
    found = {}
    for x, run_copy in zip(leaves, copied):
        if id(run_copy) in called_with:
            read = called_with[id(run_copy)]
            if read is None:
                continue
        elif x.dim() == 3 and tuple(x.shape) in hidden_of:
            read = RecurrentBatch(_HIDDEN_BATCH_AXIS, hidden_of[tuple(x.shape)], "hidden state")
        elif x.dim() >= 2 and tuple(x.shape[:2]) in inputs_of:
            read = RecurrentBatch(1, inputs_of[tuple(x.shape[:2])], "input")
        else:
            continue
        found[id(x)] = read if x.shape[0] != x.shape[1] else dataclasses.replace(read, dim=None)
    return found


def _shapes_tree(spec: Callable[[Any], Any], value: Any) -> Any:
    """``spec`` of every leaf of the input ``value``, in the structure torch.export matches ``dynamic_shapes``
    against: tuples, lists, dicts and named tuples as themselves, a class registered with pytree by the user (a
    dataclass after ``torch.export.register_dataclass``) as the list of its flattened children, since torch.export
    cannot assume such a class holds shape specs (a copy of the class itself is refused: "Node type mismatch")."""
    pytree = torch.utils._pytree
    kind = pytree._get_node_type(value)
    node = pytree.SUPPORTED_NODES.get(kind)
    if node is None:
        return spec(value)
    children, context = node.flatten_fn(value)
    specs = [_shapes_tree(spec, child) for child in children]
    return node.unflatten_fn(specs, context) if kind in pytree.BUILTIN_TYPES else specs


def _var_positional_index(model: nn.Module) -> int | None:
    """How many positional parameters ``model.forward`` has before its ``*args`` parameter; None without one (or
    when the signature cannot be read)."""
    for index, parameter in enumerate(forward_parameters(model.forward).values()):
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            return index
    return None


def _forward_layout(model: nn.Module, arg_names: list[str], keyword_count: int
                    ) -> tuple[tuple[str, list[str]] | None, list[tuple[str, Any]]]:
    """How the rebuilt graph's forward takes inputs besides one placeholder per input of the example
    (``arg_names``, in torch.export's order: the positional inputs, ``args_0``, ``args_1`` ... for those a
    ``*args`` parameter collected, then the ``keyword_count`` keyword inputs).

    Returns ``(star, defaults)``. ``star``: ``(name, element names)`` when the model's forward has a ``*args``
    parameter and no keyword input follows its inputs: the graph takes them as ``*name`` (and checks their number).
    ``defaults``: ``(name, default)`` of the parameters the example left at their default, which the graph takes
    with that default (and checks that it stays so). :meth:`_ExportRebuilder._forward_inputs` puts them all in the
    order and with the kinds of the forward's parameters.
    """
    parameters = list(forward_parameters(model.forward).values())  # none without a readable signature
    star = None
    varargs = next((p for p in parameters if p.kind is inspect.Parameter.VAR_POSITIONAL), None)
    if varargs is not None:
        positional = arg_names[:len(arg_names) - keyword_count]
        elements = _vararg_elements(varargs.name, positional)
        if not keyword_count and positional[len(positional) - len(elements):] == elements:
            star = (varargs.name, elements)
    known = set(arg_names)
    kinds = (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD, _P.KEYWORD_ONLY)
    defaults = [(p.name, p.default) for p in parameters
                if p.kind in kinds and p.name not in known and p.default is not inspect.Parameter.empty]
    return star, defaults


def _vararg_elements(name: str, arg_names: list[str]) -> list[str]:
    """The names torch.export gives the inputs a ``*name`` parameter collected (``name_0``, ``name_1`` ...)."""
    elements: list[str] = []
    while f"{name}_{len(elements)}" in arg_names:
        elements.append(f"{name}_{len(elements)}")
    return elements


def _module_names(model: nn.Module) -> dict[int, str]:
    """``{key: qualified name}`` of ``model``'s modules, for :func:`_frame_module`."""
    return {id(m.__dict__): name for name, m in model.named_modules()}


def _frame_module(frame: Any, names: dict[int, str]) -> str | None:
    """The qualified name (:func:`_module_names`) of the module whose method ``frame`` runs, or None.

    Modules are known by their ``__dict__``, not by themselves: where a model reaches a module by two paths (``self.h
    = self.g``, tied layers), torch.export (non-strict) calls each module through a stand-in object of another class
    that shares the module's ``__dict__`` (its ``AttrProxy``), so the frames' ``self`` is never the model's module."""
    owner = frame.f_locals.get("self")
    attributes = getattr(owner, "__dict__", None) if isinstance(owner, nn.Module) else None
    return None if attributes is None else names.get(id(attributes))


def _failing_submodule(model: nn.Module, exc: BaseException) -> str:
    """Qualified name of the innermost submodule whose ``forward`` frame is in ``exc``'s traceback ('' if none)."""
    names = _module_names(model)
    found = ""
    for frame in _chain_frames(exc):
        name = _frame_module(frame, names)
        if name:
            found = name
    return found


def _exception_chain(exc: BaseException):
    """``exc``, then the exceptions it was raised from or while handling (``__cause__``, else ``__context__``),
    each once."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ if e.__cause__ is not None else e.__context__


def _chain_frames(exc: BaseException):
    """The frames of the tracebacks of :func:`_exception_chain`, outermost first within each exception."""
    for e in _exception_chain(exc):
        tb = e.__traceback__
        while tb is not None:
            yield tb.tb_frame
            tb = tb.tb_next


def _packed_sequence_use(model: nn.Module, exc: BaseException) -> str:
    """What failed on a variable-length sequence where ``exc`` was raised: ``"torch.nn.utils.rnn.<helper>"`` for
    a failure inside one of torch's sequence helpers, ``"the recurrent layer 'rnn' (LSTM) on a PackedSequence"``
    for one inside a torch.nn layer's forward that holds a PackedSequence; '' when the traceback shows neither.

    The outermost such frame of ``exc``'s chain counts (the call the user's code made). Positive evidence from
    the frames rather than from torch's message, whose wording (a FakeTensor where ``zeros()`` wants ints, a
    data-dependent guard) says nothing about sequences."""
    names = _module_names(model)
    helpers = os.path.splitext(os.path.realpath(torch.nn.utils.rnn.__file__))[0]
    for frame in _chain_frames(exc):
        if os.path.splitext(os.path.realpath(frame.f_code.co_filename))[0] == helpers:
            return f"torch.nn.utils.rnn.{getattr(frame.f_code, 'co_qualname', frame.f_code.co_name)}"
        owner = frame.f_locals.get("self")
        name = _frame_module(frame, names)
        if (name is not None and _is_torch_layer(type(owner))
                and any(isinstance(v, torch.nn.utils.rnn.PackedSequence) for v in frame.f_locals.values())):
            return f"the recurrent layer '{name}' ({type(owner).__name__}) on a PackedSequence"
    return ""


def _describe_export_failure(exc: BaseException) -> str:
    first = first_line(str(exc), 300)
    cause = f"{type(exc).__name__}" + (f": {first}" if first else "")
    location = _user_location(exc)
    if location:
        cause += f" at {location}"
    return cause


def _run_export(model: nn.Module, inputs: tuple, leaves: list[str], kwargs: dict[str, Any] | None = None,
                written: dict[str, list[_WrittenCall]] | None = None, records: Iterable[list | dict] = (),
                forward: _ExportedForward | None = None) -> Any:
    """``torch.export.export`` (non-strict) with a dynamic batch dimension, else static shapes. The batch of a
    seq-first recurrent layer's input ``(L, N, H_in)`` and of a hidden state is dimension 1
    (:func:`recurrent_batch_dims`). ``written``: the leaves' calls as :func:`_export_call_recorded` records them,
    for the message on a leaf whose calls torch.export cannot give one signature. ``records`` (lists the leaves'
    hooks append to, ``written``'s among them) are emptied before each attempt: they describe the calls of the
    export returned, not those of an attempt that failed part way. ``forward`` (emptied likewise) gets the
    forward's checkpointing, its refused autograd.Function calls outside ``leaves`` (the export then fails:
    see :func:`_autograd_functions_intercepted`) and its mode bounds."""
    forward = forward if forward is not None else _ExportedForward()
    records = [*records, forward]
    options = {"strict": False, "preserve_module_call_signature": tuple(leaves)}
    inputs, kwargs = _unaliased_inputs(inputs, kwargs or {})
    attempts = []
    dynamic = batch_dynamic_shapes(model, inputs, kwargs, recurrent_batch_dims(model, inputs, kwargs))
    if dynamic is not None:
        attempts.append(dynamic)
    attempts.append(None)
    error: BaseException | None = None
    for shapes in attempts:
        # torch.export prints the partial graph of a failed export to stderr; keep stderr for the success case
        # (warnings) and drop it on failure, which the CaptureError below explains.
        buffer = io.StringIO()
        # new tensor objects (same memory) for each attempt: a dynamic batch marks the tensors it is given as
        # dynamic (``_dynamo_weak_dynamic_indices``), which made the static retry dynamic too, and the marks
        # stayed on the caller's example inputs
        fresh_inputs, fresh_kwargs = torch.utils._pytree.tree_map_only(
            torch.Tensor, lambda t: t.detach().requires_grad_(t.requires_grad), (inputs, kwargs))
        for record in records:
            record.clear()
        try:
            with contextlib.redirect_stderr(buffer), _flat_mode_regions(), _signatures_outside_branches(), \
                    exported_as_plain_module(model), forward.watching(model, leaves):
                program = torch.export.export(model, fresh_inputs, kwargs=fresh_kwargs or None,
                                              dynamic_shapes=shapes, **options)
        except Exception as exc:  # noqa: BLE001 - reported as a CaptureError below
            error = exc
            if "DataDependent" in type(exc).__name__ or forward.refused:
                break  # a branch on a tensor's value, a refused Function call: static shapes would not help
            continue
        sys.stderr.write(buffer.getvalue())
        return program
    assert error is not None
    path = _failing_submodule(model, error)
    packed = _packed_sequence_use(model, error)
    if packed:
        raise CaptureError(
            f"torch.export (non-strict) cannot capture the model: it fails in {packed} "
            f"({_describe_export_failure(error)}). torch.export cannot trace a recurrent layer on a PackedSequence, "
            "nor torch.nn.utils.rnn's packing helpers (they read the batch sizes and lengths as Python numbers). "
            "Fix: capture with symbolic tracing, capture: {mode: fx} or {mode: auto} in the policy (auto, the "
            "default, tries fx first), which keeps the torch.nn.utils.rnn helpers as calls in the graph",
            module_path=path) from error
    mismatch = _call_signature_mismatch(model, error, written or {})
    if mismatch is not None:
        raise CaptureError(mismatch[1], module_path=mismatch[0]) from error
    hooked = _hooked_in_branch(error)
    if hooked is not None:
        raise CaptureError(
            f"torch.export (non-strict) cannot keep the call of module '{hooked}' "
            f"({type(model.get_submodule(hooked)).__name__}) made inside a torch.cond branch (or another "
            "higher-order op's body) as one call: it stays as ATen ops there, and the module (or a module inside "
            "it) has forward / backward hooks, which those ops would not run. Fix: call the module outside the "
            "branch, capture with symbolic tracing, capture: {mode: fx} in the policy, with the branch on a "
            "tensor's value moved into a submodule listed in capture.leaf_modules, or remove the hooks before "
            "transforming", module_path=hooked) from error
    text = _str_argument(error) if path in leaves else None
    if text is not None:
        raise CaptureError(
            f"torch.export (non-strict) cannot capture the model: a call of leaf module '{path}' "
            f"({type(model.get_submodule(path)).__name__}) passes it the string {text}, and torch.export cannot "
            "keep a string argument in the call signature it keeps for each leaf (which orthofx needs to make each "
            "call of a leaf one call of the module in the graph). Fix: capture with symbolic tracing, capture: "
            "{mode: fx} or {mode: auto} in the policy (auto, the default, tries fx first), or give the leaf the "
            "choice another way (a bool or a number argument, or an attribute set at construction)",
            module_path=path) from error
    unsupported = _unsupported_input_class(inputs, kwargs, error)
    if unsupported is not None:
        name = f"{unsupported.__module__}.{unsupported.__qualname__}"
        raise CaptureError(
            f"torch.export (non-strict) cannot capture the model: an example input is a {name}, which torch.export "
            "cannot take apart (it takes tensors, numbers, strings and tuples, lists and dicts of them, and classes "
            f"registered with torch's pytree). Fix: register the class (torch.export.register_dataclass({name}) "
            "for a dataclass, torch.utils._pytree.register_pytree_node otherwise; give it a serialized_type_name "
            "to export the model to .pt2 later), pass its tensors as inputs of their own, or capture with symbolic "
            "tracing, capture: {mode: fx} or {mode: auto} in the policy, which takes any input",
            module_path="") from error
    where = f"in submodule '{path}' ({type(model.get_submodule(path)).__name__})" if path else \
        f"in the forward of {type(model).__name__}"
    raise CaptureError(
        f"torch.export (non-strict) cannot capture the model {where}: {_describe_export_failure(error)}. Fix: "
        "check that the model runs on example_inputs; for a Python branch on a tensor's value, move it into a "
        "submodule (symbolic tracing, capture mode fx or auto, then keeps that submodule as a leaf) or write it "
        "with torch.cond", module_path=path) from error


class _ExportedForward:
    """What the model's forward did while torch.export traced it (:meth:`watching`): ``checkpoints`` and
    ``refused`` as :func:`_autograd_functions_intercepted` records them, and ``bounds``, the grad mode and autocast
    blocks its outermost call started and ended with (:func:`_check_mode_switches`)."""

    def __init__(self) -> None:
        self.checkpoints: list[str] = []
        self.refused: list[_AutogradFunctionCall] = []
        self.bounds: _ModeBounds | None = None
        self._depth = 0
        self._start = (True, 0)

    def clear(self) -> None:
        """Forget an attempt (the lists stay the same objects, which :meth:`watching` hands on)."""
        self.checkpoints.clear()
        self.refused.clear()
        self.bounds = None
        self._depth = 0

    @contextlib.contextmanager
    def watching(self, model: nn.Module, leaves: Iterable[str]):
        """While torch.export runs ``model``: the Function calls of its forward outside ``leaves`` (whose own code
        the graph runs: :class:`_ExportRebuilder` makes each of their calls a call of the module), and its bounds."""
        names = _module_names(model)
        leaf_set = set(leaves)

        def calling_module() -> str | None:
            innermost = None
            frame = sys._getframe(1)
            while frame is not None:
                name = _frame_module(frame, names)
                if name in leaf_set:
                    return None
                if innermost is None:
                    innermost = name
                frame = frame.f_back
            return innermost

        handles = [model.register_forward_pre_hook(_outside_branches(self._started)),
                   model.register_forward_hook(_outside_branches(self._returned), always_call=True)]
        try:
            with _autograd_functions_intercepted(lambda args, kwargs: True, calling_module, self.checkpoints,
                                                 self.refused):
                yield
        finally:
            for handle in handles:
                handle.remove()

    def _started(self, module: nn.Module, args: tuple) -> None:
        if not self._depth:
            self._start = (torch.is_grad_enabled(), _autocast_nesting())
        self._depth += 1

    def _returned(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._depth -= 1
        if not self._depth:
            self.bounds = _ModeBounds(self._start[0], torch.is_grad_enabled(), _autocast_nesting() - self._start[1])


def _hooked_in_branch(error: BaseException) -> str | None:
    """The path of the hooked module whose call in a branch failed the export (:func:`_refused_in_branches`)."""
    pattern = re.compile(re.escape(_HOOKED_IN_BRANCH) + r" '([^']*)'")
    for exc in _exception_chain(error):
        found = pattern.search(str(exc))
        if found is not None:
            return found.group(1)
    return None


#: torch.export's refusal of a string in a preserved module's call (its tracepoint takes no str argument).
_STR_ARGUMENT = re.compile(r"Expected code to be unreachable, but got: ('.*')")


def _str_argument(error: BaseException) -> str | None:
    """The string (quoted) a preserved leaf call passed, when that is why torch.export refused ``error``."""
    found = _assertion_match(error, _STR_ARGUMENT)
    return None if found is None else found.group(1)


def _assertion_match(error: BaseException, pattern: re.Pattern) -> re.Match | None:
    """``pattern``'s match in the first AssertionError of ``error``'s chain that it matches (torch.export's
    refusals of preserved module calls are assertions), else None."""
    for exc in _exception_chain(error):
        found = pattern.search(str(exc)) if isinstance(exc, AssertionError) else None
        if found is not None:
            return found
    return None


#: torch.export's refusal of a preserved module whose calls differ in structure (torch/_export/wrappers.py).
_SPEC_MISMATCH = re.compile(r"(in|out)_spec mismatch for (?:_export_root\.)?([\w.]+):")


def _call_signature_mismatch(model: nn.Module, error: BaseException, written: dict[str, list[_WrittenCall]]
                             ) -> tuple[str, str] | None:
    """``(path, message)`` when torch.export refused ``error`` because the calls of a leaf have arguments or
    results of different structures (it keeps one call signature per module); None otherwise."""
    found = _assertion_match(error, _SPEC_MISMATCH)
    if found is None:
        return None
    kind, used = found.groups()
    path = _ModulePaths(model).canonical(used)
    try:
        cls = type(model.get_submodule(path)).__name__
    except AttributeError:
        return None
    forms = list(dict.fromkeys(_written_call_text(used, call.count, call.keys) for call in written.get(path, ())))
    what = "pass it arguments" if kind == "in" else "return results"
    calls = f" (the calls: {', '.join(forms)})" if len(forms) > 1 else ""
    return path, (
        f"torch.export (non-strict) cannot capture the model: the calls of leaf module '{path}' ({cls}) {what} "
        f"of different structures{calls}. torch.export keeps one call signature per module, which orthofx "
        "needs to make each call of a leaf one call of the module in the graph; orthofx already passes every "
        "argument of such a call positionally (a call by keyword and a positional one are alike), but not a "
        "value that is None in one call and a tensor or a list in another, nor results of different "
        "structures. Fix: call the module the same way each time (the same keyword arguments with values of "
        "the same kind), or capture with symbolic tracing, capture: {mode: fx} or {mode: auto} in the policy "
        "(auto, the default, tries fx first), which records each call as it is written")


def _unsupported_input_class(inputs: tuple, kwargs: dict[str, Any], error: BaseException) -> type | None:
    """The class of the first example input (nested ones included) that torch.export refused as an input type
    (an unregistered dataclass or container), when that is why ``error`` was raised; None otherwise."""
    if not any(isinstance(e, ValueError) and "Unsupported input type" in str(e) for e in _exception_chain(error)):
        return None
    plain = (torch.Tensor, int, float, bool, complex, str, type(None), torch.dtype, torch.device)
    for leaf in torch.utils._pytree.tree_leaves((inputs, kwargs)):
        if not isinstance(leaf, plain):
            return type(leaf)
    return None


def _unaliased_inputs(inputs: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """The example inputs with every tensor that shares memory with an earlier one replaced by a copy.

    torch.export takes inputs that share memory (``example_inputs=(x, x)``) as one tensor: the exported graph reads
    the last of them everywhere (``self.lin(y) + y`` for ``self.lin(x) + y``) and computes a wrong result for any
    call with two different tensors. The captured graph must treat every input as a tensor of its own.
    """
    seen: set[tuple[int, int]] = set()

    def own(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        try:
            key = (0, value.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # a tensor without storage (a subclass): by identity
            key = (1, id(value))
        if key[1] == 0:  # no memory (an empty or meta tensor): by identity
            key = (1, id(value))
        if key not in seen:
            seen.add(key)
            return value
        return value.detach().clone().requires_grad_(value.requires_grad)

    return torch.utils._pytree.tree_map(own, (inputs, kwargs))


#: torch.export's passes that move ``torch.no_grad()`` / ``torch.autocast(...)`` regions into nested graphs
#: (``wrap_with_set_grad_enabled`` / ``wrap_with_autocast``): (module, function).
_REGION_PASSES = (("torch._export.passes.replace_set_grad_with_hop_pass", "replace_set_grad_with_hop_pass"),
                  ("torch._export.passes.replace_autocast_with_hop_pass", "replace_autocast_with_hop_pass"))


@contextlib.contextmanager
def _flat_mode_regions():
    """Keep grad-mode and autocast regions flat in the exported graph (``torch._C._set_grad_enabled`` and
    ``_enter_autocast`` / ``_exit_autocast`` calls around the region's nodes) while torch.export runs.

    torch.export moves such a region into a nested graph after tracing, and records the call signature of the
    modules it preserves only afterwards, from the top-level graph: a leaf module called inside
    ``with torch.no_grad():`` or ``with torch.autocast(...):`` got an empty signature and could not become a
    ``call_module`` node (rules and passes did not see it). :class:`_ExportRebuilder` writes the switches in fx mode's
    form (:func:`set_grad_mode` ...). Where torch has no such pass (another version), nothing changes, and such a
    call stays inlined with a warning. Exports in other threads meanwhile run the passes as usual.
    """
    import importlib

    thread = threading.get_ident()
    patched = []
    for module_name, attribute in _REGION_PASSES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # pragma: no cover - another torch version
            continue
        original = getattr(module, attribute, None)
        if original is None:  # pragma: no cover - another torch version
            continue

        def keep_flat(gm: Any, signature: Any, original: Callable = original) -> tuple[Any, Any]:
            if threading.get_ident() != thread:
                return original(gm, signature)
            return gm, signature

        setattr(module, attribute, keep_flat)
        patched.append((module, attribute, original))
    try:
        yield
    finally:
        for module, attribute, original in patched:
            setattr(module, attribute, original)


@contextlib.contextmanager
def _signatures_outside_branches():
    """Make the hooks torch.export puts on the modules whose call signature it keeps (the leaves,
    ``preserve_module_call_signature``) do nothing inside a ``torch.cond`` branch while torch.export runs in this
    thread.

    They record each call's signature in a dict, which TorchDynamo, tracing a branch, refuses ("HOP: Unsafe side
    effect"): a leaf called in a branch made the capture fail where a plain torch.export succeeds. The call then
    stays as ATen ops in the branch's nested graph; the leaf's other calls keep their signatures. Where torch has no
    such function (another version), nothing changes."""
    try:
        from torch._export import wrappers
    except ImportError:  # pragma: no cover - another torch version
        yield
        return
    if getattr(wrappers, "_wrap_submodule", None) is None:  # pragma: no cover - another torch version
        yield
        return
    thread = threading.get_ident()
    # one patch for all the threads capturing at once (each restoring its own would leave another's in place)
    with _SIGNATURE_PATCH.lock:
        if not _SIGNATURE_PATCH.threads:
            _SIGNATURE_PATCH.original = wrappers._wrap_submodule
            wrappers._wrap_submodule = _wrap_submodule_outside_branches
        _SIGNATURE_PATCH.threads[thread] = _SIGNATURE_PATCH.threads.get(thread, 0) + 1
    try:
        yield
    finally:
        with _SIGNATURE_PATCH.lock:
            _SIGNATURE_PATCH.threads[thread] -= 1
            if not _SIGNATURE_PATCH.threads[thread]:
                del _SIGNATURE_PATCH.threads[thread]
            if not _SIGNATURE_PATCH.threads:
                wrappers._wrap_submodule = _SIGNATURE_PATCH.original


class _SignaturePatch:
    """The state of :func:`_signatures_outside_branches`'s patch: torch's function, and the threads (with their
    nesting) capturing meanwhile, whose signature hooks it wraps."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.original: Callable[..., Any] | None = None
        self.threads: dict[int, int] = {}


_SIGNATURE_PATCH = _SignaturePatch()


def _wrap_submodule_outside_branches(mod: nn.Module, path: str, specs: dict) -> Any:
    """torch's ``_wrap_submodule`` (:data:`_SIGNATURE_PATCH`), whose hooks do nothing in a branch
    (:func:`_outside_branches`) when a capture of this thread runs."""
    handles = _SIGNATURE_PATCH.original(mod, path, specs)
    if threading.get_ident() not in _SIGNATURE_PATCH.threads:
        return handles
    submodule = mod.get_submodule(path)
    for handle in handles:
        for registry in (submodule._forward_pre_hooks, submodule._forward_hooks):
            if handle.id in registry:
                registry[handle.id] = _outside_branches(registry[handle.id])
    return handles


#: The other paths :func:`_capture_export` lists to give torch.export the leaves' other names before it runs.
_ALIAS_PATHS_WALKED = 256


def first_module_paths(model: nn.Module, limit: int | None = None) -> dict[str, str] | None:
    """Every other qualified name of a module registered more than once (``self.first = self.blocks[0]``) ->
    its name in ``named_modules()``, the one fx mode, ``state_dict`` readers and rules use (``first`` ->
    ``blocks.0``, and the paths below it: ``first.conv`` -> ``blocks.0.conv``).

    The map has an entry per path, and a model sharing a module at every level of a nesting (each level holding
    its child under two names) has 2^depth paths: ``limit`` bounds the entries (other paths), None returned beyond
    it.
    Resolving a path needs no such walk: :class:`_ModulePaths` does it in time linear in the model's size."""
    names = {id(module): path for path, module in model.named_modules()}
    aliases: dict[str, str] = {}

    def walk(module: nn.Module, path: str, ancestors: tuple[int, ...]) -> bool:
        for name, child in module._modules.items():
            if child is None or id(child) in ancestors:  # a cycle (a child holding its parent): no new names
                continue
            child_path = _join(path, name)
            if names[id(child)] != child_path:
                aliases[child_path] = names[id(child)]
                # every path walked is a module's first name (once each) or an entry: the walk is bounded too
                if limit is not None and len(aliases) > limit:
                    return False
            if not walk(child, child_path, ancestors + (id(child),)):
                return False
        return True

    return aliases if walk(model, "", (id(model),)) else None


class _ModulePaths:
    """The name ``named_modules()`` gives the module at any attribute path of ``model``, found without walking
    every path (:func:`first_module_paths` may have to walk 2^depth of them).

    ``edges`` holds, for each module under its first name ``p`` and each child ``c`` of it whose first name is
    not ``p.c``, ``p.c`` -> the child's first name: one entry at most per (module, child name) edge. A path
    ``c_1. ... .c_k`` is resolved one step at a time from the root: with ``q`` the first name of the module at
    ``c_1. ... .c_i``, the module at ``c_1. ... .c_(i+1)`` is the child ``c_(i+1)`` of that module, whose first
    name is ``edges[q.c_(i+1)]``, or ``q.c_(i+1)`` where that has no entry. Replacing only the longest aliased
    prefix of the path once would not do: the rest may lead through another alias (a child shared by two parents
    at different depths). Segments past the last module (a parameter's or buffer's name) are kept as they are."""

    def __init__(self, model: nn.Module):
        named = list(model.named_modules())
        first = {id(module): path for path, module in named}
        self.edges: dict[str, str] = {}
        for path, module in named:
            for name, child in module._modules.items():
                if child is not None and first[id(child)] != _join(path, name):
                    self.edges[_join(path, name)] = first[id(child)]

    def __bool__(self) -> bool:
        return bool(self.edges)

    def canonical(self, target: str) -> str:
        """``target`` (a module path, or a parameter's / buffer's) with its module part named as
        ``named_modules()`` names that module."""
        if not self.edges or not target:
            return target
        path = ""
        for part in target.split("."):
            step = _join(path, part)
            path = self.edges.get(step, step)
        return path


def _leaves_in_branches(ep: Any, leaves: list[str], aliases: _ModulePaths) -> dict[str, tuple[str, list[str]]]:
    """The leaves whose parameters or buffers a nested graph of ``ep`` takes (a ``torch.cond`` branch's, or the
    body of another higher-order op): leaf -> (where, e.g. ``"a torch.cond branch"``, those weights' names). Such
    a leaf is called there (or its weights read), which stays as ATen ops in that graph
    (:func:`_outside_branches`). A leaf without weights called there cannot be told from the graph."""
    signature = ep.graph_signature
    held = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    found: dict[str, tuple[str, list[str]]] = {}
    for node in ep.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
            continue
        flat = torch.utils._pytree.tree_leaves((node.args, node.kwargs))
        if not any(isinstance(arg, torch.fx.Node) and arg.op == "get_attr"
                   and isinstance(_fetch(ep.graph_module, str(arg.target)), torch.fx.GraphModule) for arg in flat):
            continue  # no nested graph
        op = node.target.name()
        where = "a torch.cond branch" if op == "cond" else f"the nested graph of torch.ops.higher_order.{op}"
        for arg in flat:
            if not isinstance(arg, torch.fx.Node) or arg.op != "placeholder" or arg.target not in held:
                continue
            target = aliases.canonical(held[arg.target])
            leaf = next((path for path in leaves if target.startswith(path + ".")), None)
            if leaf is not None and target not in found.setdefault(leaf, (where, []))[1]:
                found[leaf][1].append(target)
    return found


def _stack_paths(graph: torch.fx.Graph) -> set[str]:
    """The module paths in the ``nn_module_stack`` of ``graph``'s nodes: the attribute paths the forward called
    modules by."""
    return {value[0] for node in graph.nodes for value in (node.meta.get("nn_module_stack") or {}).values()
            if isinstance(value, tuple) and value and isinstance(value[0], str)}


def module_edges_holding(root: nn.Module, holds: Callable[[nn.Module], bool]) -> list[tuple[str, str, nn.Module]]:
    """``(parent's path, child's name, child)`` for each (module, child name) edge of ``root`` whose child
    ``holds``: each module walked once, in the order of ``named_modules()`` (which gives the parents their first
    paths), and a child that holds not entered.

    A module under several names is set under all of them by setting each edge once (``setattr(parent, name,
    new)``): a module shared at every level of a nesting has 2^depth paths but 2 edges per level."""
    edges: list[tuple[str, str, nn.Module]] = []
    seen: set[int] = set()
    stack = [("", root)]
    while stack:
        parent_path, parent = stack.pop()
        if id(parent) in seen:
            continue
        seen.add(id(parent))
        below = []
        for name, child in parent._modules.items():
            if child is None:
                continue
            if holds(child):
                edges.append((parent_path, name, child))
            elif id(child) not in seen:
                below.append((_join(parent_path, name), child))
        stack.extend(reversed(below))
    return edges


class _LeafCall:
    """One call of a leaf module in the exported graph: its nodes and its preserved call signature."""

    def __init__(self, path: str, name: str, signature: Any, fqn: str | None = None):
        self.path = path
        self.name = name
        self.fqn = name if fqn is None else fqn  # torch.export's name of the call (the attribute path used)
        self.signature = signature
        self.members: list[torch.fx.Node] = []
        self.outputs: set[torch.fx.Node] = set()
        self.seen = 0
        self.emitted = False


class _Isolation(Exception):
    """A leaf call whose nodes cannot be replaced by one ``call_module`` node; the message says why."""

    def __init__(self, call: _LeafCall, reason: str):
        super().__init__(reason)
        self.call = call


def _is_plain_spec(spec: Any) -> bool:
    """Whether a pytree spec is made of tuples, lists and dicts only (fx can write those in its own code)."""
    if spec.is_leaf():
        return True
    if spec.type not in (tuple, list, dict):
        return False
    return all(_is_plain_spec(child) for child in _children(spec))


def _children(spec: Any) -> list:
    children = getattr(spec, "children", None)
    return list(children()) if callable(children) else list(spec.children_specs)


def _key_paths(spec: Any) -> list[tuple]:
    """For every leaf of a pytree spec, the (kind, key) steps from the root: ``("item", i)`` or ``("attr", n)``."""
    pytree = torch.utils._pytree
    tree = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    paths = []
    for keypath, _ in pytree.tree_flatten_with_path(tree)[0]:
        steps = []
        for key in keypath:
            if isinstance(key, pytree.SequenceKey):
                steps.append(("item", key.idx))
            elif isinstance(key, pytree.MappingKey):
                steps.append(("item", key.key))
            elif isinstance(key, pytree.GetAttrKey):
                steps.append(("attr", key.name))
            else:
                raise ValueError(f"unsupported output container key {key!r}")
        paths.append(tuple(steps))
    return paths


class _ExportRebuilder:
    """Turns an ExportedProgram's graph into an fx graph of fx mode's form (see the module docstring)."""

    def __init__(self, ep: Any, model: nn.Module, leaves: list[str], excluded: set[str],
                 call_order: list[str] = (), aliases: _ModulePaths | None = None,
                 as_written: dict[str, _WrittenCall] | None = None):
        global _TORCH_FORMS
        if _TORCH_FORMS is None:
            _TORCH_FORMS = _torch_forms()
        self.ep = ep
        self.model = model
        self.old = ep.graph
        self.by_name = {n.name: n for n in self.old.nodes}
        self.graph = torch.fx.Graph()
        self.env: dict[torch.fx.Node, Any] = {}
        self.extras: dict[str, Any] = {}
        self.attr_nodes: dict[str, torch.fx.Node] = {}
        self.lazy: dict[torch.fx.Node, tuple[str, Any]] = {}  # lifted placeholders -> (target, constant value)
        self.member_of: dict[torch.fx.Node, _LeafCall] = {}
        self.waiting: list[_LeafCall] = []  # calls without nodes of their own (nn.Identity), emitted when ready
        self.inputs: list[torch.fx.Node] = []  # the nodes standing for the exported graph's user inputs
        self.kinds: dict[str, Any] = {}  # placeholder name -> the forward's parameter kind (_forward_inputs)
        self.prologue_end: torch.fx.Node | None = None
        # grad-mode switches of the forward (see _grad_switch): the mode torch.export traced in, which is this one
        self.grad_mode = torch.is_grad_enabled()
        self.grad_switches: list[tuple[torch.fx.Node, bool]] = []
        self.aliases = aliases if aliases is not None else _ModulePaths(model)
        self.as_written = as_written or {}  # call name -> how to give it its form back (_call_as_written)
        leaf_set = set(leaves)
        made = set(call_order)
        calls: dict[str, _LeafCall] = {}
        for entry, path, name in self._leaf_entries(leaf_set):
            if call_order and name not in made:
                continue  # a leaf the forward did not call on the example inputs (an untaken branch)
            if name not in excluded:
                calls[_STACK_KEY_PREFIX + entry.fqn] = _LeafCall(path, name, entry.signature, entry.fqn)
        nested: set[str] = set()
        for node in self.old.nodes:
            outer = None
            for key in node.meta.get("nn_module_stack") or {}:
                call = calls.get(key)
                if call is None:
                    continue
                if outer is None:
                    outer = call
                    call.members.append(node)
                    self.member_of[node] = call
                else:
                    nested.add(key)
        # A call of a leaf made inside another leaf's call (a layer shared by a leaf block and the model's own
        # forward) is made by that leaf's module: a node of its own would make it twice (a BatchNorm's running
        # statistics updated twice, its hooks run twice).
        self.calls = [call for key, call in calls.items() if key not in nested or call.members]
        for call in self.calls:
            self._prepare(call)
        # a call without nodes waits for the leaf call made before it (in the order the forward made them)
        by_name = {call.name: call for call in self.calls}
        self.previous: dict[str, _LeafCall] = {}
        last = None
        for name in call_order:
            call = by_name.get(name)
            if call is None:
                continue
            if last is not None:
                self.previous[name] = last
            last = call

    # ---- leaf calls

    def _leaf_entries(self, leaf_set: set[str]) -> list[tuple[Any, str, str]]:
        """``(entry, path, name)`` of the exported calls of leaves: ``path`` the module's qualified name as
        ``named_modules()`` gives it, ``name`` the call's (``path``, then ``path@1`` ... in call order, as
        :func:`_capture_export` counts the calls). torch.export names a call by the attribute path the forward
        used, so a module registered twice (``self.first = self.blocks[0]``) has calls under both paths: they are
        calls of one leaf, numbered by where their nodes are in the graph."""
        entries = []
        for entry in self.ep.module_call_graph[1:]:
            used = entry.fqn.split("@")[0]
            path = self.aliases.canonical(used)
            if path in leaf_set:
                entries.append((entry, used, path))
        aliased = {path for _, used, path in entries if used != path}
        if not aliased:
            return [(entry, path, entry.fqn) for entry, _, path in entries]
        first_node: dict[str, int] = {}
        for index, node in enumerate(self.old.nodes):
            for key in node.meta.get("nn_module_stack") or {}:
                first_node.setdefault(key, index)
        out = [(entry, path, entry.fqn) for entry, _, path in entries if path not in aliased]
        for group in aliased:
            members = [entry for entry, _, path in entries if path == group]
            # a name the forward did not call the module by (no nodes) last: the call order has no place for it
            members.sort(key=lambda e: first_node.get(_STACK_KEY_PREFIX + e.fqn, math.inf))
            out.extend((entry, group, group if k == 0 else f"{group}@{k}") for k, entry in enumerate(members))
        return out

    def _prepare(self, call: _LeafCall) -> None:
        sig = call.signature
        if sig is None:
            raise _Isolation(call, "torch.export kept no call signature for it")
        names = [a.name for a in list(sig.inputs) + list(sig.outputs) if not _is_constant_argument(a)]
        missing = [n for n in names if n not in self.by_name]
        if missing:
            raise _Isolation(call, f"its signature names values that are not in the graph ({missing[0]})")
        if (not sig.inputs and not sig.outputs) or sig.in_spec.num_leaves != len(sig.inputs) \
                or sig.out_spec.num_leaves != len(sig.outputs):
            # e.g. a call inside `with torch.no_grad()`, which export keeps as a nested graph
            raise _Isolation(call, "torch.export recorded no call signature for it; the call is probably inside a "
                                   "torch.no_grad() / autocast region, which export keeps as a nested graph")
        if not call.members:
            self.waiting.append(call)
        inputs = {self.by_name[a.name] for a in sig.inputs if not _is_constant_argument(a)}
        call.outputs = {self.by_name[a.name] for a in sig.outputs
                        if not _is_constant_argument(a) and self.by_name[a.name] not in inputs}

    def _written_form(self, call: _LeafCall) -> _WrittenCall | None:
        """How the forward wrote ``call``: the record of the call of that number in the call order, else one of the
        leaf's records of the same form (the calls of a leaf registered under two names are numbered by where
        their nodes are, which puts a call without nodes last, wherever the forward made it), else None (the
        call as torch.export was given it, every argument filled in: the same call). A record of another form
        would drop arguments the call gave (``g(h, 2.0)`` made as ``g(h)``)."""
        record = self.as_written.get(call.name)
        if record is not None and _written_form_fits(record, call.signature):
            return record
        for name, record in self.as_written.items():
            if name.split("@")[0] == call.path and _written_form_fits(record, call.signature):
                return record
        return None

    def _argument(self, arg: Any) -> Any:
        if _is_constant_argument(arg):
            return arg.value
        return self._resolve(self.by_name[arg.name])

    def _emit(self, call: _LeafCall) -> None:
        call.emitted = True
        sig = call.signature
        flat = [self._argument(a) for a in sig.inputs]
        args, kwargs = torch.utils._pytree.tree_unflatten(flat, sig.in_spec)
        written = self._written_form(call)
        if written is not None:
            args, kwargs = _call_as_written(tuple(args), dict(kwargs), written)
        node = self.graph.call_module(call.path, tuple(args), dict(kwargs))
        if call.members:
            stack = call.members[0].meta.get("nn_module_stack") or {}
            outer = {}
            for key, value in stack.items():
                if key == _STACK_KEY_PREFIX + call.fqn:
                    break
                outer[key] = value
            node.meta["nn_module_stack"] = outer
        paths = _key_paths(sig.out_spec)
        parts: dict[tuple, torch.fx.Node] = {(): node}  # output containers already taken apart
        for arg, steps in zip(sig.outputs, paths):
            if _is_constant_argument(arg):
                continue
            old = self.by_name[arg.name]
            if old not in call.outputs:
                continue  # an input returned as it is: its users keep using the input
            for depth in range(1, len(steps) + 1):
                if steps[:depth] not in parts:
                    kind, key = steps[depth - 1]
                    fn = operator.getitem if kind == "item" else getattr
                    parts[steps[:depth]] = self.graph.call_function(fn, (parts[steps[:depth - 1]], key))
            value = parts[steps]
            for meta_key in ("val", "tensor_meta"):
                if meta_key in old.meta:
                    value.meta[meta_key] = old.meta[meta_key]
            self.env[old] = value

    def _emit_ready(self) -> None:
        for call in list(self.waiting):
            sig = call.signature
            needed = [self.by_name[a.name] for a in sig.inputs if not _is_constant_argument(a)]
            previous = self.previous.get(call.name)
            if all(n in self.env for n in needed) and (previous is None or previous.emitted):
                self.waiting.remove(call)
                self._emit(call)

    # ---- values

    def _resolve(self, old: torch.fx.Node) -> Any:
        if old in self.env:
            return self.env[old]
        if old in self.lazy:
            # parameters, buffers and constants are read where first used, as symbolic tracing does (the
            # GraphModule then registers the submodules in the order fx mode does)
            target, value = self.lazy[old]
            self.env[old] = self._attr(target) if value is None else self._extra(value, target)
            return self.env[old]
        call = self.member_of.get(old)
        if call is not None:
            if old in call.outputs and not call.emitted:
                self._emit(call)
                return self.env[old]
            if _is_symbolic_size(old):
                # export shares size computations between modules: recompute this one outside the call
                value = _size_method_form(self.graph.node_copy(old, self._resolve))
                self.env[old] = value
                return value
            written = self._written_input(old, call)
            if written is not None:
                # the module writes into its input in place (ReLU(inplace=True)): later users read the input, as
                # in fx mode, not the call's result, which a forward hook may have replaced
                if not call.emitted:
                    self._emit(call)
                self.env[old] = self._resolve(written)
                return self.env[old]
            raise _Isolation(call, f"node '{old.name}' inside the call is used outside it")
        raise CaptureError(f"cannot rebuild the exported graph: node '{old.name}' is used before it is computed",
                           module_path="")

    def _written_input(self, old: torch.fx.Node, call: _LeafCall) -> torch.fx.Node | None:
        """The input of ``call`` that ``old`` (a node of the call) is after in-place ops on it, else None."""
        inputs = {self.by_name[a.name] for a in call.signature.inputs if not _is_constant_argument(a)}
        node = old
        while node not in inputs:
            target = node.target if node.op == "call_function" else None
            first = target._schema.arguments[0] if isinstance(target, torch._ops.OpOverload) \
                and target._schema.arguments else None
            written = first is not None and first.alias_info is not None and first.alias_info.is_write
            if not written or not node.args or not isinstance(node.args[0], torch.fx.Node):
                return None
            node = node.args[0]
        return node

    def _attr(self, target: str) -> torch.fx.Node:
        node = self.attr_nodes.get(target)
        if node is None:
            node = self.graph.get_attr(target)
            self.attr_nodes[target] = node
        return node

    def _extra(self, value: Any, hint: str) -> torch.fx.Node:
        base = hint if hint.startswith(_CONSTANT_PREFIX) else f"{_EXPORT_ATTR_PREFIX}{hint}"
        base = base.replace(".", "_")
        name, i = base, 0
        while name in self.extras or hasattr(self.model, name):
            i += 1
            name = f"{base}_{i}"
        self.extras[name] = value
        return self._attr(name)

    def _copy(self, old: torch.fx.Node) -> torch.fx.Node:
        if old.op == "get_attr":
            value = _fetch(self.ep.graph_module, str(old.target))
            if isinstance(value, torch.fx.GraphModule):  # a nested graph (a torch.cond branch ...)
                value = _retraceable_nested_graph(value)
            node = self._extra(value, str(old.target))
            node.meta.update(old.meta)
            return node
        if (old.op == "call_function" and old.target is torch.ops.aten.type_as.default and len(old.args) == 2
                and not old.kwargs):
            # ``c.type_as(t)`` in fx mode's form: freeze folds a constant cast to a traced value's dtype (decorrelated
            # BatchNorm's running covariance) only in this form
            new = self.graph.call_method("type_as", torch.fx.node.map_arg(old.args, self._resolve))
            new.meta.update(old.meta)
            return new
        if old.op == "call_function" and old.target is torch._C._set_grad_enabled and len(old.args) == 1:
            return self._grad_switch(bool(old.args[0]))
        new = _size_method_form(self.graph.node_copy(old, self._resolve))
        if new.op == "call_function":
            if _higher_order_name(new.target) is not None:
                _call_through_helper(new)
            elif new.target in _MODE_SWITCHES:
                new.target = _MODE_SWITCHES[new.target]
            elif new.target is torch.ops.aten.mT.default and len(new.args) == 1 and not new.kwargs:
                new.target = getattr
                new.args = (new.args[0], "mT")
            else:
                new.target = _TORCH_FORMS.get(new.target, new.target)
        return new

    def _grad_switch(self, mode: bool) -> torch.fx.Node:
        """A ``torch._C._set_grad_enabled(mode)`` of the exported graph (the entry or exit of a ``torch.no_grad()``
        block, see :func:`_flat_mode_regions`) in fx mode's form (:func:`_recording_mode_switches`): an entry
        :func:`set_grad_mode`, whose exit :func:`restore_grad_mode` restores the mode the graph is *run* in (export
        recorded the exit as the mode it traced in)."""
        if self.grad_switches and mode == self.grad_switches[-1][1]:
            entry, _ = self.grad_switches.pop()
            node = self.graph.call_function(restore_grad_mode, (entry,))
        else:
            node = self.graph.call_function(set_grad_mode, (mode,))
            self.grad_switches.append((node, self.grad_mode))
        self.grad_mode = mode
        return node

    # ---- inputs

    def _input(self, old: torch.fx.Node, new: torch.fx.Node) -> None:
        """``new`` stands for the exported graph's user input ``old``."""
        new.meta.update(old.meta)
        self.env[old] = new
        self.inputs.append(new)

    def _forward_inputs(self, user: list[torch.fx.Node], arg_names: list[str], keyword_count: int) -> None:
        """One placeholder per input of the example, named as the forward's parameters; the inputs of a ``*args``
        parameter as one ``*args`` placeholder whose number of inputs is checked; the parameters the example left
        at their default, with that default, checked to stay so (see :func:`_forward_layout`).

        The placeholders are in the order of the forward's parameters, and :attr:`kinds` keeps their kinds for the
        graph's code (:func:`keep_parameter_kinds`: keyword-only stays keyword-only, positional-only stays
        positional-only; inputs a ``**kwargs`` parameter collected are keyword-only), so the graph binds a call as
        the model does. An input the example gave keeps the parameter's default too (None where code cannot
        write it): a call leaving it out reaches the input checks, which say what the graph was captured for,
        instead of failing in Python's binding."""
        star, defaults = _forward_layout(self.model, arg_names, keyword_count)
        parameters = forward_parameters(self.model.forward)
        rank = {name: i for i, name in enumerate(parameters)}
        varargs = next((p.name for p in parameters.values() if p.kind is _P.VAR_POSITIONAL), None)
        varkw = next((p.name for p in parameters.values() if p.kind is _P.VAR_KEYWORD), None)
        elements = set(_vararg_elements(varargs, arg_names)) if varargs is not None else set()
        inside = set(star[1]) if star is not None else set()
        given = dict(zip(arg_names, user))
        # (rank among the forward's parameters, name, kind, default) per placeholder
        slots: list[tuple[int, str, Any, Any]] = []
        for name in arg_names:
            if name in inside:
                continue
            if name in parameters:
                slots.append((rank[name], name, parameters[name].kind, parameters[name].default))
            elif name in elements:
                slots.append((rank[varargs], name, _P.POSITIONAL_OR_KEYWORD, _P.empty))
            else:  # a keyword input a **kwargs parameter collected (or a forward without a readable signature)
                slots.append((rank.get(varkw, len(rank)), name,
                              _P.KEYWORD_ONLY if varkw is not None else _P.POSITIONAL_OR_KEYWORD, _P.empty))
        slots += [(rank[name], name, parameters[name].kind, default) for name, default in defaults]
        if star is not None:
            slots.append((rank[star[0]], "*" + star[0], _P.VAR_POSITIONAL, _P.empty))
        slots.sort(key=lambda slot: slot[0])  # stable: export's order within a rank (the elements of *args)
        self.kinds = {name.lstrip("*"): kind for _, name, kind, _ in slots}
        left = dict(defaults)
        defaulted = False  # a positional parameter before this one has a default: so must this one
        checks = []
        star_node = None
        for _, name, kind, default in slots:
            positional = kind in (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD)
            held = _P.empty
            if default is not _P.empty:
                held = default if isinstance(default, _GUARDED_VALUE_TYPES) else None  # a value code can write
            elif defaulted and positional:
                held = None  # the input checks refuse None
            defaulted = defaulted or (positional and held is not _P.empty)
            node = self.graph.placeholder(name, default_value=held)
            if kind is _P.VAR_POSITIONAL:
                star_node = node
            elif name in left:
                checks.append((node, name, held, _default_text(default)))
            else:
                self._input(given[name], node)
        if star is not None:
            name, star_elements = star
            before = len(arg_names) - len(star_elements)
            self.graph.call_function(require_input_count, (star_node, name, len(star_elements), before))
            for i, element in enumerate(star_elements):
                self._input(given[element], self.graph.create_node(
                    "call_function", operator.getitem, (star_node, i), name=element))
        for args in checks:
            self.graph.call_function(require_default_argument, args)

    # ---- the whole graph

    def build(self) -> torch.fx.Graph:
        from torch.export.graph_signature import InputKind, OutputKind

        sig = self.ep.graph_signature
        specs = {spec.arg.name: spec for spec in sig.input_specs if hasattr(spec.arg, "name")}
        root_sig = self.ep.module_call_graph[0].signature
        arg_names = list(getattr(root_sig, "forward_arg_names", None) or [])
        self.arg_names = arg_names
        placeholders = [n for n in self.old.nodes if n.op == "placeholder"]
        user = [n for n in placeholders if specs[n.name].kind == InputKind.USER_INPUT]
        in_spec, out_spec = self.ep.call_spec.in_spec, self.ep.call_spec.out_spec
        plain_inputs = (in_spec.type is tuple and in_spec.num_children == 2
                        and all(c.is_leaf() for part in _children(in_spec) for c in _children(part))
                        and in_spec.num_leaves == len(user) and len(arg_names) == len(user))
        if plain_inputs:
            self._forward_inputs(user, arg_names, _children(in_spec)[1].num_children)
        else:  # nested inputs: placeholders for the flattened leaves, taken apart by pytree code (see _output)
            for old in user:
                self._input(old, self.graph.placeholder(old.name))
        made = list(self.graph.nodes)
        self.prologue_end = made[-1] if made else None  # the last node that takes the inputs apart and checks them
        self._emit_ready()
        for old in placeholders:
            spec = specs[old.name]
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                self.lazy[old] = (self.aliases.canonical(spec.target), None)
            elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
                self.lazy[old] = (_CONSTANT_PREFIX, self.ep.constants[spec.target])
            elif spec.kind != InputKind.USER_INPUT:
                raise CaptureError(f"cannot rebuild the exported graph: unsupported input kind {spec.kind.name} "
                                   f"({old.name})", module_path="")
        for old in self.old.nodes:
            if old.op == "placeholder":
                continue
            if old.op == "output":
                self._output(old, sig, OutputKind, plain_inputs and _is_plain_spec(out_spec))
                break
            call = self.member_of.get(old)
            if call is not None:
                call.seen += 1
                if call.seen == len(call.members) and not call.emitted:
                    self._emit(call)
            else:
                self.env[old] = self._copy(old)
            self._emit_ready()
        for call in self.waiting:  # pragma: no cover - inputs never computed
            raise _Isolation(call, "its inputs are not all computed in the graph")
        for node in reversed(list(self.graph.nodes)):
            if node.op == "get_attr" and not node.users:
                self.graph.erase_node(node)
        if self.aliases:
            for node in self.graph.nodes:
                stack = node.meta.get("nn_module_stack")
                if stack:  # a new dict: the exported graph's nodes share theirs with the copies
                    node.meta["nn_module_stack"] = {
                        key: (self.aliases.canonical(value[0]), *value[1:])
                        if isinstance(value, tuple) and value and isinstance(value[0], str) else value
                        for key, value in stack.items()}
        keep_parameter_kinds(self.graph, self.kinds)
        self.graph.lint()
        return self.graph

    def _output(self, old: torch.fx.Node, sig: Any, kinds: Any, plain: bool) -> None:
        """The output node: user outputs in the model's structure (fx code, or pytree code for other containers),
        and copies into mutated buffers / inputs when export reported mutations as extra outputs."""
        values = list(old.args[0]) if isinstance(old.args[0], (tuple, list)) else [old.args[0]]
        flat = []
        for spec, value in zip(sig.output_specs, values):
            value = self._resolve(value) if isinstance(value, torch.fx.Node) else value
            if spec.kind == kinds.USER_OUTPUT:
                flat.append(value)
            elif spec.kind in (kinds.BUFFER_MUTATION, kinds.PARAMETER_MUTATION):
                target = self.aliases.canonical(spec.target)
                self.graph.call_function(torch.ops.aten.copy_.default, (self._attr(target), value))
            elif spec.kind == kinds.USER_INPUT_MUTATION:
                target = next(n for n in self.graph.nodes if n.op == "placeholder" and n.name == spec.target)
                self.graph.call_function(torch.ops.aten.copy_.default, (target, value))
            else:
                raise CaptureError(f"cannot rebuild the exported graph: unsupported output kind {spec.kind.name}",
                                   module_path="")
        out_spec = self.ep.call_spec.out_spec
        if plain:
            self.graph.output(torch.utils._pytree.tree_unflatten(flat, out_spec))
            return
        from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

        # the forward's own argument names; the placeholders are the flattened leaves of the inputs
        in_spec = self.ep.call_spec.in_spec
        names = self.arg_names
        if not names:
            names = [f"arg_{i}" for i in range(_children(in_spec)[0].num_children)] + list(
                _children(in_spec)[1].context)
        self.graph.output(tuple(flat))
        self.graph._codegen = _PyTreeCodeGen(_PyTreeInfo(names, self.ep.call_spec.in_spec, out_spec))


def _higher_order_name(target: Any) -> str | None:
    """The name under ``torch.ops.higher_order`` of ``target`` when it is a higher-order op found there (the op
    itself), else None."""
    if not isinstance(target, torch._ops.HigherOrderOperator):
        return None
    name = target.name()
    return name if getattr(torch.ops.higher_order, name, None) is target else None


def _call_through_helper(node: torch.fx.Node) -> None:
    """``node``, a call of a higher-order op, rewritten in place as the call of :func:`higher_order_op` with the
    op's name and the same arguments (the graph's code, and a pickle of it, stay runnable: see the helper)."""
    node.args = (_higher_order_name(node.target), *node.args)
    node.target = higher_order_op


def _retraceable_nested_graph(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule of ``module``'s graph (a nested graph of the exported program: a ``torch.cond`` branch, the
    body of a ``while_loop`` ...), holding the same tensors, whose calls of higher-order ops go through
    :func:`higher_order_op` (its own nested graphs too) and that unpickling re-traces with
    :class:`_RetraceTracer`.

    torch.export makes these modules with its own tracer class, which torch.fx's unpickling cannot construct
    (``_ModuleStackTracer`` needs the module it traced): a pickle of the captured graph failed. ``module`` is
    left as it is."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in module.graph.nodes:
        new = graph.node_copy(node, lambda arg: env[arg])
        if new.op == "call_function" and _higher_order_name(new.target) is not None:
            _call_through_helper(new)
        env[node] = new
    graph._tracer_cls = _RetraceTracer
    res = torch.fx.GraphModule(module, graph, type(module).__name__)
    for node in graph.nodes:
        if node.op == "get_attr":
            value = _fetch(res, str(node.target))
            if isinstance(value, torch.fx.GraphModule):
                res.set_submodule(str(node.target), _retraceable_nested_graph(value))
    res.meta = dict(getattr(module, "meta", {}))
    return res


def _is_constant_argument(arg: Any) -> bool:
    from torch.export.graph_signature import ConstantArgument

    return isinstance(arg, ConstantArgument)


#: ``aten.sym_size.int(x, d)`` and its kin -> the Tensor method symbolic tracing records (``x.size(d)``).
_SIZE_METHODS = {"sym_size": "size", "sym_stride": "stride", "sym_numel": "numel",
                 "sym_storage_offset": "storage_offset"}


def _size_method_form(node: torch.fx.Node) -> torch.fx.Node:
    """``node`` (a copy of an exported node) rewritten from ``aten.sym_size.int(x, d)`` (and ``sym_stride``,
    ``sym_numel``, ``sym_storage_offset``) to the method call ``x.size(d)`` that symbolic tracing records, in place.

    The ATen form has no batching rule: a transformed model of export capture failed under ``torch.func.vmap``
    (per-sample gradients) where the model and its fx capture run (``x.size(0)`` is batched: the sample's size)."""
    if node.op != "call_function" or node.kwargs:
        return node
    method = _SIZE_METHODS.get(getattr(getattr(node.target, "overloadpacket", None), "__name__", ""))
    if method is not None:
        node.op, node.target = "call_method", method
    return node


def _is_symbolic_size(node: torch.fx.Node) -> bool:
    """Whether ``node`` computes an integer from sizes (``x.size(0)``, ``s0 * 4``) rather than a tensor."""
    if node.op == "call_method":  # a rebuilt export node (_size_method_form): it keeps export's symbolic value
        return node.target in _SIZE_METHODS.values() and isinstance(node.meta.get("val"), torch.SymInt)
    if node.op != "call_function":
        return False
    name = getattr(getattr(node.target, "overloadpacket", None), "__name__", "")
    if name in _SYM_OPS_NAMES:
        return True
    return isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool))


def _fetch(root: Any, target: str) -> Any:
    """``root.<target>`` for a dotted ``target`` (a submodule, parameter, buffer or constant)."""
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _static_size(size: Any) -> int | None:
    """A dimension's size when the exported graph fixed it (a plain int, or a SymInt export specialised after
    tracing), else None."""
    if not isinstance(size, torch.SymInt) or is_concrete_int(size):
        return int(size)
    return None


def _size_range(size: Any) -> tuple[int, int | None] | None:
    """``(lowest, highest)`` sizes a dynamic dimension may take in the exported graph (highest None: unbounded),
    when the forward narrowed it (``if x.shape[0] > 2:`` makes export keep the branch of the example and guard
    ``s0 >= 3``); None when it is free. Export's default lower bound 2 (it specialises sizes 0 and 1 apart) is
    not a guard of the model's code, and export's own ``ep.module()`` accepts size 1 there too, so it counts as
    free."""
    node = getattr(size, "node", None)
    shape_env = getattr(node, "shape_env", None)
    bounds = shape_env.var_to_range.get(node.expr) if shape_env is not None else None
    if bounds is None:
        return None
    lower = _finite_int(bounds.lower)
    lower = 0 if lower is None else lower
    upper = _finite_int(bounds.upper)
    if lower <= 2 and upper is None:
        return None
    return (lower if lower > 2 else 0, upper)


def _finite_int(bound: Any) -> int | None:
    """A range bound (a sympy number) as an int, None for an infinite one (sympy's ``oo``, torch's ``int_oo``)."""
    from torch.utils._sympy.numbers import int_oo

    # int_oo says it is finite (sympy treats it as an integer) and int() of it raises: compare with it
    if bound in (int_oo, -int_oo) or getattr(bound, "is_finite", True) is False:
        return None
    return int(bound)


def _guarded_size(size: Any) -> int | tuple[int, int | None] | None:
    """What :func:`require_input_shape` checks of one dimension: its size when fixed, its range when the forward
    narrowed a dynamic one, else None."""
    static = _static_size(size)
    return static if static is not None else _size_range(size)


def _size_fits(actual: int, size: int | tuple[int, int | None] | None) -> bool:
    if size is None:
        return True
    if isinstance(size, tuple):
        return actual >= size[0] and (size[1] is None or actual <= size[1])
    return actual == size


def _size_text(size: int | tuple[int, int | None] | None) -> str:
    if size is None:
        return "*"
    if isinstance(size, tuple):
        return f"{size[0]}..{'' if size[1] is None else size[1]}"
    return str(size)


# Ops that move or drop an input's dimensions: a recurrent layer reached through one of them does not read the
# input's own dimension 0 and 1 as its layout says.
_LAYOUT_CHANGING = {"permute", "transpose", "t", "T", "mT", "movedim", "moveaxis", "swapaxes", "swapdims", "view",
                    "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "expand", "select", "slice", "getitem",
                    "index", "narrow", "unbind", "split", "chunk", "cat", "concat", "stack", "strided", "unfold"}


def recurrent_layout(node: torch.fx.Node, model: nn.Module | None) -> tuple[str, bool, bool] | None:
    """How the recurrent layer (``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``) that the graph input ``node`` feeds reads
    it: ``(label, batch_first, batched)``, e.g. ``("GRU 'rnn'", False, True)``, when the input reaches one such
    layer's input through ops that keep its dimensions 0 and 1 in place (an embedding, dropout, elementwise
    ops; not a transpose, reshape or indexing), else None. ``model``: the module the graph's call_module nodes
    name.

    A graph walk, for the checks and messages of a graph already captured: it follows the input's data flow (no
    guess from sizes, so L = N is no ambiguity) to layers of every layout. :func:`recurrent_batch_dims` answers
    before any graph exists (the dynamic shapes torch.export is called with), for hidden states and for layers
    inside leaf modules too, by a hooked run; both read the layout with :func:`recurrent_input_dims`."""
    if model is None:
        return None
    found = set()
    seen = {node}
    todo = [node]
    while todo:
        current = todo.pop()
        for user in current.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "call_module":
                try:
                    module = model.get_submodule(str(user.target))
                except AttributeError:
                    continue
                if isinstance(module, nn.RNNBase):
                    if user.args and user.args[0] is current:
                        value = current.meta.get("val")
                        batched = not (isinstance(value, torch.Tensor) and value.dim() == 2)  # no value: batched
                        found.add((_recurrent_label(str(user.target), module), bool(module.batch_first), batched))
                    continue
                if isinstance(module, (nn.Flatten, nn.Unflatten)):
                    continue
            elif user.op in ("call_function", "call_method"):
                name = user.target if isinstance(user.target, str) else getattr(user.target, "__name__", "")
                name = name or str(user.target)
                if set(re.split(r"[^A-Za-z]+", str(name))) & _LAYOUT_CHANGING:
                    continue
            else:
                continue
            todo.append(user)
    return found.pop() if len(found) == 1 else None


def layout_text(layout: tuple[str, bool, bool]) -> tuple[str, str]:
    """The layer and its input layout, for messages (:func:`recurrent_layout`'s ``layout``), e.g.
    ``("the seq-first GRU 'rnn'", "batch_first=False: input (L, N, H_in)")``."""
    label, batch_first, batched = layout
    shape = "(" + ", ".join(name.split()[-1] for name in recurrent_input_dims(batch_first, batched)) + ", H_in)"
    if not batched:
        return f"the {label}", f"unbatched: input {shape}"
    return f"the {'' if batch_first else 'seq-first '}{label}", f"batch_first={bool(batch_first)}: input {shape}"


def _reads_as(layout: tuple[str, bool, bool] | None, dim: int) -> str:
    """What a recurrent layer of ``layout`` reads in dimension ``dim`` of its input: ``"sequence length L"``,
    ``"batch N"``, or ``""`` (the features, or no layout)."""
    if layout is None:
        return ""
    _, batch_first, batched = layout
    names = recurrent_input_dims(batch_first, batched)
    return names[dim] if dim < len(names) else ""


_GUARDED_VALUE_TYPES = (bool, int, float, str, type(None))


class _InputGuards:
    """What torch.export fixed about each input of a rebuilt graph, read from its input nodes' ``meta["val"]``:
    the static dimensions of tensor inputs (every dimension but the batch, and the batch too when the forward
    needs it as a constant) and the values of non-tensor inputs (always constants in an exported graph).

    ``inputs``: the nodes standing for export's inputs (:attr:`_ExportRebuilder.inputs`: placeholders, and the
    items of a ``*args`` placeholder); the graph's placeholders by default."""

    def __init__(self, graph: torch.fx.Graph, inputs: list[torch.fx.Node] | None = None,
                 model: nn.Module | None = None):
        self.placeholders = list(inputs) if inputs is not None else [n for n in graph.nodes if n.op == "placeholder"]
        # how the recurrent layer an input feeds reads its dimensions: a seq-first layer's dimension 0, which
        # export keeps dynamic as the batch of every other input, is the sequence length
        recurrent = model is not None and any(isinstance(m, nn.RNNBase) for m in model.modules())
        self.layouts = {node: layout for node in self.placeholders if recurrent
                        and (layout := recurrent_layout(node, model)) is not None}
        self.shapes: dict[torch.fx.Node, tuple[int | None, ...]] = {}
        self.values: dict[torch.fx.Node, Any] = {}
        for node in self.placeholders:
            if "val" not in node.meta:
                continue
            val = node.meta["val"]
            if isinstance(val, torch.Tensor):
                shape = tuple(_guarded_size(size) for size in val.shape)
                if any(size is not None for size in shape):
                    self.shapes[node] = shape
            elif isinstance(val, _GUARDED_VALUE_TYPES):
                self.values[node] = val
        tensors = [n for n in self.placeholders if isinstance(n.meta.get("val"), torch.Tensor)
                   and n.meta["val"].dim() >= 1]
        # The batch is fixed when no input kept a dynamic dimension (an input that is not batched, such as an
        # attention mask, has a static dimension 0 next to a batched input's dynamic one). Only batch dimensions
        # are marked dynamic: dimension 0, or 1 for a seq-first recurrent layer's input and a hidden state.
        fixed = tensors and all(n in self.shapes and all(isinstance(size, int) for size in self.shapes[n])
                                for n in tensors)
        self.batch: tuple[torch.fx.Node, int] | None = (tensors[0], self.shapes[tensors[0]][0]) if fixed else None

    def insert(self, graph: torch.fx.Graph, after: torch.fx.Node | None = None) -> None:
        """Check every input against what was fixed, first thing in the graph (after the node ``after``, by
        default the last input node; see :func:`require_input_shape`, :func:`require_input_value`)."""
        if not self.placeholders:
            return
        batch_node = self.batch[0] if self.batch is not None else None
        with graph.inserting_before((after or self.placeholders[-1]).next):
            for node in self.placeholders:
                if node in self.shapes:
                    flag = (True,) if node is batch_node else ()
                    if node in self.layouts:
                        flag = (node is batch_node, self.layouts[node])
                    graph.call_function(require_input_shape, (node, node.name, self.shapes[node]) + flag)
                elif node in self.values:
                    graph.call_function(require_input_value, (node, node.name, self.values[node]))

    def warnings(self) -> list[str]:
        found = []
        if self.batch is not None and _reads_as(self.layouts.get(self.batch[0]), 0) == "sequence length L":
            node, length = self.batch
            layer, layout = layout_text(self.layouts[node])
            shape, second = self.shapes[node], _reads_as(self.layouts[node], 1)
            fixed = (f"; its dimension 1, the {second}, is fixed to {shape[1]} too"
                     if second and len(shape) > 1 and isinstance(shape[1], int) else "")
            found.append(
                f"torch.export specialised the graph to dimension 0 of input '{node.name}' = {length}, which {layer} "
                f"reads as the sequence length L ({layout}), not the batch: the captured model only accepts "
                f"sequences of length {length} (others raise an error){fixed}. Give example inputs of the sequence "
                "length you will use, build the layer with batch_first=True (input (N, L, H_in)), or capture with "
                "symbolic tracing (capture: {mode: fx})")
        elif self.batch is not None:
            batch = self.batch[1]
            found.append(
                f"torch.export specialised the graph to batch size {batch} (the forward needs the batch size as a "
                f"constant, e.g. a Python loop over x.size(0), or the example batch is 1): the captured model only "
                f"accepts inputs of batch size {batch} (others raise an error); give example inputs of the batch "
                "size you will use")
        narrowed = [f"{node.name} dimension {d}: {_size_text(size)}" for node, shape in self.shapes.items()
                    for d, size in enumerate(shape) if isinstance(size, tuple)]
        if narrowed:
            found.append(
                f"torch.export narrowed dynamic input sizes to the range of the example's branch ("
                f"{', '.join(narrowed)}; the forward's Python code branches on a size, e.g. if x.shape[0] > 2:): "
                f"inputs outside it raise an error; transform once per branch you will use, or write the branch "
                f"with torch.cond")
        if self.values:
            fixed = ", ".join(f"{n.name}={v!r}" for n, v in self.values.items())
            found.append(
                f"torch.export fixed the non-tensor inputs to their example values ({fixed}): the captured graph "
                f"computes with these values and refuses others (an error); transform once per value you will use "
                f"(example inputs holding that value), or, for an input the forward does not branch on in Python "
                f"(it only passes it to torch functions), capture with symbolic tracing (capture: {{mode: fx}}) if "
                f"the model traces, which keeps it an argument")
        return found


@torch.fx.node.has_side_effect  # kept by dead-code elimination: it has no users
def require_input_shape(x: Any, name: str, shape: tuple, batch: bool = False, layout: tuple | None = None) -> None:
    """Refuse an input whose shape differs where torch.export specialised the captured graph (``shape``: the
    fixed size of each dimension, None for a dynamic one, ``(lowest, highest)`` for a dynamic one the forward's
    Python code narrowed): the graph would otherwise compute with the example's sizes and return a wrong result (a
    loop over ``x.size(1)`` unrolled five times reads steps 0-4 of any sequence; ``if x.shape[0] > 2:`` kept only
    the branch the example took). ``batch``: dimension 0 is the batch export fixed (the error says so);
    ``layout``: how the recurrent layer ``x`` feeds reads it (:func:`recurrent_layout`), so that the error names
    the sequence length or the batch where it says "dimension d"."""
    if (isinstance(x, torch.Tensor) and x.dim() == len(shape)
            and all(_size_fits(x.shape[d], size) for d, size in enumerate(shape))):
        return
    raise ArgumentError(_shape_mismatch(x, name, shape, batch, layout))


def _shape_mismatch(x: Any, name: str, shape: tuple, batch: bool, layout: tuple | None = None) -> str:
    expected = "(" + ", ".join(_size_text(size) for size in shape) + ")"
    if x is None:  # left out, or None: the example gave a tensor, and the graph has no branch for None
        return (f"input '{name}': this model was captured with torch.export with a tensor for {name} (of shape "
                f"{expected}; '*': any size), and its graph has no path for {name}=None, got None. Fix: pass {name}, "
                f"or, for calls without it, transform the model again with example inputs that leave {name} out")
    if not isinstance(x, torch.Tensor):
        got = f"a {type(x).__name__}"
    else:
        got = f"shape {tuple(x.shape)}"
        if batch and x.dim() == len(shape) and x.shape[0] != shape[0] and _reads_as(layout, 0) == "sequence length L":
            layer, text = layout_text(layout)
            second = _reads_as(layout, 1)
            read = f"sequence length {x.shape[0]}" + (f", {second[:-2]} {x.shape[1]}" if second and x.dim() > 1 else "")
            return (f"input '{name}': this model was captured with torch.export for inputs of size {shape[0]} in "
                    f"dimension 0 only, which {layer} reads as the sequence length L ({text}), not the batch; got "
                    f"{got} ({read}). Fix: transform it again with example inputs of the sequence length you will "
                    "use, build the layer with batch_first=True (input (N, L, H_in)), or capture it with symbolic "
                    "tracing (capture: {mode: fx} in the policy) if it traces")
        if batch and x.dim() == len(shape) and x.shape[0] != shape[0]:
            # torch.export specialises a size-1 dimension whatever the forward does with it
            cause = ("the example inputs had batch size 1, or the forward needs the batch size as a constant"
                     if shape[0] == 1 else "its forward needs the batch size as a constant")
            return (f"this model was captured with torch.export for batch size {shape[0]} only ({cause}, e.g. a "
                    f"Python loop over x.size(0)); got input '{name}' of {got}. Transform it again with example "
                    f"inputs of the batch size you will use" + (" (2 or more)" if shape[0] == 1 else ""))
        if x.dim() == len(shape):
            d = next(d for d, size in enumerate(shape) if not _size_fits(x.shape[d], size))
            if isinstance(shape[d], tuple):
                got += (f": dimension {d} is {x.shape[d]}, outside {_size_text(shape[d])} (the forward's Python "
                        f"code branched on this size, and the graph keeps only the example's branch)")
            else:
                got += f": dimension {d} is {x.shape[d]}, not {shape[d]}"
            what = _reads_as(layout, d)
            if what:
                layer, text = layout_text(layout)
                got += f" ({layer} reads dimension {d} as the {what}; {text})"
    return (f"input '{name}': this model was captured with torch.export for tensors of shape {expected} there "
            f"('*': any size; 'a..b': a size from a to b; the graph is specialised to the others), got {got}. "
            f"Fix: pass inputs of that shape, "
            f"transform the model again with example inputs of the shape you will use, or capture it with symbolic "
            f"tracing (capture: {{mode: fx}} in the policy) if it traces")


@torch.fx.node.has_side_effect  # kept by dead-code elimination: it has no users
def require_input_value(value: Any, name: str, expected: Any) -> None:
    """Refuse a non-tensor input that differs from the value torch.export fixed it to: the captured graph would
    ignore it and compute with the example's value (``reduce="sum"`` running the ``"mean"`` branch)."""
    if not isinstance(value, torch.Tensor) and _same_value(value, expected):
        return
    holding = f"{name}={value!r}" if isinstance(value, (bool, int, float, str)) else f"the {name} you will use"
    raise ArgumentError(
        f"input '{name}': this model was captured with torch.export for {name}={expected!r} only (export fixes "
        f"non-tensor inputs to their example values), got {value!r}. Fix: pass {name}={expected!r}, or transform "
        f"the model again with example inputs holding {holding} (once per value you will use); if the "
        f"forward does not branch on {name} in Python (it only passes it to torch functions), capture with symbolic "
        f"tracing (capture: {{mode: fx}} in the policy) instead if the model traces, which keeps it an argument")


@torch.fx.node.has_side_effect  # kept by dead-code elimination: it has no users
def require_input_count(values: Any, name: str, count: int, before: int) -> None:
    """Refuse another number of inputs in a ``*args`` parameter (``name``) than the example's ``count``: torch.export
    fixed it, and the captured graph reads exactly that many (``before``: the named positional parameters before
    ``*args``)."""
    # a tuple in a call, a list when torch.fx.Interpreter runs the graph
    if isinstance(values, (tuple, list)) and len(values) == count:
        return
    got = len(values) if isinstance(values, (tuple, list)) else 0
    raise ArgumentError(
        f"input '*{name}': this model was captured with torch.export for {count} input(s) in *{name} "
        f"({before + count} positional input(s) in all; export fixes how many inputs a *{name} parameter collects to "
        f"the example's number), got {got} ({before + got} in all). Fix: call it with {before + count} inputs, or "
        f"transform the model again with example inputs of the number you will use (once per number)")


@torch.fx.node.has_side_effect  # kept by dead-code elimination: it has no users
def require_default_argument(value: Any, name: str, default: Any, shown: str,
                             captured_with: str = "torch.export") -> None:
    """Refuse a value for a parameter the example inputs left at its default (``shown``; ``default`` is the
    placeholder's, None for a default that cannot be written in code): the graph was captured for the default
    (by torch.export, or by symbolic tracing for a forward that branches on ``mask is None``: ``captured_with``
    says which), has no input for it and would ignore the value."""
    if _same_value(value, default):
        return
    got = f"a {type(value).__name__}" + (f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                                         else f" ({value!r})")
    raise ArgumentError(
        f"input '{name}': this model was captured with {captured_with} with {name} left at its default ({shown}): "
        f"the captured graph computes with the default and has no input for it, got {got}. Fix: leave {name} out, "
        f"or transform the model again with {name} in the example inputs (positional, or "
        f"example_kwargs={{{name!r}: ...}} for capture)")


@torch.fx.node.has_side_effect  # kept by dead-code elimination: it has no users
def require_argument_given(value: Any, name: str) -> None:
    """Refuse None for a parameter whose None-ness the forward branches on (``if mask is not None:``) in a graph
    captured by symbolic tracing with a value for it: a trace takes the branch for a given value (a traced
    ``mask`` is never None), so on None the graph would fail inside or compute the other branch's ops without
    the default the model would use."""
    if value is not None:
        return
    raise ArgumentError(
        f"input '{name}': this model was captured by symbolic tracing for calls that pass {name} (its forward "
        f"branches on whether {name} is None, and the graph keeps the branch for a given {name}), got None. Fix: "
        f"pass {name}, or, for calls without it, transform the model again with example inputs that leave {name} "
        f"out (the graph then keeps the branch for {name}=None)")


#: The checks an input of a captured graph goes through (calls that stay calls when the graph's code is traced again).
_ARGUMENT_CHECKS = (require_input_shape, require_input_value, require_input_count, require_default_argument,
                    require_argument_given)


def _same_value(value: Any, default: Any) -> bool:
    """Whether an input ``value`` is the constant torch.export fixed (``default``): the same object, or equal
    non-tensor values (NaN equal to NaN; a value whose ``==`` gives no bool, an array, is not the same)."""
    if value is default:
        return True
    if isinstance(value, torch.Tensor) or isinstance(default, torch.Tensor):
        return False
    try:
        return bool(value == default) or bool(value != value and default != default)  # NaN equals NaN here
    except Exception:  # noqa: BLE001 - a value whose == is no bool (an array): not the default
        return False


def _default_text(default: Any) -> str:
    """A parameter's default as an error shows it (a tensor by its shape)."""
    if isinstance(default, torch.Tensor):
        return f"a tensor of shape {tuple(default.shape)}"
    text = repr(default)
    return text if len(text) <= 60 else text[:57] + "..."


def _capture_export(model: nn.Module, leaf_types: tuple, leaf_paths: tuple, inputs: tuple | None,
                    kwargs: dict[str, Any] | None = None,
                    both_modes: bool = True) -> tuple[torch.fx.GraphModule, CaptureInfo]:
    """Capture mode ``export``: torch.export, then the ATen graph rebuilt with fx mode's leaves and names (and
    once more in the other training mode, see :class:`ModalGraphModule`).

    A model with lazy layers that have not run yet (``nn.LazyLinear`` ...) is exported as a copy whose lazy layers
    ran once on the example inputs (:func:`_materialised`); the graph calls the model's own layers, which
    initialise themselves on the first call, as they do in fx mode's graph."""
    if inputs is None:
        raise CaptureError("capture mode 'export' runs torch.export on example inputs, and none were given: pass "
                           "example_inputs=(x,) to orthofx.transform / orthofx.explain", module_path="")
    kwargs = kwargs or {}
    source = _materialised(model, inputs, kwargs)
    leaf_paths = tuple(leaf_paths)
    forward = _ExportedForward()
    kept: list[tuple[str, str]] = []  # the modules kept as leaves for their autograd.Function calls, and why
    opened: set[str] = set()
    direct: set[str] = set()  # inner leaves the forward calls outside any leaf (see _DirectCalls)
    added: set[str] = set()  # those that the export about to run keeps as calls for the first time
    inlined: set[str] = set()  # those torch.export cannot keep as calls, and without hooks: left inlined
    notes: list[str] = []
    inner_off = True  # whether the hooks inside the leaves are taken off while torch.export runs (see below)
    flags = [(m, m.training) for m in source.modules()]
    aliases = _ModulePaths(source)
    used_aliases: set[str] = set()  # other names of leaves the forward called them by (see preserved below)
    while True:
        leaves = _export_leaves(source, leaf_types, leaf_paths, opened)
        leaves += sorted(direct - set(leaves))
        # The order of the leaf calls (a call that leaves no node in the graph, such as nn.Identity's, is put
        # back at its place among the others).
        order: list[str] = []
        inner = _inner_leaves(source, leaf_types, leaf_paths, leaves)
        # The hooks of the modules inside the leaves are off too (a leaf's call runs them in the graph): on, they
        # would run at capture on torch.export's fake tensors (a hook keeping its output, counting calls or
        # registering a buffer would do so on the user's module), and one reading a value (``float(o.sum())``)
        # fails torch.export. Only where the export fails without them (a hook changing its output's shape, which
        # the forward after the leaf computes with) is it run again with them on.
        stashed = _stash_call_hooks([source.get_submodule(path) for path in leaves + (inner if inner_off else [])])
        calls = _DirectCalls(source, leaves, inner)
        hooks = [source.get_submodule(path).register_forward_pre_hook(
            _outside_branches(lambda module, args, path=path: order.append(path))) for path in leaves]
        # Every leaf call is given to torch.export in one form (_export_call_form: every argument, positionally
        # where it can be): it keeps one call signature per module, and refused a leaf called once positionally
        # and once by keyword, or with other keywords ("in_spec mismatch"). The call is the same for the leaf's
        # forward (its own hooks are stashed meanwhile), and the graph makes each call as the forward wrote it
        # (``written``): a hooked leaf's hooks see the call as written; the others' calls are made positional at
        # the end (_positional_layer_inputs), as in fx mode.
        written: dict[str, list[_WrittenCall]] = {path: [] for path in leaves}
        hooks += [source.get_submodule(path).register_forward_pre_hook(
            _outside_branches(functools.partial(_export_call_recorded, written[path])), with_kwargs=True)
            for path in leaves]
        # a module whose hooks are off, called in a cond branch, fails the export (its hooks would not run there)
        paths = {id(source.get_submodule(path)): path for path in [*inner, *leaves]}
        hooks += [module.register_forward_pre_hook(_refused_in_branches(paths[id(module)]), prepend=True)
                  for module, _ in stashed]
        # a hooked leaf's output that is one of its inputs (nn.Identity, Dropout in eval mode) becomes a node of the
        # call, so that the graph reads it from the call, whose hooks may change it
        for module, _ in stashed:
            returned = _ReturnedInputs()
            hooks += [module.register_forward_pre_hook(_outside_branches(returned.before), with_kwargs=True),
                      module.register_forward_hook(_outside_branches(returned.after), with_kwargs=True)]
        states = [_ModuleState(path, module) for path, module in source.named_modules()]
        leaf_set = set(leaves)
        # torch.export names a call by the attribute path the forward used: keep the signatures of a leaf's
        # calls under its other names too. Each name given adds hooks to every call of its module, and a module
        # shared at every level of a nesting has 2^depth names: beyond a few, only the ones torch.export reports
        # the forward used are given, in one more export (see below).
        few = first_module_paths(source, _ALIAS_PATHS_WALKED)
        preserved = leaves + [alias for alias, path in (few or {}).items() if path in leaf_set]
        preserved += sorted(used_aliases - set(preserved))
        failed: CaptureError | None = None
        try:
            # each attempt counts afresh (not each root call: a forward may call the root again): an attempt
            # torch.export gave up on part way (the dynamic batch before the static one) shifted the call names of
            # the one kept (lin@2 for lin@1), and the call excluded was not the substituted one
            ep = _run_export(source, inputs, preserved, kwargs, written,
                             [order, calls.active, calls.direct, calls.count, calls.substituted, calls.swapped,
                              *written.values()], forward)
        except CaptureError as exc:
            failed = exc
        finally:
            for hook in hooks + calls.handles:
                hook.remove()
            _restore_call_hooks(stashed)
            for module, flag in flags:
                module.training = flag
            created = _drop_created_state(states)
        if forward.refused:
            # a custom autograd.Function: its module runs as written in the graph (as in fx mode), or none can
            call = forward.refused[0]
            if not call.path or call.path in leaf_paths:
                raise _refused_function_error(model, call) from (failed or call)
            leaf_paths += (call.path,)
            kept.append((call.path, _describe_cause(call)))
            continue
        if failed is not None:
            if _hooked_in_branch(failed) is not None:
                # with the hooks inside the leaves on, the retry below would trace a hook into the branch once, at
                # capture, as ATen ops: a call the model's hooks no longer reach (removed, or reading Python state)
                raise failed
            if inner_off and any(_holds_call_hooks(source.get_submodule(path)) for path in inner):
                inner_off = False
                continue
            dropped = _direct_calls_left_inlined(source, failed, added)
            if not dropped:
                raise failed
            # the model exported before these calls were kept: it is exported again without them, as before
            added -= dropped
            direct -= dropped
            inlined |= dropped
            reason = first_line(str(failed).split(" Fix: ")[0].removeprefix(
                "torch.export (non-strict) cannot capture the model: ").rstrip("."), 300)
            notes += [f"the call of '{path}' that the forward makes outside the leaf module holding it stays as "
                      f"inlined ATen ops in the exported graph, as torch.export cannot keep it as one call "
                      f"({reason}): rules do not see this call, passes that replace the module do not affect it "
                      "(its weights are still the module's). Fix: capture with symbolic tracing, capture: "
                      "{mode: fx} or {mode: auto} in the policy" for path in sorted(dropped)]
            continue
        # a call given other parameters for the call only (functional_call) stays inlined ATen ops, which compute
        # with them, beside the module's calls with its own; a leaf with no call of its own would have no site left
        swapped_only = [name for name in calls.swapped
                        if sum(other.split("@")[0] == name.split("@")[0] for other in calls.swapped)
                        == calls.count.get(name.split("@")[0])]
        if calls.substituted or swapped_only:
            name = (calls.substituted or swapped_only)[0]
            path = name.split("@")[0]
            how = ("through torch.func.functional_call or torch.nn.utils.stateless at each of its calls, so that "
                   "no call of it is left to keep as the module's" if not calls.substituted else
                   f"at its call '{name}' after the forward assigned other parameters to it (module.weight = other "
                   "between its calls, which the module then keeps)")
            raise CaptureError(
                f"the forward calls the leaf module '{path}' with parameters other than its own, {how}: the graph's "
                "call of the module would compute with the parameters the module holds, so the call cannot be "
                "captured as one. Fix: call the module's functional form with those tensors (F.linear(x, w, b), "
                "F.conv2d ...) in the forward, or, if this module should not be a site, keep the code that calls "
                "it inside a module listed in capture.leaf_modules", module_path=path)
        swapped = set(calls.swapped)
        if created:
            # torch.export turns such a buffer's update into a write into an input of the graph (seen: x.copy_(1))
            raise CaptureError(_created_state_message(source, created, "torch.export"), module_path=created[0][0])
        # calls of a leaf by names not given to torch.export have no call signature (they would stay inlined);
        # the names used are those of the calls' nodes (module_call_graph lists every name, used or not)
        unsigned = {used for used in _stack_paths(ep.graph) if used not in preserved
                    and aliases.canonical(used) in leaf_set} - used_aliases
        if unsigned:
            used_aliases |= unsigned
            continue
        # A leaf holding other modules that the forward never called (it called the modules inside it): export
        # again with the leaves inside it, else their calls would stay inlined ATen ops where fx sees layers.
        uncalled = _uncalled_outer_leaves(source, leaves, set(order))
        added = set(calls.direct) - direct - inlined
        if not uncalled and not added:
            break
        opened.update(uncalled)
        direct.update(added)
    counts: dict[str, int] = {}
    call_order = []
    as_written = {}
    for path in order:
        k = counts.get(path, 0)
        counts[path] = k + 1
        call_order.append(path if k == 0 else f"{path}@{k}")
        if k < len(written[path]):
            as_written[call_order[-1]] = written[path][k]
    info = CaptureInfo(mode="export", leaf_fallbacks=kept)
    info.warnings.extend(notes)
    info.warnings.extend(_checkpoint_warnings(source, forward.checkpoints))
    for path, (where, weights) in _leaves_in_branches(ep, leaves, aliases).items():
        what = f"leaf module '{path}' ({type(source.get_submodule(path)).__name__})"
        taken = (f"the nested graph torch.export makes of it takes {_names(weights)} as "
                 f"operand{'s' if len(weights) > 1 else ''}")
        info.warnings.append(
            f"{what} is called inside {where}, or its weights are read there ({taken}): that use stays as ATen "
            "ops in the nested graph, so rules do not see it, and where a pass replaces the module a call there "
            "keeps its own operation (padding, stride ...) on the weights found at those names (the new layer's: "
            "an orthogonal layer's kernel, a ConvNorm layer's unnormalised one); the module's calls outside the "
            "branch are sites as usual. Fix: use the module outside the branch, or capture with symbolic tracing, "
            "capture: {mode: fx} in the policy, with the branch on a tensor's value moved into a submodule listed "
            "in capture.leaf_modules")
    info.warnings.extend(
        f"the call '{name}' of leaf module '{name.split('@')[0]}' is given parameters other than the module's own "
        "(torch.func.functional_call) and stays as inlined ATen ops in the exported graph, computing with those: "
        "rules do not see this call, passes that replace the module do not affect it" for name in sorted(swapped))
    excluded: set[str] = set(swapped)
    while True:
        try:
            rebuilder = _ExportRebuilder(ep, source, leaves, excluded, call_order, aliases, as_written)
            graph = rebuilder.build()
            # pickling a GraphModule re-traces its code with this tracer (see _RetraceTracer)
            graph._tracer_cls = _RetraceTracer
            break
        except _Isolation as exc:
            inside = {id(m) for m in source.get_submodule(exc.call.path).modules()}
            hooked = [path for path in inner if id(source.get_submodule(path)) in inside
                      and _holds_call_hooks(source.get_submodule(path))]
            own = call_hook_count(source.get_submodule(exc.call.path))
            if own or hooked:
                # the hooks were taken off while torch.export ran (the leaf's own, and those inside it,
                # _inner_leaves): inlined, the call would run none of them
                which = ("the module has forward / backward hooks" if own else
                         f"modules inside it have forward / backward hooks ({', '.join(hooked)})")
                raise CaptureError(
                    f"torch.export (non-strict) cannot keep the call '{exc.call.name}' of leaf module "
                    f"'{exc.call.path}' as one call ({exc}), and {which}, which its inlined ops would not run. Fix: "
                    "capture with symbolic tracing, capture: {mode: fx} or {mode: auto} in the policy, or remove "
                    "the hooks before transforming", module_path=exc.call.path) from None
            excluded.add(exc.call.name)
            info.warnings.append(
                f"the call '{exc.call.name}' of leaf module '{exc.call.path}' stays as inlined ATen ops in the "
                f"exported graph ({exc}): rules do not see this call, passes that replace the module do not "
                "affect it (its weights are still the module's)")
    _check_mode_switches(graph, forward.bounds, "torch.export")
    guards = _InputGuards(graph, rebuilder.inputs, model)
    guards.insert(graph, rebuilder.prologue_end)
    info.warnings.extend(guards.warnings())
    info.warnings.extend(_device_warnings(graph))
    _check_graph_names(graph, model)
    gm = torch.fx.GraphModule(_Overlay(model, rebuilder.extras), graph, type(model).__name__)
    if not both_modes:
        return gm, info
    def export_other_mode() -> tuple[torch.fx.Graph, nn.Module]:
        other, other_info = _capture_export(model, leaf_types, leaf_paths, inputs, kwargs, both_modes=False)
        kept_there = [(path, cause) for path, cause in other_info.leaf_fallbacks if path not in leaf_paths]
        if kept_there:  # autograd.Function calls in that mode only: both modes keep those modules as leaves
            raise _KeptInOtherMode(kept_there)
        return other.graph, other

    try:
        return _with_other_mode(model, gm, info, export_other_mode), info
    except _KeptInOtherMode as again:
        gm, info = _capture_export(model, leaf_types, leaf_paths + tuple(path for path, _ in again.kept), inputs,
                                   kwargs)
        return gm, _with_kept_leaves(info, kept + again.kept)


def _stash_call_hooks(modules: list[nn.Module]) -> list[tuple[nn.Module, dict[str, Any]]]:
    """Take the user's forward / backward hooks off ``modules`` (the leaves, and the hooked modules inside them,
    :func:`_inner_leaves`) while torch.export runs.

    The graph calls each leaf as a module, which runs its hooks at each forward; exported with them, a pre-hook's
    work (``args[0] * 2``) would also be recorded as ATen ops before the call and happen twice. fx mode records
    no hook of a leaf either. :func:`_restore_call_hooks` puts the same registries back."""
    stashed = []
    for module in modules:
        saved = {name: module.__dict__[name] for name in CALL_HOOK_REGISTRIES if module.__dict__.get(name)}
        if saved:
            for name in saved:
                module.__dict__[name] = type(saved[name])()
            stashed.append((module, saved))
    return stashed


class _ReturnedInputs:
    """Forward pre-hook and hook (``with_kwargs=True``) on a hooked leaf while torch.export runs: the call returns
    each of its input tensors that its forward returned as it is as a view of itself (the same values).

    torch.export records a call that returns its input with no node of its own, and the graph's other users then
    read the input: right for the forward, not for a hooked leaf, whose forward hook (``o * 2``), forward pre-hook
    (``x * 2`` on nn.Identity) or backward hook acts on what the call returns. An input the forward changed in
    place (``nn.ReLU(inplace=True)``) is a node of the call already, which the users of the input read."""

    def __init__(self):
        self.calls: list[dict[int, int]] = []  # per call being made: id -> version of its input tensors

    def before(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self.calls.append({id(t): t._version for t in torch.utils._pytree.tree_leaves((args, kwargs))
                           if isinstance(t, torch.Tensor)})

    def after(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        inputs = self.calls.pop()
        # its own weights too: a returned parameter is otherwise the graph's get_attr, read by every user of it
        inputs.update((id(t), t._version) for t in (*module.parameters(), *module.buffers()))

        def returned(t: torch.Tensor) -> torch.Tensor:
            unchanged = id(t) in inputs and t.layout == torch.strided  # changed in place too
            return t.view_as(t) if unchanged else t

        return torch.utils._pytree.tree_map_only(torch.Tensor, returned, output)


def _restore_call_hooks(stashed: list[tuple[nn.Module, dict[str, Any]]]) -> None:
    for module, saved in stashed:
        module.__dict__.update(saved)


def uninitialised_lazy_modules(model: nn.Module) -> list[str]:
    """Paths of the lazy layers (``nn.LazyLinear``, ``nn.LazyConv2d`` ...) whose parameters do not exist yet."""
    from torch.nn.modules.lazy import LazyModuleMixin

    return [path or "<model>" for path, module in model.named_modules()
            if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()]


def _materialised(model: nn.Module, inputs: tuple, kwargs: dict[str, Any]) -> nn.Module:
    """``model``, or, when it has lazy layers that have not run yet, a copy whose lazy layers ran once on the
    example inputs: torch.export cannot trace a parameter without a shape (``UninitializedParameter``).

    The model itself stays as it is (as in fx mode, its lazy layers initialise on their first call), and so does
    the random number generator: the copy's initialisation runs on a forked one, so the model's layers get the
    weights they would get without the capture.
    """
    lazy = uninitialised_lazy_modules(model)
    if not lazy:
        return model
    shown = first_few((f"'{path}'" for path in lazy), 3)
    tensors = [t for t in torch.utils._pytree.tree_leaves((inputs, kwargs, list(model.parameters()),
                                                           list(model.buffers()))) if isinstance(t, torch.Tensor)]
    devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    try:
        source = copy.deepcopy(model)
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            source(*inputs, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported as a CaptureError
        raise CaptureError(
            f"the model has lazy layers that have not run yet ({shown}): torch.export cannot capture a layer "
            f"without weights, and running a copy of the model once on example_inputs to initialise them failed: "
            f"{type(exc).__name__}: {first_line(str(exc), 200)}. Fix: check the example inputs, or run the model "
            f"once on an input (model(x)) before capturing it", module_path="") from exc
    return source


_ASSERT_METADATA = getattr(getattr(torch.ops.aten, "_assert_tensor_metadata", None), "default", None)


def _device_warnings(graph: torch.fx.Graph) -> list[str]:
    """Tensors created in the forward (``torch.eye(n)``, ``torch.zeros(..., device=x.device)``): torch.export
    records their device as a constant, whichever way the code chose it."""
    found: dict[tuple[str, str], set[str]] = {}
    for node in graph.nodes:
        device = node.kwargs.get("device") if node.op == "call_function" else None
        # export's check of a tensor's metadata before a .to() / .float() creates nothing
        if isinstance(device, torch.device) and node.target is not _ASSERT_METADATA:
            scope = (module_scopes(node) or [""])[-1]
            name = getattr(getattr(node.target, "overloadpacket", None), "__name__", None) or str(node.target)
            found.setdefault((scope, str(device)), set()).add(name)
    warnings = []
    for (scope, device), names in found.items():
        where = f"submodule '{scope}'" if scope else "the top-level forward"
        warnings.append(
            f"{where}: tensors created in the forward ({', '.join(sorted(names))}) are made on {device} in the "
            f"captured graph, whatever device the code asked for; gm.to(...) does not move them: capture the "
            f"model with example inputs on the device it will run on")
    return warnings


# -------------------------------------------------------------------------------------------------- diagnostics

def _drop_created_state(states: list[_ModuleState]) -> list[tuple[str, str, str]]:
    """Remove the buffers and parameters that a run of the forward registered on the modules of ``states`` (taken
    before the run); returns them as ``(module path, table, name)``."""
    created = []
    held = _ModuleState.held_tensors(states)
    for state in states:
        for table, key, value, new in state.changes():
            if _ModuleState.registers_state(table, new, value, held):
                created.append((state.path, table, key))
            elif not (new and table == "__dict__" and _holds(value, torch._subclasses.fake_tensor.FakeTensor)):
                continue
            # a plain attribute holding a fake tensor (``self.scale = torch.ones(8)`` on a first call): the graph
            # makes the tensor itself; the model must not keep torch.export's fake one (its next call would compute
            # with it). torch.export puts back an attribute it rebound, not one the forward added.
            next(live for name, live, _ in state.tables if name == table).pop(key)
    return created


def _created_state_message(model: nn.Module, created: list[tuple[str, str, str]], how: str) -> str:
    """What a capture cannot do with a forward that registers buffers / parameters (or sets submodules) while it
    runs, and the fixes.
    ``how``: the capture that saw it (empty: only the cause, for a leaf fallback's reason).

    Example: ``if not hasattr(self, "seen"): self.register_buffer("seen", torch.zeros(()))`` in ``forward``."""
    path = created[0][0]
    owner = model.get_submodule(path) if path else model
    where = f"submodule '{path}' ({type(owner).__name__})" if path else f"the model's top-level forward " \
        f"({type(owner).__name__})"
    kinds = {"_buffers": "buffer", "_parameters": "parameter", "_modules": "submodule"}
    what = ", ".join(f"{kinds[table]} '{name}'" for p, table, name in created if p == path)
    if all(table == "_modules" for p, table, _ in created if p == path):
        cause = f"{where} sets {what} while it runs (self.name = SomeModule(...) in forward, e.g. on its first " \
            "call), a module the model does not hold before that call"
    else:
        cause = f"{where} registers {what} while it runs (register_buffer / register_parameter in forward, e.g. " \
            "on its first call), a tensor the model does not hold before that call"
    if not how:
        return cause
    first, table = next((name, table) for p, table, name in created if p == path)
    example = {"_buffers": f"register it in __init__ (e.g. self.register_buffer('{first}', torch.zeros(...)))",
               "_parameters": f"register it in __init__ (e.g. self.{first} = torch.nn.Parameter(torch.zeros(...)))",
               "_modules": f"set it in __init__ (self.{first} = the module the forward builds)"}[table]
    export_note = "" if how != "torch.export" else \
        ", and torch.export would record the module's construction (its weights drawn anew at every call)" \
        if table == "_modules" else ", and torch.export would write its update into an input"
    return (f"{how} cannot capture the model: {cause}; a captured graph cannot create a module's state"
            f"{export_note}. Fix: {example}, or call the model once on an example input before orthofx.transform "
            "so that it exists")


def _created_state_leaf(model: nn.Module, created: list[tuple[str, str, str]],
                        failure: BaseException | None) -> tuple[str, type, str]:
    """``(path, class, reason)`` of the module to keep as a leaf for the state its forward creates while it runs
    (``created``, the tracer's ``created_state``): a leaf creates it on its first call, as in the model. The top
    level cannot be a leaf: its :func:`_created_state_error` (from ``failure``, the trace's error if any)."""
    path = created[0][0]
    if not path:
        raise _created_state_error(model, created) from failure
    own = [c for c in created if c[0] == path]
    return path, type(model.get_submodule(path)), _created_state_message(model, own, "")


def _created_state_error(model: nn.Module, created: list[tuple[str, str, str]]) -> CaptureError:
    """The CaptureError of symbolic tracing for a top-level forward that creates state while it runs
    (:func:`_created_state_message`); torch.export cannot capture it either, so capture mode auto does not try it
    (whose error would only repeat this one)."""
    error = CaptureError(_created_state_message(model, created, "symbolic tracing"), module_path="")
    error.same_in_export = True
    return error


def _failure_message(path: str, cls: type | None, cause: str, fallbacks: list[tuple[str, str]]) -> str:
    name = cls.__name__ if cls is not None else "?"
    if path:
        where = f"cannot trace submodule '{path}' ({name})"
        fixes = ("list the module's class under capture.leaf_modules in the policy "
                 f"(leaf_modules: [{name}]), or pass concrete_args={{...}} to orthofx.capture.capture for an input "
                 "that drives control flow")
    elif cls is not None and cls.__module__.startswith("torch.nn."):
        # a bare torch layer as the model (transform(nn.LSTM(...))): the root is traced through, never a leaf
        where = f"cannot trace the model's top-level forward ({name}, a torch layer)"
        fixes = (f"pass the layer inside a module, e.g. torch.nn.Sequential(layer): the {name} is then a site "
                 "(named '0') that capture keeps as a leaf, instead of the model whose forward is traced")
    else:
        where = f"cannot trace the model's top-level forward ({name})"
        fixes = ("wrap the untraceable part in a submodule and list that submodule's class under "
                 "capture.leaf_modules in the policy, or pass concrete_args={...} to orthofx.capture.capture for an "
                 "input that drives control flow")
    message = f"{where}: {cause}. Fix: {fixes}."
    if fallbacks:
        message += " (Already kept as leaves after failed traces: " + ", ".join(p for p, _ in fallbacks) + ".)"
    return message


def _describe_cause(exc: BaseException) -> str:
    """One sentence (no final period) saying why tracing failed, with the user's source line when found."""
    text = str(exc)
    note = ""
    # torch's iteration message also says "control flow": read first, or it was blamed on if/while/bool/len
    if isinstance(exc, _AutogradFunctionCall):
        cause = text
    elif isinstance(exc, TraceError) and "cannot be iterated" in text:
        cause = ("its forward iterates over a traced tensor (a for loop, unpacking, or *args/**kwargs, which "
                 "symbolic tracing passes as one traced value; capture mode export, or auto with example inputs, "
                 "traces them)")
    elif isinstance(exc, TraceError) and "control flow" in text:
        arguments = _branched_arguments(exc)
        if arguments:
            # the names are the model's forward's: the branch may be in a submodule the argument is passed on to
            what = ", ".join(f"'{name}' ({'an' if kind == 'int' else 'a'} {kind})" for name, kind in arguments)
            cause = (f"its forward uses the model's non-tensor argument{'s' if len(arguments) > 1 else ''} {what} in "
                     "Python control flow (if/while/bool/len)")
            note = " (symbolic tracing passes every argument as a traced value, a tensor or not)"
        else:
            cause = "its forward uses a traced tensor in Python control flow (if/while/bool/len)"
    elif "'len' is not supported" in text:
        cause = "its forward calls len() on a traced tensor"
    else:
        first = first_line(text, 200)
        cause = f"its forward raised {type(exc).__name__}" + (f": {first}" if first else "")
    location = _user_location(exc)
    if location:
        cause += f" at {location}"
    return cause + note


#: Annotations and defaults of forward parameters that name a non-tensor argument (:func:`_branched_arguments`).
_PLAIN_TYPES = (bool, int, float, str)


def _branched_arguments(exc: BaseException) -> list[tuple[str, str]]:
    """``(name, type name)`` of the model's forward parameters a failed trace's control flow read (``if double:``,
    ``if reduce == "mean":``) when they are all it read and each is a plain bool / int / float / str by its
    annotation or default; empty when the value may hold a tensor (a parameter, a buffer, a layer's output, an
    argument of unknown type) or the proxy is not found. ``exc``: the TraceError raised by ``Tracer.to_bool``."""
    proxy = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "to_bool" and isinstance(tb.tb_frame.f_locals.get("obj"), torch.fx.Proxy):
            proxy = tb.tb_frame.f_locals["obj"]
        tb = tb.tb_next
    root = getattr(getattr(proxy, "tracer", None), "root", None)
    if proxy is None or not isinstance(root, nn.Module):
        return []
    try:
        parameters = inspect.signature(root.forward).parameters
    except (TypeError, ValueError):
        return []
    found: dict[str, str] = {}
    seen: set[torch.fx.Node] = set()
    pending = [proxy.node]
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            parameter = parameters.get(str(node.target).lstrip("*"))
            kind = _plain_kind(parameter) if parameter is not None else None
            if kind is None:
                return []
            found[parameter.name] = kind
        elif node.op in ("call_function", "call_method"):
            pending.extend(node.all_input_nodes)
        else:  # get_attr (a parameter or buffer), call_module (a layer's output)
            return []
    return sorted(found.items())


def _plain_kind(parameter: inspect.Parameter) -> str | None:
    """The type name of a forward parameter annotated or defaulting to a bool / int / float / str, else None."""
    annotation = parameter.annotation
    if isinstance(annotation, str) and annotation in {t.__name__ for t in _PLAIN_TYPES}:
        return annotation
    if annotation in _PLAIN_TYPES:
        return annotation.__name__
    if annotation is inspect.Parameter.empty and isinstance(parameter.default, _PLAIN_TYPES):
        return type(parameter.default).__name__
    return None


def _is_library_file(full: str) -> bool:
    """Whether a traceback frame's file is torch, this module or the standard library (not the user's code)."""
    if full == os.path.abspath(__file__):
        return True
    if full.startswith(os.path.dirname(os.path.abspath(torch.__file__)) + os.sep):
        return True
    paths = sysconfig.get_paths()
    site = tuple(os.path.abspath(paths[k]) + os.sep for k in ("purelib", "platlib") if paths.get(k))
    stdlib = tuple(os.path.abspath(paths[k]) + os.sep for k in ("stdlib", "platstdlib") if paths.get(k))
    return full.startswith(stdlib) and not full.startswith(site)


def _user_location(exc: BaseException) -> str:
    """``file:line (`source`)`` of the innermost traceback frame in the user's code, or ''."""
    best = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if not frame.filename or frame.filename.startswith("<"):
            continue
        if not _is_library_file(os.path.abspath(frame.filename)):
            best = frame
    if best is None:
        return ""
    filename = best.filename
    try:
        rel = os.path.relpath(filename)
        if not rel.startswith(".."):
            filename = rel
    except ValueError:  # different drive on Windows
        pass
    location = f"{filename}:{best.lineno}"
    line = (best.line or "").strip()
    if line:
        if len(line) > 80:
            line = line[:77] + "..."
        location += f" (`{line}`)"
    return location


def _store_warnings(stores: list[tuple[str, str]]) -> list[str]:
    """The traced values a forward stored on its module (``self.last_weights = w``), which a graph cannot keep."""
    warnings = []
    for path, name in dict.fromkeys(stores):
        where = f"submodule '{path}'" if path else "the top-level forward"
        warnings.append(
            f"{where}: the forward stores a computed value as the attribute '{name}' (self.{name} = ...); the "
            f"captured graph does not (the attribute is not set on the captured model, and the model is left as "
            f"it was): return the value from the forward, or record it with a forward hook, if you need it")
    return warnings


def _constant_warnings(gm: torch.fx.GraphModule, tracer: OrthofxTracer) -> list[str]:
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    warnings = []
    for name, value in tracer.constants.items():
        if name not in used or not isinstance(value, torch.Tensor):
            continue
        scope = tracer.constant_scopes.get(name, "")
        where = f"submodule '{scope}'" if scope else "the top-level forward"
        warnings.append(
            f"{where}: a tensor created during tracing (e.g. a torch factory call such as torch.zeros(...) "
            f"without device=) is baked into the graph as the constant '{name}' "
            f"(shape {tuple(value.shape)}, {str(value.dtype).replace('torch.', '')}, {value.device}); "
            "it no longer follows the inputs' shape or device")
    return warnings
