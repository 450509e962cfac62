"""Regressions found by fuzzing the Jacobian-isometry metrics, isometric init and the Stiefel helpers.

Each test failed before its fix (a bare torch/Python error, or a silent wrong value) and checks the behaviour
against plain shape arithmetic, a direct computation, or a precise orthofx error.
"""

import math

import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import ArgumentError, LayerArgumentError
from orthofx.metrics import jacobian_isometry, jacobian_singular_values
from orthofx.nn import stiefel
from orthofx.nn.isometric import OrthogonalActivationBlock
from orthofx.passes.isometric_init import delta_orthogonal_, orthogonal_


@pytest.mark.parametrize("kind", ["full", "partial", "offdiag"])
def test_per_sample_estimate_on_an_empty_batch_is_an_argument_error(kind):
    # was a RuntimeError from a reshape of 0 elements into (0, -1)
    with pytest.raises(ArgumentError, match="at least one sample"):
        jacobian_isometry(nn.Linear(4, 4), torch.randn(0, 4), kind=kind, per_sample=True)


@pytest.mark.parametrize("kind", ["full", "partial", "offdiag"])
def test_integer_output_is_an_argument_error(kind):
    # partial / offdiag failed inside torch; full returned ||-I||^2 as if the Jacobian were measured
    with pytest.raises(ArgumentError, match="floating-point tensor, got dtype torch.int64"):
        jacobian_isometry(lambda x: (x > 0).long(), torch.randn(3, 4), kind=kind)
    with pytest.raises(ArgumentError, match="floating-point tensor, got dtype torch.bool"):
        jacobian_singular_values(lambda x: x > 0, torch.randn(3, 4))


def test_per_sample_singular_values_of_an_empty_batch_are_empty():
    # was an IndexError (y[0] of an empty output); B = 0 diagonal blocks of size 3 x 4 have min(3, 4) values each
    values = jacobian_singular_values(nn.Linear(4, 3), torch.randn(0, 4), per_sample=True)
    assert values.shape == (0, 3)


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0, 2, 3, 3), (4, 0, 3, 3)])
def test_stiefel_helpers_on_empty_weights(shape):
    # flatten_weight's reshape(out, -1) failed for out = 0, and orthogonality_defect's amax had no identity
    weight = torch.empty(shape)
    matrix = stiefel.flatten_weight(weight)
    assert matrix.shape == (shape[0], math.prod(shape[1:]))
    assert float(stiefel.orthogonality_defect(matrix)) == 0.0


@pytest.mark.parametrize("features", [(3, 0), (0, 3)])
def test_isometric_init_of_an_empty_linear(features):
    # the pass failed with a TransformError wrapping an IndexError / RuntimeError
    gm = orthofx.transform(nn.Sequential(nn.Linear(*features)),
                           {"rules": [{"match": {"type": "Linear"}, "apply": "isometric_init"}]})
    assert orthofx.manifest_of(gm).changes[0].after["orth_defect"] == 0.0


@pytest.mark.parametrize("fill, weight", [(orthogonal_, (4, 4)), (delta_orthogonal_, (4, 4, 3))])
@pytest.mark.parametrize("scale", [math.nan, math.inf, "2"])
def test_fills_refuse_a_non_finite_scale(fill, weight, scale):
    # a NaN / inf scale silently filled the weight with non-finite values
    with pytest.raises(ArgumentError, match="scale must be a finite number"):
        fill(torch.empty(weight), scale)


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64])
def test_orthogonal_activation_block_refuses_a_non_float_input(dtype):
    # was a raw matmul dtype error from torch
    with pytest.raises(LayerArgumentError, match=f"real floating-point input, got dtype {dtype}"):
        OrthogonalActivationBlock(3)(torch.ones(2, 3, dtype=dtype))
