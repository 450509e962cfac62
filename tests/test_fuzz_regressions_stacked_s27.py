"""Regressions found by fuzzing policies that stack several passes through the whole life cycle (transform,
training steps with ``penalty`` and ``attach``, ``report``, ``freeze``, ``export`` to ``.pt2`` / ``.pt`` / ``.onnx``,
``load``), including a second ``transform`` of a transformed or frozen model, which ``transform`` allows when the
first carries no penalty term or optimizer hook.

A ``.pt`` file holds the last transform's policy only and ``load`` replays it on the original model, so a model
transformed from a frozen or transformed one wrote a file that ``load`` either refused with "load with the model the
file was exported from" (the user had) or, for a frozen orthogonal conv (circular padding, plain ``nn.Conv2d``),
restored into the original zero-padded conv with different outputs and no error. References: the model's own eval
outputs, and the plain-torch zero-padded conv against the circular one."""

import os

import pytest
import torch
import torch.nn.functional as F

import orthofx
from corpus import build, eval_outputs

pytestmark = pytest.mark.usefixtures("one_thread")

#: layer1's two 3x3 convs made exactly orthogonal from a random start (a kernel off the centre tap, so circular and
#: zero padding differ), no penalty or hook: the model may be transformed again.
ORTHOGONAL_LAYER1 = {"rules": [{"match": {"type": "Conv2d", "name": "layer1.*"}, "apply": "orthogonal_conv",
                                "with": {"init": "random"}}]}
CONVNORM_STEM = {"rules": [{"match": {"type": "Conv2d", "name": "conv1"}, "apply": "convnorm"}]}
ISOMETRIC_INIT = {"rules": [{"match": {"type": ["Conv2d", "Linear"]}, "apply": "isometric_init", "with": {"seed": 1}}]}
JACOBIAN_LAYER1 = {"rules": [{"match": {"kind": "block", "name": "layer1"}, "apply": "jacobian_isometry"}]}


def _restored_difference(gm, make, path) -> float:
    """Largest eval-output difference between ``gm`` and ``orthofx.load`` of its ``.pt`` file into a fresh model."""
    model, inputs = make()
    orthofx.export(gm, path)
    restored = orthofx.load(model, path, example_inputs=inputs)
    return float((eval_outputs(restored, inputs) - eval_outputs(gm, inputs)).abs().max())


def test_pt_of_a_model_transformed_from_a_frozen_orthogonal_one_is_refused(tmp_path):
    """freeze bakes an orthogonal conv into ``nn.Conv2d(padding_mode="circular")``; a second transform keeps it, and
    load replayed only the second policy on the original zero-padded conv: the weights fitted, the outputs did not."""
    model, inputs = build("batchnorm_resnet")
    frozen = orthofx.freeze(orthofx.transform(model, ORTHOGONAL_LAYER1, example_inputs=inputs), inputs)
    again = orthofx.transform(frozen, "lorth", example_inputs=inputs)
    baked = again.get_submodule("layer1.0")
    assert baked.padding_mode == "circular"
    # why load could not restore it: the same weight under the original zero padding computes something else
    h = torch.randn(2, 6, 8, 8, generator=torch.Generator().manual_seed(0))
    weight = baked.weight.detach()
    circular = F.conv2d(F.pad(h, [1] * 4, mode="circular"), weight)
    zero = F.conv2d(h, weight, padding=1)
    assert float((circular - zero).abs().max()) > 1e-2
    path = tmp_path / "again.pt"
    with pytest.raises(orthofx.ExportError, match=r"'layer1\.0' is a plain Conv2d that orthofx\.freeze baked from "
                                                  r"the orthofx layer OrthogonalConv2d.*rules of both.*\.pt2"):
        orthofx.export(again, path)
    assert not os.path.exists(path)
    # the other formats hold the frozen computation itself
    result = orthofx.export(again, tmp_path / "again.pt2", example_inputs=inputs)
    program = torch.export.load(str(tmp_path / "again.pt2")).module()
    with torch.no_grad():
        torch.testing.assert_close(program(*inputs), eval_outputs(again, inputs), rtol=0, atol=1e-6)
    assert result.max_abs_diff < 1e-6
    # a frozen model whose freeze baked nothing new (a Jacobian probe gives back its block) is still written, and
    # load restores it
    probed = orthofx.freeze(orthofx.transform(build("batchnorm_resnet")[0], JACOBIAN_LAYER1, example_inputs=inputs))
    again = orthofx.transform(probed, CONVNORM_STEM, example_inputs=inputs)
    assert _restored_difference(again, lambda: build("batchnorm_resnet"), tmp_path / "probe.pt") < 1e-6


@pytest.mark.parametrize("first,layer", [(ORTHOGONAL_LAYER1, "OrthogonalConv2d"), (CONVNORM_STEM, "ConvNormConv2d")])
def test_pt_of_a_model_transformed_twice_is_refused(tmp_path, first, layer):
    """The first transform's layers (no penalty, no hook) stay in the second transform's model; load replayed the
    second policy on the original layers and failed naming the model the user had passed."""
    model, inputs = build("batchnorm_resnet")
    again = orthofx.transform(orthofx.transform(model, first, example_inputs=inputs), "lorth", example_inputs=inputs)
    path = tmp_path / "again.pt"
    with pytest.raises(orthofx.ExportError, match=rf"is the orthofx layer {layer} that an earlier orthofx\.transform "
                                                  r"put there, so it was transformed from a frozen or transformed"):
        orthofx.export(again, path)
    assert not os.path.exists(path)
    # the first transform alone is written and restored, and so is a second transform of a model whose first
    # transform only initialised weights in place (nothing load's replay of the second policy would miss)
    single = orthofx.transform(build("batchnorm_resnet")[0], first, example_inputs=inputs)
    assert _restored_difference(single, lambda: build("batchnorm_resnet"), tmp_path / "single.pt") < 1e-6
    initialised = orthofx.transform(build("batchnorm_resnet")[0], ISOMETRIC_INIT, example_inputs=inputs)
    again = orthofx.transform(initialised, "lorth", example_inputs=inputs)
    assert _restored_difference(again, lambda: build("batchnorm_resnet"), tmp_path / "init.pt") < 1e-6


def test_pt_of_a_frozen_dbn_transformed_again_is_refused(tmp_path):
    """freeze stores decorrelated BatchNorm's running whitening matrix as a buffer in place of its eigh; a second
    transform keeps that buffer, which the original model has not: load failed on an unexpected key."""
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    frozen = orthofx.freeze(orthofx.transform(orthofx.models.get("dbn_cnn", width=4), "lorth", example_inputs=(x,)),
                            (x,))
    assert any(name.startswith("orthofx_folded_") for name, _ in frozen.named_buffers())
    again = orthofx.transform(frozen, "lorth", example_inputs=(x,))
    with pytest.raises(orthofx.ExportError, match=r"'orthofx_folded_0' is a decomposition result that orthofx\.freeze "
                                                  r"computed once and stored"):
        orthofx.export(again, tmp_path / "again.pt")
