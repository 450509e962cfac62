"""ConvNorm (P3): per-output-channel normalisation of a convolution's output in the Fourier domain.

What it computes
----------------
A convolution with kernel ``K`` (``M`` output channels, ``C`` input channels per group) acts on one output
channel ``m`` as the row block ``A_m = [A_{m,1} ... A_{m,C}]`` of circulant matrices. ConvNorm replaces ``A_m``
by ``(A_m A_m^T)^(-1/2) A_m``, whose rows are orthonormal (channel-wise isometry) for the circular operator. The
layer keeps P3's approximation for every padding mode, ``padding_mode="circular"`` included (below: exact rows of
a circular operator on a wider grid, applied to an input that is zero outside its borders, or padded explicitly
first, so the layer's own rows are not orthonormal: for a small 3-channel stride-1 layer their singular values
span 0.4-1.0). All blocks are diagonalised by
the same DFT, so ``(A_m A_m^T)^(-1/2)`` is the circular filter with frequency response

    V_m(w) = ( sum_c |K_hat_{m,c}(w)|^2 + eps )^(-1/2)

and the layer becomes ``output_m <- IFFT( FFT(conv output_m) * V_m )``. ``eps`` (absent from the reference
implementation) keeps ``V`` finite at frequencies where every kernel of channel ``m`` vanishes. For a 1 x 1
kernel ``K_hat_{m,c}(w) = w_{m,c}`` for every ``w``, so ``V_m = (||w_m||^2 + eps)^(-1/2)``: ConvNorm divides
channel ``m`` by the norm of its weights. Grouped convolutions need nothing special: the sum runs over the
input channels of channel ``m``'s group, which is exactly dimension 1 of the weight.

The exact formulation for the layer's padding, stride and dilation
----------------------------------------------------------------
A circular filter needs a circular grid, while the layer has zero padding ``(p_l, p_r)``, stride ``S`` and
dilation ``D`` (one dimension shown; every spatial dimension is treated alike and independently, so ``1 x k``
kernels, unequal strides and paddings are just per-dimension numbers). With the dilated kernel ``K_D`` of
extent ``k_e = D (k - 1) + 1`` and the input ``x`` of length ``N`` (zero outside ``[0, N)``), the stride-1 linear
cross-correlation

    f[j] = sum_t K_D[t] x[j + t]                        (j in Z, non-zero only for -(k_e-1) <= j <= N-1)

contains the layer's output: ``y[i] = f[S i - p_l]`` for ``i = 0 .. N_out - 1``,
``N_out = floor((N + p_l + p_r - k_e) / S) + 1``. Take the grid of length

    L = N + Q_l + Q_r - k_e + 1,        Q_l = max(p_l, k_e - 1),   Q_r = max(p_r, k_e - 1),

i.e. the stride-1 correlation with zero padding ``(Q_l, Q_r)``, holding ``f`` on the window
``[-Q_l, L - Q_l)``. The window contains the whole support of ``f`` (``Q_l, Q_r >= k_e - 1``), so ``L >= N + k_e - 1``
and the circular correlation of ``x`` with ``K_D`` on a period-``L`` grid equals ``f`` there, with no
wrap-around: the FFT of this window is exactly ``K_hat_D . x_hat`` on the ``L``-grid. The window also contains
every output position ``S i - p_l`` (``Q_l >= p_l``, ``Q_r >= p_r``). ConvNorm is defined on this grid:

    f' = IFFT_L( V_L . FFT_L(f) ),       y'[i] = f'[Q_l - p_l + S i],     i = 0 .. N_out - 1,

where ``V_L`` is ``V`` sampled at the ``L`` frequencies of the grid, computed from the *dilated* kernel
(``|K_hat_D(w)| = |K_hat(D w)|``, the reference ignored dilation). The circular operator on the ``L``-grid has
orthonormal rows up to ``eps``; the layer applies it to the zero-extended input and keeps the rows at its own
output positions, so its own operator is normalised only approximately (P3's construction). For the
paddings used in practice (``p <= k_e - 1``: "same", "valid") ``Q = k_e - 1`` and ``L = N + k_e - 1`` is the
reference's "stride 1, padding k - 1" grid; the reference then cropped to the "same" positions of a square
``k x k`` kernel and subsampled, which breaks for ``1 x k`` kernels, dilation and other paddings. Here the
crop offset ``Q_l - p_l`` and the subsampling come from the layer itself, so the output has exactly the conv's
shape and output ``i`` is the normalised value at the centre of the same receptive field as the conv's output
``i`` (checked against a direct float64 construction in ``tests/test_convnorm.py``). Padding larger than
``k_e - 1`` (e.g. a 1 x 1 conv with padding 1) widens the grid so that all output positions stay distinct.

``padding_mode`` other than ``"zeros"`` (reflect, replicate, circular): the input is padded explicitly with
that mode first and the formulation above is applied with zero padding ``p = 0`` to the padded signal.
``padding="same"`` / ``"valid"`` follow torch's convention (for an odd total, the extra zero goes on the right).
The explicit pads are ``nn.Conv``'s own: ``padding="same"`` with a one-element ``dilation`` (``dilation=(2,)``
on a ``Conv2d``) pads the first spatial dimension only, as torch's layer does in those modes (its output is not
"same"; :func:`~orthofx.nn.padding.conv_mode_pads`), and the functional :func:`conv_norm` pads the same way.
A layer pads by the pads its conv's constructor computed, as torch's forward does
(:func:`~orthofx.nn.padding.torch_mode_pads`): a ``conv.padding`` set later does not change them, and a padding
torch's ``F.pad`` refuses (``padding=(1,)`` on a ``Conv2d``) raises, as the conv itself cannot run.

The conv's bias is added *after* the normalisation (filtering a constant bias would only rescale it by
``V_m(0)``, and in the linear picture the bias is not part of the operator being normalised).

Gradients: ``V`` is computed from the *detached* weight, as in P3: the weight's gradient comes only from the
convolution path, the input's gradient goes through both the convolution and the filter.

Running ``V`` and eval mode
---------------------------
``V`` depends on the weight and on the grid ``L`` (so on the feature-map size), not on the data: unlike
BatchNorm there is nothing to estimate, and a "running" ``V`` is only an exponential average of the filters of
recent weights. Two behaviours are offered:

* ``momentum=None`` (default): train and eval both use ``V`` recomputed from the current weight. Train and eval
  outputs agree exactly, every input size works, nothing is stored in the state. This is the recommended mode.
  In eval mode without gradients the layer keeps ``V`` of each grid it ran on (and the one-tap scale) until the
  weight changes, as the orthogonal layers keep their kernels (the same conditions and key, see
  :meth:`ConvNormConvNd._eval_kept`): the same tensor bit for bit, recomputed after an optimizer step,
  ``load_state_dict``, ``.to()``, ``train()`` / ``eval()`` or any forward with gradients. A write that bumps no
  version counter of the weight (``conv.weight.data.copy_(t)``) is not seen: call ``layer.eval()`` after it.
* ``momentum=m`` (float in (0, 1]): P3's behaviour. Each training forward updates a running filter for its grid,
  ``running <- (1 - m) running + m V`` (initialised with the first ``V`` seen for that grid, not with ones). Eval
  uses the running filter of its grid, and falls back to ``V`` of the current weight for a grid never seen in
  training. A layer keeps at most ``max_running_grids`` running filters (default 16, ``None``: no bound; each
  holds ``M x L_1 x ... x (L_d // 2 + 1)`` floats, 2 MB for 256 channels on a 64 x 64 grid, and multi-scale
  training or variable-length signals would otherwise store one per size, per layer, without end): a training
  forward on a new grid when the layer holds that many drops the filter of the least recently *updated* grid
  (eval forwards read filters and do not count) and issues a :class:`RunningFiltersDroppedWarning`, once per
  layer, naming its grids, the bound and how to raise it (a compiled forward cannot issue a warning: the layer's
  next eager forward or ``.train()`` / ``.eval()`` does). Eval on the dropped grid's size then uses ``V`` of the
  current weight, exactly as for a grid never seen. ``load_state_dict`` loads every filter a state dict holds,
  more than the bound too (the user saved them; refusing would make checkpoints of layers trained without a
  bound unloadable, dropping some would lose state silently); the next new grid then drops the least recently
  updated down to the bound. The order of updates travels in the state dict's metadata
  (``state_dict()._metadata[path]["orthofx_running_order"]``, :data:`RUNNING_ORDER_METADATA_KEY`: the grids, least
  recently updated first, as tuples of ints, which ``torch.save`` / ``torch.load(weights_only=True)`` and
  ``orthofx.export`` / ``orthofx.load`` keep; no key is added), so a training run resumed from its state dict drops
  the grids the uninterrupted run drops, as a deep copy or a pickled layer does. A state dict without it (saved
  before it was, or a dict rebuilt without ``_metadata``) loads as before: the order of its ``running_v_*``
  entries is taken as the order of updates, the first dropped first. With it, a grid it names that has no filter
  in the state dict is skipped, and a filter it does not name counts as updated before every grid it names; an
  entry that is not a list of distinct grids (``d`` ints >= 1 each) raises a
  :class:`~orthofx.errors.LayerArgumentError` naming it. The running filters are kept in a dict keyed by the grid
  (:attr:`~ConvNormConvNd.running_grids`, :meth:`~ConvNormConvNd.running_filter`), not as buffers, since the
  grids a layer has seen depend on the input sizes it ran on (see DDP below); they are state all the same:
  ``state_dict`` holds one entry ``running_v_<L1>x<L2>`` per grid (the key a buffer of that name had),
  ``load_state_dict`` restores them
  (``assign=True`` too; a filter for a grid the layer has never seen is made for it; the loaded filters replace
  the layer's, so none is "missing"), and they move with ``.to()``, ``.double()``, ``.cuda()`` ..., are deep-copied
  and pickled with the layer. A cast to half precision leaves them in float32, the precision ``V`` is computed in
  for such weights. A layer with ``momentum=None`` has no running filters: ``running_v_*`` keys in a state dict
  it loads are unexpected keys (``load_state_dict`` fails with torch's usual message under ``strict=True`` and
  ignores them under ``strict=False``, and the order of updates with them), and a
  :class:`RunningFiltersDroppedWarning` names the layer; construct it with ``momentum=...`` to load them.
  ``named_buffers()`` does not list them, so ``torch.func.stack_module_state`` does not stack them (torch's model
  ensembling, ``stack_module_state`` + ``vmap(functional_call)``, runs every member in eval with the base
  layer's filters: use ``momentum=None`` there, or stack the members' ``state_dict()`` entries, which hold them);
  ``torch.func.functional_call`` substitutes those given in its dict (``layer.running_v_<L1>x... = t`` makes ``t``
  the filter of that grid, a state dict's keys included, under its default ``strict=False``: ``strict=True``
  refuses them as unexpected keys, not being buffers; a layer with ``momentum=None``, or a tensor of another
  shape, is refused with a :class:`~orthofx.errors.LayerArgumentError`).
  ``torch.optim.swa_utils.AveragedModel(use_buffers=True)`` does not average them either: an EMA / SWA copy keeps
  the filters of the weights the model had when it was made, and
  :func:`update_running_filters` (``update_bn``'s analogue) sets them to ``V`` of its averaged weights; a layer's
  ``running_v_<L1>x...`` attribute is the filter, as a buffer's name would be
  (tools that look state-dict keys up with ``getattr``, such as ``torch.distributed.checkpoint``'s
  ``get_model_state_dict``, read them). Code that runs extra training forwards
  on copies of a module's buffers (so as not to move its running statistics) runs them under
  :func:`running_filters_held`, in which the layers use ``V`` and store nothing. Activation checkpointing's
  recomputation of a forward during backward (``torch.utils.checkpoint``) stores nothing either: the forward
  updated the filter, and a second update (what BatchNorm's running statistics get there) would count the step
  twice. ``torch.compile(fullgraph=True)`` traces the update and the storing of a new grid's filter, for every size
  (dynamic shapes too), with the batch size symbolic under ``dynamic=True``. The spatial size is not: the filter is
  looked up in a dict by its grid, so dynamo specialises on the size and guards on which grids the dict holds (and
  how many). Measured (torch 2.13, ``dynamic=True``, ``tests/test_dynamic_shapes_s40.py``): training that cycles
  through ``n`` sizes makes ``2n`` graphs (one per size while the filters are first stored, one per size once all
  are), eval one per size, whatever the batch sizes (sizes first met later in training cost a few more: each new
  grid changes the dict the other sizes' graphs guard on); so training and evaluating on three sizes (nine graphs)
  exceeds dynamo's recompile limit (``torch._dynamo.config.recompile_limit``, 8), an error under
  ``fullgraph=True`` (``FailOnRecompileLimitHit``) and eager fallback without it. Raise the limit to at least
  three times the number of sizes, or compile the layers with ``momentum=None`` (no running filters: one graph for
  every size and batch under ``dynamic=True``, as for the presets). With ``dynamic=False`` each input size, batch
  size, and each switch between training, eval and ``no_grad``, is a graph of its own.

  DistributedDataParallel broadcasts rank 0's buffers (at construction, and before each forward once the model has
  any), and ranks holding different buffer sets abort in that broadcast; the running filters, not being buffers,
  are never broadcast, so ranks may train on different input sizes (variable-size batches, a smaller last batch).
  Each rank holds its own running filters: for each grid, the exponential average of ``V`` of the weights at the steps
  where *that rank* trained on that grid. DDP keeps the weights identical on every rank, so ranks that train on
  the same grids at the same steps hold the same running filters; a rank that trained on a grid at other steps, or
  never, holds another filter for it, or none (its eval then uses ``V`` of the weight), and replicas' eval outputs
  on that size differ. A checkpoint saved on one rank holds that rank's filters, and loading it on every rank
  gives them all the same. With ``momentum=None`` there is nothing per rank. ``nn.DataParallel`` gives each replica
  a dict of its own: the replica on the first device updates the layer's filters in place (kept, as DataParallel
  keeps buffer updates there; the filter of a grid new to the layer stays with the replica), a replica on another
  device updates copies that go with it.

Freezing (inference form)
-------------------------
In eval mode ``V`` is a fixed function of the weight and the grid, so :meth:`ConvNormConvNd.to_plain` (the
protocol ``orthofx.freeze`` uses) precomputes it: it returns a :class:`FrozenConvNormNd` made of a plain
``nn.Conv{d}d`` with the same weights (``stride=1``, padding ``Q``: the stride-1 correlation above), one buffer
``v_<L1>x<L2>`` per FFT grid holding the eval ``V`` (the running filter where one is kept, else ``V`` of the
weight), the bias and the affine conv; its forward is conv -> rfft -> multiply -> irfft -> crop, with no FFT of
the weight (the inverse transforms run one axis at a time and keep only the output rows, 1 / S of them at stride
``S``). A one-tap (1 x 1) kernel needs no FFT at all: its ``V`` is ``(||w_m||^2 + eps)^(-1/2)`` at every
frequency, so ConvNorm is the layer's own conv with channel ``m`` scaled by it (also in training), and without
running filters it freezes into that conv with scaled weights, for every input size (float32 weights for a
half-precision layer, which computes in float32). The grids are those of the input sizes the layer has run on
(each eager forward remembers its spatial input size, the 16 most recent ones; ``orthofx.transform`` runs the model
once on its example inputs), the grids of the running filters, and any ``input_sizes`` passed to ``to_plain``.
Eval outputs equal the unfrozen layer's in eval (same operations), up to float32 rounding for a one-tap layer
(``conv(x, w * s)`` for ``conv(x, w) * s``); under ``torch.autocast`` that conv runs in half precision, so there a
one-tap layer's frozen outputs may differ by one unit in the last place of autocast's dtype.
An input whose grid has no precomputed filter raises :class:`~orthofx.errors.LayerArgumentError` naming the
size, the grid, the sizes it has and the fix (run the unfrozen model on that size before freezing, or
``to_plain(input_sizes=[...])``), where the unfrozen layer would have computed ``V`` from the weight.

Precision
---------
The layer computes in float64 for a float64 weight and in float32 otherwise (half-precision weights, inputs and
autocast included: ``V`` spans orders of magnitude; it is computed in float64 and then rounded, so that weights of
any magnitude and any ``eps > 0`` give a finite ``V``, clamped to float32's largest value). The input must have the
weight's working precision, as torch's convolutions demand matching dtypes: a float32 (or half-precision) input to
a float64 layer, or a float64 input to a float32 layer, raises :class:`~orthofx.errors.LayerArgumentError` (a
float32 input used to round the float64 weight and ``V`` to float32 silently). A half-precision input to a float32
layer is accepted: computed in float32, returned in the input's dtype. Under ``torch.autocast`` the conv runs in
autocast's half precision, the normalisation in float32, and the layer returns autocast's dtype, as ``nn.Conv2d``
does there.

Affine part
-----------
``affine=True`` adds P3's learned affine part: a depthwise convolution (``groups = M``, kernel
``affine_kernel_size``, default the conv's kernel size, stride 1, "same" padding, with bias) applied after the
normalisation, initialised to the identity (centre tap 1, bias 0). Child name ``affine``.

Module design
-------------
:class:`ConvNormConv2d` (and ``1d`` / ``3d``) *owns* the convolution as its child ``conv`` and computes
conv + normalisation in one forward (it calls the functional convolution with ``conv.weight`` at stride 1 and
padding ``Q``, so forward hooks registered on the inner ``conv`` do not fire). The conv's own ``forward`` is never
called, so a subclass whose class overrides ``forward`` or ``_conv_forward`` (``StdConv2d``'s weight
standardisation, a scaled output) is refused rather than have that code dropped: the constructor raises a
:class:`~orthofx.errors.LayerArgumentError`, the ``convnorm`` pass skips the layer with the reason. A graph pass
replaces the conv by the wrapper under the same qualified name, so the conv's parameters become
``<name>.conv.weight`` / ``<name>.conv.bias``. The wrapper exposes the conv's ``weight``, ``bias``, ``stride``,
``padding``, ``dilation``, ``groups``, ``kernel_size``, ``in_channels`` and ``out_channels`` as read-only
properties, so code that reads a layer's weight by name (``orthofx.penalty`` terms, metrics) keeps working on the
wrapped layer.

Symbolic tracing
----------------
The FFT grid, the filter and the output crop follow from the input's spatial size (and, with ``momentum``, from
the running filter of that grid), which a ``torch.fx`` Proxy does not carry. So ``torch.fx.symbolic_trace`` of a
model holding a :class:`ConvNormConvNd` or :class:`FrozenConvNormNd` records the layer as one ``call_module`` node,
as fx does for ``nn.Conv2d`` (the layer's forward does it when it receives a Proxy): the GraphModule calls the
layer itself, so outputs, gradients, running-filter updates and every input size are the eager layer's, in train
and eval mode. Tracing the layer itself as the root (``symbolic_trace(layer)``) cannot give such a node and
raises :class:`~orthofx.errors.CaptureError`. ``torch.func`` transforms (``vmap`` / ``grad`` of a
``functional_call``, per-sample gradients) work with ``momentum=None`` and in eval mode; a training-mode update of
a running filter is an in-place write to the layer's state they cannot make, refused with a
:class:`~orthofx.errors.LayerArgumentError` naming those two fixes.

Example::

    import torch
    from orthofx.nn import ConvNormConv2d
    conv = torch.nn.Conv2d(16, 32, (1, 3), stride=(1, 2), padding=(0, 2), dilation=2, bias=False)
    layer = ConvNormConv2d(conv, eps=1e-5, affine=True)
    x = torch.randn(8, 16, 20, 20)
    y = layer(x)
    assert y.shape == conv(x).shape
"""

