"""The convnorm transform's shorter path (session 33): the filter ``V`` (and a 1 x 1 layer's scale) that the
``convnorm`` pass makes for its report is kept by the layer for eval-mode forwards without gradients, with the
conditions and key of the orthogonal layers' kernel cache, so ``transform``'s run on the example inputs does not
transform the weight again; and the weight's float64 copy is made in blocks of rows on CPU.

Every kept tensor is checked against a fresh computation (the functional ``conv_norm``, which keeps nothing) bit for
bit, after each change that must drop it, and against a float64 reference written here (the FFT of each zero-padded
kernel)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import orthofx
from orthofx.nn import convnorm as cn
from orthofx.nn.convnorm import ConvNormConv1d, ConvNormConv2d, ConvNormConv3d, conv_norm


def reference_filter(weight: torch.Tensor, grid, dilation, eps: float) -> torch.Tensor:
    """``(sum_c |FFT_L(K_D{m,c})|^2 + eps)^(-1/2)`` on the grid, rfft half spectrum, float64, from each kernel
    zero-padded onto the grid separately (no autocorrelation, no one-tap shortcut)."""
    w = weight.detach().double()
    d = w.ndim - 2
    padded = w.new_zeros(w.shape[:2] + tuple(grid))
    index = (slice(None), slice(None)) + tuple(slice(0, di * (k - 1) + 1, di) for k, di in zip(w.shape[2:], dilation))
    padded[index] = w
    power = torch.fft.fftn(padded, dim=tuple(range(2, 2 + d))).abs().square().sum(1)
    return (power[..., : grid[-1] // 2 + 1] + eps).rsqrt()


class Counting:
    """Counts the weight transforms (``_power`` for k x k kernels, ``_one_tap_norms`` for 1 x 1) while active."""

    def __init__(self, monkeypatch):
        self.calls = 0
        for name in ("_power", "_one_tap_norms"):
            original = getattr(cn, name)

            def counted(*args, _original=original, **kwargs):
                self.calls += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(cn, name, counted)


def fresh(layer, x):
    """The layer's output computed from scratch: the functional form, which keeps nothing."""
    conv = layer.conv
    with torch.no_grad():
        return conv_norm(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                         eps=layer.eps, padding_mode=conv.padding_mode)


def kept(layer) -> dict:
    entry = layer.__dict__.get("_eval_cache")
    return {} if entry is None else entry[3]


@pytest.fixture(params=["3x3", "1x1"])
def layer_and_input(request):
    torch.manual_seed(33)
    if request.param == "3x3":
        conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1)
    else:
        conv = nn.Conv2d(4, 6, 1)
    return ConvNormConv2d(conv).eval(), torch.randn(2, 4, 9, 7)


