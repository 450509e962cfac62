"""Session 38 review of the ``.pt`` save / ``orthofx.load`` path.

Found: ``load`` restored a file into a model of another forward whose weights fit (``nn.Tanh`` where the saved
model had ``nn.ReLU``, the same layers wired otherwise) without a word, and into a model built on the meta device
(where copying the weights does nothing: a model with no weights, torch's warnings the only sign); a file of a
newer format was called "not an orthofx .pt file". The file now records the transformed graph in the state
dict's root metadata (``GRAPH_METADATA_KEY``), which ``load`` compares with its replay.
"""
import copy
import importlib

import pytest
import torch
from torch import nn

import orthofx

export_module = importlib.import_module("orthofx.export")  # orthofx.export is the function
X = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))


def _net(act=nn.ReLU):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), act(), nn.Conv2d(4, 4, 3, padding=1), nn.Flatten(),
                         nn.Linear(64, 3))


class _Skip(nn.Module):
    """The layers of ``_net`` (same names, same shapes), wired with a residual connection."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.add_module("0", nn.Conv2d(2, 4, 3, padding=1))
        self.add_module("1", nn.ReLU())
        self.add_module("2", nn.Conv2d(4, 4, 3, padding=1))
        self.add_module("3", nn.Flatten())
        self.add_module("4", nn.Linear(64, 3))

    def forward(self, x):
        h = self.get_submodule("1")(self.get_submodule("0")(x))
        return self.get_submodule("4")(self.get_submodule("3")(self.get_submodule("2")(h) + h))


class _Noisy(nn.Module):
    """A forward that branches on ``self.training``: one graph per mode."""

    def __init__(self, scale=0.1):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 6)
        self.scale = scale

    def forward(self, x):
        if self.training:
            x = x + self.scale * torch.randn_like(x)
        return torch.relu(self.fc(x))


class _NoisyOtherEval(_Noisy):
    """``_Noisy`` in training mode, another activation in eval mode."""

    def forward(self, x):
        if self.training:
            return torch.relu(self.fc(x + self.scale * torch.randn_like(x)))
        return torch.tanh(self.fc(x))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(before, model):
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _saved(tmp_path, policy="lorth"):
    gm = orthofx.transform(_net(), policy, example_inputs=(X,))
    with torch.no_grad():
        gm.get_submodule("2").weight.mul_(1.25)  # "trained": the file's weights are not the fresh model's
    path = tmp_path / "m.pt"
    orthofx.export(gm, path)
    return gm, path


@pytest.mark.parametrize("other", [lambda: _net(nn.Tanh), _Skip], ids=["another_activation", "another_wiring"])
def test_load_refuses_a_model_whose_forward_differs_though_its_weights_fit(tmp_path, other):
    gm, path = _saved(tmp_path)
    model = other()
    assert model.state_dict().keys() == gm.state_dict().keys()  # the weights alone cannot tell
    before = _state(model)
    with pytest.raises(orthofx.ExportError, match="computes otherwise than the one") as info:
        orthofx.load(model, path)
    message = str(info.value)
    assert "at node" in message and "The model was not changed" in message
    if isinstance(model, nn.Sequential):
        assert "ReLU" in message and "Tanh" in message
    assert _same_state(before, model) and model.training
    # what the old code returned: the saved weights in another computation, whose outputs are not the saved model's
    plain = copy.deepcopy(model)
    plain.load_state_dict({k: v for k, v in gm.state_dict().items() if k in plain.state_dict()})
    assert not torch.allclose(plain.eval()(X), gm.eval()(X))


def test_the_same_model_still_loads_bit_for_bit_and_an_old_file_without_the_record_loads_unchecked(tmp_path):
    gm, path = _saved(tmp_path)
    saved = torch.load(path, weights_only=True)  # plain types only: no pickled class in the record
    record = saved["state_dict"]._metadata[""][export_module.GRAPH_METADATA_KEY]
    assert record["capture"] == "fx" and len(record["graphs"]) == 1
    assert len(record["graphs"][0]) == len(gm.graph.nodes)
    model = _net()
    before = _state(model)
    restored = orthofx.load(model, path)
    assert torch.equal(restored.eval()(X), gm.eval()(X))
    assert _same_state(before, model)
    assert gm.state_dict()._metadata[""].get(export_module.GRAPH_METADATA_KEY) is None  # the file's, not the model's
    # a file written before the record: loads as before, unchecked (even into another forward)
    del saved["state_dict"]._metadata[""][export_module.GRAPH_METADATA_KEY]
    torch.save(saved, tmp_path / "old.pt")
    assert torch.equal(orthofx.load(_net(), tmp_path / "old.pt").eval()(X), gm.eval()(X))
    orthofx.load(_net(nn.Tanh), tmp_path / "old.pt")


def test_a_damaged_graph_record_is_an_export_error(tmp_path):
    _, path = _saved(tmp_path)
    saved = torch.load(path, weights_only=True)
    saved["state_dict"]._metadata[""][export_module.GRAPH_METADATA_KEY] = {"capture": "fx", "graphs": [[1, 2]]}
    torch.save(saved, tmp_path / "bad.pt")
    with pytest.raises(orthofx.ExportError, match="is damaged: its record of the model's graph"):
        orthofx.load(_net(), tmp_path / "bad.pt")


def test_a_model_with_a_graph_per_training_mode_loads_and_one_with_another_eval_branch_is_refused(tmp_path):
    x = torch.randn(4, 6)
    gm = orthofx.transform(_Noisy(), "lorth", example_inputs=(x,))
    path = tmp_path / "noisy.pt"
    orthofx.export(gm, path)
    record = torch.load(path, weights_only=True)["state_dict"]._metadata[""][export_module.GRAPH_METADATA_KEY]
    assert len(record["graphs"]) == 2
    restored = orthofx.load(_Noisy(), path)
    assert torch.equal(restored.eval()(x), gm.eval()(x))
    torch.manual_seed(3)
    noisy = restored.train()(x)
    torch.manual_seed(3)
    assert torch.equal(noisy, gm.train()(x))
    with pytest.raises(orthofx.ExportError, match="at node .* of its eval-mode graph .*tanh"):
        orthofx.load(_NoisyOtherEval(), path)


def test_load_refuses_a_model_on_the_meta_device_and_loads_it_once_materialized(tmp_path):
    gm, path = _saved(tmp_path)
    with torch.device("meta"):
        model = _net()
    with pytest.raises(orthofx.ExportError, match="on the meta device") as info:
        orthofx.load(model, path)
    assert "to_empty" in str(info.value) and "The model was not changed" in str(info.value)
    assert all(p.is_meta for p in model.parameters())
    # the fix the message gives: materialize, then load restores every weight
    restored = orthofx.load(model.to_empty(device="cpu"), path)
    assert torch.equal(restored.eval()(X), gm.eval()(X))


@pytest.mark.parametrize("version", [export_module.FORMAT_VERSION + 1, 99])
def test_a_file_of_a_newer_format_says_to_upgrade(tmp_path, version):
    _, path = _saved(tmp_path)
    saved = torch.load(path, weights_only=True)
    saved["orthofx_format"] = version
    torch.save(saved, tmp_path / "new.pt")
    with pytest.raises(orthofx.ExportError, match=f"written by a newer orthofx \\(.pt format {version};"):
        orthofx.load(_net(), tmp_path / "new.pt")


@pytest.mark.parametrize("version", [True, 1.0, "1"])
def test_a_format_field_that_is_no_int_is_not_an_orthofx_file(tmp_path, version):
    _, path = _saved(tmp_path)
    saved = torch.load(path, weights_only=True)
    saved["orthofx_format"] = version
    torch.save(saved, tmp_path / "odd.pt")
    with pytest.raises(orthofx.ExportError, match="is not an orthofx .pt file"):
        orthofx.load(_net(), tmp_path / "odd.pt")


def test_a_cli_export_loads_and_refuses_another_forward(tmp_path, monkeypatch, capsys):
    source = tmp_path / "net.py"
    source.write_text("import torch\nfrom torch import nn\n\n\ndef build():\n    torch.manual_seed(0)\n"
                      "    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, "
                      "padding=1), nn.Flatten(), nn.Linear(64, 3))\n")
    out = tmp_path / "out.pt"
    from orthofx.cli import main
    assert main(["transform", f"{source}:build", "--policy", "lorth", "--input-shape", "3,2,4,4",
                 "--export", str(out)]) == 0
    restored = orthofx.load(_net(), out)
    reference = orthofx.transform(_net(), "lorth", example_inputs=(X,))  # the CLI's transform of the same weights
    assert torch.equal(restored.eval()(X), reference.eval()(X))
    with pytest.raises(orthofx.ExportError, match="computes otherwise"):
        orthofx.load(_net(nn.GELU), out)


def test_check_graph_false_loads_a_forward_rewritten_to_compute_the_same_thing(tmp_path):
    # F.relu(x) and x.relu() are the same function in other graph operations: refused by default, loaded with
    # check_graph=False, and then equal to the saved model's outputs (the reference)
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return torch.nn.functional.relu(self.conv(x))

    class Method(Functional):
        def forward(self, x):
            return self.conv(x).relu()

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = orthofx.transform(Functional(), "lorth", example_inputs=(x,))
    path = tmp_path / "m.pt"
    orthofx.export(gm, str(path))
    with pytest.raises(orthofx.ExportError, match="check_graph=False"):
        orthofx.load(Method(), str(path))
    restored = orthofx.load(Method(), str(path), check_graph=False)
    torch.testing.assert_close(restored.eval()(x), gm.eval()(x), rtol=0, atol=0)
    with pytest.raises(orthofx.ArgumentError, match="check_graph"):
        orthofx.load(Method(), str(path), check_graph="no")
