"""Freeze, export, save and load transformed models.

* :func:`freeze` bakes a transformed model into plain torch layers with the same eval outputs: every module that
  offers ``to_plain()`` (orthofx's layers do) is replaced by what it returns, and the penalty terms and optimizer
  hooks are dropped.
* :func:`export` writes ``.onnx`` (dynamo exporter, checked with ``onnx.checker`` and run with onnxruntime),
  ``.pt2`` (``torch.export``; reloaded and compared) or ``.pt`` (state_dict + policy, safe to load with
  ``torch.load(weights_only=True)``); the result reports the largest difference from the frozen model.
* :func:`load` replays a ``.pt`` file's policy on the original model and restores the weights.

Example::

    gm = orthofx.transform(model, "lorth", example_inputs=(x,))
    result = orthofx.export(gm, "model.onnx", example_inputs=(x,))
    print(result.max_abs_diff)
    orthofx.export(gm, "model.pt")
    gm2 = orthofx.load(model, "model.pt")
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .capture import unwrap_model
from .errors import ExportError
from .passes.base import replace_module
from .policy import Policy
from .transform import as_input_tuple, manifest_of, output_tensors, store_manifest, transform

__all__ = ["freeze", "export", "load", "ExportResult", "FORMAT_VERSION"]

#: Version of the ``.pt`` file layout written by :func:`export`.
FORMAT_VERSION = 1
#: ONNX difference above which :func:`export` fails.
ONNX_TOLERANCE = 1e-4


def _plain_replacements(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every outermost module offering ``to_plain()``."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in root.named_modules():
        if not name or not callable(getattr(module, "to_plain", None)):
            continue
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue
        found.append((name, module))
    return found


def freeze(model: nn.Module) -> fx.GraphModule:
    """A copy of a transformed model made of plain torch layers, in eval mode, with the same eval outputs.

    Penalty terms and optimizer hooks are dropped from the copy's manifest (``orthofx.penalty`` of it is zero);
    the original model is not changed.
    """
    root = unwrap_model(model)
    manifest = manifest_of(model)
    frozen = copy.deepcopy(root)
    frozen.eval()
    # A module's plain form may itself hold orthofx layers (a probe around a block): repeat until none is left.
    for _ in range(100):
        pending = _plain_replacements(frozen)
        if not pending:
            break
        for name, module in pending:
            with torch.no_grad():
                plain = module.to_plain()
            plain.eval()
            replace_module(frozen, name, plain)
    else:  # pragma: no cover - a to_plain() that returns itself
        raise ExportError("freeze did not terminate: a module's to_plain() keeps returning orthofx layers")
    frozen.recompile()
    store_manifest(frozen, dataclasses.replace(manifest, penalties=[], optimizer_hooks=[], frozen=True))
    return frozen


@dataclass
class ExportResult:
    """What :func:`export` wrote and how closely the written model reproduces the frozen one."""

    path: str
    format: str
    max_abs_diff: float | None
    seconds: float

    def __str__(self) -> str:
        diff = "not checked" if self.max_abs_diff is None else f"max |diff| {self.max_abs_diff:.3g}"
        return f"{self.format} -> {self.path} ({diff}, {self.seconds:.2f} s)"


def _max_diff(expected: list[torch.Tensor], actual: list) -> float:
    if len(expected) != len(actual):
        raise ExportError(f"the exported model returns {len(actual)} outputs, the model {len(expected)}")
    worst = 0.0
    for e, a in zip(expected, actual):
        a = torch.as_tensor(a)
        if tuple(a.shape) != tuple(e.shape):
            raise ExportError(f"exported output shape {tuple(a.shape)} differs from the model's {tuple(e.shape)}")
        if e.numel():
            worst = max(worst, float((e.detach().double() - a.double()).abs().max()))
    return worst


def _dynamic_shapes(inputs: tuple, dynamic_batch: bool):
    if not dynamic_batch:
        return None
    batch = torch.export.Dim("batch", min=1)
    return tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in inputs)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _root_cause(exc: BaseException) -> str:
    """The innermost exception in ``exc``'s chain, as one line without terminal colour codes: exporters wrap
    the useful message (e.g. "No ONNX function found for orthofx.eigh_stable") in generic ones."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc = inner
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _export_onnx(frozen: nn.Module, path: str, inputs: tuple, dynamic_batch: bool, opset: int) -> float:
    if opset < 18:
        raise ExportError(f"opset {opset} is not supported: opsets below 18 produce graphs onnxruntime rejects "
                          "(DESIGN.md); use opset >= 18")
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ExportError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'orthofx[onnx]'") from exc
    try:
        torch.onnx.export(frozen, inputs, path, dynamo=True, opset_version=opset, verbose=False,
                          dynamic_shapes=_dynamic_shapes(inputs, dynamic_batch))
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed: {_root_cause(exc)}. Decompositions (eigh, svd) and ops "
                          "without an ONNX translation need an exportable form; .pt2 export keeps them"
                          f"{_leaf_hint(frozen)}") from exc
    onnx.checker.check_model(path, full_check=True)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {arg.name: x.detach().cpu().numpy() for arg, x in zip(session.get_inputs(), inputs)}
    with torch.no_grad():
        expected = output_tensors(frozen(*inputs))
    return _max_diff(expected, session.run(None, feeds))


