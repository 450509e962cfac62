"""Parity of ``orthofx.freeze`` and ``orthofx.export`` on policies combining several passes and on unusual models
(grouped / depthwise / dilated / transposed / 1-D / 3-D convs, a layer called twice, a tied decoder weight, dict and
tuple outputs, buffers, BatchNorm, attention, an eigendecomposition): freeze gives plain torch layers with the
transformed model's eval outputs (float32 and float64), changes neither the transformed nor the original model; a
``.pt`` file restores outputs bit for bit and the penalty schedule (every count, the probes' steps); ``.pt2`` and
``.onnx`` (dynamic batch, batch sizes 1 and 3) match the frozen model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthofx
from orthofx.nn.tracing import is_orthofx_layer

pytestmark = pytest.mark.usefixtures("one_thread")


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.t = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.t(F.relu(self.bn(self.dw(self.a(x)))))
        return self.fc(h.mean((2, 3)))


class OneD(nn.Module):
    """1-D convs, one called twice, a transposed conv, and a dict output."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3, padding=1)
        self.c2 = nn.Conv1d(6, 6, 3, padding=1)
        self.t = nn.ConvTranspose1d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = self.c2(self.c2(h) + h)
        h = self.t(h)
        return {"logits": self.head(h.mean(-1)), "feat": h}


class Tied(nn.Module):
    """A decoder tied to the encoder's weight, a buffer, a tuple output."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(8, 8)
        self.mid = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8))

    def forward(self, x):
        h = self.mid(self.enc(x) * self.scale)
        return F.linear(h, self.enc.weight.t()), h


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.blk = nn.Sequential(nn.Linear(8, 8), nn.GELU())
        self.ln = nn.LayerNorm(8)
        self.o = nn.Linear(8, 4)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        a = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1) @ v
        return self.o(self.ln(self.blk(a) + x))


class Features(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Tanh())
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.block(self.features(x)).mean((2, 3)))


class Covariance(nn.Module):
    """A matrix square root of a feature covariance, through eigh."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(36, 3)

    def forward(self, x):
        h = self.c(x).flatten(2)
        cov = h @ h.transpose(1, 2) / h.shape[-1] + 1e-2 * torch.eye(6)
        w, v = torch.linalg.eigh(cov)
        return self.fc((v @ torch.diag_embed(w.clamp_min(1e-6).sqrt()) @ v.transpose(1, 2)).flatten(1))


class Volume(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv3d(2, 4, 3, padding=1)
        self.t = nn.ConvTranspose3d(4, 4, 2, stride=2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.t(F.relu(self.c(x))).mean((2, 3, 4)))


def _rule(name, apply, match, **params):
    return {"name": name, "match": match, "apply": apply, "with": params, "optional": True}


CONVS = ["Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Linear"]
HARD = _rule("hard", "orthogonal_conv", {"type": CONVS}, on_impossible="regularize")
LORTH = _rule("lorth", "orth_regularizer", {"type": CONVS}, every=3)
CONVNORM = _rule("convnorm", "convnorm", {"type": ["Conv1d", "Conv2d", "Conv3d"]})
JACOBIAN = _rule("jacobian", "jacobian_isometry", {"kind": "block", "type": "Sequential"}, weight=0.1, every=2)
ISO = _rule("iso", "isometric_init", {"type": ["Conv1d", "Conv2d", "Linear"]}, seed=1)
RIEMANN = _rule("riemann", "riemannian", {"type": ["Linear", "Conv2d"]})
STABLE = _rule("stable", "svd_conditioning", {"op": "linalg.eigh"}, method="taylor")
PRESVD = _rule("presvd", "pre_svd", {"feeds": "linalg.eigh"}, weight="orthogonal")

#: (model class, input shape, rules): each case combines passes on one model; a rule that matches nothing there is
#: optional, and one that a rule before it took (a layer takes one replacement) is planned as skipped.
CASES = {
    "grouped-hard-lorth-iso": (Grouped, (3, 4, 6, 6), [HARD, LORTH, ISO]),
    "grouped-convnorm-riemann": (Grouped, (3, 4, 6, 6), [CONVNORM, RIEMANN, LORTH]),
    "oned-hard-convnorm-lorth": (OneD, (3, 3, 10), [CONVNORM, HARD, LORTH, ISO]),
    "tied-hard-jacobian": (Tied, (3, 8), [HARD, JACOBIAN]),
    "tied-lorth-jacobian-iso": (Tied, (3, 8), [LORTH, JACOBIAN, ISO]),
    "attention-hard-jacobian": (Attention, (3, 5, 8), [HARD, JACOBIAN, RIEMANN]),
    "features-convnorm-jacobian-lorth": (Features, (3, 3, 6, 6), [CONVNORM, JACOBIAN, LORTH]),
    "covariance-stable-presvd-lorth": (Covariance, (3, 3, 5, 5), [STABLE, PRESVD, LORTH]),
    "volume-hard-lorth": (Volume, (3, 2, 4, 4, 4), [HARD, LORTH]),
}


def _flat(output):
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for key in output for t in _flat(output[key])]
    return [t for value in output for t in _flat(value)]


