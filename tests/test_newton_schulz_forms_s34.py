"""Matrix powers written in two more common ways reach the Newton-Schulz (SVD-free, ONNX) form (session 34).

* ``(V * L.rsqrt()) @ V.T``: the eigenvalues broadcast along the columns of 2-D eigenvectors, with no
  ``unsqueeze(-2)``; it was "no V diag(lambda^(1/2) or lambda^(-1/2)) V^T ... was found", so ``.onnx`` export
  refused such a model. So were scalings written as a division, ``(V / L.sqrt()) @ V.T``.
* outputs cast back from a float64 decomposition: ``orthofx.nn.eigh_stable(A, float64=True)`` (which casts its
  results with ``.to(A.dtype)``), or ``torch.linalg.eigh(A.double())`` followed by ``.float()``; none of the forms
  was recognised through the cast.

The reference is the matrix power computed here by a float64 eigendecomposition.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import fx, nn

import orthofx
from orthofx.errors import OrthofxError
from orthofx.nn import eigh_stable
from orthofx.passes.svd_conditioning import to_newton_schulz

N = 6

FORMS = {
    "broadcast .T": lambda V, D: (V * D) @ V.T,
    "broadcast .mT": lambda V, D: (V * D) @ V.mT,
    "broadcast, operands swapped": lambda V, D: (D * V) @ V.transpose(0, 1),
    "unsqueeze": lambda V, D: (V * D.unsqueeze(-2)) @ V.mT,
    "diag": lambda V, D: V @ torch.diag(D) @ V.T,
    "right scaling": lambda V, D: V @ (D.unsqueeze(-1) * V.mT),
}

def _eigh_in_float64_cast_back(A):
    L, V = torch.linalg.eigh(A.double())
    return L.to(A.dtype), V.to(A.dtype)


def _eigh_in_float64_then_float(A):
    L, V = torch.linalg.eigh(A.double())
    return L.float(), V.float()


DECOMPOSITIONS = {
    "float32": torch.linalg.eigh,
    "eigh_stable float64": lambda A: eigh_stable(A, float64=True),
    "linalg float64, .to(dtype)": _eigh_in_float64_cast_back,
    "linalg float64, .float()": _eigh_in_float64_then_float,
}


def _values_cast_only(A):
    L, V = torch.linalg.eigh(A.double())
    return L.float(), V


class Whiten(nn.Module):
    def __init__(self, form, decomposition, power: float = -0.5):
        super().__init__()
        self.lin = nn.Linear(N, N)
        self.form, self.decomposition, self.power = form, decomposition, power

    def forward(self, x):
        h = self.lin(x)
        cov = h.T @ h / h.shape[0] + 0.5 * torch.eye(N)
        L, V = self.decomposition(cov)
        return self.form(V, L.rsqrt() if self.power == -0.5 else L.sqrt())


def _reference(model: Whiten, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        h = model.lin(x).double()
        cov = h.T @ h / h.shape[0] + 0.5 * torch.eye(N, dtype=torch.float64)
        L, V = torch.linalg.eigh(cov)
        return (V * L.pow(model.power)) @ V.T


@pytest.mark.parametrize("decomposition", list(DECOMPOSITIONS))
@pytest.mark.parametrize("form", list(FORMS))
def test_the_power_becomes_newton_schulz_iterations_on_the_decomposed_matrix(form, decomposition):
    torch.manual_seed(0)
    model = Whiten(FORMS[form], DECOMPOSITIONS[decomposition], power=-0.5 if "T" in form else 0.5).eval()
    x = torch.randn(32, N)
    # a plain trace records eigh_stable as its custom op, which freeze turns into the stand-in that is rewritten
    gm = orthofx.freeze(model) if "eigh_stable" in decomposition else fx.symbolic_trace(model)
    results = to_newton_schulz(gm, iterations=25)
    assert list(results.values()) == ["replaced"], results
    targets = [str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert not any("eigh" in t for t in targets), targets
    y = gm(x)
    assert y.dtype == torch.float32  # cast back as the model's own result was
    torch.testing.assert_close(y.double(), _reference(model, x), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(y, model(x), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("form, power", [
    (lambda V, L: (V / L.sqrt()) @ V.T, -0.5),
    (lambda V, L: (V / L.rsqrt().unsqueeze(-2)) @ V.mT, 0.5),
    (lambda V, L: V @ (V.mT / L.sqrt().unsqueeze(-1)), -0.5),
    (lambda V, L: torch.div(V, L.rsqrt()) @ V.T, 0.5),
], ids=["V / sqrt(L), broadcast", "V / rsqrt(L) unsqueezed", "V^T / sqrt(L) on the right", "torch.div"])
def test_a_scaling_written_as_a_division_is_the_negated_power(form, power):
    torch.manual_seed(5)

    class Divided(Whiten):
        def forward(self, x):
            h = self.lin(x)
            cov = h.T @ h / h.shape[0] + 0.5 * torch.eye(N)
            L, V = torch.linalg.eigh(cov)
            return form(V, L)

    model = Divided(None, None, power=power).eval()
    x = torch.randn(32, N)
    gm = fx.symbolic_trace(model)
    assert list(to_newton_schulz(gm, iterations=25).values()) == ["replaced"]
    torch.testing.assert_close(gm(x).double(), _reference(model, x), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("form, decomposition", [
    # D * V^T scales the columns of V^T: V V^T diag(D) = diag(D), no matrix function
    (lambda V, D: V @ (D * V.mT), torch.linalg.eigh),
    # the values cast to float32, the float64 vectors not: the product is float64, which one cast of the
    # replacement to float32 would not give
    (lambda V, D: (V * D.unsqueeze(-2)) @ V.mT, _values_cast_only),
    # D / V divides by the eigenvectors' entries
    (lambda V, D: (D / V) @ V.mT, torch.linalg.eigh),
], ids=["broadcast on the right", "only the values cast", "divided by V"])
def test_forms_that_are_no_matrix_power_are_left_as_they_are(form, decomposition):
    torch.manual_seed(1)
    model = Whiten(form, decomposition).eval()
    x = torch.randn(32, N)
    gm = fx.symbolic_trace(model)
    results = to_newton_schulz(gm, iterations=25)
    assert list(results.values()) != ["replaced"], results
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_broadcast_eigenvalues_of_a_batch_of_matrices_are_refused_at_the_first_call():
    torch.manual_seed(2)

    class Batched(nn.Module):
        def forward(self, h):
            cov = h.mT @ h / h.shape[1] + 0.5 * torch.eye(N)
            L, V = torch.linalg.eigh(cov)
            return (V * L.rsqrt()) @ V.mT

    gm = fx.symbolic_trace(Batched())
    assert list(to_newton_schulz(gm).values()) == ["replaced"]
    gm(torch.randn(16, N))  # 2-D: D broadcasts along the columns
    with pytest.raises(OrthofxError, match=r"V \* L.*3-D"):
        gm(torch.randn(1, 16, N))  # batched V * L broadcasts otherwise (along rows or batches)


def test_the_newton_schulz_pass_takes_the_broadcast_form():
    torch.manual_seed(3)
    model = Whiten(FORMS["broadcast .T"], torch.linalg.eigh).eval()
    x = torch.randn(32, N)
    policy = {"rules": [{"match": {"op": "linalg.eigh"}, "apply": "svd_conditioning",
                         "with": {"method": "newton_schulz", "iterations": 25, "fallback": "error"}}]}
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    (change,) = [c for c in gm.meta["orthofx"].changes if c.pass_name == "svd_conditioning"]
    assert change.status.startswith("newton_schulz")
    torch.testing.assert_close(gm(x).double(), _reference(model, x), rtol=2e-5, atol=2e-6)


def test_a_model_calling_eigh_stable_in_float64_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(4)
    model = Whiten(FORMS["unsqueeze"], DECOMPOSITIONS["eigh_stable float64"]).eval()
    x = torch.randn(32, N)
    result = orthofx.export(model, os.path.join(tmp_path, "whiten.onnx"), (x,), dynamic_batch=False)
    assert result.max_abs_diff <= 1e-4


EINSUM_FORMS = {
    "pq,q,rq->pr": lambda V, L: torch.einsum("ij,j,kj->ik", V, L.rsqrt(), V),
    "operands as a list, spaces": lambda V, L: torch.einsum("ab, b, cb -> ac", [V, L.rsqrt(), V]),
    "right factor transposed": lambda V, L: torch.einsum("ij,j,jk->ik", V, L.rsqrt(), V.mT),
    "left factor transposed": lambda V, L: torch.einsum("ji,j,kj->ik", V.T, L.rsqrt(), V),
    "batch dimensions": lambda V, L: torch.einsum("...ij,...j,...kj->...ik", V, L.rsqrt(), V),
}


class EinsumWhiten(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form = form

    def forward(self, h):
        cov = h.mT @ h / h.shape[-2] + 0.5 * torch.eye(N)
        L, V = torch.linalg.eigh(cov)
        return self.form(V, L)


def _inverse_root64(h: torch.Tensor) -> torch.Tensor:
    h = h.double()
    cov = h.mT @ h / h.shape[-2] + 0.5 * torch.eye(N, dtype=torch.float64)
    L, V = torch.linalg.eigh(cov)
    return (V * L.rsqrt().unsqueeze(-2)) @ V.mT


@pytest.mark.parametrize("form", list(EINSUM_FORMS))
def test_an_einsum_of_the_factors_and_the_power_becomes_newton_schulz(form):
    torch.manual_seed(6)
    model = EinsumWhiten(EINSUM_FORMS[form])
    h = torch.randn(3, 32, N) if form == "batch dimensions" else torch.randn(32, N)
    gm = fx.symbolic_trace(model)
    assert list(to_newton_schulz(gm, iterations=25).values()) == ["replaced"]
    gm.graph.lint()
    assert not any("einsum" in str(n.target) or "eigh" in str(n.target) for n in gm.graph.nodes)
    torch.testing.assert_close(gm(h).double(), _inverse_root64(h), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("form", [
    lambda V, L: torch.einsum("ij,j,jk->ik", V, L.rsqrt(), V),  # V diag(D) V: no transpose
    lambda V, L: torch.einsum("ij,j,kj->ki", V, L.rsqrt(), V.flip(0)),  # another matrix on the right
    lambda V, L: torch.einsum("ij,i,kj->ik", V, L.rsqrt(), V),  # D on the rows of V
], ids=["no transpose", "other right factor", "rows scaled"])
def test_einsums_that_are_no_matrix_power_are_left_as_they_are(form):
    torch.manual_seed(7)
    model = EinsumWhiten(form)
    h = torch.randn(32, N)
    gm = fx.symbolic_trace(model)
    assert list(to_newton_schulz(gm).values()) != ["replaced"]
    torch.testing.assert_close(gm(h), model(h), rtol=0, atol=0)


def test_the_einsum_form_in_an_export_captured_graph():
    torch.manual_seed(8)
    model = EinsumWhiten(EINSUM_FORMS["batch dimensions"])
    h = torch.randn(2, 32, N)
    policy = {"capture": {"mode": "export"},
              "rules": [{"match": {"op": "linalg.eigh"}, "apply": "svd_conditioning",
                         "with": {"method": "newton_schulz", "iterations": 25, "fallback": "error"}}]}
    gm = orthofx.transform(model, policy, example_inputs=(h,))
    assert not any("einsum" in str(n.target) for n in gm.graph.nodes)
    torch.testing.assert_close(gm(h).double(), _inverse_root64(h), rtol=2e-5, atol=2e-6)
