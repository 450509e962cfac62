"""``transform``: capture -> plan -> passes -> verify -> (compile), and ``explain``, its dry run.

Example::

    import torch, orthofx
    model = orthofx.models.get("small_cnn")
    x = orthofx.models.example_input("small_cnn")
    print(orthofx.explain(model, "lorth", example_inputs=(x,)))
    gm = orthofx.transform(model, "lorth", example_inputs=(x,))
    loss = gm(x).logsumexp(1).mean() + orthofx.penalty(gm)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import sys
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import torch
from torch import fx, nn

from .capture import (_join, _outside_branches, capture, copy_model, copy_targets, input_tuple, keyword_inputs,
                      module_edges_holding, one_trace_at_a_time, positional_call, replaced_forward,
                      uninitialised_lazy_modules, unwrap_model)
from .errors import (ArgumentError, CaptureError, OrthofxError, OrthofxWarning, TransformError, caller_stacklevel,
                     damaged_metadata_entry, first_few, saved_count)
from .nn.precision import describe_nonfinite, relative_distance
from .passes.base import (MANIFEST_KEY, EvalRun, Manifest, ParametrizationState, PassContext, PlanEntry, Site,
                          default_device_set_aside, parameters_watched, replace_module, watch_hooked_weights)
from .passes.registry import get_pass
from .plan import (InlinedBlocks, Plan, block_paths, build_plan, called_module_classes, called_modules,
                   inlined_blocks, inlined_blocks_text, meta_tensors, meta_text, other_mode_graph)
from .policy import Policy

__all__ = ["transform", "explain", "manifest_of", "store_manifest", "is_transformed", "output_tensors",
           "PENALTY_CALLS_METADATA_KEY", "PENALTY_PHASES_METADATA_KEY"]


# GraphModule pickling (torch.save of the whole module) rebuilds ``meta`` empty but keeps unknown attributes, so
# the manifest is also kept under this attribute and put back into ``meta`` when found there only.
_MANIFEST_ATTRIBUTE = "_orthofx_manifest"


def store_manifest(gm: fx.GraphModule, manifest: Manifest) -> None:
    """Attach ``manifest`` to ``gm`` (``gm.meta["orthofx"]``, and an attribute that survives pickling), and the
    state-dict hooks that save and restore its count of penalty calls."""
    gm.meta[MANIFEST_KEY] = manifest
    setattr(gm, _MANIFEST_ATTRIBUTE, manifest)
    keep_penalty_calls_in_state_dict(gm)


def keep_penalty_calls_in_state_dict(gm: nn.Module) -> None:
    """Register (once) on a transformed ``gm`` the hooks that save its count of penalty calls in its state dict's
    metadata and restore it on load; nothing for another module. Again on a copy or an unpickled ``gm``
    (``orthofx.capture``'s rebuilds): a GraphModule is rebuilt from its code and attributes, without hooks."""
    if _find_manifest(gm) is not None and _save_penalty_calls not in gm._state_dict_hooks.values():
        gm.register_state_dict_post_hook(_save_penalty_calls)
        gm.register_load_state_dict_pre_hook(_load_penalty_calls)


#: Key of the transformed model's count of ``orthofx.penalty`` calls (``Manifest.penalty_calls``, where its terms
#: with ``every > 1`` are in their periods) in its state-dict metadata (``state_dict()._metadata[path]``).
PENALTY_CALLS_METADATA_KEY = "orthofx_penalty_calls"
#: Key of the ``(every, phase)`` of each of its penalty terms (in ``Manifest.penalties`` order) next to the count:
#: which call of its period each term is evaluated on.
PENALTY_PHASES_METADATA_KEY = "orthofx_penalty_phases"


def _save_penalty_calls(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    # training state (a resumed run must evaluate the same terms at the same steps), but a key would change the
    # model's keys: it goes into the module's metadata, which torch.save / torch.load(weights_only=True) keep.
    # The count means nothing without the call each term is due on: the transform spreads the terms by their
    # weights' shapes, which a lazy layer has only once it ran (with example_inputs, not without), so the model a
    # run resumes in may have spread them otherwise; the phases travel with the count
    manifest = _find_manifest(module)
    if manifest is not None and manifest.penalty_period() > 1:
        local_metadata[PENALTY_CALLS_METADATA_KEY] = int(manifest.penalty_calls)
        local_metadata[PENALTY_PHASES_METADATA_KEY] = tuple((int(t.every), int(t.phase)) for t in manifest.penalties)


def _load_penalty_calls(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, *args) -> None:
    manifest = _find_manifest(module)
    if manifest is None:
        return
    calls = saved_count(
        local_metadata, PENALTY_CALLS_METADATA_KEY, prefix, "the count of orthofx.penalty calls of a transformed model",
        "the model's own count",
        needed=manifest.penalty_period() > 1 and any(key.startswith(prefix) for key in state_dict))
    phases = _saved_phases(local_metadata, prefix, manifest)
    if phases is not None:
        for term, phase in zip(manifest.penalties, phases):
            term.phase = phase
        _restate_phases(manifest)
    if calls is None:
        return  # a plain model's state dict, or one saved without periods: the count stays
    manifest.penalty_calls = calls % manifest.penalty_period()  # saved with other periods: still inside this one


def _saved_phases(local_metadata: dict, prefix: str, manifest: Manifest) -> list[int] | None:
    """The phases saved next to the count (:func:`_save_penalty_calls`) when they fit ``manifest``'s terms (as
    many, each with the same ``every``); ``None`` when absent (a state dict saved before they were) or when they
    fit other terms (another policy or model: the model's own phases stay, the count lands modulo its period).
    A damaged entry raises like a damaged count."""
    saved = local_metadata.get(PENALTY_PHASES_METADATA_KEY)
    if saved is None:
        return None
    valid = isinstance(saved, (tuple, list)) and all(
        isinstance(pair, (tuple, list)) and len(pair) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in pair) and 0 <= pair[1] < pair[0]
        for pair in saved)
    if not valid:
        raise damaged_metadata_entry(prefix, PENALTY_PHASES_METADATA_KEY, saved,
                                     "the (every, phase) of each penalty term of a transformed model",
                                     "pairs of ints with 0 <= phase < every", "the model's own phases")
    if len(saved) != len(manifest.penalties) or any(every != t.every for (every, _), t in
                                                     zip(saved, manifest.penalties)):
        return None
    return [phase for _, phase in saved]


def _restate_phases(manifest: Manifest) -> None:
    """The changes of ``orth_regularizer`` say the call of the period each term is now due on."""
    from .passes.orth_regularizer import OrthRegularizer, restate_period

    terms = {(t.site, t.rule): t for t in manifest.penalties}
    for change in manifest.changes:
        term = terms.get((change.site, change.rule))
        if term is not None and change.pass_name == OrthRegularizer.name:
            change.what = restate_period(change.what, term)


def manifest_of(model: nn.Module) -> Manifest:
    """The manifest of a transformed model (also through ``torch.compile`` and DDP wrappers).

    Raises :class:`orthofx.OrthofxError` for a model that ``orthofx.transform`` did not return.

    Example::

        import orthofx
        gm = orthofx.transform(orthofx.models.get("small_cnn"), "lorth")
        manifest = orthofx.manifest_of(gm)                      # what gm.meta["orthofx"] holds
        print([(change.site, change.what) for change in manifest.changes])
        assert [term.site for term in manifest.penalties] == ["conv1", "conv2", "conv3", "fc"]
        assert manifest.policy == orthofx.Policy.preset("lorth")
    """
    manifest = _find_manifest(model)
    if manifest is None:
        raise OrthofxError(f"{type(unwrap_model(model)).__name__} was not produced by orthofx.transform (no manifest "
                           f"in gm.meta[{MANIFEST_KEY!r}]); call orthofx.transform(model, policy) first")
    return manifest


def _find_manifest(model: nn.Module) -> Manifest | None:
    """:func:`manifest_of` without the error: ``None`` for a model ``orthofx.transform`` did not return (a test
    that raises nothing, for the penalty's search through a bigger model's submodules at every step)."""
    root = unwrap_model(model)
    meta = getattr(root, "meta", None)
    if isinstance(meta, dict) and isinstance(meta.get(MANIFEST_KEY), Manifest):
        return meta[MANIFEST_KEY]
    manifest = getattr(root, _MANIFEST_ATTRIBUTE, None)
    if isinstance(manifest, Manifest):
        if isinstance(meta, dict):
            meta[MANIFEST_KEY] = manifest
        return manifest
    return None


def is_transformed(model: nn.Module) -> bool:
    """Whether ``model`` (or what it wraps) was returned by ``orthofx.transform``.

    Example::

        import torch, orthofx
        model = orthofx.models.get("small_cnn")
        gm = orthofx.transform(model, "lorth")
        assert orthofx.is_transformed(gm) and not orthofx.is_transformed(model)
        assert orthofx.is_transformed(torch.nn.DataParallel(gm))      # wrappers are looked through
    """
    return _find_manifest(model) is not None


@dataclasses.dataclass(frozen=True)
class ExampleCall:
    """The example call ``model(*args, **kwargs)`` that ``transform`` runs the model with (``example_inputs`` and
    ``example_kwargs``)."""

    args: tuple
    kwargs: dict[str, Any]

    def run(self, fn: Callable) -> Any:
        """``fn`` called on a copy of the inputs (:meth:`fresh`)."""
        call = self.fresh()
        return fn(*call.args, **call.kwargs)

    def fresh(self) -> ExampleCall:
        """The call with a new copy of each of its tensors (nested ones included).

        A forward may write into its inputs (``x.mul_(2)``, ``x[:, 0] = 0``): every run on the example inputs gets
        its own copy, so that the user's tensors stay as they were and each run compared (the model before and
        after the rewrite, a frozen model and the program written from it) reads the same values."""
        copies: dict[int, torch.Tensor] = {}  # one copy per tensor: inputs given twice, (x, x), stay one tensor

        def own(value: Any) -> Any:
            if not isinstance(value, torch.Tensor):
                return value
            if id(value) not in copies:
                copies[id(value)] = value.detach().clone().requires_grad_(value.requires_grad)
            return copies[id(value)]

        args, kwargs = torch.utils._pytree.tree_map(own, (self.args, self.kwargs))
        return ExampleCall(tuple(args), dict(kwargs))

    def named_inputs(self) -> list[tuple[str, Any]]:
        """``(label, value)`` of every input of the call, nested inputs (a dict, a tuple of tensors) down to their
        leaves, labelled as the user passed them (``example_inputs[0]``, ``example_inputs[0]['x']``,
        ``example_kwargs['mask']``), for checks and error messages. The leaves are pytree's, the walk with which
        torch.export takes the inputs apart and :func:`orthofx.capture.batch_dynamic_shapes` marks their batch."""
        pytree = torch.utils._pytree
        top = ([(f"example_inputs[{i}]", x) for i, x in enumerate(self.args)]
               + [(f"example_kwargs[{name!r}]", x) for name, x in self.kwargs.items()])
        return [(label + pytree.keystr(path), leaf)
                for label, value in top for path, leaf in pytree.tree_flatten_with_path(value)[0]]

    def device(self) -> torch.device | None:
        """The device of the call's first tensor (:meth:`named_inputs` order), where the model's data lives; ``None``
        for a call without tensors."""
        return next((x.device for _, x in self.named_inputs() if isinstance(x, torch.Tensor)), None)

    def positional(self, gm: fx.GraphModule) -> tuple | None:
        """The inputs in ``gm``'s placeholder order (what ``fx.Interpreter.run`` takes), defaults filled in;
        ``None`` when they do not bind to its forward's signature or it has a variadic parameter."""
        try:
            signature = inspect.signature(gm.forward)
            bound = signature.bind(*self.args, **self.kwargs)
        except (TypeError, ValueError):
            return None
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()):
            return None
        bound.apply_defaults()
        return tuple(bound.arguments.values())


