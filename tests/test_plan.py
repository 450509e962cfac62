"""Sites, rule matching, precedence and the feeds analysis."""

import operator

import pytest
import torch
from torch import nn

import orthofx
from orthofx.capture import capture
from orthofx.passes import Change, Pass, register_pass, unregister_pass
from orthofx.plan import build_plan, collect_sites, describe_module


def plan_for(model, rules, **capture_kwargs):
    policy = orthofx.Policy.from_dict({"orthofx": 1, "rules": rules})
    return orthofx.explain(model, policy)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2))
        self.layer2 = nn.Sequential(nn.Conv2d(16, 16, 1, groups=2), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def applied_sites(plan, rule=None):
    return [e.site.name for e in plan.entries if rule is None or e.rule_name == rule]


def test_module_sites_follow_named_modules():
    plan = plan_for(Net(), [{"match": {"type": ["Conv2d", "Linear"]}, "apply": "orth_regularizer"}])
    names = dict(Net().named_modules())
    assert applied_sites(plan) == ["stem", "layer1.0", "layer1.2", "layer2.0", "fc"]
    assert all(name in names for name in applied_sites(plan))


@pytest.mark.parametrize("pattern, expected", [
    ("layer1.*", ["layer1.0", "layer1.2"]),
    ("re:layer\\d\\.0", ["layer1.0", "layer2.0"]),
    ("re:layer", []),  # a regular expression must match the whole name
    ("*", ["stem", "layer1.0", "layer1.2", "layer2.0"]),
])
def test_name_patterns(pattern, expected):
    rules = [{"match": {"type": "Conv2d", "name": pattern}, "apply": "orth_regularizer", "optional": True}]
    assert applied_sites(plan_for(Net(), rules)) == expected


def test_exclude_and_where_filters():
    rules = [{"match": {"type": "Conv2d", "exclude": ["stem"], "where": {"groups": 1, "kernel_size": 3}},
              "apply": "orth_regularizer"}]
    assert applied_sites(plan_for(Net(), rules)) == ["layer1.0", "layer1.2"]
    rules = [{"match": {"type": "Conv2d", "where": {"stride": [2, 2]}}, "apply": "orth_regularizer"}]
    assert applied_sites(plan_for(Net(), rules)) == ["layer1.2"]


def test_where_true_on_an_integer_attribute_is_refused():
    # True == 1 in Python: 'groups: true' would otherwise select exactly the ungrouped convs
    rules = [{"match": {"type": "Conv2d", "where": {"groups": True}}, "apply": "orth_regularizer"}]
    with pytest.raises(orthofx.PlanError, match=r"where\.groups: .* is 1, not a tensor or a flag.*'groups: 1'"):
        plan_for(Net(), rules)
    rules = [{"match": {"type": "Conv2d", "where": {"bias": False}}, "apply": "orth_regularizer", "optional": True}]
    assert applied_sites(plan_for(Net(), rules)) == []  # a tensor attribute still takes true / false


def test_a_misspelt_where_attribute_is_named_when_nothing_matches():
    rules = [{"match": {"type": "Conv2d", "where": {"kernal_size": 3}}, "apply": "orth_regularizer"}]
    with pytest.raises(orthofx.PlanError, match=r"has an attribute 'kernal_size' \(did you mean kernel_size\?\)"):
        plan_for(Net(), rules)
    rules = [{"match": {"type": "Conv2d", "where": {"kernel_size": 7}}, "apply": "orth_regularizer"}]
    with pytest.raises(orthofx.PlanError, match="matched no module site") as info:
        plan_for(Net(), rules)
    assert "did you mean" not in str(info.value)  # an existing attribute with no matching value: no hint

def test_type_matches_subclasses_and_dotted_paths():
    class MyConv(nn.Conv2d):
        pass

    model = nn.Sequential(MyConv(3, 4, 3), nn.Conv2d(4, 4, 3))
    assert applied_sites(plan_for(model, [{"match": {"type": "Conv2d"}, "apply": "orth_regularizer"}])) == ["0", "1"]
    dotted = f"{MyConv.__module__}.{MyConv.__qualname__}"
    assert applied_sites(plan_for(model, [{"match": {"type": dotted}, "apply": "orth_regularizer"}])) == ["0"]
    # the public spelling of a torch class (defined in torch.nn.modules.conv) matches like the full path
    for name in ("torch.nn.Conv2d", "torch.nn.modules.conv.Conv2d"):
        assert applied_sites(plan_for(model, [{"match": {"type": name}, "apply": "orth_regularizer"}])) == ["0", "1"]


@pytest.mark.parametrize("later", ["convnorm", "isometric_init"])
def test_a_pass_needing_the_original_layer_after_a_replacing_rule_is_refused(later):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(512, 4))
    rules = [{"name": "hard", "match": {"type": "Conv2d"}, "apply": "orthogonal_conv"},
             {"name": "second", "match": {"type": "Conv2d"}, "apply": later}]
    with pytest.raises(orthofx.PlanError, match="rule 'hard' \\(orthogonal_conv\\) replaces this layer earlier"):
        plan_for(model, rules)  # transform crashed inside the second pass
    if later == "convnorm":  # replaces the layer too: either order is refused
        with pytest.raises(orthofx.PlanError, match="rule 'second' \\(convnorm\\) replaces this layer"):
            plan_for(model, rules[::-1])
        return
    x = torch.randn(1, 3, 8, 8)
    gm = orthofx.transform(model, {"rules": rules[::-1]}, example_inputs=(x,))  # initialise, then replace
    assert type(gm.get_submodule("0")).__name__ == "OrthogonalConv2d"


