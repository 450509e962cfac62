"""Built-in example models: the defaults of examples, benchmarks and tests.

Plain torch only: this module imports nothing of orthofx, so a model defined here behaves exactly like a user's
model would. Every model

* is traceable by ``torch.fx.symbolic_trace`` (no data-dependent Python control flow; the only Python branches
  are on ``self.training``, which a trace resolves, so orthofx captures such models in both modes),
* is deterministic given ``torch.manual_seed`` (plain PyTorch default initialisation),
* takes small keyword arguments (``width``, ``depth``, ``num_classes`` ...), so tests can build tiny versions.

Registry::

    names()                      -> sorted list of model names
    get(name, **kwargs)          -> a fresh nn.Module (unknown name: ValueError with the names and a did-you-mean)
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

import torch
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


def _activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}"
        ) from None


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with zero padding 1 and no bias (a BatchNorm follows)."""
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias (a BatchNorm follows)."""
    return nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, padding=0, bias=False)


def _positive(value: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


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
    """

    def __init__(self, block: type, layers: list[int], width: int = 64, num_classes: int = 10,
                 in_channels: int = 3):
        super().__init__()
        width = _positive(width, "width")
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
    """

    def __init__(self, width: int = 64, num_classes: int = 10):
        super().__init__(BasicBlock, [2, 2, 2, 2], width=width, num_classes=num_classes)


class ResNet50(ResNet):
    """ResNet-50-like model for 3x32x32: Bottleneck blocks [3, 4, 6, 3], expansion 4, strided 1x1 shortcuts.

    The stride sits on each stage's first 3x3 conv (``conv2``) and on its 1x1 ``shortcut`` conv.
    """

    def __init__(self, width: int = 64, num_classes: int = 10):
        super().__init__(Bottleneck, [3, 4, 6, 3], width=width, num_classes=num_classes)


# -------------------------------------------------------------------------------------------------------- VGG


class VGG11(nn.Module):
    """VGG-11-like model for 3x32x32 with BatchNorm.

    ``features``: 8 blocks of conv 3x3 (padding 1, no bias) - BatchNorm - ReLU with channels
    (1, 2, 4, 4, 8, 8, 8, 8) * width, and 2x2 max-pools after blocks 1, 2, 4, 6 and 8 (32 -> 1).
    ``classifier``: Linear(8w, 8w) - ReLU - Linear(8w, num_classes).
    """

    _CONFIG = (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M")

    def __init__(self, width: int = 64, num_classes: int = 10):
        super().__init__()
        width = _positive(width, "width")
        layers: list[nn.Module] = []
        c_in = 3
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
    """

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        width = _positive(width, "width")
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
    """

    def __init__(self, num_features: int, eps: float = 1e-2, momentum: float = 0.1, affine: bool = True):
        super().__init__()
        self.num_features = _positive(num_features, "num_features")
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.affine = bool(affine)
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
        eig = torch.linalg.eigh(sigma)
        evals, evecs = eig[0], eig[1]
        return (evecs * evals.rsqrt().unsqueeze(0)) @ evecs.transpose(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xt = x.transpose(0, 1)  # (C, B, H, W)
        flat = xt.flatten(1)  # (C, N)
        if self.training:
            mean = flat.mean(dim=1, keepdim=True)
            centred = flat - mean
            cov = (centred @ centred.transpose(0, 1)) / flat.size(1)
            self.running_mean.lerp_(mean.detach().squeeze(1), self.momentum)
            self.running_cov.lerp_(cov.detach(), self.momentum)
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
    """

    def __init__(self, width: int = 16, num_classes: int = 10, eps: float = 1e-2, momentum: float = 0.1):
        super().__init__()
        width = _positive(width, "width")
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

    For ``x`` of shape (B, C, H, W): per sample, the channel covariance over the H*W positions
    ``cov = (x - mean)(x - mean)^T / (H*W)`` (C x C), ``Sigma = cov + eps * I``,
    ``lambda, V = torch.linalg.eigh(Sigma)`` and the output ``V diag(sqrt(clamp(lambda, min=0))) V^T``, of
    shape (B, C, C): the square root of ``Sigma``. ``eps`` defaults to 1e-5 (0 gives the root of ``cov``).
    ``eps * I`` is made from the covariance (``new_full`` + ``diag_embed``): no buffers, no traced constants.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = _positive(num_features, "num_features")
        self.eps = float(eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)  # (B, C, N)
        centred = flat - flat.mean(dim=2, keepdim=True)
        cov = (centred @ centred.transpose(1, 2)) / flat.size(2)
        sigma = cov + torch.diag_embed(cov.new_full((self.num_features,), self.eps))
        eig = torch.linalg.eigh(sigma)
        evals, evecs = eig[0], eig[1]
        roots = torch.sqrt(torch.clamp(evals, min=0.0))
        return (evecs * roots.unsqueeze(1)) @ evecs.transpose(1, 2)


