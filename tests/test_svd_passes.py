"""The ``svd_conditioning`` and ``pre_svd`` passes (P4) and the ``svd`` preset.

Graph rewrites keep outputs (train and eval) on the built-in DBN / GCP models and on small models calling each
decomposition; gradients stay finite on repeated eigenvalues; Newton-Schulz replaces V diag(lambda^(+-1/2)) V^T
patterns; the monitor's kappa matches an independent computation; NOG is the polar factor of the gradient; OLR
minimises the objective derived below; hooks work through ``orthofx.attach`` (also under DataParallel); the preset
trains; torch.compile(fullgraph=True) sees no graph break.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import orthofx
import orthofx.passes.pre_svd as pre_svd
import orthofx.passes.svd_conditioning as svd_conditioning
from orthofx.errors import PolicyError, TransformError
from orthofx.nn import conditioning as cond
from orthofx.nn.decompositions import ConditionMonitor
from orthofx.passes.orth_regularizer import LorthTerm
from orthofx.report import monitors
from references import eigh_backward64, stable_kernel64, svd_backward64

DECOMPOSITIONS = {torch.linalg.eigh, torch.linalg.eigvalsh, torch.linalg.svd, torch.linalg.svdvals, torch.svd}
STABLE = {cond.stable_eigh, cond.stable_eigvalsh, cond.stable_linalg_svd, cond.stable_svdvals, cond.stable_torch_svd}


def _policy(op="linalg.eigh", **params):
    return {"rules": [{"match": {"op": op}, "apply": "svd_conditioning", "with": params}]}


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def _has_decomposition(gm):
    return any(t in DECOMPOSITIONS or t == "svd" or t in STABLE for t in _targets(gm))


def _changes(gm, pass_name=None):
    return [c for c in gm.meta["orthofx"].changes if pass_name is None or c.pass_name == pass_name]


def _spd(n=6, batch=(3,), kappa=10.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(*batch, n, n, generator=g, dtype=dtype))
    lam = torch.logspace(0, math.log10(kappa), n, dtype=dtype)
    return (Q * lam.unsqueeze(-2)) @ Q.mT


# ----------------------------------------------------------------------------------------- built-in models

@pytest.mark.parametrize("name", ["dbn_cnn", "gcp_cnn"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("method", ["taylor", "clamp"])
def test_stable_rewrite_keeps_outputs_of_builtin_models(name, mode, method):
    torch.manual_seed(0)
    model = orthofx.models.get(name, width=8) if name == "dbn_cnn" else orthofx.models.get(name, width=8, dim=8)
    model.train(mode == "train")
    x = orthofx.models.example_input(name, batch=8)
    reference = copy.deepcopy(model)
    gm = orthofx.transform(model, _policy(method=method), example_inputs=(x,))
    assert not any(t is torch.linalg.eigh for t in _targets(gm))
    assert cond.stable_eigh in _targets(gm)
    changes = _changes(gm, "svd_conditioning")
    # dbn_cnn branches on self.training: its other mode's graph has an eigh of its own (running covariance)
    other_mode = "eval" if mode == "train" else "train"
    expected = (["dbn:linalg.eigh", f"dbn:linalg.eigh@{other_mode}"] if name == "dbn_cnn"
                else ["cov_pool:linalg.eigh"])
    assert [c.site for c in changes] == expected
    for change in changes:
        assert change.status.startswith(f"stable eigh ({method}")
        assert isinstance(gm.get_submodule(change.after["monitor"]), cond.DecompositionMonitor)
    for training in (mode == "train", mode != "train", mode == "train"):
        gm.train(training)
        reference.train(training)
        y_ref, y = reference(x), gm(x)
        assert torch.allclose(y, y_ref, atol=1e-6, rtol=1e-5)
    y.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in gm.parameters() if p.grad is not None)
    # against torch's gradient (these spectra are well separated, where torch's is right): the exact kernel
    # ("clamp") gives it to rounding; P4's Taylor form of order 9 approximates 1/(lambda_i - lambda_j), within a
    # few percent of the gradient's scale here (measured: <= 4%)
    y_ref.square().sum().backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    got = {n: p.grad for n, p in gm.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    scale = max(float(g.abs().max()) for g in expected.values())
    tol = 1e-5 * scale if method == "clamp" else 0.1 * scale
    for n, g in expected.items():
        torch.testing.assert_close(got[n], g, atol=tol, rtol=0, msg=lambda m: f"{n}: {m}")


# ----------------------------------------------------------------------------------------- hand-written models

class EighModel(nn.Module):
    def __init__(self, uplo="L"):
        super().__init__()
        self.uplo = uplo

    def forward(self, a):
        result = torch.linalg.eigh(a, UPLO=self.uplo)
        L, V = result
        power = (V * L.exp().unsqueeze(-2)) @ V.mT
        return power + result.eigenvalues.sum(-1)[..., None, None], result.eigenvectors.abs()


class EigvalshModel(nn.Module):
    def forward(self, a):
        return torch.linalg.eigvalsh(a).square().sum(-1)


class LinalgSvdModel(nn.Module):
    def __init__(self, full):
        super().__init__()
        self.full = full

    def forward(self, x):
        U, S, Vh = torch.linalg.svd(x, full_matrices=self.full)
        k = S.shape[-1]
        rebuilt = (U[..., :k] * S.unsqueeze(-2)) @ Vh[..., :k, :]
        return rebuilt, U @ U.mT, Vh.mT @ Vh, S


class SvdvalsModel(nn.Module):
    def forward(self, x):
        return torch.linalg.svdvals(x).log().sum(-1)


class TorchSvdModel(nn.Module):
    def __init__(self, some=True, compute_uv=True, method=False):
        super().__init__()
        self.some, self.compute_uv, self.method = some, compute_uv, method

    def forward(self, x):
        U, S, V = x.svd(self.some, self.compute_uv) if self.method else torch.svd(x, self.some, self.compute_uv)
        k = S.shape[-1]
        return (U[..., :k] * S.unsqueeze(-2)) @ V[..., :k].mT, U @ U.mT, V @ V.mT, S  # basis-invariant


class WholeTupleModel(nn.Module):
    def forward(self, a):
        return torch.linalg.eigh(a)


def _sym(batch=3, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, n, n, generator=g, dtype=torch.float64)
    return a + a.mT


def _rect(batch=2, m=6, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, m, n, generator=g, dtype=torch.float64)


HAND_MODELS = [
    ("eigh", lambda: EighModel(), "linalg.eigh", _sym),
    ("eigh-upper", lambda: EighModel("U"), "linalg.eigh", lambda: torch.triu(_rect(3, 5, 5))),
    ("eigvalsh", lambda: EigvalshModel(), "linalg.eigvalsh", _sym),
    ("svd-full", lambda: LinalgSvdModel(True), "linalg.svd", _rect),
    ("svd-full-wide", lambda: LinalgSvdModel(True), "linalg.svd", lambda: _rect(2, 3, 5)),
    ("svd-reduced", lambda: LinalgSvdModel(False), "linalg.svd", _rect),
    ("svdvals", lambda: SvdvalsModel(), "linalg.svdvals", _rect),
    ("torch.svd", lambda: TorchSvdModel(), "svd", _rect),
    ("torch.svd-full", lambda: TorchSvdModel(some=False), "svd", _rect),
    ("torch.svd-no-uv", lambda: TorchSvdModel(compute_uv=False), "svd", _rect),
    ("tensor.svd", lambda: TorchSvdModel(method=True), "svd", _rect),
]


def _flat(out):
    return [t for t in torch.utils._pytree.tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("label,make,op,data", HAND_MODELS, ids=[m[0] for m in HAND_MODELS])
def test_stable_rewrite_of_every_op_keeps_outputs_and_gradients(label, make, op, data):
    x = data()
    model = make()
    gm = orthofx.transform(model, _policy(op, method="clamp"), example_inputs=(x,))
    assert not any(t in DECOMPOSITIONS or t == "svd" for t in _targets(gm))
    (change,) = _changes(gm)
    assert change.status.startswith("stable ") and "clamp" in change.status
    for training in (True, False):
        gm.train(training)
        model.train(training)
        x1 = x.clone().requires_grad_(True)
        x2 = x.clone().requires_grad_(True)
        out_ref, out = _flat(model(x1)), _flat(gm(x2))
        assert len(out_ref) == len(out)
        for a, b in zip(out_ref, out):
            assert a.shape == b.shape
            assert torch.allclose(a, b, atol=1e-9), label
        # the exact (clamp) backward equals torch's on these well-separated spectra
        weights = [torch.randn_like(t) for t in out_ref]
        g_ref = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, out_ref) if t.requires_grad), x1)[0]
        g = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, out) if t.requires_grad), x2)[0]
        assert torch.allclose(g, g_ref, atol=1e-6, rtol=1e-6), label


def test_named_tuple_used_whole_is_kept():
    a = _sym()
    gm = orthofx.transform(WholeTupleModel(), _policy(), example_inputs=(a,))
    out = gm(a)
    assert isinstance(out, torch.return_types.linalg_eigh)
    assert torch.allclose(out.eigenvalues, torch.linalg.eigh(a).eigenvalues)


def _repeated_eigh_loss(L, V):
    weights = torch.arange(V.shape[-1], dtype=V.dtype)
    return (V[..., 0] * weights).sum() + (V @ torch.diag_embed(L.square()) @ V.mT).sum()


def _repeated_svd_loss(U, S, Vh):
    return (U[..., 0] * torch.arange(U.shape[-2], dtype=U.dtype)).sum() + S.sum()


class RepeatedEigh(nn.Module):
    def forward(self, a):
        L, V = torch.linalg.eigh(a)  # unpacked here: torch.fx cannot iterate a traced value
        return _repeated_eigh_loss(L, V)


class RepeatedSvd(nn.Module):
    def forward(self, x):
        U, S, Vh = torch.linalg.svd(x, full_matrices=False)
        return _repeated_svd_loss(U, S, Vh)


def _documented_gradient(op, matrix, taylor_order):
    """The gradient the stable op's docstring defines for the loss above at one matrix (tests/references.py):
    torch's factors (the ops' forward), the loss's gradients with respect to them by autograd, and the
    documented backward with the kernel of the method (taylor: order 9; clamp: exact, gap at eps max|lambda|)."""
    if op == "linalg.eigh":
        factors = [t.requires_grad_(True) for t in torch.linalg.eigh(matrix)]
        gL, gV = torch.autograd.grad(_repeated_eigh_loss(*factors), factors)
        L, V = factors
        return eigh_backward64(L, V, gL, gV, stable_kernel64(L, taylor_order))
    factors = [t.requires_grad_(True) for t in torch.linalg.svd(matrix, full_matrices=False)]
    gU, gS, gVh = torch.autograd.grad(_repeated_svd_loss(*factors), factors, allow_unused=True,
                                      materialize_grads=True)
    U, S, Vh = factors
    return svd_backward64(U, S, Vh, gU, gS, gVh, stable_kernel64(S.square(), taylor_order, descending=True))


@pytest.mark.parametrize("method", ["taylor", "clamp"])
def test_gradients_finite_on_repeated_eigenvalues(method):
    a = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    x = torch.eye(5, 3, dtype=torch.float64).repeat(2, 1, 1)
    for model, data, op in ((RepeatedEigh(), a, "linalg.eigh"), (RepeatedSvd(), x, "linalg.svd")):
        plain = data.clone().requires_grad_(True)
        model(plain).backward()
        assert not torch.isfinite(plain.grad).all()  # torch's own backward breaks here
        gm = orthofx.transform(model, _policy(op, method=method))
        fixed = data.clone().requires_grad_(True)
        gm(fixed).backward()
        assert torch.isfinite(fixed.grad).all()
        # the value the op documents (at exact ties the V-dependent part is no derivative): the pass calls the op
        # with the method's kernel; "clamp" gives entries ~ 1 / eps here, hence the relative tolerance
        expected = _documented_gradient(op, data[0], 9 if method == "taylor" else None)
        for got in fixed.grad:
            torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)


# ----------------------------------------------------------------------------------------- Newton-Schulz

class ZCA(nn.Module):
    """Whitening by the inverse square root of the covariance, written in one of several forms."""

    def __init__(self, form):
        super().__init__()
        self.form = form

    def forward(self, x):  # x: (B, C, N)
        centred = x - x.mean(-1, keepdim=True)
        cov = centred @ centred.mT / x.shape[-1]
        return self.form(cov) @ centred


def _diag_form(cov):
    L, V = torch.linalg.eigh(cov)
    return V @ torch.diag_embed(L.rsqrt()) @ V.transpose(-2, -1)


def _mul_form(cov):
    L, V = torch.linalg.eigh(cov)
    return (V * L.pow(-0.5).unsqueeze(-2)) @ V.mT


def _right_form(cov):
    eig = torch.linalg.eigh(cov)
    return eig.eigenvectors @ (eig.eigenvalues.clamp(min=0).sqrt().reciprocal().unsqueeze(-1) * eig.eigenvectors.mT)


def _shift_form(cov):
    L, V = torch.linalg.eigh(cov)
    return V @ torch.diag_embed(1 / torch.sqrt(L + 1e-3)) @ V.permute(0, 2, 1)


def _index_form(cov):
    L, V = torch.linalg.eigh(cov)
    return torch.matmul(V * (L ** -0.5)[..., None, :], V.transpose(1, 2))


def _svd_form(cov):
    U, S, Vh = torch.linalg.svd(cov)
    return U @ torch.diag_embed(S.rsqrt()) @ Vh


def _torch_svd_form(cov):
    U, S, V = torch.svd(cov)
    return (U * S.rsqrt().unsqueeze(1)) @ V.transpose(1, 2)


ZCA_FORMS = {"diag_embed": (_diag_form, "linalg.eigh"), "mul": (_mul_form, "linalg.eigh"),
             "right": (_right_form, "linalg.eigh"), "shift": (_shift_form, "linalg.eigh"),
             "index": (_index_form, "linalg.eigh"), "svd": (_svd_form, "linalg.svd"),
             "torch.svd": (_torch_svd_form, "svd")}


def _white_input(batch=4, c=6, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(c) + 0.3 * torch.randn(c, c, generator=g)
    return mix @ torch.randn(batch, c, n, generator=g)


@pytest.mark.parametrize("form", list(ZCA_FORMS))
def test_newton_schulz_replaces_inverse_square_root(form):
    fn, op = ZCA_FORMS[form]
    x = _white_input()
    model = ZCA(fn)
    gm = orthofx.transform(model, _policy(op, method="newton_schulz", iterations=12), example_inputs=(x,))
    assert not _has_decomposition(gm), gm.code
    assert cond.power_newton_schulz in _targets(gm)
    (change,) = _changes(gm)
    assert change.status == "newton_schulz (inverse sqrt, 12 iterations)"
    y_ref, y = model(x), gm(x)
    assert torch.allclose(y, y_ref, atol=2e-4, rtol=1e-3)
    # the gradient too, against the eigh / svd form's (torch's, exact on this well-separated spectrum); a fixed
    # random weighting: |y|^2 of a whitened y is constant, its gradient only rounding noise
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    xg, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (gm(xg) * weights).sum().backward()
    (model(xr) * weights).sum().backward()
    assert torch.isfinite(xg.grad).all()
    torch.testing.assert_close(xg.grad, xr.grad, atol=1e-4 * float(xr.grad.abs().max()), rtol=0)


def test_newton_schulz_on_gcp_matrix_square_root():
    torch.manual_seed(0)
    model = orthofx.models.get("gcp_cnn", width=8, dim=8).eval()
    x = orthofx.models.example_input("gcp_cnn", batch=4)
    gm = orthofx.transform(model, _policy(method="newton_schulz", iterations=15), example_inputs=(x,))
    assert not _has_decomposition(gm)
    (change,) = _changes(gm)
    assert change.status == "newton_schulz (sqrt, 15 iterations)"
    assert change.after["notes"] == ["clamp(min=0.0) dropped"]
    monitor = gm.get_submodule(change.after["monitor"])
    kappa = float(monitor.last)
    assert 1 < kappa < 1e4  # well conditioned enough for 15 iterations
    y_ref, y = model(x), gm(x)
    assert torch.allclose(y, y_ref, atol=1e-4, rtol=1e-3)


def test_newton_schulz_on_dbn_whitening_in_training():
    torch.manual_seed(0)
    model = orthofx.models.get("dbn_cnn", width=8)
    x = orthofx.models.example_input("dbn_cnn", batch=8)
    reference = copy.deepcopy(model)
    gm = orthofx.transform(model, _policy(method="newton_schulz", iterations=15), example_inputs=(x,))
    assert not _has_decomposition(gm)
    gm.train()
    reference.train()
    assert torch.allclose(gm(x), reference(x), atol=1e-4, rtol=1e-3)


class Mixed(nn.Module):
    """The eigenvectors are used outside the power pattern: the decomposition must stay."""

    def forward(self, a):
        L, V = torch.linalg.eigh(a)
        return V @ torch.diag_embed(L.sqrt()) @ V.mT + V.abs()


class PowerOne(nn.Module):
    def forward(self, a):
        L, V = torch.linalg.eigh(a)
        return V @ torch.diag_embed(L.exp()) @ V.mT


@pytest.mark.parametrize("model,reason", [(Mixed(), "outside"), (PowerOne(), "no V diag"),
                                          (EigvalshModel(), "only the values")])
def test_newton_schulz_without_pattern_falls_back_with_a_reason(model, reason):
    a = _spd()
    op = "linalg.eigvalsh" if isinstance(model, EigvalshModel) else "linalg.eigh"
    gm = orthofx.transform(model, _policy(op, method="newton_schulz"), example_inputs=(a,))
    (change,) = _changes(gm)
    assert change.status.startswith("stable ") and "newton_schulz skipped" in change.status
    assert reason in change.status
    assert torch.allclose(gm(a), model(a), atol=1e-10)

    kept = orthofx.transform(model, _policy(op, method="newton_schulz", fallback="keep"), example_inputs=(a,))
    (change,) = _changes(kept)
    assert change.status.startswith("skipped: newton_schulz")
    assert _has_decomposition(kept) and not any(t in STABLE for t in _targets(kept))
    with pytest.raises(TransformError, match="newton_schulz cannot be applied"):
        orthofx.transform(model, _policy(op, method="newton_schulz", fallback="error"))


def test_layout_checks():
    assert cond.check_layout(3, (("col", -2), ("transpose", 1, 2), ("row", 2))) is None
    assert cond.check_layout(2, (("col", 0), ("transpose", 0, 1), ("ndim", 2))) is None
    assert "does not swap" in cond.check_layout(3, (("transpose", 0, 1),))
    assert "2-D" in cond.check_layout(3, (("ndim", 2),))
    assert "columns" in cond.check_layout(3, (("col", 0),))
    with pytest.raises(ValueError, match="does not fit this input"):
        cond.power_newton_schulz(_spd(), 0.5, layout=(("ndim", 2),))


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # raised inside torch.onnx
def test_newton_schulz_form_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = orthofx.models.get("gcp_cnn", width=8, dim=8).eval()
    x = orthofx.models.example_input("gcp_cnn", batch=4)
    gm = orthofx.transform(model, _policy(method="newton_schulz", iterations=10), example_inputs=(x,))
    result = orthofx.export(gm, tmp_path / "gcp.onnx", example_inputs=(x,))  # freeze drops the monitor's eigvalsh
    assert result.max_abs_diff < 1e-4


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
def test_svd_preset_gcp_cnn_exports_to_onnx_through_newton_schulz(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = orthofx.models.get("gcp_cnn")  # full size: 16 x 16 covariances over 64 positions
    x = orthofx.models.example_input("gcp_cnn", batch=8)
    gm = orthofx.transform(model, "svd", example_inputs=(x,))
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    orthofx.attach(optimizer, gm)  # NOG + OLR steps, then export the trained model
    for _ in range(3):
        loss = nn.functional.cross_entropy(gm(x), torch.arange(8)) + orthofx.penalty(gm)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    gm.eval()
    result = orthofx.export(gm, tmp_path / "gcp.onnx", example_inputs=(x,))
    assert result.newton_schulz.sites == ["cov_pool:linalg.eigh"] and result.max_abs_diff <= 1e-4
    # another batch: onnxruntime against the transformed model's exact eigh (stable op) in float64
    other = orthofx.models.example_input("gcp_cnn", batch=3, seed=5)
    session = onnxruntime.InferenceSession(str(tmp_path / "gcp.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: other.numpy()})
    reference = copy.deepcopy(gm).double()
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got).double(), reference(other.double()), atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
def test_svd_preset_dbn_cnn_in_eval_mode_exports_to_onnx_without_newton_schulz(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = orthofx.models.get("dbn_cnn")
    model.train()(orthofx.models.example_input("dbn_cnn", batch=64, seed=2))  # running statistics move
    model.eval()
    x = orthofx.models.example_input("dbn_cnn", batch=8)
    gm = orthofx.transform(model, "svd", example_inputs=(x,))
    result = orthofx.export(gm, tmp_path / "dbn.onnx", example_inputs=(x,))
    assert result.newton_schulz is None  # the running whitening matrix was folded by freeze: exact
    assert result.max_abs_diff <= 1e-5


def test_to_newton_schulz_gives_the_inference_form():
    torch.manual_seed(0)
    model = orthofx.models.get("gcp_cnn", width=8, dim=8).eval()
    x = orthofx.models.example_input("gcp_cnn", batch=4)
    gm = orthofx.transform(model, _policy(), example_inputs=(x,))
    results = svd_conditioning.to_newton_schulz(gm, iterations=15)
    assert list(results.values()) == ["replaced"]
    assert not _has_decomposition(gm)
    assert torch.allclose(gm(x), model(x), atol=1e-4, rtol=1e-3)


def test_to_newton_schulz_on_a_frozen_model_removes_the_pass_through():
    torch.manual_seed(0)
    model = orthofx.models.get("gcp_cnn", width=8, dim=8).eval()
    x = orthofx.models.example_input("gcp_cnn", batch=4)
    frozen = orthofx.freeze(orthofx.transform(model, "svd", example_inputs=(x,)))
    assert any(isinstance(m, cond.PassThrough) for m in frozen.modules())
    results = svd_conditioning.to_newton_schulz(frozen, iterations=15)
    assert list(results.values()) == ["replaced"]
    assert not _has_decomposition(frozen)
    assert not any(n.op == "call_module" and isinstance(frozen.get_submodule(n.target), cond.PassThrough)
                   for n in frozen.graph.nodes)
    assert torch.allclose(frozen(x), model(x), atol=1e-5, rtol=1e-4)
    # a values-only decomposition has no such form: left, with the reason
    gm = orthofx.transform(SvdvalsModel(), _policy("linalg.svdvals"))
    (reason,) = svd_conditioning.to_newton_schulz(gm).values()
    assert "returns only the values" in reason and _has_decomposition(gm)


class AtenRoot(nn.Module):
    """The matrix square root written with the ATen op a torch.export graph holds."""

    def forward(self, a):
        L, V = torch.ops.aten.linalg_eigh.default(a)
        return V @ torch.diag_embed(L.sqrt()) @ V.mT


def test_to_newton_schulz_on_aten_eigh():
    a = _spd(kappa=20.0)
    gm = torch.fx.symbolic_trace(AtenRoot())
    assert svd_conditioning.decomposition_op(next(n for n in gm.graph.nodes if n.op == "call_function")) == \
        "linalg.eigh"
    assert list(svd_conditioning.to_newton_schulz(gm, iterations=20).values()) == ["replaced"]
    lam, vec = torch.linalg.eigh(a)
    torch.testing.assert_close(gm(a), vec @ torch.diag_embed(lam.sqrt()) @ vec.mT, atol=1e-10, rtol=1e-10)


class RunningWhiten(nn.Module):
    """A buffer-only whitening matrix (decorrelated BN in eval mode), and a training-style buffer update."""

    def __init__(self, update=False):
        super().__init__()
        self.update = update
        g = torch.Generator().manual_seed(3)
        a = torch.randn(5, 5, generator=g)
        self.register_buffer("running_cov", a @ a.T / 5)

    def forward(self, x):
        if self.update:
            self.running_cov.lerp_(x.T @ x / x.shape[0], 0.1)
        cov = self.running_cov.type_as(x)
        L, V = torch.linalg.eigh(cov + 0.1 * torch.eye(5, dtype=cov.dtype))
        return x @ ((V * L.rsqrt().unsqueeze(0)) @ V.T)


def test_fold_constant_decompositions_stores_the_whitening_matrix():
    x = _white_input(batch=1, c=5, n=16)[0].T.contiguous()  # (16, 5)
    model = RunningWhiten()
    gm = orthofx.transform(model, "svd", example_inputs=(x,))
    reference = gm(x)
    folded = svd_conditioning.fold_constant_decompositions(gm)
    (buffers,) = folded.values()
    assert not _has_decomposition(gm)
    # the buffer is (running_cov + 0.1 I)^(-1/2), computed here independently in float64
    sigma = model.running_cov.double() + 0.1 * torch.eye(5, dtype=torch.float64)
    lam, vec = torch.linalg.eigh(sigma)
    expected = vec @ torch.diag(lam.rsqrt()) @ vec.T
    torch.testing.assert_close(getattr(gm, buffers[0]).double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(gm(x), reference)
    # the cast to the input's dtype stays: a float64 input gets a float64 result
    assert gm(x.double()).dtype == torch.float64

    # a buffer the graph writes (a running statistic in training mode) is not a constant
    updating = orthofx.transform(RunningWhiten(update=True), "svd", example_inputs=(x,))
    assert svd_conditioning.fold_constant_decompositions(updating) == {}
    assert _has_decomposition(updating)
    # an input-dependent matrix is not either
    gcp = orthofx.transform(orthofx.models.get("gcp_cnn", width=4, dim=4).eval(), "svd")
    assert svd_conditioning.fold_constant_decompositions(gcp) == {}


def test_nan_input_is_counted_not_raised():
    torch.manual_seed(0)
    x = orthofx.models.example_input("gcp_cnn", batch=4)
    poisoned = x.clone()
    poisoned[1, 0, 3, 3] = float("nan")
    for method in ("taylor", "newton_schulz"):
        model = orthofx.models.get("gcp_cnn", width=8, dim=8).eval()
        gm = orthofx.transform(model, _policy(method=method, iterations=15), example_inputs=(x,))
        y = gm(poisoned)  # LAPACK used to raise "ill-conditioned or has too many repeated eigenvalues" here
        assert torch.isnan(y[1]).all()
        others = [0, 2, 3]  # per-sample covariances: the other samples are untouched
        torch.testing.assert_close(y[others], model(x)[others], atol=1e-4, rtol=1e-3)
        (summary,) = monitors(gm).values()
        assert summary["nan_events"] == 1 and summary["updates"] == 2
        y.nan_to_num().sum().backward()  # backward runs too


# ----------------------------------------------------------------------------------------- monitor

class CovEigh(nn.Module):
    def forward(self, x):
        cov = x @ x.mT / x.shape[-1] + 1e-3 * torch.eye(x.shape[-2])
        L, V = torch.linalg.eigh(cov)
        return (V * L.sqrt().unsqueeze(-2)) @ V.mT


class DataSvd(nn.Module):
    def forward(self, x):
        U, S, Vh = torch.linalg.svd(x, full_matrices=False)
        return U * S.unsqueeze(-2)


class CovSvd(nn.Module):
    def forward(self, x):
        U, S, Vh = torch.linalg.svd(x @ x.mT, full_matrices=False)
        return U * S.unsqueeze(-2)


def test_monitor_kappa_matches_independent_computation():
    x = _white_input(batch=3, c=5, n=40)
    expected_cov = []
    for b in range(3):
        lam = torch.linalg.eigvalsh((x[b] @ x[b].T / 40 + 1e-3 * torch.eye(5)).double())
        expected_cov.append(float(lam.max() / lam.min()))
    for method in ("taylor", "newton_schulz"):
        gm = orthofx.transform(CovEigh(), _policy(method=method))
        gm(x)
        (summary,) = monitors(gm).values()
        assert summary["updates"] == 1 and summary["nan_events"] == 0
        assert summary["kappa"] == pytest.approx(max(expected_cov), rel=1e-4)

    # an SVD of a data matrix: kappa of its covariance is (s_max / s_min)^2; of a symmetric matrix s_max / s_min
    gram = [torch.linalg.eigvalsh((x[b] @ x[b].T).double()) for b in range(3)]
    for model, want in ((DataSvd(), max(float(g.max() / g.min()) for g in gram)),
                        (CovSvd(), max(float(g.max() / g.min()) for g in gram))):
        gm = orthofx.transform(model, _policy("linalg.svd"))
        gm(x if isinstance(model, DataSvd) else x)
        (summary,) = monitors(gm).values()
        assert summary["kappa"] == pytest.approx(want, rel=1e-3)


def test_monitor_on_gcp_matches_covariance_of_the_pre_svd_output():
    torch.manual_seed(0)
    model = orthofx.models.get("gcp_cnn", width=8, dim=8).eval()
    x = orthofx.models.example_input("gcp_cnn", batch=4)
    gm = orthofx.transform(model, _policy())
    seen = {}
    gm.get_submodule("bn_last").register_forward_hook(lambda m, a, out: seen.update(out=out.detach()))
    gm(x)
    flat = seen["out"].flatten(2).double()
    centred = flat - flat.mean(2, keepdim=True)
    sigma = centred @ centred.mT / flat.shape[2] + 1e-5 * torch.eye(8, dtype=torch.float64)
    lam = torch.linalg.eigvalsh(sigma)
    expected = float((lam.amax(-1) / lam.amin(-1)).max())
    (summary,) = monitors(gm).values()
    assert summary["kappa"] == pytest.approx(expected, rel=1e-3)


def test_empty_batch_runs_like_the_original():
    model = orthofx.models.get("gcp_cnn")
    x = orthofx.models.example_input("gcp_cnn", batch=2)
    gm = orthofx.transform(model, "svd", example_inputs=(x,))
    monitors = [m for m in gm.modules() if isinstance(m, ConditionMonitor)]
    assert monitors
    updates = [int(m.updates) for m in monitors]
    assert gm(x[:0]).shape == model(x[:0]).shape == (0, 10)
    assert [int(m.updates) for m in monitors] == updates  # no matrix, nothing recorded


def test_monitor_records_nan_events_and_freezes_to_a_pass_through():
    monitor = cond.DecompositionMonitor("eigenvalues", 0, "linalg.eigh")
    lam = torch.tensor([[1.0, 2.0], [float("nan"), 1.0]])
    result = (lam, torch.eye(2))
    assert monitor(result) is result
    assert int(monitor.nan_events) == 1 and int(monitor.updates) == 1
    assert isinstance(monitor.to_plain(), cond.PassThrough)

    torch.manual_seed(0)
    model = orthofx.models.get("gcp_cnn", width=8, dim=8).eval()
    x = orthofx.models.example_input("gcp_cnn", batch=4)
    gm = orthofx.transform(model, "svd", example_inputs=(x,))
    frozen = orthofx.freeze(gm)
    assert not any(isinstance(m, cond.DecompositionMonitor) for m in frozen.modules())
    assert torch.allclose(frozen(x), gm(x))
    # a transformed model survives deepcopy and torch.save / torch.load
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.allclose(loaded(x), gm(x))
    assert torch.allclose(copy.deepcopy(gm)(x), gm(x))


# ----------------------------------------------------------------------------------------- pre_svd: NOG, OLR

class LinearEigh(nn.Module):
    """Two linears feed one covariance (several producers), one also feeds a second eigh (two sites)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 4, bias=False)
        self.b = nn.Linear(6, 3)
        self.head = nn.Linear(7, 2)

    def forward(self, x):  # x: (N, 6)
        f = torch.cat([self.a(x), self.b(x)], dim=1)
        cov = f.T @ f / x.shape[0] + 1e-2 * torch.eye(7)
        L, V = torch.linalg.eigh(cov)
        ga = self.a(x)
        la = torch.linalg.eigvalsh(ga.T @ ga + torch.eye(4))
        return self.head(f @ ((V * L.rsqrt().unsqueeze(-2)) @ V.T)).sum() + la.sum()


