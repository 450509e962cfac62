"""Models that already carry torch's own weight machinery (pruning, the older ``weight_norm`` / ``spectral_norm``
hooks, parametrizations of the bias) under the presets, and torch's tools applied to a frozen model.

References are independent of orthofx: the penalty's gradient from an explicit float64 formula of the layer's
effective weight (``weight_orig * weight_mask``, ``g v / ||v||``, ``W / (u^T W v)``), L_orth of a conv from the dense
circular operator (``lorth64``), the untransformed layers' outputs, and the frozen model's own outputs.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.fx.experimental.optimization  # noqa: F401  (fuse is reached as torch.fx.experimental.optimization)
from torch import nn
from torch.nn.utils import parametrize, prune

import orthofx
from references import lorth64

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]  # torch.nn.utils.weight_norm is deprecated


def _wrap(layer: nn.Module, kind: str) -> str:
    """Put torch's older weight machinery ``kind`` on ``layer``; return the name of the parameter it trains."""
    if kind == "prune":
        prune.l1_unstructured(layer, "weight", amount=0.5)
        return "weight_orig"
    if kind == "weight_norm":
        torch.nn.utils.weight_norm(layer)
        return "weight_v"
    torch.nn.utils.spectral_norm(layer)
    return "weight_orig"


def _effective64(layer: nn.Module, kind: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The weight the layer applies, in float64 from its parameters by the formula of ``kind`` (not by torch's
    hook), and the float64 leaves it was computed from (order: those of :func:`_leaves`)."""
    if kind == "prune":
        orig = layer.weight_orig.detach().double().requires_grad_()
        return orig * layer.weight_mask.double(), [orig]
    if kind == "weight_norm":
        g = layer.weight_g.detach().double().requires_grad_()
        v = layer.weight_v.detach().double().requires_grad_()
        return g * v / v.flatten(1).norm(dim=1).reshape(-1, *[1] * (v.dim() - 1)), [g, v]
    orig = layer.weight_orig.detach().double().requires_grad_()
    u, v = layer.weight_u.double(), layer.weight_v.double()
    return orig / (u @ orig.flatten(1) @ v), [orig]


def _leaves(layer: nn.Module, kind: str) -> list[torch.Tensor]:
    return [layer.weight_g, layer.weight_v] if kind == "weight_norm" else [layer.weight_orig]


@pytest.mark.parametrize("kind", ["prune", "weight_norm", "spectral_norm"])
def test_lorth_after_a_no_grad_pass_trains_the_parameters_behind_a_hooked_weight(kind):
    """L_orth read ``layer.weight``, which these hooks set at each call: after a ``torch.no_grad()`` validation pass
    it had no autograd history, and the penalty sent no gradient to ``weight_orig`` / ``weight_g``, ``weight_v``
    (silently: the other layers' terms kept the loss differentiable). Now it is recomputed from the parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 6))
    _wrap(model[2], kind)
    x = torch.randn(4, 6)
    gm = orthofx.transform(model, "lorth", example_inputs=(x,))
    with torch.no_grad():
        gm(x)  # a validation pass
    layer = gm.get_submodule("2")
    orthofx.penalty(gm).backward()
    weight, leaves = _effective64(layer, kind)
    gram = weight @ weight.T  # 6 x 8: the row-orthogonal form
    (0.01 * (gram - torch.eye(6, dtype=torch.float64)).square().sum()).backward()
    for got, reference in zip(_leaves(layer, kind), leaves):
        assert got.grad is not None, "no gradient reached the layer's parameters"
        torch.testing.assert_close(got.grad.double(), reference.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", ["prune", "weight_norm", "spectral_norm"])
def test_lorth_before_the_forward_reads_the_weight_after_the_step(kind):
    """``loss = orthofx.penalty(gm) + criterion(gm(x), y)`` after a first step: the penalty read the tensor the
    previous forward left, whose graph backward() had freed (torch's RuntimeError 'Trying to backward through the
    graph a second time'), and whose values were those before the optimizer step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    _wrap(model[2], kind)
    x = torch.randn(2, 3, 6, 6)
    gm = orthofx.transform(model, "lorth", example_inputs=(x,))
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.5)
    for _ in range(2):
        loss = orthofx.penalty(gm) + gm(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    layer = gm.get_submodule("2")
    term = orthofx.penalty_terms(gm)["lorth/2"]
    weight, _ = _effective64(layer, kind)  # from the parameters after the last step
    assert float(term.detach()) == pytest.approx(0.01 * lorth64(weight), rel=1e-5)


class _Shift(nn.Module):
    """A bias kept at least 1 (a user's parametrization)."""

    def forward(self, bias):
        return bias.clamp(min=0.0) + 1.0


def _conv_model(bias: str) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    if bias == "parametrized":
        parametrize.register_parametrization(model[2], "bias", _Shift())
    else:
        prune.l1_unstructured(model[2], "bias", amount=0.5)
    return model


@pytest.mark.parametrize("bias", ["parametrized", "pruned"])
def test_the_orthogonal_preset_keeps_a_layer_whose_bias_is_computed(bias):
    """The orthogonal layer copied the bias as a free parameter: a bias parametrization was dropped without a word
    (row 'hard'), and pruning's bias pre-hook, moved to the new layer, failed the transform with an AttributeError
    on ``bias_mask``. The layer is kept and regularised (on_impossible: regularize), its bias still computed."""
    model = _conv_model(bias)
    x = torch.randn(2, 3, 6, 6)
    gm = orthofx.transform(model, "orthogonal", example_inputs=(x,))
    status = {change.site: change.status for change in orthofx.manifest_of(gm).changes}
    assert status == {"0": "hard", "2": "regularised (computed bias)"}
    layer = gm.get_submodule("2")
    hidden = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(layer(hidden), model[2](hidden), rtol=0, atol=0)
        if bias == "parametrized":
            layer.parametrizations.bias.original.fill_(-5.0)
            assert torch.equal(layer.bias, torch.ones(8))  # the parametrization still runs
        else:
            layer.bias_orig.fill_(2.0)
            torch.testing.assert_close(layer(hidden) - nn.functional.conv2d(hidden, layer.weight, None, padding=1),
                                       (2.0 * layer.bias_mask).reshape(1, 8, 1, 1).expand(2, 8, 6, 6))


def test_replacing_passes_skip_a_layer_whose_bias_a_pre_hook_computes():
    """``orthogonal_conv`` (on_impossible: error) and ``convnorm`` failed the transform (TransformError:
    'OrthogonalConv2d' / 'ConvNormConv2d' object has no attribute 'bias_mask'); now skipped with the reason and
    the fix, and the layer computes what it did."""
    model = _conv_model("pruned")
    x = torch.randn(2, 3, 6, 6)
    for policy in ({"rules": [{"match": {"type": "Conv2d"}, "apply": "orthogonal_conv"}]}, "convnorm"):
        gm = orthofx.transform(model, policy, example_inputs=(x,))
        skipped = {site.name: reason for site, _, reason in orthofx.manifest_of(gm).plan.skipped}
        assert skipped["2"].startswith("its bias is not a parameter: a forward pre-hook (L1Unstructured) "
                                       "recomputes it from bias_orig")
        assert "torch.nn.utils.prune.remove(layer, 'bias')" in skipped["2"]
        hidden = torch.randn(2, 8, 6, 6)
        with torch.no_grad():
            torch.testing.assert_close(gm.get_submodule("2")(hidden), model[2](hidden), rtol=0, atol=0)


@pytest.mark.parametrize("bias", ["parametrized", "pruned"])
def test_isometric_init_does_not_claim_to_zero_a_computed_bias(bias):
    """``bias: zero`` zeroed ``module.bias``, a tensor the next call recomputes: the bias stayed, the change said
    it was zeroed. The layer is skipped with the fix ('bias: keep'), which then initialises the weight."""
    model = _conv_model(bias)
    x = torch.randn(2, 3, 6, 6)
    rule = {"match": {"type": "Conv2d"}, "apply": "isometric_init"}
    gm = orthofx.transform(model, {"rules": [rule]}, example_inputs=(x,))
    skipped = {site.name: reason for site, _, reason in orthofx.manifest_of(gm).plan.skipped}
    assert "its bias" in skipped["2"] and "write 'bias: keep'" in skipped["2"]
    gm = orthofx.transform(model, {"rules": [{**rule, "with": {"bias": "keep"}}]}, example_inputs=(x,))
    layer = gm.get_submodule("2")
    gm(x)  # pruning recomputes the bias in the forward
    torch.testing.assert_close(layer.bias, model[2].bias, rtol=0, atol=0)
    centre = layer.weight.detach().double()[:, :, 1, 1]  # delta-orthogonal: an orthogonal centre tap
    torch.testing.assert_close(torch.linalg.svdvals(centre), torch.ones(8, dtype=torch.float64),
                               rtol=0, atol=1e-6)



def test_isometric_init_does_not_leave_a_parametrized_recurrent_bias_unzeroed():
    """``bias: zero`` zeroes a recurrent layer's biases where they are parameters: a parametrized ``bias_ih_l0`` was
    left as it was (``bias_hh_l0`` zeroed) without a word. Skipped with the fix; ``bias: keep`` then treats the
    hidden weights, one orthonormal block per gate (float64 singular values of each block)."""

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(4, 5, batch_first=True)
            parametrize.register_parametrization(self.rnn, "bias_ih_l0", _Shift())

        def forward(self, x):
            return self.rnn(x)[0]

    torch.manual_seed(0)
    model, x = Tagger(), torch.randn(2, 3, 4)
    rule = {"match": {"type": "GRU"}, "apply": "isometric_init", "optional": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", orthofx.OrthofxWarning)  # the policy then changes nothing
        gm = orthofx.transform(model, {"rules": [rule]}, example_inputs=(x,))
    skipped = {site.name: reason for site, _, reason in orthofx.manifest_of(gm).plan.skipped}
    assert skipped["rnn"].startswith("its bias_ih_l0 is computed by a torch parametrization (Shift")
    assert "write 'bias: keep'" in skipped["rnn"]
    gm = orthofx.transform(model, {"rules": [{**rule, "with": {"bias": "keep"}}]}, example_inputs=(x,))
    rnn = gm.get_submodule("rnn")
    torch.testing.assert_close(rnn.bias_ih_l0, model.rnn.bias_ih_l0, rtol=0, atol=0)
    for block in rnn.weight_hh_l0.detach().double().split(5):
        torch.testing.assert_close(torch.linalg.svdvals(block), torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- torch tools after orthofx.freeze


def _bn_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8),
                         nn.ReLU(), nn.Linear(8, 4))


@pytest.mark.parametrize("preset", ["lorth", "orthogonal", "isometric"])
def test_torch_tools_reproduce_a_trained_and_frozen_model(preset):
    """A frozen model is plain torch: jit.trace, fx's conv-bn fusion, fuse_conv_bn_eval, quantize_fx's
    prepare/convert (no qconfig: the same arithmetic), deepcopy and a state_dict round trip reproduce it."""
    from torch.ao.quantization import QConfigMapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    x = torch.randn(4, 3, 8, 8)
    gm = orthofx.transform(_bn_model(), preset, example_inputs=(x,))
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.01)
    if orthofx.manifest_of(gm).optimizer_hooks:
        orthofx.attach(optimizer, gm)
    (gm(x).square().mean() + orthofx.penalty(gm)).backward()
    optimizer.step()
    frozen = orthofx.freeze(gm).eval()
    with torch.no_grad():
        expected = frozen(x)
        outputs = {"traced": torch.jit.trace(frozen, (x,))(x),
                   "fx fuse": torch.fx.experimental.optimization.fuse(copy.deepcopy(frozen))(x)}
        fused = copy.deepcopy(frozen)
        fused.add_module("0", torch.nn.utils.fusion.fuse_conv_bn_eval(fused.get_submodule("0"),
                                                                      fused.get_submodule("1")))
        fused.add_module("1", nn.Identity())
        outputs["fuse_conv_bn_eval"] = fused(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantize_fx's deprecation notices
            prepared = prepare_fx(copy.deepcopy(frozen), QConfigMapping(), (x,))
            prepared(x)
            outputs["quantize_fx"] = convert_fx(prepared)(x)
        buffer = io.BytesIO()
        torch.save(copy.deepcopy(frozen).state_dict(), buffer)
        buffer.seek(0)
        other = copy.deepcopy(frozen)
        for tensor in other.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(1.0)
        other.load_state_dict(torch.load(buffer))
        outputs["state_dict"] = other(x)
    for name, output in outputs.items():
        torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5, msg=name)


def test_pre_svd_orthogonal_refuses_a_layer_whose_bias_a_pre_hook_computes():
    """``pre_svd`` with ``weight: orthogonal`` replaces the layer like ``orthogonal_conv``: the transform failed
    inside the rewritten model (no attribute 'bias_mask'); now planning refuses it, naming the layer and the undo."""
    torch.manual_seed(0)

    class Whitened(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6)

        def forward(self, x):
            h = self.lin(x)
            return torch.linalg.eigvalsh(h.T @ h)

    model = Whitened()
    prune.l1_unstructured(model.lin, "bias", amount=0.5)
    policy = {"rules": [{"match": {"feeds": "linalg.eigvalsh"}, "apply": "pre_svd", "with": {"weight": "orthogonal"}}]}
    with pytest.raises(orthofx.PlanError, match=r"lin: its bias is not a parameter: .*L1Unstructured.*"
                                                r"torch\.nn\.utils\.prune\.remove\(layer, 'bias'\)"):
        orthofx.transform(model, policy, example_inputs=(torch.randn(10, 6),))


def test_report_rows_measure_the_pruned_weight_after_the_step():
    """The report's penalty table (``term.value``) and its layer rows must measure the same weight: the one the
    parameters give now, not the one the last forward left (fix: ``current_weight(module)`` in
    ``report._weight_values``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 6))
    prune.l1_unstructured(model[2], "weight", amount=0.5)
    x = torch.randn(4, 6)
    gm = orthofx.transform(model, "lorth", example_inputs=(x,))
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.5)
    (gm(x).square().mean() + orthofx.penalty(gm)).backward()
    optimizer.step()
    layer = gm.get_submodule("2")
    now = (layer.weight_orig * layer.weight_mask).detach().double()
    row = next(row for row in orthofx.report(gm).rows if row["site"] == "2")
    assert row["lorth"] == pytest.approx(lorth64(now), rel=1e-5)
    assert row["sigma_max"] == pytest.approx(float(torch.linalg.svdvals(now)[0]), rel=1e-5)
