"""Exception and warning types raised by orthofx.

Every error orthofx raises on bad input derives from :class:`OrthofxError`, and its message says what was
wrong, where (a file:line:col, a module path or a graph site) and how to fix it. The concrete types also derive
from the built-in exception a user would otherwise expect (``ValueError``, ``RuntimeError``), so existing
``except ValueError`` code keeps working. The warnings orthofx issues (something asked for is done, but not all
of it holds) derive from :class:`OrthofxWarning`, a ``UserWarning``.
"""

from __future__ import annotations

import os
import sys
import warnings

__all__ = [
    "OrthofxError",
    "PolicyError",
    "CaptureError",
    "PlanError",
    "TransformError",
    "ImpossibleLayerError",
    "ExportError",
    "ArgumentError",
    "LayerArgumentError",
    "MetaWeightError",
    "OrthofxWarning",
    "ScaleLostWarning",
    "RunningFiltersDroppedWarning",
    "first_few",
    "layer_label",
    "saved_count",
    "damaged_metadata_entry",
    "keep_in_metadata",
]

# The attribute holding a layer's path in the model, set when a pass or ``orthofx.freeze`` installs it.
SITE_ATTRIBUTE = "orthofx_site"


class OrthofxError(Exception):
    """Base class of every error orthofx raises on purpose."""


class PolicyError(OrthofxError, ValueError):
    """A policy (YAML file, text, dict or preset name) is malformed.

    ``file``, ``line`` and ``column`` locate the mistake (1-based; ``None`` when the policy came from a dict
    without position information). The message starts with ``file:line:col:``.
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 column: int | None = None):
        self.file = file
        self.line = line
        self.column = column
        self.reason = message
        where = ":".join(str(p) for p in (file or "<policy>", line, column) if p is not None)
        super().__init__(f"{where}: {message}")


class CaptureError(OrthofxError, RuntimeError):
    """The model could not be turned into a graph.

    ``module_path`` names the submodule where tracing failed ('' for the top level).
    """

    def __init__(self, message: str, *, module_path: str | None = None):
        self.module_path = module_path
        super().__init__(message)


class PlanError(OrthofxError, ValueError):
    """The policy does not fit the model: a rule matches nothing, or matches a site its pass cannot handle."""


class TransformError(OrthofxError, RuntimeError):
    """A pass or the check after rewriting failed (wrong shapes, non-finite outputs, invalid graph)."""


class ImpossibleLayerError(TransformError, ValueError):
    """No orthogonal version of a layer exists (P0, Theorem 4); the message quotes the condition."""


class ExportError(OrthofxError, RuntimeError):
    """Freezing, exporting, saving or loading failed, or the exported model does not reproduce the original."""


class ArgumentError(OrthofxError, ValueError):
    """A function or class of orthofx got a bad argument; the message says what to pass instead."""


class LayerArgumentError(ArgumentError):
    """A layer of :mod:`orthofx.nn` got a bad argument; the message says what to pass instead."""


class MetaWeightError(LayerArgumentError, TransformError):
    """An orthofx layer was asked to start near the weight of a layer on the meta device (``from_conv`` /
    ``from_linear`` / ``from_conv_transpose`` with ``init="nearest"``, or the ``orthogonal_conv`` pass on a model
    built under ``torch.device("meta")``): the weight has a shape but no values. A
    :class:`LayerArgumentError` (pass ``init="random"`` or a materialised layer) and a :class:`TransformError`
    (what ``orthofx.transform`` raises when a pass fails)."""


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def caller_stacklevel(skip_torch: bool = False) -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made by the function calling this one that names the first frame
    outside orthofx (and, with ``skip_torch``, outside torch: a warning from an optimizer hook, which torch's
    ``step`` wrappers call): the user's call, however many frames (helpers, the decorators of orthofx's public
    functions) lie between. A fixed count broke whenever a frame was added on the way. The outermost frame where
    every frame is skipped."""
    skipped = (_PACKAGE_DIR, _torch_dir()) if skip_torch else (_PACKAGE_DIR,)
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and os.path.normpath(frame.f_code.co_filename).startswith(skipped):
        frame, level = frame.f_back, level + 1
    return level


