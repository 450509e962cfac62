"""Regressions found by fuzzing the orthogonal transposed convolutions (orthofx.nn.OrthogonalConvTranspose1d/2d/3d)
and ``method="cayley_fft"``, with the properties the fuzzing checked kept as compact tests. References: dense
float64 operators built by applying a layer to basis inputs, entry-by-entry transposed-conv operators
(``dense_transposed``), and torch's own ``F.conv_transpose{d}d``."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from test_orthogonal_conv_transpose import dense_of, dense_transposed

import orthofx
from orthofx.errors import LayerArgumentError
from orthofx.nn import OrthogonalConvTranspose1d, OrthogonalConvTranspose2d, OrthogonalConvTranspose3d
from orthofx.nn.orthogonal import OrthogonalConv1d, OrthogonalConv2d

TRANSPOSED = {1: OrthogonalConvTranspose1d, 2: OrthogonalConvTranspose2d, 3: OrthogonalConvTranspose3d}


@pytest.mark.parametrize("build", [
    lambda: OrthogonalConvTranspose2d(4, 2, 4, stride=2, padding=1, method="fourier"),
    lambda: OrthogonalConvTranspose1d.from_conv_transpose(nn.ConvTranspose1d(4, 2, 4, stride=2, padding=1),
                                                          method="BCOP"),
])
def test_unknown_method_error_names_the_transposed_layer(build):
    """An unknown method was refused by the adjoint conv built inside, so the error named OrthogonalConv2d (a
    layer the user never built) and listed 'cayley_fft', which transposed layers refuse; it now names the
    transposed layer and lists the methods it takes."""
    with pytest.raises(LayerArgumentError) as info:
        build()
    message = str(info.value)
    assert message.startswith("OrthogonalConvTranspose")
    assert "'auto', 'bcop', 'rko'" in message and "cayley_fft" not in message



@pytest.mark.parametrize("build, what", [
    (lambda: OrthogonalConvTranspose2d(4, 2, 4, stride=2, padding=1, gain=-1.0), "gain"),
    (lambda: OrthogonalConvTranspose1d(4, 2, 3, stride=2, padding=1, output_padding=1, compute_dtype=torch.int32),
     "compute_dtype"),
    (lambda: OrthogonalConvTranspose3d.from_conv_transpose(nn.ConvTranspose3d(4, 2, 4, stride=2, padding=1),
                                                           method="rko"), "method='rko'"),
    (lambda: OrthogonalConvTranspose2d.from_conv_transpose(nn.ConvTranspose2d(4, 2, 2, stride=2), fit_steps=-1),
     "fit_steps"),
])
def test_argument_errors_of_the_adjoint_conv_name_the_transposed_layer(build, what):
    """gain, compute_dtype, method='rko' where blocks are needed and fit_steps are checked by the adjoint conv
    built inside; its errors named OrthogonalConv{d}d (or no layer at all), which the user never built."""
    with pytest.raises(LayerArgumentError, match=r"^OrthogonalConvTranspose\dd \(in its adjoint") as info:
        build()
    assert what in str(info.value)



class _UpWithOutputSize(nn.Module):
    """A U-Net style upsampling: ``nn.ConvTranspose2d`` called with ``output_size`` (that of a skip tensor)."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 2, 4, stride=2, padding=1)

    def forward(self, x, skip):
        return self.up(x, output_size=skip.shape) + skip


