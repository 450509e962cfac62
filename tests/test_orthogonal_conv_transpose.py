"""Exactly orthogonal transposed convolutions (orthofx.nn.OrthogonalConvTranspose1d/2d/3d) and the orthogonal_conv
pass on ConvTranspose layers. References: dense float64 operators built entry by entry from the kernel here."""

import itertools
import math

import pytest
import torch
from torch import nn
from references import central_difference

import orthofx
from orthofx.errors import ImpossibleLayerError, LayerArgumentError
from orthofx.nn import OrthogonalConvTranspose1d, OrthogonalConvTranspose2d, OrthogonalConvTranspose3d

LAYERS = {1: OrthogonalConvTranspose1d, 2: OrthogonalConvTranspose2d, 3: OrthogonalConvTranspose3d}


def _left(padding, k, dilation):
    """The documented alignment: output j takes the taps with S i + D p = j + l, l = padding or (k_eff - 1) // 2."""
    if padding == "same":
        return tuple((dl * (kk - 1)) // 2 for kk, dl in zip(k, dilation))
    return padding


def dense_transposed(weight, n, stride, dilation, groups, lefts):
    """T[(o, j), (c, i)] of the circular transposed conv: sum of W[c, o_local, p] over the taps p with
    S i + D p = j + l modulo the output grid n * S, per group; weight (in, out / groups, *k)."""
    cin, opg = weight.shape[:2]
    k = weight.shape[2:]
    big = tuple(a * s for a, s in zip(n, stride))
    T = torch.zeros(opg * groups, *big, cin, *n, dtype=torch.float64)
    ipg = cin // groups
    for c in range(cin):
        g = c // ipg
        for ol in range(opg):
            for p in itertools.product(*map(range, k)):
                for i in itertools.product(*map(range, n)):
                    j = tuple((s * ii + dl * pp - l) % N
                              for s, ii, dl, pp, l, N in zip(stride, i, dilation, p, lefts, big))
                    T[(g * opg + ol,) + j + (c,) + i] += weight[(c, ol) + p]
    return T.reshape(opg * groups * math.prod(big), cin * math.prod(n))


def dense_of(fn, shape):
    """The matrix of a linear map on inputs of ``shape`` (channels, *spatial), column by column."""
    size = math.prod(shape)
    basis = torch.eye(size, dtype=torch.float64).reshape(size, *shape)
    with torch.no_grad():
        return fn(basis).reshape(size, -1).T


# (in, out, k, stride, dilation, groups, padding, output_padding, n)
CASES = [
    (4, 2, 4, 2, 1, 1, 1, 0, (4,)),                 # conv 2 -> 4 RO: layer CO
    (8, 2, 3, 3, 1, 1, "same", 0, (3,)),            # conv 2 -> 8 CO (M > C S): layer RO, stride 3
    (3, 5, 2, 1, 2, 1, "same", 0, (5,)),            # stride 1, dilated, even kernel
    (3, 5, 4, 1, 1, 1, "same", 0, (5,)),            # stride 1, even kernel: asymmetric pads (1, 2)
    (2, 2, 7, 1, 1, 1, "same", 0, (2,)),            # pads 3 > the grid 2: the overflow wraps twice
    (4, 6, 3, 2, 1, 2, 1, 1, (3,)),                 # groups, k = 3, S = 2, p = 1, output_padding = 1
    (4, 4, 3, 2, 3, 1, "same", 0, (3,)),            # dilation coprime to the stride
    (8, 4, 4, 2, 1, 1, 1, 0, (3, 3)),               # the usual decoder upsampling
    (4, 4, 2, 2, 1, 1, 0, 0, (3, 2)),               # k = S, p = 0
    (3, 3, 3, 1, 1, 1, 1, 0, (3, 4)),               # k = 3, S = 1, p = 1
    (12, 2, 2, 2, 1, 1, "same", 0, (2, 2)),         # conv CO: layer RO
    (2, 3, (2, 3), 1, 1, 1, "same", 0, (3, 3)),     # stride 1, pads (0, 1) and (1, 1)
    (4, 6, (3, 2), (1, 2), (2, 1), 2, "same", 0, (4, 2)),
    (4, 2, (2, 3, 2), (2, 1, 2), 1, 1, "same", 0, (2, 3, 2)),   # 3-D
    (6, 2, 3, 3, 1, 1, "same", 0, (2, 1, 2)),      # 3-D, stride 3, conv CO: layer RO
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{len(c[-1])}d-in{c[0]}-out{c[1]}-k{c[2]}-s{c[3]}")
def test_dense_operator_is_orthogonal_and_adjoint_of_its_conv(case):
    cin, cout, k, stride, dilation, groups, padding, output_padding, n = case
    d = len(n)
    torch.manual_seed(0)
    layer = LAYERS[d](cin, cout, k, stride=stride, padding=padding, output_padding=output_padding, groups=groups,
                      dilation=dilation, bias=False, dtype=torch.float64)
    ks, ss, ds = (tuple(v) if isinstance(v, tuple) else (v,) * d for v in (k, stride, dilation))
    w = layer.weight.detach()
    assert w.shape == (cin, cout // groups, *ks)            # nn.ConvTranspose's layout
    reference = dense_transposed(w, n, ss, ds, groups, _left(padding if padding == "same" else (padding,) * d,
                                                              ks, ds))
    T = dense_of(layer, (cin, *n))
    torch.testing.assert_close(T, reference, atol=1e-12, rtol=0)
    sv = torch.linalg.svdvals(reference)
    assert sv.numel() == min(reference.shape)
    torch.testing.assert_close(sv, torch.ones_like(sv), atol=1e-10, rtol=0)
    expected_case = "CO" if reference.shape[0] >= reference.shape[1] else "RO"
    assert layer.case == expected_case
    # the exact adjoint of its conv (out -> in channels on the grid n * S)
    big = tuple(a * s for a, s in zip(n, ss))
    A = dense_of(layer.conv, (cout, *big))
    torch.testing.assert_close(T, A.T, atol=1e-12, rtol=0)
    x = torch.randn(2, cin, *n, dtype=torch.float64)
    y = torch.randn(2, cout, *big, dtype=torch.float64)
    with torch.no_grad():
        assert abs(float((layer(x) * y).sum() - (x * layer.conv(y)).sum())) < 1e-10


def test_writes_where_the_torch_layer_writes_away_from_the_wrap():
    """Same weight as nn.ConvTranspose2d(k=4, S=2, p=1): equal outputs except the first and last row / column,
    which receive the overflow wrapped around (the chosen alignment, l = padding)."""
    torch.manual_seed(1)
    layer = OrthogonalConvTranspose2d(6, 3, 4, stride=2, padding=1, dtype=torch.float64)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        ours = layer(x)
        plain = torch.nn.functional.conv_transpose2d(x, layer.weight, layer.bias, stride=2, padding=1)
    assert ours.shape == plain.shape == (2, 3, 10, 10)
    torch.testing.assert_close(ours[..., 1:-1, 1:-1], plain[..., 1:-1, 1:-1], atol=1e-12, rtol=0)
    assert (ours[..., 0, :] - plain[..., 0, :]).abs().max() > 1e-3


def test_nearest_init_of_an_orthogonal_patch_layer_is_exact():
    """k = S, p = 0 (the U-Net up-convolution): no overflow, and the polar factor keeps an orthogonal kernel, so the
    replacement computes what the original computes."""
    torch.manual_seed(2)
    source = OrthogonalConvTranspose2d(8, 4, 2, stride=2, padding=0, dtype=torch.float64)
    module = nn.ConvTranspose2d(8, 4, 2, stride=2, dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(source.weight)
    layer = OrthogonalConvTranspose2d.from_conv_transpose(module)
    assert layer.init_error < 1e-12
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), module(x), atol=1e-12, rtol=0)


def test_impossible_shape_quotes_the_theorem():
    # the adjoint of the ResNet strided shortcut: conv 4 -> 8, k = 1, S = 2 has no orthogonal version
    with pytest.raises(ImpossibleLayerError, match=r"P0 Theorem 4.*here 8 > 4"):
        OrthogonalConvTranspose2d(8, 4, 1, stride=2)
    with pytest.raises(ImpossibleLayerError, match=r"exists iff S <= k, here 3 > 2"):
        OrthogonalConvTranspose1d(16, 2, 2, stride=3)     # conv 2 -> 16 CO needs S <= k


def test_unsupported_padding_says_what_is_supported():
    with pytest.raises(LayerArgumentError, match=r"does not give the output size input \* stride.*padding='same'"):
        OrthogonalConvTranspose2d(8, 4, 3, stride=2, padding=1)                   # output 2n - 1
    with pytest.raises(LayerArgumentError, match="output_padding"):
        OrthogonalConvTranspose2d(8, 4, 4, stride=2, output_padding=1)
    with pytest.raises(LayerArgumentError, match="circular"):
        OrthogonalConvTranspose2d(8, 4, 4, stride=2, padding_mode="zeros")


def test_symbolic_trace_and_frozen_form_match():
    torch.manual_seed(5)
    layer = OrthogonalConvTranspose3d(4, 2, (2, 3, 2), stride=(2, 1, 2))
    model = nn.Sequential(layer, nn.ReLU())
    x = torch.randn(2, 4, 2, 3, 2)
    traced = torch.fx.symbolic_trace(model)
    frozen = torch.fx.symbolic_trace(layer.to_plain())
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(traced(x), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.relu(frozen(x)), expected, atol=1e-5, rtol=0)


def test_gradients_reach_the_parameters():
    torch.manual_seed(3)
    layer = OrthogonalConvTranspose2d(8, 4, 4, stride=2, padding=1).double()
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    target = torch.randn(2, 4, 8, 8, dtype=torch.float64)

    def loss():
        return (layer(x) * target).sum() + layer(x).square().sum()

    loss().backward()
    assert {n for n, _ in layer.named_parameters()} >= {"bias", "conv.matrix"}
    # every parameter's gradient against central differences in float64 (3 entries each)
    eps = 1e-6
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        for index in torch.randperm(p.numel(), generator=torch.Generator().manual_seed(0))[:3].tolist():
            assert central_difference(loss, p.view(-1), index, eps) == pytest.approx(
                p.grad.view(-1)[index].item(), rel=1e-6, abs=1e-6), name


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up1 = nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(16, 4, 2, stride=2)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        h = torch.relu(self.enc(x))
        u = torch.relu(self.up1(h))
        return self.head(self.up2(torch.cat([u, u], 1)))


def test_pass_on_a_decoder_gives_hard_rows_and_freezes_and_exports(tmp_path):
    torch.manual_seed(4)
    model = Decoder().eval()
    x = torch.randn(2, 3, 8, 8)
    policy = {"rules": [{"match": {"type": ["Conv2d", "ConvTranspose2d"]}, "apply": "orthogonal_conv",
                         "with": {"on_impossible": "regularize"}}]}
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    statuses = {c.site: c.status for c in orthofx.manifest_of(gm).changes}
    assert statuses["up1"] == statuses["up2"] == "hard"
    assert isinstance(gm.get_submodule("up1"), OrthogonalConvTranspose2d)
    rows = {r["site"]: r for r in orthofx.report(gm).rows}
    for site in ("up1", "up2"):
        assert abs(rows[site]["sigma_min"] - 1) < 1e-5 and abs(rows[site]["sigma_max"] - 1) < 1e-5, rows[site]
        assert rows[site]["exists"] == "yes (CO)"
    gm.eval()
    with torch.no_grad():
        expected = gm(x)
    frozen = orthofx.freeze(gm, (x,))
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), expected, atol=1e-5, rtol=0)
    assert not any(isinstance(m, OrthogonalConvTranspose2d) for m in frozen.modules())
    orthofx.export(gm, tmp_path / "m.pt2", example_inputs=(x,))
    assert (tmp_path / "m.pt2").exists()
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    orthofx.export(gm, tmp_path / "m.onnx", example_inputs=(x,))
    assert (tmp_path / "m.onnx").exists()


