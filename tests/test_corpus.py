"""Every preset on every model of the corpus (tests/corpus.py): it works, or it fails clearly.

For each (preset, model) cell, ``orthofx.transform(model, preset, example_inputs=...)`` either

* works: the rewritten model's eval outputs have the model's structure (same pytree, same shapes) and are finite,
  a training-mode forward + ``orthofx.penalty`` backward gives finite gradients, the model itself is unchanged,
  ``orthofx.report`` renders, and ``orthofx.freeze`` reproduces the eval outputs within 1e-5; or
* fails with an ``orthofx.OrthofxError`` whose message names the site (a module path of the model), or, for a
  preset that has nothing to act on, a ``PlanError`` saying that a rule matched no site.

Presets that do not change the forward (``lorth``, ``jacobian``, ``svd``) must also keep the model's eval outputs.

Exports: ``.pt2`` for every model once by default (presets rotated, see ``PT2_DEFAULT``) and for the whole grid
under ``slow``; ONNX (onnxruntime parity) on a handful of cells by default and on the whole grid under ``slow``.
An export either works or raises ``orthofx.ExportError`` naming the site / op it could not handle.

Transforms are cached per cell (``_cell``), so the export tests reuse the grid's transformed models.
"""

from __future__ import annotations

import functools
import re
import warnings

import pytest
import torch

import orthofx
from corpus import CORPUS, eval_outputs

PRESETS = ("lorth", "orthogonal", "convnorm", "jacobian", "isometric", "svd")
MODELS = tuple(CORPUS)
#: Presets whose passes leave the forward computation as it is (regularisers, probes, stable decompositions).
FUNCTION_PRESERVING = ("lorth", "jacobian", "svd")
FREEZE_TOLERANCE = 1e-5
PT2_TOLERANCE = 1e-5

GRID = [(p, m) for p in PRESETS for m in MODELS]
IDS = [f"{p}-{m}" for p, m in GRID]

# ----------------------------------------------------------------------------------------- known outcomes

# Not a contract, but a record of which cells are expected to fail (the tests accept any clear OrthofxError):
# the presets whose only rule names a site kind the model does not have, and the one impossible layer.
# test_expected_failures_are_exactly_these keeps this table honest.
EXPECTED_FAILURES = {
    **{("convnorm", m): "matched no module site" for m in (
        "mha", "transformer", "sdpa_sequential", "conv1d", "functional_conv", "buffers", "spectrum", "recurrent",
        "data_dependent", "train_eval_branch")},
    **{("svd", m): "matched no function site" for m in MODELS if m not in ("cov_pool", "spectrum")},
}

