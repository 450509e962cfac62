"""The ``orthofx`` command.

    orthofx demo                                   # explain, transform, train a little on digits, report
    orthofx presets                                # list the preset policies
    orthofx check POLICY [--model M [--input-shape 1,3,32,32]]
    orthofx explain MODEL --policy P [--input-shape ...]
    orthofx transform MODEL --policy P --input-shape 1,3,32,32 [--json report.json] [--plot spectra.png]
                      [--export model.onnx|model.pt2|model.pt]

MODEL is a built-in name (``orthofx.models.names()``), ``package.module:factory`` or ``path/to/file.py:factory``
(a callable taking no arguments that returns an ``nn.Module``), or ``path/to/file.py`` alone for the file's
``model`` (an ``nn.Module``, or such a callable). Exit status 0 on success, 2 on bad input with a
one-line message, 1 with a one-line message on an unexpected failure or a demo whose training diverged, 130 with
``orthofx: interrupted`` on Ctrl-C (``--debug`` adds the traceback, with the same exit status), 1 without a message
when standard output is a pipe whose reader stopped early (``orthofx explain ... | head``). The output files
of ``transform`` are written only when every one of them could be: a failure or an interrupt leaves none behind.
They replace existing files of the same names (as ``cp`` does; the paths are the user's request), and an ``.onnx``
export also writes its external weights to ``PATH.data`` next to it (replacing that file too; the command prints
both names); an output that would replace one of the command's inputs (the policy or model file) is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import importlib.machinery
import importlib.util
import io
import json
import logging
import math
import os
import re
import select
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
import traceback
import warnings
from typing import Callable, Sequence

import torch
from torch import nn

from . import models
from .__main__ import report_interrupt
from .capture import copy_model
from .errors import OrthofxError, OrthofxWarning, first_few
from .export import batch_too_small_for_dynamic, check_export_path, export
from .optim import attach
from .passes.base import EvalRun
from .penalty import penalty, penalty_terms
from .policy import Policy, presets
from .report import plot_format_problem, report
from .transform import explain, transform

__all__ = ["main", "load_model"]


class CliError(OrthofxError):
    """Bad command-line input (exit status 2)."""

    exit_status = 2


class TrainingDiverged(OrthofxError):
    """The demo's training reached a non-finite loss or parameters, or an orthofx optimizer hook refused a step
    (exit status 1: the input was valid, the run failed)."""

    exit_status = 1


#: The attribute a model file given without ``:factory`` (``orthofx explain model.py ...``) must define.
DEFAULT_MODEL_ATTRIBUTE = "model"


def load_model(spec: str) -> nn.Module:
    """A model from a built-in name, ``package.module:factory``, ``file.py:factory`` or ``file.py``.

    ``factory`` names a callable taking no arguments that returns an ``nn.Module`` (or an ``nn.Module`` itself).
    A ``.py`` file given without ``:factory`` uses its attribute ``model`` (:data:`DEFAULT_MODEL_ATTRIBUTE`), so
    ``model = Net()`` or ``def model(): return Net()`` in ``net.py`` makes ``orthofx explain net.py ...`` work;
    a file without one is an error listing the callables it defines.

    As for ``python dir/file.py``, the file's directory is put first on ``sys.path`` (and stays there: the model
    may import siblings lazily, in its factory or forward), so the file can import the modules next to it, and
    ``sys.argv`` is ``[file]`` while the file is imported and the factory runs (a script that parses its command
    line at import time sees no arguments, not orthofx's). The file itself is imported under a name made from its
    absolute path: two files called ``model.py`` in different directories are two modules. An existing file is
    read as Python source whatever its suffix.
    """
    parsed = ModelSpec.parse(spec)
    if parsed.builtin:
        try:
            return models.get(spec)
        except ValueError as exc:
            raise CliError(f"{exc}; or give package.module:factory, file.py:factory or file.py (its "
                           f"{DEFAULT_MODEL_ATTRIBUTE!r})") from None
    target, attr = parsed.target, parsed.attr
    if attr is not None and not attr.strip():
        raise CliError(f"model {spec!r} names no factory after ':'; give {target or 'package.module'}:factory, "
                       "the name of a callable taking no arguments that returns an nn.Module")
    with _script_argv(target):
        module = _load_module(parsed)
        factory = getattr(module, parsed.factory, None)
        if factory is None:
            raise CliError(_no_default_model(target, module) if attr is None else
                           f"{target!r} has no attribute {attr!r}")
        try:
            model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
        except SystemExit as exc:  # a factory that calls sys.exit (or argparse's parse_args) would end orthofx
            raise CliError(f"{spec} called sys.exit({exc.code!r}); MODEL must name a callable taking no arguments "
                           "that returns an nn.Module") from exc
        except Exception as exc:  # the factory must be callable without arguments
            raise CliError(f"{spec} failed: {type(exc).__name__}: {exc}; MODEL must name a callable taking no "
                           "arguments that returns an nn.Module (--debug shows the traceback)") from exc
    if not isinstance(model, nn.Module):
        raise CliError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """MODEL as written on the command line, parsed: the one reading of its forms, for :func:`load_model` (which
    loads it) and for ``transform``'s check that no output replaces the model file.

    - a built-in name (no ``:``, no ``.py`` suffix): ``builtin``; ``target`` is ``""``;
    - ``target:attr`` (split at the last ``:``): ``attr`` names the factory in the module or file ``target``;
    - ``file.py`` alone (a ``.py`` suffix, surrounding spaces ignored, no ``:``): ``target`` is the file and
      ``attr`` is ``None``: its :data:`DEFAULT_MODEL_ATTRIBUTE` is used. Other existing files need ``:factory``
      (a policy.yaml given as MODEL by mistake must not be run as Python).

    ``target`` names a file (:attr:`is_file`) when it ends in ``.py`` or is an existing file; otherwise a module
    to import. Example::

        from orthofx.cli import ModelSpec
        assert ModelSpec.parse("small_cnn").builtin
        assert ModelSpec.parse("nets/a.py:build") == ModelSpec("nets/a.py:build", False, "nets/a.py", "build")
        assert ModelSpec.parse("nets/a.py").factory == "model" and ModelSpec.parse("nets/a.py").is_file
        assert not ModelSpec.parse("torch.nn:Identity").is_file
    """

    spec: str
    builtin: bool
    target: str
    attr: str | None

    @classmethod
    def parse(cls, spec: str) -> ModelSpec:
        if ":" in spec:
            target, _, attr = spec.rpartition(":")
            return cls(spec, False, target, attr)
        if spec.strip().endswith(".py"):
            return cls(spec, False, spec, None)
        return cls(spec, True, "", None)

    @property
    def factory(self) -> str | None:
        """The attribute that builds the model: ``attr``, or :data:`DEFAULT_MODEL_ATTRIBUTE` for ``file.py``
        alone; ``None`` for a built-in name."""
        if self.builtin:
            return None
        return DEFAULT_MODEL_ATTRIBUTE if self.attr is None else self.attr

    @property
    def is_file(self) -> bool:
        """Whether :attr:`target` is read as a Python file (a ``.py`` suffix or an existing file) rather than
        imported as a module."""
        return not self.builtin and (self.target.endswith(".py") or _is_file(self.target))


def _no_default_model(target: str, module) -> str:
    """The message for a model file given without ``:factory`` that defines no ``model``: what to write, with the
    callables the file itself defines (functions and nn.Module classes, not what it imports) as candidates."""
    candidates = sorted(name for name, value in vars(module).items()
                        if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__
                        and (isinstance(value, type) and issubclass(value, nn.Module)
                             or not isinstance(value, type) and callable(value)))
    example = candidates[0] if candidates else "build"
    found = f" (it defines {first_few(candidates, 6)})" if candidates else ""
    return (f"model file {target!r} is given without ':factory', so its attribute {DEFAULT_MODEL_ATTRIBUTE!r} is "
            f"used, but it defines none{found}; give {target}:{example} naming a callable taking no arguments that "
            f"returns an nn.Module, or define {DEFAULT_MODEL_ATTRIBUTE} = ... (an nn.Module or such a callable) in "
            "the file")


@contextlib.contextmanager
def _script_argv(target: str):
    """``sys.argv`` as ``python target`` would set it, for the duration of the block."""
    saved = sys.argv
    sys.argv = [target]
    try:
        yield
    finally:
        sys.argv = saved


def _load_module(parsed: ModelSpec):
    """The module named by the part of the spec before ':': a file (:attr:`ModelSpec.is_file`) or an importable
    module name."""
    target, spec = parsed.target, parsed.spec
    if parsed.is_file:
        return _load_file(target)
    if not target.strip():
        raise CliError(f"model {spec!r} names no module before ':'; give package.module:factory or "
                       "file.py:factory")
    if _is_directory(target):
        raise CliError(f"model {spec!r}: {target!r} is a directory; give path/to/file.py:factory")
    if "/" in target or os.sep in target:  # a module name has no slash: this was meant as a file
        raise CliError(f"model file {target!r} does not exist")
    try:
        return importlib.import_module(target)
    except ImportError as exc:
        raise CliError(f"cannot import {target!r} for model {spec!r}: {exc}") from None
    except SystemExit as exc:  # a module that exits while imported would end orthofx with its status
        raise CliError(f"cannot import {target!r} for model {spec!r}: it called sys.exit({exc.code!r}) while "
                       "being imported; move that call under `if __name__ == '__main__':`") from exc
    except Exception as exc:  # the user's module failed while being imported
        raise CliError(f"cannot import {target!r} for model {spec!r}: {type(exc).__name__}: {exc} "
                       "(--debug shows the traceback)") from exc


def _is_file(path: str) -> bool:
    try:
        return os.path.isfile(path)
    except (OSError, ValueError):  # a NUL byte, a name too long
        return False


def _is_directory(path: str) -> bool:
    try:
        return os.path.isdir(path)
    except (OSError, ValueError):
        return False


def _load_file(target: str):
    """The module of the Python file ``target``, its directory first on ``sys.path`` (see :func:`load_model`)."""
    if _is_directory(target):
        raise CliError(f"model file {target!r} is a directory; give path/to/file.py:factory")
    if not _is_file(target):
        raise CliError(f"model file {target!r} does not exist")
    path = os.path.realpath(target)
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    stem = "".join(c if c.isalnum() or c == "_" else "_" for c in os.path.splitext(os.path.basename(path))[0])
    digest = hashlib.sha1(path.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    module_name = f"orthofx_user_model_{stem}_{digest}"
    # an explicit source loader: the default one is chosen by suffix, and there is none for 'model.txt'
    loader = importlib.machinery.SourceFileLoader(module_name, path)
    module_spec = importlib.util.spec_from_file_location(module_name, path, loader=loader)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except SystemExit as exc:  # a script that exits (argparse's parse_args ...) would end orthofx with its status
        sys.modules.pop(module_name, None)
        raise CliError(f"cannot load model file {target!r}: it called sys.exit({exc.code!r}) while being imported; "
                       "move the script's own code under `if __name__ == '__main__':`") from exc
    except Exception as exc:  # the user's file: a syntax error, a failing import ...
        sys.modules.pop(module_name, None)
        raise CliError(f"cannot load model file {target!r}: {type(exc).__name__}: {exc} (--debug shows the "
                       "traceback)") from exc
    return module


#: One dimension of --input-shape: ASCII digits only (int() would also take '1_0' and non-ASCII digits).
_DIMENSION = re.compile(r"\s*[0-9]+\s*")


def _input_shape(text: str | None, model_spec: str | None) -> tuple[int, ...] | None:
    if text is None:
        if model_spec is not None and model_spec in models.names():
            return (1,) + models.input_shape(model_spec)
        return None
    parts = text.replace("x", ",").split(",")
    if not all(_DIMENSION.fullmatch(part) for part in parts):
        # a minus sign is no digit: "-8" reads as a shape of positive sizes given wrongly, not as bad text
        raise CliError(f"--input-shape must be comma-separated positive integers like 1,3,32,32, got {text!r}")
    # leading zeros dropped first: int() refuses over 4300 digits (ValueError), zeros included
    digits = [part.strip().lstrip("0") or "0" for part in parts]
    for dimension in digits:
        if len(dimension) > 19 or int(dimension) > 2 ** 63 - 1:  # torch takes sizes up to 2^63 - 1 (int64)
            given = text if len(text) <= 80 else f"{text[:40]}... ({len(text)} characters)"
            shown = dimension if len(dimension) <= 24 else f"{dimension[:12]}... ({len(dimension)} digits)"
            raise CliError(f"--input-shape {given}: the dimension {shown} is too large (at most 2^63 - 1); give "
                           "the shape of one input, batch first, like 1,3,32,32")
    shape = tuple(int(dimension) for dimension in digits)
    if any(n < 1 for n in shape):
        raise CliError(f"--input-shape must contain positive integers, got {text!r}")
    return shape


def _example(model: nn.Module, text: str | None, model_spec: str | None) -> tuple[torch.Tensor, ...] | None:
    """The example input of ``--input-shape`` (or a built-in model's default shape): random numbers in the
    dtype and on the device of the model's first floating-point parameter or buffer. The model runs on it once
    (eval mode, no gradients), as transform does, so that a shape the model cannot take is a usage error."""
    shape = _input_shape(text, model_spec)
    if shape is None:
        return None
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    dtype = tensors[0].dtype if tensors else torch.get_default_dtype()
    device = tensors[0].device if tensors else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    given = f"--input-shape {text}" if text is not None else f"the default input shape {','.join(map(str, shape))}"
    try:
        inputs = (torch.randn(*shape, generator=generator, dtype=dtype).to(device),)
    except (RuntimeError, TypeError, OverflowError, MemoryError) as exc:  # too many elements for an int64 / memory
        raise CliError(f"cannot create an example input of {given} ({dtype}, {device}): {type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''}; give the shape of one input, batch "
                       "first") from None
    try:
        with EvalRun(model):
            model(*inputs)
    except Exception as exc:  # the user's model on the user's shape
        # the shape may be right and the input still wrong: the CLI makes one random floating-point tensor, so a
        # model taking token ids (an nn.Embedding) or several inputs needs example inputs from Python
        raise CliError(f"the model fails on an input of {given} ({dtype}, {device}): {type(exc).__name__}: {exc}; "
                       "give the shape of one input the model takes, batch first. The CLI gives the model one "
                       "random floating-point input: for a model taking several inputs or integer ids (token "
                       "indices), leave out --input-shape, or call orthofx.transform(model, policy, "
                       "example_inputs=(...)) in Python (--debug shows the traceback)") from exc
    return inputs


# --------------------------------------------------------------------------------------------- commands

def _cmd_presets(args: argparse.Namespace) -> int:
    for name, description in presets().items():
        print(f"{name:16s} {description}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    if args.input_shape is not None and args.model is None:
        raise CliError(f"--input-shape needs --model (the shape of the model's example input); give --model MODEL "
                       f"or leave out --input-shape {args.input_shape}")
    policy = Policy.load(args.policy)
    plan = None
    if args.model is not None:  # --model "" (an unset shell variable) is an unknown model, not no model
        model = load_model(args.model)
        inputs = _example(model, args.input_shape, args.model)
        with _quiet_torch(args.debug):
            plan = explain(model, policy, inputs)
    # printed once everything is checked: "ok" followed by an error would be read as a pass
    print(f"ok: {policy.source}: {len(policy.rules)} rule(s): "
          + ", ".join(f"{r.name} -> {r.apply}" for r in policy.rules))
    if plan is not None:
        print(plan)
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    inputs = _example(model, args.input_shape, args.model)
    with _quiet_torch(args.debug):
        plan = explain(model, args.policy, inputs)
    print(plan)
    return 0


@contextlib.contextmanager
def _quiet_torch(debug: bool):
    """torch's own diagnostics while the block runs, unless ``--debug``: its log lines (``torch`` logger) are
    dropped, and what it prints to stderr (``torch.export`` prints the partial graph of a failed export, dozens of
    lines, before raising) is held back and written out only when the block succeeds, so that a failure reads as
    the one-line error alone."""
    if debug:
        yield
        return
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    finally:
        logger.setLevel(level)
    sys.stderr.write(held.getvalue())


# --------------------------------------------------------------------------------------------- output files

@dataclasses.dataclass
class _Output:
    """One output file of ``transform``. It is written as ``staged``, a file of the same name in a hidden folder
    next to ``target``, and moved into place (``os.replace``, atomic) once every output has been written, so that
    a failure (a full disk, an export that fails its check, a plot format that needs LaTeX) leaves no file behind,
    not even a half-written one. A target that exists and is no regular file (``/dev/stdout``, a pipe) cannot be
    replaced: it is written in place, after the others (``in_place``)."""

    option: str   # "--json"
    path: str     # as given
    target: str   # the file the path names (symbolic links followed: the link stays a link)
    in_place: bool = False
    folder: str | None = None   # the hidden folder, once made

    @property
    def staged(self) -> str:
        return self.target if self.folder is None else os.path.join(self.folder, os.path.basename(self.target))


def _output(option: str, path: str) -> _Output:
    """``path`` checked as the target of ``option`` (no folder made yet): a file name in an existing directory."""
    if "\0" in path:
        raise CliError(f"{option} {path!r} contains a NUL byte; give a file path")
    if os.path.isdir(path):
        raise CliError(f"{option} {path} is an existing directory; give a file path in it")
    if os.path.exists(path) and not os.path.isfile(path):
        # a device or a pipe (/dev/stdout, whose link leads to /proc/self/fd/1): written in place, as named
        return _Output(option, path, path, in_place=True)
    target = os.path.realpath(path)
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise CliError(f"{option} {path}: the directory {folder} does not exist; create it or choose another path")
    return _Output(option, path, target)


def _stage(output: _Output) -> None:
    """Make ``output``'s hidden folder and try its file name there, so that a directory that cannot be written
    or a name the file system refuses (too long) fails now, before the transform, not after it."""
    if output.in_place:
        return
    directory = os.path.dirname(output.target)
    try:
        with _interrupts_deferred():  # a Ctrl-C between making the folder and recording it would leak it
            output.folder = tempfile.mkdtemp(prefix=".orthofx-", dir=directory)
        with open(output.staged, "wb"):
            pass
        os.remove(output.staged)
    except OSError as exc:
        raise CliError(f"{output.option} {output.path}: cannot write there ({exc.strerror or exc}); choose another "
                       "path") from None


@contextlib.contextmanager
def _interrupts_deferred():
    """Ctrl-C (SIGINT) held back while the block runs and raised as ``KeyboardInterrupt`` once it is done, so that
    a short step that must not stop halfway (moving the outputs into place, removing the staging folders) does
    not. Only the main thread receives signals (and only it may install a handler): elsewhere this does
    nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        # None: the previous handler was not installed from Python (an embedding application's): the default
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
    if received:
        raise KeyboardInterrupt


def _commit(outputs: list[_Output]) -> dict[str, list[str]]:
    """Move the staged files into place: each folder's extra files first (an ONNX model's external data), the
    file itself last. A Ctrl-C waits until every file is in place: all of the outputs, not some. Returns the extra
    files put next to each output (``{option: [path as written, ...]}``), which the command names too: they
    replace files of those names as the outputs do."""
    extras: dict[str, list[str]] = {}
    with _interrupts_deferred():
        for output in outputs:
            if output.folder is None:
                continue
            name = os.path.basename(output.target)
            for entry in sorted(os.listdir(output.folder), key=lambda entry: entry == name):
                os.replace(os.path.join(output.folder, entry), os.path.join(os.path.dirname(output.target), entry))
                if entry != name:
                    extras.setdefault(output.option, []).append(_beside(output, entry))
    return extras


def _beside(output: _Output, entry: str) -> str:
    """The file ``entry`` next to ``output``'s target, named as the user named the output (``m.onnx`` ->
    ``m.onnx.data``), or by its full path where the given path is a link into another directory."""
    given = os.path.dirname(output.path)
    target = os.path.dirname(output.target)
    return os.path.join(given if os.path.realpath(given or ".") == target else target, entry)


def _discard(outputs: list[_Output]) -> None:
    """Remove the staging folders and whatever is left in them (everything, after a failure or an interrupt);
    a second Ctrl-C waits until they are gone."""
    with _interrupts_deferred():
        for output in outputs:
            if output.folder is not None:
                shutil.rmtree(output.folder, ignore_errors=True)


def _write(output: _Output, write: Callable[[str], object]) -> object:
    """``write(output.staged)``; a failure becomes a :class:`CliError` naming the option and the path as given."""
    try:
        return write(output.staged)
    except Exception as exc:  # OSError, ExportError, matplotlib's errors ...
        message = " ".join(str(exc).split()).replace(output.staged, output.path)
        # the file is discarded with the others, whatever the exporter says about it
        message = message.replace("was written but should not be trusted", "was not kept")
        if not isinstance(exc, OrthofxError):
            message = f"{type(exc).__name__}: {message}"
        raise CliError(f"{output.option} {output.path}: {message}") from exc


def _input_files(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The files ``transform`` reads, which none of its outputs may replace: the policy's (a path, as
    :meth:`Policy.load` finds it after the preset names) and the model's (``file.py:factory`` or ``file.py``)."""
    found = []
    if args.policy.strip() not in presets():
        policy = next((path for path in (args.policy, args.policy.strip()) if _is_file(path)), None)
        if policy is not None:
            found.append(("the policy file (--policy)", policy))
    model = ModelSpec.parse(args.model)
    if model.is_file and _is_file(model.target):
        found.append(("the model file (MODEL)", model.target))
    return found


#: What :func:`_written_files` adds to an ONNX export's file.
_EXTRA_FILE = "the ONNX model's external weights (its name + '.data')"


def _written_files(output: _Output) -> list[str]:
    """The files ``output`` puts in place: its target and, for an ONNX export, the external data file torch's
    exporter writes next to it (``model.onnx`` -> ``model.onnx.data``, see the README), which :func:`_commit` moves
    into the same folder. Two outputs, or an output and an input file, must not share any of them.

    >>> _written_files(_Output("--export", "m.onnx", "/tmp/m.onnx"))
    ['/tmp/m.onnx', '/tmp/m.onnx.data']
    """
    files = [output.target]
    if output.option == "--export" and not output.in_place and output.target.lower().endswith(".onnx"):
        files.append(output.target + ".data")
    return files


def _entry(path: str) -> str:
    """``path`` with its folders resolved but not its last part: the directory entry that ``os.replace`` onto it
    replaces (a symbolic link there is replaced, not followed), as :func:`_commit` puts an ONNX export's data file.

    >>> _entry("/tmp/./m.onnx.data") == os.path.join(os.path.realpath("/tmp"), "m.onnx.data")
    True
    """
    absolute = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))


