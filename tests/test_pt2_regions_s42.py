"""``.pt2`` export of models whose forward nests ``torch.no_grad()`` / ``torch.autocast`` blocks.

torch.export writes such a program with a region op whose node lacks its ``val`` field, and torch.export.load
rejects the file ("SpecViolationError: Node.meta wrap_with_autocast is missing val field"). ``orthofx.export``
then writes the program with its regions inlined (``run_decompositions({})``) and warns. The references are
independent of orthofx's export: the untransformed model class, built with torch's own ``nn.Linear`` layers that
hold each transformed layer's effective weight (``gm.c1.weight``: the orthogonal preset changes the weights).
"""

import warnings

import pytest
import torch
from torch import nn

import orthofx

REGION_OPS = ("wrap_with_autocast", "wrap_with_set_grad_enabled")


class _Three(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Linear(8, 8)
        self.c2 = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 3)


class NoGradInAutocast(_Three):  # the reported model: torch.export.load fails on its file
    def forward(self, x):
        with torch.autocast("cpu", enabled=False):
            h = torch.relu(self.c1(x))
            with torch.no_grad():
                h = self.c2(h)
        return self.fc(h)


class EnableGradInNoGrad(_Three):  # fails the same way, through wrap_with_set_grad_enabled
    def forward(self, x):
        with torch.no_grad():
            h = torch.relu(self.c1(x))
            with torch.enable_grad():
                h = self.c2(h)
        return self.fc(h)


class AutocastInNoGrad(_Three):  # nested the other way round: torch 2.13 reads this one back
    def forward(self, x):
        with torch.no_grad():
            h = torch.relu(self.c1(x))
            with torch.autocast("cpu", enabled=False):
                h = self.c2(h)
        return self.fc(h)


class OneAutocast(_Three):
    def forward(self, x):
        h = torch.relu(self.c1(x))
        with torch.autocast("cpu", enabled=False):
            h = self.c2(h)
        return self.fc(h)


class OneNoGrad(_Three):
    def forward(self, x):
        h = torch.relu(self.c1(x))
        with torch.no_grad():
            h = self.c2(h)
        return self.fc(h)


def _reference(cls, gm):
    """The untransformed model class holding the transformed layers' effective weights (torch's own layers)."""
    ref = cls().eval()
    with torch.no_grad():
        for name in ("c1", "c2", "fc"):
            getattr(ref, name).weight.copy_(getattr(gm, name).weight)
            getattr(ref, name).bias.copy_(getattr(gm, name).bias)
    return ref


def _region_ops(program):
    return [node.target.__name__ for module in program.graph_module.modules()
            if isinstance(module, torch.fx.GraphModule) for node in module.graph.nodes
            if node.op == "call_function" and getattr(node.target, "__name__", None) in REGION_OPS]


def _export(cls, preset, path, x, **kwargs):
    torch.manual_seed(0)
    gm = orthofx.transform(cls().eval(), preset, example_inputs=(x,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = orthofx.export(gm, path, example_inputs=(x,), **kwargs)
    notes = [str(w.message) for w in caught if issubclass(w.category, orthofx.OrthofxWarning)]
    return gm, result, notes


@pytest.mark.parametrize("cls", [NoGradInAutocast, EnableGradInNoGrad])
@pytest.mark.parametrize("preset", ["lorth", "orthogonal"])
def test_nested_regions_export_inlined_with_warning(tmp_path, cls, preset):
    x = torch.randn(4, 8)
    path = str(tmp_path / "m.pt2")
    gm, result, notes = _export(cls, preset, path, x)
    ref = _reference(cls, gm)
    program = torch.export.load(path)  # plain torch reads the file
    assert _region_ops(program) == []  # the regions were inlined
    torch.testing.assert_close(program.module()(x), ref(x), atol=1e-5, rtol=0)
    assert result.format == "pt2" and result.max_abs_diff <= 1e-5
    assert len(notes) == 1, notes
    note = notes[0]
    assert "torch.export.load cannot read back" in note and "run_decompositions" in note and path in note
    # the warning's claim about an ambient autocast, checked against the reference model
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gap = float((program.module()(x).double() - ref(x).double()).detach().abs().max())
    if gap > 1e-5:
        assert "torch.autocast('cpu', dtype=torch.bfloat16) they differ by up to" in note
    else:
        assert "torch.autocast('cpu', dtype=torch.bfloat16) the two still agree" in note
    if cls is NoGradInAutocast:
        assert gap > 1e-4  # the autocast(enabled=False) block now runs in bfloat16: measured, and said
    # and about gradients: the reference's no_grad block cuts the input off; the inlined program's does not
    xr, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref_grad = torch.autograd.grad(ref(xr).sum(), xr, allow_unused=True)[0]
    program_grad = torch.autograd.grad(program.module()(xp).sum(), xp, allow_unused=True)[0]
    assert ref_grad is None and program_grad is not None and bool(program_grad.abs().gt(0).any())
    assert "gradients are not turned off (or on) where the model's torch.no_grad/enable_grad blocks do" in note


def test_nested_regions_dynamic_batch(tmp_path):
    x = torch.randn(4, 8)
    path = str(tmp_path / "m.pt2")
    gm, _, notes = _export(NoGradInAutocast, "orthogonal", path, x, dynamic_batch=True)
    assert len(notes) == 1
    ref = _reference(NoGradInAutocast, gm)
    module = torch.export.load(path).module()
    for batch in (7, 2):
        x2 = torch.randn(batch, 8)
        torch.testing.assert_close(module(x2), ref(x2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [OneAutocast, OneNoGrad, AutocastInNoGrad])
def test_readable_regions_keep_the_default_path(tmp_path, cls):
    x = torch.randn(4, 8)
    path = str(tmp_path / "m.pt2")
    gm, _, notes = _export(cls, "lorth", path, x)
    assert notes == []
    program = torch.export.load(path)
    assert _region_ops(program)  # not decomposed: the file keeps the blocks
    ref = _reference(cls, gm)
    torch.testing.assert_close(program.module()(x), ref(x), atol=1e-5, rtol=0)


def test_retry_that_fails_too_raises_the_read_back_error(tmp_path, monkeypatch):
    # run_decompositions returning the program unchanged: the second file cannot be read back either
    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions", lambda self, *a, **k: self)
    x = torch.randn(4, 8)
    path = tmp_path / "m.pt2"
    gm = orthofx.transform(NoGradInAutocast().eval(), "lorth", example_inputs=(x,))
    with pytest.raises(orthofx.ExportError, match=r"torch\.export\.load cannot read back the file written to .*"
                                                  r"missing val field.*the file was removed"):
        orthofx.export(gm, str(path), example_inputs=(x,))
    assert not path.exists() and list(tmp_path.iterdir()) == []
