"""Regressions from fuzzing save / load / export round trips (session 23).

Each test compares with the in-memory model that was saved (the reference the file must reproduce), with plain
torch / onnxruntime outputs, or asserts a precise error.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import orthofx
from orthofx.export import ONNX_TOLERANCE, onnx_tolerance
from references import penalised_sgd_steps


def _train(gm: nn.Module, x: torch.Tensor, steps: int) -> None:
    """A few SGD steps on ``mean(out^2) + penalty``, so the saved state differs from a fresh transform's."""
    gm.train()
    penalised_sgd_steps(gm, x, steps, lr=0.05, attach=True)


# ------------------------------------------------------------------------------ ONNX check at the outputs' scale

def test_onnx_tolerance_grows_with_float32_outputs_above_about_100():
    # 1e-4 absolute is 3 float32 rounding steps at 1.6e3: a correct export was refused as "should not be trusted"
    eps32 = torch.finfo(torch.float32).eps
    assert onnx_tolerance([torch.full((3,), 1.0e4)]) == pytest.approx(8 * eps32 * 1.0e4)
    assert onnx_tolerance([torch.full((3,), -2.0e3), torch.ones(2)]) == pytest.approx(8 * eps32 * 2.0e3)
    assert onnx_tolerance([torch.full((3,), 20.0)]) == ONNX_TOLERANCE           # below ~100: the absolute bar
    assert onnx_tolerance([torch.full((3,), 1.0e4, dtype=torch.float64)]) == ONNX_TOLERANCE
    assert onnx_tolerance([torch.tensor([1.0, float("inf")])]) == ONNX_TOLERANCE  # no scale from an inf


