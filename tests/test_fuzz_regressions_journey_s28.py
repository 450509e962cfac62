"""Regressions found by running the presets through realistic training workflows (checkpoint / resume, frozen
backbones, mixed precision, EMA copies, freeze and export at the end).

- A Jacobian probe with ``every > 1`` lost its step in the period when a run was resumed from ``gm.state_dict()``:
  the resumed run estimated (and paid the penalty) on other steps than the uninterrupted one. The step now
  travels in the state dict's metadata. Reference: the uninterrupted run, step by step.
- ``orthogonal_conv`` replaced a frozen layer (``requires_grad=False``: a pretrained layer kept fixed) by its
  nearest orthogonal layer, another function that no training step could correct, and said nothing (explain:
  ``apply``). Such a layer is now skipped (``frozen: skip``, the default, as ``isometric_init`` does), or replaced
  on request (``frozen: overwrite``). Reference: the frozen layer's own weights and outputs, bitwise.
- The eval-mode kernel cache of the orthogonal layers outlived a fused optimizer step (which bumps no version
  counter) when an eval forward without gradients came between ``backward()`` and ``step()`` (a model trained in
  eval mode, metrics on the training batch): every later eval forward used the kernel of the weights before the
  step. Reference: a fresh copy of the layer (no cache) and the plain conv with the layer's weight.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthofx
from orthofx.nn import OrthogonalConv2d, OrthogonalLinear
from orthofx.nn.jacobian import PHASE_METADATA_KEY, JacobianProbe

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ probe step across a resume

def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh()), nn.Linear(6, 3))


_EVERY = {"rules": [{"match": {"kind": "block", "name": "0"}, "apply": "jacobian_isometry",
                     "with": {"weight": 0.5, "every": 3}}]}


def _build():
    gm = orthofx.transform(_net(), _EVERY, example_inputs=(torch.randn(4, 6),))
    gm.get_submodule("0").seed = 0  # the same probes at every estimate: runs comparable step by step
    return gm, torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)


def _step(gm, optimizer, x, y) -> tuple[float, float]:
    """One training step; (task loss, penalty)."""
    task = F.cross_entropy(gm(x), y)
    pen = orthofx.penalty(gm)
    optimizer.zero_grad()
    (task + pen).backward()
    optimizer.step()
    gm.eval()
    with torch.no_grad():  # a validation pass between steps: no estimate, no step of the period
        gm(x)
    gm.train()
    return float(task.detach()), float(pen.detach())


def _batches(n: int):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 6, generator=generator), torch.randint(0, 3, (4,), generator=generator))
            for _ in range(n)]


def test_resuming_from_a_state_dict_keeps_the_probes_every_period():
    data = _batches(7)
    gm, optimizer = _build()
    uninterrupted = [_step(gm, optimizer, *batch) for batch in data]
    # the period shows: the penalty is paid on steps 0, 3, 6 only
    assert [pen > 0 for _, pen in uninterrupted] == [True, False, False, True, False, False, True]

    first, optimizer_a = _build()
    resumed = [_step(first, optimizer_a, *batch) for batch in data[:2]]
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": optimizer_a.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    second, optimizer_b = _build()
    second.load_state_dict(checkpoint["model"])
    optimizer_b.load_state_dict(checkpoint["optimizer"])
    resumed += [_step(second, optimizer_b, *batch) for batch in data[2:]]

    for (task_u, pen_u), (task_r, pen_r) in zip(uninterrupted, resumed):
        assert task_r == pytest.approx(task_u, abs=1e-6) and pen_r == pytest.approx(pen_u, abs=1e-6)
    for (name, a), b in zip(gm.state_dict().items(), second.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)


def test_probe_step_metadata_leaves_the_keys_and_the_plain_model_alone():
    gm, optimizer = _build()
    for batch in _batches(2):
        _step(gm, optimizer, *batch)
    state = gm.state_dict()
    plain = _net()
    assert list(state) == list(plain.state_dict())              # no key added
    assert state._metadata["0"][PHASE_METADATA_KEY] == 2
    plain.load_state_dict(state)                                 # strict: the plain model takes it as it is
    torch.testing.assert_close(plain(torch.ones(2, 6)), gm.eval()(torch.ones(2, 6)), atol=0, rtol=0)

    # a state dict without the entry (the plain model's) leaves the probe's step as it is
    probe = gm.get_submodule("0")
    assert isinstance(probe, JacobianProbe) and probe.calls == 2
    gm.load_state_dict(plain.state_dict())
    assert probe.calls == 2
    # a state saved by a probe with another period lands inside this one's
    state._metadata["0"][PHASE_METADATA_KEY] = 7
    gm.load_state_dict(state)
    assert probe.calls == 7 % 3


def test_a_damaged_probe_step_in_the_metadata_is_refused():
    gm, _ = _build()
    state = gm.state_dict()
    state._metadata["0"][PHASE_METADATA_KEY] = "two"
    with pytest.raises(orthofx.LayerArgumentError, match=r"orthofx_probe_calls='two'.*int >= 0.*remove the entry"):
        gm.load_state_dict(state)


# ------------------------------------------------------------------------------ frozen layers, orthogonal_conv

class _Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        h = torch.relu(self.body(torch.relu(self.stem(x))))
        return self.head(h.mean((2, 3)))


def _frozen_stem_model() -> nn.Module:
    torch.manual_seed(0)
    model = _Backbone()
    model.stem.requires_grad_(False)       # a pretrained stem kept fixed
    model.head.bias.requires_grad_(False)  # a frozen bias alone does not keep the weight from being replaced
    return model


def test_orthogonal_preset_leaves_a_frozen_layer_as_it_is():
    model = _frozen_stem_model()
    x = torch.randn(2, 3, 6, 6)
    gm = orthofx.transform(model, "orthogonal", example_inputs=(x,))
    stem = gm.get_submodule("stem")
    assert type(stem) is nn.Conv2d and not stem.weight.requires_grad
    torch.testing.assert_close(stem.weight, model.stem.weight, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(stem(x), model.stem(x), atol=0, rtol=0)
    assert isinstance(gm.get_submodule("body"), OrthogonalConv2d)
    head = gm.get_submodule("head")
    assert isinstance(head, OrthogonalLinear) and not head.bias.requires_grad
    # exactly orthogonal where replaced: W W^T = I for the 4 x 4 head
    weight = head.weight.detach().double()
    torch.testing.assert_close(weight @ weight.T, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)

    row = {r["site"]: r for r in orthofx.report(gm).to_dict()["rows"]}["stem"]
    assert "skipped: frozen" in row["pass"]
    explained = str(orthofx.explain(model, "orthogonal", example_inputs=(x,)))
    assert "skipped: frozen (weight requires_grad=False; with: {frozen: overwrite} replaces it)" in explained
    assert not orthofx.penalty_terms(gm)  # no L_orth on the frozen stem either
    # the user's model is untouched
    assert type(model.stem) is nn.Conv2d and not model.stem.weight.requires_grad


def test_frozen_overwrite_replaces_the_frozen_layer_and_keeps_it_frozen():
    model = _frozen_stem_model()
    policy = {"rules": [{"match": {"type": ["Conv2d", "Linear"]}, "apply": "orthogonal_conv",
                         "with": {"frozen": "overwrite"}}]}
    gm = orthofx.transform(model, policy)
    stem = gm.get_submodule("stem")
    assert isinstance(stem, OrthogonalConv2d) and not any(p.requires_grad for p in stem.parameters())
    sv = orthofx.metrics.conv_singular_values(stem.weight.detach().double(), 6)
    assert float((sv - 1).abs().max()) < 1e-6


def test_a_rule_selecting_only_frozen_layers_is_a_plan_error_unless_optional():
    model = _frozen_stem_model()
    rule = {"match": {"name": "stem"}, "apply": "orthogonal_conv"}
    with pytest.raises(orthofx.PlanError, match=r"stem: frozen \(weight requires_grad=False"):
        orthofx.explain(model, {"rules": [rule]})
    gm = orthofx.transform(model, {"rules": [{**rule, "optional": True}]})
    assert type(gm.get_submodule("stem")) is nn.Conv2d


# ------------------------------------------------------------------------------ eval cache and fused steps

@pytest.mark.parametrize("make", [lambda: OrthogonalConv2d(3, 4, 3, padding=1), lambda: OrthogonalLinear(5, 3)],
                         ids=["conv", "linear"])
def test_a_fused_step_after_an_eval_forward_invalidates_the_kernel_cache(make):
    torch.manual_seed(0)
    layer = make().eval()  # trained in eval mode (frozen statistics elsewhere in the model)
    x = torch.randn(2, 3, 5, 5) if isinstance(layer, OrthogonalConv2d) else torch.randn(2, 5)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1, fused=True)
    layer(x).square().sum().backward()
    with torch.no_grad():
        before = layer(x)        # metrics between backward and step: fills the cache
    optimizer.step()             # fused: writes the parameters, bumps no version counter
    with torch.no_grad():
        after = layer(x)
        plain = (F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), layer.weight, layer.bias)
                 if isinstance(layer, OrthogonalConv2d) else F.linear(x, layer.weight, layer.bias))
    assert float((after - before).abs().max()) > 1e-3  # the step changed the layer
    torch.testing.assert_close(after, plain, atol=1e-6, rtol=0)
    fresh = copy.deepcopy(layer)  # no cache
    with torch.no_grad():
        torch.testing.assert_close(after, fresh(x), atol=0, rtol=0)


def test_the_kernel_cache_still_serves_repeated_eval_forwards():
    torch.manual_seed(0)
    layer = OrthogonalConv2d(3, 4, 3, padding=1).eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        first = layer(x)
        entry = layer.__dict__["_eval_cache"]
        second = layer(x)
    assert layer.__dict__["_eval_cache"] is entry  # no step in between: the kernel was not rebuilt
    torch.testing.assert_close(second, first, atol=0, rtol=0)
