"""ConvNorm's running filters (``momentum``) are the layer's state but not its buffers (issue 3).

DistributedDataParallel broadcasts buffers, and ranks whose ConvNorm layers had trained on different input sizes
held different sets of running-filter buffers and aborted in that broadcast (tests/test_fuzz_regressions_ddp.py).
The running filters now live in a dict keyed by the FFT grid; everything else an ``nn.Module`` user relies on
must stay as it was: ``state_dict`` keys and values, ``load_state_dict`` (strict or not, ``assign``, grids the
layer never saw), ``.double()`` / ``.half()``, ``copy.deepcopy``, pickling, ``torch.save`` with
``weights_only=True``, freezing, ``torch.compile(fullgraph=True)``.

References, independent of orthofx's filter code: ``V`` from a dense float64 FFT of the zero-padded kernel
(:func:`_dense_filter`), its exponential average by a loop over the steps (:func:`_trained`), and the eval output
from an explicit float64 FFT of the stride-1 correlation (:func:`_reference_eval`). The layer: 3 -> 4 channels,
3 x 3 kernel, padding 1, stride 1, so an ``n x n`` input has the grid ``(n + 2) x (n + 2)`` and its outputs are the
grid rows and columns ``1 .. n``.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import orthofx
from orthofx.nn import ConvNormConv2d

MOMENTUM = 0.25
SIZES = ((8, 8), (6, 6), (8, 8))   # grids 10 x 10 (twice) and 8 x 8
KEYS = ["running_v_10x10", "running_v_8x8", "conv.weight", "conv.bias"]


def _dense_filter(weight: torch.Tensor, grid: tuple[int, int], eps: float) -> torch.Tensor:
    """``(sum_c |K_hat_mc(w)|^2 + eps)^(-1/2)`` from a dense FFT of the kernel zero-padded to the grid (float64)."""
    spectrum = torch.fft.rfft2(weight.detach().double(), s=grid)
    return (spectrum.abs().square().sum(1) + eps).rsqrt()


def _reference_eval(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The layer's output with the filter ``v`` (float64): the stride-1 correlation padded by 2 on each side is the
    grid, filtered in the Fourier domain, cropped to rows and columns ``1 .. n``, plus the bias."""
    n = x.shape[-1]
    f = nn.functional.conv2d(x.double(), weight.detach().double(), padding=2)
    filtered = torch.fft.irfft2(torch.fft.rfft2(f) * v.double(), s=f.shape[-2:])
    return filtered[..., 1:n + 1, 1:n + 1] + bias.detach().double().view(1, -1, 1, 1)


def _layer(seed: int = 0, dtype=torch.float64) -> ConvNormConv2d:
    torch.manual_seed(seed)
    return ConvNormConv2d(nn.Conv2d(3, 4, 3, padding=1), momentum=MOMENTUM).to(dtype).train()


def _trained(dtype=torch.float64, sizes=SIZES) -> tuple[ConvNormConv2d, dict]:
    """A layer trained on ``sizes`` (one forward each, the weight changed after each) and the running filters it
    must hold: per grid, ``V`` of the weight of its first forward on that grid, then ``(1 - m) running + m V``."""
    layer = _layer(dtype=dtype)
    return layer, _train(layer, layer, dtype, sizes)


def _train(layer: ConvNormConv2d, forward, dtype=torch.float64, sizes=SIZES) -> dict:
    """Run ``forward`` (the layer, or a module around it) once on each of ``sizes``, changing the layer's weight
    after each, and return the running filters the layer must then hold (see :func:`_trained`)."""
    expected = {}
    generator = torch.Generator().manual_seed(1)
    for size in sizes:
        grid = (size[0] + 2, size[1] + 2)
        v = _dense_filter(layer.conv.weight, grid, layer.eps)
        expected[grid] = v if grid not in expected else (1 - MOMENTUM) * expected[grid] + MOMENTUM * v
        forward(torch.randn(2, 3, *size, generator=generator, dtype=dtype))
        with torch.no_grad():
            layer.conv.weight.mul_(1.1).add_(0.05)
    return expected


def _assert_running(layer: ConvNormConv2d, expected: dict, rtol: float = 1e-10) -> None:
    assert sorted(layer.running_grids) == sorted(expected)
    for grid, v in expected.items():
        torch.testing.assert_close(layer.running_filter(grid).double(), v, rtol=rtol, atol=0)


def _assert_eval(layer: nn.Module, source: ConvNormConv2d, expected: dict, dtype=torch.float64,
                 rtol: float = 1e-9) -> None:
    """``layer``'s eval outputs on both trained sizes are the reference's with ``source``'s weight and bias and
    the expected running filters."""
    for size in ((8, 8), (6, 6)):
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(9), dtype=dtype)
        with torch.no_grad():
            got = layer.eval()(x)
        want = _reference_eval(x, source.conv.weight, source.conv.bias, expected[(size[0] + 2, size[1] + 2)])
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol)


