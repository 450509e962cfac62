"""Regressions found by fuzzing orthofx with models in dtypes other than float32 (``.double()``, ``.half()``,
``.bfloat16()`` before or after the transform, ``torch.autocast``, integer / complex inputs).

Each test failed before its fix and compares against an independent reference: the same computation in float64
written here with plain torch, a dense float64 operator, or a precise error.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import orthofx
from orthofx import metrics
from orthofx.nn.orthogonal import OrthogonalConv1d, OrthogonalConv2d, OrthogonalConvTranspose2d, OrthogonalLinear

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)

HALF = [torch.bfloat16, torch.float16]


def _near_orthogonal(rows: int, cols: int, noise: float, seed: int = 0) -> torch.Tensor:
    """A float64 ``rows x cols`` matrix with orthonormal rows (or columns) plus ``noise`` times a Gaussian."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=g, dtype=torch.float64))[0]
    q = q if rows >= cols else q.T
    return q + noise * torch.randn(rows, cols, generator=g, dtype=torch.float64)


def _gram_defect_squared(w: torch.Tensor) -> torch.Tensor:
    """||W W^T - I||_F^2 (out <= in) or ||W^T W - I||_F^2, the L_orth of a Linear weight, written out."""
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return (gram - torch.eye(gram.shape[0], dtype=w.dtype)).square().sum()


# ------------------------------------------------------------------------------------------------ L_orth


@pytest.mark.parametrize("dtype", HALF)
def test_lorth_of_a_half_precision_linear_weight_has_the_float64_gradient(dtype):
    """L_orth of a bfloat16 / float16 weight (a model converted with .bfloat16() / .half(), whose penalty runs in the
    weights' dtype) was computed in that dtype: the Gram defect W W^T - I of a near-orthogonal weight cancels
    most of bfloat16's 8 bits, and the gradient came out 14 % off in direction (float16: 1 %). It is now computed
    in float32 from the half-precision values and returned in their dtype."""
    w = _near_orthogonal(16, 16, 3e-3).to(dtype)
    _assert_lorth_matches_float64(w, _gram_defect_squared)  # the gradient was 0.14 off in bfloat16, 0.013 in float16


def _assert_lorth_matches_float64(w: torch.Tensor, definition) -> None:
    """L_orth of the half-precision ``w``: its value one rounding to ``w``'s dtype from ``definition`` evaluated in
    float64 on the same values, its gradient within the gradient's own rounding (4 eps, relative)."""
    leaf = w.clone().requires_grad_()
    value = metrics.lorth(leaf)
    value.backward()
    exact = w.double().requires_grad_()
    reference = definition(exact)
    reference.backward()
    eps = torch.finfo(w.dtype).eps
    assert value.dtype == w.dtype
    torch.testing.assert_close(value.double(), reference.detach(), rtol=eps, atol=0)
    error = (leaf.grad.double() - exact.grad).norm() / exact.grad.norm()
    assert error < 4 * eps, error


def _lorth_conv1d_by_definition(K: torch.Tensor) -> torch.Tensor:
    """P0's L_orth of a stride-1 Conv1d kernel (M <= C: row orthogonal), written out: the sum over shifts j of
    ||sum_t K[:, :, t] K[:, :, t + j]^T - [j = 0] I||_F^2."""
    M, _, k = K.shape
    total = K.new_zeros(())
    for j in range(1 - k, k):
        block = sum(K[:, :, t] @ K[:, :, t + j].T for t in range(k) if 0 <= t + j < k)
        total = total + (block - (j == 0) * torch.eye(M, dtype=K.dtype)).square().sum()
    return total


@pytest.mark.parametrize("dtype", HALF)
def test_lorth_of_a_half_precision_conv_weight_has_the_float64_gradient(dtype):
    """The convolution route of L_orth in bfloat16 / float16: value and gradient of a near-orthogonal kernel (an
    orthogonal layer's plus noise) against the definition in float64."""
    torch.manual_seed(0)
    kernel = OrthogonalConv1d(8, 8, 3).weight.detach().double()
    w = (kernel + 2e-3 * torch.randn(8, 8, 3, dtype=torch.float64)).to(dtype)
    _assert_lorth_matches_float64(w, _lorth_conv1d_by_definition)