def _torch_dir() -> str:
    import torch
    return os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def first_few(items, limit: int) -> str:
    """The first ``limit`` of ``items`` (strings) joined by commas, ``" and N more"`` after them when there are
    more, so that an error about many layers stays one readable line.

    >>> first_few(["a", "b", "c", "d"], 2)
    'a, b and 2 more'
    """
    items = list(items)
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def first_line(text: str, limit: int | None = None) -> str:
    """The first non-blank line of an error message, stripped (``""`` for none), cut to ``limit`` characters.

    >>> first_line("\\n  cannot run op\\n  details", 10)
    'cannot ...'
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return first if limit is None or len(first) <= limit else first[:limit - 3] + "..."


def saved_count(local_metadata: dict, key: str, prefix: str, meaning: str, keep: str,
                error: type[OrthofxError] = ArgumentError, label: str = "", needed: bool = False) -> int | None:
    """``local_metadata[key]``, an int >= 0 orthofx keeps in a module's state-dict metadata (training state that a
    key would not fit: a step or a count), or ``None`` when it is absent. Anything else raises ``error`` (starting
    with ``label``) naming the module's entry (``prefix``: the module's path and a dot), what it holds
    (``meaning``), and the fix: delete that entry, which keeps ``keep``.

    ``needed``: the module uses the value (an ``every`` period longer than 1) and the state dict holds the module's
    keys. A state dict without torch's metadata (no ``version`` entry: rebuilt key by key, as ``{k: v.cpu() for k,
    v in sd.items()}``, or read from safetensors) cannot hold it, and an :class:`OrthofxWarning` says that ``keep``
    stays and how to keep the metadata (one message per kind of value, without the module's path, so that Python
    shows it once; ``warnings.filterwarnings("ignore", message="the state dict carries no torch metadata")``
    silences it, e.g. when loading pretrained weights); a state dict that has the metadata but not the key (a plain
    model's, or one saved before orthofx kept it) is taken silently.

    >>> saved_count({"version": 1, "k": 3}, "k", "", "a count", "the model's own count")
    3
    """
    if key not in local_metadata:
        if needed and "version" not in local_metadata:
            warnings.warn(
                f"the state dict carries no torch metadata (a dict rebuilt key by key, safetensors or "
                f"torch.distributed.checkpoint drop it), which holds {meaning}: {keep} stays, so a resumed run may "
                "evaluate its terms on other steps than the run it continues. Load the state dict as state_dict() "
                "returned it (torch.save / torch.load keep the metadata), or copy it over: new._metadata = "
                "old._metadata", OrthofxWarning, stacklevel=caller_stacklevel(skip_torch=True))
        return None
    value = local_metadata[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise damaged_metadata_entry(prefix, key, value, meaning, "an int >= 0", keep, error, label)
    return value


def damaged_metadata_entry(prefix: str, key: str, value, meaning: str, requirement: str, keep: str,
                           error: type[OrthofxError] = ArgumentError, label: str = "") -> OrthofxError:
    """The error (``error``, its message starting with ``label``) for an entry ``key`` of the state-dict metadata
    of the module at ``prefix`` (its path and a dot) whose ``value`` is not what orthofx wrote there: what it holds
    (``meaning``), what it must be (``requirement``), and the fix, deleting the entry, which keeps ``keep``.

    >>> print(damaged_metadata_entry("", "k", -1, "a count", "an int >= 0", "the model's own count"))
    the state dict's metadata for the model's root ('') holds k=-1, a count, which must be an int >= 0; remove the \
entry (del state_dict._metadata['']['k']) to keep the model's own count
    """
    path = prefix[:-1]
    where = f"'{path}'" if path else "the model's root ('')"
    return error(f"{label + ': ' if label else ''}the state dict's metadata for {where} holds {key}={value!r:.60}, "
                 f"{meaning}, which must be {requirement}; remove the entry (del state_dict._metadata['{path}']"
                 f"['{key}']) to keep {keep}")


def keep_in_metadata(destination, prefix: str, key: str, value) -> None:
    """Write ``value`` under ``key`` into the state-dict metadata of the module at ``prefix`` (its path and a dot),
    from its ``_save_to_state_dict``: training state that a key would not fit (a key would change the model's keys,
    and tools reorder keys), read back by :func:`saved_count` or the layer's own reader. ``Module.state_dict`` has
    put the module's entry (``{"version": ...}``) there before the call, and ``torch.save`` / ``torch.load``
    (``weights_only=True`` too, for ints and tuples of ints) keep it; a destination without metadata (a plain dict
    passed as ``destination``) gets nothing.

    >>> import collections
    >>> state = collections.OrderedDict(); state._metadata = {"layer": {"version": 1}}
    >>> keep_in_metadata(state, "layer.", "k", 3); state._metadata
    {'layer': {'version': 1, 'k': 3}}
    """
    metadata = getattr(destination, "_metadata", None)
    if isinstance(metadata, dict) and isinstance(metadata.get(prefix[:-1]), dict):
        metadata[prefix[:-1]][key] = value


def layer_label(module) -> str:
    """How an error names a layer of :mod:`orthofx.nn`: its class and, once a pass or ``orthofx.freeze`` has put it
    into a model, its path there (a model may hold dozens of layers of one class), e.g.
    ``"ConvNormConv2d at 'layer2.0.conv1'"``."""
    site = module.__dict__.get(SITE_ATTRIBUTE)
    return f"{type(module).__name__} at {site!r}" if site else type(module).__name__


class OrthofxWarning(UserWarning):
    """Base class of the warnings orthofx issues: something the user asked for is done, but not all of it holds
    (``warnings.simplefilter("error", orthofx.OrthofxWarning)`` turns them into errors)."""


class ScaleLostWarning(OrthofxWarning):
    """A layer's weight had a scale other than 1 from another pass of the policy (``isometric_init`` with a
    ``gain`` or an ``activation`` gain), and the ``riemannian`` pass constrains it to the Stiefel manifold, where
    every singular value is 1: the scale is gone (at transform time with ``init: project``, at the first step's
    retraction with ``init: keep`` or when the initialisation came after the constraint). The layer's Change says
    so too (``after["scale_lost"]``)."""


class RunningFiltersDroppedWarning(OrthofxWarning):
    """A ConvNorm layer with ``momentum`` trained on more FFT grids (input sizes) than its ``max_running_grids`` and
    dropped the running filter of the least recently updated one: eval on that size now uses ``V`` of the current
    weight. Issued once per layer; the message names the layer, its grids, the bound and how to raise it. Also
    issued when a layer with ``momentum=None`` loads a state dict holding running filters (saved from a layer with
    a momentum), which it does not take: its eval outputs then use ``V`` of the weight, not those filters."""
