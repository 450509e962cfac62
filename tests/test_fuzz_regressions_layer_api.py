"""Regressions found by fuzzing the torch.nn.Module behaviour of orthofx's layers (state_dict, functional_call,
torch parametrizations, eval-mode kernel cache) against plain-torch references."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from orthofx.nn import ConvNormConv2d, OrthogonalConv2d, OrthogonalConvTranspose2d, OrthogonalLinear


class _Shift(nn.Module):
    """A torch parametrization that is not scale invariant (``orthonormal`` of ``2 W`` is that of ``W``)."""

    def forward(self, w):
        return w + 0.5


def _uncached(layer, x):
    """The layer's output with autograd on: the kernel is built from the parameters, never cached."""
    with torch.enable_grad():
        return layer(x).detach()


# ------------------------------------------------------------------------------ eval cache and functional_call


def test_functional_call_with_new_tensors_at_a_cached_address_uses_them():
    # the eval cache was keyed by data_ptr and version only: a substituted tensor with the address and version of
    # the one cached before (here a transposed view of it; in practice a freed temporary's memory reused by the
    # next functional_call) got the kernel built from the other tensor
    torch.manual_seed(0)
    layer = OrthogonalLinear(4, 4, bias=False, dtype=torch.float64).eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    base = torch.randn(4, 4, dtype=torch.float64)
    with torch.no_grad():
        first = torch.func.functional_call(layer, {"raw_weight": base}, (x,))
        second = torch.func.functional_call(layer, {"raw_weight": base.mT}, (x,))
    q, r = torch.linalg.qr(base.mT)  # the layer's weight: the Q factor, signs of diag(R) moved into it
    reference = F.linear(x, q * r.diagonal().sign())
    torch.testing.assert_close(second, reference, atol=1e-12, rtol=0)
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("method", ["bcop", "cayley_fft"])
def test_functional_call_of_a_conv_with_views_at_one_address(method):
    torch.manual_seed(1)
    kw = {"input_size": (6, 6)} if method == "cayley_fft" else {}
    layer = OrthogonalConv2d(3, 3, 3, method=method, bias=False, dtype=torch.float64, **kw).eval()
    name = "cayley_kernel" if method == "cayley_fft" else "matrix"
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    base = torch.randn(getattr(layer, name).shape, dtype=torch.float64)
    other = base.transpose(-1, -2)  # square trailing dimensions: a view with base's address and version
    assert other.data_ptr() == base.data_ptr() and other.shape == base.shape
    with torch.no_grad():
        torch.func.functional_call(layer, {name: base}, (x,))
        cached = torch.func.functional_call(layer, {name: other}, (x,))
    reference_layer = OrthogonalConv2d(3, 3, 3, method=method, bias=False, dtype=torch.float64, **kw)
    reference_layer.load_state_dict(layer.state_dict())
    with torch.no_grad():
        getattr(reference_layer, name).copy_(other)
    # the reference as a plain circular conv of the kernel built from the substituted tensor
    weight = reference_layer.weight
    pads = [p for pair in reversed(reference_layer.pads) for p in pair]
    expected = F.conv2d(F.pad(x, pads, mode="circular"), weight)
    torch.testing.assert_close(cached, expected, atol=1e-10, rtol=0)


