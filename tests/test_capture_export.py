"""Capture mode ``export`` (torch.export) and mode ``auto``'s fallback to it.

The models here cannot be traced symbolically at the top level (a Python branch on a shape, ``int()`` of a size,
a Python loop over ``x.size(...)``, ``torch.cond``), so ``orthofx.transform`` captures them with torch.export and
rebuilds a GraphModule of fx mode's form: leaf layers are ``call_module`` nodes at their qualified names, so
sites, rules, passes, the penalty, the report, freeze and ``.pt2`` export work unchanged.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthofx
from orthofx.capture import capture
from orthofx.errors import CaptureError
from orthofx.plan import collect_sites

from corpus import eval_outputs
from references import bitwise_equal, state_copy


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


# ------------------------------------------------------------------------------------------------ test models

class ShapeBranch(nn.Module):
    """Pools only inputs wider than 6 pixels: ``if x.shape[-1] > 6`` is Python control flow on a shape."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1))
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.features(x)
        if x.shape[-1] > 6:
            x = F.avg_pool2d(x, 2)
        x = torch.relu(self.conv(x))
        return self.fc(x.mean((2, 3)))


class PatchTokens(nn.Module):
    """Tokens (B, N, C) -> Linear -> image of side ``int(N ** 0.5)`` (``int()`` of a traced size fails under fx)
    -> conv -> head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.features = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        b, n, _ = tokens.shape
        side = int(n ** 0.5)
        x = self.embed(tokens).transpose(1, 2).reshape(b, -1, side, side)
        return self.head(self.features(x).mean((2, 3)))


class GroupLoop(nn.Module):
    """A Python loop over ``x.size(1) // 4`` channel groups, each through the same conv (a module called
    several times), then concatenated."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.group_conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.features(x)
        groups = [self.group_conv(x[:, 4 * g:4 * g + 4]) for g in range(x.size(1) // 4)]
        return self.fc(torch.cat(groups, 1).mean((2, 3)))


class BatchLoop(nn.Module):
    """Normalises each sample in a Python loop over ``x.size(0)``: torch.export must fix the batch size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv(x)
        rows = [x[i:i + 1] / (x[i:i + 1].std() + 1) for i in range(x.size(0))]
        return self.fc(torch.cat(rows).mean((2, 3)))


class CondNet(nn.Module):
    """A data-dependent branch written with ``torch.cond`` (export keeps both branches; fx cannot trace it)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv(x)
        y = torch.cond(y.mean() > 0, lambda t: t * 2.0, lambda t: t.abs(), (y,))
        return self.fc(y.mean((2, 3)))


class CovPool(nn.Module):
    """Covariance pooling with a shape branch: 1x1 reduction conv (the Pre-SVD layer) -> covariance -> eigh ->
    matrix square root ``V diag(sqrt(L)) V^T`` -> Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.reduce = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(36, 3)

    def forward(self, x):
        x = self.reduce(torch.relu(self.stem(x)))
        if x.shape[-1] > 6:
            x = F.avg_pool2d(x, 2)
        f = x.flatten(2)
        f = f - f.mean(-1, keepdim=True)
        cov = f @ f.mT / f.size(-1) + 1e-3 * torch.eye(6)
        values, vectors = torch.linalg.eigh(cov)
        root = vectors @ torch.diag_embed(values.clamp(min=1e-6).sqrt()) @ vectors.mT
        return self.fc(root.flatten(1))


class Residual(nn.Module):
    """fx-traceable: conv-BN stem, a residual block whose BatchNorm is called twice, an Identity, a Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.skip = nn.Identity()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        y = torch.relu(self.bn(self.conv(x)))
        y = self.bn(self.conv(y)) + self.skip(x)
        return self.fc(y.mean((2, 3)))


class ValueBranch(nn.Module):
    """``if y.sum() > 0`` on a tensor's value: neither fx nor torch.export can capture it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        if y.sum() > 0:
            return y
        return -y


def _input(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


MODELS = {
    "shape_branch": (ShapeBranch, (2, 3, 8, 8)),
    "patch_tokens": (PatchTokens, (2, 16, 6)),
    "group_loop": (GroupLoop, (2, 3, 6, 6)),
}
PRESETS = ("lorth", "orthogonal", "convnorm", "jacobian", "isometric")
#: Presets whose passes leave the forward as it is (regularisers and probes).
PRESERVING = ("lorth", "jacobian")
#: .pt2 export on one model per preset (rotated), to keep the file fast.
PT2 = {("lorth", "group_loop"), ("orthogonal", "shape_branch"), ("convnorm", "patch_tokens"),
       ("jacobian", "shape_branch"), ("isometric", "group_loop")}


def _build(name):
    cls, shape = MODELS[name]
    torch.manual_seed(0)
    return cls(), (_input(*shape),)


def _transform(model, policy, inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return orthofx.transform(model, policy, example_inputs=inputs)


def _conv_names(model):
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


# ------------------------------------------------------------------------------------------------ the presets

@pytest.mark.parametrize("name", list(MODELS))
def test_models_are_not_fx_traceable(name):
    model, _ = _build(name)
    with pytest.raises(CaptureError) as err:
        capture(model, mode="fx")
    assert err.value.module_path == ""  # the top level itself: no leaf fallback can help


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", list(MODELS))
def test_presets_on_untraceable_models(preset, name, tmp_path):
    model, inputs = _build(name)
    before = state_copy(model)
    expected = eval_outputs(model, inputs)
    gm = _transform(model, preset, inputs)

    # the user's model is untouched (weights, buffers, training flags)
    assert bitwise_equal(state_copy(model), before)
    assert all(m.training for m in model.modules())

    manifest = orthofx.manifest_of(gm)
    assert manifest.capture.mode == "export"
    assert "top-level forward" in manifest.capture.fx_error
    # every leaf layer is a call_module node at its qualified name; no stray placeholders for parameters
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == len(inputs)
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    if preset != "jacobian":  # the jacobian preset keeps each top-level Sequential as one block
        assert set(_conv_names(model)) <= called

    got = eval_outputs(gm, inputs)
    assert got.shape == expected.shape and torch.isfinite(got).all()
    if preset in PRESERVING:
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    else:
        assert manifest.changes, f"{preset} changed nothing"

    # a training step: the penalty has gradients to the layers' parameters
    gm.train()
    output = gm(*inputs)  # the Jacobian probes measure during the forward
    penalty = orthofx.penalty(gm)
    loss = output.square().mean() + penalty
    loss.backward()
    grads = {n: p.grad for n, p in gm.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None]
    if preset in ("lorth", "jacobian"):
        assert penalty.item() > 0
        gm.zero_grad()
        gm(*inputs)
        orthofx.penalty(gm).backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gm.parameters())
    gm.eval()

    # the report has a row for every conv, and says how the model was captured
    report = orthofx.report(gm)
    sites = {row["site"] for row in report.rows}
    assert set(_conv_names(model)) <= sites
    assert str(report).startswith("capture: export (auto: symbolic tracing failed")

    # freeze gives the same eval outputs; .pt2 export reloads and matches
    frozen = orthofx.freeze(gm)
    torch.testing.assert_close(eval_outputs(frozen, inputs), eval_outputs(gm, inputs), atol=1e-5, rtol=0)
    if (preset, name) in PT2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = orthofx.export(gm, tmp_path / "m.pt2", example_inputs=inputs)
        assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-5


def test_svd_preset_on_covariance_pooling():
    torch.manual_seed(0)
    model = CovPool()
    x = _input(2, 3, 8, 8)
    expected = eval_outputs(model, (x,))
    gm = _transform(model, "svd", (x,))
    manifest = orthofx.manifest_of(gm)
    assert manifest.capture.mode == "export"
    # torch.eye(6) in the forward: export fixes its device, and capture says so
    assert any("(eye)" in w and "cpu" in w for w in manifest.capture.warnings)
    by_pass = {}
    for change in manifest.changes:
        by_pass.setdefault(change.pass_name, []).append(change)
    # the eigh is a function site named as under fx, rewritten to the stable op with a monitor
    (stable,) = by_pass["svd_conditioning"]
    assert stable.site == "linalg.eigh" and stable.status.startswith("stable eigh")
    assert "monitor" in stable.after
    # the conv feeding the eigh (through relu-free reshapes, centring and matmuls) is the Pre-SVD layer
    assert [c.site for c in by_pass["pre_svd"]] == ["reduce"]
    torch.testing.assert_close(eval_outputs(gm, (x,)), expected, atol=1e-5, rtol=1e-5)

    gm.train()
    loss = gm(x).square().mean() + orthofx.penalty(gm)
    loss.backward()
    assert gm.reduce.weight.grad is not None and torch.isfinite(gm.reduce.weight.grad).all()
    rows = {row["site"]: row for row in orthofx.report(gm).rows}
    assert rows["linalg.eigh"]["kappa"] > 1
    assert {"stem", "reduce"} <= set(rows)


def test_newton_schulz_replaces_the_exported_matrix_square_root():
    torch.manual_seed(0)
    model = CovPool()
    x = _input(2, 3, 8, 8)
    policy = {"rules": [{"match": {"op": "linalg.eigh"}, "apply": "svd_conditioning",
                         "with": {"method": "newton_schulz", "iterations": 30}}]}
    gm = _transform(model, policy, (x,))
    (change,) = orthofx.manifest_of(gm).changes
    assert change.status.startswith("newton_schulz (sqrt"), change.status
    assert not any(n.target in (torch.linalg.eigh, torch.ops.aten.linalg_eigh.default) for n in gm.graph.nodes)
    torch.testing.assert_close(eval_outputs(gm, (x,)), eval_outputs(model, (x,)), atol=1e-3, rtol=1e-3)


def test_op_rules_accept_aten_names():
    torch.manual_seed(0)
    policy = {"capture": {"mode": "export"},
              "rules": [{"match": {"op": "aten.linalg_eigh"}, "apply": "svd_conditioning"}]}
    plan = orthofx.explain(CovPool(), policy, example_inputs=(_input(2, 3, 8, 8),))
    assert [(e.site.name, e.site.target) for e in plan.entries] == [("linalg.eigh", "linalg.eigh")]
    assert str(plan).splitlines()[0] == "capture: export"


# ------------------------------------------------------------------------------------------ export vs fx

def test_export_mode_gives_fx_modes_plan_names_and_outputs():
    torch.manual_seed(0)
    model = Residual()
    x = _input(2, 3, 6, 6)
    fx_gm, fx_info = capture(model, mode="fx")
    ex_gm, ex_info = capture(model, mode="export", example_inputs=(x,))
    assert (fx_info.mode, ex_info.mode) == ("fx", "export")
    assert [n for n, _ in ex_gm.named_modules()] == [n for n, _ in fx_gm.named_modules()]
    assert list(ex_gm.state_dict()) == list(fx_gm.state_dict())
    assert [(s.kind, s.name, s.target) for s in collect_sites(ex_gm)] == \
        [(s.kind, s.name, s.target) for s in collect_sites(fx_gm)]
    torch.testing.assert_close(eval_outputs(ex_gm, (x,)), eval_outputs(fx_gm, (x,)), atol=0, rtol=0)

    rules = {"rules": [{"match": {"type": ["Conv2d", "Linear"], "exclude": ["fc"]}, "apply": "orth_regularizer"},
                       {"match": {"type": "BatchNorm2d"}, "apply": "orth_regularizer", "optional": True}]}
    for preset in ("lorth", "orthogonal", "convnorm", rules):
        policy = orthofx.Policy.load(preset)
        plans = {}
        for mode in ("fx", "export"):
            moded = dataclasses.replace(policy, capture=dataclasses.replace(policy.capture, mode=mode))
            plans[mode] = orthofx.explain(model, moded, example_inputs=(x,))
            assert plans[mode].capture.mode == mode
        assert plans["fx"].rows() == plans["export"].rows(), preset
        assert plans["fx"].entries, preset


def test_batchnorm_statistics_update_in_training():
    torch.manual_seed(0)
    model = Residual()
    x = _input(4, 3, 6, 6)
    reference = copy.deepcopy(model)
    gm, _ = capture(copy.deepcopy(model), mode="export", example_inputs=(x,))
    gm.train()
    for _ in range(2):
        torch.testing.assert_close(gm(x), reference(x))
    for name in ("bn", "stem.1"):
        ours, theirs = gm.get_submodule(name), reference.get_submodule(name)
        torch.testing.assert_close(ours.running_mean, theirs.running_mean)
        torch.testing.assert_close(ours.running_var, theirs.running_var)
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == (4 if name == "bn" else 2)


def test_batch_dimension_stays_dynamic():
    model, inputs = _build("shape_branch")
    gm, info = capture(model, mode="export", example_inputs=inputs)
    assert info.warnings == []
    for batch in (1, 5):
        x = _input(batch, 3, 8, 8, seed=batch)
        torch.testing.assert_close(gm(x), model(x))
    # the branch follows the traced shape: wider inputs than the example take the same path
    assert not any(n.op == "call_function" and "gt" in str(n.target) for n in gm.graph.nodes)


def test_loop_over_the_batch_fixes_the_batch_size_with_a_warning():
    torch.manual_seed(0)
    model = BatchLoop()
    x = _input(3, 3, 5, 5)
    gm = _transform(model, "lorth", (x,))
    warning = " ".join(orthofx.manifest_of(gm).capture.warnings)
    assert "batch size 3" in warning
    assert "batch size 3" in str(orthofx.report(gm))
    torch.testing.assert_close(eval_outputs(gm, (x,)), eval_outputs(model, (x,)))


def test_torch_cond_model():
    torch.manual_seed(0)
    model = CondNet()
    x = _input(2, 3, 5, 5)
    gm = _transform(model, "orthogonal", (x,))
    assert orthofx.manifest_of(gm).capture.mode == "export"
    for sign in (1.0, -1.0):  # both branches are in the graph
        out = eval_outputs(gm, (sign * x,))
        assert out.shape == (2, 2) and torch.isfinite(out).all()
    lorth = _transform(model, "lorth", (x,))
    for sign in (1.0, -1.0):
        torch.testing.assert_close(eval_outputs(lorth, (sign * x,)), eval_outputs(model, (sign * x,)))


# ------------------------------------------------------------------------------------ leaves and structure

class Sequence(nn.Module):
    """Leaves with several outputs (MultiheadAttention's pair, LSTM's nested tuple, one of them None), an
    in-place ReLU, a module called inside ``torch.no_grad()``, a dict output and a loop over a static size."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.act = nn.ReLU(inplace=True)
        self.frozen = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        a, _ = self.attn(x, x, x, need_weights=False)
        out, (h, c) = self.lstm(a)
        with torch.no_grad():
            hint = self.frozen(out)
        y = self.act(out) + hint
        for step in range(x.size(1)):
            y = y + 0.1 * step
        return {"logits": self.head(y.mean(1)), "state": (h, c)}


def test_multi_output_leaves_nested_graphs_and_dict_outputs():
    torch.manual_seed(0)
    model = Sequence()
    x = _input(2, 5, 8)
    gm = _transform(model, "lorth", (x,))
    info = orthofx.manifest_of(gm).capture
    assert info.mode == "export"
    called = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    # the Linear called under torch.no_grad() is a module call too (its grad-mode switches are kept around it)
    assert called == ["attn", "lstm", "frozen", "act", "head"]
    assert not any("no_grad" in w for w in info.warnings)
    expected, got = eval_outputs(model, (x,)), eval_outputs(gm, (x,))
    assert set(got) == {"logits", "state"}
    for e, g in zip(torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got)):
        torch.testing.assert_close(g, e)
    sites = {t.site for t in orthofx.manifest_of(gm).penalties}
    assert {"attn.out_proj", "frozen", "head"} <= sites


Pair = collections.namedtuple("Pair", "score features")


class DictIn(nn.Module):
    """A dict input and a namedtuple output (the rebuilt graph keeps export's pytree in/out handling)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(3, 4)

    def forward(self, batch):
        h = self.a(batch["x"]) + self.b(batch["y"])
        if h.shape[-1] > 2:
            h = h * 2
        return Pair(h.sum(-1), h)


def test_nested_inputs_and_namedtuple_outputs(tmp_path):
    torch.manual_seed(0)
    model = DictIn()
    batch = {"x": _input(2, 4), "y": _input(2, 3, seed=1)}
    gm = _transform(model, "lorth", (batch,))
    assert orthofx.manifest_of(gm).capture.mode == "export"
    other = {"x": _input(5, 4, seed=2), "y": _input(5, 3, seed=3)}  # another batch size
    for inputs in (batch, other):
        got, expected = gm(inputs), model(inputs)
        assert isinstance(got, Pair)
        torch.testing.assert_close(got.features, expected.features)
    assert {t.site for t in orthofx.manifest_of(gm).penalties} == {"a", "b"}
    torch.save(gm, tmp_path / "gm.pt")
    loaded = torch.load(tmp_path / "gm.pt", weights_only=False)
    torch.testing.assert_close(loaded(batch).score, gm(batch).score)


def test_transformed_export_model_pickles(tmp_path):
    model, inputs = _build("patch_tokens")
    gm = _transform(model, "lorth", inputs)
    torch.save(gm, tmp_path / "gm.pt")
    loaded = torch.load(tmp_path / "gm.pt", weights_only=False)
    torch.testing.assert_close(eval_outputs(loaded, inputs), eval_outputs(gm, inputs))
    assert orthofx.manifest_of(loaded).capture.mode == "export"
    assert orthofx.penalty(loaded).item() == pytest.approx(orthofx.penalty(gm).item())


class BufferArithmetic(nn.Module):
    """Arithmetic on a buffer alone (``scale * 2``), and an in-place update of it: unpickling re-traces the code of
    an export-captured graph, and fx's default tracer would run both once and keep constants."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("scale", torch.ones(3))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return self.lin(x) * (self.scale * 2)


def test_unpickled_export_graph_keeps_reading_its_buffers():
    model = BufferArithmetic()
    x = _input(2, 3)
    gm, info = capture(model, mode="export", example_inputs=(x,))
    loaded = pickle.loads(pickle.dumps(gm))
    with torch.no_grad():
        loaded.get_buffer("scale").fill_(3.0)
    torch.testing.assert_close(loaded(x), loaded.lin(x) * 6)
    assert loaded.get_buffer("calls").item() == 1  # updated by the call, not by unpickling


def test_policy_leaf_modules_apply_to_export_capture():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x))

    class Net(ShapeBranch):
        def __init__(self):
            super().__init__()
            self.conv = Block()

    torch.manual_seed(0)
    model = Net()
    x = _input(2, 3, 8, 8)
    policy = {"capture": {"leaf_modules": ["Block"]},
              "rules": [{"match": {"type": "Conv2d"}, "apply": "orth_regularizer"}]}
    gm = _transform(model, policy, (x,))
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    assert "conv" in called and "conv.conv" not in called
    assert {t.site for t in orthofx.manifest_of(gm).penalties} == {"features.0", "features.3", "conv.conv"}
    torch.testing.assert_close(eval_outputs(gm, (x,)), eval_outputs(model, (x,)))


