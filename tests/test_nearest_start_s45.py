"""The nearest orthogonal start of ``from_conv`` (session 45).

1. One channel per group (a 1-channel conv, a depthwise conv ``groups = C = M``, a strided one with ``C = 1``):
   the blocks are delays or identities, so the block part is a pure shift, a discrete choice per group held in the
   buffer ``block_shift``. The start was always the centre window whatever the weights (a 1-channel ``[0.9, 0.05,
   0]`` became ``[0, 1, 0]``, relative error 1.45 against 0.12). A circular single-channel orthogonal convolution
   is a signed single tap, so at stride 1 the nearest one is the tap of largest ``|w|`` with its sign, per group;
   checked here against a float64 reference and a brute force over every signed tap (and, strided, over every
   window with its float64 polar factor). The layer stays exactly orthogonal (dense float64 operator), and the
   shift lives in the state_dict (old checkpoints load with the centre), the eval cache's key and ``torch.fx``
   graphs.
2. Scale: the Adam steps of the nearest fit (and the ``cayley_fft`` start) depended on the target's scale (Adam's
   eps at 1e10, float32 overflow of its squared gradients at 1e-30: cosine 0.26 to the conv's kernel instead of
   0.58). The target is fitted at unit norm, scaled by a power of two: a power-of-two scaling of the weights gives
   the same layer bit for bit, and decimal scales 1e-30 .. 1e30 the same quality.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import LayerArgumentError
from orthofx.nn import OrthogonalConv1d, OrthogonalConv2d, OrthogonalConvTranspose2d
from tests.references import polar64, wrapped_operator64

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
CONV = {1: nn.Conv1d, 2: nn.Conv2d}
LAYER = {1: OrthogonalConv1d, 2: OrthogonalConv2d}


def _dominant_weights(shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Weights ``(M, 1, *k)`` with one tap per output channel clearly largest (magnitude 1 .. 2, random place and
    sign) over small noise, so that every decimal scaling keeps it largest."""
    g = torch.Generator().manual_seed(seed)
    w = 0.1 * (torch.rand(shape, generator=g, dtype=F64) * 2 - 1)
    flat = w.reshape(shape[0], -1)
    place = torch.randint(flat.shape[1], (shape[0],), generator=g)
    sign = torch.where(torch.rand(shape[0], generator=g) < 0.5, -1.0, 1.0).to(F64)
    flat[torch.arange(shape[0]), place] = sign * (1 + torch.rand(shape[0], generator=g, dtype=F64))
    return w.to(dtype)


def _conv(d, channels, k, seed, stride=1, dilation=1, dtype=torch.float32, weights=None):
    conv = CONV[d](channels, channels, k, stride=stride, dilation=dilation, groups=channels, bias=False, dtype=dtype)
    with torch.no_grad():
        conv.weight.copy_(_dominant_weights(conv.weight.shape, seed, dtype) if weights is None else weights)
    return conv


def _signed_largest_tap(w: torch.Tensor) -> torch.Tensor:
    """The reference start, float64: per output channel the tap of largest ``|w|`` set to its sign, zero elsewhere."""
    w = w.detach().to(F64)
    flat = w.reshape(w.shape[0], -1)
    out = torch.zeros_like(flat)
    best = [max(range(flat.shape[1]), key=lambda j: abs(float(flat[m, j]))) for m in range(flat.shape[0])]
    for m, j in enumerate(best):
        out[m, j] = math.copysign(1.0, float(flat[m, j]))
    return out.reshape(w.shape)


def _relative64(K: torch.Tensor, K0: torch.Tensor) -> float:
    K, K0 = K.detach().to(F64), K0.detach().to(F64)
    return float((K - K0).norm() / K0.norm())


def _row_orthogonality_error(layer, grid) -> float:
    """``max |A A^T - I|`` of the layer's dense float64 circular operator on ``grid`` (stride, dilation, groups)."""
    A = wrapped_operator64(layer.weight, grid, stride=layer.stride, groups=layer.groups, dilation=layer.dilation)
    return float((A @ A.T - torch.eye(A.shape[0], dtype=F64)).abs().max())


