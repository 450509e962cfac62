"""Problems a pass can tell from the plan alone are refused while planning (``Pass.check_plan``), so that
``orthofx.explain`` raises the PlanError ``orthofx.transform`` raises: ``orthogonal_conv`` with ``method:
cayley_fft`` and ``padding: keep`` (explain said 'apply' and only transform refused it)."""

import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import PlanError


def _model():
    return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))


def _message(call) -> str:
    with pytest.raises(PlanError) as caught:
        call()
    return str(caught.value)


def test_cayley_fft_with_padding_keep_is_refused_by_explain_as_by_transform():
    policy = {"rules": [{"match": {"name": "2"}, "apply": "orthogonal_conv",
                         "with": {"method": "cayley_fft", "padding": "keep"}}]}
    x = torch.randn(1, 4, 8, 8)
    from_explain = _message(lambda: orthofx.explain(_model(), policy))
    from_transform = _message(lambda: orthofx.transform(_model(), policy, example_inputs=(x,)))
    assert from_explain == from_transform
    assert from_explain.startswith("rule 'orthogonal_conv[0]': 2 (Conv2d")
    assert "'cayley_fft' builds only the circular layer" in from_explain and "padding=(1, 1)" in from_explain


def test_cayley_fft_with_circular_padding_still_plans():
    policy = {"rules": [{"match": {"name": "2"}, "apply": "orthogonal_conv", "with": {"method": "cayley_fft"}}]}
    text = str(orthofx.explain(_model(), policy))
    assert "apply" in text


class _TiedPair(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.b = nn.Conv2d(4, 4, 3, padding=1, bias=bias)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("action, shown", [("error", "fails"), ("skip", "left unchanged"),
                                           ("regularize", "L_orth instead")])
def test_explain_shows_what_on_impossible_does_with_a_tied_weight_that_cannot_share_a_layer(action, shown):
    """b has a bias and a not: one orthogonal layer cannot stand for both, which apply handles by on_impossible;
    explain said plain 'apply' for both."""
    policy = {"rules": [{"match": {"type": "Conv2d"}, "apply": "orthogonal_conv",
                         "with": {"on_impossible": action}}]}
    statuses = {row["site"]: row["status"] for row in orthofx.explain(_TiedPair(bias=True), policy).rows()}
    for site, other in (("a", "b"), ("b", "a")):
        assert statuses[site].startswith(f"apply: {shown}: its weight is tied to {other}, and the layers sharing")
        assert statuses[site].endswith(f"(on_impossible: {action})")
    # layers that can share one orthogonal layer plan as usual
    statuses = {row["site"]: row["status"] for row in orthofx.explain(_TiedPair(bias=False), policy).rows()}
    assert statuses == {"a": "apply", "b": "apply"}
