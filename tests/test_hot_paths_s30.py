"""Per-call work taken off four hot paths, with the same results (session 30):

* ``CircularPad`` / ``CircularFold`` check their pads once, when set, not at every forward;
* the ``riemannian`` hooks' after-step learns "did every matrix move?" from the host read the retraction makes
  anyway, and compares weights with their retractions only when one did not move;
* ``metrics.lorth``'s border-tap trim reads the weight on the host once for all its dimensions (was: a ``nonzero``
  and a ``tolist`` per dimension, each a synchronisation on a GPU);
* ``ConditionMonitor(history_size=...)`` is checked by the project's integer check (``theory._positive_int``).

The old formulas are written here, as references the new code must match bit for bit.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import nn

import orthofx
import orthofx.passes.riemannian  # noqa: F401  (registers the pass)
from orthofx import metrics
from orthofx.errors import LayerArgumentError
from orthofx.nn import padding, stiefel
from orthofx.nn.conditioning import DecompositionMonitor
from orthofx.nn.decompositions import ConditionMonitor
from orthofx.nn.padding import CircularFold, CircularPad, circular_fold, circular_pad
from references import OpCount, circular_pad_loop, lorth64, polar64, tangent64

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ padding modules

def _loop_fold(x: torch.Tensor, pads) -> torch.Tensor:
    """Adjoint of :func:`circular_pad_loop`: entry ``j`` of a dimension of size ``n + l + r`` added onto ``(j - l) % n``."""
    d = len(pads)
    for i, (l, r) in enumerate(pads):
        dim = x.dim() - d + i
        n = x.shape[dim] - l - r
        out = torch.zeros(*x.shape[:dim], n, *x.shape[dim + 1:], dtype=x.dtype)
        for j in range(x.shape[dim]):
            out.select(dim, (j - l) % n).add_(x.select(dim, j))
        x = out
    return x


PAD_CASES = [((2, 3, 7), [(1, 1)]), ((1, 2, 4, 5), [(1, 2), (0, 3)]), ((2, 1, 2, 2), [(3, 3), (0, 5)]),
             ((5,), [(2, 1)]), ((1, 1, 1, 3, 4, 2), [(1, 0), (2, 2), (0, 0)])]


@pytest.mark.parametrize("shape, pads", PAD_CASES)
def test_padding_modules_check_their_pads_once_not_at_every_forward(monkeypatch, shape, pads):
    """Before: every forward ran ``_pad_pairs`` again on the module's own, already checked, pads."""
    calls = []
    check = padding._pad_pairs
    monkeypatch.setattr(padding, "_pad_pairs", lambda *a, **k: calls.append(a[1]) or check(*a, **k))
    pad, fold = CircularPad(pads), CircularFold(pads)
    assert calls == ["CircularPad", "CircularFold"]
    x = torch.randn(*shape, dtype=torch.float64)
    for _ in range(3):
        y = pad(x)
        z = fold(y)
    assert calls == ["CircularPad", "CircularFold"]
    # the same values as the functions (which check their arguments) and as the loops, bit for bit
    assert torch.equal(y, circular_pad(x, pads)) and torch.equal(y, circular_pad_loop(x, pads))
    assert torch.equal(z, circular_fold(y, pads))
    torch.testing.assert_close(z, _loop_fold(y, pads), rtol=0, atol=1e-12)


def test_padding_modules_check_pads_assigned_later_when_assigned():
    """Before: ``layer.pads = ...`` was stored as given, and a bad value raised at the next forward (as
    ``circular_pad: ...``), a float was taken as it came."""
    pad, fold = CircularPad([(1, 1)]), CircularFold([(1, 1)])
    with pytest.raises(LayerArgumentError, match=r"^CircularPad: pads must be integers, got \[\(1\.5, 1\)\]$"):
        pad.pads = [(1.5, 1)]
    with pytest.raises(LayerArgumentError, match=r"^CircularFold: pads must be >= 0, got \(\(-1, 0\),\)"):
        fold.pads = [(-1, 0)]
    assert pad.pads == fold.pads == ((1, 1),)   # a refused value leaves the module as it was
    pad.pads = [(np.int64(2), torch.tensor(0))]
    assert pad.pads == ((2, 0),) and all(type(v) is int for pair in pad.pads for v in pair)
    x = torch.arange(3.0).reshape(1, 1, 3)
    assert torch.equal(pad(x), circular_pad_loop(x, [(2, 0)]))