# ---------------------------------------------------------------------------------------------------- errors

def test_export_mode_needs_example_inputs():
    with pytest.raises(CaptureError) as err:
        orthofx.explain(Residual(), {"capture": {"mode": "export"},
                                     "rules": [{"match": {"type": "Conv2d"}, "apply": "orth_regularizer"}]})
    assert "example_inputs" in str(err.value) and "'export'" in str(err.value)


def test_auto_without_example_inputs_says_to_pass_them():
    model, _ = _build("shape_branch")
    with pytest.raises(CaptureError) as err:
        orthofx.transform(model, "lorth")
    message = str(err.value)
    assert "top-level forward" in message and "x.shape[-1] > 6" in message
    assert "example_inputs=(x,)" in message and "torch.export" in message
    assert err.value.module_path == ""


def test_model_neither_capture_handles_names_both_failures():
    model = ValueBranch()
    before = state_copy(model)
    with pytest.raises(CaptureError) as err:
        orthofx.transform(model, "lorth", example_inputs=(_input(3, 4),))
    message = str(err.value)
    assert "symbolic tracing (fx) failed" in message and "torch.export failed too" in message
    assert message.count("y.sum() > 0") == 2  # the line of user code, for both
    assert "data-dependent" in message
    assert err.value.module_path == ""
    assert bitwise_equal(state_copy(model), before)