def _pre_svd_policy(**params):
    return {"rules": [{"match": {"feeds": ["linalg.eigh", "linalg.eigvalsh"]}, "apply": "pre_svd", "with": params}]}


def _grads(gm, x):
    gm.zero_grad()
    gm(x).backward()
    return {name: p.grad.clone() for name, p in gm.named_parameters()}


def test_several_producers_and_sites():
    torch.manual_seed(0)
    x = torch.randn(32, 6)
    gm = orthofx.transform(LinearEigh(), _pre_svd_policy(nog=True, olr=True), example_inputs=(x,))
    changes = {c.site: c for c in _changes(gm, "pre_svd")}
    assert set(changes) == {"a", "b"}
    assert changes["a"].before["feeds"] == ["linalg.eigh", "linalg.eigvalsh"]
    assert changes["b"].before["feeds"] == ["linalg.eigh"]
    assert all(c.status == "NOG + OLR" for c in changes.values())
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.5)
    orthofx.attach(optimizer, gm)
    olr_groups = [g for g in optimizer.param_groups if g.get(pre_svd.OLR_GROUP_KEY)]
    assert sorted(g[pre_svd.OLR_GROUP_KEY] for g in olr_groups) == ["a", "b"]
    assert all(len(g["params"]) == 1 for g in olr_groups)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(gm.parameters()))
    optimizer.zero_grad()
    gm(x).backward()
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in gm.parameters())


