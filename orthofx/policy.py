"""Policies: which pass runs on which part of a model, read from YAML, a dict or a preset, and validated.

A policy is a list of rules; each rule *matches* sites of the captured graph (module calls, function calls,
blocks) and names the pass to *apply* to them, with parameters under ``with:``::

    orthofx: 1                       # schema version
    capture: {mode: auto, leaf_modules: [MyAttention]}
    rules:
      - name: soft
        match: {type: [Conv2d, Linear], exclude: ["fc"]}
        apply: orth_regularizer
        with: {weight: 0.01}

Everything is checked when the policy is loaded: unknown keys, passes, parameters and op names, values of the
wrong type or out of range, bad regular expressions, inconsistent selectors and duplicate keys all raise
:class:`orthofx.errors.PolicyError` naming the file, line and column of the offending key or value, what was
found and what is allowed; a mistake in content reached through a YAML alias (``*name``) is placed at the anchor
(``&name``, where it is written) and the message adds where the alias used it. ``null`` (``None`` in a dict) means
"not given" for every key with a default (a pass parameter that takes null as one of its values gets null); a
required key given as null is an error. YAML is only ever *composed* with PyYAML's safe loader and the node tree is
turned into plain Python values here, so no tag in a policy can construct objects or run code, and a policy named
as Python (``policy.py``, ``policy.py:make``) is refused, never run.
"""

from __future__ import annotations

import codecs
import copy
import difflib
import fnmatch
import functools
import importlib.resources
import math
import numbers
import os
import re
import stat
import unicodedata
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .capture import CAPTURE_MODES
from .errors import ArgumentError, OrthofxWarning, PolicyError, caller_stacklevel, first_few
from .passes import registry as _registry  # importing orthofx.passes registers the built-in passes
from .passes.base import Pass

__all__ = [
    "Location",
    "Match",
    "Rule",
    "CaptureConfig",
    "Policy",
    "OP_ALIASES",
    "CANONICAL_OPS",
    "canonical_op",
    "presets",
    "match_pattern",
    "SCHEMA_VERSION",
    "CAPTURE_MODES",
    "MATCH_KINDS",
]

#: The only policy schema version this orthofx reads (top-level key ``orthofx``).
SCHEMA_VERSION = 1
#: Accepted values of ``match.kind``.
MATCH_KINDS = ("module", "block", "function")

# ----------------------------------------------------------------------------------------------- op names

#: Canonical names of the decompositions a rule can target with ``op:`` / ``feeds:``.
CANONICAL_OPS = ("linalg.svd", "linalg.svdvals", "linalg.eigh", "linalg.eigvalsh", "svd")


#: ATen op names (``torch.ops.aten.<name>``) of the decompositions -> canonical names.
_ATEN_OPS = {
    "linalg_eigh": "linalg.eigh", "_linalg_eigh": "linalg.eigh", "linalg_eigvalsh": "linalg.eigvalsh",
    "linalg_svd": "linalg.svd", "_linalg_svd": "linalg.svd", "linalg_svdvals": "linalg.svdvals", "svd": "svd",
}


def _make_op_aliases() -> dict[str, str]:
    aliases: dict[str, str] = {}
    for op in CANONICAL_OPS:
        aliases[op] = op
        aliases["torch." + op] = op
    aliases.update({
        "eigh": "linalg.eigh",
        "symeig": "linalg.eigh",        # torch.symeig, removed from torch; same decomposition
        "torch.symeig": "linalg.eigh",
        "svdvals": "linalg.svdvals",
        "eigvalsh": "linalg.eigvalsh",
    })
    # The ATen ops torch.export records for them (export capture): aten.linalg_eigh, and the forms of
    # decomposed graphs (aten._linalg_eigh returns (eigenvalues, eigenvectors) like torch.linalg.eigh).
    for aten_name, op in _ATEN_OPS.items():
        aliases["aten." + aten_name] = op
        aliases["torch.ops.aten." + aten_name] = op
    return aliases


#: Every accepted spelling of an op name -> its canonical name.
OP_ALIASES: dict[str, str] = _make_op_aliases()


def canonical_op(name: str) -> str:
    """The canonical op name for ``name`` (``"torch.linalg.eigh"`` -> ``"linalg.eigh"``).

    Raises :class:`~orthofx.errors.ArgumentError` (a ``ValueError``) listing the accepted names when ``name`` is
    not one of them.
    """
    if isinstance(name, str) and name in OP_ALIASES:
        return OP_ALIASES[name]
    hint = _did_you_mean(name, OP_ALIASES) if isinstance(name, str) else ""
    raise ArgumentError(
        f"unknown op {name!r}; accepted: {', '.join(CANONICAL_OPS)} (each also with a 'torch.' prefix), "
        f"the aliases eigh, symeig, svdvals, eigvalsh, and the ATen names (aten.linalg_eigh, aten._linalg_eigh, "
        f"aten.linalg_svd, ...){hint}")


def _did_you_mean(word: Any, options) -> str:
    if not isinstance(word, str):
        return ""
    # compared in lower case, so that 'LORTH' or 'Orth_Regularizer' still find their option
    by_lower = {}
    for option in options:
        if isinstance(option, str):
            by_lower.setdefault(option.lower(), option)
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean '{by_lower[close[0]]}'?)" if close else ""


# ----------------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Location:
    """Where something was written: 1-based line and column; ``None`` when unknown (a policy from a dict).

    Content reached through YAML aliases (``*name``) is located where it is written (at the anchor, ``&name``);
    ``aliases`` then holds ``(anchor name, line, column)`` of each alias it was used through, the innermost first,
    and :attr:`alias_note` says so in the words of the policy's own errors. Example::

        import orthofx
        text = "orthofx: 1\\nrules:\\n  - &r {match: {type: Conv2d}, apply: orth_regularizer}\\n  - *r\\n"
        loc = orthofx.Policy.from_yaml(text).rules[1].location
        assert (str(loc), loc.aliases) == ("<string>:3:5", (("r", 4, 5),))
        assert loc.alias_note == "used through the alias *r at line 4, column 5"
    """

    file: str | None = None
    line: int | None = None
    column: int | None = None
    aliases: tuple[tuple[str, int, int], ...] = ()

    def __str__(self) -> str:
        return ":".join(str(p) for p in (self.file or "<policy>", self.line, self.column) if p is not None)

    @property
    def alias_note(self) -> str:
        """``used through the alias *a at line L, column C`` (``, inside *b at ...`` for each outer alias) when the
        content here was reached through aliases, ``""`` otherwise."""
        shown = [f"*{anchor} at line {line}, column {column}" for anchor, line, column in self.aliases]
        if not shown:
            return ""
        return f"used through the alias {shown[0]}" + "".join(f", inside {s}" for s in shown[1:])


@dataclass
class Match:
    """The selectors of a rule. Empty tuples mean "any"; all given selectors must hold.

    ``type``: class names (``"Conv2d"``, matching subclasses) or dotted class paths (``"mypkg.mod.MyBlock"``).
    ``name`` / ``exclude``: glob patterns (``fnmatch.fnmatchcase``) or ``"re:<regex>"`` (must match the whole
    name); a site whose name matches any ``exclude`` pattern is left out. ``where``: attribute filters
    ``{attr: value}``; list values are stored as tuples (``kernel_size: [3, 3]`` -> ``(3, 3)``).
    ``op``: canonical op names of function sites. ``feeds``: canonical op names; selects the layers upstream
    of those calls. ``kind``: as written (``None`` when not given; see :attr:`site_kind`).
    """

    type: tuple[str, ...] = ()
    name: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    where: dict[str, Any] = field(default_factory=dict)
    op: tuple[str, ...] = ()
    feeds: tuple[str, ...] = ()
    kind: str | None = None

    @property
    def site_kind(self) -> str:
        """The kind of site the rule selects: ``kind`` when given, else ``"function"`` with ``op``, else module."""
        if self.kind is not None:
            return self.kind
        return "function" if self.op else "module"

    def matches_name(self, name: str, *aliases: str) -> bool:
        """True if ``name`` matches one of the ``name`` patterns (or there are none) and no ``exclude`` pattern.

        ``aliases``: the module's other paths (``self.b = self.a``, one layer twice in an ``nn.Sequential``): one
        module is one layer, so a ``name`` pattern matching any of its paths selects it and an ``exclude`` pattern
        matching any of them leaves it alone (it cannot be treated under one name and not the other)."""
        names = (name, *aliases)
        if self.name and not any(match_pattern(p, n) for p in self.name for n in names):
            return False
        return not any(match_pattern(p, n) for p in self.exclude for n in names)

    def __eq__(self, other: object) -> bool:
        # a Match built in code may hold lists where one read from a policy holds tuples (type=["Conv2d"],
        # where={"kernel_size": [3, 3]}); they select alike, and to_dict writes them alike
        if not isinstance(other, Match):
            return NotImplemented
        return self._compared() == other._compared()

    __hash__ = None  # mutable, as the generated __eq__ left it

    def _compared(self) -> tuple:
        where = {k: _tuple(v) for k, v in self.where.items()} if isinstance(self.where, Mapping) else self.where
        return (*(_tuple(getattr(self, key)) for key in ("type", "name", "exclude", "op", "feeds")), where, self.kind)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("type", "name", "exclude", "op", "feeds"):
            values = getattr(self, key)
            if values:
                out[key] = values[0] if len(values) == 1 else list(values)
        if self.where:
            out["where"] = {k: _untuple(v) for k, v in self.where.items()}
        if self.kind is not None:
            out["kind"] = self.kind
        # keep the documented key order: type, name, exclude, where, op, feeds, kind
        order = ("type", "name", "exclude", "where", "op", "feeds", "kind")
        return {k: out[k] for k in order if k in out}


@dataclass
class Rule:
    """One rule: the sites ``match`` selects get pass ``apply`` with ``params``.

    ``params`` are validated with defaults filled in; ``given_params`` are as written under ``with:``, less the
    parameters given as null (which means "not given": the default) that do not take null as a value.
    ``index`` is the rule's position in the policy it was read from (0-based; not compared by ``==``, as a rule
    moved to another policy keeps it); ``location`` where its mapping starts,
    ``match_location`` where its ``match`` mapping is written (at an anchor when the match is an alias, ``match:
    *m``; :attr:`Location.aliases` then says where the alias used it).
    """

    name: str
    match: Match
    apply: str
    params: dict[str, Any] = field(default_factory=dict)
    given_params: dict[str, Any] = field(default_factory=dict)
    optional: bool = False
    # where the rule was read, like its location: a rule taken into another policy (Policy(rules=[p.rules[1]])) keeps
    # it, plans use the rule's position, and to_dict writes what the position would not name the same way
    index: int = field(default=0, compare=False)
    location: Location = field(default=Location(), compare=False)
    match_location: Location = field(default=Location(), compare=False)

    @property
    def pass_class(self) -> type[Pass]:
        """The registered pass class this rule applies."""
        return _registry.get_pass(self.apply)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.name != _default_rule_name(self.apply, self.index):
            out["name"] = self.name
        out["match"] = self.match.to_dict()
        out["apply"] = self.apply
        if self.given_params:
            out["with"] = copy.deepcopy(self.given_params)
        if self.optional:
            out["optional"] = True
        return out


