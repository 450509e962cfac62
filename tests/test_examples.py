"""The README's example runs as it stands, and CI runs the README's test command."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_runs():
    pytest.importorskip("sklearn")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "quickstart.py")],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "orth_regularizer" in result.stdout and "sigma_max" in result.stdout


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


def test_readme_python_example_is_the_quickstart():
    with open(os.path.join(ROOT, "README.md")) as handle:
        readme = handle.read()
    with open(os.path.join(ROOT, "examples", "quickstart.py")) as handle:
        example = handle.read()
    block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    code_lines = [line for line in block.splitlines() if line.strip()]
    assert all(line in example for line in code_lines)
