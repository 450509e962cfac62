"""A ConvNorm layer's order of updates of its running filters travels in its state dict's metadata.

A layer with ``momentum`` and ``max_running_grids`` drops the running filter of the least recently *updated* grid
when a training forward meets a new grid. The order of updates was not part of the state dict (``load_state_dict``
took the order of the ``running_v_*`` keys, i.e. the order the filters were first stored in), so a run saved and
resumed dropped another grid than the uninterrupted run once the layer was full, and its eval outputs on that size
differed. Now ``_save_to_state_dict`` writes the order into ``state_dict()._metadata[path]`` under
``RUNNING_ORDER_METADATA_KEY`` and ``_load_from_state_dict`` restores it.

References, independent of orthofx's bookkeeping: the uninterrupted run itself (the same layer, inputs and steps
without the save / load), and a list-based LRU written out here (:func:`_lru`) for the grids kept, least recently
updated first. Eval outputs are compared bit for bit, and each kept filter against a float64 loop over the steps
(a dense FFT of the zero-padded kernel, :func:`_dense_filter`). The 2-D layer: 2 -> 3 channels, 3 x 3 kernel,
padding 1, so an ``n x n`` input has the grid ``(n + 2) x (n + 2)``.
"""

from __future__ import annotations

import collections
import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import orthofx
from orthofx.errors import LayerArgumentError
from orthofx.nn import ConvNormConv1d, ConvNormConv2d
from orthofx.nn.convnorm import RUNNING_ORDER_METADATA_KEY, RunningFiltersDroppedWarning, update_running_filters
from orthofx.nn.jacobian import PHASE_METADATA_KEY
from references import running_grids_lru

MOMENTUM = 0.5
BOUND = 3
#: Training sizes: 6, 7, 8 fill the bound; 6 again makes 7 (grid 9 x 9) the least recently updated while the
#: state dict's order (first stored first) still starts with 6's grid 8 x 8, so 9 must drop 7, not 6; then 7 comes
#: back (dropping 8), 10 drops 6, 9 again, 11 drops 9 x 9's successor ... Saving after any prefix and resuming must
#: keep every later drop.
SIZES = (6, 7, 8, 6, 9, 7, 10, 9, 11, 6, 7)
#: Every size trained on, and one never trained on (eval uses V of the weight there).
EVAL_SIZES = sorted(set(SIZES)) + [12]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RunningFiltersDroppedWarning)
        yield


def _layer(bound=BOUND, seed: int = 0) -> ConvNormConv2d:
    torch.manual_seed(seed)
    return ConvNormConv2d(nn.Conv2d(2, 3, 3, padding=1), momentum=MOMENTUM, max_running_grids=bound).double().train()


def _inputs(sizes, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, n, n, generator=generator, dtype=torch.float64) for n in sizes]


_lru = running_grids_lru


def _dense_filter(weight: torch.Tensor, grid, eps: float) -> torch.Tensor:
    spectrum = torch.fft.rfftn(weight.detach().double(), s=grid, dim=(-2, -1))
    return (spectrum.abs().square().sum(1) + eps).rsqrt()


def _step(layer: ConvNormConv2d, x: torch.Tensor) -> None:
    """One training step: a forward (which updates the running filter of its grid) and a change of the weight."""
    layer.train()
    layer(x)
    with torch.no_grad():
        layer.conv.weight.mul_(1.1).add_(0.03)


def _eval_outputs(layer: ConvNormConv2d) -> list[torch.Tensor]:
    layer.eval()
    with torch.no_grad():
        outputs = [layer(x) for x in _inputs(EVAL_SIZES, seed=5)]
    layer.train()
    return outputs


def _expected_filters(sizes) -> dict:
    """The running filters after training a fresh ``_layer()`` on ``sizes`` (float64 loop, LRU bookkeeping), least
    recently updated first."""
    layer = _layer()
    expected: dict = {}
    done = []
    for n, x in zip(sizes, _inputs(sizes)):
        grid = (n + 2, n + 2)
        v = _dense_filter(layer.conv.weight, grid, layer.eps)
        expected[grid] = v if grid not in expected else (1 - MOMENTUM) * expected[grid] + MOMENTUM * v
        _step(layer, x)
        done.append(n)
        expected = {g: expected[g] for g in _lru(done, BOUND)}
    return expected


