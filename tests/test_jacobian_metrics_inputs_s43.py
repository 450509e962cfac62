"""jacobian_isometry / jacobian_singular_values on inputs an audit found mishandled (session 43):
torch.inference_mode() (a zero Jacobian, silently), a model with training-mode JacobianProbes (the pending penalty
dropped, or replaced by a new estimate), layers that refuse torch.func transforms (a condition-number monitor, a
ConvNorm updating its running filter) and an inference tensor as x.

References are independent of orthofx's metrics: the dense Jacobian from torch.autograd.functional.jacobian,
torch.linalg.svdvals of it, and the exact value of the estimate for a scaled orthogonal map (J^T J = 4 I, so
||(J^T J - I) v||^2 = 9 ||v||^2 = 9 * numel for any Rademacher probe v)."""

import copy

import pytest
import torch
import torch.nn as nn

import orthofx
import orthofx.metrics as M
import orthofx.nn as N
from orthofx.errors import ArgumentError, LayerArgumentError


def _orthogonal(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q.float()


def _scaled_orthogonal_linear(n=8, scale=2.0):
    lin = nn.Linear(n, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(scale * _orthogonal(n))
    return lin


def _dense_svdvals(fn, x):
    """torch's dense Jacobian of the flattened map, decomposed by torch.linalg.svdvals (float64)."""
    fn = copy.deepcopy(fn).double() if isinstance(fn, nn.Module) else fn
    jac = torch.autograd.functional.jacobian(fn, x.double())
    out = fn(x.double())
    return torch.linalg.svdvals(jac.reshape(out.numel(), x.numel()))


# ---------------------------------------------------------------------------------------------- inference mode


def test_inference_mode_is_refused_by_jacobian_isometry_and_no_grad_still_measures():
    lin = _scaled_orthogonal_linear()
    q = _orthogonal(8)
    x = torch.randn(4, 8)
    exact = 9.0 * x.numel()  # J^T J = 4 I: ||3 v||^2 for every Rademacher v
    with torch.no_grad():
        got = M.jacobian_isometry(lin, x, create_graph=False)
    torch.testing.assert_close(float(got.detach()), exact, rtol=1e-4, atol=0)
    with torch.inference_mode():
        for fn in (lin, lambda t: t @ q.T):  # a module, and a plain callable of an exact isometry
            for kw in ({}, {"per_sample": True}, {"route": "double_vjp"}, {"create_graph": False}):
                with pytest.raises(ArgumentError, match=r"jacobian_isometry: called under torch.inference_mode\(\)"
                                                        r".*torch.no_grad\(\) is fine"):
                    M.jacobian_isometry(fn, x, **kw)


def test_inference_mode_is_refused_by_jacobian_singular_values_and_no_grad_still_measures():
    lin = _scaled_orthogonal_linear(scale=1.0)
    x = torch.randn(4, 8)
    reference = _dense_svdvals(lin, x)
    with torch.no_grad():
        got = M.jacobian_singular_values(lin, x)
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        for kw in ({}, {"per_sample": True}, {"dtype": torch.float64}):
            with pytest.raises(ArgumentError, match=r"jacobian_singular_values: called under torch.inference_mode"):
                M.jacobian_singular_values(lin, x, **kw)


# -------------------------------------------------------------------------------- training-mode JacobianProbes


def _probe_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Sequential(nn.Linear(8, 8), nn.Tanh()),
                          nn.Linear(8, 8))
    x = torch.randn(4, 8)
    plain = copy.deepcopy(model)
    gm = orthofx.transform(model, "jacobian", (x,))
    probes = [m for m in gm.modules() if isinstance(m, N.JacobianProbe)]
    assert probes and gm.training
    gm(x)  # a training forward: each probe holds a pending estimate
    return gm, plain, probes, x


def _probe_state(probes):
    return [(p.estimate, p.calls, p.route_used) for p in probes]


def test_jacobian_singular_values_keeps_the_pending_penalty_of_training_probes():
    gm, plain, probes, x = _probe_model()
    before = float(orthofx.penalty(gm).detach())
    state = _probe_state(probes)
    assert before > 0
    got = M.jacobian_singular_values(gm, x)  # was: LayerArgumentError, after the penalty had been reset to 0
    assert float(orthofx.penalty(gm).detach()) == before
    assert all(a[0] is b[0] and a[1:] == b[1:] for a, b in zip(_probe_state(probes), state))
    torch.testing.assert_close(got.double(), _dense_svdvals(plain, x), rtol=1e-4, atol=1e-5)
    per_sample = M.jacobian_singular_values(gm, x, per_sample=True, dtype=torch.float64)
    for b in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(copy.deepcopy(plain).double(), x[b:b + 1].double()).reshape(8, 8)
        torch.testing.assert_close(per_sample[b], torch.linalg.svdvals(jac))
    assert float(orthofx.penalty(gm).detach()) == before


@pytest.mark.parametrize("route", ["auto", "jvp", "double_vjp"])
def test_jacobian_isometry_keeps_the_pending_penalty_of_training_probes(route):
    gm, plain, probes, x = _probe_model()
    before = float(orthofx.penalty(gm).detach())
    state = _probe_state(probes)
    # route 'double_vjp' made the probes estimate again (a new pending penalty); the others were refused
    got = M.jacobian_isometry(gm, x, probes=3, route=route, create_graph=False,
                              generator=torch.Generator().manual_seed(5))
    assert float(orthofx.penalty(gm).detach()) == before
    assert all(a[0] is b[0] and a[1:] == b[1:] for a, b in zip(_probe_state(probes), state))
    # the probes are transparent: the estimate of the untransformed model with the same probes
    want = M.jacobian_isometry(plain, x, probes=3, route=route, create_graph=False,
                               generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------- layers that refuse torch.func transforms


class _EighNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, t):
        h = torch.tanh(self.a(t))
        c = h.T @ h / h.shape[0] + 0.1 * torch.eye(8)
        _, v = torch.linalg.eigh(c)
        return self.head(h @ v)


@pytest.mark.parametrize("training", [False, True])
def test_jacobian_singular_values_of_an_svd_preset_model_falls_back(training):
    torch.manual_seed(0)
    x = torch.randn(6, 8)
    gm = orthofx.transform(_EighNet(), "svd", (x,)).train(training)
    assert any("Monitor" in type(m).__name__ for m in gm.modules())
    buffers = {k: v.clone() for k, v in gm.state_dict().items()}
    got = M.jacobian_singular_values(gm, x)  # was: the monitor's LayerArgumentError (jacrev refused)
    with torch.inference_mode():
        x_inference = x.clone()  # the fallback's own requires_grad_ must not meet an inference tensor
    torch.testing.assert_close(M.jacobian_singular_values(gm, x_inference), got, rtol=0, atol=0)
    for k, v in gm.state_dict().items():  # the monitor recorded into copies of its buffers (NaN: no record yet)
        torch.testing.assert_close(v, buffers[k], rtol=0, atol=0, equal_nan=True)
    reference = copy.deepcopy(gm)
    jac = torch.autograd.functional.jacobian(reference, x)
    torch.testing.assert_close(got, torch.linalg.svdvals(jac.reshape(18, 48)), rtol=1e-4, atol=1e-5)


def test_jacobian_singular_values_of_a_training_convnorm_with_running_filter():
    # guard (passed before too): the running filters are held during the measure, so ConvNorm's refusal of
    # torch.func transforms is not met, and nothing is updated
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 3, 3, padding=1)
    layer = nn.Sequential(N.ConvNormConv2d(conv, momentum=0.1))
    x = torch.randn(2, 3, 5, 5)
    layer(x)  # a running filter for the grid
    reference = copy.deepcopy(layer)
    kept = layer[0].running_grids, [layer[0].running_filter(g).clone() for g in layer[0].running_grids]
    with torch.inference_mode():
        x_inference = x.clone()
    got = M.jacobian_singular_values(layer, x_inference)
    assert layer[0].running_grids == kept[0]
    assert all(torch.equal(layer[0].running_filter(g), v) for g, v in zip(*kept))
    jac = torch.autograd.functional.jacobian(reference, x)
    torch.testing.assert_close(got, torch.linalg.svdvals(jac.reshape(x.numel(), x.numel())), rtol=1e-4,
                               atol=1e-5)


