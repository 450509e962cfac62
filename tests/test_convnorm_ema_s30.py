"""EMA / SWA copies of models with ConvNorm running filters: ``orthofx.nn.update_running_filters``.

``torch.optim.swa_utils.AveragedModel`` deep-copies the model once and then averages its parameters (and buffers
with ``use_buffers=True``). ConvNorm's running filters (``momentum=m``) are not buffers, so the copy keeps the
filters the model held when the copy was made, while it convolves with the averaged weights: its eval output
filters with ``V`` of old weights. ``update_running_filters(copy)`` sets each held filter to ``V`` of the copy's
current weight, so its eval equals the ``momentum=None`` eval (``update_bn``'s analogue).

References, independent of orthofx's filter code: ``V`` from a dense float64 FFT of each kernel zero-padded to
the grid (:func:`_dense_filter`), the running filters by a loop over the training forwards (:func:`_train`), and
the model's eval output by an explicit float64 stride-1 correlation, FFT, filter, crop and subsampling
(:func:`_reference_forward`). The averaged weights are torch's (``AveragedModel``'s parameters).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import orthofx
from orthofx.nn import ConvNormConv2d, update_running_filters

MOMENTUM = 0.3
TRAIN_SIZES = ((8, 8), (6, 6))
#: (in, out, kernel, stride, padding) of the three layers (zero padding <= k - 1: the grid is n + k - 1)
LAYERS = ((3, 5, 3, 1, 1), (5, 6, 3, 2, 1), (6, 4, 1, 1, 0))


def _model(momentum=MOMENTUM) -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for c_in, c_out, k, s, p in LAYERS:
        layers += [ConvNormConv2d(nn.Conv2d(c_in, c_out, k, stride=s, padding=p), momentum=momentum), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).double().train()


def _convnorm_layers(model: nn.Module) -> list[ConvNormConv2d]:
    return [m for m in model.modules() if isinstance(m, ConvNormConv2d)]


def _grid(size: tuple[int, int], k: int) -> tuple[int, int]:
    return tuple(n + k - 1 for n in size)


def _sizes(size: tuple[int, int]) -> list[tuple[int, int]]:
    """The spatial input size of each layer for a model input of ``size``."""
    sizes = [tuple(size)]
    for _, _, k, s, p in LAYERS[:-1]:
        sizes.append(tuple((n + 2 * p - k) // s + 1 for n in sizes[-1]))
    return sizes


def _dense_filter(weight: torch.Tensor, grid: tuple[int, int], eps: float) -> torch.Tensor:
    """``(sum_c |K_hat_mc(w)|^2 + eps)^(-1/2)`` from a dense FFT of each kernel zero-padded to the grid."""
    spectrum = torch.fft.rfft2(weight.detach().double(), s=grid)
    return (spectrum.abs().square().sum(1) + eps).rsqrt()


def _reference_layer(x: torch.Tensor, layer: ConvNormConv2d, v: torch.Tensor) -> torch.Tensor:
    """One layer with the filter ``v``: the stride-1 correlation padded by ``k - 1`` is the grid; filtered, then
    output ``i`` is grid position ``k - 1 - p + s i``, plus the bias."""
    weight, k = layer.conv.weight.detach().double(), layer.conv.kernel_size[0]
    s, p = layer.conv.stride[0], layer.conv.padding[0]
    f = nn.functional.conv2d(x.double(), weight, padding=k - 1)
    filtered = torch.fft.irfft2(torch.fft.rfft2(f) * v.double(), s=f.shape[-2:])
    n_out = [(n + 2 * p - k) // s + 1 for n in x.shape[-2:]]
    rows = slice(k - 1 - p, k - 1 - p + s * (n_out[0] - 1) + 1, s)
    cols = slice(k - 1 - p, k - 1 - p + s * (n_out[1] - 1) + 1, s)
    return filtered[..., rows, cols] + layer.conv.bias.detach().double().view(1, -1, 1, 1)


def _reference_forward(x: torch.Tensor, model: nn.Module, filters: dict | None) -> torch.Tensor:
    """The model's eval output with the filters ``filters[(layer index, grid)]`` where given, else ``V`` of the
    layer's weight (what eval uses for a grid without a running filter)."""
    for i, layer in enumerate(_convnorm_layers(model)):
        if i:
            x = torch.tanh(x)
        grid = _grid(x.shape[-2:], layer.conv.kernel_size[0])
        v = (filters or {}).get((i, grid))
        x = _reference_layer(x, layer, _dense_filter(layer.conv.weight, grid, layer.eps) if v is None else v)
    return x


