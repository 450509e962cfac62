"""Edge cases of inputs and failures: ConvNorm's type errors and momentum-less state loading, Newton-Schulz on the
zero matrix, integer checks of spectral_norm_bound and JacobianProbe, and OLR's lr after a failing step."""

import importlib
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import ArgumentError, LayerArgumentError
from orthofx.metrics import spectral_norm_bound
from orthofx.nn.convnorm import ConvNormConv1d, ConvNormConv2d, with_convnorm
from orthofx.nn.decompositions import sqrtm_newton_schulz
from orthofx.nn.jacobian import JacobianProbe
from orthofx.passes import pre_svd

F64 = torch.float64


# ------------------------------------------------------------------------------------------- ConvNorm


@pytest.mark.parametrize("make, layer", [
    (lambda m: with_convnorm(m), nn.Linear(3, 4)),
    (lambda m: with_convnorm(m), nn.ConvTranspose2d(3, 4, 3)),
    (lambda m: ConvNormConv2d(m), nn.Linear(3, 4)),
    (lambda m: ConvNormConv2d(m), nn.Conv1d(3, 4, 3)),
    (lambda m: ConvNormConv1d(m), nn.ConvTranspose1d(3, 4, 3)),
])
def test_convnorm_refuses_non_convolutions_with_layer_argument_error(make, layer):
    with pytest.raises(LayerArgumentError) as info:
        make(layer)
    assert isinstance(info.value, TypeError)  # what these checks raised before: ``except TypeError`` still works
    message = str(info.value)
    assert f"got a {type(layer).__name__}" in message  # what was given
    assert "nn.Conv" in message  # what is accepted
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        assert "transposed convolutions are not supported" in message


def _state_with_running_filters():
    torch.manual_seed(0)
    layer = ConvNormConv2d(nn.Conv2d(2, 3, 3, padding=1), momentum=0.1)
    layer(torch.randn(2, 2, 8, 8))
    state = layer.state_dict()
    assert "running_v_10x10" in state
    return state


def test_convnorm_without_momentum_reports_running_filters_as_unexpected_keys():
    state = _state_with_running_filters()
    layer = ConvNormConv2d(nn.Conv2d(2, 3, 3, padding=1))  # momentum=None: never uses running filters
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "running_v_10x10"'):
        layer.load_state_dict(state)
    result = layer.load_state_dict(state, strict=False)
    assert result.unexpected_keys == ["running_v_10x10"] and result.missing_keys == []
    assert layer.running_grids == [] and "running_v_10x10" not in layer.state_dict()
    torch.testing.assert_close(layer.conv.weight, state["conv.weight"])
    # with momentum the same state loads, running filter included
    with_momentum = ConvNormConv2d(nn.Conv2d(2, 3, 3, padding=1), momentum=0.1)
    with_momentum.load_state_dict(state)
    torch.testing.assert_close(with_momentum.running_filter((10, 10)), state["running_v_10x10"])


# ------------------------------------------------------------------------------------------- Newton-Schulz


def _eigh_sqrt(A):
    """Float64 reference: V diag(sqrt(max(lambda, 0))) V^T."""
    lam, V = torch.linalg.eigh(A.to(F64))
    return V @ torch.diag_embed(lam.clamp_min(0).sqrt()) @ V.mT


def test_sqrtm_newton_schulz_of_the_zero_matrix_is_zero_with_a_finite_gradient():
    g = torch.Generator().manual_seed(3)
    B = torch.randn(4, 4, generator=g, dtype=F64)
    spd = B @ B.T + 0.5 * torch.eye(4, dtype=F64)
    A = torch.stack([torch.zeros(4, 4, dtype=F64), spd]).requires_grad_()
    S = sqrtm_newton_schulz(A, iterations=12)
    torch.testing.assert_close(S.detach(), _eigh_sqrt(A.detach()), rtol=1e-8, atol=1e-10)
    assert torch.equal(S[0].detach(), torch.zeros(4, 4, dtype=F64))
    S.sum().backward()
    assert torch.isfinite(A.grad).all()
    assert torch.equal(A.grad[0], torch.zeros(4, 4, dtype=F64))
    # float32 and a single matrix too
    assert torch.equal(sqrtm_newton_schulz(torch.zeros(3, 3)), torch.zeros(3, 3))


# ------------------------------------------------------------------------------------------- integer arguments