def _max_diff(a, b):
    a, b = _flat(a), _flat(b)
    assert len(a) == len(b)
    return max((u.double() - v.double()).abs().max().item() for u, v in zip(a, b))


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_state(before, after):
    """Bit for bit, NaN equal to NaN (a condition monitor's history starts as NaN)."""
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, equal_nan=True, msg=key)


def _trained(name, dtype=torch.float32, steps=2):
    """The case's model transformed, trained ``steps`` steps (weights and penalty counters moved), in eval mode."""
    cls, shape, rules = CASES[name]
    torch.manual_seed(0)
    model = cls().to(dtype)
    x = torch.randn(*shape, dtype=dtype)
    gm = orthofx.transform(model, {"rules": rules}, example_inputs=(x,))
    optimizer = torch.optim.SGD(gm.parameters(), lr=1e-2)
    if gm.meta["orthofx"].optimizer_hooks:
        orthofx.attach(optimizer, gm)
    gm.train()
    for _ in range(steps):
        loss = sum(t.pow(2).mean() for t in _flat(gm(x))) + orthofx.penalty(gm)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, gm.eval(), x


@pytest.mark.parametrize("name", sorted(CASES))
def test_freeze_is_plain_exact_and_changes_nothing(name):
    model, gm, x = _trained(name)
    original, transformed = _state(model), _state(gm)
    frozen = orthofx.freeze(gm, (x,))
    _assert_same_state(transformed, _state(gm))  # freeze works on a copy
    _assert_same_state(original, _state(model))
    assert not gm.meta["orthofx"].frozen
    assert not frozen.training
    left = [n for n, m in frozen.named_modules() if n and (is_orthofx_layer(m) or hasattr(m, "to_plain"))]
    assert not left, left
    with torch.no_grad():
        assert _max_diff(gm(x), frozen(x)) <= 1e-5
        other = torch.randn(1, *x.shape[1:])  # another batch size
        assert _max_diff(gm(other), frozen(other)) <= 1e-5
    assert float(orthofx.penalty(frozen)) == 0.0


@pytest.mark.parametrize("name", ["grouped-hard-lorth-iso", "oned-hard-convnorm-lorth", "tied-hard-jacobian",
                                  "covariance-stable-presvd-lorth"])
def test_freeze_parity_in_float64(name):
    _, gm, x = _trained(name, dtype=torch.float64)
    frozen = orthofx.freeze(gm, (x,))
    with torch.no_grad():
        assert _max_diff(gm(x), frozen(x)) <= 1e-10


