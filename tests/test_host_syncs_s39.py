"""Device-to-host synchronisations of a training step, counted per preset and hook (session 39).

On a GPU every host read of a tensor (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, ``nonzero``, a boolean
mask index) waits for the device. On the CPU they dispatch to ATen ops that a ``TorchDispatchMode`` sees
(``_local_scalar_dense``, ``is_nonzero``, ``nonzero``, ...; ``tolist`` dispatches nothing and is counted by a
wrapper), so the count of a CPU step is the count of a CUDA one. :class:`HostSyncs` records each with the
orthofx function that made it (the innermost frame; reads inside torch's own code, such as the CPU ``Adam``'s step
counter or ``GradScaler``'s inf check, are not orthofx's and are left out, and so are ops inside a
``torch.library`` custom op, which the dispatcher hides from a mode).

Removed (the old code made them, the counts below fail on it):

* NOG read ``isfinite(G).all()`` on the host for every layer at every step; the choice "leave a NaN/inf gradient
  as it is" is now made on the device (``torch.where``), with the same gradients bit for bit;
* under ``GradScaler`` (a fused optimizer, half-precision gradients left scaled) NOG read that check and then
  ``_rescale_after_hooks`` its products' finiteness: now one read per layer for both;
* the Riemannian hooks' QR retraction read its own check on the host (Cholesky QR's on CUDA, Householder's NaN test
  elsewhere) and then the hook read the retraction's finiteness: now one read per batch of same-shaped weights;
* the Riemannian hooks' polar retraction: the hook read "finite, and every matrix moved?" after the retraction's
  Newton-Schulz reads; a polar factor the retraction returns is finite (a NaN/inf matrix raises), and "moved?" now
  rides on Newton-Schulz's first read.

Kept (deliberate): the Newton-Schulz iteration's error reads (its stopping rule), the hook's read where a step is
not finite (it refuses a diverged step, ``_finite_retraction``), OLR's ``a, b, c`` (the lr is a Python float; now
read once per step for all layers, was once per layer), and ``_step_will_be_skipped`` (a fused optimizer under
``GradScaler``). Each change leaves the results bit for bit.
"""

from __future__ import annotations

import collections
import os
import traceback

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import orthofx
from orthofx.nn import stiefel
from orthofx.passes import pre_svd
from orthofx.passes.base import OptimizerHook
from references import polar64, tangent64

pytestmark = pytest.mark.usefixtures("one_thread")

_PACKAGE = os.path.dirname(os.path.abspath(orthofx.__file__)) + os.sep
_TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
#: torch's frames between a host read and this mode (the mode's dynamo-disable wrapper, Tensor dunders, op calls)
_PASSING = ("_compile.py", os.path.join("_dynamo", "eval_frame.py"), "_tensor.py", "overrides.py", "_ops.py",
            os.path.join("utils", "_python_dispatch.py"))
_SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "item", "nonzero", "masked_select", "equal", "_unique2",
             "unique_dim", "unique_consecutive", "bincount"}


def _orthofx_source() -> str | None:
    """``path:function`` of the innermost frame outside this file and torch's dispatch machinery (:data:`_PASSING`),
    where that frame is orthofx's (else None: a read of torch's own code, or of this test)."""
    for frame in reversed(traceback.extract_stack()[:-1]):
        if frame.filename == __file__ or (frame.filename.startswith(_TORCH)
                                          and frame.filename[len(_TORCH):] in _PASSING):
            continue
        if frame.filename.startswith(_PACKAGE):
            return f"{frame.filename[len(_PACKAGE):]}:{frame.name}"
        return None
    return None