@dataclass
class CaptureConfig:
    """How the model is turned into a graph: ``mode`` and extra leaves.

    ``mode``: ``"fx"`` (symbolic tracing), ``"export"`` (``torch.export`` on the example inputs, for models
    symbolic tracing cannot handle) or ``"auto"`` (fx, then export when the top-level trace fails and example
    inputs are given); see :mod:`orthofx.capture`.

    ``leaf_modules`` are class names, dotted class paths or module qualified names kept as fx leaves.
    """

    mode: str = "auto"
    leaf_modules: tuple[str, ...] = ()

    def __eq__(self, other: object) -> bool:
        # leaf_modules as a list (built in code) or a tuple (read): one capture
        if not isinstance(other, CaptureConfig):
            return NotImplemented
        return (self.mode, _tuple(self.leaf_modules)) == (other.mode, _tuple(other.leaf_modules))

    __hash__ = None  # mutable, as the generated __eq__ left it

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.mode != "auto":
            out["mode"] = self.mode
        if self.leaf_modules:
            out["leaf_modules"] = list(self.leaf_modules)
        return out


@dataclass
class Policy:
    """A validated policy. Build it with :meth:`load`, :meth:`from_yaml`, :meth:`from_dict` or :meth:`preset`.

    ``==`` compares content (``source`` and rule locations are ignored), so
    ``Policy.from_yaml(p.to_yaml()) == p``.

    Example::

        import orthofx
        policy = orthofx.Policy.from_dict({"rules": [
            {"name": "late", "match": {"type": "Conv2d", "name": "conv[23]"}, "apply": "orth_regularizer",
             "with": {"weight": 0.1}}]})
        print(policy.to_yaml())                                  # the same policy as a YAML file would hold it
        assert orthofx.Policy.from_yaml(policy.to_yaml()) == policy
        gm = orthofx.transform(orthofx.models.get("small_cnn"), policy)
        assert [term.site for term in orthofx.manifest_of(gm).penalties] == ["conv2", "conv3"]
    """

    version: int = SCHEMA_VERSION
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    rules: list[Rule] = field(default_factory=list)
    description: str = ""
    source: str | None = field(default=None, compare=False)

    def __eq__(self, other: object) -> bool:
        # rules as a list or a tuple, a description of None or "" (not given): one policy, which to_dict writes alike
        if not isinstance(other, Policy):
            return NotImplemented
        return self._compared() == other._compared()

    __hash__ = None  # mutable, as the generated __eq__ left it

    def _compared(self) -> tuple:
        rules = list(self.rules) if isinstance(self.rules, (list, tuple)) else self.rules
        return self.version, self.capture, rules, self.description or ""

    # -- constructors ---------------------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path_or_text: str | os.PathLike) -> Policy:
        """Read a policy from a YAML file (a ``Path``, or a ``str`` naming an existing file) or YAML text."""
        if isinstance(path_or_text, os.PathLike):
            path = Path(path_or_text)
            _refuse_python_policy(str(path))
            if not _path_test(_is_policy_source, str(path)):
                raise _no_policy_file(str(path))
            return _policy_from_file(path)
        if not isinstance(path_or_text, str):
            raise PolicyError(f"Policy.from_yaml expects a file path or YAML text, got {type(path_or_text).__name__}")
        text = path_or_text
        _refuse_python_policy(text)
        if _is_existing_file(text):
            return _policy_from_file(Path(text))
        word = text.strip()
        if _looks_like_a_path(word):
            raise _no_policy_file(word)
        if word in _preset_files():  # YAML text 'lorth' is a lone string, which no policy is
            raise PolicyError(f"{word!r} is the name of a preset, not YAML text or a file; load it with "
                              f"Policy.preset({word!r}) or Policy.load({word!r})", file="<string>")
        return _policy_from_text(text, "<string>", require_version=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "<dict>") -> Policy:
        """Build a policy from a mapping shaped like the YAML (``orthofx`` defaults to 1 here).

        The input is not modified and the policy shares no mutable state with it. Errors name the path of
        the mistake (``rules[1].with.weight``); their ``line`` and ``column`` are ``None``.
        """
        pos = _Positions(source)
        if not isinstance(d, Mapping):
            raise pos.error(f"a policy dict must be a mapping, got {type(d).__name__}", ())
        data = _plain(d, (), pos, 0)
        return _build_policy(data, pos, require_version=False)

    @classmethod
    def preset(cls, name: str) -> Policy:
        """One of the built-in policies (see :func:`presets`)."""
        files = _preset_files()
        if name not in files:
            hint = _did_you_mean(name, files)
            raise PolicyError(f"unknown preset {name!r}; available presets: {', '.join(files) or 'none'}{hint}")
        text = files[name].read_text(encoding="utf-8")
        return _policy_from_text(text, f"<preset:{name}>", require_version=True)

    @classmethod
    def load(cls, obj: Policy | Mapping[str, Any] | str | os.PathLike) -> Policy:
        """Anything a user may pass as a policy: a Policy (returned as is), a dict, a YAML file path, a preset
        name or YAML text. A Python file (``policy.py`` or ``policy.py:make``) is refused with a PolicyError
        saying to write the policy out as YAML: a policy is data, never code orthofx runs.

        A Policy is checked again (:class:`PolicyError` naming ``rules[i].with.<param>``, ``rules[i].match.<key>``
        ...) and returned as is: its dataclasses can be built or edited in code (``p.rules[0].params["weight"] =
        -1``), which bypasses the checks of :meth:`from_dict`, and a pass would otherwise run with the value."""
        if isinstance(obj, Policy):
            _check_policy_object(obj)
            return obj
        if isinstance(obj, Mapping):
            return cls.from_dict(obj)
        if isinstance(obj, os.PathLike):
            return cls.from_yaml(obj)
        if isinstance(obj, str):
            files = _preset_files()
            word = obj.strip()
            if word in files:
                if _is_existing_file(word):  # names are looked up as presets first: say which one is used
                    warnings.warn(f"{word!r} names both a preset and a file in the working directory "
                                  f"({os.path.abspath(word)}); the preset is used. Pass './{word}' or "
                                  f"pathlib.Path({word!r}) for the file", OrthofxWarning,
                                  stacklevel=caller_stacklevel())
                return cls.preset(word)
            _refuse_python_policy(obj)
            if _is_existing_file(obj):
                return cls.from_yaml(obj)
            if _is_existing_file(word):
                return cls.from_yaml(word)
            if _looks_like_a_path(word):
                raise _no_policy_file(word)
            if word and re.fullmatch(r"[\w.\-/\\~]+", word):
                if "/" in word or "\\" in word:
                    raise _no_policy_file(word)
                hint = _did_you_mean(word, files)
                raise PolicyError(
                    f"{word!r} is neither a preset nor an existing file{hint}; available presets: "
                    f"{', '.join(files) or 'none'}; or pass a YAML file path, YAML text, a dict or a Policy")
            return _policy_from_text(obj, "<string>", require_version=True)
        raise PolicyError(f"a policy must be a Policy, a dict, a YAML file path, YAML text or a preset name; "
                          f"got {type(obj).__name__}")

    # -- output ---------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain data in the YAML's shape (``Policy.from_dict(p.to_dict()) == p``).

        A Policy built or changed in code is checked first, as :meth:`load` checks it (:class:`PolicyError` naming
        the field): otherwise its mistakes were written out as other content (``leaf_modules = "Linear"`` as the
        classes L, i, n ...; ``optional = "yes"`` as true; a parameter only in ``params`` dropped), or failed
        inside the YAML writer with a bare AttributeError or RepresenterError."""
        _check_policy_object(self)
        out: dict[str, Any] = {"orthofx": self.version}
        if self.description:
            out["description"] = self.description
        capture = self.capture.to_dict()
        if capture:
            out["capture"] = capture
        out["rules"] = []
        for position, rule in enumerate(self.rules):
            written = rule.to_dict()
            # a rule taken from another policy (Policy(rules=[p.rules[1]])) keeps the default name of its old place,
            # which read back at this place would be another name (in the manifest, report and penalty terms)
            if "name" not in written and rule.name != _default_rule_name(rule.apply, position):
                written = {"name": rule.name, **written}
            out["rules"].append(written)
        return out

    def to_yaml(self) -> str:
        """YAML text of the policy (``Policy.from_yaml(p.to_yaml()) == p``)."""
        return yaml.dump(self.to_dict(), Dumper=_PolicyDumper, sort_keys=False, default_flow_style=None,
                         allow_unicode=True, width=100)


def presets() -> dict[str, str]:
    """Name -> one-line description (the first line of the YAML's ``description:``) of every preset.

    Example::

        import orthofx
        for name, description in orthofx.presets().items():
            print(f"{name:11} {description[:70]}")
        assert {"lorth", "orthogonal", "svd"} <= set(orthofx.presets())
        policy = orthofx.Policy.preset("lorth")   # transform(model, "lorth") loads the same policy
    """
    out = {}
    for name, res in _preset_files().items():
        source = f"<preset:{name}>"
        data, _ = _parse_yaml(res.read_text(encoding="utf-8"), source)
        desc = data.get("description") if isinstance(data, dict) else None
        out[name] = desc.strip().splitlines()[0] if isinstance(desc, str) and desc.strip() else ""
    return out


def _preset_files() -> dict[str, Any]:
    root = importlib.resources.files("orthofx.policies")
    found = {entry.name[: -len(".yaml")]: entry for entry in root.iterdir()
             if entry.name.endswith(".yaml") and entry.is_file()}
    return dict(sorted(found.items()))


@functools.lru_cache(maxsize=512)
def _compiled_regex(regex: str) -> re.Pattern:
    with warnings.catch_warnings():  # a FutureWarning about the expression was given, with its place, at load
        warnings.simplefilter("ignore", FutureWarning)
        return re.compile(regex)


def match_pattern(pattern: str, name: str) -> bool:
    """True if ``name`` matches ``pattern``: a glob (``fnmatch.fnmatchcase``) or ``"re:<regex>"`` (full match)."""
    if pattern.startswith("re:"):
        return _compiled_regex(pattern[3:]).fullmatch(name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _default_rule_name(apply: str, index: int) -> str:
    return f"{apply}[{index}]"


def _untuple(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_untuple(v) for v in value]
    return value


def _tuple(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return tuple(_tuple(v) for v in value)
    return value


# ----------------------------------------------------------------------------------------------- YAML reading

_TAG = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL, _TIMESTAMP = (_TAG + t for t in ("str", "int", "float", "bool", "null", "timestamp"))
_MAP, _SEQ, _MERGE, _VALUE = _TAG + "map", _TAG + "seq", _TAG + "merge", _TAG + "value"

# YAML 1.1 (PyYAML) reads 010 as the octal 8; YAML 1.2 (and most tools now) as 10.
_YAML11_OCTAL = re.compile(r"^[-+]?0[0-7_]+$")
# YAML 1.1 (PyYAML) reads 1e-2, 1E-3 and 1.0e5 as strings: its float form needs a dot and a signed exponent.
_EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
# ... and -.5 and +.5 as strings too (its form of a float starting with the dot takes no sign); YAML 1.2 as floats
_SIGNED_DOT_FLOAT = re.compile(r"^[-+]\.[0-9][0-9_]*$")


class _AliasUse:
    """Where an alias (``*name``) was written, in the composed tree in place of the node it stands for.

    PyYAML's composer puts the anchored node itself at every alias, so the tree alone cannot tell where an alias
    was used: errors about content reached through one would name only the anchor's place (or, for a key, the
    place of use), and not say which use of the content was wrong."""

    __slots__ = ("target", "anchor", "start_mark")

    def __init__(self, target: yaml.Node, anchor: str, start_mark: yaml.Mark):
        self.target = target
        self.anchor = anchor
        self.start_mark = start_mark


class _PolicyLoader(yaml.SafeLoader):
    """The safe loader plus exponent-only and signed leading-dot floats (1e-3, -.5), recording where aliases are
    used (:class:`_AliasUse`). Used only to *compose* node trees, never to construct."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            return _AliasUse(super().compose_node(parent, index), event.anchor, event.start_mark)
        return super().compose_node(parent, index)


