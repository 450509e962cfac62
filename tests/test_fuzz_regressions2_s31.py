"""Regressions found by the second session-31 fuzz round (``.snap/s31/fuzz2/``: ``d2.py`` families ``inplace``,
``capture``, ``export``, ``dtype``; ``struct.py``, ``misc.py``, ``yaml1.py``): ``transform(..., inplace=True)``
with presets and random policies of 4-5 rules in every capture mode; YAML text policies (anchors, aliases, merge
keys, odd scalars, ``null``, duplicate keys, tabs, tags); capture options (``mode: fx / export / auto``,
``leaf_modules``) on the whole corpus, ``unet`` and ``se_resnet`` included; ``.onnx`` / ``.pt2`` export of each
preset with the parity checked in onnxruntime / ``torch.export.load``; ``attach`` then
``optimizer.load_state_dict``; ``penalty`` under ``no_grad`` / ``inference_mode``; shared submodules,
``ModuleDict`` / ``ParameterList`` / ``ParameterDict``, buffers created in forward; ``.double()`` / ``.half()`` /
bf16 after transform; ``requires_grad_(False)`` then training a head.

- A forward that registers a buffer while it runs (``if not hasattr(self, "seen"): self.register_buffer("seen",
  ...)``, a counter or cache created on the first call) broke capture. Symbolic tracing (capture ``fx``, ``auto``)
  raised a bare ``AttributeError: 'Model' object has no attribute 'seen'`` out of ``transform``, also when the
  buffer belongs to a submodule. torch.export (capture ``export``) was worse: its graph turned the buffer's update
  into ``x.copy_(seen + 1)``, so the transformed model overwrote the caller's input with ones on every call (and
  training failed in backward on the modified input). Root cause: ``capture.py``: ``OrthofxTracer._restore``
  undoes what the forward did to the modules after the trace, removing the new buffer that the graph's
  ``get_attr`` then reads; ``_capture_export`` kept the exported graph as torch gave it. Expected: a
  ``CaptureError`` naming the module and the buffer and saying to register it in ``__init__`` or call the model
  once first; a submodule doing it is kept as a leaf (fx), which registers the buffer on its first call as the
  model does. Fixed: the tracer records the buffers / parameters a traced forward registers
  (``created_state``); ``_trace_with_fallbacks`` keeps such a submodule as a leaf and refuses the top level, and
  ``_capture_export`` removes what the export run registered and refuses (``_created_state_message``).
- With ``inplace=True``, a transform refused by the check of the rewritten model on the example inputs (a
  non-finite output from ``isometric_init`` / ``orthogonal_conv`` with a large ``gain``) left the passes' writes
  and replacement layers in the user's model without saying so: the README and ``_note_written_weights`` promise
  that errors name what was written, but only errors raised by a pass got the note. Root cause:
  ``transform.py:_rewrite`` called ``_note_written_weights`` around ``_run_passes`` only, and the note counted
  written tensors, not replaced layers. Expected: the message names the written tensors and the replaced layers
  and says how to start again. Fixed: the example check is covered too, and the note lists replaced layers
  (``named_modules()`` before the passes) with their new class.
- ``orthofx.load(model, "m.pt")`` of a file whose policy says ``capture: {mode: export}``, without example inputs,
  said "the policy stored in 'm.pt' does not apply to this model (... pass example_inputs=(x,) to
  orthofx.transform / orthofx.explain); load with the original (untransformed) model the file was exported from",
  sending the user to look for another model when the model was right and only the example call was missing.
  Root cause: ``export.py:load`` replays the policy and reports every transform failure as the model not fitting.
  Expected: an ``ExportError`` that says the stored policy captures with torch.export and to pass
  ``orthofx.load(model, path, example_inputs=(x,))``. Fixed: ``load`` checks the stored capture mode first.
- The ``orthogonal`` preset on the built-in ``dbn_cnn`` gives NaN gradients to ``conv1`` on the first
  training step for some inputs (seeds 8, 9, 10 of 12; the plain model's are finite), and a later step fails with
  a bare ``torch._C._LinAlgError`` from the model's ``eigh`` (no orthofx error). Root cause:
  ``OrthogonalConv2d.from_conv`` (``orthofx/nn/orthogonal.py``), with the ``fit_steps: 0`` that
  ``passes/orthogonal_conv.py`` (``OrthogonalConvPass``'s ``fit_steps`` default) and the preset pass, builds the
  BCOP "nearest" start as "complementary pairs, a pure shift to the centre": a kernel whose only non-zero tap is
  the centre, i.e. a 1 x 1 conv in a 5 x 5 kernel (likewise 4 -> 4 k3, 2 -> 8 k3 ...). Its output channels span
  only ``C_in`` dimensions (rank 1 of 16 for ``conv1``, 1 -> 16), so the decorrelated BatchNorm's covariance has 15
  eigenvalues tied at ``eps`` and ``eigh``'s backward divides by their differences. With ``fit_steps: 50`` the
  kernel uses all 25 taps and the gradients are finite. Expected: finite first-step gradients as for the plain
  model (ideally a nearest start that is not a 1 x 1 kernel, or a plan warning when a hard orthogonal layer with a
  closed-form start feeds a decomposition). Fixed in session 32
  (``tests/test_block_sweeps_s32.py``): in the column-orthogonal case the closed-form start is followed by one
  sweep of block-coordinate ascent (``_OrthogonalConvNd._block_sweeps``), which spreads the kernel over its taps.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import orthofx

pytestmark = pytest.mark.usefixtures("one_thread")


class _Counter(nn.Module):
    """A conv whose forward counts its calls in a buffer it registers on the first call."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        if not hasattr(self, "seen"):
            self.register_buffer("seen", torch.zeros(()))
        self.seen += 1
        return self.conv(x)


