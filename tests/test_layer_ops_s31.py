"""Fewer ATen operations in the hard orthogonal layers' training step, with the same results (session 31):

* the projector blocks' bases are Householder ``Q`` factors without the sign fix of ``orthonormal`` (a block uses
  its basis only through :math:`P = QQ^T`, which the column signs do not change);
* a block applied to a single tap (the first block of each dimension at stride 1) is one concatenation
  :math:`[XP, X - XP]` instead of two zero paddings and a sum;
* the kernel is not multiplied by a gain of 1;
* the layers pad (fold) with their own pads without checking them again at every forward.

The kernel is checked against the construction written out in float64 (projectors :math:`QQ^T` from
``torch.linalg.qr``, 1-D chains as polynomial products in a slow loop, the reshaped kernel convolved tap by tap),
its gradients against autograd through that reference, and the layer's output against ``F.conv`` of the
reference kernel on the circularly padded input.
"""

from __future__ import annotations

import collections
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from orthofx.nn import (OrthogonalConv1d, OrthogonalConv2d, OrthogonalConv3d, OrthogonalConvTranspose2d,
                        OrthogonalLinear)
from references import OpCount, circular_operator64, circular_pad_loop

pytestmark = pytest.mark.usefixtures("one_thread")

SYNCS = ("nonzero", "item", "is_nonzero", "_local_scalar_dense", "tolist")


# ------------------------------------------------------------------------------------------ reference build

def _orthonormal64(raw: torch.Tensor) -> torch.Tensor:
    """Householder QR of the tall orientation, columns multiplied by the signs of diag(R) (+1 for +0)."""
    tall = raw.shape[-2] >= raw.shape[-1]
    a = raw if tall else raw.mT
    Q, R = torch.linalg.qr(a)
    sign = torch.where(torch.diagonal(R, dim1=-2, dim2=-1).detach() >= 0, 1.0, -1.0).to(raw)
    Q = Q * sign.unsqueeze(-2)
    return Q if tall else Q.mT


def _polymul(A: dict, B: dict) -> dict:
    """Product of matrix polynomials in one variable, ``{tap: matrix}``."""
    out: dict = {}
    for (i, a), (j, b) in itertools.product(A.items(), B.items()):
        out[i + j] = out.get(i + j, 0) + a @ b
    return out


def reference_kernel(layer, proj_a=None, proj_b=None, matrix=None) -> torch.Tensor:
    """The layer's kernel ``(out, in / groups, *k)`` from the construction of ``orthofx.nn.orthogonal``'s module
    docs, in float64, one group, one block and one tap at a time (differentiable in the given parameters)."""
    given = {"proj_a": proj_a, "proj_b": proj_b, "matrix": matrix}
    for name, value in given.items():
        if value is None and getattr(layer, name) is not None:
            given[name] = getattr(layer, name).detach().double()
    proj_a, proj_b, matrix = given["proj_a"], given["proj_b"], given["matrix"]
    d, n, M, C = layer._dims, layer._n, layer._M, layer._C
    I = torch.eye(n, dtype=torch.float64)
    kernels = []
    for grp in range(layer.groups):
        chains = []  # per dimension: the 1-D chain T_i = B_m ... B_1 as a polynomial {tap: n x n}
        for dim in range(d):
            T = {0: I}
            for cls, idx in layer._block_index[dim]:
                proj = proj_a if cls == "a" else proj_b
                if proj is None:  # rank 0: B = z
                    B = {1: I}
                else:
                    Q = torch.linalg.qr(proj[grp, idx])[0]
                    P = Q @ Q.T
                    B = {0: P, 1: I - P}
                T = _polymul(B, T)  # T_i = B_m ... B_1: the block listed first is the innermost
            chains.append(T)
        W = _orthonormal64(matrix[grp])
        K = torch.zeros(M, C, *layer.kernel_size, dtype=torch.float64)
        if layer._embed:     # K(z) = T_1 ... T_d W
            for taps in itertools.product(*(sorted(T) for T in chains)):
                A = I
                for T, p in zip(chains, taps):
                    A = A @ T[p]
                K[(slice(None), slice(None)) + taps] += A @ W
        else:                # K(z) = R(z) T_1 ... T_d, R the reshaped matrix (one tap at stride 1)
            R = W.reshape(M, C, *layer._r)
            for rt in itertools.product(*(range(r) for r in layer._r)):
                for taps in itertools.product(*(sorted(T) for T in chains)):
                    A = R[(slice(None), slice(None)) + rt]
                    for T, p in zip(chains, taps):
                        A = A @ T[p]
                    K[(slice(None), slice(None)) + tuple(a + b for a, b in zip(rt, taps))] += A
        kernels.append(K)
    return torch.cat(kernels) * layer.gain


