"""Pass ``isometric_init``: orthogonal initialisation of Linears and of recurrent layers' hidden-to-hidden weights,
delta-orthogonal initialisation of convolutions and transposed convolutions.

At transform time each selected layer's weight is overwritten (the graph is not changed):

* Linear ``(out, in)``: ``W = scale * Q`` with ``Q`` a Haar-random orthonormal matrix, orthonormal columns when
  ``out >= in`` and orthonormal rows when ``out < in`` (the convention of :mod:`orthofx.nn.stiefel`);
* Conv1d / Conv2d / Conv3d ``(out, in / groups, *kernel)``: *delta-orthogonal*: the kernel is zero except on the
  taps that read one block of ``S`` inputs per output position (``S`` the stride; one tap at stride 1), which hold
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
  case, with a square ``Q`` too); where none reads inside it (an even kernel with a dilation under ``'same'``
  padding) the centre tap ``(k - 1) // 2`` holds an ``(out / groups, in / groups)`` matrix, which reads a shifted
  input: exact under circular padding (a cyclic shift is a permutation), not under zero padding. The Change's
  ``exact`` says whether the layer is exactly orthogonal on every input size divisible by ``S`` (``false`` also for
  padding that changes the output size: the layer then crops or extends the map). A conv with more outputs than
  the inputs its taps read (``1 -> 16`` channels at stride 1) then has every output position in a subspace of that
  many dimensions; where it feeds a decomposition (``eigh`` of a whitening layer) that no ``svd_conditioning`` rule
  makes stable, the pass warns (:class:`~orthofx.errors.OrthofxWarning`): tied eigenvalues make torch's own
  backward NaN.
* ConvTranspose1d / 2d / 3d ``(in, out / groups, *kernel)``: the layer is the adjoint ``T = A^T`` of the conv
  ``A`` with the same weight tensor, stride, padding, dilation and groups (``out -> in`` channels, read on the
  layer's output), so it gets that conv's delta-orthogonal kernel: the same taps, ``Q`` of shape
  ``(in / groups, out / groups * S^d)`` per group, and the same singular values, with the sides swapped: ``Q``
  with orthonormal rows (``in <= out S^d``) makes ``T`` an isometry (``T^T T = A A^T``), orthonormal columns a
  co-isometry. On input size ``n`` the output has ``n S + e`` entries, ``e = d (k - 1) + 1 - S - 2p + o``
  (``o``: output_padding). ``T`` is an isometry on every ``n`` when the taps' reads ``S i + t d - p`` stay
  inside the output (``0 <= t d - p`` and ``t d - p < S + e``) and a co-isometry when they read every output
  entry once (the whole block, ``e <= 0``): both for the usual decoder layers ``k = 4, S = 2, p = 1``;
  ``k = 2, S = 2, p = 0``; ``k = 3, S = 1, p = 1``; ``k = 3, S = 2, p = 1, o = 1`` (``e = 0``, output
  ``n S``), whereas ``k = 3, S = 2, p = 1, o = 0`` (output ``n S - 1``) is exact only as a co-isometry. The
  Change's ``exact`` says whether it is exactly one or the other on every input size. A transposed layer whose
  weight is tied to a conv's (a tied autoencoder) with the same taps shares its matrix: the decoder is then the
  encoder's exact adjoint.

* RNN / LSTM / GRU and their cells: each hidden-to-hidden weight (``weight_hh_l<k>``, ``_reverse``; a cell's
  ``weight_hh``) stacks one ``H x H`` block per gate (4 for an LSTM, 3 for a GRU, 1 for an RNN; ``H x proj_size``
  for an LSTM with ``proj_size``), and each block gets ``scale * Q``, ``Q`` Haar-random orthonormal (the blocks
  :func:`~orthofx.passes.base.recurrent_hidden_weights` names, as the ``riemannian`` pass keeps them). For
  an ``nn.RNN`` the Jacobian of one step, ``dh_t / dh_{t-1} = diag(f'(a_t)) W_hh``, is then exactly orthogonal at
  ``a_t = 0`` (tanh or relu slope 1), so a signal neither grows nor decays over time steps there. Input-to-hidden
  weights and LSTM projections (``weight_hr``) keep their initialisation; ``bias: zero`` zeroes all the layer's
  biases. The scale is ``gain`` alone: a rule with another ``activation`` skips recurrent layers (its gain would
  compound over the time steps), and the Change's orthogonality measure is the largest ``orth_defect`` over the
  gate blocks.

``scale = gain * activation_gain(activation)``, so the layer's Jacobian spectrum at initialisation concentrates
at ``scale`` (exactly, all singular values equal to it, for Linears and the convs the Change marks ``exact``):

* ``gain`` (number > 0, default 1.0): an explicit multiplier;
* ``activation`` (``linear`` (default), ``relu``, ``tanh``, ``abs``): the activation that follows, whose standard
  gain multiplies the weight (``torch.nn.init.calculate_gain``: linear 1, relu sqrt(2), tanh 5/3; abs 1, since
  ``|x|`` preserves norms, P2). The defaults give ``scale = 1``: each linear part of the network is exactly
  isometric at initialisation. Other activations are left to ``gain`` (:func:`activation_gain` says which value
  matches ``calculate_gain`` for leaky_relu, selu, gelu).

Further parameters: ``bias`` (``zero`` (default) or ``keep``): whether biases are zeroed, as orthogonal
initialisation usually does; ``seed`` (integer or ``null``, default ``null``): with a seed the matrices come from a
private generator seeded once per pass run (one per distinct seed) and consumed in plan order, rule by rule and
in graph order within a rule (reproducible; the global RNG is left untouched); ``null`` draws from the global
RNG (so ``torch.manual_seed`` before ``transform`` also reproduces); ``frozen`` (``skip`` (default) or
``overwrite``): a layer whose weight (or, with ``bias: zero``, bias) has ``requires_grad=False`` is usually a
pretrained one kept fixed on purpose, which a broad rule should not replace with a random matrix that training
never corrects: planning skips it (``explain`` and ``report`` show ``skipped: frozen (...)``; a rule selecting
only frozen layers is a PlanError unless ``optional``), and ``overwrite`` initialises it anyway.

A weight tied between selected layers (``b.weight = a.weight``) is written once, at the first of them; the others
record that they share it. Where they would need different matrices (another scale, or other taps for a conv)
the transform stops with a :class:`~orthofx.errors.PlanError`: a second write would silently replace the first
layer's matrix and leave its Change describing a weight that is gone.

Each layer gets a Change with an orthogonality measure before and after (the latter of ``W / scale``, so zero up
to round-off when the layer is exactly orthogonal) and the scale: for a Linear ``orth_defect`` = ``max |W^T W - I|``
(:func:`orthofx.nn.stiefel.orthogonality_defect`, rows for wide weights); for a convolution P0's ``lorth`` at the
layer's stride (zero when the circular convolution operator is orthogonal; for a transposed conv that of its
adjoint conv, the same singular values) and ``exact``, whether the layer's own padding keeps it so (above). The
``what`` names the orthonormal side of the layer's Jacobian (rows: a co-isometry, columns: an isometry; a square
one says columns), which for an ``exact`` conv need not be ``Q``'s: ``Conv2d(2, 2, 1, stride=2)`` has a square ``Q``
but reads one input in four, so it is a co-isometry (rows); a conv that is not ``exact`` names ``Q``'s side.

Precision (``benchmarks/RESULTS.md``, transform latency, session 32): the Gaussian draw is that of
:func:`~orthofx.nn.stiefel.random_orthonormal`, and a float64 weight gets its matrix bit for bit; a float32 weight
takes ``Q = G R^{-1}`` from a triangular solve (``stiefel._haar_factor``), within ``2e-13`` of the Householder
``Q`` before rounding, so the same weights but for rare entries one ulp off (4 of a ResNet-50's 23.6 million).
The float32 ``lorth`` figures come from products of the kernel's taps (``metrics._tap_pairs_defect``, large
kernels) or blocks of the Gram matrix (``metrics._gram_defect_blocks``, 1 x 1): the same values to float32
rounding (``before`` within ``2e-7`` relative; ``after``, round-off of ``1e-12`` to ``4e-11`` on a ResNet-50, up to
3x the convolution's for the strided layers' 2 x 2 tap blocks, where float64 gives ``1e-13``).

Example::

    import torch, orthofx
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU())
    policy = {"rules": [{"match": {"type": "Conv2d"}, "apply": "isometric_init", "with": {"activation": "relu"}}]}
    gm = orthofx.transform(model, policy)
    orthofx.manifest_of(gm).changes[0].after["exact"]   # True: taps 1 and 2 read each 2 x 2 block once
    decoder = torch.nn.Sequential(torch.nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1), torch.nn.ReLU())
    decoder[0].weight.requires_grad_(False)              # frozen: skipped unless the rule opts in
    rules = [{"match": {"type": "ConvTranspose2d"}, "apply": "isometric_init", "with": {"frozen": "overwrite"}}]
    change = orthofx.manifest_of(orthofx.transform(decoder, {"rules": rules})).changes[0]
    change.after["exact"], change.what   # True, '... (orthonormal columns, scale 1)': 8 < 4 * 2^2: an isometry
"""

