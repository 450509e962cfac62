"""Mixed precision review (session 37): GradScaler with half-precision weights and fused optimizers around the
optimizer hooks, and skipped (inf) steps. References are float64 recomputations of the documented maths (the true
gradient ``scaled grad / scale`` in float64, the tangent projection, Adam's first step, the polar retraction) or
plain torch without orthofx."""

import copy

import pytest
import torch

import orthofx
from orthofx.nn import stiefel

SCALE = 2.0 ** 16


def _square_isometric(dtype):
    torch.manual_seed(0)
    return orthofx.transform(torch.nn.Sequential(torch.nn.Linear(8, 8)), "isometric").to(dtype)


def _scaled_step(gm, optimizer, factor, scale=SCALE):
    """One GradScaler step of ``factor * ||gm(x) - t||^2 / n``; returns the true gradients (float64) and the weights
    before the step."""
    g = torch.Generator().manual_seed(1)
    dtype = next(gm.parameters()).dtype
    x, t = torch.randn(16, 8, generator=g).to(dtype), torch.randn(16, 8, generator=g)
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    scaler.scale((gm(x).float() - t).square().mean() * factor).backward()
    grads = {n: p.grad.detach().double() / scale for n, p in gm.named_parameters()}
    scaler.step(optimizer)
    scaler.update()
    return grads, before


def _adam_first_step_reference(w0, grad, lr=1e-2, eps=1e-8):
    """Float64: project, Adam's first step ``-lr g / (|g| + eps)`` (bias-corrected moments), project the step and
    retract from ``w0`` (the Riemannian hook's maths, orthofx.passes.riemannian)."""
    p = stiefel.tangent_projection(w0, grad)
    d = -lr * p / (p.abs() + eps)
    return stiefel.retract(w0, stiefel.tangent_projection(w0, d), "polar")


@pytest.mark.parametrize("factor", [1e-5, 1e-6])
def test_float16_riemannian_step_under_grad_scaler_keeps_small_gradients(factor):
    # _unscale_for_hooks divided every float16 gradient in place by 2^16 before the hooks: true gradients below
    # 2^-14 lost bits and below 2^-24 became 0 (weights 4e-3 to 7e-3 off a step of 1e-2)
    gm = _square_isometric(torch.float16)
    optimizer = torch.optim.Adam(gm.parameters(), lr=1e-2, fused=True)
    orthofx.attach(optimizer, gm)
    grads, before = _scaled_step(gm, optimizer, factor)
    expected = _adam_first_step_reference(before["0.weight"].double(), grads["0.weight"])
    weight = gm.get_parameter("0.weight").detach().double()
    assert (weight - expected).abs().max() < 1e-3          # float16 weights near 0.35: 1 ulp is 2.4e-4
    assert (weight - before["0.weight"].double()).abs().max() > 5e-3   # it moved by about lr


@pytest.mark.parametrize("factor", [1e-5, 1e-6])
def test_float16_parameters_no_hook_reads_step_as_plain_torch_under_grad_scaler(factor):
    # the bias, which no hook reads, steps exactly as plain torch steps it (its fused kernel unscales in float32)
    gm = _square_isometric(torch.float16)
    plain = torch.nn.Linear(8, 8).half()
    plain.load_state_dict(gm.get_submodule("0").state_dict())
    optimizer = torch.optim.Adam(gm.parameters(), lr=1e-2, fused=True)
    orthofx.attach(optimizer, gm)
    _scaled_step(gm, optimizer, factor)
    reference_optimizer = torch.optim.Adam(plain.parameters(), lr=1e-2, fused=True)
    _scaled_step(torch.nn.Sequential(plain), reference_optimizer, factor)
    assert torch.equal(gm.get_parameter("0.bias").detach(), plain.bias.detach())


def test_float16_grad_scaler_with_a_large_scaled_gradient_unscales_before_the_hooks():
    # ||s G||_F beyond half of float16's range: the projection of the scaled gradient could overflow, so the
    # gradients are divided before the hooks as before (exact: powers of two, normal numbers)
    gm = _square_isometric(torch.float16)
    optimizer = torch.optim.Adam(gm.parameters(), lr=1e-2, fused=True)
    orthofx.attach(optimizer, gm)
    seen = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(getattr(opt, "grad_scale", None)))
    grads, before = _scaled_step(gm, optimizer, 1.0)  # max |s G| 22320, ||s G||_F 69966
    assert seen == [None]  # orthofx's pre-hook (registered first) unscaled the gradients for the kernel
    expected = _adam_first_step_reference(before["0.weight"].double(), grads["0.weight"])
    weight = gm.get_parameter("0.weight").detach().double()
    assert torch.isfinite(weight).all() and (weight - expected).abs().max() < 1e-3


