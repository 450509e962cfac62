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

import math

import torch
import torch.nn.functional as F

from orthofx.theory import _positive_int as _int, orthogonality_case

__all__ = [
    "lorth",
    "conv_singular_values",
    "linear_singular_values",
    "orthogonality_error",
    "spectral_norm_bound",
]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_KIND = {3: "Conv1d", 4: "Conv2d", 5: "Conv3d"}


# ---------------------------------------------------------------------------------------------------- helpers


def _check_tensor(weight, name: str = "weight") -> None:
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.is_complex() or not weight.is_floating_point():
        raise ValueError(f"{name} must be a real floating-point tensor, got dtype {weight.dtype}")


def _check_conv_weight(weight, what: str) -> int:
    """Validates a conv weight; returns the number of spatial dims."""
    _check_tensor(weight)
    if weight.ndim not in _KIND:
        extra = " (a 2-D weight is a Linear layer: use linear_singular_values)" if weight.ndim == 2 else ""
        raise ValueError(
            f"{what} expects a convolution weight of shape (out, in/groups, *kernel) with 3 (Conv1d), "
            f"4 (Conv2d) or 5 (Conv3d) dimensions, got shape {tuple(weight.shape)}{extra}"
        )
    if weight.numel() == 0:
        raise ValueError(f"{what}: the weight is empty, shape {tuple(weight.shape)}")
    return weight.ndim - 2


def _tuple(value, d: int, name: str) -> tuple[int, ...]:
    if isinstance(value, (tuple, list)):
        if len(value) != d:
            raise ValueError(f"{name} must be an int or a tuple of {d} ints for a {d}-D convolution, got {value!r}")
        return tuple(_int(v, name) for v in value)
    return (_int(value, name),) * d


def _groups(weight: torch.Tensor, groups) -> int:
    g = _int(groups, "groups")
    if weight.shape[0] % g:
        raise ValueError(f"groups={g} must divide the number of output channels {weight.shape[0]} "
                         f"(weight shape {tuple(weight.shape)})")
    return g