def test_pass_figures_and_eval_run_transform_each_weight_once(monkeypatch):
    """The pass's report and the run on the example inputs: one weight transform per layer (two before)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 1),
                          nn.Conv2d(16, 8, 3, stride=2, padding=1), nn.Conv2d(8, 4, 1, bias=False)).eval()
    x = torch.randn(2, 3, 10, 10)
    counting = Counting(monkeypatch)
    gm = orthofx.transform(model, "convnorm", example_inputs=(x,))
    assert counting.calls == 4
    for change in orthofx.manifest_of(gm).changes:
        layer = gm.get_submodule(change.site)
        grid = tuple(change.before["grid"])
        reference = reference_filter(layer.conv.weight, grid, layer.conv.dilation, layer.eps)
        assert change.before["row_gain_min"] == pytest.approx(float(reference.pow(-2).sub(layer.eps).min().sqrt()),
                                                              rel=1e-6)
        entries = kept(layer)
        if layer.conv.kernel_size == (1, 1):
            assert torch.equal(entries[("scale", None)], cn._one_tap_scale(layer.conv.weight, layer.eps))
            torch.testing.assert_close(entries[("scale", None)].double(), reference[:, 0, 0], rtol=1e-6, atol=0)
        else:
            v = entries[("filter", grid)]
            assert torch.equal(v, cn.convnorm_filter(layer.conv.weight, grid, layer.conv.dilation, layer.eps))
            torch.testing.assert_close(v.double(), reference, rtol=1e-6, atol=0)
    # the transformed model's eval output without gradients: what a model computing everything afresh gives
    with torch.no_grad():
        expected = gm(x)
    counting.calls = 0
    gm.train()  # drops every kept tensor
    gm.eval()
    with torch.no_grad():
        assert torch.equal(gm(x), expected)
    assert counting.calls == 4


def test_kept_in_eval_without_gradients_only(layer_and_input, monkeypatch):
    layer, x = layer_and_input
    expected = fresh(layer, x)
    counting = Counting(monkeypatch)
    with torch.no_grad():
        y = layer(x)
        assert counting.calls == 1 and kept(layer)
        assert torch.equal(layer(x), y) and counting.calls == 1     # reused
    assert torch.equal(y, expected)
    y_grad = layer(x)                                               # with gradients: computed, and the entry dropped
    assert counting.calls == 2 and not kept(layer)
    assert torch.equal(y_grad.detach(), y)
    layer.train()
    with torch.no_grad():
        layer(x)
    assert counting.calls == 3 and not kept(layer)                  # training mode keeps nothing


@pytest.mark.parametrize("change", ["sgd", "fused_adam", "load_state_dict", "assign_load", "data_assign",
                                    "train", "to_float64", "in_place"])
def test_every_weight_change_drops_the_kept_filter(layer_and_input, change):
    layer, x = layer_and_input
    with torch.no_grad():
        before = layer(x)
    assert kept(layer)
    weight = layer.conv.weight
    if change in ("sgd", "fused_adam"):
        if change == "sgd":
            optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
        else:
            optimizer = torch.optim.Adam(layer.parameters(), lr=0.5, fused=True)
        for p in layer.parameters():   # no forward with gradients, which would drop the entry by itself
            p.grad = torch.randn_like(p)
        optimizer.step()
    elif change in ("load_state_dict", "assign_load"):
        other = {k: v + torch.randn_like(v) for k, v in layer.state_dict().items()}
        layer.load_state_dict(other, assign=change == "assign_load")
    elif change == "data_assign":
        weight.data = weight.detach() * torch.linspace(0.5, 2.0, weight.shape[0]).view(-1, 1, 1, 1)
    elif change == "train":
        with torch.no_grad():
            weight.data.mul_(3.0)   # bumps no version counter: train() / eval() are what drops the entry then
        layer.train()
        layer.eval()
    elif change == "to_float64":
        layer.to(torch.float64)
        x = x.double()
    else:
        with torch.no_grad():
            weight.mul_(torch.linspace(0.5, 2.0, weight.shape[0]).view(-1, 1, 1, 1))
    with torch.no_grad():
        after = layer(x)
        expected = fresh(layer, x)
    assert torch.equal(after, expected)
    if change != "to_float64":
        assert not torch.equal(after, before)
    else:
        assert after.dtype == torch.float64
        conv = layer.conv
        grid = layer.geometry(x.shape[2:]).grid
        v = kept(layer).get(("filter", tuple(grid)), kept(layer).get(("scale", None)))
        reference = reference_filter(conv.weight, grid, conv.dilation, layer.eps)
        if conv.kernel_size == (1, 1):
            reference = reference[:, 0, 0]
        assert v.dtype == torch.float64
        torch.testing.assert_close(v, reference, rtol=1e-12, atol=0)


def test_functional_call_and_copies_do_not_share_the_kept_filter(layer_and_input):
    layer, x = layer_and_input
    with torch.no_grad():
        layer(x)
        substitute = {"conv.weight": layer.conv.weight * 2 + 1}
        out = torch.func.functional_call(layer, substitute, (x,))
        conv = layer.conv
        expected = conv_norm(x, substitute["conv.weight"], conv.bias, conv.stride, conv.padding, conv.dilation,
                             conv.groups, eps=layer.eps)
        assert torch.equal(out, expected)
        assert torch.equal(layer(x), fresh(layer, x))
    assert "_eval_cache" not in copy.deepcopy(layer).__dict__
    assert "_eval_cache" not in pickle.loads(pickle.dumps(layer)).__dict__


def test_parametrized_weight_is_never_kept():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    nn.utils.parametrize.register_parametrization(conv, "weight", _Scale())
    layer = ConvNormConv2d(conv).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        first = layer(x)
        conv.parametrizations.weight[0].factor.fill_(3.0)
        assert torch.equal(layer(x), fresh(layer, x))
        assert not torch.equal(layer(x), first)
    assert not kept(layer)


class _Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("factor", torch.tensor(1.0))

    def forward(self, w):
        return w * torch.linspace(1.0, 2.0, w.shape[0]).view(-1, 1, 1, 1) * self.factor


def test_compiled_eval_forward_with_a_kept_filter():
    torch.manual_seed(2)
    layer = ConvNormConv2d(nn.Conv2d(3, 4, 3, padding=1)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        eager = layer(x)
        assert kept(layer)
        compiled = torch.compile(layer, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), eager, rtol=1e-6, atol=1e-6)
        with torch.no_grad():
            layer.conv.weight.mul_(2.0)
        torch.testing.assert_close(compiled(x), fresh(layer, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(1000, 3, 3, 3), (7, 300, 3, 3), (70, 2000, 1, 1), (5, 3, 3), (3, 4, 2, 3, 3),
                                   (0, 3, 3, 3)])
def test_float64_blocks_equal_one_whole_conversion(shape):
    """The blocked conversion (blocks of about 1 MiB, the last one partial) gives the whole conversion's numbers bit
    for bit: the Gram matrix of each channel's taps and the one-tap norms, written out as before."""
    torch.manual_seed(3)
    weight = torch.randn(shape) * torch.logspace(-20, 20, shape[0]).view((-1,) + (1,) * (len(shape) - 1))
    taps = weight.flatten(2)
    whole = weight.to(torch.float64).flatten(2)
    assert torch.equal(cn._by_float64_rows(taps, lambda block: block.mT @ block), whole.mT @ whole)
    assert torch.equal(cn._one_tap_norms(weight),
                       torch.linalg.vector_norm(weight.flatten(1), dim=1, dtype=torch.float64))
    strided = weight.transpose(1, -1).contiguous().transpose(1, -1)   # channels-last-like strides
    assert torch.equal(cn._one_tap_norms(strided), cn._one_tap_norms(weight))
    if shape[0]:
        d = len(shape) - 2
        grid = tuple(k + 3 for k in shape[2:])
        reference = reference_filter(weight, grid, (1,) * d, 1e-5).pow(-2).sub(1e-5)
        torch.testing.assert_close(cn._power(weight, grid, 1), reference, rtol=1e-9, atol=1e-9 * float(reference.max()))


@pytest.mark.parametrize("cls, conv", [(ConvNormConv1d, nn.Conv1d(3, 4, 5, padding=2, dilation=2)),
                                       (ConvNormConv3d, nn.Conv3d(2, 3, 3, stride=2, padding=1))])
def test_gain_range_keeps_what_the_forward_computes(cls, conv):
    torch.manual_seed(4)
    layer = cls(conv).eval()
    size = (11,) if cls is ConvNormConv1d else (6, 5, 7)
    x = torch.randn((2, conv.in_channels) + size)
    geo, low, high = layer.gain_range(size)
    assert (low, high) == cn.channel_gain_range(conv.weight, geo.grid, conv.dilation)
    assert torch.equal(kept(layer)[("filter", geo.grid)],
                       cn.convnorm_filter(conv.weight, geo.grid, conv.dilation, layer.eps))
    with torch.no_grad():
        assert torch.equal(layer(x), fresh(layer, x))

