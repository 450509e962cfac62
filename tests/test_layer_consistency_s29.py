"""Session 29: two consistencies between orthofx's layers and torch's.

1. Orthogonal transposed convolutions (and their frozen forms) under ``torch.autocast`` return autocast's dtype, as
   ``nn.ConvTranspose{d}d`` and orthofx's non-transposed orthogonal layers do; they returned float32 because the bias,
   added after the circular fold (outside the conv autocast casts), promoted the half-precision output back. The
   kernel is still built in float32 with autocast off: checked against a dense float64 operator built here with loops
   from the kernel alone (the adjoint of the circular strided conv), not through orthofx.
2. ConvNorm never calls the wrapped conv's forward (it convolves with the weight itself), so a conv subclass whose
   class overrides ``forward`` / ``_conv_forward`` had that code dropped silently: the wrapper now refuses it with a
   LayerArgumentError and the ``convnorm`` pass skips it with the reason, consistently.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthofx
from orthofx.errors import LayerArgumentError, PlanError
from orthofx.nn import (ConvNormConv1d, ConvNormConv2d, OrthogonalConv1d, OrthogonalConv2d,
                        OrthogonalConvTranspose1d, OrthogonalConvTranspose2d, OrthogonalLinear, with_convnorm)

BF16 = torch.bfloat16
TORCH_TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d}
ORTHOGONAL_TRANSPOSED = {1: OrthogonalConvTranspose1d, 2: OrthogonalConvTranspose2d}

# (dims, in, out, kernel, stride, padding, output_padding, groups, input spatial size)
CASES = [
    (2, 8, 4, 4, 2, 1, 0, 1, (3, 3)),   # a decoder's upsampling, CO
    (2, 4, 4, 3, 1, "same", 0, 1, (4, 5)),  # stride 1, square
    (2, 8, 4, 3, 2, 1, 1, 2, (3, 2)),   # odd kernel with output_padding, grouped
    (1, 8, 4, 4, 2, 1, 0, 1, (5,)),
    (1, 6, 2, 2, 2, 0, 0, 1, (4,)),     # RO: in > out * stride
]


def _dense_adjoint_operator(layer) -> torch.Tensor:
    """The float64 matrix ``A`` (rows: the adjoint conv's outputs ``(in_channels, *n)``; columns: the layer's
    outputs ``(out_channels, *n S)``) of the circular conv whose adjoint the transposed layer is:
    ``(A y)[m, i] = sum_{c, p} K[m, c, p] y[g c, (S i + D p - l) mod n S]``, ``K`` the layer's weight in
    ``nn.ConvTranspose``'s layout ``(in, out / groups, *k)``, ``l`` the left pads. Built with loops from the
    kernel, the stride, dilation, groups and pads alone; the layer computes ``A^T x + bias``."""
    K = layer.weight.detach().to(torch.float64)
    d = K.ndim - 2
    n_in = layer._n  # set by the caller: the input's spatial size
    n_out = tuple(n * s for n, s in zip(n_in, layer.stride))
    lefts = tuple(left for left, _ in layer.pads)
    cin, cout_g = K.shape[:2]
    groups = layer.groups
    in_per_group = cin // groups
    A = torch.zeros(cin, *n_in, cout_g * groups, *n_out, dtype=torch.float64)
    for m in range(cin):
        g = m // in_per_group
        for c in range(cout_g):
            for i in itertools.product(*(range(n) for n in n_in)):
                for p in itertools.product(*(range(k) for k in K.shape[2:])):
                    j = tuple((s * ii + dl * pp - left) % no for s, ii, dl, pp, left, no
                              in zip(layer.stride, i, layer.dilation, p, lefts, n_out))
                    A[(m, *i, g * cout_g + c, *j)] += K[(m, c, *p)]
    rows = cin * torch.Size(n_in).numel()
    assert d == len(n_in)
    return A.reshape(rows, -1)


def _layer(dims, cin, cout, k, s, pad, opad, groups, bias=True):
    torch.manual_seed(dims * 100 + cin + 7 * cout + k)
    cls = ORTHOGONAL_TRANSPOSED[dims]
    return cls(cin, cout, k, stride=s, padding=pad, output_padding=opad, groups=groups, bias=bias)


def _reference(layer, x: torch.Tensor, n) -> torch.Tensor:
    layer._n = tuple(n)
    A = _dense_adjoint_operator(layer)
    y = x.to(torch.float64).reshape(x.shape[0], -1) @ A
    y = y.reshape(x.shape[0], layer.out_channels, *(v * s for v, s in zip(n, layer.stride)))
    if layer.bias is not None:
        y = y + layer.bias.detach().to(torch.float64).reshape(-1, *(1,) * len(n))
    return y


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}d-{c[1]}-{c[2]}-k{c[3]}-s{c[4]}-g{c[7]}")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_transposed_layers_follow_autocast_like_torch(case, bias, mode):
    dims, cin, cout, k, s, pad, opad, groups, n = case
    layer = _layer(dims, cin, cout, k, s, pad, opad, groups, bias)
    getattr(layer, mode)()
    x = torch.randn(2, cin, *n)
    ref = _reference(layer, x, n)
    torch.testing.assert_close(layer(x).double(), ref, rtol=0, atol=1e-5)  # the float32 layer, as before
    frozen = layer.to_plain()
    torch_layer = TORCH_TRANSPOSED[dims](cin, cout, k, stride=s, padding=1 if pad == "same" else pad,
                                         output_padding=opad, groups=groups, bias=bias)
    output_size = tuple(v * st for v, st in zip(n, layer.stride))
    with torch.autocast("cpu", dtype=BF16):
        expected = torch_layer(x).dtype
        outputs = [layer(x), frozen(x), layer(x, output_size=output_size), frozen(x, output_size=output_size)]
        weight_under_autocast = layer.weight
    assert expected == BF16
    scale = ref.abs().max().item()
    for y in outputs:
        assert y.dtype == expected  # float32 before with a bias (the fold's bias promoted the output)
        # bf16 has an 8-bit mantissa: inputs, kernel and output each rounded once
        torch.testing.assert_close(y.double(), ref, rtol=0, atol=3 * 2 ** -8 * scale)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)  # the frozen form is the same computation
    # the kernel is still built in float32 with autocast off: bit for bit the one built outside, orthogonal
    assert weight_under_autocast.dtype == torch.float32
    assert torch.equal(weight_under_autocast, layer.weight)
    layer._n = tuple(n)
    sigma = torch.linalg.svdvals(_dense_adjoint_operator(layer))
    assert (sigma - 1).abs().max().item() < 1e-6


def test_transposed_bias_gradient_under_autocast_is_float32_and_exact():
    layer = _layer(2, 8, 4, 4, 2, 1, 0, 1)
    x = torch.randn(3, 8, 3, 3)
    with torch.autocast("cpu", dtype=BF16):
        y = layer(x)
    y.float().sum().backward()
    assert layer.bias.grad.dtype == torch.float32
    # d(sum y) / d bias_c = the number of outputs of channel c (independent of the conv's rounding)
    torch.testing.assert_close(layer.bias.grad, torch.full((4,), 3.0 * 6 * 6), rtol=0, atol=0)


def test_non_transposed_layers_and_torch_return_autocast_dtype():
    """The reference behaviour the transposed layers now share: every orthogonal layer and its frozen form return
    autocast's dtype, as torch's layers do."""
    torch.manual_seed(0)
    x2, x1 = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 10)
    layers = [(OrthogonalConv2d(4, 4, 3), x2), (OrthogonalConv1d(4, 4, 3), x1), (OrthogonalLinear(10, 10), x1),
              (nn.Conv2d(4, 4, 3), x2), (nn.ConvTranspose1d(4, 2, 4, 2, 1), x1)]
    for layer, x in layers:
        plain = layer.to_plain() if hasattr(layer, "to_plain") else layer
        with torch.autocast("cpu", dtype=BF16):
            assert layer(x).dtype == BF16 and plain(x).dtype == BF16, type(layer).__name__


def test_transposed_dtype_outside_autocast_unchanged():
    layer = _layer(1, 8, 4, 4, 2, 1, 0, 1).double()
    x = torch.randn(2, 8, 5, dtype=torch.float64)
    assert layer(x).dtype == torch.float64 and layer.to_plain()(x).dtype == torch.float64
    torch.testing.assert_close(layer(x), _reference(layer, x, (5,)), rtol=0, atol=1e-12)


def test_traced_frozen_transposed_layer_follows_autocast():
    """A ``torch.fx.symbolic_trace`` of the frozen form records the cast, so the traced graph run under autocast
    returns autocast's dtype too."""
    layer = _layer(2, 8, 4, 4, 2, 1, 0, 1)
    traced = torch.fx.symbolic_trace(layer.to_plain())
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(traced(x), layer(x), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=BF16):
        assert traced(x).dtype == BF16


