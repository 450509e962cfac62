"""Models that pack variable-length sequences for a recurrent layer (torch.nn.utils.rnn) capture with fx: the
helpers stay calls in the graph and the recurrent layer stays a site.

Reference: the original model, with the transformed model's weights loaded, on inputs of other batch sizes and
lengths than the example's."""

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence, pad_sequence

import orthofx
from orthofx.capture import sequence_helper
from orthofx.errors import CaptureError, ExportError


class PackedByName(nn.Module):
    """The helpers imported by name (fx's autowrap patches the module's globals)."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 6, batch_first=True, bidirectional=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        padded, _ = pad_packed_sequence(out, batch_first=True)
        return self.head(padded)


class PackedByAttribute(nn.Module):
    """The helpers reached through the torch module (``nn.utils.rnn.pack_padded_sequence``)."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 5, num_layers=2)
        self.head = nn.Linear(5, 2)

    def forward(self, x, lengths):
        out, hidden = self.rnn(nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False))
        return self.head(hidden[-1])


class PaddedList(nn.Module):
    """``pad_sequence`` over a list of traced tensors."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(3, 4, batch_first=True)

    def forward(self, a, b):
        return self.rnn(pad_sequence([a, b], batch_first=True))[0].sum(1)


def _check_against_original(cls, gm, calls):
    reference = cls()
    reference.load_state_dict(gm.state_dict())
    for args in calls:
        torch.testing.assert_close(gm(*args), reference(*args), rtol=0, atol=0)


@pytest.mark.parametrize("cls, batch_first", [(PackedByName, True), (PackedByAttribute, False)],
                         ids=["imported", "attribute"])
def test_recurrent_layer_behind_packing_is_a_site_and_runs_on_other_lengths(cls, batch_first):
    torch.manual_seed(0)
    shape = (3, 5, 4) if batch_first else (5, 3, 4)
    example = (torch.randn(*shape), torch.tensor([5, 2, 4]))
    gm = orthofx.transform(cls(), "isometric", example_inputs=example)
    assert "rnn" in {c.site for c in orthofx.manifest_of(gm).changes}
    calls = [graph_node.args[0] for graph_node in gm.graph.nodes if graph_node.target is sequence_helper]
    assert "pack_padded_sequence" in calls
    other = (torch.randn(*((2, 7, 4) if batch_first else (7, 2, 4))), torch.tensor([3, 7]))
    _check_against_original(cls, gm, [example, other])
    for copied in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm)), orthofx.freeze(gm)):
        torch.testing.assert_close(copied(*other), gm(*other), rtol=0, atol=0)


def test_pad_sequence_over_traced_tensors():
    torch.manual_seed(1)
    example = (torch.randn(4, 3), torch.randn(2, 3))
    gm = orthofx.transform(PaddedList(), {"rules": [{"match": {"type": "RNN"}, "apply": "isometric_init"}]},
                           example_inputs=example)
    _check_against_original(PaddedList, gm, [example, (torch.randn(1, 3), torch.randn(6, 3))])


def test_riemannian_training_through_packed_sequences_keeps_the_gates_orthonormal():
    torch.manual_seed(2)
    x, lengths = torch.randn(3, 5, 4), torch.tensor([5, 2, 4])
    policy = {"rules": [{"match": {"type": "LSTM"}, "apply": "riemannian"}]}
    gm = orthofx.transform(PackedByName(), policy, example_inputs=(x, lengths))
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    orthofx.attach(optimizer, gm)
    before = gm.rnn.weight_hh_l0.detach().clone()
    for _ in range(5):
        optimizer.zero_grad()
        gm(x, lengths).square().mean().backward()
        optimizer.step()
    assert float((gm.rnn.weight_hh_l0 - before).abs().max()) > 1e-4  # it trained
    for name in ("weight_hh_l0", "weight_hh_l0_reverse"):
        blocks = getattr(gm.rnn, name).detach().double().view(4, 6, 6)
        gram = blocks.transpose(1, 2) @ blocks
        assert float((gram - torch.eye(6, dtype=torch.float64)).abs().max()) < 1e-5


def test_later_traces_work_and_torch_is_left_as_it_was():
    # torch's own helpers are back after a capture, and fx can trace other models afterwards (a wrapped torch
    # function in generated code would make every later trace fail with a KeyError on its dotted name)
    functions = {name: getattr(nn.utils.rnn, name) for name in ("pack_padded_sequence", "pad_packed_sequence")}
    gm = orthofx.transform(PackedByName(), "lorth", example_inputs=(torch.randn(2, 3, 4), torch.tensor([3, 1])))
    gm(torch.randn(2, 3, 4), torch.tensor([2, 3]))
    assert all(getattr(nn.utils.rnn, name) is function for name, function in functions.items())
    traced = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    assert [n.op for n in traced.graph.nodes].count("call_module") == 2
    orthofx.transform(PackedByAttribute(), "lorth")  # and orthofx's own tracing, without example inputs


def test_export_of_packed_sequences_says_what_torch_cannot_do(tmp_path):
    example = (torch.randn(2, 3, 4), torch.tensor([3, 1]))
    gm = orthofx.transform(PackedByName(), "lorth", example_inputs=example)
    with pytest.raises(ExportError, match=r"calls torch.nn.utils.rnn.pack_padded_sequence, pad_packed_sequence: "
                                          r"torch.export cannot trace a recurrent layer on a PackedSequence"):
        orthofx.export(gm, str(tmp_path / "m.pt2"), example)
    orthofx.export(gm, str(tmp_path / "m.pt"), example)  # the way the message gives
    restored = orthofx.load(PackedByName(), str(tmp_path / "m.pt"))
    torch.testing.assert_close(restored(*example), gm(*example), rtol=0, atol=0)


class PackUnpack(nn.Module):
    """Packing and unpacking without a recurrent layer: torch.export fails in ``pad_packed_sequence`` itself."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 3)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        return self.head(pad_packed_sequence(packed, batch_first=True)[0])


