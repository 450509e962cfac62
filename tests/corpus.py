"""A corpus of small, varied plain-torch architectures for the preset x model grid (tests/test_corpus.py).

Not a test file: tests import it as ``from corpus import CORPUS`` (pytest puts ``tests/`` on ``sys.path``, since
the directory has no ``__init__.py``). Every entry is a factory ``f() -> (model, example_inputs)``: a freshly
built model in training mode (weights drawn from a private seed, the global RNG is left as it was) and a tuple
of example inputs (batch 2; batch 1 would let torch.export specialise the batch dimension).

The models imitate what users write, not what orthofx likes: attention (``nn.MultiheadAttention`` and hand-written
scaled dot-product attention), depthwise / grouped / dilated / transposed / 1-D / rectangular convolutions, weight
sharing, a functional convolution with its own ``nn.Parameter``, in-place ops, dict and tuple outputs, buffers
(one mutated in the forward), nested ``Sequential`` / ``ModuleDict`` / ``ModuleList``, BatchNorm, covariance
pooling with ``eigh`` and an ``svdvals`` spectrum, recurrent layers (GRU, LSTM; fx leaves), a submodule with a
data-dependent branch (traced as a leaf after the failed trace), a module with a ``self.training`` branch, and
top-level forwards symbolic tracing cannot follow (a branch on a shape, ``int()`` of a size, a loop over
``x.size(1)``), which capture mode ``auto`` hands to torch.export. Small versions of modern architectures as
people write them from the papers: a U-Net (ConvTranspose2d up, ``torch.cat`` skips), ConvNeXt (7x7 depthwise
convs, channels-last LayerNorm, layer scale; its late 7x7 convs run on maps smaller than the kernel),
MobileNetV2 inverted residuals, an SE-ResNet, an EfficientNet-like MBConv stack with stochastic depth
(``torch.rand`` in training mode only), a ViT (``nn.TransformerEncoder``, class token, position embedding) and a
BiT-style ResNet of weight-standardised ``Conv2d`` subclasses (their own ``forward``, traced through).

Sizes are tiny (widths 4-8, 6x6 .. 8x8 images, sequences of 5-12) so the whole grid runs in seconds.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CORPUS", "build", "names", "SEED"]

SEED = 0
BATCH = 2


def _inputs(*shapes: tuple[int, ...], seed: int = 1) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn((BATCH,) + tuple(shape), generator=generator) for shape in shapes)


# ------------------------------------------------------------------------------------------------ attention


class MHAClassifier(nn.Module):
    """Linear embedding -> nn.MultiheadAttention (a torch layer: an fx leaf whose ``out_proj`` is a Linear
    subclass) -> residual + LayerNorm -> mean over tokens -> Linear head. Input (B, T, 6)."""

    def __init__(self, features: int = 6, dim: int = 8, heads: int = 2, classes: int = 3):
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        h = self.embed(x)
        a = self.attn(h, h, h, need_weights=False)[0]
        h = self.norm(h + a)
        return self.head(h.mean(dim=1))


class SelfAttention(nn.Module):
    """Hand-written multi-head scaled dot-product attention: fused qkv Linear, softmax(q k^T / sqrt(d)) v,
    output projection. Shapes come from ``x.size`` (proxies under fx), the model dimension from ``self``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t = x.size(0), x.size(1)
        d = self.dim // self.heads
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d))
        y = scores.softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, self.dim))


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(ln(x)), x + mlp(ln(x))."""

    def __init__(self, dim: int = 8, heads: int = 2):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """Token embedding (Linear) + learned positional parameter -> two layers in a ModuleList -> head."""

    def __init__(self, features: int = 5, dim: int = 8, tokens: int = 6, classes: int = 4):
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.pos = nn.Parameter(torch.zeros(1, tokens, dim).normal_(std=0.02))
        self.layers = nn.ModuleList([TransformerLayer(dim) for _ in range(2)])
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        h = self.embed(x) + self.pos
        for layer in self.layers:
            h = layer(h)
        return self.head(self.ln_f(h)[:, 0])


class SDPABlock(nn.Module):
    """Attention with ``F.scaled_dot_product_attention`` on separate q/k/v Linears."""

    def __init__(self, dim: int = 8, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def _split(self, t):
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x):
        y = F.scaled_dot_product_attention(self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x)))
        return x + self.o(y.transpose(1, 2).flatten(2))


class SDPASequential(nn.Module):
    """``encoder``: a top-level Sequential of attention and MLP blocks (the jacobian preset's target), head."""

    def __init__(self, dim: int = 8, classes: int = 3):
        super().__init__()
        self.encoder = nn.Sequential(SDPABlock(dim), nn.LayerNorm(dim), nn.Linear(dim, dim), nn.Tanh())
        self.fc = nn.Linear(dim, classes)

    def forward(self, x):
        return self.fc(self.encoder(x).mean(1))


# --------------------------------------------------------------------------------------------- convolutions


class DepthwiseSeparable(nn.Module):
    """MobileNet-style: stem conv, depthwise 3x3 (groups = channels), pointwise 1x1, BatchNorm, ReLU6."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.features = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU6(),
            nn.Conv2d(width, 2 * width, 1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU6(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, 5)

    def forward(self, x):
        return self.fc(self.pool(self.features(self.stem(x))).flatten(1))


class GroupedConvNet(nn.Module):
    """ResNeXt-style grouped convolutions, one strided, plus a strided 1x1 shortcut (no orthogonal version)."""

    def __init__(self, width: int = 8, groups: int = 2):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.g1 = nn.Conv2d(width, width, 3, padding=1, groups=groups)
        self.g2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, groups=groups)
        self.shortcut = nn.Conv2d(width, 2 * width, 1, stride=2, bias=False)
        self.fc = nn.Linear(2 * width, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = self.g2(F.relu(self.g1(x)))
        y = F.relu(y + self.shortcut(x))
        return self.fc(y.mean(dim=(2, 3)))


class DilatedConvNet(nn.Module):
    """Atrous convolutions (dilation 2 and 3, 'same' zero padding) and a padding_mode='reflect' conv."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.atrous2 = nn.Conv2d(width, width, 3, padding=2, dilation=2)
        self.atrous3 = nn.Conv2d(width, width, 3, padding=3, dilation=3)
        self.reflect = nn.Conv2d(width, width, 3, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(width, 3)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.atrous2(x) + self.atrous3(x))
        x = F.relu(self.reflect(x))
        return self.fc(x.mean(dim=(2, 3)))


class TransposedConvAE(nn.Module):
    """Encoder (strided convs) / decoder (ConvTranspose2d, output_padding) autoencoder; output is an image."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, width, 3, stride=2, padding=1), nn.ReLU(),
                                     nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.decoder = nn.Sequential(nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), nn.ReLU(),
                                     nn.ConvTranspose2d(width, width, 3, stride=2, padding=1, output_padding=1),
                                     nn.ReLU(), nn.Conv2d(width, 1, 1))

    def forward(self, x):
        return self.decoder(self.encoder(x))


class Conv1dNet(nn.Module):
    """1-D signal model: Conv1d (k 5), strided Conv1d, grouped Conv1d, Conv1d k 1, pooling, head."""

    def __init__(self, channels: int = 3, width: int = 6):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(channels, width, 5, padding=2), nn.ReLU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(width, width, 3, padding=1, groups=2), nn.ReLU(),
            nn.Conv1d(width, 2 * width, 1),
        )
        self.pool = nn.AdaptiveMaxPool1d(1)
        self.fc = nn.Linear(2 * width, 2)

    def forward(self, x):
        return self.fc(self.pool(self.body(x)).squeeze(-1))


class RectangularConvNet(nn.Module):
    """Rectangular kernels and a per-dimension stride (1, 2)."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.horizontal = nn.Conv2d(2, width, (1, 3), padding=(0, 1))
        self.vertical = nn.Conv2d(width, width, (3, 1), padding=(1, 0))
        self.squeeze = nn.Conv2d(width, 2 * width, (1, 3), stride=(1, 2), padding=(0, 1))
        self.fc = nn.Linear(2 * width, 3)

    def forward(self, x):
        x = torch.tanh(self.vertical(torch.tanh(self.horizontal(x))))
        return self.fc(F.relu(self.squeeze(x)).amax(dim=(2, 3)))


# ------------------------------------------------------------------------------ graph and module structure


class SharedWeights(nn.Module):
    """One conv block and one Linear, each called twice in a forward (weight sharing)."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.mix = nn.Linear(width, width)
        self.fc = nn.Linear(width, 3)

    def forward(self, x):
        x = self.block(self.block(self.stem(x)))
        h = x.mean(dim=(2, 3))
        return self.fc(self.mix(torch.tanh(self.mix(h))))


class FunctionalConv(nn.Module):
    """A convolution written with ``F.conv2d`` and its own ``nn.Parameter`` kernel (no Conv2d module), ``F.linear``
    with a parameter matrix, and one Linear module."""

    def __init__(self, width: int = 5):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(width, 3, 3, 3) * 0.2)
        self.kernel_bias = nn.Parameter(torch.zeros(width))
        self.mixing = nn.Parameter(torch.randn(width, width) / math.sqrt(width))
        self.fc = nn.Linear(width, 3)

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.kernel, self.kernel_bias, stride=1, padding=1))
        h = F.linear(x.mean(dim=(2, 3)), self.mixing)
        return self.fc(h)


class InplaceOps(nn.Module):
    """In-place ops everywhere: ``Tensor.relu_``, ``add_``, ``mul_``, ``F.relu(inplace=True)``, ``nn.ReLU(inplace)``
    in a Sequential, ``+=`` on a local."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True))
        self.fc = nn.Linear(width, 4)

    def forward(self, x):
        x = self.conv1(x)
        x.relu_()
        y = self.conv2(x)
        y.add_(x)
        y.mul_(0.5)
        y = F.relu(y, inplace=True)
        z = self.body(y)
        z += y
        return self.fc(z.mean(dim=(2, 3)))


class DictOutput(nn.Module):
    """Returns a dict of tensors: logits, an embedding and a nested tuple of intermediate maps."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.proj = nn.Linear(width, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        fmap = F.relu(self.conv(x))
        embedding = self.proj(fmap.mean(dim=(2, 3)))
        return {"logits": self.fc(embedding), "embedding": embedding, "maps": (fmap, fmap.amax(dim=1))}


class TupleOutputTwoInputs(nn.Module):
    """Two inputs (an image and a vector), two outputs as a tuple (the second one unnormalised)."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.image = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.vector = nn.Linear(5, width)
        self.fuse = nn.Linear(2 * width, 3)

    def forward(self, img, vec):
        a = F.relu(self.image(img)).mean(dim=(2, 3))
        b = torch.tanh(self.vector(vec))
        logits = self.fuse(torch.cat([a, b], dim=1))
        return logits, a * b


class Buffers(nn.Module):
    """Input normalisation from registered buffers (a persistent pair and a non-persistent one), a BatchNorm1d,
    and a buffer mutated in place on every forward (a call counter)."""

    def __init__(self, features: int = 6):
        super().__init__()
        self.register_buffer("mean", torch.linspace(-0.5, 0.5, features))
        self.register_buffer("std", torch.linspace(0.5, 1.5, features))
        self.register_buffer("scale", torch.tensor(0.5), persistent=False)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.fc1 = nn.Linear(features, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        self.calls.add_(1)
        x = (x - self.mean) / self.std
        return self.fc2(F.relu(self.bn(self.fc1(x)))) * self.scale


class Nested(nn.Module):
    """Sequential inside ModuleDict inside ModuleList inside Sequential; modules reached by key and index."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.stages = nn.Sequential(
            nn.ModuleList([
                nn.ModuleDict({"conv": nn.Conv2d(3, width, 3, padding=1),
                               "post": nn.Sequential(nn.BatchNorm2d(width), nn.ReLU())}),
                nn.ModuleDict({"conv": nn.Conv2d(width, width, 3, padding=1),
                               "post": nn.Sequential(nn.Identity(), nn.Tanh())}),
            ]),
        )
        self.heads = nn.ModuleDict({"a": nn.Linear(width, 2), "b": nn.Sequential(nn.Linear(width, 3))})

    def forward(self, x):
        for stage in self.stages[0]:
            x = stage["post"](stage["conv"](x))
        h = x.mean(dim=(2, 3))
        return self.heads["a"](h).sum(1, keepdim=True) + self.heads["b"](h)


class BatchNormResNet(nn.Module):
    """Conv-BN-ReLU stem, one basic residual block (two 3x3 convs with BatchNorm), pooling, Dropout, head."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                    nn.ReLU(), nn.Conv2d(width, width, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(width))
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(width, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.layer1(x))
        return self.fc(self.drop(F.adaptive_avg_pool2d(x, 1).flatten(1)))


# --------------------------------------------------------------------------------------------- decompositions


class CovPoolNet(nn.Module):
    """Covariance pooling (P4's GCP, written by a user): 1x1 reduction conv (the Pre-SVD layer), per-sample
    channel covariance + eps I, ``torch.linalg.eigh``, matrix square root ``V diag(sqrt(lambda)) V^T``, then
    the flattened root through a Linear head."""

    def __init__(self, width: int = 6, dim: int = 4, eps: float = 1e-3):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.reduce = nn.Conv2d(width, dim, 1, bias=False)
        self.fc = nn.Linear(dim * dim, 3)

    def forward(self, x):
        f = self.reduce(F.relu(self.conv(x))).flatten(2)
        f = f - f.mean(dim=2, keepdim=True)
        cov = f @ f.transpose(1, 2) / f.size(2)
        cov = cov + self.eps * torch.eye(self.dim, dtype=cov.dtype, device=cov.device)
        evals, evecs = torch.linalg.eigh(cov)
        root = evecs @ torch.diag_embed(evals.clamp(min=0).sqrt()) @ evecs.transpose(1, 2)
        return self.fc(root.flatten(1))


class SpectrumNet(nn.Module):
    """Features from the singular values of a per-sample matrix (``torch.linalg.svdvals``) of a Linear's output."""

    def __init__(self, features: int = 6, rows: int = 4, cols: int = 3):
        super().__init__()
        self.rows, self.cols = rows, cols
        self.lift = nn.Linear(features, rows * cols)
        self.fc = nn.Linear(min(rows, cols), 2)

    def forward(self, x):
        m = self.lift(x).reshape(-1, self.rows, self.cols)
        return self.fc(torch.linalg.svdvals(m))


# ----------------------------------------------------------------------------------------- recurrent layers


class RecurrentNet(nn.Module):
    """GRU and LSTM (torch layers, fx leaves returning tuples), a Linear in between and a head."""

    def __init__(self, features: int = 4, hidden: int = 6):
        super().__init__()
        self.gru = nn.GRU(features, hidden, batch_first=True)
        self.mid = nn.Linear(hidden, hidden)
        self.lstm = nn.LSTM(hidden, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, 3)

    def forward(self, x):
        h, _ = self.gru(x)
        out, (h_n, c_n) = self.lstm(torch.tanh(self.mid(h)))
        return self.fc(out[:, -1] + h_n[0])


class ImpossibleLayer(nn.Module):
    """A 1x1 conv expanding 4 -> 16 channels with stride (1, 2): no orthogonal convolution exists (P0 Theorem 4:
    16 > 4 * 1 rows, stride 2 > kernel 1); the orthogonal preset's L_orth fallback stands in (one stride per
    axis)."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.expand = nn.Conv2d(width, 4 * width, 1, stride=(1, 2))
        self.fc = nn.Linear(4 * width, 3)

    def forward(self, x):
        return self.fc(F.relu(self.expand(F.relu(self.conv(x)))).mean(dim=(2, 3)))


# ------------------------------------------------------------------------------------ control flow in modules


class GatedBlock(nn.Module):
    """A branch on a tensor's value (``if x.mean() > 0``): fx cannot trace it, orthofx keeps it as a leaf."""

    def __init__(self, width: int):
        super().__init__()
        self.pos = nn.Linear(width, width)
        self.neg = nn.Linear(width, width)

    def forward(self, x):
        if x.mean() > 0:
            return self.pos(x)
        return self.neg(x)


class DataDependent(nn.Module):
    """Traceable top level around an untraceable submodule ``gate`` (a leaf fallback)."""

    def __init__(self, features: int = 6, width: int = 5):
        super().__init__()
        self.inp = nn.Linear(features, width)
        self.gate = GatedBlock(width)
        self.fc = nn.Linear(width, 2)

    def forward(self, x):
        return self.fc(F.relu(self.gate(self.inp(x))))


class RunningCentre(nn.Module):
    """Centres features with batch statistics in training and with a running mean in eval (``if self.training``
    in a traced, non-leaf module, like a hand-written BatchNorm)."""

    def __init__(self, features: int, momentum: float = 0.5):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(features))

    def forward(self, x):
        if self.training:
            mean = x.mean(dim=0)
            self.running_mean.lerp_(mean.detach(), self.momentum)
        else:
            mean = self.running_mean
        return x - mean


class TrainEvalBranch(nn.Module):
    """Linear -> RunningCentre (train/eval branch) -> Linear."""

    def __init__(self, features: int = 6, width: int = 5):
        super().__init__()
        self.fc1 = nn.Linear(features, width)
        self.centre = RunningCentre(width)
        self.fc2 = nn.Linear(width, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.centre(self.fc1(x))))


