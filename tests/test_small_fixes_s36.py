"""Session 36: small fixes.

- ``load_state_dict`` into a ConvNorm layer with ``momentum=None`` of a state dict holding running filters (saved
  from a layer with a momentum): a strict load fails, as before, with torch's list of unexpected keys, and
  ``strict=False`` drops them, as before, but silently: the loaded model's eval outputs differ from the saved
  one's. A ``RunningFiltersDroppedWarning`` now names each such layer, what it refused and how to keep them.
- The transformed model's manifest keeps a copy of the policy: editing the caller's ``Policy`` object after
  ``transform`` changed what ``export`` saved and ``load`` replayed.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import orthofx
from orthofx.nn.convnorm import ConvNormConv2d


def _convnorm_policy(momentum):
    params = {} if momentum is None else {"momentum": momentum}
    return {"rules": [{"match": {"type": "Conv2d"}, "apply": "convnorm", "with": params}]}


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))


def _trained_with_momentum(model, x):
    gm = orthofx.transform(model, _convnorm_policy(0.1), example_inputs=(x,))
    gm.train()
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.5)
    for inputs in (x, torch.randn(2, 3, 6, 6), x):  # the weights move, so the running filters lag behind them
        gm(inputs).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return gm


def _refusals(caught):
    return [str(w.message) for w in caught if issubclass(w.category, orthofx.errors.RunningFiltersDroppedWarning)]


def test_load_of_running_filters_into_layer_without_momentum_warns():
    model, x = _model(), torch.randn(2, 3, 8, 8)
    source = _trained_with_momentum(model, x)
    state = source.state_dict()
    running = sorted(key for key in state if ".running_v_" in key)
    assert len(running) == 4  # two layers, two grids each
    target = orthofx.transform(model, _convnorm_policy(None), example_inputs=(x,))
    with pytest.warns(orthofx.errors.RunningFiltersDroppedWarning) as caught, pytest.raises(RuntimeError) as error:
        target.load_state_dict(state)
    for key in running:
        assert key in str(error.value)  # torch's list of unexpected keys is still the error
    messages = _refusals(caught)
    assert len(messages) == 2
    for path, message in zip(("'0'", "'2'"), messages):
        assert message.startswith(f"ConvNormConv2d at {path} has momentum=None")
        assert "running_v_10x10" in message and "momentum set" in message

    # strict=False drops them, now with the warning: eval reads V of the loaded weight, unlike the saved model
    with pytest.warns(orthofx.errors.RunningFiltersDroppedWarning) as caught:
        result = target.load_state_dict(state, strict=False)
    assert len(_refusals(caught)) == 2
    assert sorted(result.unexpected_keys) == running and not result.missing_keys
    source.eval(), target.eval()
    weights_only = orthofx.transform(model, _convnorm_policy(None), example_inputs=(x,)).eval()
    weights_only.load_state_dict({k: v for k, v in state.items() if ".running_v_" not in k})
    torch.testing.assert_close(target(x), weights_only(x), rtol=0, atol=0)
    assert (target(x) - source(x)).abs().max() > 1e-4  # the saved model's eval used its running filters


def test_load_without_running_filters_does_not_warn():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    source, layer = ConvNormConv2d(conv), ConvNormConv2d(nn.Conv2d(3, 4, 3, padding=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.load_state_dict(source.state_dict())
        with pytest.raises(RuntimeError, match="stray"):
            layer.load_state_dict(dict(source.state_dict(), stray=torch.zeros(1)))


def test_layer_with_momentum_still_takes_the_running_filters():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    source = ConvNormConv2d(conv, momentum=0.5).train()
    source(torch.randn(2, 3, 8, 8))
    target = ConvNormConv2d(nn.Conv2d(3, 4, 3, padding=1), momentum=0.5)
    target.load_state_dict(source.state_dict())
    source.eval(), target.eval()
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_editing_the_policy_object_after_transform_changes_nothing_the_model_saves(tmp_path):
    """The manifest kept the caller's Policy object itself: a rule appended to it after the transform changed what
    ``export`` saved, and ``load`` rebuilt another model (its penalty differed from the transformed model's)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(2, 3, 8, 8)
    policy = orthofx.Policy.from_dict({"rules": [{"match": {"name": "0"}, "apply": "orth_regularizer"}]})
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    expected = float(orthofx.penalty(gm))
    extra = orthofx.Policy.from_dict({"rules": [{"match": {"name": "2"}, "apply": "orth_regularizer"}]}).rules[0]
    policy.rules.append(extra)  # the caller reuses its object for another run
    path = tmp_path / "m.pt"
    orthofx.export(gm, path, example_inputs=(x,))
    loaded = orthofx.load(model, path)
    # the reference: P0's L_orth of the first conv alone, at the rule's default weight 0.01, in float64
    from references import lorth64
    assert expected == pytest.approx(0.01 * lorth64(model[0].weight.detach()), rel=1e-5)
    assert float(orthofx.penalty(loaded)) == pytest.approx(expected, rel=1e-6)
    assert [change.site for change in orthofx.manifest_of(loaded).changes] == ["0"]


def _lorth_every(model, x, every):
    policy = {"rules": [{"match": {"type": "Conv2d"}, "apply": "orth_regularizer", "with": {"every": every}}]}
    return orthofx.transform(model, policy, example_inputs=(x,))


def _metadata_warnings(caught):
    return [str(w.message) for w in caught if issubclass(w.category, orthofx.errors.OrthofxWarning)
            and "carries no torch metadata" in str(w.message)]


def test_a_state_dict_without_metadata_says_the_every_count_is_not_restored():
    """The count of penalty calls (every > 1) travels in the state dict's metadata, which a dict rebuilt key by key
    drops: loading one kept the fresh model's count silently, and the resumed run evaluated other terms than the
    run it continued. A warning now says so, only where the count matters and the metadata is missing."""
    model, x = _model(), torch.randn(2, 3, 8, 8)
    source = _lorth_every(model, x, every=3)
    for _ in range(2):
        orthofx.penalty(source).backward()
    assert orthofx.manifest_of(source).penalty_calls == 2
    state = source.state_dict()
    rebuilt = {key: value.clone() for key, value in state.items()}  # no _metadata

    target = _lorth_every(model, x, every=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        target.load_state_dict(rebuilt)
    messages = _metadata_warnings(caught)
    assert len(messages) == 1 and "the model's own count stays" in messages[0]
    assert orthofx.manifest_of(target).penalty_calls == 0  # not restored: what the warning says

    # the same tensors with the metadata: restored, no warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        target.load_state_dict(state)
    assert not _metadata_warnings(caught) and orthofx.manifest_of(target).penalty_calls == 2

    # nothing to restore: every 1, or a plain model's state dict (metadata present, no count)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _lorth_every(model, x, every=1).load_state_dict(rebuilt)
        _lorth_every(model, x, every=3).load_state_dict(model.state_dict())
    assert not _metadata_warnings(caught)


def test_a_state_dict_without_metadata_says_the_probe_step_is_not_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Tanh()), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    policy = {"rules": [{"match": {"kind": "block", "name": "0"}, "apply": "jacobian_isometry",
                         "with": {"every": 2}}]}
    source = orthofx.transform(model, policy, example_inputs=(x,)).train()
    source(x)  # one training step of the probe's period
    rebuilt = {key: value for key, value in source.state_dict().items()}
    target = orthofx.transform(model, policy, example_inputs=(x,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        target.load_state_dict(rebuilt)
    messages = _metadata_warnings(caught)
    assert len(messages) == 1 and "the probe's own step stays" in messages[0]
    # a partial state dict without the probe's keys restores nothing of the probe: no warning about its step
    partial = {key: value for key, value in rebuilt.items() if not key.startswith("0.")}
    assert partial
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        target.load_state_dict(partial, strict=False)
    assert not _metadata_warnings(caught)
