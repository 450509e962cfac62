"""orthofx.report: rows per layer, exact singular values, existence, JSON and the spectra plot."""

import json
import math

import pytest
import torch
from torch import nn

import orthofx
from references import circular_operator64, lorth64

POLICY = {"rules": [{"match": {"type": ["Conv2d", "Linear"], "exclude": ["head"]}, "apply": "orth_regularizer"}]}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.ortho = nn.Conv2d(4, 4, 1, bias=False)
        self.down = nn.Conv2d(4, 8, 1, stride=2, bias=False)  # the ResNet strided shortcut: no orthogonal version
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.conv(self.down(self.ortho(x))).mean((2, 3)))


def build():
    torch.manual_seed(0)
    model = Net()
    q, _ = torch.linalg.qr(torch.randn(4, 4))
    with torch.no_grad():
        model.ortho.weight.copy_(q.view(4, 4, 1, 1))
    return model


def test_rows_cover_every_conv_and_linear_with_exact_singular_values():
    model = build()
    x = torch.randn(2, 4, 12, 12)
    rep = orthofx.report(orthofx.transform(model, POLICY, example_inputs=(x,)))
    rows = {r["site"]: r for r in rep.rows}
    assert list(rows) == ["ortho", "down", "conv", "head"]
    assert rows["ortho"]["sigma_min"] == pytest.approx(1.0, abs=1e-5)
    assert rows["ortho"]["sigma_max"] == pytest.approx(1.0, abs=1e-5)
    assert rows["ortho"]["lorth"] == pytest.approx(0.0, abs=1e-9)
    # the singular values of the dense circular operator on the 6 x 6 input the example gave the layer
    sv = torch.linalg.svdvals(circular_operator64(model.conv.weight, grid=(6, 6)))
    assert rows["conv"]["sigma_max"] == pytest.approx(float(sv.max()), rel=1e-6)
    assert rows["conv"]["sigma_min"] == pytest.approx(float(sv.min()), rel=1e-6)
    assert rows["conv"]["lorth"] == pytest.approx(lorth64(model.conv.weight), rel=1e-6)
    assert rows["down"]["lorth"] == pytest.approx(lorth64(model.down.weight, stride=2), rel=1e-6)
    assert rows["conv"]["input"] == (6, 6)
    assert rows["down"]["exists"].startswith("no")
    assert rows["conv"]["exists"].startswith("yes")
    assert rows["head"]["pass"] is None and rows["conv"]["pass"] == "orth_regularizer"
    text = str(rep)
    assert "Conv2d(4->8, k=1, s=2)" in text and "sigma_max" in text
    json.dumps(rep.to_dict())  # plain data


def test_report_without_example_inputs_leaves_conv_sigmas_blank():
    model = build()
    rep = orthofx.report(orthofx.transform(model, POLICY))
    rows = {r["site"]: r for r in rep.rows}
    assert rows["conv"]["sigma_max"] is None and rows["conv"]["sigma_min"] is None
    assert rows["conv"]["lorth"] == pytest.approx(lorth64(model.conv.weight), rel=1e-6)  # needs no input size
    sv = torch.linalg.svdvals(model.head.weight.detach().double())  # nor does a linear layer's spectrum
    assert rows["head"]["sigma_max"] == pytest.approx(float(sv.max()), rel=1e-6)
    assert rows["head"]["sigma_min"] == pytest.approx(float(sv.min()), rel=1e-6)


def test_penalty_summary_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    gm = orthofx.transform(build(), POLICY, example_inputs=(torch.randn(1, 4, 8, 8),))
    rep = orthofx.report(gm)
    assert rep.penalties and sum(p["weighted"] for p in rep.penalties) == pytest.approx(float(orthofx.penalty(gm)))
    path = rep.plot(str(tmp_path / "spectra.png"))
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ condition-number monitors

