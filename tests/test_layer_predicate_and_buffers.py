"""One definition of "an orthofx layer" (orthofx.nn.tracing), and transform's example-input runs leaving the
user's buffers as they were (passes.base.EvalRun)."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import orthofx
import orthofx.nn as onn
from orthofx.errors import OrthofxError
from orthofx.nn.conditioning import DecompositionMonitor, PassThrough
from orthofx.nn.convnorm import FrozenConvNormNd
from orthofx.nn.orthogonal import FourierConv
from orthofx.nn.padding import CircularFold, CircularPad
from orthofx.nn.tracing import is_orthofx_layer, is_orthofx_module, is_orthofx_nn_class, orthofx_layer_types
from orthofx.penalty import is_orthofx_layer as is_orthofx_layer_from_penalty
from orthofx.plan import producers_feeding

# ------------------------------------------------------------------------------------------------ Part 1

# Written out by hand (the reference): every module class orthofx.nn exports, and one instance of each.
PUBLIC_LAYERS = {
    "ConvNormConv1d": lambda: onn.ConvNormConv1d(nn.Conv1d(2, 2, 3, padding=1)),
    "ConvNormConv2d": lambda: onn.ConvNormConv2d(nn.Conv2d(2, 2, 3, padding=1)),
    "ConvNormConv3d": lambda: onn.ConvNormConv3d(nn.Conv3d(2, 2, 3, padding=1)),
    "ConditionMonitor": lambda: onn.ConditionMonitor(),
    "OrthogonalActivationBlock": lambda: onn.OrthogonalActivationBlock(4),
    "ReflectionResidualBlock": lambda: onn.ReflectionResidualBlock(4, 4),
    "JacobianProbe": lambda: onn.JacobianProbe(nn.Linear(3, 3)),
    "OrthogonalConv1d": lambda: onn.OrthogonalConv1d(2, 2, 3),
    "OrthogonalConv2d": lambda: onn.OrthogonalConv2d(2, 2, 3),
    "OrthogonalConv3d": lambda: onn.OrthogonalConv3d(2, 2, 3),
    "OrthogonalConvTranspose1d": lambda: onn.OrthogonalConvTranspose1d(2, 2, 3, stride=2),
    "OrthogonalConvTranspose2d": lambda: onn.OrthogonalConvTranspose2d(2, 2, 3, stride=2),
    "OrthogonalConvTranspose3d": lambda: onn.OrthogonalConvTranspose3d(2, 2, 3, stride=2),
    "OrthogonalLinear": lambda: onn.OrthogonalLinear(3, 3),
}

# What to_plain() / freeze leave, and internal helpers: defined in orthofx.nn, not layers.
FROZEN_AND_HELPERS = {
    CircularPad: lambda: CircularPad([(1, 1)]),
    CircularFold: lambda: CircularFold([(1, 1)]),
    PassThrough: lambda: PassThrough(),
    FourierConv: lambda: onn.OrthogonalConv2d(2, 2, 3, method="cayley_fft", input_size=(8, 8)).to_plain(),
    FrozenConvNormNd: lambda: onn.ConvNormConv2d(nn.Conv2d(2, 2, 3, padding=1)).to_plain([(8, 8)]),
}


def test_the_layer_types_are_the_module_classes_orthofx_nn_exports():
    assert sorted(cls.__name__ for cls in orthofx_layer_types()) == sorted(PUBLIC_LAYERS)
    # the name orthofx.penalty re-exports is the same function
    assert is_orthofx_layer_from_penalty is is_orthofx_layer


@pytest.mark.parametrize("name", sorted(PUBLIC_LAYERS))
def test_every_public_layer_counts_in_all_three_predicates(name):
    layer = PUBLIC_LAYERS[name]()
    assert type(layer).__name__ == name
    assert is_orthofx_layer(layer) and is_orthofx_module(layer) and is_orthofx_nn_class(type(layer))


@pytest.mark.parametrize("cls", list(FROZEN_AND_HELPERS), ids=lambda cls: cls.__name__)
def test_frozen_forms_and_helpers_are_orthofx_modules_but_not_layers(cls):
    module = FROZEN_AND_HELPERS[cls]()
    assert type(module) is cls
    assert not is_orthofx_layer(module)
    assert is_orthofx_nn_class(type(module)) and is_orthofx_module(module)


def test_a_pass_monitor_is_a_layer_through_its_public_base():
    monitor = DecompositionMonitor("eigenvalues", 0, "linalg.eigh")
    assert is_orthofx_layer(monitor) and is_orthofx_module(monitor)


class _UserWeighted(nn.Module):
    """A user's weight-bearing module whose module is named like orthofx.nn ("orthofx.nnx_user")."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(4))

    def forward(self, x):
        return x @ self.weight


_UserWeighted.__module__ = "orthofx.nnx_user"


class _UserOrthogonalConv(onn.OrthogonalConv2d):
    """A user's subclass of a public layer, defined outside orthofx.nn."""