def test_running_filters_are_state_dict_entries_but_not_buffers():
    """No buffers (what DDP broadcasts), and the state dict of before: a ``running_v_<L1>x<L2>`` entry per grid,
    before the conv's parameters, holding the exponential average of the dense reference's V."""
    layer, expected = _trained()
    assert dict(layer.named_buffers()) == {}
    state = layer.state_dict()
    assert list(state) == KEYS
    for grid, v in expected.items():
        torch.testing.assert_close(state[f"running_v_{grid[0]}x{grid[1]}"], v, rtol=1e-10, atol=0)
        assert not state[f"running_v_{grid[0]}x{grid[1]}"].requires_grad
    assert list(layer.state_dict(keep_vars=True)) == KEYS
    _assert_running(layer, expected)
    _assert_eval(layer, layer, expected)


@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("strict", [True, False])
def test_state_dict_loads_into_a_fresh_layer_that_never_saw_the_sizes(strict, assign):
    """A fresh layer (other weights, one stale filter of another grid) takes the running filters of grids it
    never saw: no key missing or unexpected (an unrelated key is reported, alone), the stale filter dropped, the
    filters copied (or, with ``assign=True``, the state dict's own tensors, as torch assigns buffers), and its
    eval outputs are the reference's."""
    source, expected = _trained()
    fresh = _layer(seed=5)
    fresh(torch.randn(1, 3, 12, 12, dtype=torch.float64))  # a 14 x 14 filter of other weights
    state = source.state_dict()
    extra = {"unrelated": torch.ones(1)}
    if strict:
        with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "unrelated"\.') as info:
            fresh.load_state_dict({**state, **extra}, strict=True, assign=assign)
        assert "running_v" not in str(info.value)
        result = fresh.load_state_dict(state, strict=True, assign=assign)
        assert result.missing_keys == [] and result.unexpected_keys == []
    else:
        result = fresh.load_state_dict({**state, **extra}, strict=False, assign=assign)
        assert result.missing_keys == [] and result.unexpected_keys == ["unrelated"]
    assert dict(fresh.named_buffers()) == {}
    assert fresh.running_grids == [(10, 10), (8, 8)]
    assert list(fresh.state_dict()) == KEYS
    _assert_running(fresh, expected)
    for grid in expected:
        mine, theirs = fresh.running_filter(grid), state[f"running_v_{grid[0]}x{grid[1]}"]
        assert (mine is theirs) if assign else (mine.data_ptr() != theirs.data_ptr())
    _assert_eval(fresh, source, expected)


def test_deepcopy_and_pickling_carry_the_running_filters():
    """A deep copy has its own running filters (training it leaves the original's alone); a pickled layer and one
    saved whole with torch.save come back with them; a layer pickled when they were buffers named
    ``running_v_*`` loads with them taken out of its buffers."""
    layer, expected = _trained()
    twin = copy.deepcopy(layer)
    assert dict(twin.named_buffers()) == {}
    _assert_running(twin, expected)
    assert all(twin.running_filter(g).data_ptr() != layer.running_filter(g).data_ptr() for g in expected)
    v = _dense_filter(twin.conv.weight, (10, 10), twin.eps)
    twin.train()(torch.randn(1, 3, 8, 8, dtype=torch.float64))
    _assert_running(layer, expected)
    _assert_running(twin, {**expected, (10, 10): (1 - MOMENTUM) * expected[(10, 10)] + MOMENTUM * v})
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    for restored in (pickle.loads(pickle.dumps(layer)), torch.load(buffer, weights_only=False)):
        assert dict(restored.named_buffers()) == {}
        _assert_running(restored, expected)
        _assert_eval(restored, layer, expected)
    # the layout of before: the filters in _buffers, no dict
    old = {k: v for k, v in layer.__dict__.items() if k != "_running_filters"}
    old["_buffers"] = {f"running_v_{g[0]}x{g[1]}": v.clone() for g, v in layer._running_filters.items()}
    restored = pickle.loads(pickle.dumps(_OldLayout(old)))
    assert dict(restored.named_buffers()) == {}
    _assert_running(restored, expected)
    assert list(restored.state_dict()) == KEYS


class _OldLayout:
    """Pickles as a ConvNormConv2d whose ``__dict__`` is ``state`` (what a layer pickled before the change holds)."""

    def __init__(self, state: dict):
        self.state = state

    def __reduce__(self):
        return (_new_layer, (), self.state)


def _new_layer() -> ConvNormConv2d:
    return ConvNormConv2d.__new__(ConvNormConv2d)


