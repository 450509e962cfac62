"""Session 31: the ATen ops of the Jacobian estimate (issue 4: on a GPU the estimate is launch-bound).

The forward-mode route writes out the tangents of convolutions, linear maps and batch-statistics normalisations
(``metrics._ExplicitTangents``), gives the parameters of those layers no zero tangent, and copies only the buffers
a call can write. References: dense float64 Jacobians (``torch.autograd.functional.jacobian``) for the values and
the tangents, central differences for the gradients, and ops counted with a ``TorchDispatchMode``.
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from torch import nn
from references import OpCount, central_difference

import orthofx
from orthofx import metrics
from orthofx.metrics import jacobian_isometry

D = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def dense_jacobian(fn, x):
    y = fn(x)
    return torch.autograd.functional.jacobian(fn, x).reshape(y.numel(), x.numel())


def blocks():
    """Blocks with every written-out layer: convs of 1-3 dims (with and without bias), linear maps, BatchNorm in
    training mode, InstanceNorm, LayerNorm, and a BatchNorm in eval mode (torch's kernel, running statistics)."""
    torch.manual_seed(3)
    conv2d = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.Tanh(),
                           nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2, momentum=None))
    conv1d = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.InstanceNorm1d(3, affine=True), nn.Tanh(),
                           nn.Conv1d(3, 2, 1, bias=False), nn.BatchNorm1d(2, affine=False))
    conv3d = nn.Sequential(nn.Conv3d(2, 2, 3, padding=1, padding_mode="circular"), nn.BatchNorm3d(2), nn.Tanh())
    mlp = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 4, bias=False),
                        nn.LayerNorm(4), nn.Tanh())
    frozen = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh())
    frozen[1].eval()
    with torch.no_grad():
        frozen[1].running_mean.uniform_(-1, 1)
        frozen[1].running_var.uniform_(0.5, 2)
    inputs = {"conv2d": (4, 2, 5, 5), "conv1d": (3, 2, 7), "conv3d": (3, 2, 3, 3, 3), "mlp": (7, 5), "frozen": (7, 5)}
    models = {"conv2d": conv2d, "conv1d": conv1d, "conv3d": conv3d, "mlp": mlp, "frozen": frozen}
    return [(name, models[name].to(D), torch.randn(*inputs[name], dtype=D)) for name in models]


@pytest.mark.parametrize("name, block, x", blocks(), ids=lambda v: v if isinstance(v, str) else "")
def test_written_out_tangents_are_the_jacobians_products(name, block, x):
    """J v from the forward-mode route (written-out tangents inside) against the dense Jacobian, and the buffers
    (running statistics, num_batches_tracked) left as they were."""
    before = copy.deepcopy(block.state_dict())
    f = metrics._Call(block)
    v = torch.randn_like(x)
    with metrics._ComposedOps():
        u, _ = metrics._jvp_products(f, x.detach().requires_grad_(), v, "offdiag", False, "test")
    J = dense_jacobian(copy.deepcopy(block), x)
    torch.testing.assert_close(u.reshape(-1), J @ v.reshape(-1), rtol=1e-10, atol=1e-10)
    for key, value in block.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("kind", metrics.JACOBIAN_KINDS)
