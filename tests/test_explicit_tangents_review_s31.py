"""Session 31 review of the Jacobian estimate's written-out tangents (commit 5afa570) and of route ``jvp``.

* An eval-mode BatchNorm / InstanceNorm ran the estimate on its own running statistics (5afa570 stopped copying
  them): the estimate's graph saved them, a later training-mode forward of the layer updated them in place
  without a version bump, and the estimate's gradient came out silently wrong; a user's in-place edit made its
  backward fail. Reference: the dense float64 Jacobian of a copy of the block taken before. (The InstanceNorm
  cases passed on 5afa570 too: its kernel normalises with repeated copies of the statistics; kept as guards.)
* A normalisation without affine part (InstanceNorm2d's default, BatchNorm / LayerNorm without one, or
  ``F.layer_norm`` without weight) followed by an in-place op (``nn.ReLU(inplace=True)``): the written-out
  tangent's backward saved the normalised output, which the in-place op then wrote, and the estimate's backward
  failed (5afa570; also inside a JacobianProbe). Reference: the dense float64 Jacobian's value and central
  differences of it.
* Route ``jvp`` through an op without a reliable forward-mode derivative (``torch.linalg.eigh``) raised the
  estimator's internal fallback signal, a bare ``NotImplementedError`` naming no block. Reference: torch's
  reverse-mode Jacobian of the block exists (only the route is wrong), and route ``auto`` still falls back to
  the dense Jacobian's value.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from references import central_difference

import orthofx
from orthofx import metrics
from orthofx.errors import ArgumentError, LayerArgumentError

D = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def dense_full_estimate(block: nn.Module, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``||J^T J v - v||^2`` from the dense Jacobian of ``block`` at ``x`` (differentiable in its parameters)."""
    y = block(x)
    J = torch.autograd.functional.jacobian(block, x, create_graph=True).reshape(y.numel(), x.numel())
    v = v.reshape(-1)
    return (J.T @ (J @ v) - v).square().sum()


def eval_norm_blocks():
    torch.manual_seed(0)
    bn = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh())
    inorm = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.InstanceNorm1d(3, affine=True, track_running_stats=True),
                          nn.Tanh())
    blocks = {"batchnorm": (bn, (6, 4)), "instancenorm": (inorm, (3, 2, 5))}
    out = []
    for name, (block, shape) in blocks.items():
        block = block.to(D)
        with torch.no_grad():
            block[1].running_mean.uniform_(-1, 1)
            block[1].running_var.uniform_(0.2, 3)
        out.append((name, block.eval(), torch.randn(*shape, dtype=D)))
    return out


@pytest.mark.parametrize("name, block, x", eval_norm_blocks(), ids=lambda v: v if isinstance(v, str) else "")
def test_eval_norm_estimate_gradient_survives_a_later_training_forward(name, block, x):
    """The estimate of an eval-mode norm block, then a training-mode forward of the same block (running
    statistics updated in place) before the estimate's backward: the gradient is the one at the statistics the
    estimate used (5afa570: off by about 0.4, silently)."""
    seed = 7
    reference_block = copy.deepcopy(block)
    v = metrics._rademacher(x, torch.Generator().manual_seed(seed))
    expected = torch.autograd.grad(dense_full_estimate(reference_block, x, v), list(reference_block.parameters()))
    value = metrics.jacobian_isometry(block, x, route="jvp", generator=torch.Generator().manual_seed(seed))
    block.train()(3 * x + 1)  # updates running_mean / running_var in place
    assert not torch.equal(block[1].running_var, reference_block[1].running_var)
    grads = torch.autograd.grad(value, list(block.parameters()))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name, block, x", eval_norm_blocks(), ids=lambda v: v if isinstance(v, str) else "")
