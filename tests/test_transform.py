"""transform(), the manifest, penalty() and the pass registry, end to end."""

import copy

import pytest
import torch
from torch import nn

import orthofx
from orthofx.passes import Change, Param, Pass, register_pass, unregister_pass
from references import lorth64

LORTH_ALL = {"orthofx": 1, "rules": [{"name": "soft", "match": {"type": ["Conv1d", "Conv2d", "Linear"]},
                                       "apply": "orth_regularizer", "with": {"weight": 0.5}}]}


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 6, 3, padding=1)
        self.c2 = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8 + 6, 5)

    def forward(self, x, s):
        a = self.g(torch.relu(self.bn(self.c2(x)))).mean((2, 3))
        b = self.c1(s).mean(2)
        return self.fc(torch.cat([a, b], 1))


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 2, 7, generator=g)


def snapshot(model):
    return copy.deepcopy(model.state_dict()), [m.training for m in model.modules()], repr(model)


def test_transform_returns_graph_module_with_same_outputs_and_a_manifest():
    torch.manual_seed(0)
    model = Mixed().eval()
    x = inputs()
    gm = orthofx.transform(model, LORTH_ALL, example_inputs=x)
    assert isinstance(gm, torch.fx.GraphModule)
    torch.testing.assert_close(gm(*x), model(*x))
    manifest = gm.meta["orthofx"]
    assert [c.site for c in manifest.changes] == ["c2", "g", "c1", "fc"]
    assert {t.site for t in manifest.penalties} == {"c1", "c2", "g", "fc"}
    assert manifest.input_shapes["c2"] == (4, 3, 8, 8) and manifest.input_shapes["c1"] == (4, 2, 7)
    assert manifest.capture.mode == "fx"
    assert manifest.output_change == 0.0  # a regulariser does not change the forward


def test_user_model_is_bitwise_unchanged_including_batchnorm_statistics():
    torch.manual_seed(0)
    model = Mixed().train()
    state, flags, text = snapshot(model)
    gm = orthofx.transform(model, LORTH_ALL, example_inputs=inputs())
    new_state, new_flags, new_text = snapshot(model)
    assert new_flags == flags and new_text == text
    assert all(torch.equal(state[k], new_state[k]) for k in state)
    assert gm.training  # the returned model keeps the mode of the model it came from
    # The returned model owns its parameters: training it leaves the user's model alone.
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(gm.parameters(), model.parameters()))


@pytest.mark.parametrize("preset, name", [("lorth", "resnet18"), ("orthogonal", "resnet18"), ("convnorm", "vgg11"),
                                          ("isometric", "deep_mlp"), ("jacobian", "resnet18"), ("svd", "gcp_cnn"),
                                          ("svd", "dbn_cnn")])
@pytest.mark.parametrize("training", [False, True])
def test_every_module_of_the_result_is_in_the_models_mode(preset, name, training):
    # the containers a GraphModule creates and the modules passes add are new nn.Modules, in training mode
    model = orthofx.models.get(name, width=4).train(training)
    gm = orthofx.transform(model, preset, example_inputs=(orthofx.models.example_input(name),))
    assert {path for path, module in gm.named_modules() if module.training != training} == set()


def test_inplace_shares_the_users_modules():
    model = Mixed()
    gm = orthofx.transform(model, LORTH_ALL, inplace=True)
    assert gm.get_submodule("c2") is model.c2


@pytest.mark.parametrize("preset", ["orthogonal", "convnorm"])
def test_inplace_puts_the_replacement_layers_into_the_model(preset):
    # the model kept its plain layers: only the returned module had the orthogonal / ConvNorm ones
    model = orthofx.models.get("resnet18", width=8)
    x = orthofx.models.example_input("resnet18", batch=2)
    gm = orthofx.transform(model, preset, example_inputs=(x,), inplace=True)
    assert model.layer1[0].conv1 is gm.get_submodule("layer1.0.conv1")
    assert type(model.layer1[0].conv1).__name__ != "Conv2d"
    assert isinstance(model.layer1, nn.Sequential)  # fx's own containers are not put into the model
    torch.testing.assert_close(model.eval()(x), gm.eval()(x))


def test_explain_runs_no_forward_side_effect_on_the_model():
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            self.calls += 1
            return self.conv(x)

    model = Counting()
    orthofx.explain(model, "lorth")
    assert model.calls == 0