def test_other_errors_of_fn_are_not_taken_for_a_transform_refusal():
    calls = []

    def fails_inside_transforms(error):
        def fn(t):
            calls.append(1)
            if len(calls) > 1:  # the check forward passes; jacrev's call raises
                raise error
            return t * 2
        return fn

    for error in (ArgumentError("fn's own orthofx error"), LayerArgumentError("a layer's own refusal"),
                  ValueError("a plain ValueError")):
        calls.clear()
        with pytest.raises(type(error), match=str(error)):
            M.jacobian_singular_values(fails_inside_transforms(error), torch.randn(3))
        assert len(calls) == 2  # no fallback ran fn again


# -------------------------------------------------------------------------------- an inference tensor as x


@pytest.mark.parametrize("kw", [{}, {"per_sample": True}, {"route": "double_vjp"}, {"route": "jvp"},
                                {"kind": "partial"}])
def test_jacobian_isometry_takes_an_inference_tensor_x(kw):
    lin = _scaled_orthogonal_linear()
    with torch.inference_mode():
        x = torch.randn(4, 8)
    assert x.is_inference()
    got = M.jacobian_isometry(lin, x, **kw)  # was: torch's raw RuntimeError from requires_grad_
    exact = 9.0 * (8 if kw.get("per_sample") else x.numel())
    if kw.get("kind") == "partial":
        exact = 36.0 * x.numel()  # J J^T J - J = (8 - 2) Q: ||6 v||^2
    torch.testing.assert_close(float(got.detach()), exact, rtol=1e-4, atol=0)
    got.backward()  # still a regulariser: the gradient reaches the weight
    assert lin.weight.grad is not None and bool(lin.weight.grad.isfinite().all())
    assert x.is_inference()  # the caller's tensor is left as it was