def test_float32_grad_scaler_hooks_still_see_unscaled_gradients():
    # float32 weights keep the old path bit for bit: the fused step equals the unfused one (which GradScaler
    # unscales before optimizer.step)
    results = []
    for fused in (False, True):
        gm = _square_isometric(torch.float32)
        optimizer = torch.optim.SGD(gm.parameters(), lr=0.5, momentum=0.9, fused=fused)
        orthofx.attach(optimizer, gm)
        for factor in (1.0, 1e-3):
            _scaled_step(gm, optimizer, factor)
        results.append({n: p.detach().clone() for n, p in gm.named_parameters()})
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_an_inf_step_under_grad_scaler_leaves_weights_and_state_alone(dtype):
    gm = _square_isometric(dtype)
    optimizer = torch.optim.Adam(gm.parameters(), lr=1e-2, fused=True)
    handle = orthofx.attach(optimizer, gm)
    _scaled_step(gm, optimizer, 1e-3)
    weights = {n: p.detach().clone() for n, p in gm.named_parameters()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    _scaled_step(gm, optimizer, float("inf"))
    for name, p in gm.named_parameters():
        assert torch.equal(p.detach(), weights[name]), name
    for p, s in optimizer.state.items():
        for key, value in s.items():
            assert torch.equal(value, state[id(p)][key]), key
    assert not any(hook._pre for hook in handle.hooks)


class _LinearEigvalsh(torch.nn.Module):
    """A Pre-SVD linear (NOG + OLR) feeding a covariance's eigenvalues, and a head no hook reads."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 4)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x):
        h = self.a(x)
        f = h.float()
        # the head's gradients ~1e-8: below float16's smallest subnormal at true scale, normal at 2^16
        return torch.linalg.eigvalsh(f.T @ f / x.shape[0] + torch.eye(4)).sum() + 1e-5 * self.head(h).float().sum()


def _nog_olr_step(model, optimizer, factor, scale):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 6, generator=g).half()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    scaler.scale(model(x) * factor).backward()
    grads = {n: p.grad.detach().double() / scale for n, p in model.named_parameters()}
    scaler.step(optimizer)
    return grads, before


def _nog_olr_optimizer(model):
    # the Pre-SVD weight with eps 1, so that Adam's first step -lr g / (|g| + 1) depends on the size of g (the
    # polar factor), and lr 1, above OLR's eta*; the others with torch's defaults
    weight = model.get_parameter("a.weight")
    others = [p for p in model.parameters() if p is not weight]
    return torch.optim.Adam([{"params": [weight], "lr": 1.0, "eps": 1.0}, {"params": others}], lr=1e-2, fused=True)


@pytest.mark.parametrize("scale", [SCALE, 2.0 ** 20])
def test_float16_nog_and_olr_under_grad_scaler(scale):
    # NOG and OLR read true gradients: their weight's gradient is divided for them and their result multiplied
    # back for the kernel; the others stay scaled: plain torch's step (they were divided in float16 too, and
    # gradients of 1e-8 flushed to zero). At 2^20 the polar factor times the scale overflows float16: every
    # gradient is divided before the kernel instead
    torch.manual_seed(0)
    model = _LinearEigvalsh().half()
    plain = copy.deepcopy(model)
    policy = {"rules": [{"match": {"feeds": ["linalg.eigvalsh"]}, "apply": "pre_svd",
                         "with": {"nog": True, "olr": True}}]}
    gm = orthofx.transform(model, policy, example_inputs=(torch.randn(16, 6).half(),))
    optimizer = _nog_olr_optimizer(gm)
    orthofx.attach(optimizer, gm)
    grads, before = _nog_olr_step(gm, optimizer, 1e-3, scale)
    w0 = before["a.weight"].double()
    u, _, vh = torch.linalg.svd(grads["a.weight"], full_matrices=False)
    polar = u @ vh                                                      # NOG, float64
    a, b, c = float(w0.flatten() @ w0.flatten()), float(polar.flatten() @ w0.flatten()), float(polar.square().sum())
    eta = a * b / (a * c + 2 * b * b)                                   # OLR, float64
    assert 0 < eta < 1.0
    expected = w0 - eta * polar / (polar.abs() + 1.0)
    weight = gm.get_parameter("a.weight").detach().double()
    torch.testing.assert_close(weight, expected, rtol=0, atol=1e-3)   # float16 near 0.4: 1 ulp is 2.4e-4
    assert (weight - w0).abs().max() > 2e-2
    if scale == SCALE:
        reference = _nog_olr_optimizer(plain)
        _nog_olr_step(plain, reference, 1e-3, scale)
        for name in ("head.weight", "head.bias", "a.bias"):
            assert torch.equal(gm.get_parameter(name).detach(), plain.get_parameter(name).detach()), name
