"""Autocast queries shared by orthofx's layers, decompositions, metrics and penalty.

``torch.is_autocast_enabled(device_type)`` raises for a device type autocast does not know (``meta``, on which
a model is built or inspected without values): :func:`autocast_enabled` answers ``False`` there instead.

Example::

    import torch
    from orthofx.nn.precision import autocast_enabled

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_enabled("cpu")
    assert not autocast_enabled("meta")
"""

from __future__ import annotations

import torch

__all__ = ["autocast_enabled"]


def autocast_enabled(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type`` (``False`` for a type autocast does not know)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
