"""orthofx.nn layers put directly into a user's model and used with standard PyTorch tooling (not through
orthofx.transform): torch.fx.symbolic_trace, torch.func (functional_call, vmap + grad per-sample gradients) and
torch.export.

References are independent of the code under test where one exists: the plain torch conv a layer freezes into
(``to_conv``), torch.linalg's own eigh / svd gradients, a loop of per-sample ``torch.autograd.grad`` calls, or the
eager layer on a deep copy (for the layers that symbolic tracing records as one call).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx
from torch import nn
from torch.func import functional_call, grad, vmap

from orthofx.errors import CaptureError, LayerArgumentError
from orthofx.nn import ConvNormConv2d, JacobianProbe, OrthogonalConv1d, OrthogonalConv2d, OrthogonalConvTranspose2d
from orthofx.nn.conditioning import DecompositionMonitor, stable_eigh
from orthofx.nn.decompositions import ConditionMonitor, eigh_stable, svd_stable
from references import lorth64

pytestmark = pytest.mark.usefixtures("one_thread")


class _Holder(nn.Module):
    """A user's model holding one layer (symbolic tracing enters the holder and meets the layer as a submodule)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return torch.tanh(self.layer(x)) * 2


def _param_grads(module: nn.Module, out: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in module.parameters() if p.requires_grad]
    return list(torch.autograd.grad(out.square().sum(), params))


