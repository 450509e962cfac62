"""Session 38, the lead's mends after the final reads."""

import warnings

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