@pytest.mark.parametrize("cls, failing", [
    (PackedByName, "the recurrent layer 'rnn' (LSTM) on a PackedSequence"),
    (PackUnpack, "torch.nn.utils.rnn.pad_packed_sequence")], ids=["layer", "helper"])
def test_export_capture_of_packed_sequences_says_to_use_fx(cls, failing):
    torch.manual_seed(3)
    example = (torch.randn(2, 3, 4), torch.tensor([3, 1]))
    rules = [{"match": {"type": "Linear"}, "apply": "isometric_init"}]
    with pytest.raises(CaptureError) as caught:
        orthofx.transform(cls(), {"capture": {"mode": "export"}, "rules": rules}, example_inputs=example)
    message = str(caught.value)
    assert f"it fails in {failing} (" in message
    assert "torch.export cannot trace a recurrent layer on a PackedSequence" in message
    assert "Fix: capture with symbolic tracing, capture: {mode: fx} or {mode: auto}" in message
    # auto (the fix the message gives) captures with fx, and the graph computes what the model does
    gm = orthofx.transform(cls(), {"capture": {"mode": "auto"}, "rules": rules}, example_inputs=example)
    assert orthofx.manifest_of(gm).capture.mode == "fx"
    _check_against_original(cls, gm, [example, (torch.randn(3, 6, 4), torch.tensor([2, 6, 5]))])


class RebuiltByName(nn.Module):
    """``PackedSequence(f(p.data), p.batch_sizes, p.sorted_indices, p.unsorted_indices)`` on traced values."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 5)
        self.rnn = nn.GRU(5, 6, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x, lengths):
        p = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        p = PackedSequence(torch.tanh(self.proj(p.data)), p.batch_sizes, p.sorted_indices, p.unsorted_indices)
        out, _ = self.rnn(p)
        return self.head(pad_packed_sequence(out, batch_first=True)[0])


class RebuiltByAttribute(nn.Module):
    """The class through ``nn.utils.rnn``, keyword arguments, no ``unsorted_indices`` (the constructor inverts
    ``sorted_indices``) and a dropout that depends on the training mode."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 3, batch_first=True)

    def forward(self, x, lengths):
        p = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        p = nn.utils.rnn.PackedSequence(F.dropout(p.data, 0.5, self.training), batch_sizes=p.batch_sizes,
                                        sorted_indices=p.sorted_indices)
        return self.rnn(p)[1][0][-1]


@pytest.mark.parametrize("cls", [RebuiltByName, RebuiltByAttribute], ids=["imported", "attribute"])
def test_packed_sequence_rebuilt_from_traced_values_stays_a_graph_call(cls):
    torch.manual_seed(4)
    constructor = PackedSequence.__dict__["__new__"]
    example = (torch.randn(3, 5, 4), torch.tensor([5, 2, 4]))
    gm = orthofx.transform(cls(), "isometric", example_inputs=example)
    assert orthofx.manifest_of(gm).capture.mode == "fx"
    assert "rnn" in {c.site for c in orthofx.manifest_of(gm).changes}
    assert "PackedSequence" in [node.args[0] for node in gm.graph.nodes if node.target is sequence_helper]
    assert PackedSequence.__dict__["__new__"] is constructor  # torch's class is left as it was
    reference = cls()
    reference.load_state_dict(gm.state_dict())
    other = (torch.randn(2, 7, 4), torch.tensor([3, 7]))
    for training in (True, False):  # the same seed: the same dropout mask in both
        gm.train(training), reference.train(training)
        for args in (example, other):
            torch.manual_seed(5)
            expected = reference(*args)
            torch.manual_seed(5)
            torch.testing.assert_close(gm(*args), expected, rtol=0, atol=0)
    for copied in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm)), orthofx.freeze(gm)):
        torch.testing.assert_close(copied.eval()(*other), gm(*other), rtol=0, atol=0)
