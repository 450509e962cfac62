"""The pass registry: rules name passes under ``apply:``; :func:`register_pass` adds user passes."""

from __future__ import annotations

from ..errors import OrthofxError
from .base import SITE_KINDS, Param, Pass

__all__ = ["register_pass", "get_pass", "available_passes", "unregister_pass", "UnknownPassError"]


class UnknownPassError(OrthofxError, KeyError):
    """No pass is registered under the name asked for. A ``KeyError`` too (what a registry lookup raised before),
    with the message shown as written, not quoted as a missing key is."""

    __str__ = Exception.__str__

_PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass] | None = None, *, replace: bool = False):
    """Register a :class:`~orthofx.passes.Pass` subclass under its ``name`` (usable as a class decorator).

    Raises :class:`orthofx.OrthofxError` if the name is taken (pass ``replace=True`` to override) or the class
    is not a well-formed pass.

    Example::

        import torch, orthofx
        from orthofx.passes import Change, Pass, available_passes, unregister_pass

        @orthofx.register_pass
        class CountLinears(Pass):          # records each Linear it is given, changes nothing
            name = "count_linears"
            module_types = (torch.nn.Linear,)

            def apply(self, ctx, entries):
                for entry in entries:
                    ctx.record(Change(entry.site.name, entry.rule_name, self.name, "counted", entry.params))

        assert available_passes()["count_linears"] is CountLinears
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        gm = orthofx.transform(model, {"rules": [{"match": {"type": "Linear"}, "apply": "count_linears"}]})
        assert [change.site for change in orthofx.manifest_of(gm).changes] == ["0", "2"]
        try:
            orthofx.register_pass(type("Another", (CountLinears,), {}))   # same name: refused without replace=True
        except orthofx.OrthofxError as error:
            print(error)
        unregister_pass("count_linears")
    """

    def add(pass_cls: type[Pass]) -> type[Pass]:
        if not (isinstance(pass_cls, type) and issubclass(pass_cls, Pass)):
            raise OrthofxError(f"register_pass expects a subclass of orthofx.passes.Pass, got {pass_cls!r}")
        name = pass_cls.name
        if not name or not isinstance(name, str) or not name.isidentifier():
            raise OrthofxError(f"{pass_cls.__name__}.name must be a non-empty identifier, got {name!r}")
        unknown = set(pass_cls.site_kinds) - set(SITE_KINDS)
        if unknown or not pass_cls.site_kinds:
            raise OrthofxError(f"{pass_cls.__name__}.site_kinds must be a non-empty subset of {SITE_KINDS}")
        if name in _PASSES and _PASSES[name] is not pass_cls and not replace:
            raise OrthofxError(f"a pass named '{name}' is already registered ({_PASSES[name].__qualname__}); "
                               "choose another name or pass replace=True")
        problem = _malformed(pass_cls)
        if problem:
            raise OrthofxError(f"{pass_cls.__name__}: {problem}")
        _PASSES[name] = pass_cls
        return pass_cls

    return add if cls is None else add(cls)


def _malformed(pass_cls: type[Pass]) -> str:
    """What makes ``pass_cls``'s declarations unusable, ``""`` when nothing does. Checked at registration, where the
    pass's author reads it: otherwise a rule naming the pass failed later with an AttributeError or TypeError from
    inside the policy or plan code (params not Param specs, module_types holding names), a parameter declared twice
    kept only its last spec, a default its own spec refuses ran unchecked (the policy only checks given values),
    and a pass without ``apply`` failed at the first transform with a bare NotImplementedError."""
    params = pass_cls.params
    if isinstance(params, Param) or not isinstance(params, (tuple, list)):
        return f"params must be a tuple of orthofx.passes.Param, got {params!r:.80}"
    seen = set()
    for param in params:
        if not isinstance(param, Param):
            return f"params must be a tuple of orthofx.passes.Param, and holds {param!r:.80}"
        if not isinstance(param.name, str) or not param.name:
            return f"a Param's name must be a non-empty string, got {param.name!r}"
        if param.name in seen:
            return f"params declare {param.name!r} twice; give each parameter once"
        seen.add(param.name)
        if not isinstance(param.types, tuple) or not param.types or not all(isinstance(t, type) for t in param.types):
            return f"Param {param.name!r}: types must be a non-empty tuple of types, got {param.types!r}"
        try:
            param.validate(param.default)
        except (ValueError, TypeError) as e:
            return (f"the default of Param {param.name!r} is refused by its own spec ({e}); a rule that leaves the "
                    "parameter out would run with it")
    types = pass_cls.module_types
    if not isinstance(types, tuple) or not all(isinstance(t, type) for t in types):
        return f"module_types must be a tuple of classes (e.g. (torch.nn.Linear,)), got {types!r:.80}"
    ops = pass_cls.ops
    if not isinstance(ops, tuple) or not all(isinstance(op, str) and op for op in ops):
        return f"ops must be a tuple of op names (e.g. ('linalg.eigh',)), got {ops!r:.80}"
    if not isinstance(pass_cls.group, str):
        return f"group must be a string (empty: the pass's own name), got {pass_cls.group!r}"
    if pass_cls.apply is Pass.apply:
        return "it does not implement apply(self, ctx, entries), which transform calls with the pass's plan entries"
    return ""


def unregister_pass(name: str) -> None:
    """Remove a registered pass (mainly for tests and notebooks that redefine a pass)."""
    _PASSES.pop(name, None)


def get_pass(name: str) -> type[Pass]:
    """The pass class registered under ``name``; :class:`UnknownPassError` naming the available ones otherwise."""
    try:
        return _PASSES[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name
        raise UnknownPassError(f"unknown pass {name!r}; available: {', '.join(sorted(_PASSES))} (a pass of your "
                               "own must be registered with orthofx.passes.register_pass first)") from None


def available_passes() -> dict[str, type[Pass]]:
    """Name -> pass class of every registered pass, sorted by name."""
    return dict(sorted(_PASSES.items()))
