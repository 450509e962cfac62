"""Session 41's lead fixes: orthofx's scratch tensors and added modules under a user's default device, and export
capture of a leaf called through functional_call (after a failed attempt, in a forward calling the root again)."""

import pytest
import torch

from orthofx import metrics
from tests.test_global_settings_s41 import default_device as _default_device


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


# ------------------------------------------------- export capture: a functional_call'd leaf after a failed attempt

class _FunctionalAfterDynamicFailure(torch.nn.Module):
    """``lin`` called with its own weights, then a dict lookup keyed by the batch size (the dynamic-batch export
    attempt fails there, the static one goes on), then ``lin`` through functional_call with other weights."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.other = torch.nn.Linear(4, 4)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        scale = {3: 1.0}[x.shape[0]]
        fast = {"weight": self.other.weight * 2, "bias": self.other.bias}
        return torch.func.functional_call(self.lin, fast, (h,)) * scale + h


def test_functional_call_after_a_failed_dynamic_attempt_stays_inlined():
    """The failed attempt's calls were still counted, so the kept run named its calls one off (``lin@2``): the
    substituted call became ``call_module lin``, computing with lin's own weights (1.32 off the model). The model
    is the reference."""
    from orthofx.capture import capture

    torch.manual_seed(0)
    model, x = _FunctionalAfterDynamicFailure(), torch.randn(3, 4)
    gm, info = capture(model, mode="export", example_inputs=(x,))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["lin"]
    assert [w for w in info.warnings if "lin@" in w] and all("'lin@1'" in w for w in info.warnings if "lin@" in w)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_alias_walk_bound_counts_other_paths_not_modules():
    """``first_module_paths(model, limit)`` gives up past ``limit`` other paths; it counted every module walked,
    so any model of more than 256 submodules and one shared leaf cost export capture a second torch.export."""
    from orthofx.capture import first_module_paths

    blocks = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh()) for _ in range(200)])
    model = torch.nn.Module()
    model.blocks = blocks
    model.head = blocks[0][0]
    assert first_module_paths(model, 1) == {"head": "blocks.0.0"}
    shared = torch.nn.Module()
    shared.a = shared.b = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    assert first_module_paths(shared, 2) is None  # b, b.0, b.1
    assert first_module_paths(shared, 3) == {"b": "a", "b.0": "a.0", "b.1": "a.1"}


class _Recursive(torch.nn.Module):
    """``lin`` with its own weights, then the root called again, where ``lin`` is called through functional_call
    (``substituted_first``: the other way round)."""

    def __init__(self, substituted_first=False):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.other = torch.nn.Linear(4, 4)
        self.substituted_first = substituted_first

    def forward(self, x, depth: int = 1):
        fast = {"weight": self.other.weight * 2, "bias": self.other.bias}
        if self.substituted_first:
            if depth == 0:
                return torch.tanh(self.lin(x))
            h = torch.func.functional_call(self.lin, fast, (x,))
            return self(h, depth - 1) + h
        h = torch.tanh(self.lin(x))
        if depth == 0:
            return torch.func.functional_call(self.lin, fast, (h,))
        return self(h, depth - 1) + h


@pytest.mark.parametrize("substituted_first", [False, True])
def test_functional_call_in_a_forward_that_calls_the_root_again(substituted_first):
    """Counting the leaf calls afresh at every root call (the first fix of the failed-attempt shift) reset the
    count in the middle of a recursive forward: the wrong call was kept as ``call_module lin`` (1.14 and 3.11 off
    the model). The model is the reference."""
    from orthofx.capture import capture

    torch.manual_seed(0)
    model, x = _Recursive(substituted_first), torch.randn(3, 4)
    gm, info = capture(model, mode="export", example_inputs=(x,))
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    assert [w for w in info.warnings if "torch.func.functional_call" in w]


class _ParameterFreeHead(torch.nn.Module):
    def forward(self, x):
        return torch.linalg.eigvalsh(x @ x.mT + torch.eye(x.shape[-1], device=x.device))


def test_monitor_of_a_parameter_free_model_takes_the_users_default_device():
    """The svd preset's condition monitor, added to a model with no parameter or buffer to take a device from,
    was built inside the passes' CPU default and stayed on the CPU: with the user's default device another one
    ('meta' here, for 'cuda'), the first forward on that device's inputs failed. The reference is the plain
    eigvalsh on the same input."""
    import warnings

    import orthofx

    with _default_device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = orthofx.transform(_ParameterFreeHead(), "svd")
        assert {b.device.type for b in gm.buffers()} == {"meta"}
        x = torch.randn(2, 4, 4)
        assert gm(x).shape == _ParameterFreeHead()(x).shape == (2, 4) and gm(x).device.type == "meta"
    with warnings.catch_warnings():  # without a default device: on the CPU, the plain head's values
        warnings.simplefilter("ignore")
        gm = orthofx.transform(_ParameterFreeHead(), "svd")
    assert {b.device.type for b in gm.buffers()} == {"cpu"}
    x = torch.randn(2, 4, 4)
    torch.testing.assert_close(gm.eval()(x), _ParameterFreeHead()(x))


def test_monitor_of_a_parameter_free_model_takes_the_example_inputs_device():
    """With example inputs on another device than the default (CPU batches under a 'cuda' default; 'meta' here),
    the monitor goes where the data is: on the default device, the example run failed in index_copy. The
    reference is the plain head on the same input."""
    import warnings

    import orthofx

    x = torch.randn(2, 4, 4, device="cpu")
    with _default_device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = orthofx.transform(_ParameterFreeHead(), "svd", example_inputs=(x,))
    assert {b.device.type for b in gm.buffers()} == {"cpu"}
    torch.testing.assert_close(gm.eval()(x), _ParameterFreeHead()(x))
