"""Regressions found by the session-32 fuzz round on training loops: every preset (lorth, orthogonal, convnorm,
jacobian, isometric, svd) on small built-in models (deep_mlp, deep_linear, small_cnn, resnet18, gcp_cnn, dbn_cnn),
trained with SGD (momentum, nesterov, weight decay, maximize, fused, foreach), Adam (amsgrad, fused, tensor lr),
AdamW, NAdam, RAdam, Adamax, Adadelta, Adagrad, RMSprop (centered), Rprop, ASGD, Adafactor, Muon and LBFGS (with
and without line search), with and without ``orthofx.attach``; param groups with other lrs, LR schedulers
(StepLR, OneCycleLR, CosineAnnealingLR, ReduceLROnPlateau, created before or after attach), gradient accumulation
with ``zero_grad(set_to_none=False)`` and ``clip_grad_norm_``, bfloat16 autocast with ``GradScaler`` (fused and
not, with an inf step); checkpoint / resume mid-training through ``state_dict`` (a bare model, a wrapper holding
the transformed part and an EMA copy) and through ``.pt`` export + ``orthofx.load``; unfreezing with
``add_param_group``; ``report``, ``freeze``, ``export`` and eval-mode forwards between steps and between backward
and step; EMA / SWA copies; variable batch and image sizes; misuse (attach twice, an optimizer without the hooked
weights, a step before backward). Drivers: ``.snap/s32/fuzz4/`` (``driver_*.py``; ``r_*.py`` are the
reductions). What held: resumed runs match uninterrupted ones bitwise, Stiefel weights stay orthonormal to 3e-7
over 100 steps of every optimizer above, orthogonal convs keep all singular values 1 (float64 reference), nothing
between steps changes the trajectory (condition monitors record eval forwards too, as documented), the user's
model and inputs stay bitwise as they were, and misuse raises ``ArgumentError`` naming the site and the fix.

Findings:

- Fixed. The warning ``attach`` gives for LBFGS with ``max_iter > 1`` advised "Build LBFGS with max_iter=1 (with
  line_search_fn='strong_wolfe' it converged in tests)". Followed as written, ``LBFGS(params, max_iter=1,
  line_search_fn='strong_wolfe')`` stops moving after its first step: loss 2.2906 on every one of 20 steps
  (isometric deep_mlp; plain torch LBFGS without orthofx stalls the same way). Root cause: torch's ``max_eval``
  defaults to ``max_iter * 5 // 4`` = 1 there, which leaves ``_strong_wolfe`` no evaluation (it returns step 0);
  the advice in ``passes/riemannian.py:StiefelHook.attach_warning`` left ``max_eval`` out. Expected: advice that
  trains. The message now says to give ``max_eval`` with strong Wolfe (``max_eval=10``: the same run reaches 1e-4).
- Fixed. Forgetting ``orthofx.attach`` was silent: a model whose policy records optimizer hooks (the
  ``isometric`` preset's Riemannian updates, the ``svd`` preset's NOG / OLR) trained with a plain
  ``optimizer.step()`` as unconstrained parameters, and nothing said so: the "Stiefel" weights of ``isometric``
  deep_mlp were 0.2 off orthonormal after 5 SGD steps, and ``report`` showed them with sigma in [0.84, 1.26]
  without a word about the missing attach. Same root cause, second symptom: ``copy.deepcopy`` (or ``torch.save``)
  of an attached optimizer, with a deep copy of the model, gives an optimizer without the hooks (torch's
  ``Optimizer.__getstate__`` keeps only defaults, state and param groups; attach's instance ``step`` wrapper and
  registry are dropped): stepping the copy drove the copied Stiefel weights 1.4e-2 off after one step, silently.
  Root cause: the hooks run only from ``optim.py:attach``, and nothing watched optimizers stepping the hooked
  weights without it. Expected: a warning naming the site and ``orthofx.attach(optimizer, gm)``. Fixed:
  ``passes/base.py:watch_hooked_weights`` registers a transformed model's hooked parameters (weakly, by identity)
  from ``transform.py:_rewrite`` (transform and load) and from ``penalty.py:_weighted_terms`` (which the training
  loop's ``orthofx.penalty`` reaches, deep copies included), with a global optimizer step post hook
  (``_warn_unattached_step``) that, at each optimizer's first step only, gives one ``OrthofxWarning`` per model
  whose hooked weight it updated while no optimizer was ever attached to that model (``optim.py:attach`` calls
  ``mark_attached``): an attached model, one detached by ``handle.remove()``, the inner optimizer of a wrapper or
  ZeRO's local optimizer, and an optimizer holding none of the hooked weights do not warn. Not covered: a copy of a
  model that ``orthofx.penalty`` never sees (``copy.deepcopy(gm)`` trained without the penalty), and an optimizer
  whose first step comes before the model's first ``penalty``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import orthofx
import orthofx.models as models


def _mlp_task(seed: int = 0):
    torch.manual_seed(seed)
    model = models.get("deep_mlp", depth=4, width=16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 64, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    return model, x, y


def _stiefel_defect(gm) -> float:
    """max |W^T W - I| (or W W^T for a wide W) over the Riemannian-hooked weights, in float64."""
    worst = 0.0
    for hook in gm.meta["orthofx"].optimizer_hooks:
        w = getattr(gm.get_submodule(hook.site), hook.parameter).detach().double()
        w = w.reshape(w.shape[0], -1)
        gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
        worst = max(worst, (gram - torch.eye(gram.shape[0], dtype=torch.float64)).abs().max().item())
    return worst


def _lbfgs_losses(model, x, y, steps: int, attach: bool, **lbfgs) -> list[float]:
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1.0, **lbfgs)
    if attach:
        orthofx.attach(optimizer, model)
    losses = []
    for _ in range(steps):
        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        losses.append(optimizer.step(closure).item())
    return losses


def test_lbfgs_warning_advice_names_max_eval_and_the_advised_optimizer_trains():
    model, x, y = _mlp_task()
    gm = orthofx.transform(model, "isometric", example_inputs=(x[:2],))
    with pytest.warns(orthofx.OrthofxWarning, match="LBFGS with max_iter=5") as caught:
        orthofx.attach(torch.optim.LBFGS(gm.parameters(), max_iter=5), gm)
    message = str(caught[0].message)
    assert "max_iter=1" in message and "line_search_fn='strong_wolfe'" in message
    assert "max_eval=10" in message  # was missing: the advice as written stalls
    # the reference: plain torch, no orthofx. Strong Wolfe with max_iter=1 and the default max_eval stalls from the
    # second step on (the loss repeats exactly), with max_eval=10 it trains
    plain, _, _ = _mlp_task()
    stalled = _lbfgs_losses(plain, x, y, 8, False, max_iter=1, line_search_fn="strong_wolfe")
    assert stalled[1] == stalled[-1]
    # the advice followed on the transformed model: trains and stays on the manifold
    gm = orthofx.transform(_mlp_task()[0], "isometric", example_inputs=(x[:2],))
    with warnings.catch_warnings():
        warnings.simplefilter("error", orthofx.OrthofxWarning)  # the advised optimizer draws no warning
        losses = _lbfgs_losses(gm, x, y, 12, True, max_iter=1, max_eval=10, line_search_fn="strong_wolfe")
    assert losses[-1] < 0.1 * losses[0]
    assert _stiefel_defect(gm) < 1e-5


def test_stepping_hooked_weights_without_attach_warns():
    model, x, y = _mlp_task()
    gm = orthofx.transform(model, "isometric", example_inputs=(x[:2],))
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)  # no orthofx.attach: the user forgot it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(gm(x), y).backward()
            optimizer.step()
    assert _stiefel_defect(gm) > 1e-2  # the harm: the weights left the manifold (float64 reference)
    said = [str(w.message) for w in caught if issubclass(w.category, orthofx.OrthofxWarning)]
    assert len(said) == 1, said  # once: at the optimizer's first step, not at every step
    assert [w.filename for w in caught if issubclass(w.category, orthofx.OrthofxWarning)] == [__file__]
    assert said[0].startswith("SGD.step() updated the weight(s) of site 'layers.2' (rule 'stiefel-square-linears')")
    assert "orthofx.attach(optimizer, gm)" in said[0]
    # the svd preset's NOG / OLR weight, stepped without attach: warned too
    torch.manual_seed(0)
    cnn = models.get("gcp_cnn", width=4, dim=4)
    images = torch.randn(4, 1, 8, 8)
    gm = orthofx.transform(cnn, "svd", example_inputs=(images[:2],))
    optimizer = torch.optim.Adam(gm.parameters(), lr=1e-2)
    gm(images).sum().backward()
    with pytest.warns(orthofx.OrthofxWarning, match="Adam.step\\(\\) updated the weight\\(s\\) of site 'conv_last'"):
        optimizer.step()


def _step_quietly(model, optimizer, x, y):
    """One training step (the README's loop) that must give no OrthofxWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", orthofx.OrthofxWarning)
        optimizer.zero_grad()
        (torch.nn.functional.cross_entropy(model(x), y) + orthofx.penalty(model)).backward()
        optimizer.step()


def test_no_attach_warning_where_the_hooks_run_or_no_hooked_weight_is_stepped():
    model, x, y = _mlp_task()
    gm = orthofx.transform(model, "isometric", example_inputs=(x[:2],))
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    handle = orthofx.attach(optimizer, gm)
    _step_quietly(gm, optimizer, x, y)
    handle.remove()  # deliberate: plain steps from here on, and no warning
    _step_quietly(gm, torch.optim.SGD(gm.parameters(), lr=0.1), x, y)
    # an optimizer for the other parameters next to the attached one
    gm = orthofx.transform(_mlp_task()[0], "isometric", example_inputs=(x[:2],))
    hooked = {id(gm.get_submodule(h.site).weight) for h in gm.meta["orthofx"].optimizer_hooks}
    others = torch.optim.Adam([p for p in gm.parameters() if id(p) not in hooked], lr=1e-2)
    _step_quietly(gm, others, x, y)
    # a wrapper optimizer (attached) delegating to an inner one that holds the hooked weights (ZeRO's local
    # optimizer, lookahead): the inner step updates them and the hooks run around the outer step
    inner = torch.optim.SGD(gm.parameters(), lr=0.1)

    class Outer(torch.optim.Optimizer):
        def __init__(self):
            super().__init__(gm.parameters(), {"lr": 0.1})

        def step(self, closure=None):
            return inner.step(closure)

    outer = Outer()
    orthofx.attach(outer, gm)
    _step_quietly(gm, outer, x, y)
    assert _stiefel_defect(gm) < 1e-5
    # a policy without optimizer hooks
    plain = orthofx.transform(_mlp_task()[0], "lorth", example_inputs=(x[:2],))
    _step_quietly(plain, torch.optim.SGD(plain.parameters(), lr=0.1), x, y)


def test_stepping_a_deep_copy_of_an_attached_optimizer_warns():
    model, x, y = _mlp_task()
    gm = orthofx.transform(model, "isometric", example_inputs=(x[:2],))
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
    orthofx.attach(optimizer, gm)
    gm_copy, optimizer_copy = copy.deepcopy((gm, optimizer))  # an in-memory snapshot of model and optimizer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            optimizer_copy.zero_grad()
            (torch.nn.functional.cross_entropy(gm_copy(x), y) + orthofx.penalty(gm_copy)).backward()  # README loop
            optimizer_copy.step()
    assert _stiefel_defect(gm_copy) > 1e-3  # the copy's hooks did not run (float64 reference)
    said = [str(w.message) for w in caught if issubclass(w.category, orthofx.OrthofxWarning)]
    assert any("orthofx.attach" in text for text in said), said


def test_resumed_training_matches_uninterrupted_with_hooks_and_scheduler():
    """Checkpoint after attach (model, optimizer, scheduler, RNG), rebuild (transform + attach + scheduler), load,
    continue: the same weights step for step as the run that was never interrupted (Riemannian updates with Adam's
    transported moment; NOG + OLR's own param group under StepLR)."""

    def run(preset, name, kwargs, resume_at=None, steps=5):
        def build(seed):
            torch.manual_seed(seed)
            return models.get(name, **kwargs)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(8, *models.input_shape(name), generator=g)
        y = torch.randint(0, 10, (8,), generator=g)

        def fresh(seed):
            gm = orthofx.transform(build(seed), preset, example_inputs=(x[:2],))
            optimizer = torch.optim.Adam(gm.parameters(), lr=1e-2)
            orthofx.attach(optimizer, gm)
            return gm, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.5)

        gm, optimizer, scheduler = fresh(0)
        torch.manual_seed(123)
        trajectory = []
        for step in range(steps):
            if step == resume_at:
                saved = copy.deepcopy([gm.state_dict(), optimizer.state_dict(), scheduler.state_dict(),
                                       torch.get_rng_state()])
                gm, optimizer, scheduler = fresh(7)  # other initial weights: all must come from the checkpoint
                gm.load_state_dict(saved[0])
                optimizer.load_state_dict(saved[1])
                scheduler.load_state_dict(saved[2])
                torch.set_rng_state(saved[3])
            optimizer.zero_grad()
            (torch.nn.functional.cross_entropy(gm(x), y) + orthofx.penalty(gm)).backward()
            optimizer.step()
            scheduler.step()
            trajectory.append([p.detach().clone() for p in gm.parameters()])
        return trajectory

    for preset, name, kwargs in [("isometric", "deep_mlp", {"depth": 4, "width": 16}),
                                 ("svd", "gcp_cnn", {"width": 4, "dim": 4})]:
        straight = run(preset, name, kwargs)
        resumed = run(preset, name, kwargs, resume_at=2)
        for a, b in zip(straight, resumed):
            for p, q in zip(a, b):
                assert torch.equal(p, q), (preset, name)