def test_frozen_orthogonal_linears_are_orthogonal_in_float64():
    """Independent of orthofx: each baked ``nn.Linear`` weight of the hard-orthogonal attention model has
    orthonormal rows or columns (dense float64 Gram matrix)."""
    _, gm, x = _trained("attention-hard-jacobian")
    frozen = orthofx.freeze(gm, (x,))
    linears = [m for m in frozen.modules() if type(m) is nn.Linear]
    assert len(linears) == 5
    for linear in linears:
        w = linear.weight.detach().double()
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        torch.testing.assert_close(gram, torch.eye(gram.shape[0], dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tied-lorth-jacobian-iso", "features-convnorm-jacobian-lorth",
                                  "oned-hard-convnorm-lorth"])
def test_pt_restores_outputs_and_penalty_schedule(tmp_path, name):
    cls = CASES[name][0]
    _, gm, x = _trained(name, steps=5)  # 5 steps: mid-period for every = 2 and 3
    path = tmp_path / "m.pt"
    orthofx.export(gm, path)
    torch.manual_seed(0)
    loaded = orthofx.load(cls(), path, example_inputs=(x,)).eval()
    _assert_same_state(_state(gm), _state(loaded))
    assert loaded.meta["orthofx"].penalty_calls == gm.meta["orthofx"].penalty_calls
    probes = {n: m.calls for n, m in gm.named_modules() if isinstance(getattr(m, "calls", None), int)}
    assert probes == {n: m.calls for n, m in loaded.named_modules() if isinstance(getattr(m, "calls", None), int)}
    with torch.no_grad():
        for a, b in zip(_flat(gm(x)), _flat(loaded(x))):
            assert torch.equal(a, b)
    gm.train()
    loaded.train()
    for step in range(6):  # the same terms come due on the same steps, with the same probes
        torch.manual_seed(step)
        expected = float(orthofx.penalty(gm).detach())
        torch.manual_seed(step)
        assert float(orthofx.penalty(loaded).detach()) == expected


@pytest.mark.parametrize("name", ["oned-hard-convnorm-lorth", "tied-hard-jacobian", "covariance-stable-presvd-lorth"])
def test_pt2_matches_frozen_at_other_batch_sizes(tmp_path, name):
    _, gm, x = _trained(name)
    path = tmp_path / "m.pt2"
    orthofx.export(gm, path, example_inputs=(x,))
    program = torch.export.load(str(path)).module()
    frozen = orthofx.freeze(gm, (x,))
    with torch.no_grad():
        for batch in (1, 3, 4):
            xb = torch.randn(batch, *x.shape[1:])
            assert _max_diff(frozen(xb), program(xb)) <= 1e-5


def test_onnx_dynamic_batch_on_combined_passes(tmp_path):
    """One ONNX case (seconds each): hard orthogonal + ConvNorm + L_orth on 1-D convs, a conv called twice and a dict
    output; batch sizes 1 and 3 against the frozen model."""
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    _, gm, x = _trained("oned-hard-convnorm-lorth")
    path = tmp_path / "m.onnx"
    orthofx.export(gm, path, example_inputs=(x,))
    frozen = orthofx.freeze(gm, (x,))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        xb = torch.randn(batch, *x.shape[1:])
        got = session.run(None, {session.get_inputs()[0].name: xb.numpy()})
        with torch.no_grad():
            expected = _flat(frozen(xb))
        assert len(got) == len(expected)
        for e, g in zip(expected, got):
            assert (e - torch.from_numpy(g)).abs().max().item() <= 1e-4


def test_freeze_of_train_mode_model_keeps_its_modes_and_counters():
    """freeze of a model left in training mode: its modules' training flags and penalty counters stay as they were
    (freeze evaluates a copy)."""
    _, gm, x = _trained("features-convnorm-jacobian-lorth", steps=3)
    gm.train()
    modes = {n: m.training for n, m in gm.named_modules()}
    calls = gm.meta["orthofx"].penalty_calls
    before = copy.deepcopy(_state(gm))
    orthofx.freeze(gm, (x,))
    assert modes == {n: m.training for n, m in gm.named_modules()}
    assert gm.meta["orthofx"].penalty_calls == calls
    _assert_same_state(before, _state(gm))
