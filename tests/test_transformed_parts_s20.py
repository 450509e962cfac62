"""A transformed model as one part of the user's model: ``attach``, ``report``, ``monitors``, ``freeze`` and
``export`` of a model that ``orthofx.transform`` did not return but that holds transformed models
(``orthofx.penalty.transformed_parts``), as ``orthofx.penalty`` already handled it.

References: the same call on the part itself (its optimizer hooks attached directly: weights after several
SGD / Adam steps bitwise equal; its own report rows, with the part's path in front), plain torch (an SGD step
after ``handle.remove()`` is ``p - lr g``; a head's L_orth and singular values from a float64 Gram matrix and
``torch.linalg.svdvals``), and the unfrozen model's eval outputs. Every test here failed before (attach and report
refused the model, freeze refused it or captured it into one graph, .pt2 export refused it).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import ArgumentError, ExportError, OrthofxError
from orthofx.nn import JacobianProbe, OrthogonalLinear
from orthofx.nn.tracing import is_orthofx_layer
from orthofx.report import monitors

pytestmark = pytest.mark.usefixtures("one_thread")


class EigHead(nn.Module):
    """A Linear whose output feeds an eigvalsh (the Pre-SVD site ``a``: NOG + OLR hooks), and a head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        f = self.a(x)
        return self.head(f) + torch.linalg.eigvalsh(f.T @ f / x.shape[0] + torch.eye(4)).sum()


class Composite(nn.Module):
    """The user's model: a transformed backbone, a transformed Pre-SVD block and a plain head."""

    def __init__(self, backbone: nn.Module, eig: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.eig = eig
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = self.backbone(x)
        return self.head(h).sum(1, keepdim=True) + self.eig(h)


def _x(batch: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 6, generator=torch.Generator().manual_seed(seed))


def composite(eig_policy=None) -> Composite:
    """Square linears on the Stiefel manifold (isometric: StiefelHook) and a Pre-SVD block (NOG + OLR)."""
    torch.manual_seed(0)
    x = _x()
    backbone = orthofx.transform(nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)), "isometric",
                                 example_inputs=(x,))
    policy = eig_policy or {"rules": [{"match": {"feeds": "linalg.eigvalsh"}, "apply": "pre_svd",
                                       "with": {"nog": True, "olr": True}}]}
    eig = orthofx.transform(EigHead(), policy, example_inputs=(x,))
    return Composite(backbone, eig)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for i in range(steps):
        optimizer.zero_grad()
        model(_x(seed=10 + i)).square().mean().backward()
        optimizer.step()


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


# ------------------------------------------------------------------------------------------------------ attach

@pytest.mark.parametrize("make_optimizer", [lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                                            lambda p: torch.optim.Adam(p, lr=1e-2)], ids=["sgd", "adam"])
def test_attach_to_the_bigger_model_runs_each_parts_hooks_as_attaching_the_parts(make_optimizer):
    model = composite()
    reference = copy.deepcopy(model)
    optimizer = make_optimizer(model.parameters())
    handle = orthofx.attach(optimizer, model)
    assert [type(h).__name__ for h in handle.hooks] == ["StiefelHook", "StiefelHook", "NearestOrthogonalGradient",
                                                         "OptimalLearningRate"]
    ref_optimizer = make_optimizer(reference.parameters())
    orthofx.attach(ref_optimizer, reference.backbone)
    orthofx.attach(ref_optimizer, reference.eig)
    train(model, optimizer, 4)
    train(reference, ref_optimizer, 4)
    assert_same_parameters(model, reference)
    weight = model.backbone.get_submodule("0").weight.detach().double()  # the hooks ran: still on the manifold
    torch.testing.assert_close(weight @ weight.T, torch.eye(6, dtype=torch.float64), atol=1e-5, rtol=0)


def test_handle_remove_takes_every_parts_hooks_off():
    model = composite()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = orthofx.attach(optimizer, model)
    handle.remove()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer.zero_grad()
    model(_x()).square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()
    for name, p in model.named_parameters():  # plain SGD: no projection, retraction or learning-rate change
        torch.testing.assert_close(p.detach(), before[name] - 0.1 * grads[name], atol=1e-7, rtol=0)
    orthofx.attach(optimizer, model.backbone).remove()  # the parts are free again
    orthofx.attach(optimizer, model).remove()


