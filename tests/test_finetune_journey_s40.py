"""The fine-tuning journey (session 40): a pretrained model, part of it frozen before or after ``orthofx.transform``,
the rest trained with several param groups, weight decay, gradient clipping, both ``zero_grad`` modes, params added
later with ``add_param_group``, and a second transform of the fine-tuned model.

Each test compares with an independent reference: frozen parameters bit for bit, the trained ones with a float64
loop written here from P1's Riemannian step (``W <- polar(W + P_W(d))``, ``d`` the optimizer's own step, the first
moment transported by ``P_{W_new}``) and P4's NOG / OLR (``G -> U V^T``; ``eta* = a b / (a c + 2 b^2)``).

Found and fixed (these tests failed before):

* a weight frozen at ``attach`` (its hook skipped), unfrozen and given to a second optimizer, trained as a plain
  parameter with no word (a Stiefel weight 0.95 off the manifold after 3 steps): now the attached optimizer warns;
* a Pre-SVD layer frozen and dropped from the param groups made every step raise that its weight "was replaced
  after attach"; moved into a new group with its bias, OLR stepped the bias by the weight's ``eta*`` (now refused).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import orthofx
from references import polar64, tangent64

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices (tests/conftest.py)

_STIEFEL = {"rules": [{"match": {"type": "Linear"}, "apply": "riemannian", "with": {"only_square": True}}]}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 5, bias=False), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(),
                         nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)


def _grads(model: nn.Module, params: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    """Gradients of the loss at ``params`` through the untransformed ``model`` (riemannian changes no graph)."""
    leaves = {name: p.detach().clone().requires_grad_(True) for name, p in params.items()}
    x, y = _batch(step)
    loss = (functional_call(model, leaves, (x,)) - y).square().mean()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads))


def _orthonormality(w: torch.Tensor) -> float:
    w = w.detach().to(torch.float64)
    return (w.T @ w - torch.eye(w.shape[1], dtype=torch.float64)).abs().max().item()


def _clip64(grads: dict[str, torch.Tensor], trained: list[str], max_norm: float) -> dict[str, torch.Tensor]:
    """``clip_grad_norm_`` over the trained parameters' raw gradients, by hand."""
    total = torch.sqrt(sum(grads[n].square().sum() for n in trained))
    factor = min(1.0, max_norm / (total.item() + 1e-6))
    return {n: g * factor if n in trained else g for n, g in grads.items()}