@pytest.mark.parametrize("name, block, x", blocks(), ids=lambda v: v if isinstance(v, str) else "")
def test_estimate_and_gradient_against_dense_jacobian_and_central_differences(name, block, x, kind):
    """With one fixed probe the estimate is exactly the probe's quadratic form of the dense Jacobian, and its
    gradient with respect to every parameter matches central differences of that dense value."""
    probes = 2 if kind == "offdiag" else 1
    seed = 11

    def estimate():
        return jacobian_isometry(block, x, probes=probes, kind=kind, route="jvp",
                                 generator=torch.Generator().manual_seed(seed))

    g = torch.Generator().manual_seed(seed)
    vs = [(2 * torch.randint(0, 2, x.shape, generator=g) - 1).to(D).reshape(-1) for _ in range(probes)]

    def reference():
        J = dense_jacobian(copy.deepcopy(block), x)
        A = J.T @ J
        if kind == "full":
            return torch.stack([(A @ v - v).square().sum() for v in vs]).mean()
        if kind == "partial":
            return torch.stack([(J @ (A @ v - v)).square().sum() for v in vs]).mean()
        return torch.stack([(J @ v).square().sum() for v in vs]).var(correction=1) / 2

    value = estimate()
    torch.testing.assert_close(value, reference(), rtol=1e-10, atol=1e-12)
    params = [p for p in block.parameters()]
    grads = torch.autograd.grad(value, params, allow_unused=True)
    checked = 0
    scale = max(1.0, abs(float(value.detach())))
    for p, grad in zip(params, grads):
        grad = torch.zeros_like(p) if grad is None else grad
        for index in range(0, p.numel(), max(1, p.numel() // 3)):
            expected = central_difference(reference, p.view(-1), index, eps=1e-5)
            # round-off of the difference: about |value| 1e-16 / eps
            assert float(grad.reshape(-1)[index]) == pytest.approx(expected, rel=1e-5, abs=1e-8 * scale), \
                (p.shape, index)
            checked += 1
    assert checked >= 6


def estimate_ops(block, x, **kwargs) -> collections.Counter:
    block(x)  # first call (lazy setup, forward-mode decompositions loaded)
    jacobian_isometry(block, x, route="jvp", **kwargs)
    counter = OpCount()
    with counter:
        value = jacobian_isometry(block, x, route="jvp", **kwargs)
        value.backward()
    return counter.counts


def test_conv_batchnorm_estimate_has_no_zero_tangents_and_no_buffer_copies():
    """A conv + BatchNorm block (training mode): two convolutions per conv in the estimate's forward (primal and
    tangent; torch's jvp formula also recorded conv(x, 0) with materialised zeros), no zero tangents for the
    BatchNorm's scale and shift, no copies of its running statistics, and no num_batches_tracked increment.
    (Old code: 3 convolutions, 2 zeros_like, 3 buffer clones and an add_ per block.)"""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    x = torch.randn(2, 3, 6, 6)
    counter = OpCount()
    jacobian_isometry(block, x)
    with counter:
        jacobian_isometry(block, x)  # forward only
    ops = counter.counts
    assert ops["convolution"] == 2
    for absent in ("_efficientzerotensor", "zeros", "zeros_like", "add_"):
        assert ops[absent] == 0, absent
    assert ops["clone"] == 2  # the input's copy, primal and tangent (a block may write its input in place)


def test_momentum_none_batchnorm_reads_nothing_from_the_device():
    """BatchNorm with momentum=None (cumulative average) reads its num_batches_tracked on the host at each
    training forward (float(count)); the estimate's extra forward no longer does (old code: one
    _local_scalar_dense per BatchNorm per estimate), and the layer's count moves once per step, as without the
    probe."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, momentum=None), nn.Tanh())
    x = torch.randn(6, 4)
    ops = estimate_ops(block, x)
    assert ops["_local_scalar_dense"] == 0 and ops["item"] == 0
    probe = orthofx.nn.JacobianProbe(copy.deepcopy(block))
    plain = copy.deepcopy(block)
    probe(x).sum().backward()
    plain(x)
    assert int(probe.block[1].num_batches_tracked) == int(plain[1].num_batches_tracked) == 2
    torch.testing.assert_close(probe.block[1].running_mean, plain[1].running_mean)
    torch.testing.assert_close(probe.block[1].running_var, plain[1].running_var)


def test_linear_estimate_takes_no_product_with_a_zero_weight_tangent():
    """addmm's forward-mode formula multiplied the input by the weight's (zero) tangent: one wasted product per
    Linear; written out, the estimate's forward and backward of a 3-layer MLP take 6 products fewer (and no zero
    tangent for the biases)."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
    x = torch.randn(5, 6)
    ops = estimate_ops(block, x)
    # the estimate: 3 primal, 3 tangent and 3 VJP products, and 15 in its backward (counted on the old code: 12
    # and 18, the three x W' and their gradients more)
    assert ops["mm"] + ops["addmm"] == 24
    assert ops["zeros_like"] == 0


def test_written_out_paths_defer_to_torch_when_a_weight_carries_a_tangent():
    """A weight that carries a tangent (a user's own jvp inside the mode) goes to torch's formula: the tangent then
    includes conv(x, W')."""
    torch.manual_seed(0)
    x, w = torch.randn(2, 3, 5, 5, dtype=D), torch.randn(4, 3, 3, 3, dtype=D)
    vx, vw = torch.randn_like(x), torch.randn_like(w)
    with metrics._ExplicitTangents():
        _, u = torch.func.jvp(lambda a, b: torch.nn.functional.conv2d(a, b), (x, w), (vx, vw))
    expected = torch.nn.functional.conv2d(vx, w) + torch.nn.functional.conv2d(x, vw)
    torch.testing.assert_close(u, expected)


def test_probes_are_the_same_draws_as_int64_bits():
    """The probes come out in the input's dtype directly; they are the draws 2 b - 1 of int64 bits b from the same
    generator (so seeded estimates are unchanged)."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        like = torch.empty(3, 50, dtype=dtype)
        v = metrics._rademacher(like, torch.Generator().manual_seed(4))
        bits = torch.randint(0, 2, like.shape, generator=torch.Generator().manual_seed(4))
        assert v.dtype == dtype and torch.equal(v.double(), (2 * bits - 1).double())
