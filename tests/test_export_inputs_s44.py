"""export's example inputs (s44 audit): a (T, T) attention mask with the default dynamic batch, an additive causal
mask holding -inf, and the .pt refusal's hint for a model transform did not return. Every export is compared with
the eager model itself (torch's own layers around an orthofx layer: freezing must not change its outputs), at the
example's batch size and at another one."""
import warnings

import pytest
import torch
from torch import nn

import orthofx
from orthofx.nn import OrthogonalLinear

pytest.importorskip("onnxruntime")
import onnxruntime  # noqa: E402

T, E = 8, 16


class Attention(nn.Module):
    """torch's attention taking a (T, T) mask, an orthofx layer after it and a batched second input."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, 2, batch_first=True)
        self.fc = OrthogonalLinear(E, E)

    def forward(self, x, attn_mask, shift):
        return self.fc(self.mha(x, x, x, attn_mask=attn_mask, need_weights=False)[0]) + shift


def _model():
    torch.manual_seed(0)
    return Attention().eval()


def _inputs(batch):
    return torch.randn(batch, T, E), torch.randn(batch, 1, E)


def _onnx_run(path, x, mask, shift):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {arg.name: t.numpy() for arg, t in zip(session.get_inputs(), (x, mask, shift))}
    return torch.from_numpy(session.run(None, feeds)[0])


MASKS = {
    "bool": lambda: torch.triu(torch.ones(T, T, dtype=torch.bool), 1),
    "causal_inf": lambda: nn.Transformer.generate_square_subsequent_mask(T),  # 0 / -inf
}


@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
@pytest.mark.parametrize("kind", sorted(MASKS))
def test_fixed_mask_keeps_its_size_and_batched_input_grows(tmp_path, kind, suffix):
    """Dimension 0 of the (T, T) mask, which the model fixes, came out of torch.export as a SymInt of value 8 (the
    ONNX exporter: a symbol of range [8, 8]) and was grown to 9 by the check on a larger batch: ExportError "does
    not take a batch one larger". The -inf causal mask was refused as "holds NaN or inf"."""
    model, mask = _model(), MASKS[kind]()
    x, shift = _inputs(3)
    path = tmp_path / f"m{suffix}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = orthofx.export(model, path, example_inputs=(x, mask, shift))
    assert result.max_abs_diff < 1e-5
    x5, shift5 = _inputs(5)  # both batched inputs at another batch size (shift too grows), the mask as it was
    with torch.no_grad():
        for a, b in ((x, shift), (x5, shift5)):
            expected = model(a, mask, b)
            assert torch.isfinite(expected).all()
            if suffix == ".pt2":
                got = torch.export.load(path).module()(a, mask, b)
            else:
                got = _onnx_run(path, a, mask, b)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_nan_inputs_and_non_finite_outputs_are_still_refused(tmp_path):
    model, mask = _model(), MASKS["causal_inf"]()
    x, shift = _inputs(3)
    with pytest.raises(orthofx.ExportError, match=r"example_inputs\[0\] holds NaN"):
        orthofx.export(model, tmp_path / "n.pt2", example_inputs=(torch.full_like(x, float("nan")), mask, shift))
    x_inf = x.clone()
    x_inf[0, 0, 0] = float("inf")  # reaches the output as inf / NaN (torch's own layers compute so)
    with torch.no_grad():
        assert not torch.isfinite(model(x_inf, mask, shift)).all()
    with pytest.raises(orthofx.ExportError, match=r"example_inputs\[0\], example_inputs\[1\] hold inf, and the "
                                                  r"frozen model's output .*not finite"):
        orthofx.export(model, tmp_path / "d.pt2", example_inputs=(x_inf, mask, shift), dynamic_batch=False)
    assert not (tmp_path / "d.pt2").exists()


def test_pt_hint_of_a_plain_model_points_to_torch_export(tmp_path):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 6), nn.ReLU())
    x = torch.randn(3, 6)
    with pytest.raises(orthofx.ExportError, match="nothing to freeze: torch.export / torch.onnx.export take it") as err:
        orthofx.export(plain, tmp_path / "p.pt")
    assert ".pt2 or .onnx (frozen)" not in str(err.value)
    with pytest.raises(orthofx.OrthofxError, match="nothing to freeze"):  # what the old hint led to
        orthofx.export(plain, tmp_path / "p.pt2", example_inputs=(x,))
    program = torch.export.export(plain.eval(), (x,))  # the hint's action
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), plain(x), rtol=0, atol=0)


def test_pt_hint_of_a_model_with_orthofx_layers_offers_a_frozen_export(tmp_path):
    torch.manual_seed(0)
    layer = OrthogonalLinear(6, 6)
    held = nn.Sequential(layer, nn.ReLU()).eval()
    x = torch.randn(3, 6)
    with pytest.raises(orthofx.ExportError, match=r"or export it to \.pt2 or \.onnx \(frozen\)$"):
        orthofx.export(held, tmp_path / "h.pt")
    with pytest.raises(orthofx.ExportError, match=r"inside a model \(orthofx.export\(nn.Sequential\(layer\)"):
        orthofx.export(layer, tmp_path / "l.pt")
    orthofx.export(held, tmp_path / "h.pt2", example_inputs=(x,))  # the hint's action
    orthofx.export(nn.Sequential(layer), tmp_path / "l.pt2", example_inputs=(x,))
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(tmp_path / "h.pt2").module()(x), held(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.export.load(tmp_path / "l.pt2").module()(x), layer(x), rtol=1e-5, atol=1e-6)
