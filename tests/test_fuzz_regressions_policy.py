"""Regressions found by fuzzing policy loading and rule matching (one test per bug).

Each test throws one reduced input at :class:`orthofx.Policy` or :func:`orthofx.explain` and checks the
exact outcome: an orthofx error naming the place and the fix, or the value the input means.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthofx
from orthofx import Policy
from orthofx.errors import PlanError, PolicyError


def _rule_policy(match: dict, **rule) -> dict:
    return {"orthofx": 1, "rules": [{"match": match, "apply": "orth_regularizer", **rule}]}


# ----------------------------------------------------------------------------------------- regular expressions

def test_regex_with_repeat_count_beyond_re_limit_is_a_policy_error():
    # re.compile raised OverflowError ("the repetition number is too large"), which escaped from_yaml
    text = ("orthofx: 1\nrules:\n"
            "  - match: {type: Conv2d, name: 're:conv{99999999999}'}\n"
            "    apply: orth_regularizer\n")
    with pytest.raises(PolicyError) as info:
        Policy.from_yaml(text)
    err = info.value
    assert (err.line, err.column) == (3, 33)
    assert "rules[0].match.name: invalid regular expression 'conv{99999999999}'" in str(err)
    assert "repeat count" in str(err) and "4294967294" in str(err)


def test_regex_nested_too_deeply_is_a_policy_error():
    # re's recursive parser raised RecursionError for ~1000 nested groups, which escaped from_dict
    regex = "(" * 1000 + "a" + ")" * 1000
    with pytest.raises(PolicyError) as info:
        Policy.from_dict(_rule_policy({"type": "Conv2d", "exclude": ["fc", "re:" + regex]}))
    message = str(info.value)
    assert message.startswith("<dict>: rules[0].match.exclude[1]: invalid regular expression '((((")
    assert "...: groups are nested too deeply" in message
    assert len(message) < 300  # the 2001-character expression is not echoed whole


# ----------------------------------------------------------------------------------------- YAML scalars

def test_plain_equals_sign_and_double_angle_are_text_not_yaml_tags():
    # YAML 1.1 resolves a plain '=' to !!value and '<<' to !!merge; the loader reported "YAML tag '!!value' is
    # not allowed" for text the user wrote without any tag
    text = ("orthofx: 1\nrules:\n"
            "  - name: <<\n"
            "    match: {type: Conv2d, exclude: =, where: {padding_mode: =}}\n"
            "    apply: orth_regularizer\n")
    policy = Policy.from_yaml(text)
    rule = policy.rules[0]
    assert rule.name == "<<"
    assert rule.match.exclude == ("=",)
    assert rule.match.where == {"padding_mode": "="}
    assert Policy.from_yaml(policy.to_yaml()) == policy
    # a merge key is still refused, and '=' as a key is an unknown key, both with their position
    with pytest.raises(PolicyError, match=r"^<string>:6:5: unknown key '=' in rules\[0\]"):
        Policy.from_yaml(text + "    =: 1\n")
    with pytest.raises(PolicyError, match=r"^<string>:6:5: YAML merge keys \('<<'\) are not supported"):
        Policy.from_yaml(text + "    <<: {optional: true}\n")


# ----------------------------------------------------------------------------------------- capture.leaf_modules

@pytest.mark.parametrize("entry", ["...", ".Conv2d", "Conv2d.", "mypkg..Block"])
def test_leaf_module_entry_with_an_empty_dotted_part_is_refused(entry):
    # such an entry can name no class, class path or module path; it was accepted and silently did nothing
    text = f"orthofx: 1\ncapture:\n  leaf_modules: [Block, '{entry}']\nrules:\n" \
           "  - {match: {type: Conv2d}, apply: orth_regularizer}\n"
    with pytest.raises(PolicyError) as info:
        Policy.from_yaml(text)
    assert (info.value.line, info.value.column) == (3, 25)
    assert "capture.leaf_modules[1] must be a class name, dotted class path or module name" in str(info.value)
    assert f"empty dotted parts (e.g. MyAttention, mypkg.MyAttention, encoder.layers.0), found {entry!r}" \
        in str(info.value)


def test_leaf_module_entry_naming_nothing_in_the_model_is_reported():
    # a misspelt entry (or a re-exported class path, which capture does not resolve) kept nothing as a leaf and
    # explain said nothing about it
    model = orthofx.models.get("small_cnn")
    policy = {"orthofx": 1, "capture": {"leaf_modules": ["conv1", "Conv2x", "torch.nn.Conv2d", "ReLU"]},
              "rules": [{"match": {"type": "Conv2d"}, "apply": "orth_regularizer"}]}
    warnings = orthofx.explain(model, policy).capture.warnings
    assert warnings == [
        "capture.leaf_modules entry 'Conv2x' names no submodule path and no class of the model, so it keeps "
        "nothing as a leaf (did you mean Conv2d?)",
        "capture.leaf_modules entry 'torch.nn.Conv2d' names no submodule path and no class of the model, so it "
        "keeps nothing as a leaf; torch.nn.Conv2d is defined as torch.nn.modules.conv.Conv2d: write that path or "
        "the class name Conv2d",
    ]


# ----------------------------------------------------------------------------------------- type: / where:

class _Scaled(nn.Module):
    """A conv whose attributes are no plain values: a tuple of tensors and a property that raises."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.conv.scales = (torch.ones(2), torch.ones(2))

    def forward(self, x):
        return self.conv(x)


