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


# --------------------------------------------------------------------- audit: hooks on tied weights (Pre-SVD)

class TiedEigh(nn.Module):
    """Two Linears sharing one weight, both feeding an eigh: two Pre-SVD sites, one parameter."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 4, bias=False)
        self.b = nn.Linear(6, 4, bias=False)
        self.b.weight = self.a.weight
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        f = torch.cat([self.a(x), self.b(2 * x)], 1)
        values, vectors = torch.linalg.eigh(f.T @ f / x.shape[0] + 1e-2 * torch.eye(8))
        return self.head(f @ vectors).sum() + values.sum()


def olr_reference(w, g, base):
    """P4's eta* = a b / (a c + 2 b^2) (a = w.w, b = g.w, c = g.g), used when 0 < eta* < base."""
    w, g = w.double().flatten(), g.double().flatten()
    a, b, c = float(w @ w), float(g @ w), float(g @ g)
    eta = a * b / (a * c + 2 * b * b)
    return eta if 0 < eta < base else base


def test_olr_on_a_weight_shared_by_two_sites_keeps_the_base_lr():
    """Each site's OLR hook took the group's lr as its base: the second one read the first one's eta*, and after
    the step the group kept eta* (0.0027) as its lr for good instead of the base lr 10."""
    import orthofx.passes.pre_svd  # noqa: F401  (registers the pass)

    torch.manual_seed(0)
    x = torch.randn(32, 6)
    gm = orthofx.transform(TiedEigh(), {"rules": [{"match": {"feeds": "linalg.eigh"}, "apply": "pre_svd",
                                                   "with": {"nog": False, "olr": True}}]}, example_inputs=(x,))
    assert gm.a.weight is gm.b.weight and len(orthofx.manifest_of(gm).optimizer_hooks) == 2
    optimizer = torch.optim.SGD(gm.parameters(), lr=10.0)
    orthofx.attach(optimizer, gm)
    used = []
    for _ in range(3):
        w = gm.a.weight.detach().clone()
        optimizer.zero_grad()
        gm(x).backward()
        g = gm.a.weight.grad.clone()
        optimizer.step()
        lr = olr_reference(w, g, 10.0)
        used.append(lr)
        torch.testing.assert_close(w - gm.a.weight.detach(), lr * g, rtol=1e-4, atol=1e-7)
        assert all(group["lr"] == 10.0 for group in optimizer.param_groups)
    assert min(used) < 1e-2 and max(used) == 10.0  # eta* on some steps, the base lr on others


def srip_reference(weight):
    """sigma_max(W W^T - I) (the smaller Gram) from a dense float64 eigendecomposition."""
    w = weight.detach().double().reshape(weight.shape[0], -1)
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return float(torch.linalg.eigvalsh(gram - torch.eye(gram.shape[0], dtype=gram.dtype)).abs().max())


def test_srip_of_a_weight_shared_by_two_sites_is_counted_once():
    """L_orth counts a tied weight once; SRIP added one term per site, so the shared weight's penalty was twice
    penalty_weight * SRIP(W)."""
    import orthofx.passes.pre_svd  # noqa: F401  (registers the pass)

    torch.manual_seed(0)
    x = torch.randn(32, 6)
    gm = orthofx.transform(TiedEigh(), {"rules": [{"match": {"feeds": "linalg.eigh"}, "apply": "pre_svd",
                                                   "with": {"weight": "srip", "penalty_weight": 0.5,
                                                            "power_iterations": 200, "nog": False}}]},
                           example_inputs=(x,))
    assert len(orthofx.manifest_of(gm).penalties) == 1
    assert float(orthofx.penalty(gm).detach()) == pytest.approx(0.5 * srip_reference(gm.a.weight), rel=1e-4)
    changes = {c.site: c for c in orthofx.manifest_of(gm).changes if c.pass_name == "pre_svd"}
    assert changes["b"].after["penalty"] == "counted once, at a (tied weight)"
