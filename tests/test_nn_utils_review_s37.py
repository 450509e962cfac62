"""Review of orthofx.nn.padding / precision / tracing against torch itself and slow references (session 37).

Every expectation is derived independently: the zero padding a conv reads from ``F.conv{d}d``'s own output,
circular padding and its adjoint from index loops, relative distances from exact rational arithmetic, non-finite
counts from a Python loop, autocast dtypes from ``nn.Conv2d``.
"""

import decimal
import itertools
import math
import warnings
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orthofx.errors import LayerArgumentError
from orthofx.nn.padding import (CircularFold, CircularPad, circular_fold, circular_pad, conv_zero_pads, flat_pads,
                                pairs, periodic_pad)
from orthofx.nn.precision import autocast_conv_dtype, describe_nonfinite, relative_distance
from orthofx.nn.tracing import in_func_transform, in_jvp, in_vmap

CONVS = {1: F.conv1d, 2: F.conv2d}


def _slow_pad(x, pads):
    """Entry ``j`` of a padded dimension of size ``n`` is ``x[(j - left) mod n]``, by an index loop."""
    d = len(pads)
    lead = x.dim() - d
    shape = list(x.shape[:lead]) + [x.shape[lead + i] + l + r for i, (l, r) in enumerate(pads)]
    y = torch.zeros(shape, dtype=x.dtype)
    for idx in itertools.product(*(range(m) for m in shape[lead:])):
        src = tuple((j - l) % x.shape[lead + i] for i, (j, (l, _)) in enumerate(zip(idx, pads)))
        y[(Ellipsis,) + idx] = x[(Ellipsis,) + src]
    return y


def _slow_fold(y, pads):
    """Entry ``j`` of a dimension of size ``n + l + r`` added onto entry ``(j - l) mod n``, in int64 / float64."""
    d = len(pads)
    lead = y.dim() - d
    sizes = [y.shape[lead + i] - l - r for i, (l, r) in enumerate(pads)]
    wide = torch.float64 if y.is_floating_point() else torch.int64
    out = torch.zeros(*y.shape[:lead], *sizes, dtype=wide)
    for idx in itertools.product(*(range(m) for m in y.shape[lead:])):
        dst = tuple((j - l) % n for j, (l, _), n in zip(idx, pads, sizes))
        out[(Ellipsis,) + dst] += y[(Ellipsis,) + idx].to(wide)
    return out


# ----------------------------------------------------------------------------------------------- conv_zero_pads