@pytest.mark.parametrize("set_to_none", [True, False])
def test_frozen_backbone_sgd_groups_weight_decay_clip_and_unfreeze_match_p1(set_to_none):
    """Layer '0' frozen before the transform (left out of the optimizer, its hook skipped), '2' and '4' Stiefel
    weights in two param groups (SGD momentum 0.9 + weight decay 0.1 vs momentum 0.5 + nesterov), the rest in a
    third; ``clip_grad_norm_`` between backward and step. After 3 steps '0' is unfrozen and added with
    ``add_param_group`` (lr 0.05, weight decay 0.2). Every step matches the float64 Riemannian loop: the weight
    decay is normal to the manifold (P_W(W) = 0) and drops out of the step but stays in the transported buffer's
    history only through its tangent part; the frozen '0' is bit for bit unchanged until it is added."""
    model = _mlp()
    model[0].requires_grad_(False)
    gm = orthofx.transform(model, _STIEFEL)
    mod = {name: gm.get_submodule(name) for name in ("0", "2", "4", "6")}
    frozen = mod["0"].weight.detach().clone()
    groups = {"2.weight": dict(lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=False),
              "4.weight": dict(lr=0.2, momentum=0.5, weight_decay=0.0, nesterov=True)}
    rest = [p for n, p in gm.named_parameters() if p.requires_grad and n not in groups]
    optimizer = torch.optim.SGD([{"params": [mod["2"].weight], **groups["2.weight"]},
                                 {"params": [mod["4"].weight], **groups["4.weight"]},
                                 {"params": rest, "lr": 0.03, "momentum": 0.0, "weight_decay": 0.01}], lr=0.5)
    handle = orthofx.attach(optimizer, gm)
    assert [h.site for h in handle.skipped] == ["0"]

    ref = {n: p.detach().clone() for n, p in gm.named_parameters()}
    settings = {n: dict(lr=0.03, momentum=0.0, weight_decay=0.01, nesterov=False) for n in ref}
    settings.update(groups)
    trained = [n for n, p in gm.named_parameters() if p.requires_grad]
    stiefel = {"2.weight", "4.weight"}
    buffers: dict[str, torch.Tensor] = {}
    for step in range(6):
        if step == 3:  # unfreeze the backbone layer and hand it to the optimizer
            mod["0"].weight.requires_grad_(True)
            optimizer.add_param_group({"params": [mod["0"].weight], "lr": 0.05, "momentum": 0.9,
                                       "weight_decay": 0.2})
            settings["0.weight"] = dict(lr=0.05, momentum=0.9, weight_decay=0.2, nesterov=False)
            trained.append("0.weight")
            stiefel.add("0.weight")
        optimizer.zero_grad(set_to_none=set_to_none)
        x, y = _batch(step)
        (gm(x) - y).square().mean().backward()
        torch.nn.utils.clip_grad_norm_([p for p in gm.parameters() if p.requires_grad], 0.5)
        optimizer.step()

        grads = _clip64(_grads(model, ref, step), trained, 0.5)
        for name in trained:
            s, w, g = settings[name], ref[name], grads[name]
            if name in stiefel:
                g = tangent64(w, g)
            d_p = g + s["weight_decay"] * w
            if s["momentum"]:
                buf = buffers[name] = d_p if name not in buffers else s["momentum"] * buffers[name] + d_p
                d_p = d_p + s["momentum"] * buf if s["nesterov"] else buf
            new = w - s["lr"] * d_p
            if name in stiefel:
                new = polar64(w + tangent64(w, new - w))
                if name in buffers:
                    buffers[name] = tangent64(new, buffers[name])
            ref[name] = new
        for name, p in gm.named_parameters():
            torch.testing.assert_close(p.detach(), ref[name], atol=1e-10, rtol=0, msg=f"{name} at step {step}")
        if step < 3:
            assert torch.equal(mod["0"].weight, frozen)
        for name in ("2", "4") + (("0",) if step >= 3 else ()):
            assert _orthonormality(mod[name].weight) < 1e-10
            buf = optimizer.state[mod[name].weight]["momentum_buffer"]
            torch.testing.assert_close(buf, buffers[f"{name}.weight"], atol=1e-10, rtol=0)
    assert [h.site for h in handle.hooks] == ["0", "2", "4"] and not handle.skipped


