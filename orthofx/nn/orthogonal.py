r"""Exactly orthogonal convolutions and linear layers, usable on their own.

A convolution with kernel :math:`K \in \mathbb{R}^{M \times C \times k_1 \times \dots \times k_d}`, stride
:math:`S` and circular boundary is a matrix :math:`\mathcal{K}` with :math:`M (n/S)^d` rows and :math:`C n^d`
columns on an input grid :math:`n^d` (``n`` divisible by ``S``). It is *row orthogonal* (RO,
:math:`\mathcal{K}\mathcal{K}^T = I`) when :math:`M \le C S^d` and *column orthogonal* (CO,
:math:`\mathcal{K}^T\mathcal{K} = I`) otherwise. P0's Theorem 4 says when such a kernel exists
(:func:`orthofx.theory.orthogonal_conv_exists`): RO iff :math:`M \le C k^d`, CO iff :math:`S \le k`
(per group; per dimension :math:`M \le C \prod_i \min(k_i, S_i)` and :math:`S_i \le k_i`). The layers here
build, for *every* architecture the theorem admits, a kernel that is orthogonal to float rounding
(:math:`\max|\sigma - 1| \le 10^{-5}` in float32 on every grid divisible by the stride), as a differentiable
function of unconstrained parameters, and raise :class:`orthofx.errors.ImpossibleLayerError` (quoting the
theorem's condition with the layer's numbers) for the others.

Construction (per group; the math, checked numerically in ``tests/test_orthogonal_layers.py``)
--------------------------------------------------------------------------------------------------

1. *Orthonormal matrices.* :func:`orthonormal` maps a ``p x q`` matrix to one with orthonormal columns
   (``p >= q``) or rows (``p < q``): the ``Q`` factor of a Householder QR of the tall orientation with the signs of
   ``diag(R)`` moved into ``Q``, so that an orthonormal input is returned unchanged. Cost :math:`O(pq\min(p,q))`.

2. *Two-tap blocks.* For a symmetric orthogonal projector :math:`P = QQ^T` (``Q`` with ``r`` orthonormal
   columns), the stride-1 kernel ``[P, I - P]`` along one spatial dimension has the Fourier symbol
   :math:`P + (I - P)e^{i\omega}`, which is unitary for every :math:`\omega` (the two projectors are
   complementary), so the circular convolution with it is orthogonal on every grid. Stride-1 circular
   convolutions compose into one convolution whose kernel is the *full* convolution of the kernels (matrix
   products over channels, sums over taps ``a + b = p``); applying a block to a kernel ``T`` is
   :math:`T'[p] = T[p-1] + P\,(T[p] - T[p-1])`. Composing ``k' - 1`` blocks per dimension gives a square
   ``n -> n`` orthogonal kernel ``A`` of size ``k'`` (the product over dimensions of the 1-D chains,
   :math:`A[p, q] = T_1[p]\,T_2[q]`). Ranks alternate between ``n // 2`` and ``n - n // 2`` along each
   dimension, so that consecutive blocks can be complementary (their product is then a pure one-tap shift).
   With ``n = 1`` (one channel per group) a block is ``z`` (rank 0) or the identity (rank 1): the block part is a
   pure shift by the count of rank-0 blocks, a discrete choice per group and dimension held in the buffer
   ``block_shift`` (not trained; the centre by default, the best one for a nearest start), and only the matrix
   below has parameters.

3. *Reshaped kernel.* With stride ``S`` and a kernel of size :math:`r_i = \min(k_i, S_i) \le S_i`, the windows
   do not overlap, so the strided convolution is the matrix :math:`W \in \mathbb{R}^{M \times C\prod r_i}`
   applied independently to every (space-to-depth) patch: it is RO iff ``W`` has orthonormal rows, CO iff ``W``
   has orthonormal columns and :math:`r = S` (every input pixel read once).

4. *Composition.* The layer's kernel is :math:`K = R \star A` (``A`` first, stride 1, kernel
   :math:`k'_i = k_i - S_i + 1` when :math:`k_i \ge S_i`, else 1; then ``R`` at stride ``S``), of size
   :math:`k'_i + r_i - 1 = k_i`. A square orthogonal ``A`` keeps both kinds:
   :math:`(RA)(RA)^T = RR^T = I` and :math:`(RA)^T(RA) = A^TR^TRA = I`. This covers stride 1 with odd or even
   ``k``, ``S <= k``, ``k < S`` in the RO case (no blocks: the zero-padded reshaped kernel alone), ``M < C`` and
   ``M > C``. At stride 1, ``R`` is the 1x1 matrix ``W`` (``M x C``, the rows of a bigger square orthogonal
   convolution when ``M < C``); when ``M > C`` at stride 1 the input is embedded first instead,
   :math:`K = A \circ E` with ``A`` square on ``M`` channels and ``E`` (``M x C``) with orthonormal columns, a
   richer family (an orthogonal 1x1 ``H`` after the blocks would be redundant: :math:`H\,[P, I-P] =
   [HPH^T, I - HPH^T]\,H`). Grouped convolutions are built per group (all groups batched).

5. *Dilation.* At stride 1 a dilated convolution's symbol is its undilated symbol evaluated at
   :math:`\omega D`, still unitary, so the same kernel is orthogonal with any dilation. At stride ``S`` with
   :math:`g = \gcd(D, S)`, write :math:`D = gD'`, :math:`S = gS'`: tap ``p`` reads input ``S i + D p``, so the
   layer reads every ``g``-th input only (a selection, orthonormal rows) and acts there as a stride-``S'``
   convolution with dilation ``D'`` coprime to ``S'``. For coprime ones tap ``p = \rho + S' m`` lands in phase
   :math:`D'\rho \bmod S'` (a permutation of the phases) at block offset :math:`\lfloor D'\rho/S' \rfloor +
   D'm`, so the polyphase matrix is the undilated one's evaluated at :math:`z^{D'}`, its columns permuted and
   multiplied by unimodular phases: :math:`EE^H` and :math:`E^HE` keep the undilated values on the unit circle.
   Hence the kernel is built for stride ``S'`` (per dimension) and applied with stride ``S`` and dilation ``D``:
   exactly orthogonal on every grid divisible by the stride, RO when ``g > 1`` (``M <= C prod min(k, S')``),
   RO or CO when ``g = 1``, which is :func:`orthofx.theory.orthogonal_conv_exists`'s domain with dilation
   (``k = 1`` ignores dilation). Checked against dense operators in ``tests/test_orthogonal_layers.py``.

6. *Cayley-FFT* (``method="cayley_fft"``, Trockman & Kolter, ICLR 2021; for one fixed input size ``n``). Per
   group, after a space-to-depth rearrangement by the stride (``C' = C S^d`` channels on the ``n/S`` grid, an
   orthogonal permutation), an unconstrained real kernel ``V`` (``N x N x k_p``, :math:`N = \max(M, C')`,
   :math:`k_p = \lceil k / S \rceil`, taps centred) gives per frequency ``f`` of the ``n/S`` grid the
   skew-Hermitian :math:`A(f) = \hat V(f) - \hat V(f)^H` and the unitary Cayley transform
   :math:`Q(f) = (I - A)(I + A)^{-1}`; the layer is :math:`y = \mathrm{IFFT}(Q_{:M, :C'}(f)\,
   \mathrm{FFT}(x'))`. ``V`` real gives :math:`A(-f) = \overline{A(f)}`, so the operator is real, and a block of
   rows (RO, :math:`M \le C'`) or columns (CO) of a unitary matrix has orthonormal rows or columns, so the
   circular operator on the ``n`` grid is exactly RO / CO. It is a circular convolution whose effective kernel
   is ``n x n`` (:attr:`weight`, :meth:`to_conv`), not ``k x k``; hence it exists for every ``(C, M, S)`` with
   ``S | n``, also where Theorem 4 admits no ``k x k`` kernel (the strided 1x1 shortcut). The rfft half
   spectrum is used (``n_1 ... (n_d/2 + 1)`` frequencies); the solves run in ``compute_dtype`` (complex128 by
   default). In complex64 (``compute_dtype=torch.float32``) the solve alone is orthogonal only to about
   :math:`\epsilon \sqrt{1 + \|A\|^2}`, and :math:`\|A\|` grows in training (measured 1.5e-5 after 10 Adam steps
   at lr 0.1, ``N = 128``), so one Newton-Schulz step :math:`Q (3I - Q^HQ)/2` follows (about 2e-7 .. 5e-7
   then; up to ~30% more per float32 build on a CPU for wide strided layers). Cost per step: one batched
   ``N x N`` complex solve per frequency plus its backward, i.e.
   :math:`O(N^3 n^d / S^d)` flops in few large batched kernels, against BCOP's :math:`O(C^3 k)` kernel build in
   many small ones. Measured (``benchmarks/orthogonal_layers.py``, forward + backward, ms, cayley_fft vs bcop):
   on a GPU (H200, batch 64) cayley_fft is cheaper for ``N <= 64`` (64 -> 64, k = 3: 4.9 vs 7.5 on 32x32,
   3.8 vs 7.6 on 16x16; BCOP is launch-bound there), similar at ``N = 256`` on small grids (64 -> 128 stride 2 on
   16x16: 6.6 vs 5.8) and slower for large ``N n^d`` (256 -> 256: 37 vs 7.7 on 32x32, 14 vs 7.3 on 16x16); on a
   CPU (one thread, batch 8) it is much slower (64 -> 64: 790 vs 27 on 32x32, 220 vs 9 on 16x16) except for
   large kernels on tiny grids (16 -> 16, k = 7, 8x8: 1.4 vs 2.4). It is also the only exact option where
   Theorem 4 rules out a ``k x k`` kernel. ``method="auto"`` never picks it (it needs the input size).
   Inference: :meth:`to_plain` gives a :class:`FourierConv` with ``Q`` precomputed (GPU: 1.4-1.6x a plain
   ``nn.Conv2d``, about a frozen BCOP conv with circular padding). ``torch.fx.symbolic_trace`` of a model holding
   either traces the symbol op by op from ``cayley_kernel`` (it is fixed by ``input_size``) and records its
   application (input checks, FFTs, bias) as one call of ``_fourier_forward``, which needs concrete shapes.
   Under ``torch.autocast`` both compute in float32 (torch's FFTs are no autocast op, with no bfloat16 FFT on a
   CPU) and return autocast's dtype, rounded once, as ``nn.Conv2d`` does there.

The kernel is rebuilt from the parameters at every access of :attr:`weight` (nothing is cached), in
``compute_dtype`` (keyword argument and attribute; float64 by default, then rounded to the layer's dtype, which
gives :math:`\max|\sigma - 1| \approx 4 \cdot 10^{-8}` in float32; ``compute_dtype=torch.float32`` builds about
2x faster on CPUs and on GPUs with slow float64, but float32 QR is only orthonormal to about ``1e-6`` and the
errors add up over the blocks: measured ``1e-6 .. 4e-6`` for 64..512 channels, ``k <= 7``). The cost is
:math:`O(n^3 \prod k_i)` per rebuild (plus its backward), small next to a forward pass over a batch of images.
``to_conv()`` / ``to_linear()`` bake the weight into plain torch layers for inference and export.

Initialisation. Since :attr:`weight` is computed, an initialiser written for ``nn.Conv2d`` / ``nn.Linear``
(``nn.init.kaiming_normal_(m.weight)``, ``m.weight.data.copy_(w)``, ``module.apply(init_fn)`` testing
``hasattr(m, "weight")``) writes into a temporary copy and changes nothing, and one testing
``isinstance(m, nn.Conv2d)`` skips these layers (they are not subclasses): the kernel stays the orthogonal one it
was. Re-initialise with ``reset_parameters()`` (Haar-random; convs also ``init="centre"``), start from a given
kernel with ``from_conv`` / ``from_linear`` (the nearest orthogonal one), or write the parameters themselves.
Assigning ``weight`` (``m.weight = t``, or ``torch.func.functional_call`` given the replaced layer's key
``"<path>.weight"``) raises a :class:`~orthofx.errors.LayerArgumentError` (an ``AttributeError`` too) naming the
parameters to give instead: ``functional_call`` with the layer's own parameters (``model.named_parameters()``)
rebuilds the kernel from the substituted tensors, differentiably (``vmap`` / ``grad`` per-sample gradients).
Deferred initialisation works as for torch's layers: build under ``torch.device("meta")`` (or ``from_conv`` of
a meta conv with ``init="random"``), then ``to_empty(device=...)`` and ``reset_parameters()``, or ``load_state_dict(sd, assign=True)``.

Boundary. Exact orthogonality needs circular padding (P0 Proposition 6: with zero 'same' padding at stride 1
an orthogonal kernel has only its centre tap non-zero). ``padding_mode="zeros"`` is accepted (the
``orthogonal_conv`` pass uses it for ``padding: keep``); the layer is then orthogonal only away from the
borders: outputs whose window does not meet the zero padding are exactly those of the orthogonal circular
operator.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize, skip_init
from torch.optim.optimizer import register_optimizer_step_post_hook

from orthofx.errors import ImpossibleLayerError, LayerArgumentError, MetaWeightError, first_few, layer_label
from orthofx.nn.padding import (CircularFold, CircularPad, _circular_fold_valid, _circular_pad_valid, flat_pads,
                                one_element_same_dilation, per_dimension, sizes_per_dimension, stale_mode_pads)
from orthofx.nn.precision import (HALF_PRECISION, _peak, autocast_conv_dtype, autocast_enabled, autocast_off,
                                  describe_nonfinite, relative_distance)
from orthofx.nn.stiefel import _haar_factor, _unit_scaled, orthonormal, project_to_stiefel
from orthofx.theory import _flag, _positive_int, _real, adjoint_case, orthogonal_conv_exists

__all__ = [
    "FourierConv",
    "OrthogonalConv1d",
    "OrthogonalConv2d",
    "OrthogonalConv3d",
    "OrthogonalConvTranspose1d",
    "OrthogonalConvTranspose2d",
    "OrthogonalConvTranspose3d",
    "OrthogonalLinear",
    "LayerArgumentError",
    "MetaWeightError",
    "circular_alignment",
    "keeps_output_size",
    "orthonormal",
    "transposed_alignment",
    "transposed_keeps_output_size",
    "transposed_size_keeping_padding",
]

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_TORCH_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CIRCULAR_PAD = {1: nn.CircularPad1d, 2: nn.CircularPad2d, 3: nn.CircularPad3d}
_ZERO_PAD = {1: nn.ZeroPad1d, 2: nn.ZeroPad2d, 3: nn.ZeroPad3d}
_METHODS = ("auto", "bcop", "rko", "cayley_fft")
_PADDING_MODES = ("circular", "zeros")


# ------------------------------------------------------------------------------------------ argument checks


def _int(value, name: str, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``, read by :func:`~orthofx.theory._positive_int` (numpy's and 0-d tensors'
    integers too; a float tensor's ``__index__`` raised a raw TypeError: ``OrthogonalLinear(torch.tensor(4.), 4)``),
    refused in the layers' one wording, "must be an integer >= minimum"."""
    return _positive_int(value, name, LayerArgumentError, minimum,
                         message=f"{name} must be an integer >= {minimum}, got {value!r}")


def _tuple(value, dims: int, name: str, minimum: int = 1, broadcast: bool = True) -> tuple[int, ...]:
    """``dims`` ints >= ``minimum`` (:func:`~orthofx.nn.padding.per_dimension`): a one-element tuple applies to
    every dimension, as torch's convs take a stride, dilation, padding or output_padding, unless ``broadcast`` is
    false (a ``kernel_size``, whose one element gives torch a 1-d weight; an ``input_size``)."""
    return per_dimension(value, dims, name, item=lambda v: _int(v, name, minimum), error=LayerArgumentError,
                         expected=f"an int or a tuple of {dims} ints for a {dims}-D convolution", broadcast=broadcast)


def _check_device_position(device, name: str) -> None:
    """Refuse a method name where a convolution takes ``device`` (layer ``name``).

    The convolutions take ``device`` and ``dtype`` at torch's positions (``nn.Conv2d(in, out, k, stride, padding,
    dilation, groups, bias, padding_mode, device, dtype)``) and ``method`` as a keyword; a method name there is a
    call written for the order before, where ``method`` sat between ``padding_mode`` and ``device``."""
    if isinstance(device, str) and device in _METHODS:
        raise LayerArgumentError(f"{name}: device={device!r} is a method name; method is keyword-only (the "
                                 f"positions after padding_mode are torch's device and dtype): pass method={device!r}")


def _factory(device, dtype) -> dict:
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point
                              or dtype.is_complex):
        raise LayerArgumentError(f"dtype must be a real floating-point torch.dtype (e.g. torch.float32), got {dtype!r}")
    return {"device": device, "dtype": dtype}


def _bias_flag(bias, name: str) -> bool:
    """``bias`` as a bool for the layer ``name``. ``None`` is no bias, as in torch's layers (``nn.Conv2d(...,
    bias=None)`` and ``nn.Linear(..., bias=None)`` test ``if bias:``), whose signatures these layers take; any
    other non-bool raises (:func:`orthofx.theory._flag`: ``bias="no"`` is truthy and built a bias).

    >>> _bias_flag(None, "OrthogonalLinear"), _bias_flag(True, "OrthogonalLinear")
    (False, True)
    """
    return False if bias is None else _flag(bias, f"{name}: bias", LayerArgumentError)


def _gain(gain, dtype: torch.dtype | None, name: str) -> float:
    """``gain`` as a float, checked for the layer ``name`` whose weights are ``dtype`` (None: the default dtype):
    a real number (:func:`_real`: numpy's too; a bool is refused, as everywhere in orthofx)."""
    value = _real(gain)
    if value is None:
        raise LayerArgumentError(f"{name}: gain must be a positive float, got {gain!r}")
    if not math.isfinite(value) or value <= 0:
        raise LayerArgumentError(f"{name}: gain must be a positive finite float (the kernel is orthogonal times "
                                 f"gain), got {gain!r}")
    problem = gain_range_problem(value, dtype or torch.get_default_dtype())
    if problem is not None:
        raise LayerArgumentError(f"{name}: {problem}")
    return value


def gain_range_problem(gain: float, dtype: torch.dtype, name: str = "gain") -> str | None:
    """Why weights of ``dtype`` cannot hold ``gain`` times an orthogonal matrix, or ``None``.

    The entries of an orthogonal matrix lie in [-1, 1] and are about ``1 / sqrt(n)``, so a gain above the dtype's
    largest number fills the weight with inf (then NaN), and one below its smallest normal number leaves the entries
    zero or subnormal: a layer whose Jacobian is not ``gain`` times orthogonal, without a word. ``name``: what
    the message calls the number."""
    info = torch.finfo(dtype)
    if info.tiny <= gain <= info.max:
        return None
    what = "overflows to inf" if gain > info.max else "underflows to zero (or to subnormal numbers)"
    return (f"{name}={gain!r} is outside the range of normal {dtype} numbers ({info.tiny:.3g} to {info.max:.3g}): "
            f"the weight, {name} times an orthogonal matrix, {what}. Use a {name} in that range, or a wider dtype")


def _compute_dtype(requested=None) -> torch.dtype:
    """float64 unless ``requested`` (float32 or float64) says otherwise."""
    if requested is None:
        return torch.float64
    if requested not in (torch.float32, torch.float64):
        raise LayerArgumentError(f"compute_dtype must be torch.float64 (default, orthogonal to ~1e-8) or "
                                 f"torch.float32 (about 2x faster to build, ~1e-6 .. 4e-6), got {requested!r}")
    return requested


# ------------------------------------------------------------------------------------------ window alignment


def circular_alignment(conv: nn.Module):
    r"""The padding of the circular layer that replaces ``conv`` (used by the ``orthogonal_conv`` pass): the
    conv's own ints where they keep its output size (:func:`keeps_output_size`), else ``"same"``. The nearest
    ``cayley_fft`` start of :meth:`OrthogonalConv2d.from_conv` reads the conv's kernel at the same offsets.

    Why not always ``"same"``: its left pad is :math:`(k_e - 1) // 2`, while a strided conv that keeps the size
    ``n / S`` may read its windows elsewhere, e.g. a patch embedding ``k = S = 4, p = 0`` reads
    :math:`x[4i .. 4i + 3]` and ``"same"`` would read :math:`x[4i - 1 .. 4i + 2]` (the patch grid shifted by one
    pixel and wrapped around). With the conv's own pads ``p`` (:math:`k_e - S \le 2p \le k_e - 1`) the circular
    operator is the ``"same"`` one composed with a circular shift of the input, an orthogonal permutation, so it is
    just as exactly orthogonal, and it reads the taps where the conv read them (a nearest init stays nearest in
    output, not only in kernel). At stride 1 both paddings are the same. ``padding="valid"`` is ``0``."""
    pads = _numeric_padding(conv)
    if pads is None or not keeps_output_size(conv):
        return "same"
    return pads


def _numeric_padding(conv: nn.Module) -> tuple[int, ...] | None:
    """The conv's padding as ints per dimension (``"valid"`` is 0); ``None`` for ``"same"``, whose split torch
    decides from the kernel."""
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    if isinstance(conv.padding, str):
        return None
    # torch keeps a one-element tuple as given (nn.Conv2d(..., padding=(1,))) and applies it to every dimension
    return tuple(int(p) for p in per_dimension(conv.padding, len(conv.kernel_size), "padding"))


def keeps_output_size(conv: nn.Module) -> bool:
    """Whether the circular ``"same"`` orthogonal layer (output ``n / S``) has the conv's output size on every
    grid divisible by the stride: ``floor((2p - d(k-1) - 1) / S) = -1`` per dimension, i.e.
    ``d(k-1) + 1 - S <= 2p <= d(k-1)``. ``padding="valid"`` is ``p = 0`` (it keeps the size where every
    window is at most one stride long, e.g. a 1 x 1 conv or a ``k = S`` patch embedding). ``"same"`` with a
    one-element dilation and a padding mode other than zeros pads the first dimension only
    (:func:`~orthofx.nn.padding.one_element_same_dilation`): it does not keep the size. Nor, here, does a conv in
    such a mode whose ``padding`` is not what torch pads it by (set after construction,
    :func:`~orthofx.nn.padding.stale_mode_pads`)."""
    if stale_mode_pads(conv) is not None:
        return False
    pads = _numeric_padding(conv)
    if pads is None:  # "same": torch allows it at stride 1 only, where it keeps the size by definition
        return all(s == 1 for s in conv.stride) and one_element_same_dilation(conv) is None
    dims = len(conv.kernel_size)
    for k, s, p, d in zip(conv.kernel_size, per_dimension(conv.stride, dims, "stride"), pads,
                          per_dimension(conv.dilation, dims, "dilation")):
        if not d * (k - 1) + 1 - s <= 2 * p <= d * (k - 1):
            return False
    return True


