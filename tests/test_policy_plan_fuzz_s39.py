"""Policies fuzzed against explain / transform / report (session 39): about 1,400 random policies (dicts, YAML text,
YAML files, Policy objects; 1-4 rules of every registered pass, globs and ``re:`` names, excludes, ``where:``
clauses, valid, boundary and wrong ``with:`` values, ties, presets extended by user rules) on five small models.
Kept: the bugs found, and a compact replay of the invariants on a few fixed policies."""

import copy
import random
import warnings

import pytest
import torch
import yaml
from torch import nn

import orthofx
from orthofx import Policy
from orthofx.errors import OrthofxError, PlanError
from orthofx.passes import available_passes

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))


def _svdvals(weight: torch.Tensor) -> torch.Tensor:
    """The singular values of a Linear's map, from a dense float64 copy of its weight (the reference)."""
    return torch.linalg.svdvals(weight.detach().to(torch.float64))


def _effective(pass_name: str, **given) -> str:
    """The params text of a rule of ``pass_name`` with ``given`` under with:, every default filled in, in the
    pass's order, written from the pass's own Param declarations."""
    values = {param.name: param.default for param in available_passes()[pass_name].params}
    values.update(given)
    return ", ".join(f"{k}={v}" for k, v in values.items())


# ------------------------------------------------------------------------------------------- found bugs


@pytest.mark.parametrize("match", [
    {"type": "Linear", "exclude": "*", "where": {"bias": 3}},   # exclude left out the layers where: cannot compare
    {"name": "nosuch", "where": {"bias": 3}},                     # so did name
])
def test_unmatched_rule_whose_where_fits_no_left_out_layer_is_a_plan_error(match):
    """A rule that matched nothing gets hints computed without its name / exclude, which reach layers the rule never
    compared its where: with; a value those cannot compare (``bias: 3`` against a tensor) raised the internal
    ``_WhereError`` out of explain and transform instead of the rule's PlanError."""
    policy = {"rules": [{"name": "late", "match": match, "apply": "orth_regularizer"}]}
    for run in (lambda: orthofx.explain(_mlp(), policy), lambda: orthofx.transform(_mlp(), policy)):
        with pytest.raises(PlanError, match=r"rule 'late' matched no module site.*optional: true"):
            run()


def test_policy_with_rules_taken_from_another_round_trips_equal():
    """``Policy(rules=[p.rules[1], p.rules[0]])`` keeps each rule's old index; read back from to_dict / to_yaml the
    rules have their new positions. Both plan alike (plans use positions, to_dict writes the names), so the
    policies are equal: ``==`` compared the stale index and said they differed."""
    p = Policy.from_dict({"rules": [{"match": {"name": "0"}, "apply": "riemannian"},
                                    {"match": {"type": "Linear"}, "apply": "orth_regularizer",
                                     "with": {"weight": 0.5}}]})
    moved = Policy(rules=[p.rules[1], p.rules[0]])
    read = [Policy.from_dict(moved.to_dict()), Policy.from_yaml(moved.to_yaml())]
    assert [r.index for r in read[0].rules] == [0, 1] and [r.index for r in moved.rules] == [1, 0]
    assert read[0] == moved and read[1] == moved
    rows = orthofx.explain(_mlp(), moved).rows()
    assert [orthofx.explain(_mlp(), q).rows() for q in read] == [rows, rows]
    assert [(row["site"], row["rule"], row["status"]) for row in rows] == [
        ("0", "orth_regularizer[1]", "apply"), ("0", "riemannian[0]", "shadowed by orth_regularizer[1]"),
        ("2", "orth_regularizer[1]", "apply")]
    assert p != Policy(rules=[p.rules[0]])  # content still compares: a rule less is another policy