class _PolicyDumper(yaml.SafeDumper):
    """The safe dumper, quoting strings that :class:`_PolicyLoader` would read back as floats, and writing
    strings with YAML line breaks other than ``\n`` (NEL, LS, PS) double-quoted so they survive a round trip."""

    def represent_str(self, data: str):
        if any(ch in data for ch in "\x85\u2028\u2029\r"):
            return self.represent_scalar("tag:yaml.org,2002:str", data, style='"')
        return super().represent_str(data)


_PolicyDumper.add_representer(str, _PolicyDumper.represent_str)


for _cls in (_PolicyLoader, _PolicyDumper):
    _cls.add_implicit_resolver(_FLOAT, _EXP_FLOAT, list("-+0123456789."))
    _cls.add_implicit_resolver(_FLOAT, _SIGNED_DOT_FLOAT, list("-+"))
del _cls

_SCALARS = yaml.constructor.SafeConstructor()
_MAX_NODES = 100_000  # guards against alias expansion ("billion laughs")
# Integers beyond a float's range are refused wherever they appear (str() of one over 4300 digits even raises).
_MAX_INT_BITS = 1024


def _too_large_int(value: int, path: tuple) -> str | None:
    """The message for an integer too large for a policy, ``None`` when it fits."""
    bits = abs(value).bit_length()
    if bits <= _MAX_INT_BITS:
        return None
    return _too_large_message(path, f"about {int(bits * 0.30103) + 1}")


def _too_large_message(path: tuple, digits: str) -> str:
    return (f"{_fmt(path)}: integer too large ({digits} digits); numbers in a policy must be smaller than 1.8e308 "
            "in magnitude (a float's range)")


class _Positions:
    """Marks of the keys and values of a parsed policy, by path (``("rules", 0, "with", "weight")``), and the
    aliases (``*name``) the values at some paths were reached through.

    Content reached through an alias is located where it is written (at the anchor, ``&name``: the place to fix
    it), and errors about it add where it was used: ``... (used through the alias *w at line 9, column 11)``."""

    def __init__(self, file: str | None):
        self.file = file
        self.keys: dict[tuple, tuple[int, int]] = {}
        self.values: dict[tuple, tuple[int, int]] = {}
        self.aliases: dict[tuple, tuple[str, tuple[int, int]]] = {}  # path -> (anchor name, mark of the alias)
        # rule index -> the name given to that rule, for errors inside it where no line tells the rules apart
        self.rule_names: dict[int, str] = {}

    def _find(self, path: tuple, key: bool) -> tuple[tuple[int | None, int | None], tuple, bool]:
        """The mark that locates ``path``, the path it was recorded for and whether it is a key's."""
        if key and path in self.keys:
            return self.keys[path], path, True
        p = tuple(path)
        while True:
            if p in self.values:
                return self.values[p], p, False
            if p in self.keys:
                return self.keys[p], p, True
            if not p:
                return (None, None), p, False
            p = p[:-1]

    def location(self, path: tuple, key: bool = False) -> Location:
        """Where ``path`` is written, with the aliases it was used through (:attr:`Location.aliases`)."""
        (line, column), found, is_key = self._find(path, key)
        # a key is written in the mapping holding it, so the alias its value was reached through does not apply
        end = len(found) - 1 if is_key else len(found)
        uses = [self.aliases[found[:n]] for n in range(end, 0, -1) if found[:n] in self.aliases]
        uses = tuple((anchor, at[0], at[1]) for anchor, at in uses)
        return Location(self.file, line, column, uses)

    def error(self, message: str, path: tuple, *, key: bool = False) -> PolicyError:
        loc = self.location(path, key)
        note = f" ({loc.alias_note})" if loc.alias_note else ""
        return PolicyError(message + self._rule_note(message, path, loc) + note, file=self.file, line=loc.line,
                           column=loc.column)

    def _rule_note(self, message: str, path: tuple, loc: Location) -> str:
        """`` (in rule 'soft')`` for an error inside a rule that has a name of its own, where no line is known (a
        dict, a Policy object): ``rules[7]`` alone sends a user to count the rules of a list built in code, the name
        is what they wrote and can search for; ``""`` otherwise, or when the message names the rule already."""
        if loc.line is not None or len(path) < 2 or path[0] != "rules" or path[1] not in self.rule_names:
            return ""
        name = self.rule_names[path[1]]
        return "" if repr(name) in message else f" (in rule {name!r})"


def _mark(node: yaml.Node | _AliasUse) -> tuple[int, int]:
    return (node.start_mark.line + 1, node.start_mark.column + 1)


def _tag_name(tag: str) -> str:
    return "!!" + tag[len(_TAG):] if tag.startswith(_TAG) else tag


def _path_test(test, text: str) -> Any:
    """``test(text)`` (``os.path.isdir``, :func:`_is_policy_source` ...) of a string that may not be a valid path
    at all (a NUL byte, too long) or name nothing: ``False`` then."""
    try:
        return test(text)
    except (OSError, ValueError):
        return False


#: The end of a file name: a suffix starting with a letter (``.json``, ``.txt``, ``.yaml``), not a number's decimals.
_FILE_SUFFIX = re.compile(r"\.[A-Za-z][A-Za-z0-9_]*")


def _looks_like_a_path(word: str) -> bool:
    """A one-line string naming a file or a directory rather than holding YAML text: one with a file suffix
    (``nofile.json``: a missing file of any kind is "not found", as a ``.yaml`` one is, not "neither a preset nor an
    existing file") or a path separator, or an existing directory. One-line YAML text holding a mapping (``a: 1``,
    ``{rules: []}``) or a list (``[a.b]``, ``- a.b``) is none.

    >>> [_looks_like_a_path(w) for w in ("p.json", "dir/p", "p.yaml", "lorth", "1.5", "{rules: []}", "a: b.c")]
    [True, True, True, False, False, False, False]
    """
    if (not word or "\n" in word or ": " in word or word.endswith(":") or word[0] in "{[\"'#"
            or word.startswith("- ")):
        return False
    name = os.path.basename(word.replace("\\", "/"))
    if _FILE_SUFFIX.search(name) or "/" in word or "\\" in word:
        return True
    return _path_test(os.path.isdir, word)


#: A policy argument naming Python code: ``file.py`` or ``file.py:name`` (the form MODEL takes on the command line).
_PYTHON_SPEC = re.compile(r"\S+\.py(?::[\w.]*)?")


def _refuse_python_policy(word: str) -> None:
    """Raise the one PolicyError for a policy given as Python code, at every entry point (:meth:`Policy.load`,
    :meth:`Policy.from_yaml` with a path or a string, the file reader, hence ``--policy`` and ``orthofx check``).

    Python code is ``file.py`` or ``file.py:name`` (the form MODEL takes on the command line; surrounding spaces
    ignored), or an existing file whose name ends in ``.py`` (``my policy.py``, which the first form, having no
    spaces, does not take for a path). Policies are data, read with a safe YAML loader; orthofx never runs a
    policy (only a MODEL may be ``file.py:factory``). Example::

        from orthofx.errors import PolicyError
        from orthofx.policy import _refuse_python_policy
        _refuse_python_policy("policy.yaml")          # not Python: returns
        try:
            _refuse_python_policy(" policy.py:make")
            raise AssertionError("not refused")
        except PolicyError as e:
            assert e.file == "policy.py" and "'policy.py:make' names Python code" in str(e)
    """
    name = word.strip()
    named = _PYTHON_SPEC.fullmatch(name) is not None
    if not named and not (name.endswith(".py") and "\n" not in name
                          and any(_path_test(os.path.exists, w) for w in (word, name))):
        return
    raise PolicyError(f"{name!r} names Python code, but a policy is YAML text or a .yaml file (or, in Python, a dict "
                      "or a Policy), never code orthofx runs; write the policy out as YAML and give that file "
                      "(in Python: Path('policy.yaml').write_text(orthofx.Policy.load(d).to_yaml()) for a dict or "
                      "Policy d), or pass the dict or Policy itself to orthofx.transform",
                      file=name.rpartition(":")[0] if named and ":" in name else name)


def _no_policy_file(word: str) -> PolicyError:
    if _path_test(os.path.isdir, word):
        return PolicyError(f"{word!r} is a directory, not a policy file; name a .yaml file in it", file=word)
    kind = _path_test(_special_file_kind, word)
    if kind:
        return PolicyError(f"{word!r} is {kind}, not a policy file; name a .yaml file, or pipe the policy in "
                           "(<(command) or /dev/stdin)", file=word)
    home = os.path.expanduser(word) if word.startswith("~") else word
    if home != word and _path_test(os.path.exists, home):
        # a shell expands '~' before a program sees it; Python's file functions (and so orthofx) do not
        return PolicyError(f"policy file not found: {word!r} ('~' is not expanded in Python: the file is "
                           f"{home!r}; pass os.path.expanduser({word!r}) or pathlib.Path({word!r}).expanduser())",
                           file=word)
    return PolicyError(f"policy file not found: {word!r}", file=word)


def _is_policy_source(path: str) -> bool:
    """A path a policy can be read from: a regular file, or a pipe (``orthofx check <(make_policy)`` passes
    ``/dev/fd/63``; ``... | orthofx check /dev/stdin``), read to its end once. Other special files are refused:
    reading ``/dev/zero`` would never end, and a terminal would wait for typing."""
    mode = os.stat(path).st_mode
    return stat.S_ISREG(mode) or stat.S_ISFIFO(mode)