@pytest.mark.parametrize("wrap", [False, True])
def test_nog_is_the_polar_factor_of_the_gradient(wrap):
    if wrap and torch.cuda.is_available():
        pytest.skip("the DataParallel check runs the CPU path (no device ids)")
    torch.manual_seed(0)
    x = torch.randn(32, 6)
    gm = orthofx.transform(LinearEigh(), _pre_svd_policy(nog=True, olr=False), example_inputs=(x,))
    grads = _grads(gm, x)
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    model = nn.DataParallel(gm) if wrap else gm
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    orthofx.attach(optimizer, model)
    optimizer.zero_grad()
    model(x).backward()
    optimizer.step()
    for name in ("a.weight", "b.weight"):
        U, _, Vh = torch.linalg.svd(grads[name].double(), full_matrices=False)
        polar = (U @ Vh).float()
        step = before[name] - gm.get_parameter(name).detach()
        assert torch.allclose(step, polar, atol=1e-6)
    # biases and the head are untouched by NOG: a plain SGD step
    assert torch.allclose(before["b.bias"] - gm.get_parameter("b.bias").detach(), grads["b.bias"], atol=1e-6)


def test_polar_factor_conv_shapes_zero_and_rank_deficient():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(8, 3 * 3 * 3, generator=g)
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    assert torch.allclose(pre_svd.polar_factor(G), (U @ Vh).float(), atol=1e-6)
    assert torch.equal(pre_svd.polar_factor(torch.zeros(4, 5)), torch.zeros(4, 5))
    low = torch.randn(6, 2, generator=g) @ torch.randn(2, 5, generator=g)  # rank 2
    P = pre_svd.polar_factor(low).double()
    assert torch.allclose(torch.linalg.svdvals(P), torch.tensor([1.0, 1, 0, 0, 0], dtype=torch.float64), atol=1e-5)

    # through the hook on a conv weight (out x in*k*k) and with a zero gradient
    conv = nn.Conv2d(3, 8, 3)
    root = nn.Sequential()
    root.add_module("conv", conv)
    conv.weight.grad = G.reshape(8, 3, 3, 3).clone()
    pre_svd.NearestOrthogonalGradient("conv", "r").before_step(root, None)
    assert torch.allclose(conv.weight.grad.reshape(8, -1), (U @ Vh).float(), atol=1e-6)
    conv.weight.grad = torch.zeros_like(conv.weight)
    pre_svd.NearestOrthogonalGradient("conv", "r").before_step(root, None)
    assert torch.equal(conv.weight.grad, torch.zeros_like(conv.weight))


