"""Small fixes of session 30, each with the behaviour the old code got wrong."""
import pytest
import torch
from torch import nn

import orthofx
from orthofx.transform import manifest_of
from references import circular_operator64, lorth64

LINEAR_LORTH = {"match": {"type": "Linear"}, "apply": "orth_regularizer"}


class _VarargsGRU(nn.Module):
    """A forward taking hidden states as ``*h``: symbolic tracing passes ``h`` as one proxy, which ``*h`` iterates."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x, *h):
        y, _ = self.rnn(x, *h)
        return self.fc(y)


def test_fx_capture_of_unpacked_varargs_names_iteration_not_control_flow():
    # torch's message for iterating a proxy also says "control flow", and capture blamed if/while/bool/len
    policy = {"orthofx": 1, "capture": {"mode": "fx"}, "rules": [LINEAR_LORTH]}
    with pytest.raises(orthofx.CaptureError) as info:
        orthofx.transform(_VarargsGRU(), policy, example_inputs=(torch.randn(5, 3, 4),))
    message = str(info.value)
    assert "iterates over a traced tensor" in message and "*args" in message
    assert "control flow (if/while/bool/len)" not in message
    assert "capture mode export" in message
    # what the message offers works: the default capture (auto) traces it with export
    model = _VarargsGRU()
    gm = orthofx.transform(model, {"orthofx": 1, "rules": [LINEAR_LORTH]}, example_inputs=(torch.randn(5, 3, 4),))
    x = torch.randn(5, 3, 4)
    torch.testing.assert_close(gm(x), model(x))  # L_orth changes no weight: the same function


def test_fx_capture_of_a_branch_on_a_tensor_still_names_control_flow():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x)
            return x

    with pytest.raises(orthofx.CaptureError, match=r"control flow \(if/while/bool/len\)"):
        orthofx.transform(Branch(), {"orthofx": 1, "capture": {"mode": "fx"}, "rules": [LINEAR_LORTH]})


def test_cayley_fft_on_a_map_smaller_than_the_kernel_points_to_method_auto():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    x = torch.randn(2, 3, 2, 2)
    policy = {"rules": [{"match": {"type": "Conv2d"}, "apply": "orthogonal_conv", "with": {"method": "cayley_fft"}}]}
    with pytest.raises(orthofx.ImpossibleLayerError, match=r"does not fit the input size \(2, 2\).*use method auto"):
        orthofx.transform(model, policy, example_inputs=(x,))
    # what it points to works: an exactly orthogonal circular 3 x 3 layer on the 2 x 2 map
    gm = orthofx.transform(model, {"rules": [{"match": {"type": "Conv2d"}, "apply": "orthogonal_conv"}]},
                           example_inputs=(x,))
    operator = circular_operator64(gm.get_submodule("0").weight, grid=(2, 2))  # dense, built in the test
    assert float((torch.linalg.svdvals(operator) - 1).abs().max()) < 1e-5


@pytest.mark.parametrize("apply", ["isometric_init", "riemannian", "orthogonal_conv"])
def test_passes_that_change_a_frozen_convnorm_conv_skip_it(apply):
    # the frozen layer's filters were computed from its conv's weight: isometric_init wrote a new weight and left
    # them stale, silently (found by session 30's fuzz round)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(2, 4, 6, 6)
    frozen = orthofx.freeze(orthofx.transform(model, "convnorm", example_inputs=(x,)))
    gm = orthofx.transform(frozen, {"rules": [{"match": {"type": "Conv2d"}, "apply": apply, "optional": True}]},
                           example_inputs=(x,))
    reasons = {s.name: r for s, _, r in manifest_of(gm).plan.skipped}
    assert set(reasons) == {"0.conv", "2.conv"} and all("frozen ConvNorm" in r for r in reasons.values())
    assert torch.equal(gm.get_submodule("0.conv").weight, frozen.get_submodule("0.conv").weight)
    with torch.no_grad():
        torch.testing.assert_close(gm.eval()(x), frozen.eval()(x), rtol=0, atol=0)


class _CovConv(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        h = self.conv(x).flatten(2)
        return torch.linalg.eigvalsh(h @ h.transpose(1, 2) / h.shape[2] + 1e-3 * torch.eye(4))


def test_pre_svd_orthogonal_after_convnorm_names_the_wrapper_not_a_tie():
    # the ConvNorm wrapper exposes its conv's weight, which read as a weight "tied to conv.conv"
    policy = {"rules": [{"match": {"type": "Conv2d"}, "apply": "convnorm"},
                        {"match": {"feeds": "linalg.eigvalsh"}, "apply": "pre_svd", "with": {"weight": "orthogonal"}}]}
    gm = orthofx.transform(_CovConv(), policy, example_inputs=(torch.randn(2, 3, 6, 6),))
    change = next(c for c in manifest_of(gm).changes if c.pass_name == "pre_svd")
    assert "ConvNormConv2d now" in change.after["fallback"] and "tied" not in change.after["fallback"]
    # the L_orth fallback penalises the conv's kernel (P0's L_orth, penalty_weight 0.01)
    expected = 0.01 * lorth64(gm.get_submodule("conv.conv").weight)
    assert float(orthofx.penalty(gm)) == pytest.approx(expected, rel=1e-4)
