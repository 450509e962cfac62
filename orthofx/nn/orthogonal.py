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
   :math:`\omega D`, still unitary, so the same kernel is orthogonal with any dilation; with stride > 1 a
   dilation > 1 in the same dimension is refused (``k = 1`` ignores dilation).

The kernel is rebuilt from the parameters at every access of :attr:`weight` (nothing is cached), in
``compute_dtype`` (keyword argument and attribute; float64 by default, then rounded to the layer's dtype, which
gives :math:`\max|\sigma - 1| \approx 4 \cdot 10^{-8}` in float32; ``compute_dtype=torch.float32`` builds about
2x faster on CPUs and on GPUs with slow float64, but float32 QR is only orthonormal to about ``1e-6`` and the
errors add up over the blocks: measured ``1e-6 .. 4e-6`` for 64..512 channels, ``k <= 7``). The cost is
:math:`O(n^3 \prod k_i)` per rebuild (plus its backward), small next to a forward pass over a batch of images.
``to_conv()`` / ``to_linear()`` bake the weight into plain torch layers for inference and export.

Boundary. Exact orthogonality needs circular padding (P0 Proposition 6: with zero 'same' padding at stride 1
an orthogonal kernel has only its centre tap non-zero). ``padding_mode="zeros"`` is accepted (the
``orthogonal_conv`` pass uses it for ``padding: keep``); the layer is then orthogonal only away from the
borders: outputs whose window does not meet the zero padding are exactly those of the orthogonal circular
operator.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from orthofx.errors import ImpossibleLayerError, LayerArgumentError
from orthofx.nn.stiefel import orthonormal, project_to_stiefel
from orthofx.theory import orthogonal_conv_exists

__all__ = [
    "OrthogonalConv1d",
    "OrthogonalConv2d",
    "OrthogonalLinear",
    "LayerArgumentError",
    "orthonormal",
]

_CONV_FN = {1: F.conv1d, 2: F.conv2d}
_TORCH_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_CIRCULAR_PAD = {1: nn.CircularPad1d, 2: nn.CircularPad2d}
_ZERO_PAD = {1: nn.ZeroPad1d, 2: nn.ZeroPad2d}
_METHODS = ("auto", "bcop", "rko")
_PADDING_MODES = ("circular", "zeros")


# ------------------------------------------------------------------------------------------ matrix helpers


# ------------------------------------------------------------------------------------------ argument checks


def _int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise LayerArgumentError(f"{name} must be an integer >= {minimum}, got {value!r}")
    value = int(value.__index__())
    if value < minimum:
        raise LayerArgumentError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def _tuple(value, dims: int, name: str, minimum: int = 1) -> tuple[int, ...]:
    if isinstance(value, (tuple, list)):
        if len(value) != dims:
            raise LayerArgumentError(f"{name} must be an int or a tuple of {dims} ints for a {dims}-D convolution, "
                                     f"got {value!r}")
        return tuple(_int(v, name, minimum) for v in value)
    return (_int(value, name, minimum),) * dims


def _factory(device, dtype) -> dict:
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point
                              or dtype.is_complex):
        raise LayerArgumentError(f"dtype must be a real floating-point torch.dtype (e.g. torch.float32), got {dtype!r}")
    return {"device": device, "dtype": dtype}


def _gain(gain) -> float:
    try:
        value = float(gain)
    except (TypeError, ValueError):
        raise LayerArgumentError(f"gain must be a positive float, got {gain!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise LayerArgumentError(f"gain must be a positive finite float (the kernel is orthogonal times gain), "
                                 f"got {gain!r}")
    return value


def _compute_dtype(requested=None) -> torch.dtype:
    """float64 unless ``requested`` (float32 or float64) says otherwise."""
    if requested is None:
        return torch.float64
    if requested not in (torch.float32, torch.float64):
        raise LayerArgumentError(f"compute_dtype must be torch.float64 (default, orthogonal to ~1e-8) or "
                                 f"torch.float32 (about 2x faster to build, ~1e-6 .. 4e-6), got {requested!r}")
    return requested