class Whiten(nn.Module):
    """Linear features, their covariance (+ eps I) and a ZCA whitening through torch.linalg.eigh."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 4, bias=False)

    def covariance(self, x):
        f = self.proj(x)
        centred = f - f.mean(0, keepdim=True)
        cov = centred.T @ centred / f.shape[0]
        return cov + torch.diag_embed(cov.new_full((4,), 0.05))

    def forward(self, x):
        evals, evecs = torch.linalg.eigh(self.covariance(x))
        f = self.proj(x)
        return (f - f.mean(0, keepdim=True)) @ (evecs * evals.rsqrt().unsqueeze(0)) @ evecs.T


SVD_POLICY = {"rules": [{"match": {"op": "linalg.eigh"}, "apply": "svd_conditioning",
                         "with": {"monitor": True}}]}


def _kappa64(model, x):
    """kappa of the matrix entering eigh, recomputed in float64 from the model's weights (independent of orthofx)."""
    w = model.proj.weight.detach().double()
    f = x.double() @ w.T
    centred = f - f.mean(0, keepdim=True)
    sigma = centred.T @ centred / f.shape[0] + 0.05 * torch.eye(4, dtype=torch.float64)
    lam = torch.linalg.eigvalsh(sigma)
    return float(lam.max() / lam.min())


def _monitored():
    import orthofx.passes.svd_conditioning  # noqa: F401  (registers the pass)

    torch.manual_seed(0)
    model = Whiten()
    generator = torch.Generator().manual_seed(1)
    scales = ([3.0, 1, 1, 0.3, 1, 1], [6.0, 1, 1, 0.1, 1, 1], [1.0] * 6)  # the largest kappa is not the last
    batches = [torch.randn(32, 6, generator=generator) * torch.tensor(scale) for scale in scales]
    gm = orthofx.transform(model, SVD_POLICY, example_inputs=(batches[0],))  # the check run: update 1
    gm(batches[1])
    # A NaN in the input: the stable eigh gives NaN outputs (no LAPACK error) and the monitor counts a NaN event.
    poisoned = batches[2].clone()
    poisoned[5, 2] = float("nan")
    assert torch.isnan(gm(poisoned)).all()
    gm(batches[2])
    return model, gm, batches


def test_monitored_site_rows_show_kappa_equal_to_an_independent_computation():
    model, gm, batches = _monitored()
    rep = orthofx.report(gm)
    row = next(r for r in rep.rows if "kappa" in r)
    assert row["site"].endswith("linalg.eigh")
    kappas = [_kappa64(model, x) for x in batches]
    assert max(kappas) > 1.5 * kappas[2]
    assert row["kappa"] == pytest.approx(kappas[2], rel=1e-4)
    assert row["kappa_max"] == pytest.approx(max(kappas), rel=1e-4)
    assert row["nan_events"] == 1 and row["inf_events"] == 0 and row["updates"] == 4
    history = rep.conditioning[row["site"]]
    assert len(history) == 4 and history[2] != history[2]  # the NaN call
    assert [history[0], history[1], history[3]] == pytest.approx(kappas[:2] + kappas[2:], rel=1e-4)
    text = str(rep)
    assert "kappa_max" in text and f"{row['kappa']:.4g}" in text
    data = rep.to_dict()
    assert data["rows"] == rep.rows and list(data["conditioning"]) == [row["site"]]
    # Reports of models without monitors keep their columns.
    assert "kappa" not in str(orthofx.report(orthofx.transform(build(), POLICY)))


def test_monitors_lists_the_figures_of_the_report_rows():
    from orthofx.report import monitors

    model, gm, batches = _monitored()
    found = monitors(gm)
    (row,) = [r for r in orthofx.report(gm).rows if "kappa" in r]
    (site,) = found
    assert site == row["site"]
    figures = found[site]
    for key in ("kappa", "kappa_max", "updates", "nan_events", "inf_events"):
        assert figures[key] == row[key]
    assert figures["kappa"] == pytest.approx(_kappa64(model, batches[2]), rel=1e-4)
    assert gm.get_submodule(figures["monitor"]).history[-1] == pytest.approx(figures["kappa"])
    assert monitors(nn.DataParallel(gm)) == found  # through wrappers
    assert orthofx.report.monitors(gm) == found  # orthofx.report is the function; the lookup hangs off it
    assert monitors(orthofx.freeze(gm)) == {}  # frozen: pass-throughs, nothing to read
    assert monitors(orthofx.transform(build(), POLICY)) == {}
    import orthofx.passes.svd_conditioning as svd_conditioning

    with pytest.raises(AttributeError, match="orthofx.report.monitors"):
        svd_conditioning.monitors  # noqa: B018 - moved (passes sit below the manifest lookup)


def test_monitored_site_before_any_call():
    import orthofx.passes.svd_conditioning  # noqa: F401

    torch.manual_seed(0)
    gm = orthofx.transform(Whiten(), SVD_POLICY)  # no example inputs: the monitor has not run
    row = next(r for r in orthofx.report(gm).rows if "kappa" in r)
    assert row["kappa"] is None and row["kappa_max"] is None and row["updates"] == 0