def test_functional_call_with_a_new_tensor_of_the_same_address_layout_and_version():
    # what a loop of functional_calls with fresh temporaries does when the allocator hands the next temporary the
    # freed one's memory: a new tensor object with the same address, layout and version 0, other values (made
    # deterministic here with a `.data` alias, whose writes bump no version counter the layer sees)
    torch.manual_seed(7)
    layer = OrthogonalConv2d(3, 3, 3, method="cayley_fft", input_size=(6, 6), bias=False,
                             dtype=torch.float64).eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    first = torch.randn(layer.cayley_kernel.shape, dtype=torch.float64)
    with torch.no_grad():
        torch.func.functional_call(layer, {"cayley_kernel": first}, (x,))
        first.data.copy_(torch.randn_like(first))
        second = first.data  # the "next temporary"
        assert (second.data_ptr(), second._version, second.stride()) == (first.data_ptr(), 0, first.stride())
        out = torch.func.functional_call(layer, {"cayley_kernel": second}, (x,))
    reference_layer = OrthogonalConv2d(3, 3, 3, method="cayley_fft", input_size=(6, 6), bias=False,
                                       dtype=torch.float64)
    with torch.no_grad():
        reference_layer.cayley_kernel.copy_(second)
    # the plain circular conv of the effective full-size kernel built from the new tensor
    pads = [p for pair in reversed(reference_layer.pads) for p in pair]
    expected = F.conv2d(F.pad(x, pads, mode="circular"), reference_layer.weight)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)


def test_compute_dtype_changed_after_an_eval_forward_rebuilds_the_kernel():
    torch.manual_seed(2)
    layer = OrthogonalConv2d(6, 6, 3).eval()
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        layer(x)  # fills the cache with the float64-built kernel
        layer.compute_dtype = torch.float32
        cached = layer(x)
    torch.testing.assert_close(cached, _uncached(layer, x), atol=0, rtol=0)


# ------------------------------------------------------------------------------ torch parametrizations on top


@pytest.mark.parametrize("make, name", [
    (lambda: OrthogonalConv2d(4, 4, 3), "matrix"),
    (lambda: OrthogonalConv2d(4, 8, 3, stride=2), "proj_a"),
    (lambda: OrthogonalLinear(4, 5), "raw_weight"),
], ids=["bcop-matrix", "strided-proj_a", "linear"])
def test_parametrized_layer_in_eval_follows_in_place_changes_of_its_original(make, name):
    # a torch parametrization moves the parameter to layer.parametrizations.<name>.original, outside the eval
    # cache's key (parameters(recurse=False)): an in-place change of it alone (a no-grad update, a partial
    # load_state_dict) was not seen
    torch.manual_seed(3)
    layer, source = make(), make()
    for m in (layer, source):
        parametrize.register_parametrization(m, name, _Shift())
    x = torch.randn(2, 4) if isinstance(layer, OrthogonalLinear) else torch.randn(2, 4, 8, 8)
    layer.eval()
    source.load_state_dict({k: v for k, v in layer.state_dict().items() if "original" not in k}, strict=False)
    source.eval()
    with torch.no_grad():
        layer(x)  # fills the eval cache
        layer.load_state_dict({f"parametrizations.{name}.original": getattr(source.parametrizations, name).original},
                              strict=False)
        loaded = layer(x)
        expected = source(x)
    torch.testing.assert_close(loaded, expected, atol=0, rtol=0)
    torch.testing.assert_close(loaded, _uncached(layer, x), atol=0, rtol=0)


def test_parametrized_cayley_kernel_runs_and_matches_the_unparametrized_layer():
    # _param_dtype read self._parameters["cayley_kernel"], gone once torch parametrizes it: KeyError
    torch.manual_seed(4)
    layer = OrthogonalConv2d(4, 4, 3, method="cayley_fft", input_size=(8, 8), dtype=torch.float64)
    plain = OrthogonalConv2d(4, 4, 3, method="cayley_fft", input_size=(8, 8), dtype=torch.float64)
    plain.load_state_dict(layer.state_dict())
    with torch.no_grad():
        plain.cayley_kernel.add_(0.5)
    parametrize.register_parametrization(layer, "cayley_kernel", _Shift())
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    y = layer(x)
    torch.testing.assert_close(y, plain(x), atol=1e-12, rtol=0)
    assert y.dtype == torch.float64
    y.square().sum().backward()
    assert layer.parametrizations.cayley_kernel.original.grad is not None