def _special_file_kind(path: str) -> str:
    """What an existing path that is neither a directory nor a policy source is (``""`` when it is not one)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return ""
    kinds = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "")


def _is_existing_file(text: str) -> bool:
    if "\n" in text or not text.strip() or len(text) > 4096:
        return False
    return _path_test(_is_policy_source, text)


def _policy_from_file(path: Path) -> Policy:
    file = str(path)
    _refuse_python_policy(file)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise PolicyError(f"cannot read policy file: {e.strerror or e}", file=file) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        # utf-8-sig counts from after its byte order mark; the file's offset is what a hex viewer shows
        start = e.start + (len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0)
        # where an editor shows the byte: after the text before it, decoded as far as it goes
        before = raw[:start].decode("utf-8-sig", "replace")
        line, column = _line_and_column(before, len(before))
        encoding = next((name for bom, name in _OTHER_BOMS if raw.startswith(bom)), None)
        what = f"it is {encoding} text; save it as UTF-8" if encoding else f"{e.reason} at byte {start}"
        raise PolicyError(f"policy file is not UTF-8 text ({what})", file=file, line=line,
                          column=column) from None
    return _policy_from_text(text, file, require_version=True)


#: Byte order marks of the encodings a policy file is sometimes saved in by mistake (UTF-32 first: its
#: little-endian mark begins with UTF-16's).
_OTHER_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
               (b"\xfe\xff", "UTF-16"))

#: The line breaks of YAML 1.1, as PyYAML counts lines ("\r\n" is one break).
_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")


def _line_and_column(text: str, position: int) -> tuple[int, int]:
    """1-based line and column of character ``position`` of ``text``, counted as PyYAML counts them: every YAML
    line break (CR alone, as an old Mac editor writes, NEL, LS and PS too) starts a line, and a byte order mark
    takes no column."""
    lines = _LINE_BREAK.split(text[:position])
    last = lines[-1]
    if len(lines) == 1 and last.startswith("\ufeff"):
        last = last[1:]
    return len(lines), len(last) + 1


def _yaml_quoting_hint(what: str) -> str:
    """The fix for the two YAML errors that unquoted name patterns cause, to append to PyYAML's message (else "").

    A plain value starting with ``*`` is a YAML alias, so the glob ``name: *conv`` reads as a reference to an
    anchor ``&conv`` ("found undefined alias 'conv'", or "while scanning an alias" for ``name: *``); inside double
    quotes a backslash starts an escape, so ``"re:conv\\d"`` is refused ("found unknown escape character 'd'").

    >>> _yaml_quoting_hint("found undefined alias 'conv'")[:44]
    " (a value starting with '*' is a YAML alias,"
    """
    if "undefined alias" in what or "scanning an alias" in what:
        return (" (a value starting with '*' is a YAML alias, a reference to an anchor '&name': quote a glob that "
                "starts with '*', as in name: '*conv' or exclude: ['*.fc'])")
    if "unknown escape character" in what:
        return (" (inside double quotes a backslash starts a YAML escape: write a regular expression in single "
                "quotes, as in name: 're:layer\\d+', or unquoted)")
    return ""


#: Characters that look like a space but are none to YAML (text pasted from a web page or a word processor).
_UNUSUAL_SPACE = re.compile("[\u00a0\u1680\u2000-\u200b\u202f\u205f\u3000\ufeff]")


def _unusual_space_hint(text: str, line: int | None) -> str:
    """For a YAML error at ``line`` (1-based): the first character up to that line that looks like a space but is
    none to YAML (a no-break space in an indentation, pasted from a web page, makes the line's structure unreadable
    and PyYAML reports only what it expected), with where it is and the fix; ``""`` when there is none. A byte
    order mark at the very start is no mistake.

    >>> _unusual_space_hint("a: 1\\n\\u00a0 b: 2\\n", 2)
    ' (line 2, column 1 holds a NO-BREAK SPACE (U+00A0), which YAML does not read as a space: type a plain space)'
    """
    for found in _UNUSUAL_SPACE.finditer(text):
        if found.start() == 0 and found.group() == "\ufeff":
            continue
        at_line, column = _line_and_column(text, found.start())
        if line is not None and at_line > line:
            return ""
        char = found.group()
        return (f" (line {at_line}, column {column} holds a {unicodedata.name(char, 'space-like character')} "
                f"(U+{ord(char):04X}), which YAML does not read as a space: type a plain space)")
    return ""


#: A backslash and an n followed by what starts a line of a policy (a key, or an item of a list).
_ESCAPED_LINE_BREAK = re.compile(r"\\n\s*(?:-\s|[\w.]+:(?:\s|$))")


def _escaped_newline_hint(text: str) -> str:
    r"""For YAML text that did not parse: when it is one line holding ``\n`` (a backslash and an n) where a line
    would start, the fix. ``orthofx explain MODEL --policy 'orthofx: 1\nrules: ...'`` passes the two characters as
    written (the shell makes no line break of them), and YAML then finds two mappings on one line.

    >>> _escaped_newline_hint(r"orthofx: 1\nrules: []").startswith(" (the text holds '\\n', a backslash and an n")
    True
    """
    if "\n" in text.strip() or not _ESCAPED_LINE_BREAK.search(text):
        return ""
    return (" (the text holds '\\n', a backslash and an n, where a line break was meant: a shell passes them as "
            "written; put the policy in a .yaml file, or in bash write $'...' to make line breaks of them)")


def _policy_from_text(text: str, source: str, *, require_version: bool) -> Policy:
    data, pos = _parse_yaml(text, source)
    return _build_policy(data, pos, require_version=require_version)


def _parse_yaml(text: str, file: str) -> tuple[Any, _Positions]:
    """Plain Python data and the marks of every key and value; YAML errors become PolicyErrors."""
    try:
        node = yaml.compose(text, Loader=_PolicyLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = ", ".join(str(p) for p in (e.context, e.problem) if p)
        if "\\t" in what or "\t" in what:
            what += " (indent YAML with spaces, not tabs)"
        what += (_yaml_quoting_hint(what) + _unusual_space_hint(text, mark.line + 1 if mark else None)
                 + _escaped_newline_hint(text))
        raise PolicyError(f"invalid YAML: {what}", file=file, line=mark.line + 1 if mark else None,
                          column=mark.column + 1 if mark else None) from None
    except yaml.reader.ReaderError as e:
        line, column = _line_and_column(text, e.position)
        raise PolicyError(f"invalid YAML: {e.reason} (character {e.character!r})", file=file, line=line,
                          column=column) from None
    except yaml.YAMLError as e:
        raise PolicyError(f"invalid YAML: {e}", file=file) from None
    except RecursionError:
        raise PolicyError("invalid YAML: the policy is nested too deeply", file=file) from None
    pos = _Positions(file)
    if node is None:
        return None, pos
    walker = _NodeWalker(pos)
    try:
        return walker.walk(node, ()), pos
    except RecursionError:
        raise PolicyError("the policy is nested too deeply", file=file) from None


class _NodeWalker:
    """Turns a composed node tree into plain data, recording marks and rejecting anything but plain values."""

    def __init__(self, pos: _Positions):
        self.pos = pos
        self.count = 0

    def fail(self, node: yaml.Node | _AliasUse, message: str) -> PolicyError:
        line, column = _mark(node)
        return PolicyError(message, file=self.pos.file, line=line, column=column)

    def walk(self, node: yaml.Node | _AliasUse, path: tuple) -> Any:
        if isinstance(node, _AliasUse):
            self.pos.aliases[path] = (node.anchor, _mark(node))
            node = node.target
        self.count += 1
        if self.count > _MAX_NODES:
            raise self.fail(node, f"the policy is too large (more than {_MAX_NODES} values, counting aliases)")
        self.pos.values[path] = _mark(node)
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node, path)
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _SEQ:
                raise self.fail(node, self._bad_tag(node, path))
            return [self.walk(child, path + (i,)) for i, child in enumerate(node.value)]
        if isinstance(node, yaml.MappingNode):
            if node.tag != _MAP:
                raise self.fail(node, self._bad_tag(node, path))
            out: dict[Any, Any] = {}
            first_seen: dict[Any, yaml.Node] = {}
            for written, value_node in node.value:
                # an alias as a key ('*k : 1'): the key is the anchored text, and this mapping holds it where the
                # alias is written (a duplicate is named there, not at the anchor, which may be the first one)
                key_node = written.target if isinstance(written, _AliasUse) else written
                if key_node.tag == _MERGE:
                    raise self.fail(key_node, f"YAML merge keys ('<<') are not supported in a policy "
                                              f"(in {_fmt(path)}); write the keys out")
                if not isinstance(key_node, yaml.ScalarNode):
                    raise self.fail(key_node, f"keys in {_fmt(path)} must be plain names, found a "
                                              f"{'list' if isinstance(key_node, yaml.SequenceNode) else 'mapping'}")
                key = self.scalar(key_node, path + ("<key>",))
                if key in first_seen:
                    line, column = _mark(first_seen[key])
                    raise self.fail(written, f"duplicate key {key!r} in {_fmt(path)} (first given at line "
                                             f"{line}, column {column}); give each key once")
                first_seen[key] = written
                self.pos.keys[path + (key,)] = _mark(key_node)
                out[key] = self.walk(value_node, path + (key,))
            return out
        raise self.fail(node, f"unsupported YAML node in {_fmt(path)}")  # pragma: no cover

    def _bad_tag(self, node: yaml.Node, path: tuple) -> str:
        return (f"YAML tag '{_tag_name(node.tag)}' is not allowed in a policy (at {_fmt(path)}); a policy holds "
                "only plain values: strings, numbers, true/false, null, lists and mappings")

    def scalar(self, node: yaml.ScalarNode, path: tuple) -> Any:
        tag = node.tag
        digits = sum(c.isdigit() for c in node.value) if tag == _INT else 0
        if digits > 4000:
            # beyond a float's range in any base (binary included); int() of over 4300 digits even raises
            raise self.fail(node, _too_large_message(path, str(digits)))
        try:
            if tag == _STR:
                return node.value
            if tag == _NULL:
                return None
            if tag == _BOOL:
                return _SCALARS.bool_values[node.value.lower()]
            if tag in (_INT, _FLOAT) and ":" in node.value:
                # YAML 1.1 reads 1:30 as the base-60 number 90: a policy means the text (a name, a mistyped
                # number), which the checks of its key then judge
                return node.value
            if tag == _INT:
                value = _SCALARS.construct_yaml_int(node)
            if tag == _FLOAT:
                return _SCALARS.construct_yaml_float(node)
            if tag == _TIMESTAMP:
                return node.value  # a date-like value stays the string as written
            if tag in (_VALUE, _MERGE) and node.style is None:
                # YAML 1.1 resolves a plain '=' or '<<' to its "value" / "merge" key types; as a value (or, for
                # '=', a key) here they can only be the text written (merge keys are refused in walk())
                return node.value
        except (KeyError, ValueError, TypeError):
            raise self.fail(node, f"invalid {_tag_name(tag)} value {node.value!r} at {_fmt(path)}") from None
        if tag == _INT:
            message = _too_large_int(value, path)
            if message is not None:
                raise self.fail(node, message)
            if _YAML11_OCTAL.match(node.value):
                decimal = int(node.value.replace("_", ""), 10)
                if decimal != value:
                    raise self.fail(node, f"{_fmt(path)}: {node.value} has a leading zero, which makes it the octal "
                                          f"number {value} in YAML 1.1 (read here) but {decimal} in YAML 1.2; "
                                          f"write {value} or {decimal}, without the leading zero")
            return value
        raise self.fail(node, self._bad_tag(node, path))


def _plain(obj: Any, path: tuple, pos: _Positions, depth: int) -> Any:
    """A deep copy of dict input as plain data; anything but plain values is an error naming its path."""
    if depth > 64:
        raise pos.error(f"the policy is nested too deeply at {_fmt(path)}", path)
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, str):
        # a str subclass (an enum.StrEnum member, a user's str type) as the plain string it holds: str(obj) may
        # be another text (an Enum's 'Color.RED'), and YAML cannot dump the subclass
        return str.__str__(obj)
    if isinstance(obj, numbers.Integral):
        message = _too_large_int(int(obj), path)
        if message is not None:
            raise pos.error(message, path)
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj)
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if not (key is None or isinstance(key, (str, int, float, bool))):
                raise pos.error(f"keys in {_fmt(path)} must be strings, found {_type_name(key)} {key!r}", path)
            key = _plain(key, path, pos, depth + 1)
            out[key] = _plain(value, path + (key,), pos, depth + 1)
        return out
    if isinstance(obj, (list, tuple)):
        return [_plain(v, path + (i,), pos, depth + 1) for i, v in enumerate(obj)]
    raise pos.error(f"{_fmt(path)}: unsupported value of type {_type_name(obj)} ({obj!r:.60}); a policy holds "
                    "only plain values: strings, numbers, booleans, None, lists and dicts", path)


def _type_name(obj: Any) -> str:
    """The name of ``obj``'s type, qualified by its module unless built in (NumPy's bool is ``numpy.bool``, not
    ``bool``)."""
    kind = type(obj)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


# ----------------------------------------------------------------------------------------------- validation

_TOP_KEYS = ("orthofx", "description", "capture", "rules")
_CAPTURE_KEYS = ("mode", "leaf_modules")
_RULE_KEYS = ("name", "match", "apply", "with", "optional")
_MATCH_KEYS = ("type", "name", "exclude", "where", "op", "feeds", "kind")


def _fmt(path: tuple) -> str:
    out = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "the top level"


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value!r})" if len(value) <= 40 else "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


#: Words other tools use for a key of a policy, too far from it in spelling for difflib to suggest it.
_KEY_SYNONYMS = {
    **dict.fromkeys(("params", "parameters", "args", "kwargs", "options", "config", "settings"), "with"),
    **dict.fromkeys(("pass", "use", "run", "transform", "action"), "apply"),
    **dict.fromkeys(("select", "selector", "selectors", "filter", "when", "target", "targets"), "match"),
    **dict.fromkeys(("leaf", "leaves", "leafs", "leaf_module"), "leaf_modules"),
    **dict.fromkeys(("class", "classes", "module_type", "layer_type"), "type"),
}


#: Top-level keys other tools take to build on another file; a policy holds all its rules itself.
#: ('base' is left out: it is also where YAML users keep anchors for merge keys)
_EXTENDING_KEYS = ("extends", "extend", "include", "includes", "inherit", "inherits", "preset", "presets", "import",
                   "imports")


def _extending_hint(value: Any) -> str:
    """How to build on a preset or another policy (``value``: what the policy tried to extend or include), as the end
    of an error message.

    >>> _extending_hint("svd")[:78]
    ' (a policy cannot extend or include another: copy its rules into rules:, e.g. '
    """
    named = [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str) and v in _preset_files()]
    source = f"Policy.preset({named[0]!r})" if named else "Policy.load(other)"
    shown = f"those orthofx.{source}.to_yaml() prints" if named else "those of the other policy"
    return (f" (a policy cannot extend or include another: copy its rules into rules:, e.g. {shown}, or in Python "
            f"concatenate them: Policy.from_dict({{'rules': [*{source}.to_dict()['rules'], ...]}}))")


def _check_keys(mapping: dict, allowed: tuple[str, ...], path: tuple, pos: _Positions, where: str,
                extra: str = "") -> None:
    for key in mapping:
        if key not in allowed:
            hint = _misplaced_key_hint(key, path, mapping) or _did_you_mean(key, allowed)
            if key == "version" and "orthofx" in allowed and not hint:
                hint = " (the schema version is given as 'orthofx: 1')"
            synonym = _KEY_SYNONYMS.get(key.lower()) if isinstance(key, str) else None
            if not hint and synonym in allowed:
                hint = f" (did you mean '{synonym}'?)"
            if not hint and not path and isinstance(key, str) and key.lower() in _EXTENDING_KEYS:
                hint = _extending_hint(mapping[key])
            raise pos.error(f"unknown key {key!r} {where}{extra}; allowed: {', '.join(allowed)}{hint}",
                            path + (key,), key=True)


def _misplaced_key_hint(key: Any, path: tuple, mapping: dict) -> str:
    """Where ``key``, unknown in the mapping at ``path``, belongs when it is a key of another level of the policy
    (one level of indentation off is the usual YAML slip): a capture key at the top level, a selector beside
    ``match``, a pass parameter beside ``with``, a rule key inside ``match``; ``""`` otherwise. Named before the
    closest spelling, which for ``weight`` beside ``apply`` would be ``with``.

    >>> _misplaced_key_hint("weight", ("rules", 0), {"apply": "orth_regularizer"})
    " ('weight' is a parameter of orth_regularizer: put it under the rule's with:, as in with: {weight: ...})"
    """
    if not isinstance(key, str):
        return ""
    depth = len(path)
    if depth == 0:
        if key in _CAPTURE_KEYS:
            return f" ('{key}' belongs under capture:, as in capture: {{{key}: ...}})"
        if key in _RULE_KEYS + _MATCH_KEYS:
            return f" ('{key}' belongs in a rule, under rules:, as in rules: [{{match: ..., apply: ...}}])"
        return ""
    if depth == 2 and path[0] == "rules":  # a rule
        apply = mapping.get("apply")
        passes = _registry.available_passes()
        owners = _passes_taking(key, passes)
        if key in _MATCH_KEYS:
            # a key that is both a selector and a parameter (kind: jacobian_isometry's full|partial|offdiag):
            # beside apply: it may be either, and which one is the user's to say
            if apply in owners:
                return (f" ('{key}' is both a selector and a parameter of {apply}: put it under the rule's with: "
                        f"for the parameter, as in with: {{{key}: ...}}, or under match: for the selector, as in "
                        f"match: {{{key}: ...}})")
            if owners and not (isinstance(apply, str) and apply in passes):  # no pass named (or a misspelt one)
                return (f" ('{key}' is a selector, which goes under the rule's match:, as in match: {{{key}: ...}}, "
                        f"and a parameter of {first_few(owners, 4)}, which goes under with:)")
            return f" ('{key}' is a selector: put it under the rule's match:, as in match: {{{key}: ...}})"
        if apply in owners:
            return f" ('{key}' is a parameter of {apply}: put it under the rule's with:, as in with: {{{key}: ...}})"
        if owners:
            return (f" ('{key}' is a parameter of {first_few(owners, 4)}{f' (not of {apply})' if apply else ''}, "
                    "which passes take under with:)")
        return ""
    if depth == 3 and path[0] == "rules" and path[2] == "match" and key in _RULE_KEYS:
        return f" ('{key}' belongs to the rule, beside match:, not inside it)"
    return ""


def _build_policy(data: Any, pos: _Positions, *, require_version: bool) -> Policy:
    if data is None:
        raise pos.error("the policy is empty; it needs at least 'orthofx: 1' and a non-empty 'rules:' list", ())
    if not isinstance(data, dict):
        raise pos.error(f"the top level of a policy must be a mapping with keys {', '.join(_TOP_KEYS)}; "
                        f"found {_describe(data)}", ())
    data = _drop_nulls(data, require_version=require_version)
    _check_keys(data, _TOP_KEYS, (), pos, "at the top level")

    if "orthofx" in data:
        version = data["orthofx"]
        if isinstance(version, bool) or not isinstance(version, int) or version != SCHEMA_VERSION:
            shown = repr(version) if isinstance(version, (int, float, str)) else _describe(version)
            raise pos.error(f"unsupported policy schema version {shown} (key 'orthofx'); this orthofx reads "
                            f"version {SCHEMA_VERSION}: write 'orthofx: {SCHEMA_VERSION}'", ("orthofx",))
    elif require_version:
        raise pos.error(f"missing schema version: add 'orthofx: {SCHEMA_VERSION}' at the top of the policy", ())

    description = data.get("description", "")
    if not isinstance(description, str):
        raise pos.error(f"description must be a string, found {_describe(description)}", ("description",))

    capture = _build_capture(data["capture"], pos) if "capture" in data else CaptureConfig()

    if "rules" not in data:
        raise pos.error("missing 'rules': a policy needs a non-empty list of rules "
                        "(each with 'match' and 'apply')", ())
    raw_rules = data["rules"]
    if not isinstance(raw_rules, list):
        raise pos.error(f"rules must be a list of rules (each with 'match' and 'apply'), found "
                        f"{_describe(raw_rules)}", ("rules",))
    if not raw_rules:
        raise pos.error("rules is empty; a policy needs at least one rule", ("rules",))

    if len(raw_rules) > 1:  # one rule needs no name to be told apart
        pos.rule_names.update(
            (i, raw["name"]) for i, raw in enumerate(raw_rules)
            if isinstance(raw, dict) and isinstance(raw.get("name"), str) and raw["name"].strip()
            and raw["name"] != _default_rule_name(raw.get("apply"), i))
    rules = [_build_rule(raw, i, pos) for i, raw in enumerate(raw_rules)]
    seen: dict[str, int] = {}
    for rule in rules:
        if rule.name in seen:
            first = rules[seen[rule.name]]
            at = f" (line {first.location.line})" if first.location.line is not None else ""
            path = ("rules", rule.index, "name")
            if "name" in raw_rules[rule.index]:
                raise pos.error(f"duplicate rule name {rule.name!r} in rules[{rule.index}]; already used by "
                                f"rules[{first.index}]{at}; rule names must be unique", path)
            # this rule has no name: its default one, '<apply>[<index>]', is what an earlier rule was named
            raise pos.error(f"rules[{rule.index}] has no name, and its default name {rule.name!r} "
                            f"('<apply>[<index>]') is already the name of rules[{first.index}]{at}; rule names must "
                            f"be unique: rename rules[{first.index}] or give rules[{rule.index}] a name", path)
        seen[rule.name] = rule.index
    return Policy(version=SCHEMA_VERSION, capture=capture, rules=rules, description=description, source=pos.file)


def _build_capture(raw: Any, pos: _Positions) -> CaptureConfig:
    path = ("capture",)
    if not isinstance(raw, dict):
        raise pos.error(f"capture must be a mapping with keys {', '.join(_CAPTURE_KEYS)}, found {_describe(raw)}",
                        path)
    _check_keys(raw, _CAPTURE_KEYS, path, pos, "in capture")
    mode = raw.get("mode", "auto")
    if not isinstance(mode, str) or mode not in CAPTURE_MODES:
        hint = _did_you_mean(mode, CAPTURE_MODES) or _python_none_hint(
            mode, "leave the key out, or write null, for its default auto")
        raise pos.error(f"capture.mode must be one of {', '.join(CAPTURE_MODES)}; found {_describe(mode)}"
                        f"{hint}", path + ("mode",))
    leaves = _strings(raw, "leaf_modules", path, pos, allow_empty=True, paths=True)
    for i, leaf in enumerate(leaves):
        # no class name, class path or module path has an empty dotted part ('a..b', '.a', 'a.')
        if not leaf.strip() or any(c.isspace() for c in leaf) or "" in leaf.split("."):
            raise pos.error(f"capture.leaf_modules[{i}] must be a class name, dotted class path or module "
                            f"name without spaces or empty dotted parts (e.g. MyAttention, mypkg.MyAttention, "
                            f"encoder.layers.0), found {leaf!r}", _elem_path(raw, "leaf_modules", path, i))
    return CaptureConfig(mode=mode, leaf_modules=leaves)


#: The keys with a default, for which null means "not given" (:func:`_drop_nulls`), by where they are written.
#: ``orthofx`` is one of them only in a dict (a YAML policy must state its version); ``rules``, a rule's ``match``
#: and ``apply`` are required; a pass parameter is one unless null is one of its values (``seed: null``).
_DEFAULTED_TOP_KEYS = ("description", "capture")
_DEFAULTED_RULE_KEYS = ("name", "with", "optional")


def _drop_nulls(data: dict, *, require_version: bool) -> dict:
    """The policy's data (the top-level mapping) less every key given as null that has a default: in a policy, null
    (``~``, an empty value, ``None`` in a dict) means "not given", so the key takes its default. The one place
    where null is read that way; the builders then see only keys that were given, and a null left in the data is a
    value: of a required key (an error naming it), in ``where`` (an attribute value), or of a pass parameter that
    takes null. Mappings are copied, never changed; anything malformed is left for the builders to report.

    With ``P`` the parameters of the rule's pass and ``N(p)`` "null is one of p's values", a key ``k`` whose value
    is null is dropped from: the top level when ``k`` is description or capture (or orthofx, for a dict), capture
    (every key), a rule when ``k`` is name, with or optional, its match (every key), its ``with`` when ``k`` is in
    ``P`` and not ``N(k)``. Example::

        from orthofx.policy import _drop_nulls
        data = {"description": None, "rules": [{"name": None, "match": {"type": "Conv2d", "kind": None},
                                                "apply": "orth_regularizer", "with": {"weight": None}}]}
        assert _drop_nulls(data, require_version=True) == {
            "rules": [{"match": {"type": "Conv2d"}, "apply": "orth_regularizer", "with": {}}]}
        assert data["description"] is None  # the input is left as it was
    """
    out = _without_nulls(data, _DEFAULTED_TOP_KEYS + (() if require_version else ("orthofx",)))
    if isinstance(out.get("capture"), dict):
        out["capture"] = _without_nulls(out["capture"], _CAPTURE_KEYS)
    if isinstance(out.get("rules"), list):
        out["rules"] = [_rule_without_nulls(rule) for rule in out["rules"]]
    return out


def _rule_without_nulls(raw: Any) -> Any:
    """:func:`_drop_nulls` for one rule."""
    if not isinstance(raw, dict):
        return raw
    rule = _without_nulls(raw, _DEFAULTED_RULE_KEYS)
    if isinstance(rule.get("match"), dict):
        rule["match"] = _without_nulls(rule["match"], _MATCH_KEYS)
    apply = rule.get("apply")
    pass_cls = _registry.available_passes().get(apply) if isinstance(apply, str) else None
    if pass_cls is not None and isinstance(rule.get("with"), dict):
        spec = pass_cls.param_spec()
        rule["with"] = _without_nulls(rule["with"], tuple(k for k, p in spec.items() if type(None) not in p.types))
    return rule


def _without_nulls(mapping: dict, keys: tuple) -> dict:
    """A copy of ``mapping`` less the ``keys`` whose value is null (other keys, null or not, are kept)."""
    return {key: value for key, value in mapping.items() if not (value is None and key in keys)}


_OBJECT_FILE = "<Policy object>"
_OBJECT_NOTE = (" (checked when the Policy is used: it was built or changed in code, where its dataclasses check "
                "nothing, and a rule's with: values are its params; fix the field, or build the policy with "
                "Policy.from_dict, which fills in the defaults)")


def _check_policy_object(policy: Policy) -> None:
    """Raise the :class:`PolicyError` :meth:`Policy.from_dict` would raise for the content of ``policy``, a Policy
    object that code may have built or changed field by field: without this a pass ran with a value no rule could
    hold (``params["weight"] = -1``: a regulariser rewarding non-orthogonal weights, silently), a ``Match(type=
    "Conv2d")`` selected the classes 'C', 'o', 'n' ..., and a rule whose ``params`` lacked a default failed inside
    its pass with a bare KeyError. Each rule's ``params`` (what passes read) are checked as its ``with:``; they must
    hold every parameter of the pass, and ``op`` / ``feeds`` the canonical names that sites carry. The check reads
    the policy only."""
    pos = _Positions(_OBJECT_FILE)
    try:
        with warnings.catch_warnings():  # a regular expression's note was given when the policy was loaded
            warnings.simplefilter("ignore", OrthofxWarning)
            _check_object_fields(policy, pos)
    except PolicyError as e:
        raise PolicyError(e.reason + _OBJECT_NOTE, file=e.file, line=e.line, column=e.column) from None


def _object_strings(value: Any, path: tuple, pos: _Positions) -> list:
    """A tuple-of-strings field of a Policy object as a list; a bare string is refused (iterating it would give its
    characters), so are other non-sequences; the entries are left for the policy's own checks."""
    if isinstance(value, (tuple, list)):
        return list(value)
    shown = f"a string ({value!r})" if isinstance(value, str) else _type_name(value)
    fix = f": write ({value!r},)" if isinstance(value, str) else ""
    raise pos.error(f"{_fmt(path)} must be a tuple of strings, found {shown}{fix}", path)


