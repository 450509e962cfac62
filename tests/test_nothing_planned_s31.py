"""A policy that changes nothing in a model says so when the model is transformed.

The ``jacobian`` preset's one rule is optional (it selects top-level Sequential blocks, which a model of single
layers has not): ``transform(small_cnn, "jacobian")`` returned the model unchanged without a word, and training it
added no regulariser. Reference: the plain model's own output (the returned module must compute it).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import orthofx

pytestmark = pytest.mark.usefixtures("one_thread")


def _orthofx_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [w for w in caught if issubclass(w.category, orthofx.OrthofxWarning)]


def test_a_preset_whose_optional_rule_matches_nothing_warns_and_changes_nothing():
    model = orthofx.models.get("small_cnn")
    x = orthofx.models.example_input("small_cnn")
    gm, caught = _orthofx_warnings(lambda: orthofx.transform(model, "jacobian", example_inputs=(x,)))
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "changes nothing in SmallCNN" in message and "'jacobian-top-level' matched nothing" in message
    assert "orthofx.explain" in message
    assert caught[0].filename == __file__  # points at the caller's line
    with torch.no_grad():
        torch.testing.assert_close(gm.eval()(x), model.eval()(x), rtol=0, atol=0)


class _Upsampler(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 4, 2, stride=2)

    def forward(self, x):
        return self.up(x)


def test_an_optional_rule_that_skips_every_site_it_matched_warns_with_the_reason():
    # (a rule that is not optional is refused at planning instead)
    policy = {"rules": [{"match": {"type": "ConvTranspose2d"}, "apply": "convnorm", "optional": True}]}
    _, caught = _orthofx_warnings(lambda: orthofx.transform(_Upsampler(), policy))
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "skipped 'up'" in message and "transposed" in message, message


def test_a_policy_that_applies_does_not_warn():
    model = orthofx.models.get("small_cnn")
    x = orthofx.models.example_input("small_cnn")
    _, caught = _orthofx_warnings(lambda: orthofx.transform(model, "lorth", example_inputs=(x,)))
    assert not [w for w in caught if "changes nothing" in str(w.message)]