@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors: one intra-op thread (tests/conftest.py); the cached cells are dropped with the module."""
    yield
    _cell.cache_clear()


# --------------------------------------------------------------------------------------------------- helpers

def _tensors(output) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]


def _spec(output):
    return torch.utils._pytree.tree_flatten(output)[1]


def _site_named(message: str, model: torch.nn.Module) -> bool:
    """Whether ``message`` names a module path of ``model`` (as a whole word) or says a rule matched no site."""
    if re.search(r"matched no (module|function|block) site", message):
        return True
    for name, _ in model.named_modules():
        if name and re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", message):
            return True
    return False


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Cell:
    """One (preset, model) transform: the model, its inputs, its eval outputs, and the GraphModule or error."""

    def __init__(self, preset: str, name: str):
        self.preset, self.name = preset, name
        self.model, self.inputs = CORPUS[name]()
        before = _state(self.model)
        self.gm = self.error = None
        try:
            self.gm = orthofx.transform(self.model, preset, example_inputs=self.inputs)
        except Exception as exc:  # noqa: BLE001 - judged by the tests
            self.error = exc
            return
        after = self.model.state_dict()
        self.model_unchanged = after.keys() == before.keys() and all(torch.equal(after[k], v)
                                                                     for k, v in before.items())
        # Eval outputs right after the transform, before any test trains the GraphModule.
        self.expected = eval_outputs(self.model, self.inputs)
        self.got = eval_outputs(self.gm, self.inputs)


@functools.lru_cache(maxsize=None)
def _cell(preset: str, name: str) -> Cell:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Cell(preset, name)


def _working(preset: str, name: str) -> Cell:
    cell = _cell(preset, name)
    if cell.error is not None:
        pytest.skip(f"{preset} fails on {name} (checked by test_preset_on_model): {cell.error}")
    return cell


# ------------------------------------------------------------------------------------------------ the grid

@pytest.mark.parametrize("preset,name", GRID, ids=IDS)
def test_preset_on_model(preset, name):
    cell = _cell(preset, name)
    model, inputs = cell.model, cell.inputs
    if cell.error is not None:
        error = cell.error
        assert isinstance(error, orthofx.OrthofxError), (
            f"{preset} on {name} raised {type(error).__name__} (not an orthofx.OrthofxError): {error}")
        assert _site_named(str(error), model), f"the error does not name a site of {name}: {error}"
        return

    gm = cell.gm
    assert isinstance(gm, torch.fx.GraphModule)
    assert cell.model_unchanged, "transform modified the user's model"

    # eval: same structure and shapes as the model's, finite
    expected, got = cell.expected, cell.got
    assert _spec(got) == _spec(expected)
    for e, g in zip(_tensors(expected), _tensors(got)):
        assert g.shape == e.shape and g.dtype == e.dtype
        assert torch.isfinite(g).all()

    # a training step: forward in training mode, task loss + penalty, backward; everything finite
    gm.train()
    outputs = _tensors(gm(*inputs))
    penalty = orthofx.penalty(gm)
    assert penalty.dim() == 0 and torch.isfinite(penalty)
    loss = sum(t.float().square().mean() for t in outputs if t.is_floating_point()) + penalty
    loss.backward()
    grads = [p.grad for p in gm.parameters() if p.grad is not None]
    assert grads, "no parameter received a gradient"
    assert all(torch.isfinite(g).all() for g in grads)
    gm.eval()

    # the report renders (a row per conv/linear layer, exact singular values at the recorded input sizes)
    assert str(orthofx.report(gm))

    # freeze: plain model with the same eval outputs
    frozen = orthofx.freeze(gm)
    assert orthofx.penalty(frozen) == 0
    reference = eval_outputs(gm, inputs)
    baked = eval_outputs(frozen, inputs)
    assert _spec(baked) == _spec(reference)
    for r, b in zip(_tensors(reference), _tensors(baked)):
        assert b.shape == r.shape
        torch.testing.assert_close(b, r, atol=FREEZE_TOLERANCE, rtol=0)


def test_expected_failures_are_exactly_these():
    failing = {}
    for preset, name in GRID:
        cell = _cell(preset, name)
        if cell.error is not None:
            failing[(preset, name)] = str(cell.error)
    assert set(failing) == set(EXPECTED_FAILURES), (
        f"unexpected failures: {sorted(set(failing) - set(EXPECTED_FAILURES))}; "
        f"unexpected successes: {sorted(set(EXPECTED_FAILURES) - set(failing))}")
    for key, fragment in EXPECTED_FAILURES.items():
        assert fragment in failing[key], (key, failing[key])


def _preserving_params():
    params = []
    for preset in FUNCTION_PRESERVING:
        for name in MODELS:
            if (preset, name) in EXPECTED_FAILURES:
                continue
            params.append(pytest.param(preset, name, id=f"{preset}-{name}"))
    return params


@pytest.mark.parametrize("preset,name", _preserving_params())
def test_function_preserving_preset_keepseval_outputs(preset, name):
    cell = _working(preset, name)
    for e, g in zip(_tensors(cell.expected), _tensors(cell.got)):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------------------- exports

# Every model once by default, presets rotated so that each preset is exported on several models.
PT2_DEFAULT = {
    "mha": "orthogonal", "transformer": "jacobian", "sdpa_sequential": "isometric", "depthwise": "convnorm",
    "grouped": "lorth", "dilated": "convnorm", "transposed": "jacobian", "conv1d": "isometric",
    "rectangular": "orthogonal", "impossible_layer": "convnorm", "shared": "jacobian", "functional_conv": "orthogonal",
    "inplace": "lorth", "dict_output": "convnorm", "tuple_output": "isometric", "buffers": "orthogonal",
    "nested": "jacobian", "batchnorm_resnet": "isometric", "cov_pool": "svd", "spectrum": "svd",
    "recurrent": "lorth", "data_dependent": "lorth", "train_eval_branch": "isometric",
    "shape_branch": "orthogonal", "patch_tokens": "convnorm", "group_loop": "jacobian",
}

# Decompositions and ONNX: freeze folds input-independent decompositions (exact) and keeps the others; the ONNX
# path replaces matrix square roots / inverse square roots (cov_pool's V diag(sqrt(lambda)) V^T, every preset) by
# Newton-Schulz iterations checked against the exact frozen model, and rejects a decomposition with no matmul-only
# form (spectrum's svdvals) with an ExportError naming the site and the layer feeding it ('lift'); test_export.py
# checks that error's wording.


def _export_marks(fmt: str, preset: str, name: str) -> list:
    return []


def _export_params(fmt: str, cells, slow: bool):
    params = []
    for preset, name in cells:
        if (preset, name) in EXPECTED_FAILURES:
            continue
        marks = _export_marks(fmt, preset, name) + ([pytest.mark.slow] if slow else [])
        params.append(pytest.param(preset, name, marks=marks, id=f"{preset}-{name}"))
    return params


def _check_export(preset: str, name: str, path, tolerance: float):
    cell = _working(preset, name)
    cell.gm.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = orthofx.export(cell.gm, path, example_inputs=cell.inputs)
    except orthofx.OrthofxError as exc:
        assert isinstance(exc, orthofx.ExportError), exc
        assert _site_named(str(exc), cell.model), f"the ExportError names no site of {name}: {exc}"
        return
    assert path.exists()
    assert result.max_abs_diff is not None and result.max_abs_diff <= tolerance, result


PT2_DEFAULT_CELLS = [(preset, name) for name, preset in PT2_DEFAULT.items()]


def test_pt2_default_covers_every_model_and_preset():
    assert set(PT2_DEFAULT) == set(MODELS)
    assert set(PT2_DEFAULT.values()) == set(PRESETS)
    assert not set(PT2_DEFAULT_CELLS) & set(EXPECTED_FAILURES)


@pytest.mark.parametrize("preset,name", _export_params("pt2", PT2_DEFAULT_CELLS, slow=False))
def test_export_pt2(preset, name, tmp_path):
    _check_export(preset, name, tmp_path / "m.pt2", PT2_TOLERANCE)


@pytest.mark.parametrize("preset,name", _export_params(
    "pt2", [c for c in GRID if c not in PT2_DEFAULT_CELLS], slow=True))
def test_export_pt2_grid(preset, name, tmp_path):
    _check_export(preset, name, tmp_path / "m.pt2", PT2_TOLERANCE)


ONNX_DEFAULT_CELLS = [("lorth", "tuple_output"), ("convnorm", "dict_output"), ("isometric", "buffers"),
                      ("jacobian", "nested"), ("orthogonal", "shared"), ("svd", "cov_pool")]


def _onnx(preset, name, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    _check_export(preset, name, tmp_path / "m.onnx", 1e-4)


@pytest.mark.parametrize("preset,name", _export_params("onnx", ONNX_DEFAULT_CELLS, slow=False))
def test_export_onnx(preset, name, tmp_path):
    _onnx(preset, name, tmp_path)


@pytest.mark.parametrize("preset,name", _export_params(
    "onnx", [c for c in GRID if c not in ONNX_DEFAULT_CELLS], slow=True))
def test_export_onnx_grid(preset, name, tmp_path):
    _onnx(preset, name, tmp_path)