def test_attaching_a_part_twice_through_the_bigger_model_is_refused():
    model = composite()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = orthofx.attach(optimizer, model)
    with pytest.raises(ArgumentError, match=r"already attached to this optimizer; call handle.remove\(\)"):
        orthofx.attach(optimizer, model.eig)
    handle.remove()
    orthofx.attach(optimizer, model.eig)
    groups = len(optimizer.param_groups)
    with pytest.raises(ArgumentError, match=r"the hooks of 'eig', a transformed part of this model, are already "
                                            r"attached to this optimizer"):
        orthofx.attach(optimizer, model)
    assert len(optimizer.param_groups) == groups  # refused before the backbone's hooks were set up


def test_a_frozen_weight_of_a_part_is_skipped_until_added_to_the_optimizer():
    model = composite()
    reference = copy.deepcopy(model)

    def fine_tune(m, attach_to):
        m.eig.a.weight.requires_grad_(False)
        optimizer = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05)
        handles = [orthofx.attach(optimizer, part) for part in attach_to(m)]
        train(m, optimizer, 2)
        m.eig.a.weight.requires_grad_(True)
        optimizer.add_param_group({"params": [m.eig.a.weight]})
        train(m, optimizer, 2)
        return handles

    (handle,) = fine_tune(model, lambda m: [m])
    fine_tune(reference, lambda m: [m.backbone, m.eig])
    assert_same_parameters(model, reference)
    assert handle.skipped == [] and [h.site for h in handle.hooks] == ["0", "2", "a", "a"]


def test_attach_to_a_model_holding_no_transformed_model_says_so():
    model = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(OrthofxError, match=r"Sequential was not produced by orthofx.transform and holds no model it "
                                           r"returned"):
        orthofx.attach(torch.optim.SGD(model.parameters(), lr=0.1), model)


# ------------------------------------------------------------------------------------------------------ report

class ConvPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


class ProbedWrapper(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = orthofx.transform(ConvPart(), "lorth", example_inputs=(torch.randn(2, 2, 8, 8),))
        self.probe = JacobianProbe(nn.Linear(6, 6), weight=0.5, seed=0)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.probe(self.backbone(x)))


def test_report_gives_each_parts_rows_prefixed_and_the_layers_outside_them():
    model = ProbedWrapper()
    model(torch.randn(2, 2, 8, 8))  # a training forward: the probe has an estimate
    rep = orthofx.report(model)
    part = orthofx.report(model.backbone)
    assert [row["site"] for row in rep.rows] == ["backbone.conv", "backbone.fc", "probe", "head"]
    for row, part_row in zip(rep.rows, part.rows):
        assert row == dict(part_row, site="backbone." + part_row["site"])
    assert rep.rows[0]["sigma_max"] is not None and rep.rows[0]["input"] == (8, 8)  # the part's input sizes
    assert rep.spectra.keys() == {"backbone.conv", "backbone.fc", "probe", "head"}
    # the head, outside the parts: L_orth = ||W W^T - I||^2 (3 rows <= 6 columns) and its singular values
    w = model.head.weight.detach().double()
    head = rep.rows[3]
    assert head["pass"] is None
    torch.testing.assert_close(head["lorth"], float((w @ w.T - torch.eye(3, dtype=torch.float64)).square().sum()))
    s = torch.linalg.svdvals(w)
    torch.testing.assert_close((head["sigma_min"], head["sigma_max"]), (float(s.min()), float(s.max())))
    # penalties: the penalty_terms keys and values
    terms = orthofx.penalty_terms(model)
    assert [f"{p['rule']}/{p['site']}" for p in rep.penalties] == list(terms)
    for p in rep.penalties:
        torch.testing.assert_close(p["weighted"], float(terms[f"{p['rule']}/{p['site']}"].detach()))
    assert rep.capture["mode"] == "parts" and "backbone (fx)" in str(rep)


