"""One-element conv size tuples (``stride=(2,)``, ``dilation=(2,)``, ``padding=(1,)``, ``output_padding=(1,)``),
which torch's convs apply to every dimension, in the isometric_init and orthogonal_conv passes and in ConvNorm
(all read through ``orthofx.nn.padding.per_dimension``), each checked against the same model built with full
tuples; and the eval-mode kernel cache under ``torch.__future__.set_swap_module_params_on_conversion(True)``."""

import copy
import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import LayerArgumentError
from orthofx.nn import ConvNormConv2d, OrthogonalConv2d, OrthogonalConvTranspose2d
from orthofx.nn.convnorm import _ntuple
from orthofx.passes.isometric_init import delta_taps
from orthofx.report import manifest_of


def _sizes(full: bool, value: int, d: int = 2):
    return (value,) * d if full else (value,)


def _transformed(build, full: bool, policy, x: torch.Tensor):
    torch.manual_seed(0)
    model = build(full)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, orthofx.transform(model, policy, example_inputs=(x,))


def _changes(gm) -> list[tuple]:
    return [(c.site, c.what, c.status, c.after) for c in manifest_of(gm).changes]


# ------------------------------------------------------------------------------------------ isometric_init

ISOMETRIC_MODELS = {
    "strided conv and transposed conv": (
        lambda f: nn.Sequential(
            nn.Conv2d(4, 8, 3, stride=_sizes(f, 2), padding=_sizes(f, 1)), nn.Tanh(),
            nn.ConvTranspose2d(8, 4, 3, stride=_sizes(f, 2), padding=_sizes(f, 1), output_padding=_sizes(f, 1))),
        (2, 4, 8, 8)),
    "dilated conv": (
        lambda f: nn.Sequential(nn.Conv2d(4, 4, 3, padding=_sizes(f, 2), dilation=_sizes(f, 2))),
        (2, 4, 8, 8)),
    "strided 3-d conv": (
        lambda f: nn.Sequential(nn.Conv3d(2, 8, 3, stride=_sizes(f, 2, 3), padding=_sizes(f, 1, 3))),
        (1, 2, 6, 6, 6)),
    "strided dilated 3-d conv, not exact": (
        lambda f: nn.Sequential(nn.Conv3d(2, 8, 3, stride=_sizes(f, 2, 3), padding=3, dilation=_sizes(f, 3, 3))),
        (1, 2, 6, 6, 6)),
}


@pytest.mark.parametrize("name", list(ISOMETRIC_MODELS))
def test_isometric_preset_reads_one_element_sizes_as_torch_does(name):
    build, shape = ISOMETRIC_MODELS[name]
    torch.manual_seed(2)
    x = torch.randn(shape)
    short_model, short = _transformed(build, False, "isometric", x)
    full_model, full = _transformed(build, True, "isometric", x)
    convs = [m for m in short_model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d))]
    full_convs = [m for m in full_model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d))]
    # the taps read every dimension: before, one (first, count) pair for a 2-d / 3-d kernel, and the pass raised
    # "delta_orthogonal_: taps=((1, 2),) must give (first, count) inside the kernel (3, 3) ..."
    for conv, reference in zip(convs, full_convs):
        assert len(delta_taps(conv)[0]) == conv.weight.dim() - 2
        assert delta_taps(conv) == delta_taps(reference)
    assert torch.equal(short(x), full(x))
    changes = _changes(short)
    assert changes == _changes(full) and len(changes) == len(convs)
    assert str(orthofx.report(short)) == str(orthofx.report(full))
    exact = "not exact" not in name
    assert all(after["exact"] == exact and (after["lorth"] < 1e-10) == exact for *_, after in changes)


# ------------------------------------------------------------------------------------------ orthogonal_conv

def _keep_policy(**extra):
    return {"orthofx": 1, "rules": [{"name": "keep", "match": {"type": ["Conv2d"]}, "apply": "orthogonal_conv",
                                     "with": {"padding": "keep", "fit_steps": 0, **extra}}]}