def test_report_row_of_a_layer_probed_at_its_module_site_measures_the_layer():
    """jacobian_isometry on a single Linear named by a module rule: the report's row showed the JacobianProbe with
    no lorth / sigma figures, while the same rule as ``kind: block`` showed the layer's. Both now measure it."""
    model = _mlp()
    reference = _svdvals(model[0].weight)
    for kind in ("module", "block"):
        policy = {"rules": [{"match": {"name": "0", "kind": kind}, "apply": "jacobian_isometry",
                             "with": {"weight": 0.01}}]}
        gm = orthofx.transform(model, policy, example_inputs=(torch.randn(2, 4),))
        (row,) = [row for row in orthofx.report(gm).rows if row["site"] == "0"]
        assert row["layer"] == "Linear(4->4)" and row["pass"] == "jacobian_isometry"
        assert row["params"] == _effective("jacobian_isometry", weight=0.01)
        assert row["sigma_min"] == pytest.approx(float(reference.min()), rel=1e-5)
        assert row["sigma_max"] == pytest.approx(float(reference.max()), rel=1e-5)


@pytest.mark.parametrize("block_first", [False, True])
def test_layer_selected_as_module_and_as_block_has_one_report_row(block_first):
    """A layer that one rule selects as a module and another as a block (``kind: block`` naming it) is one site for
    shadowing, and explain lists both entries; the report gave it two rows of one name: one of the JacobianProbe
    without figures that carried the module rule's pass and params, one of the layer that carried the block rule's.
    One row now holds both passes and both params (in policy order), and the layer's figures."""
    module_rule = {"match": {"name": "0"}, "apply": "riemannian"}
    block_rule = {"match": {"name": "0", "kind": "block"}, "apply": "jacobian_isometry", "with": {"weight": 0.01}}
    rules = [block_rule, module_rule] if block_first else [module_rule, block_rule]
    model = _mlp()
    gm = orthofx.transform(model, {"rules": rules}, example_inputs=(torch.randn(2, 4),))
    plan_rows = [row for row in orthofx.explain(model, {"rules": rules}).rows() if row["site"] == "0"]
    assert sorted(row["kind"] for row in plan_rows) == ["block", "module"]
    rows = [row for row in orthofx.report(gm).rows if row["site"] == "0"]
    assert len(rows) == 1
    params = [_effective("jacobian_isometry", weight=0.01), _effective("riemannian")]
    passes = ["jacobian_isometry", "riemannian"]
    if not block_first:
        params.reverse()
        passes.reverse()
    assert rows[0]["params"] == "; ".join(params)
    assert [part.split(" (")[0] for part in rows[0]["pass"].split("; ")] == passes
    assert rows[0]["layer"] == "Linear(4->4)"
    reference = _svdvals(gm.get_submodule("0")._block.weight)
    assert rows[0]["sigma_max"] == pytest.approx(float(reference.max()), rel=1e-5)


class _AliasedGRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 3, batch_first=True)
        self.alias = self.rnn  # one layer, two paths: named_modules() calls it rnn
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.rnn(x)[0])


def test_recurrent_layer_a_rule_names_by_its_other_path_is_not_called_untreated():
    """A rule naming a shared layer by its second path selects it (plans look at every path), but the capture warning
    about recurrent weights that no rule treats looked at the first path only: it said 'no rule of the policy treats
    the recurrent weights' of a GRU that riemannian steps."""
    policy = {"rules": [{"match": {"type": "Linear"}, "apply": "orth_regularizer"},
                        {"match": {"name": "alias"}, "apply": "riemannian"}]}
    plan = orthofx.explain(_AliasedGRU(), policy, (torch.randn(2, 4, 3),))
    assert sorted((e.site.name, e.pass_name) for e in plan.entries) == [("fc", "orth_regularizer"),
                                                                        ("rnn", "riemannian")]
    assert not [w for w in plan.capture.warnings if "recurrent weights" in w]
    # the warning still names a recurrent layer that no rule selects
    untreated = {"rules": [{"match": {"type": "Linear"}, "apply": "orth_regularizer"}]}
    warned = orthofx.explain(_AliasedGRU(), untreated, (torch.randn(2, 4, 3),)).capture.warnings
    assert [w for w in warned if w.startswith("rnn (GRU): no rule of the policy treats the recurrent weights")]


# ------------------------------------------------------------------------------------- invariants, replayed

