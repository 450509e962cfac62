"""Session 37 review of what users read: ``orthofx.report`` (its figures against float64 references written here,
its notes), the ``orthofx`` command (help texts, exit statuses, files it writes) and ``orthofx.theory``'s
user-facing functions (argument checks, P0 Theorem 4 against a brute-force search)."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import orthofx
from orthofx import cli, theory
from orthofx.errors import ArgumentError
from orthofx.report import Report


# ----------------------------------------------------------------------------------------- float64 references

def _dilated(w: torch.Tensor, dilation) -> torch.Tensor:
    d = w.dim() - 2
    ds = (dilation,) * d if isinstance(dilation, int) else tuple(dilation)
    ks = tuple((k - 1) * dl + 1 for k, dl in zip(w.shape[2:], ds))
    big = torch.zeros(*w.shape[:2], *ks, dtype=torch.float64)
    big[(slice(None), slice(None)) + tuple(slice(None, None, dl) for dl in ds)] = w.double()
    return big


def lorth_loop(weight: torch.Tensor, stride=1, groups: int = 1, dilation=1) -> float:
    """P0 Definition 1 by a loop over the shifts ``t`` in ``{-P, ..., P}`` (step ``S``) per dimension, float64:
    the sum over shifts of ``||sum_{c, p} K[:, c, p] K[:, c, p + t]^T - [t = 0] I||_F^2``, per group, minus
    ``M - C S^d`` in the CO case. A Linear weight is a 1-tap conv."""
    w = weight.detach().double()
    if w.dim() == 2:
        w = w[:, :, None]
    d = w.dim() - 2
    ss = (stride,) * d if isinstance(stride, int) else tuple(stride)
    w = _dilated(w, dilation)
    ks = w.shape[2:]
    m, c = w.shape[0] // groups, w.shape[1]
    total = 0.0
    for g in range(groups):
        kern = w[g * m:(g + 1) * m]
        pads = [((k - 1) // s) * s for k, s in zip(ks, ss)]
        for shift in itertools.product(*[range(-p, p + 1, s) for p, s in zip(pads, ss)]):
            acc = torch.zeros(m, m, dtype=torch.float64)
            for tap in itertools.product(*[range(k) for k in ks]):
                other = tuple(a + b for a, b in zip(tap, shift))
                if all(0 <= o < k for o, k in zip(other, ks)):
                    acc += kern[(slice(None), slice(None)) + tap] @ kern[(slice(None), slice(None)) + other].T
            if not any(shift):
                acc -= torch.eye(m, dtype=torch.float64)
            total += float(acc.square().sum())
        if m > c * math.prod(ss):
            total -= m - c * math.prod(ss)
    return total


def dense_circular(weight: torch.Tensor, grid, stride=1, groups: int = 1, dilation=1) -> torch.Tensor:
    """The dense float64 matrix of ``y[m, i] = sum_{c, p} w[m, c, p] x[c, (S i + D p) mod n]`` (per group): for
    each tap ``p``, its entry is added at row ``(m, i)``, column ``(c, (S i + D p) mod n)`` for every ``m, c, i``."""
    w = weight.detach().double()
    d = w.dim() - 2
    ss = (stride,) * d if isinstance(stride, int) else tuple(stride)
    ds = (dilation,) * d if isinstance(dilation, int) else tuple(dilation)
    m_total, c_group = w.shape[:2]
    out = [n // s for n, s in zip(grid, ss)]
    n_out, n_in = math.prod(out), math.prod(grid)
    a = torch.zeros(m_total * n_out, c_group * groups * n_in, dtype=torch.float64)
    positions = torch.tensor(list(itertools.product(*[range(o) for o in out])), dtype=torch.long)  # (n_out, d)
    rows = torch.arange(m_total)[:, None, None] * n_out + torch.arange(n_out)[None, None, :]
    channels = (torch.arange(m_total) // (m_total // groups))[:, None] * c_group + torch.arange(c_group)[None, :]
    for tap in itertools.product(*[range(k) for k in w.shape[2:]]):
        flat = torch.zeros(n_out, dtype=torch.long)
        for axis in range(d):
            flat = flat * grid[axis] + (ss[axis] * positions[:, axis] + ds[axis] * tap[axis]) % grid[axis]
        cols = channels[:, :, None] * n_in + flat[None, None, :]
        values = w[(slice(None), slice(None)) + tap][:, :, None].expand(-1, -1, n_out)
        a.index_put_((rows.expand(-1, c_group, -1).reshape(-1), cols.reshape(-1)), values.reshape(-1),
                     accumulate=True)
    return a


class _Mixed(nn.Module):
    """Strided, grouped and dilated, non-square, transposed, 1-D, and both cases of conv and linear layers."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.c = nn.Conv2d(8, 40, 1)                                   # CO
        self.d = nn.Conv2d(40, 6, (1, 3), stride=(2, 1), padding=(0, 1))
        self.t = nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.e = nn.Conv1d(4, 9, 3, padding=1)                         # CO, 1-D
        self.fc = nn.Linear(9 * 16, 200)                               # CO
        self.fc2 = nn.Linear(200, 5)

    def forward(self, x):
        x = self.t(self.d(self.c(self.b(self.a(x)))))
        x = self.e(x.flatten(2)[:, :, :16])
        return self.fc2(self.fc(x.flatten(1)))


