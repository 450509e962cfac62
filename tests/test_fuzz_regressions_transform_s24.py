"""Regressions from fuzzing ``transform``'s check of the rewritten model's outputs on the example inputs: a
non-finite output caused by the user's model (a NaN bias or buffer) or by the example inputs was blamed on the
policy's gain / eps. The expected counts and names are read off the model and inputs with plain torch."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import TransformError
from orthofx.passes import Pass, register_pass, unregister_pass
from references import bitwise_equal, state_copy


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).relu().mean((2, 3)))


def _net_and_input() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return _ConvNet().eval(), torch.randn(2, 3, 6, 6)


def _nonfinite_count(model: nn.Module, x: torch.Tensor) -> int:
    """How many of the plain model's outputs on ``x`` are NaN or inf (the reference for the message's count)."""
    with torch.no_grad():
        return int((~torch.isfinite(model(x))).sum())


@pytest.mark.parametrize("preset", ["orthogonal", "lorth", "convnorm"])
def test_a_nan_bias_of_the_model_is_named_not_the_policy(preset):
    model, x = _net_and_input()
    with torch.no_grad():
        model.conv.bias[1] = float("nan")
    count = _nonfinite_count(model, x)
    state, inputs = state_copy(model), x.clone()
    with pytest.raises(TransformError) as info:
        orthofx.transform(model, preset, example_inputs=(x,))
    message = str(info.value)
    assert re.search(rf"output 0 of the model has {count} non-finite value\(s\) on example_inputs before any "
                     r"rewrite .*not from the rewrite\. The model's parameters/buffers holding NaN or inf: "
                     r"'conv\.bias' \(1 NaN entry \(of 4\)\)\. Fix: load finite weights into the model", message)
    assert "gain" not in message and "example inputs holding" not in message
    assert bitwise_equal(state, state_copy(model)) and torch.equal(inputs, x)


def test_nan_example_inputs_are_named():
    model, x = _net_and_input()
    x[1, 2, 3, 4] = float("nan")
    x[1, 0, 0, 0] = float("-inf")
    count = _nonfinite_count(model, x)
    with pytest.raises(TransformError, match=rf"output 0 of the model has {count} non-finite .* The example "
                                             r"inputs holding NaN or inf: example_inputs\[0\] \(1 NaN and 1 inf "
                                             r"entries \(of 216\)\)\. Fix: pass finite example inputs, then"):
        orthofx.transform(model, "orthogonal", example_inputs=(x,))


def test_a_nan_buffer_and_nan_keyword_input_are_both_named():
    class Masked(_ConvNet):
        def forward(self, x, *, mask):
            return super().forward(x) * mask

    torch.manual_seed(0)
    model, x = Masked().eval(), torch.randn(2, 3, 6, 6)
    mask = torch.ones(2, 3)
    mask[0, 1] = float("inf")
    with torch.no_grad():
        model.bn.running_var[2] = float("nan")
    with pytest.raises(TransformError, match=r"parameters/buffers holding NaN or inf: 'bn\.running_var' \(1 NaN "
                                             r"entry \(of 4\)\); the example inputs holding NaN or inf: "
                                             r"example_kwargs\['mask'\] \(1 inf entry \(of 6\)\)\. Fix: load finite "
                                             r"weights into the model and pass finite example inputs"):
        orthofx.transform(model, "lorth", example_inputs=(x,), example_kwargs={"mask": mask})


def test_many_nan_tensors_are_listed_up_to_three():
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(5)]).eval()
    with torch.no_grad():
        for layer in model:
            layer.bias.fill_(float("nan"))
    with pytest.raises(TransformError, match=r"NaN or inf: '0\.bias' \(4 NaN entries \(of 4\)\), '1\.bias' .*, "
                                             r"'2\.bias' \(4 NaN entries \(of 4\)\) and 2 more\. Fix"):
        orthofx.transform(model, "lorth", example_inputs=(torch.ones(1, 4),))


def test_a_model_whose_forward_makes_nan_from_finite_weights_and_inputs():
    class Log(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x).log()   # the log of the negative entries is NaN

    torch.manual_seed(0)
    model, x = Log().eval(), torch.randn(3, 4)
    count = _nonfinite_count(model, x)
    assert 0 < count < 12
    with pytest.raises(TransformError, match=rf"has {count} non-finite .*parameters, buffers and example inputs "
                                             r"are all finite, so its forward makes the NaN/inf"):
        orthofx.transform(model, "lorth", example_inputs=(x,))


def test_inplace_names_the_weights_as_they_were_before_the_passes():
    # isometric re-initialises conv.bias in place (inplace=True: in the user's model); the NaN input still makes the
    # output non-finite, and the message must name the bias the model had, read before the passes ran
    model, x = _net_and_input()
    with torch.no_grad():
        model.conv.bias[0] = float("nan")
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(TransformError, match=r"'conv\.bias' \(1 NaN entry \(of 4\)\); the example inputs holding "
                                             r"NaN or inf: example_inputs\[0\] \(1 NaN entry \(of 216\)\)"):
        orthofx.transform(model, "isometric", example_inputs=(x,), inplace=True)
    assert bool(torch.isfinite(model.conv.bias).all())   # the pass did run on the user's model (inplace)
    # the rewrite that makes a NaN bias finite is accepted, as before: the output no longer depends on it
    model, x = _net_and_input()
    with torch.no_grad():
        model.conv.bias[0] = float("nan")
    gm = orthofx.transform(model, "isometric", example_inputs=(x,))
    with torch.no_grad():
        assert bool(torch.isfinite(gm(x)).all())


def test_a_pass_that_makes_a_nan_parameter_is_named():
    @register_pass
    class NanWeight(Pass):
        name = "nan_weight_for_test"
        site_kinds = frozenset({"module"})

        def apply(self, ctx, entries):
            for entry in entries:
                layer = nn.Linear(4, 3)
                with torch.no_grad():
                    layer.weight[1, 2] = float("nan")
                ctx.replace_module(entry.site, layer)

    try:
        model, x = _net_and_input()
        policy = {"rules": [{"match": {"type": "Linear"}, "apply": "nan_weight_for_test"}]}
        with pytest.raises(TransformError, match=r"output 0 of the rewritten model has 2 non-finite value\(s\) on "
                                                 r"example_inputs where the model's own output is finite: a pass "
                                                 r"made it so; the rewritten model's parameters holding NaN or inf: "
                                                 r"'fc\.weight' \(1 NaN entry \(of 12\)\); check the policy's"):
            orthofx.transform(model, policy, example_inputs=(x,))
    finally:
        unregister_pass("nan_weight_for_test")
