"""Session 37 review of ``riemannian``, ``isometric_init`` and the isometric blocks (helper 'riemann').

Found and fixed:

* ``isometric_init``'s Change named ``Q``'s orthonormal side as the Jacobian's, also for an ``exact`` conv whose
  square ``Q`` reads part of each block of ``S`` inputs (``k < S``, a dilated strided conv) or a transposed conv that
  crops: those are co-isometries (``J J^T = s^2 I``, ``J`` wide), and the Change said ``orthonormal columns`` (an
  isometry). Checked against the dense float64 Jacobian.
* Under circular padding at stride 1 a delta kernel's one tap reads a cyclic shift of the input (a permutation)
  wherever it lies; the centre tap of an even dilated kernel under ``padding='same'`` reads outside the block of
  zero padding, and the Change said ``exact: false`` for a layer that is exactly orthogonal.
* A ``riemannian`` rule whose ``free`` leaves every site it kept free (its only site, or sites all tied to the
  free one) constrained nothing and said nothing: it now warns (``OrthofxWarning``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import jacrev

import orthofx
from orthofx.passes.base import Change


def _init(layer: nn.Module, gain: float = 1.5) -> tuple[nn.Module, Change]:
    """``layer`` (float64) after an ``isometric_init`` rule with ``gain``, and its Change."""
    rule = {"match": {"type": type(layer).__name__}, "apply": "isometric_init", "with": {"gain": gain, "seed": 0}}
    gm = orthofx.transform(nn.Sequential(layer.double()), {"rules": [rule]})
    return gm.get_submodule("0"), orthofx.manifest_of(gm).changes[0]


def _dense_jacobian(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's Jacobian at ``x`` as an (outputs x inputs) float64 matrix (the layer is linear: bias zeroed)."""
    return jacrev(layer)(x).reshape(layer(x).numel(), x.numel())


def _sides(jac: torch.Tensor, scale: float) -> tuple[bool, bool]:
    """Whether ``jac`` is ``scale`` times an isometry (``J^T J``) and whether a co-isometry (``J J^T``)."""
    def gram_is_scaled_identity(gram):
        return bool(torch.allclose(gram, scale ** 2 * torch.eye(len(gram), dtype=gram.dtype), rtol=0, atol=1e-10))
    rows, columns = jac.shape
    return (rows >= columns and gram_is_scaled_identity(jac.T @ jac),
            rows <= columns and gram_is_scaled_identity(jac @ jac.T))


@pytest.mark.parametrize("layer, size", [
    (lambda: nn.Conv2d(2, 2, 1, stride=2), 6),                                 # k < S: one input in four
    (lambda: nn.Conv1d(2, 2, 4, stride=2, padding=3, dilation=2, groups=2), 8),  # dilation: part of each block
    (lambda: nn.Conv2d(1, 4, 2, stride=3), 6),                                 # 2 x 2 taps of each 3 x 3 block
    (lambda: nn.ConvTranspose1d(2, 1, 5, stride=2, padding=2), 4),             # crops its output (7 of 8)
    (lambda: nn.ConvTranspose2d(1, 1, 4, stride=1, padding=2), 5),             # crops its output (4 x 4 of 5 x 5)
], ids=["conv-k1-s2", "conv1d-dilated-strided", "conv-k2-s3", "transposed-crop-1d", "transposed-crop-2d"])
def test_an_exact_conv_with_a_square_q_that_is_a_co_isometry_says_rows(layer, size):
    """These layers are exact (all singular values equal to the scale) with a square ``Q`` per group, and their
    dense float64 Jacobian is a co-isometry only (wide, ``J J^T = s^2 I``): the Change names rows, the side the
    Jacobian has (the old code named ``Q``'s, 'columns' for a square one, i.e. an isometry)."""
    conv, change = _init(layer())
    assert change.after["exact"] is True
    d = len(conv.kernel_size)
    x = torch.randn(1, conv.in_channels, *([size] * d), dtype=torch.float64)
    isometry, coisometry = _sides(_dense_jacobian(conv, x), 1.5)
    assert coisometry and not isometry
    assert "(orthonormal rows, scale 1.5)" in change.what