from __future__ import annotations

import math
import operator
import warnings
from typing import Any, Sequence

import torch
from torch import nn

from .. import metrics
from ..errors import ArgumentError, LayerArgumentError, OrthofxWarning, ScaleLostWarning, caller_stacklevel
from ..nn import stiefel
from ..nn.orthogonal import keeps_output_size
from ..nn.padding import conv_zero_pads, sizes_per_dimension, torch_mode_pads
from .base import (RECURRENT_TYPES, TORCH_CONV_TYPES, TORCH_TRANSPOSED_CONV_TYPES, Change, Param, Pass, PassContext,
                   PlanEntry, Site, TiedUse, check_scale_range, check_tied, decompositions_fed, derived_weight,
                   is_uninitialised, matrices_text, parameter_owners, recurrent_hidden_weights,
                   recurrent_weights_reason, require_initialised, treated_weight_names)
from .registry import register_pass
from .riemannian import StiefelHook, _describe_matrices, scale_kept_or_dropped

__all__ = ["IsometricInit", "activation_gain", "delta_orthogonal_", "delta_taps", "frozen_parameters",
           "frozen_reason", "orthogonal_"]

# Layers with a (channels, channels / groups, *kernel) weight.
_KERNEL_TYPES = TORCH_CONV_TYPES + TORCH_TRANSPOSED_CONV_TYPES
_ACTIVATIONS = ("linear", "relu", "tanh", "abs")


def activation_gain(activation: str) -> float:
    """The weight multiplier that keeps signal norms through ``activation``: linear 1, relu sqrt(2), tanh 5/3
    (``torch.nn.init.calculate_gain``'s values), abs 1 (it preserves norms; ``calculate_gain`` has no abs).

    Other activations are not offered as names; give their scale as the rule's ``gain`` (with ``activation:
    linear``):

    * leaky_relu with slope ``a``: ``calculate_gain``'s ``sqrt(2 / (1 + a^2))``, 1.4141 for torch's default
      ``a = 0.01`` (a slope-dependent value: one name could not say which slope);
    * selu: ``calculate_gain`` gives 3/4, which torch's documentation says gives up self-normalisation for
      gradient flow and advises ``linear`` (scale 1) for self-normalising networks: the default here;
    * gelu, silu: ``calculate_gain`` has none (it raises); relu's sqrt(2) is the usual stand-in.

    >>> activation_gain("relu") == torch.nn.init.calculate_gain("relu")
    True
    """
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


