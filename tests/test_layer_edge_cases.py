"""Audit of the public layers (orthogonal convs / linears, ConvNorm, isometric blocks) and of the
``orthogonal_conv`` / ``convnorm`` passes: each test pins a bug found by trying to break them, against an
independent reference (dense float64 operators, the original torch layer, plain float32 arithmetic)."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import orthofx
import orthofx.passes.convnorm  # noqa: F401  (registers the pass)
from orthofx.errors import LayerArgumentError, PlanError
from orthofx.nn import OrthogonalActivationBlock, OrthogonalConv2d, ReflectionResidualBlock
from orthofx.nn.convnorm import ConvNormConv2d, conv_norm


def _dense(layer: nn.Module, channels: int, size: tuple[int, ...]) -> torch.Tensor:
    """The layer's operator as a dense float64 matrix (out x in), by applying it to the standard basis."""
    n = channels * int(np.prod(size))
    basis = torch.eye(n, dtype=torch.float64).reshape(n, channels, *size)
    with torch.no_grad():
        out = layer(basis)
    return out.reshape(n, -1).T


def _orthogonal_kernel(out_channels: int, in_channels: int, kernel: tuple[int, ...]) -> torch.Tensor:
    """A kernel whose flattened matrix has orthonormal rows (or columns), from a float64 QR of a Gaussian matrix;
    with kernel == stride (disjoint windows) the strided convolution with it is exactly orthogonal."""
    cols = in_channels * int(np.prod(kernel))
    q, _ = torch.linalg.qr(torch.randn(max(out_channels, cols), min(out_channels, cols), dtype=torch.float64))
    w = q if out_channels >= cols else q.T
    return w.reshape(out_channels, in_channels, *kernel)


# ------------------------------------------------------------------------------ orthogonal_conv pass alignment


@pytest.mark.parametrize("conv, size", [
    (nn.Conv2d(3, 48, 4, stride=4, bias=False), (16, 16)),          # ViT-style patch embedding, padding 0
    (nn.Conv1d(2, 6, 3, stride=3, bias=False), (12,)),
    (nn.Conv2d(2, 8, (2, 3), stride=(2, 3), bias=False), (6, 9)),
])
def test_pass_keeps_a_strided_convs_window_alignment(conv, size):
    # Bug: the pass always built the circular "same" layer, whose left pad is (k - 1) // 2, so a conv with
    # k = S and padding 0 (which reads x[S i .. S i + k - 1]) was replaced by a layer reading one pixel earlier
    # (and wrapping around): the kernel was kept exactly (init_error 1e-16) but the outputs changed by ~140%.
    torch.manual_seed(0)
    conv = conv.double()
    with torch.no_grad():
        conv.weight.copy_(_orthogonal_kernel(conv.out_channels, conv.in_channels, conv.kernel_size))
    model = nn.Sequential(conv, nn.ReLU())
    x = torch.randn(2, conv.in_channels, *size, dtype=torch.float64)
    gm = orthofx.transform(model, {"rules": [{"match": {"type": type(conv).__name__}, "apply": "orthogonal_conv"}]},
                           example_inputs=(x,))
    layer = gm.get_submodule("0")
    assert type(layer).__name__.startswith("OrthogonalConv")
    # an already orthogonal conv is kept as it is: same outputs as the original torch layer
    torch.testing.assert_close(gm(x), model(x), atol=1e-10, rtol=0)
    # and the replacement is still exactly orthogonal (dense float64 operator)
    K = _dense(layer, conv.in_channels, size)
    gram = K @ K.T if K.shape[0] <= K.shape[1] else K.T @ K
    torch.testing.assert_close(gram, torch.eye(gram.shape[0], dtype=torch.float64), atol=1e-10, rtol=0)


