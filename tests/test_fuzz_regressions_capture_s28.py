"""Regressions found by fuzzing capture (fx with leaf retry, torch.export, ``auto``) and freeze / export / load on
models symbolic tracing cannot follow: forwards that write into their inputs or update buffers in eval mode, dataclass
and NamedTuple inputs and outputs, a submodule reached by two names.

References: the plain model's outputs on a copy of the inputs, and the layers' arithmetic written out in float64
(``x W^T + b``, the running mean's update)."""

import dataclasses
import os
import typing

import pytest
import torch
from torch import nn

import orthofx

pytestmark = pytest.mark.usefixtures("one_thread")

LORTH = {"rules": [{"match": {"type": "Linear"}, "apply": "orth_regularizer"}]}


def _policy(mode: str) -> dict:
    return {**LORTH, "capture": {"mode": mode}}


def _linear64(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``x W^T + b`` in float64 from the layer's weights."""
    return x.double() @ layer.weight.detach().double().T + layer.bias.detach().double()


class _DoublesItsInput(nn.Module):
    """``x.mul_(2)`` then ``fc(x) + x``: the forward writes into the caller's tensor, as the model's does."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        x.mul_(2.0)
        return self.fc(x) + x


def _doubled_reference(model: _DoublesItsInput, x: torch.Tensor) -> torch.Tensor:
    return _linear64(model.fc, 2 * x) + 2 * x.double()


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_pt2_export_of_a_forward_writing_into_its_input_compares_like_with_like(tmp_path, mode):
    """Bug: export ran the frozen model and the written program one after the other on the same example tensors, so
    the second saw the input the first had doubled: the reported max |diff| was ~50 for an exact program, and the
    user's example_inputs came back multiplied by 8 (freeze's run, then both checks)."""
    torch.manual_seed(0)
    model = _DoublesItsInput().eval()
    x = torch.randn(3, 6)
    gm = orthofx.transform(model, _policy(mode), example_inputs=(x.clone(),))
    before = x.clone()
    result = orthofx.export(gm, tmp_path / "m.pt2", example_inputs=(x,))
    assert torch.equal(x, before)
    assert result.max_abs_diff < 1e-6
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    x5 = torch.randn(5, 6, dtype=torch.float64).float()
    got = program(x5.clone())
    assert float((got.double() - _doubled_reference(model, x5)).abs().max()) < 1e-5


def test_onnx_export_of_a_forward_writing_into_its_input_is_not_refused(tmp_path):
    """Bug: the same, for ONNX: onnxruntime ran on the input the reference run had doubled, and export raised
    "onnxruntime's output differs from the frozen model by 24.6" for a correct file."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = _DoublesItsInput().eval()
    x = torch.randn(3, 6)
    gm = orthofx.transform(model, LORTH, example_inputs=(x.clone(),))
    before = x.clone()
    result = orthofx.export(gm, tmp_path / "m.onnx", example_inputs=(x,))
    assert torch.equal(x, before)
    assert result.max_abs_diff < 1e-5


def test_freeze_with_example_inputs_leaves_them_as_they_were():
    """Bug: freeze's run on the example inputs (for ConvNorm's sizes) doubled the user's tensor."""
    torch.manual_seed(0)
    model = _DoublesItsInput().eval()
    x = torch.randn(3, 6)
    gm = orthofx.transform(model, LORTH, example_inputs=(x.clone(),))
    before = x.clone()
    frozen = orthofx.freeze(gm, (x,))
    assert torch.equal(x, before)
    assert float((frozen(x.clone()).double() - _doubled_reference(model, before)).abs().max()) < 1e-5


def test_load_leaves_the_example_inputs_as_they_were(tmp_path):
    """Bug: load passed the user's example_inputs on to transform, whose runs of the model wrote into them."""
    torch.manual_seed(0)
    model = _DoublesItsInput().eval()
    x = torch.randn(3, 6)
    gm = orthofx.transform(model, _policy("export"), example_inputs=(x.clone(),))
    orthofx.export(gm, tmp_path / "m.pt")
    before = x.clone()
    restored = orthofx.load(model, tmp_path / "m.pt", example_inputs=(x,)).eval()
    assert torch.equal(x, before)
    assert float((restored(x.clone()).double() - _doubled_reference(model, before)).abs().max()) < 1e-5


