"""``report(gm)``: what orthofx did to a model and how orthogonal its layers are now.

One row per conv/linear layer of the graph (touched or not) and per other planned site:

* ``site``, ``layer`` (e.g. ``Conv2d(64->128, k=3, s=2)``), ``pass`` (or why a rule skipped the site), ``params``;
* ``lorth``: P0's L_orth of the current weight (per group for grouped convs, ||WW^T - I||^2 for linears);
* ``sigma_min`` / ``sigma_max``: the exact extreme singular values of the layer's operator at the input size
  seen on the example inputs, computed with circular padding (Sedghi et al.; exact for circular convs, the
  standard surrogate for zero-padded ones), strided convs through space-to-depth;
* ``exists``: whether an orthogonal convolution of that architecture exists (P0, Theorem 4), with its case.

Example::

    gm = orthofx.transform(model, "lorth", example_inputs=(x,))
    rep = orthofx.report(gm)
    print(rep)              # a table
    rep.rows[0]["sigma_max"]
    rep.plot("spectra.png")  # needs matplotlib
"""

from __future__ import annotations

from typing import Any

import torch
from tabulate import tabulate
from torch import nn

from . import metrics, theory
from .capture import unwrap_model
from .plan import describe_module
from .transform import manifest_of

__all__ = ["Report", "report", "layer_singular_values"]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d)


def _dilated_kernel(weight: torch.Tensor, dilation: tuple[int, ...]) -> torch.Tensor:
    """The equivalent undilated kernel (zeros between taps), so dilated convs get exact singular values."""
    if all(d == 1 for d in dilation):
        return weight
    spatial = weight.shape[2:]
    size = [(k - 1) * d + 1 for k, d in zip(spatial, dilation)]
    out = weight.new_zeros(*weight.shape[:2], *size)
    index = (slice(None), slice(None)) + tuple(slice(None, None, d) for d in dilation)
    out[index] = weight
    return out


