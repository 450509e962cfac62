"""freeze, export (.onnx / .pt2 / .pt) and load."""

import pytest
import torch
from torch import nn

import orthofx
from orthofx.passes import Change, Pass, register_pass, unregister_pass


class ScaledLinear(nn.Module):
    """A stand-in for an orthofx layer: its weight is a function of a parameter; to_plain() bakes it."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.raw = nn.Parameter(linear.weight.detach().clone())
        self.bias = nn.Parameter(linear.bias.detach().clone())

    @property
    def weight(self):
        return 2.0 * torch.tanh(self.raw)

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)

    def to_plain(self):
        plain = nn.Linear(self.raw.shape[1], self.raw.shape[0])
        plain.weight.data.copy_(self.weight)
        plain.bias.data.copy_(self.bias)
        return plain


@pytest.fixture
def swap_policy():
    @register_pass
    class Swap(Pass):
        name = "swap_for_test"
        site_kinds = frozenset({"module"})
        module_types = (nn.Linear,)

        def apply(self, ctx, entries):
            for entry in entries:
                ctx.replace_module(entry.site, ScaledLinear(ctx.module(entry.site)))
                ctx.record(Change(entry.site.name, entry.rule_name, self.name, "scaled"))

    yield {"rules": [{"match": {"type": "Linear"}, "apply": "swap_for_test"},
                     {"match": {"type": "Conv2d"}, "apply": "orth_regularizer"}]}
    unregister_pass("swap_for_test")


def small_model():
    torch.manual_seed(0)
    return orthofx.models.get("small_cnn", width=4).eval()


def test_freeze_bakes_to_plain_layers_and_drops_penalties(swap_policy):
    x = orthofx.models.example_input("small_cnn", batch=3)
    gm = orthofx.transform(small_model(), swap_policy, example_inputs=(x,))
    assert isinstance(gm.get_submodule("fc"), ScaledLinear)
    frozen = orthofx.freeze(gm)
    assert type(frozen.get_submodule("fc")) is nn.Linear
    assert isinstance(gm.get_submodule("fc"), ScaledLinear)  # the transformed model is untouched
    torch.testing.assert_close(frozen(x), gm.eval()(x), rtol=0, atol=1e-6)
    assert orthofx.penalty(frozen).item() == 0.0 and orthofx.penalty(gm).item() > 0
    assert orthofx.manifest_of(frozen).frozen and not frozen.training


def test_pt_roundtrip_is_weights_only_and_replays_the_policy(tmp_path, swap_policy):
    model = small_model()
    x = orthofx.models.example_input("small_cnn", batch=3)
    gm = orthofx.transform(model, swap_policy, example_inputs=(x,))
    with torch.no_grad():
        gm.get_submodule("conv1").weight.mul_(1.5)  # "training" changed the weights
    result = orthofx.export(gm, tmp_path / "m.pt")
    saved = torch.load(tmp_path / "m.pt", weights_only=True)
    assert set(saved) == {"orthofx_format", "policy", "state_dict"}
    restored = orthofx.load(model, tmp_path / "m.pt", example_inputs=(x,))
    torch.testing.assert_close(restored.eval()(x), gm.eval()(x), rtol=0, atol=0)
    assert isinstance(restored.get_submodule("fc"), ScaledLinear)
    assert result.format == "pt"


def test_load_rejects_foreign_files(tmp_path):
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(orthofx.ExportError, match="not an orthofx .pt file"):
        orthofx.load(small_model(), tmp_path / "other.pt")


def test_export_pt2_matches(tmp_path, swap_policy):
    x = orthofx.models.example_input("small_cnn", batch=3)
    gm = orthofx.transform(small_model(), swap_policy, example_inputs=(x,))
    result = orthofx.export(gm, tmp_path / "m.pt2", example_inputs=(x,))
    assert result.max_abs_diff <= 1e-6
    loaded = torch.export.load(tmp_path / "m.pt2").module()
    bigger = orthofx.models.example_input("small_cnn", batch=5, seed=1)  # the batch dimension is dynamic
    torch.testing.assert_close(loaded(bigger), orthofx.freeze(gm)(bigger), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_export_onnx_runs_in_onnxruntime(tmp_path, swap_policy):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    x = orthofx.models.example_input("small_cnn", batch=3)
    gm = orthofx.transform(small_model(), swap_policy, example_inputs=(x,))
    result = orthofx.export(gm, tmp_path / "m.onnx", example_inputs=(x,))
    assert result.max_abs_diff <= 1e-4 and (tmp_path / "m.onnx").exists()


def test_export_errors(tmp_path):
    gm = orthofx.transform(small_model(), "lorth")
    with pytest.raises(orthofx.ExportError, match="unknown export format"):
        orthofx.export(gm, tmp_path / "m.zip", example_inputs=(torch.randn(1, 1, 8, 8),))
    with pytest.raises(orthofx.ExportError, match="needs example_inputs"):
        orthofx.export(gm, tmp_path / "m.pt2")
    with pytest.raises(orthofx.ExportError, match="opset"):
        orthofx.export(gm, tmp_path / "m.onnx", example_inputs=(torch.randn(1, 1, 8, 8),), opset=17)