def test_pass_regularizes_where_no_transposed_layer_exists():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ConvTranspose2d(8, 4, 1, stride=2))
    policy = {"rules": [{"match": {"type": ["ConvTranspose2d"]}, "apply": "orthogonal_conv",
                         "with": {"on_impossible": "regularize"}}]}
    gm = orthofx.transform(model, policy)
    change = orthofx.manifest_of(gm).changes[0]
    assert change.status == "regularised (no orthogonal version)" and "P0 Theorem 4" in change.what
    assert isinstance(gm.get_submodule("1"), nn.ConvTranspose2d)
    with pytest.raises(ImpossibleLayerError, match="adjoint of the convolution 4 -> 8"):
        orthofx.transform(model, {"rules": [{"match": {"type": ["ConvTranspose2d"]}, "apply": "orthogonal_conv"}]})


@pytest.mark.parametrize("n, l, r", [(5, 1, 2), (4, 2, 2), (3, 0, 3), (2, 3, 1), (1, 2, 2), (6, 5, 4)])
def test_circular_fold_adds_each_entry_onto_its_residue(n, l, r):
    """Both routes of circular_fold (slices when l + r <= n, a padded reshape otherwise) against a loop that adds
    entry j onto (j - l) mod n, along two dimensions at once."""
    from orthofx.nn.padding import circular_fold

    x = torch.randn(2, 3, n + l + r, n + r + l, dtype=torch.float64)
    reference = torch.zeros(2, 3, n, n, dtype=torch.float64)
    for i in range(n + l + r):
        for j in range(n + r + l):
            reference[..., (i - l) % n, (j - r) % n] += x[..., i, j]
    torch.testing.assert_close(circular_fold(x, [(l, r), (r, l)]), reference, rtol=0, atol=1e-12)


