"""Bad inputs to orthofx.nn's less-used entry points (audit s43, f5_flags / f6_low_raw_errors): each raised a raw
Python error, or silently did something else, where the rest of orthofx refuses with its own error type.

* ``eigh_stable`` / ``svd_stable`` read ``float64`` / ``plain`` by truthiness: ``plain="no"`` switched the bounded
  gradient off, ``float64="no"`` computed in float64, a tensor flag gave torch's "Boolean value of Tensor" error.
* ``ConvNormConv2d.filter(8)`` / ``running_filter(8)`` failed with "'int' object is not iterable" (``to_plain``
  reads an int size as square); ``running_filter`` of a grid of the wrong rank or with a size < 1 returned None.
* ``ConditionMonitor.update(None)`` and the layers' ``forward(None)``: raw AttributeErrors.
* ``OrthogonalLinear(8, 4)`` on a width-5 input: torch's raw matmul error (OrthogonalConv2d names the layer).
* ``Plan.entries_for`` of a misspelt pass name returned [] silently.
* ``JacobianProbe.restore_calls(1.5)`` stored 1.5, ``restore_calls(None)`` raised a raw TypeError.

References: torch.linalg in float64, a dense FFT of the kernel, plain ``F.linear``, the state_dict's keys.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthofx
import orthofx.nn as N
from orthofx.errors import ArgumentError, LayerArgumentError, OrthofxError


def _sym(n: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return (a + a.T).float()


# ------------------------------------------------------------------------------------------ a: eigh/svd flags

BAD_FLAGS = ["no", "yes", "", torch.ones(2), [True], None]


@pytest.mark.parametrize("name", ["float64", "plain"])
@pytest.mark.parametrize("value", BAD_FLAGS, ids=repr)
def test_eigh_stable_refuses_non_bool_flags(name, value):
    with pytest.raises(ArgumentError, match=f"eigh_stable: {name} must be True or False"):
        N.eigh_stable(_sym(), **{name: value})


@pytest.mark.parametrize("name", ["float64", "plain"])
@pytest.mark.parametrize("value", BAD_FLAGS, ids=repr)
def test_svd_stable_refuses_non_bool_flags(name, value):
    with pytest.raises(ArgumentError, match=f"svd_stable: {name} must be True or False"):
        N.svd_stable(torch.randn(4, 3), **{name: value})


def test_positional_tensor_float64_flag_is_an_orthofx_error():
    # the audit's repro: svd_stable(A, 9, <tensor>) met "Boolean value of Tensor ... is ambiguous"
    with pytest.raises(LayerArgumentError, match="float64 must be True or False"):
        N.svd_stable(torch.eye(3), 9, torch.ones(2, 2))


@pytest.mark.parametrize("flag", [True, False, 1, 0, np.bool_(True), np.bool_(False), torch.tensor(True)], ids=repr)
def test_valid_flags_give_torch_linalg_values(flag):
    A = _sym(5, seed=1)
    ref_vals, ref_vecs = torch.linalg.eigh(A.double())
    for kw in ({"float64": flag}, {"plain": flag}):
        vals, vecs = N.eigh_stable(A, **kw)
        assert vals.dtype == torch.float32 and vecs.dtype == torch.float32
        torch.testing.assert_close(vals.double(), ref_vals, atol=1e-5, rtol=1e-5)
        # eigenvectors up to sign (distinct eigenvalues here)
        torch.testing.assert_close((vecs.double().mT @ ref_vecs).abs(), torch.eye(5, dtype=torch.float64),
                                   atol=1e-4, rtol=0)
    B = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    ref_s = torch.linalg.svdvals(B.double())
    for kw in ({"float64": flag}, {"plain": flag}):
        U, S, Vh = N.svd_stable(B, **kw)
        torch.testing.assert_close(S.double(), ref_s, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close((U @ torch.diag(S) @ Vh).double(), B.double(), atol=1e-5, rtol=1e-5)


def test_plain_flag_still_selects_torch_gradient():
    # plain=True gives torch.linalg.eigh's own gradient (NaN at a repeated eigenvalue), plain=False a finite one
    A0 = torch.diag(torch.tensor([1.0, 1.0, 2.0]))
    grads = {}
    for plain in (False, True):
        A = A0.clone().requires_grad_()
        vals, vecs = N.eigh_stable(A, plain=plain)
        (vals.sum() + vecs.sum()).backward()
        grads[plain] = A.grad
    B = A0.clone().requires_grad_()
    vals, vecs = torch.linalg.eigh(B)
    (vals.sum() + vecs.sum()).backward()
    assert bool(grads[False].isfinite().all())
    assert torch.equal(grads[True].isfinite(), B.grad.isfinite())


# ------------------------------------------------------------------------------------------ b: ConvNorm sizes

def _convnorm(momentum=None) -> N.ConvNormConv2d:
    torch.manual_seed(0)
    return N.ConvNormConv2d(nn.Conv2d(4, 3, 3, padding=1), momentum=momentum)


def _dense_filter(weight: torch.Tensor, grid: tuple[int, int], eps: float = 1e-5) -> torch.Tensor:
    """V_m(w) = (sum_c |FFT_grid(K_mc)(w)|^2 + eps)^(-1/2) by zero-padding each kernel onto the grid (float64)."""
    w = weight.detach().double()
    padded = torch.zeros(*w.shape[:2], *grid, dtype=torch.float64)
    padded[..., :w.shape[-2], :w.shape[-1]] = w
    power = torch.fft.rfftn(padded, dim=(-2, -1)).abs().square().sum(1)
    return (power + eps).rsqrt()


def test_filter_takes_an_int_size_like_to_plain():
    layer = _convnorm()
    # a 3x3 kernel with padding 1 on an 8x8 input: FFT grid 10x10 (the gain_range doctest's)
    ref = _dense_filter(layer.conv.weight, (10, 10))
    torch.testing.assert_close(layer.filter(8).double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.filter((8, 8)).double(), ref, atol=1e-5, rtol=1e-5)
    assert layer.geometry(8).grid == (10, 10)
    assert layer.gain_range(8)[0].grid == (10, 10)


@pytest.mark.parametrize("bad", [None, 8.5j, object()], ids=["None", "complex", "object"])
def test_filter_refuses_a_non_size(bad):
    with pytest.raises(LayerArgumentError, match="ConvNormConv2d"):
        _convnorm().filter(bad)


def test_running_filter_int_grid_and_refusals():
    layer = _convnorm(momentum=0.1)
    layer(torch.randn(2, 4, 8, 8))
    stored = layer.state_dict()["running_v_10x10"]
    assert torch.equal(layer.running_filter(10), stored)
    assert torch.equal(layer.running_filter((10, 10)), stored)
    assert layer.running_filter(12) is None          # a valid grid nothing is kept for
    for bad in [(10, 10, 10), (10,), (-1, 10), (0, 10), 0, -3]:
        with pytest.raises(LayerArgumentError, match=r"ConvNormConv2d: running_filter takes an FFT grid of 2 positive"):
            layer.running_filter(bad)
    for bad in [None, "ab", 1.5j]:
        with pytest.raises(LayerArgumentError, match="ConvNormConv2d"):
            layer.running_filter(bad)


# ------------------------------------------------------------------------------------------ c: ConditionMonitor

@pytest.mark.parametrize("bad", [None, [1.0, 2.0], 3.0, np.array([1.0, 2.0])], ids=repr)
def test_condition_monitor_update_refuses_non_tensors(bad):
    monitor = N.ConditionMonitor()
    with pytest.raises(LayerArgumentError, match="ConditionMonitor: update takes the eigenvalues"):
        monitor.update(bad)
    with pytest.raises(LayerArgumentError, match="ConditionMonitor: update takes the eigenvalues"):
        monitor(bad)
    assert int(monitor.updates) == 0
    lam = np.array([0.5, 1.0, 3.0])
    assert float(monitor.update(torch.tensor(lam))) == pytest.approx(lam.max() / lam.min())


# ------------------------------------------------------------------------------------------ d: forward(None)

def _layers():
    torch.manual_seed(0)
    cn = N.ConvNormConv2d(nn.Conv2d(4, 4, 3, padding=1))
    return [
        N.OrthogonalConv2d(4, 4, 3),
        N.OrthogonalConv1d(4, 4, 3),
        N.OrthogonalConvTranspose2d(4, 4, 3),
        N.OrthogonalLinear(4, 4),
        N.OrthogonalConv2d(4, 4, 3, method="cayley_fft", input_size=(8, 8)),
        N.OrthogonalConv2d(4, 4, 3, method="cayley_fft", input_size=(8, 8)).to_plain(),  # FourierConv
        cn,
        cn.to_plain([8]),                                                                 # FrozenConvNormNd
    ]


@pytest.mark.parametrize("index", range(8))
@pytest.mark.parametrize("bad", [None, [1.0, 2.0], 3.0], ids=repr)
def test_layer_forward_refuses_non_tensors(index, bad):
    layer = _layers()[index]
    with pytest.raises(LayerArgumentError, match=rf"^{type(layer).__name__}: expected a torch.Tensor input"):
        layer(bad)


def test_functional_conv_norm_refuses_non_tensors():
    from orthofx.nn.convnorm import conv_norm
    with pytest.raises(LayerArgumentError, match="^conv_norm: expected a torch.Tensor input"):
        conv_norm(None, torch.randn(4, 4, 3, 3), padding=1)


# ------------------------------------------------------------------------------------------ e: OrthogonalLinear width

@pytest.mark.parametrize("shape", [(2, 5), (5,), (3, 2, 9), ()])
def test_orthogonal_linear_wrong_width_is_a_layer_error(shape):
    layer = N.OrthogonalLinear(8, 4)
    with pytest.raises(LayerArgumentError, match=r"OrthogonalLinear \(in_features=8\): expected an input of shape"):
        layer(torch.randn(shape))


@pytest.mark.parametrize("shape", [(2, 8), (8,), (3, 2, 8), (0, 8)])
def test_orthogonal_linear_valid_inputs_match_f_linear(shape):
    layer = N.OrthogonalLinear(8, 4)
    x = torch.randn(shape)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_orthogonal_linear_check_compiles_and_exports_without_graph_break():
    torch.manual_seed(0)
    model = nn.Sequential(N.OrthogonalLinear(8, 6), nn.ReLU(), N.OrthogonalLinear(6, 3))
    x = torch.randn(5, 8)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=True)
    for batch in (5, 7):
        xb = torch.randn(batch, 8)
        torch.testing.assert_close(compiled(xb), model(xb))
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    xb = torch.randn(9, 8)
    torch.testing.assert_close(program.module()(xb), model(xb))


# ------------------------------------------------------------------------------------------ f: Plan.entries_for

def _plan():
    x = torch.randn(2, 3, 8, 8)
    return orthofx.explain(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)), "lorth", (x,))


def test_entries_for_refuses_unknown_pass_names():
    from orthofx.passes import available_passes
    from orthofx.passes.registry import UnknownPassError
    plan = _plan()
    applied = [e for e in plan.entries if e.pass_name == "orth_regularizer"]
    assert applied and plan.entries_for("orth_regularizer") == applied
    unused = next(name for name in available_passes() if name != "orth_regularizer")
    assert plan.entries_for(unused) == []                 # a registered pass no rule applies
    with pytest.raises(UnknownPassError, match=r"unknown pass 'orth_regulariser'.*did you mean 'orth_regularizer'"):
        plan.entries_for("orth_regulariser")
    for bad in ["nope", None, ["orth_regularizer"]]:
        with pytest.raises(OrthofxError, match="Plan.entries_for: unknown pass"):
            plan.entries_for(bad)
    with pytest.raises(KeyError):  # UnknownPassError is a KeyError too, as get_pass raises it
        plan.entries_for("nope")


# ------------------------------------------------------------------------------------------ g: restore_calls

def _probe():
    return N.JacobianProbe(nn.Linear(4, 4), every=4)


@pytest.mark.parametrize("bad", [1.5, None, True, "3", torch.tensor(2.0), -1], ids=repr)
def test_restore_calls_refuses_non_integers(bad):
    probe = _probe()
    before = probe.calls
    with pytest.raises(LayerArgumentError, match="JacobianProbe: restore_calls: calls"):
        probe.restore_calls(bad)
    assert probe.calls == before


@pytest.mark.parametrize("good", [0, 3, 6, np.int64(7), torch.tensor(5)], ids=repr)
def test_restore_calls_takes_integers_modulo_the_period(good):
    probe = _probe()
    period = probe.every * probe.calls_per_step
    probe.restore_calls(good)
    assert type(probe.calls) is int and probe.calls == int(good) % period


def test_orthogonal_linear_takes_a_strided_nested_tensor_as_nn_linear_does():
    """A review found the width check reading the sizes of a strided nested tensor, which has none."""
    torch.manual_seed(0)
    layer = N.OrthogonalLinear(4, 3)
    nested = torch.nested.nested_tensor([torch.randn(2, 4), torch.randn(5, 4)])
    out = layer(nested)
    for piece, x in zip(out.unbind(), nested.unbind()):
        torch.testing.assert_close(piece, F.linear(x, layer.weight, layer.bias))


def test_orthogonal_linear_names_itself_for_a_jagged_nested_tensor_of_the_wrong_width():
    layer = N.OrthogonalLinear(4, 3)
    jagged = torch.nested.nested_tensor([torch.randn(2, 5), torch.randn(5, 5)], layout=torch.jagged)
    with pytest.raises(LayerArgumentError, match=r"in_features=4"):
        layer(jagged)
    right = torch.nested.nested_tensor([torch.randn(2, 4), torch.randn(5, 4)], layout=torch.jagged)
    for piece, x in zip(layer(right).unbind(), right.unbind()):
        torch.testing.assert_close(piece, F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("size", [5, -1, (3, 3)], ids=["5", "-1", "3x3"])
def test_convnorm_refuses_an_affine_kernel_size_without_affine(size):
    conv = nn.Conv2d(2, 2, 3, padding=1)
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    with pytest.raises(LayerArgumentError, match="affine_kernel_size.*affine is False"):
        N.ConvNormConv2d(conv, affine_kernel_size=size)
    assert all(torch.equal(before[k], v) for k, v in conv.state_dict().items())
    N.ConvNormConv2d(conv)  # the conv is still free to wrap (not marked by the refused call)
    assert N.ConvNormConv2d(nn.Conv2d(2, 2, 3, padding=1), affine=True, affine_kernel_size=size if size != -1 else 1)
