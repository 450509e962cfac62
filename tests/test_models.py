"""Tests of the built-in example models (orthofx/models.py).

models.py is plain torch and must import nothing of orthofx, so this file loads it straight from its path:
that both checks the contract and keeps these tests independent of the rest of the package. One test checks
that ``orthofx.models`` is the same file.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import math
import pathlib
import sys
import types

import pytest
import torch
import torch.fx
import torch.nn as nn
from references import central_difference

MODELS_PATH = pathlib.Path(__file__).resolve().parents[1] / "orthofx" / "models.py"


def _load_standalone() -> types.ModuleType:
    name = "_orthofx_models_standalone"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, MODELS_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


models = _load_standalone()

ALL = [
    "dbn_cnn",
    "deep_cnn",
    "deep_linear",
    "deep_mlp",
    "gcp_cnn",
    "resnet18",
    "resnet50",
    "small_cnn",
    "vgg11",
]

# small versions so the whole file runs in a few seconds
SMALL = {
    "resnet18": {"width": 8},
    "resnet50": {"width": 8},
    "vgg11": {"width": 8},
    "deep_mlp": {"depth": 8, "width": 16},
    "deep_cnn": {"depth": 6, "width": 8},
    "dbn_cnn": {"width": 8},
    "gcp_cnn": {"width": 8, "dim": 6},
    "small_cnn": {"width": 8},
}


def build(name: str, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return models.get(name, **{**SMALL.get(name, {}), **overrides})


def out_features(name: str) -> int:
    return 64 if name == "deep_linear" else 10


# --------------------------------------------------------------------------------------------- registry / API


def test_names_sorted_and_complete():
    assert models.names() == sorted(ALL)


def test_num_classes_and_input_shapes():
    shapes = {
        "resnet18": (3, 32, 32),
        "resnet50": (3, 32, 32),
        "vgg11": (3, 32, 32),
        "deep_cnn": (3, 32, 32),
        "small_cnn": (1, 8, 8),
        "dbn_cnn": (1, 8, 8),
        "gcp_cnn": (1, 8, 8),
        "deep_mlp": (64,),
        "deep_linear": (64,),
    }
    for name in ALL:
        assert models.num_classes(name) == 10
        assert models.input_shape(name) == shapes[name]


def test_unknown_name_raises_value_error_listing_models():
    with pytest.raises(ValueError) as info:
        models.get("resnt18")
    message = str(info.value)
    assert "did you mean 'resnet18'" in message
    for name in ALL:
        assert name in message
    for fn in (models.input_shape, models.example_input, models.num_classes):
        with pytest.raises(ValueError, match="available models"):
            fn("no_such_model")


def test_example_input_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = models.example_input("resnet18", batch=3, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    b = models.example_input("resnet18", batch=3, seed=5)
    c = models.example_input("resnet18", batch=3, seed=6)
    assert a.shape == (3, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name", ALL)
def test_deterministic_given_seed(name):
    a, b = build(name, seed=3), build(name, seed=3)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    x = models.example_input(name)
    assert torch.equal(a.eval()(x), b.eval()(x))


def test_defaults_build_with_documented_sizes():
    # full-size defaults build (no forward: the point is the constructor arguments and shapes)
    r18 = models.get("resnet18")
    assert r18.conv1.weight.shape == (64, 3, 3, 3) and r18.fc.in_features == 512
    r50 = models.get("resnet50")
    assert r50.fc.in_features == 2048
    assert [len(getattr(r50, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    vgg = models.get("vgg11")
    convs = [m for m in vgg.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]
    mlp = models.get("deep_mlp")
    assert sum(isinstance(m, nn.Linear) for m in mlp.layers) == 64
    assert isinstance(mlp.layers[1], nn.Tanh)
    cnn = models.get("deep_cnn")
    assert sum(isinstance(m, nn.Conv2d) for m in cnn.features) == 32
    assert cnn.features[0].out_channels == 16
    lin = models.get("deep_linear")
    assert len(lin.layers) == 4
    assert models.get("dbn_cnn").dbn.eps == 1e-2
    assert models.get("dbn_cnn").dbn.momentum == 0.1


# ------------------------------------------------------------------------------------- forward and tracing


@pytest.mark.parametrize("name", ALL)
def test_forward_shape_and_finite(name):
    model = build(name)
    x = models.example_input(name, batch=3)
    assert x.shape == (3, *models.input_shape(name))
    for training in (True, False):
        y = model.train(training)(x)
        assert y.shape == (3, out_features(name))
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_symbolic_trace_gives_identical_output(name, training):
    model = build(name).train(training)
    x = models.example_input(name, batch=4, seed=1)
    reference = copy.deepcopy(model)  # train mode updates running buffers: use separate copies
    gm = torch.fx.symbolic_trace(copy.deepcopy(model))
    assert isinstance(gm, torch.fx.GraphModule)
    expected = reference(x)
    got = gm(x)
    assert torch.equal(got, expected)
    # buffers stay buffers (get_attr) instead of tensors folded into the graph at trace time
    assert not [n for n, _ in gm.named_buffers() if "_tensor_constant" in n]
    assert not [a for a in vars(gm) if a.startswith("_tensor_constant")]
    assert not [n for n in gm.graph.nodes if n.op == "get_attr" and "_tensor_constant" in str(n.target)]
    # running statistics of the traced copy move exactly like the original's
    ref_state, gm_state = reference.state_dict(), gm.state_dict()
    assert ref_state.keys() == gm_state.keys()
    for k in ref_state:
        assert torch.equal(ref_state[k], gm_state[k]), k


def test_traced_eval_graph_reads_current_running_stats():
    model = build("dbn_cnn").eval()
    gm = torch.fx.symbolic_trace(model)
    x = models.example_input("dbn_cnn", batch=4)
    before = gm(x).clone()
    model.train()(models.example_input("dbn_cnn", batch=16, seed=2))  # updates the shared buffers
    model.eval()  # the trace shares the leaf modules (BatchNorm) with the model, and so their mode
    assert torch.equal(gm.dbn.running_cov, model.dbn.running_cov)
    assert not torch.equal(gm(x), before)
    assert torch.equal(gm(x), model(x))


def _nearest_conv_feeding(gm: torch.fx.GraphModule, op) -> set[str]:
    """Names of the Conv2d modules nearest upstream of every call to ``op`` in the graph."""
    modules = dict(gm.named_modules())
    found = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not op:
            continue
        stack, seen = [node], set()
        while stack:
            current = stack.pop()
            for arg in current.all_input_nodes:
                if arg in seen:
                    continue
                seen.add(arg)
                if arg.op == "call_module" and isinstance(modules[arg.target], nn.Conv2d):
                    found.add(arg.target)
                else:
                    stack.append(arg)
    return found


@pytest.mark.parametrize("name, pre_svd", [("dbn_cnn", {"conv1"}), ("gcp_cnn", {"conv_last"})])
def test_pre_svd_layer_is_the_conv_feeding_eigh(name, pre_svd):
    gm = torch.fx.symbolic_trace(build(name).train())
    assert sum(n.target is torch.linalg.eigh for n in gm.graph.nodes) == 1
    assert _nearest_conv_feeding(gm, torch.linalg.eigh) == pre_svd


# ------------------------------------------------------------------------------------------- architecture


def _convs(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg11", "deep_cnn", "small_cnn", "gcp_cnn", "dbn_cnn"])
def test_3x3_convs_have_zero_padding_1_and_no_bias_before_bn(name):
    model = build(name)
    convs = _convs(model)
    assert convs
    for conv_name, conv in convs:
        if conv.kernel_size == (3, 3):
            assert conv.padding == (1, 1) and conv.padding_mode == "zeros", conv_name
        if conv.kernel_size == (1, 1):
            assert conv.padding == (0, 0), conv_name
    if name in ("resnet18", "resnet50", "vgg11", "gcp_cnn", "dbn_cnn"):
        # every conv is followed by a BatchNorm (or the DBN) in these models: no bias
        assert all(conv.bias is None for _, conv in convs)


def test_resnet18_structure_and_strided_shortcuts():
    width = 8
    model = build("resnet18", width=width)
    for attr in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"):
        assert hasattr(model, attr)
    assert isinstance(model.bn1, nn.BatchNorm2d)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    for i in range(1, 5):
        for block in getattr(model, f"layer{i}"):
            for attr in ("conv1", "bn1", "conv2", "bn2", "shortcut"):
                assert hasattr(block, attr)
    shortcut_convs = [
        (n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n.endswith("shortcut.0")
    ]
    assert [n for n, _ in shortcut_convs] == ["layer2.0.shortcut.0", "layer3.0.shortcut.0", "layer4.0.shortcut.0"]
    for n, conv in shortcut_convs:
        c = conv.in_channels
        assert tuple(conv.weight.shape) == (2 * c, c, 1, 1), n  # (M, C, k, S) = (2C, C, 1, 2)
        assert conv.stride == (2, 2) and conv.bias is None, n
        assert isinstance(model.get_submodule(n[: -len(".0")])[1], nn.BatchNorm2d)
    assert [c.in_channels for _, c in shortcut_convs] == [width, 2 * width, 4 * width]
    assert model.fc.in_features == 8 * width and model.fc.out_features == 10
    # first block of layer2: the 3x3 conv carries the stride
    assert model.layer2[0].conv1.stride == (2, 2)


def test_resnet50_bottlenecks():
    model = build("resnet50", width=8)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    shortcuts = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and "shortcut" in n}
    assert sorted(shortcuts) == [f"layer{i}.0.shortcut.0" for i in range(1, 5)]
    assert shortcuts["layer1.0.shortcut.0"].stride == (1, 1)  # 8 -> 32 channels, no stride
    for i in (2, 3, 4):
        conv = shortcuts[f"layer{i}.0.shortcut.0"]
        assert conv.kernel_size == (1, 1) and conv.stride == (2, 2)
    assert model.fc.in_features == 8 * 8 * 4


def test_vgg11_channels_scale_with_width():
    model = build("vgg11", width=8)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 32, 64, 64, 64, 64]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.features) == 8
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 5


@pytest.mark.parametrize("depth", [1, 5])
def test_deep_mlp_has_depth_hidden_linear_layers(depth):
    model = build("deep_mlp", depth=depth, width=12)
    hidden = [m for m in model.layers if isinstance(m, nn.Linear)]
    assert len(hidden) == depth
    assert hidden[0].in_features == 64 and all(m.out_features == 12 for m in hidden)
    assert len([m for m in model.modules() if isinstance(m, nn.Linear)]) == depth + 1
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)) for m in model.modules())
    assert model(torch.randn(2, 64)).shape == (2, 10)


def test_deep_mlp_activation_choice():
    assert isinstance(build("deep_mlp", activation="relu").layers[1], nn.ReLU)
    assert isinstance(build("deep_mlp").layers[1], nn.Tanh)
    model = build("deep_mlp", activation="abs", depth=2)
    x = torch.randn(3, 64)
    h = model.layers[0](x)
    assert torch.equal(model.layers[1](h), h.abs())
    with pytest.raises(ValueError, match="tanh"):
        models.get("deep_mlp", activation="gelu")


def test_deep_cnn_is_plain():
    model = build("deep_cnn", depth=7, width=8)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 7 and convs[0].in_channels == 3
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in model.modules())


def test_deep_linear_is_linear_and_bias_free():
    model = build("deep_linear", depth=3, width=32)
    assert isinstance(model.layers, nn.Sequential)
    assert all(isinstance(m, nn.Linear) and m.bias is None for m in model.layers)
    assert [(m.in_features, m.out_features) for m in model.layers] == [(64, 32), (32, 32), (32, 64)]
    x, y = torch.randn(4, 64), torch.randn(4, 64)
    product = model.layers[2].weight @ model.layers[1].weight @ model.layers[0].weight
    torch.testing.assert_close(model(x), x @ product.T)
    torch.testing.assert_close(model(2 * x + y), 2 * model(x) + model(y))  # linear


# ----------------------------------------------------------------------------------- decorrelated BatchNorm


def _dbn_output(model, x):
    captured = {}
    handle = model.dbn.register_forward_hook(lambda module, args, out: captured.update(inp=args[0], out=out))
    try:
        model(x)
    finally:
        handle.remove()
    return captured["inp"], captured["out"]


def _channel_cov(t: torch.Tensor) -> torch.Tensor:
    """Biased channel covariance of (B, C, H, W) over (B, H, W), in float64."""
    flat = t.detach().double().transpose(0, 1).flatten(1)
    centred = flat - flat.mean(dim=1, keepdim=True)
    return centred @ centred.T / flat.shape[1]


def test_dbn_whitens_to_identity_covariance_in_training():
    model = build("dbn_cnn", width=16, eps=1e-5).train()
    x = models.example_input("dbn_cnn", batch=64)
    _, out = _dbn_output(model, x)
    cov = _channel_cov(out)
    torch.testing.assert_close(cov, torch.eye(16, dtype=torch.float64), atol=2e-3, rtol=0)
    mean = out.detach().double().mean(dim=(0, 2, 3))
    assert mean.abs().max() < 1e-4


def test_dbn_training_output_matches_independent_zca():
    model = build("dbn_cnn").train()  # default eps 1e-2
    eps = model.dbn.eps
    assert eps == 1e-2
    x = models.example_input("dbn_cnn", batch=32, seed=4)
    inp, out = _dbn_output(model, x)
    cov = _channel_cov(inp)
    c = cov.shape[0]
    sigma = cov + eps * torch.eye(c, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(sigma)
    whitening = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    flat = inp.detach().double().transpose(0, 1).flatten(1)
    expected = (whitening @ (flat - flat.mean(dim=1, keepdim=True))).reshape(c, *inp.shape[:1], *inp.shape[2:])
    torch.testing.assert_close(out.detach().double(), expected.transpose(0, 1), atol=2e-4, rtol=1e-4)
    # output covariance is Sigma^-1/2 cov Sigma^-1/2 = I - eps Sigma^-1
    torch.testing.assert_close(
        _channel_cov(out), torch.eye(c, dtype=torch.float64) - eps * torch.linalg.inv(sigma), atol=2e-4, rtol=0
    )


def test_dbn_running_stats_update_and_eval_uses_them():
    model = build("dbn_cnn")
    dbn = model.dbn
    assert torch.equal(dbn.running_mean, torch.zeros(8))
    assert torch.equal(dbn.running_cov, torch.eye(8))
    assert sorted(k for k in model.state_dict() if k.startswith("dbn.")) == [
        "dbn.bias", "dbn.running_cov", "dbn.running_mean", "dbn.weight"
    ]
    x_test = models.example_input("dbn_cnn", batch=5, seed=9)
    eval_before = model.eval()(x_test).detach()

    x = models.example_input("dbn_cnn", batch=32, seed=1)
    inp, _ = _dbn_output(model.train(), x)
    flat = inp.detach().double().transpose(0, 1).flatten(1)
    m = dbn.momentum
    torch.testing.assert_close(dbn.running_mean.double(), m * flat.mean(dim=1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        dbn.running_cov.double(), (1 - m) * torch.eye(8, dtype=torch.float64) + m * _channel_cov(inp),
        atol=1e-6, rtol=1e-5,
    )

    model.eval()
    eval_after = model(x_test).detach()
    assert not torch.allclose(eval_before, eval_after)

    # eval whitening from the running statistics, computed independently
    inp_eval, out_eval = _dbn_output(model, x_test)
    sigma = dbn.running_cov.double() + dbn.eps * torch.eye(8, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(sigma)
    whitening = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    centred = inp_eval.detach().double() - dbn.running_mean.double().view(1, -1, 1, 1)
    expected = torch.einsum("ij,bjhw->bihw", whitening, centred)
    torch.testing.assert_close(out_eval.detach().double(), expected, atol=2e-5, rtol=1e-4)

    # eval does not depend on the batch composition, and does not move the running statistics
    running = dbn.running_cov.clone()
    single = torch.cat([model(x_test[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(single, eval_after, atol=1e-5, rtol=1e-5)
    perm = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(model(x_test[perm]), eval_after[perm], atol=1e-5, rtol=1e-5)
    assert torch.equal(dbn.running_cov, running)


def _assert_gradient_matches_central_differences(loss, weight, entries=3, eps=1e-6):
    """``weight.grad`` (after ``loss().backward()``) against ``(loss(w + eps e_i) - loss(w - eps e_i)) / 2 eps``
    at a few seeded entries, in float64."""
    for index in torch.randperm(weight.numel(), generator=torch.Generator().manual_seed(1))[:entries].tolist():
        assert central_difference(loss, weight.view(-1), index, eps) == pytest.approx(
            weight.grad.view(-1)[index].item(), rel=1e-5, abs=1e-9)


def test_dbn_backward_is_finite():
    model = build("dbn_cnn").train()
    x = models.example_input("dbn_cnn", batch=16)
    model(x).square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.conv1.weight.grad is not None
    # and it is the gradient: float64 central differences through the ZCA whitening (batch statistics in training)
    model = model.double()
    model.zero_grad()
    x = x.double()
    model(x).square().mean().backward()
    _assert_gradient_matches_central_differences(lambda: model(x).square().mean(), model.conv1.weight)


@pytest.mark.parametrize("name", ["dbn_cnn", "gcp_cnn"])
def test_eigh_models_follow_dtype(name):
    single = build(name)
    model = copy.deepcopy(single).double()
    x = models.example_input(name, batch=8).double()
    for training in (True, False):
        y = model.train(training)(x)
        assert y.dtype == torch.float64 and torch.isfinite(y).all()
        # the same function as the float32 model (measured difference: 3e-7)
        torch.testing.assert_close(y, single.train(training)(x.float()).double(), atol=1e-5, rtol=0)
        gm = torch.fx.symbolic_trace(copy.deepcopy(model))
        assert gm(x).dtype == torch.float64


# ----------------------------------------------------------------------------------- covariance pooling


def test_covariance_pooling_square_root_squared_is_covariance_float64():
    torch.manual_seed(0)
    pool = models.CovariancePooling(6).double()
    x = torch.randn(3, 6, 5, 5, dtype=torch.float64)
    root = pool(x)
    assert root.shape == (3, 6, 6) and root.dtype == torch.float64
    flat = x.flatten(2)
    centred = flat - flat.mean(dim=2, keepdim=True)
    cov = centred @ centred.transpose(1, 2) / flat.shape[2]
    sigma = cov + pool.eps * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(root @ root, sigma, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(root, root.transpose(1, 2), atol=1e-12, rtol=0)
    assert torch.linalg.eigvalsh(root).min() > 0  # the principal (PSD) root


def test_gcp_model_cov_pool_root_matches_its_input_covariance():
    model = build("gcp_cnn").double().eval()
    captured = {}
    model.cov_pool.register_forward_hook(lambda m, args, out: captured.update(inp=args[0], out=out))
    y = model(models.example_input("gcp_cnn", batch=4).double())
    assert y.shape == (4, 10)
    inp, root = captured["inp"], captured["out"]
    flat = inp.flatten(2)
    centred = flat - flat.mean(dim=2, keepdim=True)
    cov = centred @ centred.transpose(1, 2) / flat.shape[2]
    d = model.cov_pool.num_features
    torch.testing.assert_close(root @ root, cov + model.cov_pool.eps * torch.eye(d, dtype=torch.float64))
    assert model.fc.in_features == d * (d + 1) // 2
    triu = model.triu(root)
    rows, cols = torch.triu_indices(d, d)
    assert torch.equal(triu, root[:, rows, cols])


def test_gcp_backward_is_finite():
    model = build("gcp_cnn").train()
    model(models.example_input("gcp_cnn", batch=8)).square().mean().backward()
    assert torch.isfinite(model.conv_last.weight.grad).all()
    # and it is the gradient: float64 central differences through the covariance square root
    model = model.double()
    model.zero_grad()
    x = models.example_input("gcp_cnn", batch=8).double()
    model(x).square().mean().backward()
    _assert_gradient_matches_central_differences(lambda: model(x).square().mean(), model.conv_last.weight)


# ------------------------------------------------------------------------------------------ argument checks


@pytest.fixture
def errors():
    """orthofx.errors: models.py looks its exception types up in sys.modules when it raises (it imports nothing of
    orthofx), so importing them here makes the standalone module raise them, as ``orthofx.models`` does."""
    import orthofx.errors

    return orthofx.errors


BAD_CONSTRUCTOR_ARGS = [
    # (constructor, kwargs, the argument the message must name)
    ("resnet18", {"width": 0}, "width"),
    ("resnet18", {"num_classes": 0}, "num_classes"),
    ("resnet50", {"num_classes": True}, "num_classes"),
    ("resnet50", {"width": 2.0}, "width"),
    ("vgg11", {"num_classes": -1}, "num_classes"),
    ("small_cnn", {"num_classes": 10.0}, "num_classes"),
    ("dbn_cnn", {"width": 4, "eps": 0.0}, "eps"),
    ("dbn_cnn", {"width": 4, "eps": -1e-3}, "eps"),
    ("dbn_cnn", {"width": 4, "eps": float("nan")}, "eps"),
    ("dbn_cnn", {"width": 4, "momentum": 1.5}, "momentum"),
    ("dbn_cnn", {"width": 4, "momentum": -0.1}, "momentum"),
    ("dbn_cnn", {"width": 4, "num_classes": 0}, "num_classes"),
    ("gcp_cnn", {"width": 4, "dim": 0}, "dim"),
    ("gcp_cnn", {"width": 4, "dim": 4, "eps": -1e-5}, "eps"),
    ("gcp_cnn", {"width": 4, "dim": 4, "eps": float("inf")}, "eps"),
    ("gcp_cnn", {"width": 4, "dim": 4, "num_classes": False}, "num_classes"),
    ("deep_mlp", {"depth": 2, "width": 4, "activation": "gelu"}, "activation"),
    ("deep_mlp", {"depth": 2, "width": 4, "activation": ["tanh"]}, "activation"),
    ("deep_mlp", {"depth": 2, "width": 4, "in_features": 0}, "in_features"),
    ("deep_mlp", {"depth": 0}, "depth"),
    ("deep_cnn", {"depth": 2, "width": 4, "activation": "Relu"}, "activation"),
    ("deep_cnn", {"depth": 2, "width": 4, "in_channels": "3"}, "in_channels"),
    ("deep_cnn", {"depth": 2, "width": 4, "num_classes": 0}, "num_classes"),
    ("deep_linear", {"depth": 2, "out_features": 0}, "out_features"),
    ("deep_linear", {"depth": 2, "in_features": -4}, "in_features"),
    ("DecorrelatedBatchNorm2d", {"num_features": 4, "momentum": "0.1"}, "momentum"),
    ("DecorrelatedBatchNorm2d", {"num_features": 4, "affine": None}, "affine"),
    ("DecorrelatedBatchNorm2d", {"num_features": 0}, "num_features"),
    ("CovariancePooling", {"num_features": 4, "eps": -1.0}, "eps"),
    ("UpperTriangle", {"n": 0}, "n"),
    ("ResNet", {"block": "BasicBlock", "layers": [2, 2, 2, 2]}, "block"),
    ("ResNet", {"block": models.BasicBlock, "layers": [2, 2]}, "layers"),
    ("ResNet", {"block": models.BasicBlock, "layers": [2, 2, 2, 2], "in_channels": 0}, "in_channels"),
]


@pytest.mark.parametrize("target, kwargs, argument", BAD_CONSTRUCTOR_ARGS,
                         ids=[f"{t}-{a}-{i}" for i, (t, _, a) in enumerate(BAD_CONSTRUCTOR_ARGS)])
def test_bad_constructor_arguments_raise_argument_error(errors, target, kwargs, argument):
    if target in models.names():
        build_it, owner = (lambda: models.get(target, **kwargs)), type(models.get(target, **SMALL.get(target, {})))
    else:
        build_it, owner = (lambda: getattr(models, target)(**kwargs)), getattr(models, target)
    with pytest.raises(errors.ArgumentError) as info:
        build_it()
    assert isinstance(info.value, ValueError)  # existing ``except ValueError`` code keeps working
    message = str(info.value)
    assert message.startswith(f"{owner.__name__}: {argument} ") or message.startswith(f"{owner.__name__}: unknown "
                                                                                     f"{argument} ")
    if argument == "activation":
        assert "'abs', 'relu', 'tanh'" in message  # the allowed values
    assert repr(kwargs[argument]) in message  # the value given


def test_valid_edge_arguments_still_build():
    assert models.DecorrelatedBatchNorm2d(4, eps=1, momentum=0, affine=0).affine is False
    assert models.DecorrelatedBatchNorm2d(4, momentum=1).momentum == 1.0
    assert models.CovariancePooling(4, eps=0).eps == 0.0
    assert build("gcp_cnn", eps=0.0).cov_pool.eps == 0.0
    model = models.ResNet(models.BasicBlock, [1, 0, 1, 0], width=2, num_classes=3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_unknown_model_name_is_an_argument_error(errors):
    with pytest.raises(errors.ArgumentError, match="did you mean 'resnet18'"):
        models.get("resnt18")
    with pytest.raises(errors.ArgumentError, match="batch must be a positive integer"):
        models.example_input("small_cnn", batch=0)


BAD_FORWARD_INPUTS = [
    # (layer, training, input shape or a tensor, a fragment of the message)
    ("dbn", True, (2, 3, 5, 5), "(batch, 4, H, W), got shape (2, 3, 5, 5)"),
    ("dbn", False, (2, 3, 5, 5), "(batch, 4, H, W), got shape (2, 3, 5, 5)"),
    ("dbn", True, (4, 5, 5), "(batch, 4, H, W), got shape (4, 5, 5)"),
    ("dbn", True, (1, 4, 1, 1), "more than one value per channel"),
    ("dbn", True, (0, 4, 3, 3), "more than one value per channel"),
    ("dbn", True, torch.zeros(2, 4, 3, 3, dtype=torch.long), "real floating-point input, got dtype torch.int64"),
    ("cov_pool", True, (2, 5, 3, 3), "(batch, 4, H, W), got shape (2, 5, 3, 3)"),
    ("cov_pool", False, (2, 4), "(batch, 4, H, W), got shape (2, 4)"),
    ("cov_pool", True, (2, 4, 0, 3), "at least one position"),
    ("triu", True, (2, 5, 5), "(batch, 4, 4), got shape (2, 5, 5)"),
    ("triu", True, (2, 4, 5), "(batch, 4, 4), got shape (2, 4, 5)"),
    ("triu", True, (4, 4), "(batch, 4, 4), got shape (4, 4)"),
    ("triu", True, (2, 1, 4, 4), "(batch, 4, 4), got shape (2, 1, 4, 4)"),
]


@pytest.mark.parametrize("layer, training, given, fragment", BAD_FORWARD_INPUTS,
                         ids=[f"{l}-{i}" for i, (l, *_) in enumerate(BAD_FORWARD_INPUTS)])
def test_bad_forward_inputs_raise_layer_argument_error(errors, layer, training, given, fragment):
    module = {"dbn": lambda: models.DecorrelatedBatchNorm2d(4), "cov_pool": lambda: models.CovariancePooling(4),
              "triu": lambda: models.UpperTriangle(4)}[layer]().train(training)
    x = given if isinstance(given, torch.Tensor) else torch.randn(given)
    state = copy.deepcopy(module.state_dict())
    with pytest.raises(errors.LayerArgumentError) as info:
        module(x)
    message = str(info.value)
    assert fragment in message
    assert message.startswith(type(module).__name__)  # names the layer
    for key, value in module.state_dict().items():  # a refused input leaves the running statistics alone
        assert torch.equal(value, state[key]), key


def test_dbn_single_value_per_channel_is_fine_in_eval():
    layer = models.DecorrelatedBatchNorm2d(4).eval()
    x = torch.randn(1, 4, 1, 1)
    y = layer(x)
    assert torch.isfinite(y).all()
    # eval whitens with the initial running statistics (mean 0, covariance I): (I + eps I)^(-1/2) x
    torch.testing.assert_close(y, x / math.sqrt(1 + layer.eps), atol=1e-6, rtol=1e-6)


def test_argument_errors_are_value_errors_without_orthofx(tmp_path):
    """A copy of models.py used without orthofx raises plain ValueError (it never imports orthofx)."""
    script = tmp_path / "standalone.py"
    script.write_text(
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('copied_models', {str(MODELS_PATH)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "for build in (lambda: module.DeepMLP(num_classes=0), lambda: module.UpperTriangle(2)(module.torch.ones(3)),\n"
        "              lambda: module.get('nope')):\n"
        "    try:\n"
        "        build()\n"
        "    except Exception as exc:\n"
        "        assert type(exc) is ValueError, type(exc)\n"
        "    else:\n"
        "        raise AssertionError('no error')\n"
        "assert not any(name == 'orthofx' or name.startswith('orthofx.') for name in sys.modules)\n"
        "print('ok')\n")
    import subprocess

    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# ---------------------------------------------------------------------------------------- independence


def test_models_source_imports_nothing_of_orthofx():
    tree = ast.parse(MODELS_PATH.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in models.py"
            assert not (node.module or "").split(".")[0] == "orthofx", node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name.split(".")[0] != "orthofx", alias.name
    for value in vars(models).values():
        module_name = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", "")
        assert not str(module_name).startswith("orthofx"), module_name
    assert "import orthofx" not in MODELS_PATH.read_text()


def test_package_module_is_this_file():
    import orthofx.models as package_models

    assert pathlib.Path(package_models.__file__).resolve() == MODELS_PATH
    assert package_models.names() == models.names()


# ------------------------------------------------------------------------------- audit: dtypes, mixed precision


def _zca_reference(inp: torch.Tensor, eps: float) -> torch.Tensor:
    """ZCA whitening of (B, C, H, W) with the batch's own statistics, in float64 (a dense reference)."""
    x = inp.detach().double()
    flat = x.transpose(0, 1).flatten(1)
    centred = flat - flat.mean(dim=1, keepdim=True)
    sigma = centred @ centred.T / flat.shape[1] + eps * torch.eye(flat.shape[0], dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(sigma)
    white = evecs @ torch.diag(evals.rsqrt()) @ evecs.T @ centred
    return white.reshape(x.shape[1], x.shape[0], *x.shape[2:]).transpose(0, 1)


def test_dbn_trains_on_an_input_of_another_dtype_than_its_buffers():
    """Under torch.autocast the conv feeding DBN returns bfloat16 while the running buffers stay float32; a
    float64 input into a float32 layer is the same case. Training used to fail inside ``lerp_`` (raw RuntimeError
    'expected dtype float for `end`') while eval accepted the input; the running statistics keep their dtype."""
    torch.manual_seed(0)
    layer = models.DecorrelatedBatchNorm2d(4, affine=False).train()
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    y = layer(x)
    assert y.dtype == torch.float64 and layer.running_cov.dtype == torch.float32
    torch.testing.assert_close(y, _zca_reference(x, layer.eps), atol=1e-6, rtol=1e-6)
    m = layer.momentum
    flat = x.transpose(0, 1).flatten(1)
    torch.testing.assert_close(layer.running_mean.double(), m * flat.mean(dim=1), atol=1e-6, rtol=0)
    centred = flat - flat.mean(dim=1, keepdim=True)
    expected_cov = (1 - m) * torch.eye(4, dtype=torch.float64) + m * centred @ centred.T / flat.shape[1]
    torch.testing.assert_close(layer.running_cov.double(), expected_cov, atol=1e-6, rtol=0)

    model = build("dbn_cnn").train()
    reference = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(models.example_input("dbn_cnn", batch=8))
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    # the float32 output to bfloat16's precision (measured: 0.5% of its scale)
    expected = reference(models.example_input("dbn_cnn", batch=8))
    torch.testing.assert_close(out.float(), expected, atol=2e-2 * float(expected.abs().max()), rtol=0)
    assert model.dbn.running_cov.dtype == torch.float32 and not torch.equal(model.dbn.running_cov, torch.eye(8))


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_covariance_layers_run_in_half_precision(half):
    """``model.to(torch.bfloat16)`` works for every built-in model; DBN and covariance pooling used to fail with a
    raw NotImplementedError ('linalg_eigh_cpu' not implemented for 'BFloat16'). The eigendecomposition runs in
    float32 and the result is rounded back; compared with float64 references computed from the same inputs."""
    torch.manual_seed(0)
    x = torch.randn(8, 4, 5, 5).to(half)
    dbn = models.DecorrelatedBatchNorm2d(4, affine=False).to(half)
    for training in (True, False):
        y = dbn.train(training)(x)
        assert y.dtype == half
        if training:
            torch.testing.assert_close(y.double(), _zca_reference(x, dbn.eps), atol=0.05, rtol=0.05)
    pool = models.CovariancePooling(4).to(half)
    root = pool(x)
    assert root.dtype == half
    flat = x.double().flatten(2)
    centred = flat - flat.mean(dim=2, keepdim=True)
    sigma = centred @ centred.transpose(1, 2) / flat.shape[2] + pool.eps * torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(root.double() @ root.double(), sigma, atol=0.05, rtol=0.05)
    for name in ("dbn_cnn", "gcp_cnn"):
        single = build(name)
        model = copy.deepcopy(single).to(half)
        x = models.example_input(name, batch=4)
        for training in (True, False):  # eval after train: both ran one training step on the same batch
            out = model.train(training)(x.to(half))
            assert out.dtype == half and torch.isfinite(out).all()
            # the float32 model's output to the half type's precision (measured: 0.5% for bfloat16, 0.05% float16)
            expected = single.train(training)(x)
            fraction = 2e-2 if half == torch.bfloat16 else 4e-3
            torch.testing.assert_close(out.float(), expected, atol=fraction * float(expected.abs().max()), rtol=0,
                                       msg=lambda m: f"{name} training={training}: {m}")
        gm = torch.fx.symbolic_trace(copy.deepcopy(model).train())
        assert gm(models.example_input(name, batch=4).to(half)).dtype == half


def test_integer_like_arguments_are_accepted(errors):
    """numpy and torch integers are positive integers (as torch.nn layers accept them): ``width=np.int64(4)`` was
    refused with 'width must be a positive integer (>= 1), got np.int64(4)'."""
    np = pytest.importorskip("numpy")
    model = models.get("small_cnn", width=np.int64(4), num_classes=torch.tensor(3))
    assert model.conv1.out_channels == 4 and model.fc.out_features == 3
    assert type(model.fc.out_features) is int
    assert models.example_input("small_cnn", batch=np.int32(3)).shape == (3, 1, 8, 8)
    with pytest.raises(errors.ArgumentError, match="width must be a positive integer"):
        models.get("small_cnn", width=torch.tensor(4.0))
    resnet = models.ResNet(models.BasicBlock, np.array([1, 0, 1, 0]), width=4)  # refused before
    assert [len(stage) for stage in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)] == [1, 0, 1, 0]
    for bad in (np.array([1.5, 0, 1, 0]), [1, 0, True, 0], [1, -1, 1, 0]):
        with pytest.raises(errors.ArgumentError, match="layers must be 4 integers"):
            models.ResNet(models.BasicBlock, bad, width=4)


@pytest.mark.parametrize("seed", [1.7, "x", True, None])
def test_example_input_seed_must_be_an_integer(errors, seed):
    """seed=1.7 was silently truncated to 1 and seed='x' raised a raw int() ValueError."""
    with pytest.raises(errors.ArgumentError, match="seed must be an integer"):
        models.example_input("small_cnn", seed=seed)
