"""Three user-facing messages of session 29, each with the input that showed the old text.

1. A second transform of a transformed model said "matched no module site; the graph's module sites: OrthogonalConv2d
   x2 ... Fix the match" (or "module sites: none" in export capture) without saying that the layers are orthofx's.
2. A seq-first recurrent model captured with torch.export: the guard of the specialised dimension 0, the sequence
   length, said "captured with torch.export for batch size 5 only", and a wrong batch (dimension 1) was "dimension 1".
   (Its dynamic-batch export, whose error named dimension 0 as the sequence length, now works:
   test_seq_first_export_s29.)
3. The Riemannian hooks' warning about LBFGS with max_iter > 1 came once per transformed part of the attached model.
"""

import io
import re
import warnings

import pytest
import torch
from torch import nn

import orthofx
from orthofx.nn import OrthogonalConv2d
from references import circular_operator64

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------- 1. a second transform

def two_convs():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))


X = torch.randn(2, 4, 8, 8)


@pytest.mark.parametrize("preset", ["orthogonal", "lorth", "convnorm"])
def test_a_second_transform_says_the_layers_are_orthofx_layers_and_what_to_do(preset):
    model = two_convs()
    gm = orthofx.transform(model, "orthogonal", example_inputs=(X,))
    for call in (orthofx.explain, orthofx.transform):
        with pytest.raises(orthofx.PlanError) as info:
            call(gm, preset, example_inputs=(X,))
        text = str(info.value)
        assert re.search(r"2 layer\(s\) of the model are already orthofx layers \(OrthogonalConv2d x2, put in place "
                         r"of Conv2d layers by orthogonal_conv \(rule 'orthogonal'\) in an earlier orthofx.transform\)"
                         r": '0', '2'", text), text
        assert "exactly orthogonal already" in text and "transform the original model instead" in text
        assert "Fix the match" not in text  # the old advice: the match is right, the model is the transformed one
    # what the message says, checked independently: each layer's circular operator (dense, float64) is orthogonal
    for name in ("0", "2"):
        operator = circular_operator64(gm.get_submodule(name).weight)
        eye = torch.eye(operator.shape[1], dtype=torch.float64)
        assert torch.allclose(operator.T @ operator, eye, atol=1e-6), name
    # and the advice works: the original model (left unchanged by the first transform) takes the policy
    assert [e.site.name for e in orthofx.explain(model, preset, example_inputs=(X,)).entries][:2] == ["0", "2"]


def test_export_capture_of_a_transformed_model_names_its_orthofx_layers():
    # export capture keeps the orthofx layers as module sites (it inlined them, "module sites: none", before
    # nn.tracing.exported_as_plain_module), and the note names them as in fx capture
    gm = orthofx.transform(two_convs(), "orthogonal", example_inputs=(X,))
    policy = orthofx.Policy.preset("orthogonal").to_dict()
    policy["capture"] = {"mode": "export"}
    with pytest.raises(orthofx.PlanError, match=r"module sites: OrthogonalConv2d x2, ReLU x1\. 2 layer\(s\) of the "
                                                r"model are already orthofx layers \(OrthogonalConv2d x2, "
                                                r".*orthogonal_conv"):
        orthofx.explain(gm, policy, example_inputs=(X,))


def test_a_rule_that_matches_elsewhere_warns_about_the_orthofx_layers_it_passes_over():
    gm = orthofx.transform(two_convs(), "orthogonal", example_inputs=(X,))
    bigger = nn.Sequential(gm, nn.Flatten(), nn.Linear(256, 8))
    policy = {"rules": [{"match": {"type": ["Conv2d", "Linear"]}, "apply": "orth_regularizer"},
                        {"match": {"type": "Conv1d"}, "apply": "orth_regularizer", "optional": True}]}
    plan = orthofx.explain(bigger, policy, example_inputs=(X,))
    assert [e.site.name for e in plan.entries] == ["2"]
    [warning] = [w for w in plan.capture.warnings if "already orthofx" in w]  # the Conv1d rule passes over none
    assert warning.startswith("rule 'orth_regularizer[0]' passes over orthofx layers: 2 layer(s)")
    assert "'0.0', '0.2'" in warning and "orthogonal_conv (rule 'orthogonal')" in warning
    transformed = orthofx.transform(bigger, policy, example_inputs=(X,))
    assert warning in str(orthofx.report(transformed))


def test_orthofx_layers_the_user_built_are_named_without_a_pass_and_other_types_are_not_blamed():
    model = nn.Sequential(OrthogonalConv2d(4, 4, 3), nn.ReLU())
    with pytest.raises(orthofx.PlanError, match=r"1 layer\(s\) of the model are already orthofx layers "
                                                r"\(OrthogonalConv2d x1\): '0'") as info:
        orthofx.explain(model, "lorth", example_inputs=(X,))
    assert "earlier orthofx.transform" not in str(info.value)
    gm = orthofx.transform(two_convs(), "orthogonal", example_inputs=(X,))
    with pytest.raises(orthofx.PlanError, match="matched no module site") as info:  # GRU: not what they replaced
        orthofx.explain(gm, {"rules": [{"match": {"type": "GRU"}, "apply": "orth_regularizer"}]})
    assert "already orthofx" not in str(info.value) and "Fix the match" in str(info.value)