@pytest.mark.parametrize("d", [1, 2])
def test_conv_zero_pads_are_what_torch_convs_read(d):
    """F.pad by conv_zero_pads, then an unpadded conv, equals torch's conv with that padding (values and size),
    for 'same' with even kernels and dilations (the asymmetric split), 'valid', ints and per-dimension tuples,
    and the one-element tuples torch's convs broadcast to every dimension."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, *(7,) * d, dtype=torch.float64)
    for ks in itertools.product(range(1, 5), repeat=d):
        w = torch.randn(1, 1, *ks, dtype=torch.float64)
        for dil in itertools.product((1, 2), repeat=d):
            for pad in ("same", "valid", 0, 2, tuple(range(1, d + 1)), (1,)):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch: 'same' with an even kernel makes a padded copy
                    want = CONVS[d](x, w, padding=pad, dilation=dil)
                got = CONVS[d](F.pad(x, flat_pads(conv_zero_pads(pad, ks, dil))), w, dilation=dil)
                assert got.shape == want.shape and torch.allclose(got, want), (ks, dil, pad)


def test_conv_zero_pads_one_element_dilation_and_padding_of_a_module():
    """nn.Conv2d keeps a one-element padding / dilation as given ((1,), (2,)) and its forward applies it to both
    dimensions: the old code refused padding=(1,) and gave one pair of pads for two dimensions for
    padding='same', dilation=(2,)."""
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    for kwargs in ({"padding": (1,)}, {"padding": "same", "dilation": (2,)}, {"padding": (2,), "dilation": (2,)}):
        conv = nn.Conv2d(1, 1, (4, 3), bias=False, **kwargs).double()
        pads = conv_zero_pads(conv.padding, conv.kernel_size, conv.dilation, conv.stride)
        assert len(pads) == 2
        want = conv(x)
        got = F.conv2d(F.pad(x, flat_pads(pads)), conv.weight, dilation=conv.dilation)
        assert got.shape == want.shape and torch.allclose(got, want), kwargs


def test_conv_zero_pads_refuses_what_torch_refuses():
    for bad in (-1, 1.5, True, "SAME", None, (1, 2, 3)):
        with pytest.raises(LayerArgumentError):
            conv_zero_pads(bad, (3, 3), (1, 1))
    with pytest.raises(LayerArgumentError, match="stride 1"):
        conv_zero_pads("same", (3, 3), (1, 1), (1, 2))
    with pytest.raises(LayerArgumentError, match="dilation"):  # three dilations for two dimensions: was zipped away
        conv_zero_pads("same", (3, 3), (1, 2, 2))
    assert conv_zero_pads("same", (3, 3), (1, 1), (1,)) == ((1, 1), (1, 1))


# ------------------------------------------------------------------------------------- circular padding and fold

def test_circular_pad_and_fold_against_index_loops():
    """Values of circular_pad / periodic_pad / CircularPad (pads up to more than twice the size: wrapping more
    than once), the gradient of circular_pad and circular_fold as its adjoint, on small grids."""
    torch.manual_seed(1)
    for lead, sizes in (((), (3,)), ((2,), (1,)), ((2,), (3,)), ((1, 2), (2,)), ((1, 1, 2), (3,)),
                        ((2,), (2, 3)), ((1, 2), (1, 2))):
        d = len(sizes)
        grid = (0, 1, 2, 3, 7) if d == 1 else (0, 1, 4)
        for flat in itertools.product(grid, repeat=2 * d):
            pads = pairs(flat)
            x = torch.randn(*lead, *sizes, dtype=torch.float64, requires_grad=True)
            want = _slow_pad(x.detach(), pads)
            y = circular_pad(x, pads)
            assert torch.equal(y.detach(), want) and torch.equal(periodic_pad(x, pads).detach(), want)
            assert torch.equal(CircularPad(pads)(x).detach(), want)
            g = torch.randn_like(y)
            (gx,) = torch.autograd.grad(y, x, g)
            assert torch.allclose(gx, _slow_fold(g, pads))
            assert torch.allclose(circular_fold(g, pads), _slow_fold(g, pads))
            assert torch.allclose(CircularFold(pads)(g), _slow_fold(g, pads))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.uint8, torch.bool, torch.float16])
def test_circular_fold_keeps_the_dtype_on_both_routes(dtype):
    """Pads at most the size go through the slices-and-adds route, larger ones through the reshape-and-sum
    route; the latter returned int64 for int8 / uint8 / bool inputs. Integer sums wrap as the dtype does, a bool
    fold is a logical or."""
    torch.manual_seed(2)
    for pads in ([(1, 2)], [(5, 1)], [(1, 1), (3, 0)], [(7, 7), (1, 1)]):
        shape = (2, 3) + tuple(3 + l + r for l, r in pads)
        y = (torch.randn(shape) * 100).to(dtype) if dtype != torch.bool else torch.rand(shape) > 0.7
        got = circular_fold(y, pads)
        assert got.dtype == dtype, pads
        want = _slow_fold(y, pads)
        if dtype == torch.bool:
            want = want > 0
        elif dtype == torch.float16:
            assert torch.allclose(got.double(), want, rtol=2e-3, atol=0.5)
            continue
        else:
            want = want.to(dtype)  # the same wrap-around
        assert torch.equal(got, want), pads


def test_circular_fold_of_an_empty_dimension_without_pads_is_the_identity():
    """circular_pad keeps a size-0 dimension with no pads (F.pad's circular mode too); its adjoint did not, and
    refused "nothing to fold onto"."""
    for shape, pads in (((2, 3, 0), [(0, 0)]), ((2, 3, 0, 4), [(0, 0), (1, 1)]), ((2, 0, 5), [(0, 0), (2, 0)])):
        x = torch.randn(shape)
        assert tuple(circular_pad(x, pads).shape) == tuple(F.pad(x, flat_pads(pads), mode="circular").shape)
        y = circular_pad(x, pads)
        assert tuple(circular_fold(y, pads).shape) == shape
    with pytest.raises(LayerArgumentError, match="nothing to fold"):
        circular_fold(torch.randn(2, 3, 2), [(1, 1)])
    with pytest.raises(LayerArgumentError, match="empty dimension"):
        circular_pad(torch.randn(2, 3, 0), [(1, 0)])  # torch refuses it too ("wrapping around more than once")


def test_padding_modules_compile_export_and_transforms():
    """CircularPad / CircularFold (pads within and beyond the size) under fx, torch.compile(fullgraph=True),
    torch.export, vmap, jvp and double backward, against the eager values and the index loops."""
    class M(nn.Module):
        def __init__(self, pads):
            super().__init__()
            self.pad, self.fold = CircularPad(pads), CircularFold(pads, torch.randn(3, dtype=torch.float64))

        def forward(self, x):
            return self.fold(self.pad(x) * 2)

    torch.manual_seed(3)
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64)
    for pads in ([(1, 2), (0, 1)], [(5, 2), (1, 1)]):
        m = M(pads)
        want = _slow_fold(_slow_pad(x, pads) * 2, pads) + m.fold.bias.detach().reshape(-1, 1, 1)
        assert torch.allclose(m(x), want)
        assert torch.allclose(torch.fx.symbolic_trace(m)(x), want)
        assert torch.allclose(torch.compile(m, fullgraph=True, backend="aot_eager")(x), want)
        assert torch.allclose(torch.export.export(m, (x,)).module()(x), want)

        def f(t):
            return circular_fold(circular_pad(t, pads) ** 2, pads)
        xs = x[:, :1]
        assert torch.allclose(torch.func.vmap(f)(xs), torch.stack([f(t) for t in xs]))
        jac = torch.autograd.functional.jacobian(f, xs)
        tangent = torch.randn_like(xs)
        _, jv = torch.func.jvp(f, (xs,), (tangent,))
        assert torch.allclose(jv, (jac.reshape(jv.numel(), -1) @ tangent.reshape(-1)).reshape(jv.shape))
        assert torch.autograd.gradgradcheck(f, (xs[:1].clone().requires_grad_(),))


def test_padding_modules_trace_save_and_load_with_torch_jit():
    """jit.trace recorded the eager autograd.Functions as Python calls, which torch.jit.save refused ("Could not
    export Python function call '_CircularPad'"), for a frozen transposed orthogonal layer too; traced, they are
    plain ops now (values checked against the index loops on another input after a save / load round trip)."""
    import io
    torch.manual_seed(6)
    for module, shape in ((CircularPad([(1, 2), (2, 1)]), (2, 3, 5, 5)), (CircularFold([(1, 2), (2, 1)]), (2, 3, 8, 8)),
                          (CircularFold([(4, 1)]), (2, 3, 7))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.trace(module, (torch.randn(shape),))
            buffer = io.BytesIO()
            torch.jit.save(traced, buffer)
            buffer.seek(0)
            loaded = torch.jit.load(buffer)
        y = torch.randn(shape, dtype=torch.float64).float()
        slow = _slow_pad if isinstance(module, CircularPad) else _slow_fold
        assert torch.allclose(loaded(y).double(), slow(y.double(), module.pads), atol=1e-6)


def test_circular_fold_in_a_torchscript_onnx_export():
    """The TorchScript ONNX exporter (torch.onnx.export(dynamo=False)) inlined _CircularFold's in-place adds on
    slices wrongly: a frozen OrthogonalConvTranspose2d's ONNX graph was off by ~1 with no error."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import io
    torch.manual_seed(7)
    module = CircularFold([(1, 2), (2, 1)], torch.randn(3))
    x = torch.randn(2, 3, 8, 8)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), buffer, dynamo=False)
    session = ort.InferenceSession(buffer.getvalue())
    y = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: y.float().numpy()})[0])
    want = _slow_fold(y, module.pads) + module.bias.detach().double().reshape(-1, 1, 1)
    assert torch.allclose(got.double(), want, atol=1e-5)


