"""orthofx's replacement layers take torch's call signature (``input``, and ``output_size`` for transposed convs).

Bug: they named their input ``x``, so a model whose forward calls ``self.conv(input=h)`` (valid for the torch layer)
failed with TypeError once ``orthofx.transform(..., inplace=True)`` had put the replacement in the model, and so did
a direct ``layer(input=h)`` call.
"""
import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import orthofx
from orthofx.errors import LayerArgumentError
from orthofx.nn.convnorm import ConvNormConv1d, ConvNormConv2d, ConvNormConv3d
from orthofx.nn.jacobian import JacobianProbe
from orthofx.nn.orthogonal import (OrthogonalConv1d, OrthogonalConv2d, OrthogonalConv3d, OrthogonalConvTranspose1d,
                                   OrthogonalConvTranspose2d, OrthogonalConvTranspose3d, OrthogonalLinear)


def _names_and_kinds(forward):
    return [(p.name, p.kind) for p in inspect.signature(forward).parameters.values()]


def _convnorm(d):
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[d - 1](2, 2, 3, padding=1)
    return (ConvNormConv1d, ConvNormConv2d, ConvNormConv3d)[d - 1](conv)


def _convnorm_frozen(d):
    layer = _convnorm(d)
    return layer.eval().to_plain(input_sizes=[(6,) * d])


# (name, replacement, the torch layer it stands for, an input)
def _cases():
    torch.manual_seed(0)
    cases = []
    for d in (1, 2, 3):
        x = torch.randn(2, 2, *(4,) * d)
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[d - 1](2, 2, 3)
        up = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[d - 1](2, 2, 2, stride=2)
        ortho = (OrthogonalConv1d, OrthogonalConv2d, OrthogonalConv3d)[d - 1](2, 2, 3)
        ortho_up = (OrthogonalConvTranspose1d, OrthogonalConvTranspose2d, OrthogonalConvTranspose3d)[d - 1](
            2, 2, 2, stride=2)
        convnorm = _convnorm(d)
        cases += [(f"OrthogonalConv{d}d", ortho, conv, x),
                  (f"OrthogonalConvTranspose{d}d", ortho_up, up, x),
                  (f"frozen OrthogonalConvTranspose{d}d", ortho_up.to_conv(), up, x),
                  (f"ConvNormConv{d}d", convnorm, conv, torch.randn(2, 2, *(6,) * d)),
                  (f"FrozenConvNorm{d}d", _convnorm_frozen(d), conv, torch.randn(2, 2, *(6,) * d))]
    fourier = OrthogonalConv2d(2, 2, 3, method="cayley_fft", input_size=(4, 4)).to_plain()
    cases += [("FourierConv", fourier, nn.Conv2d(2, 2, 3), torch.randn(2, 2, 4, 4)),
              ("OrthogonalLinear", OrthogonalLinear(5, 3), nn.Linear(5, 3), torch.randn(4, 5))]
    return cases


CASES = _cases()


@pytest.mark.parametrize("name, layer, torch_layer, x", CASES, ids=[c[0] for c in CASES])
def test_replacement_takes_torch_signature(name, layer, torch_layer, x):
    assert _names_and_kinds(layer.forward) == _names_and_kinds(torch_layer.forward), name
    with torch.no_grad():
        torch.testing.assert_close(layer(input=x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("cls, torch_cls", [(OrthogonalConvTranspose1d, nn.ConvTranspose1d),
                                            (OrthogonalConvTranspose2d, nn.ConvTranspose2d)])
def test_transposed_conv_takes_input_and_output_size_by_keyword(cls, torch_cls):
    d = 1 if cls is OrthogonalConvTranspose1d else 2
    layer = cls(2, 3, 2, stride=2)
    x = torch.randn(2, 2, *(3,) * d)
    size = (6,) * d
    # reference: torch's transposed conv with the layer's weight (kernel 2 = stride 2: no overlap, no fold)
    ref = getattr(F, f"conv_transpose{d}d")(x, layer.weight, layer.bias, stride=2)
    for frozen in (layer, layer.to_conv()):
        torch.testing.assert_close(frozen(input=x, output_size=size), ref)
        with pytest.raises(LayerArgumentError):
            frozen(input=x, output_size=(7,) * d)
    assert torch_cls(2, 3, 2, stride=2)(input=x, output_size=size).shape == ref.shape


class _KeywordCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        h = torch.relu(self.c(input=x))
        h = self.up(input=h, output_size=(2 * h.shape[2], 2 * h.shape[3]))
        return self.fc(input=h.mean((2, 3)))


@pytest.mark.parametrize("preset, replaced", [("orthogonal", {"c": "OrthogonalConv2d",
                                                              "up": "OrthogonalConvTranspose2d",
                                                              "fc": "OrthogonalLinear"}),
                                              ("convnorm", {"c": "ConvNormConv2d"})])
def test_inplace_transform_of_a_model_calling_its_layers_by_keyword(preset, replaced):
    torch.manual_seed(1)
    model = _KeywordCalls().eval()
    x = torch.randn(2, 3, 6, 6)
    gm = orthofx.transform(model, preset, inplace=True, example_inputs=(x,))
    assert {name: type(getattr(model, name)).__name__ for name in replaced} == replaced
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out, gm(x))
        # independent: the same layers called positionally, by hand
        c, up, fc = model.c, model.up, model.fc
        h = torch.relu(c(x))
        torch.testing.assert_close(out, fc(up(h).mean((2, 3))))
    frozen = orthofx.freeze(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), out, rtol=1e-4, atol=1e-5)


