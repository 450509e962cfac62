"""Composing transforms (session 46): a transform of a transformed or frozen model, and the files it is saved in.

* L_orth on the conv of a frozen ConvNorm layer (``transform(freeze(transform(m, "convnorm")), "lorth")``, and the
  orthogonal preset's "L_orth instead" there) measured the stride-1 conv the frozen layer convolves with, not the
  layer's own stride: 0.0133 for 0.0405 on a stride-2 layer. Reference: L_orth from its definition (P0 Def. 1) in
  float64, ``|| conv(K, K, padding P, stride S) - I_r0 ||^2`` with the undilated equivalent kernel, and the term of
  the unfrozen model.
* ``kind: block`` rules cannot match on a model orthofx made (tracing inlined its containers); the messages sent the
  user to ``named_modules()``, which lists the block, or advised naming blocks in a rule.
* ``orthofx.load`` with example inputs of another size rebuilt ``cayley_fft`` layers for that size silently.
* The ``.pt`` refusal of a ConvNorm layer holding an orthogonal conv (two transforms) advised one policy holding both
  rules, which builds another model.
* Review of the above: the "inlined" claim was made for containers the original model never called as blocks (an
  ``nn.ModuleList``, a custom block a ``type: Sequential`` rule leaves out), whose advice selected nothing; the
  ``.pt`` advice looked inside the first earlier layer only; the frozen advice said to freeze before training;
  ``lorth_term`` without ``root`` gave a frozen ConvNorm conv a stride-1 term that its value contradicted.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthofx
from orthofx import metrics

CAYLEY_SIZES_KEY = "cayley_input_sizes"  # the .pt key of the record (orthofx.export.CAYLEY_SIZES_KEY): file format

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ L_orth on a frozen ConvNorm layer

def _lorth_ro_reference(weight: torch.Tensor, stride: int, dilation: int = 1) -> float:
    """P0's L_orth of a row-orthogonal conv (M <= C S^2) from its definition, in float64: the dilated kernel written
    out (zeros between the taps), then || conv(K, K, padding P, stride S) - I_r0 ||_F^2 with P = floor((k-1)/S) S."""
    w = weight.detach().to(torch.float64)
    if dilation > 1:
        m, c, k, _ = w.shape
        full = torch.zeros(m, c, dilation * (k - 1) + 1, dilation * (k - 1) + 1, dtype=torch.float64)
        full[:, :, ::dilation, ::dilation] = w
        w = full
    k = w.shape[-1]
    assert w.shape[0] <= w.shape[1] * stride ** 2  # the RO case
    pad = (k - 1) // stride * stride
    gram = F.conv2d(w, w, padding=pad, stride=stride)
    target = torch.zeros_like(gram)
    centre = gram.shape[-1] // 2
    target[:, :, centre, centre] = torch.eye(w.shape[0], dtype=torch.float64)
    return float((gram - target).square().sum())


def _strided_convnorm_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2, padding=3, dilation=3))
    x = torch.randn(2, 4, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", orthofx.OrthofxWarning)
        gm = orthofx.transform(model, "convnorm", example_inputs=(x,))
        frozen = orthofx.freeze(gm, example_inputs=(x,))
    return gm, frozen, x


@pytest.mark.parametrize("policy, key", [("lorth", "lorth"), ("orthogonal", "orthogonal")])
def test_lorth_on_a_frozen_convnorm_conv_has_the_layers_stride_and_dilation(policy, key):
    gm, frozen, x = _strided_convnorm_model()
    assert tuple(frozen.get_submodule("0.conv").stride) == (1, 1)  # the inner conv: the case the fix is about
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", orthofx.OrthofxWarning)
        terms = orthofx.penalty_terms(orthofx.transform(frozen, policy, example_inputs=(x,)))
        unfrozen = orthofx.penalty_terms(orthofx.transform(gm, "lorth", example_inputs=(x,)))
    # dilation 3 at stride 2: a dilation that is a multiple of the stride (2 at 2) reads one residue class, whose
    # L_orth is the stride-1 one, so it could not tell the strides apart
    for site, dilation in (("0.conv", 1), ("2.conv", 3)):
        weight = gm.get_submodule(site).weight
        expected = 0.01 * _lorth_ro_reference(weight, 2, dilation)
        # the stride-1 figure the frozen term had (another case too: 8 > 4 is CO at stride 1) differs clearly
        stride_one = 0.01 * float(metrics.lorth(weight.detach().double(), dilation=dilation))
        assert abs(stride_one - expected) > 0.1 * expected
        assert 0.01 * float(metrics.lorth(weight.detach().double(), stride=2, dilation=dilation)) == pytest.approx(
            expected, rel=1e-9)
        assert float(terms[f"{key}/{site}"].detach()) == pytest.approx(expected, rel=1e-5)
        assert float(terms[f"{key}/{site}"].detach()) == pytest.approx(float(unfrozen[f"lorth/{site}"].detach()),
                                                                       rel=1e-5)


def test_lorth_term_keeps_the_layers_stride_when_the_model_is_copied():
    import copy

    _, frozen, x = _strided_convnorm_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", orthofx.OrthofxWarning)
        g2 = orthofx.transform(frozen, "lorth", example_inputs=(x,))
    term = next(t for t in orthofx.manifest_of(g2).penalties if t.site == "0.conv")
    assert tuple(term.stride) == (2, 2)  # recorded on the term itself, not only read at evaluation
    copied = copy.deepcopy(g2)
    torch.testing.assert_close(orthofx.penalty_terms(copied)["lorth/0.conv"], orthofx.penalty_terms(g2)["lorth/0.conv"])


# ------------------------------------------------------------------ block rules on a model orthofx made

def _nested_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)), nn.Linear(8, 2))


_INIT = {"rules": [{"match": {"type": "Linear"}, "apply": "isometric_init"}]}
_BLOCK = {"rules": [{"match": {"kind": "block", "name": "0"}, "apply": "jacobian_isometry"}]}


def _made_models():
    model, x = _nested_model(), torch.randn(4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", orthofx.OrthofxWarning)
        transformed = orthofx.transform(model, _INIT, example_inputs=(x,))
        frozen = orthofx.freeze(orthofx.transform(model, "isometric", example_inputs=(x,)), example_inputs=(x,))
    return model, x, {"orthofx.transform": transformed, "orthofx.freeze": frozen}


def test_a_block_rule_on_a_transformed_or_frozen_model_says_its_containers_are_inlined():
    model, x, made = _made_models()
    orthofx.transform(model, _BLOCK, example_inputs=(x,))  # the original model: the block is selected
    for made_by, gm in made.items():
        assert "0" in dict(gm.named_modules())
        for run in (orthofx.transform, orthofx.explain):
            with pytest.raises(orthofx.PlanError) as caught:
                run(gm, _BLOCK, example_inputs=(x,))
            message = str(caught.value)
            assert "'0' is in named_modules()" in message and f"came from {made_by}" in message
            assert "inlined its containers" in message
            assert "one transform of the original model" in message
            assert "check match.name against model.named_modules()" not in message
            # a frozen model's advice trains the combined model before freezing it: frozen first, it has no penalty
            frozen_advice = "train that model (its penalty terms act only in training), then orthofx.freeze it"
            assert (frozen_advice in message) == (made_by == "orthofx.freeze")
            assert "then orthofx.freeze the result" not in message


def test_a_block_rule_on_a_model_holding_a_transformed_part_names_the_part():
    _, x, made = _made_models()
    outer = nn.Sequential(made["orthofx.transform"], nn.Linear(2, 2))
    rule = {"rules": [{"match": {"kind": "block", "name": "0.0"}, "apply": "jacobian_isometry"}]}
    with pytest.raises(orthofx.PlanError, match=r"the part '0' of this model came from orthofx\.transform"):
        orthofx.transform(outer, rule, example_inputs=(x,))


def test_a_block_rule_naming_no_module_keeps_the_named_modules_advice():
    _, x, made = _made_models()
    rule = {"rules": [{"match": {"kind": "block", "name": "layer9"}, "apply": "jacobian_isometry"}]}
    with pytest.raises(orthofx.PlanError, match="check match.name against model.named_modules()"):
        orthofx.transform(made["orthofx.freeze"], rule, example_inputs=(x,))
    with pytest.raises(orthofx.PlanError, match="check match.name against model.named_modules()"):
        orthofx.transform(_nested_model(), rule, example_inputs=(x,))


def test_the_jacobian_preset_on_a_transformed_or_frozen_model_says_why_it_changes_nothing():
    model, x, made = _made_models()
    for made_by, gm in made.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            orthofx.transform(gm, "jacobian", example_inputs=(x,))
        messages = [str(w.message) for w in caught if issubclass(w.category, orthofx.OrthofxWarning)]
        assert len(messages) == 1, messages
        assert "changes nothing" in messages[0] and "'jacobian-top-level'" in messages[0]
        assert f"came from {made_by}" in messages[0] and "inlined its containers" in messages[0]
        assert "one transform of the original model" in messages[0]
        assert "name the model's blocks or layers in a rule" not in messages[0]
    # the original model has the Sequential block: the preset applies there, as the message advises
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = orthofx.transform(model, "jacobian", example_inputs=(x,))
    assert not [w for w in caught if "changes nothing" in str(w.message)]
    assert orthofx.manifest_of(gm).penalties


def test_the_jacobian_preset_on_a_plain_model_without_blocks_keeps_its_advice():
    model, x = orthofx.models.get("small_cnn"), orthofx.models.example_input("small_cnn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        orthofx.transform(model, "jacobian", example_inputs=(x,))
    messages = [str(w.message) for w in caught if issubclass(w.category, orthofx.OrthofxWarning)]
    assert len(messages) == 1 and "name the model's blocks or layers in a rule" in messages[0]
    assert "inlined" not in messages[0]


# ------------------------------------------------------------------ load of cayley_fft layers

_CAYLEY = {"rules": [{"match": {"type": "Conv2d"}, "apply": "orthogonal_conv", "with": {"method": "cayley_fft"}}]}


def _cayley_model():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))


@pytest.fixture
def cayley_file(tmp_path):
    torch.manual_seed(0)
    x8 = torch.randn(2, 2, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", orthofx.OrthofxWarning)
        gm = orthofx.transform(_cayley_model(), _CAYLEY, example_inputs=(x8,))
    path = str(tmp_path / "cayley.pt")
    orthofx.export(gm, path)
    return gm, path, x8


def _load(path, x):
    torch.manual_seed(1)  # another model instance: its weights are replaced by the file's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", orthofx.OrthofxWarning)
        return orthofx.load(_cayley_model(), path, example_inputs=(x,))


def test_load_with_inputs_of_another_size_than_the_saved_cayley_layers_is_refused(cayley_file):
    _, path, _ = cayley_file
    assert torch.load(path, weights_only=True)[CAYLEY_SIZES_KEY] == {"0": [8, 8], "2": [8, 8]}
    with pytest.raises(orthofx.ExportError) as caught:
        _load(path, torch.randn(2, 2, 12, 12))
    message = str(caught.value)
    assert "'0' (saved for (8, 8), built here for (12, 12))" in message
    assert "Pass example inputs of the saved size" in message and "cayley_fft" in message


def test_load_with_inputs_of_the_saved_size_restores_the_model(cayley_file):
    gm, path, x8 = cayley_file
    restored = _load(path, torch.randn(3, 2, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(x8), gm.eval()(x8), rtol=0, atol=0)


def test_a_file_written_before_the_size_record_loads_as_before(cayley_file, tmp_path):
    gm, path, x8 = cayley_file
    content = torch.load(path, weights_only=True)
    del content[CAYLEY_SIZES_KEY]
    old = str(tmp_path / "old.pt")
    torch.save(content, old)
    restored = _load(old, x8)
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(x8), gm.eval()(x8), rtol=0, atol=0)
    _load(old, torch.randn(2, 2, 12, 12))  # unchecked, as such files always were


def test_a_damaged_size_record_is_refused(cayley_file, tmp_path):
    _, path, x8 = cayley_file
    content = torch.load(path, weights_only=True)
    content[CAYLEY_SIZES_KEY] = {"0": ["8", 8]}
    bad = str(tmp_path / "bad.pt")
    torch.save(content, bad)
    with pytest.raises(orthofx.ExportError, match=f"is damaged: '{CAYLEY_SIZES_KEY}'"):
        _load(bad, x8)


# ------------------------------------------------------------------ .pt advice for nested replacements

def _conv_fc():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4))


def test_pt_export_of_an_orthogonal_conv_inside_convnorm_advises_what_can_save_it(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", orthofx.OrthofxWarning)
        twice = orthofx.transform(orthofx.transform(_conv_fc(), "convnorm", example_inputs=(x,)), "orthogonal",
                                  example_inputs=(x,))
        both = orthofx.Policy.from_dict({"rules": [*orthofx.Policy.load("convnorm").to_dict()["rules"],
                                                   *orthofx.Policy.load("orthogonal").to_dict()["rules"]]})
        once = orthofx.transform(_conv_fc(), both, example_inputs=(x,))
    assert type(twice.get_submodule("0.conv")).__name__ == "OrthogonalConv2d"
    # what the old advice promised does not hold: one policy puts no orthogonal conv inside the ConvNorm layer
    assert type(once.get_submodule("0.conv")).__name__ == "Conv2d"
    with pytest.raises(orthofx.ExportError) as caught:
        orthofx.export(twice, str(tmp_path / "twice.pt"))
    message = str(caught.value)
    assert "Nor can one policy rebuild it" in message and "replaced '0.conv' inside '0'" in message
    assert "a policy holding the rules of both" not in message
    assert "torch.save(gm, path)" in message and ".pt2 or .onnx" in message
    # and what it advises works: the whole GraphModule comes back with the same outputs
    saved = tmp_path / "twice_gm.pt"
    torch.save(twice, saved)
    back = torch.load(saved, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), twice.eval()(x), rtol=0, atol=0)


def test_pt_export_of_a_model_transformed_from_a_frozen_one_keeps_the_one_policy_advice(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", orthofx.OrthofxWarning)
        frozen = orthofx.freeze(orthofx.transform(_conv_fc(), "orthogonal", example_inputs=(x,)), example_inputs=(x,))
        again = orthofx.transform(frozen, "lorth", example_inputs=(x,))
    with pytest.raises(orthofx.ExportError, match="a policy holding the rules of both") as caught:
        orthofx.export(again, str(tmp_path / "again.pt"))
    assert "Nor can one policy" not in str(caught.value)


def test_a_file_of_a_model_without_cayley_layers_holds_no_size_record(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", orthofx.OrthofxWarning)
        gm = orthofx.transform(_conv_fc(), "orthogonal", example_inputs=(x,))
    orthofx.export(gm, str(tmp_path / "plain.pt"))
    assert CAYLEY_SIZES_KEY not in torch.load(tmp_path / "plain.pt", weights_only=True)


# ------------------------------------------------------------------ review: what the original model called as blocks

class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class _NoSequential(nn.Module):
    """Blocks of no Sequential type: a custom block called whole, and a ModuleList called element by element."""

    def __init__(self):
        super().__init__()
        self.block1 = _Block()
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.block1(x)
        for block in self.blocks:
            x = block(x)
        return self.fc(x)


def _quiet(run, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", orthofx.OrthofxWarning)
        return run(*args, **kwargs)


def _no_sequential_made():
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    return x, _quiet(orthofx.transform, _NoSequential(), _INIT, example_inputs=(x,))


def _block_rule(**match):
    return {"rules": [{"match": {"kind": "block", **match}, "apply": "jacobian_isometry"}]}


def _plan_error(model, policy, x):
    with pytest.raises(orthofx.PlanError) as caught:
        _quiet(orthofx.transform, model, policy, example_inputs=(x,))
    return str(caught.value)


def test_the_jacobian_preset_claims_no_inlined_blocks_the_original_never_had():
    x, made = _no_sequential_made()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        orthofx.transform(made, "jacobian", example_inputs=(x,))
    messages = [str(w.message) for w in caught if "changes nothing" in str(w.message)]
    assert len(messages) == 1
    assert "inlined" not in messages[0] and "one transform of the original" not in messages[0]
    assert "name the model's blocks or layers in a rule" in messages[0]
    # what the old advice said to do selects nothing: the original has no Sequential block either
    both = orthofx.Policy.from_dict({"rules": [*orthofx.Policy.from_dict(_INIT).to_dict()["rules"],
                                               *orthofx.Policy.load("jacobian").to_dict()["rules"]]})
    assert not orthofx.manifest_of(_quiet(orthofx.transform, _NoSequential(), both,
                                          example_inputs=(x,))).penalties


@pytest.mark.parametrize("match", [{"name": "blocks"},  # a ModuleList: never called whole
                                   {"name": "block1", "type": "Sequential"},  # called, but of another type
                                   {"name": "block1", "type": "TransformerEncoder"}],
                         ids=["module-list", "other-type", "torch-type"])
def test_a_block_rule_the_original_would_not_match_gets_the_usual_message(match):
    x, made = _no_sequential_made()
    assert "matched no block site" in _plan_error(_NoSequential(), _block_rule(**match), x)  # nor on the original
    message = _plan_error(made, _block_rule(**match), x)
    assert "inlined" not in message and "one transform of the original" not in message
    assert "check match.name against model.named_modules()" in message


@pytest.mark.parametrize("match", [{"name": "block1"}, {"name": "blocks.1"}, {"name": "block1", "type": "_Block"},
                                   {"name": "block1", "type": f"{__name__}._Block"}, {"type": "_Block"}],
                         ids=["name", "module-list-element", "own-type", "dotted-type", "type-only"])
def test_a_block_rule_the_original_matches_is_told_of_the_inlining(match):
    x, made = _no_sequential_made()
    message = _plan_error(made, _block_rule(**match), x)
    assert "inlined its containers" in message and "one transform of the original model" in message
    # and the advice holds: on the original model the rule selects the block
    again = _quiet(orthofx.transform, _NoSequential(), _block_rule(**match), example_inputs=(x,))
    assert orthofx.manifest_of(again).penalties


def test_a_sequential_rule_names_only_the_sequential_blocks_the_original_called():
    torch.manual_seed(0)
    x = torch.randn(4, 8)

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
            self.block = _Block()
            self.spare = nn.Sequential(nn.Linear(8, 8), nn.Tanh())  # never called

        def forward(self, x):
            return self.block(self.body(x))

    made = _quiet(orthofx.transform, Mixed(), _INIT, example_inputs=(x,))
    message = _plan_error(made, _block_rule(type="Sequential"), x)
    assert "'body' is in named_modules()" in message
    assert "'block'" not in message and "'spare'" not in message


def test_a_where_rule_is_not_told_of_the_inlining():
    # the record holds types, not attributes: whether the original matched is unknown, so nothing is claimed
    x, made = _no_sequential_made()
    message = _plan_error(made, _block_rule(name="block1", where={"training": True}), x)
    assert "inlined" not in message


def test_the_record_of_the_original_blocks_survives_freeze_a_second_transform_and_pickling(tmp_path):
    x, made = _no_sequential_made()
    record = orthofx.manifest_of(made).original_blocks
    assert set(record) >= {"block1", "blocks.0", "blocks.1", "fc"} and "blocks" not in record
    assert record["block1"][0] == f"{__name__}._Block"
    again = _quiet(orthofx.transform, made, _INIT, example_inputs=(x,))  # its graph calls no block1
    frozen = _quiet(orthofx.freeze, again, example_inputs=(x,))
    torch.save(frozen, tmp_path / "frozen.pt")
    back = torch.load(tmp_path / "frozen.pt", weights_only=False)
    for model in (again, frozen, back):
        assert orthofx.manifest_of(model).original_blocks["block1"] == record["block1"]
        assert "inlined its containers" in _plan_error(model, _block_rule(name="block1"), x)


def test_a_manifest_pickled_before_the_record_claims_nothing():
    import pickle

    from orthofx.transform import store_manifest

    x, made = _no_sequential_made()
    manifest = orthofx.manifest_of(made)
    old = pickle.loads(pickle.dumps(manifest))
    del old.__dict__["original_blocks"]  # as a manifest written before the field was
    old = pickle.loads(pickle.dumps(old))
    assert old.original_blocks is None
    store_manifest(made, old)
    message = _plan_error(made, _block_rule(name="block1"), x)
    assert "inlined" not in message and "check match.name against model.named_modules()" in message


# ------------------------------------------------------------------ review: .pt advice, every earlier layer

def test_pt_advice_looks_inside_every_layer_an_earlier_transform_made(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 64, 4))
    convnorm = _quiet(orthofx.transform, model, "convnorm", example_inputs=(x,))
    second = {"rules": [{"match": {"type": "Conv2d", "name": "2.conv"}, "apply": "orthogonal_conv"}]}
    twice = _quiet(orthofx.transform, convnorm, second, example_inputs=(x,))
    # the first earlier layer keeps its conv; the replacement sits in the second
    assert type(twice.get_submodule("0.conv")) is nn.Conv2d
    assert type(twice.get_submodule("2.conv")).__name__ == "OrthogonalConv2d"
    with pytest.raises(orthofx.ExportError) as caught:
        orthofx.export(twice, str(tmp_path / "twice.pt"))
    message = str(caught.value)
    assert "Nor can one policy rebuild it" in message and "replaced '2.conv' inside '2'" in message
    assert "a policy holding the rules of both" not in message


# ------------------------------------------------------------------ review: L_orth term geometry

def test_lorth_term_of_a_frozen_convnorm_conv_needs_the_model():
    from orthofx.passes.orth_regularizer import lorth_term

    _, frozen, _ = _strided_convnorm_model()
    conv = frozen.get_submodule("0.conv")
    with pytest.raises(orthofx.errors.ArgumentError, match="pass root=") as caught:
        lorth_term(conv, "0.conv", "r", 0.01)
    assert "frozen ConvNorm" in str(caught.value)
    term = lorth_term(conv, "0.conv", "r", 0.01, root=frozen)
    assert tuple(term.stride) == (2, 2) and term.form()[0] == (2, 2)  # what value() uses, stored
    reference = 0.01 * _lorth_ro_reference(conv.weight, 2)
    assert 0.01 * float(term.value(frozen).detach()) == pytest.approx(reference, rel=1e-5)


def test_lorth_value_reads_the_frozen_marker_without_module_getattr(monkeypatch):
    # nn.Module.__getattr__ (the slow path, an AttributeError on every layer that has no marker) is not asked for it
    from orthofx.nn.convnorm import FROZEN_FILTERS_MARKER

    x = torch.randn(2, 3, 8, 8)
    gm = _quiet(orthofx.transform, _conv_fc(), "lorth", example_inputs=(x,))
    asked = []
    original = nn.Module.__getattr__

    def watching(self, name):
        asked.append(name)
        return original(self, name)

    monkeypatch.setattr(nn.Module, "__getattr__", watching)
    total = orthofx.penalty(gm)
    assert FROZEN_FILTERS_MARKER not in asked
    assert float(total.detach()) > 0


# ------------------------------------------------------------------ review: explain's layer column

def test_explain_shows_a_frozen_convnorm_conv_with_the_layers_stride():
    _, frozen, x = _strided_convnorm_model()
    table = str(_quiet(orthofx.explain, frozen, "lorth", example_inputs=(x,)))
    assert "Conv2d(4->8, k=3, s=2; frozen ConvNorm conv)" in table
    assert "Conv2d(8->8, k=3, s=2, d=3; frozen ConvNorm conv)" in table