from __future__ import annotations

import contextlib
import copy
import math
import operator
import warnings
from typing import ClassVar, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from orthofx.errors import (LayerArgumentError, RunningFiltersDroppedWarning, caller_stacklevel, first_few,
                            keep_in_metadata, layer_label)
from orthofx.nn.tracing import (FuncTransformRefusal, fx_tracer_of, in_func_transform, record_as_leaf,
                                recomputing_in_backward)
from orthofx.nn.orthogonal import (_ComputedWeight, _EvalCache, check_tensor_input, refuse_weight_assignment,
                                   without_memory_format)
from orthofx.nn.padding import circular_pad, conv_mode_pads, conv_zero_pads, flat_pads, per_dimension, torch_mode_pads
from orthofx.nn.precision import HALF_PRECISION
from orthofx.theory import _flag, _positive_int, _real

__all__ = [
    "ConvNormGeometry",
    "convnorm_geometry",
    "convnorm_filter",
    "channel_gains",
    "conv_norm",
    "ConvNormConvNd",
    "ConvNormConv1d",
    "ConvNormConv2d",
    "ConvNormConv3d",
    "with_convnorm",
    "FrozenConvNormNd",
    "running_filters_held",
    "update_running_filters",
    "RunningFiltersDroppedWarning",
    "MAX_RUNNING_GRIDS",
    "RUNNING_ORDER_METADATA_KEY",
    "WRAPPED_MARKER",
    "FROZEN_FILTERS_MARKER",
]

#: Attribute set on the convolution (and affine conv) a ConvNorm wrapper owns, so passes can recognise them.
WRAPPED_MARKER = "_orthofx_convnorm_inner"
#: Set on the conv of a :class:`FrozenConvNormNd`, whose filters were computed from that conv's weight once:
#: planning refuses passes that write, step or replace it (the filters would silently go stale).
FROZEN_FILTERS_MARKER = "_orthofx_frozen_convnorm_conv"

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_CLS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_PAD_MODES = {"zeros", "reflect", "replicate", "circular"}
_RUNNING_PREFIX = "running_v_"
# what an assignment to a ConvNorm layer's weight or bias should do instead (refuse_weight_assignment)
_CONV_PARAMETER_FIX = ("assign the wrapped conv's instead (layer.conv.weight = ...), or give functional_call the keys "
                       "'<layer path>.conv.weight' and '<layer path>.conv.bias'")
_FROZEN_PREFIX = "v_"
#: How many distinct input sizes a ConvNorm layer remembers for :meth:`ConvNormConvNd.to_plain`.
MAX_REMEMBERED_SIZES = 16
#: The default of :class:`ConvNormConvNd`'s ``max_running_grids``: the most running filters (one per FFT grid) a
#: layer with ``momentum`` keeps.
MAX_RUNNING_GRIDS = 16
#: Key of a ConvNorm layer's order of updates of its running filters (the grids, least recently updated first) in
#: its state-dict metadata (``state_dict()._metadata[path]``).
RUNNING_ORDER_METADATA_KEY = "orthofx_running_order"
#: Why ``torch.fx.symbolic_trace`` records a ConvNorm layer as one call (see "Symbolic tracing" in the docs).
_TRACE_REASON = ("its FFT grid, filter and output crop follow from the input's spatial size (and, with momentum, "
                 "the running filter of that grid), which a torch.fx Proxy does not carry")


# ------------------------------------------------------------------------------------------------ geometry

class ConvNormGeometry(NamedTuple):
    """Where ConvNorm works for one input size (one entry per spatial dimension).

    ``pad_left`` / ``pad_right``: the zero padding ``Q`` of the stride-1 correlation; ``grid``: its length ``L``
    (the FFT size); ``start``: the grid index of the layer's first output (``Q_l - p_l``); ``stride``: the step
    between outputs; ``output_size``: the layer's output size.
    """

    pad_left: tuple[int, ...]
    pad_right: tuple[int, ...]
    grid: tuple[int, ...]
    start: tuple[int, ...]
    stride: tuple[int, ...]
    output_size: tuple[int, ...]


def _ntuple(value, d: int, name: str, broadcast: bool = False) -> tuple[int, ...]:
    """``d`` ints of ``value`` (an int, or ``d`` of them; :func:`~orthofx.nn.padding.per_dimension`, the one reader
    of a conv's sizes); ``broadcast``: a one-element tuple too, for a conv's stride and dilation, which torch's convs
    apply to every dimension (``nn.Conv2d(..., stride=(2,))`` keeps ``(2,)``, and ConvNorm refused the layer); not
    for a kernel or input size, where ``(3,)`` is a 1-d size."""
    def item(v) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise LayerArgumentError(f"{name} must hold integers, got {value!r}")
        return v

    return per_dimension(value, d, name, item=item, error=LayerArgumentError, expected=f"an int or {d} ints",
                         broadcast=broadcast)


def _sizes_list(input_sizes, d: int) -> list[tuple[int, ...]]:
    """``to_plain``'s ``input_sizes`` as a list of ``d``-tuples; a flat run of ``d > 1`` integers is refused: it
    reads as one size and as ``d`` square ones alike."""
    if input_sizes is None:
        return []
    if not isinstance(input_sizes, (tuple, list)):
        raise LayerArgumentError(f"input_sizes must be a list of spatial sizes (e.g. [(32, 32), (16, 16)]), got "
                                 f"{input_sizes!r}")
    if d > 1 and len(input_sizes) == d and all(isinstance(v, int) and not isinstance(v, bool)
                                               for v in input_sizes):
        one = ", ".join(map(str, input_sizes))
        raise LayerArgumentError(
            f"input_sizes={input_sizes!r} is ambiguous for a {d}-d layer: pass [({one})] for one input of that "
            f"size, or [{', '.join('(' + ', '.join([str(v)] * d) + ')' for v in input_sizes)}] for "
            f"{d} square ones")
    return [_ntuple(size, d, "each of input_sizes") for size in input_sizes]


def _dilated_extent(kernel_size: Sequence[int], dilation: Sequence[int]) -> tuple[int, ...]:
    """``k_e = D (k - 1) + 1`` per dimension: the span of the dilated kernel's taps."""
    return tuple(di * (ki - 1) + 1 for ki, di in zip(kernel_size, dilation))


def convnorm_geometry(input_size: Sequence[int], kernel_size, stride=1, padding=0, dilation=1, *,
                      where: str = "convnorm_geometry") -> ConvNormGeometry:
    """The grid on which ConvNorm is exact for a conv layer and an input size (see the module docstring).

    ``padding`` is the layer's zero padding: an int, a tuple, ``"same"`` or ``"valid"``. ``where`` starts the
    error for an input smaller than the kernel (a layer passes its label).
    """
    n = tuple(int(v) for v in input_size)
    k, s, dil = _checked_sizes(len(n), kernel_size, stride, dilation)
    return _geometry_of_pads(n, k, s, dil, conv_zero_pads(padding, k, dil, s), where)


def _checked_sizes(d: int, kernel_size, stride, dilation) -> tuple[tuple[int, ...], ...]:
    """``(kernel_size, stride, dilation)`` of a ``d``-dimensional conv as ``d`` positive ints each (a one-element
    stride or dilation applies to every dimension, as in torch)."""
    k = _ntuple(kernel_size, d, "kernel_size")
    s = _ntuple(stride, d, "stride", broadcast=True)
    dil = _ntuple(dilation, d, "dilation", broadcast=True)
    if any(v < 1 for v in k + s + dil):
        raise LayerArgumentError(f"kernel_size, stride and dilation must be positive, got {k}, {s}, {dil}")
    return k, s, dil


def _geometry_of_pads(n: tuple[int, ...], k: tuple[int, ...], s: tuple[int, ...], dil: tuple[int, ...],
                      pads: Sequence[tuple[int, int]], where: str) -> ConvNormGeometry:
    """:func:`convnorm_geometry` for checked sizes (``d`` ints each) and the ``(left, right)`` zero pads per
    dimension."""
    _check_nonempty(n, where)
    ql, qr, grid, start, out = [], [], [], [], []
    for ni, ke, si, (pl, pr) in zip(n, _dilated_extent(k, dil), s, pads):
        if ni + pl + pr < ke:
            raise LayerArgumentError(f"{where}: input size {n} (padded by {[p for p in pads]}) is smaller than the "
                                     f"dilated kernel extent {ke} in some dimension (as for the plain convolution): "
                                     "use larger inputs, more padding or a smaller kernel / dilation")
        a, b = max(pl, ke - 1), max(pr, ke - 1)
        ql.append(a)
        qr.append(b)
        grid.append(ni + a + b - ke + 1)
        start.append(a - pl)
        out.append((ni + pl + pr - ke) // si + 1)
    return ConvNormGeometry(tuple(ql), tuple(qr), tuple(grid), tuple(start), s, tuple(out))


def _check_nonempty(size: Sequence[int], where: str) -> None:
    """A convolution needs at least one input entry along every spatial dimension: torch's convolutions refuse an
    empty one ("Only zero batch or zero channel inputs are supported"), and padding it explicitly (non-zero
    padding modes) used to fail inside ``F.pad`` without naming the layer, or to give a filter for a size no
    forward can run on (``to_plain(input_sizes=...)``)."""
    if any(v < 1 for v in size):
        raise LayerArgumentError(f"{where}: input size {tuple(size)} has an empty (or negative) spatial dimension; a "
                                 f"convolution needs at least one entry along each (torch's convolutions refuse it "
                                 f"too): pass inputs (or input_sizes) whose spatial sizes are all >= 1")


def _explicit_pads(size: Sequence[int], kernel_size, stride, padding, dilation, padding_mode: str,
                   where: str, conv: nn.Module | None = None) -> tuple[tuple[int, int], ...]:
    """``(left, right)`` per spatial dimension by which a conv's non-zero ``padding_mode`` pads an input of spatial
    ``size`` before ConvNorm's geometry: torch's own pads (:func:`~orthofx.nn.padding.conv_mode_pads`; ``"same"``
    with a one-element ``dilation`` pads the first spatial dimension only, as ``nn.Conv`` does, where spreading it
    over every dimension gave another output size than the conv's), after :func:`_check_explicit_pads`. For a
    conv module ``conv`` the pads its constructor computed (:func:`~orthofx.nn.padding.torch_mode_pads`), which
    its forward uses whatever ``conv.padding`` says now; the functional :func:`conv_norm` has only ``padding``."""
    k, s, dil = _checked_sizes(len(size), kernel_size, stride, dilation)
    pads = conv_mode_pads(padding, k, dilation, s) if conv is None else torch_mode_pads(conv, where)
    return _check_explicit_pads(size, k, s, dil, pads, padding_mode, where)


def _check_explicit_pads(size: Sequence[int], k: tuple[int, ...], s: tuple[int, ...], dil: tuple[int, ...],
                         pads: Sequence[tuple[int, int]], padding_mode: str, where: str) -> tuple[tuple[int, int], ...]:
    """``pads`` (``d`` pairs, for a checked kernel size, stride and dilation of ``d`` ints each) after the checks
    the geometry of the padded size (with no padding left) could not make or name: the input is non-empty and
    covers the dilated kernel once padded (the error names the input's own size and its padding), and reflect
    padding is smaller than the input (it mirrors the input without repeating its edge, so it has ``n - 1`` entries
    to mirror; ``F.pad`` and torch's conv require the same)."""
    pads = tuple(tuple(pair) for pair in pads)
    _geometry_of_pads(tuple(int(n) for n in size), k, s, dil, pads, where)
    if padding_mode == "reflect" and any(max(pair) >= n for n, pair in zip(size, pads)):
        raise LayerArgumentError(
            f"{where}: padding_mode='reflect' pads the input by {[tuple(p) for p in pads]} (left, right) per spatial "
            f"dimension, and reflect padding must be smaller than the input size {tuple(int(n) for n in size)} in "
            f"each (it mirrors the input without repeating its edge; torch's conv requires the same): use larger "
            f"inputs, less padding, or padding_mode='replicate' / 'circular'")
    return pads


# ------------------------------------------------------------------------------------------------ filters

def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _pair_offsets(kernel_size: Sequence[int], dilation: Sequence[int], grid: Sequence[int],
                  device: torch.device) -> torch.Tensor:
    """Flat index on the grid of ``(t_s - t_r) mod grid`` for every pair of taps ``(s, r)`` of the dilated kernel
    (taps in row-major order, pairs as ``s * T + r``): ``(T * T,)``, int64."""
    axes = [torch.arange(k, device=device) * di for k, di in zip(kernel_size, dilation)]
    taps = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))  # (T, d)
    offsets = taps.unsqueeze(1) - taps.unsqueeze(0)                                           # (T, T, d)
    flat = torch.zeros(offsets.shape[:2], dtype=torch.int64, device=device)
    for i, size in enumerate(grid):
        flat = flat * size + offsets[..., i] % size
    return flat.reshape(-1)


