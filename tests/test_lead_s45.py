"""Session 45, lead's own fixes: messages found by the audits."""
import warnings

import pytest
import torch

import orthofx


class _ShapeBranch(torch.nn.Module):
    """A Python branch on an input size: symbolic tracing fails, so transform captures with torch.export."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[-1] == 4:
            return self.lin(x)
        return x


def test_batch_one_export_capture_error_names_the_example_batch():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = orthofx.transform(_ShapeBranch(), "lorth", example_inputs=(torch.randn(1, 4),))
    with pytest.raises(orthofx.errors.ArgumentError, match=r"example inputs had batch size 1.*\(2 or more\)"):
        gm(torch.randn(3, 4))
    # a batch of 2 captures a dynamic batch: other sizes run and equal the model's linear
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm2 = orthofx.transform(_ShapeBranch(), "lorth", example_inputs=(torch.randn(2, 4),))
    x = torch.randn(3, 4)
    torch.testing.assert_close(gm2(x), gm2.lin(x))


def test_every_report_row_has_the_documented_keys():
    """A decomposition site's row (the svd preset) lacked lorth / sigma / input / exists: a logger reading
    ``row["lorth"]`` as to_dict documents raised KeyError."""
    x = orthofx.models.example_input("gcp_cnn", batch=4)
    gm = orthofx.transform(orthofx.models.get("gcp_cnn"), "svd", example_inputs=(x,))
    report = orthofx.report(gm)
    rows = report.to_dict()["rows"]
    keys = {"site", "layer", "pass", "params", "lorth", "sigma_min", "sigma_max", "input", "exists"}
    function_rows = [row for row in rows if ":" in row["site"]]
    assert function_rows, "the svd preset's decomposition sites have rows"
    for row in rows:
        assert keys <= set(row), (row["site"], keys - set(row))
    for row in function_rows:
        assert row["lorth"] is None and row["sigma_min"] is None and row["input"] is None
        assert "kappa" in row  # monitored: the monitor's keys too


@pytest.mark.parametrize("conv, shape", [
    (torch.nn.Conv1d(1, 4, 8, stride=4, padding=2), (2, 1, 64)),     # an audio stem
    (torch.nn.Conv3d(2, 4, 3, stride=(1, 2, 2), padding=1), (2, 2, 4, 8, 8)),  # a video conv
])
def test_the_convnorm_preset_covers_1d_and_3d_convs(conv, shape):
    """The preset matched Conv2d only: an audio or video model got a PlanError though the pass takes Conv1d/3d."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(conv)
    x = torch.randn(*shape)
    gm = orthofx.transform(model, "convnorm", example_inputs=(x,))
    wrapped = gm.get_submodule("0")
    assert isinstance(wrapped, orthofx.nn.convnorm.ConvNormConvNd)
    rows = orthofx.report(gm).to_dict()["rows"]
    assert [row["site"] for row in rows] == ["0"] and rows[0]["pass"].startswith("convnorm")
    # ConvNorm divides each output channel's spectrum by the kernel's: its output differs from the bare conv's and
    # the conv's weight is the model's
    torch.testing.assert_close(wrapped.conv.weight, conv.weight)
    assert gm(x).shape == model(x).shape
    assert not torch.allclose(gm(x), model(x))


class _CovariancePool(torch.nn.Module):
    def __init__(self, padding_mode):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode)

    def forward(self, x):
        features = self.conv(x).flatten(2)
        covariance = features @ features.transpose(1, 2) / features.shape[-1] + 1e-3 * torch.eye(4)
        return torch.linalg.eigh(covariance)[0]


@pytest.mark.parametrize("padding_mode, padding, exact", [("zeros", "keep", False), ("zeros", "circular", True),
                                                          ("circular", "keep", True)])