def _through_torch_save(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _uninterrupted() -> tuple[list, list, list]:
    """The run without a save: after each step, the order of updates, the filters and the eval outputs."""
    whole = _layer()
    orders, filters, outputs = [], [], []
    for x in _inputs(SIZES):
        _step(whole, x)
        orders.append(list(whole._running_order))
        filters.append({grid: whole.running_filter(grid).clone() for grid in whole.running_grids})
        outputs.append(_eval_outputs(whole))
    return orders, filters, outputs


@pytest.fixture(scope="module")
def uninterrupted():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RunningFiltersDroppedWarning)
        return _uninterrupted()


def _assert_same_as_uninterrupted(layer: ConvNormConv2d, uninterrupted, step: int) -> None:
    orders, filters, outputs = uninterrupted
    assert list(layer._running_order) == orders[step] == _lru(SIZES[:step + 1], BOUND)
    assert set(layer.running_grids) == set(filters[step])
    for grid, v in filters[step].items():
        assert torch.equal(layer.running_filter(grid), v)
    for mine, theirs in zip(_eval_outputs(layer), outputs[step]):
        assert torch.equal(mine, theirs)


def test_the_uninterrupted_run_is_the_reference_loop():
    """The reference run itself against the float64 loop and the list-based LRU."""
    orders, filters, _ = _uninterrupted()
    for step in range(len(SIZES)):
        expected = _expected_filters(SIZES[:step + 1])
        assert orders[step] == list(expected) and set(filters[step]) == set(expected)
        for grid, v in expected.items():
            torch.testing.assert_close(filters[step][grid], v, rtol=1e-10, atol=0)


@pytest.mark.parametrize("through_file", [False, True], ids=["state_dict", "torch_save_weights_only"])
# the resume points where the old code's outputs differed (4, 5, 8, 9) and two where only its order did (1, 6)
@pytest.mark.parametrize("k", [1, 4, 5, 6, 8, 9])
def test_a_resumed_run_keeps_the_grids_order_and_eval_outputs_of_the_uninterrupted_run(k, through_file,
                                                                                     uninterrupted):
    """Save after ``k`` training steps (and eval forwards, which do not count as updates), load into a new layer,
    continue: after every later step the same grids, in the same order of updates, the same filters bit for bit,
    and the same eval outputs on every size as the run without the save."""
    inputs = _inputs(SIZES)
    first = _layer()
    for x in inputs[:k]:
        _step(first, x)
        _eval_outputs(first)
    state = first.state_dict()
    assert state._metadata[""][RUNNING_ORDER_METADATA_KEY] == _lru(SIZES[:k], BOUND)
    if through_file:
        state = _through_torch_save(state)
    resumed = _layer(seed=7)  # other initial weights: everything must come from the state dict
    result = resumed.load_state_dict(state)
    assert result.missing_keys == [] and result.unexpected_keys == []
    _assert_same_as_uninterrupted(resumed, uninterrupted, k - 1)
    for step in range(k, len(SIZES)):
        _step(resumed, inputs[step])
        _assert_same_as_uninterrupted(resumed, uninterrupted, step)
    frozen = resumed.eval().to_plain(input_sizes=[(n, n) for n in EVAL_SIZES])
    for x, expected in zip(_inputs(EVAL_SIZES, seed=5), uninterrupted[2][-1]):
        torch.testing.assert_close(frozen(x), expected, rtol=1e-12, atol=1e-12)


def test_the_fuzz_repro_keeps_the_grid_the_uninterrupted_run_keeps():
    """The fuzzing helper's case: 10 x 10's grid dropped, 14 x 14 then least recently updated, so the next new
    grid drops 14 x 14 (the state dict's key order would have dropped 12 x 12)."""
    torch.manual_seed(0)
    layer = ConvNormConv2d(nn.Conv2d(1, 2, 3, padding=1), momentum=0.5, max_running_grids=2)
    for s in (8, 10, 12, 10):
        layer(torch.randn(1, 1, s, s))
    resumed = ConvNormConv2d(nn.Conv2d(1, 2, 3, padding=1), momentum=0.5, max_running_grids=2)
    resumed.load_state_dict(layer.state_dict())
    for m in (layer, resumed):
        m(torch.randn(1, 1, 8, 8))
    assert sorted(layer.running_grids) == sorted(resumed.running_grids) == [(10, 10), (12, 12)]


def _probed_model() -> nn.Module:
    torch.manual_seed(0)
    conv = ConvNormConv2d(nn.Conv2d(2, 3, 3, padding=1), momentum=MOMENTUM, max_running_grids=BOUND)
    return nn.Sequential(conv, nn.Tanh())


