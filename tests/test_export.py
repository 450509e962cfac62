"""freeze, export (.onnx / .pt2 / .pt) and load."""

import pytest
import torch
from torch import nn

import orthofx
from orthofx.export import NEWTON_SCHULZ_SCHEDULE, NEWTON_SCHULZ_TARGET
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


# ------------------------------------------------------------------------------------------- decompositions

def _ops(gm):
    from orthofx.passes.svd_conditioning import decomposition_op

    return [decomposition_op(n) for n in gm.graph.nodes if decomposition_op(n) is not None]


def test_freeze_folds_the_running_whitening_matrix_of_eval_dbn(tmp_path):
    torch.manual_seed(0)
    model = orthofx.models.get("dbn_cnn", width=6)
    model.train()(orthofx.models.example_input("dbn_cnn", batch=32, seed=3))  # move the running statistics
    model.eval()
    x = orthofx.models.example_input("dbn_cnn", batch=5)
    gm = orthofx.transform(model, "svd", example_inputs=(x,))  # traced in eval mode: the running branch
    assert _ops(gm) == ["linalg.eigh"]
    frozen = orthofx.freeze(gm)
    assert _ops(frozen) == [] and _ops(gm) == ["linalg.eigh"]  # the transformed model keeps its eigh
    (site, (buffer,)), = frozen.meta["orthofx_folded"].items()
    assert site == "dbn:linalg.eigh"
    dbn = model.dbn
    sigma = dbn.running_cov.double() + dbn.eps * torch.eye(6, dtype=torch.float64)
    lam, vec = torch.linalg.eigh(sigma)
    torch.testing.assert_close(getattr(frozen, buffer).double(), vec @ torch.diag(lam.rsqrt()) @ vec.T,
                               atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), gm.eval()(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(frozen(x), model(x), rtol=0, atol=1e-5)
    result = orthofx.export(gm, tmp_path / "dbn.pt2", example_inputs=(x,))
    assert result.max_abs_diff <= 1e-6
    graph = torch.export.load(tmp_path / "dbn.pt2").graph
    calls = [str(n.target) for n in graph.nodes if n.op == "call_function"]
    assert calls and not any("linalg" in c or "orthofx" in c for c in calls), calls


def test_onnx_export_of_a_values_only_decomposition_names_the_site_and_the_way_out(tmp_path):
    class Spectrum(nn.Module):
        def __init__(self):
            super().__init__()
            self.lift = nn.Linear(6, 12)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(torch.linalg.svdvals(self.lift(x).reshape(-1, 4, 3)))

    x = torch.randn(5, 6)
    gm = orthofx.transform(Spectrum(), "svd", example_inputs=(x,))
    with pytest.raises(orthofx.ExportError) as info:
        orthofx.export(gm, tmp_path / "s.onnx", example_inputs=(x,))
    message = str(info.value)
    for fragment in ("linalg.svdvals at site 'linalg.svdvals'", "'lift'", "returns only the values", ".pt2",
                     "leaf_modules"):
        assert fragment in message, (fragment, message)
    assert not (tmp_path / "s.onnx").exists()
    assert orthofx.export(gm, tmp_path / "s.pt2", example_inputs=(x,)).max_abs_diff <= 1e-6


class CovarianceRoots(nn.Module):
    """Per-sample covariance of a Linear's output (+ eps I): its square root and its inverse square root."""

    def __init__(self, eps):
        super().__init__()
        self.eps = eps
        self.proj = nn.Linear(5, 6, bias=False)

    def forward(self, x):  # x: (B, N, 5)
        f = self.proj(x)
        cov = f.mT @ f / f.shape[1] + self.eps * torch.eye(6)
        evals, evecs = torch.linalg.eigh(cov)
        root = evecs @ torch.diag_embed(evals.sqrt()) @ evecs.mT
        inv_root = (evecs * evals.rsqrt().unsqueeze(-2)) @ evecs.mT
        return root.flatten(1), (inv_root @ f.mT).flatten(1)


def _exact_roots(model, x):
    """Float64 reference: the roots from an eigendecomposition of the same covariance (independent of orthofx)."""
    f = x.double() @ model.proj.weight.double().T
    cov = f.mT @ f / f.shape[1] + model.eps * torch.eye(6, dtype=torch.float64)
    lam, vec = torch.linalg.eigh(cov)
    root = vec @ torch.diag_embed(lam.sqrt()) @ vec.mT
    inv_root = vec @ torch.diag_embed(lam.rsqrt()) @ vec.mT
    return root.flatten(1), (inv_root @ f.mT).flatten(1), float((lam[:, -1] / lam[:, 0]).max().detach())


@pytest.mark.parametrize("preset", ["svd", pytest.param("lorth", marks=pytest.mark.slow)])
def test_onnx_export_replaces_matrix_roots_by_newton_schulz(tmp_path, preset):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = CovarianceRoots(eps=1e-2)
    x = torch.randn(4, 40, 5)
    gm = orthofx.transform(model, preset, example_inputs=(x,))
    result = orthofx.export(gm, tmp_path / "m.onnx", example_inputs=(x,))
    ns = result.newton_schulz
    assert ns.sites == ["linalg.eigh"] and ns.chosen and ns.iterations in NEWTON_SCHULZ_SCHEDULE
    assert ns.max_abs_diff <= NEWTON_SCHULZ_TARGET and result.max_abs_diff <= 1e-4
    assert "Newton-Schulz" in str(result)
    graph = onnx.load(tmp_path / "m.onnx").graph
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}  # standard operators only
    # onnxruntime against an independent float64 eigendecomposition, on other inputs (dynamic batch)
    other = torch.randn(7, 40, 5, generator=torch.Generator().manual_seed(1))
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: other.numpy()})
    root, white, _ = _exact_roots(model, other)
    torch.testing.assert_close(torch.from_numpy(outputs[0]).double(), root, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.from_numpy(outputs[1]).double(), white, atol=1e-4, rtol=0)
    # the exact decomposition stays everywhere else
    assert _ops(orthofx.freeze(gm)) == ["linalg.eigh"]


