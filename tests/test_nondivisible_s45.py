"""Session 45: an exactly orthogonal conv is exact on input grids divisible by its stride. On other grids (a 7x7 map
at stride 2, e.g. a ResNet's last stage on 28x28 inputs) a strided layer is in general not orthogonal: the
``orthogonal_conv`` pass says so in its status and warns, and the report gives the operator's own singular values
instead of the circular ones on the grid rounded up to the stride (which are 1 and belong to no operator the layer
applies). References: dense float64 Jacobians of the transformed layers."""

import math
import warnings

import pytest
import torch
from torch import nn

import orthofx
from orthofx.nn import OrthogonalConv1d
from orthofx.passes.orthogonal_conv import orthogonal_on_grid

OFF_GRID = "not orthogonal on the example"


def _transform(model, example, policy="orthogonal"):
    """The transformed model and the OrthofxWarnings transform issued."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = orthofx.transform(model, policy, example_inputs=example)
    return gm.eval(), [w for w in caught if issubclass(w.category, orthofx.OrthofxWarning)]


def _dense_singular_values(layer, shape):
    """All singular values of ``layer``'s dense float64 Jacobian at inputs of ``shape`` (no batch)."""
    n = math.prod(shape)
    jacobian = torch.autograd.functional.jacobian(lambda z: layer(z.reshape(1, *shape)).reshape(-1),
                                                  torch.zeros(n, dtype=torch.float64))
    return torch.linalg.svdvals(jacobian)


def _row(gm, site):
    return next(row for row in orthofx.report(gm).rows if row["site"] == site)


CASES = [  # (conv, odd input, divisible input): 1-D and 2-D, k = 3, S = 2, p = 1 (the ResNet strided conv)
    (lambda: nn.Conv1d(4, 8, 3, stride=2, padding=1, bias=False), (4, 7), (4, 8)),
    (lambda: nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False), (4, 7, 7), (4, 8, 8)),
]


@pytest.mark.parametrize("make, odd, even", CASES)
def test_dense_jacobian_is_orthogonal_on_divisible_grids_only(make, odd, even):
    torch.manual_seed(0)
    for shape, orthogonal in ((odd, False), (even, True)):
        gm, _ = _transform(nn.Sequential(make()).double(), (torch.randn(2, *shape, dtype=torch.float64),))
        error = float((_dense_singular_values(gm, shape) - 1).abs().max())
        assert (error < 1e-10) if orthogonal else (error > 0.1), (shape, error)


@pytest.mark.parametrize("make, odd, even", CASES)
def test_status_and_warning_on_a_grid_not_divisible_by_the_stride(make, odd, even):
    torch.manual_seed(0)
    gm, caught = _transform(nn.Sequential(make()).double(), (torch.randn(2, *odd, dtype=torch.float64),))
    size = "x".join(map(str, odd[1:])) if len(odd) > 2 else f"length-{odd[1]}"  # 1-D: "length-7 input"
    assert _row(gm, "0")["pass"] == (f"orthogonal_conv (hard kernel; not orthogonal on the example's {size} input: "
                                     "not divisible by stride 2)")
    (change,) = [c for c in orthofx.manifest_of(gm).changes if c.site == "0"]
    assert change.after["not_orthogonal_on"] == odd[1:]  # what the report reads
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert f"'0' ({size} input, stride 2)" in message and OFF_GRID in message
    assert "divisible by the stride at every such layer" in message and "pad the inputs" in message
    assert caught[0].filename == __file__  # errors.caller_stacklevel: the user's line

    gm, caught = _transform(nn.Sequential(make()).double(), (torch.randn(2, *even, dtype=torch.float64),))
    assert _row(gm, "0")["pass"] == "orthogonal_conv (hard)" and not caught


