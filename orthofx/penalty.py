"""``penalty(gm)``: the sum of every regulariser a transformed model carries, weighted per rule.

    loss = criterion(gm(x), y) + orthofx.penalty(gm)

Each pass that attaches a regulariser records a penalty term in the manifest (``gm.meta["orthofx"]``); the
penalty is ``sum_i weight_i * term_i(gm)``, differentiable with respect to the model's parameters. It works on
the result of ``torch.compile`` and on DDP/DataParallel wrappers too (the terms are evaluated on the wrapped
module's parameters, outside the compiled graph).
"""

from __future__ import annotations

import torch
from torch import nn

from .capture import unwrap_model
from .passes.base import zero_like_parameters
from .transform import manifest_of

__all__ = ["penalty", "penalty_terms"]


def penalty_terms(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each term's weighted value, keyed ``"<rule>/<site>"`` (for logging which layers dominate)."""
    root = unwrap_model(model)
    return {f"{t.rule}/{t.site}": t.weight * t.value(root) for t in manifest_of(model).penalties}


def penalty(model: nn.Module) -> torch.Tensor:
    """Sum of all weighted regularisers attached by the policy; a zero scalar (in the dtype and on the device of
    the model's parameters) when there are none or all have weight 0.

    Example::

        gm = orthofx.transform(model, "lorth")
        loss = torch.nn.functional.cross_entropy(gm(x), y) + orthofx.penalty(gm)
        loss.backward()
    """
    root = unwrap_model(model)
    weighted = [term.weight * term.value(root) for term in manifest_of(model).penalties if term.weight != 0.0]
    if not weighted:
        return zero_like_parameters(root)
    return sum(weighted[1:], weighted[0])
