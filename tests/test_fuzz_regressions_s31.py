"""Regressions found by the session-31 fuzz round (policies of 2-3 rules of different passes, matched by type,
name glob, ``re:`` regex, ``feeds`` and ``kind: block``, with parameters at their documented edges, on the test
corpus and the built-in models; in float64, under CPU bf16 autocast, transformed in eval mode then trained, run on
other batch and spatial sizes, with SGD-momentum / Adam / AdamW attached, then freeze, ``.pt`` export and load into
a fresh model, a second transform, and ``torch.compile(backend="eager")`` in train mode). Driver:
``.snap/s31/fuzz/driver.py``. Each open finding would be an xfail(strict=True) test; all three are fixed.

- ``orthogonal_conv`` with ``on_impossible: regularize`` on a model frozen from a ``convnorm`` model (a second
  transform of ``orthofx.freeze(gm)``, which the README allows) replaced the conv inside each
  ``FrozenConvNormNd`` by an ``OrthogonalConv2d`` wherever P0's shape test passed (``padding: keep``, or a 1 x 1
  conv of MobileNetV2's inverted residual): the example run then failed with a TransformError wrapping
  "AttributeError: 'OrthogonalConv2d' object has no attribute '_conv_forward'", a message that says neither
  what is wrong nor how to fix it. Root cause: planning skips a frozen ConvNorm conv
  (``plan._derived_weight_reason``) only for passes that do not ``handles_derived_weight``, and
  ``orthogonal_conv`` with ``regularize`` does (L_orth reads a computed weight), but its ``apply``
  (``passes/orthogonal_conv.py:OrthogonalConvPass.apply``) then tested ``derived_weight`` alone, not the frozen
  ConvNorm mark. Expected: L_orth instead, as for a computed weight (the frozen layer unchanged; its eval output
  the frozen model's; the penalty the weighted L_orth of the conv, from ``F.conv2d`` in float64). Fixed:
  ``orthogonal_conv._kept_layer`` gives both reasons to ``apply`` and ``planned_outcome``.
- Same root, in ``explain``: a conv whose weight a torch parametrization computes (``weight_norm``), under
  ``orthogonal_conv`` with ``on_impossible: regularize``, showed ``apply`` (a hard orthogonal layer) while
  ``transform`` puts L_orth on it (``planned_outcome`` read the layer's shape only). Expected: ``apply: L_orth
  instead: <why>``, as for a layer P0's Theorem 4 rules out. Fixed with the finding above.
- ``jacobian_isometry`` with ``route: jvp`` on a block whose forward calls ``torch.linalg.eigh`` (a decorrelated
  BatchNorm, covariance whitening: the built-in ``dbn_cnn``'s ``dbn`` block) is accepted by ``transform`` (also
  with example inputs, in train mode) and the first training forward then raises a bare ``NotImplementedError``
  ("linalg_eigh has no reliable forward-mode derivative; use route 'auto' (falls back) or 'double_vjp'"),
  which names neither the block nor the rule and is no orthofx exception type. Root cause:
  ``metrics._NoForwardModeGaps.__torch_function__`` raises it as the forward route's internal signal to fall
  back; with ``route: jvp`` there is no fallback and ``nn/jacobian.py`` (``JacobianProbe``) lets it out as it
  is. Expected: an ``orthofx.OrthofxError`` (ideally a ``TransformError`` / ``PlanError`` at ``transform`` when
  example inputs are given) naming the block ``'cov'``, the rule and the fix (``route: auto`` or ``double_vjp``).
  Fixed (in ``metrics.py``, by its owner in the same session): route ``jvp`` now raises
  ``metrics._JvpRouteError`` / ``_LayerJvpRouteError``, a ``LayerArgumentError`` that names the probe's path and
  says to use ``auto`` or ``double_vjp`` (at the first training forward; still a ``NotImplementedError`` too).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthofx
from orthofx.transform import manifest_of

pytestmark = pytest.mark.usefixtures("one_thread")


def _lorth_square_conv64(weight: torch.Tensor) -> float:
    """P0's L_orth of a square (M = C) stride-1 2-D kernel in float64: ||conv(K, K, k - 1) - I_r0||_F^2."""
    k = weight.detach().double()
    m, _, kh, kw = k.shape
    gram = F.conv2d(k, k, padding=(kh - 1, kw - 1))  # M x M x (2kh - 1) x (2kw - 1)
    identity = torch.zeros_like(gram)
    identity[torch.arange(m), torch.arange(m), kh - 1, kw - 1] = 1.0
    return float(((gram - identity) ** 2).sum())