@pytest.mark.parametrize("make, odd, even", CASES)
def test_report_gives_the_figures_of_the_operator_the_layer_applies(make, odd, even):
    torch.manual_seed(0)
    gm, _ = _transform(nn.Sequential(make()).double(), (torch.randn(2, *odd, dtype=torch.float64),))
    dense = _dense_singular_values(gm, odd)
    report = orthofx.report(gm)
    row = report.rows[0]
    assert row["sigma_min"] == pytest.approx(float(dense.min()), abs=1e-9)
    assert row["sigma_max"] == pytest.approx(float(dense.max()), abs=1e-9)
    assert max(1 - row["sigma_min"], row["sigma_max"] - 1) > 0.1  # not the 1.0 / 1.0 of the rounded-up grid
    assert "dense" in row["layer"]
    torch.testing.assert_close(report.spectra["0"], dense, rtol=0, atol=1e-9)
    assert any(note.startswith("0: not orthogonal on the example's") for note in report.notes), report.notes
    # the frozen model applies the same operator: the same figures
    frozen = orthofx.freeze(gm)
    frozen_row = orthofx.report(frozen).rows[0]
    assert frozen_row["sigma_min"] == pytest.approx(float(dense.min()), abs=1e-9)
    assert frozen_row["sigma_max"] == pytest.approx(float(dense.max()), abs=1e-9)

    gm, _ = _transform(nn.Sequential(make()).double(), (torch.randn(2, *even, dtype=torch.float64),))
    report = orthofx.report(gm)
    assert report.rows[0]["sigma_min"] == pytest.approx(1, abs=1e-10)
    assert report.rows[0]["sigma_max"] == pytest.approx(1, abs=1e-10)
    assert not any("not orthogonal" in note for note in report.notes)


def test_report_gives_no_figures_where_the_operator_is_too_large_to_measure():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(48, 96, 3, stride=2, padding=1, bias=False))  # 48 * 7 * 7 = 2352 inputs
    gm, caught = _transform(model, (torch.randn(1, 48, 7, 7),))
    assert len(caught) == 1
    report = orthofx.report(gm)
    row = report.rows[0]
    assert row["sigma_min"] is None and row["sigma_max"] is None and "0" not in report.spectra
    (note,) = [note for note in report.notes if note.startswith("0: no sigma_min / sigma_max")]
    assert "not orthogonal on the example's 7x7 input" in note and "1024" in note


def test_resnet18_warns_on_28x28_and_not_on_32x32():
    torch.manual_seed(0)
    gm, caught = _transform(orthofx.models.get("resnet18", in_channels=1, width=8), (torch.randn(2, 1, 28, 28),))
    assert len(caught) == 1 and "'layer4.0.conv1' (7x7 input, stride 2)" in str(caught[0].message)
    assert "32x32 rather than 28x28" in str(caught[0].message)
    rows = {row["site"]: row for row in orthofx.report(gm).rows}
    assert rows["layer4.0.conv1"]["pass"].startswith("orthogonal_conv (hard kernel; not orthogonal on the "
                                                     "example's 7x7 input")
    assert rows["layer4.0.conv1"]["sigma_min"] < 0.5 and rows["layer4.0.conv1"]["sigma_max"] > 1.5
    # the other strided convs see 28x28 and 14x14: exact
    assert rows["layer2.0.conv1"]["pass"] == rows["layer3.0.conv1"]["pass"] == "orthogonal_conv (hard)"

    gm, caught = _transform(orthofx.models.get("resnet18", in_channels=1, width=8), (torch.randn(2, 1, 32, 32),))
    assert not caught, [str(w.message) for w in caught]
    assert not any(OFF_GRID in (row["pass"] or "") for row in orthofx.report(gm).rows)


def test_small_cnn_example_gives_no_warning():
    torch.manual_seed(0)
    gm, caught = _transform(orthofx.models.get("small_cnn"), (orthofx.models.example_input("small_cnn", batch=2),))
    assert not caught, [str(w.message) for w in caught]
    assert all(row["pass"] in ("orthogonal_conv (hard)", "orthogonal_conv (regularised (no orthogonal version))")
               for row in orthofx.report(gm).rows if row["pass"]), [row["pass"] for row in orthofx.report(gm).rows]


def test_one_warning_names_every_layer_off_grid():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1))
    gm, caught = _transform(model, (torch.randn(1, 4, 13, 13),))  # 13 -> 7: both odd
    assert len(caught) == 1
    assert "'0' (13x13 input, stride 2), '2' (7x7 input, stride 2)" in str(caught[0].message)


