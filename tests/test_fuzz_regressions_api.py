"""Regressions found by fuzzing the public functions with wrong or odd arguments (transform, penalty, report,
attach, freeze, export, load, the CLI): each bad input gets an orthofx error saying what and how to fix it, and
what the user passed in stays as it was."""

import pytest
import torch
from torch import nn

import orthofx
from orthofx.cli import main
from references import lorth64


def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def lazy_model():
    return nn.Sequential(nn.LazyConv2d(4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))


def meta_model():
    with torch.device("meta"):
        return small()


X = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------------------- transform

@pytest.mark.parametrize("inplace", ["no", None, 0])
def test_transform_refuses_an_inplace_that_is_not_a_bool(inplace):
    # inplace="no" is truthy: it used to rewrite the user's model in place
    model = small()
    weight = model[0].weight.detach().clone()
    with pytest.raises(orthofx.ArgumentError, match="inplace must be True or False"):
        orthofx.transform(model, "orthogonal", example_inputs=(X,), inplace=inplace)
    assert type(model[0]) is nn.Conv2d and torch.equal(model[0].weight, weight)


def test_transform_of_a_model_on_the_meta_device_says_to_materialise_it():
    # the pass used to fail inside torch ("Tensor.item() cannot be called on meta tensors") with no fix
    with pytest.raises(orthofx.TransformError, match=r"meta device .*to_empty"):
        orthofx.transform(meta_model(), "orthogonal")
    # with inputs: it used to blame the inputs' shapes and dtypes
    with pytest.raises(orthofx.TransformError, match=r"cannot run on example_inputs: .*meta device .*to_empty"):
        orthofx.transform(meta_model(), "lorth", example_inputs=(X,))


def test_inputs_on_another_device_than_the_model_name_the_models_device():
    with pytest.raises(orthofx.TransformError, match=r"shapes, dtypes and devices \(the model's parameters: "
                                                     r"float32 on cpu\)"):
        orthofx.transform(small(), "lorth", example_inputs=(X.to("meta"),))


# ------------------------------------------------------------------------------------------- penalty and report

def test_penalty_of_a_lazy_layer_that_has_not_run_says_to_run_it():
    gm = orthofx.transform(lazy_model(), "lorth")
    for function in (orthofx.penalty, orthofx.penalty_terms):
        with pytest.raises(orthofx.ArgumentError, match=r"site '0' \(rule 'lorth'\): LazyConv2d is a lazy layer "
                                                        r"that has not run yet.*gm\(x\)"):
            function(gm)
    gm(X)  # now the layers have weights: the penalty is the L_orth of each, weighted
    expected = sum(0.01 * orthofx.metrics.lorth(gm.get_submodule(site).weight) for site in ("0", "3"))
    torch.testing.assert_close(orthofx.penalty(gm), expected)
    # and that is P0's L_orth of the weights the layers initialised on their first call: the dense operator's
    # Gram error in float64 (tests/references.py)
    dense = sum(0.01 * lorth64(gm.get_submodule(site).weight) for site in ("0", "3"))
    assert float(orthofx.penalty(gm)) == pytest.approx(dense, rel=1e-5)


@pytest.mark.parametrize("make", [lazy_model, meta_model])
def test_report_of_layers_without_values_leaves_their_terms_out(make):
    # float(term.value(root)) used to raise torch's error for a lazy layer or meta weights
    rep = orthofx.report(orthofx.transform(make(), "lorth"))
    assert [p["value"] for p in rep.penalties] == [None, None]
    assert "2 term(s) left out" in str(rep)


@pytest.mark.parametrize("path,max_layers,message", [
    ("missing_dir/spectra.png", 24, "does not exist"),
    (3, 24, "path must be a str or os.PathLike"),
    ("spectra.png", 0, "max_layers must be an int >= 1"),
    ("spectra.png", "4", "max_layers must be an int >= 1"),
])
def test_report_plot_checks_its_arguments(tmp_path, monkeypatch, path, max_layers, message):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    rep = orthofx.report(orthofx.transform(small(), "lorth", example_inputs=(X,)))
    with pytest.raises(orthofx.ArgumentError, match=message):
        rep.plot(path, max_layers=max_layers)
    assert not (tmp_path / "spectra.png").exists()


