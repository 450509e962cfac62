"""Audit of the numerical public API: each test pins a bug found by comparing orthofx with an independent
reference (a dense float64 matrix, a finite difference, the same step taken another way)."""

import copy
import math

import pytest
import torch
from torch import nn

import orthofx
import orthofx.passes.pre_svd  # noqa: F401  (registers the pass)
import orthofx.passes.riemannian  # noqa: F401  (registers the pass)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


# ------------------------------------------------------------------------------- attach: optimizer.step(closure)

class _Eigh(nn.Module):
    """A Pre-SVD layer ``a`` feeding an eigendecomposition, and a head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.head = nn.Linear(5, 1)

    def forward(self, x):
        h = self.a(x)
        cov = h.T @ h / h.shape[0] + 1e-3 * torch.eye(5)
        L, V = torch.linalg.eigh(cov)
        return self.head(h @ V).sum() + L.sum()


def _orthonormality_error(weight):
    """``max |W^T W - I|`` (columns) or ``max |W W^T - I|`` (rows, for a wide ``W``), in float64."""
    w = weight.detach().double()
    gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    return float((gram - torch.eye(gram.shape[0], dtype=gram.dtype)).abs().max())


def _closure_models(kind):
    torch.manual_seed(0)
    if kind == "riemannian":
        model = nn.Sequential(nn.Linear(6, 6, bias=False), nn.Tanh(), nn.Linear(6, 4, bias=False))
        policy = {"rules": [{"match": {"type": "Linear"}, "apply": "riemannian"}]}
        return orthofx.transform(model, policy), torch.randn(16, 6)
    x = torch.randn(32, 6)
    policy = {"rules": [{"match": {"feeds": "linalg.eigh"}, "apply": "pre_svd",
                         "with": {"nog": True, "olr": True}}]}
    return orthofx.transform(_Eigh(), policy, example_inputs=(x,)), x


@pytest.mark.parametrize("kind", ["riemannian", "nog_olr"])
@pytest.mark.parametrize("as_keyword", [False, True])
def test_step_with_a_closure_equals_the_step_without(kind, as_keyword):
    """``optimizer.step(closure)`` runs torch's step pre-hooks before the closure computes the gradients. The
    hooks used to act on the stale gradients (on none at the first step: the Riemannian weight left the
    manifold, NOG and OLR did nothing) and the optimizer then used the closure's raw gradients."""
    gm, x = _closure_models(kind)
    twin = copy.deepcopy(gm)
    plain = torch.optim.SGD(gm.parameters(), lr=0.3, momentum=0.9)
    closed = torch.optim.SGD(twin.parameters(), lr=0.3, momentum=0.9)
    orthofx.attach(plain, gm)
    orthofx.attach(closed, twin)

    def loss_of(model):
        out = model(x)
        return out.square().mean() if kind == "riemannian" else out

    def closure():
        closed.zero_grad()
        loss = loss_of(twin)
        loss.backward()
        return loss

    for _ in range(3):
        plain.zero_grad()
        loss_of(gm).backward()
        plain.step()
        returned = closed.step(closure=closure) if as_keyword else closed.step(closure)
        assert torch.is_tensor(returned)  # the closure's loss is still handed back
        for (name, p), q in zip(gm.named_parameters(), twin.parameters()):
            torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-6, msg=name)
    if kind == "riemannian":  # independent check: the weights are orthonormal
        for name in ("0", "2"):
            assert _orthonormality_error(twin.get_submodule(name).weight) < 1e-5, name
    else:  # OLR restored the base lr after every step
        assert all(group["lr"] == 0.3 for group in closed.param_groups)


def test_lbfgs_closure_runs_the_hooks_once_per_step():
    """LBFGS evaluates the closure several times per step: the hooks run after the first evaluation only, so
    the Riemannian pre-step weight is the step's starting point and the weight still ends on the manifold."""
    gm, x = _closure_models("riemannian")
    optimizer = torch.optim.LBFGS(gm.parameters(), lr=0.5, max_iter=4)
    with pytest.warns(orthofx.OrthofxWarning, match="LBFGS with max_iter=4 takes 4 steps inside one"):
        orthofx.attach(optimizer, gm)
    evaluations = []

    def closure():
        optimizer.zero_grad()
        loss = gm(x).square().mean()
        loss.backward()
        evaluations.append(float(loss.detach()))
        return loss

    optimizer.step(closure)
    assert len(evaluations) > 1
    for name in ("0", "2"):
        assert _orthonormality_error(gm.get_submodule(name).weight) < 1e-5, name


# ------------------------------------------------------------------------------- metrics: non-finite weights

def _dense_circular_conv(weight, n):
    """The matrix of the stride-1 circular convolution ``y[m, i] = sum_{c, p} K[m, c, p] x[c, (i + p) mod n]``
    (1-D, one group), built entry by entry in float64: the slow reference."""
    M, C, k = weight.shape
    D = torch.zeros(M, n, C, n, dtype=torch.float64)
    for m in range(M):
        for i in range(n):
            for c in range(C):
                for p in range(k):
                    D[m, i, c, (i + p) % n] += float(weight[m, c, p])
    return D.reshape(M * n, C * n)