def test_report_and_monitors_of_a_part_with_condition_monitors():
    model = composite(eig_policy="svd")
    model(_x())
    part_monitors = monitors(model.eig)
    assert part_monitors  # the svd preset put a monitor on the eigvalsh
    found = monitors(model)
    assert found == {f"eig.{site}": dict(figures, monitor=f"eig.{figures['monitor']}")
                     for site, figures in part_monitors.items()}
    for figures in found.values():
        assert model.get_submodule(figures["monitor"]) is model.eig.get_submodule(figures["monitor"][4:])
    rep = orthofx.report(model)
    assert rep.conditioning == {f"eig.{site}": history for site, history in orthofx.report(model.eig)
                                .conditioning.items()}


# ------------------------------------------------------------------------------------------------------ freeze

class OrthogonalWrapper(nn.Module):
    """A part with orthogonal layers, a part with regularised ones, and an orthofx layer outside both."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        x = torch.randn(4, 6)
        self.hard = orthofx.transform(nn.Sequential(nn.Linear(6, 6), nn.Tanh()), "orthogonal", example_inputs=(x,))
        self.soft = orthofx.transform(nn.Sequential(nn.Linear(6, 5), nn.ReLU()), "lorth", example_inputs=(x,))
        self.head = OrthogonalLinear(5, 3)

    def forward(self, x):
        return self.head(self.soft(self.hard(x)))


def test_freeze_replaces_each_part_by_its_frozen_form_in_a_copy_of_the_model():
    model = OrthogonalWrapper()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = orthofx.freeze(model)
    assert type(frozen) is OrthogonalWrapper and not frozen.training
    for name in ("hard", "soft"):
        assert orthofx.manifest_of(getattr(frozen, name)).frozen
    assert not any(is_orthofx_layer(m) for m in frozen.modules())
    assert float(orthofx.penalty(frozen)) == 0.0
    # the user's model is untouched: same parts, still transformed, still training, same weights
    assert model.training and model.head.training and isinstance(model.head, OrthogonalLinear)
    assert not orthofx.manifest_of(model.soft).frozen and orthofx.manifest_of(model.soft).penalties
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    x = torch.randn(7, 6)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model.eval()(x), atol=1e-5, rtol=0)


def test_freeze_runs_the_example_inputs_through_the_whole_model():
    """A ConvNorm part's plain form covers the input sizes it has run on: the example call on the bigger model
    reaches the part with its own input size (12 x 12), which the model never ran on before."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU())
    part = orthofx.transform(conv, "convnorm", example_inputs=(torch.randn(2, 2, 8, 8),))
    model = nn.Sequential(nn.Upsample(scale_factor=1.5), part, nn.Flatten(), nn.Linear(3 * 12 * 12, 4))
    x = torch.randn(2, 2, 8, 8)
    with pytest.raises(orthofx.OrthofxError, match=r"no precomputed ConvNorm filter for input size \(12, 12\)"):
        orthofx.freeze(model)(x)  # without the example call the part knows 8 x 8 only
    frozen = orthofx.freeze(model, example_inputs=(x,))
    assert isinstance(frozen, nn.Sequential) and orthofx.manifest_of(frozen[1]).frozen
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model.eval()(x), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------------ export

