"""Pass ``convnorm``: put ConvNorm (P3) after convolutions.

Each selected ``Conv1d`` / ``Conv2d`` / ``Conv3d`` is replaced, under the *same qualified name*, by a
:class:`orthofx.nn.convnorm.ConvNormConv2d` (or ``1d`` / ``3d``) that owns the conv as its child ``conv`` and
computes conv + per-channel Fourier normalisation in one forward (see :mod:`orthofx.nn.convnorm` for the exact
formulation: the FFT grid follows the layer's padding, stride and dilation, ``V`` comes from the detached
weight, the conv's bias is added after the normalisation). The graph itself is unchanged: its ``call_module``
node keeps its target and now calls the wrapper. Consequences:

* the conv's state_dict keys move from ``<name>.weight`` / ``<name>.bias`` to ``<name>.conv.weight`` /
  ``<name>.conv.bias`` (plus ``<name>.affine.*`` with ``affine: true``);
* the wrapper exposes the conv's ``weight``, ``bias``, ``stride``, ``groups`` ... as read-only properties, so
  regularisers attached to ``<name>`` by other passes (``orth_regularizer``) keep working in either order;
* a second ConvNorm on an already wrapped conv is refused (the inner ``<name>.conv`` is a Conv2d site of the
  transformed model; ``accepts`` says why).

Supported: any padding / padding mode, stride, dilation, groups, ``1 x k`` kernels. Not supported: transposed
convolutions, lazy convolutions that have not run yet, and conv subclasses whose class overrides ``forward`` or
``_conv_forward`` (skipped with the reason: the wrapper convolves with the weight itself and would drop that code;
capture traces through an overridden ``forward`` anyway unless ``capture.leaf_modules`` lists the class).

Parameters: ``eps`` (> 0, default 1e-5), ``affine`` (default false: no learned depthwise affine part),
``momentum`` (default null). By default eval mode recomputes ``V`` from the weight (the wrapper's
``momentum=None``), so train and eval agree exactly; ``momentum: m`` in (0, 1] gives P3's running statistics
instead: each training forward updates a running filter of its input size, ``running <- (1 - m) running + m V``,
which eval uses (``V`` of the weight for a size never seen in training; at most 16 sizes per layer, see
:mod:`orthofx.nn.convnorm`). The running filters are state: saved in the state dict (with the order of their
updates), frozen by ``orthofx.freeze``, averaged for an EMA copy by ``orthofx.nn.update_running_filters``.
``orthofx.freeze`` replaces each wrapper by a :class:`orthofx.nn.convnorm.FrozenConvNormNd` (a plain conv with the
same weights and the filter ``V`` precomputed for every input size the layer ran on, the example inputs
included): the same eval outputs, no FFT of the weight at inference, and a clear error for an input size not
seen before freezing (see :mod:`orthofx.nn.convnorm`, "Freezing"); a 1 x 1 conv freezes into itself with
per-channel scaled weights, for every input size.

The :class:`~orthofx.passes.Change` recorded per conv has ``before`` / ``after`` with the layer, its weight's
state_dict key and, when example inputs gave the layer's input size, the FFT grid and the range of the
per-channel, per-frequency gains ``sqrt(sum_c |K_hat_{m,c}(w)|^2)`` (``row_gain_min`` / ``row_gain_max``) of the
circular operator on that grid, which ConvNorm brings to ~1 (with zero padding the layer's own operator is
normalised only approximately; see :mod:`orthofx.nn.convnorm`).

Example::

    import torch, orthofx, orthofx.passes.convnorm
    model = orthofx.models.get("resnet18", width=8)
    gm = orthofx.transform(model, "convnorm", example_inputs=(torch.randn(2, 3, 32, 32),))
"""

from __future__ import annotations

import math

from torch import nn

from ..nn.convnorm import WRAPPED_MARKER, ConvNormConvNd, overridden_conv_code, with_convnorm
from .base import TORCH_CONV_TYPES, Change, Param, Pass, PassContext, PlanEntry, describe_module, require_initialised
from .registry import register_pass

__all__ = ["ConvNormPass"]



