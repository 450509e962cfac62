"""Session 36: regressions of planning ``orthogonal_conv``'s ``cayley_fft`` and of dtype checks of the layers.

- ``orthogonal_conv`` with ``method: cayley_fft`` on a conv builds the layer for the input size seen on the example
  inputs. Without them ``orthofx.explain`` said ``apply``, and ``orthofx.transform`` raised its PlanError only in
  the pass's ``apply``, after the passes before it had run: with ``inplace=True`` an earlier rule
  (``isometric_init``) had written the user's weights already. Fixed: the plan knows whether example inputs were
  given (``PlanEntry.has_example_inputs``), and the pass refuses the entry at planning (``entry.refusal``, raised by
  transform before any pass runs; explain shows ``apply: fails: ...``).
- ``orthofx.nn.OrthogonalLinear`` (and the explicit-kernel orthogonal convs and transposed convs) with weights of
  one dtype given an input of another failed inside torch ("mat1 and mat2 must have the same dtype", "Input type
  (float) and bias type (c10::BFloat16) should be the same"), naming neither the layer nor the fix; the isometric
  blocks raised a LayerArgumentError. Fixed: the same check (``orthofx.nn.orthogonal.check_input_dtype``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import LayerArgumentError
from orthofx.nn.isometric import OrthogonalActivationBlock
from orthofx.nn.orthogonal import OrthogonalConv2d, OrthogonalConvTranspose2d, OrthogonalLinear
from references import circular_operator64

_CAYLEY = {"match": {"name": "2"}, "apply": "orthogonal_conv", "with": {"method": "cayley_fft"}}
_INIT_FIRST = {"rules": [{"match": {"name": "0"}, "apply": "isometric_init"}, _CAYLEY]}


def _model(dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, dtype=dtype), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1, dtype=dtype))


def test_explain_without_example_inputs_shows_the_cayley_fft_refusal():
    plan = orthofx.explain(_model(), _INIT_FIRST)
    entry = next(e for e in plan.entries if e.site.name == "2")
    assert isinstance(entry.refusal, orthofx.PlanError)
    message = str(entry.refusal)
    assert f"rule '{entry.rule_name}': 2 (Conv2d(4->4" in message
    assert "example_inputs=(x,)" in message and "method 'auto'" in message
    row = next(r for r in plan.rows() if r["site"] == "2")
    assert row["status"].startswith("apply: fails:") and "example_inputs" in row["status"]
    assert "fails: method 'cayley_fft'" in str(plan)
    # the earlier rule's entry is planned as usual
    assert next(e for e in plan.entries if e.site.name == "0").refusal is None


def test_transform_without_example_inputs_refuses_before_any_weight_is_written():
    model = _model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(orthofx.PlanError, match=r": 2 \(Conv2d\(4->4") as caught:
        orthofx.transform(model, _INIT_FIRST, inplace=True)
    assert "example_inputs=(x,)" in str(caught.value) and "method 'auto'" in str(caught.value)
    for name, p in model.named_parameters():  # isometric_init on '0' ran before the refusal on the old code
        assert torch.equal(p, before[name]), name
    assert type(model[2]) is nn.Conv2d


def test_cayley_fft_refusal_does_not_depend_on_on_impossible():
    policy = {"rules": [{**_CAYLEY, "with": {"method": "cayley_fft", "on_impossible": "skip"}}]}
    with pytest.raises(orthofx.PlanError, match="example_inputs"):
        orthofx.transform(_model(), policy)


def test_cayley_fft_with_example_inputs_is_orthogonal_at_that_size():
    model = _model(torch.float64)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    plan = orthofx.explain(model, _INIT_FIRST, example_inputs=(x,))
    assert all(e.refusal is None and not e.outcome for e in plan.entries)
    gm = orthofx.transform(model, _INIT_FIRST, example_inputs=(x,))
    layer = gm.get_submodule("2")
    assert layer.method == "cayley_fft" and tuple(layer.input_size) == (6, 6)
    # dense float64 operator of the circular convolution by the layer's full-size kernel on the 6x6 grid: a
    # full-size kernel's circular alignment only permutes the output positions, which keeps the singular values
    operator = circular_operator64(layer.weight, grid=(6, 6))
    assert operator.shape == (4 * 36, 4 * 36)
    sigma = torch.linalg.svdvals(operator)
    assert torch.allclose(sigma, torch.ones_like(sigma), atol=1e-8), (sigma.min(), sigma.max())
    # and the layer as it runs preserves norms (square, stride 1) on an input of that size
    h = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        out = layer(h) - (0 if layer.bias is None else layer.bias.reshape(1, -1, 1, 1))
    assert torch.allclose(out.flatten(1).norm(dim=1), h.flatten(1).norm(dim=1), rtol=1e-8)


@pytest.mark.parametrize("make, x", [
    (lambda: OrthogonalLinear(8, 4), torch.randn(2, 8)),
    (lambda: OrthogonalConv2d(4, 4, 3, padding="same"), torch.randn(1, 4, 6, 6)),
    (lambda: OrthogonalConvTranspose2d(4, 4, 2, stride=2), torch.randn(1, 4, 6, 6)),
], ids=["linear", "conv", "conv_transpose"])
def test_an_input_of_another_dtype_is_a_layer_argument_error(make, x):
    layer = make().to(torch.bfloat16)
    name = type(layer).__name__
    with pytest.raises(LayerArgumentError, match=rf"^{name}: the input's dtype float32 is not the layer's "
                                                 r"bfloat16; convert the input \(x.to\(torch.bfloat16\)\) or the "
                                                 r"layer \(layer.to\(x.dtype\)\)"):
        layer(x)
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16
    # under torch.autocast the mixed dtypes are autocast's to handle and keep working
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.float()(x).dtype == torch.bfloat16


def test_the_isometric_blocks_keep_their_message():
    block = OrthogonalActivationBlock(4)
    with pytest.raises(LayerArgumentError, match=r"^OrthogonalActivationBlock: the input's dtype float64 is not the "
                                                 r"block's float32; convert the input \(x.to\(torch.float32\)\) or "
                                                 r"the block \(block.to\(x.dtype\)\)"):
        block(torch.randn(3, 4, dtype=torch.float64))
