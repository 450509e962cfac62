"""Session 38, the lead's mends after the final reads."""

import warnings

import pytest
import torch
from torch import nn

import orthofx
from orthofx.passes import OptimizerHook, Pass, register_pass, unregister_pass


def test_a_user_hook_sees_true_gradients_under_grad_scaler_with_half_precision_weights():
    # NOG / OLR read optimizer.grad_scale themselves; a hook of a user's pass declares neither reads_grad_scale nor
    # gradient_linear and must see the gradient backward gave divided by the scale (the reference: the scaled
    # gradient read before the step, divided by hand in float64)
    seen = []

    class Record(OptimizerHook):
        def before_step(self, root, optimizer):
            seen.append(root.get_submodule(self.site).weight.grad.double().clone())

    @register_pass
    class RecordPass(Pass):
        name = "record_grad_for_test_s38"
        site_kinds = frozenset({"module"})
        module_types = (nn.Linear,)

        def apply(self, ctx, entries):
            for entry in entries:
                ctx.add_optimizer_hook(Record(entry.site.name, entry.rule_name))

    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).half()
        gm = orthofx.transform(model, {"rules": [{"match": {"type": "Linear"}, "apply": "record_grad_for_test_s38"}]})
        optimizer = torch.optim.Adam(gm.parameters(), lr=1e-3, fused=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            orthofx.attach(optimizer, gm)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        x = torch.randn(5, 4).half()
        scaler.scale(gm(x).float().square().sum()).backward()
        scaled = gm.get_submodule("0").weight.grad.double().clone()
        scaler.step(optimizer)
        assert len(seen) == 2
        torch.testing.assert_close(seen[0], scaled / 2.0 ** 10, rtol=0, atol=0)
    finally:
        unregister_pass("record_grad_for_test_s38")


def test_nog_and_olr_declare_that_they_read_the_scale_and_riemannian_that_it_is_linear():
    from orthofx.passes.pre_svd import NearestOrthogonalGradient, OptimalLearningRate
    from orthofx.passes.riemannian import StiefelHook

    assert NearestOrthogonalGradient.reads_grad_scale and OptimalLearningRate.reads_grad_scale
    assert StiefelHook.gradient_linear and not StiefelHook.reads_grad_scale
    assert not OptimizerHook.reads_grad_scale and not OptimizerHook.gradient_linear


def test_a_graph_recorded_by_another_release_that_differs_warns_instead_of_refusing(tmp_path):
    # the record includes the nodes orthofx's passes insert and torch's tracer names: a file written by another
    # release may differ for the same model, so the difference is a warning there; within one release it is an
    # ExportError (the reference: the same file with its release field as written)
    class ReLUNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.conv(x))

    class TanhNet(ReLUNet):
        def __init__(self):
            super().__init__()
            self.act = nn.Tanh()

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = orthofx.transform(ReLUNet(), "lorth", example_inputs=(x,))
    path = tmp_path / "m.pt"
    orthofx.export(gm, str(path))
    with pytest.raises(orthofx.ExportError, match="computes otherwise"):
        orthofx.load(TanhNet(), str(path))
    saved = torch.load(str(path), weights_only=True)
    state = saved["state_dict"]
    record = state._metadata[""]["orthofx_graph"]
    assert record["written_by"].startswith("orthofx ") and ", torch " in record["written_by"]
    record["written_by"] = "orthofx 0.0.1, torch 2.13"
    torch.save(saved, str(path))
    with pytest.warns(orthofx.OrthofxWarning, match="written by orthofx 0.0.1, torch 2.13"):
        restored = orthofx.load(TanhNet(), str(path))
    torch.testing.assert_close(restored.get_submodule("conv").weight, gm.get_submodule("conv").weight)


def test_rules_taken_from_two_policies_are_planned_by_their_position_as_the_same_policy_written_at_once():
    # both rules had index 0 in their own policies; riemannian's free: is per rule, and the two were grouped as
    # one (c left free instead of a); the reference is the same two rules written in one dict
    from orthofx.policy import Policy

    class Three(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    first = {"name": "r1", "match": {"name": "a"}, "apply": "riemannian", "with": {"free": "last"}}
    second = {"name": "r2", "match": {"name": ["b", "c"]}, "apply": "riemannian"}
    borrowed = Policy(rules=[Policy.from_dict({"rules": [first]}).rules[0],
                             Policy.from_dict({"rules": [second]}).rules[0]])
    whole = Policy.from_dict({"rules": [first, second]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = [(c.site, c.status) for c in orthofx.manifest_of(orthofx.transform(Three(), borrowed)).changes]
        want = [(c.site, c.status) for c in orthofx.manifest_of(orthofx.transform(Three(), whole)).changes]
    assert got == want
    assert dict(got)["a"] == "free" and dict(got)["c"] != "free"


@pytest.mark.parametrize("preset", ["orthogonal", "convnorm", "lorth"])
def test_a_hooked_layer_called_by_keyword_is_replaced_and_its_hooks_see_the_call_as_written(preset):
    # the replacement layers take torch's argument name (input), so a keyword call kept as written reaches them;
    # the reference: the replacement's own forward (no hooks) doubled by hand, as the forward hook does
    seen = []

    class Hooked(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, padding=1)
            self.c.register_forward_pre_hook(lambda m, a, k: seen.append((len(a), sorted(k))), with_kwargs=True)
            self.c.register_forward_hook(lambda m, i, o: o * 2)

        def forward(self, x):
            return self.c(input=x)

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = orthofx.transform(Hooked(), preset, example_inputs=(x,)).eval()
    seen.clear()
    y = gm(x)
    assert seen == [(0, ["input"])]
    torch.testing.assert_close(y, 2 * gm.get_submodule("c").forward(x), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_the_example_run_records_the_input_of_a_hooked_layer_called_by_keyword(mode):
    # a layer with hooks keeps self.c(input=x) in the graph: the example run read args[0] only and recorded no
    # input shape, no output change, and cayley_fft (built for the input size) refused the layer; the reference
    # shapes are the tensors the forward hands the layer
    class Hooked(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")
            self.c.register_forward_pre_hook(lambda m, a, k: None, with_kwargs=True)

        def forward(self, x):
            return self.c(input=x)

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    policy = {"capture": {"mode": mode},
              "rules": [{"match": {"type": "Conv2d"}, "apply": "orthogonal_conv", "with": {"method": "cayley_fft"}}]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = orthofx.transform(Hooked(), policy, example_inputs=(x,))
    manifest = orthofx.manifest_of(gm)
    assert manifest.input_shapes["c"] == (2, 3, 8, 8)
    assert manifest.output_shapes["c"] == (2, 4, 8, 8)
    (change,) = manifest.changes
    assert "cayley" in change.what.lower() or "cayley" in str(change.params)
    assert gm(x).shape == (2, 4, 8, 8)