def example_call(example_inputs: Any, example_kwargs: Any) -> ExampleCall | None:
    """The example call of ``example_inputs`` (a tensor or a tuple) and ``example_kwargs`` (a dict of keyword
    inputs); ``None`` when neither is given."""
    args = input_tuple(example_inputs, error=TransformError)
    kwargs = keyword_inputs(example_kwargs, error=TransformError)
    if args is None and not kwargs:
        return None
    return ExampleCall(args or (), kwargs)


@contextlib.contextmanager
def _own_state_dict_hooks_detached(model: nn.Module) -> Iterator[None]:
    """Take off ``model``'s root the state-dict hooks a transform registered (:func:`keep_penalty_calls_in_state_dict`)
    while it is captured again, and put them back after: capture warns that the root's state-dict hooks are lost
    in the new GraphModule, which for these is no loss (the new transform registers them on its result), so a
    second transform of a transformed model would tell the user to register orthofx's own hooks again."""
    own = (_save_penalty_calls, _load_penalty_calls)
    taken = []
    for hooks in (model._state_dict_hooks, model._load_state_dict_pre_hooks):
        for key, hook in list(hooks.items()):
            if getattr(hook, "hook", hook) in own:  # a load pre-hook is kept wrapped (_WrappedHook.hook)
                taken.append((hooks, key, hooks.pop(key)))
    try:
        yield
    finally:
        for hooks, key, hook in taken:
            hooks[key] = hook


