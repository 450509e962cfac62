"""``report(gm)``: what orthofx did to a model and how orthogonal its layers are now.

One row per conv/linear layer of the graph (touched or not) and per other planned site:

* ``site``, ``layer`` (e.g. ``Conv2d(64->128, k=3, s=2)``), ``pass`` (or why a rule skipped the site), ``params``;
* ``lorth``: P0's L_orth of the current weight, computed in float64 (per group for grouped convs, that of the
  undilated equivalent kernel for dilated ones, ||WW^T - I||^2 for linears, ||W^TW - I||^2 for those with more
  outputs than inputs; a transposed conv is the adjoint of the conv with its weight, with the same singular values
  and L_orth); for a recurrent layer (RNN / LSTM / GRU and
  their cells), the sum over its hidden-to-hidden weights' gate blocks of ||W_g W_g^T - I||^2 (the smaller Gram),
  what an ``orth_regularizer`` term of the site penalises (:func:`orthofx.passes.orth_regularizer.gate_blocks_lorth`);
* ``sigma_min`` / ``sigma_max``: the exact extreme singular values of the layer's operator at the input size
  seen on the example inputs, computed with circular padding (Sedghi et al.; exact for circular convs, the
  standard surrogate for zero-padded ones), strided convs through space-to-depth. A strided conv's circular
  operator needs a grid divisible by the stride: on an input size that is not (a 7x7 map at stride 2), the
  figures are those of the circular operator on the size rounded up to a multiple of the stride (8x8), a property
  of the kernel (what L_orth measures; a regularised conv's row), not of what the layer applies to that input.
  A hard layer (of ``orthogonal_conv``, or of ``pre_svd`` with ``weight: orthogonal``) that is not orthogonal on
  an input size of the example run (status ``hard kernel; not orthogonal on the example's 7x7 input: ...``, every
  such size named) gets instead the exact figures
  of the operator it applies on the first of them, from its dense matrix built from its weight (in float64; the
  layer is not run, so no forward hook fires; ``layer`` says so), or none where that has more than 1024 inputs
  and outputs or more than 4096 of either, and a note either way;
* ``exists``: whether an orthogonal convolution of that architecture exists (P0, Theorem 4, dilation included),
  with its case.

Layers whose weights have no values (meta device, a lazy layer that has not run) get rows without figures.

A conv wrapped by ConvNorm (:class:`~orthofx.nn.convnorm.ConvNormConv2d` ..., what the ``convnorm`` pass puts in
its place) gets the figures of its own conv (``lorth``, ``sigma_min`` / ``sigma_max``, ``exists``: those a plain
conv with the same weight, stride, dilation and groups gets at the same input size), not those of the
conv + ConvNorm composite: the weight is what an ``orth_regularizer`` term of the same site penalises (the row's
``lorth`` is that term's unweighted value) and what ``riemannian`` retracts, while ConvNorm's Fourier rescaling
is a function of that weight and the grid, not a parameter (the pass's Change records its effect on the circular
operator: the per-channel gains ``row_gain_min`` / ``row_gain_max`` before and after). The row's ``layer`` says
so: ``ConvNormConv2d(3->4, k=3, s=1) (figures: its conv, without ConvNorm)``. The conv inside a wrapper the model
was written with (a site ``<name>.conv`` of its own) is measured at the wrapper's input size. A frozen wrapper
(``FrozenConvNormNd``, from ``orthofx.freeze``) trains no weight any more: its row measures the operator it
applies, conv + ConvNorm (+ its affine part), at the input size seen: the circular operator on the layer's FFT grid
(``layer`` names it: ``FrozenConvNormNd(3->4, k=3, s=1) (figures: conv + ConvNorm, circular on its FFT grid
8x8)``; none when the stride does not divide that grid), a one-tap layer's scaled conv (with its ``lorth``).

Function sites (decompositions) rewritten with a condition-number monitor (pass ``svd_conditioning``,
``monitor: true``) also carry the monitor's figures, read from its buffers (the monitor is found through the
Change's ``after["monitor"]`` name, on the transformed model):

* ``kappa``: the latest ``lambda_max / lambda_min`` of the matrix entering the site (``None`` before any call);
* ``kappa_max``: the largest seen (NaN ignored); ``nan_events`` / ``inf_events``: calls whose eigenvalues held a
  NaN / an inf (or gave an infinite kappa); ``updates``: calls recorded.

The table shows the columns ``kappa``, ``kappa_max`` and ``nan`` only when some site has a monitor.
:func:`monitors` gives the same figures as ``{site: summary}`` without building the table.
``Report.conditioning`` maps each monitored site to its kappa history (oldest first; the monitor keeps the last
``history_size`` values, 1000 by default). The monitor records every forward through the site, in training and in
eval mode; the first value is ``transform``'s check run on the example inputs when they were given.
``Report.plot(path)`` draws the spectra and, when there are monitors, a second panel with kappa against the
monitor's update count (log scale).

A model written with ``orthofx.nn`` layers that ``transform`` did not return (no manifest) gets one row per conv /
linear layer and per orthofx layer (not those nested inside an orthofx layer, whose row stands for them; a
JacobianProbe is transparent: its block's layers keep their rows), pass ``"orthofx layer"`` (None for torch's
layers), the monitors' kappa figures and the probes' penalty terms. The model is not run, so ``sigma_min`` /
``sigma_max`` are given only where a layer knows its input size (``method="cayley_fft"``'s ``input_size``).
:func:`monitors` of such a model lists the :class:`~orthofx.nn.ConditionMonitor` modules it holds (by module
path). A model holding no orthofx layer raises :class:`~orthofx.OrthofxError`.

A model that ``transform`` did not return but that holds transformed models (a transformed backbone inside a
bigger model: :func:`orthofx.penalty.transformed_parts`) gets each part's rows, penalty terms, spectra, kappa
histories and notes as ``report(part)`` gives them, their sites prefixed with the part's path (as
``orthofx.penalty_terms`` keys are: ``backbone.conv1``), and the rows of its modules outside the parts as above (its
orthofx and conv / linear layers as written; a JacobianProbe's penalty term), in module order. Its capture
``mode`` is ``"parts"``; leaf fallbacks and warnings are the parts', prefixed; ``output_change`` is None.
:func:`monitors` of it gives the parts' monitors (prefixed) and those outside them.

Example::

    import orthofx
    model = orthofx.models.get("small_cnn")
    x = orthofx.models.example_input("small_cnn")
    gm = orthofx.transform(model, "lorth", example_inputs=(x,))
    rep = orthofx.report(gm)
    print(rep)              # a table
    rep.rows[0]["sigma_max"]
    rep.plot("spectra.png")  # needs matplotlib; a second panel of kappa over updates when there are monitors
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

from . import metrics, theory
from .capture import unwrap_model
from .nn.convnorm import ConvNormConvNd, FrozenConvNormNd, convnorm_geometry
from .nn.decompositions import ConditionMonitor
from .nn.jacobian import JacobianProbe
from .nn.orthogonal import (OrthogonalConv1d, OrthogonalConv2d, OrthogonalConv3d, OrthogonalConvTranspose1d,
                            OrthogonalConvTranspose2d, OrthogonalConvTranspose3d, OrthogonalLinear,
                            FourierConv, _FrozenConvTranspose)
from .nn.padding import (CircularPad, circular_pad, conv_output_length, conv_zero_pads, flat_pads, pairs,
                         per_dimension, torch_mode_pads)
from .nn.precision import describe_nonfinite
from .passes.base import (RECURRENT_TYPES, TORCH_CONV_TYPES, TORCH_TRANSPOSED_CONV_TYPES, ParametrizationState,
                          current_weight, default_device_set_aside, describe_module, per_dimension_text,
                          recurrent_hidden_weights)
from .passes.orth_regularizer import gate_blocks_lorth
from .passes.orthogonal_conv import grid_text, grids_text
from .passes.riemannian import scale_lost_note
from .errors import ArgumentError, first_few
from .nn.tracing import is_orthofx_layer
from .penalty import (holding_orthofx_layers, lazy_site_module, module_path_within, part_site_path,
                      transformed_parts)
from .transform import is_transformed, manifest_of

__all__ = ["Report", "report", "monitors", "layer_singular_values"]

# Layers whose weight is the operator they apply (ConvNorm wrappers are not: they rescale in Fourier space; their
# rows measure their conv, see _measured_layer).
_TRANSPOSED_TYPES = TORCH_TRANSPOSED_CONV_TYPES + (OrthogonalConvTranspose1d, OrthogonalConvTranspose2d,
                                                  OrthogonalConvTranspose3d)
_CONV_TYPES = TORCH_CONV_TYPES + (OrthogonalConv1d, OrthogonalConv2d, OrthogonalConv3d) + _TRANSPOSED_TYPES
_LINEAR_TYPES = (nn.Linear, OrthogonalLinear)


def _weight_values(module: nn.Module) -> torch.Tensor | None:
    """The layer's weight, detached; ``None`` when it has no values to measure (no tensor weight, a lazy layer that
    has not run yet, weights on the meta device, or a complex weight, which the passes skip and the real singular
    value and L_orth routines do not take)."""
    if any(t.is_meta for t in _held_tensors(module)):
        # An orthofx layer computes ``weight`` from its parameters (a Cayley / matrix-exponential kernel): reading
        # it on the meta device would run that computation there, which some steps (autocast checks) refuse.
        return None
    # as the next call computes it: a pruned / weight-normed layer's attribute holds the last forward's tensor
    weight = current_weight(module)
    if not isinstance(weight, torch.Tensor) or isinstance(weight, nn.parameter.UninitializedParameter) \
            or weight.is_meta or not weight.is_floating_point():
        return None
    return weight.detach()


def _held_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The parameters and buffers of ``module`` and its submodules (a parametrization's ``original`` included),
    found without reading properties (an orthofx layer's ``weight`` computes its kernel)."""
    return list(module.parameters()) + list(module.buffers())