CONFIGS = [
    (OrthogonalConv2d, dict(in_channels=8, out_channels=8, kernel_size=3)),
    (OrthogonalConv2d, dict(in_channels=6, out_channels=4, kernel_size=3)),
    (OrthogonalConv2d, dict(in_channels=4, out_channels=8, kernel_size=3)),                # embedding, left side
    (OrthogonalConv2d, dict(in_channels=4, out_channels=8, kernel_size=3, stride=2)),
    (OrthogonalConv2d, dict(in_channels=5, out_channels=5, kernel_size=(4, 3), gain=2.0)),  # odd n: two QRs
    (OrthogonalConv2d, dict(in_channels=4, out_channels=4, kernel_size=5, groups=2)),
    (OrthogonalConv2d, dict(in_channels=3, out_channels=3, kernel_size=3, groups=3)),     # n = 1: delays
    (OrthogonalConv1d, dict(in_channels=6, out_channels=6, kernel_size=4)),
    (OrthogonalConv1d, dict(in_channels=4, out_channels=6, kernel_size=5, stride=2)),
    (OrthogonalConv3d, dict(in_channels=4, out_channels=4, kernel_size=3)),
]


@pytest.mark.parametrize("cls, kwargs", CONFIGS, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(CONFIGS)])
def test_kernel_and_gradients_match_the_written_out_construction(cls, kwargs):
    torch.manual_seed(3)
    layer = cls(**kwargs, dtype=torch.float64)
    K = layer.weight
    params = {name: p.detach().clone().requires_grad_(True) for name, p in layer.named_parameters()
              if name in ("proj_a", "proj_b", "matrix")}  # proj_a / proj_b are None where a class is absent
    ref = reference_kernel(layer, **params)
    assert K.shape == ref.shape
    torch.testing.assert_close(K, ref, rtol=0, atol=1e-12)
    G = torch.randn_like(ref)
    (K * G).sum().backward()
    (ref * G).sum().backward()
    for name, p in params.items():
        torch.testing.assert_close(getattr(layer, name).grad, p.grad, rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("compute_dtype, tol", [(torch.float64, 1e-7), (torch.float32, 1e-5)])
def test_float32_layer_is_orthogonal_and_matches_the_reference(compute_dtype, tol):
    torch.manual_seed(4)
    layer = OrthogonalConv2d(6, 6, 3, compute_dtype=compute_dtype)
    K = layer.weight.detach()
    torch.testing.assert_close(K.double(), reference_kernel(layer), rtol=0, atol=1e-6)
    s = torch.linalg.svdvals(circular_operator64(K.double(), grid=(6, 6)))
    assert float((s - 1).abs().max()) <= tol


@pytest.mark.parametrize("cls, kwargs, size", [
    (OrthogonalConv2d, dict(in_channels=4, out_channels=4, kernel_size=3), (6, 5)),
    (OrthogonalConv2d, dict(in_channels=4, out_channels=8, kernel_size=3, stride=2), (6, 6)),
    (OrthogonalConv2d, dict(in_channels=2, out_channels=2, kernel_size=3, padding=3), (2, 2)),  # pads > map
    (OrthogonalConv1d, dict(in_channels=2, out_channels=2, kernel_size=4), (7,)),
])
def test_forward_is_the_convolution_of_the_circularly_padded_input(cls, kwargs, size):
    torch.manual_seed(5)
    layer = cls(**kwargs, dtype=torch.float64)
    x = torch.randn(2, layer.in_channels, *size, dtype=torch.float64)
    padded = circular_pad_loop(x, layer.pads)
    conv = {1: F.conv1d, 2: F.conv2d}[layer._dims]
    expected = conv(padded, reference_kernel(layer), layer.bias.double(), layer.stride)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


def test_symbolic_trace_records_the_padding_and_the_fold_as_one_call_each():
    torch.manual_seed(6)
    model = torch.nn.Sequential(OrthogonalConv2d(4, 4, 3), OrthogonalConvTranspose2d(4, 4, 3, stride=2))
    gm = torch.fx.symbolic_trace(model)
    names = [getattr(node.target, "__name__", "") for node in gm.graph.nodes if node.op == "call_function"]
    assert names.count("_circular_pad_valid") == 1 and names.count("_circular_fold_valid") == 1, names
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ operations

def _training_ops(layer, x) -> tuple[collections.Counter, collections.Counter]:
    with OpCount() as forward:
        y = layer(x)
    loss = y.square().sum()
    with OpCount() as backward:
        loss.backward()
    return forward.counts, backward.counts


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cls, kwargs, shape", [
    (OrthogonalConv2d, dict(in_channels=8, out_channels=8, kernel_size=3), (8, 6, 6)),
    (OrthogonalConv2d, dict(in_channels=8, out_channels=16, kernel_size=3, stride=2), (8, 6, 6)),
    (OrthogonalConv1d, dict(in_channels=8, out_channels=8, kernel_size=3), (8, 6)),
    (OrthogonalLinear, dict(in_features=8, out_features=16), (8,)),
])
def test_training_step_has_no_host_synchronisation(cls, kwargs, shape, compute_dtype):
    layer = cls(**kwargs, compute_dtype=compute_dtype).train()
    forward, backward = _training_ops(layer, torch.randn(2, *shape, requires_grad=True))
    assert not {op: c for op, c in (forward + backward).items() if op in SYNCS}


