"""Session 45: a conv with one input and one output channel per group (a depthwise conv, ``groups = in = out``, as
ConvNeXt's 7x7 or MobileNet's 3x3, or a plain 1 -> 1 conv) at stride 1 has, with circular padding, only finitely many
exactly orthogonal versions: per channel a circular all-pass filter of finite support, a single tap of +-1. The
``orthogonal_conv`` pass replaced such a layer by a fixed signed shift whose only parameter never got a gradient
(explain said ``apply``, the report ``hard``). It now treats it as a layer with no (trainable) orthogonal version:
``on_impossible`` decides, so the ``orthogonal`` preset gives it L_orth. Strided depthwise convs (a unit vector over
the ``S^d`` taps a window reads) and convs with 2 channels per group still train as hard layers.

References: the dense float64 operator of the layer (built here from unit inputs), P0's L_orth on the dense circular
operator (``references.lorth64``), and gradients of plain torch."""

import math

import pytest
import torch
from torch import nn

import orthofx
from orthofx import metrics
from orthofx.nn import OrthogonalConv1d, OrthogonalConv2d
from references import lorth64

FIXED_SHIFT = "no trainable orthogonal convolution exists"
L_ORTH_STATUS = "regularised (no trainable orthogonal version)"
CONV = {1: nn.Conv1d, 2: nn.Conv2d}
ORTHOGONAL = {1: OrthogonalConv1d, 2: OrthogonalConv2d}

# (name, conv factory, spatial input size): stride 1, so every exactly orthogonal kernel is a signed shift
STRIDE_ONE = [
    ("dw1d_k3", lambda: nn.Conv1d(4, 4, 3, padding=1, groups=4), (8,)),
    ("dw1d_k4_even", lambda: nn.Conv1d(4, 4, 4, padding="same", groups=4), (8,)),
    ("dw2d_k7_convnext", lambda: nn.Conv2d(3, 3, 7, padding=3, groups=3), (8, 8)),
    ("dw2d_k2_even", lambda: nn.Conv2d(3, 3, 2, padding="same", groups=3, bias=False), (6, 6)),
    ("dw2d_k3_dilated", lambda: nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4), (8, 8)),
    ("single_channel_2d", lambda: nn.Conv2d(1, 1, 3, padding=1), (6, 6)),
    ("single_channel_1d", lambda: nn.Conv1d(1, 1, 5, padding=2, bias=False), (10,)),
]


def _model(conv: nn.Module) -> nn.Module:
    return nn.Sequential(conv, nn.Tanh())


def _example(conv: nn.Module, size) -> tuple[torch.Tensor]:
    return (torch.randn(2, conv.in_channels, *size),)


def _row(gm, site="0"):
    return next(row for row in orthofx.report(gm).rows if row["site"] == site)