class HostSyncs(TorchDispatchMode):
    """The host reads made inside the ``with`` block, as a Counter of their orthofx sources
    (:func:`_orthofx_source`)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.sources: collections.Counter = collections.Counter()
        tolist = torch.Tensor.tolist

        def counted(t):
            if self._active:
                self._record()
            return tolist(t)

        self._active = False
        monkeypatch.setattr(torch.Tensor, "tolist", counted)

    def _record(self):
        source = _orthofx_source()
        if source is not None:
            self.sources[source] += 1

    def __enter__(self):
        self._active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self._active = False
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _SYNC_OPS:
            self._record()
        elif name in ("index", "index_put_", "_index_put_impl_") and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
            self._record()  # a boolean mask: a nonzero inside the kernel
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------------------------------------ presets

_MODELS = {"small_cnn": dict(width=4), "dbn_cnn": dict(width=4), "gcp_cnn": dict(width=4),
           "deep_mlp": dict(depth=3, width=8)}

#: The orthofx host reads of one steady-state SGD step (forward, penalty, backward, step) per preset and model.
#: svd: OLR's a, b, c (a Python lr), read once per step for all Pre-SVD layers; NOG's per-layer read is gone.
#: isometric: the Newton-Schulz error reads of the batch's polar retraction, the first of which now also reads the
#: hook's "every matrix moved?" (was a read of its own, with the retraction's finiteness, always true for polar).
EXPECTED = {
    ("lorth", "small_cnn"): {},
    ("orthogonal", "small_cnn"): {},
    ("convnorm", "small_cnn"): {},
    ("jacobian", "deep_mlp"): {},
    ("isometric", "deep_mlp"): {"nn/stiefel.py:_polar_newton_schulz": 1},
    ("svd", "dbn_cnn"): {"passes/pre_svd.py:pending_learning_rates": 1},
    ("svd", "gcp_cnn"): {"passes/pre_svd.py:pending_learning_rates": 1},
}


def _training(preset, name, seed=0):
    torch.manual_seed(seed)
    model = orthofx.models.get(name, **_MODELS[name])
    x = orthofx.models.example_input(name, batch=16)
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(seed))
    gm = orthofx.transform(model, preset, example_inputs=(x,))
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.01, momentum=0.9)
    orthofx.attach(optimizer, gm)

    def step():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(gm(x), y) + orthofx.penalty(gm)
        loss.backward()
        optimizer.step()

    return gm, step


@pytest.mark.parametrize("preset, name", list(EXPECTED))
def test_host_syncs_of_a_training_step_per_preset(monkeypatch, preset, name):
    gm, step = _training(preset, name)
    for _ in range(2):  # warm-up: first-call checks and lazily built state
        step()
    syncs = HostSyncs(monkeypatch)
    with syncs:
        step()
    assert dict(syncs.sources) == EXPECTED[(preset, name)]
    gm.eval()
    with torch.no_grad(), syncs:
        gm(orthofx.models.example_input(name, batch=4))
    assert dict(syncs.sources) == EXPECTED[(preset, name)]  # the eval forward reads nothing


# ------------------------------------------------------------------------------------------------ NOG

class _PreSvdStack(nn.Module):
    """Three Pre-SVD linears (one of them feeding a grouped view) whose outputs' covariances are decomposed."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(10, 6), nn.Linear(10, 5), nn.Linear(10, 4)

    def forward(self, x):
        out = 0
        for layer in (self.a, self.b, self.c):
            h = layer(x)
            out = out + torch.linalg.eigvalsh(h.T @ h / x.shape[0] + torch.eye(h.shape[1])).sum()
        return out


def _nog_model(olr=False):
    torch.manual_seed(3)
    x = torch.randn(24, 10, generator=torch.Generator().manual_seed(4))
    policy = {"rules": [{"match": {"feeds": ["linalg.eigvalsh"]}, "apply": "pre_svd", "with": {"olr": olr}}]}
    return orthofx.transform(_PreSvdStack(), policy, example_inputs=(x,)), x


def test_nog_reads_nothing_on_the_host_and_writes_the_polar_factors(monkeypatch):
    gm, x = _nog_model()
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    orthofx.attach(optimizer, gm)
    gm(x).backward()
    layers = [gm.get_submodule(n) for n in "abc"]
    raw = [layer.weight.grad.double().clone() for layer in layers]
    before = [layer.weight.detach().double().clone() for layer in layers]
    syncs = HostSyncs(monkeypatch)
    with syncs:
        optimizer.step()
    assert dict(syncs.sources) == {}  # was 3: one isfinite(G).all() read per NOG layer
    for layer, g, w in zip(layers, raw, before):
        u, _, vh = np.linalg.svd(g.numpy(), full_matrices=False)   # the polar factor U V^T, float64
        torch.testing.assert_close(layer.weight.detach().double(), w - 0.1 * torch.from_numpy(u @ vh),
                                   rtol=0, atol=1e-6)