def _same_file(first: str, second: str) -> bool:
    try:
        return os.path.samefile(first, second)
    except (OSError, ValueError):  # one of them does not exist (yet)
        return False


def _check_plot_path(path: str) -> None:
    """Matplotlib draws the format the suffix names and adds '.png' to a path without one: refuse both an unknown
    suffix and none before the transform (the file written must be the one named)."""
    try:
        problem = plot_format_problem(path)
    except ImportError:
        raise CliError(f"--plot {path} needs matplotlib: pip install 'orthofx[plot]'") from None
    if problem is not None:
        raise CliError(f"--plot {path}: {problem}")


_example_path = {"--json": "report.json", "--plot": "spectra.png", "--export": "model.onnx"}


def _cmd_transform(args: argparse.Namespace) -> int:
    given = [(option, path) for option, path in (("--json", args.json), ("--plot", args.plot),
                                                 ("--export", args.export)) if path is not None]
    # an empty path (--export "" from an unset shell variable) would skip the output silently
    for option, path in given:
        if not path.strip():
            raise CliError(f"{option} got an empty path; give a file path, or leave out {option}")
        if path.strip() == "-":  # the Unix convention for standard output, where the report table goes
            raise CliError(f"{option} -: writing to standard output is not supported (the report table is printed "
                           f"there); give a file path, e.g. {option} {_example_path[option]}")
    # the output paths are checked before the model is loaded and transformed, which can take a while
    outputs = [_output(option, path) for option, path in given]
    if args.export:
        check_export_path(args.export)
    if args.plot:
        _check_plot_path(args.plot)
    for i, first in enumerate(outputs):
        for second in outputs[i + 1:]:
            if first.target == second.target:
                raise CliError(f"{first.option} and {second.option} both name {second.path}; give each its own file")
            for one, other in ((first, second), (second, first)):
                # the data file replaces the entry: a link named by the other output as well as the file it names
                if {other.target, _entry(other.path)} & set(_written_files(one)[1:]):
                    raise CliError(f"{other.option} {other.path} names the file where {one.option} {one.path} writes "
                                   f"{_EXTRA_FILE}, which would replace it; give each its own file")
    read = _input_files(args)
    for output in outputs:
        for what, path in read:
            if not output.in_place and _same_file(output.target, path):
                raise CliError(f"{output.option} {output.path} is {what}: the output would replace it; choose "
                               "another path")
            # the input as named and the file it is read from: a link to it at the data file's place is replaced
            if not output.in_place and {_entry(path), os.path.realpath(path)} & set(_written_files(output)[1:]):
                raise CliError(f"{output.option} {output.path} writes {_EXTRA_FILE} to {what} ({path}), which "
                               "would replace it; choose another path")
    for output in outputs:
        for extra in _written_files(output)[1:]:
            if os.path.isdir(extra) and not os.path.islink(extra):  # os.replace fails there, after the transform
                raise CliError(f"{output.option} {output.path} writes {_EXTRA_FILE} to {extra}, an existing "
                               "directory; remove or rename it, or choose another path")
    model = load_model(args.model)
    inputs = _example(model, args.input_shape, args.model)
    if args.export and inputs is None and os.path.splitext(args.export)[1].lower() != ".pt":
        raise CliError(f"--export {args.export} needs --input-shape (the example input to trace and check "
                       "with); a .pt file needs none")
    try:
        for output in outputs:
            _stage(output)
        started = time.perf_counter()
        with _quiet_torch(args.debug):
            gm = transform(model, args.policy, example_inputs=inputs)
        elapsed = time.perf_counter() - started
        rep = report(gm)
        print(rep)
        print(f"transformed in {elapsed:.2f} s")
        writers = {"--json": lambda path: _write_json(rep, path), "--plot": rep.plot,
                   "--export": lambda path: _export(gm, path, inputs)}
        results = {}
        with _quiet_torch(args.debug):
            for output in sorted(outputs, key=lambda output: output.in_place):  # in place last
                results[output.option] = _write(output, writers[output.option])
        extras = _commit(outputs)
    finally:
        _discard(outputs)
    for output in outputs:
        if output.option != "--export":
            print(f"wrote {output.path}")
    if args.export:
        result, dynamic = results["--export"]
        print(dataclasses.replace(result, path=args.export))
        for extra in extras.get("--export", []):
            print(f"wrote {extra} (the exported model's external weights, read with it: keep the two together)")
        if not dynamic and not args.export.lower().endswith(".pt"):
            print("note: exported with a fixed batch of 1; give --input-shape with a batch of 2 or more for a "
                  "dynamic batch dimension")
    return 0


