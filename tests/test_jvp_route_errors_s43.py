"""Route ``"jvp"`` of ``orthofx.metrics.jacobian_isometry`` at a block forward mode cannot run: an orthofx error
(also the ``NotImplementedError`` callers caught) that names the fix, not torch's raw message; errors of the block
itself pass through unchanged. Route ``"auto"`` gives the dense float64 value there."""

import pytest
import torch

from orthofx.errors import ArgumentError, LayerArgumentError
from orthofx.metrics import jacobian_isometry
from orthofx.nn import ConvNormConv2d, JacobianProbe
from orthofx.nn.decompositions import eigh_stable, svd_stable


class OldStyleSin(torch.autograd.Function):
    """A custom Function written the pre-functorch way: ``forward(ctx, x)``, no ``setup_context``, no ``jvp``."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.sin()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * x.cos()


class NoJvpCube(torch.autograd.Function):
    """A functorch-style custom Function (``setup_context``) without a ``jvp`` rule."""

    @staticmethod
    def forward(x):
        return x ** 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * g * x ** 2


@pytest.mark.parametrize("function", [OldStyleSin, NoJvpCube])
def test_jvp_route_refusal_is_an_orthofx_error_naming_the_other_routes(function):
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ArgumentError, match="route 'jvp'.*Use route 'auto'.*'double_vjp'") as caught:
        jacobian_isometry(function.apply, x, route="jvp")
    assert isinstance(caught.value, NotImplementedError)
    assert caught.value.__cause__ is not None  # torch's own error stays attached


@pytest.mark.parametrize("function", [OldStyleSin, NoJvpCube])
def test_auto_route_falls_back_and_matches_the_dense_jacobian(function):
    torch.manual_seed(0)
    x = torch.randn(2, 3, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    value = jacobian_isometry(function.apply, x, route="auto", generator=g, create_graph=False)
    # the same Rademacher probe the estimate draws, and the elementwise map's diagonal Jacobian written out
    v = 2 * torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(5)) - 1
    slope = x.cos() if function is OldStyleSin else 3 * x ** 2
    reference = ((slope * slope * v - v) ** 2).sum()
    assert torch.allclose(value, reference, rtol=1e-10, atol=1e-12)


def test_an_error_of_the_block_itself_passes_through_unchanged():
    weight = torch.randn(5, 4)

    def block(x):
        return x @ weight  # x has 3 columns: a shape error of the block, not a forward-mode gap

    with pytest.raises(RuntimeError) as caught:
        jacobian_isometry(block, torch.randn(2, 3), route="jvp")
    assert not isinstance(caught.value, ArgumentError)
    assert "shapes cannot be multiplied" in str(caught.value)


class Unsupported(NotImplementedError):
    """A user's own NotImplementedError subclass."""


class RaisingBackward(torch.autograd.Function):
    """Has a jvp rule; its backward raises NotImplementedError (the user's, not a forward-mode refusal)."""

    @staticmethod
    def forward(x):
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def jvp(ctx, t):
        return t * 2

    @staticmethod
    def backward(ctx, g):
        raise NotImplementedError("RaisingBackward has no backward yet")


def _unsupported(x):
    raise Unsupported("MyBlock only supports 8 features")


def _jvp_named_error(x):
    raise RuntimeError("jvp_head: expected 8 channels, got 4")


@pytest.mark.parametrize("block, kind, text", [
    (_unsupported, Unsupported, "MyBlock only supports 8 features"),
    (_jvp_named_error, RuntimeError, "jvp_head: expected 8 channels"),
    (RaisingBackward.apply, NotImplementedError, "RaisingBackward has no backward yet"),
])
def test_the_blocks_own_errors_keep_their_type_and_message(block, kind, text):
    """Errors of the block that are not torch refusing forward mode reach the caller as raised (a user's
    NotImplementedError subclass, a RuntimeError whose text mentions jvp, a backward that raises)."""
    with pytest.raises(kind, match=text) as caught:
        jacobian_isometry(block, torch.randn(2, 3), route="jvp")
    assert not isinstance(caught.value, ArgumentError)


class _Whitening(torch.nn.Module):
    """A block through orthofx's stable decomposition (forward mode refused by orthofx, not torch)."""

    def __init__(self, decomposition):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.decomposition = decomposition

    def forward(self, x):
        h = self.lin(x)
        covariance = h.T @ h / h.shape[0] + 0.1 * torch.eye(4, dtype=h.dtype)
        return h @ self.decomposition(covariance)


@pytest.mark.parametrize("decomposition", [lambda c: eigh_stable(c)[1], lambda c: svd_stable(c)[0]],
                         ids=["eigh_stable", "svd_stable"])
def test_jvp_route_through_orthofx_decompositions_is_the_orthofx_error(decomposition):
    """A review found orthofx's own refusal (eigh_stable / svd_stable) passed through raw once the refusals were
    narrowed to torch's messages."""
    torch.manual_seed(0)
    x = torch.randn(6, 4, dtype=torch.float64)
    with pytest.raises(ArgumentError, match="route 'jvp'.*Use route 'auto'") as caught:
        jacobian_isometry(_Whitening(decomposition).double(), x, route="jvp")
    assert isinstance(caught.value, NotImplementedError)
    probe = JacobianProbe(_Whitening(decomposition).double(), route="jvp").train()
    with pytest.raises(LayerArgumentError, match="route 'jvp'"):
        probe(x)


def test_auto_route_falls_back_at_a_layer_refusing_function_transforms():
    """ConvNorm with running filters refuses torch.func in training mode (FuncTransformRefusal); route 'auto'
    falls back to the double-VJP route instead of raising it, here through a plain callable (the module itself
    was measured already). Reference: the dense float64 Jacobian with the estimate's probe."""
    torch.manual_seed(0)
    block = torch.nn.Sequential(ConvNormConv2d(torch.nn.Conv2d(2, 2, 3, padding=1), momentum=0.1),
                                torch.nn.Tanh()).double().train()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    value = jacobian_isometry(lambda z: block(z), x, route="auto", generator=torch.Generator().manual_seed(0),
                              create_graph=False)
    v = (2 * torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(0)) - 1).to(x.dtype).reshape(-1)
    J = torch.autograd.functional.jacobian(block, x).reshape(x.numel(), x.numel())
    reference = (J.T @ (J @ v) - v).square().sum()
    torch.testing.assert_close(value, reference, rtol=1e-10, atol=1e-10)
