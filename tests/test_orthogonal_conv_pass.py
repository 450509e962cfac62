"""The orthogonal_conv pass and the presets on the built-in ResNet-18 and VGG."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthofx
from orthofx import metrics
from orthofx.nn.orthogonal import OrthogonalConv2d, OrthogonalLinear
from references import lorth64


def rule(**params):
    return {"rules": [{"match": {"type": ["Conv2d", "Linear"]}, "apply": "orthogonal_conv", "with": params}]}


@pytest.mark.parametrize("name", ["resnet18", "vgg11"])
@pytest.mark.parametrize("preset", ["orthogonal", "convnorm", "lorth"])
def test_presets_on_builtin_models(name, preset):
    torch.manual_seed(0)
    model = orthofx.models.get(name, width=4).eval()
    x = orthofx.models.example_input(name, batch=2)
    gm = orthofx.transform(model, preset, example_inputs=(x,))
    out = gm.eval()(x)
    assert out.shape == model(x).shape and torch.isfinite(out).all()
    rows = {r["site"]: r for r in orthofx.report(gm).rows}
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert set(convs) <= set(rows)
    assert all(rows[n]["pass"] for n in convs)  # every conv says what happened to it


def test_hard_layers_are_orthogonal_and_stay_so_while_training():
    torch.manual_seed(0)
    model = orthofx.models.get("resnet18", width=4)
    gm = orthofx.transform(model, "orthogonal", example_inputs=(orthofx.models.example_input("resnet18"),))
    hard = {n: m for n, m in gm.named_modules() if isinstance(m, OrthogonalConv2d)}
    assert len(hard) == 17  # every conv but the three strided 1x1 shortcuts
    shortcut = orthofx.manifest_of(gm).changes
    statuses = {c.site: c.status for c in shortcut}
    assert statuses["layer2.0.shortcut.0"].startswith("regularised")
    assert isinstance(gm.get_submodule("fc"), OrthogonalLinear)
    optimizer = torch.optim.Adam(gm.parameters(), lr=1e-2)
    for _ in range(5):
        loss = gm(torch.randn(4, 3, 32, 32)).logsumexp(1).mean() + orthofx.penalty(gm)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, layer in hard.items():
        assert layer.matrix.grad is not None and torch.isfinite(layer.matrix.grad).all()
        sv = metrics.conv_singular_values(layer.weight.detach(), (8, 8), stride=layer.stride[0])
        assert float((sv - 1).abs().max()) <= 1e-5, name


def test_impossible_layers_follow_on_impossible():
    model = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2), nn.Conv2d(8, 8, 3, padding=1))
    with pytest.raises(orthofx.ImpossibleLayerError) as info:
        orthofx.transform(model, rule())
    message = str(info.value)
    assert "0 (Conv2d(4->8, k=1, s=2))" in message and "Theorem 4" in message
    assert "exists iff M <= C*k^d, here 8 > 4" in message and "on_impossible: regularize" in message
    gm = orthofx.transform(model, rule(on_impossible="skip"))
    assert type(gm.get_submodule("0")) is nn.Conv2d and isinstance(gm.get_submodule("1"), OrthogonalConv2d)
    assert orthofx.penalty(gm).item() == 0.0
    gm = orthofx.transform(model, rule(on_impossible="regularize", regularize_weight=0.5))
    expected = 0.5 * lorth64(model[0].weight, stride=2)  # the dense operator's Gram error, float64
    assert float(orthofx.penalty(gm)) == pytest.approx(expected, rel=1e-5)


def test_padding_keep_and_output_size_guard():
    model = nn.Sequential(nn.Conv2d(3, 3, 3), nn.ReLU())  # 'valid': circular 'same' would change the size
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(orthofx.ImpossibleLayerError, match="padding: keep"):
        orthofx.transform(model, rule(), example_inputs=(x,))
    gm = orthofx.transform(model, rule(padding="keep"), example_inputs=(x,))
    assert gm(x).shape == model(x).shape
    # no padding: the outputs whose windows fit, rows of the circular layer, orthonormal (square, so RO)
    assert orthofx.manifest_of(gm).changes[0].status.startswith("hard (rows orthonormal: no padding")
    # keeping a circular conv's own padding gives the exactly orthogonal circular layer: reported as hard
    circular = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular"))
    gm = orthofx.transform(circular, rule(padding="keep"), example_inputs=(x,))
    assert orthofx.manifest_of(gm).changes[0].status == "hard"
    assert gm.get_submodule("0").orthogonality_error(8) < 1e-5
    # a circular conv whose own padding extends the output: an orthogonal kernel, but not an orthogonal layer
    # (the extended operator repeats rows); reported so. With padding 0 it pads nothing, the 'valid' case above
    # (tests/test_small_fixes_s37.py)
    for padding in (2,):
        conv = nn.Sequential(nn.Conv2d(3, 3, 3, padding=padding, padding_mode="circular"))
        status = orthofx.manifest_of(orthofx.transform(conv, rule(padding="keep"))).changes[0].status
        assert status.startswith("orthogonal kernel, not an orthogonal layer") and f"({padding}, {padding})" in status


def test_reflect_padded_convs_get_the_circular_layer_unless_keep_is_asked():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU())
    x = torch.randn(2, 3, 8, 8)
    gm = orthofx.transform(model, "orthogonal", example_inputs=(x,))
    layer = gm.get_submodule("0")
    assert isinstance(layer, OrthogonalConv2d) and layer.padding_mode == "circular"
    assert layer.orthogonality_error(8) < 1e-5
    keep = {"rules": [{"match": {"type": "Conv2d"}, "apply": "orthogonal_conv", "with": {"padding": "keep"}}]}
    with pytest.raises(orthofx.PlanError, match="padding_mode='reflect' with 'padding: keep'"):
        orthofx.transform(model, keep)


def test_rko_on_a_kernel_larger_than_the_stride_follows_on_impossible():
    model = nn.Sequential(nn.Conv2d(4, 16, 2, stride=2), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    message = r"rule '.*': 2 \(Conv2d.*method rko .* kernel_size=\(3, 3\)"
    with pytest.raises(orthofx.ImpossibleLayerError, match=message):
        orthofx.transform(model, rule(method="rko"))
    gm = orthofx.transform(model, rule(method="rko", on_impossible="skip"))
    assert isinstance(gm.get_submodule("0"), OrthogonalConv2d) and type(gm.get_submodule("2")) is nn.Conv2d


def test_frozen_layers_stay_frozen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 8))
    model[0].requires_grad_(False)
    model[3].bias.requires_grad_(False)
    gm = orthofx.transform(model, rule())
    trainable = sorted(n for n, p in gm.named_parameters() if p.requires_grad)
    assert trainable == ["3.raw_weight"]


def test_nearest_init_keeps_an_orthogonal_layer():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6))
    model = nn.Sequential(nn.Conv2d(6, 6, 1, bias=False), nn.Linear(5, 5))
    with torch.no_grad():
        model[0].weight.copy_(q.view(6, 6, 1, 1))
        model[1].weight.copy_(torch.linalg.qr(torch.randn(5, 5))[0])
    x = torch.randn(2, 6, 4, 5)
    gm = orthofx.transform(model, rule(), example_inputs=(x,))
    for change in orthofx.manifest_of(gm).changes:
        assert change.after["init_error"] < 1e-6 and change.after["output_change"] < 1e-6
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=0)
    assert orthofx.manifest_of(gm).output_change < 1e-5


def test_freeze_gives_plain_layers_with_the_same_outputs():
    torch.manual_seed(0)
    model = orthofx.models.get("small_cnn", width=4).eval()
    x = orthofx.models.example_input("small_cnn", batch=3)
    gm = orthofx.transform(model, "orthogonal", example_inputs=(x,))
    frozen = orthofx.freeze(gm)
    assert not any(isinstance(m, (OrthogonalConv2d, OrthogonalLinear)) for m in frozen.modules())
    torch.testing.assert_close(frozen(x), gm.eval()(x), atol=1e-5, rtol=0)


def test_cayley_fft_method_for_the_example_input_size(tmp_path):
    from orthofx.nn.orthogonal import FourierConv

    torch.manual_seed(0)
    # the strided 1x1 conv has no orthogonal k x k kernel (Theorem 4); cayley_fft's full-size kernel exists
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 12, 1, stride=2), nn.ReLU(),
                          nn.Conv2d(12, 12, 3, padding=1), nn.Flatten(), nn.Linear(12 * 16, 5)).eval()
    x = torch.randn(2, 3, 8, 8)
    gm = orthofx.transform(model, rule(method="cayley_fft"), example_inputs=(x,))
    layers = {n: m for n, m in gm.named_modules() if isinstance(m, OrthogonalConv2d)}
    assert set(layers) == {"0", "2", "4"} and all(m.method == "cayley_fft" for m in layers.values())
    assert layers["2"].input_size == (8, 8) and layers["4"].input_size == (4, 4)
    statuses = {c.site: c.status for c in orthofx.manifest_of(gm).changes}
    assert statuses["2"] == "hard (cayley_fft, input 8x8 only)"
    for name, layer in layers.items():
        n = layer.input_size[0]
        sv = metrics.conv_singular_values(layer.weight.detach(), n, stride=layer.stride[0])
        assert float((sv - 1).abs().max()) <= 1e-5, name
    out = gm(x)
    assert out.shape == model(x).shape and torch.isfinite(out).all()
    with pytest.raises(orthofx.LayerArgumentError, match="built for inputs of spatial size"):
        gm(torch.randn(2, 3, 16, 16))
    frozen = orthofx.freeze(gm)
    assert all(isinstance(frozen.get_submodule(n), FourierConv) for n in layers)
    torch.testing.assert_close(frozen(x), gm.eval()(x), atol=1e-5, rtol=0)
    result = orthofx.export(gm, tmp_path / "m.pt2", example_inputs=(x,))
    assert result.max_abs_diff <= 1e-6


@pytest.mark.slow
def test_cayley_fft_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(2, 3, 8, 6)
    gm = orthofx.transform(model, rule(method="cayley_fft"), example_inputs=(x,))
    result = orthofx.export(gm, tmp_path / "m.onnx", example_inputs=(x,))
    assert result.max_abs_diff <= 1e-5


def test_cayley_fft_pass_errors():
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
    with pytest.raises(orthofx.PlanError, match="example_inputs"):
        orthofx.transform(model, rule(method="cayley_fft"))
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(orthofx.PlanError, match="padding: keep"):
        orthofx.transform(model, rule(method="cayley_fft", padding="keep"), example_inputs=(x,))
    dilated = nn.Sequential(nn.Conv2d(3, 6, 3, padding=2, dilation=2))
    with pytest.raises(orthofx.ImpossibleLayerError, match="no dilation"):
        orthofx.transform(dilated, rule(method="cayley_fft"), example_inputs=(x,))
    odd = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1))
    gm = orthofx.transform(odd, rule(method="cayley_fft", on_impossible="skip"),
                           example_inputs=(torch.randn(1, 3, 7, 8),))
    assert type(gm.get_submodule("0")) is nn.Conv2d
    assert "not divisible by stride" in orthofx.manifest_of(gm).changes[0].status


def test_layer_errors_name_the_layer_path_in_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Sequential(nn.Conv2d(6, 6, 3, padding=1)))
    x = torch.randn(2, 3, 8, 8)
    gm = orthofx.transform(model, rule(), example_inputs=(x,))
    with pytest.raises(orthofx.LayerArgumentError, match=r"OrthogonalConv2d at '0' \(in_channels=3\): expected"):
        gm(torch.randn(2, 4, 8, 8))
    fourier = orthofx.freeze(orthofx.transform(model, rule(method="cayley_fft"), example_inputs=(x,)).eval())
    with pytest.raises(orthofx.LayerArgumentError, match=r"FourierConv at '0': the frozen Fourier-domain operator"):
        fourier(torch.randn(2, 3, 6, 6))


class _TiedPair(nn.Module):
    """Two layers sharing one weight Parameter (as an embedding and its output head do)."""

    def __init__(self, second: nn.Module):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.b = second
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_tied_weights_share_one_orthogonal_layer_and_stay_tied_while_training():
    torch.manual_seed(0)
    model = _TiedPair(nn.Conv2d(4, 4, 3, padding=1, bias=False))
    x = torch.randn(2, 4, 8, 8)
    gm = orthofx.transform(model, rule(), example_inputs=(x,))
    assert isinstance(gm.a, OrthogonalConv2d) and gm.b is gm.a
    assert "tied weight" in [c for c in orthofx.manifest_of(gm).changes if c.site == "b"][0].status
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        gm(x).square().mean().backward()
        optimizer.step()
    assert gm.b is gm.a
    # the model computes b(relu(a(x))) with one kernel: check against a plain conv with that kernel
    kernel = gm.a.weight.detach()
    expected = F.conv2d(F.pad(torch.relu(F.conv2d(F.pad(x, (1,) * 4, mode="circular"), kernel)), (1,) * 4,
                              mode="circular"), kernel)
    assert torch.allclose(gm(x), expected, atol=1e-5)
    assert metrics.orthogonality_error(kernel, (8, 8)) <= 1e-5


def test_tied_weights_that_cannot_share_a_layer_are_impossible_not_silently_untied():
    x = torch.randn(2, 4, 8, 8)
    strided = _TiedPair(nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False))
    with pytest.raises(orthofx.ImpossibleLayerError, match="tied to"):
        orthofx.transform(strided, rule(), example_inputs=(x,))
    # one of the pair outside the rule: the rule's layer would leave its partner behind
    only_a = {"rules": [{"name": "o", "match": {"type": "Conv2d", "name": "a"}, "apply": "orthogonal_conv"}]}
    with pytest.raises(orthofx.ImpossibleLayerError, match="tied to b"):
        orthofx.transform(_TiedPair(nn.Conv2d(4, 4, 3, padding=1, bias=False)), only_a, example_inputs=(x,))
    # every member's reason names the layers it is tied to, not itself
    pair = _TiedPair(nn.Conv2d(4, 4, 3, padding=1, bias=True))
    statuses = {c.site: c.status for c in orthofx.manifest_of(orthofx.transform(
        pair, rule(on_impossible="skip"), example_inputs=(x,))).changes}
    assert "tied to b," in statuses["a"] and "tied to a," in statuses["b"]
    # regularised, the status names the tie, not a missing orthogonal version (one exists for each layer alone)
    statuses = {c.site: c.status for c in orthofx.manifest_of(orthofx.transform(
        pair, rule(on_impossible="regularize"), example_inputs=(x,))).changes}
    assert statuses["a"] == statuses["b"] == "regularised (tied weight)"
    # skip leaves the whole group as it was: still one Parameter, the model's outputs unchanged
    model = _TiedPair(nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False))
    gm = orthofx.transform(model, rule(on_impossible="skip"), example_inputs=(x,))
    assert type(gm.a) is nn.Conv2d and type(gm.b) is nn.Conv2d and gm.a.weight is gm.b.weight
    assert torch.equal(gm(x), model(x))



def test_a_tied_weight_gets_its_lorth_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    torch.manual_seed(0)
    model = Tied()
    gm = orthofx.transform(model, "lorth")
    once = 0.01 * lorth64(model.a.weight)  # ||W W^T - I||_F^2 of the shared 4x4 weight, float64
    assert float(orthofx.penalty(gm)) == pytest.approx(once, rel=1e-5)
    assert "tied weight: counted once" in [c.what for c in orthofx.manifest_of(gm).changes if c.site == "b"][0]
    # untied layers keep one term each
    model.b.weight = nn.Parameter(model.a.weight.detach().clone())
    assert float(orthofx.penalty(orthofx.transform(model, "lorth"))) == pytest.approx(2 * once, rel=1e-5)


@pytest.mark.parametrize("training", [False, True])
def test_transform_builds_each_kernel_once(monkeypatch, training):
    # init_error, the report's output change and the final check on the example input all need the kernel; the
    # layer's eval cache (autograd off) shares one build between them, also for a model in training mode (the
    # transform runs it with eval flags set directly, which keeps the cache; train() / eval() would drop it)
    from orthofx.nn import orthogonal
    torch.manual_seed(0)
    model = orthofx.models.get("resnet18", width=4).train(training)
    builds = []
    unit_kernel = orthogonal._OrthogonalConvNd._unit_kernel
    monkeypatch.setattr(orthogonal._OrthogonalConvNd, "_unit_kernel",
                        lambda self, *a, **k: builds.append(self) or unit_kernel(self, *a, **k))
    gm = orthofx.transform(model, "orthogonal", example_inputs=(orthofx.models.example_input("resnet18"),))
    layers = [m for m in gm.modules() if isinstance(m, OrthogonalConv2d)]
    assert len(layers) == 17 and len(builds) == len(layers) and set(map(id, builds)) == set(map(id, layers))
    assert all(m.training == training for m in gm.modules())
    # a no-grad forward reads the cache in eval mode only: in training mode it builds every kernel again
    builds.clear()
    with torch.no_grad():
        gm(orthofx.models.example_input("resnet18"))
    assert len(builds) == (17 if training else 0)


def test_dilated_strided_convs_become_hard_orthogonal_layers():
    """A dilation next to a stride (gcd(D, S) = 1, and 2 with one residue read) gets an exactly orthogonal layer
    where Theorem 4 with dilation admits one, and L_orth where it does not; the frozen convs' operators, read off
    their forward on basis inputs, have singular values 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, dilation=3, padding=3), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, stride=2, dilation=2, padding=2), nn.ReLU(),
                          nn.Conv2d(4, 8, 3, stride=2, dilation=2, padding=2))   # 8 > 4 * 1 residue: impossible
    x = torch.randn(2, 2, 8, 8)
    gm = orthofx.transform(model, "orthogonal", example_inputs=(x,))
    rows = {r["site"]: r for r in orthofx.report(gm).rows}
    assert [rows[s]["pass"] for s in ("0", "2")] == ["orthogonal_conv (hard)"] * 2
    assert rows["4"]["pass"] == "orthogonal_conv (regularised (no orthogonal version))"
    frozen = orthofx.freeze(gm)
    for site, in_shape in (("0", (2, 8, 8)), ("2", (4, 4, 4))):
        conv = frozen.get_submodule(site).double()
        n = torch.tensor(in_shape).prod().item()
        basis = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
        with torch.no_grad():
            A = (conv(basis) - conv(torch.zeros(1, *in_shape, dtype=torch.float64))).reshape(n, -1)
        sigma = torch.linalg.svdvals(A)
        assert torch.allclose(sigma, torch.ones_like(sigma), atol=1e-6), site


