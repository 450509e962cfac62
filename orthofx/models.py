"""Built-in example models: the defaults of examples, benchmarks and tests.

Plain torch only: this module imports nothing of orthofx (but its error types, when it is ``orthofx.models``), so a
model defined here behaves exactly like a user's model would. Every model

* is traceable by ``torch.fx.symbolic_trace`` (no data-dependent Python control flow; the only Python branches
  are on ``self.training``, which a trace resolves, so orthofx captures such models in both modes, and the input
  checks of the covariance layers, which are skipped for a ``torch.fx.Proxy`` and run on fake tensors under
  ``torch.compile``),
* is deterministic given ``torch.manual_seed`` (plain PyTorch default initialisation),
* takes small keyword arguments (``width``, ``depth``, ``num_classes`` ...), so tests can build tiny versions,
* checks them: a bad argument (``width=0``, ``num_classes=True``, ``eps=-1``, ``momentum=2``, an unknown
  ``activation`` ...) raises ``orthofx.errors.ArgumentError`` naming the model and the argument, a bad input to
  ``DecorrelatedBatchNorm2d``, ``CovariancePooling`` or ``UpperTriangle`` raises
  ``orthofx.errors.LayerArgumentError``. Both are ``ValueError`` subclasses; they are looked up in ``sys.modules``
  when raised, and imported only by ``orthofx.models`` itself (a copy of this file used without orthofx raises
  plain ``ValueError`` and imports nothing of orthofx). ``get(name, **kwargs)`` refuses a keyword its model does
  not take with ``ArgumentError`` too (the valid keywords, did-you-mean), not Python's ``TypeError``.

Registry::

    names()                      -> sorted list of model names
    get(name, **kwargs)          -> a fresh nn.Module (unknown name: ArgumentError with the names, did-you-mean)
    input_shape(name)            -> per-sample input shape, e.g. (3, 32, 32), (1, 8, 8), (64,)
    example_input(name, batch=2, seed=0) -> a standard-normal batch of that shape (private generator)
    num_classes(name)            -> 10 for every built-in model

Models (class, input):

=============  ==================  ==========================================================================
name           class               what
=============  ==================  ==========================================================================
resnet18       ResNet18            BasicBlock ResNet [2,2,2,2], CIFAR stem, 3x32x32
resnet50       ResNet50            Bottleneck ResNet [3,4,6,3] (expansion 4), CIFAR stem, 3x32x32
vgg11          VGG11               VGG-11 conv stack with BatchNorm, 3x32x32
small_cnn      SmallCNN            three convs + linear head, 1x8x8 digits
dbn_cnn        DBNCNN              conv1 (the Pre-SVD layer) -> DecorrelatedBatchNorm2d (ZCA whitening, eigh)
gcp_cnn        GCPCNN              convs -> conv_last (the Pre-SVD layer) -> CovariancePooling (matrix sqrt, eigh)
deep_mlp       DeepMLP             ``depth`` Linear+activation layers, no residuals, no normalisation, 64 inputs
deep_cnn       DeepCNN             ``depth`` 3x3 convs + activation, no residuals, no normalisation, 3x32x32
deep_linear    DeepLinear          ``depth`` bias-free Linear layers, no activation, 64 -> 64 (P1)
=============  ==================  ==========================================================================

``deep_linear`` is a regression model: its output has ``out_features`` (64) columns, not ``num_classes``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import operator
import sys

import torch
import torch.fx
import torch.nn as nn

__all__ = [
    "names",
    "get",
    "input_shape",
    "example_input",
    "num_classes",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "ResNet18",
    "ResNet50",
    "VGG11",
    "SmallCNN",
    "DecorrelatedBatchNorm2d",
    "DBNCNN",
    "CovariancePooling",
    "UpperTriangle",
    "GCPCNN",
    "Abs",
    "DeepMLP",
    "DeepCNN",
    "DeepLinear",
]


# --------------------------------------------------------------------------------------------------- helpers


class Abs(nn.Module):
    """Elementwise absolute value, an activation with ``|sigma'| = 1`` (P2's exactly isometric layers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.abs(x)


_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "abs": Abs}

# why DecorrelatedBatchNorm2d's eps and momentum have the ranges they have (quoted by the error messages)
_DBN_EPS_WHY = "the whitening takes lambda^-1/2 of cov + eps * I, and a covariance of few samples is singular"
_MOMENTUM_WHY = "the running statistics move this fraction of the way to the batch's"


