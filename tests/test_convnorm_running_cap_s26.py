"""ConvNorm's running filters are bounded per layer (``max_running_grids``).

A layer with ``momentum`` keeps one running filter per FFT grid (so per input size) it trains on; multi-scale
training stored one per size, per layer, without end. Now a layer keeps at most ``max_running_grids`` (default 16,
``None``: no bound): a training forward on a new grid drops the filter of the least recently *updated* grid, warns
once per layer, and eval on the dropped size uses ``V`` of the current weight.

References, independent of orthofx's filter code and of its bookkeeping: the grids kept are those of a list-based
LRU written out here (:func:`_lru`); ``V`` comes from a dense float64 FFT of the zero-padded kernel
(:func:`_dense_filter`), its exponential average from a loop over the steps, and eval outputs from an explicit
float64 FFT of the stride-1 correlation (:func:`_reference_eval`) or from a ``momentum=None`` layer with the same
weights. The 2-D layer: 3 -> 4 channels, 3 x 3 kernel, padding 1, so an ``n x n`` input has the grid
``(n + 2) x (n + 2)`` and its outputs are the grid rows and columns ``1 .. n``.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

import orthofx
import orthofx.passes.convnorm  # noqa: F401  (registers the pass)
from orthofx.nn import ConvNormConv1d, ConvNormConv2d
from orthofx.nn.convnorm import RunningFiltersDroppedWarning
from references import running_grids_lru

MOMENTUM = 0.25


def _dense_filter(weight: torch.Tensor, grid: tuple[int, ...], eps: float) -> torch.Tensor:
    """``(sum_c |K_hat_mc(w)|^2 + eps)^(-1/2)`` from a dense FFT of the kernel zero-padded to the grid (float64)."""
    d = len(grid)
    spectrum = torch.fft.rfftn(weight.detach().double(), s=grid, dim=tuple(range(-d, 0)))
    return (spectrum.abs().square().sum(1) + eps).rsqrt()


def _reference_eval(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The 2-D layer's output with the filter ``v`` (float64): the stride-1 correlation padded by 2 on each side
    is the grid, filtered in the Fourier domain, cropped to rows and columns ``1 .. n``, plus the bias."""
    n = x.shape[-1]
    f = nn.functional.conv2d(x.double(), weight.detach().double(), padding=2)
    filtered = torch.fft.irfft2(torch.fft.rfft2(f) * v.double(), s=f.shape[-2:])
    return filtered[..., 1:n + 1, 1:n + 1] + bias.detach().double().view(1, -1, 1, 1)


_lru = running_grids_lru


def _layer(bound, seed: int = 0) -> ConvNormConv2d:
    torch.manual_seed(seed)
    return ConvNormConv2d(nn.Conv2d(3, 4, 3, padding=1), momentum=MOMENTUM, max_running_grids=bound).double().train()


def _train_and_expect(layer: ConvNormConv2d, sizes, bound) -> dict:
    """One training forward per size (the weight changed after each); the running filters the layer must then
    hold, least recently updated first: per grid :func:`_lru` keeps, ``V`` of the weight at its first forward
    since it was (last) stored, then ``(1 - m) running + m V`` (a grid dropped and trained on again restarts)."""
    expected: dict = {}
    generator = torch.Generator().manual_seed(1)
    done = []
    for n in sizes:
        grid = (n + 2, n + 2)
        v = _dense_filter(layer.conv.weight, grid, layer.eps)
        expected[grid] = v if grid not in expected else (1 - MOMENTUM) * expected[grid] + MOMENTUM * v
        layer(torch.randn(2, 3, n, n, generator=generator, dtype=torch.float64))
        with torch.no_grad():
            layer.conv.weight.mul_(1.1).add_(0.05)
        done.append(n)
        kept = _lru(done, bound)
        expected = {g: expected[g] for g in kept}
    return expected


def _assert_running(layer: ConvNormConv2d, expected: dict) -> None:
    assert set(layer.running_grids) == set(expected)
    for grid, v in expected.items():
        torch.testing.assert_close(layer.running_filter(grid).double(), v, rtol=1e-10, atol=0)


def _drop_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RunningFiltersDroppedWarning)]


