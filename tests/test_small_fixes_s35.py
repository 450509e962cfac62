"""Two small fixes (session 35); each test failed before its fix.

* ``ConvNormConvNd.gain_range`` (the ``convnorm`` pass's report, and the filter it keeps for the next eval
  forward), ``filter`` and ``update_running_filters`` read ``conv.weight`` without running the conv's forward
  pre-hooks, which the forward runs: with the older ``weight_norm``, ``prune`` or a user's hook assigning
  ``conv.weight``, they described the weight of the last forward (before an optimizer step), not the one the next
  forward convolves with. The reference is a dense float64 FFT of the weight computed here from the hook's
  parameters: ``power_m(w) = sum_c |K_hat_{m,c}(w)|^2`` on the grid, gains ``sqrt(min)``, ``sqrt(max)``,
  ``V = (power + eps)^(-1/2)``.
* NOG and OLR (``pre_svd``) stepped a sparse gradient unchanged, silently (the Change said "NOG + OLR"); a leaf
  ``nn.Linear`` subclass whose forward calls ``F.embedding(..., sparse=True)`` makes one. They now refuse it as the
  Riemannian hooks do, naming the site and the fix.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from torch import nn

import orthofx
import orthofx.passes.pre_svd  # noqa: F401  (registers the pass)
from orthofx.nn.convnorm import ConvNormConv2d, update_running_filters

EPS = 1e-5


def _dense_power(weight: torch.Tensor, grid) -> torch.Tensor:
    """``sum_c |FFT_grid(K_{m,c})|^2``, ``(M, *grid)``, float64: the kernel zero-padded onto the full grid."""
    w = weight.detach().to(torch.float64)
    padded = w.new_zeros(w.shape[:2] + tuple(grid))
    padded[(slice(None), slice(None)) + tuple(slice(0, k) for k in w.shape[2:])] = w
    return torch.fft.fftn(padded, dim=(-2, -1)).abs().square().sum(1)


def _reference_gains(weight: torch.Tensor, grid) -> tuple[float, float]:
    power = _dense_power(weight, grid)
    return float(power.min().sqrt()), float(power.max().sqrt())


def _reference_filter(weight: torch.Tensor, grid) -> torch.Tensor:
    """``V`` on the rfft half grid (the last axis ``L // 2 + 1`` frequencies)."""
    power = _dense_power(weight, grid)[..., : grid[-1] // 2 + 1]
    return (power + EPS).rsqrt()


def _weight_norm_conv(kernel: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the old-style weight_norm is deprecated (its pre-hook is the point here)
        conv = torch.nn.utils.weight_norm(nn.Conv2d(3, 4, kernel, padding=kernel // 2, dtype=torch.float64))

    def weight_now():
        v = conv.weight_v.detach()
        return conv.weight_g.detach() * v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return conv, weight_now


def _pruned_conv(kernel: int):
    conv = nn.Conv2d(3, 4, kernel, padding=kernel // 2, dtype=torch.float64)
    prune.random_unstructured(conv, "weight", amount=0.4)
    return conv, lambda: conv.weight_orig.detach() * conv.weight_mask


def _user_hook_conv(kernel: int):
    """A conv whose weight a pre-hook assigns, ``base * scale`` (a plain tensor attribute, not a parameter)."""
    conv = nn.Conv2d(3, 4, kernel, padding=kernel // 2, dtype=torch.float64)
    base = conv.weight.detach().clone()
    del conv._parameters["weight"]
    conv.scale = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
    conv.weight = base * conv.scale

    def hook(module, args):
        module.weight = base * module.scale
    conv.register_forward_pre_hook(hook)
    return conv, lambda: base * conv.scale.detach()


HOOKED = {"weight_norm": _weight_norm_conv, "prune": _pruned_conv, "user_hook": _user_hook_conv}


def _trained_one_step(make, kernel: int, momentum=None):
    """A ConvNorm around a hooked conv after one forward and one SGD step: ``conv.weight`` is still the forward's."""
    torch.manual_seed(0)
    conv, weight_now = make(kernel)
    layer = ConvNormConv2d(conv, eps=EPS, momentum=momentum)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(torch.randn(2, 3, 8, 8, dtype=torch.float64)).square().sum().backward()
    optimizer.step()
    with torch.no_grad():  # a visible change of the gains whatever the gradient was
        for p in layer.parameters():
            p.mul_(1.7)
    stale = conv.weight.detach().clone()
    assert (weight_now() - stale).abs().max() > 1e-3  # the premise: the attribute is stale
    return layer, conv, weight_now


@pytest.mark.parametrize("kernel", [3, 1], ids=["3x3", "one-tap"])
@pytest.mark.parametrize("kind", list(HOOKED))
def test_gain_range_describes_the_weight_the_conv_pre_hooks_compute_now(kind, kernel):
    layer, conv, weight_now = _trained_one_step(HOOKED[kind], kernel)
    geo, low, high = layer.gain_range((8, 8))
    ref_low, ref_high = _reference_gains(weight_now(), geo.grid)
    assert low == pytest.approx(ref_low, rel=1e-10, abs=1e-12)
    assert high == pytest.approx(ref_high, rel=1e-10)
    # and the eval forward (which runs the hooks itself) is ConvNorm of that weight
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    layer.eval()
    with torch.no_grad():
        y = layer(x)
    plain = nn.Conv2d(3, 4, kernel, padding=kernel // 2, dtype=torch.float64)
    with torch.no_grad():
        plain.weight.copy_(weight_now())
        plain.bias.copy_(conv.bias)
    with torch.no_grad():
        expected = ConvNormConv2d(plain, eps=EPS).eval()(x)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", list(HOOKED))
def test_filter_is_v_of_the_weight_the_conv_pre_hooks_compute_now(kind):
    layer, conv, weight_now = _trained_one_step(HOOKED[kind], 3)
    v = layer.filter((8, 8))
    torch.testing.assert_close(v, _reference_filter(weight_now(), layer.geometry((8, 8)).grid), rtol=1e-10,
                               atol=0.0)


@pytest.mark.parametrize("kind", list(HOOKED))
def test_update_running_filters_uses_the_weight_the_conv_pre_hooks_compute_now(kind):
    layer, conv, weight_now = _trained_one_step(HOOKED[kind], 3, momentum=0.1)
    (grid,) = layer.running_grids
    assert update_running_filters(layer) == 1
    torch.testing.assert_close(layer.running_filter(grid), _reference_filter(weight_now(), grid), rtol=1e-10,
                               atol=0.0)


def test_gain_range_of_an_old_style_spectral_norm_conv_takes_no_power_iteration_step():
    """The hooks run as in eval: ``W / sigma`` with ``sigma = u^T W v`` from the current vectors, left unchanged."""
    torch.manual_seed(0)
    conv = torch.nn.utils.spectral_norm(nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64))
    layer = ConvNormConv2d(conv, eps=EPS)
    layer(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    with torch.no_grad():
        conv.weight_orig.mul_(2.0).add_(0.1)
    u, v = conv.weight_u.clone(), conv.weight_v.clone()
    geo, low, high = layer.gain_range((8, 8))
    assert torch.equal(conv.weight_u, u) and torch.equal(conv.weight_v, v)
    w = conv.weight_orig.detach()
    sigma = u @ (w.flatten(1) @ v)
    ref_low, ref_high = _reference_gains(w / sigma, geo.grid)
    assert (low, high) == pytest.approx((ref_low, ref_high), rel=1e-10)
    assert layer.training and conv.training  # the conv's mode is put back


# ------------------------------------------------------------------------------------- NOG / OLR: sparse grads

class SparseLookup(nn.Linear):
    """``one_hot(idx) @ W`` as a lookup of ``W``'s rows (``out_features`` tokens of ``in_features`` values), whose
    weight gradient is sparse."""

    def forward(self, idx):
        return F.embedding(idx, self.weight, sparse=True)


class LookupCovariance(nn.Module):
    def __init__(self):
        super().__init__()
        self.lookup = SparseLookup(4, 10)

    def forward(self, idx):
        f = self.lookup(idx)
        centred = f - f.mean(0)
        L, V = torch.linalg.eigh(centred.T @ centred / f.shape[0] + 1e-2 * torch.eye(4))
        return L.log().sum() + V[0].sum()


@pytest.mark.parametrize("nog,olr,what", [(True, False, "NOG"), (False, True, "OLR"), (True, True, "NOG")])
def test_nog_and_olr_refuse_a_sparse_gradient_naming_the_site_and_the_fix(nog, olr, what):
    torch.manual_seed(0)
    idx = torch.randint(0, 10, (32,))
    policy = {"capture": {"leaf_modules": ["SparseLookup"]},
              "rules": [{"name": "presvd", "match": {"feeds": "linalg.eigh"}, "apply": "pre_svd",
                         "with": {"nog": nog, "olr": olr}}]}
    gm = orthofx.transform(LookupCovariance(), policy, example_inputs=(idx,))
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    orthofx.attach(optimizer, gm)
    gm(idx).backward()
    weight = gm.get_submodule("lookup").weight
    assert weight.grad.is_sparse  # the premise: the sparse gradient reaches the hooks
    before = weight.detach().clone()
    flag = what.lower()
    with pytest.raises(orthofx.OrthofxError, match=rf"pre_svd \(lookup, rule 'presvd'\): {what}: the weight has a "
                                                   rf"sparse gradient.*dense.*sparse=False.*'{flag}: false'"):
        optimizer.step()
    assert torch.equal(weight.detach(), before)  # refused before the optimizer stepped it
    assert all(group["lr"] == 0.1 and "orthofx_olr_base_lr" not in group for group in optimizer.param_groups)