def _grid(input_shape: tuple[int, ...] | None, dims: int, stride: tuple[int, ...]) -> tuple[int, ...] | None:
    if input_shape is None or len(input_shape) < dims:
        return None
    size = input_shape[-dims:]
    # The circular operator needs a grid divisible by the stride; round up, as the layer's padding would.
    return tuple(-(-n // s) * s for n, s in zip(size, stride))


def layer_singular_values(module: nn.Module, input_shape: tuple[int, ...] | None) -> torch.Tensor | None:
    """All singular values of a conv (circular, at ``input_shape``'s spatial size) or linear layer's operator;
    ``None`` when they cannot be computed (unknown input size, unequal strides, other layer types)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    with torch.no_grad():
        if isinstance(module, nn.Linear):
            return metrics.linear_singular_values(weight.detach())
        if isinstance(module, _CONV_TYPES):
            dims = weight.dim() - 2
            grid = _grid(input_shape, dims, module.stride)
            if grid is None or len(set(module.stride)) != 1:
                return None
            kernel = _dilated_kernel(weight.detach(), module.dilation)
            return metrics.conv_singular_values(kernel, grid, stride=module.stride[0], groups=module.groups)
    return None


def _existence(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "yes (" + ("RO" if module.out_features <= module.in_features else "CO") + ")"
    if isinstance(module, _CONV_TYPES):
        dims = module.weight.dim() - 2
        try:
            result = theory.orthogonal_conv_exists(module.in_channels, module.out_channels, module.kernel_size,
                                                   module.stride, dims=dims, groups=module.groups)
        except ValueError as exc:
            return f"? ({exc})"
        return f"yes ({result.case})" if result.exists else f"no ({result.case})"
    return ""


def _lorth(module: nn.Module) -> float | None:
    if isinstance(module, nn.Linear):
        return float(metrics.lorth(module.weight.detach()))
    if isinstance(module, _CONV_TYPES) and len(set(module.stride)) == 1 and all(d == 1 for d in module.dilation):
        return float(metrics.lorth(module.weight.detach(), stride=module.stride[0], groups=module.groups))
    return None


class Report:
    """Per-site table of a transformed model; ``str()`` renders it, ``rows`` and ``to_dict()`` give the data."""

    def __init__(self, rows: list[dict[str, Any]], capture: dict[str, Any], spectra: dict[str, torch.Tensor],
                 penalties: list[dict[str, Any]]):
        self.rows = rows
        self.capture = capture
        self.spectra = spectra
        self.penalties = penalties

    def to_dict(self) -> dict[str, Any]:
        return {"capture": dict(self.capture), "rows": [dict(r) for r in self.rows],
                "penalties": [dict(p) for p in self.penalties]}

    def __str__(self) -> str:
        lines = [f"capture: {self.capture['mode']}"]
        for path, reason in self.capture["leaf_fallbacks"]:
            lines.append(f"  kept as leaf (not traceable): {path}: {reason}")
        for warning in self.capture["warnings"]:
            lines.append(f"  warning: {warning}")
        headers = ["site", "layer", "pass", "params", "lorth", "sigma_min", "sigma_max", "input", "exists"]
        table = [[_fmt(row.get(h)) for h in headers] for row in self.rows]
        lines.append(tabulate(table, headers=headers, tablefmt="simple", disable_numparse=True))
        if self.penalties:
            total = sum(p["weighted"] for p in self.penalties)
            lines.append(f"penalty: {len(self.penalties)} term(s), weighted sum {total:.4g}")
        return "\n".join(lines)

    __repr__ = __str__

    def plot(self, path: str, max_layers: int = 24) -> str:
        """Write a PNG of each layer's singular values (sorted, descending) to ``path``; needs matplotlib."""
        try:
            import matplotlib
            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("Report.plot needs matplotlib: pip install 'orthofx[plot]'") from exc
        fig, ax = plt.subplots(figsize=(8, 5))
        for name, values in list(self.spectra.items())[:max_layers]:
            v = values.double().cpu()
            x = torch.linspace(0, 1, len(v))
            ax.plot(x.numpy(), v.numpy(), label=name, linewidth=1)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
        ax.set_xlabel("normalised rank")
        ax.set_ylabel("singular value")
        ax.set_title("per-layer singular-value spectra (circular padding)")
        if self.spectra:
            ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (tuple, list)):
        return "x".join(str(v) for v in value)
    return str(value)


def report(model: nn.Module) -> Report:
    """Report on a model returned by :func:`orthofx.transform` (compiled or wrapped models too)."""
    manifest = manifest_of(model)
    root = unwrap_model(model)
    plan = manifest.plan
    applied = {e.site.name: e for e in plan.entries if e.site.kind != "function"}
    skipped = {site.name: (rule, reason) for site, rule, reason in plan.skipped}
    rows: list[dict[str, Any]] = []
    spectra: dict[str, torch.Tensor] = {}
    for site in plan.sites:
        if site.kind == "block":
            continue
        if site.kind == "function":
            entry = next((e for e in plan.entries if e.site.name == site.name), None)
            rows.append({"site": site.name, "layer": site.target, "pass": entry.pass_name if entry else None,
                         "params": _params(entry)})
            continue
        module = root.get_submodule(site.name)
        entry = applied.get(site.name)
        if not isinstance(module, (nn.Linear,) + _CONV_TYPES) and entry is None:
            continue
        shape = manifest.input_shapes.get(site.name)
        values = layer_singular_values(module, shape)
        if values is not None and values.numel():
            spectra[site.name] = values
        pass_text = entry.pass_name if entry else (f"skipped: {skipped[site.name][1]}" if site.name in skipped
                                                    else None)
        dims = module.weight.dim() - 2 if isinstance(module, _CONV_TYPES) else 0
        rows.append({
            "site": site.name,
            "layer": describe_module(module),
            "pass": pass_text,
            "params": _params(entry),
            "lorth": _lorth(module),
            "sigma_min": float(values.min()) if values is not None and values.numel() else None,
            "sigma_max": float(values.max()) if values is not None and values.numel() else None,
            "input": tuple(shape[-dims:]) if shape is not None and dims else None,
            "exists": _existence(module),
        })
    penalties = []
    with torch.no_grad():
        for term in manifest.penalties:
            value = float(term.value(root))
            penalties.append({"site": term.site, "rule": term.rule, "weight": term.weight, "value": value,
                              "weighted": term.weight * value})
    capture = {"mode": manifest.capture.mode, "leaf_fallbacks": list(manifest.capture.leaf_fallbacks),
               "warnings": list(manifest.capture.warnings)}
    return Report(rows, capture, spectra, penalties)


def _params(entry) -> str | None:
    if entry is None:
        return None
    return ", ".join(f"{k}={v}" for k, v in entry.params.items())
