"""A user's process-wide torch settings around orthofx calls (session 41): ``torch.set_default_dtype``,
``torch.set_default_device`` ('meta' stands in for 'cuda' on a CPU-only machine: both send factory calls without a
device elsewhere than the model), transform / freeze / load under ``no_grad`` / ``inference_mode`` /
``set_grad_enabled(False)``, ``use_deterministic_algorithms`` and ``detect_anomaly``.

The reference of each test is the same call made without the setting (same seeds): orthofx's results must not
depend on it. Every setting is put back in a ``finally`` (the fixtures below), errors included.

Measured before the fixes (torch 2.13 CPU), with ``torch.set_default_device('meta')`` and a CPU model:
``transform`` raised TransformError wrapping ``aten::geqrf ... Meta tensors`` (orthogonal, isometric),
``Tensor.item() cannot be called on meta tensors`` (convnorm) and ``Cannot copy out of meta tensor`` (svd);
``orthofx.load`` of an isometric .pt the same; ``layer.weight`` of a cayley_fft layer and ``from_conv`` /
``isometric_init.orthogonal_`` outside transform failed alike. ``orthofx.freeze`` under ``inference_mode``
returned inference tensors: fine-tuning the frozen model raised "Inference tensors cannot be saved for backward".
The default dtype (float64 or float16 set before or after building a float32 model), no_grad /
set_grad_enabled(False), deterministic algorithms and anomaly detection changed nothing (bitwise): kept here.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import orthofx
from orthofx.nn import stiefel
from orthofx.nn.orthogonal import OrthogonalConv2d
from orthofx.passes import isometric_init

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]


@contextlib.contextmanager
def default_device(device):
    """``torch.set_default_device(device)`` for the block; none set afterwards (torch's own default)."""
    torch.set_default_device(device)
    try:
        yield
    finally:
        torch.set_default_device(None)


@contextlib.contextmanager
def default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@pytest.fixture(autouse=True)
def _settings_put_back():
    """Whatever a test does, the next one starts from torch's defaults (and the test fails if it left any)."""
    before = (torch.get_default_dtype(), torch.get_default_device(), torch.are_deterministic_algorithms_enabled(),
              torch.is_anomaly_enabled(), torch.is_grad_enabled(), torch.is_inference_mode_enabled())
    yield
    after = (torch.get_default_dtype(), torch.get_default_device(), torch.are_deterministic_algorithms_enabled(),
             torch.is_anomaly_enabled(), torch.is_grad_enabled(), torch.is_inference_mode_enabled())
    torch.set_default_dtype(before[0])
    torch.set_default_device(None)
    torch.use_deterministic_algorithms(before[2])
    torch.autograd.set_detect_anomaly(before[3])
    torch.set_grad_enabled(before[4])
    assert after == before


def _conv() -> nn.Module:
    """Two top-level Sequential blocks (the jacobian preset's sites), 3x3 convs (orthogonal layers with projector
    blocks, ConvNorm filters) and a strided one."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Tanh()),
        nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU()),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 5))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh()),
                         nn.Sequential(nn.Linear(8, 4)))


def _input(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(3))


CASES = {"conv": (_conv, (2, 3, 8, 8)), "mlp": (_mlp, (4, 6))}


def _transformed(kind: str, preset: str, setting=contextlib.nullcontext, model: nn.Module | None = None):
    """``transform`` under ``setting`` on a fixed global seed (orthogonal layers draw from it)."""
    build, shape = CASES[kind]
    model = build() if model is None else model
    x = _input(*shape)
    torch.manual_seed(7)
    with setting():
        gm = orthofx.transform(model, preset, example_inputs=(x,))
    return model, gm, x


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        # equal_nan: a condition monitor's history is NaN where not yet written
        torch.testing.assert_close(sb[key], sa[key], atol=0, rtol=0, equal_nan=True, msg=key)


def _train(gm: nn.Module, x: torch.Tensor, steps: int = 2) -> list[torch.Tensor]:
    """``steps`` SGD steps with the penalty and the attached hooks, on a fixed seed (Jacobian probes draw their
    vectors from the global stream); the losses."""
    torch.manual_seed(11)
    optimizer = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    orthofx.attach(optimizer, gm)
    gm.train()
    losses = []
    for _ in range(steps):
        loss = gm(x).square().mean() + orthofx.penalty(gm)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


# ------------------------------------------------------------------------------------------ default device


@pytest.mark.parametrize("kind,preset", [("conv", "orthogonal"), ("conv", "isometric"), ("conv", "convnorm"),
                                         ("mlp", "isometric")])
def test_transform_under_a_meta_default_device_builds_the_same_cpu_model(kind, preset):
    """A CPU model transformed while the user's default device is 'meta': the passes' scratch tensors and Haar
    draws went to meta (TransformError: geqrf / .item() / copy out of meta); now the same weights bit for bit as
    without the setting, on the CPU, the global random stream left where it is left without it, and the user's
    default device still set afterwards."""
    _, reference, x = _transformed(kind, preset)
    after_reference = torch.rand(3)

    @contextlib.contextmanager
    def meta_default():
        with default_device("meta"):
            yield
            assert torch.get_default_device().type == "meta"

    _, gm, _ = _transformed(kind, preset, meta_default)
    after = torch.rand(3)
    _assert_same_state(reference, gm)
    assert torch.equal(after, after_reference)
    torch.testing.assert_close(gm.eval()(x), reference.eval()(x), atol=0, rtol=0)


def test_svd_preset_under_a_meta_default_device():
    """The stable-decomposition pass's condition monitor was built on meta and moved to the CPU ('Cannot copy out
    of meta tensor'); now the same monitor and outputs as without the setting."""
    model = orthofx.models.get("gcp_cnn", width=4)
    x = orthofx.models.example_input("gcp_cnn")
    reference = orthofx.transform(copy.deepcopy(model), "svd", example_inputs=(x,))
    with default_device("meta"):
        gm = orthofx.transform(copy.deepcopy(model), "svd", example_inputs=(x,))
    _assert_same_state(reference, gm)
    with torch.no_grad():
        torch.testing.assert_close(gm.eval()(x), reference.eval()(x), atol=0, rtol=0)


@pytest.mark.parametrize("kind,preset", [("conv", "orthogonal"), ("mlp", "isometric")])
def test_journey_under_a_meta_default_device(kind, preset, tmp_path):
    """The whole journey (transform, training with penalty and attach, freeze, export, load) with the default
    device 'meta' from the start: the same losses, weights and outputs as without it, the orthogonal layers still
    orthogonal (dense float64 singular values of the conv operator), and load (which replays isometric_init's
    draws) no longer fails."""
    def journey(setting=contextlib.nullcontext):
        fresh = CASES[kind][0]()  # the user's models are built on the CPU, then the setting holds throughout
        _, gm, x = _transformed(kind, preset, setting)
        with setting():
            return _rest(gm, x, fresh)

    def _rest(gm, x, fresh):
        losses = _train(gm, x)
        gm.eval()
        with torch.no_grad():
            out = gm(x)
            frozen = orthofx.freeze(gm)(x)
        orthofx.export(gm, tmp_path / f"{preset}.pt", example_inputs=(x,))
        loaded = orthofx.load(fresh, tmp_path / f"{preset}.pt", example_inputs=(x,)).eval()
        with torch.no_grad():
            restored = loaded(x)
        return gm, losses, out, frozen, restored

    reference = journey()
    result = journey(lambda: default_device("meta"))
    _assert_same_state(reference[0], result[0])
    for a, b in zip(reference[1:], result[1:]):
        torch.testing.assert_close(b, a, atol=0, rtol=0)
    torch.testing.assert_close(result[3], result[2], atol=1e-5, rtol=0)
    torch.testing.assert_close(result[4], result[2], atol=0, rtol=0)
    if preset == "orthogonal":
        layer = result[0].get_submodule("0.2")
        assert isinstance(layer, OrthogonalConv2d)
        sv = orthofx.metrics.conv_singular_values(layer.weight.detach().double(), 8)
        torch.testing.assert_close(sv, torch.ones_like(sv), atol=1e-5, rtol=0)


def test_cayley_fft_weight_under_a_meta_default_device():
    """``layer.weight`` of a CPU cayley_fft layer indexed its kernel with tap indices made on the default device:
    under 'meta' they had no values to copy to the CPU. Now the same kernel as without the setting."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    torch.manual_seed(1)
    layer = OrthogonalConv2d.from_conv(conv, method="cayley_fft", input_size=8, fit_steps=2)
    expected = layer.weight.detach()
    torch.manual_seed(1)
    with default_device("meta"):
        weight = layer.weight.detach()
        again = OrthogonalConv2d.from_conv(conv, method="cayley_fft", input_size=8, fit_steps=2)
    assert weight.device.type == "cpu" and torch.equal(weight, expected)
    torch.testing.assert_close(again.weight.detach(), expected, atol=0, rtol=0)


def test_from_conv_and_isometric_fill_draw_on_the_cpu_whatever_the_default_device():
    """Outside transform: the projector blocks of ``from_conv`` and ``isometric_init.orthogonal_`` drew from the
    global stream on the default device (geqrf on meta; on 'cuda' another stream than the seed's). Now the same
    weights, bit for bit, as with torch's default (the draw of a seed does not depend on it)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3, padding=1)
    weights = []
    for setting in (contextlib.nullcontext(), default_device("meta")):
        with setting:
            torch.manual_seed(5)
            layer = OrthogonalConv2d.from_conv(conv)
            w = torch.empty(6, 10, device="cpu")
            isometric_init.orthogonal_(w, 2.0)
        weights.append((_state(layer), w))
    (a, wa), (b, wb) = weights
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(wa, wb)
    torch.testing.assert_close(wb @ wb.T, 4 * torch.eye(6), atol=1e-5, rtol=0)  # rows 2 x orthonormal


def test_random_orthonormal_without_a_device_under_a_meta_default_is_a_meta_tensor():
    """``device=None`` means torch's default device: under 'meta' the draw had no values (geqrf raised
    NotImplementedError), while ``device='meta'`` returned a meta tensor. Both now return the deferred meta
    tensor; an explicit device keeps its draw."""
    with default_device("meta"):
        q = stiefel.random_orthonormal(5, 3, 2, dtype=torch.float64)
        cpu = stiefel.random_orthonormal(5, 3, generator=torch.Generator().manual_seed(0), device="cpu")
    assert q.device.type == "meta" and q.shape == (2, 5, 3) and q.dtype == torch.float64
    expected = stiefel.random_orthonormal(5, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cpu, expected)


def test_transform_under_an_explicit_cpu_default_device_and_a_device_context():
    """``set_default_device('cpu')`` (a function mode on the stack) and ``with torch.device('meta')`` (a
    context, not the global setting) give the model torch's default gives; the context is the user's again
    after the call."""
    _, reference, _ = _transformed("conv", "orthogonal")
    _, gm, _ = _transformed("conv", "orthogonal", lambda: default_device("cpu"))
    _assert_same_state(reference, gm)

    @contextlib.contextmanager
    def meta_context():
        with torch.device("meta"):
            yield
            assert torch.empty(1).device.type == "meta"

    _, gm, _ = _transformed("conv", "orthogonal", meta_context)
    _assert_same_state(reference, gm)


def test_report_under_a_meta_default_device():
    _, gm, _ = _transformed("conv", "lorth")
    expected = str(orthofx.report(gm))
    with default_device("meta"):
        assert str(orthofx.report(gm)) == expected


def test_convnorm_training_under_a_meta_default_device():
    _, gm, x = _transformed("conv", "convnorm")
    reference = copy.deepcopy(gm)
    expected = _train(reference, x)
    with default_device("meta"):
        losses = _train(gm, x)
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ default dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("kind,preset", [("conv", "orthogonal"), ("conv", "convnorm"), ("conv", "jacobian"),
                                         ("mlp", "isometric")])
def test_default_dtype_leaves_a_float32_model_float32(kind, preset, dtype):
    """Another default dtype, set before the model is built (then ``.float()``) and while orthofx runs: every
    parameter and buffer orthofx makes is float32 (no float64 weight slipped into a float32 model), the weights
    and the training losses equal those under float32 (bitwise), and the loss stays float32."""
    build, _ = CASES[kind]
    with default_dtype(dtype):
        model = build().float()
    _, reference, x = _transformed(kind, preset, model=copy.deepcopy(model))
    expected = _train(reference, x)
    _, gm, _ = _transformed(kind, preset, lambda: default_dtype(dtype), model=copy.deepcopy(model))
    with default_dtype(dtype):
        losses = _train(gm, x)
    created = [n for n, t in (*gm.named_parameters(), *gm.named_buffers())
               if t.is_floating_point() and t.dtype != torch.float32]
    assert not created
    _assert_same_state(reference, gm)
    assert all(loss.dtype == torch.float32 for loss in losses)
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ grad modes


def _grad_disabled():
    return torch.set_grad_enabled(False)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode, _grad_disabled])
