"""End-to-end journeys of models that are not plain float32 contiguous (session 39): float64, bfloat16 / float16,
float32 under bfloat16 autocast, channels_last, example inputs under inference_mode / no_grad, frozen layers.
Each journey: transform -> report -> explain -> 3 training steps (penalty, attach) -> eval -> freeze -> .pt export
-> orthofx.load, against references written here (the untransformed model, float64 singular values, torch's own
layers). About 1,500 such journeys were fuzzed (6 presets, 17 models, 18 dtype / format / grad-mode variants).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import orthofx
from orthofx import metrics
from orthofx.nn.orthogonal import OrthogonalConv2d, OrthogonalLinear

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


def _conv_stack() -> nn.Module:
    """Dilated, grouped and strided convs in two top-level Sequential blocks (the jacobian preset's sites)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(4, 8, 3, padding=2, dilation=2), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Tanh()),
        nn.Sequential(nn.Conv2d(8, 16, 2, stride=2), nn.ReLU(), nn.Conv2d(16, 16, 1)),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 5))


def _input(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _journey(model: nn.Module, preset: str, x: torch.Tensor, tmp_path, autocast: bool = False):
    """The whole journey; returns the transformed model and its eval, frozen and loaded outputs. ``model`` is
    deep-copied for load (the file replays the policy on the original model)."""
    original = copy.deepcopy(model)
    gm = orthofx.transform(model, preset, example_inputs=(x,))
    assert str(orthofx.report(gm)) and str(orthofx.explain(model, preset, example_inputs=(x,)))
    optimizer = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    orthofx.attach(optimizer, gm)
    gm.train()
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = gm(x).float().square().mean() + orthofx.penalty(gm)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    gm.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = gm(x)
        frozen = orthofx.freeze(gm).eval()(x)
    orthofx.export(gm, tmp_path / "model.pt", example_inputs=(x,))
    loaded = orthofx.load(original, tmp_path / "model.pt", example_inputs=(x,)).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        restored = loaded(x)
    assert torch.isfinite(out).all()
    return gm, out, frozen, restored


# ------------------------------------------------------------------------------------------------ the fix


class _HalfStatistic(nn.Module):
    """A mixed-precision model: its forward branches on the dtype (a float32 statistic for half-precision
    activations), which symbolic tracing cannot follow, so orthofx captures it with torch.export, and it builds a
    constant in the input's dtype, which such a graph holds."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.fc1(x)
        stats = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
        h = h / stats.norm(dim=-1, keepdim=True).to(h.dtype)
        return self.fc2(h + torch.full((6,), 0.5, dtype=x.dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_load_replays_a_torch_export_capture_in_its_dtype(dtype, tmp_path):
    """A model transformed in bfloat16 (float16 too) or float64 and captured with torch.export was replayed by load
    in the float32 model's dtype (bfloat16: always; float64: with float32 example inputs) and converted afterwards:
    its graph held float32 (a constant, torch.export's input dtype checks), and the restored model failed on the
    saved model's own inputs ("mat1 and mat2 must have the same dtype, but got Float and BFloat16", "Tensor dtype
    mismatch! Expected: Float, Got: double"). The file now records the capture's input dtype and load replays it
    there. Reference: the untransformed model."""
    torch.manual_seed(0)
    model = _HalfStatistic().to(dtype)
    x = _input(4, 6).to(dtype)
    gm = orthofx.transform(model, "lorth", example_inputs=(x,))
    assert orthofx.manifest_of(gm).capture.mode == "export"
    orthofx.export(gm, tmp_path / "model.pt", example_inputs=(x,))
    with torch.no_grad():
        reference = model(x)
    for inputs in (x, x.float()):  # the saved model's inputs, or float32 ones as the float32 model takes
        loaded = orthofx.load(_HalfStatistic(), tmp_path / "model.pt", example_inputs=(inputs,))
        with torch.no_grad():
            out = loaded(x)
        assert out.dtype == dtype and all(p.dtype == dtype for p in loaded.parameters())
        torch.testing.assert_close(out, reference, atol=0, rtol=0)  # lorth leaves the forward as it is


def test_load_of_a_float32_export_capture_converted_to_bfloat16_is_unchanged(tmp_path):
    """The other route, kept: a model transformed in float32 and converted after (its graph was captured in float32)
    is replayed in float32 and converted, as the saved one was. Reference: the saved model's output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    x = _input(4, 6)
    policy = {"capture": {"mode": "export"}, "rules": [{"match": {"type": "Linear"}, "apply": "orth_regularizer"}]}
    gm = orthofx.transform(model, policy, example_inputs=(x,)).to(torch.bfloat16)
    orthofx.export(gm, tmp_path / "model.pt", example_inputs=(x.bfloat16(),))
    loaded = orthofx.load(model, tmp_path / "model.pt", example_inputs=(x.bfloat16(),))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x.bfloat16()), gm(x.bfloat16()), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ journeys


def test_float64_orthogonal_journey_is_float64_accurate(tmp_path):
    """A float64 model stays float64 everywhere and its hard layers are orthogonal to float64 rounding (1e-13,
    not float32's 1e-6); eval, freeze and load agree to 1e-12."""
    model, x = _conv_stack().double(), _input(2, 4, 8, 8).double()
    gm, out, frozen, restored = _journey(model, "orthogonal", x, tmp_path)
    assert out.dtype == frozen.dtype == restored.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in gm.parameters())
    hard = [(n, m) for n, m in gm.named_modules() if isinstance(m, (OrthogonalConv2d, OrthogonalLinear))]
    assert len(hard) == 5
    for name, layer in hard:
        w = layer.weight.detach()
        sv = (metrics.linear_singular_values(w) if w.dim() == 2 else
              metrics.conv_singular_values(w, 8, stride=layer.stride[0], groups=layer.groups))
        assert float((sv - 1).abs().max()) < 1e-13, name
    torch.testing.assert_close(frozen, out, atol=1e-12, rtol=0)
    torch.testing.assert_close(restored, out, atol=1e-12, rtol=0)


