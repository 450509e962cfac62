"""Dynamic-batch export of seq-first recurrent models (session 29).

``orthofx.export(..., dynamic_batch=True)`` marked dimension 0 of every input dynamic. A seq-first ``nn.GRU`` /
``nn.LSTM`` (``batch_first=False``) reads its input as ``(L, N, H_in)`` and any hidden state ``h_0`` / ``c_0`` as
``(D * num_layers, N, H_out)``: dimension 0 is the sequence length (or the layers), which torch.export fixes, so the
export failed ("dimension 0 ... is not the batch but the sequence length"). The batch of such inputs is now dimension
1, in ``.pt2`` and ``.onnx`` export and in capture mode ``export``.

The reference is torch's own layer, sample by sample: each sample run alone (batch of one) through a float64 copy
of the original model, a slow loop whose outputs the batched exported program must reproduce at batch sizes other
than the example's. Every test here fails on the code before this change but the batch-first one, which checks that
behaviour is unchanged.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import orthofx

pytestmark = pytest.mark.usefixtures("one_thread")

L, N, LAYERS = 5, 3, 2


class Recurrent(nn.Module):
    """A recurrent layer and a linear head on its last step; ``forward(x, h=None, c=None)`` passes the hidden state
    on when given (``(h, c)`` for an LSTM)."""

    def __init__(self, cls=nn.GRU, batch_first=False):
        super().__init__()
        self.rnn = cls(4, 6, num_layers=LAYERS, batch_first=batch_first)
        self.fc = nn.Linear(6, 3)

    def forward(self, x, h=None, c=None):
        y, _ = self.rnn(x) if h is None else self.rnn(x, h if c is None else (h, c))
        return self.fc(y[:, -1] if self.rnn.batch_first else y[-1])


def inputs(cls, batch_first, batch, hidden, length=L):
    x = torch.randn(batch, length, 4) if batch_first else torch.randn(length, batch, 4)
    states = [torch.randn(LAYERS, batch, 6) for _ in range(2 if cls is nn.LSTM else 1)] if hidden else []
    return (x, *states)


def per_sample(model, args, batch_first):
    """The reference: each sample alone (batch of one) through a float64 copy of the untransformed model, stacked;
    the sample axis is dimension 1 of a seq-first input and of every hidden state, dimension 0 of a batch-first
    input."""
    reference = copy.deepcopy(model).double().eval()
    x, states = args[0], args[1:]
    batch = x.shape[0] if batch_first else x.shape[1]
    rows = []
    with torch.no_grad():
        for i in range(batch):
            xi = x[i:i + 1] if batch_first else x[:, i:i + 1]
            rows.append(reference(xi.double(), *(s[:, i:i + 1].double() for s in states)))
    return torch.cat(rows)


def quiet_export(gm, path, args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch.export's note on the RNN's _flat_weights
        return orthofx.export(gm, path, example_inputs=args, **kwargs)


def transformed(cls, batch_first, hidden):
    torch.manual_seed(0)
    model = Recurrent(cls, batch_first)
    args = inputs(cls, batch_first, N, hidden)
    return model, orthofx.transform(model, "lorth", example_inputs=args), args


CASES = [(cls, hidden) for cls in (nn.GRU, nn.LSTM) for hidden in (False, True)]
IDS = [f"{cls.__name__}{'-h0' if hidden else ''}" for cls, hidden in CASES]


@pytest.mark.parametrize("cls, hidden", CASES, ids=IDS)
def test_a_seq_first_model_exports_to_pt2_with_a_dynamic_batch_in_dimension_1(cls, hidden, tmp_path):
    model, gm, args = transformed(cls, False, hidden)
    result = quiet_export(gm, tmp_path / "m.pt2", args)
    assert result.max_abs_diff < 1e-5
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    for batch in (2, 6, 9):  # other batch sizes than the example's 3
        other = inputs(cls, False, batch, hidden)
        out = program(*other)
        assert out.shape == (batch, 3)
        torch.testing.assert_close(out.double(), per_sample(model, other, False), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls, hidden", CASES, ids=IDS)
def test_a_seq_first_model_exports_to_onnx_with_a_dynamic_batch_in_dimension_1(cls, hidden, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    model, gm, args = transformed(cls, False, hidden)
    result = quiet_export(gm, tmp_path / "m.onnx", args)  # the export's own check runs a batch of 4 too
    assert result.max_abs_diff < 1e-5
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    shapes = [arg.shape for arg in session.get_inputs()]
    assert all(isinstance(shape[1], str) and shape[0] == (L if i == 0 else LAYERS) for i, shape in enumerate(shapes))
    for batch in (2, 7):
        other = inputs(cls, False, batch, hidden)
        [out] = session.run(None, {arg.name: t.numpy() for arg, t in zip(session.get_inputs(), other)})
        torch.testing.assert_close(torch.from_numpy(out).double(), per_sample(model, other, False), atol=1e-5,
                                   rtol=1e-5)


@pytest.mark.parametrize("hidden", [False, True], ids=["x", "x-h0"])
def test_a_batch_first_model_keeps_its_batch_in_dimension_0_and_its_hidden_state_in_dimension_1(hidden, tmp_path):
    """Unchanged for the input alone (dimension 0 was already its batch); the hidden state ``(layers, N, H)``, whose
    dimension 0 was marked, made the export fail ("Expected hidden size (2, 4, 6), got [3, 3, 6]")."""
    model, gm, args = transformed(nn.GRU, True, hidden)
    quiet_export(gm, tmp_path / "m.pt2", args)
    exported = torch.export.load(str(tmp_path / "m.pt2"))
    values = {node.name: node.meta["val"] for node in exported.graph.nodes if node.op == "placeholder"}
    shapes = [values[name].shape for name in exported.graph_signature.user_inputs]
    # the symbolic sizes: x (N, 5, 4), h (2, N, 6)
    assert [[isinstance(size, int) for size in shape] for shape in shapes] == [[False, True, True],
                                                                               [True, False, True]][:len(args)]
    program = exported.module()
    for batch in (2, 6):
        other = inputs(nn.GRU, True, batch, hidden)
        torch.testing.assert_close(program(*other).double(), per_sample(model, other, True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length", [5, 1])
def test_the_case_the_old_error_explained_now_exports(length, tmp_path):
    """The inputs test_messages_s29 exported: ``(5, 3, 4)`` failed the check on a grown dimension 0, ``(1, 3, 4)``
    was refused up front as a batch of 1; both now export with the batch N = 3 dynamic and L fixed."""
    torch.manual_seed(0)
    model = Recurrent()
    x = torch.randn(length, 3, 4)
    gm = orthofx.transform(model, "lorth", example_inputs=(x,))
    quiet_export(gm, tmp_path / "m.pt2", (x,))
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    other = torch.randn(length, 8, 4)
    torch.testing.assert_close(program(other).double(), per_sample(model, (other,), False), atol=1e-5, rtol=1e-5)
    with pytest.raises(Exception):  # the sequence length stays the example's
        program(torch.randn(length + 2, 3, 4))


def test_a_seq_first_batch_of_one_and_an_undecidable_layout_are_refused_up_front(tmp_path):
    torch.manual_seed(0)
    gm = orthofx.transform(Recurrent(), "lorth", example_inputs=(torch.randn(5, 1, 4),))
    with pytest.raises(orthofx.ExportError, match=r"example_inputs\[0\] has batch size 1 in dimension 1 \(shape "
                                                  r"\(5, 1, 4\); it is the input of the seq-first GRU 'rnn' "
                                                  r"\(batch_first=False: input \(L, N, H_in\)\), whose batch N is "
                                                  r"dimension 1\)"):
        quiet_export(gm, tmp_path / "m.pt2", (torch.randn(5, 1, 4),))
    # L == N: the sizes cannot tell which dimension the layer reads as the batch
    with pytest.raises(orthofx.ExportError, match=r"have the same size 3: .* Fix: pass example inputs whose batch "
                                                  r"size differs from the sequence length"):
        quiet_export(gm, tmp_path / "m.pt2", (torch.randn(3, 3, 4),))
    assert not (tmp_path / "m.pt2").exists()


@pytest.mark.parametrize("cls, hidden", CASES, ids=IDS)
def test_export_capture_keeps_a_seq_first_batch_dynamic(cls, hidden, tmp_path):
    """Capture mode ``export`` marked dimension 0 too: the captured graph was fixed to the example's batch and
    refused a batch of 7 ("dimension 1 is 7, not 3"). It now takes any batch N and refuses another L."""
    torch.manual_seed(0)
    model = Recurrent(cls)
    args = inputs(cls, False, N, hidden)
    policy = {"capture": {"mode": "export"},
              "rules": [{"match": {"type": ["GRU", "LSTM"]}, "apply": "orth_regularizer"}]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        gm = orthofx.transform(model, policy, example_inputs=args)
    assert not [w for w in orthofx.manifest_of(gm).capture.warnings if "specialised" in w]
    for batch in (2, 7):
        other = inputs(cls, False, batch, hidden)
        with torch.no_grad():
            torch.testing.assert_close(gm(*other).double(), per_sample(model, other, False), atol=1e-5, rtol=1e-5)
    with pytest.raises(orthofx.ArgumentError, match=r"dimension 0 is 8, not 5 \(the seq-first \w+ 'rnn' reads "
                                                    r"dimension 0 as the sequence length L"):
        gm(*inputs(cls, False, N, hidden, length=8))
    # and the captured model exports with the same dynamic batch
    quiet_export(gm, tmp_path / "m.pt2", args)
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    other = inputs(cls, False, 6, hidden)
    torch.testing.assert_close(program(*other).double(), per_sample(model, other, False), atol=1e-5, rtol=1e-5)
