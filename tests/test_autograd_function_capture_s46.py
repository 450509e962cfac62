"""torch.autograd.Function calls and activation checkpointing in a captured forward (session 46).

A trace runs a Function's forward and records its operations; its backward never runs. Before this session capture
inlined every Function call: torch.utils.checkpoint's reentrant CheckpointFunction ran the checkpointed block
under its internal ``no_grad``, which fx mode recorded, so the block and every layer before it got no gradient; in
export mode that ``no_grad`` was recorded as two entries without an exit (gradients off for the whole process after
one call); a gradient reversal layer reversed nothing and a straight-through estimator passed zero gradient.

Each test compares the transformed model's task-loss gradients (``orth_regularizer`` changes no forward, and the
penalty is left out) with the untransformed model's, in fx and export capture, and checks that no call leaves
gradients off in the process.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import orthofx
from orthofx.capture import restore_grad_mode, set_grad_mode
from orthofx.errors import CaptureError

MODES = ("fx", "export")


def _policy(mode: str, leaf_modules=()) -> dict:
    return {"orthofx": 1, "capture": {"mode": mode, "leaf_modules": list(leaf_modules)},
            "rules": [{"match": {"type": "Linear"}, "apply": "orth_regularizer"}]}


@pytest.fixture(autouse=True)
def grad_mode_kept():
    """Every test starts with gradients on and must leave them on (a leaked ``no_grad`` entry fails it)."""
    torch.set_grad_enabled(True)
    yield
    left_on = torch.is_grad_enabled()
    torch.set_grad_enabled(True)
    assert left_on, "gradients were left off in the process"


def _transform(model: nn.Module, x: torch.Tensor, mode: str, leaf_modules=()) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own "pass use_reentrant explicitly" and the like
        return orthofx.transform(model, _policy(mode, leaf_modules), example_inputs=(x,))


def _task_gradients(module: nn.Module, x: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of ``(module(x) * weights).sum()`` for every parameter (None where none reached it)."""
    module.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = module(x)
    assert torch.is_grad_enabled(), "the forward left gradients off"
    assert out.requires_grad
    (out * weights).sum().backward()
    return {name: p.grad for name, p in module.named_parameters()}