def build_stride(kernel_size, stride, dilation) -> tuple[int, ...]:
    """The stride an orthogonal kernel is built for, per dimension: ``S / gcd(D, S)`` (module docs, item 5), ``S``
    undilated and for one-tap dimensions (a single tap has no spacing)."""
    stride, dilation = sizes_per_dimension(kernel_size, stride=stride, dilation=dilation)
    kernel_size = tuple(kernel_size)
    return tuple(s // math.gcd(dl, s) if k > 1 else s for k, s, dl in zip(kernel_size, stride, dilation))


def rko_problem(kernel_size, stride, dilation) -> str | None:
    """The condition that ``method="rko"`` (the reshaped kernel alone, no blocks) misses for these sizes (tuples),
    with the numbers, or ``None`` where it builds them: ``kernel_size <= S / gcd(D, S)`` (:func:`build_stride`)
    in every dimension. A dilation sharing a factor with the stride makes the taps read fewer residues mod ``S``,
    so e.g. ``k = S = D = 2`` needs blocks although ``k <= S`` (checking ``k <= S`` alone, the pass let such a
    layer fail inside the constructor, with an error that ``on_impossible`` did not handle)."""
    stride, dilation = sizes_per_dimension(kernel_size, stride=stride, dilation=dilation)
    kernel_size = tuple(kernel_size)
    built = build_stride(kernel_size, stride, dilation)
    if all(k <= b for k, b in zip(kernel_size, built)):
        return None
    if tuple(built) == tuple(stride):
        return (f"kernel_size <= stride in every dimension, got kernel_size={tuple(kernel_size)}, "
                f"stride={tuple(stride)}")
    return (f"kernel_size <= stride / gcd(dilation, stride) = {built} in every dimension (the dilated taps "
            f"read only that many residues mod the stride), got kernel_size={tuple(kernel_size)}, "
            f"stride={tuple(stride)}, dilation={tuple(dilation)}")


def dilation_blocks_row_orthogonal(kernel_size, stride, dilation, c_in: int, c_out: int) -> bool:
    """Whether the dilation alone keeps a row-orthogonal conv (``c_in -> c_out`` per group, sizes as tuples) from
    existing: its common factor with the stride makes the taps read fewer residues mod the stride
    (:func:`build_stride`), while the undilated kernel reads ``min(k, S)`` of them, enough for ``c_out`` rows
    (:func:`orthofx.theory.orthogonal_conv_exists`). The impossibility errors then advise a coprime dilation."""
    stride, dilation = sizes_per_dimension(kernel_size, stride=stride, dilation=dilation)
    kernel_size = tuple(kernel_size)
    return (build_stride(kernel_size, stride, dilation) != tuple(stride)
            and c_in * math.prod(min(k, s) for k, s in zip(kernel_size, stride)) >= c_out)


# symbolic tracing records the padding as one node (it traces through the orthogonal layers' forward, and
# the padding's size checks need concrete shapes); fx.wrap acts on this module's own name for the function. The
# layers call _circular_pad_valid, not circular_pad: their pads are Python ints >= 0 by construction, and
# circular_pad's argument checks only repeated themselves at every forward
torch.fx.wrap("_circular_pad_valid")


# ------------------------------------------------------------------------------------------ Cayley-FFT helpers


def _delay(X: torch.Tensor, trailing: int, before: int = 1, after: int = 0) -> torch.Tensor:
    """``X`` zero-padded along the dimension followed by ``trailing`` others (``before`` taps in front,
    ``after`` behind): zero padding rather than slices and a concatenation, whose backward is a view (no
    kernels). Counted from the end, not from ``X.dim()``, which symbolic tracing does not know."""
    return F.pad(X, [0, 0] * trailing + [before, after])


def _space_to_depth(x: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    """``(B, C, n_1, ..., n_d) -> (B, C S_1 ... S_d, n_1/S_1, ..., n_d/S_d)`` with
    ``out[:, (c, r_1, ..., r_d), a] = x[:, c, S a + r]`` (channel index ``c`` major, as ``F.pixel_unshuffle``)."""
    d = len(stride)
    if all(s == 1 for s in stride):
        return x
    channels = x.shape[1]
    grid = [n // s for n, s in zip(x.shape[2:], stride)]
    shape = [-1, channels]
    for a, s in zip(grid, stride):
        shape += [a, s]
    perm = [0, 1] + [3 + 2 * i for i in range(d)] + [2 + 2 * i for i in range(d)]
    return x.reshape(shape).permute(perm).reshape(-1, channels * math.prod(stride), *grid)


def _apply_symbol(x: torch.Tensor, symbol: torch.Tensor, stride: tuple[int, ...],
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    r"""``y = IFFT(Q(f) FFT(s2d(x)))``: a circular (strided) convolution given by its per-frequency matrices.

    ``x``: ``(B, g C, n_1, ..., n_d)`` real; ``symbol``: ``(g, F, M, C S^d)`` complex, one ``M x C S^d`` matrix per
    frequency of the ``rfftn`` half spectrum of the ``n/S`` grid (``F`` of them, C-order). Returns
    ``(B, g M, n_1/S_1, ..., n_d/S_d)`` in ``dtype`` (default ``x``'s; computed in float32 for half-precision
    inputs, complex64 products also inside ``torch.autocast``, which casts no complex tensor).
    """
    dtype = x.dtype if dtype is None else dtype
    d = len(stride)
    dims = tuple(range(-d, 0))
    g, nf, m, c = symbol.shape
    if x.shape[0] == 0:
        # an empty batch, as nn.Conv takes it: the FFT backends refuse it (MKL: "Inconsistent configuration
        # parameters"); the empty sum keeps the output attached to the symbol (zero gradients, as nn.Conv's)
        grid = [n // s for n, s in zip(x.shape[2:], stride)]
        return x.new_zeros(0, g * m, *grid, dtype=dtype) + symbol.real.reshape(-1)[:0].sum().to(dtype)
    work = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    xs = _space_to_depth(x.to(work), stride)
    grid = xs.shape[2:]
    xh = torch.fft.rfftn(xs, dim=dims)
    freq = xh.shape[2:]
    xh = xh.reshape(-1, g, c, nf).permute(1, 3, 2, 0)            # (g, F, C S^d, B)
    yh = torch.matmul(symbol.to(xh.dtype), xh)                   # (g, F, M, B)
    yh = yh.permute(3, 0, 2, 1).reshape(-1, g * m, *freq)
    return torch.fft.irfftn(yh, s=grid, dim=dims).to(dtype)


def _tap_index(n: int, stride: int, left: int, taps: int | None = None,
               device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where tap ``t`` of a kernel read at offset ``t - left`` lands after space-to-depth on an ``n/S`` grid:
    ``r = (t - left) mod S`` (the phase) and ``a = -floor((t - left) / S) mod n/S`` (the circular shift of the
    convolution ``y[i] = sum_j q[i - j] x'[j]``); ``t = 0 .. taps - 1`` (default ``n``). On ``device``, the
    kernel's: left to torch's default device, a user's ``torch.set_default_device('meta')`` made them valueless
    (``layer.weight`` of a CPU ``cayley_fft`` layer failed to copy them)."""
    u = torch.arange(n if taps is None else taps, device=device) - left
    r = torch.remainder(u, stride)
    a = torch.remainder(torch.div(r - u, stride, rounding_mode="floor"), n // stride)
    return r, a


def _unitary_completion(target: torch.Tensor) -> torch.Tensor:
    r"""For ``target`` ``(..., M, N)``, ``M <= N``: the ``N x N`` unitary :math:`U` nearest to it that a Cayley
    transform can reach, as a start for ``cayley_fft``'s nearest initialisation.

    The first ``M`` rows are the polar factor :math:`R = P Q^H` of ``target`` (SVD :math:`P \Sigma Q^H`, the
    nearest matrix with orthonormal rows); the other rows are :math:`G Z` (:math:`Z`: orthonormal rows spanning
    the complement, :math:`G` unitary), with :math:`G` maximising :math:`\operatorname{Re} \operatorname{tr} U`
    (Procrustes: :math:`G = B^H A^H` from the SVD :math:`A \Sigma' B^H` of the block :math:`Y = Z_{:, M:}`),
    which keeps :math:`U` away from the eigenvalue -1 that no Cayley transform reaches. A real ``target`` (the
    frequencies 0 and Nyquist of a real kernel, every frequency of a one-tap kernel) needs a real skew-symmetric
    Cayley parameter, whose transforms have determinant +1: where :math:`\det U = -1` the sign of the direction
    with the smallest singular value is flipped (Kabsch's rule, the least cost), in :math:`G` when ``M < N``,
    else in :math:`R` itself (then :math:`U` is the nearest rotation, not the polar factor)."""
    m = target.shape[-2]
    u, _, vh = torch.linalg.svd(target)
    null = vh[..., m:, :]
    if null.shape[-2] > 0:
        a, _, bh = torch.linalg.svd(null[..., :, m:])
        rows, basis = u @ vh[..., :m, :], a

        def build(sign):  # sign: +-1 per direction of G's SVD (Kabsch)
            return torch.cat([rows, bh.mH @ (sign.unsqueeze(-1) * a.mH) @ null], dim=-2)
    else:
        basis = u

        def build(sign):  # sign: +-1 per direction of R's SVD
            return (u * sign.unsqueeze(-2)) @ vh
    sign = torch.ones(basis.shape[:-1], dtype=basis.real.dtype, device=basis.device)
    unitary = build(sign)
    if target.is_complex():
        tol = 100 * torch.finfo(target.real.dtype).eps
        real = target.imag.abs().amax((-2, -1)) <= tol * target.abs().amax((-2, -1)).clamp_min(tol)
        flip = real & (torch.linalg.det(unitary).real < 0)
    else:
        flip = torch.linalg.det(unitary) < 0
    if not bool(flip.any()):
        return unitary
    sign[..., -1] = torch.where(flip, -1.0, 1.0)
    return build(sign)


def _inverse_cayley(unitary: torch.Tensor, max_angle: float = math.pi - 1e-2) -> torch.Tensor:
    r"""The skew-Hermitian :math:`A` with :math:`(I - A)(I + A)^{-1}` closest to ``unitary`` :math:`U`.

    On an eigenvector with eigenvalue :math:`e^{i\theta}` the Cayley transform has eigenvalue
    :math:`-i \tan(\theta / 2)`, unbounded as :math:`\theta \to \pm\pi`: eigenvalues -1 are out of reach, so the
    angles are clamped to ``max_angle`` (from the eigendecomposition of the normal matrix :math:`U`) and the result
    is made exactly skew-Hermitian."""
    values, vectors = torch.linalg.eig(unitary)
    angle = torch.angle(values).clamp(-max_angle, max_angle)
    a = vectors @ torch.diag_embed(-1j * torch.tan(angle / 2)) @ torch.linalg.inv(vectors)
    return 0.5 * (a - a.mH)


def _projector_basis(raw: torch.Tensor) -> torch.Tensor:
    r"""An orthonormal basis ``(..., n, r)`` of the column span of ``raw`` (``n >= r``, float32 or float64): the
    ``Q`` factor of a reduced Householder QR, as :func:`orthofx.nn.stiefel.orthonormal` computes it, less its sign
    fix, for callers that use the basis only through the projector :math:`QQ^T` (which the column signs do not
    change).

    >>> raw = torch.randn(2, 5, 3, dtype=torch.float64)
    >>> Q = _projector_basis(raw)
    >>> bool(torch.allclose(Q @ Q.mT, orthonormal(raw) @ orthonormal(raw).mT))
    True
    """
    return torch.linalg.qr(raw, mode="reduced")[0]


def _times_gain(K: torch.Tensor, gain: float) -> torch.Tensor:
    """``K * gain``, and ``K`` itself for ``gain == 1`` (the product is ``K`` bit for bit: one operation less
    forward and backward per kernel build)."""
    return K if gain == 1.0 else K * gain


def _kept_parameter(module: nn.Module, name: str) -> torch.Tensor:
    """The tensor that holds the parameter ``name`` of ``module``, read from ``_parameters`` (``torch.fx``'s tracer
    turns ``module.<name>`` into a Proxy, whose dtype and device cannot decide a Python branch). A
    ``torch.nn.utils.parametrize`` parametrization moves it into ``parametrizations.<name>``: then it is the first
    tensor kept there (``original``, or ``original0`` for a right inverse giving several)."""
    if name in module._parameters:
        return module._parameters[name]
    kept = module.parametrizations[name]
    return next(t for t in (*kept._parameters.values(), *kept._buffers.values()) if t is not None)


class _ComputedWeightError(LayerArgumentError, AttributeError):
    """An assignment to a layer's computed ``weight`` (an :class:`AttributeError` too, what assigning a read-only
    property raised before, so code that catches that keeps working)."""


def refuse_weight_assignment(layer: nn.Module, what: str, fix: str) -> None:
    """Raise :class:`_ComputedWeightError` for ``layer.weight = t``: ``what`` says where the weight comes from,
    ``fix`` what to do instead. ``torch.func.functional_call`` substitutes the keys of its dict with ``setattr``,
    so a dict keyed by the original model's names (``"conv1.weight"`` of the ``nn.Conv2d`` the transform
    replaced) came here, and torch's answer ("property 'weight' of 'OrthogonalConv2d' object has no setter")
    named neither the layer nor the keys it takes."""
    names = ", ".join(repr(n) for n, _ in layer.named_parameters())
    raise _ComputedWeightError(
        f"{layer_label(layer)}: its weight {what} and cannot be assigned (torch.func.functional_call assigns each "
        f"key of its dict: give it the layer's parameters {names or '(none)'}, prefixed by the layer's path, as "
        f"model.named_parameters() lists them); {fix}")


class _ComputedWeight:
    """Mixin of the layers whose ``weight`` (and ``_computed`` others) is a read-only property: assigning an
    ``nn.Parameter`` to it (``torch.func.functional_call`` with another model's ``named_parameters()``) reaches
    ``register_parameter`` rather than the property's setter, where torch said "attribute 'weight' already
    exists"; both now raise :func:`refuse_weight_assignment`'s error."""

    _computed = ("weight",)
    _computed_what = "is the orthogonal kernel built from its parameters at every access"

    def _refuse_assignment(self) -> None:
        refuse_weight_assignment(self, self._computed_what, _ORTH_FIX)

    def register_parameter(self, name: str, param) -> None:
        if name in self._computed and name not in self._parameters:
            self._refuse_assignment()
        super().register_parameter(name, param)


# what an assignment to an orthogonal layer's weight should do instead (refuse_weight_assignment)
_ORTH_FIX = ("to make the layer compute a given kernel, build it from a layer holding it (from_conv, "
             "from_conv_transpose or from_linear: the nearest orthogonal one), or orthofx.freeze(model) for plain "
             "layers whose weight can be set")


@torch.no_grad()
def _baked_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A plain ``nn.Linear`` holding copies of ``weight`` (``out x in``) and ``bias``, on ``weight``'s device and in
    its dtype: the frozen form of a layer whose weight is computed (orthofx's linears and isometric blocks)."""
    # skip_init: torch's default initialisation, overwritten here, would draw from the caller's random stream
    linear = skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                       dtype=weight.dtype)
    linear.weight.copy_(weight)
    if bias is not None:
        linear.bias.copy_(bias)
    return linear


def check_tensor_input(x, layer: nn.Module | str) -> None:
    """Refuse an input that is not a tensor (``layer(None)``, a list, a number): the layers' forwards failed with a
    raw AttributeError on the first tensor method they called. ``layer``: the layer or its label."""
    if not isinstance(x, torch.Tensor):
        label = layer if isinstance(layer, str) else layer_label(layer)
        raise LayerArgumentError(f"{label}: expected a torch.Tensor input (a real floating-point tensor), got "
                                 f"{type(x).__name__}")


def check_last_dimension(x: torch.Tensor, size: int, layer: nn.Module, name: str = "in_features",
                         noun: str = "layer") -> None:
    """Refuse an input whose last dimension is not ``size`` (the layer's ``name``): torch's raw "mat1 and mat2
    shapes cannot be multiplied" otherwise, which names no layer. A strided nested tensor has no sizes to read
    (torch's own matmul checks it); a jagged one has them."""
    if x.is_nested and x.layout is torch.strided:
        return
    if x.dim() < 1 or x.shape[-1] != size:
        raise LayerArgumentError(
            f"{layer_label(layer)} ({name}={size}): expected an input of shape (..., {size}), got shape "
            f"{tuple(x.shape)}; pass inputs whose last dimension is {size}, or build the {noun} with {name} equal to "
            "the input's last dimension")


def _check_floating(x: torch.Tensor, layer: nn.Module | str) -> None:
    """Refuse an integer, boolean or complex input. The Fourier-domain forward casts its input to float32 and its
    output back to the input's dtype, so an integer input gave a silently truncated integer output (and a complex
    one lost its imaginary part); the explicit-kernel forwards failed inside torch without naming the layer. A
    non-tensor (``layer(None)``, a list) failed with a raw AttributeError on ``is_floating_point``."""
    check_tensor_input(x, layer)
    if not x.is_floating_point():
        label = layer if isinstance(layer, str) else layer_label(layer)
        raise LayerArgumentError(
            f"{label}: expected a real floating-point input, got dtype {str(x.dtype).replace('torch.', '')}; the "
            "layer is a real orthogonal operator: convert the input first (x.float()), embed token ids, or pass "
            "a complex signal's real and imaginary parts as channels")


def check_input_dtype(x: torch.Tensor, dtype: torch.dtype, layer: nn.Module | str, noun: str = "layer") -> None:
    """Refuse a floating-point input whose dtype is not ``dtype``, the layer's parameters' (outside
    ``torch.autocast``, which casts the operands of the matmul or conv itself): torch's raw "mat1 and mat2 must
    have the same dtype" or "Input type (float) and bias type (c10::BFloat16) should be the same" otherwise,
    naming neither the layer nor the fix. ``layer``: the layer, or its label (:func:`~orthofx.errors.layer_label`).
    ``noun``: what the message calls the layer (``"block"`` for the isometric blocks). Call it on a concrete tensor
    (not a ``torch.fx.Proxy``).

    >>> layer = OrthogonalLinear(4, 4).to(torch.bfloat16)
    >>> try:
    ...     layer(torch.randn(2, 4))
    ... except LayerArgumentError as error:
    ...     print(str(error).split(";")[0])
    OrthogonalLinear: the input's dtype float32 is not the layer's bfloat16
    """
    if x.dtype != dtype and not autocast_enabled(x.device.type):
        name = str(dtype).replace("torch.", "")
        label = layer if isinstance(layer, str) else layer_label(layer)
        raise LayerArgumentError(
            f"{label}: the input's dtype {str(x.dtype).replace('torch.', '')} is not the {noun}'s "
            f"{name}; convert the input (x.to(torch.{name})) or the {noun} ({noun}.to(x.dtype))")


def _check_input(x: torch.Tensor, dims: int, channels: int, layer: nn.Module | str) -> None:
    """Refuse an input that is not ``(B, channels, *spatial)`` or ``(channels, *spatial)`` with ``dims`` spatial
    dimensions. The Fourier-domain forward reshapes ``(B, C, ...)`` with ``-1`` for the batch, so a wrong channel
    count whose product with ``B`` divides evenly would silently be read as another batch size (8 channels into a
    4-channel layer gave two outputs per sample); the explicit-kernel forward would fail inside ``F.pad`` or the
    convolution with a message that does not name the layer. Skipped while ``torch.fx`` symbolically traces the
    forward (a Proxy has no concrete shape to check). The rank is compared with ``!=``, not ``in (dims + 1, dims +
    2)``: where dynamo traces this function as a frame of its own (after its caller fell back to eager, without
    ``fullgraph``), ``dims`` is a symbolic int under ``dynamic=True``, and torch 2.13's dynamo reads ``4 in (s + 1,
    s + 2)`` as False, which raised this error for a valid input (an input of another size, which a
    ``cayley_fft`` layer refuses, was told it had the wrong channels)."""
    if isinstance(x, torch.fx.Proxy):
        return
    _check_floating(x, layer)
    if (x.dim() != dims + 1 and x.dim() != dims + 2) or x.shape[-dims - 1] != channels:
        spatial = "L" if dims == 1 else ", ".join("HWD"[i] for i in range(dims))
        label = layer if isinstance(layer, str) else layer_label(layer)
        raise LayerArgumentError(
            f"{label} (in_channels={channels}): expected an input of shape (batch, {channels}, "
            f"{spatial}) or ({channels}, {spatial}), got shape {tuple(x.shape)}. Pass {dims + 2}-D (or unbatched "
            f"{dims + 1}-D) inputs with {channels} channels, or build the layer with in_channels equal to the "
            "input's channels")


def _fourier_forward(x: torch.Tensor, symbol: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, ...],
                     input_size: tuple[int, ...], channels: int, label: str, frozen: bool,
                     layer_dtype: torch.dtype) -> torch.Tensor:
    r"""The forward of a Fourier-domain layer (``method="cayley_fft"`` and :class:`FourierConv`): the input checks,
    :math:`y = \mathrm{IFFT}(Q(f)\,\mathrm{FFT}(x'))` with ``symbol`` :math:`Q` (``(g, F, M, C S^d)`` complex),
    plus ``bias``; an unbatched input gives an unbatched output. ``label`` names the layer in errors; ``frozen``
    picks the fix an input of another spatial size is told (freeze another method, or build another layer). The
    output has ``x``'s dtype, or inside ``torch.autocast`` the dtype ``nn.Conv{d}d`` returns there
    (:func:`~orthofx.nn.precision.autocast_conv_dtype`: bfloat16 for a float32 input under bfloat16 autocast),
    computed in float32 and rounded once.

    ``layer_dtype``: the layer's parameters' dtype (a half-precision layer's, though its symbol is complex64).
    Outside autocast an input of another dtype is refused (:func:`check_input_dtype`), as ``nn.Conv{d}d`` and
    the other orthofx layers refuse it: the symbol's cast to the input's precision ran a float64 layer at float32
    precision, and returned a float64 output of float32 accuracy from a float32 layer, without a word.

    Registered with ``torch.fx.wrap`` below: ``torch.fx.symbolic_trace`` records it as one call (the checks, the
    unbatched case and the empty batch need concrete shapes, which a Proxy does not have), while the symbol, a
    function of the parameters fixed by the layer's ``input_size``, is traced op by op before it, so a traced
    model computes the same outputs and parameter gradients."""
    d = len(input_size)
    _check_input(x, d, channels, label)
    check_input_dtype(x, layer_dtype, label)
    size = tuple(x.shape[-d:])
    if size != tuple(input_size):
        if frozen:
            built = f"{label}: the frozen Fourier-domain operator was built"
            fix = "freeze an OrthogonalConv with method='auto'"
        else:
            built = f"{label} (method='cayley_fft'): built"
            fix = f"build the layer with input_size={size}, or use method='auto'"
        raise LayerArgumentError(
            f"{built} for inputs of spatial size {tuple(input_size)}, got {size} (input shape {tuple(x.shape)}). Its "
            f"orthogonal operator lives in the Fourier domain of that one grid: resize the input, {fix} (an explicit "
            f"kernel that works on every size)")
    unbatched = x.dim() == d + 1
    # under torch.autocast a conv returns autocast's dtype; the FFTs are no autocast op (and the CPU has no
    # bfloat16 FFT), so the operator and the bias run in float32 and the sum is rounded once, as nn.Conv's
    dtype = autocast_conv_dtype(x)
    y = _apply_symbol(x.unsqueeze(0) if unbatched else x, symbol, stride,
                      x.dtype if dtype == x.dtype else torch.float32)
    if bias is not None:
        y = y + bias.to(y.dtype).reshape(-1, *(1,) * d)
    return (y.squeeze(0) if unbatched else y).to(dtype)


torch.fx.wrap("_fourier_forward")


def _set_conv_arguments(layer: nn.Module, in_channels, out_channels, kernel_size, stride, dilation, groups,
                        torch_name: str) -> None:
    """Check and set the arguments an orthogonal conv shares with ``torch.nn.<torch_name>`` (``layer._dims``
    spatial dimensions): channel counts, groups dividing both, and per-dimension kernel size, stride, dilation."""
    d = layer._dims
    layer.in_channels = _int(in_channels, "in_channels")
    layer.out_channels = _int(out_channels, "out_channels")
    layer.groups = _int(groups, "groups")
    if layer.in_channels % layer.groups or layer.out_channels % layer.groups:
        raise LayerArgumentError(
            f"{type(layer).__name__}: groups={layer.groups} must divide in_channels={layer.in_channels} and "
            f"out_channels={layer.out_channels} (as in torch.nn.{torch_name})")
    layer.kernel_size = _tuple(kernel_size, d, "kernel_size", broadcast=False)
    layer.stride = _tuple(stride, d, "stride")
    layer.dilation = _tuple(dilation, d, "dilation")


def _check_conversion(cls: type, constructor: str, module, torch_type: type, init) -> None:
    """The checks ``from_conv`` and ``from_conv_transpose`` share, before they read anything off ``module``:
    it is the ``torch_type`` layer that ``cls.<constructor>`` converts (same dimensionality too), and ``init``
    is a start they know."""
    if not isinstance(module, torch_type):
        raise LayerArgumentError(f"{cls.__name__}.{constructor} expects a torch.nn.{torch_type.__name__}, got "
                                 f"{type(module).__name__}")
    if init not in ("nearest", "random"):
        raise LayerArgumentError(f"init must be 'nearest' or 'random', got {init!r}")
    _check_nearest_has_values(cls, constructor, module, init)
    _check_nearest_is_finite(cls, constructor, module, init)


def _check_nearest_is_finite(cls: type, constructor: str, module, init: str) -> None:
    """``init="nearest"`` needs a finite weight: no orthogonal kernel is nearest to one with NaN or inf entries.
    Without this check the fit failed inside LAPACK ("linalg.svd: ... contained non-finite values"), or with the
    polar factor's message for a diverged training step, or (where the start reads only the centre taps and a NaN
    sat on another tap) gave a layer with ``init_error`` NaN."""
    if init != "nearest" or module.weight.is_meta:
        return
    nonfinite = describe_nonfinite(module.weight.detach())
    if nonfinite is None:
        return
    raise LayerArgumentError(
        f"{cls.__name__}.{constructor}: the {layer_label(module)}'s weight {tuple(module.weight.shape)} has "
        f"{nonfinite}, so there is no nearest orthogonal weight to start from (init='nearest'). Load finite "
        f"weights (a diverged or corrupted checkpoint?), or pass init='random'")


def _check_nearest_has_values(cls: type, constructor: str, module, init: str) -> None:
    """``init="nearest"`` reads the weight's values, which a layer on the meta device does not have (the fit failed
    inside torch: "Tensor.item() cannot be called on meta tensors"); ``init="random"`` needs none (:func:`_deferred`)."""
    if init == "nearest" and module.weight.is_meta:
        raise MetaWeightError(
            f"{cls.__name__}.{constructor}: the {type(module).__name__}'s weight is on the meta device (a shape "
            f"without values), so there is no weight to start near (init='nearest'). Materialise it first "
            f"(module.to_empty(device='cpu') and load its weights), or pass init='random' for a layer on the meta "
            f"device, to materialise later with to_empty(device=...) and reset_parameters() or "
            f"load_state_dict(..., assign=True)")


def _mirror_requires_grad(original: nn.Module, layer: nn.Module) -> None:
    """A layer built from a frozen one stays frozen: its bias follows the original bias, the parameters that
    stand for the weight follow the original weight (``requires_grad_(False)`` on a backbone must survive)."""
    for name, parameter in layer.named_parameters(recurse=False):
        source = original.bias if name == "bias" else original.weight
        parameter.requires_grad_(source.requires_grad)


def _frozen_requires_grad(layer: nn.Module, frozen: nn.Module) -> nn.Module:
    """The inverse of :func:`_mirror_requires_grad`, for the plain forms ``to_plain()`` builds: ``frozen``'s weight
    trains iff any parameter of ``layer`` standing for the weight does (the weight moves with each of them), its
    bias iff ``layer``'s bias does; a weight with no parameter behind it keeps the default. Returns ``frozen``."""
    sources = [p for name, p in layer.named_parameters() if name.rsplit(".", 1)[-1] != "bias"]
    for module in frozen.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if name == "bias" and layer.bias is not None:
                parameter.requires_grad_(layer.bias.requires_grad)
            elif name != "bias" and sources:
                parameter.requires_grad_(any(p.requires_grad for p in sources))
    return frozen


def _deferred(original: nn.Module, layer: nn.Module) -> nn.Module:
    """The end of ``from_conv`` / ``from_linear`` with ``init="random"`` for an ``original`` on the meta device
    (deferred initialisation: a model built under ``torch.device("meta")``): ``layer`` is on the meta device too,
    with the original's mode and ``requires_grad`` and ``init_error = None`` (the distance reads numbers, and
    failed with "Tensor.item() cannot be called on meta tensors"). Materialise it as any meta module:
    ``to_empty(device=...)`` then ``reset_parameters()``, or ``load_state_dict(..., assign=True)``."""
    layer.init_error = None
    layer._adopt_mode(original.training)
    _mirror_requires_grad(original, layer)
    return layer


def _broadcast_index(indices: list[torch.Tensor]) -> list[torch.Tensor]:
    """Reshape one index vector per spatial dimension so that they broadcast to a ``(len_1, ..., len_d)`` grid."""
    d = len(indices)
    return [idx.reshape([-1 if j == i else 1 for j in range(d)]) for i, idx in enumerate(indices)]


# ------------------------------------------------------------------------------------------ convolutions


def _in_safe_range(target: torch.Tensor) -> torch.Tensor:
    r"""A nearest-start target ``(g, M, C, *k)`` for the scale-free steps (Procrustes, block sweeps: their optima do
    not change when the target is multiplied by a positive number): ``target`` itself where its largest entry
    lies in :math:`[2^{-64}, 2^{64}]`, else each group's block times the power of two that brings its largest entry
    into :math:`[1/2, 1)` (exact, :func:`orthofx.nn.stiefel._unit_scaled`). The steps sum products of the target
    with entries of an orthogonal kernel (at most 1) over channels and taps; in float32 (``compute_dtype``) a
    target of entries ``1e38`` overflowed those sums to ``inf`` (``eigh`` failed, the polar factor refused NaN).
    Inside the range nothing changes, bit for bit.

    >>> t = torch.full((1, 2, 1, 3), 2.0 ** 100)
    >>> float(_in_safe_range(t).abs().amax())
    0.5
    >>> u = t / 2.0 ** 90
    >>> _in_safe_range(u) is u
    True
    """
    peak = _peak(target)  # max |target| by one aminmax, without a full-size |target|
    if peak == 0.0 or 2.0 ** -64 <= peak <= 2.0 ** 64 or not math.isfinite(peak):
        return target
    return _unit_scaled(target.reshape(target.shape[0], target.shape[1], -1)).reshape(target.shape)


def _unit_norm(target: torch.Tensor) -> torch.Tensor:
    r"""``target`` (finite) times the power of two that brings its Frobenius norm into :math:`[1/2, 1)`: the target of
    the nearest start's Adam steps, whose course depends on the target's scale (the optimum does not). Exact
    (but for entries pushed below the normal range, far under the largest), so that targets differing by a power
    of two give the same fit bit for bit. The norm is taken of ``target`` over its largest entry's power of two
    (:func:`orthofx.nn.stiefel._unit_scaled`; then in :math:`[1/2, \sqrt{numel})`): the squares of entries of
    ``1e30`` overflow float32 and those of ``1e-30`` underflow. ``target`` itself is never written; a zero one is returned as it is.

    >>> t = torch.tensor([3e30, 4e30])
    >>> u = _unit_norm(t)
    >>> 0.5 <= float(u.norm()) < 1, bool(torch.equal(_unit_norm(t * 2.0 ** -70), u))
    (True, True)
    """
    peak = _peak(target)
    if peak == 0.0 or not math.isfinite(peak):
        return target
    # the largest entry into [1/2, 1), then the norm, in [1/2, sqrt(numel)), by a power of two that cannot overflow
    scaled = _unit_scaled(target.reshape(1, -1)).reshape(target.shape)
    exponent = math.frexp(float(torch.linalg.vector_norm(scaled)))[1]
    return scaled * math.ldexp(1.0, -exponent) if exponent else scaled


def _fit_best(params: list[nn.Parameter], loss_fn, best: float, steps: int, lr: float) -> None:
    """``steps`` Adam steps on ``loss_fn`` (the nearest-initialisation fits of ``from_conv``), leaving ``params`` at
    the best state seen (the start counts, with loss ``best``) and their gradients cleared.

    Half-precision parameters are fitted as float32 copies (their ``.data`` swapped for the steps, so ``loss_fn``
    reads them as it reads the layer) and rounded once at the end: in float16 Adam's ``eps`` (1e-8) is 0 and the
    squared gradients underflow, so every step was NaN and the fit kept its start; in bfloat16 most steps were
    below the parameters' resolution."""
    if steps and torch.is_inference_mode_enabled():
        raise LayerArgumentError(f"the nearest initialisation's {steps} fitting steps need autograd, which "
                                 "torch.inference_mode() turns off: build the layer outside inference mode, or pass "
                                 "fit_steps=0 (the closed-form start only)")
    dtypes = [p.dtype for p in params]
    with torch.no_grad():
        for p in params:
            if p.dtype in HALF_PRECISION:
                p.data = p.data.float()
    best_state = [p.detach().clone() for p in params]
    try:
        opt = torch.optim.Adam(params, lr=lr)
        with torch.enable_grad():  # from_conv may be called under torch.no_grad()
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                loss = loss_fn()
                loss.backward()
                value = float(loss.detach())
                if value < best:
                    best = value
                    best_state = [p.detach().clone() for p in params]
                opt.step()
    finally:  # the parameters get their dtype back, with the best state (the start if a step failed)
        with torch.no_grad():
            for p, b, dtype in zip(params, best_state, dtypes):
                if p.dtype == dtype:
                    p.copy_(b)
                else:
                    p.data = b.to(dtype)
        for p in params:
            p.grad = None


def without_memory_format(fn):
    """``fn`` (the function ``nn.Module._apply`` maps over a module's tensors) for tensors that are not
    convolution kernels, so that the memory format of ``module.to(memory_format=...)`` does not reach them: where
    ``fn`` refuses a 4-D or 5-D tensor the format of the other rank, it converts a flat view of it instead, and
    strides it gave a contiguous tensor are undone. Same values, device and dtype as ``fn`` gives; ``fn(t)`` itself
    otherwise (``t`` itself where there is nothing to convert, as ``swap_tensors`` conversions need).

    ``Module.to(memory_format=torch.channels_last)`` gives every 4-D and 5-D tensor that format, and torch refuses
    the other rank ("required rank 4 tensor to use channels_last format"): right for conv kernels (a Conv3d is not
    a channels_last layer), wrong for tensors that only hold a layer's parameters in another layout. A
    ``cayley_fft`` OrthogonalConv2d (5-D ``cayley_kernel``), its frozen :class:`FourierConv` (5-D ``symbol``) and
    an OrthogonalConv3d with blocks (4-D ``proj_a`` under ``channels_last_3d``) made ``model.to(memory_format=...)``
    raise where the plain conv they replace converts; and a ``symbol`` given ``channels_last_3d`` strides lost the
    unit last stride ``view_as_complex`` needs, failing the frozen layer's forward."""
    def apply(t: torch.Tensor) -> torch.Tensor:
        if t.dim() not in (4, 5):
            return fn(t)
        try:
            out = fn(t)
        except RuntimeError as exc:  # the other rank's format: convert a flat view, which no format applies to
            if "channels_last" not in str(exc):
                raise
            flat = t.reshape(-1)
            out = fn(flat)
            # nothing else to convert: t itself, as fn gives it (swap_tensors, the future conversion mode, refuses
            # to swap a tensor with a view of itself)
            return t if out is flat else out.reshape(t.shape)
        if out is not t and t.is_contiguous() and not out.is_contiguous():
            out = out.contiguous()  # this rank's format: the strides it gave undone
        return out
    return apply


class _FormatFree:
    """Mixin for layers none of whose tensors is a convolution kernel in torch's layout (:func:`without_memory_format`):
    ``.to(memory_format=...)`` leaves them as they are, whatever their rank."""

    def _apply(self, fn, recurse=True):
        return super()._apply(without_memory_format(fn), recurse)


#: Optimizer steps taken (any optimizer, counted eagerly by a global step post hook registered with the first eval
#: cache entry): part of the eval cache's key, for the updates that bump no version counter (fused optimizers).
_OPTIMIZER_STEPS = [0]
_STEP_HOOK: list = []


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    # a compiled step is traced (this hook inlined): its in-place updates bump the parameters' version counters,
    # which the key sees, and a counter read there would make dynamo guard on its value (a recompile per step)
    if not torch.compiler.is_compiling():
        _OPTIMIZER_STEPS[0] += 1


def _optimizer_steps() -> int:
    """The number of optimizer steps taken since the first call (registers the counting hook then)."""
    if not _STEP_HOOK:
        _STEP_HOOK.append(register_optimizer_step_post_hook(_count_optimizer_step))
    return _OPTIMIZER_STEPS[0]


class _EvalCache:
    """Mixin: in eval mode with autograd off, build the orthogonal kernel (or Fourier symbol) once and reuse it
    (ConvNorm keeps its filters with it too, ``orthofx.nn.convnorm.ConvNormConvNd._eval_kept``).

    Building the kernel is a chain of small matmuls and QR factorisations that a GPU runs latency-bound (about 5 ms
    per layer on an H200, against 0.5 ms for the convolution itself; ``benchmarks/compile.py``: a transformed
    ResNet-18 in eval ran 10x slower than its frozen form). A validation pass changes no parameter, so the kernel
    is cached there. The cache is used only when ``not self.training``, ``torch.is_grad_enabled()`` is False and
    nothing traces the module (compile, export), is keyed by every parameter's identity (the tensors
    ``torch.func.functional_call`` substitutes are new objects, even where one reuses a freed one's memory; held,
    not weakly referenced: ``torch.utils.swap_tensors``, which ``load_state_dict`` and ``.to()`` use under
    ``torch.__future__.set_swap_module_params_on_conversion(True)``, refuses a tensor with a weak reference),
    storage address, layout, version counter, dtype and device (an optimizer step, ``load_state_dict`` or ``.to()``
    invalidates it) plus the layer's settings (:meth:`_eval_cache_settings`: ``gain`` and ``compute_dtype``;
    ConvNorm's ``eps`` and dilation), and by the count of optimizer steps taken (any
    optimizer's ``step()``, counted by a global step post hook registered with the first entry): fused optimizers
    write the parameters without bumping their version counters, so an eval forward between ``backward()`` and a
    fused ``step()`` (metrics on the training batch of a model trained in eval mode) kept the kernel of the weights
    before the step for every later eval forward. It is dropped by ``train()`` and by any forward with gradients
    enabled (a training pass in eval mode, after which a fused step may follow). The entry also holds the
    parameters' storages (detached aliases of the tensors it was built from): ``param.data = t`` keeps the parameter
    object and its version counter, so only the address tells the new data apart, and an allocator may hand ``t``
    the address of storage freed since (two assignments in a row, or ``.half()`` then ``.float()``, gave the stale
    kernel); a storage the entry holds cannot be freed, so new data always has a new address (the price: the tensors
    a ``functional_call`` substituted stay allocated until the next eval forward replaces the entry or ``train()``
    drops it; the entry refers to nothing that refers to the layer, so it never keeps the layer alive). Parameters
    that are inference tensors, ``torch.func`` transformed tensors or results of a graph (a ``grad_fn``: held, they
    would keep that graph and what it saved alive) are never cached, nor is
    a layer with a ``torch.nn.utils.parametrize`` parametrization (its parameters live in the parametrization
    modules, and torch recomputes a parametrized tensor at every access too, outside ``parametrize.cached()``). It
    is not part of the state_dict. In-place writes that bump no version counter of the parameter bypass the key:
    writes through ``param.data`` (``param.data.copy_(t)``) and writes into a tensor that the parameters alias
    through ``.data``, e.g. the vector given to ``torch.nn.utils.vector_to_parameters`` (which assigns
    ``param.data`` = views of it: the call itself is seen, a later ``vec.add_(...)`` is not). After such writes in
    eval mode call ``module.train(False)`` again (or ``train()``).
    """

    def _eval_cache_owner(self) -> nn.Module:
        """The module whose own parameters the cached values are built from (and keyed by)."""
        return self

    def _eval_cache_settings(self) -> tuple:
        """The layer's settings that the cached values depend on besides its parameters (part of the key)."""
        return (self.gain, self.compute_dtype)

    def _eval_cache_tensors(self) -> list[torch.Tensor]:
        """The tensors the cached values are built from, each keyed by identity, address, layout, version, dtype
        and device: the owner's own parameters."""
        return list(self._eval_cache_owner().parameters(recurse=False))

    def _eval_values(self, eval_only: bool = True) -> dict | None:
        """The dict of values kept for the parameters as they are now (a new, empty one after any change of them),
        or ``None`` where nothing may be kept (see the class docstring). ``eval_only=False``: also in training mode
        or with gradients enabled (a value computed there on the side, for the next eval forward to find; the
        caller computes it without gradients)."""
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return None  # a traced graph must not touch the module's __dict__ (dynamo cannot trace dict.pop)
        if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
            # build() gives a Proxy there: cached, it was returned by later eager forwards (an eval-mode layer
            # traced under no_grad answered Proxy(getattr_10) instead of a tensor ever after)
            return None
        if eval_only and (self.training or torch.is_grad_enabled()):
            # a forward with gradients is a training pass in eval mode (frozen BatchNorm): the step after it may
            # be a fused optimizer's, which writes the parameters without bumping their version counters
            self._drop_eval_values()
            return None
        owner = self._eval_cache_owner()
        if parametrize.is_parametrized(owner):
            # the parametrized tensors are computed by modules outside parameters(recurse=False), from parameters
            # (and state) the key would not see
            return None
        params = self._eval_cache_tensors()
        if any(p.is_inference() or torch._C._functorch.is_functorch_wrapped_tensor(p) or p.grad_fn is not None
               for p in params):
            # no version counter (inference tensors), no storage (torch.func transforms), or a graph the entry
            # would keep alive (a functional_call's fast weights, computed with gradients, run under no_grad)
            return None
        key = (self._eval_cache_settings(), _optimizer_steps(),
               tuple((p.data_ptr(), p.shape, p.stride(), p._version, p.dtype, p.device) for p in params))
        cache = self.__dict__.get("_eval_cache")
        # the address and version alone do not name a tensor: a functional_call's substituted tensor may sit where
        # the freed one of the call before sat, with the same (zero) version, or be a transposed view of it
        if cache is None or cache[0] != key or any(held is not p for held, p in zip(cache[1], params)):
            # the detached aliases pin the storages the entry was built from, so that no later data (a
            # ``param.data = t``, which keeps the object and the version) can get one of their addresses; the
            # tensors themselves are held for their identity (a weak reference made swap_tensors refuse them)
            cache = (key, tuple(params), [p.detach() for p in params], {})
            self.__dict__["_eval_cache"] = cache
        return cache[3]

    def _cached(self, name, build):
        values = self._eval_values()
        if values is None:
            return build()
        if name not in values:
            values[name] = build()
        return values[name]

    def _drop_eval_values(self) -> None:
        """Forget every kept value (and release the storages the entry pins)."""
        self.__dict__.pop("_eval_cache", None)

    def train(self, mode: bool = True):
        self._drop_eval_values()
        return super().train(mode)

    def _adopt_mode(self, training: bool) -> None:
        """Take ``training`` as this layer's mode without dropping the cache (flags set directly).

        A replacement takes the original layer's mode (a pass rewriting an eval-mode model must not leave
        train-mode layers inside it); the kernel built in eval mode for ``init_error`` stays cached for the
        transform's later no-gradient runs, which set eval flags the same way (``passes.base.EvalRun``)."""
        for m in self.modules():
            m.training = training

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_eval_cache", None)
        return state


#: The module version (``_OrthogonalConvNd._version``) whose state_dicts hold ``block_shift`` where the layer has one.
_BLOCK_SHIFT_VERSION = 2


class _OrthogonalConvNd(_ComputedWeight, _FormatFree, _EvalCache, nn.Module):
    """Shared implementation of :class:`OrthogonalConv1d` and :class:`OrthogonalConv2d` (see the module docs)."""

    _dims = 0
    _fit_lr = 0.3
    #: torch's module version, saved in each state_dict's metadata: 2 since the buffer ``block_shift`` (one
    #: channel per group); a version-1 checkpoint without it loads at the centre (:meth:`_block_shift_entry`)
    _version = _BLOCK_SHIFT_VERSION

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding="same", dilation=1, groups=1,
                 bias=True, padding_mode="circular", device=None, dtype=None, *, method="auto", gain=1.0,
                 compute_dtype=None, input_size=None):
        super().__init__()
        d = self._dims
        name = type(self).__name__
        _check_device_position(device, name)
        factory = _factory(device, dtype)
        _set_conv_arguments(self, in_channels, out_channels, kernel_size, stride, dilation, groups, f"Conv{d}d")
        if padding_mode not in _PADDING_MODES:
            raise LayerArgumentError(
                f"{name}: padding_mode must be 'circular' (exactly orthogonal) or 'zeros' (orthogonal away from "
                f"the borders only, P0 Proposition 6), got {padding_mode!r}")
        self.padding_mode = padding_mode
        self.padding = self._check_padding(padding, name)
        if method not in _METHODS:
            raise LayerArgumentError(f"{name}: method must be one of {_METHODS} ('auto' picks the cheapest exact "
                                     f"construction), got {method!r}")
        self.gain = _gain(gain, factory["dtype"], name)
        bias = _bias_flag(bias, name)
        self.compute_dtype = _compute_dtype(compute_dtype)
        self.init_error: float | None = None
        self.input_size: tuple[int, ...] | None = None
        self.register_buffer("block_shift", None)  # set below where the blocks are a discrete choice (n == 1)
        if method == "cayley_fft":
            self._init_cayley(input_size, bias, factory, name)
            self.reset_parameters()
            return
        if input_size is not None:
            raise LayerArgumentError(
                f"{name}: input_size={input_size!r} is only used by method='cayley_fft' (an operator defined on one "
                f"input size); method={method!r} builds an explicit kernel that works on every input size. Drop "
                f"input_size or pass method='cayley_fft'")
        g = self.groups
        C = self.in_channels // g
        M = self.out_channels // g
        self._C, self._M = C, M
        exists, case, reason = orthogonal_conv_exists(self.in_channels, self.out_channels, self.kernel_size,
                                                      self.stride, dims=d, groups=g, padding="circular",
                                                      dilation=self.dilation)
        self.case = case
        if not exists:
            dilated = "" if all(dl == 1 for dl in self.dilation) else f", dilation={self.dilation}"
            raise ImpossibleLayerError(
                f"{name}(in_channels={self.in_channels}, out_channels={self.out_channels}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}{dilated}, groups={g}): no orthogonal "
                f"convolution exists (P0 Theorem 4, circular padding): {reason}. {self._impossible_fix(case)}")

        # the construction (module docs, items 4 and 5): blocks of kernel k' on n channels, then the reshaped
        # kernel R (size r) or embedding, all for the stride the taps see
        build = self._build_stride
        self._kp = tuple(k - s + 1 if k >= s else 1 for k, s in zip(self.kernel_size, build))
        self._r = tuple(min(k, s) for k, s in zip(self.kernel_size, build))
        self._strided = any(s > 1 for s in build)
        self._embed = (not self._strided) and M > C
        n = M if self._embed else C
        self._n = n
        nblocks = [kp - 1 for kp in self._kp]
        if method == "rko" and any(nblocks):
            raise LayerArgumentError(
                f"{name}: method='rko' (reshaped kernel only) is exact only when "
                f"{rko_problem(self.kernel_size, self.stride, self.dilation)}; use method='bcop' or 'auto'")
        self.method = ("rko" if not any(nblocks) else "bcop") if method == "auto" else method
        # block j of dimension i has rank ra = n // 2 (j even, class a) or rb = n - ra (j odd, class b). A block
        # of rank n is the identity (P = I, taps [I, 0]), left out of the list and counted in _identity_taps
        # instead: that is class b when n == 1 (one channel per group, e.g. a depthwise layer), whose 1 x 1 basis
        # q gives P = q q / q^2 = 1 for every value, so a parameter for it would never receive a gradient (the
        # rank-0 class-a blocks are delays: they make the kernel's shift)
        self._ra, self._rb = n // 2, n - n // 2
        ranks = {"a": self._ra, "b": self._rb}
        self._block_index: list[list[tuple[str, int]]] = []
        identities = []
        counts = {"a": 0, "b": 0}
        for m in nblocks:
            dim_blocks = []
            for j in range(m):
                cls = "a" if j % 2 == 0 else "b"
                if ranks[cls] < n:
                    dim_blocks.append((cls, counts[cls]))
                    counts[cls] += 1
            self._block_index.append(dim_blocks)
            identities.append(m - len(dim_blocks))
        self._identity_taps = tuple(identities)
        if n == 1 and any(nblocks):
            # every block is a delay or the identity, so the block part is a pure shift by 0 .. k' - 1 taps per
            # dimension: which one is a discrete choice, held per group (module docs, item 2). Not a parameter:
            # nothing differentiable chooses it (reset_parameters sets the centre, from_conv's nearest start the
            # best window)
            self.register_buffer("block_shift", torch.empty(g, d, dtype=torch.long, device=factory["device"]))
        if counts["a"] and self._ra > 0:
            self.proj_a = nn.Parameter(torch.empty(g, counts["a"], n, self._ra, **factory))
        else:
            self.register_parameter("proj_a", None)
        if counts["b"]:
            self.proj_b = nn.Parameter(torch.empty(g, counts["b"], n, self._rb, **factory))
        else:
            self.register_parameter("proj_b", None)
        if self._embed:
            shape = (g, M, C)
        else:
            shape = (g, M, C * math.prod(self._r))
        self.matrix = nn.Parameter(torch.empty(*shape, **factory))
        self._matrix_tall = shape[1] >= shape[2]
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    # ---------------------------------------------------------------------------------------- Cayley-FFT

    def _init_cayley(self, input_size, bias: bool, factory: dict, name: str) -> None:
        """Set up ``method="cayley_fft"`` (see :class:`OrthogonalConv2d`): checks, sizes and the parameter."""
        d = self._dims
        if input_size is None:
            raise LayerArgumentError(
                f"{name}: method='cayley_fft' needs input_size, the spatial size of the inputs the layer will see "
                f"(e.g. input_size={(32,) * d}): its orthogonal operator is built in the Fourier domain of one "
                f"circular grid. Pass it, or use method='auto' (explicit kernel, any input size)")
        size = _tuple(input_size, d, "input_size", broadcast=False)
        if self.padding != "same" or self.padding_mode != "circular":
            raise LayerArgumentError(
                f"{name}: method='cayley_fft' is a circular operator with output size input_size / stride: it needs "
                f"padding='same' and padding_mode='circular', got padding={self.padding!r}, "
                f"padding_mode={self.padding_mode!r}. Use method='bcop' for zero padding")
        if any(dl != 1 for dl in self.dilation):
            raise LayerArgumentError(
                f"{name}: method='cayley_fft' builds a full-size {size} kernel, for which dilation has no meaning; "
                f"got dilation={self.dilation}. Use dilation=1, or method='bcop' (explicit dilated kernels)")
        if any(n % s for n, s in zip(size, self.stride)):
            raise LayerArgumentError(
                f"{name}: input_size={size} must be divisible by stride={self.stride} for method='cayley_fft' "
                f"(the operator acts on the {self.stride} space-to-depth blocks of the input)")
        grid = tuple(n // s for n, s in zip(size, self.stride))
        kp = tuple(-(-k // s) for k, s in zip(self.kernel_size, self.stride))
        if any(k > n for k, n in zip(kp, grid)):
            raise LayerArgumentError(
                f"{name}: kernel_size={self.kernel_size} is too large for input_size={size} at stride={self.stride} "
                f"(the {kp} parameter kernel on the space-to-depth grid must fit in {grid}); use a smaller kernel")
        g = self.groups
        C = self.in_channels // g
        M = self.out_channels // g
        cp = C * math.prod(self.stride)
        self._C, self._M, self._cp = C, M, cp
        self._N = max(M, cp)
        self._grid = grid
        self._kp = kp
        self._strided = any(s > 1 for s in self.stride)
        self.input_size = size
        self.case = "RO" if M <= cp else "CO"
        self.method = "cayley_fft"
        for unused in ("proj_a", "proj_b", "matrix"):
            self.register_parameter(unused, None)
        self.cayley_kernel = nn.Parameter(torch.empty(g, self._N, self._N, *kp, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_channels, **factory))
        else:
            self.register_parameter("bias", None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        # a state_dict saved before the identity blocks of n == 1 were left out holds their proj_b, whose value
        # has no effect on the kernel (P = 1 for any 1 x 1 basis): dropped, so that such checkpoints still load
        key = prefix + "proj_b"
        if (key in state_dict and self.method != "cayley_fft" and self._n == 1 and self.proj_b is None
                and tuple(state_dict[key].shape[-2:]) == (1, 1)):
            state_dict.pop(key)
        if self._block_shift is not None:
            self._block_shift_entry(state_dict, prefix, local_metadata)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def _block_shift_entry(self, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        """``block_shift`` of a state_dict being loaded: a checkpoint saved before the buffer existed (its layer's
        blocks were the fixed shift to the centre) gets the centre, so that it loads with the kernel it saved; a
        saved one is checked, since a shift outside the kernel would give an all-zero one.

        Old means: the layer's metadata gives a version below :attr:`_version` (or none, a dict rebuilt without
        ``_metadata``) and the dict holds the layer's ``matrix``. Any other dict without the key (a partial
        ``load_state_dict(..., strict=False)``, e.g. only the bias) leaves it missing, so that the shift the layer
        holds stays and torch lists the key in ``missing_keys``: filling in the centre there changed the kernel
        silently."""
        key = prefix + "block_shift"
        value = state_dict.get(key)
        if value is None:
            version = local_metadata.get("version") if isinstance(local_metadata, dict) else None
            near = state_dict.get(prefix + "matrix")
            if (version is None or version < _BLOCK_SHIFT_VERSION) and isinstance(near, torch.Tensor):
                state_dict[key] = self._default_block_shift(near.device)
            return
        if (not isinstance(value, torch.Tensor) or value.is_meta
                or tuple(value.shape) != tuple(self._block_shift.shape)):
            return  # torch's own checks report those
        largest = tuple(kp - 1 for kp in self._kp)
        if value.is_floating_point() or value.is_complex() or bool(
                ((value < 0) | (value > torch.tensor(largest, device=value.device))).any()):
            raise LayerArgumentError(
                f"{layer_label(self)}: the state_dict's {key!r} must hold integer shifts between 0 and {largest} per "
                f"dimension (each group's window in the kernel_size={self.kernel_size} kernel), got "
                f"{self._bad_shifts(value, largest)}. Load a state_dict saved from a layer of the same configuration")

    @staticmethod
    def _bad_shifts(value: torch.Tensor, largest: tuple[int, ...]) -> str:
        """The first few groups' shifts of ``value`` ``(groups, d)`` outside 0 .. ``largest``, ``'group 3: [3, 0]'``
        each (a groups=1024 layer's whole list ran to thousands of characters); its dtype where not an integer one."""
        if value.is_floating_point() or value.is_complex():
            return f"a {value.dtype} tensor"
        bad = [f"group {i}: {row}" for i, row in enumerate(value.tolist())
               if any(not 0 <= v <= top for v, top in zip(row, largest))]
        return first_few(bad, 3)

    def __setstate__(self, state: dict) -> None:
        """A layer pickled before the buffer ``block_shift`` existed (one channel per group: its blocks were the
        fixed shift to the centre) gets the centre, so that it builds the same kernel the new way and loads the
        new checkpoints (else: 'Unexpected key block_shift'); the other layers get the ``None`` entry."""
        super().__setstate__(state)
        if "block_shift" in self._buffers:
            return
        one_channel = (getattr(self, "method", None) != "cayley_fft" and getattr(self, "_n", 0) == 1
                       and any(getattr(self, "_block_index", ())))
        if not one_channel:
            self.register_buffer("block_shift", None)
            return
        self.register_buffer("block_shift", self._default_block_shift(self.matrix.device))

    @property
    def _block_shift(self) -> torch.Tensor | None:
        """The buffer ``block_shift`` (``None`` where the blocks are no discrete choice), read from ``_buffers``
        (:meth:`__setstate__` gives layers pickled before it the entry)."""
        return self._buffers.get("block_shift")

    def _default_block_shift(self, device=None) -> torch.Tensor:
        """``block_shift`` of a fresh layer, ``(groups, d)``: the count of rank-0 blocks among the ``k' - 1`` of each
        dimension, which alternate from rank 0 (``ceil((k' - 1) / 2)``, the centre window: ``(k - 1) / 2`` for an odd
        ``k`` at stride 1)."""
        return torch.tensor([kp // 2 for kp in self._kp], dtype=torch.long, device=device).expand(
            self.groups, self._dims).clone()

    def _eval_cache_tensors(self) -> list[torch.Tensor]:
        """The parameters and ``block_shift`` (the kernel depends on it: a ``load_state_dict`` writes it)."""
        tensors = super()._eval_cache_tensors()
        return tensors if self._block_shift is None else [*tensors, self._block_shift]

    @property
    def _param_dtype(self) -> torch.dtype:
        """The parameters' dtype (:func:`_kept_parameter`: concrete under ``torch.fx`` tracing and with a torch
        parametrization)."""
        return _kept_parameter(self, "cayley_kernel" if self.method == "cayley_fft" else "matrix").dtype

    def _cayley_skew(self, cd: torch.dtype) -> torch.Tensor:
        r"""``A(f) = \hat V(f) - \hat V(f)^H`` on the rfft half spectrum of the ``n/S`` grid, ``(g, F, N, N)``;
        tap ``p`` of ``cayley_kernel`` sits at offset ``p - (k_p - 1) // 2`` (centred)."""
        d = self._dims
        V = self.cayley_kernel.to(cd)
        pad = []
        for k, n in reversed(list(zip(self._kp, self._grid))):
            pad += [0, n - k]
        V = F.pad(V, pad) if any(pad) else V
        shifts = tuple(-((k - 1) // 2) for k in self._kp)
        if any(shifts):
            V = torch.roll(V, shifts=shifts, dims=tuple(range(-d, 0)))
        Vh = torch.fft.rfftn(V, dim=tuple(range(-d, 0)))            # (g, N, N, *freq)
        g, N = self.groups, self._N
        Vh = Vh.permute(0, *range(3, 3 + d), 1, 2).reshape(g, -1, N, N)
        return Vh - Vh.mH

    def _cayley_unit_symbol(self, cd: torch.dtype | None = None) -> torch.Tensor:
        r"""The per-frequency matrices without gain, ``(g, F, M, C S^d)`` complex: the needed block of the Cayley
        transform :math:`Q = (I - A)(I + A)^{-1} = (I + A)^{-1}(I - A)` (the factors commute)."""
        with autocast_off(_kept_parameter(self, "cayley_kernel")):
            return self._cayley_transform(cd or self.compute_dtype)

    def _cayley_transform(self, cd: torch.dtype) -> torch.Tensor:
        """:meth:`_cayley_unit_symbol` in ``cd`` (outside autocast)."""
        A = self._cayley_skew(cd)
        N, M, cp = self._N, self._M, self._cp
        eye = torch.eye(N, dtype=A.dtype, device=A.device)
        plus, minus = eye + A, eye - A
        if M < N:    # RO: rows of Q = (I - A)(I + A)^{-1}: solve X (I + A) = (I - A)[:M]
            Q = torch.linalg.solve(plus, minus[..., :M, :], left=False)
        elif cp < N:   # CO: columns of Q = (I + A)^{-1}(I - A)
            Q = torch.linalg.solve(plus, minus[..., :, :cp])
        else:
            Q = torch.linalg.solve(plus, minus)
        if cd == torch.float32:  # complex64 solves (the compute dtype, not Q.dtype: a Proxy under torch.fx)
            # the solve's orthogonality error is about eps * cond(I + A) = eps * sqrt(1 + |A|^2), and |A| grows in
            # training (1.5e-5 after 10 Adam steps at lr 0.1 for N = 128): one Newton-Schulz step
            # Q (3 I - Q^H Q) / 2 squares that error (to the rounding of its own products, ~1e-6)
            if M <= cp:
                Q = 1.5 * Q - 0.5 * ((Q @ Q.mH) @ Q)
            else:
                Q = 1.5 * Q - 0.5 * (Q @ (Q.mH @ Q))
        return Q

    def frequency_response(self) -> torch.Tensor:
        r"""``method="cayley_fft"`` only: the operator's per-frequency matrices, ``(groups, F, M, C S^d)`` complex
        in the layer's precision (``gain`` included; ``F`` = frequencies of the ``rfftn`` half spectrum of the
        ``input_size / stride`` grid, C-order; the input side is space-to-depth ordered, channel-major)."""
        if self.method != "cayley_fft":
            raise LayerArgumentError(f"{type(self).__name__}: frequency_response() is defined for "
                                     f"method='cayley_fft' only, this layer uses method={self.method!r}")
        Q = self._cayley_unit_symbol() * self.gain
        return Q.to(torch.complex128 if self._param_dtype == torch.float64 else torch.complex64)

    def _symbol_taps(self, Q: torch.Tensor) -> torch.Tensor:
        """Per-frequency matrices ``(g, F, M, C S^d)`` -> the circular kernel ``q`` on the ``n/S`` grid,
        ``(g, M, C S^d, *grid)`` real, with ``y[i] = sum_j q[i - j] x'[j]``."""
        d = self._dims
        freq = self._grid[:-1] + (self._grid[-1] // 2 + 1,)
        g, _, M, cp = Q.shape
        Qs = Q.reshape(g, *freq, M, cp).permute(0, d + 1, d + 2, *range(1, d + 1))
        return torch.fft.irfftn(Qs, s=self._grid, dim=tuple(range(-d, 0)))

    def _cayley_kernel_from_taps(self, q: torch.Tensor) -> torch.Tensor:
        """``q`` ``(g, M, C S^d, *grid)`` -> the full-size strided kernel ``(g, M, C, *input_size)`` read at the
        offsets of :attr:`pads` (``K[m, c, t] = q[m, (c, r(t)), a(t)]``, see :func:`_tap_index`)."""
        g, M, C = self.groups, self._M, self._C
        q = q.reshape(g, M, C, *self.stride, *self._grid)
        rs, as_ = [], []
        for n, s, (left, _) in zip(self.input_size, self.stride, self.pads):
            r, a = _tap_index(n, s, left, device=q.device)
            rs.append(r)
            as_.append(a)
        index = (slice(None),) * 3 + tuple(_broadcast_index(rs)) + tuple(_broadcast_index(as_))
        return q[index]

    def _conv_taps(self, kernel: torch.Tensor, lefts: Sequence[int] | None = None) -> torch.Tensor:
        """An ordinary kernel ``(g, M, C, *k)`` read at offsets ``t - left`` (default ``"same"``,
        ``left = (k - 1) // 2``) -> its circular kernel ``q`` on the space-to-depth ``n/S`` grid,
        ``(g, M, C S^d, *grid)`` (taps folded modulo the grid)."""
        g, M, C, d = self.groups, self._M, self._C, self._dims
        if lefts is None:
            lefts = [(k - 1) // 2 for k in kernel.shape[3:]]
        q = kernel.new_zeros(*self.stride, *self._grid, g, M, C)
        rs, as_ = [], []
        for n, s, k, left in zip(self.input_size, self.stride, kernel.shape[3:], lefts):
            r, a = _tap_index(n, s, left, taps=k, device=q.device)
            rs.append(r)
            as_.append(a)
        values = kernel.permute(*range(3, 3 + d), 0, 1, 2)
        q.index_put_(tuple(_broadcast_index(rs)) + tuple(_broadcast_index(as_)), values, accumulate=True)
        q = q.permute(2 * d, 2 * d + 1, 2 * d + 2, *range(2 * d))   # (g, M, C, *S, *grid)
        return q.reshape(g, M, self._cp, *self._grid)

    @torch.no_grad()
    def _cayley_fit(self, target: torch.Tensor, steps: int, lefts: Sequence[int] | None = None) -> None:
        r"""Nearest start for ``cayley_fft`` from a kernel ``(g, M, C, *k)`` (without gain) read at the offsets
        ``t - left`` (:meth:`_conv_taps`).

        Closed form: per frequency the reachable unitary :math:`U` nearest to the target symbol (its polar factor
        completed to :math:`N \times N`, :func:`_unitary_completion`), its inverse Cayley transform
        :math:`A = (I - U)(I + U)^{-1}` (:func:`_inverse_cayley`, eigenvalues near -1 clamped), and the
        least-squares ``k_p``-tap kernel with :math:`\hat V = A / 2`; exact when each window lies in one stride
        block (e.g. ``k = S``, padding 0: the polar factor of the reshaped kernel, or the nearest rotation where the
        square real symbol has determinant -1, up to the clamp). Kept if it beats ``V = 0`` (:math:`Q = I`).
        Then ``steps`` Adam steps on :math:`\|q - q_0\|^2` (the operators' Frobenius distance); the best kernel
        seen is kept.
        """
        cd = self.compute_dtype
        d, g, M, cp, N = self._dims, self.groups, self._M, self._cp, self._N
        # at unit norm (exactly, by a power of two): the optimum does not depend on the target's scale, the steps
        # do (Adam's, see _OrthogonalConvNd._fit; the real-symbol test of _unitary_completion; squares overflowing
        # float32), so that a kernel of 1e30 or 1e-30 got another start than the same kernel of 1
        q0 = _unit_norm(self._conv_taps(target.to(cd), lefts))
        norm = float(q0.square().sum()) or 1.0
        T = torch.fft.rfftn(q0, dim=tuple(range(-d, 0)))            # (g, M, cp, *freq)
        T = T.permute(0, *range(3, 3 + d), 1, 2).reshape(g, -1, M, cp)
        polar = _unitary_completion(T) if M <= cp else _unitary_completion(T.mH).mH
        A = _inverse_cayley(polar)
        freq = self._grid[:-1] + (self._grid[-1] // 2 + 1,)
        half = (0.5 * A).reshape(g, *freq, N, N).permute(0, d + 1, d + 2, *range(1, d + 1))
        full = torch.fft.irfftn(half, s=self._grid, dim=tuple(range(-d, 0)))   # (g, N, N, *grid)
        taps = [torch.remainder(torch.arange(k, device=full.device) - (k - 1) // 2, n)
                for k, n in zip(self._kp, self._grid)]
        start = full[(slice(None),) * 3 + tuple(_broadcast_index(taps))]

        def loss_fn():
            q = self._symbol_taps(self._cayley_unit_symbol(cd))
            return (q - q0).square().sum() / norm

        self.cayley_kernel.zero_()
        identity_loss = float(loss_fn())
        self.cayley_kernel.copy_(start.to(self.cayley_kernel))
        best = float(loss_fn())
        if not math.isfinite(best) or best > identity_loss:
            self.cayley_kernel.zero_()
            best = identity_loss
        if steps == 0:
            return
        _fit_best([self.cayley_kernel], loss_fn, best, steps, lr=0.3 / math.sqrt(max(N, 2)))

    # ---------------------------------------------------------------------------------------- construction

    @property
    def _build_stride(self) -> tuple[int, ...]:
        """The stride the kernel is built for (:func:`build_stride`)."""
        return build_stride(self.kernel_size, self.stride, self.dilation)

    def _impossible_fix(self, case: str) -> str:
        g, C, M = self.groups, self._C, self._M
        build = self._build_stride
        largest = g * C * math.prod(min(k, s) for k, s in zip(self.kernel_size, build))
        hints = []
        if case == "RO":
            if dilation_blocks_row_orthogonal(self.kernel_size, self.stride, self.dilation, C, M):
                hints.append("use a dilation coprime to the stride in every strided dimension (e.g. dilation=1)")
            k_min = next((k for k in range(1, max(build) + 1)
                          if C * math.prod(min(k, s) for s in build) >= M), None)
            if k_min is not None:
                hints.append(f"use kernel_size >= {k_min}")
        elif build != self.stride:
            hints.append("use a dilation coprime to the stride in every strided dimension")
        else:
            hints.append(f"use kernel_size >= stride ({max(self.stride)}) in every dimension")
        hints.append(f"use out_channels <= {largest}")
        return ("Fix: " + " or ".join(hints) + ", or keep a plain convolution (e.g. with the orth_regularizer "
                "pass) for this layer.")

    def _check_padding(self, padding, name: str):
        d = self._dims
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise LayerArgumentError(f"{name}: padding must be 'same', 'valid', an int or a tuple of {d} ints, "
                                         f"got {padding!r}")
            return padding
        return _tuple(padding, d, "padding", minimum=0)

    @property
    def effective_kernel_size(self) -> tuple[int, ...]:
        """Extent of the dilated kernel, :math:`D(k - 1) + 1` per dimension."""
        return tuple(dl * (k - 1) + 1 for k, dl in zip(self.kernel_size, self.dilation))

    @property
    def pads(self) -> tuple[tuple[int, int], ...]:
        r"""``(left, right)`` padding per spatial dimension applied before the convolution.

        ``"same"`` (``k_eff = dilation * (k - 1) + 1``): ``left = (k_eff - 1) // 2`` and
        ``right = max(k_eff - S - left, left)``. The output grid is exactly ``input / S`` on every input divisible
        by the stride (``left + right >= k_eff - S``, the padding the circular operator needs, and
        ``2 * left <= k_eff - 1``), with nn.Conv's ``padding=(k-1)//2`` alignment. This is symmetric, i.e. one
        ``nn.Conv(padding=(k_eff-1)//2, padding_mode='circular')``, in every case but an even ``k_eff`` at stride 1,
        where it is PyTorch's ``padding='same'`` split ``(k_eff/2 - 1, k_eff/2)``. On inputs not divisible by the
        stride the output has nn.Conv's size with that padding (and the layer is not orthogonal there).
        ``"valid"``: none. An int ``p``: ``p`` on both sides.

        ``method="cayley_fft"``: the offsets at which :meth:`to_conv` reads its full-size ``n``-tap kernel,
        ``left + right = n - 1`` at stride 1 (PyTorch's ``'same'`` split for an even ``n``) and the even one of
        ``n - S``, ``n - S + 1`` at stride ``S > 1`` (symmetric).
        """
        if self.method == "cayley_fft":
            out = []
            for n, s in zip(self.input_size, self.stride):
                total = n - 1 if s == 1 else n - s + (n - s) % 2
                out.append((total // 2, total - total // 2))
            return tuple(out)
        if self.padding == "valid":
            return ((0, 0),) * self._dims
        if self.padding == "same":
            out = []
            for ke, s in zip(self.effective_kernel_size, self.stride):
                left = (ke - 1) // 2
                out.append((left, max(ke - s - left, left)))
            return tuple(out)
        return tuple((p, p) for p in self.padding)

    @torch.no_grad()
    def reset_parameters(self, init: str = "random") -> None:
        r"""Re-initialise the kernel (and the bias, uniform in :math:`\pm 1/\sqrt{\text{fan\_in}}` like nn.Conv).

        ``init="random"`` (default): Gaussian parameters, i.e. Haar-random orthonormal matrices and projectors.
        ``init="centre"``: consecutive blocks complementary, so the block part is a pure shift and the kernel is
        a random orthonormal matrix on its centre taps (one tap for odd ``k`` at stride 1). Where a dimension has
        an odd number of blocks (``k - S``, the count, is odd: an even ``k`` at stride 1, ``k = 3`` at stride 2)
        its last block has no partner and stays random (a single projector block is never a pure shift): the
        kernel then spans one more tap there (2 x 2 for ``k = 4`` at stride 1, all 3 x 3 for ``k = 3`` at stride 2).
        With one input channel per group (``block_shift``) both inits put every group's window at the centre.
        ``init_error`` becomes ``None``: it measured the start :meth:`from_conv` made.
        """
        if init not in ("random", "centre"):
            raise LayerArgumentError(f"init must be 'random' or 'centre', got {init!r}")
        self.init_error = None
        if self.method == "cayley_fft":
            # random: entries N(0, 1 / (N k_p)), so A(f)'s eigenvalues are O(1) and Q spreads over the unitary
            # group; centre: V = 0, A = 0, Q = I (the identity on the first min(M, C S^d) channels)
            if init == "random":
                self.cayley_kernel.normal_(0.0, 1.0 / math.sqrt(self._N * math.prod(self._kp)))
            else:
                self.cayley_kernel.zero_()
        for p in (self.proj_a, self.proj_b, self.matrix):
            if p is not None:
                p.normal_()
        if self._block_shift is not None:  # one channel per group: the blocks a shift to the centre, for both inits
            self._block_shift.copy_(self._default_block_shift(self._block_shift.device))
        if init == "centre":
            self._pair_blocks()
        if self.bias is not None:
            fan_in = self._C * math.prod(self.kernel_size)
            bound = 1 / math.sqrt(fan_in)
            self.bias.uniform_(-bound, bound)

    @torch.no_grad()
    def _pair_blocks(self) -> None:
        """Make blocks 2t and 2t+1 of each dimension complementary projectors (their product is a shift by one)."""
        if self.proj_b is None or self.proj_a is None:
            return  # n == 1: the blocks are fixed shifts already
        ra = self._ra
        for dim_blocks in self._block_index:
            for t in range(len(dim_blocks) // 2):
                (_, ia), (_, ib) = dim_blocks[2 * t], dim_blocks[2 * t + 1]
                # Q of a float64 Gaussian (the draw and the matrix of torch.linalg.qr, bit for bit, without its R);
                # its signs do not matter: the blocks use their bases through projectors only
                # drawn on the CPU, as the seed's stream is there, whatever torch's default device is (a 'meta'
                # default had no values to factorise, a 'cuda' one drew another stream)
                full = _haar_factor(self._n, self._n, self.groups, device="cpu")[0]
                self.proj_a[:, ia] = full[..., :ra].to(self.proj_a)
                self.proj_b[:, ib] = full[..., ra:].to(self.proj_b)

    def _projector_bases(self, cd: torch.dtype) -> dict[str, tuple[torch.Tensor, ...]]:
        r"""Orthonormal bases ``(g, n, r)`` of the projector blocks, per class (``"a"``, ``"b"``; empty if absent;
        a sequence, or one fx proxy under symbolic tracing).

        One batched QR for both classes when their ranks agree (even ``n``), and ``unbind`` rather than indexing
        per block (its backward is one stack): on a GPU the build is bound by kernel launches, and each QR with
        its backward is a few dozen of them. The bases are Householder ``Q`` factors *without* the sign fix of
        :func:`orthofx.nn.stiefel.orthonormal`: a block uses its basis only through :math:`P = QQ^T`, and
        :math:`(QS)(QS)^T = QQ^T` for any diagonal :math:`S = \pm 1`, bit for bit (a product of two sign flips is
        exact, and so is rounding a negated sum), for the values and for the gradients. That saves three operations
        per forward (and one per backward) of a launch-bound build."""
        a, b = self.proj_a, self.proj_b
        if a is not None and b is not None and self._ra == self._rb:
            count_a = sum(cls == "a" for blocks in self._block_index for cls, _ in blocks)
            bases = _projector_basis(torch.cat([a, b], dim=1).to(cd)).unbind(1)
            return {"a": bases[:count_a], "b": bases[count_a:]}
        return {"a": _projector_basis(a.to(cd)).unbind(1) if a is not None else (),
                "b": _projector_basis(b.to(cd)).unbind(1) if b is not None else ()}

    def _apply_blocks(self, X: torch.Tensor, cd: torch.dtype, side: str, adjoint: bool = False) -> torch.Tensor:
        r"""``X`` composed with the block part ``A`` of the kernel, block by block, without forming ``A``.

        ``A[p] = T_1[p_1] \cdots T_d[p_d]``, where the 1-D kernel of dimension ``i`` is the product of its blocks
        :math:`T_i = B_m \cdots B_1` and a block is :math:`B = P + (I - P) z` (:math:`P = QQ^T`, a projector;
        ``z`` delays by one tap; a rank-0 projector makes ``B = z``; a rank-``n`` one, ``B = I``, is not listed: it
        appends a zero tap, ``_identity_taps``). ``side="right"``: ``X`` is
        ``(g, *taps, a, n)`` and the result is :math:`(X \star A)[p] = \sum_q X[p - q] A[q]`; ``side="left"``:
        ``X`` is ``(g, *taps, n, b)`` and the result is :math:`\sum_q A[q] X[p - q]`; each spatial size grows by
        ``k'_i - 1``. ``adjoint=True`` applies the adjoint map (the correlation :math:`\sum_q X[p + q] A[q]^T`,
        resp. :math:`\sum_q A[q]^T X[p + q]`), which shrinks each spatial size by ``k'_i - 1``.

        A block acts as :math:`X'[p] = (XP)[p] + (X - XP)[p - 1]` (``PX`` on the left; the adjoint reads
        ``p + 1``): one product with the projector's basis over all taps. On a single tap (the first block of each
        dimension at stride 1) the two terms do not overlap, :math:`X' = [XP, X - XP]`: one concatenation instead of
        two zero paddings and a sum (whose backward was two more kernels). For a 3 x 3 stride-2 layer
        :math:`R \star A` costs 10 products of ``n x n`` matrices this way, against 20 when ``A`` is formed
        first (4) and convolved with ``R`` (16)."""
        d = self._dims
        bases = self._projector_bases(cd)
        steps = self._block_order(side)
        if adjoint:  # the identity blocks' zero taps (see below): their adjoint drops them
            for dim, extra in enumerate(self._identity_taps):
                if extra:
                    X = X.narrow(1 + dim, 0, X.shape[1 + dim] - extra)
        # X's taps per dimension (not adjoint): the reshaped kernel's r (1 at stride 1), one more per block. Known
        # from the layer's sizes, so also under symbolic tracing (no concrete shapes there)
        taps = list(self._r)
        for dim, (cls, idx) in (reversed(steps) if adjoint else steps):
            if (self.proj_a if cls == "a" else self.proj_b) is None:  # rank-0 projector: a pure delay
                X = self._block_step(X, dim, side, adjoint)
            else:
                X = self._block_step(X, dim, side, adjoint, Q=bases[cls][idx], single=taps[dim] == 1)
            taps[dim] += 1
        if not adjoint:
            # an identity block (rank n, not listed) is the polynomial I written on two taps [I, 0]: it commutes
            # with every block, so all of them together append their zero taps at the end of the dimension
            for dim, extra in enumerate(self._identity_taps):
                if extra:
                    X = _delay(X, d - dim + 1, before=0, after=extra)
        return X

    def _block_order(self, side: str) -> list[tuple[int, tuple[str, int]]]:
        r"""The listed blocks ``(dim, (class, index))`` in the order :meth:`_apply_blocks` applies them to ``X``
        (not adjoint): ``side="right"``, :math:`X \star T_1 \star \cdots \star T_d`, so dimension 1 first and
        within it the last block first; ``side="left"``, :math:`T_1 \star \cdots \star T_d \star X`, so dimension
        ``d`` first, its first block first. The adjoint runs the same steps backwards.

        >>> layer = OrthogonalConv2d(2, 8, 3)  # two blocks per dimension, classes a then b
        >>> layer._block_order("left")
        [(1, ('a', 1)), (1, ('b', 1)), (0, ('a', 0)), (0, ('b', 0))]
        """
        if side == "right":
            return [(dim, block) for dim in range(self._dims) for block in reversed(self._block_index[dim])]
        return [(dim, block) for dim in reversed(range(self._dims)) for block in self._block_index[dim]]

    def _block_step(self, X: torch.Tensor, dim: int, side: str, adjoint: bool, Q: torch.Tensor | None = None,
                    P: torch.Tensor | None = None, single: bool = False) -> torch.Tensor:
        r"""One block of :meth:`_apply_blocks` on ``X`` ``(g, *taps, a, b)``, along dimension ``dim``: the
        projector :math:`QQ^T` (basis ``Q`` ``(g, n, r)``) or ``P`` ``(g, n, n)``; neither: a rank-0 block, a pure
        delay. ``single``: ``X`` has one tap along ``dim`` (not adjoint), so the two terms do not overlap.

        :math:`X'[p] = (XP)[p] + (X - XP)[p - 1]` (``PX`` with ``side="left"``); the adjoint (``P`` symmetric) is
        :math:`X'[p] = (XP)[p] + (X - XP)[p + 1]`, one tap fewer."""
        g, n, d = self.groups, self._n, self._dims
        axis, trailing = 1 + dim, d - dim + 1  # X is (g, *taps, a, b)
        if Q is None and P is None:
            return X.narrow(axis, 1, X.shape[axis] - 1) if adjoint else _delay(X, trailing)
        if side == "right":
            rows = X.reshape(g, -1, n)
            Y = ((rows @ Q) @ Q.mT if P is None else rows @ P).reshape(X.shape)
        else:
            columns = X.movedim(-2, 1)  # (g, n, *taps, b)
            flat = columns.flatten(2)
            Y = (Q @ (Q.mT @ flat) if P is None else P @ flat).reshape(columns.shape).movedim(1, -2)
        if adjoint:
            size = X.shape[axis] - 1
            return Y.narrow(axis, 0, size) + (X - Y).narrow(axis, 1, size)
        if single:  # no overlap: the sum with zeros is the concatenation
            return torch.cat([Y, X - Y], dim=axis)
        return _delay(Y, trailing, before=0, after=1) + _delay(X - Y, trailing)

    def _unit_kernel(self, cd: torch.dtype | None = None, shift: tuple[int, ...] | None = None) -> torch.Tensor:
        """The orthogonal kernel without gain, ``(g, M, C, *k)`` in ``cd``.

        ``shift``: the blocks are known to form a pure shift by these taps (:meth:`_paired_shift`); the kernel is
        then the orthonormal matrix on the window at the shift, zero elsewhere, built without the block product
        (the same kernel to rounding)."""
        # built as compute_dtype says, also inside torch.autocast: in bfloat16 the kernel would be orthogonal to
        # 1e-2 only, and an eval-mode layer would keep that kernel cached after the autocast block
        with autocast_off(_kept_parameter(self, "matrix")):
            return self._block_kernel(cd or self.compute_dtype, shift)

    def _block_kernel(self, cd: torch.dtype, shift: tuple[int, ...] | None) -> torch.Tensor:
        """:meth:`_unit_kernel` in ``cd`` (outside autocast)."""
        g, M, C = self.groups, self._M, self._C
        W = orthonormal(self.matrix.to(cd), tall=self._matrix_tall)
        if shift is not None:
            pads = [(c, k - r - c) for c, r, k in zip(shift, self._r, self.kernel_size)]
            return F.pad(W.reshape(g, M, C, *self._r), flat_pads(pads))
        if self._block_shift is not None:  # n == 1: the blocks are each group's shift
            return self._shift_windows(W.reshape(g, M, C, *self._r))
        X, side = self._block_start(W)
        return self._spatial_last(self._apply_blocks(X, cd, side))

    def _window_index(self, like: torch.Tensor, columns: int) -> torch.Tensor:
        r"""Where each group's window taps lie in its kernel: ``(g, columns, r^d)`` (the same row repeated, a view),
        flat C-order indices of the kernel's ``k^d`` taps, window taps in C order. Tap ``a`` of the window moved by
        the shift ``s`` is :math:`s + a` (:math:`s_i + a_i \le k_i - 1`), whose flat index is the sum of theirs.

        Integer arithmetic on the buffer, on its device (no host list made into a tensor: that would be a
        blocking copy to a GPU at every kernel build; the window's offsets come from ``new_ones(r).cumsum``). The
        buffer enters a sum with a zero made from ``like`` (the window), so that ``torch.fx`` tracing records it as
        a ``get_attr`` node rather than baking its value at tracing time."""
        shift = self._block_shift + like.new_zeros((), dtype=torch.long)
        radices = [math.prod(self.kernel_size[i + 1:]) for i in range(self._dims)]
        first = None  # the flat index of each group's first window tap, (g,)
        for i, w in enumerate(radices):
            if self._kp[i] > 1:  # (a dimension without blocks has the shift 0)
                term = shift.select(1, i) if w == 1 else shift.select(1, i) * w
                first = term if first is None else first + term
        index = shift.new_zeros(self.groups, 1) if first is None else first.unsqueeze(1)
        for r, w in zip(self._r, radices):  # add the window's offsets, dimension by dimension (C order)
            if r > 1:
                step = (shift.new_ones(r).cumsum(0) - 1) * w
                index = (index.unsqueeze(-1) + step).flatten(1)
        return index.unsqueeze(1).expand(self.groups, columns, index.shape[-1])

    def _shift_windows(self, R: torch.Tensor) -> torch.Tensor:
        """The kernel ``(g, M, C, *k)`` with one channel per group (``block_shift`` set): each group's window
        ``R`` ``(g, M, C, *r)`` at its shift, zero elsewhere, by one scatter into a zero kernel: ``R``'s values
        exactly (its backward a gather). It replaced products with a 0/1 selection matrix rebuilt at every build
        (4x the time of the whole build for a 1 -> 64, 7 x 7, stride-4 3-D stem)."""
        g, M, C = self.groups, self._M, self._C
        windows = R.reshape(g, M * C, -1)
        K = windows.new_zeros(g, M * C, math.prod(self.kernel_size))
        return K.scatter(2, self._window_index(R, M * C), windows).reshape(g, M, C, *self.kernel_size)

    def _read_windows(self, K: torch.Tensor) -> torch.Tensor:
        """The adjoint of :meth:`_shift_windows`: each group's window of ``K`` ``(g, M, C, *k)`` at its shift,
        ``(g, M, C, *r)``, exactly (a gather)."""
        g, M, C = self.groups, self._M, self._C
        return K.reshape(g, M * C, -1).gather(2, self._window_index(K, M * C)).reshape(g, M, C, *self._r)

    def _block_start(self, W: torch.Tensor) -> tuple[torch.Tensor, str]:
        """What the blocks act on, ``(g, *r, M, C)``, built from the orthonormal matrix ``W``, and the side they act
        from (:meth:`_apply_blocks`); :meth:`_spatial_last` of the result is the kernel."""
        g, M, C, d = self.groups, self._M, self._C, self._dims
        one_tap = (1,) * d
        if self._embed:      # K[p] = A[p] W: the blocks act on the left of the embedded columns
            return W.reshape(g, *one_tap, M, C), "left"
        if not self._strided:  # K[p] = W A[p]
            return W.reshape(g, *one_tap, M, C), "right"
        # K = R * A: the S-tap reshaped matrix R convolved with the block part
        return W.reshape(g, M, C, *self._r).permute(0, *range(3, 3 + d), 1, 2), "right"

    def _spatial_last(self, X: torch.Tensor) -> torch.Tensor:
        """``(g, *k, a, b) -> (g, a, b, *k)``, a view."""
        d = self._dims
        return X.permute(0, d + 1, d + 2, *range(1, d + 1))

    @property
    def weight(self) -> torch.Tensor:
        r"""The explicit kernel ``(out_channels, in_channels / groups, *kernel_size)``, ``gain`` times orthogonal.

        A differentiable function of the parameters (``proj_a``, ``proj_b``: projector blocks; ``matrix``: the
        orthonormal mixing / reshaped kernel; with one input channel per group, placed at each group's
        ``block_shift``), rebuilt at every access in ``compute_dtype`` and rounded to the
        layer's dtype. With ``method="cayley_fft"`` it is the *effective full-size kernel*
        ``(out_channels, in_channels / groups, *input_size)`` of the Fourier-domain operator, read at the offsets
        of :attr:`pads` (:meth:`to_conv` uses it; the forward pass does not). Writing into it (``nn.init``)
        changes nothing: see "Initialisation" in the module docs.
        """
        if self.method == "cayley_fft":
            q = self._symbol_taps(self._cayley_unit_symbol())
            K = self._cayley_kernel_from_taps(q) * self.gain
            return K.reshape(self.out_channels, self._C, *self.input_size).to(self._param_dtype)
        return self._explicit_kernel()

    @weight.setter
    def weight(self, value) -> None:
        self._refuse_assignment()

    def _explicit_kernel(self, shift: tuple[int, ...] | None = None) -> torch.Tensor:
        """:attr:`weight` of the explicit-kernel methods (``shift``: as for :meth:`_unit_kernel`)."""
        K = _times_gain(self._unit_kernel(shift=shift), self.gain)
        return K.reshape(self.out_channels, self._C, *self.kernel_size).to(self.matrix.dtype)

    # ---------------------------------------------------------------------------------------- forward

    def _pad_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...] | int]:
        pads = self.pads
        if not any(l or r for l, r in pads):
            return x, 0
        if self.padding_mode == "zeros" and all(l == r for l, r in pads):
            return x, tuple(l for l, _ in pads)
        if self.padding_mode == "circular":
            return _circular_pad_valid(x, pads), 0
        return F.pad(x, flat_pads(pads)), 0

    def _check_spatial_size(self, x: torch.Tensor) -> None:
        """Refuse an input whose padded size is below the kernel's extent in some dimension (nn.Conv's
        "Kernel size can't be greater than actual input size", which names neither the layer nor a fix), e.g.
        ``padding="valid"`` on a map smaller than the kernel, or ``"same"`` at stride ``S`` on a map smaller than
        ``S``. Skipped under ``torch.fx`` symbolic tracing (no concrete shape)."""
        if isinstance(x, torch.fx.Proxy):
            return
        sizes = tuple(x.shape[-self._dims:])
        extents = self.effective_kernel_size
        pads = self.pads
        if all(n + l + r >= e for n, (l, r), e in zip(sizes, pads, extents)):
            return
        need = tuple(max(1, e - l - r) for (l, r), e in zip(pads, extents))
        raise LayerArgumentError(
            f"{layer_label(self)}: an input of spatial size {sizes} (input shape {tuple(x.shape)}) is too small: "
            f"padded by {pads} it is smaller than the kernel's extent {extents} (dilation * (kernel_size - 1) + 1). "
            f"Use inputs of spatial size >= {need}, or padding='same' with inputs divisible by the stride "
            f"{self.stride}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = input  # nn.Conv{d}d's parameter name: a model calling self.conv(input=h) keeps working once replaced
        if self.method == "cayley_fft":
            Q = self._cached("symbol", lambda: (self._cayley_unit_symbol() * self.gain).to(
                torch.complex128 if self._param_dtype == torch.float64 else torch.complex64))
            return _fourier_forward(x, Q, self.bias, self.stride, self.input_size, self.in_channels,
                                    layer_label(self), frozen=False, layer_dtype=self._param_dtype)
        _check_input(x, self._dims, self.in_channels, self)
        if not isinstance(x, torch.fx.Proxy):  # the Fourier-domain forward above casts; the conv does not
            check_input_dtype(x, self._param_dtype, self)
        self._check_spatial_size(x)
        x, padding = self._pad_input(x)
        weight = self._cached("weight", lambda: self.weight)
        return _CONV_FN[self._dims](x, weight, self.bias, self.stride, padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        s = _conv_arguments_repr(self)
        s += f", padding_mode={self.padding_mode!r}, method={self.method!r}, case={self.case!r}"
        if self.input_size is not None:
            s += f", input_size={self.input_size}"
        if self.gain != 1.0:
            s += f", gain={self.gain}"
        return s

    # ---------------------------------------------------------------------------------------- tools

    def orthogonality_error(self, input_size) -> float:
        r""":math:`\max_i |\sigma_i / \text{gain} - 1|` of the circular operator on an ``input_size`` grid
        (:func:`orthofx.metrics.orthogonality_error`, exact FFT singular values; a dilated layer through the
        undilated kernel it applies, :func:`orthofx.metrics.dilated_kernel`)."""
        from orthofx.metrics import dilated_kernel, orthogonality_error
        if self.method == "cayley_fft" and \
                _tuple(input_size, self._dims, "input_size", broadcast=False) != self.input_size:
            raise LayerArgumentError(f"{type(self).__name__}(method='cayley_fft') is defined on input_size="
                                     f"{self.input_size} only, got input_size={input_size!r}")
        with torch.no_grad():
            w = dilated_kernel(self.weight / self.gain, self.dilation)
        return orthogonality_error(w, input_size=input_size, stride=self.stride, groups=self.groups)

    @torch.no_grad()
    def to_conv(self) -> nn.Module:
        """A plain ``nn.Conv{d}d`` with the baked kernel (and bias), giving the same outputs.

        With symmetric padding (see :attr:`pads`: every case but ``"same"`` with an even ``k_eff`` at stride 1)
        the result is one ``nn.Conv{d}d(padding=left, padding_mode=self.padding_mode)``; with asymmetric padding
        it is ``nn.Sequential(nn.CircularPad{d}d(...) or nn.ZeroPad{d}d(...), nn.Conv{d}d(padding=0))``. Circular
        pads of 2 or more (which wrap around more than once on maps smaller than the pad, as the layer allows and
        ``nn.Conv{d}d`` does not) give ``nn.Sequential(orthofx.nn.padding.CircularPad(pads), nn.Conv{d}d(padding=0))``.
        The result has no orthogonality constraint: use it for inference and export. ``requires_grad`` follows
        the layer's: the weight's that of the parameters behind the kernel, the bias's that of the bias.

        ``method="cayley_fft"``: the plain conv holds the effective full-size kernel (``input_size`` taps per
        dimension, circular padding of :attr:`pads`), which costs :math:`O(n^d)` multiplications per output and
        input channel and pixel; :meth:`to_plain` (the Fourier-domain form) is much faster beyond tiny inputs.
        """
        d = self._dims
        pads = self.pads
        # nn.Conv's and nn.CircularPad's circular padding refuses pads larger than the map ("wrapping around more
        # than once"), which the layer itself allows (circular_pad): a pad of 2 or more exceeds maps of size 1 or
        # more, so those freeze into orthofx's CircularPad (any pad) + a conv without padding
        wraps = self.padding_mode == "circular" and any(p > 1 for pair in pads for p in pair)
        symmetric = all(l == r for l, r in pads) and not wraps
        ref = self.cayley_kernel if self.method == "cayley_fft" else self.matrix
        size = self.input_size if self.method == "cayley_fft" else self.kernel_size
        conv = skip_init(_TORCH_CONV[d], self.in_channels, self.out_channels, size, stride=self.stride,
                         padding=tuple(l for l, _ in pads) if symmetric else 0, dilation=self.dilation,
                         groups=self.groups, bias=self.bias is not None,
                         padding_mode=self.padding_mode if symmetric else "zeros",
                         device=ref.device, dtype=ref.dtype)  # no draw for the init overwritten below
        conv.weight.copy_(self.weight)
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        conv.train(self.training)
        _frozen_requires_grad(self, conv)  # a frozen layer (requires_grad_(False)) stays frozen
        if symmetric:
            return conv
        if wraps:
            pad = CircularPad(pads)
        else:
            pad = (_CIRCULAR_PAD if self.padding_mode == "circular" else _ZERO_PAD)[d](tuple(flat_pads(pads)))
        return nn.Sequential(pad, conv)

    def to_plain(self) -> nn.Module:
        """The protocol ``orthofx.freeze`` uses: :meth:`to_conv` (a plain conv), or for ``method="cayley_fft"`` a
        :class:`FourierConv` holding the precomputed per-frequency matrices as a buffer (same outputs, the
        Cayley transform's solves are gone; it exports to ``.pt2`` and to ONNX as DFT + MatMul)."""
        if self.method == "cayley_fft":
            return self.to_fourier()
        return self.to_conv()

    @torch.no_grad()
    def to_fourier(self) -> "FourierConv":
        """``method="cayley_fft"`` only: the inference form, a :class:`FourierConv` with the current operator (its
        bias's ``requires_grad`` that of the layer's bias)."""
        if self.method != "cayley_fft":
            raise LayerArgumentError(f"{type(self).__name__}: to_fourier() is for method='cayley_fft'; "
                                     f"method={self.method!r} freezes into a plain conv with to_conv()")
        layer = FourierConv(self.frequency_response(), self.input_size, self.stride,
                            None if self.bias is None else self.bias.detach().clone(), dtype=self._param_dtype)
        layer.train(self.training)
        return _frozen_requires_grad(self, layer)  # the bias only: the symbol is a buffer

    @classmethod
    def from_conv(cls, conv: nn.Module, init: str = "nearest", *, method: str = "auto", padding="same",
                  padding_mode: str = "circular", gain: float = 1.0, fit_steps: int | None = None,
                  compute_dtype=None, input_size=None):
        r"""The orthogonal layer for an existing ``nn.Conv{d}d`` (same channels, kernel, stride, dilation,
        groups, bias, device and dtype).

        ``padding`` / ``padding_mode``: those of the new layer (default circular ``"same"``, the exactly orthogonal
        one); ``padding="keep"`` copies the conv's own ``padding`` and ``padding_mode`` (which must be
        ``'zeros'`` or ``'circular'``).

        ``init="nearest"``: start close to the conv's kernel ``K0`` (divided by ``gain``). Without blocks
        (1x1 kernels, ``k <= S``) the orthonormal matrix is the polar factor of the reshaped kernel, which is the
        nearest orthogonal kernel exactly (an orthogonal ``K0`` is returned unchanged). With blocks (a best effort;
        the set of orthogonal kernels is not convex): the blocks start as complementary pairs (a pure shift to the
        centre), the matrix is then the Procrustes optimum for those blocks (the polar factor of
        :math:`\sum_p K_0[p] A[p]^T`, exact because :math:`\|R \star A\|_F` is constant for orthogonal ``A``). At
        stride 1 with :math:`M > C` (the embedded case) that start puts every output pixel in the ``C``-dimensional
        span of the matrix (whitening downstream then has tied zero eigenvalues), so one sweep of exact
        block-by-block optimisation follows (:meth:`_block_sweeps`; 1 -> 16 channels, 5 x 5, a random conv:
        relative distance 1.00 -> 0.87, all 25 taps used). Then ``fit_steps`` Adam steps on all parameters
        minimise :math:`\|K - K_0\|_F^2`, and a final Procrustes step re-fits the matrix; the best kernel seen is
        kept. They fit ``K_0`` scaled to unit norm by a power of two (the nearest kernel does not depend on its
        scale; Adam's steps did, and stalled at the start for weights of ``1e10`` or ``1e-30``). With one input
        channel per group (a 1-channel or depthwise conv; :meth:`_choose_block_shift`) the blocks are a shift per
        group (``block_shift``) and the start is exact, with no steps: per group the shift whose window is nearest
        with its polar factor, at stride 1 the tap of largest :math:`|K_0|` with its sign, the nearest orthogonal
        kernel of all (a single-channel one is a signed tap). ``init="random"``: random orthogonal, the bias
        copied.

        The relative Frobenius distance :math:`\|K - K_0\|_F / \|K_0\|_F` of the resulting kernel is stored in
        ``layer.init_error`` (for both inits; ``None`` where it is undefined: a zero ``K_0``, or ``K_0`` with NaN or
        inf entries and ``init="random"``). ``init="nearest"`` of a weight with NaN or inf entries raises
        :class:`~orthofx.errors.LayerArgumentError` (no orthogonal kernel is nearest to it). ``requires_grad`` of
        the new parameters follows the conv's weight (the bias follows its bias): a frozen layer stays frozen.

        ``fit_steps``: default (``None``) 200 for the block constructions, 0 for ``cayley_fft``.

        A conv on the meta device (deferred initialisation) has no values to start near: ``init="random"`` gives a
        layer on the meta device (``init_error`` ``None``), to be materialised with ``to_empty()`` +
        ``reset_parameters()`` or ``load_state_dict(..., assign=True)``; ``init="nearest"`` raises
        :class:`MetaWeightError` (a :class:`~orthofx.errors.LayerArgumentError`).

        ``method="cayley_fft"`` (needs ``input_size``): the nearest start is the closed form of
        :meth:`_cayley_fit` (per-frequency polar factor, inverse Cayley transform, least-squares ``k``-tap
        parameter kernel) refined by ``fit_steps`` Adam steps (each one a Cayley transform and its backward); a
        best effort, since a ``k``-tap parameter kernel reaches only part of the orthogonal operators (e.g. 1.10 ->
        0.55 relative distance to an orthogonal 3x3 conv, 8 channels on 8x8, with 0 -> 300 steps);
        ``init_error`` is the relative Frobenius distance of the two circular operators on the ``input_size``
        grid.

        >>> import torch
        >>> conv = torch.nn.Conv2d(8, 16, 2, stride=2)
        >>> layer = OrthogonalConv2d.from_conv(conv)            # k = S: polar factor, the nearest
        >>> layer(torch.randn(1, 8, 8, 8)).shape
        torch.Size([1, 16, 4, 4])
        >>> 0 < layer.init_error < 1
        True
        """
        _check_conversion(cls, "from_conv", conv, _TORCH_CONV[cls._dims], init)
        if fit_steps is None:  # Adam steps cost ~10 ms for bcop, a batched solve per frequency for cayley_fft
            fit_steps = 0 if method == "cayley_fft" else 200
        fit_steps = _int(fit_steps, "fit_steps", minimum=0)
        if padding == "keep":
            if conv.padding_mode not in _PADDING_MODES:
                raise LayerArgumentError(
                    f"padding='keep': the conv's padding_mode={conv.padding_mode!r} is not supported; orthogonal "
                    f"layers take 'circular' (exact) or 'zeros'. Pass padding='same' instead")
            # the layer's "same" pads every dimension; such a conv pads one, and another output size came out
            problem = one_element_same_dilation(conv)
            if problem is not None:
                raise LayerArgumentError(f"{cls.__name__}.from_conv: the {layer_label(conv)} cannot keep its padding "
                                         f"(padding='keep'): {problem}. Or pass padding='same' (the circular layer)")
            padding, padding_mode = conv.padding, conv.padding_mode
        w0 = conv.weight.detach()
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=padding,
                    dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                    padding_mode=padding_mode, method=method, device=w0.device, dtype=w0.dtype, gain=gain,
                    compute_dtype=compute_dtype, input_size=input_size)
        with torch.no_grad():
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        if w0.is_meta:
            return _deferred(conv, layer)
        # cayley_fft's operator is free of any window alignment; its nearest start reads the conv's taps where
        # the conv reads them (else a k = S patch conv's target would be shifted by a pixel and out of reach)
        alignment = circular_alignment(conv) if layer.method == "cayley_fft" else "same"
        lefts = None if alignment == "same" else alignment    # None: _conv_taps' "same" offsets
        # the start is computed in the dtypes given: autocast (compute_dtype float32) ran the Procrustes and block
        # sweep products in bfloat16, so the 'exact' optima were those of a rounded problem
        with autocast_off(w0):
            shift = layer._fit(w0, fit_steps, lefts) if init == "nearest" else None
        layer.train(False)  # init_error's kernel fills the eval cache, kept by _adopt_mode
        layer.init_error = layer._relative_error(w0, lefts, shift)
        layer._adopt_mode(conv.training)
        _mirror_requires_grad(conv, layer)
        return layer

    @torch.no_grad()
    def _relative_error(self, target: torch.Tensor, lefts: Sequence[int] | None = None,
                        shift: tuple[int, ...] | None = None) -> float:
        """``||K - K_0|| / ||K_0||`` of the layer's kernel (filling the eval cache); ``shift``: from :meth:`_fit`."""
        if self.method == "cayley_fft":  # distance of the operators (circular kernels on the input grid)
            g, M, C = self.groups, self._M, self._C
            q0 = self._conv_taps(target.to(torch.float64).reshape(g, M, C, *target.shape[2:]), lefts)
            q = self._symbol_taps(self._cayley_unit_symbol(torch.float64)) * self.gain
            return relative_distance(q, q0)
        return relative_distance(self._cached("weight", lambda: self._explicit_kernel(shift)), target)

    def _paired_shift(self) -> tuple[int, ...] | None:
        """The per-dimension shift that the block part is when consecutive blocks are complementary (right after
        :meth:`_pair_blocks`): each pair ``[P, I - P]`` then ``[I - P, P]`` multiplies to a shift by one tap.
        ``None`` where a dimension has an unpaired last block with ``n > 1`` (not a shift). With ``n = 1`` every
        listed block is a delay (rank-0 projectors; the rank-1 identities are left out), so the shift is the
        class-a count: the default ``block_shift`` of every group (the nearest start sets one per group instead)."""
        shifts = []
        for dim_blocks in self._block_index:
            if self._n == 1:
                shifts.append(sum(cls == "a" for cls, _ in dim_blocks))
            elif len(dim_blocks) % 2:
                return None
            else:
                shifts.append(len(dim_blocks) // 2)
        return tuple(shifts)

    @torch.no_grad()
    def _procrustes(self, target: torch.Tensor, shift: tuple[int, ...] | None = None) -> None:
        """Set ``matrix`` to the optimum for the current blocks (target: ``(g, M, C, *k)`` in compute dtype).

        ``shift``: the blocks are known to form a pure shift by these taps (:meth:`_paired_shift`), so ``A[p]`` is
        the identity at ``p = shift`` and zero elsewhere and every form below reduces to reading the target's
        window at the shift: no block product (the nearest start of a layer built from a conv, ``fit_steps=0``,
        spent half its time forming that identity)."""
        cd = self.compute_dtype
        d = self._dims
        if shift is not None:
            window = (Ellipsis,) + tuple(slice(c, c + r) for c, r in zip(shift, self._r))
            # copy_ rounds as .to() does, in one pass (the polar factor of a wide matrix is a transposed view)
            self.matrix.copy_(project_to_stiefel(target[window].reshape(self.matrix.shape)))
            return
        if self._block_shift is not None:  # n == 1: each group's window at its own shift (the same reading)
            self.matrix.copy_(project_to_stiefel(self._read_windows(target).reshape(self.matrix.shape)))
            return
        # the kernel is linear in the matrix, K = L(W), and L preserves norms: the optimum is the polar factor of
        # L*(target), the adjoint (the correlation with the block part) applied block by block
        K = _in_safe_range(target).permute(0, *range(3, 3 + d), 1, 2)  # (g, *k, M, C)
        side = "left" if self._embed else "right"
        G = self._apply_blocks(K, cd, side, adjoint=True)  # (g, *r, M, C), r = 1 at stride 1
        G = self._spatial_last(G).reshape(self.matrix.shape)
        self.matrix.copy_(project_to_stiefel(G))

    def _fit(self, target: torch.Tensor, steps: int, lefts: Sequence[int] | None = None
             ) -> tuple[int, ...] | None:
        """The nearest start (:meth:`from_conv`); returns the shift the blocks are left at when they are a pure
        shift (:meth:`_paired_shift`), else None."""
        cd = self.compute_dtype
        g, M, C = self.groups, self._M, self._C
        if self.method == "cayley_fft":
            self._cayley_fit((target.detach().to(cd) / self.gain).reshape(g, M, C, *target.shape[2:]), steps,
                             lefts)
            return None
        t = target.detach().to(cd)
        t = (t if self.gain == 1.0 else t / self.gain).reshape(g, M, C, *self.kernel_size)  # x / 1 is x: no copy
        if self._block_shift is not None:
            # n == 1: the blocks are a discrete shift per group, the matrix the Procrustes optimum for it: the best
            # pair over all shifts is the nearest kernel the layer holds, exactly (no gradient moves a shift)
            self._choose_block_shift(t)
            self._procrustes(t)
            return None
        has_blocks = self.proj_a is not None or self.proj_b is not None
        if has_blocks:
            self._reset_blocks_centre()
        shift = self._paired_shift() if has_blocks else None
        self._procrustes(t, shift)
        if has_blocks and self._embed:
            # a shift times the M x C embedding: every output pixel in a C-dimensional subspace of the M channels,
            # whose covariance (whitening, a decomposition downstream) then has tied zero eigenvalues; one sweep
            # spreads the kernel over its taps, as the conv's own. (A strided column-orthogonal layer's pixels lie
            # in the C S^d-dimensional span of R for every choice of blocks: no sweep helps its rank.)
            self._block_sweeps(t)
            shift = None
        if not has_blocks or steps == 0:
            return shift
        params = [p for p in (self.proj_a, self.proj_b, self.matrix) if p is not None]
        # the optimum does not depend on the target's scale, Adam's steps do: its eps swamped the gradients of
        # ||K - t||^2 / ||t||^2 (about 1 / ||t||) for weights of 1e10, and their squares overflowed its float32
        # state for weights of 1e-30 (cosine to t 0.26 there, 0.58 at ordinary scales); fitted to t scaled to
        # unit norm by a power of two, the steps are those of every scale
        unit = _unit_norm(t)
        norm = float(torch.linalg.vector_norm(unit)) ** 2 or 1.0

        def loss_fn():
            return (self._unit_kernel(cd) - unit).square().sum() / norm

        with torch.no_grad():
            best = float(loss_fn())
        _fit_best(params, loss_fn, best, steps, lr=self._fit_lr / math.sqrt(max(self._n, 2)))
        self._procrustes(t)
        return None

    @torch.no_grad()
    def _choose_block_shift(self, target: torch.Tensor) -> None:
        r"""Set ``block_shift`` (one channel per group, ``n = 1``) to the shift of the window nearest to ``target``
        ``(g, M, 1, *k)``, per group.

        The kernel is the orthonormal ``M x r^d`` matrix ``W`` on the window at the shift ``s``, so
        :math:`\|K - K_0\|^2 = \|W\|^2 + \|K_0\|^2 - 2 \langle W, K_0[s] \rangle` and the best ``W`` for ``s``
        (the polar factor of the window :math:`K_0[s]`) leaves :math:`-2 \|K_0[s]\|_*`, the nuclear norm (the
        vector norm where ``M = 1`` or ``r^d = 1``). All :math:`\prod_i k'_i` shifts are compared (49 for a 7 x 7
        depthwise conv, in one batched call), and the largest wins: at stride 1 the tap of largest :math:`|K_0|`,
        with its sign the polar factor's. A circular single-channel orthogonal convolution is a signed tap (its
        symbol is unimodular on the circle, a finite one a monomial), so that start is the nearest orthogonal
        kernel of all. Ties keep the centre (the default shift), then the first shift in C order. Each group is
        scaled by a power of two first (its largest entry in [1/2, 1)), so that the squares neither overflow nor
        underflow."""
        g, M = self.groups, self._M
        scaled = _unit_scaled(target.reshape(g, M, -1)).reshape(target.shape)
        shifts = list(itertools.product(*(range(kp) for kp in self._kp)))
        windows = torch.stack([scaled[(Ellipsis,) + tuple(slice(c, c + r) for c, r in zip(shift, self._r))]
                               .reshape(g, M, -1) for shift in shifts])      # (shifts, g, M, r^d)
        if min(windows.shape[-2:]) == 1:
            value = torch.linalg.vector_norm(windows, dim=(-2, -1))
        else:
            value = torch.linalg.svdvals(windows).sum(-1)
        centre = shifts.index(tuple(kp // 2 for kp in self._kp))
        best = torch.where(value[centre] >= value.amax(0), centre, value.argmax(0))   # argmax: the first largest
        self._block_shift.copy_(torch.tensor(shifts, dtype=torch.long, device=best.device)[best])

    @torch.no_grad()
    def _block_sweeps(self, target: torch.Tensor, sweeps: int = 1) -> None:
        r"""Block-coordinate ascent of :math:`\langle K, K_0 \rangle` (``target`` :math:`K_0`: ``(g, M, C, *k)`` in
        compute dtype), which minimises :math:`\|K - K_0\|_F` since every orthogonal kernel has the same norm.

        The kernel is a chain of linear steps, :math:`K = f_N(\cdots f_1(X_0))` (:meth:`_block_start`, then the
        blocks in :meth:`_block_order`), and step ``j`` is linear in its block's projector :math:`P`:
        :math:`f_j(X) = D_0(XP) + D_1(X - XP)` (``PX`` on the left; :math:`D_0`, :math:`D_1`: the tap not delayed,
        delayed). With :math:`X_{j-1} = f_{j-1}(\cdots f_1(X_0))` (forward) and
        :math:`Z_j = f_{j+1}^* \cdots f_N^*(K_0)` (the target pulled back, adjoint), :math:`\langle K, K_0 \rangle
        = \langle f_j(X_{j-1}), Z_j \rangle = c + \operatorname{tr}(P^T G)` with
        :math:`G = X_{j-1}^T (D_0^* - D_1^*) Z_j` (rows over taps; :math:`((D_0^* - D_1^*) Z_j) X_{j-1}^T` on the
        left), so the best projector of the block's rank ``r`` spans the top ``r`` eigenvectors of :math:`G + G^T`.
        Blocks are updated one after the other (dimension 1 first, its first block first), each sweep ends with the
        Procrustes step for the matrix: every update is an exact optimum, so the distance never grows (but for a
        nudge of ``1e-6`` relative towards the current projector that makes a tie at the rank cut choose the same
        subspace on every BLAS).

        Cost: the states :math:`X_j` and :math:`Z_j` are kept, and an update of block ``j`` outdates only
        :math:`X_{j'}` for :math:`j' \ge j` and :math:`Z_{j'}` for :math:`j' < j`, recomputed when next needed.
        Within a dimension the updates run along the chain (``side="left"``, the embedded start) or against it, so
        each needs one step; a new dimension rebuilds the states across the other dimensions once. A sweep is thus
        :math:`O(d N)` block steps, against the :math:`O(N^2)` of a gradient through the whole kernel per block
        (64 -> 256 channels, 7 x 7: 1.0 s -> 0.25 s; ``benchmarks/RESULTS.md``). The pulled-back target does not
        depend on the matrix, so later sweeps reuse it.

        A target with entries past :math:`2^{64}` (or all below :math:`2^{-64}`) is scaled first
        (:func:`_in_safe_range`): with ``compute_dtype=float32`` entries of ``1e38`` overflowed the products and
        ``eigh`` failed. Needs no autograd, so it runs under ``torch.inference_mode()`` as it does outside.

        >>> import torch
        >>> layer = OrthogonalConv1d(2, 6, 3, bias=False, dtype=torch.float64)
        >>> target = torch.randn(1, 6, 2, 3, dtype=torch.float64)
        >>> before = float((layer.weight.detach() - target[0]).norm())
        >>> layer._block_sweeps(target)
        >>> float((layer.weight.detach() - target[0]).norm()) <= before
        True
        """
        cd = self.compute_dtype
        d = self._dims
        target = _in_safe_range(target)  # the optimum does not change under a positive scaling
        raw = {"a": self.proj_a, "b": self.proj_b}
        X0, side = self._block_start(orthonormal(self.matrix.to(cd), tall=self._matrix_tall))
        chain = self._block_order(side)
        position = {block: j for j, (_, block) in enumerate(chain, 1)}
        # rank-0 blocks are delays: nothing to choose
        blocks = [block for dim_blocks in self._block_index for block in dim_blocks if raw[block[0]] is not None]

        def projector(block: tuple[str, int]) -> torch.Tensor:
            """The block's projector from its parameter as it stands (as the kernel build reads it)."""
            cls, idx = block
            Q = _projector_basis(raw[cls][:, idx].to(cd))
            return Q @ Q.mT

        projectors = {block: projector(block) for block in blocks}

        def step(j: int, X: torch.Tensor, adjoint: bool) -> torch.Tensor:
            dim, block = chain[j - 1]
            return self._block_step(X, dim, side, adjoint, P=projectors.get(block),
                                    single=not adjoint and X.shape[1 + dim] == 1)

        # Z_N: the target as (g, *taps, M, C), less the identity blocks' zero taps (the adjoint of appending them)
        Z = target.to(cd).permute(0, *range(3, 3 + d), 1, 2)
        for dim, extra in enumerate(self._identity_taps):
            if extra:
                Z = Z.narrow(1 + dim, 0, Z.shape[1 + dim] - extra)
        N = len(chain)
        forward: list[torch.Tensor | None] = [X0] + [None] * N
        pulled: list[torch.Tensor | None] = [None] * N + [Z]
        current_forward, current_pulled = 0, N  # forward[:current_forward + 1], pulled[current_pulled:] hold
        for sweep in range(sweeps):
            if sweep:  # the Procrustes step changed the matrix: every forward state but none pulled back
                forward[0] = self._block_start(orthonormal(self.matrix.to(cd), tall=self._matrix_tall))[0]
                current_forward = 0
            for block in blocks:
                j = position[block]
                dim = chain[j - 1][0]
                for i in range(current_forward + 1, j):
                    forward[i] = step(i, forward[i - 1], adjoint=False)
                for i in range(current_pulled, j, -1):
                    pulled[i - 1] = step(i, pulled[i], adjoint=True)
                current_forward, current_pulled = max(current_forward, j - 1), min(current_pulled, j)
                X, Zj = forward[j - 1], pulled[j]
                axis, size = 1 + dim, X.shape[1 + dim]
                V = Zj.narrow(axis, 0, size) - Zj.narrow(axis, 1, size)  # (D_0^* - D_1^*) Z_j, shaped as X
                if side == "right":
                    n = self._n
                    G = X.reshape(self.groups, -1, n).mT @ V.reshape(self.groups, -1, n)
                else:
                    G = V.movedim(-2, 1).flatten(2) @ X.movedim(-2, 1).flatten(2).mT
                S = G + G.mT
                P = projectors[block]
                # eigenvalues tied at the rank cut (S has rank <= 2 C k^d: a null space when C is small) leave the
                # optimum's subspace to LAPACK's rounding, so a thread count moved the kernel by 0.08; a nudge of
                # 1e-6 of S's scale towards the current projector picks the optimum nearest to it
                S = S + (1e-6 * S.abs().amax((-2, -1), keepdim=True)) * P
                cls, idx = block
                top = torch.linalg.eigh(S)[1][..., -raw[cls].shape[-1]:]
                raw[cls][:, idx] = top.to(raw[cls])
                projectors[block] = projector(block)  # from the written (rounded) parameter, as read later
                current_forward, current_pulled = j - 1, j  # forward[j] and pulled[j - 1] read the old block
            self._procrustes(target)

    @torch.no_grad()
    def _reset_blocks_centre(self) -> None:
        for p in (self.proj_a, self.proj_b):
            if p is not None:
                p.normal_()
        self._pair_blocks()


class OrthogonalConv2d(_OrthogonalConvNd):
    r"""A 2-D convolution that is exactly orthogonal (times ``gain``) for circular padding.

    Signature of ``torch.nn.Conv2d``, positions included (``padding="same"`` and ``padding_mode="circular"`` by
    default), plus the keywords ``method``, ``gain`` (the kernel is ``gain`` times orthogonal), ``compute_dtype``
    (float64 by default, see the module docs) and ``input_size``. For the ``(C, M, k, S)`` per group that P0
    Theorem 4 admits, the operator on any input grid divisible by the stride is row orthogonal (:math:`M \le C S^2`,
    :math:`\mathcal{K}\mathcal{K}^T = \text{gain}^2 I`) or column orthogonal (:math:`\mathcal{K}^T\mathcal{K} =
    \text{gain}^2 I`), to float rounding (:math:`\max|\sigma - 1| \le 10^{-5}` in float32). Other
    configurations raise :class:`~orthofx.errors.ImpossibleLayerError` quoting the condition, e.g. the ResNet
    strided shortcut ``(M, C, k, S) = (2C, C, 1, 2)``.

    Kernel: :math:`K = R \star A` (module docs): ``A``, a square stride-1 orthogonal kernel of size
    :math:`k - S + 1` made of 2-tap blocks :math:`[P, I - P]` (:math:`P = QQ^T` orthogonal projectors), then
    ``R``, the ``S x S`` (or ``k x k`` when ``k < S``) reshaped kernel with orthonormal rows (RO) or columns (CO).
    At stride 1 with ``M > C`` the input is embedded first (:math:`A \circ E`). ``method``:

    * ``"bcop"``: the block construction above, for every admissible configuration;
    * ``"rko"``: reshaped kernel only, exact when ``k <= S`` in every dimension (including 1x1 kernels);
    * ``"auto"`` (default): ``"rko"`` when no blocks are needed, else ``"bcop"``;
    * ``"cayley_fft"``: the Cayley transform of a skew-Hermitian :math:`A(f) = \hat V(f) - \hat V(f)^H` per
      spatial frequency (module docs, item 6) for ONE input size, the keyword ``input_size=(H, W)`` (required;
      another size at forward raises :class:`~orthofx.errors.LayerArgumentError`). Circular ``"same"`` padding
      only, no dilation; any stride dividing the input size (space-to-depth), ``M < C S^2`` or ``M > C S^2``,
      groups. Its effective kernel is ``H x W``, so it exists even where Theorem 4 admits no ``k x k`` kernel.
      Parameter ``cayley_kernel`` (``groups x N x N x ceil(k/S) x ceil(k/S)``, :math:`N = \max(M, C S^2)`);
      :attr:`weight` is the effective ``H x W`` kernel; :meth:`to_plain` gives a :class:`FourierConv` (the
      per-frequency matrices as a buffer: identical outputs, exports to ``.pt2`` and ONNX), :meth:`to_conv` a
      plain ``H x W`` circular conv (exact but :math:`O(HW)` per output pixel). Cheaper to train than
      ``"bcop"`` on a GPU for ``max(M, C S^2) <= 64``, much slower on CPUs and for wide layers on large grids
      (module docs, item 6); ``"auto"`` never picks it.

    Parameters: ``proj_a``, ``proj_b`` (unconstrained ``n x r`` matrices whose column spaces give the
    projectors; ``None`` where no block has one: rank 0, or one channel per group) and ``matrix`` (unconstrained,
    made orthonormal by QR). With one input channel per group and blocks (a 1-channel or depthwise conv with
    ``k > 1``) the blocks are a shift per group, held in the ``long`` buffer ``block_shift`` ``(groups, d)`` (in the
    state_dict; not trained). :attr:`weight` rebuilds the explicit
    kernel (differentiable) at every forward with gradients or in training mode; an eval-mode forward without
    gradients reuses the kernel it built (see ``_EvalCache``: writes through ``param.data`` are not seen, call
    ``.eval()`` again after them).

    Padding: ``"same"`` pads ``(k_eff - 1) // 2`` on both sides (``k_eff = dilation*(k-1)+1``; PyTorch's
    asymmetric ``'same'`` split for an even ``k_eff`` at stride 1, see :attr:`pads`), so the output grid is
    exactly ``input / stride`` on inputs divisible by the stride; ``"valid"`` or an int as in ``nn.Conv2d``.
    ``padding_mode="circular"`` makes the layer exactly orthogonal; ``padding_mode="zeros"`` is accepted but
    then the layer is orthogonal only away from the borders (P0 Proposition 6: with zero padding no kernel with
    more than its centre tap is orthogonal).
    Dilation: at stride 1 any; in a strided dimension wherever Theorem 4 with dilation admits one (module docs,
    item 5: the kernel is built for stride ``S / gcd(D, S)``); elsewhere :class:`~orthofx.errors.ImpossibleLayerError`.

    ``to_conv()`` bakes the kernel into a plain ``nn.Conv2d`` (or ``nn.Sequential(pad, conv)`` when the padding is
    asymmetric); ``from_conv(conv, init="nearest")`` starts from an existing conv (``layer.init_error`` says how
    close).

    >>> import torch
    >>> from orthofx.metrics import conv_singular_values
    >>> layer = OrthogonalConv2d(16, 32, 3, stride=2)          # RO: 32 <= 16 * 2**2
    >>> y = layer(torch.randn(2, 16, 8, 8)); y.shape
    torch.Size([2, 32, 4, 4])
    >>> sv = conv_singular_values(layer.weight, 8, stride=2)
    >>> float((sv - 1).abs().max()) < 1e-5
    True
    >>> y.square().sum().backward(); layer.proj_a.grad.abs().sum() > 0
    tensor(True)
    >>> frozen = layer.to_conv()                               # plain layers for inference
    >>> x = torch.randn(1, 16, 8, 8); bool(torch.allclose(frozen(x), layer(x), atol=1e-6))
    True
    >>> fixed = OrthogonalConv2d(16, 32, 1, stride=2, method="cayley_fft", input_size=(8, 8))  # no k x k kernel
    >>> float((conv_singular_values(fixed.weight, 8, stride=2) - 1).abs().max()) < 1e-5      # weight: 8 x 8
    True
    """

    _dims = 2


class OrthogonalConv1d(_OrthogonalConvNd):
    r"""A 1-D convolution that is exactly orthogonal (times ``gain``) for circular padding.

    Same construction, arguments and guarantees as :class:`OrthogonalConv2d` with ``d = 1``: RO when
    :math:`M \le C S` (exists iff :math:`M \le C k`), CO otherwise (exists iff :math:`S \le k`).

    >>> import torch
    >>> from orthofx.metrics import conv_singular_values
    >>> layer = OrthogonalConv1d(4, 8, 4)                      # CO at stride 1, even kernel
    >>> layer(torch.randn(3, 4, 10)).shape
    torch.Size([3, 8, 10])
    >>> float((conv_singular_values(layer.weight, 10) - 1).abs().max()) < 1e-5
    True
    >>> OrthogonalConv1d(4, 9, 1, stride=2)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    orthofx.errors.ImpossibleLayerError: ... column-orthogonal case (M=9 > C*S^d=8): exists iff S <= k, here 2 > 1...
    """

    _dims = 1


class OrthogonalConv3d(_OrthogonalConvNd):
    r"""A 3-D convolution that is exactly orthogonal (times ``gain``) for circular padding (videos, volumes).

    Same construction, arguments and guarantees as :class:`OrthogonalConv2d` with ``d = 3`` (every item of the
    module docs is written for any number of spatial dimensions; ``method="cayley_fft"`` too, with
    ``input_size=(D, H, W)``): RO when :math:`M \le C S^3` (exists iff :math:`M \le C \prod_i \min(k_i, S_i)`), CO
    otherwise (exists iff :math:`S_i \le k_i` in every dimension). Freezes into ``nn.Conv3d(padding_mode=
    "circular")``.

    >>> import torch
    >>> from orthofx.metrics import conv_singular_values
    >>> layer = OrthogonalConv3d(4, 8, 3, stride=(1, 2, 2))       # RO: 8 <= 4 * 4
    >>> layer(torch.randn(2, 4, 6, 8, 8)).shape
    torch.Size([2, 8, 6, 4, 4])
    >>> float((conv_singular_values(layer.weight, (6, 8, 8), stride=(1, 2, 2)) - 1).abs().max()) < 1e-5
    True
    """

    _dims = 3


# ------------------------------------------------------------------------------------------ transposed convolutions


def _conv_arguments_repr(layer: nn.Module, output_padding: tuple[int, ...] | None = None) -> str:
    """The torch conv arguments of an orthogonal (transposed) conv for ``extra_repr``, those at their defaults
    left out, as ``nn.Conv`` prints them."""
    s = (f"{layer.in_channels}, {layer.out_channels}, kernel_size={layer.kernel_size}, stride={layer.stride}, "
         f"padding={layer.padding!r}")
    if output_padding is not None and any(output_padding):
        s += f", output_padding={output_padding}"
    if any(dl != 1 for dl in layer.dilation):
        s += f", dilation={layer.dilation}"
    if layer.groups != 1:
        s += f", groups={layer.groups}"
    if layer.bias is None:
        s += ", bias=False"
    return s


def transposed_keeps_output_size(padding, output_padding, kernel_size, stride, dilation) -> bool:
    r"""Whether a transposed convolution with these ints (per dimension) maps every input size ``n`` to ``n S``
    *and* its padding ``p``, read as a convolution's, keeps that adjoint convolution's size ``n S -> n``:
    :math:`2p = D(k - 1) + 1 - S + o` with :math:`0 \le o < S` (``o``: output_padding). Such a layer is the
    adjoint of the zero-padded conv ``(p, S)``, whose circular version the orthogonal transposed layer's adjoint
    conv is (same window offsets)."""
    padding, output_padding, stride, dilation = sizes_per_dimension(
        kernel_size, padding=padding, output_padding=output_padding, stride=stride, dilation=dilation)
    return all(0 <= o < s and 2 * p == dl * (k - 1) + 1 - s + o
               for p, o, k, s, dl in zip(padding, output_padding, kernel_size, stride, dilation))


def transposed_size_keeping_padding(kernel_size, stride, dilation):
    r"""The ``(padding, output_padding)`` (tuples, per dimension) with which a transposed convolution of these
    ``kernel_size``, ``stride`` and ``dilation`` (tuples) keeps the output size ``input * stride`` as
    :func:`transposed_keeps_output_size` asks, or ``None`` when some dimension has none.

    Output size :math:`(n - 1)S - 2p + D(k - 1) + o + 1 = nS` means :math:`2p = e + o` with
    :math:`e = D(k - 1) + 1 - S`; with :math:`p \ge 0` and :math:`0 \le o < S` the smallest is
    :math:`p = 0, o = -e` for :math:`e < 0` (then :math:`o \le S - 1`), else :math:`o = e \bmod 2`,
    :math:`p = (e + o) / 2`. None exists where that ``o`` is not below ``S``: stride 1 with :math:`D(k - 1)` odd
    (e.g. an even kernel, undilated). ``o < max(S, D)``, torch's own bound, would admit ``o = 1`` there for an odd
    ``D > 1``, but the padding read as a convolution's would then give that adjoint conv ``n + 1`` outputs, not
    ``n`` (:func:`transposed_keeps_output_size`)."""
    stride, dilation = sizes_per_dimension(kernel_size, stride=stride, dilation=dilation)
    kernel_size = tuple(kernel_size)
    paddings, output_paddings = [], []
    for k, s, dl in zip(kernel_size, stride, dilation):
        excess = dl * (k - 1) + 1 - s
        o = -excess if excess < 0 else excess % 2
        if o >= s:
            return None
        paddings.append((excess + o) // 2)
        output_paddings.append(o)
    return tuple(paddings), tuple(output_paddings)


def transposed_alignment(module: nn.Module):
    """``(padding, output_padding)`` of the orthogonal layer replacing the ``nn.ConvTranspose{d}d`` ``module``
    (the ``orthogonal_conv`` pass): the module's own where they give the output size ``input * stride``
    (:func:`transposed_keeps_output_size`: the replacement then writes every tap where the module wrote it, the
    overflow past the borders wrapped around), else ``("same", 0)``."""
    padding, output_padding = tuple(module.padding), tuple(module.output_padding)
    if transposed_keeps_output_size(padding, output_padding, module.kernel_size, module.stride, module.dilation):
        return padding, output_padding
    return "same", 0


_CONV_TRANSPOSE_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_TORCH_CONV_TRANSPOSE = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}

# symbolic tracing records the fold as one node (its sizes need concrete shapes); the transposed layers' forward
# calls _circular_fold_valid, their pads being Python ints >= 0 by construction (as _circular_pad_valid above)
torch.fx.wrap("_circular_fold_valid")


def _check_transposed_output_size(x: torch.Tensor, output_size, stride: tuple[int, ...], label: str) -> None:
    """Refuse an ``output_size`` (read as ``nn.ConvTranspose{d}d`` reads it: the last ``d`` entries of a whole
    shape) other than ``input * stride``, the only size an exactly orthogonal transposed conv and its frozen form
    have (torch would pick an ``output_padding`` for it). U-Nets pass ``output_size=skip.shape`` to ConvTranspose
    layers, which the ``orthogonal_conv`` pass replaces by these. Skipped for symbolic (``torch.fx.Proxy``) sizes."""
    d = len(stride)
    if isinstance(x, torch.fx.Proxy) or isinstance(output_size, torch.fx.Proxy):
        return
    sizes = list(output_size)
    if any(isinstance(v, torch.fx.Proxy) for v in sizes):
        return
    non_spatial = x.dim() - d
    if len(sizes) == non_spatial + d:
        sizes = sizes[non_spatial:]
    expected = tuple(n * s for n, s in zip(x.shape[-d:], stride))
    if len(sizes) != d or tuple(int(v) for v in sizes) != expected:
        raise LayerArgumentError(
            f"{label}: output_size={output_size!r} for an input of shape {tuple(x.shape)}, but this exactly "
            f"orthogonal transposed convolution always gives the output size input * stride = {expected} "
            f"(output_size must have {d} or {non_spatial + d} entries and give that size). Pass inputs whose size "
            f"times the stride is the wanted size, or crop / pad the output afterwards")


class _FrozenConvTranspose(nn.Sequential):
    """The frozen form of an orthogonal transposed conv (:meth:`_OrthogonalConvTransposeNd.to_conv`):
    ``nn.Sequential(nn.ConvTranspose{d}d, CircularFold)`` whose forward also takes ``nn.ConvTranspose``'s
    ``output_size`` (checked to be ``input * stride``), so a model calling ``up(x, output_size=...)`` freezes."""

    def forward(self, input: torch.Tensor, output_size: Sequence[int] | None = None) -> torch.Tensor:
        x = input  # nn.ConvTranspose{d}d's signature: up(input=h, output_size=...) keeps working once frozen
        if output_size is not None:
            stride = tuple(self[0].stride)
            label = layer_label(self).replace(type(self).__name__, f"frozen OrthogonalConvTranspose{len(stride)}d", 1)
            _check_transposed_output_size(x, output_size, stride, label)
        y = self[0](x)
        return _in_conv_dtype(self[1](y), y)


def _in_conv_dtype(out: torch.Tensor, conv_out: torch.Tensor) -> torch.Tensor:
    """``out`` (the folded output plus the bias) in the dtype of ``conv_out`` (the transposed conv's output).

    Under ``torch.autocast`` the conv runs in autocast's half precision, but the bias is added after the fold,
    outside the conv autocast casts, and a float32 bias would promote the output back to float32, where
    ``nn.ConvTranspose{d}d`` (bias inside the conv) and :class:`OrthogonalConv2d` return autocast's dtype. The sum is
    rounded once, from float32. Outside autocast the dtypes agree and nothing happens; a symbolic
    (``torch.fx.Proxy``) value gets the cast recorded, so that a traced graph run under autocast does the same.

    >>> conv_out = torch.ones(1, 2, 4, dtype=torch.bfloat16)
    >>> _in_conv_dtype(conv_out + torch.tensor([0.5, 1.0]).reshape(-1, 1), conv_out).dtype
    torch.bfloat16
    """
    if isinstance(out, torch.fx.Proxy) or out.dtype != conv_out.dtype:
        return out.to(conv_out.dtype)
    return out


def _adjoint_conv(layer: nn.Module, build):
    """``build()``, the adjoint conv of the transposed ``layer``, with its argument errors naming ``layer``: they
    concern arguments (method, gain, compute_dtype, ...) that the user gave the transposed layer, not a conv."""
    try:
        return build()
    except LayerArgumentError as error:
        conv = _ORTHOGONAL_CONV[layer._dims].__name__
        message = str(error)
        message = message[len(conv) + 2:] if message.startswith(f"{conv}: ") else message
        raise type(error)(f"{type(layer).__name__} (in its adjoint {conv}): {message}") from error


class _OrthogonalConvTransposeNd(_ComputedWeight, nn.Module):
    r"""Shared implementation of :class:`OrthogonalConvTranspose1d` / ``2d`` / ``3d``.

    The layer (``in_channels -> out_channels``, stride ``S``, grid ``n -> n S``) is the adjoint of the circular
    convolution :attr:`conv` (an :class:`OrthogonalConv{d}d` from ``out_channels`` to ``in_channels`` with the
    same kernel size, stride, dilation, groups and method, no bias; its parameters are this layer's). That conv
    pads ``(l, r)`` circularly and applies the kernel ``K`` at stride ``S``:
    :math:`(Ay)[i] = \sum_p K[p]\, y[(S i + D p - l) \bmod nS]`. Its adjoint is
    :math:`(A^T x)[j] = \sum_{S i + D p \equiv j + l} K[p]^T x[i]`: ``F.conv_transpose{d}d`` with the same kernel
    tensor (the ConvTranspose layout ``(in, out / groups, *k)`` is the conv's ``(out, in / groups, *k)``), stride,
    dilation and groups, padding 0, which writes ``(n - 1) S + D(k - 1) + 1`` entries (``output_padding`` adds
    the zeros up to ``nS + l + r``), then :func:`orthofx.nn.padding.circular_fold` with ``(l, r)``, the adjoint of
    the circular padding, which adds the overflow back modulo ``nS``; then the bias. A row-orthogonal conv
    (:math:`AA^T = I`) gives a column-orthogonal layer and vice versa (:attr:`case`), so the layer is exactly
    orthogonal (times ``gain``) wherever P0 Theorem 4 admits the conv ``(out -> in, k, S)``, and raises
    :class:`~orthofx.errors.ImpossibleLayerError` elsewhere.

    Alignment: output ``j`` receives the taps with :math:`S i + D p = j + l`, as in ``nn.ConvTranspose{d}d`` with
    ``padding = l``. ``padding="same"`` (default) is the adjoint of the conv's ``"same"``:
    :math:`l = (D(k-1)+1 - 1) // 2`, which is ``nn.ConvTranspose``'s own padding for the usual decoder layers
    (``k = 4, S = 2, p = 1``; ``k = 2, S = 2, p = 0``; ``k = 3, S = 1, p = 1``; ``k = 3, S = 2, p = 1,
    output_padding = 1``), so a nearest start reads and writes like the layer it replaces, up to the wrap-around
    at the borders. Integer ``padding`` / ``output_padding`` are allowed where they give the output size
    ``input * stride`` (:func:`transposed_keeps_output_size`: ``2 p = D(k-1) + 1 - S + o``, ``0 <= o < S``); then
    ``l = p``. Circular boundary only (``padding_mode="circular"``).
    """

    _dims = 0

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding="same", output_padding=0,
                 groups=1, bias=True, dilation=1, padding_mode="circular", device=None, dtype=None, *, method="auto",
                 gain=1.0, compute_dtype=None):
        super().__init__()
        _check_device_position(device, type(self).__name__)
        factory = _factory(device, dtype)
        self._configure(in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, dilation,
                        padding_mode, method)
        bias = _bias_flag(bias, type(self).__name__)
        self.conv = _adjoint_conv(self, lambda: _ORTHOGONAL_CONV[self._dims](
            self.out_channels, self.in_channels, self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, groups=self.groups, bias=False, padding_mode="circular", method=method,
            device=device, dtype=dtype, gain=gain, compute_dtype=compute_dtype))
        self._register_bias(bias, factory)

    def _configure(self, in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, dilation,
                   padding_mode, method) -> None:
        """The checks and the attributes of the layer, everything but the adjoint conv and the bias (shared by
        ``__init__`` and :meth:`from_conv_transpose`, which builds the conv from the module's weight)."""
        d = self._dims
        name = type(self).__name__
        _set_conv_arguments(self, in_channels, out_channels, kernel_size, stride, dilation, groups,
                            f"ConvTranspose{d}d")
        if padding_mode != "circular":
            raise LayerArgumentError(
                f"{name}: padding_mode must be 'circular' (the adjoint of the exactly orthogonal circular conv), "
                f"got {padding_mode!r}")
        self.padding_mode = padding_mode
        if method not in _METHODS:  # checked here, not by the adjoint conv, so that the error names this layer
            raise LayerArgumentError(f"{name}: method must be one of ('auto', 'bcop', 'rko') ('auto' picks the "
                                     f"cheapest exact construction), got {method!r}")
        if method == "cayley_fft":
            raise LayerArgumentError(
                f"{name}: method='cayley_fft' is not supported for transposed convolutions (its operator lives on "
                f"one input grid); use method='auto', 'bcop' or 'rko'")
        self.padding, self.output_padding = self._check_padding(padding, output_padding, name)
        exists, case, reason = orthogonal_conv_exists(self.out_channels, self.in_channels, self.kernel_size,
                                                      self.stride, dims=d, groups=self.groups,
                                                      padding="circular", dilation=self.dilation)
        if not exists:
            dilated = "" if all(dl == 1 for dl in self.dilation) else f", dilation={self.dilation}"
            # the residues mod S a dilated kernel's taps read (theory.orthogonal_conv_exists): min(k, S / gcd(D, S))
            reads = math.prod(min(k, s // math.gcd(dl, s))
                              for k, s, dl in zip(self.kernel_size, self.stride, self.dilation))
            co_fix = "kernel_size >= stride" + (" and a dilation coprime to the stride" if dilated else "")
            g = self.groups
            ro_fix = f"in_channels <= {self.out_channels * reads} (RO conv)" + (
                ", a dilation coprime to the stride in every strided dimension (e.g. dilation=1; RO conv)"
                if case == "RO" and dilation_blocks_row_orthogonal(self.kernel_size, self.stride, self.dilation,
                                                                   self.out_channels // g, self.in_channels // g)
                else "")
            raise ImpossibleLayerError(
                f"{name}(in_channels={self.in_channels}, out_channels={self.out_channels}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}{dilated}, groups={self.groups}): no "
                f"orthogonal transposed convolution exists. It is the adjoint of the convolution from "
                f"out_channels={self.out_channels} to in_channels={self.in_channels} channels (C={self.out_channels}"
                f", M={self.in_channels} below), which is orthogonal iff it is, and by P0 Theorem 4 (circular "
                f"padding): {reason}. Fix: use {ro_fix} or {co_fix} "
                f"in every dimension (CO conv), or keep a plain ConvTranspose{d}d "
                f"(e.g. with the orth_regularizer pass) for this layer")
        self.init_error: float | None = None

    def _register_bias(self, bias: bool, factory: dict) -> None:
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_bias()

    def _check_padding(self, padding, output_padding, name: str):
        d = self._dims
        supported = ("supported: padding='same' (default) or integer padding p and output_padding o with "
                     "2*p = dilation*(kernel_size-1)+1 - stride + o and 0 <= o < stride in every dimension (the "
                     "output size is then exactly input * stride, e.g. kernel_size=4, stride=2, padding=1)")
        if isinstance(padding, str):
            if padding != "same":
                raise LayerArgumentError(f"{name}: padding={padding!r} is not supported; {supported}")
            if any(_tuple(output_padding, d, "output_padding", minimum=0)):
                raise LayerArgumentError(f"{name}: output_padding={output_padding!r} with padding='same' (whose "
                                         f"output size is input * stride already); {supported}")
            return "same", (0,) * d
        pads = _tuple(padding, d, "padding", minimum=0)
        outs = _tuple(output_padding, d, "output_padding", minimum=0)
        if not transposed_keeps_output_size(pads, outs, self.kernel_size, self.stride, self.dilation):
            fix = transposed_size_keeping_padding(self.kernel_size, self.stride, self.dilation)
            here = ("no integer padding does here" if fix is None else
                    f"here padding={fix[0]}, output_padding={fix[1]} does")
            raise LayerArgumentError(
                f"{name}: padding={pads}, output_padding={outs} with kernel_size={self.kernel_size}, "
                f"stride={self.stride}, dilation={self.dilation} does not give the output size input * stride "
                f"that an exactly orthogonal transposed convolution has ({here}); {supported}")
        return pads, outs

    @torch.no_grad()
    def reset_bias(self) -> None:
        """Bias uniform in :math:`\\pm 1/\\sqrt{\\text{fan\\_in}}` as ``nn.ConvTranspose`` (fan_in: out / groups
        times the kernel's taps, torch's computation on the ``(in, out / groups, *k)`` weight)."""
        if self.bias is not None:
            bound = 1 / math.sqrt(self.out_channels // self.groups * math.prod(self.kernel_size))
            self.bias.uniform_(-bound, bound)

    def reset_parameters(self, init: str = "random") -> None:
        """Re-initialise the adjoint conv's kernel (:meth:`OrthogonalConv2d.reset_parameters`) and the bias;
        ``init_error`` becomes ``None``."""
        self.conv.reset_parameters(init)
        self.reset_bias()
        self.init_error = None

    # ---------------------------------------------------------------------------------------- properties

    @property
    def case(self) -> str:
        """``"RO"`` / ``"CO"`` of this layer: the adjoint conv's case swapped."""
        return adjoint_case(self.conv.case)

    @property
    def method(self) -> str:
        return self.conv.method

    @property
    def gain(self) -> float:
        return self.conv.gain

    @property
    def weight(self) -> torch.Tensor:
        """The kernel ``(in_channels, out_channels / groups, *kernel_size)`` (``nn.ConvTranspose``'s layout), the
        adjoint conv's :attr:`OrthogonalConv2d.weight` (differentiable, rebuilt at every access)."""
        return self.conv.weight

    @weight.setter
    def weight(self, value) -> None:
        self._refuse_assignment()

    @property
    def pads(self) -> tuple[tuple[int, int], ...]:
        """``(l, r)`` per dimension: the adjoint conv's circular padding, folded back by the forward."""
        return self.conv.pads

    @property
    def _overflow(self) -> tuple[int, ...]:
        """``output_padding`` of the unpadded transposed conv: the zeros that bring its
        ``(n - 1) S + D(k - 1) + 1`` entries to ``n S + l + r`` (``l + r - (D(k-1) + 1 - S)``, in ``[0, S)``)."""
        return tuple(l + r - (ke - s) for (l, r), ke, s in zip(self.pads, self.conv.effective_kernel_size,
                                                                self.stride))

    # ---------------------------------------------------------------------------------------- forward

    def forward(self, input: torch.Tensor, output_size: Sequence[int] | None = None) -> torch.Tensor:
        """``input`` and ``output_size``: named and used as ``nn.ConvTranspose{d}d``'s (``output_size``: spatial
        sizes, or the whole shape); the output size is always ``input * stride`` here, so any other one raises
        :class:`~orthofx.errors.LayerArgumentError`."""
        x = input
        d = self._dims
        _check_input(x, d, self.in_channels, self)
        if not isinstance(x, torch.fx.Proxy):
            check_input_dtype(x, self.conv._param_dtype, self)
        if output_size is not None:
            _check_transposed_output_size(x, output_size, self.stride, layer_label(self))
        weight = self.conv._cached("weight", lambda: self.conv.weight)
        y = _CONV_TRANSPOSE_FN[d](x, weight, None, self.stride, 0, self._overflow, self.groups, self.dilation)
        out = _circular_fold_valid(y, self.pads)
        if self.bias is not None:
            out = out + self.bias.reshape(-1, *(1,) * d)
        return _in_conv_dtype(out, y)

    def extra_repr(self) -> str:
        s = _conv_arguments_repr(self, self.output_padding)
        s += f", method={self.method!r}, case={self.case!r}"
        if self.gain != 1.0:
            s += f", gain={self.gain}"
        return s

    # ---------------------------------------------------------------------------------------- tools

    def orthogonality_error(self, input_size) -> float:
        r""":math:`\max_i |\sigma_i / \text{gain} - 1|` of the layer on an ``input_size`` grid: that of its adjoint
        conv on the output grid ``input_size * stride`` (the same singular values)."""
        size = _tuple(input_size, self._dims, "input_size", broadcast=False)
        return self.conv.orthogonality_error(tuple(n * s for n, s in zip(size, self.stride)))

    @torch.no_grad()
    def to_conv(self) -> nn.Sequential:
        """Plain layers with the same outputs: ``nn.Sequential(nn.ConvTranspose{d}d(padding=0, output_padding=...,
        bias=False), orthofx.nn.padding.CircularFold(pads, bias))`` (whose forward also takes ``output_size``, as
        the layer's does), the kernel baked in. Traces with
        ``torch.fx``, exports to ``.pt2`` and ONNX; no orthogonality constraint (inference). ``requires_grad``
        follows the layer's (the weight's that of :attr:`conv`'s parameters, the bias's that of the bias)."""
        d = self._dims
        ref = self.conv.matrix
        plain = skip_init(_TORCH_CONV_TRANSPOSE[d], self.in_channels, self.out_channels, self.kernel_size,
                          stride=self.stride, padding=0, output_padding=self._overflow, groups=self.groups,
                          bias=False, dilation=self.dilation, device=ref.device, dtype=ref.dtype)  # no init draw
        plain.weight.copy_(self.weight)
        fold = CircularFold(self.pads, None if self.bias is None else self.bias)
        frozen = _FrozenConvTranspose(plain, fold)
        frozen.train(self.training)
        return _frozen_requires_grad(self, frozen)  # the weight from self.conv's parameters, the bias from self's

    def to_plain(self) -> nn.Module:
        """The protocol ``orthofx.freeze`` uses: :meth:`to_conv`."""
        return self.to_conv()

    @classmethod
    def from_conv_transpose(cls, module: nn.Module, init: str = "nearest", *, method: str = "auto",
                            padding="same", output_padding=0, gain: float = 1.0, fit_steps: int | None = None,
                            compute_dtype=None):
        r"""The orthogonal layer for an existing ``nn.ConvTranspose{d}d`` (same channels, kernel, stride,
        dilation, groups, bias, device and dtype).

        ``padding`` / ``output_padding``: the new layer's (default ``"same"``; ``padding="keep"`` takes the
        module's own, which must give the output size ``input * stride``; the ``orthogonal_conv`` pass passes
        :func:`transposed_alignment`). The kernel starts as the adjoint conv's :meth:`OrthogonalConv2d.from_conv`
        start from the module's weight (the same tensor read as a conv ``out -> in``; ``init="nearest"``: closest
        orthogonal kernel, ``fit_steps`` as there; ``"random"``), the bias is copied; ``layer.init_error`` is
        :math:`\|K - K_0\|_F / \|K_0\|_F`, and ``requires_grad`` follows the module's.
        """
        d = cls._dims
        _check_conversion(cls, "from_conv_transpose", module, _TORCH_CONV_TRANSPOSE[d], init)
        if padding == "keep":
            padding, output_padding = tuple(module.padding), tuple(module.output_padding)
        w0 = module.weight.detach()
        # built around the conv that from_conv makes, not by cls(...), whose randomly initialised conv (QR
        # factorisations and all) would be thrown away; the checks come first, so that an impossible layer is
        # reported as a transposed one
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._configure(module.in_channels, module.out_channels, module.kernel_size, module.stride, padding,
                         output_padding, module.groups, module.dilation, "circular", method)
        # the same weight tensor read as the adjoint conv's (out -> in channels), built on the meta device
        adjoint = _TORCH_CONV[d](module.out_channels, module.in_channels, module.kernel_size, stride=module.stride,
                                 dilation=module.dilation, groups=module.groups, bias=False, device="meta")
        adjoint.weight = nn.Parameter(w0, requires_grad=module.weight.requires_grad)
        adjoint.train(module.training)
        layer.conv = _adjoint_conv(layer, lambda: _ORTHOGONAL_CONV[d].from_conv(
            adjoint, init=init, method=method, padding=layer.padding, padding_mode="circular", gain=gain,
            fit_steps=fit_steps, compute_dtype=compute_dtype))
        layer._register_bias(module.bias is not None, _factory(w0.device, w0.dtype))
        with torch.no_grad():
            if module.bias is not None:
                layer.bias.copy_(module.bias)
                layer.bias.requires_grad_(module.bias.requires_grad)
        layer.init_error = layer.conv.init_error
        for m in layer.modules():  # flags only: the conv's eval-mode kernel cache from from_conv stays
            m.training = module.training
        return layer


class OrthogonalConvTranspose2d(_OrthogonalConvTransposeNd):
    r"""A 2-D transposed convolution that is exactly orthogonal (times ``gain``), grid ``n -> n S``.

    The adjoint of the circular :class:`OrthogonalConv2d` from ``out_channels`` to ``in_channels``
    (:attr:`conv`; construction and alignment in :class:`_OrthogonalConvTransposeNd`'s docs). Signature of
    ``torch.nn.ConvTranspose2d`` (``padding="same"`` by default; integer paddings only where the output is
    ``input * stride``; positions as torch's), plus the keywords ``method``, ``gain`` and ``compute_dtype`` as for
    :class:`OrthogonalConv2d`.
    Exists iff the conv ``(out -> in, k, S)`` does (P0 Theorem 4): CO (:math:`T^T T = I`) when
    ``in_channels <= out_channels * S^2`` (the conv is RO), RO otherwise.

    >>> import torch
    >>> layer = OrthogonalConvTranspose2d(16, 8, 4, stride=2, padding=1)   # a decoder's upsampling
    >>> x = torch.randn(2, 16, 5, 5)
    >>> y = layer(x); y.shape
    torch.Size([2, 8, 10, 10])
    >>> layer.case, round(layer.orthogonality_error((5, 5)), 4)
    ('CO', 0.0)
    >>> bool(torch.allclose((y - layer.bias.reshape(-1, 1, 1)).square().sum(), x.square().sum(), rtol=1e-4))
    True
    >>> frozen = layer.to_plain()
    >>> bool(torch.allclose(frozen(x), y, atol=1e-5))
    True
    """

    _dims = 2


class OrthogonalConvTranspose1d(_OrthogonalConvTransposeNd):
    """A 1-D transposed convolution that is exactly orthogonal (times ``gain``): as
    :class:`OrthogonalConvTranspose2d` with ``d = 1`` (the adjoint of :class:`OrthogonalConv1d`).

    >>> import torch
    >>> from orthofx.nn import OrthogonalConvTranspose1d
    >>> layer = OrthogonalConvTranspose1d(8, 4, 4, stride=2, padding=1, bias=False)   # CO: 8 <= 4 * 2
    >>> x = torch.randn(3, 8, 10)
    >>> y = layer(x); y.shape
    torch.Size([3, 4, 20])
    >>> torch.allclose(y.norm(), x.norm())                    # circular padding: an isometry
    True
    """

    _dims = 1


class OrthogonalConvTranspose3d(_OrthogonalConvTransposeNd):
    """A 3-D transposed convolution that is exactly orthogonal (times ``gain``): as
    :class:`OrthogonalConvTranspose2d` with ``d = 3`` (the adjoint of :class:`OrthogonalConv3d`).

    >>> import torch
    >>> from orthofx.nn import OrthogonalConvTranspose3d
    >>> layer = OrthogonalConvTranspose3d(8, 2, 2, stride=2, bias=False)   # CO: 8 <= 2 * 2**3
    >>> x = torch.randn(1, 8, 3, 3, 3)
    >>> y = layer(x); y.shape
    torch.Size([1, 2, 6, 6, 6])
    >>> torch.allclose(y.norm(), x.norm())
    True
    """

    _dims = 3


_ORTHOGONAL_CONV = {1: OrthogonalConv1d, 2: OrthogonalConv2d, 3: OrthogonalConv3d}


class FourierConv(_FormatFree, nn.Module):
    r"""A circular (strided) convolution applied in the Fourier domain with precomputed per-frequency matrices.

    :math:`y = \mathrm{IFFT}\big(Q(f)\, \mathrm{FFT}(x')(f)\big) + b`, where :math:`x'` is the input rearranged
    space-to-depth by ``stride`` (channel-major, as ``F.pixel_unshuffle``) and ``Q(f)`` (``M x C S^d`` per group)
    is given for the ``rfftn`` half spectrum of the ``input_size / stride`` grid. This is the inference form of
    ``OrthogonalConv2d(method="cayley_fft")`` (:meth:`OrthogonalConv2d.to_plain`, used by ``orthofx.freeze``): the
    Cayley transform's linear solves are done once, the operator is kept as the buffer ``symbol``
    (``(groups, F, M, C S^d, 2)``: real and imaginary parts, so ``.to(dtype)`` / ``.half()`` cast it like any real
    buffer). Cost per call: two FFTs and one batched complex ``M x C S^d`` matrix product per frequency. It is
    defined for one input size (:class:`~orthofx.errors.LayerArgumentError` for another); ``torch.export`` and
    the ONNX exporter (DFT + MatMul, opset >= 18) both handle it. Outside ``torch.autocast`` an input must have
    the layer's dtype (another raises a :class:`~orthofx.errors.LayerArgumentError`, as ``nn.Conv{d}d`` refuses
    it): that of the layer it was frozen from, ``dtype``, which a half-precision layer's float32 symbol does not
    tell, so it is kept in the non-persistent, zero-element buffer ``dtype_marker``, which ``.to(dtype)`` casts
    with the rest (not in the state dict; a layer pickled before it existed reads its bias's dtype, else its
    symbol's).

    >>> import torch
    >>> layer = OrthogonalConv2d(4, 4, 3, method="cayley_fft", input_size=(8, 8))
    >>> frozen = layer.to_plain(); type(frozen).__name__
    'FourierConv'
    >>> x = torch.randn(2, 4, 8, 8)
    >>> bool(torch.allclose(frozen(x), layer(x), atol=1e-6))
    True
    """

    def __init__(self, symbol: torch.Tensor, input_size, stride, bias: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if not symbol.is_complex() or symbol.dim() != 4:
            raise LayerArgumentError(f"FourierConv: symbol must be a complex (groups, F, M, C*S^d) tensor, got "
                                     f"{tuple(symbol.shape)} {symbol.dtype}")
        self.input_size = tuple(int(n) for n in input_size)
        d = len(self.input_size)
        self.stride = _tuple(stride, d, "stride")
        grid = tuple(n // s for n, s in zip(self.input_size, self.stride))
        expected = math.prod(grid[:-1]) * (grid[-1] // 2 + 1)
        if any(n % s for n, s in zip(self.input_size, self.stride)) or symbol.shape[1] != expected:
            raise LayerArgumentError(f"FourierConv: symbol has {symbol.shape[1]} frequencies; input_size="
                                     f"{self.input_size} at stride={self.stride} needs {expected} (and divisibility)")
        g, _, m, cs = symbol.shape
        if cs % math.prod(self.stride):
            raise LayerArgumentError(f"FourierConv: the symbol's {cs} input columns are not a multiple of "
                                     f"prod(stride)={math.prod(self.stride)}")
        self.groups = g
        self.out_channels = g * m
        self.in_channels = g * cs // math.prod(self.stride)
        self.register_buffer("symbol", torch.view_as_real(symbol.detach().resolve_conj()).contiguous())
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone())
        else:
            self.register_parameter("bias", None)
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise LayerArgumentError(f"FourierConv: dtype must be a real floating-point torch.dtype (the layer's "
                                     f"inputs'), got {dtype!r}")
        self._mark_dtype(dtype)

    def _mark_dtype(self, dtype: torch.dtype | None) -> None:
        """Register ``dtype_marker``: the layer's dtype (``None``: its bias's, else its symbol's real dtype) held
        by a tensor, so that ``.to()`` / ``.half()`` cast it as they cast the layer. Non-persistent: a state dict
        without it (written before it existed) loads strictly, and one with it is no different."""
        if dtype is None:
            bias = self._parameters.get("bias")
            dtype = self._buffers["symbol"].dtype if bias is None else bias.dtype
        self.register_buffer("dtype_marker", torch.empty(0, dtype=dtype, device=self._buffers["symbol"].device),
                             persistent=False)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "dtype_marker" not in self._buffers:  # pickled before the marker existed: the best the layer tells
            self._mark_dtype(None)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = input  # the frozen form of a Conv{d}d replacement keeps nn.Conv{d}d's parameter name
        symbol = self.symbol
        # the dtype from _buffers: a tracer with proxy_buffer_attributes (orthofx's) makes self.symbol a Proxy
        dtype = self._buffers["symbol"].dtype
        if dtype not in (torch.float32, torch.float64):
            symbol = symbol.float()
        # the layer's dtype, which its inputs must have outside autocast: the marker's (a frozen half-precision
        # layer keeps its symbol in float32, the precision the layer computed it in), read from _buffers as above
        return _fourier_forward(x, torch.view_as_complex(symbol), self.bias, self.stride, self.input_size,
                                self.in_channels, layer_label(self), frozen=True,
                                layer_dtype=self._buffers["dtype_marker"].dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, input_size={self.input_size}, stride={self.stride}, "
                f"groups={self.groups}, bias={self.bias is not None}")


# ------------------------------------------------------------------------------------------ linear


class OrthogonalLinear(_ComputedWeight, _EvalCache, nn.Module):
    r"""A linear layer with orthonormal rows (``out <= in``) or columns (``out > in``), times ``gain``.

    :math:`W = \text{gain} \cdot \operatorname{orthonormal}(V)` with ``V`` an unconstrained ``out x in``
    parameter (``raw_weight``) and :func:`orthonormal` the sign-corrected QR of its tall orientation: cost
    :math:`O(n k^2)` for an ``n x k`` matrix (``n >= k``), so very thin or wide layers are cheap, and
    :math:`O(n^3)` for square ones. Computed in float64 (``compute_dtype``, or float32 on request), then
    rounded to the layer's dtype:
    :math:`\|WW^T - I\|` (or :math:`\|W^TW - I\|`) is at float32 rounding (``< 1e-6``). :attr:`weight` is
    rebuilt at every forward with gradients or in training mode (differentiable); an eval-mode forward without
    gradients reuses the one it built (writes through ``param.data`` are not seen: call ``.eval()`` again).

    >>> import torch
    >>> layer = OrthogonalLinear(64, 16)
    >>> w = layer.weight
    >>> bool(torch.allclose(w @ w.T, torch.eye(16), atol=1e-6))
    True
    >>> layer(torch.randn(5, 64)).shape
    torch.Size([5, 16])
    >>> near = OrthogonalLinear.from_linear(torch.nn.Linear(16, 64))   # polar factor: the nearest
    >>> near.init_error < 1.5
    True
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *, gain=1.0,
                 compute_dtype=None):
        super().__init__()
        factory = _factory(device, dtype)
        self.in_features = _int(in_features, "in_features")
        self.out_features = _int(out_features, "out_features")
        self.gain = _gain(gain, factory["dtype"], "OrthogonalLinear")
        bias = _bias_flag(bias, "OrthogonalLinear")
        self.raw_weight = nn.Parameter(torch.empty(self.out_features, self.in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.compute_dtype = _compute_dtype(compute_dtype)
        self.init_error: float | None = None
        self.reset_parameters()

    @property
    def case(self) -> str:
        """``"RO"`` (orthonormal rows, ``out <= in``) or ``"CO"`` (orthonormal columns)."""
        return "RO" if self.out_features <= self.in_features else "CO"

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Haar-random orthonormal weight; bias uniform in :math:`\\pm 1/\\sqrt{in}` like nn.Linear;
        ``init_error`` ``None`` (it described the start :meth:`from_linear` made)."""
        self.raw_weight.normal_()
        self.init_error = None
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            self.bias.uniform_(-bound, bound)

    @property
    def weight(self) -> torch.Tensor:
        """The ``out x in`` weight, ``gain`` times orthonormal rows or columns (differentiable), computed from
        ``raw_weight`` at every access: writing into it (``nn.init``) changes nothing, use :meth:`reset_parameters`
        or write ``raw_weight`` (see "Initialisation" in the module docs)."""
        with autocast_off(_kept_parameter(self, "raw_weight")):
            W = orthonormal(self.raw_weight.to(self.compute_dtype), tall=self.out_features >= self.in_features)
        return _times_gain(W, self.gain).to(self.raw_weight.dtype)

    _computed_what = "is gain times the orthonormal factor of raw_weight, built at every access"

    @weight.setter
    def weight(self, value) -> None:
        self._refuse_assignment()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = input  # nn.Linear's parameter name: a model calling self.fc(input=h) keeps working once replaced
        if not isinstance(x, torch.fx.Proxy):  # symbolic tracing records the forward op by op
            _check_floating(x, self)
            check_last_dimension(x, self.in_features, self)
            check_input_dtype(x, _kept_parameter(self, "raw_weight").dtype, self)
        return F.linear(x, self._cached("weight", lambda: self.weight), self.bias)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        s += f", case={self.case!r}"
        if self.gain != 1.0:
            s += f", gain={self.gain}"
        return s

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the baked weight (and bias), same outputs, no constraint; ``requires_grad``
        follows the layer's (the weight's that of ``raw_weight``, the bias's that of the bias)."""
        return _frozen_requires_grad(self, _baked_linear(self.weight, self.bias))

    def to_plain(self) -> nn.Module:
        """The protocol ``orthofx.freeze`` uses: same as :meth:`to_linear`."""
        return self.to_linear()

    @classmethod
    def from_linear(cls, linear: nn.Linear, init: str = "nearest", *, gain: float = 1.0,
                    compute_dtype=None) -> "OrthogonalLinear":
        r"""The orthogonal layer for an existing ``nn.Linear`` (same shape, bias, device, dtype).

        ``init="nearest"``: the polar factor of ``weight / gain``, the nearest matrix with orthonormal rows or
        columns (exact; an orthonormal weight is returned unchanged). ``init="random"``: Haar-random. The bias is
        copied; ``requires_grad`` follows the linear's (a frozen layer stays frozen). ``layer.init_error`` is
        :math:`\|W - W_0\|_F / \|W_0\|_F`, ``None`` where undefined (a zero ``W_0``, or a non-finite one with
        ``init="random"``; ``"nearest"`` refuses NaN or inf weights, as :meth:`OrthogonalConv2d.from_conv` does). A
        linear on the meta device: ``init="random"`` gives a meta layer with ``init_error`` ``None``,
        ``"nearest"`` raises :class:`MetaWeightError`, as in :meth:`OrthogonalConv2d.from_conv`.
        """
        if not isinstance(linear, nn.Linear):
            raise LayerArgumentError(f"{cls.__name__}.from_linear expects a torch.nn.Linear, got "
                                     f"{type(linear).__name__}")
        if init not in ("nearest", "random"):
            raise LayerArgumentError(f"init must be 'nearest' or 'random', got {init!r}")
        _check_nearest_has_values(cls, "from_linear", linear, init)
        _check_nearest_is_finite(cls, "from_linear", linear, init)
        w0 = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=w0.device,
                    dtype=w0.dtype, gain=gain, compute_dtype=compute_dtype)
        with torch.no_grad():
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
            if w0.is_meta:
                return _deferred(linear, layer)
            if init == "nearest":
                polar = project_to_stiefel(w0.to(layer.compute_dtype) / layer.gain)
                layer.raw_weight.copy_(polar.to(layer.raw_weight))
        layer.train(False)  # as in from_conv: the weight built for init_error stays cached
        with torch.no_grad():
            layer.init_error = relative_distance(layer._cached("weight", lambda: layer.weight), w0)
        layer._adopt_mode(linear.training)
        _mirror_requires_grad(linear, layer)
        return layer
