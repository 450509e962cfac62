"""orthogonal_conv with ``method: cayley_fft``: planning sees what the layer alone rules out (dilation, an output size
the circular 'same' layer does not have), so explain's status is the outcome transform records, and
``on_impossible: error`` refuses before any pass runs (with ``inplace=True`` an earlier rule had written the user's
weights). The report's status says ``no orthogonal version`` only where P0 Theorem 4 rules the layer out."""
import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import ImpossibleLayerError

X = torch.randn(2, 4, 8, 8)

#: convs cayley_fft cannot build, whatever the input size: a dilation; k = 2 with padding 1 (output 9x9 from 8x8)
LAYER_REFUSALS = {
    "dilated": lambda: nn.Conv2d(4, 4, 3, padding=2, dilation=2),
    "output_size": lambda: nn.Conv2d(4, 4, 2, padding=1),
}


def _cayley_policy(on_impossible, earlier=()):
    return {"rules": [*earlier, {"match": {"type": "Conv2d"}, "apply": "orthogonal_conv",
                                 "with": {"method": "cayley_fft", "on_impossible": on_impossible}}]}


def _conv_entry(plan):
    return next(entry for entry in plan.entries if entry.pass_name == "orthogonal_conv")


@pytest.mark.parametrize("kind", sorted(LAYER_REFUSALS))
@pytest.mark.parametrize("on_impossible", ["regularize", "skip"])
def test_explain_shows_the_outcome_transform_records(kind, on_impossible):
    torch.manual_seed(0)
    model = nn.Sequential(LAYER_REFUSALS[kind]())
    policy = _cayley_policy(on_impossible)
    outcome = _conv_entry(orthofx.explain(model, policy, example_inputs=(X,))).outcome
    gm = orthofx.transform(model, policy, example_inputs=(X,))
    (change,) = orthofx.manifest_of(gm).changes
    assert isinstance(gm.get_submodule("0"), nn.Conv2d)  # not replaced
    if on_impossible == "regularize":
        assert change.what.startswith("attached L_orth instead: ")
        problem = change.what[len("attached L_orth instead: "):]
        assert outcome == f"L_orth instead: {problem} (on_impossible: regularize)"
        assert change.status.startswith("regularised (not built: ")
    else:
        assert change.status.startswith("skipped: ")
        problem = change.status[len("skipped: "):]
        assert outcome == f"left unchanged: {problem} (on_impossible: skip)"
    assert ("dilation=(2, 2)" if kind == "dilated" else "another output size") in problem


@pytest.mark.parametrize("kind", sorted(LAYER_REFUSALS))
def test_on_impossible_error_refuses_at_planning_before_earlier_rules_write(kind):
    torch.manual_seed(0)
    model = nn.Sequential(LAYER_REFUSALS[kind](), nn.Flatten(), nn.Linear(256, 256))
    policy = _cayley_policy("error", earlier=[{"match": {"type": "Linear"}, "apply": "isometric_init"}])
    entry = _conv_entry(orthofx.explain(model, policy, example_inputs=(X,)))
    assert isinstance(entry.refusal, ImpossibleLayerError) and entry.outcome.startswith("fails: ")
    before = model[2].weight.detach().clone()
    with pytest.raises(ImpossibleLayerError) as caught:
        orthofx.transform(model, policy, example_inputs=(X,), inplace=True)
    assert str(entry.refusal) == str(caught.value)
    assert "had already written" not in str(caught.value)
    assert torch.equal(model[2].weight, before)


def test_a_layer_refusal_needs_no_input_size():
    """Without example inputs a dilated cayley_fft conv is regularised as it would be with them (planning refused
    it for want of an input size, which it never needed)."""
    model = nn.Sequential(LAYER_REFUSALS["dilated"]())
    policy = _cayley_policy("regularize")
    entry = _conv_entry(orthofx.explain(model, policy))
    assert entry.refusal is None and entry.outcome.startswith("L_orth instead: dilation=(2, 2)")
    gm = orthofx.transform(model, policy)
    assert orthofx.manifest_of(gm).changes[0].status == "regularised (not built: dilation, cayley_fft)"


def test_report_says_no_orthogonal_version_only_where_theorem_4_rules_it_out():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 2, padding=1),       # output 9x9: a padding refusal; one exists
                          nn.Conv2d(4, 8, 1, stride=2))        # the strided 1x1 shortcut: Theorem 4 rules it out
    policy = {"rules": [{"match": {"type": "Conv2d"}, "apply": "orthogonal_conv",
                         "with": {"on_impossible": "regularize"}}]}
    rows = {row["site"]: row for row in orthofx.report(orthofx.transform(model, policy, example_inputs=(X,))).rows}
    assert rows["0"]["pass"] == "orthogonal_conv (regularised (not built: output size))"
    assert rows["0"]["exists"].startswith("yes")
    assert rows["1"]["pass"] == "orthogonal_conv (regularised (no orthogonal version))"
    assert rows["1"]["exists"].startswith("no")
