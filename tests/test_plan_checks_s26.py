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
