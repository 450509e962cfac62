"""The README's example runs as it stands, CI runs the README's test command, examples/orthonormal_linear.py
reproduces P1's linear convergence, and every example checks its arguments and optional dependencies first."""

import os
import re
import subprocess
import sys

import pytest
import torch

import orthofx
from example_scripts import EXAMPLES, ROOT, import_example
from references import lorth64

# One intra-op thread in the scripts' subprocesses: the quickstart does not set it itself (it is the README's code),
# and with two threads on a busy 2-core machine it took 19 s instead of 4.5 s.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(script, *args, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=ENV)


def _report_column(lines, name, following, sites):
    """Column ``name`` of the report table printed in ``lines`` (the header line that has ``name``, with
    ``following`` as the next column), as site -> float."""
    header = next(line for line in lines if line.startswith("site") and f" {name} " in line)
    start, stop = header.index(f" {name} "), header.index(f" {following} ")
    return {line.split()[0]: float(line[start:stop]) for line in lines[lines.index(header) + 2:]
            if line.split() and line.split()[0] in sites}


def test_quickstart_runs_deterministically_and_lorth_falls():
    pytest.importorskip("sklearn")
    first = _run("quickstart.py")
    assert first.returncode == 0, first.stderr
    assert "orth_regularizer" in first.stdout and "sigma_max" in first.stdout
    # Seeded: a second run prints exactly the same plan and report.
    second = _run("quickstart.py")
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    # L_orth after the 100 training steps is below its value at the seeded initialisation, computed here from the
    # untrained model from P0's definition on the dense operator (tests/references.py), independently of the report
    # and of orthofx.metrics.
    torch.manual_seed(0)
    model = orthofx.models.get("small_cnn")
    initial = {name: lorth64(layer.weight, stride=getattr(layer, "stride", 1), groups=getattr(layer, "groups", 1))
               for name, layer in model.named_modules() if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear))}
    reported = _report_column(first.stdout.splitlines(), "lorth", "sigma_min", initial)
    assert sorted(reported) == sorted(initial) == ["conv1", "conv2", "conv3", "fc"]
    for site, value in reported.items():
        assert 0.0 <= value < 0.5 * initial[site], (site, value, initial[site])


