"""orthofx: orthogonality as a one-line change for any PyTorch model.

    import orthofx
    gm = orthofx.transform(model, "lorth", example_inputs=(x,))   # preset, YAML path/text, dict or Policy
    print(orthofx.explain(model, "lorth"))                         # dry run
    loss = criterion(gm(x), y) + orthofx.penalty(gm)
    print(orthofx.report(gm))
"""

from . import metrics, models, theory
from .export import ExportResult, export, freeze, load
from .optim import AttachHandle, attach
from .errors import (ArgumentError, CaptureError, ExportError, ImpossibleLayerError, LayerArgumentError, OrthofxError,
                     PlanError, PolicyError, TransformError)
from .passes import register_pass
from .penalty import penalty, penalty_terms
from .plan import Plan
from .policy import Policy, presets
from .report import Report, report
from .transform import explain, is_transformed, manifest_of, transform

__version__ = "0.1.0"

__all__ = [
    "transform", "explain", "penalty", "penalty_terms", "report", "Report", "Plan", "Policy", "presets",
    "register_pass", "manifest_of", "is_transformed", "attach", "AttachHandle",
    "freeze", "export", "load", "ExportResult", "ExportError",
    "OrthofxError", "PolicyError", "CaptureError", "PlanError", "TransformError", "ImpossibleLayerError",
    "LayerArgumentError", "ArgumentError",
    "metrics", "theory", "models",
]