#: A Jacobian probe around the ConvNorm layer (a policy needs a rule; this one also puts a second entry into the
#: layer's metadata).
_PROBE_POLICY = {"rules": [{"match": {"kind": "block", "name": "0"}, "apply": "jacobian_isometry",
                            "with": {"every": 3}}]}


def test_export_and_load_resume_with_the_order_next_to_the_probe_step(tmp_path):
    """``orthofx.export`` -> ``orthofx.load``: the order travels with the Jacobian probe's step in the same module's
    metadata (the probe wraps the ConvNorm layer: one path), and the loaded model drops what the original drops."""
    inputs = [x.float() for x in _inputs(SIZES)]
    gm = orthofx.transform(_probed_model(), _PROBE_POLICY)
    gm.train()
    for x in inputs[:5]:
        gm(x)
    orthofx.export(gm, tmp_path / "m.pt")
    metadata = torch.load(tmp_path / "m.pt", weights_only=True)["state_dict"]._metadata["0"]
    assert metadata[RUNNING_ORDER_METADATA_KEY] == _lru(SIZES[:5], BOUND) and metadata[PHASE_METADATA_KEY] == 5 % 3
    loaded = orthofx.load(_probed_model(), tmp_path / "m.pt")
    loaded.train()
    for model in (gm, loaded):
        for x in inputs[5:]:
            model(x)
    assert list(loaded.get_submodule("0")._running_order) == list(gm.get_submodule("0")._running_order) \
        == _lru(SIZES, BOUND)
    gm.eval(), loaded.eval()
    with torch.no_grad():
        for x in _inputs(EVAL_SIZES, seed=5):
            assert torch.equal(gm(x.float()), loaded(x.float()))


def _trained(sizes=SIZES[:5], bound=BOUND) -> ConvNormConv2d:
    layer = _layer(bound)
    for x in _inputs(sizes):
        _step(layer, x)
    return layer


@pytest.mark.parametrize("bad, what", [
    ("14x14", "it is a str, not a list"),
    (5, "it is a int, not a list"),
    ([(10, 10), (10,)], r"its entry \(10,\) is not a grid of 2 ints >= 1"),
    ([(10, 10), (0, 10)], r"its entry \(0, 10\) is not a grid of 2 ints >= 1"),
    ([(10.0, 10)], r"its entry \(10.0, 10\) is not a grid of 2 ints >= 1"),
    ([(True, 10)], r"its entry \(True, 10\) is not a grid of 2 ints >= 1"),
    ([None], r"its entry None is not a grid"),
    ([(10, 10), [10, 10]], r"it names the grid \(10, 10\) twice"),
])
def test_a_damaged_order_is_refused_naming_the_entry_and_changes_nothing(bad, what):
    state = _trained().state_dict()
    state._metadata[""][RUNNING_ORDER_METADATA_KEY] = bad
    target = _trained(SIZES[:2])
    before_order = list(target._running_order)
    before = {grid: v.clone() for grid, v in target._running_filters.items()}
    for strict in (True, False):
        with pytest.raises(LayerArgumentError, match=what) as caught:
            target.load_state_dict(state, strict=strict)
        message = str(caught.value)
        assert RUNNING_ORDER_METADATA_KEY in message and "least recently updated first" in message
        assert f"del state_dict._metadata['']['{RUNNING_ORDER_METADATA_KEY}']" in message
        assert list(target._running_order) == before_order and list(target._running_filters) == list(before)
        assert all(torch.equal(target.running_filter(grid), v) for grid, v in before.items())


def test_a_damaged_order_in_a_pt_file_is_an_export_error(tmp_path):
    gm = orthofx.transform(_probed_model(), _PROBE_POLICY)
    gm.train()
    gm(torch.randn(1, 2, 6, 6))
    orthofx.export(gm, tmp_path / "m.pt")
    saved = torch.load(tmp_path / "m.pt", weights_only=True)
    saved["state_dict"]._metadata["0"][RUNNING_ORDER_METADATA_KEY] = [(8, 8, 8)]
    torch.save(saved, tmp_path / "m.pt")
    with pytest.raises(orthofx.ExportError, match=r"m\.pt' is damaged:.*orthofx_running_order=\[\(8, 8, 8\)\]"):
        orthofx.load(_probed_model(), tmp_path / "m.pt")