@pytest.mark.parametrize("bad", [2.5, -1, True, "3", torch.tensor(2.0)])
def test_spectral_norm_bound_refuses_non_integer_iterations(bad):
    w = torch.randn(5, 4, dtype=F64)
    with pytest.raises(ArgumentError, match="iterations must be"):
        spectral_norm_bound(w, iterations=bad)


def test_spectral_norm_bound_accepts_integer_types_and_zero():
    w = torch.randn(5, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    assert spectral_norm_bound(w, iterations=np.int64(3)) == spectral_norm_bound(w, iterations=3)
    assert spectral_norm_bound(w, iterations=0) == pytest.approx(float(torch.linalg.matrix_norm(w)))


@pytest.mark.parametrize("name", ["probes", "every"])
def test_jacobian_probe_integer_arguments(name):
    block = nn.Linear(3, 3)
    probe = JacobianProbe(block, **{name: np.int64(2)})  # accepted where the Python int 2 is
    assert getattr(probe, name) == 2 and type(getattr(probe, name)) is int
    for bad in (2.5, 0, True):
        with pytest.raises(LayerArgumentError, match=name):
            JacobianProbe(block, **{name: bad})


# ------------------------------------------------------------------------------------------- OLR and a failing step


class _LinearEigh(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 4, bias=False)

    def forward(self, x):
        f = self.a(x)
        return torch.linalg.eigvalsh(f.T @ f + torch.eye(4)).sum()


class _StepFailed(Exception):
    pass


_SGD_MODULE = importlib.import_module("torch.optim.sgd")  # the attribute torch.optim.sgd is the function


def _olr_setup(base_lr=10.0, scheduler_first=False):
    torch.manual_seed(0)
    x = torch.randn(16, 6)
    policy = {"rules": [{"match": {"feeds": ["linalg.eigvalsh"]}, "apply": "pre_svd",
                         "with": {"olr": True, "nog": False}}]}
    gm = orthofx.transform(_LinearEigh(), policy, example_inputs=(x,))
    optimizer = torch.optim.SGD(gm.parameters(), lr=base_lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, 1.0) if scheduler_first else None
    own_step = optimizer.__dict__.get("step")  # the scheduler's wrapper of optimizer.step, if any
    handle = orthofx.attach(optimizer, gm)
    group = next(g for g in optimizer.param_groups if g.get(pre_svd.OLR_GROUP_KEY) == "a")
    optimizer.zero_grad()
    gm(x).backward()
    return gm, optimizer, group, handle, (scheduler, own_step)


@pytest.mark.parametrize("with_closure", [False, True])
def test_olr_restores_the_lr_when_the_step_raises(monkeypatch, with_closure):
    gm, optimizer, group, handle, _ = _olr_setup()
    w0 = gm.a.weight.detach().clone()
    grad = gm.a.weight.grad.clone()

    def fail(*args, **kwargs):
        raise _StepFailed

    # SGD's update raises, after the "before" hooks (with a closure they run right after its evaluation)
    monkeypatch.setattr(_SGD_MODULE, "sgd", fail)
    with pytest.raises(_StepFailed):
        optimizer.step((lambda: torch.zeros(())) if with_closure else None)
    eta = group["orthofx_olr_lr"]
    assert eta < 10.0  # the hooks did set an OLR lr for the failed step
    assert group["lr"] == 10.0 and "orthofx_olr_base_lr" not in group  # and it was undone
    assert torch.equal(gm.a.weight.detach(), w0)
    monkeypatch.undo()
    # the next step (same weight and gradient) takes the same OLR lr from the base lr, then restores the base lr
    optimizer.step()
    assert group["orthofx_olr_lr"] == eta and group["lr"] == 10.0
    torch.testing.assert_close(w0 - gm.a.weight.detach(), eta * grad)
    handle.remove()
    assert "step" not in optimizer.__dict__  # the step wrapper is gone with the hooks


def test_olr_failing_step_with_an_lr_scheduler(monkeypatch):
    gm, optimizer, group, handle, (scheduler, scheduler_step) = _olr_setup(scheduler_first=True)
    assert scheduler_step is not None
    def fail(*args, **kwargs):
        raise _StepFailed

    monkeypatch.setattr(_SGD_MODULE, "sgd", fail)
    with pytest.raises(_StepFailed):
        optimizer.step()
    assert group["lr"] == 10.0
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scheduler still sees its own wrapper: no "overridden" warning
        optimizer.step()
        scheduler.step()
    handle.remove()
    assert optimizer.__dict__["step"] is scheduler_step