def test_adamw_groups_on_stiefel_weights_match_p1_and_frozen_after_transform_stay_bitwise():
    """AdamW with its decoupled weight decay on two Stiefel weights in groups of their own (lr, weight decay,
    betas differ); '4' frozen *after* the transform, with its parameters still in the optimizer (a group holding
    frozen params): it and its bias stay bit for bit, its hook runs but finds no gradient. P1's AdamW: the moments
    of the projected gradient, the step ``d`` projected at the pre-step point and retracted, ``exp_avg``
    transported, ``exp_avg_sq`` kept."""
    model = _mlp()
    gm = orthofx.transform(model, _STIEFEL)
    gm.get_submodule("4").requires_grad_(False)
    frozen = {n: p.detach().clone() for n, p in gm.named_parameters() if n.startswith("4.")}
    hyper = {"0.weight": dict(lr=0.05, weight_decay=0.3, betas=(0.9, 0.99)),
             "2.weight": dict(lr=0.02, weight_decay=0.0, betas=(0.8, 0.9))}
    optimizer = torch.optim.AdamW(
        [{"params": [gm.get_submodule("0").weight], **hyper["0.weight"]},
         {"params": [gm.get_submodule("2").weight], **hyper["2.weight"]},
         {"params": [p for n, p in gm.named_parameters() if n not in hyper], "lr": 0.01, "weight_decay": 0.05}],
        eps=1e-8)
    orthofx.attach(optimizer, gm)
    ref = {n: p.detach().clone() for n, p in gm.named_parameters()}
    trained = [n for n, p in gm.named_parameters() if p.requires_grad]
    moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for step in range(1, 5):
        optimizer.zero_grad()
        x, y = _batch(step)
        (gm(x) - y).square().mean().backward()
        optimizer.step()
        grads = _grads(model, ref, step)
        for name in trained:
            s = hyper.get(name, dict(lr=0.01, weight_decay=0.05, betas=(0.9, 0.999)))
            (b1, b2), w = s["betas"], ref[name]
            g = tangent64(w, grads[name]) if name in hyper else grads[name]
            m, v = moments.get(name, (torch.zeros_like(w), torch.zeros_like(w)))
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            new = w * (1 - s["lr"] * s["weight_decay"])
            new = new - s["lr"] * (m / (1 - b1 ** step)) / ((v / (1 - b2 ** step)).sqrt() + 1e-8)
            if name in hyper:
                new = polar64(w + tangent64(w, new - w))
                m = tangent64(new, m)
            moments[name], ref[name] = (m, v), new
        for name, p in gm.named_parameters():
            torch.testing.assert_close(p.detach(), ref[name], atol=1e-10, rtol=0, msg=f"{name} at step {step}")
        for name in hyper:
            state = optimizer.state[gm.get_parameter(name)]
            torch.testing.assert_close(state["exp_avg"], moments[name][0], atol=1e-10, rtol=0)
            torch.testing.assert_close(state["exp_avg_sq"], moments[name][1], atol=1e-12, rtol=0)
            assert _orthonormality(gm.get_parameter(name)) < 1e-10
    assert all(torch.equal(gm.get_parameter(n), w) for n, w in frozen.items())