_REPLAYED = [  # policies of the fuzz, on _Mixed below: ties, presets extended, where:, re: names, optional rules
    {"rules": [{"name": "a", "match": {"type": "Linear", "where": {"bias": False}}, "apply": "riemannian",
                "optional": True},
               {"match": {"name": "re:blocks\\.[01]\\.0"}, "apply": "orth_regularizer", "with": {"every": 2}},
               *Policy.preset("lorth").to_dict()["rules"]]},
    {"rules": [{"match": {"type": ["Conv2d", "Linear"], "exclude": "heads.*"}, "apply": "isometric_init",
                "with": {"gain": 0.5, "seed": 3, "bias": "keep"}},
               {"match": {"type": "Conv2d", "where": {"stride": [1], "kernel_size": 3}}, "apply": "orthogonal_conv",
                "with": {"on_impossible": "regularize", "regularize_weight": 0}},
               {"match": {"name": "heads.*"}, "apply": "orth_regularizer", "with": {"case": "CO", "weight": None}}]},
    {"rules": [{"match": {"type": "Conv2d"}, "apply": "convnorm", "with": {"momentum": 1.0}},
               {"match": {"name": "conv", "kind": "block"}, "apply": "jacobian_isometry",
                "with": {"probes": 2, "kind": "offdiag"}},
               {"match": {"name": "*"}, "apply": "pre_svd", "optional": True}]},
]


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.lin = nn.Linear(3, 3)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(3, 3), nn.Tanh()) for _ in range(2)])
        self.heads = nn.ModuleDict({"a": nn.Linear(3, 2), "b": nn.Linear(3, 2, bias=False)})

    def forward(self, x):
        x = self.conv(x).mean((2, 3))
        x = self.lin(x)
        for block in self.blocks:
            x = block(x)
        x = self.lin(x)  # a shared layer
        return self.heads["a"](x) + self.heads["b"](x)


