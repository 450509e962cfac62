"""Small fixes of session 37, each checked against an independent reference."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import orthofx


def _keep_rule():
    return {"rules": [{"match": {"type": "Conv2d"}, "apply": "orthogonal_conv", "with": {"padding": "keep"}}]}


def _dense_jacobian64(layer: nn.Module, shape) -> torch.Tensor:
    layer = layer.double()
    x = torch.randn(shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda t: layer(t), x)
    return jac.reshape(jac.shape[:jac.dim() // 2].numel(), x.numel())


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_keep_status_of_a_conv_padding_nothing_does_not_depend_on_padding_mode(padding_mode):
    # padding=0 adds no zero and wraps nothing: the same layer under either mode, the rows of the circular layer
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=0, padding_mode=padding_mode))
    gm = orthofx.transform(model, _keep_rule(), example_inputs=(torch.randn(1, 3, 8, 8),))
    status = orthofx.manifest_of(gm).changes[0].status
    assert status.startswith("hard (rows orthonormal: no padding"), status
    jac = _dense_jacobian64(gm.get_submodule("0"), (1, 3, 8, 8))
    assert jac.shape == (3 * 6 * 6, 3 * 8 * 8)
    assert torch.allclose(jac @ jac.T, torch.eye(jac.shape[0], dtype=torch.float64), atol=1e-10)


def test_keep_status_of_a_circular_conv_extending_the_output_is_not_hard():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=2, padding_mode="circular"))
    gm = orthofx.transform(model, _keep_rule(), example_inputs=(torch.randn(1, 3, 8, 8),))
    assert orthofx.manifest_of(gm).changes[0].status.startswith("orthogonal kernel, not an orthogonal layer")
    jac = _dense_jacobian64(gm.get_submodule("0"), (1, 3, 8, 8))
    sigma = torch.linalg.svdvals(jac)
    assert (sigma - 1).abs().max() > 0.1  # the extended operator is not orthogonal: the status is right to say so


def test_model_eval_after_data_writes_rebuilds_the_cached_kernel():
    # README: writes through param.data bump no version counter; model.eval() after them drops the eval cache
    from orthofx.nn import OrthogonalConv2d
    torch.manual_seed(0)
    model = nn.Sequential(OrthogonalConv2d(4, 4, 3)).eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        before = model(x)
        for name, p in model.named_parameters():
            if not name.endswith("bias"):  # the kernel's parameters (the bias is added as it is)
                p.data.mul_(0.5).add_(0.1)  # an EMA-like write
        stale = model(x)
        model.eval()
        fresh = model(x)
        reference = model.train()(x)  # training mode rebuilds the kernel at every forward
    assert torch.equal(stale, before)  # the documented limitation: the write is not seen
    assert not torch.allclose(fresh, before, atol=1e-4)
    assert torch.allclose(fresh, reference, atol=1e-6)


@pytest.mark.parametrize("kernel", [3, (3, 5), (1, 3), (2, 2)])
@pytest.mark.parametrize("padding", [(0,), (1,), (2,), 1, (1, 2)])
@pytest.mark.parametrize("dilation", [1, (2,)])
def test_keeps_output_size_is_what_torch_computes_for_one_element_tuples(kernel, padding, dilation):
    # torch keeps padding=(1,) / dilation=(2,) as given and applies them to every dimension; the reference is the
    # output shape torch's own conv gives on grids divisible by the stride
    from orthofx.nn.orthogonal import keeps_output_size
    conv = nn.Conv2d(2, 2, kernel, padding=padding, dilation=dilation)
    keeps = all(conv(torch.zeros(1, 2, n, n + 2)).shape[-2:] == (n, n + 2) for n in (8, 9))
    assert keeps_output_size(conv) == keeps


def test_rescale_after_hooks_leaves_float32_results_unscaled_when_a_float16_one_overflows():
    # a float16 NOG result of entries 1 times the scale 2^16 overflows: every other gradient is divided instead and
    # the kernel unscales nothing; the float32 result must then stay the true (unscaled) gradient
    from types import SimpleNamespace
    from orthofx.optim import _rescale_after_hooks
    p32 = nn.Parameter(torch.zeros(2, 2))
    p16 = nn.Parameter(torch.zeros(2, 2, dtype=torch.float16))
    other = nn.Parameter(torch.zeros(2))
    p32.grad, p16.grad = torch.eye(2), torch.eye(2, dtype=torch.float16)  # the hooks' results, unscaled
    other.grad = torch.full((2,), 65536.0)  # scaled, read by no hook
    optimizer = SimpleNamespace(param_groups=[{"params": [p32, p16, other]}], grad_scale=torch.tensor(65536.0))
    _rescale_after_hooks(optimizer, [p32.grad, p16.grad])
    assert optimizer.grad_scale is None
    assert torch.equal(p32.grad, torch.eye(2))
    assert torch.equal(p16.grad, torch.eye(2, dtype=torch.float16))
    assert torch.equal(other.grad, torch.ones(2))


def test_srip_of_a_huge_weight_is_finite_and_near_the_exact_value():
    # the Krylov estimate squares M: unscaled, (M Q)^T (M Q) overflowed float32 past sigma_max(M) ~ 1.8e19
    from orthofx.passes.pre_svd import srip
    torch.manual_seed(0)
    weight = torch.randn(8, 20) * 1e10
    value = srip(weight)
    gram = weight.double() @ weight.double().T - torch.eye(8, dtype=torch.float64)
    exact = torch.linalg.eigvalsh(gram).abs().max()
    assert torch.isfinite(value)
    assert float(value) <= float(exact) * (1 + 1e-5) and float(value) >= 0.99 * float(exact)


def test_eval_mode_penalty_with_gradients_warns_where_every_terms_would_be_overweighted():
    policy = {"rules": [{"match": {"type": "Conv2d"}, "apply": "orth_regularizer", "with": {"every": 2}}]}
    gm = orthofx.transform(nn.Sequential(nn.Conv2d(2, 3, 3), nn.Conv2d(3, 3, 3)), policy)
    gm.eval()
    with pytest.warns(orthofx.OrthofxWarning, match="eval mode with gradients enabled"):
        orthofx.penalty(gm)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            orthofx.penalty(gm)  # a validation pass: no warning
        gm.train()
        orthofx.penalty(gm)  # training: counted, no warning
    every1 = orthofx.transform(nn.Sequential(nn.Conv2d(2, 3, 3)), "lorth").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        orthofx.penalty(every1)  # every: 1 terms are the same either way


class _OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x)


_LINEAR_LORTH = {"rules": [{"match": {"type": "Linear"}, "apply": "orth_regularizer"}]}


def test_a_forward_replaced_by_a_closure_over_the_model_is_refused_on_a_copy_and_captured_in_place():
    import functools
    torch.manual_seed(0)
    x = torch.randn(2, 4)
    model = _OneLinear()
    bound = model.forward
    model.forward = functools.wraps(bound)(lambda *a, **k: bound(*a, **k) * 2)  # closes over the model itself
    reference = model(x).detach()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # a copy would still call the original: its result would hold the original's weights, with no parameters
    with pytest.raises(orthofx.TransformError, match="inplace=True"):
        orthofx.transform(model, _LINEAR_LORTH, example_inputs=(x,))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    gm = orthofx.transform(model, _LINEAR_LORTH, example_inputs=(x,), inplace=True)
    assert orthofx.manifest_of(gm).capture.mode == "export"  # fx would trace the class's forward, without the * 2
    assert torch.allclose(gm(x), reference) and len(list(gm.parameters())) == 2


def test_a_forward_bound_as_a_method_is_followed_on_a_copy():
    import types
    torch.manual_seed(0)
    x = torch.randn(2, 4)
    own = _OneLinear()
    own.forward = types.MethodType(_OneLinear.forward, own)  # the class's forward: symbolic tracing follows it
    gm = orthofx.transform(own, _LINEAR_LORTH)
    assert orthofx.manifest_of(gm).capture.mode == "fx" and torch.allclose(gm(x), own(x))

    def shifted(self, x):
        return self.fc(x) + 1

    other = _OneLinear()
    other.forward = types.MethodType(shifted, other)  # deepcopy rebinds it to the copy
    gm = orthofx.transform(other, _LINEAR_LORTH, example_inputs=(x,))
    assert orthofx.manifest_of(gm).capture.mode == "export"
    assert torch.allclose(gm(x), other(x)) and len(list(gm.parameters())) == 2
    assert gm.get_submodule("fc").weight is not other.fc.weight