class _RunningCentre(nn.Module):
    """``y = fc(x)``; ``mean <- 0.9 mean + 0.1 mean_batch(y)`` in place, in eval mode too; returns ``y - mean``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        y = self.fc(x)
        self.calls += 1
        self.mean.mul_(0.9).add_(0.1 * y.mean(0).detach())
        return y - self.mean


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_freeze_with_example_inputs_does_not_advance_buffers_the_forward_updates(mode):
    """Bug: freeze's example run updated the frozen copy's buffers (a step count, a running mean written in place in
    eval mode), so the frozen model computed one call further on than the model it was frozen from."""
    torch.manual_seed(0)
    model = _RunningCentre().eval()
    x = torch.randn(3, 6)
    gm = orthofx.transform(model, _policy(mode), example_inputs=(x,))
    frozen = orthofx.freeze(gm, (x,))
    assert int(frozen.get_buffer("calls")) == 0
    assert float(frozen.get_buffer("mean").abs().max()) == 0.0
    y = _linear64(model.fc, x)
    expected = y - 0.1 * y.mean(0)  # the first call from mean = 0
    assert float((frozen(x).double() - expected).abs().max()) < 1e-5
    assert int(frozen.get_buffer("calls")) == 1  # the frozen model itself still counts its calls


@dataclasses.dataclass
class _Pair:
    x: torch.Tensor
    y: torch.Tensor


class _TakesPair(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, pair: _Pair):
        return self.fc(pair.x) - self.fc(pair.y)


def _register_pair() -> None:
    if _Pair not in torch.utils._pytree.SUPPORTED_NODES:
        torch.export.register_dataclass(_Pair, serialized_type_name="test_fuzz_regressions_capture_s28._Pair")


def _pair(batch: int, seed: int) -> _Pair:
    g = torch.Generator().manual_seed(seed)
    return _Pair(torch.randn(batch, 6, generator=g), torch.randn(batch, 6, generator=g))


def test_export_capture_of_a_registered_dataclass_input_keeps_the_batch_dynamic(tmp_path):
    """Bug: the dynamic-batch spec was the dataclass itself (``_Pair(x={0: AUTO}, y=...)``), which torch.export
    refuses ("Node type mismatch"): capture fell back to static shapes and the graph refused every other batch
    size with "captured with torch.export for batch size 3 only"."""
    _register_pair()
    torch.manual_seed(0)
    model = _TakesPair().eval()
    gm = orthofx.transform(model, _policy("export"), example_inputs=(_pair(3, 0),))
    assert not any("batch size" in w for w in orthofx.manifest_of(gm).capture.warnings)
    other = _pair(5, 1)
    expected = _linear64(model.fc, other.x) - _linear64(model.fc, other.y)
    assert float((gm(other).double() - expected).abs().max()) < 1e-5
    result = orthofx.export(gm, tmp_path / "m.pt2", example_inputs=(_pair(3, 0),))
    assert result.max_abs_diff < 1e-6
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    assert float((program(other).double() - expected).abs().max()) < 1e-5


@dataclasses.dataclass
class _Unregistered:
    x: torch.Tensor


class _TakesUnregistered(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, batch: _Unregistered):
        return self.fc(batch.x)


def test_export_capture_of_an_unregistered_input_class_names_it_and_the_fixes():
    """Bug: the message ended in "Fix: check that the model runs on example_inputs; for a Python branch on a tensor's
    value ...", which has nothing to do with an input class torch.export cannot take apart."""
    model = _TakesUnregistered()
    with pytest.raises(orthofx.CaptureError, match=r"an example input is a test_fuzz_regressions_capture_s28\."
                                                    r"_Unregistered.*torch\.export\.register_dataclass.*mode: fx"):
        orthofx.transform(model, _policy("export"), example_inputs=(_Unregistered(torch.randn(3, 6)),))
    # fx capture takes any input
    gm = orthofx.transform(model, _policy("auto"), example_inputs=(_Unregistered(torch.randn(3, 6)),))
    assert orthofx.manifest_of(gm).capture.mode == "fx"


class _Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        y = self.fc(x)
        return y if y.mean() > 0 else -y  # a branch on a value: no capture follows it but a leaf


class _SharedGate(nn.Module):
    """One gate reached by two names (``self.again = self.gate``), called twice."""

    def __init__(self):
        super().__init__()
        self.gate = _Gate()
        self.again = self.gate
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.again(self.gate(x)))


def test_export_failure_in_a_module_reached_by_two_names_names_the_submodule():
    """Bug: where a module is reachable by two paths, torch.export calls modules through stand-ins sharing their
    ``__dict__``, and the message said "in the forward of _SharedGate" instead of the gate that failed."""
    model = _SharedGate()
    with pytest.raises(orthofx.CaptureError, match=r"in submodule 'gate' \(_Gate\)") as caught:
        orthofx.transform(model, _policy("export"), example_inputs=(torch.randn(3, 6),))
    assert caught.value.module_path == "gate"
    # fx keeps the gate as a leaf, and the graph computes what the model does
    gm = orthofx.transform(model, _policy("auto"), example_inputs=(torch.randn(3, 6),))
    assert [path for path, _ in orthofx.manifest_of(gm).capture.leaf_fallbacks] == ["gate"]
    x = torch.randn(5, 6)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=1e-6)


