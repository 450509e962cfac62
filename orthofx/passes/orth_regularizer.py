"""Pass ``orth_regularizer``: attach P0's L_orth regulariser to convolutions and linears.

For a convolution with kernel K (M out, C in channels, stride S) the term is P0's Definition 1,

    L_orth(K) = || conv(K, K, padding P, stride S) - I_r0 ||_F^2            (row-orthogonal case, M <= C S^d)
    L_orth(K) = || conv(K, K, padding P, stride S) - I_r0 ||_F^2 - (M - C S^d)   (column-orthogonal case)

with P = floor((k - 1) / S) * S (not the padding 1 of the widely copied OCNN code, which misses shifts of +-2
and measures nothing at stride 2). It is zero exactly when the convolution is orthogonal, and by P0's Theorem 7
``N^d * L_orth`` is the squared Frobenius orthogonality error of the layer on an N-grid. Grouped convolutions
are penalised per group, Conv1d, Conv2d and Conv3d alike. A dilated convolution gets the L_orth of the
undilated kernel it applies (taps D apart, zeros between; along stride-1 dimensions the dilation changes nothing),
and a transposed convolution (ConvTranspose1d/2d/3d) that of the convolution with its weight, whose adjoint it
is (the same singular values; its RO case is the transposed layer's CO case). A Linear layer with weight W
(out x in) gets ||W W^T - I||_F^2 when out <= in and ||W^T W - I||_F^2 otherwise.

The graph is not changed: the pass records a :class:`LorthTerm` per layer, and ``orthofx.penalty(gm)`` returns
``sum(weight * L_orth)`` over all terms, differentiable with respect to the layers' weights.

Example::

    import torch, orthofx
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
    gm = orthofx.transform(model, {"rules": [{"match": {"type": "Conv2d"}, "apply": "orth_regularizer",
                                              "with": {"weight": 0.1}}]})
    loss = gm(torch.randn(2, 3, 8, 8)).square().mean() + orthofx.penalty(gm)
    loss.backward()
"""

from __future__ import annotations

import torch
from torch import nn

from .. import metrics, theory
from ..errors import ArgumentError
from .base import Change, Param, Pass, PassContext, PenaltyTerm, PlanEntry, whole
from .registry import register_pass

__all__ = ["OrthRegularizer", "LorthTerm", "lorth_term"]


_TRANSPOSED_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) + _TRANSPOSED_TYPES


class LorthTerm(PenaltyTerm):
    """L_orth of the weight of the module at ``site`` (a Linear, Conv or ConvTranspose layer)."""

    def __init__(self, site: str, rule: str, weight: float, stride: int | tuple[int, ...] = 1, groups: int = 1,
                 case: str | None = None, dilation: int | tuple[int, ...] = 1):
        super().__init__(site, rule, weight)
        self.stride = stride
        self.groups = groups
        self.case = case
        self.dilation = dilation

    def value(self, root: nn.Module) -> torch.Tensor:
        layer_weight = whole(root.get_submodule(self.site).weight,  # FSDP2 shards: gathered, differentiably
                             f"site '{self.site}' (rule '{self.rule}'): the L_orth penalty")
        return metrics.lorth(layer_weight, stride=self.stride, groups=self.groups, case=self.case,
                             dilation=self.dilation)

    def form(self) -> tuple:
        return (self.stride, self.groups, self.case, self.dilation)


def lorth_term(module: nn.Module, site: str, rule: str, weight: float, case: str | None = None) -> LorthTerm:
    """The L_orth penalty term of ``module`` at ``site``; ``case`` ("RO" / "CO") is the layer's own. A transposed
    conv is the adjoint of the conv with its weight (the same singular values): its term is that conv's L_orth,
    with RO and CO swapped. ``ArgumentError`` (a ``ValueError``) for other layer types."""
    if isinstance(module, nn.Linear):
        return LorthTerm(site, rule, weight, case=case)
    # conv-like by what it has (a layer a pass installed in place of a conv, e.g. ConvNorm's, qualifies too)
    if not all(hasattr(module, a) for a in ("stride", "groups", "dilation")) or getattr(module, "weight", None) is None:
        raise ArgumentError(f"L_orth is defined for Linear, Conv1d/2d/3d and ConvTranspose1d/2d/3d layers, not "
                            f"{type(module).__name__} ('{site}')")
    if isinstance(module, _TRANSPOSED_TYPES) and case is not None:
        case = theory.adjoint_case(case)
    return LorthTerm(site, rule, weight, stride=tuple(module.stride), groups=module.groups, case=case,
                     dilation=tuple(module.dilation))


@register_pass
class OrthRegularizer(Pass):
    """Soft orthogonality: P0's L_orth for Conv1d/2d/3d and ConvTranspose1d/2d/3d (per group, dilated ones through
    their undilated equivalent kernel), ||WW^T - I||_F^2 for Linear."""

    name = "orth_regularizer"
    params = (
        Param("weight", 0.01, (float,), "multiplier of the term in orthofx.penalty (P0: 1e-2 .. 1e-1 on CIFAR-10)",
              minimum=0.0),
        Param("case", "auto", (str,), "RO (row orthogonal), CO (column orthogonal) or auto (by the shapes)",
              choices=("auto", "RO", "CO")),
    )
    site_kinds = frozenset({"module"})
    module_types = _LAYER_TYPES
    group = "weight"

    def accepts(self, site, module):
        reason = super().accepts(site, module)
        if reason is not None:
            return reason
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and not isinstance(weight, nn.parameter.UninitializedParameter) \
                and weight.numel() == 0:
            # a layer with zero inputs or outputs: no operator to make orthogonal (penalty() would refuse it)
            return f"its weight is empty (shape {tuple(weight.shape)}): L_orth has nothing to measure"
        return None

    def apply(self, ctx: PassContext, entries: list[PlanEntry]) -> None:
        for entry in entries:
            case = None if entry.params["case"] == "auto" else entry.params["case"]
            term = lorth_term(ctx.module(entry.site), entry.site.name, entry.rule_name, entry.params["weight"],
                              case=case)
            # No L_orth value is computed here: on wide layers it costs as much as a training step's penalty,
            # and orthofx.report computes it when asked.
            shared = ctx.add_penalty(term)
            what = ("attached L_orth regulariser" if shared is None else
                    f"L_orth of this weight is already attached at {shared} (tied weight: counted once)")
            ctx.record(Change(site=entry.site.name, rule=entry.rule_name, pass_name=self.name, what=what,
                              params=dict(entry.params)))