def test_olr_is_the_minimiser_of_its_objective():
    r"""OLR's ``eta* = a b / (a c + 2 b^2)`` (``a = w.w, b = g.w, c = g.g``) is the minimiser of

        J(eta) = ||w - eta g||^2 + 2 eta^2 (g.w)^2 / (w.w)
               = a - 2 eta b + eta^2 (c + 2 b^2 / a),

    the squared norm of the weight after the first-order step ``w - eta g`` plus twice the squared length of the
    step's component along ``w`` (derived by us from the reference formula): dJ/deta = -2b + 2 eta (c + 2b^2/a) = 0
    gives eta*. J is a convex parabola, so a brute-force line search must land on eta*.
    """
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        w = torch.randn(40, generator=g, dtype=torch.float64)
        grad = torch.randn(40, generator=g, dtype=torch.float64) + 0.5 * w  # positively correlated: eta* > 0
        eta = pre_svd.optimal_learning_rate(w, grad)
        a, b = w.dot(w), grad.dot(w)
        etas = torch.linspace(0.0, 4 * abs(eta), 400001, dtype=torch.float64)
        objective = ((w[None] - etas[:, None] * grad[None]) ** 2).sum(1) + 2 * etas ** 2 * b ** 2 / a
        best = float(etas[objective.argmin()])
        assert eta == pytest.approx(best, abs=2 * 4 * abs(eta) / 400000)
    assert pre_svd.optimal_learning_rate(torch.ones(3), torch.zeros(3)) is None
    assert isinstance(pre_svd.optimal_learning_rate(torch.ones(3, requires_grad=True) * 2, torch.ones(3)), float)