def test_lorth_penalty_of_a_bfloat16_model_matches_float64():
    """orthofx.penalty of a model converted to bfloat16 before the transform: the sum of the L_orth terms, each
    within bfloat16 rounding of the float64 value of the same (bfloat16) weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 12))
    with torch.no_grad():
        for index in (0, 2):
            model[index].weight.copy_(_near_orthogonal(12, 12, 2e-3, seed=index))
    gm = orthofx.transform(model.bfloat16(), "lorth", example_inputs=(torch.randn(2, 12).bfloat16(),))
    gm.train()
    total = orthofx.penalty(gm)
    total.backward()
    for index in (0, 2):
        w = gm.get_submodule(str(index)).weight
        exact = w.detach().double().requires_grad_()
        (0.01 * _gram_defect_squared(exact)).backward()
        error = (w.grad.double() - exact.grad).norm() / exact.grad.norm()
        assert error < 4 * torch.finfo(torch.bfloat16).eps, (index, error)  # was 0.13


# ------------------------------------------------------------------------------------------------ Jacobian


def _conv_block(gain: float = 2.5) -> nn.Module:
    """A 16-channel conv block (16 x 32 x 32 = 16384 input values per sample), its kernels scaled by ``gain`` (a
    Jacobian of the size a trained ResNet stage has: ||J^T J v - v||^2 of one sample passes 65504)."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    with torch.no_grad():
        for layer in (block[0], block[2]):
            layer.weight.mul_(gain)
    return block


