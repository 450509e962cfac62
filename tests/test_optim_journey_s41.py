"""Two leftovers of the fine-tuning journey (session 41), both about a hooked weight that leaves or joins the
attached optimizer after ``orthofx.attach``.

* OLR on a weight frozen at ``attach`` (its hook skipped), unfrozen and added back in one param group with its bias:
  the hook's setup split the group inside ``optimizer.step()`` (3 groups became 4), so a checkpoint saved after that
  step failed to load (torch: "different number of parameter groups") into the optimizer the same script builds,
  and with a StepLR created after ``add_param_group`` the step was refused with the advice to create the scheduler
  after ``attach``, which it was. Now refused before anything changes, with the message of the regrouped case.
* A Riemannian weight trainable at ``attach``, later frozen and taken out of the attached optimizer's groups, then
  unfrozen into a second optimizer: that one stepped it as a plain parameter, silently (5e-2 off the manifold after
  5 SGD steps with momentum, where the attached one steps first). Now the attached optimizer's step warns once.

References: P4's NOG + OLR (``G -> U V^T``; ``eta* = a b / (a c + 2 b^2)``) and P1's Riemannian step
(``W <- polar(W - lr P_W(G))``), in float64, written here or in tests/references.py.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import orthofx
from orthofx.passes import riemannian
from references import polar64, tangent64
from tests.test_finetune_journey_s40 import _STIEFEL, _PreSvdPair, _batch

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices (tests/conftest.py)

_OLR = {"rules": [{"match": {"feeds": ["linalg.eigvalsh"]}, "apply": "pre_svd", "with": {"nog": True, "olr": True}}]}
_X = torch.randn(32, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _eta64(w: torch.Tensor, g: torch.Tensor, base: float) -> float:
    """P4's OLR: ``eta* = a b / (a c + 2 b^2)`` of the flattened weight and gradient, used when in (0, base)."""
    w, g = w.reshape(-1).to(torch.float64), g.reshape(-1).to(torch.float64)
    a, b, c = (w @ w).item(), (g @ w).item(), (g @ g).item()
    eta = a * b / (a * c + 2 * b * b)
    return eta if 0 < eta < base else base


def _olr_frozen_a(frozen: bool = True):
    """The Pre-SVD pair with NOG + OLR, layer 'a' frozen at attach (both hooks skipped) unless ``frozen`` is False."""
    torch.manual_seed(0)
    model = _PreSvdPair().double()
    model.a.requires_grad_(not frozen)
    gm = orthofx.transform(model, _OLR, example_inputs=(_X,))
    optimizer = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.4)
    handle = orthofx.attach(optimizer, gm)
    return gm, gm.get_submodule("a"), optimizer, handle


def _groups(optimizer) -> list[list[int]]:
    return [[id(p) for p in group["params"]] for group in optimizer.param_groups]


@pytest.mark.parametrize("scheduler", [False, True])
def test_olr_weight_frozen_at_attach_added_back_with_its_bias_is_refused_before_anything_changes(scheduler):
    """Unfrozen and added back as ``add_param_group({'params': [weight, bias]})``: OLR's setup, run at the step that
    activates the skipped hook, split the group inside ``optimizer.step()``. Now that step raises the regrouped
    case's error (word for word), before any group, weight or lr changes; with a StepLR created after
    ``add_param_group`` too (it was told to create the scheduler after attach)."""
    gm, a, optimizer, handle = _olr_frozen_a()
    assert [type(h).__name__ for h in handle.skipped] == ["NearestOrthogonalGradient", "OptimalLearningRate"]
    gm(_X).backward()
    optimizer.step()
    a.requires_grad_(True)
    optimizer.add_param_group({"params": [a.weight, a.bias], "lr": 0.2})
    if scheduler:
        torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5)
    optimizer.zero_grad()
    gm(_X).backward()
    groups = _groups(optimizer)
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    with pytest.raises(orthofx.ArgumentError, match=r"site 'a' .*1 other parameter.*group of its own") as raised:
        optimizer.step()
    assert _groups(optimizer) == groups  # no split (it made 4 groups of 3)
    assert [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] == settings
    assert all(torch.equal(p, before[n]) for n, p in gm.named_parameters())
    assert len(handle.skipped) == 2  # still waiting for a group it may take

    # the same words as a weight trainable at attach, regrouped with its bias afterwards (_adopt_group)
    gm, a, optimizer, _ = _olr_frozen_a(frozen=False)
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if p is not a.weight and p is not a.bias]
    optimizer.add_param_group({"params": [a.weight, a.bias], "lr": 0.2})
    gm(_X).backward()
    with pytest.raises(orthofx.ArgumentError) as regrouped:
        optimizer.step()
    assert str(raised.value) == str(regrouped.value)


