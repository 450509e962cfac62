"""End-to-end journeys (transform -> report -> explain vs manifest -> train with penalty/attach -> freeze -> .pt
save and load) on small models using this session's changes: one-element conv size tuples, layers called by
keyword (with forward hooks / with_kwargs pre-hooks), transposed convs with output_size, F.conv2d on a parameter.
The xfail tests record bugs the journey fuzz found (scripts under .snap/s38/journey/ in the session's notes)."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthofx
from orthofx.errors import CaptureError, OrthofxError


class _Journey(nn.Module):
    def __init__(self, hook: str):
        super().__init__()
        self.c = nn.Conv1d(3, 4, kernel_size=(3,), stride=(2,), padding=(1,), dilation=(2,))
        self.t = nn.ConvTranspose1d(4, 4, kernel_size=(2,), stride=(2,))
        self.w = nn.Parameter(torch.randn(4, 4, 1) * 0.3)
        self.seq = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
        self.lin = nn.Linear(4, 5)
        if hook == "forward":
            self.c.register_forward_hook(lambda m, a, o: o * 1.5)
        elif hook == "pre_kwargs":
            # moves the input to a keyword, as a caller of torch's layer may
            self.c.register_forward_pre_hook(
                lambda m, a, k: ((), {"input": a[0] * 2}) if a else (a, {"input": k["input"] * 2}), with_kwargs=True)

    def forward(self, x):
        y = torch.relu(self.c(input=x))
        y = self.t(input=y, output_size=[6])
        y = F.conv1d(input=y, weight=self.w, stride=(2,))
        return self.lin(input=self.seq(y.mean(-1)))


def _policy(preset: str, mode: str) -> dict:
    policy = orthofx.Policy.preset(preset).to_dict()
    policy["capture"] = {"mode": mode}
    return policy


@pytest.mark.parametrize("preset", ["lorth", "orthogonal", "isometric", "jacobian"])
@pytest.mark.parametrize("mode,hook", [("fx", "forward"), ("export", "pre_kwargs")])
def test_journey_one_element_sizes_keyword_calls(tmp_path, preset, mode, hook):
    torch.manual_seed(0)
    model = _Journey(hook)
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        reference = original.eval()(x)
    plan = orthofx.explain(copy.deepcopy(original), _policy(preset, mode), example_inputs=(x,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # capture's notes on hooked layers and the functional conv on a parameter
        gm = orthofx.transform(model, _policy(preset, mode), example_inputs=(x,), inplace=True)
    manifest = orthofx.manifest_of(gm)
    changed = {c.site for c in manifest.changes} | {p.site for p in manifest.penalties}
    applied = {row["site"] for row in plan.rows() if row["status"] == "apply"}
    assert applied and applied <= changed
    gm.eval()
    with torch.no_grad():
        out = gm(x)
    assert out.shape == reference.shape and torch.isfinite(out).all()
    if preset in ("lorth", "jacobian"):  # penalties only: the eval forward is the model's
        torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
    assert str(orthofx.report(gm))

    gm.train()
    optimizer = torch.optim.SGD(gm.parameters(), lr=1e-2)
    orthofx.attach(optimizer, gm)
    for _ in range(3):
        loss = gm(x).pow(2).mean() + orthofx.penalty(gm)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    gm.eval()
    model.eval()
    with torch.no_grad():
        out = gm(x)
        # inplace=True: the user's own model holds the rewritten layers and trained weights
        torch.testing.assert_close(model(x), out, rtol=0, atol=1e-5)
        torch.testing.assert_close(orthofx.freeze(gm, (x,))(x), out, rtol=0, atol=1e-5)

    path = tmp_path / "m.pt"
    orthofx.export(gm, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = orthofx.load(copy.deepcopy(original), path, example_inputs=(x,))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), out)


# ---------------------------------------------------------------------------------------------- found bugs

def _same_padded(padding_mode: str) -> nn.Module:
    torch.manual_seed(0)
    # torch pads only the first spatial dimension here (its _reversed_padding_repeated_twice zips the one-element
    # dilation with the kernel size), so the layer's output is (8, 4), not 'same'
    return nn.Sequential(nn.Conv2d(4, 4, 3, padding="same", dilation=(2,), padding_mode=padding_mode))


@pytest.mark.parametrize("preset", ["orthogonal", "convnorm"])
@pytest.mark.parametrize("padding_mode", ["reflect", "circular"])
def test_same_padding_nonzero_mode_one_element_dilation(preset, padding_mode):
    model = _same_padded(padding_mode)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        reference = model(x)
    assert reference.shape == (2, 4, 8, 4)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = orthofx.transform(model, preset, example_inputs=(x,))
    except OrthofxError as exc:  # a refusal is fine if it names the cause
        assert "padding_mode" in str(exc) and "RuntimeError" not in str(exc), str(exc)
        return
    with torch.no_grad():
        assert gm(x).shape == reference.shape


class _BothWays(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.c.register_forward_hook(lambda m, a, o: o * 0.5)

    def forward(self, x):
        return self.c(input=self.c(x)).mean((2, 3))


def test_export_capture_hooked_layer_called_both_ways():
    x = torch.randn(2, 4, 8, 8)
    torch.export.export(_BothWays(), (x,), strict=False)  # torch itself captures it
    policy = {"rules": [{"match": {"type": "Conv2d"}, "apply": "orth_regularizer"}], "capture": {"mode": "export"}}
    model = _BothWays()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = orthofx.transform(model, policy, example_inputs=(x,))
    except CaptureError as exc:  # a refusal is fine if it says what the model does and how to fix it
        assert "keyword" in str(exc), str(exc)
        return
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
