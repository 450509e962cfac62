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
