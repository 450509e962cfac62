"""``isometric_init`` warns when a delta-orthogonal conv narrows its outputs before a decomposition.

A conv with more outputs than the inputs its taps read (``M/g > C/g * prod(count)``, e.g. 1 -> 16 channels at
stride 1) gets an exact isometry whose only taps are those (P0 Proposition 6 under zero padding), so every output
position lies in a ``C/g * prod(count)``-dimensional subspace of its channels. A decomposition downstream then has
tied eigenvalues, where torch's ``eigh`` backward divides by their gaps: NaN gradients (the built-in ``dbn_cnn``,
``tests/test_fuzz_regressions_s32.py``). The rank is measured here on the layer's outputs in float64.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import OrthofxWarning


class ConvThenEigh(nn.Module):
    """A conv whose channel covariance goes to ``torch.linalg.eigh`` (a whitening layer's core)."""

    def __init__(self, c_in: int, c_out: int, k: int, decompose: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False)
        self.decompose = decompose

    def forward(self, x):
        y = self.conv(x)
        if not self.decompose:
            return y.mean()
        f = y.transpose(0, 1).flatten(1)
        cov = f @ f.T / f.shape[1] + 1e-3 * torch.eye(f.shape[0])
        values, vectors = torch.linalg.eigh(cov)
        whitened = (vectors * values.rsqrt()) @ vectors.T @ f  # ZCA whitening: the eigenvectors carry gradients
        return whitened[0].square().mean()


def _warnings(model, policy, x) -> tuple[list[str], nn.Module]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = orthofx.transform(model, policy, example_inputs=(x,))
    return [str(w.message) for w in caught if issubclass(w.category, OrthofxWarning)], gm


_ISOMETRIC_CONVS = {"rules": [{"match": {"type": "Conv2d"}, "apply": "isometric_init"}]}


def test_an_expanding_conv_feeding_eigh_warns_with_its_rank_and_the_fix():
    torch.manual_seed(0)
    x = torch.randn(4, 2, 8, 8)
    messages, gm = _warnings(ConvThenEigh(2, 12, 3), _ISOMETRIC_CONVS, x)
    narrowing = [m for m in messages if "delta-orthogonal kernel puts every output" in m]
    assert len(narrowing) == 1, messages
    # the rank the message states, measured: the channel covariance of the initialised conv's outputs (float64)
    y = nn.functional.conv2d(x.double(), gm.conv.weight.detach().double(), padding=1)
    rank = int(torch.linalg.matrix_rank(y.transpose(0, 1).flatten(1)))
    assert rank == 2
    assert "2-dimensional subspace of its 12 channels (a kernel of its shape reaches 12)" in narrowing[0]
    assert "'conv'" in narrowing[0] and "linalg.eigh" in narrowing[0] and "apply: svd_conditioning" in narrowing[0]
    changes = [c for c in orthofx.manifest_of(gm).changes if c.site == "conv"]
    assert "feeds" in changes[0].what and "2-dimensional" in changes[0].what


@pytest.mark.parametrize("c_in, c_out, k, decompose", [(12, 12, 3, True),   # square: a full-rank centre tap
                                                       (2, 12, 3, False),   # no decomposition downstream
                                                       (2, 12, 1, True)])   # a 1x1 kernel reaches 2 anyway
def test_no_warning_where_nothing_narrows_or_nothing_decomposes(c_in, c_out, k, decompose):
    torch.manual_seed(1)
    messages, _ = _warnings(ConvThenEigh(c_in, c_out, k, decompose), _ISOMETRIC_CONVS, torch.randn(4, c_in, 8, 8))
    assert not [m for m in messages if "delta-orthogonal kernel puts every output" in m], messages


def test_no_warning_once_the_decomposition_is_stable():
    torch.manual_seed(2)
    stable = {"match": {"op": ["linalg.eigh"]}, "apply": "svd_conditioning"}
    policy = {"rules": _ISOMETRIC_CONVS["rules"] + [stable]}
    x = torch.randn(4, 2, 8, 8)
    messages, gm = _warnings(ConvThenEigh(2, 12, 3), policy, x)
    assert not [m for m in messages if "delta-orthogonal kernel puts every output" in m], messages
    # and the stable decomposition takes the ties: finite gradients (torch's own eigh gave NaN on dbn_cnn for some
    # inputs: tests/test_fuzz_regressions_s32.py)
    gm.train()(x).backward()
    assert torch.isfinite(gm.conv.weight.grad).all()
