"""freeze / export of hand-written models that use orthofx directly (session 33, fuzz round 6).

A. A forward that calls an orthofx layer and also reads its ``.weight`` (weight tying): the traced graph read the
   layer's raw parameters (``get_attr enc.raw_weight``), which the plain form has not, so freeze raised a raw
   AttributeError and ``.pt2`` export "Node referenced nonexistent target". The frozen graph must read the plain
   layer's baked weight and keep the eval outputs.
B. A forward calling ``orthofx.nn.eigh_stable`` / ``svd_stable``: the frozen graph kept the custom ops
   ``orthofx::eigh_stable`` (a ``.pt2`` then needs orthofx to load), and a model holding only such calls was told
   "nothing to freeze".

References are dense float64 matrices built here (the layer's weight as a matrix, ``torch.linalg.eigh``).
"""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthofx
from orthofx.nn import (ConvNormConv2d, OrthogonalConv1d, OrthogonalConv2d, OrthogonalConv3d,
                        OrthogonalConvTranspose1d, OrthogonalConvTranspose2d, OrthogonalLinear, eigh_stable,
                        svd_stable)
from orthofx.nn.isometric import OrthogonalActivationBlock, ReflectionResidualBlock

RAW_NAMES = ("raw", "raw_weight", "matrix", "proj_a", "proj_b")


def _orthofx_left(frozen: nn.Module) -> list[str]:
    """What a frozen graph must not hold: a module still offering to_plain(), a custom orthofx op, a read of an
    orthofx layer's raw parameters."""
    left = [name for name, m in frozen.named_modules() if name and callable(getattr(m, "to_plain", None))]
    for node in frozen.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("orthofx."):
            left.append(str(node.target))
        if node.op == "get_attr" and str(node.target).rpartition(".")[2] in RAW_NAMES:
            left.append(str(node.target))
    return left


class Tied(nn.Module):
    """``y = W^T (W x + b)``: the encoder's weight read again, transposed (tied decoder)."""

    def __init__(self):
        super().__init__()
        self.enc = OrthogonalLinear(8, 4)

    def forward(self, x):
        return F.linear(self.enc(x), self.enc.weight.T)


def test_tied_orthogonal_linear_freezes_to_its_baked_weight(tmp_path):
    torch.manual_seed(0)
    model = Tied().double().eval()
    x = torch.randn(5, 8, dtype=torch.float64)
    with torch.no_grad():
        W, b = model.enc.weight.clone(), model.enc.bias.clone()
    reference = (x @ W.T + b) @ W  # dense float64
    frozen = orthofx.freeze(model, example_inputs=(x,))
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), reference, atol=1e-12, rtol=0)
        torch.testing.assert_close(frozen(x), model(x), atol=1e-12, rtol=0)
    assert _orthofx_left(frozen) == []
    assert isinstance(frozen.enc, nn.Linear)
    # the tie holds: the decoder reads the plain layer's weight, no second copy
    assert [str(n.target) for n in frozen.graph.nodes if n.op == "get_attr"] == ["enc.weight"]
    result = orthofx.export(model, os.fspath(tmp_path / "tied.pt2"), example_inputs=(x,))
    assert result.max_abs_diff < 1e-12
    program = torch.export.load(os.fspath(tmp_path / "tied.pt2"))
    assert not [n for n in program.graph.nodes if "orthofx" in str(n.target)]
    torch.testing.assert_close(program.module()(x), reference, atol=1e-12, rtol=0)


class ReadsWeight(nn.Module):
    def __init__(self, layer, read):
        super().__init__()
        self.layer = layer
        self.read = read

    def forward(self, x):
        y = self.layer(x)
        return y, self.read(self.layer, y)


