"""Session 34, review of the differentiated L_orth through the products of the kernel's taps
(``metrics._TapPairsDefect``, commit 99dcd15).

- ``_tap_pairs_plan`` keeps its index tensors (``lru_cache``): made under a ``FakeTensorMode`` (``torch.export``,
  ``make_fx``, shape tracing) they were fake tensors, and every later eager L_orth of that kernel shape failed.
- ``torch.jit.trace`` of a forward that computes the penalty recorded ``_TapPairsDefect`` as a Python call, which
  ``torch.jit.save`` refuses: under tracing the convolution route is kept.

References: the dense float64 operator (``references.lorth64``, P0 Theorem 7) and autograd through a float64 loop
of P0 Definition 1.
"""

from __future__ import annotations

import io
import itertools
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from orthofx import metrics
from references import lorth64


@pytest.fixture
def taps_everywhere(monkeypatch):
    """Every L_orth of a kernel with more than one tap through the tap products, with and without a derivative;
    the calls of ``_TapPairsDefect`` are counted."""
    calls = []
    apply = metrics._TapPairsDefect.apply
    for name in ("_TAP_PAIRS_MIN_PAIR_BACKWARD", "_TAP_PAIRS_MIN_PAIR", "_TAP_PAIRS_MIN_WORK"):
        monkeypatch.setattr(metrics, name, 0)
    monkeypatch.setattr(metrics._TapPairsDefect, "apply", lambda *a: calls.append(a) or apply(*a))
    return calls


def _definition(w: torch.Tensor, strides: tuple[int, ...]) -> torch.Tensor:
    """||conv(K, K, P, S) - I||_F^2 (P0 Definition 1, RO form, groups 1; float64, differentiable): conv_j =
    sum_t K_t K_{t + S j}^T over every shift j by hand."""
    ks = tuple(w.shape[2:])
    total = w.new_zeros(())
    for j in itertools.product(*(range(-((k - 1) // s), (k - 1) // s + 1) for k, s in zip(ks, strides))):
        conv = w.new_zeros(w.shape[0], w.shape[0])
        for t in itertools.product(*(range(k) for k in ks)):
            u = tuple(a + s * b for a, s, b in zip(t, strides, j))
            if all(0 <= a < k for a, k in zip(u, ks)):
                conv = conv + w[(...,) + t] @ w[(...,) + u].T
        if not any(j):
            conv = conv - torch.eye(w.shape[0], dtype=w.dtype)
        total = total + conv.square().sum()
    return total


def _check_eager(taps_everywhere, w: torch.Tensor, strides: tuple[int, ...]) -> None:
    """Value (no derivative) against the dense operator, value and gradient (tap products) against the loop."""
    assert float(metrics.lorth(w, strides)) == pytest.approx(lorth64(w, strides), rel=1e-10)
    leaf = w.clone().requires_grad_()
    before = len(taps_everywhere)
    (grad,) = torch.autograd.grad(metrics.lorth(leaf, strides), leaf)
    assert len(taps_everywhere) == before + 1
    reference = w.clone().requires_grad_()
    (expected,) = torch.autograd.grad(_definition(reference, strides), reference)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("differentiated", [False, True])
def test_a_plan_made_under_fake_tensor_mode_is_not_kept(taps_everywhere, differentiated):
    # a kernel shape of its own (no other test fills the plan's cache with it first), RO at stride (2, 1)
    strides = (2, 1)
    w = torch.randn(5, 4, 5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) / 4
    _check_eager(taps_everywhere, w, strides)  # a plan made outside the mode, used under it
    single = w.float()  # a float64 value without a derivative takes the Fourier route
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(single).requires_grad_(differentiated)
        value = metrics.lorth(fake, strides)
        if differentiated:
            assert torch.autograd.grad(value, fake)[0].shape == w.shape
    _check_eager(taps_everywhere, w, strides)
    # a plan first made under the mode, then used outside it
    w3 = torch.randn(3, 4, 2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) / 4
    single = w3.float()
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(single).requires_grad_(differentiated)
        value = metrics.lorth(fake, (1, 3))
        if differentiated:
            torch.autograd.grad(value, fake)
    _check_eager(taps_everywhere, w3, (1, 3))


def test_jit_trace_of_the_penalty_keeps_the_convolution(taps_everywhere):
    conv = torch.nn.Conv2d(4, 6, 3, stride=2, bias=False).double()

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return self.conv(x).square().mean() + metrics.lorth(self.conv.weight, 2)

    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.13 deprecates torch.jit.trace
        traced = torch.jit.trace(Step(), (x,), check_trace=False)
        torch.jit.save(traced, io.BytesIO())  # a recorded Python call (the tap products) is refused here
    assert not taps_everywhere
    (grad,) = torch.autograd.grad(traced(x), conv.weight)
    leaf = conv.weight.detach().clone().requires_grad_()
    expected = torch.autograd.grad(torch.nn.functional.conv2d(x, leaf, stride=2).square().mean()
                                   + _definition(leaf, (2, 2)), leaf)[0]
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-10)
