"""Regressions from an adversarial review of ``orthofx.transform`` and planning (session 37).

References: the user's model as it was before the call (its class and weights, compared bit for bit) and the
plain model's outputs."""

import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import ArgumentError

pytestmark = pytest.mark.usefixtures("one_thread")

ORTHOGONAL_LINEAR = {"rules": [{"match": {"type": "Linear"}, "apply": "orthogonal_conv"}]}


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))


@pytest.mark.parametrize("options", [{"bogus": 1}, {"mode": "bogus"}, {"mode": "default", "options": {}}])
def test_bad_compile_options_refused_before_an_inplace_rewrite(options):
    """torch.compile checks its options only when called, at the end of transform: with inplace=True the passes had
    already replaced the user's layers by orthogonal ones when the error came (a RuntimeError for a bad mode)."""
    model = _model()
    weight = model[0].weight.detach().clone()
    with pytest.raises(ArgumentError, match="compile options"):
        orthofx.transform(model, ORTHOGONAL_LINEAR, example_inputs=(torch.randn(2, 4),), inplace=True,
                          compile=options)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    assert torch.equal(model[0].weight, weight)


def test_good_compile_options_still_compile():
    model = _model()
    x = torch.randn(2, 4)
    compiled = orthofx.transform(model, "lorth", compile={"fullgraph": True, "backend": "eager"})
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    assert orthofx.is_transformed(compiled)


def _state_dict_hook_notes(plan) -> list[str]:
    return [w for w in plan.capture.warnings if "state-dict hook" in w]


