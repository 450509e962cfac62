"""Review of freeze's rebinding of reads of orthofx layers' state (commit 2bbe06f, session 33).

A forward that reads a layer's weight and later writes some other tensor in place (``y += 1``,
``F.relu(y, inplace=True)``) was refused with "depends on state the forward writes": the constant analysis counts
every attribute upstream of a written tensor as written (right for folding), so the read had no value. A transformed
model of that kind froze before 2bbe06f. Only a write that reaches the read through first arguments (views,
``w.t().mul_(2)``) is one of the read's state.

Value matching tied a read to a tensor of another layer equal by chance (a deep-copied clone's weight) or to a
zero-initialised bias: equal outputs at freeze time, but the frozen model then trained or loaded the two as one.

References are dense float64 tensors built here (the layer's weight as a kernel or a matrix).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthofx
from orthofx.nn import OrthogonalLinear
from orthofx.nn.isometric import OrthogonalActivationBlock


class ConvReadsWeightInplace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = F.conv2d(self.conv(x), self.conv.weight, padding=1)
        y += 1
        return F.relu(y, inplace=True)


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_transformed_read_before_an_inplace_op_on_activations_freezes(mode):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    policy = dict(orthofx.Policy.load("orthogonal").to_dict(), capture={"mode": mode})
    gm = orthofx.transform(ConvReadsWeightInplace().double(), policy, example_inputs=(x,)).eval()
    with torch.no_grad():
        conv = gm.get_submodule("conv")
        W = conv.weight.detach().clone()
        reference = torch.relu(F.conv2d(conv(x), W, padding=1) + 1)  # dense kernel, out of place
        torch.testing.assert_close(gm(x), reference, atol=1e-12, rtol=0)
    frozen = orthofx.freeze(gm, example_inputs=(x,))
    with torch.no_grad():
        for _ in range(2):  # the in-place op writes nothing the next call reads
            torch.testing.assert_close(frozen(x), reference, atol=1e-12, rtol=0)


class TiedInplace(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = OrthogonalLinear(8, 4)

    def forward(self, x):
        y = F.linear(self.enc(x), self.enc.weight.T)
        y.mul_(2.0)
        return y


def test_tied_read_before_an_inplace_op_on_activations_freezes():
    torch.manual_seed(1)
    model = TiedInplace().double().eval()
    x = torch.randn(5, 8, dtype=torch.float64)
    with torch.no_grad():
        W, b = model.enc.weight.clone(), model.enc.bias.clone()
    reference = 2.0 * ((x @ W.T + b) @ W)  # dense float64
    frozen = orthofx.freeze(model, example_inputs=(x,))
    assert isinstance(frozen.enc, nn.Linear)
    assert [str(n.target) for n in frozen.graph.nodes if n.op == "get_attr"] == ["enc.weight"]
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(frozen(x), reference, atol=1e-12, rtol=0)


class WritesRead(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = OrthogonalLinear(4, 4)

    def forward(self, x):
        w = self.enc.weight.t()
        w.mul_(2.0)  # writes the read itself (through a view): the plain form's weight must not be written
        return self.enc(x) @ w


class WritesCopy(WritesRead):
    def forward(self, x):
        w = self.enc.weight.t().clone()
        w.mul_(2.0)  # the fix the error advises: a copy is written, not the read
        return self.enc(x) @ w


def test_read_written_through_a_view_is_still_refused():
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(orthofx.ExportError, match=r"writes in place.*Fix: write a copy instead"):
        orthofx.freeze(WritesRead().double().eval(), example_inputs=(x,))
    # the advised form freezes, with the eval output (x W^T + b) (2 W^T) computed here in float64
    model = WritesCopy().double().eval()
    W, b = model.enc.weight.detach(), model.enc.bias.detach()
    frozen = orthofx.freeze(model, example_inputs=(x,))
    for _ in range(2):  # the copy is written, not the frozen weight: the second call gives the same
        assert torch.allclose(frozen(x), (x @ W.T + b) @ (2 * W.T), atol=1e-12)


class Clones(nn.Module):
    """Two deep-copied layers (equal at initialisation), the decoder tied to the second."""

    def __init__(self):
        super().__init__()
        layer = OrthogonalLinear(6, 6)
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(2)])

    def forward(self, x):
        return F.linear(self.layers[1](self.layers[0](x)), self.layers[1].weight.T)


def test_read_is_tied_to_its_own_layer_not_an_equal_clone():
    """2bbe06f tied the read of layers[1].weight to layers[0].weight (equal values): loading other weights into
    the frozen model's second layer left the decoder on the first one's."""
    torch.manual_seed(2)
    model = Clones().double().eval()
    x = torch.randn(3, 6, dtype=torch.float64)
    frozen = orthofx.freeze(model, example_inputs=(x,))
    assert [str(n.target) for n in frozen.graph.nodes if n.op == "get_attr"] == ["layers.1.weight"]
    first, second = frozen.get_submodule("layers.0"), frozen.get_submodule("layers.1")
    with torch.no_grad():
        second.weight.copy_(torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64)).Q)  # other trained weights
        W0, b0, W1, b1 = first.weight, first.bias, second.weight, second.bias
        reference = ((x @ W0.T + b0) @ W1.T + b1) @ W1  # dense float64, the decoder on the second layer
        torch.testing.assert_close(frozen(x), reference, atol=1e-12, rtol=0)


class ZeroRead(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = OrthogonalLinear(6, 6)
        self.b = OrthogonalActivationBlock(6)
        with torch.no_grad():
            self.a.bias.zero_()

    def forward(self, x):
        return self.b(self.a(x)) + self.b.raw[0] * 0  # the read term is identically zero


def test_read_of_equal_entries_is_stored_not_tied_to_a_zero_bias():
    """``raw[0] * 0`` equals a zero-initialised bias (of its own layer's plain form, or of another layer's): 2bbe06f
    read that bias instead, so the frozen model's term moved with it."""
    torch.manual_seed(3)
    model = ZeroRead().double().eval()
    x = torch.randn(3, 6, dtype=torch.float64)
    frozen = orthofx.freeze(model, example_inputs=(x,))
    assert not [n.target for n in frozen.graph.nodes if n.op == "get_attr" and str(n.target).endswith("bias")]
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model(x), atol=1e-12, rtol=0)
        for _, t in frozen.named_parameters():
            t.add_(1.0)  # every plain layer moves; the read term stays zero
        reference = frozen.get_submodule("b")(frozen.get_submodule("a")(x))
        torch.testing.assert_close(frozen(x), reference, atol=1e-12, rtol=0)
