"""Adversarial tests of the SVD meta-layer passes (session 36): ``svd_conditioning`` (stable stand-ins,
``to_newton_schulz``), ``pre_svd`` (NOG, OLR, SRIP), each checked against an independent reference (float64
``torch.linalg`` on the same matrices, central finite differences of a float64 function, a slow loop).

Two bugs found and fixed:

* An SVD site's ``U diag(S^p) Vh`` (or ``U diag(S^p) U^T``) of a *square non-symmetric* matrix was rewritten into
  Newton-Schulz iterations on that matrix (``method: newton_schulz``, ``to_newton_schulz``) and reported done
  ("newton_schulz (...)" / "replaced"), although it is a power of the matrix only for a symmetric one (``U = V``):
  the rewritten model silently computed other values (0.38 off for ``I + 0.3 randn``). The non-square case was
  already refused by shape. ``power_newton_schulz(uplo=None)`` now refuses a non-symmetric matrix
  (``LayerArgumentError`` eagerly, at transform time with example inputs; NaN where nothing may be read on the
  host: ``torch.compile``, export).
* ``orthofx.nn.eigh_stable(A, plain=True)`` / ``svd_stable(A, plain=True)`` traced by ``torch.fx`` expand into
  ``torch.linalg.eigh(torch.where(bad, I, A))`` with ``masked_fill(.., nan)`` on each output; the fills hid
  ``V diag(f(lambda)) V^T`` from ``to_newton_schulz`` ("no ... was found"), so ``orthofx.export`` to ``.onnx`` of a
  model calling them was refused (also after the ``svd`` preset, which makes the inner eigh a stable stand-in with
  a monitor). ``to_newton_schulz`` now reads that expansion as one stand-in call on the matrix itself, only when
  every output's NaN fill is under the guard's own flag (a model's own fill under ``L < 0`` was deleted at first).
"""

from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch
from torch import fx, nn

import orthofx
from orthofx.errors import LayerArgumentError, TransformError
from orthofx.nn import eigh_stable, svd_stable
from orthofx.nn.conditioning import power_newton_schulz
from orthofx.passes.pre_svd import srip
from orthofx.passes.svd_conditioning import decomposition_op, to_newton_schulz


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _spd(n, batch=(), seed=0, kappa=10.0):
    """float64 symmetric positive definite matrices with eigenvalues spread over [1, kappa]."""
    Q = torch.linalg.qr(torch.randn(*batch, n, n, generator=_gen(seed), dtype=torch.float64)).Q
    lam = torch.logspace(0.0, math.log10(kappa), n, dtype=torch.float64)
    return (Q * lam) @ Q.mT


def _power64(a, p):
    """``a^p`` of symmetric positive definite matrices from a float64 ``torch.linalg.eigh`` (the reference)."""
    L, V = torch.linalg.eigh(a.to(torch.float64))
    return (V * L.pow(p).unsqueeze(-2)) @ V.mT


def _svd_pattern64(a, p):
    """``U diag(S^p) Vh`` from a float64 ``torch.linalg.svd`` (the reference for any square matrix)."""
    U, S, Vh = torch.linalg.svd(a.to(torch.float64))
    return (U * S.pow(p).unsqueeze(-2)) @ Vh


def _decompositions(gm):
    return [n for n in gm.graph.nodes if decomposition_op(n)]


# ------------------------------------------------------------------ SVD sites of non-symmetric matrices


class SvdRootUVh(nn.Module):
    """``U diag(S^(1/2)) Vh`` through ``svd_stable``: ``A^(1/2)`` only for a symmetric positive definite ``A``."""

    def forward(self, a):
        U, S, Vh = svd_stable(a)
        return U @ torch.diag_embed(S.sqrt()) @ Vh


class SvdWhitenUUt(nn.Module):
    """``U diag(S^(-1/2)) U^T`` of ``torch.linalg.svd``: ``(A A^T)^(-1/4)`` for a square non-symmetric ``A``."""

    def forward(self, a):
        U, S, Vh = torch.linalg.svd(a)
        return U @ torch.diag_embed(S.rsqrt()) @ U.mT


def _square_non_symmetric():
    # eigenvalues near 1 (Newton-Schulz on it converges to *a* matrix, finite, just not the pattern's value)
    return torch.eye(5, dtype=torch.float64) + 0.3 * torch.randn(3, 5, 5, generator=_gen(3), dtype=torch.float64)