@pytest.mark.parametrize("policy", ["lorth", "orthogonal"])
def test_every_figure_of_the_report_matches_a_float64_reference(policy):
    torch.manual_seed(0)
    model = _Mixed()
    x = torch.randn(2, 3, 8, 8)
    gm = orthofx.transform(model, policy, example_inputs=(x,))
    rep = orthofx.report(gm)
    modules = dict(gm.named_modules())
    assert [row["site"] for row in rep.rows] == ["a", "b", "c", "d", "t", "e", "fc", "fc2"]   # every layer a row
    for row in rep.rows:
        module = modules[row["site"]]
        weight = module.weight.detach()
        if weight.dim() == 2:
            expected_lorth = lorth_loop(weight)
            values = torch.linalg.svdvals(weight.double())
            assert row["input"] is None
        else:
            stride, dilation = tuple(module.stride), tuple(module.dilation)
            expected_lorth = lorth_loop(weight, stride, module.groups, dilation)
            grid = tuple(row["input"])
            if isinstance(module, (nn.ConvTranspose2d, orthofx.nn.OrthogonalConvTranspose2d)):
                grid = tuple(n * s for n, s in zip(grid, stride))   # the adjoint conv's input grid
            values = torch.linalg.svdvals(dense_circular(weight, grid, stride, module.groups, dilation))
        assert row["lorth"] == pytest.approx(expected_lorth, rel=1e-9, abs=1e-12), row["site"]
        assert row["sigma_min"] == pytest.approx(float(values.min()), rel=1e-9, abs=1e-12), row["site"]
        assert row["sigma_max"] == pytest.approx(float(values.max()), rel=1e-9), row["site"]
        if policy == "orthogonal":
            assert row["pass"] == "orthogonal_conv (hard)" and row["exists"].startswith("yes")
    # the relative output change: both models run on the example inputs, in eval mode
    with torch.no_grad():
        before = model.eval()(x).double()
        after = gm.eval()(x).double()
    expected_change = float((after - before).norm() / before.norm())
    assert rep.output_change == pytest.approx(expected_change, rel=1e-5, abs=1e-7)
    # the penalty's weighted sum: weight * L_orth of each regularised layer
    expected_sum = sum(term["weight"] * lorth_loop(modules[term["site"]].weight, tuple(
        getattr(modules[term["site"]], "stride", (1,))), getattr(modules[term["site"]], "groups", 1),
        tuple(getattr(modules[term["site"]], "dilation", (1,)))) for term in rep.penalties)
    # (the penalty's terms are the training loss's: float32)
    assert sum(term["weighted"] for term in rep.penalties) == pytest.approx(expected_sum, rel=1e-6, abs=1e-9)