def _exact_residuals(block: nn.Module, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per sample ||J^T J v - v||^2 for one probe ``v``, in float64, by plain autograd (no batch coupling)."""
    block = copy.deepcopy(block).double()
    xp = x.double().requires_grad_()
    y = block(xp)
    c = torch.zeros_like(y, requires_grad=True)
    (g,) = torch.autograd.grad(y, xp, c, create_graph=True)
    (u,) = torch.autograd.grad(g, c, v.double())            # J v
    (jtu,) = torch.autograd.grad(y, xp, u)                   # J^T J v
    return (jtu - v.double()).square().flatten(1).sum(1)


@pytest.mark.parametrize("autocast", [False, True])
def test_jacobian_estimate_of_a_float16_block_does_not_overflow(monkeypatch, autocast):
    """metrics.jacobian_isometry (what the jacobian preset's probes compute) summed the squared residuals in the
    block's dtype: float16 overflows past 65504, which one sample's sum over a 16 x 32 x 32 feature map passes, so the
    penalty of a float16 ResNet-18 (width 16, 32 x 32 inputs; .half() or float16 autocast) was inf on three of its
    four stages, though normalised it is small. The sums now run in float32. Reference: the same probe's
    residuals in float64."""
    block = _conv_block()
    x = torch.randn(2, 16, 32, 32, generator=torch.Generator().manual_seed(1)).half()
    v = (2 * torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(2)) - 1).float()
    monkeypatch.setattr(metrics, "_rademacher", lambda like, generator=None, shift=0: v.to(like.dtype))
    sums = _exact_residuals(block, x, v)
    assert sums.min() > 65504  # what overflowed
    reference = sums.mean() / x[0].numel()
    if autocast:
        with torch.autocast("cpu", dtype=torch.float16):
            value = metrics.jacobian_isometry(block, x.float(), per_sample=True, normalize=True, create_graph=False)
        assert value.dtype == torch.float32  # a reduction, as autocast's own sums
    else:
        value = metrics.jacobian_isometry(block.half(), x, per_sample=True, normalize=True, create_graph=False)
        assert value.dtype == torch.float16
    assert torch.isfinite(value)
    torch.testing.assert_close(value.double(), reference, rtol=2e-2, atol=0)  # the float16 forward's rounding


def test_jacobian_penalty_of_a_half_model_is_finite():
    """The jacobian preset on a model converted with .half(): finite penalty terms (inf before the fix), within
    float16 forward rounding of the float32 model's, with the same probes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), _conv_block(), nn.Flatten(), nn.Linear(16 * 32 * 32, 3))
    x = torch.randn(2, 3, 32, 32)
    gm = orthofx.transform(model, "jacobian", example_inputs=(x,)).train()
    terms = {}
    for dtype in (torch.float32, torch.float16):
        g = copy.deepcopy(gm).to(dtype)
        torch.manual_seed(5)
        g(x.to(dtype))
        terms[dtype] = orthofx.penalty_terms(g)
    assert terms[torch.float32].keys() == terms[torch.float16].keys() and terms[torch.float16]
    for key, value in terms[torch.float16].items():
        assert torch.isfinite(value), key
        torch.testing.assert_close(value.double(), terms[torch.float32][key].double(), rtol=2e-2, atol=0)


# ------------------------------------------------------------------------------------------------ inputs


def _cayley() -> OrthogonalConv2d:
    torch.manual_seed(0)
    return OrthogonalConv2d(2, 2, 3, method="cayley_fft", input_size=(4, 4))


@pytest.mark.parametrize("make", [lambda: _cayley(), lambda: _cayley().to_plain(), lambda: OrthogonalConv2d(2, 2, 3),
                                  lambda: OrthogonalConv1d(2, 2, 3, bias=False),
                                  lambda: OrthogonalConvTranspose2d(2, 2, 2, stride=2), lambda: OrthogonalLinear(2, 2)],
                         ids=["cayley_fft", "FourierConv", "bcop", "conv1d-no-bias", "transposed", "linear"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_a_non_float_input_is_refused_with_the_layer_named(make, dtype):
    """An integer, boolean or complex input to an orthogonal layer: the Fourier-domain ones (cayley_fft and its
    frozen FourierConv) cast it to float32 and back, returning a silently truncated integer (or boolean) output
    and dropping a complex input's imaginary part; the others failed inside torch without naming the layer."""
    layer = make()
    shape = (1, 2) if isinstance(layer, OrthogonalLinear) else (1, 2, 4) if isinstance(layer, OrthogonalConv1d) \
        else (1, 2, 4, 4)
    x = torch.ones(shape).to(dtype)
    with pytest.raises(orthofx.LayerArgumentError, match=rf"{type(layer).__name__}.*real floating-point.*"
                                                         rf"{str(dtype).replace('torch.', '')}"):
        layer(x)


def test_cayley_layer_in_a_transformed_model_refuses_an_integer_input():
    """Through orthofx.transform and orthofx.freeze: the transformed model's cayley_fft layer (train and eval) and
    its frozen FourierConv named themselves instead of returning int64 outputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1))
    policy = {"rules": [{"match": {"type": "Conv2d"}, "apply": "orthogonal_conv", "with": {"method": "cayley_fft"}}]}
    gm = orthofx.transform(model, policy, example_inputs=(torch.randn(1, 2, 4, 4),))
    tokens = torch.randint(0, 3, (1, 2, 4, 4))
    for module in (gm.train(), gm.eval(), orthofx.freeze(gm)):
        with pytest.raises(orthofx.LayerArgumentError, match="at '0'.*real floating-point.*int64"):
            module(tokens)


# ------------------------------------------------------------------------------------------------ nearest init


def _dense_kernel_distance(layer: OrthogonalConv2d, conv: nn.Conv2d) -> float:
    """||K - K0||_F / ||K0||_F in float64, from the layer's explicit kernel and the conv's weight."""
    k0 = conv.weight.detach().double()
    return float((layer.weight.detach().double() - k0).norm() / k0.norm())


def test_nearest_fit_of_a_float16_conv_moves_towards_it():
    """from_conv(fit_steps=...) ran Adam on the float16 parameters themselves: there its eps (1e-8) is 0 and the
    squared gradients underflow, every step was NaN and the fit kept its start (relative distance 1.7505 after
    50 steps against 1.45 in float32). The fit now runs on float32 copies and rounds the result once: it gets as
    close (measured here in float64 from the explicit kernel) as the float32 fit of the same weights."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1).half()
    start = OrthogonalConv2d.from_conv(conv, fit_steps=0)
    fitted = OrthogonalConv2d.from_conv(conv, fit_steps=50)
    reference = OrthogonalConv2d.from_conv(copy.deepcopy(conv).float(), fit_steps=50)
    assert fitted.matrix.dtype == fitted.proj_a.dtype == torch.float16
    got, want, before = (_dense_kernel_distance(m, conv) for m in (fitted, reference, start))
    assert want < before - 0.2  # the fit matters here
    assert got < want + 2e-2, (got, want, before)  # another trajectory (rounded start), as close


def test_nearest_cayley_fit_of_a_float16_conv_moves_towards_it():
    """The same for method='cayley_fft' (its fit also ran Adam on the float16 kernel): the operators' distance is
    that of the float32 fit."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1).half()
    fitted = OrthogonalConv2d.from_conv(conv, method="cayley_fft", input_size=(6, 6), fit_steps=30)
    reference = OrthogonalConv2d.from_conv(copy.deepcopy(conv).float(), method="cayley_fft", input_size=(6, 6),
                                           fit_steps=30)
    start = OrthogonalConv2d.from_conv(conv, method="cayley_fft", input_size=(6, 6), fit_steps=0)
    assert fitted.cayley_kernel.dtype == torch.float16
    assert reference.init_error < start.init_error - 0.1
    assert fitted.init_error < reference.init_error + 2e-2, (fitted.init_error, reference.init_error,
                                                              start.init_error)


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 0.01), (torch.float16, 0.002)])
def test_srip_of_a_half_precision_weight_has_the_float64_gradient(dtype, tolerance):
    # Gram - I of a near-orthogonal weight, formed in bfloat16, lost most of its bits: the gradient was 3.4 % off
    from orthofx.passes.pre_svd import srip
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64, generator=generator))
    weight = (q + 0.01 * torch.randn(32, 32, dtype=torch.float64, generator=generator)).to(dtype).requires_grad_(True)
    reference = weight.detach().double().requires_grad_(True)
    srip(reference).backward()
    value = srip(weight)
    value.backward()
    assert value.dtype == dtype
    error = (weight.grad.double() - reference.grad).norm() / reference.grad.norm()
    assert error < tolerance
