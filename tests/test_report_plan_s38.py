"""Session 38: report and plan read a conv's one-element sizes as torch applies them, report notes optional rules
that matched nothing, ``where:`` hints at YAML's None, and the plan warns of functional conv / linear calls whose
weight is a parameter (no site, so no rule treats it)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthofx
from orthofx.errors import PlanError


def _dense_circular_singular_values(weight: torch.Tensor, n: int, stride: int) -> torch.Tensor:
    """The singular values of ``y[m, i] = sum_{c, p} K[m, c, p] x[c, (S i + p) mod n]`` on an n x n grid, from the
    dense float64 matrix built column by column (torch's own conv on circularly padded basis images)."""
    weight = weight.detach().to(torch.float64)
    channels, k = weight.shape[1], weight.shape[-1]
    basis = torch.eye(channels * n * n, dtype=torch.float64).reshape(-1, channels, n, n)
    out = F.conv2d(F.pad(basis, (0, k - 1, 0, k - 1), mode="circular"), weight, stride=stride)
    return torch.linalg.svdvals(out.reshape(channels * n * n, -1).T)


def _strided_model(stride) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, stride=stride, padding=1),
                         nn.ConvTranspose2d(8, 4, 3, stride=stride, padding=1, output_padding=1))


def test_report_of_a_conv_with_a_one_element_stride_is_that_of_the_full_stride():
    x = torch.randn(2, 4, 6, 6)
    short, full = _strided_model((2,)), _strided_model((2, 2))
    assert torch.equal(short(x), full(x))  # torch runs (2,) as (2, 2)
    rows = {}
    for name, model in (("short", short), ("full", full)):
        rows[name] = orthofx.report(orthofx.transform(model, "lorth", example_inputs=(x,))).rows
    assert len(rows["short"]) == len(rows["full"]) == 2
    for a, b in zip(rows["short"], rows["full"]):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert math.isclose(a[key], b[key], rel_tol=1e-12), key
            else:
                assert a[key] == b[key], key
    conv, transposed = rows["short"]
    assert conv["input"] == (6, 6) and transposed["input"] == (3, 3)
    # independent reference: the dense circular operators (the transposed conv's is the adjoint of the conv with
    # its weight on the output grid 3 * 2)
    for row, weight in ((conv, short[0].weight), (transposed, short[1].weight)):
        dense = _dense_circular_singular_values(weight, 6, 2)
        assert math.isclose(row["sigma_max"], float(dense.max()), rel_tol=1e-9)
        assert math.isclose(row["sigma_min"], float(dense.min()), rel_tol=1e-9, abs_tol=1e-12)


def _two_layer() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def test_report_notes_an_optional_rule_that_matched_nothing():
    x = torch.randn(1, 3, 6, 6)
    policy = {"rules": [{"match": {"type": "Conv2d"}, "apply": "orth_regularizer"},
                        {"name": "three-d", "match": {"type": "Conv3d"}, "apply": "orth_regularizer",
                         "optional": True}]}
    gm = orthofx.transform(_two_layer(), policy, example_inputs=(x,))
    plan = orthofx.manifest_of(gm).plan
    assert plan.unmatched_optional == ["three-d"]  # what explain lists
    rep = orthofx.report(gm)
    assert [n for n in rep.notes if "optional rule 'three-d' matched nothing" in n]
    assert "note: optional rule 'three-d' matched nothing" in str(rep)
    assert any("three-d" in n for n in rep.to_dict()["notes"])
    # an optional rule that matched something gets no such note
    policy["rules"][1]["match"] = {"type": "Linear"}
    rep = orthofx.report(orthofx.transform(_two_layer(), policy, example_inputs=(x,)))
    assert not [n for n in rep.notes if "optional rule" in n]


class _OneConv(nn.Module):
    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv
        self.conv.tag = None

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("where", [{"stride": [2, 2]}, {"stride": 2}, {"stride": [2]}, {"dilation": [2, 2]},
                                   {"padding": [1, 1]}, {"padding": 1}, {"stride": [2, 2], "dilation": [2]}])