def _checked_taps(taps, kernel: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """``taps`` as ``((first, count), ...)`` of integers, one pair per spatial dimension of ``kernel``, each block
    inside the kernel; otherwise an :class:`ArgumentError` (a float or a bare int failed inside the slicing with a
    TypeError naming neither the argument nor the function)."""
    try:
        pairs = tuple((operator.index(first), operator.index(count)) for first, count in taps)
    except (TypeError, ValueError):
        pairs = None
    if pairs is None or len(pairs) != len(kernel) or \
            any(not (0 <= a and 1 <= c and a + c <= k) for (a, c), k in zip(pairs, kernel)):
        shown = tuple(taps) if isinstance(taps, (list, tuple)) else taps
        raise ArgumentError(f"delta_orthogonal_: taps={shown!r} must give (first, count) inside the kernel "
                            f"{kernel} for each of its {len(kernel)} spatial dimensions, as integers")
    return pairs


def orthogonal_(weight: torch.Tensor, scale: float = 1.0, generator: torch.Generator | None = None,
                groups: int = 1) -> torch.Tensor:
    """Fill a 2-d weight (or a per-group batch after :func:`~orthofx.nn.stiefel.flatten_weight`) with ``scale``
    times a Haar-random orthonormal matrix, in place; returns ``weight``."""
    _check_weight(weight, groups, 2, "orthogonal_")
    _check_scale(scale, "orthogonal_")
    metrics.check_generator(generator, "orthogonal_", "a reproducible matrix")
    matrix = stiefel.flatten_weight(weight, groups)
    m, n = matrix.shape[-2:]
    batch = tuple(matrix.shape[:-2])
    q = _scaled_haar(m, n, batch, scale, generator, weight.dtype)
    with torch.no_grad():
        weight.copy_(q.reshape(weight.shape))  # copy_ casts and moves, as .to() did, without another copy
    return weight


def _scaled_haar(m: int, n: int, batch: tuple[int, ...], scale: float, generator: torch.Generator | None,
                 dtype: torch.dtype) -> torch.Tensor:
    """``scale`` times :func:`~orthofx.nn.stiefel.random_orthonormal` ``(m, n, *batch)`` in float64 (the same
    draw and sign-fixed Q; the signs folded into the scale, one multiplication), in whatever layout the QR leaves
    it: the caller copies it into its weight of ``dtype``, where :func:`random_orthonormal`'s ``.contiguous()``
    and the cast were one more copy each. Bit for bit :func:`random_orthonormal`'s for a float64 weight; for a
    float32 one ``Q`` comes from a triangular solve (``stiefel._haar_factor``), the same matrix to about 1e-13
    before the weight's rounding."""
    # the global stream's draw is on the CPU (the weight's copy_ moves it) whatever torch's default device is: a
    # user's torch.set_default_device('meta') left it without values (geqrf failed), a 'cuda' one drew elsewhere
    q, signs = stiefel._haar_factor(m, n, *batch, generator=generator, device="cpu", rounded_to=dtype)
    q = q * (scale * signs).unsqueeze(-2)
    return q.transpose(-2, -1) if m < n else q


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
    metrics.check_generator(generator, "delta_orthogonal_", "a reproducible matrix")
    if taps is None:
        taps = tuple(((k - 1) // 2, 1) for k in kernel)
    taps = _checked_taps(taps, kernel)
    out, per_group = weight.shape[:2]
    counts = tuple(c for _, c in taps)
    q = _scaled_haar(out // groups, per_group * math.prod(counts), (groups,), scale, generator, weight.dtype)
    with torch.no_grad():
        weight.zero_()
        _tap_block(weight, taps).copy_(q.reshape(out, per_group, *counts))  # a view of q for groups=1
    return weight


def delta_taps(conv: nn.Module) -> tuple[tuple[tuple[int, int], ...], bool]:
    """The taps ``((first, count), ...)`` a delta-orthogonal init of ``conv`` (a ``Conv{d}d`` or a
    ``ConvTranspose{d}d``) fills, and whether the layer is then exactly orthogonal with its own padding (see the
    module docstring).

    Per dimension the taps ``t`` with ``0 <= t d - p < S`` read inside the block of ``S`` inputs of each output
    position, each a different input (for a transposed layer: of its adjoint conv, which has the same weight,
    stride, padding and dilation); when there are none, the centre tap. A conv is exact (on inputs divisible by
    ``S``) when it keeps the output size ``n / S`` and either reads the whole block in every dimension (an
    isometry or co-isometry by ``Q``'s shape) or ``Q`` has orthonormal rows (a co-isometry: P0's row-orthogonal
    case, also where ``k < S`` or a dilation reads part of the block); at stride 1 under circular padding whatever
    its one tap (it reads a cyclic shift of the input); a transposed layer by :func:`_transposed_exact`."""
    taps, side = _delta_layout(conv)
    return taps, side is not None


def _delta_layout(conv: nn.Module) -> tuple[tuple[tuple[int, int], ...], str | None]:
    """:func:`delta_taps`' taps, and the orthonormal side of the layer's Jacobian (:func:`_exact_side`; ``None``
    where the layer is not exact)."""
    taps, aligned = [], True
    stride, dilation = _sizes(conv, "stride", "dilation")
    lefts = [left for left, _ in _torch_pads(conv, dilation)]
    for k, s, d, left in zip(conv.kernel_size, stride, dilation, lefts):
        block = _block_taps(k, s, d, left)
        aligned = aligned and block is not None
        taps.append(block if block is not None else ((k - 1) // 2, 1))
    taps = tuple(taps)
    return taps, _exact_side(conv, taps, aligned)


def _torch_pads(conv: nn.Module, dilation: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """``(left, right)`` per spatial dimension by which torch's layer ``conv`` pads its input. In a padding mode
    other than zeros, those its constructor computed (:func:`~orthofx.nn.padding.torch_mode_pads`): a ``padding``
    set later does not change them, and ``"same"`` with a one-element dilation pads the first dimension only.
    Read from ``conv.padding``, the taps of a reflect conv built with padding 1 and then given padding 0 read its
    mirrored border, and the layer torch runs was not orthogonal (singular values 0 to 2). In zeros mode (the conv
    reads ``padding`` at every call), and where torch's list is one its layer cannot run with, ``conv.padding``."""
    if conv.padding_mode != "zeros":
        try:
            return torch_mode_pads(conv, "isometric_init")
        except LayerArgumentError:  # F.pad refuses the list: the layer fails at its first call whatever its taps
            pass
    return conv_zero_pads(conv.padding, conv.kernel_size, dilation)


def _exact_side(conv: nn.Module, taps: Sequence[tuple[int, int]], aligned: bool) -> str | None:
    """The orthonormal side of the Jacobian of ``conv`` delta-orthogonally initialised on ``taps``: ``"columns"``
    where it is an isometry (``J^T J = s^2 I``; also where it is square, both), ``"rows"`` where it is a
    co-isometry only (``J J^T = s^2 I``), ``None`` where it is neither on some input size divisible by the stride
    (:func:`delta_taps`; ``aligned``: whether taps read inside the block in every dimension).

    Not always ``Q``'s side: a square ``Q`` on taps that read part of each block (``k < S``, a dilated strided
    conv) reads every input at most once, but not every one: a co-isometry, like a transposed conv that crops
    (``Conv2d(2, 2, 1, stride=2)`` maps ``2 n^2`` inputs to ``n^2 / 2`` outputs)."""
    rows, columns = _q_shape(conv, taps)
    if getattr(conv, "transposed", False):
        isometry, coisometry = _transposed_exact(conv, taps)
    else:
        # at stride 1 under circular padding the one tap reads a cyclic shift of the input, a permutation, wherever
        # it lies (the centre tap of an even dilated kernel under 'same' padding reads outside the block)
        stride, dilation = _sizes(conv, "stride", "dilation")
        aligned = aligned or (conv.padding_mode == "circular" and all(s == 1 for s in stride))
        # the whole block of S inputs read in every dimension: J is Q on the space-to-depth input, Q's sides
        whole = aligned and all(c == s and (d == 1 or s == 1) for (_, c), s, d in zip(taps, stride, dilation))
        keeps = keeps_output_size(conv) and aligned
        isometry, coisometry = keeps and whole and rows >= columns, keeps and rows <= columns
    return "columns" if isometry else "rows" if coisometry else None


def _sizes(conv: nn.Module, *names: str) -> tuple[tuple[int, ...], ...]:
    """The conv's sizes ``names`` (``"stride"``, ``"padding"``, ...) with one value per spatial dimension
    (:func:`~orthofx.nn.padding.sizes_per_dimension`): ``delta_orthogonal_`` refused the one-dimension taps of a
    2-d kernel with ``stride=(2,)``."""
    return sizes_per_dimension(conv.kernel_size, **{name: getattr(conv, name) for name in names})


def _block_taps(k: int, s: int, d: int, left: int) -> tuple[int, int] | None:
    """``(first, count)`` of the taps ``t < k`` with ``0 <= t d - left < s``: those that read the block
    ``S o .. S o + S - 1`` of output ``o``, each a different input; ``None`` when no tap does."""
    first, last = -(-left // d), min((left + s - 1) // d, k - 1)
    return None if first > last else (first, last - first + 1)


def _q_shape(conv: nn.Module, taps: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The shape of each group's matrix ``Q`` on the filled taps: ``(out / g, in / g * prod(count))`` for a conv
    and, read through the weight layout, ``(in / g, out / g * prod(count))`` for a transposed conv (its adjoint
    conv's ``Q``)."""
    rows, columns = conv.out_channels, conv.in_channels
    if getattr(conv, "transposed", False):
        rows, columns = columns, rows
    return rows // conv.groups, columns // conv.groups * math.prod(c for _, c in taps)


def _transposed_exact(conv: nn.Module, taps: Sequence[tuple[int, int]]) -> tuple[bool, bool]:
    r"""Whether the delta-orthogonal ``ConvTranspose{d}d`` ``conv`` is an isometry, and whether it is a
    co-isometry, with all singular values equal to the scale, on every input size ``n``.

    The layer is :math:`T = A^T`, ``A`` the zero-padded conv with its weight, stride ``S``, padding ``p`` and
    dilation ``D`` on the layer's output ``y`` (size :math:`L = nS + e`, :math:`e = D(k - 1) + 1 - S - 2p + o`,
    ``o`` the output_padding), restricted to the outputs ``i < n``. Output ``i`` of ``A`` reads
    :math:`y[S i + r]` at the filled taps' offsets :math:`r = D t - p`, so :math:`A = (Q \otimes I) G` with ``G``
    a gather whose reads are distinct (the offsets lie in one block of ``S``, or there is one tap). Hence, per
    dimension and for every ``n``:

    * every read lies inside ``y`` iff :math:`0 \le r_{first}` and :math:`r_{last} < S + e`; then
      :math:`G G^T = I` and :math:`T^T T = A A^T = s^2 I` where ``Q`` has orthonormal rows
      (``in / g <= out / g * prod(count)``): an isometry;
    * every entry of ``y`` is read, once, iff the offsets are ``S`` consecutive integers (the whole block) and the
      reads :math:`[r_{first}, nS - 1 + r_{first}]` cover :math:`[0, nS + e)`: :math:`e \le r_{first} \le 0`
      (``r = 0`` and ``e = 0`` is :func:`~orthofx.nn.orthogonal.transposed_keeps_output_size`; ``e < 0``: the
      layer crops); then :math:`G^T G = I` and :math:`T T^T = A^T A = s^2 I` where ``Q`` has orthonormal columns:
      a co-isometry.

    Elsewhere an output of ``A`` reads a padded zero, or an entry of ``y`` is never written, and the random ``Q``
    gives some other singular value."""
    rows, columns = _q_shape(conv, taps)
    reads_inside, reads_all = True, True
    for (first, count), k, s, d, p, o in zip(taps, conv.kernel_size,
                                               *_sizes(conv, "stride", "dilation", "padding", "output_padding")):
        excess = d * (k - 1) + 1 - s - 2 * p + o  # the output size is n S + excess
        low, high = d * first - p, d * (first + count - 1) - p  # offsets of the first and the last filled tap
        reads_inside = reads_inside and 0 <= low and high < s + excess
        reads_all = reads_all and count == s and (d == 1 or s == 1) and excess <= low <= 0
    return rows <= columns and reads_inside, rows >= columns and reads_all


@register_pass
class IsometricInit(Pass):
    """Orthogonal (Linear; RNN/LSTM/GRU hidden-to-hidden weights, per gate) and delta-orthogonal (Conv1d/2d/3d,
    ConvTranspose1d/2d/3d) initialisation, scaled by ``gain`` and the activation's gain, so each layer's Jacobian
    has all singular values equal to that scale.
    Layers with a frozen weight are skipped unless the rule says ``frozen: overwrite``."""

    name = "isometric_init"
    params = (
        Param("gain", 1.0, (float,), "multiplier of the orthonormal weight", minimum=0.0, exclusive_minimum=True),
        Param("activation", "linear", (str,), "activation after the layer; its standard gain multiplies the "
              "weight (linear 1, relu sqrt(2), tanh 5/3, abs 1)", choices=_ACTIVATIONS),
        Param("bias", "zero", (str,), "zero the bias or keep it", choices=("zero", "keep")),
        Param("seed", None, (int, type(None)), "seed of a private generator (null: the global RNG)", minimum=0,
              maximum=2**63 - 1),  # what torch.Generator.manual_seed accepts
        Param("frozen", "skip", (str,), "a layer whose weight (or, with bias: zero, bias) has requires_grad=False: "
              "skip it (left as it is) or overwrite it", choices=("skip", "overwrite")),
    )
    site_kinds = frozenset({"module"})
    module_types = (nn.Linear,) + _KERNEL_TYPES + RECURRENT_TYPES
    group = "init"
    complex_weights = "draws real orthogonal matrices"
    needs_original_module = True

    def accepts(self, site: Site, module: nn.Module | None) -> str | None:
        reason = super().accepts(site, module)
        if reason is None and isinstance(module, RECURRENT_TYPES):
            # hidden weights a parametrization or a pre-hook computes: a write to them is lost at the next call
            return recurrent_weights_reason(module)
        return reason

    def weight_values_read(self, params: dict[str, Any]) -> str | None:
        return "measures the weight's orthogonality defect before and after writing it"

    def accepts_params(self, site: Site, module: nn.Module | None, params: dict[str, Any]) -> str | None:
        """Decline a frozen layer (:func:`frozen_parameters`) unless the rule says ``frozen: overwrite``: a weight
        with ``requires_grad=False`` is usually a pretrained one kept fixed on purpose, and a broad rule
        (``type: Conv2d``) selecting it would replace it with a random matrix that training never corrects.
        Planning then shows it as ``skipped: frozen ...``, and a later rule of the group may take it.

        Also decline a recurrent layer under an ``activation`` other than ``linear``: that gain is for the
        activation after a layer, while a hidden-to-hidden weight feeds the layer's own state back, where any
        scale above 1 compounds over the time steps."""
        if isinstance(module, RECURRENT_TYPES) and params.get("activation", "linear") != "linear":
            return (f"recurrent layer under activation: {params['activation']} (that gain would compound over the "
                    "time steps; give recurrent layers a rule of their own, with gain for any scale)")
        if module is None:
            return None
        if params.get("bias", "zero") == "zero":
            # module.bias.zero_() on a bias a parametrization or a pre-hook (pruning) computes zeroed a tensor the
            # next call recomputes: the bias was kept, and the row said it was zeroed. A recurrent layer's biases
            # are zeroed where they are parameters (a pruned one's <name>_orig: its bias is then zero), so only a
            # parametrized one is left unzeroed there
            computed = _computed_biases(module)
            if computed:
                return (f"{computed[0][1]}; zeroing it is lost at the next call: write 'bias: keep' in the rule's "
                        "'with:'")
        if params.get("frozen", "skip") == "overwrite":
            return None
        return frozen_reason(module, params.get("bias", "zero") == "zero", "initialises it")

    def check_plan(self, gm: nn.Module, entries: list[PlanEntry]) -> None:
        """Refuse, when the plan is built, a weight tied between sites that need other matrices or scales
        (:func:`_check_ties`), so that ``explain`` raises the PlanError ``transform`` would. A lazy layer that has
        not run has no shape yet: then :meth:`apply` decides."""
        modules = [gm.get_submodule(entry.site.name) for entry in entries]
        for entry, module in zip(entries, modules):
            check_scale_range(entry, module, _scale(entry.params), "scale",
                              f" (the scale is the rule's gain, {entry.params['gain']!r}, times the gain of "
                              f"activation: {entry.params['activation']})")
        if not any(is_uninitialised(m) for m in modules):
            _check_ties(entries, modules)

    def apply(self, ctx: PassContext, entries: list[PlanEntry]) -> None:
        for entry in entries:
            require_initialised(entry, ctx.module(entry.site), "it has no weight to initialise")
        # every tie is checked before any weight is written (with inplace=True the weights are the user's)
        _check_ties(entries, [ctx.module(entry.site) for entry in entries])
        generators: dict[int, torch.Generator] = {}
        initialised: dict[int, tuple] = {}  # id(weight) -> (first writer's entry, its figure before the write)
        owners = parameter_owners(ctx.gm)
        selected = {entry.site.name for entry in entries}
        for entry in entries:
            params = dict(entry.params)
            seed = params["seed"]
            generator = None
            if seed is not None:
                if seed not in generators:
                    generators[seed] = torch.Generator().manual_seed(int(seed))
                generator = generators[seed]
            module = ctx.module(entry.site)
            scale = _scale(params)
            if isinstance(module, RECURRENT_TYPES):
                self._apply_recurrent(ctx, entry, module, params, scale, generator, initialised)
                continue
            weight = module.weight
            is_conv = isinstance(module, _KERNEL_TYPES)
            transposed = isinstance(module, TORCH_TRANSPOSED_CONV_TYPES)
            groups = module.groups if is_conv else 1
            taps, side = _delta_layout(module) if is_conv else (None, None)
            what = "delta-orthogonal initialisation" if is_conv else "orthogonal initialisation"
            if transposed:
                what += " of a transposed conv"
            tied = initialised.get(id(weight))
            if tied is None:
                before = _defect(weight.detach(), module, 1.0)
                initialised[id(weight)] = (entry, before)
                if is_conv:
                    delta_orthogonal_(weight, scale, generator, groups, taps)
                else:
                    orthogonal_(weight, scale, generator)
                shared = _written_outside(entry, module, owners, selected)
            else:  # the same matrix and scale (_check_ties)
                shared = ""
                first, before = tied
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
                after["exact"] = side is not None
            # the Jacobian's orthonormal side: for an exact conv the one it has (a square Q reading part of each
            # block is a co-isometry only); else Q's for a Linear or a conv, the other one for a transposed conv
            # (T = A^T: Q Q^T = I makes T^T T = I); 'columns' for a square Q, as for a Linear
            wide = shape[0] > shape[1] if transposed else shape[0] < shape[1]
            rows = side or ("rows" if wide else "columns")
            dropped = _scale_dropped_later(ctx, entry, module, scale)
            what += f" (orthonormal {rows}, scale {scale:.4g}){dropped}{shared}"
            if is_conv and not transposed:
                what += _narrowed_before_decomposition(ctx, entry, module, taps)
            ctx.record(Change(site=entry.site.name, rule=entry.rule_name, pass_name=self.name, what=what,
                              params=params, before=before, after={**after, "scale": scale, **_lost(dropped, scale)}))

    def _apply_recurrent(self, ctx: PassContext, entry: PlanEntry, module: nn.Module, params: dict, scale: float,
                         generator: torch.Generator | None, initialised: dict[int, tuple]) -> None:
        """Each hidden-to-hidden weight of a recurrent layer gets ``scale`` times a Haar-random orthonormal block
        per gate; input weights are left as they are, biases zeroed with ``bias: zero``."""
        weights = [(name, gates, getattr(module, name)) for name, gates in recurrent_hidden_weights(module)]
        # each weight's defect before any write, kept per tensor: a weight tied to an earlier site was written there
        # already (its figure from then), and a Linear tied to one of several hidden weights reads that one's alone
        defects, tied_to = [], []
        for name, gates, weight in weights:
            tied = initialised.get(id(weight))
            if tied is None:
                defect = _gate_defect([(name, gates, weight)], 1.0)
                initialised[id(weight)] = (entry, defect)
                orthogonal_(weight, scale, generator, groups=gates)
            else:  # the same gate blocks and scale (_check_ties)
                defect = tied[1]
                tied_to.append(f"{name} tied to {tied[0].site.name}, written there")
            defects.append(defect["orth_defect"])
        before = {"orth_defect": max(defects)}
        if params["bias"] == "zero":
            with torch.no_grad():
                for name in _recurrent_bias_names(module):
                    getattr(module, name).zero_()
        dropped = _scale_dropped_later(ctx, entry, module, scale)
        what = (f"orthogonal initialisation of the hidden-to-hidden weights ({_describe_matrices(module, weights)}, "
                f"scale {scale:.4g})" + (f" ({'; '.join(tied_to)})" if tied_to else "") + dropped)
        ctx.record(Change(site=entry.site.name, rule=entry.rule_name, pass_name=self.name, what=what, params=params,
                          before=before, after={**_gate_defect(weights, scale), "scale": scale,
                                                **_lost(dropped, scale)}))


def frozen_parameters(module: nn.Module, with_bias: bool = True) -> list[str]:
    """Names of the parameters ``isometric_init`` would write that have ``requires_grad=False``: the weight (a
    recurrent layer's hidden-to-hidden weights), and the bias (biases) when ``with_bias`` (``bias: zero``). Only
    parameters registered on the layer itself: reading a weight a torch parametrization computes would run it
    (spectral_norm's power iteration updates its vectors), and planning skips such a layer anyway
    (:func:`~orthofx.passes.base.derived_weight`)."""
    names = treated_weight_names(module)
    if with_bias:
        names += _recurrent_bias_names(module) if isinstance(module, RECURRENT_TYPES) else ["bias"]
    parameters = [(name, module._parameters.get(name)) for name in names]
    return [name for name, p in parameters if p is not None and not p.requires_grad]


def frozen_reason(module: nn.Module, with_bias: bool, overwrite_does: str) -> str | None:
    """``skipped``'s reason for a layer whose weight (or, ``with_bias``, bias) has ``requires_grad=False``
    (:func:`frozen_parameters`), which a pass's ``frozen: skip`` leaves alone: ``overwrite_does`` says what
    ``frozen: overwrite`` would do (``"initialises it"``); ``None`` when nothing is frozen."""
    frozen = frozen_parameters(module, with_bias)
    if not frozen:
        return None
    return f"frozen ({' and '.join(frozen)} requires_grad=False; with: {{frozen: overwrite}} {overwrite_does})"


def _computed_biases(module: nn.Module) -> list[tuple[str, str]]:
    """``(name, why)`` for each bias of ``module`` that ``bias: zero`` cannot zero (:func:`derived_weight`): a
    layer's ``bias`` that a parametrization or a pre-hook computes, a recurrent layer's parametrized biases."""
    if not isinstance(module, RECURRENT_TYPES):
        computed = derived_weight(module, "bias")
        return [] if computed is None else [("bias", computed)]
    names = (getattr(module, "_flat_weights_names", None) if isinstance(module, nn.RNNBase)
             else ["bias_ih", "bias_hh"]) or []
    return [(name, derived_weight(module, name)) for name in names
            if name.startswith("bias_") and nn.utils.parametrize.is_parametrized(module, name)]


def _recurrent_bias_names(module: nn.Module) -> list[str]:
    """A recurrent layer's biases (``bias_ih_l0``, ``bias_hh_l0`` ..., a cell's ``bias_ih``, ``bias_hh``)."""
    return [name for name, p in module._parameters.items() if name.startswith("bias_") and p is not None]


def _scale_dropped_later(ctx: PassContext, entry: PlanEntry, module: nn.Module, scale: float) -> str:
    """Warn (:class:`~orthofx.errors.ScaleLostWarning`) when an earlier ``riemannian`` rule of the policy keeps this
    site's weight on the Stiefel manifold and ``scale`` is not 1: the first optimizer step's retraction puts every
    singular value back at 1 (the reverse order, riemannian after this pass, warns in riemannian); the note for
    the Change ('' otherwise)."""
    if math.isclose(scale, 1.0, rel_tol=1e-9):
        return ""
    # the hooks that step this site's weights (at this site, or at the site a tied weight is constrained at)
    written = {id(weight) for weight, _ in _written_matrices(module)}
    stiefel_rules = [hook.rule for hook in ctx.manifest.optimizer_hooks
                     if isinstance(hook, StiefelHook) and id(hook._weight(ctx.gm)) in written]
    if not stiefel_rules:
        return ""
    warnings.warn(
        f"isometric_init (rule '{entry.rule_name}'): '{entry.site.name}' ({type(module).__name__}): scale {scale:.4g}, "
        f"but riemannian (rule '{stiefel_rules[-1]}', earlier in the policy) keeps this weight on the Stiefel "
        f"manifold, where all singular values are 1: the first optimizer step's retraction drops the scale. "
        f"{scale_kept_or_dropped(IsometricInit.name)}", ScaleLostWarning, stacklevel=caller_stacklevel())
    return (f"; riemannian (rule '{stiefel_rules[-1]}') keeps the weight on the Stiefel manifold, so the first "
            "step's retraction drops this scale")


def _written_outside(entry: PlanEntry, module: nn.Module, owners: dict[int, list[tuple[str, nn.Module]]],
                     selected: set[str]) -> str:
    """Warn (:class:`~orthofx.errors.OrthofxWarning`) when the weight just written at ``entry``'s site is also a
    parameter of layers that no entry of this pass selects (``owners``: :func:`~orthofx.passes.base.parameter_owners`
    of the graph module), e.g. an output head tied to its embedding (``head.weight = emb.weight``): the orthogonal
    initialisation replaced their weight too, where no rule asked for it (a tied LM's ``nn.Embedding``, drawn
    N(0, 1), came back with orthonormal columns, entries ~ 1/sqrt(vocab), and nothing said so). The note for the
    Change ('' when the weight is the site's alone)."""
    others = [(name, other) for name, other in owners.get(id(module.weight), [])
              if name not in selected and other is not module]
    if not others:
        return ""
    # '<root>': a parameter the model registers on itself (F.linear(x, self.shared) beside a tied Linear)
    names = ", ".join(f"'{name or '<root>'}' ({type(other).__name__})" for name, other in others)
    warnings.warn(
        f"isometric_init (rule '{entry.rule_name}'): '{entry.site.name}' ({type(module).__name__}) shares its weight "
        f"with {names}, which no isometric_init rule initialises: the orthogonal initialisation is written there too "
        f"(one tensor). To keep their initialisation, leave this layer out of the rule (exclude: "
        f"'{entry.site.name}') or untie the weights first", OrthofxWarning,
        stacklevel=caller_stacklevel())
    return f"; written to the weight it shares with {names} too"


def _narrowed_before_decomposition(ctx: PassContext, entry: PlanEntry, conv: nn.Module,
                                   taps: Sequence[tuple[int, int]]) -> str:
    """Warn (:class:`~orthofx.errors.OrthofxWarning`) when the delta-orthogonal kernel of ``conv`` narrows the span
    of its output channels and the layer feeds a decomposition that no ``svd_conditioning`` rule makes stable; the
    note for the Change ('' otherwise).

    Each group's output at a position is ``Q`` times the ``C/g * prod(count)`` inputs its taps read, so with more
    rows than that (``M/g`` outputs, an expanding conv at stride 1) it lies in a ``C/g * prod(count)``-dimensional
    subspace, where the conv's own kernel reached ``min(M/g, C/g * prod(k))`` dimensions. An exact isometry under
    zero padding has no other taps (P0 Proposition 6), but a whitening or decomposition downstream then sees tied
    (zero) eigenvalues, and the backward of torch's ``eigh`` / ``svd`` divides by eigenvalue gaps: the built-in
    ``dbn_cnn`` (``conv1``: 1 -> 16 channels, 5 x 5, feeding a decorrelated BatchNorm) had NaN gradients at
    the first step. The stable decompositions of ``svd_conditioning`` (P4) take ties."""
    rows, columns = _q_shape(conv, taps)
    reached = min(rows, conv.in_channels // conv.groups * math.prod(conv.kernel_size))
    if rows <= columns or reached <= columns:
        return ""
    plan = ctx.manifest.plan
    stable = {e.site.name for e in plan.entries_for("svd_conditioning")} if plan is not None else set()
    fed = [site for site in decompositions_fed(ctx, entry.site.name) if site not in stable]
    if not fed:
        return ""
    g = conv.groups
    span = (f"{g * columns}-dimensional subspace of its {g * rows} channels (a kernel of its shape reaches "
            f"{g * reached})")
    warnings.warn(
        f"isometric_init (rule '{entry.rule_name}'): '{entry.site.name}' ({type(conv).__name__}, "
        f"{conv.in_channels} -> {conv.out_channels} channels) feeds {', '.join(fed)}: its delta-orthogonal kernel "
        f"puts every output position in a {span}, so the decomposition sees tied eigenvalues, where the backward of "
        f"torch's eigh / svd divides by their gaps (NaN gradients). Make the decomposition stable: add the svd "
        f"preset's rule {{match: {{op: [linalg.eigh, linalg.eigvalsh, linalg.svd, linalg.svdvals]}}, apply: "
        f"svd_conditioning}} to the policy; or leave this layer out of the rule (exclude: '{entry.site.name}')",
        OrthofxWarning, stacklevel=caller_stacklevel())
    return f"; feeds {', '.join(fed)} with outputs in a {span}"


def _lost(dropped: str, scale: float) -> dict[str, float]:
    """``{"scale_lost": scale}`` for a Change whose scale an earlier riemannian rule drops (``dropped``: the note
    of :func:`_scale_dropped_later`), as riemannian records it in the other order; ``{}`` otherwise."""
    return {"scale_lost": scale} if dropped else {}


def _scale(params: dict[str, Any]) -> float:
    """The singular value a rule gives its layers: ``gain`` times the activation's gain."""
    return params["gain"] * activation_gain(params["activation"])


def _written_matrices(module: nn.Module) -> list[tuple[torch.Tensor, tuple]]:
    """``(tensor, layout)`` for each weight the pass writes at a layer: the layout is what decides the matrices
    it is cut into besides the scale (a conv's ``(groups, taps)``, a recurrent weight's ``("gates", gates)``, a
    Linear's or one gate block's ``(1, None)``: one orthonormal matrix, so a Linear tied to an nn.RNN's hidden
    weight needs the same matrix)."""
    if isinstance(module, RECURRENT_TYPES):
        return [(getattr(module, name), ("gates", gates) if gates > 1 else (1, None))
                for name, gates in recurrent_hidden_weights(module)]
    if isinstance(module, _KERNEL_TYPES):
        return [(module.weight, (module.groups, delta_taps(module)[0]))]
    return [(module.weight, (1, None))]


def _check_ties(entries: list[PlanEntry], modules: list[nn.Module]) -> None:
    """Raise :class:`PlanError` (:func:`~orthofx.passes.base.check_tied`) for a weight that two of the ``entries``
    (at ``modules``) would write as different matrices or with different scales: the second write would replace
    the first's."""
    first_writer: dict[int, tuple[PlanEntry, TiedUse]] = {}
    for entry, module in zip(entries, modules):
        scale = _scale(entry.params)
        for weight, layout in _written_matrices(module):
            this = _tied_use(entry, scale, layout)
            first, first_use = first_writer.setdefault(id(weight), (entry, this))
            if first is entry:
                continue
            convs = "gates" not in (layout[0], first_use.layout[0])
            check_tied(
                IsometricInit.name, this, first_use, "initialised first",
                other_matrices=(", but needs another matrix ({this_matrices} vs {first_matrices}"
                                + (": their groups, padding, stride or dilation differ" if convs else "")
                                + "); a second write would replace {first}'s. Untie the weights first, or leave "
                                "one of the two layers out of the rule"),
                other_settings=(", but needs another matrix ({differs}); a second write would replace {first}'s. "
                                "Give both the same gain and activation, or untie the weights first"))


def _tied_use(entry: PlanEntry, scale: float, layout: tuple) -> TiedUse:
    """A written weight at ``entry`` (``layout``: as :func:`_written_matrices` gives it) as
    :func:`~orthofx.passes.base.check_tied` compares it with another site's: its layout and its scale. The
    matrices in words: per gate (recurrent), one matrix (a Linear, or one gate block), a conv's ``(groups, taps)``."""
    if layout[0] == "gates":
        matrices = matrices_text(layout[1], "gate blocks")
    elif layout[1] is None:
        matrices = matrices_text(1)
    else:
        matrices = f"(groups, taps) {layout}"
    shown = f"{scale:.4g} (rule '{entry.rule_name}')"
    return TiedUse(entry.site.name, entry.site.name, layout, lambda: matrices, (("scale", scale, shown),))


def _tap_block(weight: torch.Tensor, taps: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The filled block of a delta-orthogonal kernel as a kernel of its own."""
    return weight[(slice(None), slice(None)) + tuple(slice(a, a + c) for a, c in taps)]


def _gate_defect(weights: list[tuple[str, int, torch.Tensor]], scale: float) -> dict[str, float]:
    """``{"orth_defect": max |B^T B - I|}`` over the gate blocks ``B`` of ``W / scale`` for each recurrent weight
    ``(name, gates, W)`` (rows for wide blocks), in float64 as for a Linear."""
    defects = [stiefel.orthogonality_defect(stiefel.flatten_weight(w.detach().double() / scale, gates)).max()
               for _, gates, w in weights]
    return {"orth_defect": max(float(d) for d in defects)}


def _defect(weight: torch.Tensor, module: nn.Module, scale: float) -> dict[str, float | None]:
    """``{"orth_defect": max |W^T W - I|}`` of ``W / scale`` for a Linear; ``{"lorth": L_orth(K / scale)}`` (P0,
    the orthogonality measure of the convolution operator, at the layer's stride and dilation per dimension, as
    orth_regularizer and report measure it) for a conv. A block of taps (``_tap_block``) has the L_orth of the
    whole kernel it was cut from also under a dilation: the dilated kernel is the dilated block, shifted."""
    w = weight if scale == 1.0 else weight / scale  # / 1.0 changes no entry; it only copied the weight
    if not isinstance(module, _KERNEL_TYPES):
        # in float64: a float32 weight of entries ~1e30 has a Gram matrix beyond float32 (the defect was NaN)
        return {"orth_defect": float(stiefel.orthogonality_defect(w.double()))}
    options = {"stride": tuple(module.stride), "groups": module.groups, "dilation": tuple(module.dilation)}
    value = float(metrics.lorth(w, **options))
    if math.isinf(value) and w.dtype != torch.float64 and bool(torch.isfinite(w).all()):
        # past float32's range (entries beyond ~4e9 already): the float64 figure, as for a Linear
        value = float(metrics.lorth(w.double(), **options))
    return {"lorth": value}
