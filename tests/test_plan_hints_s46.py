"""Hints of planning and policy errors (session 46).

- A module rule naming a container the graph does not call (``name: layer1``, ``type: BasicBlock`` on a ResNet:
  capture traced through them, the layers inside are the sites) was told "the closest name to 'layer1' is
  layer4.1.conv2", or nothing at all; it is now told that the name is a container, with the pattern for the layers
  inside it and the block rule for the container as a whole (both checked to select what they say).
- A missing ``.json`` / ``.txt`` policy file was "neither a preset nor an existing file"; a path written unquoted
  (``name: 0``) and a YAML 1.2 integer (``seed: 0o17``, a string for PyYAML) get the fix.
- A weight that is a plain tensor no pre-hook sets: the skip reason said "a write to the weight is lost", which is
  false there (the write stays; it is no parameter, so nothing trains it).
- pre_svd's ``weight: orthogonal`` after a convnorm rule on the same layer: explain said ``apply``, transform put
  L_orth on the ConvNorm layer.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import PlanError, PolicyError

pytestmark = pytest.mark.usefixtures("one_thread")


def _plan_error(model: nn.Module, *rules: dict) -> str:
    with pytest.raises(PlanError) as raised:
        orthofx.explain(model, {"rules": list(rules)})
    return str(raised.value)


def _entries(model: nn.Module, *rules: dict) -> list[tuple[str, str]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = orthofx.explain(model, {"rules": list(rules)})
    return [(entry.site.name, entry.site.kind) for entry in plan.entries]


# ----------------------------------------------------------------------------------------------- containers

@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return orthofx.models.get("resnet18")


def test_a_name_naming_a_resnet_stage_says_it_is_a_container_and_how_to_select_inside_it(resnet):
    message = _plan_error(resnet, {"match": {"name": "layer1"}, "apply": "orth_regularizer"})
    assert "closest name" not in message and "layer4.1.conv2" not in message
    assert ("'layer1' names layer1 (Sequential), a container the graph does not call (capture traced through its "
            "forward: the layers inside are the sites): write 'layer1.*' for the 4 layer(s) inside that it selects "
            "otherwise") in message
    assert ("or, for the container as a whole, a rule {kind: block, name: 'layer1'} with a pass that takes blocks "
            "(jacobian_isometry)") in message
    # what the hint proposes selects what it says
    assert _entries(resnet, {"match": {"name": "layer1.*"}, "apply": "orth_regularizer"}) == [
        (f"layer1.{block}.conv{conv}", "module") for block in (0, 1) for conv in (1, 2)]
    assert _entries(resnet, {"match": {"kind": "block", "name": "layer1"}, "apply": "jacobian_isometry"}) == [
        ("layer1", "block")]


def test_a_name_naming_a_basic_block_is_no_longer_sent_to_an_arbitrary_layer_inside(resnet):
    message = _plan_error(resnet, {"match": {"name": "layer1.0", "type": "Conv2d"}, "apply": "orth_regularizer"})
    assert "closest name" not in message
    assert "'layer1.0' names layer1.0 (BasicBlock), a container the graph does not call" in message
    assert "write 'layer1.0.*' for the 2 layer(s) inside that it selects otherwise (layer1.0.conv1, layer1.0.conv2)" \
        in message


def test_a_type_naming_a_traced_through_class_of_the_model_says_so(resnet):
    # BasicBlock is a class of the model (no unknown-type hint), whose instances capture traced through: no hint at all
    message = _plan_error(resnet, {"match": {"type": "BasicBlock"}, "apply": "orth_regularizer"})
    assert ("Its match.type (BasicBlock) selects layer1.0, layer1.1, layer2.0 and 5 more (BasicBlock), containers "
            "the graph does not call") in message
    assert "select the layers inside by their own type (Conv2d) and name (e.g. {type: Conv2d, name: 'layer1.0.*'})" \
        in message
    assert "a rule {kind: block, type: BasicBlock} with a pass that takes blocks (jacobian_isometry)" in message
    assert _entries(resnet, {"match": {"type": "Conv2d", "name": "layer1.0.*"}, "apply": "orth_regularizer"}) == [
        ("layer1.0.conv1", "module"), ("layer1.0.conv2", "module")]
    blocks = _entries(resnet, {"match": {"kind": "block", "type": "BasicBlock"}, "apply": "jacobian_isometry"})
    assert blocks == [(f"layer{stage}.{i}", "block") for stage in (1, 2, 3, 4) for i in (0, 1)]


def test_a_type_selecting_nested_containers_proposes_one_block_by_name(resnet):
    # type: Sequential selects layer1 and layer2.0.shortcut inside layer2: blocks of both would nest
    message = _plan_error(resnet, {"match": {"type": "Sequential"}, "apply": "orth_regularizer"})
    assert "Its match.type (Sequential) selects layer1, layer2, layer2.0.shortcut and 4 more (Sequential)" in message
    assert "{kind: block, name: 'layer1'}" in message and "{kind: block, type: Sequential}" not in message


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.gate = nn.Linear(6, 6)

    def forward(self, x):
        return torch.tanh(self.lin(x)) * torch.sigmoid(self.gate(x))


class _Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(_Inner(), _Inner())
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.fixture
def nested():
    torch.manual_seed(0)
    return _Nested()


@pytest.mark.parametrize("pattern, container, inside, proposed", [
    ("body", "body (Sequential)", "the 4 layer(s)", "'body.*'"),
    ("body.1", "body.1 (_Inner)", "the 2 layer(s)", "'body.1.*'"),
    ("re:body", "body (Sequential)", "the 4 layer(s)", "'re:body\\..*'"),
    ("re:body|nothing", "body (Sequential)", "the 4 layer(s)", "'re:(?:body|nothing)\\..*'"),
])
def test_a_small_nested_model_gets_the_container_hint(nested, pattern, container, inside, proposed):
    message = _plan_error(nested, {"match": {"name": pattern}, "apply": "orth_regularizer"})
    assert "closest name" not in message and "must match a whole name" not in message
    assert f"'{pattern}' names {container}, a container the graph does not call" in message
    assert f"write {proposed} for {inside} inside that it selects otherwise" in message
    selected = _entries(nested, {"match": {"name": proposed.strip("'")}, "apply": "orth_regularizer"})
    assert [name for name, _ in selected] == [f"body.{i}.{layer}" for i in ((0, 1) if pattern != "body.1" else (1,))
                                              for layer in ("lin", "gate")]


def test_a_small_nested_model_gets_the_type_hint(nested):
    message = _plan_error(nested, {"match": {"type": "_Inner"}, "apply": "orth_regularizer"})
    assert "Its match.type (_Inner) selects body.0, body.1 (_Inner), containers the graph does not call" in message
    assert "(e.g. {type: Linear, name: 'body.0.*'})" in message


def test_a_rule_whose_pass_takes_blocks_is_told_to_use_kind_block_itself(nested):
    message = _plan_error(nested, {"match": {"name": "body.0"}, "apply": "jacobian_isometry"})
    assert "'body.0' names body.0 (_Inner)" in message
    assert "or {kind: block, name: 'body.0'} for the container as a whole." in message
    assert _entries(nested, {"match": {"kind": "block", "name": "body.0"}, "apply": "jacobian_isometry"}) == [
        ("body.0", "block")]


def test_a_model_orthofx_made_is_not_sent_to_a_block_rule(nested):
    # its graph inlined the containers for good (a block rule is refused there): only the layers inside are proposed
    gm = orthofx.transform(nested, {"rules": [{"match": {"name": "head"}, "apply": "isometric_init"}]})
    message = _plan_error(gm, {"match": {"name": "body"}, "apply": "isometric_init"})
    assert "'body' names body (Module), a container the graph does not call" in message
    assert "write 'body.*' for the 4 layer(s)" in message and "kind: block" not in message


def test_a_misspelt_name_still_gets_the_closest_one(nested):
    message = _plan_error(nested, {"match": {"name": "haed"}, "apply": "orth_regularizer"})
    assert "the closest name to 'haed' is head" in message and "container" not in message


# -------------------------------------------------------------------------------------------------- policy

@pytest.mark.parametrize("word", ["nofile.json", "nofile.txt", "policies/nofile", "nofile.yaml"])
@pytest.mark.parametrize("read", [orthofx.Policy.load, orthofx.Policy.from_yaml], ids=["load", "from_yaml"])
def test_a_missing_policy_file_of_any_suffix_is_not_found(tmp_path, monkeypatch, word, read):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PolicyError) as raised:
        read(word)
    assert str(raised.value).endswith(f"policy file not found: {word!r}")
    assert raised.value.file == word


@pytest.mark.parametrize("word, expected", [
    ("lorht", "'lorht' is neither a preset nor an existing file (did you mean 'lorth'?)"),
    ("1.5", "'1.5' is neither a preset nor an existing file"),
])
def test_words_that_are_no_paths_keep_their_messages(tmp_path, monkeypatch, word, expected):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PolicyError, match=re.escape(expected)):
        orthofx.Policy.load(word)


def test_an_existing_json_file_is_still_read():
    # JSON is YAML: a .json policy file that exists is read as before
    import json
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/p.json"
        with open(path, "w") as f:
            json.dump({"orthofx": 1, "rules": [{"match": {"type": "Linear"}, "apply": "orth_regularizer"}]}, f)
        assert orthofx.Policy.load(path).rules[0].apply == "orth_regularizer"


_RULE = "orthofx: 1\nrules:\n  - match: {match}\n    apply: {apply}\n"


@pytest.mark.parametrize("match, where, value", [
    ("{name: 0}", "rules[0].match.name", "0"),
    ("{type: Linear, exclude: [1]}", "rules[0].match.exclude[0]", "1"),
    ("{name: [a, 2]}", "rules[0].match.name[1]", "2"),
])
def test_an_unquoted_sequential_child_name_is_told_to_quote_it(match, where, value):
    with pytest.raises(PolicyError) as raised:
        orthofx.Policy.load(_RULE.format(match=match, apply="orth_regularizer"))
    message = str(raised.value)
    assert f"{where} must be a string" in message and f"found an integer ({value}); quote it: '{value}'" in message
    # the fix works: quoted, the rule selects the Sequential's child
    quoted = re.sub(r"\b(\d)\b", r"'\1'", match)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
    plan = orthofx.explain(model, _RULE.format(match=quoted, apply="orth_regularizer"))
    assert plan.entries


def test_a_type_given_a_number_gets_no_quote_hint():
    with pytest.raises(PolicyError) as raised:
        orthofx.Policy.load(_RULE.format(match="{type: 3}", apply="orth_regularizer"))
    assert "quote it" not in str(raised.value)


@pytest.mark.parametrize("text, decimal", [("0o17", 15), ("0X1F", 31), ("0B11", 3), ("'0o17'", 15)])
def test_an_integer_yaml_1_1_reads_as_text_gets_its_decimal(text, decimal):
    import yaml
    assert isinstance(yaml.safe_load(f"v: {text}")["v"], str)  # what PyYAML does with it
    policy = _RULE.format(match="{type: Linear}", apply="isometric_init") + f"    with: {{seed: {text}}}\n"
    with pytest.raises(PolicyError) as raised:
        orthofx.Policy.load(policy)
    assert str(raised.value).endswith(f"write the decimal {decimal}")
    fixed = orthofx.Policy.load(policy.replace(text, str(decimal)))
    assert fixed.rules[0].params["seed"] == decimal == int(text.strip("'"), 0)


def test_lower_case_hexadecimal_is_read_by_yaml_1_1_and_accepted():
    policy = _RULE.format(match="{type: Linear}", apply="isometric_init") + "    with: {seed: 0x10}\n"
    assert orthofx.Policy.load(policy).rules[0].params["seed"] == 16


# --------------------------------------------------------------------------------------- computed weights

def _skips(model: nn.Module) -> dict[str, str]:
    x = torch.randn(4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = orthofx.explain(model, "isometric", example_inputs=(x,))
    return {rule: reason for site, rule, reason in plan.skipped if site.name == "2"}


def _plain_weight_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    model[2].weight = model[2]._parameters.pop("weight").detach().clone()
    return model


def test_a_plain_tensor_weight_without_a_pre_hook_is_not_said_to_lose_a_write():
    model = _plain_weight_model()
    skips = _skips(model)
    assert set(skips) == {"isometric-init", "stiefel-square-linears"}
    for reason in skips.values():
        assert "a write to the weight is lost" not in reason
        assert ("a write to it would not be trained (it is no parameter the optimizer holds) and lasts only until "
                "the code that set it sets it again (orth_regularizer, which reads the weight, works here)") in reason
    # what the old text denied: a write to such a weight stays across calls (nothing sets it again here)
    layer = model[2]
    with torch.no_grad():
        layer.weight.copy_(torch.eye(8))
    layer(torch.randn(2, 8))
    assert torch.equal(layer.weight, torch.eye(8)) and not isinstance(layer.weight, nn.Parameter)


class _Recompute:
    def __call__(self, module, inputs):
        module.weight = module.weight_raw * 1.0


def test_a_weight_a_pre_hook_recomputes_still_loses_a_write():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    layer = model[2]
    layer.weight_raw = nn.Parameter(layer._parameters.pop("weight").detach().clone())
    layer.weight = layer.weight_raw * 1.0
    layer.register_forward_pre_hook(_Recompute())
    reasons = _skips(model).values()
    assert reasons and all("a write to the weight is lost" in reason for reason in reasons)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(8))
    layer(torch.randn(2, 8))
    assert not torch.equal(layer.weight, torch.eye(8))  # the hook recomputed it: the write was lost


def test_a_parametrized_weight_still_loses_a_write():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    torch.nn.utils.parametrizations.weight_norm(model[2])
    reasons = _skips(model).values()
    assert reasons and all("a write to the weight is lost" in reason for reason in reasons)


# ------------------------------------------------------------------------------- convnorm, then pre_svd / ...

class _Conv1dFeedsEigh(nn.Module):
    """A Conv1d feeding ``linalg.eigh`` of the covariance of its output channels."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Conv1d(4, 4, 3, padding=1)

    def forward(self, x):
        h = self.layer(x)
        cov = h @ h.transpose(1, 2) / h.shape[-1] + 1e-3 * torch.eye(4)
        return torch.linalg.eigh(cov)[0].sum()


