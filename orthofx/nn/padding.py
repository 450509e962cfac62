"""Circular padding with a cheap backward, shared by the orthogonal layers and ConvNorm.

:func:`circular_pad` gives the values of ``F.pad(x, ..., mode="circular")``; its backward folds the padded strips
back onto the entries they copy (slices and adds), where torch's own circular-pad backward costs 4-5x as much on
CPU. Modules that call it from a forward that symbolic tracing enters register the name with
``torch.fx.wrap("circular_pad")`` at their own module level (``fx.wrap`` patches the caller's globals).

Example::

    import torch
    from orthofx.nn.padding import circular_pad
    x = torch.arange(4.0).reshape(1, 1, 4)
    circular_pad(x, [(1, 2)])          # tensor([[[3., 0., 1., 2., 3., 0., 1.]]])
"""

from __future__ import annotations

import operator
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from orthofx.errors import LayerArgumentError

__all__ = ["CircularFold", "CircularPad", "circular_fold", "circular_pad", "conv_mode_pads", "conv_zero_pads",
           "flat_pads", "one_element_same_dilation", "pairs", "per_dimension", "periodic_pad", "sizes_per_dimension",
           "stale_mode_pads", "torch_mode_pads"]


def conv_zero_pads(padding, kernel_size: Sequence[int], dilation: Sequence[int],
                   stride: Sequence[int] = ()) -> tuple[tuple[int, int], ...]:
    """``(left, right)`` zeros per spatial dimension of a torch conv's ``padding``: an int, one int per dimension,
    ``"valid"`` (none) or ``"same"`` (``D (k - 1)`` zeros, the smaller half in front, as torch splits them).

    >>> conv_zero_pads("same", (4, 3), (1, 2))
    ((1, 2), (2, 2))
    """
    d = len(kernel_size)
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * d
        if padding == "same":
            stride = per_dimension(stride, d, "stride") if stride not in ((), []) else (1,) * d  # () not given
            if any(s != 1 for s in stride):
                raise LayerArgumentError(f"padding='same' needs stride 1 (as for torch's convolutions), got "
                                         f"stride={tuple(stride)}; give the padding as numbers")
            dilation = per_dimension(dilation, d, "dilation")
            return tuple((D * (k - 1) // 2, D * (k - 1) - D * (k - 1) // 2) for k, D in zip(kernel_size, dilation))
        raise LayerArgumentError(f"padding must be an int, a tuple, 'same' or 'valid', got {padding!r}")

    def integer(value):  # any integer torch takes (numpy's too), not a bool
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)

    try:
        pads = per_dimension(padding, d, "padding", item=integer, error=TypeError)
    except TypeError:
        raise LayerArgumentError(f"padding must be an int or {d} ints, got {padding!r}") from None
    if any(v < 0 for v in pads):
        raise LayerArgumentError(f"padding must be non-negative, got {padding!r}")
    return tuple((v, v) for v in pads)


def conv_mode_pads(padding, kernel_size: Sequence[int], dilation, stride=()) -> tuple[tuple[int, int], ...]:
    """``(left, right)`` per spatial dimension by which an ``nn.Conv{d}d`` with a ``padding_mode`` other than
    ``"zeros"`` pads its input before convolving with no padding (torch's ``_reversed_padding_repeated_twice``):
    those of :func:`conv_zero_pads`, except for ``padding="same"`` with a one-element ``dilation`` on a conv of
    two or more dimensions. torch keeps ``dilation=(2,)`` as given and its conv applies it to every dimension, but
    the module zips it with the kernel size to size the explicit pads, so it pads the first spatial dimension only:
    ``nn.Conv2d(4, 4, 3, padding="same", dilation=(2,), padding_mode="reflect")`` maps 8 x 8 to 8 x 4. With
    ``padding_mode="zeros"`` the conv's own ``"same"`` pads every dimension (:func:`conv_zero_pads`).

    >>> conv_mode_pads("same", (3, 3), (2,)), conv_mode_pads("same", (3, 3), 2)
    (((2, 2), (0, 0)), ((2, 2), (2, 2)))
    """
    pads = conv_zero_pads(padding, kernel_size, dilation, stride)
    if isinstance(padding, str) and padding == "same" and isinstance(dilation, (tuple, list)) and len(dilation) == 1:
        pads = pads[:1] + ((0, 0),) * (len(pads) - 1)
    return pads


def torch_mode_pads(conv: nn.Module, where: str) -> tuple[tuple[int, int], ...]:
    """``(left, right)`` per spatial dimension by which the conv module ``conv`` (padding mode other than
    ``"zeros"``) pads its input: exactly torch's, read from ``_reversed_padding_repeated_twice``, the list
    ``nn.Conv`` builds once in its constructor and hands to ``F.pad``. Its ``padding`` attribute is not read again:
    ``conv.padding = (2, 2)`` set later leaves the pads of the constructor's padding, and ``padding=(1,)`` on a
    ``Conv2d`` gives 2 entries, which ``F.pad`` refuses for a 4-d input. Derived from ``conv.padding``
    (:func:`conv_mode_pads`), ConvNorm ran where the conv itself cannot, or gave another output size. A module
    without the list (not an ``nn.Conv``) has the pads of its attributes. ``where`` names the layer in errors.

    >>> torch_mode_pads(nn.Conv2d(1, 1, 3, padding=(1, 2), padding_mode="reflect"), "conv")
    ((1, 1), (2, 2))
    """
    d = len(tuple(conv.kernel_size))
    flat = getattr(conv, "_reversed_padding_repeated_twice", None)
    if flat is None:
        return conv_mode_pads(conv.padding, conv.kernel_size, conv.dilation, conv.stride)
    flat = [int(v) for v in flat]
    # entries past the spatial ones pad the channels (then the batch): torch's conv runs only where they are 0
    if len(flat) < 2 * d or any(flat[2 * d:]):
        padding = conv.padding
        example = tuple(padding) * d if isinstance(padding, (tuple, list)) and len(padding) == 1 else (1,) * d
        raise LayerArgumentError(
            f"{where}: padding={conv.padding!r} with padding_mode={conv.padding_mode!r} gives torch's explicit pads "
            f"{flat} (F.pad's order, last dimension first), not 2 per spatial dimension ({2 * d} entries for a "
            f"{d}-d conv); torch's own layer cannot run with it either (F.pad refuses the list or pads the "
            f"channels). Build the conv with one padding per spatial dimension (padding={example} or an int): "
            f"nn.Conv computes these pads in its constructor, so setting conv.padding later does not change them")
    return tuple((flat[2 * i], flat[2 * i + 1]) for i in reversed(range(d)))


def stale_mode_pads(conv: nn.Module) -> str | None:
    """Why the ``padding`` of ``conv`` (an ``nn.Conv{d}d`` in a non-zeros padding mode) is not what its layer
    pads by, or ``None``: torch pads by the list its constructor computed (:func:`torch_mode_pads`), so a padding
    set later, or one F.pad cannot take, is not the conv it reads as. Layers rebuilt from ``conv.padding`` (an
    orthogonal layer) refuse with this text, which names the fix."""
    if getattr(conv, "padding_mode", "zeros") == "zeros" or not hasattr(conv, "_reversed_padding_repeated_twice"):
        return None
    try:
        actual = torch_mode_pads(conv, type(conv).__name__)
    except LayerArgumentError as error:
        return str(error)
    try:
        read = conv_mode_pads(conv.padding, conv.kernel_size, conv.dilation)
    except LayerArgumentError:
        read = None
    if read == actual:
        return None
    return (f"padding={conv.padding!r} with padding_mode={conv.padding_mode!r}, but torch's layer pads by "
            f"{[tuple(p) for p in actual]} (left, right) per spatial dimension, the pads its constructor computed "
            f"(a padding set after construction does not change them); build the conv with the padding wanted")


def one_element_same_dilation(conv: nn.Module) -> str | None:
    """Why ``conv`` (an ``nn.Conv{d}d``) is not the ``"same"`` conv it reads as, or ``None``: ``padding="same"``
    with a one-element ``dilation`` and a ``padding_mode`` other than ``"zeros"`` pads its first spatial dimension
    only (:func:`conv_mode_pads`), which changes its output size wherever a later dimension has a kernel wider than
    one tap. Layers that cannot follow that geometry (an orthogonal layer's padding is all or nothing) refuse with
    this text, which names the fix."""
    d = len(tuple(conv.kernel_size))
    mode = getattr(conv, "padding_mode", "zeros")
    padding, dilation = conv.padding, conv.dilation
    if mode == "zeros" or not isinstance(padding, str) or padding != "same" \
            or not isinstance(dilation, (tuple, list)) or len(dilation) != 1 or d < 2:
        return None
    if conv_mode_pads(padding, conv.kernel_size, dilation) == conv_zero_pads(padding, conv.kernel_size, dilation):
        return None
    full = tuple(dilation) * d
    return (f"padding='same' with padding_mode={mode!r} and the one-element dilation={tuple(dilation)}: torch's "
            f"conv dilates every dimension by {dilation[0]} but pads only the first spatial one (its non-zeros "
            f"padding modes zip the dilation with the kernel size), so the layer does not keep its input size; "
            f"write dilation={full} for a 'same' conv")


def per_dimension(value, d: int, name: str, *, item: Callable[[object], int] | None = None,
                  error: type[Exception] = LayerArgumentError, expected: str | None = None,
                  broadcast: bool = True) -> tuple:
    """A conv's per-dimension size (``stride``, ``dilation``, ``padding``, ...) as ``d`` values: an int, or a tuple
    or list of ``d`` values; a one-element tuple or list applies to every dimension, as torch's convolutions take
    it (``nn.Conv2d(2, 2, 3, stride=(2,))`` keeps ``(2,)`` and strides by 2 in both dimensions), unless
    ``broadcast`` is false (``kernel_size``: ``nn.Conv2d(2, 2, (3,))`` builds a 1-d weight, which its forward
    refuses; an input size, where a one-element tuple is more likely a size cut short than a square one).

    The one reader of these sizes for orthofx.metrics, orthofx.theory and the orthogonal layers: each refused
    one-element tuples, which zipped elsewhere against a ``d``-dimensional size read one dimension only.
    ``item`` checks and converts each value (the caller's own integer check and message; unchecked without it).
    A wrong number of values raises ``error`` with ``"{name} must be {expected}, got {value!r}"``.

    >>> per_dimension((2,), 2, "stride"), per_dimension(3, 3, "dilation")
    ((2, 2), (3, 3, 3))
    """
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if len(values) == 1 and (broadcast or not isinstance(value, (tuple, list))):
        values *= d
    if len(values) != d:
        expected = f"an int or {d} ints (one per spatial dimension)" if expected is None else expected
        raise error(f"{name} must be {expected}, got {value!r}")
    return values if item is None else tuple(item(v) for v in values)


def sizes_per_dimension(kernel_size: Sequence[int], **sizes) -> tuple[tuple, ...]:
    """A conv's other sizes (``stride=``, ``dilation=``, ``padding=``, ``output_padding=``, in the order given)
    with one value per dimension of ``kernel_size`` (:func:`per_dimension`): torch keeps ``stride=(2,)`` as given,
    which zipped with a 2-d kernel size read one dimension only.

    >>> sizes_per_dimension((3, 5), stride=(2,), dilation=1)
    ((2, 2), (1, 1))
    """
    d = len(tuple(kernel_size))
    return tuple(per_dimension(value, d, name) for name, value in sizes.items())


def conv_output_length(n: int, pads: tuple[int, int], kernel: int, stride: int, dilation: int) -> int:
    """How many outputs a conv gives in one dimension from an input of length ``n`` padded by ``pads``,
    ``(left, right)``: ``floor((n + left + right - dilation (kernel - 1) - 1) / stride) + 1``, torch's formula.

    >>> conv_output_length(7, (1, 1), 3, 2, 1)
    4
    """
    left, right = pads
    return (n + left + right - dilation * (kernel - 1) - 1) // stride + 1


def flat_pads(pads: Sequence[tuple[int, int]]) -> list[int]:
    """``((l_1, r_1), ..., (l_d, r_d))`` per spatial dimension as ``F.pad`` lists them (last dimension first)."""
    flat: list[int] = []
    for l, r in reversed(pads):
        flat += [l, r]
    return flat


def _circular_fold(g: torch.Tensor, pads: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """The adjoint of circular padding: the interior of ``g`` plus each padded strip added onto the entries it
    copies (the left strip of a dimension onto its last ``l`` entries, the right strip onto its first ``r``)."""
    d = len(pads)
    for i, (l, r) in enumerate(pads):
        dim = g.dim() - d + i
        n = g.shape[dim] - l - r
        folded = g.narrow(dim, l, n).clone()
        if l:
            folded.narrow(dim, n - l, l).add_(g.narrow(dim, 0, l))
        if r:
            folded.narrow(dim, 0, r).add_(g.narrow(dim, l + n, r))
        g = folded
    return g


class _CircularPad(torch.autograd.Function):
    """Circular padding with a backward of slices and adds (:func:`_circular_fold`). Same values as
    ``F.pad(x, mode="circular")``, whose backward on CPU costs 4-5x as much (64 channels on 32 x 32, batch 64:
    19.7 vs 4.1 ms), a sixth of an orthogonal layer's training step. Forward mode and ``vmap`` are supported
    (``torch.func``: the Jacobian regulariser, ``hessian``); the backward is itself differentiable (its own
    adjoint is the padding). The pads are passed as flat integers ``l_1, r_1, ..., l_d, r_d``: ``torch.func``'s
    generated vmap rule cannot rebuild a nested tuple argument under forward mode."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, *flat):
        return F.pad(x, flat_pads(pairs(flat)), mode="circular")

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.flat = inputs[1:]

    @staticmethod
    def backward(ctx, grad):
        return (_CircularFold.apply(grad, *ctx.flat),) + (None,) * len(ctx.flat)

    @staticmethod
    def jvp(ctx, tangent, *_):  # the padding is linear: its tangent is the padded tangent
        return _CircularPad.forward(tangent, *ctx.flat)


class _CircularFold(torch.autograd.Function):
    """:func:`_circular_fold` as a differentiable operation (the backward of :class:`_CircularPad`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad, *flat):
        return _circular_fold(grad, pairs(flat))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.flat = inputs[1:]

    @staticmethod
    def backward(ctx, grad):
        return (_CircularPad.apply(grad, *ctx.flat),) + (None,) * len(ctx.flat)

    @staticmethod
    def jvp(ctx, tangent, *_):  # linear, like the padding
        return _CircularFold.forward(tangent, *ctx.flat)


def pairs(flat: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """``(l_1, r_1, ..., l_d, r_d)`` as ``((l_1, r_1), ..., (l_d, r_d))``."""
    return tuple((flat[i], flat[i + 1]) for i in range(0, len(flat), 2))


def _pad_pairs(pads, where: str, nonnegative: bool = True) -> tuple[tuple[int, int], ...]:
    """``pads`` as ``((l_1, r_1), ..., (l_d, r_d))`` of Python ints (>= 0 unless ``nonnegative`` is false: the
    caller words its own message), or a :class:`LayerArgumentError` naming ``where``. A flat list met a raw
    TypeError, a float was truncated by ``int()`` (1.5 padded 1) and a negative pad gave torch's crop-then-wrap,
    which is not the periodic extension."""
    try:
        given = [tuple(pair) for pair in pads]
        if any(len(pair) != 2 for pair in given):
            raise TypeError
    except TypeError:
        raise LayerArgumentError(f"{where}: pads must be one (left, right) pair per trailing dimension, e.g. "
                                 f"[(1, 1), (2, 0)], got {pads!r}") from None
    try:  # any integer (numpy's, a 0-d integer tensor), not a bool nor a float
        if any(isinstance(v, bool) for pair in given for v in pair):
            raise TypeError
        out = tuple((operator.index(l), operator.index(r)) for l, r in given)
    except TypeError:
        raise LayerArgumentError(f"{where}: pads must be integers, got {pads!r}") from None
    if nonnegative and any(v < 0 for pair in out for v in pair):
        raise LayerArgumentError(f"{where}: pads must be >= 0, got {out}; crop with slicing instead of a negative "
                                 "pad")
    return out


def _f_pad_takes(x: torch.Tensor, d: int) -> bool:
    """Whether ``F.pad(mode="circular")`` pads ``d`` trailing dimensions of ``x``: 1 to 3 of them, after one or
    two leading dimensions (no more, no fewer); :func:`periodic_pad` does the rest."""
    return 1 <= d <= 3 and x.dim() - d in (1, 2)


def periodic_pad(x: torch.Tensor, pads: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``x`` extended periodically by ``(left, right)`` entries per trailing dimension, for pads of any size: the
    entry at padded position ``j`` of a dimension of size ``n`` is ``x[(j - left) mod n]``. Where every pad is at
    most its dimension's size this is :func:`circular_pad`; larger pads wrap around more than once (a kernel
    wider than the map it runs on, as a 7 x 7 depthwise conv on a 2 x 2 map late in a ConvNeXt), which
    ``F.pad(mode="circular")`` refuses. An ``index_select`` per dimension (its backward sums the copies, it
    traces, exports and vmaps)."""
    return _periodic_pad_valid(x, _pad_pairs(pads, "periodic_pad"))


def _periodic_pad_valid(x: torch.Tensor, pads: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """:func:`periodic_pad` of pads that :func:`_pad_pairs` returned already (the route of
    :func:`_circular_pad_valid` for pads larger than their dimension)."""
    d = len(pads)
    if x.dim() < d:
        raise LayerArgumentError(f"periodic_pad: {d} pairs of pads for an input of shape {tuple(x.shape)}; pass at "
                                 "most one (left, right) pair per dimension")
    for i, (l, r) in enumerate(pads):
        if not (l or r):
            continue
        dim = x.dim() - d + i
        n = x.shape[dim]
        if n == 0:
            raise LayerArgumentError("periodic_pad: cannot pad an empty dimension (size 0) periodically")
        index = torch.remainder(torch.arange(-l, n + r, device=x.device), n)
        x = x.index_select(dim, index)
    return x


def circular_pad(x: torch.Tensor, pads: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``x`` padded circularly by ``(left, right)`` per trailing dimension, ``F.pad(..., mode="circular")``'s
    values, with a faster backward in eager mode (:class:`_CircularPad`). Under ``torch.compile`` and
    ``torch.export`` it is ``F.pad`` itself: dynamo does not trace an autograd.Function with a custom ``jvp``,
    and the compiler fuses the padding's backward anyway; under ``torch.jit.trace`` too (a traced
    autograd.Function is a Python call, which ``torch.jit.save`` refuses). Pads larger than their dimension (which
    ``F.pad`` refuses: "wrapping around more than once") go through :func:`periodic_pad`, in every mode, as do
    inputs without a leading (batch or channel) dimension or with more than two, and four or more padded dimensions
    (which ``F.pad``'s circular mode does not take). Pads are integers >= 0 (:class:`LayerArgumentError` otherwise)."""
    return _circular_pad_valid(x, _pad_pairs(pads, "circular_pad"))


def _circular_pad_valid(x: torch.Tensor, pads: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """:func:`circular_pad` of pads that :func:`_pad_pairs` returned already (:class:`CircularPad` checks its own
    once, at construction, not at every forward); the checks that need ``x`` are made here, with the same
    messages."""
    if x.dim() < len(pads):
        raise LayerArgumentError(f"circular_pad: {len(pads)} pairs of pads for an input of shape {tuple(x.shape)}; "
                                 "pass at most one (left, right) pair per dimension")
    if not any(l or r for l, r in pads):
        return x  # (F.pad refuses an empty pad list in circular mode)
    sizes = x.shape[x.dim() - len(pads):]
    # pads larger than their dimension, or shapes F.pad's circular mode refuses (no leading dimension, as an
    # unbatched 1-D signal; three or more leading ones; four padded dimensions): those raised NotImplementedError
    # unless some pad was larger than its dimension
    if not all(l <= n and r <= n for (l, r), n in zip(pads, sizes)) or not _f_pad_takes(x, len(pads)):
        return _periodic_pad_valid(x, pads)
    # compiled and jit-traced, plain F.pad: jit.trace records an autograd.Function as a Python call, which
    # torch.jit.save refuses ("Could not export Python function call") and the TorchScript ONNX exporter inlines
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return F.pad(x, flat_pads(pads), mode="circular")
    return _CircularPad.apply(x, *(v for pair in pads for v in pair))


# CircularPad.forward below calls it: symbolic tracing records one call (its size checks need concrete shapes)
torch.fx.wrap("_circular_pad_valid")


class _CheckedPads(nn.Module):
    """A module whose ``pads`` are checked by :func:`_pad_pairs` when set (at construction, or assigned later), so
    that its forward does not check them again at every call; the error names the class, as its constructor's
    did."""

    @property
    def pads(self) -> tuple[tuple[int, int], ...]:
        return self._pads

    @pads.setter
    def pads(self, pads: Sequence[tuple[int, int]]) -> None:
        self._pads = _pad_pairs(pads, type(self).__name__)

    def __setstate__(self, state: dict) -> None:
        if "pads" in state:  # pickled when pads was a plain attribute: the property would hide it
            state = dict(state)
            state["_pads"] = _pad_pairs(state.pop("pads"), type(self).__name__)
        super().__setstate__(state)


class CircularPad(_CheckedPads):
    """Circular padding by ``(left, right)`` per trailing spatial dimension (``pads`` in that order), of any size:
    :func:`circular_pad`, so that pads larger than the input wrap around as often as needed, where
    ``nn.CircularPad2d`` and ``nn.Conv2d(padding_mode="circular")`` raise. The padding of the plain convs
    orthogonal layers freeze into when a pad could exceed the map (``to_conv``)."""

    def __init__(self, pads: Sequence[tuple[int, int]]):
        super().__init__()
        self.pads = pads  # checked once, by the setter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _circular_pad_valid(x, self.pads)

    def extra_repr(self) -> str:
        return f"pads={self.pads}"


def circular_fold(x: torch.Tensor, pads: Sequence[tuple[int, int]]) -> torch.Tensor:
    r"""The adjoint of :func:`circular_pad` (and :func:`periodic_pad`) for pads of any size: each trailing dimension
    of size ``n + l + r`` (``(l, r)`` = ``pads`` of that dimension) folded onto ``n`` entries, entry ``j`` of the
    input added onto entry :math:`(j - l) \bmod n` of the output.

    The transposed orthogonal layers' wrap-around (:class:`orthofx.nn.OrthogonalConvTranspose2d`): a transposed
    convolution without padding writes past the ``n`` outputs on both sides, and the circular layer adds that
    overflow back modulo the grid. Where every pad is at most its dimension's ``n`` (eagerly, on the shapes
    ``F.pad``'s circular mode takes) it is
    :class:`_CircularFold`, the backward of :func:`circular_pad`, whose own backward is the circular padding (slices
    and adds both ways; autograd through the slices would build a zero tensor of the full size per strip, which
    took a third of a 64-channel decoder layer's step). Otherwise, and under ``torch.compile`` / ``torch.export`` /
    ``torch.jit.trace``, :func:`_periodic_fold`: plain ops that trace, export (ONNX too, with dynamic sizes) and
    differentiate, for pads larger than ``n`` as well (a kernel wider than a small map wraps around more than
    once).

    >>> x = torch.tensor([[[1., 2., 3., 4., 5., 6.]]])
    >>> circular_fold(x, [(1, 2)])     # n = 3: entry j goes to (j - 1) mod 3
    tensor([[[7., 9., 5.]]])
    """
    return _circular_fold_valid(x, _pad_pairs(pads, "circular_fold", nonnegative=False))


def _circular_fold_valid(x: torch.Tensor, pads: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """:func:`circular_fold` of pads that :func:`_pad_pairs` returned already (``nonnegative=False``:
    :class:`CircularFold` checks its own once, at construction); the checks that need ``x`` are made here, with the
    same messages, negative pads included."""
    d = len(pads)
    if any(l < 0 or r < 0 for l, r in pads) or x.dim() < d:
        raise LayerArgumentError(f"circular_fold: pads must be >= 0 and at most one pair per dimension of the "
                                 f"input, got pads={pads} for an input of shape {tuple(x.shape)}")
    sizes = [x.shape[x.dim() - d + i] - l - r for i, (l, r) in enumerate(pads)]
    for i, n in enumerate(sizes):
        if n < 1 and any(pads[i]):  # an empty dimension with no pads folds onto itself, as circular_pad keeps it
            raise LayerArgumentError(f"circular_fold: dimension {x.dim() - d + i} has size "
                                     f"{x.shape[x.dim() - d + i]}, not more than its pads {pads[i]}: nothing to fold "
                                     "onto")
    if not any(l or r for l, r in pads):
        return x
    # _CircularFold's backward is F.pad's circular mode: only on the shapes that takes (_f_pad_takes). Not under
    # jit.trace: torch.jit.save refused the Python call it records, and the TorchScript ONNX exporter inlined its
    # in-place adds on slices wrongly (outputs off by the size of the entries, silently)
    if (all(l <= n and r <= n for (l, r), n in zip(pads, sizes)) and _f_pad_takes(x, d)
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing()):
        return _CircularFold.apply(x, *(v for pair in pads for v in pair))
    return _periodic_fold(x, pads)


def _periodic_fold(x: torch.Tensor, pads: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """:func:`circular_fold` for pads of any size, per dimension. Pads at most ``n``: the interior plus each strip
    zero-padded to ``n`` (the left strip onto the last ``l`` entries, the right one onto the first ``r``), out of
    place. Larger pads: one zero padding to a multiple of ``n`` (``(-l) mod n`` in front, so that entry ``j`` lands
    at a position congruent to ``j - l``), a reshape to ``(m, n)`` and a sum over ``m``; with a symbolic ``n``
    (``torch.export`` with a dynamic spatial size) the reshape's size guards cannot be proved, so the common case
    avoids it."""
    d = len(pads)
    for i, (l, r) in enumerate(pads):
        if not (l or r):
            continue
        dim = x.dim() - d + i
        n = x.shape[dim] - l - r
        trailing = x.dim() - 1 - dim
        if l <= n and r <= n:
            y = x.narrow(dim, l, n)
            if l:
                y = y + F.pad(x.narrow(dim, 0, l), [0, 0] * trailing + [n - l, 0])
            if r:
                y = y + F.pad(x.narrow(dim, l + n, r), [0, 0] * trailing + [0, n - r])
            x = y
            continue
        front = (-l) % n
        back = (-(front + x.shape[dim])) % n
        x = F.pad(x, [0, 0] * trailing + [front, back])
        m = x.shape[dim] // n
        folded = x.reshape(*x.shape[:dim], m, n, *x.shape[dim + 1:]).sum(dim)
        # an integer or bool sum is int64: cast back (wrapping as the F.pad route's in-place adds do; a bool sum
        # becomes their logical or), so that both routes return x's dtype
        x = folded if folded.dtype == x.dtype else folded.to(x.dtype)
    return x


# CircularFold.forward below calls it: symbolic tracing records one call (its sizes need concrete shapes)
torch.fx.wrap("_circular_fold_valid")


class CircularFold(_CheckedPads):
    """The adjoint of circular padding by ``(left, right)`` per trailing spatial dimension (:func:`circular_fold`),
    then an optional per-channel ``bias``: what a frozen orthogonal transposed convolution applies after its plain
    ``nn.ConvTranspose{d}d`` (padding 0, no bias) to wrap the overflow around the output grid. The bias comes
    after the fold because an output entry that receives overflow would otherwise get it more than once. Pads of
    any size."""

    def __init__(self, pads: Sequence[tuple[int, int]], bias: torch.Tensor | None = None):
        super().__init__()
        self.pads = pads  # checked once, by the setter
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone())
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _circular_fold_valid(x, self.pads)
        if self.bias is not None:
            y = y + self.bias.reshape(-1, *(1,) * len(self.pads))
        return y

    def extra_repr(self) -> str:
        return f"pads={self.pads}, bias={self.bias is not None}"