@pytest.mark.parametrize("layer, size", [
    (lambda: nn.Conv1d(2, 3, 4, padding="same", dilation=2, padding_mode="circular"), 7),
    (lambda: nn.Conv2d(2, 2, 2, padding="same", dilation=3, padding_mode="circular"), 5),
    (lambda: nn.Conv1d(3, 2, 4, padding="same", dilation=2, padding_mode="circular"), 6),
], ids=["tall", "square-2d", "wide"])
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's, about a padded copy
def test_a_circular_conv_whose_one_tap_reads_a_shifted_input_is_exact(layer, size):
    """Stride 1, circular padding, an even dilated kernel under ``'same'``: the centre tap reads a cyclic shift of
    the input, a permutation, so the dense Jacobian is ``Q`` (x) a permutation and has all singular values equal
    to the scale (on every size). The old code said ``exact: false``. The same layer with zero padding reads padded
    zeros at the border: not exact, and the Change still says so."""
    conv, change = _init(layer())
    x = torch.randn(1, conv.in_channels, *([size] * len(conv.kernel_size)), dtype=torch.float64)
    isometry, coisometry = _sides(_dense_jacobian(conv, x), 1.5)
    assert change.after["exact"] is True
    side = "rows" if conv.out_channels < conv.in_channels else "columns"
    assert (isometry, coisometry) == (side == "columns", conv.out_channels <= conv.in_channels)
    assert f"(orthonormal {side}, scale 1.5)" in change.what

    zero_padded = layer()
    zero_padded.padding_mode = "zeros"
    conv, change = _init(zero_padded)
    assert change.after["exact"] is False
    assert _sides(_dense_jacobian(conv, x), 1.5) == (False, False)


def _riemannian(free: str, **match) -> dict:
    return {"rules": [{"match": match, "apply": "riemannian", "with": {"free": free}}]}


@pytest.mark.parametrize("free", ["first", "last"])
def test_a_free_rule_that_constrains_nothing_warns(free):
    """``free`` on a rule whose only site is the free one (or whose other sites share its weight) leaves every
    weight of the rule free: the rule trains nothing on the Stiefel manifold. It warns, naming the rule, the free
    site and the fix; a rule with a site to constrain does not."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.warns(orthofx.OrthofxWarning, match=r"free: \w+ leaves '0', its only site.*constrains nothing"):
        gm = orthofx.transform(model, _riemannian(free, name="0"))
    assert not orthofx.manifest_of(gm).optimizer_hooks

    tied = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    tied[2].weight = tied[0].weight
    with pytest.warns(orthofx.OrthofxWarning, match=r"sharing its weight \('[02]'\).*constrains nothing"):
        orthofx.transform(tied, _riemannian(free, type="Linear"))

    with warnings.catch_warnings():
        warnings.simplefilter("error", orthofx.OrthofxWarning)
        gm = orthofx.transform(model, _riemannian(free, type="Linear"))
    assert len(orthofx.manifest_of(gm).optimizer_hooks) == 1


def test_init_helpers_refuse_non_integer_taps_and_a_non_generator_with_an_orthofx_error():
    """``delta_orthogonal_`` with taps that are not integer pairs failed inside the slicing (TypeError: slice
    indices must be integers), and both helpers with a generator that is not a ``torch.Generator`` inside the draw
    (AttributeError: 'int' object has no attribute 'device'). Both are ``ArgumentError``s naming the argument; the
    weight is left as it was."""
    from orthofx.errors import ArgumentError
    from orthofx.passes.isometric_init import delta_orthogonal_, orthogonal_

    weight = torch.ones(4, 2, 3)
    for taps in ([(1.5, 1)], [1], 3, [(0, 1, 2)]):
        with pytest.raises(ArgumentError, match=r"delta_orthogonal_: taps=.* inside the kernel \(3,\) .* as integers"):
            delta_orthogonal_(weight, taps=taps)
    with pytest.raises(ArgumentError, match="delta_orthogonal_: generator must be a torch.Generator or None, got int"):
        delta_orthogonal_(weight, generator=3)
    with pytest.raises(ArgumentError, match="orthogonal_: generator must be a torch.Generator or None, got int"):
        orthogonal_(torch.ones(4, 3), generator=3)
    assert bool((weight == 1).all())
    # integer taps of any integer type still work, and give the block the default taps give
    a = delta_orthogonal_(torch.empty(4, 2, 3), generator=torch.Generator().manual_seed(0), taps=[(1, 1)])
    b = delta_orthogonal_(torch.empty(4, 2, 3), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
