"""Regressions from an adversarial review of capture (session 37): layers called by keyword, and modules
registered under two names captured with torch.export.

References: the plain model's outputs (float64 copies), and the layers' arithmetic written out in float64
(``x W^T + b``, ``W W^T = I`` for an orthogonal layer)."""

import copy
import io
import types

import pytest
import torch
from torch import nn

import orthofx
from orthofx.capture import ModalGraphModule, capture

pytestmark = pytest.mark.usefixtures("one_thread")

ORTHOGONAL_LINEAR = {"rules": [{"match": {"type": "Linear"}, "apply": "orthogonal_conv"}]}
LORTH_LINEAR = {"rules": [{"match": {"type": "Linear"}, "apply": "orth_regularizer"}]}


def _policy(base: dict, mode: str) -> dict:
    return {**base, "capture": {"mode": mode}}


def _linear64(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x W^T + b`` in float64 from the layer's (computed) weight."""
    return x.double() @ layer.weight.detach().double().T + layer.bias.detach().double()


def _assert_orthogonal_rows(layer: nn.Module) -> None:
    w = layer.weight.detach().double()
    torch.testing.assert_close(w @ w.T, torch.eye(w.shape[0], dtype=torch.float64), rtol=0, atol=1e-5)


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(model: nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


# ---- a layer called by keyword (``self.fc(input=x)``, torch's name for the input)


class _KeywordCalls(nn.Module):
    """Two Linears called by keyword, as torch names their input."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(input=torch.tanh(self.fc(input=x)))


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_layer_called_by_keyword_is_replaced_by_an_orthogonal_layer(mode):
    """Bug: the call kept ``input=x``, and the orthogonal layer put in its place (``forward(self, x)``) failed with
    TransformError: "OrthogonalLinear.forward() got an unexpected keyword argument 'input'" (ConvNorm the same)."""
    torch.manual_seed(0)
    model = _KeywordCalls()
    before = _state(model)
    x = torch.randn(5, 6)
    gm = orthofx.transform(model, _policy(ORTHOGONAL_LINEAR, mode), example_inputs=(x,))
    _assert_same_state(model, before)
    _assert_orthogonal_rows(gm.fc)
    _assert_orthogonal_rows(gm.out)
    expected = _linear64(gm.out, torch.tanh(_linear64(gm.fc, x)))
    torch.testing.assert_close(gm(x).double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_capture_passes_a_layers_required_inputs_positionally(mode):
    """The captured graph calls ``fc(x)``: passes read a layer's input as ``node.args[0]``. An optional argument
    given by keyword (``output_size=``) stays a keyword; the graph computes what the model does."""

    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(2, 2, 3, stride=2, padding=1)
            self.fc = nn.Linear(11, 4)

        def forward(self, x):
            return self.fc(input=self.up(input=x, output_size=[11, 11]))

    torch.manual_seed(0)
    model = Up()
    x = torch.randn(2, 2, 6, 6)
    gm, _ = capture(model, mode=mode, example_inputs=(x,))
    calls = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    assert len(calls["fc"].args) == 1 and not calls["fc"].kwargs
    assert len(calls["up"].args) == 1 and list(calls["up"].kwargs) == ["output_size"]
    reference = copy.deepcopy(model).double()
    torch.testing.assert_close(gm(x).double(), reference(x.double()), rtol=0, atol=1e-5)


def test_export_capture_of_a_layer_called_by_keyword_and_positionally():
    """Bug: torch.export refused a leaf called once as ``fc(input=x)`` and once as ``fc(h)`` (AssertionError:
    "in_spec mismatch for _export_root.fc", reported as a CaptureError in submodule 'fc'), where fx mode captured
    it; the calls are made alike while torch.export runs."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(input=x)))

    torch.manual_seed(0)
    model = Twice()
    x = torch.randn(4, 6)
    gm, info = capture(model, mode="export", example_inputs=(x,))
    assert info.warnings == []
    assert [(n.target, len(n.args), dict(n.kwargs)) for n in gm.graph.nodes if n.op == "call_module"] == \
        [("fc", 1, {}), ("fc", 1, {})]
    torch.testing.assert_close(gm(x).double(), _linear64(model.fc, torch.tanh(_linear64(model.fc, x))),
                               rtol=0, atol=1e-5)


def test_a_hooked_layer_keeps_its_keyword_call():
    """A forward pre-hook sees the positional inputs only: a layer with hooks keeps its call as written."""

    class Hooked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.fc.register_forward_pre_hook(lambda m, args, kwargs: (args, {"input": 2 * kwargs["input"]}),
                                              with_kwargs=True)

        def forward(self, x):
            return self.fc(input=x)

    torch.manual_seed(0)
    model = Hooked()
    x = torch.randn(3, 6)
    gm, _ = capture(model, mode="fx")
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert list(node.kwargs) == ["input"]
    torch.testing.assert_close(gm(x).double(), _linear64(model.fc, 2 * x), rtol=0, atol=1e-5)


# ---- one module registered under two names, captured with torch.export


class _CalledByItsOtherName(nn.Module):
    """``self.first`` is ``self.blocks[0]``; the forward calls it by both names."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(6, 6)])
        self.first = self.blocks[0]
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.blocks[0](torch.tanh(self.first(self.first(x)))))


def test_export_capture_of_a_layer_called_by_its_other_name():
    """Bug: torch.export names a call by the attribute path the forward used (``first``), while capture preserved
    the signatures of ``blocks.0`` only: the capture failed (KeyError: 'first'), and where the model called the
    layer by its other name only, the call stayed inlined ATen ops (no site) under a module path 'first' that
    fx mode does not have."""
    torch.manual_seed(0)
    model = _CalledByItsOtherName()
    x = torch.randn(4, 6)
    gm, info = capture(model, mode="export", example_inputs=(x,))
    assert info.warnings == [] and info.mode_dependent == []
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["blocks.0"] * 3 + ["out"]
    fx_names = [name for name, _ in capture(model, mode="fx")[0].named_modules()]
    assert [name for name, _ in gm.named_modules()] == fx_names
    w = model.blocks[0]
    expected = _linear64(model.out, _linear64(w, torch.tanh(_linear64(w, _linear64(w, x)))))
    torch.testing.assert_close(gm(x).double(), expected, rtol=0, atol=1e-5)


class _ProjectionAlias(nn.Module):
    """The layer ``fc`` is reached as ``self.inner.proj`` too, and the forward uses that name."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.inner = nn.Module()
        self.inner.proj = self.fc
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.relu(self.inner.proj(x)))


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_a_layer_called_by_its_other_name_is_a_site_in_both_modes(mode):
    """Bug: in export mode ``inner.proj(x)`` stayed inlined: ``fc`` was no site, so the orthogonal rule silently
    left it a plain Linear (fx mode replaced it)."""
    torch.manual_seed(0)
    model = _ProjectionAlias()
    before = _state(model)
    x = torch.randn(4, 6)
    plan = orthofx.explain(model, _policy(LORTH_LINEAR, mode), example_inputs=(x,))
    assert sorted(entry.site.name for entry in plan.entries) == ["fc", "out"]
    gm = orthofx.transform(model, _policy(ORTHOGONAL_LINEAR, mode), example_inputs=(x,))
    _assert_same_state(model, before)
    assert type(gm.fc).__name__ == "OrthogonalLinear"
    _assert_orthogonal_rows(gm.fc)
    expected = _linear64(gm.out, torch.relu(_linear64(gm.fc, x)))
    torch.testing.assert_close(gm(x).double(), expected, rtol=0, atol=1e-5)


class _BlockTwice(nn.Module):
    """A conv + BatchNorm block applied twice, the second time through its alias ``again``."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())
        self.again = self.block
        self.head = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.head(self.again(self.block(x)))


def test_export_capture_of_an_aliased_block_updates_the_running_statistics_as_the_model():
    """Bug: the calls through ``again`` stayed inlined under the paths ``again.*``, so the export graph differed
    between modes in modules fx sees as leaves (``mode_dependent`` listed ``again.1``) and held modules fx mode
    does not have. Train-mode outputs and BatchNorm's running statistics are compared with the model's."""
    torch.manual_seed(0)
    model = _BlockTwice()
    x = torch.randn(2, 3, 6, 6)
    gm, info = capture(model, mode="export", example_inputs=(x,))
    assert info.mode_dependent == [] and info.warnings == []
    called = sorted({n.target for n in gm.graph.nodes if n.op == "call_module"})
    assert called == ["block.0", "block.1", "block.2", "head"]
    reference = copy.deepcopy(model).double()
    gm.train()
    torch.testing.assert_close(gm(x).double(), reference(x.double()), rtol=0, atol=1e-5)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(gm.get_submodule("block.1"), name).double(),
                                   getattr(reference.block[1], name), rtol=0, atol=1e-6)


# ---- top-level names the captured GraphModule has itself (``graph``, ``meta``, ``code`` ...), or ``self``


def _named(name: str, as_parameter: bool = False) -> nn.Module:
    """A model whose first Linear (or scale parameter) is the attribute ``name``."""

    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)
            setattr(self, name, nn.Parameter(torch.full((6,), 2.0)) if as_parameter else nn.Linear(6, 6))
            self.out = nn.Linear(6, 3)

        def forward(self, x):
            inner = getattr(self, name)
            h = self.fc(x) * inner if as_parameter else inner(x)
            return self.out(torch.tanh(h))

    return Named()


@pytest.mark.parametrize("mode", ["fx", "export", "auto"])
@pytest.mark.parametrize("name, as_parameter", [("graph", False), ("meta", True), ("code", False)])
def test_a_top_level_name_of_graph_module_is_refused_naming_it(mode, name, as_parameter):
    """Bug: a GNN's ``self.graph = GraphConv(...)`` (or a parameter ``self.meta``) failed inside torch.fx with
    "TypeError: cannot assign 'torch.fx.graph.Graph' as child module 'graph'" / "AttributeError: `code` is not an
    nn.Module" (not an orthofx error); auto mode now says it once, without trying export, which builds the same
    GraphModule. The message names the attribute and the fixes; the container fix works."""
    torch.manual_seed(0)
    model = _named(name, as_parameter)
    x = torch.randn(4, 6)
    with pytest.raises(orthofx.CaptureError, match=rf"'{name}' has the name of an attribute of torch\.fx\.GraphModule"
                       r".*Fix: rename.*torch\.nn\.Sequential\(model\)") as caught:
        orthofx.transform(model, _policy(LORTH_LINEAR, mode), example_inputs=(x,))
    assert caught.value.module_path == name and "torch.export failed too" not in str(caught.value)
    gm = orthofx.transform(nn.Sequential(model), _policy(ORTHOGONAL_LINEAR, mode), example_inputs=(x,))
    inner = getattr(gm.get_submodule("0"), name)
    h = _linear64(gm.get_submodule("0.fc"), x) * inner.detach().double() if as_parameter else _linear64(inner, x)
    expected = _linear64(gm.get_submodule("0.out"), torch.tanh(h))
    torch.testing.assert_close(gm(x).double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["fx", "export"])
@pytest.mark.parametrize("modal", [False, True])
def test_a_submodule_named_self_is_captured_and_pickled(mode, modal):
    """Bug: fx named the call's result after the module, ``self = self.self(x)``, and the next line's
    ``self.out`` read the tensor: TransformError "'Tensor' object has no attribute 'out'". Unpickling re-traces
    the code, which names the node so again: it is renamed there too (a plain and a train/eval GraphModule)."""
    torch.manual_seed(0)
    model = _named("self")
    if modal:
        class Modal(type(model)):
            def forward(self, x):
                return self.out(torch.tanh(getattr(self, "self")(x)) * (2.0 if self.training else 1.0))

        model.__class__ = Modal
    x = torch.randn(4, 6)
    gm = orthofx.transform(model, _policy(LORTH_LINEAR, mode), example_inputs=(x,))
    assert isinstance(gm, ModalGraphModule) == modal
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for training in (True, False):
        reference = copy.deepcopy(model).double().train(training)
        for module in (gm, loaded):
            module.train(training)
            torch.testing.assert_close(module(x).double(), reference(x.double()), rtol=0, atol=1e-5)


class _Heads(nn.Module):
    """Detection-style heads in a ModuleDict keyed ``class`` and ``box``; ``use`` picks the ones the forward calls."""

    def __init__(self, keys=("class", "box"), use=("class", "box")):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.heads = nn.ModuleDict({key: nn.Linear(6, 3) for key in keys})
        self.use = use

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return {key: self.heads[key](h) for key in self.use}


@pytest.mark.parametrize("mode", ["fx", "export", "auto"])
def test_a_module_key_that_is_a_python_keyword_is_refused_naming_it(mode):
    """Bug: ``nn.ModuleDict({"class": ...})`` made torch.fx write ``self.heads.class(h)``: a bare SyntaxError from
    the generated code. The CaptureError names the key and the fix (auto mode says it once)."""
    x = torch.randn(4, 6)
    message = r"'heads\.class' .*'class', a Python keyword.*key 'class_'"
    with pytest.raises(orthofx.CaptureError, match=message) as caught:
        orthofx.transform(_Heads(), _policy(LORTH_LINEAR, mode), example_inputs=(x,))
    assert caught.value.module_path == "heads.class" and "torch.export failed too" not in str(caught.value)


def test_a_keyword_key_the_graph_does_not_name_is_no_error():
    """Only names the generated code writes matter: a head keyed ``class`` that the forward does not call is no
    error, and the graph computes what the model does."""
    torch.manual_seed(0)
    model = _Heads(use=("box",))
    x = torch.randn(4, 6)
    gm = orthofx.transform(model, LORTH_LINEAR, example_inputs=(x,))
    expected = _linear64(model.heads["box"], torch.tanh(_linear64(model.fc, x)))
    torch.testing.assert_close(gm(x)["box"].double(), expected, rtol=0, atol=1e-5)


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x)))


def _scaled_forward(model, x):
    """A forward set on the instance (as a library's hooks do): twice the class's output in training."""
    return type(model).forward(model, x) * (2.0 if model.training else 1.0)


def test_a_forward_replaced_on_the_instance_is_captured_with_torch_export():
    """Bug: torch.fx traces ``type(model).forward``, so for ``model.forward = ...`` fx mode captured the class's
    forward and the graph silently computed something else (here: without the factor 2 in training). fx mode
    now refuses it naming the cause; auto mode captures it with torch.export, which makes the model's own call."""
    torch.manual_seed(0)
    model = _Scaled()
    model.forward = types.MethodType(_scaled_forward, model)
    x = torch.randn(4, 6)
    with pytest.raises(orthofx.CaptureError, match=r"forward is replaced on the instance.*_Scaled\.forward"):
        orthofx.transform(model, _policy(LORTH_LINEAR, "fx"), example_inputs=(x,))
    gm = orthofx.transform(model, LORTH_LINEAR, example_inputs=(x,))
    assert orthofx.manifest_of(gm).capture.mode == "export"
    for training in (True, False):
        gm.train(training)
        model.train(training)
        plain = _linear64(model.out, torch.tanh(_linear64(model.fc, x)))
        torch.testing.assert_close(gm(x).double(), plain * (2.0 if training else 1.0), rtol=0, atol=1e-5)


class _CountsRows(nn.Module):
    """A block (a leaf by the policy) that returns its batch size as a Python int besides the tensor."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        y = self.fc(x)
        return y, y.shape[0]


class _Averaged(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _CountsRows()
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        y, rows = self.block(x)
        return self.out(y) / rows


def test_export_capture_retries_with_static_shapes_on_fresh_inputs():
    """Bug: the dynamic-batch attempt of torch.export marked the example tensors as dynamic
    (``_dynamo_weak_dynamic_indices``), so the static retry was dynamic too and failed the same way (a leaf
    returning ``y.shape[0]``: "Only Tensors or scalars are supported as pytree flattened inputs, got: s77"), and
    the marks stayed on the caller's tensors. The static capture works, fixed to the example's batch size."""
    torch.manual_seed(0)
    model = _Averaged()
    x = torch.randn(4, 6)
    policy = {**LORTH_LINEAR, "capture": {"mode": "export", "leaf_modules": ["_CountsRows"]}}
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    assert not [key for key in vars(x) if key.startswith("_dynamo")]
    assert any("batch size 4" in warning for warning in orthofx.manifest_of(gm).capture.warnings)
    expected = _linear64(model.out, _linear64(model.block.fc, x)) / 4
    torch.testing.assert_close(gm(x).double(), expected, rtol=0, atol=1e-5)
    with pytest.raises(orthofx.ArgumentError, match="batch size 4"):
        gm(torch.randn(3, 6))


class _Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x, negate: bool = False):
        y = self.fc(x)
        if negate:
            y = -y
        return y


def test_fx_capture_failure_from_transform_points_to_export():
    """The fixes of a failed fx capture named ``concrete_args``, which orthofx.transform does not take: the message
    now says where it is taken (orthofx.capture.capture) and, for transform's users, that torch.export takes a flag
    at its example value; auto mode does so."""
    torch.manual_seed(0)
    model = _Flagged()
    x = torch.randn(4, 6)
    with pytest.raises(orthofx.CaptureError, match=r"concrete_args=\{\.\.\.\} to orthofx\.capture\.capture.*Or capture "
                       r"the model with torch\.export: capture: \{mode: auto\}") as caught:
        orthofx.transform(model, _policy(LORTH_LINEAR, "fx"), example_inputs=(x,))
    assert caught.value.module_path == ""
    gm = orthofx.transform(model, LORTH_LINEAR, example_inputs=(x, True))
    torch.testing.assert_close(gm(x, True).double(), -_linear64(model.fc, x), rtol=0, atol=1e-5)