def test_output_size_argument_of_conv_transpose_is_taken_where_it_is_input_times_stride():
    """nn.ConvTranspose's forward takes output_size; the orthogonal layer (which the orthogonal_conv pass puts in
    its place) and its frozen form refused the keyword (TypeError), so a U-Net calling up(x, output_size=...)
    could be neither transformed nor frozen. Both now take it where it is input * stride (spatial sizes or the
    whole shape, batched or not) and raise LayerArgumentError for another size."""
    torch.manual_seed(3)
    model = _UpWithOutputSize()
    x, skip = torch.randn(2, 4, 5, 3), torch.randn(2, 2, 10, 6)
    gm = orthofx.transform(model, "orthogonal", example_inputs=(x, skip))
    layer = gm.get_submodule("up")
    assert isinstance(layer, OrthogonalConvTranspose2d)
    with torch.no_grad():
        expected = layer(x) + skip
        torch.testing.assert_close(gm(x, skip), expected, rtol=0, atol=0)
        torch.testing.assert_close(orthofx.freeze(gm)(x, skip), expected, rtol=0, atol=1e-6)
        frozen = layer.to_conv()
        for module in (layer, frozen):
            torch.testing.assert_close(module(x, output_size=(10, 6)), layer(x), rtol=0, atol=1e-6)
            torch.testing.assert_close(module(x[0], output_size=[2, 10, 6]), layer(x[0]), rtol=0, atol=1e-6)
            for wrong in ((9, 6), (2, 2, 10), (10,)):
                with pytest.raises(LayerArgumentError, match=r"OrthogonalConvTranspose2d.*input \* stride"):
                    module(x, output_size=wrong)


# (dims, in, out, kernel, stride, dilation, groups, padding, output_padding, input grid)
CASES = [
    (1, 3, 2, 5, 4, 1, 1, "same", 0, (3,)),          # k not a multiple of S, in > out: CO
    (1, 6, 2, 2, 1, 3, 2, "same", 0, (4,)),          # stride 1, dilated even kernel, groups, RO
    (2, 4, 2, (4, 3), (2, 3), (1, 2), 1, "same", 0, (2, 3)),   # mixed per-dimension sizes
    (2, 2, 4, 3, 2, 1, 2, 1, 1, (3, 2)),             # k = 3, S = 2, p = 1, output_padding = 1, groups
    (3, 4, 2, 2, (2, 1, 2), 1, 1, "same", 0, (2, 2, 1)),
]


@pytest.mark.parametrize("dims, cin, cout, k, s, dl, g, pad, op, n", CASES)
def test_operator_is_the_orthogonal_adjoint_and_freezes_exactly(dims, cin, cout, k, s, dl, g, pad, op, n):
    """Dense operator = the documented transposed conv of ``weight`` (output j takes the taps with
    S i + D p = j + l mod nS), = the transpose of its adjoint conv's operator, orthogonal to 1e-5 in float32; the
    frozen form, an unbatched input and a state_dict round trip give the same outputs."""
    torch.manual_seed(0)
    layer = TRANSPOSED[dims](cin, cout, k, stride=s, padding=pad, output_padding=op, groups=g, dilation=dl,
                             dtype=torch.float64)
    bias = layer.bias.reshape(-1, *(1,) * dims)
    T = dense_of(lambda x: layer(x) - bias, (cin, *n))
    lefts = tuple(left for left, _ in layer.pads)
    reference = dense_transposed(layer.weight.detach(), n, layer.stride, layer.dilation, g, lefts)
    torch.testing.assert_close(T, reference, rtol=0, atol=1e-12)
    grid = tuple(a * b for a, b in zip(n, layer.stride))
    A = dense_of(layer.conv, (cout, *grid))
    torch.testing.assert_close(T, A.T, rtol=0, atol=1e-12)

    single = copy.deepcopy(layer).float()
    T32 = dense_of(lambda x: (single(x.float()) - single.bias.reshape(-1, *(1,) * dims)).double(), (cin, *n))
    sv = torch.linalg.svdvals(T32)[:min(T32.shape)]
    assert float((sv - 1).abs().max()) < 1e-5

    x = torch.randn(2, cin, *n, dtype=torch.float64)
    restored = TRANSPOSED[dims](cin, cout, k, stride=s, padding=pad, output_padding=op, groups=g, dilation=dl,
                                dtype=torch.float64)
    restored.load_state_dict(layer.state_dict())
    with torch.no_grad():
        y = layer(x)
        torch.testing.assert_close(layer.to_conv()(x), y, rtol=0, atol=1e-12)
        torch.testing.assert_close(layer(x[1]), y[1], rtol=0, atol=1e-12)
        torch.testing.assert_close(restored(x), y, rtol=0, atol=0)


