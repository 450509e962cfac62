"""Session 29, transform latency: the faster forms of ``relative_distance`` (in-place float64 temporaries, one-pass
peak), ``describe_nonfinite`` (a finite sum clears the tensor), the polar factor's finiteness check (the Gram
diagonal first) and ``_unit_scaled`` (peak from amax / amin), ``lorth``'s tap trimming (skipped for one-tap kernels)
and ``isometric_init``'s defect (no division by a scale of 1) give the same numbers, bit for bit, as the computations
they replace, written out here independently; and the figures the orthogonal preset reports agree with a dense
float64 computation."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import orthofx
from orthofx import metrics
from orthofx.errors import LayerArgumentError
from orthofx.nn import stiefel
from orthofx.nn.orthogonal import OrthogonalConv2d
from orthofx.nn.precision import describe_nonfinite, relative_distance
from references import lorth64, polar64

pytestmark = pytest.mark.usefixtures("one_thread")


def _same_float(a, b) -> bool:
    """Equal floats, NaN equal to NaN and the sign of zero compared (a report prints -0.0)."""
    if a is None or b is None:
        return a is None and b is None
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


# ------------------------------------------------------------------------------------------- relative_distance


def _old_scaled_norm(x: torch.Tensor) -> tuple[float, float]:
    """The session-28 form: a full |x| for the peak, a fresh buffer for x / peak."""
    peak = float(x.abs().amax()) if x.numel() else 0.0
    if peak == 0.0 or not math.isfinite(peak):
        return peak, 1.0
    return peak, float(torch.linalg.vector_norm(x / peak))


def _old_relative_distance(value: torch.Tensor, reference: torch.Tensor) -> float | None:
    value, reference = value.to(torch.float64), reference.to(torch.float64)
    peak, norm = _old_scaled_norm(reference)
    if peak == 0.0 or not math.isfinite(peak):
        return None
    gap_peak, gap_norm = _old_scaled_norm(value - reference)
    ratio = (gap_peak / peak) * (gap_norm / norm)
    return ratio if math.isfinite(ratio) else None


def _pairs():
    g = torch.Generator().manual_seed(29)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for shape in ((7,), (5, 3, 3, 3), (64, 32, 1, 1), (2, 0, 3)):
            ref = torch.randn(*shape, generator=g, dtype=torch.float64)
            yield ref.add(0.01 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype), ref.to(dtype)
    big = torch.tensor([3e200, -4e200, 1e-200], dtype=torch.float64)
    tiny = torch.tensor([3e-200, 4e-200, 0.0], dtype=torch.float64)
    yield big * 0.5, big
    yield tiny * 2, tiny
    yield torch.zeros(3, dtype=torch.float64), big                    # a gap equal to -reference
    yield torch.tensor([1.0, -2.0]), torch.tensor([1.0, -2.0])        # no gap: 0.0, not -0.0
    yield torch.tensor([-0.0, -0.0]), torch.tensor([0.0, -0.0])       # a gap of signed zeros, zero reference
    yield torch.tensor([1.0, 2.0]), torch.zeros(2)                    # zero reference: None
    yield torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0])
    yield torch.tensor([1.0, 2.0]), torch.tensor([float("inf"), 2.0])
    yield torch.tensor([1.0, 2.0]), torch.tensor([float("nan"), 2.0])
    yield torch.tensor([3e38, -3e38], dtype=torch.float32), torch.tensor([-3e38, 3e38], dtype=torch.float32)
    yield torch.randn(4, 1, generator=g), torch.randn(4, 5, generator=g)   # value broadcast against reference
    yield torch.randn(4, 5, generator=g), torch.randn(1, 5, generator=g)   # reference broadcast


@pytest.mark.parametrize("value, reference", list(_pairs()))
def test_relative_distance_gives_the_old_computation_bit_for_bit(value, reference):
    assert _same_float(relative_distance(value, reference), _old_relative_distance(value, reference))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relative_distance_leaves_its_arguments_alone(dtype):
    """The float64 copies it makes are reused in place; float64 arguments are the copies themselves and must not be
    written (a layer's kernel and the conv's weight are passed)."""
    g = torch.Generator().manual_seed(3)
    value, reference = torch.randn(6, 4, generator=g, dtype=dtype), torch.randn(6, 4, generator=g, dtype=dtype)
    before = value.clone(), reference.clone()
    first = relative_distance(value, reference)
    assert _bits_equal(value, before[0]) and _bits_equal(reference, before[1])
    assert _same_float(relative_distance(value, reference), first)
    same = relative_distance(value, value)  # one tensor as both arguments
    assert same == 0.0 and math.copysign(1.0, same) == 1.0 and _bits_equal(value, before[0])


def test_relative_distance_matches_its_definition():
    g = torch.Generator().manual_seed(5)
    value, reference = torch.randn(30, 20, generator=g), torch.randn(30, 20, generator=g)
    v, r = value.double(), reference.double()
    exact = float(((v - r).square().sum() / r.square().sum()).sqrt())
    assert relative_distance(value, reference) == pytest.approx(exact, rel=1e-14)


# ------------------------------------------------------------------------------------------- describe_nonfinite


def _counted(tensor: torch.Tensor) -> str | None:
    """NaN and inf entries counted one by one (a slow loop over the flat values)."""
    values = tensor.reshape(-1).tolist()
    if tensor.is_complex():
        nan = sum(math.isnan(v.real) or math.isnan(v.imag) for v in values)
        inf = sum(not (math.isnan(v.real) or math.isnan(v.imag)) and (math.isinf(v.real) or math.isinf(v.imag))
                  for v in values)
    else:
        nan = sum(math.isnan(v) for v in values)
        inf = sum(math.isinf(v) for v in values)
    if not nan + inf:
        return None
    counts = " and ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "inf")) if n)
    return f"{counts} {'entry' if nan + inf == 1 else 'entries'} (of {len(values)})"


@pytest.mark.parametrize("values, dtype", [
    ([1.0, 2.0, 3.0], torch.float32),
    ([3e38, 3e38, -1.0], torch.float32),                 # finite entries whose sum overflows: still finite
    ([3e38, 3e38, float("nan")], torch.float32),
    ([6e4, 6e4, 1.0], torch.float16),                     # float16's sum overflows too
    ([6e4, float("inf"), -float("inf")], torch.float16),  # inf - inf: the sum is NaN, two inf entries
    ([1e308, 1e308], torch.float64),
    ([1.0, float("nan"), float("inf"), -float("inf")], torch.float64),
    ([1.0, 2.0], torch.bfloat16),
    ([float("inf")], torch.bfloat16),
    ([], torch.float32),
])
def test_describe_nonfinite_counts_as_a_loop_does(values, dtype):
    tensor = torch.tensor(values, dtype=dtype)
    assert describe_nonfinite(tensor) == _counted(tensor)


def test_describe_nonfinite_of_complex_and_non_float_tensors():
    z = torch.tensor([1 + 1j, complex(1, float("nan")), complex(float("inf"), 0)], dtype=torch.complex64)
    assert describe_nonfinite(z) == _counted(z) == "1 NaN and 1 inf entries (of 3)"
    assert describe_nonfinite(torch.tensor([1e38 + 0j, 3e38 + 3e38j], dtype=torch.complex64)) is None
    assert describe_nonfinite(torch.arange(4)) is None
    assert describe_nonfinite(torch.empty(3, device="meta")) is None


# ------------------------------------------------------------------------------------------- polar factor


def _old_unit_scaled(a: torch.Tensor) -> torch.Tensor:
    peak = a.abs().amax(dim=(-2, -1), keepdim=True)
    _, exponent = torch.frexp(peak)
    if not bool(exponent.any()):
        return a
    half = torch.div(exponent, 2, rounding_mode="floor")
    two = torch.full_like(peak, 2.0)
    return a * two.pow(-half) * two.pow(half - exponent)


def _matrices():
    g = torch.Generator().manual_seed(11)
    for dtype in (torch.float32, torch.float64):
        yield torch.randn(40, 12, generator=g, dtype=dtype) * 0.03
        yield (torch.randn(12, 40, generator=g, dtype=dtype) * 7).mT          # a transposed view
        scales = torch.tensor([1e-3, 1.0, 1e3], dtype=dtype)[:, None, None]  # one exponent per matrix
        yield torch.randn(3, 9, 5, generator=g, dtype=dtype) * scales
        yield torch.full((4, 3), -0.0, dtype=dtype)
        yield torch.zeros(2, 4, 3, dtype=dtype)
        yield torch.tensor([[-0.75, 0.1], [0.2, 0.3]], dtype=dtype)          # peak in [1/2, 1): unchanged
    yield torch.tensor([[1e-40, -3e-42], [2e-41, 0.0]], dtype=torch.float32)  # subnormal peak
    yield torch.tensor([[1e200, -3e250], [2e-300, 1.0]], dtype=torch.float64)
    yield torch.tensor([[-1e-310, 3e-320], [0.0, 1e-315]], dtype=torch.float64)


@pytest.mark.parametrize("a", list(_matrices()))
def test_unit_scaled_gives_the_old_computation_bit_for_bit(a):
    new, old = stiefel._unit_scaled(a), _old_unit_scaled(a)
    assert _bits_equal(new, old)
    assert (new is a) == (old is a)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_polar_factor_still_refuses_nan_and_inf_entries(bad, dtype):
    a = torch.randn(6, 4, dtype=dtype, generator=torch.Generator().manual_seed(1))
    a[2, 1] = bad
    with pytest.raises(LayerArgumentError, match="NaN or inf entries"):
        stiefel.project_to_stiefel(a)
    with pytest.raises(LayerArgumentError, match="NaN or inf entries"):
        stiefel.project_to_stiefel(a.mT.contiguous())  # wide: the Gram matrix of the other side


def test_the_polar_factor_of_finite_entries_whose_gram_overflows():
    """A Gram diagonal that overflows from finite entries is not taken for a NaN or inf entry: the full check
    clears the matrix, and the power-of-two scaling gives its polar factor."""
    g = torch.Generator().manual_seed(2)
    for a in (torch.randn(7, 3, generator=g) * 1e30, torch.randn(5, 4, generator=g, dtype=torch.float64) * 1e200):
        assert not bool(torch.isfinite((a.mT @ a).diagonal()).all())
        q = stiefel.project_to_stiefel(a)
        tolerance = 1e-5 if a.dtype == torch.float32 else 1e-12
        scale = 2.0 ** -700 if a.dtype == torch.float64 else 1.0  # exact; the SVD of entries ~1e200 overflows
        assert torch.allclose(q.double(), polar64(a.double() * scale), atol=tolerance)


# ------------------------------------------------------------------------------------------- lorth, isometric


@pytest.mark.parametrize("shape, groups", [((16, 8, 1, 1), 1), ((8, 16, 1, 1), 1), ((12, 6, 1, 1), 3),
                                           ((6, 4, 1), 1), ((4, 4, 1, 1, 1), 2)])
def test_lorth_of_one_tap_kernels_without_the_trimming(shape, groups):
    """One-tap kernels skip the border trimming: the value is that of the kernel's matrix as a Linear (the same
    products) and the dense definition."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    value = float(metrics.lorth(w, groups=groups))
    assert value == pytest.approx(lorth64(w, groups=groups), rel=1e-12)
    if groups == 1:
        assert value == float(metrics.lorth(w.reshape(shape[0], shape[1])))
    zero = torch.zeros(*shape)
    assert float(metrics.lorth(zero, groups=groups)) == pytest.approx(lorth64(zero, groups=groups))


