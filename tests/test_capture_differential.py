"""Differential tests of the two capture modes: ``capture: {mode: fx}`` against ``capture: {mode: export}``.

For a model both modes can capture, the two graphs differ in form only (ATen ops against torch calls), so the
transformed models must be the same: the plan (sites, rules, replaced layers, module names), eval outputs, the
penalty and its gradients (matched by parameter name), the report's rows, the parameters after training steps
(loss + penalty, SGD with momentum, ``orthofx.attach`` for the presets with optimizer hooks) and the frozen
model (outputs and ``state_dict`` keys). Each preset runs on models it applies to: built-in models at small
widths and corpus entries that symbolic tracing handles.

Where the modes differ by nature, the difference is asserted as documented behaviour (last section):
- torch.export records the device of tensors made in the forward (``torch.eye(n, device=x.device)``) as a
  constant and says so in a capture warning; symbolic tracing keeps the call.
- A submodule that symbolic tracing cannot follow (``torch.rand(x.shape[0], ...)``) is kept as a leaf in fx mode,
  while export traces through it: the same sites, a different ``leaf_fallbacks`` list.
- A branch on a tensor's value: fx keeps the submodule as a leaf; export cannot capture it (``CaptureError``
  naming the submodule and pointing to fx / auto mode).
- ``z += y`` on a traced value is recorded by symbolic tracing as the out-of-place ``z + y`` (an fx Proxy has no
  in-place add), so the fx graph of a model that modifies a saved activation in place trains where the model
  itself raises autograd's in-place error; the export graph keeps the in-place op and behaves as the model.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

import orthofx
from orthofx import models
from orthofx.errors import CaptureError
from orthofx.transform import output_tensors

from corpus import CORPUS


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)

# Built-in models at small widths, with small inputs: (constructor arguments, per-sample input shape).
BUILTIN = {
    "resnet18": (dict(width=2), (3, 16, 16)),
    "resnet50": (dict(width=2), (3, 16, 16)),
    "vgg11": (dict(width=2), (3, 32, 32)),
    "small_cnn": (dict(width=4), (1, 8, 8)),
    "dbn_cnn": (dict(width=4), (1, 8, 8)),
    "gcp_cnn": (dict(width=4, dim=4), (1, 8, 8)),
    "deep_mlp": (dict(depth=4, width=8), (64,)),
    "deep_cnn": (dict(depth=4, width=4), (3, 8, 8)),
    "deep_linear": (dict(depth=3, width=8, in_features=8, out_features=8), (8,)),
}

# What each preset needs in a model (the others reject the model with a PlanError: no site).
_HAS_CONV2D = {"resnet18", "resnet50", "vgg11", "small_cnn", "dbn_cnn", "gcp_cnn", "deep_cnn", "depthwise",
               "grouped", "dilated", "transposed", "rectangular", "impossible_layer", "shared", "inplace",
               "dict_output", "tuple_output", "nested", "batchnorm_resnet", "cov_pool", "unet", "convnext",
               "mobilenet_v2", "se_resnet", "efficientnet", "vit", "std_conv"}
_HAS_DECOMPOSITION = {"dbn_cnn", "gcp_cnn", "cov_pool", "spectrum"}
# Corpus entries symbolic tracing cannot capture at the top level, or export cannot capture at all.
_NOT_BOTH = {"shape_branch", "patch_tokens", "group_loop", "data_dependent"}


def _build(name):
    """A fresh ``(model, inputs)``: built-in models with fixed seeds, corpus entries from their factories."""
    if name in BUILTIN:
        kwargs, shape = BUILTIN[name]
        torch.manual_seed(0)
        model = models.get(name, **kwargs)
        return model, (torch.randn((2,) + shape, generator=torch.Generator().manual_seed(1)),)
    return CORPUS[name]()


def _policy(preset, mode):
    policy = orthofx.Policy.load(preset)
    return dataclasses.replace(policy, capture=dataclasses.replace(policy.capture, mode=mode))


def _transform(model, inputs, preset, mode):
    torch.manual_seed(123)  # isometric_init draws its orthogonal matrices from the global generator
    return orthofx.transform(model, _policy(preset, mode), example_inputs=inputs)


def _eval(module, inputs):
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            return output_tensors(module(*inputs))
    finally:
        module.train(was)


def _assert_close(fx_values, export_values, tol, what):
    assert len(fx_values) == len(export_values), what
    for a, b in zip(fx_values, export_values):
        torch.testing.assert_close(b, a, atol=tol, rtol=tol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _assert_same_rows(fx_rows, export_rows, what):
    assert [r.get("site") for r in export_rows] == [r.get("site") for r in fx_rows], what
    for a, b in zip(fx_rows, export_rows):
        assert set(a) == set(b), (what, a["site"])
        for key in a:
            if isinstance(a[key], float) and isinstance(b[key], float):
                assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-6), (what, a["site"], key)
            else:
                assert a[key] == b[key], (what, a["site"], key)


def _trains(model, inputs) -> bool:
    """Whether the model itself can backpropagate a loss in training mode (the corpus' in-place model cannot)."""
    model = copy.deepcopy(model).train()
    try:
        sum(o.float().pow(2).mean() for o in output_tensors(model(*inputs)) if o.is_floating_point()).backward()
    except RuntimeError:
        return False
    return True


def _train(gm, inputs, steps=2):
    gm.train()
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.01, momentum=0.9)
    handle = orthofx.attach(optimizer, gm)
    losses = []
    for step in range(steps):
        torch.manual_seed(7 + step)  # dropout, stochastic depth and Jacobian probes draw the same numbers
        outputs = output_tensors(gm(*inputs))
        loss = sum(o.float().pow(2).mean() for o in outputs if o.is_floating_point()) + orthofx.penalty(gm)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    handle.remove()
    return losses