def test_circular_fold_exports_with_a_dynamic_spatial_size():
    """torch.export with a dynamic spatial size: the reshape-to-(m, n) route's size guards could not be proved
    ("Expected an equality constraint"); pads at most n take slices and zero pads."""
    module = CircularFold([(1, 2)])
    n = torch.export.Dim("n", min=6, max=64)
    program = torch.export.export(module, (torch.randn(2, 3, 9),), dynamic_shapes=({2: n},))
    for size in (7, 12):
        y = torch.randn(2, 3, size, dtype=torch.float64).float()
        assert torch.allclose(program.module()(y).double(), _slow_fold(y.double(), [(1, 2)]), atol=1e-6)


# ------------------------------------------------------------------------------------------------------ precision

def _exact_relative_distance(value, reference):
    """sqrt(sum |v - r|^2 / sum |r|^2) in exact rationals (a 60-digit square root), or None where undefined."""
    v = [complex(z) for z in value.flatten().tolist()]
    r = [complex(z) for z in reference.flatten().tolist()]
    parts = [p for z in v + r for p in (z.real, z.imag)]
    if not r or any(not math.isfinite(p) for p in parts) or all(z == 0 for z in r):
        return None
    num = sum((Fraction(a.real) - Fraction(b.real)) ** 2 + (Fraction(a.imag) - Fraction(b.imag)) ** 2
              for a, b in zip(v, r))
    den = sum(Fraction(b.real) ** 2 + Fraction(b.imag) ** 2 for b in r)
    ctx = decimal.Context(prec=60, Emax=10 ** 6, Emin=-10 ** 6)
    q = num / den
    out = float(ctx.sqrt(ctx.divide(decimal.Decimal(q.numerator), decimal.Decimal(q.denominator))))
    return out if math.isfinite(out) else None


