"""Every preset on every model of the corpus (tests/corpus.py): it works, or it fails clearly.

For each (preset, model) cell, ``orthofx.transform(model, preset, example_inputs=...)`` either

* works: the rewritten model's eval outputs have the model's structure (same pytree, same shapes) and are finite,
  a training-mode forward + ``orthofx.penalty`` backward gives finite gradients, the model itself is unchanged,
  ``orthofx.report`` renders, and ``orthofx.freeze`` reproduces the eval outputs within 1e-5; or
* fails with an ``orthofx.OrthofxError`` whose message names the site (a module path of the model), or, for a
  preset that has nothing to act on, a ``PlanError`` saying that a rule matched no site.

Presets that do not change the forward (``lorth``, ``jacobian``, ``svd``) must also keep the model's eval outputs.

Exports: ``.pt2`` for every model once by default (presets rotated, see ``PT2_DEFAULT``) and for the grid under
``slow``; ONNX (onnxruntime parity) on a handful of cells by default and on the grid under ``slow`` (the grid: every
preset that changes the graph, and one of the three that freeze to the model's own graph, see ``EXPORT_GRID``).
An export either works or raises ``orthofx.ExportError`` naming the site / op it could not handle.

Transforms are cached per cell (``_cell``), so the export tests reuse the grid's transformed models.
"""

from __future__ import annotations

import functools
import re
import warnings

import numpy as np
import pytest
import torch

import orthofx
from corpus import CORPUS, eval_outputs
from orthofx.nn.orthogonal import OrthogonalConv1d, OrthogonalConv2d
from orthofx.nn.padding import CircularPad, circular_pad
from references import bitwise_equal, state_copy

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
        "mha", "transformer", "sdpa_sequential", "functional_conv", "buffers", "spectrum", "recurrent",
        "data_dependent", "train_eval_branch")},
    # StdConv2d's own forward is traced (no Conv2d module site): the error names the traced-through layers
    ("convnorm", "std_conv"): "does not reach stem, conv1, conv2 (StdConv2d",
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


class Cell:
    """One (preset, model) transform: the model, its inputs, its eval outputs, and the GraphModule or error."""

    def __init__(self, preset: str, name: str):
        self.preset, self.name = preset, name
        self.model, self.inputs = CORPUS[name]()
        before = state_copy(self.model)
        self.gm = self.error = None
        try:
            self.gm = orthofx.transform(self.model, preset, example_inputs=self.inputs)
        except Exception as exc:  # noqa: BLE001 - judged by the tests
            self.error = exc
            return
        self.model_unchanged = bitwise_equal(state_copy(self.model), before)
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
    "unet": "lorth", "convnext": "orthogonal", "mobilenet_v2": "orthogonal", "se_resnet": "convnorm",
    "efficientnet": "jacobian", "vit": "isometric", "std_conv": "orthogonal",
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


# Frozen, the lorth and jacobian models compute the model itself (a penalty and probes, both gone) and the isometric
# one the model's graph with other weights (test_graph_keeping_presets_freeze_to_one_computation): the export grids
# take one of the three per model, rotated, and every model under the presets that change the graph.
GRAPH_KEEPING = ("lorth", "jacobian", "isometric")
EXPORT_GRID = [(p, m) for p, m in GRID if p not in GRAPH_KEEPING or p == GRAPH_KEEPING[MODELS.index(m) % 3]]


@pytest.mark.parametrize("name", MODELS)
def test_graph_keeping_presets_freeze_to_one_computation(name):
    # Fresh transforms, not the shared cells: test_preset_on_model runs those in training mode, which moves their
    # BatchNorm statistics through dropout masks drawn from the global RNG (different for each cell)
    frozen = {}
    for preset in GRAPH_KEEPING:
        if (preset, name) not in EXPECTED_FAILURES:
            model, inputs = CORPUS[name]()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                frozen[preset] = orthofx.freeze(orthofx.transform(model, preset, example_inputs=inputs))
    assert len(frozen) >= 2
    # the same parameters and buffers at the same paths (a Jacobian block site keeps its container, which the
    # graph then calls instead of the container's layers; tracing goes through it again at export)
    layouts = {p: {k: (tuple(v.shape), v.dtype) for k, v in f.state_dict().items()} for p, f in frozen.items()}
    assert all(v == layouts[next(iter(layouts))] for v in layouts.values()), name
    if {"lorth", "isometric"} <= set(frozen):  # the same graph, called alike
        signature = {p: [(n.op, str(n.target)) for n in frozen[p].graph.nodes] for p in ("lorth", "isometric")}
        assert signature["lorth"] == signature["isometric"]
    if {"lorth", "jacobian"} <= set(frozen):  # the same weights too: the same outputs
        for a, b in zip(_tensors(eval_outputs(frozen["lorth"], inputs)),
                        _tensors(eval_outputs(frozen["jacobian"], inputs))):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("preset,name", _export_params(
    "pt2", [c for c in EXPORT_GRID if c not in PT2_DEFAULT_CELLS], slow=True))
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


