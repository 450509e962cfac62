"""Small fixes of session 28, each with the input that showed the old behaviour."""

import warnings

import pytest
import torch
from torch import nn

import orthofx
from orthofx.nn.orthogonal import OrthogonalConv2d, OrthogonalLinear
from references import circular_operator64, state_copy, bitwise_equal


def orthogonal_rule(gain):
    return {"rules": [{"match": {"type": "Conv2d"}, "apply": "orthogonal_conv", "with": {"gain": gain}}]}


@pytest.mark.parametrize("gain", [1e39, 1e-40, 1e-320])
def test_a_gain_float32_weights_cannot_hold_is_refused_by_the_layer(gain):
    """gain 1e39 filled a float32 kernel with inf (NaN outputs); 1e-40 and 1e-320 left it zero or subnormal, a layer
    that is not gain times orthogonal, without a word."""
    with pytest.raises(orthofx.LayerArgumentError, match=r"OrthogonalConv2d: gain=.*outside the range of normal "
                                                         r"torch.float32"):
        OrthogonalConv2d(4, 4, 3, gain=gain)
    with pytest.raises(orthofx.LayerArgumentError, match=r"OrthogonalLinear: gain=.*torch.float32"):
        OrthogonalLinear(3, 3, gain=gain)


def test_a_large_gain_within_the_dtype_range_builds_gain_times_an_orthogonal_operator():
    for gain, dtype in ((1e30, torch.float32), (1e39, torch.float64)):
        layer = OrthogonalConv2d(3, 3, 3, gain=gain, bias=False, dtype=dtype)
        sigma = torch.linalg.svdvals(circular_operator64(layer.weight, grid=(5, 5)))
        assert float((sigma / gain - 1).abs().max()) < 1e-5, (gain, dtype)
        linear = OrthogonalLinear(4, 4, gain=gain, bias=False, dtype=dtype)
        w = linear.weight.detach().to(torch.float64) / gain
        assert torch.allclose(w @ w.T, torch.eye(4, dtype=torch.float64), atol=1e-5)


def test_the_orthogonal_conv_pass_refuses_such_a_gain_while_planning():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
    before = state_copy(model)
    for call in (orthofx.explain, orthofx.transform):
        with pytest.raises(orthofx.PlanError, match=r"rule 'orthogonal_conv\[0\]': 0 \(Conv2d.*gain=1e\+39 is outside "
                                                    r"the range of normal torch.float32.*overflows to inf"):
            call(model, orthogonal_rule(1e39))
    assert bitwise_equal(state_copy(model), before)
    # the layer is built in the conv's dtype: a float64 model takes that gain
    gm = orthofx.transform(model.double(), orthogonal_rule(1e39))
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    assert torch.isfinite(gm(x)).all()


def riemannian_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
    return orthofx.transform(model, {"rules": [{"match": {"type": "Linear"}, "apply": "riemannian"}]})


def test_lbfgs_with_inner_steps_warns_that_its_steps_are_euclidean():
    gm = riemannian_model()
    with pytest.warns(orthofx.OrthofxWarning, match=r"riemannian \(rule 'riemannian\[0\]': '0', '2'\): LBFGS "
                                                    r"with max_iter=20 .*max_iter=1") as caught:
        orthofx.attach(torch.optim.LBFGS(gm.parameters(), lr=1.0), gm)
    assert len(caught) == 1 and caught[0].filename == __file__  # once, at the user's attach call
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other = riemannian_model()
        orthofx.attach(torch.optim.LBFGS(other.parameters(), lr=1.0, max_iter=1), other)


def test_a_weight_the_step_does_not_move_keeps_its_bits():
    """A retraction of a zero step gave the weight back only to rounding: lr 0 moved it by ~1e-7 per step."""
    gm = riemannian_model()
    x = torch.randn(8, 6)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.0)
    orthofx.attach(optimizer, gm)
    before = state_copy(gm)
    for _ in range(5):
        optimizer.zero_grad()
        gm(x).square().mean().backward()
        optimizer.step()
    assert bitwise_equal(state_copy(gm), before)
    # a real step still moves and retracts (against the float64 Gram matrix)
    optimizer.param_groups[0]["lr"] = 0.1
    optimizer.zero_grad()
    gm(x).square().mean().backward()
    optimizer.step()
    w = gm.get_submodule("0").weight.detach().double()
    assert not torch.equal(gm.get_submodule("0").weight, before["0.weight"])
    assert float((w @ w.T - torch.eye(6, dtype=torch.float64)).abs().max()) < 1e-6