# ------------------------------------------------------------------------------------------------ 2. ConvNorm


class ScaledConv2d(nn.Conv2d):
    """A conv subclass whose forward differs from its weight's convolution."""

    def forward(self, x):
        return 2 * super().forward(x)


class ShiftedConv1d(nn.Conv1d):
    """Overrides ``_conv_forward`` only (its forward is nn.Conv1d's, so capture keeps it a leaf by default)."""

    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight, bias) + 1.0


class TaggedConv2d(nn.Conv2d):
    """A subclass with a constructor and an attribute of its own and torch's forward: still wrapped."""

    def __init__(self, channels):
        super().__init__(channels, channels, 3, padding=1)
        self.tag = "mine"


@pytest.mark.parametrize("make", [lambda: ScaledConv2d(3, 4, 3, padding=1), lambda: ShiftedConv1d(3, 4, 3)])
def test_convnorm_refuses_a_conv_subclass_with_its_own_forward(make):
    conv = make()
    wrapper = ConvNormConv2d if isinstance(conv, nn.Conv2d) else ConvNormConv1d
    for build in (lambda: wrapper(conv), lambda: with_convnorm(conv, affine=True)):
        with pytest.raises(LayerArgumentError) as info:
            build()
        message = str(info.value)
        name = type(conv).__name__
        method = "forward" if name == "ScaledConv2d" else "_conv_forward"
        assert f"{name} overrides nn.{type(conv).__mro__[1].__name__}.{method}" in message  # what
        assert wrapper.__name__ in message and "never calls the conv's forward" in message  # where, why
        assert "register_parametrization" in message  # the fix
        assert isinstance(info.value, TypeError)  # as the constructor's other type checks
    assert not hasattr(conv, "_orthofx_convnorm_inner")  # a refused wrapper leaves the conv unmarked