def _check_object_fields(policy: Policy, pos: _Positions) -> None:
    capture = policy.capture
    if not isinstance(capture, CaptureConfig):
        raise pos.error(f"capture must be a CaptureConfig, found {_type_name(capture)}", ("capture",))
    raw_capture = {"mode": capture.mode,
                   "leaf_modules": _object_strings(capture.leaf_modules, ("capture", "leaf_modules"), pos)}
    rules = policy.rules
    if not isinstance(rules, (list, tuple)):
        raise pos.error(f"rules must be a list of Rule objects, found {_type_name(rules)}", ("rules",))
    raw_rules = []
    for i, rule in enumerate(rules):
        path = ("rules", i)
        if not isinstance(rule, Rule):
            raise pos.error(f"{_fmt(path)} must be a Rule, found {_type_name(rule)}", path)
        if not isinstance(rule.name, str):  # null would read as "not given" below, and the default name be checked
            raise pos.error(f"{_fmt(path)}.name must be a non-empty string, found {_describe(rule.name)}",
                            path + ("name",))
        match = rule.match
        if not isinstance(match, Match):
            raise pos.error(f"{_fmt(path + ('match',))} must be a Match, found {_type_name(match)}", path + ("match",))
        raw_match: dict[str, Any] = {}
        for key in ("type", "name", "exclude", "op", "feeds"):
            values = _object_strings(getattr(match, key), path + ("match", key), pos)
            if values:
                raw_match[key] = values
        if not isinstance(match.where, Mapping):
            raise pos.error(f"{_fmt(path + ('match', 'where'))} must be a dict, found {_type_name(match.where)}",
                            path + ("match", "where"))
        if match.where:
            raw_match["where"] = {k: _untuple(v) for k, v in match.where.items()}
        if match.kind is not None:
            raw_match["kind"] = match.kind
        if not isinstance(rule.params, Mapping):
            raise pos.error(f"{_fmt(path + ('with',))} (the rule's params) must be a dict, found "
                            f"{_type_name(rule.params)}", path + ("with",))
        raw_rules.append({"name": rule.name, "match": raw_match, "apply": rule.apply, "with": _checked_with(rule),
                          "optional": rule.optional})
    data = _plain({"orthofx": policy.version, "description": policy.description, "capture": raw_capture,
                   "rules": raw_rules}, (), pos, 0)
    if not raw_rules:  # a policy without rules changes nothing (from_dict refuses one; a frozen model's holds none)
        _build_capture(data["capture"], pos)
        return
    built = _build_policy(data, pos, require_version=True)
    for i, (rule, checked) in enumerate(zip(rules, built.rules)):
        missing = [key for key in checked.params if key not in rule.params]
        if missing:
            raise pos.error(f"rules[{i}].params lack {', '.join(map(repr, missing))} of pass {rule.apply!r}, which "
                            "the pass reads", ("rules", i, "with"))
        for key in ("op", "feeds"):
            written, canonical = tuple(getattr(rule.match, key)), getattr(checked.match, key)
            if written != canonical:
                raise pos.error(f"rules[{i}].match.{key} holds {list(written)}, but sites are named by the canonical "
                                f"op names {list(canonical)} (Policy.from_dict turns aliases into them)",
                                ("rules", i, "match", key))
        _check_given_params(rule, i, pos)