def _capture_and_plan(root: nn.Module, policy: Policy, example: ExampleCall | None
                      ) -> tuple[fx.GraphModule, Plan]:
    meta = meta_tensors(root) if example is not None else []
    if meta:
        # the runs on the example inputs fail, or (on meta inputs) give outputs without values, which the checks
        # of the result read: refused here, so that explain refuses it as transform does, before any work
        raise TransformError(f"the model cannot run on example_inputs: {meta_text(meta)}")
    if example is not None and uninitialised_lazy_modules(root):
        # the plan must see the shapes the passes will see: an uninitialised LazyLinear reads as Linear(0->2),
        # which a rule for square layers would select and its pass then skip
        _runs(root, example)
    blocks = block_paths(root, policy)
    # capture.leaf_modules holds class names and module paths: the entries naming a submodule are paths
    paths = {name for name, _ in root.named_modules() if name}
    named = [entry for entry in policy.capture.leaf_modules if isinstance(entry, str) and entry in paths]
    call = None if example is None else example.fresh()  # one copy of the inputs for capture's own runs
    with _own_state_dict_hooks_detached(root):
        gm, info = capture(root, leaf_types=policy.capture.leaf_modules, leaf_paths=list(blocks) + named,
                           mode=policy.capture.mode, example_inputs=None if call is None else call.args,
                           example_kwargs=None if call is None else call.kwargs)
    plan = build_plan(gm, policy, info, blocks=blocks, model=root, has_example_inputs=example is not None)
    return gm, plan


@one_trace_at_a_time
def explain(model: nn.Module, policy: Any, example_inputs: Any = None, *, example_kwargs: Any = None) -> Plan:
    """Dry run of :func:`transform`: the plan of which rule applies which pass to which site; nothing changes.

    ``print(orthofx.explain(model, policy))`` shows the table. ``example_inputs`` are needed when the model is
    captured with torch.export (capture mode ``export``, or ``auto`` when symbolic tracing fails), with
    ``example_kwargs`` for a forward that takes keyword inputs (as in :func:`transform`); the first line of the
    table says which capture mode was used. What ``transform`` refuses before planning, ``explain`` refuses alike:
    a transformed model that carries penalty terms or optimizer hooks, or holds a transformed part that does
    (:class:`TransformError`; freeze it first), and example inputs for a model with parameters or buffers on the
    meta device (no run on them could be checked). What the passes will decide, the status column says: ``apply:
    fails: ...`` where ``transform`` raises before any pass runs (e.g. a pass that needs the values of a weight on
    the meta device: :class:`~orthofx.errors.MetaWeightError`), ``apply: left free ...`` where ``riemannian``'s
    ``free`` leaves a layer unconstrained, and the sites whose scale a Stiefel constraint undoes (where
    ``transform`` warns :class:`~orthofx.ScaleLostWarning`), which the notes under the table list as the report's.

    Example::

        import orthofx
        model = orthofx.models.get("small_cnn")
        plan = orthofx.explain(model, "lorth")   # a dry run: the model is traced, not changed
        print(plan)                              # one row per site: rule, pass, params, apply / skipped / shadowed
        assert [entry.site.name for entry in plan.entries] == ["conv1", "conv2", "conv3", "fc"]
    """
    policy = Policy.load(policy)
    example = example_call(example_inputs, example_kwargs)
    _refuse_dropping_attachments(model)  # the dry run refuses what transform would refuse
    # Capture runs the model's forward (symbolic tracing, or torch.export on the example inputs): any Python side
    # effect of that forward (a counter, a cache) would happen on the user's model, so a copy is traced.
    with _recursion_explained(model, "explain"):
        root = copy_model(unwrap_model(model))
        _, plan = _capture_and_plan(root, policy, example)
    return plan


def _nesting(model: nn.Module) -> tuple[int, str]:
    """How many modules deep ``model`` nests (its direct children: 1) and the path of a deepest one."""
    depth, deepest = 0, ""
    for name, _ in model.named_modules(remove_duplicate=False):
        level = name.count(".") + 1 if name else 0
        if level > depth:
            depth, deepest = level, name
    return depth, deepest


@contextlib.contextmanager
def _recursion_explained(model: nn.Module, what: str) -> Iterator[None]:
    """Turn a RecursionError into a :class:`CaptureError` that says why and what to do: copying a model
    (``copy.deepcopy``) and tracing it (``torch.fx``) recurse several Python frames per level of module nesting, so a
    model nested a few hundred modules deep reaches Python's recursion limit (1000 by default) though it runs; and
    the parser's refusal of fx's generated code for such a model, once the limit is raised."""
    try:
        yield
    except (RecursionError, SyntaxError) as exc:
        # torch.fx's generated code nests one call per level of a path (getattr of numeric names): past about
        # 200 levels Python's parser refuses it, once the recursion limit no longer stops the copy first
        if isinstance(exc, SyntaxError) and "too many nested parentheses" not in str(exc):
            raise
        depth, deepest = _nesting(unwrap_model(model))
        limit = sys.getrecursionlimit()
        if len(deepest) > 60:
            deepest = f"{deepest[:28]}...{deepest[-28:]}"
        where = f"a model that nests modules {depth} deep (the deepest: '{deepest}')"
        if isinstance(exc, SyntaxError):
            raise CaptureError(
                f"orthofx.{what}: Python's parser refuses the code torch.fx generates for {where}, which nests a "
                "call per level (too many nested parentheses, past about 200 levels); nest the model's modules "
                "less deeply") from None
        raise CaptureError(
            f"orthofx.{what} reached Python's recursion limit ({limit}) on {where}: copying and tracing it take "
            f"several Python frames per level. Raise the limit before the call (sys.setrecursionlimit("
            f"{max(limit, 10 * depth + 1000)})) or nest the model's modules less deeply (torch.fx's generated code "
            "of a model nested 200 deep or more is refused by Python's parser); if the model's own forward recurses "
            f"without end, fix that first ({type(exc).__name__}: {exc})") from None