@pytest.mark.parametrize("index", range(len(_REPLAYED)))
def test_replayed_policy_forms_explain_transform_and_report_agree(index, tmp_path):
    data = _REPLAYED[index]
    written = copy.deepcopy(data)
    text = yaml.safe_dump({"orthofx": 1, **data}, sort_keys=False)
    (tmp_path / "p.yaml").write_text(text)
    forms = [Policy.from_dict(data), Policy.load(data), Policy.from_yaml(text), Policy.load(str(tmp_path / "p.yaml"))]
    assert data == written and all(form == forms[0] for form in forms)
    policy = forms[0]
    assert Policy.from_dict(policy.to_dict()) == policy == Policy.from_yaml(policy.to_yaml())
    kept = copy.deepcopy(policy)
    torch.manual_seed(index)
    model, x = _Mixed(), torch.randn(2, 2, 5, 5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", orthofx.OrthofxWarning)
        plans = [orthofx.explain(model, form, (x,)).rows() for form in forms]
        gm = orthofx.transform(model, policy, (x,))
    assert policy == kept and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    manifest = orthofx.manifest_of(gm)
    assert all(rows == manifest.plan.rows() for rows in plans)
    entries = manifest.plan.entries
    assert entries
    for entry in entries:  # effective params: every parameter of the pass, defaults filled in, in its order
        rule = policy.rules[entry.rule_index]
        given = {k: v for k, v in rule.given_params.items() if v is not None}
        assert entry.params == {p.name: given.get(p.name, p.default) for p in available_passes()[rule.apply].params}
    assert {(c.site, c.pass_name) for c in manifest.changes} == {(e.site.name, e.pass_name) for e in entries}
    for term in manifest.penalties:
        assert term.rule in {e.rule_name for e in entries if e.site.name == term.site}
    rows = {row["site"]: row for row in orthofx.report(gm).rows}
    assert len(rows) == len(orthofx.report(gm).rows)  # one row per site
    for site in {e.site.name for e in entries}:
        mine = [e for e in entries if e.site.name == site]
        assert rows[site]["params"] == "; ".join(", ".join(f"{k}={v}" for k, v in e.params.items()) for e in mine)


def test_fuzzed_bad_policies_raise_policy_errors_in_every_form(tmp_path):
    """Random wrong values under with: and match: never escape as a raw KeyError / TypeError / ValueError, and a
    dict, YAML text and a YAML file give one message (the place aside)."""
    rng = random.Random(39)
    bad_values = [-1, "x", [1], {"a": 1}, float("inf"), 10 ** 30, "None", True, 1.5]
    passes = available_passes()
    checked = 0
    for _ in range(40):
        name = rng.choice(sorted(passes))
        params = passes[name].params
        rule = {"match": {"op": "eigh"} if passes[name].ops else {"type": "Linear"}, "apply": name,
                "with": {rng.choice(params).name: rng.choice(bad_values)}}
        if rng.random() < 0.3:
            rule["match"]["kind"] = rng.choice(["blok", 3, None])
        data = {"rules": [rule]}
        text = yaml.safe_dump({"orthofx": 1, **data})
        (tmp_path / "p.yaml").write_text(text)
        messages = []
        for load in (lambda: Policy.from_dict(data), lambda: Policy.from_yaml(text),
                     lambda: Policy.load(tmp_path / "p.yaml")):
            try:
                load()
                messages.append(None)
            except OrthofxError as error:
                messages.append(str(error).split(": ", 1)[1])
        assert len(set(messages)) == 1, messages
        checked += messages[0] is not None
        if messages[0] is not None:
            assert "rules[0]" in messages[0]
    assert checked > 25


@pytest.mark.parametrize("edit, field", [
    (lambda p: setattr(p.capture, "leaf_modules", "Linear"), "capture.leaf_modules"),    # was written as L, i, n ...
    (lambda p: setattr(p.rules[0], "optional", "yes"), "rules[0].optional"),             # was written as true
    (lambda p: p.rules[0].params.update(nosuch=1), "nosuch"),                            # was dropped
    (lambda p: setattr(p.rules[0].match, "where", [("bias", True)]), "rules[0].match.where"),  # AttributeError
    (lambda p: setattr(p.rules[0].match, "type", (nn.Linear,)), "rules[0].match.type[0]"),     # RepresenterError
    (lambda p: setattr(p, "capture", None), "capture"),                                  # AttributeError
], ids=["leaf_modules", "optional", "params", "where", "type", "capture"])
def test_to_yaml_of_a_policy_changed_in_code_checks_it_first(edit, field):
    """to_dict / to_yaml (what a .pt export writes) of a Policy edited field by field wrote its mistakes out as other
    content, which read back as another policy, or failed in the YAML writer with a raw error; they now raise the
    PolicyError that transform raises for the same object."""
    policy = Policy.from_dict({"rules": [{"name": "r", "match": {"type": "Linear"}, "apply": "orth_regularizer"}]})
    assert Policy.from_yaml(policy.to_yaml()) == policy
    edit(policy)
    with pytest.raises(orthofx.PolicyError) as used:
        orthofx.transform(_mlp(), policy)
    for write in (policy.to_dict, policy.to_yaml):
        with pytest.raises(orthofx.PolicyError) as written:
            write()
        assert str(written.value) == str(used.value) and field in str(written.value)


def test_policy_built_in_code_with_lists_round_trips_equal():
    """The dataclasses take lists where a read policy holds tuples (``Match(type=["Linear"])``, ``where={"kernel_size":
    [3, 3]}``, ``CaptureConfig(leaf_modules=[...])``, ``rules`` as a tuple, ``description=None``): transform accepts
    such a Policy and plans it as the read one, but ``Policy.from_yaml(p.to_yaml()) == p`` was False."""
    from orthofx.policy import CaptureConfig, Match, Rule
    params = {p.name: p.default for p in available_passes()["orth_regularizer"].params}
    rule = Rule(name="r", match=Match(type=["Conv2d", "Linear"], where={"kernel_size": [3, 3]}),
                apply="orth_regularizer", params=params)
    built = Policy(capture=CaptureConfig(leaf_modules=["Tanh"]), rules=(rule,), description=None)
    read = Policy.from_yaml(built.to_yaml())
    assert read == built and built == read and not read != built
    assert orthofx.explain(_Mixed(), built).rows() == orthofx.explain(_Mixed(), read).rows()
    assert [row["site"] for row in orthofx.explain(_Mixed(), read).rows()] == ["conv"]
    # content still compares
    other = Policy(capture=CaptureConfig(leaf_modules=["Tanh"]), rules=[Rule(
        name="r", match=Match(type=["Conv2d", "Linear"], where={"kernel_size": [3, 5]}), apply="orth_regularizer",
        params=dict(params))])
    assert other != read and Policy(rules=[rule], description="d") != Policy(rules=[rule])
    assert CaptureConfig(leaf_modules=["Tanh"]) != CaptureConfig(leaf_modules=["Tanh"], mode="fx")
