"""Models whose forward branches on ``self.training``: capture traces both modes (orthofx.capture.ModalGraphModule),
transform rewrites both graphs, freeze and export keep the eval graph, copies and pickles keep both."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch._dynamo
from torch import nn

import orthofx
from orthofx.capture import ModalGraphModule, capture
from orthofx.nn.conditioning import stable_eigh

pytestmark = pytest.mark.usefixtures("one_thread")


class RunningCentre(nn.Module):
    """Centres with the batch mean in training (and tracks it), with the running mean in eval; the two modes also
    create different constants (``torch.ones`` against ``torch.full``), so the two traces' constants clash."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.eval_only = nn.Linear(width, width)  # called in eval mode only

    def forward(self, x):
        if self.training:
            m = x.mean(0)
            self.mean.lerp_(m.detach(), 0.25)
            return (x - m) * torch.ones(x.shape[-1])
        return self.eval_only(x - self.mean) * torch.full((x.shape[-1],), 0.5)


class Net(nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(3, width)
        self.centre = RunningCentre(width)
        self.fc2 = nn.Linear(width, 2)

    def forward(self, x):
        return self.fc2(torch.tanh(self.centre(self.fc1(x))))


def _net() -> tuple[Net, torch.Tensor]:
    torch.manual_seed(0)
    return Net(), torch.randn(8, 3)


def _assert_follows(gm: nn.Module, model: nn.Module, x: torch.Tensor, steps: int = 2) -> None:
    """``gm`` and ``model`` (equal weights and buffers) agree in both modes, including the buffer updates."""
    for _ in range(steps):
        torch.testing.assert_close(gm.train()(x), model.train()(x))
        torch.testing.assert_close(gm.eval()(x), model.eval()(x))
    torch.testing.assert_close(gm.get_buffer("centre.mean"), model.centre.mean)


# ------------------------------------------------------------------------------------------------------ capture

@pytest.mark.parametrize("mode", ["fx", "export"])
@pytest.mark.parametrize("start", ["train", "eval"])
def test_capture_traces_both_modes(mode, start):
    model, x = _net()
    model.train(start == "train")
    reference = copy.deepcopy(model)
    gm, info = capture(model, mode=mode, example_inputs=(x,))
    assert isinstance(gm, ModalGraphModule) and info.mode_dependent == ["centre"]
    assert gm.graph_training is (start == "train") and model.training is (start == "train")
    # the eval-only layer is called by one graph only, and reached through gm all the same
    assert gm.get_submodule("centre.eval_only") is model.centre.eval_only
    _assert_follows(gm, reference, x)
    # eval mode leaves the buffer alone
    before = gm.get_buffer("centre.mean").clone()
    gm.eval()(x)
    assert torch.equal(gm.get_buffer("centre.mean"), before)


def test_graph_is_the_current_modes_and_torch_export_follows_it():
    model, x = _net()
    gm, _ = capture(model.train())
    assert gm.graph is gm.graph_for(True) and "lerp_" in gm.code
    assert gm.eval().graph is gm.graph_for(False) is gm.other_graph and "lerp_" not in gm.code
    # torch.export reads gm.graph of a GraphModule rather than calling its forward
    exported = torch.export.export(gm, (x,)).module()
    torch.testing.assert_close(exported(x), gm(x))
    assert not any(n.target == torch.ops.aten.lerp_.Scalar for n in torch.export.export(gm, (x,)).graph.nodes)


def test_graph_for_and_single_mode():
    model, x = _net()
    gm, _ = capture(model.train())
    assert gm.graph_for(True) is gm.graph and gm.graph_for(False) is gm.other_graph
    evaluation = gm.single_mode(training=False)
    assert type(evaluation).__mro__[1] is torch.fx.GraphModule and type(evaluation).__name__ == "Net"
    torch.testing.assert_close(evaluation.eval()(x), copy.deepcopy(model).eval()(x))
    assert not any(n.target == "lerp_" for n in evaluation.graph.nodes)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "copy"])
@pytest.mark.parametrize("mode", ["fx", "export"])
def test_copies_keep_both_graphs(how, mode):
    model, x = _net()
    gm, _ = capture(model.train(), mode=mode, example_inputs=(x,))
    gm(x)  # a training step moves the running mean away from its initial zeros
    clone = {"deepcopy": copy.deepcopy, "pickle": lambda m: pickle.loads(pickle.dumps(m)),
             "copy": copy.copy}[how](gm)
    assert isinstance(clone, ModalGraphModule) and clone.graph_training
    reference = copy.deepcopy(model)
    if how == "copy":  # a shallow copy (DataParallel's replicas) shares the buffers with the model
        reference = model
        model = copy.deepcopy(model)
    _assert_follows(clone, reference, x)


def test_compiles_without_graph_breaks_in_both_modes():
    model, x = _net()
    gm, _ = capture(model.train())
    for training in (True, False):
        gm.train(training)
        explanation = torch._dynamo.explain(gm)(x)  # runs gm once (a training step updates the buffer)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
        reference = copy.deepcopy(model).train(training)
        compiled = torch.compile(gm, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), reference(x))
        torch.testing.assert_close(gm.get_buffer("centre.mean"), reference.centre.mean)


def test_models_without_mode_branches_keep_one_graph():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.BatchNorm1d(4))
    for mode in ("fx", "export"):
        gm, info = capture(model, mode=mode, example_inputs=(torch.randn(4, 3),))
        assert not isinstance(gm, ModalGraphModule) and info.mode_dependent == []