def test_double_and_half_casts_move_the_running_filters():
    """``.double()`` converts the running filters to float64 (their float32 values exactly), ``.half()`` and
    ``.bfloat16()`` keep them in float32 (the layer computes V in float32 for half weights), ``.float()`` brings
    them back; the float64 layer evaluates as the reference."""
    layer, expected = _trained(torch.float32)
    _assert_running(layer, expected, rtol=1e-5)
    before = {g: layer.running_filter(g).clone() for g in expected}
    layer.double()
    assert dict(layer.named_buffers()) == {}
    for grid, v in before.items():
        assert layer.running_filter(grid).dtype == torch.float64
        assert torch.equal(layer.running_filter(grid), v.double())
    _assert_eval(layer, layer, {g: v.double() for g, v in before.items()})
    for cast in (nn.Module.half, nn.Module.bfloat16, nn.Module.float):
        cast(layer)
        for grid, v in before.items():
            assert layer.running_filter(grid).dtype == torch.float32
            assert torch.equal(layer.running_filter(grid), v)
    layer.to(torch.float64)
    assert all(layer.running_filter(g).dtype == torch.float64 for g in expected)


def test_state_dict_through_torch_save_with_weights_only():
    """The state dict saved with torch.save loads with ``torch.load(weights_only=True)`` (plain tensors only) into
    a fresh layer, which then holds the reference's running filters and evaluates as the reference."""
    layer, expected = _trained()
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert list(state) == KEYS
    fresh = _layer(seed=3).eval()
    fresh.load_state_dict(state)
    assert dict(fresh.named_buffers()) == {}
    _assert_running(fresh, expected)
    _assert_eval(fresh, layer, expected)


@pytest.mark.parametrize("how", ["to_plain", "freeze"])
def test_frozen_layer_uses_the_running_filters(how):
    """The frozen form of a layer that took its running filters from a state dict (it never ran, so it knows the
    grids from its running filters alone) evaluates as the reference with those filters; its filters are them."""
    source, expected = _trained()
    layer = _layer(seed=7).eval()
    layer.load_state_dict(source.state_dict())
    assert dict(layer.named_buffers()) == {} and layer.input_sizes == []
    frozen = layer.to_plain() if how == "to_plain" else orthofx.freeze(nn.Sequential(layer))
    plain = frozen if how == "to_plain" else frozen.get_submodule("0")
    assert sorted(plain.grids) == sorted(expected)
    for grid, v in expected.items():
        torch.testing.assert_close(plain.filter_for(grid), v, rtol=1e-10, atol=0)
    _assert_eval(frozen, source, expected)


def test_compiled_fullgraph_trains_and_evaluates_several_sizes():
    """``torch.compile(fullgraph=True)`` (aot_eager) of a layer with running filters on three sizes and the first
    again (the weight changed after each step), in training then in eval: the third size makes dynamo compile for
    dynamic shapes, where the running filter's buffer name, built from the grid with str(), stopped the full
    graph. Outputs equal eager's, the running filters the reference's."""
    layer, eager = _layer(), _layer()
    generator = torch.Generator().manual_seed(2)
    inputs = [torch.randn(2, 3, *size, generator=generator, dtype=torch.float64) for size in ((8, 8), (6, 6), (10, 10))]
    expected = {}
    torch._dynamo.reset()
    try:
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        for x in inputs + inputs[:1]:
            grid = (x.shape[-2] + 2, x.shape[-1] + 2)
            v = _dense_filter(layer.conv.weight, grid, layer.eps)
            expected[grid] = v if grid not in expected else (1 - MOMENTUM) * expected[grid] + MOMENTUM * v
            torch.testing.assert_close(compiled(x), eager(x), rtol=1e-10, atol=1e-10)
            with torch.no_grad():
                for module in (layer, eager):
                    module.conv.weight.mul_(1.1).add_(0.05)
        _assert_running(layer, expected)
        _assert_running(eager, expected)
        layer.eval()
        eager.eval()
        for x in inputs:
            torch.testing.assert_close(compiled(x), eager(x), rtol=1e-10, atol=1e-10)
    finally:
        torch._dynamo.reset()
    _assert_running(layer, expected)


def test_running_filters_held_leaves_them_alone_and_gives_the_training_output():
    """Inside ``running_filters_held`` (for code that runs extra training forwards without moving the running
    statistics, as orthofx.metrics' Jacobian estimator does) the layers found in the module (nested too) give the
    training output (the reference's, normalised by V of the current weight) and store nothing: the trained grids
    keep their filters, a new size adds none; on leaving, the layers update again."""
    from orthofx.nn.convnorm import running_filters_held

    layer, expected = _trained()
    model = nn.Sequential(nn.Identity(), nn.Sequential(layer))
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with running_filters_held(model):
        got = layer.train()(x)
        layer(torch.randn(1, 3, 5, 5, dtype=torch.float64))
    v = _dense_filter(layer.conv.weight, (10, 10), layer.eps)
    torch.testing.assert_close(got.detach(), _reference_eval(x, layer.conv.weight, layer.conv.bias, v),
                               rtol=1e-9, atol=1e-9)
    _assert_running(layer, expected)
    layer(x)
    _assert_running(layer, {**expected, (10, 10): (1 - MOMENTUM) * expected[(10, 10)] + MOMENTUM * v})


