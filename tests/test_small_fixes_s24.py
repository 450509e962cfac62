"""Session 24's small fixes: the padding helpers refuse bad pads with orthofx's error type (a builtin ValueError
before), naming the function and the pads."""

from __future__ import annotations

import pytest
import torch

from orthofx.errors import LayerArgumentError
from orthofx.nn.padding import circular_fold, periodic_pad


def test_periodic_pad_refuses_negative_pads_and_empty_dimensions():
    x = torch.arange(6.0).reshape(1, 2, 3)
    assert torch.equal(periodic_pad(x, [(0, 0), (4, 0)])[0, 0], torch.tensor([2.0, 0, 1, 2, 0, 1, 2]))  # wraps twice
    with pytest.raises(LayerArgumentError, match=r"periodic_pad: pads must be >= 0, got \(\(0, 0\), \(-1, 0\)\)"):
        periodic_pad(x, [(0, 0), (-1, 0)])
    with pytest.raises(LayerArgumentError, match=r"periodic_pad: cannot pad an empty dimension \(size 0\)"):
        periodic_pad(torch.zeros(1, 0), [(1, 1)])


def test_circular_fold_refuses_negative_pads_and_pads_as_large_as_the_dimension():
    with pytest.raises(LayerArgumentError, match=r"circular_fold: pads must be >= 0 .* got pads=\(\(-1, 0\),\) for "
                                                 r"an input of shape \(1, 4\)"):
        circular_fold(torch.zeros(1, 4), [(-1, 0)])
    with pytest.raises(LayerArgumentError, match=r"circular_fold: dimension 1 has size 4, not more than its pads "
                                                 r"\(2, 2\): nothing to fold onto"):
        circular_fold(torch.zeros(1, 4), [(2, 2)])


def test_isometric_init_reports_the_float64_lorth_of_a_float32_conv_beyond_float32s_range():
    # entries of 1e30: L_orth ~ 1e120, inf in float32; the Linear branch already measured in float64
    from orthofx.passes.isometric_init import _defect
    from references import lorth64

    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(1e30)
    value = _defect(conv.weight.detach(), conv, 1.0)["lorth"]
    assert value == pytest.approx(lorth64(conv.weight.detach()), rel=1e-9)
    assert 1e110 < value < 1e130