#: 6, 7, 8 fill a bound of 3; 6 again makes 7 the least recently updated (8 x 8 grid 9 x 9), so the new 9 drops 7
#: (a first-stored-first-dropped rule would drop 6); 7 comes back (dropping 8) and restarts from V; 10 drops 6.
SIZES = (6, 7, 8, 6, 9, 7, 10)


def test_more_sizes_than_the_bound_keep_the_most_recently_updated_and_warn_once():
    layer = _layer(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected = _train_and_expect(layer, SIZES, 3)
    assert list(expected) == [(11, 11), (9, 9), (12, 12)]
    _assert_running(layer, expected)
    (message,) = _drop_warnings(caught)
    # the first drop: the 11 x 11 grid (input 9 x 9) dropped the 9 x 9 grid (input 7 x 7)
    assert "max_running_grids=3" in message and "training on the grid (11, 11)" in message
    assert "least recently updated grid (9, 9) " in message
    assert "It keeps the grids (8, 8), (10, 10), (11, 11);" in message
    assert "max_running_grids=N" in message and "None: no bound" in message
    assert "momentum=0.25" in message
    # eval reads the filters: it neither drops nor counts as an update
    with torch.no_grad():
        layer.eval()(torch.randn(1, 3, 9, 9, dtype=torch.float64))  # grid 11 x 11, the least recently updated
    layer.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(torch.randn(1, 3, 11, 11, dtype=torch.float64))
    assert set(layer.running_grids) == {(9, 9), (12, 12), (13, 13)}
    assert _drop_warnings(caught) == []  # once per layer


def test_eval_on_a_dropped_size_is_the_layer_without_momentum():
    """Eval on a dropped size equals a ``momentum=None`` layer with the same weights (and the dense reference with
    ``V`` of the current weight); on a kept size, the dense reference with the running filter."""
    layer = _layer(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RunningFiltersDroppedWarning)
        expected = _train_and_expect(layer, SIZES, 3)
    plain = ConvNormConv2d(copy.deepcopy(layer.conv), momentum=None).eval()
    layer.eval()
    generator = torch.Generator().manual_seed(3)
    for n in (6, 8, 9, 7):
        x = torch.randn(2, 3, n, n, generator=generator, dtype=torch.float64)
        with torch.no_grad():
            got = layer(x)
        grid = (n + 2, n + 2)
        if grid in expected:
            want = _reference_eval(x, layer.conv.weight, layer.conv.bias, expected[grid])
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        else:  # 6 and 8 were dropped
            with torch.no_grad():
                torch.testing.assert_close(got, plain(x), rtol=0, atol=0)
            want = _reference_eval(x, layer.conv.weight, layer.conv.bias,
                                   _dense_filter(layer.conv.weight, grid, layer.eps))
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # the frozen layer: the same outputs (V of the weight for the dropped sizes, which it remembers)
    frozen = layer.to_plain()
    x = torch.randn(2, 3, 6, 6, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), plain(x), rtol=1e-10, atol=1e-10)


def test_no_bound_keeps_every_grid_and_the_default_is_16():
    """``None`` keeps all 20 lengths of a 1-D layer without a warning; the default keeps the last 16."""
    def run(**kwargs):
        torch.manual_seed(0)
        layer = ConvNormConv1d(nn.Conv1d(2, 3, 3, padding=1), momentum=0.5, **kwargs).train()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for n in range(4, 24):
                layer(torch.randn(1, 2, n))
        return layer, _drop_warnings(caught)

    unbounded, caught = run(max_running_grids=None)
    assert unbounded.max_running_grids is None and caught == []
    assert unbounded.running_grids == [(n + 2,) for n in range(4, 24)]
    bounded, caught = run()
    assert bounded.max_running_grids == 16 and len(caught) == 1
    assert set(bounded.running_grids) == {(n + 2,) for n in range(8, 24)}
    assert "max_running_grids=16" in repr(bounded)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4", 16.0])
def test_bad_bounds_are_refused(bad):
    with pytest.raises(orthofx.LayerArgumentError, match=r"max_running_grids must be None \(no bound\) or an "
                                                          rf"integer >= 1 .* got {bad!r}$"):
        ConvNormConv2d(nn.Conv2d(3, 4, 3), momentum=0.1, max_running_grids=bad)


