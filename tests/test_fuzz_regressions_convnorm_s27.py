"""ConvNorm (P3) against a slow numpy reference over odd layer configurations, and the regressions found with it.

The reference (:func:`reference`) follows P3 as ``orthofx.nn.convnorm`` defines it, in numpy float64 (no torch
convolution, padding or FFT):

* non-zero padding modes pad first (``np.pad``), after which the layer's zero padding ``p`` is 0;
* ``f`` is the stride-1 correlation with zero padding ``Q = max(p, k_e - 1)`` per side, by explicit loops over
  the taps of the dilated kernel, on the grid ``L = N + Q_l + Q_r - k_e + 1``;
* ``V_m(w) = (sum_c |K_hat_{m,c}(w)|^2 + eps)^(-1/2)`` by explicit sums of ``K[t] exp(-2 pi i w D t / L)``;
* ``f' = ifftn(V . fftn(f))``, the outputs ``f'[Q_l - p_l + S i]``, the bias, then the affine depthwise conv
  ("same" zero padding, by loops).
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import orthofx
from orthofx.nn.convnorm import ConvNormConv1d, ConvNormConv2d, conv_norm, convnorm_filter

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 1e-3


# ------------------------------------------------------------------------------------------------ reference


def layer_pads(conv) -> list[tuple[int, int]]:
    kernel, dilation = conv.kernel_size, conv.dilation
    if conv.padding == "valid":
        return [(0, 0)] * len(kernel)
    if conv.padding == "same":  # torch puts the odd extra zero on the right
        return [(di * (k - 1) // 2, di * (k - 1) - di * (k - 1) // 2) for k, di in zip(kernel, dilation)]
    return [(p, p) for p in conv.padding]


def reference_filter(w: np.ndarray, grid, dilation, eps: float) -> np.ndarray:
    """``V`` on the full grid, ``(M, L_1, ..., L_d)``, by explicit sums over the taps."""
    d = w.ndim - 2
    khat = np.zeros(w.shape[:2] + tuple(grid), complex)
    for tap in np.ndindex(*w.shape[2:]):
        phase = np.ones(tuple(grid), complex)
        for i, (t, di, n) in enumerate(zip(tap, dilation, grid)):
            shape = [1] * d
            shape[i] = n
            phase = phase * np.exp(-2j * np.pi * np.arange(n) * di * t / n).reshape(shape)
        khat += w[(slice(None), slice(None)) + tap][(...,) + (None,) * d] * phase
    return ((np.abs(khat) ** 2).sum(1) + eps) ** -0.5


def reference(x: torch.Tensor, conv, eps: float = EPS, v_full=None, affine=None) -> torch.Tensor:
    """ConvNorm of ``conv`` on ``x`` by its definition (module docstring), float64; ``v_full`` replaces ``V``."""
    x = x.detach().double().numpy()
    w = conv.weight.detach().double().numpy()
    d, ks, dil, stride = w.ndim - 2, w.shape[2:], conv.dilation, conv.stride
    pads = layer_pads(conv)
    if conv.padding_mode != "zeros":
        mode = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}[conv.padding_mode]
        x = np.pad(x, [(0, 0), (0, 0)] + pads, mode=mode)
        pads = [(0, 0)] * d
    n = x.shape[2:]
    ke = [di * (k - 1) + 1 for k, di in zip(ks, dil)]
    ql = [max(pl, e - 1) for (pl, _), e in zip(pads, ke)]
    qr = [max(pr, e - 1) for (_, pr), e in zip(pads, ke)]
    grid = [ni + a + b - e + 1 for ni, a, b, e in zip(n, ql, qr, ke)]
    xp = np.pad(x, [(0, 0), (0, 0)] + list(zip(ql, qr)))
    m_out, c_in = w.shape[:2]
    per_group = m_out // conv.groups
    f = np.zeros((x.shape[0], m_out) + tuple(grid))
    for m in range(m_out):
        for c in range(c_in):
            for tap in np.ndindex(*ks):
                window = tuple(slice(di * t, di * t + g) for di, t, g in zip(dil, tap, grid))
                f[:, m] += w[(m, c) + tap] * xp[(slice(None), (m // per_group) * c_in + c) + window]
    v = reference_filter(w, grid, dil, eps) if v_full is None else v_full
    axes = tuple(range(2, 2 + d))
    f = np.fft.ifftn(np.fft.fftn(f, axes=axes) * v[None], axes=axes).real
    out = [(ni + pl + pr - e) // s + 1 for ni, (pl, pr), e, s in zip(n, pads, ke, stride)]
    keep = tuple(slice(a - pl, a - pl + s * (o - 1) + 1, s) for a, (pl, _), s, o in zip(ql, pads, stride, out))
    y = f[(slice(None), slice(None)) + keep]
    if conv.bias is not None:
        y = y + conv.bias.detach().double().numpy().reshape((1, -1) + (1,) * d)
    if affine is not None:
        y = depthwise_same(y, affine.weight.detach().double().numpy(), affine.bias.detach().double().numpy())
    return torch.from_numpy(y)


def depthwise_same(y: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A depthwise conv with stride 1 and torch's "same" zero padding, by loops."""
    ks = w.shape[2:]
    pads = [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in ks]
    yp = np.pad(y, [(0, 0), (0, 0)] + pads)
    out = np.zeros_like(y)
    for tap in np.ndindex(*ks):
        window = tuple(slice(t, t + n) for t, n in zip(tap, y.shape[2:]))
        out += w[(slice(None), 0) + tap][(None, slice(None)) + (None,) * len(ks)] * yp[(slice(None), slice(None))
                                                                                       + window]
    return out + b.reshape((1, -1) + (1,) * len(ks))