CASES = {
    "linear": (lambda: OrthogonalLinear(8, 4), (3, 8),
               lambda layer, y: y @ layer.weight, lambda W, y: y @ W),
    "conv1d": (lambda: OrthogonalConv1d(4, 4, 3), (2, 4, 8),
               lambda layer, y: F.conv1d(y, layer.weight, padding=1), lambda W, y: F.conv1d(y, W, padding=1)),
    "conv2d": (lambda: OrthogonalConv2d(4, 4, 3), (2, 4, 6, 6),
               lambda layer, y: F.conv2d(y, layer.weight, padding=1), lambda W, y: F.conv2d(y, W, padding=1)),
    "conv3d": (lambda: OrthogonalConv3d(2, 2, 3), (2, 2, 4, 4, 4),
               lambda layer, y: F.conv3d(y, layer.weight, padding=1), lambda W, y: F.conv3d(y, W, padding=1)),
    "conv_transpose1d": (lambda: OrthogonalConvTranspose1d(4, 4, 3), (2, 4, 8),
                         lambda layer, y: y * layer.weight.sum(), lambda W, y: y * W.sum()),
    "conv_transpose2d": (lambda: OrthogonalConvTranspose2d(4, 4, 3), (2, 4, 6, 6),
                         lambda layer, y: y * layer.weight.norm(), lambda W, y: y * W.norm()),
    "convnorm2d": (lambda: ConvNormConv2d(nn.Conv2d(4, 4, 3, padding=1)), (2, 4, 6, 6),
                   lambda layer, y: F.conv2d(y, layer.conv.weight, padding=1), None),
    "activation_block": (lambda: OrthogonalActivationBlock(6), (3, 6),
                         lambda layer, y: y @ layer.weight, lambda W, y: y @ W),
    "reflection_block": (lambda: ReflectionResidualBlock(6, 4), (3, 6),
                         lambda layer, y: y @ layer.weight.T, lambda W, y: y @ W.T),
}


@pytest.mark.parametrize("name", list(CASES))
def test_layer_weight_read_beside_its_call_freezes(name):
    build, shape, read, dense = CASES[name]
    torch.manual_seed(1)
    model = ReadsWeight(build(), read).double().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        y, expected = model(x)
        if dense is not None:  # the read, from the layer's weight as a dense float64 tensor
            torch.testing.assert_close(expected, dense(model.layer.weight.detach().clone(), y), atol=1e-12, rtol=0)
    frozen = orthofx.freeze(model, example_inputs=(x,))
    assert _orthofx_left(frozen) == []
    with torch.no_grad():
        got = frozen(x)
    torch.testing.assert_close(got[0], y, atol=1e-12, rtol=0)
    torch.testing.assert_close(got[1], expected, atol=1e-12, rtol=0)


class CallsPart(nn.Module):
    def __init__(self, layer, part):
        super().__init__()
        self.layer = layer
        self.part = part

    def forward(self, x):
        return self.layer(x) + getattr(self.layer, self.part)(x)


@pytest.mark.parametrize("build", [lambda: OrthogonalConvTranspose2d(4, 4, 3),  # plain form: no part 'conv'
                                   lambda: ConvNormConv2d(nn.Conv2d(4, 4, 3, padding=1))])  # another 'conv'
def test_call_of_a_part_of_a_replaced_layer_is_an_orthofx_error(build):
    x = torch.randn(2, 4, 6, 6)
    with pytest.raises(orthofx.ExportError, match="'layer.conv'.*to_plain"):
        orthofx.freeze(CallsPart(build(), "conv").eval(), example_inputs=(x,))


class Whiten(nn.Module):
    """ZCA whitening of the batch through orthofx's stable eigh, called directly, after an orthogonal layer."""

    def __init__(self, layer: bool):
        super().__init__()
        self.fc = OrthogonalLinear(6, 6) if layer else nn.Linear(6, 6)

    def forward(self, x):
        h = self.fc(x)
        cov = h.T @ h / h.shape[0] + 1e-3 * torch.eye(6, dtype=h.dtype)
        L, V = eigh_stable(cov)
        return h @ V @ torch.diag_embed(L.rsqrt()) @ V.T


class Singular(nn.Module):
    def forward(self, x):
        U, S, Vh = svd_stable(x)
        return U * S.unsqueeze(-2), Vh


@pytest.mark.parametrize("layer", [True, False])
def test_direct_eigh_stable_freezes_to_torch_linalg(layer, tmp_path):
    torch.manual_seed(2)
    model = Whiten(layer).double().eval()
    x = torch.randn(16, 6, dtype=torch.float64)
    with torch.no_grad():
        h = model.fc(x)
        cov = h.T @ h / 16 + 1e-3 * torch.eye(6, dtype=torch.float64)
        L, V = torch.linalg.eigh(cov)
        reference = h @ V @ torch.diag(L.rsqrt()) @ V.T
    frozen = orthofx.freeze(model, example_inputs=(x,))
    assert _orthofx_left(frozen) == []
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), reference, atol=1e-10, rtol=0)
    path = os.fspath(tmp_path / "whiten.pt2")
    orthofx.export(model, path, example_inputs=(x,))
    program = torch.export.load(path)
    assert not [n for n in program.graph.nodes if str(n.target).startswith("orthofx.")]
    torch.testing.assert_close(program.module()(x), reference, atol=1e-10, rtol=0)