def _error(message: str, forward: bool = False) -> ValueError:
    """The exception for a bad argument (``forward``: a bad input to a layer's forward).

    ``orthofx.errors.ArgumentError`` (``LayerArgumentError`` for forward inputs), both ``ValueError`` subclasses,
    for ``orthofx.models`` (which imports ``orthofx.errors`` here if nothing has yet) and for a copy of this file
    once orthofx is loaded. A copy is looked up in ``sys.modules``, never imported, so that it stays plain torch:
    used without orthofx it raises ``ValueError``.
    """
    errors = sys.modules.get("orthofx.errors")
    if errors is None and __name__ == "orthofx.models":
        # the orthofx package loads its submodules lazily, so orthofx.models can run before orthofx.errors was
        # ever imported; only the package's own copy may import it (a copy elsewhere stays plain torch)
        errors = importlib.import_module("orthofx.errors")
    cls = getattr(errors, "LayerArgumentError" if forward else "ArgumentError", ValueError)
    return cls(message)


def _activation(name: str, owner: str = "activation") -> nn.Module:
    """A fresh activation module by name; ``owner`` (the model's class name) prefixes the error message."""
    if isinstance(name, str) and name in _ACTIVATIONS:
        return _ACTIVATIONS[name]()
    hint = ""
    if isinstance(name, str):
        close = difflib.get_close_matches(name.lower(), sorted(_ACTIVATIONS), n=1, cutoff=0.5)
        if close:
            hint = f" (did you mean {close[0]!r}?)"
    raise _error(f"{owner}: unknown activation {name!r}{hint}; choose one of "
                 f"{', '.join(repr(a) for a in sorted(_ACTIVATIONS))}")


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with zero padding 1 and no bias (a BatchNorm follows)."""
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias (a BatchNorm follows)."""
    return nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, padding=0, bias=False)