def test_export_failure_in_a_submodule_names_it():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = ValueBranch()

        def forward(self, x):
            return self.inner(x) * 2

    with pytest.raises(CaptureError) as err:
        capture(Outer(), mode="export", example_inputs=(_input(3, 4),))
    assert err.value.module_path == "inner"
    assert "submodule 'inner' (ValueBranch)" in str(err.value)


def test_concrete_args_are_refused_in_export_mode():
    with pytest.raises(CaptureError, match="concrete_args"):
        capture(Residual(), mode="export", example_inputs=(_input(2, 3, 6, 6),), concrete_args={"x": None})


def test_policy_accepts_export_mode():
    policy = orthofx.Policy.from_yaml("orthofx: 1\ncapture: {mode: export}\nrules:\n"
                                      "  - {match: {op: aten._linalg_eigh}, apply: svd_conditioning}\n")
    assert policy.capture.mode == "export"
    assert policy.rules[0].match.op == ("linalg.eigh",)
    assert orthofx.Policy.from_yaml(policy.to_yaml()) == policy


# ----------------------------------------------------------------------------------- what export fixes is checked

class PerStep(nn.Module):
    """A Python loop over the time steps ``x.size(1)``: export fixes T; the batch (dim 0) stays dynamic."""

    def __init__(self):
        super().__init__()
        self.step = nn.Linear(4, 4)

    def forward(self, x, mask, reduce: str = "sum", k: int = 2):
        y = torch.stack([self.step(x[:, t]) for t in range(x.shape[1])], 1) * k
        y = y * mask.sum(1)[None, :, None]  # mask (T, T): not batched, its dim 0 fixed to T too
        return y.sum(-1) if reduce == "sum" else y.mean(-1)