def test_first_rule_of_a_group_wins_and_later_ones_are_shadowed():
    rules = [
        {"name": "strong", "match": {"type": "Conv2d", "name": "layer1.*"}, "apply": "orth_regularizer",
         "with": {"weight": 1.0}},
        {"name": "weak", "match": {"type": ["Conv2d", "Linear"]}, "apply": "orth_regularizer",
         "with": {"weight": 0.01}},
    ]
    plan = plan_for(Net(), rules)
    by_site = {e.site.name: e for e in plan.entries}
    assert by_site["layer1.0"].rule_name == "strong" and by_site["layer1.0"].params["weight"] == 1.0
    assert by_site["stem"].rule_name == "weak"
    assert {(s.name, r, w) for s, r, w in plan.shadowed} == {("layer1.0", "weak", "strong"),
                                                            ("layer1.2", "weak", "strong")}
    text = str(plan)
    assert "shadowed by strong" in text and "orth_regularizer" in text


def test_passes_of_different_groups_both_apply():
    @register_pass
    class Tag(Pass):
        name = "tag_for_test"
        site_kinds = frozenset({"module"})

        def apply(self, ctx, entries):
            for e in entries:
                ctx.record(Change(e.site.name, e.rule_name, self.name, "tagged"))

    try:
        rules = [{"match": {"type": "Linear"}, "apply": "orth_regularizer"},
                 {"match": {"type": "Linear"}, "apply": "tag_for_test"}]
        plan = plan_for(Net(), rules)
        assert sorted(e.pass_name for e in plan.entries) == ["orth_regularizer", "tag_for_test"]
        assert plan.pass_order() == ["orth_regularizer", "tag_for_test"]
    finally:
        unregister_pass("tag_for_test")


def test_rule_matching_nothing_is_an_error_unless_optional():
    rules = [{"name": "convs3d", "match": {"type": "Conv3d"}, "apply": "orth_regularizer"}]
    with pytest.raises(orthofx.PlanError, match="convs3d.*matched no module site.*Conv2d x4.*optional: true"):
        plan_for(Net(), rules)
    rules[0]["optional"] = True
    rules.append({"match": {"type": "Linear"}, "apply": "orth_regularizer"})
    plan = plan_for(Net(), rules)
    assert plan.unmatched_optional == ["convs3d"]
    assert "optional rule 'convs3d' matched nothing" in str(plan)


def test_pass_refusing_every_selected_site_is_an_error_with_reasons():
    square_only = [{"match": {"type": "Linear"}, "apply": "riemannian", "with": {"only_square": True}}]
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with pytest.raises(orthofx.PlanError, match="can handle none.*not square"):
        plan_for(model, square_only)
    # Only some refused: they are reported as skipped, the others applied.
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4))
    plan = plan_for(model, square_only)
    assert applied_sites(plan) == ["1"]
    assert [s.name for s, _, _ in plan.skipped] == ["0"]
    assert "skipped: not square" in str(plan)


class Whiten(nn.Module):
    def forward(self, x):
        n, c = x.shape[0], x.shape[1]
        flat = x.reshape(n, c, -1)
        flat = flat - flat.mean(-1, keepdim=True)
        cov = flat @ flat.transpose(1, 2) / flat.shape[-1]
        evals, evecs = torch.linalg.eigh(cov + 1e-3 * torch.eye(c))
        return evecs


