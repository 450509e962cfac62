"""``transform`` / ``explain`` with keyword example inputs (``example_kwargs``): the example call is
``model(*example_inputs, **example_kwargs)`` in every capture mode."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import orthofx
from orthofx.errors import TransformError
from orthofx.transform import ExampleCall


class Masked(nn.Module):
    """A forward with a keyword-only mask and a keyword with a default."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x, *, mask=None, scale=1.0):
        h = torch.relu(self.conv(x))
        if mask is not None:
            h = h * mask
        return self.head(h.mean((2, 3))) * scale


def _inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 6, 6, generator=g), (torch.rand(batch, 1, 6, 6, generator=g) > 0.5).float()


@pytest.mark.parametrize("mode", ["fx", "export", "auto"])
def test_transform_runs_the_example_call_with_its_keyword_inputs(mode):
    torch.manual_seed(0)
    model = Masked().eval()
    x, mask = _inputs()
    policy = {"capture": {"mode": mode}, "rules": [{"match": {"type": "Conv2d"}, "apply": "orthogonal_conv"}]}
    gm = orthofx.transform(model, policy, example_inputs=(x,), example_kwargs={"mask": mask})
    manifest = orthofx.manifest_of(gm)
    assert manifest.input_shapes["conv"] == (2, 3, 6, 6)  # the example ran: sizes recorded for the report
    assert manifest.output_change is not None and manifest.output_change > 0  # before/after compared
    # the orthogonal conv now in gm, applied by hand with the mask, is what gm computes
    expected = model.head((torch.relu(gm.conv(x)) * mask).mean((2, 3)))
    torch.testing.assert_close(gm(x, mask=mask), expected)
    x5, mask5 = _inputs(batch=5, seed=1)
    torch.testing.assert_close(gm(x5, mask=mask5), model.head((torch.relu(gm.conv(x5)) * mask5).mean((2, 3))))


def test_keyword_inputs_alone_make_an_example_call():
    class KeywordOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, *, x):
            return self.fc(x)

    x = torch.randn(4, 3)
    gm = orthofx.transform(KeywordOnly(), {"capture": {"mode": "export"},
                                           "rules": [{"match": {"type": "Linear"}, "apply": "orth_regularizer"}]},
                           example_kwargs={"x": x})
    assert orthofx.manifest_of(gm).input_shapes["fc"] == (4, 3)
    torch.testing.assert_close(gm(x=x), gm.fc(x))


def test_explain_takes_keyword_inputs_for_export_capture():
    model = Masked()
    x, mask = _inputs()
    plan = orthofx.explain(model, {"capture": {"mode": "export"}, "rules": [{"match": {"type": "Linear"},
                                                                             "apply": "orth_regularizer"}]},
                           example_inputs=(x,), example_kwargs={"mask": mask})
    assert plan.capture.mode == "export"
    assert [entry.site.name for entry in plan.entries] == ["head"]


@pytest.mark.parametrize("bad", [[("mask", 1)], {1: torch.ones(1)}, "mask"])
def test_example_kwargs_that_are_not_a_dict_of_names_are_refused(bad):
    with pytest.raises(TransformError, match="example_kwargs must be a dict of the model's keyword inputs"):
        orthofx.transform(Masked(), "lorth", example_inputs=(_inputs()[0],), example_kwargs=bad)


def test_example_call_binds_keywords_to_the_graphs_placeholder_order():
    # what transform's failure diagnosis replays node by node (fx.Interpreter takes positional inputs only)
    class Defaults(nn.Module):
        def forward(self, x, mask=None, scale=2.0):
            return x * mask * scale

    gm = fx.symbolic_trace(Defaults())
    x, mask = torch.randn(3), torch.randn(3)
    call = ExampleCall((x,), {"mask": mask})
    positional = call.positional(gm)
    assert positional[0] is x and positional[1] is mask and positional[2] == 2.0
    torch.testing.assert_close(fx.Interpreter(gm).run(*positional), call.run(gm))
    assert ExampleCall((x,), {"nope": mask}).positional(gm) is None  # does not bind: no diagnosis, no crash
