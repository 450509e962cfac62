"""The ``convnorm`` pass's ``momentum``: P3's running filters per input size, reached from a policy (issue 3, part 4:
"running statistics per input size for eval"); before, only hand-built ConvNorm layers had them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import PolicyError

EPS = 1e-5
MOMENTUM = 0.25


def _policy(**params):
    return {"rules": [{"match": {"type": "Conv2d"}, "apply": "convnorm", "with": params}]}


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)).double()


def _filter(weight: torch.Tensor, grid) -> torch.Tensor:
    """P3's ``V = (sum_c |FFT_grid(K_{m,c})|^2 + eps)^(-1/2)`` on the rfft half grid, float64, from a dense FFT of
    the kernel zero-padded onto the grid."""
    w = weight.detach().to(torch.float64)
    padded = w.new_zeros(w.shape[:2] + tuple(grid))
    padded[:, :, : w.shape[2], : w.shape[3]] = w
    power = torch.fft.fftn(padded, dim=(-2, -1)).abs().square().sum(1)[..., : grid[-1] // 2 + 1]
    return (power + EPS).rsqrt()


def test_running_filters_follow_p3_update_and_eval_uses_them():
    model = _model()
    gm = orthofx.transform(model, _policy(momentum=MOMENTUM))
    layer = gm.get_submodule("0")
    assert layer.momentum == MOMENTUM
    grid = (10, 10)  # an 8 x 8 input padded by 1 on each side: the FFT grid of its exact normalisation
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.5)
    expected = None
    gm.train()
    for _ in range(3):
        x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
        v = _filter(layer.conv.weight, grid)  # V of the weight this forward uses
        expected = v if expected is None else torch.lerp(expected, v, MOMENTUM)
        gm(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    running = gm.state_dict()["0.running_v_10x10"]
    torch.testing.assert_close(running, expected, rtol=1e-10, atol=1e-12)
    # eval reads the running filter: not the output of V of the stepped weight (the default's eval) ...
    plain = orthofx.transform(model, _policy())
    plain.load_state_dict({k: v for k, v in gm.state_dict().items() if "running_v" not in k})
    gm.eval()
    plain.eval()
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert not torch.allclose(gm(x), plain(x), atol=1e-6)
        # ... and that output once the running filters hold V of the current weight
        for name in ("0", "2"):
            norm = gm.get_submodule(name)
            for size, running in norm._running_filters.items():
                running.copy_(_filter(norm.conv.weight, size))
        torch.testing.assert_close(gm(x), plain(x), rtol=1e-9, atol=1e-10)


def test_the_default_keeps_eval_on_the_current_weight():
    gm = orthofx.transform(_model(), _policy())
    assert all(getattr(m, "momentum", "none") is None for n, m in gm.named_modules() if n in ("0", "2"))
    assert not [k for k in gm.state_dict() if "running_v" in k]


def test_running_filters_are_saved_loaded_and_frozen(tmp_path):
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    gm = orthofx.transform(_model(), _policy(momentum=MOMENTUM), example_inputs=(x,))
    gm.train()
    for scale in (1.0, 2.0):
        gm(x * scale).sum().backward()
    gm.eval()
    with torch.no_grad():
        reference = gm(x)
    orthofx.export(gm, tmp_path / "m.pt")
    restored = orthofx.load(_model(), tmp_path / "m.pt")
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), reference, rtol=0, atol=0)
    frozen = orthofx.freeze(gm, example_inputs=(x,))
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, "0.1", True])
def test_momentum_outside_0_1_is_refused_by_the_policy(bad):
    with pytest.raises(PolicyError, match="momentum"):
        orthofx.transform(_model(), _policy(momentum=bad))