def assert_same_transformation(name, preset, *, explain=True, expect_warnings=None, train=True):
    """Transform ``name`` with ``preset`` in both capture modes and compare everything the user sees.

    ``expect_warnings``: the capture warnings export mode adds (fx mode has none of them); None: the same."""
    model, inputs = _build(name)
    fx = _transform(model, inputs, preset, "fx")
    ex = _transform(model, inputs, preset, "export")
    mf, me = orthofx.manifest_of(fx), orthofx.manifest_of(ex)
    assert (mf.capture.mode, me.capture.mode) == ("fx", "export")

    # plan / explain: same sites, rules, replaced layers and module names
    assert me.plan.rows() == mf.plan.rows()
    assert str(me.plan).splitlines()[-1] == str(mf.plan).splitlines()[-1]
    assert me.plan.unmatched_optional == mf.plan.unmatched_optional
    if explain:
        plans = {mode: orthofx.explain(model, _policy(preset, mode), example_inputs=inputs)
                 for mode in ("fx", "export")}
        assert plans["export"].rows() == plans["fx"].rows() == mf.plan.rows()
    assert [(c.site, c.rule, c.pass_name) for c in me.changes] == [(c.site, c.rule, c.pass_name) for c in mf.changes]
    assert [n for n, _ in ex.named_modules()] == [n for n, _ in fx.named_modules()]
    assert list(ex.state_dict()) == list(fx.state_dict())
    if expect_warnings is None:
        assert me.capture.warnings == mf.capture.warnings
    else:
        assert mf.capture.warnings == []
        assert len(me.capture.warnings) == len(expect_warnings)
        for warning, fragment in zip(me.capture.warnings, expect_warnings):
            assert fragment in warning

    # the transformed weights and the eval outputs
    _assert_close(list(fx.state_dict().values()), list(ex.state_dict().values()), 0, "state after transform")
    _assert_close(_eval(fx, inputs), _eval(ex, inputs), 1e-6, "eval outputs")

    # the penalty and its gradients, matched by parameter name
    torch.manual_seed(5)
    p_fx = orthofx.penalty(fx)
    torch.manual_seed(5)
    p_ex = orthofx.penalty(ex)
    assert [t.site for t in me.penalties] == [t.site for t in mf.penalties]
    torch.testing.assert_close(p_ex.detach(), p_fx.detach(), atol=1e-6, rtol=1e-6)
    if p_fx.requires_grad:
        names = [n for n, _ in fx.named_parameters()]
        assert [n for n, _ in ex.named_parameters()] == names
        g_fx = torch.autograd.grad(p_fx, list(fx.parameters()), allow_unused=True)
        g_ex = torch.autograd.grad(p_ex, list(ex.parameters()), allow_unused=True)
        for name_, a, b in zip(names, g_fx, g_ex):
            assert (a is None) == (b is None), name_
            if a is not None:
                torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=lambda m: f"grad {name_}: {m}")

    # the report
    rf, re_ = orthofx.report(fx), orthofx.report(ex)
    _assert_same_rows(rf.rows, re_.rows, "report rows")
    _assert_same_rows(rf.penalties, re_.penalties, "report penalties")

    # training steps (with the optimizer hooks of the preset)
    if train and _trains(model, inputs):
        losses = {mode: _train(gm, inputs) for mode, gm in (("fx", fx), ("export", ex))}
        assert all(math.isfinite(v) for v in losses["fx"]), losses
        assert losses["export"] == pytest.approx(losses["fx"], rel=1e-5, abs=1e-6)
        assert list(ex.state_dict()) == list(fx.state_dict())
        _assert_close(list(fx.state_dict().values()), list(ex.state_dict().values()), 1e-5, "state after training")
    reference = _eval(fx, inputs)
    _assert_close(reference, _eval(ex, inputs), 1e-5, "eval outputs after training")

    # freeze
    ff, fe = orthofx.freeze(fx), orthofx.freeze(ex)
    assert list(fe.state_dict()) == list(ff.state_dict())
    _assert_close(_eval(ff, inputs), _eval(fe, inputs), 1e-5, "frozen outputs")
    _assert_close(reference, _eval(fe, inputs), 1e-5, "frozen against unfrozen")
    return fx, ex


