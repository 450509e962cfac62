"""Session 45, lead's own fixes: messages found by the audits."""
import warnings

import pytest
import torch

import orthofx


class _ShapeBranch(torch.nn.Module):
    """A Python branch on an input size: symbolic tracing fails, so transform captures with torch.export."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[-1] == 4:
            return self.lin(x)
        return x


def test_batch_one_export_capture_error_names_the_example_batch():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = orthofx.transform(_ShapeBranch(), "lorth", example_inputs=(torch.randn(1, 4),))
    with pytest.raises(orthofx.errors.ArgumentError, match=r"example inputs had batch size 1.*\(2 or more\)"):
        gm(torch.randn(3, 4))
    # a batch of 2 captures a dynamic batch: other sizes run and equal the model's linear
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm2 = orthofx.transform(_ShapeBranch(), "lorth", example_inputs=(torch.randn(2, 4),))
    x = torch.randn(3, 4)
    torch.testing.assert_close(gm2(x), gm2.lin(x))