class UpperTriangle(nn.Module):
    """(B, n, n) -> (B, n(n+1)/2): the upper triangle (diagonal included), row by row.

    Same order as ``x[:, i, j]`` over ``torch.triu_indices(n, n)``; written as a concatenation of row slices so
    that it has no index buffers (fx would copy non-persistent buffers into a GraphModule as persistent ones,
    and the state_dicts of the model and of its trace would differ).
    """

    def __init__(self, n: int):
        super().__init__()
        self.n = _positive(n, "n")

    def extra_repr(self) -> str:
        return f"n={self.n}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, i, i:] for i in range(self.n)], dim=1)


class GCPCNN(nn.Module):
    """Global-covariance-pooling CNN for 1x8x8 digits (P4's GCP setting at small scale).

    conv1 (1 -> w, 3x3, pad 1) - bn1 - relu - conv2 (w -> 2w, 3x3, pad 1) - bn2 - relu -
    conv_last (2w -> d, 1x1, no bias; **the Pre-SVD layer**: its output, after ``bn_last``, is the input of the
    covariance and eigh in ``cov_pool``) - bn_last - cov_pool (:class:`CovariancePooling`, d x d over the 64
    positions) - triu (:class:`UpperTriangle`, d(d+1)/2 features) - fc. ``width`` w = 16, ``dim`` d = 16.
    All convs keep the 8x8 resolution, so the covariance has 64 samples for d = 16 channels.
    """

    def __init__(self, width: int = 16, dim: int = 16, num_classes: int = 10, eps: float = 1e-5):
        super().__init__()
        width = _positive(width, "width")
        dim = _positive(dim, "dim")
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
    ``activation`` is ``"tanh"`` (default), ``"relu"`` or ``"abs"``.
    """

    def __init__(self, depth: int = 64, width: int = 64, activation: str = "tanh", num_classes: int = 10,
                 in_features: int = 64):
        super().__init__()
        depth = _positive(depth, "depth")
        width = _positive(width, "width")
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(in_features if i == 0 else width, width), _activation(activation)]
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(x))


class DeepCNN(nn.Module):
    """Plain deep CNN for 3x32x32: ``depth`` 3x3 convs (padding 1, with bias) each followed by the activation.

    ``features``: conv (3 -> width) then conv (width -> width) ...; convs at ``features.0, features.2, ...``;
    ``pool`` (global average) and ``fc``. No residuals, no normalisation. ``activation``: ``"relu"`` (default),
    ``"tanh"`` or ``"abs"``.
    """

    def __init__(self, depth: int = 32, width: int = 16, activation: str = "relu", num_classes: int = 10,
                 in_channels: int = 3):
        super().__init__()
        depth = _positive(depth, "depth")
        width = _positive(width, "width")
        layers: list[nn.Module] = []
        for i in range(depth):
            c_in = in_channels if i == 0 else width
            layers += [nn.Conv2d(c_in, width, kernel_size=3, padding=1), _activation(activation)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class DeepLinear(nn.Module):
    """Deep linear network (P1's orthonormal deep linear net): ``depth`` bias-free Linear layers, no activation.

    ``layers``: nn.Sequential of Linear(in_features, width), Linear(width, width) ..., Linear(width, out_features)
    (a single Linear(in_features, out_features) when depth is 1). The output has ``out_features`` (64) columns.
    """

    def __init__(self, depth: int = 4, width: int = 64, in_features: int = 64, out_features: int = 64):
        super().__init__()
        depth = _positive(depth, "depth")
        width = _positive(width, "width")
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
    raise ValueError(f"unknown model {name!r};{hint} available models: {', '.join(available)}")


def get(name: str, **kwargs) -> nn.Module:
    """A freshly initialised built-in model; ``kwargs`` go to its constructor (e.g. ``width=8``).

    Unknown names raise ``ValueError`` listing the available models (with a did-you-mean).
    """
    cls, _ = _lookup(name)
    return cls(**kwargs)


def input_shape(name: str) -> tuple[int, ...]:
    """The per-sample input shape of a built-in model (without the batch dimension)."""
    return tuple(_lookup(name)[1])


def example_input(name: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A float32 standard-normal batch ``(batch, *input_shape(name))`` from a private generator seeded ``seed``.

    The global RNG is left untouched.
    """
    shape = input_shape(name)
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn((_positive(batch, "batch"),) + shape, generator=generator)


def num_classes(name: str) -> int:
    """The number of classes of a built-in model's default head: 10 for every built-in model.

    (``deep_linear`` is not a classifier: its output has ``out_features`` = 64 columns by default.)
    """
    _lookup(name)
    return 10
