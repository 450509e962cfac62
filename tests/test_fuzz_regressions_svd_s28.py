"""Regressions found by fuzzing the SVD passes in session 28 (``svd_conditioning``, ``pre_svd``; each failed before
its fix).

* A Pre-SVD layer's Change named the decompositions it feeds by node name over the sites of *both* graphs of a
  two-mode model (a forward that branches on ``self.training``): both graphs hold a node ``linalg_eigh``, and a
  layer feeding the training graph's eigh was reported as feeding the eval graph's (``dbn_cnn``'s conv1 too).
* The same walk passed through an orthofx layer an earlier rule had put in place (an orthogonal conv), which
  planning stops at: the Change listed a decomposition the layer reaches only through another conv.
* Graphs captured with torch.export keep some views as ATen overloads (``aten.swapaxes``, ``aten.numpy_T`` for
  ``.T``, a full ``aten.slice`` before the unsqueeze of ``L[:, None]``): ``newton_schulz`` (and
  ``to_newton_schulz``, hence ONNX export) recognised none of those ``V diag(f(lambda)) V^T`` patterns.
* ``newton_schulz`` on an SVD of a non-square data matrix, in a graph whose nodes carry shapes (export capture),
  rewrote the site anyway and the transform failed on the example inputs, instead of applying ``fallback``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthofx
import orthofx.passes.pre_svd  # noqa: F401  (registers the pass)
import orthofx.passes.svd_conditioning as svd_conditioning


def _changes(gm, pass_name):
    return [c for c in orthofx.manifest_of(gm).changes if c.pass_name == pass_name]


def _spd(n, batch=(), seed=0, kappa=5.0):
    """A float64 symmetric positive definite matrix with eigenvalues spread over [1, kappa]."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(*batch, n, n, generator=g, dtype=torch.float64))
    lam = torch.linspace(1.0, kappa, n, dtype=torch.float64)
    return (Q * lam) @ Q.mT


# ----------------------------------------------------------------------------------------- pre_svd: feeds