def test_kappa_is_that_of_the_matrix_entering_the_decomposition(monkeypatch):
    x = orthofx.models.example_input("gcp_cnn", batch=4)
    model = orthofx.models.get("gcp_cnn")
    rep = orthofx.report(orthofx.transform(model, "svd", example_inputs=(x,)))
    row = next(row for row in rep.rows if "kappa" in row)
    entering = []
    eigh = torch.linalg.eigh

    def spy(matrix, *args, **kwargs):
        entering.append(matrix.detach().double())
        return eigh(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", spy)
    with torch.no_grad():
        model.eval()(x)   # the original model, eager: the batch of matrices its eigh receives
    monkeypatch.undo()
    values = torch.linalg.eigvalsh(entering[0])
    expected = float((values[..., -1] / values[..., 0]).max())   # the worst matrix of the batch
    assert row["kappa"] == pytest.approx(expected, rel=1e-4) and row["kappa_max"] == row["kappa"]
    assert row["updates"] == 1 and row["nan_events"] == 0 and rep.conditioning[row["site"]] == [row["kappa"]]


def test_text_to_dict_and_json_agree():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8, 8)
    rep = orthofx.report(orthofx.transform(_Mixed(), "lorth", example_inputs=(x,)))
    data = json.loads(json.dumps(rep.to_dict(), allow_nan=False))
    lines = str(rep).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("site"))
    table = lines[header + 2:header + 2 + len(rep.rows)]
    for line, row, plain in zip(table, rep.rows, data["rows"]):
        cells = line.split()
        assert cells[0] == row["site"] == plain["site"]
        for key in ("lorth", "sigma_min", "sigma_max"):
            assert plain[key] == row[key]                              # JSON keeps every digit
            shown = next(cell for cell in cells if cell == format(row[key], ".4g"))
            assert float(shown) == pytest.approx(row[key], rel=1e-3)   # the table rounds to 4 digits
        assert plain["input"] == (list(row["input"]) if row["input"] is not None else None)
    assert data["output_change"] == rep.output_change
    assert sum(term["weighted"] for term in data["penalties"]) == pytest.approx(
        float(lines[-1].rsplit("weighted sum ", 1)[1].split()[0]), rel=1e-3)


# ----------------------------------------------------------------------------------------- report notes

class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def _notes(rep) -> list[str]:
    return [line[len("note: "):] for line in str(rep).splitlines() if line.startswith("note: ")]


def test_report_of_a_policy_that_matched_nothing_says_so():
    # before: a table of layers without a pass and nothing saying that no rule applied
    policy = {"orthofx": 1, "rules": [{"match": {"type": "Conv2d", "name": "nothing*"}, "apply": "orth_regularizer",
                                       "optional": True}]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = orthofx.report(orthofx.transform(_Tiny(), policy, example_inputs=(torch.randn(1, 2, 6, 6),)))
    assert all(row["pass"] is None for row in rep.rows) and len(rep.rows) == 2
    assert any(note.startswith("the policy changed no site: no rule matched") for note in _notes(rep))
    assert _notes(rep) == rep.to_dict()["notes"]
    # a policy that applies somewhere has no such note
    assert not any("changed no site" in note for note in orthofx.report(orthofx.transform(_Tiny(), "lorth")).notes)


def test_missing_sigmas_with_example_inputs_do_not_ask_for_example_inputs():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)
            self.spare = nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x):
            return self.spare(x) if self.training else self.conv(x)   # transform runs the examples in eval mode

    rep = orthofx.report(orthofx.transform(Branchy(), "lorth", example_inputs=(torch.randn(1, 1, 6, 6),)))
    rows = {row["site"]: row for row in rep.rows}
    assert rows["spare"]["sigma_min"] is None and rows["conv"]["sigma_min"] is not None
    note = next(n for n in rep.notes if n.startswith("no sigma_min / sigma_max for spare"))
    # before: "... (pass example_inputs=(x,) to orthofx.transform)", which the call did
    assert "pass example_inputs" not in note and "did not reach these layers" in note


def test_missing_sigmas_without_example_inputs_still_ask_for_them():
    note = next(n for n in orthofx.report(orthofx.transform(_Tiny(), "lorth")).notes if "sigma_min" in n)
    assert "pass example_inputs=(x,) to orthofx.transform" in note