def _train(model: nn.Module, steps: int, seed: int, expected: dict, ema=None) -> None:
    """``steps`` SGD steps alternating the sizes of ``TRAIN_SIZES``, updating ``ema`` after each when given, and
    ``expected`` (the running filters the model must hold) by the momentum rule from each forward's weights."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    for step in range(steps):
        size = TRAIN_SIZES[step % len(TRAIN_SIZES)]
        for i, (layer, n) in enumerate(zip(_convnorm_layers(model), _sizes(size))):
            key = (i, _grid(n, layer.conv.kernel_size[0]))
            v = _dense_filter(layer.conv.weight, key[1], layer.eps)
            expected[key] = v if key not in expected else (1 - MOMENTUM) * expected[key] + MOMENTUM * v
        x = torch.randn(4, 3, *size, generator=generator, dtype=torch.float64)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        if ema is not None:
            ema.update_parameters(model)


def _inputs(size):
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _eval_copy(use_buffers: bool, how: str):
    """A model trained 4 steps, an EMA copy made then, 6 more steps with the copy updated after each: (model,
    copy, the running filters the model held when the copy was made, the copy's module, the running filters the
    model must hold at the end)."""
    model, expected = _model(), {}
    _train(model, 4, seed=1, expected=expected)
    at_copy = {key: v.clone() for key, v in expected.items()}
    if how == "AveragedModel":
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=use_buffers)
        _train(model, 6, seed=2, expected=expected, ema=ema)
        return model, ema, at_copy, ema.module, expected
    ema = copy.deepcopy(model)  # a hand-written EMA: copy once, then lerp the parameters
    for _ in range(3):
        _train(model, 2, seed=3, expected=expected)
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 0.2)
    return model, ema, at_copy, ema, expected


@pytest.mark.parametrize("how, use_buffers", [("AveragedModel", False), ("AveragedModel", True),
                                               ("hand-written", False)])
def test_the_copy_filters_with_stale_running_filters_until_update_running_filters(how, use_buffers):
    model, ema, at_copy, module, expected = _eval_copy(use_buffers, how)
    layers = _convnorm_layers(module)
    grids = [list(layer.running_grids) for layer in layers]
    assert sorted((i, g) for i, gs in enumerate(grids) for g in gs) == sorted(at_copy)
    ema.eval()
    trained_sizes, new_size = TRAIN_SIZES, (10, 10)
    # the stale behaviour: the filters held when the copy was made, with the averaged weights
    with torch.no_grad():
        for size in trained_sizes:
            x = _inputs(size)
            got, stale = ema(x), _reference_forward(x, module, at_copy)
            torch.testing.assert_close(got, stale, rtol=1e-9, atol=1e-9)
            fresh = _reference_forward(x, module, None)
            assert (got - fresh).abs().max() > 1e-2 * fresh.abs().max()  # not V of the averaged weights
        # a grid the copy holds no filter for already uses V of the averaged weights
        torch.testing.assert_close(ema(_inputs(new_size)), _reference_forward(_inputs(new_size), module, None),
                                   rtol=1e-9, atol=1e-9)
    tensors = [[layer.running_filter(g) for g in gs] for layer, gs in zip(layers, grids)]

    assert update_running_filters(ema) == sum(map(len, grids)) == 6

    # same grids, same order, updated in place; each filter is V of the averaged weight
    assert [list(layer.running_grids) for layer in layers] == grids
    for layer, gs, ts in zip(layers, grids, tensors):
        for g, t in zip(gs, ts):
            assert layer.running_filter(g) is t
            torch.testing.assert_close(t, _dense_filter(layer.conv.weight, g, layer.eps), rtol=1e-10, atol=0)
    with torch.no_grad():
        for size in trained_sizes + (new_size,):
            x = _inputs(size)
            torch.testing.assert_close(ema(x), _reference_forward(x, module, None), rtol=1e-9, atol=1e-9)
    # the trained model's own running filters are untouched: still the momentum rule's
    for i, layer in enumerate(_convnorm_layers(model)):
        for g in layer.running_grids:
            torch.testing.assert_close(layer.running_filter(g), expected[(i, g)], rtol=1e-10, atol=0)


def test_the_updated_copy_equals_the_momentum_none_layers_with_its_weights():
    _, ema, _, module, _ = _eval_copy(True, "AveragedModel")
    update_running_filters(ema)
    plain = _model(momentum=None)
    plain.load_state_dict({k: v for k, v in module.state_dict().items() if "running_v_" not in k})
    ema.eval(), plain.eval()
    with torch.no_grad():
        for size in TRAIN_SIZES:
            torch.testing.assert_close(ema(_inputs(size)), plain(_inputs(size)), rtol=1e-9, atol=1e-12)


def test_a_float32_copy_on_the_training_grids():
    model = _model().float()
    generator = torch.Generator().manual_seed(4)
    for _ in range(3):
        model(torch.randn(2, 3, 8, 8, generator=generator)).sum().backward()
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.3 * p.grad)
                p.grad = None
    ema = AveragedModel(model, use_buffers=True)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.3)
    ema.update_parameters(model)
    assert update_running_filters(ema) == 3
    x = _inputs((8, 8)).float()
    with torch.no_grad():
        torch.testing.assert_close(ema.eval()(x).double(), _reference_forward(x, ema.module, None),
                                   rtol=1e-4, atol=1e-5)
        assert all(layer.running_filter(g).dtype == torch.float32
                   for layer in _convnorm_layers(ema.module) for g in layer.running_grids)


def test_models_without_running_filters_are_left_alone():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    before = copy.deepcopy(plain.state_dict())
    assert update_running_filters(plain) == 0
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())
    # the convnorm preset inserts momentum=None layers: an EMA copy of it computes V of its averaged weights
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.Tanh(), nn.Conv2d(5, 4, 3, stride=2, padding=1))
    gm = orthofx.transform(net, "convnorm", example_inputs=(torch.randn(2, 3, 8, 8),))
    ema = AveragedModel(gm, multi_avg_fn=get_ema_multi_avg_fn(0.5))
    with torch.no_grad():
        for p in gm.parameters():
            p.mul_(1.5).add_(0.1)
    ema.update_parameters(gm)
    assert update_running_filters(ema) == 0
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    layers = _convnorm_layers(ema.module)
    want = _reference_layer(torch.tanh(_reference_layer(x, layers[0], _dense_filter(layers[0].weight, (10, 10),
                                                                                     1e-5))),
                            layers[1], _dense_filter(layers[1].weight, (10, 10), 1e-5))
    with torch.no_grad():
        torch.testing.assert_close(ema.eval()(x).double(), want, rtol=1e-4, atol=1e-5)


def test_a_non_module_is_refused_with_the_fix():
    with pytest.raises(orthofx.errors.LayerArgumentError, match="takes an nn.Module .* got a dict"):
        update_running_filters({"conv": nn.Conv2d(1, 1, 1)})