@pytest.mark.parametrize("conv, size", [
    (nn.Conv2d(4, 16, 4, stride=4), (16, 16)),                      # patch embedding, row-orthogonal
    (nn.Conv1d(3, 9, 3, stride=3), (12,)),                           # k = S = 3, square (det -1 here)
    (nn.Conv2d(4, 8, 3, stride=3), (9, 9)),
    (nn.Conv2d(2, 16, 2, stride=2), (8, 8)),                         # column-orthogonal (M > C S^2)
])
def test_cayley_fft_nearest_start_of_disjoint_window_convs_is_the_polar_factor(conv, size):
    # Bugs: (1) the nearest cayley_fft start read the conv's taps at "same" offsets, so a k = S, padding 0 conv's
    # target was shifted by a pixel and out of reach of the one-tap parameter kernel (output change 1.88 where
    # the nearest orthogonal conv changes it by 0.71); (2) the closed form completed the polar factor arbitrarily
    # to a unitary, often with determinant -1 or an eigenvalue near -1, which no (real) Cayley transform reaches.
    # For k <= S the windows are disjoint and the nearest orthogonal layer is the polar factor of the reshaped
    # kernel, applied as the same strided conv: computed here with a float64 SVD. A square (M = C S) symbol is
    # real, and real Cayley transforms are rotations: with det -1 the reachable nearest is Kabsch's rotation.
    torch.manual_seed(0)
    conv = conv.double()
    conv.reset_parameters()  # weights from this seed, not from the RNG state when the test file was collected
    x = torch.randn(2, conv.in_channels, *size, dtype=torch.float64)
    rule = {"match": {"type": type(conv).__name__}, "apply": "orthogonal_conv", "with": {"method": "cayley_fft"}}
    gm = orthofx.transform(nn.Sequential(conv), {"rules": [rule]}, example_inputs=(x,))
    assert gm.get_submodule("0").method == "cayley_fft"
    w = conv.weight.detach().reshape(conv.out_channels, -1)
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    if w.shape[0] == w.shape[1] and torch.linalg.det(u @ vh) < 0:
        u[:, -1] = -u[:, -1]  # a real Cayley transform has det +1: the nearest rotation (Kabsch) instead
    conv_fn = nn.functional.conv2d if conv.weight.ndim == 4 else nn.functional.conv1d
    expected = conv_fn(x, (u @ vh).reshape(conv.weight.shape), conv.bias, conv.stride)
    with torch.no_grad():
        # up to the clamp of eigenvalues near -1 (angle pi - 0.01), which no Cayley transform reaches: it moves
        # eigenvalues of a unitary by at most 0.01, so the isometric layer's output by at most 0.01 ||x||
        # (the bug: 0.3-0.66 of it)
        assert torch.linalg.vector_norm(gm(x) - expected) <= 1e-2 * torch.linalg.vector_norm(x)


# ------------------------------------------------------------------------------ input validation


