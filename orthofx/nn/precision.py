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
import math

import torch
from torch import nn

__all__ = ["HALF_PRECISION", "autocast_conv_dtype", "autocast_enabled", "autocast_off", "describe_nonfinite",
           "relative_distance", "zero_like_parameters"]

#: The half-precision floating dtypes: what orthofx computes in float32 at least (bfloat16 keeps 8 bits, float16
#: overflows past 65504, and torch has no half-precision QR, SVD or eigh on the CPU).
HALF_PRECISION = (torch.float16, torch.bfloat16)


def autocast_enabled(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type`` (``False`` for a type autocast does not know)."""
    if torch.compiler.is_compiling():
        # torch 2.11's dynamo cannot trace is_autocast_available (a graph break, so fullgraph compiles of every
        # orthogonal layer and penalty failed); a compiled graph runs on a device autocast knows
        return torch.is_autocast_enabled(device_type)
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def autocast_off(reference: torch.Tensor):
    """``torch.autocast`` turned off for ``reference``'s device where it is on, so that what runs inside keeps the
    dtypes it is given (autocast would run float32 matrix products in bfloat16 / float16); a null context
    otherwise (a trace outside autocast then records no switch)."""
    device_type = reference.device.type
    if autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def autocast_conv_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``nn.Conv{d}d`` returns for the input ``x``: autocast's dtype where ``torch.autocast`` is on for
    ``x``'s device and casts ``x`` (a float32 or half-precision input: autocast leaves float64 alone), ``x.dtype``
    otherwise. For a conv-like layer whose computation is no autocast op (an FFT): it computes in float32 and
    rounds its output once to this dtype, so that it returns what a conv in its place would.

    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     autocast_conv_dtype(torch.ones(2)), autocast_conv_dtype(torch.ones(2, dtype=torch.float64))
    (torch.bfloat16, torch.float64)
    >>> autocast_conv_dtype(torch.ones(2))
    torch.float32
    """
    device_type = x.device.type
    if x.is_floating_point() and x.dtype != torch.float64 and autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _peak(x: torch.Tensor) -> float:
    """``max |x|`` as a float (0 for an empty ``x``; NaN where ``x`` holds one): one pass of ``aminmax``, the same
    number as ``x.abs().amax()`` without its full-size temporary."""
    if not x.numel():
        return 0.0
    low, high = torch.aminmax(x)
    return float(torch.maximum(low.abs(), high.abs()))  # abs: +0 for an all -0 x; maximum keeps a NaN


def _scaled_norm(x: torch.Tensor, inplace: bool = False) -> tuple[float, float]:
    """``||x||_F`` as ``(peak, norm of x / peak)`` in float64, ``peak = max |x|``: the plain float64 norm squares
    the entries, which overflows beyond ~1e154 (a float64 kernel of 1e200 gave inf / inf = NaN) and underflows
    below ~1e-154 (a kernel of 1e-200 had norm 0). ``inplace``: ``x`` is a temporary of the caller's, divided
    in place (the same numbers; a fresh kernel-sized float64 buffer cost more than the arithmetic)."""
    peak = _peak(x)
    if peak == 0.0 or not math.isfinite(peak):
        return peak, 1.0
    return peak, float(torch.linalg.vector_norm(x.div_(peak) if inplace else x / peak))


def relative_distance(value: torch.Tensor, reference: torch.Tensor) -> float | None:
    """``||value - reference||_F / ||reference||_F`` in float64 with norms scaled by the largest entry (so entries
    of 1e200 or 1e-200 do not overflow or underflow when squared): a layer's ``init_error``, the output change
    ``transform`` and ``orthogonal_conv`` report. ``None`` where it is undefined: a zero ``reference`` (a relative
    distance to zero has no meaning), NaN or inf entries, or a ratio beyond the float range. Complex tensors are
    measured with ``|z|^2 = re(z)^2 + im(z)^2``; the arguments are never written.

    >>> relative_distance(torch.zeros(2, dtype=torch.float64), torch.tensor([3e200, 4e200], dtype=torch.float64))
    1.0
    >>> relative_distance(torch.ones(2), torch.zeros(2)) is None
    True
    """
    # detached: a number, not a graph (a parameter's distance built one, and float() of it warned)
    value, reference = value.detach(), reference.detach()
    if value.is_complex() or reference.is_complex():
        # the Frobenius norm of a complex tensor is that of its real and imaginary parts side by side; the float64
        # cast alone dropped the imaginary parts (a distance of 0 between tensors differing only there). Views
        # of an argument that was complex128 already: never written below (value64 is value)
        value, reference = (torch.view_as_real(t.to(torch.complex128).resolve_conj()) for t in (value, reference))
    value64, reference64 = value.to(torch.float64), reference.to(torch.float64)
    peak = _peak(reference64)
    if peak == 0.0 or not math.isfinite(peak):
        return None
    # the float64 copies made here are reused in place (a 512-channel 3 x 3 kernel's distance took 3.5x as long
    # with a fresh buffer per step); an argument that was float64 already is never written
    owned = value64 is not value and value64.shape == torch.broadcast_shapes(value64.shape, reference64.shape)
    gap_peak, gap_norm = _scaled_norm(value64.sub_(reference64) if owned else value64 - reference64, inplace=True)
    norm = float(torch.linalg.vector_norm(reference64.div_(peak) if reference64 is not reference
                                          else reference64 / peak))
    ratio = (gap_peak / peak) * (gap_norm / norm)
    return ratio if math.isfinite(ratio) else None


def describe_nonfinite(tensor: torch.Tensor) -> str | None:
    """How many entries of ``tensor`` are NaN and how many inf, e.g. ``"1 NaN and 2 inf entries (of 36)"``, for the
    errors that refuse such a weight; ``None`` when every entry is finite (or the tensor has no values: meta).

    >>> describe_nonfinite(torch.tensor([1.0, float("nan"), float("inf"), -float("inf")]))
    '1 NaN and 2 inf entries (of 4)'
    >>> describe_nonfinite(torch.ones(3)) is None
    True
    """
    if tensor.is_meta or not (tensor.is_floating_point() or tensor.is_complex()):
        return None
    if tensor.is_floating_point() and tensor.element_size() == 1:
        # float8: torch's sum and isfinite refuse most of them on the CPU (and isfinite called float8_e8m0fnu's
        # NaN finite); float32 holds every float8 value, NaN and inf as they are
        tensor = tensor.float()
    if bool(torch.isfinite(tensor.sum())):
        # a NaN or inf entry makes the sum NaN or inf, so a finite sum clears every entry in one reduction (no
        # full-size boolean mask); a sum that overflows from finite entries falls through to the count below
        return None
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return None
    nan = int(torch.isnan(tensor).sum())
    inf = tensor.numel() - int(finite.sum()) - nan
    counts = " and ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "inf")) if n)
    return f"{counts} {'entry' if nan + inf == 1 else 'entries'} (of {tensor.numel()})"


def zero_like_parameters(module: nn.Module) -> torch.Tensor:
    """A 0-dim zero in the dtype and on the device of ``module``'s first floating-point parameter (or buffer);
    float32 on the default device when it has none. An absent penalty term is this zero, so that adding it to a
    task loss changes neither the loss's dtype nor its device."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return torch.zeros((), dtype=tensor.dtype, device=tensor.device)
    return torch.zeros(())