@pytest.mark.parametrize("cls", [CircularPad, CircularFold])
def test_padding_module_errors_are_unchanged(cls):
    """The messages the old code gave, at construction (``_pad_pairs``) and at a forward (``circular_pad`` /
    ``circular_fold``'s checks that need the input)."""
    name = cls.__name__
    with pytest.raises(LayerArgumentError, match=rf"^{name}: pads must be one \(left, right\) pair per trailing "
                                                 r"dimension, e\.g\. \[\(1, 1\), \(2, 0\)\], got \[1, 1\]$"):
        cls([1, 1])
    with pytest.raises(LayerArgumentError, match=rf"^{name}: pads must be integers, got \[\(True, 1\)\]$"):
        cls([(True, 1)])
    with pytest.raises(LayerArgumentError, match=rf"^{name}: pads must be >= 0, got \(\(-1, 2\),\); crop with "
                                                 "slicing instead of a negative pad$"):
        cls([(-1, 2)])
    if cls is CircularPad:
        with pytest.raises(LayerArgumentError, match=r"^circular_pad: 2 pairs of pads for an input of shape \(4,\); "
                                                     r"pass at most one \(left, right\) pair per dimension$"):
            cls([(1, 1), (1, 1)])(torch.randn(4))
    else:
        with pytest.raises(LayerArgumentError, match=r"^circular_fold: dimension 1 has size 4, not more than its "
                                                     r"pads \(2, 2\): nothing to fold onto$"):
            cls([(2, 2)])(torch.zeros(1, 4))


def test_padding_modules_trace_copy_and_unpickle_their_old_form():
    model = nn.Sequential(CircularPad([(1, 2)]), CircularFold([(1, 1)], torch.randn(3)))
    x = torch.randn(2, 3, 5)
    expected = model(x)
    assert torch.equal(torch.fx.symbolic_trace(model)(x), expected)
    assert torch.equal(pickle.loads(pickle.dumps(model))(x), expected)
    # a module pickled when pads was a plain attribute (its __dict__ held "pads")
    state = dict(model[0].__dict__)
    state["pads"] = [list(p) for p in state.pop("_pads")]
    old = CircularPad.__new__(CircularPad)
    old.__setstate__(state)
    assert old.pads == ((1, 2),) and torch.equal(old(x), model[0](x))


# ------------------------------------------------------------------------------------------ riemannian step

def _old_unmoved(w0, w1, new, dtypes):
    """The old ``_on_manifold_unmoved``, written out (w1 == w0 compared here, at every step)."""
    factor = max(max(torch.finfo(w0.dtype).eps ** 0.5, 4 * torch.finfo(d).eps) for d in dtypes)
    tolerance = factor * w0.abs().flatten(-2).amax(-1)
    unmoved = (w1 == w0).flatten(-2).all(-1) & ((new - w0).abs().flatten(-2).amax(-1) <= tolerance)
    return unmoved[..., None, None]


def _three_linears(seed=0):
    torch.manual_seed(seed)
    gm = orthofx.transform(nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)),
                           {"rules": [{"match": {"type": "Linear"}, "apply": "riemannian"}]})
    return gm, [gm.get_submodule(str(i)).weight for i in range(3)]


@pytest.mark.parametrize("how", ["zero_grad", "frozen_group"])
def test_an_unmoved_weight_keeps_its_bits_and_the_moved_ones_are_retracted(how):
    """One batch of three 6 x 6 weights; the middle one is not moved by the step (a zero gradient and no
    momentum, or a param group with lr 0): it keeps its bits; the others are ``polar(W - lr xi)`` (float64)."""
    gm, weights = _three_linears()
    lr = 0.1
    if how == "zero_grad":
        optimizer = torch.optim.SGD(gm.parameters(), lr=lr)
    else:
        others = [p for p in gm.parameters() if p is not weights[1]]
        optimizer = torch.optim.SGD([{"params": others}, {"params": [weights[1]], "lr": 0.0}], lr=lr)
    orthofx.attach(optimizer, gm)
    grads = [torch.randn(6, 6) for _ in weights]
    if how == "zero_grad":
        grads[1].zero_()
    before = [w.detach().clone() for w in weights]
    for w, g in zip(weights, grads):
        w.grad = g.clone()
    with OpCount() as ops:
        optimizer.step()
    assert torch.equal(weights[1].detach(), before[1])
    for i in (0, 2):
        expected = polar64(before[i] - lr * tangent64(before[i], grads[i]))
        torch.testing.assert_close(weights[i].detach().double(), expected, rtol=0, atol=2e-6)
    assert ops.counts["where"] == 1   # an unmoved matrix in the batch: the comparison is made


@pytest.mark.parametrize("unmoved", [(), (1,), (0, 2), (0, 1, 2)])
def test_the_after_step_matches_the_old_formula_bit_for_bit(unmoved):
    """The batch's new weights against the old sequence (retract, then ``where(old unmoved, w0, new)`` at every
    step) computed here from the same inputs. Before, a step that moved every weight compared them all with their
    retractions too (``w1 == w0``, ``|new - w0|``, ``max |w0|``, ``torch.where``); now it compares nothing."""
    gm, weights = _three_linears(1)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.05, foreach=False)
    orthofx.attach(optimizer, gm)
    grads = [torch.zeros(6, 6) if i in unmoved else torch.randn(6, 6) for i in range(3)]
    w0 = torch.stack([w.detach().clone() for w in weights])
    for w, g in zip(weights, grads):
        w.grad = g.clone()
    with OpCount() as ops:
        optimizer.step()
    projected = stiefel.tangent_projection(w0, torch.stack(grads))
    w1 = torch.stack([w.add(g, alpha=-0.05) for w, g in zip(w0, projected)])   # SGD's update of the weights
    new = stiefel.retract(w0, stiefel.tangent_projection(w0, w1 - w0), "polar")
    expected = torch.where(_old_unmoved(w0, w1, new, [torch.float32] * 3), w0, new)
    assert torch.equal(torch.stack([w.detach() for w in weights]), expected)
    for i in unmoved:
        assert torch.equal(weights[i].detach(), w0[i])
    assert ops.counts["where"] == (1 if unmoved else 0)