def test_penalty_is_the_weighted_sum_of_lorth():
    torch.manual_seed(0)
    model = Mixed()
    gm = orthofx.transform(model, LORTH_ALL)
    # each term from the dense circular operator (Theorem 7) in float64, not from metrics.lorth
    by_site = {"c1": lorth64(model.c1.weight), "c2": lorth64(model.c2.weight, stride=2),
               "g": lorth64(model.g.weight, groups=2), "fc": lorth64(model.fc.weight)}
    expected = torch.tensor(0.5 * sum(by_site.values()), dtype=torch.float64)
    torch.testing.assert_close(orthofx.penalty(gm).detach().double(), expected, rtol=1e-5, atol=0)
    terms = orthofx.penalty_terms(gm)
    assert set(terms) == {"soft/c1", "soft/c2", "soft/g", "soft/fc"}
    for site, reference in by_site.items():
        assert float(terms[f"soft/{site}"]) == pytest.approx(0.5 * reference, rel=1e-5), site


def test_a_stride_per_dimension_gets_its_lorth_term():
    # Conv2d(stride=(1, 2)) was skipped ("L_orth needs one stride for every dimension"); metrics.lorth takes a
    # stride per dimension, and its value is N^d L_orth = ||K K^T - I||_F^2 of the dense circular operator
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, (1, 3), stride=(1, 2), padding=(0, 1), bias=False))
    gm = orthofx.transform(model, LORTH_ALL)
    term = orthofx.penalty_terms(gm)["soft/0"]
    weight = model[0].weight.detach().double()
    n = 6  # the output grid; the input grid is (6, 12), S n >= 2k - 1 in both dimensions
    columns = []
    for i in range(3 * n * 2 * n):  # the operator's matrix, one input basis vector at a time
        e = torch.zeros(3 * n * 2 * n, dtype=torch.float64)
        e[i] = 1.0
        x = torch.nn.functional.pad(e.reshape(1, 3, n, 2 * n), (1, 1, 0, 0), mode="circular")
        columns.append(torch.nn.functional.conv2d(x, weight, stride=(1, 2)).reshape(-1))
    A = torch.stack(columns, dim=1)  # (4 n n, 3 n 2n): M = 4 <= C S^d = 6, the row-orthogonal case
    dense = (A @ A.T - torch.eye(A.shape[0], dtype=torch.float64)).square().sum()
    torch.testing.assert_close(term.double() / 0.5 * n * n, dense, rtol=1e-5, atol=1e-6)

def test_penalty_gradient_matches_finite_differences():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2), nn.ReLU(), nn.Conv2d(3, 5, 2)).double()
    gm = orthofx.transform(model, LORTH_ALL)
    weight = gm.get_submodule("0").weight
    value = orthofx.penalty(gm)
    (grad,) = torch.autograd.grad(value, weight)
    eps = 1e-6
    numeric = torch.zeros_like(weight)
    with torch.no_grad():
        for index in range(weight.numel()):
            flat = weight.view(-1)
            old = flat[index].item()
            flat[index] = old + eps
            up = orthofx.penalty(gm).item()
            flat[index] = old - eps
            down = orthofx.penalty(gm).item()
            flat[index] = old
            numeric.view(-1)[index] = (up - down) / (2 * eps)
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-8)


def test_training_with_the_penalty_lowers_lorth():
    torch.manual_seed(0)
    # Non-square cases (M != C S^d): P0 reports that L_orth minimisation reaches 0 there; the square case often
    # stalls.
    model = nn.Sequential(nn.Conv2d(4, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 8, 3, stride=2))
    gm = orthofx.transform(model, LORTH_ALL)
    optimizer = torch.optim.Adam(gm.parameters(), lr=1e-2)

    def dense_lorth():  # P0's L_orth of both convs from the dense operators (tests/references.py)
        return lorth64(gm.get_submodule("0").weight) + lorth64(gm.get_submodule("2").weight, stride=2)

    first, first64 = float(orthofx.penalty(gm).detach()), dense_lorth()
    for _ in range(200):
        loss = orthofx.penalty(gm)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(orthofx.penalty(gm).detach()) < 0.01 * first
    # what fell is L_orth itself, not only the penalty's own measure of it
    assert dense_lorth() < 0.01 * first64