def test_unfrozen_backbone_in_a_second_optimizer_warns_and_the_attached_one_keeps_it_on_the_manifold():
    """Layer '0' frozen at transform and attach (its hook skipped); after a step it is unfrozen and handed to an
    optimizer of its own, the usual split of a backbone's lr. That optimizer is not attached, so it stepped the
    Stiefel weight by its raw gradient, silently (0.95 off the manifold after 3 steps): the model had an attached
    optimizer, so the check for a forgotten attach stayed quiet, and attaching the second one is refused (the
    hooked weights belong in one optimizer). Now the attached optimizer's next step warns once, naming the site and the
    fix, and the fix (``add_param_group`` on the attached optimizer) takes P1's step from the first step on."""
    def build():
        model = _mlp()
        model[0].requires_grad_(False)
        gm = orthofx.transform(model, _STIEFEL)
        head = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.1)
        assert [h.site for h in orthofx.attach(head, gm).skipped] == ["0"]
        return model, gm, head

    def step(gm, optimizers, index):
        for optimizer in optimizers:
            optimizer.zero_grad()
        x, y = _batch(index)
        (gm(x) - y).square().mean().backward()
        for optimizer in optimizers:
            optimizer.step()

    _, gm, head = build()
    step(gm, [head], 0)
    backbone = gm.get_submodule("0").weight
    backbone.requires_grad_(True)
    second = torch.optim.SGD([backbone], lr=0.3)
    with pytest.warns(orthofx.OrthofxWarning, match=r"site '0' \(rule 'riemannian\[0\]'\): the weight\(s\) "
                      r"\['weight'\] were frozen .*\(Riemannian update\) was skipped.*add_param_group"):
        step(gm, [head, second], 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per optimizer and weight
        step(gm, [head, second], 2)

    # the advice: the attached optimizer takes the weight, in a group of its own; no warning, P1's step
    model, gm, head = build()
    step(gm, [head], 0)
    backbone = gm.get_submodule("0").weight
    backbone.requires_grad_(True)
    head.add_param_group({"params": [backbone], "lr": 0.3})
    for index in (1, 2):
        w = backbone.detach().clone()
        g = _grads(model, {n: p.detach() for n, p in gm.named_parameters()}, index)["0.weight"]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            step(gm, [head], index)
        # '0' was frozen at transform, so init: project left it off the manifold: the first retraction puts it on
        stepped = w - 0.3 * tangent64(w, g)
        torch.testing.assert_close(backbone.detach(), polar64(w + tangent64(w, stepped - w)), atol=1e-10, rtol=0)
        assert _orthonormality(backbone) < 1e-10


def test_a_second_optimizer_for_other_parameters_or_frozen_hooked_weights_does_not_warn():
    """The warning is for a hooked weight that is stepped, only: a second optimizer over the unhooked parameters,
    or over a hooked weight still frozen (no gradient), says nothing; nor after ``handle.remove()``."""
    model = _mlp()
    model[0].requires_grad_(False)
    gm = orthofx.transform(model, _STIEFEL)
    hooked = [gm.get_submodule(n).weight for n in ("0", "2", "4")]
    head = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad and all(p is not h for h in hooked)]
                           + hooked[1:], lr=0.1)
    handle = orthofx.attach(head, gm)
    others = torch.optim.SGD([gm.get_submodule("6").weight, hooked[0]], lr=0.1)  # '0' frozen: no gradient
    x, y = _batch(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            head.zero_grad()
            others.zero_grad()
            (gm(x) - y).square().mean().backward()
            head.step()
            others.step()
    handle.remove()
    hooked[0].requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no attachment waits for it any more
        (gm(x) - y).square().mean().backward()
        others.step()


def _eta64(w: torch.Tensor, g: torch.Tensor, base: float) -> float:
    """P4's OLR: ``eta* = a b / (a c + 2 b^2)`` of the flattened weight and gradient, used when in (0, base)."""
    w, g = w.reshape(-1).to(torch.float64), g.reshape(-1).to(torch.float64)
    a, b, c = (w @ w).item(), (g @ w).item(), (g @ g).item()
    eta = a * b / (a * c + 2 * b * b)
    return eta if 0 < eta < base else base


@pytest.mark.parametrize("set_to_none", [True, False])
def test_presvd_layer_frozen_then_added_with_momentum_and_weight_decay_matches_nog_olr(set_to_none):
    """The ``svd`` preset (NOG + OLR on the Pre-SVD ``conv1``) on a model whose ``conv1`` was frozen before the
    transform: the optimizer (two groups, one with weight decay) holds the rest, both hooks are skipped and
    ``conv1`` stays bit for bit while other layers train (``clip_grad_norm_`` between backward and step). Unfrozen
    and added with its own lr, momentum and weight decay, its step is P4's: the gradient replaced by its polar
    factor (per-step clipping does not change it), the lr ``eta*`` of that factor and the weight (weight decay
    added by the optimizer after NOG, so not in ``eta*``), the momentum buffer of ``polar + wd W``."""
    torch.manual_seed(0)
    model = orthofx.models.get("dbn_cnn").double()
    model.conv1.requires_grad_(False)
    x = orthofx.models.example_input("dbn_cnn", batch=8).double()
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(0))
    gm = orthofx.transform(model, "svd", example_inputs=(x,))
    conv1 = gm.get_submodule("conv1")
    frozen = conv1.weight.detach().clone()
    fc = [gm.get_submodule("fc").weight, gm.get_submodule("fc").bias]
    optimizer = torch.optim.SGD([{"params": [p for p in gm.parameters() if p.requires_grad
                                             and all(p is not q for q in fc)], "lr": 0.01},
                                 {"params": fc, "lr": 0.05, "weight_decay": 0.1, "momentum": 0.9}], lr=0.2)
    handle = orthofx.attach(optimizer, gm)
    assert [type(h).__name__ for h in handle.skipped] == ["NearestOrthogonalGradient", "OptimalLearningRate"]

    def step():
        optimizer.zero_grad(set_to_none=set_to_none)
        nn.functional.cross_entropy(gm(x), y).backward()
        torch.nn.utils.clip_grad_norm_([p for p in gm.parameters() if p.requires_grad], 0.1)
        raw = None if conv1.weight.grad is None else conv1.weight.grad.detach().clone()
        optimizer.step()
        return raw

    fc_before = fc[0].detach().clone()
    for _ in range(2):
        assert step() is None
    assert torch.equal(conv1.weight, frozen) and not torch.equal(fc[0], fc_before)
    conv1.weight.requires_grad_(True)
    optimizer.add_param_group({"params": [conv1.weight], "lr": 0.1, "momentum": 0.5, "weight_decay": 0.05})
    buf = None
    for index in range(3):
        w = conv1.weight.detach().clone()
        raw = step()
        polar = polar64(raw.reshape(16, -1)).reshape(raw.shape)
        eta = _eta64(w, polar, 0.1)
        d_p = polar + 0.05 * w
        buf = d_p if buf is None else 0.5 * buf + d_p
        torch.testing.assert_close(conv1.weight.detach(), w - eta * buf, atol=1e-12, rtol=0, msg=f"step {index}")
        group = next(g for g in optimizer.param_groups if any(p is conv1.weight for p in g["params"]))
        assert group["lr"] == 0.1 and group["orthofx_olr_lr"] == pytest.approx(eta, rel=1e-9)
        assert 0 < eta < 0.1
    assert [type(h).__name__ for h in handle.hooks] == ["NearestOrthogonalGradient", "OptimalLearningRate"]