def test_to_newton_schulz_refuses_a_non_symmetric_matrix_instead_of_other_values():
    a = _square_non_symmetric()
    gm = fx.symbolic_trace(SvdRootUVh())
    assert to_newton_schulz(gm, iterations=30) == {"svd_stable_default": "replaced"}
    # the old code returned Newton-Schulz of ``a`` here, 0.1-0.4 away from U diag(S^(1/2)) Vh
    with pytest.raises(LayerArgumentError, match=r"3 of 3 matrices .* are far from symmetric.*method 'taylor'"):
        gm(a)
    # a symmetric positive definite batch is still the pattern's value
    spd = _spd(5, (3,), seed=1)
    torch.testing.assert_close(gm(spd), _svd_pattern64(spd, 0.5), atol=1e-10, rtol=0)
    torch.testing.assert_close(gm(spd), _power64(spd, 0.5), atol=1e-10, rtol=0)


def test_newton_schulz_method_on_a_square_data_matrix_svd_fails_at_transform_not_silently():
    a = _square_non_symmetric()
    policy = {"rules": [{"match": {"op": "linalg.svd"}, "apply": "svd_conditioning",
                         "with": {"method": "newton_schulz", "iterations": 30}}]}
    with pytest.raises(TransformError, match="far from symmetric"):
        orthofx.transform(SvdWhitenUUt(), policy, example_inputs=(a,))
    gm = orthofx.transform(SvdWhitenUUt(), policy)  # no example inputs: refused on the first call
    with pytest.raises(LayerArgumentError, match="far from symmetric"):
        gm(a)
    # a covariance (symmetric to rounding, float32) goes through, and equals the float64 SVD's value
    x = torch.randn(4, 9, 5, generator=_gen(5))
    cov = x.mT @ x / 9 + 0.1 * torch.eye(5)
    torch.testing.assert_close(gm(cov).double(), _power64(cov, -0.5), atol=2e-5, rtol=1e-5)


def test_newton_schulz_of_a_non_symmetric_matrix_is_nan_under_torch_compile():
    """Where no value may be read on the host (compile, export) the refused matrices get NaN, the others their
    power (each matrix of the batch on its own)."""
    a = _spd(4, (2,), seed=6)
    a[1, 0, 1] += 0.5

    def f(m):
        return power_newton_schulz(m, 0.5, iterations=30)

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(a)
    assert out[1].isnan().all()
    torch.testing.assert_close(out[0], _power64(a[0], 0.5), atol=1e-10, rtol=0)
    # eigh sites (uplo "L" / "U") read one triangle: never refused
    torch.testing.assert_close(power_newton_schulz(a, 0.5, iterations=30, uplo="U"),
                               _power64(a.triu() + a.triu(1).mT, 0.5), atol=1e-10, rtol=0)


# ------------------------------------------------------------------ eigh_stable / svd_stable(plain=True)


class PlainPowers(nn.Module):
    def __init__(self, float64=False, uplo="L"):
        super().__init__()
        self.float64, self.uplo = float64, uplo

    def forward(self, a):
        L, V = eigh_stable(a, plain=True, float64=self.float64, uplo=self.uplo)
        inv_root = V @ torch.diag_embed(L.rsqrt()) @ V.mT
        if self.uplo == "U":  # the input's lower triangle is noise, no symmetric matrix for an SVD
            return inv_root, inv_root
        U, S, Vh = svd_stable(a, plain=True, float64=self.float64)
        return inv_root, (U * S.sqrt().unsqueeze(-2)) @ Vh


@pytest.mark.parametrize("float64,uplo", [(False, "L"), (True, "L"), (False, "U")])
def test_to_newton_schulz_rewrites_the_traced_plain_forms(float64, uplo):
    model = PlainPowers(float64, uplo)
    gm = fx.symbolic_trace(model)
    # the old code: {'linalg_eigh': 'no V diag(...) V^T ... was found', 'linalg_svd': ...}
    assert set(to_newton_schulz(gm, iterations=30).values()) == {"replaced"}
    assert not _decompositions(gm)
    assert not any(n.target in (torch.isfinite, torch.where) for n in gm.graph.nodes)  # the guard went too
    a = _spd(4, (3,), seed=7)
    read = a.triu() + a.triu(1).mT if uplo == "U" else a
    if uplo == "U":
        a = a + torch.randn(a.shape, generator=_gen(8), dtype=a.dtype).tril(-1)  # never read by eigh
    inv_root, root = gm(a.float())
    torch.testing.assert_close(inv_root.double(), _power64(read, -0.5), atol=2e-5, rtol=1e-5)
    if uplo == "L":
        torch.testing.assert_close(root.double(), _svd_pattern64(a, 0.5), atol=2e-5, rtol=1e-5)
    # a matrix holding a NaN: NaN results for that matrix only, as the plain forms give
    bad = _spd(4, (3,), seed=9)
    bad[1, 2, 2] = float("nan")
    for got, expected in zip(gm(bad), model(bad)):
        assert got.isnan().flatten(1).all(1).tolist() == expected.isnan().flatten(1).all(1).tolist() == \
            [False, True, False]


