"""lorth's range in float32: finite wherever the value is, inf (not NaN) past it; values against the dense float64
reference ``lorth64`` (tests/references.py)."""

from __future__ import annotations

import pytest
import torch

from orthofx.metrics import lorth
from references import lorth64

pytestmark = pytest.mark.usefixtures("one_thread")

FLOAT32_MAX = torch.finfo(torch.float32).max


@pytest.mark.parametrize("M, Cg, ks, stride", [(8, 8, (3, 3), 1), (8, 8, (3, 3), 2), (32, 4, (3, 3), 1),
                                               (32, 4, (3,), 2), (6, 6, (1, 1), 1), (40, 6, (1, 1), 2)])
def test_float32_lorth_is_finite_wherever_its_value_is(M, Cg, ks, stride):
    # a float32 L_orth overflows only when the value itself is past float32's largest number: scaled so that the
    # float64 value is just below it, the float32 one is finite and agrees; just above it, inf
    base = torch.randn(M, Cg, *ks, generator=torch.Generator().manual_seed(M), dtype=torch.float64)
    unit = lorth64(base, stride=stride)
    for target in (1e37, 3e38, 4e38):
        w = base * (target / unit) ** 0.25
        ref = lorth64(w, stride=stride)
        for grad in (False, True):
            value = float(lorth(w.float().requires_grad_(grad), stride=stride).detach())
            if ref < FLOAT32_MAX * 0.999:
                assert value == pytest.approx(ref, rel=1e-4)
            elif ref > FLOAT32_MAX * 1.001:
                assert value == float("inf")


@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (6, 4, 1, 1), (4, 6, 1, 1), (6, 4)])
def test_entries_of_1e30_overflow_float32_to_inf_not_nan(shape):
    # entries of 1e30 give L_orth ~ 1e120: beyond float32, whose value is then inf (the products of entries
    # overflowed and summed to NaN in the Gram route), well inside float64
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 1e30
    ref = lorth64(w)
    assert 1e115 < ref < 1e125
    assert float(lorth(w)) == pytest.approx(ref, rel=1e-10)
    assert float(lorth(w.float())) == float("inf")
    assert float(lorth(w.to(torch.bfloat16))) == float("inf")
    with torch.no_grad():
        assert float(lorth(w.float().requires_grad_())) == float("inf")
    assert not torch.isfinite(lorth(w.float().requires_grad_()))  # differentiated: left as computed (NaN)
    nan = w.float().clone()
    nan.view(-1)[1] = float("nan")
    assert torch.isnan(lorth(nan))  # a NaN in the weight stays NaN