# ------------------------------------------------------------------------------------------ lorth border trim

def _old_trim(weight):
    """The old ``_without_zero_border_taps``: a ``nonzero`` and a ``tolist`` per spatial dimension."""
    if all(k == 1 for k in weight.shape[2:]):
        return weight
    taps = weight.ne(0)
    index = [slice(None), slice(None)]
    for dim in range(2, weight.ndim):
        used = taps.any(dim=tuple(i for i in range(weight.ndim) if i != dim)).nonzero().flatten().tolist()
        if not used:
            return weight
        index.append(slice(used[0], used[-1] + 1))
    return weight[tuple(index)]


def _bordered(shape, keep, seed=0, dtype=torch.float64):
    """A random weight of ``shape`` that is zero outside the spatial box ``keep`` (one slice per dimension)."""
    w = torch.zeros(shape, dtype=dtype)
    box = (slice(None), slice(None), *keep)
    w[box] = torch.randn(w[box].shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return w


TRIM_CASES = [((3, 3, 5), (slice(1, 3),)), ((4, 2, 3, 3), (slice(1, 2), slice(1, 2))),
              ((2, 3, 5, 4), (slice(0, 5), slice(1, 3))), ((3, 3, 3, 3, 3), (slice(1, 2), slice(0, 2), slice(2, 3))),
              ((2, 2, 3, 1, 4), (slice(0, 3), slice(0, 1), slice(3, 4))), ((2, 2, 3, 3), (slice(0, 0), slice(0, 3)))]


class _HostReads:
    """Counts host reads: ``Tensor.tolist`` calls (which dispatch nothing on the CPU) and the ATen ops that read a
    value on the host (``nonzero``'s size, ``.item()``, ``bool()``)."""

    SYNC_OPS = ("nonzero", "_local_scalar_dense", "is_nonzero")

    def __init__(self, monkeypatch):
        self.tolist = 0
        tolist = torch.Tensor.tolist

        def counted(t):
            self.tolist += 1
            return tolist(t)

        monkeypatch.setattr(torch.Tensor, "tolist", counted)
        self.ops = OpCount()

    def total(self):
        return self.tolist + sum(self.ops.counts[name] for name in self.SYNC_OPS)


@pytest.mark.parametrize("shape, keep", TRIM_CASES)
def test_border_trim_reads_the_host_once_for_all_dimensions(monkeypatch, shape, keep):
    w = _bordered(shape, keep)
    reference = _old_trim(w)
    reads = _HostReads(monkeypatch)
    with reads.ops:
        trimmed = metrics._without_zero_border_taps(w)
    assert reads.total() <= 1   # was 2 per dimension (nonzero, tolist) until the first all-zero one
    assert trimmed.shape == reference.shape and torch.equal(trimmed, reference)
    assert trimmed.data_ptr() == reference.data_ptr()  # the same view of the weight


@pytest.mark.parametrize("shape, keep", [c for c in TRIM_CASES if c[1][0].stop])
def test_lorth_of_bordered_kernels_is_the_dense_operators(shape, keep):
    w = _bordered(shape, keep, seed=1)
    value = float(metrics.lorth(w))
    assert value == pytest.approx(lorth64(w), rel=1e-10, abs=1e-12)
    assert float(metrics.lorth(w.float())) == pytest.approx(lorth64(w), rel=1e-4)


# ------------------------------------------------------------------------------------------ ConditionMonitor

@pytest.mark.parametrize("cls", [ConditionMonitor, DecompositionMonitor])
def test_history_size_takes_the_projects_integer_check(cls):
    """numpy and 0-d tensor integers are taken, as torch.nn takes them (before: refused as "not an int"); the
    messages name the class, as the project's integer check words them; a bool is still refused."""
    assert cls(history_size=np.int64(3)).history_size == 3
    monitor = cls(history_size=torch.tensor(2))
    assert type(monitor.history_size) is int and monitor.history_buffer.shape == (2,)
    with pytest.raises(LayerArgumentError, match=rf"^{cls.__name__}: history_size must be >= 1, got 0$"):
        cls(history_size=0)
    for bad in (True, 2.0, "3"):
        with pytest.raises(LayerArgumentError,
                           match=rf"^{cls.__name__}: history_size must be a positive integer, got {bad!r}$"):
            cls(history_size=bad)