def test_olr_weight_added_back_alone_trains_by_p4_with_steplr_and_a_checkpoint_round_trip():
    """The advice followed (the weight in a group of its own, the bias in another, a StepLR created after): every
    step is P4's NOG + OLR step from the scheduled base lr, with SGD momentum; optimizer and scheduler state saved
    after two steps load into the optimizer the same script builds, whose next step is the original's third, bit
    for bit."""
    def build():
        gm, a, optimizer, _ = _olr_frozen_a()
        gm(_X).backward()
        optimizer.step()
        a.requires_grad_(True)
        optimizer.add_param_group({"params": [a.weight], "lr": 0.8, "momentum": 0.9})
        optimizer.add_param_group({"params": [a.bias], "lr": 0.2})
        return gm, a, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5)

    def step(gm, optimizer):
        optimizer.zero_grad()
        gm(_X).backward()
        optimizer.step()

    gm, a, optimizer, scheduler = build()
    groups = len(optimizer.param_groups)
    buf = None
    for index in range(3):
        optimizer.zero_grad()
        gm(_X).backward()  # the gradients step() recomputes, read first
        w, g = a.weight.detach().clone(), a.weight.grad.detach().clone()
        bias, grad = a.bias.detach().clone(), a.bias.grad.detach().clone()
        step(gm, optimizer)
        base = 0.8 * 0.5 ** index
        polar = polar64(g)
        eta = _eta64(w, polar, base)
        assert 0 < eta < base  # eta* is used, not the base lr
        buf = polar if buf is None else 0.9 * buf + polar
        torch.testing.assert_close(a.weight.detach(), w - eta * buf, atol=1e-12, rtol=0, msg=f"step {index}")
        torch.testing.assert_close(a.bias.detach(), bias - 0.2 * 0.5 ** index * grad, atol=1e-12, rtol=0)
        group = next(g for g in optimizer.param_groups if any(p is a.weight for p in g["params"]))
        assert group["lr"] == pytest.approx(base, rel=1e-12) and group["orthofx_olr_lr"] == pytest.approx(eta)
        scheduler.step()
        if index == 1:
            # deep copies, as torch.save makes: state_dict() holds the live momentum buffers
            saved = copy.deepcopy((gm.state_dict(), optimizer.state_dict(), scheduler.state_dict()))
    assert len(optimizer.param_groups) == groups
    third = [p.detach().clone() for p in gm.parameters()]

    # resume: the script up to the checkpoint's load (the weight frozen at attach again), then the third step
    model_state, optimizer_state, scheduler_state = saved
    gm, a, optimizer, scheduler = build()
    gm.load_state_dict(model_state)
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    step(gm, optimizer)
    assert all(torch.equal(p, q) for p, q in zip(gm.parameters(), third))
    assert len(optimizer.param_groups) == groups and scheduler.last_epoch == 2


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 5, bias=False), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _orthonormality(w: torch.Tensor) -> float:
    w = w.detach().to(torch.float64)
    return torch.linalg.matrix_norm(w.T @ w - torch.eye(w.shape[1], dtype=torch.float64)).item()


def _dropped_backbone():
    """Layer '0' trained on the manifold by the attached SGD for a step, then frozen and taken out of its groups."""
    gm = orthofx.transform(_mlp(), _STIEFEL)
    attached = torch.optim.SGD(gm.parameters(), lr=0.1)
    orthofx.attach(attached, gm)
    x, y = _batch(0)
    (gm(x) - y).square().mean().backward()
    attached.step()
    backbone = gm.get_submodule("0").weight
    backbone.requires_grad_(False)
    backbone.grad = None
    for group in attached.param_groups:
        group["params"] = [p for p in group["params"] if p is not backbone]
    return gm, backbone, attached


def _train(gm, optimizers, index):
    # here, not imported: the warnings tested name the user's optimizer.step() line, this file's
    for optimizer in optimizers:
        optimizer.zero_grad()
    x, y = _batch(index)
    (gm(x) - y).square().mean().backward()
    for optimizer in optimizers:
        optimizer.step()


