"""``torch.linalg.eigh(A, UPLO="U")`` under ``svd_conditioning``: the stable op reads the upper triangle and gives
torch's eigenvectors, signs included.

Eigenvectors are defined up to sign, and LAPACK picks the signs by the triangle it reduces: ``eigh(A, "U")`` and
``eigh(A.mT, "L")`` read the same matrix but differ in sign for about half of the vectors. The stand-in used to
decompose ``A.mT`` with ``"L"``, so a model whose later layers depend on the signs (a projection onto the
principal directions, trained on torch's signs) computed something else once transformed. The reference in every
test is torch itself: the untransformed model, or ``torch.linalg.eigh`` with the same ``UPLO``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthofx
from orthofx.nn import eigh_stable
from orthofx.nn import conditioning as cond

pytestmark = pytest.mark.usefixtures("one_thread")


def _symmetric(n: int = 6, batch: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(batch, n, n, dtype=torch.float64, generator=g)
    return b + b.mT


def _signs_differ(a: torch.Tensor) -> bool:
    """Whether LAPACK's two triangles give eigenvectors of other signs for ``a`` (what makes these tests bite)."""
    return not torch.allclose(torch.linalg.eigh(a, UPLO="U")[1], torch.linalg.eigh(a.mT, UPLO="L")[1])


@pytest.mark.parametrize("plain", [False, True])
@pytest.mark.parametrize("uplo", ["L", "U", "u"])
def test_stable_eigh_gives_torchs_eigenvectors_for_either_triangle(uplo, plain):
    a = _symmetric()
    assert _signs_differ(a)
    values, vectors = torch.linalg.eigh(a, UPLO=uplo)
    got_values, got_vectors = cond.stable_eigh(a, uplo, plain=plain)
    assert torch.equal(got_vectors, vectors)
    assert torch.equal(got_values, values)


def test_eigh_stable_reads_only_the_triangle_it_is_told():
    a = _symmetric()
    upper_only = a.triu() + 7.0 * torch.ones_like(a).tril(-1)  # the lower triangle holds another matrix
    for plain in (False, True):
        got = eigh_stable(upper_only, plain=plain, uplo="U")
        want = torch.linalg.eigh(upper_only, UPLO="U")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # a NaN in the triangle that is read makes that matrix's outputs NaN; one in the other triangle is ignored
    nan_upper = a.clone()
    nan_upper[0, 1, 4] = float("nan")
    values_u, _ = eigh_stable(nan_upper, uplo="U")
    values_l, _ = eigh_stable(nan_upper, uplo="L")
    assert values_u[0].isnan().all() and values_u[1:].isfinite().all()
    assert torch.equal(values_l, torch.linalg.eigh(nan_upper, UPLO="L")[0])


def test_eigh_stable_refuses_an_unknown_triangle():
    with pytest.raises(orthofx.OrthofxError, match="uplo must be 'L' or 'U'"):
        eigh_stable(torch.eye(3), uplo="upper")


def test_the_gradient_for_the_upper_triangle_is_torchs_symmetrised():
    a = _symmetric(5, batch=3, seed=1)
    weights = torch.randn(3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    reference = a.clone().requires_grad_()
    (torch.linalg.eigh(reference, UPLO="U")[1] * weights).sum().backward()
    stable = a.clone().requires_grad_()
    (eigh_stable(stable, taylor_order=None, uplo="U")[1] * weights).sum().backward()
    g = reference.grad
    torch.testing.assert_close(stable.grad, (g + g.mT) / 2, rtol=0, atol=1e-10)


class PrincipalProjection(nn.Module):
    """Projects the features onto the eigenvectors of their covariance, given by its upper triangle, and reads
    the coordinates with a linear layer: the output depends on the eigenvectors' signs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(5, 3).double()

    def forward(self, x):  # x: (batch, points, 5)
        centred = x - x.mean(1, keepdim=True)
        covariance = (centred.mT @ centred / x.shape[1]).triu()  # only the triangle eigh reads
        _, vectors = torch.linalg.eigh(covariance + 1e-3 * torch.eye(5, dtype=x.dtype), UPLO="U")
        return self.fc(centred @ vectors)  # per point: a mean over the points would cancel (centred)


def _projection_input() -> torch.Tensor:
    return torch.randn(4, 32, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def test_a_transformed_sign_dependent_model_computes_what_the_model_computes():
    x = _projection_input()
    model = PrincipalProjection()
    covariance = ((x - x.mean(1, keepdim=True)).mT @ (x - x.mean(1, keepdim=True)) / 32).triu()
    assert _signs_differ(covariance + 1e-3 * torch.eye(5, dtype=x.dtype))
    gm = orthofx.transform(model, "svd", example_inputs=(x,))
    assert any("eigh" in str(node.target) and "stable" in str(node.target) for node in gm.graph.nodes)
    for mode in ("train", "eval"):
        getattr(gm, mode)(), getattr(model, mode)()
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=1e-12)
    frozen = orthofx.freeze(gm)
    torch.testing.assert_close(frozen(x), model.eval()(x), rtol=0, atol=1e-12)


def test_the_upper_triangle_survives_compile_and_export(tmp_path):
    x = _projection_input()
    model = PrincipalProjection().eval()
    gm = orthofx.transform(model, "svd", example_inputs=(x,)).eval()
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-12)
    program = torch.export.export(gm, (x,))
    torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=1e-12)