def test_padding_keep_status_of_a_one_element_stride():
    # 4 -> 12 channels at stride 2 in two dimensions is RO (12 <= 4 * 2**2); read as a 1-d stride (dims=1) it was
    # CO (12 > 4 * 2), and the status said "zero padding: not at borders" for a layer without padding
    def build(f):
        return nn.Sequential(nn.Conv2d(4, 12, 3, stride=_sizes(f, 2), padding=0)).double()

    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    _, short = _transformed(build, False, _keep_policy(), x)
    _, full = _transformed(build, True, _keep_policy(), x)
    assert _changes(short) == _changes(full)
    assert manifest_of(short).changes[0].status.startswith("hard (rows orthonormal")
    assert str(orthofx.report(short)) == str(orthofx.report(full))
    assert torch.equal(short(x), full(x))
    # independent of the status text: the layer's Jacobian has orthonormal rows (J J^T = I), dense, float64
    with torch.no_grad():  # the layer is affine: column i of J is its output on basis image i less the bias's
        basis = torch.eye(4 * 8 * 8, dtype=torch.float64).reshape(-1, 4, 8, 8)
        jac = (short(basis) - short(torch.zeros_like(basis[:1]))).flatten(1).T
    assert jac.shape == (12 * 3 * 3, 4 * 8 * 8)
    torch.testing.assert_close(jac @ jac.T, torch.eye(jac.shape[0], dtype=torch.float64), atol=1e-10, rtol=0)


@pytest.mark.parametrize("spatial", [(8, 7), (8, 2), (8, 8)])
def test_cayley_fft_checks_every_dimension_of_a_one_element_stride(spatial):
    # before: the stride and kernel checks zipped the input size with stride=(2,) and checked the first
    # dimension only; the layer's own check then raised LayerArgumentError instead of on_impossible: skip
    policy = {"orthofx": 1, "rules": [{"name": "fft", "match": {"type": ["Conv2d"]}, "apply": "orthogonal_conv",
                                       "with": {"method": "cayley_fft", "on_impossible": "skip"}}]}

    def build(f):
        return nn.Sequential(nn.Conv2d(4, 8, 3, stride=_sizes(f, 2), padding=_sizes(f, 1)))

    torch.manual_seed(3)
    x = torch.randn((2, 4) + spatial)
    model, short = _transformed(build, False, policy, x)
    _, full = _transformed(build, True, policy, x)
    assert _changes(short) == _changes(full)
    assert str(orthofx.report(short)) == str(orthofx.report(full))
    status = manifest_of(short).changes[0].status
    if spatial == (8, 8):
        assert status == "hard (cayley_fft, input 8x8 only)"
        assert isinstance(short.get_submodule("0"), OrthogonalConv2d)
    else:
        assert status.startswith("skipped: ")
        assert torch.equal(short(x), model(x))  # the layer left as it was
    assert torch.equal(short(x), full(x))


# ------------------------------------------------------------------------------------------ convnorm

def test_convnorm_preset_of_one_element_sizes():
    # a guard more than a fix (ConvNorm broadcast stride / dilation already; the report's sigma columns of a
    # stride=(2,) conv are orthofx/report.py's): its size reader is now per_dimension
    def build(f):
        return nn.Sequential(nn.Conv2d(4, 8, 3, stride=_sizes(f, 2), padding=_sizes(f, 1)), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, dilation=_sizes(f, 2), padding=_sizes(f, 2)))

    torch.manual_seed(4)
    x = torch.randn(2, 4, 9, 9)
    _, short = _transformed(build, False, "convnorm", x)
    _, full = _transformed(build, True, "convnorm", x)
    assert _changes(short) == _changes(full)
    assert str(orthofx.report(short)) == str(orthofx.report(full))
    assert torch.equal(short(x), full(x))
    with torch.no_grad():
        assert torch.equal(short.eval()(x), full.eval()(x))


def test_convnorm_size_reader_messages():
    assert _ntuple((2,), 2, "stride", broadcast=True) == (2, 2)
    assert _ntuple([1, 3], 2, "stride") == (1, 3)
    with pytest.raises(LayerArgumentError, match=r"^kernel_size must be an int or 2 ints, got \(3,\)$"):
        _ntuple((3,), 2, "kernel_size")
    with pytest.raises(LayerArgumentError, match=r"^stride must be an int or 2 ints, got \(1, 2, 3\)$"):
        _ntuple((1, 2, 3), 2, "stride", broadcast=True)
    # the value as given (before: the broadcast (2.0, 2.0), a tuple the caller never wrote)
    with pytest.raises(LayerArgumentError, match=r"^stride must hold integers, got \(2\.0,\)$"):
        _ntuple((2.0,), 2, "stride", broadcast=True)
    with pytest.raises(LayerArgumentError, match="must hold integers"):
        _ntuple((True, 2), 2, "dilation")