def test_a_complex_matrix_at_a_rewritten_decomposition_says_how_to_leave_the_site_out():
    """The stand-in told a user who had called torch.linalg.eigh to 'use torch.linalg for complex matrices'."""
    class Whiten(nn.Module):
        def forward(self, a):
            return torch.linalg.eigh(a)[0]

    gm = orthofx.transform(Whiten(), "svd")
    a = torch.randn(3, 3, dtype=torch.complex64)
    with pytest.raises(orthofx.LayerArgumentError, match=r"complex64\. .*torch.linalg's own function.*svd_conditioning"
                                                         r" pass.*match.exclude"):
        gm(a @ a.mH)


@pytest.mark.parametrize("gain", [1e39, 1e-320])
def test_isometric_init_refuses_a_scale_the_weight_cannot_hold_while_planning(gain):
    """gain 1e39 filled a float32 weight with inf (a later riemannian rule called it a corrupted checkpoint);
    1e-320 left it zero, without a word."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    before = state_copy(model)
    policy = {"rules": [{"match": {"type": "Linear"}, "apply": "isometric_init", "with": {"gain": gain}},
                        {"match": {"type": "Linear"}, "apply": "riemannian"}]}
    for call in (orthofx.explain, orthofx.transform):
        with pytest.raises(orthofx.PlanError, match=r"rule 'isometric_init\[0\]': 0 \(Linear.*scale=.* is outside the "
                                                    r"range of normal torch.float32.*the rule's gain"):
            call(model, policy)
    assert bitwise_equal(state_copy(model), before)
    if gain > 1:  # float64 holds 1e39: gain times orthonormal, to rounding
        gm = orthofx.transform(model.double(), {"rules": policy["rules"][:1]})
        w = gm.get_submodule("0").weight.detach() / gain
        assert torch.allclose(w @ w.T, torch.eye(4, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("apply", ["isometric_init", "orthogonal_conv", "orth_regularizer", "riemannian", "pre_svd",
                                   "convnorm"])
def test_a_layer_with_a_complex_weight_is_skipped_with_the_reason_by_every_weight_pass(apply):
    """isometric_init and orthogonal_conv failed inside the pass with an error naming no layer, orth_regularizer
    planned the layer and penalty() then failed; only riemannian skipped it."""
    kind = "Conv2d" if apply == "convnorm" else "Linear"
    real = nn.Conv2d(2, 2, 3) if apply == "convnorm" else nn.Linear(3, 3)
    odd = (nn.Conv2d(2, 2, 3) if apply == "convnorm" else nn.Linear(3, 3)).to(torch.complex64)
    model = nn.ModuleDict({"real": real, "odd": odd})

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.real, self.odd = real, odd

        def forward(self, x):
            return self.real(x), self.odd(x.to(torch.complex64))

    del model
    plan = orthofx.explain(Two(), {"rules": [{"match": {"type": kind}, "apply": apply}]})
    row = [line for line in str(plan).splitlines() if line.startswith("odd")][0]
    assert f"skipped: complex weight (torch.complex64): {apply} " in row and "match.exclude" in row
    assert [line for line in str(plan).splitlines() if line.startswith("real")][0].rstrip().endswith("apply")


class _Doubles(nn.Module):
    """A forward that writes into its input."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        x.mul_(2)
        return self.fc(x)


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_transform_leaves_the_example_inputs_as_they_were(mode):
    """transform ran the model on the user's tensors: x came back multiplied by 4 (two runs), and the 'after' run
    read the doubled input, so L_orth (which changes no weight) reported an output change of 0.97."""
    x = torch.ones(3, 4)
    policy = {"capture": {"mode": mode}, "rules": [{"match": {"type": "Linear"}, "apply": "orth_regularizer"}]}
    gm = orthofx.transform(_Doubles(), policy, example_inputs=(x,))
    assert torch.equal(x, torch.ones(3, 4))
    assert orthofx.report(gm).to_dict()["output_change"] == 0
    y = torch.ones(3, 4)
    expected = 2 * y @ gm.fc.weight.detach().T + gm.fc.bias.detach()
    torch.testing.assert_close(gm(y), expected)


