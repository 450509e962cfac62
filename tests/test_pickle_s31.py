"""Pickling a transformed model whole (``pickle``, ``torch.save`` / ``torch.load(weights_only=False)``) gives the model
the user had: the same ``state_dict`` keys in the same order (a non-persistent buffer of the model stays out), the
same outputs, penalty and report, for a plain ``torch.fx.GraphModule`` result and a two-mode
:class:`orthofx.capture.ModalGraphModule` one, also for a pickle of a pickle, a deep copy of an unpickled copy, a
``copy.copy``, a frozen model and an unpickling in a fresh process.

torch.fx rebuilds an unpickled GraphModule with ``GraphModule.__init__``, which registers every tensor of the root
(and, for the two-mode module, of each container it rebuilds) as a persistent buffer, in the order the graph reads
them, and runs no hook of orthofx: the copy's ``state_dict`` had the model's non-persistent buffers as extra keys
(``load_state_dict(model.state_dict())`` failed), the two-mode module's keys came in another order, and the copy's
``meta`` was empty (a deep copy of it had lost the manifest: no penalty, report or export).

References: the model's own ``state_dict`` keys and outputs (plain torch); the penalty and report of the model the
copy was made from.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn

import orthofx
import orthofx.models

pytestmark = pytest.mark.usefixtures("one_thread")


class _Plain(nn.Module):
    """A non-persistent buffer on the root and one in a container the graph only reads (``get_attr``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3)
        self.register_buffer("scale", torch.tensor(0.5), persistent=False)
        self.stats = nn.Module()
        self.stats.register_buffer("shift", torch.full((3,), 0.25), persistent=False)
        self.stats.register_buffer("count", torch.full((), 2.0))

    def forward(self, x):
        return self.fc(x) * self.scale * self.stats.count + self.stats.shift


class _Modal(_Plain):
    """The same, with a Python branch on ``self.training``: captured as a ModalGraphModule."""

    def forward(self, x):
        y = self.fc(x) * self.scale * self.stats.count
        if self.training:
            return y + self.stats.shift
        return y - self.stats.shift


def _pickled(module):
    return pickle.loads(pickle.dumps(module))