# ------------------------------------------------------------------------------------------ convolutions


class _OrthogonalConvNd(nn.Module):
    """Shared implementation of :class:`OrthogonalConv1d` and :class:`OrthogonalConv2d` (see the module docs)."""

    _dims = 0
    _fit_lr = 0.3

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding="same", dilation=1, groups=1,
                 bias=True, padding_mode="circular", method="auto", device=None, dtype=None, *, gain=1.0,
                 compute_dtype=None):
        super().__init__()
        d = self._dims
        name = type(self).__name__
        factory = _factory(device, dtype)
        self.in_channels = _int(in_channels, "in_channels")
        self.out_channels = _int(out_channels, "out_channels")
        self.groups = _int(groups, "groups")
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise LayerArgumentError(
                f"{name}: groups={self.groups} must divide in_channels={self.in_channels} and "
                f"out_channels={self.out_channels} (as in torch.nn.Conv{d}d)")
        self.kernel_size = _tuple(kernel_size, d, "kernel_size")
        self.stride = _tuple(stride, d, "stride")
        self.dilation = _tuple(dilation, d, "dilation")
        if padding_mode not in _PADDING_MODES:
            raise LayerArgumentError(
                f"{name}: padding_mode must be 'circular' (exactly orthogonal) or 'zeros' (orthogonal away from "
                f"the borders only, P0 Proposition 6), got {padding_mode!r}")
        self.padding_mode = padding_mode
        self.padding = self._check_padding(padding, name)
        if method not in _METHODS:
            raise LayerArgumentError(f"{name}: method must be one of {_METHODS} ('auto' picks the cheapest exact "
                                     f"construction), got {method!r}")
        self.gain = _gain(gain)
        for i, (k, s, dl) in enumerate(zip(self.kernel_size, self.stride, self.dilation)):
            if dl > 1 and s > 1 and k > 1:
                raise LayerArgumentError(
                    f"{name}: dilation={self.dilation} together with stride={self.stride} (dimension {i}) is not "
                    f"supported: dilated orthogonal convolutions are built at stride 1 only, where a dilated "
                    f"convolution is orthogonal exactly when its undilated kernel is (it acts independently on the "
                    f"dilation cosets). Use dilation=1 or stride=1 in that dimension (e.g. a stride-1 dilated layer "
                    f"followed by a strided one)")

        g = self.groups
        C = self.in_channels // g
        M = self.out_channels // g
        self._C, self._M = C, M
        exists, case, reason = orthogonal_conv_exists(self.in_channels, self.out_channels, self.kernel_size,
                                                      self.stride, dims=d, groups=g, padding="circular")
        self.case = case
        if not exists:
            raise ImpossibleLayerError(
                f"{name}(in_channels={self.in_channels}, out_channels={self.out_channels}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, groups={g}): no orthogonal convolution "
                f"exists (P0 Theorem 4, circular padding): {reason}. {self._impossible_fix(case)}")

        # the construction: blocks of kernel k' on n channels, then the reshaped kernel R (size r) or embedding
        self._kp = tuple(k - s + 1 if k >= s else 1 for k, s in zip(self.kernel_size, self.stride))
        self._r = tuple(min(k, s) for k, s in zip(self.kernel_size, self.stride))
        self._strided = any(s > 1 for s in self.stride)
        self._embed = (not self._strided) and M > C
        n = M if self._embed else C
        self._n = n
        nblocks = [kp - 1 for kp in self._kp]
        if method == "rko" and any(nblocks):
            raise LayerArgumentError(
                f"{name}: method='rko' (reshaped kernel only) is exact only when kernel_size <= stride in every "
                f"dimension, got kernel_size={self.kernel_size}, stride={self.stride}; use method='bcop' or 'auto'")
        self.method = ("rko" if not any(nblocks) else "bcop") if method == "auto" else method
        # block j of dimension i has rank ra = n // 2 (j even, class a) or rb = n - ra (j odd, class b)
        self._ra, self._rb = n // 2, n - n // 2
        self._block_index: list[list[tuple[str, int]]] = []
        counts = {"a": 0, "b": 0}
        for m in nblocks:
            dim_blocks = []
            for j in range(m):
                cls = "a" if j % 2 == 0 else "b"
                dim_blocks.append((cls, counts[cls]))
                counts[cls] += 1
            self._block_index.append(dim_blocks)
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
        self.compute_dtype = _compute_dtype(compute_dtype)
        self.init_error: float | None = None
        self.reset_parameters()

    # ---------------------------------------------------------------------------------------- construction

    def _impossible_fix(self, case: str) -> str:
        g, C, M = self.groups, self._C, self._M
        largest = g * C * math.prod(min(k, s) for k, s in zip(self.kernel_size, self.stride))
        hints = []
        if case == "RO":
            k_min = next((k for k in range(1, max(self.stride) + 1)
                          if C * math.prod(min(k, s) for s in self.stride) >= M), None)
            if k_min is not None:
                hints.append(f"use kernel_size >= {k_min}")
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
        """
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
        a random orthonormal matrix on its centre taps (one tap for odd ``k`` at stride 1).
        """
        if init not in ("random", "centre"):
            raise LayerArgumentError(f"init must be 'random' or 'centre', got {init!r}")
        for p in (self.proj_a, self.proj_b, self.matrix):
            if p is not None:
                p.normal_()
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
                full = torch.linalg.qr(torch.randn(self.groups, self._n, self._n, dtype=torch.float64))[0]
                self.proj_a[:, ia] = full[..., :ra].to(self.proj_a)
                self.proj_b[:, ib] = full[..., ra:].to(self.proj_b)

    def _chains(self, cd: torch.dtype) -> list[torch.Tensor | None]:
        """Per spatial dimension, the 1-D kernel of its blocks, ``(g, k'_i, n, n)`` (tap, out, in), or None."""
        g, n = self.groups, self._n
        qa = orthonormal(self.proj_a.to(cd), tall=True) if self.proj_a is not None else None
        qb = orthonormal(self.proj_b.to(cd), tall=True) if self.proj_b is not None else None
        chains: list[torch.Tensor | None] = []
        for dim_blocks in self._block_index:
            if not dim_blocks:
                chains.append(None)
                continue
            T = torch.eye(n, dtype=cd, device=self.matrix.device).expand(g, 1, n, n)
            for cls, idx in dim_blocks:
                q = qa if cls == "a" else qb
                zero = T.new_zeros(g, 1, n, n)
                shifted = torch.cat([zero, T], dim=1)      # T[p - 1]
                current = torch.cat([T, zero], dim=1)      # T[p]
                if q is None:  # rank-0 projector: a pure shift
                    T = shifted
                else:
                    Q = q[:, idx].unsqueeze(1)  # (g, 1, n, r)
                    T = shifted + Q @ (Q.mT @ (current - shifted))
            chains.append(T)
        return chains

    def _block_product(self, cd: torch.dtype, left: torch.Tensor | None = None,
                       right: torch.Tensor | None = None) -> torch.Tensor | None:
        r"""The square block kernel ``A`` as ``(g, k'_1, ..., k'_d, out, in)``, optionally ``left @ A @ right``.

        ``A[p_1, ..., p_d] = T_1[p_1] \cdots T_d[p_d]`` (1-D chains along each dimension, composed); ``left``
        ``(g, M, n)`` and ``right`` ``(g, n, C)`` are folded into the first / last chain. None without blocks.
        """
        chains = self._chains(cd)
        present = [i for i, c in enumerate(chains) if c is not None]
        if not present:
            return None
        chains = list(chains)
        if left is not None:
            chains[present[0]] = left.unsqueeze(1) @ chains[present[0]]
        if right is not None:
            chains[present[-1]] = chains[present[-1]] @ right.unsqueeze(1)
        g = self.groups
        prod = None
        for c in chains:
            if c is None:
                continue
            if prod is None:
                prod = c
            else:
                prod = torch.einsum("glab,gkbc->glkac", prod, c).reshape(g, -1, prod.shape[-2], c.shape[-1])
        return prod.reshape(g, *self._kp, prod.shape[-2], prod.shape[-1])

    def _unit_kernel(self, cd: torch.dtype | None = None) -> torch.Tensor:
        """The orthogonal kernel without gain, ``(g, M, C, *k)`` in ``cd``."""
        cd = cd or self.compute_dtype
        g, M, C, d = self.groups, self._M, self._C, self._dims
        W = orthonormal(self.matrix.to(cd), tall=self._matrix_tall)
        spatial_last = lambda t: t.permute(0, d + 1, d + 2, *range(1, d + 1))  # (g, *k, a, b) -> (g, a, b, *k)
        if self._embed:
            A = self._block_product(cd, right=W)
            return W.reshape(g, M, C, *(1,) * d) if A is None else spatial_last(A)
        if not self._strided:
            A = self._block_product(cd, left=W)
            return W.reshape(g, M, C, *(1,) * d) if A is None else spatial_last(A)
        R = W.reshape(g, M, C, *self._r)
        A = self._block_product(cd)
        if A is None:
            return R
        # K[p] = sum_a R[a] A[p - a]: one zero-padded term per tap a of R (no in-place ops: fx-traceable;
        # faster on CPU in float64 than one transposed convolution, which has no fast float64 kernel there)
        terms = []
        for offset in itertools.product(*(range(r) for r in self._r)):
            term = torch.einsum("gmj,g...jc->gmc...", R[(Ellipsis,) + offset], A)
            pad = []
            for o, r in reversed(list(zip(offset, self._r))):
                pad += [o, r - 1 - o]
            terms.append(F.pad(term, pad) if any(pad) else term)
        return torch.stack(terms).sum(0) if len(terms) > 1 else terms[0]

    @property
    def weight(self) -> torch.Tensor:
        r"""The explicit kernel ``(out_channels, in_channels / groups, *kernel_size)``, ``gain`` times orthogonal.

        A differentiable function of the parameters (``proj_a``, ``proj_b``: projector blocks; ``matrix``: the
        orthonormal mixing / reshaped kernel), rebuilt at every access in ``compute_dtype`` and rounded to the
        layer's dtype.
        """
        K = self._unit_kernel() * self.gain
        return K.reshape(self.out_channels, self._C, *self.kernel_size).to(self.matrix.dtype)

    # ---------------------------------------------------------------------------------------- forward

    def _pad_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...] | int]:
        pads = self.pads
        if not any(l or r for l, r in pads):
            return x, 0
        if self.padding_mode == "zeros" and all(l == r for l, r in pads):
            return x, tuple(l for l, _ in pads)
        flat = []
        for l, r in reversed(pads):  # F.pad lists the last dimension first
            flat += [l, r]
        mode = "circular" if self.padding_mode == "circular" else "constant"
        return F.pad(x, flat, mode=mode), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, padding = self._pad_input(x)
        return _CONV_FN[self._dims](x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding!r}")
        if any(dl != 1 for dl in self.dilation):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        s += f", padding_mode={self.padding_mode!r}, method={self.method!r}, case={self.case!r}"
        if self.gain != 1.0:
            s += f", gain={self.gain}"
        return s

    # ---------------------------------------------------------------------------------------- tools

    def orthogonality_error(self, input_size) -> float:
        r""":math:`\max_i |\sigma_i / \text{gain} - 1|` of the circular operator on an ``input_size`` grid
        (:func:`orthofx.metrics.orthogonality_error`, exact FFT singular values; dilation is ignored, which
        changes no singular value at stride 1 on a grid divisible by the dilation)."""
        from orthofx.metrics import orthogonality_error
        with torch.no_grad():
            w = self.weight / self.gain
        return orthogonality_error(w, input_size=input_size, stride=self.stride, groups=self.groups)

    @torch.no_grad()
    def to_conv(self) -> nn.Module:
        """A plain ``nn.Conv{d}d`` with the baked kernel (and bias), giving the same outputs.

        With symmetric padding (see :attr:`pads`: every case but ``"same"`` with an even ``k_eff`` at stride 1)
        the result is one ``nn.Conv{d}d(padding=left, padding_mode=self.padding_mode)``; with asymmetric padding
        it is ``nn.Sequential(nn.CircularPad{d}d(...) or nn.ZeroPad{d}d(...), nn.Conv{d}d(padding=0))``.
        The result has no orthogonality constraint: use it for inference and export.
        """
        d = self._dims
        pads = self.pads
        symmetric = all(l == r for l, r in pads)
        ref = self.matrix
        conv = _TORCH_CONV[d](self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                              padding=tuple(l for l, _ in pads) if symmetric else 0, dilation=self.dilation,
                              groups=self.groups, bias=self.bias is not None,
                              padding_mode=self.padding_mode if symmetric else "zeros",
                              device=ref.device, dtype=ref.dtype)
        conv.weight.copy_(self.weight)
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        conv.train(self.training)
        if symmetric:
            return conv
        flat = []
        for l, r in reversed(pads):
            flat += [l, r]
        pad = (_CIRCULAR_PAD if self.padding_mode == "circular" else _ZERO_PAD)[d](tuple(flat))
        return nn.Sequential(pad, conv)

    def to_plain(self) -> nn.Module:
        """The protocol ``orthofx.freeze`` uses: same as :meth:`to_conv`."""
        return self.to_conv()

    @classmethod
    def from_conv(cls, conv: nn.Module, init: str = "nearest", *, method: str = "auto", padding="same",
                  padding_mode: str = "circular", gain: float = 1.0, fit_steps: int = 200, compute_dtype=None):
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
        :math:`\sum_p K_0[p] A[p]^T`, exact because :math:`\|R \star A\|_F` is constant for orthogonal ``A``), then
        ``fit_steps`` Adam steps on all parameters minimise :math:`\|K - K_0\|_F^2`, and a final Procrustes step
        re-fits the matrix; the best kernel seen is kept. ``init="random"``: random orthogonal, the bias copied.

        The relative Frobenius distance :math:`\|K - K_0\|_F / \|K_0\|_F` of the resulting kernel is stored in
        ``layer.init_error`` (for both inits).

        >>> import torch
        >>> conv = torch.nn.Conv2d(8, 16, 2, stride=2)
        >>> layer = OrthogonalConv2d.from_conv(conv)            # k = S: polar factor, the nearest
        >>> layer(torch.randn(1, 8, 8, 8)).shape
        torch.Size([1, 16, 4, 4])
        >>> 0 < layer.init_error < 1
        True
        """
        d = cls._dims
        torch_type = _TORCH_CONV[d]
        if not isinstance(conv, torch_type):
            raise LayerArgumentError(f"{cls.__name__}.from_conv expects a torch.nn.Conv{d}d, got "
                                     f"{type(conv).__name__}")
        if init not in ("nearest", "random"):
            raise LayerArgumentError(f"init must be 'nearest' or 'random', got {init!r}")
        fit_steps = _int(fit_steps, "fit_steps", minimum=0)
        if padding == "keep":
            if conv.padding_mode not in _PADDING_MODES:
                raise LayerArgumentError(
                    f"padding='keep': the conv's padding_mode={conv.padding_mode!r} is not supported; orthogonal "
                    f"layers take 'circular' (exact) or 'zeros'. Pass padding='same' instead")
            padding, padding_mode = conv.padding, conv.padding_mode
        w0 = conv.weight.detach()
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=padding,
                    dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                    padding_mode=padding_mode, method=method, device=w0.device, dtype=w0.dtype, gain=gain,
                    compute_dtype=compute_dtype)
        with torch.no_grad():
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        if init == "nearest":
            layer._fit(w0, fit_steps)
        layer.init_error = layer._relative_error(w0)
        return layer

    @torch.no_grad()
    def _relative_error(self, target: torch.Tensor) -> float:
        t = target.to(torch.float64)
        return float(torch.linalg.vector_norm(self.weight.to(torch.float64) - t)
                     / torch.linalg.vector_norm(t).clamp_min(1e-300))

    @torch.no_grad()
    def _procrustes(self, target: torch.Tensor) -> None:
        """Set ``matrix`` to the optimum for the current blocks (target: ``(g, M, C, *k)`` in compute dtype)."""
        cd = self.compute_dtype
        g, M, C, d = self.groups, self._M, self._C, self._dims
        A = self._block_product(cd)  # (g, *kp, n, n) or None
        if A is None:
            G = target.reshape(self.matrix.shape)
        elif self._embed:      # K[p] = A[p] E  ->  G = sum_p A[p]^T K[p]
            Kt = target.reshape(g, M, C, -1)
            G = torch.einsum("gpmj,gmcp->gjc", A.reshape(g, -1, M, M), Kt)
        elif not self._strided:  # K[p] = W A[p]  ->  G = sum_p K[p] A[p]^T
            Kt = target.reshape(g, M, C, -1)
            G = torch.einsum("gmcp,gpjc->gmj", Kt, A.reshape(g, -1, C, C))
        else:                  # K = R * A  ->  G[:, :, a] = sum_q K[a + q] A[q]^T
            Af = A.reshape(g, -1, C, C)
            G = target.new_zeros(g, M, C, *self._r)
            for offset in itertools.product(*(range(r) for r in self._r)):
                window = (Ellipsis,) + tuple(slice(o, o + kp) for o, kp in zip(offset, self._kp))
                Kw = target[window].reshape(g, M, C, -1)
                G[(Ellipsis,) + offset] = torch.einsum("gmcq,gqjc->gmj", Kw, Af)
            G = G.reshape(self.matrix.shape)
        self.matrix.copy_(project_to_stiefel(G).to(self.matrix))

    def _fit(self, target: torch.Tensor, steps: int) -> None:
        cd = self.compute_dtype
        g, M, C = self.groups, self._M, self._C
        t = (target.detach().to(cd) / self.gain).reshape(g, M, C, *self.kernel_size)
        has_blocks = self.proj_a is not None or self.proj_b is not None
        if has_blocks:
            self._reset_blocks_centre()
        self._procrustes(t)
        if not has_blocks or steps == 0:
            return
        params = [p for p in (self.proj_a, self.proj_b, self.matrix) if p is not None]
        norm = float(torch.linalg.vector_norm(t)) ** 2 or 1.0
        opt = torch.optim.Adam(params, lr=self._fit_lr / math.sqrt(max(self._n, 2)))

        def loss_fn():
            return (self._unit_kernel(cd) - t).square().sum() / norm

        with torch.no_grad():
            best = float(loss_fn())
        best_state = [p.detach().clone() for p in params]
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
        with torch.no_grad():
            for p, b in zip(params, best_state):
                p.copy_(b)
        self._procrustes(t)
        for p in params:
            p.grad = None

    @torch.no_grad()
    def _reset_blocks_centre(self) -> None:
        for p in (self.proj_a, self.proj_b):
            if p is not None:
                p.normal_()
        self._pair_blocks()


class OrthogonalConv2d(_OrthogonalConvNd):
    r"""A 2-D convolution that is exactly orthogonal (times ``gain``) for circular padding.

    Signature of ``torch.nn.Conv2d`` (``padding="same"`` and ``padding_mode="circular"`` by default), plus
    ``method`` and the keywords ``gain`` (the kernel is ``gain`` times orthogonal) and ``compute_dtype``
    (float64 by default, see the module docs). For the ``(C, M, k, S)`` per group that P0 Theorem 4 admits, the
    operator on any input grid divisible by the stride is row orthogonal (:math:`M \le C S^2`,
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
    * ``"auto"`` (default): ``"rko"`` when no blocks are needed, else ``"bcop"``.

    Parameters: ``proj_a``, ``proj_b`` (unconstrained ``n x r`` matrices whose column spaces give the
    projectors) and ``matrix`` (unconstrained, made orthonormal by QR). :attr:`weight` rebuilds the explicit
    kernel (differentiable) at every forward; nothing is cached.

    Padding: ``"same"`` pads ``(k_eff - 1) // 2`` on both sides (``k_eff = dilation*(k-1)+1``; PyTorch's
    asymmetric ``'same'`` split for an even ``k_eff`` at stride 1, see :attr:`pads`), so the output grid is
    exactly ``input / stride`` on inputs divisible by the stride; ``"valid"`` or an int as in ``nn.Conv2d``. ``padding_mode="circular"`` makes the layer exactly orthogonal;
    ``padding_mode="zeros"`` is accepted but then the layer is orthogonal only away from the borders (P0
    Proposition 6: with zero padding no kernel with more than its centre tap is orthogonal).
    Dilation: supported at stride 1 (any grid); with stride > 1 a clear error.

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