def test_direct_svd_stable_freezes_to_torch_linalg():
    torch.manual_seed(3)
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    frozen = orthofx.freeze(Singular().eval(), example_inputs=(x,))
    assert _orthofx_left(frozen) == []
    U, S, Vh = torch.linalg.svd(x, full_matrices=False)
    with torch.no_grad():
        US, Vh_frozen = frozen(x)
    # signs of singular vectors are the LAPACK call's: compare the products, which are sign-free
    torch.testing.assert_close(US @ Vh_frozen, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(US.abs(), (U * S.unsqueeze(-2)).abs(), atol=1e-12, rtol=0)


def test_model_without_any_orthofx_still_has_nothing_to_freeze():
    with pytest.raises(orthofx.OrthofxError, match="nothing to freeze"):
        orthofx.freeze(nn.Sequential(nn.Linear(3, 3)), example_inputs=(torch.randn(2, 3),))


def test_read_of_raw_state_no_plain_tensor_holds_is_stored_once():
    """``y @ block.raw``: no tensor of the plain form holds the raw parameter, so freeze stores its eval value."""
    torch.manual_seed(5)
    model = ReadsWeight(OrthogonalActivationBlock(6), lambda layer, y: y @ layer.raw).double().eval()
    x = torch.randn(3, 6, dtype=torch.float64)
    raw = model.layer.raw.detach().clone()
    with torch.no_grad():
        y = model(x)[0]
    frozen = orthofx.freeze(model, example_inputs=(x,))
    assert _orthofx_left(frozen) == []
    torch.testing.assert_close(frozen.orthofx_read_0, raw, atol=0, rtol=0)
    with torch.no_grad():
        got = frozen(x)
    torch.testing.assert_close(got[0], y, atol=1e-12, rtol=0)
    torch.testing.assert_close(got[1], y @ raw, atol=1e-12, rtol=0)


class ConvReadsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return F.conv2d(self.conv(x), self.conv.weight, padding=1)


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_transformed_model_reading_conv_weight_freezes(mode):
    """The "orthogonal" preset on a model whose forward also reads ``conv.weight`` (a check: this worked before)."""
    torch.manual_seed(6)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    policy = dict(orthofx.Policy.load("orthogonal").to_dict(), capture={"mode": mode})
    gm = orthofx.transform(ConvReadsWeight().double(), policy, example_inputs=(x,)).eval()
    with torch.no_grad():
        conv = gm.get_submodule("conv")
        reference = F.conv2d(conv(x), conv.weight.detach().clone(), padding=1)  # the read, as a dense kernel
        torch.testing.assert_close(gm(x), reference, atol=1e-12, rtol=0)
    frozen = orthofx.freeze(gm, example_inputs=(x,))
    assert _orthofx_left(frozen) == []
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), reference, atol=1e-12, rtol=0)


def test_direct_eigh_stable_inverse_square_root_exports_to_onnx(tmp_path):
    """Once the custom op is the stand-in, ONNX export finds its ``V diag(L^-1/2) V^T`` (Newton-Schulz)."""
    pytest.importorskip("onnxruntime")

    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = OrthogonalLinear(6, 6)

        def forward(self, x):
            h = self.fc(x)
            L, V = eigh_stable(h.T @ h / h.shape[0] + 0.1 * torch.eye(6))
            return h @ (V @ torch.diag_embed(L.rsqrt()) @ V.T)

    torch.manual_seed(7)
    model, x = Root().eval(), torch.randn(16, 6)
    result = orthofx.export(model, os.fspath(tmp_path / "root.onnx"), example_inputs=(x,))
    assert result.newton_schulz and result.max_abs_diff < 1e-4
    with torch.no_grad():  # the float64 inverse square root, from torch.linalg.eigh
        h = model.fc(x).double()
        L, V = torch.linalg.eigh(h.T @ h / 16 + 0.1 * torch.eye(6, dtype=torch.float64))
        torch.testing.assert_close(model(x).double(), h @ V @ torch.diag(L.rsqrt()) @ V.T, atol=1e-5, rtol=0)