def test_plot_with_monitors_draws_the_kappa_panel(tmp_path):
    pytest.importorskip("matplotlib")
    _, gm, _ = _monitored()
    rep = orthofx.report(gm)
    assert rep.conditioning
    path = rep.plot(str(tmp_path / "report.png"))
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    # The figure with the second panel is wider than the spectra-only one.
    plain = orthofx.report(orthofx.transform(build(), POLICY, example_inputs=(torch.randn(1, 4, 8, 8),)))
    other = plain.plot(str(tmp_path / "spectra.png"))

    def width(p):
        with open(p, "rb") as handle:
            header = handle.read(24)
        return int.from_bytes(header[16:20], "big")

    assert width(path) > width(other)


def test_cayley_fft_rows_give_exact_sigmas_and_no_lorth():
    """A Cayley-FFT layer's weight is an n x n kernel on the n x n grid: its singular values there are exactly 1,
    while L_orth (defined for S n >= 2k - 1) would wrap around and report a non-zero value for an orthogonal layer."""
    torch.manual_seed(0)
    model = orthofx.models.get("small_cnn", width=4)
    x = orthofx.models.example_input("small_cnn", batch=2)
    policy = {"orthofx": 1, "rules": [{"match": {"type": "Conv2d"}, "apply": "orthogonal_conv",
                                       "with": {"method": "cayley_fft"}}]}
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    rows = {r["site"]: r for r in orthofx.report(gm).rows}
    for site in ("conv1", "conv2", "conv3"):
        assert rows[site]["lorth"] is None
        assert abs(rows[site]["sigma_min"] - 1) < 1e-5 and abs(rows[site]["sigma_max"] - 1) < 1e-5
        assert rows[site]["exists"].startswith("yes")
    assert rows["fc"]["lorth"] is not None


# ------------------------------------------------------------------------------ layers beyond square 2-D convs

NOTHING = {"rules": [{"match": {"name": "no_such_layer"}, "apply": "orth_regularizer", "optional": True}]}
CONV_FN = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}


def dense_circular(conv: nn.Module, size: tuple[int, ...]) -> torch.Tensor:
    """The circular operator of ``conv`` (bias left out) on an input grid ``size``, float64: the conv applied, with
    circular padding of D (k - 1) on the right, to every basis vector."""
    w = conv.weight.detach().double()
    d = len(size)
    C = conv.in_channels
    eye = torch.eye(C * math.prod(size), dtype=torch.float64).reshape(-1, C, *size)
    pad = []
    for k, dl in reversed(list(zip(conv.kernel_size, conv.dilation))):
        pad += [0, dl * (k - 1)]
    cols = CONV_FN[d](torch.nn.functional.pad(eye, pad, mode="circular"), w, stride=conv.stride,
                      dilation=conv.dilation, groups=conv.groups)
    return cols.reshape(cols.shape[0], -1).T


def theorem7_lorth(conv: nn.Module) -> float:
    """L_orth from the dense operator on the smallest N grid with S N >= 2 k_eff - 1 (P0 Theorem 7)."""
    eff = [dl * (k - 1) + 1 for k, dl in zip(conv.kernel_size, conv.dilation)]
    N = [math.ceil((2 * e - 1) / s) for e, s in zip(eff, conv.stride)]
    A = dense_circular(conv, tuple(n * s for n, s in zip(N, conv.stride)))
    ro = conv.out_channels <= conv.in_channels * math.prod(conv.stride)
    G = A @ A.T if ro else A.T @ A
    return float((G - torch.eye(G.shape[0], dtype=G.dtype)).square().sum()) / math.prod(N)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c3 = nn.Conv3d(2, 3, 2, bias=False)
        self.ns = nn.Conv2d(2, 4, (3, 1), stride=(2, 1), bias=False)
        self.dil = nn.Conv2d(2, 4, 2, stride=2, dilation=2, bias=False)

    def forward(self, v, x):
        return self.c3(v).mean() + self.ns(x).mean() + self.dil(x).mean()