# (kernel_size, stride, dilation, a padding whose output size is not input * stride)
SIZE_FIX_CASES = [(3, 2, 1, 0), (4, 2, 1, 0), (5, 2, 2, 1), (3, 1, 2, 0), (1, 3, 1, 1), (2, 3, 2, 1), (3, 3, 2, 0),
                  ((3, 4), (2, 2), (2, 1), 0)]
_ERROR_POLICY = {"rules": [{"match": {"type": ["ConvTranspose2d"]}, "apply": "orthogonal_conv"}]}


def _pair(v):
    return tuple(v) if isinstance(v, tuple) else (v, v)


@pytest.mark.parametrize("k, stride, dilation, wrong", SIZE_FIX_CASES)
def test_wrong_padding_error_suggests_the_padding_that_keeps_this_layers_size(k, stride, dilation, wrong):
    """The pass's error names a padding / output_padding for the layer's own kernel, stride and dilation; torch's
    nn.ConvTranspose2d with them gives the output size input * stride, and the orthogonal layer accepts them."""
    import re

    module = nn.ConvTranspose2d(4, 4, k, stride=stride, dilation=dilation, padding=wrong)
    S = _pair(stride)
    assert module(torch.zeros(1, 4, 3, 4)).shape[2:] != (3 * S[0], 4 * S[1])   # the case is really wrong
    with pytest.raises(ImpossibleLayerError, match="another output size than input \\* stride") as info:
        orthofx.transform(nn.Sequential(module), _ERROR_POLICY)
    found = re.search(r"use padding=\((\d+), (\d+)\), output_padding=\((\d+), (\d+)\)", str(info.value))
    assert found, str(info.value)
    numbers = tuple(map(int, found.groups()))
    padding, output_padding = numbers[:2], numbers[2:]
    fixed = nn.ConvTranspose2d(4, 4, k, stride=stride, dilation=dilation, padding=padding,
                               output_padding=output_padding)
    for n in ((1, 2), (3, 4), (5, 5)):
        with torch.no_grad():
            assert fixed(torch.zeros(1, 4, *n)).shape[2:] == (n[0] * S[0], n[1] * S[1])
    layer = OrthogonalConvTranspose2d(4, 4, k, stride=stride, dilation=dilation, padding=padding,
                                      output_padding=output_padding)
    assert layer(torch.zeros(1, 4, 3, 4)).shape[2:] == (3 * S[0], 4 * S[1])
    gm = orthofx.transform(nn.Sequential(fixed), _ERROR_POLICY)          # the pass takes the fixed module
    assert isinstance(gm.get_submodule("0"), OrthogonalConvTranspose2d)
    # the layer's own error suggests the same numbers
    with pytest.raises(LayerArgumentError, match=re.escape(f"padding={padding}, output_padding={output_padding} "
                                                           f"does")):
        OrthogonalConvTranspose2d(4, 4, k, stride=stride, dilation=dilation, padding=wrong)


