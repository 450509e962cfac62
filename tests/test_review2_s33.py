"""Adversarial review of session 33's commits 36adec5 (ParametrizationState), 82293e0 (svd stand-ins recorded as
one fx node), c2f9c24 (dataclass-output export hint) and 16923a6 (isometric_init's note on weights shared with
unselected layers).

- ``report`` on a training-mode ``spectral_norm`` model: each read of a parametrized weight runs one more power
  iteration (``_u``, ``_v``), and a report row read the weight once for ``sigma_min`` / ``sigma_max``, again for
  ``lorth`` and a third time for the penalty's value. ParametrizationState put the state back afterwards, but the
  three figures were those of three different weights (``lorth`` 32.95 and the penalty 34.09 where the weight the
  next forward uses has 32.03). The report now computes each parametrized weight once
  (``torch.nn.utils.parametrize.cached``), from the model's own state.
  Reference: a deep copy of the model (plain torch), one read of its weight (what the next training forward
  computes), ``svdvals`` and ``||W W^T - I||_F^2`` in float64.
- ``conditioning._recorded_when_traced`` recorded a stand-in as one fx node only when the matrix came first
  positionally: a forward calling ``stable_linalg_svd(A=x, full_matrices=True)`` (keyword, as torch's own
  ``torch.linalg.svd(A=x)`` allows) was still traced into, and ``_completed``'s branch on shapes raised fx's
  ``TraceError``. Reference: ``torch.linalg.svdvals`` / ``eigvalsh`` in float64.
- ``isometric_init``'s note on a weight shared with layers it does not initialise named a parameter the model
  registers on itself (``self.proj.weight = self.shared``, used in ``F.linear(x, self.shared)``) as ``'' (Model)``;
  it is ``'<root>'`` now. Reference: the root's parameter holds orthonormal columns (float64).
- The ``.pt2`` / ``.onnx`` export hint for an unregistered dataclass output named only the outermost one: pytree
  stops there, so after registering it the export failed again on a dataclass in its fields. It names all of
  them now. Reference: registering exactly the classes the message names makes the export succeed, and the
  reloaded program computes the model's outputs.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthofx

pytestmark = pytest.mark.usefixtures("one_thread")


class _SpectralNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.utils.parametrizations.spectral_norm(nn.Linear(32, 32))

    def forward(self, x):
        return self.fc(x)


def _unconverged_model():
    """A training-mode spectral_norm Linear whose power iteration is far from converged (random ``_u`` / ``_v``),
    so that each read of the weight gives a visibly different matrix."""
    torch.manual_seed(0)
    model = _SpectralNormed()
    sn = model.fc.parametrizations.weight[0]
    with torch.no_grad():
        sn._u.copy_(F.normalize(torch.randn_like(sn._u), dim=0))
        sn._v.copy_(F.normalize(torch.randn_like(sn._v), dim=0))
    return model, torch.randn(4, 32)


def test_report_figures_are_those_of_the_next_forwards_spectral_norm_weight():
    model, x = _unconverged_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = orthofx.transform(model, "lorth", example_inputs=(x,))
    assert gm.training
    # the weight the next training forward computes: one power iteration from the stored vectors (plain torch)
    copy_ = copy.deepcopy(gm)
    weight = copy_.fc.weight.detach().to(torch.float64)
    second = copy_.fc.weight.detach().to(torch.float64)
    sigma = torch.linalg.svdvals(weight)
    eye = torch.eye(32, dtype=torch.float64)
    lorth = float(((weight @ weight.T - eye) ** 2).sum())
    assert abs(float(((second @ second.T - eye) ** 2).sum()) - lorth) > 1e-2 * lorth  # the reads do differ

    state = {k: v.clone() for k, v in gm.state_dict().items()}
    report = orthofx.report(gm)
    row = next(row for row in report.rows if row["site"] == "fc")
    assert row["sigma_max"] == pytest.approx(float(sigma.max()), rel=1e-9)
    assert row["sigma_min"] == pytest.approx(float(sigma.min()), rel=1e-9)
    assert row["lorth"] == pytest.approx(lorth, rel=1e-9)
    (penalty,) = report.penalties
    assert penalty["value"] == pytest.approx(lorth, rel=1e-5)  # computed in the weight's float32
    # and the report still leaves the model's state as it was
    assert all(torch.equal(v, state[k]) for k, v in gm.state_dict().items())
    plain = _SpectralNormed()
    plain.load_state_dict(state)
    torch.testing.assert_close(gm(x), plain(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------ stand-ins called by keyword


def test_stand_ins_called_with_the_matrix_by_keyword_are_one_fx_node():
    from orthofx.nn import conditioning as cond

    def forward(x):
        a = x.T @ x
        U, S, Vh = cond.stable_linalg_svd(A=a, full_matrices=True)
        w, _ = cond.stable_eigh(UPLO="U", A=a)
        return S, w, cond.stable_svdvals(A=a)

    gm = torch.fx.symbolic_trace(forward)  # TraceError when traced into
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert cond.stable_linalg_svd in targets and cond.stable_eigh in targets and cond.stable_svdvals in targets
    torch.manual_seed(0)
    x = torch.randn(7, 5, dtype=torch.float64)
    S, w, s = gm(x)
    reference = torch.linalg.svdvals(x.T @ x)
    torch.testing.assert_close(S, reference)
    torch.testing.assert_close(s, reference)
    torch.testing.assert_close(w, torch.linalg.eigvalsh(x.T @ x))


# ------------------------------------------------------------------------------ isometric_init: a root-held tie


class _RootShared(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Parameter(torch.randn(8, 8))
        self.proj = nn.Linear(8, 8)
        self.proj.weight = self.shared

    def forward(self, x):
        return F.linear(torch.tanh(self.proj(x)), self.shared)


def test_isometric_init_names_a_weight_the_model_itself_holds():
    torch.manual_seed(0)
    with pytest.warns(orthofx.OrthofxWarning) as record:
        gm = orthofx.transform(_RootShared(), "isometric", example_inputs=(torch.randn(2, 8),))
    (message,) = [str(w.message) for w in record if "shares its weight" in str(w.message)]
    assert "'proj' (Linear) shares its weight with '<root>' (_RootShared)" in message, message
    change = next(c for c in orthofx.manifest_of(gm).changes if c.site == "proj" and c.pass_name == "isometric_init")
    assert change.what.endswith("written to the weight it shares with '<root>' (_RootShared) too")
    w = gm.shared.detach().double()
    assert gm.proj.weight is gm.shared
    torch.testing.assert_close(w.T @ w, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ nested dataclass outputs in export


@dataclasses.dataclass
class _Boxes:
    coords: torch.Tensor


@dataclasses.dataclass
class _Detected:
    logits: torch.Tensor
    boxes: _Boxes


class _NestedDetector(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3, padding=1)
        self.box = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        f = torch.relu(self.body(x))
        return _Detected(f.mean((2, 3)), _Boxes(self.box(f)))


def test_export_hint_names_dataclasses_nested_in_the_output(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    gm = orthofx.transform(_NestedDetector(), "lorth", example_inputs=(x,))
    with pytest.raises(orthofx.ExportError) as info:
        orthofx.export(gm, tmp_path / "det.pt2", example_inputs=(x,))
    message = str(info.value)
    calls = {cls: f"torch.export.register_dataclass({cls.__qualname__}, serialized_type_name="
                  f"'{__name__}.{cls.__qualname__}')" for cls in (_Detected, _Boxes)}
    assert all(call in message for call in calls.values()), message
    # what the message says is the whole fix
    for cls in (_Detected, _Boxes):
        torch.export.register_dataclass(cls, serialized_type_name=f"{__name__}.{cls.__qualname__}")
    orthofx.export(gm, tmp_path / "det.pt2", example_inputs=(x,))
    loaded = torch.export.load(str(tmp_path / "det.pt2")).module()
    with torch.no_grad():
        got, expected = loaded(x), gm(x)
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.boxes.coords, expected.boxes.coords)