def test_second_transform_of_a_fine_tuned_model_keeps_the_frozen_backbone():
    """Fine-tune with ``lorth`` (layer '0' frozen before the transform): the penalty is P0's L_orth of every layer
    (the frozen one's a constant: it gives '0' no gradient), AdamW with weight decay leaves '0' bit for bit. A
    second transform of the fine-tuned model is refused (its penalty terms would be dropped); after
    ``orthofx.freeze`` the ``isometric`` policy applies, leaves the frozen '0' as it is (no re-initialisation,
    its hook skipped), and further fine-tuning keeps '0' bit for bit and the trained square weights orthonormal."""
    from references import lorth64

    model = _mlp()
    model[0].requires_grad_(False)
    gm = orthofx.transform(model, "lorth")
    frozen = gm.get_submodule("0").weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for index in range(3):
        optimizer.zero_grad()
        x, y = _batch(index)
        penalty = orthofx.penalty(gm)
        expected = 0.01 * sum(lorth64(gm.get_submodule(n).weight) for n in ("0", "2", "4", "6"))
        assert penalty.item() == pytest.approx(expected, rel=1e-9)
        ((gm(x) - y).square().mean() + penalty).backward()
        assert gm.get_submodule("0").weight.grad is None
        optimizer.step()
    assert torch.equal(gm.get_submodule("0").weight, frozen)

    with pytest.raises(orthofx.TransformError, match="already transformed and carries 4 penalty term"):
        orthofx.transform(gm, "isometric")
    plain = orthofx.freeze(gm)
    assert not plain.get_submodule("0").weight.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", orthofx.OrthofxWarning)
        again = orthofx.transform(plain, "isometric")
    assert torch.equal(again.get_submodule("0").weight, frozen)
    assert not again.get_submodule("0").weight.requires_grad
    optimizer = torch.optim.SGD([p for p in again.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                                weight_decay=0.01)
    assert [h.site for h in orthofx.attach(optimizer, again).skipped] == ["0"]
    for index in range(3):
        optimizer.zero_grad(set_to_none=False)
        x, y = _batch(index)
        (again(x) - y).square().mean().backward()
        optimizer.step()
    assert torch.equal(again.get_submodule("0").weight, frozen)
    for name in ("2", "4"):
        assert _orthonormality(again.get_submodule(name).weight) < 1e-10


def test_orthogonal_layers_frozen_after_transform_stay_bitwise_and_the_rest_stay_orthogonal():
    """The ``orthogonal`` preset, then the hard orthogonal ``conv1`` frozen *after* the transform (its underlying
    parameters), all parameters in one SGD with momentum and weight decay (the frozen ones included, no gradient):
    ``conv1``'s parameters and its weight stay bit for bit; the other layers, trained with weight decay on their
    underlying parameters, stay orthogonal (P0's L_orth on the dense operator, float64)."""
    from references import lorth64

    torch.manual_seed(0)
    model = orthofx.models.get("small_cnn")
    x = orthofx.models.example_input("small_cnn", batch=8)
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(0))
    gm = orthofx.transform(model, "orthogonal", example_inputs=(x,))
    conv1 = gm.get_submodule("conv1")
    conv1.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in conv1.named_parameters()}
    weight = conv1.weight.detach().clone()
    conv2_before = gm.get_submodule("conv2").weight.detach().clone()
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05)
    for _ in range(3):
        optimizer.zero_grad(set_to_none=False)
        (nn.functional.cross_entropy(gm(x), y) + orthofx.penalty(gm)).backward()
        torch.nn.utils.clip_grad_norm_(gm.parameters(), 1.0)
        optimizer.step()
    assert all(torch.equal(p, before[n]) for n, p in conv1.named_parameters())
    assert torch.equal(conv1.weight, weight)
    conv2 = gm.get_submodule("conv2")
    assert not torch.equal(conv2.weight, conv2_before)
    # conv2 is circular and strided (stride 2): P0's L_orth of its dense operator
    assert lorth64(conv2.weight, stride=conv2.stride) < 1e-8