class _Scores(typing.NamedTuple):
    logits: torch.Tensor
    features: torch.Tensor


class _ReturnsNamedTuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = self.fc(x)
        return _Scores(h.relu(), h)


def test_pt2_of_an_unnamed_namedtuple_output_says_how_and_leaves_no_partial_file(tmp_path):
    """Bug: torch.export.save failed part-way and left a truncated 2.7 kB file at the path (over an earlier good one),
    and the message, "cannot write ...", read like a file-system problem."""
    torch.manual_seed(0)
    x = torch.randn(3, 6)
    gm = orthofx.transform(_ReturnsNamedTuple().eval(), LORTH, example_inputs=(x,))
    path = tmp_path / "m.pt2"
    path.write_bytes(b"an earlier file")
    with pytest.raises(orthofx.ExportError, match=r"by class name.*_register_namedtuple\(cls, serialized_type_name="
                                                  r".*\.onnx"):
        orthofx.export(gm, path, example_inputs=(x,))
    assert path.read_bytes() == b"an earlier file"
    assert sorted(os.listdir(tmp_path)) == ["m.pt2"]


class _GuardedGate(nn.Module):
    """``try: h = self.gate(x)`` / ``except Exception: h = x``: the gate runs eagerly, but cannot be traced."""

    def __init__(self):
        super().__init__()
        self.gate = _Gate()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        try:
            h = self.gate(x)
        except Exception:  # noqa: BLE001 - the pattern under test
            h = x
        return self.fc(h)


@pytest.mark.parametrize("mode", ["fx", "auto"])
def test_a_trace_failure_the_model_catches_makes_the_submodule_a_leaf(mode):
    """Bug: the gate's trace failure was caught by the model's own try/except, so the trace took the except branch and
    the graph computed fc(x) where the model computes fc(gate(x)) (max |diff| 1.2), with no warning."""
    torch.manual_seed(0)
    model = _GuardedGate().eval()
    gm = orthofx.transform(model, _policy(mode), example_inputs=(torch.randn(3, 6),))
    capture = orthofx.manifest_of(gm).capture
    assert capture.mode == "fx"
    assert [path for path, _ in capture.leaf_fallbacks] == ["gate"]
    assert "which the calling code caught" in capture.leaf_fallbacks[0][1]
    x = torch.randn(5, 6)
    h = _linear64(model.gate.fc, x)
    h = h if float(h.mean()) > 0 else -h
    assert float((gm(x).double() - _linear64(model.fc, h)).abs().max()) < 1e-5


class _GuardedInTraining(nn.Module):
    """The try/except around the gate in the training-mode branch only."""

    def __init__(self):
        super().__init__()
        self.gate = _Gate()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        if self.training:
            try:
                h = self.gate(x)
            except Exception:  # noqa: BLE001 - the pattern under test
                h = x
        else:
            h = 2 * x
        return self.fc(h)


def test_a_caught_trace_failure_in_the_other_training_mode_is_warned():
    """Bug: the training-mode graph (captured second, for gm.train()) silently held the except branch, fc(x);
    now that mode counts as one capture could not follow, with the documented warning."""
    model = _GuardedInTraining().eval()
    gm = orthofx.transform(model, _policy("fx"), example_inputs=(torch.randn(3, 6),))
    warnings = orthofx.manifest_of(gm).capture.warnings
    assert any("training-mode forward could not be captured" in w and "submodule 'gate'" in w for w in warnings)
    assert not isinstance(gm, orthofx.capture.ModalGraphModule)


def _lazy_norm_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 6), nn.LazyBatchNorm1d(), nn.ReLU(), nn.LazyLinear(4)).eval()


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_transform_and_freeze_of_a_model_with_a_lazy_batchnorm(tmp_path, mode):
    """Bug: copying the model failed in torch's deepcopy of LazyBatchNorm1d's uninitialised running statistics
    ("ValueError: Attempted to use an uninitialized parameter"), so transform could not start; freeze's example run
    then could not keep such buffers either."""
    model = _lazy_norm_net()
    x = torch.randn(3, 6)
    gm = orthofx.transform(model, _policy(mode), example_inputs=(x,))
    assert model[1].has_uninitialized_params()  # transform materialised a copy's, not the model's
    assert {t.site for t in orthofx.manifest_of(gm).penalties} == {"0", "3"}
    reference = _lazy_norm_net()
    reference(x)
    reference.load_state_dict(gm.state_dict())
    x5 = torch.randn(5, 6)
    bn = reference[1]
    h = (_linear64(reference[0], x5) - bn.running_mean.double()) / torch.sqrt(bn.running_var.double() + bn.eps)
    expected = _linear64(reference[3], (h * bn.weight.double() + bn.bias.double()).relu())
    assert float((gm(x5).double() - expected).abs().max()) < 1e-5
    assert float((orthofx.freeze(gm, (x,))(x5) - gm(x5)).abs().max()) < 1e-6
    orthofx.export(gm, tmp_path / "m.pt")
    restored = orthofx.load(_lazy_norm_net(), tmp_path / "m.pt", example_inputs=(x,))
    assert float((restored(x5) - gm(x5)).abs().max()) == 0.0


