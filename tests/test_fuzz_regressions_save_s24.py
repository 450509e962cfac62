"""Regressions from fuzzing orthofx.load with hand-edited .pt files (session 24).

``load_state_dict`` copies each saved tensor into the model with ``copy_``, which casts to the model's dtype
whatever the file holds: an int64 or bool tensor became float weights, a complex one lost its imaginary part, a
float one was truncated into BatchNorm's integer ``num_batches_tracked``, all without an error. Each test asserts
the precise error, that the model passed in is unchanged, or compares the restored tensors with the saved ones.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import ExportError
from references import penalised_sgd_steps


def _model() -> nn.Module:
    """A tiny model with float weights, BatchNorm's float running statistics and its int64 step count."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def _trained(x: torch.Tensor) -> nn.Module:
    """An orthogonal transform of :func:`_model` after two SGD steps, so its weights, running statistics and
    ``num_batches_tracked`` (2) differ from a fresh transform's."""
    gm = orthofx.transform(_model(), "orthogonal", example_inputs=(x,))
    gm.train()
    penalised_sgd_steps(gm, x, 2, lr=0.1)
    return gm


def _edited_file(tmp_path, key: str, edit) -> str:
    """Export a trained model, replace ``state_dict[key]`` by ``edit(tensor)`` and write the result."""
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    orthofx.export(_trained(x), tmp_path / "m.pt")
    content = torch.load(tmp_path / "m.pt", weights_only=True)
    content["state_dict"][key] = edit(content["state_dict"][key])
    torch.save(content, tmp_path / "edited.pt")
    return str(tmp_path / "edited.pt")


WRONG_KIND = {
    # an integer tensor where the model holds a float weight: 0.7 -> 0 and -0.4 -> 0, loaded as 0.0
    "int64-weight": ("0.raw_weight", lambda t: (t * 10).to(torch.int64), torch.int64, torch.float32),
    "bool-weight": ("0.raw_weight", lambda t: t > 0, torch.bool, torch.float32),
    # the imaginary part was dropped, with only a torch UserWarning
    "complex64-weight": ("0.raw_weight", lambda t: torch.complex(t, torch.ones_like(t)), torch.complex64,
                         torch.float32),
    "complex64-bias": ("0.bias", lambda t: torch.complex(t, t), torch.complex64, torch.float32),
    "int64-batchnorm-weight": ("1.weight", lambda t: torch.ones_like(t, dtype=torch.int64), torch.int64,
                               torch.float32),
    "int32-running-mean": ("1.running_mean", lambda t: t.to(torch.int32), torch.int32, torch.float32),
    # a float step count was truncated into the int64 buffer (2.5 -> 2)
    "float-step-count": ("1.num_batches_tracked", lambda t: t.float() + 0.5, torch.float32, torch.int64),
    "bool-step-count": ("1.num_batches_tracked", lambda t: t > 0, torch.bool, torch.int64),
}


@pytest.mark.parametrize("case", list(WRONG_KIND), ids=list(WRONG_KIND))
def test_load_refuses_a_tensor_of_the_wrong_kind_of_dtype(tmp_path, case):
    key, edit, file_dtype, model_dtype = WRONG_KIND[case]
    path = _edited_file(tmp_path, key, edit)
    model = _model()
    before = copy.deepcopy(model.state_dict())
    expected = re.escape(f"{key!r} is {file_dtype} in the file but {model_dtype} ")
    with pytest.raises(ExportError, match=r"saved weights in '.*edited\.pt' have the wrong kind of dtype: "
                                          + expected) as caught:
        orthofx.load(model, path)
    message = str(caught.value)
    assert "Re-export the model with orthofx.export" in message
    assert re.search(re.escape(f"saved['state_dict'][{key!r}] = tensor.to({model_dtype})"), message)
    # the model passed in is untouched: same tensors, same values, same dtypes
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before)


def test_load_names_every_wrong_entry_up_to_three(tmp_path):
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    orthofx.export(_trained(x), tmp_path / "m.pt")
    content = torch.load(tmp_path / "m.pt", weights_only=True)
    state = content["state_dict"]
    for key in ("0.raw_weight", "0.bias", "1.weight", "1.bias"):
        state[key] = state[key].to(torch.int64)
    torch.save(content, tmp_path / "edited.pt")
    with pytest.raises(ExportError, match=r"'0\.raw_weight' is torch\.int64 in the file .*, '0\.bias' is "
                                          r"torch\.int64 .*, '1\.weight' is torch\.int64 .* and 1 more\. "):
        orthofx.load(_model(), tmp_path / "edited.pt")


def test_a_float64_file_with_an_int64_step_count_still_loads_exactly(tmp_path):
    # the legitimate cases the check must let through: a model saved after .double() comes back in float64 (the
    # file's dtype restored on purpose), and BatchNorm's num_batches_tracked is int64 in the file and the model
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    gm = _trained(x).double()
    orthofx.export(gm, tmp_path / "m.pt")
    saved = gm.state_dict()
    assert saved["1.num_batches_tracked"].dtype == torch.int64 and int(saved["1.num_batches_tracked"]) == 2
    restored = orthofx.load(_model(), tmp_path / "m.pt").state_dict()
    assert list(restored) == list(saved)
    for key, tensor in saved.items():
        assert restored[key].dtype == tensor.dtype, key
        assert torch.equal(restored[key], tensor), key


def test_an_int32_step_count_widens_into_the_int64_buffer(tmp_path):
    # within a kind the cast keeps the value: an integer count from another writer is accepted
    path = _edited_file(tmp_path, "1.num_batches_tracked", lambda t: t.to(torch.int32))
    restored = orthofx.load(_model(), path)
    count = restored.get_submodule("1").num_batches_tracked
    assert count.dtype == torch.int64 and int(count) == 2