# ------------------------------------------------------------------------------------------------------- attach

def test_a_refused_attach_leaves_the_optimizer_as_it_was():
    policy = {"rules": [{"match": {"type": "Linear"}, "apply": "riemannian"}]}
    gm = orthofx.transform(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)), policy)
    other = nn.Linear(4, 4)
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    before = dict(optimizer.__dict__)
    with pytest.raises(orthofx.OrthofxError, match="holds none of the model's trainable parameters"):
        orthofx.attach(optimizer, gm)
    assert optimizer.__dict__.keys() == before.keys()  # no registry left behind
    # one that holds some of them but not a hooked weight: refused by the hooks' own check, as cleanly
    optimizer = torch.optim.SGD(gm.get_submodule("0").parameters(), lr=0.1)
    before = dict(optimizer.__dict__)
    with pytest.raises(orthofx.OrthofxError, match="not optimised by this optimizer"):
        orthofx.attach(optimizer, gm)
    assert optimizer.__dict__.keys() == before.keys()


# ---------------------------------------------------------------------------------------- freeze, export, load

@pytest.mark.parametrize("inputs", [(X[0],), (X.long(),)])
def test_freeze_on_inputs_the_model_cannot_take_is_an_export_error(inputs):
    gm = orthofx.transform(small(), "orthogonal", example_inputs=(X,))
    with pytest.raises(orthofx.ExportError, match=r"the model failed on example_inputs .*pass inputs the model "
                                                  r"takes: shape"):
        orthofx.freeze(gm, inputs)


def test_export_refuses_a_dynamic_batch_that_is_not_a_bool(tmp_path):
    gm = orthofx.transform(small(), "lorth", example_inputs=(X,))
    with pytest.raises(orthofx.ExportError, match="dynamic_batch must be True or False"):
        orthofx.export(gm, tmp_path / "model.pt2", example_inputs=(X,), dynamic_batch="no")
    assert not (tmp_path / "model.pt2").exists()


def test_export_to_a_directory_says_it_is_one(tmp_path):
    gm = orthofx.transform(small(), "lorth")
    with pytest.raises(orthofx.ExportError, match="it is an existing directory"):
        orthofx.export(gm, tmp_path)


@pytest.mark.parametrize("content,missing", [
    ({"orthofx_format": 1}, "'policy' and 'state_dict'"),
    ({"orthofx_format": 1, "policy": "orthofx: 1\nrules: []\n"}, "'state_dict'"),
])
def test_load_of_an_incomplete_orthofx_file_is_an_export_error(tmp_path, content, missing):
    torch.save(content, tmp_path / "model.pt")  # used to raise KeyError: 'policy'
    with pytest.raises(orthofx.ExportError, match=f"not a complete orthofx .pt file: {missing} missing"):
        orthofx.load(small(), tmp_path / "model.pt")


def test_load_of_a_directory_says_it_is_one(tmp_path):
    with pytest.raises(orthofx.ExportError, match="it is a directory"):
        orthofx.load(small(), tmp_path)


def test_load_with_a_bad_model_or_inputs_blames_them_not_the_stored_policy(tmp_path):
    model = small()
    orthofx.export(orthofx.transform(model, "lorth"), tmp_path / "model.pt")
    with pytest.raises(orthofx.CaptureError, match="expected a torch.nn.Module"):
        orthofx.load(type(model), tmp_path / "model.pt")
    with pytest.raises(orthofx.TransformError, match="example_inputs must be a tensor or a tuple"):
        orthofx.load(model, tmp_path / "model.pt", example_inputs={"x": X})


# ---------------------------------------------------------------------------------------------------------- CLI

@pytest.mark.parametrize("option", ["--export", "--json", "--plot"])
def test_cli_refuses_an_empty_output_path(capsys, option):
    # --export "" (an unset shell variable) used to exit 0 without writing anything
    code = main(["transform", "small_cnn", "--policy", "lorth", option, ""])
    assert code == 2
    assert f"{option} got an empty path" in capsys.readouterr().err
