"""Session 29: the FFT-based orthogonal layers under autocast, and a second svd transform's message.

1. ``OrthogonalConv2d(method="cayley_fft")`` and its frozen :class:`FourierConv` return, under ``torch.autocast``,
   the dtype ``nn.Conv2d`` returns there (they returned float32 under bfloat16 autocast, where every other
   orthogonal conv returns bfloat16). The FFTs are no autocast op: the operator still runs in float32 and the output
   is rounded once. References: ``nn.Conv2d``'s dtype in the same context, and the dense float64 circular operator
   built here from the plain conv ``to_conv`` gives (torch's direct convolution, not an FFT), as a matrix.
2. A second ``orthofx.transform(gm, "svd")`` of a model the svd preset transformed said "the graph's
   decompositions: none"; it now says they are orthofx's stable ones already (how many, which, by which pass)
   and to transform the original model, as the note for orthogonal layers does.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthofx
from orthofx.capture import capture
from orthofx.errors import PlanError
from orthofx.nn import OrthogonalConv2d
from orthofx.nn.orthogonal import FourierConv
from orthofx.nn import conditioning as cond
from orthofx.plan import orthofx_decompositions
from orthofx.policy import Policy

BF16 = torch.bfloat16


def _layer(stride: int, groups: int, bias: bool) -> OrthogonalConv2d:
    torch.manual_seed(0)
    layer = OrthogonalConv2d(4, 8, 3, stride=stride, groups=groups, bias=bias, method="cayley_fft",
                             input_size=(8, 8))
    if bias:
        with torch.no_grad():
            layer.bias.uniform_(-1, 1)  # a bias that matters for the rounding
    return layer


def _dense_reference(layer: OrthogonalConv2d, x: torch.Tensor) -> torch.Tensor:
    """The circular operator as a dense float64 matrix (from the plain conv ``to_conv`` gives, applied to the
    basis of the input space) times the flattened input, plus the bias."""
    conv = layer.to_conv().double()                               # CircularPad + Conv2d with the n x n kernel
    inner = conv[-1] if isinstance(conv, nn.Sequential) else conv
    n_in = x[0].numel()
    with torch.no_grad():
        basis = torch.eye(n_in, dtype=torch.float64).reshape(n_in, *x.shape[1:])
        bias = inner.bias
        inner.bias = None
        columns = conv(basis)                                    # (n_in, M, H', W')
        out_shape = columns.shape[1:]
        matrix = columns.reshape(n_in, -1).T                     # (n_out, n_in)
        y = (x.double().reshape(len(x), -1) @ matrix.T).reshape(len(x), *out_shape)
        if bias is not None:
            y = y + bias.reshape(-1, 1, 1)
    return y


@pytest.mark.parametrize("stride, groups, bias", [(1, 1, True), (2, 1, True), (1, 2, False)])
@pytest.mark.parametrize("frozen", [False, True], ids=["live", "frozen"])
def test_fft_layers_return_conv2d_dtype_under_bf16_autocast(stride, groups, bias, frozen):
    layer = _layer(stride, groups, bias)
    module = layer.to_plain() if frozen else layer
    assert isinstance(module, FourierConv) == frozen
    conv = nn.Conv2d(4, 8, 3, stride=stride, padding=1, groups=groups, bias=bias)
    x = torch.randn(3, 4, 8, 8)
    y32 = module(x)
    ref = _dense_reference(layer, x)
    torch.testing.assert_close(y32.double(), ref, rtol=1e-5, atol=1e-5)  # the reference is the layer's operator
    with torch.autocast("cpu", dtype=BF16):
        want = conv(x).dtype
        y = module(x)
        unbatched = module(x[0])
        empty = module(x[:0])
    assert want == BF16
    assert y.dtype == unbatched.dtype == empty.dtype == want
    assert empty.shape == (0, *y.shape[1:])
    # computed in float32 and rounded once: the float32 output rounded, within bfloat16's half ulp of the exact one
    assert torch.equal(y, y32.to(BF16))
    assert torch.equal(unbatched, y32[0].to(BF16))
    torch.testing.assert_close(y.double(), ref, rtol=2 ** -8, atol=1e-6)


def test_fft_layers_keep_float64_and_bf16_inputs_and_the_float32_path():
    layer = _layer(1, 1, True)
    frozen = layer.to_plain()
    x = torch.randn(2, 4, 8, 8)
    # float32 outside autocast: bit for bit the FFT path written out here (rfft, per-frequency product, irfft)
    symbol = torch.view_as_complex(frozen.symbol)                # (1, F, 8, 4)
    xh = torch.fft.rfftn(x, dim=(-2, -1)).reshape(2, 1, 4, -1).permute(1, 3, 2, 0)
    yh = torch.matmul(symbol, xh).permute(3, 0, 2, 1).reshape(2, 8, 8, 5)
    by_hand = torch.fft.irfftn(yh, s=(8, 8), dim=(-2, -1)) + frozen.bias.reshape(-1, 1, 1)
    assert torch.equal(frozen(x), by_hand)
    assert torch.equal(layer(x), by_hand)
    # float64 inputs under autocast stay float64, as autocast leaves float64 alone
    layer64, x64 = _layer(1, 1, True).double(), x.double()
    with torch.autocast("cpu", dtype=BF16):
        assert nn.Conv2d(4, 8, 3, padding=1).double()(x64).dtype == torch.float64
        assert layer64(x64).dtype == layer64.to_plain()(x64).dtype == torch.float64
    # a float16 input under bfloat16 autocast: bfloat16, as nn.Conv2d
    with torch.autocast("cpu", dtype=BF16):
        assert layer(x.half()).dtype == nn.Conv2d(4, 8, 3, padding=1)(x.half()).dtype == BF16


@pytest.mark.parametrize("frozen", [False, True], ids=["live", "frozen"])
def test_fft_layers_under_autocast_compile_fullgraph_and_symbolic_trace(frozen):
    layer = _layer(2, 1, True)
    model = nn.Sequential(layer.to_plain() if frozen else layer)
    x = torch.randn(2, 4, 8, 8)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    traced = torch.fx.symbolic_trace(model)
    with torch.autocast("cpu", dtype=BF16):
        eager, by_compile, by_trace = model(x), compiled(x), traced(x)
    assert eager.dtype == by_compile.dtype == by_trace.dtype == BF16
    assert torch.equal(by_compile, eager) and torch.equal(by_trace, eager)
    assert compiled(x).dtype == traced(x).dtype == torch.float32  # outside autocast: unchanged


# ------------------------------------------------------------------------------------------ svd: second transform


class _Decompositions(nn.Module):
    def forward(self, x):
        values = torch.linalg.svdvals(x)
        return torch.linalg.eigh(x.T @ x).eigenvalues, values


def test_a_second_svd_transform_says_the_decompositions_are_orthofx_stable_ones_already():
    x = torch.randn(8, 4)
    gm = orthofx.transform(_Decompositions(), "svd", example_inputs=(x,))
    assert [(c.site, c.before["op"]) for c in orthofx.manifest_of(gm).changes] == [
        ("linalg.svdvals", "linalg.svdvals"), ("linalg.eigh", "linalg.eigh")]
    with pytest.raises(PlanError) as info:
        orthofx.transform(gm, "svd", example_inputs=(x,))
    message = str(info.value)
    assert "matched no function site" in message
    assert "2 decomposition(s) of the graph are already orthofx's stable ones" in message
    assert "stable_svdvals x1, stable_eigh x1" in message
    assert "put in place of linalg.svdvals / linalg.eigh calls by svd_conditioning (rule 'stable-decompositions')" \
        in message
    assert "'linalg.svdvals', 'linalg.eigh'" in message
    assert "transform the original model instead" in message
    with pytest.raises(PlanError, match="already orthofx's stable ones"):
        orthofx.explain(gm, "svd")


def test_stand_ins_the_model_calls_itself_get_the_note_without_an_earlier_transform():
    class Own(nn.Module):
        def forward(self, x):
            return cond.stable_eigh(x.T @ x)[0]

    with pytest.raises(PlanError) as info:
        orthofx.transform(Own(), "svd", example_inputs=(torch.randn(8, 4),))
    message = str(info.value)
    # the stand-in is one graph node (nn.conditioning._recorded_when_traced), named as the function the model calls
    assert "1 decomposition(s) of the graph are already orthofx's stable ones (stable_eigh x1): 'linalg.eigh'" \
        in message
    assert "call torch's op there instead" in message and "put in place" not in message


def test_a_transformed_part_of_a_bigger_model_is_named_and_warned_about():
    x = torch.randn(8, 4)

    class Big(nn.Module):
        def __init__(self):
            super().__init__()
            self.part = orthofx.transform(_Decompositions(), "svd", example_inputs=(x,))

        def forward(self, x):
            return self.part(x)[0].sum() + torch.linalg.eigvalsh(x.T @ x).sum()

    big = Big()
    graph, _ = capture(big, example_inputs=(x,))
    found = orthofx_decompositions(graph, big)
    assert [(d.name, d.layer, d.original, d.made_by) for d in found] == [
        ("part:linalg.svdvals", "stable_svdvals", "linalg.svdvals", "svd_conditioning (rule 'stable-decompositions')"),
        ("part:linalg.eigh", "stable_eigh", "linalg.eigh", "svd_conditioning (rule 'stable-decompositions')")]
    text = str(orthofx.explain(big, "svd", example_inputs=(x,)))
    assert "rule 'stable-decompositions' passes over orthofx decompositions: 2 decomposition(s)" in text
    assert "'part:linalg.svdvals', 'part:linalg.eigh'" in text


def test_module_rules_do_not_report_decompositions_and_function_rules_no_layers():
    x = torch.randn(8, 4)

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return torch.linalg.eigvalsh(self.lin(x).T @ self.lin(x))

    stable_only = Policy.from_dict({"rules": [{"name": "stable", "match": {"op": ["linalg.eigvalsh"]},
                                               "apply": "svd_conditioning"}]})
    gm = orthofx.transform(orthofx.transform(Both(), "orthogonal", example_inputs=(x,)), stable_only,
                           example_inputs=(x,))
    with pytest.raises(PlanError) as info:
        orthofx.transform(gm, stable_only, example_inputs=(x,))
    assert "1 decomposition(s) of the graph are already orthofx's stable ones" in str(info.value)
    assert "layers" not in str(info.value).split("matched no function site")[1]
    with pytest.raises(PlanError) as info:
        orthofx.transform(gm, "orthogonal", example_inputs=(x,))
    assert "already orthofx layers (OrthogonalLinear x1" in str(info.value)
    assert "decomposition" not in str(info.value).split("matched no module site")[1]