def test_eval_norm_estimate_backward_after_an_in_place_edit_of_the_statistics(name, block, x):
    """A user's in-place edit of the running statistics between the estimate and its backward (5afa570: "one of
    the variables needed for gradient computation has been modified by an inplace operation")."""
    seed = 3
    reference_block = copy.deepcopy(block)
    v = metrics._rademacher(x, torch.Generator().manual_seed(seed))
    expected = torch.autograd.grad(dense_full_estimate(reference_block, x, v), list(reference_block.parameters()))
    value = metrics.jacobian_isometry(block, x, route="jvp", generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        block[1].running_var.mul_(2.0)
    grads = torch.autograd.grad(value, list(block.parameters()))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


class LayerNormInPlace(nn.Module):
    """``F.layer_norm`` without weight and bias, then the affine part in place (a LayerNorm variant's code)."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(width) + 0.5)
        self.bias = nn.Parameter(torch.randn(width) / 4)

    def forward(self, x):
        out = nn.functional.layer_norm(x, x.shape[-1:])
        out.mul_(self.weight)
        return out.add_(self.bias)


def in_place_after_norm_blocks():
    torch.manual_seed(1)
    blocks = {
        "instancenorm": (nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.InstanceNorm2d(3), nn.ReLU(inplace=True),
                                       nn.Conv2d(3, 2, 1)), (2, 2, 4, 4)),
        "batchnorm": (nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, affine=False), nn.ReLU(inplace=True),
                                    nn.Linear(5, 3)), (6, 4)),
        "layernorm": (nn.Sequential(nn.Linear(4, 5), LayerNormInPlace(5), nn.Tanh()), (3, 4)),
    }
    return [(name, block.to(D), torch.randn(*shape, dtype=D)) for name, (block, shape) in blocks.items()]


@pytest.mark.parametrize("name, block, x", in_place_after_norm_blocks(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_in_place_op_after_a_normalisation_without_affine_part(name, block, x):
    seed = 5
    v = metrics._rademacher(x, torch.Generator().manual_seed(seed))

    def reference():
        return dense_full_estimate(copy.deepcopy(block), x, v)

    value = metrics.jacobian_isometry(block, x, route="jvp", generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(value, reference(), rtol=1e-9, atol=1e-11)
    params = list(block.parameters())
    grads = torch.autograd.grad(value, params, allow_unused=True)  # a last bias does not enter J
    scale = max(1.0, abs(float(value)))
    for p, grad in zip(params, grads):
        grad = torch.zeros_like(p) if grad is None else grad
        for index in range(0, p.numel(), max(1, p.numel() // 2)):
            expected = central_difference(reference, p.view(-1), index, eps=1e-5)
            assert float(grad.reshape(-1)[index]) == pytest.approx(expected, rel=1e-5, abs=1e-8 * scale)


def test_probe_trains_an_instancenorm_relu_inplace_block():
    """The same through a JacobianProbe: one training step's backward runs, and the penalty's gradient is the
    direct estimate's (checked against the dense Jacobian above)."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.InstanceNorm2d(4), nn.ReLU(inplace=True),
                          nn.Conv2d(4, 3, 3, padding=1)).to(D)
    x = torch.randn(2, 3, 5, 5, dtype=D)
    probe = orthofx.nn.JacobianProbe(copy.deepcopy(block), seed=0)
    probe(x)
    (grad,) = torch.autograd.grad(probe.penalty(), [probe.block[0].weight])
    v = metrics._rademacher(x, torch.Generator().manual_seed(0))
    (expected,) = torch.autograd.grad(dense_full_estimate(block, x, v), [block[0].weight])
    torch.testing.assert_close(grad, probe.penalty_weight * expected, rtol=1e-8, atol=1e-10)


class Whiten(nn.Module):
    """Covariance whitening by eigh: x V (V the eigenvectors of the batch covariance)."""

    def forward(self, x):
        cov = x.T @ x / x.shape[0] + torch.eye(x.shape[1], dtype=x.dtype)
        _, vectors = torch.linalg.eigh(cov)
        return x @ vectors


class WhitenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.cov = nn.Sequential(nn.Linear(4, 4), Whiten())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.cov(self.fc(x)))


def test_jvp_route_through_eigh_names_the_probe_block_op_and_fix():
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    # torch alone: the block's Jacobian exists (reverse mode) and is finite, so only the route is wrong
    assert torch.isfinite(torch.autograd.functional.jacobian(WhitenNet().cov, x)).all()
    policy = {"rules": [{"match": {"kind": "block", "name": "cov"}, "apply": "jacobian_isometry",
                         "with": {"route": "jvp"}}]}
    gm = orthofx.transform(WhitenNet(), policy, example_inputs=(x,))
    gm.train()
    with pytest.raises(LayerArgumentError) as info:
        gm(x)
    message = str(info.value)
    assert "'cov'" in message and "linalg_eigh" in message and "'jvp'" in message
    assert "'auto'" in message and "'double_vjp'" in message


def test_built_in_dbn_cnn_with_route_jvp_raises_an_orthofx_error_naming_the_dbn_block():
    import orthofx.models as models
    torch.manual_seed(0)
    x = models.example_input("dbn_cnn", batch=4)
    policy = {"rules": [{"match": {"kind": "block", "name": "dbn"}, "apply": "jacobian_isometry",
                         "with": {"route": "jvp"}}]}
    gm = orthofx.transform(models.get("dbn_cnn"), policy, example_inputs=(x,))
    gm.train()
    with pytest.raises(orthofx.OrthofxError, match=r"(?s)'dbn'.*eigh.*'double_vjp'"):
        gm(x)


def test_direct_jvp_route_through_eigh_raises_an_argument_error_and_auto_still_falls_back():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(4, 4), Whiten()).to(D)
    x = torch.randn(6, 4, dtype=D)
    with pytest.raises(ArgumentError, match=r"(?s)linalg_eigh.*'auto'.*'double_vjp'") as info:
        metrics.jacobian_isometry(block, x, route="jvp")
    assert isinstance(info.value, NotImplementedError)  # what a missing forward-mode formula raises, as before
    value, route = metrics._jacobian_isometry(block, x, generator=torch.Generator().manual_seed(2))
    assert route == "double_vjp"
    v = metrics._rademacher(x, torch.Generator().manual_seed(2))
    torch.testing.assert_close(value, dense_full_estimate(block, x, v), rtol=1e-9, atol=1e-11)
