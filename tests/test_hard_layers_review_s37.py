"""Adversarial review of the exactly orthogonal layers (session 37): seeded random grids over the architectures,
each layer checked against its dense operator written here entry by entry in float64 (not taken from orthofx).

``dense_operator`` is the matrix of ``y[m, i] = sum_{c in group(m), p} K[m, c, p] x[c, S i + D p - left]`` with
the index wrapped around (circular) or the term dropped past the borders (zeros). Inside P0's Theorem 4 domain
its singular values must be ``gain`` (``|sigma - 1| <= 1e-5`` in float32), its rows orthonormal in the
row-orthogonal case and its columns in the column-orthogonal one, and the layer's forward must be that matrix
(a transposed layer's forward its transpose); outside, the constructors raise ``ImpossibleLayerError`` quoting
the theorem's condition with the layer's numbers.
"""

from __future__ import annotations

import copy
import inspect
import io
import itertools
import math
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import ImpossibleLayerError, LayerArgumentError
from orthofx.nn.orthogonal import (FourierConv, OrthogonalConv1d, OrthogonalConv2d, OrthogonalConvTranspose1d,
                                   OrthogonalConvTranspose2d, OrthogonalLinear, transposed_size_keeping_padding)
from orthofx.theory import orthogonal_conv_exists

pytestmark = pytest.mark.usefixtures("one_thread")

CONV = {1: OrthogonalConv1d, 2: OrthogonalConv2d}
TRANSPOSED = {1: OrthogonalConvTranspose1d, 2: OrthogonalConvTranspose2d}
TORCH_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
TORCH_TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d}


# ------------------------------------------------------------------------------------------- references