class _Svd(nn.Module):
    def __init__(self, producer: nn.Module):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.user = producer

    def forward(self, x):
        return torch.linalg.svdvals(self.user(self.lin(x)))


class _LeafTracer(fx.Tracer):
    """Keeps the user's module a call_module node (as policy capture.leaf_modules would)."""

    def is_leaf_module(self, m, qualname):
        return isinstance(m, _UserWeighted) or super().is_leaf_module(m, qualname)


def _svd_producers(model: nn.Module) -> list[str]:
    graph = _LeafTracer().trace(model)
    gm = fx.GraphModule(model, graph)
    (svd,) = [n for n in gm.graph.nodes if n.op == "call_function" and "svd" in str(n.target)]
    return producers_feeding(gm, svd)


def test_a_user_module_named_like_orthofx_nn_is_not_orthofx():
    user = _UserWeighted()
    assert not is_orthofx_layer(user) and not is_orthofx_module(user) and not is_orthofx_nn_class(type(user))
    # the walk upstream from the decomposition goes through the user's module to the nn.Linear feeding it
    assert _svd_producers(_Svd(user)) == ["lin"]


def test_a_user_subclass_of_a_layer_is_a_layer_but_not_an_orthofx_nn_class():
    layer = _UserOrthogonalConv(2, 2, 3)
    assert is_orthofx_layer(layer) and is_orthofx_module(layer)
    assert not is_orthofx_nn_class(type(layer))  # capture traces a user's class (its own code)


def test_plan_stops_at_an_orthofx_layer_feeding_a_decomposition():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.orth = onn.OrthogonalLinear(4, 4)

        def forward(self, x):
            return torch.linalg.svdvals(self.orth(torch.relu(self.lin(x))))

    gm, _ = orthofx.capture.capture(Model())
    (svd,) = [n for n in gm.graph.nodes if n.op == "call_function" and "svd" in str(n.target)]
    assert producers_feeding(gm, svd) == ["orth"]


def _probe_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(onn.OrthogonalConv2d(2, 2, 3), nn.ReLU(),
                         onn.JacobianProbe(nn.Sequential(nn.Flatten(), nn.Linear(32, 3)), weight=0.5),
                         )


def test_penalty_of_a_model_written_with_orthofx_nn_is_its_probes():
    model = _probe_model().train()
    x = torch.randn(4, 2, 4, 4)
    model(x)
    probe = model[2]
    assert probe.estimate is not None
    expected = 0.5 * probe.estimate
    torch.testing.assert_close(orthofx.penalty(model), expected, rtol=0, atol=0)
    terms = orthofx.penalty_terms(model)
    assert list(terms) == ["JacobianProbe/2"]
    torch.testing.assert_close(terms["JacobianProbe/2"], expected, rtol=0, atol=0)


def test_a_frozen_model_has_a_zero_penalty_and_its_frozen_layers_alone_are_refused():
    model = nn.Sequential(onn.OrthogonalConv2d(2, 2, 3), nn.ReLU(),
                          onn.ConvNormConv2d(nn.Conv2d(2, 2, 3, padding=1)))
    x = torch.randn(2, 2, 8, 8)
    frozen = orthofx.freeze(model, x)  # keeps a manifest without terms
    assert orthofx.penalty(frozen).item() == 0.0 and orthofx.penalty_terms(frozen) == {}
    assert not any(is_orthofx_layer(m) for m in frozen.modules())
    # the same frozen layers without freeze's manifest are a plain model: refused, saying why
    plain = nn.Sequential(model[2].to_plain([(8, 8)]))
    with pytest.raises(OrthofxError, match=r"holds no orthofx layer .*FrozenConvNormNd are frozen forms or helpers "
                                           r"of orthofx layers .*carry no regulariser"):
        orthofx.penalty(plain)


# ------------------------------------------------------------------------------------------------ Part 2

class Counting(nn.Module):
    """Advances a step counter and an EMA of its conv's output means on every forward, eval mode included."""

    def __init__(self, advance: bool = True):
        super().__init__()
        self.advance = advance
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema", torch.zeros(4))

    def forward(self, x):
        y = self.conv(x)
        if self.advance:
            self.count += 1
            self.ema.mul_(0.9).add_(y.mean((0, 2, 3)), alpha=0.1)
        return y