def _expected_lr(weight, grad, base):
    """P4's OLR written out in float64 (not orthofx's optimal_learning_rate): ``eta* = a b / (a c + 2 b^2)`` with
    ``a = w.w, b = g.w, c = g.g`` of the flattened weight and gradient, used when ``0 < eta* < base``."""
    w, g = weight.detach().reshape(-1).double(), grad.detach().reshape(-1).double()
    a, b, c = float(w @ w), float(g @ w), float(g @ g)
    denominator = a * c + 2 * b * b
    eta = a * b / denominator if denominator > 0 else None
    return eta if eta is not None and 0 < eta < base else base


@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("base_lr", [10.0, 1e-6])
def test_olr_through_attach_and_data_parallel(wrap, base_lr):
    if wrap and torch.cuda.is_available():
        pytest.skip("the DataParallel check runs the CPU path (no device ids)")
    torch.manual_seed(0)
    x = torch.randn(32, 6)
    gm = orthofx.transform(LinearEigh(), _pre_svd_policy(nog=False, olr=True), example_inputs=(x,))
    model = nn.DataParallel(gm) if wrap else gm
    optimizer = torch.optim.SGD(model.parameters(), lr=base_lr)
    orthofx.attach(optimizer, model)
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    optimizer.zero_grad()
    model(x).backward()
    grads = {n: p.grad.clone() for n, p in gm.named_parameters()}
    optimizer.step()
    for name in ("a.weight", "b.weight"):
        lr = _expected_lr(before[name], grads[name], base_lr)
        step = before[name] - gm.get_parameter(name).detach()
        assert torch.allclose(step, lr * grads[name], rtol=1e-4, atol=1e-7)  # float32 weight rounding
        group = next(g for g in optimizer.param_groups if any(p is gm.get_parameter(name) for p in g["params"]))
        assert group["lr"] == base_lr  # restored after the step
        assert group["orthofx_olr_lr"] == pytest.approx(lr)
    if base_lr == 10.0:  # eta* is used (it is below the base lr)
        assert any(g.get("orthofx_olr_lr", base_lr) < base_lr for g in optimizer.param_groups)
    step = before["head.weight"] - gm.get_parameter("head.weight").detach()
    assert torch.allclose(step, base_lr * grads["head.weight"], rtol=1e-4, atol=1e-7)