def test_conv3d_non_square_stride_and_dilated_rows_against_the_dense_operator():
    torch.manual_seed(0)
    model = Mixed()
    v, x = torch.randn(1, 2, 4, 4, 4), torch.randn(1, 2, 8, 8)
    gm = orthofx.transform(model, NOTHING, example_inputs=(v, x))
    rows = {r["site"]: r for r in orthofx.report(gm).rows}
    assert set(rows) == {"c3", "ns", "dil"}  # the Conv3d had no row
    for site, size in (("c3", (4, 4, 4)), ("ns", (8, 8)), ("dil", (8, 8))):
        layer = getattr(model, site)
        sv = torch.linalg.svdvals(dense_circular(layer, size))
        assert rows[site]["input"] == size
        assert rows[site]["sigma_max"] == pytest.approx(float(sv.max()), rel=1e-9)
        assert rows[site]["sigma_min"] == pytest.approx(float(sv.min()), rel=1e-9, abs=1e-9)
        assert rows[site]["lorth"] == pytest.approx(theorem7_lorth(layer), rel=1e-9)
    # taps 0 and 2 of the dilated conv read one residue mod 2: rank <= 2 * 16 < 4 * 16 rows, no orthogonal version
    assert rows["dil"]["sigma_min"] == pytest.approx(0.0, abs=1e-9)
    assert rows["dil"]["exists"] == "no (RO)"
    assert rows["ns"]["exists"] == "yes (RO)" and rows["c3"]["exists"] == "yes (CO)"


CONV_T_FN = {1: torch.nn.functional.conv_transpose1d, 2: torch.nn.functional.conv_transpose2d,
             3: torch.nn.functional.conv_transpose3d}