def test_compile_option_returns_a_compiled_module_every_function_accepts():
    model = Mixed()
    compiled = orthofx.transform(model, LORTH_ALL, compile={"backend": "eager"})
    assert not isinstance(compiled, torch.fx.GraphModule)
    assert orthofx.is_transformed(compiled)
    value = orthofx.penalty(compiled)
    value.backward()
    assert compiled._orig_mod.get_submodule("c2").weight.grad is not None
    assert "c2" in str(orthofx.report(compiled))
    out = compiled(*inputs())
    assert out.shape == (4, 5)
    # checked before any work, as a bad argument
    with pytest.raises(orthofx.ArgumentError, match="compile must be"):
        orthofx.transform(model, LORTH_ALL, compile="yes")


def test_wrapped_models_are_unwrapped():
    torch.manual_seed(2)
    model = Mixed()
    gm = orthofx.transform(nn.DataParallel(model), LORTH_ALL)
    assert not isinstance(gm, nn.DataParallel) and gm.get_submodule("c2").weight is not model.c2.weight
    value = orthofx.penalty(nn.DataParallel(gm))
    assert value.requires_grad
    expected = 0.5 * (lorth64(model.c1.weight) + lorth64(model.c2.weight, stride=2)
                      + lorth64(model.g.weight, groups=2) + lorth64(model.fc.weight))
    assert float(value) == pytest.approx(expected, rel=1e-5)


def test_functions_reject_models_that_were_not_transformed():
    with pytest.raises(orthofx.OrthofxError, match="not produced by orthofx.transform"):
        orthofx.penalty(Mixed())
    with pytest.raises(orthofx.OrthofxError, match="not produced by orthofx.transform"):
        orthofx.report(Mixed())


def test_bad_example_inputs_give_a_clear_error():
    with pytest.raises(orthofx.TransformError, match="failed on example_inputs before any rewrite"):
        orthofx.transform(Mixed(), LORTH_ALL, example_inputs=(torch.randn(2, 5, 8, 8), torch.randn(2, 2, 7)))
    with pytest.raises(orthofx.TransformError, match="example_inputs must be"):
        orthofx.transform(Mixed(), LORTH_ALL, example_inputs="x")


def test_preset_yaml_text_dict_and_policy_all_work(tmp_path):
    model = Mixed()
    text = ("orthofx: 1\nrules:\n  - match: {type: [Conv1d, Conv2d, Linear]}\n"
            "    apply: orth_regularizer\n    with: {weight: 0.5}\n")
    path = tmp_path / "p.yaml"
    path.write_text(text)
    values = []
    for policy in ("lorth", text, str(path), path, LORTH_ALL, orthofx.Policy.from_dict(LORTH_ALL)):
        values.append(orthofx.penalty(orthofx.transform(model, policy)).item())
    assert values[1:] == pytest.approx([values[1]] * 5)
    assert values[0] == pytest.approx(values[1] / 50)  # the preset's weight is 0.01


def test_user_passes_from_the_registry_rewrite_the_graph():
    @register_pass
    class ScaleOutputs(Pass):
        """Multiply a module's output by a constant: a genuine graph edit through the public API."""

        name = "scale_outputs_for_test"
        params = (Param("factor", 2.0, (float,), minimum=0.0),)
        site_kinds = frozenset({"module"})
        module_types = (nn.Linear,)

        def apply(self, ctx, entries):
            for entry in entries:
                node = ctx.node(entry.site)
                with ctx.gm.graph.inserting_after(node):
                    scaled = ctx.gm.graph.call_function(torch.mul, (node, entry.params["factor"]))
                node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
                ctx.record(Change(entry.site.name, entry.rule_name, self.name, "scaled output", entry.params))

    try:
        model = Mixed().eval()
        x = inputs()
        policy = {"rules": [{"match": {"type": "Linear"}, "apply": "scale_outputs_for_test",
                             "with": {"factor": 3}}]}
        gm = orthofx.transform(model, policy, example_inputs=x)
        torch.testing.assert_close(gm(*x), 3 * model(*x))
        assert orthofx.manifest_of(gm).output_change == pytest.approx(2.0)  # |3y - y| / |y|
        with pytest.raises(orthofx.OrthofxError, match="already registered"):
            register_pass(type("Other", (Pass,), {"name": "scale_outputs_for_test"}))
    finally:
        unregister_pass("scale_outputs_for_test")


