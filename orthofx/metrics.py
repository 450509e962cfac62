r"""Measuring the orthogonality of convolutions and linear layers.

Convention. A convolution weight ``K`` has shape ``(M, C / groups, k_1, ..., k_d)`` (PyTorch's layout;
``d = 1, 2, 3``). With stride ``S`` and *circular* boundary on an input grid ``n`` (each ``n_i`` divisible by
``S_i``), the operator is PyTorch's cross-correlation

.. math::

    y[m, i] = \sum_{c} \sum_{p} K[m, c, p] \; x[c, (S i + p) \bmod n], \qquad i \in [0, n/S)^d,

a matrix :math:`\mathcal{K}` of shape :math:`M (n/S)^d \times C n^d`. Padding ``P`` on both sides (as in
``nn.Conv2d(padding=P, padding_mode='circular')``) only permutes the outputs, so it changes no singular value.

Exact singular values (Sedghi et al., ICLR 2019; P0). At stride 1 the DFT block-diagonalises the operator:
its singular values are the union over frequencies ``u`` of those of the ``M x C`` matrices
:math:`\hat K(u) = \sum_p K[:, :, p] \, \omega^{\langle p, u \rangle}`, :math:`\omega = e^{-2\pi i / n}` (a
kernel larger than the grid wraps around: taps are added modulo ``n``). With stride ``S``, zero-pad the kernel to a
multiple of ``S`` and rearrange it space-to-depth, :math:`K'[m, (c, r), a] = K[m, c, S a + r]`: then
:math:`\mathcal{K}` is the stride-1 convolution with ``K'`` on the ``n/S`` grid (``C S^d`` input channels) composed
with a permutation of the input, so the per-frequency SVDs of ``K'`` give all
:math:`\min(M, C S^d) (n/S)^d` singular values, which is the smaller dimension of :math:`\mathcal{K}`. Real
kernels have :math:`\hat K(-u) = \overline{\hat K(u)}`, so only half the frequencies are decomposed (``rfftn``).

Soft orthogonality (P0 Definition 1). With :math:`P_i = \lfloor (k_i - 1)/S_i \rfloor S_i`,
:math:`\mathrm{conv}(K, K, P, S)[m_1, m_2, j] = \sum_{c, p} K[m_2, c, p] \, K[m_1, c, S j + p - P]` (zero
outside the kernel) collects the correlations between every pair of output channels at every shift that is a
multiple of ``S``; it has shape :math:`M \times M \times (2P/S + 1)^d`. Then

.. math::

    L_{orth} = \| \mathrm{conv}(K, K, P, S) - I_{r0} \|_F^2 \;(\text{RO}), \qquad
    L_{orth} = \| \mathrm{conv}(K, K, P, S) - I_{r0} \|_F^2 - (M - C S^d) \;(\text{CO}),

:math:`I_{r0}` being zero but for :math:`I_M` at the centre shift. :math:`L_{orth} = 0` iff the convolution is
orthogonal, and on an ``N`` grid with :math:`SN \ge 2k - 1` (Theorem 7)
:math:`\|\mathcal{K}\mathcal{K}^T - I\|_F^2 = N^d L_{orth}` (RO), :math:`\|\mathcal{K}^T\mathcal{K} - I\|_F^2 =
N^d L_{orth}` (CO). (The OCNN regulariser uses padding 1 for ``k = 3`` and so misses the shifts of 2.)

Spectral norm upper bound (Gram iteration, Delattre et al., ICML 2023): :math:`G_1 = W`,
:math:`G_{t+1} = G_t^H G_t`; :math:`\sigma_1(W) \le \|G_t\|_F^{2^{-(t-1)}}`, with each :math:`G_t` rescaled
to avoid overflow.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.autograd.forward_ad as _fwad
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import guard_or_false, statically_known_true

from orthofx.errors import ArgumentError, LayerArgumentError, first_line
from orthofx.nn.convnorm import running_filters_held
from orthofx.nn.padding import per_dimension
from orthofx.nn.precision import HALF_PRECISION, autocast_enabled, autocast_off
from orthofx.nn.tracing import ForwardModeRefusal, FuncTransformRefusal, in_func_transform, in_jvp
from orthofx.theory import _flag as _theory_flag, _positive_int as _int, _real, orthogonality_case

__all__ = [
    "lorth",
    "dilated_kernel",
    "conv_singular_values",
    "linear_singular_values",
    "orthogonality_error",
    "spectral_norm_bound",
]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_KIND = {3: "Conv1d", 4: "Conv2d", 5: "Conv3d"}


# ---------------------------------------------------------------------------------------------------- helpers


def _check_tensor(weight, what: str) -> None:
    """``weight`` is a real floating-point tensor, and not an empty 2-D one; ``what`` (the public function called)
    starts the error message."""
    if not isinstance(weight, torch.Tensor):
        raise ArgumentError(f"{what}: weight must be a torch.Tensor (a layer's .weight), got {type(weight).__name__}")
    if weight.is_complex() or not weight.is_floating_point():
        raise ArgumentError(f"{what}: weight must be a real floating-point tensor, got dtype {weight.dtype}; pass "
                            "e.g. weight.float()")
    if weight.ndim == 2 and weight.numel() == 0:
        raise ArgumentError(f"{what}: weight is empty, shape {tuple(weight.shape)}: a layer needs at least one "
                            "input and one output feature")


def _is_real_float_dtype(dtype) -> bool:
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point and not dtype.is_complex


def _check_svd_inputs(weight: torch.Tensor, dtype, what: str) -> None:
    """The singular-value routines need the weight's values (not a meta tensor) and a dtype LAPACK decomposes."""
    if not _is_real_float_dtype(dtype):
        raise ArgumentError(f"{what}: dtype must be a real floating-point torch.dtype (e.g. torch.float64), "
                            f"got {dtype!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ArgumentError(f"{what}: dtype must be torch.float32 or float64 (no SVD in {dtype}); the weight itself "
                            "may be in any floating-point dtype")
    if weight.is_meta:
        raise ArgumentError(f"{what}: the weight is on the meta device (shape {tuple(weight.shape)}, no values); "
                            "load or materialise the weights first (e.g. model.to_empty(device=...) and load a "
                            "state dict)")


def _check_conv_weight(weight, what: str) -> int:
    """Validates a conv weight; returns the number of spatial dims."""
    _check_tensor(weight, what)
    if weight.ndim not in _KIND:
        extra = " (a 2-D weight is a Linear layer: use linear_singular_values)" if weight.ndim == 2 else ""
        raise ArgumentError(
            f"{what} expects a convolution weight of shape (out, in/groups, *kernel) with 3 (Conv1d), "
            f"4 (Conv2d) or 5 (Conv3d) dimensions, got shape {tuple(weight.shape)}{extra}"
        )
    if weight.numel() == 0:
        raise ArgumentError(f"{what}: the weight is empty, shape {tuple(weight.shape)}")
    return weight.ndim - 2


def _tuple(value, d: int, name: str, broadcast: bool = True) -> tuple[int, ...]:
    """A conv's ``stride`` or ``dilation`` (an int, or one value per dimension: one value applies to every dimension,
    as in torch's convs) or, with ``broadcast=False``, an ``input_size`` (exactly ``d`` values), as ``d`` ints >= 1
    (:func:`orthofx.nn.padding.per_dimension`)."""
    return per_dimension(value, d, name, item=lambda v: _int(v, name), error=ArgumentError,
                         expected=f"an int or a tuple of {d} ints for a {d}-D convolution", broadcast=broadcast)


def _flag(value, name: str, what: str) -> bool:
    """``value`` as a bool (see :func:`orthofx.theory._flag`), the error starting with ``what``."""
    return _theory_flag(value, f"{what}: {name}")