def dense_operator(weight: torch.Tensor, grid, out_grid, stride, dilation, groups: int, lefts,
                   mode: str = "circular") -> np.ndarray:
    """The float64 matrix of the (grouped, strided, dilated) convolution with ``weight`` ``(M, C / groups, *k)``
    from ``(C, *grid)`` to ``(M, *out_grid)``, tap ``p`` of output ``i`` reading input ``S i + D p - left``
    (wrapped around for ``mode="circular"``, zero past the borders for ``"zeros"``). Rows ``(m, i)`` and columns
    ``(c, j)`` in C order."""
    K = weight.detach().to(torch.float64).numpy()
    M, Cg = K.shape[:2]
    d = K.ndim - 2
    Mg = M // groups
    outs = np.array(list(itertools.product(*(range(q) for q in out_grid)))).reshape(-1, d)
    n_out, n_in = len(outs), math.prod(grid)
    A = np.zeros((M * n_out, Cg * groups * n_in))
    for p in itertools.product(*(range(k) for k in K.shape[2:])):
        pos = outs * np.array(stride) + np.array(dilation) * np.array(p) - np.array(lefts)
        inside = np.all((pos >= 0) & (pos < np.array(grid)), axis=1)
        keep = np.ones(n_out, bool) if mode == "circular" else inside
        flat = np.ravel_multi_index(tuple((pos % np.array(grid)).T), tuple(grid))
        for m in range(M):
            for cl in range(Cg):
                c = (m // Mg) * Cg + cl
                rows = m * n_out + np.arange(n_out)[keep]
                np.add.at(A, (rows, c * n_in + flat[keep]), K[(m, cl) + p])
    return A


def polar64(a: torch.Tensor) -> torch.Tensor:
    """``U V^T`` of the float64 SVD of ``a``: the nearest matrix with orthonormal rows or columns."""
    u, _, vh = torch.linalg.svd(a.detach().to(torch.float64), full_matrices=False)
    return u @ vh


def lefts_of(layer) -> tuple[int, ...]:
    return tuple(left for left, _ in layer.pads)


def conv_operator(layer, grid) -> np.ndarray:
    """The dense operator of an orthogonal conv (its weight at its pads) on an input grid divisible by the stride."""
    out_grid = tuple(n // s for n, s in zip(grid, layer.stride))
    return dense_operator(layer.weight, grid, out_grid, layer.stride, layer.dilation, layer.groups, lefts_of(layer))


def assert_orthogonal(A: np.ndarray, case: str, gain: float, tol: float) -> None:
    sigma = np.linalg.svd(A, compute_uv=False)
    assert np.abs(sigma / gain - 1).max() <= tol, (case, np.abs(sigma / gain - 1).max())
    gram = A @ A.T if case == "RO" else A.T @ A
    assert np.abs(gram / gain ** 2 - np.eye(gram.shape[0])).max() <= 4 * tol, case


def apply_dense(A: np.ndarray, x: torch.Tensor, out_shape) -> np.ndarray:
    flat = x.detach().to(torch.float64).reshape(x.shape[0], -1).numpy()
    return (flat @ A.T).reshape(out_shape)


def random_architecture(rng: random.Random) -> dict:
    d = rng.choice([1, 2])
    g = rng.choice([1, 1, 2])
    arch = dict(d=d, groups=g, C=g * rng.randint(1, 3), M=g * rng.randint(1, 5))
    if d == 2 and rng.random() < 0.4:  # non-square kernels, strides and dilations
        arch.update(k=(rng.randint(1, 3), rng.randint(1, 3)), S=(rng.randint(1, 2), rng.randint(1, 3)),
                    D=(rng.choice([1, 2]), rng.choice([1, 3])))
    else:
        arch.update(k=rng.randint(1, 5 if d == 1 else 3), S=rng.randint(1, 3), D=rng.choice([1, 1, 2, 3]))
    return arch


def as_tuple(value, d: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, tuple) else (value,) * d


# ------------------------------------------------------------------------------------------- the domain


@pytest.mark.parametrize("chunk", range(4))
def test_random_architectures_dense_operator_inside_the_domain_and_errors_outside(chunk):
    """Convs and transposed convs, float32 / float64, bias on and off: singular values, Gram of the right side,
    forward = the dense matrix (its transpose for a transposed conv) inside Theorem 4's domain; outside it the
    error quotes the theorem's condition as orthogonal_conv_exists words it, with the layer's numbers."""
    rng = random.Random(370 + chunk)
    inside = outside = 0
    for trial in range(45):
        arch = random_architecture(rng)
        d, C, M, g = arch["d"], arch["C"], arch["M"], arch["groups"]
        ks, ss, ds = (as_tuple(arch[key], d) for key in ("k", "S", "D"))
        transposed = rng.random() < 0.3
        dtype = rng.choice([torch.float32, torch.float64])
        bias = rng.random() < 0.5
        # a transposed conv from C to M channels is the adjoint of the conv from M to C channels
        result = orthogonal_conv_exists(*((M, C) if transposed else (C, M)), ks, ss, dims=d, groups=g, dilation=ds)
        build = (TRANSPOSED if transposed else CONV)[d]
        torch.manual_seed(trial)
        kwargs = dict(stride=arch["S"], dilation=arch["D"], groups=g, bias=bias, dtype=dtype)
        if not result.exists:
            outside += 1
            with pytest.raises(ImpossibleLayerError, match="Theorem 4") as info:
                build(C, M, arch["k"], **kwargs)
            assert result.reason in str(info.value)
            continue
        inside += 1
        layer = build(C, M, arch["k"], **kwargs)
        conv = layer.conv if transposed else layer
        grid = tuple(s * rng.randint(1, 3) for s in ss)  # any grid divisible by the stride, even below the kernel
        A = conv_operator(conv, grid)
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        # the layer's own case: the adjoint's swapped for a transposed layer
        assert_orthogonal(A.T if transposed else A, layer.case, 1.0, tol)
        assert layer.case == (("CO" if result.case == "RO" else "RO") if transposed else result.case)
        small = tuple(n // s for n, s in zip(grid, ss))
        x = torch.randn(2, C, *(small if transposed else grid), dtype=dtype)
        with torch.no_grad():
            y = layer(x)
            if bias:
                y = y - layer.bias.reshape(-1, *(1,) * d)
        expected = apply_dense(A.T if transposed else A, x, y.shape)
        np.testing.assert_allclose(y.to(torch.float64).numpy(), expected, atol=10 * tol, rtol=0)
    assert inside >= 15 and outside >= 2, (inside, outside)


@pytest.mark.parametrize("seed", range(2))
def test_sizes_not_divisible_by_the_stride_and_zero_padding_follow_nn_conv(seed):
    """Any input size: the output has nn.Conv's size for the layer's pads and the forward is the dense matrix of
    the layer's weight with those pads (wrapped for circular, zero for zeros); the frozen conv agrees."""
    rng = random.Random(3700 + seed)
    checked = 0
    for trial in range(40):
        arch = random_architecture(rng)
        d, C, M, g = arch["d"], arch["C"], arch["M"], arch["groups"]
        mode = rng.choice(["circular", "zeros"])
        padding = rng.choice(["same", "same", "valid", rng.randint(0, 2)])
        try:
            layer = CONV[d](C, M, arch["k"], stride=arch["S"], dilation=arch["D"], groups=g, padding=padding,
                            padding_mode=mode, dtype=torch.float64)
        except ImpossibleLayerError:
            continue
        ks, ss, ds = (as_tuple(arch[key], d) for key in ("k", "S", "D"))
        extents = [dl * (k - 1) + 1 for k, dl in zip(ks, ds)]
        grid = tuple(max(e - left - right, 1) + rng.randint(0, 4) for e, (left, right) in zip(extents, layer.pads))
        out_grid = tuple((n + left + right - e) // s + 1
                         for n, (left, right), e, s in zip(grid, layer.pads, extents, ss))
        x = torch.randn(2, C, *grid, dtype=torch.float64)
        with torch.no_grad():
            y = layer(x)
            frozen = layer.to_conv()(x)
        assert tuple(y.shape[2:]) == out_grid, (arch, padding, grid)
        A = dense_operator(layer.weight, grid, out_grid, ss, ds, g, lefts_of(layer), mode)
        expected = apply_dense(A, x, y.shape) + layer.bias.detach().reshape(-1, *(1,) * d).numpy()
        np.testing.assert_allclose(y.numpy(), expected, atol=1e-10, rtol=0)
        torch.testing.assert_close(frozen, y, atol=1e-12, rtol=0)
        checked += 1
    assert checked >= 15


def test_transposed_integer_paddings_are_the_adjoint_on_every_size():
    rng = random.Random(37)
    checked = 0
    for trial in range(40):
        d, g = rng.choice([1, 2]), rng.choice([1, 2])
        C, M = g * rng.randint(1, 3), g * rng.randint(1, 3)
        k, S, D = rng.randint(1, 4), rng.randint(1, 3), rng.choice([1, 2])
        fix = transposed_size_keeping_padding((k,) * d, (S,) * d, (D,) * d)
        if fix is None:
            continue
        try:
            layer = TRANSPOSED[d](C, M, k, stride=S, padding=fix[0], output_padding=fix[1], dilation=D, groups=g,
                                  dtype=torch.float64, bias=False)
        except ImpossibleLayerError:
            continue
        n = rng.randint(1, 4)
        x = torch.randn(2, C, *(n,) * d, dtype=torch.float64)
        with torch.no_grad():
            y = layer(x, output_size=[n * S] * d)
        A = conv_operator(layer.conv, (n * S,) * d)
        np.testing.assert_allclose(y.numpy(), apply_dense(A.T, x, y.shape), atol=1e-10, rtol=0)
        assert_orthogonal(A.T, layer.case, 1.0, 1e-10)
        with torch.no_grad():
            torch.testing.assert_close(layer.to_conv()(x), y, atol=1e-12, rtol=0)
        # the integer padding reads the taps where nn.ConvTranspose writes them: same as the torch layer in the
        # interior (the orthogonal layer wraps the overflow around the borders)
        plain = TORCH_TRANSPOSED[d](C, M, k, stride=S, padding=fix[0], output_padding=fix[1], dilation=D, groups=g,
                                    bias=False, dtype=torch.float64)
        assert plain(x).shape == y.shape
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cayley_fft_dense_operator_and_frozen_forms(dtype):
    rng = random.Random(3737)
    for trial in range(10):
        d, g = rng.choice([1, 2]), rng.choice([1, 2])
        C, M = g * rng.randint(1, 3), g * rng.randint(1, 4)
        S = rng.randint(1, 2)
        n = S * rng.randint(2, 3)
        k = rng.randint(1, n // S * S)
        torch.manual_seed(trial)
        layer = CONV[d](C, M, k, stride=S, groups=g, dtype=dtype, method="cayley_fft", input_size=(n,) * d)
        A = conv_operator(layer, (n,) * d)
        assert_orthogonal(A, layer.case, 1.0, 1e-5 if dtype == torch.float32 else 1e-10)
        x = torch.randn(2, C, *(n,) * d, dtype=dtype)
        with torch.no_grad():
            y = layer(x) - layer.bias.reshape(-1, *(1,) * d)
            np.testing.assert_allclose(y.to(torch.float64).numpy(), apply_dense(A, x, y.shape),
                                       atol=1e-5 if dtype == torch.float32 else 1e-10, rtol=0)
            plain = layer.to_plain()
            assert isinstance(plain, FourierConv)
            for frozen in (plain, layer.to_conv()):
                torch.testing.assert_close(frozen(x), layer(x), atol=1e-5 if dtype == torch.float32 else 1e-10,
                                           rtol=0)


def test_float32_builds_at_realistic_widths_after_training():
    """compute_dtype float32 (the fast build) and the default, after Adam steps: still |sigma - 1| <= 1e-5."""
    torch.manual_seed(0)
    for compute_dtype in (None, torch.float32):
        layer = OrthogonalConv2d(24, 48, 3, stride=2, compute_dtype=compute_dtype)
        optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
        x = torch.randn(2, 24, 6, 6)
        for _ in range(3):
            optimizer.zero_grad()
            layer(x).sin().sum().backward()
            optimizer.step()
        # per-frequency singular values (Sedghi et al.) of the space-to-depth kernel, float64, written here
        W = layer.weight.detach().to(torch.float64)
        Wp = torch.nn.functional.pad(W, (0, 1, 0, 1))  # 3 -> 4 taps, a multiple of the stride
        Wr = Wp.reshape(48, 24, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(48, 96, 2, 2)
        sigma = torch.linalg.svdvals(torch.fft.fft2(Wr, s=(4, 4)).permute(2, 3, 0, 1))
        assert float((sigma - 1).abs().max()) <= 1e-5, compute_dtype


@pytest.mark.parametrize("C, M, k, S, D, g", [(1, 2, 2, 2, 2, 1), (2, 6, 3, 2, 2, 1), (4, 16, 3, 2, (2, 1), 2)])
def test_impossible_because_of_the_dilation_advises_a_coprime_one(C, M, k, S, D, g):
    """Row-orthogonal layers whose only obstacle is a dilation sharing a factor with the stride (its taps read
    fewer residues mod S): the error advises a coprime dilation, and that layer indeed exists (the advice said
    only 'out_channels <= ...')."""
    assert not orthogonal_conv_exists(C, M, k, S, groups=g, dilation=D).exists
    assert orthogonal_conv_exists(C, M, k, S, groups=g).exists
    with pytest.raises(ImpossibleLayerError, match=r"Fix: use a dilation coprime to the stride .*dilation=1"):
        OrthogonalConv2d(C, M, k, stride=S, dilation=D, groups=g)
    with pytest.raises(ImpossibleLayerError, match=r"Fix: use in_channels <= \d+ \(RO conv\), a dilation coprime"):
        OrthogonalConvTranspose2d(M, C, k, stride=S, dilation=D, groups=g)
    OrthogonalConv2d(C, M, k, stride=S, groups=g)
    # where the dilation is not the obstacle the advice stays as it was
    with pytest.raises(ImpossibleLayerError) as info:
        OrthogonalConv2d(1, 4, 1, stride=2)
    assert "coprime" not in str(info.value) and "use kernel_size >= 2" in str(info.value)


# ------------------------------------------------------------------------------------------- gain, gradients


def test_gain_scales_every_singular_value():
    torch.manual_seed(1)
    for gain in (0.25, 3.0):
        for layer in (OrthogonalConv1d(2, 5, 3, stride=2, gain=gain, dtype=torch.float64),
                      OrthogonalConv2d(4, 2, 2, stride=2, gain=gain, dtype=torch.float64)):
            assert_orthogonal(conv_operator(layer, (4,) * layer._dims), layer.case, gain, 1e-10)
        t = OrthogonalConvTranspose1d(4, 2, 4, stride=2, padding=1, gain=gain, dtype=torch.float64)
        assert_orthogonal(conv_operator(t.conv, (6,)).T, t.case, gain, 1e-10)
        lin = OrthogonalLinear(3, 7, gain=gain, dtype=torch.float64)
        assert_orthogonal(lin.weight.detach().numpy(), lin.case, gain, 1e-12)
        c = OrthogonalConv2d(2, 3, 3, method="cayley_fft", input_size=(4, 4), gain=gain, dtype=torch.float64)
        assert_orthogonal(conv_operator(c, (4, 4)), c.case, gain, 1e-10)


TINY = [
    ("conv1d", lambda: OrthogonalConv1d(2, 3, 3, dtype=torch.float64), (1, 2, 5)),
    ("strided", lambda: OrthogonalConv1d(3, 2, 3, stride=2, dtype=torch.float64), (1, 3, 6)),
    ("grouped2d", lambda: OrthogonalConv2d(2, 4, 2, stride=(1, 2), groups=2, dtype=torch.float64), (1, 2, 3, 4)),
    ("dilated", lambda: OrthogonalConv1d(2, 2, 3, stride=2, dilation=3, dtype=torch.float64), (1, 2, 6)),
    ("cayley", lambda: OrthogonalConv2d(2, 3, 3, method="cayley_fft", input_size=(4, 4), dtype=torch.float64),
     (1, 2, 4, 4)),
    ("transposed", lambda: OrthogonalConvTranspose1d(4, 2, 4, stride=2, padding=1, dtype=torch.float64), (1, 4, 3)),
    ("linear", lambda: OrthogonalLinear(3, 5, gain=1.5, dtype=torch.float64), (2, 3)),
]


@pytest.mark.parametrize("name, make, shape", TINY, ids=[t[0] for t in TINY])
def test_gradients_reach_every_parameter_as_finite_differences_say(name, make, shape):
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(*shape, dtype=torch.float64)

    def loss():
        return layer(x).sin().sum()

    layer.zero_grad()
    loss().backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), pname
        for index in torch.randperm(p.numel(), generator=torch.Generator().manual_seed(1))[:3].tolist():
            with torch.no_grad():
                old = float(p.view(-1)[index])
                p.view(-1)[index] = old + 1e-6
                up = float(loss())
                p.view(-1)[index] = old - 1e-6
                down = float(loss())
                p.view(-1)[index] = old
            assert abs((up - down) / 2e-6 - float(p.grad.view(-1)[index])) <= 1e-6 * (1 + abs(up)), (pname, index)


@pytest.mark.parametrize("fused", [False, True])
def test_optimizer_steps_keep_the_dense_operator_orthogonal(fused):
    torch.manual_seed(2)
    layers = [OrthogonalConv2d(3, 6, 3, stride=2, groups=3), OrthogonalConv1d(4, 6, 2, dilation=2),
              OrthogonalConvTranspose2d(8, 4, 4, stride=2, padding=1), OrthogonalLinear(5, 3)]
    inputs = [torch.randn(2, 3, 4, 4), torch.randn(2, 4, 5), torch.randn(2, 8, 2, 2), torch.randn(2, 5)]
    params = [p for layer in layers for p in layer.parameters()]
    optimizer = torch.optim.Adam(params, lr=0.2, fused=fused)
    for _ in range(4):
        optimizer.zero_grad()
        sum(layer(x).square().mean() for layer, x in zip(layers, inputs)).backward()
        optimizer.step()
    assert_orthogonal(conv_operator(layers[0], (4, 4)), "RO", 1.0, 1e-5)
    assert_orthogonal(conv_operator(layers[1], (5,)), "CO", 1.0, 1e-5)
    assert_orthogonal(conv_operator(layers[2].conv, (4, 4)).T, "CO", 1.0, 1e-5)
    assert_orthogonal(layers[3].weight.detach().numpy(), "RO", 1.0, 1e-6)


# ------------------------------------------------------------------------------------------- module protocol

LAYERS = [
    ("conv2d", lambda: OrthogonalConv2d(4, 6, 3), (2, 4, 5, 5)),
    ("strided_grouped", lambda: OrthogonalConv2d(4, 8, 3, stride=2, groups=2), (2, 4, 6, 6)),
    ("rko1d", lambda: OrthogonalConv1d(4, 3, 1, bias=False), (2, 4, 7)),
    ("zeros", lambda: OrthogonalConv1d(2, 2, 4, padding_mode="zeros"), (2, 2, 7)),
    ("cayley", lambda: OrthogonalConv2d(3, 5, 3, method="cayley_fft", input_size=(4, 4)), (2, 3, 4, 4)),
    ("transposed", lambda: OrthogonalConvTranspose2d(8, 4, 4, stride=2, padding=1), (2, 8, 3, 3)),
    ("linear", lambda: OrthogonalLinear(5, 3, gain=2.0), (4, 5)),
]


@pytest.mark.parametrize("name, make, shape", LAYERS, ids=[t[0] for t in LAYERS])
def test_state_dict_copies_dtype_and_modes_give_the_same_outputs(name, make, shape):
    torch.manual_seed(3)
    layer = make()
    x = torch.randn(*shape)
    y = layer(x).detach()
    fresh = make()
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), y)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = make()
    fresh.load_state_dict(torch.load(buffer))
    assert torch.equal(fresh(x), y)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert torch.equal(clone(x), y)
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), y) and torch.equal(layer(x), y)  # built, then from the eval cache
    assert torch.equal(layer(x), y)  # eval with gradients
    for convert in (lambda m: m.double(), lambda m: m.to(torch.float64)):
        wide = convert(copy.deepcopy(layer))
        out = wide(x.double())
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, y.double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, make, shape", LAYERS, ids=[t[0] for t in LAYERS])
def test_eval_cache_follows_every_weight_change(name, make, shape):
    torch.manual_seed(4)
    layer = make().eval()
    x = torch.randn(*shape)

    def uncached():
        with torch.enable_grad():  # a forward with gradients never reads the cache
            return layer(x).detach()

    with torch.no_grad():
        before = layer(x)
        layer.load_state_dict(make().state_dict())  # load_state_dict
        after = layer(x)
        assert not torch.equal(after, before) and torch.equal(after, uncached())
        weight = next(p for n, p in layer.named_parameters() if not n.endswith("bias"))
        weight.mul_(-1.5).add_(0.25)  # an in-place edit under no_grad
        assert torch.equal(layer(x), uncached()) and not torch.equal(layer(x), after)
        weight.data = torch.randn_like(weight)  # new data
        assert torch.equal(layer(x), uncached())
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.3)
    optimizer.zero_grad()
    layer(x).square().sum().backward()
    with torch.no_grad():
        stepped_before = layer(x)
    optimizer.step()  # a step in eval mode (a frozen-BatchNorm fine-tune)
    with torch.no_grad():
        assert torch.equal(layer(x), uncached()) and not torch.equal(layer(x), stepped_before)
    if hasattr(layer, "raw_weight") or not hasattr(layer, "conv"):
        layer.gain = layer.gain * 2  # a setting of the kernel
        with torch.no_grad():
            assert torch.equal(layer(x), uncached())