@pytest.mark.parametrize("k, dilation", [(4, 1), (2, 3)])
def test_wrong_padding_error_says_when_no_padding_keeps_the_size(k, dilation):
    """Stride 1 with dilation * (k - 1) odd: no padding with 0 <= output_padding < stride gives input * stride
    (checked with torch over every padding up to the kernel's extent), and the error says so."""
    extent = dilation * (k - 1) + 1
    for p in range(extent + 1):
        plain = nn.ConvTranspose1d(2, 2, k, stride=1, dilation=dilation, padding=p)
        assert plain(torch.zeros(1, 2, 6)).shape[-1] != 6
    module = nn.ConvTranspose2d(4, 4, k, dilation=dilation, padding=1)
    with pytest.raises(ImpossibleLayerError, match="no padding and output_padding .* give it with "
                                                   r"kernel_size=\(\d, \d\), stride=\(1, 1\)"):
        orthofx.transform(nn.Sequential(module), _ERROR_POLICY)


def _fold_by_index(full, lefts, sizes):
    """Add entry j of each spatial dimension of ``full`` onto (j - l) mod N (index_add, dimension by dimension)."""
    for axis, (l, N) in enumerate(zip(lefts, sizes), start=2):
        target = (torch.arange(full.shape[axis]) - l) % N
        shape = list(full.shape)
        shape[axis] = N
        full = torch.zeros(shape, dtype=full.dtype).index_add_(axis, target, full)
    return full


