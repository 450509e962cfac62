"""Pass ``isometric_init``: orthogonal initialisation of Linears, delta-orthogonal initialisation of convolutions.

At transform time each selected layer's weight is overwritten (the graph is not changed):

* Linear ``(out, in)``: ``W = scale * Q`` with ``Q`` a Haar-random orthonormal matrix, orthonormal columns when
  ``out >= in`` and orthonormal rows when ``out < in`` (the convention of :mod:`orthofx.nn.stiefel`);
* Conv1d / Conv2d ``(out, in / groups, *kernel)``: *delta-orthogonal*: every tap is zero except one,
  ``K[:, :, c] = scale * Q`` (per group, ``Q`` of shape ``(out / groups, in / groups)``, rows or columns
  orthonormal by that shape), at the tap ``c = (k - 1) // 2`` in each spatial dimension: the centre for odd
  kernels, and for even ones the tap that padding ``'same'`` aligns with the output position. With stride 1 and
  'same' padding (``padding = dilation * (k - 1) / 2``, zero padding is fine: the delta kernel reads no padded
  value off the centre) the convolution is exactly the 1x1 map ``Q`` applied at every position, so its Jacobian
  is an isometry (``out >= in``) or a co-isometry (``out < in``) of the whole feature map. With a stride the layer
  only subsamples that map (P0's Proposition 6: under zero padding an orthogonal conv can only be a centre tap).

``scale = gain * activation_gain(activation)``, so the layer's Jacobian spectrum at initialisation concentrates
at ``scale`` (exactly: all singular values equal it):

* ``gain`` (number > 0, default 1.0): an explicit multiplier;
* ``activation`` (``linear`` (default), ``relu``, ``tanh``, ``abs``): the activation that follows, whose standard
  gain multiplies the weight (``torch.nn.init.calculate_gain``: linear 1, relu sqrt(2), tanh 5/3; abs 1, since
  ``|x|`` preserves norms, P2). The defaults give ``scale = 1``: each linear part of the network is exactly
  isometric at initialisation.

Further parameters: ``bias`` (``zero`` (default) or ``keep``): whether biases are zeroed, as orthogonal
initialisation usually does; ``seed`` (integer or ``null``, default ``null``): with a seed the matrices come from a
private generator seeded once per pass run (one per distinct seed) and consumed in plan order, rule by rule and
in graph order within a rule (reproducible; the global RNG is left untouched); ``null`` draws from the global
RNG (so ``torch.manual_seed`` before ``transform`` also reproduces).

Each layer gets a Change with an orthogonality measure before and after (the latter of ``W / scale``, so zero up
to round-off when the layer is exactly orthogonal) and the scale: for a Linear ``orth_defect`` = ``max |W^T W - I|``
(:func:`orthofx.nn.stiefel.orthogonality_defect`, rows for wide weights); for a convolution P0's ``lorth`` at the
layer's stride, which is zero for a delta-orthogonal kernel at stride 1 (the convolution operator is orthogonal).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import metrics
from ..nn import stiefel
from .base import Change, Param, Pass, PassContext, PlanEntry
from .registry import register_pass

__all__ = ["IsometricInit", "activation_gain", "delta_orthogonal_", "orthogonal_"]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d)
_ACTIVATIONS = ("linear", "relu", "tanh", "abs")


def activation_gain(activation: str) -> float:
    """The weight multiplier that keeps signal norms through ``activation``: linear 1, relu sqrt(2), tanh 5/3
    (``torch.nn.init.calculate_gain``), abs 1 (it preserves norms)."""
    if activation == "abs":
        return 1.0
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(_ACTIVATIONS)}")
    return float(torch.nn.init.calculate_gain(activation))


def orthogonal_(weight: torch.Tensor, scale: float = 1.0, generator: torch.Generator | None = None,
                groups: int = 1) -> torch.Tensor:
    """Fill a 2-d weight (or a per-group batch after :func:`~orthofx.nn.stiefel.flatten_weight`) with ``scale``
    times a Haar-random orthonormal matrix, in place; returns ``weight``."""
    matrix = stiefel.flatten_weight(weight, groups)
    m, n = matrix.shape[-2:]
    batch = tuple(matrix.shape[:-2])
    q = stiefel.random_orthonormal(m, n, *batch, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        weight.copy_((scale * q).reshape(weight.shape).to(device=weight.device, dtype=weight.dtype))
    return weight


def delta_orthogonal_(weight: torch.Tensor, scale: float = 1.0, generator: torch.Generator | None = None,
                      groups: int = 1) -> torch.Tensor:
    """Delta-orthogonal fill of a conv weight ``(out, in / groups, *kernel)`` in place: zeros except the tap
    ``(k - 1) // 2`` of every spatial dimension, which holds ``scale * Q`` (per group ``(out / groups) x
    (in / groups)``, Haar-random, rows or columns orthonormal by shape). Returns ``weight``."""
    out, per_group = weight.shape[:2]
    if out % groups:
        raise ValueError(f"{out} output channels are not divisible by groups={groups}")
    q = stiefel.random_orthonormal(out // groups, per_group, groups, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        weight.zero_()
        weight[(slice(None), slice(None)) + _centre(weight)] = (scale * q).reshape(out, per_group).to(
            device=weight.device, dtype=weight.dtype)
    return weight


@register_pass
class IsometricInit(Pass):
    """Orthogonal (Linear) and delta-orthogonal (Conv1d/Conv2d) initialisation, scaled by ``gain`` and the
    activation's gain, so each layer's Jacobian has all singular values equal to that scale."""

    name = "isometric_init"
    params = (
        Param("gain", 1.0, (float,), "multiplier of the orthonormal weight", minimum=0.0, exclusive_minimum=True),
        Param("activation", "linear", (str,), "activation after the layer; its standard gain multiplies the "
              "weight (linear 1, relu sqrt(2), tanh 5/3, abs 1)", choices=_ACTIVATIONS),
        Param("bias", "zero", (str,), "zero the bias or keep it", choices=("zero", "keep")),
        Param("seed", None, (int, type(None)), "seed of a private generator (null: the global RNG)", minimum=0,
              maximum=2**63 - 1),  # what torch.Generator.manual_seed accepts
    )
    site_kinds = frozenset({"module"})
    module_types = (nn.Linear, nn.Conv1d, nn.Conv2d)
    group = "init"
    needs_original_module = True

    def apply(self, ctx: PassContext, entries: list[PlanEntry]) -> None:
        generators: dict[int, torch.Generator] = {}
        for entry in entries:
            params = dict(entry.params)
            seed = params["seed"]
            generator = None
            if seed is not None:
                if seed not in generators:
                    generators[seed] = torch.Generator().manual_seed(int(seed))
                generator = generators[seed]
            module = ctx.module(entry.site)
            weight = module.weight
            groups = module.groups if isinstance(module, _CONV_TYPES) else 1
            scale = params["gain"] * activation_gain(params["activation"])
            is_conv = isinstance(module, _CONV_TYPES)
            before = _defect(weight.detach(), module, 1.0)
            if is_conv:
                delta_orthogonal_(weight, scale, generator, groups)
                what = "delta-orthogonal initialisation"
                shape = (weight.shape[0] // groups, weight.shape[1])
            else:
                orthogonal_(weight, scale, generator)
                what = "orthogonal initialisation"
                shape = tuple(weight.shape)
            if params["bias"] == "zero" and getattr(module, "bias", None) is not None:
                with torch.no_grad():
                    module.bias.zero_()
            # a delta-orthogonal kernel has one non-zero tap, and L_orth of a one-tap kernel is that of the 1 x 1
            # kernel at the same stride (conv(K, K) has only its centre offset): 1 / k^d of the full formula's cost
            written = _centre_tap(weight.detach()) if is_conv else weight.detach()
            after = _defect(written, module, scale)
            rows = "rows" if shape[0] < shape[1] else "columns"
            ctx.record(Change(site=entry.site.name, rule=entry.rule_name, pass_name=self.name,
                              what=f"{what} (orthonormal {rows}, scale {scale:.4g})", params=params,
                              before=before, after={**after, "scale": scale}))


def _centre(weight: torch.Tensor) -> tuple[int, ...]:
    """The tap a delta-orthogonal fill uses: ``(k - 1) // 2`` in every spatial dimension of a conv weight."""
    return tuple((k - 1) // 2 for k in weight.shape[2:])


def _centre_tap(weight: torch.Tensor) -> torch.Tensor:
    """That tap as a one-tap (1 x 1) kernel."""
    return weight[(slice(None), slice(None)) + tuple(slice(t, t + 1) for t in _centre(weight))]


def _defect(weight: torch.Tensor, module: nn.Module, scale: float) -> dict[str, float | None]:
    """``{"orth_defect": max |W^T W - I|}`` of ``W / scale`` for a Linear; ``{"lorth": L_orth(K / scale)}`` (P0,
    the orthogonality measure of the convolution operator, at the layer's stride) for a conv, ``None`` when the
    strides differ between dimensions (L_orth assumes one stride)."""
    w = weight / scale
    if not isinstance(module, _CONV_TYPES):
        return {"orth_defect": float(stiefel.orthogonality_defect(w))}
    strides = set(module.stride)
    if len(strides) != 1:
        return {"lorth": None}
    return {"lorth": float(metrics.lorth(w, stride=strides.pop(), groups=module.groups))}