def test_a_failed_inplace_transform_names_the_weights_it_had_written():
    """With inplace=True an earlier rule's writes stay in the user's model when a later rule fails: the error
    now says which."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Unflatten(1, (4, 1, 1)), nn.Conv2d(4, 4, 3, padding=1))
    with torch.no_grad():
        model[2].weight[0, 0, 0, 0] = float("nan")
    policy = {"rules": [{"match": {"type": "Linear"}, "apply": "isometric_init"},
                        {"match": {"type": "Conv2d"}, "apply": "orthogonal_conv"}]}
    with pytest.raises(orthofx.TransformError, match=r"no nearest orthogonal layer.*With inplace=True, earlier rules "
                                                     r"had already written 0\.weight, 0\.bias of the model"):
        orthofx.transform(model, policy, inplace=True)
    with pytest.raises(orthofx.TransformError) as caught:  # a copy: nothing of the user's was written
        orthofx.transform(model, policy)
    assert "inplace" not in str(caught.value)


def test_report_of_a_model_holding_a_skipped_complex_layer_shows_it_without_figures():
    """report() raised linear_singular_values' dtype error for the layer the pass had skipped."""
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4, dtype=torch.cfloat)
            self.g = nn.Linear(4, 4)

        def forward(self, x):
            return self.g(self.fc(x).real)

    gm = orthofx.transform(Mixed(), "lorth", example_inputs=(torch.randn(2, 4, dtype=torch.cfloat),))
    rows = {row["site"]: row for row in orthofx.report(gm).to_dict()["rows"]}
    assert rows["fc"]["pass"].startswith("skipped: complex weight") and rows["fc"]["lorth"] is None
    w = gm.g.weight.detach().double()
    assert rows["g"]["sigma_max"] == pytest.approx(float(torch.linalg.svdvals(w)[0]), rel=1e-6)


def test_load_of_a_float64_model_takes_float64_example_inputs(tmp_path):
    """load replayed the policy on the float32 model it was given with the float64 inputs, which failed, reported
    as the policy not fitting the model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    gm = orthofx.transform(model, "lorth", example_inputs=(x.float(),)).double()
    path = tmp_path / "m.pt"
    orthofx.export(gm, path)
    fresh = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    before = state_copy(fresh)
    restored = orthofx.load(fresh, path, example_inputs=(x,))
    assert next(restored.parameters()).dtype == torch.float64
    assert torch.equal(restored(x), gm(x))
    assert bitwise_equal(state_copy(fresh), before) and fresh[0].weight.dtype == torch.float32
    # float32 example inputs still work, as before (the model is converted after the replay)
    assert torch.equal(orthofx.load(fresh, path, example_inputs=(x.float(),))(x), gm(x))


def test_attach_refuses_an_optimizer_of_the_model_before_the_transform():
    """An optimizer built from the original model holds none of gm's parameters: with a policy without hooks
    (lorth) attach said nothing and optimizer.step() never updated gm."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    stale = torch.optim.SGD(model.parameters(), lr=0.1)
    gm = orthofx.transform(model, "lorth")
    with pytest.raises(orthofx.ArgumentError, match=r"holds none of the model's trainable parameters.*before "
                                                    r"orthofx.transform"):
        orthofx.attach(stale, gm)
    assert len(orthofx.attach(torch.optim.SGD(gm.parameters(), lr=0.1), gm).hooks) == 0
    # an optimizer of a part of gm only (several optimizers) is fine
    orthofx.attach(torch.optim.SGD(gm.get_submodule("2").parameters(), lr=0.1), gm)


def test_pre_svd_orthogonal_weight_skips_a_frozen_layer_unless_told_to_overwrite():
    """'weight: orthogonal' replaced a frozen (pretrained, kept fixed) Pre-SVD layer by its nearest orthogonal
    one, another function, without a word."""
    class Whiten(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 4)

        def forward(self, x):
            f = self.proj(x)
            return torch.linalg.eigvalsh(f.T @ f / x.shape[0] + torch.eye(4)).sum()

    model = Whiten()
    model.proj.requires_grad_(False)
    rule = {"match": {"feeds": "linalg.eigvalsh"}, "apply": "pre_svd", "with": {"weight": "orthogonal"}}
    with pytest.raises(orthofx.PlanError, match=r"proj: frozen \(weight requires_grad=False.*frozen: overwrite"):
        orthofx.explain(model, {"rules": [rule]})
    rule["with"]["frozen"] = "overwrite"
    gm = orthofx.transform(model, {"rules": [rule]})
    w = gm.proj.weight.detach().double()
    assert type(gm.proj).__name__ == "OrthogonalLinear" and not gm.proj.raw_weight.requires_grad
    assert torch.allclose(w @ w.T, torch.eye(4, dtype=torch.float64), atol=1e-6)