def test_olr_uses_the_nog_gradient():
    torch.manual_seed(0)
    x = torch.randn(32, 6)
    gm = orthofx.transform(LinearEigh(), _pre_svd_policy(nog=True, olr=True), example_inputs=(x,))
    optimizer = torch.optim.SGD(gm.parameters(), lr=10.0)
    orthofx.attach(optimizer, gm)
    w0 = gm.a.weight.detach().clone()
    optimizer.zero_grad()
    gm(x).backward()
    u, _, vh = torch.linalg.svd(gm.a.weight.grad.double(), full_matrices=False)
    polar = (u @ vh).float()  # NOG's gradient, the polar factor U V^T, by a float64 SVD
    optimizer.step()
    lr = _expected_lr(w0, polar, 10.0)
    assert torch.allclose(w0 - gm.a.weight.detach(), lr * polar, rtol=1e-5, atol=1e-8)


def _olr_step(optimizer, gm, x, **step):
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    optimizer.zero_grad()
    gm(x).backward()
    grads = {n: p.grad.clone() for n, p in gm.named_parameters()}
    optimizer.step(**step)
    return before, grads


def test_olr_with_a_tensor_lr_leaves_the_other_groups_alone():
    # torch hands every group the default's lr tensor: setting OLR's lr in place changed every group's
    torch.manual_seed(0)
    x = torch.randn(32, 6)
    gm = orthofx.transform(LinearEigh(), _pre_svd_policy(nog=False, olr=True), example_inputs=(x,))
    optimizer = torch.optim.SGD(gm.parameters(), lr=torch.tensor(10.0))
    orthofx.attach(optimizer, gm)
    seen = []
    optimizer.register_step_pre_hook(lambda opt, *_: seen.append([float(g["lr"]) for g in opt.param_groups]))
    before, grads = _olr_step(optimizer, gm, x)
    step = before["head.weight"] - gm.head.weight.detach()
    torch.testing.assert_close(step, 10.0 * grads["head.weight"], rtol=1e-4, atol=1e-6)
    lr_a = _expected_lr(before["a.weight"], grads["a.weight"], 10.0)
    assert lr_a < 10.0
    torch.testing.assert_close(before["a.weight"] - gm.a.weight.detach(), lr_a * grads["a.weight"], rtol=1e-4,
                               atol=1e-7)
    want = sorted([10.0, lr_a, _expected_lr(before["b.weight"], grads["b.weight"], 10.0)])
    assert sorted(seen[-1]) == pytest.approx(want, rel=1e-6)


def test_olr_with_maximize_uses_the_step_direction():
    torch.manual_seed(0)
    x = torch.randn(32, 6)
    gm = orthofx.transform(LinearEigh(), _pre_svd_policy(nog=False, olr=True), example_inputs=(x,))
    optimizer = torch.optim.SGD(gm.parameters(), lr=10.0, maximize=True)
    orthofx.attach(optimizer, gm)
    before, grads = _olr_step(optimizer, gm, x)
    for name in ("a.weight", "b.weight"):  # the step is w + lr g = w - lr (-g)
        lr = _expected_lr(before[name], -grads[name], 10.0)
        torch.testing.assert_close(gm.get_parameter(name).detach() - before[name], lr * grads[name], rtol=1e-4,
                                   atol=1e-7)


@pytest.mark.parametrize("olr", [False, True])
def test_nog_and_olr_under_grad_scaler_with_a_fused_optimizer(olr):
    # GradScaler leaves a fused optimizer's gradients scaled (its kernel unscales): the hooks saw g * 2^16
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
    steps = []
    for fused in (False, True):
        torch.manual_seed(0)
        gm = orthofx.transform(LinearEigh(), _pre_svd_policy(nog=True, olr=olr), example_inputs=(x,))
        optimizer = torch.optim.SGD(gm.parameters(), lr=10.0, fused=fused)
        orthofx.attach(optimizer, gm)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
        before = {n: p.detach().clone() for n, p in gm.named_parameters()}
        scaler.scale(gm(x)).backward()
        scaler.step(optimizer)
        scaler.update()
        steps.append({n: before[n] - p.detach() for n, p in gm.named_parameters()})
    for name in steps[0]:
        torch.testing.assert_close(steps[1][name], steps[0][name], rtol=1e-5, atol=1e-6)
    assert steps[1]["a.weight"].norm() > 1e-3