# ---------------------------------------------------------------------------------------------- export capture
# Top-level forwards that symbolic tracing cannot follow: capture mode ``auto`` falls back to torch.export.


class ShapeBranchNet(nn.Module):
    """A Python branch on a shape in the top-level forward (``if x.shape[-1] > 6``: pool wide inputs), BatchNorm
    in a top-level Sequential."""

    def __init__(self, width: int = 8, classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.features(x)
        if x.shape[-1] > 6:
            x = F.max_pool2d(x, 2)
        return self.head(F.relu(self.conv(x)).mean(dim=(2, 3)))


class PatchTokenNet(nn.Module):
    """ViT-style tokens turned back into an image whose side is ``int(n ** 0.5)`` of the token count (``int()``
    of a traced size fails under fx). Input (B, 16, 6)."""

    def __init__(self, features: int = 6, dim: int = 8, classes: int = 3):
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.features = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.GELU(), nn.Conv2d(dim, dim, 1))
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        b, n, _ = tokens.shape
        side = int(n ** 0.5)
        x = self.embed(tokens).transpose(1, 2).reshape(b, -1, side, side)
        return self.head(self.features(x).mean(dim=(2, 3)))


class ChannelGroupLoop(nn.Module):
    """A Python loop over ``x.size(1) // 4`` channel groups, each through the same conv (one module called once
    per group), concatenated."""

    def __init__(self, width: int = 8, classes: int = 2):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.group_conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.features(x)
        groups = [self.group_conv(x[:, 4 * g:4 * g + 4]) for g in range(x.size(1) // 4)]
        return self.head(torch.cat(groups, dim=1).mean(dim=(2, 3)))


# ---------------------------------------------------------------------------------------- modern architectures
# Small imitations of what people build from papers in plain torch (no torchvision / timm).


class UNet(nn.Module):
    """A two-level U-Net: double-conv blocks (Conv-BN-ReLU x 2), max-pool down, ConvTranspose2d (k 2, stride 2)
    up, ``torch.cat`` skip connections on the channel axis, 1x1 segmentation head (an image output)."""

    def __init__(self, channels: int = 3, width: int = 4, classes: int = 2):
        super().__init__()

        def double(c_in, c_out):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                                 nn.ReLU(inplace=True), nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))

        self.down1 = double(channels, width)
        self.down2 = double(width, 2 * width)
        self.bottom = double(2 * width, 4 * width)
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2)
        self.dec2 = double(4 * width, 2 * width)
        self.up1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.dec1 = double(2 * width, width)
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x):
        s1 = self.down1(x)
        s2 = self.down2(F.max_pool2d(s1, 2))
        b = self.bottom(F.max_pool2d(s2, 2))
        d2 = self.dec2(torch.cat([self.up2(b), s2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), s1], dim=1))
        return self.head(d1)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: depthwise 7x7 conv, permute to channels-last, LayerNorm, Linear (4x) - GELU - Linear,
    layer scale ``gamma`` (an ``nn.Parameter`` multiplied in), permute back, residual."""

    def __init__(self, dim: int, layer_scale: float = 1e-1):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x):
        shortcut = x
        x = self.dwconv(x).permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        x = self.gamma * x
        return shortcut + x.permute(0, 3, 1, 2)


class ChannelsFirstLayerNorm(nn.Module):
    """ConvNeXt's LayerNorm over the channel axis of an NCHW map, written by hand (mean / var over dim 1)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXt(nn.Module):
    """ConvNeXt-style: patchify stem (4x4 conv, stride 4) + channels-first LayerNorm, a stage of two blocks, a
    downsampling layer (norm + 2x2 conv, stride 2), a stage of one block, global pool, LayerNorm, head."""

    def __init__(self, channels: int = 3, dims: tuple[int, int] = (4, 8), classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, dims[0], 4, stride=4), ChannelsFirstLayerNorm(dims[0]))
        self.stage1 = nn.Sequential(*[ConvNeXtBlock(dims[0]) for _ in range(2)])
        self.downsample = nn.Sequential(ChannelsFirstLayerNorm(dims[0]), nn.Conv2d(dims[0], dims[1], 2, stride=2))
        self.stage2 = nn.Sequential(ConvNeXtBlock(dims[1]))
        self.norm = nn.LayerNorm(dims[1])
        self.head = nn.Linear(dims[1], classes)

    def forward(self, x):
        x = self.stage2(self.downsample(self.stage1(self.stem(x))))
        return self.head(self.norm(x.mean(dim=(-2, -1))))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (BN, ReLU6), depthwise 3x3 (stride 1 or 2; BN, ReLU6), 1x1 linear project
    (BN), residual only when stride is 1 and the channel counts match (decided in ``__init__``)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int = 4):
        super().__init__()
        hidden = c_in * expand
        self.use_residual = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        )

    def forward(self, x):
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """Stem (3x3, stride 2), inverted residuals (one strided without residual, two with), 1x1 last conv, pool,
    Dropout, classifier."""

    def __init__(self, channels: int = 3, classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(channels, 4, 3, 2, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU6(inplace=True)),
            InvertedResidual(4, 4, 1, expand=1),
            InvertedResidual(4, 6, 2),
            InvertedResidual(6, 6, 1),
            nn.Sequential(nn.Conv2d(6, 12, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU6(inplace=True)),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(12, classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: adaptive average pool to 1x1, 1x1 conv reduce, ReLU, 1x1 conv expand, sigmoid
    gate multiplied into the features."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x):
        s = self.fc2(F.relu(self.fc1(self.pool(x))))
        return x * torch.sigmoid(s)


class SEBasicBlock(nn.Module):
    """ResNet basic block with SE before the addition; a 1x1 strided conv + BN shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.se = SqueezeExcite(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return F.relu(out + identity)


class SEResNet(nn.Module):
    """SE-ResNet: conv stem, ``layer1`` (one SE block), ``layer2`` (a strided SE block, channels doubled), pool,
    ``fc``. The SE gate in ``layer2`` uses Linears instead of 1x1 convs (the other common spelling)."""

    def __init__(self, channels: int = 3, width: int = 8, classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(SEBasicBlock(width, width))
        self.layer2 = nn.Sequential(SEBasicBlock(width, 2 * width, stride=2))
        self.gate = nn.Sequential(nn.Linear(2 * width, width // 2), nn.ReLU(), nn.Linear(width // 2, 2 * width),
                                  nn.Sigmoid())
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        x = x * self.gate(pooled)[:, :, None, None]
        return self.fc(x.mean(dim=(2, 3)))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples with probability ``p`` in training, rescale the kept ones."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = (torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device) < keep).to(x.dtype)
    return x * mask / keep


class MBConv(nn.Module):
    """EfficientNet MBConv: 1x1 expand (BN, SiLU), depthwise 3x3 (BN, SiLU), SE with SiLU, 1x1 project (BN),
    residual through stochastic depth (``drop_path`` with ``torch.rand`` in training mode only)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, expand: int = 4, drop: float = 0.2):
        super().__init__()
        hidden = c_in * expand
        self.drop = drop
        self.residual = stride == 1 and c_in == c_out
        self.expand = nn.Sequential(nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.SiLU())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                       nn.BatchNorm2d(hidden), nn.SiLU())
        self.se_reduce = nn.Conv2d(hidden, max(1, c_in // 4), 1)
        self.se_expand = nn.Conv2d(max(1, c_in // 4), hidden, 1)
        self.project = nn.Sequential(nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        h = self.depthwise(self.expand(x))
        s = F.silu(self.se_reduce(h.mean((2, 3), keepdim=True)))
        h = self.project(h * torch.sigmoid(self.se_expand(s)))
        if self.residual:
            return x + drop_path(h, self.drop, self.training)
        return h


class EfficientNetLike(nn.Module):
    """Stem (3x3 stride 2, BN, SiLU), ``blocks``: MBConv stack (a strided one, two residual ones with stochastic
    depth), 1x1 head conv with SiLU, pool, Dropout, classifier."""

    def __init__(self, channels: int = 3, classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, 4, 3, 2, 1, bias=False), nn.BatchNorm2d(4), nn.SiLU())
        self.blocks = nn.Sequential(MBConv(4, 4, expand=1, drop=0.1), MBConv(4, 6, stride=2),
                                    MBConv(6, 6, drop=0.2))
        self.conv_head = nn.Sequential(nn.Conv2d(6, 12, 1, bias=False), nn.BatchNorm2d(12), nn.SiLU())
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(12, classes)

    def forward(self, x):
        x = self.conv_head(self.blocks(self.stem(x)))
        return self.classifier(self.dropout(x.mean(dim=(2, 3))))


class StdConv2d(nn.Conv2d):
    """Weight-standardised convolution (BiT, NFNet): a Conv2d subclass whose own ``forward`` standardises the
    kernel per output channel before ``F.conv2d``."""

    def forward(self, x):
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return F.conv2d(x, (w - mean) / torch.sqrt(var + 1e-6), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class BiTResNet(nn.Module):
    """BiT-style pre-activation ResNet: StdConv2d stem and block convs (traced through: their forward is the
    user's), GroupNorm, a pre-activation bottleneck residual, pooling, Linear head."""

    def __init__(self, channels: int = 3, width: int = 8, classes: int = 3):
        super().__init__()
        self.stem = StdConv2d(channels, width, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(2, width)
        self.conv1 = StdConv2d(width, width // 2, 1, bias=False)
        self.norm2 = nn.GroupNorm(2, width // 2)
        self.conv2 = StdConv2d(width // 2, width, 3, padding=1, bias=False)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.stem(x)
        y = self.conv1(F.relu(self.norm1(x)))
        x = x + self.conv2(F.relu(self.norm2(y)))
        return self.head(x.mean(dim=(2, 3)))


class ViT(nn.Module):
    """ViT: Conv2d patch embedding (kernel = stride = patch), flatten + transpose to tokens, a class token
    ``nn.Parameter`` expanded over the batch and concatenated, learned position embedding, two
    ``nn.TransformerEncoderLayer`` (batch_first, norm_first, GELU) in an ``nn.TransformerEncoder``, final
    LayerNorm, Linear head on the class token."""

    def __init__(self, channels: int = 3, image: int = 8, patch: int = 4, dim: int = 8, heads: int = 2,
                 depth: int = 2, classes: int = 3):
        super().__init__()
        tokens = (image // patch) ** 2
        self.patch_embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.1, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.encoder(x))
        return self.head(x[:, 0])


# ---------------------------------------------------------------------------------------------------- corpus


def _entry(cls: type, *shapes: tuple[int, ...], **kwargs) -> Callable[[], tuple[nn.Module, tuple]]:
    def factory():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            model = cls(**kwargs)
        return model, _inputs(*shapes)

    factory.__name__ = f"make_{cls.__name__}"
    factory.__doc__ = cls.__doc__
    return factory


#: name -> factory returning ``(model, example_inputs)``.
CORPUS: dict[str, Callable[[], tuple[nn.Module, tuple]]] = {
    "mha": _entry(MHAClassifier, (5, 6)),
    "transformer": _entry(TinyTransformer, (6, 5)),
    "sdpa_sequential": _entry(SDPASequential, (5, 8)),
    "depthwise": _entry(DepthwiseSeparable, (3, 8, 8)),
    "grouped": _entry(GroupedConvNet, (3, 8, 8)),
    "dilated": _entry(DilatedConvNet, (3, 8, 8)),
    "transposed": _entry(TransposedConvAE, (1, 8, 8)),
    "conv1d": _entry(Conv1dNet, (3, 12)),
    "rectangular": _entry(RectangularConvNet, (2, 6, 8)),
    "impossible_layer": _entry(ImpossibleLayer, (3, 6, 6)),
    "shared": _entry(SharedWeights, (3, 6, 6)),
    "functional_conv": _entry(FunctionalConv, (3, 6, 6)),
    "inplace": _entry(InplaceOps, (3, 6, 6)),
    "dict_output": _entry(DictOutput, (3, 6, 6)),
    "tuple_output": _entry(TupleOutputTwoInputs, (3, 8, 8), (5,)),
    "buffers": _entry(Buffers, (6,)),
    "nested": _entry(Nested, (3, 6, 6)),
    "batchnorm_resnet": _entry(BatchNormResNet, (3, 8, 8)),
    "cov_pool": _entry(CovPoolNet, (3, 6, 6)),
    "spectrum": _entry(SpectrumNet, (6,)),
    "recurrent": _entry(RecurrentNet, (5, 4)),
    "data_dependent": _entry(DataDependent, (6,)),
    "train_eval_branch": _entry(TrainEvalBranch, (6,)),
    "shape_branch": _entry(ShapeBranchNet, (3, 8, 8)),
    "patch_tokens": _entry(PatchTokenNet, (16, 6)),
    "group_loop": _entry(ChannelGroupLoop, (3, 6, 6)),
    "unet": _entry(UNet, (3, 8, 8)),
    "convnext": _entry(ConvNeXt, (3, 16, 16)),
    "mobilenet_v2": _entry(MobileNetV2, (3, 8, 8)),
    "se_resnet": _entry(SEResNet, (3, 8, 8)),
    "efficientnet": _entry(EfficientNetLike, (3, 8, 8)),
    "vit": _entry(ViT, (3, 8, 8)),
    "std_conv": _entry(BiTResNet, (3, 6, 6)),
}


def names() -> list[str]:
    """The corpus model names, in definition order."""
    return list(CORPUS)


def build(name: str) -> tuple[nn.Module, tuple]:
    """A fresh ``(model, example_inputs)`` for corpus entry ``name``."""
    return CORPUS[name]()


def eval_outputs(module: nn.Module, inputs: tuple):
    """``module(*inputs)`` in eval mode without autograd, the module's training flag restored afterwards."""
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            return module(*inputs)
    finally:
        module.train(was)