# ------------------------------------------------------------------------------------------ eval cache

def _orthogonal():
    return OrthogonalConv2d(3, 4, 3, padding=1), (2, 3, 6, 6)


def _transposed():
    return OrthogonalConvTranspose2d(4, 3, 4, stride=2, padding=1), (2, 4, 4, 4)


def _convnorm_conv():
    return ConvNormConv2d(nn.Conv2d(3, 4, 3, padding=1)), (2, 3, 6, 6)


def _target(layer):
    """The module whose tensors ``load_state_dict`` / ``.double()`` are called on (ConvNorm's inner conv: the
    layer itself drops its cache first)."""
    return layer.conv if isinstance(layer, ConvNormConv2d) else layer


@pytest.fixture
def swap_on_conversion():
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)


@pytest.mark.parametrize("make", [_orthogonal, _transposed, _convnorm_conv])
def test_eval_cache_lets_swap_tensors_load_and_convert(make, swap_on_conversion):
    # before: "Cannot swap t1 because it has weakref associated with it" (the cache's key held weak references)
    torch.manual_seed(5)
    layer, shape = make()
    x = torch.randn(shape)
    changed = {k: v + 0.05 * torch.randn_like(v) for k, v in _target(layer).state_dict().items()}
    layer.eval()
    with torch.no_grad():
        layer(x)
        _target(layer).load_state_dict(changed)
        reference = copy.deepcopy(layer)  # a copy keeps no cache: the reference builds its kernel afresh
        assert torch.equal(layer(x), reference(x))
        _target(layer).double()
        _target(reference).double()
        x = x.double()
        out = layer(x)
        assert out.dtype == torch.float64
        assert torch.equal(out, reference(x))
    # the cache still serves repeated forwards, and a write to a parameter still invalidates it
    with torch.no_grad():
        entry = layer.__dict__.get("_eval_cache") or layer.conv.__dict__.get("_eval_cache")
        layer(x)
        again = layer.__dict__.get("_eval_cache") or layer.conv.__dict__.get("_eval_cache")
        assert entry is not None and again is entry
        next(_target(layer).parameters()).mul_(1.5)
        next(_target(reference).parameters()).mul_(1.5)
        assert torch.equal(layer(x), reference(x))


@pytest.mark.parametrize("make", [_orthogonal, _transposed, _convnorm_conv])
def test_eval_cache_keeps_no_layer_alive(make):
    torch.manual_seed(6)
    layer, shape = make()
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(shape))
    assert "_eval_cache" in layer.__dict__ or "_eval_cache" in getattr(layer, "conv", layer).__dict__
    ref = weakref.ref(layer)
    enabled = gc.isenabled()
    gc.disable()
    try:
        del layer
        assert ref() is None  # freed by reference counting alone: the entry makes no cycle with the layer
    finally:
        if enabled:
            gc.enable()


def test_eval_cache_holds_no_graph_of_substituted_tensors():
    # tensors computed with gradients (a functional_call's fast weights) run under no_grad: held for their identity,
    # they would keep their graph alive until the next eval forward; they are not cached, and are freed with it
    torch.manual_seed(7)
    layer = OrthogonalConv2d(3, 4, 3, padding=1).eval()
    x = torch.randn(2, 3, 6, 6)
    names = [name for name, _ in layer.named_parameters()]
    fast = {name: p * 1.0 for name, p in layer.named_parameters()}  # each with a grad_fn
    probe = weakref.ref(fast[names[0]])
    reference = copy.deepcopy(layer)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(fast[name])
        out = torch.func.functional_call(layer, fast, (x,))
        assert torch.equal(out, reference(x))
    assert "_eval_cache" not in layer.__dict__
    del fast
    assert probe() is None