def _write_json(rep, path: str) -> None:
    text = json.dumps(rep.to_dict(), indent=2, default=str)  # made whole before the file is opened
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text + "\n")


def _export(gm: nn.Module, path: str, inputs: tuple[torch.Tensor, ...] | None):
    """``(export result, whether the batch is dynamic)``."""
    # torch.export cannot trace a dynamic batch from a batch of one (the default input shape): fix it then
    dynamic = inputs is None or batch_too_small_for_dynamic(inputs, gm) is None
    return export(gm, path, example_inputs=inputs, dynamic_batch=dynamic), dynamic


def _progress(step: int, total: int, text: str, stream=None) -> None:
    stream = sys.stderr if stream is None else stream  # the stderr of now, not of import time
    width = 30
    filled = int(width * step / total)
    bar = "#" * filled + "." * (width - filled)
    end = "\n" if step == total else ""
    stream.write(f"\r[{bar}] {step:4d}/{total} {text}{end}")
    stream.flush()


def load_digits_tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits as (x_train, y_train, x_test, y_test), standardised with the training
    split's mean and standard deviation."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise CliError("the demo trains on scikit-learn's bundled digits: pip install 'orthofx[demo]'") from None
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    mean, std = x[:split].mean(), x[:split].std()
    x = (x - mean) / std
    return x[:split], y[:split], x[split:], y[split:]


