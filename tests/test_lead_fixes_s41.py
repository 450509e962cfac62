"""Session 41's lead fixes: orthofx's scratch tensors under a user's default device."""

import contextlib

import pytest
import torch

from orthofx import metrics


@contextlib.contextmanager
def _default_device(device):
    before = torch.get_default_device()
    torch.set_default_device(device)
    try:
        yield
    finally:
        torch.set_default_device(before)


@pytest.mark.parametrize("shape,input_size,stride,chunked", [
    ((4, 3, 3, 3), (6, 6), 1, False),   # rfftn over the grid
    ((4, 3, 3, 3), (6, 6), 1, True),    # frequency by frequency (the direct DFT over the taps)
    ((6, 3, 1, 1), (4, 4), 1, False),   # one tap: one matrix per group
    ((4, 2, 3, 3), (6, 6), 2, True),    # strided, space-to-depth, chunked
])
def test_frequency_matrices_of_a_cpu_weight_under_a_meta_default_device(shape, input_size, stride, chunked):
    """The per-frequency matrices and their counts of a CPU kernel are the same with a meta default device as
    without (the counts and DFT indices were made on the default device, and meta has no values). The reference
    is a dense float64 circular convolution's singular values, built here from its impulse responses."""
    torch.manual_seed(0)
    weight = torch.randn(*shape, dtype=torch.float64)
    max_elements = 40 if chunked else None
    expected = list(metrics._frequency_matrices(weight, input_size, stride, 1, torch.float64, max_elements))
    with _default_device("meta"):
        got = list(metrics._frequency_matrices(weight, input_size, stride, 1, torch.float64, max_elements))
    assert len(got) == len(expected) > (1 if chunked and shape[2] > 1 else 0)
    for (mats, counts), (mats0, counts0) in zip(got, expected):
        assert mats.device.type == "cpu" and counts.device.type == "cpu"
        torch.testing.assert_close(mats, mats0, atol=0, rtol=0)
        assert torch.equal(counts, counts0)
    # and the singular values they give are the dense operator's
    n = input_size[0]
    dense = torch.stack([torch.nn.functional.conv2d(
        torch.nn.functional.pad(e.reshape(1, shape[1], n, n), [shape[3] - 1, 0, shape[2] - 1, 0], mode="circular"),
        weight.flip(-1, -2), stride=stride).flatten() for e in torch.eye(shape[1] * n * n, dtype=torch.float64)], 1)
    sv = torch.cat([torch.linalg.svdvals(m).repeat_interleave(c, 0) for mats, counts in got
                    for m, c in zip(mats, counts)]).sort(descending=True).values
    torch.testing.assert_close(sv, torch.linalg.svdvals(dense), atol=1e-10, rtol=1e-10)