def test_freeze_of_a_transformed_model_gives_plain_layers_with_the_same_outputs():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 12, 3, stride=2, padding=1),
                          nn.ReLU(), nn.ConvTranspose2d(12, 6, 4, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(6, 4, 1, padding_mode="reflect"), nn.Flatten(), nn.Linear(4 * 64, 10)).eval()
    x = torch.randn(2, 3, 8, 8)
    for params in ({"gain": 0.5}, {"method": "cayley_fft", "init": "random"}, {"padding": "keep"}):
        rules = {"rules": [{"match": {"type": ["Conv2d", "Linear"]}, "apply": "orthogonal_conv", "with": params},
                           {"match": {"type": "ConvTranspose2d"}, "apply": "orthogonal_conv",
                            "with": {"gain": params.get("gain", 1.0)}}]}
        gm = orthofx.transform(model, rules, example_inputs=(x,))
        frozen = orthofx.freeze(gm)
        hard = (OrthogonalConv2d, OrthogonalConvTranspose2d, OrthogonalLinear)
        assert any(isinstance(m, hard) for m in gm.modules())
        assert not any(isinstance(m, hard) for m in frozen.modules())
        with torch.no_grad():
            torch.testing.assert_close(frozen(x), gm.eval()(x), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- torch signatures


@pytest.mark.parametrize("ours, theirs", [(OrthogonalConv1d, nn.Conv1d), (OrthogonalConv2d, nn.Conv2d),
                                          (OrthogonalConvTranspose1d, nn.ConvTranspose1d),
                                          (OrthogonalConvTranspose2d, nn.ConvTranspose2d),
                                          (OrthogonalLinear, nn.Linear)])
def test_positional_parameters_are_torch_s(ours, theirs):
    """Every positional parameter of the torch layer at the same position, by name (``method`` sat between
    ``padding_mode`` and ``device``, so a torch-style positional ``device, dtype`` went to ``method, device``)."""
    def positional(cls):
        return [p.name for p in inspect.signature(cls.__init__).parameters.values()
                if p.kind == p.POSITIONAL_OR_KEYWORD][1:]

    assert positional(ours) == positional(theirs)
    keywords = {"gain", "compute_dtype"} | (set() if ours is OrthogonalLinear else {"method"})
    assert keywords <= {p.name for p in inspect.signature(ours.__init__).parameters.values()
                        if p.kind == p.KEYWORD_ONLY}


def test_torch_style_positional_calls_build_the_same_layer():
    conv = OrthogonalConv2d(4, 4, (3, 1), (1, 1), "same", (2, 1), 2, False, "circular", "cpu", torch.float64)
    assert conv.matrix.dtype == torch.float64 and conv.bias is None and conv.groups == 2
    assert conv.kernel_size == (3, 1) and conv.dilation == (2, 1) and conv.padding == "same"
    up = OrthogonalConvTranspose2d(8, 4, 4, 2, 1, 0, 1, True, 1, "circular", None, torch.float64)
    assert up.conv.matrix.dtype == torch.float64 and up.bias.dtype == torch.float64
    assert up(torch.randn(1, 8, 3, 3, dtype=torch.float64)).shape == (1, 4, 6, 6)
    linear = OrthogonalLinear(3, 4, False, None, torch.float64)
    assert linear.raw_weight.dtype == torch.float64 and linear.bias is None
    # a call written for the old order (method before device) is told the fix, naming the layer
    with pytest.raises(LayerArgumentError, match=r"OrthogonalConv2d: device='bcop' is a method name.*method='bcop'"):
        OrthogonalConv2d(4, 4, 3, 1, "same", 1, 1, True, "circular", "bcop")
    with pytest.raises(LayerArgumentError, match=r"OrthogonalConvTranspose1d: device='rko'"):
        OrthogonalConvTranspose1d(4, 4, 3, 1, "same", 0, 1, True, 1, "circular", "rko")


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel lengths")
def test_nn_conv_arguments_same_string_tuples_and_padding_modes():
    x = torch.randn(2, 3, 7, 6)
    for k in (3, (3, 2), [1, 4]):
        layer = OrthogonalConv2d(3, 5, kernel_size=k, padding="same", padding_mode="zeros")
        reference = nn.Conv2d(3, 5, kernel_size=k, padding="same", padding_mode="zeros")
        assert layer(x).shape == reference(x).shape
        with torch.no_grad():
            reference.weight.copy_(layer.weight)
            reference.bias.copy_(layer.bias)
            torch.testing.assert_close(layer(x), reference(x), atol=1e-6, rtol=0)
        circular = OrthogonalConv2d(3, 5, k, padding="same", padding_mode="circular")
        reference = nn.Conv2d(3, 5, k, padding="same", padding_mode="circular")
        with torch.no_grad():
            reference.weight.copy_(circular.weight)
            reference.bias.copy_(circular.bias)
            torch.testing.assert_close(circular(x), reference(x), atol=1e-6, rtol=0)
    for mode in ("reflect", "replicate", "bogus"):
        with pytest.raises(LayerArgumentError, match=f"padding_mode must be 'circular'.*got '{mode}'"):
            OrthogonalConv2d(3, 5, 3, padding_mode=mode)
    with pytest.raises(LayerArgumentError, match="padding_mode must be 'circular'"):
        OrthogonalConvTranspose2d(3, 5, 3, padding_mode="zeros")


# ------------------------------------------------------------------------------------------- nearest starts


def test_nearest_start_is_the_float64_polar_factor_wherever_it_is_exact():
    """Linear layers, 1x1 convs and k <= S kernels (rko), per group, plain and transposed, with gain: the weight is
    gain times the polar factor of the (reshaped) original weight, the nearest such matrix."""
    rng = random.Random(3770)
    checked = 0
    for trial in range(60):
        d, g = rng.choice([1, 2]), rng.choice([1, 2])
        C, M = g * rng.randint(1, 3), g * rng.randint(1, 4)
        S = tuple(rng.randint(1, 3) for _ in range(d))
        k = tuple(rng.randint(1, s) for s in S)
        gain = rng.choice([1.0, 0.5, 4.0])
        dtype = rng.choice([torch.float32, torch.float64])
        torch.manual_seed(trial)
        try:
            if rng.random() < 0.3:
                module = TORCH_TRANSPOSED[d](C, M, k, stride=S, groups=g, dtype=dtype)
                layer = TRANSPOSED[d].from_conv_transpose(module, gain=gain)
            else:
                module = TORCH_CONV[d](C, M, k, stride=S, groups=g, dtype=dtype)
                layer = CONV[d].from_conv(module, gain=gain)
        except ImpossibleLayerError:
            continue
        W0 = module.weight.detach()
        expected = torch.cat([gain * polar64(block.reshape(block.shape[0], -1)) for block in W0.chunk(g)])
        tol = 2e-6 * gain if dtype == torch.float32 else 1e-12 * gain
        torch.testing.assert_close(layer.weight.detach().double(), expected.reshape(W0.shape), atol=tol, rtol=0)
        assert layer.init_error == pytest.approx(float((expected.reshape(W0.shape) - W0.double()).norm()
                                                       / W0.double().norm()), rel=1e-5)
        checked += 1
    assert checked >= 25
    for n_in, n_out in ((5, 3), (3, 5), (4, 4)):
        linear = nn.Linear(n_in, n_out, dtype=torch.float64)
        layer = OrthogonalLinear.from_linear(linear, gain=3.0)
        torch.testing.assert_close(layer.weight.detach(), 3.0 * polar64(linear.weight), atol=1e-12, rtol=0)
    # through the pass ('init: nearest' is its default), float32 models
    model = nn.Sequential(nn.Conv2d(6, 4, 1), nn.Conv2d(4, 8, 2, stride=2, groups=2), nn.Flatten(),
                          nn.Linear(8 * 4, 5))
    x = torch.randn(1, 6, 4, 4)
    gm = orthofx.transform(model, {"rules": [{"match": {"type": ["Conv2d", "Linear"]}, "apply": "orthogonal_conv",
                                              "with": {"gain": 2.0}}]}, example_inputs=(x,))
    for name, groups in (("0", 1), ("1", 2), ("3", 1)):
        W0 = model.get_submodule(name).weight.detach()
        expected = torch.cat([2.0 * polar64(b.reshape(b.shape[0], -1)) for b in W0.chunk(groups)]).reshape(W0.shape)
        torch.testing.assert_close(gm.get_submodule(name).weight.detach().double(), expected, atol=4e-6, rtol=0)


# ------------------------------------------------------------------------------------------- the pass


def test_pass_statuses_hold_on_the_forward_jacobian_and_impossible_layers_quote_the_theorem():
    """Each replaced layer's report status against its forward's Jacobian (float64, basis inputs): 'hard' has
    singular values gain, 'hard (rows orthonormal ...)' orthonormal rows; impossible layers follow on_impossible."""
    rng = random.Random(37037)
    seen = set()
    for trial in range(30):
        d = rng.choice([1, 2])
        C, M, k, S = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 2)
        kind = rng.choice(["conv", "conv", "transposed"])
        if kind == "conv":
            padding = rng.choice([(k - 1) // 2, 0, k // 2])
            module = TORCH_CONV[d](C, M, k, stride=S, padding=padding,
                                   padding_mode=rng.choice(["zeros", "circular", "reflect"]))
        else:
            module = TORCH_TRANSPOSED[d](C, M, k, stride=S, padding=rng.choice([0, (k - S) // 2 if k >= S else 0]))
        model = nn.Sequential(module).double()
        params = {"gain": rng.choice([1.0, 2.0]), "init": rng.choice(["nearest", "random"]),
                  "padding": rng.choice(["circular", "keep"]) if kind == "conv" else "circular",
                  "on_impossible": rng.choice(["skip", "regularize"])}
        x = torch.randn(1, C, *(4 * S,) * d, dtype=torch.float64)
        gm = orthofx.transform(model, {"rules": [{"match": {"type": type(module).__name__},
                                                  "apply": "orthogonal_conv", "with": params}]}, example_inputs=(x,))
        status = orthofx.manifest_of(gm).changes[0].status
        seen.add(status.split(" (")[0].split(":")[0])
        if not status.startswith("hard"):
            continue
        with torch.no_grad():
            basis = torch.eye(x[0].numel(), dtype=torch.float64).reshape(-1, *x.shape[1:])
            jacobian = (gm(basis) - gm(torch.zeros_like(x))).reshape(basis.shape[0], -1).T.numpy()
        gain = params["gain"]
        if status == "hard":
            sigma = np.linalg.svd(jacobian, compute_uv=False)
            assert np.abs(sigma / gain - 1).max() < 1e-10, (module, params)
        elif status.startswith("hard (rows orthonormal"):
            gram = jacobian @ jacobian.T / gain ** 2
            assert np.abs(gram - np.eye(gram.shape[0])).max() < 1e-10, (module, params)
    assert {"hard", "skipped", "regularised"} <= seen, seen
    shortcut = nn.Sequential(nn.Conv1d(3, 6, 1, stride=2))
    with pytest.raises(ImpossibleLayerError, match=r"exists iff M <= C\*k\^d, here 6 > 3"):
        orthofx.transform(shortcut, {"rules": [{"match": {"type": "Conv1d"}, "apply": "orthogonal_conv"}]})