@pytest.mark.parametrize("policy, parameter", [("lorth", "weight"), ("orthogonal", None)])
def test_nan_figures_are_explained_by_the_weights_entries(policy, parameter):
    gm = orthofx.transform(_Tiny(), policy, example_inputs=(torch.randn(1, 2, 6, 6),))
    conv = gm.get_submodule("conv")
    name, tensor = next((n, p) for n, p in conv.named_parameters() if p.dim() > 1 or n == parameter)
    with torch.no_grad():
        tensor.view(-1)[0] = float("nan")
    rep = orthofx.report(gm)
    row = next(row for row in rep.rows if row["site"] == "conv")
    assert math.isnan(row["lorth"]) and math.isnan(row["sigma_max"])
    # before: the table said nan with no word on why
    note = next(n for n in _notes(rep) if n.startswith("conv: "))
    assert "lorth nan" in note and f"{name} holds 1 NaN entry (of {tensor.numel()})" in note
    assert "load finite weights" in note
    assert not any(n.startswith("fc: ") for n in _notes(rep))   # finite rows get none


def test_undefined_output_change_is_said():
    class Zero(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)
            nn.init.zeros_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

        def forward(self, x):
            return self.fc(x)

    rep = orthofx.report(orthofx.transform(Zero(), "orthogonal", example_inputs=(torch.randn(2, 3),)))
    assert rep.output_change is None
    # before: the line was left out, as if no example inputs had been given
    assert any(note.startswith("no relative output change: it is undefined") for note in rep.notes)
    assert not any("relative output change" in note
                   for note in orthofx.report(orthofx.transform(Zero(), "orthogonal")).notes)


def test_output_change_line_says_what_it_measures_and_no_negative_zero():
    row = {"site": "fc", "layer": "Linear(2->2)", "pass": None, "params": None, "lorth": -0.0, "sigma_min": -0.0,
           "sigma_max": 1.0, "input": None, "exists": "yes (RO)"}
    penalty = {"site": "fc", "rule": "r", "weight": -0.0, "value": 1.0, "weighted": -0.0, "every": 1}
    text = str(Report([row], {"mode": "fx", "leaf_fallbacks": [], "warnings": []}, {}, [penalty], -0.0))
    assert "-0" not in text   # before: "-0" for the zeros
    assert "relative output change on the example inputs: 0 (||f_new(x) - f(x)|| / ||f(x)||, eval mode)" in text
    assert "weighted sum 0" in text


# ----------------------------------------------------------------------------------------- the command

def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.main([*argv, "--help"])
    assert exited.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_help_texts_document_every_argument_exit_statuses_and_replaced_files(capsys):
    top = _help(capsys)
    assert "exit status: 0 success; 2 bad input" in top and "130 interrupted" in top
    check = _help(capsys, "check")
    # before: policy, --model and --input-shape had no help at all
    assert "policy preset name, YAML file or YAML text" in check
    assert "--model MODEL also plan the policy on this model" in check and "(needs --model)" in check
    transform = _help(capsys, "transform")
    assert "--json PATH write the report as JSON to PATH (an existing file is replaced)" in transform
    assert "an .onnx export also writes its weights to PATH.data" in transform
    assert "--input-shape SHAPE the example input's shape, batch first" in transform
    demo = _help(capsys, "demo")
    assert "file.py:factory" in demo and "10 class scores" in demo   # before: "a built-in model" only


@pytest.mark.parametrize("argv, fragment", [
    (["transform", "no_such_model", "--policy", "lorth"], "unknown model 'no_such_model'"),
    (["transform", "small_cnn", "--policy", "no_such_policy"], "neither a preset nor an existing file"),
    (["transform", "small_cnn", "--policy", "lorth", "--input-shape", "1,2,8,8"], "the model fails on an input"),
    (["transform", "small_cnn", "--policy", "lorth", "--input-shape", "0,1,8,8"], "positive integers"),
    (["explain", "small_cnn", "--policy", "lorth", "--input-shape", "1,1,8,8,"], "comma-separated"),
    (["transform", "small_cnn", "--policy", "lorth", "--export", "m.xyz"], "unknown export format"),
    (["check", "lorth", "--input-shape", "1,1,8,8"], "--input-shape needs --model"),
    (["check", "orthofx: 1\nrules: [{match: {type: Conv2d}, apply: no_such_pass}]"], "no_such_pass"),
])
def test_bad_input_exits_2_with_one_line(capsys, argv, fragment):
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("orthofx: error: ") and fragment in err
    assert "Traceback" not in err