def test_singular_values_of_a_non_finite_weight_are_nan_not_a_lapack_error():
    """A weight gone NaN/inf after a diverged step made conv_singular_values, linear_singular_values,
    orthogonality_error and jacobian_singular_values raise LAPACK's "failed to converge" (and with them
    ``orthofx.report`` on the model to inspect); lorth and spectral_norm_bound already returned NaN."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 3, generator=g, dtype=torch.float64)  # Conv1d, 2 groups of (2 out, 3 in)
    w[0, 1, 2] = float("nan")  # group 0 only
    sv = orthofx.metrics.conv_singular_values(w, 6, groups=2)
    assert sv.shape == (2 * 2 * 6,)  # min(M/g, C/g) * n per group
    finite = sv[torch.isfinite(sv)]
    assert int(torch.isnan(sv).sum()) == 12  # group 0's values
    reference = torch.linalg.svdvals(_dense_circular_conv(w[2:], 6))  # group 1 on its own
    torch.testing.assert_close(finite.sort(descending=True).values, reference, atol=1e-10, rtol=0)
    assert torch.isnan(orthofx.metrics.linear_singular_values(torch.tensor([[1.0, float("inf")]]))).all()
    assert math.isnan(orthofx.metrics.orthogonality_error(torch.full((3, 2), float("nan"))))
    # per-sample Jacobians: a sample whose block is non-finite gets NaN, the others their exact values
    a = torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    x = torch.tensor([[1.0, 1.0], [float("nan"), 1.0]], dtype=torch.float64)
    values = orthofx.metrics.jacobian_singular_values(lambda t: torch.exp(-t) @ a, x, per_sample=True)
    torch.testing.assert_close(values[0], torch.linalg.svdvals(-torch.exp(-x[0])[:, None] * a))
    assert torch.isnan(values[1]).all()


# ------------------------------------------------------------------------ svd_conditioning: Newton-Schulz form

class _SvdInverseRoot(nn.Module):
    """``U diag(S^(-1/2)) U^T`` from the SVD of a (possibly non-square) data matrix: ``(X X^T)^(-1/4)``."""

    def forward(self, x):
        r = torch.linalg.svd(x, full_matrices=False)
        return r[0] @ torch.diag_embed(r[1].rsqrt()) @ r[0].mT


@pytest.mark.parametrize("monitor", [True, False])
def test_newton_schulz_on_a_non_square_svd_says_what_to_do(monitor):
    """The pattern matcher accepts ``U diag(S^p) U^T`` of any SVD; on a non-square data matrix no Newton-Schulz
    form exists. The monitor failed inside torch ("linalg.eigh: A must be batches of square matrices", an op the
    user never called) and the iteration with a bare shape error; both now name the problem and the fix."""
    import orthofx.passes.svd_conditioning  # noqa: F401  (registers the pass)

    x = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    policy = {"rules": [{"match": {"op": "linalg.svd"}, "apply": "svd_conditioning",
                         "with": {"method": "newton_schulz", "monitor": monitor}}]}
    with pytest.raises(orthofx.errors.TransformError, match=r"non-square.*method 'taylor'") as info:
        orthofx.transform(_SvdInverseRoot(), policy, example_inputs=(x,))
    assert "(2, 4, 6)" in str(info.value) and "linalg.eigh" not in str(info.value)
    # the reference the taylor method keeps: (X X^T)^(-1/4) from a float64 eigendecomposition of X X^T
    gm = orthofx.transform(_SvdInverseRoot(), {"rules": [{"match": {"op": "linalg.svd"},
                                                          "apply": "svd_conditioning"}]}, example_inputs=(x,))
    L, V = torch.linalg.eigh(x @ x.mT)
    torch.testing.assert_close(gm(x), V @ torch.diag_embed(L ** -0.25) @ V.mT, atol=1e-10, rtol=1e-10)


# ----------------------------------------------------------------------------- stable eigh / svd: bad inputs

@pytest.mark.parametrize("call,bad,match", [
    ("eigh", torch.eye(3, dtype=torch.complex128), "real floating-point"),  # was: complex eigenvalues, then a
    ("svd", torch.eye(3, dtype=torch.complex128), "real floating-point"),   # crash inside the backward
    ("eigh", torch.ones(3, 3, dtype=torch.long), "real floating-point"),    # was: NotImplementedError (LAPACK)
    ("svd", torch.ones(3, 3, dtype=torch.long), "real floating-point"),     # was: torch's RuntimeError
    ("eigh", torch.randn(3, 4), r"square matrices.*\(3, 4\)"),                # was: linalg.eigh's RuntimeError
    ("eigh", torch.randn(3), r"\(3,\)"),                                      # was: IndexError
    ("svd", torch.randn(3), r"\(3,\)"),                                       # was: IndexError
])
def test_stable_decompositions_reject_unsupported_inputs_up_front(call, bad, match):
    from orthofx.nn.decompositions import eigh_stable, svd_stable

    op = eigh_stable if call == "eigh" else svd_stable
    with pytest.raises(orthofx.errors.LayerArgumentError, match=match) as info:
        op(bad)
    assert isinstance(info.value, ValueError)  # ``except ValueError`` keeps working
    # supported input: the same values as torch.linalg (the independent reference)
    A = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    A = A + A.mT
    if call == "eigh":
        torch.testing.assert_close(eigh_stable(A)[0], torch.linalg.eigvalsh(A))
    else:
        torch.testing.assert_close(svd_stable(A)[1], torch.linalg.svdvals(A))
