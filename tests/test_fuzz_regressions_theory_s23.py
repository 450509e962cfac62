"""Session 23 review of the existence theory (P0 Theorem 4) and of how the ``orthogonal_conv`` pass reports it.

The report status of a ``padding: keep`` layer with zero padding said "not at borders" even where the layer's
windows never read the padding (a 1x1 conv, a ``k = S`` patch embedding with padding 0), which are exactly
orthogonal. The reference: the dense float64 matrix of the replaced layer, built by applying it to every basis
vector of the input.
"""

import re

import pytest
import torch
from torch import nn

import orthofx

GRID = 8  # divisible by every stride below


def _rule(**params):
    return {"rules": [{"match": {"type": "Conv2d"}, "apply": "orthogonal_conv",
                       "with": {"padding": "keep", "init": "random", **params}}]}


def _dense(layer: nn.Module, channels: int) -> torch.Tensor:
    """The layer's matrix (bias removed): outputs x inputs, from the images of the basis vectors."""
    n_in = channels * GRID * GRID
    basis = torch.eye(n_in, dtype=torch.float64).reshape(n_in, channels, GRID, GRID)
    with torch.no_grad():
        out = layer(basis) - layer(torch.zeros_like(basis[:1]))
    return out.reshape(n_in, -1).T


def _orthogonality_defect(matrix: torch.Tensor) -> float:
    """max |A A^T - I| for a wide (or square) A, max |A^T A - I| for a tall one."""
    gram = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
    return float((gram - torch.eye(gram.shape[0], dtype=gram.dtype)).abs().max())


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 4, 1),                                  # 1x1: no window reads the padding
    nn.Conv2d(8, 4, 1, stride=2),                        # strided 1x1 (RO, M <= C k^d)
    nn.Conv2d(2, 4, 2, stride=2),                        # k = S patch embedding, padding 0
    nn.Conv2d(2, 4, 2, stride=2, padding="valid"),
    nn.Conv2d(4, 4, 1, padding="same"),                  # 'same' with a 1x1 extent pads nothing
], ids=["1x1", "strided-1x1", "patch", "patch-valid", "1x1-same"])
def test_padding_keep_status_matches_the_dense_operator(conv):
    """Each status against the operator: the layer under test is exact, the 3x3 zero-padded one after it is not
    (its border rows are truncated), and the report must tell them apart."""
    torch.manual_seed(0)
    border_read = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(conv, border_read).double()
    x = torch.randn(1, conv.in_channels, GRID, GRID, dtype=torch.float64)
    gm = orthofx.transform(model, _rule(), example_inputs=(x,))
    status = {change.site: change.status for change in orthofx.manifest_of(gm).changes}
    assert _orthogonality_defect(_dense(gm.get_submodule("0"), conv.in_channels)) < 1e-12
    assert status["0"] == "hard"
    assert _orthogonality_defect(_dense(gm.get_submodule("1"), 4)) > 1e-2
    assert status["1"] == "hard (zero padding: not at borders)"


@pytest.mark.parametrize("kernel, stride, dilation, bound", [
    ((2, 1), (2, 1), (2, 1), 2),  # r = min(2, 2 / gcd(2, 2)) = 1; the old hint said 2 * min(2, 2) = 4
    ((4, 1), (4, 1), (2, 1), 4),  # r = min(4, 4 / 2) = 2; the old hint said 8
    ((1, 1), (2, 1), (1, 1), 2),  # undilated, k < S: r = k
])
def test_transposed_impossible_error_gives_a_channel_bound_that_builds(kernel, stride, dilation, bound):
    """The RO fix an impossible OrthogonalConvTranspose2d quotes counts the residues a dilated kernel reads
    (min(k, S / gcd(D, S)), theory.orthogonal_conv_exists): following it builds the layer, one channel more does
    not. It used to quote out_channels * prod(min(k, S)) whatever the dilation."""
    from orthofx.errors import ImpossibleLayerError
    from orthofx.nn import OrthogonalConvTranspose2d

    kw = dict(out_channels=2, kernel_size=kernel, stride=stride, dilation=dilation)
    with pytest.raises(ImpossibleLayerError) as info:
        OrthogonalConvTranspose2d(in_channels=16, **kw)
    quoted = re.search(r"use in_channels <= (\d+) \(RO conv\)", str(info.value))
    assert quoted is not None and int(quoted.group(1)) == bound, str(info.value)
    OrthogonalConvTranspose2d(in_channels=bound, **kw)
    with pytest.raises(ImpossibleLayerError,
                       match=rf"OrthogonalConvTranspose2d\(in_channels={bound + 1},.*here {bound + 1} > {bound}\. "
                             rf"Fix: use in_channels <= {bound} \(RO conv\)"):
        OrthogonalConvTranspose2d(in_channels=bound + 1, **kw)