def test_conv3d_layers_become_hard_orthogonal_layers_and_freeze_to_circular_conv3d():
    """The orthogonal preset on a model with Conv3d layers (a strided one, one with a Theorem-4 impossible shape):
    hard layers where admitted, L_orth elsewhere; the frozen Conv3d's operator has singular values 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 8, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Conv3d(8, 65, 1, stride=2))   # 65 > 8 * 2^3 with k < S: impossible
    x = torch.randn(2, 2, 4, 4, 4)
    gm = orthofx.transform(model, "orthogonal", example_inputs=(x,))
    rows = {r["site"]: r for r in orthofx.report(gm).rows}
    assert [rows[s]["pass"] for s in ("0", "2")] == ["orthogonal_conv (hard)"] * 2
    assert rows["4"]["pass"] == "orthogonal_conv (regularised (no orthogonal version))"
    frozen = orthofx.freeze(gm)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), gm.eval()(x), atol=1e-5, rtol=1e-5)
    conv = frozen.get_submodule("2").double()
    assert isinstance(conv, nn.Conv3d) and conv.padding_mode == "circular"
    n = 4 * 4 ** 3
    basis = torch.eye(n, dtype=torch.float64).reshape(n, 4, 4, 4, 4)
    with torch.no_grad():
        A = (conv(basis) - conv(torch.zeros(1, 4, 4, 4, 4, dtype=torch.float64))).reshape(n, -1)
    sigma = torch.linalg.svdvals(A)
    assert torch.allclose(sigma, torch.ones_like(sigma), atol=1e-6)