class PlainWhitening(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = self.fc(x)
        cov = h.mT @ h / h.shape[-2] + 0.1 * torch.eye(4)
        L, V = eigh_stable(cov, plain=True)
        return (V @ torch.diag_embed(L.rsqrt()) @ V.mT).flatten(-2)


def test_to_newton_schulz_reads_a_plain_form_the_svd_preset_made_stable():
    """The ``svd`` preset makes the ``torch.linalg.eigh`` inside the expansion a stable stand-in with a monitor (a
    pass-through once frozen) between it and the fills: read back too, in the transformed and the frozen model."""
    torch.manual_seed(0)
    model, x = PlainWhitening(), torch.randn(2, 16, 6)
    gm = orthofx.transform(model, "svd", example_inputs=(x,))
    frozen = orthofx.freeze(gm)
    h = model.fc(x).double()
    expected = _power64(h.mT @ h / 16 + 0.1 * torch.eye(4, dtype=torch.float64), -0.5).flatten(-2)
    for form in (copy.deepcopy(gm), frozen):
        assert set(to_newton_schulz(form, iterations=30).values()) == {"replaced"}
        assert not _decompositions(form)
        torch.testing.assert_close(form.eval()(x).double(), expected, atol=2e-5, rtol=1e-5)


def test_to_newton_schulz_rewrites_the_plain_forms_of_an_export_captured_model():
    """The same expansion in ATen ops (``aten.where.self``, ``aten.masked_fill.Scalar`` ...)."""
    torch.manual_seed(0)
    model, x = PlainWhitening(), torch.randn(2, 16, 6)
    policy = {"capture": {"mode": "export"}, "rules": [{"match": {"type": "Linear"}, "apply": "orth_regularizer"}]}
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    assert set(to_newton_schulz(gm, iterations=30).values()) == {"replaced"}
    assert not _decompositions(gm)
    h = model.fc(x).double()
    expected = _power64(h.mT @ h / 16 + 0.1 * torch.eye(4, dtype=torch.float64), -0.5).flatten(-2)
    torch.testing.assert_close(gm(x).double(), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed")
def test_onnx_export_of_a_model_calling_eigh_stable_plain(tmp_path):
    torch.manual_seed(0)
    model = PlainWhitening()
    x = torch.randn(2, 16, 6)
    gm = orthofx.transform(model, "lorth", example_inputs=(x,))
    result = orthofx.export(gm, tmp_path / "m.onnx", example_inputs=(x,))  # ExportError before the fix
    assert result.newton_schulz is not None and result.max_abs_diff <= 1e-5


# ------------------------------------------------------------------ what held: stable ops vs references


@pytest.mark.parametrize("batch", [(), (3,)])
def test_exact_stable_gradients_equal_float64_finite_differences(batch):
    g = _gen(11)
    a = _spd(4, batch, seed=12, kappa=20.0)
    x = torch.randn(*batch, 5, 3, generator=g, dtype=torch.float64)
    w1 = torch.randn(*batch, 4, 4, generator=g, dtype=torch.float64)
    w2 = torch.randn(*batch, 5, 5, generator=g, dtype=torch.float64)

    def loss(a, x, eigh, svd):
        L, V = eigh(a)
        U, S, Vh = svd(x)
        # sign-invariant functions of the vectors
        return (((V * L.sqrt().unsqueeze(-2)) @ V.mT) * w1).sum() + ((V[..., :1] @ V[..., :1].mT) * w1).sum() \
            + (((U * S.unsqueeze(-2)) @ U.mT) * w2).sum() + S.pow(3).sum() + ((U[..., :1] @ U[..., :1].mT) * w2).sum()

    stable = (lambda m: eigh_stable(m, taylor_order=None), lambda m: svd_stable(m, taylor_order=None))
    exact = (torch.linalg.eigh, lambda m: torch.linalg.svd(m, full_matrices=False))
    ar, xr = a.clone().requires_grad_(), x.clone().requires_grad_()
    ga, gx = torch.autograd.grad(loss(ar, xr, *stable), (ar, xr))
    h = 1e-6
    for k in range(3):
        da = torch.randn(a.shape, generator=g, dtype=torch.float64)
        da = da + da.mT  # eigh reads a symmetric matrix
        dx = torch.randn(x.shape, generator=g, dtype=torch.float64)
        fd = (loss(a + h * da, x + h * dx, *exact) - loss(a - h * da, x - h * dx, *exact)) / (2 * h)
        assert abs(float((ga * da).sum() + (gx * dx).sum()) - float(fd)) <= 1e-6 * max(1.0, abs(float(fd)))


def test_clamp_method_trains_like_the_original_model():
    """``method: clamp`` (the exact backward) on covariance sites: outputs and parameter gradients equal the
    untransformed model's (torch's own eigh / svd backward), eval and frozen outputs too."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.fc2 = nn.Linear(6, 4), nn.Linear(6, 4)

        def forward(self, x):
            h, h2 = self.fc(x), self.fc2(x)
            U, S, Vh = torch.linalg.svd(h.mT @ h / 16 + 0.1 * torch.eye(4))
            L, V = torch.linalg.eigh(h2.mT @ h2 / 16 + 0.05 * torch.eye(4), UPLO="U")
            q = (V * L.clamp(min=0).sqrt().unsqueeze(-2)) @ V.mT
            return torch.cat([(U @ torch.diag_embed(S.rsqrt()) @ U.mT).flatten(-2), q.flatten(-2)], -1)

    torch.manual_seed(1)
    model, x = Two(), torch.randn(2, 16, 6)
    policy = {"rules": [{"match": {"op": ["linalg.eigh", "linalg.svd"]}, "apply": "svd_conditioning",
                         "with": {"method": "clamp"}}]}
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    w = torch.randn(2, 32)
    (model(x) * w).sum().backward()
    (gm(x) * w).sum().backward()
    for name, p in gm.named_parameters():
        torch.testing.assert_close(p.grad, model.get_parameter(name).grad, atol=2e-6, rtol=1e-5)
    frozen = orthofx.freeze(gm)
    torch.testing.assert_close(frozen(x), model.eval()(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(copy.deepcopy(gm).eval()(x), model(x), atol=1e-5, rtol=0)


def test_srip_equals_the_spectral_norm_of_the_gram_defect():
    """SRIP (enough power iterations) against ``torch.linalg.matrix_norm(ord=2)`` in float64, per group, wide and
    tall blocks (the smaller Gram matrix)."""
    g = _gen(13)
    for groups, out, rest in [(1, 3, 7), (1, 7, 3), (2, 4, 9), (3, 6, 2), (1, 5, 5)]:
        weight = 0.5 * torch.randn(out, rest, generator=g, dtype=torch.float64)
        expected = 0.0
        for block in weight.reshape(groups, out // groups, rest):
            gram = block @ block.mT if block.shape[0] <= block.shape[1] else block.mT @ block
            expected += float(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], dtype=gram.dtype), ord=2))
        assert float(srip(weight, groups, iterations=300)) == pytest.approx(expected, rel=1e-9)


def test_nog_and_olr_steps_equal_a_reference_loop():
    """SGD with NOG + OLR on a grouped conv and a linear feeding two decompositions (one site, treated once), the
    weights in a param group of their own lr: each step is ``w - eta* polar(g)`` with the polar factor of each
    group's block from a float64 SVD (directions of the rank-deficient gradient dropped) and P4's ``eta*``."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False)
            self.lin = nn.Linear(6, 6)
            self.head = nn.Linear(6 + 36 + 36, 3)

        def forward(self, x):
            h = self.conv(x).flatten(2).mT
            L, V = torch.linalg.eigh(h.mT @ h / h.shape[-2] + 0.1 * torch.eye(6))
            a = (V @ torch.diag_embed(L.rsqrt()) @ V.mT).flatten(1)
            z = self.lin(h.mean(1))
            cov = z.mT @ z / z.shape[0] + torch.diag(torch.linspace(0.1, 0.2, 6))  # rank 4 + distinct shifts
            L2, V2 = torch.linalg.eigh(cov)
            b = (V2 @ torch.diag_embed(L2.sqrt()) @ V2.mT).flatten().expand(x.shape[0], -1)
            return self.head(torch.cat([torch.linalg.eigvalsh(cov).expand(x.shape[0], -1), a, b], -1))

    def polar(grad, groups):
        blocks = []
        for block in grad.double().reshape(groups, grad.shape[0] // groups, -1):
            U, S, Vh = torch.linalg.svd(block, full_matrices=False)
            keep = (S > 1e-6 * S[0]).double()  # the linear's gradient has rank 4 (4 samples)
            blocks.append((U * keep) @ Vh)
        return torch.cat(blocks).reshape(grad.shape)

    torch.manual_seed(0)
    x = torch.randn(4, 4, 5, 5)
    policy = {"rules": [{"match": {"feeds": ["linalg.eigh", "linalg.eigvalsh"]}, "apply": "pre_svd",
                         "with": {"nog": True, "olr": True}}]}
    gm = orthofx.transform(Net(), policy, example_inputs=(x,))
    hooked = {"conv.weight": 2, "lin.weight": 1}
    optimizer = torch.optim.SGD([{"params": [gm.conv.weight, gm.lin.weight], "lr": 0.05},
                                 {"params": [p for n, p in gm.named_parameters() if n not in hooked]}], lr=0.1)
    orthofx.attach(optimizer, gm)
    for _ in range(2):
        optimizer.zero_grad()
        gm(x).pow(2).sum().backward()
        before = {n: (gm.get_parameter(n).detach().double(), gm.get_parameter(n).grad) for n in hooked}
        optimizer.step()
        for name, groups in hooked.items():
            w, grad = before[name]
            direction = polar(grad, groups)
            a, b, c = w.flatten() @ w.flatten(), direction.flatten() @ w.flatten(), direction.flatten().square().sum()
            eta = float(a * b / (a * c + 2 * b * b))
            lr = eta if 0.0 < eta < 0.05 else 0.05
            torch.testing.assert_close(gm.get_parameter(name).double(), w - lr * direction, atol=1e-7, rtol=0)
    assert sorted(group["lr"] for group in optimizer.param_groups) == [0.05, 0.05, 0.1]  # base lrs restored


def test_a_covariance_formed_by_cancellation_is_not_refused():
    """A covariance ``E[x x^T] - mu mu^T`` of float32 data with a large mean is symmetric only to about 1e-3 of its
    largest entry (the cancellation magnifies rounding). The first refusal's tolerance, ``sqrt(eps)`` relative,
    refused it as a data matrix; the power of its symmetric part is the answer, checked against float64 eigh of the
    same (symmetrised) matrix."""
    g = _gen(3)
    x = (torch.randn(20000, 64, generator=g) + 50.0).float()
    weights = torch.rand(20000, 1, generator=g) + 0.5
    mean = (x * weights).sum(0, keepdim=True) / weights.sum()
    cov = x.T @ (x * weights) / weights.sum() - mean.T @ mean
    asymmetry = float((cov - cov.T).abs().max() / cov.abs().max())
    assert math.sqrt(torch.finfo(torch.float32).eps) < asymmetry < 1e-2  # the case: refused before, not now
    out = power_newton_schulz(cov, -0.5, iterations=30, float64=True)
    sym64 = 0.5 * (cov.double() + cov.double().T)
    torch.testing.assert_close(out.double(), _power64(sym64, -0.5), rtol=1e-4, atol=1e-5)


class GuardedEighOwnFill(nn.Module):
    """The plain form's guard written by hand, plus the model's own NaN fill: the eigenvectors of a negative
    eigenvalue are NaN (so ``V diag(lambda) V^T`` of an indefinite matrix is NaN). That fill reads ``V`` like the
    guard's fill does, but under ``L < 0``, not under the guard's flag."""

    def forward(self, a):
        bad = (~torch.isfinite(a)).any(-1).any(-1)
        eye = torch.eye(a.shape[-2], a.shape[-1], dtype=a.dtype, device=a.device)
        L, V = torch.linalg.eigh(torch.where(bad.unsqueeze(-1).unsqueeze(-1), eye, a))
        L = L.masked_fill(bad.unsqueeze(-1), float("nan"))
        V = V.masked_fill((L < 0).unsqueeze(-2), float("nan"))
        return L, (V * L.unsqueeze(-2)) @ V.mT


def test_to_newton_schulz_keeps_a_models_own_nan_fill_after_a_guarded_eigh():
    """The old code read any ``o.masked_fill(mask, nan)`` of each output as the plain form's own fill and deleted
    it (the ``L < 0`` fill here): an indefinite matrix gave a finite ``V diag(lambda) V^T`` instead of NaN. Now a
    fill must be under the guard's flag (``bad`` reshaped), else the site is left as it was before session 36."""
    gm = fx.symbolic_trace(GuardedEighOwnFill())
    status = to_newton_schulz(gm, iterations=30)
    assert list(status.values()) == ["no V diag(lambda^(1/2) or lambda^(-1/2)) V^T computed from the decomposition "
                                     "was found"]
    assert sum(n.target == "masked_fill" for n in gm.graph.nodes) == 2  # both fills kept
    a = _spd(4, (3,), seed=21)
    a[1] -= 3.0 * torch.eye(4, dtype=torch.float64)  # eigenvalues 1 - 3 .. 10 - 3: some negative
    a[2, 0, 3] = float("nan")  # the guard's own case (lower triangle: read by eigh)
    a[2, 3, 0] = float("nan")
    L64, V64 = torch.linalg.eigh(torch.where(a.isnan().any(-1).any(-1)[:, None, None], torch.eye(4).double(), a))
    bad = torch.tensor([False, False, True])
    L64 = L64.masked_fill(bad[:, None], float("nan"))
    V64 = V64.masked_fill((L64 < 0)[..., None, :], float("nan"))
    expected = (L64, (V64 * L64.unsqueeze(-2)) @ V64.mT)
    assert bool((L64[1] < 0).any()) and not bool((L64[0] < 0).any())
    for got, ref in zip(gm(a.float()), expected):
        torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-5, equal_nan=True)
    assert gm(a.float())[1].flatten(1).isnan().all(1).tolist() == [False, True, True]


class GuardedEighColumnFill(nn.Module):
    """The guard's flag, but unsqueezed in front: ``L.masked_fill(bad.unsqueeze(0), nan)`` fills *column* ``j`` of
    every matrix's values where matrix ``j`` is bad (a batch of ``n`` matrices ``n x n``), not the bad matrix's
    own row."""

    def forward(self, a):
        bad = (~torch.isfinite(a)).any(-1).any(-1)
        eye = torch.eye(a.shape[-2], a.shape[-1], dtype=a.dtype, device=a.device)
        L, V = torch.linalg.eigh(torch.where(bad.unsqueeze(-1).unsqueeze(-1), eye, a))
        L = L.masked_fill(bad.unsqueeze(0), float("nan"))
        V = V.masked_fill(bad.unsqueeze(-1).unsqueeze(-1), float("nan"))
        return L, (V * L.rsqrt().unsqueeze(-2)) @ V.mT


def test_to_newton_schulz_keeps_a_fill_under_the_guards_flag_on_another_axis():
    """Derived from the flag is not enough: ``bad.unsqueeze(0)`` moves it to another axis. The old code read it as
    the plain form's fill and deleted it (column 2 of the other matrices' values, and their powers, came out
    finite)."""
    gm = fx.symbolic_trace(GuardedEighColumnFill())
    assert list(to_newton_schulz(gm, iterations=30).values()) == [
        "no V diag(lambda^(1/2) or lambda^(-1/2)) V^T computed from the decomposition was found"]
    assert sum(n.target == "masked_fill" for n in gm.graph.nodes) == 2  # both fills kept
    a = _spd(4, (4,), seed=22)
    a[2, 1, 1] = float("inf")
    bad = torch.tensor([False, False, True, False])
    L64, V64 = torch.linalg.eigh(torch.where(bad[:, None, None], torch.eye(4).double(), a))
    L64 = L64.masked_fill(bad[None, :], float("nan"))
    V64 = V64.masked_fill(bad[:, None, None], float("nan"))
    for got, ref in zip(gm(a.float()), (L64, (V64 * L64.rsqrt().unsqueeze(-2)) @ V64.mT)):
        torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-5, equal_nan=True)
    assert gm(a.float())[1].flatten(1).isnan().all(1).tolist() == [True] * 4  # column 2 of every L is NaN
