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
