"""Where the example scripts live, and how the tests import one as a module (its ``main`` is not run)."""

import importlib
import os
import sys

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