class ConstantByMode(nn.Module):
    """The same ops in both modes; only a constant differs (same code, other tensor values)."""

    def forward(self, x):
        scale = torch.tensor(2.0) if self.training else torch.tensor(1.0)
        return x * scale


class EvalNeedsCalibration(nn.Module):
    """Eval mode cannot be traced (it asks for a calibration first); training mode can."""

    def forward(self, x):
        if not self.training:
            raise RuntimeError("calibrate the model first")
        return x * 2


def test_a_constant_that_depends_on_the_mode_is_found():
    model = nn.Sequential(nn.Linear(3, 3), ConstantByMode()).train()
    x = torch.randn(4, 3)
    gm, info = capture(model)
    assert isinstance(gm, ModalGraphModule) and info.mode_dependent == ["1"]
    torch.testing.assert_close(gm.train()(x), model.train()(x))
    torch.testing.assert_close(gm.eval()(x), model[0](x))


def test_other_mode_that_cannot_be_captured_is_warned_about():
    model = nn.Sequential(nn.Linear(3, 3), EvalNeedsCalibration()).train()
    gm, info = capture(model)
    assert not isinstance(gm, ModalGraphModule) and model.training
    (warning,) = info.warnings
    assert "eval-mode forward could not be captured (RuntimeError: calibrate the model first)" in warning


# ---------------------------------------------------------------------------------------------------- transform

def test_transform_rewrites_modules_only_the_other_graph_calls():
    model, x = _net()
    gm = orthofx.transform(model.train(), "orthogonal", example_inputs=(x,))
    assert isinstance(gm, ModalGraphModule)
    layer = gm.get_submodule("centre.eval_only")
    assert isinstance(layer, orthofx.nn.OrthogonalLinear)
    weight = layer.weight.detach().double()
    torch.testing.assert_close(weight @ weight.T, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
    assert any(row["site"] == "centre.eval_only" for row in orthofx.report(gm).rows)
    assert isinstance(model.centre.eval_only, nn.Linear)  # the user's model is untouched


def _dbn(seed: int = 0):
    torch.manual_seed(seed)
    model = orthofx.models.get("dbn_cnn").train()
    return model, orthofx.models.example_input("dbn_cnn")


def test_decorrelated_batchnorm_switches_modes_after_the_svd_preset():
    model, x = _dbn()
    plan = orthofx.explain(model, "svd", example_inputs=(x,))
    sites = [row["site"] for row in plan.rows()]
    assert sites.index("dbn:linalg.eigh@eval") == sites.index("dbn:linalg.eigh") + 1
    gm = orthofx.transform(model, "svd", example_inputs=(x,))
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.01)
    handle = orthofx.attach(optimizer, gm)
    # both graphs call the stable op; the training graph's gradient flows through it
    for graph in (gm.graph, gm.other_graph):
        assert any(n.target is stable_eigh for n in graph.nodes)
    for _ in range(3):
        gm.train()
        loss = gm(x).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    handle.remove()
    assert torch.isfinite(gm.dbn.running_cov).all()
    # the reference model with the trained weights and statistics: eval uses the running whitening in both
    missing, unexpected = reference.load_state_dict(gm.state_dict(), strict=False)
    assert missing == [] and all(key.startswith("orthofx_monitor_") for key in unexpected)
    torch.testing.assert_close(gm.eval()(x), reference.eval()(x), atol=1e-5, rtol=1e-4)
    # eval mode leaves the running statistics alone, as in the model
    before = gm.dbn.running_cov.clone()
    gm.eval()(x)
    assert torch.equal(gm.dbn.running_cov, before)
    # both monitors report: the eval site's kappa is the running covariance's
    rows = {row["site"]: row for row in orthofx.report(gm).rows}
    sigma = gm.dbn.running_cov.double() + model.dbn.eps * torch.eye(model.dbn.num_features, dtype=torch.float64)
    evals = torch.linalg.eigvalsh(sigma)
    assert rows["dbn:linalg.eigh@eval"]["kappa"] == pytest.approx(float(evals[-1] / evals[0]), rel=1e-3)
    assert rows["dbn:linalg.eigh"]["kappa"] is not None


def test_freeze_and_onnx_keep_the_eval_graph(tmp_path):
    pytest.importorskip("onnxruntime")
    model, x = _dbn(1)
    gm = orthofx.transform(model, "svd", example_inputs=(x,))
    gm.train()
    gm(x)  # running statistics away from their initial values
    frozen = orthofx.freeze(gm)
    assert not isinstance(frozen, ModalGraphModule) and not frozen.training
    # the eval whitening is folded: no decomposition, no running-statistics update left
    assert not any(n.target is stable_eigh or n.target in ("lerp_",) for n in frozen.graph.nodes)
    expected = copy.deepcopy(gm).eval()(x)
    torch.testing.assert_close(frozen(x), expected, atol=1e-5, rtol=1e-5)
    result = orthofx.export(gm, tmp_path / "dbn.onnx", example_inputs=(x,))
    assert result.max_abs_diff <= 1e-4


def test_save_and_load_replays_both_modes(tmp_path):
    model, x = _dbn(2)
    gm = orthofx.transform(model, "svd", example_inputs=(x,))
    gm.train()
    gm(x)
    orthofx.export(gm, tmp_path / "dbn.pt", example_inputs=(x,))
    restored = orthofx.load(orthofx.models.get("dbn_cnn").train(), tmp_path / "dbn.pt", example_inputs=(x,))
    assert isinstance(restored, ModalGraphModule)
    torch.testing.assert_close(restored.eval()(x), gm.eval()(x))
