"""Regressions from fuzzing how orthogonal layers are built from existing weights, and how the passes that start
from a weight (orthogonal_conv, riemannian's ``init: project``, isometric_init's report) handle degenerate and
extreme originals: zero, NaN / inf, float64 entries near the ends of the range, float16 outputs. References are
float64 SVDs and plain torch computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import LayerArgumentError, TransformError
from orthofx.nn import stiefel
from orthofx.nn.orthogonal import OrthogonalConv2d, OrthogonalLinear
from references import bitwise_equal, state_copy


def _polar_reference(w: torch.Tensor) -> torch.Tensor:
    """``U V^T`` of the float64 thin SVD of ``w`` divided by its largest entry (the same polar factor)."""
    w = w.to(torch.float64)
    u, _, vh = torch.linalg.svd(w / w.abs().amax(), full_matrices=False)
    return u @ vh


def _relative_reference(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``||value - reference|| / ||reference||`` in float64, both norms of tensors scaled to a largest entry 1."""
    value, reference = value.to(torch.float64), reference.to(torch.float64)
    gap = value - reference
    gap_peak, peak = float(gap.abs().amax()), float(reference.abs().amax())
    return (gap_peak / peak) * float((gap / gap_peak).norm()) / float((reference / peak).norm())


def _defect64(q: torch.Tensor) -> float:
    q = q.to(torch.float64)
    q = q.mT if q.shape[-2] < q.shape[-1] else q
    return float((q.mT @ q - torch.eye(q.shape[-1], dtype=torch.float64)).abs().max())


# ------------------------------------------------------------------------------------------ init_error


@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (1, 1)])
def test_from_linear_of_a_zero_weight_has_no_init_error(shape):
    # a relative distance to a zero weight is undefined: it was ||W|| / 1e-300, about 1e300
    linear = nn.Linear(shape[1], shape[0])
    with torch.no_grad():
        linear.weight.zero_()
    before = state_copy(linear)
    layer = OrthogonalLinear.from_linear(linear)
    assert layer.init_error is None
    w = layer.weight.detach().double()
    assert _defect64(w) < 1e-6
    # every orthonormal matrix is nearest to 0: the distance is sqrt(min(m, n))
    assert float(w.norm()) == pytest.approx(math.sqrt(min(shape)), rel=1e-6)
    assert bitwise_equal(before, state_copy(linear))


