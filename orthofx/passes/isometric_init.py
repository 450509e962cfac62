"""Pass ``isometric_init``: orthogonal initialisation of Linears, delta-orthogonal initialisation of convolutions.

At transform time each selected layer's weight is overwritten (the graph is not changed):

* Linear ``(out, in)``: ``W = scale * Q`` with ``Q`` a Haar-random orthonormal matrix, orthonormal columns when
  ``out >= in`` and orthonormal rows when ``out < in`` (the convention of :mod:`orthofx.nn.stiefel`);
* Conv1d / Conv2d / Conv3d ``(out, in / groups, *kernel)``: *delta-orthogonal*: the kernel is zero except on the taps that
  read one block of ``S`` inputs per output position (``S`` the stride; one tap at stride 1), which hold
  ``scale * Q`` with ``Q`` Haar-random of shape ``(out / groups, in / groups * S^d)`` per group (rows or columns
  orthonormal by that shape). Output position ``o`` reads input ``S o - p + t d`` at tap ``t`` (padding ``p`` on
  the left, dilation ``d``), so the taps ``t = (p + j) / d``, ``j = 0 .. S - 1``, read exactly the block
  ``S o .. S o + S - 1`` when they are whole numbers inside the kernel: the centre tap for odd kernels with
  ``'same'`` padding, ``p .. p + S - 1`` for a strided conv (``d = 1``; a ResNet's 3 x 3 / 2 with padding 1 uses
  taps 1 and 2). The convolution is then the 1 x 1 map ``Q`` on the space-to-depth input, read without any padded
  value, so when it also keeps the output size ``n / S`` (``d (k - 1) + 1 - S <= 2p <= d (k - 1)``, on inputs
  divisible by ``S``) its Jacobian is exactly an isometry (``out >= in S^d``) or a co-isometry of the whole feature
  map, under zero or circular padding alike. Where the taps read only part of the block (``k < S``, a dilated
  strided conv) the layer is exact only as a co-isometry (``Q`` with orthonormal rows: P0's row-orthogonal
  case); where none reads inside it (an even kernel with a dilation under ``'same'`` padding) the centre tap
  ``(k - 1) // 2`` holds an ``(out / groups, in / groups)`` matrix. The Change's ``exact`` says whether the layer
  is exactly orthogonal on every input size divisible by ``S`` (``false`` also for padding that changes the
  output size: the layer then crops or extends the map).

``scale = gain * activation_gain(activation)``, so the layer's Jacobian spectrum at initialisation concentrates
at ``scale`` (exactly, all singular values equal to it, for Linears and the convs the Change marks ``exact``):

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

A weight tied between selected layers (``b.weight = a.weight``) is written once, at the first of them; the others
record that they share it. Where they would need different matrices (another scale, or other taps for a conv)
the transform stops with a :class:`~orthofx.errors.PlanError`: a second write would silently replace the first
layer's matrix and leave its Change describing a weight that is gone.

Each layer gets a Change with an orthogonality measure before and after (the latter of ``W / scale``, so zero up
to round-off when the layer is exactly orthogonal) and the scale: for a Linear ``orth_defect`` = ``max |W^T W - I|``
(:func:`orthofx.nn.stiefel.orthogonality_defect`, rows for wide weights); for a convolution P0's ``lorth`` at the
layer's stride (zero when the circular convolution operator is orthogonal) and ``exact``, whether the layer's own
padding keeps it so (above).

Example::

    import torch, orthofx
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU())
    policy = {"rules": [{"match": {"type": "Conv2d"}, "apply": "isometric_init", "with": {"activation": "relu"}}]}
    gm = orthofx.transform(model, policy)
    orthofx.manifest_of(gm).changes[0].after["exact"]   # True: taps 1 and 2 read each 2 x 2 block once
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .. import metrics
from ..errors import ArgumentError, PlanError
from ..nn import stiefel
from ..nn.orthogonal import keeps_output_size
from .base import Change, Param, Pass, PassContext, PlanEntry, require_initialised
from .registry import register_pass

__all__ = ["IsometricInit", "activation_gain", "delta_orthogonal_", "delta_taps", "orthogonal_"]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ACTIVATIONS = ("linear", "relu", "tanh", "abs")


def activation_gain(activation: str) -> float:
    """The weight multiplier that keeps signal norms through ``activation``: linear 1, relu sqrt(2), tanh 5/3
    (``torch.nn.init.calculate_gain``), abs 1 (it preserves norms)."""
    if activation == "abs":
        return 1.0
    if activation not in _ACTIVATIONS:
        raise ArgumentError(f"activation_gain: unknown activation {activation!r}; choose one of "
                            f"{', '.join(_ACTIVATIONS)}")
    return float(torch.nn.init.calculate_gain(activation))


def _check_weight(weight: torch.Tensor, groups: int, min_dim: int, what: str) -> None:
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() < min_dim:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ArgumentError(f"{what}: expected a floating-point weight with at least {min_dim} dimensions, got "
                            f"{getattr(weight, 'dtype', '')} {shape}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups:
        raise ArgumentError(f"{what}: groups={groups!r} must be a positive integer dividing the "
                            f"{weight.shape[0]} output channels")


def _check_scale(scale, what: str) -> None:
    # a NaN or infinite scale filled the weight with non-finite values without a word
    try:
        value = float(scale)  # a Python, numpy or 0-d tensor number
    except (TypeError, ValueError, RuntimeError):
        value = math.nan
    if isinstance(scale, (bool, str, bytes)) or not math.isfinite(value):
        raise ArgumentError(f"{what}: scale must be a finite number (the singular value of the layer), got "
                            f"{scale!r}")


def orthogonal_(weight: torch.Tensor, scale: float = 1.0, generator: torch.Generator | None = None,
                groups: int = 1) -> torch.Tensor:
    """Fill a 2-d weight (or a per-group batch after :func:`~orthofx.nn.stiefel.flatten_weight`) with ``scale``
    times a Haar-random orthonormal matrix, in place; returns ``weight``."""
    _check_weight(weight, groups, 2, "orthogonal_")
    _check_scale(scale, "orthogonal_")
    matrix = stiefel.flatten_weight(weight, groups)
    m, n = matrix.shape[-2:]
    batch = tuple(matrix.shape[:-2])
    q = stiefel.random_orthonormal(m, n, *batch, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        weight.copy_((scale * q).reshape(weight.shape).to(device=weight.device, dtype=weight.dtype))
    return weight


def delta_orthogonal_(weight: torch.Tensor, scale: float = 1.0, generator: torch.Generator | None = None,
                      groups: int = 1, taps: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """Delta-orthogonal fill of a conv weight ``(out, in / groups, *kernel)`` in place; returns ``weight``.

    ``taps``: per spatial dimension ``(first, count)``; the kernel is zero outside that block of taps, which holds
    ``scale * Q``, per group ``Q`` of shape ``(out / groups) x (in / groups * prod(count))`` (Haar-random, rows or
    columns orthonormal by shape). Default: the one tap ``(k - 1) // 2`` per dimension (:func:`delta_taps` gives
    the block that makes a strided conv orthogonal).

    >>> import torch
    >>> w = delta_orthogonal_(torch.empty(4, 4, 3, 3))
    >>> torch.allclose(w[:, :, 1, 1] @ w[:, :, 1, 1].T, torch.eye(4), atol=1e-6), float(w[:, :, 0].abs().sum())
    (True, 0.0)
    """
    _check_weight(weight, groups, 3, "delta_orthogonal_")
    _check_scale(scale, "delta_orthogonal_")
    kernel = tuple(weight.shape[2:])
    if taps is None:
        taps = tuple(((k - 1) // 2, 1) for k in kernel)
    if len(taps) != len(kernel) or any(not (0 <= a and 1 <= c and a + c <= k) for (a, c), k in zip(taps, kernel)):
        raise ArgumentError(f"delta_orthogonal_: taps={tuple(taps)} must give (first, count) inside the kernel "
                            f"{kernel} for each of its {len(kernel)} spatial dimensions")
    out, per_group = weight.shape[:2]
    counts = tuple(c for _, c in taps)
    q = stiefel.random_orthonormal(out // groups, per_group * math.prod(counts), groups, generator=generator,
                                   dtype=torch.float64)
    with torch.no_grad():
        weight.zero_()
        _tap_block(weight, taps).copy_((scale * q).reshape(out, per_group, *counts))
    return weight


def delta_taps(conv: nn.Module) -> tuple[tuple[tuple[int, int], ...], bool]:
    """The taps ``((first, count), ...)`` a delta-orthogonal init of ``conv`` fills, and whether the layer is then
    exactly orthogonal with its own padding (see the module docstring).

    Per dimension the taps ``t`` with ``0 <= t d - p < S`` read inside the block of ``S`` inputs of each output
    position, each a different input; when there are none, the centre tap (not exact). With the whole block read
    in every dimension the layer is an isometry or co-isometry by ``Q``'s shape; with part of it (``k < S``, a
    dilation) only a co-isometry, when ``Q`` has orthonormal rows (P0's row-orthogonal case)."""
    taps, whole, exact = [], True, keeps_output_size(conv)
    for i, (k, s, d) in enumerate(zip(conv.kernel_size, conv.stride, conv.dilation)):
        if isinstance(conv.padding, str):
            left = d * (k - 1) // 2 if conv.padding == "same" else 0
        else:
            left = conv.padding[i]
        first, last = -(-left // d), min((left + s - 1) // d, k - 1)
        if first > last:
            taps.append(((k - 1) // 2, 1))
            exact = False
        else:
            taps.append((first, last - first + 1))
            whole = whole and last - first + 1 == s and (d == 1 or s == 1)
    rows = conv.out_channels // conv.groups
    columns = conv.in_channels // conv.groups * math.prod(c for _, c in taps)
    return tuple(taps), exact and (whole or rows <= columns)


@register_pass
class IsometricInit(Pass):
    """Orthogonal (Linear) and delta-orthogonal (Conv1d/Conv2d/Conv3d) initialisation, scaled by ``gain`` and the
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
    module_types = (nn.Linear,) + _CONV_TYPES
    group = "init"
    needs_original_module = True

    def apply(self, ctx: PassContext, entries: list[PlanEntry]) -> None:
        generators: dict[int, torch.Generator] = {}
        initialised: dict[int, tuple] = {}  # id(weight) -> (first writer's entry, scale, layout, before)
        for entry in entries:
            params = dict(entry.params)
            seed = params["seed"]
            generator = None
            if seed is not None:
                if seed not in generators:
                    generators[seed] = torch.Generator().manual_seed(int(seed))
                generator = generators[seed]
            module = ctx.module(entry.site)
            require_initialised(entry, module, "it has no weight to initialise")
            weight = module.weight
            is_conv = isinstance(module, _CONV_TYPES)
            groups = module.groups if is_conv else 1
            scale = params["gain"] * activation_gain(params["activation"])
            taps, exact = delta_taps(module) if is_conv else (None, None)
            what = "delta-orthogonal initialisation" if is_conv else "orthogonal initialisation"
            layout = (groups, taps)  # what decides the matrix's structure besides the scale
            tied = initialised.get(id(weight))
            if tied is None:
                before = _defect(weight.detach(), module, 1.0)
                initialised[id(weight)] = (entry, scale, layout, before)
                if is_conv:
                    delta_orthogonal_(weight, scale, generator, groups, taps)
                else:
                    orthogonal_(weight, scale, generator)
            else:
                first, first_scale, first_layout, before = tied
                _check_tied(entry, first, scale, first_scale, layout, first_layout)
                what += f" (weight tied to {first.site.name}, written there)"
            if params["bias"] == "zero" and getattr(module, "bias", None) is not None:
                with torch.no_grad():
                    module.bias.zero_()
            # a delta-orthogonal kernel is zero outside its block of taps, and L_orth of the kernel is that of the
            # block at the same stride when the block is no larger than it (conv(K, K) then has only its centre
            # offset): a fraction of the full formula's cost
            written = _tap_block(weight.detach(), taps) if is_conv else weight.detach()
            shape = stiefel.flatten_weight(written, groups).shape[-2:]  # Q's shape (per group)
            after = _defect(written, module, scale)
            if is_conv:
                after["exact"] = exact
            rows = "rows" if shape[0] < shape[1] else "columns"
            ctx.record(Change(site=entry.site.name, rule=entry.rule_name, pass_name=self.name,
                              what=f"{what} (orthonormal {rows}, scale {scale:.4g})", params=params,
                              before=before, after={**after, "scale": scale}))


def _check_tied(entry: PlanEntry, first: PlanEntry, scale: float, first_scale: float, layout, first_layout) -> None:
    """Refuse a layer whose weight, tied to the already initialised ``first``'s, would need another matrix
    (``layout``: the layer's ``(groups, taps)``)."""
    if math.isclose(scale, first_scale, rel_tol=1e-12) and layout == first_layout:
        return
    differs = (f"scale {scale:.4g} (rule '{entry.rule_name}') vs {first_scale:.4g} (rule '{first.rule_name}')"
               if layout == first_layout else
               f"(groups, taps) {layout} vs {first_layout}: their groups, padding, stride or dilation differ")
    raise PlanError(f"isometric_init: {entry.site.name} shares its weight with {first.site.name}, which this pass "
                    f"initialised first, but needs another matrix ({differs}); a second write would replace "
                    f"{first.site.name}'s. Give both the same gain and activation, or untie the weights first")


def _tap_block(weight: torch.Tensor, taps: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The filled block of a delta-orthogonal kernel as a kernel of its own."""
    return weight[(slice(None), slice(None)) + tuple(slice(a, a + c) for a, c in taps)]


def _defect(weight: torch.Tensor, module: nn.Module, scale: float) -> dict[str, float | None]:
    """``{"orth_defect": max |W^T W - I|}`` of ``W / scale`` for a Linear; ``{"lorth": L_orth(K / scale)}`` (P0,
    the orthogonality measure of the convolution operator, at the layer's stride and dilation per dimension, as
    orth_regularizer and report measure it) for a conv. A block of taps (``_tap_block``) has the L_orth of the
    whole kernel it was cut from also under a dilation: the dilated kernel is the dilated block, shifted."""
    w = weight / scale
    if not isinstance(module, _CONV_TYPES):
        return {"orth_defect": float(stiefel.orthogonality_defect(w))}
    return {"lorth": float(metrics.lorth(w, stride=tuple(module.stride), groups=module.groups,
                                         dilation=tuple(module.dilation)))}
