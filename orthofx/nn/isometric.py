"""Blocks whose input-output Jacobian is exactly orthogonal (P2), usable on their own.

* :class:`OrthogonalActivationBlock`: ``y = sigma(Q x + b)`` with ``Q`` orthogonal. Its Jacobian is
  ``J = diag(sigma'(Q x + b)) Q``; with ``|sigma'| = 1`` the diagonal is a sign matrix ``S``, and ``S Q`` is
  orthogonal. Allowed activations:

  - ``"abs"`` (default): ``|z|``, ``sigma' = sign(z)`` (P2's example);
  - ``"identity"``: ``z`` (the block is the affine isometry ``Q x + b``);
  - ``"relu"``: ``max(z, 0)``, ``sigma'`` in {0, 1}: *not* orthogonal but a partial isometry (``J J^T J = J``,
    P2's extension), offered for comparison.

  Any other activation is refused, since it would break the property. The derivative at the kink ``z = 0`` is
  the one autograd uses (0 for abs and relu); that set has measure zero ("orthogonal almost everywhere").

* :class:`ReflectionResidualBlock`: ``y = x - 2 W^T relu(W x + b)`` with ``W`` (``hidden x features``,
  ``hidden <= features``) having orthonormal rows. Its Jacobian is ``I - 2 W^T D W`` with ``D`` the 0/1 diagonal
  of active units; since ``W W^T = I``, ``P = W^T D W`` is an orthogonal projector, and ``I - 2P`` is a
  reflection: symmetric and orthogonal. A residual form whose Jacobian never drifts from isometry with depth.

Orthonormal parametrisation (self-contained, no ``torch.nn.utils.parametrize``): a free matrix
``V`` (``n x p``, ``n >= p``) is mapped to the sign-fixed Q factor of its thin QR decomposition, ``qf(V)``, which has
orthonormal columns for every full-rank ``V`` and is differentiable. (Householder QR gives orthonormal columns
for a rank-deficient or zero ``V`` too, though not differentiably: whatever is written into ``raw``, the blocks'
matrices are orthonormal, so the reflection's requirement ``W W^T = I`` holds by construction.) For the square
``Q`` this reaches every orthogonal matrix (both determinants); ``V`` starts as a Gaussian matrix, so ``qf(V)``
starts Haar-random.
The current matrices are available as :attr:`OrthogonalActivationBlock.weight` and
:attr:`ReflectionResidualBlock.weight` (computed on access). ``to_plain()`` (what :func:`orthofx.freeze` calls)
bakes them into plain ``nn.Linear`` layers wired by a small ``torch.fx.GraphModule``: the same outputs, no QR.

Example::

    import torch
    from orthofx.nn.isometric import OrthogonalActivationBlock
    block = OrthogonalActivationBlock(8)
    x = torch.randn(8)
    J = torch.autograd.functional.jacobian(block, x)
    torch.testing.assert_close(J.T @ J, torch.eye(8), atol=1e-5, rtol=0)
"""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from orthofx.errors import LayerArgumentError, layer_label
from orthofx.theory import _flag as _theory_flag, _positive_int

from .orthogonal import (_baked_linear, _ComputedWeight, _frozen_requires_grad, check_input_dtype,
                         check_last_dimension, refuse_weight_assignment)
from .precision import HALF_PRECISION
from .stiefel import orthonormal

__all__ = ["OrthogonalActivationBlock", "ReflectionResidualBlock", "ISOMETRIC_ACTIVATIONS"]

#: Activations :class:`OrthogonalActivationBlock` accepts ("relu" gives a partial isometry only).
ISOMETRIC_ACTIVATIONS = ("abs", "identity", "relu")