def _leaf_hint(model: nn.Module) -> str:
    leaves = [path for path, _ in manifest_of(model).capture.leaf_fallbacks]
    if not leaves:
        return ""
    return (f". Submodules kept as fx leaves because they could not be traced ({', '.join(leaves)}) usually "
            "cannot be exported either: rewrite a branch on tensor values with torch.cond or torch.where")


def _export_pt2(frozen: nn.Module, path: str, inputs: tuple, dynamic_batch: bool) -> float:
    try:
        program = torch.export.export(frozen, inputs, dynamic_shapes=_dynamic_shapes(inputs, dynamic_batch))
    except Exception as exc:
        raise ExportError(f"torch.export failed: {_root_cause(exc)}{_leaf_hint(frozen)}") from exc
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    with torch.no_grad():
        return _max_diff(output_tensors(frozen(*inputs)), output_tensors(loaded(*inputs)))


def export(model: nn.Module, path: str | os.PathLike, example_inputs: Any = None, *, dynamic_batch: bool = True,
           opset: int = 20) -> ExportResult:
    """Write a transformed model to ``path``; the suffix chooses the format (``.onnx``, ``.pt2``, ``.pt``).

    ``.onnx`` and ``.pt2`` export the :func:`freeze`-d model (batch dimension dynamic unless
    ``dynamic_batch=False``), reload it and compare with the frozen model on ``example_inputs``; an ONNX
    difference above 1e-4 raises :class:`orthofx.ExportError`. ``.pt`` stores the state_dict and the policy
    (no pickled code; :func:`load` restores it).
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    started = time.perf_counter()
    if suffix == ".pt":
        manifest = manifest_of(model)
        state = {k: v.detach().cpu() for k, v in unwrap_model(model).state_dict().items()}
        torch.save({"orthofx_format": FORMAT_VERSION, "policy": manifest.policy.to_yaml(), "state_dict": state},
                   path)
        return ExportResult(path, "pt", None, time.perf_counter() - started)
    if suffix not in (".onnx", ".pt2"):
        raise ExportError(f"unknown export format {suffix or '(no suffix)'!r} for {path!r}; use .onnx, .pt2 or .pt")
    inputs = as_input_tuple(example_inputs)
    if inputs is None:
        raise ExportError("export needs example_inputs=(x,) to trace and to check the exported model")
    frozen = freeze(model)
    if suffix == ".onnx":
        diff = _export_onnx(frozen, path, inputs, dynamic_batch, opset)
        if diff > ONNX_TOLERANCE:
            raise ExportError(f"onnxruntime's output differs from the frozen model by {diff:.3g} (> "
                              f"{ONNX_TOLERANCE}); the file {path} was written but should not be trusted")
        return ExportResult(path, "onnx", diff, time.perf_counter() - started)
    diff = _export_pt2(frozen, path, inputs, dynamic_batch)
    return ExportResult(path, "pt2", diff, time.perf_counter() - started)


def load(model: nn.Module, path: str | os.PathLike, example_inputs: Any = None) -> fx.GraphModule:
    """Replay the policy stored in a ``.pt`` file (written by :func:`export`) on ``model`` and restore the weights.

    The file is read with ``torch.load(weights_only=True)``: it holds tensors and the policy's YAML, no code.
    ``model`` is the original (untransformed) model; it is not modified.
    """
    try:
        saved = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ExportError(f"cannot read {os.fspath(path)!r} as an orthofx .pt file: {exc}") from exc
    if not isinstance(saved, dict) or saved.get("orthofx_format") != FORMAT_VERSION:
        raise ExportError(f"{os.fspath(path)!r} is not an orthofx .pt file (format {FORMAT_VERSION}); write it "
                          "with orthofx.export(gm, 'model.pt')")
    gm = transform(model, Policy.from_yaml(saved["policy"]), example_inputs=example_inputs)
    missing, unexpected = gm.load_state_dict(saved["state_dict"], strict=False)
    if missing or unexpected:
        raise ExportError(f"the saved weights do not fit the model: missing {list(missing)[:5]}, unexpected "
                          f"{list(unexpected)[:5]}; load with the model the file was exported from")
    return gm