def _assert_distance(value, reference):
    got, want = relative_distance(value, reference), _exact_relative_distance(value, reference)
    assert (got is None) == (want is None), (value, reference, got, want)
    if want is not None:
        assert math.isclose(got, want, rel_tol=1e-9), (value, reference, got, want)


def test_relative_distance_across_the_float64_range():
    g = torch.Generator().manual_seed(4)
    for trial in range(300):
        n = int(torch.randint(1, 5, (1,), generator=g))
        scales = 10.0 ** torch.randint(-320, 309, (2,), generator=g).double()
        v = torch.randn(n, generator=g, dtype=torch.float64) * scales[0]
        r = torch.randn(n, generator=g, dtype=torch.float64) * scales[1]
        if trial % 5 == 0:
            v = r * (1 + 1e-9 * torch.randn(n, generator=g, dtype=torch.float64))
        if trial % 7 == 0:
            r[0] = 0.0
        for dtype in (torch.float64, torch.float32):
            _assert_distance(v.to(dtype), r.to(dtype))
    for v, r in (([1.0, float("nan")], [1.0, 2.0]), ([1.0, 2.0], [float("inf"), 1.0]), ([1.0], [0.0]), ([], [])):
        _assert_distance(torch.tensor(v), torch.tensor(r))


def test_relative_distance_of_complex_tensors_counts_the_imaginary_parts():
    """The float64 cast dropped the imaginary parts (and warned): tensors differing only there were at distance
    0. Complex arguments are not written, a complex128 one (viewed as real) included."""
    torch.manual_seed(5)
    a = torch.randn(4, dtype=torch.complex128)
    b = a + 1j * torch.randn(4, dtype=torch.float64)
    a0, b0 = a.clone(), b.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for v, r in ((a, b), (a.to(torch.complex64), b.to(torch.complex64)), (a.real, b), (a, b.real),
                     (a.conj(), b), (torch.zeros(3, dtype=torch.complex64), torch.tensor([3j, 4.0, 0]))):
            _assert_distance(v, r)
    assert relative_distance(a, b) > 0.1
    assert torch.equal(a, a0) and torch.equal(b, b0)


def test_relative_distance_of_tensors_that_require_grad():
    """A parameter's distance: a number, with no warning about float() of a tensor that requires grad, no graph,
    and the arguments unchanged (in place on float64 copies only)."""
    w = nn.Parameter(torch.tensor([3.0, 4.0]))
    r = torch.tensor([3.0, 5.0], requires_grad=True)
    w64 = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isclose(relative_distance(w, r), 1 / math.sqrt(34), rel_tol=1e-12)
        assert math.isclose(relative_distance(r, w), 0.2, rel_tol=1e-12)
        assert math.isclose(relative_distance(w64, w64.detach() * 2), 0.5, rel_tol=1e-12)
    assert torch.equal(w.detach(), torch.tensor([3.0, 4.0])) and torch.equal(r.detach(), torch.tensor([3.0, 5.0]))
    assert torch.equal(w64.detach(), torch.tensor([3.0, 4.0], dtype=torch.float64))