@pytest.mark.parametrize("conv, padding", [
    (lambda: nn.Conv1d(8, 4, 1, stride=2, bias=False), "circular"),               # RO 1x1: the last input unread
    (lambda: nn.Conv1d(4, 8, 4, stride=2, padding=1, bias=False), "circular"),    # k = 2S, p = 1: no wrap-around
    (lambda: nn.Conv1d(4, 8, 2, stride=2, bias=False), "keep"),                   # RO patch embedding, k = S
])
def test_layers_orthogonal_on_an_odd_grid_stay_hard(conv, padding):
    torch.manual_seed(0)
    model = nn.Sequential(conv()).double()
    policy = {"rules": [{"match": {"type": "Conv1d"}, "apply": "orthogonal_conv", "with": {"padding": padding}}]}
    gm, caught = _transform(model, (torch.randn(2, model[0].in_channels, 7, dtype=torch.float64),), policy)
    dense = _dense_singular_values(gm, (model[0].in_channels, 7))
    assert float((dense - 1).abs().max()) < 1e-10
    assert _row(gm, "0")["pass"] == "orthogonal_conv (hard)" and not caught


def test_column_orthogonal_patch_embedding_with_kept_padding_is_marked():
    """'padding: keep' on a k = S conv without padding is reported hard (exact on divisible grids); CO, on an odd
    grid its last input is read by no window (a zero singular value)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 16, 2, stride=2, bias=False)).double()
    policy = {"rules": [{"match": {"type": "Conv1d"}, "apply": "orthogonal_conv", "with": {"padding": "keep"}}]}
    gm, caught = _transform(model, (torch.randn(2, 4, 7, dtype=torch.float64),), policy)
    assert float(_dense_singular_values(gm, (4, 7)).min()) < 1e-10
    assert _row(gm, "0")["pass"] == ("orthogonal_conv (hard kernel; not orthogonal on the example's length-7 input: "
                                     "not divisible by stride 2)")
    assert len(caught) == 1


def test_zero_padding_kept_regularised_and_transposed_layers_are_unchanged():
    torch.manual_seed(0)
    # 'padding: keep' with zero padding: not orthogonal at the borders on any grid, as its status says already
    keep = {"rules": [{"match": {"type": "Conv2d"}, "apply": "orthogonal_conv", "with": {"padding": "keep"}}]}
    gm, caught = _transform(nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1)), (torch.randn(1, 4, 7, 7),),
                            keep)
    row = _row(gm, "0")
    assert row["pass"] == "orthogonal_conv (hard (zero padding: not at borders))" and not caught
    assert row["sigma_min"] == pytest.approx(1, abs=1e-5)  # the circular surrogate: a property of the kernel
    # the strided 1x1 shortcut has no orthogonal version: L_orth, figures of its kernel on the rounded-up grid
    gm, caught = _transform(nn.Sequential(nn.Conv2d(8, 16, 1, stride=2)), (torch.randn(1, 8, 7, 7),))
    row = _row(gm, "0")
    assert row["pass"] == "orthogonal_conv (regularised (no orthogonal version))" and not caught
    assert row["sigma_max"] is not None
    # a transposed conv is the adjoint of the conv on the grid input * stride, divisible by it: exact on any input
    model = nn.Sequential(nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1, bias=False)).double()
    gm, caught = _transform(model, (torch.randn(2, 8, 5, 5, dtype=torch.float64),))
    assert float((_dense_singular_values(gm, (8, 5, 5)) - 1).abs().max()) < 1e-10
    assert _row(gm, "0")["pass"] == "orthogonal_conv (hard)" and not caught


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)
        self.b = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x, y):
        return self.a(x).sum() + self.b(y).sum()


def test_tied_layer_is_checked_on_its_own_input():
    torch.manual_seed(0)
    gm, caught = _transform(_Tied(), (torch.randn(1, 4, 8, 8), torch.randn(1, 4, 7, 7)))
    assert _row(gm, "a")["pass"] == "orthogonal_conv (hard)"
    assert _row(gm, "b")["pass"] == ("orthogonal_conv (hard kernel (shares a's layer: tied weight); not orthogonal "
                                     "on the example's 7x7 input: not divisible by stride 2)")
    assert len(caught) == 1 and "'b' (7x7 input" in str(caught[0].message)


def test_orthogonal_on_grid_matches_dense_jacobians():
    """The rule (one-to-one windows for RO, one-to-one and onto for CO) against the dense operator of random
    layers: strides, dilations, paddings, channel ratios, sizes."""
    torch.manual_seed(1)
    checked = {True: 0, False: 0}
    for k, s, d, p, (c, m) in [(3, 2, 1, 1, (4, 8)), (3, 2, 1, 1, (4, 16)), (4, 2, 1, 1, (4, 8)), (4, 2, 1, 1, (4, 16)),
                               (5, 2, 1, 2, (8, 2)), (2, 3, 2, "same", (4, 4)), (3, 2, 2, 2, (4, 4)),
                               (3, 3, 2, "same", (4, 16)), (1, 2, 1, 0, (8, 2)), (3, 3, 1, 0, (4, 8))]:
        layer = OrthogonalConv1d(c, m, k, stride=s, padding=p, dilation=d, method="bcop").double()
        for n in range(max(4, d * (k - 1) + 1), 14):
            dense = bool((_dense_singular_values(layer, (c, n)) - 1).abs().max() < 1e-9)
            assert orthogonal_on_grid(layer, (n,)) == dense, (k, s, d, p, c, m, n)
            checked[dense] += 1
    assert min(checked.values()) > 20  # both answers are exercised


# ---- review of the off-grid check (divisible2): every input size, no hooks fired, half precision, old pickles


class _CalledTwice(nn.Module):
    """One conv called on two inputs of different sizes."""

    def __init__(self, make=lambda: nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)):
        super().__init__()
        self.c = make()

    def forward(self, *inputs):
        return sum(self.c(x).sum() for x in inputs)


@pytest.mark.parametrize("sizes, flagged", [((8, 7), (7,)), ((7, 8), (7,)), ((7, 5, 8), (7, 5))])
def test_a_layer_called_on_several_sizes_is_checked_on_each(sizes, flagged):
    torch.manual_seed(0)
    model = _CalledTwice().double()
    example = tuple(torch.randn(1, 4, n, n, dtype=torch.float64) for n in sizes)
    gm, caught = _transform(model, example)
    manifest = orthofx.manifest_of(gm)
    assert manifest.input_shapes["c"] == (1, 4, sizes[0], sizes[0])  # the first call's, as before
    assert manifest.all_input_shapes["c"] == [(1, 4, n, n) for n in sizes]
    named = " and ".join(f"{n}x{n}" for n in flagged) + (" input" if len(flagged) == 1 else " inputs")
    assert _row(gm, "c")["pass"] == (f"orthogonal_conv (hard kernel; not orthogonal on the example's {named}: not "
                                     "divisible by stride 2)")
    assert len(caught) == 1 and f"'c' ({named}, stride 2)" in str(caught[0].message)
    (change,) = [c for c in manifest.changes if c.site == "c"]
    assert change.after["not_orthogonal_on_sizes"] == [(n, n) for n in flagged]
    # the report measures the first size flagged, and says which
    report = orthofx.report(gm)
    row = _row(gm, "c")
    dense = _dense_singular_values(gm.get_submodule("c"), (4, flagged[0], flagged[0]))
    assert row["sigma_min"] == pytest.approx(float(dense.min()), abs=1e-9)
    assert row["sigma_max"] == pytest.approx(float(dense.max()), abs=1e-9)
    assert f"on the {flagged[0]}x{flagged[0]} input" in row["layer"]
    assert any(note.startswith(f"c: not orthogonal on the example's {named}") for note in report.notes)


def test_a_layer_called_on_divisible_sizes_only_stays_hard():
    torch.manual_seed(0)
    gm, caught = _transform(_CalledTwice(), (torch.randn(1, 4, 8, 8), torch.randn(1, 4, 6, 6)))
    assert _row(gm, "c")["pass"] == "orthogonal_conv (hard)" and not caught


def test_manifest_pickled_before_the_field_existed_loads_with_it_empty():
    import copy
    import pickle
    torch.manual_seed(0)
    gm, _ = _transform(nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1)), (torch.randn(1, 4, 7, 7),))
    old = copy.copy(orthofx.manifest_of(gm))
    del old.__dict__["all_input_shapes"]  # what a model saved before this session holds
    for change in old.changes:
        change.after.pop("not_orthogonal_on_sizes", None)
    loaded = pickle.loads(pickle.dumps(old))
    assert loaded.all_input_shapes == {} and loaded.input_shapes == old.input_shapes
    gm.meta["orthofx"] = loaded
    row = _row(gm, "0")  # the report reads the first flagged size of an old change
    assert row["sigma_min"] is not None and row["sigma_min"] < 0.5
    # the whole model round-trips with the new field
    again = pickle.loads(pickle.dumps(_transform(nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1)),
                                                 (torch.randn(1, 4, 7, 7),))[0]))
    assert orthofx.manifest_of(again).all_input_shapes["0"] == [(1, 4, 7, 7)]


@pytest.mark.parametrize("freeze", [False, True])
def test_report_fires_no_forward_hook_of_the_user(freeze):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 4, stride=2, padding=1, bias=False),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False))
    gm, caught = _transform(model, (torch.randn(1, 4, 14, 14),))  # 14 -> 7: the second conv is flagged
    assert len(caught) == 1 and "'1' (7x7 input" in str(caught[0].message)
    if freeze:
        gm = orthofx.freeze(gm)
    calls = []
    for module in gm.get_submodule("1").modules():
        module.register_forward_hook(lambda m, a, o: calls.append("hook"))
        module.register_forward_pre_hook(lambda m, a: calls.append("pre-hook"))
    row = next(row for row in orthofx.report(gm).rows if row["site"] == "1")
    assert not calls, calls
    dense = _dense_singular_values(gm.get_submodule("1").double(), (8, 7, 7))
    assert row["sigma_min"] == pytest.approx(float(dense.min()), abs=1e-6)
    assert row["sigma_max"] == pytest.approx(float(dense.max()), abs=1e-6)


def test_frozen_pad_and_conv_is_measured_with_the_pad_modules_pads():
    """Circular pads of 2 freeze into Sequential(CircularPad, conv without padding): the operator pads as the pad
    module does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 8, 5, stride=2, padding=2, bias=False)).double()
    gm, caught = _transform(model, (torch.randn(2, 4, 9, dtype=torch.float64),))
    assert len(caught) == 1
    frozen = orthofx.freeze(gm)
    assert isinstance(frozen.get_submodule("0"), nn.Sequential)
    row = next(row for row in orthofx.report(frozen).rows if row["site"] == "0")
    dense = _dense_singular_values(frozen, (4, 9))
    assert max(1 - float(dense.min()), float(dense.max()) - 1) > 0.1
    assert row["sigma_min"] == pytest.approx(float(dense.min()), abs=1e-9)
    assert row["sigma_max"] == pytest.approx(float(dense.max()), abs=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_layers_get_the_figures_of_their_weights(dtype):
    torch.manual_seed(0)
    gm, caught = _transform(nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)).to(dtype),
                            (torch.randn(1, 4, 7, 7, dtype=dtype),))
    assert len(caught) == 1
    row = _row(gm, "0")
    # reference: the plain conv of the layer's (half-precision) kernel, in float64, its dense Jacobian
    reference = gm.get_submodule("0").to_conv().double()
    dense = _dense_singular_values(reference, (4, 7, 7))
    assert row["sigma_min"] == pytest.approx(float(dense.min()), abs=1e-9)
    assert row["sigma_max"] == pytest.approx(float(dense.max()), abs=1e-9)
    assert max(1 - row["sigma_min"], row["sigma_max"] - 1) > 0.1


def test_one_dimensional_warning_has_no_image_example():
    torch.manual_seed(0)
    gm, caught = _transform(nn.Sequential(nn.Conv1d(4, 8, 3, stride=2, padding=1)), (torch.randn(1, 4, 7),))
    (warning,) = caught
    message = str(warning.message)
    assert "'0' (length-7 input, stride 2)" in message and "32x32" not in message
    assert "divisible by the stride at every such layer" in message
    assert "length-7 input" in _row(gm, "0")["pass"]
