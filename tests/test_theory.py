"""Tests of orthofx.theory: hand-derived cases, explicit orthogonal constructions where an orthogonal conv exists,
and numerical minimisation where it may not (P0 Theorem 4, Propositions 5 and 6, Theorem 8 constants)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orthofx.errors import ArgumentError
from orthofx.metrics import lorth, orthogonality_error
from orthofx.theory import ExistenceResult, orthogonal_conv_exists, orthogonality_case, theorem8_constants

# ------------------------------------------------------------------------------------------- hand-derived cases


def test_orthogonality_case():
    assert orthogonality_case(16, 32, stride=2) == "RO"  # 32 <= 64
    assert orthogonality_case(16, 64, stride=2) == "RO"  # square: reported as RO
    assert orthogonality_case(16, 65, stride=2) == "CO"
    assert orthogonality_case(16, 32, stride=1) == "CO"
    assert orthogonality_case(4, 8, stride=2, dims=1) == "RO"
    assert orthogonality_case(4, 9, stride=2, dims=1) == "CO"
    assert orthogonality_case(3, 7, stride=(2, 1)) == "CO"  # 7 > 3 * 2
    assert orthogonality_case(3, 6, stride=(2, 1)) == "RO"


def test_theorem4_hand_derived():
    # the brief's example, verbatim
    r = orthogonal_conv_exists(2, 4, 3, stride=2)
    assert r == ExistenceResult(True, "RO",
                                "row-orthogonal case (M=4 <= C*S^d=8): exists iff M <= C*k^d, here 4 <= 18")
    exists, case, reason = r  # unpacks as a triple
    assert exists and case == "RO" and reason == r.reason
    # ResNet strided shortcut (M, C, k, S) = (2C, C, 1, 2): none, in 2-D and in 1-D
    for C in (1, 16, 64):
        exists, case, reason = orthogonal_conv_exists(C, 2 * C, 1, stride=2)
        assert (exists, case) == (False, "RO")
        assert f"here {2 * C} > {C}" in reason
        assert orthogonal_conv_exists(C, 2 * C, 1, stride=2, dims=1)[:2] == (False, "RO")
    # k < S in the RO case can exist (a subsampling 1x1 conv with an orthogonal mixing)
    assert orthogonal_conv_exists(4, 4, 1, stride=2)[:2] == (True, "RO")  # 4 <= 4 * 1^2
    assert orthogonal_conv_exists(2, 8, 2, stride=3).exists  # 8 <= 2 * 4
    assert not orthogonal_conv_exists(2, 9, 2, stride=3).exists  # 9 > 2 * 4
    # CO: exists iff S <= k
    assert orthogonal_conv_exists(16, 128, 3, stride=2)[:2] == (True, "CO")
    assert orthogonal_conv_exists(16, 128, 2, stride=2)[:2] == (True, "CO")
    exists, case, reason = orthogonal_conv_exists(16, 128, 1, stride=2)
    assert (exists, case) == (False, "CO") and "S <= k, here 2 > 1" in reason
    assert orthogonal_conv_exists(64, 128, 3, stride=1)[:2] == (True, "CO")
    # square case M = C S^d: S <= k
    assert orthogonal_conv_exists(3, 12, 2, stride=2).exists
    assert not orthogonal_conv_exists(3, 12, 1, stride=2).exists
    assert not orthogonal_conv_exists(3, 27, 2, stride=3).exists
    # standard stride-1 layers always have one with circular padding
    for C, M, k in [(3, 64, 3), (64, 64, 3), (128, 64, 1), (64, 256, 1), (3, 64, 7)]:
        assert orthogonal_conv_exists(C, M, k).exists


def test_theorem4_non_square_and_groups():
    # RO, non-square: only prod(min(k_i, S_i)) residues per channel are read
    exists, case, reason = orthogonal_conv_exists(1, 2, (1, 4), stride=(4, 1))
    assert (exists, case) == (False, "RO") and "prod(min(k_i, S_i))" in reason and "here 2 > 1" in reason
    assert orthogonal_conv_exists(1, 2, (1, 3), stride=(2, 2)).exists
    assert orthogonal_conv_exists(1, 4, (2, 3), stride=(2, 2)).exists  # square case, S_i <= k_i
    assert not orthogonal_conv_exists(1, 4, (1, 4), stride=(2, 2)).exists
    # CO, non-square: S_i <= k_i in every dimension
    exists, case, reason = orthogonal_conv_exists(1, 5, (3, 1), stride=(2, 2))
    assert (exists, case) == (False, "CO") and "S=2, k=(3, 1)" in reason
    assert orthogonal_conv_exists(1, 5, (3, 2), stride=(2, 2)).exists
    assert orthogonal_conv_exists(1, 3, (1, 3), stride=(1, 2)).exists
    # groups: per group; the reason quotes the per-group numbers
    exists, case, reason = orthogonal_conv_exists(8, 16, 1, stride=2, groups=4)
    assert (exists, case) == (False, "RO") and reason.startswith("per group of 4 (C=2, M=4)")
    assert orthogonal_conv_exists(32, 32, 3, groups=32).exists  # depthwise
    assert orthogonal_conv_exists(32, 64, 1, groups=32)[:2] == (True, "CO")  # 1 -> 2 channels: a unit column
    assert orthogonal_conv_exists(32, 64, 1, stride=2, groups=32)[:2] == (False, "RO")  # 2 > 1 * min(1, 2)^2


def test_valid_and_zero_padding_hand_derived():
    # Proposition 5: no CO orthogonal conv with 'valid' padding when windows overlap
    exists, case, reason = orthogonal_conv_exists(16, 128, 3, stride=2, padding="valid")
    assert (exists, case) == (False, "CO") and "Proposition 5" in reason
    assert not orthogonal_conv_exists(64, 128, 3, padding="valid").exists
    assert orthogonal_conv_exists(16, 128, 2, stride=2, padding="valid").exists  # k = S: tiles, no overlap
    assert orthogonal_conv_exists(16, 32, 1, padding="valid").exists  # a 1x1 conv has no border
    assert not orthogonal_conv_exists(16, 128, 1, stride=2, padding="valid").exists
    # RO with 'valid': as Theorem 4
    assert orthogonal_conv_exists(64, 64, 3, padding="valid").exists
    assert not orthogonal_conv_exists(16, 32, 1, stride=2, padding="valid").exists
    # zeros, stride 1 (Proposition 6): exists, but only as a centre-tap 1x1 mixing
    for C, M in [(64, 64), (16, 64), (64, 16)]:
        exists, case, reason = orthogonal_conv_exists(C, M, 3, padding="zeros")
        assert exists and "Proposition 6" in reason and "1x1" in reason and "centre" in reason
    _, _, reason = orthogonal_conv_exists(16, 64, 1, padding="zeros")
    assert "must vanish" not in reason
    # zeros, strided: effective kernel min(S, k - (k-1)//2)
    assert orthogonal_conv_exists(16, 64, 3, stride=2, padding="zeros").exists  # k' = 2 = S
    assert orthogonal_conv_exists(16, 128, 3, stride=2, padding="zeros").exists  # CO, S <= k'
    assert not orthogonal_conv_exists(1, 9, 3, stride=3, padding="zeros").exists  # k' = 2 < 3
    assert orthogonal_conv_exists(1, 9, 3, stride=3, padding="circular").exists


def test_bad_arguments():
    with pytest.raises(ArgumentError, match="groups=3 must divide both c_in=8 and c_out=9"):
        orthogonal_conv_exists(8, 9, 3, groups=3)
    with pytest.raises(ArgumentError, match="c_in"):
        orthogonal_conv_exists(0, 4, 3)
    with pytest.raises(ArgumentError, match="kernel_size"):
        orthogonal_conv_exists(4, 4, 0)
    with pytest.raises(ArgumentError, match="stride"):
        orthogonal_conv_exists(4, 4, 3, stride=-1)
    with pytest.raises(ArgumentError, match="kernel_size must be an int or a tuple of 2"):
        orthogonal_conv_exists(4, 4, (3, 3, 3))
    with pytest.raises(ArgumentError, match="padding must be one of"):
        orthogonal_conv_exists(4, 4, 3, padding="reflect")
    with pytest.raises(ArgumentError, match="dims"):
        orthogonality_case(4, 4, dims=4)
    with pytest.raises(ArgumentError, match="positive integer"):
        theorem8_constants(4, 4, 2.5)


def test_theorem8_constants_hand_derived():
    assert theorem8_constants(4, 8, 3) == (0.25, 100.0)  # CO: 1/min(8, 4), (2*3-1)^2 * 4
    assert theorem8_constants(8, 4, 3, stride=2) == (0.25, 36.0)  # RO: 1/4, (2*1+1)^2 * 4
    assert theorem8_constants(8, 4, 3, stride=4) == (0.25, 4.0)  # RO, S > k - 1: (2*0+1)^2 * 4
    assert theorem8_constants(2, 16, 3, stride=2) == (0.125, 50.0)  # CO: 1/min(16, 8), 25 * 2
    assert theorem8_constants(3, 4, 5, dims=1) == (1 / 3, 27.0)  # CO, d = 1: 9 * 3
    assert theorem8_constants(4, 4, (3, 1), stride=1) == (0.25, 20.0)  # RO, non-square: (2*2+1) * (2*0+1) * 4
    assert theorem8_constants(8, 8, 3, groups=4) == (0.125, 50.0)  # RO per group M/g = 2: 25 * 2


# ------------------------------------------------------------------------------------------- constructions


def orthogonal_kernel(C, M, ks, ss, gen):
    """An explicit orthogonal kernel (constructive half of Theorem 4), built only from the conditions."""
    K = torch.zeros(M, C, *ks, dtype=torch.float64)
    if M <= C * math.prod(ss):  # RO: M distinct (channel, residue) reads with residue < min(k, S)
        reads = list(itertools.product(range(C), *[range(min(k, s)) for k, s in zip(ks, ss)]))
        assert M <= len(reads)
    else:  # CO: space-to-depth on the first C prod(S) outputs, the others zero
        reads = list(itertools.product(range(C), *[range(s) for s in ss]))
        assert all(s <= k for k, s in zip(ks, ss))
    for m, (c, *r) in enumerate(reads[:M]):
        K[(m, c) + tuple(r)] = 1.0
    Qo = torch.linalg.qr(torch.randn(M, M, generator=gen, dtype=torch.float64))[0]
    Qi = torch.linalg.qr(torch.randn(C, C, generator=gen, dtype=torch.float64))[0]
    return torch.einsum("om,mc...,ci->oi...", Qo, K, Qi)  # orthogonal mixings on both sides keep orthogonality


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 8), st.data())
def test_existence_matches_explicit_construction(d, C, M, data):
    ks = tuple(data.draw(st.integers(1, 4)) for _ in range(d))
    ss = tuple(data.draw(st.integers(1, 3)) for _ in range(d))
    exists, case, reason = orthogonal_conv_exists(C, M, ks, ss, dims=d)
    assert case == orthogonality_case(C, M, ss, dims=d)
    assert str(M) in reason and str(C * math.prod(ss)) in reason
    # the constructive conditions, stated independently
    if case == "RO":
        constructible = M <= C * math.prod(min(k, s) for k, s in zip(ks, ss))
    else:
        constructible = all(s <= k for k, s in zip(ks, ss))
    assert exists == constructible
    if exists:
        gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
        K = orthogonal_kernel(C, M, ks, ss, gen)
        n = tuple(s * 3 for s in ss)
        assert orthogonality_error(K, n, stride=ss) < 1e-12
        assert abs(float(lorth(K, ss))) < 1e-12


# ------------------------------------------------------------------------------------------- minimisation


def minimise(loss, shape, seed=0, restarts=3, adam_steps=300, lbfgs_iters=300, stop_below=None):
    """Smallest loss found from random starts: Adam (float64), then L-BFGS to polish (the minima can be flat:
    quartic along some directions, where first-order steps crawl). Returns (value, argmin); the restarts stop once
    a value is below ``stop_below`` (a test that only needs one such value)."""
    gen = torch.Generator().manual_seed(seed)
    best, best_w = math.inf, None
    for _ in range(restarts):
        w = torch.randn(*shape, generator=gen, dtype=torch.float64) / math.sqrt(math.prod(shape[1:]))
        w.requires_grad_()
        opt = torch.optim.Adam([w], lr=0.05)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, adam_steps)
        for _ in range(adam_steps):
            opt.zero_grad()
            loss(w).backward()
            opt.step()
            sched.step()
        polish = torch.optim.LBFGS([w], max_iter=lbfgs_iters, tolerance_grad=1e-14, tolerance_change=1e-20,
                                   history_size=50, line_search_fn="strong_wolfe")

        def closure():
            polish.zero_grad()
            value = loss(w)
            value.backward()
            return value

        polish.step(closure)
        value = float(loss(w.detach()))
        if value < best:
            best, best_w = value, w.detach().clone()
        if stop_below is not None and best < stop_below:
            break
    return best, best_w


# (C, M, kernel, stride), all with M != C S^d
THEOREM4_GRID = [
    (1, 3, (1,), (2,)),  # CO, S > k: none
    (2, 4, (1, 1), (2, 2)),  # the ResNet shortcut (2C, C, 1, 2): none
    (2, 2, (1, 1), (2, 2)),  # RO, k < S: exists
    (1, 2, (2,), (3,)),  # RO, k < S: exists
    (1, 3, (2,), (4,)),  # RO, M > C k: none
    (1, 3, (3,), (2,)),  # CO, S <= k: exists
    (1, 4, (1,), (2,)),  # CO, S > k: none
    (1, 2, (3,), (1,)),  # CO stride 1: exists
    (3, 2, (3,), (2,)),  # RO: exists
    (2, 3, (3, 3), (1, 1)),  # CO 2-D: exists
    (4, 2, (3, 3), (1, 1)),  # RO 2-D: exists
    (1, 2, (1, 4), (4, 1)),  # RO, non-square: prod(k) = 4 >= M but prod(min(k, S)) = 1: none
    (1, 2, (1, 3), (2, 2)),  # RO, non-square: exists
    (1, 3, (3, 1), (1, 2)),  # CO, non-square, S_2 > k_2: none
]


@pytest.mark.slow
@pytest.mark.parametrize("C,M,ks,ss", THEOREM4_GRID)
def test_theorem4_by_minimising_lorth(C, M, ks, ss):
    assert M != C * math.prod(ss)
    exists = orthogonal_conv_exists(C, M, ks, ss, dims=len(ks)).exists
    best, _ = minimise(lambda w: lorth(w, ss), (M, C, *ks), stop_below=1e-6 if exists else None)
    if exists:
        assert best < 1e-6
    else:
        assert best > 0.1


def dense_1d(K: torch.Tensor, N: int, S: int, padding: str) -> torch.Tensor:
    """Differentiable dense matrix of a 1-D conv (output grid N) with 'circular', 'valid' or 'zeros' boundary."""
    M, C, k = K.shape
    if padding == "valid":
        n, P = S * (N - 1) + k, 0
    else:
        n, P = S * N, (k - 1) // 2 if padding == "zeros" else 0
    basis = torch.zeros(M, C, k, M * N, C * n, dtype=K.dtype)
    for m, c, p, i in itertools.product(range(M), range(C), range(k), range(N)):
        x = S * i + p - P
        if padding == "circular":
            x %= n
        elif not 0 <= x < n:
            continue
        basis[m, c, p, m * N + i, c * n + x] = 1.0
    return torch.einsum("mcp,mcprx->rx", K, basis)


# (C, M, k, S, padding)
PADDING_GRID = [
    (1, 2, 2, 1, "valid"),  # CO, k > S: none (Proposition 5)
    (1, 2, 3, 1, "valid"),  # CO, k > S: none
    (1, 3, 2, 2, "valid"),  # CO, k = S: exists
    (2, 2, 3, 2, "valid"),  # RO: exists
    (1, 1, 3, 1, "zeros"),  # Proposition 6: exists, centre tap only
    (1, 2, 3, 1, "zeros"),  # CO at stride 1: exists (1x1)
    (2, 1, 3, 1, "zeros"),  # RO at stride 1: exists (1x1)
    (1, 2, 3, 2, "zeros"),  # k' = 2 = S: exists
    (1, 3, 3, 2, "zeros"),  # CO, k' = 2 >= S: exists
    (1, 3, 3, 3, "zeros"),  # k' = 2 < S = 3: none (circular: exists)
    (1, 3, 3, 3, "circular"),
]


@pytest.mark.slow
@pytest.mark.parametrize("C,M,k,S,padding", PADDING_GRID)
def test_padding_variants_by_minimising_the_dense_error(C, M, k, S, padding):
    exists, case, _ = orthogonal_conv_exists(C, M, k, S, dims=1, padding=padding)
    N = 6

    def error(w):
        A = dense_1d(w, N, S, padding)
        G = A @ A.T if case == "RO" else A.T @ A
        return (G - torch.eye(G.shape[0], dtype=G.dtype)).square().sum()

    best, best_w = minimise(error, (M, C, k), seed=1, stop_below=1e-6 if exists else None)
    if exists:
        assert best < 1e-6
        if padding == "zeros" and S == 1:  # Proposition 6: only the centre tap survives
            centre = (k - 1) // 2
            off = torch.cat([best_w[:, :, :centre], best_w[:, :, centre + 1:]], -1)
            assert off.abs().max() < 2e-2  # the error is quartic in them: 1e-6 error allows ~1e-3 taps
    else:
        assert best > 0.1


# ------------------------------------------------------------------------------------------- dilation


def dense_dilated(K: torch.Tensor, n: tuple[int, ...], S: tuple[int, ...], D: tuple[int, ...]) -> torch.Tensor:
    """Dense circular operator of a dilated, strided conv, y[m, i] = sum_{c, p} K[m, c, p] x[c, (S i + D p) mod n],
    one entry at a time."""
    M, C = K.shape[:2]
    ks = K.shape[2:]
    out = tuple(a // s for a, s in zip(n, S))
    A = torch.zeros(M, *out, C, *n, dtype=torch.float64)
    for m, c in itertools.product(range(M), range(C)):
        for p in itertools.product(*[range(k) for k in ks]):
            for i in itertools.product(*[range(o) for o in out]):
                x = tuple((s * a + dl * b) % size for s, a, dl, b, size in zip(S, i, D, p, n))
                A[(m,) + i + (c,) + x] += K[(m, c) + p]
    return A.reshape(M * math.prod(out), C * math.prod(n))


# (C, M, kernel, stride, dilation)
DILATED_GRID = [
    (1, 2, (2,), (2,), (2,)),  # taps 0, 2 both read residue 0 mod 2: RO needs M <= 1, none (undilated: exists)
    (1, 2, (2,), (2,), (1,)),  # undilated: exists
    (1, 3, (3,), (2,), (2,)),  # CO: residue 1 mod 2 never read: none (undilated S <= k: exists)
    (1, 3, (3,), (2,), (3,)),  # CO: taps 0, 3, 6 read both residues: exists
    (1, 3, (2,), (3,), (2,)),  # RO: taps 0, 2 read 2 residues mod 3, M = 3 > 2: none
    (1, 2, (2,), (3,), (2,)),  # RO: M = 2 <= 2: exists
    (2, 2, (3,), (1,), (2,)),  # stride 1: dilation changes nothing
    (1, 2, (2, 2), (2, 1), (2, 1)),  # 2-D: dimension 0 reads one residue, M = 2 > 1 * 1 * 1: none
    (1, 2, (2, 2), (2, 1), (1, 2)),  # 2-D: M = 2 <= 2: exists
]


@pytest.mark.parametrize("C,M,ks,ss,ds", DILATED_GRID)
def test_dilated_existence_matches_the_rank_of_the_dense_operator(C, M, ks, ss, ds):
    """An orthogonal conv has full row (RO) or column (CO) rank; a random kernel has the largest rank the
    architecture allows. So 'exists' must be 'a random dilated kernel's dense operator has full rank', and when it
    does, the explicit single-tap construction below must be orthogonal."""
    d = len(ks)
    result = orthogonal_conv_exists(C, M, ks, ss, dims=d, dilation=ds)
    eff = tuple(dl * (k - 1) + 1 for k, dl in zip(ks, ds))
    n = tuple(s * math.ceil(max(e, 2) / s) for e, s in zip(eff, ss))
    gen = torch.Generator().manual_seed(0)
    A = dense_dilated(torch.randn(M, C, *ks, generator=gen, dtype=torch.float64), n, ss, ds)
    sv = torch.linalg.svdvals(A)
    full = A.shape[0] if result.case == "RO" else A.shape[1]
    rank = int((sv > 1e-9 * sv[0]).sum())
    assert result.exists == (rank == full), (result, rank, full)
    if all(dl == 1 for dl in ds):
        assert result == orthogonal_conv_exists(C, M, ks, ss, dims=d)
    if result.exists:  # one tap per output channel, each reading its own (channel, residue) class
        K = torch.zeros(M, C, *ks, dtype=torch.float64)
        used = set()
        for m in range(min(M, C * math.prod(ss))):
            for c, *p in itertools.product(range(C), *[range(k) for k in ks]):
                key = (c,) + tuple(dl * b % s for dl, b, s in zip(ds, p, ss))
                if key not in used:
                    used.add(key)
                    K[(m, c) + tuple(p)] = 1.0
                    break
        Q = dense_dilated(K, n, ss, ds)
        G = Q @ Q.T if result.case == "RO" else Q.T @ Q
        assert torch.allclose(G, torch.eye(G.shape[0], dtype=G.dtype))


def test_dilation_reason_and_bad_arguments():
    exists, case, reason = orthogonal_conv_exists(1, 2, 2, stride=2, dims=1, dilation=2)
    assert (exists, case) == (False, "RO")
    assert "2 > 1" in reason and "dilation" in reason
    with pytest.raises(ValueError, match="dilation"):
        orthogonal_conv_exists(1, 2, 2, stride=2, dims=1, dilation=0)
    with pytest.raises(ValueError, match="dilation"):
        orthogonal_conv_exists(1, 2, 3, stride=2, dims=1, dilation=2, padding="valid")
