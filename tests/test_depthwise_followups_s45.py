"""Follow-ups to the refusal of convs whose orthogonal versions cannot train (bfbd6ec, session 45).

A ``.pt`` file an earlier orthofx wrote holds a hard ``OrthogonalConv{d}d`` (``matrix``, ``block_shift``) at a stride-1
depthwise conv; the orthogonal preset now leaves that conv plain (L_orth), a bare rule refuses it. orthofx.load must
say so (it said "load with the model the file was exported from", given that very model) and give a recipe that
works: the recipe in the error is run here as written.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import orthofx
from orthofx.export import FORMAT_VERSION

SITE = "1"


def _model(dims: int) -> nn.Module:
    conv = {1: nn.Conv1d, 2: nn.Conv2d}[dims]
    torch.manual_seed(1)
    return nn.Sequential(conv(3, 8, 1), conv(8, 8, 3, padding=1, groups=8), nn.ReLU(), conv(8, 8, 1))


def _input(dims: int) -> torch.Tensor:
    return torch.randn(2, 3, *([8] * dims), generator=torch.Generator().manual_seed(2))


def _hard_layer(dims: int) -> nn.Module:
    """The layer the orthofx before bfbd6ec put at SITE: the depthwise conv's nearest orthogonal layer."""
    layer = {1: orthofx.nn.OrthogonalConv1d, 2: orthofx.nn.OrthogonalConv2d}[dims]
    return layer.from_conv(_model(dims).get_submodule(SITE))


def _old_file(tmp_path, dims: int, policy) -> tuple[str, dict]:
    """A .pt file as an orthofx before bfbd6ec wrote it for ``policy``: the .pt writer's content (format number,
    the policy's YAML, the state dict) with the hard layer's state_dict under SITE. Returns the path and that
    layer's entries."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        regularised = {"rules": [{"match": {"type": f"Conv{dims}d"}, "apply": "orthogonal_conv",
                                  "with": {"on_impossible": "regularize"}}]}
        gm = orthofx.transform(_model(dims), regularised, example_inputs=(_input(dims),))
    state = gm.state_dict()
    assert f"{SITE}.weight" in state  # the current pass leaves the depthwise conv plain
    for key in [k for k in state if k.startswith(SITE + ".")]:
        del state[key]
    hard = {k: v.detach().clone() for k, v in _hard_layer(dims).state_dict().items()}
    state.update({f"{SITE}.{k}": v for k, v in hard.items()})
    yaml = orthofx.Policy.load(policy).to_yaml()
    path = str(tmp_path / "old.pt")
    torch.save({"orthofx_format": FORMAT_VERSION, "policy": yaml, "state_dict": state}, path)
    return path, hard


def _recipe(message: str) -> str:
    start = message.index("To recover the weights")
    start = message.index("): ", start) + 3
    return message[start:message.index(". The convs keep", start)]


@pytest.mark.parametrize("dims", [1, 2])
def test_old_file_with_hard_depthwise_says_why_and_recipe_works(tmp_path, dims):
    path, hard_state = _old_file(tmp_path, dims, "orthogonal")
    with pytest.raises(orthofx.ExportError) as info:
        orthofx.load(_model(dims), path)
    message = str(info.value)
    assert "load with the model the file was exported from" not in message  # it was that model
    assert "an earlier orthofx wrote it" in message and "fixed signed shifts" in message
    assert f"'{SITE}' (Conv{dims}d, in=8, out=8, groups=8)" in message
    # the recipe, run as the error writes it
    model = _model(dims)
    scope = {"torch": torch, "orthofx": orthofx, "model": model}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(_recipe(message).replace("; for site", "\nfor site").replace(". Then ", "\n")
             .replace(" (with the example inputs it was given) and ", "\n"), scope)
    gm = scope["gm"]
    saved = torch.load(path, weights_only=True)["state_dict"]
    # the hard layer's kernel, rebuilt independently: one tap of +-1 per channel (the fixed signed shift)
    hard = _hard_layer(dims)
    hard.load_state_dict(hard_state)
    conv = gm.get_submodule(SITE)
    assert type(conv) is {1: nn.Conv1d, 2: nn.Conv2d}[dims]
    torch.testing.assert_close(conv.weight, hard.weight.detach(), rtol=0, atol=0)
    torch.testing.assert_close(conv.bias, saved[f"{SITE}.bias"], rtol=0, atol=0)
    taps = conv.weight.detach().flatten(1)
    assert ((taps != 0).sum(1) == 1).all() and torch.allclose(taps.abs().sum(1), torch.ones(8))
    for key, value in saved.items():  # the other layers come back as saved
        if not key.startswith(SITE + "."):
            torch.testing.assert_close(gm.state_dict()[key], value, rtol=0, atol=0)
    # and the conv now trains (the hard layer's only parameter got no gradient)
    gm.train()(_input(dims)).square().sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_old_file_refused_by_a_bare_rule_says_why(tmp_path):
    rule = {"rules": [{"match": {"type": "Conv2d"}, "apply": "orthogonal_conv"}]}  # on_impossible: error
    path, _ = _old_file(tmp_path, 2, rule)
    with pytest.raises(orthofx.ExportError) as info:
        orthofx.load(_model(2), path)
    message = str(info.value)
    assert "now refuses layers of this model" in message and "an earlier orthofx wrote it" in message
    assert "does not apply to this model" not in message
    assert "'on_impossible: regularize'" in message and "orthofx.nn.OrthogonalConv2d.from_conv" in message
    assert isinstance(info.value.__cause__, orthofx.ImpossibleLayerError)


def test_another_model_keeps_the_wrong_model_message(tmp_path):
    """A file without hard layers at untrainable sites, loaded into a model it does not fit: the old message."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = orthofx.transform(_model(2), "orthogonal", example_inputs=(_input(2),))
    path = str(tmp_path / "new.pt")
    orthofx.export(gm, path)
    torch.manual_seed(1)
    other = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
    with pytest.raises(orthofx.ExportError) as info:
        orthofx.load(other, path)
    assert "an earlier orthofx wrote it" not in str(info.value)