def test_export_guards_fixed_dimensions_and_non_tensor_inputs(tmp_path):
    model = PerStep()
    x, mask = _input(2, 5, 4), torch.tril(torch.ones(5, 5))
    gm, info = capture(model, mode="export", example_inputs=(x, mask, "mean", 3))
    assert not any("batch size" in w for w in info.warnings)  # the mask's fixed dim 0 is no batch
    assert any("reduce='mean'" in w and "k=3" in w for w in info.warnings)
    x3 = _input(3, 5, 4, seed=1)  # another batch: fine
    torch.testing.assert_close(gm(x3, mask, "mean", 3), model(x3, mask, "mean", 3))
    with pytest.raises(orthofx.ArgumentError, match=r"input 'x'.*\(\*, 5, 4\).*dimension 1 is 7, not 5"):
        gm(_input(2, 7, 4), mask, "mean", 3)  # computed 5 of the 7 steps
    with pytest.raises(orthofx.ArgumentError, match=r"input 'mask'.*\(5, 5\).*dimension 0 is 6"):
        gm(x, torch.ones(6, 6), "mean", 3)
    with pytest.raises(orthofx.ArgumentError, match=r"input 'reduce'.*reduce='mean' only.*got 'sum'.*mode: fx"):
        gm(x, mask, "sum", 3)  # ran the 'mean' branch
    with pytest.raises(orthofx.ArgumentError, match=r"input 'k'.*k=3 only.*got 5"):
        gm(x, mask, "mean", 5)
    clone = pickle.loads(pickle.dumps(gm))  # unpickling re-traces the code: the guards stay calls
    with pytest.raises(orthofx.ArgumentError, match="input 'k'"):
        clone(x, mask, "mean", 5)
    program = torch.export.export(gm, (x, mask, "mean", 3), strict=False)  # the guards stay exportable
    torch.testing.assert_close(program.module()(x, mask, "mean", 3), model(x, mask, "mean", 3))


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.small = nn.Linear(4, 4)
        self.large = nn.Linear(4, 4)
        self.enc = nn.Module()  # a namespace container (no forward of its own)
        self.enc.conv = nn.Conv2d(1, 1, 1)
        self.enc.fc = nn.Linear(4, 4)

    def forward(self, x):
        x = self.enc.fc(self.enc.conv(x[:, None])[:, 0])
        return self.small(x) if x.shape[-1] <= 4 else self.large(x)  # 'large' is never called here


def test_export_leaves_inside_plain_containers_and_uncalled_leaves():
    gm, info = capture(TwoLinears(), mode="export", example_inputs=(_input(3, 2, 4),))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["enc.conv", "enc.fc", "small"]
    assert info.warnings == []  # no "stays as inlined ATen ops" for the uncalled 'large', nor for 'enc'


class NoGradTarget(nn.Module):
    def __init__(self):
        super().__init__()
        self.online = nn.Linear(4, 4)
        self.target = nn.Linear(4, 4)

    def forward(self, x):
        with torch.no_grad():
            t = self.target(x)
        return self.online(x) - t


def test_no_grad_region_is_no_train_eval_difference():
    gm, info = capture(NoGradTarget(), mode="export", example_inputs=(_input(3, 4),))
    assert not isinstance(gm, orthofx.capture.ModalGraphModule) and info.mode_dependent == []


def test_export_mode_dependent_scopes_are_modules():
    model = orthofx.models.get("dbn_cnn", width=4)
    _, info = capture(model, mode="export", example_inputs=(orthofx.models.example_input("dbn_cnn", batch=4),))
    assert info.mode_dependent == ["dbn"]