class _PreSvdPair(nn.Module):
    """Two Pre-SVD linears feeding one ``eigvalsh`` (P4's setting, small)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(6, 4)

    def forward(self, x):
        h = self.a(x) + 0.5 * self.b(x)
        return torch.linalg.eigvalsh(h.T @ h / x.shape[0] + torch.eye(4, dtype=x.dtype)).sum()


@pytest.mark.parametrize("olr", [False, True])
def test_presvd_layer_frozen_and_dropped_from_the_groups_then_added_back(olr):
    """Freezing a Pre-SVD layer mid-training and dropping its parameters from the optimizer's groups (so the step
    skips them) made every later step raise "the layer's weight is not in any param group ... replaced after
    attach" from NOG or OLR, a weight nothing steps and nothing replaced. Now the frozen layer stays bit for bit,
    the other trains by P4's step. Added back unfrozen (with OLR in a group of its own), it trains by P4's step again."""
    torch.manual_seed(0)
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    policy = {"rules": [{"match": {"feeds": ["linalg.eigvalsh"]}, "apply": "pre_svd",
                         "with": {"nog": True, "olr": olr}}]}
    gm = orthofx.transform(_PreSvdPair().double(), policy, example_inputs=(x,))
    a = gm.get_submodule("a")
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.4)
    orthofx.attach(optimizer, gm)

    def step() -> dict[str, torch.Tensor]:
        optimizer.zero_grad()
        gm(x).backward()
        before = {n: (p.detach().clone(), None if p.grad is None else p.grad.detach().clone())
                  for n, p in gm.named_parameters()}
        optimizer.step()
        return before

    def check_nog_step(name: str, before: dict, base: float) -> None:
        w, g = before[f"{name}.weight"]
        polar = polar64(g)
        lr = _eta64(w, polar, base) if olr else base
        torch.testing.assert_close(gm.get_parameter(f"{name}.weight").detach(), w - lr * polar, atol=1e-12, rtol=0)

    step()
    a.requires_grad_(False)
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if p.requires_grad]
    frozen = {n: p.detach().clone() for n, p in a.named_parameters()}
    for _ in range(2):
        before = step()
        check_nog_step("b", before, 0.4)
        assert all(torch.equal(p, frozen[n]) for n, p in a.named_parameters())
    a.requires_grad_(True)
    if olr:  # OLR's lr is the weight's alone: its bias in another group
        optimizer.add_param_group({"params": [a.weight], "lr": 0.2})
        optimizer.add_param_group({"params": [a.bias], "lr": 0.2})
    else:
        optimizer.add_param_group({"params": [a.weight, a.bias], "lr": 0.2})
    for _ in range(2):
        before = step()
        check_nog_step("a", before, 0.2)
        check_nog_step("b", before, 0.4)
        bias, grad = before["a.bias"]
        torch.testing.assert_close(a.bias.detach(), bias - 0.2 * grad, atol=1e-12, rtol=0)
    assert [float(g["lr"]) for g in optimizer.param_groups if g["params"]] == ([0.4, 0.4, 0.2, 0.2] if olr else
                                                                              [0.4, 0.2])


def test_olr_weight_moved_into_a_group_with_its_bias_is_refused_and_alone_takes_eta():
    """Regrouping after ``attach`` (a layer moved into a group of its own lr, weight and bias together, the
    fine-tuning way of giving a layer another lr): OLR set ``eta*`` as that whole group's lr, so the bias stepped by
    the weight's ``eta*``, silently. Now that step is refused with the fix (splitting the weight off inside the step
    changed the number of param groups under the user's schedulers and checkpoints); the weight in a group of its
    own steps by P4's NOG + OLR step from that group's lr, the bias by its own group's lr."""
    torch.manual_seed(0)
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    policy = {"rules": [{"match": {"feeds": ["linalg.eigvalsh"]}, "apply": "pre_svd",
                         "with": {"nog": True, "olr": True}}]}

    def regrouped(alone: bool):
        gm = orthofx.transform(_PreSvdPair().double(), policy, example_inputs=(x,))
        a = gm.get_submodule("a")
        optimizer = torch.optim.SGD(gm.parameters(), lr=0.4)
        orthofx.attach(optimizer, gm)
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if p is not a.weight and p is not a.bias]
        if alone:
            optimizer.add_param_group({"params": [a.weight], "lr": 0.3})
            optimizer.add_param_group({"params": [a.bias], "lr": 0.3})
        else:
            optimizer.add_param_group({"params": [a.weight, a.bias], "lr": 0.3})
        return gm, a, optimizer

    gm, a, optimizer = regrouped(alone=False)
    gm(x).backward()
    w = a.weight.detach().clone()
    with pytest.raises(orthofx.ArgumentError, match=r"site 'a' .*1 other parameter.*group of its own"):
        optimizer.step()
    assert torch.equal(a.weight.detach(), w)  # refused before the step

    gm, a, optimizer = regrouped(alone=True)
    groups = len(optimizer.param_groups)
    for _ in range(2):
        optimizer.zero_grad()
        gm(x).backward()
        w, g = a.weight.detach().clone(), a.weight.grad.detach().clone()
        bias, grad = a.bias.detach().clone(), a.bias.grad.detach().clone()
        optimizer.step()
        polar = polar64(g)
        eta = _eta64(w, polar, 0.3)
        assert 0 < eta < 0.3
        torch.testing.assert_close(a.weight.detach(), w - eta * polar, atol=1e-12, rtol=0)
        torch.testing.assert_close(a.bias.detach(), bias - 0.3 * grad, atol=1e-12, rtol=0)
    assert len(optimizer.param_groups) == groups  # no group split off inside a step