def _assert_same_gradients(model: nn.Module, gm: nn.Module, x: torch.Tensor) -> None:
    torch.manual_seed(1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weights = torch.randn_like(model(x))
    expected = _task_gradients(model, x, weights)
    got = _task_gradients(gm, x, weights)
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        assert grad is not None
        assert got[name] is not None, f"{name}: no gradient in the transformed model"
        torch.testing.assert_close(got[name], grad, rtol=1e-12, atol=1e-12, msg=f"{name}")


def _capture_info(gm: nn.Module):
    return orthofx.manifest_of(gm).capture


# ----------------------------------------------------------------------------------------- activation checkpointing


class _Checkpointed(nn.Module):
    """stem -> checkpointed body -> head, the body checkpointed in one of torch's ways."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.stem = nn.Linear(6, 6)
        self.body = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.stem(x)
        if self.how == "reentrant":
            h = checkpoint(self.body, h, use_reentrant=True)
        elif self.how == "default":
            h = checkpoint(self.body, h)  # torch's default where use_reentrant is not passed: reentrant
        elif self.how == "non_reentrant":
            h = checkpoint(self.body, h, use_reentrant=False)
        elif self.how == "sequential":
            h = checkpoint_sequential(self.body, 2, h, use_reentrant=True)
        else:
            h = checkpoint_sequential(self.body, 2, h, use_reentrant=False)
        return self.head(h)


HOWS = ("reentrant", "default", "non_reentrant", "sequential", "sequential_non_reentrant")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", HOWS)
def test_checkpointed_body_keeps_every_gradient_and_warns(how, mode):
    torch.manual_seed(0)
    model = _Checkpointed(how).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    gm = _transform(model, x, mode)
    _assert_same_gradients(model, gm, x)
    for _ in range(2):  # more calls, in both training modes: the mode stays on
        gm.eval()
        gm(x)
        assert torch.is_grad_enabled()
        gm.train()
    info = _capture_info(gm)
    found = [w for w in info.warnings if "torch.utils.checkpoint" in w]
    assert len(found) == 1, info.warnings
    assert "the model's forward (_Checkpointed)" in found[0]
    assert "instead of recomputing" in found[0] and "capture.leaf_modules" in found[0]


class _Block(nn.Module):
    """A block whose own forward checkpoints its inner layers; counts the inner layers' forward calls."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.reentrant = reentrant
        self.inner = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
        self.calls = 0
        self.inner.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1

    def forward(self, x):
        return x + checkpoint(self.inner, x, use_reentrant=self.reentrant)


class _WithBlock(nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        self.stem = nn.Linear(6, 6)
        self.block = _Block(reentrant)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpoint_in_a_submodule_names_it_and_leaf_modules_keeps_the_recomputation(reentrant, mode):
    torch.manual_seed(0)
    model = _WithBlock(reentrant).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    gm = _transform(model, x, mode)
    _assert_same_gradients(model, gm, x)
    found = [w for w in _capture_info(gm).warnings if "torch.utils.checkpoint" in w]
    assert len(found) == 1 and "submodule 'block' (_Block)" in found[0] and "leaf_modules: [_Block]" in found[0]

    # the warning's fix: the block as a leaf runs as written, its checkpoint recomputing the inner layers in backward
    kept = _transform(model, x, mode, leaf_modules=["_Block"])
    assert not [w for w in _capture_info(kept).warnings if "torch.utils.checkpoint" in w]
    _assert_same_gradients(model, kept, x)
    block = kept.get_submodule("block")
    block.calls = 0
    kept(x).sum().backward()
    assert block.calls == 2  # forward, then the recomputation


# ----------------------------------------------------------------------------------------- custom autograd Functions


class GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


class STERound(torch.autograd.Function):
    """Rounds in the forward, passes the gradient straight through."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ReverseGradient(nn.Module):
    def forward(self, x):
        return GradReverse.apply(x)


class _Quantized(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return self.fc(STERound.apply(x * 4.0))


class _DomainAdversarial(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Linear(6, 6)
        self.reverse = _ReverseGradient()
        self.quantized = _Quantized()
        self.domain = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.features(x))
        return self.domain(self.reverse(h)) + self.quantized(h)[:, :2]


@pytest.mark.parametrize("mode", MODES)
def test_functions_in_submodules_keep_their_backward(mode):
    torch.manual_seed(0)
    model = _DomainAdversarial().double()
    x = torch.randn(5, 6, dtype=torch.float64)
    gm = _transform(model, x, mode)
    _assert_same_gradients(model, gm, x)
    fallbacks = dict(_capture_info(gm).leaf_fallbacks)
    assert set(fallbacks) == {"reverse", "quantized"}
    assert "autograd.Function GradReverse" in fallbacks["reverse"]
    assert "autograd.Function STERound" in fallbacks["quantized"]
    assert "drops STERound.backward" in fallbacks["quantized"]
    # the Linear inside the kept module is still a site
    sites = {row["site"] for row in orthofx.explain(model, _policy(mode), example_inputs=(x,)).rows()}
    assert "quantized.fc" in sites and "features" in sites


class _AtTop(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Linear(6, 6)
        self.domain = nn.Linear(6, 2)

    def forward(self, x):
        return self.domain(GradReverse.apply(self.features(x)))


class _CaughtAtTop(_AtTop):
    def forward(self, x):
        h = self.features(x)
        try:
            h = GradReverse.apply(h)
        except Exception:  # noqa: BLE001 - a forward hiding the refusal must not get a graph without the call
            pass
        return self.domain(h)


@pytest.mark.parametrize("cls", [_AtTop, _CaughtAtTop])
@pytest.mark.parametrize("mode", ["fx", "export", "auto"])
def test_function_in_the_models_own_forward_is_refused_with_the_fix(cls, mode):
    model = cls()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CaptureError) as info:
        _transform(model, torch.randn(4, 6), mode)
    text = str(info.value)
    assert f"the model's own forward ({cls.__name__}) calls the autograd.Function GradReverse" in text
    assert "drops GradReverse.backward" in text
    assert "move the call into a submodule" in text and "capture.leaf_modules" in text
    assert "test_autograd_function_capture_s46.py" in text  # the line of the call
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------------------- the safety net


def _switches(*modes_and_restores) -> torch.fx.Graph:
    """A graph making the given switches: a bool enters a block, ``"restore"`` leaves the innermost one."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    entries = []
    for step in modes_and_restores:
        if step == "restore":
            graph.call_function(restore_grad_mode, (entries.pop(),))
        else:
            entries.append(graph.call_function(set_grad_mode, (step,)))
    graph.output(x)
    return graph


def test_unpaired_grad_switches_are_a_capture_error():
    from orthofx.capture import _check_mode_switches, _ModeBounds

    # what export capture recorded for a reentrant checkpoint: the no_grad exit inside Function.apply (where torch
    # had turned gradients off already) came out as a second entry
    with pytest.raises(CaptureError, match="gradients off after each call, where the model's forward leaves them on"):
        _check_mode_switches(_switches(False, False), _ModeBounds(True, True, 0), "torch.export")
    # balanced blocks, nested ones, and a switch the forward leaves on purpose pass
    _check_mode_switches(_switches(False, "restore"), _ModeBounds(True, True, 0), "torch.export")
    _check_mode_switches(_switches(False, False, "restore", "restore"), _ModeBounds(True, True, 0), "fx")
    _check_mode_switches(_switches(False), _ModeBounds(True, False, 0), "fx")
    with pytest.raises(CaptureError, match="gradients on after each call"):
        _check_mode_switches(_switches(False, "restore"), _ModeBounds(True, False, 0), "fx")


# ------------------------------------------------------------------ a Function called in one training mode only


class _ReverseWhileTraining(nn.Module):
    """Reverses the gradient in training mode only (the usual domain-adversarial switch)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        h = self.fc(x)
        return GradReverse.apply(h) if self.training else h


class _ReverseWhileEvaluating(_ReverseWhileTraining):
    def forward(self, x):
        h = self.fc(x)
        return h if self.training else GradReverse.apply(h)


class _OneModeAdversarial(nn.Module):
    def __init__(self, reverse: type):
        super().__init__()
        self.features = nn.Linear(6, 6)
        self.reverse = reverse()
        self.domain = nn.Linear(6, 2)

    def forward(self, x):
        return self.domain(self.reverse(torch.tanh(self.features(x))))


@pytest.mark.parametrize("reverse, transformed_in, run_in", [(_ReverseWhileTraining, "eval", "train"),
                                                             (_ReverseWhileEvaluating, "train", "eval")])
@pytest.mark.parametrize("mode", MODES)
def test_function_called_in_the_other_mode_only_keeps_its_module_in_both_modes(reverse, transformed_in, run_in,
                                                                              mode):
    # the other mode's trace refused the call and capture only warned that it could not capture that mode: the
    # returned module then ran this mode's graph there, with no reversal (fx), or kept another leaf set (export)
    torch.manual_seed(0)
    model = _OneModeAdversarial(reverse).double()
    getattr(model, transformed_in)()
    x = torch.randn(5, 6, dtype=torch.float64)
    gm = _transform(model, x, mode)
    info = _capture_info(gm)
    assert [path for path, _ in info.leaf_fallbacks] == ["reverse"]
    assert "autograd.Function GradReverse" in info.leaf_fallbacks[0][1]
    assert not any("could not be captured" in w for w in info.warnings), info.warnings
    for run in (run_in, transformed_in):
        getattr(model, run)()
        getattr(gm, run)()
        _assert_same_gradients(model, gm, x)
    # the Linear inside the kept module is still a site
    sites = {row["site"] for row in orthofx.explain(model, _policy(mode), example_inputs=(x,)).rows()}
    assert {"features", "reverse.fc", "domain"} <= sites


class _AtTopWhileTraining(_AtTop):
    def forward(self, x):
        h = self.features(x)
        if self.training:
            h = GradReverse.apply(h)
        return self.domain(h)


@pytest.mark.parametrize("mode", ["fx", "export", "auto"])
def test_function_in_the_models_own_forward_in_the_other_mode_only_is_refused(mode):
    model = _AtTopWhileTraining().eval()
    with pytest.raises(CaptureError) as info:
        _transform(model, torch.randn(4, 6), mode)
    text = str(info.value)
    assert "the model's own forward (_AtTopWhileTraining) calls the autograd.Function GradReverse" in text
    assert "move the call into a submodule" in text
    assert "h = GradReverse.apply(h)" in text  # the line of the call
    assert not model.training  # the model's mode is left as it was


# ------------------------------------------------------------ decompositions inside a module kept for a Function


class FusedSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * s * (1 + x * (1 - s))


@torch.library.custom_op("orthofx_test_s46::reversed_copy", mutates_args=())
def reversed_copy(x: torch.Tensor) -> torch.Tensor:
    """A gradient reversal as a custom op: the forward copies, the backward (registered below) negates."""
    return x.clone()


@reversed_copy.register_fake
def _reversed_copy_fake(x):
    return torch.empty_like(x)


reversed_copy.register_autograd(lambda ctx, grad: -grad)


class _Whiten(nn.Module):
    """A projection, an activation and an eigendecomposition (a site of the svd preset's function rule)."""

    def __init__(self, as_custom_op: bool):
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.as_custom_op = as_custom_op

    def forward(self, x):
        h = reversed_copy(self.proj(x)) if self.as_custom_op else FusedSiLU.apply(self.proj(x))
        cov = h.T @ h / h.shape[0] + 1e-3 * torch.eye(6, dtype=h.dtype)
        _, vectors = torch.linalg.eigh(cov)
        return h @ vectors


class _Whitened(nn.Module):
    def __init__(self, as_custom_op: bool):
        super().__init__()
        self.whiten = _Whiten(as_custom_op)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.whiten(x))


def _svd_policy(mode: str) -> orthofx.Policy:
    data = orthofx.Policy.preset("svd").to_dict()
    data.setdefault("capture", {})["mode"] = mode
    return orthofx.Policy.from_dict(data)


@pytest.mark.parametrize("mode", MODES)
def test_no_decomposition_matched_names_the_leaf_a_function_kept(mode):
    model = _Whitened(as_custom_op=False)
    x = torch.randn(16, 6)
    for run in (lambda: _quiet(orthofx.transform, model, _svd_policy(mode), example_inputs=(x,)),
                lambda: _quiet(orthofx.explain, model, _svd_policy(mode), example_inputs=(x,))):
        with pytest.raises(orthofx.errors.PlanError) as info:
            run()
        text = str(info.value)
        assert "matched no function site" in text
        assert "capture kept 'whiten' (its forward calls the autograd.Function FusedSiLU" in text
        assert "a decomposition inside a leaf is no site" in text
        assert "torch.library.custom_op with register_autograd" in text
        assert "move the decomposition out of that module" in text


@pytest.mark.parametrize("mode", MODES)
def test_a_custom_op_with_its_autograd_is_kept_as_one_op_and_the_rest_is_traced(mode):
    # the remedy the message above gives: the module is no leaf, its decomposition is a site, and the op's own
    # backward (a reversal, where autograd of its forward would pass the gradient unchanged) still runs
    torch.manual_seed(0)
    model = _Whitened(as_custom_op=True).double()
    x = torch.randn(16, 6, dtype=torch.float64)
    gm = _quiet(orthofx.transform, model, _svd_policy(mode), example_inputs=(x,))
    assert _capture_info(gm).leaf_fallbacks == []
    targets = [node.target for node in gm.graph.nodes if node.op == "call_function"]
    assert torch.ops.orthofx_test_s46.reversed_copy.default in targets
    assert any(getattr(t, "__name__", "") == "stable_eigh" for t in targets)
    plain = _transform(model, x, mode)  # Linear rules only: the forward and the gradients are the model's
    assert _capture_info(plain).leaf_fallbacks == []
    _assert_same_gradients(model, plain, x)
    # and the gradient is the reversed one: through the copy alone, autograd of the forward would give +
    copy = nn.Sequential(nn.Linear(6, 6)).double()
    inputs = x.clone().requires_grad_(True)
    reversed_copy(copy(inputs)).sum().backward()
    reversed_grad = inputs.grad.clone()
    inputs.grad = None
    copy(inputs).sum().backward()
    torch.testing.assert_close(reversed_grad, -inputs.grad)


def _quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)