def _counting_model(advance: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(Counting(advance), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    with torch.no_grad():  # values to restore that are not the initial zeros
        model[0].count.fill_(7)
        model[0].ema.copy_(torch.arange(4.0))
    return model


def _buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in module.named_buffers()}


def _assert_same(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]):
    assert list(found) == list(expected)
    for name in expected:
        assert found[name].dtype == expected[name].dtype and torch.equal(found[name], expected[name]), name


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("preset", ["lorth", "orthogonal", "convnorm"])
def test_transform_leaves_eval_mode_buffer_updates_undone(preset, inplace):
    x = torch.randn(2, 3, 8, 8)
    model = _counting_model()
    before = _buffers(model[0])
    gm = orthofx.transform(model, preset, example_inputs=(x,), inplace=inplace)
    _assert_same(_buffers(gm.get_submodule("0")), before)
    _assert_same(_buffers(model[0]), before)

    # the rest of the transform is what it is for the same model whose forward changes nothing
    reference_model = _counting_model(advance=False)
    reference = orthofx.transform(reference_model, preset, example_inputs=(x,), inplace=inplace)
    assert [(c.site, c.pass_name, c.what) for c in orthofx.manifest_of(gm).changes] == \
           [(c.site, c.pass_name, c.what) for c in orthofx.manifest_of(reference).changes]
    assert orthofx.manifest_of(gm).output_change == orthofx.manifest_of(reference).output_change
    params, reference_params = dict(gm.named_parameters()), dict(reference.named_parameters())
    assert list(params) == list(reference_params)
    for name, p in params.items():
        assert torch.equal(p, reference_params[name]), name
    assert torch.equal(orthofx.penalty(gm), orthofx.penalty(reference))

    # and the returned model still advances its buffers when it runs
    with torch.no_grad():
        out = gm.eval()(x)
        first = gm.get_submodule("0.conv")(x)
    torch.testing.assert_close(out, reference.eval()(x), rtol=0, atol=0)
    assert gm.get_submodule("0").count.item() == 8
    torch.testing.assert_close(gm.get_submodule("0").ema, 0.9 * torch.arange(4.0) + 0.1 * first.mean((0, 2, 3)))


class Replacing(nn.Module):
    """A leaf (policy capture.leaf_modules) whose eval forward replaces a buffer, writes one through ``.data``
    (no version bump) and registers a new one."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("steps", torch.tensor([3.0]))
        self.register_buffer("scale", torch.tensor([2.0]), persistent=False)
        self.register_buffer("unset", None)

    def forward(self, x):
        self.steps = self.steps + 1
        self.scale.data.mul_(5.0)
        self.register_buffer("seen", x.detach().mean().reshape(1), persistent=False)
        self.unset = torch.ones(1)
        return self.lin(x)


@pytest.mark.parametrize("inplace", [False, True])
def test_replaced_and_new_buffers_of_a_leaf_are_put_back(inplace):
    policy = orthofx.Policy.load("lorth").to_dict()
    policy["capture"] = {"leaf_modules": ["Replacing"]}
    model = nn.Sequential(Replacing(), nn.ReLU())
    layer = model[0]
    objects = dict(layer._buffers)
    before = _buffers(layer)
    gm = orthofx.transform(model, policy, example_inputs=(torch.randn(2, 4),), inplace=inplace)
    for owner in (gm.get_submodule("0"), layer):
        _assert_same(_buffers(owner), before)
        assert list(owner._buffers) == ["steps", "scale", "unset"] and owner.unset is None
        assert owner._non_persistent_buffers_set == {"scale"}
    # the user's own tensor objects (inplace) or the copy's (not inplace) are kept, not new ones
    assert all(layer._buffers[name] is t for name, t in objects.items())
    assert (gm.get_submodule("0") is layer) == inplace


def test_buffers_of_a_probed_block_are_the_users_but_a_monitors_are_orthofx():
    """A JacobianProbe holds its block's buffers (restored); a ConditionMonitor's statistics are orthofx's and keep
    what the two example-input runs recorded."""

    class Spectrum(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.monitor = onn.ConditionMonitor()

        def forward(self, x):
            y = self.lin(x)
            lam = torch.linalg.eigvalsh(y.mT @ y + torch.eye(3))
            self.monitor(lam)
            return y

    torch.manual_seed(0)
    counting = Counting()
    model = nn.Sequential(onn.JacobianProbe(counting), nn.Flatten(), nn.Linear(4 * 8 * 8, 3), Spectrum())
    x = torch.randn(2, 3, 8, 8)
    before = _buffers(counting)
    gm = orthofx.transform(model, "lorth", example_inputs=(x,), inplace=True)
    _assert_same(_buffers(counting), before)
    _assert_same(_buffers(gm.get_submodule("0")), before)
    monitor = gm.get_submodule("3.monitor")
    assert monitor is model[3].monitor and int(monitor.updates) == 2
    with torch.no_grad():
        y = model[2](model[1](model[0].block.conv(x)))
        y = model[3].lin(y)
        lam = torch.linalg.eigvalsh((y.mT @ y + torch.eye(3)).double())
    torch.testing.assert_close(monitor.last, lam[-1] / lam[0], rtol=1e-4, atol=0)


def test_lazy_layers_are_initialised_by_the_example_run_and_keep_it():
    """Guard: a lazy layer's uninitialised buffers are not saved (the example run is what initialises them)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(4), nn.LazyBatchNorm1d(), nn.Linear(4, 2))
    gm = orthofx.transform(model, "lorth", example_inputs=(torch.randn(3, 5),), inplace=True)
    _assert_same(_buffers(gm.get_submodule("1")), _buffers(nn.BatchNorm1d(4)))  # torch's initial statistics
    assert type(model[0]) is nn.Linear and model[0].weight.shape == (4, 5)