def test_an_onnx_exports_weights_file_is_named_by_the_command(tmp_path):
    # the ONNX exporter writes NAME.data beside NAME; _commit moves it into place with the model, replacing a file
    # of that name: the command now says so ("wrote m.onnx.data ...") instead of leaving it unnamed
    output = cli._output("--export", str(tmp_path / "m.onnx"))
    (tmp_path / "m.onnx.data").write_text("an older file")
    try:
        cli._stage(output)
        for name in ("m.onnx", "m.onnx.data"):
            with open(os.path.join(output.folder, name), "w") as handle:
                handle.write("new")
        extras = cli._commit([output])
    finally:
        cli._discard([output])
    assert extras == {"--export": [str(tmp_path / "m.onnx.data")]}
    assert (tmp_path / "m.onnx.data").read_text() == "new" and (tmp_path / "m.onnx").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]   # no staging folder left


def test_transform_json_is_the_printed_report(capsys, tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")   # replaced, as the help says
    code, out, _ = _run(capsys, "transform", "small_cnn", "--policy", "lorth", "--input-shape", "2,1,8,8", "--json",
                        str(path))
    assert code == 0 and f"wrote {path}" in out
    data = json.loads(path.read_text())
    for row in data["rows"]:
        line = next(line for line in out.splitlines() if line.startswith(row["site"] + " "))
        assert format(row["lorth"], ".4g") in line.split() and format(row["sigma_max"], ".4g") in line.split()


def test_python_dash_m_orthofx_bad_input_exits_2_with_one_line():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    bad = subprocess.run([sys.executable, "-m", "orthofx", "explain", "no_such_model", "--policy", "lorth"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr and "unknown model" in bad.stderr


# ----------------------------------------------------------------------------------------- theory

@pytest.mark.parametrize("function", [theory.orthogonal_conv_exists, theory.theorem8_constants])
@pytest.mark.parametrize("kwargs, fragment", [
    ({"c_in": 0}, "c_in (the input channels) must be >= 1, got 0"),
    ({"c_out": -3}, "c_out (the output channels) must be >= 1, got -3"),
    ({"c_in": 2.0}, "c_in (the input channels) must be a positive integer, got 2.0"),
    ({"c_in": True}, "c_in (the input channels) must be a positive integer, got True"),
    ({"kernel_size": 0}, "kernel_size must be >= 1"),
    ({"kernel_size": 1.5}, "kernel_size must be a positive integer"),
    ({"kernel_size": (3,)}, "kernel_size must be an int or a tuple of 2 ints"),
    ({"kernel_size": range(1, 3)}, "kernel_size must be an int or a tuple of 2 ints (dims=2), got range(1, 3)"),
    ({"stride": 0}, "stride must be >= 1"),
    ({"stride": (1, False)}, "stride must be a positive integer, got False"),
    ({"dims": 4}, "dims must be 1, 2 or 3"),
    ({"dims": True}, "dims must be a positive integer, got True"),
    ({"groups": 3}, "groups=3 must divide both c_in=4 and c_out=8"),
    ({"groups": 0}, "groups must be >= 1"),
])
def test_theory_refuses_bad_arguments_naming_itself(function, kwargs, fragment):
    arguments = dict({"c_in": 4, "c_out": 8, "kernel_size": 3, "stride": 1, "dims": 2, "groups": 1}, **kwargs)
    with pytest.raises(ArgumentError) as raised:
        function(**arguments)
    # before: "c_in must be >= 1, got 0", naming neither the function nor what c_in is; a range or an array as a
    # kernel size was called "not a positive integer"
    assert str(raised.value).startswith(f"{function.__name__}: ") and fragment in str(raised.value)


def test_other_theory_functions_name_themselves():
    with pytest.raises(ArgumentError, match=r"^orthogonality_case: stride must be >= 1, got 0$"):
        theory.orthogonality_case(2, 2, stride=0)
    with pytest.raises(ArgumentError, match=r"^adjoint_case: case must be 'RO' or 'CO', got 'ro'$"):
        theory.adjoint_case("ro")
    with pytest.raises(ArgumentError, match=r"^orthogonal_conv_exists: padding must be one of"):
        theory.orthogonal_conv_exists(2, 2, 3, padding="same")


def test_theorem4_on_a_grid_matches_the_stated_inequalities():
    for dims, c, m, k, s in itertools.product((1, 2, 3), (1, 2, 3), range(1, 13), (1, 2, 3, 5), (1, 2, 3, 4)):
        result = theory.orthogonal_conv_exists(c, m, k, stride=s, dims=dims)
        row_orthogonal = m <= c * s ** dims
        assert result.case == ("RO" if row_orthogonal else "CO")
        assert result.exists == (m <= c * k ** dims if row_orthogonal else s <= k), (dims, c, m, k, s)
        assert result.case == theory.orthogonality_case(c, m, s, dims=dims)
    # the ResNet strided shortcut (M, C, k, S) = (2C, C, 1, 2) has none (P0's example)
    assert not theory.orthogonal_conv_exists(64, 128, 1, stride=2).exists


def _dense_1d(kernel: torch.Tensor, stride: int, n: int) -> torch.Tensor:
    """The circular 1-D conv ``y[m, i] = sum_{c, p} K[m, c, p] x[c, (S i + p) mod n]`` as a matrix (differentiable)."""
    out = n // stride
    rows = torch.arange(out)
    matrix = 0
    for p in range(kernel.shape[2]):
        shift = torch.zeros(out, n, dtype=torch.float64)
        shift[rows, (stride * rows + p) % n] = 1
        matrix = matrix + torch.kron(kernel[:, :, p], shift)
    return matrix


def _least_orthogonality_error(m: int, c: int, k: int, s: int, restarts: int = 2) -> float:
    """The least ``||A A^T - I||_F^2 / N`` (RO) or ``||A^T A - I||_F^2 / N`` (CO) that L-BFGS finds over 1-D kernels
    from a few random starts, ``A`` the dense circular operator on a grid with ``S N >= 2k - 1``."""
    n = s * -(-(2 * k - 1) // s)
    generator = torch.Generator().manual_seed(0)
    best = math.inf
    for _ in range(restarts):
        kernel = torch.randn(m, c, k, dtype=torch.float64, generator=generator).requires_grad_()
        optimizer = torch.optim.LBFGS([kernel], max_iter=150, tolerance_grad=1e-14, tolerance_change=1e-16,
                                      line_search_fn="strong_wolfe")

        def error():
            a = _dense_1d(kernel, s, n)
            gram = a @ a.T if m <= c * s else a.T @ a
            return (gram - torch.eye(gram.shape[0], dtype=torch.float64)).square().sum()

        def closure():
            optimizer.zero_grad()
            loss = error()
            loss.backward()
            return loss

        for _ in range(2):
            optimizer.step(closure)
        with torch.no_grad():
            best = min(best, float(error()) / (n // s))
        if best < 1e-12:
            break
    return best


def test_theorem4_agrees_with_a_brute_force_search_for_an_orthogonal_kernel():
    disagreements = []
    for m, c, k, s in itertools.product((2, 3, 4), (1, 2), (1, 2, 3), (1, 2, 3)):
        exists = theory.orthogonal_conv_exists(c, m, k, stride=s, dims=1).exists
        found = _least_orthogonality_error(m, c, k, s)
        # where none exists the search stays far from 0 (an error of at least 1 in every such case here)
        if exists != (found < 1e-10) or (not exists and found < 0.5):
            disagreements.append((m, c, k, s, exists, found))
    assert not disagreements