# ------------------------------------------------------------------------------------------ linear


class OrthogonalLinear(nn.Module):
    r"""A linear layer with orthonormal rows (``out <= in``) or columns (``out > in``), times ``gain``.

    :math:`W = \text{gain} \cdot \operatorname{orthonormal}(V)` with ``V`` an unconstrained ``out x in``
    parameter (``raw_weight``) and :func:`orthonormal` the sign-corrected QR of its tall orientation: cost
    :math:`O(n k^2)` for an ``n x k`` matrix (``n >= k``), so very thin or wide layers are cheap, and
    :math:`O(n^3)` for square ones. Computed in float64 (``compute_dtype``, or float32 on request), then
    rounded to the layer's dtype:
    :math:`\|WW^T - I\|` (or :math:`\|W^TW - I\|`) is at float32 rounding (``< 1e-6``). :attr:`weight` is
    rebuilt at every forward (differentiable, nothing cached).

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
        self.gain = _gain(gain)
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
        """Haar-random orthonormal weight; bias uniform in :math:`\\pm 1/\\sqrt{in}` like nn.Linear."""
        self.raw_weight.normal_()
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            self.bias.uniform_(-bound, bound)

    @property
    def weight(self) -> torch.Tensor:
        """The ``out x in`` weight, ``gain`` times orthonormal rows or columns (differentiable)."""
        W = orthonormal(self.raw_weight.to(self.compute_dtype), tall=self.out_features >= self.in_features)
        W = W * self.gain
        return W.to(self.raw_weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        s += f", case={self.case!r}"
        if self.gain != 1.0:
            s += f", gain={self.gain}"
        return s

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the baked weight (and bias), same outputs, no constraint."""
        ref = self.raw_weight
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=ref.device,
                        dtype=ref.dtype)
        lin.weight.copy_(self.weight)
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def to_plain(self) -> nn.Module:
        """The protocol ``orthofx.freeze`` uses: same as :meth:`to_linear`."""
        return self.to_linear()

    @classmethod
    def from_linear(cls, linear: nn.Linear, init: str = "nearest", *, gain: float = 1.0,
                    compute_dtype=None) -> "OrthogonalLinear":
        r"""The orthogonal layer for an existing ``nn.Linear`` (same shape, bias, device, dtype).

        ``init="nearest"``: the polar factor of ``weight / gain``, the nearest matrix with orthonormal rows or
        columns (exact; an orthonormal weight is returned unchanged). ``init="random"``: Haar-random. The bias is
        copied. ``layer.init_error`` is :math:`\|W - W_0\|_F / \|W_0\|_F`.
        """
        if not isinstance(linear, nn.Linear):
            raise LayerArgumentError(f"{cls.__name__}.from_linear expects a torch.nn.Linear, got "
                                     f"{type(linear).__name__}")
        if init not in ("nearest", "random"):
            raise LayerArgumentError(f"init must be 'nearest' or 'random', got {init!r}")
        w0 = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=w0.device,
                    dtype=w0.dtype, gain=gain, compute_dtype=compute_dtype)
        with torch.no_grad():
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
            if init == "nearest":
                polar = project_to_stiefel(w0.to(layer.compute_dtype) / layer.gain)
                layer.raw_weight.copy_(polar.to(layer.raw_weight))
            t = w0.to(torch.float64)
            layer.init_error = float(torch.linalg.vector_norm(layer.weight.to(torch.float64) - t)
                                     / torch.linalg.vector_norm(t).clamp_min(1e-300))
        return layer
