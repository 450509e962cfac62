"""Three gaps of the orthofx command and report: a Ctrl-C while the command imports its modules (exit 130 and one
line, not a traceback), the ``--plot`` format message made without cutting another message's prefix off, and
report rows for frozen ConvNorm layers (``orthofx.freeze`` of a model transformed with ConvNorm).

References are independent of orthofx: the dense float64 matrix of each operator, built here from torch's conv and
FFT applied to every basis vector, its singular values (torch.linalg.svdvals) and Gram matrix, and the frozen
layer's own outputs on every basis vector (its dense matrix, bias removed).
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthofx
import orthofx.passes.convnorm  # noqa: F401  (registers the pass)
from orthofx.cli import main
from orthofx.errors import ArgumentError
from orthofx.nn.convnorm import FrozenConvNormNd, convnorm_geometry

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------ Ctrl-C while importing

#: A sitecustomize that sends this process SIGINT when the module named by ORTHOFX_TEST_INTERRUPT_AT is imported:
#: the KeyboardInterrupt is raised inside that import, deterministically (no timing).
INTERRUPTING_SITECUSTOMIZE = textwrap.dedent('''
    import os, signal, sys

    class _InterruptAt:
        def __init__(self, name):
            self.name = name

        def find_spec(self, fullname, path=None, target=None):
            if fullname == self.name:
                sys.meta_path.remove(self)
                os.kill(os.getpid(), signal.SIGINT)  # raised as KeyboardInterrupt at the next bytecode
            return None

    sys.meta_path.insert(0, _InterruptAt(os.environ["ORTHOFX_TEST_INTERRUPT_AT"]))
''')


def console_script_code() -> str:
    """What pip's ``orthofx`` script runs: ``from module import function; sys.exit(function())``, for the entry
    point pyproject.toml declares."""
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as handle:
        target = tomllib.load(handle)["project"]["scripts"]["orthofx"]
    module, function = target.split(":")
    return f"import sys; from {module} import {function}; sys.exit({function}())"


def interrupted_run(tmp_path, interrupt_at: str, command: list[str], *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(INTERRUPTING_SITECUSTOMIZE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), REPO]),
               ORTHOFX_TEST_INTERRUPT_AT=interrupt_at)
    return subprocess.run([sys.executable, *command, *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", [["-m", "orthofx"], "console script"], ids=["python -m", "console script"])
def test_ctrl_c_while_the_cli_is_imported_exits_130_with_one_line(tmp_path, command):
    command = ["-c", console_script_code()] if command == "console script" else command
    result = interrupted_run(tmp_path, "orthofx.cli", command, "presets")
    assert (result.returncode, result.stderr, result.stdout) == (130, "orthofx: interrupted\n", "")


def test_ctrl_c_while_torch_is_imported_exits_130_with_one_line(tmp_path):
    # orthofx/__init__.py imports its names lazily: torch is first imported by the CLI, inside __main__.run
    result = interrupted_run(tmp_path, "torch", ["-m", "orthofx"], "presets")
    assert (result.returncode, result.stderr) == (130, "orthofx: interrupted\n")


# ------------------------------------------------------------------------------ --plot format message

def test_plot_format_problem_is_the_text_both_callers_prefix(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from matplotlib.backend_bases import FigureCanvasBase

    from orthofx.report import check_plot_format, plot_format_problem

    others = ", .".join(f for f in sorted(FigureCanvasBase.get_supported_filetypes()) if f != "png")
    path = str(tmp_path / "spectra.txt")
    expected = f"{path!r} has an unknown image format .txt; give a path ending in .png (or .{others})"
    assert plot_format_problem(path) == expected
    assert plot_format_problem(str(tmp_path / "spectra.svg")) is None
    with pytest.raises(ArgumentError) as info:
        check_plot_format(path)
    assert str(info.value) == f"Report.plot: {expected}"
    code = main(["transform", "small_cnn", "--policy", "lorth", "--plot", path])
    assert (code, capsys.readouterr().err) == (2, f"orthofx: error: --plot {path}: {expected}\n")


# ------------------------------------------------------------------------------ frozen ConvNorm rows

class OneConv(nn.Module):
    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


def frozen_layer(conv: nn.Conv2d, size: int, affine: bool = False) -> tuple[nn.Module, FrozenConvNormNd, dict]:
    """``(frozen model, its frozen ConvNorm layer, its report row)`` of a model holding ``conv``, transformed with
    ConvNorm on an input of ``size`` x ``size``; the affine part, when asked for, gets random weights first."""
    torch.manual_seed(0)
    conv.weight.data.normal_()
    policy = {"orthofx": 1, "rules": [{"match": {"type": "Conv2d"}, "apply": "convnorm",
                                       "with": {"affine": affine}}]}
    gm = orthofx.transform(OneConv(conv), policy, example_inputs=(torch.randn(2, conv.in_channels, size, size),))
    if affine:
        with torch.no_grad():
            gm.conv.affine.weight.normal_()
    frozen = orthofx.freeze(gm)
    layer = frozen.get_submodule("conv")
    assert isinstance(layer, FrozenConvNormNd)
    (row,) = orthofx.report(frozen).rows
    return frozen, layer, row


def dense(function, shape: tuple[int, ...]) -> torch.Tensor:
    """The dense float64 matrix of a linear ``function`` of tensors of ``shape``: column j is its value on basis
    vector j."""
    basis = torch.eye(math.prod(shape), dtype=torch.float64).reshape(-1, *shape)
    return function(basis).reshape(basis.shape[0], -1).T


def circular_conv_matrix(weight: torch.Tensor, grid: int) -> torch.Tensor:
    """The stride-1 circular correlation with ``weight`` on a ``grid`` x ``grid`` input: rows (m, i, j)."""
    w = weight.detach().double()
    k = w.shape[-1]
    return dense(lambda x: F.conv2d(F.pad(x, [0, k - 1, 0, k - 1], mode="circular"), w), (w.shape[1], grid, grid))


def filter_matrix(v: torch.Tensor, grid: int) -> torch.Tensor:
    """ConvNorm's filtering ``irfft2(rfft2(z) * V)`` of a map z of V.shape[0] channels on the grid."""
    v = v.double()
    return dense(lambda z: torch.fft.irfft2(torch.fft.rfft2(z) * v, s=(grid, grid)), (v.shape[0], grid, grid))