@pytest.mark.slow
def test_newton_schulz_iterations_follow_the_conditioning(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    x = torch.randn(2, 40, 5)
    chosen = {}
    for eps in (1e-1, 1e-3):
        model = CovarianceRoots(eps=eps)  # proj maps 5 features to 6: the covariance has rank 5, + eps I
        gm = orthofx.transform(model, "svd", example_inputs=(x,))
        result = orthofx.export(gm, tmp_path / f"m{eps}.onnx", example_inputs=(x,))
        chosen[eps] = result.newton_schulz.iterations
        assert result.max_abs_diff <= 1e-4
    kappa = _exact_roots(model, x)[2]
    assert kappa > 500
    assert chosen[1e-3] > chosen[1e-1]
    # too few iterations for kappa ~ 1e3: the check against the exact model refuses the file
    with pytest.raises(orthofx.ExportError, match=r"Newton-Schulz at linalg.eigh \(5 iterations, given.*not converged"):
        orthofx.export(gm, tmp_path / "few.onnx", example_inputs=(x,), newton_schulz_iterations=5)
    with pytest.raises(orthofx.ExportError, match="newton_schulz_iterations"):
        orthofx.export(gm, tmp_path / "bad.onnx", example_inputs=(x,), newton_schulz_iterations=0)


# ------------------------------------------------------------------ checks of the written file (audit findings)


def _small(preset="lorth", batch=3):
    x = orthofx.models.example_input("small_cnn", batch=batch)
    return orthofx.transform(orthofx.models.get("small_cnn"), preset, example_inputs=(x,)), x


def test_nan_is_a_difference_and_nan_inputs_are_refused(tmp_path):
    import numpy as np
    from orthofx.export import _max_diff
    assert _max_diff([torch.tensor([1.0, 2.0])], [np.array([1.0, np.nan], np.float32)]) == float("inf")
    assert _max_diff([torch.tensor([1.0])], [np.array([1.5], np.float32)]) == 0.5
    with pytest.raises(orthofx.ExportError, match="not finite"):
        _max_diff([torch.tensor([float("nan")])], [np.array([float("nan")], np.float32)])
    gm, x = _small()
    with pytest.raises(orthofx.ExportError, match=r"example_inputs\[0\] holds NaN"):
        orthofx.export(gm, tmp_path / "m.onnx", example_inputs=(torch.full_like(x, float("nan")),))


def test_frozen_svd_model_holds_no_orthofx_op(tmp_path):
    x = orthofx.models.example_input("gcp_cnn", batch=3)
    gm = orthofx.transform(orthofx.models.get("gcp_cnn"), "svd", example_inputs=(x,)).eval()
    frozen = orthofx.freeze(gm)
    torch.testing.assert_close(frozen(x), gm(x), rtol=0, atol=1e-6)
    orthofx.export(gm, tmp_path / "g.pt2", example_inputs=(x,))
    program = torch.export.load(tmp_path / "g.pt2")
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert not [t for t in targets if "orthofx" in t]
    assert any("linalg_eigh" in t for t in targets)
    torch.testing.assert_close(program.module()(torch.cat([x, x[:2]])), frozen(torch.cat([x, x[:2]])))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x, table):  # table: a lookup matrix, not a batch
        return self.fc(x) @ table.T


class ScaleFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, scale, x):
        return self.fc(x) * scale


def test_dynamic_batch_with_unbatched_and_non_tensor_inputs(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    inputs = (torch.randn(3, 6), torch.randn(10, 6))
    gm = orthofx.transform(TwoInputs(), "lorth", example_inputs=inputs)
    orthofx.export(gm, tmp_path / "t.pt2", example_inputs=inputs)  # one shared batch Dim failed here
    loaded = torch.export.load(tmp_path / "t.pt2").module()
    x5 = torch.randn(5, 6)
    torch.testing.assert_close(loaded(x5, inputs[1]), gm(x5, inputs[1]))
    result = orthofx.export(gm, tmp_path / "t.onnx", example_inputs=inputs)
    assert result.max_abs_diff < 1e-5
    session = onnxruntime.InferenceSession(str(tmp_path / "t.onnx"), providers=["CPUExecutionProvider"])
    names = [arg.name for arg in session.get_inputs()]
    out = session.run(None, dict(zip(names, (x5.numpy(), inputs[1].numpy()))))[0]
    torch.testing.assert_close(torch.from_numpy(out), gm(x5, inputs[1]).detach(), rtol=1e-5, atol=1e-5)
    first = (2.0, torch.randn(3, 6))  # a float before the tensor: crashed the onnxruntime feeds
    gm = orthofx.transform(ScaleFirst(), "lorth", example_inputs=first)
    assert orthofx.export(gm, tmp_path / "s.onnx", example_inputs=first).max_abs_diff < 1e-5


class LoopOverBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return torch.stack([self.fc(x[i]) for i in range(x.size(0))])


def test_a_graph_specialised_to_the_batch_refuses_others(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    x = torch.randn(3, 6)
    gm = orthofx.transform(LoopOverBatch(), "lorth", example_inputs=(x,))
    assert any("batch size 3" in w for w in gm.meta["orthofx"].capture.warnings)
    assert gm(x).shape == (3, 6)
    with pytest.raises(orthofx.ArgumentError, match="batch size 3 only"):
        gm(torch.randn(4, 6))  # returned 3 rows of a batch of 4
    for suffix in (".onnx", ".pt2"):
        with pytest.raises(orthofx.ExportError, match="dynamic_batch=False"):
            orthofx.export(gm, tmp_path / f"l{suffix}", example_inputs=(x,))
        assert orthofx.export(gm, tmp_path / f"l{suffix}", example_inputs=(x,), dynamic_batch=False).max_abs_diff \
            < 1e-5


def test_convnorm_model_loaded_from_pt_freezes_and_exports(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    gm, x = _small("convnorm")
    orthofx.export(gm, tmp_path / "c.pt")
    model = orthofx.models.get("small_cnn")
    loaded = orthofx.load(model, tmp_path / "c.pt").eval()
    with pytest.raises(orthofx.LayerArgumentError, match="no precomputed ConvNorm filter"):
        orthofx.freeze(loaded)(x)  # never ran: no size known
    frozen = orthofx.freeze(loaded, example_inputs=(x,))
    torch.testing.assert_close(frozen(x), gm.eval()(x), rtol=0, atol=1e-6)
    assert loaded.get_submodule("conv1").input_sizes == []  # the copy ran, not the model
    assert orthofx.export(loaded, tmp_path / "c.onnx", example_inputs=(x,)).max_abs_diff < 1e-4


def test_opset_and_path_errors(tmp_path):
    pytest.importorskip("onnx")  # the opset check reads the installed onnx's newest opset
    gm, x = _small()
    for opset, message in (("20", "must be an int"), (99, "newer than the installed onnx")):
        with pytest.raises(orthofx.ExportError, match=message):
            orthofx.export(gm, tmp_path / "m.onnx", example_inputs=(x,), opset=opset)
    for suffix in (".pt", ".pt2", ".onnx"):
        directory = tmp_path / f"d{suffix}"
        directory.mkdir()
        with pytest.raises(orthofx.ExportError, match="existing directory"):
            orthofx.export(gm, directory, example_inputs=(x,))


def test_load_errors_say_how_to_fix(tmp_path):
    gm, x = _small()
    model = orthofx.models.get("small_cnn")
    torch.save(model, tmp_path / "pickled.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    for name in ("pickled.pt", "text.pt"):
        with pytest.raises(orthofx.ExportError, match=r"orthofx.export\(gm, 'model.pt'\)") as info:
            orthofx.load(model, tmp_path / name)
        assert "\x1b[" not in str(info.value)
    orthofx.export(gm, tmp_path / "s.pt")
    with pytest.raises(orthofx.ExportError, match="does not apply to this model.*original"):
        orthofx.load(nn.Sequential(nn.Flatten(), nn.ReLU()), tmp_path / "s.pt")
    with pytest.raises(orthofx.ExportError, match="no such file"):
        orthofx.load(model, tmp_path / "missing.pt")


# ------------------------------------------------------------------------ models written with orthofx layers


class _ShapeBranch(nn.Module):
    """A model symbolic tracing cannot capture (a Python branch on a shape), holding orthofx layers."""

    def __init__(self):
        super().__init__()
        from orthofx.nn import ConvNormConv2d, OrthogonalConv2d
        self.conv = OrthogonalConv2d(3, 6, 3, stride=2)
        self.norm = ConvNormConv2d(nn.Conv2d(6, 6, 3, padding=1))

    def forward(self, x):
        y = self.conv(x)
        if y.shape[-1] > 2:
            y = self.norm(y)
        return y.relu()


def _written_with_orthofx_layers() -> nn.Module:
    from orthofx.nn import ConvNormConv2d, OrthogonalConv2d, OrthogonalLinear
    return nn.Sequential(OrthogonalConv2d(3, 8, 3, stride=2), nn.ReLU(),
                         ConvNormConv2d(nn.Conv2d(8, 8, 3, padding=1)),
                         OrthogonalConv2d(8, 8, 3, method="cayley_fft", input_size=4), nn.Flatten(),
                         OrthogonalLinear(8 * 4 * 4, 10))


@pytest.mark.parametrize("make", [_written_with_orthofx_layers, _ShapeBranch], ids=["fx", "export-capture"])
def test_freeze_a_model_written_with_orthofx_layers(make, tmp_path):
    """Not returned by transform, but holding orthofx layers: freeze bakes them into plain layers (outputs of the
    model itself in eval mode), leaves the model untouched, and .pt2 export works; .pt (a policy to replay) is
    refused with the way out."""
    torch.manual_seed(0)
    model = make()
    x = torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = orthofx.freeze(model, example_inputs=(x,))
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    kinds = {type(m).__name__ for m in frozen.modules()}
    assert not kinds & {"OrthogonalConv2d", "OrthogonalLinear", "ConvNormConv2d"}, kinds
    with torch.no_grad():
        reference = model.eval()(x)
        torch.testing.assert_close(frozen(x), reference, atol=1e-5, rtol=1e-5)
    assert orthofx.export(model, tmp_path / "written.pt2", example_inputs=(x,)).max_abs_diff <= 1e-5
    with pytest.raises(orthofx.ExportError, match="torch.save"):
        orthofx.export(model, tmp_path / "written.pt")


def test_freeze_of_a_plain_model_says_there_is_nothing_to_freeze():
    with pytest.raises(orthofx.OrthofxError, match="holds no orthofx layer"):
        orthofx.freeze(nn.Sequential(nn.Linear(3, 3)))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("preset", ["lorth", "orthogonal", "convnorm"])
def test_frozen_models_trace_with_torch_jit(preset):
    """README, Known limits: torch.jit.trace of a frozen model reproduces it at the traced shape (TorchScript is
    not an export target), also with orthogonal transposed convs."""
    from orthofx.nn import OrthogonalConvTranspose2d
    if preset == "orthogonal":
        torch.manual_seed(0)
        model = nn.Sequential(_written_with_orthofx_layers()[:3], OrthogonalConvTranspose2d(8, 4, 4, stride=2,
                                                                                             padding=1))
        x = torch.randn(2, 3, 8, 8)
        frozen = orthofx.freeze(model, example_inputs=(x,))
    else:
        gm, x = _small(preset)
        frozen = orthofx.freeze(gm)
    with torch.no_grad():
        traced = torch.jit.trace(frozen, (x,))
        torch.testing.assert_close(traced(x), frozen(x), atol=1e-6, rtol=1e-6)
        other = torch.randn_like(x)  # a traced graph is not specialised to the example's values
        torch.testing.assert_close(traced(other), frozen(other), atol=1e-6, rtol=1e-6)


def test_onnxruntime_failures_are_export_errors(tmp_path, monkeypatch):
    """A file that passes the ONNX checker but that onnxruntime cannot load or run (an op its CPU provider lacks)
    is an ExportError pointing to .pt2, not onnxruntime's own exception."""
    onnxruntime = pytest.importorskip("onnxruntime")
    gm, x = _small()

    class MissingKernel(Exception):
        pass

    def refuse(*args, **kwargs):
        raise MissingKernel("Could not find an implementation for ConvTranspose(11) node")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    with pytest.raises(orthofx.ExportError, match=r"onnxruntime could not load .*MissingKernel.*\.pt2"):
        orthofx.export(gm, tmp_path / "m.onnx", example_inputs=(x,))
    monkeypatch.undo()

    real = onnxruntime.InferenceSession

    class FailingRun:
        def __init__(self, *args, **kwargs):
            self._session = real(*args, **kwargs)

        def get_inputs(self):
            return self._session.get_inputs()

        def run(self, *args, **kwargs):
            raise MissingKernel("kernel not implemented")

    monkeypatch.setattr(onnxruntime, "InferenceSession", FailingRun)
    with pytest.raises(orthofx.ExportError, match=r"onnxruntime could not run"):
        orthofx.export(gm, tmp_path / "m2.onnx", example_inputs=(x,))


class _StarArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, *xs):
        return self.fc(xs[0]) + xs[1]


class _NestedInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, batch):
        return self.fc(batch["x"]) + batch["y"]


@pytest.mark.parametrize("mode", ["fx", "export"])
@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_export_of_a_star_args_forward_keeps_a_dynamic_batch(tmp_path, mode, suffix):
    # the batch marks were one per input, but torch.export matches them to the forward's parameters, where *xs is
    # one: "Node arity mismatch; expected 1, but got 2"
    if suffix == ".onnx":
        pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    gm = orthofx.transform(_StarArgs(), {"capture": {"mode": mode}, "rules": [
        {"match": {"type": "Linear"}, "apply": "orth_regularizer"}]}, example_inputs=(x, y))
    result = orthofx.export(gm, tmp_path / f"star{suffix}", example_inputs=(x, y))
    assert result.max_abs_diff < 1e-5
    if suffix == ".pt2":
        program = torch.export.load(str(tmp_path / "star.pt2")).module()
        x5, y5 = torch.randn(5, 4), torch.randn(5, 4)
        torch.testing.assert_close(program(x5, y5), gm.fc(x5) + y5)


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_pt2_export_of_a_nested_input_keeps_a_dynamic_batch(tmp_path, mode):
    # a dict input got no batch mark ("Node type mismatch; expected dict, but got NoneType")
    torch.manual_seed(0)
    batch = {"x": torch.randn(3, 4), "y": torch.randn(3, 4)}
    gm = orthofx.transform(_NestedInput(), {"capture": {"mode": mode}, "rules": [
        {"match": {"type": "Linear"}, "apply": "orth_regularizer"}]}, example_inputs=(batch,))
    assert orthofx.export(gm, tmp_path / "nested.pt2", example_inputs=(batch,)).max_abs_diff < 1e-5
    program = torch.export.load(str(tmp_path / "nested.pt2")).module()
    other = {"x": torch.randn(5, 4), "y": torch.randn(5, 4)}
    torch.testing.assert_close(program(other), gm.fc(other["x"]) + other["y"])