def _torch_saved(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


_COPIES = {
    "pickle": _pickled,
    "torch.save": _torch_saved,
    "pickle of a pickle": lambda m: _pickled(_torch_saved(m)),
    "deepcopy of an unpickled copy": lambda m: copy.deepcopy(_pickled(m)),
    "pickle of a deep copy": lambda m: _pickled(copy.deepcopy(m)),
    "copy.copy": copy.copy,
    "copy.copy of an unpickled copy": lambda m: copy.copy(_pickled(m)),
}


@pytest.mark.parametrize("how", list(_COPIES))
@pytest.mark.parametrize("model_type", [_Plain, _Modal])
def test_a_copy_has_the_state_dict_and_outputs_of_the_model(model_type, how):
    model, x = model_type(), torch.randn(5, 4)
    gm = orthofx.transform(model, "lorth", example_inputs=(x,))
    assert isinstance(gm, orthofx.capture.ModalGraphModule) == (model_type is _Modal)
    duplicate = _COPIES[how](gm)
    assert isinstance(duplicate, torch.fx.GraphModule) and type(duplicate).__mro__[1] is type(gm).__mro__[1]
    assert orthofx.is_transformed(duplicate)  # a deep copy of an unpickled copy had lost the manifest
    assert list(duplicate.state_dict()) == list(model.state_dict()) == ["fc.weight", "fc.bias", "stats.count"]
    buffers = dict(duplicate.named_buffers())
    assert float(buffers["scale"]) == 0.5 and torch.equal(buffers["stats.shift"], torch.full((3,), 0.25))
    duplicate.load_state_dict(model.state_dict())  # strict
    with torch.no_grad():
        for training in (True, False):
            expected = model.train(training)(x)
            assert torch.allclose(duplicate.train(training)(x), expected, atol=1e-6), training
    assert torch.allclose(orthofx.penalty(duplicate), orthofx.penalty(gm))
    assert str(orthofx.report(duplicate)) == str(orthofx.report(gm))
    if how != "copy.copy":  # a shallow copy shares the original's
        assert duplicate.stats is not gm.stats and duplicate.fc is not gm.fc


@pytest.mark.parametrize("how", ["pickle", "torch.save", "pickle of a pickle", "deepcopy of an unpickled copy",
                                 "copy.copy"])
def test_a_copy_of_a_two_mode_built_in_model_keeps_the_order_of_its_state_dict(how):
    """dbn_cnn with the svd preset: a ModalGraphModule (DecorrelatedBatchNorm branches on the mode) that holds two
    monitors of the svd_conditioning pass besides the model's layers; unpickling put them in the order the graph
    calls them."""
    model, x = orthofx.models.get("dbn_cnn"), orthofx.models.example_input("dbn_cnn", batch=8)
    gm = orthofx.transform(model, "svd", example_inputs=(x,))
    assert isinstance(gm, orthofx.capture.ModalGraphModule)
    duplicate = _COPIES[how](gm)
    keys, model_keys = list(duplicate.state_dict()), list(model.state_dict())
    assert keys == list(gm.state_dict())
    assert [key for key in keys if key in model.state_dict()] == model_keys
    assert all(key.startswith("orthofx_monitor_") for key in keys if key not in model.state_dict())
    assert [n for n, _ in duplicate.named_modules()] == [n for n, _ in gm.named_modules()]
    assert [n for n, _ in duplicate.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert str(orthofx.report(duplicate)) == str(orthofx.report(gm))  # before a run updates the monitors
    result = duplicate.load_state_dict(model.state_dict(), strict=False)
    assert not result.unexpected_keys and all(k.startswith("orthofx_monitor_") for k in result.missing_keys)
    with torch.no_grad():
        reference = copy.deepcopy(model)
        for training in (True, False):  # training: batch statistics (and an update of the running ones)
            expected = reference.train(training)(x)
            assert torch.allclose(duplicate.train(training)(x), expected, atol=1e-5), training


@pytest.mark.parametrize("model_type", [_Plain, _Modal])
def test_a_frozen_model_and_its_unpickled_copy_have_the_state_dict_of_the_model(model_type):
    """``freeze`` of a two-mode module keeps its eval graph in a plain GraphModule (``single_mode``), which
    registered the tensors it reads as persistent buffers."""
    model, x = model_type(), torch.randn(5, 4)
    frozen = orthofx.freeze(orthofx.transform(model, "lorth", example_inputs=(x,)), (x,))
    for duplicate in (frozen, _pickled(frozen)):
        assert list(duplicate.state_dict()) == list(model.state_dict())
        duplicate.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert torch.allclose(duplicate.eval()(x), model.eval()(x), atol=1e-6)


def test_unpickling_keeps_the_meta_and_the_copy_pickles_again_through_orthofx():
    gm = orthofx.transform(_Plain(), "lorth", example_inputs=(torch.randn(2, 4),))
    duplicate = _pickled(gm)
    assert "orthofx" in duplicate.meta  # torch.fx's own unpickling starts an empty meta
    assert type(duplicate).__reduce__ is type(gm).__reduce__
    assert type(copy.deepcopy(duplicate)).__reduce__ is type(gm).__reduce__
    assert torch.fx.GraphModule.__reduce__ is not type(gm).__reduce__


def test_an_unpickled_copy_runs_under_torch_compile():
    model, x = _Plain(), torch.randn(5, 4)
    duplicate = _pickled(orthofx.transform(model, "lorth", example_inputs=(x,)))
    compiled = torch.compile(duplicate, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-6)
    assert list(compiled.state_dict()) == ["_orig_mod." + key for key in model.state_dict()]


def test_export_of_an_unpickled_copy_loads(tmp_path):
    model, x = _Plain(), torch.randn(5, 4)
    duplicate = _pickled(orthofx.transform(model, "lorth", example_inputs=(x,)))
    orthofx.export(duplicate, tmp_path / "m.pt", example_inputs=(x,))
    loaded = orthofx.load(_Plain(), tmp_path / "m.pt", example_inputs=(x,))
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(x), model.eval()(x), atol=1e-6)


_FRESH_PROCESS = """
import json, sys, torch
torch.set_num_threads(1)
out = {}
for name in ("plain", "dbn_cnn"):
    gm = torch.load(sys.argv[1] + "/" + name + ".pt", weights_only=False)
    x = torch.load(sys.argv[1] + "/" + name + "_x.pt")
    with torch.no_grad():
        out[name] = {"keys": list(gm.state_dict()), "eval": gm.eval()(x).tolist(), "type": type(gm).__mro__[1].__name__}
print(json.dumps(out))
"""


def test_a_torch_save_file_loads_in_a_fresh_process(tmp_path):
    plain, x = _Plain(), torch.randn(3, 4)
    dbn, dbn_x = orthofx.models.get("dbn_cnn"), orthofx.models.example_input("dbn_cnn", batch=4)
    torch.save(orthofx.transform(plain, "lorth", example_inputs=(x,)), tmp_path / "plain.pt")
    torch.save(orthofx.transform(dbn, "svd", example_inputs=(dbn_x,)), tmp_path / "dbn_cnn.pt")
    torch.save(x, tmp_path / "plain_x.pt")
    torch.save(dbn_x, tmp_path / "dbn_cnn_x.pt")
    root = os.path.dirname(os.path.dirname(os.path.abspath(orthofx.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, str(tmp_path)], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["plain"]["type"] == "GraphModule" and out["dbn_cnn"]["type"] == "ModalGraphModule"
    assert out["plain"]["keys"] == list(plain.state_dict())
    dbn_keys = out["dbn_cnn"]["keys"]
    assert [key for key in dbn_keys if key in dbn.state_dict()] == list(dbn.state_dict())
    with torch.no_grad():
        assert torch.allclose(torch.tensor(out["plain"]["eval"]), plain.eval()(x), atol=1e-6)
        assert torch.allclose(torch.tensor(out["dbn_cnn"]["eval"]), dbn.eval()(dbn_x), atol=1e-5)