# The larger models added last (an ONNX export takes them 5-8 s each) export to ONNX under one preset each,
# rotated, rather than under all six: the whole grid of them would add about two minutes to the suite, and their
# layers are the ones the grid above already exports (convs, depthwise and transposed convs, attention).
ONNX_ONCE = {"unet": "orthogonal", "convnext": "orthogonal", "mobilenet_v2": "convnorm", "se_resnet": "isometric",
             "efficientnet": "lorth", "vit": "jacobian", "std_conv": "lorth"}
ONNX_GRID = [(p, m) for p, m in GRID if (p, m) not in ONNX_DEFAULT_CELLS
             and (ONNX_ONCE[m] == p if m in ONNX_ONCE else (p, m) in EXPORT_GRID)]


def test_onnx_grid_exports_every_model():
    assert {m for _, m in ONNX_GRID} | {m for _, m in ONNX_DEFAULT_CELLS} == set(MODELS)
    assert not {(p, m) for m, p in ONNX_ONCE.items()} & set(EXPECTED_FAILURES)


@pytest.mark.parametrize("preset,name", _export_params("onnx", ONNX_GRID, slow=True))
def test_export_onnx_grid(preset, name, tmp_path):
    _onnx(preset, name, tmp_path)


# ------------------------------------------------------------------------- regressions found by the corpus