def _integer(value) -> int | None:
    """``value`` as a Python int if it is an integer (numpy and torch integers too, as torch.nn layers accept;
    never a bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except (TypeError, ValueError, RuntimeError):  # no __index__, or a float / multi-element tensor's
        return None


def _positive(value: int, what: str, owner: str | None = None) -> int:
    """``value`` as an int if it is an integer >= 1 (not a bool), else an ArgumentError naming ``owner`` (a class
    or function name) and the argument ``what``."""
    number = _integer(value)
    if number is None or number < 1:
        where = f"{owner}: " if owner else ""
        raise _error(f"{where}{what} must be a positive integer (>= 1), got {value!r}")
    return number


def _number(value, what: str, owner: str, *, low: float, low_open: bool = False, high: float | None = None,
            why: str = "") -> float:
    """``value`` as a float if it is a finite real number in ``[low, high]`` (``(low, high]`` when ``low_open``),
    else an ArgumentError naming ``owner``, the argument ``what`` and the allowed range (``why``: the reason)."""
    number = None
    if not isinstance(value, (bool, str, bytes)):
        try:
            number = float(value)
        except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of more than one element
            number = None
    bad = (number is None or not math.isfinite(number) or number < low or (low_open and number == low)
           or (high is not None and number > high))
    if bad:
        if high is None:
            allowed = f"{'>' if low_open else '>='} {low:g}"
        else:
            allowed = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
        reason = f" ({why})" if why else ""
        raise _error(f"{owner}: {what} must be a finite number {allowed}{reason}, got {value!r}")
    return number


def _flag(value, what: str, owner: str) -> bool:
    """``value`` as a bool if it is True or False (or the integers 1 and 0), else an ArgumentError."""
    if isinstance(value, (bool, int)) and value in (0, 1):
        return bool(value)
    raise _error(f"{owner}: {what} must be True or False, got {value!r}")


def _is_proxy(x) -> bool:
    """Whether ``x`` is a torch.fx Proxy (symbolic tracing): it has no concrete shape, so forward checks are
    skipped for it, as orthofx.nn's layers do (under torch.compile ``x`` is a fake tensor and the checks run)."""
    return isinstance(x, torch.fx.Proxy)


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 if it is float16 / bfloat16 (torch has no half-precision eigh), else unchanged.

    Written as type promotion with a one-element float32 zero instead of a branch on ``t.dtype``, so that a
    ``torch.fx`` trace records it (a branch would be resolved at trace time, and a traced graph moved to bfloat16
    later would call eigh in bfloat16); ``new_zeros`` follows ``t``'s device and is no constant folded into a
    graph. Adding zero leaves float32 and float64 values unchanged."""
    return t + t.new_zeros((1,), dtype=torch.float32)


def _tensor_input(x, owner: str) -> None:
    """A real floating-point tensor, else a LayerArgumentError naming ``owner``."""
    if not isinstance(x, torch.Tensor):
        raise _error(f"{owner}: expected a torch.Tensor input, got {type(x).__name__}", forward=True)
    if x.is_complex() or not x.is_floating_point():
        raise _error(f"{owner}: expected a real floating-point input, got dtype {x.dtype}; cast it with .float()",
                     forward=True)


# ---------------------------------------------------------------------------------------------------- ResNets


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    """Identity, or a strided 1x1 conv + BatchNorm where the block changes shape (P0's example of a layer
    with no orthogonal version: (M, C, k, S) = (2C, C, 1, 2))."""
    if stride != 1 or in_planes != out_planes:
        return nn.Sequential(_conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))
    return nn.Identity()


class BasicBlock(nn.Module):
    """ResNet basic block: conv1 (3x3, stride) - bn1 - relu - conv2 (3x3) - bn2, plus shortcut, then relu.

    ``shortcut`` is ``nn.Sequential(conv 1x1 with the block's stride, BatchNorm)`` when the shape changes
    (stride != 1 or channels change), else ``nn.Identity()``.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        out_planes = planes * self.expansion
        self.shortcut = _shortcut(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck block (expansion 4): 1x1 reduce - 3x3 (stride) - 1x1 expand, each with BatchNorm.

    Submodules conv1/bn1, conv2/bn2 (the strided 3x3), conv3/bn3, ``shortcut`` as in :class:`BasicBlock`.
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = _conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, out_planes)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU()
        self.shortcut = _shortcut(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet for 3x32x32 inputs with a CIFAR stem (3x3 conv, stride 1, no max-pool).

    Attributes: ``conv1``, ``bn1``, ``relu`` (stem), ``layer1`` .. ``layer4`` (``nn.Sequential`` of blocks with
    ``width``, 2w, 4w, 8w planes; layers 2-4 start with stride 2), ``avgpool``, ``fc``.

    Arguments: ``block`` (an ``nn.Module`` subclass with an integer ``expansion`` >= 1 taking
    ``(in_planes, planes, stride)``, e.g. :class:`BasicBlock`), ``layers`` (4 integers >= 0, the blocks per stage),
    ``width``, ``num_classes`` and ``in_channels`` (positive integers); anything else raises
    ``orthofx.errors.ArgumentError`` (a ``ValueError``) naming the argument.
    """

    def __init__(self, block: type, layers: list[int], width: int = 64, num_classes: int = 10,
                 in_channels: int = 3):
        super().__init__()
        owner = type(self).__name__
        expansion = getattr(block, "expansion", None)
        if (not isinstance(block, type) or not issubclass(block, nn.Module) or not isinstance(expansion, int)
                or isinstance(expansion, bool) or expansion < 1):
            raise _error(f"{owner}: block must be an nn.Module subclass with an integer class attribute expansion "
                         f">= 1 (e.g. BasicBlock or Bottleneck), got {block!r}")
        counts = None
        if not isinstance(layers, (str, bytes)) and hasattr(layers, "__len__") and len(layers) == 4:
            counts = [_integer(n) for n in layers]  # numpy / torch integers too, like the other arguments
        if counts is None or any(n is None or n < 0 for n in counts):
            raise _error(f"{owner}: layers must be 4 integers >= 0 (the number of blocks in layer1 .. layer4, "
                         f"e.g. [2, 2, 2, 2]), got {layers!r}")
        layers = counts
        width = _positive(width, "width", owner)
        num_classes = _positive(num_classes, "num_classes", owner)
        in_channels = _positive(in_channels, "in_channels", owner)
        self.conv1 = _conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        in_planes = width
        stages = []
        for i, n_blocks in enumerate(layers):
            planes = width * 2**i
            blocks = []
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(in_planes, planes, stride))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class ResNet18(ResNet):
    """ResNet-18-like model for 3x32x32: BasicBlocks [2, 2, 2, 2], channels width, 2w, 4w, 8w.

    The first block of layer2..layer4 has a ``shortcut`` of a strided 1x1 conv (2C <- C, stride 2) and BatchNorm.
    20 convs: the stem, 16 in the blocks, 3 shortcuts; 11,173,962 parameters at the default width 64.
    ``width``, ``num_classes`` and ``in_channels`` must be positive integers (``orthofx.errors.ArgumentError``
    otherwise).
    """

    def __init__(self, width: int = 64, num_classes: int = 10, in_channels: int = 3):
        super().__init__(BasicBlock, [2, 2, 2, 2], width=width, num_classes=num_classes, in_channels=in_channels)


class ResNet50(ResNet):
    """ResNet-50-like model for 3x32x32: Bottleneck blocks [3, 4, 6, 3], expansion 4, strided 1x1 shortcuts.

    The stride sits on each stage's first 3x3 conv (``conv2``) and on its 1x1 ``shortcut`` conv. 53 convs: the
    stem, 48 in the blocks, 4 shortcuts (layer1's too: w -> 4w channels, stride 1); 23,520,842 parameters at the
    default width 64. ``width``, ``num_classes`` and ``in_channels`` must be positive integers
    (``orthofx.errors.ArgumentError`` otherwise).
    """

    def __init__(self, width: int = 64, num_classes: int = 10, in_channels: int = 3):
        super().__init__(Bottleneck, [3, 4, 6, 3], width=width, num_classes=num_classes, in_channels=in_channels)


# -------------------------------------------------------------------------------------------------------- VGG


class VGG11(nn.Module):
    """VGG-11-like model for 3x32x32 with BatchNorm.

    ``features``: 8 blocks of conv 3x3 (padding 1, no bias) - BatchNorm - ReLU with channels
    (1, 2, 4, 4, 8, 8, 8, 8) * width, and 2x2 max-pools after blocks 1, 2, 4, 6 and 8 (32 -> 1).
    ``classifier``: Linear(8w, 8w) - ReLU - Linear(8w, num_classes); 9,491,018 parameters at the default width 64.
    ``width``, ``num_classes`` and ``in_channels`` must be positive integers (``orthofx.errors.ArgumentError``
    otherwise).
    """

    _CONFIG = (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M")

    def __init__(self, width: int = 64, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        width = _positive(width, "width", type(self).__name__)
        num_classes = _positive(num_classes, "num_classes", type(self).__name__)
        c_in = _positive(in_channels, "in_channels", type(self).__name__)
        layers: list[nn.Module] = []
        for item in self._CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                c_out = item * width
                layers += [_conv3x3(c_in, c_out), nn.BatchNorm2d(c_out), nn.ReLU()]
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(c_in, c_in), nn.ReLU(), nn.Linear(c_in, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)
        return self.classifier(x)


# -------------------------------------------------------------------------------------------------- small CNN


class SmallCNN(nn.Module):
    """Small CNN for 1x8x8 digits.

    conv1 (1 -> w, 3x3, pad 1) - relu - conv2 (w -> 2w, 3x3, stride 2, pad 1) - relu -
    conv3 (2w -> 2w, 3x3, pad 1) - relu - global average pool - fc (2w -> num_classes); ``width`` w = 16.
    ``width`` and ``num_classes`` must be positive integers (``orthofx.errors.ArgumentError`` otherwise).
    """

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        width = _positive(width, "width", type(self).__name__)
        num_classes = _positive(num_classes, "num_classes", type(self).__name__)
        self.conv1 = nn.Conv2d(1, width, kernel_size=3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, 2 * width, kernel_size=3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(2 * width, 2 * width, kernel_size=3, padding=1)
        self.relu3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        x = self.relu3(self.conv3(x))
        return self.fc(torch.flatten(self.pool(x), 1))


# ------------------------------------------------------------------------------------ decorrelated BatchNorm


class DecorrelatedBatchNorm2d(nn.Module):
    """Decorrelated BatchNorm (ZCA whitening over channels), the SVD meta-layer of P4's DBN experiments.

    Training: with ``x`` of shape (B, C, H, W), the per-channel mean ``mu`` and the covariance ``cov`` (C x C,
    biased, over the B*H*W samples) are computed; ``Sigma = cov + eps * I``; ``lambda, V = torch.linalg.eigh(Sigma)``;
    the whitening matrix is ``W = V diag(lambda^-1/2) V^T``, and the output is ``W (x - mu)``, so its channel
    covariance is ``I - eps Sigma^-1`` (identity when the eigenvalues are large against ``eps``). The buffers
    ``running_mean`` (C,) and ``running_cov`` (C, C) move towards ``mu`` and ``cov`` by ``momentum``.

    Eval: the same whitening computed from ``running_cov + eps * I`` (its own plain ``torch.linalg.eigh``) and
    ``running_mean``, so the output of a sample does not depend on the rest of the batch. That whitening matrix
    depends on the buffers only: ``orthofx.freeze`` of a model transformed in eval mode evaluates it once and
    stores it (the running whitening matrix), so the frozen and exported (ONNX too) models have no ``eigh``.
    A trace resolves ``if self.training``: orthofx captures a model holding this layer in both modes (one graph
    per mode, ``orthofx.capture.ModalGraphModule``), so ``gm.eval()`` uses the running whitening as here.

    ``affine=True`` adds a per-channel ``weight`` (ones) and ``bias`` (zeros) after the whitening, as BatchNorm.
    ``eps * I`` is made from the covariance (``new_full`` + ``diag_embed``), so it follows its dtype and device
    and no constant tensor is folded into a traced graph; the module has no buffers besides the running ones.
    Half-precision (float16 / bfloat16) covariances are decomposed in float32 (torch has no half-precision
    ``eigh``) and the whitening matrix is rounded back to the input's dtype; the running statistics keep their own
    dtype when the input's differs (``torch.autocast``, a float64 input to a float32 layer).

    Arguments: ``num_features`` C (a positive integer), ``eps`` (a finite number > 0: a covariance estimated
    from few samples is singular, and ``lambda^-1/2`` needs ``eps`` to stay finite), ``momentum`` (in [0, 1]) and
    ``affine`` (True or False); anything else raises ``orthofx.errors.ArgumentError``. The input must be a real
    floating-point (B, C, H, W) tensor, and in training hold more than one value per channel (B * H * W >= 2) to
    estimate a covariance (as ``nn.BatchNorm2d``); otherwise ``orthofx.errors.LayerArgumentError``. The input
    checks are skipped while ``torch.fx`` traces the forward symbolically.
    """

    def __init__(self, num_features: int, eps: float = 1e-2, momentum: float = 0.1, affine: bool = True):
        super().__init__()
        owner = type(self).__name__
        self.num_features = _positive(num_features, "num_features", owner)
        self.eps = _number(eps, "eps", owner, low=0.0, low_open=True, why=_DBN_EPS_WHY)
        self.momentum = _number(momentum, "momentum", owner, low=0.0, high=1.0, why=_MOMENTUM_WHY)
        self.affine = _flag(affine, "affine", owner)
        if self.affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_cov", torch.eye(num_features))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"

    def _eps_identity(self, like: torch.Tensor) -> torch.Tensor:
        # eps * I built from a traced tensor (dtype and device follow it), not a factory call baked into a graph
        return torch.diag_embed(like.new_full((self.num_features,), self.eps))

    def _whitening(self, sigma: torch.Tensor) -> torch.Tensor:
        eig = torch.linalg.eigh(_at_least_float32(sigma))
        evals, evecs = eig[0], eig[1]
        return ((evecs * evals.rsqrt().unsqueeze(0)) @ evecs.transpose(0, 1)).type_as(sigma)

    def _check_input(self, x: torch.Tensor) -> None:
        if _is_proxy(x):
            return
        owner = f"{type(self).__name__}(num_features={self.num_features})"
        _tensor_input(x, owner)
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise _error(f"{owner}: expected an input of shape (batch, {self.num_features}, H, W), got shape "
                         f"{tuple(x.shape)}; pass 4-D inputs with {self.num_features} channels, or build the layer "
                         "with num_features equal to the input's channels", forward=True)
        if self.training and x.shape[0] * x.shape[2] * x.shape[3] < 2:
            raise _error(f"{owner}: training needs more than one value per channel (batch * H * W >= 2) to "
                         f"estimate the channel covariance, got shape {tuple(x.shape)}; use a larger batch, or "
                         "call .eval() to whiten with the running statistics", forward=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        xt = x.transpose(0, 1)  # (C, B, H, W)
        flat = xt.flatten(1)  # (C, N)
        if self.training:
            mean = flat.mean(dim=1, keepdim=True)
            centred = flat - mean
            cov = (centred @ centred.transpose(0, 1)) / flat.size(1)
            # type_as: the buffers keep their dtype when the input's differs (autocast, a float64 input)
            self.running_mean.lerp_(mean.detach().squeeze(1).type_as(self.running_mean), self.momentum)
            self.running_cov.lerp_(cov.detach().type_as(self.running_cov), self.momentum)
            sigma = cov + self._eps_identity(cov)
        else:
            # type_as(x) keeps the buffers as graph inputs under fx (instead of constants folded at trace time)
            # and follows the input's dtype; in eager mode it is a no-op for matching dtypes.
            centred = flat - self.running_mean.type_as(x).unsqueeze(1)
            running_cov = self.running_cov.type_as(x)
            sigma = running_cov + self._eps_identity(running_cov)
        white = self._whitening(sigma) @ centred
        out = white.reshape_as(xt).transpose(0, 1)
        if self.affine:
            out = out * self.weight.view(-1, 1, 1) + self.bias.view(-1, 1, 1)
        return out


class DBNCNN(nn.Module):
    """CNN for 1x8x8 digits with decorrelated BatchNorm (P4's DBN setting at small scale).

    conv1 (1 -> w, 5x5, pad 2, no bias; **the Pre-SVD layer**: its output feeds the covariance and eigh of
    ``dbn``) - dbn (:class:`DecorrelatedBatchNorm2d`, eps 1e-2) - relu - conv2 (w -> 2w, 3x3, stride 2) - bn2 -
    relu - conv3 (2w -> 2w, 3x3) - bn3 - relu - global average pool - fc. ``width`` w = 16.

    conv1 has 25 input taps per output channel, so with w <= 25 its weight can have orthonormal rows and the
    covariance entering the eigendecomposition can be full rank (well conditioned under orthogonal weights).

    ``width`` and ``num_classes`` must be positive integers, ``eps`` a finite number > 0 and ``momentum`` one in
    [0, 1] (both go to ``dbn``); anything else raises ``orthofx.errors.ArgumentError``.
    """

    def __init__(self, width: int = 16, num_classes: int = 10, eps: float = 1e-2, momentum: float = 0.1):
        super().__init__()
        owner = type(self).__name__
        width = _positive(width, "width", owner)
        num_classes = _positive(num_classes, "num_classes", owner)
        eps = _number(eps, "eps", owner, low=0.0, low_open=True, why=_DBN_EPS_WHY)
        momentum = _number(momentum, "momentum", owner, low=0.0, high=1.0, why=_MOMENTUM_WHY)
        self.conv1 = nn.Conv2d(1, width, kernel_size=5, padding=2, bias=False)
        self.dbn = DecorrelatedBatchNorm2d(width, eps=eps, momentum=momentum)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(width, 2 * width, stride=2)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.relu2 = nn.ReLU()
        self.conv3 = _conv3x3(2 * width, 2 * width)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.relu3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.dbn(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


# ------------------------------------------------------------------------------------ global covariance pooling


class CovariancePooling(nn.Module):
    """Global covariance pooling with a matrix square root (P4's GCP meta-layer).

    For ``x`` of shape (B, C, H, W) (any number of dimensions after C, flattened): per sample, the channel
    covariance over the H*W positions
    ``cov = (x - mean)(x - mean)^T / (H*W)`` (C x C), ``Sigma = cov + eps * I``,
    ``lambda, V = torch.linalg.eigh(Sigma)`` and the output ``V diag(sqrt(clamp(lambda, min=0))) V^T``, of
    shape (B, C, C): the square root of ``Sigma``. ``eps`` defaults to 1e-5 (0 gives the root of ``cov``).
    ``eps * I`` is made from the covariance (``new_full`` + ``diag_embed``): no buffers, no traced constants.
    Half-precision inputs are decomposed in float32 and the root is rounded back to the input's dtype.

    ``num_features`` C must be a positive integer and ``eps`` a finite number >= 0 (``orthofx.errors.ArgumentError``
    otherwise); an input that is not a real floating-point (B, C, ...) tensor with C channels and at least one
    position raises ``orthofx.errors.LayerArgumentError`` (not checked while ``torch.fx`` traces symbolically).
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        owner = type(self).__name__
        self.num_features = _positive(num_features, "num_features", owner)
        self.eps = _number(eps, "eps", owner, low=0.0, why="it is added to the covariance's diagonal")

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    def _check_input(self, x: torch.Tensor) -> None:
        if _is_proxy(x):
            return
        owner = f"{type(self).__name__}(num_features={self.num_features})"
        _tensor_input(x, owner)
        if x.dim() < 3 or x.shape[1] != self.num_features:
            raise _error(f"{owner}: expected feature maps of shape (batch, {self.num_features}, H, W), got shape "
                         f"{tuple(x.shape)}; pass inputs with {self.num_features} channels, or build the layer with "
                         "num_features equal to the input's channels", forward=True)
        if x.shape[2:].numel() == 0:
            raise _error(f"{owner}: the covariance needs at least one position (H * W >= 1), got shape "
                         f"{tuple(x.shape)}", forward=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        flat = x.flatten(2)  # (B, C, N)
        centred = flat - flat.mean(dim=2, keepdim=True)
        cov = (centred @ centred.transpose(1, 2)) / flat.size(2)
        sigma = cov + torch.diag_embed(cov.new_full((self.num_features,), self.eps))
        eig = torch.linalg.eigh(_at_least_float32(sigma))
        evals, evecs = eig[0], eig[1]
        roots = torch.sqrt(torch.clamp(evals, min=0.0))
        return ((evecs * roots.unsqueeze(1)) @ evecs.transpose(1, 2)).type_as(sigma)


class UpperTriangle(nn.Module):
    """(B, n, n) -> (B, n(n+1)/2): the upper triangle (diagonal included), row by row.

    Same order as ``x[:, i, j]`` over ``torch.triu_indices(n, n)``; written as a concatenation of row slices so
    that it has no index buffers (fx would copy non-persistent buffers into a GraphModule as persistent ones,
    and the state_dicts of the model and of its trace would differ).

    ``n`` must be a positive integer (``orthofx.errors.ArgumentError`` otherwise); an input that is not a
    (B, n, n) tensor raises ``orthofx.errors.LayerArgumentError`` (not checked while ``torch.fx`` traces
    symbolically).
    """

    def __init__(self, n: int):
        super().__init__()
        self.n = _positive(n, "n", type(self).__name__)

    def extra_repr(self) -> str:
        return f"n={self.n}"

    def _check_input(self, x: torch.Tensor) -> None:
        if _is_proxy(x):
            return
        owner = f"{type(self).__name__}(n={self.n})"
        if not isinstance(x, torch.Tensor):
            raise _error(f"{owner}: expected a torch.Tensor input, got {type(x).__name__}", forward=True)
        if x.dim() != 3 or x.shape[1] != self.n or x.shape[2] != self.n:
            raise _error(f"{owner}: expected a batch of square matrices of shape (batch, {self.n}, {self.n}), got "
                         f"shape {tuple(x.shape)}; pass (batch, {self.n}, {self.n}) inputs, or build the layer "
                         "with n equal to the matrices' size", forward=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return torch.cat([x[:, i, i:] for i in range(self.n)], dim=1)


class GCPCNN(nn.Module):
    """Global-covariance-pooling CNN for 1x8x8 digits (P4's GCP setting at small scale).

    conv1 (1 -> w, 3x3, pad 1) - bn1 - relu - conv2 (w -> 2w, 3x3, pad 1) - bn2 - relu -
    conv_last (2w -> d, 1x1, no bias; **the Pre-SVD layer**: its output, after ``bn_last``, is the input of the
    covariance and eigh in ``cov_pool``) - bn_last - cov_pool (:class:`CovariancePooling`, d x d over the 64
    positions) - triu (:class:`UpperTriangle`, d(d+1)/2 features) - fc. ``width`` w = 16, ``dim`` d = 16.
    All convs keep the 8x8 resolution, so the covariance has 64 samples for d = 16 channels.

    ``width``, ``dim`` and ``num_classes`` must be positive integers and ``eps`` (of ``cov_pool``) a finite
    number >= 0; anything else raises ``orthofx.errors.ArgumentError``.
    """

    def __init__(self, width: int = 16, dim: int = 16, num_classes: int = 10, eps: float = 1e-5):
        super().__init__()
        owner = type(self).__name__
        width = _positive(width, "width", owner)
        dim = _positive(dim, "dim", owner)
        num_classes = _positive(num_classes, "num_classes", owner)
        eps = _number(eps, "eps", owner, low=0.0, why="it is added to the covariance's diagonal")
        self.conv1 = _conv3x3(1, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(width, 2 * width)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.relu2 = nn.ReLU()
        self.conv_last = _conv1x1(2 * width, dim)
        self.bn_last = nn.BatchNorm2d(dim)
        self.cov_pool = CovariancePooling(dim, eps=eps)
        self.triu = UpperTriangle(dim)
        self.fc = nn.Linear(dim * (dim + 1) // 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.bn_last(self.conv_last(x))
        return self.fc(self.triu(self.cov_pool(x)))


# ------------------------------------------------------------------------------------------------ deep plain nets


class DeepMLP(nn.Module):
    """Plain deep MLP (P2's test subject): no residuals, no normalisation.

    ``layers``: ``depth`` blocks of Linear + activation (Linear(in_features, width), then Linear(width, width)),
    so Linear modules sit at ``layers.0, layers.2, ...``; ``fc``: Linear(width, num_classes).
    ``activation`` is ``"tanh"`` (default), ``"relu"`` or ``"abs"``; ``depth``, ``width``, ``num_classes`` and
    ``in_features`` must be positive integers. Anything else raises ``orthofx.errors.ArgumentError``.
    """

    def __init__(self, depth: int = 64, width: int = 64, activation: str = "tanh", num_classes: int = 10,
                 in_features: int = 64):
        super().__init__()
        owner = type(self).__name__
        depth = _positive(depth, "depth", owner)
        width = _positive(width, "width", owner)
        num_classes = _positive(num_classes, "num_classes", owner)
        in_features = _positive(in_features, "in_features", owner)
        _activation(activation, owner)  # checked before any layer is built
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(in_features if i == 0 else width, width), _activation(activation, owner)]
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(x))


class DeepCNN(nn.Module):
    """Plain deep CNN for 3x32x32: ``depth`` 3x3 convs (padding 1, with bias) each followed by the activation.

    ``features``: conv (3 -> width) then conv (width -> width) ...; convs at ``features.0, features.2, ...``;
    ``pool`` (global average) and ``fc``. No residuals, no normalisation. ``activation``: ``"relu"`` (default),
    ``"tanh"`` or ``"abs"``; ``depth``, ``width``, ``num_classes`` and ``in_channels`` must be positive integers.
    Anything else raises ``orthofx.errors.ArgumentError``.
    """

    def __init__(self, depth: int = 32, width: int = 16, activation: str = "relu", num_classes: int = 10,
                 in_channels: int = 3):
        super().__init__()
        owner = type(self).__name__
        depth = _positive(depth, "depth", owner)
        width = _positive(width, "width", owner)
        num_classes = _positive(num_classes, "num_classes", owner)
        in_channels = _positive(in_channels, "in_channels", owner)
        _activation(activation, owner)  # checked before any layer is built
        layers: list[nn.Module] = []
        for i in range(depth):
            c_in = in_channels if i == 0 else width
            layers += [nn.Conv2d(c_in, width, kernel_size=3, padding=1), _activation(activation, owner)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class DeepLinear(nn.Module):
    """Deep linear network (P1's orthonormal deep linear net): ``depth`` bias-free Linear layers, no activation.

    ``layers``: nn.Sequential of Linear(in_features, width), Linear(width, width) ..., Linear(width, out_features)
    (a single Linear(in_features, out_features) when depth is 1). The output has ``out_features`` (64) columns.
    ``depth``, ``width``, ``in_features`` and ``out_features`` must be positive integers
    (``orthofx.errors.ArgumentError`` otherwise).
    """

    def __init__(self, depth: int = 4, width: int = 64, in_features: int = 64, out_features: int = 64):
        super().__init__()
        owner = type(self).__name__
        depth = _positive(depth, "depth", owner)
        width = _positive(width, "width", owner)
        in_features = _positive(in_features, "in_features", owner)
        out_features = _positive(out_features, "out_features", owner)
        dims = [in_features] + [width] * (depth - 1) + [out_features]
        self.layers = nn.Sequential(
            *[nn.Linear(dims[i], dims[i + 1], bias=False) for i in range(depth)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


# ---------------------------------------------------------------------------------------------------- registry

_IMAGE = (3, 32, 32)
_DIGITS = (1, 8, 8)
_VECTOR = (64,)

_REGISTRY: dict[str, tuple[type, tuple[int, ...]]] = {
    "resnet18": (ResNet18, _IMAGE),
    "resnet50": (ResNet50, _IMAGE),
    "vgg11": (VGG11, _IMAGE),
    "small_cnn": (SmallCNN, _DIGITS),
    "dbn_cnn": (DBNCNN, _DIGITS),
    "gcp_cnn": (GCPCNN, _DIGITS),
    "deep_mlp": (DeepMLP, _VECTOR),
    "deep_cnn": (DeepCNN, _IMAGE),
    "deep_linear": (DeepLinear, _VECTOR),
}


def names() -> list[str]:
    """The built-in model names, sorted."""
    return sorted(_REGISTRY)


def _lookup(name: str) -> tuple[type, tuple[int, ...]]:
    if isinstance(name, str) and name in _REGISTRY:
        return _REGISTRY[name]
    available = names()
    hint = ""
    if isinstance(name, str):
        close = difflib.get_close_matches(name.lower(), available, n=1, cutoff=0.5)
        if close:
            hint = f" did you mean {close[0]!r}?"
    raise _error(f"unknown model {name!r};{hint} available models: {', '.join(available)}")


def get(name: str, **kwargs) -> nn.Module:
    """A freshly initialised built-in model; ``kwargs`` go to its constructor (e.g. ``width=8``).

    Unknown names raise ``orthofx.errors.ArgumentError`` (a ``ValueError``) listing the available models (with a
    did-you-mean); bad constructor arguments and keywords the model does not take (``get("resnet18", widht=8)``)
    raise it too, naming the model and the argument.
    """
    cls, _ = _lookup(name)
    accepted = [p for p in inspect.signature(cls).parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    valid = [p.name for p in accepted]
    for key in kwargs:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            defaults = ", ".join(f"{p.name}={p.default!r}" for p in accepted)
            raise _error(f"{cls.__name__}: unknown argument {key!r}{hint}; model {name!r} takes {defaults}")
    return cls(**kwargs)


def input_shape(name: str) -> tuple[int, ...]:
    """The per-sample input shape of a built-in model (without the batch dimension)."""
    return tuple(_lookup(name)[1])


def example_input(name: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A float32 standard-normal batch ``(batch, *input_shape(name))`` from a private generator seeded ``seed``.

    The global RNG is left untouched. ``batch`` must be a positive integer and ``seed`` an integer in torch's seed
    range [-2**63, 2**64 - 1] (``orthofx.errors.ArgumentError`` otherwise).
    """
    shape = input_shape(name)
    number = _integer(seed)
    if number is None:
        raise _error(f"example_input: seed must be an integer, got {seed!r}")
    if not -2**63 <= number < 2**64:  # torch.Generator.manual_seed's range (raw 'Overflow' ValueError outside)
        raise _error(f"example_input: seed must be an integer in [-2**63, 2**64 - 1] (torch's seed range), "
                     f"got {seed!r}")
    generator = torch.Generator().manual_seed(number)
    return torch.randn((_positive(batch, "batch", "example_input"),) + shape, generator=generator)


def num_classes(name: str) -> int:
    """The number of classes of a built-in model's default head: 10 for every built-in model.

    (``deep_linear`` is not a classifier: its output has ``out_features`` = 64 columns by default.)
    """
    _lookup(name)
    return 10