@pytest.mark.parametrize("gain", [1.0, 2.0])
@pytest.mark.parametrize("cls, kwargs, shape, single_taps", [
    (OrthogonalConv2d, dict(in_channels=8, out_channels=8, kernel_size=3), (8, 6, 6), 2),   # 2 blocks per dim
    (OrthogonalConv2d, dict(in_channels=8, out_channels=16, kernel_size=3, stride=2), (8, 6, 6), 0),
    (OrthogonalConv1d, dict(in_channels=8, out_channels=8, kernel_size=3), (8, 6), 1),
])
def test_build_structure(cls, kwargs, shape, single_taps, gain):
    """One sign fix (the mixing matrix's; the projector bases need none), no multiplication by a gain of 1, and a
    concatenation (no padding) for each block on a single tap: fixed by the construction, not by timing."""
    layer = cls(**kwargs, gain=gain).train()
    blocks = sum(len(b) for b in layer._block_index)
    forward, _ = _training_ops(layer, torch.randn(2, *shape, requires_grad=True))
    assert forward["copysign"] == 1 and forward["linalg_qr"] == 2
    assert forward["mul"] == 1 + (gain != 1.0)
    assert forward["constant_pad_nd"] == 2 * (blocks - single_taps)
    both = layer.proj_a is not None and layer.proj_b is not None
    assert forward["cat"] == single_taps + both  # + the one of the two projector classes' parameters


@pytest.mark.parametrize("gain", [1.0, 0.5])
def test_linear_gain_one_is_not_multiplied(gain):
    torch.manual_seed(7)
    layer = OrthogonalLinear(6, 9, gain=gain, dtype=torch.float64)
    forward, _ = _training_ops(layer, torch.randn(3, 6, dtype=torch.float64))
    assert forward["mul"] == 1 + (gain != 1.0)
    torch.testing.assert_close(layer.weight, gain * _orthonormal64(layer.raw_weight.double()), rtol=0, atol=1e-12)
    assert math.isclose(float(torch.linalg.svdvals(layer.weight.detach()).max()), gain, rel_tol=1e-12)
