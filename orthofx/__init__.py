"""orthofx: orthogonality as a one-line change for any PyTorch model.

    import orthofx
    gm = orthofx.transform(model, "lorth", example_inputs=(x,))   # preset, YAML path/text, dict or Policy
    print(orthofx.explain(model, "lorth"))                         # dry run
    loss = criterion(gm(x), y) + orthofx.penalty(gm)
    print(orthofx.report(gm))

The names below are imported on first use (PEP 562): ``import orthofx`` itself does not import torch, so the
command line (``python -m orthofx``) is already running, and a Ctrl-C during the seconds torch takes to import
ends it with one line instead of a traceback. ``from orthofx import transform`` and ``orthofx.nn`` work as usual.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: public name -> the submodule that defines it
_SOURCES = {
    "transform": "transform", "explain": "transform", "is_transformed": "transform", "manifest_of": "transform",
    "penalty": "penalty", "penalty_terms": "penalty",
    "report": "report", "Report": "report",
    "Plan": "plan", "Policy": "policy", "presets": "policy",
    "register_pass": "passes",
    "attach": "optim", "AttachHandle": "optim",
    "freeze": "export", "export": "export", "load": "export", "ExportResult": "export",
    **{name: "errors" for name in ("OrthofxError", "PolicyError", "CaptureError", "PlanError", "TransformError",
                                   "ImpossibleLayerError", "LayerArgumentError", "ArgumentError", "ExportError",
                                   "OrthofxWarning", "ScaleLostWarning", "RunningFiltersDroppedWarning")},
}
_SUBMODULES = ("metrics", "theory", "models")

__all__ = [
    "transform", "explain", "penalty", "penalty_terms", "report", "Report", "Plan", "Policy", "presets",
    "register_pass", "manifest_of", "is_transformed", "attach", "AttachHandle",
    "freeze", "export", "load", "ExportResult", "ExportError",
    "OrthofxError", "PolicyError", "CaptureError", "PlanError", "TransformError", "ImpossibleLayerError",
    "LayerArgumentError", "ArgumentError", "OrthofxWarning", "ScaleLostWarning", "RunningFiltersDroppedWarning",
    "metrics", "theory", "models",
]


def __getattr__(name: str):
    if name in _SOURCES:
        value = getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
    elif not name.startswith("__"):
        try:  # a submodule (orthofx.nn, orthofx.metrics ...), as an eager package would have it after import
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise  # the submodule exists and failed to import something itself
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # imported once: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package's module type. Importing a submodule binds it on the package (``orthofx.transform`` = the
    module ``orthofx.transform``), which would hide the function of the same name from :func:`__getattr__`: such
    a binding keeps the function instead, as the package's eager imports did."""

    def __setattr__(self, name: str, value) -> None:
        if name in _SOURCES and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from . import metrics, models, theory
    from .errors import (ArgumentError, CaptureError, ExportError, ImpossibleLayerError, LayerArgumentError,
                         OrthofxError, OrthofxWarning, PlanError, PolicyError, RunningFiltersDroppedWarning,
                         ScaleLostWarning, TransformError)
    from .export import ExportResult, export, freeze, load
    from .optim import AttachHandle, attach
    from .passes import register_pass
    from .penalty import penalty, penalty_terms
    from .plan import Plan
    from .policy import Policy, presets
    from .report import Report, report
    from .transform import explain, is_transformed, manifest_of, transform
