"""User-journey fuzz (session 36): the path a researcher takes, end to end, on corpus models.

transform (with example inputs; the user's model left as it was) -> a few training steps (SGD with momentum or
Adam, ``orthofx.attach``, task loss + ``orthofx.penalty``, an eval-mode validation forward after each step) ->
``torch.save(gm.state_dict())`` and ``torch.load(weights_only=True)`` into a fresh ``transform`` of a freshly
built copy of the model, then training on: the resumed run must give the uninterrupted run's losses bit for bit
(the reference is that run itself: same batches, the global RNG reseeded before each step). ``copy.deepcopy`` and
``pickle`` round trips mid-run continue identically too; ``.double()`` mid-run keeps the eval outputs (to float32
rounding) and trains on; ``orthofx.freeze`` matches ``gm.eval()`` within 1e-5 (on the example batch and on a
larger one); ``.pt`` export + ``orthofx.load`` gives the same state and outputs; ``orthofx.report`` renders.

The fuzz behind it (``.snap/s36/journey``: about 1,100 journeys over the 33 corpus models x the six presets, five
hand-written policies (convnorm ``momentum``, ``orth_regularizer`` ``every: 3``, ``orthogonal_conv`` ``init:
nearest``, ``isometric_init`` + ``riemannian``, a convnorm + L_orth mix) and random policies drawn from every pass's
parameters; plus ``.pt2`` / ``.onnx`` export, freeze / export / report mid-run leaving training unchanged, training
on batch 3 after a batch-2 capture, ``.double()`` then freeze / export / load on every corpus model x preset, and the
user's model (state, grads, ``requires_grad``, training flags, hooks) left as it was by transform, explain, export
and load) found no mismatch and no crash other than a clear orthofx error; these tests keep a fixed-seed sample of
it. One error was unhelpful: a float64 model (``.double()`` mid-run) exported to ``.onnx`` fails in onnxruntime,
whose CPU provider has no float64 Conv, and the message did not say so (the last test).
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import orthofx
from corpus import CORPUS

pytestmark = pytest.mark.usefixtures("one_thread")

_CONV = ["Conv1d", "Conv2d", "Conv3d"]
_POLICIES = {
    "convnorm_momentum": {"rules": [{"match": {"type": _CONV}, "apply": "convnorm", "with": {"momentum": 0.1}}]},
    "lorth_every3": {"rules": [{"match": {"type": _CONV + ["Linear"]}, "apply": "orth_regularizer",
                                "with": {"weight": 0.05, "every": 3}}]},
    "orthogonal_nearest": {"rules": [{"match": {"type": _CONV + ["Linear"]}, "apply": "orthogonal_conv",
                                      "with": {"init": "nearest", "on_impossible": "regularize"}}]},
    "isometric_riemannian": {"rules": [
        {"match": {"type": _CONV + ["Linear"]}, "apply": "isometric_init"},
        {"match": {"type": ["Conv2d", "Linear"]}, "apply": "riemannian", "with": {"only_square": False},
         "optional": True}]},
}
_STEPS, _AT = 4, 2


def _leaves(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for v in output.values() for t in _leaves(v)]
    if isinstance(output, (list, tuple)):
        return [t for v in output for t in _leaves(v)]
    return []


def _batch(inputs: tuple, step: int) -> tuple:
    g = torch.Generator().manual_seed(100 + step)
    return tuple(torch.randn(x.shape, generator=g).to(x.dtype) if x.is_floating_point() else x for x in inputs)


def _optimizer(gm, kind: str):
    if kind == "sgd":
        optimizer = torch.optim.SGD(gm.parameters(), lr=0.01, momentum=0.9)
    else:
        optimizer = torch.optim.Adam(gm.parameters(), lr=1e-3)
    orthofx.attach(optimizer, gm)
    return optimizer


def _train(gm, optimizer, inputs, steps, losses) -> None:
    for step in steps:
        torch.manual_seed(1000 + step)  # dropout, stochastic depth, Jacobian probes: the same draws in every run
        out = gm(*_batch(inputs, step))
        loss = sum((t.float() ** 2).mean() for t in _leaves(out) if t.is_floating_point()) + orthofx.penalty(gm)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        gm.eval()  # a validation forward (fills and must not leak the layers' eval caches)
        with torch.no_grad():
            losses.append(sum((t.float() ** 2).mean().item() for t in _leaves(gm(*_batch(inputs, 500 + step)))))
        gm.train()


def _eval(module, inputs) -> list[torch.Tensor]:
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            return [t for t in _leaves(module(*inputs)) if t.is_floating_point()]
    finally:
        module.train(was)


def _journey(name: str, policy, kind: str, tmp_path) -> None:
    model, inputs = CORPUS[name]()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def fresh():
        torch.manual_seed(7)
        return orthofx.transform(model, policy, example_inputs=inputs)

    gm = fresh()
    optimizer = _optimizer(gm, kind)
    reference: list[float] = []
    _train(gm, optimizer, inputs, range(_STEPS), reference)

    # resume from a state_dict saved with torch.save, read with weights_only=True, into a new model's transform
    a = fresh()
    optimizer_a = _optimizer(a, kind)
    losses: list[float] = []
    _train(a, optimizer_a, inputs, range(_AT), losses)
    buffer = io.BytesIO()
    torch.save({"model": a.state_dict(), "optimizer": optimizer_a.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    torch.manual_seed(99)  # another init: everything the run continues from must come from the file
    b = orthofx.transform(CORPUS[name]()[0], policy, example_inputs=inputs)
    b.load_state_dict(state["model"])
    optimizer_b = _optimizer(b, kind)
    optimizer_b.load_state_dict(state["optimizer"])
    _train(b, optimizer_b, inputs, range(_AT, _STEPS), losses)
    assert losses == reference

    # deepcopy and pickle mid-run: the copy and the original both continue as the uninterrupted run
    for clone in (copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))):
        a = fresh()
        optimizer_a = _optimizer(a, kind)
        losses = []
        _train(a, optimizer_a, inputs, range(_AT), losses)
        b = clone(a)
        optimizer_b = _optimizer(b, kind)
        optimizer_b.load_state_dict(copy.deepcopy(optimizer_a.state_dict()))  # no state shared with optimizer_a
        copied = list(losses)
        _train(a, optimizer_a, inputs, range(_AT, _STEPS), losses)
        _train(b, optimizer_b, inputs, range(_AT, _STEPS), copied)
        assert losses == reference and copied == reference

    # float64 mid-run: the same eval outputs (to float32 rounding), then it trains on
    a = fresh()
    optimizer_a = _optimizer(a, kind)
    losses = []
    _train(a, optimizer_a, inputs, range(_AT), losses)
    single = _eval(a, inputs)
    a.double()
    doubled = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    for x, y in zip(single, _eval(a, doubled)):
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, x.double(), rtol=1e-4, atol=1e-4)
    optimizer_d = _optimizer(a, kind)
    optimizer_d.load_state_dict(optimizer_a.state_dict())  # torch casts the state to the parameters' dtype
    _train(a, optimizer_d, doubled, range(_AT, _STEPS), losses)
    assert all(value == value for value in losses)

    # freeze: eval outputs within 1e-5, on the example batch and on a larger one
    frozen = orthofx.freeze(gm, inputs)
    larger = tuple(torch.cat([x, x[:1] * 0.5]) if x.is_floating_point() else x for x in _batch(inputs, 999))
    for sample in (inputs, larger):
        for x, y in zip(_eval(gm, sample), _eval(frozen, sample)):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)

    # .pt export and orthofx.load: the same state and eval outputs
    orthofx.export(gm, tmp_path / "model.pt")
    loaded = orthofx.load(model, tmp_path / "model.pt", example_inputs=inputs)
    assert list(loaded.state_dict()) == list(gm.state_dict())
    for key, value in gm.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(loaded.state_dict()[key], value), key
    for x, y in zip(_eval(gm, inputs), _eval(loaded, inputs)):
        assert torch.equal(x, y)

    assert str(orthofx.report(gm))
    after = model.state_dict()  # the user's model is untouched by all of it
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


@pytest.mark.parametrize("name, policy, kind", [
    ("depthwise", "convnorm_momentum", "sgd"),
    ("conv1d", "lorth_every3", "adam"),
    ("nested", "orthogonal_nearest", "adam"),
    ("tuple_output", "isometric_riemannian", "sgd"),
    ("batchnorm_resnet", "orthogonal", "sgd"),
    ("mha", "isometric", "adam"),
])
def test_the_journey_resumes_copies_freezes_and_exports_as_documented(name, policy, kind, tmp_path):
    _journey(name, _POLICIES.get(policy, policy), kind, tmp_path)


def test_an_onnx_export_of_a_float64_model_says_to_export_a_float32_copy(tmp_path):
    """A model moved to float64 mid-run (``gm.double()``) exports to ``.pt2``, but onnxruntime's CPU provider has no
    float64 Conv ("Could not find an implementation for Conv(11)"): the ExportError used to suggest only .pt2 or
    another runtime; it now names the dtype and the fix (a float32 copy), which exports and matches."""
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    x = torch.randn(2, 3, 6, 6)
    gm = orthofx.transform(model, "lorth", example_inputs=(x,)).double()
    with pytest.raises(orthofx.ExportError, match=r"float64.*\.float\(\)"):
        orthofx.export(gm, tmp_path / "model.onnx", example_inputs=(x.double(),))
    orthofx.export(copy.deepcopy(gm).float(), tmp_path / "model.onnx", example_inputs=(x,))
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got).double(), _eval(gm, (x.double(),))[0], rtol=1e-4, atol=1e-4)