def test_second_transform_does_not_blame_orthofx_own_state_dict_hooks():
    """A transformed model (here ConvNorm's, which carries no penalty and may be transformed again) holds the
    state-dict hooks orthofx registered for its count of penalty calls; capturing it again warned that 'the model
    itself has 2 state-dict hook(s)' the result lacks and told the user to register them again, though the second
    transform registers its own. A hook the user registered is still reported; the model keeps its hooks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(2, 2, 6, 6)
    first = orthofx.transform(model, "convnorm", example_inputs=(x,))
    hooks = (dict(first._state_dict_hooks), dict(first._load_state_dict_pre_hooks))
    assert len(hooks[0]) == len(hooks[1]) == 1
    for inplace in (False, True):
        assert not _state_dict_hook_notes(orthofx.explain(first, "lorth", example_inputs=(x,)))
        second = orthofx.transform(first, "lorth", example_inputs=(x,), inplace=inplace)
        assert not _state_dict_hook_notes(orthofx.manifest_of(second).plan)
        assert (dict(first._state_dict_hooks), dict(first._load_state_dict_pre_hooks)) == hooks
        assert len(second._state_dict_hooks) == len(second._load_state_dict_pre_hooks) == 1
        torch.testing.assert_close(second(x), first(x), rtol=0, atol=0)  # L_orth adds a penalty, not an edit
    first.register_state_dict_post_hook(lambda *args: None)
    [note] = _state_dict_hook_notes(orthofx.explain(first, "lorth", example_inputs=(x,)))
    assert "1 state-dict hook(s)" in note


class _TwoNames(nn.Module):
    """One block under two attribute names (``self.d = self.c``); the forward calls it as ``d``."""

    def __init__(self):
        super().__init__()
        self.c = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
        self.d = self.c
        self.e = nn.Linear(4, 3)

    def forward(self, x):
        return self.e(self.d(x))


def test_block_rule_selects_a_block_by_its_second_name():
    """A module rule selects a layer by any of its names (``name: d.0`` reaches the site ``c.0``), but a ``kind:
    block`` rule naming the block by its second name matched nothing (PlanError): the blocks kept as leaves were
    chosen by the first name only."""
    torch.manual_seed(0)
    model, x = _TwoNames(), torch.randn(5, 4)
    policy = {"rules": [{"match": {"name": "d", "kind": "block"}, "apply": "jacobian_isometry"}]}
    plan = orthofx.explain(model, policy, example_inputs=(x,))
    assert [(e.site.name, e.site.kind) for e in plan.entries] == [("c", "block")]
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    assert [(c.site, c.pass_name) for c in orthofx.manifest_of(gm).changes] == [("c", "jacobian_isometry")]
    expected = (torch.tanh(x.double() @ model.c[0].weight.double().T + model.c[0].bias.double())
                @ model.e.weight.double().T + model.e.bias.double())
    torch.testing.assert_close(gm(x).double(), expected, rtol=0, atol=1e-6)  # the probe leaves the forward as it is
    # excluded by its second name, the block is no block site (and not kept whole as a leaf for nothing)
    policy = {"rules": [{"match": {"name": "*", "kind": "block", "exclude": ["d", "e"]}, "apply": "jacobian_isometry",
                         "optional": True}]}
    assert orthofx.plan.block_paths(model, orthofx.Policy.load(policy)) == ["c.0", "c.1"]


def test_transforming_a_model_holding_a_transformed_part_refuses_to_drop_its_terms():
    """``nn.Sequential(gm, head)`` holds a transformed part with two L_orth terms; transforming the whole model
    traced through the part and returned a model whose manifest holds the new policy's changes only: the part's
    terms were silently gone (orthofx.penalty of the result was the new rule's term alone). As for a transformed
    model itself, explain and transform refuse it; a part that carries no terms or hooks may be traced through."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(2, 2, 6, 6)
    part = orthofx.transform(body, "lorth", example_inputs=(x,))
    model = nn.Sequential(part, nn.Flatten(), nn.Linear(144, 3))
    # reference: L_orth of each conv, the kernel's self-correlation minus the identity (P0 Definition 1, CO case
    # c_out >= c_in: ||Conv(K, K, padding=k-1) - I_0||_F^2), written out with conv2d
    def lorth(weight):
        k = weight.detach().double().transpose(0, 1)  # (c_in, c_out, 3, 3)
        corr = torch.nn.functional.conv2d(k, k, padding=2)
        target = torch.zeros_like(corr)
        target[range(k.shape[0]), range(k.shape[0]), 2, 2] = 1
        return ((corr - target) ** 2).sum()
    expected = 0.01 * (lorth(body[0].weight) + lorth(body[2].weight))
    torch.testing.assert_close(orthofx.penalty(model).double().detach(), expected, rtol=1e-5, atol=1e-8)
    lorth_linear = {"rules": [{"match": {"type": "Linear"}, "apply": "orth_regularizer"}]}
    for call in (orthofx.explain, orthofx.transform):
        with pytest.raises(orthofx.TransformError, match="the part '0' of this model .* 2 penalty term"):
            call(model, lorth_linear, example_inputs=(x,))
    plain = nn.Sequential(orthofx.transform(body, "convnorm", example_inputs=(x,)), nn.Flatten(), nn.Linear(144, 3))
    gm = orthofx.transform(plain, lorth_linear, example_inputs=(x,))
    assert [term.site for term in orthofx.manifest_of(gm).penalties] == ["2"]


@pytest.mark.parametrize("policy", ["lorth", "orthogonal"])
def test_transform_inside_inference_mode_returns_a_trainable_model(policy):
    """Transforming inside ``torch.inference_mode()`` (setup code of an inference script, say) copied the model and
    built its new layers as inference tensors: the first ``loss.backward()`` of the returned model raised torch's
    'Inference tensors cannot be saved for backward', even for ``lorth``, which replaces no layer. The model
    transformed there now trains as the one transformed outside (the same gradients, bit for bit)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(64, 3))
    x = torch.randn(2, 2, 4, 4)
    torch.manual_seed(1)  # an orthogonal layer draws its parameters before it is set nearest to the weight
    reference = orthofx.transform(model, policy, example_inputs=(x,))
    torch.manual_seed(1)
    with torch.inference_mode():
        gm = orthofx.transform(model, policy, example_inputs=(x,))
        assert torch.is_inference_mode_enabled()
    assert not any(p.is_inference() for p in gm.parameters())
    for net in (reference, gm):
        (net(x).square().sum() + orthofx.penalty(net)).backward()
    for (name, a), (_, b) in zip(reference.named_parameters(), gm.named_parameters()):
        assert b.grad is not None and torch.equal(a.grad, b.grad), name
