"""Every example in orthofx's docstrings runs as written.

Two forms are collected from the docstrings of every orthofx module and of the classes, functions and methods
each defines:

- ``Example::`` / ``Examples::`` blocks (the indented text after the marker): run with ``exec`` in a fresh
  namespace, in a temporary working directory (examples write files such as ``model.onnx``), so each block must
  import what it uses and build its own model and inputs;
- doctests (``>>>`` lines): run with :mod:`doctest` against the module's globals, as ``doctest.testmod`` does, and
  their printed results compared.

A block that raises, or a doctest whose output differs, fails with the block's location (module.object and the
block's index in the docstring).
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
import re
import textwrap

import pytest

import orthofx

_MARKER = re.compile(r"^(\s*)(?:.*\s)?Examples?::\s*$")


def example_blocks(doc: str) -> list[str]:
    """The dedented text of every ``Example::`` block of ``doc``: the lines after the marker line that are blank
    or indented deeper than it."""
    lines = doc.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        found = _MARKER.match(lines[i])
        if not found:
            i += 1
            continue
        indent = len(found.group(1))
        body, i = [], i + 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
            body.append(lines[i])
            i += 1
        blocks.append(textwrap.dedent("\n".join(body)).strip("\n"))
    return blocks


def _documented_objects():
    """(qualified name, object, module) for every orthofx module and the classes / functions / methods it
    defines (not those it imports), with a docstring."""
    names = ["orthofx"] + [info.name for info in pkgutil.walk_packages(orthofx.__path__, "orthofx.")
                           if info.name != "orthofx.__main__"]  # __main__ runs the CLI on import
    for name in names:
        module = importlib.import_module(name)
        yield name, module, module
        for attr, obj in vars(module).items():
            if getattr(obj, "__module__", None) != name or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            yield f"{name}.{attr}", obj, module
            if inspect.isclass(obj):
                for method_name, member in vars(obj).items():
                    function = getattr(member, "__func__", member)
                    if isinstance(member, property):
                        function = member.fget
                    if inspect.isfunction(function):
                        yield f"{name}.{attr}.{method_name}", function, module


def _collect():
    blocks, doctests = [], []
    seen: set[int] = set()
    for qualname, obj, module in _documented_objects():
        doc = inspect.cleandoc(obj.__doc__) if isinstance(obj.__doc__, str) else None  # own, not inherited
        if not doc or id(obj) in seen:
            continue
        seen.add(id(obj))
        runnable = [block for block in example_blocks(doc) if ">>>" not in block]
        blocks += [pytest.param(block, id=f"{qualname}[{index}]") for index, block in enumerate(runnable)]
        if ">>>" in doc:
            doctests.append(pytest.param(qualname, doc, module, id=qualname))
    return blocks, doctests


EXAMPLE_BLOCKS, DOCTESTS = _collect()


def test_the_collection_finds_the_examples():
    # a marker regex that stopped matching would turn every test below into nothing
    assert len(EXAMPLE_BLOCKS) >= 20 and len(DOCTESTS) >= 10
    assert example_blocks("Text.\n\nExample::\n\n    a = 1\n    b = a\n\nAfter.") == ["a = 1\nb = a"]


@pytest.mark.parametrize("block", EXAMPLE_BLOCKS)
def test_example_block_runs(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "<docstring example>", "exec"), {"__name__": "__docstring_example__"})


@pytest.mark.parametrize("qualname, doc, module", DOCTESTS)
def test_doctest_output_matches(qualname, doc, module, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parser = doctest.DocTestParser()
    test = parser.get_doctest(doc, dict(vars(module)), qualname, module.__file__, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


# Public names that may go without an example in their own docstring, each with the reason. Every other class and
# function in ``orthofx.__all__``, ``orthofx.nn.__all__`` and ``orthofx.theory.__all__`` needs one.
_EXCEPTION_CLASS = ("an exception or warning class: orthofx raises or issues it, users catch or filter it; nothing "
                    "to build or call")
EXAMPLE_EXEMPT = {
    **{f"orthofx.{name}": _EXCEPTION_CLASS
       for name in ("OrthofxError", "PolicyError", "CaptureError", "PlanError", "TransformError",
                    "ImpossibleLayerError", "LayerArgumentError", "ArgumentError", "ExportError",
                    "OrthofxWarning", "ScaleLostWarning", "RunningFiltersDroppedWarning")},
}


def _public_callables():
    """(``module.name``, object) for every class and function in the three public ``__all__`` lists."""
    for module in (orthofx, orthofx.nn, orthofx.theory):
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                yield f"{module.__name__}.{name}", obj


def _has_example(obj) -> bool:
    # the object's own docstring (a class's __doc__ is never inherited), in a form the tests above run
    doc = inspect.cleandoc(obj.__doc__) if isinstance(obj.__doc__, str) else ""
    return ">>>" in doc or bool(example_blocks(doc))


def test_every_public_class_and_function_has_an_example():
    missing = [name for name, obj in _public_callables() if name not in EXAMPLE_EXEMPT and not _has_example(obj)]
    assert not missing, f"public objects without an Example:: block or doctest in their own docstring: {missing}"


def test_example_exemptions_name_public_objects():
    # an exemption for a misspelt or removed name would exempt nothing and hide the typo
    public = dict(_public_callables())
    assert set(EXAMPLE_EXEMPT) <= set(public), set(EXAMPLE_EXEMPT) - set(public)
    exceptions = {name for name, obj in public.items() if inspect.isclass(obj) and issubclass(obj, BaseException)}
    assert exceptions == {name for name, reason in EXAMPLE_EXEMPT.items() if reason == _EXCEPTION_CLASS}
