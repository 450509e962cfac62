"""Where the example scripts live, and how the tests import one as a module (its ``main`` is not run)."""

import importlib
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def import_example(name):
    """``examples/<name>.py`` as a module; it imports ``_cli`` from its own folder, as ``python examples/x.py``
    would let it."""
    sys.path.insert(0, EXAMPLES)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(EXAMPLES)


def run_main_in_process(name, argv, monkeypatch, capsys):
    """``(module, stdout)`` of ``examples/<name>.py``'s ``main(argv)`` run in this process (no interpreter start nor
    imports, ~3 s a run), in the working directory the caller set with ``monkeypatch.chdir``; torch's thread count
    is put back (the scripts set one thread)."""
    module = import_example(name)
    threads = torch.get_num_threads()
    try:
        module.main(list(argv))
    finally:
        torch.set_num_threads(threads)
    return module, capsys.readouterr().out
