"""``orth_regularizer``'s ``every``: each L_orth term on one ``orthofx.penalty`` call in ``k`` (at its weight: lazy
regularisation), the rule's terms spread over the calls, the count saved with the model."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import OrthofxError, PolicyError
from orthofx.transform import PENALTY_CALLS_METADATA_KEY


def _policy(every, weight=0.1, types=("Conv2d", "Linear")):
    return {"rules": [{"match": {"type": list(types)}, "apply": "orth_regularizer",
                       "with": {"weight": weight, "every": every}}]}


def _lorth_float64(layer: nn.Module) -> torch.Tensor:
    """P0's L_orth from its definition in float64 (conv(K, K) with padding floor((k-1)/S) S, stride S, minus
    the identity at the centre, minus M - C S^2 in the column-orthogonal case), the smaller Gram for a Linear."""
    w = layer.weight.detach().double()
    if isinstance(layer, nn.Linear):
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        return (gram - torch.eye(gram.shape[0], dtype=w.dtype)).square().sum()
    k, s = w.shape[-1], layer.stride[0]
    pad = (k - 1) // s * s
    out = nn.functional.conv2d(w, w, padding=pad, stride=s)
    centre = out.shape[-1] // 2
    out[:, :, centre, centre] -= torch.eye(w.shape[0], dtype=w.dtype)
    return out.square().sum() - max(0, w.shape[0] - w.shape[1] * s * s)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 4))


def _layers(gm):
    return {term.site: gm.get_submodule(term.site) for term in orthofx.manifest_of(gm).penalties}


@pytest.mark.parametrize("every", [2, 3, 4])
def test_each_term_is_evaluated_once_per_period_at_its_weight(every):
    gm = orthofx.transform(_model(), _policy(every))
    layers = _layers(gm)
    due_at = {site: [] for site in layers}
    for call in range(2 * every):
        value = orthofx.penalty(gm)
        # which terms this call carries: the gradient reaches exactly their weights
        grads = torch.autograd.grad(value, [m.weight for m in layers.values()], allow_unused=True) \
            if value.requires_grad else [None] * len(layers)
        expected = torch.zeros((), dtype=torch.float64)
        for (site, layer), grad in zip(layers.items(), grads):
            if grad is not None and bool(grad.abs().sum() > 0):
                due_at[site].append(call)
                expected += 0.1 * _lorth_float64(layer)
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
    for site, calls in due_at.items():  # once per period, the same call of each period
        assert len(calls) == 2 and calls[1] - calls[0] == every, (site, calls)


def test_gradient_summed_over_a_period_equals_the_full_penalty_gradient():
    model = _model()
    amortised = orthofx.transform(model, _policy(4))
    full = orthofx.transform(model, _policy(1))
    total = sum(orthofx.penalty(amortised) for _ in range(4))
    total.backward()
    orthofx.penalty(full).backward()
    for (name, p), (_, q) in zip(amortised.named_parameters(), full.named_parameters()):
        if q.grad is None:
            assert p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_under_no_grad_every_term_counts_at_its_weight_and_no_call_is_counted():
    gm = orthofx.transform(_model(), _policy(3))
    orthofx.penalty(gm)  # one call counted
    manifest = orthofx.manifest_of(gm)
    assert manifest.penalty_calls == 1
    with torch.no_grad():
        value = orthofx.penalty(gm)
    expected = sum(0.1 * _lorth_float64(layer) for layer in _layers(gm).values())
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
    terms = orthofx.penalty_terms(gm)  # with gradients enabled: still every term, at its weight
    torch.testing.assert_close(sum(terms.values()).double(), expected, rtol=1e-5, atol=1e-6)
    assert manifest.penalty_calls == 1


def test_terms_are_spread_so_the_costliest_layers_fall_on_different_calls():
    gm = orthofx.transform(orthofx.models.get("resnet18", width=16), _policy(4, types=("Conv2d",)))
    terms = orthofx.manifest_of(gm).penalties
    widest = [t for t in terms if tuple(gm.get_submodule(t.site).weight.shape) == (128, 128, 3, 3)]
    assert len(widest) == 3
    assert len({t.phase for t in widest}) == 3
    # every call of the period evaluates something, and the cheap layers fill the call the wide ones leave
    assert {t.phase for t in terms} == {0, 1, 2, 3}
    every_call = {t.phase for t in terms if t not in widest}
    assert set(range(4)) - {t.phase for t in widest} <= every_call


def test_rules_with_different_periods_share_one_count():
    model = _model()
    policy = {"rules": [
        {"name": "convs", "match": {"type": "Conv2d"}, "apply": "orth_regularizer", "with": {"every": 2}},
        {"name": "head", "match": {"type": "Linear"}, "apply": "orth_regularizer", "with": {"every": 3}}]}
    gm = orthofx.transform(model, policy)
    manifest = orthofx.manifest_of(gm)
    assert manifest.penalty_period() == 6
    head = gm.get_submodule("7").weight
    carries_head = []
    for _ in range(6):
        value = orthofx.penalty(gm)
        grad = torch.autograd.grad(value, head, allow_unused=True)[0] if value.requires_grad else None
        carries_head.append(grad is not None)
    assert sum(carries_head) == 2 and manifest.penalty_calls == 0


def test_the_count_travels_in_the_state_dict_metadata_and_torch_save():
    model = _model()
    gm = orthofx.transform(model, _policy(4))
    for _ in range(3):
        orthofx.penalty(gm)
    state = gm.state_dict()
    assert state._metadata[""][PENALTY_CALLS_METADATA_KEY] == 3
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = orthofx.transform(model, _policy(4))
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert orthofx.manifest_of(restored).penalty_calls == 3
    # the restored model carries the same terms at the next call as the saved one
    torch.testing.assert_close(orthofx.penalty(restored), orthofx.penalty(gm))
    # another period: the count lands inside it
    other = orthofx.transform(model, _policy(2))
    other.load_state_dict(state)
    assert orthofx.manifest_of(other).penalty_calls == 1


def test_a_model_without_periods_saves_no_count():
    gm = orthofx.transform(_model(), "lorth")
    orthofx.penalty(gm)
    assert PENALTY_CALLS_METADATA_KEY not in gm.state_dict()._metadata[""]


@pytest.mark.parametrize("bad", [-1, "2", True, 1.5])
def test_a_damaged_count_in_the_metadata_is_refused_with_the_fix(bad):
    model = _model()
    gm = orthofx.transform(model, _policy(4))
    orthofx.penalty(gm)
    state = gm.state_dict()
    state._metadata[""][PENALTY_CALLS_METADATA_KEY] = bad
    restored = orthofx.transform(model, _policy(4))
    with pytest.raises(OrthofxError, match="remove the entry"):
        restored.load_state_dict(state)


def test_export_and_load_restore_the_count(tmp_path):
    model = _model()
    x = torch.randn(2, 3, 8, 8)
    gm = orthofx.transform(model, _policy(3), example_inputs=(x,))
    for _ in range(2):
        orthofx.penalty(gm)
    orthofx.export(gm, tmp_path / "m.pt")
    restored = orthofx.load(_model(), tmp_path / "m.pt")
    assert orthofx.manifest_of(restored).penalty_calls == 2
    torch.testing.assert_close(orthofx.penalty(restored), orthofx.penalty(gm))


def test_copies_and_pickles_keep_the_count_and_the_saving_hooks():
    gm = orthofx.transform(_model(), _policy(4))
    orthofx.penalty(gm)
    copied = copy.deepcopy(gm)
    assert orthofx.manifest_of(copied).penalty_calls == 1
    assert copied.state_dict()._metadata[""][PENALTY_CALLS_METADATA_KEY] == 1
    unpickled = pickle.loads(pickle.dumps(gm))  # a GraphModule is rebuilt without its hooks
    assert orthofx.manifest_of(unpickled).penalty_calls == 1
    orthofx.penalty(unpickled)  # its first training penalty registers them again
    assert unpickled.state_dict()._metadata[""][PENALTY_CALLS_METADATA_KEY] == 2
    assert orthofx.manifest_of(gm).penalty_calls == 1  # the copies count on their own


def test_a_transformed_part_counts_in_the_bigger_model():
    class Net(nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.backbone(x))

    part = orthofx.transform(_model(), _policy(2))
    net = Net(part)
    values = [orthofx.penalty(net) for _ in range(2)]
    with torch.no_grad():
        full = orthofx.penalty(net)
    torch.testing.assert_close(values[0] + values[1], full)
    assert net.state_dict()._metadata["backbone"][PENALTY_CALLS_METADATA_KEY] == 0
    orthofx.penalty(net)
    fresh = Net(orthofx.transform(_model(), _policy(2)))
    fresh.load_state_dict(net.state_dict())
    assert orthofx.manifest_of(fresh.backbone).penalty_calls == 1


def test_compiled_loss_takes_one_graph_per_call_of_the_period():
    from torch._dynamo.testing import CompileCounter

    model = _model()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
    gm = orthofx.transform(model, _policy(3))
    eager = orthofx.transform(model, _policy(3))
    counter = CompileCounter()
    loss = torch.compile(lambda x: nn.functional.cross_entropy(gm(x), y) + orthofx.penalty(gm), fullgraph=True,
                         backend=counter)
    for _ in range(5):
        torch.testing.assert_close(loss(x), nn.functional.cross_entropy(eager(x), y) + orthofx.penalty(eager))
    assert counter.frame_count == 3
    assert orthofx.manifest_of(gm).penalty_calls == orthofx.manifest_of(eager).penalty_calls == 2


def test_recurrent_terms_take_the_period_too():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 6, batch_first=True)
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0])

    gm = orthofx.transform(Tagger(), _policy(2, types=("GRU", "Linear")))
    terms = orthofx.manifest_of(gm).penalties
    assert sorted(t.phase for t in terms) == [0, 1]  # two terms, one per call
    with torch.no_grad():
        full = orthofx.penalty(gm)
    torch.testing.assert_close(orthofx.penalty(gm) + orthofx.penalty(gm), full)


@pytest.mark.parametrize("bad", [0, -2, "4", 2.5])
def test_every_must_be_a_positive_int(bad):
    with pytest.raises(PolicyError, match="every"):
        orthofx.transform(_model(), _policy(bad))


def test_explain_and_the_changes_show_the_period():
    model = _model()
    plan = str(orthofx.explain(model, _policy(4)))
    assert "every=4" in plan
    gm = orthofx.transform(model, _policy(4))
    changes = {c.site: c.what for c in orthofx.manifest_of(gm).changes}
    terms = {t.site: t for t in orthofx.manifest_of(gm).penalties}
    for site, what in changes.items():
        assert f"one orthofx.penalty call in 4 (call {terms[site].phase} of each period)" in what
    assert "every" not in orthofx.manifest_of(orthofx.transform(model, _policy(1))).changes[0].what


@pytest.mark.parametrize("how", ["pickle", "torch.save", "copy"])
def test_rebuilt_models_save_and_restore_the_count_before_any_penalty_call(how):
    model = _model()
    gm = orthofx.transform(model, _policy(4))
    for _ in range(3):
        orthofx.penalty(gm)
    saved = gm.state_dict()
    orthofx.penalty(gm)  # gm at 0 again
    if how == "pickle":
        rebuilt = pickle.loads(pickle.dumps(gm))
    elif how == "torch.save":
        buffer = io.BytesIO()
        torch.save(gm, buffer)
        buffer.seek(0)
        rebuilt = torch.load(buffer, weights_only=False)
    else:
        rebuilt = copy.copy(gm)
    assert rebuilt.state_dict()._metadata[""][PENALTY_CALLS_METADATA_KEY] == 0
    rebuilt.load_state_dict(saved)  # the count of the loaded state, in the rebuilt model (not the original)
    assert orthofx.manifest_of(rebuilt).penalty_calls == 3
    if how != "copy":  # a shallow copy shares the original's manifest, as it shares its graph and tensors
        assert orthofx.manifest_of(gm).penalty_calls == 0


def test_rules_of_one_period_share_its_calls():
    model = orthofx.models.get("resnet18", width=16)
    stages = [{"name": f"stage{i}", "match": {"name": f"layer{i}.*"}, "apply": "orth_regularizer",
               "with": {"every": 4}} for i in range(1, 5)]
    gm = orthofx.transform(model, {"rules": stages})
    loads = [0] * 4
    for term in orthofx.manifest_of(gm).penalties:
        w = gm.get_submodule(term.site).weight
        loads[term.phase] += w.numel() * min(w.shape[0], w[0].numel()) * w[0, 0].numel()
    # one rule per stage, spread together: no call carries two of the widest stage's three 128 x 128 x 3 x 3 terms
    widest = [t.phase for t in orthofx.manifest_of(gm).penalties
              if tuple(gm.get_submodule(t.site).weight.shape) == (128, 128, 3, 3)]
    assert len(set(widest)) == 3
    assert max(loads) <= 1.05 * sum(loads) / 4  # each rule spread on its own: 1.14x the mean on the first calls
