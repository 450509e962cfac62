"""orthofx.attach: optimizer hooks recorded by passes run around optimizer.step()."""

import pytest
import torch
from torch import nn

import orthofx
from orthofx.passes import OptimizerHook, Pass, register_pass, unregister_pass


class ZeroGradThenRenormalise(OptimizerHook):
    """Before the step: zero the first row's gradient; after it: scale the weight to unit Frobenius norm."""

    calls: list = []

    def before_step(self, root, optimizer):
        weight = root.get_submodule(self.site).weight
        weight.grad[0].zero_()
        self.calls.append(("before", self.site))

    def after_step(self, root, optimizer):
        weight = root.get_submodule(self.site).weight
        with torch.no_grad():
            weight.div_(weight.norm())
        self.calls.append(("after", self.site))


@pytest.fixture
def hook_pass():
    @register_pass
    class HookPass(Pass):
        name = "hook_pass_for_test"
        site_kinds = frozenset({"module"})
        module_types = (nn.Linear,)

        def apply(self, ctx, entries):
            for entry in entries:
                ctx.add_optimizer_hook(ZeroGradThenRenormalise(entry.site.name, entry.rule_name))

    ZeroGradThenRenormalise.calls = []
    yield {"rules": [{"match": {"type": "Linear"}, "apply": "hook_pass_for_test"}]}
    unregister_pass("hook_pass_for_test")


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def step(gm, optimizer):
    loss = gm(torch.randn(5, 4)).square().sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_hooks_run_around_every_step(hook_pass):
    gm = orthofx.transform(model(), hook_pass)
    first_row = gm.get_submodule("0").weight[0].detach().clone()
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    handle = orthofx.attach(optimizer, gm)
    step(gm, optimizer)
    assert ZeroGradThenRenormalise.calls == [("before", "0"), ("before", "2"), ("after", "0"), ("after", "2")]
    weight = gm.get_submodule("0").weight.detach()
    assert float(weight.norm()) == pytest.approx(1.0)
    # Zeroed gradient: the first row only changed by the renormalisation, so it stays parallel to the original.
    cosine = torch.nn.functional.cosine_similarity(weight[0], first_row, dim=0)
    assert float(cosine) == pytest.approx(1.0, abs=1e-6)
    handle.remove()
    step(gm, optimizer)
    assert len(ZeroGradThenRenormalise.calls) == 4


def test_attach_checks_its_arguments(hook_pass):
    gm = orthofx.transform(model(), hook_pass)
    with pytest.raises(orthofx.OrthofxError, match="not optimised by this optimizer"):
        orthofx.attach(torch.optim.SGD(gm.get_submodule("2").parameters(), lr=0.1), gm)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    handle = orthofx.attach(optimizer, nn.DataParallel(gm))  # wrappers are fine: parameters match by identity
    with pytest.raises(orthofx.OrthofxError, match="already attached"):
        orthofx.attach(optimizer, gm)
    handle.remove()
    orthofx.attach(optimizer, gm)
    with pytest.raises(orthofx.OrthofxError, match="torch.optim.Optimizer"):
        orthofx.attach(gm, optimizer)


def test_models_without_hooks_attach_to_nothing():
    gm = orthofx.transform(model(), "lorth")
    handle = orthofx.attach(torch.optim.SGD(gm.parameters(), lr=0.1), gm)
    assert handle.hooks == []


class Batched(OptimizerHook):
    """A hook class that asks attach for all its hooks at once."""

    @classmethod
    def before_step_group(cls, hooks, root, optimizer):
        ZeroGradThenRenormalise.calls.append(("before batch", tuple(h.site for h in hooks)))

    @classmethod
    def after_step_group(cls, hooks, root, optimizer):
        ZeroGradThenRenormalise.calls.append(("after batch", tuple(h.site for h in hooks)))

    def before_step(self, root, optimizer):  # pragma: no cover - attach must not call it
        raise AssertionError("a batched hook was run on its own")


def test_hook_classes_with_group_methods_run_as_one_batch():
    @register_pass
    class MixedPass(Pass):
        name = "mixed_hooks_for_test"
        site_kinds = frozenset({"module"})
        module_types = (nn.Linear,)

        def apply(self, ctx, entries):
            for entry in entries:
                ctx.add_optimizer_hook(Batched(entry.site.name, entry.rule_name))
                ctx.add_optimizer_hook(ZeroGradThenRenormalise(entry.site.name, entry.rule_name))

    try:
        ZeroGradThenRenormalise.calls = []
        gm = orthofx.transform(model(), {"rules": [{"match": {"type": "Linear"}, "apply": "mixed_hooks_for_test"}]})
        optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
        orthofx.attach(optimizer, gm)
        step(gm, optimizer)
        # the batch runs at the place of its class's first hook, plain hooks one by one in their order
        assert ZeroGradThenRenormalise.calls == [
            ("before batch", ("0", "2")), ("before", "0"), ("before", "2"),
            ("after batch", ("0", "2")), ("after", "0"), ("after", "2")]
    finally:
        unregister_pass("mixed_hooks_for_test")