def test_unfrozen_presvd_weight_left_out_warns_once_at_the_users_step():
    """NOG and OLR wait on the same weight: one warning, not one per hook; and it names the user's
    ``optimizer.step()`` line, not a frame of torch's step wrappers (a fixed stacklevel landed in torch)."""
    torch.manual_seed(0)
    x = torch.randn(32, 6, dtype=torch.float64)
    policy = {"rules": [{"match": {"feeds": ["linalg.eigvalsh"]}, "apply": "pre_svd",
                         "with": {"nog": True, "olr": True}}]}
    model = _PreSvdPair().double()
    model.a.requires_grad_(False)
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    optimizer = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.1)
    assert len(orthofx.attach(optimizer, gm).skipped) == 2  # NOG and OLR of 'a'
    gm.get_submodule("a").requires_grad_(True)
    second = torch.optim.SGD(gm.get_submodule("a").parameters(), lr=0.1)
    gm(x).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second.step()  # since session 41 the other optimizer's first step says it (no attached one holds 'a')
        optimizer.step()  # and the attached one's step no longer repeats it
    ours = [w for w in caught if issubclass(w.category, orthofx.OrthofxWarning)]
    assert len(ours) == 1 and "site 'a'" in str(ours[0].message)
    assert ours[0].filename == __file__