def _observe(gm: fx.GraphModule, plan: Plan, example: ExampleCall, manifest: Manifest,
             model: nn.Module | None = None) -> tuple[Any, dict[str, tuple], set[str]]:
    """Run ``gm`` once on the example inputs: record the input/output shape of every module site's first call in the
    manifest (and every distinct input shape of its calls: ``all_input_shapes``), and return the output, the inputs of
    the planned module sites (for passes to measure with) and the module sites the run called
    (:attr:`PassContext.called_sites`; a call inside a ``torch.cond`` branch is not seen). The hooks that record them
    also keep torch's eval fast path of ``nn.TransformerEncoderLayer`` (which computes with its sublayers' weights
    without calling them, where training calls them) from being taken by a layer holding a site: torch takes it only for
    a layer with no forward (pre-)hook in it. When ``gm`` fails, ``model`` (what was captured) is run too, to tell a
    capture problem from bad inputs."""
    names = {site.name for site in plan.sites if site.kind != "function"}
    planned = {entry.site.name for entry in plan.entries if entry.site.kind != "function"}
    site_inputs: dict[str, tuple] = {}
    called: set[str] = set()
    handles = []

    def hook(name):
        def record(module, args, kwargs, output):
            called.add(name)  # whatever its inputs: the shapes below skip some calls
            # a layer with hooks keeps a keyword call as written (self.c(input=x)): its input is still its first
            args, _ = positional_call(module, args, kwargs)
            # a nested tensor (nn.TransformerEncoder's eval fast path with a padding mask) has no single shape
            if not args or not isinstance(args[0], torch.Tensor) or args[0].is_nested:
                return
            # every distinct input shape (a layer called on two input sizes is judged on both: orthogonal_conv)
            shape = tuple(args[0].shape)
            seen = manifest.all_input_shapes.setdefault(name, [])
            if shape not in seen:
                seen.append(shape)
            if name in manifest.input_shapes:
                return
            manifest.input_shapes[name] = shape
            if isinstance(output, torch.Tensor) and not output.is_nested:
                manifest.output_shapes[name] = tuple(output.shape)
            if name in planned:
                site_inputs[name] = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        return record

    for name in names:
        handles.append(gm.get_submodule(name).register_forward_hook(_outside_branches(hook(name)), with_kwargs=True))
    try:
        with EvalRun(gm):
            out = example.run(gm)
    except Exception as exc:
        failure = exc
    else:
        return out, site_inputs, called
    finally:
        for h in handles:
            h.remove()
    cause = f"{type(failure).__name__}: {failure}"
    meta = meta_tensors(gm)
    if meta:
        raise TransformError(f"the model cannot run on example_inputs: {meta_text(meta)} ({cause})") from failure
    mode = getattr(plan.capture, "mode", None)
    if model is not None and _runs(model, example):
        why = (". Symbolic tracing cannot see which way a Python branch on an argument goes (e.g. 'if mask is not "
               "None:' for an optional argument) and took a path these inputs do not take. Fix: set capture: "
               "{mode: export} in the policy (torch.export follows the example inputs), or list the submodule "
               "with the branch under capture.leaf_modules") if mode == "fx" else (
               ". Fix: try the other capture mode (capture: {mode: fx} or {mode: export} in the policy)")
        raise TransformError(f"the captured graph (capture mode {mode}) fails on example_inputs although the model "
                             f"itself runs on them: {cause}{why}") from failure
    raise TransformError(f"the model failed on example_inputs before any rewrite: {cause}. Check the inputs' "
                         f"shapes, dtypes and devices{_model_dtype_device(gm)}.") from failure


def _branch_hint(exc: Exception) -> str:
    """The fix for a rewritten model torch refuses to run because a layer changed by a pass is called inside a
    ``torch.cond`` / ``while_loop`` / ``map`` body (in a leaf's own forward): torch compiles such a body as a whole
    and refuses any change to Python state there, which a Jacobian probe makes at each call (its estimate)."""
    if type(exc).__name__ != "UncapturedHigherOrderOpError":
        return ""
    return ("\nA layer a pass changed is called inside a torch.cond / while_loop / map body (in the forward of a "
            "module kept as a leaf), where torch refuses a layer that changes Python state at each call (a "
            "jacobian_isometry probe records its estimate). Fix: leave that layer out of the rule (match: {exclude: "
            "[<its name>]}), or call it outside the branch.")


def _model_dtype_device(module: nn.Module) -> str:
    """`` (the model's parameters: float32 on cpu)`` for an error about inputs; ``""`` for a model without any."""
    kinds = sorted({(str(p.dtype).replace("torch.", ""), str(p.device)) for p in module.parameters()})
    if not kinds:
        return ""
    return " (the model's parameters: " + ", ".join(f"{dtype} on {device}" for dtype, device in kinds) + ")"


def _runs(model: nn.Module, example: ExampleCall) -> bool:
    """Whether ``model`` runs on the example call (eval mode, no gradients, training flags restored)."""
    try:
        with EvalRun(model):
            example.run(model)
    except Exception:  # noqa: BLE001 - only the yes/no matters
        return False
    return True


class _NodeTracker(fx.Interpreter):
    """Runs a graph node by node and remembers the node it is running (the one that raised, after a failure)."""

    current: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        return super().run_node(n)


def _where_it_fails(gm: fx.GraphModule, example: ExampleCall, manifest: Manifest) -> str:
    """`` at node 'x' (...)``: the graph node whose call fails on the example call and the change that made that
    node, found by running the graph again node by node; ``""`` when that run does not fail (or cannot say
    where)."""
    tracker = _NodeTracker(gm)
    inputs = example.fresh().positional(gm)
    if inputs is None:
        return ""
    try:
        with EvalRun(gm):
            tracker.run(*inputs)
    except Exception:  # noqa: BLE001 - the caller reports the original error; only the node is wanted here
        node = tracker.current
    else:
        return ""
    if node is None:
        return ""
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    what = f"{node.op} {target}"
    if node.op == "call_module":
        what += f": {type(gm.get_submodule(str(node.target))).__name__}"
    made_by = [f"rule '{c.rule}' ({c.pass_name})" for c in manifest.changes if c.site in (node.name, target)]
    return f" at node '{node.name}' ({what}{', changed by ' + ', '.join(made_by) if made_by else ''})"