def test_bfloat16_lorth_journey_keeps_bfloat16(tmp_path):
    model, x = _conv_stack().bfloat16(), _input(2, 4, 8, 8).bfloat16()
    gm, out, frozen, restored = _journey(model, "lorth", x, tmp_path)
    assert out.dtype == restored.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in gm.parameters())
    torch.testing.assert_close(frozen, out, atol=0, rtol=0)
    torch.testing.assert_close(restored, out, atol=0, rtol=0)


def test_channels_last_isometric_journey_keeps_the_memory_format(tmp_path):
    """isometric_init writes delta-orthogonal kernels into the user's channels_last weights: they stay
    channels_last (as torch's own in-place writes keep them) and are orthogonal convolutions (the centre tap)."""
    model = _conv_stack().to(memory_format=torch.channels_last)
    x = _input(2, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    gm = orthofx.transform(model, "isometric", example_inputs=(x,))
    for name, p in gm.named_parameters():
        if p.dim() == 4:
            assert p.is_contiguous(memory_format=torch.channels_last), name
    centre = gm.get_submodule("1.2").weight.detach()[:, :, 0, 0].double()  # a 1 x 1 conv: one matrix
    torch.testing.assert_close(centre @ centre.T, torch.eye(16, dtype=torch.float64), atol=1e-6, rtol=0)
    _, out, frozen, restored = _journey(model, "isometric", x, tmp_path)
    torch.testing.assert_close(frozen, out, atol=1e-6, rtol=0)
    torch.testing.assert_close(restored, out, atol=1e-6, rtol=0)


def test_convnorm_journey_under_bfloat16_autocast(tmp_path):
    model, x = _conv_stack(), _input(2, 4, 8, 8)
    gm, out, frozen, restored = _journey(model, "convnorm", x, tmp_path, autocast=True)
    assert all(p.dtype == torch.float32 for p in gm.parameters())  # autocast leaves the weights float32
    assert out.dtype == torch.bfloat16  # the head's Linear runs in bfloat16, as under plain torch
    torch.testing.assert_close(frozen.float(), out.float(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(restored, out, atol=0, rtol=0)


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
def test_transform_under_inference_mode_or_no_grad_gives_a_trainable_model(mode):
    """The example inputs and the transform under inference_mode / no_grad: the returned model's weights are
    ordinary parameters that train (inference tensors could be neither saved for backward nor stepped)."""
    model, x = _conv_stack(), _input(2, 4, 8, 8)
    with mode():
        gm = orthofx.transform(model, "orthogonal", example_inputs=(x.clone(),))
    assert not any(p.is_inference() for p in gm.parameters())
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    (gm(x).square().mean() + orthofx.penalty(gm)).backward()
    optimizer.step()
    assert all(p.grad is not None for p in gm.parameters())
    assert all(not torch.equal(p, before[n]) for n, p in gm.named_parameters() if n.endswith("weight"))


def test_frozen_layer_journey_keeps_the_frozen_weights(tmp_path):
    """The first conv frozen (requires_grad=False): the orthogonal preset leaves it as it is, training does not move
    it, and load (with a model frozen the same way) restores the same model."""
    def frozen_model():
        model = _conv_stack()
        model[0][0].requires_grad_(False)
        return model
    model, x = frozen_model(), _input(2, 4, 8, 8)
    gm, out, frozen, restored = _journey(model, "orthogonal", x, tmp_path)
    stem = gm.get_submodule("0.0")
    assert type(stem) is nn.Conv2d and not stem.weight.requires_grad
    torch.testing.assert_close(stem.weight, model[0][0].weight, atol=0, rtol=0)
    torch.testing.assert_close(frozen, out, atol=1e-5, rtol=0)
    torch.testing.assert_close(restored, out, atol=1e-5, rtol=0)


def test_float16_jacobian_journey(tmp_path):
    model, x = _conv_stack().half(), _input(2, 4, 8, 8).half()
    gm, out, frozen, restored = _journey(model, "jacobian", x, tmp_path)
    assert out.dtype == torch.float16
    terms = orthofx.penalty_terms(gm.train())
    assert len(terms) == 2
    torch.testing.assert_close(frozen, out, atol=0, rtol=0)
    torch.testing.assert_close(restored, out, atol=0, rtol=0)


def test_float64_svd_journey_matches_the_untransformed_model():
    """The stable decompositions of a float64 model compute in float64: the forward equals plain eigh's to 1e-12."""
    torch.manual_seed(0)
    model = orthofx.models.get("gcp_cnn", width=4).double()
    x = orthofx.models.example_input("gcp_cnn").double()
    gm = orthofx.transform(model, "svd", example_inputs=(x,))
    for training in (True, False):
        gm.train(training)
        model.train(training)
        with torch.no_grad():
            out, reference = gm(x), model(x)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, reference, atol=1e-12, rtol=0)


@pytest.mark.parametrize("frozen_in_file", [True, False])
def test_load_into_a_model_frozen_otherwise_names_the_frozen_layer(frozen_in_file, tmp_path):
    """A model saved with its first conv frozen (the orthogonal preset left it a plain conv) and loaded into a
    fresh, unfrozen one (or the reverse) was refused with entries only ("missing ['0.0.proj_a', ...], unexpected
    ['0.0.weight']"); the error now names the layer and the cause. Reference: the layer path and which side froze it."""
    def stack(frozen: bool) -> nn.Module:
        model = _conv_stack()
        model[0][0].requires_grad_(not frozen)
        return model
    x = _input(2, 4, 8, 8)
    orthofx.export(orthofx.transform(stack(frozen_in_file), "orthogonal", example_inputs=(x,)), tmp_path / "m.pt")
    here = "trainable here" if frozen_in_file else "frozen here (requires_grad=False: '0.0')"
    with pytest.raises(orthofx.ExportError, match=rf"other entries for the layers '0\.0', {re.escape(here)}"):
        orthofx.load(stack(not frozen_in_file), tmp_path / "m.pt")
    orthofx.load(stack(frozen_in_file), tmp_path / "m.pt")  # frozen alike: loads




def _strided_net(stride: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 16, 1, stride=stride), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))


