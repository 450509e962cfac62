"""Model -> ``torch.fx.GraphModule``: orthofx's tracer, leaf fallback and trace-failure diagnostics.

:func:`capture` traces a model symbolically with :class:`OrthofxTracer`. torch.nn's built-in layers, orthofx's
own layers (``orthofx.nn``) and the classes / module paths the caller names are *leaves*: they appear in the
graph as one ``call_module`` node each. When the forward of some other submodule cannot be traced (Python control
flow on a traced tensor, iteration over a tensor, an op fx cannot record), that submodule is retried as a leaf,
and :class:`~orthofx.passes.base.CaptureInfo` records the fallback. A failure in the model's own top-level forward
cannot be worked around this way and raises :class:`~orthofx.errors.CaptureError`, which names the place, the
cause (with the line of user code when it can be found) and the fixes.

Capturing never modifies the model: the returned GraphModule shares the model's leaf submodules, parameters and
buffers (as ``torch.fx.GraphModule(model, graph)`` does); callers that rewrite the graph copy it first.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import traceback
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.fx.proxy import TraceError

from .errors import CaptureError
from .passes.base import CaptureInfo

__all__ = ["capture", "unwrap_model", "OrthofxTracer", "CAPTURE_MODES"]

#: Capture modes ``capture`` understands.
CAPTURE_MODES = ("auto", "fx")

_CONSTANT_PREFIX = "_tensor_constant"


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


# ------------------------------------------------------------------------------------------------------- tracer

def _is_torch_layer(cls: type) -> bool:
    return cls.__module__.startswith(("torch.nn.", "torch.ao.nn."))


class OrthofxTracer(torch.fx.Tracer):
    """``torch.fx.Tracer`` with orthofx's leaf rules and failure location.

    Leaves are: torch.nn's built-in layers (fx's default rule, except the containers ``Sequential``,
    ``ModuleList`` and ``ModuleDict``) and user subclasses of them that keep the base class's forward, orthofx's own layers (classes defined under ``orthofx.nn``), classes named
    in ``leaf_types`` (a class name such as ``"MyAttention"`` or a dotted ``"package.module.MyAttention"``,
    matched against every class in the module's MRO so subclasses count; class objects are accepted too) and
    the module paths in ``leaf_paths`` (qualified names as in ``model.named_modules()``).

    While tracing, the tracer keeps the stack of qualified names of the modules whose forward is being traced;
    :meth:`failure_location` uses it to say in which submodule an exception was raised. Tensors that appear in
    the trace without belonging to the model (e.g. made by a factory call such as ``torch.zeros(3)``) are kept in
    :attr:`constants` instead of being set on the model, so tracing leaves the model untouched.
    """

    def __init__(self, leaf_types: Iterable[str | type] = (), leaf_paths: Iterable[str] = (),
                 autowrap_functions: tuple[Callable[..., Any], ...] = ()):
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        leaf_types = tuple(leaf_types)
        self.leaf_type_names = frozenset(t for t in leaf_types if isinstance(t, str))
        self.leaf_type_classes = tuple(t for t in leaf_types if isinstance(t, type))
        bad = [t for t in leaf_types if not isinstance(t, (str, type))]
        if bad:
            raise TypeError(f"leaf_types must hold class names or classes, got {bad[0]!r}")
        self.leaf_paths = frozenset(leaf_paths)
        self.constants: dict[str, torch.Tensor] = {}
        self.constant_scopes: dict[str, str] = {}
        self._leaf_type_cache: dict[type, bool] = {}
        self._forward_stack: list[tuple[str, type]] = []
        self._failures: dict[int, tuple[BaseException, tuple[tuple[str, type], ...]]] = {}
        self._buffer_ids: set[int] = set()

    # ---- leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths:
            return True
        cls = type(m)
        cached = self._leaf_type_cache.get(cls)
        if cached is None:
            cached = self._is_leaf_type(cls)
            self._leaf_type_cache[cls] = cached
        return cached

    def _is_leaf_type(self, cls: type) -> bool:
        if cls.__module__ == "orthofx.nn" or cls.__module__.startswith("orthofx.nn."):
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
        seen: set[int] = set()
        e: BaseException | None = exc
        while e is not None and id(e) not in seen:
            seen.add(id(e))
            hit = self._failures.get(id(e))
            if hit is not None and hit[0] is e and hit[1]:
                return hit[1][-1]
            e = e.__cause__ if e.__cause__ is not None else e.__context__
        return "", None

    # ---- constants (kept off the model)

    def create_arg(self, a: Any) -> Any:
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
        if not isinstance(root, nn.Module):
            return super().trace(root, concrete_args)
        self._buffer_ids = {id(b) for b in root.buffers()}
        before = set(root.__dict__)
        try:
            return super().trace(root, concrete_args)
        finally:
            # fx stores constants of other kinds (script objects, proxyable classes) on the root; move them off
            # the model so that tracing leaves it as it was.
            for key in [k for k in root.__dict__ if k not in before]:
                self.constants[key] = root.__dict__.pop(key)
                self.constant_scopes.setdefault(key, "")


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


# ------------------------------------------------------------------------------------------------------ capture

def _drop_string_annotations(graph: torch.fx.Graph) -> None:
    """Forget type annotations that are strings (``from __future__ import annotations`` in the user's file).

    fx copies them into the generated code as globals, and ``torch.save`` of the GraphModule then fails inside
    torch.fx (it expects every global to be an object with a ``__name__``).
    """
    for node in graph.nodes:
        if isinstance(node.type, str):
            node.type = None


def _node_keys(graph: torch.fx.Graph) -> set[tuple[str, str]]:
    keys = set()
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        scope = list(stack.values())[-1][0] if stack else ""
        keys.add((str(scope), f"{node.op}:{getattr(node.target, '__name__', node.target)}"))
    return keys


def _mode_dependent_scopes(model: nn.Module, graph: torch.fx.Graph, tracer_args: dict,
                           concrete_args: dict[str, Any] | None) -> list[str]:
    """Module paths whose traced code differs between train and eval mode (a forward that branches on
    ``self.training`` outside a leaf): the graph keeps only the branch of the mode it was traced in."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.train(not model.training)
        other = OrthofxTracer(**tracer_args).trace(model, concrete_args)
    except Exception:  # noqa: BLE001 - the other mode's forward may not trace; nothing to compare then
        return []
    finally:
        for module, flag in flags:
            module.training = flag
    changed = _node_keys(graph) ^ _node_keys(other)
    return sorted({scope or "<top level>" for scope, _ in changed})


def capture(model: Any, *, leaf_types: Iterable[str | type] = (), leaf_paths: Iterable[str] = (),
            concrete_args: dict[str, Any] | None = None, mode: str = "auto",
            max_retries: int | None = None) -> tuple[torch.fx.GraphModule, CaptureInfo]:
    """Trace ``model`` into a ``torch.fx.GraphModule`` and say how it was obtained.

    Args:
        model: an ``nn.Module``, possibly wrapped by ``torch.compile`` / ``DataParallel`` / DDP (unwrapped first).
        leaf_types: class names (or dotted paths, or classes) kept as single ``call_module`` nodes.
        leaf_paths: module qualified names kept as leaves.
        concrete_args: values for forward arguments that should not be traced (see ``torch.fx.symbolic_trace``).
        mode: ``"auto"`` or ``"fx"`` (both trace symbolically with :class:`OrthofxTracer`).
        max_retries: how many submodules may be turned into leaves after a failed trace (default: the number
            of submodules).

    Returns:
        ``(gm, info)``: the GraphModule (sharing the model's submodules and weights; the model is not modified)
        and a :class:`CaptureInfo` with the mode used, the leaf fallbacks and warnings.

    Raises:
        CaptureError: the model is not a module, the mode is unknown, or tracing failed in the model's
            top-level forward (or more than ``max_retries`` times); the message names the module, the cause
            and the fixes.
    """
    model = unwrap_model(model)
    if mode not in CAPTURE_MODES:
        raise CaptureError(f"unknown capture mode {mode!r}; allowed: "
                           + ", ".join(repr(m) for m in CAPTURE_MODES))
    if isinstance(leaf_types, (str, type)):
        leaf_types = (leaf_types,)
    if isinstance(leaf_paths, str):
        leaf_paths = (leaf_paths,)
    leaf_types = tuple(leaf_types)
    paths = set(leaf_paths)
    if max_retries is None:
        max_retries = sum(1 for _ in model.modules()) - 1
    info = CaptureInfo(mode="fx")

    while True:
        tracer = OrthofxTracer(leaf_types=leaf_types, leaf_paths=paths)
        try:
            graph = tracer.trace(model, concrete_args)
            break
        except Exception as exc:  # noqa: BLE001 - every trace failure is reported as a CaptureError
            path, cls = tracer.failure_location(exc)
            cause = _describe_cause(exc)
            if not path:
                raise CaptureError(_failure_message("", type(model), cause, info.leaf_fallbacks),
                                   module_path="") from exc
            if path in paths or len(info.leaf_fallbacks) >= max_retries:
                message = _failure_message(path, cls, cause, info.leaf_fallbacks)
                raise CaptureError(f"{message} (gave up after {len(info.leaf_fallbacks)} leaf fallbacks: "
                                   f"max_retries={max_retries})", module_path=path) from exc
            paths.add(path)
            info.leaf_fallbacks.append((path, cause))

    _drop_string_annotations(graph)
    scopes = _mode_dependent_scopes(model, graph, {"leaf_types": leaf_types, "leaf_paths": paths}, concrete_args)
    if scopes:
        mode_now = "training" if model.training else "eval"
        info.warnings.append(
            f"the forward of {', '.join(scopes)} branches on self.training: the graph keeps the {mode_now}-mode "
            f"branch, and gm.train()/gm.eval() do not switch it (leaf layers such as BatchNorm still do). "
            f"Transform the model in the mode you will run it in, or list the module's class under "
            f"capture.leaf_modules")
    root = _Overlay(model, tracer.constants)
    gm = torch.fx.GraphModule(root, graph, type(model).__name__)
    info.warnings.extend(_constant_warnings(gm, tracer))
    return gm, info


# -------------------------------------------------------------------------------------------------- diagnostics

def _failure_message(path: str, cls: type | None, cause: str, fallbacks: list[tuple[str, str]]) -> str:
    name = cls.__name__ if cls is not None else "?"
    if path:
        where = f"cannot trace submodule '{path}' ({name})"
        fixes = ("list the module's class under capture.leaf_modules in the policy "
                 f"(leaf_modules: [{name}]), or pass concrete_args={{...}} for an input that drives "
                 "control flow")
    else:
        where = f"cannot trace the model's top-level forward ({name})"
        fixes = ("wrap the untraceable part in a submodule and list that submodule's class under "
                 "capture.leaf_modules in the policy, or pass concrete_args={...} for an input that drives "
                 "control flow")
    message = f"{where}: {cause}. Fix: {fixes}."
    if fallbacks:
        message += " (Already kept as leaves after failed traces: " + ", ".join(p for p, _ in fallbacks) + ".)"
    return message


def _describe_cause(exc: BaseException) -> str:
    """One sentence (no final period) saying why tracing failed, with the user's source line when found."""
    text = str(exc)
    first = text.strip().splitlines()[0] if text.strip() else ""
    if isinstance(exc, TraceError) and "control flow" in text:
        cause = "its forward uses a traced tensor in Python control flow (if/while/bool/len)"
    elif isinstance(exc, TraceError) and "cannot be iterated" in text:
        cause = "its forward iterates over a traced tensor (a for loop, unpacking, or *args/**kwargs)"
    elif "'len' is not supported" in text:
        cause = "its forward calls len() on a traced tensor"
    else:
        if len(first) > 200:
            first = first[:197] + "..."
        cause = f"its forward raised {type(exc).__name__}" + (f": {first}" if first else "")
    location = _user_location(exc)
    if location:
        cause += f" at {location}"
    return cause


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