def test_cayley_fft_refuses_a_wrong_channel_count_instead_of_mixing_the_batch():
    # Bug: the Fourier-domain forward reshapes with -1 for the batch, so 8 channels into a 4-channel layer
    # silently came out as a batch of 2 (the plain conv refuses such an input).
    torch.manual_seed(0)
    layer = OrthogonalConv2d(4, 4, 3, method="cayley_fft", input_size=(8, 8))
    x = torch.randn(1, 8, 8, 8)
    with pytest.raises(RuntimeError):
        nn.Conv2d(4, 4, 3, padding=1)(x)  # the reference behaviour: torch refuses it too
    with pytest.raises(LayerArgumentError, match=r"in_channels=4.*got shape \(1, 8, 8, 8\)"):
        layer(x)
    with pytest.raises(LayerArgumentError, match=r"in_channels=4.*got shape \(1, 8, 8, 8\)"):
        layer.to_plain()(x)
    # a wrong number of dimensions names the layer too (was a NotImplementedError from F.pad)
    with pytest.raises(LayerArgumentError, match="OrthogonalConv2d"):
        OrthogonalConv2d(4, 4, 3)(torch.randn(8, 8))
    # right inputs, batched or not, still go through: unbatched = the batched output of the same sample
    xs = torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(layer(xs[1]), layer(xs)[1], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------ train / eval mode


def test_replacement_layers_keep_the_models_eval_mode():
    # Bug: OrthogonalConv2d.from_conv / OrthogonalLinear.from_linear returned train-mode layers, so transforming
    # an eval-mode model left train-mode layers inside it (and their inference kernel cache off).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 5)).eval()
    x = torch.randn(2, 3, 4, 4)
    policy = {"rules": [{"match": {"type": "Conv2d"}, "apply": "orthogonal_conv"},
                        {"match": {"type": "Linear"}, "apply": "orthogonal_conv"}]}
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    assert [m.training for m in gm.modules()] == [False] * len(list(gm.modules()))
    assert OrthogonalConv2d.from_conv(nn.Conv2d(3, 6, 3).eval()).training is False
    assert OrthogonalConv2d.from_conv(nn.Conv2d(3, 6, 3)).training is True


# ------------------------------------------------------------------------------ isometric blocks


@pytest.mark.parametrize("make", [lambda: OrthogonalActivationBlock(6),
                                  lambda: ReflectionResidualBlock(6, 4)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_isometric_blocks_run_in_half_precision(make, dtype):
    # Bug: .to(torch.bfloat16) / .half() blocks failed ("geqrf_cpu" not implemented for 'BFloat16').
    torch.manual_seed(0)
    block = make().to(dtype)
    x = torch.randn(5, 6).to(dtype)
    y = block(x)
    assert y.dtype == dtype
    # reference: the same parameters in float32, the formula written out by hand
    raw, bias, xf = block.raw.detach().float(), block.bias.detach().float(), x.float()
    q, r = torch.linalg.qr(raw)
    q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)
    if isinstance(block, OrthogonalActivationBlock):
        ref = (xf @ q.T + bias).abs()
    else:
        ref = xf - 2 * torch.relu(xf @ q + bias) @ q.T
    torch.testing.assert_close(y.float(), ref, atol=5e-2, rtol=2e-2)


def test_isometric_block_arguments():
    # numpy integers are integers (as for torch.nn layers); bad values raise orthofx's LayerArgumentError
    assert OrthogonalActivationBlock(np.int64(4)).weight.shape == (4, 4)
    assert ReflectionResidualBlock(np.int64(5), np.int64(2)).weight.shape == (2, 5)
    for bad, message in [
        (lambda: OrthogonalActivationBlock(0), r"OrthogonalActivationBlock: features must be >= 1, got 0"),
        (lambda: OrthogonalActivationBlock(4, "tanh"),
         r"OrthogonalActivationBlock: activation 'tanh' does not keep the Jacobian orthogonal; choose one of"),
        (lambda: OrthogonalActivationBlock(True),
         r"OrthogonalActivationBlock: features must be a positive integer, got True"),
        (lambda: ReflectionResidualBlock(3, 4),
         r"ReflectionResidualBlock: hidden \(4\) must not exceed features \(3\).*pass hidden <= 3"),
    ]:
        with pytest.raises(LayerArgumentError, match=message):
            bad()


# ------------------------------------------------------------------------------ lazy layers in the passes


def test_passes_on_lazy_layers_use_the_example_inputs():
    # Bug: the convnorm pass refused a lazy conv at planning time although the example inputs, run before the
    # passes, initialise it; without example inputs orthogonal_conv failed with a raw "uninitialized parameter"
    # error. Now: both work with example inputs, both say how to fix it without.
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)

    def lazy_model():
        return nn.Sequential(nn.LazyConv2d(4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))

    gm = orthofx.transform(lazy_model(), "convnorm", example_inputs=(x,))
    wrapped = gm.get_submodule("0")
    assert isinstance(wrapped, ConvNormConv2d) and type(wrapped.conv) is nn.Conv2d
    # reference: the initialised conv wrapped by hand, and the rest of the model as it is
    reference = nn.Sequential(ConvNormConv2d(copy.deepcopy(wrapped.conv)), nn.ReLU(), nn.Flatten(),
                              copy.deepcopy(gm.get_submodule("3")))
    torch.testing.assert_close(gm(x), reference(x), atol=1e-6, rtol=0)

    for policy in ("convnorm", {"rules": [{"match": {"type": "Linear"}, "apply": "orthogonal_conv"}]}):
        with pytest.raises(PlanError, match="example_inputs"):
            orthofx.transform(lazy_model(), policy)


# ------------------------------------------------------------------------------ ConvNorm errors


def test_convnorm_bad_input_raises_layer_argument_errors():
    conv = nn.Conv2d(2, 3, 5)
    with pytest.raises(LayerArgumentError, match="eps"):
        ConvNormConv2d(conv, eps=0.0)
    with pytest.raises(LayerArgumentError, match="momentum"):
        ConvNormConv2d(conv, momentum=2.0)
    layer = ConvNormConv2d(conv)
    with pytest.raises(RuntimeError):
        conv(torch.randn(1, 2, 3, 3))  # reference: the plain conv refuses a 3x3 input for a 5x5 kernel
    with pytest.raises(LayerArgumentError, match=r"^ConvNormConv2d: input size \(3, 3\).*smaller than the dilated "
                                                 "kernel extent 5"):
        layer(torch.randn(1, 2, 3, 3))
    with pytest.raises(LayerArgumentError, match=r"^conv_norm: input size \(3, 3\).*kernel extent 5"):
        conv_norm(torch.randn(1, 2, 3, 3), conv.weight)
