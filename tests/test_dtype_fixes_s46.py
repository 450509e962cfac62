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
* Review: a frozen bias-free FourierConv knows its layer's dtype (``dtype_marker``); a LorthTerm subclass
  overriding ``value`` counts in the penalty; 0-d numpy arrays, numpy batch_fraction / seed are numbers; a float
  tensor as a layer size is an orthofx error.
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
from orthofx.nn.orthogonal import FourierConv
from orthofx.transform import manifest_of

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


# ------------------------------------------------------------------------------------------ half-precision penalties

HALF = [torch.float16, torch.bfloat16]


def _assert_rounded_once(value: torch.Tensor, reference: float, dtype: torch.dtype) -> None:
    """``value`` is the float64 ``reference`` rounded once to ``dtype``: finite, of that dtype, and within one unit
    in the last place of it (the float32 computation's own error is far below that unit)."""
    assert value.dtype == dtype and bool(torch.isfinite(value))
    ulp = float(torch.finfo(dtype).eps) * 2.0 ** np.floor(np.log2(abs(reference)))
    assert abs(float(value.detach()) - reference) <= ulp, (float(value), reference, dtype)


def _far_from_orthogonal_mlp(dtype: torch.dtype) -> nn.Module:
    """A 256 x 256 layer far from orthogonal (as a pretrained one): L_orth about 2.6e5, past float16's 65504."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    with torch.no_grad():
        model[0].weight.normal_(0, 0.3)
    return model.to(dtype)


def _lorth64(weight: torch.Tensor) -> tuple[float, torch.Tensor]:
    """``||W W^T - I||_F^2`` (``W^T W`` for a tall ``W``) of the weight's values in float64, and its gradient."""
    W = weight.detach().double().requires_grad_()
    G = W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W
    value = (G - torch.eye(G.shape[0], dtype=torch.float64)).square().sum()
    grad, = torch.autograd.grad(value, W)
    return float(value.detach()), grad


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_lorth_penalty_is_the_weighted_value_rounded_once(dtype):
    gm = orthofx.transform(_far_from_orthogonal_mlp(dtype), "lorth", example_inputs=(torch.randn(4, 256).to(dtype),))
    references = {site: _lorth64(gm.get_submodule(site).weight) for site in ("0", "2")}
    assert references["0"][0] > 65504  # rounded to float16 before its weight 0.01, the term was inf
    terms = orthofx.penalty_terms(gm)
    assert sorted(terms) == ["lorth/0", "lorth/2"]
    for site, (value, _) in references.items():
        _assert_rounded_once(terms[f"lorth/{site}"], 0.01 * value, dtype)
    total = orthofx.penalty(gm)
    _assert_rounded_once(total, 0.01 * sum(value for value, _ in references.values()), dtype)
    total.backward()
    for site, (_, grad) in references.items():
        torch.testing.assert_close(gm.get_submodule(site).weight.grad.double(), 0.01 * grad, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_recurrent_lorth_term_is_rounded_once(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.RNN(4, 256, batch_first=True))
    with torch.no_grad():
        model[0].weight_hh_l0.normal_(0, 0.3)
    gm = orthofx.transform(model.to(dtype), {"rules": [{"match": {"type": "RNN"}, "apply": "orth_regularizer",
                                                        "with": {"weight": 0.01}}]})
    value, _ = _lorth64(gm.get_submodule("0").weight_hh_l0)
    assert value > 65504
    terms = orthofx.penalty_terms(gm)
    assert len(terms) == 1
    _assert_rounded_once(next(iter(terms.values())), 0.01 * value, dtype)
    _assert_rounded_once(orthofx.penalty(gm), 0.01 * value, dtype)


def test_srip_term_of_a_half_precision_weight_is_float32_until_weighted():
    from orthofx.passes.pre_svd import SripTerm

    torch.manual_seed(0)
    root = nn.Sequential(nn.Linear(64, 64)).half()
    with torch.no_grad():
        root[0].weight.normal_(0, 40)  # sigma_max(W W^T - I) about 4e5, past float16's 65504
    term = SripTerm("0", "pre_svd", 0.01)
    W = root[0].weight.detach().double()
    reference = float(torch.linalg.eigvalsh(W @ W.T - torch.eye(64, dtype=torch.float64)).abs().max())
    assert reference > 65504
    value, dtype = term.full_precision_value(root)
    assert value.dtype == torch.float32 and dtype == torch.float16
    torch.testing.assert_close(float(value.detach()), reference, rtol=1e-5, atol=0)
    assert term.value(root).dtype == torch.float16  # the term's own value keeps srip's dtype (inf here)


#: The stretch ``c`` of :func:`_stretching_model` per dtype: ``c^2 - 1`` exact in it (399: 9 bits, past bfloat16's 8)
STRETCH = {torch.float16: 20.0, torch.bfloat16: 16.0}


def _stretching_model(dtype: torch.dtype, probe: bool = False) -> nn.Module:
    """A top-level Sequential block ``x -> c P x + b`` (``P`` a signed permutation): ``J^T J - I = (c^2 - 1) I``
    exactly in ``dtype``, so the jacobian preset's estimate (per sample, normalised) is ``(c^2 - 1)^2`` whatever the
    probe draws: for float16 ``399^2 = 159201``, past its 65504."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 16)
    with torch.no_grad():
        signs = torch.where(torch.rand(16) < 0.5, -1.0, 1.0)
        layer.weight.copy_(STRETCH[dtype] * torch.eye(16)[torch.randperm(16)] * signs)
    block = JacobianProbe(layer, weight=0.1, per_sample=True, normalize=True) if probe else nn.Sequential(layer)
    return nn.Sequential(block, nn.Linear(16, 3)).to(dtype)


def _jacobian64(layer: nn.Linear) -> float:
    """The estimate's expectation in float64, ``||J^T J - I||_F^2 / n`` (here every draw's value)."""
    J = layer.weight.detach().double()
    return float((J.T @ J - torch.eye(16, dtype=torch.float64)).square().sum()) / 16


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_jacobian_penalty_is_the_weighted_estimate_rounded_once(dtype):
    model = _stretching_model(dtype)
    x = torch.randn(8, 16).to(dtype)
    gm = orthofx.transform(model, "jacobian", example_inputs=(x,))
    gm.train()
    gm(x)
    assert isinstance(gm.get_submodule("0"), JacobianProbe)
    reference = 0.1 * _jacobian64(gm.get_submodule("0.0"))
    if dtype == torch.float16:
        assert reference > 0.1 * 65504  # rounded to float16 before its weight 0.1, the estimate was inf
    terms = orthofx.penalty_terms(gm)
    assert len(terms) == 1
    _assert_rounded_once(next(iter(terms.values())), reference, dtype)
    _assert_rounded_once(orthofx.penalty(gm), reference, dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_probe_outside_a_transformed_model_is_rounded_once(dtype):
    model = _stretching_model(dtype, probe=True)
    probe = model[0]
    model(torch.randn(8, 16).to(dtype))
    reference = 0.1 * _jacobian64(probe.block)
    assert probe.estimate.dtype == torch.float32  # a half-precision block's float32 sums, weighted before rounding
    torch.testing.assert_close(float(probe.estimate.detach()), reference / 0.1, rtol=1e-6, atol=0)
    _assert_rounded_once(probe.penalty(), reference, dtype)
    _assert_rounded_once(orthofx.penalty(model), reference, dtype)
    _assert_rounded_once(orthofx.penalty_terms(model)["JacobianProbe/0"], reference, dtype)
    model.eval()(torch.randn(8, 16).to(dtype))  # no estimate: the zero in the block's dtype, as before
    assert probe.penalty().dtype == orthofx.penalty(model).dtype == dtype and float(orthofx.penalty(model)) == 0


def test_half_precision_probe_under_autocast_keeps_a_float32_penalty():
    model = _stretching_model(torch.float16, probe=True)
    with torch.autocast("cpu", dtype=torch.float16):
        model(torch.randn(8, 16).half())
    penalty = orthofx.penalty(model)
    assert penalty.dtype == torch.float32  # as autocast's reductions: what it was before
    torch.testing.assert_close(float(penalty.detach()), 0.1 * _jacobian64(model[0].block), rtol=1e-6, atol=0)


def test_float32_penalty_is_unchanged_by_the_rounding():
    gm = orthofx.transform(_far_from_orthogonal_mlp(torch.float32), "lorth")
    terms = orthofx.penalty_terms(gm)
    expected = 0.01 * sum(orthofx.metrics.lorth(gm.get_submodule(s).weight) for s in ("0", "2"))
    torch.testing.assert_close(orthofx.penalty(gm), expected, atol=0, rtol=1e-6)
    assert all(t.dtype == torch.float32 for t in terms.values())


def test_half_precision_penalty_compiles_without_a_graph_break():
    gm = orthofx.transform(_far_from_orthogonal_mlp(torch.float16), "lorth")
    eager = orthofx.penalty(gm)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(lambda: orthofx.penalty(gm), fullgraph=True, backend="eager")()
    finally:
        torch._dynamo.reset()
    assert compiled.dtype == torch.float16 and bool(torch.isfinite(compiled))
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ review of the fixes above
# A frozen bias-free layer knows its dtype; a LorthTerm subclass's value() counts; numpy arguments everywhere.


def _frozen_bias_free(dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    """A bias-free cayley_fft layer of ``dtype`` and its frozen form (whose symbol is float32 for a half one)."""
    torch.manual_seed(0)
    layer = OrthogonalConv2d(4, 4, 3, padding="same", method="cayley_fft", input_size=(8, 8), bias=False).to(dtype)
    return layer, layer.to_plain()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_frozen_bias_free_fourier_layer_refuses_what_the_layer_refuses(dtype):
    layer, frozen = _frozen_bias_free(dtype)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(frozen(x.to(dtype)), layer(x.to(dtype)), atol=0, rtol=0)
    for other in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        if other == dtype:
            continue
        for module in (layer, frozen):  # the advice names the layer's dtype, not the symbol's
            with pytest.raises(orthofx.LayerArgumentError, match=rf"dtype {str(other)[6:]} is not the layer's "
                                                                 rf"{str(dtype)[6:]}; convert the input"):
                module(x.to(other))


def test_frozen_fourier_layer_dtype_follows_to_and_survives_copies_and_old_pickles():
    _, frozen = _frozen_bias_free(torch.bfloat16)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    assert "dtype_marker" not in frozen.state_dict()  # non-persistent: state dicts are those written before
    moved = copy.deepcopy(frozen).float()
    assert moved(x).dtype == torch.float32
    with pytest.raises(orthofx.LayerArgumentError, match="dtype bfloat16 is not the layer's float32"):
        moved(x.bfloat16())
    assert copy.deepcopy(frozen)(x.bfloat16()).dtype == torch.bfloat16
    # a frozen layer's state dict written without the marker loads strictly into a fresh one
    fresh = _frozen_bias_free(torch.bfloat16)[1]
    fresh.load_state_dict({"symbol": frozen.symbol.clone()}, strict=True)
    torch.testing.assert_close(fresh(x.bfloat16()), frozen(x.bfloat16()), atol=0, rtol=0)
    # a layer pickled before the marker existed: its symbol's dtype (float32 here)
    state = frozen.__getstate__().copy()
    state["_buffers"] = {k: v for k, v in state["_buffers"].items() if k != "dtype_marker"}
    state["_non_persistent_buffers_set"] = set()
    old = FourierConv.__new__(FourierConv)
    old.__setstate__(state)
    assert old(x).dtype == torch.float32
    with pytest.raises(orthofx.LayerArgumentError, match="dtype bfloat16 is not the layer's float32"):
        old(x.bfloat16())


def test_a_lorth_term_subclass_overriding_value_takes_effect():
    from orthofx.passes.orth_regularizer import LorthTerm

    class Doubled(LorthTerm):  # a user's variant of the documented hook
        def value(self, root):
            return 2 * super().value(root)

    torch.manual_seed(0)
    gm = orthofx.transform(nn.Sequential(nn.Linear(8, 8)), "lorth")
    term, = manifest_of(gm).penalties
    single = float(orthofx.penalty(gm).detach())
    expected = 2 * 0.01 * _lorth64(gm.get_submodule("0").weight)[0]  # float64 reference at twice the weight 0.01
    assert single == pytest.approx(expected / 2, rel=1e-5)
    term.__class__ = Doubled
    assert float(orthofx.penalty(gm).detach()) == pytest.approx(expected, rel=1e-5)
    assert float(orthofx.penalty_terms(gm)["lorth/0"].detach()) == pytest.approx(expected, rel=1e-5)


def test_numpy_batch_fraction_and_seed_are_read_as_python_numbers():
    block = nn.Linear(4, 4)
    python = JacobianProbe(block, seed=3, batch_fraction=0.5)
    probe = JacobianProbe(nn.Linear(4, 4), seed=np.int64(3), batch_fraction=np.float32(0.5))
    assert (probe.seed, probe.batch_fraction) == (3, 0.5)
    assert type(probe.seed) is int and type(probe.batch_fraction) is float
    probe = JacobianProbe(block, seed=torch.tensor(3), batch_fraction=np.array(0.5))
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(4))
    python(x)
    probe(x)
    torch.testing.assert_close(probe.estimate, python.estimate, atol=0, rtol=0)  # the same draws and subset
    for bad in (True, 3.0, np.float64(3.0), "3"):
        with pytest.raises(orthofx.LayerArgumentError, match="seed must be an integer or None"):
            JacobianProbe(nn.Linear(4, 4), seed=bad)
    for bad in (True, np.bool_(True), "0.5", np.float32(1.5), np.array([0.5])):
        with pytest.raises(orthofx.ArgumentError, match="batch_fraction must be a number in"):
            JacobianProbe(nn.Linear(4, 4), batch_fraction=bad)
    torch.testing.assert_close(orthofx.metrics.jacobian_isometry(block, x, batch_fraction=np.float32(0.5),
                                                                 generator=torch.Generator().manual_seed(5)),
                               orthofx.metrics.jacobian_isometry(block, x, batch_fraction=0.5,
                                                                 generator=torch.Generator().manual_seed(5)),
                               atol=0, rtol=0)


def test_zero_dimensional_numpy_arrays_are_numbers_as_for_torch_layers():
    nn.BatchNorm2d(4, eps=np.array(1e-5))  # torch's layers take them: the reference
    torch.manual_seed(0)
    python = OrthogonalLinear(4, 4, gain=2.0)
    torch.manual_seed(0)
    layer = OrthogonalLinear(4, 4, gain=np.array(2.0))
    assert layer.gain == 2.0 and type(layer.gain) is float
    torch.testing.assert_close(layer.weight, python.weight, atol=0, rtol=0)
    assert _convnorm(eps=np.array(2.0 ** -10)).eps == 2.0 ** -10
    for bad in (np.array(True), np.array([2.0]), np.array("2")):
        with pytest.raises(orthofx.LayerArgumentError, match="gain must be a positive float"):
            OrthogonalLinear(4, 4, gain=bad)


def test_a_float_tensor_size_is_refused_with_an_orthofx_error():
    for bad in (torch.tensor(4.0), np.float64(4.0), 4.0, True):
        with pytest.raises(orthofx.LayerArgumentError, match=r"in_features must be an integer >= 1, got"):
            OrthogonalLinear(bad, 4)
    layer = OrthogonalLinear(torch.tensor(4), np.int64(3))  # integers of any kind, as nn.Linear takes them
    assert (layer.in_features, layer.out_features) == (4, 3) and type(layer.in_features) is int
    with pytest.raises(orthofx.LayerArgumentError, match=r"in_channels must be an integer >= 1, got tensor\(4\.\)"):
        OrthogonalConv2d(torch.tensor(4.0), 4, 3)


def test_real_lives_in_theory_next_to_positive_int():
    from orthofx import theory

    assert theory._real(np.array(2.0)) == 2.0 and theory._real(np.array(True)) is None
    import orthofx.nn.decompositions as decompositions
    import orthofx.nn.jacobian as jacobian
    assert decompositions._real is jacobian._real is theory._real