def test_convnorm_still_wraps_subclasses_keeping_torch_forward_and_parametrized_convs():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 7, 7)
    tagged = TaggedConv2d(3)
    plain = nn.Conv2d(3, 3, 3, padding=1)
    plain.load_state_dict(tagged.state_dict())
    torch.testing.assert_close(ConvNormConv2d(tagged)(x), ConvNormConv2d(plain)(x), rtol=0, atol=0)
    # a weight change written as a parametrization is read at every forward: the supported form of what a
    # forward override such as weight standardisation does
    param = nn.Conv2d(3, 3, 3, padding=1)
    torch.nn.utils.parametrize.register_parametrization(param, "weight", _Standardise())
    layer = ConvNormConv2d(param)
    standardised = nn.Conv2d(3, 3, 3, padding=1)
    with torch.no_grad():
        standardised.weight.copy_(param.weight)
        standardised.bias.copy_(param.bias)
    torch.testing.assert_close(layer(x), ConvNormConv2d(standardised)(x), rtol=0, atol=1e-6)


class _Standardise(nn.Module):
    def forward(self, w):
        return (w - w.mean(dim=(1, 2, 3), keepdim=True)) / w.std(dim=(1, 2, 3), keepdim=True)


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.scaled = ScaledConv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(self.act(self.scaled(x)))


def _scaled_reference(model: _Model, x: torch.Tensor) -> torch.Tensor:
    """The subclass's own computation, written out: twice the plain convolution."""
    s = model.scaled
    return 2 * F.conv2d(x, s.weight, s.bias, padding=1)


@pytest.mark.parametrize("leaf", [True, False])
def test_convnorm_pass_skips_a_conv_subclass_with_its_own_forward(leaf):
    torch.manual_seed(2)
    model, x = _Model(), torch.randn(2, 3, 8, 8)
    rules = [{"match": {"type": "Conv2d"}, "apply": "convnorm"}]
    policy = {"capture": {"leaf_modules": ["ScaledConv2d"]}, "rules": rules} if leaf else {"rules": rules}
    plan = orthofx.explain(model, policy, example_inputs=(x,))
    if leaf:  # a site now: skipped with the wrapper's reason (it was wrapped, its forward dropped)
        skipped = {site.name: reason for site, _, reason in plan.skipped}
        assert "ScaledConv2d overrides nn.Conv2d.forward" in skipped["scaled"]
        assert "parametrization" in skipped["scaled"]
    else:  # traced through, as before: no site
        assert "does not reach scaled" in str(plan)
    assert [e.site.name for e in plan.entries] == ["conv"]
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    assert [c.site for c in gm.meta["orthofx"].changes] == ["conv"]
    # the subclass's forward still runs: the model's hidden activation is 2 * conv, not a normalised conv
    hidden = {}
    gm.get_submodule("act").register_forward_hook(lambda m, a, out: hidden.setdefault("h", a[0]))
    gm(x)
    torch.testing.assert_close(hidden["h"], _scaled_reference(model, x), rtol=1e-6, atol=1e-6)


def test_convnorm_rule_selecting_only_such_subclasses_is_a_plan_error():
    model, x = _Model(), torch.randn(1, 3, 8, 8)
    policy = {"capture": {"leaf_modules": ["ScaledConv2d"]},
              "rules": [{"match": {"type": "ScaledConv2d"}, "apply": "convnorm"}]}
    with pytest.raises(PlanError, match=r"can handle none of them: scaled: ScaledConv2d overrides nn\.Conv2d\.forward"):
        orthofx.transform(model, policy, example_inputs=(x,))