def _grid(input_shape: tuple[int, ...] | None, dims: int, stride: tuple[int, ...]) -> tuple[int, ...] | None:
    if input_shape is None or len(input_shape) < dims:
        return None
    size = input_shape[-dims:]
    # A strided circular operator lives on a grid divisible by the stride: an input size that is not is rounded up
    # to one. No layer pads its input that way (torch's convs read it with zero padding, orthofx's orthogonal ones
    # wrap around on the size itself), so the figures there are the kernel's (what L_orth drives to 1), not those of
    # the operator the layer applies to that size: the report measures hard layers there otherwise
    # (_measure_off_grid).
    return tuple(-(-n // s) * s for n, s in zip(size, stride))


def layer_singular_values(module: nn.Module, input_shape: tuple[int, ...] | None) -> torch.Tensor | None:
    """All singular values of a linear layer's matrix, or of a conv's kernel as a circular operator (Sedghi et al.,
    through FFTs; dilated convs through their undilated equivalent kernel) on the grid of ``input_shape``'s spatial
    size; a transposed conv's are those of the conv with its weight (its adjoint) on the grid ``input * stride``,
    the operator it applies for any input size. ``None`` when they cannot be computed (unknown input size, other
    layer types, weights without values: meta device, uninitialised lazy layer).

    A strided conv's circular operator is defined on grids divisible by the stride only: a size that is not is
    rounded up to a multiple of it. The figures are then a property of the kernel (the circular operator on the
    nearest larger grid, what L_orth measures), not those of the operator the layer applies to inputs of that
    size: a conv with circular padding wraps around on the size itself, and an orthogonal one is in general not
    orthogonal there (:func:`orthofx.passes.orthogonal_conv.orthogonal_on_grid`)."""
    with torch.no_grad():
        weight = _weight_values(module)
        if weight is None:
            return None
        if isinstance(module, _LINEAR_TYPES):
            return metrics.linear_singular_values(weight)
        if isinstance(module, _CONV_TYPES):
            dims = weight.dim() - 2
            # torch keeps a one-element stride as given ((2,) on a Conv2d) and applies it to every dimension;
            # zipped as it is against the input size, it cut that size to one dimension
            stride = per_dimension(module.stride, dims, "stride")
            if isinstance(module, _TRANSPOSED_TYPES):
                # the adjoint of the conv on the output grid n S: its input n is that conv's output grid, any n
                grid = _grid(input_shape, dims, (1,) * dims)
                grid = None if grid is None else tuple(n * s for n, s in zip(grid, stride))
            else:
                grid = _grid(input_shape, dims, stride)
            if grid is None:
                return None
            kernel = metrics.dilated_kernel(weight, module.dilation)
            return metrics.conv_singular_values(kernel, grid, stride=stride, groups=module.groups)
    return None


def _is_full_size(module: nn.Module) -> bool:
    """A Cayley-FFT layer: its ``weight`` is an n x n kernel on an n x n grid (orthogonal by construction there),
    for which L_orth (defined for kernels with S n >= 2k - 1, Theorem 7) and Theorem 4's k x k question do not
    apply."""
    return getattr(module, "method", None) == "cayley_fft"


#: The "exists" figure of a Cayley-FFT layer, unfrozen or frozen (:func:`_is_full_size`).
_FULL_SIZE_EXISTS = "yes (full-size kernel)"


def _existence(module: nn.Module) -> str:
    if _is_full_size(module):
        return _FULL_SIZE_EXISTS
    # looked up without reading ``weight``, which an orthofx layer computes (and cannot on the meta device)
    if isinstance(module._parameters.get("weight"), nn.parameter.UninitializedParameter):
        return "? (lazy layer, not run yet: its input size is unknown)"
    if isinstance(module, _LINEAR_TYPES):
        return "yes (" + ("RO" if module.out_features <= module.in_features else "CO") + ")"
    if isinstance(module, _CONV_TYPES):
        return _conv_existence(module, isinstance(module, _TRANSPOSED_TYPES))
    return ""


def _conv_existence(module: nn.Module, transposed: bool) -> str:
    """Theorem 4's answer for the architecture of a conv-like ``module`` (its channels, kernel size, stride, groups
    and dilation attributes)."""
    dims = len(module.kernel_size)
    # a transposed conv is the adjoint of the conv from its out_channels to its in_channels: orthogonal with it
    channels = (module.out_channels, module.in_channels) if transposed else (module.in_channels, module.out_channels)
    try:
        result = theory.orthogonal_conv_exists(*channels, module.kernel_size, module.stride, dims=dims,
                                               groups=module.groups, dilation=tuple(module.dilation))
    except ValueError as exc:
        return f"? ({exc})"
    case = theory.adjoint_case(result.case) if transposed else result.case
    return f"yes ({case})" if result.exists else f"no ({case})"


def _lorth(module: nn.Module) -> float | None:
    """L_orth of the layer's weight, computed in float64 (in the CO case it is a small difference of large numbers,
    which a bfloat16 / float16 computation rounds away); a dilated conv's is that of its undilated equivalent
    kernel, the operator it applies."""
    if _is_full_size(module):
        return None
    with torch.no_grad():
        weight = _weight_values(module)
        if weight is None:
            return None
        weight = weight.to(torch.float64)
        if isinstance(module, _LINEAR_TYPES):
            return float(metrics.lorth(weight))
        if isinstance(module, _CONV_TYPES):
            return float(metrics.lorth(weight, stride=tuple(module.stride), groups=module.groups,
                                       dilation=tuple(module.dilation)))
    return None


def _recurrent_lorth(module: nn.Module) -> float | None:
    """L_orth of a recurrent layer's hidden-to-hidden weights, gate block by gate block, in float64 (``None`` for
    any other module, or one with no hidden weights or no values); a weight tied within the layer
    (``weight_hh_l1 = weight_hh_l0``) counts once, as in the penalty."""
    if not isinstance(module, RECURRENT_TYPES) or any(t.is_meta for t in _held_tensors(module)):
        return None
    hidden = recurrent_hidden_weights(module)
    if not hidden or any(getattr(module, name).numel() == 0 for name, _ in hidden):
        return None
    with torch.no_grad():
        distinct = {id(t): t for t in (getattr(module, name) for name, _ in hidden)}.values()
        weights = [t.detach().to(torch.float64) for t in distinct]
        return float(gate_blocks_lorth(weights, hidden[0][1]))


class Report:
    """Per-site table of a transformed model; ``str()`` renders it, ``rows`` and ``to_dict()`` give the data.

    Example::

        import json, orthofx
        gm = orthofx.transform(orthofx.models.get("small_cnn"), "lorth")
        report = orthofx.report(gm)
        print([(row["site"], round(row["lorth"], 2)) for row in report.rows])   # the data behind str(report)
        total = sum(term["weighted"] for term in report.penalties)              # what orthofx.penalty(gm) sums
        assert abs(total - orthofx.penalty(gm).item()) < 1e-4 * total
        text = json.dumps(report.to_dict())                                      # plain data, e.g. for a logger
    """

    def __init__(self, rows: list[dict[str, Any]], capture: dict[str, Any], spectra: dict[str, torch.Tensor],
                 penalties: list[dict[str, Any]], output_change: float | None = None,
                 conditioning: dict[str, list[float]] | None = None, notes: list[str] | None = None):
        self.output_change = output_change
        # lines shown under the table: why some figures are missing or not finite, a policy that changed nothing,
        # an optional rule that matched nothing, a scale a Stiefel constraint undoes
        self.notes = list(notes or [])
        self.conditioning = dict(conditioning or {})
        self.rows = rows
        self.capture = capture
        self.spectra = spectra
        self.penalties = penalties

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON data (``json.dumps(report.to_dict(), allow_nan=False)`` works), keys:

        * ``capture``: ``mode``, ``summary``, ``leaf_fallbacks`` (``[path, reason]`` pairs), ``warnings``;
        * ``rows``: one dict per row of the table, keys ``site``, ``layer``, ``pass``, ``params``, ``lorth``,
          ``sigma_min``, ``sigma_max``, ``input`` (the spatial size seen, a list; None for linears or when unknown),
          ``exists``; rows of monitored sites also ``kappa``, ``kappa_max``, ``updates``, ``nan_events``,
          ``inf_events``;
        * ``penalties``: one dict per penalty term, keys ``site``, ``rule``, ``weight``, ``value``, ``weighted``,
          ``every`` (the term is evaluated on one training call of ``orthofx.penalty`` in ``every``; 1 for a
          JacobianProbe's row, whose own ``every`` skips estimates instead);
        * ``output_change``: the relative output change on the example inputs (None without them);
        * ``conditioning``: ``{site: [kappa, ...]}``, the monitors' histories;
        * ``notes``: the lines under the table saying why some figures are missing (e.g. no example inputs) or
          not finite (the NaN / inf entries of the layer's parameters), that the policy changed no site, which
          ``optional: true`` rules matched nothing, and which sites lose a scale to a Stiefel constraint
          (:class:`~orthofx.ScaleLostWarning`).

        None is a figure that does not apply or cannot be computed. A figure that is not finite (a NaN kappa after
        a NaN input, the L_orth of a weight holding an inf) is the string ``"nan"``, ``"inf"`` or ``"-inf"``
        (``float()`` reads it back): JSON has no such numbers. Tuples become lists, tensors and NumPy scalars
        Python numbers. :attr:`rows` keeps the figures as floats.
        """
        return _plain({"capture": self.capture, "rows": self.rows, "penalties": self.penalties,
                       "output_change": self.output_change, "conditioning": self.conditioning,
                       "notes": self.notes})

    def __str__(self) -> str:
        lines = [f"capture: {self.capture.get('summary') or self.capture['mode']}"]
        for path, reason in self.capture["leaf_fallbacks"]:
            lines.append(f"  kept as leaf (not traceable): {path}: {reason}")
        for warning in self.capture["warnings"]:
            lines.append(f"  warning: {warning}")
        headers = ["site", "layer", "pass", "params", "lorth", "sigma_min", "sigma_max", "input", "exists"]
        columns = list(headers)
        if any("kappa" in row for row in self.rows):
            headers += ["kappa", "kappa_max", "nan"]
            columns += ["kappa", "kappa_max", "nan_events"]
        table = [[_fmt(row.get(c)) for c in columns] for row in self.rows]
        if table:
            lines.append(tabulate(table, headers=headers, tablefmt="simple", disable_numparse=True))
        else:  # a header over nothing reads as a failure to measure; say why there is no row
            lines.append("(no rows: the model has no conv / linear layer and the policy changed no site)")
        lines.extend(f"note: {note}" for note in self.notes)
        if self.output_change is not None:
            lines.append(f"relative output change on the example inputs: {_fmt(self.output_change, '.3g')} "
                         "(||f_new(x) - f(x)|| / ||f(x)||, eval mode)")
        if self.penalties:
            total = sum(p["weighted"] for p in self.penalties if p["weighted"] is not None)
            unknown = sum(1 for p in self.penalties if p["weighted"] is None)
            note = (f" ({unknown} term(s) left out: their layers have no values yet, lazy layers that have not run or "
                    "weights on the meta device)") if unknown else ""
            periodic = sum(1 for p in self.penalties if p["every"] > 1)
            if periodic:
                note += (f" ({periodic} term(s) with every > 1: a training loss's orthofx.penalty evaluates each on "
                         "one call in its every)")
            lines.append(f"penalty: {len(self.penalties)} term(s), weighted sum {_fmt(float(total))}{note}")
        return "\n".join(lines)

    __repr__ = __str__

    def plot(self, path: str, max_layers: int = 24) -> str:
        """Write a figure of each layer's singular values (sorted, descending) to ``path``, in the format its suffix
        names (``.png``, ``.svg``, ``.pdf``: those matplotlib writes); needs matplotlib.

        When the model has condition-number monitors (:attr:`conditioning` is not empty) the figure gets a second
        panel: each monitored site's kappa against the monitor's update count, on a log scale.
        """
        _check_plot_arguments(path, max_layers)
        check_plot_format(path)
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        if self.conditioning:
            fig, (ax, kappa_ax) = plt.subplots(1, 2, figsize=(14, 5))
        else:
            fig, ax = plt.subplots(figsize=(8, 5))
            kappa_ax = None
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
        if kappa_ax is not None:
            self._plot_conditioning(kappa_ax)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def _plot_conditioning(self, ax) -> None:
        updates = {row["site"]: row.get("updates") for row in self.rows if "kappa" in row}
        positive = False
        for site, history in self.conditioning.items():
            # x is the update number: when the ring has wrapped, the kept values are the last len(history) ones.
            first = max(int(updates.get(site) or 0) - len(history), 0)
            marker = "." if len(history) <= 100 else None  # isolated points (between NaN events) stay visible
            ax.plot(range(first, first + len(history)), history, label=site, linewidth=1, marker=marker)
            positive = positive or any(0 < v < float("inf") for v in history)
        if positive:  # a log axis needs a positive value to draw
            ax.set_yscale("log")
        ax.set_xlabel("monitor update (every forward through the site)")
        ax.set_ylabel("kappa = lambda_max / lambda_min")
        ax.set_title("condition number entering each monitored decomposition")
        ax.legend(fontsize=6)


def check_plot_format(path: str | os.PathLike) -> None:
    """Refuse a ``path`` :meth:`Report.plot` cannot write as named, before any work: ``ImportError`` without
    matplotlib (with the install command), :class:`~orthofx.ArgumentError` (``Report.plot: `` and
    :func:`plot_format_problem`'s text) for a suffix that is not an image format matplotlib writes, or none."""
    problem = plot_format_problem(path)
    if problem is not None:
        raise ArgumentError(f"Report.plot: {problem}")


def plot_format_problem(path: str | os.PathLike) -> str | None:
    """Why :meth:`Report.plot` cannot write ``path`` as named (matplotlib would fail after drawing on an unknown
    suffix, or add ``.png`` to a name without one), without a caller's prefix (each caller names itself:
    ``Report.plot``, the CLI's ``--plot PATH``); ``None`` when it can. ``ImportError`` (with the install command)
    without matplotlib, whose list of formats decides."""
    try:
        import matplotlib  # imported first: its submodules may be in sys.modules while it is not importable
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as exc:
        raise ImportError("Report.plot needs matplotlib: pip install 'orthofx[plot]'") from exc
    del matplotlib
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    suffix = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    if suffix in formats:
        return None
    return (f"{os.fspath(path)!r} has {'an unknown image format .' + suffix if suffix else 'no suffix'}; give a path "
            f"ending in .png (or .{', .'.join(f for f in formats if f != 'png')})")


def _check_plot_arguments(path: Any, max_layers: Any) -> None:
    """Refuse what :meth:`Report.plot` would only fail on inside matplotlib, after drawing."""
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentError(f"Report.plot: path must be a str or os.PathLike (e.g. 'spectra.png'), got "
                            f"{type(path).__name__}")
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if os.path.isdir(path):
        raise ArgumentError(f"Report.plot: {os.fspath(path)!r} is an existing directory; give a file path in it "
                            f"(e.g. {os.path.join(os.fspath(path), 'spectra.png')!r})")
    if not os.path.isdir(folder):
        raise ArgumentError(f"Report.plot: cannot write {os.fspath(path)!r}: the directory {folder!r} does not "
                            "exist; create it first or choose another path")
    if isinstance(max_layers, bool) or not isinstance(max_layers, int) or max_layers < 1:
        raise ArgumentError(f"Report.plot: max_layers must be an int >= 1 (how many layers' spectra to draw), got "
                            f"{max_layers!r}")


def _plain(value: Any) -> Any:
    """``value`` as JSON data: dicts (keys as str), lists, str, bool, int, None and finite floats; a non-finite
    float as ``"nan"`` / ``"inf"`` / ``"-inf"``; a one-element tensor or a NumPy scalar as its Python number."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_meta:
        value = value.item()
    elif hasattr(value, "item") and callable(value.item) and not isinstance(value, torch.Tensor):
        value = value.item()  # a NumPy scalar
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else str(value)  # str(float): "nan", "inf", "-inf"
    return value if isinstance(value, (str, bool)) or value is None else str(value)


def _fmt(value: Any, spec: str = ".4g") -> str:
    """A figure as the table shows it: ``-`` for None, floats to 4 significant digits (``spec``), a negative zero as
    ``0`` (``-0`` would read as a tiny negative figure, which a norm or an L_orth cannot be)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(0.0 if value == 0 else value, spec)
    if isinstance(value, (tuple, list)):
        return "x".join(str(v) for v in value)
    return str(value)


def report(model: nn.Module) -> Report:
    """Report on a model returned by :func:`orthofx.transform` (compiled or wrapped models too), on a model
    holding such models (:func:`_parts_report`: their rows, sites prefixed with their paths, and the layers outside
    them), or on a model written with ``orthofx.nn`` layers (:func:`_layers_report`: its orthofx and conv / linear
    layers, not run).

    Example::

        import orthofx
        x = orthofx.models.example_input("small_cnn")
        gm = orthofx.transform(orthofx.models.get("small_cnn"), "orthogonal", example_inputs=(x,))
        report = orthofx.report(gm)
        print(report)   # per site: pass, L_orth, sigma_min / sigma_max at the input size seen, existence
        conv2 = next(row for row in report.rows if row["site"] == "conv2")
        assert abs(conv2["sigma_min"] - 1) < 1e-5 and abs(conv2["sigma_max"] - 1) < 1e-5
    """
    # reading a weight advances a training-mode spectral_norm: a report leaves the model's state as it was, and
    # each parametrized weight is computed once (parametrize.cached), from that state: every figure (sigma, lorth,
    # the penalty's value) is that of one weight, the one the next forward uses, not of the 1st, 2nd, 3rd read
    # the figures' scratch tensors (counts, grids) are made without a device: on the CPU, whatever default device
    # the user set (the model is not run)
    with ParametrizationState.kept(model), torch.nn.utils.parametrize.cached(), default_device_set_aside():
        if not is_transformed(model):
            parts = transformed_parts(model)
            return _parts_report(model, parts) if parts else _layers_report(model)
        return _transformed_report(model)


def _transformed_report(model: nn.Module) -> Report:
    """The report of a model returned by :func:`orthofx.transform` (or of one of its wrappers)."""
    manifest = manifest_of(model)
    root = unwrap_model(model)
    plan = manifest.plan
    skipped = {site.name: reason for site, _, reason in plan.skipped}
    changes: dict[str, list] = {}
    for change in manifest.changes:
        changes.setdefault(change.site, []).append(change)
    rows: list[dict[str, Any]] = []
    spectra: dict[str, torch.Tensor] = {}
    conditioning: dict[str, list[float]] = {}
    entries_by_site: dict[tuple[str, str], list] = {}
    unsized: list[str] = []  # conv rows without sigma because no input reached them
    off_grid_notes: list[str] = []  # hard layers on an input they are not orthogonal on (_measure_off_grid)
    nonfinite: list[tuple[dict[str, Any], nn.Module]] = []  # layer rows, checked for NaN / inf figures below
    # one layer, one row: a layer that rules select both as a module and as a block (a kind: block rule naming it)
    # is one site for shadowing, and its module site's row holds the entries of both, in policy order (a block
    # that only block rules select keeps its row, as its module site, the leaf capture made of it, has none)
    both = {e.site.name for e in plan.entries if e.site.kind == "module"} & {
        e.site.name for e in plan.entries if e.site.kind == "block"}
    for entry in plan.entries:
        kind = "module" if entry.site.kind == "block" and entry.site.name in both else entry.site.kind
        entries_by_site.setdefault((kind, entry.site.name), []).append(entry)
    for site in plan.sites:
        if site.kind == "block" and site.name in both:
            continue
        entries = entries_by_site.get((site.kind, site.name), [])
        pass_text = _pass_text(entries, changes.get(site.name, []) if site.kind != "function" or entries else [],
                               skipped.get(site.name))
        if site.kind in ("block", "function"):
            probed = _probed_layer(root, site) if entries else None
            if probed is not None:
                # a rule that wrapped one conv / linear layer: the layer's figures, as on a module site
                shape = _input_shape(root, site.name, manifest.input_shapes)
                rows.append(_layer_row(site.name, probed, pass_text, _params(entries), shape, spectra))
                nonfinite.append((rows[-1], probed))
                continue
            if entries:
                # no layer to measure (a decomposition, a block of several layers): the figures' keys say so, as on
                # other rows without figures, so that every row has the documented keys
                row = {"site": site.name, "layer": site.target, "pass": pass_text, "params": _params(entries),
                       "lorth": None, "sigma_min": None, "sigma_max": None, "input": None, "exists": None}
                monitor = _monitor_of(root, changes.get(site.name, []))[1]
                if monitor is not None:
                    row.update(_monitor_figures(monitor))
                    conditioning[site.name] = monitor.history
                rows.append(row)
            continue
        try:
            module = root.get_submodule(site.name)
        except AttributeError:
            if not manifest.frozen:
                raise
            # a submodule of an orthofx layer that freeze replaced by its plain form (the conv inside an orthogonal
            # transposed conv of a model written with one): the plain form's row stands for it
            continue
        # a recurrent layer a rule selected but skipped (frozen, declined) gets its row too, as a conv does
        skipped_recurrent = isinstance(module, RECURRENT_TYPES) and site.name in skipped
        if manifest.frozen and isinstance(module, FourierConv):
            rows.append(_fourier_row(site.name, module, pass_text, _params(entries), spectra))
            continue
        # a site captured as the Sequential it still is (the user's own pad + conv block) is no frozen layer
        frozen_conv = _frozen_conv(module) if manifest.frozen and site.module_type is not type(module) else None
        if not isinstance(module, _CONV_TYPES + _LINEAR_TYPES) and frozen_conv is None and not entries \
                and not skipped_recurrent:
            continue
        # a layer a jacobian_isometry rule wrapped in its probe: the layer's figures, as on a block site naming it
        reported = frozen_conv or _probed_layer(root, site) or _reported_module(root, site.name, module)
        shape = _input_shape(root, site.name, manifest.input_shapes)
        rows.append(_layer_row(site.name, reported, pass_text, _params(entries), shape, spectra))
        nonfinite.append((rows[-1], reported))
        if shape is None and rows[-1]["sigma_min"] is None and _needs_input_size(reported):
            unsized.append(site.name)
        off_grid = _off_grid_sizes(changes.get(site.name, []))
        if off_grid:
            # the operator the site applies: a frozen layer's pad + conv as a whole, else the (probed) layer
            applied = module if frozen_conv is not None else reported
            off_grid_notes.append(_measure_off_grid(rows[-1], applied, _measured_layer(reported), off_grid, spectra))
    penalties = []
    with torch.no_grad():
        for term in manifest.penalties:
            value = _penalty_value(root, term)
            penalties.append({"site": term.site, "rule": term.rule, "weight": term.weight, "value": value,
                              "weighted": None if value is None else term.weight * value, "every": term.every})
    capture = {"mode": manifest.capture.mode, "leaf_fallbacks": list(manifest.capture.leaf_fallbacks),
               "warnings": list(manifest.capture.warnings), "summary": manifest.capture.summary()}
    # example inputs ran through the model: transform recorded input shapes, or told the plan it had them
    examples = bool(manifest.input_shapes) or any(entry.has_example_inputs for entry in plan.entries)
    # (a report without rows says that the policy changed no site in place of the table)
    notes = (_unchanged_note(manifest) if rows else []) + _unmatched_optional_note(plan)
    notes += _unsized_note(unsized, examples)
    notes += off_grid_notes
    notes += [note for row, module in nonfinite if (note := _nonfinite_note(row, module)) is not None]
    # (orthofx.freeze measures no output change: a frozen model has the one its transform measured, if any)
    if examples and manifest.output_change is None and not manifest.frozen:
        notes.append("no relative output change: it is undefined on these example inputs (the model's original "
                     "output on them is zero, or the change is beyond the float range)")
    notes += [scale_lost_note(change) for change in manifest.changes if "scale_lost" in change.after]
    return Report(rows, capture, spectra, penalties, manifest.output_change, conditioning, notes)


def _unchanged_note(manifest) -> list[str]:
    """The note of a transformed model that the policy left as it was (no plan entry): its rows, all without a
    pass, would otherwise read like those of a model no one asked anything of. None for a model written with
    orthofx layers and frozen without a transform (its policy has no rules: nothing was asked of it)."""
    plan = manifest.plan
    if plan.entries or manifest.frozen and not getattr(manifest.policy, "rules", None):
        return []
    if plan.skipped:
        return ["the policy changed no site: its rules matched only sites they skip (the pass column says why)"]
    return ["the policy changed no site: no rule matched a site of the model, so every row is a layer as written "
            "(orthofx.explain(model, policy) lists what each rule matches)"]


def _unmatched_optional_note(plan) -> list[str]:
    """The notes for the rules marked ``optional: true`` that matched no site, as ``explain`` lists them: without
    them a misspelt optional rule leaves no trace in the report (its sites' rows just lack the pass)."""
    # (a Plan pickled before unmatched_optional existed has none)
    return [f"optional rule '{name}' matched nothing: it changed no site (orthofx.explain(model, policy) lists what "
            "each rule matches)" for name in getattr(plan, "unmatched_optional", ())]


#: The figures of a row that a NaN / inf weight makes NaN / inf.
_WEIGHT_FIGURES = ("lorth", "sigma_min", "sigma_max")


def _nonfinite_note(row: dict[str, Any], module: nn.Module) -> str | None:
    """The note for a row whose ``lorth`` / ``sigma_min`` / ``sigma_max`` are NaN or inf: which figures, and which of
    the measured layer's parameters hold NaN / inf entries (a training step that diverged, a checkpoint that held
    them), so that a ``nan`` in the table is not left unexplained; ``None`` when the figures are finite."""
    bad = [key for key in _WEIGHT_FIGURES if isinstance(row.get(key), float) and not math.isfinite(row[key])]
    if not bad:
        return None
    measured = module.conv if isinstance(module, FrozenConvNormNd) else _measured_layer(module)
    held = [(name, describe_nonfinite(tensor.detach())) for name, tensor in measured.named_parameters()]
    held = [f"{name} holds {what}" for name, what in held if what is not None]
    weight = None if held else _weight_values(measured)  # an orthofx layer builds it: once
    if held:
        cause = (f"the layer's {first_few(held, 3)}; load finite weights, or restart training from a finite "
                 "checkpoint with a smaller learning rate")
    elif weight is not None and describe_nonfinite(weight) is not None:
        cause = "the weight the layer computes from its finite parameters holds NaN / inf entries"
    else:
        cause = "the weight's entries are too large for these figures to be finite in float64"
    values = ", ".join(f"{key} {_fmt(row[key])}" for key in bad)
    return f"{row['site']}: {values}, because {cause}"


def _probed_layer(root: nn.Module, site) -> nn.Module | None:
    """The conv / linear layer that a JacobianProbe at the module or block site ``site`` wraps (a jacobian_isometry
    rule naming one layer), whose row then has the layer's figures; None for a probe of a larger block or any other
    site."""
    if site.kind == "function":
        return None
    try:
        module = root.get_submodule(site.name)
    except AttributeError:
        return None
    block = module._block if isinstance(module, JacobianProbe) else None
    return block if isinstance(block, _CONV_TYPES + _LINEAR_TYPES) else None


def _needs_input_size(module: nn.Module) -> bool:
    """Whether a row's sigma_min / sigma_max need the input size seen: a conv's circular operator depends on the
    grid (a linear's does not; a Cayley-FFT layer holds its own)."""
    measured = _measured_layer(module)
    return isinstance(measured, _CONV_TYPES + (FrozenConvNormNd,)) and not _is_full_size(measured) \
        and _weight_values(measured if not isinstance(measured, FrozenConvNormNd) else measured.conv) is not None


#: The limits on a layer's operator that :func:`_dense_singular_values` builds the dense matrix of: the smaller of
#: its numbers of inputs and outputs (the side of the Gram matrix whose eigenvalues it computes) at most
#: ``_DENSE_LIMIT``, the larger at most ``_DENSE_SIDE_LIMIT`` (the matrix: 32 MiB in float64). Measured on a
#: loaded 2-core CPU, float64: Gram + ``eigvalsh`` of 1024 x 1024 0.1 to 0.7 s (8 s at the worst load seen), of
#: 2048 x 2048 4 to 6 s where ``svdvals`` took 7 to 17 s (18 to 70 s inside a report): every flagged layer of
#: every report pays it.
_DENSE_LIMIT = 1024
_DENSE_SIDE_LIMIT = 4096


def _off_grid_sizes(changes) -> list[tuple[int, ...]]:
    """The spatial input sizes on which a pass found the site's hard layer not orthogonal (``orthogonal_conv``'s or
    ``pre_svd``'s, :class:`orthofx.passes.orthogonal_conv.OffGridLayers`; its
    Change's ``after["not_orthogonal_on_sizes"]``, or ``after["not_orthogonal_on"]``, the first of them, in a
    model transformed before the pass recorded them all: sizes not divisible by the stride,
    :func:`orthofx.passes.orthogonal_conv.orthogonal_on_grid`); empty for any other site."""
    for change in changes:
        after = change.after or {}
        sizes = after.get("not_orthogonal_on_sizes")
        if sizes is None and after.get("not_orthogonal_on") is not None:
            sizes = [after["not_orthogonal_on"]]
        if sizes:
            return [tuple(size) for size in sizes]
    return []


def _measure_off_grid(row: dict[str, Any], applied: nn.Module, measured: nn.Module, sizes: list[tuple[int, ...]],
                      spectra: dict[str, torch.Tensor]) -> str:
    """Give ``row``, that of a hard orthogonal layer on input grids ``sizes`` it is not orthogonal on
    (:func:`_off_grid_sizes`), the figures of the operator it applies on the first of them instead of the circular
    ones on the grid rounded up to the stride (which are 1: a property of the kernel, on a grid the layer never
    sees), and return the note saying so: the exact singular values from the operator's dense matrix where it is
    small (:func:`_dense_singular_values`), else none. ``applied``: the module at the site (an orthogonal layer, or
    the plain conv / pad + conv it froze into), whose padding the operator has; ``measured``: the conv whose
    weight, stride and dilation the row is about."""
    weight = _weight_values(measured)
    stride = tuple(measured.stride)
    size = sizes[0]
    named = grids_text(sizes)
    where = (f"the example's {named}, {'which is' if len(sizes) == 1 else 'which are'} not divisible by its stride "
             f"{per_dimension_text(stride)} (the construction is exact on "
             "grids divisible by the stride)")
    remedy = "use inputs divisible by the stride at this layer, or pad them"
    values = None if weight is None else _dense_singular_values(applied, measured, weight, size, row['site'])
    spectra.pop(row["site"], None)
    if not isinstance(values, torch.Tensor):
        row["sigma_min"] = row["sigma_max"] = None
        why = "" if values is None else f", and {values}"
        return (f"{row['site']}: no sigma_min / sigma_max: the layer is not orthogonal on {where}{why} (the circular "
                f"figures on a grid divisible by the stride, 1, are not this operator's); {remedy}")
    spectra[row["site"]] = values
    row["sigma_min"], row["sigma_max"] = float(values.min()), float(values.max())
    first = f", the first of the {len(sizes)}" if len(sizes) > 1 else ""
    row["layer"] += f" (figures: its operator on the {grid_text(size)} input{first}, dense)"
    return (f"{row['site']}: not orthogonal on {where}: sigma_min / sigma_max are those of the operator it applies "
            f"on the {grid_text(size)} input{first} (its dense matrix); {remedy}")


def _applied_pads(applied: nn.Module, conv: nn.Module, where: str) -> tuple[tuple[tuple[int, int], ...], bool] | None:
    """``((left, right) per spatial dimension, circular)``: how the module ``applied`` pads its input before its
    conv ``conv`` reads it without padding: an orthogonal layer's :attr:`pads` and mode, a frozen
    ``nn.Sequential(pad, conv)``'s pad module (whose conv has no padding of its own, ``to_conv``), or a plain conv's
    own padding (torch's explicit pads in a non-zeros mode); ``None`` for any other form."""
    if isinstance(applied, (OrthogonalConv1d, OrthogonalConv2d, OrthogonalConv3d)):
        return tuple(applied.pads), applied.padding_mode == "circular"
    if type(applied) is nn.Sequential and len(applied) == 2 and applied[1] is conv:
        pad = applied[0]
        if any(p for pair in conv_zero_pads(conv.padding, conv.kernel_size, conv.dilation, conv.stride)
               for p in pair):
            return None
        if isinstance(pad, CircularPad):
            return tuple(pad.pads), True
        if isinstance(pad, _FREEZE_PADS):  # torch's pad modules: F.pad's flat order, last dimension first
            return tuple(reversed(pairs(tuple(pad.padding)))), not isinstance(pad, _TORCH_ZERO_PADS)
        return None
    if applied is conv and isinstance(conv, TORCH_CONV_TYPES):
        if conv.padding_mode == "zeros":
            return conv_zero_pads(conv.padding, conv.kernel_size, conv.dilation, conv.stride), False
        return torch_mode_pads(conv, where), conv.padding_mode == "circular"
    return None


def _dense_singular_values(applied: nn.Module, conv: nn.Module, weight: torch.Tensor, size: tuple[int, ...],
                           where: str) -> torch.Tensor | str | None:
    """All singular values (descending) of the linear map the site's module ``applied`` applies to inputs
    ``(conv.in_channels, *size)``, bias left out, from its dense matrix ``A`` (one row per unit input), built
    functionally: ``conv``'s ``weight`` as float64 on the CPU (a half-precision layer measured as well: the
    operator of the weights it holds), padded as ``applied`` pads (:func:`_applied_pads`), ``F.conv{d}d`` with
    the conv's stride, dilation and groups. The module itself is not run, so none of the user's forward hooks on
    it fires and no kernel cache or probe state changes.

    The singular values are the square roots of the eigenvalues of the smaller Gram matrix (``A A^T`` or
    ``A^T A``, ``eigvalsh``, negative rounding clamped to 0): several times cheaper than an SVD of ``A``, exact to
    about ``1e-15`` relative to ``sigma_max^2`` in the squares (a singular value near 0 reads as up to ``~1e-8``).
    A text saying why not where ``A`` is larger than :data:`_DENSE_LIMIT` by :data:`_DENSE_SIDE_LIMIT`; ``None`` for a
    module of another form. ``where``: the site, for errors."""
    padding = _applied_pads(applied, conv, where)
    if padding is None:
        return None
    pads, circular = padding
    dims = len(size)
    outputs = [conv_output_length(n, pad, k, s, d)
               for n, pad, k, s, d in zip(size, pads, conv.kernel_size, conv.stride, conv.dilation)]
    inputs = conv.in_channels * math.prod(size)
    sides = sorted((inputs, conv.out_channels * math.prod(outputs)))
    if sides[0] > _DENSE_LIMIT or sides[1] > _DENSE_SIDE_LIMIT:
        return (f"its operator there, {inputs} inputs by {sides[0] + sides[1] - inputs} outputs, is too large to "
                f"measure densely (at most {_DENSE_LIMIT} of the fewer and {_DENSE_SIDE_LIMIT} of the more)")
    with torch.no_grad():
        kernel = weight.detach().to(device="cpu", dtype=torch.float64)
        unit = torch.eye(inputs, dtype=torch.float64).reshape(inputs, conv.in_channels, *size)
        unit = circular_pad(unit, pads) if circular else F.pad(unit, flat_pads(pads))
        conv_fn = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
        matrix = conv_fn(unit, kernel, None, conv.stride, 0, conv.dilation, conv.groups).reshape(inputs, -1)
        gram = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
        return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(0)


def _unsized_note(sites: list[str], examples: bool = False) -> list[str]:
    """The note for conv rows without sigma_min / sigma_max because transform recorded no input size there:
    without example inputs, pass some; with them (``examples``), they did not reach these layers."""
    if not sites:
        return []
    shown = first_few(sites, 4)
    why = ("the example inputs did not reach these layers (a branch the model did not take on them); give "
           "example inputs that run them"
           if examples else "none reached these layers (pass example_inputs=(x,) to orthofx.transform)")
    return [f"no sigma_min / sigma_max for {shown}: a conv's singular values depend on its input size, which "
            f"transform records on the example inputs, and {why}"]


def _penalty_value(root: nn.Module, term) -> float | None:
    """A penalty term's value; ``None`` when its layer has no values yet (a lazy layer that has not run, weights
    on the meta device), as the layer rows then have no figures."""
    if lazy_site_module(root, term) is not None:
        return None
    value = term.value(root)
    return None if value.is_meta else float(value)


def _measured_layer(module: nn.Module) -> nn.Module:
    """The layer whose weight a row measures: a ConvNorm wrapper's own conv (the weight its regularisers penalise
    and its retractions move; ConvNorm's rescaling is not a parameter), any other module itself."""
    return module.conv if isinstance(module, ConvNormConvNd) else module


#: The pads that ``orthofx.freeze`` puts before a conv without padding (``OrthogonalConv2d.to_conv``).
_TORCH_ZERO_PADS = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d)
_FREEZE_PADS = (nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d, *_TORCH_ZERO_PADS, CircularPad)


def _frozen_conv(module: nn.Module) -> nn.Module | None:
    """The plain conv of a frozen orthogonal layer whose frozen form is not one conv (``to_conv()``, what
    ``orthofx.freeze`` puts at the layer's site; the row of a frozen model's site measures it), else None:

    * ``nn.Sequential(pad, nn.Conv{d}d(padding=0))`` for asymmetric pads (``"same"`` with an even kernel) or
      circular pads of 2 or more (a wide or dilated kernel): the pad then the conv is the circular conv with the
      conv's kernel on the site's input grid (the row's operator), or with zero pads its usual surrogate;
    * ``_FrozenConvTranspose`` (``nn.ConvTranspose{d}d(padding=0)``, then ``CircularFold``): the adjoint of the
      circular conv with the transposed conv's weight, the operator a transposed conv's row measures.

    Their rows then have the figures of the layer before freezing (the same weight, stride and grid)."""
    if isinstance(module, _FrozenConvTranspose):
        return module[0]
    if type(module) is nn.Sequential and len(module) == 2 and isinstance(module[0], _FREEZE_PADS) \
            and isinstance(module[1], TORCH_CONV_TYPES):
        return module[1]
    return None


def _fourier_row(site: str, module: FourierConv, pass_text: str | None, params: str | None,
                 spectra: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The row of a frozen ``method="cayley_fft"`` layer (:class:`~orthofx.nn.orthogonal.FourierConv`), with the
    figures of the layer before freezing: its operator is the circular conv whose per-frequency matrices are the
    buffer ``symbol``, on the rfft half spectrum of the ``input_size / stride`` grid, so its singular values are
    those of the matrices, each counted for the frequencies it stands for (``metrics.rfftn_counts``: a frequency and
    its conjugate have the same ones). ``lorth`` stays empty, as on the unfrozen row (a full-size kernel)."""
    with torch.no_grad():
        symbol = torch.view_as_complex(module.symbol.detach().to(torch.float64).contiguous())  # (g, F, M, C S^d)
        grid = tuple(n // s for n, s in zip(module.input_size, module.stride))
        values = torch.linalg.svdvals(symbol).repeat_interleave(metrics.rfftn_counts(grid).to(symbol.device), dim=1)
        values = values.flatten()
    spectra[site] = values.sort(descending=True).values
    return {"site": site, "layer": describe_module(module), "pass": pass_text, "params": params, "lorth": None,
            "sigma_min": float(values.min()), "sigma_max": float(values.max()), "input": module.input_size,
            "exists": _FULL_SIZE_EXISTS}


def _reported_module(root: nn.Module, site: str, module: nn.Module) -> nn.Module:
    """The module a site's row is about: ``module``, the one at ``site``, except for the ``conv`` of a frozen
    ConvNorm layer (the site ``<name>.conv`` of a model written with ConvNorm layers, then frozen), which runs at
    stride 1 on the layer's FFT grid, one part of the layer's operator: the frozen layer itself."""
    owner = _convnorm_owning(root, site)
    if isinstance(owner, FrozenConvNormNd) and owner.conv is module:
        return owner
    return module


def _convnorm_owning(root: nn.Module, site: str) -> nn.Module | None:
    """The ConvNorm wrapper, frozen or not, whose ``conv`` the site ``<wrapper>.conv`` is; ``None`` for any other
    site."""
    parent, _, child = site.rpartition(".")
    if child != "conv" or not parent:
        return None
    try:
        owner = root.get_submodule(parent)
    except AttributeError:
        return None
    return owner if isinstance(owner, (ConvNormConvNd, FrozenConvNormNd)) else None


def _input_shape(root: nn.Module, site: str, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    """The input shape recorded at ``site``; for the conv a ConvNorm wrapper owns, frozen or not (which the wrapper
    runs through the functional conv, so it records none), the wrapper's: the conv's input is the wrapper's."""
    shape = shapes.get(site)
    if shape is None and _convnorm_owning(root, site) is not None:
        return shapes.get(site.rpartition(".")[0])
    return shape


def _layer_row(site: str, module: nn.Module, pass_text: str | None, params: str | None,
               shape: tuple[int, ...] | None, spectra: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A module's row (figures for conv / linear layers only, for a ConvNorm wrapper those of its conv and for a
    frozen one those of conv + ConvNorm, at the input ``shape`` when it is known); its singular values go into
    ``spectra`` under ``site``."""
    if isinstance(module, FrozenConvNormNd):
        return _frozen_convnorm_row(site, module, pass_text, params, shape, spectra)
    measured = _measured_layer(module)
    operator = isinstance(measured, _CONV_TYPES + _LINEAR_TYPES)
    values = layer_singular_values(measured, shape) if operator else None
    if values is not None and values.numel():
        spectra[site] = values
    dims = len(measured.kernel_size) if isinstance(measured, _CONV_TYPES) else 0
    layer = describe_module(module)
    if measured is not module and operator:
        layer += " (figures: its conv, without ConvNorm)"
    recurrent_lorth = _recurrent_lorth(measured)
    if recurrent_lorth is not None:
        layer += " (lorth: hidden-to-hidden weights, per gate block)"
    return {
        "site": site,
        "layer": layer,
        "pass": pass_text,
        "params": params,
        "lorth": _lorth(measured) if operator else recurrent_lorth,
        "sigma_min": float(values.min()) if values is not None and values.numel() else None,
        "sigma_max": float(values.max()) if values is not None and values.numel() else None,
        "input": tuple(shape[-dims:]) if shape is not None and dims else None,
        "exists": _existence(measured) if operator else "",
    }


def _frozen_convnorm_row(site: str, frozen: FrozenConvNormNd, pass_text: str | None, params: str | None,
                         shape: tuple[int, ...] | None, spectra: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The row of a frozen ConvNorm layer (``orthofx.freeze``'s form of a ConvNorm wrapper): the figures of the
    linear operator it applies, conv + ConvNorm (+ affine; bias excluded), circular as for every row.

    Nothing of it is trained any more, so the row measures what the layer does rather than its conv's weight (the
    unfrozen row's figures). ``sigma_min`` / ``sigma_max``: :func:`_frozen_convnorm_kernel`'s operator. ``lorth``:
    for a one-tap layer without affine part, which is a plain conv with per-channel scaled weights, that conv's;
    none otherwise (the operator's kernel spans its whole grid, where L_orth does not apply, as for Cayley-FFT
    layers). ``exists``: Theorem 4 for the layer's architecture, as on the unfrozen row."""
    dims = len(frozen.kernel_size)
    plain_conv = frozen._scaled_conv and frozen.affine is None  # the conv it holds is the whole operator
    operator = _frozen_convnorm_kernel(frozen, shape)
    values, note = None, ""
    if isinstance(operator, str):
        note = f" (no figures: {operator})"
    elif operator is not None:
        kernel, grid = operator
        values = metrics.conv_singular_values(kernel, grid, stride=tuple(frozen.stride), groups=frozen.groups)
        spectra[site] = values
        parts = "conv + ConvNorm" + (" + affine" if frozen.affine is not None else "")
        where = "" if frozen._scaled_conv else f", circular on its FFT grid {'x'.join(map(str, grid))}"
        note = f" (figures: {parts}{where})"
    has_values = values is not None and bool(values.numel())
    return {
        "site": site,
        "layer": describe_module(frozen) + note,
        "pass": pass_text,
        "params": params,
        "lorth": _lorth(frozen.conv) if plain_conv and _weight_values(frozen.conv) is not None else None,
        "sigma_min": float(values.min()) if has_values else None,
        "sigma_max": float(values.max()) if has_values else None,
        "input": tuple(shape[-dims:]) if shape is not None and len(shape) >= dims else None,
        "exists": _conv_existence(frozen, transposed=False),
    }


def _frozen_convnorm_kernel(frozen: FrozenConvNormNd, shape: tuple[int, ...] | None
                            ) -> tuple[torch.Tensor, tuple[int, ...]] | str | None:
    """``(kernel, grid)``: the circular conv (at the layer's stride and groups) that a frozen ConvNorm layer
    applies to inputs of ``shape``, in float64, bias excluded; a text saying why there is none; ``None`` without
    a weight or an input shape.

    Filtered form (a k-tap kernel ``K``): on the FFT grid ``L`` of the input size the layer computes
    ``f' = IFFT(V . FFT(K * x))`` and keeps every ``S``-th position, a stride-``S`` circular conv with the kernel
    ``K' = IFFT(FFT(K_D) V)`` (``V`` real: filtering after the correlation is correlating with the filtered
    kernel); it needs ``S`` to divide ``L``. One-tap form: its own conv (scaled weights) on the input grid rounded
    up to the stride, as other conv rows. An affine depthwise conv ``A`` after it acts on the output grid, ``S``
    taps of the input grid apart: ``K'' = K' conv A_S`` (``A`` dilated by ``S``), per output channel; its
    "same" offset shifts outputs only."""
    weight = _weight_values(frozen.conv)
    dims = len(frozen.kernel_size)
    if weight is None or shape is None or len(shape) < dims:
        return None
    stride = tuple(frozen.stride)
    kernel = metrics.dilated_kernel(weight.to(torch.float64), frozen.dilation)
    if frozen._scaled_conv:  # V is a constant per channel, folded into the conv's weights
        grid, v = _grid(shape, dims, stride), None
    else:
        size = tuple(shape[-dims:])
        if frozen.pre_pads:  # a non-zero padding mode pads first, as the layer's forward does
            size = tuple(n + a + b for n, (a, b) in zip(size, frozen.pre_pads))
        grid = convnorm_geometry(size, frozen.kernel_size, stride, frozen.geometry_padding, frozen.dilation).grid
        v = frozen.filter_for(grid)
        if v is None:
            return f"no ConvNorm filter for the input size {tuple(shape[-dims:])}"
        if any(n % s for n, s in zip(grid, stride)):
            return (f"its FFT grid {'x'.join(map(str, grid))} is not a multiple of the stride "
                    f"{'x'.join(map(str, stride))}, so the strided operator is no circular conv")
    if v is None and frozen.affine is None:
        return kernel, grid
    axes = tuple(range(2, 2 + dims))
    spectrum = torch.fft.rfftn(_periodic(kernel, grid), s=grid, dim=axes)
    if v is not None:
        spectrum = spectrum * v.to(device=spectrum.device, dtype=torch.float64).unsqueeze(1)
    if frozen.affine is not None:
        taps = metrics.dilated_kernel(frozen.affine.weight.detach().to(torch.float64), stride)  # (M, 1, ...)
        spectrum = spectrum * torch.fft.rfftn(_periodic(taps, grid), s=grid, dim=axes)
    return torch.fft.irfftn(spectrum, s=grid, dim=axes), grid


def _periodic(kernel: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """``kernel`` ``(M, C, k_1, ...)`` as a kernel of exactly the ``grid``'s size with the same circular operator:
    tap ``t`` added at ``t mod n`` (zeros beyond a smaller kernel; an FFT of size ``n`` would cut a larger one)."""
    for axis, n in enumerate(grid, start=2):
        moved = kernel.movedim(axis, -1)
        folds = -(-moved.shape[-1] // n)
        moved = torch.nn.functional.pad(moved, (0, folds * n - moved.shape[-1]))
        kernel = moved.reshape(*moved.shape[:-1], folds, n).sum(-2).movedim(-1, axis)
    return kernel


#: ``Report.capture`` of a model that ``orthofx.transform`` did not return.
_NOT_TRANSFORMED = {"mode": "none", "leaf_fallbacks": [], "warnings": [],
                    "summary": "none: not transformed; the orthofx.nn layers and conv / linear layers of the model "
                               "as written (not run: sigma only where a layer knows its input size)"}


def _reported_modules(root: nn.Module, parts: list[str] = ()) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of every conv / linear layer and orthofx layer of a model as written, not those nested
    in an orthofx layer (its row stands for them), except in a JacobianProbe, whose children are its block's
    (same paths: the probe is transparent), nor those at or below the paths ``parts`` (transformed parts, whose
    own reports give their rows)."""
    found, outer = [], []
    for name, module in root.named_modules():
        if any(not o or name.startswith(o + ".") for o in outer) or any(module_path_within(name, p) for p in parts):
            continue
        if is_orthofx_layer(module) and not isinstance(module, JacobianProbe):
            outer.append(name)
        if is_orthofx_layer(module) or isinstance(module, _CONV_TYPES + _LINEAR_TYPES):
            found.append((name, module))
    return found


def _layers_report(model: nn.Module) -> Report:
    """The report of a model holding orthofx layers that ``orthofx.transform`` did not return: one row per module
    of :func:`_reported_modules` (:func:`_module_rows`), monitors' kappa figures, the probes' penalty terms.
    Nothing runs the model: a layer's input size is known only when it holds one (``cayley_fft``'s
    ``input_size``)."""
    root = holding_orthofx_layers(model)
    rows: list[dict[str, Any]] = []
    spectra: dict[str, torch.Tensor] = {}
    conditioning: dict[str, list[float]] = {}
    penalties: list[dict[str, Any]] = []
    notes: list[str] = []
    for name, module in _reported_modules(root):
        rows.append(_module_row(name, module, spectra, conditioning, penalties, notes))
    return Report(rows, dict(_NOT_TRANSFORMED), spectra, penalties, None, conditioning, notes)


def _module_row(name: str, module: nn.Module, spectra: dict[str, torch.Tensor],
                conditioning: dict[str, list[float]], penalties: list[dict[str, Any]],
                notes: list[str]) -> dict[str, Any]:
    """The row of a module of a model as written (:func:`_reported_modules`): pass ``"orthofx layer"`` for
    orthofx's, None for torch's; no params; a probe's row measures its block when that is a conv / linear, and its
    penalty term goes into ``penalties``; a monitor's kappa history into ``conditioning``; why figures are NaN /
    inf into ``notes`` (:func:`_nonfinite_note`)."""
    probe = module if isinstance(module, JacobianProbe) else None
    measured = module if probe is None else probe._block
    size = getattr(measured, "input_size", None)
    row = _layer_row(name, measured, "orthofx layer" if is_orthofx_layer(module) else None, None,
                     tuple(size) if isinstance(size, tuple) else None, spectra)
    note = _nonfinite_note(row, measured)
    if note is not None:
        notes.append(note)
    if probe is not None:
        row["layer"] = f"JacobianProbe({row['layer']})"
        value = 0.0 if probe.estimate is None else float(probe.estimate.detach())
        penalties.append({"site": name, "rule": "JacobianProbe", "weight": probe.penalty_weight, "value": value,
                          "weighted": probe.penalty_weight * value, "every": 1})
    if isinstance(module, ConditionMonitor):
        row.update(_monitor_figures(module))
        conditioning[name] = module.history
    return row


def _parts_report(model: nn.Module, parts: list[tuple[str, nn.Module]]) -> Report:
    """The report of a model holding the transformed ``parts`` (:func:`orthofx.penalty.transformed_parts`) that
    ``orthofx.transform`` did not return: each part's report (:func:`_transformed_report`) with its sites, spectra,
    kappa histories and penalty sites prefixed with the part's path (:func:`orthofx.penalty.part_site_path`, as
    ``penalty_terms`` keys are), its notes, leaf fallbacks and warnings too; the modules outside the parts as
    :func:`_layers_report` reports them (:func:`_module_row`). Rows in module order (a part's rows at its place),
    penalty terms in ``penalty_terms``' order: the parts', then the probes outside them."""
    root = unwrap_model(model)
    order = {name: i for i, (name, _) in enumerate(root.named_modules())}
    placed: list[tuple[int, list[dict[str, Any]]]] = []  # (module order, rows)
    spectra: dict[str, torch.Tensor] = {}
    conditioning: dict[str, list[float]] = {}
    penalties: list[dict[str, Any]] = []
    notes: list[str] = []
    capture = {"mode": "parts", "leaf_fallbacks": [], "warnings": [], "summary": ""}
    summaries = []
    for path, part in parts:
        sub = _transformed_report(part)
        placed.append((order[path], [dict(row, site=part_site_path(path, row["site"])) for row in sub.rows]))
        spectra.update({part_site_path(path, site): values for site, values in sub.spectra.items()})
        conditioning.update({part_site_path(path, site): history for site, history in sub.conditioning.items()})
        penalties += [dict(term, site=part_site_path(path, term["site"])) for term in sub.penalties]
        notes += [f"{path}: {note}" for note in sub.notes]
        capture["leaf_fallbacks"] += [(part_site_path(path, leaf), reason)
                                      for leaf, reason in sub.capture["leaf_fallbacks"]]
        capture["warnings"] += [f"{path}: {warning}" for warning in sub.capture["warnings"]]
        summaries.append(f"{path} ({sub.capture['summary']})")
    for name, module in _reported_modules(root, [path for path, _ in parts]):
        placed.append((order[name], [_module_row(name, module, spectra, conditioning, penalties, notes)]))
    capture["summary"] = (f"parts: not transformed itself; transformed parts {', '.join(summaries)}; the layers "
                          "outside them as written (not run)")
    rows = [row for _, block in sorted(placed, key=lambda item: item[0]) for row in block]
    return Report(rows, capture, spectra, penalties, None, conditioning, notes)


def monitors(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{site: figures}`` for every condition-number monitor in a transformed model (also through
    ``torch.compile`` / DataParallel / DDP wrappers), in the order of the manifest's Changes; for a model written
    with ``orthofx.nn`` layers that ``transform`` did not return, ``{module path: figures}`` of every
    :class:`~orthofx.nn.ConditionMonitor` it holds (a ``DecompositionMonitor`` included), in module order (none:
    ``{}``, as for a transformed model without monitors; a model holding no orthofx layer raises
    :class:`~orthofx.OrthofxError`, as :func:`report` does). For a model holding transformed models (parts): their
    monitors, keyed ``<part path>.<site>``, and the ConditionMonitors outside them.

    The figures are :meth:`ConditionMonitor.summary`'s: ``kappa`` (latest ``lambda_max / lambda_min``),
    ``kappa_max``, ``updates``, ``nan_events``, ``inf_events``, plus ``monitor``, the submodule's name (so
    ``model.get_submodule(figures["monitor"]).history`` gives the kappa history). A frozen model has none.
    It shares its lookup (``_monitor_of``: the Change's ``after["monitor"]`` name) with :func:`report`'s kappa
    columns. (It replaces ``orthofx.passes.svd_conditioning.monitors``: passes sit below the manifest lookup.)

    Example::

        import orthofx
        from orthofx.report import monitors
        x = orthofx.models.example_input("gcp_cnn", batch=4)
        gm = orthofx.transform(orthofx.models.get("gcp_cnn"), "svd", example_inputs=(x,))
        monitors(gm)   # {'cov_pool:linalg.eigh': {'kappa': 61.6, ..., 'monitor': 'orthofx_monitor_0'}}
    """
    if not is_transformed(model):
        parts = transformed_parts(model)
        return _parts_monitors(model, parts) if parts else _held_monitors(model)
    root = unwrap_model(model)
    changes: dict[str, list] = {}
    for change in manifest_of(model).changes:
        changes.setdefault(change.site, []).append(change)
    found: dict[str, dict[str, Any]] = {}
    for site, site_changes in changes.items():
        name, monitor = _monitor_of(root, site_changes)
        if monitor is not None:
            found[site] = dict(monitor.summary(), monitor=name)
    return found


def _held_monitors(model: nn.Module) -> dict[str, dict[str, Any]]:
    """:func:`monitors` of a model that ``orthofx.transform`` did not return: every ConditionMonitor among its
    modules (nested in other layers too: a monitor is found by its type, not by a manifest), keyed by its path."""
    root = holding_orthofx_layers(model)
    return {name: dict(module.summary(), monitor=name) for name, module in root.named_modules()
            if isinstance(module, ConditionMonitor)}


def _parts_monitors(model: nn.Module, parts: list[tuple[str, nn.Module]]) -> dict[str, dict[str, Any]]:
    """:func:`monitors` of a model holding the transformed ``parts``: each part's, keyed by its site with the
    part's path in front (``figures["monitor"]`` too), then the ConditionMonitors outside the parts by path."""
    found: dict[str, dict[str, Any]] = {}
    for path, part in parts:
        found.update({part_site_path(path, site): dict(figures, monitor=part_site_path(path, figures["monitor"]))
                      for site, figures in monitors(part).items()})
    found.update({name: dict(module.summary(), monitor=name) for name, module in unwrap_model(model).named_modules()
                  if isinstance(module, ConditionMonitor) and not any(module_path_within(name, p) for p, _ in parts)})
    return found


# ``orthofx.report`` is the function above (the package re-exports it over this module's name), so the lookup is
# reachable as ``orthofx.report.monitors(gm)`` as well as ``from orthofx.report import monitors``.
report.monitors = monitors


def _monitor_of(root: nn.Module, changes) -> tuple[str | None, ConditionMonitor | None]:
    """``(name, module)`` of the condition-number monitor a site's Changes name in ``after["monitor"]`` (looked up
    on the transformed model); ``(None, None)`` when no Change names one or it is gone, e.g. replaced by a
    pass-through in a frozen model."""
    for change in changes:
        name = (change.after or {}).get("monitor")
        if not isinstance(name, str) or not name:
            continue
        try:
            module = root.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(module, ConditionMonitor):
            return name, module
    return None, None


def _monitor_figures(monitor: ConditionMonitor) -> dict[str, Any]:
    """The monitor's summary, with ``kappa`` / ``kappa_max`` None before its first call."""
    figures = monitor.summary()
    if not figures["updates"]:
        figures["kappa"] = figures["kappa_max"] = None
    return figures


def _pass_text(entries, changes, skipped_reason) -> str | None:
    """The passes applied at a site, each with the verdict its Change recorded (hard / regularised / skipped)."""
    parts = []
    for entry in entries:
        statuses = [c.status for c in changes if c.pass_name == entry.pass_name and c.status]
        parts.append(f"{entry.pass_name} ({statuses[0]})" if statuses else entry.pass_name)
    if not parts and skipped_reason:
        return f"skipped: {skipped_reason}"
    return "; ".join(parts) or None


def _params(entries) -> str | None:
    if not entries:
        return None
    return "; ".join(", ".join(f"{k}={v}" for k, v in e.params.items()) for e in entries)
