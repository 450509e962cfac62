"""Regressions found by fuzzing orthofx on model patterns users have next to plain layers: hooks, torch's own
parametrizations and weight hooks, TorchScript submodules, ``ModelOutput``-style outputs, recurrent layers and
attention's packed projections.

Each test compares with the untransformed model or with the transformed layers called directly (``.forward``,
which runs no hooks), or asserts a precise orthofx error / warning.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import warnings
from typing import Optional

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, prune

import orthofx
from orthofx.capture import copy_model
from references import lorth64

pytestmark = pytest.mark.usefixtures("one_thread")

LINEARS = {"rules": [{"match": {"type": "Linear"}, "apply": "orth_regularizer"}]}


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def _warnings(gm) -> list[str]:
    return orthofx.manifest_of(gm).capture.warnings


# ------------------------------------------------------------------------------------------------------- hooks


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))) + x


class _HookedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = _Block()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_a_hook_on_a_traced_through_submodule_keeps_firing(mode):
    """A feature-extractor hook on a user block: tracing through the block ran the hook once on proxies and
    dropped it (and left a Proxy in the user's dict). The block is now kept as a leaf, and said so."""
    torch.manual_seed(0)
    model, x = _HookedNet().eval(), torch.randn(2, 3, 6, 6)
    store = {}
    model.block.register_forward_hook(lambda module, args, out: store.__setitem__("block", out))
    policy = {"capture": {"mode": mode}, **LINEARS}
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    store.clear()
    with torch.no_grad():
        out = gm(x)
        got = store.pop("block")
        reference = model(x)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    torch.testing.assert_close(got, store["block"], rtol=0, atol=0)
    assert any("block (_Block, 1 hook(s))" in w for w in _warnings(gm))


def test_hooks_on_replaced_layers_move_to_the_replacement():
    """orthogonal_conv puts new layers in place of the hooked ones: their forward hooks and pre-hooks (which may
    change the input) run on the replacements, and the user's handle still removes them (inplace=True)."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(4, 6)
    store = {}
    model[0].register_forward_hook(lambda module, args, out: store.__setitem__("first", out))
    handle = model[2].register_forward_pre_hook(lambda module, args: (2 * args[0],))
    gm = orthofx.transform(model, "orthogonal", example_inputs=(x,), inplace=True)
    first, head = gm.get_submodule("0"), gm.get_submodule("2")
    assert type(first).__name__ == type(head).__name__ == "OrthogonalLinear"
    gm.eval()
    with torch.no_grad():
        out = gm(x)
        hidden = first.forward(x)  # .forward runs no hooks
        torch.testing.assert_close(store["first"], hidden, rtol=0, atol=0)
        torch.testing.assert_close(out, head.forward(2 * torch.relu(hidden)), rtol=0, atol=0)
        handle.remove()
        torch.testing.assert_close(gm(x), head.forward(torch.relu(hidden)), rtol=0, atol=0)


def test_a_hook_on_a_jacobian_probed_block_fires_once_per_step():
    """The Jacobian probe wraps the hooked block: the hook moves to the probe, so it fires once per forward as on
    the model (it also fired while the penalty re-ran the block)."""
    torch.manual_seed(0)
    model = _ProbedNet()
    calls = []
    model.features.register_forward_hook(lambda module, args, out: calls.append(tuple(out.shape)))
    x = torch.randn(4, 6)
    gm = orthofx.transform(model, "jacobian", example_inputs=(x,))
    calls.clear()
    gm.train()
    (gm(x).sum() + orthofx.penalty(gm)).backward()
    assert calls == [(4, 6)]


class _ProbedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.features(x))


def test_export_capture_applies_a_leaf_pre_hook_once():
    """torch.export recorded a leaf's pre-hook as ATen ops before the call, and the call ran the hook again."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(3, 6)
    model[2].register_forward_pre_hook(lambda module, args: (2 * args[0],))
    gm = orthofx.transform(model, {"capture": {"mode": "export"}, **LINEARS}, example_inputs=(x,))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    assert len(model[2]._forward_pre_hooks) == 1  # the model's hook is back after the export


def test_state_dict_hooks_on_the_model_itself_are_reported():
    model = _mlp()
    model.register_state_dict_post_hook(lambda module, state, prefix, local: None)
    gm = orthofx.transform(model, "lorth", example_inputs=(torch.randn(2, 6),))
    assert any("1 state-dict hook(s)" in w for w in _warnings(gm))


# ---------------------------------------------------------------------- parametrizations and weight hooks


def test_replacing_passes_skip_a_parametrized_layer_and_keep_it():
    """orthogonal_conv replaced a weight_norm-parametrized Linear (dropping the parametrization) and report()
    then failed on the parametrization's submodule sites; the layer is skipped with the reason instead (the
    orthogonal preset's on_impossible: regularize puts L_orth on it, see below)."""
    model, x = _mlp(), torch.randn(2, 6)
    parametrizations.weight_norm(model[2])
    policy = {"rules": [{"match": {"type": "Linear"}, "apply": "orthogonal_conv"}]}
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    status = {row["site"]: row["status"] for row in orthofx.manifest_of(gm).plan.rows()}
    assert status["2"].startswith("skipped: its weight is computed by a torch parametrization (WeightNorm")
    kept = gm.get_submodule("2")
    assert type(kept).__name__ == "ParametrizedLinear"
    h = torch.randn(2, 8)
    torch.testing.assert_close(kept(h), model[2](h), rtol=0, atol=0)
    assert "skipped: its weight is computed" in str(orthofx.report(gm))


@pytest.mark.parametrize("wrap", ["spectral_norm", "old_spectral_norm"])
def test_isometric_init_skips_a_layer_whose_weight_is_computed(wrap):
    """isometric_init wrote the orthogonal weight into a tensor the next call recomputes: no effect, reported as
    applied. Now skipped, and the layer's parameters are the model's."""
    model, x = _mlp(), torch.randn(2, 6)
    if wrap == "spectral_norm":
        parametrizations.spectral_norm(model[2])
    else:
        torch.nn.utils.spectral_norm(model[2])
    gm = orthofx.transform(model, {"rules": [{"match": {"type": "Linear"}, "apply": "isometric_init"}]},
                           example_inputs=(x,))
    skipped = [site.name for site, _, _ in orthofx.manifest_of(gm).plan.skipped]
    assert skipped == ["2"]
    for name, value in gm.get_submodule("2").state_dict().items():
        torch.testing.assert_close(value, model[2].state_dict()[name], rtol=0, atol=0)


@pytest.mark.parametrize("wrap", ["weight_norm", "old_spectral_norm"])
def test_riemannian_training_refuses_a_layer_whose_weight_is_computed(wrap):
    """The Stiefel hook would step a tensor no optimizer holds (attach then failed with a misleading message, or,
    with the older spectral_norm, silently did nothing)."""
    model = _mlp()
    if wrap == "weight_norm":
        parametrizations.weight_norm(model[2])
    else:
        torch.nn.utils.spectral_norm(model[2])
    policy = {"rules": [{"match": {"type": "Linear", "name": "2"}, "apply": "riemannian"}]}
    kind = "WeightNorm" if wrap == "weight_norm" else "SpectralNorm"
    with pytest.raises(orthofx.PlanError, match=rf"riemannian.* 2: its weight is .*{kind}"):
        orthofx.transform(model, policy, example_inputs=(torch.randn(2, 6),))


@pytest.mark.parametrize("policy", ["isometric",
                                    {"rules": [{"match": {"type": "Linear"}, "apply": "pre_svd"}]}])
def test_weight_updating_passes_skip_a_layer_whose_weight_is_computed_at_planning(policy):
    """Riemannian training and NOG (pre_svd's default) are skipped with the reason where a policy also matches
    other layers (the isometric preset, a pre_svd rule over every Linear): they used to fail the transform."""
    model = _mlp()
    parametrizations.weight_norm(model[2])
    gm = orthofx.transform(model, policy, example_inputs=(torch.randn(2, 6),))
    entries = {entry.site.name: entry for entry in orthofx.manifest_of(gm).plan.entries}
    assert "2" not in entries and "0" in entries
    skipped = {site.name: reason for site, _, reason in orthofx.manifest_of(gm).plan.skipped}
    assert "WeightNorm" in skipped["2"]
    assert "2" not in {hook.site for hook in orthofx.manifest_of(gm).optimizer_hooks}
    assert gm.get_submodule("2").parametrizations.weight.original1.requires_grad  # still weight-normalised


@pytest.mark.parametrize("wrap", ["weight_norm", "prune"])
def test_copy_model_copies_layers_with_older_weight_hooks(wrap):
    """copy.deepcopy refuses the non-leaf weight the older weight_norm and pruning keep on the layer."""
    model, x = _mlp(), torch.randn(2, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        if wrap == "weight_norm":
            torch.nn.utils.weight_norm(model[2])
        else:
            prune.l1_unstructured(model[2], "weight", amount=0.3)
    copied = copy_model(model)
    with torch.no_grad():
        torch.testing.assert_close(copied(x), model(x), rtol=0, atol=0)
        name = "weight_g" if wrap == "weight_norm" else "weight_orig"
        getattr(copied[2], name).mul_(2)  # the copy's own parameters drive the copy's weight
        reference = model(x)
        assert not torch.allclose(copied(x), reference)
        torch.testing.assert_close(model(x), reference, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------- outputs


class _AttributeDict(collections.OrderedDict):
    """A ModelOutput-style mapping: keys read as attributes."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


@dataclasses.dataclass
class _CausalLMOutput(collections.OrderedDict):
    """HF's style: a dataclass that is an OrderedDict of its fields that are set."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if getattr(self, field.name) is not None:
                self[field.name] = getattr(self, field.name)


class _MappingOutput(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.emb = nn.Embedding(10, 8)
        self.out = nn.Linear(8, 10)

    def forward(self, input_ids, attention_mask=None):
        logits = self.out(self.emb(input_ids))
        if self.kind == "attribute_dict":
            return _AttributeDict(logits=logits, tokens=input_ids)
        return _CausalLMOutput(logits=logits)


@pytest.mark.parametrize("kind", ["attribute_dict", "dataclass_dict"])
def test_a_dict_subclass_output_keeps_its_class(kind):
    """fx recorded every dict as a plain dict, so ``out.logits`` failed on the captured model."""
    torch.manual_seed(0)
    model, ids = _MappingOutput(kind), torch.randint(0, 10, (2, 5))
    gm = orthofx.transform(model, "lorth", example_inputs=(ids,))
    out, reference = gm(ids), model(ids)
    assert type(out) is type(reference) and list(out) == list(reference)
    torch.testing.assert_close(out["logits"], reference.logits, rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    assert type(torch.load(buffer, weights_only=False)(ids)) is type(reference)  # the code is traced again


# ------------------------------------------------------------------------------ layers no pass can handle


class _Scripted(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.scripted = torch.jit.script(nn.Sequential(nn.Linear(8, 8), nn.ReLU()))
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        return self.b(self.scripted(self.a(x)))


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")
def test_a_scripted_submodule_is_left_alone_with_a_warning():
    """transform raised RuntimeError (no hooks on ScriptModules); the scripted part is now no site."""
    torch.manual_seed(0)
    model, x = _Scripted(), torch.randn(2, 6)
    gm = orthofx.transform(model, "lorth", example_inputs=(x,))
    assert [term.site for term in orthofx.manifest_of(gm).penalties] == ["a", "b"]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    assert any("TorchScript module(s) scripted" in w for w in _warnings(gm))


class _Recurrent(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn = cell(6, 8, num_layers=2, bidirectional=True, batch_first=True)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.rnn(x)[0]
        return self.head(self.attn(h, h, h, need_weights=False)[0][:, -1])


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_recurrent_and_packed_attention_weights_are_reported_as_unhandled(cell):
    torch.manual_seed(0)
    model = _Recurrent(cell)
    plan = orthofx.explain(model, "orthogonal", example_inputs=(torch.randn(2, 5, 6),))
    text = str(plan)
    assert f"rnn ({cell.__name__}): no rule of the policy treats the recurrent weights weight_ih_l*, weight_hh_l*" in text
    assert "attn (MultiheadAttention): no rule of the policy treats the input projection weights in_proj_weight" in text
    assert [entry.site.name for entry in plan.entries] == ["attn.out_proj", "head"]


def test_parametrization_internals_are_no_sites_and_wrapping_passes_keep_the_parametrization():
    """The modules of a parametrization (``conv.parametrizations.weight.0``) were module sites, which report() then
    looked up on the ConvNorm wrapper that had replaced the conv (AttributeError). A pass whose replacement wraps
    the layer and reads ``layer.weight`` (ConvNorm, marked ``wraps_original_module``) keeps the parametrization."""
    from orthofx.nn import with_convnorm
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    parametrizations.weight_norm(model[2])
    x = torch.randn(2, 3, 6, 6)
    gm = orthofx.transform(model, "convnorm", example_inputs=(x,))
    sites = [site.name for site in orthofx.manifest_of(gm).plan.sites]
    assert sites == ["0", "1", "2"]
    plain = nn.Conv2d(4, 4, 3, padding=1)
    with torch.no_grad():
        plain.weight.copy_(model[2].weight)
        plain.bias.copy_(model[2].bias)
        hidden = torch.relu(gm.get_submodule("0")(x))
        torch.testing.assert_close(gm(x), with_convnorm(plain)(hidden), rtol=1e-6, atol=1e-6)
    assert [row["site"] for row in orthofx.report(gm).rows] == ["0", "2"]
    gm(x).sum().backward()
    assert gm.get_submodule("2").conv.parametrizations.weight.original0.grad is not None


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.nn.utils.weight_norm is deprecated
def test_transform_explain_and_freeze_copy_a_model_with_the_older_weight_norm():
    """transform, explain and freeze deep-copied the model, which refuses the non-leaf weight the older
    weight_norm keeps on the layer (RuntimeError before any rule ran)."""
    model, x = _mlp(), torch.randn(2, 6)
    torch.nn.utils.weight_norm(model[2])
    expected = model(x)
    assert "2" in str(orthofx.explain(model, "lorth"))
    gm = orthofx.transform(model, "lorth", example_inputs=(x,))
    torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)
    frozen = orthofx.freeze(gm)
    torch.testing.assert_close(frozen(x), expected, rtol=0, atol=0)
    assert float(orthofx.penalty(gm)) > 0


@dataclasses.dataclass
class _Prediction:
    logits: torch.Tensor
    extra: dict


def test_output_tensors_look_inside_dict_subclasses_and_dataclasses():
    """pytree keeps a dict subclass it has no rule for, and a dataclass, whole: the output checks of transform
    (shapes, finiteness) and export's comparisons saw no tensor in them."""
    from orthofx.transform import output_tensors
    a, b, c = torch.ones(1), torch.zeros(2), torch.full((3,), 2.0)
    found = output_tensors((_AttributeDict(logits=a, tokens=b), _Prediction(logits=c, extra={"b": b})))
    assert [t.shape for t in found] == [a.shape, b.shape, c.shape, b.shape]
    assert all(x is y for x, y in zip(found, (a, b, c, b)))


def test_the_orthogonal_preset_regularises_a_layer_whose_weight_is_computed():
    """"Hard where possible, L_orth elsewhere": a weight-normalised conv cannot be replaced (that drops the
    parametrization) and was left without any treatment; with on_impossible: regularize it gets L_orth of the
    weight it computes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    parametrizations.weight_norm(model[2])
    gm = orthofx.transform(model, "orthogonal", example_inputs=(torch.randn(2, 3, 8, 8),))
    layer = gm.get_submodule("2")
    assert torch.nn.utils.parametrize.is_parametrized(layer, "weight")
    terms = orthofx.penalty_terms(gm)
    assert list(terms) == ["orthogonal/2"]
    # P0's L_orth of the computed weight g v / ||v||, from the dense circular operator in float64
    reference = 0.01 * lorth64(layer.weight)
    assert float(terms["orthogonal/2"]) == pytest.approx(reference, rel=1e-5)
    orthofx.penalty(gm).backward()
    assert layer.parametrizations.weight.original1.grad.abs().sum() > 0
    status = {change.site: change.status for change in orthofx.manifest_of(gm).changes}
    assert status["2"] == "regularised (computed weight)" and status["0"].startswith("hard")


@pytest.mark.parametrize("key", ['q"r', "a\\b", "a\nb", "a\rb"])
def test_a_name_fx_code_cannot_hold_is_a_capture_error(key):
    """fx writes module names between double quotes unescaped: a ModuleDict key with a quote, a backslash or a line
    break gave a SyntaxError (or a wrong lookup) from the generated code; a tab or a space works."""
    def model(name):
        class Keyed(nn.Module):
            def __init__(self):
                super().__init__()
                self.d = nn.ModuleDict({name: nn.Linear(4, 4)})

            def forward(self, x):
                return self.d[name](x)
        return Keyed()

    x = torch.randn(2, 4)
    with pytest.raises(orthofx.CaptureError, match=r"module name 'd\..*' holds a double quote, a backslash or a line "
                                                   r"break.*rename it"):
        orthofx.transform(model(key), "lorth", example_inputs=(x,))
    gm = orthofx.transform(model("a\tb c"), "lorth", example_inputs=(x,))
    assert gm(x).shape == (2, 4)
