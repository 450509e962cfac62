"""Dtype fixes of session 46, each against a reference written here (plain torch layers, the frozen forms,
float64 computations, the same call with Python scalars):

* OrthogonalActivationBlock under ``torch.autocast`` returns what its frozen form and an ``nn.Linear`` + activation
  return (autocast's dtype: the bias was added in float32 after the half-precision product, promoting the output);
  ReflectionResidualBlock's hidden units are autocast's dtype too, so both blocks equal their frozen forms there.
* ``cayley_fft`` layers and their frozen ``FourierConv`` refuse an input of another dtype than theirs outside
  autocast, as ``nn.Conv2d`` and the other orthofx layers do (they ran at the input's precision without a word).
* numpy and 0-d tensor scalars are read like Python numbers by ConvNorm (eps, momentum, max_running_grids),
  eigh_stable / svd_stable (taylor_order, clamp_gap), the Newton-Schulz roots (iterations) and JacobianProbe
  (weight); a bool is refused there and as an orthogonal layer's gain (``gain=True`` built a gain of 1).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import orthofx
from orthofx.nn import (ConvNormConv2d, JacobianProbe, OrthogonalActivationBlock, OrthogonalConv2d,
                        OrthogonalLinear, ReflectionResidualBlock, eigh_stable, inv_sqrtm_newton_schulz,
                        sqrtm_newton_schulz, svd_stable)
from orthofx.nn.decompositions import pair_kernel

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def _with_bias(block: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    block.reset_parameters()
    with torch.no_grad():
        block.bias.normal_()  # a zero bias would hide where it is added
    return block


# ------------------------------------------------------------------------------------------ blocks under autocast

@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("activation", ["abs", "identity", "relu"])
@pytest.mark.parametrize("input_dtype", [torch.float32, "autocast"])
def test_activation_block_under_autocast_returns_what_its_frozen_form_and_a_linear_return(dtype, activation,
                                                                                        input_dtype):
    block = _with_bias(OrthogonalActivationBlock(16, activation=activation))
    frozen = block.to_plain()
    linear = nn.Linear(16, 16)
    with torch.no_grad():
        linear.weight.copy_(block.weight)
        linear.bias.copy_(block.bias)
    act = {"abs": torch.abs, "identity": lambda z: z, "relu": torch.relu}[activation]
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    x = x.to(dtype) if input_dtype == "autocast" else x
    with torch.autocast("cpu", dtype=dtype):
        out, plain, reference = block(x), frozen(x), act(linear(x))
    assert out.dtype == plain.dtype == reference.dtype == dtype
    torch.testing.assert_close(out, plain, atol=0, rtol=0)
    torch.testing.assert_close(out, reference, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("input_dtype", [torch.float32, "autocast"])
def test_reflection_block_under_autocast_equals_its_frozen_form(dtype, input_dtype):
    block = _with_bias(ReflectionResidualBlock(16, hidden=5))
    frozen = block.to_plain()
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    x = x.to(dtype) if input_dtype == "autocast" else x
    with torch.autocast("cpu", dtype=dtype):
        out, plain = block(x), frozen(x)
    assert out.dtype == plain.dtype == x.dtype  # the residual keeps the input's dtype, as x - 2 * linear(...)
    torch.testing.assert_close(out, plain, atol=0, rtol=0)


@pytest.mark.parametrize("cls,args", [(OrthogonalActivationBlock, (6,)), (ReflectionResidualBlock, (6, 3))])
def test_blocks_outside_autocast_match_float64_references(cls, args):
    block = _with_bias(cls(*args)).double()
    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    W = block.weight
    if cls is OrthogonalActivationBlock:
        reference = (x @ W.T + block.bias).abs()
    else:
        reference = x - 2 * torch.relu(x @ W.T + block.bias) @ W
    torch.testing.assert_close(block(x), reference, atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------------------------------ Fourier-domain layers

def _cayley(dtype=torch.float32) -> OrthogonalConv2d:
    torch.manual_seed(0)
    return OrthogonalConv2d(4, 4, 3, padding="same", method="cayley_fft", input_size=(8, 8)).to(dtype)


@pytest.mark.parametrize("frozen", [False, True], ids=["cayley_fft", "FourierConv"])
@pytest.mark.parametrize("layer_dtype,input_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64),
                                                     (torch.bfloat16, torch.float32),
                                                     (torch.float32, torch.float16)])
def test_fourier_layers_refuse_an_input_of_another_dtype(frozen, layer_dtype, input_dtype):
    layer = _cayley(layer_dtype)
    layer = layer.to_plain() if frozen else layer
    x = torch.randn(2, 4, 8, 8).to(input_dtype)
    with pytest.raises(orthofx.LayerArgumentError, match=rf"the input's dtype {str(input_dtype)[6:]} is not the "
                                                         rf"layer's {str(layer_dtype)[6:]}; convert the input"):
        layer(x)
    # as nn.Conv2d (and the layer's default method) refuses it
    with pytest.raises(RuntimeError):
        nn.Conv2d(4, 4, 3, padding=1).to(layer_dtype)(x)


@pytest.mark.parametrize("frozen", [False, True], ids=["cayley_fft", "FourierConv"])
def test_fourier_layers_keep_their_dtype_and_autocast(frozen):
    for dtype in (torch.float32, torch.float64):
        layer = _cayley(dtype)
        layer = layer.to_plain() if frozen else layer
        x = torch.randn(2, 4, 8, 8, dtype=dtype)
        assert layer(x).dtype == dtype
    layer = _cayley()
    layer = layer.to_plain() if frozen else layer
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts: a float32 input is no mismatch there
        assert layer(torch.randn(2, 4, 8, 8)).dtype == torch.bfloat16
    for bias in (True, False):  # a frozen bfloat16 layer keeps its symbol in float32 (and its bias in bfloat16)
        torch.manual_seed(0)
        half = OrthogonalConv2d(4, 4, 3, padding="same", method="cayley_fft", input_size=(8, 8),
                                bias=bias).bfloat16()
        x = torch.randn(2, 4, 8, 8).bfloat16()
        out = half(x)
        assert out.dtype == torch.bfloat16
        if frozen:
            torch.testing.assert_close(half.to_plain()(x), out, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ numpy / tensor scalars

def _convnorm(**kwargs) -> ConvNormConv2d:
    torch.manual_seed(0)
    return ConvNormConv2d(nn.Conv2d(4, 4, 3, padding=1), **kwargs)


# exactly representable in float32: the numpy value is the Python one
SCALARS = {"numpy": lambda v: np.float32(v), "numpy64": lambda v: np.float64(v), "tensor": lambda v: torch.tensor(v)}
INTEGERS = {"numpy": lambda v: np.int64(v), "numpy32": lambda v: np.int32(v), "tensor": lambda v: torch.tensor(v)}


@pytest.mark.parametrize("kind", sorted(SCALARS))
def test_convnorm_reads_numpy_and_tensor_scalars_as_python_numbers(kind):
    real, integer = SCALARS[kind], INTEGERS["numpy" if kind == "numpy64" else kind]
    layer = _convnorm(eps=real(2.0 ** -10), momentum=real(0.125), max_running_grids=integer(3))
    python = _convnorm(eps=2.0 ** -10, momentum=0.125, max_running_grids=3)
    assert (layer.eps, layer.momentum, layer.max_running_grids) == (2.0 ** -10, 0.125, 3)
    assert type(layer.eps) is float and type(layer.momentum) is float and type(layer.max_running_grids) is int
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    for mode in (True, False):  # the training forward updates the running filter with the momentum; eval reads it
        torch.testing.assert_close(layer.train(mode)(x), python.train(mode)(x), atol=0, rtol=0)
    layer.max_running_grids = integer(5)  # the attribute's setter reads alike
    assert layer.max_running_grids == 5


@pytest.mark.parametrize("kwargs", [{"eps": True}, {"eps": np.bool_(True)}, {"eps": "1e-5"}, {"momentum": True},
                                    {"momentum": np.float32(1.5)}, {"max_running_grids": True},
                                    {"max_running_grids": np.float32(4)}, {"eps": torch.ones(2)}])
def test_convnorm_still_refuses_bools_strings_and_out_of_range_scalars(kwargs):
    with pytest.raises(orthofx.LayerArgumentError, match=f"{next(iter(kwargs))} must be"):
        _convnorm(**kwargs)


@pytest.mark.parametrize("kind", sorted(INTEGERS))
@pytest.mark.parametrize("fn", [eigh_stable, svd_stable])
def test_stable_decompositions_read_numpy_scalars_as_python_numbers(fn, kind):
    A = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    A = (A + A.T).requires_grad_()
    results = []
    real = SCALARS["numpy" if kind == "numpy32" else kind]
    for taylor_order, clamp_gap in ((5, 0.25), (INTEGERS[kind](5), real(0.25))):
        outputs = fn(A, taylor_order=taylor_order, clamp_gap=clamp_gap)
        grad, = torch.autograd.grad(sum(o.sum() for o in outputs[1:]) + outputs[0].square().sum(), A)
        results.append((*outputs, grad))
    for python, other in zip(*results):
        torch.testing.assert_close(other, python, atol=0, rtol=0)
    lam = torch.tensor([1.0, 1.1, 3.0], dtype=torch.float64)
    torch.testing.assert_close(pair_kernel(lam, INTEGERS[kind](3), real(0.25)), pair_kernel(lam, 3, 0.25))


@pytest.mark.parametrize("kwargs,name", [({"taylor_order": True}, "taylor_order"), ({"clamp_gap": True}, "clamp_gap"),
                                         ({"taylor_order": np.float32(2)}, "taylor_order"),
                                         ({"clamp_gap": np.float32(-1)}, "clamp_gap")])
def test_stable_decompositions_refuse_bools_and_non_integers(kwargs, name):
    with pytest.raises(orthofx.LayerArgumentError, match=f"{name} must be None"):
        eigh_stable(torch.eye(3), **kwargs)


@pytest.mark.parametrize("kind", sorted(INTEGERS))
@pytest.mark.parametrize("fn", [sqrtm_newton_schulz, inv_sqrtm_newton_schulz])
def test_newton_schulz_roots_read_numpy_iterations(fn, kind):
    B = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    A = B @ B.T + torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(fn(A, iterations=INTEGERS[kind](12)), fn(A, iterations=12), atol=0, rtol=0)
    root = sqrtm_newton_schulz(A, iterations=INTEGERS[kind](12))
    torch.testing.assert_close(root @ root, A, atol=1e-9, rtol=0)  # converged: the root itself
    for bad in (True, np.float32(3), 2.0):
        with pytest.raises(orthofx.LayerArgumentError, match="iterations must be an int >= 0"):
            fn(A, iterations=bad)


@pytest.mark.parametrize("kind", sorted(SCALARS))
def test_jacobian_probe_reads_a_numpy_weight(kind):
    probe = JacobianProbe(nn.Linear(4, 4), weight=SCALARS[kind](0.5))
    assert probe.penalty_weight == 0.5 and type(probe.penalty_weight) is float
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(6))
    torch.manual_seed(0)
    probe(x)
    torch.testing.assert_close(probe.penalty(), 0.5 * probe.estimate, atol=0, rtol=0)
    for bad in (True, np.bool_(False), "0.5", -1.0):
        with pytest.raises(orthofx.LayerArgumentError, match="weight must be a finite number >= 0"):
            JacobianProbe(nn.Linear(4, 4), weight=bad)


@pytest.mark.parametrize("build", [lambda gain: OrthogonalLinear(4, 4, gain=gain),
                                   lambda gain: OrthogonalConv2d(4, 4, 3, padding=1, gain=gain)],
                         ids=["OrthogonalLinear", "OrthogonalConv2d"])
def test_orthogonal_layers_refuse_a_bool_gain_and_read_a_numpy_one(build):
    for bad in (True, np.bool_(True), "2.0"):
        with pytest.raises(orthofx.LayerArgumentError, match="gain must be a positive float"):
            build(bad)
    torch.manual_seed(0)
    python = build(2.0)
    for gain in (np.float32(2.0), torch.tensor(2.0), np.int64(2)):
        torch.manual_seed(0)
        layer = build(gain)
        assert layer.gain == 2.0 and type(layer.gain) is float
        torch.testing.assert_close(layer.weight, python.weight, atol=0, rtol=0)
    # the layer is gain times orthogonal: every singular value 2 (float64 reference)
    sv = torch.linalg.svdvals(python.weight.detach().double().reshape(4, -1))
    torch.testing.assert_close(sv, torch.full_like(sv, 2.0), atol=1e-5, rtol=0)


def test_numpy_scalars_do_not_change_the_caller_objects():
    eps = np.float32(2.0 ** -10)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    state = copy.deepcopy(conv.state_dict())
    ConvNormConv2d(conv, eps=eps)
    assert eps == np.float32(2.0 ** -10) and type(eps) is np.float32
    for key, value in state.items():
        torch.testing.assert_close(conv.state_dict()[key], value, atol=0, rtol=0)
