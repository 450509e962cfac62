"""svd_conditioning: ``explain`` says what ``transform`` does at a site ``method: newton_schulz`` cannot rewrite.

``explain`` showed ``apply`` where the rewrite found no matrix power to replace (eigvalsh, svdvals,
``torch.svd(compute_uv=False)``, eigenvectors used elsewhere, a non-square SVD with known shapes) and for a call
the pass cannot read (``out=``), while ``transform`` applied ``fallback`` (taylor, left the site, or raised).
``fallback: error`` raised in ``apply``, after the passes of earlier rules had run (with ``inplace=True``,
having written the user's weights); it is now the plan's refusal, raised before any pass runs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import LayerArgumentError, TransformError
from orthofx.nn.decompositions import inv_sqrtm_newton_schulz, sqrtm_newton_schulz


class Eigvalsh(nn.Module):
    def forward(self, x):
        return torch.linalg.eigvalsh(x.mT @ x)


class Svdvals(nn.Module):
    def forward(self, x):
        return torch.linalg.svdvals(x.mT @ x)


class TorchSvdValues(nn.Module):
    def forward(self, x):
        return torch.svd(x.mT @ x, compute_uv=False)[1]


class VectorsUsedElsewhere(nn.Module):
    """``V diag(L^(-1/2)) V^T``, with ``V`` returned too: the decomposition must stay."""

    def forward(self, x):
        L, V = torch.linalg.eigh(x.mT @ x)
        return V @ torch.diag_embed(L.rsqrt()) @ V.mT, V


class Whiten(nn.Module):
    """A pattern Newton-Schulz replaces: ``explain`` keeps saying ``apply``."""

    def forward(self, x):
        L, V = torch.linalg.eigh(x.mT @ x)
        return x @ (V @ torch.diag_embed(L.rsqrt()) @ V.mT)


class DataSvd(nn.Module):
    """``U diag(S^(1/2)) Vh`` of a non-square matrix: refused only where the capture records its shape."""

    def forward(self, x):
        U, S, Vh = torch.linalg.svd(x, full_matrices=False)
        return U @ torch.diag_embed(S.sqrt()) @ Vh


class OutCall(nn.Module):
    def forward(self, x):
        buf = torch.empty(x.shape[-1], dtype=x.dtype)
        torch.linalg.eigvalsh(x.mT @ x, out=buf)
        return buf * 2


def _policy(op, fallback, method="newton_schulz", capture=None, before=()):
    policy = {"rules": [*before, {"match": {"op": op}, "apply": "svd_conditioning",
                                  "with": {"method": method, "fallback": fallback, "iterations": 30}}]}
    if capture:
        policy["capture"] = {"mode": capture}
    return policy


def _x(shape=(7, 4)):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


def _statuses(plan):
    return {r["site"]: r["status"] for r in plan.rows() if r["pass"] == "svd_conditioning"}


def _check_plan_matches_transform(model, policy, x):
    """Each svd_conditioning row of ``explain`` against what ``transform`` recorded (or raised) at its site, and
    the transformed model's output against the model's own (every fallback keeps torch's forward values)."""
    statuses = _statuses(orthofx.explain(model, policy, example_inputs=(x,)))
    assert statuses
    if any(s.startswith("apply: fails: ") for s in statuses.values()):
        reason = next(s for s in statuses.values() if s.startswith("apply: fails: "))
        reason = reason.split("cannot be applied: ", 1)[1].rsplit(" (fallback: error)", 1)[0]
        with pytest.raises(TransformError, match="newton_schulz cannot be applied") as info:
            orthofx.transform(model, policy, example_inputs=(x,))
        assert reason in str(info.value)
        return statuses
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    changes = {c.site: c.status for c in gm.meta["orthofx"].changes if c.pass_name == "svd_conditioning"}
    assert set(changes) == set(statuses)
    for site, status in statuses.items():
        done = changes[site]
        if status == "apply":
            assert done.startswith("newton_schulz (")
        elif status.startswith("apply: left unchanged: "):
            why = status.removeprefix("apply: left unchanged: ").removesuffix(" (fallback: keep)")
            assert done == f"skipped: {why.replace('newton_schulz cannot be applied: ', 'newton_schulz: ')}"
        else:
            assert status.startswith("apply: stable ") and status.endswith(" (fallback: stable)")
            why = status.split(" instead of newton_schulz: ", 1)[1].removesuffix(" (fallback: stable)")
            assert done.startswith("stable ") and done.endswith(f"; newton_schulz skipped: {why}")
    if all(s != "apply" for s in statuses.values()):
        want, got = model(x), gm(x)
        for a, b in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
            torch.testing.assert_close(b, a, atol=1e-10, rtol=0)
    return statuses


VALUES_ONLY = [(Eigvalsh, "linalg.eigvalsh"), (Svdvals, "linalg.svdvals"), (TorchSvdValues, "svd"),
               (VectorsUsedElsewhere, "linalg.eigh")]


@pytest.mark.parametrize("fallback", ["stable", "keep", "error"])
@pytest.mark.parametrize("model,op", VALUES_ONLY, ids=[m.__name__ for m, _ in VALUES_ONLY])
def test_explain_shows_the_fallback_transform_takes(model, op, fallback):
    statuses = _check_plan_matches_transform(model(), _policy(op, fallback), _x())
    (status,) = statuses.values()
    assert status != "apply" and status.endswith(f"(fallback: {fallback})")


def test_a_site_newton_schulz_rewrites_is_still_planned_as_apply():
    x = _x((40, 4))
    statuses = _check_plan_matches_transform(Whiten(), _policy("linalg.eigh", "error"), x)
    assert list(statuses.values()) == ["apply"]


def test_non_square_svd_with_recorded_shapes():
    policy = _policy("linalg.svd", "error", capture="export")
    statuses = _check_plan_matches_transform(DataSvd(), policy, _x((2, 5, 3)))
    (status,) = statuses.values()
    assert "not square" in status


@pytest.mark.parametrize("method", ["taylor", "newton_schulz"])
def test_a_call_the_pass_cannot_read_is_planned_as_left_unchanged(method):
    statuses = _check_plan_matches_transform(OutCall(), _policy("linalg.eigvalsh", "error", method=method), _x())
    assert list(statuses.values()) == ["apply: left unchanged: calls with out= are not rewritten"]


class LayerThenEigvalsh(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        return torch.linalg.eigvalsh(h.mT @ h)


def test_fallback_error_is_raised_before_an_earlier_rule_writes_the_users_weights():
    torch.manual_seed(0)
    model = LayerThenEigvalsh().double()
    weight = model.fc.weight.detach().clone()
    policy = _policy("linalg.eigvalsh", "error",
                     before=[{"match": {"type": "Linear"}, "apply": "isometric_init", "with": {"gain": 1.0}}])
    assert _statuses(orthofx.explain(model, policy))["linalg.eigvalsh"].startswith("apply: fails: ")
    with pytest.raises(TransformError, match="newton_schulz cannot be applied: the op returns only the values") as info:
        orthofx.transform(model, policy, example_inputs=(_x(),), inplace=True)
    assert "had already" not in str(info.value)  # no note of what earlier rules wrote
    assert torch.equal(model.fc.weight, weight)
    # isometric_init alone writes the weight in place: without the refusal it would have
    orthofx.transform(model, {"rules": policy["rules"][:1]}, example_inputs=(_x(),), inplace=True)
    assert not torch.equal(model.fc.weight, weight)


class TwoModes(nn.Module):
    """Training: a whitening Newton-Schulz replaces; eval: the eigenvectors are returned too."""

    def forward(self, x):
        L, V = torch.linalg.eigh(x.mT @ x)
        white = x @ (V @ torch.diag_embed(L.rsqrt()) @ V.mT)
        return (white, white) if self.training else (white, V)


@pytest.mark.parametrize("training", [True, False])
def test_two_mode_model_each_graph_planned_from_its_own_nodes(training):
    model = TwoModes().train(training)
    statuses = _check_plan_matches_transform(model, _policy("linalg.eigh", "keep"), _x((40, 4)))
    train_site = "linalg.eigh" if training else "linalg.eigh@train"
    eval_site = "linalg.eigh@eval" if training else "linalg.eigh"
    assert statuses[train_site] == "apply"
    assert statuses[eval_site].startswith("apply: left unchanged: newton_schulz cannot be applied: node ")
    with pytest.raises(TransformError, match="newton_schulz cannot be applied: node .* used by node .output."):
        orthofx.transform(model, _policy("linalg.eigh", "error"))


# ------------------------------------------------------------------------ sqrtm / inv_sqrtm_newton_schulz dtypes

def _spd64(n=5, seed=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4 * n, n, generator=g, dtype=torch.float64)
    return x.mT @ x / (4 * n) + 0.5 * torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("fn", [sqrtm_newton_schulz, inv_sqrtm_newton_schulz])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_newton_schulz_powers_refuse_integer_matrices(fn, dtype):
    """An integer matrix gave a float32 result (``sqrtm([[9, 0], [0, 4]])`` -> 3., 2.): the int64 entries rounded
    to float32, the dtype changed; power_newton_schulz refuses it, and so do these now."""
    a = torch.tensor([[9, 0], [0, 4]]).to(dtype)
    with pytest.raises(LayerArgumentError, match=rf"{fn.__name__} supports floating-point matrices only .*"
                                                 rf"got dtype {dtype}: cast it with \.double\(\)"):
        fn(a, 10)


@pytest.mark.parametrize("fn,p", [(sqrtm_newton_schulz, 0.5), (inv_sqrtm_newton_schulz, -0.5)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 2e-6), (torch.float16, 2e-3),
                                       (torch.bfloat16, 1.6e-2), (torch.complex128, 1e-13)])
def test_newton_schulz_powers_of_the_accepted_dtypes_match_eigh_in_float64(fn, p, dtype, tol):
    a64 = _spd64()
    if dtype.is_complex:  # a Hermitian positive definite matrix: the same matmuls give its powers
        g = torch.Generator().manual_seed(8)
        y = torch.randn(2, 20, 5, generator=g, dtype=torch.complex128)
        a64 = y.mH @ y / 20 + 0.5 * torch.eye(5, dtype=torch.complex128)
    a = a64.to(dtype)
    # the reference from the matrix as the function gets it (the cast's rounding is not the iteration's error)
    L, V = torch.linalg.eigh(a.to(a64.dtype))
    ref = (V * L.pow(p).unsqueeze(-2)) @ V.mH
    out = fn(a, 20)
    assert out.dtype == dtype and out.shape == a.shape
    err = ((out.to(ref.dtype) - ref).abs().max() / ref.abs().max()).item()
    assert err < tol, err