@pytest.mark.parametrize("attached_first", [True, False])
def test_riemannian_weight_dropped_then_stepped_by_another_optimizer_warns_once(attached_first):
    """The dropped weight unfrozen into an optimizer of its own (not attached): it trained as a plain parameter with
    no word. Where the attached optimizer steps first, the weight ends each iteration off the manifold (measured
    here, > 1e-2); where it steps last, its hook retracts the other optimizer's raw step back (on the manifold, but
    not P1's step). Either way the first step of the two warns, once, naming the site and the fix (the attached
    optimizer's: the weight left its groups; the other's, at its first step: no attached optimizer holds the weight);
    attaching the other optimizer instead is refused (the model's other hooked weights are in the first)."""
    gm, backbone, attached = _dropped_backbone()
    backbone.requires_grad_(True)
    other = torch.optim.SGD([backbone], lr=0.5, momentum=0.9)
    order = [attached, other] if attached_first else [other, attached]
    expected = (r"site '0' \(rule 'riemannian\[0\]'\): the weight\(s\) \['weight'\] were in this SGD .*taken out "
                r"of its param groups.*add_param_group" if attached_first else
                r"SGD.step\(\) updated the weight\(s\) of site '0' \(rule 'riemannian\[0\]'\).*no optimizer "
                r"attached to this model holds them any more.*add_param_group")
    with pytest.warns(orthofx.OrthofxWarning, match=expected) as record:
        _train(gm, order, 1)
    ours = [w for w in record if issubclass(w.category, orthofx.OrthofxWarning)]
    assert len(ours) == 1 and ours[0].filename == __file__  # the user's step() line
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per weight
        for index in range(2, 6):
            _train(gm, order, index)
    if attached_first:
        assert _orthonormality(backbone) > 1e-2
    with pytest.raises(orthofx.ArgumentError, match=r"site '2'.*not optimised by this optimizer"):
        orthofx.attach(other, gm)


def test_riemannian_weight_given_back_to_the_attached_optimizer_takes_p1_steps_without_warning():
    """The advice: the weight back in the attached optimizer, in a group of its own lr; each step is P1's
    ``polar(W - lr P_W(G))`` (float64 reference) and nothing warns. A weight the step leaves unmoved while the
    optimizer holds it (lr 0) or that stays frozen with a stale gradient (``zero_grad(set_to_none=False)``) is
    not warned about; a step in which every weight moved does not look the weights up at all."""
    gm, backbone, attached = _dropped_backbone()
    backbone.requires_grad_(True)
    attached.add_param_group({"params": [backbone], "lr": 0.3})
    for index in (1, 2):
        attached.zero_grad()
        x, y = _batch(index)
        (gm(x) - y).square().mean().backward()
        w, g = backbone.detach().clone(), backbone.grad.detach().clone()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            attached.step()
        torch.testing.assert_close(backbone.detach(), polar64(w - 0.3 * tangent64(w, g)), atol=1e-12, rtol=0)
        assert _orthonormality(backbone) < 1e-12

    attached.param_groups[-1]["lr"] = 0.0  # held, unmoved
    frozen = gm.get_submodule("2").weight  # frozen and dropped, keeping its gradient
    frozen.requires_grad_(False)
    for group in attached.param_groups:
        group["params"] = [p for p in group["params"] if p is not frozen]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for index in (3, 4):
            attached.zero_grad(set_to_none=False)
            x, y = _batch(index)
            (gm(x) - y).square().mean().backward()
            w = backbone.detach().clone()
            attached.step()
            assert torch.equal(backbone.detach(), w)


def test_a_step_in_which_every_weight_moved_pays_no_lookup(monkeypatch):
    """The check for a weight stepped elsewhere runs only on the path of a step that left a weight unmoved."""
    calls = []
    monkeypatch.setattr(riemannian, "_warn_stepped_elsewhere", lambda *args: calls.append(args))
    gm = orthofx.transform(_mlp(), _STIEFEL)
    attached = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
    orthofx.attach(attached, gm)
    for index in range(3):
        _train(gm, [attached], index)
    assert calls == []
    attached.param_groups[0]["lr"] = 0.0
    attached.param_groups[0]["momentum"] = 0.0
    _train(gm, [attached], 3)
    assert len(calls) == 1


def test_dropped_riemannian_weight_stepped_only_by_another_optimizer_warns():
    """The attached optimizer idle (the weight dropped from it, unfrozen into a second optimizer that alone trains
    it): nothing runs the hook, so only the second optimizer's first step can tell (5 steps: 0.86 off the
    manifold)."""
    gm, backbone, _ = _dropped_backbone()
    backbone.requires_grad_(True)
    other = torch.optim.SGD([backbone], lr=0.5, momentum=0.9)
    with pytest.warns(orthofx.OrthofxWarning, match=r"site '0'"):
        _train(gm, [other], 1)