class ModeWhiten(nn.Module):
    """Training: the eigh of the batch covariance of ``layer``'s output (``layer`` feeds it); eval: the eigh of a
    buffer, which ``layer`` does not feed (its output is only whitened by the result)."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(5, 3)
        self.register_buffer("running", 2.0 * torch.eye(3))

    def forward(self, x):
        h = self.layer(x)
        cov = h.T @ h / h.shape[0] + 0.1 * torch.eye(3) if self.training else self.running
        L, V = torch.linalg.eigh(cov)
        return h @ ((V * L.rsqrt().unsqueeze(0)) @ V.T)


@pytest.mark.parametrize("training,expected", [(True, ["linalg.eigh"]), (False, ["linalg.eigh@train"])])
def test_pre_svd_feeds_names_the_site_of_the_graph_the_layer_feeds(training, expected):
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    policy = {"rules": [{"match": {"feeds": "linalg.eigh"}, "apply": "pre_svd"}]}
    gm = orthofx.transform(ModeWhiten().train(training), policy, example_inputs=(x,))
    # the two graphs' decompositions are two sites, and both graphs name their node linalg_eigh
    sites = [s for s in orthofx.manifest_of(gm).plan.sites if s.kind == "function"]
    assert sorted(s.name for s in sites) == sorted(["linalg.eigh", "linalg.eigh@" + ("eval" if training else "train")])
    assert {s.node for s in sites} == {"linalg_eigh"}
    (change,) = _changes(gm, "pre_svd")
    assert change.before["feeds"] == expected
    assert change.what.startswith(f"Pre-SVD layer feeding {expected[0]}:")


class ThroughOrthogonal(nn.Module):
    """conv1 feeds an eigvalsh directly and an eigh only through conv2: conv1 is the Pre-SVD layer of the eigvalsh
    alone (conv2 is the eigh's)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        a = self.conv1(x)
        b = self.conv2(a)
        fa, fb = a.transpose(0, 1).flatten(1), b.transpose(0, 1).flatten(1)
        eye = torch.eye(4, device=x.device)
        la = torch.linalg.eigvalsh(fa @ fa.T / fa.shape[1] + 1e-2 * eye)
        lb = torch.linalg.eigh(fb @ fb.T / fb.shape[1] + 1e-2 * eye)[0]
        return la.sum() + lb.sum()


@pytest.mark.parametrize("orthogonal_first", [False, True])
def test_pre_svd_feeds_stops_at_a_layer_an_earlier_rule_replaced(orthogonal_first):
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    rules = [{"match": {"feeds": ["linalg.eigvalsh", "linalg.eigh"]}, "apply": "pre_svd", "with": {"nog": False}}]
    if orthogonal_first:  # runs first: conv2 is an orthogonal conv (an orthofx layer) when pre_svd walks the graph
        rules.insert(0, {"match": {"name": "conv2"}, "apply": "orthogonal_conv"})
    gm = orthofx.transform(ThroughOrthogonal(), {"rules": rules}, example_inputs=(x,))
    if orthogonal_first:
        assert type(gm.get_submodule("conv2")).__name__ != "Conv2d"
    changes = {c.site: c for c in _changes(gm, "pre_svd")}
    assert changes["conv1"].before["feeds"] == ["linalg.eigvalsh"]
    if not orthogonal_first:
        assert changes["conv2"].before["feeds"] == ["linalg.eigh"]


# ----------------------------------------------------------------------------- newton_schulz: export capture


class ExportViews(nn.Module):
    """Three matrix powers written with views torch.export keeps as ATen overloads: ``.T`` of a 2-D matrix,
    ``swapaxes``, and ``L[:, None]`` (a full slice, then an unsqueeze)."""

    def forward(self, a):
        L, V = torch.linalg.eigh(a[0])
        two_d = V @ torch.diag(L.sqrt()) @ V.T
        L, V = torch.linalg.eigh(a)
        swapped = V @ torch.diag_embed(L.rsqrt()) @ V.swapaxes(-1, -2)
        L, V = torch.linalg.eigh(a)
        sliced = (L.sqrt()[:, None, :] * V) @ V.mT
        return two_d, swapped, sliced


def _power64(a, p):
    """``a^p`` of symmetric positive definite float64 matrices by torch.linalg.eigh (the reference)."""
    L, V = torch.linalg.eigh(a)
    return (V * L.pow(p).unsqueeze(-2)) @ V.mT


def test_newton_schulz_recognises_the_views_of_an_export_captured_graph():
    a = _spd(4, batch=(3,), seed=1)
    policy = {"capture": {"mode": "export"},
              "rules": [{"match": {"op": "linalg.eigh"}, "apply": "svd_conditioning",
                         "with": {"method": "newton_schulz", "iterations": 30, "fallback": "keep"}}]}
    gm = orthofx.transform(ExportViews(), policy, example_inputs=(a,))
    assert orthofx.manifest_of(gm).capture.mode == "export"
    statuses = [c.status for c in _changes(gm, "svd_conditioning")]
    assert len(statuses) == 3 and all(s.startswith("newton_schulz") for s in statuses), statuses
    assert not any(svd_conditioning.decomposition_op(n) for n in gm.graph.nodes)
    two_d, swapped, sliced = gm(a)
    torch.testing.assert_close(two_d, _power64(a[0], 0.5), atol=1e-10, rtol=0)
    torch.testing.assert_close(swapped, _power64(a, -0.5), atol=1e-10, rtol=0)
    torch.testing.assert_close(sliced, _power64(a, 0.5), atol=1e-10, rtol=0)


def test_to_newton_schulz_rewrites_an_export_captured_model():
    """The ONNX route: the stable form of an export-captured model, rewritten afterwards."""
    a = _spd(4, batch=(3,), seed=2)
    policy = {"capture": {"mode": "export"}, "rules": [{"match": {"op": "linalg.eigh"}, "apply": "svd_conditioning"}]}
    gm = orthofx.transform(ExportViews(), policy, example_inputs=(a,))
    outcome = svd_conditioning.to_newton_schulz(gm, iterations=30)
    assert sorted(outcome.values()) == ["replaced"] * 3, outcome
    for got, p, x in zip(gm(a), (0.5, -0.5, 0.5), (a[0], a, a)):
        torch.testing.assert_close(got, _power64(x, p), atol=1e-10, rtol=0)


class DataSvdSqrt(nn.Module):
    """``U diag(S^(1/2)) Vh`` of a non-square data matrix: no power of a square matrix."""

    def forward(self, x):
        U, S, Vh = torch.linalg.svd(x, full_matrices=False)
        return U @ torch.diag_embed(S.sqrt()) @ Vh


def _svd_policy(fallback):
    return {"capture": {"mode": "export"},
            "rules": [{"match": {"op": "linalg.svd"}, "apply": "svd_conditioning",
                       "with": {"method": "newton_schulz", "fallback": fallback}}]}


def test_newton_schulz_on_a_non_square_svd_with_known_shapes_applies_the_fallback():
    x = torch.randn(2, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    gm = orthofx.transform(DataSvdSqrt(), _svd_policy("stable"), example_inputs=(x,))
    (change,) = _changes(gm, "svd_conditioning")
    assert change.status.startswith("stable svd (taylor")
    assert "newton_schulz skipped: the decomposed matrix has shape" in change.status and "not square" in change.status
    U, S, Vh = torch.linalg.svd(x, full_matrices=False)
    torch.testing.assert_close(gm(x), U @ torch.diag_embed(S.sqrt()) @ Vh, atol=1e-12, rtol=0)
    with pytest.raises(orthofx.errors.TransformError, match=r"method newton_schulz cannot be applied: the decomposed "
                                                            r"matrix has shape .*not square.*Use method taylor"):
        orthofx.transform(DataSvdSqrt(), _svd_policy("error"), example_inputs=(x,))


@pytest.mark.parametrize("training", [True, False])
def test_to_newton_schulz_and_plain_decompositions_rewrite_both_graphs_of_a_two_mode_model(training):
    """A forward branching on ``self.training`` has one graph per mode: ``to_newton_schulz`` rewrote the current
    one alone and reported it done, and the other mode still ran its eigh (the same for ``plain_decompositions``)."""
    x = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    policy = {"rules": [{"match": {"op": "linalg.eigh"}, "apply": "svd_conditioning"}]}
    torch.manual_seed(0)  # the covariance's conditioning sets how far 30 Newton-Schulz steps get
    model = ModeWhiten().double().train(training)
    plain = orthofx.transform(model, policy, example_inputs=(x,))
    assert svd_conditioning.plain_decompositions(plain) == 2
    for mode in (True, False):
        stand_ins = [n for n in plain.graph_for(mode).nodes if svd_conditioning.decomposition_op(n)]
        assert len(stand_ins) == 1 and stand_ins[0].kwargs["plain"] is True
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    other = "eval" if training else "train"
    assert svd_conditioning.to_newton_schulz(gm, iterations=30) == {"stable_eigh": "replaced",
                                                                     f"stable_eigh@{other}": "replaced"}
    assert gm.training == training  # the mode is left as it was
    for mode in (True, False):
        assert not any(svd_conditioning.decomposition_op(n) for n in gm.graph_for(mode).nodes)
        gm.train(mode)
        model.train(mode)
        h = model.layer(x)
        # the model adds the float32 constant 0.1 * I (0.1 rounded to float32)
        cov = h.T @ h / 8 + (0.1 * torch.eye(3)).double() if mode else model.running
        torch.testing.assert_close(gm(x), h @ _power64(cov, -0.5), atol=1e-10, rtol=0)