@pytest.mark.parametrize("kind,preset", [("conv", "convnorm"), ("conv", "isometric"), ("mlp", "jacobian")])
def test_transform_under_a_grad_mode_trains_as_outside(kind, preset, mode):
    """transform under no_grad / inference_mode / set_grad_enabled(False): ordinary parameters (no inference
    tensors), requires_grad as outside, and the same training (losses and weights, bitwise)."""
    _, reference, x = _transformed(kind, preset)
    _, gm, _ = _transformed(kind, preset, mode)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert not any(t.is_inference() for t in (*gm.parameters(), *gm.buffers()))
    assert [(n, p.requires_grad) for n, p in gm.named_parameters()] == \
        [(n, p.requires_grad) for n, p in reference.named_parameters()]
    expected, losses = _train(reference, x), _train(gm, x)
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected), atol=0, rtol=0)
    _assert_same_state(reference, gm)


@pytest.mark.parametrize("preset", ["orthogonal", "convnorm"])
def test_freeze_and_load_under_inference_mode_give_trainable_models(preset, tmp_path):
    """``freeze`` inside ``torch.inference_mode()`` copied the model into inference tensors: fine-tuning the
    frozen model raised "Inference tensors cannot be saved for backward"; so did ``load`` of a float64 .pt
    (float64 example inputs, a float32 model), whose own float64 copy of the model was made there. Now both train
    as those made outside (gradients bitwise)."""
    model, gm, x = _transformed("conv", preset)
    orthofx.export(copy.deepcopy(gm).double(), tmp_path / "m.pt", example_inputs=(x.double(),))
    made = {}
    for where in ("outside", "inside"):
        with torch.inference_mode() if where == "inside" else contextlib.nullcontext():
            made[where] = (orthofx.freeze(gm), orthofx.load(copy.deepcopy(model), tmp_path / "m.pt",
                                                           example_inputs=(x.double(),)))
    for outside, inside in zip(made["outside"], made["inside"]):
        assert not any(t.is_inference() for t in (*inside.parameters(), *inside.buffers()))
        for net in (outside, inside):
            net.train()
            net(x.to(next(net.parameters()).dtype)).square().sum().backward()
        for (name, a), (_, b) in zip(outside.named_parameters(), inside.named_parameters()):
            assert b.grad is not None and torch.equal(a.grad, b.grad), name


# ------------------------------------------------------------------------------------------ determinism, anomaly


@pytest.mark.parametrize("kind,preset", [("conv", "orthogonal"), ("conv", "convnorm"), ("conv", "jacobian"),
                                         ("mlp", "lorth")])
def test_deterministic_algorithms_and_anomaly_detection(kind, preset):
    """``use_deterministic_algorithms(True)`` with anomaly detection on (CPU): transform and training run (no
    op orthofx uses lacks a deterministic CPU kernel, no backward makes a NaN) and give the same weights and
    losses as without them, bitwise."""
    _, reference, x = _transformed(kind, preset)
    expected = _train(reference, x)
    torch.use_deterministic_algorithms(True)
    torch.autograd.set_detect_anomaly(True)
    try:
        _, gm, _ = _transformed(kind, preset)
        losses = _train(gm, x)
        frozen = orthofx.freeze(gm)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.autograd.set_detect_anomaly(False)
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected), atol=0, rtol=0)
    _assert_same_state(reference, gm)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), gm.eval()(x), atol=1e-5, rtol=0)