def test_a_pass_that_breaks_shapes_or_finiteness_is_caught():
    @register_pass
    class Breaker(Pass):
        name = "breaker_for_test"
        params = (Param("mode", "nan", (str,), choices=("nan", "shape")),)
        site_kinds = frozenset({"module"})

        def apply(self, ctx, entries):
            for entry in entries:
                node = ctx.node(entry.site)
                fn = (lambda t: t * float("nan")) if entry.params["mode"] == "nan" else (lambda t: t[:, :1])
                with ctx.gm.graph.inserting_after(node):
                    new = ctx.gm.graph.call_function(fn, (node,))
                node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)

    try:
        for mode, message in (("nan", "non-finite"), ("shape", "changed shape")):
            policy = {"rules": [{"match": {"type": "Linear"}, "apply": "breaker_for_test", "with": {"mode": mode}}]}
            with pytest.raises(orthofx.TransformError, match=message):
                orthofx.transform(Mixed(), policy, example_inputs=inputs())
    finally:
        unregister_pass("breaker_for_test")


class _Exploding(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_a_rewritten_model_that_fails_names_the_node_and_the_rule():
    @register_pass
    class Exploder(Pass):
        name = "exploder_for_test"
        site_kinds = frozenset({"module"})

        def apply(self, ctx, entries):
            for entry in entries:
                ctx.replace_module(entry.site, _Exploding())
                ctx.record(Change(entry.site.name, entry.rule_name, self.name, "exploding"))

    try:
        policy = {"rules": [{"name": "bad", "match": {"type": "Linear"}, "apply": "exploder_for_test"}]}
        with pytest.raises(orthofx.TransformError, match=r"at node 'fc' \(call_module fc: _Exploding, changed by "
                                                         r"rule 'bad' \(exploder_for_test\)\): RuntimeError: boom"):
            orthofx.transform(Mixed(), policy, example_inputs=inputs())
    finally:
        unregister_pass("exploder_for_test")


def test_transformed_model_trains_and_deep_copies():
    torch.manual_seed(0)
    gm = orthofx.transform(Mixed(), LORTH_ALL, example_inputs=inputs())
    clone = copy.deepcopy(gm)
    assert orthofx.manifest_of(clone).changes[0].site == "c2"
    optimizer = torch.optim.SGD(clone.parameters(), lr=0.1)
    x = inputs()
    loss = clone(*x).square().mean() + orthofx.penalty(clone)
    loss.backward()
    optimizer.step()
    assert not torch.equal(clone.get_submodule("c2").weight, gm.get_submodule("c2").weight)


class Gate(nn.Module):
    """A data-dependent branch: symbolic tracing cannot follow it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return -self.conv(x)


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = Gate()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.gate(self.stem(x)).mean((2, 3)))


def test_untraceable_submodule_becomes_a_leaf_and_is_reported():
    torch.manual_seed(0)
    model = GatedNet().eval()
    x = torch.randn(2, 3, 6, 6)
    gm = orthofx.transform(model, LORTH_ALL, example_inputs=(x,))
    for sign in (1.0, -1.0):  # both branches still run, inside the leaf
        torch.testing.assert_close(gm(sign * x), model(sign * x))
    manifest = orthofx.manifest_of(gm)
    assert [path for path, _ in manifest.capture.leaf_fallbacks] == ["gate"]
    assert "control flow" in manifest.capture.leaf_fallbacks[0][1]
    # The conv inside the leaf is still regularised: weight-only passes reach submodules of leaves.
    assert {t.site for t in manifest.penalties} == {"stem", "gate.conv", "fc"}
    text = str(orthofx.report(gm))
    assert "kept as leaf (not traceable): gate" in text
    assert "kept as leaf (not traceable): gate" in str(orthofx.explain(model, LORTH_ALL))


def test_untraceable_top_level_gives_capture_error_with_the_fix():
    class Top(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            y = self.conv(x)
            return y if y.mean() > 0 else -y

    with pytest.raises(orthofx.CaptureError) as info:
        orthofx.transform(Top(), LORTH_ALL)
    message = str(info.value)
    assert "top-level" in message and "leaf_modules" in message and "concrete_args" in message
    assert info.value.module_path == ""


def test_leaf_modules_from_the_policy_are_respected():
    policy = dict(LORTH_ALL, capture={"leaf_modules": ["Gate"]})
    gm = orthofx.transform(GatedNet(), policy)
    assert orthofx.manifest_of(gm).capture.leaf_fallbacks == []
    assert any(n.op == "call_module" and n.target == "gate" for n in gm.graph.nodes)


def test_transformed_model_pickles_even_with_string_annotations(tmp_path):
    # orthofx.models uses `from __future__ import annotations`: fx would keep "torch.Tensor" as a string global
    # and torch.save of the GraphModule would fail.
    gm = orthofx.transform(orthofx.models.get("small_cnn", width=4), "lorth")
    torch.save(gm, tmp_path / "gm.pt")
    loaded = torch.load(tmp_path / "gm.pt", weights_only=False)
    x = orthofx.models.example_input("small_cnn")
    torch.testing.assert_close(loaded(x), gm(x))
    assert orthofx.penalty(loaded).item() == pytest.approx(orthofx.penalty(gm).item())


def test_transforming_a_model_that_carries_penalties_or_hooks_again_is_refused():
    """A second transform would replace the manifest, silently dropping the first policy's penalty terms and
    optimizer hooks; the error says how to combine the policies, and that combination keeps both."""
    x = orthofx.models.example_input("small_cnn", batch=2)
    model = orthofx.models.get("small_cnn")
    first = orthofx.transform(model, "lorth", example_inputs=(x,))
    terms = len(orthofx.manifest_of(first).penalties)
    assert terms > 0
    with pytest.raises(orthofx.TransformError, match=rf"carries {terms} penalty term\(s\).*rules of both"):
        orthofx.transform(first, "convnorm", example_inputs=(x,))
    mlp = orthofx.models.DeepMLP(depth=3, width=8, in_features=8)
    isometric = orthofx.transform(mlp, "isometric", example_inputs=(torch.randn(2, 8),))
    assert orthofx.manifest_of(isometric).optimizer_hooks
    with pytest.raises(orthofx.TransformError, match=r"optimizer hook\(s\)"):
        orthofx.transform(isometric, "lorth")
    lorth, convnorm = orthofx.Policy.load("lorth"), orthofx.Policy.load("convnorm")
    both = orthofx.Policy.from_dict({"rules": [*lorth.to_dict()["rules"], *convnorm.to_dict()["rules"]]})
    combined = orthofx.transform(model, both, example_inputs=(x,))
    assert len(orthofx.manifest_of(combined).penalties) == terms
    assert any(type(m).__name__.startswith("ConvNorm") for m in combined.modules())
    # nothing to drop: a frozen model, or one whose policy attached no term or hook, transforms again
    again = orthofx.transform(orthofx.freeze(first), "lorth", example_inputs=(x,))
    assert len(orthofx.manifest_of(again).penalties) == terms
    plain = orthofx.transform(model, "convnorm", example_inputs=(x,))
    assert not orthofx.manifest_of(plain).penalties and not orthofx.manifest_of(plain).optimizer_hooks
    orthofx.transform(plain, "lorth", example_inputs=(x,))


def test_explain_and_transform_plan_lazy_layers_with_the_shapes_the_example_gives_them():
    # explain planned an uninitialised LazyLinear as Linear(0->5): square-layer rules selected it, and transform's
    # pass then skipped it ("not square") after the example had run
    model = nn.Sequential(nn.LazyLinear(5), nn.Tanh(), nn.LazyLinear(5))
    x = torch.randn(4, 3)
    plan = orthofx.explain(model, "isometric", example_inputs=(x,))
    applied = {(e.site.name, e.rule_name) for e in plan.entries}
    skipped = {(site.name, rule): reason for site, rule, reason in plan.skipped}
    assert skipped[("0", "stiefel-square-linears")].startswith("not square")
    assert ("2", "stiefel-square-linears") in applied and ("0", "stiefel-square-linears") not in applied
    assert "Linear(3->5)" in str(plan) and "(0->" not in str(plan)
    assert isinstance(model[0], nn.LazyLinear) and model[0].has_uninitialized_params()  # the user's model untouched
    gm = orthofx.transform(model, "isometric", example_inputs=(x,))
    hooks = [hook.site for hook in orthofx.manifest_of(gm).optimizer_hooks]
    assert hooks == ["2"]