def test_load_into_a_layer_declined_for_its_configuration_does_not_blame_freezing(tmp_path):
    # the file's layer 0 is orthogonal (stride 1); here it is strided, which has no orthogonal version: no layer is
    # frozen anywhere, so the error must not say one was
    orthofx.export(orthofx.transform(_strided_net(1), "orthogonal"), tmp_path / "m.pt")
    assert all(p.requires_grad for p in _strided_net(2).parameters())
    with pytest.raises(orthofx.ExportError, match=r"missing \['0\.weight'\]") as info:
        orthofx.load(_strided_net(2), tmp_path / "m.pt")
    assert "frozen" not in str(info.value)


class _TokenModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc1, self.fc2 = nn.Embedding(10, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, ids):
        h = self.fc1(self.emb(ids))
        stats = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h  # symbolic tracing cannot follow
        h = h / stats.norm(dim=-1, keepdim=True).to(h.dtype)
        return self.fc2(h + torch.full((6,), 0.5, dtype=h.dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_load_replays_an_export_capture_without_floating_inputs_in_its_dtype(dtype, tmp_path):
    torch.manual_seed(0)
    model = _TokenModel().to(dtype)
    ids = torch.randint(0, 10, (4, 5), generator=torch.Generator().manual_seed(1))
    gm = orthofx.transform(model, "lorth", example_inputs=(ids,))
    assert orthofx.manifest_of(gm).capture.mode == "export"
    orthofx.export(gm, tmp_path / "m.pt")
    with torch.no_grad():
        reference = model(ids)  # reference: the untransformed model (lorth leaves the forward as it is)
        out = orthofx.load(_TokenModel(), tmp_path / "m.pt", example_inputs=(ids,))(ids)
    assert out.dtype == dtype
    torch.testing.assert_close(out, reference, atol=0, rtol=0)
