"""Audit tests of orthofx/nn/isometric.py (OrthogonalActivationBlock, ReflectionResidualBlock).

The Jacobians are compared with dense float64 Jacobians from ``torch.autograd.functional.jacobian`` and with
matrices built in the test from the blocks' documented formulas; the older tests are in tests/test_riemannian.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from orthofx.errors import LayerArgumentError
from orthofx.nn.isometric import OrthogonalActivationBlock, ReflectionResidualBlock


def _blocks(dtype=torch.float64):
    torch.manual_seed(0)
    a = OrthogonalActivationBlock(6, dtype=dtype)
    r = ReflectionResidualBlock(6, 4, dtype=dtype)
    with torch.no_grad():
        a.bias.normal_()
        r.bias.normal_()
    return a, r


def test_jacobians_match_the_documented_formulas_float64():
    a, r = _blocks()
    x = torch.randn(6, dtype=torch.float64)
    q = a.weight.detach()
    z = q @ x + a.bias.detach()
    expected = torch.diag(torch.sign(z)) @ q  # J = diag(sigma'(Qx + b)) Q
    torch.testing.assert_close(torch.autograd.functional.jacobian(a, x), expected, atol=1e-12, rtol=0)
    w = r.weight.detach()
    d = torch.diag((w @ x + r.bias.detach() > 0).double())
    expected = torch.eye(6, dtype=torch.float64) - 2 * w.T @ d @ w  # a reflection
    j = torch.autograd.functional.jacobian(r, x)
    torch.testing.assert_close(j, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(j @ j, torch.eye(6, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_blocks_trace_with_plain_torch_fx(dtype):
    """A model holding the blocks is traceable by torch.fx.symbolic_trace (the half-precision branch of the QR
    factorisation must not branch on a traced dtype), and the trace computes the same outputs."""
    a, r = _blocks()
    model = nn.Sequential(a, r, nn.Linear(6, 3, dtype=torch.float64)).to(dtype)
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(5, 6, dtype=torch.float64).to(dtype)
    torch.testing.assert_close(gm(x), model(x), atol=0, rtol=0)
    gm(x).sum().backward()
    assert gm.get_submodule("0").raw.grad is not None and gm.get_submodule("1").raw.grad is not None


@pytest.mark.parametrize("block", [lambda: OrthogonalActivationBlock(4), lambda: ReflectionResidualBlock(4, 2)],
                         ids=["activation", "reflection"])
@pytest.mark.parametrize("shape", [(3, 5), (5,), (3, 4, 1), ()], ids=["5-features", "1d-5", "trailing-1", "0d"])
def test_wrong_input_size_is_a_layer_argument_error(block, shape):
    layer = block()
    with pytest.raises(LayerArgumentError) as info:
        layer(torch.randn(shape))
    message = str(info.value)
    assert message.startswith(type(layer).__name__)
    assert "(..., 4)" in message and f"got shape {tuple(shape)}" in message


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.bool, "float32"])
@pytest.mark.parametrize("cls, args", [(OrthogonalActivationBlock, (4,)), (ReflectionResidualBlock, (4, 2))],
                         ids=["activation", "reflection"])
def test_non_real_floating_dtype_is_a_layer_argument_error(cls, args, dtype):
    with pytest.raises(LayerArgumentError, match="dtype must be a real floating-point torch.dtype"):
        cls(*args, dtype=dtype)


def test_batched_and_non_contiguous_inputs_are_per_sample():
    a, r = _blocks()
    x = torch.randn(6, 3, 2, dtype=torch.float64).permute(2, 1, 0)  # (2, 3, 6), not contiguous
    assert not x.is_contiguous()
    for block in (a, r):
        y = block(x)
        assert y.shape == (2, 3, 6)
        loop = torch.stack([torch.stack([block(x[i, j]) for j in range(3)]) for i in range(2)])
        torch.testing.assert_close(y, loop, atol=1e-12, rtol=0)