@pytest.mark.parametrize("conv, rows_orthonormal", [
    (nn.Conv2d(6, 3, 3), True),                          # RO (3 <= 6 * 1), no padding: a subset of orthonormal rows
    (nn.Conv2d(4, 4, 3), True),                          # square: its rows are orthonormal too
    (nn.Conv2d(2, 4, 3, stride=2, dilation=3), True),    # RO at stride 2 (4 <= 2 * 4), dilation coprime
    (nn.Conv2d(4, 4, 3, padding=1), False),              # zero padding read at the borders: not orthogonal there
    (nn.Conv2d(2, 4, 1, padding=1), False),              # a 1x1 conv whose padding adds zero border outputs
], ids=["ro-valid", "square-valid", "ro-strided-dilated-valid", "zero-same", "1x1-padded"])
def test_padding_keep_without_padding_reports_orthonormal_rows(conv, rows_orthonormal):
    """A kept zero padding of 0 drops the outputs whose windows would wrap: the operator is the circular layer's
    rows for the others, orthonormal in the RO case, which the status must say (it said 'not at borders')."""
    torch.manual_seed(0)
    model = nn.Sequential(conv).double()
    x = torch.randn(1, conv.in_channels, GRID, GRID, dtype=torch.float64)
    gm = orthofx.transform(model, _rule(), example_inputs=(x,))
    matrix = _dense(gm.get_submodule("0"), conv.in_channels)
    rows_defect = float((matrix @ matrix.T - torch.eye(matrix.shape[0], dtype=matrix.dtype)).abs().max())
    status = orthofx.manifest_of(gm).changes[0].status
    if rows_orthonormal:
        assert rows_defect < 1e-12
        assert status == "hard (rows orthonormal: no padding, the outputs at the borders are dropped)"
    else:
        assert rows_defect > 1e-2 and status == "hard (zero padding: not at borders)"


@pytest.mark.parametrize("action, predicted, applied", [
    ("error", "apply: fails: no orthogonal convolution exists", None),
    ("skip", "apply: left unchanged: no orthogonal convolution exists", "skipped: no orthogonal convolution exists"),
    ("regularize", "apply: L_orth instead: no orthogonal convolution exists", "regularised (no orthogonal version)"),
])
def test_explain_predicts_what_on_impossible_does(action, predicted, applied):
    """explain said 'apply' for a strided 1x1 shortcut that transform then refuses, skips or regularises (P0
    Theorem 4: M = 16 > C k^d = 8 in the RO case); it now says what applying will do, and a possible layer stays
    'apply'. The reference is what transform itself does with the same policy."""
    model = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2), nn.Conv2d(16, 16, 3, padding=1))
    x = torch.randn(2, 8, GRID, GRID)
    policy = {"rules": [{"match": {"type": "Conv2d"}, "apply": "orthogonal_conv", "with": {"on_impossible": action}}]}
    status = {row["site"]: row["status"] for row in orthofx.explain(model, policy, example_inputs=(x,)).rows()}
    assert status["0"].startswith(predicted) and "(on_impossible: " + action + ")" in status["0"]
    assert status["1"] == "apply"
    if applied is None:
        with pytest.raises(orthofx.ImpossibleLayerError, match="no orthogonal convolution exists"):
            orthofx.transform(model, policy, example_inputs=(x,))
        return
    changes = {c.site: c.status for c in orthofx.manifest_of(orthofx.transform(model, policy)).changes}
    assert changes["0"].startswith(applied) and changes["1"] == "hard"