@pytest.mark.parametrize("training, bias, frozen, kwargs", [
    (False, True, True, dict(kernel_size=4, stride=2, padding=1)),
    (True, False, False, dict(kernel_size=3, stride=2, padding=3, output_padding=1, dilation=3)),
])
def test_from_conv_transpose_builds_its_adjoint_conv_once(training, bias, frozen, kwargs):
    """from_conv_transpose builds one OrthogonalConv2d (the nearest start from the module's weight), not a random
    one first; the layer keeps the module's padding, bias, dtype, modes and requires_grad, and computes the
    adjoint of its conv: the transposed conv of the conv's kernel with the overflow folded back by index."""
    from unittest import mock

    from orthofx.nn.orthogonal import _OrthogonalConvNd

    built = []
    original = _OrthogonalConvNd.__init__

    def counting_init(self, *args, **kw):
        built.append(type(self).__name__)
        original(self, *args, **kw)

    torch.manual_seed(6)
    module = nn.ConvTranspose2d(6, 4, bias=bias, dtype=torch.float64, **kwargs).train(training)
    module.weight.requires_grad_(not frozen)
    with mock.patch.object(_OrthogonalConvNd, "__init__", counting_init):
        layer = OrthogonalConvTranspose2d.from_conv_transpose(module, padding="keep", fit_steps=3)
    assert built == ["OrthogonalConv2d"]
    assert layer.padding == module.padding and layer.output_padding == module.output_padding
    assert all(m.training == training for m in layer.modules())
    assert layer.conv.matrix.dtype == torch.float64 and layer.conv.matrix.requires_grad == (not frozen)
    with torch.no_grad():
        distance = float((layer.weight - module.weight).norm() / module.weight.norm())
    assert layer.init_error == pytest.approx(distance, abs=1e-9)
    if bias:
        assert torch.equal(layer.bias, module.bias) and layer.bias.requires_grad
    else:
        assert layer.bias is None
    # from_conv's kernel (built for init_error) stays cached for eval-mode forwards: the flags were set, not train()
    assert "_eval_cache" in layer.conv.__dict__
    n = (3, 4)
    x = torch.randn(2, 6, *n, dtype=torch.float64)
    S, D, l = 2, kwargs.get("dilation", 1), kwargs["padding"]
    big = tuple(a * S for a in n)
    with torch.no_grad():
        kernel = layer.conv.weight
        full = torch.nn.functional.conv_transpose2d(x, kernel, stride=S, dilation=D)
        expected = _fold_by_index(full, (l, l), big)
        if bias:
            expected = expected + module.bias.reshape(-1, 1, 1)
        torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=0)
        y = torch.randn(2, 4, *big, dtype=torch.float64)
        linear = layer(x) - (module.bias.reshape(-1, 1, 1) if bias else 0)
        assert abs(float((linear * y).sum() - (x * layer.conv(y)).sum())) < 1e-10


@pytest.mark.parametrize("kwargs", [dict(stride=2, padding=1, output_padding=1, bias=False),
                                    dict(stride=2, padding=1, output_padding=1, groups=2),
                                    dict(stride=1, padding=2, dilation=2)])
def test_repr_lists_the_torch_arguments_as_torch_does(kwargs):
    layer = OrthogonalConvTranspose2d(8, 4, 3, **kwargs)
    torch_layer = nn.ConvTranspose2d(8, 4, 3, **kwargs)
    assert layer.extra_repr().startswith(torch_layer.extra_repr() + ", method=")