def test_isometric_init_figures_are_those_of_the_weights():
    """The defect before the write is L_orth of the original weight (no division by the scale 1), after it that of the
    written block, for convs; max |W^T W - I| for a Linear."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 1), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 25, 6))
    originals = [m.weight.detach().clone() for m in (model[0], model[1], model[3])]
    gm = orthofx.transform(model, "isometric", example_inputs=(torch.randn(1, 4, 5, 5),))
    changes = {c.site: c for c in orthofx.manifest_of(gm).changes if c.pass_name == "isometric_init"}
    assert changes["0"].before["lorth"] == float(metrics.lorth(originals[0]))
    assert changes["0"].before["lorth"] == pytest.approx(lorth64(originals[0]), rel=1e-5)
    assert changes["1"].before["lorth"] == pytest.approx(lorth64(originals[1]), rel=1e-5)
    w = originals[2].double()
    assert changes["3"].before["orth_defect"] == pytest.approx(
        float((w @ w.T - torch.eye(6, dtype=torch.float64)).abs().max()), rel=1e-12)
    assert changes["1"].after["lorth"] < 1e-10


# ------------------------------------------------------------------------------------------- orthogonal preset


def test_orthogonal_layer_figures_match_a_dense_float64_computation():
    """``init_error`` and the pass's ``output_change`` (both through relative_distance) against the distances computed
    here in float64 from the layers' kernels and outputs."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 1))
    x = torch.randn(2, 8, 6, 6)
    gm = orthofx.transform(model, "orthogonal", example_inputs=(x,))
    changes = {c.site: c for c in orthofx.manifest_of(gm).changes}
    inputs = {"0": x, "2": torch.relu(model[0](x))}
    for name in ("0", "2"):
        old, new = model.get_submodule(name), gm.get_submodule(name)
        k, k0 = new.weight.detach().double(), old.weight.detach().double()
        # the training-mode kernel is rebuilt by the block product, init_error's by the shift: equal to rounding
        assert changes[name].after["init_error"] == pytest.approx(float((k - k0).norm() / k0.norm()), rel=1e-6)
        with torch.no_grad():
            y0, y = old(inputs[name]).double(), new(inputs[name]).double()
        assert changes[name].after["output_change"] == pytest.approx(float((y - y0).norm() / y0.norm()), rel=1e-6)


def test_from_conv_still_refuses_a_weight_with_nan_or_inf():
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("inf")
        conv.weight[1, 0, 0, 0] = float("nan")
    with pytest.raises(LayerArgumentError, match="1 NaN and 1 inf entries"):
        OrthogonalConv2d.from_conv(conv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(orthofx.TransformError, match="1 NaN and 1 inf entries"):
            orthofx.transform(torch.nn.Sequential(conv), "orthogonal")