@pytest.mark.parametrize("route", ["double_vjp", "auto"])
def test_a_jacobian_probe_around_the_layer_moves_the_running_filters_once_per_step(route):
    """The probe's estimate runs the layer again (double-VJP route) on copies of its state: the running filters
    must move once per training step, by the reference's update. Before the estimator also copied the running
    filters (they were buffers then; now :func:`running_filters_held`), they moved twice. The ``auto`` route
    (forward mode first) used to refuse the in-place update inside ``torch.func.jvp``."""
    from orthofx.nn import JacobianProbe

    layer = _layer()
    probe = JacobianProbe(layer, route=route)

    def forward(x):
        probe(x)
        assert probe.estimate is not None

    _assert_running(layer, _train(layer, forward))


def test_casting_a_jacobian_probe_around_the_layer_casts_its_running_filters():
    """The probe shares the layer's registries, and its ``.double()`` / ``.half()`` run the layer's own
    ``_apply`` (before, nn.Module's, which left the running filters, kept outside the buffers, in float32)."""
    from orthofx.nn import JacobianProbe

    layer, expected = _trained(torch.float32)
    probe = JacobianProbe(layer)
    before = {g: layer.running_filter(g).clone() for g in expected}
    probe.double()
    assert layer.conv.weight.dtype == torch.float64
    for grid, v in before.items():
        assert layer.running_filter(grid).dtype == torch.float64 and torch.equal(layer.running_filter(grid), v.double())
    probe.half()
    assert all(torch.equal(layer.running_filter(g), v) for g, v in before.items())  # float32, as the layer's cast


def test_a_3d_layer_and_its_frozen_form_convert_to_channels_last_3d():
    """``.to(memory_format=torch.channels_last_3d)`` gave every 4-D tensor that format and torch refused the
    running filters (and the frozen filters) of a 3-D layer, of shape ``(M, L1, L2, L3 // 2 + 1)``: "required rank 5
    tensor". The conv converts, the filters are left as they are, and the outputs are those before (plain torch:
    the same layer unconverted)."""
    from orthofx.nn import ConvNormConv3d

    torch.manual_seed(0)
    layer = ConvNormConv3d(nn.Conv3d(2, 3, 3, padding=1), momentum=MOMENTUM).double().train()
    x = torch.randn(2, 2, 5, 5, 5, dtype=torch.float64)
    layer(x)
    layer.eval()
    frozen = layer.to_plain()
    with torch.no_grad():
        want = layer(x)
    for module in (layer, frozen):
        module.to(memory_format=torch.channels_last_3d)
        with torch.no_grad():
            torch.testing.assert_close(module(x.contiguous(memory_format=torch.channels_last_3d)), want,
                                       rtol=1e-12, atol=1e-12)
    assert layer.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)


def test_reset_parameters_after_deferred_construction():
    """Built under ``torch.device("meta")`` and materialised with ``to_empty()``, every tensor is uninitialised,
    the running filters (loaded from a state dict or kept) too; ``reset_parameters()`` gives a new layer's state:
    no running filters, identity affine part, and the conv's weight re-drawn (a training forward then matches the
    reference's V of that weight)."""
    with torch.device("meta"):
        layer = ConvNormConv2d(nn.Conv2d(3, 4, 3, padding=1), momentum=MOMENTUM, affine=True)
    layer.load_state_dict(_trained()[0].float().state_dict(), strict=False, assign=True)
    assert layer.running_grids  # filters were there
    layer.to_empty(device="cpu")
    torch.manual_seed(3)
    layer.reset_parameters()
    assert layer.running_grids == []
    assert torch.equal(layer.affine.bias, torch.zeros(4))
    assert float(layer.affine.weight.detach().sum()) == 4.0 and float(layer.affine.weight.detach().abs().max()) == 1.0
    torch.manual_seed(3)
    reference = nn.Conv2d(3, 4, 3, padding=1)  # the same draw as conv.reset_parameters()
    assert torch.equal(layer.conv.weight, reference.weight)
    layer.train()(torch.randn(1, 3, 8, 8))
    torch.testing.assert_close(layer.running_filter((10, 10)).double(),
                               _dense_filter(reference.weight, (10, 10), layer.eps), rtol=1e-5, atol=0)
