"""Regressions found by fuzzing orthofx's layers and transformed models across nn.Module lifecycle operations:
memory formats (``.to(memory_format=...)``, channels_last inputs), deferred initialisation (meta device,
``to_empty``, ``reset_parameters``, ``load_state_dict(assign=True)``), dtype conversions after construction and
partial freezing. References are plain torch (dense float64 operators, the unconverted layer on contiguous
inputs)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import orthofx
from orthofx import models
from orthofx.nn import (ConditionMonitor, OrthogonalActivationBlock, OrthogonalConv2d, OrthogonalConv3d,
                        OrthogonalConvTranspose2d, OrthogonalConvTranspose3d, OrthogonalLinear,
                        ReflectionResidualBlock)

pytestmark = pytest.mark.usefixtures("one_thread")

D = torch.float64


def _dense(fn, in_shape) -> torch.Tensor:
    """The matrix of the linear map ``fn`` on inputs of shape ``in_shape`` (one sample), column j = fn(e_j)."""
    n = torch.Size(in_shape).numel()
    basis = torch.eye(n, dtype=D).reshape(n, *in_shape)
    return fn(basis).reshape(n, -1).T


def _circular_conv2d(weight: torch.Tensor, pad: int):
    """Plain torch: a stride-1 circular convolution with ``weight`` and ``pad`` on every side."""
    return lambda x: F.conv2d(F.pad(x, [pad] * 4, mode="circular"), weight)


def _assert_orthonormal(matrix: torch.Tensor, atol: float) -> None:
    s = torch.linalg.svdvals(matrix.to(D))
    assert float((s - 1).abs().max()) < atol, s


def _grads(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.square().sum().backward()
    return y.detach(), [p.grad.clone() for p in module.parameters()]


# ------------------------------------------------------------------------------------------------ memory format


def _cayley2d():
    return OrthogonalConv2d(4, 4, 3, method="cayley_fft", input_size=8)


@pytest.mark.parametrize("make,shape,fmt", [
    (_cayley2d, (2, 4, 8, 8), torch.channels_last),                                          # 5-D cayley_kernel
    (lambda: _cayley2d().to_plain(), (2, 4, 8, 8), torch.channels_last),                    # FourierConv, 5-D symbol
    (lambda: OrthogonalConv3d(4, 4, 3), (2, 4, 4, 4, 4), torch.channels_last_3d),            # 4-D proj_a / proj_b
    (lambda: OrthogonalConvTranspose3d(4, 4, 4, stride=2), (2, 4, 3, 3, 3), torch.channels_last_3d),
    (lambda: OrthogonalConv3d(4, 4, 3, method="cayley_fft", input_size=4).to_plain(), (2, 4, 4, 4, 4),
     torch.channels_last_3d),                                                                # symbol lost stride 1
], ids=["cayley2d", "fourier2d", "bcop3d", "transposed3d", "fourier3d"])
def test_memory_format_conversion_of_layers_whose_parameters_are_not_kernels(make, shape, fmt):
    # Module.to(memory_format=...) gives every 4-D and 5-D tensor the format and torch refuses the other rank:
    # "required rank 4 tensor to use channels_last format" for a cayley_fft OrthogonalConv2d or its FourierConv,
    # whose plain Conv2d converts; "rank 5 ... channels_last_3d" for an OrthogonalConv3d with blocks; and the 3-D
    # FourierConv's symbol, given channels_last_3d strides, failed in view_as_complex at the next forward
    torch.manual_seed(0)
    layer = make().to(D)
    x = torch.randn(shape, dtype=D)
    y_ref, g_ref = _grads(layer, x)
    converted = copy.deepcopy(layer).to(memory_format=fmt)
    y, g = _grads(converted, x.contiguous(memory_format=fmt))
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=0)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=0)
    converted.eval()
    with torch.no_grad():  # the eval-mode path (cached kernel or symbol)
        torch.testing.assert_close(converted(x.contiguous(memory_format=fmt)), y_ref, atol=1e-12, rtol=0)


def test_transformed_cayley_model_converts_to_channels_last_and_so_does_its_frozen_form():
    torch.manual_seed(0)
    policy = {"orthofx": 1, "rules": [{"name": "cayley", "match": {"type": "Conv2d"}, "apply": "orthogonal_conv",
                                       "with": {"method": "cayley_fft"}}]}
    x = models.example_input("small_cnn", batch=2).to(D)
    gm = orthofx.transform(models.get("small_cnn").to(D), policy, example_inputs=(x,))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    y_ref, g_ref = _grads(gm, x)
    converted = copy.deepcopy(gm).to(memory_format=torch.channels_last)
    y, g = _grads(converted, x_cl)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=0)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=0)
    gm.eval()
    frozen = orthofx.freeze(gm, (x,)).to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x_cl), gm(x), atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------ deferred initialisation


@pytest.mark.parametrize("make", [lambda: OrthogonalActivationBlock(6), lambda: ReflectionResidualBlock(6, 4)],
                         ids=["activation", "reflection"])
def test_isometric_blocks_reset_parameters_after_deferred_init(make):
    # the blocks had no reset_parameters: built on the meta device and materialised with to_empty() their raw
    # matrix and bias stayed uninitialised memory (tiny denormals here: Q near a signed identity, not Haar-random;
    # NaN elsewhere), and nothing could re-initialise them
    torch.manual_seed(0)
    eager = make()
    with torch.device("meta"):
        deferred = make()
    deferred.to_empty(device="cpu")
    with torch.no_grad():
        for p in deferred.parameters():
            p.fill_(float("nan"))  # what uninitialised memory may hold
    torch.manual_seed(0)
    deferred.reset_parameters()
    # the eager construction's values (same draws), and the documented start: Q = qf(raw) orthonormal, b = 0
    torch.testing.assert_close(deferred.raw, eager.raw, atol=0, rtol=0)
    assert torch.equal(deferred.bias, torch.zeros_like(deferred.bias))
    w = deferred.weight.detach()
    _assert_orthonormal(w, 1e-5)
    q, r = torch.linalg.qr(deferred.raw.detach().to(D))  # the Q factor of raw, signs of diag(R) moved into it
    expected = q * r.diagonal().sign()
    torch.testing.assert_close(w.to(D), expected if w.shape == expected.shape else expected.T, atol=1e-6, rtol=0)


def test_condition_monitor_reset_parameters_after_to_empty():
    # to_empty() left the monitor's buffers uninitialised (updates 94055193534736, garbage kappas in the summary)
    # and it had no reset_parameters for deferred initialisation to call
    with torch.device("meta"):
        monitor = ConditionMonitor(history_size=3)
    monitor.to_empty(device="cpu")
    for buffer in monitor.buffers():
        buffer.fill_(7)
    monitor.reset_parameters()
    assert monitor.summary()["updates"] == 0 and monitor.history == []
    monitor(torch.tensor([0.5, 1.0, 2.0]))
    assert monitor.summary() == {"kappa": 4.0, "kappa_max": 4.0, "updates": 1, "nan_events": 0, "inf_events": 0}
    assert monitor.history == [4.0]


@pytest.mark.parametrize("kind", ["conv", "transposed", "linear"])
def test_from_conv_and_from_linear_of_meta_layers_defer_initialisation(kind):
    # from_conv / from_linear of a layer built under torch.device("meta") failed inside torch ("Tensor.item()
    # cannot be called on meta tensors": the nearest fit and init_error read numbers), for both inits; now
    # init="random" gives a meta layer and init="nearest" (no values to be near to) says what to do
    torch.manual_seed(0)
    plain = {"conv": lambda: nn.Conv2d(4, 4, 3, padding=1), "linear": lambda: nn.Linear(6, 4),
             "transposed": lambda: nn.ConvTranspose2d(4, 4, 3, padding=1)}[kind]
    convert = {"conv": OrthogonalConv2d.from_conv, "linear": OrthogonalLinear.from_linear,
               "transposed": OrthogonalConvTranspose2d.from_conv_transpose}[kind]
    with torch.device("meta"):
        original = plain().eval()
    original.bias.requires_grad_(False)
    with pytest.raises(orthofx.LayerArgumentError, match=r"weight is on the meta device .*init='random'") as info:
        convert(original)
    assert isinstance(info.value, orthofx.TransformError)  # what transform raised (a RuntimeError, as torch's)
    layer = convert(original, init="random")
    assert all(t.is_meta for t in layer.parameters()) and layer.init_error is None and not layer.training
    assert not layer.bias.requires_grad and layer.weight.is_meta
    # materialised as torch's layers are: to_empty + reset_parameters gives an orthogonal layer ...
    layer.to_empty(device="cpu").to(D)
    layer.reset_parameters()
    w = layer.weight.detach()
    if kind == "linear":
        _assert_orthonormal(w, 1e-12)
    else:  # the circular operator on a 5 x 5 grid; the transposed layer's kernel is its adjoint conv's
        _assert_orthonormal(_dense(_circular_conv2d(w.transpose(0, 1) if kind == "transposed" else w, 1),
                                   (4, 5, 5)), 1e-12)
    # ... and load_state_dict(assign=True) a trained one's state: its outputs
    source = convert(plain().to(D))
    with torch.device("meta"):
        target = convert(plain().to(D), init="random")
    target.load_state_dict(source.state_dict(), assign=True)
    x = torch.randn(2, 6, dtype=D) if kind == "linear" else torch.randn(2, 4, 5, 5, dtype=D)
    torch.testing.assert_close(target(x), source(x), atol=0, rtol=0)


# --------------------------------------------------------------------------------------------- dtype conversion


@pytest.mark.parametrize("method", ["bcop", "cayley_fft"])
def test_eval_forward_after_double_uses_the_float64_operator(method):
    # the pin of area "dtype conversions": an eval-mode kernel (or symbol) cached in float32 must not be served
    # after .double(); the float64 layer is orthogonal to float64 rounding and computes its own weight's conv
    torch.manual_seed(0)
    layer = OrthogonalConv2d(4, 4, 3, method=method, input_size=6 if method == "cayley_fft" else None).eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        layer(x)  # fills the float32 cache
        layer.double()
        y = layer(x.to(D))
    assert y.dtype == D
    w = layer.weight.detach()  # bcop: 3 x 3, pads 1; cayley_fft: the 6 x 6 effective kernel, pads (2, 3)
    pads = [1, 1, 1, 1] if method == "bcop" else [2, 3, 2, 3]
    conv = lambda v: F.conv2d(F.pad(v, pads, mode="circular"), w)
    torch.testing.assert_close(y - layer.bias.detach().view(1, -1, 1, 1), conv(x.to(D)), atol=1e-12, rtol=0)
    _assert_orthonormal(_dense(conv, (4, 6, 6)), 1e-12)


# ------------------------------------------------------------------------------------------------ partial freezing


def test_frozen_part_of_a_transformed_model_stays_bitwise_and_vector_round_trip_keeps_orthogonality():
    torch.manual_seed(0)
    x = models.example_input("small_cnn", batch=4)
    gm = orthofx.transform(models.get("small_cnn"), "orthogonal", example_inputs=(x,))
    names = [name for name, _ in gm.named_parameters()]
    state = gm.state_dict(keep_vars=True)
    assert len(names) == len(set(names)) == len({id(p) for p in gm.parameters()})
    assert sorted(names) == sorted(k for k, v in state.items() if isinstance(v, nn.Parameter))
    frozen = gm.conv1
    assert isinstance(frozen, OrthogonalConv2d)
    frozen.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in frozen.named_parameters()}
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        (gm(x).square().mean() + orthofx.penalty(gm)).backward()
        optimizer.step()
    for name, p in frozen.named_parameters():
        assert torch.equal(p, before[name]), name
    # parameters_to_vector / vector_to_parameters with a perturbed vector: still orthogonal, and eval sees it
    vector = parameters_to_vector(gm.parameters())
    vector_to_parameters(vector + 0.5 * torch.randn_like(vector), gm.parameters())
    gm.eval()
    w = gm.conv1.weight.detach().to(D)
    _assert_orthonormal(_dense(_circular_conv2d(w, 1), (w.shape[1], 6, 6)), 1e-6)
    with torch.no_grad():
        torch.testing.assert_close(gm.conv1(x), F.conv2d(F.pad(x, [1] * 4, mode="circular"),
                                                                gm.conv1.weight, gm.conv1.bias), atol=1e-6, rtol=0)