class _KeywordBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(input=self.body(input=x))


def test_inplace_jacobian_probe_takes_the_blocks_input_keyword():
    torch.manual_seed(2)
    model = _KeywordBlock()
    x = torch.randn(3, 4)
    gm = orthofx.transform(model, "jacobian", inplace=True, example_inputs=(x,))
    assert isinstance(model.body, JacobianProbe)
    out = model(x)  # training mode: the estimate is made from the keyword input
    torch.testing.assert_close(out, gm(x))
    estimate = model.body.estimate
    assert estimate is not None and torch.isfinite(estimate) and estimate > 0
    # the same estimate with the input given positionally (same probe draws)
    model.body.estimate = None
    torch.manual_seed(3)
    model.body(input=x)
    keyword = model.body.estimate
    model.body.estimate = None
    torch.manual_seed(3)
    model.body(x)
    torch.testing.assert_close(keyword, model.body.estimate)


def test_probe_around_a_replacement_takes_input_keyword():
    torch.manual_seed(4)
    probe = JacobianProbe(OrthogonalLinear(4, 4))
    x = torch.randn(3, 4)
    out = probe(input=x)
    torch.testing.assert_close(out, F.linear(x, probe.block.weight, probe.block.bias))
    # an orthogonal square linear is an isometry: its defect is at float32 rounding
    assert probe.estimate is not None and float(probe.estimate.detach()) < 1e-5


def test_forward_pre_hook_with_kwargs_sees_input():
    torch.manual_seed(5)
    layer = OrthogonalConv2d(2, 2, 3, padding=1)
    seen = []

    def hook(module, args, kwargs):
        seen.append((len(args), sorted(kwargs)))
        return (), {"input": kwargs["input"] * 2} if "input" in kwargs else None

    layer.register_forward_pre_hook(hook, with_kwargs=True)
    x = torch.randn(1, 2, 5, 5)
    with torch.no_grad():
        doubled = layer(input=x)
        layer._forward_pre_hooks.clear()
        torch.testing.assert_close(doubled, layer(2 * x))
    assert seen == [(0, ["input"])]


def test_convnorm_runs_an_inner_conv_hook_that_returns_input_by_keyword():
    """nn.Conv2d accepts ``conv(input=t)``, so a pre-hook of the conv may return ``((), {"input": t})``: ConvNorm,
    which runs the conv's pre-hooks itself, refused that as keywords the conv would not take."""
    torch.manual_seed(6)
    conv = nn.Conv2d(2, 2, 3, padding=1)
    conv.register_forward_pre_hook(lambda m, args, kwargs: ((), {"input": args[0] * 3}), with_kwargs=True)
    x = torch.randn(1, 2, 6, 6)
    assert conv(x).shape == (1, 2, 6, 6)  # torch takes the hook's result
    layer = ConvNormConv2d(conv)
    with torch.no_grad():
        hooked = layer(x)
        conv._forward_pre_hooks.clear()
        torch.testing.assert_close(hooked, layer(3 * x))
    conv.register_forward_pre_hook(lambda m, args, kwargs: ((), {"inp": args[0]}), with_kwargs=True)
    with pytest.raises(LayerArgumentError, match="'inp'"):
        layer(x)


class _Replaced(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = OrthogonalConv2d(3, 4, 3, padding=1)
        self.n = ConvNormConv2d(nn.Conv2d(4, 4, 3, padding=1))
        self.fc = OrthogonalLinear(4, 2)

    def forward(self, x):
        return self.fc(input=self.n(input=self.c(input=x)).mean((2, 3)))


def _replaced_model():
    torch.manual_seed(7)
    model = _Replaced().eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        return model, x, model(x)


def test_keyword_calls_trace_with_fx():
    model, x, ref = _replaced_model()
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), ref)


def test_keyword_calls_compile_without_graph_breaks():
    model, x, ref = _replaced_model()
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


def test_keyword_calls_compile_fullgraph():
    model, x, ref = _replaced_model()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="eager", fullgraph=True)(x), ref)


def test_keyword_calls_export():
    model, x, ref = _replaced_model()
    ep = torch.export.export(model, (x,))
    torch.testing.assert_close(ep.module()(x), ref)
