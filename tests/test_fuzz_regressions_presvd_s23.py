"""Regressions found by an independent float64 review of the Pre-SVD passes (P4's NOG / OLR; each failed before
its fix).

* NOG took one polar factor of a grouped conv's whole ``out x rest`` gradient: the groups' rows were mixed, so a
  group's step depended on the other groups' gradients (a depthwise conv's steps were not unit vectors). L_orth,
  SRIP, the hard orthogonal conv and the Riemannian pass all treat a grouped conv per group; NOG now does too.
  The Change's ``before["orthogonality_error"]`` measured the stacked blocks as well.
* NOG / OLR on a layer whose weight is a buffer: the transform recorded "NOG + OLR", and ``attach`` then skipped
  both hooks as if the weight were frozen (no optimizer holds a buffer), silently. Planning now refuses the site.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import orthofx
import orthofx.passes.pre_svd  # noqa: F401  (registers the pass)


def _polar(matrix: np.ndarray) -> np.ndarray:
    """``U V^T`` of ``matrix`` (numpy float64 SVD): the reference, independent of orthofx's polar_factor."""
    U, _, Vh = np.linalg.svd(matrix, full_matrices=False)
    return U @ Vh


class ConvCovariance(nn.Module):
    """``layer`` -> channel covariance + eps I -> eigh: ``layer`` is the Pre-SVD layer."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        f = self.layer(x)
        flat = f.transpose(0, 1).flatten(1)
        centred = flat - flat.mean(1, keepdim=True)
        cov = centred @ centred.T / flat.shape[1] + 1e-2 * torch.eye(flat.shape[0])
        L, V = torch.linalg.eigh(cov)
        return (L.log() * torch.linspace(-1.0, 1.0, L.shape[0])).sum() + V[0].sum()


def _policy(**params):
    return {"rules": [{"match": {"feeds": "linalg.eigh"}, "apply": "pre_svd", "with": params}]}


@pytest.mark.parametrize("conv", [nn.Conv2d(4, 6, 3, groups=2), nn.Conv2d(6, 6, 3, groups=6),
                                  nn.Conv1d(4, 8, 3, groups=2)], ids=["grouped", "depthwise", "conv1d"])
def test_nog_on_a_grouped_conv_steps_by_the_polar_factor_of_each_group(conv):
    torch.manual_seed(0)
    x = torch.randn((4, conv.in_channels) + (6,) * (conv.weight.dim() - 2))
    gm = orthofx.transform(ConvCovariance(conv), _policy(nog=True, olr=False), example_inputs=(x,))
    weight = gm.get_submodule("layer").weight
    groups = conv.groups

    # the Change's orthogonality error: the block-diagonal Gram - I, per group (smaller Gram), Frobenius norm
    (change,) = [c for c in orthofx.manifest_of(gm).changes if c.pass_name == "pre_svd"]
    blocks = np.split(weight.detach().double().numpy().reshape(weight.shape[0], -1), groups, axis=0)
    squares = 0.0
    for W in blocks:
        gram = W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W
        squares += float(((gram - np.eye(gram.shape[0])) ** 2).sum())
    assert change.before["orthogonality_error"] == pytest.approx(squares ** 0.5, rel=1e-12)

    optimizer = torch.optim.SGD(gm.parameters(), lr=1.0)
    orthofx.attach(optimizer, gm)
    optimizer.zero_grad()
    gm(x).backward()
    grad = weight.grad.detach().double().numpy().reshape(weight.shape[0], -1)
    before = weight.detach().double().numpy().reshape(weight.shape[0], -1)
    optimizer.step()
    expected = np.concatenate([_polar(block) for block in np.split(grad, groups, axis=0)], axis=0)
    step = before - weight.detach().double().numpy().reshape(weight.shape[0], -1)
    np.testing.assert_allclose(step, expected, rtol=0, atol=2e-6)
    # each group's block has orthonormal rows or columns (a depthwise channel's step is a unit vector)
    for block in np.split(step, groups, axis=0):
        gram = block @ block.T if block.shape[0] <= block.shape[1] else block.T @ block
        np.testing.assert_allclose(gram, np.eye(gram.shape[0]), rtol=0, atol=1e-5)


class BufferWeight(nn.Module):
    """A linear whose weight is a buffer (no optimizer steps it), feeding an eigh."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(6, 4)
        weight = self.layer.weight.detach().clone()
        del self.layer.weight
        self.layer.register_buffer("weight", weight)

    def forward(self, x):
        f = self.layer(x)
        cov = f.T @ f / f.shape[0] + 1e-2 * torch.eye(4)
        return torch.linalg.eigvalsh(cov).log().sum()


@pytest.mark.parametrize("params", [{"nog": True, "olr": False}, {"nog": False, "olr": True}])
def test_nog_and_olr_refuse_a_layer_whose_weight_is_a_buffer(params):
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    policy = {"rules": [{"match": {"feeds": "linalg.eigvalsh"}, "apply": "pre_svd", "with": params}]}
    with pytest.raises(orthofx.OrthofxError, match=r"layer: its weight is a Tensor that is not an nn.Parameter .*"
                                                   r"NOG / OLR optimizer hooks would never run.*'nog: false'"):
        orthofx.transform(BufferWeight(), policy, example_inputs=(x,))
    # an optional rule skips the layer: no hook recorded, no Change claiming NOG / OLR
    policy["rules"][0]["optional"] = True
    gm = orthofx.transform(BufferWeight(), policy, example_inputs=(x,))
    assert orthofx.manifest_of(gm).optimizer_hooks == []
    assert not [c for c in orthofx.manifest_of(gm).changes if c.pass_name == "pre_svd"]