def _qf(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``qf(raw)`` (orthonormal columns) in ``raw``'s dtype. Half-precision parameters (``.half()``,
    ``.to(torch.bfloat16)``) are factored in float32 and rounded back: CPU QR has no float16 / bfloat16 kernel.
    (Here and not in :func:`orthonormal`, which must stay free of dtype branches for symbolic tracing.)
    ``dtype`` is the parameter's concrete dtype, passed separately: while ``torch.fx`` traces the forward,
    ``raw`` is a Proxy whose ``dtype`` cannot decide a Python branch (the branch is resolved at trace time)."""
    if dtype in HALF_PRECISION:
        return orthonormal(raw.float(), tall=True).to(dtype)
    return orthonormal(raw, tall=True)


def _raw_dtype(block: nn.Module) -> torch.dtype:
    """The concrete dtype of ``block.raw``: read from ``_parameters``, which ``torch.fx``'s tracer does not turn
    into a Proxy (``block.raw`` when a wrapper has replaced the parameter by a plain tensor attribute)."""
    raw = block._parameters.get("raw")
    return (raw if raw is not None else block.raw).dtype


def _factory(layer: nn.Module, device, dtype) -> dict:
    """``device`` and ``dtype`` for the parameters; ``dtype`` must be a real floating-point ``torch.dtype``."""
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point
                              or dtype.is_complex):
        raise LayerArgumentError(f"{layer_label(layer)}: dtype must be a real floating-point torch.dtype (e.g. "
                                 f"torch.float32), got {dtype!r}: the blocks' matrices are real orthogonal")
    return {"device": device, "dtype": dtype}


def _size(layer: nn.Module, value, name: str) -> int:
    """``value`` as a positive integer, or a :class:`LayerArgumentError` naming the block and the argument."""
    return _positive_int(value, f"{layer_label(layer)}: {name}", LayerArgumentError)


def _flag(layer: nn.Module, value, name: str) -> bool:
    """``value`` as a bool (:func:`orthofx.theory._flag`); ``bias="no"`` is truthy and gave a bias without a word."""
    return _theory_flag(value, f"{layer_label(layer)}: {name}", LayerArgumentError)


def _check_input(x: torch.Tensor, features: int, layer: nn.Module) -> None:
    """Refuse an input whose last dimension is not ``features``, or whose dtype is not the parameters' (outside
    ``torch.autocast``, which casts the matmul's operands itself): raw matmul errors otherwise. Skipped while
    ``torch.fx`` symbolically traces the forward (a Proxy has no concrete shape)."""
    if isinstance(x, torch.fx.Proxy):
        return
    if not isinstance(x, torch.Tensor):
        raise LayerArgumentError(f"{layer_label(layer)}: expected a torch.Tensor input, got {type(x).__name__}")
    if not x.is_floating_point():  # an integer or complex input met a raw matmul dtype error
        raise LayerArgumentError(f"{layer_label(layer)}: expected a real floating-point input, got dtype {x.dtype}; "
                                 "convert it (x.float()) or embed token ids first")
    check_last_dimension(x, features, layer, name="features", noun="block")
    check_input_dtype(x, _raw_dtype(layer), layer, noun="block")


class _ComputedBlockWeight(_ComputedWeight):
    """``weight`` is computed from ``raw``: an assignment (``torch.func.functional_call`` with a key ``weight``)
    is refused naming the parameters to give instead (:class:`~orthofx.nn.orthogonal._ComputedWeight`)."""

    _computed_what = "is the orthonormal factor of raw, computed at every access"

    def _refuse_assignment(self) -> None:
        refuse_weight_assignment(self, self._computed_what, "to set it, write raw (any full-rank matrix: its Q factor "
                                 "is used), or use to_plain() for plain nn.Linear layers whose weight can be set")


@torch.no_grad()
def _reset_block(block: nn.Module) -> None:
    """A block's initialisation, also after deferred construction (``torch.device("meta")`` then ``to_empty()``,
    whose memory is uninitialised, as ``nn.Linear.reset_parameters`` serves there): ``raw`` Gaussian, so that
    ``qf(raw)`` is Haar-random, and ``b = 0``.

    ``weight`` is computed from ``raw`` at every access: an initialiser applied to it (``nn.init.*_(block.weight)``,
    ``block.weight.data.copy_(...)``) writes into that temporary and changes nothing. Re-initialise with this, or
    write ``raw`` (any full-rank matrix: its Q factor is used)."""
    block.raw.normal_()
    if block.bias is not None:
        block.bias.zero_()


class OrthogonalActivationBlock(_ComputedBlockWeight, nn.Module):
    """``y = sigma(Q x + b)``, ``Q`` orthogonal (``features x features``), ``|sigma'| = 1``: orthogonal Jacobian.

    Args:
        features: input and output size (the last dimension of ``x``).
        activation: ``"abs"`` (default), ``"identity"`` or ``"relu"`` (partial isometry only); see the module
            docstring.
        bias: learn ``b`` (initialised to zero).
        device, dtype: of the parameters; ``dtype`` a real floating-point one.

    An input whose last dimension is not ``features`` raises :class:`~orthofx.errors.LayerArgumentError`.

    >>> import torch
    >>> from orthofx.nn import OrthogonalActivationBlock
    >>> deep = torch.nn.Sequential(*[OrthogonalActivationBlock(16) for _ in range(20)])
    >>> x, v = torch.randn(4, 16, requires_grad=True), torch.randn(4, 16)
    >>> deep(x).backward(v)                                   # back-propagate v through 20 blocks
    >>> torch.allclose(x.grad.norm(dim=1), v.norm(dim=1), rtol=1e-4)   # every sample's gradient keeps its norm
    True
    """

    def __init__(self, features: int, activation: str = "abs", bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.features = _size(self, features, "features")
        if not isinstance(activation, str) or activation not in ISOMETRIC_ACTIVATIONS:
            raise LayerArgumentError(f"{layer_label(self)}: activation {activation!r} does not keep the Jacobian "
                                     f"orthogonal; choose one of {', '.join(ISOMETRIC_ACTIVATIONS)} (|sigma'| = 1; "
                                     "relu gives a partial isometry)")
        self.activation = activation
        bias = _flag(self, bias, "bias")
        factory = _factory(self, device, dtype)
        self.raw = nn.Parameter(torch.empty(self.features, self.features, **factory))
        self.bias = nn.Parameter(torch.empty(self.features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """:func:`_reset_block`: a Haar-random ``Q`` again, ``b = 0``."""
        _reset_block(self)

    @property
    def weight(self) -> torch.Tensor:
        """The orthogonal matrix ``Q`` (``features x features``), computed from ``raw`` at every access
        (:func:`_reset_block` says how to re-initialise it)."""
        return _qf(self.raw, _raw_dtype(self))

    @weight.setter
    def weight(self, value) -> None:
        self._refuse_assignment()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.features, self)
        # one F.linear, as nn.Linear and the frozen form: under torch.autocast it casts the bias with the matmul's
        # operands, where ``x @ Q^T + b`` added a float32 bias to the half-precision product and returned float32
        z = F.linear(x, self.weight, self.bias)
        if self.activation == "abs":
            return z.abs()
        if self.activation == "relu":
            return torch.relu(z)
        return z

    @torch.no_grad()
    def to_plain(self) -> torch.fx.GraphModule:
        """The protocol ``orthofx.freeze`` uses: ``sigma(linear(x))`` with ``linear`` a plain ``nn.Linear`` holding
        the current ``Q`` and ``b`` (same outputs; ``requires_grad`` follows ``raw``'s and the bias's)."""
        linear = _baked_linear(self.weight, self.bias)
        graph = torch.fx.Graph()
        z = graph.call_module("linear", (graph.placeholder("x"),))
        if self.activation != "identity":
            z = graph.call_function(torch.abs if self.activation == "abs" else torch.relu, (z,))
        graph.output(z)
        return _plain_module(self, {"linear": linear}, graph)

    def extra_repr(self) -> str:
        return f"features={self.features}, activation={self.activation!r}, bias={self.bias is not None}"


class ReflectionResidualBlock(_ComputedBlockWeight, nn.Module):
    """``y = x - 2 W^T relu(W x + b)``, ``W`` (``hidden x features``) with orthonormal rows: its Jacobian
    ``I - 2 W^T D W`` is a reflection (orthogonal and symmetric) wherever no unit sits exactly at 0 (there the
    block is not differentiable; autograd's ``relu'(0) = 0`` counts the unit inactive, and the Jacobian it
    returns is a reflection too).

    Args:
        features: input and output size.
        hidden: number of units, ``1 <= hidden <= features``.
        bias: learn ``b`` (initialised to zero).
        device, dtype: of the parameters; ``dtype`` a real floating-point one.

    An input whose last dimension is not ``features`` raises :class:`~orthofx.errors.LayerArgumentError`.

    >>> import torch
    >>> from orthofx.nn import ReflectionResidualBlock
    >>> block = ReflectionResidualBlock(8, hidden=3)
    >>> with torch.no_grad():
    ...     _ = block.bias.normal_()                          # so that some units are active
    >>> J = torch.autograd.functional.jacobian(block, torch.randn(8))
    >>> torch.allclose(J, J.T, atol=1e-6), torch.allclose(J @ J, torch.eye(8), atol=1e-5)   # a reflection
    (True, True)
    """

    def __init__(self, features: int, hidden: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.features = _size(self, features, "features")
        self.hidden = _size(self, hidden, "hidden")
        if self.hidden > self.features:
            raise LayerArgumentError(f"{layer_label(self)}: hidden ({hidden}) must not exceed features "
                                     f"({features}): W needs orthonormal rows; pass hidden <= {self.features}")
        bias = _flag(self, bias, "bias")
        factory = _factory(self, device, dtype)
        self.raw = nn.Parameter(torch.empty(self.features, self.hidden, **factory))  # W^T = qf(raw)
        self.bias = nn.Parameter(torch.empty(self.hidden, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """:func:`_reset_block`: Haar-random orthonormal rows ``W`` again, ``b = 0``."""
        _reset_block(self)

    @property
    def weight(self) -> torch.Tensor:
        """``W`` (``hidden x features``, orthonormal rows), computed from ``raw`` at every access
        (:func:`_reset_block` says how to re-initialise it)."""
        return _qf(self.raw, _raw_dtype(self)).transpose(0, 1)

    @weight.setter
    def weight(self, value) -> None:
        self._refuse_assignment()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.features, self)
        wt = _qf(self.raw, _raw_dtype(self))  # features x hidden, = W^T
        # F.linear, as the frozen form's two nn.Linear layers: under torch.autocast the hidden units are then
        # autocast's dtype there too (``x @ W^T + b`` promoted them to float32 with the bias)
        z = F.linear(x, wt.transpose(0, 1), self.bias)
        return x - 2.0 * F.linear(torch.relu(z), wt)

    @torch.no_grad()
    def to_plain(self) -> torch.fx.GraphModule:
        """The protocol ``orthofx.freeze`` uses: ``x - 2 * back(relu(hidden(x)))`` with plain ``nn.Linear`` layers,
        ``hidden`` holding ``W`` and ``b``, ``back`` (no bias) holding ``W^T`` (same outputs; ``requires_grad``
        follows ``raw``'s and the bias's)."""
        w = self.weight
        modules = {"hidden": _baked_linear(w, self.bias), "back": _baked_linear(w.transpose(0, 1), None)}
        graph = torch.fx.Graph()
        x = graph.placeholder("x")
        back = graph.call_module("back", (graph.call_function(torch.relu, (graph.call_module("hidden", (x,)),)),))
        graph.output(graph.call_function(operator.sub, (x, graph.call_function(operator.mul, (back, 2.0)))))
        return _plain_module(self, modules, graph)

    def extra_repr(self) -> str:
        return f"features={self.features}, hidden={self.hidden}, bias={self.bias is not None}"


def _plain_module(block: nn.Module, modules: dict[str, nn.Module], graph: torch.fx.Graph) -> torch.fx.GraphModule:
    """``graph`` over ``modules`` as a GraphModule named ``Frozen<Block>``, in the block's mode, with the
    parameters' ``requires_grad`` following the block's (a frozen block stays frozen)."""
    plain = torch.fx.GraphModule(modules, graph, class_name=f"Frozen{type(block).__name__}")
    plain.train(block.training)
    return _frozen_requires_grad(block, plain)