def test_parametrized_transposed_conv_follows_its_original_in_eval():
    torch.manual_seed(5)
    layer = OrthogonalConvTranspose2d(4, 2, 4, stride=2, padding=1).eval()
    parametrize.register_parametrization(layer.conv, "matrix", _Shift())
    x = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        layer(x)
        original = layer.conv.parametrizations.matrix.original
        original.add_(torch.randn_like(original))
        changed = layer(x)
    torch.testing.assert_close(changed, _uncached(layer, x), atol=0, rtol=0)


# ------------------------------------------------------------------------------ ConvNorm running filters


def test_convnorm_refuses_a_running_filter_of_the_wrong_shape():
    # a running filter whose shape does not fit its grid and the layer's channels was registered as it came and
    # broadcast over the channels in eval (every channel normalised by channel 0's filter), silently
    torch.manual_seed(6)
    source = ConvNormConv2d(nn.Conv2d(3, 4, 3), momentum=0.1)
    source(torch.randn(1, 3, 8, 8))
    state = source.state_dict()
    state["running_v_10x10"] = state["running_v_10x10"][:1]
    layer = ConvNormConv2d(nn.Conv2d(3, 4, 3), momentum=0.1)
    with pytest.raises(RuntimeError, match=r"running_v_10x10.*\(4, 10, 6\)"):
        layer.load_state_dict(state)


def test_convnorm_loaded_under_inference_mode_keeps_training():
    # load_state_dict made room for the running filters with torch.empty inside inference mode: inference tensors,
    # so the next training forward failed ("Inplace update to inference tensor outside InferenceMode")
    torch.manual_seed(8)
    source = ConvNormConv2d(nn.Conv2d(3, 4, 3), momentum=0.25)
    source(torch.randn(1, 3, 8, 8))
    layer = ConvNormConv2d(nn.Conv2d(3, 4, 3), momentum=0.25)
    reference = ConvNormConv2d(nn.Conv2d(3, 4, 3), momentum=0.25)
    reference.load_state_dict(source.state_dict())
    with torch.inference_mode():
        layer.load_state_dict(source.state_dict())
    step = 0.3 * torch.randn_like(source.conv.weight)
    with torch.no_grad():  # a new weight, whose filter the training forward averages in
        layer.conv.weight.add_(step)
        reference.conv.weight.add_(step)
    x = torch.randn(2, 3, 8, 8)
    layer(x).sum().backward()
    reference(x)
    torch.testing.assert_close(layer.running_filter((10, 10)), reference.running_filter((10, 10)), atol=0, rtol=0)
    assert not torch.equal(layer.running_filter((10, 10)), source.running_filter((10, 10)))


# ------------------------------------------------------------------------------ autocast


def _circular_singular_values(weight: torch.Tensor, n: int) -> torch.Tensor:
    """Singular values of a stride-1 circular convolution on an ``n x n`` grid: those of its symbol, the
    ``M x C`` matrix of the kernel's 2-D DFT at every frequency (dense float64 reference)."""
    symbol = torch.fft.fft2(weight.detach().to(torch.float64), s=(n, n))  # (M, C, n, n)
    return torch.linalg.svdvals(symbol.permute(2, 3, 0, 1))


def test_float32_kernel_built_under_autocast_stays_orthogonal_and_is_not_cached_stale():
    # under torch.autocast the float32 build's matmuls ran in bfloat16: the kernel was orthogonal to 1.5e-2, and an
    # eval-mode layer kept that kernel cached for forwards after the autocast block
    torch.manual_seed(9)
    layer = OrthogonalConv2d(8, 8, 3, compute_dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weight = layer.weight
    assert weight.dtype == torch.float32
    assert float((_circular_singular_values(weight, 8) - 1).abs().max()) < 1e-5
    layer.eval()
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = layer(x)
        after = layer(x)
    assert inside.dtype == torch.bfloat16  # the convolution itself still runs under autocast
    torch.testing.assert_close(after, _uncached(layer, x), atol=0, rtol=0)