# (d, channels, kernel_size, dilation, stride): 1-channel and depthwise, odd and even kernels, dilation; a stride
# that divides the dilation (the taps read one residue: the layer is built for stride 1, RO)
ONE_CHANNEL_CASES = [
    (1, 1, 3, 1, 1), (1, 1, 4, 1, 1), (1, 1, 5, 2, 1), (1, 4, 3, 1, 1), (1, 4, 6, 1, 1), (1, 3, 3, 3, 1),
    (2, 1, 3, 1, 1), (2, 1, (2, 4), 1, 1), (2, 6, 3, 1, 1), (2, 6, 4, 1, 1), (2, 5, (3, 5), 1, 1), (2, 4, 3, 2, 1),
    (2, 16, 7, 1, 1), (1, 3, 3, 2, 2), (2, 4, 3, 2, 2),
]


@pytest.mark.parametrize("d, channels, k, dilation, stride", ONE_CHANNEL_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_channel_start_is_the_signed_largest_tap(d, channels, k, dilation, stride, dtype):
    conv = _conv(d, channels, k, seed=channels + 7 * d, stride=stride, dilation=dilation, dtype=dtype)
    layer = LAYER[d].from_conv(conv)
    expected = _signed_largest_tap(conv.weight)
    torch.testing.assert_close(layer.weight.detach().to(F64), expected, rtol=0, atol=1e-7)
    assert layer.init_error == pytest.approx(_relative64(expected, conv.weight), rel=1e-9, abs=1e-12)
    grid = 8 if d == 1 else 6
    assert _row_orthogonality_error(layer, grid) < (1e-12 if dtype == F64 else 1e-6)


def test_the_brief_examples():
    c = nn.Conv1d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        c.weight.copy_(torch.tensor([[[0.9, 0.05, 0.0]]]))
    layer = OrthogonalConv1d.from_conv(c)
    assert layer.weight.detach().flatten().tolist() == [1.0, 0.0, 0.0]  # it was the centre tap, [0, 1, 0]
    assert layer.init_error == pytest.approx(math.sqrt(0.1 ** 2 + 0.05 ** 2) / math.sqrt(0.81 + 0.0025), rel=1e-6)
    # a depthwise conv with one dominant tap per channel, off the centre for most: the centre start (the sign of
    # the centre tap, as before) is far; the largest taps are near
    conv = nn.Conv2d(16, 16, 3, groups=16, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(_dominant_weights(conv.weight.shape, seed=0))
    layer = OrthogonalConv2d.from_conv(conv)
    assert layer.init_error == pytest.approx(_relative64(_signed_largest_tap(conv.weight), conv.weight), rel=1e-9)
    centre = torch.zeros(16, 1, 3, 3, dtype=F64)
    centre[:, :, 1, 1] = torch.sign(conv.weight.detach()[:, :, 1, 1]).to(F64)
    assert layer.init_error < 0.5 < 1.0 < _relative64(centre, conv.weight)


@pytest.mark.parametrize("d, groups, k, dilation", [(1, 1, 3, 1), (1, 2, 4, 1), (1, 3, 3, 2), (2, 1, 3, 1),
                                                     (2, 2, 3, 1), (2, 2, (2, 3), 1), (2, 1, 4, 2)])
def test_no_signed_single_tap_kernel_is_nearer(d, groups, k, dilation):
    # plain Gaussian weights (no planted tap): every combination of one signed tap per group, the whole kernel's
    # float64 distance; the layer's start must reach the minimum
    torch.manual_seed(groups * 10 + d)
    conv = CONV[d](groups, groups, k, dilation=dilation, groups=groups, bias=False, dtype=F64)
    layer = LAYER[d].from_conv(conv)
    K0 = conv.weight.detach()
    taps = math.prod(K0.shape[2:])
    per_group = []
    for j, sign in itertools.product(range(taps), (1.0, -1.0)):
        delta = torch.zeros(taps, dtype=F64)
        delta[j] = sign
        per_group.append(delta.reshape(K0.shape[2:]))
    best = math.inf
    for choice in itertools.product(per_group, repeat=groups):
        K = torch.stack(choice).unsqueeze(1)
        best = min(best, float((K - K0).norm()))
    assert layer.init_error == pytest.approx(best / float(K0.norm()), rel=1e-12)
    assert float((layer.weight.detach() - K0).norm()) <= best * (1 + 1e-12)


def _nearest_window_error(weight: torch.Tensor, groups: int, stride) -> float:
    """The relative distance to ``weight`` of the nearest kernel with one input channel per group that the layer
    can hold at ``stride``: the orthonormal window ``R`` (``r = min(k, S)`` taps) placed at one of the
    ``k - r + 1`` shifts per dimension. Brute force over every shift of every group, ``R`` the float64 polar factor
    of the window there (the best for that shift)."""
    w = weight.detach().to(F64)
    M, C = w.shape[0], w.shape[1]
    K0 = w.reshape(groups, M // groups, C, *w.shape[2:])
    ks = tuple(w.shape[2:])
    r = [min(kk, s) for kk, s in zip(ks, stride)]
    total = 0.0
    for group in K0:
        distances = []
        for shift in itertools.product(*(range(kk - rr + 1) for kk, rr in zip(ks, r))):
            place = (Ellipsis,) + tuple(slice(c, c + rr) for c, rr in zip(shift, r))
            window = group[place]
            K = torch.zeros_like(group)
            K[place] = polar64(window.reshape(window.shape[0], -1)).reshape(window.shape)
            distances.append(float((K - group).square().sum()))
        total += min(distances)
    return math.sqrt(total) / float(w.norm())


@pytest.mark.parametrize("C, M, k, stride, groups", [
    (4, 4, 3, 2, 4),        # a strided depthwise conv (MobileNet): 2 x 2 windows at 4 shifts
    (1, 4, 3, 2, 1),        # a grayscale stem, one input channel: 4 x 4 orthogonal matrix on a window
    (2, 2, (3, 4), 2, 2),   # rectangular, even kernel
    (1, 3, 4, 2, 1),        # 1 -> 3 channels: 3 orthonormal rows on a 2 x 2 window, 3 x 3 shifts
])
def test_strided_one_input_channel_start_is_the_nearest_window(C, M, k, stride, groups):
    # the blocks of a layer with one input channel per group are delays: its kernels are the orthonormal window R
    # at one of the k' = k - S + 1 shifts per dimension; per group the best is the shift whose window has the
    # largest nuclear norm, R its polar factor
    torch.manual_seed(M + 3 * C)
    conv = nn.Conv2d(C, M, k, stride=stride, groups=groups, bias=False, dtype=F64)
    with torch.no_grad():
        conv.weight.mul_(torch.rand(conv.weight.shape, dtype=F64) * 3)  # uneven taps, so the shifts differ
    layer = OrthogonalConv2d.from_conv(conv)
    assert layer.block_shift is not None
    assert layer.init_error == pytest.approx(_nearest_window_error(conv.weight, groups, layer.stride), rel=1e-10)
    assert _row_orthogonality_error(layer, 8) < 1e-12


def test_depthwise_transposed_conv_starts_at_the_largest_taps():
    t = nn.ConvTranspose2d(5, 5, 3, groups=5, padding=1, bias=False)
    with torch.no_grad():
        t.weight.copy_(_dominant_weights(t.weight.shape, seed=4))
    layer = OrthogonalConvTranspose2d.from_conv_transpose(t)
    expected = _signed_largest_tap(t.weight)
    torch.testing.assert_close(layer.weight.detach().to(F64), expected, rtol=0, atol=1e-7)
    assert layer.init_error == pytest.approx(_relative64(expected, t.weight), rel=1e-9)


def test_orthogonal_preset_starts_a_strided_depthwise_conv_at_its_nearest_windows():
    # (the pass leaves stride-1 depthwise convs alone: their orthogonal versions are fixed signed taps)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(_dominant_weights(model[1].weight.shape, seed=5))
    weight = model[1].weight.detach().clone()
    out = orthofx.transform(model, "orthogonal")
    layers = [m for m in out.modules() if isinstance(m, OrthogonalConv2d) and m.groups == 8]
    assert len(layers) == 1
    expected = _nearest_window_error(weight, 8, (2, 2))
    assert _relative64(layers[0].weight, weight) == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------------- the buffer's life


def _depthwise_layer(seed=1):
    return OrthogonalConv2d.from_conv(_conv(2, 5, 3, seed=seed))


def test_block_shift_round_trips_and_old_checkpoints_load_at_the_centre():
    layer = _depthwise_layer()
    assert layer.block_shift.dtype == torch.long and tuple(layer.block_shift.shape) == (5, 2)
    assert (layer.block_shift != 1).any()  # the planted taps are off the centre for some channels
    fresh = OrthogonalConv2d(5, 5, 3, groups=5, bias=False)
    assert fresh.block_shift.tolist() == [[1, 1]] * 5  # the centre, as before
    state = layer.state_dict()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.weight, layer.weight)
    # a checkpoint from before the buffer: its kernel was the centre tap with the matrix's sign
    old = {k: v for k, v in state.items() if k != "block_shift"}
    fresh.load_state_dict(old)
    assert fresh.block_shift.tolist() == [[1, 1]] * 5
    centre = torch.zeros(5, 1, 3, 3)
    centre[:, :, 1, 1] = torch.sign(layer.matrix.detach().reshape(5, 1))
    torch.testing.assert_close(fresh.weight.detach(), centre, rtol=0, atol=1e-7)
    assert "block_shift" not in old  # the caller's dict is not written


def test_a_block_shift_outside_the_kernel_is_refused():
    layer = _depthwise_layer()
    for bad in ([[3, 0]] * 5, [[-1, 0]] * 5):
        state = layer.state_dict()
        state["block_shift"] = torch.tensor(bad)
        with pytest.raises(LayerArgumentError, match="block_shift.*between 0 and \\(2, 2\\)"):
            OrthogonalConv2d(5, 5, 3, groups=5, bias=False).load_state_dict(state)


def test_a_layer_pickled_before_the_buffer_builds_the_centre_through_its_blocks():
    layer = OrthogonalConv2d(5, 5, 3, groups=5, bias=False)
    expected = layer.weight.detach().clone()
    del layer._buffers["block_shift"]  # as unpickled from the old version
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=0, atol=0)


def test_eval_cache_sees_a_loaded_block_shift():
    layer = _depthwise_layer().eval()
    x = torch.randn(1, 5, 6, 6)
    with torch.no_grad():
        before = layer(x)
        state = layer.state_dict()
        state["block_shift"] = torch.tensor([[0, 0]] * 5)
        layer.load_state_dict(state)
        after = layer(x)
        layer.__dict__.pop("_eval_cache", None)
        torch.testing.assert_close(after, layer(x), rtol=0, atol=0)
    assert not torch.equal(before, after)


def test_symbolic_trace_reads_the_buffer():
    layer = _depthwise_layer()
    gm = torch.fx.symbolic_trace(layer)
    assert "block_shift" in [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    x = torch.randn(2, 5, 6, 6)
    torch.testing.assert_close(gm(x), layer(x), rtol=0, atol=1e-6)
    with torch.no_grad():
        gm.block_shift.fill_(0)
        layer.block_shift.fill_(0)
    torch.testing.assert_close(gm(x), layer(x), rtol=0, atol=1e-6)


def test_deferred_initialisation_sets_the_centre():
    with torch.device("meta"):
        layer = OrthogonalConv2d(5, 5, 3, groups=5)
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    assert layer.block_shift.tolist() == [[1, 1]] * 5
    source = _depthwise_layer()
    with torch.device("meta"):
        target = OrthogonalConv2d(5, 5, 3, groups=5, bias=False)
    target.load_state_dict(source.state_dict(), assign=True)
    assert torch.equal(target.weight, source.weight)


def test_random_init_keeps_the_centre():
    layer = _depthwise_layer()
    layer.reset_parameters()
    assert layer.block_shift.tolist() == [[1, 1]] * 5
    layer = OrthogonalConv2d.from_conv(_conv(2, 5, 3, seed=1), init="random")
    assert layer.block_shift.tolist() == [[1, 1]] * 5


# ----------------------------------------------------------------------------------- scale


SCALES = [1e-30, 1e-20, 1e-10, 1e10, 1e20, 1e30]


@pytest.mark.parametrize("d, channels, k", [(1, 1, 5), (2, 6, 3), (2, 4, 4)])
def test_one_channel_start_does_not_depend_on_the_scale(d, channels, k):
    reference = LAYER[d].from_conv(_conv(d, channels, k, seed=2)).weight.detach()
    for scale in SCALES:
        conv = _conv(d, channels, k, seed=2)
        with torch.no_grad():
            conv.weight.mul_(scale)
        torch.testing.assert_close(LAYER[d].from_conv(conv).weight.detach(), reference, rtol=0, atol=0)


def _fitted(make, scale, seed=0, **kw):
    torch.manual_seed(seed)
    conv = make()
    K0 = conv.weight.detach().to(F64).clone()
    with torch.no_grad():
        conv.weight.mul_(scale)
    torch.manual_seed(seed + 1)
    layer = LAYER[conv.weight.dim() - 2].from_conv(conv, **kw)
    return layer, K0


def _cosine(K, K0) -> float:
    K = K.detach().to(F64)
    return float((K * K0).sum() / K.norm() / K0.norm())


FITS = {"2d_8_8_k3": lambda: nn.Conv2d(8, 8, 3, padding=1), "2d_8_4_k4": lambda: nn.Conv2d(8, 4, 4),
        "1d_6_6_k5": lambda: nn.Conv1d(6, 6, 5, padding=2), "2d_4_8_k3": lambda: nn.Conv2d(4, 8, 3, padding=1)}


@pytest.mark.parametrize("name", list(FITS))
def test_nearest_fit_is_the_same_for_power_of_two_scales(name):
    layer, _ = _fitted(FITS[name], 1.0, fit_steps=60)
    for exponent in (-100, -33, 70, 100):  # 2^-100 ~ 8e-31, 2^100 ~ 1.3e30
        other, _ = _fitted(FITS[name], 2.0 ** exponent, fit_steps=60)
        assert torch.equal(other.weight, layer.weight), exponent


@pytest.mark.parametrize("name", list(FITS))
def test_nearest_fit_quality_does_not_depend_on_the_scale(name):
    # decimal scales round the weights, and 60 Adam steps on a non-convex problem carry such differences far, so
    # the kernels differ; their distance to the conv's kernel must not (before: cosine 0.23 .. 0.52 at 1e-30 and
    # 1e30 against 0.59 .. 0.74 at 1, the fit stuck at its start)
    layer, K0 = _fitted(FITS[name], 1.0, fit_steps=60)
    reference = _cosine(layer.weight, K0)
    for scale in SCALES:
        other, _ = _fitted(FITS[name], scale, fit_steps=60)
        assert _cosine(other.weight, K0) > reference - 0.05, scale


@pytest.mark.parametrize("compute_dtype", [None, torch.float32])
def test_cayley_start_does_not_depend_on_the_scale(compute_dtype):
    make = lambda: nn.Conv2d(4, 4, 3, padding=1, bias=False)  # noqa: E731
    kw = dict(method="cayley_fft", input_size=8, fit_steps=0, compute_dtype=compute_dtype)
    layer, _ = _fitted(make, 1.0, **kw)
    reference = layer.cayley_kernel.detach()
    for scale in SCALES:
        other, _ = _fitted(make, scale, **kw)
        torch.testing.assert_close(other.cayley_kernel.detach(), reference, rtol=0, atol=1e-4)
    for exponent in (-100, 100):
        other, _ = _fitted(make, 2.0 ** exponent, **dict(kw, fit_steps=5))
        base, _ = _fitted(make, 1.0, **dict(kw, fit_steps=5))
        assert torch.equal(other.cayley_kernel, base.cayley_kernel)


def test_ordinary_scales_keep_the_closed_form_starts_bit_for_bit():
    # fit_steps=0 (the orthogonal_conv pass's default) never reads the scaled target: the Procrustes start of a
    # layer with blocks and the embedded start's sweep are the same numbers as before, written out here (the
    # matrix is the polar factor of the centre window; init_error is against the user's unscaled weights)
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, padding=1, bias=False, dtype=F64)
    layer = OrthogonalConv2d.from_conv(conv, fit_steps=0)
    window = conv.weight.detach()[:, :, 1, 1]
    torch.testing.assert_close(layer.weight.detach()[:, :, 1, 1], polar64(window), rtol=0, atol=1e-12)
    assert layer.init_error == pytest.approx(_relative64(layer.weight, conv.weight), rel=1e-12)


# ----------------------------------------------------------------------------------- review of the buffer (s45)


def _off_centre_layer(groups=5, seed=2):
    """A depthwise 3 x 3 layer whose shifts are set off the centre, per group."""
    layer = OrthogonalConv2d(groups, groups, 3, groups=groups, bias=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.block_shift.copy_(torch.randint(0, 3, (groups, 2), generator=g))
        layer.block_shift[0] = torch.tensor([0, 2])  # at least one off the centre
    return layer


def test_a_partial_non_strict_load_keeps_the_shift_and_reports_the_key():
    layer = _off_centre_layer()
    shift, kernel = layer.block_shift.clone(), layer.weight.detach().clone()
    result = layer.load_state_dict({"bias": torch.zeros(5)}, strict=False)
    assert torch.equal(layer.block_shift, shift) and torch.equal(layer.weight.detach(), kernel)
    assert set(result.missing_keys) == {"matrix", "block_shift"} and not result.unexpected_keys
    # nested (fine-tuning from a backbone checkpoint without the layer's keys)
    model = nn.Sequential(_off_centre_layer())
    shift = model[0].block_shift.clone()
    result = model.load_state_dict({"0.bias": torch.zeros(5)}, strict=False)
    assert torch.equal(model[0].block_shift, shift) and "0.block_shift" in result.missing_keys
    # a new checkpoint that lost the key is not taken for an old one: a strict load names it
    state = layer.state_dict()
    del state["block_shift"]
    with pytest.raises(RuntimeError, match="Missing key.*block_shift"):
        OrthogonalConv2d(5, 5, 3, groups=5).load_state_dict(state)


def test_an_old_format_checkpoint_loads_at_the_centre():
    layer = _off_centre_layer()
    state = layer.state_dict()
    del state["block_shift"]
    state._metadata[""]["version"] = 1  # as saved before the buffer (torch's default module version)
    fresh = _off_centre_layer(seed=5)
    assert fresh.load_state_dict(state).missing_keys == []
    assert fresh.block_shift.tolist() == [[1, 1]] * 5
    centre = torch.zeros(5, 1, 3, 3)
    centre[:, :, 1, 1] = torch.sign(layer.matrix.detach().reshape(5, 1))
    torch.testing.assert_close(fresh.weight.detach(), centre, rtol=0, atol=1e-7)
    assert layer.state_dict()._metadata[""]["version"] == 2


@pytest.mark.parametrize("make", [lambda: OrthogonalConv2d(4, 8, 3), lambda: OrthogonalConv2d(4, 4, 1, groups=4),
                                  lambda: OrthogonalConv2d(8, 8, 3, groups=4),
                                  lambda: OrthogonalConv2d(1, 2, 3, method="cayley_fft", input_size=(6, 6))])
def test_layers_without_a_discrete_shift_have_no_key(make):
    layer = make()
    assert layer.block_shift is None and "block_shift" not in layer.state_dict()


def test_freeze_and_pt2_export_build_the_shifted_kernel(tmp_path):
    model = nn.Sequential(_off_centre_layer()).eval()
    x = torch.randn(2, 5, 7, 7, generator=torch.Generator().manual_seed(0))
    assert model[0].weight[0, 0].nonzero().tolist() == [[0, 2]]  # group 0's tap at its shift, not the centre
    with torch.no_grad():
        expected = model(x)
        wrapped = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="circular")  # the layer's default padding
        reference = torch.nn.functional.conv2d(wrapped, model[0].weight, model[0].bias, groups=5)
        torch.testing.assert_close(expected, reference, rtol=0, atol=1e-6)
        frozen = orthofx.freeze(model, (x,))
        torch.testing.assert_close(frozen(x), expected, rtol=0, atol=1e-6)
    orthofx.export(model, tmp_path / "m.pt2", example_inputs=(x,))
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    with torch.no_grad():
        torch.testing.assert_close(program(x), expected, rtol=0, atol=1e-6)


def test_a_layer_pickled_before_the_buffer_loads_new_checkpoints(tmp_path):
    import pickle

    old = OrthogonalConv2d(5, 5, 3, groups=5)
    kernel = old.weight.detach().clone()
    del old._buffers["block_shift"]  # as the old code pickled it
    plain = OrthogonalConv2d(5, 8, 3)
    del plain._buffers["block_shift"]
    old, plain = pickle.loads(pickle.dumps((old, plain)))
    assert old.block_shift.tolist() == [[1, 1]] * 5 and torch.equal(old.weight.detach(), kernel)
    assert "block_shift" in old._buffers and plain.block_shift is None
    new = _off_centre_layer()
    old.load_state_dict(new.state_dict())
    assert torch.equal(old.weight.detach(), new.weight.detach())


def test_an_out_of_range_shift_error_names_the_first_groups_only():
    layer = OrthogonalConv2d(1024, 1024, 3, groups=1024, bias=False)
    state = layer.state_dict()
    state["block_shift"] = state["block_shift"].clone()
    state["block_shift"][[3, 7, 8, 500]] = torch.tensor([3, 0])
    with pytest.raises(LayerArgumentError) as info:
        OrthogonalConv2d(1024, 1024, 3, groups=1024, bias=False).load_state_dict(state)
    message = str(info.value)
    assert "group 3: [3, 0], group 7: [3, 0], group 8: [3, 0] and 1 more" in message and len(message) < 600
