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


def test_every_report_row_has_the_documented_keys():
    """A decomposition site's row (the svd preset) lacked lorth / sigma / input / exists: a logger reading
    ``row["lorth"]`` as to_dict documents raised KeyError."""
    x = orthofx.models.example_input("gcp_cnn", batch=4)
    gm = orthofx.transform(orthofx.models.get("gcp_cnn"), "svd", example_inputs=(x,))
    report = orthofx.report(gm)
    rows = report.to_dict()["rows"]
    keys = {"site", "layer", "pass", "params", "lorth", "sigma_min", "sigma_max", "input", "exists"}
    function_rows = [row for row in rows if ":" in row["site"]]
    assert function_rows, "the svd preset's decomposition sites have rows"
    for row in rows:
        assert keys <= set(row), (row["site"], keys - set(row))
    for row in function_rows:
        assert row["lorth"] is None and row["sigma_min"] is None and row["input"] is None
        assert "kappa" in row  # monitored: the monitor's keys too