_CONVNORM = {"name": "cn", "match": {"name": "layer"}, "apply": "convnorm"}
_PRESVD = {"name": "ps", "match": {"feeds": "linalg.eigh"}, "apply": "pre_svd", "with": {"weight": "orthogonal"}}


def _explain_and_transform(policy: dict):
    torch.manual_seed(0)
    model = _Conv1dFeedsEigh()
    x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = orthofx.explain(model, policy, example_inputs=(x,))
        gm = orthofx.transform(model, policy, example_inputs=(x,))
    return plan, gm


def test_pre_svd_orthogonal_after_convnorm_is_explained_as_lorth():
    plan, gm = _explain_and_transform({"rules": [_CONVNORM, _PRESVD]})
    change = next(c for c in orthofx.manifest_of(gm).changes if c.rule == "ps")
    assert change.after["fallback"].startswith("the layer is a ConvNormConv1d now (an earlier rule wrapped it)")
    rows = {r["rule"]: r["status"] for r in plan.rows()}
    assert rows == {"cn": "apply", "ps": f"apply: L_orth instead: {change.after['fallback']}"}
    entry = next(e for e in plan.entries if e.rule_name == "ps")
    assert entry.replaced_by == ("cn", "convnorm")
    assert next(e for e in plan.entries if e.rule_name == "cn").replaced_by is None
    assert type(gm.get_submodule("layer")).__name__ == "ConvNormConv1d"  # not replaced by an orthogonal layer


def test_pre_svd_without_weight_orthogonal_after_convnorm_still_says_apply():
    plan, gm = _explain_and_transform({"rules": [_CONVNORM, {**_PRESVD, "with": {"weight": "lorth"}}]})
    assert {r["rule"]: r["status"] for r in plan.rows()} == {"cn": "apply", "ps": "apply"}
    change = next(c for c in orthofx.manifest_of(gm).changes if c.rule == "ps")
    assert change.status.startswith("L_orth")


def test_orthogonal_conv_after_convnorm_is_refused_alike_by_explain_and_transform():
    # orthogonal_conv needs the original layer: planning skips it (explain and transform share the plan)
    rule = {"name": "oc", "match": {"name": "layer"}, "apply": "orthogonal_conv", "optional": True}
    plan, gm = _explain_and_transform({"rules": [_CONVNORM, rule]})
    skipped = {(site.name, name): reason for site, name, reason in plan.skipped}
    assert skipped[("layer", "oc")].startswith("rule 'cn' (convnorm) replaces this layer earlier in the policy")
    assert skipped == {(site.name, name): reason for site, name, reason in orthofx.manifest_of(gm).plan.skipped}
    assert [c.rule for c in orthofx.manifest_of(gm).changes] == ["cn"]