def _checked_with(rule: Rule) -> dict[str, Any]:
    """What the check of a Policy object reads as ``rule``'s ``with:``. Its ``params`` are what the pass's
    ``validate_params`` made of what was written (``given_params``), which :meth:`Policy.to_yaml` writes; they are
    read as written values (so that ``params["weight"] = -1`` gets the message of ``with: {weight: -1}``) only
    where that means something: where they are not exactly what ``given_params`` give (:func:`_replays_params`),
    and the pass validates with :meth:`Pass.validate_params` itself, which takes back its own output unchanged. A
    custom pass's own ``validate_params`` may turn a value into another (``'a,b'`` into a list, a fraction into a
    percentage) that it would refuse, or turn again, as input: ``given_params`` are read then, and
    :func:`_check_given_params` says where ``params`` differ from what they give."""
    given = rule.given_params
    if not isinstance(given, Mapping):  # _check_given_params names it
        return dict(rule.params)
    if _replays_params(rule):
        return dict(given)
    try:
        validate = rule.pass_class.validate_params
    except KeyError:  # an unknown pass: the check of apply names it
        return dict(rule.params)
    own = getattr(validate, "__func__", validate) is not Pass.validate_params.__func__
    return dict(given) if own else dict(rule.params)


def _replays_params(rule: Rule) -> bool:
    """Whether ``rule.params`` are exactly what its pass's ``validate_params`` makes of ``rule.given_params`` (what
    :meth:`Policy.to_yaml` writes under ``with:``), as for every rule read by :meth:`Policy.from_dict`. Such params
    need no check of their own, and checking them as ``with:`` would be wrong where ``validate_params`` converts
    values (a custom pass's ``'a,b'`` -> ``['a', 'b']``): it need not accept, or keep, its own output. Any
    failure (given_params not a mapping, an unknown pass, a value refused) is ``False``, left for the checks of
    params and given_params to name."""
    given, params = rule.given_params, rule.params
    if not isinstance(given, Mapping) or not isinstance(params, Mapping) or not isinstance(rule.apply, str):
        return False
    try:
        replayed = rule.pass_class.validate_params(_plain(dict(given), (), _Positions(None), 0))
    except (PolicyError, KeyError, ValueError, TypeError):
        return False
    try:
        return set(replayed) == set(params) and all(bool(replayed[key] == params[key]) for key in params)
    except (TypeError, ValueError, RuntimeError):  # an == that raises, or gives no truth value (a tensor's)
        return False


def _check_given_params(rule: Rule, i: int, pos: _Positions) -> None:
    """``rule.given_params`` (what :meth:`Policy.to_yaml`, hence a ``.pt`` file, writes under ``with:``) must give
    the pass the values ``rule.params`` (what the pass reads) holds: after ``p.rules[0].params["weight"] = 0.5``
    alone, transform ran with 0.5 and ``orthofx.load`` replayed the file's policy with the old weight."""
    path = ("rules", i, "with")
    given = rule.given_params
    if not isinstance(given, Mapping):
        raise pos.error(f"rules[{i}].given_params must be a dict, found {_type_name(given)}", path)
    try:
        replayed = rule.pass_class.validate_params(_plain(dict(given), path, pos, 0))
    except (KeyError, ValueError, TypeError) as e:
        raise pos.error(f"rules[{i}].given_params (what to_yaml and .pt files write): "
                        f"{e.args[0] if e.args else e}", path) from None
    differ = [key for key in rule.params if replayed[key] != rule.params[key]]
    if differ:
        shown = ", ".join(f"{key!r}: params {rule.params[key]!r}, given_params "
                          + (repr(given[key]) if key in given else "leave it out (the default)") for key in differ)
        raise pos.error(f"rules[{i}].params and rules[{i}].given_params, which to_yaml and .pt files write (orthofx."
                        f"load replays them), disagree ({shown}); set both", path + (differ[0],))


def _elem_path(mapping: dict, key: str, path: tuple, i: int) -> tuple:
    return path + (key, i) if isinstance(mapping.get(key), list) else path + (key,)


