"""Command-line helpers shared by the example scripts: argument types that reject bad values when the command line
is parsed (orthofx.cli's, re-exported here), output-path checks that run before any training (not when the figure
or the results are saved at the end; the benchmark scripts use them too), and a check of the optional dependencies
that names the pip command. Not part of orthofx; the scripts import it from their own folder (``python
examples/<script>.py`` puts that folder on ``sys.path``)."""

from __future__ import annotations

import argparse
import importlib
import os

from orthofx.cli import (non_negative_float, non_negative_int, positive_float,  # noqa: F401
                         positive_int)

#: Import name -> (pip package, orthofx extra that installs it; see pyproject.toml).
EXTRAS = {"sklearn": ("scikit-learn", "demo"), "matplotlib": ("matplotlib", "plot")}


def description(doc: str) -> str:
    """The first paragraph of a script's docstring, for ``--help`` (its first line alone can stop mid-sentence)."""
    return " ".join(doc.strip().split("\n\n")[0].split())


def output_file(text: str, suffix: str, what: str) -> str:
    """``text`` if it names a file ending in ``suffix`` in an existing, writable folder; else an
    ``argparse.ArgumentTypeError`` saying what to change (``what``: the kind of file, for the message). Checked
    when the command line is parsed, so that a bad path stops the script before it runs (the file is written at
    the end), and no folder is created on the user's behalf (a typo would otherwise grow a tree)."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file path ending in {suffix}")
    if not text.lower().endswith(suffix):
        raise argparse.ArgumentTypeError(f"{what}: the path must end in {suffix}, got {text!r}")
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"folder {folder!r} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"folder {folder!r} is not writable")
    return text


def png_path(text: str) -> str:
    """A path ending in ``.png`` in an existing, writable folder (:func:`output_file`)."""
    return output_file(text, ".png", "the figure is a PNG")


def json_path(text: str) -> str:
    """A path ending in ``.json`` in an existing, writable folder (:func:`output_file`): the benchmarks' ``--out``."""
    return output_file(text, ".json", "the results are JSON")


def require(parser: argparse.ArgumentParser, *modules: str) -> None:
    """Stop with a usage error (exit status 2) naming the install command when an optional dependency is missing,
    before the script does any work."""
    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        packages = " and ".join(EXTRAS[m][0] for m in missing)
        extras = ",".join(dict.fromkeys(EXTRAS[m][1] for m in missing))
        parser.error(f"this example needs {packages}: pip install -e \".[{extras}]\" from the repository root "
                     f"(or pip install {' '.join(EXTRAS[m][0] for m in missing)})")