def _counted(t):
    values = [complex(z) for z in t.flatten().tolist()]
    nan = sum(1 for z in values if math.isnan(z.real) or math.isnan(z.imag))
    inf = sum(1 for z in values if not (math.isnan(z.real) or math.isnan(z.imag))
              and (math.isinf(z.real) or math.isinf(z.imag)))
    if not nan + inf:
        return None
    counts = " and ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "inf")) if n)
    return f"{counts} {'entry' if nan + inf == 1 else 'entries'} (of {len(values)})"


def test_describe_nonfinite_against_a_python_count():
    """NaN / inf / -inf mixes, values whose sum overflows (float16 6e4, float32 3e38) though each is finite,
    complex entries with a non-finite part, empty, integer, bool and meta tensors."""
    nan, inf = float("nan"), float("inf")
    pool = [0.0, -2.5, nan, inf, -inf, 6e4, 3e38]
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for n in range(4):
            for values in itertools.product(pool, repeat=n):
                t = torch.tensor(values, dtype=torch.float64).to(dtype)
                assert describe_nonfinite(t) == _counted(t), (dtype, values)
    cpool = [complex(a, b) for a in (0.0, nan, inf, 3e38) for b in (0.0, nan, -inf)]
    for dtype in (torch.complex64, torch.complex128):
        for values in itertools.product(cpool, repeat=2):
            t = torch.tensor(values, dtype=torch.complex128).to(dtype)
            assert describe_nonfinite(t) == _counted(t), (dtype, values)
    t = torch.tensor([[nan, 1.0], [inf, 2.0]]).t()  # not contiguous
    assert describe_nonfinite(t) == "1 NaN and 1 inf entries (of 4)"
    for t in (torch.zeros(0), torch.ones(3, dtype=torch.int64), torch.ones(2, dtype=torch.bool),
              torch.empty(3, device="meta")):
        assert describe_nonfinite(t) is None


def test_describe_nonfinite_of_float8_tensors():
    """torch's CPU sum and isfinite refuse most float8 dtypes (NotImplementedError escaped from a report of a
    model holding a float8 buffer); each float8 value, NaN and inf included, is exact in float32."""
    values = torch.tensor([1.0, float("nan"), 2.0, float("inf"), -float("inf"), 0.5])
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"):
        dtype = getattr(torch, name, None)
        if dtype is None:
            continue
        t = values.to(dtype)
        assert describe_nonfinite(t) == _counted(t.float()), name
        assert describe_nonfinite(torch.ones(3).to(dtype)) is None, name


@pytest.mark.parametrize("autocast", [None, torch.bfloat16, torch.float16])
def test_autocast_conv_dtype_is_what_a_conv_returns(autocast):
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        conv = nn.Conv2d(2, 2, 3).to(dtype)
        x = torch.randn(1, 2, 5, 5, dtype=dtype)
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            assert autocast_conv_dtype(x) == conv(x).dtype, (autocast, dtype)


# -------------------------------------------------------------------------------------------------------- tracing

def test_transform_queries_under_each_torch_func_transform():
    """(in_func_transform, in_vmap, in_jvp) as seen from inside the function each transform runs."""
    seen = []

    def probe(t):
        seen.append((in_func_transform(), in_vmap(), in_jvp()))
        return t.sin()

    x = torch.randn(3)
    cases = {
        "eager": (lambda: probe(x), (False, False, False)),
        "vmap": (lambda: torch.func.vmap(probe)(x), (True, True, False)),
        "grad": (lambda: torch.func.grad(lambda t: probe(t).sum())(x), (True, False, False)),
        "jvp": (lambda: torch.func.jvp(probe, (x,), (x,)), (True, False, True)),
        "jacfwd": (lambda: torch.func.jacfwd(probe)(x), (True, True, True)),
        "vmap(grad)": (lambda: torch.func.vmap(torch.func.grad(lambda t: probe(t).sum()))(x[None]),
                       (True, True, False)),
        "hessian": (lambda: torch.func.hessian(lambda t: probe(t).sum())(x), (True, True, True)),
    }
    for name, (run, want) in cases.items():
        seen.clear()
        run()
        assert seen == [want], name
