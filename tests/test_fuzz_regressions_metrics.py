"""Regressions found by fuzzing the arguments of orthofx.metrics and orthofx.theory.

Each test failed before its fix (a bare torch/numpy/Python error, or a bad argument taken silently) and checks
a precise orthofx error, or the value against a direct computation.
"""

import math

import numpy as np
import pytest
import torch

from orthofx import metrics, theory
from orthofx.errors import ArgumentError


@pytest.mark.parametrize("case", [["RO"], np.array(["RO"])])
def test_adjoint_case_of_a_non_string_is_an_argument_error(case):
    # was a TypeError (unhashable type) from the dict lookup
    with pytest.raises(ArgumentError, match=r"case must be 'RO' or 'CO', got"):
        theory.adjoint_case(case)


def test_orthogonal_conv_exists_with_an_array_padding_is_an_argument_error():
    # was numpy's "truth value of an array ... is ambiguous" from `padding not in _PADDINGS`
    with pytest.raises(ArgumentError, match=r"padding must be one of \('circular', 'valid', 'zeros'\)"):
        theory.orthogonal_conv_exists(4, 4, 3, padding=np.array(["zeros", "valid"]))


@pytest.mark.parametrize("name, value", [
    ("stride", np.array([1, 1])), ("dilation", torch.tensor([1, 1])),  # were numpy / torch truth-value errors
    ("stride", True), ("dilation", 1.0), ("groups", True),              # were taken as 1
])
def test_lorth_of_a_linear_weight_takes_only_the_integer_one(name, value):
    weight = torch.randn(3, 5)
    with pytest.raises(ArgumentError, match=rf"lorth: {name} must be 1 for a 2-D \(Linear\) weight .*got "):
        metrics.lorth(weight, **{name: value})
    # the integer 1 of any integer type still works, with the value ||W W^T - I||_F^2
    expected = float((weight @ weight.T - torch.eye(3)).square().sum())
    assert float(metrics.lorth(weight, **{name: np.int64(1)})) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("function", [metrics.orthogonality_error, metrics.spectral_norm_bound])
@pytest.mark.parametrize("name, value", [("stride", torch.tensor([1, 1])), ("groups", np.array([1, 1])),
                                         ("stride", True), ("groups", True)])
def test_linear_weight_measures_take_only_the_integer_one(function, name, value):
    # a tensor or an array was a bare truth-value error, True was taken as 1
    with pytest.raises(ArgumentError, match=rf"{function.__name__}: {name} must be 1 for a 2-D \(Linear\) weight"):
        function(torch.randn(3, 5), **{name: value})


def test_lorth_case_and_fast_backward_are_checked_by_type():
    weight = torch.randn(4, 2, 3, 3)
    with pytest.raises(ArgumentError, match=r"lorth: case must be one of None, 'RO', 'CO', got array"):
        metrics.lorth(weight, case=np.array(["RO", "CO"]))  # was numpy's truth-value error
    with pytest.raises(ArgumentError, match=r"lorth: fast_backward must be True or False, got 'no'"):
        metrics.lorth(weight, fast_backward="no")  # was taken as True


def test_huge_input_size_is_an_argument_error():
    # each was a bare RuntimeError from the allocator (4e12 bytes), after choosing the route for a 1e24-point grid
    weight = torch.randn(4, 2, 3, 3)
    n = 10 ** 12
    count = min(4, 2) * n * n  # min(M, C S^d) * prod(n / S)
    with pytest.raises(ArgumentError, match=rf"conv_singular_values: .* has {count} singular values .* pass a "
                                            r"smaller input_size"):
        metrics.conv_singular_values(weight, n)
    with pytest.raises(ArgumentError, match=rf"orthogonality_error: .* has {count} singular values"):
        metrics.orthogonality_error(weight, n)
    with pytest.raises(ArgumentError, match=rf"spectral_norm_bound: input_size \({n}, 4\) at stride \(1, 1\) is an "
                                            rf"output grid of {4 * n} frequencies"):
        metrics.spectral_norm_bound(weight, (n, 4))


def test_huge_dilation_is_an_argument_error():
    # was a bare RuntimeError ("Storage size calculation overflowed")
    weight = torch.randn(4, 2, 3, 3)
    size = 2 * 10 ** 12 + 1  # (k - 1) D + 1
    with pytest.raises(ArgumentError, match=rf"dilated_kernel: .* over \({size}, {size}\) taps"):
        metrics.dilated_kernel(weight, 10 ** 12)
    with pytest.raises(ArgumentError, match=rf"lorth: .* over \({size}, {size}\) taps"):
        metrics.lorth(weight, stride=2, dilation=10 ** 12)


@pytest.mark.parametrize("generator", [0, "seed", np.int64(3), torch.tensor(2)])
def test_jacobian_isometry_generator_must_be_a_generator(generator):
    # was an AttributeError ('int' object has no attribute 'device') or a TypeError from torch.randint
    with pytest.raises(ArgumentError, match=r"jacobian_isometry: generator must be a torch.Generator or None"):
        metrics.jacobian_isometry(torch.nn.Linear(3, 3), torch.randn(2, 3), generator=generator)


@pytest.mark.parametrize("name, value", [("per_sample", np.array([1, 1])), ("normalize", "no"),
                                         ("create_graph", torch.tensor([1, 0])), ("kind", np.array(["full"])),
                                         ("route", np.array(["auto"]))])
def test_jacobian_isometry_flags_and_choices_are_checked_by_type(name, value):
    # arrays and tensors were truth-value errors, strings were taken as True
    with pytest.raises(ArgumentError, match=rf"jacobian_isometry: {name} must be "):
        metrics.jacobian_isometry(torch.nn.Linear(3, 3), torch.randn(2, 3), **{name: value})


@pytest.mark.parametrize("value", [np.array([1, 1]), "yes"])
def test_jacobian_singular_values_per_sample_must_be_a_bool(value):
    with pytest.raises(ArgumentError, match=r"jacobian_singular_values: per_sample must be True or False"):
        metrics.jacobian_singular_values(torch.nn.Linear(3, 3), torch.randn(2, 3), per_sample=value)


def test_isometry_moments_arguments():
    # a complex tensor gave complex "moments" and a bool one was counted as magnitudes 1
    for values in (torch.ones(3, dtype=torch.complex64), torch.ones(3, dtype=torch.bool)):
        with pytest.raises(ArgumentError, match=r"singular_values must be a real floating-point tensor"):
            metrics.isometry_moments(values)
    # no values and no n: the old message read "n must be at least the number of singular values (0), got 0"
    with pytest.raises(ArgumentError, match=r"no singular values \(shape \(2, 0\)\) and no n: pass n"):
        metrics.isometry_moments(torch.ones(2, 0))
    # n as a numpy integer (as every other size of orthofx accepts) was refused; the moments by their definition
    sigma = torch.tensor([2.0, 0.5], dtype=torch.float64)
    m1, m2 = metrics.isometry_moments(sigma, n=np.int64(3))
    assert float(m1) == pytest.approx((4.0 + 0.25) / 3)
    assert float(m2) == pytest.approx((16.0 + 0.0625) / 3)
    zeros = metrics.isometry_moments(torch.ones(2, 0), n=3)
    assert torch.equal(zeros[0], torch.zeros(2)) and torch.equal(zeros[1], torch.zeros(2))
    assert math.isclose(3 * float(m1), float(sigma.square().sum()))