class _RaisingProperty(nn.Conv2d):
    @property
    def fan(self):
        raise RuntimeError("fan is computed lazily")


class _WithProperty(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = _RaisingProperty(2, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_where_on_a_tuple_of_tensors_is_a_plan_error():
    # (t1, t2) compared entry by entry with 1 gave tensors whose truth value raised RuntimeError out of explain
    policy = _rule_policy({"type": "Conv2d", "where": {"scales": 1}})
    with pytest.raises(PlanError) as info:
        orthofx.explain(_Scaled(), policy)
    message = str(info.value)
    assert message.startswith("rule 'orth_regularizer[0]': match.where.scales: attribute 'scales' of Conv2d is no "
                              "plain value (a Tensor in it cannot be compared with 1")
    assert message.endswith("(at site 'conv')")


def test_where_on_a_property_that_raises_is_a_plan_error():
    # hasattr() lets anything but AttributeError through: the property's RuntimeError escaped explain
    policy = _rule_policy({"type": "Conv2d", "where": {"fan": 4}})
    with pytest.raises(PlanError) as info:
        orthofx.explain(_WithProperty(), policy)
    assert str(info.value) == (
        "rule 'orth_regularizer[0]': match.where.fan: reading attribute 'fan' of _RaisingProperty raised "
        "RuntimeError: fan is computed lazily; filter on plain attributes such as groups, stride, kernel_size, "
        "padding_mode, or narrow the match so it does not select this layer (at site 'conv')")


def test_dotted_type_through_a_module_getattr_that_raises_matches_nothing():
    # resolving 'torch.classes.nosuch.Block' called torch.classes.__getattr__, whose RuntimeError escaped explain
    model = orthofx.models.get("small_cnn")
    policy = {"orthofx": 1, "rules": [
        {"name": "soft", "match": {"type": "Conv2d"}, "apply": "orth_regularizer"},
        {"name": "odd", "match": {"type": "torch.classes.nosuch.Block"}, "apply": "convnorm", "optional": True},
    ]}
    plan = orthofx.explain(model, policy)
    assert plan.unmatched_optional == ["odd"]
    assert sorted(e.site.name for e in plan.entries) == ["conv1", "conv2", "conv3"]
    with pytest.raises(PlanError, match=r"^rule 'odd' matched no module site; the graph's module sites: Conv2d x3"):
        orthofx.explain(model, {"orthofx": 1, "rules": [dict(policy["rules"][1], optional=False)]})


def test_base_60_numbers_are_read_as_the_text_written():
    """YAML 1.1 reads `1:30` as 90 (base 60): a rule named 1:30 kept that name only as '90', and `weight: 1:30`
    silently became a weight of 90. They are the text written, which the key's own check then judges."""
    named = orthofx.Policy.from_yaml("orthofx: 1\nrules:\n  - name: 1:30\n    match: {type: Conv2d}\n"
                                     "    apply: orth_regularizer\n")
    assert named.rules[0].name == "1:30"
    again = orthofx.Policy.from_yaml(named.to_yaml())
    assert again.rules[0].name == "1:30"
    with pytest.raises(orthofx.PolicyError, match=r"weight.*'1:30'"):
        orthofx.Policy.from_yaml("orthofx: 1\nrules:\n  - match: {type: Conv2d}\n    apply: orth_regularizer\n"
                                 "    with: {weight: 1:30}\n")
    with pytest.raises(orthofx.PolicyError, match=r"weight.*'1:30.5'"):
        orthofx.Policy.from_yaml("orthofx: 1\nrules:\n  - match: {type: Conv2d}\n    apply: orth_regularizer\n"
                                 "    with: {weight: 1:30.5}\n")


def test_did_you_mean_ignores_case():
    with pytest.raises(orthofx.PolicyError, match=r"'LORTH' is neither a preset.*did you mean 'lorth'\?"):
        orthofx.Policy.load("LORTH")
    with pytest.raises(orthofx.PolicyError, match=r"did you mean 'orth_regularizer'\?"):
        orthofx.Policy.from_dict({"rules": [{"match": {"type": "Conv2d"}, "apply": "Orth_Regularizer"}]})