def test_eval_cache_follows_a_parameter_change_and_functional_call():
    """Eval + no_grad caches the adjoint conv's kernel: two calls agree, an in-place parameter change and a
    torch.func.functional_call with other parameters are both seen (reference: a fresh copy holding them)."""
    torch.manual_seed(1)
    layer = OrthogonalConvTranspose2d(4, 2, 4, stride=2, padding=1).eval()
    x = torch.randn(1, 4, 3, 3)
    other = {name: p.detach() + 0.1 for name, p in layer.named_parameters()}
    reference = copy.deepcopy(layer)
    reference.load_state_dict(other)
    with torch.no_grad():
        first = layer(x)
        torch.testing.assert_close(layer(x), first, rtol=0, atol=0)
        torch.testing.assert_close(torch.func.functional_call(layer, other, (x,)), reference(x), rtol=0, atol=0)
        torch.testing.assert_close(layer(x), first, rtol=0, atol=0)
        for name, p in layer.named_parameters():
            p.copy_(other[name])
        torch.testing.assert_close(layer(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("conv, size", [
    (nn.Conv1d(2, 5, 3, stride=2, padding=1), (6,)),          # CO (5 > 2 * 2)
    (nn.Conv2d(4, 3, 3, stride=(1, 2), groups=1), (3, 4)),    # padding 0 keeps no size: "same" read
])
def test_cayley_fft_from_conv_init_error_is_the_operator_distance(conv, size):
    """``init_error`` of a cayley_fft layer is the relative Frobenius distance of the circular operators on
    ``input_size``; the reference reads the conv's taps at its own offsets (keep-size padding) or at "same",
    built here by tiling the input three times (circular wrap) and slicing the conv's outputs."""
    torch.manual_seed(2)
    conv = conv.double()
    d = len(size)
    layer = (OrthogonalConv1d, OrthogonalConv2d)[d - 1].from_conv(conv, method="cayley_fft", input_size=size,
                                                                  fit_steps=0)
    keeps = all(dl * (k - 1) + 1 - s <= 2 * p <= dl * (k - 1)
                for k, s, p, dl in zip(conv.kernel_size, conv.stride, conv.padding, conv.dilation))
    lefts = conv.padding if keeps else tuple((k - 1) // 2 for k in conv.kernel_size)

    def circular(x):
        tiled = x
        for axis in range(d):
            tiled = torch.cat([tiled] * 3, dim=2 + axis)
        window = tuple(slice(n - l, 2 * n - l + k - 1) for n, l, k in zip(size, lefts, conv.kernel_size))
        y = (F.conv1d if d == 1 else F.conv2d)(tiled[(slice(None), slice(None)) + window], conv.weight,
                                                stride=conv.stride, groups=conv.groups)
        return y[(slice(None), slice(None)) + tuple(slice(0, n // s) for n, s in zip(size, conv.stride))]

    T0 = dense_of(circular, (conv.in_channels, *size))
    T = dense_of(lambda x: layer(x) - layer.bias.reshape(-1, *(1,) * d), (conv.in_channels, *size))
    assert abs(layer.init_error - float((T - T0).norm() / T0.norm())) < 1e-9
    with torch.no_grad():
        x = torch.randn(2, conv.in_channels, *size, dtype=torch.float64)
        torch.testing.assert_close(layer.to_conv()(x), layer(x), rtol=0, atol=1e-10)
        torch.testing.assert_close(layer.to_plain()(x), layer(x), rtol=0, atol=1e-10)
    with pytest.raises(LayerArgumentError, match="input_size"):
        layer(torch.randn(1, conv.in_channels, *(n + conv.stride[0] for n in size), dtype=torch.float64))
