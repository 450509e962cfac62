"""Session 30: a ``forward(self, x, *h)`` model exports with a dynamic batch; one reading of a recurrent layer's
input layout; the ``.pt`` file's Jacobian probe steps in one place; one wording of the probe bound; a clear error
for a ``torch.return_types`` output in ``.pt2``.

References are independent of orthofx: the untransformed model run by torch, Python's own argument binding (which
torch.export uses), the batch size a recurrent layer reports in its hidden state, step counts by hand."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from torch import nn

import orthofx
from orthofx.capture import batch_dynamic_shapes, layout_text, recurrent_batch_axis, recurrent_input_dims
from orthofx.nn.jacobian import PHASE_METADATA_KEY, JacobianProbe
from orthofx.transform import manifest_of


class _VarargsGRU(nn.Module):
    """An RNN wrapper taking its hidden state as extra positional inputs (``forward(self, x, *h)``)."""

    def __init__(self, batch_first: bool = True):
        super().__init__()
        self.rnn = nn.GRU(4, 8, batch_first=batch_first)
        self.fc = nn.Linear(8, 3)

    def forward(self, x, *h):
        y, hn = self.rnn(x, *h)
        return self.fc(y), hn


def _sequence(batch: int, batch_first: bool, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, 5, 4) if batch_first else (5, batch, 4)
    return torch.randn(shape, generator=generator)


def test_dynamic_shapes_have_no_entry_for_a_varargs_parameter_given_no_input():
    # torch.export matches dynamic_shapes against inspect's binding of the call, which has no entry for an empty
    # *args: (x,) binds to {"x": x}, so a second (empty) entry was "Node arity mismatch"
    model = _VarargsGRU()
    x = _sequence(3, True)
    for inputs in ((x,), (x, torch.zeros(1, 3, 8))):
        shapes = batch_dynamic_shapes(model, inputs)
        assert len(shapes) == len(inspect.signature(model.forward).bind(*inputs).arguments)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("with_hidden", [False, True])
def test_a_varargs_forward_exports_to_pt2_with_a_dynamic_batch(tmp_path, batch_first, with_hidden):
    torch.manual_seed(0)
    model = _VarargsGRU(batch_first).eval()

    def call(batch: int) -> tuple:
        x = _sequence(batch, batch_first, seed=batch)
        hidden = torch.randn(1, batch, 8, generator=torch.Generator().manual_seed(batch + 1))
        return (x, hidden) if with_hidden else (x,)

    gm = orthofx.transform(model, "lorth", example_inputs=call(3))
    gm(*call(4))  # the captured model keeps a dynamic batch too (it was fixed to the example's 3 without h)
    orthofx.export(gm, tmp_path / "m.pt2", call(3), dynamic_batch=True)
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    for batch in (3, 6):
        with torch.no_grad():
            expected = model(*call(batch))
        for got, want in zip(program(*call(batch)), expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_varargs_forward_exports_to_onnx_with_a_dynamic_batch(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = _VarargsGRU().eval()
    x = _sequence(3, True)
    gm = orthofx.transform(model, "lorth", example_inputs=(x,))
    result = orthofx.export(gm, tmp_path / "m.onnx", (x,), dynamic_batch=True)
    assert result.max_abs_diff < 1e-4


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("layer", [nn.RNN, nn.LSTM, nn.GRU])
def test_the_batch_axis_is_the_one_the_layer_reads_as_the_batch(layer, batch_first):
    # the reference: the batch N the layer itself reports, dimension 1 of its final hidden state (D * layers, N, H)
    module = layer(4, 6, num_layers=2, batch_first=batch_first)
    x = torch.randn(5, 3, 4)   # dimensions 0 and 1 differ, so only one of them can be N
    _, hidden = module(x)
    hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    axis = recurrent_batch_axis(module, x)
    assert x.shape[axis] == hidden.shape[1]
    assert recurrent_input_dims(batch_first, True)[axis] == "batch N"
    unbatched = torch.randn(5, 4)
    _, hidden = module(unbatched)
    hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    assert hidden.dim() == 2 and recurrent_batch_axis(module, unbatched) is None  # no batch to read
    assert recurrent_input_dims(batch_first, False) == ("sequence length L",)


def test_layout_texts_are_unchanged():
    assert layout_text(("GRU 'rnn'", False, True)) == ("the seq-first GRU 'rnn'",
                                                        "batch_first=False: input (L, N, H_in)")
    assert layout_text(("GRU 'rnn'", True, True)) == ("the GRU 'rnn'", "batch_first=True: input (N, L, H_in)")
    assert layout_text(("LSTM 'l'", True, False)) == ("the LSTM 'l'", "unbatched: input (L, H_in)")


def _probed_model() -> nn.Module:
    return nn.Sequential(nn.Sequential(nn.Linear(3, 3), nn.Tanh()), nn.Linear(3, 2))


_PROBE_POLICY = {"rules": [{"match": {"kind": "block", "name": "0"}, "apply": "jacobian_isometry",
                            "with": {"every": 3}}]}


def test_the_pt_file_keeps_the_probe_step_in_the_state_dict_metadata_only(tmp_path):
    torch.manual_seed(0)
    model = _probed_model()
    gm = orthofx.transform(model, _PROBE_POLICY)
    gm.train()
    x = torch.randn(4, 3)
    for _ in range(5):   # 5 steps with every=3: step 2 of the period
        gm(x).sum().backward()
    orthofx.export(gm, tmp_path / "m.pt")
    saved = torch.load(tmp_path / "m.pt", weights_only=True)
    assert "probe_calls" not in saved   # one record: the state dict's, as gm.state_dict() has it
    assert saved["state_dict"]._metadata["0"][PHASE_METADATA_KEY] == 5 % 3
    probe = orthofx.load(model, tmp_path / "m.pt").get_submodule("0")
    assert isinstance(probe, JacobianProbe) and probe.calls == 5 % 3


def test_a_damaged_probe_step_in_a_pt_file_is_an_export_error_naming_the_file(tmp_path):
    model = _probed_model()
    orthofx.export(orthofx.transform(model, _PROBE_POLICY), tmp_path / "m.pt")
    saved = torch.load(tmp_path / "m.pt", weights_only=True)
    saved["state_dict"]._metadata["0"][PHASE_METADATA_KEY] = -1
    torch.save(saved, tmp_path / "m.pt")
    with pytest.raises(orthofx.ExportError, match=r"m\.pt' is damaged:.*orthofx_probe_calls=-1.*int >= 0"):
        orthofx.load(model, tmp_path / "m.pt")


def test_a_pt_file_written_the_old_way_still_restores_the_probe_step(tmp_path):
    # before session 30: a plain dict state (no _metadata) and the steps under "probe_calls"
    model = _probed_model()
    gm = orthofx.transform(model, _PROBE_POLICY)
    old = {"orthofx_format": 1, "policy": manifest_of(gm).policy.to_yaml(),
           "state_dict": {k: v.detach().clone() for k, v in gm.state_dict().items()},
           "probe_calls": {"0": 2}}
    torch.save(old, tmp_path / "old.pt")
    probe = orthofx.load(model, tmp_path / "old.pt").get_submodule("0")
    assert probe.calls == 2


def test_the_probe_bound_is_worded_once():
    from orthofx.metrics import MAX_JACOBIAN_PROBES
    with pytest.raises(orthofx.LayerArgumentError) as layer_error:
        JacobianProbe(nn.Linear(2, 2), probes=MAX_JACOBIAN_PROBES + 1)
    with pytest.raises(orthofx.ArgumentError) as metric_error:
        orthofx.metrics.jacobian_isometry(nn.Linear(2, 2), torch.randn(2, 2), probes=MAX_JACOBIAN_PROBES + 1)
    assert str(layer_error.value).partition(": ")[2] == str(metric_error.value).partition(": ")[2]
    assert "probes=1025 is more than 1024" in str(metric_error.value)


def test_jacobian_isometry_takes_a_numpy_probe_count_as_the_probe_does():
    linear = nn.Linear(3, 3)
    x = torch.randn(4, 3)
    counted = [orthofx.metrics.jacobian_isometry(linear, x, probes=probes,
                                                 generator=torch.Generator().manual_seed(0))
               for probes in (2, np.int64(2))]
    torch.testing.assert_close(counted[0], counted[1], rtol=0, atol=0)
    assert JacobianProbe(nn.Linear(2, 2), probes=np.int64(2)).probes == 2


class _ReturnsMax(nn.Module):
    def __init__(self, plain: bool = False, nested: bool = False):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.plain, self.nested = plain, nested

    def forward(self, x):
        out = torch.max(self.fc(x), dim=1)
        if self.plain:
            return out.values, out.indices
        return (x.sum(), out) if self.nested else out


@pytest.mark.parametrize("nested", [False, True])
def test_a_return_types_output_is_refused_for_pt2_with_the_fix(tmp_path, nested):
    x = torch.randn(3, 4)
    gm = orthofx.transform(_ReturnsMax(nested=nested), "lorth", example_inputs=(x,))
    where = "output\\[1\\]" if nested else "the output"
    with pytest.raises(orthofx.ExportError, match=f"returns a torch.return_types.max as {where}.*"
                                                  "out.values, out.indices"):
        orthofx.export(gm, tmp_path / "m.pt2", (x,))
    assert not (tmp_path / "m.pt2").exists()


def test_the_fix_for_a_return_types_output_exports(tmp_path):
    torch.manual_seed(0)
    model = _ReturnsMax(plain=True).eval()
    x = torch.randn(3, 4)
    gm = orthofx.transform(model, "lorth", example_inputs=(x,))
    orthofx.export(gm, tmp_path / "m.pt2", (x,))
    values, indices = torch.export.load(str(tmp_path / "m.pt2")).module()(x)
    expected = torch.max(model.fc(x), dim=1)
    torch.testing.assert_close(values, expected.values)
    assert torch.equal(indices, expected.indices)