def _normalised_gain(gain: float, eps: float) -> float:
    """A channel gain ``g`` after ConvNorm: ``sqrt(g^2 / (g^2 + eps))`` (float64 arithmetic)."""
    g2 = gain * gain
    return math.sqrt(g2 / (g2 + eps))


def _gain_figures(layer: ConvNormConvNd, input_shape) -> tuple[dict, dict]:
    """Grid and the range of channel gains before / after the normalisation, for the recorded input size. The
    normalised gain is increasing in the gain, so its range is that of the gains' extremes: the power spectrum is
    reduced to its minimum and maximum once, not mapped through square roots and casts on the whole grid. The
    layer keeps the filter made from the same power (:meth:`~orthofx.nn.convnorm.ConvNormConvNd.gain_range`):
    ``transform``'s eval run on the example inputs, next, uses it instead of transforming the weight again."""
    d = layer.conv.weight.ndim - 2
    if input_shape is None or len(input_shape) < d + 1:
        return {}, {}
    geo, low, high = layer.gain_range(tuple(input_shape)[-d:])
    grid = list(geo.grid)
    return ({"grid": grid, "row_gain_min": low, "row_gain_max": high},
            {"grid": grid, "row_gain_min": _normalised_gain(low, layer.eps),
             "row_gain_max": _normalised_gain(high, layer.eps)})


@register_pass
class ConvNormPass(Pass):
    """ConvNorm after Conv1d/Conv2d/Conv3d layers: the conv is replaced by a ConvNorm wrapper of the same name."""

    name = "convnorm"
    params = (
        Param("eps", 1e-5, (float,), "added to sum_c |K_hat|^2 before the inverse square root", minimum=0.0,
              exclusive_minimum=True),
        Param("affine", False, (bool,), "add the learned depthwise-conv affine part (identity at start)"),
        Param("momentum", None, (float, type(None)), "P3's running filters for eval, running <- (1 - m) running + "
              "m V per input size (null: eval recomputes V from the weight)", minimum=0.0, exclusive_minimum=True,
              maximum=1.0),
    )
    site_kinds = frozenset({"module"})
    module_types = TORCH_CONV_TYPES
    group = "convnorm"
    complex_weights = "normalises real convolutions only"
    replaces_module = True
    needs_original_module = True
    wraps_original_module = True  # the wrapper calls the conv itself: a parametrized weight stays computed

    def accepts(self, site, module):
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            return (f"ConvNorm normalises a convolution's output channels; {type(module).__name__} (transposed) "
                    "is not supported")
        reason = super().accepts(site, module)
        if reason is not None:
            return reason
        if getattr(module, WRAPPED_MARKER, False):
            return f"{site.name} already belongs to a ConvNorm layer"
        if not site.name:
            return "ConvNorm cannot replace the root module"
        # the wrapper refuses such a layer: skipped here, not failing in apply after the passes before it ran
        problem = None if module is None else overridden_conv_code(module)
        if problem is not None:
            return (f"{problem}; make a change of the kernel a torch parametrization of the weight "
                    "(ConvNorm reads it at every forward), or leave the layer without ConvNorm")
        return None

    def apply(self, ctx: PassContext, entries: list[PlanEntry]) -> None:
        for entry in entries:
            name = entry.site.name
            conv = ctx.module(name)
            require_initialised(entry, conv, "ConvNorm has no weight to normalise by")
            layer = with_convnorm(conv, eps=entry.params["eps"], affine=entry.params["affine"],
                                  momentum=entry.params["momentum"])
            ctx.replace_module(name, layer)
            before = {"layer": describe_module(conv), "weight_key": f"{name}.weight"}
            after = {"layer": f"{type(layer).__name__}({describe_module(conv)})", "weight_key": f"{name}.conv.weight"}
            figures_before, figures_after = _gain_figures(layer, ctx.manifest.input_shapes.get(name))
            before.update(figures_before)
            after.update(figures_after)
            ctx.record(Change(site=name, rule=entry.rule_name, pass_name=self.name,
                              what="inserted ConvNorm (per-channel Fourier normalisation) after the convolution",
                              params=dict(entry.params), before=before, after=after))