def test_pre_svd_hard_layer_with_zero_padding_kept_says_it_is_not_orthogonal_at_the_borders(padding_mode, padding,
                                                                                           exact):
    """pre_svd's weight: orthogonal with the default padding: keep on a zero-padded conv said 'orthogonal (hard)',
    while the layer's Jacobian is off the identity at the borders (orthogonal_conv says so for the same layer)."""
    torch.manual_seed(0)
    policy = {"orthofx": 1, "rules": [{"match": {"feeds": "linalg.eigh"}, "apply": "pre_svd",
                                       "with": {"weight": "orthogonal", "padding": padding, "nog": False,
                                                "olr": False}}]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = orthofx.transform(_CovariancePool(padding_mode), policy, example_inputs=(torch.randn(2, 3, 6, 6),))
    (change,) = orthofx.manifest_of(gm).changes
    layer = gm.get_submodule("conv").double()
    jacobian = torch.autograd.functional.jacobian(
        lambda z: layer(z.reshape(1, 3, 6, 6)).reshape(-1), torch.zeros(108, dtype=torch.float64))
    values = torch.linalg.svdvals(jacobian)
    is_orthogonal = bool((values - 1).abs().max() < 1e-8)
    assert is_orthogonal == exact
    assert ("orthogonal (hard)" in change.what) == exact
    assert ("not at borders" in change.what) == (not exact)


def _fixed_shift_error(conv):
    policy = {"orthofx": 1, "rules": [{"match": {"type": "Conv2d"}, "apply": "orthogonal_conv"}]}
    with pytest.raises(orthofx.errors.ImpossibleLayerError) as caught:
        orthofx.transform(torch.nn.Sequential(conv), policy, example_inputs=(torch.randn(2, 8, 8, 8),))
    return str(caught.value)


def test_fixed_shift_error_offers_cayley_fft_only_where_it_can_build_the_layer():
    """The remedy 'method: cayley_fft' led in a circle for a dilated depthwise conv (cayley_fft refuses dilation and
    sends the user to bcop, which refuses the fixed shift again); where it is offered, followed as written (a rule of
    its own for the depthwise layers), it builds a trainable orthogonal layer and leaves the others' method."""
    dilated = _fixed_shift_error(torch.nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8))
    assert "cayley_fft" not in dilated and "where: {groups: 1}" in dilated
    plain = _fixed_shift_error(torch.nn.Conv2d(8, 8, 3, padding=1, groups=8))
    assert "cayley_fft" in plain and "where: {groups: 8}" in plain and "train as hard layers" in plain
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.Conv2d(8, 8, 3, padding=1))
    policy = {"orthofx": 1, "rules": [
        {"match": {"type": "Conv2d", "where": {"groups": 8}}, "apply": "orthogonal_conv",
         "with": {"method": "cayley_fft"}},
        {"match": {"type": "Conv2d"}, "apply": "orthogonal_conv"}]}
    gm = orthofx.transform(model, policy, example_inputs=(torch.randn(2, 8, 8, 8),))
    depthwise, full = gm.get_submodule("0"), gm.get_submodule("1")
    assert depthwise.method == "cayley_fft" and full.method != "cayley_fft"
    x = torch.randn(1, 8, 8, 8, dtype=torch.float64)
    operator = torch.autograd.functional.jacobian(lambda z: depthwise.double()(z) - depthwise(torch.zeros_like(z)),
                                                  x).reshape(512, 512)
    torch.testing.assert_close(operator.T @ operator, torch.eye(512, dtype=torch.float64), atol=1e-10, rtol=0)
    depthwise(x).square().sum().backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in depthwise.parameters())


def test_traced_frozen_model_loads_without_orthofx(tmp_path):
    """README: torch.jit.save of a traced frozen model loads where orthofx is not importable (torch.save(frozen)
    needs orthofx: its GraphModule keeps orthofx's tracer class and manifest)."""
    import subprocess
    import sys

    x = orthofx.models.example_input("small_cnn", batch=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = orthofx.transform(orthofx.models.get("small_cnn"), "convnorm", example_inputs=(x,)).eval()
        frozen = orthofx.freeze(gm, (x,))
        traced = torch.jit.trace(frozen, (x,))
    torch.jit.save(traced, tmp_path / "traced.pt")
    torch.save((x, frozen(x)), tmp_path / "io.pt")
    torch.save(frozen, tmp_path / "frozen.pt")
    script = (
        "import sys\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'orthofx':\n"
        "            raise ImportError('orthofx is not installed here')\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "import torch\n"
        f"x, y = torch.load({str(tmp_path / 'io.pt')!r})\n"
        f"model = torch.jit.load({str(tmp_path / 'traced.pt')!r})\n"
        "print(float((model(x) - y).abs().max()))\n"
        "try:\n"
        f"    torch.load({str(tmp_path / 'frozen.pt')!r}, weights_only=False)\n"
        "    print('loaded')\n"
        "except ImportError:\n"
        "    print('needs orthofx')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    difference, pickled = result.stdout.splitlines()
    assert float(difference) < 1e-6  # the traced graph's ops, threads as scheduled: within float32 rounding
    assert pickled == "needs orthofx"