@pytest.mark.parametrize("short", [True, False])
def test_where_compares_conv_sizes_per_dimension_as_torch_applies_them(where, short):
    sizes = {"stride": 2, "dilation": 2, "padding": 1}
    conv = nn.Conv2d(2, 4, 3, **{k: ((v,) if short else (v, v)) for k, v in sizes.items()})
    # torch's reference: the one-element sizes run exactly as the full ones
    full = nn.Conv2d(2, 4, 3, **{k: (v, v) for k, v in sizes.items()})
    full.load_state_dict(conv.state_dict())
    x = torch.randn(1, 2, 9, 9)
    assert torch.equal(conv(x), full(x))
    policy = {"rules": [{"match": {"type": "Conv2d", "where": where}, "apply": "orth_regularizer"}]}
    assert [e.site.name for e in orthofx.explain(_OneConv(conv), policy).entries] == ["conv"]


def test_where_per_dimension_sizes_still_tell_different_sizes_apart():
    x_policy = {"rules": [{"match": {"type": "Conv2d", "where": {"stride": [2, 1]}}, "apply": "orth_regularizer"}]}
    assert [e.site.name for e in orthofx.explain(_OneConv(nn.Conv2d(2, 4, 3, stride=(2, 1))), x_policy).entries] \
        == ["conv"]
    with pytest.raises(PlanError, match=r"'stride' is \[2\] .*never \[2, 1\]"):
        orthofx.explain(_OneConv(nn.Conv2d(2, 4, 3, stride=(2,))), x_policy)
    # a Conv1d has one dimension: [2, 2] is no stride of it, whatever torch would broadcast
    policy = {"rules": [{"match": {"type": "Conv1d", "where": {"stride": [2, 2]}}, "apply": "orth_regularizer"}]}
    with pytest.raises(PlanError, match="matched no module site"):
        orthofx.explain(_OneConv(nn.Conv1d(2, 4, 3, stride=2)), policy)
    policy["rules"][0]["match"]["where"] = {"stride": [2]}
    assert [e.site.name for e in orthofx.explain(_OneConv(nn.Conv1d(2, 4, 3, stride=2)), policy).entries] == ["conv"]


def _yaml_where(where: str) -> orthofx.Policy:
    return orthofx.Policy.from_yaml(f"orthofx: 1\nrules:\n  - match: {{type: Conv2d, where: {{{where}}}}}\n"
                                    "    apply: orth_regularizer\n")


def test_where_python_none_in_yaml_hints_at_null():
    model = _OneConv(nn.Conv2d(2, 4, 3))
    assert _yaml_where("tag: None").rules[0].match.where == {"tag": "None"}  # YAML's reading
    with pytest.raises(PlanError, match=r"None is no null in YAML but the string 'None': write 'tag: null'"):
        orthofx.explain(model, _yaml_where("tag: None"))
    assert [e.site.name for e in orthofx.explain(model, _yaml_where("tag: null")).entries] == ["conv"]
    # a tensor attribute: null does not tell layers apart, false does
    with pytest.raises(PlanError, match=r"the string 'None': write 'bias: false' for layers without it"):
        orthofx.explain(model, _yaml_where("bias: None"))
    no_bias = _OneConv(nn.Conv2d(2, 4, 3, bias=False))
    with pytest.raises(PlanError, match=r"the string 'None': write 'bias: null'"):
        orthofx.explain(no_bias, _yaml_where("bias: None"))
    assert [e.site.name for e in orthofx.explain(no_bias, _yaml_where("bias: false")).entries] == ["conv"]