def test_each_layer_warns_once_with_its_own_grids():
    model = nn.Sequential(ConvNormConv2d(nn.Conv2d(3, 3, 3, padding=1), momentum=0.5, max_running_grids=1),
                          ConvNormConv2d(nn.Conv2d(3, 3, 1), momentum=0.5, max_running_grids=2)).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in (5, 6, 7, 8):
            model(torch.randn(1, 3, n, n))
    first, second = _drop_warnings(caught)
    assert "max_running_grids=1" in first and "grid (8, 8) dropped" in first and "keeps the grids (8, 8);" in first
    assert "max_running_grids=2" in second and "grid (7, 7) dropped" in second and "(5, 5)" in second
    assert model[0].running_grids == [(10, 10)] and model[1].running_grids == [(7, 7), (8, 8)]


def test_a_state_dict_with_more_grids_than_the_bound_loads_whole():
    """Every filter is loaded (no warning); the state dict's order is the order of updates, so the next new grid
    drops the first ones down to the bound."""
    source = _layer(None)
    expected = _train_and_expect(source, (4, 5, 6, 7, 8), None)
    target = _layer(2, seed=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = target.load_state_dict(source.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == [] and _drop_warnings(caught) == []
    _assert_running(target, expected)
    assert target.running_grids == [(6, 6), (7, 7), (8, 8), (9, 9), (10, 10)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        target(torch.randn(1, 3, 7, 7, dtype=torch.float64))  # a grid it has: an update, nothing dropped
        assert _drop_warnings(caught) == []
        target(torch.randn(1, 3, 9, 9, dtype=torch.float64))
    assert target.running_grids == [(9, 9), (11, 11)]  # 8 x 8 .. 10 x 10 dropped; 9 x 9 updated last
    (message,) = _drop_warnings(caught)
    assert "grids (6, 6), (7, 7), (8, 8), (10, 10)" in message


def test_copies_keep_the_order_of_updates():
    """A deep copy and a pickled layer drop the grid the original would drop."""
    layer = _layer(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RunningFiltersDroppedWarning)
        _train_and_expect(layer, (6, 7, 8, 6), 3)
        for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer)), layer):
            assert twin.max_running_grids == 3
            twin(torch.randn(1, 3, 9, 9, dtype=torch.float64))
            assert set(twin.running_grids) == {(10, 10), (8, 8), (11, 11)}  # 7 x 7's grid 9 x 9 dropped


def test_compiled_fullgraph_training_drops_as_eager_and_warns_at_eval():
    """``torch.compile(fullgraph=True)`` traces the dropping (plain dict operations): the same grids, filters and
    outputs as eager; the warning, which dynamo cannot trace, comes at the layer's next ``.eval()``."""
    compiled_layer, eager = _layer(2), _layer(2)
    generator = torch.Generator().manual_seed(2)
    inputs = [torch.randn(1, 3, n, n, generator=generator, dtype=torch.float64) for n in (6, 7, 6, 8)]
    torch._dynamo.reset()
    try:
        compiled = torch.compile(compiled_layer, fullgraph=True, backend="eager")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for x in inputs:
                torch.testing.assert_close(compiled(x), eager(x), rtol=1e-12, atol=1e-12)
            assert len(_drop_warnings(caught)) == 1  # eager's
            compiled_layer.eval()
        (message,) = _drop_warnings(caught)[1:]
        assert "training on the grid (10, 10) dropped the filter of the least recently updated grid (9, 9)" in message
    finally:
        torch._dynamo.reset()
    assert compiled_layer.running_grids == eager.running_grids == [(8, 8), (10, 10)]
    for grid in eager.running_grids:
        torch.testing.assert_close(compiled_layer.running_filter(grid), eager.running_filter(grid), rtol=0, atol=0)


def test_the_drop_warning_names_a_few_grids_when_many_are_dropped_at_once():
    """Lowering the bound by hand drops many grids at the next new one: the warning listed each of them (20 in a
    fuzz run) and every grid kept; it names four of each and counts the rest."""
    layer = _layer(None)
    for n in range(4, 14):
        layer(torch.randn(1, 3, n, n, dtype=torch.float64))
    layer.max_running_grids = 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(torch.randn(1, 3, 14, 14, dtype=torch.float64))
    (message,) = _drop_warnings(caught)
    assert "least recently updated grids (6, 6), (7, 7), (8, 8), (9, 9) and 5 more (later drops" in message
    assert "It keeps the grids (15, 15), (16, 16);" in message
    assert len(layer.running_grids) == 2