# ------------------------------------------------------------------------------------------ fast cases

FAST = [
    ("small_cnn", "lorth"),
    ("small_cnn", "orthogonal"),
    ("small_cnn", "convnorm"),
    ("deep_linear", "isometric"),  # Riemannian hooks on square Linears (orthofx.attach)
    ("deep_mlp", "jacobian"),
    ("dbn_cnn", "svd"),  # train and eval graphs; freeze folds the running whitening matrix
    ("nested", "jacobian"),  # a block leaf the forward never calls (it indexes into it)
    ("shared", "orthogonal"),  # modules called twice
    ("tuple_output", "lorth"),
    ("train_eval_branch", "isometric"),
]


@pytest.mark.parametrize("name,preset", FAST, ids=[f"{n}-{p}" for n, p in FAST])
def test_fx_and_export_capture_transform_alike(name, preset):
    assert_same_transformation(name, preset)


# ------------------------------------------------------------------------------------------ the grid (slow)

def _grid():
    """Every built-in model (but resnet50, the slowest) and every corpus entry both modes capture, each with one
    preset, the presets taken in turn among those that apply to the model (every preset gets several models)."""
    presets = ("lorth", "orthogonal", "convnorm", "isometric", "jacobian", "svd")
    cases = []
    names = [n for n in BUILTIN if n != "resnet50"] + [n for n in CORPUS if n not in _NOT_BOTH]
    for i, name in enumerate(n for n in names if n not in ("efficientnet", "cov_pool")):  # tests below
        usable = [p for p in presets if (p != "convnorm" or name in _HAS_CONV2D)
                  and (p != "svd" or name in _HAS_DECOMPOSITION)]
        usable = [p for p in usable if (name, p) not in FAST] or usable
        preset = "svd" if "svd" in usable and (name, "svd") not in FAST else usable[i % len(usable)]
        cases.append((name, preset))
    return cases


GRID = _grid()


@pytest.mark.slow
@pytest.mark.parametrize("name,preset", GRID, ids=[f"{n}-{p}" for n, p in GRID])
def test_fx_and_export_capture_transform_alike_grid(name, preset):
    assert_same_transformation(name, preset, explain=False)


# ------------------------------------------------------------------------------------------ regressions

