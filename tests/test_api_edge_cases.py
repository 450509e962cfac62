"""Edge cases of the public API found by an audit: each test failed before its fix."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import orthofx

LORTH_LINEAR = {"orthofx": 1, "rules": [{"match": {"type": "Linear"}, "apply": "orth_regularizer"}]}


def small():
    torch.manual_seed(0)
    return orthofx.models.get("small_cnn")


def test_export_to_a_missing_directory_names_the_directory(tmp_path):
    gm = orthofx.transform(small(), "lorth")
    missing = tmp_path / "no" / "such"
    x = orthofx.models.example_input("small_cnn")
    for suffix in (".pt", ".pt2", ".onnx"):
        with pytest.raises(orthofx.ExportError, match="does not exist") as info:
            orthofx.export(gm, missing / f"m{suffix}", example_inputs=(x,))
        assert str(missing) in str(info.value)
    assert not missing.exists()


def test_load_on_a_model_with_other_shapes_raises_export_error(tmp_path):
    path = tmp_path / "m.pt"
    orthofx.export(orthofx.transform(small(), "lorth"), path)
    wider = orthofx.models.get("deep_mlp")  # same policy applies (Linear layers), weights do not fit
    with pytest.raises(orthofx.ExportError, match="do not fit"):
        orthofx.load(wider, path)


def test_pt_export_of_a_frozen_model_is_refused_instead_of_writing_an_unloadable_file(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    x = torch.randn(2, 4)
    policy = {"orthofx": 1, "rules": [{"match": {"type": "Linear"}, "apply": "orthogonal_conv"}]}
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    frozen = orthofx.freeze(gm)  # plain Linear layers: their weights are not the transformed model's
    path = tmp_path / "frozen.pt"
    with pytest.raises(orthofx.ExportError, match="frozen"):
        orthofx.export(frozen, path)
    assert not path.exists()
    # the route the message gives works: save the transformed model, freeze after loading
    orthofx.export(gm, path)
    torch.testing.assert_close(orthofx.freeze(orthofx.load(model, path))(x), frozen(x))


@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_dynamic_batch_export_with_a_batch_of_one_says_how_to_fix(tmp_path, suffix):
    gm = orthofx.transform(small(), "lorth")
    one = orthofx.models.example_input("small_cnn", batch=1)
    with pytest.raises(orthofx.ExportError, match="batch size 1.*dynamic_batch=False"):
        orthofx.export(gm, tmp_path / f"m{suffix}", example_inputs=(one,))
    # a fixed batch of one is what dynamic_batch=False asks for
    result = orthofx.export(gm, tmp_path / "fixed.pt2", example_inputs=(one,), dynamic_batch=False)
    assert result.max_abs_diff == 0.0


def test_cli_export_with_the_default_batch_of_one_works(capsys, tmp_path):
    from orthofx.cli import main

    path = tmp_path / "m.pt2"
    code = main(["transform", "small_cnn", "--policy", "lorth", "--export", str(path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert path.exists() and "pt2 ->" in out and "fixed batch of 1" in out
    program = torch.export.load(str(path)).module()
    assert program(orthofx.models.example_input("small_cnn", batch=1)).shape == (1, 10)


class TensorOrDict(nn.Module):
    """A forward taking a tensor or a dict holding it: a traced input is a Proxy, not a Tensor, so fx traces the
    dict branch, and the graph indexes the example's tensor with a string."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if not isinstance(x, torch.Tensor):
            x = x["input"]
        return self.fc(x)


def test_a_graph_that_fails_where_the_model_runs_blames_capture_not_the_inputs():
    x = torch.randn(2, 4)
    with pytest.raises(orthofx.TransformError) as info:
        orthofx.transform(TensorOrDict(), LORTH_LINEAR, example_inputs=(x,))
    message = str(info.value)
    assert "model itself runs" in message and "mode: export" in message
    assert "shapes and dtypes" not in message  # the inputs are fine
    # the fix the message gives works
    model = TensorOrDict()
    gm = orthofx.transform(model, dict(LORTH_LINEAR, capture={"mode": "export"}), example_inputs=(x,))
    torch.testing.assert_close(gm(x), model(x))


def test_an_integer_too_large_for_a_float_parameter_is_a_policy_error_with_its_position():
    text = ("orthofx: 1\nrules:\n  - match: {type: Conv2d}\n    apply: orth_regularizer\n"
            "    with: {weight: 1" + "0" * 400 + "}\n")
    with pytest.raises(orthofx.PolicyError, match="weight: integer too large") as info:
        orthofx.Policy.from_yaml(text)
    assert (info.value.line, info.value.column) == (5, 20)


def test_a_path_of_the_wrong_type_is_an_export_error(tmp_path):
    gm = orthofx.transform(small(), "lorth")
    with pytest.raises(orthofx.ExportError, match="path must be a str or os.PathLike"):
        orthofx.load(small(), 3)
    with pytest.raises(orthofx.ExportError, match="path must be a str or os.PathLike"):
        orthofx.export(gm, None)


class BiasMix(nn.Module):
    def __init__(self):
        super().__init__()
        self.with_bias = nn.Linear(4, 4)
        self.without_bias = nn.Linear(4, 4, bias=False)

    def forward(self, x):
        return self.without_bias(self.with_bias(x))


def test_where_on_a_tensor_attribute():
    def rule(where):
        return {"orthofx": 1, "rules": [{"match": {"type": "Linear", "where": where}, "apply": "orth_regularizer"}]}

    assert [e.site.name for e in orthofx.explain(BiasMix(), rule({"bias": False})).entries] == ["without_bias"]
    assert [e.site.name for e in orthofx.explain(BiasMix(), rule({"bias": True})).entries] == ["with_bias"]
    text = "orthofx: 1\nrules:\n  - match: {type: Linear, where: {weight: 1}}\n    apply: orth_regularizer\n"
    with pytest.raises(orthofx.PlanError, match=r"<string>:3:5.*where\.weight.*tensor.*true or false"):
        orthofx.explain(BiasMix(), text)


@pytest.mark.parametrize("source, fragment", [
    ("def build(:\n    pass\n", "SyntaxError"),
    ("def build(width):\n    return None\n", "taking no arguments"),
])
def test_cli_model_files_that_fail_exit_2_with_one_line(capsys, tmp_path, source, fragment):
    from orthofx.cli import main

    path = tmp_path / "usermodel.py"
    path.write_text(source)
    code = main(["explain", f"{path}:build", "--policy", "lorth"])
    _, err = capsys.readouterr()
    assert code == 2 and fragment in err and err.count("\n") == 1


def test_the_package_imports_its_names_lazily_and_keeps_the_functions_over_same_named_submodules():
    # ``import orthofx`` does not import torch (the CLI's Ctrl-C during torch's import relies on it); importing the
    # submodules transform / export / report / penalty first must not hide the functions of the same names
    code = ("import sys, orthofx; print('torch' in sys.modules); import orthofx.cli, orthofx.export; "
            "print(sorted(n for n in ('transform', 'export', 'report', 'penalty') "
            "if not callable(getattr(orthofx, n)) or type(getattr(orthofx, n)).__name__ != 'function'))")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=repo)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["False", "[]"]
    assert orthofx.transform.__module__ == "orthofx.transform" and orthofx.export.__module__ == "orthofx.export"
    assert set(orthofx.__all__) <= set(dir(orthofx))
    assert all(getattr(orthofx, name) is not None for name in orthofx.__all__)
    assert orthofx.nn.OrthogonalConv2d.__module__ == "orthofx.nn.orthogonal"
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        orthofx.no_such_name