def _frequency_matrices(weight: torch.Tensor, input_size, stride, groups, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frequency matrices of the (strided, grouped, circular) convolution.

    Returns ``(mats, counts)``: ``mats`` of shape ``(groups, F_1, ..., F_d, M/g, C/g * prod(S))`` (complex, the
    last spatial frequency axis halved by ``rfftn``) and ``counts`` of shape ``(F_d,)``: how many frequencies of
    the full spectrum each entry of the last frequency axis stands for (1 or 2).
    """
    d = weight.ndim - 2
    sizes = _tuple(input_size, d, "input_size")
    strides = _tuple(stride, d, "stride")
    for n, s in zip(sizes, strides):
        if n % s:
            raise ValueError(f"input_size {sizes} must be divisible by the stride {strides} in every dimension "
                             f"(circular strided convolution); {n} is not a multiple of {s}")
    g = _groups(weight, groups)
    M, Cg = weight.shape[:2]
    ks = weight.shape[2:]
    grid = tuple(n // s for n, s in zip(sizes, strides))
    w = weight.detach().to(dtype)
    # zero-pad each spatial dim to a multiple of the stride (F.pad lists the last dim first)
    pad = []
    for k, s in reversed(list(zip(ks, strides))):
        pad += [0, (-k) % s]
    if any(pad):
        w = F.pad(w, pad)
    blocks = tuple(w.shape[2 + i] // strides[i] for i in range(d))
    # space-to-depth: (M, Cg, a_1 S_1, ..., a_d S_d) -> (M, Cg * S_1 ... S_d, a_1, ..., a_d)
    split = [M, Cg]
    for a, s in zip(blocks, strides):
        split += [a, s]
    w = w.reshape(split)
    perm = [0, 1] + [3 + 2 * i for i in range(d)] + [2 + 2 * i for i in range(d)]
    w = w.permute(perm).reshape(M, Cg * math.prod(strides), *blocks)
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
    spatial = tuple(range(2, 2 + d))
    hat = torch.fft.rfftn(w, s=grid, dim=spatial)  # (M, C', F_1, ..., F_d)
    Cp = hat.shape[1]
    hat = hat.reshape(g, M // g, Cp, *hat.shape[2:])
    hat = hat.permute(0, *range(3, 3 + d), 1, 2)  # (g, F..., M/g, C')
    q = grid[-1]
    counts = torch.full((hat.shape[d],), 2, dtype=torch.long)
    counts[0] = 1
    if q % 2 == 0:
        counts[-1] = 1
    return hat, counts


def _batched_svdvals(mats: torch.Tensor, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """svdvals over a batch of matrices ``(B, m, n)``, in chunks to bound the workspace."""
    B = mats.shape[0]
    per = max(1, chunk_elems // max(1, mats.shape[1] * mats.shape[2]))
    if per >= B:
        return torch.linalg.svdvals(mats)
    return torch.cat([torch.linalg.svdvals(mats[i:i + per]) for i in range(0, B, per)])


# ---------------------------------------------------------------------------------------------------- L_orth


def lorth(weight: torch.Tensor, stride=1, groups: int = 1, case: str | None = None, *,
          fast_backward: bool = True) -> torch.Tensor:
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
    In the CO case the value is a difference and can be a rounding error below zero.

    A 2-D weight (``nn.Linear``, ``out x in``) gives :math:`\|W W^T - I\|_F^2` if ``out <= in`` (or
    ``case="RO"``) and :math:`\|W^T W - I\|_F^2` otherwise, which is the 1x1, stride-1 case of the formula above.

    Returns a 0-dim tensor in the weight's dtype and device.

    ``fast_backward`` (default True): :math:`\mathrm{conv}(K, K)` is symmetric under swapping its two arguments
    (with :math:`m_1 \leftrightarrow m_2`, :math:`j \leftrightarrow -j`), so the gradient is twice the gradient
    through the first argument alone; backpropagating through that one argument only gives the exact first
    derivative about 2x faster. Higher derivatives (``create_graph=True``: Hessian-vector products, gradient
    penalties on this loss) are then not those of :math:`L_{orth}`; pass ``fast_backward=False`` for them.

    >>> import torch
    >>> w = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0].reshape(8, 8, 1, 1)
    >>> float(lorth(w)) < 1e-20                      # a 1x1 conv with an orthogonal matrix
    True
    >>> k = torch.zeros(1, 1, 1, 3); k[..., 0] = k[..., 2] = 2 ** -0.5   # x[i] + x[i+2], normalised
    >>> round(float(lorth(k)), 6)                    # the shift-2 correlation, twice (1/2)^2
    0.5
    """
    _check_tensor(weight)
    if case not in (None, "RO", "CO"):
        raise ValueError(f"case must be None, 'RO' or 'CO', got {case!r}")
    if weight.ndim == 2:
        if _int(groups, "groups") != 1:
            raise ValueError("groups must be 1 for a 2-D (Linear) weight")
        if stride != 1:
            raise ValueError(f"stride must be 1 for a 2-D (Linear) weight, got {stride!r}")
        out_f, in_f = weight.shape
        if case is None:
            case = "RO" if out_f <= in_f else "CO"
        gram = weight @ weight.T if case == "RO" else weight.T @ weight
        eye = torch.eye(gram.shape[0], dtype=weight.dtype, device=weight.device)
        return (gram - eye).square().sum()
    d = _check_conv_weight(weight, "lorth")
    strides = _tuple(stride, d, "stride")
    g = _groups(weight, groups)
    M, Cg = weight.shape[:2]
    ks = tuple(weight.shape[2:])
    C = Cg * g
    pads = tuple(((k - 1) // s) * s for k, s in zip(ks, strides))
    if g == 1:
        images = weight
    else:
        # images[m1, (group, c)] = K[group * M/g + m1, c]; the grouped conv then correlates within each group
        images = weight.reshape(g, M // g, Cg, *ks).transpose(0, 1).reshape(M // g, C, *ks)
    filters = weight.detach() if fast_backward else weight
    out = _CONV[d](images, filters, stride=strides, padding=pads, groups=g)  # (M/g, M, J_1, ..., J_d)
    if fast_backward and out.requires_grad:
        out = 2 * out - out.detach()  # same value (exactly), twice the gradient: the filters' share by symmetry
    target = torch.zeros_like(out)
    centre = (slice(None), slice(None)) + tuple(p // s for p, s in zip(pads, strides))
    target[centre] = torch.eye(M // g, dtype=out.dtype, device=out.device).repeat(1, g)
    value = (out - target).square().sum()
    if case is None:
        case = orthogonality_case(C, M, strides, dims=d)
    if case == "CO":
        value = value - (M - C * math.prod(strides))
    return value


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
    by default), one batched ``svdvals``; memory is :math:`O(M C S^d (n/S)^d)` complex numbers.

    ``input_size``: int or tuple of ``d`` ints, each divisible by the stride (``ValueError`` otherwise).
    ``weight``: ``(M, C/groups, k_1, ..., k_d)`` with ``d`` in 1, 2, 3.

    >>> import torch
    >>> k = torch.zeros(4, 1, 2, 2)
    >>> for r in range(2):
    ...     for s in range(2):
    ...         k[2 * r + s, 0, r, s] = 1.0        # space-to-depth: an orthogonal stride-2 conv
    >>> sv = conv_singular_values(k, 8, stride=2)
    >>> sv.shape, bool(torch.allclose(sv, torch.ones(64, dtype=torch.float64)))
    (torch.Size([64]), True)
    """
    _check_conv_weight(weight, "conv_singular_values")
    if not dtype.is_floating_point or dtype.is_complex:
        raise ValueError(f"dtype must be a real floating-point dtype, got {dtype}")
    hat, counts = _frequency_matrices(weight, input_size, stride, groups, dtype)
    m, n = hat.shape[-2:]
    sv = _batched_svdvals(hat.reshape(-1, m, n))  # (B, r)
    sv = sv.reshape(*hat.shape[:-2], sv.shape[-1])
    d = weight.ndim - 2
    reps = counts.to(sv.device).reshape((1,) * d + (-1, 1)).expand(sv.shape).reshape(-1)
    sv = torch.repeat_interleave(sv.reshape(-1), reps)
    return torch.sort(sv, descending=True).values


@torch.no_grad()
def linear_singular_values(weight: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    r"""Singular values (descending) of a 2-D weight ``out x in`` (``nn.Linear``), computed in ``dtype``.

    >>> import torch
    >>> linear_singular_values(torch.diag(torch.tensor([3.0, -1.0])))
    tensor([3., 1.], dtype=torch.float64)
    """
    _check_tensor(weight)
    if weight.ndim != 2:
        raise ValueError(f"linear_singular_values expects a 2-D weight (out, in), got shape {tuple(weight.shape)}"
                         + (" (use conv_singular_values for convolutions)" if weight.ndim in _KIND else ""))
    return torch.linalg.svdvals(weight.detach().to(dtype))


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
    _check_tensor(weight)
    if weight.ndim == 2:
        if stride != 1 or groups != 1:
            raise ValueError("stride and groups must be 1 for a 2-D (Linear) weight")
        sv = linear_singular_values(weight)
    else:
        _check_conv_weight(weight, "orthogonality_error")
        if input_size is None:
            raise ValueError("orthogonality_error needs input_size (the spatial size of the layer's input) "
                             "for a convolution weight: its singular values depend on the grid")
        sv = conv_singular_values(weight, input_size, stride=stride, groups=groups)
    return float((sv - 1).abs().max())


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
    bound_log = (log_scale + torch.log(final)) / (2 ** iterations)
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
    _check_tensor(weight)
    iterations = int(iterations)
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if weight.ndim == 2:
        if stride != 1 or groups != 1:
            raise ValueError("stride and groups must be 1 for a 2-D (Linear) weight")
        mats = weight.detach().to(torch.float64)[None]
    else:
        _check_conv_weight(weight, "spectral_norm_bound")
        if input_size is None:
            raise ValueError("spectral_norm_bound needs input_size (the spatial size of the layer's input) "
                             "for a convolution weight")
        hat, _ = _frequency_matrices(weight, input_size, stride, groups, torch.float64)
        mats = hat.reshape(-1, *hat.shape[-2:])
    return _gram_bound(mats, iterations)