def test_optimizer_rebuilt_for_a_second_phase_and_not_attached_warns_at_its_first_step():
    """Phase 1 trains with an attached optimizer; phase 2 builds a new optimizer over the same model and forgets
    ``attach``, the first one gone. The model had been attached once, so the "never attached" check stayed quiet
    and the Riemannian weights left the manifold (measured here after 5 steps). Now the new optimizer's first
    step warns once. While the first optimizer is alive and holds the weights (kept to step again), or after
    the fix (attach), nothing is said."""
    import gc

    gm = orthofx.transform(_mlp(), _STIEFEL)
    first = torch.optim.SGD(gm.parameters(), lr=0.1)
    orthofx.attach(first, gm)
    _train(gm, [first], 0)
    kept = torch.optim.SGD(gm.parameters(), lr=0.1)  # the first optimizer still holds the weights: quiet
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(gm, [kept], 1)
    del first, kept
    gc.collect()
    second = torch.optim.SGD(gm.parameters(), lr=0.5, momentum=0.9)
    with pytest.warns(orthofx.OrthofxWarning, match=r"SGD.step\(\) updated the weight\(s\) of site '0'.*no optimizer "
                      r"attached to this model holds them any more.*orthofx.attach\(optimizer, gm\)") as record:
        _train(gm, [second], 2)
    assert len([w for w in record if issubclass(w.category, orthofx.OrthofxWarning)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for index in range(3, 7):
            _train(gm, [second], index)
    assert _orthonormality(gm.get_submodule("0").weight) > 1e-3  # what the warning is about
    fixed = torch.optim.SGD(gm.parameters(), lr=0.5, momentum=0.9)
    orthofx.attach(fixed, gm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(gm, [fixed], 7)
    assert _orthonormality(gm.get_submodule("0").weight) < 1e-5


def test_rebuilt_optimizer_warns_at_its_third_step_while_the_attached_one_is_alive_and_idle():
    """The usual form of the forgotten ``attach``: ``optimizer = Adam(gm.parameters())`` rebinds the name, and the
    attached optimizer is not freed (only the cycle collector frees a torch optimizer; a scheduler keeps it). It
    holds the weights but no longer steps: the new optimizer's third step warns, once. An attached optimizer that
    keeps stepping beside it (both training) is not warned about, nor a model whose attachment was removed."""
    gm = orthofx.transform(_mlp(), _STIEFEL)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    orthofx.attach(optimizer, gm)
    _train(gm, [optimizer], 0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 10)  # keeps the first optimizer alive
    optimizer = torch.optim.Adam(gm.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(gm, [optimizer], 1)
        _train(gm, [optimizer], 2)
    with pytest.warns(orthofx.OrthofxWarning, match=r"Adam.step\(\) updated the weight\(s\) of site '0'.*\(and of 1 "
                      r"other site\(s\)\).*has not stepped in this one's first 3 steps") as record:
        _train(gm, [optimizer], 3)
    assert [w.filename for w in record if issubclass(w.category, orthofx.OrthofxWarning)] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(gm, [optimizer], 4)
    assert scheduler.optimizer is not optimizer


@pytest.mark.parametrize("released", [False, True])
def test_attached_optimizer_stepping_beside_another_or_a_removed_attachment_is_quiet(released):
    gm = orthofx.transform(_mlp(), _STIEFEL)
    attached = torch.optim.SGD(gm.parameters(), lr=0.1)
    handle = orthofx.attach(attached, gm)
    _train(gm, [attached], 0)
    if released:
        handle.remove()  # deliberate (README): no warning, whichever optimizer steps the weights
        del attached, handle
        import gc
        gc.collect()
    other = torch.optim.SGD(gm.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for index in range(1, 6):
            _train(gm, [other] if released else [other, attached], index)


def test_an_optimizer_class_defining_eq_can_be_attached_and_step_beside_attached_models():
    """``mark_attached`` kept optimizers in a WeakSet, which hashes them: an optimizer class defining ``__eq__``
    (a dataclass) raised TypeError from attach, and from torch's step hook when it only stepped beside one."""
    class Comparable(torch.optim.SGD):
        def __eq__(self, other):
            return self is other

    gm = orthofx.transform(_mlp(), _STIEFEL)
    optimizer = Comparable(gm.parameters(), lr=0.1)
    orthofx.attach(optimizer, gm)
    _train(gm, [optimizer], 0)
    other_model = nn.Linear(3, 3)
    beside = Comparable(other_model.parameters(), lr=0.1)
    other_model(torch.randn(2, 3)).sum().backward()
    beside.step()
    assert _orthonormality(gm.get_submodule("0").weight) < 1e-8


def test_a_model_attached_again_after_remove_is_checked_again():
    """``handle.remove()`` marked the model released for good: attached again (the README's remove-then-attach),
    then trained by a rebuilt optimizer without attach, it was never warned about (0.3 off the manifold)."""
    gm = orthofx.transform(_mlp(), _STIEFEL)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    handle = orthofx.attach(optimizer, gm)
    handle.remove()
    orthofx.attach(optimizer, gm)
    _train(gm, [optimizer], 0)
    keep = optimizer  # alive and idle from here
    optimizer = torch.optim.Adam(gm.parameters(), lr=1e-2)
    with pytest.warns(orthofx.OrthofxWarning, match=r"Adam.step\(\).*has not stepped in this one's first 3 steps"):
        for index in range(1, 4):
            _train(gm, [optimizer], index)
    assert keep is not optimizer