def test_olr_refuses_lbfgs_before_changing_the_optimizer():
    torch.manual_seed(0)
    x = torch.randn(32, 6)
    gm = orthofx.transform(LinearEigh(), _pre_svd_policy(nog=True, olr=True), example_inputs=(x,))
    optimizer = torch.optim.LBFGS(gm.parameters(), lr=0.5, max_iter=2)
    with pytest.raises(orthofx.OrthofxError, match="LBFGS takes exactly one param group.*olr: false"):
        orthofx.attach(optimizer, gm)
    assert len(optimizer.param_groups) == 1
    gm = orthofx.transform(LinearEigh(), _pre_svd_policy(nog=True, olr=False), example_inputs=(x,))
    optimizer = torch.optim.LBFGS(gm.parameters(), lr=0.5, max_iter=2)
    orthofx.attach(optimizer, gm)

    def closure():
        optimizer.zero_grad()
        loss = gm(x)
        loss.backward()
        return loss

    optimizer.step(closure)
    assert all(torch.isfinite(p).all() for p in gm.parameters())


def test_polar_factor_keeps_the_directions_of_a_half_precision_gradient():
    g = torch.Generator().manual_seed(0)
    for shape in ((64, 144), (6, 36), (64, 1152)):
        for dtype in (torch.bfloat16, torch.float16):
            G = torch.randn(*shape, generator=g).to(dtype)  # well conditioned: every direction is real
            P = pre_svd.polar_factor(G).double()
            U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
            torch.testing.assert_close(P, (U @ Vh).to(dtype).double(), rtol=0, atol=1e-2)
    # rounding noise of a rank-2 float32 product is still no direction
    low = torch.randn(300, 2, generator=g) @ torch.randn(2, 200, generator=g)
    assert int(torch.linalg.matrix_rank(pre_svd.polar_factor(low).double(), atol=0.5)) == 2


# ----------------------------------------------------------------------------------------- pre_svd: weights

def test_pre_svd_weight_penalties():
    torch.manual_seed(0)
    x = torch.randn(32, 6)
    gm = orthofx.transform(LinearEigh(), _pre_svd_policy(weight="lorth", penalty_weight=0.5, nog=False),
                           example_inputs=(x,))
    terms = gm.meta["orthofx"].penalties
    assert all(isinstance(t, LorthTerm) and t.weight == 0.5 for t in terms) and len(terms) == 2
    assert {c.status for c in _changes(gm, "pre_svd")} == {"L_orth"}
    assert orthofx.penalty(gm).item() > 0

    gm = orthofx.transform(LinearEigh(), _pre_svd_policy(weight="srip", power_iterations=200), example_inputs=(x,))
    assert {c.status for c in _changes(gm, "pre_svd")} == {"SRIP + NOG"}
    expected = 0.0
    for name in ("a", "b"):
        W = gm.get_submodule(name).weight.detach().double()
        gram = W @ W.T  # out <= in: the smaller Gram matrix
        expected += float(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], dtype=gram.dtype), ord=2))
    total = orthofx.penalty(gm)
    assert total.item() == pytest.approx(0.01 * expected, rel=1e-4)
    total.backward()
    assert gm.a.weight.grad is not None and torch.isfinite(gm.a.weight.grad).all()
    # grouped conv: per group
    conv = nn.Conv2d(4, 6, 1, groups=2)
    value = pre_svd.srip(conv.weight.detach(), groups=2, iterations=300)
    W = conv.weight.detach().reshape(2, 3, 2).double()
    gram = W.mT @ W  # 3 x 2 per group: out > rest, so W^T W
    want = torch.linalg.matrix_norm(gram - torch.eye(2, dtype=gram.dtype), ord=2).sum()
    assert value.item() == pytest.approx(want.item(), rel=1e-4)


class ConvCov(nn.Module):
    def __init__(self, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(8, 4, 1, stride=stride, bias=False)

    def forward(self, x):
        f = self.conv(x).flatten(2)
        cov = f @ f.mT / f.shape[-1] + 1e-3 * torch.eye(f.shape[1])
        L, V = torch.linalg.eigh(cov)
        return (V * L.sqrt().unsqueeze(-2)) @ V.mT


def test_pre_svd_orthogonal_layers_and_fallback():
    torch.manual_seed(0)
    x = torch.randn(2, 6)
    gm = orthofx.transform(LinearEigh(), _pre_svd_policy(weight="orthogonal"), example_inputs=(x.repeat(8, 1),))
    from orthofx.nn.orthogonal import OrthogonalLinear

    assert isinstance(gm.get_submodule("a"), OrthogonalLinear)
    W = gm.get_submodule("a").weight.detach()
    assert torch.allclose(W @ W.T, torch.eye(4), atol=1e-5)
    statuses = {c.status for c in _changes(gm, "pre_svd")}
    assert statuses == {"orthogonal (hard) + no NOG/OLR on a hard layer"}
    assert gm.meta["orthofx"].optimizer_hooks == []

    from orthofx.nn.orthogonal import OrthogonalConv2d

    xc = torch.randn(2, 8, 4, 4)
    gm = orthofx.transform(ConvCov(), _pre_svd_policy(weight="orthogonal", nog=False), example_inputs=(xc,))
    assert isinstance(gm.get_submodule("conv"), OrthogonalConv2d)
    # 1x1 conv 2 -> 4 at stride 2: row-orthogonal case (M = 4 <= C S^2 = 8) but M > C k^2 = 2, so no orthogonal
    # convolution exists (P0 Theorem 4): the pass falls back to L_orth
    class Impossible(ConvCov):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 1, stride=2, bias=False)

    gm = orthofx.transform(Impossible(), _pre_svd_policy(weight="orthogonal", nog=False),
                           example_inputs=(torch.randn(2, 2, 4, 4),))
    (change,) = _changes(gm, "pre_svd")
    assert change.status.startswith("L_orth (fallback: ") and "no orthogonal convolution exists" in change.status
    assert isinstance(gm.meta["orthofx"].penalties[0], LorthTerm)
    assert type(gm.get_submodule("conv")) is nn.Conv2d

    # a weight tied to another layer's: a hard layer would untie them, so the pass falls back to L_orth
    class Tied(ConvCov):
        def __init__(self):
            super().__init__()
            self.twin = nn.Conv2d(8, 4, 1, bias=False)
            self.twin.weight = self.conv.weight

        def forward(self, x):
            return super().forward(x) + self.twin(x).mean()

    gm = orthofx.transform(Tied(), _pre_svd_policy(weight="orthogonal", nog=False), example_inputs=(xc,))
    (change,) = _changes(gm, "pre_svd")
    assert "tied to twin" in change.status and change.status.startswith("L_orth (fallback: ")
    assert type(gm.get_submodule("conv")) is nn.Conv2d and gm.get_submodule("conv").weight is gm.twin.weight


# ----------------------------------------------------------------------------------------- preset, compile

@pytest.mark.parametrize("name", ["dbn_cnn", "gcp_cnn"])
def test_svd_preset_transforms_and_trains(name):
    assert "svd" in orthofx.presets()
    torch.manual_seed(0)
    model = orthofx.models.get(name)
    x = orthofx.models.example_input(name, batch=8)
    gm = orthofx.transform(model, "svd", example_inputs=(x,))
    changes = _changes(gm)
    pre = "conv1" if name == "dbn_cnn" else "conv_last"
    assert {c.site for c in changes if c.pass_name == "pre_svd"} == {pre}
    assert {c.status for c in changes if c.pass_name == "pre_svd"} == {"NOG + OLR"}
    # dbn_cnn: the eigh of the training graph and that of the eval graph (running covariance)
    sites = 2 if name == "dbn_cnn" else 1
    assert [c.status for c in changes if c.pass_name == "svd_conditioning"] == ["stable eigh (taylor, order 9)"] * sites
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
    orthofx.attach(optimizer, gm)
    gm.train()
    labels = torch.arange(8) % 10
    for _ in range(2):
        loss = nn.functional.cross_entropy(gm(x), labels) + orthofx.penalty(gm)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in gm.parameters())
    # the training graph's site saw the two steps (dbn_cnn's eval site, "@eval", only transform's check run)
    (summary,) = [value for site, value in monitors(gm).items() if "@" not in site]
    assert summary["updates"] >= 2 and summary["nan_events"] == 0 and summary["kappa"] >= 1


