"""``freeze`` / ``export`` with keyword example inputs (``example_kwargs``): the example call is
``model(*example_inputs, **example_kwargs)``; the exported ``.pt2`` program and ``.onnx`` graph take the keyword
inputs by name, with a dynamic batch."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
from torch import nn

import orthofx
from orthofx.policy import Policy


class Masked(nn.Module):
    """A keyword-only mask."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x, *, mask=None):
        h = torch.relu(self.conv(x))
        if mask is not None:
            h = h * mask
        return self.head(h.mean((2, 3)))


class Scaled(nn.Module):
    """A positional-or-keyword ``scale`` given by keyword, after a parameter left at its default: a call that
    binds ``scale`` by position would put it in ``shift``'s place."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x, shift=0.0, scale=1.0):
        h = torch.relu(self.conv(x)).mean((2, 3)) + shift
        return self.head(h) * scale


def _masked_inputs(batch: int, seed: int = 0) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 6, 6, generator=g)
    return (x,), {"mask": (torch.rand(batch, 1, 6, 6, generator=g) > 0.5).float()}


def _scaled_inputs(batch: int, seed: int = 0) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, 6, 6, generator=g),), {"scale": torch.rand(batch, 1, generator=g) + 0.5}


MODELS = {"mask": (Masked, _masked_inputs), "scale": (Scaled, _scaled_inputs)}
CASES = [(model, preset, mode) for model in MODELS for preset in ("lorth", "orthogonal") for mode in ("fx", "export")]
IDS = ["-".join(case) for case in CASES]


def _policy(preset: str, mode: str) -> Policy:
    policy = Policy.preset(preset)
    return dataclasses.replace(policy, capture=dataclasses.replace(policy.capture, mode=mode))


def _transformed(model: str, preset: str, mode: str):
    make, inputs = MODELS[model]
    torch.manual_seed(0)
    args, kwargs = inputs(3)
    gm = orthofx.transform(make().eval(), _policy(preset, mode), example_inputs=args, example_kwargs=kwargs)
    assert orthofx.manifest_of(gm).capture.mode == mode
    return gm, inputs


@pytest.mark.parametrize("model, preset, mode", CASES, ids=IDS)
def test_freeze_with_keyword_inputs_equals_the_transformed_model(model, preset, mode):
    gm, inputs = _transformed(model, preset, mode)
    args, kwargs = inputs(3)
    frozen = orthofx.freeze(gm, args, example_kwargs=kwargs)
    assert not any(callable(getattr(m, "to_plain", None)) for m in frozen.modules())  # plain layers only
    for batch, seed in ((3, 1), (5, 2)):  # the example's batch and another
        args, kwargs = inputs(batch, seed)
        with torch.no_grad():
            torch.testing.assert_close(frozen(*args, **kwargs), gm.eval()(*args, **kwargs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("model, preset, mode", CASES, ids=IDS)
def test_pt2_program_takes_the_keyword_inputs_by_name_with_a_dynamic_batch(model, preset, mode, tmp_path):
    gm, inputs = _transformed(model, preset, mode)
    args, kwargs = inputs(3)
    result = orthofx.export(gm, tmp_path / "m.pt2", example_inputs=args, example_kwargs=kwargs)
    assert result.format == "pt2" and result.max_abs_diff <= 1e-5
    frozen = orthofx.freeze(gm, args, example_kwargs=kwargs)
    program = torch.export.load(tmp_path / "m.pt2").module()
    for batch, seed in ((3, 0), (5, 1)):
        args, kwargs = inputs(batch, seed)
        with torch.no_grad():
            torch.testing.assert_close(program(*args, **kwargs), frozen(*args, **kwargs), rtol=0, atol=1e-5)
    # the keyword input is an input of the program, not a constant of the example: another value changes the output
    args, kwargs = inputs(5, 1)
    other = {name: torch.zeros_like(value) for name, value in kwargs.items()}
    with torch.no_grad():
        assert not torch.allclose(program(*args, **other), program(*args, **kwargs))
        torch.testing.assert_close(program(*args, **other), frozen(*args, **other), rtol=0, atol=1e-5)


_HAS_ONNX = all(importlib.util.find_spec(name) for name in ("onnx", "onnxruntime", "onnxscript"))


@pytest.mark.skipif(not _HAS_ONNX, reason="needs onnx, onnxscript and onnxruntime (the dev extra)")
@pytest.mark.parametrize("model, preset, mode", CASES, ids=IDS)
def test_onnx_graph_takes_the_keyword_inputs_by_name_with_a_dynamic_batch(model, preset, mode, tmp_path):
    import onnxruntime

    gm, inputs = _transformed(model, preset, mode)
    args, kwargs = inputs(3)
    result = orthofx.export(gm, tmp_path / "m.onnx", example_inputs=args, example_kwargs=kwargs)
    assert result.format == "onnx" and result.max_abs_diff <= 1e-4
    frozen = orthofx.freeze(gm, args, example_kwargs=kwargs)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert {arg.name for arg in session.get_inputs()} == {"x", *kwargs}
    for batch, seed in ((3, 0), (5, 1)):
        args, kwargs = inputs(batch, seed)
        feeds = {"x": args[0].numpy(), **{name: value.numpy() for name, value in kwargs.items()}}  # by name
        (out,) = session.run(None, feeds)
        with torch.no_grad():
            expected = frozen(*args, **kwargs)
        assert float((torch.from_numpy(out) - expected).abs().max()) <= 1e-4


# ------------------------------------------------------------------ a model written with orthofx layers


class _WrittenWithLayers(nn.Module):
    """orthofx layers in a forward symbolic tracing cannot follow (a Python branch on the mask's rank), so freeze
    captures it with torch.export on the example call, keyword input included."""

    def __init__(self):
        super().__init__()
        from orthofx.nn import ConvNormConv2d, OrthogonalConv2d
        self.conv = OrthogonalConv2d(3, 6, 3, padding=1)
        self.norm = ConvNormConv2d(nn.Conv2d(6, 6, 3, padding=1))

    def forward(self, x, *, mask=None):
        y = self.conv(x)
        if mask is not None and mask.dim() == 4:
            y = y * mask
        return self.norm(y).relu()


def test_a_model_written_with_orthofx_layers_freezes_and_exports_with_keyword_inputs(tmp_path):
    torch.manual_seed(0)
    model = _WrittenWithLayers()
    (x,), kwargs = _masked_inputs(2)
    frozen = orthofx.freeze(model, (x,), example_kwargs=kwargs)
    assert orthofx.manifest_of(frozen).capture.mode == "export"
    assert not {type(m).__name__ for m in frozen.modules()} & {"OrthogonalConv2d", "ConvNormConv2d"}
    with torch.no_grad():
        torch.testing.assert_close(frozen(x, **kwargs), model.eval()(x, **kwargs), rtol=0, atol=1e-5)
    result = orthofx.export(model, tmp_path / "w.pt2", example_inputs=(x,), example_kwargs=kwargs)
    assert result.max_abs_diff <= 1e-5
    program = torch.export.load(tmp_path / "w.pt2").module()
    (x4,), kwargs4 = _masked_inputs(4, seed=3)  # convnorm's filters were baked for this 6 x 6 size
    with torch.no_grad():
        torch.testing.assert_close(program(x4, **kwargs4), model(x4, **kwargs4), rtol=0, atol=1e-5)


# ------------------------------------------------------------------ bad keyword inputs


@pytest.mark.parametrize("bad", [[("mask", 1)], {1: torch.ones(1)}, "mask"])
def test_example_kwargs_that_are_not_a_dict_of_names_are_refused(bad, tmp_path):
    gm, inputs = _transformed("mask", "orthogonal", "fx")
    args, _ = inputs(3)
    with pytest.raises(orthofx.OrthofxError, match="example_kwargs must be a dict of the model's keyword inputs"):
        orthofx.freeze(gm, args, example_kwargs=bad)
    with pytest.raises(orthofx.OrthofxError, match="example_kwargs must be a dict of the model's keyword inputs"):
        orthofx.export(gm, tmp_path / "m.pt2", example_inputs=args, example_kwargs=bad)
    assert not (tmp_path / "m.pt2").exists()


def test_keyword_inputs_the_model_does_not_take_are_an_export_error(tmp_path):
    gm, inputs = _transformed("mask", "orthogonal", "fx")
    args, kwargs = inputs(3)
    with pytest.raises(orthofx.ExportError, match=r"failed on example_inputs and example_kwargs .*"
                                                  r"mask_typo=shape \(3, 1, 6, 6\) float32"):
        orthofx.export(gm, tmp_path / "m.pt2", example_inputs=args, example_kwargs={"mask_typo": kwargs["mask"]})


def test_keyword_inputs_are_checked_like_positional_ones(tmp_path):
    gm, inputs = _transformed("mask", "orthogonal", "fx")
    args, kwargs = inputs(3)
    with pytest.raises(orthofx.ExportError, match=r"example_kwargs\['mask'\] holds NaN"):
        orthofx.export(gm, tmp_path / "m.pt2", example_inputs=args,
                       example_kwargs={"mask": torch.full_like(kwargs["mask"], float("nan"))})
    one = kwargs["mask"][:1]  # broadcasts over the batch, but torch.export cannot trace a dynamic batch from it
    with pytest.raises(orthofx.ExportError, match=r"example_kwargs\['mask'\] has batch size 1.*dynamic_batch=False"):
        orthofx.export(gm, tmp_path / "m.pt2", example_inputs=args, example_kwargs={"mask": one})
    assert not (tmp_path / "m.pt2").exists()


class _TwoKeywords(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, *, gate=None, bias=None):
        return self.fc(x) * gate + bias


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_keyword_inputs_in_another_order_than_the_graphs_bind_by_name(mode, tmp_path):
    """The graph takes (x, gate, bias) in fx mode and (x, bias, gate) after export capture with the example below;
    torch.export binds a GraphModule's inputs by position, so the order of the dict must not matter."""
    torch.manual_seed(0)
    x, gate, bias = torch.randn(3, 4), torch.rand(3, 4) + 0.5, torch.randn(3, 4)
    gm = orthofx.transform(_TwoKeywords().eval(), _policy("orthogonal", mode), example_inputs=(x,),
                           example_kwargs={"bias": bias, "gate": gate})
    frozen = orthofx.freeze(gm)
    expected = frozen.fc(x) * gate + bias  # plain torch on the frozen layer
    torch.testing.assert_close(frozen(x, gate=gate, bias=bias), expected)
    for kwargs in ({"gate": gate, "bias": bias}, {"bias": bias, "gate": gate}):
        orthofx.export(gm, tmp_path / "m.pt2", example_inputs=(x,), example_kwargs=kwargs)
        program = torch.export.load(tmp_path / "m.pt2").module()
        with torch.no_grad():
            torch.testing.assert_close(program(x, gate=gate, bias=bias), expected.detach(), rtol=0, atol=1e-5)