def _readme_commands():
    with open(os.path.join(ROOT, "README.md")) as handle:
        text = handle.read()
    block = re.search(r"```(?:bash|sh)\n(.*?)```", text, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_starts_with_the_install_commands_and_ci_runs_the_test_one():
    commands = _readme_commands()
    assert len(commands) == 2 and "orthofx demo" in commands[0] and "pytest" in commands[1]
    with open(os.path.join(ROOT, ".ci", "run")) as handle:
        ci = handle.read()
    test_command = commands[1].replace("pip install", "python3 -m pip install").replace(
        "&& pytest", "&& python3 -m pytest")
    assert test_command in ci or commands[1] in ci


def test_the_install_commands_pin_a_torch_the_package_admits():
    """constraints.txt (the README's ``-c``) pins the torch CI runs on, and that release must lie in the range
    pyproject.toml declares: a pin outside it would make the install fail, a range bumped alone would leave CI on
    a release no longer claimed."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        declared = [Requirement(r) for r in tomllib.load(handle)["project"]["dependencies"]]
    with open(os.path.join(ROOT, "constraints.txt")) as handle:
        pinned = [Requirement(line.strip()) for line in handle if line.strip() and not line.startswith("#")]
    torch_range = next(r.specifier for r in declared if r.name == "torch")
    torch_pin = next(r.specifier for r in pinned if r.name == "torch")
    (pin,) = list(torch_pin)
    assert pin.operator == "==" and torch_range.contains(pin.version), (str(torch_range), str(torch_pin))
    assert all("-c constraints.txt" in command for command in _readme_commands())


def test_readme_python_example_is_the_quickstart():
    with open(os.path.join(ROOT, "README.md")) as handle:
        readme = handle.read()
    with open(os.path.join(ROOT, "examples", "quickstart.py")) as handle:
        example = handle.read()
    block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    code_lines = [line for line in block.splitlines() if line.strip()]
    example_lines = [line for line in example.splitlines() if line.strip()]
    # The quickstart is the README's code, line for line, after its docstring.
    assert example_lines[-len(code_lines):] == code_lines


def test_readme_other_python_blocks_run_as_written():
    """Every python block of the README after the quickstart runs on its own (fresh namespace) and does what its
    comments say where that is checkable here."""
    with open(os.path.join(ROOT, "README.md")) as handle:
        blocks = re.findall(r"```python\n(.*?)```", handle.read(), re.S)[1:]
    assert len(blocks) >= 2
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "<README block>", "exec"), namespace)
        if "conv" in namespace:   # the layers block: the plain form of the strided orthogonal conv
            plain = namespace["conv"].to_plain()
            assert isinstance(plain, torch.nn.Conv2d) and plain.padding_mode == "circular"


# --------------------------------------------------------------------------------------- orthonormal_linear.py


def test_orthonormal_linear_quick_converges_linearly_and_slower_with_depth(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "p1.png"
    result = _run("orthonormal_linear.py", "--quick", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [line.split() for line in result.stdout.splitlines() if re.match(r"\s*\d+\s+[0-9.]+\s+\d+\s", line)]
    assert [int(r[0]) for r in rows] == [2, 4], result.stdout
    steps = []
    for depth, lr, to_target, final, rate, defect in ((int(r[0]), *map(float, r[1:])) for r in rows):
        assert final < 1e-6 and defect < 1e-12, (depth, final, defect)
        # The free layer's gradient step contracts its residual by (1 - lr) per step once the constrained layers
        # have settled: loss ratio (1 - lr)^2 (whitened data, orthogonal product of the other layers).
        assert rate == pytest.approx((1 - lr) ** 2, rel=2e-3), (depth, lr, rate)
        steps.append(to_target)
    assert steps[0] < steps[1], "deeper should converge more slowly"
    with open(out, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def _riemannian_gd(weights, x, y, lr, steps):
    """P1's Riemannian gradient descent from the paper's formulas (shared/PAPERS.md), independently of orthofx:
    W_1 takes a plain gradient step; W_2 .. W_N take the tangent projection P_W(G) = G - W sym(W^T G) and the polar
    retraction (W + xi)(I + xi^T xi)^(-1/2). Returns the loss before each step and after the last."""
    ws = [w.clone() for w in weights]
    losses = []
    for _ in range(steps + 1):
        ws = [w.requires_grad_(True) for w in ws]
        out = x
        for w in ws:
            out = out @ w.T
        loss = 0.5 * (out - y).square().sum(1).mean()
        losses.append(float(loss.detach()))
        grads = torch.autograd.grad(loss, ws)
        with torch.no_grad():
            new = [ws[0] - lr * grads[0]]
            for w, g in zip(ws[1:], grads[1:]):
                wtg = w.T @ g
                xi = -lr * (g - w @ (wtg + wtg.T) / 2)
                evals, evecs = torch.linalg.eigh(torch.eye(len(w), dtype=w.dtype) + xi.T @ xi)
                new.append((w + xi) @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T)
        ws = new
    return losses


def test_orthonormal_linear_training_matches_an_independent_riemannian_descent(one_thread):
    example = import_example("orthonormal_linear")
    depth, width, lr, steps = 3, 6, 0.3, 30
    x, y = example.make_data(width, samples=4 * width)
    assert torch.allclose(x.T @ x / len(x), torch.eye(width, dtype=x.dtype), atol=1e-12)  # whitened exactly
    run = example.train(depth, width, lr, x, y, max_steps=steps)
    # The same initial weights: the example's policy seeds the isometric initialisation (seed 1, train's default).
    model = orthofx.models.get("deep_linear", depth=depth, width=width, in_features=width, out_features=width)
    gm = orthofx.transform(model.double(), example.policy(1))
    weights = [gm.get_submodule(f"layers.{i}").weight.detach() for i in range(depth)]
    reference = _riemannian_gd(weights, x, y, lr, steps)
    assert len(run["losses"]) == steps + 1 and run["losses"][-1] < 1e-7  # not stopped early (at 1e-11)
    assert run["losses"] == pytest.approx(reference, rel=1e-8, abs=1e-14)
    # Linear convergence: once the loss is 1e-2 of its start, each step multiplies it by (1 - lr)^2.
    start = example.steps_to(reference, 1e-2 * reference[0])
    ratios = [b / a for a, b in zip(reference[start:], reference[start + 1:])]
    assert max(abs(r / (1 - lr) ** 2 - 1) for r in ratios) < 0.02, ratios
    assert example.fitted_rate(run["losses"]) == pytest.approx((1 - lr) ** 2, rel=5e-3)
    assert run["defect"] < 1e-12


@pytest.mark.parametrize("argv, message", [
    (["--width", "0"], "--width: expected an integer >= 1"),
    (["--width", "-2"], "--width: expected an integer >= 1"),
    (["--out", "curve.svg"], "must end in .png"),
    (["--out", os.path.join("no", "such", "folder", "x.png")], "does not exist"),
])
def test_orthonormal_linear_rejects_bad_arguments(argv, message, capsys):
    example = import_example("orthonormal_linear")
    with pytest.raises(SystemExit) as raised:
        example.main(argv)
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- optional dependencies

_BLOCKED_IMPORTS = """
import runpy, sys
sys.modules["sklearn"] = None     # as if scikit-learn and matplotlib were not installed
sys.modules["matplotlib"] = None
sys.path.insert(0, {folder!r})    # what "python examples/<script>.py" does
sys.argv = [{script!r}, "--quick"]
runpy.run_path({path!r}, run_name="__main__")
"""


@pytest.mark.parametrize("script, extras", [("orthonormal_linear.py", "plot"), ("deep_isometry.py", "demo,plot"),
                                            ("svd_conditioning.py", "demo,plot")])
def test_missing_optional_dependencies_stop_the_script_at_once(script, extras, tmp_path):
    code = _BLOCKED_IMPORTS.format(folder=EXAMPLES, script=script, path=os.path.join(EXAMPLES, script))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path, env=ENV)
    assert result.returncode == 2, result.stderr[-4000:]
    assert f'pip install -e ".[{extras}]"' in result.stderr
    assert result.stdout == "" and not list(tmp_path.iterdir())  # stopped before any work, wrote nothing