def test_nog_leaves_a_nan_gradient_as_it_is_and_factors_the_others():
    gm, x = _nog_model()
    gm(x).backward()
    layers = [gm.get_submodule(n) for n in "abc"]
    layers[1].weight.grad[2, 3] = float("nan")
    layers[2].weight.grad[0, 0] = float("inf")
    raw = [layer.weight.grad.clone() for layer in layers]
    hooks = [h for h in gm.meta["orthofx"].optimizer_hooks if isinstance(h, pre_svd.NearestOrthogonalGradient)]
    assert sorted(h.site for h in hooks) == ["a", "b", "c"]
    for hook in hooks:
        hook.before_step(gm, None)
    # bit for bit: the NaN/inf gradients unchanged, the finite one its polar factor (the old code's value)
    for layer, g in zip(layers[1:], raw[1:]):
        assert torch.equal(layer.weight.grad.isnan(), g.isnan())
        assert torch.equal(layer.weight.grad.nan_to_num(), g.nan_to_num())
    assert torch.equal(layers[0].weight.grad, pre_svd.polar_factor(raw[0].reshape(1, 6, 10)).reshape(6, 10))
    torch.testing.assert_close(layers[0].weight.grad.double(), polar64(raw[0]), rtol=0, atol=1e-6)


def test_nog_with_olr_reads_the_host_once_per_step(monkeypatch):
    gm, x = _nog_model(olr=True)
    optimizer = torch.optim.SGD(gm.parameters(), lr=10.0)
    orthofx.attach(optimizer, gm)
    gm(x).backward()
    layers = [gm.get_submodule(n) for n in "abc"]
    raw = [layer.weight.grad.double().clone() for layer in layers]
    before = [layer.weight.detach().double().clone() for layer in layers]
    syncs = HostSyncs(monkeypatch)
    with syncs:
        optimizer.step()
    assert dict(syncs.sources) == {"passes/pre_svd.py:pending_learning_rates": 1}   # was 6: NOG's 3, OLR's 3
    # each layer stepped by its own eta* (P4, float64) along its polar factor; the lrs restored after the step
    for layer, g, w in zip(layers, raw, before):
        p = polar64(g)
        a, b, c = float(w.flatten() @ w.flatten()), float(p.flatten() @ w.flatten()), float(p.flatten() @ p.flatten())
        eta = a * b / (a * c + 2 * b * b)
        assert 0 < eta < 10.0
        group = next(group for group in optimizer.param_groups if group["params"][0] is layer.weight)
        assert group["lr"] == 10.0 and group["orthofx_olr_lr"] == pytest.approx(eta, rel=1e-5)
        torch.testing.assert_close(layer.weight.detach().double(), w - eta * p, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------ Riemannian QR

def _qf64(a: torch.Tensor) -> torch.Tensor:
    """Householder QR's Q (numpy, float64) with R's diagonal made positive, of each tall matrix of ``a``."""
    q, r = np.linalg.qr(a.double().numpy())
    return torch.from_numpy(q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[..., None, :])


@pytest.mark.parametrize("route", ["householder", "cholesky"])
def test_qr_retraction_hook_reads_the_host_once_per_batch(monkeypatch, route):
    if route == "cholesky":  # the CUDA route, taken on the CPU
        monkeypatch.setattr(stiefel, "CHOLESKY_QR_DEVICES", ("cuda", "cpu"))
    torch.manual_seed(5)
    gm = orthofx.transform(nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(4, 7)),
                           {"rules": [{"match": {"type": "Linear"}, "apply": "riemannian",
                                       "with": {"retraction": "qr"}}]})
    weights = [gm.get_submodule(str(i)).weight for i in range(3)]
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    orthofx.attach(optimizer, gm)
    grads = [torch.randn(w.shape, generator=torch.Generator().manual_seed(10 + i)) for i, w in enumerate(weights)]
    w0 = [w.detach().clone() for w in weights]
    for w, g in zip(weights, grads):
        w.grad = g.clone()
    syncs = HostSyncs(monkeypatch)
    with syncs:
        optimizer.step()
    # two batches (the 6 x 6 pair, the 7 x 4 one): one read each; was two each (the retraction's own check too)
    assert dict(syncs.sources) == {"passes/riemannian.py:_finite_retraction": 2}
    for w, start, g in zip(weights, w0, grads):
        xi = -0.1 * tangent64(start.double(), g.double())
        # bit for bit the checked retraction of the hook's tangent step (the SGD update w1, projected again)
        w1 = start.add(stiefel.tangent_projection(start, g), alpha=-0.1)
        assert torch.equal(w.detach(), stiefel.qr_retraction(start, stiefel.tangent_projection(start, w1 - start)))
        # and QR's Q in float64
        torch.testing.assert_close(w.detach().double(), _qf64(start.double() + xi), rtol=0, atol=1e-5)