def test_orthogonal_conv_regularize_on_a_frozen_convnorm_conv_puts_lorth_on_it():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Tanh())
    frozen = orthofx.freeze(orthofx.transform(model, "convnorm", example_inputs=(x,)), (x,))
    with torch.no_grad():
        expected = frozen(x)
    policy = {"rules": [{"match": {"type": "Conv2d"}, "apply": "orthogonal_conv",
                         "with": {"on_impossible": "regularize", "padding": "keep", "regularize_weight": 0.5}}]}
    gm = orthofx.transform(frozen, policy, example_inputs=(x,))
    assert type(gm.get_submodule("0.conv")) is nn.Conv2d  # the frozen layer keeps its own conv
    gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), expected, rtol=0, atol=1e-6)
    weight = frozen.get_submodule("0.conv").weight
    assert float(orthofx.penalty(gm)) == pytest.approx(0.5 * _lorth_square_conv64(weight), rel=1e-4)


def test_explain_says_lorth_instead_for_a_parametrized_weight_under_regularize():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv2d(4, 4, 3, padding=1)))
    policy = {"rules": [{"match": {"type": "Conv2d"}, "apply": "orthogonal_conv",
                         "with": {"on_impossible": "regularize"}}]}
    plan = orthofx.explain(model, policy, example_inputs=(x,))
    (entry,) = plan.entries
    assert entry.outcome.startswith("L_orth instead:") and "parametrization" in entry.outcome, entry.outcome
    gm = orthofx.transform(model, policy, example_inputs=(x,))  # what transform does: L_orth, the layer kept
    assert [c.status for c in manifest_of(gm).changes] == ["regularised (computed weight)"]
    weight = model[0].weight  # the weight the parametrization computes: L_orth of it, by hand in float64
    assert float(orthofx.penalty(gm)) == pytest.approx(0.01 * _lorth_square_conv64(weight), rel=1e-4)


class _Whiten(nn.Module):
    """Covariance whitening by eigh (a decorrelated BatchNorm without statistics): x V."""

    def forward(self, x):
        cov = x.T @ x / x.shape[0] + torch.eye(x.shape[1])
        _, vectors = torch.linalg.eigh(cov)
        return x @ vectors


class _WhitenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.cov = nn.Sequential(nn.Linear(4, 4), _Whiten())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.cov(self.fc(x)))


def test_jvp_route_through_eigh_raises_an_orthofx_error_naming_the_block():
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    policy = {"rules": [{"match": {"kind": "block", "name": "cov"}, "apply": "jacobian_isometry",
                         "with": {"route": "jvp"}}]}
    # reference, torch alone: the block's Jacobian exists (reverse mode) and is finite, so only the route is wrong
    jac = torch.autograd.functional.jacobian(_WhitenNet().cov, x[:3])
    assert torch.isfinite(jac).all()
    with pytest.raises(orthofx.OrthofxError) as info:
        gm = orthofx.transform(_WhitenNet(), policy, example_inputs=(x,))
        gm.train()
        gm(x)
        orthofx.penalty(gm)
    message = str(info.value)
    assert "cov" in message and "jvp" in message and ("double_vjp" in message or "auto" in message)