@pytest.mark.parametrize("method", ["auto", "cayley_fft"])
@pytest.mark.parametrize("init", ["nearest", "random"])
def test_from_conv_of_a_zero_weight_has_no_init_error(method, init):
    conv = nn.Conv2d(4, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.zero_()
    extra = {"input_size": (8, 8)} if method == "cayley_fft" else {"fit_steps": 0}
    layer = OrthogonalConv2d.from_conv(conv, init=init, method=method, **extra)
    assert layer.init_error is None
    assert layer.orthogonality_error((8, 8)) < 1e-5


@pytest.mark.parametrize("scale", [1e-200, 1e200])
def test_from_linear_init_error_of_float64_weights_at_the_ends_of_the_range(scale):
    # 1e-200: the float64 norm of the weight underflowed to 0 (init_error 2e300); 1e200: its Gram matrix was
    # infinite and eigh failed inside LAPACK
    torch.manual_seed(0)
    linear = nn.Linear(4, 6, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.mul_(scale)
    before = state_copy(linear)
    layer = OrthogonalLinear.from_linear(linear)
    w0 = linear.weight.detach()
    w = layer.weight.detach()
    assert torch.allclose(w, _polar_reference(w0), atol=1e-12)
    assert layer.init_error == pytest.approx(_relative_reference(w, w0), rel=1e-12)
    assert bitwise_equal(before, state_copy(linear))


@pytest.mark.parametrize("method", ["auto", "cayley_fft"])
def test_from_conv_init_error_of_a_huge_float64_kernel(method):
    # the closed-form start's polar factor failed in eigh (bcop), the operator distance was inf / inf (cayley_fft)
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 4, 3, padding=1, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.mul_(1e200)
    extra = {"input_size": (8, 8)} if method == "cayley_fft" else {"fit_steps": 0}
    layer = OrthogonalConv2d.from_conv(conv, method=method, **extra)
    assert layer.orthogonality_error((8, 8)) < 1e-12
    assert layer.init_error is not None and math.isfinite(layer.init_error)
    if method == "auto":
        # reference: the relative distance of the kernels, computed on tensors scaled to a largest entry 1
        assert layer.init_error == pytest.approx(_relative_reference(layer.weight.detach(), conv.weight.detach()),
                                                 rel=1e-9)
    else:
        # the kernel (unit size) is negligible next to 1e200 taps: the distance is the original's own norm
        assert layer.init_error == pytest.approx(1.0, rel=1e-9)


# ------------------------------------------------------------------------------------------ polar factor


@pytest.mark.parametrize("scale", [1e160, 1e300])
def test_project_to_stiefel_of_huge_float64_matrices(scale):
    # far from the manifold the Gram route squared the entries: inf, and a raw LAPACK error from eigh
    torch.manual_seed(2)
    batch = torch.randn(3, 6, 4, dtype=torch.float64)
    batch[0] *= scale
    batch[1] *= scale / 7
    q = stiefel.project_to_stiefel(batch)
    assert bool(torch.isfinite(q).all())
    for i in range(3):
        assert torch.allclose(q[i], _polar_reference(batch[i]), atol=1e-12)
        assert _defect64(q[i]) < 1e-13
    wide = stiefel.project_to_stiefel(batch[0].mT.contiguous())
    assert torch.allclose(wide, _polar_reference(batch[0]).mT, atol=1e-12)


# ------------------------------------------------------------------------------------------ NaN / inf originals


@pytest.mark.parametrize("method", ["auto", "cayley_fft"])
def test_from_conv_nearest_refuses_a_weight_with_nan(method):
    # bcop's centre-window start never read the NaN tap: a layer with init_error NaN; cayley_fft: LAPACK's error
    conv = nn.Conv2d(4, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight[1, 2, 0, 0] = float("nan")
        conv.weight[0, 0, 2, 2] = float("inf")
    extra = {"input_size": (8, 8)} if method == "cayley_fft" else {"fit_steps": 0}
    with pytest.raises(LayerArgumentError, match=r"Conv2d's weight \(4, 4, 3, 3\) has 1 NaN and 1 inf entries "
                                                 r"\(of 144\).*init='random'"):
        OrthogonalConv2d.from_conv(conv, method=method, **extra)


def test_from_linear_nearest_refuses_an_infinite_float16_weight():
    # the message was the polar factor's, about a diverged training step
    linear = nn.Linear(6, 4).half()
    with torch.no_grad():
        linear.weight[0, 0] = float("inf")
    with pytest.raises(LayerArgumentError,
                       match=r"from_linear: the Linear's weight \(4, 6\) has 1 inf entry \(of 24\)"):
        OrthogonalLinear.from_linear(linear)


@pytest.mark.parametrize("method", ["auto", "cayley_fft"])
def test_from_conv_random_of_a_weight_with_nan_has_no_init_error(method):
    conv = nn.Conv2d(4, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight[1, 2, 0, 0] = float("nan")
    before = state_copy(conv)
    extra = {"input_size": (8, 8)} if method == "cayley_fft" else {}
    layer = OrthogonalConv2d.from_conv(conv, init="random", method=method, **extra)
    assert layer.init_error is None  # was NaN
    assert all(bool(torch.isfinite(p).all()) for p in layer.parameters())
    assert layer.orthogonality_error((8, 8)) < 1e-5
    assert bitwise_equal(before, state_copy(conv))


class _ConvHead(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, dtype=dtype)
        self.head = nn.Linear(4, 3, dtype=dtype)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


def _conv_rule(**params):
    return {"rules": [{"match": {"type": "Conv2d"}, "apply": "orthogonal_conv", "with": params}]}


def test_orthogonal_conv_pass_names_the_layer_whose_weight_has_nan():
    model = _ConvHead()
    with torch.no_grad():
        model.conv.weight[0, 0, 0, 0] = float("nan")  # a border tap: the old start did not read it
    before = state_copy(model)
    with pytest.raises(TransformError, match=r"conv \(Conv2d.*has 1 NaN entry \(of 144\).*'init: random'"):
        orthofx.transform(model, _conv_rule())
    assert bitwise_equal(before, state_copy(model))
    gm = orthofx.transform(model, _conv_rule(init="random"))
    change = orthofx.manifest_of(gm).changes[0]
    assert change.after["init_error"] is None


def test_orthogonal_conv_pass_output_change_of_a_zero_layer_is_none():
    # the original layer's output is 0: the relative change was ||y|| / 1e-30, about 1e31
    model = _ConvHead()
    with torch.no_grad():
        model.conv.weight.zero_()
        model.conv.bias.zero_()
    before = state_copy(model)
    gm = orthofx.transform(model, _conv_rule(), example_inputs=(torch.randn(2, 4, 6, 6),))
    after = orthofx.manifest_of(gm).changes[0].after
    assert after["init_error"] is None and after["output_change"] is None
    assert bitwise_equal(before, state_copy(model))


def test_orthogonal_conv_pass_output_change_of_a_float16_layer():
    # outputs of ~1e3 on 4 x 16 x 16 entries: the float16 norm overflowed, inf / inf = NaN
    torch.manual_seed(3)
    model = _ConvHead(torch.float16)
    with torch.no_grad():
        model.conv.weight.normal_(0.0, 10.0)
    x = (torch.randn(2, 4, 16, 16) * 30).half()
    with torch.no_grad():
        reference = model.conv(x)
    assert bool(torch.isfinite(reference).all()) and not math.isfinite(float(reference.norm()))
    gm = orthofx.transform(model, _conv_rule(), example_inputs=(x,))
    change = orthofx.manifest_of(gm).changes[0]
    with torch.no_grad():
        changed = gm.conv.eval()(x)
    expected = _relative_reference(changed, reference)
    # rel 1e-5: the kernel the pass ran and the one rebuilt here may differ by a float16 rounding
    assert change.after["output_change"] == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------ riemannian, isometric


def _linear_rule(pass_name):
    return {"rules": [{"match": {"type": "Linear"}, "apply": pass_name}]}


def test_riemannian_project_names_the_layer_whose_weight_has_nan():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.no_grad():
        model[1].weight[2, 2] = float("nan")
    before = state_copy(model)
    with pytest.raises(TransformError, match=r"riemannian \(rule .*\): 1: its weight has 1 NaN entry \(of 16\)"):
        orthofx.transform(model, _linear_rule("riemannian"))
    assert bitwise_equal(before, state_copy(model))


def test_riemannian_project_of_a_huge_float64_weight():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 5, dtype=torch.float64))
    with torch.no_grad():
        model[0].weight.mul_(1e200)
    before = state_copy(model)
    gm = orthofx.transform(model, _linear_rule("riemannian"))
    assert torch.allclose(gm.get_submodule("0").weight.detach(), _polar_reference(model[0].weight.detach()),
                          atol=1e-12)
    assert bitwise_equal(before, state_copy(model))


@pytest.mark.parametrize("pass_name", ["riemannian", "isometric_init"])
def test_before_orth_defect_of_a_huge_float32_weight_is_finite(pass_name):
    # max |W^T W - I| of entries ~1e30 is ~1e60: beyond float32, reported as NaN for a finite weight
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6))
    with torch.no_grad():
        model[0].weight.mul_(1e30)
    w = model[0].weight.detach().double()
    expected = float((w.T @ w - torch.eye(4, dtype=torch.float64)).abs().max())
    gm = orthofx.transform(model, _linear_rule(pass_name))
    before = orthofx.manifest_of(gm).changes[0].before["orth_defect"]
    assert before == pytest.approx(expected, rel=1e-12)


def test_riemannian_init_project_leaves_a_frozen_weight_as_it_is():
    """The isometric preset says layers with frozen weights are left as they are, but its Riemannian rule's
    init: project replaced a frozen square Linear's weight by its polar factor. A frozen weight now keeps its
    values bitwise; a trainable one next to it is still projected (orthonormal to float64 rounding)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
    model[0].weight.requires_grad_(False)
    frozen_before = model[0].weight.detach().clone()
    gm = orthofx.transform(model, "isometric", example_inputs=(torch.randn(3, 6),))
    assert torch.equal(gm.get_submodule("0").weight, frozen_before)
    trained = gm.get_submodule("2").weight.detach().double()
    assert float((trained.T @ trained - torch.eye(6, dtype=torch.float64)).abs().max()) < 1e-6
    what = {c.site: c.what for c in orthofx.manifest_of(gm).changes if c.pass_name == "riemannian"}
    assert "frozen" in what["0"] and "frozen" not in what["2"]