@pytest.mark.parametrize("how", ["entry_removed", "no_metadata", "plain_dict"])
def test_a_state_dict_without_the_order_loads_in_its_key_order(how):
    """Older files and rebuilt dicts: every filter loads and the keys' order is the order of updates (the
    behaviour before the order was saved)."""
    source = _trained()
    state = source.state_dict()
    if how == "entry_removed":
        del state._metadata[""][RUNNING_ORDER_METADATA_KEY]
    elif how == "no_metadata":
        state = collections.OrderedDict(state.items())
    else:
        state = dict(state)
    state = _through_torch_save(state)
    target = _layer(seed=3)
    result = target.load_state_dict(state)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert target.running_grids == source.running_grids
    assert list(target._running_order) == source.running_grids  # first stored first: not the order of updates
    assert source.running_grids != list(source._running_order)  # (a case where the two differ)
    for grid in source.running_grids:
        assert torch.equal(target.running_filter(grid), source.running_filter(grid))


def test_an_order_that_does_not_match_the_filters_skips_and_puts_first():
    """An entry deleted in place: its grid leaves the order. A filter the order does not name (added by hand)
    counts as updated before every grid the order names."""
    source = _trained()
    order = _lru(SIZES[:5], BOUND)  # [(10, 10), (8, 8), (11, 11)]
    state = source.state_dict()
    del state["running_v_8x8"]
    state["running_v_13x13"] = _dense_filter(source.conv.weight, (13, 13), source.eps)
    target = _layer(bound=None)
    assert target.load_state_dict(state).unexpected_keys == []
    assert list(target._running_order) == [(13, 13), (10, 10), (11, 11)] and (8, 8) in order


def test_another_bound_drops_down_to_its_own_in_the_saved_order():
    """A state dict of a layer with a larger bound loads whole; the next new grid drops the least recently updated
    grids (saved order) down to the target's bound."""
    sizes = (6, 7, 8, 9, 6, 8, 7)
    source = _trained(sizes, bound=5)
    target = _layer(bound=2, seed=9)
    target.load_state_dict(source.state_dict())
    assert list(target._running_order) == _lru(sizes, 5)
    _step(target, _inputs((10,))[0])
    assert list(target._running_order) == [(9, 9), (12, 12)]  # (11, 11), (8, 8), (10, 10) dropped


def test_momentum_none_ignores_the_order_with_the_filters():
    state = _trained().state_dict()
    state._metadata[""][RUNNING_ORDER_METADATA_KEY] = "damaged, and never read"
    torch.manual_seed(0)
    plain = ConvNormConv2d(nn.Conv2d(2, 3, 3, padding=1)).double()
    result = plain.load_state_dict(state, strict=False)
    assert sorted(result.unexpected_keys) == sorted(k for k in state if k.startswith("running_v_"))
    assert RUNNING_ORDER_METADATA_KEY not in plain.state_dict()._metadata[""]


def test_an_ema_copy_saves_and_loads_its_order():
    """``AveragedModel`` deep-copies the order; its state dict carries it under its own path (``module.0``), and
    ``update_running_filters`` leaves it."""
    net = nn.Sequential(_trained())
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    ema.update_parameters(net)
    assert update_running_filters(ema) == BOUND
    state = _through_torch_save(ema.state_dict())
    assert state._metadata["module.0"][RUNNING_ORDER_METADATA_KEY] == _lru(SIZES[:5], BOUND)
    other = AveragedModel(nn.Sequential(_layer(seed=4)), multi_avg_fn=get_ema_multi_avg_fn(0.9))
    other.load_state_dict(state)
    assert list(other.module[0]._running_order) == _lru(SIZES[:5], BOUND)
    assert list(copy.deepcopy(other).module[0]._running_order) == _lru(SIZES[:5], BOUND)


def test_a_1d_layer_and_assign_keep_the_order():
    torch.manual_seed(0)
    layer = ConvNormConv1d(nn.Conv1d(2, 3, 3, padding=1), momentum=MOMENTUM, max_running_grids=2).double()
    for n in (5, 6, 5):
        layer(torch.randn(1, 2, n, dtype=torch.float64))
    state = _through_torch_save(layer.state_dict())
    assert state._metadata[""][RUNNING_ORDER_METADATA_KEY] == [(8,), (7,)]
    state._metadata[""][RUNNING_ORDER_METADATA_KEY] = [[8], [7]]  # as a JSON round trip gives it: lists
    target = ConvNormConv1d(nn.Conv1d(2, 3, 3, padding=1), momentum=MOMENTUM, max_running_grids=2).double()
    target.load_state_dict(state, assign=True)
    assert list(target._running_order) == [(8,), (7,)]
    for m in (layer, target):
        m(torch.randn(1, 2, 7, dtype=torch.float64))
    assert target.running_grids == layer.running_grids and sorted(layer.running_grids) == [(7,), (9,)]
