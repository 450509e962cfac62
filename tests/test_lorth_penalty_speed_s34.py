"""Session 34: the differentiated L_orth from the products of the kernel's taps (``metrics._TapPairsDefect``, what
``metrics.lorth`` takes on a CPU for reverse mode above ``_TAP_PAIRS_MIN_PAIR_BACKWARD``; benchmarks/RESULTS.md,
"Session 34: L_orth penalty through tap products (CPU)").

- Value against the dense float64 operator (``references.lorth64``, P0 Theorem 7) and gradient against autograd
  through a hand-written float64 loop of P0 Definition 1 (conv_j = sum_t K_t K_{t+Sj}^T, every shift), on 1-D,
  2-D and 3-D kernels, k = 1..7, strides 1..3, groups, RO and CO (tall kernels take the space-to-depth Gram),
  dilation; finite differences (``gradcheck``) on a few small ones.
- The routes the tap products must leave to the convolution: forward mode, ``torch.func``, ``fast_backward=False``,
  small kernels; and ``create_graph=True`` keeps the convolution route's higher derivatives.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from orthofx import metrics
from references import lorth64


@pytest.fixture
def taps_everywhere(monkeypatch):
    """Every differentiated L_orth of a kernel with more than one tap through the tap products (threshold 0), and
    the number of times they ran."""
    calls = []
    apply = metrics._TapPairsDefect.apply
    monkeypatch.setattr(metrics, "_TAP_PAIRS_MIN_PAIR_BACKWARD", 0)
    monkeypatch.setattr(metrics._TapPairsDefect, "apply", lambda *a: calls.append(a) or apply(*a))
    return calls


def _dilated(w: torch.Tensor, dilations: tuple[int, ...]) -> torch.Tensor:
    """The kernel with ``D - 1`` zeros between taps (differentiable), written out."""
    size = [(k - 1) * D + 1 for k, D in zip(w.shape[2:], dilations)]
    out = w.new_zeros(*w.shape[:2], *size)
    out[(slice(None), slice(None)) + tuple(slice(None, None, D) for D in dilations)] = w
    return out


def _defect_loop(w: torch.Tensor, strides: tuple[int, ...], groups: int) -> torch.Tensor:
    """||conv(K, K, P, S) - I||_F^2 (P0 Definition 1, float64, differentiable): every shift j and tap t by hand,
    conv_j = sum_t K_t K_{t + S j}^T per group, I at j = 0; the RO form (M/g x M/g matrices) whatever the case."""
    M, Cg = w.shape[:2]
    m, ks = M // groups, tuple(w.shape[2:])
    total = w.new_zeros(())
    spans = [range(-((k - 1) // s), (k - 1) // s + 1) for k, s in zip(ks, strides)]
    for g in range(groups):
        block = w[g * m:(g + 1) * m]
        for j in itertools.product(*spans):
            conv = w.new_zeros(m, m)
            for t in itertools.product(*(range(k) for k in ks)):
                u = tuple(a + s * b for a, s, b in zip(t, strides, j))
                if all(0 <= a < k for a, k in zip(u, ks)):
                    conv = conv + block[(slice(None), slice(None)) + t] @ block[(slice(None), slice(None)) + u].T
            if all(b == 0 for b in j):
                conv = conv - torch.eye(m, dtype=w.dtype)
            total = total + conv.square().sum()
    return total


CASES = [  # (out, in/groups, kernel, stride, groups, dilation)
    (6, 6, (3,), (1,), 1, (1,)),
    (4, 3, (7,), (2,), 1, (1,)),            # RO: 4 <= 3 * 2
    (8, 2, (5,), (3,), 1, (1,)),            # CO: 8 > 2 * 3, tall
    (6, 4, (4,), (2,), 2, (1,)),
    (5, 5, (3, 3), (1, 1), 1, (1, 1)),
    (6, 3, (3, 3), (2, 2), 1, (1, 1)),      # RO: 6 <= 12
    (12, 2, (3, 3), (2, 2), 1, (1, 1)),     # CO: 12 > 8, tall
    (4, 4, (2, 5), (1, 3), 1, (1, 1)),
    (6, 2, (6, 6), (3, 3), 3, (1, 1)),
    (6, 4, (1, 3), (1, 2), 1, (1, 1)),
    (9, 3, (3, 3), (3, 3), 3, (1, 1)),
    (4, 4, (3, 3), (2, 1), 1, (2, 3)),      # dilation along the strided dimension
    (3, 3, (2, 2), (2, 2), 1, (2, 1)),
    (4, 4, (3, 2, 3), (1, 2, 1), 1, (1, 1, 1)),
    (3, 2, (2, 3, 2), (2, 1, 2), 1, (1, 1, 1)),
]


@pytest.mark.parametrize("out_c, in_c, ks, strides, groups, dilations", CASES)
def test_value_and_gradient_against_definition(taps_everywhere, out_c, in_c, ks, strides, groups, dilations):
    torch.manual_seed(sum(ks) + out_c)
    w = (torch.randn(out_c, in_c, *ks, dtype=torch.float64) * 0.4).requires_grad_()
    value = metrics.lorth(w, stride=strides, groups=groups, dilation=dilations)
    (grad,) = torch.autograd.grad(value, w)
    assert len(taps_everywhere) == 1
    # the value against the dense operator of the dilated kernel (Theorem 7; RO or CO as lorth picks)
    kernel = _dilated(w.detach(), tuple(D if s > 1 else 1 for D, s in zip(dilations, strides)))
    assert float(value.detach()) == pytest.approx(lorth64(kernel, strides, groups), rel=1e-12, abs=1e-12)
    # the gradient: that of the RO defect (the case's constant has none), by autograd through the loop
    wd = w.detach().clone().requires_grad_()
    (ref,) = torch.autograd.grad(_defect_loop(_dilated(wd, tuple(D if s > 1 else 1 for D, s in zip(
        dilations, strides))), strides, groups), wd)
    torch.testing.assert_close(grad, ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))


@pytest.mark.parametrize("shape, stride, groups", [((4, 3, 3, 3), 1, 1), ((6, 2, 3, 2), (2, 1), 2),
                                                   ((6, 2, 5), 3, 1)])
def test_gradcheck(taps_everywhere, shape, stride, groups):
    torch.manual_seed(0)
    w = (torch.randn(*shape, dtype=torch.float64) * 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: metrics.lorth(x, stride=stride, groups=groups), (w,))
    assert taps_everywhere


def test_route_taken_at_the_default_threshold():
    """A 128 -> 64 3 x 3 kernel at stride 2 (2^20 multiply-adds per tap pair) on the CPU takes the tap products, a
    64 -> 64 one (2^18) the convolution; the value and gradient in float32 agree with the float64 definition."""
    calls = []
    apply = metrics._TapPairsDefect.apply
    torch.manual_seed(0)
    w = (torch.randn(128, 64, 3, 3) / 24).requires_grad_()
    try:
        metrics._TapPairsDefect.apply = lambda *a: calls.append(a) or apply(*a)
        value = metrics.lorth(w, stride=2)
        value.backward()
        small = torch.randn(64, 64, 3, 3, requires_grad=True)
        metrics.lorth(small).backward()
    finally:
        metrics._TapPairsDefect.apply = apply
    assert len(calls) == 1
    w64 = w.detach().double().requires_grad_()
    ref = _defect_loop(w64, (2, 2), 1)
    (grad64,) = torch.autograd.grad(ref, w64)
    assert float(value.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    torch.testing.assert_close(w.grad.double(), grad64, rtol=1e-4, atol=1e-5 * float(grad64.abs().max()))


def test_other_derivatives_keep_the_convolution(taps_everywhere):
    """Forward mode, torch.func and fast_backward=False have no tap-product rule: the convolution runs, with the
    same value and derivative."""
    torch.manual_seed(1)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64) * 0.4
    t = torch.randn_like(w)
    wr = w.clone().requires_grad_()
    (grad,) = torch.autograd.grad(metrics.lorth(wr), wr)
    assert len(taps_everywhere) == 1
    _, tangent = torch.func.jvp(metrics.lorth, (w,), (t,))
    func_grad = torch.func.grad(metrics.lorth)(w)
    (exact,) = torch.autograd.grad(metrics.lorth(wr, fast_backward=False), wr)
    assert len(taps_everywhere) == 1
    torch.testing.assert_close(tangent, (grad * t).sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(func_grad, grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(exact, grad, rtol=1e-12, atol=1e-14)


def test_create_graph_gives_the_convolution_routes_higher_derivatives(taps_everywhere):
    torch.manual_seed(2)
    w = (torch.randn(6, 6, 3, 3, dtype=torch.float64) * 0.4).requires_grad_()
    (grad,) = torch.autograd.grad(metrics.lorth(w), w, create_graph=True)
    (hvp,) = torch.autograd.grad(grad.square().sum(), w)
    assert len(taps_everywhere) == 1
    (grad_conv,) = torch.autograd.grad(metrics._conv_defect(w, (1, 1), 1, True, True), w, create_graph=True)
    (hvp_conv,) = torch.autograd.grad(grad_conv.square().sum(), w)
    torch.testing.assert_close(grad, grad_conv, rtol=1e-12, atol=0)
    torch.testing.assert_close(hvp, hvp_conv, rtol=1e-12, atol=0)


def test_a_backward_inside_autocast_keeps_float32_products(taps_everywhere):
    """lorth's forward runs with autocast off, but backward() is often called inside the user's autocast block:
    the tap products' backward then ran in bfloat16 (3.7e-3 off)."""
    torch.manual_seed(3)
    w = torch.randn(64, 64, 3, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        metrics.lorth(w).backward()
    assert taps_everywhere
    w64 = w.detach().double().requires_grad_()
    metrics.lorth(w64).backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-5 * w64.grad.abs().max().item())