def _dense(layer: torch.nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """The matrix of a linear map on inputs of ``shape`` (one column per unit input), float64."""
    n = int(torch.tensor(shape).prod())
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    with torch.no_grad():
        return layer(basis).reshape(n, -1).T


def _periodic_conv2d(x: torch.Tensor, w: torch.Tensor, left: tuple[int, int]) -> torch.Tensor:
    """Slow reference: stride-1 circular convolution on an ``n x m`` map (any kernel size), channels by loops:
    ``y[o, i, j] = sum_{c, a, b} w[o, c, a, b] x[c, (i + a - left_0) mod n, (j + b - left_1) mod m]``."""
    B, C, n, m = x.shape
    y = torch.zeros(B, w.shape[0], n, m, dtype=x.dtype)
    for i in range(n):
        for j in range(m):
            for a in range(w.shape[2]):
                for b in range(w.shape[3]):
                    y[:, :, i, j] += x[:, :, (i + a - left[0]) % n, (j + b - left[1]) % m] @ w[:, :, a, b].T
    return y


def test_circular_pad_wraps_around_more_than_once():
    # ConvNeXt's 7 x 7 depthwise conv on a 2 x 2 map: the orthogonal layer's circular pads (3) exceed the map
    x = torch.randn(2, 3, 2, 1, dtype=torch.float64, requires_grad=True)
    pads = [(3, 4), (2, 0)]
    expected = np.pad(x.detach().numpy(), [(0, 0), (0, 0), (3, 4), (2, 0)], mode="wrap")
    np.testing.assert_array_equal(circular_pad(x, pads).detach().numpy(), expected)
    np.testing.assert_array_equal(CircularPad(pads)(x).detach().numpy(), expected)
    assert torch.autograd.gradcheck(lambda t: circular_pad(t, pads), (x,))  # finite differences
    # pads within the size keep F.pad's values (and the fast backward)
    np.testing.assert_array_equal(circular_pad(x, [(1, 2), (1, 1)]).detach().numpy(),
                                  np.pad(x.detach().numpy(), [(0, 0), (0, 0), (1, 2), (1, 1)], mode="wrap"))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_orthogonal_conv_with_a_kernel_larger_than_the_map(n):
    torch.manual_seed(0)
    layer = OrthogonalConv2d(4, 4, 7, bias=False).double()
    assert (layer.weight.detach().abs().sum(dim=(0, 1)) > 1e-3).sum() > 9  # taps far off the centre too
    x = torch.randn(2, 4, n, n, dtype=torch.float64)
    left = tuple(l for l, _ in layer.pads)
    torch.testing.assert_close(layer(x), _periodic_conv2d(x, layer.weight.detach(), left), atol=1e-12, rtol=0)
    A = _dense(layer, (4, n, n))  # still exactly orthogonal: the kernel's symbol sampled at n frequencies
    torch.testing.assert_close(A.T @ A, torch.eye(A.shape[1], dtype=torch.float64), atol=1e-10, rtol=0)
    frozen = layer.to_conv()
    torch.testing.assert_close(frozen(x), layer(x), atol=1e-12, rtol=0)
    big = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(frozen(big), layer(big), atol=1e-12, rtol=0)
    # 1-D, a 5-tap kernel on one sample
    conv1d = OrthogonalConv1d(3, 3, 5, bias=False).double()
    y = torch.randn(2, 3, 1, dtype=torch.float64)
    torch.testing.assert_close(conv1d.to_conv()(y), conv1d(y), atol=1e-12, rtol=0)
    # on one sample every tap wraps onto it: the layer is the sum of its taps
    torch.testing.assert_close(conv1d(y), torch.einsum("oc,bcn->bon", conv1d.weight.detach().sum(-1), y),
                               atol=1e-12, rtol=0)


def test_orthogonal_preset_on_convnext_late_stage(tmp_path):
    # stage 2 sees a 2 x 2 map; its depthwise 7 x 7 is L_orth (its orthogonal versions are fixed shifts), so a
    # full (groups=1) 7 x 7 stands there: its hard layer freezes into orthofx's CircularPad, whose pads of 3 wrap
    # around the 2 x 2 map (nn.Conv2d's circular padding refuses them), and exports so to ONNX
    pytest.importorskip("onnxruntime")
    model, inputs = CORPUS["convnext"]()
    torch.manual_seed(3)
    model.stage2[0].dwconv = torch.nn.Conv2d(8, 8, 7, padding=3)
    gm = orthofx.transform(model, "orthogonal", example_inputs=inputs)
    assert isinstance(gm.get_submodule("stage2.0.dwconv"), OrthogonalConv2d)
    frozen = orthofx.freeze(gm)
    wrapping = [m for m in frozen.get_submodule("stage2.0.dwconv").modules() if isinstance(m, CircularPad)]
    assert wrapping and all(p > 2 for pair in wrapping[0].pads for p in pair)
    torch.testing.assert_close(eval_outputs(frozen, inputs), eval_outputs(gm, inputs), atol=1e-5, rtol=0)
    result = orthofx.export(gm, tmp_path / "convnext.onnx", example_inputs=inputs)
    assert result.max_abs_diff <= 1e-5


def test_traced_through_layer_subclass_is_named():
    model, inputs = CORPUS["std_conv"]()
    with pytest.raises(orthofx.PlanError, match=r"does not reach stem, conv1, conv2 \(StdConv2d.*leaf_modules") as info:
        orthofx.transform(model, "convnorm", example_inputs=inputs)
    # listing them would not help convnorm: it skips a conv whose class has its own forward
    assert "convnorm, which needs the conv's own operation, skips such a layer" in str(info.value)
    plan = orthofx.explain(model, "lorth", example_inputs=inputs)
    assert "does not reach stem, conv1, conv2" in str(plan)
    gm = orthofx.transform(model, "lorth", example_inputs=inputs)
    assert "does not reach stem" in str(orthofx.report(gm))
    # the remedy the message names works
    policy = {"capture": {"leaf_modules": ["StdConv2d"]},
              "rules": [{"match": {"type": "Conv2d"}, "apply": "orth_regularizer"}]}
    plan = orthofx.explain(model, policy, example_inputs=inputs)
    assert {e.site.name for e in plan.entries} == {"stem", "conv1", "conv2"}
    assert "does not reach" not in str(plan)


def test_a_pass_failing_with_a_torch_error_names_the_site():
    from orthofx.passes import Pass, register_pass, unregister_pass

    @register_pass
    class Fails(Pass):
        name = "fails_on_conv2_for_test"
        site_kinds = frozenset({"module"})

        def apply(self, ctx, entries):
            for entry in entries:
                if entry.site.name == "conv2":
                    torch.zeros(2) @ torch.zeros(3)

    try:
        model, inputs = CORPUS["std_conv"]()
        policy = {"capture": {"leaf_modules": ["StdConv2d"]},
                  "rules": [{"name": "r", "match": {"type": "Conv2d"}, "apply": "fails_on_conv2_for_test"}]}
        with pytest.raises(orthofx.TransformError, match=r"fails_on_conv2_for_test' failed at conv2 \(rule 'r'\)"):
            orthofx.transform(model, policy, example_inputs=inputs)
    finally:
        unregister_pass("fails_on_conv2_for_test")