def check_generator(generator, what: str, drawn: str) -> None:
    """Refuse a ``generator`` that is neither ``None`` nor a ``torch.Generator`` (:class:`ArgumentError` starting
    with ``what``; ``drawn`` names what a seeded one makes reproducible): any other object failed inside the draw
    ("'int' object has no attribute 'device'")."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ArgumentError(f"{what}: generator must be a torch.Generator or None, got {type(generator).__name__} "
                            f"{generator!r}; e.g. torch.Generator().manual_seed(0) for {drawn}")


def _one_of(value, choices: tuple, name: str, what: str):
    """``value`` if it is one of the strings ``choices`` (``None`` included when it is one of them); checked by type
    first, since ``in`` on an array or a list compares elementwise or needs a hash."""
    if not (value is None and None in choices) and not (isinstance(value, str) and value in choices):
        shown = ", ".join(repr(c) for c in choices)
        raise ArgumentError(f"{what}: {name} must be one of {shown}, got {value!r}")
    return value


def _linear_one(value, name: str, what: str) -> None:
    """A 2-D (Linear) weight is a one-tap convolution at stride 1: its stride, groups and dilation can only be the
    integer 1 (any integer type, as torch accepts; not a bool, a float, a tuple or an array)."""
    try:
        one = not isinstance(value, bool) and value.__index__() == 1
    except (AttributeError, TypeError, ValueError, RuntimeError):  # no __index__, or an array's / tensor's refusal
        one = False
    if not one:
        raise ArgumentError(f"{what}: {name} must be 1 for a 2-D (Linear) weight (it has no kernel taps to move or "
                            f"split), got {value!r}; pass {name} only with a convolution weight")


def _groups(weight: torch.Tensor, groups) -> int:
    g = _int(groups, "groups")
    if weight.shape[0] % g:
        raise ArgumentError(f"groups={g} must divide the number of output channels {weight.shape[0]} "
                            f"(weight shape {tuple(weight.shape)})")
    return g


#: Largest number of complex entries of per-frequency matrices formed at once (256 MiB in complex128): a wide
#: layer on a large grid would otherwise need gigabytes (512 channels on 64 x 64: 9 GB).
_MAX_FREQUENCY_ELEMENTS = 1 << 24

#: Most entries a result (all singular values of a convolution, a dilated kernel) or a set of frequencies may have
#: (16 GiB in float64): past it torch fails with a bare allocation or size-overflow error, or the loop over the
#: frequencies never ends; a grid or a dilation that large is a mistake (e.g. a pixel count passed as a side).
_MAX_ENTRIES = 1 << 31


def _grid(weight: torch.Tensor, input_size, stride) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(input sizes n, strides S, output grid n/S)`` of a checked conv weight, each a tuple of ``d`` ints."""
    d = weight.ndim - 2
    sizes = _tuple(input_size, d, "input_size", broadcast=False)
    strides = _tuple(stride, d, "stride")
    for n, s in zip(sizes, strides):
        if n % s:
            raise ArgumentError(f"input_size {sizes} must be divisible by the stride {strides} in every dimension "
                                f"(circular strided convolution); {n} is not a multiple of {s}")
    return sizes, strides, tuple(n // s for n, s in zip(sizes, strides))


def _space_to_depth(weight: torch.Tensor, strides: tuple[int, ...]) -> torch.Tensor:
    r"""``K'[m, (c, r), a] = K[m, c, S a + r]`` (module docstring): ``(M, C/g, *k)`` -> ``(M, C/g * prod(S), *a)``
    with :math:`a_i = \lceil k_i / S_i \rceil`, the kernel zero-padded to a multiple of the stride first.
    Differentiable."""
    d = weight.ndim - 2
    M, Cg = weight.shape[:2]
    # zero-pad each spatial dim to a multiple of the stride (F.pad lists the last dim first)
    pad = []
    for k, s in reversed(list(zip(weight.shape[2:], strides))):
        pad += [0, (-k) % s]
    w = F.pad(weight, pad) if any(pad) else weight
    blocks = tuple(w.shape[2 + i] // strides[i] for i in range(d))
    # (M, Cg, a_1 S_1, ..., a_d S_d) -> (M, Cg, a_1, S_1, ..., a_d, S_d) -> (M, Cg, S_1, ..., S_d, a_1, ..., a_d)
    split = [M, Cg]
    for a, s in zip(blocks, strides):
        split += [a, s]
    perm = [0, 1] + [3 + 2 * i for i in range(d)] + [2 + 2 * i for i in range(d)]
    return w.reshape(split).permute(perm).reshape(M, Cg * math.prod(strides), *blocks)


def _space_to_depth_kernel(weight: torch.Tensor, input_size, stride, groups, dtype
                           ) -> tuple[torch.Tensor, tuple[int, ...], int]:
    r"""``(K', grid, groups)``: the stride-1 kernel ``(M, C/g * prod(r), a_1, ..., a_d)`` on the ``n/S`` grid
    (module docstring), in ``dtype``, taps folded modulo the grid, with :math:`r_i = \min(k_i, S_i)` residues per
    dimension: a stride past the kernel leaves the residues ``k_i .. S_i - 1`` unread, zero columns of
    :math:`\hat K'(u)` that are left out (:func:`_residues`), so that the work and memory do not grow as
    :math:`S^d` (a 3 x 3 kernel at stride 3000 padded to 3000 x 3000 taps)."""
    sizes, strides, grid = _grid(weight, input_size, stride)
    g = _groups(weight, groups)
    w = _space_to_depth(weight.detach().to(dtype), _residues(weight, strides))
    blocks = tuple(w.shape[2:])
    # fold taps modulo the grid (a kernel larger than the grid wraps around)
    for i, (a, q) in enumerate(zip(blocks, grid)):
        if a > q:
            dim = 2 + i
            extra = (-a) % q
            if extra:
                p = [0, 0] * (w.ndim - 1 - dim) + [0, extra]
                w = F.pad(w, p)
            shape = list(w.shape)
            w = w.reshape(shape[:dim] + [shape[dim] // q, q] + shape[dim + 1:]).sum(dim)
    return w, grid, g


def _residues(weight: torch.Tensor, strides: tuple[int, ...]) -> tuple[int, ...]:
    """``min(k_i, S_i)`` per dimension: the residues modulo the stride that the kernel's taps read. The space-to-depth
    kernel at these strides is the one at ``S`` without its all-zero columns (a dimension with ``k_i <= S_i`` has one
    block either way, holding taps ``0 .. k_i - 1``)."""
    return tuple(min(k, s) for k, s in zip(weight.shape[2:], strides))


def _rfft_counts(q: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """How many frequencies of the full spectrum each of ``rfft``'s ``q // 2 + 1`` frequencies stands for (on
    ``device``, not torch's default device, which a user may have set to another)."""
    counts = torch.full((q // 2 + 1,), 2, dtype=torch.long, device=device)
    counts[0] = 1
    if q % 2 == 0:
        counts[-1] = 1
    return counts


def rfftn_counts(grid: tuple[int, ...]) -> torch.Tensor:
    """:func:`_rfft_counts` of each frequency of ``rfftn`` over ``grid`` (the last axis halved), flattened in
    ``rfftn``'s order: a frequency and its conjugate have the same singular values, so each half-spectrum matrix
    stands for its count of the ``prod(grid)`` frequencies (the counts sum to it).

    >>> rfftn_counts((3, 4)).tolist(), int(rfftn_counts((3, 4)).sum())
    ([1, 2, 1, 1, 2, 1, 1, 2, 1], 12)
    """
    return _rfft_counts(grid[-1]).repeat(math.prod(grid[:-1]))


def _frequency_matrices(weight: torch.Tensor, input_size, stride, groups, dtype, max_elements: int | None = None,
                        what: str = "conv_singular_values"):
    r"""The per-frequency matrices of the (strided, grouped, circular) convolution, in chunks.

    Yields ``(mats, counts)``: ``mats`` ``(B, M/g, C/g * prod(r))`` (``dtype``; complex but for a one-tap
    kernel; :math:`r_i = \min(k_i, S_i)`, the columns of the ``C/g * prod(S)`` that no tap reads left out, see
    :func:`_space_to_depth_kernel`) and ``counts`` ``(B,)``, how many frequencies of the full spectrum each matrix
    stands for (conjugate frequencies share singular values, so only half are formed). Together the chunks cover
    every frequency of every group once, each chunk at most ``max_elements`` entries (default
    :data:`_MAX_FREQUENCY_ELEMENTS`; one frequency of the first grid axis when that alone is larger):

    * a kernel with one tap after space-to-depth (``1 x 1`` convs, ``k <= S``) is the same matrix at every
      frequency: one matrix per group, counted ``prod(n/S)`` times;
    * otherwise ``rfftn`` over the grid when everything fits in ``max_elements``, else chunk by chunk along the
      first grid axis, the DFT along every axis as a direct sum over the kernel's few taps.

    ``what`` starts the error message of a grid with more than :data:`_MAX_ENTRIES` frequencies.
    """
    max_elements = _MAX_FREQUENCY_ELEMENTS if max_elements is None else max_elements
    sizes, strides, grid = _grid(weight, input_size, stride)
    if math.prod(grid) > _MAX_ENTRIES:
        raise ArgumentError(f"{what}: input_size {sizes} at stride {strides} is an output grid of {math.prod(grid)} "
                            f"frequencies, more than {_MAX_ENTRIES} (2^31): pass the spatial size of the layer's "
                            "input, e.g. (32, 32) for a CIFAR image")
    w, grid, g = _space_to_depth_kernel(weight, input_size, stride, groups, dtype)
    M, Cp = w.shape[:2]
    d = len(grid)
    if all(a == 1 for a in w.shape[2:]):
        mats = w.reshape(g, M // g, Cp)
        yield mats, torch.full((g,), math.prod(grid), dtype=torch.long, device="cpu")
        return

    def per_group(hat: torch.Tensor, counts: torch.Tensor):
        """``hat`` ``(M, C', F...)`` -> ``(B, M/g, C')``; ``counts`` broadcast over ``F...`` -> ``(B,)``."""
        hat = hat.reshape(g, M // g, Cp, *hat.shape[2:]).permute(0, *range(3, 3 + d), 1, 2)
        counts = counts.expand(g, *hat.shape[1:1 + d]).reshape(-1)
        return hat.reshape(-1, M // g, Cp), counts

    spatial = tuple(range(2, 2 + d))
    last_counts = _rfft_counts(grid[-1])
    # frequencies along the first grid axis: all of them (d > 1), rfft's half (d = 1, it is also the last axis)
    first = grid[0] if d > 1 else grid[0] // 2 + 1
    per_first = M * Cp * math.prod(grid[1:-1]) * (grid[-1] // 2 + 1 if d > 1 else 1)
    if first * per_first <= max_elements:
        hat = torch.fft.rfftn(w, s=grid, dim=spatial)
        yield per_group(hat, last_counts.reshape((1,) * (d - 1) + (-1,)))
        return
    chunk = max(1, max_elements // per_first)
    hat0 = w.to(torch.complex128 if dtype == torch.float64 else torch.complex64)
    for start in range(0, first, chunk):
        freqs = torch.arange(start, min(first, start + chunk), device="cpu")
        hat = _dft(hat0, 2, grid[0], freqs)
        for i in range(1, d):  # the other axes in full, the last one halved
            hat = _dft(hat, 2 + i, grid[i], torch.arange(grid[i] if i < d - 1 else grid[i] // 2 + 1, device="cpu"))
        counts = last_counts.reshape((1,) * (d - 1) + (-1,)) if d > 1 else last_counts[freqs]
        yield per_group(hat, counts)


def _dft(x: torch.Tensor, axis: int, q: int, freqs: torch.Tensor) -> torch.Tensor:
    """The length-``q`` DFT of complex ``x`` along ``axis`` (its taps, zero beyond), at the frequencies ``freqs``
    only: a direct sum over the few taps of a kernel."""
    taps = torch.arange(x.shape[axis], device=freqs.device)
    # exact angles: the product a * u reduced modulo q before the division
    angles = ((taps[:, None] * freqs[None, :]) % q).to(torch.float64) * (-2 * math.pi / q)
    basis = torch.polar(torch.ones_like(angles), angles).to(device=x.device, dtype=x.dtype)  # (taps, freqs)
    return torch.tensordot(x, basis, dims=([axis], [0])).movedim(-1, axis)


def _batched_svdvals(mats: torch.Tensor, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """svdvals over a batch of matrices ``(B, m, n)``, in chunks to bound the workspace.

    A matrix holding a NaN or an inf (a weight gone non-finite after a diverged step) has no singular values:
    its row is NaN, like :func:`lorth` and :func:`spectral_norm_bound` of such a weight. LAPACK would raise
    instead ("failed to converge"), and with it ``orthofx.report`` on exactly the model one wants to inspect.
    """
    bad = ~torch.isfinite(mats).flatten(1).all(1)  # (B,)
    if bool(bad.any()):
        sv = _batched_svdvals(torch.where(bad[:, None, None], mats.new_zeros(()), mats), chunk_elems)
        return sv.masked_fill(bad[:, None], float("nan"))
    B = mats.shape[0]
    per = max(1, chunk_elems // max(1, mats.shape[1] * mats.shape[2]))
    if per >= B:
        return torch.linalg.svdvals(mats)
    return torch.cat([torch.linalg.svdvals(mats[i:i + per]) for i in range(0, B, per)])


# ---------------------------------------------------------------------------------------------------- L_orth


def lorth(weight: torch.Tensor, stride=1, groups: int = 1, case: str | None = None, *,
          dilation=1, fast_backward: bool = True) -> torch.Tensor:
    r"""The orthogonality regulariser :math:`L_{orth}` of P0 (Definition 1), differentiable w.r.t. ``weight``.

    For a convolution weight ``K`` (``M x C/g x k_1 [x k_2 [x k_3]]``, non-square kernels and strides allowed),
    with :math:`P_i = \lfloor (k_i-1)/S_i \rfloor S_i`:

    .. math::

        L_{orth} = \|\mathrm{conv}(K, K, P, S) - I_{r0}\|_F^2 \;-\; [\text{CO}]\,(M - C S^d),

    where :math:`\mathrm{conv}(K, K, P, S)` (shape :math:`M \times M \times (2P/S+1)^d`) is computed in one
    ``F.conv{d}d`` call: ``K`` as a batch of ``M`` images with ``C`` channels, zero-padded by ``P``, correlated
    with the filters ``K`` at stride ``S``. The case is ``"RO"`` when :math:`M \le C \prod_i S_i` and ``"CO"``
    otherwise, unless ``case`` forces one. With ``groups`` the sum runs over the groups, each group's
    ``(M/g, C/g)`` block on its own (one grouped convolution). It is zero iff the circular convolution is
    orthogonal, and :math:`N^d L_{orth}` is :math:`\|\mathcal{K}\mathcal{K}^T - I\|_F^2` (RO) or
    :math:`\|\mathcal{K}^T\mathcal{K} - I\|_F^2` (CO) on any grid with :math:`SN \ge 2k-1` (Theorem 7).
    A tall operator (:math:`M > C \prod_i S_i` per group) is computed through its smaller Gram matrix
    :math:`\mathcal{K}^T\mathcal{K}` instead, the same value: with the space-to-depth kernel
    :math:`K'[m, (c, r), a] = K[m, c, S a + r]` (module docstring) and
    :math:`K'^T[(c, r), m, a] = K'[m, (c, r), a]`,
    :math:`\|\mathrm{conv}(K, K, P, S) - I_{r0}\|_F^2 = \|\mathrm{conv}(K'^T, K'^T, P', 1) - I_{r0}\|_F^2
    + (M - C S^d)` with :math:`P'_i = \lceil k_i / S_i \rceil - 1`,
    so the CO value cancels no large constant (float32 keeps its digits near orthogonality) and the convolution is
    :math:`C S^d \times C S^d` rather than :math:`M \times M`. One-tap (1 x 1) kernels
    take a shortcut with the same value: each group's Gram matrix, the smaller of :math:`W W^T` and
    :math:`W^T W` (a ResNet-50's penalty, forward + backward on CPU: 0.65x the time of the convolution route).

    Range: a float32 value is finite wherever :math:`L_{orth}` itself is below float32's largest number
    (:math:`3.4 \cdot 10^{38}`): every entry of :math:`\mathrm{conv}(K, K)` and its partial sums are bounded
    (Cauchy-Schwarz) by about the value's square root, the squares' partial sums by the value, so nothing
    overflows before the value does. A weight with an entry :math:`|K| = a` has
    :math:`L_{orth} \ge (a^2 - 1)^2 - M` (the centre diagonal holds :math:`\|K_m\|^2`), so
    entries past about :math:`4 \cdot 10^9` give ``inf`` in float32, rightly (entries of :math:`10^{30}`:
    :math:`L_{orth} \approx 10^{120}`); pass ``weight.double()`` for a finite figure. From about :math:`10^{19}`
    the products of entries overflow and sum to NaN: a value without gradient is ``inf`` there
    (:func:`_beyond_range_as_inf`); a differentiated one is left NaN, value and gradient (whose entries, of the
    order of :math:`|K|^3`, are then past float32's range too), to keep the penalty's path free of extra work.

    A 2-D weight (``nn.Linear``, ``out x in``) gives :math:`\|W W^T - I\|_F^2` if ``out <= in`` (or
    ``case="RO"``) and :math:`\|W^T W - I\|_F^2` otherwise, which is the 1x1, stride-1 case of the formula above.

    ``dilation``: a dilated convolution applies :func:`dilated_kernel`, and its L_orth is that kernel's. Along
    a dimension of stride 1 the dilation changes nothing (:math:`\mathrm{conv}(K, K)` is only spread over multiples
    of it), so the kernel is dilated along the strided dimensions only. A transposed convolution
    (``nn.ConvTranspose{d}d``, weight ``(in, out/groups, *k)``) is the adjoint of the convolution with the same
    weight and stride: the same singular values, so the same L_orth, with RO and CO swapped.

    Returns a 0-dim tensor in the weight's dtype and device (a bfloat16 / float16 weight: computed in float32,
    then rounded to its dtype), under ``torch.autocast`` too (computed with autocast off, as ``orthofx.penalty``
    runs its terms). A weight on the meta device gives a meta tensor
    (no value, no error), unlike the singular-value functions, which need values: ``orthofx.penalty`` of a model
    on the meta device then still builds (shapes, dtypes, tracing), and ``orthofx.report`` turns such a value into
    a row without figures. A float64 weight without gradient (what reports measure; neither reverse mode nor a
    forward-mode tangent, ``torch.func.jvp`` / ``jacfwd``) takes the value from Theorem 7 instead, through the
    per-frequency matrices on the smallest grid it holds on (the same value to rounding; float64 convolutions have
    no fast CPU kernel). Without a derivative, at stride 1, taps that are zero at the kernel's borders for every
    channel pair are dropped first (the same value: a delta-orthogonal kernel is measured as its one tap).

    ``fast_backward`` (default True): :math:`\mathrm{conv}(K, K)` is symmetric under swapping its two arguments
    (with :math:`m_1 \leftrightarrow m_2`, :math:`j \leftrightarrow -j`), so the gradient is twice the gradient
    through the first argument alone; differentiating through that one argument only gives the exact first
    derivative (reverse or forward mode) about 2x faster. Higher derivatives (``create_graph=True``: Hessian-vector
    products, gradient penalties on this loss) are then not those of :math:`L_{orth}`; pass ``fast_backward=False``
    for them. On a CPU, with ``fast_backward``, a kernel with at least :math:`2^{19}` multiply-adds per product of
    two taps (``M M/g C/g``; 128 -> 128 channels: :math:`2^{21}`) and at most 16 taps per residue class of the
    stride (3 x 3, or 7 x 7 at stride 2; 5 x 5 and 7 x 7 at stride 1 are slower that way) is differentiated (plain
    reverse mode, not under ``torch.func``, ``torch.compile`` or ``torch.jit.trace``) through those products
    instead of the convolution, unless its backward would form a matrix over 256 MB: the same value and first
    derivative to rounding with less work (:class:`_TapPairsDefect`; a ResNet-18's penalty, forward + backward on
    one thread: 1.4x faster at width 64).

    >>> import torch
    >>> w = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0].reshape(8, 8, 1, 1)
    >>> float(lorth(w)) < 1e-20                      # a 1x1 conv with an orthogonal matrix
    True
    >>> k = torch.zeros(1, 1, 1, 3); k[..., 0] = k[..., 2] = 2 ** -0.5   # x[i] + x[i+2], normalised
    >>> round(float(lorth(k)), 6)                    # the shift-2 correlation, twice (1/2)^2
    0.5
    """
    _check_tensor(weight, "lorth")
    _one_of(case, (None, "RO", "CO"), "case", "lorth")
    _flag(fast_backward, "fast_backward", "lorth")
    if weight.dtype in HALF_PRECISION:
        # the defect conv(K, K) - I of a near-orthogonal weight cancels most of bfloat16's 8 bits (the gradient of a
        # 16 x 16 Linear's L_orth came out 14 % off in direction; float16: 1 %): computed in float32 from the
        # half-precision values, the value rounded once to their dtype (the gradient reaches them through the cast)
        return lorth(weight.float(), stride, groups, case, dilation=dilation,
                     fast_backward=fast_backward).to(weight.dtype)
    reverse = torch.is_grad_enabled() and weight.requires_grad
    # autocast would run the convolution / Gram products in bfloat16 / float16 (a float32 conv's L_orth gradient came
    # out 39 % off, and the value in bfloat16): the weight's own dtype, as orthofx.penalty runs its terms
    with autocast_off(weight):
        value = _lorth_value(weight, stride, groups, case, dilation, fast_backward,
                             reverse or _forward_mode(weight))
    if reverse:
        return value  # differentiated: the plain computation, with no extra work on the penalty's path
    return _beyond_range_as_inf(value, weight)


def _forward_mode(tensor: torch.Tensor) -> bool:
    """Whether a forward-mode derivative of ``tensor`` is being taken (``torch.func.jvp``, ``jacfwd``, the forward
    level of ``hessian``; ``torch.autograd.forward_ad``), which ``tensor.requires_grad`` does not show. Under
    ``torch.func`` transforms the interpreter stack says so (``unpack_dual`` has no batching rule under ``vmap``);
    under ``torch.compile`` the query is not traced, and answers no."""
    if in_func_transform():
        return in_jvp()
    return not torch.compiler.is_compiling() and _fwad.unpack_dual(tensor).tangent is not None


def _lorth_value(weight: torch.Tensor, stride, groups, case: str | None, dilation, fast_backward: bool,
                 differentiated: bool) -> torch.Tensor:
    """:func:`lorth` of a float32 / float64 weight (its other arguments still to check) by the route that suits it;
    ``differentiated``: a derivative (reverse or forward mode) of the value is being taken, so the value-only
    Fourier route is out and the fast backward's doubling is needed."""
    if weight.ndim == 2:
        for name, value in (("stride", stride), ("groups", groups), ("dilation", dilation)):
            _linear_one(value, name, "lorth")
        out_f, in_f = weight.shape
        if case is None:
            case = "RO" if out_f <= in_f else "CO"
        return _lorth_one_tap(weight.unsqueeze(0), (1,), case, differentiated)  # a one-tap conv at stride 1
    d = _check_conv_weight(weight, "lorth")
    strides = _tuple(stride, d, "stride")
    dilations = _tuple(dilation, d, "dilation")
    weight = _dilate(weight, tuple(D if s > 1 else 1 for D, s in zip(dilations, strides)), "lorth")
    g = _groups(weight, groups)
    M, Cg = weight.shape[:2]
    ks = tuple(weight.shape[2:])
    C = Cg * g
    if case is None:
        case = orthogonality_case(C, M, strides, dims=d)
    # (the trim reads the weight on the host: not for a meta weight, nor while compiling or under torch.vmap, whose
    # batched tensors have no data to read)
    if not differentiated and all(s == 1 for s in strides) and not weight.is_meta \
            and not torch.compiler.is_compiling() and not in_func_transform():
        weight = _without_zero_border_taps(weight)
        ks = tuple(weight.shape[2:])
    if all(k == 1 for k in ks):
        return _lorth_one_tap(weight.reshape(g, M // g, Cg), strides, case, differentiated)
    if weight.dtype == torch.float64 and not differentiated:
        return _lorth_fourier(weight, strides, g, case)
    m, c = M // g, Cg * math.prod(strides)
    if m <= c:
        value = _gram_defect(weight, strides, g, fast_backward, differentiated)
        constant = g * (c - m) if case == "CO" else 0
    else:
        # A tall operator (M > C S^d): the smaller Gram matrix, A^T A's, stands in, as in _lorth_one_tap and
        # _lorth_fourier. A is the stride-1 conv with the space-to-depth kernel K' (M, C S^d, a) composed with a
        # permutation of its input, so A^T A is the stride-1 conv whose kernel is conv(K'^T, K'^T) with
        # K'^T[(c, r), m, a] = K'[m, (c, r), a] (Theorem 7 at stride 1, the same grid): ||conv(K, K, P, S) - I||^2 =
        # ||conv(K'^T, K'^T) - I||^2 + (M - C S^d) per group. The CO value then cancels no large constant (in float32
        # it had lost most of its digits near orthogonality: a 35 % error at L_orth 5e-5 for 16 -> 256 channels),
        # and the convolution is the smaller one.
        tall = _space_to_depth(weight, strides)
        blocks = tall.shape[2:]
        tall = tall.reshape(g, m, c, *blocks).transpose(1, 2).reshape(g * c, m, *blocks)
        value = _gram_defect(tall, (1,) * d, g, fast_backward, differentiated)
        constant = g * (m - c) if case == "RO" else 0
    return value + constant if constant else value


def _without_zero_border_taps(weight: torch.Tensor) -> torch.Tensor:
    r"""``weight`` without the taps at its spatial borders that are zero for every channel pair (a delta-orthogonal
    kernel: its one centre tap). At stride 1 that changes no L_orth: :math:`\mathrm{conv}(K, K)` loses only zero
    entries, and its centre (the identity's place) stays the centre. For values only (the trimmed taps get no
    gradient); reads the weight on the host once, for all its dimensions (on a GPU a read is a synchronisation:
    one ``nonzero`` per dimension made one each), so not under ``torch.compile`` or ``torch.vmap``."""
    ks = weight.shape[2:]
    if all(k == 1 for k in ks):
        return weight  # one tap: nothing to trim (its slice would be the weight itself)
    used = weight.ne(0).any(dim=(0, 1))  # the taps nonzero for some channel pair, (k_1, ..., k_d)
    d = used.ndim
    # per dimension, its taps used along the others, the d masks one after another: one host read
    masks = torch.cat([used.any(dim=tuple(j for j in range(d) if j != i)) if d > 1 else used
                       for i in range(d)]).tolist()
    index = [slice(None), slice(None)]
    start = 0
    for k in ks:
        mask, start = masks[start:start + k], start + k
        if not any(mask):  # an all-zero kernel: nothing to trim to
            return weight
        first, last = mask.index(True), k - 1 - mask[::-1].index(True)
        index.append(slice(first, last + 1))
    return weight[tuple(index)]


def _gram_defect(weight: torch.Tensor, strides: tuple[int, ...], g: int, fast_backward: bool,
                 differentiated: bool) -> torch.Tensor:
    r""":math:`\|\mathrm{conv}(K, K, P, S) - I_{r0}\|_F^2` of a conv weight ``(M, C/g, *k)`` (P0 Definition 1, summed
    over the ``g`` groups), computed in one ``F.conv{d}d`` call (:func:`_conv_defect`), or, for a large enough
    kernel, from the products of its taps (:func:`_tap_pairs_defect`): its value without a derivative on any
    device, and a reverse-mode first derivative on a CPU outside ``torch.func`` / ``torch.compile`` /
    ``torch.jit.trace`` for at most 16 taps per residue class and a backward matrix up to 256 MB
    (:class:`_TapPairsDefect`; the convolution keeps forward mode, ``fast_backward=False`` and, unmeasured there
    (launch-bound), the GPU)."""
    M, Cg = weight.shape[:2]
    pair = M * (M // g) * Cg  # the multiply-adds of one product K_t K_s^T, all groups
    if not differentiated:
        if pair >= _TAP_PAIRS_MIN_PAIR and pair * math.prod(weight.shape[2:]) >= _TAP_PAIRS_MIN_WORK:
            return _tap_pairs_defect(weight, strides, g)
    elif fast_backward and pair >= _TAP_PAIRS_MIN_PAIR_BACKWARD and _plain_cpu_reverse(weight) \
            and _class_taps(weight, strides) <= _TAP_PAIRS_MAX_CLASS_TAPS \
            and _toeplitz_bytes(weight, strides, g) <= _TAP_PAIRS_MAX_TOEPLITZ_BYTES:
        return _TapPairsDefect.apply(weight, strides, g)
    return _conv_defect(weight, strides, g, fast_backward, differentiated)


def _class_taps(weight: torch.Tensor, strides: tuple[int, ...]) -> int:
    """The most taps of ``weight`` in one residue class modulo the stride (the largest class: ``prod ceil(k/S)``)."""
    return math.prod(-(-k // s) for k, s in zip(weight.shape[2:], strides))


def _toeplitz_bytes(weight: torch.Tensor, strides: tuple[int, ...], g: int) -> int:
    """The size of the largest block-Toeplitz matrix :class:`_TapPairsDefect`'s backward forms: ``g`` blocks of
    ``(m n)^2`` entries for ``m = M / g`` rows and the ``n`` taps of a residue class modulo the stride."""
    return g * (weight.shape[0] // g * _class_taps(weight, strides)) ** 2 * weight.element_size()


def _plain_cpu_reverse(weight: torch.Tensor) -> bool:
    """Whether ``weight``'s derivative is taken by plain reverse mode alone, on a CPU: what
    :class:`_TapPairsDefect` (no forward-mode or ``vmap`` rule, not traced) is for. ``torch.jit.trace`` would record
    it as a Python call, which ``torch.jit.save`` refuses."""
    return (weight.device.type == "cpu" and weight.requires_grad and torch.is_grad_enabled()
            and not in_func_transform() and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and not _forward_mode(weight))


def _conv_defect(weight: torch.Tensor, strides: tuple[int, ...], g: int, fast_backward: bool,
                 differentiated: bool) -> torch.Tensor:
    r""":func:`_gram_defect` in one ``F.conv{d}d`` call: ``K`` as a batch of ``M / g`` images, correlated with the
    filters ``K`` at stride ``S`` with padding :math:`P_i = \lfloor (k_i-1)/S_i \rfloor S_i`. With ``fast_backward``
    only the images carry the derivative, doubled (see :func:`lorth`)."""
    d = weight.ndim - 2
    M, Cg = weight.shape[:2]
    ks = tuple(weight.shape[2:])
    pads = tuple(((k - 1) // s) * s for k, s in zip(ks, strides))
    if g == 1:
        images = weight
    else:
        # images[m1, (group, c)] = K[group * M/g + m1, c]; the grouped conv then correlates within each group
        images = weight.reshape(g, M // g, Cg, *ks).transpose(0, 1).reshape(M // g, Cg * g, *ks)
    filters = weight.detach() if fast_backward else weight
    out = _CONV[d](images, filters, stride=strides, padding=pads, groups=g)  # (M/g, M, J_1, ..., J_d)
    if fast_backward and differentiated:
        # same value (exactly), twice the derivative: the filters' share by symmetry (in forward mode too, where the
        # detached filters carry no tangent: the loss's tangent 2 <out - I, d out> takes equal shares from both)
        out = 2 * out - out.detach()
    target = torch.zeros_like(out)
    centre = (slice(None), slice(None)) + tuple(p // s for p, s in zip(pads, strides))
    target[centre] = torch.eye(M // g, dtype=out.dtype, device=out.device).repeat(1, g)
    return (out - target).square().sum()


# below about this many multiply-adds (M * M/g * C/g * taps) the one convolution call is faster than the tap
# products of _tap_pairs_defect (64 -> 64 channels 3 x 3: about even; 128 and up: the pairs 1.5-2.2x faster), and
# below this many per pair of taps (M * M/g * C/g) too (64 -> 64 channels 7 x 7: 11 ms convolution, 14 ms pairs);
# measured in session 32 with one += per pair of taps, before the one index_add_ per tap of session 34
_TAP_PAIRS_MIN_WORK = 1 << 23
_TAP_PAIRS_MIN_PAIR = 1 << 19
# with the derivative (forward + backward, one CPU thread), 3 x 3 kernels, in -> out channels: from 64 -> 128 at
# stride 2 (2^20) the tap products are 1.2-1.4x faster at stride 1 and 1.3-2.6x at stride 2; 64 -> 64 (2^18)
# 0.96-1.16x, within noise, and 32 -> 64 at stride 2 0.9-1.0x: those keep the convolution. benchmarks/RESULTS.md,
# "Session 34"
_TAP_PAIRS_MIN_PAIR_BACKWARD = 1 << 19
# the backward's block-Toeplitz matrix grows as (M k^d)^2: 85 MB for a 512-channel 3 x 3 float32 kernel, 340 MB at
# 1024 channels, where the convolution (whose own temporaries are of the order of its M x M x (2k - 1)^d output)
# is kept
_TAP_PAIRS_MAX_TOEPLITZ_BYTES = 1 << 28
# and it is slower than the convolution for many taps per residue class (one CPU thread, forward + backward, 128 ->
# 128 channels at stride 1: 7 x 7, 49 taps, 0.19 vs 0.15 s; 5 x 5, 25 taps, 0.048 vs 0.044 s), faster for 7 x 7 at
# stride 2 (16 taps per class: 0.041 vs 0.062 s)
_TAP_PAIRS_MAX_CLASS_TAPS = 16


def _tap_pairs_plan(ks: tuple[int, ...], strides: tuple[int, ...], device: torch.device) -> tuple:
    r"""Which tap products make :math:`\mathrm{conv}(K, K, P, S)_j` for the shifts :math:`j \ge 0`
    (lexicographically), per residue class of the taps modulo ``S`` (taps of different classes never meet):
    ``(classes, J, order, inverse)``, each class ``(members, rows, full)``: ``members`` its taps (flattened
    kernel order), ``rows[n]`` the shift indices (into the ``J`` shifts :math:`j \ge 0`, :math:`j = 0` first)
    of the pairs ``(members[n], s)`` for ``s`` in ``members[n:]``, and ``full`` the index of every pair ``(t, s)``
    of members into the ``2J`` blocks :math:`[D_0, \ldots, D_{J-1}, D_0^T, \ldots, D_{J-1}^T]`
    (:math:`D_{-j} = D_j^T`; ``full`` never points at the unused :math:`D_0^T`); then ``order``, the taps class
    by class (each class a contiguous run), and ``inverse``, its inverse permutation (both ``None`` for one class).
    Index tensors on ``device``, made at each call from the kept lists (:func:`_tap_pairs_lists`; about 30 us for
    a 3 x 3 kernel): a kept tensor would belong to the mode it was made under (a ``FakeTensorMode`` in
    ``torch.export`` or ``make_fx``, inference mode) and break later calls."""
    lists = _tap_pairs_lists.__wrapped__ if torch.compiler.is_compiling() else _tap_pairs_lists
    classes, count, order, inverse = lists(ks, strides)

    def index(values):
        return None if values is None else torch.tensor(values, dtype=torch.long, device=device)

    return (tuple((members, tuple(index(r) for r in rows), index(full)) for members, rows, full in classes), count,
            index(order), index(inverse))


@functools.lru_cache(maxsize=64)
def _tap_pairs_lists(ks: tuple[int, ...], strides: tuple[int, ...]) -> tuple:
    """:func:`_tap_pairs_plan` as Python lists (kept per kernel size and stride)."""
    coords = list(itertools.product(*(range(k) for k in ks)))
    spans = tuple(-(-k // s) for k, s in zip(ks, strides))  # at most this many taps per residue class
    offsets = [j for j in itertools.product(*(range(1 - n, n) for n in spans)) if j >= (0,) * len(j)]
    where = {j: i for i, j in enumerate(offsets)}  # offsets[0] is j = 0
    where.update({tuple(-a for a in j): len(offsets) + i for i, j in enumerate(offsets) if i})

    def shift(t, s):
        return where[tuple((q - p) // stride for p, q, stride in zip(coords[t], coords[s], strides))]

    classes = []
    for residue in itertools.product(*(range(min(s, k)) for s, k in zip(strides, ks))):
        members = [i for i, c in enumerate(coords) if all(a % s == r for a, s, r in zip(c, strides, residue))]
        rows = tuple([shift(t, s) for s in members[n:]] for n, t in enumerate(members))
        classes.append((members, rows, [shift(t, s) for t in members for s in members]))
    if len(classes) == 1:
        return tuple(classes), len(offsets), None, None
    order = [t for members, _, _ in classes for t in members]
    return tuple(classes), len(offsets), order, sorted(range(len(order)), key=order.__getitem__)


def _kernel_taps(weight: torch.Tensor, g: int, order: torch.Tensor | None = None) -> torch.Tensor:
    """``(g, taps, M/g, C/g)``: the ``(M/g) x (C/g)`` matrix of each tap per group, taps in flattened order, or in
    ``order`` (an index tensor) when given."""
    M, Cg = weight.shape[:2]
    taps = weight.reshape(g, M // g, Cg, -1).permute(0, 3, 1, 2)
    return taps.contiguous() if order is None else taps.index_select(1, order)


def _tap_pairs_conv(taps: torch.Tensor, plan: tuple) -> torch.Tensor:
    r""":math:`\mathrm{conv}(K, K, P, S)_j` for the ``J`` shifts :math:`j \ge 0` from :func:`_kernel_taps`'s
    ``taps`` (already in the ``order`` of ``plan``, :func:`_tap_pairs_plan`), as ``acc`` ``(g, M/g, J, M/g)`` with
    ``acc[:, a, j, b]`` the entry ``(a, b)`` of shift ``j``: one matrix product per tap ``t`` (with all the later
    taps of its residue class) and one ``index_add_`` of its blocks into their shifts (:func:`_tap_pairs_defect`).
    No derivative (callers run it without one)."""
    g, _, m, Cg = taps.shape
    classes, J, _, _ = plan
    acc = taps.new_zeros(g, m, J, m)
    start = 0
    for members, rows, _ in classes:
        later = taps[:, start:start + len(members)].reshape(g, len(members) * m, Cg)
        for n in range(len(members)):
            products = (later[:, n * m:(n + 1) * m] @ later[:, n * m:].mT)  # K_t K_s^T for s >= t
            acc.index_add_(2, rows[n], products.reshape(g, m, len(members) - n, m))
        start += len(members)
    return acc


def _defect_of_half(acc: torch.Tensor) -> torch.Tensor:
    """:math:`\\|\\mathrm{conv}_0 - I\\|^2 + 2 \\sum_{j > 0} \\|\\mathrm{conv}_j\\|^2` of :func:`_tap_pairs_conv`'s
    ``acc``, whose ``conv_0`` becomes ``conv_0 - I`` (in place)."""
    acc[:, :, 0].diagonal(dim1=-2, dim2=-1).sub_(1)
    return acc[:, :, 0].square().sum() + 2 * acc[:, :, 1:].square().sum()


@torch.no_grad()
def _tap_pairs_defect(weight: torch.Tensor, strides: tuple[int, ...], g: int) -> torch.Tensor:
    r""":func:`_gram_defect`'s value without a derivative, from the products of the kernel's taps, pair by pair.

    With :math:`K_t` the ``(M/g) x (C/g)`` matrix of tap ``t`` (per group),
    :math:`\mathrm{conv}(K, K, P, S)_j = \sum_t K_t K_{t + S j}^T` (taps outside the kernel are zero), and
    :math:`\mathrm{conv}_{-j} = \mathrm{conv}_j^T`. So with the taps in lexicographic order (``t < s`` iff
    ``s - t`` is lexicographically positive)

    .. math::

        \|\mathrm{conv}(K, K, P, S) - I_{r0}\|_F^2 = \|\mathrm{conv}_0 - I\|_F^2
        + 2 \sum_{j > 0} \|\mathrm{conv}_j\|_F^2,

    and the half :math:`j \ge 0` needs the products :math:`K_t K_s^T` for ``t <= s`` whose taps differ by a
    multiple of the stride in every dimension: one matrix product per tap ``t`` (with all the later taps of its
    residue class modulo ``S``). For a 3 x 3 kernel at stride 1 that is 45 products of ``M x C`` by ``C x M``
    where the convolution, counting only its nonzero taps, makes 81 (``(2k - 1)^d`` shifts times the taps that
    overlap). Measured on one CPU thread (float32, ``benchmarks/RESULTS.md``): 512 -> 512 channels 3 x 3 170 ->
    81 ms, 256 -> 256 26 -> 13 ms, at stride 2 61 -> 33 ms. The derivative: :class:`_TapPairsDefect`.
    The same value to rounding (float32 sums in another order; the tests compare both with float64).

    >>> import torch
    >>> w = torch.randn(128, 128, 3, 3, dtype=torch.float64)
    >>> conv = torch.nn.functional.conv2d(w, w, padding=2)
    >>> conv[:, :, 2, 2] -= torch.eye(128, dtype=torch.float64)
    >>> bool(torch.isclose(_tap_pairs_defect(w, (1, 1), 1), conv.square().sum()))
    True
    """
    plan = _tap_pairs_plan(tuple(weight.shape[2:]), strides, weight.device)
    return _defect_of_half(_tap_pairs_conv(_kernel_taps(weight, g, plan[2]), plan))


class _TapPairsDefect(torch.autograd.Function):
    r""":func:`_tap_pairs_defect` with its first derivative (reverse mode), for the penalty's training step.

    With :math:`D_j = \mathrm{conv}_j - \delta_{j0} I` (:math:`D_{-j} = D_j^T`) and
    :math:`L = \sum_j \|D_j\|_F^2`, :math:`\partial L / \partial K_t = 4 \sum_j D_j K_{t + S j}`: stacking the
    taps of a residue class as :math:`X = [K_{t_1}; K_{t_2}; \ldots]` (``n m x C/g``), the gradient is
    :math:`4 B X` with the block-Toeplitz :math:`B_{ts} = D_{(s - t)/S}` (``n m x n m``), one matrix product of
    :math:`n^2` blocks. Forward + backward, 3 x 3 at stride 1: 45 + 81 products of ``m x C`` by ``C x m``, where the
    convolution route (``fast_backward``) makes 81 + 81 with zero-padding overheads (512 -> 512 channels on one CPU
    thread: 369 -> 273 ms; ``benchmarks/RESULTS.md``, "Session 34"). The backward is not itself differentiated:
    under ``create_graph=True`` it runs :func:`_conv_defect` (``fast_backward``) again and takes that one's
    derivative, the graph and higher derivatives the convolution route gives.

    >>> import torch
    >>> w = torch.randn(64, 64, 3, 3, dtype=torch.float64, requires_grad=True)
    >>> (g1,) = torch.autograd.grad(_TapPairsDefect.apply(w, (1, 1), 1), w)
    >>> (g2,) = torch.autograd.grad(_conv_defect(w, (1, 1), 1, True, True), w)
    >>> bool(torch.allclose(g1, g2))
    True
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, strides: tuple[int, ...], g: int) -> torch.Tensor:
        plan = _tap_pairs_plan(tuple(weight.shape[2:]), strides, weight.device)
        taps = _kernel_taps(weight, g, plan[2])
        acc = _tap_pairs_conv(taps, plan)
        value = _defect_of_half(acc)
        ctx.save_for_backward(weight, taps, acc)
        ctx.strides, ctx.g, ctx.plan = strides, g, plan  # the plan's index tensors, for the backward
        return value

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, taps, acc = ctx.saved_tensors
        # lorth's forward runs with autocast off; a backward() called inside torch.autocast would run these
        # products in bfloat16 (3.7e-3 off the float32 gradient; the convolution route's backward stays float32)
        with autocast_off(weight):
            return _TapPairsDefect._backward(ctx, grad, weight, taps, acc)

    @staticmethod
    def _backward(ctx, grad: torch.Tensor, weight: torch.Tensor, taps: torch.Tensor, acc: torch.Tensor):
        if torch.is_grad_enabled():  # create_graph=True: the convolution route's graph, for higher derivatives
            with torch.enable_grad():
                value = _conv_defect(weight, ctx.strides, ctx.g, True, True)
                return torch.autograd.grad(value, weight, grad, create_graph=True)[0], None, None
        g, _, m, Cg = taps.shape
        classes, _, _, inverse = ctx.plan
        both = torch.cat([acc, acc.permute(0, 3, 2, 1)], dim=2)  # (g, m, 2J, m): D_j, then D_j^T at J + j
        parts, start = [], 0
        for members, _, full in classes:
            n = len(members)
            x = taps[:, start:start + n].reshape(g, n * m, Cg)  # rows (s, b)
            toeplitz = both.index_select(2, full).reshape(g, m * n, n * m)  # B, rows (a, t), columns (s, b)
            parts.append((toeplitz @ x).reshape(g, m, n, Cg))
            start += n
        out = parts[0] if inverse is None else torch.cat(parts, dim=2).index_select(2, inverse)
        return (out * (4 * grad)).permute(0, 1, 3, 2).reshape(weight.shape), None, None


def dilated_kernel(weight: torch.Tensor, dilation) -> torch.Tensor:
    """The undilated kernel a dilated convolution applies: ``(M, C/g, D_1 (k_1 - 1) + 1, ...)``, the taps of
    ``weight`` ``D_i`` apart with zeros between them (``weight`` itself when every ``D_i`` is 1). Differentiable.

    >>> import torch
    >>> dilated_kernel(torch.tensor([[[1.0, 2.0]]]), 3)
    tensor([[[1., 0., 0., 2.]]])
    """
    d = _check_conv_weight(weight, "dilated_kernel")
    return _dilate(weight, _tuple(dilation, d, "dilation"), "dilated_kernel")


def _dilate(weight: torch.Tensor, dilations: tuple[int, ...], what: str) -> torch.Tensor:
    """:func:`dilated_kernel` of a checked weight and per-dimension dilations; ``what`` starts the error message."""
    if all(D == 1 for D in dilations):
        return weight
    size = [(k - 1) * D + 1 for k, D in zip(weight.shape[2:], dilations)]
    entries = weight.shape[0] * weight.shape[1] * math.prod(size)
    if entries > _MAX_ENTRIES:
        raise ArgumentError(f"{what}: dilation {dilations} spreads the kernel {tuple(weight.shape[2:])} over "
                            f"{tuple(size)} taps, {entries} entries with the channels, more than {_MAX_ENTRIES} "
                            "(2^31): pass the layer's dilation (a dilation past the input size only wraps around)")
    out = weight.new_zeros(*weight.shape[:2], *size)
    out[(slice(None), slice(None)) + tuple(slice(None, None, D) for D in dilations)] = weight
    return out


def _lorth_one_tap(w: torch.Tensor, strides: tuple[int, ...], case: str, differentiated: bool = True) -> torch.Tensor:
    r""":func:`lorth` of one-tap (1 x 1) kernels, ``w`` ``(g, m, c)`` per group: :math:`\mathrm{conv}(K, K)` is
    then each group's Gram matrix :math:`W W^T`, and :math:`\|W W^T - I_m\|_F^2 = \|W^T W - I_c\|_F^2 + (m - c)`
    lets the smaller Gram stand in: the same value with :math:`O(mc \min(m, c))` work, where the convolution
    route forms the :math:`m \times m` one (4x the work of a ResNet bottleneck's 4x expansion conv, and more
    on a CPU, whose conv kernels are slower than its matrix products at this shape). A value without a derivative
    (``differentiated`` false) of a Gram matrix of 256 rows or more takes :func:`_gram_defect_blocks`."""
    g, m, c = w.shape
    # the integer parts are summed exactly first: at stride 1 in the CO case they cancel to 0
    constant = g * max(m - c, 0) - (g * m - g * c * math.prod(strides) if case == "CO" else 0)
    if not differentiated and min(m, c) >= 256:
        value = _gram_defect_blocks(w if m <= c else w.mT)
        return value + constant if constant else value
    gram = w @ w.mT if m <= c else w.mT @ w
    eye = torch.eye(gram.shape[-1], dtype=w.dtype, device=w.device)
    value = (gram - eye).square().sum()
    return value + constant if constant else value


@torch.no_grad()
def _gram_defect_blocks(x: torch.Tensor, parts: int = 4) -> torch.Tensor:
    r""":math:`\|X X^T - I\|_F^2` summed over the batch of ``x`` ``(g, k, n)``, from the upper block triangle of the
    symmetric :math:`X X^T`: the rows cut into ``parts`` blocks :math:`X_a`, one product :math:`X_a [X_a; X_b;
    \ldots]^T` per block, whose diagonal block counts once and the rest twice. ``(parts + 1) / (2 parts)`` of the
    multiply-adds of the whole Gram matrix; on one CPU thread (float32) 0.65-0.75x its time from 512 rows
    (``benchmarks/RESULTS.md``). The same value to rounding; no derivative.

    >>> import torch
    >>> x = torch.randn(2, 300, 500, dtype=torch.float64)
    >>> whole = (x @ x.mT - torch.eye(300, dtype=torch.float64)).square().sum()
    >>> bool(torch.isclose(_gram_defect_blocks(x), whole))
    True
    """
    k = x.shape[-2]
    edges = [k * i // parts for i in range(parts + 1)]
    total = x.new_zeros(())
    for a, b in zip(edges, edges[1:]):
        gram = x[:, a:b] @ x[:, a:].mT  # rows a..b against rows a..k
        gram[..., :b - a].diagonal(dim1=-2, dim2=-1).sub_(1)
        total += gram[..., :b - a].square().sum() + 2 * gram[..., b - a:].square().sum()
    return total


def _beyond_range_as_inf(value: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    r"""``value`` (an L_orth of ``weight`` needing no gradient), ``inf`` where :math:`\|K\|_F^2` overflows the dtype:
    then some row has :math:`\|K_m\|^2 \ge \|K\|_F^2 / M` and :math:`L_{orth} \ge (\|K_m\|^2 - 1)^2 - M` is
    past the range too, while the products :math:`K_a K_b` of mixed signs that overflowed in the Gram matrix or the
    convolution had summed to ``inf - inf``, NaN (float32 entries from about :math:`10^{19}`). A NaN in the weight
    still gives NaN. Tensor operations only (no host read): it also runs compiled, vmapped and on the meta device."""
    overflow = weight.detach().square().sum().isinf()
    return torch.where(overflow, torch.full_like(value, math.inf), value)


def _lorth_fourier(weight: torch.Tensor, strides: tuple[int, ...], groups: int, case: str) -> torch.Tensor:
    r""":func:`lorth` by Theorem 7, the value only: on the grid :math:`N_i = \lceil (2k_i - 1)/S_i \rceil`,
    :math:`N^d L_{orth} = \sum_u \|\hat K'(u) \hat K'(u)^H - I\|_F^2` (RO) over the per-frequency matrices of
    :func:`conv_singular_values`, or the same with :math:`\hat K'^H \hat K'` (CO). The smaller Gram matrix of each
    group stands in for either case, :math:`\|G_m - I_m\|_F^2 = \|G_c - I_c\|_F^2 + N^d (m - c)`, so no large
    constant cancels. Taken for float64 weights without gradient (reports): matrix products, where the float64
    convolution of the general route has no fast CPU kernel (a 512-channel 3 x 3 conv: 0.56 s against 2.8 s).
    The matrices have ``c = C/g * prod(min(k_i, S_i))`` columns (the unread residues left out, all zero): with
    :math:`c_S = C/g \prod_i S_i`, RO's :math:`\|G_m - I_m\|_F^2` is the same, and CO's is
    :math:`\|G_m - I_m\|_F^2 - N^d (m - c_S)`."""
    g = groups
    m, c = weight.shape[0] // g, weight.shape[1] * math.prod(_residues(weight, strides))
    grid = tuple(-(-(2 * k - 1) // s) for k, s in zip(weight.shape[2:], strides))
    total = weight.new_zeros((), dtype=weight.dtype)
    with torch.no_grad():
        for mats, counts in _frequency_matrices(weight, tuple(n * s for n, s in zip(grid, strides)), strides, g,
                                                weight.dtype):
            gram = mats @ mats.mH if m <= c else mats.mH @ mats
            gram.diagonal(dim1=-2, dim2=-1).sub_(1)
            total += (gram.abs().square().sum((-2, -1)) * counts.to(gram.device)).sum()
    value = total / math.prod(grid)
    # from the smaller Gram matrix to RO's, then to CO's: an integer >= 0 (c <= c_S), so nothing cancels
    constant = (g * (m - c) if m > c else 0) - (g * (m - weight.shape[1] * math.prod(strides)) if case == "CO" else 0)
    return value + constant if constant else value


# ---------------------------------------------------------------------------------------------------- spectra


@torch.no_grad()
def conv_singular_values(weight: torch.Tensor, input_size, stride=1, groups: int = 1,
                         dtype: torch.dtype = torch.float64) -> torch.Tensor:
    r"""All singular values of a circular convolution on an ``input_size`` grid, in descending order.

    The operator is :math:`y[m, i] = \sum_c \sum_p K[m, c, p]\, x[c, (S i + p) \bmod n]` (PyTorch's
    cross-correlation; any circular padding offset only permutes outputs). Its matrix has shape
    :math:`M (n/S)^d \times C n^d` and the result has exactly :math:`\min(M (n/S)^d, C n^d) =
    \min(M, C S^d)(n/S)^d` entries (per group, united over the groups): the singular values of the
    per-frequency matrices :math:`\hat K'(u) = \sum_a K'[:, :, a]\, \omega^{\langle a, u\rangle}` of the
    space-to-depth kernel :math:`K'[m, (c, r), a] = K[m, c, S a + r]` on the ``n/S`` grid (``K' = K`` at stride 1),
    taps folded modulo the grid when the kernel is larger. Computed without gradient in ``dtype`` (float64
    by default) by batched ``svdvals``, the per-frequency matrices formed in chunks of at most 2^24 entries; a
    one-tap kernel (1 x 1, or ``k <= S``) is one matrix at every frequency and is decomposed once.

    ``input_size``: int or tuple of ``d`` ints, each divisible by the stride (``ArgumentError`` otherwise).
    ``weight``: ``(M, C/groups, k_1, ..., k_d)`` with ``d`` in 1, 2, 3. A group whose kernel holds a NaN or an
    inf gets NaN values (no exception), as does :func:`linear_singular_values` for such a matrix.

    >>> import torch
    >>> k = torch.zeros(4, 1, 2, 2)
    >>> for r in range(2):
    ...     for s in range(2):
    ...         k[2 * r + s, 0, r, s] = 1.0        # space-to-depth: an orthogonal stride-2 conv
    >>> sv = conv_singular_values(k, 8, stride=2)
    >>> sv.shape, bool(torch.allclose(sv, torch.ones(64, dtype=torch.float64)))
    (torch.Size([64]), True)
    """
    return _conv_singular_values(weight, input_size, stride, groups, dtype, "conv_singular_values")


def _conv_singular_values(weight: torch.Tensor, input_size, stride, groups, dtype: torch.dtype,
                          what: str) -> torch.Tensor:
    """:func:`conv_singular_values`; ``what``, the public function the user called, starts the error messages."""
    _check_conv_weight(weight, what)
    _check_svd_inputs(weight, dtype, what)
    sizes, strides, grid = _grid(weight, input_size, stride)
    g = _groups(weight, groups)
    count = g * min(weight.shape[0] // g, weight.shape[1] * math.prod(strides)) * math.prod(grid)
    if count > _MAX_ENTRIES:
        raise ArgumentError(f"{what}: the operator on an input of size {sizes} at stride {strides} has "
                            f"{count} singular values (min(M, C*S^d) * prod(n/S) over {g} group(s)), more than "
                            f"{_MAX_ENTRIES} (2^31) to return at once: pass a smaller input_size")
    parts = []
    for mats, counts in _frequency_matrices(weight, input_size, stride, groups, dtype, what=what):
        sv = _batched_svdvals(mats)  # (B, r)
        missing = min(mats.shape[1], weight.shape[1] * math.prod(strides)) - sv.shape[1]
        if missing:
            # the zero columns of the residues no tap reads (_space_to_depth_kernel) add zero singular values
            # (NaN ones for a non-finite group, as its others: 0 * NaN)
            sv = torch.cat([sv, (sv[:, :1] * 0).expand(-1, missing)], dim=1)
        parts.append(torch.repeat_interleave(sv, counts.to(sv.device), dim=0).reshape(-1))
    return torch.sort(torch.cat(parts), descending=True).values


@torch.no_grad()
def linear_singular_values(weight: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    r"""Singular values (descending) of a 2-D weight ``out x in`` (``nn.Linear``), computed in ``dtype``.

    >>> import torch
    >>> linear_singular_values(torch.diag(torch.tensor([3.0, -1.0])))
    tensor([3., 1.], dtype=torch.float64)
    """
    _check_tensor(weight, "linear_singular_values")
    if weight.ndim != 2:
        raise ArgumentError(f"linear_singular_values expects a 2-D weight (out, in), got shape {tuple(weight.shape)}"
                            + (" (use conv_singular_values for convolutions)" if weight.ndim in _KIND else ""))
    return _linear_singular_values(weight, dtype, "linear_singular_values")


def _linear_singular_values(weight: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """:func:`linear_singular_values` of a 2-D weight; ``what`` starts the error messages."""
    _check_svd_inputs(weight, dtype, what)
    return _batched_svdvals(weight.detach().to(dtype)[None])[0]


def orthogonality_error(weight: torch.Tensor, input_size=None, stride=1, groups: int = 1) -> float:
    r""":math:`\max_i |\sigma_i - 1|` over all singular values of the layer's operator.

    A 2-D weight uses :func:`linear_singular_values`; a convolution weight uses :func:`conv_singular_values`
    on the circular operator with grid ``input_size`` (required for convolutions). Zero iff the layer is
    orthogonal (RO or CO, whichever its shape allows).

    >>> import torch
    >>> orthogonality_error(torch.eye(3)[:2])
    0.0
    >>> round(orthogonality_error(2 * torch.eye(3).reshape(3, 3, 1), input_size=4), 6)
    1.0
    """
    _check_tensor(weight, "orthogonality_error")
    if weight.ndim == 2:
        _linear_one(stride, "stride", "orthogonality_error")
        _linear_one(groups, "groups", "orthogonality_error")
        with torch.no_grad():
            sv = _linear_singular_values(weight, torch.float64, "orthogonality_error")
    else:
        _check_conv_weight(weight, "orthogonality_error")
        if input_size is None:
            raise ArgumentError("orthogonality_error needs input_size (the spatial size of the layer's input) "
                                "for a convolution weight: its singular values depend on the grid")
        with torch.no_grad():
            sv = _conv_singular_values(weight, input_size, stride, groups, torch.float64, "orthogonality_error")
    return float((sv - 1).abs().max())


#: Past this many Gram iterations the bound equals sigma_1 to float64 rounding (and 2^iterations overflows).
_MAX_GRAM_ITERATIONS = 60


@torch.no_grad()
def _gram_bound(mats: torch.Tensor, iterations: int) -> float:
    """max over the batch ``(B, m, n)`` of the Gram iteration bound on each matrix's largest singular value."""
    if mats.shape[-2] < mats.shape[-1]:
        mats = mats.mH  # same singular values, smaller Gram matrices
    g = mats
    real = g.real if g.is_complex() else g
    log_scale = torch.zeros(g.shape[0], dtype=real.dtype, device=g.device)
    def frobenius(x):  # without overflow for huge entries: scale by the largest modulus first
        top = x.abs().amax(dim=(-2, -1))
        top = torch.where(top > 0, top, torch.ones_like(top))
        return top * torch.linalg.matrix_norm(x / top[:, None, None])

    for _ in range(iterations):
        r = frobenius(g)  # (B,)
        r = torch.where(r > 0, r, torch.ones_like(r))
        g = g / r[:, None, None]
        log_scale = 2 * (log_scale + torch.log(r))
        g = g.mH @ g
    final = frobenius(g)
    bound_log = (log_scale + torch.log(final)) / 2.0 ** iterations
    return float(torch.exp(bound_log.max()))


def spectral_norm_bound(weight: torch.Tensor, input_size=None, stride=1, iterations: int = 6,
                        groups: int = 1) -> float:
    r"""Upper bound on the largest singular value by Gram iteration (Delattre et al., ICML 2023).

    :math:`G_1 = W`, :math:`G_{t+1} = G_t^H G_t` (each rescaled by its Frobenius norm, the scales kept in log
    space), and :math:`\sigma_1(W) \le \|G_{t}\|_F^{2^{-(t-1)}}` with ``t - 1 = iterations``; the ratio
    bound / :math:`\sigma_1` is at most :math:`\mathrm{rank}^{2^{-iterations}}` and usually much closer to 1.
    A 2-D weight is one matrix; a convolution weight (circular, grid ``input_size``, required) uses the batch of
    per-frequency matrices of :func:`conv_singular_values` and returns the largest per-matrix bound. Computed
    without gradient in float64 (a bound up to float64 rounding, about 1e-14 relative); returns a float.

    >>> import torch
    >>> w = torch.randn(20, 30, dtype=torch.float64)
    >>> s1 = float(torch.linalg.matrix_norm(w, 2))
    >>> s1 <= spectral_norm_bound(w) <= 1.05 * s1
    True
    """
    _check_tensor(weight, "spectral_norm_bound")
    iterations = _int(iterations, "iterations", minimum=0)
    if iterations > _MAX_GRAM_ITERATIONS:
        raise ArgumentError(f"spectral_norm_bound: iterations={iterations} is more than the {_MAX_GRAM_ITERATIONS} "
                            "that change anything in float64 (the bound's excess over sigma_1 is at most "
                            "rank^(2^-iterations)); pass at most that")
    _check_svd_inputs(weight, torch.float64, "spectral_norm_bound")
    if weight.ndim == 2:
        _linear_one(stride, "stride", "spectral_norm_bound")
        _linear_one(groups, "groups", "spectral_norm_bound")
        mats = weight.detach().to(torch.float64)[None]
    else:
        _check_conv_weight(weight, "spectral_norm_bound")
        if input_size is None:
            raise ArgumentError("spectral_norm_bound needs input_size (the spatial size of the layer's input) "
                                "for a convolution weight")
        return max(_gram_bound(mats, iterations)
                   for mats, _ in _frequency_matrices(weight, input_size, stride, groups, torch.float64,
                                                      what="spectral_norm_bound"))
    return _gram_bound(mats, iterations)


# ======================================================================================================
# Jacobian isometry (P2): stochastic estimators, exact singular values and spectral moments
# ======================================================================================================
#
# Notation. ``fn`` maps a tensor ``x`` (batch dimension first when batched) to a tensor ``y``; ``J`` is the
# Jacobian of the flattened map, ``m x n`` with ``n = x.numel()`` and ``m = y.numel()``, and ``A = J^T J``
# (``n x n``, eigenvalues ``sigma_i^2`` and ``n - rank`` zeros). Probes ``v`` are Rademacher vectors (entries
# +-1 with probability 1/2), so ``E[v v^T] = I`` and ``E[v^T M v] = tr M`` for every matrix ``M``.
#
# * ``full``:    ||A - I||_F^2         = E_v ||J^T (J v) - v||^2                      (one JVP, one VJP)
# * ``partial``: ||J A - J||_F^2       = E_v ||J r||^2 with r = J^T (J v) - v          (JVP, VJP, VJP of the VJP)
# * ``offdiag``: sum_{i != j} A_ij^2  = Var_v(||J v||^2) / 2                           (JVPs only)
#
# Derivations (ours, checked by tests/test_jacobian.py against dense float64 Jacobians):
#
# full. ||A v - v||^2 = v^T (A - I)^2 v, so its mean is tr (A - I)^2 = ||A - I||_F^2 (A symmetric). Its
#   variance is 2 sum_{i != j} ((A - I)^2)_ij^2 (Rademacher quadratic forms have no diagonal noise).
#   If m < n, A has n - m structural zero eigenvalues, so ||A - I||_F^2 = ||J J^T - I_m||_F^2 + (n - m): the
#   same gradient as row orthogonality, shifted by a constant.
# partial. (J A - J) v = J (A v - v) = J r, so E ||J r||^2 = ||J A - J||_F^2 = ||J J^T J - J||_F^2. It needs
#   three products with J (the quantity has degree 6 in J): u = J v (JVP), w = J^T u (VJP, which also gives
#   the full estimate's residual r = w - v) and J r. The last one costs no further forward pass: w = J^T c is
#   linear in the cotangent c, so J r is the VJP of the VJP, the gradient of <J^T c, r> with respect to c,
#   taken through the graph that the VJP already built.
# offdiag (OroJaR-style). q = ||J v||^2 = v^T A v = tr A + sum_{i != j} A_ij v_i v_j. The products
#   v_i v_j (i < j) are pairwise uncorrelated with variance 1, so Var q = 4 sum_{i<j} A_ij^2
#   = 2 sum_{i != j} A_ij^2. With L >= 2 independent probes the Bessel-corrected sample variance of
#   q_1..q_L is unbiased for Var q, hence T = s^2 / 2 is unbiased. A single Rademacher probe cannot give an
#   unbiased estimate: since v_i^2 = 1, one product A v does not separate A_ii A_jj from A_ij^2 (for n = 2 a short
#   calculation shows that no smooth function of (v, A v) has expectation 2 A_12^2 for every A). So ``offdiag``
#   always draws max(probes, 2) probes; each costs one JVP and no VJP, so two probes cost about one ``full`` probe.
#
# Batches. ``per_sample=False``: J is the Jacobian of the whole batch map. When the samples do not interact
# (every model in eval mode, any model without batch statistics), J is block-diagonal and each quantity is the
# sum of the per-sample ones. ``per_sample=True`` returns the mean over samples of the per-sample parts: for
# ``full`` the input-side blocks of the residual, for ``partial`` and ``offdiag`` the output-side blocks
# (J_b = rows of J belonging to output sample b). For independent samples this is exactly the mean over b of
# the quantity of the per-sample Jacobian dy_b/dx_b, at the cost of one probe for the whole batch. With
# BatchNorm in training mode the samples are coupled through the batch statistics: J has off-diagonal blocks
# dy_b/dx_c (of order 1/B) and the per-sample parts include them, so the result is the batch-coupled quantity
# split per sample, not that of dy_b/dx_b alone (evaluate in eval mode, or one sample per call, for that).
#
# Gradients. The estimate is differentiable with respect to fn's parameters (the products are computed with
# create_graph=True): it can be added to a loss. ``x`` is detached: the Jacobian is taken at the given point
# and no gradient flows into whatever produced ``x``. An ``nn.Module`` fn runs on copies of its buffers, so
# the estimator's extra forward passes do not move BatchNorm running statistics.
#
# Automatic differentiation. Forward mode is torch.func.jvp, reverse mode torch.autograd.grad with
# create_graph=True (outputs of torch.func.jvp stay connected to the outer autograd graph, so the estimate is
# differentiable with respect to parameters the function closes over; no functional_call of the parameters is
# needed). A module runs on copies of its buffers made inside the transformed function: torch.func refuses to
# mutate tensors captured from outside (BatchNorm's running statistics in training mode) but accepts tensors
# created inside. The core dual-number API (torch.autograd.forward_ad) is not used: in torch 2.13 a backward
# through its softmax/log_softmax tangents fails (a saved tensor is modified in place), torch.func.jvp's is fine.
# Forward mode runs the module with its broadcast parameters (biases, normalisation scales) passed as primals
# with zero tangents (_Call.tangent_parameters): the same values and graph, but no tangent is an "efficient zero
# tensor", whose broadcasting add falls to a slow decomposition (torch 2.11-2.13: x W^T + b with a plain bias
# cost about 6x the matmul). The estimate with its backward got 20-35% cheaper (a 64-layer MLP, a ResNet stage;
# CPU and GPU). Matrices and kernels keep no tangent: a zero one would cost a matmul or a convolution per layer.
# Inside that jvp (eager, no outer transform) _ExplicitTangents writes out the tangents of convolutions, linear
# maps and batch-statistics normalisations (torch's convolution jvp computed conv(x, 0) for the weight's missing
# tangent, addmm's multiplied x by it, and forward mode through the composed normalisation ran each op's formula),
# and the parameters of those layers get no zero tangent (_Call.written_out_parameters): one training step of the
# ResNet-18-like model with the jacobian preset went from 4891 to 3513 ATen ops (session 31, benchmarks/RESULTS.md).
#
# Cost. For ``full`` with one probe and its gradient: the forward (primal and tangent), the VJP, and the
# backward of all three (the tangent and the VJP depend on the forward's activations, so the forward is
# differentiated again): about three forward-and-backward passes of fn on top of the training step's own, so a
# step whose compute sits in regularised blocks costs about 4x a plain one. The block's output cannot reuse the
# jvp's primal: the estimate is taken at a detached input (so that its gradient shapes fn's parameters only),
# the output must stay connected to the input. Cheaper settings change the sampling, not the quantity:
# ``batch_fraction`` (a random subset of the samples) and the probe's ``every``.
#
# Scaled dot-product attention runs with the math backend during the estimate: the fused CPU/GPU kernels have
# neither forward-mode AD nor a double backward, the math backend has both (P2). Other forward-mode gaps (an op
# or a custom autograd.Function without a jvp) raise NotImplementedError or RuntimeError inside the JVP; the
# estimator then falls back to the double-VJP route: J v = d/dc <J^T c, v> (the VJP of the VJP, at c = 0),
# which needs a differentiable backward only (the regulariser's gradient needs one anyway).
#
# Under torch.compile. Dynamo does not trace torch.autograd.grad (the estimate used to be compiler-disabled, a
# graph break in every training step). While compiling, the estimate takes the double-VJP route written with
# torch.func.vjp (_FunctionalLinearisation): dynamo traces function transforms, and their outputs stay
# differentiable by the outer autograd, so aot_autograd derives the estimate's gradient with the rest of the
# step. The route is fixed at trace time (no fallback can run inside a graph), and it is the one with no
# forward-mode gaps. Same value and gradients as the eager routes (tests/test_compile.py); a torch.Generator
# cannot be created inside a compiled region, so seeded probes are eager-only. The probes are drawn with
# torch.randint_like there: torch.randint takes no symbolic sizes (a dynamic batch).

import contextlib as _contextlib  # noqa: E402  (this section's own imports)
import re as _re  # noqa: E402
import warnings as _warnings  # noqa: E402

from torch import nn as _nn  # noqa: E402

__all__ += ["jacobian_isometry", "jacobian_singular_values", "isometry_moments", "JACOBIAN_KINDS"]

#: The quantities :func:`jacobian_isometry` estimates.
JACOBIAN_KINDS = ("full", "partial", "offdiag")
#: Routes for the products with J: forward mode first (``auto``), forward mode only, or reverse mode only.
_ROUTES = ("auto", "jvp", "double_vjp")


def _sdpa_math():
    """Context in which scaled dot-product attention uses its composite math backend (or nothing to do)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return _contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _normalised(x: torch.Tensor, dims: list[int], eps: float) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over ``dims`` (biased variance), from elementary operations."""
    centred = x - x.mean(dims, keepdim=True)
    return centred * torch.rsqrt(centred.square().mean(dims, keepdim=True) + eps)


def _channel_affine(y: torch.Tensor, weight, bias) -> torch.Tensor:
    shape = [1, -1] + [1] * (y.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    return y if bias is None else y + bias.reshape(shape)


def _in_opmath(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the precision torch's elementwise kernels compute a half-precision tensor in (float32)."""
    return x.float() if x.dtype in HALF_PRECISION else x


def _composable(x) -> bool:
    """Whether a composition may take ``x`` (a floating-point tensor); other inputs go to torch's op."""
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _hardsigmoid(x: torch.Tensor) -> torch.Tensor:
    r""":math:`\min(\max(x + 3, 0), 6) / 6` by selections, twice differentiable: torch's values (equal on CPU, half
    precision computed in float32 like its kernel) and torch's derivative convention, 1/6 on the open interval
    (-3, 3) and 0 at the kinks -3 and 3 (``hardsigmoid_backward``; a clamp's derivative would be 1/6 there). The 1/6
    is exact in x's dtype (torch's backward uses float32's in every dtype: 0.16666667163 in float64). For
    ``-3 < x < 3``, ``x + 3`` is in ``[0, 6]`` after rounding, so no clamp is needed inside; a NaN stays NaN."""
    h = _in_opmath(x)
    return (torch.where(h <= -3, 0.0, torch.where(h >= 3, 6.0, h + 3)) / 6).to(x.dtype)


def _glu(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``a * sigmoid(b)`` for the halves ``a, b`` of ``x`` along ``dim``: torch's GLU values on CPU (float16 within
    1 ulp: its kernel rounds some ties differently, 18 of 6M values in a sweep)."""
    a, b = _in_opmath(x).chunk(2, dim)
    return (a * torch.sigmoid(b)).to(x.dtype)


#: The calls of hardsigmoid a block may make (``nn.Hardsigmoid`` calls ``F.hardsigmoid``, which calls the
#: ``torch._C._nn`` ones; the ATen overloads are those of a graph captured with torch.export), and the in-place ones.
_HARDSIGMOIDS_IN_PLACE = {torch._C._nn.hardsigmoid_, torch.ops.aten.hardsigmoid_.default}
_HARDSIGMOIDS = {F.hardsigmoid, torch._C._nn.hardsigmoid, torch.ops.aten.hardsigmoid.default} | _HARDSIGMOIDS_IN_PLACE
#: The calls of GLU (``nn.GLU`` calls ``F.glu``).
_GLUS = {F.glu, torch._C._nn.glu, torch.ops.aten.glu.default}


class _ComposedOps(torch.overrides.TorchFunctionMode):
    """Ops whose torch derivatives are wrong or missing at second order, computed from elementary operations.

    The estimate's products with J are derivatives of the block, and the penalty's gradient differentiates them
    again: the block's ops need correct second derivatives (third ones on the reverse-only route). The estimate
    runs its block under this mode, whose compositions differentiate correctly to every order; everything else,
    and everything outside the estimate, is torch's own op. In torch 2.13:

    * layer, batch (with batch statistics) and instance normalisation: the kernels have wrong second-order
      derivatives through forward mode: the gradient of a ``torch.func.jvp`` tangent of ``F.layer_norm``,
      ``F.batch_norm(training=True)`` or ``F.instance_norm`` fails ``gradcheck``, and so does the third derivative
      that the reverse-only route needs (values and first derivatives are right). The penalty's gradient through
      a block holding one of them came out wrong (e.g. -96 against a finite difference of -14.7 for a Linear +
      BatchNorm1d block in training mode). Composed here from mean, centred square and rsqrt. Running statistics
      are not updated: a module's estimate runs on copies of its buffers anyway (see :class:`_Call`).
      Normalisation with running statistics (eval mode) keeps torch's kernel, which is affine in the input and
      correct.
    * hardsigmoid (``nn.Hardsigmoid``, the gate of MobileNetV3's squeeze-excitation): ``hardsigmoid_backward``
      has no derivative, so the training backward failed on every route ("derivative for
      aten::hardsigmoid_backward is not implemented"). Composed by :func:`_hardsigmoid`, in place too.
    * GLU: its forward-mode tangent (``glu_jvp``) has no derivative, so routes ``jvp`` and ``auto`` failed in the
      training backward, after the estimate (too late for ``auto``'s fallback). Composed by :func:`_glu`.

    The compositions of hardsigmoid and GLU give torch's values (float16 GLU within 1 ulp) and first derivatives
    (within an ulp: with an upstream gradient ``g`` the composition's ``g / 6`` is not always torch's
    ``g * (1/6)``); calls they do not cover (an ``out=`` argument, an input that is no floating-point tensor, a GLU
    dimension of odd size) go to torch, which computes them or raises its own error. Under torch.compile, Dynamo
    does not show this mode ``F.hardsigmoid`` (see :func:`_holds_hardsigmoid`). ``normalisations=False`` leaves the
    normalisations to torch (an estimate without gradient: their first and second derivatives are right).
    """

    def __init__(self, normalisations: bool = True):
        super().__init__()
        self.normalisations = normalisations
        #: whether the block called torch.cdist with p=2 (eagerly): the error for its missing second derivative
        #: then names the compute mode that has one (:func:`_second_order_remedy`)
        self.euclidean_cdist = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.normalisations:
            if func is F.layer_norm:
                return self._layer_norm(*args, **kwargs)
            if func is F.batch_norm:
                return self._batch_norm(func, *args, **kwargs)
            if func is F.instance_norm:
                return self._instance_norm(func, *args, **kwargs)
        if func is torch.cdist and not torch.compiler.is_compiling():
            self.euclidean_cdist |= (args[2] if len(args) > 2 else kwargs.get("p", 2.0)) == 2
        out = None
        if func in _HARDSIGMOIDS:
            out = self._hardsigmoid(func, *args, **kwargs)
        elif func in _GLUS:
            out = self._glu(*args, **kwargs)
        return func(*args, **kwargs) if out is None else out

    @staticmethod
    def _hardsigmoid(func, input=None, inplace=False, **other):
        if other or not _composable(input):
            return None
        y = _hardsigmoid(input)
        # in place as torch's: the composition saved no reference to the input for its backward, so writing it is safe
        return input.copy_(y) if inplace or func in _HARDSIGMOIDS_IN_PLACE else y

    @staticmethod
    def _glu(input=None, dim=-1, **other):
        if other or not _composable(input) or not isinstance(dim, int) or not -input.dim() <= dim < input.dim() \
                or input.shape[dim] % 2:
            return None  # torch's error (a 0-d input, a dimension out of range or of odd size)
        return _glu(input, dim)

    @staticmethod
    def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        y = _normalised(input, list(range(input.dim() - len(shape), input.dim())), eps)
        if weight is not None:
            y = y * weight
        return y if bias is None else y + bias

    @staticmethod
    def _batch_norm(func, input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                    eps=1e-5):
        if not training and running_mean is not None and running_var is not None:
            return func(input, running_mean, running_var, weight, bias, training, momentum, eps)
        _batch_statistics_check(input)
        return _channel_affine(_normalised(input, [0] + list(range(2, input.dim())), eps), weight, bias)

    @staticmethod
    def _instance_norm(func, input, running_mean=None, running_var=None, weight=None, bias=None,
                       use_input_stats=True, momentum=0.1, eps=1e-5):
        if not use_input_stats:
            return func(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
        return _channel_affine(_normalised(input, list(range(2, input.dim())), eps), weight, bias)


def _batch_statistics_check(input: torch.Tensor) -> None:
    if input.numel() == input.shape[1]:
        # torch refuses it ("Expected more than 1 value per channel when training"); normalised here it was
        # zero, a Jacobian of 0 and an estimate without gradient (batch_fraction can leave one sample)
        raise ArgumentError(
            f"a BatchNorm in training mode got one value per channel (input {tuple(input.shape)}) in the "
            "Jacobian estimate: its batch statistics need more than one sample. Give the estimate more samples "
            "(a larger batch_fraction or batch), or put the BatchNorm in eval mode")


def _dual(t) -> tuple:
    """``(primal, tangent)`` of ``t`` at the current forward-mode level (tangent None when it carries none, or
    when ``t`` is None)."""
    return (t, None) if t is None else tuple(_fwad.unpack_dual(t))


class _ExplicitTangents(torch.overrides.TorchFunctionMode):
    r"""Tangents of convolutions, linear maps and batch-statistics normalisations written out, inside the
    forward-mode route's ``torch.func.jvp`` (eager, outside any other ``torch.func`` transform: the duals there
    are plain tensors of level 0, see :func:`_jvp_products`).

    Fewer ATen ops (kernel launches on a GPU, where the estimate is launch-bound) for the same tangent:

    * ``conv(x, W, b)`` and ``linear(x, W, b)`` with no tangent on ``W``: :math:`y' = \mathrm{conv}(x', W)
      (+ b')`. torch's formulas (``convolution_jvp``, ``addmm``'s) give the missing weight tangent an efficient
      zero tensor and still record ``conv(x, 0)`` (materialised zeros and an add) or multiply ``x`` by it.
    * normalisation with batch (or instance / layer) statistics over dims ``D``, computed as
      :class:`_ComposedOps` does (``c = x - mean_D x``, ``r = (mean_D c^2 + eps)^{-1/2}``, ``y = c r``, then
      ``w y + b``): :math:`y' = r (c' - y \, \mathrm{mean}_D(y c'))` with :math:`c' = x' - \mathrm{mean}_D x'`
      (from :math:`v' = 2\,\mathrm{mean}_D(c c')` and :math:`r' = -r^3 v' / 2`), then :math:`w y' (+ w' y + b')`:
      7 ops, where forward mode through the composition ran the formulas of each op (about 35 ops per layer).

    The tangents are ordinary differentiable tensors (``make_dual`` keeps them as they are), so the estimate's
    gradient goes through them like through torch's formulas; the primal is computed as before. Anything else,
    or a weight that carries a tangent (conv, linear), goes to torch's own formula.

    >>> conv = torch.nn.Conv2d(2, 3, 3)
    >>> x, v = torch.randn(1, 2, 5, 5), torch.randn(1, 2, 5, 5)
    >>> with _ExplicitTangents():
    ...     _, u = torch.func.jvp(conv, (x,), (v,))
    >>> bool(torch.allclose(u, torch.nn.functional.conv2d(v, conv.weight), atol=1e-6))
    True
    """

    _CONVS = {F.conv1d, F.conv2d, F.conv3d}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._CONVS or func is F.linear:
            out = self._affine_map(func, *args, **kwargs)
        elif func is F.batch_norm:
            out = self._batch_norm(*args, **kwargs)
        elif func is F.instance_norm:
            out = self._instance_norm(*args, **kwargs)
        elif func is F.layer_norm:
            out = self._layer_norm(*args, **kwargs)
        else:
            out = None
        return func(*args, **kwargs) if out is None else out

    @staticmethod
    def _affine_map(func, input, weight, bias=None, *rest, **kwargs):
        x, x_t = _dual(input)
        if x_t is None or _fwad.unpack_dual(weight).tangent is not None:
            return None
        bias, b_t = _dual(bias)
        return _fwad.make_dual(func(x, weight, bias, *rest, **kwargs), func(x_t, weight, b_t, *rest, **kwargs))

    @staticmethod
    def _normalisation(input, dims: list[int], eps: float, weight, bias, shape) -> torch.Tensor | None:
        x, x_t = _dual(input)
        if x_t is None:
            return None
        centred = x - x.mean(dims, keepdim=True)
        r = torch.rsqrt(centred.square().mean(dims, keepdim=True) + eps)
        y = centred * r
        c_t = x_t - x_t.mean(dims, keepdim=True)
        y_t = torch.addcmul(c_t, y, (y * c_t).mean(dims, keepdim=True), value=-1) * r
        if weight is not None:
            w, w_t = _dual(weight)
            w = w.reshape(shape)
            y_t = y_t * w if w_t is None else torch.addcmul(y_t * w, y, w_t.reshape(shape))
            y = y * w
        if bias is not None:
            b, b_t = _dual(bias)
            y = y + b.reshape(shape)
            if b_t is not None:
                y_t = y_t + b_t.reshape(shape)
        if weight is None and bias is None:
            # the tangent's backward saved y: an in-place op of the block on the output (InstanceNorm2d, whose
            # default has no affine part, then ReLU(inplace=True)) would write it, and the estimate's backward failed
            y = y.clone()
        return _fwad.make_dual(y, y_t)

    @classmethod
    def _batch_norm(cls, input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                    eps=1e-5):
        if not training and running_mean is not None and running_var is not None:
            return None
        _batch_statistics_check(input)
        return cls._normalisation(input, [0] + list(range(2, input.dim())), eps, weight, bias,
                                  [1, -1] + [1] * (input.dim() - 2))

    @classmethod
    def _instance_norm(cls, input, running_mean=None, running_var=None, weight=None, bias=None,
                       use_input_stats=True, momentum=0.1, eps=1e-5):
        if not use_input_stats:
            return None
        return cls._normalisation(input, list(range(2, input.dim())), eps, weight, bias,
                                  [1, -1] + [1] * (input.dim() - 2))

    @classmethod
    def _layer_norm(cls, input, normalized_shape, weight=None, bias=None, eps=1e-5):
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        return cls._normalisation(input, list(range(input.dim() - len(shape), input.dim())), eps, weight, bias,
                                  list(shape))


class _ForwardModeGap(NotImplementedError):
    """The forward-mode route's signal (from :class:`_NoForwardModeGaps`) that ``op`` has no reliable forward-mode
    derivative: route ``auto`` falls back to the double-VJP route; route ``jvp`` turns it into an orthofx error
    naming the op and the estimate (:func:`_jacobian_isometry`)."""

    def __init__(self, op: str):
        super().__init__(f"{op} has no reliable forward-mode derivative; use route 'auto' (falls back) or "
                         "'double_vjp'")
        self.op = op


#: The starts of torch's messages refusing forward mode (torch 2.13): an op without a forward-AD formula, a custom
#: ``autograd.Function`` without ``jvp`` (both ``NotImplementedError``), one without ``setup_context``, which
#: ``torch.func.jvp`` refuses (``RuntimeError``).
_FORWARD_MODE_REFUSALS = ((NotImplementedError, "Trying to use forward AD with "),
                          (NotImplementedError, "You must implement the jvp function for custom autograd.Function"),
                          (RuntimeError, "In order to use an autograd.Function with functorch transforms"))


def _forward_mode_refusal(exc: BaseException) -> bool:
    """Whether torch raised ``exc`` because forward mode cannot run an op (:data:`_FORWARD_MODE_REFUSALS`), or an
    orthofx op did (:class:`~orthofx.nn.tracing.ForwardModeRefusal`). Other errors are the block's own (a shape
    mismatch, a ``NotImplementedError`` of the user's code, a backward that raises) and pass through as they are."""
    if isinstance(exc, ForwardModeRefusal):
        return True
    text = str(exc)
    return any(type(exc) is kind and text.startswith(start) for kind, start in _FORWARD_MODE_REFUSALS)


class _JvpRouteError(ArgumentError, NotImplementedError):
    """Route ``"jvp"`` met an op without a reliable forward-mode derivative (:class:`_ForwardModeGap`): an
    :class:`~orthofx.errors.ArgumentError` (the route is the caller's choice) that is still the
    ``NotImplementedError`` a missing forward-mode formula raises, which callers of ``jacobian_isometry`` caught."""


class _LayerJvpRouteError(LayerArgumentError, _JvpRouteError):
    """:class:`_JvpRouteError` of a :class:`~orthofx.nn.JacobianProbe` (a layer's argument)."""


#: torch's messages (torch 2.13) for a backward that has no derivative of its own: an op without an autograd formula
#: (RuntimeError), one whose formula is ``not_implemented`` (NotImplementedError); group 1 names the op.
_SECOND_ORDER_GAPS = ((RuntimeError, _re.compile(r"derivative for (?:aten::)?([\w.]+) is not implemented")),
                      (NotImplementedError, _re.compile(r"the derivative for '([^']+)' is not implemented")))


def _second_order_gap(exc: BaseException) -> str | None:
    """The op torch names when it raised ``exc`` for a backward it cannot differentiate (:data:`_SECOND_ORDER_GAPS`),
    else None."""
    for kind, pattern in _SECOND_ORDER_GAPS:
        match = pattern.search(str(exc)) if type(exc) is kind else None
        if match:
            return match.group(1)
    return None


class _SecondOrderGapError(ArgumentError, NotImplementedError):
    """The block holds an op whose backward torch cannot differentiate, which the estimate needs: an
    :class:`~orthofx.errors.ArgumentError` naming the block and the op, and still the ``NotImplementedError`` (a
    ``RuntimeError``) that torch raised."""


class _LayerSecondOrderGapError(LayerArgumentError, _SecondOrderGapError):
    """:class:`_SecondOrderGapError` of a :class:`~orthofx.nn.JacobianProbe`'s block."""


def _second_order_remedy(op: str, composed: _ComposedOps) -> str:
    """What to do instead of ``op`` (the op torch named), where a twice-differentiable form exists in torch: a
    Euclidean ``torch.cdist`` (p=2, which the block called) has one; its other norms have none."""
    if op == "_cdist_backward" and composed.euclidean_cdist:
        return "call torch.cdist with compute_mode='use_mm_for_euclid_dist' (p=2), which has second derivatives, or "
    return ""


def _raise_second_order_gap(exc: BaseException, f: _Call, what: str, composed: _ComposedOps) -> None:
    """Raise :class:`_SecondOrderGapError` (from ``exc``) when torch raised ``exc`` for a backward without a
    derivative in the block ``f``; return otherwise. ``composed``: the estimate's mode (which saw the block's calls).

    Only where the estimate itself differentiates twice: route ``double_vjp`` (and ``auto`` after a fallback), and
    ``jvp``'s ``partial`` estimate (a VJP of its JVP). With ``kind`` full / offdiag, routes ``jvp`` and ``auto``
    take first derivatives only (the tangent, and a VJP of the output), and the missing derivative surfaces in the
    training loss's ``backward()``, outside orthofx, as torch's own error."""
    op = _second_order_gap(exc)
    if op is None:
        return
    probe = f.label is not None
    error = _LayerSecondOrderGapError if probe else _SecondOrderGapError
    block = f" ({type(f.fn).__name__})" if isinstance(f.fn, _nn.Module) else ""
    # a probe comes from a rule, whose match can leave the block out; a direct call just measures another block
    leave_out = ("Leave the block out of the jacobian_isometry rule (exclude: [its name] in the rule's match) and "
                 "regularise blocks without the op" if probe else "Measure a block without the op")
    raise error(
        f"{what}: the block{block} holds an op that torch cannot differentiate (or differentiate twice) as the "
        f"Jacobian estimate needs (torch: {first_line(str(exc))}): the estimate's products with J are derivatives "
        f"of the block, and the penalty's gradient differentiates them again. {leave_out}, or "
        f"{_second_order_remedy(op, composed)}write the op in the block from twice-differentiable operations"
    ) from exc


class _NoForwardModeGaps(torch.overrides.TorchFunctionMode):
    """Raise :class:`_ForwardModeGap` (the forward-mode route's signal to fall back to the double-VJP route) at ops
    whose forward mode is silently wrong in torch 2.13: custom operators (``torch.library`` ops, orthofx's own
    ``eigh_stable`` / ``svd_stable`` among them, get a zero tangent instead of an error when they have no
    forward-mode formula: the estimate treated the decomposition as a constant and came out biased low) and
    ``torch.linalg.eigh`` (its tangent's gradient is NaN, so the penalty's gradient was NaN through a
    decorrelated BatchNorm), and the ops of :data:`_WRONG_TANGENT_GRADIENTS`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        custom = isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) \
            and func.namespace not in ("aten", "prims")
        if func is torch.linalg.eigh or custom or _wrong_tangent_gradient(func):
            raise _ForwardModeGap(str(getattr(func, "__name__", func)))
        return func(*args, **(kwargs or {}))


#: The calls whose forward-mode tangent has a wrong gradient in torch 2.13, found by gradcheck of ``torch.func.jvp``
#: tangents: determinants and solves (their tangent formulas read the LU factors, outputs torch does not
#: differentiate, so the penalty's gradient through a block holding ``torch.linalg.det`` came out about 4x off) and
#: Householder products. Their reverse-mode derivatives are right: route ``auto`` takes the double-VJP route there.
_WRONG_TANGENT_GRADIENTS = frozenset({
    torch.linalg.det, torch.det, torch.Tensor.det, torch.linalg.slogdet, torch.slogdet, torch.Tensor.slogdet,
    torch.logdet, torch.Tensor.logdet, torch.linalg.solve, torch.linalg.solve_ex, torch.linalg.tensorsolve,
    torch.linalg.householder_product, torch.orgqr, torch.Tensor.orgqr})
#: The same as ATen ops (a graph captured with torch.export), by name.
_WRONG_TANGENT_GRADIENT_OPS = frozenset({
    "det", "linalg_det", "_linalg_det", "slogdet", "linalg_slogdet", "_linalg_slogdet", "logdet", "linalg_solve",
    "linalg_solve_ex", "_linalg_solve_ex", "linalg_tensorsolve", "linalg_householder_product", "orgqr"})


def _wrong_tangent_gradient(func) -> bool:
    """Whether ``func`` (a call a :class:`~torch.overrides.TorchFunctionMode` sees) is one of
    :data:`_WRONG_TANGENT_GRADIENTS` or an ATen overload of one."""
    if isinstance(func, torch._ops.OpOverload):
        return func.namespace == "aten" and func.__name__.split(".")[0] in _WRONG_TANGENT_GRADIENT_OPS
    return func in _WRONG_TANGENT_GRADIENTS


#: torch's normalisation layers whose forward writes no buffer but ``num_batches_tracked`` and, through a native
#: ``F.batch_norm`` / ``F.instance_norm`` with batch statistics, the running statistics (see
#: :meth:`_Call._buffer_state`); subclasses may do more, and are not among them.
_PLAIN_NORMS = (_nn.BatchNorm1d, _nn.BatchNorm2d, _nn.BatchNorm3d, _nn.InstanceNorm1d, _nn.InstanceNorm2d,
                _nn.InstanceNorm3d)


def _uses_batch_statistics(norm: _nn.Module) -> bool:
    """Whether a BatchNorm / InstanceNorm normalises by its input's statistics (training mode, or no running
    statistics kept) rather than by its running ones."""
    return norm.training or not norm.track_running_stats


class _Call:
    """``fn`` as a callable of one tensor ``x``, the Jacobian's variable.

    A plain callable is called as it is. An ``nn.Module`` runs on copies of the buffers it may write or read
    (cast to ``dtype`` when given, as are its floating-point parameters; see :meth:`_buffer_state`), so calling it
    leaves its running statistics untouched; ``rest`` and ``kwargs`` are further arguments held fixed (a block's
    other inputs). ``params`` overrides some of the module's parameters for one call: the forward-mode route passes
    them as primals of ``torch.func.jvp`` with zero tangents (see :meth:`tangent_parameters`). ``x`` is passed on
    as a copy: the Jacobian's variable is a leaf that requires grad, which a block opening with an in-place op
    (``nn.ReLU(inplace=True)``) may not write.
    """

    def __init__(self, fn, rest: tuple = (), kwargs: dict | None = None, dtype: torch.dtype | None = None,
                 label: str | None = None):
        if not isinstance(fn, _nn.Module) and not callable(fn):
            raise ArgumentError(f"fn must be a callable or an nn.Module, got {type(fn).__name__}")
        self.fn = fn
        self.rest = tuple(rest)
        self.kwargs = dict(kwargs or {})
        self.dtype = dtype
        # a JacobianProbe's label: fn is its block, and _check_output refuses an output that is not one tensor
        # naming the layer
        self.label = label

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t

    def __call__(self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        module = self.fn
        x = x.clone()
        if not isinstance(module, _nn.Module):
            return module(x, *self.rest, **self.kwargs)
        state = self._buffer_state()
        if self.dtype is not None:
            state.update({name: self._cast(p) for name, p in module.named_parameters()})
        if params:
            state.update(params)
        # the copies of the buffers keep BatchNorm's running statistics where they are; ConvNorm's running filters
        # are not buffers: held instead
        with running_filters_held(module):
            if not state:
                return module(x, *self.rest, **self.kwargs)
            return torch.func.functional_call(module, state, (x, *self.rest), self.kwargs, strict=False,
                                              tie_weights=True)

    def _buffer_state(self) -> dict[str, torch.Tensor | None]:
        """The buffers a call of the module runs on: copies (cast to ``dtype`` when given) of those its forward
        may write or read, so that the module's own stay where they are and the estimate's graph holds none of them.

        Eagerly, without ``dtype``, torch's BatchNorm / InstanceNorm layers (:data:`_PLAIN_NORMS`) are spared the
        copies they do not need (one ATen op each, three per BatchNorm: a kernel launch on a GPU): layers that
        normalise with their running statistics (eval mode) keep ``num_batches_tracked`` uncopied (they do not
        read it), and while :class:`_ComposedOps` runs the normalisations with batch statistics, which read and
        update no running statistic, training-mode layers keep theirs uncopied and get
        ``num_batches_tracked=None``: BatchNorm's forward then skips its increment (and, with ``momentum=None``,
        the host read of the count), whose only use is the running update the composed normalisation does not
        make. The running statistics an eval-mode layer reads are still copied: the estimate's graph saves them
        for its backward, and a later training-mode forward of the layer updates them in place without a version
        bump (its gradient then came out silently wrong), a user's in-place edit made the backward fail. Under
        ``torch.compile`` every buffer is copied, as before."""
        module = self.fn
        kept: dict[str, torch.Tensor | None] = {}
        if self.dtype is None and not torch.compiler.is_compiling():
            composed = any(isinstance(mode, _ComposedOps) and mode.normalisations
                           for mode in torch.overrides._get_current_function_mode_stack())
            for path, norm in module.named_modules():
                if type(norm) not in _PLAIN_NORMS:
                    continue
                prefix = f"{path}." if path else ""
                if not _uses_batch_statistics(norm):
                    kept.update({prefix + name: b for name, b in norm.named_buffers(recurse=False)
                                 if name == "num_batches_tracked"})
                elif composed:
                    kept.update({prefix + name: None if name == "num_batches_tracked" else b
                                 for name, b in norm.named_buffers(recurse=False)})
        state = {name: self._cast(b).clone() for name, b in module.named_buffers() if name not in kept}
        # functional_call needs only the replaced buffers; None ones are replaced by None
        state.update({name: None for name, b in kept.items() if b is None})
        return state

    def tangent_parameters(self) -> dict[str, torch.Tensor]:
        """The module's parameters that are likely combined with activations by broadcasting (at most one
        dimension, or a dimension of size 1: biases, normalisation scales, embeddings added to a sequence).

        Speed only. A parameter outside a forward-mode transform has an undefined tangent, and ops such as
        ``x W^T + b`` then add an efficient zero tensor to the tangent, which torch 2.13 broadcasts through a slow
        decomposition (about 0.2 ms per add on CPU, several times the add itself). Passing these parameters as
        primals with explicit zero tangents keeps every tangent a plain tensor; the values, and the graph to the
        parameters, are the same. Matrices and kernels are left out: a zero tangent there would cost a second
        matmul or convolution per layer.
        """
        if not isinstance(self.fn, _nn.Module) or self.dtype is not None:
            return {}
        return {name: p for name, p in self.fn.named_parameters() if p.dim() <= 1 or 1 in p.shape}

    def written_out_parameters(self) -> set[str]:
        """Names of the parameters of the module's Linear, Conv1d/2d/3d and batch-statistics normalisation layers
        (BatchNorm in training mode or without running statistics, InstanceNorm using its input's statistics,
        LayerNorm), whose tangents :class:`_ExplicitTangents` writes out: there a parameter without a tangent costs
        nothing, and a zero tangent from :meth:`tangent_parameters` would cost one more product per use (``y w'``).
        A subclass that uses its parameters otherwise only loses that saving (torch's formula then gives them an
        efficient zero tangent, with the same values)."""
        if not isinstance(self.fn, _nn.Module):
            return set()
        names = set()
        for path, module in self.fn.named_modules():
            written_out = isinstance(module, (_nn.Linear, _nn.Conv1d, _nn.Conv2d, _nn.Conv3d, _nn.LayerNorm)) or (
                isinstance(module, (_nn.modules.batchnorm._BatchNorm, _nn.modules.instancenorm._InstanceNorm))
                and _uses_batch_statistics(module))
            if written_out:
                names.update(f"{path}.{name}" if path else name for name, _ in module.named_parameters(recurse=False))
        return names

    def subset(self, index: torch.Tensor, batch: int) -> "_Call":
        """The same function on the samples ``index`` of a batch of ``batch``: the fixed tensor arguments whose
        first dimension is ``batch`` are indexed alike (a mask or a second input that goes with the samples)."""
        def pick(a):
            return a[index] if isinstance(a, torch.Tensor) and a.ndim > 0 and a.shape[0] == batch else a
        return _Call(self.fn, tuple(pick(a) for a in self.rest), {k: pick(a) for k, a in self.kwargs.items()},
                     self.dtype, self.label)


def _as_function(fn, dtype: torch.dtype | None = None) -> _Call:
    """``fn`` as a callable of one tensor (see :class:`_Call`); a :class:`_Call` is returned as it is."""
    return fn if isinstance(fn, _Call) and dtype is None else _Call(fn, dtype=dtype)


def _refuse_inference_mode(what: str) -> None:
    """Refuse a Jacobian measure under ``torch.inference_mode()``: autograd records nothing there, and
    ``torch.enable_grad()`` does not lift it, so every product with the Jacobian came out zero (the estimate of
    an exact isometry was that of a zero map, the singular values of a module zeros), silently."""
    if torch.compiler.is_compiling() or not torch.is_inference_mode_enabled():
        return
    raise ArgumentError(
        f"{what}: called under torch.inference_mode(), where autograd records nothing (torch.enable_grad() does "
        "not lift it), so the Jacobian would come out zero. Call it outside torch.inference_mode(); "
        "torch.no_grad() is fine (the measure enables gradients itself)")


def _as_estimate(call):
    """``call()`` as a Jacobian estimate: :class:`~orthofx.nn.JacobianProbe` layers in training mode it runs only
    run their blocks (:func:`orthofx.nn.jacobian.as_estimate`; imported here, at the call: that module imports
    this one)."""
    from orthofx.nn.jacobian import as_estimate
    return as_estimate(call)


def _detached_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` detached, as the Jacobian's variable: a copy when ``x`` is an inference tensor (one made under
    ``torch.inference_mode()``, e.g. a batch kept from an evaluation loop), on which torch refuses
    ``requires_grad_`` outside inference mode."""
    x = x.detach()
    return x.clone() if not torch.compiler.is_compiling() and x.is_inference() else x


def known_empty(x: torch.Tensor) -> bool:
    """Whether ``x`` has no elements, an empty batch, as far as its size tells without a data-dependent guard:
    a static size; under torch.compile a backed symbolic batch (0 and 1 are specialised, so dynamo knows it is at
    least 2: no guard, no recompilation); ``False`` for an unbacked size (a batch selected by a mask inside a
    compiled graph), where asking would raise dynamo's "Could not guard on data-dependent expression"."""
    return guard_or_false(x.numel() == 0)


def _at_least_one(size):
    """``size``, or ``sym_max(size, 1)`` where torch.compile cannot know it is nonzero (an unbacked size: a batch
    selected by a mask inside the compiled graph, which :func:`known_empty` cannot tell empty). Dividing an empty
    batch's sum by it gives 0, the penalty an eager probe has for an empty batch, instead of NaN; a known nonzero
    size (every eager size, a backed dynamic one) is returned as it is: the same graph and values as before."""
    return size if statically_known_true(size != 0) else torch.sym_max(size, 1)


def _mean_or_zero(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` (one per sample), or 0 for no values where torch.compile cannot know their number
    (:func:`_at_least_one`)."""
    count = values.shape[0]
    return values.mean() if statically_known_true(count != 0) else values.sum() / _at_least_one(count)


def _check_input(x, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ArgumentError(f"{what}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ArgumentError(f"{what}: x must be a real floating-point tensor (a Jacobian needs a continuous input), "
                            f"got dtype {x.dtype}")


def _check_output(y, x: torch.Tensor, per_sample: bool, what: str, f: _Call | None = None) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) and f is not None and f.label is not None:
        raise LayerArgumentError(
            f"{f.label} ({type(f.fn).__name__}): the block returns a {type(y).__name__}, not one tensor, so it has no "
            "single input-output Jacobian to regularise. Select a module of yours that calls it and returns one "
            "tensor (such as the block holding it with its residual), or the layers after it, or wrap it in a module "
            "that returns the output to regularise")
    if not isinstance(y, torch.Tensor):
        raise ArgumentError(f"{what}: fn must return a single tensor, got {type(y).__name__}; wrap fn so that it "
                            "returns the output to measure")
    if not y.is_floating_point():
        # an integer or boolean output is piecewise constant (its Jacobian is zero where it exists), and autograd
        # cannot carry a probe through it: the estimate either failed inside torch or measured ||-I||^2
        raise ArgumentError(f"{what}: fn must return a real floating-point tensor, got dtype {y.dtype}; measure the "
                            "continuous output before any rounding, argmax or comparison")
    if per_sample and (y.ndim == 0 or x.ndim == 0 or y.shape[0] != x.shape[0]):
        raise ArgumentError(f"{what}: per_sample=True needs input and output with the same batch size in dimension "
                            f"0, got input {tuple(x.shape)} and output {tuple(y.shape)}")
    return y


def _rademacher(like: torch.Tensor, generator: torch.Generator | None, shift: int = 0) -> torch.Tensor:
    """A Rademacher probe (+-1 entries) shaped like ``like``. ``shift`` (under torch.compile) makes this draw's
    arguments differ from every other draw of the graph (:func:`_jacobian_isometry`'s ``draw_shift``)."""
    if generator is None and torch.compiler.is_compiling():
        # torch.randint cannot take the symbolic sizes of a dynamic batch, randint_like can. aot_autograd's
        # common-subexpression elimination (torch 2.13) does not count randint_like as random and merged a graph's
        # draws with equal arguments (every probe of an estimate the first one, two probes of one input alike): the
        # range is shifted by ``shift`` and the draw shifted back, the same bits from the same generator state
        bits = torch.randint_like(like, -shift, 2 - shift, dtype=torch.int64) + shift
        return (2 * bits - 1).to(like.dtype)
    device = generator.device if generator is not None else like.device
    # drawn in the probe's dtype (the same draws as int64 bits: one random number per entry below 2**32), then
    # 2 b - 1 in place: 3 ATen ops where int64 bits, 2 b - 1 and a cast took 4
    bits = torch.randint(0, 2, like.shape, generator=generator, device=device, dtype=like.dtype)
    return bits.mul_(2).sub_(1).to(like.device)


def _vjp(output: torch.Tensor, inputs: torch.Tensor, cotangent: torch.Tensor) -> torch.Tensor:
    """``J^T cotangent`` through the graph of ``output`` (create_graph); zeros where ``output`` does not depend on
    ``inputs``."""
    if not output.requires_grad:
        return torch.zeros_like(inputs)
    (grad,) = torch.autograd.grad(output, inputs, cotangent, create_graph=True, allow_unused=True)
    return torch.zeros_like(inputs) if grad is None else grad


def _squared(t: torch.Tensor, per_sample: bool) -> torch.Tensor:
    """``||t||^2`` (a scalar), or per sample (shape ``(B,)``; a sample may be a scalar). A half-precision ``t`` is
    squared and summed in float32: in float16 the sum over one 16 x 32 x 32 feature map passed 65504 (inf), and
    bfloat16's 8 bits swamp the variance ``offdiag`` takes of these sums."""
    if t.dtype in HALF_PRECISION:
        t = t.float()
    if not per_sample:
        return t.square().sum()
    # explicit sizes: torch cannot infer a -1 next to a batch that may be 0 (an unbacked size under torch.compile,
    # :func:`known_empty`) and asserts it nonzero at run time, an opaque error for an empty batch
    return t.reshape(t.shape[0], math.prod(t.shape[1:])).square().sum(1)


def _estimate_dtype(products: torch.Tensor) -> torch.dtype:
    """The dtype of a Jacobian estimate built from ``products`` (the block's ``J v``): theirs, but float32 for
    half-precision ones under ``torch.autocast`` (a reduction, as autocast's own sums and losses); outside autocast a
    half-precision block (``model.half()``) gets its own dtype back, after the float32 sums (:func:`_squared`)."""
    if products.dtype in HALF_PRECISION and autocast_enabled(products.device.type):
        return torch.float32
    return products.dtype


_FORWARD_AD_READY = False


def _prepare_forward_ad() -> None:
    """Forward-mode AD loads its decompositions on first use, through ``torch.jit.script``, which warns that it is
    deprecated: load them once here with that warning silenced (torch's internals, nothing the user can act on)."""
    global _FORWARD_AD_READY
    if _FORWARD_AD_READY:
        return
    with _warnings.catch_warnings():
        _warnings.filterwarnings("ignore", category=DeprecationWarning)
        with _fwad.dual_level():
            _fwad.make_dual(torch.zeros(1), torch.zeros(1))
    _FORWARD_AD_READY = True


def _jvp_products(f: _Call, xp: torch.Tensor, v: torch.Tensor, kind: str, per_sample: bool, what: str):
    """Forward-mode route for one probe: u = J v by torch.func.jvp, then the VJPs ``kind`` needs."""
    _prepare_forward_ad()
    params = f.tangent_parameters()
    explicit = _contextlib.nullcontext()
    if not (in_func_transform() or torch.compiler.is_compiling()):
        # the duals of this (outermost) jvp are plain tensors, whose tangents _ExplicitTangents can write
        explicit = _ExplicitTangents()
        if params:
            written_out = f.written_out_parameters()
            params = {name: p for name, p in params.items() if name not in written_out}
    with _NoForwardModeGaps(), explicit:
        if params:  # zero tangents for the broadcast parameters (speed, see _Call.tangent_parameters)
            zeros = {name: torch.zeros_like(p) for name, p in params.items()}
            y, u = torch.func.jvp(f, (xp, params), (v, zeros))
        else:
            y, u = torch.func.jvp(f, (xp,), (v,))
    _check_output(y, xp, per_sample, what, f)
    if kind == "offdiag":
        return u, None
    if kind == "full":
        return u, _vjp(y, xp, u) - v
    # partial: w = J^T (u + c) at c = 0, so that J r = d/dc <w, r> reuses the graph of w (VJP of the VJP).
    c = torch.zeros_like(u, requires_grad=True)
    w = _vjp(y, xp, u + c)
    return u, _vjp(w, c, w - v)


class _Linearisation:
    """Reverse-mode-only route: one forward pass, ``g(c) = J^T c`` at ``c = 0`` built once, then for any probe
    ``J v = d/dc <g(c), v>`` (the VJP of the VJP) and ``J^T u`` from the forward graph."""

    def __init__(self, f, xp: torch.Tensor, per_sample: bool, what: str):
        self.xp = xp
        self.y = _check_output(f(xp), xp, per_sample, what, f)
        self.c = torch.zeros_like(self.y, requires_grad=True)
        self.g = _vjp(self.y, xp, self.c)

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        return _vjp(self.g, self.c, v) if self.g.requires_grad else torch.zeros_like(self.y)

    def transpose(self, u: torch.Tensor) -> torch.Tensor:
        """``J^T u``."""
        return _vjp(self.y, self.xp, u)

    def products(self, v: torch.Tensor, kind: str):
        u = self.jvp(v)
        if kind == "offdiag":
            return u, None
        r = self.transpose(u) - v
        return u, (r if kind == "full" else self.jvp(r))


class _FunctionalLinearisation(_Linearisation):
    """The reverse-mode-only route written with ``torch.func.vjp`` instead of ``torch.autograd.grad``, for
    ``torch.compile``: dynamo traces function transforms into the graph (it stops at ``torch.autograd.grad``), and
    their results stay differentiable by the outer autograd, so the compiled step's backward takes the estimate's
    gradient like any other term. ``J^T c`` is ``vjp_fn(c)``; ``J v`` is the VJP of that linear map, taken at
    ``c = 0``."""

    def __init__(self, f, xp: torch.Tensor, per_sample: bool, what: str):
        self.y, self._vjp_fn = torch.func.vjp(f, xp)
        _check_output(self.y, xp, per_sample, what, f)
        _, self._transpose_vjp = torch.func.vjp(self.transpose, torch.zeros_like(self.y))

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        return self._transpose_vjp(v)[0]

    def transpose(self, u: torch.Tensor) -> torch.Tensor:
        return self._vjp_fn(u)[0]


def _check_fraction(batch_fraction, what: str) -> float:
    """``batch_fraction`` as a float in (0, 1]: a real number (:func:`~orthofx.theory._real`: numpy's and 0-d
    arrays' and tensors' too, ``np.float32(0.5)`` read from a config; never a bool)."""
    value = _real(batch_fraction)
    if value is None or not 0 < value <= 1:  # NaN too
        raise ArgumentError(f"{what}: batch_fraction must be a number in (0, 1], got {batch_fraction!r}")
    return value


def _subsample(f: _Call, x: torch.Tensor, batch_fraction: float, generator: torch.Generator | None, what: str):
    """``(f, x, scale)`` on a uniformly random subset of ``ceil(batch_fraction * B)`` samples (without
    replacement); ``scale = B / b`` turns the subset's sum over samples into an unbiased estimate of the batch's."""
    if batch_fraction >= 1:
        return f, x, 1.0
    if x.ndim == 0:
        raise ArgumentError(f"{what}: batch_fraction < 1 needs a batch dimension first, got a 0-d input")
    batch = x.shape[0]
    size = max(1, math.ceil(round(batch_fraction * batch, 9)))  # round: 0.6 * 5 is 3.0000000000000004
    if size >= batch:
        return f, x, 1.0
    device = generator.device if generator is not None else x.device
    # no generator= keyword without a generator: torch.randperm(n, generator=None) takes the overload whose fake
    # kernel specialises n, so a compiled probe with a dynamic batch recompiled for every batch size
    draw = {"generator": generator} if generator is not None else {}
    index = torch.randperm(batch, device=device, **draw)[:size].to(x.device)
    return f.subset(index, batch), x[index], batch / size


#: The most Rademacher probes one estimate takes (a typo such as 10**6 ran for hours, or unrolled a compiled graph).
MAX_JACOBIAN_PROBES = 1024


def jacobian_probe_count(probes, what: str, error: type[ArgumentError] = ArgumentError) -> int:
    """``probes`` as an int in ``1 .. MAX_JACOBIAN_PROBES``, else ``error`` starting with ``what``: the one check
    (and wording) of the bound, for :func:`jacobian_isometry` and :class:`orthofx.nn.jacobian.JacobianProbe`.
    Each probe v is one more product J v per estimate, and the estimate's variance falls only as 1/probes.

    Example: ``jacobian_probe_count(4, "jacobian_isometry")`` is 4; ``2000`` raises :class:`ArgumentError`."""
    probes = _int(probes, f"{what}: probes", error)
    if probes > MAX_JACOBIAN_PROBES:
        raise error(f"{what}: probes={probes} is more than {MAX_JACOBIAN_PROBES}: each probe is one more "
                    "Jacobian-vector product per estimate (unrolled under torch.compile), and the estimate's "
                    "variance falls only as 1/probes; use fewer, or an exact Jacobian for small blocks")
    return probes


def _jacobian_isometry(fn, x: torch.Tensor, probes: int = 1, kind: str = "full", per_sample: bool = False,
                       generator: torch.Generator | None = None, normalize: bool = False,
                       create_graph: bool = True, route: str = "auto", batch_fraction: float = 1.0,
                       what: str = "jacobian_isometry",
                       error: type[_JvpRouteError] = _JvpRouteError, draw_shift: int = 0,
                       full_precision: bool = False) -> tuple[torch.Tensor, str]:
    """:func:`jacobian_isometry` and the route it took (``"jvp"`` or ``"double_vjp"``); ``what`` starts the
    error messages (a probe names its layer), ``error`` is the type of the one for an op that route ``"jvp"``
    cannot run (a probe's is :class:`_LayerJvpRouteError`). ``draw_shift``: the probes' draws under torch.compile
    are ``_rademacher(x, ..., draw_shift + i)``; a JacobianProbe passes its own multiple of
    :data:`MAX_JACOBIAN_PROBES`, so that no two draws of one compiled graph have equal arguments (the values are
    those of the unshifted draws). ``full_precision``: the estimate of half-precision products is returned in the
    float32 of its sums (:func:`_squared`), not rounded to :func:`_estimate_dtype`: a JacobianProbe's penalty
    multiplies it by its weight first (a float16 estimate above 65504 is inf where the weighted one fits)."""
    _check_input(x, what)
    _one_of(kind, JACOBIAN_KINDS, "kind", what)
    _one_of(route, _ROUTES, "route", what)
    probes = jacobian_probe_count(probes, what)
    for name, value in (("per_sample", per_sample), ("normalize", normalize), ("create_graph", create_graph)):
        _flag(value, name, what)
    check_generator(generator, what, "reproducible probes")
    if per_sample and x.ndim == 0:
        raise ArgumentError(f"{what}: per_sample=True needs a batch dimension first, got a 0-d input")
    if known_empty(x):
        # undefined whatever the options: the mean over no samples (per_sample) and the division by no input
        # dimensions (normalize) are NaN, which would poison a loss it is added to, and the plain value (an empty
        # sum) would pass a zero off as a measurement
        raise ArgumentError(f"{what}: x is empty (shape {tuple(x.shape)}, no elements): the estimate needs at least "
                            "one sample with at least one input value, and over none it is undefined (NaN with "
                            "per_sample or normalize). Skip the estimate for an empty batch (a JacobianProbe does: "
                            "it makes no estimate for one, and its penalty is zero)")
    batch_fraction = _check_fraction(batch_fraction, what)
    f, xs, scale = _subsample(_as_function(fn), x, batch_fraction, generator, what)
    batched = per_sample or scale != 1.0  # the output's dimension 0 must be the samples'
    count = max(probes, 2) if kind == "offdiag" else probes
    compiling = torch.compiler.is_compiling()
    if compiling and _holds_hardsigmoid(f):
        return _eager_jacobian_isometry(fn, x, probes, kind, per_sample, generator, normalize, create_graph, route,
                                        batch_fraction, what, error, draw_shift, full_precision)
    if compiling:  # one route, fixed at trace time: no fallback inside a compiled graph (see the section comment)
        route = "double_vjp"
    # torch.func differentiates with respect to xp itself; autograd.grad needs a leaf that requires grad (which
    # dynamo refuses to create inside a compiled region)
    xp = _detached_input(xs) if compiling else _detached_input(xs).requires_grad_(True)
    values: list[torch.Tensor] = []  # per probe: residual norms (full, partial) or ||J v||^2 (offdiag)
    returned = None  # the estimate's dtype (_estimate_dtype of the first probe's products)
    # the estimate's value needs the second derivatives of the block's ops on the double-VJP route, and its gradient
    # (create_graph) them all: torch's normalisations are right to first order, so composed only for the gradient
    composed = _ComposedOps(normalisations=create_graph)
    with torch.enable_grad(), _sdpa_math(), composed:
        linear = None
        for index in range(count):
            v = _rademacher(xp, generator, draw_shift + index)  # distinct arguments for each draw: no CSE merge
            if route != "double_vjp":
                try:
                    u, residual = _jvp_products(f, xp, v, kind, batched, what)
                except torch.OutOfMemoryError:
                    raise  # not a forward-mode gap: falling back for good would hide it
                except (NotImplementedError, RuntimeError, FuncTransformRefusal) as exc:
                    # a FuncTransformRefusal: a layer writing its state in place (ConvNorm's running filter in
                    # training mode) refuses torch.func, which the double-VJP route (autograd.grad) does not use
                    if route == "jvp" and (isinstance(exc, _ForwardModeGap) or _forward_mode_refusal(exc)):
                        op, cause = "an op", ""
                        if isinstance(exc, _ForwardModeGap):
                            op = exc.op
                        else:
                            source = "orthofx" if isinstance(exc, ForwardModeRefusal) else "torch"
                            cause = f" ({source}: {first_line(str(exc)) or type(exc).__name__})"
                        raise error(
                            f"{what}: route 'jvp' (forward mode only) cannot run {op} in the block: it has no "
                            f"reliable forward-mode derivative{cause}. Use route 'auto' (forward mode, falling "
                            "back to the double-VJP route at such ops) or 'double_vjp'") from exc
                    if route == "jvp":
                        _raise_second_order_gap(exc, f, what, composed)
                        raise
                    route = "double_vjp"
                else:
                    route = "jvp"
            if route == "double_vjp":
                try:
                    if linear is None:
                        linear = (_FunctionalLinearisation if compiling else _Linearisation)(f, xp, batched, what)
                    u, residual = linear.products(v, kind)
                except (NotImplementedError, RuntimeError) as exc:
                    _raise_second_order_gap(exc, f, what, composed)
                    raise
            values.append(_squared(u if kind == "offdiag" else residual, per_sample))
            if returned is None:
                returned = _estimate_dtype(u)
        if count == 1:
            estimate = values[0]  # the mean of one value, without a stack and a mean (two ATen ops and their backward)
        elif kind == "offdiag":
            estimate = torch.stack(values).var(dim=0, correction=1) / 2  # values (count,) or (count, b)
        else:
            estimate = torch.stack(values).mean(dim=0)
        if per_sample:
            estimate = _mean_or_zero(estimate)  # the subset's mean is unbiased for the batch's mean
        elif scale != 1.0:
            estimate = estimate * scale  # the subset's sum, scaled to the batch
        if normalize:
            # the sizes' product, not x[0].numel(): x[0] is an ATen op
            estimate = estimate / _at_least_one(math.prod(x.shape[1:]) if per_sample else x.numel())
        if not full_precision or returned not in HALF_PRECISION:
            estimate = estimate.to(returned)
    return (estimate if create_graph else estimate.detach()), route


def _holds_hardsigmoid(f: _Call) -> bool:
    """Whether the block ``f`` holds an ``nn.Hardsigmoid`` (in a submodule).

    Under torch.compile, Dynamo puts ``F.hardsigmoid`` (and ``F.hardswish``) into the graph without calling the
    active TorchFunctionModes (torch 2.13: they are not among ``torch.overrides.get_overridable_functions()``), so
    :class:`_ComposedOps` never sees them there, and the penalty's gradient failed on torch's missing derivative of
    ``hardsigmoid_backward``. Such a block's estimate runs eagerly (:data:`_eager_jacobian_isometry`). A
    ``F.hardsigmoid`` called in a forward's own code cannot be seen from here: it still fails under compile."""
    return isinstance(f.fn, _nn.Module) and any(isinstance(m, _nn.Hardsigmoid) for m in f.fn.modules())


#: :func:`_jacobian_isometry` run eagerly inside a compiled region (a graph break), where :class:`_ComposedOps`
#: composes hardsigmoid (see :func:`_holds_hardsigmoid`); same value and gradients as the eager call.
_eager_jacobian_isometry = torch.compiler.disable(_jacobian_isometry, recursive=True)


def jacobian_isometry(fn, x: torch.Tensor, probes: int = 1, kind: str = "full", per_sample: bool = False,
                      generator: torch.Generator | None = None, *, normalize: bool = False,
                      create_graph: bool = True, route: str = "auto", batch_fraction: float = 1.0) -> torch.Tensor:
    r"""Unbiased stochastic estimate of how far the Jacobian ``J`` of ``fn`` at ``x`` is from an isometry (P2).

    Args:
        fn: a callable or ``nn.Module`` mapping one tensor to one tensor. A module runs on copies of its buffers
            (BatchNorm running statistics are not updated by the estimate).
        x: the input (batch dimension first when batched); detached, so the gradient of the estimate reaches
            fn's parameters only. An empty ``x`` (no elements, such as a batch of 0) raises an
            :class:`~orthofx.errors.ArgumentError` whatever ``per_sample`` and ``normalize`` are: the estimate is
            undefined there (a mean over no samples, a division by no input dimensions); skip the call for it.
            Under ``torch.compile`` a batch whose size is data-dependent (selected by a mask inside the compiled
            graph, or marked unbacked) cannot be told empty while tracing: for it the estimate is 0.
        probes: number of Rademacher probes averaged (``offdiag`` uses ``max(probes, 2)``: it is a variance).
        kind: ``"full"``: :math:`\|J^T J - I\|_F^2` (``I`` the identity of the input dimension; for a wide
            Jacobian, ``m < n``, this is :math:`\|J J^T - I_m\|_F^2 + n - m`); ``"partial"``:
            :math:`\|J J^T J - J\|_F^2`, zero for partial isometries (e.g. ``relu(Qx + b)``, P2);
            ``"offdiag"``: :math:`\sum_{i \ne j} (J^T J)_{ij}^2` (OroJaR: orthogonal columns of any norm).
        per_sample: ``False``: ``J`` is the Jacobian of the whole batch map (for independent samples, the sum over
            samples); ``True``: the mean over samples of the per-sample parts (exactly the mean of the
            per-sample Jacobians' values when samples do not interact; with BatchNorm in training mode the
            cross-sample blocks of the coupled Jacobian are included, see the section comment).
        generator: draws the probes (a fixed seed gives a deterministic estimate, e.g. for finite differences).
        normalize: divide by the input dimension (per sample when ``per_sample``): for ``full`` this is
            :math:`(m_1 - 1)^2 + (m_2 - m_1^2)` of :func:`isometry_moments`, comparable across layer sizes.
        create_graph: keep the graph (default) so the estimate can be used as a regulariser; ``False`` returns
            a detached value.
        route: ``"auto"`` (forward mode, falling back to the double-VJP route when an op or a custom
            ``autograd.Function`` has no forward-mode formula), ``"jvp"`` (forward mode only: an
            :class:`~orthofx.errors.ArgumentError`, also a ``NotImplementedError``, at an op without a reliable
            forward-mode derivative such as ``torch.linalg.eigh``) or ``"double_vjp"``. Under
            ``torch.compile`` every route is the double-VJP one, written with ``torch.func.vjp`` (traceable).
        batch_fraction: estimate on a uniformly random subset of ``b = ceil(batch_fraction * B)`` of the ``B``
            samples (dimension 0), drawn with ``generator``; ``1`` (default) uses the whole batch. For independent
            samples the batch quantity is the sum of per-sample ones, so the subset's value scaled by ``B / b``
            (``per_sample=False``) or its mean over samples (``per_sample=True``) is unbiased for the whole
            batch's, with more variance; the cost of the estimate shrinks by about ``b / B``. With BatchNorm in
            training mode the subset is normalised with its own batch statistics: the estimate is then that of
            the ``b``-sample batch map (coupling terms of order ``1 / b``), not of the ``B``-sample one, and a
            normalisation over few values (BatchNorm1d on a few samples) makes that quantity larger and
            heavy-tailed; there, estimate less often (``every`` of the pass) rather than on fewer samples.

    Cost per probe: ``full`` one JVP + one VJP; ``partial`` one JVP + one VJP + one VJP of the VJP (no extra
    forward pass); ``offdiag`` one JVP. With the gradient of the estimate, ``full`` costs about three times a
    forward and backward pass of ``fn`` on the (sub)batch: forward, tangent and VJP, then the backward of each
    (the VJP and the tangent depend on the forward's activations, so the forward is differentiated too).
    Returns a 0-d tensor in the dtype of ``fn``'s output; for a half-precision output the squares are summed in
    float32, and the result is float32 under ``torch.autocast`` (like autocast's own reductions).

    Gradients are enabled for the estimate, so ``torch.no_grad()`` around the call is fine; under
    ``torch.inference_mode()``, where autograd records nothing, it raises :class:`~orthofx.errors.ArgumentError`.
    An inference tensor ``x`` (made under inference mode) is copied. The estimate's passes through
    :class:`~orthofx.nn.JacobianProbe` layers in training mode only run their blocks: the probes make no
    estimate, and the one pending for ``orthofx.penalty`` stays.

    >>> import torch
    >>> q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    >>> x = torch.randn(3, 5, dtype=torch.float64)
    >>> float(jacobian_isometry(lambda x: torch.abs(x @ q.T), x, create_graph=False)) < 1e-20   # a plain value
    True
    """
    _refuse_inference_mode("jacobian_isometry")
    # the estimate's passes through a model with JacobianProbes in training mode are extra forward passes, not
    # calls of a step: the probes only run their blocks (route 'double_vjp' made them estimate again, replacing
    # the pending penalty term; the other routes were refused by the probes)
    return _as_estimate(lambda: _jacobian_isometry(
        fn, x, probes=probes, kind=kind, per_sample=per_sample, generator=generator, normalize=normalize,
        create_graph=create_graph, route=route, batch_fraction=batch_fraction)[0])


def _jacobian_matrix(f, x: torch.Tensor) -> torch.Tensor:
    """Dense Jacobian of ``f`` at ``x``, shape ``y.shape + x.shape``: torch.func.jacrev, or the loop of
    torch.autograd.functional.jacobian when a function transform refuses ``f`` (e.g. BatchNorm in training
    mode, which mutates its buffers, an old-style autograd.Function, or an orthofx layer's refusal:
    :class:`~orthofx.nn.tracing.FuncTransformRefusal`)."""
    with torch.enable_grad(), _sdpa_math():
        try:
            return torch.func.jacrev(f)(x)
        except (RuntimeError, NotImplementedError, FuncTransformRefusal):
            # autograd's loop runs what a function transform refuses (a FuncTransformRefusal: on the copies of its
            # buffers that _Call gives it)
            pass
        return torch.autograd.functional.jacobian(f, x)


def jacobian_singular_values(fn, x: torch.Tensor, per_sample: bool = False,
                             dtype: torch.dtype | None = None) -> torch.Tensor:
    r"""Exact singular values (descending) of the Jacobian of ``fn`` at ``x``, from the dense Jacobian.

    For small widths only: the Jacobian has ``y.numel() x x.numel()`` entries. ``per_sample=False`` decomposes
    the Jacobian of the whole (flattened) map and returns ``min(m, n)`` values; ``per_sample=True`` decomposes the
    diagonal blocks :math:`\partial y_b / \partial x_b` (exact even when samples interact) and returns shape
    ``(B, r)``. ``dtype`` (e.g. ``torch.float64``) casts ``x`` and, for an ``nn.Module``, its floating-point
    parameters and buffers for the computation (the module itself is not changed; a plain callable only sees
    the cast input). Without gradient. A module runs on copies of its buffers. A float16 / bfloat16 Jacobian is
    decomposed in float32 (the values are then float32). Not under ``torch.inference_mode()`` (an
    :class:`~orthofx.errors.ArgumentError`; ``torch.no_grad()`` is fine); :class:`~orthofx.nn.JacobianProbe`
    layers in training mode only run their blocks (the estimate pending for ``orthofx.penalty`` stays).

    >>> import torch
    >>> lin = torch.nn.Linear(3, 2, bias=False)
    >>> s = jacobian_singular_values(lin, torch.randn(3), dtype=torch.float64)
    >>> torch.allclose(s, torch.linalg.svdvals(lin.weight.double()))
    True
    """
    what = "jacobian_singular_values"
    _check_input(x, what)
    _refuse_inference_mode(what)
    _flag(per_sample, "per_sample", what)
    if dtype is not None and not _is_real_float_dtype(dtype):
        raise ArgumentError(f"jacobian_singular_values: dtype must be None or a real floating-point torch.dtype "
                            f"(e.g. torch.float64), got {dtype!r}")
    f = _as_function(fn, dtype)
    x = _detached_input(x if dtype is None else x.to(dtype))
    if per_sample and x.ndim == 0:
        raise ArgumentError(f"{what}: per_sample=True needs a batch dimension first, got a 0-d input")
    if x.is_meta:
        raise ArgumentError(f"{what}: x is on the meta device (no values): a Jacobian needs real tensors")
    # JacobianProbes in training mode only run their blocks (see jacobian_isometry): the no_grad check below made
    # them drop the pending penalty term, and a fallback to torch.autograd.functional.jacobian estimated again
    def measure() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            output = _check_output(f(x), x, per_sample, what, f)
        return output, _jacobian_matrix(f, x).detach()

    y, jac = _as_estimate(measure)
    if jac.is_meta:
        raise ArgumentError(f"{what}: fn's output is on the meta device (meta parameters?): no values to decompose")
    if jac.dtype in HALF_PRECISION:  # no SVD in half precision: decompose in float32
        jac = jac.float()
    if not per_sample:  # (a non-finite Jacobian gives NaN values, see _batched_svdvals)
        return _batched_svdvals(jac.reshape(1, y.numel(), x.numel()))[0]
    batch = x.shape[0]
    rows, columns = math.prod(y.shape[1:]), math.prod(x.shape[1:])  # per sample (y[0] fails on an empty batch)
    if batch == 0:
        return jac.new_zeros(0, min(rows, columns))
    blocks = jac.reshape(batch, rows, batch, columns)
    index = torch.arange(batch, device=blocks.device)
    diagonal = blocks[index, :, index, :]  # (B, m_b, n_b)
    return _batched_svdvals(diagonal)


def isometry_moments(singular_values: torch.Tensor, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(m1, m2)``: mean and mean square of the eigenvalues :math:`\lambda_i = \sigma_i^2` of :math:`J^T J`.

    The moments are taken over the last dimension (batched input gives batched moments). ``n`` is the number of
    eigenvalues of :math:`J^T J`, the input dimension; when it exceeds the number of singular values given (a
    Jacobian with fewer rows than columns), the missing eigenvalues are zeros. Then

    .. math::

        \|J^T J - I\|_F^2 = \sum_i (\lambda_i - 1)^2 = n \left[(m_1 - 1)^2 + (m_2 - m_1^2)\right],

    the squared distance of the spectrum's mean from 1 plus its variance (P2): isometry needs both.

    The moments are computed and returned in float32, or float64 for a float64 input (the wider of the input's
    dtype and float32): :math:`\sigma^4` overflows float16 once :math:`\sigma > 16` (65504 is its largest
    value) and loses bfloat16's few digits in the sum, whereas singular values of half-precision layers often
    come in those dtypes.

    >>> import torch
    >>> m1, m2 = isometry_moments(torch.tensor([1.0, 1.0]))
    >>> float(m1), float(m2)
    (1.0, 1.0)
    """
    if not isinstance(singular_values, torch.Tensor) or singular_values.ndim == 0:
        raise ArgumentError("isometry_moments expects a tensor of singular values with at least one dimension")
    if singular_values.is_complex() or not singular_values.is_floating_point():
        # singular values are real: a complex tensor's square is not sigma^2, a bool one holds no magnitudes
        raise ArgumentError(f"isometry_moments: singular_values must be a real floating-point tensor, got dtype "
                            f"{singular_values.dtype}; pass e.g. torch.linalg.svdvals(J) or "
                            "jacobian_singular_values(fn, x)")
    count = singular_values.shape[-1]
    if n is None and count == 0:
        raise ArgumentError(f"isometry_moments: no singular values (shape {tuple(singular_values.shape)}) and no n: "
                            "pass n, the input dimension (the eigenvalues of J^T J are then all zero)")
    n = count if n is None else _int(n, "isometry_moments: n (the layer width)")
    if n < count:
        raise ArgumentError(f"isometry_moments: n must be at least the number of singular values ({count}), got {n}")
    # float16's sigma^4 overflows past sigma = 16; promote before squaring (float64 input stays float64)
    eig = singular_values.to(torch.promote_types(singular_values.dtype, torch.float32)).square()
    return eig.sum(-1) / n, eig.square().sum(-1) / n