def test_a_rule_whose_exclude_leaves_out_everything_says_so():
    """The error listed the graph's sites (which the rule's type did match) and never mentioned the exclude."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    policy = {"rules": [{"match": {"type": "Linear", "exclude": ["0", "[0-9]"]}, "apply": "orth_regularizer"}]}
    with pytest.raises(orthofx.PlanError, match=r"Its exclude \(0, \[0-9\]\) left out all 2 site\(s\) it selects "
                                                r"otherwise: 0, 2\."):
        orthofx.explain(model, policy)
    policy["rules"][0]["match"]["where"] = {"in_features": 5}  # nothing to leave out: no exclude hint
    with pytest.raises(orthofx.PlanError) as caught:
        orthofx.explain(model, policy)
    assert "exclude" not in str(caught.value)


def test_example_inputs_given_twice_stay_one_tensor_in_the_copies():
    """transform's copies of the example inputs made (x, x) two tensors: a forward writing one argument and reading
    the other ran differently from the user's call."""
    class WritesFirstReadsSecond(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, a, b):
            a.add_(1)
            return self.fc(b)

    from orthofx.transform import ExampleCall
    x = torch.zeros(2, 3)
    call = ExampleCall((x, x), {"c": x}).fresh()
    assert call.args[0] is call.args[1] is call.kwargs["c"] and call.args[0] is not x
    model = WritesFirstReadsSecond()
    gm = orthofx.transform(model, "lorth", example_inputs=(x, x))
    assert torch.equal(x, torch.zeros(2, 3)) and orthofx.report(gm).to_dict()["output_change"] == 0


def test_a_saved_probe_step_beyond_the_period_is_taken_modulo_it(tmp_path):
    """The .pt file's probe steps were restored as they were, while the state dict's metadata took them modulo the
    probe's period; a step from a file saved with a longer 'every' left the probe outside its period."""
    from orthofx.export import PROBE_PHASES_KEY
    from orthofx.nn.jacobian import JacobianProbe
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 3), nn.Tanh()), nn.Linear(3, 2))
    policy = {"rules": [{"match": {"kind": "block", "name": "0"}, "apply": "jacobian_isometry",
                         "with": {"every": 3}}]}
    gm = orthofx.transform(model, policy)
    path = tmp_path / "m.pt"
    orthofx.export(gm, path)
    saved = torch.load(path, weights_only=True)
    saved[PROBE_PHASES_KEY] = {"0": 7}
    torch.save(saved, path)
    restored = orthofx.load(model, path)
    probe = restored.get_submodule("0")
    assert isinstance(probe, JacobianProbe) and probe.calls == 7 % 3


def test_jacobian_probes_have_an_upper_bound_everywhere():
    """probes: 2**80 was accepted (an estimate that would never finish, or a compiled graph unrolled without end)."""
    from orthofx.metrics import MAX_JACOBIAN_PROBES
    from orthofx.nn.jacobian import JacobianProbe
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 3), nn.Tanh()), nn.Linear(3, 2))
    rule = {"match": {"kind": "block", "name": "0"}, "apply": "jacobian_isometry",
            "with": {"probes": MAX_JACOBIAN_PROBES + 1}}
    with pytest.raises(orthofx.PolicyError, match=r"probes.*<= 1024"):
        orthofx.explain(model, {"rules": [rule]})
    with pytest.raises(orthofx.LayerArgumentError, match="probes=1025 is more than 1024"):
        JacobianProbe(nn.Linear(2, 2), probes=MAX_JACOBIAN_PROBES + 1)
    with pytest.raises(orthofx.ArgumentError, match="probes=1025 is more than 1024"):
        orthofx.metrics.jacobian_isometry(nn.Linear(2, 2), torch.randn(2, 2), probes=MAX_JACOBIAN_PROBES + 1)
    # the bound itself is allowed: the mean over 1024 probes of a linear map's ||(J^T J - I) v||^2 is near its
    # expectation ||J^T J - I||_F^2 (per sample: the Jacobian of x -> W x is W)
    torch.manual_seed(0)
    linear = nn.Linear(2, 2, bias=False).double()
    a = linear.weight.detach().T @ linear.weight.detach() - torch.eye(2, dtype=torch.float64)
    x = torch.randn(1, 2, dtype=torch.float64)
    estimate = orthofx.metrics.jacobian_isometry(linear, x, probes=MAX_JACOBIAN_PROBES)
    assert float(estimate) == pytest.approx(float(a.square().sum()), rel=0.15)


