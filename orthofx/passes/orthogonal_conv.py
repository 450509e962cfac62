"""Pass ``orthogonal_conv``: replace convolutions and linears by exactly orthogonal layers.

Each selected ``Conv1d`` / ``Conv2d`` / ``Conv3d`` becomes :class:`orthofx.nn.orthogonal.OrthogonalConv1d` /
``2d`` / ``3d``, each ``ConvTranspose1d`` / ``2d`` / ``3d`` :class:`orthofx.nn.orthogonal.OrthogonalConvTranspose1d` /
``2d`` / ``3d`` (the adjoint of the orthogonal conv ``out -> in``; it exists iff that conv does, and it is built only
where the layer's output size is ``input * stride``, which holds for the usual decoder layers such as ``k = 4,
S = 2, p = 1`` or ``k = S, p = 0``) and each ``Linear`` :class:`orthofx.nn.orthogonal.OrthogonalLinear`, under the
same qualified name (the graph is unchanged; state_dict keys change to the new layer's parameters). Where P0's Theorem 4 admits no orthogonal
convolution (e.g. the ResNet strided shortcut, (M, C, k, S) = (2C, C, 1, 2)), ``on_impossible`` decides:
``error`` raises :class:`orthofx.ImpossibleLayerError` quoting the theorem's condition with the layer's numbers,
``skip`` leaves the layer as it is, ``regularize`` attaches P0's L_orth instead (weight ``regularize_weight``).
So does a layer whose orthogonal versions are finitely many fixed signed shifts, none of which trains: one input and
one output channel per group (a depthwise conv such as ConvNeXt's 7x7, or a 1 -> 1 conv) whose taps read only one
input per stride window, ``prod_i min(k_i, S_i / gcd(D_i, S_i)) = 1`` (every stride-1 one; a strided one
with ``k = 1`` or a dilation that is a multiple of the stride, e.g. ``k = 2, S = 2, D = 2``), where an exactly
orthogonal kernel is a single tap of +-1 (the status reads ``regularised (no trainable orthogonal version)`` under
``on_impossible: regularize``). Strided ones whose taps read two or more inputs per window (that product ``>= 2``:
e.g. ``k = 3, S = 2`` or ``k = 2, S = 3``, undilated) train and are replaced. Build
:class:`~orthofx.nn.orthogonal.OrthogonalConv2d` directly for such a fixed shift.

Parameters:

* ``method``: ``auto`` (the cheapest exact construction), ``bcop`` (projector blocks + reshaped kernel), ``rko``
  (reshaped kernel only, exact when ``k <= S / gcd(D, S)``, ``D`` the dilation) or ``cayley_fft`` (Trockman &
  Kolter's Cayley transform per spatial frequency, for the input size the layer sees on the example inputs:
  ``transform`` needs ``example_inputs``, and the rewritten layer accepts that size only). ``auto`` never picks
  ``cayley_fft``.
  ``cayley_fft``'s effective kernel is full size, so it also exists where Theorem 4 admits no ``k x k``
  orthogonal kernel (e.g. the strided 1x1 shortcut): there it replaces the layer instead of ``on_impossible``.
  It needs ``padding: circular`` and no dilation. Cost: a batched ``N x N`` complex solve per frequency
  (``N = max(M, C S^d)``) at every training step: cheaper than ``bcop`` on a GPU for ``N <= 64``, much dearer on
  CPUs and for wide layers on large grids (figures in :mod:`orthofx.nn.orthogonal`, item 6); it freezes into a
  Fourier-domain ``FourierConv``.
* ``padding``: ``circular`` (exactly orthogonal, output size ``n / S``; allowed only where it keeps the layer's
  output size, which holds for the usual ``k // 2`` padding) or ``keep`` (the layer's own zero padding: orthogonal
  only away from the borders, P0 Proposition 6; the report says so, except for layers whose windows never read
  the padding, such as 1x1 convs, which are exactly orthogonal and reported ``hard``, and for RO layers with no
  padding, whose outputs are rows of the circular layer, orthonormal, reported ``hard (rows orthonormal ...)``).
* ``init``: ``nearest`` starts from the orthogonal layer closest to the original weights (exact for linears,
  1x1 and ``k <= S`` kernels; for larger kernels a closed-form Procrustes start, at stride 1 with more output
  than input channels followed by one sweep of block-by-block optimisation so that the kernel uses all its taps, refined by
  ``fit_steps`` Adam steps, about 10 ms each on CPU) so a trained model changes least; ``random`` starts
  Haar-random. The Change records the kernel's relative distance (``init_error``) and, with example inputs, the
  relative change of the layer's output on them (``output_change``); each is ``None`` where it is undefined (a
  zero original weight or output, or one with NaN or inf entries). ``nearest`` refuses a weight with NaN or inf
  entries (no orthogonal layer is nearest to it): use ``random`` there.
* ``gain``: the layer is ``gain`` times orthogonal.
* ``frozen``: ``skip`` (default) leaves a layer whose weight has ``requires_grad=False`` as it is (``explain``
  and ``report`` show ``skipped: frozen ...``; a later rule of the ``weight`` group may take it), ``overwrite``
  replaces it anyway (the orthogonal layer's parameters stay frozen). A frozen weight is usually a pretrained one
  kept fixed on purpose: its replacement, the nearest orthogonal layer, computes another function that training
  would never correct, as ``isometric_init`` and ``riemannian`` leave such weights alone too. A frozen bias alone
  does not count (it is copied as it is).

Example::

    import orthofx
    model = orthofx.models.get("small_cnn")
    gm = orthofx.transform(model, {"rules": [{"match": {"type": "Conv2d"}, "apply": "orthogonal_conv",
                                              "with": {"on_impossible": "regularize"}}]})
    print(orthofx.report(gm))       # each conv: hard (orthogonal), or regularised and why
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from .. import theory
from ..errors import ImpossibleLayerError, OrthofxWarning, PlanError, TransformError, caller_stacklevel, first_few
from ..nn.convnorm import FROZEN_FILTERS_MARKER
from ..nn.orthogonal import (OrthogonalConv1d, OrthogonalConv2d, OrthogonalConv3d, OrthogonalConvTranspose1d,
                              OrthogonalConvTranspose2d, OrthogonalConvTranspose3d, OrthogonalLinear,
                              build_stride, circular_alignment, keeps_output_size, rko_problem,
                              transposed_alignment, transposed_keeps_output_size, transposed_size_keeping_padding)
from ..nn.padding import (conv_mode_pads, conv_output_length, conv_zero_pads, one_element_same_dilation,
                          per_dimension, sizes_per_dimension, stale_mode_pads)
from ..nn.precision import describe_nonfinite, relative_distance
from .base import (TORCH_CONV_TYPES, TORCH_TRANSPOSED_CONV_TYPES, Change, EvalRun, Param, Pass, PassContext, PlanEntry,
                   check_scale_range, derived_weight, describe_module, is_uninitialised, parameter_owners,
                   per_dimension_text, require_initialised)
from .isometric_init import frozen_reason
from .orth_regularizer import lorth_term
from .registry import register_pass

__all__ = ["OrthogonalConvPass", "keeps_output_size", "orthogonal_layer"]

_ORTHOGONAL_TRANSPOSED = {1: OrthogonalConvTranspose1d, 2: OrthogonalConvTranspose2d, 3: OrthogonalConvTranspose3d}


def orthogonal_layer(module: nn.Module, *, init: str = "nearest", method: str = "auto", padding: str = "circular",
                     gain: float = 1.0, fit_steps: int = 0, input_size=None) -> nn.Module:
    """The exactly orthogonal replacement of a ``Linear`` / ``Conv1d`` / ``Conv2d`` / ``Conv3d`` /
    ``ConvTranspose1d`` / ``2d`` / ``3d`` (subclasses included):
    ``padding="circular"`` gives the circular layer with the conv's window alignment (its own padding where
    that keeps the output size ``n / S``, else ``"same"``; see :func:`orthofx.nn.orthogonal.circular_alignment`;
    a transposed conv's own padding and output_padding where its output is ``n * S``,
    :func:`orthofx.nn.orthogonal.transposed_alignment`), ``"keep"`` the conv's own zero or circular padding, or
    none where a reflect / replicate conv pads nothing (not for transposed convs); ``input_size`` (spatial) is
    needed by ``method="cayley_fft"`` only."""
    if isinstance(module, nn.Linear):
        return OrthogonalLinear.from_linear(module, init=init, gain=gain)
    if isinstance(module, TORCH_TRANSPOSED_CONV_TYPES):
        cls = _ORTHOGONAL_TRANSPOSED[module.weight.dim() - 2]
        layer_padding, output_padding = transposed_alignment(module)
        return cls.from_conv_transpose(module, init=init, method=method, padding=layer_padding,
                                       output_padding=output_padding, gain=gain, fit_steps=fit_steps)
    cls = {1: OrthogonalConv1d, 2: OrthogonalConv2d, 3: OrthogonalConv3d}[module.weight.dim() - 2]
    layer_padding, padding_mode = "keep", "circular"
    if padding == "circular":
        layer_padding = "same" if method == "cayley_fft" else circular_alignment(module)
    elif module.padding_mode not in ("zeros", "circular") and not _reads_padding(module):
        # a reflect / replicate conv that pads nothing: its boundary is the zero one (no padding at all)
        layer_padding, padding_mode = module.padding, "zeros"
    return cls.from_conv(module, init=init, method=method, padding=layer_padding, padding_mode=padding_mode,
                         gain=gain, fit_steps=fit_steps,
                         input_size=input_size if method == "cayley_fft" else None)


class _Problem(str):
    """The text of why a layer is not replaced (:func:`_impossibility`), which ``apply`` records and planning shows,
    carrying ``status``: its short form in the report's ``regularised (...)`` status. Only a layer P0 Theorem 4 rules
    out reads ``no orthogonal version`` there; one refused for its padding, output size or the method's limits reads
    ``not built: <short reason>`` (an orthogonal version exists, which the report's ``exists`` column shows)."""

    status: str

    def __new__(cls, text: str, status: str):
        problem = super().__new__(cls, text)
        problem.status = status
        return problem

    def __getnewargs__(self) -> tuple[str, str]:  # copy and pickle rebuild it with both arguments
        return str(self), self.status


#: The report's status reason for a layer P0 Theorem 4 rules out (no orthogonal convolution of its shape exists)
_NO_ORTHOGONAL_VERSION = "no orthogonal version"


def _status_reason(problem: str) -> str:
    """The short form of ``problem`` (from :func:`_impossibility`) in the report's ``regularised (...)`` status."""
    if problem.startswith(_FIXED_SHIFT):
        return "no trainable orthogonal version"
    return getattr(problem, "status", "not built")


def _impossibility(conv: nn.Module, padding: str, method: str = "auto", input_size=None) -> str | None:
    """Why no exactly orthogonal replacement is possible for ``conv`` (``None`` when one is), or none that trains
    (:func:`_fixed_shift_problem`); for ``method="cayley_fft"`` the spatial ``input_size`` the layer sees (its
    effective kernel is that large)."""
    dims = conv.weight.dim() - 2
    if isinstance(conv, TORCH_TRANSPOSED_CONV_TYPES):
        return _transposed_impossibility(conv, padding, method)
    # torch's layer pads one dimension of its "same": no orthogonal layer (circular or kept padding, which pads
    # all or none) has its output size; the replacement failed in the example run with a broadcast RuntimeError
    one_dimension = one_element_same_dilation(conv)
    if one_dimension is not None:
        return _Problem(one_dimension, "not built: padding")
    # the replacement is built from conv.padding; torch's layer pads by its constructor's list (another output size)
    stale = stale_mode_pads(conv)
    if stale is not None:
        return _Problem(stale, "not built: padding")
    if method == "cayley_fft":
        return _cayley_problem(conv, input_size)
    exists, _, reason = theory.orthogonal_conv_exists(conv.in_channels, conv.out_channels, conv.kernel_size,
                                                      conv.stride, dims=dims, groups=conv.groups,
                                                      dilation=conv.dilation)
    if not exists:
        return _Problem(f"no orthogonal convolution exists (P0 Theorem 4): {reason}", _NO_ORTHOGONAL_VERSION)
    fixed = _fixed_shift_problem(conv)
    if fixed is not None:
        return fixed
    rko_miss = _rko_impossibility(conv, method)
    if rko_miss is not None:
        return rko_miss
    if padding == "circular" and not keeps_output_size(conv):
        return _Problem(f"padding={conv.padding} gives another output size than the circular 'same' padding an "
                       "exactly orthogonal layer needs; use 'padding: keep' (orthogonal away from the borders)",
                       "not built: output size")
    return None


def _cayley_problem(conv: nn.Module, input_size=None) -> str | None:
    """:func:`_impossibility` for ``method: cayley_fft`` on a conv (not transposed): why it cannot be built, or
    ``None``. The checks on the layer alone come first and run without ``input_size`` (planning, before the example
    run: explain and the ``on_impossible: error`` refusal see them); those on the spatial ``input_size`` (the
    example's, known in ``apply``) run only when it is given."""
    if any(d > 1 for d in conv.dilation):
        return _Problem(f"dilation={conv.dilation}: method cayley_fft builds a full-size kernel, which has no "
                       "dilation; use method bcop (explicit dilated kernels)", "not built: dilation, cayley_fft")
    if not keeps_output_size(conv):
        return _Problem(f"padding={conv.padding} gives another output size than the circular 'same' padding of an "
                       "exactly orthogonal layer", "not built: output size")
    if input_size is None:
        return None
    # torch applies a one-element stride=(2,) to every dimension: zipped as it is, it checked one only
    stride = per_dimension(conv.stride, conv.weight.dim() - 2, "stride")
    if any(n % s for n, s in zip(input_size, stride)):
        return _Problem(f"the input size {tuple(input_size)} is not divisible by stride={stride}, which method "
                       "cayley_fft needs (space-to-depth blocks)", "not built: input size, cayley_fft")
    if any(-(-k // s) > n // s for k, s, n in zip(conv.kernel_size, stride, input_size)):
        return _Problem(f"kernel_size={conv.kernel_size} does not fit the input size {tuple(input_size)}, the grid "
                       "method cayley_fft builds its kernel on; use method auto (explicit kernels, circular on any "
                       "input size)", "not built: input size, cayley_fft")
    return None


def _rko_impossibility(conv: nn.Module, method: str) -> str | None:
    """Why ``method: rko`` cannot build ``conv`` (a conv or a transposed conv: the same kernel condition), or
    ``None`` (another method, or one rko builds)."""
    miss = rko_problem(conv.kernel_size, conv.stride, conv.dilation) if method == "rko" else None
    if miss is None:
        return None
    return _Problem(f"method rko (the reshaped kernel only) is exact only when {miss}; use method auto or bcop for "
                    "this layer", "not built: method rko")


#: How the problem text of a layer whose orthogonal versions cannot train (:func:`_fixed_shift_problem`) begins:
#: the report's status and the error's remedies tell it from the other problems by it
_FIXED_SHIFT = "no trainable orthogonal convolution exists"


def _fixed_shift_problem(conv: nn.Module) -> str | None:
    r"""Why ``conv`` (a conv or a transposed conv that Theorem 4 admits, not ``cayley_fft``) has no *trainable*
    orthogonal version, or ``None``.

    With one input and one output channel per group (a depthwise conv, ``in = out = groups``, or a 1 -> 1 conv)
    every channel has its own scalar kernel. When its taps read one residue mod the stride in every dimension,
    :math:`r_i = \min(k_i, S_i / \gcd(D_i, S_i)) = 1` (every stride-1 conv, whatever its k and dilation; a strided
    one with k = 1 or a dilation that is a multiple of the stride), the circular operator is a selection of inputs
    followed by a stride-1 scalar filter ``h``, orthogonal iff :math:`|\hat h(\omega)| = 1` at every frequency:
    :math:`h(z)\,h(z^{-1}) = 1`, which among Laurent polynomials only :math:`\pm z^j` satisfy. So the orthogonal
    layers are finitely many signed shifts; ``OrthogonalConv{d}d`` builds one, whose only parameter, a 1 x 1
    ``matrix`` orthonormalised to its sign, never gets a gradient: the pass swapped the user's trainable filter for a
    fixed shift, silently (the layer class, built directly, still does so on purpose). With :math:`\prod_i r_i \ge 2`
    the reshaped kernel is a unit vector over those taps (a sphere) and the layer trains; so does ``method: cayley_fft``
    (its full-size kernel is any all-pass filter), which :func:`_impossibility` checks before this."""
    if conv.in_channels != conv.groups or conv.out_channels != conv.groups:
        return None
    kernel = tuple(conv.kernel_size)
    stride, dilation = sizes_per_dimension(kernel, stride=conv.stride, dilation=conv.dilation)
    reads = tuple(min(k, b) for k, b in zip(kernel, build_stride(kernel, stride, dilation)))
    if math.prod(reads) > 1:
        return None
    what = "depthwise" if conv.groups > 1 else "a single channel"
    if all(s == 1 for s in stride):
        where = "at stride 1"
    else:
        where = (f"whose taps read one input per window (r=min(k, S/gcd(D, S))={reads} with stride={stride}, "
                 f"dilation={dilation})")
    return (f"{_FIXED_SHIFT}: one input and one output channel per group (in={conv.in_channels}, "
            f"out={conv.out_channels}, groups={conv.groups}: {what}) {where}, kernel_size={kernel}: an exactly "
            "orthogonal kernel is then a single tap of +-1 (a circular all-pass filter of finite support), so the "
            "orthogonal layers are a finite set of fixed signed shifts of each channel, none of which trains")


def _fixed_shift_remedies(entry: PlanEntry, module: nn.Module) -> str:
    """What the error of a :func:`_fixed_shift_problem` layer adds to the usual remedies: how to leave such layers
    out of the rule, and how to have the fixed shift (or a trainable exact layer) anyway."""
    dims = module.weight.dim() - 2
    transposed = isinstance(module, TORCH_TRANSPOSED_CONV_TYPES)
    layer = f"OrthogonalConv{'Transpose' if transposed else ''}{dims}d"
    leave_out = ("'where: {groups: 1}' in its match leaves every grouped conv out (also those that train as hard "
                 "layers: strided depthwise convs, several channels per group), 'exclude: "
                 f"[\"{entry.site.name}\"]' this one" if module.groups > 1
                 else f"'exclude: [\"{entry.site.name}\"]' in its match leaves it out")
    example = (f"'where: {{groups: {module.groups}}}'" if module.groups > 1 else f"'name: \"{entry.site.name}\"'")
    # cayley_fft builds no dilated kernel, and its kernel must fit the input (known at apply only): named where it can
    cayley = "" if transposed or any(d > 1 for d in module.dilation) else (
        "; method 'cayley_fft' builds a trainable exactly orthogonal layer instead (a full-size kernel, any all-pass "
        "filter; for the example input's size only, which must be at least the kernel's), in a rule of its own for "
        f"these layers (e.g. a match with {example}) so that the others keep their method")
    return f" ({leave_out}). To have the fixed signed shift anyway, build orthofx.nn.{layer} directly{cayley}"


def _transposed_impossibility(conv: nn.Module, padding: str, method: str) -> str | None:
    """:func:`_impossibility` for a ``ConvTranspose{d}d``: its orthogonal version is the adjoint of the circular
    orthogonal conv ``out -> in`` (same kernel, stride, dilation, groups), which exists iff that conv does."""
    if method == "cayley_fft":
        return _Problem("method cayley_fft has no transposed version (its operator lives on one input grid); use "
                        "method auto, bcop or rko for transposed convolutions", "not built: transposed, cayley_fft")
    if padding == "keep":
        return _Problem("'padding: keep' is not available for transposed convolutions: their orthogonal version is "
                        "the adjoint of a circular conv only; use 'padding: circular'", "not built: padding keep")
    exists, _, reason = theory.orthogonal_conv_exists(conv.out_channels, conv.in_channels, conv.kernel_size,
                                                      conv.stride, dims=conv.weight.dim() - 2, groups=conv.groups,
                                                      dilation=conv.dilation)
    if not exists:
        return _Problem(f"no orthogonal transposed convolution exists: it is the adjoint of the convolution "
                        f"{conv.out_channels} -> {conv.in_channels} channels, and for that one (P0 Theorem 4) "
                        f"{reason}", _NO_ORTHOGONAL_VERSION)
    fixed = _fixed_shift_problem(conv)  # the adjoint of a signed shift is one
    if fixed is not None:
        return fixed
    rko_miss = _rko_impossibility(conv, method)
    if rko_miss is not None:
        return rko_miss
    if not transposed_keeps_output_size(conv.padding, conv.output_padding, conv.kernel_size, conv.stride,
                                        conv.dilation):
        return _Problem(f"padding={conv.padding}, output_padding={conv.output_padding} give another output size "
                        f"than input * stride, the size of an exactly orthogonal transposed convolution; "
                        f"{_size_keeping_fix(conv)}", "not built: output size")
    return None


def _size_keeping_fix(conv: nn.Module) -> str:
    """The ``padding`` / ``output_padding`` that give ``conv`` (a ``ConvTranspose{d}d``) the output size
    ``input * stride`` for its own kernel_size, stride and dilation
    (:func:`orthofx.nn.orthogonal.transposed_size_keeping_padding`), or why none does."""
    what = f"kernel_size={conv.kernel_size}, stride={conv.stride}, dilation={conv.dilation}"
    fix = transposed_size_keeping_padding(conv.kernel_size, conv.stride, conv.dilation)
    if fix is None:
        return (f"no padding and output_padding (0 <= output_padding < stride) give it with {what}: "
                f"2*padding = dilation*(kernel_size-1) + 1 - stride + output_padding needs dilation*(kernel_size-1) "
                f"even at stride 1 (e.g. an odd kernel_size)")
    padding, output_padding = fix
    return f"with {what} use padding={padding}, output_padding={output_padding}"


def _hard_status(original: nn.Module, padding: str) -> str:
    """The report's status of a replaced layer: exactly orthogonal, or where its boundary makes it not so
    (``padding``: the rule's parameter; 'circular' builds the exact boundary, 'keep' the conv's own)."""
    if isinstance(original, nn.Linear) or padding == "circular":
        return "hard"
    # a conv that adds no padding is the same layer under either padding_mode
    if not _reads_padding(original):
        if keeps_output_size(original):
            # no window reaches past the grid (d(k-1) < S: a 1x1 conv, a k = S patch embedding), so on a grid
            # divisible by the stride the layer is the circular one, exactly orthogonal
            return "hard"
        # the kernel size gives the dimensions: a one-element stride=(2,) applies to every one of them
        if theory.orthogonality_case(original.in_channels, original.out_channels, original.stride,
                                     dims=len(original.kernel_size)) == "RO":
            # the outputs are the circular layer's whose windows do not wrap, a subset of its rows, which are
            # orthonormal in the RO case (theory: 'valid' padding, RO as for circular)
            return "hard (rows orthonormal: no padding, the outputs at the borders are dropped)"
    if original.padding_mode != "circular":
        return "hard (zero padding: not at borders)"
    if keeps_output_size(original):
        return "hard"
    return (f"orthogonal kernel, not an orthogonal layer: the conv's circular padding={original.padding} changes "
            "the output size (use 'padding: circular')")


_ORTHOGONAL_CONVS = (OrthogonalConv1d, OrthogonalConv2d, OrthogonalConv3d)


def orthogonal_on_grid(layer: nn.Module, size) -> bool:
    r"""Whether ``layer``, an explicit-kernel orthogonal conv (:class:`~orthofx.nn.orthogonal.OrthogonalConv2d`
    ..., not ``cayley_fft``) with circular padding or none, is orthogonal on inputs of spatial ``size``, which
    need not be divisible by its stride.

    Its kernel is :math:`K = R \star A` (:mod:`orthofx.nn.orthogonal`, items 4 and 5): ``A`` at stride 1, whose
    circular operator is orthogonal on every grid, then ``R``, ``t = min(k, S')`` taps per dimension
    (``S' = S / gcd(D, S)``) at stride ``S`` and dilation ``D``, a matrix ``W`` with orthonormal rows (RO) or
    columns (CO) applied to what its taps read. Output ``j`` (``m = floor((n + l + r - D(k - 1) - 1) / S) + 1``
    of them per dimension, ``(l, r)`` the layer's pads, which wrap around) reads ``A``'s output at
    ``(j S - l + u D) mod n``, ``u < t``. So the operator is orthogonal iff, in every dimension, the map
    ``(j, u) -> position`` is one-to-one (RO: no position read twice, :math:`JJ^T = I`), and for CO also onto
    (every position read exactly once, :math:`J^TJ = I`). On a grid divisible by the stride it is a bijection.
    On others it holds for some layers (an RO 1x1 or ``k = S`` conv, which leaves the last positions unread;
    ``k = 4, S = 2, p = 1``) and fails for others (``k = 3, S = 2, p = 1`` on 7 reads position 6 twice: the first
    window wraps around to it): then :math:`JJ^T \ne I` for every kernel but degenerate ones (``W`` reading one tap
    only), so such a layer is not orthogonal there.

    The answer is the generic one, decided from the layer's geometry (kernel size, stride, dilation, pads, case),
    not from its current weights: a layer set by hand to such a degenerate kernel (``W`` with zeros on every tap but
    one, so that the position read twice is read through a zero) can be orthogonal on a grid where this says
    ``False``. Training from a random or nearest initialisation does not reach those kernels.

    >>> from orthofx.nn import OrthogonalConv1d
    >>> orthogonal_on_grid(OrthogonalConv1d(4, 8, 3, stride=2, padding=1), (7,))
    False
    >>> orthogonal_on_grid(OrthogonalConv1d(4, 8, 4, stride=2, padding=1), (7,))
    True
    """
    built = build_stride(layer.kernel_size, layer.stride, layer.dilation)
    onto = layer.case == "CO"
    for n, (left, right), k, s, d, b in zip(size, layer.pads, layer.kernel_size, layer.stride, layer.dilation,
                                            built):
        outputs = conv_output_length(n, (left, right), k, s, d)
        read = [(j * s - left + u * d) % n for j in range(outputs) for u in range(min(k, b))]
        if len(set(read)) < len(read) or (onto and len(read) != n):
            return False
    return True


def example_sizes(manifest, name: str, dims: int) -> list[tuple[int, ...]]:
    """The distinct spatial sizes (the last ``dims`` entries of each input shape) of the calls of module site
    ``name`` on the example run, in the order first seen: every call's (``manifest.all_input_shapes``), or the first
    call's where the manifest holds only that (``manifest.input_shapes``); shapes with fewer than ``dims + 1``
    entries are left out; none for ``dims = 0`` (a linear: no spatial size, and ``shape[-0:]`` is the whole shape)."""
    if dims <= 0:
        return []
    shapes = manifest.all_input_shapes.get(name) or (
        [manifest.input_shapes[name]] if name in manifest.input_shapes else [])
    sizes: list[tuple[int, ...]] = []
    for shape in shapes:
        size = tuple(int(n) for n in shape[-dims:])
        if len(shape) >= dims + 1 and size not in sizes:
            sizes.append(size)
    return sizes


def _not_orthogonal_on(layer: nn.Module, sizes: list[tuple[int, ...]], status: str) -> list[tuple[int, ...]]:
    """The spatial sizes among ``sizes`` (the site's inputs on the example run, :func:`example_sizes`) where
    ``layer``, just built with ``status``, is not orthogonal though the status says it is
    (:func:`orthogonal_on_grid`: a size not divisible by the stride); none for sizes divisible by the stride or
    where the layer is orthogonal anyway, and none at all for a status that claims less (zero padding: not at the
    borders whatever the size; a kernel whose padding changes the output size), a ``cayley_fft`` layer (built for
    one size, which it checks at every call), a transposed conv (the adjoint of the conv on the grid
    ``input * stride``, divisible by it: orthogonal on every input size) or a linear."""
    if not status.startswith("hard") or not isinstance(layer, _ORTHOGONAL_CONVS) or layer.method == "cayley_fft":
        return []
    if layer.padding_mode != "circular" and any(left or right for left, right in layer.pads):
        return []
    return [size for size in sizes
            if not all(n % s == 0 for n, s in zip(size, layer.stride)) and not orthogonal_on_grid(layer, size)]


def grid_text(size) -> str:
    """An input's spatial size in words: ``length-7`` for a 1-D one, ``7x7`` / ``7x7x7`` otherwise."""
    size = tuple(size)
    return f"length-{size[0]}" if len(size) == 1 else "x".join(map(str, size))


def grids_text(sizes) -> str:
    """``7x7 input``, ``7x7 and 5x5 inputs``, ``length-7, length-5 and length-3 inputs``."""
    words = [grid_text(size) for size in sizes]
    if len(words) == 1:
        return f"{words[0]} input"
    return f"{', '.join(words[:-1])} and {words[-1]} inputs"


def _off_grid_status(status: str, sizes: list[tuple[int, ...]], stride) -> str:
    """The status of a layer whose example input grids ``sizes`` are ones it is not orthogonal on
    (:func:`_not_orthogonal_on`): its kernel is the hard one, the operator on those inputs is not orthogonal."""
    return (f"hard kernel{status[len('hard'):]}; not orthogonal on the example's {grids_text(sizes)}: "
            f"not divisible by stride {per_dimension_text(stride)}")


def _warn_off_grid(pass_name: str, layers: list[str], two_d: bool) -> None:
    """One :class:`~orthofx.errors.OrthofxWarning` for the layers (``"site (7x7 input, stride 2)"``) that
    :func:`_not_orthogonal_on` found on the example inputs, with the remedy (with a ResNet's image sizes as the
    example where some of them are 2-D: ``two_d``); ``pass_name`` starts the message."""
    if not layers:
        return
    example = (" (e.g. 32x32 rather than 28x28 for a ResNet whose stride-2 stages see 28, 14 and 7)" if two_d
               else "")
    warnings.warn(
        f"{pass_name}: {first_few(layers, 4)}: not orthogonal on the example inputs, whose size there is not "
        "divisible by the layer's stride: the exactly orthogonal construction (P0) is exact on grids divisible by "
        "the stride only (orthofx.report gives the singular values of the operator on that input). Use inputs "
        f"whose size is divisible by the stride at every such layer{example}, or pad the inputs to such a size",
        OrthofxWarning, stacklevel=caller_stacklevel())


class OffGridLayers:
    """The hard layers one pass built that the example run gave inputs they are not orthogonal on (sizes not
    divisible by the stride, :func:`_not_orthogonal_on`), shared by every pass that builds hard layers
    (``orthogonal_conv``; ``pre_svd`` with ``weight: orthogonal``) so that their Changes say the same and the
    report reads the same keys. :meth:`mark` each layer as it is built, then :meth:`warn` once for all of them."""

    def __init__(self, pass_name: str):
        self.pass_name = pass_name
        self.layers: list[str] = []  # "'site' (7x7 input, stride 2)", for the warning
        self.dims: set[int] = set()  # their spatial dimensions (the warning's example fits 2-D layers)

    def mark(self, manifest, site: str, layer: nn.Module, status: str, after: dict) -> str:
        """The status of ``layer``, built at ``site`` with ``status``: where the example run called the site on
        sizes the layer is not orthogonal on, one naming them, with ``after["not_orthogonal_on"]`` (the first
        such spatial size) and ``after["not_orthogonal_on_sizes"]`` (all of them) set for the report; else
        ``status`` unchanged."""
        dims = len(getattr(layer, "kernel_size", ()))
        sizes = _not_orthogonal_on(layer, example_sizes(manifest, site, dims), status)
        if not sizes:
            return status
        after["not_orthogonal_on"] = sizes[0]
        after["not_orthogonal_on_sizes"] = sizes
        self.layers.append(f"'{site}' ({grids_text(sizes)}, stride {per_dimension_text(layer.stride)})")
        self.dims.add(dims)
        return _off_grid_status(status, sizes, layer.stride)

    def warn(self) -> None:
        """The one warning for every layer :meth:`mark` found (none where it found none)."""
        _warn_off_grid(self.pass_name, self.layers, 2 in self.dims)


def _reads_padding(conv: nn.Module) -> bool:
    """Whether ``conv``'s own padding adds any entry (``"same"`` with a 1 x 1 extent and ``"valid"`` add none; in a
    non-zeros padding mode torch's explicit pads, :func:`~orthofx.nn.padding.conv_mode_pads`, which are the zero
    ones but for ``"same"`` with a one-element dilation)."""
    pads = (conv_zero_pads if conv.padding_mode == "zeros" else conv_mode_pads)(conv.padding, conv.kernel_size,
                                                                                conv.dilation)
    return any(side > 0 for pair in pads for side in pair)


def _require_finite(entry: PlanEntry, module: nn.Module) -> None:
    """Refuse ``init: nearest`` for a layer whose weight holds NaN or inf: no orthogonal layer is nearest to it
    (the layer constructors refuse it too, without the site; a start reading only the centre taps went through
    and reported ``init_error`` NaN)."""
    nonfinite = describe_nonfinite(module.weight.detach())
    if nonfinite is None:
        return
    raise TransformError(
        f"rule '{entry.rule_name}': {entry.site.name} ({describe_module(module)}): its weight has {nonfinite}, "
        "so there is no nearest orthogonal layer to start from (init: nearest). "
        "Load finite weights (a diverged or corrupted checkpoint?), or set 'init: random' in the rule's 'with:'")


def _configuration(module: nn.Module) -> tuple:
    """What must agree for two layers with one tied weight to share one orthogonal replacement."""
    attrs = ("in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride", "padding",
             "output_padding", "dilation", "groups", "padding_mode")
    return (type(module),) + tuple(getattr(module, a, None) for a in attrs)


def _outcome(problem: str, action: str) -> str:
    """What ``explain`` shows for a layer ``apply`` will not replace because of ``problem`` (``on_impossible``)."""
    if action == "error":
        return f"fails: {problem} (on_impossible: error)"
    return f"{'left unchanged' if action == 'skip' else 'L_orth instead'}: {problem} (on_impossible: {action})"


def _shape_problem(module: nn.Module, params: dict) -> str | None:
    """Why ``apply`` will not replace ``module`` by its shape alone (P0 Theorem 4, the method, the padding), or
    ``None``: what planning can tell before the example run (cayley_fft's checks on the input size wait for it,
    :func:`_cayley_problem`; a Linear always has an orthogonal version; a lazy layer has no shape yet). ``apply``
    asks the same :func:`_impossibility`, so both give one text."""
    if isinstance(module, nn.Linear) or is_uninitialised(module) or getattr(module, "weight", None) is None \
            or module.weight.dim() < 3:
        return None
    return _impossibility(module, params["padding"], params["method"])


def _kept_layer(module: nn.Module | None) -> tuple[str, str] | None:
    """Why ``module`` must stay the layer it is (problem, short form), which planning lets through only for
    ``on_impossible: regularize`` (L_orth reads the weight): a weight or bias a parametrization or hook computes
    (:func:`derived_weight`; replacing the layer would drop it), or the conv of a frozen ConvNorm layer, which calls
    it with its own conv code and padding (an orthogonal layer there failed in the example run with an
    AttributeError)."""
    if module is None:
        return None
    computed = derived_weight(module)
    if computed is not None:
        return f"{computed}; replacing the layer would drop it", "computed weight"
    # the orthogonal layer copies the bias as a free parameter: a bias parametrization was dropped silently (the
    # row said 'hard'), and pruning's bias pre-hook, moved to the new layer, failed on it
    computed = derived_weight(module, "bias")
    if computed is not None:
        return f"{computed}; replacing the layer would drop it", "computed bias"
    if getattr(module, FROZEN_FILTERS_MARKER, False):
        return ("the conv of a frozen ConvNorm layer, which calls it with its own padding and baked filters: "
                "replacing it would break that layer; transform the model before orthofx.freeze"), "frozen ConvNorm"
    return None


def _impossible_error(entry: PlanEntry, module: nn.Module, problem: str) -> ImpossibleLayerError:
    """The error for a layer ``on_impossible: error`` refuses because of ``problem``."""
    extra = _fixed_shift_remedies(entry, module) if problem.startswith(_FIXED_SHIFT) else ""
    return ImpossibleLayerError(
        f"rule '{entry.rule_name}': {entry.site.name} ({describe_module(module)}): {problem}. Set 'on_impossible: "
        "regularize' (L_orth instead) or 'skip' in the rule's 'with:', or exclude the layer from the rule's match"
        f"{extra}")


def _check_cayley_padding(entry: PlanEntry, module: nn.Module) -> None:
    """:class:`PlanError` for ``method: cayley_fft`` with ``padding: keep`` on a conv (not a Linear or a transposed
    conv, which cayley_fft builds by other means): the Cayley-FFT layer is circular with 'same' padding only."""
    if (entry.params["method"] != "cayley_fft" or entry.params["padding"] == "circular"
            or isinstance(module, (nn.Linear,) + TORCH_TRANSPOSED_CONV_TYPES)):
        return
    raise PlanError(f"rule '{entry.rule_name}': {entry.site.name} ({describe_module(module)}): method 'cayley_fft' "
                    "builds only the circular layer with 'same' padding, and 'padding: keep' asks for the conv's own "
                    f"padding={module.padding}, padding_mode={module.padding_mode!r}. Use 'padding: circular', or "
                    "method 'bcop' for 'padding: keep'")


def _needs_input_size(entry: PlanEntry, module: nn.Module) -> bool:
    """Whether ``apply`` builds ``entry``'s layer for the input size seen on the example inputs: ``method:
    cayley_fft`` on a conv (a Linear and a transposed conv are built without one)."""
    return entry.params["method"] == "cayley_fft" and not isinstance(module, (nn.Linear,) + TORCH_TRANSPOSED_CONV_TYPES)


def _no_input_size_error(entry: PlanEntry, module: nn.Module, why: str) -> PlanError:
    """The refusal of a cayley_fft conv (:func:`_needs_input_size`) that has no input size; ``why``: for lack of
    what."""
    return PlanError(f"rule '{entry.rule_name}': {entry.site.name} ({describe_module(module)}): method 'cayley_fft' "
                     f"builds the orthogonal operator for one input size, taken from the example inputs, and {why}. "
                     "Pass example_inputs=(x,) to orthofx.transform (with inputs of the size the model will see), or "
                     "use method 'auto' (explicit kernels, any input size)")


def _tie_problems(entries: list[PlanEntry], modules: list[nn.Module], owners: dict) -> dict[str, str]:
    """Site name -> why its layer cannot be replaced because its weight is tied to another layer's.

    An orthogonal layer holds its own parameters (a BCOP or Stiefel parametrisation, not the weight), so a tied
    weight stays tied only when every layer sharing it is replaced by one and the same orthogonal layer: all of
    them selected by this rule, with the same configuration, the same bias and the same pass parameters.
    Anything else would silently untie the weights (an embedding and its tied output head would train apart).
    Every layer of a group that cannot share gets the problem, before any is replaced, so that ``on_impossible:
    skip`` leaves the whole group as it was.
    """
    selected = {entry.site.name for entry in entries}
    groups: dict[int, list[tuple[PlanEntry, nn.Module]]] = {}
    for entry, module in zip(entries, modules):
        groups.setdefault(id(module.weight), []).append((entry, module))
    problems: dict[str, str] = {}
    for key, members in groups.items():
        names = {entry.site.name for entry, _ in members}
        outside = [(name, m) for name, m in owners.get(key, []) if name not in names]
        if not outside and len(members) == 1:
            continue
        problem = None
        for name, other in outside:
            if name not in selected or getattr(other, "weight", None) is not members[0][1].weight:
                problem = (f"its weight is tied to {name} ({describe_module(other)}), which this rule does not "
                           "replace the same way; an orthogonal layer holds its own parameters, so replacing one "
                           "of them would untie the weights. Select every layer sharing the weight with this rule, "
                           "or untie them first")
                break
        if problem is not None:
            problems.update({entry.site.name: problem for entry, _ in members})
            continue
        entry0, module0 = members[0]
        if any(_configuration(m) != _configuration(module0) or m.bias is not module0.bias
               or e.params != entry0.params for e, m in members[1:]):
            for entry, _ in members:
                problems[entry.site.name] = (
                    f"its weight is tied to {', '.join(sorted(names - {entry.site.name}))}, and the layers sharing "
                    "it differ in configuration, bias or pass parameters, so one orthogonal layer cannot stand "
                    "for all of them. Make them agree, or untie the weights first")
    return problems


@register_pass
class OrthogonalConvPass(Pass):
    """Hard orthogonality: exactly orthogonal Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear layers, L_orth where
    none exists."""

    name = "orthogonal_conv"
    params = (
        Param("method", "auto", (str,), "construction of the orthogonal kernel (cayley_fft: for the example "
              "input's size only)", choices=("auto", "bcop", "rko", "cayley_fft")),
        Param("padding", "circular", (str,), "circular (exact) or keep (the layer's zero padding)",
              choices=("circular", "keep")),
        Param("init", "nearest", (str,), "start from the nearest orthogonal layer or at random",
              choices=("nearest", "random")),
        Param("fit_steps", 0, (int,), "Adam steps refining the nearest init of k > S kernels (0: closed form only)",
              minimum=0),
        Param("on_impossible", "error", (str,), "what to do where no orthogonal layer exists",
              choices=("error", "skip", "regularize")),
        Param("regularize_weight", 0.01, (float,), "weight of the L_orth fallback", minimum=0.0),
        Param("gain", 1.0, (float,), "the layer is gain times orthogonal", minimum=0.0, exclusive_minimum=True),
        Param("frozen", "skip", (str,), "a layer whose weight has requires_grad=False: skip it (left as it is) or "
              "overwrite it (replaced, still frozen)", choices=("skip", "overwrite")),
    )
    site_kinds = frozenset({"module"})
    module_types = TORCH_CONV_TYPES + (nn.Linear,) + TORCH_TRANSPOSED_CONV_TYPES
    group = "weight"
    complex_weights = "builds real orthogonal layers"
    replaces_module = True
    needs_original_module = True

    def accepts(self, site, module):
        reason = super().accepts(site, module)
        if reason is None and not site.name:
            return "the root module cannot be replaced"
        return reason

    def accepts_params(self, site, module, params):
        # with 'padding: circular' every padding mode is replaced by the exact circular boundary, as zeros is; a
        # conv whose padding adds nothing ('valid', 0) keeps it whatever its mode (it was refused, and the advice
        # 'padding: circular' then failed on the output size, which advised 'padding: keep')
        if params["padding"] == "keep" and isinstance(module, TORCH_CONV_TYPES) \
                and module.padding_mode not in ("zeros", "circular") and _reads_padding(module):
            return (f"padding_mode={module.padding_mode!r} with 'padding: keep': orthogonal layers keep circular "
                    "(exact) or zero padding only; use 'padding: circular'")
        # a frozen weight (a pretrained layer kept fixed on purpose) would be replaced by the nearest orthogonal
        # layer, another function that no step could correct (it was replaced silently, frozen)
        if params.get("frozen", "skip") == "skip" and module is not None:
            return frozen_reason(module, False, "replaces it")
        return None

    def planned_outcome(self, site, module, params):
        # explain said 'apply' for a layer that apply then refuses (P0 Theorem 4), skips or regularises: tell it
        # from the layer's shape now, as apply will
        kept = _kept_layer(module)
        problem = kept[0] if kept is not None else _shape_problem(module, params)
        return None if problem is None else _outcome(problem, params["on_impossible"])

    def weight_values_read(self, params):
        # 'init: random' builds the layer on the meta device too, to materialise later
        return ("starts the orthogonal layer nearest to the weight (init: nearest; 'init: random' builds one on the "
                "meta device, to materialise later)" if params["init"] == "nearest" else None)

    def handles_derived_weight(self, params):
        # "hard where possible, L_orth elsewhere": a layer whose weight a parametrization computes cannot be
        # replaced (that would drop the parametrization), but L_orth reads the computed weight
        return params["on_impossible"] == "regularize"

    def check_plan(self, gm: nn.Module, entries: list[PlanEntry]) -> None:
        """``method: cayley_fft`` with ``padding: keep`` on a conv is refused while planning (explain too); a
        layer whose tied weight keeps it from being replaced (:func:`_tie_problems`) gets the outcome ``apply``
        will give it (``on_impossible``), which ``explain`` shows; a cayley_fft conv that ``apply`` would build
        without example inputs (no input size to build it for) gets its refusal, whatever ``on_impossible``; with
        ``on_impossible: error`` a layer :func:`_shape_problem` rules out (cayley_fft's layer-alone checks too) gets
        its refusal, raised before any pass runs. cayley_fft's checks on the input size wait for ``apply``: the
        example run that records it comes after planning."""
        modules = [gm.get_submodule(entry.site.name) for entry in entries]
        for entry, module in zip(entries, modules):
            _check_cayley_padding(entry, module)
            check_scale_range(entry, module, entry.params["gain"])  # the layer is built in the weight's dtype
        problems = _tie_problems(entries, modules, parameter_owners(gm))
        for entry, module in zip(entries, modules):
            problem = problems.get(entry.site.name)
            if problem is not None and not entry.outcome:
                entry.outcome = _outcome(problem, entry.params["on_impossible"])
            # a cayley_fft conv that its layer alone rules out (dilation, output size) is regularised or skipped in
            # apply before it asks for an input size
            if problem is None and _kept_layer(module) is None and _needs_input_size(entry, module) \
                    and not entry.has_example_inputs and _shape_problem(module, entry.params) is None:
                # apply would refuse it only after the passes before it ran (with inplace=True, having written the
                # user's weights); a kept or tied layer is regularised or skipped without an input size, as in apply
                entry.outcome = "fails: method 'cayley_fft' needs the input size of example_inputs, none given"
                entry.refusal = _no_input_size_error(entry, module, "none were given")
                continue
            if entry.params["on_impossible"] != "error":
                continue
            # transform raises it before any pass runs (with inplace=True an earlier rule would have written the
            # user's weights by the time apply got here); explain shows the outcome
            problem = problem or _shape_problem(module, entry.params)  # in apply's order
            if problem is not None:
                entry.refusal = _impossible_error(entry, module, problem)

    def apply(self, ctx: PassContext, entries: list[PlanEntry]) -> None:
        modules = [ctx.module(entry.site) for entry in entries]
        ties = _tie_problems(entries, modules, parameter_owners(ctx.gm))
        built: dict[int, tuple[str, nn.Module]] = {}  # id(weight) -> (site, its orthogonal layer)
        off_grid = OffGridLayers(self.name)  # hard layers not orthogonal on the example's inputs (one warning)
        for entry, module in zip(entries, modules):
            require_initialised(entry, module, "it has no shape to build an orthogonal layer for")
            kept = _kept_layer(module)
            if kept is not None:  # planning lets it through only for on_impossible: regularize
                self._impossible(ctx, entry, module, kept[0], why=kept[1])
                continue
            if entry.site.name in ties:
                self._impossible(ctx, entry, module, ties[entry.site.name], why="tied weight")
                continue
            if id(module.weight) in built:  # tied to a layer replaced already, with the same configuration
                first, layer = built[id(module.weight)]
                self._replace(ctx, entry, module, layer, f"hard (shares {first}'s layer: tied weight)", off_grid)
                continue
            method = entry.params["method"]
            input_size = None
            # what planning told (explain's outcome, on_impossible: error's refusal), then for cayley_fft what the
            # example's input size adds: one function, so plan and apply give one text
            problem = _shape_problem(module, entry.params)
            if problem is None and _needs_input_size(entry, module):
                input_size = self._cayley_input_size(ctx, entry, module)
                problem = _impossibility(module, entry.params["padding"], method, input_size)
            if problem is None:
                if entry.params["init"] == "nearest":
                    _require_finite(entry, module)
                layer = orthogonal_layer(module, init=entry.params["init"], method=method,
                                         padding=entry.params["padding"], gain=entry.params["gain"],
                                         fit_steps=entry.params["fit_steps"], input_size=input_size)
                status = _hard_status(module, entry.params["padding"])
                if input_size is not None:
                    status = f"hard (cayley_fft, input {'x'.join(map(str, input_size))} only)"
                self._replace(ctx, entry, module, layer, status, off_grid)
                built[id(module.weight)] = (entry.site.name, layer)
            else:
                self._impossible(ctx, entry, module, problem, why=_status_reason(problem))
        off_grid.warn()

    def _cayley_input_size(self, ctx: PassContext, entry: PlanEntry, module: nn.Module) -> tuple[int, ...]:
        """The spatial input size of a conv site for ``method: cayley_fft`` (from the example inputs)."""
        where = f"rule '{entry.rule_name}': {entry.site.name} ({describe_module(module)})"
        _check_cayley_padding(entry, module)
        shape = ctx.manifest.input_shapes.get(entry.site.name)
        dims = module.weight.dim() - 2
        if (shape is None or len(shape) < dims + 1) and ctx.manifest.input_shapes and entry.site.node is None \
                and "." in entry.site.name:
            # example inputs were given, but the graph never calls this layer: it sits inside a leaf module whose
            # forward uses it its own way (a ConvNorm layer convolves with its conv's weight)
            owner = entry.site.name.rpartition(".")[0]
            raise PlanError(f"{where}: method 'cayley_fft' builds the orthogonal operator for one input size, and "
                            f"no input size was recorded for this layer: the graph does not call it, it sits inside "
                            f"'{owner}' ({type(ctx.gm.get_submodule(owner)).__name__}), kept as a leaf. Use method "
                            "'auto' (explicit kernels, any input size) for it")
        if shape is None or len(shape) < dims + 1:
            raise _no_input_size_error(entry, module, "none reached this layer")
        return tuple(int(n) for n in shape[-dims:])

    def _replace(self, ctx: PassContext, entry: PlanEntry, old: nn.Module, new: nn.Module, status: str,
                 off_grid: OffGridLayers) -> None:
        """Put ``new`` at the entry's site and record the Change; a hard layer that the example run gave inputs
        it is not orthogonal on gets the status and ``after`` keys of :meth:`OffGridLayers.mark` and goes into
        ``off_grid`` for the warning."""
        after = {"layer": type(new).__name__, "init_error": new.init_error}
        status = off_grid.mark(ctx.manifest, entry.site.name, new, status, after)
        inputs = ctx.site_inputs.get(entry.site.name)
        if inputs is not None:
            with torch.no_grad():
                reference = old(*inputs)
            with EvalRun(new):  # a conv or linear: the mode only decides whether new's kernel cache is used
                changed = new(*inputs)
            # in float64 with scaled norms (a float16 output's norm overflowed: inf / inf = NaN), and None where
            # the relative change is undefined: a zero original output (it was ||change|| / 1e-30, ~1e31) or one
            # with NaN or inf entries
            after["output_change"] = relative_distance(changed.detach(), reference.detach())
        ctx.replace_module(entry.site, new)
        ctx.record(Change(site=entry.site.name, rule=entry.rule_name, pass_name=self.name,
                          what=f"replaced by an exactly orthogonal {type(new).__name__}", params=dict(entry.params),
                          before={"layer": describe_module(old)}, after=after, status=status))

    def _impossible(self, ctx: PassContext, entry: PlanEntry, module: nn.Module, problem: str,
                    why: str) -> None:
        """``on_impossible`` for a layer that is not replaced because of ``problem``; ``why``: its short form in
        the report's status (:func:`_status_reason`; an orthogonal version may exist, e.g. for a weight tied to a
        layer it cannot share one with)."""
        action = entry.params["on_impossible"]
        if action == "error":
            raise _impossible_error(entry, module, problem)
        if action == "skip":
            ctx.record(Change(site=entry.site.name, rule=entry.rule_name, pass_name=self.name,
                              what="left unchanged: " + problem, params=dict(entry.params),
                              status=f"skipped: {problem}"))
            return
        term = lorth_term(module, entry.site.name, entry.rule_name, entry.params["regularize_weight"], root=ctx.gm)
        shared = ctx.add_penalty(term)
        what = "attached L_orth instead" if shared is None else f"L_orth instead (counted once, at {shared}: tied)"
        ctx.record(Change(site=entry.site.name, rule=entry.rule_name, pass_name=self.name,
                          what=f"{what}: {problem}", params=dict(entry.params),
                          status=f"regularised ({why})"))