class ConvCov(nn.Module):
    """conv -> relu -> flatten -> covariance -> eigh, the eigh inside a user module."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.whiten = Whiten()

    def forward(self, x):
        return self.whiten(self.act(self.conv2(self.act(self.conv1(x)))))


class LinearBmmSvd(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 5)
        self.other = nn.Linear(6, 5)

    def forward(self, x):  # x: batch x tokens x 6
        h = self.proj(x)
        gram = torch.bmm(h.transpose(1, 2), h)
        u, s, vh = torch.linalg.svd(gram)
        return s.sum() + self.other(x).sum()


class TwoProducers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 2, 1)
        self.b = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        z = torch.cat([self.a(x), self.b(x)], dim=1).flatten(2)
        cov = z @ z.transpose(1, 2)
        return torch.linalg.eigvalsh(cov), x.svd()[1]


@pytest.mark.parametrize("model, op, expected", [
    (ConvCov(), "linalg.eigh", ["conv2"]),
    (LinearBmmSvd(), "linalg.svd", ["proj"]),
    (TwoProducers(), "linalg.eigvalsh", ["a", "b"]),
])
def test_feeds_finds_the_pre_svd_layers(model, op, expected):
    plan = plan_for(model, [{"match": {"feeds": op}, "apply": "orth_regularizer"}])
    assert sorted(applied_sites(plan)) == expected


def test_function_sites_are_named_by_scope_and_op():
    gm, info = capture(ConvCov())
    sites = [s for s in collect_sites(gm) if s.kind == "function"]
    assert [(s.name, s.target) for s in sites] == [("whiten:linalg.eigh", "linalg.eigh")]
    gm, info = capture(TwoProducers())
    names = sorted(s.name for s in collect_sites(gm) if s.kind == "function")
    assert names == ["linalg.eigvalsh", "svd"]  # a tensor method call counts too


def _aten_graph(calls):
    """A GraphModule calling ATen decompositions directly (as a torch.export or decomposed graph does)."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    outs = []
    for target, args in calls:
        node = graph.call_function(target, (x,) + args)
        outs.append(graph.call_function(operator.getitem, (node, 0)) if "eigvalsh" not in str(target)
                    and "svdvals" not in str(target) else node)
    graph.output(tuple(outs))
    return torch.fx.GraphModule(nn.Module(), graph)


def test_function_sites_recognise_aten_decompositions():
    aten = torch.ops.aten
    gm = _aten_graph([(aten.linalg_eigh.default, ()), (aten._linalg_eigh.default, ("L", True)),
                      (aten._linalg_eigh.default, ("L", False)), (aten.linalg_eigvalsh.default, ()),
                      (aten.linalg_svd.default, ()), (aten._linalg_svd.default, (False, False)),
                      (aten.linalg_svdvals.default, ()), (aten.svd.default, ())])
    sites = [(s.name, s.target) for s in collect_sites(gm) if s.kind == "function"]
    assert sites == [("linalg.eigh", "linalg.eigh"), ("linalg.eigh#2", "linalg.eigh"),
                     ("linalg.eigvalsh", "linalg.eigvalsh"), ("linalg.eigvalsh#2", "linalg.eigvalsh"),
                     ("linalg.svd", "linalg.svd"), ("linalg.svdvals", "linalg.svdvals"),
                     ("linalg.svdvals#2", "linalg.svdvals"), ("svd", "svd")]
    x = torch.randn(2, 4, 4)
    gm(x @ x.mT)  # the graph runs: these are the real ops
    # op: rules match them by canonical name or by their ATen spelling
    policy = orthofx.Policy.from_dict({"rules": [
        {"match": {"op": ["aten._linalg_eigh", "torch.ops.aten.linalg_svd"]}, "apply": "svd_conditioning"}]})
    plan = build_plan(gm, policy)
    assert [e.site.name for e in plan.entries] == ["linalg.eigh", "linalg.eigh#2", "linalg.svd"]


def test_block_rules_keep_the_block_a_leaf():
    @register_pass
    class BlockTag(Pass):
        name = "block_tag_for_test"
        site_kinds = frozenset({"block"})

        def apply(self, ctx, entries):
            for e in entries:
                ctx.record(Change(e.site.name, e.rule_name, self.name, "tagged block"))

    try:
        rules = [{"match": {"kind": "block", "name": "layer1"}, "apply": "block_tag_for_test"},
                 {"match": {"type": "Conv2d"}, "apply": "orth_regularizer"}]
        plan = plan_for(Net(), rules)
        assert [(e.site.kind, e.site.name) for e in plan.entries if e.pass_name == "block_tag_for_test"] == [
            ("block", "layer1")]
        # The convs inside the leaf block are still module sites (no node), reachable by weight-only passes.
        inside = [s for s in plan.sites if s.name.startswith("layer1.") and s.kind == "module"]
        assert {s.name for s in inside} >= {"layer1.0", "layer1.2"} and all(s.node is None for s in inside)
        assert "layer1.0" in applied_sites(plan)
    finally:
        unregister_pass("block_tag_for_test")


def test_describe_module():
    assert describe_module(nn.Conv2d(64, 128, 3, stride=2)) == "Conv2d(64->128, k=3, s=2)"
    assert describe_module(nn.Conv2d(4, 8, (1, 3), groups=2)) == "Conv2d(4->8, k=1x3, s=1, g=2)"
    assert describe_module(nn.Linear(512, 10)) == "Linear(512->10)"
    assert describe_module(nn.ReLU()) == "ReLU"


def test_explain_does_not_touch_the_model():
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan_for(model, [{"match": {"type": "Conv2d"}, "apply": "orth_regularizer"}])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_explain_prints_numeric_looking_site_names_as_they_are():
    # nested Sequentials name their layers '0.0', '1.0' ...: tabulate parsed them as numbers and printed '0', '1'
    inner = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    model = nn.Sequential(inner, nn.Sequential(nn.Conv2d(4, 4, 3)))
    text = str(orthofx.explain(model, "lorth"))
    sites = [line.split()[0] for line in text.splitlines() if "orth_regularizer" in line]
    assert sites == ["0.0", "0.1", "1.0"]
