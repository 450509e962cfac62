"""``torch.nn.utils.prune`` applied to a site of orthofx's optimizer hooks after ``orthofx.transform`` (session 43).

Pruning makes ``layer.weight`` a tensor computed from ``weight_orig`` and a mask, and the optimizer steps
``weight_orig``. The Riemannian hook saw no gradient on ``weight`` and skipped the site: after three SGD steps the
trained matrix was 0.017 off the Stiefel manifold (1.8e-7 unpruned), silently; ``attach`` after pruning said the
optimizer did not hold the weight (it held ``weight_orig``). Now both raise an orthofx error with the undo, and after
``prune.remove`` training keeps the weight orthonormal (checked against ``W^T W = I`` in float64).
"""

import pytest
import torch
import torch.nn.utils.prune as prune

import orthofx
from orthofx.errors import OrthofxError


def _isometric_mlp():
    torch.manual_seed(0)
    model = orthofx.models.get("deep_mlp", depth=4, width=16)
    x = orthofx.models.example_input("deep_mlp")
    return orthofx.transform(model, "isometric", example_inputs=(x,)), x


def _steps(gm, optimizer, x, count=3):
    for _ in range(count):
        optimizer.zero_grad()
        (gm(x).pow(2).mean() + orthofx.penalty(gm)).backward()
        optimizer.step()


def _stiefel_defect(weight):
    w = weight.detach().double()
    return (w.T @ w - torch.eye(w.shape[1], dtype=torch.float64)).abs().max().item()


def test_pruning_a_riemannian_site_after_attach_is_refused_at_the_step():
    gm, x = _isometric_mlp()
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    orthofx.attach(optimizer, gm)
    layer = gm.get_submodule("layers.2")
    prune.l1_unstructured(layer, "weight", 0.3)
    with pytest.raises(OrthofxError, match=r"layers\.2.*prune\.remove\(layer, 'weight'\)"):
        _steps(gm, optimizer, x, count=1)
    prune.remove(layer, "weight")  # the undo the message gives: training goes on, on the manifold
    _steps(gm, optimizer, x)
    assert _stiefel_defect(layer.weight) < 1e-5


def test_attach_after_pruning_names_the_pruning():
    gm, x = _isometric_mlp()
    prune.l1_unstructured(gm.get_submodule("layers.2"), "weight", 0.3)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    with pytest.raises(OrthofxError, match=r"layers\.2.*L1Unstructured.*prune\.remove") as caught:
        orthofx.attach(optimizer, gm)
    assert "not optimised by this optimizer" not in str(caught.value)


def test_pruning_a_nog_olr_site_after_attach_is_refused_at_the_step():
    torch.manual_seed(0)
    model = orthofx.models.get("gcp_cnn", width=8)
    x = orthofx.models.example_input("gcp_cnn")
    gm = orthofx.transform(model, "svd", example_inputs=(x,))
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    handle = orthofx.attach(optimizer, gm)
    sites = sorted({hook.site for hook in handle.hooks if type(hook).__name__ in ("NearestOrthogonalGradient",
                                                                                   "OptimalLearningRate")})
    assert sites, handle.hooks
    prune.l1_unstructured(gm.get_submodule(sites[0]), "weight", 0.3)
    with pytest.raises(OrthofxError, match=rf"site '{sites[0]}'.*prune\.remove"):
        optimizer.zero_grad()
        (gm(x).float().pow(2).mean() + orthofx.penalty(gm)).backward()
        optimizer.step()


@pytest.mark.parametrize("prune_first", [True, False], ids=["pruned-then-attach", "attach-then-pruned"])
def test_a_frozen_pruned_site_is_skipped_as_any_frozen_weight(prune_first):
    """A review found the refusal also hitting a frozen layer that nothing trains (the parent skipped it)."""
    gm, x = _isometric_mlp()
    frozen = gm.get_submodule("layers.2")
    frozen.weight.requires_grad_(False)
    before = frozen.weight.detach().clone()
    if prune_first:
        prune.l1_unstructured(frozen, "weight", 0.3)
    optimizer = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.1)
    orthofx.attach(optimizer, gm)
    if not prune_first:
        prune.l1_unstructured(frozen, "weight", 0.3)
    _steps(gm, optimizer, x)
    assert torch.equal(frozen.weight_orig.detach(), before)  # nothing stepped it
    assert _stiefel_defect(gm.get_submodule("layers.4").weight) < 1e-5  # the trainable sites stay orthonormal