class _TopCounter(_Counter):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(super().forward(x).mean((2, 3)))


class _BlockCounter(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _Counter()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.block(x).mean((2, 3)))


_LORTH = {"rules": [{"match": {"type": "Conv2d"}, "apply": "orth_regularizer"}]}


@pytest.mark.parametrize("mode", ["fx", "auto", "export"])
def test_a_top_level_forward_registering_a_buffer_is_refused_naming_it(mode):
    torch.manual_seed(0)
    model, x = _TopCounter(), torch.randn(2, 4, 6, 6)
    keys = list(model.state_dict())
    with pytest.raises(orthofx.CaptureError) as caught:
        orthofx.transform(model, {**_LORTH, "capture": {"mode": mode}}, example_inputs=(x,))
    message = str(caught.value)
    assert "'seen'" in message and "__init__" in message and "_TopCounter" in message, message
    assert list(model.state_dict()) == keys  # the user's model gained nothing
    # the fix the message gives works: after one call the buffer exists, and the graph updates it as the model does
    reference = copy.deepcopy(model)
    with torch.no_grad():
        model(x)
        reference(x)
    gm = orthofx.transform(model, {**_LORTH, "capture": {"mode": mode}}, example_inputs=(x,))
    x2 = torch.randn(2, 4, 6, 6)
    kept = x2.clone()
    with torch.no_grad():
        torch.testing.assert_close(gm(x2), reference(x2), rtol=0, atol=1e-6)
    assert torch.equal(x2, kept)  # the caller's input is not written
    assert float(gm.seen) == float(reference.seen)


@pytest.mark.parametrize("mode", ["fx", "auto"])
def test_a_submodule_registering_a_buffer_in_forward_is_kept_as_a_leaf(mode):
    torch.manual_seed(0)
    model, x = _BlockCounter(), torch.randn(2, 4, 6, 6)
    reference = copy.deepcopy(model)  # torch alone: the plain model, called as gm is
    gm = orthofx.transform(model, {**_LORTH, "capture": {"mode": mode}}, example_inputs=(x,))
    assert "seen" not in dict(model.named_buffers()) and not hasattr(model.block, "seen")  # the user's model
    assert [path for path, _ in orthofx.manifest_of(gm).capture.leaf_fallbacks] == ["block"]
    gm.train()
    reference.train()
    torch.testing.assert_close(gm(x), reference(x), rtol=0, atol=1e-6)
    gm.eval()
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), reference(x), rtol=0, atol=1e-6)
    assert float(gm.block.seen) == float(reference.block.seen)
    assert float(orthofx.penalty(gm).detach()) > 0  # the conv inside the leaf is still a site