def test_export_pt_of_a_model_holding_parts_says_what_to_do_instead(tmp_path):
    model = OrthogonalWrapper()
    with pytest.raises(ExportError, match=r"holds the transformed part\(s\) 'hard', 'soft'.*export a part on its own "
                                          r"\(orthofx.export\(model.get_submodule\('hard'\), 'part.pt'\).*"
                                          r"torch.save\(model.state_dict\(\), path\)"):
        orthofx.export(model, tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists()


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = orthofx.transform(nn.Sequential(nn.Linear(6, 6), nn.Tanh()), "lorth",
                                      example_inputs=(torch.randn(4, 6),))
        self.head = nn.Linear(6, 2)

    def forward(self, x, *, mask):
        return self.head(self.body(x) * mask)


def test_export_pt2_of_a_model_holding_parts_with_a_keyword_input(tmp_path):
    model = Masked()
    x, mask = torch.randn(4, 6), torch.ones(4, 6)
    result = orthofx.export(model, tmp_path / "model.pt2", example_inputs=(x,), example_kwargs={"mask": mask})
    assert result.max_abs_diff < 1e-5
    program = torch.export.load(str(tmp_path / "model.pt2")).module()
    x3, mask3 = torch.randn(3, 6), torch.rand(3, 6)  # another batch size: dynamic
    with torch.no_grad():
        torch.testing.assert_close(program(x3, mask=mask3), model.eval()(x3, mask=mask3), atol=1e-5, rtol=0)


def test_export_onnx_of_a_model_holding_parts(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    model = nn.Sequential(orthofx.transform(nn.Sequential(nn.Linear(6, 6), nn.Tanh()), "isometric",
                                            example_inputs=(x,)), nn.Linear(6, 2))
    result = orthofx.export(model, tmp_path / "model.onnx", example_inputs=(x,))
    assert result.max_abs_diff < 1e-4
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    x5 = torch.randn(5, 6)
    (out,) = session.run(None, {session.get_inputs()[0].name: x5.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model.eval()(x5), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------- a part reached by two paths

class BareAndCompiled(nn.Module):
    """The same transformed part held bare and through a ``torch.compile`` wrapper (a fast path for inference)."""

    def __init__(self, part: nn.Module):
        super().__init__()
        self.bare = part
        self.fast = torch.compile(part)

    def forward(self, x):
        return self.bare(x)


class HeldTwice(nn.Module):
    """The same transformed part registered under two names (weight sharing)."""

    def __init__(self, part: nn.Module):
        super().__init__()
        self.a = part
        self.b = part

    def forward(self, x):
        return self.a(x) + self.b(x)


def _lorth_part() -> nn.Module:
    torch.manual_seed(0)
    return orthofx.transform(nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)), "lorth",
                             example_inputs=(_x(),))


def _lorth_by_hand(weight: torch.Tensor) -> torch.Tensor:
    """||W W^T - I||_F^2 in float64 (a square weight: rows and columns orthonormal alike)."""
    w = weight.detach().double()
    return (w @ w.T - torch.eye(w.shape[0], dtype=torch.float64)).square().sum()


def test_a_part_reached_bare_and_through_torch_compile_counts_once_in_penalty_and_report():
    """Before, penalty and penalty_terms counted the part's terms twice (under 'bare' and 'fast'), and report
    gave each row twice; attach already counted it once."""
    part = _lorth_part()
    model = BareAndCompiled(part)
    terms = orthofx.penalty_terms(model)
    assert list(terms) == ["lorth/bare.0", "lorth/bare.2"]
    weight = orthofx.manifest_of(part).penalties[0].weight
    expected = weight * sum(_lorth_by_hand(part.get_submodule(site).weight) for site in ("0", "2"))
    torch.testing.assert_close(orthofx.penalty(model).double(), expected, rtol=1e-5, atol=0)
    sites = [row["site"] for row in orthofx.report(model).rows]
    assert sites == ["bare.0", "bare.2"]
    handle = orthofx.attach(torch.optim.SGD(model.parameters(), lr=0.1), model)
    assert len(handle.hooks) == len(orthofx.attach(torch.optim.SGD(part.parameters(), lr=0.1), part).hooks)


def test_freeze_replaces_every_name_of_a_part_held_twice_by_one_frozen_part():
    """Before, only the first name was replaced; the second still held the transformed part (its orthofx layers
    swapped for plain ones inside it, its penalty bookkeeping kept)."""
    torch.manual_seed(0)
    part = orthofx.transform(nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)), "orthogonal",
                             example_inputs=(_x(),))
    model = HeldTwice(part)
    frozen = orthofx.freeze(model)
    assert frozen.a is frozen.b and orthofx.manifest_of(frozen.b).frozen
    assert not any(is_orthofx_layer(m) for m in frozen.modules())
    x = _x(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model.eval()(x), atol=1e-5, rtol=0)
    assert isinstance(model.b.get_submodule("0"), OrthogonalLinear)  # the user's model is untouched
