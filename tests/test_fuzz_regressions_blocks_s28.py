"""Session 28 fuzz regressions for orthofx/nn/padding.py (and checks of orthofx/nn/isometric.py's claims).

References are independent of the code under test: a slow index loop for the periodic extension and its adjoint
(entry ``j`` of a padded dimension is entry ``(j - l) mod n`` of the input), finite differences
(``gradcheck``), and dense float64 Jacobians from ``torch.autograd.functional.jacobian``.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from orthofx.errors import LayerArgumentError
from orthofx.nn.isometric import OrthogonalActivationBlock, ReflectionResidualBlock
from orthofx.nn.padding import CircularFold, CircularPad, circular_fold, circular_pad, conv_zero_pads, periodic_pad


def _loop_pad(x: torch.Tensor, pads) -> torch.Tensor:
    """The periodic extension by a loop over the padded trailing positions."""
    d = len(pads)
    sizes = x.shape[x.dim() - d:]
    out = torch.empty(*x.shape[:x.dim() - d], *(n + l + r for n, (l, r) in zip(sizes, pads)), dtype=x.dtype)
    for idx in itertools.product(*(range(s) for s in out.shape[out.dim() - d:])):
        out[(...,) + idx] = x[(...,) + tuple((j - l) % n for j, (l, _), n in zip(idx, pads, sizes))]
    return out


def _loop_fold(y: torch.Tensor, pads) -> torch.Tensor:
    """The adjoint of :func:`_loop_pad`: entry ``j`` added onto ``(j - l) mod n``."""
    d = len(pads)
    sizes = [s - l - r for s, (l, r) in zip(y.shape[y.dim() - d:], pads)]
    out = torch.zeros(*y.shape[:y.dim() - d], *sizes, dtype=y.dtype)
    for idx in itertools.product(*(range(s) for s in y.shape[y.dim() - d:])):
        out[(...,) + tuple((j - l) % n for j, (l, _), n in zip(idx, pads, sizes))] += y[(...,) + idx]
    return out


# shapes F.pad's circular mode refuses (it needs 1 or 2 leading dimensions and 1 to 3 padded ones): circular_pad
# raised NotImplementedError there for pads within the size, and worked only for pads larger than it
_ODD_SHAPES = [((5,), [(1, 2)]), ((4, 3), [(1, 1), (2, 0)]), ((2, 4, 3), [(0, 2), (1, 1), (2, 1)]),
               ((2, 1, 2, 5), [(2, 2)]), ((1, 2, 2, 3, 2), [(1, 0), (1, 1), (0, 2), (1, 1)])]


@pytest.mark.parametrize("shape, pads", _ODD_SHAPES)
def test_circular_pad_without_or_with_many_leading_dimensions_matches_the_loop(shape, pads):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = circular_pad(x, pads)
    torch.testing.assert_close(y, _loop_pad(x.detach(), pads), atol=0, rtol=0)
    g = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(grad, _loop_fold(g, pads), atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda t: circular_pad(t, pads), (x,), check_forward_ad=True)
    # CircularPad, the module the frozen orthogonal convs use, on an unbatched input
    torch.testing.assert_close(CircularPad(pads)(x.detach()), _loop_pad(x.detach(), pads), atol=0, rtol=0)


@pytest.mark.parametrize("shape, pads", _ODD_SHAPES)
def test_circular_fold_backward_on_shapes_f_pad_refuses(shape, pads):
    """circular_fold took its slices route there, whose backward (F.pad's circular mode) raised
    NotImplementedError; it is the adjoint of the padding in float64: <pad(x), y> = <x, fold(y)>."""
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=torch.float64)
    y = _loop_pad(torch.randn(shape, dtype=torch.float64), pads).requires_grad_()
    folded = circular_fold(y, pads)
    torch.testing.assert_close(folded, _loop_fold(y.detach(), pads), atol=1e-12, rtol=0)
    torch.testing.assert_close((_loop_pad(x, pads) * y.detach()).sum(), (x * folded.detach()).sum(),
                               atol=1e-12, rtol=0)
    (grad,) = torch.autograd.grad(folded, y, x)
    torch.testing.assert_close(grad, _loop_pad(x, pads), atol=0, rtol=0)
    assert torch.autograd.gradgradcheck(lambda t: circular_fold(t, pads), (y,))


def test_circular_pad_with_no_or_zero_pads_is_the_input():
    x = torch.randn(2, 3, 4)
    assert torch.equal(circular_pad(x, []), x)  # F.pad: "Padding size 0 is not supported"
    v = torch.randn(4)
    assert torch.equal(circular_pad(v, [(0, 0)]), v)


@pytest.mark.parametrize("call", [
    lambda: circular_pad(torch.randn(1, 2, 4), [(1.5, 1)]),      # was int(1.5) = 1: a padding of 1, silently
    lambda: circular_pad(torch.randn(1, 2, 4), [(True, 1)]),
    lambda: CircularPad([(2.7, 0)]),
    lambda: CircularFold([(0.5, 0)]),
    lambda: circular_fold(torch.randn(1, 2, 4), [(1.0, 0)]),
    lambda: periodic_pad(torch.randn(1, 2, 4), [(1, 2.5)]),
], ids=["pad-float", "pad-bool", "module-float", "fold-module-float", "fold-float", "periodic-float"])
def test_non_integer_pads_are_refused(call):
    with pytest.raises(LayerArgumentError, match="pads must be integers"):
        call()


@pytest.mark.parametrize("name, call", [
    ("circular_pad", lambda: circular_pad(torch.randn(1, 2, 4), [1, 1])),   # a raw TypeError before
    ("CircularPad", lambda: CircularPad([1, 1])),
    ("CircularPad", lambda: CircularPad([(1, 1, 1)])),                      # a raw ValueError before
    ("CircularFold", lambda: CircularFold([2, 0])),
    ("circular_fold", lambda: circular_fold(torch.randn(1, 2, 4), [1, 0])),
])
def test_pads_not_given_as_pairs_are_refused(name, call):
    with pytest.raises(LayerArgumentError, match=rf"^{name}: pads must be one \(left, right\) pair per trailing"):
        call()


def test_negative_and_too_many_pads_are_orthofx_errors():
    x = torch.arange(5.0).reshape(1, 1, 5)
    # F.pad crops and then wraps the cropped signal ([1, 2, 3, 4, 1, 2] here), not the periodic extension
    with pytest.raises(LayerArgumentError, match=r"circular_pad: pads must be >= 0, got \(\(-1, 2\),\)"):
        circular_pad(x, [(-1, 2)])
    with pytest.raises(LayerArgumentError, match=r"CircularPad: pads must be >= 0"):
        CircularPad([(0, -1)])
    with pytest.raises(LayerArgumentError, match=r"circular_pad: 2 pairs of pads for an input of shape \(4,\)"):
        circular_pad(torch.randn(4), [(1, 1), (1, 1)])   # a RuntimeError from F.pad before
    with pytest.raises(LayerArgumentError, match=r"periodic_pad: 2 pairs of pads for an input of shape \(4,\)"):
        periodic_pad(torch.randn(4), [(1, 1), (1, 1)])
    # integer types torch takes still work: numpy's and 0-d integer tensors
    np = pytest.importorskip("numpy")
    torch.testing.assert_close(circular_pad(x, [(np.int64(1), torch.tensor(2))]), _loop_pad(x, [(1, 2)]))


def test_conv_zero_pads_same_takes_an_int_stride():
    assert conv_zero_pads("same", (4, 3), (1, 2), 1) == ((1, 2), (2, 2))   # TypeError: 'int' is not iterable
    with pytest.raises(LayerArgumentError, match=r"padding='same' needs stride 1 .* got stride=\(2, 2\)"):
        conv_zero_pads("same", (3, 3), (1, 1), 2)


@pytest.mark.parametrize("features, hidden", [(1, 1), (5, 5), (7, 3)])
def test_blocks_jacobians_stay_orthogonal_after_training_steps(features, hidden):
    """Not a fix: the P2 claims after SGD steps (the parametrisation, not the initialisation, keeps them)."""
    torch.manual_seed(features)
    a = OrthogonalActivationBlock(features, dtype=torch.float64)
    r = ReflectionResidualBlock(features, hidden, dtype=torch.float64)
    opt = torch.optim.SGD([*a.parameters(), *r.parameters()], lr=0.5)
    eye = torch.eye(features, dtype=torch.float64)
    for _ in range(3):
        x = torch.randn(4, features, dtype=torch.float64)
        opt.zero_grad()
        ((a(x) ** 2).sum() + (r(x) ** 3).sum()).backward()
        opt.step()
        v = torch.randn(features, dtype=torch.float64)
        ja = torch.autograd.functional.jacobian(a, v)
        jr = torch.autograd.functional.jacobian(r, v)
        torch.testing.assert_close(ja.T @ ja, eye, atol=1e-12, rtol=0)
        torch.testing.assert_close(jr, jr.T, atol=1e-12, rtol=0)
        torch.testing.assert_close(jr @ jr, eye, atol=1e-12, rtol=0)