def test_qr_retraction_hook_falls_back_where_cholesky_qr_fails(monkeypatch):
    # a Cholesky factorisation that reports failure: the hook takes the checked retraction (Householder), as before
    monkeypatch.setattr(stiefel, "CHOLESKY_QR_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda gram: (torch.zeros_like(gram), torch.ones(
        gram.shape[:-2], dtype=torch.int32)))
    from orthofx.passes.riemannian import _finite_retraction
    w = stiefel.random_orthonormal(6, 4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    xi = stiefel.tangent_projection(w, 0.1 * torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(1),
                                                         dtype=torch.float64))
    new, failed, all_moved = _finite_retraction(w, xi, "qr", torch.ones(2, dtype=torch.bool))
    assert failed == [] and all_moved
    assert torch.equal(new, stiefel.orthonormal(w + xi))
    torch.testing.assert_close(new, _qf64(w + xi), rtol=0, atol=1e-13)
    # a NaN step: that weight goes back, the other is retracted (the old behaviour)
    xi[1, 2, 1] = float("nan")
    new, failed, _ = _finite_retraction(w, xi, "qr", torch.ones(2, dtype=torch.bool))
    assert failed == [1] and torch.equal(new[1], w[1])
    torch.testing.assert_close(new[0], _qf64(w[0] + xi[0]), rtol=0, atol=1e-13)


def test_polar_retraction_hook_reads_only_newton_schulz_errors(monkeypatch):
    """The polar route keeps Newton-Schulz's reads (its stopping rule); the hook's own read (finite? all moved?) is
    gone: the first Newton-Schulz read carries "all moved?", and a polar factor returned is finite. The same weights
    as the float64 polar factor of the step."""
    torch.manual_seed(6)
    gm = orthofx.transform(nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 5)),
                           {"rules": [{"match": {"type": "Linear"}, "apply": "riemannian"}]})
    weights = [gm.get_submodule(str(i)).weight for i in range(2)]
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.05)
    orthofx.attach(optimizer, gm)
    grads = [torch.randn(5, 5, generator=torch.Generator().manual_seed(20 + i)) for i in range(2)]
    w0 = [w.detach().double().clone() for w in weights]
    for w, g in zip(weights, grads):
        w.grad = g.clone()
    syncs = HostSyncs(monkeypatch)
    with syncs:
        optimizer.step()
    assert set(syncs.sources) == {"nn/stiefel.py:_polar_newton_schulz"}   # was also one _finite_retraction read
    for w, start, g in zip(weights, w0, grads):
        torch.testing.assert_close(w.detach().double(), polar64(start - 0.05 * tangent64(start, g.double())),
                                   rtol=0, atol=2e-6)


# ------------------------------------------------------------------------------- NOG under GradScaler

def _scaled_nog(scale, nan=False):
    """One float16 NOG layer (6 x 12) and a plain one whose gradients a GradScaler left scaled for a fused kernel
    (``optimizer.grad_scale``); returns the model, the optimizer and the gradients before the hook."""
    torch.manual_seed(7)
    x = torch.randn(32, 12, generator=torch.Generator().manual_seed(8)).half()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = nn.Linear(12, 6), nn.Linear(6, 1)

        def forward(self, x):
            h = self.a(x)
            f = h.float()
            return torch.linalg.eigvalsh(f.T @ f / x.shape[0] + torch.eye(6)).sum() + self.head(h).float().sum()

    policy = {"rules": [{"match": {"feeds": ["linalg.eigvalsh"]}, "apply": "pre_svd", "with": {"nog": True}}]}
    gm = orthofx.transform(Net().half(), policy, example_inputs=(x,))
    optimizer = torch.optim.Adam(gm.parameters(), lr=1e-3, fused=True)
    (gm(x).float() * 1e-3 * scale).backward()
    if nan:
        gm.a.weight.grad[2, 5] = float("nan")
    optimizer.grad_scale = torch.tensor(scale)
    raw = {n: p.grad.clone() for n, p in gm.named_parameters()}
    return gm, optimizer, raw


def _nog_hook(gm):
    return next(h for h in gm.meta["orthofx"].optimizer_hooks if isinstance(h, pre_svd.NearestOrthogonalGradient))


def test_scaled_nog_reads_the_host_once_per_layer(monkeypatch):
    scale = 2.0 ** 10
    gm, optimizer, raw = _scaled_nog(scale)
    syncs = HostSyncs(monkeypatch)
    with syncs:
        _nog_hook(gm).before_step(gm, optimizer)
    assert dict(syncs.sources) == {"optim.py:_rescale_after_hooks": 1}  # was 2: NOG's isfinite read too
    # the old sequence bit for bit (polar factor in float16, times the scale in float32, rounded), and float64's
    g = raw["a.weight"]
    old = (pre_svd.polar_factor(g.reshape(1, 6, 12)).reshape(6, 12).float() * scale).half()
    assert torch.equal(gm.a.weight.grad, old)
    torch.testing.assert_close(gm.a.weight.grad.double() / scale, polar64(g.double()), rtol=0, atol=1e-3)
    assert float(optimizer.grad_scale) == scale and torch.equal(gm.head.weight.grad, raw["head.weight"])