@pytest.mark.filterwarnings("ignore:.*no optimizer was attached to this model")  # trained without attach on purpose
def test_export_capture_keeps_the_layers_of_an_uncalled_block_leaf():
    """The jacobian preset makes every top-level Sequential a block leaf; ``nested`` never calls its ``stages``
    (it iterates over ``stages[0]``). fx mode then traces the layers inside; export mode used to take only
    outermost leaves, so the layers under ``stages`` became inlined ATen ops (no conv site, BatchNorm's
    ``num_batches_tracked`` dropped from the frozen model)."""
    model, inputs = _build("nested")
    gm = _transform(model, inputs, "jacobian", "export")
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert called[:6] == ["stages.0.0.conv", "stages.0.0.post.0", "stages.0.0.post.1", "stages.0.1.conv",
                          "stages.0.1.post.0", "stages.0.1.post.1"]
    assert [row["site"] for row in orthofx.report(gm).rows] == ["stages.0.0.conv", "stages.0.1.conv", "heads.a",
                                                                  "heads.b.0"]
    assert "stages.0.0.post.0.num_batches_tracked" in orthofx.freeze(gm).state_dict()


def test_export_capture_freezes_decorrelated_batchnorm_like_fx():
    """DBN casts its running covariance with ``running_cov.type_as(x)``; export recorded ``aten.type_as``, which
    freeze's constant folding did not take for a cast, so the frozen export-captured model kept the eigh. Now
    both frozen models store the whitening matrix and have no decomposition left."""
    model, inputs = _build("dbn_cnn")
    for mode in ("fx", "export"):
        frozen = orthofx.freeze(_transform(model, inputs, "lorth", mode))
        assert "orthofx_folded_0" in frozen.state_dict(), mode
        assert list(frozen.meta["orthofx_folded"]) == ["dbn:linalg.eigh"], mode
        assert not [n for n in frozen.graph.nodes if n.op == "call_function" and "eigh" in str(n.target)], mode


# ------------------------------------------------------------------------------------------ inherent differences

_DEVICE_WARNING = "tensors created in the forward (eye) are made on cpu"


@pytest.mark.parametrize("preset", ["svd", "lorth"])
def test_tensors_made_in_the_forward_get_a_device_warning_in_export_mode_only(preset):
    """cov_pool builds ``torch.eye(c, device=x.device)``: export fixes the device (warning); otherwise alike."""
    assert_same_transformation("cov_pool", preset, explain=False, expect_warnings=[_DEVICE_WARNING])


@pytest.mark.slow
def test_untraceable_submodules_are_fx_leaves_and_traced_through_by_export():
    """efficientnet's stochastic depth (``torch.rand(x.shape[0], ...)``) cannot be traced symbolically: fx keeps
    those blocks as leaves, export traces them; the sites, outputs, training (same random numbers) and the
    frozen models are the same."""
    fx, ex = assert_same_transformation("efficientnet", "lorth", explain=False,
                                        expect_warnings=["submodule 'blocks.0'", "submodule 'blocks.2'"])
    assert [path for path, _ in orthofx.manifest_of(fx).capture.leaf_fallbacks] == ["blocks.0", "blocks.2"]
    assert orthofx.manifest_of(ex).capture.leaf_fallbacks == []


def test_branch_on_a_tensor_value_in_a_submodule_is_fx_only():
    model, inputs = _build("data_dependent")
    gm = _transform(model, inputs, "lorth", "fx")
    assert [path for path, _ in orthofx.manifest_of(gm).capture.leaf_fallbacks] == ["gate"]
    with pytest.raises(CaptureError, match=r"submodule 'gate'.*capture mode fx or auto"):
        _transform(model, inputs, "lorth", "export")


def test_inplace_add_on_a_traced_value_is_out_of_place_in_fx_mode_only():
    """``z += y`` where ``z`` is the output of an in-place ReLU: the model itself cannot backpropagate (autograd's
    in-place check); the export graph keeps ``add_`` and raises the same error; fx records ``z + y`` and trains.
    Eval outputs are the same."""
    model, inputs = _build("inplace")
    assert not _trains(model, inputs)
    fx = _transform(model, inputs, "lorth", "fx")
    ex = _transform(model, inputs, "lorth", "export")
    _assert_close(_eval(fx, inputs), _eval(ex, inputs), 1e-6, "eval outputs")
    assert _trains(fx, inputs)
    assert "aten.add_.Tensor" in ex.code
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _train(ex, inputs, steps=1)