def _strings(mapping: dict, key: str, path: tuple, pos: _Positions, *, allow_empty: bool,
             paths: bool = False) -> tuple[str, ...]:
    """``mapping[key]`` as a tuple of non-empty strings (a single string or a list of strings accepted); ``()``
    when the key is absent. ``paths``: the strings are module paths or patterns of them (``name``, ``exclude``,
    ``leaf_modules``), where a number is a path written unquoted (:func:`_unquoted_path_hint`)."""
    if key not in mapping:
        return ()
    value = mapping[key]
    here = path + (key,)
    if isinstance(value, str):
        values = [value]
    elif isinstance(value, list):
        if not value and not allow_empty:
            raise pos.error(f"{_fmt(here)} is an empty list; give at least one value or leave the key out", here)
        values = value
    else:
        raise pos.error(f"{_fmt(here)} must be a string or a list of strings, found {_describe(value)}"
                        + (_unquoted_path_hint(value) if paths else ""), here)
    for i, item in enumerate(values):
        item_path = _elem_path(mapping, key, path, i)
        if not isinstance(item, str):
            raise pos.error(f"{_fmt(item_path)} must be a string, found {_describe(item)}"
                            + (_unquoted_path_hint(item) if paths else ""), item_path)
        if not item:
            raise pos.error(f"{_fmt(item_path)} is an empty string", item_path)
    return tuple(values)