def _deep_linear(depth: int = 12) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(8, 8) for _ in range(depth)])


def test_an_inplace_transform_refused_by_the_output_check_names_the_written_weights():
    model, x = _deep_linear(), torch.randn(4, 8)
    before = copy.deepcopy(model.state_dict())
    policy = {"rules": [{"match": {"type": "Linear"}, "apply": "isometric_init", "with": {"gain": 1e4}}]}
    with pytest.raises(orthofx.TransformError) as caught:  # gain 1e4 over 12 layers: inf in float32
        orthofx.transform(model, policy, example_inputs=(x,), inplace=True)
    # reference: the tensors of the user's model that differ from before, by torch.equal
    written = [name for name, value in model.state_dict().items() if not torch.equal(value, before[name])]
    assert written, "the pass writes the model's weights with inplace=True"
    message = str(caught.value)
    assert "non-finite" in message and "inplace=True" in message, message
    assert all(name in message for name in written[:4]), message


def test_an_inplace_transform_refused_by_the_output_check_names_the_replaced_layers():
    model, x = _deep_linear(), torch.randn(4, 8)
    policy = {"rules": [{"match": {"type": "Linear"}, "apply": "orthogonal_conv", "with": {"gain": 1e4}}]}
    with pytest.raises(orthofx.TransformError) as caught:
        orthofx.transform(model, policy, example_inputs=(x,), inplace=True)
    replaced = [name for name, layer in model.named_children() if type(layer) is not nn.Linear]
    assert replaced == [str(i) for i in range(12)]
    message = str(caught.value)
    assert "inplace=True" in message and "replaced the layers 0, 1, 2, 3" in message, message
    assert "OrthogonalLinear" in message and "rebuild the model" in message, message


def test_load_of_an_export_captured_policy_without_example_inputs_asks_for_them(tmp_path):
    torch.manual_seed(0)
    model, x = _deep_linear(3), torch.randn(4, 8)
    policy = {"rules": [{"match": {"type": "Linear"}, "apply": "orth_regularizer"}], "capture": {"mode": "export"}}
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    orthofx.export(gm, tmp_path / "m.pt")
    with pytest.raises(orthofx.ExportError) as caught:
        orthofx.load(copy.deepcopy(model), tmp_path / "m.pt")
    message = str(caught.value)
    # the model is the right one: the message must not send the user to look for another
    assert "does not apply to this model" not in message and "original" not in message, message
    assert "torch.export" in message and "orthofx.load(model, path, example_inputs=(x,))" in message, message
    restored = orthofx.load(copy.deepcopy(model), tmp_path / "m.pt", example_inputs=(x,))
    with torch.no_grad():  # reference: the plain model, by torch alone (L_orth changes no output)
        torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)


def test_orthogonal_preset_on_dbn_cnn_gives_finite_first_step_gradients():
    nonfinite = []
    for seed in (8, 9, 10):
        torch.manual_seed(seed)
        model = orthofx.models.get("dbn_cnn")
        x = orthofx.models.example_input("dbn_cnn")
        reference = copy.deepcopy(model).train()  # torch alone: the plain model's gradients are finite
        reference(x).square().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in reference.parameters() if p.grad is not None)
        gm = orthofx.transform(model, "orthogonal", example_inputs=(x,)).train()
        conv1 = gm.get_submodule("conv1")
        # the layer's rank: output channels of a 1-channel conv (a dense float64 look at its channel covariance)
        weight = conv1.weight.detach().double()
        taps = weight.flatten(2).square().sum((0, 1))
        assert int((taps > 1e-12).sum()) == 25  # not the centre tap only (a 1x1 conv in a 5x5 kernel)
        gm(x).square().mean().backward()
        if not all(torch.isfinite(p.grad).all() for p in conv1.parameters() if p.grad is not None):
            nonfinite.append(seed)
    assert not nonfinite, f"non-finite conv1 gradients at seeds {nonfinite}"
