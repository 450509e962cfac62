"""Regressions found by fuzzing orthofx/nn/isometric.py (the P2 blocks) and the ``isometric_init`` pass.

References are built in the tests: the blocks' formulas written out with dense float64 matrices, dense Jacobians
from ``torch.autograd.functional.jacobian``, and the matrices a seeded generator draws.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import LayerArgumentError
from orthofx.nn.isometric import OrthogonalActivationBlock, ReflectionResidualBlock

BLOCKS = {"activation": (OrthogonalActivationBlock, (4,)), "reflection": (ReflectionResidualBlock, (4, 2))}


# ------------------------------------------------------------------------------------------ block arguments

@pytest.mark.parametrize("cls, args, kwargs, what", [
    (OrthogonalActivationBlock, (0,), {}, "features must be >= 1"),
    (OrthogonalActivationBlock, (2.0,), {}, "features must be a positive integer"),
    (OrthogonalActivationBlock, (4,), {"activation": "tanh"}, "activation 'tanh' does not keep"),
    (OrthogonalActivationBlock, (4,), {"dtype": torch.int32}, "dtype must be a real floating-point"),
    (ReflectionResidualBlock, (0, 1), {}, "features must be >= 1"),
    (ReflectionResidualBlock, (4, None), {}, "hidden must be a positive integer"),
    (ReflectionResidualBlock, (4, 2), {"dtype": torch.complex64}, "dtype must be a real floating-point"),
], ids=["features-0", "features-float", "tanh", "int-dtype", "r-features-0", "hidden-none", "complex-dtype"])
def test_constructor_errors_name_the_block(cls, args, kwargs, what):
    # the messages said "features must be >= 1, got 0" without saying which layer of a model refused it
    with pytest.raises(LayerArgumentError) as info:
        cls(*args, **kwargs)
    assert str(info.value).startswith(f"{cls.__name__}: {what}")


@pytest.mark.parametrize("bias", ["no", "False", None, [True]])
@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_a_bias_that_is_not_a_bool_is_refused(block, bias):
    # bias="no" (truthy) silently built a bias
    cls, args = BLOCKS[block]
    with pytest.raises(LayerArgumentError, match=rf"^{cls.__name__}: bias must be True or False, got"):
        cls(*args, bias=bias)
    for flag in (True, False, 1, 0):  # bool-like values keep working
        assert (cls(*args, bias=flag).bias is not None) is bool(flag)


@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_an_input_of_another_dtype_is_a_layer_argument_error(block):
    # a float64 input to a float32 block failed inside matmul with torch's "expected m1 and m2 to have the same
    # dtype"; under torch.autocast the mixed dtypes are autocast's to handle and must keep working
    cls, args = BLOCKS[block]
    layer = cls(*args)
    with pytest.raises(LayerArgumentError, match=rf"^{cls.__name__}: the input's dtype float64 is not the block's "
                                                 r"float32; convert the input \(x.to\(torch.float32\)\)"):
        layer(torch.randn(3, 4, dtype=torch.float64))
    x = torch.randn(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.to(torch.bfloat16))
    torch.testing.assert_close(y.float(), layer(x), atol=0.1, rtol=0.05)


# ------------------------------------------------------------------------------------------ freeze

def _blocks_model(activation, bias):
    torch.manual_seed(0)
    model = nn.Sequential(OrthogonalActivationBlock(5, activation=activation, bias=bias),
                          ReflectionResidualBlock(5, 3, bias=bias), nn.Linear(5, 2)).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_()
    return model


def _by_formula(model, x):
    """The model's output written out from its dense matrices: ``sigma(x Q^T + b)`` then ``y - 2 relu(y W^T + c)
    W``, then the head."""
    block, reflection, head = model
    q, w = block.weight.detach(), reflection.weight.detach()
    z = x @ q.T + (0 if block.bias is None else block.bias.detach())
    y = {"abs": z.abs(), "relu": z.clamp_min(0), "identity": z}[block.activation]
    h = y @ w.T + (0 if reflection.bias is None else reflection.bias.detach())
    y = y - 2 * h.clamp_min(0) @ w
    return y @ head.weight.detach().T + head.bias.detach()


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("activation", ["abs", "identity", "relu"])
def test_freeze_bakes_the_blocks_into_plain_layers(activation, bias):
    # freeze refused a model holding the blocks ("holds no orthofx layer"), and froze a transformed one with the
    # blocks left in it (a QR factorisation per call, no plain layers)
    model = _blocks_model(activation, bias)
    x = torch.randn(6, 5, dtype=torch.float64)
    transformed = orthofx.transform(model, "lorth", example_inputs=(x,))
    for frozen in (orthofx.freeze(model), orthofx.freeze(transformed)):
        kinds = {type(m) for m in frozen.modules()}
        assert not kinds & {OrthogonalActivationBlock, ReflectionResidualBlock}
        assert nn.Linear in kinds
        for copied in (frozen, copy.deepcopy(frozen), pickle.loads(pickle.dumps(frozen))):
            torch.testing.assert_close(copied(x), _by_formula(model, x), atol=1e-12, rtol=0)
    # the two blocks of the frozen model still have an orthogonal Jacobian, dense float64
    body = nn.Sequential(*list(model.children())[:2])
    frozen = orthofx.freeze(body)
    point = torch.randn(5, dtype=torch.float64)
    j = torch.autograd.functional.jacobian(frozen, point)
    if activation == "relu":  # a partial isometry
        torch.testing.assert_close(j @ j.T @ j, j, atol=1e-10, rtol=0)
    else:
        torch.testing.assert_close(j.T @ j, torch.eye(5, dtype=torch.float64), atol=1e-10, rtol=0)


def test_to_plain_keeps_frozen_parameters_frozen():
    block = ReflectionResidualBlock(4, 2)
    block.raw.requires_grad_(False)
    plain = block.to_plain()
    assert {n: p.requires_grad for n, p in plain.named_parameters()} == {
        "hidden.weight": False, "hidden.bias": True, "back.weight": False}
    torch.testing.assert_close(plain.get_submodule("back").weight, block.weight.T, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ isometric_init

def _init(site, **params):
    return {"match": {"name": site}, "apply": "isometric_init", "with": params}


def test_tied_weights_that_need_different_matrices_are_refused():
    # the second write replaced the first layer's matrix: its Change said scale sqrt(2) for a weight of scale 1
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    model = nn.Sequential(first, nn.ReLU(), second)
    policy = {"rules": [_init("0", activation="relu"), _init("2")]}
    with pytest.raises(orthofx.PlanError, match=r"2 shares its weight with 0.*scale 1 .*vs 1\.414"):
        orthofx.transform(model, policy)


def test_a_tied_weight_is_written_once_and_the_draws_go_on():
    # the tied weight was drawn twice (the second draw replacing the matrix the first Change described), and the
    # next layer got the third draw of the seeded generator instead of the second
    first, second, third = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    model = nn.Sequential(first, second, third)
    policy = {"rules": [{"match": {"type": "Linear"}, "apply": "isometric_init", "with": {"seed": 7}}]}
    gm = orthofx.transform(model, policy)
    generator = torch.Generator().manual_seed(7)
    draws = []
    for _ in range(2):  # Haar draws: the sign-fixed Q factor of a float64 Gaussian matrix from the seeded generator
        q, r = torch.linalg.qr(torch.randn(4, 4, generator=generator, dtype=torch.float64))
        draws.append(q * torch.sign(torch.diagonal(r)))
    torch.testing.assert_close(gm.get_submodule("0").weight.detach().double(), draws[0], atol=1e-7, rtol=0)
    assert gm.get_submodule("1").weight is gm.get_submodule("0").weight
    torch.testing.assert_close(gm.get_submodule("2").weight.detach().double(), draws[1], atol=1e-7, rtol=0)
    changes = orthofx.manifest_of(gm).changes
    assert "weight tied to 0" in changes[1].what
    assert changes[1].before == changes[0].before


@pytest.mark.parametrize("build", [
    lambda bias: orthofx.nn.OrthogonalConv2d(4, 4, 3, bias=bias),
    lambda bias: orthofx.nn.OrthogonalConv1d(4, 4, 3, bias=bias, method="cayley_fft", input_size=8),
    lambda bias: orthofx.nn.OrthogonalConvTranspose2d(4, 4, 3, bias=bias),
    lambda bias: orthofx.nn.OrthogonalLinear(4, 3, bias=bias),
])
def test_orthogonal_layers_refuse_a_bias_that_is_not_a_bool(build):
    # bias="no" is truthy: every orthogonal layer built a bias without a word
    with pytest.raises(LayerArgumentError, match=r"Orthogonal\w+: bias must be True or False, got 'no'"):
        build("no")
    assert build(0).bias is None and build(True).bias is not None
