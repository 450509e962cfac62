"""load of a float64 .pt with float64 example inputs rewrites its own converted copy of the model, not a second
deep copy of it (session 28 found two copies of the weights: the dtype copy, then transform's)."""
import importlib

import torch
from torch import nn

import orthofx
from orthofx.transform import manifest_of, transform_private_copy

export_module = importlib.import_module("orthofx.export")  # orthofx.export is the function


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))


def test_load_in_the_saved_dtype_keeps_one_copy_of_the_weights(tmp_path, monkeypatch):
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    gm = orthofx.transform(_model(), "lorth", example_inputs=(x.float(),)).double()
    path = tmp_path / "m.pt"
    orthofx.export(gm, path)
    copies = []
    original = export_module._in_saved_dtype

    def recording(*args, **kwargs):
        copy = original(*args, **kwargs)
        copies.append(copy)
        return copy

    monkeypatch.setattr(export_module, "_in_saved_dtype", recording)
    fresh = _model()
    restored = orthofx.load(fresh, path, example_inputs=(x,))
    (converted,) = copies
    assert converted is not None and converted[3].weight.dtype == torch.float64
    # the restored model's weights live in the converted copy's tensors (a second deep copy made new ones)
    assert restored.get_submodule("3").weight.data_ptr() == converted[3].weight.data_ptr()
    assert torch.equal(restored(x), gm(x))
    assert fresh[3].weight.dtype == torch.float32  # the user's model is untouched


def test_transform_private_copy_rewrites_the_given_model_and_checks_as_transform():
    model = _model()
    x = torch.randn(2, 2, 4, 4)
    weight = model[0].weight
    gm = transform_private_copy(model, "lorth", example_inputs=(x,))
    assert gm.get_submodule("0").weight is weight  # no copy
    reference = orthofx.transform(_model(), "lorth", example_inputs=(x,))
    assert torch.equal(gm(x), reference(x))
    assert orthofx.penalty(gm).item() == orthofx.penalty(reference).item()
    assert manifest_of(gm).output_change is not None  # checked on the example call, as transform does