def dense_circular_transposed(layer: nn.Module, size: tuple[int, ...]) -> torch.Tensor:
    """The circular operator of a ConvTranspose layer (bias left out) on an input grid ``size`` (output grid
    ``size * S``), float64: torch's transposed conv of every basis vector, without padding, its overflow beyond
    ``n S`` wrapped around (added modulo the output grid)."""
    w = layer.weight.detach().double()
    d = len(size)
    eye = torch.eye(layer.in_channels * math.prod(size), dtype=torch.float64).reshape(-1, layer.in_channels, *size)
    full = CONV_T_FN[d](eye, w, stride=layer.stride, dilation=layer.dilation, groups=layer.groups)
    out = tuple(n * s for n, s in zip(size, layer.stride))
    for axis, q in enumerate(out):
        dim = 2 + axis
        extra = (-full.shape[dim]) % q
        full = torch.nn.functional.pad(full, [0, 0] * (full.dim() - 1 - dim) + [0, extra])
        shape = list(full.shape)
        full = full.reshape(shape[:dim] + [shape[dim] // q, q] + shape[dim + 1:]).sum(dim)
    return full.reshape(full.shape[0], -1).T


class AllConvKinds(nn.Module):
    def __init__(self):
        super().__init__()
        self.t1 = nn.ConvTranspose1d(8, 2, 4, stride=2, padding=1, bias=False)
        self.t2 = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, padding=1, output_padding=1, bias=False)
        self.t3 = nn.ConvTranspose3d(2, 3, 2, bias=False)
        self.t2d = nn.ConvTranspose2d(2, 2, 2, stride=2, dilation=2, bias=False)
        self.c3 = nn.Conv3d(2, 3, 3, padding=1, bias=False)
        self.d1 = nn.Conv2d(2, 4, 3, padding=2, dilation=2, bias=False)
        self.d2 = nn.Conv2d(2, 4, 3, stride=2, padding=2, dilation=2, bias=False)

    def forward(self, a, x, v):
        return (self.t1(a).mean() + self.t2(torch.cat([x, x], 1)).mean() + self.t3(v).mean() + self.t2d(x).mean()
                + self.c3(v).mean() + self.d1(x).mean() + self.d2(x).mean())


def test_lorth_penalty_and_rows_of_transposed_3d_and_dilated_convs_against_the_dense_operator():
    """orth_regularizer covers ConvTranspose1d/2d/3d (the adjoint of the conv with the same weight), Conv3d and
    dilated convs: each term is N^d-normalised Frobenius error of the layer's own circular operator (Theorem 7),
    built here from torch's transposed / dilated convs; the report's sigma and L_orth columns match it too."""
    torch.manual_seed(0)
    model = AllConvKinds().double()
    a, x, v = torch.randn(1, 8, 6).double(), torch.randn(1, 2, 6, 6).double(), torch.randn(1, 2, 4, 4, 4).double()
    every = {"rules": [{"match": {"type": ["ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Conv3d",
                                           "Conv2d"]}, "apply": "orth_regularizer", "with": {"weight": 1.0}}]}
    gm = orthofx.transform(model, every, example_inputs=(a, x, v))
    terms = {k.split("/")[1]: float(t) for k, t in orthofx.penalty_terms(gm).items()}
    assert set(terms) == {"t1", "t2", "t3", "t2d", "c3", "d1", "d2"}
    rows = {r["site"]: r for r in orthofx.report(gm).rows}
    for site in ("t1", "t2", "t3", "t2d"):
        layer = getattr(model, site)
        eff = [dl * (k - 1) + 1 for k, dl in zip(layer.kernel_size, layer.dilation)]
        N = [math.ceil((2 * e - 1) / s) for e, s in zip(eff, layer.stride)]  # the input grid
        T = dense_circular_transposed(layer, tuple(N))
        G = T @ T.T if T.shape[0] <= T.shape[1] else T.T @ T
        reference = float((G - torch.eye(G.shape[0], dtype=G.dtype)).square().sum()) / math.prod(N)
        assert terms[site] == pytest.approx(reference, rel=1e-9), site
        assert rows[site]["lorth"] == pytest.approx(reference, rel=1e-9), site
        size = rows[site]["input"]
        sv = torch.linalg.svdvals(dense_circular_transposed(layer, size))
        assert rows[site]["sigma_max"] == pytest.approx(float(sv.max()), rel=1e-9), site
        assert rows[site]["sigma_min"] == pytest.approx(float(sv.min()), rel=1e-9, abs=1e-9), site
    for site in ("c3", "d1", "d2"):
        reference = theorem7_lorth(getattr(model, site))
        assert terms[site] == pytest.approx(reference, rel=1e-9), site
        assert rows[site]["lorth"] == pytest.approx(reference, rel=1e-9), site
    # the transposed layer's own case (its adjoint conv's swapped): t1 maps 8 channels to 2 at 2x upsampling, 2 * 2
    # outputs per 8 inputs: row orthogonal; t3 maps 2 to 3 at stride 1: column orthogonal
    assert rows["t1"]["exists"] == "yes (RO)" and rows["t3"]["exists"] == "yes (CO)"
    # gradients: the penalty of the strided dilated conv and of a transposed conv against finite differences
    for site in ("d2", "t2"):
        (term,) = [t for t in orthofx.transform(model, every).meta["orthofx"].penalties if t.site == site]
        layer = getattr(model, site)
        w = layer.weight.detach().clone().requires_grad_()
        value = lambda w, term=term: orthofx.metrics.lorth(w, stride=term.stride, groups=term.groups,
                                                            dilation=term.dilation)
        assert torch.autograd.gradcheck(value, (w,))


def test_low_precision_weights_get_float64_lorth():
    # a column-orthogonal 3x3 conv (a 1x1 orthonormal mixing, slightly perturbed): L_orth is a small difference of
    # large numbers, ||conv(K, K) - I||^2 - (M - C), which bfloat16 / float16 rounded to 0.5 (true: 0.52)
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 64, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :, 1, 1] = torch.linalg.qr(torch.randn(64, 16))[0]
        conv.weight.add_(0.01 * torch.randn_like(conv.weight))
    for dtype in (torch.bfloat16, torch.float16):
        gm = orthofx.transform(nn.Sequential(conv), NOTHING).to(dtype)
        (row,) = orthofx.report(gm).rows
        ref = theorem7_lorth(gm.get_submodule("0"))
        assert row["lorth"] == pytest.approx(ref, rel=1e-9)


def test_meta_and_uninitialised_lazy_layers_get_rows_without_figures():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(2, 4, 3, padding=1)
            self.lc = nn.LazyConv2d(4, 3)
            self.lin = nn.LazyLinear(3)

        def forward(self, x):
            return self.lin(self.lc(self.c(x)).mean((2, 3)))

    rows = {r["site"]: r for r in orthofx.report(orthofx.transform(Net(), NOTHING)).rows}
    assert rows["c"]["lorth"] is not None
    for site in ("lc", "lin"):
        assert rows[site]["lorth"] is None and rows[site]["sigma_max"] is None
        assert rows[site]["exists"].startswith("? (lazy layer")  # in_features 0 said "yes (CO)"
    gm = orthofx.transform(Net(), NOTHING, example_inputs=(torch.randn(1, 2, 6, 6),)).to("meta")
    rep = orthofx.report(gm)
    assert [r["site"] for r in rep.rows] == ["c", "lc", "lin"]
    for r in rep.rows:
        assert r["lorth"] is None and r["sigma_max"] is None and r["exists"].startswith("yes")
    assert "Conv2d(2->4, k=3, s=1)" in str(rep)