@pytest.mark.parametrize("method", ["taylor", "newton_schulz"])
def test_compile_fullgraph_without_graph_breaks(method):
    torch.manual_seed(0)
    model = orthofx.models.get("gcp_cnn", width=8, dim=8)
    x = orthofx.models.example_input("gcp_cnn", batch=4)
    gm = orthofx.transform(model, _policy(method=method), example_inputs=(x,))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(gm)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(gm, fullgraph=True, backend="eager")
    monitor = gm.get_submodule(_changes(gm)[0].after["monitor"])
    updates = int(monitor.updates)
    y = compiled(x)
    assert torch.allclose(y, gm(x), atol=1e-5)
    y.sum().backward()
    assert int(monitor.updates) == updates + 2  # the compiled call updated the buffers too


def test_parameter_validation():
    with pytest.raises(PolicyError, match="method"):
        orthofx.Policy.from_dict(_policy(method="cholesky"))
    with pytest.raises(PolicyError, match="clamp_gap"):
        orthofx.Policy.from_dict(_policy(clamp_gap=0.0))
    with pytest.raises(PolicyError, match="weight"):
        orthofx.Policy.from_dict(_pre_svd_policy(weight="hard"))
    policy = orthofx.Policy.preset("svd")
    assert [r.apply for r in policy.rules] == ["svd_conditioning", "pre_svd"]


class UpperZCA(nn.Module):
    """Whitening with the covariance given by its upper triangle (``UPLO="U"``)."""

    def forward(self, a):
        L, V = torch.linalg.eigh(a, UPLO="U")
        return V @ torch.diag_embed(L.rsqrt()) @ V.mT


def test_newton_schulz_monitor_reads_the_triangle_the_site_reads():
    """With ``UPLO="U"`` the decomposition (and the Newton-Schulz replacement) read the upper triangle; the
    monitor's forward-only eigvalsh used to read the lower one, i.e. the kappa of another matrix."""
    sigma = _spd(5, batch=(2,), kappa=1e3)
    a = torch.triu(sigma)  # only the triangle eigh reads holds the matrix
    lam = torch.linalg.eigvalsh(sigma)
    expected = float((lam[..., -1] / lam[..., 0]).max())  # 1e3
    for method in ("taylor", "newton_schulz"):
        gm = orthofx.transform(UpperZCA(), _policy(method=method, iterations=30), example_inputs=(a,))
        assert torch.allclose(gm(a), UpperZCA()(a), atol=1e-8)
        (summary,) = monitors(gm).values()
        assert summary["kappa"] == pytest.approx(expected, rel=1e-6), method


class SvdSqrtUnusedVh(nn.Module):
    """GCP's matrix square root from an SVD, unpacking (and not using) ``Vh``."""

    def forward(self, a):
        U, S, Vh = torch.linalg.svd(a)
        return U @ torch.diag_embed(S.sqrt()) @ U.mT


class TorchSvdInvSqrtUnusedV(nn.Module):
    def forward(self, a):
        U, S, V = torch.svd(a)
        return (U * S.rsqrt().unsqueeze(-2)) @ U.transpose(-2, -1)


@pytest.mark.parametrize("model,op", [(SvdSqrtUnusedVh(), "linalg.svd"), (TorchSvdInvSqrtUnusedV(), "svd")])
def test_newton_schulz_ignores_unused_outputs_of_the_decomposition(model, op):
    """``U, S, Vh = svd(A)`` with ``Vh`` unused leaves a getitem node without users in the graph; it used to count
    as a use "outside V diag(f(lambda)) V^T", so the documented ``U diag(f(S)) U^T`` form was never replaced."""
    a = _spd(6, batch=(3,), kappa=10.0)
    gm = orthofx.transform(model, _policy(op, method="newton_schulz", iterations=20), example_inputs=(a,))
    (change,) = _changes(gm)
    assert change.status.startswith("newton_schulz"), change.status
    assert not _has_decomposition(gm)
    assert torch.allclose(gm(a), model(a), atol=1e-8)
    # the inference form finds it too (to_newton_schulz on the plain graph)
    plain = torch.fx.symbolic_trace(model)
    node = "linalg_svd" if op == "linalg.svd" else "svd"
    assert svd_conditioning.to_newton_schulz(plain, iterations=20) == {node: "replaced"}
    assert torch.allclose(plain(a), model(a), atol=1e-8)


class StarredReciprocalSqrt(nn.Module):
    """``1 / sqrt(L)`` in code symbolic tracing cannot follow (``f(*eigh(a))``): captured by torch.export, which
    records ``1 / x`` as ``mul(reciprocal(x), 1.0)``."""

    def forward(self, a):
        return self.whiten(*torch.linalg.eigh(a))

    @staticmethod
    def whiten(L, V):
        return V @ torch.diag_embed(1.0 / L.sqrt()) @ V.mT


def test_newton_schulz_recognises_one_over_sqrt_as_torch_export_records_it():
    a = _spd(5, batch=(3,), kappa=10.0)
    model = StarredReciprocalSqrt()
    gm = orthofx.transform(model, _policy(method="newton_schulz", iterations=20), example_inputs=(a,))
    assert gm.meta["orthofx"].capture.mode == "export"
    (change,) = _changes(gm)
    assert change.status == "newton_schulz (inverse sqrt, 20 iterations)", change.status
    assert torch.allclose(gm(a), model(a), atol=1e-8)


class LowercaseUplo(nn.Module):
    """torch accepts ``UPLO="u"`` / ``"l"`` (case-insensitive)."""

    def forward(self, a):
        L, V = torch.linalg.eigh(a, UPLO="u")
        return V @ torch.diag_embed(L.rsqrt()) @ V.mT, torch.linalg.eigvalsh(a, "l")


@pytest.mark.parametrize("method", ["taylor", "newton_schulz"])
def test_lowercase_uplo_is_accepted_like_torch(method):
    sigma = _spd(5, batch=(2,), kappa=100.0)
    a = torch.triu(sigma) + 0.5 * torch.tril(torch.ones(5, 5, dtype=torch.float64), -1)  # two different triangles
    model = LowercaseUplo()
    policy = {"rules": [{"match": {"op": ["linalg.eigh", "linalg.eigvalsh"]}, "apply": "svd_conditioning",
                         "with": {"method": method, "iterations": 30}}]}
    gm = orthofx.transform(model, policy, example_inputs=(a,))  # used to fail: "UPLO must be 'L' or 'U', got 'u'"
    for got, want in zip(gm(a), model(a)):
        assert torch.allclose(got, want, atol=1e-8)
    kappas = {site: summary["kappa"] for site, summary in monitors(gm).items()}
    for site, matrix in (("linalg.eigh", sigma), ("linalg.eigvalsh", a.tril())):  # the triangle each site reads
        lam = torch.linalg.eigvalsh(matrix)
        assert kappas[site] == pytest.approx(float((lam[..., -1] / lam[..., 0]).max()), rel=1e-6)
    assert cond.stable_eigvalsh(a, "u").allclose(torch.linalg.eigvalsh(a, "U"))
    assert cond.power_newton_schulz(a, 0.5, 30, uplo="u").allclose(cond.power_newton_schulz(a, 0.5, 30, uplo="U"))