@pytest.mark.parametrize("shape,groups", [((8, 8, 3, 3), 1), ((8, 4, 5, 3), 2), ((6, 6, 5, 3, 3), 1), ((4, 8, 5), 1)])
def test_lorth_of_a_kernel_with_zero_border_taps_is_unchanged_by_trimming_them(shape, groups):
    """metrics.lorth drops all-zero border taps at stride 1 when no derivative is taken (a delta-orthogonal kernel
    becomes one tap: isometric_init's report figures 5x faster); value against the dense float64 operator."""
    from references import lorth64
    torch.manual_seed(0)
    w = torch.zeros(shape, dtype=torch.float64)
    inner = (slice(None), slice(None)) + tuple(slice(1, k - 1) for k in shape[2:])
    w[inner] = torch.randn(w[inner].shape, dtype=torch.float64)
    expected = lorth64(w, groups=groups)
    for dtype, rel in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        assert float(orthofx.metrics.lorth(w.to(dtype), groups=groups)) == pytest.approx(expected, rel=rel)
    # differentiated, the border taps keep their gradient: d L / d w at a zero border tap by central differences
    # (the first tap of the first spatial dimension, inside the others: nonzero where that dimension's interior
    # holds more than one tap, as the autocorrelation at the tap's lags is then nonzero)
    leaf = w.clone().requires_grad_(True)
    orthofx.metrics.lorth(leaf, groups=groups).backward()
    index = (0, 0, 0) + (1,) * (len(shape) - 3)
    step = 1e-6
    plus, minus = w.clone(), w.clone()
    plus[index] += step
    minus[index] -= step
    numeric = (lorth64(plus, groups=groups) - lorth64(minus, groups=groups)) / (2 * step)
    assert float(leaf.grad[index]) == pytest.approx(numeric, rel=1e-5, abs=1e-8)
    if shape[2] > 3:
        assert abs(numeric) > 1e-3


def test_a_model_whose_rnn_ran_through_a_parametrized_weight_can_be_copied():
    """After a forward, an RNN's _flat_weights holds the weight a parametrization computed (a non-leaf tensor):
    transform's deep copy raised torch's 'Only Tensors created explicitly by the user' RuntimeError."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.RNN(3, 4)
            parametrize.register_parametrization(self.rnn, "weight_ih_l0", Double())

        def forward(self, x):
            return self.rnn(x)[0]

    torch.manual_seed(0)
    model = Model()
    x = torch.randn(5, 2, 3)
    model(x).sum().backward()
    gm = orthofx.transform(model, {"rules": [{"match": {"type": "RNN"}, "apply": "orth_regularizer"}]},
                           example_inputs=(x,))
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(orthofx.freeze(gm)(x), model(x), rtol=0, atol=0)


def test_report_counts_a_hidden_weight_tied_within_an_rnn_once_as_the_penalty_does():
    """A 2-layer RNN with weight_hh_l1 = weight_hh_l0: the report row's L_orth counted the tensor twice (18.3),
    the penalty once (12.5)."""
    from references import lorth64
    torch.manual_seed(0)
    rnn = nn.RNN(4, 4, num_layers=2)
    rnn.weight_hh_l1 = rnn.weight_hh_l0
    model = nn.Sequential(rnn)
    gm = orthofx.transform(model, {"rules": [{"match": {"type": "RNN"}, "apply": "orth_regularizer",
                                              "with": {"weight": 1.0}}]})
    w = rnn.weight_hh_l0.detach().double()
    expected = lorth64(w.reshape(4, 4, 1))
    row = orthofx.report(gm).to_dict()["rows"][0]
    assert row["lorth"] == pytest.approx(expected, rel=1e-9)
    assert float(orthofx.penalty(gm)) == pytest.approx(expected, rel=1e-5)


def test_onnx_export_of_an_lstm_with_proj_size_is_refused_up_front_and_pt2_works(tmp_path):
    """torch's ONNX exporter writes the projected LSTM's cell state in the wrong size: the error blamed an op
    onnxruntime lacks, after a full export."""
    class Projected(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(3, 4, proj_size=2, batch_first=True)

        def forward(self, x):
            return self.lstm(x)[0]

    torch.manual_seed(0)
    gm = orthofx.transform(Projected(), {"rules": [{"match": {"type": "LSTM"}, "apply": "orth_regularizer"}]})
    x = torch.randn(2, 5, 3)
    with pytest.raises(orthofx.ExportError, match=r"LSTM with proj_size.*'lstm'.*\.pt2"):
        orthofx.export(gm, tmp_path / "m.onnx", (x,))
    assert not (tmp_path / "m.onnx").exists()
    result = orthofx.export(gm, tmp_path / "m.pt2", (x,))
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    torch.testing.assert_close(program(x), gm(x))
    assert result is not None