def rows_at(channels: int, grid: int, positions: list[int]) -> torch.Tensor:
    """Row indices (m, i, j) of a channels x grid x grid map, i and j in ``positions``."""
    return torch.tensor([(m * grid + i) * grid + j for m in range(channels) for i in positions for j in positions])


def layer_matrix(layer: nn.Module, channels: int, size: int) -> torch.Tensor:
    """The frozen layer's own linear map on channels x size x size inputs, in float64, bias removed."""
    layer = copy.deepcopy(layer).double()
    with torch.no_grad():
        offset = layer(torch.zeros(1, channels, size, size, dtype=torch.float64)).reshape(-1)
        return dense(lambda x: layer(x), (channels, size, size)) - offset[:, None]


@pytest.mark.parametrize("c_in, c_out, stride, size", [(3, 4, 1, 5), (4, 3, 2, 6)], ids=["CO stride 1",
                                                                                          "RO stride 2"])
def test_frozen_convnorm_row_has_the_singular_values_of_conv_and_convnorm(c_in, c_out, stride, size):
    conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
    frozen, layer, row = frozen_layer(conv, size)
    grid = size + 2  # L = N + Q_l + Q_r - k + 1 with Q = k - 1 = 2
    assert layer.grids == [(grid, grid)]
    operator = filter_matrix(layer.filter_for((grid, grid)), grid) @ circular_conv_matrix(layer.conv.weight, grid)
    # the operator on the grid is the frozen layer's: its outputs (S i - p) and its inputs (0 .. N-1) of it
    outputs = [(stride * i - 1) % grid for i in range((size + 2 - 3) // stride + 1)]
    inputs = rows_at(c_in, grid, list(range(size)))
    torch.testing.assert_close(operator[rows_at(c_out, grid, outputs)][:, inputs],
                               layer_matrix(layer, c_in, size), rtol=0, atol=1e-9)
    # circular: every S-th row of the grid
    expected = torch.linalg.svdvals(operator[rows_at(c_out, grid, list(range(0, grid, stride)))])
    assert row["input"] == (size, size)
    assert row["layer"] == f"FrozenConvNormNd({c_in}->{c_out}, k=3, s={stride}) (figures: conv + ConvNorm, " \
                           f"circular on its FFT grid {grid}x{grid})"
    assert row["sigma_max"] == pytest.approx(float(expected.max()), rel=1e-9)
    assert row["sigma_min"] == pytest.approx(float(expected.min()), rel=1e-9)
    torch.testing.assert_close(orthofx.report(frozen).spectra["conv"], expected, rtol=1e-9, atol=1e-12)
    assert row["lorth"] is None and row["exists"] == ("yes (CO)" if stride == 1 else "yes (RO)")


def test_frozen_convnorm_row_includes_the_affine_part():
    c_in, c_out, stride, size = 2, 3, 2, 6
    frozen, layer, row = frozen_layer(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), size,
                                      affine=True)
    grid, out_grid = size + 2, (size + 2) // stride
    operator = filter_matrix(layer.filter_for((grid, grid)), grid) @ circular_conv_matrix(layer.conv.weight, grid)
    subsampled = operator[rows_at(c_out, grid, list(range(0, grid, stride)))]
    a = layer.affine.weight.detach().double()  # depthwise, "same": circular on the output grid (a shift aside)
    k = a.shape[-1]
    affine = dense(lambda z: F.conv2d(F.pad(z, [0, k - 1, 0, k - 1], mode="circular"), a, groups=c_out),
                   (c_out, out_grid, out_grid))
    expected = torch.linalg.svdvals(affine @ subsampled)
    assert row["layer"].endswith("(figures: conv + ConvNorm + affine, circular on its FFT grid 8x8)")
    assert row["sigma_max"] == pytest.approx(float(expected.max()), rel=1e-9)
    assert row["sigma_min"] == pytest.approx(float(expected.min()), rel=1e-9)


def test_frozen_one_tap_convnorm_row_is_its_scaled_conv():
    c_in, c_out, size = 4, 6, 3
    frozen, layer, row = frozen_layer(nn.Conv2d(c_in, c_out, 1), size)
    matrix = layer_matrix(layer, c_in, 1)  # a 1 x 1 conv: the same matrix at every position
    expected = torch.linalg.svdvals(matrix)
    assert row["layer"] == f"FrozenConvNormNd({c_in}->{c_out}, k=1, s=1) (figures: conv + ConvNorm)"
    assert row["sigma_max"] == pytest.approx(float(expected.max()), rel=1e-9)
    assert row["sigma_min"] == pytest.approx(float(expected.min()), rel=1e-9)
    # ConvNorm of a 1 x 1 conv normalises each output channel's weights; the rows are unit vectors
    torch.testing.assert_close(matrix.norm(dim=1), torch.ones(c_out, dtype=torch.float64), rtol=1e-4, atol=0)
    gram = matrix.T @ matrix  # column orthogonal case: ||W^T W - I||^2 (P0 Theorem 7, one tap)
    assert row["lorth"] == pytest.approx(float((gram - torch.eye(c_in, dtype=gram.dtype)).square().sum()), rel=1e-9)
    assert row["input"] == (size, size) and row["exists"] == "yes (CO)"


def test_frozen_convnorm_row_says_why_a_grid_the_stride_does_not_divide_has_no_figures():
    _, layer, row = frozen_layer(nn.Conv2d(3, 4, 3, stride=2, padding=1), 5)
    assert convnorm_geometry((5, 5), 3, 2, 1).grid == (7, 7) and layer.grids == [(7, 7)]
    assert row["layer"] == ("FrozenConvNormNd(3->4, k=3, s=2) (no figures: its FFT grid 7x7 is not a multiple of "
                            "the stride 2x2, so the strided operator is no circular conv)")
    assert row["sigma_min"] is None and row["sigma_max"] is None and row["exists"] == "yes (RO)"


def test_frozen_written_convnorm_layer_row_is_the_layer_not_its_stride_1_conv():
    """A model written with a ConvNorm layer, frozen: the site of its conv (``0.conv``) holds the frozen layer's
    stride-1 correlation conv, whose figures (stride 1: another operator) the row gave as the layer's."""
    from orthofx.nn import ConvNormConv2d

    model = nn.Sequential(ConvNormConv2d(nn.Conv2d(4, 3, 3, stride=2, padding=1)))
    x = torch.randn(1, 4, 6, 6)
    model(x)
    frozen = orthofx.freeze(model, (x,))
    assert frozen.get_submodule("0.conv").stride == (1, 1)
    (row,) = orthofx.report(frozen).rows
    # freeze records the example's input sizes (session 34), so the row has the layer's figures on its FFT grid
    assert row["site"] == "0.conv" and row["layer"] == ("FrozenConvNormNd(4->3, k=3, s=2) (figures: conv + "
                                                        "ConvNorm, circular on its FFT grid 8x8)")
    assert row["lorth"] is None and row["exists"] == "yes (RO)"  # 3 outputs <= 4 inputs * 2 * 2 at stride 2
    # the same figures as the same layer transformed by the convnorm pass, then frozen (the stride-2 operator)
    twin = nn.Conv2d(4, 3, 3, stride=2, padding=1)
    twin.load_state_dict(model[0].conv.state_dict())
    policy = {"orthofx": 1, "rules": [{"match": {"type": "Conv2d"}, "apply": "convnorm"}]}
    (expected,) = orthofx.report(orthofx.freeze(orthofx.transform(nn.Sequential(twin), policy,
                                                                  example_inputs=(x,)))).rows
    assert row["sigma_min"] == pytest.approx(expected["sigma_min"], rel=1e-9)
    assert row["sigma_max"] == pytest.approx(expected["sigma_max"], rel=1e-9)