# ------------------------------------------------------------------------ 2. seq-first recurrent layers

class Recurrent(nn.Module):
    def __init__(self, cls=nn.GRU, batch_first=False):
        super().__init__()
        self.rnn = cls(4, 6, batch_first=batch_first)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.fc(y[:, -1] if self.rnn.batch_first else y[-1])


EXPORT = {"capture": {"mode": "export"}, "rules": [{"match": {"type": ["GRU", "LSTM"]}, "apply": "orth_regularizer"}]}


def export_capture(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch.export's note on the RNN's _flat_weights
        return orthofx.transform(model, EXPORT, example_inputs=(x,))


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM])
def test_a_seq_first_input_is_named_by_its_layout_not_as_a_batch(cls):
    torch.manual_seed(0)
    # seq-first: L = N = 5, which the sizes cannot tell apart, so capture marks dimension 0 (L) dynamic as for any
    # input, and torch.export fixes it (with L != N the batch N, dimension 1, is dynamic: test_seq_first_export_s29)
    x = torch.randn(5, 5, 4)
    model = Recurrent(cls)
    # the reference: the torch layer itself reads dimension 1 as the batch (its final state has N = 5 rows)
    final = model.rnn(x)[1]
    assert (final[0] if cls is nn.LSTM else final).shape[1] == x.shape[1] == 5
    gm = export_capture(model, x)
    name = cls.__name__
    [warning] = [w for w in orthofx.manifest_of(gm).capture.warnings if "specialised" in w]
    assert warning.startswith(f"torch.export specialised the graph to dimension 0 of input 'x' = 5, which the "
                              f"seq-first {name} 'rnn' reads as the sequence length L (batch_first=False: input (L, N, "
                              f"H_in)), not the batch")
    assert "its dimension 1, the batch N, is fixed to 5 too" in warning and "batch size 5" not in warning
    for call in (gm, pickled(gm)):
        with pytest.raises(orthofx.ArgumentError) as info:
            call(torch.randn(8, 5, 4))
        text = str(info.value)
        assert f"which the seq-first {name} 'rnn' reads as the sequence length L" in text, text
        assert "got shape (8, 5, 4) (sequence length 8, batch 5)" in text and "batch size 5" not in text
        with pytest.raises(orthofx.ArgumentError, match=rf"dimension 1 is 7, not 5 \(the seq-first {name} 'rnn' reads "
                                                        r"dimension 1 as the batch N; batch_first=False: input "
                                                        r"\(L, N, H_in\)\)"):
            call(torch.randn(5, 7, 4))
    assert torch.allclose(gm(x), model(x), atol=1e-6)  # the example's shape still runs, as the model does


def pickled(gm):
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_a_batch_first_input_names_its_sequence_dimension_and_a_transposed_one_claims_nothing():
    torch.manual_seed(0)
    gm = export_capture(Recurrent(batch_first=True), torch.randn(3, 5, 4))
    assert not [w for w in orthofx.manifest_of(gm).capture.warnings if "sequence length" in w]
    with pytest.raises(orthofx.ArgumentError, match=r"dimension 1 is 8, not 5 \(the GRU 'rnn' reads dimension 1 as "
                                                    r"the sequence length L; batch_first=True"):
        gm(torch.randn(3, 8, 4))

    class Transposed(Recurrent):
        def forward(self, x):  # a batch-first input made seq-first: dimension 0 of x is not what the layer reads
            return super().forward(x.transpose(0, 1))

    gm = export_capture(Transposed(), torch.randn(3, 5, 4))
    with pytest.raises(orthofx.ArgumentError) as info:
        gm(torch.randn(3, 8, 4))
    assert "dimension 1 is 8, not 5." in str(info.value) and "GRU" not in str(info.value)


# ------------------------------------------------------------------------------- 3. one warning per attach

def riemannian_part():
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
    return orthofx.transform(model, {"rules": [{"match": {"type": "Linear"}, "apply": "riemannian"}]})


def test_lbfgs_with_inner_steps_warns_once_per_attach_for_all_the_transformed_parts():
    torch.manual_seed(0)
    bigger = nn.Sequential(riemannian_part(), nn.ReLU(), riemannian_part())
    # the reference: the square Linear weights of the parts, named as the bigger model names them
    square = [name for name, m in bigger.named_modules() if isinstance(m, nn.Linear)]
    assert square == ["0.0", "0.2", "2.0", "2.2"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = orthofx.attach(torch.optim.LBFGS(bigger.parameters(), lr=1.0, max_iter=5), bigger)
    [warning] = [w for w in caught if issubclass(w.category, orthofx.OrthofxWarning)]  # was one per part: two
    assert warning.filename == __file__  # at the user's attach call
    assert str(warning.message).startswith(
        "riemannian (rule 'riemannian[0]': " + ", ".join(f"'{name}'" for name in square) + "): LBFGS with max_iter=5 "
        "takes 5 steps inside one optimizer.step()")
    assert len(handle.hooks) == 4
    handle.remove()
    # each attach call warns again (once)
    with pytest.warns(orthofx.OrthofxWarning, match="LBFGS with max_iter=5") as caught:
        orthofx.attach(torch.optim.LBFGS(bigger.parameters(), lr=1.0, max_iter=5), bigger)
    assert len([w for w in caught if issubclass(w.category, orthofx.OrthofxWarning)]) == 1
