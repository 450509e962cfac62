"""Sites and rule matching: which rule of a policy applies which pass to which place of a captured graph.

Sites (see :class:`orthofx.passes.Site`):

* module sites: every module the graph calls (``call_module`` nodes), named as in ``model.named_modules()``,
  plus the submodules of modules kept as fx leaves (they have no node of their own, but passes that change only
  weights, such as the L_orth regulariser, still reach them);
* function sites: calls of ``torch.linalg.svd``, ``svdvals``, ``eigh``, ``eigvalsh`` and ``torch.svd``
  (functions and tensor methods, and their ATen ops ``aten.linalg_eigh``, ``aten._linalg_eigh`` ... as
  torch.export records them), named ``"<scope>:<op>"``;
* block sites: submodules that a ``kind: block`` rule names, kept as leaves by capture so the pass sees the
  block as a whole.

Precedence: rules are tried in policy order. Every pass belongs to a *group* (``Pass.group``; passes that
govern a layer's weights, such as ``orth_regularizer`` and ``orthogonal_conv``, share the group ``weight``).
For each site and group, the first rule whose selectors match the site and whose pass accepts it wins;
later rules of the same group that also match are *shadowed* (``explain`` shows by which rule). Rules of
different groups all apply. A rule that matches no site is an error unless it says ``optional: true``.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from tabulate import tabulate
from torch import fx, nn

from .capture import (ModalGraphModule, _is_torch_layer, _ModulePaths, first_module_paths, module_scopes,
                      unwrap_model)
from .errors import (LayerArgumentError, MetaWeightError, OrthofxWarning, PlanError, caller_stacklevel, first_few,
                     first_line)
from .nn import (OrthogonalConv1d, OrthogonalConv2d, OrthogonalConv3d, OrthogonalConvTranspose1d,
                 OrthogonalConvTranspose2d, OrthogonalConvTranspose3d, OrthogonalLinear)
from .nn.convnorm import FROZEN_FILTERS_MARKER, ConvNormConvNd
from .nn.padding import per_dimension
from .passes.base import (RECURRENT_TYPES, TORCH_CONV_TYPES, TORCH_TRANSPOSED_CONV_TYPES, CaptureInfo, Change, Manifest,
                          PassContext, PlanEntry, Site, derived_weight, describe_module, entries_by_rule,
                          reads_only_metadata, require_initialised, stops_producer_walk, weight_label)
from .passes.isometric_init import IsometricInit, _scale, _scale_dropped_later
from .passes.orth_regularizer import frozen_convnorm_owner
from .passes.registry import UnknownPassError, available_passes, get_pass
from .passes.riemannian import Riemannian, StiefelHook, _scale_lost, _tie_decisions, scale_lost_note
from .passes.svd_conditioning import decomposition_op
from .policy import (Match, Policy, Rule, _compiled_regex, _default_rule_name, _describe, _did_you_mean,
                     _python_none_hint, match_pattern)

__all__ = ["Plan", "build_plan", "block_paths", "collect_sites", "describe_module", "other_mode_graph",
           "producers_feeding", "unused_leaf_entries", "unknown_type_entries", "meta_tensors", "meta_text",
           "FUNCTION_OPS"]

#: Callables (functions and tensor methods) recognised as function sites, by canonical op name.
FUNCTION_OPS: dict[Any, str] = {
    torch.linalg.svd: "linalg.svd",
    torch.linalg.svdvals: "linalg.svdvals",
    torch.linalg.eigh: "linalg.eigh",
    torch.linalg.eigvalsh: "linalg.eigvalsh",
    torch.svd: "svd",
}
_METHOD_OPS = {"svd": "svd"}


def _aten_function_ops() -> dict[Any, str]:
    """The ATen overloads of the decompositions (as a torch.export graph or a decomposed graph holds them)."""
    ops: dict[Any, str] = {}
    aten = torch.ops.aten
    for packet, op in (("linalg_eigh", "linalg.eigh"), ("_linalg_eigh", "linalg.eigh"),
                       ("linalg_eigvalsh", "linalg.eigvalsh"), ("linalg_svd", "linalg.svd"),
                       ("_linalg_svd", "linalg.svd"), ("linalg_svdvals", "linalg.svdvals"), ("svd", "svd")):
        overload = getattr(getattr(aten, packet, None), "default", None)
        if overload is not None:
            ops[overload] = op
    return ops


FUNCTION_OPS.update(_aten_function_ops())
# aten._linalg_eigh(A, UPLO, compute_v) and aten._linalg_svd(A, full_matrices, compute_uv, driver) compute only
# the values when their flag is False: then they are eigvalsh / svdvals sites.
_VALUES_ONLY = {
    getattr(getattr(torch.ops.aten, "_linalg_eigh", None), "default", None): (2, "compute_v", "linalg.eigvalsh"),
    getattr(getattr(torch.ops.aten, "_linalg_svd", None), "default", None): (2, "compute_uv", "linalg.svdvals"),
}


# ----------------------------------------------------------------------------------------------- sites

def _op_name(node: fx.Node) -> str | None:
    if node.op == "call_function":
        op = FUNCTION_OPS.get(node.target)
        values_only = _VALUES_ONLY.get(node.target) if op is not None else None
        if values_only is not None:
            index, keyword, values_op = values_only
            flag = node.args[index] if len(node.args) > index else node.kwargs.get(keyword, True)
            if flag is False:
                return values_op
        return op
    if node.op == "call_method":
        return _METHOD_OPS.get(node.target)
    return None


def _scope(node: fx.Node) -> str:
    # The innermost module is the one whose forward made the call.
    return (module_scopes(node) or [""])[-1]


def collect_sites(gm: fx.GraphModule, blocks: Iterable[str] = (), graph: fx.Graph | None = None,
                  mode: str = "") -> list[Site]:
    """Every site of a captured graph (``gm.graph``, or ``graph`` calling ``gm``'s modules), in graph order (see
    the module docstring). ``mode`` marks the sites of a model's other-mode graph (see :class:`Site`)."""
    blocks = set(blocks)
    sites: list[Site] = []
    seen_modules: set[str] = set()
    op_counts: Counter[str] = Counter()
    suffix = f"@{mode}" if mode else ""
    for node in (gm.graph if graph is None else graph).nodes:
        if node.op == "call_module":
            target = str(node.target)
            if target in seen_modules:
                continue
            seen_modules.add(target)
            module = gm.get_submodule(target)
            if isinstance(module, torch.jit.ScriptModule):
                # compiled TorchScript: no pass can rewrite it, and it takes no hooks (transform's shape recording
                # registers one on every site); see scripted_module_warnings
                seen_modules.update(name for name, _ in module.named_modules(prefix=target))
                continue
            sites.append(Site("module", target, type(module).__name__, node.name, type(module), mode))
            if target in blocks:
                sites.append(Site("block", target, type(module).__name__, node.name, type(module), mode))
            # Submodules of a leaf are not in the graph; list them so weight-only passes can reach them. The modules
            # of torch parametrizations are no layers: what they compute is the weight of the layer holding them.
            internals = tuple(f"{name}.parametrizations" for name, sub in module.named_modules(prefix=target)
                              if torch.nn.utils.parametrize.is_parametrized(sub))
            for sub_name, sub in module.named_modules(prefix=target):
                if any(sub_name == p or sub_name.startswith(p + ".") for p in internals):
                    continue
                if sub_name != target and sub_name not in seen_modules:
                    seen_modules.add(sub_name)
                    sites.append(Site("module", sub_name, type(sub).__name__, None, type(sub), mode))
        else:
            op = _op_name(node)
            if op is None:
                continue
            scope = _scope(node)
            base = f"{scope}:{op}" if scope else op
            op_counts[base] += 1
            name = base if op_counts[base] == 1 else f"{base}#{op_counts[base]}"
            sites.append(Site("function", name + suffix, op, node.name, None, mode))
    return sites


def other_mode_graph(gm: fx.GraphModule) -> tuple[fx.Graph, str] | None:
    """``(graph, mode)`` of the other training mode's graph of a two-mode graph module
    (:class:`orthofx.capture.ModalGraphModule`), ``mode`` being ``"train"`` or ``"eval"``; ``None`` otherwise."""
    if not isinstance(gm, ModalGraphModule):
        return None
    return gm.other_graph, gm.other_mode


def mode_graphs(gm: fx.GraphModule) -> list[tuple[fx.Graph, str]]:
    """``(graph, mode)`` of ``gm``'s graph in the mode it is in now (mode ``""``) and, for a two-mode graph module,
    of the other mode's graph (:func:`other_mode_graph`)."""
    other = other_mode_graph(gm)
    return [(gm.graph, "")] if other is None else [(gm.graph_for(gm.graph_training), ""), other]


def called_modules(gm: fx.GraphModule) -> set[str]:
    """The module paths a graph of ``gm`` calls (:func:`mode_graphs`: either mode's of a two-mode graph module)."""
    return {str(node.target) for graph, _ in mode_graphs(gm) for node in graph.nodes if node.op == "call_module"}