def test_freeze_of_a_model_with_orthofx_layers_and_a_lazy_batchnorm():
    """The example run of freeze materialises the lazy layers of a model written with orthofx's layers."""
    torch.manual_seed(0)
    model = nn.Sequential(orthofx.nn.OrthogonalLinear(6, 6), nn.LazyBatchNorm1d(), nn.LazyLinear(4)).eval()
    x = torch.randn(3, 6)
    frozen = orthofx.freeze(model, (x,))
    assert model[1].has_uninitialized_params()
    assert isinstance(frozen.get_submodule("0"), nn.Linear)
    model(x)  # now initialise the model's own, with the same (default) statistics and seeded weights
    model[2].load_state_dict(frozen.get_submodule("2").state_dict())
    torch.testing.assert_close(frozen(x), model(x), rtol=0, atol=1e-6)


class _TaggedOutput(nn.Module):
    """Returns ``(fc(x), extra)`` with a Python value ``extra``."""

    def __init__(self, extra):
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.extra = extra

    def forward(self, x):
        return self.fc(x), self.extra


@pytest.mark.parametrize("extra", [0.5, True, "tag"])
def test_onnx_export_of_a_python_value_output_says_onnx_returns_tensors(tmp_path, extra):
    """Bug: torch's exporter failed with "AttributeError: 'float' object has no attribute 'name'" (for an int size
    output, the check said "the exported model returns 2 outputs, the model 1")."""
    x = torch.randn(3, 6)
    gm = orthofx.transform(_TaggedOutput(extra).eval(), LORTH, example_inputs=(x,))
    with pytest.raises(orthofx.ExportError, match=rf"ONNX graphs return tensors only, and the model's output\[1\] is "
                                                  rf"{extra!r} \(a Python {type(extra).__name__}\).*\.pt2"):
        orthofx.export(gm, tmp_path / "m.onnx", example_inputs=(x,))
    assert not os.listdir(tmp_path)


def test_pt2_export_of_a_string_output_is_an_export_error_and_leaves_no_file(tmp_path):
    """Bug: torch.export saves a program returning a str but cannot load it back; export's check raised torch's bare
    RuntimeError ("We ran into an error when deserializing the saved file") and left the unreadable file."""
    x = torch.randn(3, 6)
    gm = orthofx.transform(_TaggedOutput("tag").eval(), LORTH, example_inputs=(x,))
    with pytest.raises(orthofx.ExportError, match=r"torch\.export\.load cannot read back.*output\[1\] is 'tag' \(a "
                                                  r"Python str\).*the file was removed"):
        orthofx.export(gm, tmp_path / "m.pt2", example_inputs=(x,))
    assert not os.listdir(tmp_path)
    # a number among the outputs is kept by .pt2
    gm = orthofx.transform(_TaggedOutput(0.5).eval(), LORTH, example_inputs=(x,))
    orthofx.export(gm, tmp_path / "m.pt2", example_inputs=(x,))
    assert torch.export.load(str(tmp_path / "m.pt2")).module()(torch.randn(5, 6))[1] == 0.5


class _NestedContainers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = self.fc(x)
        return [h, {"relu": h.relu(), "parts": [h[:, :2], h[:, 2:]]}], h.sum(-1)


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_pt2_program_returns_plain_lists_and_dicts(tmp_path, mode):
    """Bug: torch.export runs a GraphModule with fx.Interpreter, so the .pt2 program of a frozen model returned fx's
    immutable_list / immutable_dict where the model returns lists and dicts (``out.append`` raised)."""
    torch.manual_seed(0)
    model = _NestedContainers().eval()
    x = torch.randn(3, 6)
    gm = orthofx.transform(model, _policy(mode), example_inputs=(x,))
    orthofx.export(gm, tmp_path / "m.pt2", example_inputs=(x,))
    out = torch.export.load(str(tmp_path / "m.pt2")).module()(torch.randn(5, 6))
    assert type(out) is tuple and type(out[0]) is list and type(out[0][1]) is dict
    assert type(out[0][1]["parts"]) is list
    out[0].append(None)  # mutable, as the model's
    x5 = torch.randn(5, 6)
    got = torch.export.load(str(tmp_path / "m.pt2")).module()(x5)
    h = _linear64(model.fc, x5)
    assert float((got[0][0].double() - h).abs().max()) < 1e-5
    assert float((got[0][1]["parts"][1].double() - h[:, 2:]).abs().max()) < 1e-5
    assert float((got[1].double() - h.sum(-1)).abs().max()) < 1e-5