def output_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a model's output (any nesting of tuples, lists and dicts), in pytree order; inside what
    pytree keeps whole, a mapping it has no rule for (a ``ModelOutput``-style dict subclass) or a dataclass, in
    their own order (values, fields): the checks on the outputs would otherwise see no tensor there."""
    found: list[torch.Tensor] = []
    for leaf in torch.utils._pytree.tree_flatten(output)[0]:
        if isinstance(leaf, torch.Tensor):
            found.append(leaf)
        elif isinstance(leaf, Mapping):
            found.extend(output_tensors(list(leaf.values())))
        elif dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
            found.extend(output_tensors([getattr(leaf, f.name) for f in dataclasses.fields(leaf)]))
    return found


def _nonfinite_indices(output: Any) -> list[int]:
    """Indices (in :func:`output_tensors` order) of the floating outputs holding NaN or inf."""
    return [i for i, t in enumerate(output_tensors(output))
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _nonfinite_tensors(named: Any) -> list[str]:
    """``'conv.bias' (1 NaN entry (of 4))`` for each of the ``(name, tensor)`` pairs holding NaN or inf."""
    found = []
    for name, tensor in named:
        # an uninitialised lazy parameter has no values to read (the example run initialises the copy's only)
        if isinstance(tensor, nn.parameter.UninitializedTensorMixin):
            continue
        counts = describe_nonfinite(tensor.detach())
        if counts is not None:
            found.append(f"{name!r} ({counts})")
    return found


def _nonfinite_inputs(example: ExampleCall) -> list[str]:
    """``example_inputs[0] (1 NaN entry (of 216))`` for each floating leaf of the example call holding NaN or
    inf, labelled as the user passed it (:meth:`ExampleCall.named_inputs`)."""
    return [f"{label} ({counts})" for label, leaf in example.named_inputs() if isinstance(leaf, torch.Tensor)
            and (counts := describe_nonfinite(leaf.detach())) is not None]


def _model_cause(model: nn.Module, example: ExampleCall) -> str:
    """Why the model's own output on the example call is not finite, and how to fix it: its parameters/buffers
    and the example inputs holding NaN or inf, by name. Read before any pass runs (with ``inplace=True`` the passes
    change ``model``'s weights), and only once an output is known to be non-finite."""
    tensors = _nonfinite_tensors([*model.named_parameters(), *model.named_buffers()])
    inputs = _nonfinite_inputs(example)
    holds = []
    if tensors:
        holds.append(f"The model's parameters/buffers holding NaN or inf: {first_few(tensors, 3)}")
    if inputs:
        holds.append(f"{'the' if tensors else 'The'} example inputs holding NaN or inf: {first_few(inputs, 3)}")
    if not holds:
        return ("The model's parameters, buffers and example inputs are all finite, so its forward makes the NaN/inf "
                "(an overflow, 0/0, the log of a negative...). Fix: transform a model that is finite on the "
                "example inputs, or pass example inputs it is finite on")
    fix = " and ".join(what for what, found in (("load finite weights into the model", tensors),
                                                ("pass finite example inputs", inputs)) if found)
    return f"{'; '.join(holds)}. Fix: {fix}, then transform it"


def _rewrite_suspects(rewritten: nn.Module | None, example: ExampleCall | None) -> str:
    """``; the rewritten model's parameters holding NaN or inf: ...`` (and the example inputs holding some, which
    the model's own output did not depend on) for an error blaming the passes; ``""`` when there are none.
    Parameters only: buffers of a fresh monitor hold NaN on purpose (an empty history)."""
    tensors = _nonfinite_tensors(rewritten.named_parameters()) if rewritten is not None else []
    inputs = _nonfinite_inputs(example) if example is not None else []
    text = ""
    if tensors:
        text += f"; the rewritten model's parameters holding NaN or inf: {first_few(tensors, 3)}"
    if inputs:
        text += (f"; the example inputs hold NaN or inf that the model's own output did not depend on: "
                 f"{first_few(inputs, 3)}")
    return text


def _check_output(before: Any, after: Any, *, model_cause: str = "", rewritten: nn.Module | None = None,
                  example: ExampleCall | None = None) -> None:
    """Refuse a rewritten model whose outputs ``after`` differ in number or shape from the model's ``before``
    (both on the example inputs) or hold NaN / inf.

    A non-finite output is blamed on what caused it: when the model's own output is already non-finite there, on
    the model or its inputs (``model_cause``, from :func:`_model_cause`), since the rewrite did not cause it and
    the output change and the parity checks would be meaningless; otherwise on the passes, naming the rewritten
    model's non-finite parameters (``rewritten``) if a pass produced any. A rewrite that makes a non-finite output
    finite (``isometric`` zeroes a NaN bias) passes."""
    old, new = output_tensors(before), output_tensors(after)
    if len(old) != len(new):
        raise TransformError(f"the rewritten model returns {len(new)} tensors where the model returned "
                             f"{len(old)}; a pass changed the output structure")
    for i, (a, b) in enumerate(zip(old, new)):
        if a.shape != b.shape:
            raise TransformError(f"output {i} changed shape from {tuple(a.shape)} to {tuple(b.shape)} after "
                                 "rewriting; a pass broke the model's shapes")
    already = _nonfinite_indices(before)
    for i in _nonfinite_indices(after):
        bad = int((~torch.isfinite(new[i])).sum())
        if i in already:
            raise TransformError(f"output {i} of the model has {int((~torch.isfinite(old[i])).sum())} non-finite "
                                 f"value(s) on example_inputs before any rewrite (the rewritten model's: {bad}): "
                                 "they come from the model or its inputs, not from the rewrite. "
                                 f"{model_cause or 'Check the weights of the model and the example inputs'}")
        raise TransformError(f"output {i} of the rewritten model has {bad} non-finite value(s) on example_inputs "
                             f"where the model's own output is finite: a pass made it so"
                             f"{_rewrite_suspects(rewritten, example)}; check the policy's parameters (e.g. gain, "
                             "eps)")


def _relative_change(before: Any, after: Any) -> float | None:
    """The floating outputs' relative change (:func:`~orthofx.nn.precision.relative_distance`: ``None`` for a
    zero or non-finite original output); 0 for a model without floating outputs."""
    old = [t.detach().double().flatten() for t in output_tensors(before) if t.is_floating_point()]
    new = [t.detach().double().flatten() for t in output_tensors(after) if t.is_floating_point()]
    if not old:
        return 0.0
    return relative_distance(torch.cat(new), torch.cat(old))


def _run_passes(ctx: PassContext, plan: Plan, selected: Callable[[Site], bool]) -> None:
    """Apply the plan's entries for the ``selected`` sites, pass by pass in policy order."""
    # a pass (of the user's) may tie or untie weights: PassContext's index follows. The passes build layers and
    # draw weights on the CPU and move them to the model's device, which a user's torch.set_default_device('meta'
    # or 'cuda') would otherwise redirect
    if ctx.user_default_device is None:  # the example inputs' device where there are some, else the default
        ctx.user_default_device = torch.get_default_device()
    with parameters_watched(), default_device_set_aside():
        for pass_name in plan.pass_order():
            entries = [e for e in plan.entries_for(pass_name) if selected(e.site)]
            if not entries:
                continue
            try:
                get_pass(pass_name)().apply(ctx, entries)
            except OrthofxError:
                raise
            except Exception as exc:
                # a pass computing from weights that have no values (a model built on the meta device) fails deep
                # inside torch: say so, and how to fix it, instead of torch's message alone
                meta = meta_tensors(ctx.gm)
                why = f". The model cannot be rewritten: {meta_text(meta)}" if meta else ""
                raise TransformError(f"pass '{pass_name}' failed{_failing_site(exc, entries)}: "
                                     f"{type(exc).__name__}: {exc}{why}") from exc


def _failing_site(exc: BaseException, entries: list[PlanEntry]) -> str:
    """Where a pass raised a non-orthofx exception: `` at <site> (rule '<rule>')`` for the plan entry the pass was
    working on (the innermost frame of the traceback holding one of ``entries`` in a local variable: passes loop
    over their entries), else the sites of all ``entries`` (a few of them) so the message names a place."""
    ids = {id(entry): entry for entry in entries}
    found = None
    tb = exc.__traceback__
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            if id(value) in ids:
                found = ids[id(value)]
                break
        tb = tb.tb_next
    if found is not None:
        return f" at {found.site.name or '<root>'} (rule '{found.rule_name}')"
    names = [entry.site.name or "<root>" for entry in entries]
    shown = first_few(names, 5)
    return f" on one of its sites ({shown})"


def _share_replaced_layers(root: nn.Module, gm: fx.GraphModule) -> None:
    """``inplace=True``: set the layers the passes put into ``gm`` at the same paths of the user's model. Only
    modules the graphs call are considered: fx builds its own intermediate containers, which must not replace the
    model's.

    A module under two names (``self.b = self.a``) is one site, named by its first path: the model must call the
    new layer under every name, as gm does. Every such name ends in one (module, child name) edge of the model, so
    the edges holding a replaced module are set, each once: a module shared at every level of a nesting has 2^depth
    paths but 2 edges per level. The modules inside a replaced one are left as they are, as under its first path."""
    called = sorted(called_modules(gm), key=lambda path: path.count("."))
    replaced: dict[int, tuple[str, nn.Module]] = {}  # id(old) -> (its first path, the new layer)
    done: list[str] = []
    for path in called:
        if any(path.startswith(outer + ".") for outer in done):
            continue
        try:
            old = root.get_submodule(path)
        except AttributeError:
            continue  # a module the passes added (a monitor): the model has no place for it
        new = gm.get_submodule(path)
        if new is not old:
            replaced[id(old)] = (path, new)
            done.append(path)
    if not replaced:
        return
    paths = [(_join(parent, name), old) for parent, name, old in
             module_edges_holding(root, lambda module: id(module) in replaced)]
    # the first path last: replace_module labels the layer with the path it puts it at (the site's name)
    for path, old in sorted(paths, key=lambda item: item[0] == replaced[id(item[1])][0]):
        replace_module(root, path, replaced[id(old)][1])


def _rewrite_other_mode(gm: fx.GraphModule, graph: fx.Graph, mode: str, plan: Plan, manifest: Manifest) -> None:
    """The passes on the other training mode's graph of a two-mode ``gm`` (capture.ModalGraphModule).

    Both graphs call the same modules, which the passes have rewritten already (module sites are rewritten on
    ``gm`` whichever graph calls them); what is left are this graph's function sites (graph edits). The passes
    see a GraphModule of this graph holding ``gm``'s submodules, and what they add to it (monitors) is given
    to ``gm``.
    """
    def selected(site: Site) -> bool:
        return site.kind == "function" and site.mode == mode

    if not any(selected(entry.site) for entry in plan.entries):
        return
    view = fx.GraphModule(gm, graph)
    for name, child in gm.named_children():  # gm's own containers, not the copies the view made
        view._modules[name] = child
    _run_passes(PassContext(gm=view, manifest=manifest), plan, selected)
    graph.lint()
    copy_targets(view, gm, graph)
    graph.owning_module = gm


def _versions(model: nn.Module) -> dict[str, int]:
    """``{name: version counter}`` of ``model``'s parameters and buffers (an in-place write bumps it)."""
    return {name: t._version for name, t in (*model.named_parameters(), *model.named_buffers())
            if not t.is_inference()}


def _note_written_weights(exc: OrthofxError, model: nn.Module, versions: dict[str, int],
                          modules: dict[str, nn.Module] | None = None, who: str = "earlier rules") -> None:
    """With ``inplace=True``, add to ``exc``'s message what the passes before the failure had done to the user's
    ``model``: the tensors they wrote (``versions``: before any pass ran) and the layers they replaced
    (``modules``: ``named_modules()`` before any pass ran). The error stops the transform, not what it had done to
    the model."""
    written = [name for name, version in _versions(model).items() if versions.get(name, version) != version]
    replaced: dict[str, nn.Module | None] = {}  # path -> the module there now (None: gone)
    for path, old in (modules or {}).items():
        if not path or any(path.startswith(outer + ".") for outer in replaced):
            continue
        try:
            now = model.get_submodule(path)
        except AttributeError:
            now = None
        if now is not old:
            replaced[path] = now
    # a replaced layer's tensors are named by the layer
    written = [name for name in written if not any(name.startswith(path + ".") for path in replaced)]
    if not (written or replaced) or not exc.args or not isinstance(exc.args[0], str):
        return
    done = []
    if written:
        done.append(f"written {first_few(written, 4)}")
    if replaced:
        kinds = sorted({type(now).__name__ for now in replaced.values() if now is not None})
        done.append(f"replaced the layers {first_few(list(replaced), 4)}" + (f" (now {', '.join(kinds)})" if kinds
                                                                             else ""))
    fix = "rebuild the model (or load its saved weights into a fresh one)" if replaced else "load its weights again"
    exc.args = (f"{exc.args[0].rstrip('.')}. With inplace=True, {who} had already {' and '.join(done)} of the "
                f"model: {fix} before retrying",) + exc.args[1:]


def _compile_options(compile: Any) -> dict[str, Any] | None:
    """``transform``'s ``compile`` argument as ``torch.compile`` options (``None``: do not compile), checked before
    any work is done."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return {}
    if isinstance(compile, dict):
        options = dict(compile)
        try:
            # torch.compile checks its arguments when called and compiles lazily, at the first forward: a trial
            # call on a stand-in finds a bad option (an unknown name, mode or backend) before any pass runs, which
            # with inplace=True would already have rewritten the user's model
            torch.compile(nn.Identity(), **options)
        except Exception as exc:  # noqa: BLE001 - TypeError, RuntimeError, dynamo's InvalidBackend
            raise ArgumentError(f"torch.compile rejects the compile options {options}: {type(exc).__name__}: "
                                f"{exc}. Pass options torch.compile accepts (e.g. {{'mode': 'reduce-overhead'}}, "
                                "{'fullgraph': True}), or compile=True for its defaults") from exc
        return options
    raise ArgumentError(f"compile must be None, True/False or a dict of torch.compile options (e.g. "
                        f"{{'mode': 'reduce-overhead'}}), got {compile!r}")


def _compile(gm: fx.GraphModule, options: dict[str, Any] | None) -> nn.Module:
    if options is None:
        return gm
    try:
        return torch.compile(gm, **options)
    except TypeError as exc:
        raise TransformError(f"torch.compile rejected the options {options}: {exc}") from exc


def _refuse_dropping_attachments(model: nn.Module) -> None:
    """Refuse to transform a transformed model that carries penalty terms or optimizer hooks: the new manifest
    would replace its own, so ``orthofx.penalty`` and ``orthofx.attach`` would silently lose the first policy's
    regularisers and hooks. A frozen model (no terms, no hooks) or one whose policy attached none may be
    transformed again. The same holds for a transformed part of the model (``nn.Sequential(gm, head)``): capture
    traces through it, so its manifest, and with it its terms and hooks, is not in the result."""
    from .penalty import transformed_parts  # (penalty imports this module)

    root = unwrap_model(model)
    for path, module in [("", root), *transformed_parts(root)]:
        manifest = _find_manifest(module)
        if manifest is None:
            continue
        carried = []
        if manifest.penalties:
            carried.append(f"{len(manifest.penalties)} penalty term(s)")
        if manifest.optimizer_hooks:
            carried.append(f"{len(manifest.optimizer_hooks)} optimizer hook(s)")
        if not carried:
            continue
        if not path:
            raise TransformError(
                f"this model was already transformed and carries {' and '.join(carried)} of its policy, which a "
                "second transform would drop (its manifest replaces the first). Transform the original model once "
                "with a policy holding the rules of both (e.g. Policy.from_dict({'rules': [*first.to_dict()['rules'], "
                "*second.to_dict()['rules']]})), or freeze it first (orthofx.freeze) to start from plain layers")
        raise TransformError(
            f"the part '{path}' of this model ({type(unwrap_model(module)).__name__}) was transformed by orthofx and "
            f"carries {' and '.join(carried)} of its policy, which transforming the whole model would drop: the "
            "result's manifest holds the new policy's changes only (capture traces through the part, or keeps it as a "
            "leaf without its manifest). Transform the "
            f"other parts alone (each transformed part keeps its own terms: orthofx.penalty(model) sums them all), "
            f"build the model from the original '{path}' and transform it once, or freeze the part first (set "
            f"'{path}' to orthofx.freeze(model.get_submodule('{path}')): its terms are then left out on purpose)")


@one_trace_at_a_time
def transform(model: nn.Module, policy: Any, example_inputs: Any = None, *, example_kwargs: Any = None,
              inplace: bool = False, compile: Any = None) -> nn.Module:
    """Rewrite ``model`` according to ``policy`` and return a ``torch.fx.GraphModule``.

    A model whose forward branches on ``self.training`` (outside leaf layers) is captured in both modes and
    comes back as an :class:`orthofx.capture.ModalGraphModule`: ``gm.train()`` / ``gm.eval()`` switch between
    the two rewritten graphs as on the model (the other mode's function sites are named ``...@eval`` or
    ``...@train`` in the plan and the report).

    Args:
        model: any ``nn.Module`` (``torch.compile``, DataParallel and DDP wrappers are unwrapped).
        policy: a :class:`orthofx.Policy`, a dict, a YAML path or text, or a preset name (``orthofx presets``).
        example_inputs: a tensor or a tuple of inputs. When given, the model runs once before and once after
            rewriting (eval mode, no gradients): input sizes are recorded for the report and the result is
            checked for unchanged output shapes and finite values (a non-finite output that the model already has
            on them is refused naming its NaN/inf parameters, buffers or inputs). Capture mode ``export`` (and
            ``auto`` when symbolic tracing fails) builds the graph with torch.export on them, so they are needed
            there.
        example_kwargs: a dict of keyword inputs of the example call, for a forward such as
            ``forward(self, x, *, mask=None)``: the example is ``model(*example_inputs, **example_kwargs)``.
            Export capture makes them inputs of the graph by name; an argument the example leaves out keeps its
            default there (the graph refuses another value for it), so pass every argument you will vary.
        inplace: rewrite ``model``'s own layers instead of a deep copy's (no second copy of the weights): weights
            a pass changes change in ``model`` (``isometric_init``), and the layers a pass puts in place of
            others (orthogonal layers, ConvNorm wrappers, Jacobian probes) are set at the same paths of
            ``model``. Graph edits (penalty bookkeeping, decomposition rewrites, monitors) exist only in the
            returned module. By default a deep copy is rewritten and ``model`` stays bitwise identical.
        compile: ``True`` or a dict of ``torch.compile`` options to return the compiled module; every orthofx
            function accepts it.

    The manifest of every change is at ``gm.meta["orthofx"]``; ``orthofx.report(gm)`` shows it.

    Example::

        import torch, orthofx
        model = orthofx.models.get("small_cnn")
        x = orthofx.models.example_input("small_cnn")
        gm = orthofx.transform(model, "orthogonal", example_inputs=(x,))   # exactly orthogonal layers
        print(type(gm.conv2).__name__, type(model.conv2).__name__)          # OrthogonalConv2d Conv2d: model untouched
        sv = orthofx.metrics.conv_singular_values(gm.conv2.weight, 8, stride=2)   # at conv2's 8 x 8 input
        assert (sv - 1).abs().max() < 1e-5
    """
    # a flag, not a truthy value: inplace="no" would rewrite the user's model
    if not isinstance(inplace, bool):
        raise ArgumentError(f"inplace must be True or False, got {inplace!r}; inplace=True rewrites the model's own "
                            "layers, inplace=False (the default) a copy")
    compile_options = _compile_options(compile)
    policy = Policy.load(policy)
    example = example_call(example_inputs, example_kwargs)
    root = unwrap_model(model)
    _refuse_dropping_attachments(model)
    with _outside_inference_mode(), _recursion_explained(root, "transform"):
        work = root if inplace else copy_model(root)
        if not inplace:
            _refuse_forward_calling_the_original(work)
        gm = _rewrite(work, policy, example, user_model=root if inplace else None)
    return _compile(gm, compile_options)


def _refuse_forward_calling_the_original(work: nn.Module) -> None:
    """Refuse a copy whose forward, replaced on the instance, is no method of the copy itself: a closure or a
    ``functools.wraps`` of the original's bound forward still calls the original model, so the graph captured
    from the copy (by torch.export: symbolic tracing refuses a replaced forward) would compute with the
    original's weights, as constants, and the result would have no parameters of its own to train."""
    forward = replaced_forward(work)
    if forward is None or getattr(forward, "__self__", None) is work:  # a method: deepcopy rebinds it to the copy
        return
    raise TransformError(
        f"the model's forward is replaced on the instance ({forward!r}) by a function that is no method of the "
        "model, so the copy transform works on would still call the original model (a closure over it, or "
        "functools.wraps of its bound forward) and the result would compute with the original's weights. Fix: "
        "transform with inplace=True (the model itself is rewritten), bind the replacement as a method "
        "(types.MethodType(f, model)), or move the code into a subclass's forward")


@contextlib.contextmanager
def _outside_inference_mode() -> Iterator[None]:
    """Leave ``torch.inference_mode`` (gradients stay off, as they were there) while the model is copied and
    rewritten: a copy, or a layer a pass builds, made inside it holds inference tensors, which autograd refuses
    to save for backward, so the returned model could not be trained ("Inference tensors cannot be saved for
    backward" at the first ``loss.backward()``), even where the policy changes nothing."""
    if not torch.is_inference_mode_enabled():
        yield
        return
    with torch.inference_mode(False), torch.no_grad():
        yield


def transform_private_copy(model: nn.Module, policy: Any, example_inputs: Any = None, *,
                           example_kwargs: Any = None) -> fx.GraphModule:
    """:func:`transform` of a model the caller made for this call and holds no other reference to (``load``'s
    copy converted to the saved dtype): its own layers are rewritten, as ``transform`` does to its deep copy,
    without a second copy of the weights. Errors read as ``transform``'s with ``inplace=False``: no user model
    is written."""
    policy = Policy.load(policy)
    example = example_call(example_inputs, example_kwargs)
    _refuse_dropping_attachments(model)
    return _rewrite(unwrap_model(model), policy, example, user_model=None)


def _nothing_planned_message(plan: Plan, model_name: str, policy: Policy | None = None,
                             model: nn.Module | None = None) -> str:
    """Why a policy changes nothing in a model (its rules matched no site, or skipped every one they matched): an
    optional rule of a preset meant for other architectures (``jacobian`` on a model without Sequential blocks)
    would otherwise return an unchanged model silently, and training it would add no orthogonality at all.

    On a model ``orthofx.transform`` or ``orthofx.freeze`` returned (``policy`` and ``model`` given), an optional
    block rule matches nothing because tracing inlined the model's containers (:func:`orthofx.plan.inlined_blocks`):
    naming the blocks in a rule cannot help there, combining the rules in one transform of the original model can."""
    reasons = [f"optional rule '{name}' matched nothing" for name in plan.unmatched_optional]
    for site, rule, reason in plan.skipped[:3]:
        reasons.append(f"rule '{rule}' skipped '{site.name or '<root>'}': {reason}")
    if len(plan.skipped) > 3:
        reasons.append(f"{len(plan.skipped) - 3} more site(s) skipped")
    why = "; ".join(reasons) if reasons else "no rule matched a site"
    said = (f"the policy changes nothing in {model_name} ({why}): the returned module computes what the model "
            "computes (no pass applies). orthofx.explain(model, policy) lists what each rule matches; ")
    inlined = _inlined_optional_blocks(plan, policy, model)
    if inlined is None:
        return said + ("name the model's blocks or layers in a rule (e.g. match: {kind: block, name: ...}) or pick "
                       "another preset")
    rule, found = inlined
    hint, fix = inlined_blocks_text(found)
    return said + f"the block rule '{rule}' selects none of this model's blocks: {hint}. {fix}."


def _inlined_optional_blocks(plan: Plan, policy: Policy | None, model: nn.Module | None
                             ) -> tuple[str, InlinedBlocks] | None:
    """The first optional block rule of ``policy`` that matched nothing because ``model`` came from orthofx (its
    name and :func:`orthofx.plan.inlined_blocks`), or ``None``."""
    if policy is None or model is None:
        return None
    unmatched = set(plan.unmatched_optional)
    for rule in policy.rules:
        if rule.name in unmatched:
            found = inlined_blocks(rule, plan.sites, model)
            if found is not None:
                return rule.name, found
    return None


def _original_blocks(gm: fx.GraphModule, work: nn.Module) -> dict[str, tuple[str, ...]] | None:
    """The manifest's record of the blocks of the original model (:attr:`Manifest.original_blocks`), read from
    ``gm``, captured from ``work`` before any pass ran (:func:`orthofx.plan.called_module_classes`). For a ``work``
    that orthofx made, those of its own original, which its graph no longer calls (tracing inlined them), with what
    its graph calls; ``None`` when its manifest has no record (pickled before it existed)."""
    own = called_module_classes(gm, work)
    if not is_transformed(work):
        return own
    earlier = manifest_of(work).original_blocks
    return None if earlier is None else {**earlier, **own}


def _rewrite(work: nn.Module, policy: Policy, example: ExampleCall | None, *,
             user_model: nn.Module | None) -> fx.GraphModule:
    """Capture ``work``, plan and run the passes on it, check the result on the example call. ``user_model``
    (``inplace=True``): the user's model, which is ``work``: errors name what the passes had written into it, and
    the layers the passes put in place are set at its paths too. The torch parametrizations' state is put back
    before each run on the example inputs and at the end (:class:`~orthofx.passes.base.ParametrizationState`:
    planning and the passes read weights, which advances a training-mode ``spectral_norm``), so those runs and
    the returned model see the model's own state."""
    with ParametrizationState.kept(work) as parametrizations:
        gm, plan = _capture_and_plan(work, policy, example)
        for entry in plan.entries:
            if entry.refusal is not None:
                raise entry.refusal
        if not plan.entries:
            warnings.warn(_nothing_planned_message(plan, type(work).__name__, policy, work), OrthofxWarning,
                          stacklevel=caller_stacklevel())
        gm.training = work.training
        # a copy: the manifest's policy is what export saves and load replays, which a caller's later edit of the
        # Policy object it passed (Policy.load(p) is p) must not change
        manifest = Manifest(policy=copy.deepcopy(policy), plan=plan, capture=plan.capture,
                            original_blocks=_original_blocks(gm, work))
        parametrizations.restore()  # planning read weights: the runs on the example see the model's own state
        before, site_inputs, called = (_observe(gm, plan, example, manifest, work) if example is not None
                                       else (None, {}, None))
        # what makes the model's own output non-finite, read now: the passes may change ``work``'s weights in place
        model_cause = _model_cause(work, example) if example is not None and _nonfinite_indices(before) else ""

        # Module sites are modules whichever graph calls them: their passes all run on gm.
        versions = _versions(work) if user_model is not None else {}
        modules = dict(work.named_modules()) if user_model is not None else {}
        try:
            _run_passes(PassContext(gm=gm, manifest=manifest, site_inputs=site_inputs, called_sites=called,
                                    replaces_user_layers=user_model is not None,
                                    user_default_device=None if example is None else example.device()), plan,
                        lambda site: site.kind != "function" or not site.mode)
        except OrthofxError as exc:
            _note_written_weights(exc, work, versions, modules)
            raise
        gm.graph.lint()
        other = other_mode_graph(gm)
        if other is not None:
            _rewrite_other_mode(gm, other[0], other[1], plan, manifest)
        gm.recompile()
        store_manifest(gm, manifest)
        if user_model is not None:
            _share_replaced_layers(user_model, gm)

        if example is not None:
            parametrizations.restore()  # so did the passes
            try:
                with EvalRun(gm):
                    try:
                        after = example.run(gm)
                    except Exception as exc:
                        where = _where_it_fails(gm, example, manifest)
                        raise TransformError(f"the rewritten model failed on example_inputs{where}: "
                                             f"{type(exc).__name__}: {exc}{_branch_hint(exc)}") from exc
                _check_output(before, after, model_cause=model_cause, rewritten=gm, example=example)
            except OrthofxError as exc:
                # the check comes after every pass: with inplace=True the model holds all they did
                _note_written_weights(exc, work, versions, modules, who="the passes")
                raise
            manifest.output_change = _relative_change(before, after)
        # a forgotten orthofx.attach warns at the first optimizer step that updates a hooked weight
        watch_hooked_weights(gm, manifest.optimizer_hooks)
        return gm