def assert_near(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    assert got.shape == want.shape
    tol = (1e-10 if dtype == torch.float64 else 2e-5) * scale * (1 + float(want.abs().max()))
    err = float((got.detach().double() - want).abs().max())
    assert err <= tol, f"off by {err:.3g} (tolerance {tol:.3g})"


# ------------------------------------------------------------------------------------------------ odd layers

# (dims, Conv kwargs, input sizes run one after the other)
ODD_LAYERS = [
    (1, dict(in_channels=3, out_channels=4, kernel_size=4, stride=5, padding=2, dilation=2), [(9,), (13,)]),
    (1, dict(in_channels=3, out_channels=5, kernel_size=3, padding="same", padding_mode="reflect"), [(7,), (4,)]),
    (2, dict(in_channels=4, out_channels=4, kernel_size=(1, 5), padding="same", groups=4, bias=False),
     [(9, 11), (3, 6)]),
    (2, dict(in_channels=4, out_channels=6, kernel_size=(3, 1), stride=(4, 1), padding=(0, 2), groups=2),
     [(9, 7), (11, 4)]),
    (2, dict(in_channels=2, out_channels=3, kernel_size=2, stride=3, padding="valid", dilation=(1, 3)),
     [(8, 10), (5, 4)]),
    (2, dict(in_channels=2, out_channels=3, kernel_size=(2, 4), padding="same", dilation=(3, 1)), [(7, 8)]),
    (2, dict(in_channels=3, out_channels=3, kernel_size=3, padding=(2, 1), padding_mode="circular", stride=2),
     [(6, 9), (2, 3)]),
    (2, dict(in_channels=3, out_channels=2, kernel_size=3, padding=1, padding_mode="replicate", bias=False),
     [(5, 6)]),
    (2, dict(in_channels=3, out_channels=5, kernel_size=1, padding=2, stride=3), [(7, 8), (4, 4)]),
    (2, dict(in_channels=3, out_channels=2, kernel_size=(3, 2), padding=0, stride=(1, 2)), [(3, 2), (6, 7)]),
]


def make_layer(dims, kwargs, dtype, seed=0, **layer_kwargs):
    torch.manual_seed(seed)
    conv = (nn.Conv1d if dims == 1 else nn.Conv2d)(**kwargs).to(dtype)
    return (ConvNormConv1d if dims == 1 else ConvNormConv2d)(conv, eps=EPS, **layer_kwargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dims, kwargs, sizes", ODD_LAYERS)
def test_odd_layers_match_the_numpy_reference_in_train_eval_and_frozen(dims, kwargs, sizes, dtype):
    """Conv1d, 1 x k / k x 1 / even kernels, dilation, groups and depthwise, stride above the kernel, padding 0 /
    'same' / 'valid' / per-dimension tuples / wider than the kernel, every padding mode, no bias, input sizes
    changing between calls, batch 1 and 2, channels_last inputs, float32 and float64: the output (train, eval, and
    the frozen form within 1e-5) is the reference's. A size is first seen in eval (before any training call)."""
    layer = make_layer(dims, kwargs, dtype, affine=True)
    with torch.no_grad():
        layer.affine.weight.normal_()
        layer.affine.bias.normal_()
    inputs = [torch.randn(batch, kwargs["in_channels"], *size, dtype=dtype)
              for size in sizes for batch in (1, 2)]
    if dims == 2:
        inputs += [x.contiguous(memory_format=torch.channels_last) for x in inputs[:2]]
    layer.eval()
    assert_near(layer(inputs[-1]), reference(inputs[-1], layer.conv, affine=layer.affine), dtype)
    layer.train()
    for x in inputs:
        assert_near(layer(x), reference(x, layer.conv, affine=layer.affine), dtype)
    layer.eval()
    frozen = layer.to_plain()
    for x in inputs:
        want = reference(x, layer.conv, affine=layer.affine)
        assert_near(layer(x), want, dtype)
        torch.testing.assert_close(frozen(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bound", [1, None])
def test_running_filters_with_a_bound_of_one_or_none_deepcopy_and_state_dict(bound):
    """momentum 0.5: training on sizes A, B, A (weights moving between steps) keeps the exponential average of the
    reference V per grid; with max_running_grids=1 each new grid drops the other (A restarts from its current V,
    and eval on B's size uses V of the final weight). deepcopy, pickle, a state_dict load into a fresh layer and the
    frozen form give the same eval outputs (within 1e-5)."""
    layer = make_layer(2, dict(in_channels=2, out_channels=3, kernel_size=(2, 3), padding=(1, 0)), torch.float64,
                       momentum=0.5, max_running_grids=bound)
    conv = layer.conv
    sizes = [(5, 6), (4, 7), (5, 6)]
    running: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", orthofx.RunningFiltersDroppedWarning)
        for size in sizes:
            grid = layer.geometry(size).grid
            v = reference_filter(conv.weight.detach().numpy(), grid, conv.dilation, EPS)
            if bound == 1 and grid not in running:
                running.clear()
            running[grid] = v if grid not in running else 0.5 * running[grid] + 0.5 * v
            x = torch.randn(1, 2, *size, dtype=torch.float64)
            assert_near(layer(x), reference(x, conv), torch.float64)
            with torch.no_grad():
                conv.weight.mul_(1.2).add_(0.1)
    assert sorted(layer.running_grids) == sorted(running)
    layer.eval()
    fresh = make_layer(2, dict(in_channels=2, out_channels=3, kernel_size=(2, 3), padding=(1, 0)), torch.float64,
                       seed=5, momentum=0.5, max_running_grids=bound).eval()
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    copies = [copy.deepcopy(layer), pickle.loads(pickle.dumps(layer)), fresh, layer.to_plain()]
    for size in sizes[:2]:
        x = torch.randn(2, 2, *size, dtype=torch.float64)
        want = reference(x, conv, v_full=running.get(layer.geometry(size).grid))
        assert_near(layer(x), want, torch.float64)
        for other in copies:
            torch.testing.assert_close(other(x), layer(x), rtol=1e-5, atol=1e-5)


def test_transform_leaves_the_model_alone_and_its_state_dict_loads_into_a_fresh_transformed_model():
    """``orthofx.transform(model, "convnorm")``: the user's model keeps its modules, parameters and outputs (also
    after training the transformed one); the transformed model matches the reference, and its state_dict loads
    into a fresh transformed model and into ``orthofx.freeze`` of it, with equal eval outputs."""
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                             nn.Conv2d(4, 4, (1, 3), stride=2, padding=(0, 1), groups=4, bias=False)).double()
    model = build()
    x = torch.randn(2, 3, 8, 9, dtype=torch.float64)
    state = copy.deepcopy(model.state_dict())
    modules = [(name, type(m), id(m), sorted(m.__dict__)) for name, m in model.named_modules()]
    y = model(x)
    gm = orthofx.transform(model, "convnorm", example_inputs=(x,))
    optimiser = torch.optim.SGD(gm.parameters(), lr=0.1)
    gm(x).square().sum().backward()
    optimiser.step()
    assert [(name, type(m), id(m), sorted(m.__dict__)) for name, m in model.named_modules()] == modules
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert torch.equal(model(x), y)
    first, second = gm.get_submodule("0"), gm.get_submodule("2")
    assert first.eps == second.eps == 1e-5  # the preset's
    want = reference(torch.relu(reference(x, first.conv, first.eps)), second.conv, second.eps)
    gm.eval()
    assert_near(gm(x), want, torch.float64)
    fresh = orthofx.transform(build(), "convnorm", example_inputs=(x,)).eval()
    fresh.load_state_dict(gm.state_dict())
    assert torch.equal(fresh(x), gm(x))
    torch.testing.assert_close(orthofx.freeze(fresh)(x), gm(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ regressions


def test_empty_spatial_inputs_are_refused_by_the_layer_and_its_frozen_form():
    """An input with a spatial size 0 reached torch's conv or F.pad ("Only zero batch or zero channel inputs are
    supported", replicate padding's "Expected 3D or 4D ...", the frozen 1 x 1 conv's "Kernel size can't be greater
    than actual input size"), which named no layer; ``to_plain(input_sizes=[(0, 8)])`` of a padded layer made a
    filter for a size no forward can run on. Now one LayerArgumentError naming the layer, the size and the fix."""
    message = r"ConvNormConv2d: input size \(0, 8\) has an empty .* spatial sizes are all >= 1"
    x = torch.randn(1, 3, 0, 8)
    for kwargs in (dict(padding=2), dict(padding=1, padding_mode="replicate"), dict(padding=2, padding_mode="reflect")):
        layer = ConvNormConv2d(nn.Conv2d(3, 4, 3, **kwargs))
        with pytest.raises(orthofx.LayerArgumentError, match=message):
            layer(x)
        with pytest.raises(orthofx.LayerArgumentError, match=message):
            layer.eval().to_plain(input_sizes=[(0, 8)])
    one_tap = ConvNormConv2d(nn.Conv2d(3, 4, 1)).eval()
    with pytest.raises(orthofx.LayerArgumentError, match="FrozenConvNormNd: input size \\(0, 8\\) has an empty"):
        one_tap.to_plain()(x)


def test_reflect_padding_wider_than_the_input_is_an_orthofx_error():
    """Reflect padding needs pads below the input size. The layer failed inside F.pad with torch's "Padding size
    should be less than the corresponding input dimension" (no layer named), and ``to_plain(input_sizes=[(1, 1)])``
    accepted a size it can never run on. Now refused by the layer, its geometry / to_plain and the frozen form."""
    layer = ConvNormConv2d(nn.Conv2d(3, 4, 3, padding=2, padding_mode="reflect"))
    message = (r"ConvNormConv2d: padding_mode='reflect' pads the input by \[\(2, 2\), \(2, 2\)\] .* smaller than the "
               r"input size \(2, 8\) .* padding_mode='replicate' / 'circular'")
    with pytest.raises(orthofx.LayerArgumentError, match=message):
        layer(torch.randn(1, 3, 2, 8))
    with pytest.raises(orthofx.LayerArgumentError, match=message):
        layer.eval().to_plain(input_sizes=[(2, 8)])
    x = torch.randn(1, 3, 3, 8)
    frozen = layer.to_plain(input_sizes=[(3, 8)])
    assert_near(frozen(x), reference(x, layer.conv, eps=layer.eps), torch.float32)
    with pytest.raises(orthofx.LayerArgumentError, match=message.replace("ConvNormConv2d", "FrozenConvNormNd")):
        frozen(torch.randn(1, 3, 2, 8))


def test_an_input_too_small_for_the_kernel_is_reported_with_its_own_size_and_padding():
    """Non-zero padding modes pad first; the error for an input the padded kernel does not fit named the padded
    size with no padding ("input size (4, 10) (padded by [(0, 0), (0, 0)])"), not the user's input."""
    layer = ConvNormConv2d(nn.Conv2d(3, 4, 5, padding=1, padding_mode="replicate"))
    with pytest.raises(orthofx.LayerArgumentError, match=r"input size \(2, 8\) \(padded by \[\(1, 1\), \(1, 1\)\]\) "
                                                         r"is smaller than the dilated kernel extent 5"):
        layer(torch.randn(1, 3, 2, 8))


@pytest.mark.parametrize("dilation", [0, -1, (1, 0)])
def test_filter_refuses_a_dilation_below_one(dilation):
    """``convnorm_filter`` (and ``channel_gains``) took dilation 0, which puts every tap at offset 0: V of the
    kernel's sum, not of any conv (the reference has no such filter)."""
    with pytest.raises(orthofx.LayerArgumentError, match=rf"dilation must be a positive integer .* got "
                                                         rf"{str(dilation).replace('(', '.').replace(')', '.')}"):
        convnorm_filter(torch.randn(4, 3, 3, 3), (8, 8), dilation)


@pytest.mark.parametrize("bad", [0, -2, "3", 2.0, True])
def test_max_running_grids_set_later_is_checked(bad):
    """The bound is documented as an attribute that may be changed later; 0 was taken and kept one filter all the
    same, a string failed inside the next training forward with a TypeError. Now checked as in the constructor,
    naming the layer; a valid new bound applies at the next new grid, and survives pickling."""
    layer = ConvNormConv1d(nn.Conv1d(2, 3, 3).double(), momentum=0.5, max_running_grids=4)
    with pytest.raises(orthofx.LayerArgumentError, match=rf"^ConvNormConv1d: max_running_grids must be None .* got "
                                                         rf"{bad!r}$"):
        layer.max_running_grids = bad
    assert layer.max_running_grids == 4
    for n in (5, 6, 7):
        layer(torch.randn(1, 2, n, dtype=torch.float64))
    layer.max_running_grids = 2
    with pytest.warns(orthofx.RunningFiltersDroppedWarning, match="max_running_grids=2"):
        layer(torch.randn(1, 2, 8, dtype=torch.float64))
    assert layer.running_grids == [(9,), (10,)]
    assert pickle.loads(pickle.dumps(layer)).max_running_grids == 2
    # a layer pickled while the bound was a plain attribute keeps its value
    state = dict(layer.__dict__)
    state["max_running_grids"] = state.pop("_max_running_grids")
    old = ConvNormConv1d.__new__(ConvNormConv1d)
    old.__setstate__(state)
    assert old.max_running_grids == 2


@pytest.mark.parametrize("affine", ["no", "false", 2, None])
def test_affine_must_be_a_bool(affine):
    """``affine="no"`` (or "false" from a config file) silently added a learned depthwise conv. A refused wrapper
    (a bad affine_kernel_size too) leaves the conv unmarked, so the convnorm pass can still wrap it."""
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(orthofx.LayerArgumentError, match=rf"affine \(add .*\) must be True or False, got {affine!r}$"):
        ConvNormConv2d(conv, affine=affine)
    with pytest.raises(orthofx.LayerArgumentError, match=r"affine_kernel_size must be positive, got \(2, 0\)"):
        ConvNormConv2d(conv, affine=True, affine_kernel_size=(2, 0))
    assert not hasattr(conv, "_orthofx_convnorm_inner")


@pytest.mark.parametrize("groups", [2, 0])
def test_functional_conv_norm_refuses_groups_that_do_not_divide_the_output_channels(groups):
    """``conv_norm`` with groups not dividing the weight's output channels raised torch's conv error (groups=0 gave
    "the convolution takes 0 channels")."""
    with pytest.raises(orthofx.LayerArgumentError, match=rf"conv_norm: groups must be a positive integer dividing "
                                                         rf"the weight's 3 output channels .* got {groups}$"):
        conv_norm(torch.randn(1, 4, 8, 8), torch.randn(3, 2, 3, 3), groups=groups)
