"""Session 45, small fixes.

1. A Jacobian probe on an empty batch (batch size 0 in a training forward) makes no estimate: the penalty is 0 for
   it, as in eval mode (the ``jacobian`` preset raised from inside the model; ``per_sample: false, normalize:
   true`` gave a NaN loss); the step still counts in ``every``. ``orthofx.metrics.jacobian_isometry`` refuses an
   empty input whatever ``per_sample`` / ``normalize`` (it returned NaN, or a zero, silently). Under
   torch.compile an empty batch of data-dependent size (a mask selection, ``mark_unbacked``) cannot be told empty
   while tracing: its estimate is 0 (``per_sample`` raised torch's "Runtime assertion failed for expression
   Ne(u0, 0)", ``normalize`` gave NaN).
   References: the plain model's output and gradients, the run without the empty step, the eager probe.
2. ``orthofx.export``'s ``opset`` is documented.
3. Exporting or freezing a plain torch model raises :class:`orthofx.ExportError` on every path (``.pt2`` /
   ``.onnx`` / ``freeze`` raised a plain OrthofxError, ``.pt`` an ExportError).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import orthofx
from orthofx.errors import ArgumentError
from orthofx.metrics import jacobian_isometry
from orthofx.nn import JacobianProbe

_PER_SAMPLE_FALSE_NORMALIZE = {"orthofx": 1, "rules": [{
    "match": {"kind": "block", "type": "Sequential", "name": "re:[^.]+"}, "apply": "jacobian_isometry",
    "with": {"weight": 0.5, "per_sample": False, "normalize": True}}]}
POLICIES = {"jacobian preset": "jacobian", "per_sample false, normalize true": _PER_SAMPLE_FALSE_NORMALIZE}


def _plain() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh()), nn.Linear(6, 2))


def _transformed(policy) -> nn.Module:
    gm = orthofx.transform(_plain(), policy, example_inputs=(torch.randn(4, 6),))
    return gm.train()


def _probes(model: nn.Module) -> list[JacobianProbe]:
    return [m for m in model.modules() if isinstance(m, JacobianProbe)]


# ------------------------------------------------------------------------------ 1. empty batch, in the model

@pytest.mark.parametrize("policy", list(POLICIES.values()), ids=list(POLICIES))
def test_empty_batch_in_training_gives_the_models_output_and_a_zero_penalty(policy):
    plain, gm = _plain().train(), _transformed(policy)
    assert _probes(gm), "the policy wraps the block in a probe"
    empty = torch.zeros(0, 6)
    out = gm(empty)  # the jacobian preset raised here (per_sample=True on an empty batch)
    reference = plain(empty)
    assert out.shape == reference.shape == (0, 2)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    penalty = orthofx.penalty(gm)
    assert torch.isfinite(penalty) and float(penalty) == 0.0  # was NaN with normalize=True, per_sample=False
    assert all(probe.estimate is None for probe in _probes(gm))
    loss = out.square().sum() + penalty
    loss.backward()
    reference.square().sum().backward()
    grads = {name: p.grad for name, p in gm.named_parameters()}
    for name, p in plain.named_parameters():  # zero gradients, as the plain model's on an empty batch
        assert grads[name] is not None and torch.equal(grads[name], p.grad), name


@pytest.mark.parametrize("policy", list(POLICIES.values()), ids=list(POLICIES))
def test_the_step_after_an_empty_batch_estimates_as_without_it(policy):
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))
    with_empty, without = _transformed(policy), _transformed(policy)

    def step(gm, batches):
        torch.manual_seed(11)  # once: an empty step that drew numbers would change the next estimate
        for batch in batches:
            out = gm(batch)
            if not batch.numel():  # no estimate for the empty batch itself (its penalty was NaN, or it raised)
                assert float(orthofx.penalty(gm).detach()) == 0.0
                assert all(probe.estimate is None for probe in _probes(gm))
        loss = out.square().mean() + orthofx.penalty(gm)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in gm.named_parameters()}

    loss_a, grads_a = step(with_empty, [torch.zeros(0, 6), x])
    loss_b, grads_b = step(without, [x])
    assert float(orthofx.penalty(without).detach()) > 0  # an estimate was made on the non-empty step
    torch.testing.assert_close(orthofx.penalty(with_empty), orthofx.penalty(without), rtol=0, atol=0)
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_b.items():
        torch.testing.assert_close(grads_a[name], grad, rtol=0, atol=0, msg=name)


def test_an_empty_batch_is_a_step_of_every_without_an_estimate():
    # the schedule follows the model's training forwards, as orthofx.penalty's L_orth terms follow its calls
    probe = JacobianProbe(nn.Sequential(nn.Linear(4, 4), nn.Tanh()), every=2, seed=0)
    x = torch.randn(3, 4)
    estimates = []
    for batch in (torch.zeros(0, 4), x, x, x, torch.zeros(0, 4)):  # steps 0, 2 and 4 are due
        probe(batch)
        estimates.append(probe.estimate)
    assert [e is None for e in estimates] == [True, True, False, True, True]
    assert probe.calls == 1
    assert float(probe.penalty()) == 0.0
    # the phase travels in the state dict as after any other step
    other = JacobianProbe(copy.deepcopy(probe.block), every=2)
    other.load_state_dict(probe.state_dict())
    assert other.calls == 1


@pytest.mark.parametrize("options", [{"per_sample": True}, {"normalize": True}], ids=["per_sample", "normalize"])
def test_a_block_called_on_an_empty_and_a_full_subset_keeps_its_pairs(options):
    # two calls per step (a block run on two subsets of a batch): the empty one counts as a call, so the
    # next step starts at the first call again; the step's estimate is the non-empty call's (the empty call's
    # estimate raised with per_sample, and was NaN with normalize, which the step's sum kept)
    block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    probe = JacobianProbe(block, seed=0, **options)
    probe.calls_per_step = 2
    alone = JacobianProbe(copy.deepcopy(block), seed=0, **options)
    x = torch.randn(3, 4)
    for _ in range(3):
        probe(torch.zeros(0, 4))
        assert probe.estimate is None and probe.calls == 1
        probe(x)
        alone(x)
        assert probe.calls == 0
        torch.testing.assert_close(probe.estimate, alone.estimate, rtol=0, atol=0)


def test_freeze_and_eval_after_an_empty_training_batch():
    gm = _transformed("jacobian")
    gm(torch.zeros(0, 6))
    x = torch.randn(3, 6)
    frozen = orthofx.freeze(gm)
    assert not _probes(frozen) and float(orthofx.penalty(frozen)) == 0.0
    torch.testing.assert_close(frozen(x), _plain().eval()(x))
    with torch.no_grad():
        torch.testing.assert_close(gm.eval()(x), frozen(x))


def test_compiled_probe_takes_an_empty_batch_and_normal_batches_keep_their_graphs():
    eager, twin = _transformed("jacobian"), _transformed("jacobian")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda x: twin(x).square().sum() + orthofx.penalty(twin), backend=counter,
                             fullgraph=True)

    def eager_loss(x):
        return eager(x).square().sum() + orthofx.penalty(eager)

    for i, batch in enumerate((3, 5, 7, 4)):  # a static graph, then a dynamic batch: two graphs
        x = torch.randn(batch, 6, generator=torch.Generator().manual_seed(i))
        torch.manual_seed(i)
        expected = eager_loss(x)
        torch.manual_seed(i)
        torch.testing.assert_close(compiled(x), expected)
    assert counter.frame_count == 2
    torch.manual_seed(0)
    value = compiled(torch.zeros(0, 6))  # size 0 is specialised: its own graph, with no estimate
    assert float(value.detach()) == 0.0 and _probes(twin)[0].estimate is None
    assert counter.frame_count == 3
    x = torch.randn(6, 6)
    torch.manual_seed(9)
    expected = eager_loss(x)
    torch.manual_seed(9)
    torch.testing.assert_close(compiled(x), expected)
    assert counter.frame_count == 3  # the dynamic graph again


_OPTIONS = [{}, {"per_sample": True}, {"normalize": True}, {"per_sample": True, "normalize": True, "kind": "offdiag"}]
_OPTION_IDS = ["plain", "per_sample", "normalize", "per_sample, normalize, offdiag"]


@pytest.mark.parametrize("options", _OPTIONS, ids=_OPTION_IDS)
def test_compiled_probe_on_a_batch_of_data_dependent_size_matches_eager(options):
    # a batch a mask selects inside the compiled graph has an unbacked size: asking whether it is empty must not
    # raise dynamo's "Could not guard on data-dependent expression" (the probe estimates as before, and the mean
    # and normalisation over a size that may be 0 give the eager values)
    eager = JacobianProbe(nn.Sequential(nn.Linear(4, 4), nn.Tanh()), seed=None, **options)
    twin = copy.deepcopy(eager)

    def loss(probe, x):
        return probe(x[x[:, 0] > 0]).square().sum() + probe.penalty()

    compiled = torch.compile(lambda x: loss(twin, x), fullgraph=True, backend="aot_eager")
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        torch.manual_seed(4)
        value = compiled(x)
    torch.manual_seed(4)
    expected = loss(eager, x)
    assert twin.estimate is not None and float(eager.penalty().detach()) > 0
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(twin.estimate, eager.estimate)


# offdiag's variance over the probes of no samples: torch warns that it has no degrees of freedom (its value, an
# empty tensor, sums to the 0 asserted)
_EMPTY_VARIANCE = pytest.mark.filterwarnings(r"ignore:var\(\). degrees of freedom is <= 0:UserWarning")


def _compiled_loss(probe: JacobianProbe, select: bool):
    def loss(x):
        return probe(x[x[:, 0] > 100] if select else x).square().sum() + probe.penalty()

    counter = CompileCounterWithBackend("aot_eager")
    return torch.compile(loss, backend=counter, fullgraph=True), counter


def _assert_zero_penalty_and_gradient(probe: JacobianProbe, value: torch.Tensor):
    assert probe.estimate is not None and float(probe.estimate.detach()) == 0.0  # estimated, as zero (documented)
    assert float(value.detach()) == 0.0 == float(probe.penalty().detach())  # was NaN with normalize
    value.backward()
    for name, p in probe.named_parameters():
        assert p.grad is not None and not p.grad.any(), name
        p.grad = None


@_EMPTY_VARIANCE
@pytest.mark.parametrize("options", _OPTIONS, ids=_OPTION_IDS)
def test_compiled_probe_on_an_empty_mask_selection_has_a_zero_penalty(options):
    # the mask selects nothing: an empty batch whose size the trace cannot know, so the probe estimates it; the
    # estimate is the zero an eager probe's penalty has (per_sample raised "Runtime assertion failed for
    # expression Ne(u0, 0)", normalize gave NaN)
    probe = JacobianProbe(nn.Sequential(nn.Linear(4, 4), nn.Tanh()), **options)
    compiled, counter = _compiled_loss(probe, select=True)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        value = compiled(torch.randn(8, 4))
    _assert_zero_penalty_and_gradient(probe, value)
    eager = JacobianProbe(copy.deepcopy(probe.block), **options)
    x = torch.randn(8, 4)
    value = eager(x[x[:, 0] > 100]).square().sum() + eager.penalty()
    assert float(value.detach()) == 0.0 and eager.estimate is None
    assert counter.frame_count == 1


@_EMPTY_VARIANCE
@pytest.mark.parametrize("options", _OPTIONS, ids=_OPTION_IDS)
def test_compiled_probe_on_an_unbacked_batch_takes_an_empty_one_in_the_same_graph(options):
    block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    probe, eager = JacobianProbe(block, **options), JacobianProbe(copy.deepcopy(block), **options)
    compiled, counter = _compiled_loss(probe, select=False)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    unbacked = x.clone()
    torch._dynamo.decorators.mark_unbacked(unbacked, 0)
    torch.manual_seed(5)
    value = compiled(unbacked)
    torch.manual_seed(5)
    torch.testing.assert_close(value, eager(x).square().sum() + eager.penalty())  # the eager value
    value = compiled(torch.zeros(0, 4))  # the same graph, whose batch size may be 0
    assert counter.frame_count == 1
    _assert_zero_penalty_and_gradient(probe, value)


# ------------------------------------------------------------------------------ 1. the metric refuses an empty input

@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("shape", [(0, 6), (3, 0)])
def test_metric_refuses_an_empty_input_whatever_the_options(per_sample, normalize, shape):
    # was NaN (normalize=True), or 0 (the empty sum) passed off as a measurement
    with pytest.raises(ArgumentError, match=rf"x is empty \(shape {re.escape(str(shape))}.*at least one sample.*"
                                            "Skip the estimate for an empty batch"):
        jacobian_isometry(lambda x: 2 * x, torch.zeros(shape), per_sample=per_sample, normalize=normalize)


def test_metric_docstring_says_an_empty_input_raises():
    doc = " ".join(jacobian_isometry.__doc__.split())
    assert "An empty ``x`` (no elements, such as a batch of 0) raises" in doc


# ------------------------------------------------------------------------------ 2. opset documented

def test_export_docstring_documents_opset_and_its_bounds(tmp_path):
    doc = " ".join(orthofx.export.__doc__.split())
    assert "``opset`` (``.onnx`` only)" in doc and "default 20" in doc and "18 up to the newest" in doc
    with pytest.raises(orthofx.ExportError, match="opset 17 is not supported"):  # the bound the docstring gives
        orthofx.export(_transformed("jacobian"), tmp_path / "m.onnx", example_inputs=(torch.randn(2, 6),), opset=17)


# ------------------------------------------------------------------------------ 3. ExportError for plain models

@pytest.mark.parametrize("suffix", [".pt2", ".onnx", ".pt"])
def test_export_of_a_plain_torch_model_is_an_export_error(tmp_path, suffix):
    # .pt already raised an ExportError; .pt2 and .onnx (through freeze) a plain OrthofxError
    with pytest.raises(orthofx.ExportError, match="not produced by orthofx.transform|not returned by orthofx"):
        orthofx.export(nn.Linear(2, 2), tmp_path / f"m{suffix}", example_inputs=(torch.randn(3, 2),))
    assert not (tmp_path / f"m{suffix}").exists()


def test_freeze_of_a_plain_torch_model_is_an_export_error():
    with pytest.raises(orthofx.ExportError, match="nothing to freeze"):
        orthofx.freeze(nn.Linear(2, 2))


def test_freeze_of_an_untraceable_plain_model_is_an_export_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)  # data-dependent: no symbolic trace

    with pytest.raises(orthofx.ExportError, match="could not be captured"):
        orthofx.freeze(Branchy())


def test_freeze_of_a_single_orthofx_layer_is_an_export_error():
    with pytest.raises(orthofx.ExportError, match=r"is a single orthofx layer"):
        orthofx.freeze(JacobianProbe(nn.Linear(2, 2)))
