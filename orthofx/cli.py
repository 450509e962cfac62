"""The ``orthofx`` command.

    orthofx demo                                   # explain, transform, train a little on digits, report
    orthofx presets                                # list the preset policies
    orthofx check POLICY [--model M [--input-shape 1,3,32,32]]
    orthofx explain MODEL --policy P [--input-shape ...]
    orthofx transform MODEL --policy P --input-shape 1,3,32,32 [--json report.json] [--plot spectra.png]
                      [--export model.onnx|model.pt2|model.pt]

MODEL is a built-in name (``orthofx.models.names()``), ``package.module:factory`` or ``path/to/file.py:factory``
(a callable taking no arguments that returns an ``nn.Module``). Exit status 0 on success, 2 on bad input with a
one-line message (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import importlib.util
import json
import math
import os
import sys
import time
from typing import Sequence

import torch
from torch import nn

from . import models
from .errors import OrthofxError
from .export import batch_too_small_for_dynamic, check_export_path, export
from .passes.base import EvalRun
from .penalty import penalty
from .policy import Policy, presets
from .report import report
from .transform import explain, transform

__all__ = ["main", "load_model"]


class CliError(OrthofxError):
    """Bad command-line input (exit status 2)."""


def load_model(spec: str) -> nn.Module:
    """A model from a built-in name, ``package.module:factory`` or ``file.py:factory``.

    As for ``python dir/file.py``, the file's directory is put first on ``sys.path`` (and stays there: the model
    may import siblings lazily, in its factory or forward), so the file can import the modules next to it. The
    file itself is imported under a name made from its absolute path: two files called ``model.py`` in
    different directories are two modules.
    """
    if ":" not in spec:
        try:
            return models.get(spec)
        except ValueError as exc:
            raise CliError(f"{exc}; or give package.module:factory or file.py:factory") from None
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py"):
        module = _load_file(target)
    else:
        if not target.strip():
            raise CliError(f"model {spec!r} names no module before ':'; give package.module:factory or "
                           "file.py:factory")
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise CliError(f"cannot import {target!r} for model {spec!r}: {exc}") from None
        except Exception as exc:  # the user's module failed while being imported
            raise CliError(f"cannot import {target!r} for model {spec!r}: {type(exc).__name__}: {exc} "
                           "(--debug shows the traceback)") from exc
    factory = getattr(module, attr, None)
    if factory is None:
        raise CliError(f"{target!r} has no attribute {attr!r}")
    try:
        model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    except Exception as exc:  # the factory must be callable without arguments
        raise CliError(f"{spec} failed: {type(exc).__name__}: {exc}; MODEL must name a callable taking no "
                       "arguments that returns an nn.Module (--debug shows the traceback)") from exc
    if not isinstance(model, nn.Module):
        raise CliError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _load_file(target: str):
    """The module of the Python file ``target``, its directory first on ``sys.path`` (see :func:`load_model`)."""
    if not os.path.isfile(target):
        raise CliError(f"model file {target!r} does not exist")
    path = os.path.realpath(target)
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    stem = "".join(c if c.isalnum() or c == "_" else "_" for c in os.path.splitext(os.path.basename(path))[0])
    digest = hashlib.sha1(path.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    module_name = f"orthofx_user_model_{stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # the user's file: a syntax error, a failing import ...
        sys.modules.pop(module_name, None)
        raise CliError(f"cannot load model file {target!r}: {type(exc).__name__}: {exc} (--debug shows the "
                       "traceback)") from exc
    return module


def _input_shape(text: str | None, model_spec: str | None) -> tuple[int, ...] | None:
    if text is None:
        if model_spec is not None and model_spec in models.names():
            return (1,) + models.input_shape(model_spec)
        return None
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise CliError(f"--input-shape must be comma-separated integers like 1,3,32,32, got {text!r}") from None
    if not shape or any(n < 1 for n in shape):
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
        raise CliError(f"the model fails on an input of {given} ({dtype}, {device}): {type(exc).__name__}: {exc}; "
                       "give the shape of one input the model takes, batch first (--debug shows the "
                       "traceback)") from exc
    return inputs


# --------------------------------------------------------------------------------------------- commands

def _cmd_presets(args: argparse.Namespace) -> int:
    for name, description in presets().items():
        print(f"{name:16s} {description}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    if args.input_shape is not None and not args.model:
        raise CliError(f"--input-shape needs --model (the shape of the model's example input); give --model MODEL "
                       f"or leave out --input-shape {args.input_shape}")
    policy = Policy.load(args.policy)
    print(f"ok: {policy.source}: {len(policy.rules)} rule(s): "
          + ", ".join(f"{r.name} -> {r.apply}" for r in policy.rules))
    if args.model:
        model = load_model(args.model)
        print(explain(model, policy, _example(model, args.input_shape, args.model)))
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    print(explain(model, args.policy, _example(model, args.input_shape, args.model)))
    return 0


def _cmd_transform(args: argparse.Namespace) -> int:
    # an empty path (--export "" from an unset shell variable) would skip the output silently
    for option, path in (("--export", args.export), ("--json", args.json), ("--plot", args.plot)):
        if path is not None and not path.strip():
            raise CliError(f"{option} got an empty path; give a file path, or leave out {option}")
    model = load_model(args.model)
    inputs = _example(model, args.input_shape, args.model)
    # the output paths are checked before the transform, which can take a while
    if args.export:
        suffix = check_export_path(args.export)[1]
        if inputs is None and suffix != ".pt":
            raise CliError(f"--export {args.export} needs --input-shape (the example input to trace and check "
                           "with); a .pt file needs none")
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (Report.plot needs it: say so before the transform, not after)
        except ImportError:
            raise CliError(f"--plot {args.plot} needs matplotlib: pip install 'orthofx[plot]'") from None
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        folder = os.path.dirname(os.path.abspath(path)) if path else ""
        if path and not os.path.isdir(folder):
            raise CliError(f"{option} {path}: the directory {folder} does not exist; create it or choose another path")
        if path and os.path.isdir(path):
            raise CliError(f"{option} {path} is an existing directory; give a file path in it")
    started = time.perf_counter()
    gm = transform(model, args.policy, example_inputs=inputs)
    elapsed = time.perf_counter() - started
    rep = report(gm)
    print(rep)
    print(f"transformed in {elapsed:.2f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rep.to_dict(), handle, indent=2, default=str)
        print(f"wrote {args.json}")
    if args.plot:
        rep.plot(args.plot)
        print(f"wrote {args.plot}")
    if args.export:
        # torch.export cannot trace a dynamic batch from a batch of one (the default input shape): fix it then
        dynamic = inputs is None or batch_too_small_for_dynamic(inputs) is None
        print(export(gm, args.export, example_inputs=inputs, dynamic_batch=dynamic))
        if not dynamic and not args.export.lower().endswith(".pt"):
            print("note: exported with a fixed batch of 1; give --input-shape with a batch of 2 or more for a "
                  "dynamic batch dimension")
    return 0


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
    probe = copy.deepcopy(model).eval()
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
    model = load_model(args.model)
    example = (x_train[:8],)
    _check_digits_model(model, example[0], args.model)
    print(f"== explain: model {args.model}, policy {args.policy}")
    print(explain(model, args.policy, example))
    gm = transform(model, args.policy, example_inputs=example)
    optimizer = torch.optim.Adam(gm.parameters(), lr=args.lr)
    print(f"\n== training {args.steps} steps on scikit-learn digits ({len(x_train)} train / {len(x_test)} test)")
    gm.train()
    generator = torch.Generator().manual_seed(args.seed)
    first_penalty = None
    for step in range(1, args.steps + 1):
        index = torch.randint(0, len(x_train), (args.batch_size,), generator=generator)
        task = nn.functional.cross_entropy(gm(x_train[index]), y_train[index])
        reg = penalty(gm)
        loss = task + reg
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first_penalty = float(reg.detach()) if first_penalty is None else first_penalty
        if step % max(1, args.steps // 50) == 0 or step == args.steps:
            _progress(step, args.steps, f"task {task.item():.3f}  penalty {reg.item():.4f}")
    gm.eval()
    with torch.no_grad():
        accuracy = (gm(x_test).argmax(1) == y_test).float().mean().item()
    print(f"\npenalty {first_penalty:.4f} -> {penalty(gm).item():.4f}; test accuracy {accuracy:.3f}\n")
    print("== report")
    print(report(gm))
    return 0


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orthofx", description="Orthogonality for any PyTorch model.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    # --debug after the command too (the error messages suggest it): SUPPRESS keeps a --debug given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", parents=[common], help="explain, transform, train briefly on digits and report")
    demo.add_argument("--model", default="small_cnn", help="a built-in model taking 1x8x8 images")
    demo.add_argument("--policy", default="lorth")
    demo.add_argument("--steps", type=positive_int, default=300)
    demo.add_argument("--batch-size", type=positive_int, default=64)
    demo.add_argument("--lr", type=positive_float, default=1e-2)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_cmd_demo)

    sub.add_parser("presets", parents=[common], help="list preset policies").set_defaults(run=_cmd_presets)

    check = sub.add_parser("check", parents=[common], help="validate a policy (and plan it on a model)")
    check.add_argument("policy")
    check.add_argument("--model")
    check.add_argument("--input-shape")
    check.set_defaults(run=_cmd_check)

    for name, func, text in (("explain", _cmd_explain, "show which rule hits which site (dry run)"),
                             ("transform", _cmd_transform, "transform a model and print the report")):
        cmd = sub.add_parser(name, parents=[common], help=text)
        cmd.add_argument("model", help="built-in name, package.module:factory or file.py:factory")
        cmd.add_argument("--policy", required=True, help="preset name, YAML file or YAML text")
        cmd.add_argument("--input-shape", help="example input shape, e.g. 1,3,32,32")
        if name == "transform":
            cmd.add_argument("--json", help="write the report as JSON to this path")
            cmd.add_argument("--plot", help="write the singular-value spectra PNG to this path")
            cmd.add_argument("--export", help="export the model: .onnx, .pt2 or .pt (state_dict + policy)")
        cmd.set_defaults(run=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (OrthofxError, OSError) as exc:
        if args.debug:
            raise
        message = " ".join(str(exc).split())
        print(f"orthofx: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