def test_a_float32_model_with_large_outputs_exports_to_onnx(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 8 * 8, 4))
    x = torch.randn(4, 3, 8, 8) * 1.0e4   # unnormalised inputs: outputs of ~1.6e3
    gm = orthofx.transform(model, "lorth", example_inputs=(x,))
    result = orthofx.export(gm, tmp_path / "big.onnx", example_inputs=(x,))
    session = onnxruntime.InferenceSession(str(tmp_path / "big.onnx"), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model.eval()(x).double()   # plain torch: lorth changes no forward
    measured = float((torch.from_numpy(actual).double() - expected).abs().max())
    scale = float(expected.abs().max())
    assert scale > 1.0e3
    # a few float32 rounding steps at the outputs' scale: the correct translation, refused before
    assert measured <= 8 * torch.finfo(torch.float32).eps * scale
    assert result.max_abs_diff <= onnx_tolerance([expected.float()])


# ------------------------------------------------------------------------------------------- .pt round trips

@pytest.mark.parametrize("convert", ["before", "after"], ids=["double-then-transform", "transform-then-double"])
def test_a_model_saved_in_float64_loads_in_float64(tmp_path, convert):
    # load_state_dict cast the file's float64 weights into the fresh float32 transform: the restored model computed
    # in float32 with rounded weights, not as the saved one
    x = orthofx.models.example_input("small_cnn", batch=3, seed=1).double()
    torch.manual_seed(0)
    model = orthofx.models.SmallCNN(width=4)
    if convert == "before":
        gm = orthofx.transform(model.double(), "orthogonal", example_inputs=(x,))
    else:
        gm = orthofx.transform(model, "orthogonal", example_inputs=(x.float(),)).double()
    _train(gm, x, steps=2)
    orthofx.export(gm, tmp_path / "m.pt")
    fresh = orthofx.models.SmallCNN(width=4)   # as built: float32
    restored = orthofx.load(fresh, tmp_path / "m.pt")
    assert {p.dtype for p in fresh.parameters()} == {torch.float32}   # the user's model is not converted
    assert {p.dtype for p in restored.parameters()} == {torch.float64}
    for mode in (False, True):
        gm.train(mode)
        restored.train(mode)
        torch.testing.assert_close(restored(x), gm(x), rtol=0, atol=0)
        torch.testing.assert_close(orthofx.penalty(restored), orthofx.penalty(gm), rtol=0, atol=0)


def test_load_resumes_a_jacobian_probe_mid_period(tmp_path):
    # with every: 2, three training steps leave the probe between two estimates; the reloaded probe started a new
    # period, so it estimated (a non-zero penalty) where the saved model skips, and the other way round
    x = orthofx.models.example_input("deep_mlp", batch=3, seed=1)
    policy = {"rules": [{"match": {"kind": "block", "name": "layers"}, "apply": "jacobian_isometry",
                         "with": {"every": 2, "weight": 1.0}}]}
    torch.manual_seed(0)
    gm = orthofx.transform(orthofx.models.DeepMLP(depth=3, width=16), policy, example_inputs=(x,))
    _train(gm, x, steps=3)
    orthofx.export(gm, tmp_path / "j.pt")
    # the probe step travels in the state dict's metadata (session 30; a "probe_calls" key before)
    saved = torch.load(tmp_path / "j.pt", weights_only=True)
    assert saved["state_dict"]._metadata["layers"]["orthofx_probe_calls"] == 1
    restored = orthofx.load(orthofx.models.DeepMLP(depth=3, width=16), tmp_path / "j.pt")
    gm.train()
    restored.train()
    penalties = []
    for step in range(4):
        torch.manual_seed(10 + step)   # the same Rademacher probes for both
        gm(x)
        expected = orthofx.penalty(gm)
        torch.manual_seed(10 + step)
        restored(x)
        penalties.append(float(expected.detach()))
        torch.testing.assert_close(orthofx.penalty(restored), expected, rtol=1e-6, atol=1e-9)
    assert [p > 0 for p in penalties] == [False, True, False, True]


def test_load_refuses_a_state_dict_with_a_key_that_is_not_a_name(tmp_path):
    # torch's load_state_dict failed with a raw AttributeError ('int' object has no attribute 'startswith')
    x = orthofx.models.example_input("small_cnn", batch=3, seed=1)
    gm = orthofx.transform(orthofx.models.SmallCNN(width=4), "lorth", example_inputs=(x,))
    orthofx.export(gm, tmp_path / "m.pt")
    content = torch.load(tmp_path / "m.pt", weights_only=True)
    content["state_dict"][3] = torch.zeros(2)
    torch.save(content, tmp_path / "edited.pt")
    model = orthofx.models.SmallCNN(width=4)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(orthofx.ExportError, match=r"saved weights in '.*edited\.pt' are damaged: a state_dict maps "
                                                  r"parameter names \(str\) to tensors, and 1 entry does not "
                                                  r"\(3: Tensor\)"):
        orthofx.load(model, tmp_path / "edited.pt")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_load_without_the_example_inputs_a_pass_needs_says_to_give_them_to_load(tmp_path):
    # cayley_fft takes its input size from the example inputs; the error said to pass them to orthofx.transform
    # and to "load with the original model", not that orthofx.load takes them
    x = orthofx.models.example_input("small_cnn", batch=3, seed=1)
    policy = {"rules": [{"match": {"type": "Conv2d"}, "apply": "orthogonal_conv",
                         "with": {"method": "cayley_fft", "on_impossible": "skip"}}]}
    gm = orthofx.transform(orthofx.models.SmallCNN(width=4), policy, example_inputs=(x,))
    orthofx.export(gm, tmp_path / "c.pt")
    with pytest.raises(orthofx.ExportError, match=r"cayley_fft.*pass them here too: orthofx\.load\(model, path, "
                                                  r"example_inputs=\(x,\)\)"):
        orthofx.load(orthofx.models.SmallCNN(width=4), tmp_path / "c.pt")
    restored = orthofx.load(orthofx.models.SmallCNN(width=4), tmp_path / "c.pt", example_inputs=(x,))
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(x), gm.eval()(x), rtol=0, atol=0)


def test_each_onnx_output_is_held_to_its_own_scale():
    # a large output (a sum of ~1e6, tolerance 8 eps 1e6 ~ 0.95) must not excuse a small one translated wrongly
    from orthofx.export import _worst_output
    logits, total = torch.tensor([0.5, -1.0]), torch.tensor(1.0e6)
    wrong = [logits.numpy() + 0.01, total.numpy()]
    assert _worst_output([logits, total], wrong) == pytest.approx((0.01, ONNX_TOLERANCE))
    rounded = [logits.numpy(), total.numpy() + 0.0625]   # one float32 step at 1e6: within the sum's tolerance
    difference, tolerance = _worst_output([logits, total], rounded)
    assert difference <= tolerance
