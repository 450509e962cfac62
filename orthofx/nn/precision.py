"""Autocast queries shared by orthofx's layers, decompositions, metrics and penalty.

``torch.is_autocast_enabled(device_type)`` raises for a device type autocast does not know (``meta``, on which
a model is built or inspected without values): :func:`autocast_enabled` answers ``False`` there instead.
:func:`autocast_off` is the context in which orthofx computes what half precision cannot resolve (an orthogonal
kernel, the small defect ``W^T W - I`` a penalty measures) inside a user's ``torch.autocast`` block.

Example::

    import torch
    from orthofx.nn.precision import autocast_enabled

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_enabled("cpu")
    assert not autocast_enabled("meta")
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["HALF_PRECISION", "autocast_enabled", "autocast_off"]

#: The half-precision floating dtypes: what orthofx computes in float32 at least (bfloat16 keeps 8 bits, float16
#: overflows past 65504, and torch has no half-precision QR, SVD or eigh on the CPU).
HALF_PRECISION = (torch.float16, torch.bfloat16)


def autocast_enabled(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type`` (``False`` for a type autocast does not know)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def autocast_off(reference: torch.Tensor):
    """``torch.autocast`` turned off for ``reference``'s device where it is on, so that what runs inside keeps the
    dtypes it is given (autocast would run float32 matrix products in bfloat16 / float16); a null context
    otherwise (a trace outside autocast then records no switch)."""
    device_type = reference.device.type
    if autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()
