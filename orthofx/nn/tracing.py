"""How orthofx's layers meet PyTorch's tracers when a user's own code traces a model holding them.

- :func:`fx_tracer_of` and :func:`record_as_leaf`: a layer whose computation depends on runtime shapes or values
  (ConvNorm's grid, a monitor's buffer writes, a Jacobian probe's nested autograd) records itself as one
  ``call_module`` node when ``torch.fx.symbolic_trace`` hands it a Proxy, as fx does for ``nn.Conv2d``.
- :func:`in_func_transform`: whether a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``) is running the
  call, where in-place buffer writes and nested autograd cannot run.

Example::

    import torch
    from orthofx.nn import ConvNormConv2d
    model = torch.nn.Sequential(ConvNormConv2d(torch.nn.Conv2d(3, 8, 3, padding=1)), torch.nn.ReLU())
    gm = torch.fx.symbolic_trace(model)     # the ConvNorm layer is one call_module node "0"
"""

from __future__ import annotations

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn

from orthofx.errors import CaptureError, layer_label

__all__ = ["fx_tracer_of", "record_as_leaf", "in_func_transform"]


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


def in_func_transform() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev`` ...) is running this call eagerly
    (under ``torch.compile`` the query is not traced, and answers no)."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None