def _per_sample_grads(module: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Opacus-style per-sample gradients: ``vmap(grad(loss of functional_call))`` over the batch."""
    params = {k: v.detach() for k, v in module.named_parameters()}
    buffers = dict(module.named_buffers())

    def loss(p, xi):
        return functional_call(module, {**p, **buffers}, (xi.unsqueeze(0),)).square().sum()

    return vmap(grad(loss), in_dims=(None, 0))(params, x)


def _per_sample_loop(module: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference: one ``torch.autograd.grad`` per sample."""
    names = [k for k, _ in module.named_parameters()]
    rows = []
    for xi in x:
        out = module(xi.unsqueeze(0)).square().sum()
        rows.append(torch.autograd.grad(out, [dict(module.named_parameters())[k] for k in names]))
    return {k: torch.stack([row[i] for row in rows]) for i, k in enumerate(names)}


# ------------------------------------------------------------------------------------------- cayley_fft


_CAYLEY = {
    "2d": (lambda: OrthogonalConv2d(4, 4, 3, method="cayley_fft", input_size=8), (2, 4, 8, 8)),
    "2d-stride2-groups": (lambda: OrthogonalConv2d(4, 8, 1, stride=2, groups=2, method="cayley_fft",
                                                   input_size=(8, 8)), (2, 4, 8, 8)),
    "1d-float32-build": (lambda: OrthogonalConv1d(3, 6, 3, method="cayley_fft", input_size=8,
                                                  compute_dtype=torch.float32), (2, 3, 8)),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(_CAYLEY))
def test_cayley_fft_layer_traces_symbolically_with_eager_outputs_and_gradients(case, training):
    """``cayley_fft`` has a fixed input size, so its whole computation is fixed by the module: the traced model
    computes the symbol op by op from the parameter and equals the plain conv it freezes into (``to_conv``, an
    explicit full-size kernel), with the eager layer's parameter gradients. (It raised fx's raw "Proxy object
    cannot be iterated" in the input-size check.)"""
    make, shape = _CAYLEY[case]
    torch.manual_seed(0)
    model = _Holder(make()).train(training)
    x = torch.randn(shape)
    traced = torch.fx.symbolic_trace(model)
    assert "cayley_kernel" in traced.code  # the symbol is built in the graph, from the parameter
    with torch.no_grad():
        plain = torch.tanh(model.layer.to_conv()(x)) * 2
    torch.testing.assert_close(traced(x), plain, atol=1e-5, rtol=1e-5)
    for got, want in zip(_param_grads(traced, traced(x)), _param_grads(model, model(x))):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_traced_cayley_fft_keeps_its_input_checks():
    torch.manual_seed(1)
    traced = torch.fx.symbolic_trace(_Holder(OrthogonalConv2d(4, 4, 3, method="cayley_fft", input_size=8)))
    with pytest.raises(LayerArgumentError, match=r"built for inputs of spatial size \(8, 8\), got \(6, 6\)"):
        traced(torch.randn(2, 4, 6, 6))
    with pytest.raises(LayerArgumentError, match=r"in_channels=4\): expected an input of shape"):
        traced(torch.randn(1, 8, 8, 8))  # 8 channels into 4 would otherwise be read as a batch of 2
    unbatched = torch.randn(4, 8, 8)
    torch.testing.assert_close(traced(unbatched), traced(unbatched.unsqueeze(0)).squeeze(0))


def test_frozen_fourier_conv_traces_symbolically():
    torch.manual_seed(2)
    layer = OrthogonalConv2d(4, 8, 3, stride=2, method="cayley_fft", input_size=8)
    frozen = layer.to_plain()
    x = torch.randn(3, 4, 8, 8)
    traced = torch.fx.symbolic_trace(_Holder(frozen))
    with torch.no_grad():
        torch.testing.assert_close(traced(x), torch.tanh(layer.to_conv()(x)) * 2, atol=1e-5, rtol=1e-5)
    with pytest.raises(LayerArgumentError, match="the frozen Fourier-domain operator was built"):
        traced(torch.randn(3, 4, 4, 4))


def test_eval_layer_traced_under_no_grad_keeps_answering_tensors():
    """The eval-mode kernel cache stored the Proxy that building the kernel gives during symbolic tracing (traced
    under no_grad, eval): every later eager forward returned ``Proxy(getattr_..)`` instead of a tensor."""
    torch.manual_seed(3)
    layer = OrthogonalConv2d(4, 4, 3).eval()
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        traced = torch.fx.symbolic_trace(_Holder(layer))
        out = layer(x)
        assert isinstance(out, torch.Tensor)
        torch.testing.assert_close(out, layer.to_conv()(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(traced(x), torch.tanh(out) * 2)


# ------------------------------------------------------------------------------------------- ConvNorm


@pytest.mark.parametrize("momentum", [None, 0.5])
def test_convnorm_is_one_call_in_a_symbolic_trace(momentum):
    """ConvNorm's grid, filter and crop follow from the input's spatial size, which a Proxy lacks: symbolic
    tracing records the layer as one ``call_module`` (what fx does for a leaf) instead of failing with fx's raw
    "symbolically traced variables cannot be used as inputs to control flow". The traced model then equals the
    eager one in train and eval, on several input sizes, and updates the same running filters."""
    torch.manual_seed(4)
    model = _Holder(ConvNormConv2d(nn.Conv2d(3, 4, 3, stride=2, padding=1), affine=True, momentum=momentum))
    reference = copy.deepcopy(model)
    traced = torch.fx.symbolic_trace(model)
    calls = [n.target for n in traced.graph.nodes if n.op == "call_module"]
    assert calls == ["layer"]
    for training in (True, False):
        traced.train(training)
        reference.train(training)
        for size in (8, 6):
            x = torch.randn(2, 3, size, size)
            got, want = traced(x), reference(x)
            torch.testing.assert_close(got, want)
            for a, b in zip(_param_grads(traced, got), _param_grads(reference, want)):
                torch.testing.assert_close(a, b)
    assert sorted(model.layer.running_grids) == sorted(reference.layer.running_grids)
    for grid in reference.layer.running_grids:
        torch.testing.assert_close(model.layer.running_filter(grid), reference.layer.running_filter(grid))


def test_frozen_convnorm_is_one_call_in_a_symbolic_trace():
    torch.manual_seed(5)
    layer = ConvNormConv2d(nn.Conv2d(3, 4, 3, padding=1)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = torch.tanh(layer(x)) * 2
    traced = torch.fx.symbolic_trace(_Holder(layer.to_plain()))
    torch.testing.assert_close(traced(x), want)
    with pytest.raises(LayerArgumentError, match="no precomputed ConvNorm filter for input size"):
        traced(torch.randn(2, 3, 6, 6))


def test_convnorm_traced_as_the_root_names_the_fix():
    layer = ConvNormConv2d(nn.Conv2d(3, 4, 3, padding=1))
    with pytest.raises(CaptureError, match=r"cannot be traced symbolically by itself: its FFT grid.*Trace a model "
                                           r"that holds it as a submodule"):
        torch.fx.symbolic_trace(layer)


def test_convnorm_with_momentum_in_training_refuses_torch_func_transforms():
    """The running filter's in-place update cannot run under vmap/grad: torch's raw "mutate a captured Tensor",
    and on a first call a functorch-wrapped tensor left behind as the layer's buffer."""
    torch.manual_seed(6)
    layer = ConvNormConv2d(nn.Conv2d(3, 4, 3, padding=1), momentum=0.1)
    x = torch.randn(3, 3, 6, 6)
    with pytest.raises(LayerArgumentError, match=r"momentum=0.1\): in training mode each forward updates the "
                                                 r"running ConvNorm filter.*layer.eval\(\)"):
        _per_sample_grads(layer, x)
    assert layer.running_grids == []  # nothing was registered by the refused call
    layer(x)  # a normal training step makes the running filter, then eval mode reads it under the transform
    layer.eval()
    got = _per_sample_grads(layer, x)
    want = _per_sample_loop(layer, x)
    for name in want:
        # float32 sums of gradients up to ~100: both routes are ~2e-5 from the float64 computation, so the
        # absolute tolerance scales with the largest entry (1e-5 flat failed on an entry of 0.08 by 1.4e-5)
        scale = float(want[name].abs().max())
        torch.testing.assert_close(got[name], want[name], atol=1e-6 * scale, rtol=1e-5)


# ------------------------------------------------------------------------------------------- monitors


class _MonitoredEigh(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.monitor = DecompositionMonitor("eigenvalues", values_index=0, op="eigh")

    def forward(self, x):
        z = self.lin(x)
        cov = z.mT @ z + torch.eye(4)
        L, V = self.monitor(stable_eigh(cov))
        return z @ V * L.unsqueeze(-2)


def test_condition_monitors_are_one_call_in_a_symbolic_trace():
    torch.manual_seed(7)
    model = _MonitoredEigh()
    reference = copy.deepcopy(model)
    traced = torch.fx.symbolic_trace(model)
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["lin", "monitor"]
    x = torch.randn(5, 4)
    torch.testing.assert_close(traced(x), reference(x))
    assert int(model.monitor.updates) == 1
    torch.testing.assert_close(model.monitor.last, reference.monitor.last)

    plain = torch.fx.symbolic_trace(_Holder(ConditionMonitor()))
    assert plain.layer is not None and [n.op for n in plain.graph.nodes].count("call_module") == 1


def test_condition_monitor_refuses_torch_func_transforms_with_the_fix():
    torch.manual_seed(8)
    model = _MonitoredEigh()
    with pytest.raises(LayerArgumentError, match=r"records into its buffers in place.*monitor: false"):
        _per_sample_grads(model, torch.randn(3, 5, 4))


# ------------------------------------------------------------------------------------------- eigh / svd


def test_stable_eigh_and_svd_give_per_sample_gradients_under_vmap_and_grad():
    """torch.func refuses the custom ops' registered autograd ("must override the setup_context staticmethod",
    pytorch/pytorch#168393); inside a transform the ops run as an autograd.Function with the same formulas. With
    the exact gradient (``taylor_order=None``) and distinct eigenvalues it equals torch.linalg's own."""
    torch.manual_seed(9)
    A = torch.randn(3, 4, 4, dtype=torch.float64)
    A = A @ A.mT + torch.eye(4, dtype=torch.float64)
    B = torch.randn(3, 5, 3, dtype=torch.float64)
    weights = torch.randn(4, 4, dtype=torch.float64)

    def eigh_loss(decompose):
        def loss(a):
            L, V = decompose(a)
            return (L * weights[0]).sum() + (V.abs() * weights).sum()  # |V|: sign-invariant
        return loss

    def svd_loss(decompose):
        def loss(a):
            U, S, Vh = decompose(a)
            return (S * weights[0, :3]).sum() + U.abs().sum() + (Vh.abs() * weights[:3, :3]).sum()
        return loss

    got = vmap(grad(eigh_loss(lambda a: eigh_stable(a, taylor_order=None))))(A)
    want = vmap(grad(eigh_loss(torch.linalg.eigh)))(A)
    torch.testing.assert_close(got, want)
    got = vmap(grad(svd_loss(lambda a: svd_stable(a, taylor_order=None))))(B)
    want = vmap(grad(svd_loss(lambda a: torch.linalg.svd(a, full_matrices=False))))(B)
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------------------- JacobianProbe


def test_jacobian_probe_is_one_call_in_a_symbolic_trace():
    """The probe shares its block's registries without registering the block, so fx could not trace into it
    ("module is not installed as a submodule" in eval, a misleading orthofx error in training); it is recorded as
    one call, and the traced model makes the same estimate."""
    torch.manual_seed(10)
    block = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
    model = _Holder(JacobianProbe(block, seed=0))
    reference = copy.deepcopy(model)
    traced = torch.fx.symbolic_trace(model)
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["layer"]
    x = torch.randn(4, 6)
    torch.testing.assert_close(traced(x), reference(x))
    torch.testing.assert_close(model.layer.estimate, reference.layer.estimate)
    traced.eval()
    reference.eval()
    torch.testing.assert_close(traced(x), reference(x))


def test_training_jacobian_probe_refuses_torch_func_and_export_with_the_fix():
    torch.manual_seed(11)
    probe = JacobianProbe(nn.Sequential(nn.Linear(6, 6), nn.Tanh()))
    x = torch.randn(3, 6)
    with pytest.raises(LayerArgumentError, match=r"inside a torch.func transform.*probe.eval\(\)"):
        _per_sample_grads(probe, x)
    with pytest.raises(LayerArgumentError, match=r"under torch.export.*probe.eval\(\)"):
        torch.export.export(_Holder(probe), (x,))
    probe.eval()  # the fix the messages give: per-sample gradients of the block itself
    got = _per_sample_grads(probe, x)
    want = _per_sample_loop(probe, x)
    for name in want:
        torch.testing.assert_close(got[name], want[name])


def test_circular_pad_wrapping_more_than_once_traces_symbolically():
    """``CircularPad`` (the padding of frozen layers with pads of 2 or more) is one call in a symbolic trace; its
    values against an explicit periodic index (pads wider than the map wrap around more than once)."""
    from orthofx.nn.padding import CircularPad

    model = nn.Sequential(CircularPad([(3, 3), (2, 1)]), nn.Conv2d(2, 2, 3))
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 2, 2, 3)
    rows = torch.arange(-3, 2 + 3) % 2
    cols = torch.arange(-2, 3 + 1) % 3
    reference = model[1](x[:, :, rows][:, :, :, cols])
    torch.testing.assert_close(traced(x), reference, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- penalty and report
# A model written with orthofx.nn layers and never transformed: orthofx.penalty sums its probes' penalties and
# orthofx.report tables its layers, without a manifest.


class _Probed(nn.Module):
    """A user's model with two probed blocks (float64, so that the zero penalty's dtype is checked)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(JacobianProbe(nn.Sequential(nn.Linear(5, 5), nn.Tanh()), weight=0.3),
                                  nn.Linear(5, 5),
                                  JacobianProbe(nn.Sequential(nn.Linear(5, 4), nn.Sigmoid()), weight=2.0))

    def forward(self, x):
        return self.body(x)


def _double_probed() -> _Probed:
    torch.manual_seed(20)
    return _Probed().double()


def test_penalty_of_an_untransformed_model_sums_its_probes_with_their_gradient():
    import orthofx

    model = _double_probed()
    first, second = model.body[0], model.body[2]
    before = orthofx.penalty(model)
    assert before.dtype == torch.float64 and before.item() == 0.0
    model(torch.randn(6, 5, dtype=torch.float64))
    reference = 0.3 * first.estimate + 2.0 * second.estimate
    assert reference.item() > 0
    got = orthofx.penalty(model)
    torch.testing.assert_close(got, reference, rtol=1e-12, atol=0)
    params = list(model.parameters())
    want = torch.autograd.grad(reference, params, retain_graph=True, allow_unused=True)
    have = torch.autograd.grad(got, params, retain_graph=True, allow_unused=True)
    for w, h in zip(want, have):
        assert (w is None) == (h is None)
        if w is not None:
            torch.testing.assert_close(h, w, rtol=1e-12, atol=0)
    assert have[0].abs().sum() > 0 and have[2] is None  # the probed block's weight; the unprobed Linear's none
    terms = orthofx.penalty_terms(model)
    assert list(terms) == ["JacobianProbe/body.0", "JacobianProbe/body.2"]
    torch.testing.assert_close(terms["JacobianProbe/body.0"], 0.3 * first.estimate, rtol=1e-12, atol=0)
    torch.testing.assert_close(terms["JacobianProbe/body.2"], 2.0 * second.estimate, rtol=1e-12, atol=0)
    model.eval()
    model(torch.randn(6, 5, dtype=torch.float64))
    after = orthofx.penalty(model)
    assert after.dtype == torch.float64 and after.item() == 0.0
    assert all(t.dtype == torch.float64 and t.item() == 0.0 for t in orthofx.penalty_terms(model).values())


def test_penalty_and_report_refuse_a_model_without_orthofx_layers():
    import orthofx
    from orthofx.errors import OrthofxError

    plain = nn.Sequential(nn.Conv2d(2, 2, 3), nn.ReLU())
    for call in (orthofx.penalty, orthofx.penalty_terms, orthofx.report):
        with pytest.raises(OrthofxError, match=r"Sequential was not produced by orthofx.transform and holds no "
                                               r"orthofx layer.*orthofx.transform\(model, policy\)"):
            call(plain)


def test_penalty_and_report_of_an_untransformed_model_through_torch_compile():
    import orthofx

    model = _double_probed()
    model(torch.randn(6, 5, dtype=torch.float64))
    compiled = torch.compile(model)  # the wrapper only: unwrapped, not run
    reference = 0.3 * model.body[0].estimate + 2.0 * model.body[2].estimate
    torch.testing.assert_close(orthofx.penalty(compiled), reference, rtol=1e-12, atol=0)
    assert list(orthofx.penalty_terms(compiled)) == ["JacobianProbe/body.0", "JacobianProbe/body.2"]
    assert [row["site"] for row in orthofx.report(compiled).rows] == ["body.0", "body.0.0", "body.1", "body.2",
                                                                       "body.2.0"]


class _Written(nn.Module):
    """A user's model mixing orthofx and torch layers (never run by the report test)."""

    def __init__(self):
        super().__init__()
        self.stem = OrthogonalConv2d(4, 8, 3)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.up = OrthogonalConvTranspose2d(8, 4, 4, stride=2, padding=1)
        self.fixed = OrthogonalConv2d(4, 4, 3, method="cayley_fft", input_size=(8, 8))
        self.norm = ConvNormConv2d(nn.Conv2d(4, 4, 3, padding=1))
        self.probe = JacobianProbe(nn.Sequential(nn.Linear(6, 6), nn.Tanh()), weight=0.5)
        self.monitor = ConditionMonitor()
        self.head = nn.Linear(6, 3)


def test_report_of_an_untransformed_model_tables_its_layers_without_changing_it():
    import orthofx
    from orthofx import metrics, theory

    torch.manual_seed(21)
    model = _Written()
    model.monitor(torch.tensor([1.0, 4.0]))  # kappa 4
    model.probe(torch.randn(3, 6))  # a training-mode estimate
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rep = orthofx.report(model)
    rows = {row["site"]: row for row in rep.rows}
    # the inner conv of the transposed layer and of ConvNorm are their layer's rows; the probe's block's are its own
    assert list(rows) == ["stem", "down", "up", "fixed", "norm", "probe", "probe.0", "monitor", "head"]
    assert rows["stem"]["pass"] == "orthofx layer" and rows["down"]["pass"] is None
    assert rows["stem"]["layer"] == "OrthogonalConv2d(4->8, k=3, s=1)"
    assert rows["probe"]["layer"] == "JacobianProbe(Sequential)"
    assert abs(rows["stem"]["lorth"]) < 1e-10
    want = metrics.lorth(model.down.weight.detach().double(), stride=(2, 2))
    assert rows["down"]["lorth"] == pytest.approx(float(want), rel=1e-12)
    # and that is P0's L_orth: the dense circular operator's Gram error at stride 2 (tests/references.py)
    assert rows["down"]["lorth"] == pytest.approx(lorth64(model.down.weight, stride=2), rel=1e-9)
    for site, (c_in, c_out, stride) in {"stem": (4, 8, 1), "down": (8, 8, 2)}.items():
        result = theory.orthogonal_conv_exists(c_in, c_out, 3, stride)
        assert rows[site]["exists"] == f"{'yes' if result.exists else 'no'} ({result.case})"
    assert rows["down"]["sigma_min"] is None and rows["down"]["input"] is None  # the model was not run
    assert rows["fixed"]["input"] == (8, 8)
    assert rows["fixed"]["sigma_min"] == pytest.approx(1.0, abs=1e-6)
    assert rows["fixed"]["sigma_max"] == pytest.approx(1.0, abs=1e-6)
    assert rows["monitor"]["kappa"] == 4.0 and rows["monitor"]["updates"] == 1
    assert rep.conditioning == {"monitor": [4.0]}
    [term] = rep.penalties
    estimate = float(model.probe.estimate.detach())
    assert term["site"] == "probe" and term["value"] == pytest.approx(estimate, rel=1e-12)
    assert term["weighted"] == pytest.approx(0.5 * estimate, rel=1e-12)
    text = str(rep)
    assert "not transformed" in text and "OrthogonalConvTranspose2d(8->4, k=4, s=2)" in text
    after = model.state_dict()
    assert list(after) == list(state)
    for key, value in state.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