def _unquoted_path_hint(value: Any) -> str:
    """For a number where a module path is expected: the children of an ``nn.Sequential`` or ``nn.ModuleList`` are
    named ``'0'``, ``'1'`` ..., which YAML reads unquoted as numbers (``name: 0``), so the path must be quoted.

    >>> _unquoted_path_hint(0)[:15], _unquoted_path_hint(True)
    ("; quote it: '0'", '')
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return ""
    fix = f"quote it: '{value}'" if isinstance(value, int) else "write the path in quotes, as it is named"
    return (f"; {fix} (YAML reads it unquoted as a number; the children of an nn.Sequential or nn.ModuleList are "
            "named '0', '1' ...)")


def _build_rule(raw: Any, index: int, pos: _Positions) -> Rule:
    path = ("rules", index)
    label = _fmt(path)
    if not isinstance(raw, dict):
        hint = _extending_hint(raw.strip()) if isinstance(raw, str) and raw.strip() in _preset_files() else ""
        raise pos.error(f"{label} must be a mapping with keys 'match' and 'apply' (optionally name, with, "
                        f"optional); found {_describe(raw)}{hint}", path)
    _check_keys(raw, _RULE_KEYS, path, pos, f"in {label}")

    if "match" not in raw:
        raise pos.error(f"{label} has no 'match': say which sites the rule selects, e.g. match: {{type: Conv2d}}",
                        path)
    passes = _registry.available_passes()
    if "apply" not in raw:
        inside = isinstance(raw["match"], dict) and "apply" in raw["match"]
        if inside:  # one level of indentation too deep: under match, where _build_match would call it unknown
            raise pos.error(f"{label} has no 'apply', but its match: holds one: 'apply' belongs to the rule, beside "
                            "match:, not inside it", path + ("match", "apply"), key=True)
        raise pos.error(f"{label} has no 'apply': name the pass to run; available: {', '.join(passes) or 'none'}",
                        path)
    apply = raw["apply"]
    if not isinstance(apply, str) or apply not in passes:
        # no close name: likely a pass of the user's own, whose module (which registers it) was not imported
        hint = _did_you_mean(apply, passes) or (
            " (a pass of your own must be registered with orthofx.passes.register_pass, i.e. the module defining "
            "it imported, before the policy is read)" if isinstance(apply, str) else "")
        found = (f"unknown pass {apply!r} in {label}.apply" if isinstance(apply, str) else
                 f"{label}.apply must name a pass, found {_describe(apply)}")
        raise pos.error(f"{found}; available: {', '.join(passes) or 'none'}{hint}", path + ("apply",))
    pass_cls = passes[apply]

    match = _build_match(raw["match"], path + ("match",), pos)
    kind = match.site_kind
    if kind not in pass_cls.site_kinds:
        why = (" (it has 'op')" if match.op and match.kind is None else
               f" (kind: {match.kind})" if match.kind else "")
        raise pos.error(f"pass {apply!r} handles {', '.join(sorted(pass_cls.site_kinds))} sites, but "
                        f"{label}.match selects {kind} sites{why}", path + ("apply",))
    if match.op and pass_cls.ops:
        bad = [op for op in match.op if op not in pass_cls.ops]
        odd = [op for op in pass_cls.ops if op not in CANONICAL_OPS]
        if bad and odd:  # register_pass cannot check them: this module, which defines the names, imports it
            raise pos.error(f"pass {apply!r} declares ops {', '.join(odd)}, which no site is named by: a pass's ops "
                            f"are canonical op names ({', '.join(CANONICAL_OPS)}; orthofx.policy.canonical_op gives "
                            f"them), so it can handle none of {', '.join(bad)} ({label}.match.op)",
                            path + ("match", "op"))
        if bad:
            raise pos.error(f"pass {apply!r} handles the ops {', '.join(pass_cls.ops)}, not {', '.join(bad)} "
                            f"({label}.match.op)", path + ("match", "op"))

    given = raw.get("with", {})
    with_path = path + ("with",)
    if not isinstance(given, dict):
        raise pos.error(f"{label}.with must be a mapping of parameters for pass {apply!r}, found "
                        f"{_describe(given)}", with_path)
    spec = pass_cls.param_spec()
    for key, value in given.items():
        if key not in spec:
            hint = (f" ('{key}' belongs to the rule, beside with:, not inside it)" if key in _RULE_KEYS else
                    _selector_in_with_hint(key, apply, passes) if key in _MATCH_KEYS else
                    _other_pass_hint(key, apply, passes) or _did_you_mean(key, spec))
            raise pos.error(f"unknown key {key!r} in {label}.with for pass {apply!r}; allowed: "
                            f"{', '.join(sorted(spec)) or 'none (the pass takes no parameters)'}{hint}",
                            with_path + (key,), key=True)
        try:
            spec[key].validate(value)
        except (ValueError, TypeError) as e:
            raise pos.error(f"{_fmt(with_path + (key,))}: {e}{_value_hint(spec[key], value)}",
                            with_path + (key,)) from None
    try:
        params = pass_cls.validate_params(copy.deepcopy(given))
    except (KeyError, ValueError, TypeError) as e:
        msg = e.args[0] if e.args else str(e)
        raise pos.error(f"{label}.with: {msg}", with_path) from None

    optional = raw.get("optional", False)
    if not isinstance(optional, bool):
        raise pos.error(f"{label}.optional must be true or false, found {_describe(optional)}"
                        f"{_python_none_hint(optional, 'leave the key out, or write null, for its default false')}",
                        path + ("optional",))

    if "name" in raw:
        name = raw["name"]
        if not isinstance(name, str) or not name.strip():
            raise pos.error(f"{label}.name must be a non-empty string, found {_describe(name)}", path + ("name",))
    else:
        name = _default_rule_name(apply, index)

    return Rule(name=name, match=match, apply=apply, params=copy.deepcopy(params),
                given_params=copy.deepcopy(given), optional=optional, index=index, location=pos.location(path),
                match_location=pos.location(path + ("match",)))


def _passes_taking(key: Any, passes: Mapping[str, type[Pass]], besides: str | None = None) -> list[str]:
    """The names of ``passes`` (but ``besides``) that take ``key`` as a parameter under ``with:``."""
    return [name for name, cls in passes.items() if name != besides and key in cls.param_spec()]


def _other_pass_hint(key: Any, apply: str, passes: Mapping[str, type[Pass]]) -> str:
    """The passes other than ``apply`` that take ``key`` under ``with:`` (a parameter given to the wrong pass:
    ``on_impossible`` under ``orth_regularizer``), as a hint for the unknown-key error; ``""`` when none does.

    >>> from orthofx.passes.registry import available_passes
    >>> _other_pass_hint("on_impossible", "orth_regularizer", available_passes())
    " ('on_impossible' is a parameter of orthogonal_conv, not of orth_regularizer)"
    """
    owners = _passes_taking(key, passes, besides=apply)
    if not owners:
        return ""
    return f" ({key!r} is a parameter of {first_few(owners, 4)}, not of {apply})"


def _selector_in_with_hint(key: str, apply: str, passes: Mapping[str, type[Pass]]) -> str:
    """The hint for a selector (``kind``) written under ``with:`` of a pass that does not take it: it belongs under
    ``match:``, unless another pass was meant that has a parameter of that name (jacobian_isometry's ``kind``).

    >>> from orthofx.passes.registry import available_passes
    >>> _selector_in_with_hint("kind", "orth_regularizer", available_passes()).split("; ")[1]
    'it is also a parameter of jacobian_isometry, not of orth_regularizer)'
    """
    owners = _passes_taking(key, passes, besides=apply)
    also = f"; it is also a parameter of {first_few(owners, 4)}, not of {apply}" if owners else ""
    return f" ('{key}' is a selector: put it under the rule's match:{also})"


def _param_choice_hint(key: str, value: Any) -> str:
    """The hint for a selector's value that is not one of the selector's but is a choice of a pass parameter of the
    same name (``match: {kind: partial}`` for jacobian_isometry's ``with: {kind: partial}``); ``""`` otherwise.

    >>> _param_choice_hint("kind", "offdiag")
    " ('offdiag' is a value of the parameter 'kind' of jacobian_isometry, which goes under the rule's with:)"
    """
    owners = [name for name, cls in _registry.available_passes().items()
              if isinstance(value, str) and value in (getattr(cls.param_spec().get(key), "choices", None) or ())]
    if not owners:
        return ""
    return (f" ({value!r} is a value of the parameter '{key}' of {first_few(owners, 4)}, which goes under the "
            "rule's with:)")


#: YAML's spellings of true and false (YAML 1.1, as PyYAML reads them), lower case -> the value.
_BOOL_WORDS: dict[str, bool] = dict(yaml.constructor.SafeConstructor.bool_values)


def _value_hint(param: Any, value: Any) -> str:
    """The likely slip behind a pass parameter's value that ``param`` (a :class:`~orthofx.passes.base.Param`)
    refused, as a hint for its error; ``""`` when there is none to name: a number or boolean written in quotes
    (``weight: '1e-2'`` is a string), an integer parameter given a float with an integer value (``fit_steps: 1e3``,
    which YAML reads as the float 1000.0), a choice in another case or misspelt (``method: Taylor``). A fix is
    named only where its result is accepted: quotes to remove where the text unquoted reads as an accepted value
    (``fit_steps: '1e3'`` unquoted is the float 1000.0, so the hint is the integer 1000; ``'1.5'`` is no integer).

    >>> from orthofx.passes.base import Param
    >>> _value_hint(Param("weight", 0.01, (float,)), "1e-2")
    '; a number in quotes is a string: write 1e-2 without quotes'
    >>> _value_hint(Param("fit_steps", 0, (int,), minimum=0), 1000.0)
    '; write the integer 1000, without a decimal point or exponent'
    >>> _value_hint(Param("fit_steps", 0, (int,), minimum=0), "1e3")
    '; write the integer 1000, without quotes, a decimal point or exponent'
    """
    types = tuple(getattr(param, "types", ()))
    choices = getattr(param, "choices", None)
    # null is a value of the parameter, or (dropped while reading) the way to ask for its default
    none_hint = _python_none_hint(value, "write null (or ~) for null" if type(None) in types or None in (choices or ())
                                  else f"leave the parameter out, or write null, for its default "
                                       f"{getattr(param, 'default', None)!r}")
    if choices is not None:
        if isinstance(value, bool) and not any(isinstance(c, bool) for c in choices):
            # 'free: no' or 'weight: off' meant as a word: YAML 1.1 (PyYAML) reads it as false
            return "; YAML reads yes, no, on and off (also y and n) as true / false: write one of the choices"
        close = _did_you_mean(value, [c for c in choices if isinstance(c, str)]) if isinstance(value, str) else ""
        return close or none_hint
    if none_hint:
        return none_hint
    if isinstance(value, str):
        text = value.strip()
        if bool in types and text.lower() in _BOOL_WORDS:
            word = "true" if _BOOL_WORDS[text.lower()] else "false"
            return f"; true and false in quotes are strings: write {word} without quotes"
        if float in types or int in types:
            prefixed = _prefixed_integer_hint(param, text)
            if prefixed:
                return prefixed
            # what the text reads as unquoted: a quote to remove is a fix only where that value is accepted
            # (fit_steps: '1e3' unquoted is the float 1000.0, refused too)
            number = _read_unquoted(text)
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
                return ""
            if _accepted(param, number):
                return f"; a number in quotes is a string: write {text} without quotes"
            if isinstance(number, float) and int in types and float not in types:
                if number != int(number):
                    return f"; {text} is not an integer, with or without quotes"
                if _accepted(param, int(number)):
                    return f"; write the integer {int(number)}, without quotes, a decimal point or exponent"
        return ""
    if (isinstance(value, float) and int in types and float not in types and math.isfinite(value)
            and value == int(value) and _accepted(param, int(value))):
        return f"; write the integer {int(value)}, without a decimal point or exponent"
    return ""


#: An integer with a base prefix in a spelling YAML 1.1 (PyYAML, which policies are read with) reads as a string:
#: YAML 1.2's octal ``0o17``, and ``0X1F`` / ``0B11`` (YAML 1.1 reads ``0x1f`` and ``0b11``, lower case only).
_STRING_PREFIXED_INTEGER = re.compile(r"[-+]?0(?:[oO][0-7_]+|X[0-9a-fA-F_]+|B[01_]+)")


def _prefixed_integer_hint(param: Any, text: str) -> str:
    """For a parameter taking a number given ``text``, a string: when it is an integer with a base prefix that
    YAML 1.1 does not read (:data:`_STRING_PREFIXED_INTEGER`), the hint to write its decimal value (only where that
    value is accepted); ``""`` otherwise.

    >>> from orthofx.passes.base import Param
    >>> _prefixed_integer_hint(Param("seed", None, (int, type(None)), minimum=0), "0o17").endswith("decimal 15")
    True
    """
    if not _STRING_PREFIXED_INTEGER.fullmatch(text):
        return ""
    try:
        number = int(text.replace("_", ""), 0)
    except ValueError:  # digits of underscores only ('0o_')
        return ""
    if not _accepted(param, number):
        return ""
    octal = text.lstrip("+-")[1] in "oO"
    why = ("octal is written 017 there, and a 0o prefix is read as text" if octal else
           "it reads the 0x and 0b prefixes in lower case only")
    return f"; {text} is no integer in YAML 1.1, which policies are read with ({why}): write the decimal {number}"


def _python_none_hint(value: Any, fix: str) -> str:
    """For ``None`` written in a YAML policy (Python's spelling of null), which YAML reads as the string 'None':
    the hint with ``fix``, as the end of an error message; ``""`` for any other value.

    >>> _python_none_hint("None", "leave the key out")
    "; None is no null in YAML but the string 'None': leave the key out"
    """
    if not (isinstance(value, str) and value.strip() == "None"):
        return ""
    return f"; None is no null in YAML but the string 'None': {fix}"


def _read_unquoted(text: str) -> Any:
    """What a policy reads ``text`` as, written without quotes (``1e3``: the float 1000.0); ``None`` where it reads
    it as null or refuses it (``010``, an ambiguous octal).

    >>> _read_unquoted("1e3"), _read_unquoted("2"), _read_unquoted("1:20")
    (1000.0, 2, '1:20')
    """
    try:
        return _parse_yaml(text, "<value>")[0]
    except PolicyError:
        return None


def _accepted(param: Any, value: Any) -> bool:
    """Whether ``param`` (a :class:`~orthofx.passes.base.Param`) accepts ``value``."""
    try:
        param.validate(value)
    except (ValueError, TypeError):
        return False
    return True


def _build_match(raw: Any, path: tuple, pos: _Positions) -> Match:
    label = _fmt(path)
    if not isinstance(raw, dict):
        raise pos.error(f"{label} must be a mapping of selectors ({', '.join(_MATCH_KEYS)}), found "
                        f"{_describe(raw)}", path)
    _check_keys(raw, _MATCH_KEYS, path, pos, f"in {label}")

    types = _strings(raw, "type", path, pos, allow_empty=False)
    for i, type_name in enumerate(types):
        # "<locals>" appears in the qualified name of a class defined inside a function
        if not all(part.isidentifier() or part == "<locals>" for part in type_name.split(".")):
            item_path = _elem_path(raw, "type", path, i)
            raise pos.error(f"{_fmt(item_path)}: {type_name!r} is not a class name or dotted class path "
                            "(e.g. Conv2d or mypkg.blocks.MyBlock)", item_path)

    names = _patterns(raw, "name", path, pos, allow_empty=False)
    exclude = _patterns(raw, "exclude", path, pos, allow_empty=True)

    where: dict[str, Any] = {}
    if "where" in raw:
        raw_where = raw["where"]
        where_path = path + ("where",)
        if not isinstance(raw_where, dict):
            raise pos.error(f"{label}.where must be a mapping of attribute name -> value (e.g. {{groups: 1}}), "
                            f"found {_describe(raw_where)}", where_path)
        for attr, value in raw_where.items():
            attr_path = where_path + (attr,)
            if not isinstance(attr, str) or not attr.isidentifier():
                raise pos.error(f"{label}.where: {attr!r} is not an attribute name", attr_path, key=True)
            _check_where_value(value, attr_path, pos)
            where[attr] = _tuple(value)

    ops = _ops(raw, "op", path, pos)
    feeds = _ops(raw, "feeds", path, pos)

    kind = raw.get("kind")
    if kind is not None and (not isinstance(kind, str) or kind not in MATCH_KINDS):
        hint = (_did_you_mean(kind, MATCH_KINDS) or _param_choice_hint("kind", kind)
                or _python_none_hint(kind, "leave the key out, or write null, for the kind the other selectors imply"))
        raise pos.error(f"{label}.kind must be one of {', '.join(MATCH_KINDS)}; found {_describe(kind)}{hint}",
                        path + ("kind",))

    if ops and feeds:
        raise pos.error(f"{label}: 'op' and 'feeds' cannot be combined ('op' selects the calls, 'feeds' the "
                        "layers feeding them); write two rules", path + ("feeds",), key=True)
    if kind == "function" and not ops:
        raise pos.error(f"{label}.kind 'function' needs 'op' naming the functions (e.g. op: linalg.eigh)",
                        path + ("kind",))
    if ops and kind in ("module", "block"):
        raise pos.error(f"{label}: 'op' selects function calls and cannot be used with kind {kind!r}; "
                        "drop 'kind' or use kind: function", path + ("kind",))
    if feeds and kind in ("function", "block"):
        raise pos.error(f"{label}: 'feeds' selects modules (the layers feeding the calls) and cannot be used "
                        f"with kind {kind!r}; drop 'kind' or use kind: module", path + ("kind",))
    for key in ("type", "where"):
        if ops and raw.get(key):
            raise pos.error(f"{label}: {key!r} filters modules and cannot be combined with 'op' (function "
                            "sites); use 'name' to pick calls by scope", path + (key,), key=True)

    return Match(type=types, name=names, exclude=exclude, where=where, op=ops, feeds=feeds, kind=kind)


def _patterns(raw: dict, key: str, path: tuple, pos: _Positions, *, allow_empty: bool) -> tuple[str, ...]:
    patterns = _strings(raw, key, path, pos, allow_empty=allow_empty, paths=True)
    for i, pattern in enumerate(patterns):
        item_path = _elem_path(raw, key, path, i)
        if not pattern.startswith("re:"):
            at = _unclosed_bracket(pattern)
            if at is not None:  # names hold no '[' (only a ModuleDict key could): such a glob selects nothing
                raise pos.error(f"{_fmt(item_path)}: the '[' at position {at + 1} of the glob {pattern!r} is never "
                                "closed, so it would only match a literal '[' (it would select or leave out nothing "
                                "that way); close the set, as in 'conv[12]', write '[[]' for a literal '[', or use "
                                "'re:' for a regular expression", item_path)
        else:
            regex = pattern[3:]
            if not regex:
                raise pos.error(f"{_fmt(item_path)}: empty regular expression after 're:'", item_path)
            problem, notes = _regex_problem(regex)
            shown = repr(regex) if len(regex) <= 80 else repr(regex[:60]) + "..."
            if problem is not None:
                raise pos.error(f"{_fmt(item_path)}: invalid regular expression {shown}: {problem}", item_path)
            for note in notes:  # re's FutureWarning would name a line of this file, not the policy's
                warnings.warn(f"{pos.location(item_path)}: {_fmt(item_path)}: regular expression {shown}: {note} "
                              "(a later Python may read it otherwise; escape the character with a backslash if it "
                              "is meant literally)", OrthofxWarning, stacklevel=caller_stacklevel())
    return patterns


def _unclosed_bracket(pattern: str) -> int | None:
    """Index of the first '[' of glob ``pattern`` that no ']' closes, ``None`` when every set is closed. Read as
    ``fnmatch`` reads it: after '[' (and '!'), a ']' is a member of the set, not its end; an unclosed '[' is
    matched as a literal '[' character."""
    i, n = 0, len(pattern)
    while i < n:
        if pattern[i] != "[":
            i += 1
            continue
        j = i + 1
        if j < n and pattern[j] == "!":
            j += 1
        if j < n and pattern[j] == "]":
            j += 1
        while j < n and pattern[j] != "]":
            j += 1
        if j >= n:
            return i
        i = j + 1
    return None


def _regex_problem(regex: str) -> tuple[str | None, list[str]]:
    """Why ``regex`` does not compile (``None`` when it does), and the FutureWarnings ``re`` gives about it
    ("Possible nested set at position 1" for ``[[a]``). Besides ``re.error``, Python's parser raises OverflowError
    for a repeat count beyond its limit (``a{99999999999}``) and RecursionError for groups nested hundreds deep:
    both are mistakes in the policy, not in orthofx."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FutureWarning)
        # re keeps the patterns it compiled and gives its warnings only when it parses one: from its cache, a policy
        # loaded a second time in a process (a notebook, a test run) would pass without the note
        re.purge()
        try:
            re.compile(regex)
        except re.error as e:
            return str(e), []
        except OverflowError:
            return "a repeat count in braces is too large (Python's re allows up to 4294967294); use '+' or '*'", []
        except RecursionError:
            return "groups are nested too deeply for Python's re; flatten the expression", []
    return None, [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


def _ops(raw: dict, key: str, path: tuple, pos: _Positions) -> tuple[str, ...]:
    names = _strings(raw, key, path, pos, allow_empty=False)
    out = []
    for i, name in enumerate(names):
        try:
            out.append(canonical_op(name))
        except ValueError as e:
            item_path = _elem_path(raw, key, path, i)
            raise pos.error(f"{_fmt(item_path)}: {e}", item_path) from None
    return tuple(out)


def _check_where_value(value: Any, path: tuple, pos: _Positions) -> None:
    if isinstance(value, dict):
        raise pos.error(f"{_fmt(path)} must be a value or a list of values, found a mapping", path)
    if isinstance(value, float) and math.isnan(value):
        raise pos.error(f"{_fmt(path)} is NaN, which equals no attribute value (the filter could never match); "
                        "give a number", path)
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_where_value(item, path + (i,), pos)