def _dense(layer: nn.Module, shape) -> torch.Tensor:
    """The matrix (float64) of the linear part of ``layer`` on inputs of ``shape`` (no batch): one column per unit
    input, the bias taken off."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    with torch.no_grad():
        out = layer(basis) - layer(torch.zeros(1, *shape, dtype=torch.float64))
    return out.reshape(n, -1).T


@pytest.mark.parametrize("name,make,size", STRIDE_ONE, ids=[c[0] for c in STRIDE_ONE])
def test_stride_one_depthwise_gets_lorth_under_the_orthogonal_preset(name, make, size):
    torch.manual_seed(0)
    conv = make()
    model, example = _model(conv), _example(conv, size)
    plan = orthofx.explain(model, "orthogonal", example_inputs=example)
    outcome = next(entry.outcome for entry in plan.entries if entry.site.name == "0")
    assert outcome.startswith(f"L_orth instead: {FIXED_SHIFT}: one input and one output channel per group "
                              f"(in={conv.in_channels}, out={conv.out_channels}, groups={conv.groups}")
    assert outcome.endswith("(on_impossible: regularize)")
    assert f"kernel_size={tuple(conv.kernel_size)}" in outcome and "at stride 1" in outcome

    gm = orthofx.transform(model, "orthogonal", example_inputs=example)
    layer = gm.get_submodule("0")
    assert type(layer) is type(conv)  # the user's conv, not a fixed shift
    torch.testing.assert_close(layer.weight, conv.weight, atol=0, rtol=0)
    row = _row(gm)
    assert L_ORTH_STATUS in row["pass"]
    assert "hard" not in row["pass"]

    # the penalty term is 0.01 L_orth of this weight: orthofx.metrics and the dense circular operator agree
    terms = orthofx.penalty_terms(gm)
    assert list(terms) == ["orthogonal/0"]
    expected = metrics.lorth(layer.weight.detach().double(), stride=layer.stride, groups=layer.groups,
                             dilation=layer.dilation)
    assert float(terms["orthogonal/0"].detach()) == pytest.approx(0.01 * float(expected), rel=1e-5)
    if all(d == 1 for d in layer.dilation):
        assert float(expected) == pytest.approx(lorth64(layer.weight, groups=layer.groups), rel=1e-9)

    # it trains: the task loss and the penalty both reach more than one tap of every channel's kernel
    before = layer.weight.detach().clone()
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.05)
    x = example[0]
    target = torch.roll(x, 1, dims=-1).flip(-1)[:, :gm.get_submodule("0").out_channels]
    for _ in range(3):
        optimizer.zero_grad()
        loss = (gm(x) - torch.tanh(target)).square().mean() + orthofx.penalty(gm)
        loss.backward()
        grad = layer.weight.grad.reshape(layer.weight.shape[0], -1)
        assert ((grad.abs() > 1e-8).sum(dim=1) >= min(2, grad.shape[1])).all()
        optimizer.step()
    moved = (layer.weight.detach() - before).reshape(before.shape[0], -1)
    assert ((moved.abs() > 1e-7).sum(dim=1) >= min(2, moved.shape[1])).all()


@pytest.mark.parametrize("name,make,size", STRIDE_ONE, ids=[c[0] for c in STRIDE_ONE])
def test_on_impossible_error_says_why_and_how(name, make, size):
    conv = make()
    model, example = _model(conv), _example(conv, size)
    policy = {"rules": [{"name": "hard", "match": {"type": type(conv).__name__}, "apply": "orthogonal_conv",
                         "with": {"on_impossible": "error"}}]}
    with pytest.raises(orthofx.ImpossibleLayerError) as info:
        orthofx.transform(model, policy, example_inputs=example)
    text = str(info.value)
    assert text.startswith("rule 'hard': 0 (")
    assert FIXED_SHIFT in text and "a single tap of +-1" in text
    assert f"in={conv.in_channels}, out={conv.out_channels}, groups={conv.groups}" in text
    assert f"kernel_size={tuple(conv.kernel_size)}" in text
    assert "'on_impossible: regularize'" in text and "'skip'" in text
    assert 'exclude: ["0"]' in text
    assert ("where: {groups: 1}" in text) == (conv.groups > 1)
    assert f"build orthofx.nn.OrthogonalConv{conv.weight.dim() - 2}d directly" in text
    plan = orthofx.explain(model, policy, example_inputs=example)
    assert next(e.outcome for e in plan.entries).startswith(f"fails: {FIXED_SHIFT}")
    # skip: left as it is, and the report says why
    policy["rules"][0]["with"]["on_impossible"] = "skip"
    gm = orthofx.transform(model, policy, example_inputs=example)
    assert type(gm.get_submodule("0")) is type(conv)
    assert f"skipped: {FIXED_SHIFT}" in _row(gm)["pass"]
    assert not orthofx.penalty_terms(gm)


def test_the_remedies_the_error_names_work():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 8, 1))
    x = torch.randn(2, 4, 8, 8)
    # where: {groups: 1} leaves the depthwise conv out and replaces the pointwise one
    policy = {"rules": [{"match": {"type": "Conv2d", "where": {"groups": 1}}, "apply": "orthogonal_conv",
                         "with": {"on_impossible": "error"}}]}
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    assert type(gm.get_submodule("0")) is nn.Conv2d
    assert isinstance(gm.get_submodule("1"), OrthogonalConv2d)
    # method cayley_fft: a trainable exactly orthogonal depthwise layer (a full-size all-pass kernel per channel)
    policy = {"rules": [{"match": {"type": "Conv2d", "where": {"groups": 4}}, "apply": "orthogonal_conv",
                         "with": {"on_impossible": "error", "method": "cayley_fft"}}]}
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    layer = gm.get_submodule("0").double()
    A = _dense(layer, (4, 8, 8))
    torch.testing.assert_close(A @ A.T, torch.eye(A.shape[0], dtype=torch.float64), atol=1e-10, rtol=0)
    y = layer(torch.randn(2, 4, 8, 8, dtype=torch.float64))
    (y * torch.randn_like(y)).sum().backward()  # (not ||y||^2: constant for every orthogonal layer)
    grads = [p.grad for n, p in layer.named_parameters() if n != "bias"]
    assert grads and all(g is not None and g.abs().max() > 1e-6 for g in grads)


# (name, conv factory, input shape without batch): still hard layers, with a kernel that trains
TRAINABLE = [
    ("dw2d_stride2_k3", lambda: nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4), (4, 8, 8)),
    ("dw1d_stride2_k3", lambda: nn.Conv1d(3, 3, 3, stride=2, padding=1, groups=3), (3, 8)),
    ("two_per_group_2d", lambda: nn.Conv2d(4, 4, 3, padding=1, groups=2), (4, 6, 6)),
    ("depth_multiplier_2", lambda: nn.Conv1d(3, 6, 3, padding=1, groups=3), (3, 8)),
    ("dw_transposed_stride2_k4", lambda: nn.ConvTranspose1d(3, 3, 4, stride=2, padding=1, groups=3), (3, 5)),
]


@pytest.mark.parametrize("name,make,shape", TRAINABLE, ids=[c[0] for c in TRAINABLE])
def test_trainable_grouped_layers_stay_hard_and_orthogonal(name, make, shape):
    torch.manual_seed(2)
    conv = make()
    model = _model(conv)
    x = torch.randn(2, *shape)
    assert next(e.outcome for e in orthofx.explain(model, "orthogonal", example_inputs=(x,)).entries) == ""
    gm = orthofx.transform(model, "orthogonal", example_inputs=(x,)).double()
    assert _row(gm)["pass"] == "orthogonal_conv (hard)"
    layer = gm.get_submodule("0")
    assert type(layer).__name__ == "Orthogonal" + type(conv).__name__
    assert not orthofx.penalty_terms(gm)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = layer.weight.detach().clone()
    for _ in range(2):
        optimizer.zero_grad()
        gm(torch.randn(2, *shape, dtype=torch.float64)).sin().sum().backward()
        kernel_grads = [p.grad for n, p in layer.named_parameters() if n != "bias"]
        assert any(g is not None and g.abs().max() > 1e-6 for g in kernel_grads)
        optimizer.step()
    assert (layer.weight.detach() - before).abs().max() > 1e-4  # the kernel moved ...
    A = _dense(layer, shape)  # ... and stays exactly orthogonal (RO: orthonormal rows; CO: columns)
    gram = A @ A.T if A.shape[0] <= A.shape[1] else A.T @ A
    torch.testing.assert_close(gram, torch.eye(gram.shape[0], dtype=torch.float64), atol=1e-10, rtol=0)


def test_stride_one_depthwise_transposed_conv_gets_lorth():
    conv = nn.ConvTranspose1d(4, 4, 3, padding=1, groups=4)
    model, x = _model(conv), torch.randn(2, 4, 8)
    gm = orthofx.transform(model, "orthogonal", example_inputs=(x,))
    assert type(gm.get_submodule("0")) is nn.ConvTranspose1d
    assert L_ORTH_STATUS in _row(gm)["pass"]
    with pytest.raises(orthofx.ImpossibleLayerError, match="OrthogonalConvTranspose1d directly"):
        orthofx.transform(model, {"rules": [{"match": {"type": "ConvTranspose1d"}, "apply": "orthogonal_conv"}]},
                          example_inputs=(x,))


def _sizes(value, dims):
    return (value,) * dims if isinstance(value, int) else tuple(value)


def _layer_kernel_trains(dims, c_in, c_out, k, stride, dilation, groups) -> bool:
    """Whether ``OrthogonalConv{dims}d`` with these sizes (random start) has a parameter of its kernel that gets a
    nonzero gradient from a random linear function of its output."""
    torch.manual_seed(3)
    layer = ORTHOGONAL[dims](c_in, c_out, k, stride=stride, dilation=dilation, groups=groups, bias=False).double()
    grid = [12] * dims
    y = layer(torch.randn(2, c_in, *grid, dtype=torch.float64))
    (y * torch.randn_like(y)).sum().backward()
    return any(p.grad is not None and p.grad.abs().max() > 1e-10 for p in layer.parameters())


CASES = [(dims, c_in, c_out, groups, k, stride, dilation)
         for dims in (1, 2)
         for c_in, c_out, groups in ((1, 1, 1), (3, 3, 3), (3, 6, 3), (4, 4, 2), (2, 1, 1))
         for k in (1, 2, 3) for stride in (1, 2) for dilation in (1, 2)
         if orthofx.theory.orthogonal_conv_exists(c_in, c_out, k, stride, dims=dims, groups=groups,
                                                  dilation=dilation).exists]
CASES += [(2, 3, 3, 3, (1, 3), (2, 1), 1), (2, 3, 3, 3, (3, 1), (1, 2), 1), (2, 3, 3, 3, (3, 3), (2, 1), 1),
          (2, 3, 3, 3, (2, 1), 2, 1), (2, 3, 3, 3, 3, 2, (2, 1))]


@pytest.mark.parametrize("dims,c_in,c_out,groups,k,stride,dilation", CASES)
def test_the_pass_refuses_exactly_the_layers_whose_orthogonal_kernel_cannot_train(dims, c_in, c_out, groups, k,
                                                                                  stride, dilation):
    """The pass's condition (one channel in and out per group, windows reading one input mod the stride) against
    the layer class itself: its kernel gets no gradient there, and does everywhere else."""
    from orthofx.passes.orthogonal_conv import _impossibility
    conv = CONV[dims](c_in, c_out, k, stride=stride, dilation=dilation, groups=groups)
    problem = _impossibility(conv, "keep")
    refused = problem is not None and problem.startswith(FIXED_SHIFT)
    assert refused == (not _layer_kernel_trains(dims, c_in, c_out, k, stride, dilation, groups))
    per_group_one = c_in == c_out == groups
    reads_one = all(kk == 1 or s == 1 or d % s == 0 for kk, s, d in
                    zip(_sizes(k, dims), _sizes(stride, dims), _sizes(dilation, dims)))
    assert refused == (per_group_one and reads_one)


def test_the_layer_class_still_builds_the_fixed_shift():
    """Built directly, the depthwise stride-1 layer is what it was: exactly orthogonal, each channel a single signed
    tap, and a kernel that no gradient reaches (why the pass no longer uses it)."""
    torch.manual_seed(4)
    layer = OrthogonalConv2d(3, 3, 3, groups=3, bias=False).double()
    A = _dense(layer, (3, 6, 6))
    torch.testing.assert_close(A @ A.T, torch.eye(A.shape[0], dtype=torch.float64), atol=1e-12, rtol=0)
    taps = layer.weight.detach().reshape(3, -1)
    assert ((taps.abs() > 1e-12).sum(dim=1) == 1).all()
    torch.testing.assert_close(taps.abs().sum(dim=1), torch.ones(3, dtype=torch.float64), atol=1e-12, rtol=0)
    y = layer(torch.randn(2, 3, 6, 6, dtype=torch.float64))
    (y * torch.randn_like(y)).sum().backward()  # (not ||y||^2: constant for every orthogonal layer)
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in layer.parameters())