def test_scaled_nog_keeps_a_nan_gradient_and_the_overflow_rule(monkeypatch):
    gm, optimizer, raw = _scaled_nog(2.0 ** 10, nan=True)
    syncs = HostSyncs(monkeypatch)
    with syncs:
        _nog_hook(gm).before_step(gm, optimizer)
    assert dict(syncs.sources) == {"optim.py:_rescale_after_hooks": 1}
    g = gm.a.weight.grad
    assert torch.equal(g.isnan(), raw["a.weight"].isnan()) and torch.equal(g.nan_to_num(), raw["a.weight"].nan_to_num())
    assert float(optimizer.grad_scale) == 2.0 ** 10  # nothing rescaled or divided
    # a scale whose product with the factor overflows float16: the factor stays in true units, the others divided
    scale = 2.0 ** 20
    gm, optimizer, raw = _scaled_nog(scale)
    _nog_hook(gm).before_step(gm, optimizer)
    assert optimizer.grad_scale is None
    assert torch.equal(gm.a.weight.grad, pre_svd.polar_factor(raw["a.weight"].reshape(1, 6, 12)).reshape(6, 12))
    assert torch.equal(gm.head.weight.grad, raw["head.weight"] / scale)


@pytest.mark.parametrize("moved", [(True, True, True), (True, False, True)])
def test_polar_finite_retraction_answers_all_moved_as_before(monkeypatch, moved):
    from orthofx.passes.riemannian import _finite_retraction
    w = stiefel.random_orthonormal(7, 4, 3, generator=torch.Generator().manual_seed(2))
    xi = stiefel.tangent_projection(w, 0.05 * torch.randn(3, 7, 4, generator=torch.Generator().manual_seed(3)))
    moved = torch.tensor(moved)
    syncs = HostSyncs(monkeypatch)
    with syncs:
        new, failed, all_moved = _finite_retraction(w, xi, "polar", moved)
    assert failed == [] and all_moved is bool(moved.all())
    assert syncs.sources["nn/stiefel.py:_polar_newton_schulz"] >= 1 and len(syncs.sources) == 1
    assert torch.equal(new, stiefel.polar_retraction(w, xi))  # the retraction's value, bit for bit
    for i in range(3):
        torch.testing.assert_close(new[i].double(), polar64(w[i].double() + xi[i].double()), rtol=0, atol=1e-6)
    # far from the manifold (Newton-Schulz refuses it after its first read; the Gram route finishes): still one read
    # of "all moved?" there, and the value of the retraction
    far = 20.0 * xi
    with syncs:
        new, _, all_moved = _finite_retraction(w, far, "polar", moved)
    assert all_moved is bool(moved.all()) and torch.equal(new, stiefel.polar_retraction(w, far))


class _SeesLearningRate(OptimizerHook):
    """A user's pass hook reading the lr of layer a's param group in its before_step (it runs after the OLR hooks)."""
    parameter_names = ("bias",)

    def __init__(self, site, rule):
        super().__init__(site, rule)
        self.seen = []

    def before_step(self, root, optimizer):
        weight = root.get_submodule("a").weight
        self.seen.append(next(g for g in optimizer.param_groups if any(p is weight for p in g["params"]))["lr"])


def test_a_user_hook_after_olr_sees_this_steps_learning_rate():
    # OLR's lrs are set at once after the "before" hooks only where all of them are orthofx's: a user's hook that
    # reads an lr must see the one the step uses (it saw the base lr, 10, when the reads were deferred for it too)
    gm, x = _nog_model(olr=True)
    user_hook = _SeesLearningRate("c", "mine")
    gm.meta["orthofx"].optimizer_hooks.append(user_hook)
    optimizer = torch.optim.SGD(gm.parameters(), lr=10.0)
    orthofx.attach(optimizer, gm)
    layer = gm.get_submodule("a")
    gm(x).backward()
    grad = layer.weight.grad.double().clone()
    before = layer.weight.detach().double().clone()
    optimizer.step()
    (seen,) = user_hook.seen
    assert seen < 10.0
    # the step used that lr: W - lr * polar(G), the NOG step, in float64
    torch.testing.assert_close(layer.weight.detach().double(), before - seen * polar64(grad), rtol=0, atol=1e-5)