def _power(weight: torch.Tensor, grid: Sequence[int], dilation) -> torch.Tensor:
    """sum_c |K_hat_{m,c}(w)|^2 on the grid (rfft layout: the last axis has L_d // 2 + 1 frequencies), float64.

    Computed as the DFT of each output channel's autocorrelation summed over its input channels,
    ``A_m(t) = sum_c sum_s K_{m,c}[s] K_{m,c}[s + t]`` (``t`` wrapped onto the grid; ``|K_hat|^2`` is the DFT of
    the autocorrelation): ``M`` transforms of a real even signal instead of ``M x C``, from the ``(M, T, T)`` Gram
    matrix of the ``T`` taps. On CPU that is 20-250x faster than transforming every kernel for the layers of a
    ResNet (2x for a 3-channel 7 x 7 stem). The sum runs in float64: ``A_m(t)`` cancels at frequencies where
    every kernel of channel ``m`` nearly vanishes (zero-mean kernels at ``w = 0``), and in float32 it is off
    there by about ``1e-7 T ||K_m||^2``, more than ``eps``.
    """
    d = weight.ndim - 2
    grid = tuple(int(v) for v in grid)
    dil = _ntuple(dilation, d, "dilation", broadcast=True)
    if any(v < 1 for v in dil):
        # a dilation of 0 put every tap at offset 0 (V of the kernel's sum), a negative one mirrored it: a wrong V
        raise LayerArgumentError(f"dilation must be a positive integer per spatial dimension (the conv's own), got "
                                 f"{dilation!r}")
    ks = tuple(weight.shape[2:])
    extent = _dilated_extent(ks, dil)
    if len(grid) != d or any(g < e for g, e in zip(grid, extent)):
        raise LayerArgumentError(f"grid {grid} must have {d} sizes, each at least the dilated kernel extent "
                                 f"{extent}")
    if _one_tap(ks):
        # K_hat_{m,c}(w) = w_{m,c} at every frequency: the power is ||w_m||^2 on the whole grid, what the FFT of the
        # single-tap autocorrelation gives, without the FFT and the float64 copy of the weight (half the transform
        # of a ResNet's convnorm report was this FFT for its 1 x 1 layers); a broadcast view, not a copy
        power = _one_tap_norms(weight).square()
        return power.view((-1,) + (1,) * d).expand((power.shape[0],) + grid[:-1] + (grid[-1] // 2 + 1,))
    taps = weight.detach().flatten(2)                              # (M, C, T)
    gram = _by_float64_rows(taps, lambda block: block.mT @ block)  # (M, T, T): sum over c of K[s] K[r]
    autocorrelation = gram.new_zeros(gram.shape[0], math.prod(grid))
    autocorrelation.index_add_(1, _pair_offsets(ks, dil, grid, gram.device), gram.flatten(1))
    spectrum = torch.fft.rfftn(autocorrelation.reshape(-1, *grid), dim=tuple(range(-d, 0)))
    # real up to rounding (A_m is even); a sum of squares cannot be negative
    return spectrum.real.clamp_min(0)


def convnorm_filter(weight: torch.Tensor, grid: Sequence[int], dilation=1, eps: float = 1e-5) -> torch.Tensor:
    """``V_m(w) = (sum_c |K_hat_{m,c}(w)|^2 + eps)^(-1/2)`` on an ``L_1 x ... x L_d`` grid, from the detached weight.

    Returns a real tensor of shape ``(M, L_1, ..., L_{d-1}, L_d // 2 + 1)`` (the ``rfftn`` half spectrum), dtype
    float32 or float64 like the weight (half precision weights give float32), no gradient.
    """
    return _filter(weight, grid, dilation, _checked_eps(eps))


def _filter(weight: torch.Tensor, grid: Sequence[int], dilation, eps: float) -> torch.Tensor:
    """:func:`convnorm_filter` for an ``eps`` checked already (by the layer's constructor, or by
    :func:`conv_norm`'s entry): in the forward, where ``torch.compile(dynamic=True)`` makes a float attribute
    symbolic and ``math.isfinite`` cannot take it."""
    return _filter_of_power(_power(weight, grid, dilation), eps, weight.dtype)


def _filter_of_power(power: torch.Tensor, eps: float, weight_dtype: torch.dtype) -> torch.Tensor:
    """``V = (power + eps)^(-1/2)`` of a float64 power spectrum (:func:`_power`, or the squared one-tap norms of
    :func:`_one_tap_norms`), in the real dtype the layer computes in for a weight of ``weight_dtype``: the one
    formula of the filter, the one-tap scale, and the filter the layer keeps from :meth:`ConvNormConvNd.gain_range`
    (so that a kept filter is the computed one bit for bit)."""
    return _inverse_sqrt(power + eps, _real_dtype(weight_dtype))


def _inverse_sqrt(power: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``power^(-1/2)`` of a float64 ``power + eps``, in ``dtype``. Taken in float64, then cast: in float32 a
    power above 3.4e38 (weights of magnitude 1e19 and more) overflowed to inf and gave ``V = 0`` (the layer
    returned its bias alone), and an ``eps`` below float32's smallest subnormal (1.4e-45) rounded to 0 and gave
    ``V = inf`` where a channel's kernels vanish (``0 * inf``: NaN outputs). ``V`` larger than ``dtype`` holds (a
    power + eps below ~1e-77 in float32) is clamped to its largest finite value, so that a vanishing frequency
    stays 0."""
    v = power.rsqrt()
    if dtype != torch.float64:
        v = v.clamp_max(torch.finfo(dtype).max)
    return v.to(dtype)


def _checked_eps(eps) -> float:
    """``eps`` as a float (:func:`~orthofx.theory._real`: numpy's and 0-d tensors' too, as
    ``nn.BatchNorm2d`` takes them); it keeps ``V`` finite where a channel's kernels vanish, so it must be > 0."""
    value = _real(eps)
    if value is None or not math.isfinite(value) or value <= 0:
        raise LayerArgumentError(f"eps must be a finite number > 0 (it keeps ConvNorm's filter finite where all "
                                 f"kernels of a channel vanish), got {eps!r}")
    return value


def _checked_momentum(momentum) -> float | None:
    """``momentum`` as a float in (0, 1] (:func:`~orthofx.theory._real`: numpy's and 0-d tensors' too, as
    ``nn.BatchNorm2d`` takes them), or ``None``."""
    if momentum is None:
        return None
    value = _real(momentum)
    if value is None or not 0 < value <= 1:
        raise LayerArgumentError(f"momentum must be None or a number in (0, 1], got {momentum!r}")
    return value


def _checked_max_running_grids(value, where: str = "") -> int | None:
    """``max_running_grids`` as an int >= 1, or ``None`` (no bound); ``where`` starts the error (a layer's label
    when the attribute is set later)."""
    if value is None:
        return None
    prefix = f"{where}: " if where else ""
    # numpy's and 0-d tensors' integers too; never a bool or a float
    return _positive_int(value, "max_running_grids", LayerArgumentError, message=(
        f"{prefix}max_running_grids must be None (no bound) or an integer >= 1 (the most running ConvNorm filters, "
        f"one per FFT grid, that a layer with momentum keeps; default {MAX_RUNNING_GRIDS}), got {value!r}"))


def _spatial_sizes(value, d: int, label: str, what: str) -> tuple[int, ...]:
    """A spatial size (an input size or an FFT grid) as a tuple of ints: an int applies to every spatial
    dimension, as ``to_plain``'s ``input_sizes`` take it (``filter(8)`` failed with "'int' object is not
    iterable"); a sequence holds one int per dimension (its length is checked by the caller). Anything else,
    a float size among it, raises."""
    def size(v) -> int:  # an int, numpy's too; not a float (8.9 was read as 8) nor a bool
        if isinstance(v, bool):
            raise TypeError(v)
        return operator.index(v)

    try:
        return (size(value),) * d if hasattr(value, "__index__") else tuple(size(v) for v in value)
    except (TypeError, ValueError):
        raise LayerArgumentError(f"{label}: {what} must be an int or {d} ints (one per spatial dimension), "
                                 f"got {value!r}") from None


def _grid_key(grid: Sequence) -> tuple[int, ...]:
    """An FFT grid as the key of a layer's running filters: a tuple of Python ints (from ints, SymInts under
    ``torch.compile``, or the digits of a ``running_v_<L1>x...`` name)."""
    return tuple(int(g) for g in grid)


def _one_tap(kernel_size: Sequence[int]) -> bool:
    return all(k == 1 for k in kernel_size)


def _one_tap_scale(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``V`` of a one-tap (1 x 1) kernel, whose spectrum is its weight at every frequency: the constant
    ``(||w_m||^2 + eps)^(-1/2)`` per output channel, ``(M,)``, from the detached weight (real dtype as
    :func:`convnorm_filter`). ConvNorm of such a layer is the plain conv with channel ``m`` scaled by it, on every
    grid: no FFT is needed."""
    return _filter_of_power(_one_tap_norms(weight).square(), eps, weight.dtype)


def _one_tap_norms(weight: torch.Tensor) -> torch.Tensor:
    """``||w_m||`` per output channel ``m`` (the weight flattened after dimension 0), ``(M,)``, float64, from the
    detached weight: ``vector_norm`` of its float64 values (float32 squares of weights of magnitude 1e19 and more
    overflowed, see :func:`_inverse_sqrt`), converted in blocks of rows (:func:`_by_float64_rows`).

    >>> w = torch.tensor([[3.0, 4.0], [1e30, 0.0]])
    >>> _one_tap_norms(w).tolist()
    [5.0, 1.0000000150474662e+30]
    """
    return _by_float64_rows(weight.detach().flatten(1), lambda block: torch.linalg.vector_norm(block, dim=1))


#: Elements (1 MiB of float64) of a weight converted to float64 at a time by :func:`_by_float64_rows` on CPU.
_FLOAT64_BLOCK = 1 << 17


def _by_float64_rows(weight: torch.Tensor, reduce) -> torch.Tensor:
    """``reduce(weight.to(float64))`` for a detached weight whose rows ``reduce`` treats each on its own (a batched
    matmul, a norm along dimension 1), float64.

    On CPU the weight is converted in blocks of rows of about 1 MiB, into one buffer that stays in cache, and each
    block reduced into its rows of the result: the same kernels on the same float64 rows, so the same numbers bit
    for bit, without writing and reading back a float64 copy of the whole weight (ResNet-50's convnorm transform:
    the 17 tap Gram matrices 35 -> 14 ms, the 36 one-tap norms 10 -> 8 ms on one thread; ``vector_norm`` with
    ``dtype=`` converts its whole input first too). Elsewhere (a GPU: the blocks would be more kernel launches),
    under ``torch.compile`` / ``torch.export`` (a loop of copies to trace) and in ``torch.func`` transforms (a
    batched weight cannot be copied into a plain buffer), the whole weight is converted at once."""
    if (weight.device.type != "cpu" or torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or torch._C._functorch.is_functorch_wrapped_tensor(weight)):
        return reduce(weight.to(torch.float64))
    rows = weight.shape[0]
    step = max(1, _FLOAT64_BLOCK // max(1, math.prod(weight.shape[1:])))
    buffer = torch.empty((min(step, rows),) + tuple(weight.shape[1:]), dtype=torch.float64, device=weight.device)
    out = None
    for start in range(0, rows, step):
        block = buffer[:min(step, rows - start)]
        block.copy_(weight[start:start + block.shape[0]])
        part = reduce(block)
        if out is None:
            out = part.new_empty((rows,) + tuple(part.shape[1:]))
        out[start:start + part.shape[0]] = part
    return reduce(buffer) if out is None else out  # no rows: reduce's empty result


def _kept_real(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """A ConvNorm filter ``old`` after ``nn.Module._apply`` made ``new`` of it (``.to()``, ``.half()``, ``.cuda()``
    ...): ``new``, except that a cast to half precision gives float32 instead (converted from the values before
    the cast, so not rounded), the precision the layer computes ``V`` in for half-precision weights. In half
    precision ``V`` would be off by up to 0.4 % and a running average of it would stall."""
    if new.dtype in (torch.float32, torch.float64):
        return new
    return old.detach().to(device=new.device, dtype=torch.float32)


def _converted_filter(fn, old: torch.Tensor) -> torch.Tensor:
    """A ConvNorm filter through ``fn``, the function ``nn.Module._apply`` maps over a module's tensors: moved and
    cast as :func:`_kept_real` says, and not given a memory format (a filter is a half spectrum per channel, not a
    conv kernel: ``.to(memory_format=torch.channels_last_3d)`` refused a 3-D layer's 4-D filters)."""
    return _kept_real(old, without_memory_format(fn)(old))


def _apply_keeping_filters_real(module: nn.Module, apply, fn, recurse: bool, prefix: str) -> nn.Module:
    """``nn.Module._apply`` for a module holding ConvNorm filters as buffers named ``<prefix>...``: they move with
    it, converted as :func:`_converted_filter` says; its other tensors go through ``fn`` itself."""
    filters = {id(buf) for name, buf in module._buffers.items() if name.startswith(prefix) and buf is not None}

    def convert(t: torch.Tensor) -> torch.Tensor:
        return _converted_filter(fn, t) if id(t) in filters else fn(t)

    return apply(convert, recurse)


def channel_gains(weight: torch.Tensor, grid: Sequence[int], dilation=1) -> torch.Tensor:
    """``sqrt(sum_c |K_hat_{m,c}(w)|^2)``: the gain (singular value) of output channel ``m``'s row operator at
    each frequency of the circular grid; ConvNorm makes them ``sqrt(g^2 / (g^2 + eps))``, i.e. about 1."""
    # the square root in float64: the power of float32 weights of magnitude 1e19 and more overflows float32
    return _power(weight, grid, dilation).sqrt().to(_real_dtype(weight.dtype))


def channel_gain_range(weight: torch.Tensor, grid: Sequence[int], dilation=1) -> tuple[float, float]:
    """The smallest and largest of :func:`channel_gains` (over channels and frequencies), the same numbers, without
    forming the gains: ``sqrt`` and the cast to the weight's real dtype are monotone, so they are taken of the
    extremes of the power only (what the ``convnorm`` pass reports per layer as ``row_gain_min`` / ``_max``).

    >>> w = torch.zeros(2, 1, 1, 3)
    >>> w[0, 0, 0, 0], w[1, 0, 0, :] = 2.0, torch.tensor([1.0, 1.0, 0.0])    # |K_hat| = 2; |1 + e^(-iw)|
    >>> channel_gain_range(w, (1, 4))                                         # 2 cos(w / 2): 0 at w = pi
    (0.0, 2.0)
    """
    return _gain_range_of_power(_power(weight, grid, dilation), weight.dtype)


def _gain_range_of_power(power: torch.Tensor, weight_dtype: torch.dtype) -> tuple[float, float]:
    """:func:`channel_gain_range` of a float64 power spectrum (or of the squared one-tap norms, which are the
    spectrum's values at every frequency): the square roots of its extremes, rounded to the weight's real dtype."""
    low, high = torch.aminmax(power)
    dtype = _real_dtype(weight_dtype)
    return float(low.sqrt().to(dtype)), float(high.sqrt().to(dtype))


# ------------------------------------------------------------------------------------------------ functional

def _normalise(z: torch.Tensor, v: torch.Tensor, geo: ConvNormGeometry) -> torch.Tensor:
    """``irfftn(rfftn(z) * v)`` at the layer's output positions only (``geo.start`` + ``geo.stride`` * i).

    The transforms run one axis at a time so that each inverse keeps only the rows the layer outputs before the
    next axis is transformed (a strided layer keeps 1 / S of them): 5-40 % faster than the full ``irfftn`` and a
    crop on CPU, the same numbers. Under ``torch.autocast`` the conv before it gives a half-precision ``z``: the
    normalisation still runs in float32 (``V`` spans orders of magnitude; rounded to bfloat16 it would be off by
    up to 0.4 %, and inductor on CUDA has no half-precision FFT)."""
    d = len(geo.grid)
    z = z.to(_real_dtype(z.dtype))
    keep = [slice(st, st + sd * (no - 1) + 1, sd) for st, sd, no in zip(geo.start, geo.stride, geo.output_size)]
    if z.numel() == 0:  # an empty batch: the FFT libraries refuse empty transforms; the output is empty too
        return z[(Ellipsis,) + tuple(keep)]
    spectrum = torch.fft.rfft(z, dim=-1)
    for dim in range(-d, -1):
        spectrum = torch.fft.fft(spectrum, dim=dim)
    spectrum = spectrum * v.to(z.dtype)
    for i, dim in enumerate(range(-d, -1)):
        spectrum = torch.fft.ifft(spectrum, dim=dim)
        if geo.output_size[i] != geo.grid[i]:  # a no-op slice would be an alias, which ONNX has no complex form of
            spectrum = spectrum[(Ellipsis, keep[i]) + (slice(None),) * (-dim - 1)]
    return torch.fft.irfft(spectrum, n=geo.grid[-1], dim=-1)[..., keep[-1]]


def _check_padding_mode(padding_mode, where: str) -> None:
    """A conv's ``padding_mode`` must be one torch's convs take (``nn.Conv`` checks it only in its constructor: one
    set on the conv later reached the geometry, the filters and ``to_plain`` unchecked, and failed in the frozen
    layer's forward with torch's ``NotImplementedError``)."""
    if padding_mode not in _PAD_MODES:
        raise LayerArgumentError(f"{where}: padding_mode must be one of {sorted(_PAD_MODES)} (those torch's "
                                 f"convolutions take), got {padding_mode!r}; set conv.padding_mode to one of them")


def _explicit_pad(x: torch.Tensor, pads: Sequence[tuple[int, int]], padding_mode: str) -> torch.Tensor:
    """``x`` padded by ``(left, right)`` per spatial dimension in a conv's non-zero ``padding_mode`` (circular
    padding through :func:`~orthofx.nn.padding.circular_pad`, whose backward is cheaper than ``F.pad``'s)."""
    if not any(p for pair in pads for p in pair):
        return x
    if padding_mode == "circular":
        return circular_pad(x, pads)
    return F.pad(x, flat_pads(pads), mode=padding_mode)


def _caller(layer: nn.Module | None) -> str:
    return "conv_norm" if layer is None else layer_label(layer)


def _batched_input(x: torch.Tensor, weight: torch.Tensor, groups: int, caller: str) -> tuple[torch.Tensor, bool]:
    """``x`` with a batch dimension (added to an unbatched input) and whether it was added, after checking that it
    is a floating-point input of the weight's working precision with the number of dimensions and channels the
    convolution takes."""
    d = weight.ndim - 2
    check_tensor_input(x, caller)
    if not x.is_floating_point():
        raise LayerArgumentError(f"{caller}: the input must be a real floating-point tensor (as for torch's "
                                 f"convolutions), got dtype {x.dtype}; convert it first, e.g. x.float()")
    if _real_dtype(x.dtype) != _real_dtype(weight.dtype):
        # the layer computes in the input's working precision: a float32 input rounded a float64 weight (and V)
        # to float32 silently, a float64 input promoted a float32 layer; torch's convolutions refuse both
        raise LayerArgumentError(
            f"{caller}: the input is {x.dtype} and the convolution's weight is {weight.dtype}; like torch's "
            f"convolutions (under autocast too), ConvNorm does not mix float64 with a lower precision: convert "
            f"the input (x.to({weight.dtype})) or the layer (layer.to({x.dtype}))")
    unbatched = x.ndim == d + 1
    if unbatched:
        x = x.unsqueeze(0)
    if x.ndim != d + 2:
        raise LayerArgumentError(f"{caller}: expected a {d + 2}-D (batched) or {d + 1}-D (unbatched) input "
                                 f"for a {d}-D convolution, got shape {tuple(x.shape)}")
    if x.shape[1] != weight.shape[1] * groups:
        raise LayerArgumentError(f"{caller}: the input has {x.shape[1]} channels (shape {tuple(x.shape)}) "
                                 f"where the convolution takes {weight.shape[1] * groups} (weight "
                                 f"{tuple(weight.shape)}, groups={groups})")
    return x, unbatched


def _output_dtype(in_dtype: torch.dtype, conv_dtype: torch.dtype) -> torch.dtype:
    """The dtype a ConvNorm layer returns: the input's, or the half precision ``torch.autocast`` gave the conv
    inside it (``conv_dtype``), as ``nn.Conv`` returns under autocast; the normalisation between runs in float32
    all the same."""
    return conv_dtype if conv_dtype in HALF_PRECISION else in_dtype


def _after_forward_pre_hooks(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run ``conv``'s forward pre-hooks on ``x`` as ``conv(x)`` would, and return the input they leave.

    ConvNorm convolves with ``conv.weight`` itself and never calls ``conv``, but what such hooks do belongs to the
    conv: ``torch.nn.utils.prune`` and the older ``weight_norm`` / ``spectral_norm`` recompute ``conv.weight`` from
    their parameters before each call (without that, a second training step backpropagated through the first
    step's freed graph), and a hook may change the input. The conv's forward hooks do not run: its output is never
    formed (ConvNorm filters the full correlation before cropping). Global hooks run only on modules called."""
    for hook_id, hook in tuple(conv._forward_pre_hooks.items()):
        if hook_id in conv._forward_pre_hooks_with_kwargs:
            result = hook(conv, (x,), {})
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], tuple)):
                    raise LayerArgumentError(
                        f"a forward pre-hook of {layer_label(conv)} registered with with_kwargs=True returned a "
                        f"{type(result).__name__}; such a hook must return None (keep the input) or a pair "
                        f"(args, kwargs), as torch requires, e.g. ((x,), {{}})")
                args, kwargs = result
                # conv.forward's one parameter is ``input``: conv(input=x) is a call torch accepts, any other
                # keyword would make nn.Module's call fail
                if kwargs:
                    if set(kwargs) != {"input"} or args:
                        also = f" besides {len(args)} positional ones" if args else ""
                        raise LayerArgumentError(
                            f"a forward pre-hook of {layer_label(conv)} returned keyword arguments {sorted(kwargs)}"
                            f"{also}; ConvNorm passes the conv one tensor, positionally or as the conv's forward "
                            f"parameter input: return ((x,), {{}}), ((), {{'input': x}}) or None")
                    args = (kwargs["input"],)
                x = _one_input(args, conv)
        else:
            result = hook(conv, (x,))
            if result is not None:
                x = _one_input(result if isinstance(result, tuple) else (result,), conv)
    return x


def _one_input(args: tuple, conv: nn.Module) -> torch.Tensor:
    if len(args) != 1 or not isinstance(args[0], torch.Tensor):
        got = f"{len(args)} inputs" if len(args) != 1 else f"a {type(args[0]).__name__}, not a tensor"
        raise LayerArgumentError(
            f"a forward pre-hook of {layer_label(conv)} returned {got}; ConvNorm passes the conv one tensor, so a "
            f"pre-hook of its conv must return one tensor (or None to keep the input)")
    return args[0]


def _recompute_hooked_weight(conv: nn.Module) -> bool:
    """Run ``conv``'s forward pre-hooks once, on a probe input, so that ``conv.weight`` is the weight they compute
    from the parameters now; returns whether a hook changed the input (returned a new tensor).

    ``torch.nn.utils.prune``, the older ``weight_norm`` / ``spectral_norm`` and a user's hook that assigns
    ``conv.weight`` set the attribute at each call: after an optimizer step (or ``load_state_dict``) it still holds
    the weight of the last forward, until the next forward runs the hooks. Whatever reads the weight outside the
    forward calls this first (:meth:`~ConvNormConvNd.to_plain`; :meth:`ConvNormConvNd.gain_range`,
    :meth:`~ConvNormConvNd.filter` and :func:`update_running_filters` through :func:`_refresh_hooked_weight`). The
    hooks run with the conv in eval mode (``spectral_norm`` takes no power-iteration step, so reading the weight
    does not change it: ``W / sigma`` from the current ``u``, ``v``), and with gradients on, as in a forward (the
    weight requires grad where its parameters do, and is left as a forward would leave it). A conv without
    pre-hooks is left alone (no probe is made)."""
    if not conv._forward_pre_hooks:
        return False
    probe = conv.weight.new_zeros((1, conv.in_channels, *conv.kernel_size))
    # each module's own mode, parents first: conv.train(mode) alone set every submodule to the conv's mode (a hook's
    # weight generator kept in eval, its dropout off, came back in training mode from a gain_range() call)
    modes = [(module, module.training) for module in conv.modules()]
    conv.train(False)
    try:
        with torch.enable_grad():
            x = _after_forward_pre_hooks(conv, probe)
    finally:
        for module, mode in modes:
            if module.training != mode:
                module.train(mode)  # its submodules, later in the list, are set to their own modes after it
    return x is not probe


def _refresh_hooked_weight(conv: nn.Module) -> None:
    """:func:`_recompute_hooked_weight` for what reads the weight outside the forward
    (:meth:`ConvNormConvNd.gain_range`, :meth:`~ConvNormConvNd.filter`, :func:`update_running_filters`), only
    where a pre-hook can have set it: where ``conv.weight`` is no parameter of the conv's own nor a
    parametrization's. ``prune``, the older ``weight_norm`` / ``spectral_norm`` and a user's hook assigning
    ``conv.weight`` a computed tensor all delete the parameter first (torch refuses a plain tensor under a
    parameter's name). A conv whose weight is its own parameter keeps its hooks unrun: none of them can have
    replaced the weight, and run on a probe of zeros outside a forward they counted one call more, fed an
    input-statistics hook a zero input, or raised from a hook checking the input's size. (A hook writing the
    parameter in place, e.g. a max-norm ``renorm_``, is not run either: the weight read is the parameter as it
    is.) A parametrized weight needs no hook: torch computes it at every access."""
    if "weight" in conv._parameters or nn.utils.parametrize.is_parametrized(conv, "weight"):
        return
    _recompute_hooked_weight(conv)


def _weight_for_freezing(conv: nn.Module, label: str) -> None:
    """:func:`_recompute_hooked_weight` before ``to_plain`` bakes ``conv.weight`` into the frozen layer (it baked the
    weight of the last forward: the frozen layer's outputs were those of the weights one step before). A hook that
    changes the input (returns a new tensor) is refused: the frozen layer convolves with a plain conv, which cannot
    run it."""
    if _recompute_hooked_weight(conv):
        raise LayerArgumentError(
            f"{label}: a forward pre-hook of its conv changes the input (it returned a new tensor), and the frozen "
            f"layer (a plain conv and the precomputed filters) cannot run it, so its outputs would differ from the "
            f"layer's. Make that change in the model's forward, before the layer, or remove the hook before freezing")


def _apply_affine(affine: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The affine depthwise conv on ``y``, in its weight's dtype and back: a half-precision input to a float32
    layer comes back half precision (nn.Conv refuses the mixed dtypes, which autocast would have cast)."""
    return affine(y.to(affine.weight.dtype)).to(y.dtype)


def _conv_norm(x: torch.Tensor, weight: torch.Tensor, bias, stride, padding, dilation, groups: int, eps: float,
               padding_mode: str, v_for, layer: nn.Module | None = None, conv: nn.Module | None = None) -> torch.Tensor:
    """Shared forward; ``v_for(grid, geometry)`` returns the filter for the grid (or ``None`` to compute it);
    error messages name ``layer`` (``None``: the functional ``conv_norm``); a non-zero padding mode pads by the conv
    module ``conv``'s own pads where given (:func:`_explicit_pads`)."""
    d = weight.ndim - 2
    _check_padding_mode(padding_mode, _caller(layer))
    x, unbatched = _batched_input(x, weight, groups, _caller(layer))
    ks = tuple(weight.shape[2:])
    dil = _ntuple(dilation, d, "dilation", broadcast=True)
    if padding_mode != "zeros":
        # the dilation as given: a one-element one makes torch's "same" pad one dimension (conv_mode_pads)
        x = _explicit_pad(x, _explicit_pads(x.shape[2:], ks, stride, padding, dilation, padding_mode,
                                            _caller(layer), conv), padding_mode)
        padding = 0
    geo = convnorm_geometry(x.shape[2:], ks, stride, padding, dil, where=_caller(layer))

    in_dtype = x.dtype
    work = _real_dtype(in_dtype)
    xw = x.to(work)
    w = weight.to(work)
    v = v_for(geo.grid, geo)
    if v is None and _one_tap(ks):
        y = _CONV_FN[d](xw, w, None, stride, padding, dil, groups)
        out_dtype = _output_dtype(in_dtype, y.dtype)
        scale = _kept_or_built(layer, "scale", None, lambda: _one_tap_scale(weight, eps))
        # in place: the conv's output is a new tensor its backward does not need (one allocation fewer per layer)
        y = y.to(work).mul_(scale.to(work).view((1, -1) + (1,) * d))
    else:
        if geo.pad_left == geo.pad_right:
            z = _CONV_FN[d](xw, w, None, 1, geo.pad_left, dil, groups)
        else:
            z = _CONV_FN[d](F.pad(xw, flat_pads(list(zip(geo.pad_left, geo.pad_right)))), w, None, 1, 0, dil, groups)
        out_dtype = _output_dtype(in_dtype, z.dtype)
        if v is None:
            v = _kept_or_built(layer, "filter", geo.grid, lambda: _filter(weight, geo.grid, dil, eps))
        y = _normalise(z, v, geo)
    if bias is not None:
        y = y + bias.to(work).view((1, -1) + (1,) * d)
    y = y.to(out_dtype)
    return y.squeeze(0) if unbatched else y


def _put_bounded(store: dict, key, value) -> None:
    """``store[key] = value`` as the most recent entry, dropping the oldest beyond ``MAX_REMEMBERED_SIZES``: the
    input sizes a layer remembers for freezing and the filters it keeps in eval mode."""
    store.pop(key, None)
    store[key] = value
    while len(store) > MAX_REMEMBERED_SIZES:
        store.pop(next(iter(store)))


def _kept_or_built(layer: nn.Module | None, kind: str, grid, build):
    """``build()`` (the one-tap scale or the filter of ``grid`` from the layer's weight), or the same tensor kept by
    ``layer`` in eval mode (:meth:`ConvNormConvNd._eval_kept`); the functional ``conv_norm`` keeps nothing."""
    return build() if layer is None else layer._eval_kept(kind, grid, build)


def conv_norm(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
              dilation=1, groups: int = 1, *, eps: float = 1e-5, padding_mode: str = "zeros",
              filter: torch.Tensor | None = None) -> torch.Tensor:
    """Functional ConvNorm: ``conv(input, weight, stride, padding, dilation, groups)`` normalised per output
    channel in the Fourier domain, then ``bias`` added; output shape equals the convolution's.

    ``filter`` overrides ``V`` (shape ``(M, L_1, ..., L_d // 2 + 1)`` for the grid of
    :func:`convnorm_geometry`); by default it is :func:`convnorm_filter` of the detached weight.
    """
    if filter is not None:
        def v_for(grid, geo):
            expected = (weight.shape[0],) + tuple(grid[:-1]) + (grid[-1] // 2 + 1,)
            if tuple(filter.shape) != expected:
                raise LayerArgumentError(f"filter must have shape {expected} for grid {tuple(grid)}, got "
                                         f"{tuple(filter.shape)}")
            return filter
    else:
        def v_for(grid, geo):
            return None
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups:
        # torch's conv raised its own error for a count not dividing the output channels; 0 read as "takes 0 channels"
        raise LayerArgumentError(f"conv_norm: groups must be a positive integer dividing the weight's "
                                 f"{weight.shape[0]} output channels (weight {tuple(weight.shape)}: out_channels x "
                                 f"in_channels / groups x kernel), got {groups!r}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        # added after the normalisation by broadcasting: a 1-entry (or (M, 1)) bias was accepted silently, where
        # torch's convolutions refuse it
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise LayerArgumentError(f"conv_norm: bias must be None or a 1-D tensor with one entry per output channel "
                                 f"({weight.shape[0]}, the weight's first dimension; as for torch's convolutions), "
                                 f"got {got}")
    return _conv_norm(input, weight, bias, stride, padding, dilation, groups, _checked_eps(eps), padding_mode,
                      v_for)


# ------------------------------------------------------------------------------------------------ modules

class _LayerTypeError(LayerArgumentError, TypeError):
    """A ConvNorm layer was given a module of the wrong type: a LayerArgumentError that is also the TypeError
    these checks raised before (``except TypeError`` keeps working)."""


def _not_a_conv(conv, accepted: str, fix: str) -> _LayerTypeError:
    """The error for wrapping ``conv``, which is not a convolution of an accepted type."""
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        fix = "ConvNorm normalises a convolution's output channels: transposed convolutions are not supported"
    return _LayerTypeError(f"{accepted}, got a {type(conv).__qualname__}; {fix}")


#: The methods of ``nn.Conv{d}d`` whose code decides what the layer computes from its weight and input.
_CONV_CODE = ("forward", "_conv_forward")


def overridden_conv_code(conv: nn.Module) -> str | None:
    """Why ConvNorm cannot wrap ``conv``, a subclass of ``nn.Conv{d}d`` whose class overrides ``forward`` or
    ``_conv_forward`` (a weight-standardised ``StdConv2d``, a scaled or shifted output, fake quantisation), or
    ``None``.

    ConvNorm never calls the conv's forward: it convolves the input with ``conv.weight`` at stride 1 over the
    whole linear correlation, filters by ``V`` of that weight, then crops and subsamples at the conv's output
    positions (see the module docs), so another forward's code cannot be put through it and would be dropped
    silently. The ``ConvNormConv{d}d`` constructor raises it, the ``convnorm`` pass skips the layer with it. A
    subclass that only adds attributes or a constructor, or a torch parametrization of the weight (which ConvNorm
    reads at every forward), is fine.

    >>> import torch
    >>> class Scaled(torch.nn.Conv2d):
    ...     def forward(self, x):
    ...         return 2 * super().forward(x)
    >>> overridden_conv_code(Scaled(3, 4, 3)).split(", whose")[0]
    'Scaled overrides nn.Conv2d.forward (Scaled.forward)'
    >>> overridden_conv_code(torch.nn.Conv2d(3, 4, 3)) is None
    True
    """
    mro = type(conv).__mro__
    base = next((klass for klass in mro if klass in _CONV_CLS.values()), None)
    if base is None:
        return None
    for name in _CONV_CODE:
        owner = next(klass for klass in mro if name in vars(klass))
        if mro.index(owner) < mro.index(base):
            return (f"{type(conv).__qualname__} overrides nn.{base.__name__}.{name} ({owner.__qualname__}.{name}), "
                    f"whose code ConvNorm would drop (it convolves with the layer's weight itself)")
    return None


class ConvNormConvNd(_ComputedWeight, _EvalCache, nn.Module):
    """A convolution followed by ConvNorm (P3), as one module owning the conv (see the module docstring).

    Args:
        conv: the convolution (``nn.Conv1d`` / ``Conv2d`` / ``Conv3d`` for the 1d / 2d / 3d class; any padding,
            padding mode, stride, dilation, groups; not transposed). It becomes the child ``conv``. A subclass whose
            class overrides ``forward`` or ``_conv_forward`` is refused (:func:`overridden_conv_code`): the wrapper
            convolves with ``conv.weight`` itself and would drop that code. The conv's forward pre-hooks run
            before each forward (``torch.nn.utils.prune`` recomputing the weight, a hook changing the input); its
            forward hooks do not, since its output is never formed.
        eps: added to ``sum_c |K_hat|^2`` before the inverse square root (> 0).
        affine: add the learned depthwise-conv affine part (child ``affine``), initialised to the identity.
        momentum: ``None`` (default) to recompute ``V`` from the weight in eval too; a float in (0, 1] to keep
            P3's running ``V`` per grid size for eval.
        affine_kernel_size: kernel size of the affine depthwise conv (default: the conv's kernel size).
        max_running_grids: with ``momentum``, the most running filters (one per FFT grid, so per input size) the
            layer keeps (default 16; ``None``: no bound). A training forward on a new grid when the layer holds
            this many drops the filter of the least recently *updated* grid, with a
            :class:`RunningFiltersDroppedWarning` (once per layer); eval on that size then uses ``V`` of the
            current weight, as for a size never trained on. Each filter holds ``M x L_1 x ... x (L_d // 2 + 1)``
            floats (2 MB for 256 channels on a 64 x 64 grid). Also an attribute, which may be changed later.
    """

    _dims: ClassVar[int] = 0
    _conv_type: ClassVar[type] = nn.Conv2d

    def __init__(self, conv: nn.Module, eps: float = 1e-5, affine: bool = False, momentum: float | None = None,
                 affine_kernel_size=None, max_running_grids: int | None = MAX_RUNNING_GRIDS):
        super().__init__()
        d = self._dims
        if not isinstance(conv, self._conv_type):
            raise _not_a_conv(conv, f"{type(self).__name__} wraps an nn.{self._conv_type.__name__}",
                              "pass one, or use orthofx.nn.convnorm.with_convnorm(conv) to pick the class of its "
                              "dimension")
        problem = overridden_conv_code(conv)
        if problem is not None:
            raise _LayerTypeError(
                f"{type(self).__name__} cannot wrap this convolution: {problem}. ConvNorm never calls the conv's "
                f"forward: it convolves the input with conv.weight at stride 1 over the whole correlation, filters "
                f"the result, then crops and subsamples at the conv's output positions, so another forward cannot "
                f"be put through it. Fix: compute a kernel change (weight standardisation) as "
                f"torch.nn.utils.parametrize.register_parametrization(conv, 'weight', ...), which ConvNorm reads at "
                f"every forward; otherwise wrap a plain nn.{self._conv_type.__name__} and keep the rest of the "
                f"override as a module of its own")
        if isinstance(conv.weight, nn.parameter.UninitializedParameter):
            raise LayerArgumentError("the convolution is lazy and not initialised yet; run it once before wrapping it")
        eps = _checked_eps(eps)
        momentum = _checked_momentum(momentum)
        max_running_grids = _checked_max_running_grids(max_running_grids)
        # a truthy non-bool (affine="no", "false" from a config file) added a learned part silently
        affine = _flag(affine, "affine (add the learned depthwise-conv affine part or not)", LayerArgumentError)
        self.conv = conv
        self.eps = eps
        self.momentum = momentum
        self._max_running_grids = max_running_grids
        if affine:
            m = conv.out_channels
            k = conv.kernel_size if affine_kernel_size is None else _ntuple(affine_kernel_size, d,
                                                                             "affine_kernel_size")
            if any(v < 1 for v in k):
                raise LayerArgumentError(f"affine_kernel_size must be positive, got {affine_kernel_size!r}")
            layer = self._conv_type(m, m, k, stride=1, padding="same", groups=m, bias=True,
                                    device=conv.weight.device, dtype=conv.weight.dtype)
            setattr(layer, WRAPPED_MARKER, True)
            self.affine = layer
            self.reset_affine()
        elif affine_kernel_size is not None:
            # OrthogonalConvNd refuses an unused input_size alike: a size given for nothing was a mistake unseen
            raise LayerArgumentError(f"affine_kernel_size={affine_kernel_size!r} is given but affine is False: pass "
                                     "affine=True to add the learned depthwise-conv affine part, or leave "
                                     "affine_kernel_size out")
        else:
            self.affine = None
        # marked only once every argument is checked: a refused wrapper leaves the user's conv as it was
        setattr(conv, WRAPPED_MARKER, True)
        self._input_sizes: dict[tuple[int, ...], None] = {}
        # the running filters per FFT grid: a plain dict, not buffers (see "Running V and eval mode")
        self._running_filters: dict[tuple[int, ...], torch.Tensor] = {}
        # the same grids, least recently updated first (_running_filters keeps the order they were stored in,
        # which is the state_dict's order): the one dropped first when max_running_grids is reached
        self._running_order: dict[tuple[int, ...], None] = {}
        self._running_held = False  # True inside running_filters_held
        self._drop_warned = False  # the RunningFiltersDroppedWarning was issued (or is pending)
        self._drop_pending: tuple | None = None  # (new grid, dropped grids) of a drop in a compiled forward
        self.train(conv.training)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_running_held", False)
        # layers pickled before the bound existed kept every filter: they get the default bound from now on; layers
        # pickled while it was a plain attribute kept it under the property's name
        if "_max_running_grids" not in self.__dict__:
            self._max_running_grids = self.__dict__.pop("max_running_grids", MAX_RUNNING_GRIDS)
        self.__dict__.setdefault("_drop_warned", False)
        self.__dict__.setdefault("_drop_pending", None)
        if "_running_filters" not in self.__dict__:
            # a layer pickled when its running filters were buffers named running_v_<L1>x...: take them out
            self._running_filters = {
                _grid_key(self._name_sizes(name)): self._buffers.pop(name)
                for name in [n for n in self._buffers if n.startswith(_RUNNING_PREFIX)]}
        if set(self.__dict__.get("_running_order", ())) != set(self._running_filters):
            # pickled before updates were ordered: the order the filters were stored in
            self._running_order = dict.fromkeys(self._running_filters)

    def __getattr__(self, name: str):
        # the running filters' state_dict keys name them as attributes, as a buffer's key does, and tools that
        # walk a state_dict look each key up with getattr (torch.distributed.checkpoint's get_model_state_dict)
        if name.startswith(_RUNNING_PREFIX):
            sizes = self._name_sizes(name)
            if all(v.isdigit() for v in sizes):
                running = self.__dict__.get("_running_filters", {}).get(_grid_key(sizes))
                if running is not None:
                    return running
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:
        # torch.func.functional_call (and torch.nn.utils.stateless) substitutes each key of its dict with setattr
        # and puts the original back the same way, so a state_dict's running_v_* keys (an ensemble member's
        # filters, stacked for vmap) arrive here: stored in __dict__ as plain attributes they were ignored by the
        # forward and left behind, shadowing the layer's own filter for getattr ever after
        if name.startswith(_RUNNING_PREFIX):
            self._set_running_filter(name, value)
        else:
            super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        # functional_call's restore deletes a key it substituted that the layer did not have (a grid it never saw)
        if name.startswith(_RUNNING_PREFIX) and "_running_filters" in self.__dict__:
            sizes = self._name_sizes(name)
            if all(v.isdigit() for v in sizes) and _grid_key(sizes) in self._running_filters:
                self._running_filters.pop(_grid_key(sizes))
                self._running_order.pop(_grid_key(sizes), None)
                return
        super().__delattr__(name)

    def _set_running_filter(self, name: str, value) -> None:
        """``layer.running_v_<L1>x... = tensor``: the running filter of that grid is ``tensor`` itself (kept in its
        place in the order of updates; a new grid counts as updated last), as a buffer assigned by name is; what
        ``torch.func.functional_call`` does with a ``state_dict``'s ``running_v_*`` keys, so that an ensemble of
        layers (each member's filters stacked, ``vmap`` over ``functional_call``) runs each member's filters. A
        layer with ``momentum=None``, a value that is no tensor or one shaped otherwise than the grid's filter is
        refused with a :class:`~orthofx.errors.LayerArgumentError` (one shaped otherwise would broadcast over the
        channels in eval, silently)."""
        label = layer_label(self)
        if self.momentum is None:
            raise LayerArgumentError(
                f"{label} has momentum=None: it keeps no running ConvNorm filters (its filter is recomputed from the "
                f"weight in eval too), so it cannot take {name}; leave the running_v_* keys out of the dict given "
                f"to torch.func.functional_call, or transform with the convnorm rule's momentum set")
        if not isinstance(value, torch.Tensor):
            raise LayerArgumentError(f"{label}: {name} is a running ConvNorm filter and must be a tensor, not "
                                     f"{type(value).__name__}")
        problem = self._running_filter_problem(name, value)
        if problem is not None:
            raise LayerArgumentError(f"{label}: {problem}")
        grid = _grid_key(self._name_sizes(name))
        self._running_filters[grid] = value
        self._running_order.setdefault(grid, None)

    def _replicate_for_data_parallel(self):
        # nn.DataParallel's replicas copy __dict__ shallowly: each gets a dict of its own, so that a replica on
        # another device stores its filters there (moved copies, lost with the replica, as DataParallel loses
        # buffer updates there), not in the layer's dict; the replica on the first device updates the layer's
        # tensors in place (recorded, as for buffers)
        replica = super()._replicate_for_data_parallel()
        replica._running_filters = dict(self._running_filters)
        replica._running_order = dict(self._running_order)
        replica._drop_eval_values()
        return replica

    @property
    def max_running_grids(self) -> int | None:
        """The most running filters (one per FFT grid) the layer keeps, or ``None`` (no bound); may be set, to an
        integer >= 1 or ``None`` (the constructor's check: 0 used to keep one filter all the same, a string failed
        in the middle of the next training forward)."""
        return self._max_running_grids

    @max_running_grids.setter
    def max_running_grids(self, value) -> None:
        self._max_running_grids = _checked_max_running_grids(value, layer_label(self))

    # ---- the conv's attributes, read-only

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight

    # weight and bias are the conv's (a ConvNorm holds no parameter of its own), which functional_call with the
    # model's names from before the transform would assign: refused (_ComputedWeight), naming the keys to give
    _computed = ("weight", "bias")
    _computed_what = "and bias are the wrapped conv's (conv.weight, conv.bias)"

    def _refuse_assignment(self) -> None:
        refuse_weight_assignment(self, self._computed_what, _CONV_PARAMETER_FIX)

    @weight.setter
    def weight(self, value) -> None:
        self._refuse_assignment()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.conv.bias

    @bias.setter
    def bias(self, value) -> None:
        self._refuse_assignment()

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.conv.kernel_size

    @property
    def stride(self) -> tuple[int, ...]:
        return self.conv.stride

    @property
    def padding(self):
        return self.conv.padding

    @property
    def dilation(self) -> tuple[int, ...]:
        return self.conv.dilation

    @property
    def groups(self) -> int:
        return self.conv.groups

    @property
    def padding_mode(self) -> str:
        return self.conv.padding_mode

    # ---- affine and running filters

    def reset_affine(self) -> None:
        """Set the affine depthwise conv to the identity (centre tap 1, bias 0)."""
        if self.affine is None:
            return
        with torch.no_grad():
            self.affine.weight.zero_()
            centre = (slice(None), 0) + tuple((k - 1) // 2 for k in self.affine.kernel_size)
            self.affine.weight[centre] = 1.0
            self.affine.bias.zero_()

    @staticmethod
    def _buffer_name(grid: Sequence[int]) -> str:
        """The ``state_dict`` key (after the layer's prefix) of the running filter of an FFT grid."""
        return _RUNNING_PREFIX + "x".join(str(int(g)) for g in grid)

    @staticmethod
    def _name_sizes(name: str) -> list[str]:
        """The grid sizes, as written, in a key :meth:`_buffer_name` made (``running_v_10x10`` -> ``['10', '10']``)."""
        return name[len(_RUNNING_PREFIX):].split("x")

    def running_filter(self, grid: Sequence[int]) -> torch.Tensor | None:
        """The running ``V`` kept for an FFT grid (see :meth:`geometry`; an int: the same size in every spatial
        dimension), or ``None``. A grid of another rank or with a size < 1 is refused (it can never be kept)."""
        key = _spatial_sizes(grid, self._dims, layer_label(self), "the FFT grid")
        if len(key) != self._dims or any(g < 1 for g in key):
            raise LayerArgumentError(
                f"{layer_label(self)}: running_filter takes an FFT grid of {self._dims} positive sizes (one per "
                f"spatial dimension, e.g. geometry(input_size).grid; kept: {self.running_grids}), got {grid!r}")
        return self._running_filters.get(key)

    @property
    def running_grids(self) -> list[tuple[int, ...]]:
        """The FFT grids a running ``V`` is kept for (at most ``max_running_grids`` once a training forward stores
        a new one), in the order they were stored in (the ``state_dict``'s)."""
        return list(self._running_filters)

    def reset_running_stats(self) -> None:
        """Forget every running ``V``."""
        self._running_filters.clear()
        self._running_order.clear()

    def reset_parameters(self) -> None:
        """The state of a new layer: the conv's own initialisation (``conv.reset_parameters()``), the identity
        affine part and no running filters. For deferred initialisation (built under ``torch.device("meta")``,
        then ``to_empty(device=...)``, which leaves every tensor uninitialised, running filters included). A loop
        calling ``reset_parameters()`` on every submodule resets the affine part (an ``nn.Conv``) to torch's random
        initialisation after this: call :meth:`reset_affine` after such a loop."""
        self.conv.reset_parameters()
        self.reset_affine()
        self.reset_running_stats()

    def geometry(self, input_size: Sequence[int]) -> ConvNormGeometry:
        """The FFT grid, crop offset and output size for a spatial input size (an int: the same size in every
        spatial dimension; padding modes other than zeros pad the input first)."""
        conv = self.conv
        size = _spatial_sizes(input_size, self._dims, layer_label(self), "input size")
        if len(size) != self._dims:
            raise LayerArgumentError(f"{layer_label(self)}: input size {size} must have {self._dims} spatial "
                                     f"sizes, one per spatial dimension of the convolution")
        padding = conv.padding
        _check_padding_mode(conv.padding_mode, layer_label(self))
        if conv.padding_mode != "zeros":
            pads = _explicit_pads(size, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.padding_mode,
                                  layer_label(self), conv)
            size = tuple(n + a + b for n, (a, b) in zip(size, pads))
            padding = 0
        return convnorm_geometry(size, conv.kernel_size, conv.stride, padding, conv.dilation, where=layer_label(self))

    def filter(self, input_size: Sequence[int]) -> torch.Tensor:
        """The ``V`` the current mode applies for a spatial input size (running in eval when kept), of the weight the
        conv's forward pre-hooks compute now (:func:`_refresh_hooked_weight`) when computed."""
        geo = self.geometry(input_size)
        v = None if self.training or self.momentum is None else self.running_filter(geo.grid)
        if v is not None:
            return v
        _refresh_hooked_weight(self.conv)  # the weight the next forward convolves with, not the last one's
        return _filter(self.conv.weight, geo.grid, self.conv.dilation, self.eps)

    # ---- the eval-mode cache of V (the conditions and key of orthofx.nn.orthogonal._EvalCache)

    def gain_range(self, input_size: Sequence[int]) -> tuple[ConvNormGeometry, float, float]:
        """The geometry of a spatial input size and the smallest and largest channel gain on its grid
        (:func:`channel_gain_range` of the weight: ``sqrt(min / max_{m,w} sum_c |K_hat_{m,c}(w)|^2)``), the same
        numbers; the filter ``V = (power + eps)^(-1/2)`` of that grid (the one-tap scale for a 1 x 1 kernel) is
        made from the same float64 power on the way and kept as the next eval-mode forward without gradients would
        keep it (:meth:`_eval_kept`), so that the ``convnorm`` pass's report and ``transform``'s run on the example
        inputs transform the weight once, not twice. The weight is the one the next forward convolves with: the
        conv's forward pre-hooks run first where they set it (:func:`_refresh_hooked_weight`: ``prune``,
        ``weight_norm``, a hook assigning ``conv.weight``), not the weight the last forward left.

        >>> import torch
        >>> layer = ConvNormConv2d(torch.nn.Conv2d(3, 4, 3, padding=1)).eval()
        >>> geo, low, high = layer.gain_range((8, 8))
        >>> geo.grid, (low, high) == channel_gain_range(layer.weight, geo.grid)
        ((10, 10), True)
        """
        geo = self.geometry(input_size)
        conv = self.conv
        # the conv's pre-hooks (prune, weight_norm, a user's) compute the weight the forward convolves with: without
        # them the gains, and the filter kept, were those of the last forward's weight (before an optimizer step)
        _refresh_hooked_weight(conv)
        weight = conv.weight
        with torch.no_grad():
            if _one_tap(conv.kernel_size):
                # the power is ||w_m||^2 at every frequency: its extremes are those of the norms
                power, kind, grid = _one_tap_norms(weight).square(), "scale", None
            else:
                power, kind, grid = _power(weight, geo.grid, conv.dilation), "filter", geo.grid
            self._eval_kept(kind, grid, lambda: _filter_of_power(power, self.eps, weight.dtype), eval_only=False)
            low, high = _gain_range_of_power(power, weight.dtype)
        return geo, low, high

    def _eval_kept(self, kind: str, grid, build, eval_only: bool = True) -> torch.Tensor:
        """``build()``, the one-tap scale (``kind="scale"``) or the filter of ``grid`` (``"filter"``) from the
        current weight, kept for later eval-mode forwards without gradients (``eval_only=False``: kept from a call
        in training mode too, :meth:`gain_range`'s, which computes it without gradients).

        The orthogonal layers' kernel cache (``orthofx.nn.orthogonal._EvalCache``, whose conditions and key hold
        here, with ``eps``, the dilation, the conv's parameters and ``conv.weight``, a parameter or not): used only
        when ``not self.training``, ``torch.is_grad_enabled()`` is False and nothing traces the layer (compile,
        export, fx); dropped by ``train()`` / ``eval()``, by any forward with gradients, by ``.to()`` and by
        ``load_state_dict``; rebuilt after an optimizer step. A conv with a ``torch.nn.utils.parametrize``
        parametrization, an inference or ``torch.func`` wrapped weight is never kept. Writes that bump no version
        counter of the weight (``conv.weight.data.copy_(t)``) are not seen: call ``layer.eval()`` again after them.
        At most ``MAX_REMEMBERED_SIZES`` grids are kept (the oldest dropped first). A kept tensor is the computed
        one bit for bit, so eval outputs do not change.
        """
        kept = self._eval_values(eval_only)
        if kept is None:
            return build()
        key = (kind, None if grid is None else _grid_key(grid))
        value = kept.get(key)
        if value is None:
            value = build()
            _put_bounded(kept, key, value)
        return value

    def _eval_cache_owner(self) -> nn.Module:
        return self.conv  # V is made of the conv's weight

    def _eval_cache_settings(self) -> tuple:
        # a new tuple, made from an int too: a list changed in place would change the key with it, and torch's conv
        # stores a tuple, but ``conv.dilation = 2`` set afterwards is taken by the forward (_ntuple; tuple(2) raised)
        return (self.eps, _ntuple(self.conv.dilation, self._dims, "dilation", broadcast=True))

    def _eval_cache_tensors(self) -> list[torch.Tensor]:
        # V is made of conv.weight, which need not be one of the conv's parameters: a buffer (an in-place write to
        # it kept the V of the weight before), or the attribute torch.nn.utils.prune sets next to weight_orig
        tensors = super()._eval_cache_tensors()
        weight = self.conv.weight
        return tensors if any(t is weight for t in tensors) else tensors + [weight]

    def _v_for(self, grid, geo) -> torch.Tensor | None:
        if self.momentum is None:
            return None
        key = _grid_key(grid)
        running = self._running_filters.get(key)
        if running is not None and running.device != self.conv.weight.device:
            # a DataParallel replica on another device (see _replicate_for_data_parallel): its own copy
            running = self._running_filters[key] = running.to(self.conv.weight.device)
        if not self.training:
            return running
        v = _filter(self.conv.weight, grid, self.conv.dilation, self.eps)
        if self._running_held or recomputing_in_backward():  # checkpointing's recomputation: updated already
            return v
        self._refuse_running_update_under_transform()
        dropped = self._make_room_for(key)
        with torch.no_grad():
            if running is None or running.shape != v.shape:
                # made outside inference mode: made under inference_mode it would be an inference tensor, which
                # later training steps could not update in place (BatchNorm's running statistics keep working in
                # that sequence)
                with torch.inference_mode(False):
                    self._running_filters[key] = v.clone()
            else:
                running.lerp_(v.to(running.dtype), self.momentum)
        # the grid is now the most recently updated one
        self._running_order.pop(key, None)
        self._running_order[key] = None
        if dropped and not self._drop_warned:
            self._report_drop(key, dropped)
        return v

    def _make_room_for(self, grid: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        """Before storing the filter of ``grid``: if the layer has none for it and already holds
        ``max_running_grids`` (or more, loaded from a state dict), drop the least recently updated ones until one
        more fits; the grids dropped. Plain dict operations, which ``torch.compile`` traces (full graph)."""
        bound = self.max_running_grids
        dropped = ()
        if bound is None or grid in self._running_filters:
            return dropped
        while self._running_order and len(self._running_filters) >= bound:
            oldest = next(iter(self._running_order))
            del self._running_order[oldest]
            del self._running_filters[oldest]
            dropped = dropped + (oldest,)
        return dropped

    def _report_drop(self, grid: tuple[int, ...], dropped: tuple[tuple[int, ...], ...]) -> None:
        """Issue the :class:`RunningFiltersDroppedWarning` for this layer (once). ``torch.compile`` cannot trace
        ``warnings.warn`` (a graph break, an error under ``fullgraph=True``): a compiled forward keeps the warning
        and the layer's next eager forward, or its next ``.train()`` / ``.eval()``, issues it."""
        self._drop_warned = True
        if torch.compiler.is_compiling():
            self._drop_pending = (grid, dropped)
        else:
            self._warn_drop(grid, dropped)

    def _issue_pending_drop_warning(self) -> None:
        pending = self.__dict__.get("_drop_pending")
        if pending is not None:
            self._drop_pending = None
            self._warn_drop(*pending)

    def _warn_drop(self, grid: tuple[int, ...], dropped: tuple[tuple[int, ...], ...]) -> None:
        momentum = "" if self.momentum is None else f" (momentum={self.momentum:g})"
        warnings.warn(
            f"{layer_label(self)}{momentum} keeps at most max_running_grids={self.max_running_grids} running "
            f"ConvNorm filters, one per FFT grid (so per input size) it trains on: training on the grid {grid} "
            f"dropped the filter of the least recently updated grid{'s' if len(dropped) > 1 else ''} "
            f"{first_few(map(str, dropped), 4)} (later drops of this layer are not reported). It keeps the grids "
            f"{first_few(map(str, self.running_grids), 4)}; eval on an input size whose grid has no running filter "
            f"uses V of the current weight, as for a size never trained on. To keep more, raise the bound: "
            f"{type(self).__name__}(conv, momentum=..., max_running_grids=N) (None: no bound), or set "
            f"layer.max_running_grids = N",
            RunningFiltersDroppedWarning, stacklevel=caller_stacklevel())

    def _refuse_running_update_under_transform(self) -> None:
        """The training-mode update of a running filter writes the layer's state in place (or stores a new filter),
        which a ``torch.func`` transform (``vmap`` / ``grad`` of a ``functional_call``: per-sample gradients) cannot
        do: torch refuses the in-place ``lerp_`` on a captured tensor, and a first call would leave a
        functorch-wrapped tensor as the layer's running filter. Say so with the fixes instead (as torch's BatchNorm,
        which has the same limitation)."""
        if not in_func_transform():
            return
        raise FuncTransformRefusal(
            f"{layer_label(self)} (momentum={self.momentum:g}): in training mode each forward updates the running "
            f"ConvNorm filter of its grid in place, which cannot run inside a torch.func transform (vmap, grad, "
            f"jacrev ... e.g. per-sample gradients of a functional_call). Run the transformed call in eval mode "
            f"(layer.eval(): the running filters are then only read), or build the layer with momentum=None (the "
            f"default: the filter is recomputed from the weight and nothing is stored)")

    # ---- the running filters as state: kept in a plain dict, not as buffers (see "Running V and eval mode")

    def _apply(self, fn, recurse=True):
        """``nn.Module._apply`` (``.to()``, ``.double()``, ``.half()``, ``.cuda()``, ``.to_empty()`` ...): the
        running filters go through ``fn`` as torch's buffers do, except that a cast to half precision keeps them in
        float32 and no memory format is given (:func:`_converted_filter`)."""
        self._drop_eval_values()  # made of the tensors before (it would pin their storage)
        super()._apply(fn, recurse)
        for grid, old in list(self._running_filters.items()):
            self._running_filters[grid] = _converted_filter(fn, old)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """The layer's own state, then a ``running_v_<L1>x...`` entry per running filter: the keys, values and
        order a buffer of that name had (the layer has no parameters or buffers of its own; its children follow)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for grid, v in self._running_filters.items():
            destination[prefix + self._buffer_name(grid)] = v if keep_vars else v.detach()
        # the order of updates decides which grid the next new one drops: training state a resumed run needs
        if self.momentum is not None:
            keep_in_metadata(destination, prefix, RUNNING_ORDER_METADATA_KEY, [
                tuple(int(n) for n in grid) for grid in self._running_order if grid in self._running_filters])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._drop_eval_values()
        if self.momentum is None:
            self._warn_running_filters_refused(state_dict, prefix)
        loaded = self._load_running_filters(state_dict, prefix, local_metadata, error_msgs)
        reported = len(unexpected_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # torch reports each key under this prefix that names no parameter, buffer or child as unexpected: the
        # running filters just loaded are none of those, but they are expected
        unexpected_keys[reported:] = [key for key in unexpected_keys[reported:] if key not in loaded]

    def _load_running_filters(self, state_dict, prefix: str, local_metadata, error_msgs: list) -> set[str]:
        """Replace the running filters by the ``running_v_*`` entries of ``state_dict`` (``load_state_dict``);
        the keys it took.

        The loaded filters replace this layer's: ones the state dict lacks were made from other weights, so they
        are dropped rather than kept stale (or reported missing by a strict load). A layer with ``momentum=None``
        never uses running filters and takes none: torch reports them as unexpected keys (a strict load fails,
        ``strict=False`` ignores them). A filter of a grid the layer has already is copied into it in place; one
        of a new grid into a new tensor of the layer's device and working precision; with ``assign=True`` the
        state dict's tensor itself is kept, as torch does for buffers. An entry of the wrong shape, or whose name
        gives no grid, is refused as torch refuses a parameter of the wrong shape (an error, under
        ``strict=False`` too: a filter shaped otherwise would broadcast over the channels in eval, silently).
        Every filter is loaded, more than ``max_running_grids`` too (the bound applies when a training forward
        stores a new grid); the order of updates is the saved one (:meth:`_saved_update_order`), else the state
        dict's order (the first is dropped first). A damaged saved order raises before anything is changed.
        """
        saved_order = self._saved_update_order(local_metadata, prefix) if self.momentum is not None else None
        incoming: dict[tuple[int, ...], tuple[str, torch.Tensor]] = {}
        for key, value in state_dict.items() if self.momentum is not None else ():
            name = key[len(prefix):]
            if not key.startswith(prefix + _RUNNING_PREFIX) or "." in name or not isinstance(value, torch.Tensor):
                continue  # not a running filter of this layer: left to torch (a child's, or unexpected)
            problem = self._running_filter_problem(name, value)
            if problem is not None:
                error_msgs.append(f"{problem} (key {key!r})")
                continue
            incoming[_grid_key(self._name_sizes(name))] = (key, value)
        assign = local_metadata.get("assign_to_params_buffers", False)
        current, updated = self._running_filters, self._running_order
        # the grids kept keep their place, new ones follow in the state dict's order (as buffers did)
        order = [grid for grid in current if grid in incoming] + [grid for grid in incoming if grid not in current]
        loaded, taken = {}, set()
        for grid in order:
            key, value = incoming[grid]
            if assign:
                loaded[grid] = value
            else:
                target = current.get(grid)
                if target is None:
                    with torch.inference_mode(False):  # a tensor later training steps can update (see _v_for)
                        target = torch.empty(value.shape, device=self.conv.weight.device,
                                             dtype=_real_dtype(self.conv.weight.dtype))
                try:
                    with torch.no_grad():
                        target.copy_(value)
                except Exception as error:  # noqa: BLE001 - reported as torch reports a failed copy
                    error_msgs.append(f'While copying the running ConvNorm filter named "{key}", an exception '
                                      f'occurred: {error.args}.')
                    continue
                loaded[grid] = target
            taken.add(key)
        current.clear()
        current.update(loaded)
        # every filter is the state dict's now: the saved order of updates, after the filters it does not name (in
        # the state dict's order, which is the whole order of a state dict saved without one)
        named = dict.fromkeys(grid for grid in saved_order or () if grid in loaded)
        updated.clear()
        updated.update(dict.fromkeys(grid for grid in incoming if grid in loaded and grid not in named))
        updated.update(named)
        return taken

    def _warn_running_filters_refused(self, state_dict, prefix: str) -> None:
        """Issue a :class:`RunningFiltersDroppedWarning` when a layer with ``momentum=None`` is loaded from a state
        dict holding running filters: its eval outputs then differ from the saved layer's, which read them. torch
        lists them as unexpected keys (a strict load fails, ``strict=False`` drops them); ``_load_from_state_dict``
        is told ``strict=True`` either way, so the warning, not an error message, says what they are and what to
        do."""
        names = [key[len(prefix):] for key in state_dict if key.startswith(prefix + _RUNNING_PREFIX)
                 and "." not in key[len(prefix):]]
        if names:
            warnings.warn(
                f"{layer_label(self)} has momentum=None (it recomputes its filter from the weight in eval too) and "
                f"takes none of the state dict's running ConvNorm filters ({first_few(names, 3)}), saved from a "
                "layer with a momentum: its eval outputs use the filter of the current weight, not those; "
                "transform with the convnorm rule's momentum set (as when they were saved) to use them (a strict "
                "load refuses them as unexpected keys, strict=False drops them)", RunningFiltersDroppedWarning,
                stacklevel=caller_stacklevel(skip_torch=True))

    def _saved_update_order(self, local_metadata, prefix: str) -> list[tuple[int, ...]] | None:
        """The order of updates a state dict's metadata for this layer holds (:data:`RUNNING_ORDER_METADATA_KEY`,
        written by :meth:`_save_to_state_dict`): its grids, least recently updated first, or ``None`` without one.
        It must be a list (or tuple) of distinct grids, each a list or tuple of ``d`` ints >= 1; anything else is
        refused with a :class:`~orthofx.errors.LayerArgumentError` naming the entry to remove."""
        if not isinstance(local_metadata, dict) or RUNNING_ORDER_METADATA_KEY not in local_metadata:
            return None  # saved before the order was, or a state dict rebuilt without its metadata
        value = local_metadata[RUNNING_ORDER_METADATA_KEY]
        grids: list[tuple[int, ...]] = []
        problem = None if isinstance(value, (list, tuple)) else f"it is a {type(value).__name__}, not a list"
        for grid in value if problem is None else ():
            if not (isinstance(grid, (list, tuple)) and len(grid) == self._dims and all(
                    isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in grid)):
                problem = f"its entry {grid!r:.60} is not a grid of {self._dims} ints >= 1"
                break
            if tuple(grid) in grids:
                problem = f"it names the grid {tuple(grid)} twice"
                break
            grids.append(tuple(grid))
        if problem is None:
            return grids
        path = prefix[:-1]
        raise LayerArgumentError(
            f"{layer_label(self)}: the state dict's metadata for '{path}' holds {RUNNING_ORDER_METADATA_KEY}="
            f"{value!r:.200}, the order in which the layer updated its running ConvNorm filters (a list of its FFT "
            f"grids, least recently updated first, each a tuple of {self._dims} ints >= 1), and {problem}; remove the "
            f"entry (del state_dict._metadata['{path}']['{RUNNING_ORDER_METADATA_KEY}']) to take the order of the "
            f"state dict's {_RUNNING_PREFIX}* entries as the order of updates")

    def _running_filter_problem(self, name: str, value: torch.Tensor) -> str | None:
        """Why the tensor ``value`` loaded under the key ``name`` (``running_v_<L1>x...x<Ld>``) cannot be a running
        filter of this layer, or ``None``: its name must give ``d`` positive grid sizes and its shape must be the
        rfft half spectrum of that grid for every output channel, ``(M, L_1, ..., L_d // 2 + 1)``."""
        sizes = self._name_sizes(name)
        if len(sizes) != self._dims or not all(v.isdigit() and int(v) > 0 for v in sizes):
            return (f"unexpected running ConvNorm filter {name}: its name does not give the {self._dims} FFT grid "
                    f"sizes of a {self._dims}-d layer ({_RUNNING_PREFIX}<L1>x...x<Ld>)")
        grid = tuple(int(v) for v in sizes)
        expected = (self.conv.out_channels,) + grid[:-1] + (grid[-1] // 2 + 1,)
        if tuple(value.shape) != expected:
            return (f"size mismatch for {name}: copying a running ConvNorm filter with shape {tuple(value.shape)} "
                    f"from checkpoint; the filter of the FFT grid {grid} of this layer ({self.conv.out_channels} "
                    f"output channels) has shape {expected}")
        return None

    # ---- forward

    @property
    def input_sizes(self) -> list[tuple[int, ...]]:
        """The spatial input sizes this layer has run on (eager forwards, most recent last, at most
        ``MAX_REMEMBERED_SIZES``): :meth:`to_plain` precomputes a filter for each."""
        return list(getattr(self, "_input_sizes", {}))

    def _remember(self, x: torch.Tensor) -> None:
        _put_bounded(self.__dict__.setdefault("_input_sizes", {}), tuple(int(n) for n in x.shape[-self._dims:]), None)

    @torch.no_grad()
    def to_plain(self, input_sizes: Sequence[Sequence[int]] | None = None) -> "FrozenConvNormNd":
        """The inference form (``orthofx.freeze`` calls this): a :class:`FrozenConvNormNd` with a plain conv of
        the same weights and the eval ``V`` precomputed for every grid known (see the module docs, "Freezing");
        ``input_sizes`` adds spatial sizes. Its outputs equal this layer's in eval mode. A one-tap (1 x 1) kernel
        without running filters freezes into its own conv with per-channel scaled weights instead (any size). The
        conv's forward pre-hooks run first (``torch.nn.utils.prune`` recomputing the weight); one changing the input
        is refused (:func:`_weight_for_freezing`)."""
        _weight_for_freezing(self.conv, layer_label(self))
        _check_padding_mode(self.conv.padding_mode, layer_label(self))  # the frozen layer would fail on every input
        if self.conv.padding_mode != "zeros":  # as would a conv whose pads torch's F.pad refuses (named here)
            torch_mode_pads(self.conv, layer_label(self))
        if _one_tap(self.conv.kernel_size) and self.momentum is None:
            frozen = FrozenConvNormNd(self.conv, {}, self.affine,
                                      channel_scale=_one_tap_scale(self.conv.weight, self.eps))
            frozen.train(self.training)
            return frozen
        grids: dict[tuple[int, ...], tuple[int, ...] | None] = {}
        for size in self.input_sizes + _sizes_list(input_sizes, self._dims):
            grids.setdefault(tuple(self.geometry(size).grid), size)
        for grid in self.running_grids:
            grids.setdefault(grid, None)
        filters = {}
        for grid, size in grids.items():
            v = self.running_filter(grid) if self.momentum is not None else None
            if v is None:
                v = _filter(self.conv.weight, grid, self.conv.dilation, self.eps)
            filters[grid] = (size, v.detach().clone())
        frozen = FrozenConvNormNd(self.conv, filters, self.affine)
        frozen.train(self.training)
        return frozen

    def train(self, mode: bool = True):
        if not torch.compiler.is_compiling():
            self._issue_pending_drop_warning()  # a drop in a compiled forward, before eval uses the filters
        return super().train(mode)  # _EvalCache.train drops the kept filters

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = input  # nn.Conv{d}d's parameter name: a model calling self.conv(input=h) keeps working once replaced
        tracer = fx_tracer_of((x,))
        if tracer is not None:
            return record_as_leaf(self, tracer, (x,), {}, _TRACE_REASON)
        if not torch.compiler.is_compiling():
            self._issue_pending_drop_warning()
        conv = self.conv
        x = _after_forward_pre_hooks(conv, x)
        y = _conv_norm(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                       self.eps, conv.padding_mode, self._v_for, self, conv)
        if not torch.compiler.is_compiling():
            self._remember(x)  # after the checks: a refused input is no size to freeze for
        if self.affine is not None:
            y = _apply_affine(self.affine, y)
        return y

    def extra_repr(self) -> str:
        parts = [f"eps={self.eps:g}"]
        if self.momentum is not None:
            parts.append(f"momentum={self.momentum:g}")
            parts.append(f"max_running_grids={self.max_running_grids}")
        return ", ".join(parts)


class ConvNormConv1d(ConvNormConvNd):
    """``nn.Conv1d`` followed by ConvNorm; see :class:`ConvNormConvNd`.

    >>> import torch
    >>> from orthofx.nn import ConvNormConv1d
    >>> conv = torch.nn.Conv1d(4, 3, 1, bias=False)      # a 1-tap kernel: ConvNorm divides by each row's norm
    >>> layer, x = ConvNormConv1d(conv), torch.randn(2, 4, 16)
    >>> norms = conv.weight.square().sum((1, 2)).add(layer.eps).sqrt().reshape(3, 1)
    >>> torch.allclose(layer(x), conv(x) / norms, atol=1e-6)
    True
    """

    _dims = 1
    _conv_type = nn.Conv1d


class ConvNormConv2d(ConvNormConvNd):
    """``nn.Conv2d`` followed by ConvNorm; see :class:`ConvNormConvNd`.

    >>> import torch
    >>> from orthofx.nn import ConvNormConv2d
    >>> layer = ConvNormConv2d(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False))
    >>> x = torch.randn(2, 3, 16, 16)
    >>> y = layer(x)
    >>> with torch.no_grad():
    ...     _ = layer.conv.weight.mul_(torch.rand(8, 1, 1, 1) * 3 + 1)   # rescale every output channel
    >>> bool((layer(x) - y).norm() < 1e-3 * y.norm())                  # ConvNorm normalises the scale away
    True
    """

    _dims = 2
    _conv_type = nn.Conv2d


class ConvNormConv3d(ConvNormConvNd):
    """``nn.Conv3d`` followed by ConvNorm; see :class:`ConvNormConvNd`.

    >>> import torch
    >>> from orthofx.nn import ConvNormConv3d
    >>> conv = torch.nn.Conv3d(2, 4, 3, stride=2, padding=1)
    >>> layer, x = ConvNormConv3d(conv).eval(), torch.randn(1, 2, 8, 8, 8)
    >>> y = layer(x); y.shape == conv(x).shape                  # the conv's stride and padding, exactly
    True
    >>> torch.allclose(layer.to_plain()(x), y, atol=1e-5)      # a plain conv + the filter for this size (freeze)
    True
    """

    _dims = 3
    _conv_type = nn.Conv3d


class FrozenConvNormNd(nn.Module):
    """The inference form of a ConvNorm layer (:meth:`ConvNormConvNd.to_plain`), for 1-D, 2-D and 3-D convs.

    Children: ``conv``, a plain ``nn.Conv{d}d`` with the ConvNorm conv's weight, ``stride=1``, no bias and the
    zero padding ``Q`` of the stride-1 correlation (:func:`convnorm_geometry`), and ``affine`` (the affine
    depthwise conv, or ``None``). Buffers: ``v_<L1>x...`` (the eval filter ``V`` of each FFT grid, rfft layout
    ``(M, L_1, ..., L_d // 2 + 1)``); parameter ``bias`` (added after the normalisation). Forward: the layer's
    own padding mode (non-zero modes pad first), ``conv``, ``irfftn(rfftn(z) * V)``, crop at the layer's output
    positions, bias, affine. An input whose grid has no filter raises
    :class:`~orthofx.errors.LayerArgumentError` (no FFT of the weight is ever computed here).

    One-tap kernels (1 x 1) without running filters: ``V`` is a constant per channel (:func:`_one_tap_scale`),
    so ``conv`` is the layer's own conv (stride, padding, padding mode) with channel ``m``'s weights multiplied by
    it, there are no filters and every input size works: the frozen layer costs what the original conv did. Those
    weights are float32 for a half-precision layer (which computes in float32): rounded to its dtype, ``w * s``
    made half the outputs one unit in the last place off the layer's.

    >>> import torch
    >>> layer = ConvNormConv2d(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)).eval()
    >>> x = torch.randn(2, 3, 16, 16)
    >>> y = layer(x)                                    # the layer remembers the input size 16x16
    >>> frozen = layer.to_plain(); frozen.grids
    [(18, 18)]
    >>> bool(torch.allclose(frozen(x), y, atol=1e-6))
    True
    """

    def __init__(self, conv: nn.Module, filters: dict, affine: nn.Module | None = None,
                 channel_scale: torch.Tensor | None = None):
        super().__init__()
        d = conv.weight.ndim - 2
        self._dims = d
        self._scaled_conv = channel_scale is not None
        self.kernel_size = tuple(conv.kernel_size)
        # d values each: a one-element tuple the conv keeps (torch applies it to every dimension) zipped with the
        # kernel size read one dimension only
        self.stride = _ntuple(conv.stride, d, "stride", broadcast=True)
        self.dilation = _ntuple(conv.dilation, d, "dilation", broadcast=True)
        self.groups = conv.groups
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.padding_mode = conv.padding_mode
        # d ints (or the string): tuple() of an int padding set on the conv after construction (which torch's conv
        # and the layer take) raised a TypeError in to_plain
        if conv.padding_mode != "zeros":
            # torch's pads for the mode, those its constructor computed ("same" with a one-element dilation pads
            # the first dimension only; a padding set later pads by the constructor's)
            self.pre_pads = torch_mode_pads(conv, layer_label(conv))
            self.geometry_padding = 0
        else:
            self.pre_pads = ()
            self.geometry_padding = conv.padding
        # conv.padding itself is no padding a non-zero mode applies (a 3-int one set on a Conv2d raised here)
        self.layer_padding = conv.padding if isinstance(conv.padding, str) else tuple(
            left for left, _ in (self.pre_pads or conv_zero_pads(conv.padding, self.kernel_size, self.dilation)))
        # Q depends only on the padding and the kernel: any input size gives it
        probe = convnorm_geometry(tuple(e + 1 for e in _dilated_extent(self.kernel_size, self.dilation)),
                                  self.kernel_size, self.stride, self.geometry_padding, self.dilation)
        ql, qr = probe.pad_left, probe.pad_right
        symmetric = ql == qr
        self.extra_pad = [] if symmetric else flat_pads(list(zip(ql, qr)))
        weight = conv.weight.detach()
        # the scaled form is the layer's own conv; the filtered form is its stride-1 correlation on the grid
        stride, padding, padding_mode = ((self.stride, conv.padding, conv.padding_mode) if self._scaled_conv
                                         else (1, ql if symmetric else 0, "zeros"))
        # a half-precision layer computes in float32: its one-tap form convolves the half weights in float32 and
        # scales in float32, so the scaled weights are kept in float32 (as the filters are): rounded to bfloat16,
        # w * scale was off by up to 2^-9 and half of the frozen layer's outputs were one unit in the last place off
        dtype = _real_dtype(weight.dtype) if self._scaled_conv else weight.dtype
        # torch's own class: a subclass's constructor need not take nn.Conv's arguments
        # skip_init: the default initialisation, overwritten below, would draw from the caller's random stream
        self.conv = skip_init(_CONV_CLS[d], conv.in_channels, conv.out_channels, self.kernel_size, stride=stride,
                              padding=padding, dilation=self.dilation, groups=conv.groups, bias=False,
                              padding_mode=padding_mode, device=weight.device, dtype=dtype)
        if self._scaled_conv:
            weight = weight.to(torch.float64) * channel_scale.to(weight.device, torch.float64).view(
                (-1,) + (1,) * (d + 1))
        self.conv.weight.data.copy_(weight)
        self.conv.weight.requires_grad_(conv.weight.requires_grad)  # a frozen (untrained) weight stays frozen
        # part of a ConvNorm layer still: the convnorm pass must not wrap it (its call here is no conv forward),
        # and the filters baked above stay valid only while its weight does
        setattr(self.conv, WRAPPED_MARKER, True)
        setattr(self.conv, FROZEN_FILTERS_MARKER, True)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(),
                                                                requires_grad=conv.bias.requires_grad)
        self.affine = None if affine is None else copy.deepcopy(affine)
        self._sizes: dict[tuple[int, ...], tuple[int, ...] | None] = {}
        for grid, (size, v) in filters.items():
            grid = tuple(int(g) for g in grid)
            self.register_buffer(_FROZEN_PREFIX + "x".join(map(str, grid)), v)
            self._sizes[grid] = None if size is None else tuple(size)

    def _apply(self, fn, recurse=True):
        return _apply_keeping_filters_real(self, super()._apply, fn, recurse, _FROZEN_PREFIX)

    @property
    def grids(self) -> list[tuple[int, ...]]:
        """The FFT grids with a precomputed filter."""
        return list(self._sizes)

    def filter_for(self, grid: Sequence[int]) -> torch.Tensor | None:
        """The precomputed ``V`` of an FFT grid (an int: the same size in every spatial dimension), or ``None``."""
        return self._filter_of_grid(_spatial_sizes(grid, self._dims, layer_label(self), "the FFT grid"))

    def _filter_of_grid(self, grid: Sequence) -> torch.Tensor | None:
        # _grid_key: a grid of SymInts under torch.compile names its buffer by its ints, not by symbols
        return self._buffers.get(_FROZEN_PREFIX + "x".join(map(str, _grid_key(grid))))

    def _missing(self, size: tuple[int, ...], grid: tuple[int, ...]) -> LayerArgumentError:
        known = [s for s in self._sizes.values() if s is not None]
        return LayerArgumentError(
            f"{layer_label(self)}: no precomputed ConvNorm filter for input size {size} (FFT grid "
            f"{grid}); this frozen layer has filters for input sizes {known or '(none)'} (grids {self.grids}). "
            f"ConvNorm's filter depends on the feature-map size: run the unfrozen model once on inputs of this size "
            f"before orthofx.freeze (each ConvNorm layer remembers the sizes it has run on), or freeze the layer with "
            f"to_plain(input_sizes=[{size}])")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = input  # the frozen form of a Conv{d}d replacement keeps nn.Conv{d}d's parameter name
        tracer = fx_tracer_of((x,))
        if tracer is not None:
            return record_as_leaf(self, tracer, (x,), {}, _TRACE_REASON)
        d = self._dims
        x, unbatched = _batched_input(x, self.conv.weight, self.groups, layer_label(self))
        size = tuple(x.shape[2:])
        self._check_size(size)
        in_dtype = x.dtype
        work = _real_dtype(in_dtype)
        if self._scaled_conv:
            y = self._scaled_conv_out(x, work)
            out_dtype = _output_dtype(in_dtype, y.dtype)
            y = y.to(work)
        else:
            y, conv_dtype = self._normalised_conv(x, size, work)
            out_dtype = _output_dtype(in_dtype, conv_dtype)
        if self.bias is not None:
            y = y + self.bias.to(work).view((1, -1) + (1,) * d)
        y = y.to(out_dtype)
        y = y.squeeze(0) if unbatched else y
        if self.affine is not None:
            y = _apply_affine(self.affine, y)
        return y

    def _check_size(self, size: tuple[int, ...]) -> None:
        """The unfrozen layer's checks of the spatial input size, made before any padding or conv: the paths that
        pad explicitly (non-zero padding modes) or run the layer's own conv (one-tap) would otherwise fail inside
        torch without naming the layer (the filtered zero-padding path checks in :func:`convnorm_geometry`)."""
        where = layer_label(self)
        if self.padding_mode != "zeros":
            _check_explicit_pads(size, self.kernel_size, self.stride, self.dilation, self.pre_pads, self.padding_mode,
                                 where)
        elif self._scaled_conv:
            convnorm_geometry(size, self.kernel_size, self.stride, self.layer_padding, self.dilation, where=where)

    def _normalised_conv(self, x: torch.Tensor, size: tuple[int, ...],
                         work: torch.dtype) -> tuple[torch.Tensor, torch.dtype]:
        """The normalised conv output (in ``work``) and the dtype the conv itself gave (autocast's, inside it)."""
        if self.pre_pads:
            x = _explicit_pad(x, self.pre_pads, self.padding_mode)
        geo = convnorm_geometry(x.shape[2:], self.kernel_size, self.stride, self.geometry_padding, self.dilation,
                                where=layer_label(self))
        v = self._filter_of_grid(geo.grid)
        if v is None:
            raise self._missing(size, geo.grid)
        xw = x.to(work)
        if self.extra_pad:
            xw = F.pad(xw, self.extra_pad)
        z = self._conv_in(xw, work)
        return _normalise(z, v, geo), z.dtype

    def _scaled_conv_out(self, x: torch.Tensor, work: torch.dtype) -> torch.Tensor:
        """The one-tap form: the layer's own conv with per-channel scaled weights. A non-zero padding mode pads
        first, as the unfrozen layer does: orthofx's circular padding wraps a pad larger than the input around as
        often as needed, where nn.Conv's own circular padding raises ("wrapping around more than once")."""
        if not self.pre_pads:
            return self._conv_in(x, work)
        x = _explicit_pad(x, self.pre_pads, self.padding_mode)
        return _CONV_FN[self._dims](x.to(work), self.conv.weight.to(work), None, self.stride, 0, self.dilation,
                                    self.groups)

    def _conv_in(self, x: torch.Tensor, work: torch.dtype) -> torch.Tensor:
        """``conv`` on ``x`` in the working precision (nn.Conv's own forward: its padding and padding mode)."""
        return self.conv._conv_forward(x.to(work), self.conv.weight.to(work), None)

    def extra_repr(self) -> str:
        grids = "any input size (1 x 1: scaled conv)" if self._scaled_conv else self.grids
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"grids={grids}")


def with_convnorm(conv: nn.Module, **kwargs) -> ConvNormConvNd:
    """Wrap ``conv`` in the ConvNorm class of its dimension (``kwargs`` as for :class:`ConvNormConvNd`).

    >>> import torch
    >>> from orthofx.nn import with_convnorm
    >>> [type(with_convnorm(conv)).__name__ for conv in (torch.nn.Conv1d(2, 4, 3), torch.nn.Conv3d(2, 4, 3))]
    ['ConvNormConv1d', 'ConvNormConv3d']
    >>> conv, x = torch.nn.Conv2d(3, 8, 3, padding=1), torch.randn(2, 3, 8, 8)
    >>> torch.allclose(with_convnorm(conv, affine=True)(x), with_convnorm(conv)(x))   # the affine part starts as I
    True
    """
    for cls in (ConvNormConv1d, ConvNormConv2d, ConvNormConv3d):
        if isinstance(conv, cls._conv_type):
            return cls(conv, **kwargs)
    raise _not_a_conv(conv, "with_convnorm wraps an nn.Conv1d, nn.Conv2d or nn.Conv3d (or a subclass)",
                      "pass the convolution layer itself")


@contextlib.contextmanager
def running_filters_held(module: nn.Module):
    """Within the block, the ConvNorm layers of ``module`` (itself included) with ``momentum`` run their training
    forwards as usual (normalised by ``V`` of the current weight) but leave their running filters as they are:
    no update, no new grid stored.

    For code that runs extra training forwards of a module without moving its running statistics
    (``orthofx.metrics``' Jacobian estimator runs them on copies of the buffers, with
    ``torch.func.functional_call``): the running filters are not buffers (see "Running V and eval mode"), so such
    code runs the forwards under this as well. Nothing is written in place, so those forwards may also run inside
    ``torch.func`` transforms (``jvp``, ``vmap``), where an update is refused.

    >>> import torch
    >>> layer = ConvNormConv2d(torch.nn.Conv2d(3, 4, 3, padding=1), momentum=0.5).train()
    >>> _ = layer(torch.randn(1, 3, 8, 8))
    >>> before = layer.running_filter((10, 10)).clone()
    >>> with running_filters_held(layer):
    ...     _ = layer(torch.randn(1, 3, 8, 8))       # the training output, from V of the current weight
    ...     _ = layer(torch.randn(1, 3, 6, 6))       # a new size: nothing stored
    >>> torch.equal(layer.running_filter((10, 10)), before), layer.running_grids
    (True, [(10, 10)])
    """
    layers = [m for m in module.modules() if isinstance(m, ConvNormConvNd)]
    held = [layer._running_held for layer in layers]
    for layer in layers:
        layer._running_held = True
    try:
        yield
    finally:
        for layer, was in zip(layers, held):
            layer._running_held = was


@torch.no_grad()
def update_running_filters(model: nn.Module) -> int:
    """Set every running filter of the ConvNorm layers in ``model`` (itself included) to ``V`` of the layer's current
    weight, for the grids each holds: the analogue of ``torch.optim.swa_utils.update_bn`` for an EMA / SWA copy.
    Returns how many filters were set (0, and nothing done, for a model without ConvNorm layers with ``momentum``).

    For each layer with ``momentum`` and each FFT grid ``L`` it keeps a running filter for,

        running_L <- V_L(W) = ( sum_c |K_hat_D{m,c}(w)|^2 + eps )^(-1/2)      (w on the grid L, every channel m)

    with ``W`` the layer's weight as it is now (the same filter a ``momentum=None`` layer computes). Its eval output
    on those grids is then the ``momentum=None`` eval output (up to rounding for a 1 x 1 kernel, whose ``V`` is
    constant in ``w`` and computed without an FFT there), and on the other grids it is already: eval falls back to
    ``V`` of the weight for a grid without a running filter. The grids, their order and the tensors (updated in
    place) stay, so ``state_dict`` keys and ``freeze``'s grids are unchanged. ``model`` is changed in place;
    anything else passed is refused with a :class:`~orthofx.errors.LayerArgumentError`.

    Why it is needed: ``AveragedModel(model)`` (and a hand-written EMA that copies the model and then averages its
    ``parameters()``) deep-copies the layers once, with the running filters they hold then (one per grid the model
    has trained on before the copy is made: a copy made after a warm-up, at SWA's start, or of a loaded
    checkpoint), and then averages only parameters, and with ``use_buffers=True`` buffers. The running filters are
    not buffers (see "Running V and eval mode"), so on those grids the copy's eval keeps filtering with the running
    filters of the weights the model had when the copy was made, while it convolves with the averaged weights: its
    channels are no longer normalised. (A copy made before any training forward holds no filter, and its eval
    computes ``V`` of the averaged weight already.) Averaging the filters would not
    help either (so they are deliberately not made buffers for ``use_buffers=True``): a running filter is already
    an exponential average of ``V`` of past weights and ``V`` is not linear in the weight, so an average of filters
    is not ``V`` of the averaged weight the copy convolves with. Call this on the averaged copy after updating it
    (after each ``update_parameters``, or once before evaluating or saving it), as ``update_bn`` is called after
    SWA. Calling it on the trained model itself replaces its running averages by ``V`` of its current weight.
    Layers built with ``momentum=None`` (the default, and what the ``convnorm`` pass inserts) have no running
    filters: their eval computes ``V`` of the (averaged) weight and needs nothing.

    >>> import torch
    >>> from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    >>> net = torch.nn.Sequential(ConvNormConv2d(torch.nn.Conv2d(3, 4, 3, padding=1), momentum=0.1))
    >>> x = torch.randn(2, 3, 8, 8)
    >>> _ = net(x)                                # a warm-up step: a running filter for the 10 x 10 grid
    >>> ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9))    # the copy holds it from now on
    >>> for _ in range(3):                        # training steps; a real loop also steps an optimizer
    ...     _ = net(x)
    ...     with torch.no_grad():
    ...         _ = net[0].weight.mul_(1.5)
    ...     ema.update_parameters(net)
    >>> conv = ema.module[0].conv                 # the averaged weight; conv_norm computes V of it
    >>> reference = conv_norm(x, conv.weight, conv.bias, padding=1)
    >>> stale = ema.eval()(x)                     # V of the warm-up weight (and no filter update since)
    >>> update_running_filters(ema)               # one grid (10 x 10) of one layer
    1
    >>> torch.allclose(stale, reference, atol=1e-3), torch.allclose(ema(x), reference, atol=1e-6)
    (False, True)
    """
    if not isinstance(model, nn.Module):
        raise LayerArgumentError(f"update_running_filters takes an nn.Module (the averaged copy, e.g. an "
                                 f"AveragedModel), got a {type(model).__qualname__}: pass the model whose ConvNorm "
                                 f"layers' running filters should become V of their current weights")
    count = 0
    for layer in model.modules():
        if not isinstance(layer, ConvNormConvNd) or layer.momentum is None:
            continue
        conv = layer.conv
        if layer._running_filters:
            _refresh_hooked_weight(conv)  # V of the weight the copy's forward convolves with
        for grid, running in layer._running_filters.items():
            running.copy_(_filter(conv.weight, grid, conv.dilation, layer.eps))
            count += 1
    return count