def test_a_kernel_whose_toeplitz_matrix_is_too_large_keeps_the_convolution(monkeypatch, taps_everywhere):
    w = torch.randn(32, 32, 3, 3, requires_grad=True)
    # 32 rows x 9 taps: (288)^2 float32 entries
    assert metrics._toeplitz_bytes(w, (1, 1), 1) == 288 ** 2 * 4
    assert metrics._toeplitz_bytes(w, (2, 2), 1) == (32 * 4) ** 2 * 4  # 2 x 2 taps per residue class at stride 2
    monkeypatch.setattr(metrics, "_TAP_PAIRS_MAX_TOEPLITZ_BYTES", 288 ** 2 * 4 - 1)
    metrics.lorth(w).backward()
    assert not taps_everywhere
    metrics.lorth(w, stride=2).backward()
    assert len(taps_everywhere) == 1


def test_kernels_with_many_taps_per_residue_class_keep_the_convolution(taps_everywhere):
    """The tap products were slower than the convolution from 25 taps per class (5 x 5 and 7 x 7 at stride 1),
    faster for 7 x 7 at stride 2 (16 per class)."""
    torch.manual_seed(4)
    w = torch.randn(8, 8, 7, 7, dtype=torch.float64, requires_grad=True)
    assert metrics._class_taps(w, (1, 1)) == 49 and metrics._class_taps(w, (2, 2)) == 16
    metrics.lorth(w).backward()
    metrics.lorth(w[:, :, :5, :5]).backward()
    assert not taps_everywhere
    (grad,) = torch.autograd.grad(metrics.lorth(w, stride=2), w)
    assert len(taps_everywhere) == 1
    (reference,) = torch.autograd.grad(metrics.lorth(w, stride=2, fast_backward=False), w)
    torch.testing.assert_close(grad, reference, rtol=1e-10, atol=1e-10)