class _Functional(nn.Module):
    """Weights used through functions: two parameters (no site), a buffer (not trained) and a tied weight of a
    Linear site (treated through that layer)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.2)
        self.v = nn.Parameter(torch.randn(5, 4) * 0.2)
        self.register_buffer("fixed", torch.randn(4, 4))
        self.head = nn.Linear(5, 5)

    def forward(self, x):
        h = F.conv2d(x, self.w, padding=1).mean((2, 3))
        h = F.linear(F.linear(h, self.fixed), self.v)
        return F.linear(self.head(h), self.head.weight)


def _functional_warnings(lines) -> list[str]:
    return [w for w in lines if "functional conv / linear calls" in w]


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_functional_conv_and_linear_with_parameter_weights_are_warned_of(mode):
    model = _Functional()
    x = torch.randn(2, 3, 6, 6)
    # reference: the parameters that no module site holds, read off the model itself
    site_params = {f"head.{n}" for n, _ in model.head.named_parameters()}
    untreated = sorted(n for n, _ in model.named_parameters() if n not in site_params)
    assert untreated == ["v", "w"]
    policy = {"capture": {"mode": mode}, "rules": [{"match": {"type": ["Conv2d", "Linear"]},
                                                    "apply": "orth_regularizer"}]}
    plan = orthofx.explain(model, policy, example_inputs=(x,))
    [warning] = _functional_warnings(plan.capture.warnings)
    assert "(F.conv2d of the parameter 'w')" in warning and "(F.linear of the parameter 'v')" in warning
    assert "'fixed'" not in warning and "head.weight" not in warning
    assert "nn.Conv2d / nn.Linear module" in warning
    assert f"warning: {warning}" in str(plan)
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    assert _functional_warnings(orthofx.manifest_of(gm).capture.warnings) == [warning]
    assert f"warning: {warning}" in str(orthofx.report(gm))
    assert [row["site"] for row in orthofx.report(gm).rows] == ["head"]  # still no row: the warning says why


def test_no_functional_weight_warning_without_a_weight_rule_or_functional_parameter():
    x = torch.randn(2, 3, 6, 6)
    decomposition_only = {"rules": [{"match": {"kind": "function", "op": "linalg.eigh"}, "apply": "svd_conditioning",
                                     "optional": True}]}
    assert not _functional_warnings(orthofx.explain(_Functional(), decomposition_only,
                                                    example_inputs=(x,)).capture.warnings)
    lorth = {"rules": [{"match": {"type": ["Conv2d", "Linear"]}, "apply": "orth_regularizer"}]}
    assert not _functional_warnings(orthofx.explain(_two_layer(), lorth,
                                                    example_inputs=(torch.randn(1, 3, 6, 6),)).capture.warnings)


class _StdConv(nn.Conv2d):
    """A conv with its own forward: capture traces through it, into a functional conv of its weight."""

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)


class _TracedThrough(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = _StdConv(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.c(x).mean((2, 3)))


def test_functional_weight_of_a_traced_through_layer_points_to_leaf_modules_once():
    x = torch.randn(1, 3, 6, 6)
    linear = {"rules": [{"match": {"type": "Linear"}, "apply": "orth_regularizer"}]}
    [warning] = _functional_warnings(orthofx.explain(_TracedThrough(), linear, example_inputs=(x,)).capture.warnings)
    assert "(F.conv2d of the parameter 'c.weight' in c)" in warning and "{leaf_modules: [_StdConv]}" in warning
    # a rule on Conv2d names the layer in its own note already: no second warning about it
    both = {"rules": [{"match": {"type": ["Conv2d", "Linear"]}, "apply": "orth_regularizer"}]}
    found = orthofx.explain(_TracedThrough(), both, example_inputs=(x,)).capture.warnings
    assert not _functional_warnings(found) and any("does not reach c (_StdConv" in w for w in found)
    # kept as a leaf, it is a site and gets its row
    leaf = dict(both, capture={"leaf_modules": ["_StdConv"]})
    assert [e.site.name for e in orthofx.explain(_TracedThrough(), leaf, example_inputs=(x,)).entries] == ["c", "fc"]