def _check_digits_model(model: nn.Module, images: torch.Tensor, spec: str) -> None:
    """The demo's data is fixed (1 x 8 x 8 digit images, 10 classes): a model that cannot classify it is refused
    before the explain, with the way out, instead of failing in transform with advice about input shapes the
    user cannot change here. The model runs once on a copy in eval mode (its own state is left alone)."""
    probe = copy_model(model).eval()
    try:
        with torch.no_grad():
            out = probe(images)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's model on the digits
        raise CliError(f"model {spec!r} cannot take the demo's inputs, scikit-learn digits of shape "
                       f"{tuple(images.shape[1:])} (batch, 1, 8, 8): {type(exc).__name__}: {str(exc)[:200]}. Use a "
                       "model built for them (the default small_cnn), or run 'orthofx transform MODEL --policy P "
                       "--input-shape ...' for other models") from None
    if not isinstance(out, torch.Tensor) or out.shape != (images.shape[0], 10):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CliError(f"model {spec!r} gives {shape} on the demo's digits, but the demo trains a 10-class "
                       f"classifier (output (batch, 10)); use a model with 10 outputs (the default small_cnn)")


def _cmd_demo(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = load_digits_tensors(args.seed)
    if args.batch_size > len(x_train):  # batches are drawn with replacement: a larger one repeats images
        args.usage_error(f"argument --batch-size: expected at most {len(x_train)} (the images of the digits "
                         f"training split), got {args.batch_size}")
    model = load_model(args.model)
    policy = Policy.load(args.policy)  # a bad policy is refused before the first heading is printed
    example = (x_train[:8],)
    _check_digits_model(model, example[0], args.model)
    plan = explain(model, policy, example)
    print(f"== explain: model {args.model}, policy {args.policy}")
    print(plan)
    gm = transform(model, policy, example_inputs=example)
    optimizer = torch.optim.Adam(gm.parameters(), lr=args.lr)
    # as README tells users: the passes' optimizer hooks (Riemannian updates, NOG, OLR) run only in an attached
    # optimizer; without it the demo trained those weights as plain parameters (a 'riemannian' site ended with
    # singular values 0.29..3.2) and said so in orthofx's own warning. A policy without hooks attaches none.
    handle = attach(optimizer, gm)
    print(f"\n== training {args.steps} steps on scikit-learn digits ({len(x_train)} train / {len(x_test)} test)")
    print(f"Adam, lr {args.lr:g}{_hooks_text(handle.hooks, args.lr)}")
    gm.train()
    generator = torch.Generator().manual_seed(args.seed)
    first_penalty = last_penalty = float("nan")
    progress_open = False  # a progress line without its newline yet, on stderr
    try:
        for step in range(1, args.steps + 1):
            index = torch.randint(0, len(x_train), (args.batch_size,), generator=generator)
            task = nn.functional.cross_entropy(gm(x_train[index]), y_train[index])
            # after a training forward, where a Jacobian term has its estimate
            if step == 1:
                first_penalty = _whole_penalty(gm)
            if step == args.steps:
                last_penalty = _whole_penalty(gm)
            reg = penalty(gm)
            loss = task + reg
            if not torch.isfinite(loss):  # one inf or nan and every later step, and the report, is nan
                raise TrainingDiverged(f"training diverged at step {step} of {args.steps}: the loss is "
                                       f"{loss.item()} (task {task.item()}, penalty {reg.item()}); "
                                       f"{_smaller_lr(args.lr)}")
            optimizer.zero_grad()
            loss.backward()
            _demo_step(optimizer, step, args.steps, args.lr)
            if step % max(1, args.steps // 50) == 0 or step == args.steps:
                _progress(step, args.steps, f"task {task.item():.3f}  penalty {reg.item():.4f}")
                progress_open = step != args.steps
        # the last step's update is checked by no later loss: overflowed weights would report nan
        if not all(bool(torch.isfinite(p).all()) for p in gm.parameters()):
            raise TrainingDiverged(f"training diverged at step {args.steps} of {args.steps}: the update left "
                                   f"parameters that are not finite; {_smaller_lr(args.lr)}")
    finally:
        if progress_open:  # the error line (or 'interrupted') starts a line of its own
            sys.stderr.write("\n")
    gm.eval()
    with torch.no_grad():
        accuracy = (gm(x_test).argmax(1) == y_test).float().mean().item()
    print(f"\npenalty {first_penalty:.4f} -> {last_penalty:.4f}; test accuracy {accuracy:.3f}\n")
    print("== report")
    print(report(gm))
    return 0


def _hooks_text(hooks: list, lr: float) -> str:
    """What ``orthofx.attach`` added to the demo's optimizer, per treatment with its sites (``""`` for none): where
    OLR sets a Pre-SVD layer's lr at each step, the lr printed is not that layer's."""
    sites: dict[str, dict[str, None]] = {}  # per treatment, each weight once (an LSTM site has several hooks)
    for hook in hooks:
        label = hook._label() if hasattr(hook, "_label") else hook.site  # a Riemannian hook names its weight
        sites.setdefault(getattr(hook, "treatment", type(hook).__name__), {})[repr(label)] = None
    if not sites:
        return ""
    parts = "; ".join(f"{treatment} at {first_few(list(names), 4)}" for treatment, names in sites.items())
    olr = f" (OLR: those weights' lr is P4's eta* where it is below {lr:g}, set each step)" if "OLR" in sites else ""
    return f"; orthofx.attach runs {parts}{olr}"


def _demo_step(optimizer: torch.optim.Optimizer, step: int, steps: int, lr: float) -> None:
    """``optimizer.step()``, whose attached orthofx hooks may refuse the step (a Riemannian update the step left
    NaN or inf, which they undo): the demo's input was valid and its run failed, exit status 1 like a diverged loss,
    where the error's own type said bad input (2). The hook's message says what happened and what to change."""
    try:
        optimizer.step()
    except OrthofxError as exc:
        raise TrainingDiverged(f"training stopped at step {step} of {steps}, in optimizer.step(): {exc}. In this "
                               f"demo: {_smaller_lr(lr)}") from exc


def _whole_penalty(gm: nn.Module) -> float:
    """The value of every penalty term (a training loss's ``penalty`` evaluates the terms with ``every > 1`` on
    some calls only, and counts the call)."""
    with torch.no_grad():
        return float(sum(penalty_terms(gm).values()))


def _smaller_lr(lr: float) -> str:
    """The advice of a diverged demo: the learning rate is the one knob the demo offers that makes it diverge."""
    default = f" (the default is {_DEMO_LR:g})" if lr > _DEMO_LR else ""
    return f"try a smaller --lr than {lr:g}{default}"


def _number(text: str, kind: type, minimum: float, inclusive: bool) -> int | float:
    bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
    what = f"{'an integer' if kind is int else 'a finite number'} {bound}"
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


# argparse types that refuse bad values when the command line is parsed (the examples and benchmarks use them too)
def positive_int(text: str) -> int:
    return _number(text, int, 1, True)


def non_negative_int(text: str) -> int:
    return _number(text, int, 0, True)


def positive_float(text: str) -> float:
    return _number(text, float, 0.0, False)


def non_negative_float(text: str) -> float:
    return _number(text, float, 0.0, True)


def torch_seed(text: str) -> int:
    """A random seed: an integer torch.manual_seed takes (-2^63 to 2^64 - 1)."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not -2 ** 63 <= value <= 2 ** 64 - 1:  # beyond, torch raises a bare overflow ValueError
        raise argparse.ArgumentTypeError(f"expected an integer from -2^63 to 2^64 - 1, got {text!r}")
    return value


#: The demo's default learning rate (Adam).
_DEMO_LR = 1e-2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orthofx", description="Orthogonality for any PyTorch model.",
                                     epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=_version_line(),
                        help="print orthofx's version and the torch it runs on, then exit")
    # --debug after the command too (the error messages suggest it): SUPPRESS keeps a --debug given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", parents=[common], help="explain, transform, train briefly on digits and report")
    demo.add_argument("--model", default="small_cnn",
                      help="the model to train: a built-in name, package.module:factory, file.py:factory or file.py; "
                           "it must take 1x8x8 images and give 10 class scores (default: %(default)s)")
    demo.add_argument("--policy", default="lorth", help="preset name, YAML file or YAML text (default: %(default)s)")
    demo.add_argument("--steps", type=positive_int, default=300, help="training steps (default: %(default)s)")
    demo.add_argument("--batch-size", type=positive_int, default=64, help="batch size (default: %(default)s)")
    demo.add_argument("--lr", type=positive_float, default=_DEMO_LR,
                      help="Adam learning rate (default: %(default)s)")
    demo.add_argument("--seed", type=torch_seed, default=0,
                      help="seed of the weights, the data split and the batches (default: %(default)s)")
    # usage_error: a bound that depends on the data (--batch-size), checked once the data is loaded
    demo.set_defaults(run=_cmd_demo, usage_error=demo.error)

    sub.add_parser("presets", parents=[common], help="list preset policies").set_defaults(run=_cmd_presets)

    check = sub.add_parser("check", parents=[common], help="validate a policy (and plan it on a model)")
    check.add_argument("policy", help="preset name, YAML file or YAML text")
    check.add_argument("--model", help="also plan the policy on this model (as 'orthofx explain' does): "
                                       "built-in name, package.module:factory, file.py:factory or file.py")
    check.add_argument("--input-shape", metavar="SHAPE", help=_INPUT_SHAPE_HELP + " (needs --model)")
    check.set_defaults(run=_cmd_check)

    for name, func, text in (("explain", _cmd_explain, "show which rule hits which site (dry run)"),
                             ("transform", _cmd_transform, "transform a model and print the report")):
        cmd = sub.add_parser(name, parents=[common], help=text)
        cmd.add_argument("model", help="built-in name, package.module:factory, file.py:factory or file.py (its "
                                        "'model')")
        cmd.add_argument("--policy", required=True, help="preset name, YAML file or YAML text")
        cmd.add_argument("--input-shape", metavar="SHAPE", help=_INPUT_SHAPE_HELP)
        if name == "transform":
            cmd.add_argument("--json", metavar="PATH",
                             help="write the report as JSON to PATH (an existing file is replaced)")
            cmd.add_argument("--plot", metavar="PATH", help="write the singular-value spectra to the image PATH "
                                                            "(.png, .svg, .pdf ...; an existing file is replaced)")
            cmd.add_argument("--export", metavar="PATH",
                             help="export the model to PATH: .onnx, .pt2 or .pt (state_dict + policy); an existing "
                                  "file is replaced, and an .onnx export also writes its weights to PATH.data")
        cmd.set_defaults(run=func)
    return parser


#: --input-shape's help (explain, transform, check).
_INPUT_SHAPE_HELP = ("the example input's shape, batch first, e.g. 1,3,32,32 (the model runs on one random input "
                     "of it); default: a built-in model's own input shape, none for other models")

#: The command's epilog: what its exit statuses mean (the module docstring's list).
_EPILOG = """exit status: 0 success; 2 bad input (an 'error:' line saying what to fix); 1 an unexpected failure
or a demo whose training diverged (one line; --debug adds the traceback); 130 interrupted (Ctrl-C).
transform replaces existing files at the --json, --plot and --export paths (and PATH.data of an .onnx
export), and only once every one of them has been written: a failure leaves the old files as they were."""


def _version_line() -> str:
    """``orthofx 0.1.0 (torch 2.13.0, Python 3.11.7)``: what a bug report needs."""
    from . import __version__

    return f"orthofx {__version__} (torch {torch.__version__}, Python {sys.version.split()[0]})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    status = _run(args)
    try:  # what a failed command printed before its error: the interpreter's flush at exit cannot report it
        sys.stdout.flush()
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise
        _silence_stdout()
    return status


def _run(args: argparse.Namespace) -> int:
    with warnings.catch_warnings():
        if not args.debug:
            warnings.showwarning = _warning_line(warnings.showwarning)
        return _run_command(args)


def _warning_line(show: Callable) -> Callable:
    """``warnings.showwarning`` for the command: the warnings orthofx issues to the user
    (:class:`~orthofx.errors.OrthofxWarning`, whose messages name the place and the fix) as one line, ``orthofx:
    warning: <message>``, like the command's errors, rather than Python's form (orthofx's own file and line, then
    that line of its source, which says nothing to a user); other warnings (torch's) go to ``show`` as they are.
    ``--debug`` keeps Python's form for all."""
    def show_warning(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, OrthofxWarning):
            return show(message, category, filename, lineno, file, line)
        stream = sys.stderr if file is None else file
        try:
            stream.write(f"orthofx: warning: {' '.join(str(message).split())}\n")
        except OSError:  # as Python's own: a warning that cannot be shown is lost, not an error
            pass
    return show_warning


def _refuse_policy_dash(args: argparse.Namespace) -> None:
    """A policy given as ``-`` (the Unix convention for standard input), when no file is named so: Policy.load
    would call it neither a preset nor a file, as if the file '-' were missing. Standard input is read as the file
    ``/dev/stdin`` (or a process substitution), which the error says."""
    policy = getattr(args, "policy", None)
    if not isinstance(policy, str) or policy.strip() != "-" or _is_file(policy) or _is_file(policy.strip()):
        return
    option, example = (("POLICY", "orthofx check /dev/stdin") if args.command == "check" else
                       ("--policy", f"orthofx {args.command} ... --policy /dev/stdin"))
    raise CliError(f"{option} -: a policy is not read from standard input by the name '-'; pipe it in as the file "
                   f"/dev/stdin (make_policy | {example}) or give <(make_policy)")


def _run_command(args: argparse.Namespace) -> int:
    # --debug adds the traceback before the one-line message; the exit status stays the documented one (a
    # re-raised exception would end the process with 1 whatever happened)
    try:
        _refuse_policy_dash(args)
        status = args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, where it is handled, not at the interpreter's exit
        return status
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        return report_interrupt()
    except (OrthofxError, OSError) as exc:
        if args.debug:
            traceback.print_exc()
        if isinstance(exc, BrokenPipeError) and _stdout_reader_gone():
            # 'orthofx explain ... | head': the reader has what it wanted; no message, as other commands
            _silence_stdout()
            return 1
        message = " ".join(str(exc).split())
        print(f"orthofx: error: {message}", file=sys.stderr)
        return getattr(exc, "exit_status", 2)
    except Exception as exc:  # a bug in orthofx or in the model: one line here too, the traceback with --debug
        if args.debug:
            traceback.print_exc()
        message = " ".join(str(exc).split())
        hint = "" if args.debug else " (--debug shows the traceback)"
        print(f"orthofx: error: unexpected {type(exc).__name__}: {message}{hint}", file=sys.stderr)
        return 1


def _stdout_reader_gone() -> bool:
    """True when standard output is a pipe whose reading end is closed (``orthofx explain ... | head -1`` once
    ``head`` has exited): a write there fails with EPIPE, and poll() reports an error on it."""
    try:
        fd = sys.stdout.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no file descriptor (a StringIO), no poll() (Windows)
        return False


def _silence_stdout() -> None:
    """Point standard output's file descriptor at the null device, so that what is still buffered for the closed
    pipe goes nowhere instead of failing again when the interpreter flushes it at exit ('Exception ignored ...
    BrokenPipeError', exit status 120)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (AttributeError, OSError, ValueError):
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