def called_module_classes(gm: fx.GraphModule, model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Path -> class names of each submodule of ``model`` (not the root) that a graph of ``gm``, captured from
    ``model``, calls whole or ran the forward of (its nodes' :func:`~orthofx.capture.module_scopes`): the modules a
    ``kind: block`` rule could select in ``model``, since capture keeps a selected one as a leaf. A container the
    forward never calls (an ``nn.ModuleList`` iterated in a loop) is not one. The names are the
    ``module.qualname`` of each class of the module's MRO (:attr:`Manifest.original_blocks
    <orthofx.passes.base.Manifest>` records them), and paths are ``model.named_modules()`` names."""
    first = {id(module): name for name, module in model.named_modules()}
    paths: set[str] = set()
    for graph, _ in mode_graphs(gm):
        for node in graph.nodes:
            paths.update(module_scopes(node))
            if node.op == "call_module":
                paths.add(str(node.target))
    found = {}
    for path in paths:
        try:
            module = model.get_submodule(path) if path else None
        except AttributeError:
            continue  # a path of the graph's own making (none of the model's modules)
        name = first.get(id(module)) if module is not None else None
        if name:  # the root is no block
            found[name] = tuple(f"{klass.__module__}.{klass.__qualname__}" for klass in type(module).__mro__)
    return dict(sorted(found.items()))


def _all_sites(gm: fx.GraphModule, blocks: Iterable[str]) -> tuple[list[Site], dict[str, dict[str, fx.Node]]]:
    """The sites of ``gm.graph`` and, for a two-mode graph module, those of the other mode's graph that the
    first does not have (its function sites, and modules it alone calls), with each graph's nodes by name."""
    (first, _), *others = mode_graphs(gm)  # first: whatever mode gm is in now
    sites = collect_sites(gm, blocks, graph=first)
    nodes = {"": {n.name: n for n in first.nodes}}
    for graph, mode in others:
        known = {s.name for s in sites}
        suffix = f"@{mode}"
        for site in collect_sites(gm, blocks, graph=graph, mode=mode):
            if site.kind != "function" and site.name in known:
                continue
            # next to the first graph's site of the same name, if any (so tables show the two together)
            base = site.name[:-len(suffix)] if site.name.endswith(suffix) else None
            at = next((i for i, s in enumerate(sites) if s.name == base and not s.mode), None)
            if at is None:
                sites.append(site)
            else:
                while at + 1 < len(sites) and sites[at + 1].name.startswith(base + "@"):
                    at += 1
                sites.insert(at + 1, site)
        nodes[mode] = {n.name: n for n in graph.nodes}
    return sites, nodes


def producers_feeding(gm: fx.GraphModule, node: fx.Node) -> list[str]:
    """Qualified names of the conv/linear modules whose outputs reach ``node``'s inputs.

    The walk goes upstream through reshapes, elementwise operations, reductions, matmuls and non-weight modules
    (activations, normalisation, pooling), and stops at the first conv/linear module on each path: those are
    the layers whose orthogonality conditions the matrix that ``node`` decomposes (P4's Pre-SVD layers). It does
    not pass through a read of a tensor's shape (``cov / h.shape[0]``): the layer producing ``h`` does not feed
    the matrix by that.
    """
    found: list[str] = []
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "call_module":
            module = gm.get_submodule(str(current.target))
            if stops_producer_walk(module):
                if current.target not in found:
                    found.append(str(current.target))
                continue
        if current.op in ("placeholder", "get_attr") or reads_only_metadata(current):
            continue  # a shape read (``h.shape[0]``) passes on none of ``h``'s values
        stack.extend(current.all_input_nodes)
    return found


# --------------------------------------------------------------------------------------------- matching

def _type_matches(type_names: Iterable[str], cls: type | None) -> bool:
    if cls is None:
        return False
    wanted = set(type_names)
    aliases = {resolved for resolved in map(_dotted_class, wanted) if resolved is not None}
    for klass in cls.__mro__:
        if klass.__name__ in wanted or f"{klass.__module__}.{klass.__qualname__}" in wanted or klass in aliases:
            return True
    return False


def _recorded_type_matches(type_names: Iterable[str], classes: tuple[str, ...]) -> bool:
    """:func:`_type_matches` for a class recorded as the ``module.qualname`` of each class of its MRO
    (:func:`called_module_classes`): a bare name is the last part of a qualified one."""
    wanted = set(type_names)
    resolved = {f"{klass.__module__}.{klass.__qualname__}" for klass in map(_dotted_class, wanted) if klass is not None}
    return any(name in wanted or name in resolved or name.rpartition(".")[2] in wanted for name in classes)


def _dotted_class(name: str) -> type | None:
    """The class a dotted name reaches through an import (``torch.nn.Conv2d`` is defined in
    ``torch.nn.modules.conv``: both spellings match), or None. Only names whose module is imported already are
    resolved: matching a rule never imports code."""
    module_name, _, attribute = name.rpartition(".")
    while module_name:
        module = sys.modules.get(module_name)
        if module is not None:
            value: Any = module
            for part in attribute.split("."):
                try:
                    value = getattr(value, part, None)
                except Exception:  # noqa: BLE001 - a module's __getattr__ may raise anything (torch.classes)
                    return None
            return value if isinstance(value, type) else None
        module_name, _, head = module_name.rpartition(".")
        attribute = f"{head}.{attribute}"
    return None


def _normalise(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_normalise(v) for v in value]
    return value


class _WhereError(Exception):
    """A ``where:`` value that cannot be compared with the module's attribute (build_plan raises a PlanError)."""


#: A conv's per-dimension sizes, which torch's convolutions (and poolings) read as one value per spatial dimension,
#: a one-element tuple standing for every dimension: ``where:`` compares them as torch applies them.
_PER_DIMENSION_SIZES = ("stride", "dilation", "padding", "output_padding")


def _spatial_dims(module: nn.Module) -> int | None:
    """The number of spatial dimensions of a conv-like layer, ``len(kernel_size)`` (torch's convolutions keep it as
    a tuple, orthofx's layers too); None for any other module (no tuple ``kernel_size``: a pooling built with an
    int, a layer of the user's own)."""
    try:
        kernel_size = getattr(module, "kernel_size", None)
    except Exception:  # noqa: BLE001 - a property of the user's class may raise anything; then no conv sizes
        return None
    return len(kernel_size) if isinstance(kernel_size, (tuple, list)) and kernel_size else None


def _per_dimension_value(value: Any, d: int, attr: str) -> Any:
    """A per-dimension size (an attribute or a ``where:`` value) as the ``d`` values torch applies (an int or a
    one-element list for every dimension: :func:`orthofx.nn.padding.per_dimension`), as a list; ``value`` itself
    when it is no such size (a string padding such as ``'same'``, a list of another length), which then compares
    as written."""
    if isinstance(value, (str, bool)) or not isinstance(value, (int, float, list)):
        return value
    try:
        return list(per_dimension(value, d, attr))
    except LayerArgumentError:
        return value


def _attribute_matches(module: nn.Module | None, where: dict[str, Any]) -> bool:
    """``where:`` filters: equality, lists compare with tuples, and a scalar matches a tuple of equal entries
    (``kernel_size: 3`` matches ``(3, 3)``). For a tensor attribute (or one that is None), ``true`` / ``false``
    test whether it is set: ``bias: false`` selects layers built with ``bias=False``; ``null`` selects an
    attribute that is None (``None`` written in YAML is the string 'None', which the errors say).

    A conv's ``stride``, ``dilation``, ``padding`` and ``output_padding`` (:data:`_PER_DIMENSION_SIZES`, on a
    layer with a tuple ``kernel_size``) compare per spatial dimension as torch applies them: an int or a
    one-element list stands for every dimension, on either side, so ``stride: 2``, ``stride: [2]`` and
    ``stride: [2, 2]`` each select a Conv2d built with ``stride=2``, ``(2,)`` or ``(2, 2)`` (which torch keeps as
    given and runs alike), ``stride: [2, 1]`` only one whose stride is ``(2, 1)``, and ``stride: [2, 2]`` no Conv1d
    (one dimension). ``kernel_size`` compares as written: ``nn.Conv2d(2, 2, (3,))`` is no 3 x 3 conv."""
    for attr, expected in where.items():
        if module is None:
            return False
        found, actual = _read_attribute(module, attr)
        if not found:
            return False
        if isinstance(actual, torch.Tensor) or (actual is None and isinstance(expected, bool)):
            if not isinstance(expected, bool):
                raise _WhereError(
                    f"where.{attr}: attribute '{attr}' of {type(module).__name__} is a tensor, which cannot be "
                    f"compared with {expected!r}; for a tensor attribute give true or false (whether it is set: "
                    "'bias: false' selects layers without a bias), or filter on plain attributes such as groups, "
                    "stride, kernel_size, padding_mode"
                    + _python_none_hint(expected, f"write '{attr}: false' for layers without it"))
            if (actual is not None) != expected:
                return False
            continue
        if isinstance(expected, bool) and not isinstance(actual, bool):
            # Python's True == 1 would make 'groups: true' select groups=1, the opposite of what it reads as
            raise _WhereError(
                f"where.{attr}: attribute '{attr}' of {type(module).__name__} is {actual!r}, not a tensor or a flag, "
                f"so true / false cannot select on it; give the value itself (e.g. '{attr}: {actual!r}')")
        actual = _normalise(actual)
        expected = _normalise(expected)
        if attr in _PER_DIMENSION_SIZES and (d := _spatial_dims(module)) is not None:
            actual, expected = _per_dimension_value(actual, d, attr), _per_dimension_value(expected, d, attr)
        if isinstance(actual, list) and not isinstance(expected, list):
            if not actual or not all(_equal(module, attr, a, expected) for a in actual):
                return False
        elif not _equal(module, attr, actual, expected):
            return False
    return True


def _read_attribute(module: nn.Module, attr: str) -> tuple[bool, Any]:
    """``(True, value)`` of ``module.attr``, ``(False, None)`` when it has none. A property of the user's class
    that raises something else than AttributeError (which ``hasattr`` would let through) is a _WhereError."""
    try:
        return True, getattr(module, attr)
    except AttributeError:
        return False, None
    except Exception as exc:  # noqa: BLE001 - user code: any exception means the filter cannot be evaluated
        raise _WhereError(
            f"where.{attr}: reading attribute '{attr}' of {type(module).__name__} raised {type(exc).__name__}: "
            f"{str(exc)[:200]}; filter on plain attributes such as groups, stride, kernel_size, padding_mode, "
            "or narrow the match so it does not select this layer") from None


def _equal(module: nn.Module, attr: str, actual: Any, expected: Any) -> bool:
    """``actual == expected`` as a bool. An attribute that is no plain value (a NumPy array, a tuple of tensors)
    may compare elementwise or raise; that is a _WhereError naming the attribute rather than a crash."""
    try:
        return bool(actual == expected)
    except Exception as exc:  # noqa: BLE001 - the attribute's own __eq__ / __bool__ may raise anything
        raise _WhereError(
            f"where.{attr}: attribute '{attr}' of {type(module).__name__} is no plain value (a "
            f"{type(actual).__name__} in it cannot be compared with {expected!r}: {type(exc).__name__}: "
            f"{str(exc)[:120]}); filter on "
            "plain attributes (numbers, strings, booleans, tuples of them) such as groups, stride, "
            "kernel_size, padding_mode") from None


def _selects(match: Match, site: Site, module: nn.Module | None, fed_by: dict[str, set[str]],
             aliases: tuple[str, ...] = ()) -> bool:
    """Whether ``match`` selects ``site``; ``aliases``: the other paths of the site's module
    (:func:`module_aliases`)."""
    if site.kind != match.site_kind or not match.matches_name(site.name, *aliases):
        return False
    if site.kind == "function":
        return not match.op or site.target in match.op
    if match.type and not _type_matches(match.type, site.module_type):
        return False
    if match.where and not _attribute_matches(module, match.where):
        return False
    if match.feeds and not any(site.name in fed_by.get(op, ()) for op in match.feeds):
        return False
    return True


def _selects_for_hint(match: Match, site: Site, module: nn.Module | None, fed_by: dict[str, set[str]],
                      aliases: tuple[str, ...] = ()) -> bool:
    """:func:`_selects` for the hints of a rule that matched nothing, which drop one of its selectors (name,
    exclude, where) and so reach layers the rule itself never compared its ``where:`` values with: a value such a
    layer cannot compare (``bias: 3`` on a Linear that ``exclude`` left out) does not select it there, rather than
    replacing the rule's error with an internal one. ``aliases``: the site's other paths, which the rule compared
    its patterns with too (:func:`module_aliases`)."""
    try:
        return _selects(match, site, module, fed_by, aliases)
    except _WhereError:
        return False


def module_aliases(model: nn.Module | None, limit: int | None = None) -> dict[str, tuple[str, ...]] | None:
    """First path -> the other paths of each module of ``model`` reachable by more than one (two attributes naming
    one module, ``self.b = self.a``; an ``nn.Sequential`` holding one layer twice; the submodules below them). A
    site is named by the first path, as ``model.named_modules()`` and fx name it, whatever path a rule names.
    The inverse of :func:`orthofx.capture.first_module_paths`.

    A module shared at every level of a nesting of depth d has 2^d - 1 other paths: ``limit`` bounds the other
    paths listed, None returned beyond it (:func:`_listed_aliases` falls back to the linear :func:`_edge_aliases`)."""
    if model is None:
        return {}
    firsts = first_module_paths(model, limit)
    if firsts is None:
        return None
    aliases: dict[str, list[str]] = {}
    for other, first in firsts.items():
        aliases.setdefault(first, []).append(other)
    return {name: tuple(paths) for name, paths in aliases.items()}


#: The other paths of shared modules that rules' name patterns are compared with, at least; a model with more than
#: this or 16 per (module, child name) edge (:func:`_alias_paths_listed`) has them cut to the linear
#: :func:`_edge_aliases`, with a warning.
_ALIAS_PATHS_LISTED = 4096


def _alias_paths_listed(model: nn.Module) -> int:
    """How many other paths :func:`module_aliases` lists for ``model`` before giving up: an alias of a big subtree
    (``self.encoder = self.backbone``, a ``torch.compile`` wrapper's ``_orig_mod`` paths) adds about as many as the
    subtree has edges, a module shared at every level of a nesting of depth d 2^d - 1 for 2d edges."""
    edges = sum(len(module._modules) for module in model.modules())
    return max(_ALIAS_PATHS_LISTED, 16 * edges)


def _edge_aliases(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """:func:`module_aliases` cut to one path per (module, child name) edge: for each child whose first path is not
    ``p.c`` (``p`` its parent's first path, ``c`` the child's name there), ``p.c``. Linear in the model's size, and
    each path listed is a path of its module; the paths below an alias (``first.conv`` for ``blocks.0.conv``) and
    those through two or more aliases are left out."""
    aliases: dict[str, list[str]] = {}
    for other, first in _ModulePaths(model).edges.items():
        aliases.setdefault(first, []).append(other)
    return {name: tuple(paths) for name, paths in aliases.items()}


def _listed_aliases(model: nn.Module | None, rules: Iterable[Rule]) -> tuple[dict[str, tuple[str, ...]], str | None]:
    """The other paths of ``model``'s shared modules that ``rules`` compare their name patterns with
    (:func:`module_aliases`, the root's left out) and a warning when they are not all of them.

    Only ``name`` and ``exclude`` patterns read other paths (:meth:`orthofx.policy.Match.matches_name`): without
    such a rule none are listed. With more than :data:`_ALIAS_PATHS_LISTED` other paths, each module's
    :func:`_edge_aliases` are listed; the warning names the rules whose patterns are thus not compared with every
    path, and the names to write instead."""
    named = [rule.name for rule in rules if rule.match.name or rule.match.exclude]
    if model is None or not named:
        return {}, None
    limit = _alias_paths_listed(model)
    aliases = module_aliases(model, limit)
    if aliases is not None:
        return {name: paths for name, paths in aliases.items() if name}, None
    aliases = {name: paths for name, paths in _edge_aliases(model).items() if name}
    first, others = next(iter(aliases.items()), ("", ("",)))
    example = f" ({others[0]!r} for {first!r})" if first else ""
    warning = (f"the model's submodules have more than {limit} attribute paths besides their "
               "model.named_modules() names (modules held under two names at many levels of a nesting: 2^depth "
               f"paths): the name and exclude patterns of rule(s) {first_few([repr(n) for n in named], 4)} "
               "are compared with each module's named_modules() name and the paths one other attribute name gives "
               f"it{example}, not with every path, so a pattern written for a path through two other names, or "
               "below one, selects (or excludes) nothing there: write it against the named_modules() names")
    return aliases, warning


def _rule_selects(rule: Rule, site: Site, module: nn.Module | None, fed_by: dict[str, set[str]],
                  aliases: tuple[str, ...] = (), position: int | None = None, count: int = 1) -> bool:
    """:func:`_selects` for a policy rule; a ``where:`` value that cannot be compared is a PlanError naming it
    (``position`` and ``count``: the rule's place in its policy and the number of rules, as :func:`_rule_place`
    takes them)."""
    try:
        return _selects(rule.match, site, module, fed_by, aliases)
    except _WhereError as exc:
        place = _rule_place(rule, match=True, position=position, count=count)
        raise PlanError(f"rule '{rule.name}'{place}: match.{exc} (at site '{site.name}')") from None


def _rule_place(rule: Rule, *, match: bool = False, position: int | None = None, count: int = 1) -> str:
    """`` (p.yaml:7:5)``: where a rule of a YAML policy is written, for errors about the rule. A rule without a line
    (from a dict, or built in code) is placed by its position in the policy, `` (rules[3])``, when that is given
    (``position``, of ``count`` rules) and its name does not say it: a name of its own (``'soft'``) sends a user
    to search a list built in code, the default one (``'orth_regularizer[3]'``) holds the position, and a policy of
    one rule needs none; ``""`` then. Content reached through a YAML alias is placed as the policy's own errors place it
    (:attr:`orthofx.policy.Location.alias_note`): where it is written, at the anchor, adding where the alias used it,
    `` (p.yaml:3:12, used through the alias *m at line 7, column 12)``. ``match=True`` for an error about what the
    rule selects (it matched nothing, a ``where`` value): the place is then the rule's ``match`` when that alone was
    reached through an alias (``match: *m``, written elsewhere), the rule's own otherwise. Example::

        import orthofx
        from orthofx.plan import _rule_place
        text = ("orthofx: 1\\nrules:\\n  - &r {match: &m {type: Conv2d}, apply: orth_regularizer}\\n  - *r\\n"
                "  - {match: *m, apply: riemannian}\\n")
        first, second, third = orthofx.Policy.from_yaml(text).rules
        assert _rule_place(first) == _rule_place(first, match=True) == " (<string>:3:5)"
        assert _rule_place(second) == _rule_place(second, match=True) == (
            " (<string>:3:5, used through the alias *r at line 4, column 5)")
        assert _rule_place(third) == " (<string>:5:5)"
        assert _rule_place(third, match=True) == " (<string>:3:16, used through the alias *m at line 5, column 13)"
    """
    loc = getattr(rule, "location", None)
    match_loc = getattr(rule, "match_location", None)
    if match and match_loc is not None and match_loc.aliases != getattr(loc, "aliases", ()):
        loc = match_loc  # the match alone came through an alias: it is written (and fixed) at the anchor
    if loc is None or getattr(loc, "line", None) is None:
        if position is None or count < 2 or rule.name == _default_rule_name(rule.apply, position):
            return ""
        return f" (rules[{position}])"
    note = getattr(loc, "alias_note", "")
    return f" ({loc}{', ' + note if note else ''})"


def block_paths(model: nn.Module, policy: Policy) -> list[str]:
    """Qualified names of the submodules that ``kind: block`` rules select; capture keeps them as leaves."""
    paths = []
    # a module under two names is selected (and excluded) by either, as build_plan selects its sites (which warns
    # when there are too many names to list them all)
    aliases = _listed_aliases(model, [rule for rule in policy.rules if rule.match.kind == "block"])[0]
    for position, rule in enumerate(policy.rules):
        if rule.match.kind != "block":
            continue
        for name, module in model.named_modules():
            if not name:
                continue
            site = Site("block", name, type(module).__name__, None, type(module))
            if (_rule_selects(rule, site, module, {}, aliases.get(name, ()), position, len(policy.rules))
                    and name not in paths):
                paths.append(name)
    return paths


# ------------------------------------------------------------------------------------------------- plan

@dataclass
class Plan:
    """The result of matching a policy against a graph; ``str(plan)`` is the ``explain`` table.

    ``entries`` are applied (in policy order); ``skipped`` are (site, rule, reason) where a rule's selectors
    matched but its pass cannot handle the site; ``shadowed`` are (site, rule, winning rule); ``notes`` are the
    lines under the table (the sites whose scale a Stiefel constraint undoes, as ``orthofx.report`` says them).

    Example::

        import orthofx
        policy = {"rules": [{"match": {"type": "Conv2d", "where": {"stride": 1}}, "apply": "orth_regularizer",
                             "with": {"weight": 0.1}},
                            {"match": {"type": ["Conv2d", "Linear"]}, "apply": "orth_regularizer"}]}
        plan = orthofx.explain(orthofx.models.get("small_cnn"), policy)
        print(plan)
        assert [(e.site.name, e.params["weight"]) for e in plan.entries] == [         # in policy order
            ("conv1", 0.1), ("conv3", 0.1), ("conv2", 0.01), ("fc", 0.01)]
        assert [site.name for site, rule, winner in plan.shadowed] == ["conv1", "conv3"]   # the first rule won there
    """

    entries: list[PlanEntry]
    sites: list[Site]
    skipped: list[tuple[Site, str, str]] = field(default_factory=list)
    shadowed: list[tuple[Site, str, str]] = field(default_factory=list)
    unmatched_optional: list[str] = field(default_factory=list)
    capture: CaptureInfo | None = None
    layers: dict[str, str] = field(default_factory=dict)  # site name -> describe_module
    # lines under the table, as the report's notes: the sites whose scale a Stiefel constraint undoes
    # (ScaleLostWarning), which the entry's status says too
    notes: list[str] = field(default_factory=list)

    def entries_for(self, pass_name: str) -> list[PlanEntry]:
        """The entries applying the pass ``pass_name`` (``[]`` for a registered pass no rule of the plan applies). A
        name that is neither a registered pass nor one of the plan's raises :class:`UnknownPassError` with the
        available names and the closest one: a misspelt name (``"orth_regulariser"``) returned ``[]`` silently."""
        found = [e for e in self.entries if e.pass_name == pass_name]
        if not found and not (isinstance(pass_name, str) and pass_name in available_passes()):
            known = sorted(set(available_passes()) | {e.pass_name for e in self.entries})
            raise UnknownPassError(f"Plan.entries_for: unknown pass {pass_name!r}; available: {', '.join(known)}"
                                   f"{_did_you_mean(pass_name, known)}")
        return found

    def pass_order(self) -> list[str]:
        """Passes in order of their first rule in the policy."""
        order: list[str] = []
        for entry in sorted(self.entries, key=lambda e: e.rule_index):
            if entry.pass_name not in order:
                order.append(entry.pass_name)
        return order

    def rows(self) -> list[dict[str, Any]]:
        """The ``explain`` table as plain data (str values only, so ``json.dumps(plan.rows())`` works): one dict
        per applied entry, skipped and shadowed match, in site order (applied first at a site), with the keys
        ``site`` (its name), ``kind`` (``module`` / ``function`` / ``block``), ``layer`` (e.g.
        ``Conv2d(3->16, k=3, s=1)``, the op for a function site), ``rule`` (the rule's name), ``pass`` (the pass
        applied; ``""`` when not applied), ``params`` (``"k=v, ..."``; ``""`` when not applied) and ``status``
        (``"apply"``, ``"apply: <outcome>"`` where the pass can tell that applying will not make its usual change,
        ``"skipped: <why>"`` or ``"shadowed by <rule>"``)."""
        rows = []
        for e in self.entries:
            rows.append({"site": e.site.name, "kind": e.site.kind, "layer": self.layers.get(e.site.name, e.site.target),
                         "rule": e.rule_name, "pass": e.pass_name, "params": _format_params(e.params),
                         "status": f"apply: {e.outcome}" if e.outcome else "apply"})
        for site, rule, reason in self.skipped:
            rows.append({"site": site.name, "kind": site.kind, "layer": self.layers.get(site.name, site.target),
                         "rule": rule, "pass": "", "params": "", "status": f"skipped: {reason}"})
        for site, rule, winner in self.shadowed:
            rows.append({"site": site.name, "kind": site.kind, "layer": self.layers.get(site.name, site.target),
                         "rule": rule, "pass": "", "params": "", "status": f"shadowed by {winner}"})
        order = {s.name: i for i, s in enumerate(self.sites)}
        rows.sort(key=lambda r: (order.get(r["site"], len(order)), not r["status"].startswith("apply")))
        return rows

    def __str__(self) -> str:
        lines = []
        if self.capture is not None:
            lines.append(f"capture: {self.capture.summary()}")
            for path, reason in self.capture.leaf_fallbacks:
                lines.append(f"  kept as leaf (not traceable): {path}: {reason}")
            for warning in self.capture.warnings:
                lines.append(f"  warning: {warning}")
        rows = self.rows()
        if rows:
            lines.append(tabulate(rows, headers="keys", tablefmt="simple", disable_numparse=True))
        else:
            lines.append("(no site matched)")
        for name in self.unmatched_optional:
            lines.append(f"optional rule '{name}' matched nothing")
        lines.extend(getattr(self, "notes", ()))  # (a Plan pickled before notes existed has none)
        n_apply = len(self.entries)
        lines.append(f"{n_apply} change(s) planned, {len(self.skipped)} skipped, {len(self.shadowed)} shadowed")
        return "\n".join(lines)

    __repr__ = __str__


def _format_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def _module_or_none(gm: fx.GraphModule, site: Site) -> nn.Module | None:
    if site.kind == "function":
        return None
    return gm.get_submodule(site.name)


_CONTAINERS = (nn.Module, nn.Sequential, nn.ModuleList, nn.ModuleDict)


def traced_through_layers(model: nn.Module, sites: Iterable[Site]) -> dict[str, type]:
    """Qualified name -> class of the submodules of ``model`` that subclass a torch.nn layer (``class
    StdConv2d(nn.Conv2d)`` with its own ``forward``, as weight-standardised convs are written) but are no module
    site: capture traced their forward (their own code decides what the layer computes), so the graph calls no
    such module and rules on ``type: Conv2d`` cannot select them. Submodules of sites are left out."""
    names = {site.name for site in sites if site.kind != "function"}
    found: dict[str, type] = {}
    for name, module in model.named_modules():
        if not name or name in names or any(name.startswith(site + ".") for site in names):
            continue
        cls = type(module)
        if _is_torch_layer(cls) or cls.__module__.startswith("orthofx."):
            continue
        if any(_is_torch_layer(klass) and klass not in _CONTAINERS for klass in cls.__mro__[1:]):
            found[name] = cls
    return found


def _hidden_by_tracing(rule: Rule, model: nn.Module | None, traced: dict[str, type]) -> list[str]:
    """The traced-through layers (:func:`traced_through_layers`) that ``rule`` would select as module sites."""
    if model is None or rule.match.site_kind != "module" or not rule.match.type:
        return []
    hidden = []
    for name, cls in traced.items():
        site = Site("module", name, cls.__name__, None, cls)
        try:
            if _selects(rule.match, site, model.get_submodule(name), {}):
                hidden.append(name)
        except _WhereError:
            continue
    return hidden


def _traced_through_note(rule: Rule, hidden: list[str], traced: dict[str, type]) -> str:
    classes = sorted({traced[name].__name__ for name in hidden})
    shown = first_few(hidden, 6)
    bases = sorted({klass.__name__ for name in hidden for klass in traced[name].__mro__[1:]
                    if _is_torch_layer(klass) and klass not in _CONTAINERS and klass.__name__ in rule.match.type})
    return (f"rule '{rule.name}' does not reach {shown} ({', '.join(classes)}: subclass(es) of "
            f"{', '.join(bases) or 'a matched torch.nn layer'} with their own forward, which capture traced "
            f"through, so the graph calls no such layer). To treat them as layers, list the class in the policy's "
            f"capture: {{leaf_modules: [{', '.join(classes)}]}} (a pass that replaces the layer then drops its "
            f"forward's own code; convnorm, which needs the conv's own operation, skips such a layer)")


# The orthofx.nn layers that passes put in place of a torch layer (orthogonal_conv, pre_svd, convnorm): rules on
# torch layer types do not select them, so a second transform of a transformed model finds nothing there.
_EXACTLY_ORTHOGONAL = (OrthogonalConv1d, OrthogonalConv2d, OrthogonalConv3d, OrthogonalConvTranspose1d,
                       OrthogonalConvTranspose2d, OrthogonalConvTranspose3d, OrthogonalLinear)
_REPLACEMENT_LAYERS = _EXACTLY_ORTHOGONAL + (ConvNormConvNd,)


@dataclass(frozen=True)
class OrthofxLayer:
    """An orthofx layer of a model (:func:`orthofx_layers`) at ``name``, of class ``layer``: ``original`` (e.g.
    ``Conv2d(4->4, k=3, s=1)``) is the torch layer it replaced and ``made_by`` (e.g. ``orthogonal_conv (rule
    'orthogonal')``) the pass that did it, as the manifest of the transform that made it records them; both are
    empty when no manifest says (a layer the user built).

    ``kind`` ``"function"``: an orthofx decomposition of the graph (:func:`orthofx_decompositions`) at the function
    site ``name``, ``layer`` the stand-in (``stable_eigh``, ``power_newton_schulz``), ``original`` the torch op it
    stands in for (``linalg.eigh``: as the manifest records it, else as the graph's call computes it)."""

    name: str
    layer: str
    exactly_orthogonal: bool
    original: str = ""
    made_by: str = ""
    kind: str = "module"

    def original_type(self) -> type | None:
        """The torch.nn class of :attr:`original`, or None when unknown."""
        cls = getattr(nn, self.original.split("(", 1)[0], None) if self.original else None
        return cls if isinstance(cls, type) and issubclass(cls, nn.Module) else None


def orthofx_layers(model: nn.Module) -> list[OrthofxLayer]:
    """The outermost orthofx layers of ``model`` that passes put in place of torch layers (orthogonal
    convolutions and linears, ConvNorm), with what they replaced and the pass that did it when the manifest of
    ``model`` (or of a transformed part of it) records that.

    Example::

        import torch, orthofx
        gm = orthofx.transform(torch.nn.Sequential(torch.nn.Linear(4, 4)), "orthogonal")
        [layer] = orthofx.plan.orthofx_layers(gm)
        assert (layer.name, layer.layer, layer.original) == ("0", "OrthogonalLinear", "Linear(4->4)")
        assert layer.made_by == "orthogonal_conv (rule 'orthogonal')"
    """
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, _REPLACEMENT_LAYERS) and not any(name.startswith(f"{outer}.") for outer in found):
            found[name] = module
    if not found:
        return []
    made: dict[str, tuple[str, str]] = {}  # layer path -> (original layer, pass and rule)
    for path, change in _recorded_changes(model):
        name = ".".join(p for p in (path, change.site) if p)
        after = str(change.after.get("layer", ""))
        if name in found and after.startswith(type(found[name]).__name__) and "layer" in change.before:
            made.setdefault(name, (str(change.before["layer"]), f"{change.pass_name} (rule '{change.rule}')"))
    return [OrthofxLayer(name, type(module).__name__, isinstance(module, _EXACTLY_ORTHOGONAL), *made.get(name, ()))
            for name, module in found.items()]


def _recorded_changes(model: nn.Module):
    """``(path, change)`` for each Change in the manifests of ``model`` and of the transformed parts inside it."""
    from .transform import _find_manifest  # transform imports this module: not at the top

    for path, module in model.named_modules():
        manifest = _find_manifest(module)
        for change in manifest.changes if manifest is not None else ():
            yield path, change


#: The stand-in that replaces a decomposition and the matrix power computed from it (``method: newton_schulz``)
_NEWTON_SCHULZ = "power_newton_schulz"


def _decomposition_family(op: str) -> str:
    """``"eigh"``, ``"svd"`` or ``"newton_schulz"``: what a graph re-captured from a transformed model still tells
    of a replaced op (it traces through the stand-ins into the custom ops, so ``stable_svdvals`` is a
    ``orthofx::svd_stable`` call there)."""
    return "newton_schulz" if op == _NEWTON_SCHULZ else "eigh" if "eig" in op else "svd"


def orthofx_decompositions(gm: fx.GraphModule, model: nn.Module | None = None) -> list[OrthofxLayer]:
    """The calls in ``gm``'s graph (both graphs of a two-mode model) of orthofx's stable decompositions (the
    stand-ins ``stable_eigh`` ... that ``svd_conditioning`` puts in place of torch's ops, or the custom ops
    ``orthofx::eigh_stable`` / ``svd_stable`` they call, as a re-captured graph holds them) and of Newton-Schulz
    powers: rules on torch's ops do not select them. Where the manifest of ``model`` (default ``gm``) records
    the replacements, one per call in graph order, each is named by the function site it replaced, with that op
    and the pass that did it; otherwise by the op it computes (``"<scope>:<op>"``).

    Example::

        import torch, orthofx
        class Eig(torch.nn.Module):
            def forward(self, x):
                return torch.linalg.eigvalsh(x.T @ x)
        gm = orthofx.transform(Eig(), "svd", example_inputs=(torch.randn(8, 3),))
        [dec] = orthofx.plan.orthofx_decompositions(gm)
        assert (dec.name, dec.layer, dec.original) == ("linalg.eigvalsh", "stable_eigvalsh", "linalg.eigvalsh")
        assert dec.made_by == "svd_conditioning (rule 'stable-decompositions')"
    """
    graphs = mode_graphs(gm)
    found: list[OrthofxLayer] = []
    recorded: list[OrthofxLayer] | None = None  # the replacements the manifests record, in their order
    for graph, mode in graphs:
        counts: Counter[str] = Counter()
        calls: list[OrthofxLayer] = []
        for node in graph.nodes:
            op = decomposition_op(node) if _op_name(node) is None else None  # torch's own are sites
            if op is None and not (node.op == "call_function"
                                   and getattr(node.target, "__name__", "") == _NEWTON_SCHULZ):
                continue
            op = op or _NEWTON_SCHULZ
            scope = _scope(node)
            base = f"{scope}:{op}" if scope else op
            counts[base] += 1
            name = (base if counts[base] == 1 else f"{base}#{counts[base]}") + (f"@{mode}" if mode else "")
            target = str(node.target)  # the custom op prints as orthofx.eigh_stable.default
            stand_in = (f"orthofx::{target.split('.')[1]}" if target.startswith("orthofx.")
                        else getattr(node.target, "__name__", target))
            calls.append(OrthofxLayer(name, stand_in, False, "" if op == _NEWTON_SCHULZ else op, kind="function"))
        if not calls:
            continue
        if recorded is None:  # read once, and only for a graph holding such calls (most hold none)
            recorded = _recorded_decompositions(model if model is not None else gm)
        mine = [r for r in recorded if r.name.endswith(f"@{mode}") == bool(mode)]
        # the manifest names the sites as the first transform saw them; used where it lines up with the graph
        if len(mine) == len(calls) and all(_decomposition_family(r.original if r.layer != _NEWTON_SCHULZ else r.layer)
                                           == _decomposition_family(c.original or _NEWTON_SCHULZ)
                                           for r, c in zip(mine, calls)):
            calls = mine
        found += calls
    return found


def _recorded_decompositions(model: nn.Module) -> list[OrthofxLayer]:
    """The decompositions the manifests of ``model`` (and of transformed parts inside it) record as replaced by
    orthofx's, in their order, named by the function site each replaced (qualified by the part's path)."""
    recorded = []
    for path, change in _recorded_changes(model):
        after, before = str(change.after.get("op", "")), str(change.before.get("op", ""))
        if not after.startswith("orthofx.nn.conditioning.") or not before or change.status.startswith("skipped"):
            continue
        site = change.site if not path else f"{path}.{change.site}" if ":" in change.site else f"{path}:{change.site}"
        recorded.append(OrthofxLayer(site, after.rsplit(".", 1)[-1], False, before,
                                     f"{change.pass_name} (rule '{change.rule}')", kind="function"))
    return recorded


def _passed_over(rule: Rule, layers: list[OrthofxLayer], fed_by: dict[str, set[str]], known_only: bool,
                 selected: Iterable[str] = ()) -> list[OrthofxLayer]:
    """The orthofx ``layers`` that ``rule`` would select as the torch layer each replaced (its ``where:`` aside,
    which reads attributes of a layer that is gone), or for a function rule the orthofx decompositions
    (:func:`orthofx_decompositions`) it would select as the torch op each computes; with ``known_only`` False, the
    layers whose original is unknown too. A layer holding a site the rule selected (``selected``: ConvNorm's inner
    conv) is left out."""
    kind = rule.match.site_kind
    if kind not in ("module", "function"):
        return []
    match = dataclasses.replace(rule.match, where={})
    passed = []
    for layer in layers:
        if layer.kind != kind:
            continue
        if kind == "function":
            if (_selects(match, Site("function", layer.name, layer.original), None, fed_by) if layer.original
                    else not known_only):
                passed.append(layer)
            continue
        if any(name == layer.name or name.startswith(f"{layer.name}.") for name in selected):
            continue
        cls = layer.original_type()
        if cls is None:
            if not known_only:
                passed.append(layer)
        elif _selects(match, Site("module", layer.name, cls.__name__, None, cls), None, fed_by):
            passed.append(layer)
    return passed


def _already_orthofx_note(layers: list[OrthofxLayer]) -> str:
    """Why ``layers`` (orthofx layers a rule passes over, or orthofx decompositions: ``kind`` ``"function"``) are
    not selected, and what to do instead."""
    decompositions = all(layer.kind == "function" for layer in layers)
    kinds = ", ".join(f"{t} x{n}" for t, n in Counter(layer.layer for layer in layers).most_common())
    originals = list(dict.fromkeys(layer.original.split("(", 1)[0] for layer in layers
                                   if layer.original and layer.made_by))
    passes = list(dict.fromkeys(layer.made_by for layer in layers if layer.made_by))
    made = (f", put in place of {' / '.join(originals)} {'calls' if decompositions else 'layers'} by "
            f"{'; '.join(passes)} in an earlier orthofx.transform" if passes else "")
    exact = [layer.layer for layer in layers if layer.exactly_orthogonal]
    what = ("decomposition(s) of the graph are already orthofx's stable ones" if decompositions else
            "layer(s) of the model are already orthofx layers")
    select = "rules on torch's decompositions (match: op)" if decompositions else "rules on torch layer types"
    note = (f"{len(layers)} {what} ({kinds}{made}): {first_few([repr(layer.name) for layer in layers], 4)}, which "
            f"{select} do not select. ")
    if exact:
        note += (f"The {' and '.join(dict.fromkeys(exact))} layers are exactly orthogonal already. To apply this "
                 "policy to them, transform the original model instead (one policy can hold the rules of both "
                 "transforms), or freeze this one first (orthofx.freeze bakes them into plain layers)")
    elif decompositions and not passes:  # no manifest: the model calls orthofx's stand-ins itself
        note += ("To apply this policy to them, call torch's op there instead (torch.linalg.eigh ...), or, if an "
                 "earlier orthofx.transform put them there, transform the original model instead")
    else:
        note += ("To apply this policy to them, transform the original model instead (one policy can hold the rules "
                 "of both transforms)")
    return note


def build_plan(gm: fx.GraphModule, policy: Policy, capture: CaptureInfo | None = None,
               blocks: Iterable[str] = (), model: nn.Module | None = None, has_example_inputs: bool = False) -> Plan:
    """Match ``policy`` against the captured ``gm``; raise :class:`PlanError` for a rule that matches nothing, and
    for entries a pass refuses together (:func:`_check_pass_plans`, e.g. ``riemannian``'s conflicting tied weights)
    or two passes would both hook (:func:`_refuse_weights_hooked_by_two_passes`: one weight stepped by
    ``riemannian`` at one layer and by ``pre_svd``'s NOG / OLR at another).

    ``model``: the module ``gm`` was captured from; with it, rules on a layer type also look for subclasses of
    that layer that capture traced through (:func:`traced_through_layers`): a rule that matches nothing says so
    in its error, and one that matches other sites adds a capture warning (shown by ``explain`` and ``report``).

    ``has_example_inputs``: whether the model runs on example inputs before the passes (each entry's
    ``has_example_inputs``), so that a pass needing a site's input size refuses it here without them."""
    sites, nodes = _all_sites(gm, blocks)
    traced = traced_through_layers(model, sites) if model is not None else {}
    aliases, too_many = _listed_aliases(model, policy.rules)
    if too_many is not None:
        warnings.warn(too_many, OrthofxWarning, stacklevel=caller_stacklevel())
        if capture is not None and too_many not in capture.warnings:
            capture.warnings.append(too_many)
    fed_by: dict[str, set[str]] = {}
    for site in sites:
        if site.kind == "function":
            fed_by.setdefault(site.target, set()).update(producers_feeding(gm, nodes[site.mode][site.node]))

    entries: list[PlanEntry] = []
    skipped: list[tuple[Site, str, str]] = []
    shadowed: list[tuple[Site, str, str]] = []
    unmatched_optional: list[str] = []
    winners: dict[tuple[str, str, str], str] = {}  # (_module_key of the site, group) -> rule name
    layers = {}
    for site in sites:
        if site.kind != "function":
            layers[site.name] = _layer_text(gm, site.name)

    if model is not None and capture is not None:
        notes = unused_leaf_entries(policy, model) + unknown_type_entries(policy, model)
        capture.warnings.extend(w for w in notes if w not in capture.warnings)
    if capture is not None:
        covered = {name for rule in policy.rules for name in _hidden_by_tracing(rule, model, traced)}
        notes = (scripted_module_warnings(gm) + unhandled_weight_warnings(gm, policy, sites, aliases)
                 + functional_weight_warnings(gm, policy, sites, traced, covered))
        capture.warnings.extend(w for w in notes if w not in capture.warnings)

    replaced: dict[tuple[str, str], tuple[str, str, bool]] = {}  # _module_key -> (rule, pass, hides the layer)
    # e.g. a second transform of a transformed model: a rule on Conv2d passes over its OrthogonalConv2d layers
    existing = orthofx_layers(model if model is not None else gm) + orthofx_decompositions(gm, model)
    # a rule's position in this policy, not its Rule.index: a rule taken from another policy keeps the index it had
    # there, and two rules with one index were grouped as one (riemannian's free: per rule)
    for position, rule in enumerate(policy.rules):
        pass_cls = get_pass(rule.apply)
        pass_obj = pass_cls()
        group = getattr(pass_cls, "group", "") or pass_cls.name
        selected = 0
        rejected: list[tuple[Site, str]] = []
        chosen: list[str] = []
        for site in sites:
            module = _module_or_none(gm, site)
            if not _rule_selects(rule, site, module, fed_by, aliases.get(site.name, ()), position, len(policy.rules)):
                continue
            selected += 1
            chosen.append(site.name)
            key = (*_module_key(site), group)
            if key in winners:
                shadowed.append((site, rule.name, winners[key]))
                continue
            reason = pass_obj.accepts(site, module) or pass_obj.accepts_params(site, module, rule.params)
            if reason is None and not pass_obj.handles_derived_weight(rule.params):
                reason = _derived_weight_reason(pass_cls, site, module, pass_obj.replaces_layer(rule.params))
            replacer = replaced.get(_module_key(site))
            if reason is None and replacer is not None and replacer[2] and not pass_cls.sees_through_wrappers:
                # a wrapper (a Jacobian probe) hides the layer's type from every later pass; the other order works
                reason = (f"rule '{replacer[0]}' ({replacer[1]}) wraps this layer earlier in the policy, and "
                          f"{pass_cls.name} would get the wrapper, not the layer: put this rule before "
                          f"'{replacer[0]}', or narrow one of the matches")
            elif reason is None and replacer is not None and pass_cls.needs_original_module:
                # two passes that each replace the layer: either order skips the second, so "put this rule
                # first" would only send the user back and forth
                fix = ("a layer takes one replacement: narrow one of the matches"
                       if pass_obj.replaces_layer(rule.params) else
                       f"put this rule before '{replacer[0]}', or narrow one of the matches")
                reason = (f"rule '{replacer[0]}' ({replacer[1]}) replaces this layer earlier in the policy, and "
                          f"{pass_cls.name} needs the original layer: {fix}")
            if reason is not None:
                rejected.append((site, reason))
                continue
            winners[key] = rule.name
            if pass_obj.replaces_layer(rule.params):
                replaced.setdefault(_module_key(site), (rule.name, pass_cls.name, pass_cls.hides_layer))
            entries.append(PlanEntry(site=site, rule_name=rule.name, rule_index=position,
                                     pass_name=pass_cls.name, params=dict(rule.params),
                                     reason=f"first '{group}' rule matching {site.name}",
                                     outcome=pass_obj.planned_outcome(site, module, rule.params) or "",
                                     has_example_inputs=has_example_inputs,
                                     replaced_by=replacer[:2] if replacer is not None else None))
        skipped.extend((site, rule.name, reason) for site, reason in rejected)
        hidden = _hidden_by_tracing(rule, model, traced)
        if hidden and (selected or rule.optional) and capture is not None:
            capture.warnings.append(_traced_through_note(rule, hidden, traced))
        passed_over = _passed_over(rule, existing, fed_by, known_only=bool(selected) or rule.optional,
                                   selected=chosen)
        if passed_over and (selected or rule.optional) and capture is not None:
            things = "decompositions" if rule.match.site_kind == "function" else "layers"
            capture.warnings.append(f"rule '{rule.name}' passes over orthofx {things}: "
                                    f"{_already_orthofx_note(passed_over)}")
        if selected == 0:
            if rule.optional:
                unmatched_optional.append(rule.name)
                continue
            note = f" Note: {_traced_through_note(rule, hidden, traced)}." if hidden else ""
            inlined = inlined_blocks(rule, sites, model if model is not None else gm, aliases)
            raise PlanError(_no_match_message(rule, sites, passed_over, position, len(policy.rules), inlined,
                                              capture.leaf_fallbacks if capture is not None else ())
                            + _unknown_type_hint(rule, model if model is not None else gm)
                            + _container_type_hint(rule, sites, model if model is not None else gm, aliases,
                                                   position, len(policy.rules))
                            + _feeds_hint(rule, sites, fed_by)
                            + _missing_attribute_hint(rule, sites, gm, fed_by, aliases) + note
                            + _excluded_all_hint(rule, sites, gm, fed_by, aliases)
                            + _unmatched_name_hint(rule, sites, gm, fed_by, aliases, model)
                            + _root_layer_hint(rule, model)
                            + _inside_leaf_hint(rule, sites, model if model is not None else gm, aliases, position,
                                                len(policy.rules)))
        if selected == len(rejected) and not rule.optional:
            details = "; ".join(f"{s.name}: {r}" for s, r in rejected[:5])
            place = _rule_place(rule, position=position, count=len(policy.rules))
            raise PlanError(f"rule '{rule.name}'{place} (apply: {rule.apply}) matched {selected} site(s) "
                            f"but its pass can handle none of them: {details}. Narrow the rule's match, or mark it "
                            "'optional: true'.")
    _check_pass_plans(gm, entries)
    _refuse_weights_hooked_by_two_passes(gm, entries, policy)
    plan = Plan(entries=entries, sites=sites, skipped=skipped, shadowed=shadowed,
                unmatched_optional=unmatched_optional, capture=capture, layers=layers)
    _plan_stiefel_outcomes(gm, plan)
    return plan


def _layer_text(gm: nn.Module, name: str) -> str:
    """The ``layer`` column of the module at ``name`` (:func:`describe_module`). The conv of a frozen ConvNorm
    layer is shown with the layer's stride and dilation, which its L_orth uses (:func:`frozen_convnorm_owner`),
    and said to be that conv: its own stride 1 is the layer's correlation's."""
    module = gm.get_submodule(name)
    owner = frozen_convnorm_owner(gm, name) if module.__dict__.get(FROZEN_FILTERS_MARKER, False) else None
    if owner is None:
        return describe_module(module)
    return describe_module(module, layer=owner, note="frozen ConvNorm conv")


def _module_key(site: Site) -> tuple[str, str]:
    """How the plan tells sites apart for shadowing and replacement: a module site and a block site of one path
    are one layer (a ``kind: block`` rule naming a single layer, or ``name: "*"``, selects it as a block)."""
    return ("function" if site.kind == "function" else "layer", site.name)


def _check_pass_plans(gm: fx.GraphModule, entries: list[PlanEntry]) -> None:
    """Let each pass refuse a combination of its entries that its ``apply`` would refuse (a pass's
    ``check_plan(gm, entries)``, given the entries of that pass in plan order, as ``apply`` gets them; e.g.
    ``riemannian``'s tied weights cut into other matrices), so that ``explain`` raises the :class:`PlanError`
    that ``transform`` would raise, before any pass has run (with ``inplace=True`` an earlier pass of the policy
    would have written the user's weights by the time a later one refused). Lazy layers that have not run are
    refused here too, for the passes that need their weight (:func:`_refuse_lazy_layers`)."""
    by_pass: dict[str, list[PlanEntry]] = {}
    for entry in entries:
        by_pass.setdefault(entry.pass_name, []).append(entry)
    for pass_name, pass_entries in by_pass.items():
        pass_cls = get_pass(pass_name)
        _refuse_lazy_layers(gm, pass_cls, pass_entries)
        pass_cls().check_plan(gm, pass_entries)
        _refuse_meta_weights(gm, pass_cls, pass_entries)


def _optimizer_hooked_weights(gm: fx.GraphModule, entries: list[PlanEntry]) -> list[tuple[PlanEntry, str, str]]:
    """``(entry, weight name, what its hook does)`` for each weight that a pass steps with an optimizer hook at an
    entry's site (each pass's ``optimizer_hooked_weights``, given its entries as ``check_plan`` gets them), in plan
    order."""
    by_pass: dict[str, list[PlanEntry]] = {}
    for entry in entries:
        by_pass.setdefault(entry.pass_name, []).append(entry)
    order = {id(entry): i for i, entry in enumerate(entries)}
    hooked = [weight for pass_name, pass_entries in by_pass.items()
              for weight in get_pass(pass_name)().optimizer_hooked_weights(gm, pass_entries)]
    return sorted(hooked, key=lambda weight: order[id(weight[0])])  # stable: a site's weights keep their order


def _refuse_weights_hooked_by_two_passes(gm: fx.GraphModule, entries: list[PlanEntry], policy: Policy) -> None:
    """:class:`PlanError` for one weight (one ``nn.Parameter`` reached through two layers: ``b.weight =
    a.weight``) that two passes each step with an optimizer hook (:func:`_optimizer_hooked_weights`), e.g.
    ``riemannian`` at ``a`` and ``pre_svd``'s NOG at ``b``. Both hooks would act on the one tensor at every
    ``optimizer.step()``: NOG replaces the gradient ``G`` by its polar factor ``U V^T``, the Riemannian hook
    projects the gradient onto the tangent space at ``W`` and retracts the step onto the Stiefel manifold; the
    update made depends on which runs first, i.e. on the order of the rules, and each Change describes its own
    update only. One pass hooking one weight at two sites is that pass's own matter (``riemannian`` keeps one
    hook per tensor)."""
    first: dict[int, tuple[PlanEntry, str, str]] = {}  # id(weight) -> its first hook
    for entry, pname, what in _optimizer_hooked_weights(gm, entries):
        weight = getattr(gm.get_submodule(entry.site.name), pname)
        one, one_name, one_what = first.setdefault(id(weight), (entry, pname, what))
        if one.pass_name == entry.pass_name:
            continue
        two = entry
        raise PlanError(
            f"'{weight_label(one.site.name, one_name)}' and '{weight_label(two.site.name, pname)}' are one weight "
            f"(the same nn.Parameter, reached through two layers), and two passes would step it with optimizer "
            f"hooks: rule '{one.rule_name}'{_entry_place(one, policy)} applies {one.pass_name} at '{one.site.name}' "
            f"({one_what}), rule '{two.rule_name}'{_entry_place(two, policy)} applies {two.pass_name} at "
            f"'{two.site.name}' ({what}). Both hooks would act on the one tensor at every optimizer.step(), so the "
            "update would depend on the order of the rules. Apply one of them to the weight (leave "
            f"'{two.site.name}' out of rule '{two.rule_name}' with match.exclude, or '{one.site.name}' out of rule "
            f"'{one.rule_name}'), or untie the weights (give '{two.site.name}' a weight of its own)")


def _entry_place(entry: PlanEntry, policy: Policy) -> str:
    """:func:`_rule_place` of the rule that made ``entry``."""
    rules = policy.rules[entry.rule_index:entry.rule_index + 1]
    return _rule_place(rules[0]) if rules and rules[0].name == entry.rule_name else ""


def _refuse_lazy_layers(gm: fx.GraphModule, pass_cls: type, entries: list[PlanEntry]) -> None:
    """:class:`PlanError` for a lazy layer that has not run yet (``nn.LazyLinear`` ...) at a module site of a pass
    that writes, steps or replaces the layer's weight (``needs_weight_parameter``, ``needs_original_module``,
    ``replaces_module``): it has no shape or values to do that with. Planning sees the layers as the passes will:
    given example inputs, ``transform`` and ``explain`` run the model before planning, which initialises its lazy
    layers, so one still lazy here stays so (no example inputs, or none reaching it), and the pass's ``apply``
    would refuse it, after the passes before it had run. Passes that only read the weight when the penalty is
    computed (``orth_regularizer``) or wrap a block (``jacobian_isometry``) take lazy layers."""
    if not (pass_cls.needs_weight_parameter or pass_cls.needs_original_module or pass_cls.replaces_module):
        return
    purpose = (f"{pass_cls.name} has no shape to build its replacement from" if pass_cls.replaces_module
               else f"{pass_cls.name} has no weight to write or to step")
    for entry in entries:
        if entry.site.kind == "module":
            require_initialised(entry, gm.get_submodule(entry.site.name), purpose)


def meta_tensors(module: nn.Module) -> list[str]:
    """Names of ``module``'s parameters and buffers on the meta device (shapes without values)."""
    return [name for name, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]


def meta_text(names: list[str]) -> str:
    """Why a model on the meta device cannot be run or rewritten from its weights, and how to fix it."""
    shown = first_few((repr(n) for n in names), 3)
    return (f"its parameters/buffers {shown} are on the meta device (shapes without values). Materialise the "
            "model first: model.to_empty(device='cpu') and model.load_state_dict(...) (or build it outside "
            "torch.device('meta')), then transform it")


def _refuse_meta_weights(gm: fx.GraphModule, pass_cls: type, entries: list[PlanEntry]) -> None:
    """Give the entries of a pass that reads its layers' weight values (its ``weight_values_read``) at a layer on
    the meta device the :class:`~orthofx.errors.MetaWeightError` its ``apply`` would meet: ``transform`` raises it
    before any pass runs, ``explain`` shows ``apply: fails: ...``. An entry whose outcome is already another
    (``orthogonal_conv``'s L_orth or skip where no orthogonal layer exists) reads no values."""
    for entry in entries:
        if entry.site.kind != "module" or entry.outcome or entry.refusal is not None:
            continue
        what = pass_cls().weight_values_read(entry.params)
        module = gm.get_submodule(entry.site.name)
        names = meta_tensors(module)
        if what is None or not names:
            continue
        entry.outcome = f"fails: {pass_cls.name} {what.split(' (', 1)[0]}, and the layer is on the meta device"
        entry.refusal = MetaWeightError(
            f"rule '{entry.rule_name}': {entry.site.name} ({describe_module(module)}): {pass_cls.name} {what}, and "
            + meta_text([f"{entry.site.name}.{name}" if entry.site.name else name for name in names]))


def _plan_stiefel_outcomes(gm: fx.GraphModule, plan: Plan) -> None:
    """Say in the plan what ``riemannian`` decides when it runs: the sites its ``free`` leaves unconstrained (their
    outcome is the Change's text), and the sites whose scale a Stiefel constraint undoes, where ``transform`` warns
    (:class:`~orthofx.errors.ScaleLostWarning`): the entry of the pass that runs second (the one that warns) gets
    the note of its Change as its outcome, and the plan a note as the report's. The passes' own deciders are run
    on what the first pass will have recorded (``isometric_init``'s scales, ``riemannian``'s hooks), warnings off."""
    stiefel = [e for e in plan.entries if e.pass_name == Riemannian.name]
    if not stiefel:
        return
    modules = {e.site.name: gm.get_submodule(e.site.name) for e in stiefel}
    # a lazy layer's decisions wait for apply (planning refused it already unless example inputs initialised it)
    if any(isinstance(getattr(m, "weight", None), nn.parameter.UninitializedParameter) for m in modules.values()):
        return
    by_rule = list(entries_by_rule(stiefel).values())
    decisions = [d for rule in _tie_decisions(by_rule, modules.__getitem__) for d in rule]
    for d in decisions:
        if d.free_what is not None and not d.entry.outcome:
            d.entry.outcome = d.free_what
    scaled = [e for e in plan.entries if e.pass_name == IsometricInit.name]
    if not scaled or any(e.refusal is not None for e in plan.entries):
        return
    order = plan.pass_order()
    manifest = Manifest(policy=None, plan=plan, capture=plan.capture)
    ctx = PassContext(gm=gm, manifest=manifest)
    lost: list[tuple[PlanEntry, float, str]] = []
    constrained = [d for d in decisions if d.free_what is None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transform warns; the plan says it in the entry's status
        if order.index(IsometricInit.name) < order.index(Riemannian.name):
            manifest.changes = [Change(site=e.site.name, rule=e.rule_name, pass_name=IsometricInit.name, what="",
                                       after={"scale": _scale(e.params)}) for e in scaled]
            for d in constrained:
                module = modules[d.entry.site.name]
                # the weights riemannian projects and steps there: a frozen one is left as it is
                stepped = [p for p in d.own if getattr(module, p).requires_grad]
                found = _scale_lost(ctx, d.entry, module, stepped)
                if found is not None:
                    lost.append((d.entry, found.scale, found.note))
        else:
            manifest.optimizer_hooks = [StiefelHook(d.entry.site.name, d.entry.rule_name, parameter=p)
                                        for d in constrained for p in d.own]
            for e in scaled:
                scale = _scale(e.params)
                note = _scale_dropped_later(ctx, e, gm.get_submodule(e.site.name), scale)
                if note:
                    lost.append((e, scale, note))
    for entry, scale, note in lost:
        said = note.lstrip("; ") + " (ScaleLostWarning)"
        entry.outcome = f"{entry.outcome}; {said}" if entry.outcome else said
        plan.notes.append(scale_lost_note(Change(site=entry.site.name, rule=entry.rule_name,
                                                  pass_name=entry.pass_name, what="", after={"scale_lost": scale})))


def scripted_module_warnings(gm: fx.GraphModule) -> list[str]:
    """Say which modules the graph calls are TorchScript (``torch.jit.script``): they are no sites (see
    :func:`collect_sites`), so their layers keep their weights whatever the policy says."""
    scripted = sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_module"
                       and isinstance(gm.get_submodule(str(n.target)), torch.jit.ScriptModule)})
    if not scripted:
        return []
    return [f"TorchScript module(s) {', '.join(scripted)} (torch.jit.script) are compiled code orthofx cannot "
            "rewrite: they are no sites, and the layers inside them are left as they are. Transform the model "
            "before scripting it (script the returned module, or the frozen one)"]


#: Layers holding weight matrices that no built-in pass handles, with the parameters concerned.
_UNHANDLED_WEIGHTS = ((nn.RNNBase, "recurrent", "weight_ih_l*, weight_hh_l*"),
                      (nn.RNNCellBase, "recurrent cell", "weight_ih, weight_hh"),
                      (nn.MultiheadAttention, "input projection", "in_proj_weight (or q/k/v_proj_weight)"),
                      (nn.Bilinear, "bilinear", "weight"))


def unhandled_weight_warnings(gm: fx.GraphModule, policy: Policy, sites: list[Site],
                              aliases: dict[str, tuple[str, ...]] | None = None) -> list[str]:
    """Say which layers hold weight matrices that the policy's weight rules cannot reach: recurrent layers
    (``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and their cells), ``nn.MultiheadAttention``'s packed input projection
    (its ``out_proj`` is a Linear site), ``nn.Bilinear``. Only when the policy has a module rule whose pass acts on
    Linear layers (L_orth, hard orthogonal layers, isometric init, Riemannian training ...): such a user expects
    every weight matrix treated, and these are left as they are without a word otherwise. ``aliases``: the other
    paths of each site's module (:func:`module_aliases`), which a rule may name, as build_plan selects sites."""
    linear_rules = [rule.name for rule in policy.rules if rule.match.site_kind == "module"
                    and _acts_on_linear(get_pass(rule.apply))]
    if not linear_rules:
        return []
    warnings = []
    aliases = aliases or {}
    for cls, kind, weights in _UNHANDLED_WEIGHTS:
        found = [s.name for s in sites if s.kind == "module" and not s.mode and s.module_type is not None
                 and issubclass(s.module_type, cls) and not _handled_by_a_rule(gm, policy, s, aliases.get(s.name, ()))]
        if not found:
            continue
        shown = first_few(found, 4)
        types = ", ".join(sorted({type(gm.get_submodule(name)).__name__ for name in found}))
        warnings.append(
            f"{shown} ({types}): no rule of the policy treats the {kind} weights {weights}: rule(s) "
            f"{', '.join(linear_rules)} select Conv and Linear layers and leave these as they are"
            + (". For orthogonal hidden-to-hidden weights (one orthonormal block per gate), add a rule "
               f"{{match: {{type: {types.split(', ')[0]}}}, apply: riemannian}} (kept orthonormal in training; "
               "or apply: orth_regularizer, a penalty; or isometric_init, at initialisation)"
               if issubclass(cls, RECURRENT_TYPES) else ""))
    return warnings


def _functional_layer_ops() -> dict[Any, tuple[str, bool | int | None]]:
    """The functional convolutions and linear maps (as fx records them, and their ATen ops as torch.export does)
    -> ``(name, transposed)``: ``transposed`` a bool, or the index of the argument saying it
    (``aten.convolution``'s ``transposed``); None for a linear map."""
    F = torch.nn.functional
    ops: dict[Any, tuple[str, bool | int | None]] = {F.linear: ("F.linear", None)}
    for d in (1, 2, 3):
        ops[getattr(F, f"conv{d}d")] = (f"F.conv{d}d", False)
        ops[getattr(F, f"conv_transpose{d}d")] = (f"F.conv_transpose{d}d", True)
    aten = torch.ops.aten
    for packet, name, transposed in (
            [("linear", "F.linear", None), ("convolution", "F.conv*", 6), ("_convolution", "F.conv*", 6)]
            + [(f"conv{d}d", f"F.conv{d}d", False) for d in (1, 2, 3)]
            + [(f"conv_transpose{d}d", f"F.conv_transpose{d}d", True) for d in (1, 2, 3)]):
        overloads = getattr(aten, packet, None)
        for overload in ("default", "input", "padding"):
            op = getattr(overloads, overload, None) if overloads is not None else None
            if op is not None:
                ops[op] = (name, transposed)
    return ops


#: Calls that compute a conv / linear layer's operation from a weight they are given: no site (sites are module
#: calls), so a parameter passed to one gets no pass (:func:`functional_weight_warnings`).
_FUNCTIONAL_LAYER_OPS = _functional_layer_ops()


def _parameter_at(gm: fx.GraphModule, target: str) -> nn.Parameter | None:
    """The parameter a ``get_attr`` node reads, None for a buffer, a constant or anything else."""
    owner, _, name = target.rpartition(".")
    try:
        value = getattr(gm.get_submodule(owner), name, None)
    except Exception:  # noqa: BLE001 - a missing or odd owner: nothing this warning can name
        return None
    return value if isinstance(value, nn.Parameter) else None


def functional_weight_warnings(gm: fx.GraphModule, policy: Policy, sites: list[Site],
                               traced: dict[str, type] | None = None, covered: Iterable[str] = ()) -> list[str]:
    """Say which functional convolutions and linear maps of the graph (``F.conv2d(x, self.w)``, ``F.linear(x,
    self.w)``: :data:`_FUNCTIONAL_LAYER_OPS`) take a parameter of the model as their weight (a ``get_attr`` node):
    rules select module calls only, so such a weight gets no pass, no report row and no penalty term. Only when
    the policy has a module rule whose pass acts on that layer type (as :func:`unhandled_weight_warnings`). Left
    out: a parameter of a conv / linear module site (a tied weight, treated through its layer) and those of the
    layers ``covered`` (traced-through subclasses of torch layers that a rule's own note names already); for the
    other layers of ``traced`` (:func:`traced_through_layers`), the fix is to keep them as leaves."""
    treated = {s.name for s in sites if s.kind == "module" and s.module_type is not None
               and issubclass(s.module_type, (nn.Linear,) + _CONV_LAYERS)}
    covered = set(covered)
    found: dict[str, tuple[str, str, str, type]] = {}  # parameter -> (node, op, scope, layer type)
    for graph, _ in mode_graphs(gm):
        for node in graph.nodes:
            spec = _FUNCTIONAL_LAYER_OPS.get(node.target) if node.op == "call_function" else None
            if spec is None:
                continue
            weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            if not isinstance(weight, fx.Node) or weight.op != "get_attr":
                continue
            target = str(weight.target)
            parameter = _parameter_at(gm, target)
            owner = target.rpartition(".")[0]
            if parameter is None or target in found or owner in treated or owner in covered:
                continue
            name, transposed = spec
            if isinstance(transposed, int) and not isinstance(transposed, bool):
                flag = node.args[transposed] if len(node.args) > transposed else node.kwargs.get("transposed")
                transposed = flag is True
            d = parameter.dim() - 2
            layer = (nn.Linear if transposed is None or d not in (1, 2, 3) else
                     getattr(nn, f"ConvTranspose{d}d" if transposed else f"Conv{d}d"))
            if name == "F.conv*":  # aten.convolution: which one, from the weight and its flag
                name = f"F.conv_transpose{d}d" if transposed else f"F.conv{d}d"
            found[target] = (node.name, name, _scope(node), layer)
    if not found:
        return []
    layer_types = {layer for *_, layer in found.values()}
    rules = [rule.name for rule in policy.rules if rule.match.site_kind == "module"
             and any(_acts_on(get_pass(rule.apply), layer) for layer in layer_types)]
    if not rules:
        return []
    calls = [f"'{node}' ({op} of the parameter '{target}'{f' in {scope}' if scope else ''})"
             for target, (node, op, scope, _) in found.items()]
    modules = " / ".join(sorted(f"nn.{layer.__name__}" for layer in layer_types))
    return [f"{first_few(calls, 4)}: no rule of the policy treats the weight(s) of these functional conv / linear "
            f"calls: rule(s) {', '.join(rules)} select layers, which are module calls (sites), and a weight passed "
            f"to a function is none, so it gets no pass, no report row and no penalty term. To treat it, hold it "
            f"in an {modules} module (with the call's stride, padding, dilation and groups) and call that module in "
            "place of the function" + _traced_owners_note([t.rpartition(".")[0] for t in found], traced or {})]


def _traced_owners_note(owners: list[str], traced: dict[str, type]) -> str:
    """For :func:`functional_weight_warnings`: the owners of the weights that are torch layers capture traced
    through (subclasses with their own forward), which are layers already and need only be kept as leaves."""
    classes = sorted({traced[owner].__name__ for owner in owners if owner in traced})
    if not classes:
        return ""
    return (f"; the layers of class {', '.join(classes)} are torch layers with their own forward, which capture "
            f"traced through: list the class in the policy's capture: {{leaf_modules: [{', '.join(classes)}]}} to "
            "keep them as layers")


def _handled_by_a_rule(gm: fx.GraphModule, policy: Policy, site: Site, aliases: tuple[str, ...] = ()) -> bool:
    """Whether a rule of ``policy`` selects ``site`` with a pass that acts on its layer type (``riemannian`` on a
    recurrent layer): then the layer's weights are not left without a word."""
    module = gm.get_submodule(site.name)
    for position, rule in enumerate(policy.rules):
        types = getattr(get_pass(rule.apply), "module_types", ())
        if rule.match.site_kind == "module" and any(issubclass(site.module_type, t) for t in types) \
                and _rule_selects(rule, site, module, {}, aliases, position, len(policy.rules)):
            return True
    return False


def _acts_on_linear(pass_cls: type) -> bool:
    return _acts_on(pass_cls, nn.Linear)


def _acts_on(pass_cls: type, layer: type) -> bool:
    """Whether ``pass_cls`` acts on module sites of the torch layer type ``layer``."""
    types = getattr(pass_cls, "module_types", ())
    return "module" in pass_cls.site_kinds and any(issubclass(layer, t) for t in types)


_CONV_LAYERS = TORCH_CONV_TYPES + TORCH_TRANSPOSED_CONV_TYPES


def _derived_weight_reason(pass_cls: type, site: Site, module: nn.Module | None,
                           replaces: bool = False) -> str | None:
    """Why ``pass_cls`` must skip a layer whose weight is computed (:func:`~orthofx.passes.base.derived_weight`):
    replacing the layer would silently drop the parametrization or hook that computes the weight (the layer would
    no longer be weight-normalised, spectrally normalised, pruned ...), and writing or stepping the computed
    tensor changes nothing (the next call recomputes it). Passes that only read the weight (L_orth) are fine. A
    pass that ``replaces`` the layer with these parameters (:meth:`Pass.replaces_layer`) also skips a layer whose bias
    is computed so (the replacement holds a plain bias), unless it is a wrapper and the bias a parametrization. The
    conv of a frozen ConvNorm layer is refused the same way: its baked filters are a function of its weight."""
    if site.kind != "module" or module is None:
        return None
    wrapper_reads = pass_cls.wraps_original_module and not pass_cls.needs_weight_parameter
    if wrapper_reads and torch.nn.utils.parametrize.is_parametrized(module, "weight"):
        reason = None  # the wrapper reads layer.weight, which the parametrization computes at each access
    elif not (pass_cls.replaces_module or pass_cls.needs_original_module or pass_cls.needs_weight_parameter):
        return None
    elif getattr(module, FROZEN_FILTERS_MARKER, False):
        return ("the conv of a frozen ConvNorm layer, whose filters were computed from its weight when it was frozen: "
                "a new weight would leave them stale; transform the model before orthofx.freeze")
    else:
        reason = derived_weight(module)
    if reason is None and replaces:
        # a replacement copies the bias as a plain parameter (an orthogonal layer: the bias a parametrization
        # computed became a free one, silently) or takes the layer's pre-hooks (pruning's bias hook then failed on
        # the replacement); a wrapper calling the layer keeps a parametrized bias computed, as the weight
        if not (wrapper_reads and torch.nn.utils.parametrize.is_parametrized(module, "bias")):
            bias = derived_weight(module, "bias")
            if bias is not None:
                return f"{bias}; replacing the layer would drop it"
    if reason is None:
        return None
    does = "replacing the layer would drop it" if pass_cls.replaces_module else _weight_write_text(module)
    return f"{reason}; {does} (orth_regularizer, which reads the weight, works here)"


def _weight_write_text(module: nn.Module) -> str:
    """What becomes of a pass's write to ``module.weight``, a computed weight (:func:`derived_weight`), for the
    reason a pass skips the layer: a parametrization, a forward pre-hook (torch's older weight_norm and pruning, or
    the user's own) or a property computes it again at the next call, so the write is lost. A plain tensor that no
    pre-hook of the layer may set (``layer.weight = tensor``, or the parent's forward tying it) keeps a write until
    whatever set it sets it again, and no optimizer trains it (it is no parameter): "lost" was false there."""
    plain = not (torch.nn.utils.parametrize.is_parametrized(module, "weight")
                 or isinstance(getattr(type(module), "weight", None), property))
    if plain and not module._forward_pre_hooks:
        return ("a write to it would not be trained (it is no parameter the optimizer holds) and lasts only until "
                "the code that set it sets it again")
    return "a write to the weight is lost"


def unused_leaf_entries(policy: Policy, model: nn.Module) -> list[str]:
    """Warnings for the ``capture.leaf_modules`` entries that keep nothing of ``model`` as a leaf: capture compares
    each entry with the submodule paths and, along each submodule class's MRO, with ``__name__`` and
    ``__module__.__qualname__`` (see :class:`orthofx.capture.OrthofxTracer`); an entry matching none of them (a
    typo, a re-exported path) is silently without effect. A warning, not an error: one policy may serve several
    models. A module under two paths (``self.decoder = self.encoder``) is kept as a leaf by the path
    ``named_modules()`` gives it, the first: an entry naming another one is told so, with the path to write, and
    the closest path to a typo is looked for among all of them."""
    entries = policy.capture.leaf_modules
    if not entries:
        return []
    # other path -> the module's first path; beyond a bound (2^depth paths of a module shared at every level of a
    # nesting), an entry is resolved as a path on its own and the close matches are looked for among fewer paths
    firsts = first_module_paths(model, _alias_paths_listed(model))
    resolver = None if firsts is not None else _ModulePaths(model)
    if resolver is not None:
        firsts = dict(resolver.edges)  # one other path per edge (as _edge_aliases lists them)
    known: set[str] = set()
    classes: set[type] = set()
    for name, module in model.named_modules():
        known.add(name)
        classes.update(type(module).__mro__)
    known.update(name for klass in classes for name in (klass.__name__, f"{klass.__module__}.{klass.__qualname__}"))
    warnings = []
    for entry in entries:
        if entry in known:
            continue
        if entry not in firsts and resolver is not None and _is_module_path(model, entry):
            firsts[entry] = resolver.canonical(entry)
        if entry in firsts:
            warnings.append(f"capture.leaf_modules entry {entry!r} is another path of the submodule "
                            f"{firsts[entry]!r} (one module under two names), and a module is kept as a leaf by "
                            f"its path in model.named_modules(), so it keeps nothing as a leaf: write "
                            f"{firsts[entry]!r} instead")
            continue
        resolved = _dotted_class(entry) if "." in entry else None
        if resolved is not None and resolved in classes:
            hint = (f"; {entry} is defined as {resolved.__module__}.{resolved.__qualname__}: write that path or "
                    f"the class name {resolved.__name__}")
        else:
            close = difflib.get_close_matches(entry, sorted((known | set(firsts)) - {""}), n=1)
            first = firsts.get(close[0]) if close else None
            hint = ("" if not close else f" (did you mean {close[0]}?)" if first is None else
                    f" (did you mean {first}, also named {close[0]}?)")
        warnings.append(f"capture.leaf_modules entry {entry!r} names no submodule path and no class of the model, "
                        f"so it keeps nothing as a leaf{hint}")
    return warnings


def _is_module_path(model: nn.Module, path: str) -> bool:
    """Whether ``path`` names a submodule of ``model`` (each step a module's child)."""
    module = model
    for part in path.split("."):
        module = module._modules.get(part) if isinstance(module, nn.Module) else None
        if module is None:
            return False
    return True


def _layer_class_names(model: nn.Module) -> set[str]:
    """The names a ``match.type`` entry can mean: the classes along the MRO of ``model``'s modules (``__name__``
    and ``__module__.__qualname__``, as :func:`_type_matches` compares) and the module classes of ``torch.nn``
    and ``orthofx.nn`` (the layers a policy names for any model, e.g. a preset's ``Conv3d``)."""
    namespaces = [vars(nn), vars(sys.modules[__package__ + ".nn"])]
    classes = {v for space in namespaces for v in space.values() if isinstance(v, type) and issubclass(v, nn.Module)}
    for module in model.modules():
        classes.update(k for k in type(module).__mro__ if k is not object)
    return {name for klass in classes for name in (klass.__name__, f"{klass.__module__}.{klass.__qualname__}")}


def unknown_type_entries(policy: Policy, model: nn.Module) -> list[str]:
    """Warnings for the entries of the rules' ``match.type`` lists that name no class of ``model``, of ``torch.nn``
    or of ``orthofx.nn`` (:func:`_layer_class_names`; a dotted path is resolved as :func:`_type_matches` resolves
    it): such an entry selects nothing, and in a rule whose other entries match, that passes in silence (a rule
    matching nothing is a :class:`PlanError` of its own): ``type: [Conv2d, Linaer]`` treats the convs and leaves
    every Linear as it is. Warnings, as :func:`unused_leaf_entries`' (``explain`` and ``report`` show them): the
    class may be one of another model the policy serves.

    Example: ``type: [Conv2d, Linaer]`` on ``small_cnn`` gives ``rule 'orth_regularizer[0]': match.type entry
    'Linaer' names no class of the model, torch.nn or orthofx.nn, so it selects nothing (did you mean Linear?)``."""
    if not any(rule.match.type for rule in policy.rules):
        return []
    classes = _layer_class_names(model)
    count = len(policy.rules)
    return [f"rule '{rule.name}'{_rule_place(rule, match=True, position=position, count=count)}: match.type entry "
            f"{entry!r} names no class of the model, torch.nn or orthofx.nn, so it selects nothing{hint}"
            for position, rule in enumerate(policy.rules) for entry, hint in _unknown_types(rule, classes)]


def _unknown_types(rule: Rule, classes: set[str]) -> list[tuple[str, str]]:
    """``(entry, hint)`` for each entry of ``rule``'s ``match.type`` that names none of ``classes``
    (:func:`_layer_class_names`) and no class a dotted path resolves to; ``hint`` is `` (did you mean X?)`` with the
    closest class name (``conv2d``, ``Linaer``), or ``""``."""
    plain = None
    found = []
    for entry in rule.match.type:
        if entry in classes or ("." in entry and _dotted_class(entry) is not None):
            continue
        plain = sorted(c for c in classes if "." not in c) if plain is None else plain
        # a dotted path torch does not resolve (``nn.Conv2d``: no module is named ``nn``) has its class name last;
        # compared in lower case too, where class names differ from a slip in case only (``conv2d``, ``LINEAR``)
        name = entry.rpartition(".")[2]
        same_case = [c for c in plain if c.lower() == name.lower()]
        close = same_case or difflib.get_close_matches(name, plain, n=1)
        found.append((entry, f" (did you mean {close[0]}?)" if close else ""))
    return found


def _unknown_type_hint(rule: Rule, model: nn.Module) -> str:
    """For a rule that matched nothing: its ``match.type`` entries that name no class of ``model``, torch.nn or
    orthofx.nn, with the closest class name, so the error says what the warning of :func:`unknown_type_entries`
    would have said (``type: conv2d``: `` Its match.type entry 'conv2d' names no class of the model, torch.nn or
    orthofx.nn (did you mean Conv2d?).``)."""
    if not rule.match.type:
        return ""
    unknown = _unknown_types(rule, _layer_class_names(model))
    if not unknown:
        return ""
    return "".join(f" Its match.type entry {entry!r} names no class of the model, torch.nn or orthofx.nn{hint}."
                   for entry, hint in unknown)


def _feeds_hint(rule: Rule, sites: list[Site], fed_by: dict[str, set[str]]) -> str:
    """For a ``feeds:`` rule that matched nothing: why, which the module types the error lists cannot show. The graph
    calls none of the ops (``feeds: svd`` on a model whose decomposition is ``linalg.eigh``), or no conv/linear
    layer feeds the calls, or the rule's other selectors left out the layers that do.

    Example: ``feeds: svd`` on ``dbn_cnn`` adds `` Its feeds (svd): the graph calls no svd; its decompositions:
    linalg.eigh.``"""
    feeds = rule.match.feeds
    if not feeds:
        return ""
    called = sorted({s.target for s in sites if s.kind == "function"})
    present = [op for op in feeds if op in called]
    if not present:
        return (f" Its feeds ({', '.join(feeds)}): the graph calls no {' or '.join(feeds)}; its decompositions: "
                f"{', '.join(called) or 'none'}.")
    feeding = sorted({name for op in present for name in fed_by.get(op, ())})
    if not feeding:
        return (f" Its feeds ({', '.join(feeds)}): no conv or linear layer feeds the graph's {' or '.join(present)} "
                "calls (the walk upstream from each call stops at the first conv/linear layer of each path, and "
                "found none).")
    shown = first_few([repr(name) for name in feeding], 6)
    return (f" Its feeds ({', '.join(feeds)}) select {shown}, which the rule's other selectors (type, name, exclude, "
            "where) leave out.")


def _missing_attribute_hint(rule: Rule, sites: list[Site], gm: nn.Module, fed_by: dict[str, set[str]],
                            aliases: dict[str, tuple[str, ...]] | None = None) -> str:
    """For a rule that matched nothing: the ``where:`` attributes that none of the layers it would otherwise select
    has (a misspelt key filters everything out), with the closest attribute names those layers do have, and the
    values that none of them holds, with the values they do hold (``groups: '1'``, a quoted string, is no 1).
    ``aliases``: first path -> other paths of the model's shared modules (:func:`module_aliases`), which the rule's
    name patterns select too.

    Example: ``where: {groups: '1'}`` on three convs adds `` The rule's where: 'groups' is an integer (1) on
    each of the 3 layer(s) it selects without 'where', never a string ('1').``"""
    if not rule.match.where:
        return ""
    unfiltered = dataclasses.replace(rule.match, where={})
    aliases = aliases or {}
    modules = [m for s in sites if (m := _module_or_none(gm, s)) is not None
               and _selects(unfiltered, s, m, fed_by, aliases.get(s.name, ()))]
    if not modules:
        return ""
    hints = []
    for attr, expected in rule.match.where.items():
        holders = [m for m in modules if _has_attribute(m, attr)]
        if holders:
            hint = _unmatched_value_hint(attr, expected, holders)
            if hint:
                hints.append(hint)
            continue
        known = sorted({a for m in modules for a in vars(m) if not a.startswith("_")})
        close = difflib.get_close_matches(attr, known, n=3)
        hints.append(f"none of the {len(modules)} layer(s) it selects without 'where' has an attribute '{attr}'"
                     + (f" (did you mean {' or '.join(close)}?)" if close else ""))
    return (" The rule's where: " + "; ".join(hints) + ".") if hints else ""


def _unmatched_value_hint(attr: str, expected: Any, holders: list[nn.Module]) -> str:
    """The values of ``attr`` on ``holders`` (the layers a rule selects without its ``where``, that have ``attr``)
    when the ``where`` value ``expected`` equals none of them; empty when one matches."""
    try:
        if any(_attribute_matches(m, {attr: expected}) for m in holders):
            return ""
    except _WhereError:  # build_plan raised it for the layer it met first; nothing to add here
        return ""
    values = list(dict.fromkeys(_value_text(_read_attribute(m, attr)[1]) for m in holders))
    where = (f"is {values[0]} on each of the {len(holders)} layer(s)" if len(values) == 1
             else f"is one of {first_few(values, 4)} on the {len(holders)} layer(s)")
    return (f"'{attr}' {where} it selects without 'where', never {_value_text(expected)}"
            + _python_none_hint(expected, f"write '{attr}: null' (or ~) to select layers whose '{attr}' is None"))


def _value_text(value: Any) -> str:
    """A ``where`` value or attribute in a message: sequences as lists (``[3, 3]``), a tensor as set, scalars
    with their type (``a string ('1')``, ``an integer (1)``), as the policy's own errors write them."""
    if isinstance(value, torch.Tensor):
        return "set (a tensor)"
    if isinstance(value, (tuple, list)):
        return str(_normalise(value))
    return _describe(value)


def _excluded_all_hint(rule: Rule, sites: list[Site], gm: nn.Module, fed_by: dict[str, set[str]],
                       aliases: dict[str, tuple[str, ...]] | None = None) -> str:
    """For a rule that matched nothing: the sites its ``exclude`` left out, when it selects some without it
    (``exclude: '*'`` or a pattern broader than meant), so the message does not send the user to the rest of the
    match. ``aliases`` as for :func:`_missing_attribute_hint`: a shared module is selected, and left out, by any of
    its paths (``name: decoder.*`` with ``exclude: encoder.*``, where ``self.decoder = self.encoder``), and its
    other paths are shown, since the site's name may not be the one the patterns met."""
    if not rule.match.exclude:
        return ""
    aliases = aliases or {}
    unexcluded = dataclasses.replace(rule.match, exclude=())
    left_out = [s.name for s in sites
                if _selects_for_hint(unexcluded, s, _module_or_none(gm, s), fed_by, aliases.get(s.name, ()))]
    if not left_out:
        return ""
    return (f" Its exclude ({', '.join(rule.match.exclude)}) left out all {len(left_out)} site(s) it selects "
            f"otherwise: {first_few([_also_named(name, aliases) for name in left_out], 4)}.")


def _also_named(name: str, aliases: dict[str, tuple[str, ...]]) -> str:
    """``name`` with the other paths of its module, as hints show a site: ``encoder.lin (also decoder.lin)``.

    >>> _also_named("encoder.lin", {"encoder.lin": ("decoder.lin",)}), _also_named("head", {})
    ('encoder.lin (also decoder.lin)', 'head')
    """
    others = aliases.get(name, ())
    return f"{name} (also {', '.join(others)})" if others else name


def _unmatched_name_hint(rule: Rule, sites: list[Site], gm: nn.Module, fed_by: dict[str, set[str]],
                         aliases: dict[str, tuple[str, ...]] | None = None, model: nn.Module | None = None) -> str:
    """For a rule that matched nothing: when its ``name`` patterns alone left out every site it selects otherwise,
    the names of those sites, so the message does not send the user to the types of the graph's sites; and per
    pattern the likely slip: a ``re:`` pattern found inside names (it must match the whole name: ``re:conv`` is
    no ``re:conv.*``), a glob that matches names in another case (names are case-sensitive), a pattern naming a
    container the graph does not call (``name: layer1``: :func:`_container_note`; the closest name was
    ``layer4.1.conv2``), the closest name. ``aliases`` as for :func:`_missing_attribute_hint`: the slips are looked
    for among every path of a shared module (``Decoder.lin`` is ``decoder.lin`` in another case, a path of the site
    ``encoder.lin``). ``model``: the module ``gm`` was captured from (its containers' classes), ``gm`` if None.

    Example: ``name: Conv1`` under ``orth_regularizer`` on ``small_cnn`` adds `` Its name pattern(s) (Conv1) match
    none of the 4 site(s) it selects otherwise: conv1, conv2, conv3, fc; 'Conv1' matches conv1 in another case
    (names are case-sensitive).``"""
    if not rule.match.name or rule.match.site_kind == "block":  # block sites exist only where a name selected one
        return ""
    aliases = aliases or {}
    unnamed = dataclasses.replace(rule.match, name=())
    selected = [(s, m) for s in sites
                if _selects_for_hint(unnamed, s, m := _module_or_none(gm, s), fed_by, aliases.get(s.name, ()))]
    pass_obj = get_pass(rule.apply)()
    # the layers the rule's pass can take (a name-only rule selects activations and pools too)
    names = [s.name for s, m in selected if pass_obj.accepts(s, m) is None] or [s.name for s, _ in selected]
    if not names:
        return ""
    # every path a pattern can name the sites by, with the site each names (a shared module's other paths too)
    site_of = {path: name for name in names for path in (name, *aliases.get(name, ()))}
    paths = list(site_of)

    def shown(path: str) -> str:
        return path if site_of[path] == path else f"{path} (a path of {site_of[path]})"

    notes = []
    containers = _uncalled_containers(model if model is not None else gm, sites)
    for pattern in rule.match.name:
        container = _container_note(rule, pattern, containers, names, sites, model if model is not None else gm,
                                    aliases)
        if container:  # checked first: the name is right, the kind of module is not (difflib found a layer inside)
            notes.append(container)
            continue
        if pattern.startswith("re:"):
            regex = _compiled_regex(pattern[3:])
            partial = [shown(n) for n in paths if regex.search(n)]
            if partial:
                notes.append(f"'{pattern}' must match a whole name and matches only part of {first_few(partial, 3)} "
                             f"(write 're:.*{pattern[3:]}.*', or a glob)")
            continue
        other_case = [shown(n) for n in paths if fnmatch.fnmatchcase(n.lower(), pattern.lower())]
        if other_case:
            notes.append(f"'{pattern}' matches {first_few(other_case, 3)} in another case (names are case-sensitive)")
            continue
        close = difflib.get_close_matches(pattern, paths, n=1)
        if close:
            notes.append(f"the closest name to '{pattern}' is {shown(close[0])}")
    return (f" Its name pattern(s) ({', '.join(rule.match.name)}) match none of the {len(names)} site(s) it selects "
            f"otherwise: {first_few([_also_named(name, aliases) for name in names], 6)}"
            + "".join(f"; {note}" for note in notes) + ".")


def _has_attribute(module: nn.Module, attr: str) -> bool:
    """``hasattr`` that also survives a property raising something else than AttributeError (it has one)."""
    try:
        return _read_attribute(module, attr)[0]
    except _WhereError:
        return True


def _root_layer_hint(rule: Rule, model: nn.Module | None) -> str:
    """Why a module rule finds nothing in a model that is itself one layer of the rule's types (``transform(
    nn.LSTM(...), ...)``): passes rewrite the layers a model calls, and the root is no such call."""
    types = getattr(get_pass(rule.apply), "module_types", ())
    if model is None or rule.match.site_kind != "module" or not types or not isinstance(model, types):
        return ""
    layer = type(model).__name__
    return (f" The model is itself one layer ({layer}): passes rewrite the layers a model calls, never the model "
            f"itself, so wrap it, e.g. orthofx.transform(torch.nn.Sequential(layer), policy) (the {layer} is then "
            "site '0')")


def _selected_modules(rule: Rule, model: nn.Module, aliases: dict[str, tuple[str, ...]],
                      position: int | None, count: int, *, for_hint: bool = False) -> list[str]:
    """The paths of ``model.named_modules()`` (not the root) that ``rule`` (of kind ``block`` or ``module``) selects,
    by name, type and attributes, whether the graph calls them or not. ``for_hint``: a ``where:`` value a module
    cannot compare leaves it out (:func:`_selects_for_hint`) rather than raise the rule's PlanError."""
    selected = []
    kind = rule.match.site_kind
    for name, module in model.named_modules():
        if not name:
            continue
        site = Site(kind, name, type(module).__name__, None, type(module))
        other_paths = aliases.get(name, ())
        if (_selects_for_hint(rule.match, site, module, {}, other_paths) if for_hint
                else _rule_selects(rule, site, module, {}, other_paths, position, count)):
            selected.append(name)
    return selected


def _uncalled_containers(model: nn.Module, sites: list[Site]) -> dict[str, str]:
    """Path -> class name of the containers of ``model`` that are no module site: modules holding submodules
    (``layer1``, a ResNet's ``BasicBlock``) whose forward capture traced through, so the graph calls the layers
    inside them, not them. Rules of ``kind: module`` select what the graph calls: a rule naming such a container
    (``name: layer1``, ``type: BasicBlock``) matches nothing (:func:`_container_note`,
    :func:`_container_type_hint`)."""
    site_names = {s.name for s in sites if s.kind != "function"}
    return {name: type(module).__name__ for name, module in model.named_modules()
            if name and name not in site_names and next(module.children(), None) is not None}


def _passes_taking_blocks() -> list[str]:
    """The registered passes that take ``kind: block`` sites (a container as a whole)."""
    return [name for name in available_passes() if "block" in get_pass(name).site_kinds]


def _as_block_text(rule: Rule, block_match: str, sites: list[Site], model: nn.Module,
                   aliases: dict[str, tuple[str, ...]], count: int = 1) -> str:
    """How to select containers as a whole (``block_match``: the match of such a rule, ``{kind: block, name:
    'layer1'}``) for a rule that named them: in this rule when its pass takes blocks, else with a pass that does;
    ``""`` where the model came from orthofx, whose graph inlined its containers for good (:func:`inlined_blocks`
    says so to a block rule). ``count``: how many containers the rule named."""
    whole = "the container as a whole" if count == 1 else "each container as a whole"
    as_block = dataclasses.replace(rule, match=dataclasses.replace(rule.match, kind="block", type=(), where={}))
    if inlined_blocks(as_block, sites, model, aliases) is not None:
        return ""
    if "block" in get_pass(rule.apply).site_kinds:
        return f", or {block_match} for {whole}"
    takers = _passes_taking_blocks()
    return (f", or, for {whole}, a rule {block_match} with a pass that takes blocks"
            + (f" ({', '.join(takers)})" if takers else ""))


def _inside(containers: Iterable[str], names: Iterable[str]) -> list[str]:
    """Those of ``names`` (site paths) inside one of ``containers``."""
    containers = list(containers)
    return [name for name in names if any(name.startswith(c + ".") for c in containers)]


def _container_note(rule: Rule, pattern: str, containers: dict[str, str], names: list[str], sites: list[Site],
                    model: nn.Module, aliases: dict[str, tuple[str, ...]]) -> str:
    """For a ``name`` pattern of a module rule that matched nothing: when it names containers the graph does not
    call (:func:`_uncalled_containers`), that, with the pattern selecting the layers inside them (``'layer1.*'``)
    and a block rule for the container as a whole; ``""`` otherwise. ``names``: the sites the rule selects without
    its name patterns."""
    if rule.match.site_kind != "module":  # function sites are named '<scope>:<op>', not by paths
        return ""
    named = [c for c in containers if any(match_pattern(pattern, path) for path in (c, *aliases.get(c, ())))]
    if not named:
        return ""
    if pattern.startswith("re:"):
        body = pattern[3:]
        inner = f"'re:{body if '|' not in body else f'(?:{body})'}\\..*'"
    else:
        inner = f"'{pattern}.*'"
    shown = first_few([f"{c} ({containers[c]})" for c in named], 3)
    inside = _inside(named, names)
    layers = (f"write {inner} for the {len(inside)} layer(s) inside that it selects otherwise "
              f"({first_few(inside, 3)})" if inside else
              f"none of the sites it selects otherwise is inside ({inner} would name the layers inside)")
    block = _as_block_text(rule, f"{{kind: block, name: '{pattern}'}}", sites, model, aliases, len(named))
    return f"'{pattern}' names {shown}, {_not_called_text(len(named))}: {layers}{block}"


def _container_type_hint(rule: Rule, sites: list[Site], model: nn.Module, aliases: dict[str, tuple[str, ...]],
                         position: int | None = None, count: int = 1) -> str:
    """For a module rule that matched nothing: the containers of ``model`` its ``match.type`` (with its name and
    where) selects, which the graph does not call (:func:`_uncalled_containers`; ``type: BasicBlock`` on a ResNet),
    with how to select the layers inside them, or the containers as a whole with a block rule.

    Example: ``type: BasicBlock`` on ``resnet18`` adds `` Its match.type (BasicBlock) selects layer1.0, layer1.1,
    layer2.0 and 5 more (BasicBlock), containers the graph does not call ...; select the layers inside by their own
    type (Conv2d) and name (e.g. {type: Conv2d, name: 'layer1.0.*'}), or ...``"""
    if rule.match.site_kind != "module" or not rule.match.type:
        return ""
    containers = _uncalled_containers(model, sites)
    named = [name for name in _selected_modules(rule, model, aliases, position, count, for_hint=True)
             if name in containers]
    if not named:
        return ""
    pass_obj = get_pass(rule.apply)()
    inside_names = set(_inside(named, (s.name for s in sites if s.kind == "module")))
    inside = [s for s in sites if s.kind == "module" and s.name in inside_names]
    takes = [s for s in inside if pass_obj.accepts(s, _submodule_or_none(model, s.name)) is None]
    types = list(dict.fromkeys(s.target for s in takes or inside))
    classes = ", ".join(dict.fromkeys(containers[name] for name in named))
    example = f"{{type: {types[0]}, name: '{named[0]}.*'}}" if types else f"{{name: '{named[0]}.*'}}"
    layers = (f"select the layers inside by their own type ({', '.join(types[:4])}) and name (e.g. {example})"
              if types else "no layer the graph calls is inside")
    # a type selecting containers inside one another (Sequential: layer1 and layer2.0.shortcut) would make blocks
    # that nest, which a block rule refuses: the first container by name then
    nested = bool(_inside(named, named))
    block_match = f"{{kind: block, name: '{named[0]}'}}" if nested else f"{{kind: block, type: {rule.match.type[0]}}}"
    block = _as_block_text(rule, block_match, sites, model, aliases, 1 if nested else len(named))
    return (f" Its match.type ({', '.join(rule.match.type)}) selects {first_few(named, 3)} ({classes}), "
            f"{_not_called_text(len(named))}: {layers}{block}.")


def _submodule_or_none(model: nn.Module, path: str) -> nn.Module | None:
    """``model.get_submodule(path)``, or None where ``model`` (the module a graph was captured from, for a hint) has
    no module at the path of a site of the graph."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _not_called_text(count: int) -> str:
    """Why ``count`` containers (:func:`_uncalled_containers`) are no sites."""
    if count == 1:
        return ("a container the graph does not call (capture traced through its forward: the layers inside are "
                "the sites)")
    return ("containers the graph does not call (capture traced through their forward: the layers inside are the "
            "sites)")


def _graph_leaves(sites: list[Site]) -> dict[str, str]:
    """Path -> type name of the modules the graph calls (module sites with a node)."""
    return {s.name: s.target for s in sites if s.kind == "module" and s.node is not None and s.name}


def _inside_leaf_hint(rule: Rule, sites: list[Site], model: nn.Module, aliases: dict[str, tuple[str, ...]],
                      position: int | None = None, count: int = 1) -> str:
    """For a ``kind: block`` rule that matched no block site: the modules of ``model.named_modules()`` it selects
    that sit inside a module the graph calls whole (a leaf: a torch.nn layer such as ``nn.TransformerEncoder``,
    or one kept by ``capture.leaf_modules``), so no block can be attached at them; names the enclosing leaf to
    select instead (the message sent the user to ``named_modules()``, which lists them). The containers of a model
    that orthofx made are no leaves: :func:`inlined_blocks` tells of those."""
    if rule.match.site_kind != "block":
        return ""
    leaves = _graph_leaves(sites)
    inside: dict[str, list[str]] = {}
    for name in _selected_modules(rule, model, aliases, position, count):
        if name in leaves:
            continue
        enclosing = [leaf for leaf in leaves if name.startswith(leaf + ".")]
        if enclosing:
            inside.setdefault(max(enclosing, key=len), []).append(name)
    if not inside:
        return ""
    blocks = {s.name for s in sites if s.kind == "block"}
    nested = [leaf for leaf in inside if leaf in blocks]
    if nested:  # kept whole because another block rule selects it
        leaf = nested[0]
        return (f" It selects {first_few(inside[leaf], 3)} inside {leaf}, a block that another rule selects: a "
                "block is called whole, as one call of the graph, so blocks do not nest: select the outer block or "
                "the inner one, not both.")
    notes = [f"{first_few(names, 3)} inside {leaf} ({leaves[leaf]})" for leaf, names in inside.items()]
    first = next(iter(inside))
    return (f" It selects {'; '.join(notes[:3])}, but capture keeps "
            f"{'that module' if len(inside) == 1 else 'those modules'} whole, as one call of the graph (a torch.nn "
            "layer, a module with hooks, or one listed in capture.leaf_modules), so no block can be attached inside: "
            f"select the enclosing module instead (e.g. {{kind: block, name: \"{first}\"}}), or make the model's own "
            "forward call the modules you meant (e.g. an nn.ModuleList of the layers, called in a loop).")


@dataclass(frozen=True)
class InlinedBlocks:
    """The modules a ``kind: block`` rule selects in a model that ``orthofx.transform`` or ``orthofx.freeze``
    returned (or in such a part of the model), which its graph never calls (:func:`inlined_blocks`)."""

    names: list[str]
    made_by: str  # "orthofx.transform" or "orthofx.freeze"
    part: str  # the path of the transformed part, "" for the model itself


def inlined_blocks(rule: Rule, sites: list[Site], model: nn.Module,
                   aliases: dict[str, tuple[str, ...]] | None = None) -> InlinedBlocks | None:
    """For a ``kind: block`` rule that matched no block site: the containers it would have selected as blocks in
    the original of a model that orthofx made (the model itself, or a part of it:
    :func:`orthofx.penalty.transformed_parts`), which the graph of the model now never calls.

    Tracing inlines containers: the GraphModule ``orthofx.transform`` and ``orthofx.freeze`` return calls the
    layers themselves, and keeps each container (``gm.layer1``) as a plain ``nn.Module`` at its path, never called
    and of no type a rule names (``Sequential`` selects none), so no block rule can select it. A container counts
    only where the original model's graph called it (its manifest's ``original_blocks``, recorded by transform
    and carried through freeze) and the rule selects it as it was there: by its ``name`` / ``exclude`` patterns
    and its original ``type``. Then one transform of the original, with both policies' rules, does select it.

    ``None`` (the usual message then) when the model is no such model; when its manifest has no record (written
    before it existed, a model frozen without a transform); when the rule has ``where`` or ``feeds`` selectors
    (the record holds no attributes or data flow, so whether the original matched is unknown); and when the rule
    selects none of the recorded containers: a typo, or a container the original never called as a whole (an
    ``nn.ModuleList`` iterated in the forward, a custom block a ``type: Sequential`` rule leaves out), where
    combining the rules would select nothing either. ``aliases``: the modules' other paths
    (:func:`_listed_aliases`), looked up when not given."""
    if rule.match.site_kind != "block" or rule.match.where or rule.match.feeds:
        return None
    from .penalty import transformed_parts  # (both modules import this one)
    from .transform import is_transformed, manifest_of

    root = unwrap_model(model)
    made = [("", root)] if is_transformed(root) else transformed_parts(root)
    if not made:
        return None
    if aliases is None:
        aliases = _listed_aliases(root, [rule])[0]
    called = _graph_leaves(sites)
    for part, module in made:
        manifest = manifest_of(module)
        original = _original_blocks_at(manifest.original_blocks, part)
        names = [name for name, sub in root.named_modules()
                 if name in original and name not in called
                 and next(sub.children(), None) is not None  # a container, not a layer the graph leaves unused
                 and not any(name.startswith(leaf + ".") for leaf in called)  # inside a leaf: _inside_leaf_hint
                 and rule.match.matches_name(name, *aliases.get(name, ()))
                 and (not rule.match.type or _recorded_type_matches(rule.match.type, original[name]))]
        if names:
            made_by = "orthofx.freeze" if manifest.frozen else "orthofx.transform"
            return InlinedBlocks(names, made_by, part)
    return None


def _original_blocks_at(record: dict[str, tuple[str, ...]] | None, part: str) -> dict[str, tuple[str, ...]]:
    """A manifest's ``original_blocks`` (paths in the transformed model) at their paths in a model holding that
    transformed model at ``part`` (``""``: the model itself); ``{}`` without a record."""
    if not record:
        return {}
    return {f"{part}.{path}" if part else path: classes for path, classes in record.items()}


def inlined_blocks_text(inlined: InlinedBlocks) -> tuple[str, str]:
    """What :func:`_no_match_message` says of ``inlined``: why the rule cannot match, and the fix."""
    which = "this model" if not inlined.part else f"the part '{inlined.part}' of this model"
    names = first_few([f"'{name}'" for name in inlined.names], 3)
    hint = (f"{names} {'is' if len(inlined.names) == 1 else 'are'} in named_modules(), but {which} came from "
            f"{inlined.made_by}, whose graph calls the layers themselves: tracing inlined its containers (kept as "
            "plain modules at their paths, never called), so no block rule can select them")
    original = "the original model" if not inlined.part else f"the model built with the original '{inlined.part}'"
    # a frozen model's rules are combined on the original to be trained: freezing drops the penalty terms, so it
    # comes after training, for inference
    then = ("; train that model (its penalty terms act only in training), then orthofx.freeze it for inference"
            if inlined.made_by == "orthofx.freeze" else "")
    fix = (f"Combine the rules in one transform of {original}, where the blocks are still called: "
           "orthofx.transform(original, Policy.from_dict({'rules': [*first.to_dict()['rules'], "
           f"*second.to_dict()['rules']]}})){then}")
    return hint, fix


def _leaf_fallbacks_hint(leaf_fallbacks: Iterable[tuple[str, str]]) -> str:
    """What a function rule's no-match message says of the modules capture kept whole as leaves (their code, a
    decomposition included, is not in the graph); ``""`` for none."""
    kept = list(leaf_fallbacks)
    if not kept:
        return ""
    listed = first_few([f"'{path}' ({first_line(reason, 240)})" for path, reason in kept], 3)
    hint = (f"; capture kept {listed} whole as leaf module{'s' if len(kept) > 1 else ''}, and a decomposition "
            "inside a leaf is no site (the graph calls the module, not its code)")
    remedies = []
    if any("autograd.Function" in reason for _, reason in kept):
        remedies.append("write the custom autograd.Function as a torch.library.custom_op with register_autograd "
                        "(capture keeps such an op as one call with its backward and traces the rest of the "
                        "module's forward)")
    remedies.append("move the decomposition out of that module into a submodule or forward capture traces")
    return f"{hint}. To make it a site, {', or '.join(remedies)}"


def _no_match_message(rule: Rule, sites: list[Site], passed_over: list[OrthofxLayer] = (),
                      position: int | None = None, count: int = 1, inlined: InlinedBlocks | None = None,
                      leaf_fallbacks: Iterable[tuple[str, str]] = ()) -> str:
    """``passed_over``: the orthofx layers the rule passes over (:func:`_passed_over`), the likely cause;
    ``position`` / ``count``: the rule's place in the policy, as :func:`_rule_place` takes them; ``inlined``: the
    blocks it names in a model orthofx made (:func:`inlined_blocks`), which no match can select there;
    ``leaf_fallbacks``: the capture's (``(path, reason)``), whose decompositions a function rule cannot see."""
    kind = rule.match.site_kind
    candidates = [s for s in sites if s.kind == kind]
    where = _rule_place(rule, match=True, position=position, count=count)
    fix = "Fix the match"
    if kind == "function":
        found = sorted({s.target for s in candidates})
        have = ", ".join(found) if found else "none"
        hint = f"the graph's decompositions: {have}{_leaf_fallbacks_hint(leaf_fallbacks)}"
    elif kind == "block" and inlined is not None:
        hint, fix = inlined_blocks_text(inlined)
    elif kind == "block":
        hint = "a block rule selects submodules by name and type; check match.name against model.named_modules()"
    else:
        types = Counter(s.target for s in candidates)
        top = ", ".join(f"{t} x{n}" for t, n in types.most_common(8)) or "none"
        hint = f"the graph's module sites: {top}"
    if passed_over:
        return (f"rule '{rule.name}'{where} matched no {kind} site; {hint}. {_already_orthofx_note(passed_over)}"
                "; or mark the rule 'optional: true' if the policy is meant for several models.")
    return (f"rule '{rule.name}'{where} matched no {kind} site; {hint}. {fix}, or mark the rule "
            "'optional: true' if the policy is meant for several models.")
