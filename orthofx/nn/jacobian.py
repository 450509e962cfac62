"""``JacobianProbe``: a block that also estimates how far its input-output Jacobian is from an isometry (P2).

The probe wraps a block and returns the block's output unchanged. In training mode (with gradients enabled), on
every ``every``-th call, it also computes :func:`orthofx.metrics.jacobian_isometry` of the block at the same
input, differentiable with respect to the block's parameters, and keeps it as :attr:`JacobianProbe.estimate`
(the last estimate; a plain attribute, not a buffer, so it never enters ``state_dict``). In eval mode, under
``torch.no_grad()`` and on skipped calls the probe only runs the block and the estimate is ``None``, so a
penalty built from it is zero and holds no stale graph; none of those calls is a step of ``every`` (a validation
pass between training steps leaves the schedule as it was, as for ``orthofx.penalty``'s L_orth terms). An empty
batch (a first input with no elements) in training mode makes no estimate either, so the penalty is zero for it
(:func:`~orthofx.metrics.jacobian_isometry` refuses one: its value there is undefined), but it is a call of the
step, counted in ``every``: the schedule follows the model's training forwards. Under ``torch.compile`` a
batch whose size is data-dependent (selected by a mask inside the compiled graph, or marked with
``torch._dynamo.mark_unbacked``) cannot be told empty while tracing: there an empty batch is estimated, and the
estimate is a zero tensor (penalty 0, gradient 0) instead of ``None``. A penalty reads the last estimate, so it
is added after the forward: trained on after an optimizer step, or after a backward went through it, the estimate
of an earlier forward raises a :class:`~orthofx.errors.LayerArgumentError` at backward saying so
(``orthofx.penalty(gm) + task(gm(x))`` evaluates the penalty first; see :meth:`JacobianProbe._estimate_for_penalty`).

Transparent wrapping. The probe shares the block's registries (its parameters, buffers and submodules are the
block's own dictionaries), so ``probe.state_dict()`` has exactly the block's keys, ``named_parameters()`` and
``named_modules()`` give the block's paths, and a probe put at the block's place in a model (``setattr`` on the
parent) changes no checkpoint key and no module path: ``layer1.0.conv1.weight`` stays ``layer1.0.conv1.weight``
(a probe with the block as a registered child would rename it ``layer1.block.0.conv1.weight`` and break every
saved state and every name-based reference). Saving and loading go through the block's own
``_save_to_state_dict`` / ``_load_from_state_dict`` (class-specific versions, extra state). The probe's step in its
``every`` period (:attr:`JacobianProbe.calls`) travels in the state dict's metadata (``state_dict()._metadata``,
next to the block's ``version``, as torch keeps a module's version: no key is added), so a training run resumed from
``gm.state_dict()`` estimates on the steps the uninterrupted run would; a state dict without it (the plain
model's) leaves the probe's step as it is. Attributes the probe
does not have are looked up on the block (``probe.in_features`` of a wrapped Linear). :attr:`block` is the
wrapped module (unless that has a submodule named ``block``, which it then is, so paths through the probe stay
the block's); :meth:`to_plain` returns it (``orthofx.freeze`` uses it to remove the probe). A block with a member
named like one of the probe's own attributes (``penalty``, ``kind``, ``every`` ...) is refused.

The estimate's extra forward passes run the block on copies of its buffers (``torch.func.functional_call``), so
BatchNorm running statistics move once per step, as without the probe; they draw from the global RNG (the probes,
and a dropout in the block samples other masks than the block's real forward) and run the forward hooks of the
block's submodules again. The inputs are detached for the estimate (the first, the Jacobian's variable, and the
others, held fixed): the regulariser shapes the block's own parameters, not the layers that produce its inputs.
Under activation checkpointing (``use_reentrant=False``) the estimate keeps its own tensors, outside the
checkpoint, and the recomputation inside backward runs only the block, from the random state the block's call
started from in the forward (after the estimate's draws; the region itself restores only its starting state), so
that a dropout in the block or after it draws the forward's masks again and the gradients are those of the
forward (each checkpointed micro-batch its own; not for a region nested in another's recomputation); with
``use_reentrant=True`` the checkpointed forward runs without gradients, so the probe makes no estimate at all: use
``use_reentrant=False``.
``torch.fx.symbolic_trace`` of a model holding a probe records the probe as one ``call_module`` node (its block
is not a registered submodule, and the estimate is nested autograd on concrete tensors), so the traced model makes
the same estimates. A training-mode estimate cannot run inside ``torch.func`` transforms (``vmap`` / ``grad``,
per-sample gradients) nor under ``torch.export``: both raise :class:`~orthofx.errors.LayerArgumentError` (put the
probe in eval mode, where it only runs its block, or remove it). With BatchNorm in training mode the samples of a
batch are coupled; see :func:`orthofx.metrics.jacobian_isometry`
for what ``per_sample`` then measures.

Example::

    import torch
    from orthofx.nn.jacobian import JacobianProbe
    block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
    probe = JacobianProbe(block, weight=0.1)
    x = torch.randn(4, 8)
    loss = probe(x).square().mean() + probe.penalty()
    loss.backward()          # the penalty's gradient reaches block[0].weight
"""

from __future__ import annotations

import inspect
import itertools
import math
import threading
import weakref
from typing import Any, Callable

import torch
from torch import nn

from .. import metrics
from ..errors import LayerArgumentError, keep_in_metadata, layer_label, saved_count
from ..theory import _flag, _positive_int, _real
from .precision import zero_like_parameters
from .tracing import (NOT_RECORDED, checkpoint_region, fx_tracer_of, in_export, in_func_transform, record_as_leaf,
                      recomputing_in_backward, record_for_recomputation, recorded_for_recomputation)

__all__ = ["JacobianProbe"]

_ROUTES = ("auto", "jvp", "double_vjp")
#: Key of the probe's step in its ``every`` period in its state-dict metadata (``state_dict()._metadata[path]``).
PHASE_METADATA_KEY = "orthofx_probe_calls"
_OWN = ("penalty_weight", "probes", "kind", "every", "per_sample", "normalize", "route", "seed", "estimate",
        "route_used", "calls", "batch_fraction", "calls_per_step", "_draw_shift", "_penalty_dtype")


#: Numbers the probes of a process: the multiple of MAX_JACOBIAN_PROBES their compiled draws are shifted by
#: (:func:`orthofx.metrics._jacobian_isometry`'s ``draw_shift``).
_DRAW_SHIFTS = itertools.count(1)


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _seed(seed) -> int:
    """``seed`` as a Python int (:func:`~orthofx.theory._positive_int` without a lower bound: numpy's and 0-d
    tensors' integers too, ``np.int64(3)`` read from an array; never a bool or a float), which
    ``torch.Generator.manual_seed`` takes."""
    return _positive_int(seed, "seed", LayerArgumentError, minimum=-math.inf,
                         message=f"seed must be an integer or None, got {seed!r}")


def _penalty_dtype_of(output: Any, estimate: torch.Tensor) -> torch.dtype:
    """The dtype a probe's penalty is returned in: what :func:`~orthofx.metrics.jacobian_isometry` returns for the
    block's ``output`` (its dtype; float32 for a half-precision one under ``torch.autocast``), though the estimate
    of a half-precision block is kept in float32 until it is weighted."""
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        return metrics._estimate_dtype(output)
    return estimate.dtype


# ------------------------------------------------------------------------------------------ checkpoint replay
# (the region machinery: :func:`orthofx.nn.tracing.checkpoint_region`)

#: Key of a probe's records (with its id): the random states its block's calls started from, or None.
_RNG_RECORD = "JacobianProbe random state"


def _region_rng(frame: Any) -> tuple[list[int], str] | None:
    """``(device ids, device type)`` whose random states ``frame``'s recomputation restores to the forward's (the
    CPU's always, when it restores any), read from the recomputation's closure; ``None`` when it restores none
    (``preserve_rng_state=False``) or the closure is not the one expected."""
    recompute = getattr(frame, "recompute_fn", None)
    code, closure = getattr(recompute, "__code__", None), getattr(recompute, "__closure__", None)
    if code is None or not closure:
        return None
    cells = {}
    for name, cell in zip(code.co_freevars, closure):
        try:
            cells[name] = cell.cell_contents
        except ValueError:  # an empty cell: fwd_devices when the forward's inputs were on no device
            pass
    if not cells.get("preserve_rng_state"):
        return None
    devices = list(cells.get("fwd_devices") or ()) if cells.get("had_device_in_fwd") else []
    return devices, cells.get("device_type") or "cuda"


def _rng_states(devices: list[int], device_type: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The CPU's random state and those of ``devices`` (of ``device_type``), as checkpointing keeps them."""
    states = []
    if devices:
        module = torch.get_device_module(device_type)
        for device in devices:
            with module.device(device):
                states.append(module.get_rng_state())
    return torch.get_rng_state(), states


def _set_rng_states(states: tuple[torch.Tensor, list[torch.Tensor]], devices: list[int], device_type: str) -> None:
    """Put back the random states :func:`_rng_states` returned."""
    torch.set_rng_state(states[0])
    if devices:
        module = torch.get_device_module(device_type)
        for device, state in zip(devices, states[1]):
            with module.device(device):
                module.set_rng_state(state)


# ------------------------------------------------------------------------------------------ stale estimates

class _EstimateStamp:
    """What a penalty needs to tell that an estimate is stale: the block's parameters at the estimate (weak
    references and their in-place versions: an optimizer step bumps them) and whether a backward went through it."""

    __slots__ = ("parameters", "backwarded")

    def __init__(self, parameters):
        self.parameters = [(weakref.ref(p), p._version) for p in parameters]
        self.backwarded = False

    def mark_backwarded(self, grad: torch.Tensor) -> None:
        self.backwarded = True

    def parameters_changed(self, parameters) -> bool:
        """Whether a parameter the estimate used was updated in place since (the same tensor, another version).
        A parameter that is another tensor now (swapped by a wrapper such as FSDP) tells nothing: not counted."""
        return any(ref() is p and p._version != version for (ref, version), p in zip(self.parameters, parameters))


def _graph_freed(tensor: torch.Tensor, limit: int = 64) -> bool:
    """Whether the autograd graph behind ``tensor`` had its saved tensors freed by a backward (without
    ``retain_graph``): reading one then raises. Looks at up to ``limit`` nodes for a saved tensor; ``False`` when it
    finds none (nothing saved: nothing to free)."""
    seen, queue = set(), [tensor.grad_fn]
    while queue and len(seen) < limit:
        node = queue.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            try:
                saved = getattr(node, name)
            except RuntimeError:  # "Trying to backward through the graph a second time (or directly access ...)"
                return True
            if isinstance(saved, torch.Tensor):
                return False
        queue.extend(next_node for next_node, _ in node.next_functions)
    return False


class _StaleEstimate(torch.autograd.Function):
    """The value of a stale estimate, whose backward raises ``error`` (an orthofx error that says what happened
    and how to fix it) instead of torch's "modified by an inplace operation" / "backward through the graph a
    second time": logging such a penalty still works, training on it does not."""

    @staticmethod
    def forward(ctx, estimate: torch.Tensor, error: Exception) -> torch.Tensor:
        ctx.error = error
        return estimate.detach().clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raise ctx.error


# How many probe estimates are running (nested blocks: a probe inside another probe's block). A probe called
# while an estimate runs is part of that estimate's extra forward passes: it only runs its block (its own
# estimate, made at its real call, must neither be made there, inside the outer one's function transform, nor be
# reset or counted as a call of the step). Per thread: a probe called in another thread meanwhile is a call of its
# own step, which must make its estimate.
_estimates_running = threading.local()
# set in the importing thread, so that a compiled forward there does not guard on the attribute's absence (a second
# graph once the first estimate set it); other threads read the default of getattr
_estimates_running.count = 0


def as_estimate(call: Callable[[], Any]) -> Any:
    """``call()`` run as part of a Jacobian estimate (:data:`_estimates_running`): the probes it calls only run
    their blocks. A probe's own estimate, and ``orthofx.metrics``' Jacobian measures of a model holding probes
    (extra forward passes, not calls of a step: the pending penalty term and the probes' counters stay)."""
    _estimates_running.count = getattr(_estimates_running, "count", 0) + 1
    try:
        return call()
    finally:
        _estimates_running.count -= 1


def _first_parameter(module: nn.Module) -> str | None:
    """The name of the first parameter of ``module.forward`` when it can be given by keyword and positionally
    (``def forward(self, x, ...)``), else None."""
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):  # no signature (a builtin)
        return None
    if parameters and parameters[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
        return parameters[0].name
    return None


def _hidden_names() -> tuple[str, ...]:
    """The names a member of the wrapped block cannot have: the probe's own attributes and the methods it adds to
    ``nn.Module``'s (``probe.penalty`` must stay the method). ``block`` is not among them: a submodule of that name
    is what :attr:`JacobianProbe.block` returns."""
    added = {name for name in vars(JacobianProbe) if not name.startswith("__")} - set(dir(nn.Module)) - {"block"}
    return tuple(sorted(set(_OWN) | added))


class JacobianProbe(nn.Module):
    """Wrap ``block``; in training mode also estimate its Jacobian isometry defect (see the module docstring).

    Args:
        block: the module to wrap; the first argument of its forward (positional, or by keyword as fx keeps
            ``block(x=h)``) is the input the Jacobian is taken with respect to (other arguments are held fixed),
            and it must return one tensor: a tuple or dict output raises a
            :class:`~orthofx.errors.LayerArgumentError` naming the layer at the first training-mode forward with
            gradients (an eval-mode or ``no_grad`` call only runs the block). The ``jacobian_isometry`` pass given
            example inputs wraps no such block and says so (an :class:`~orthofx.errors.OrthofxWarning`, unless
            the rule is optional; the report row in any case). A
            probe inside another probe's block (nested sites) runs only its block during the outer estimate; each
            probe makes its own estimate at its real call.
        weight: multiplier used by :meth:`penalty` (``orthofx.penalty`` uses the rule's weight, the same value).
        probes: Rademacher probes per estimate (``offdiag`` uses at least 2).
        kind: ``"full"`` (||J^T J - I||_F^2), ``"partial"`` (||J J^T J - J||_F^2) or ``"offdiag"``
            (sum of squared off-diagonal entries of J^T J).
        every: estimate on every ``every``-th training step (1: every step); the steps in between cost nothing
            and leave the estimate ``None`` (zero penalty). Multiply ``weight`` by ``every`` to keep the average
            strength of the regulariser ("lazy regularisation"). Only training-mode calls with gradients count:
            an eval-mode or ``torch.no_grad()`` call (validation) is no step. A step is :attr:`calls_per_step`
            calls of the block (the pass sets it to the number of calls in the model's graph: a block used twice
            per forward is estimated at both calls, and :attr:`estimate` is their sum); a call that raises is no
            step; a call on an empty batch is one, without an estimate. Under ``torch.compile`` each phase of the
            period is one graph (``every: 4`` compiles four; dynamo keeps eight per function by default).
        per_sample: mean over samples of per-sample values instead of the whole-batch value.
        normalize: divide by the input dimension (per sample when ``per_sample``).
        route: ``"auto"`` (forward mode, double-VJP fallback), ``"jvp"`` or ``"double_vjp"``.
        batch_fraction: estimate on a random subset of ``ceil(batch_fraction * B)`` samples of the batch (1:
            all of them). Unbiased for the whole batch's value when samples are independent, at about
            ``batch_fraction`` of the cost; with BatchNorm in training mode the subset is normalised with its
            own statistics (see :func:`orthofx.metrics.jacobian_isometry`). The block's output is always
            computed on the whole batch. Tensor arguments after the first whose dimension 0 is the batch are
            subsampled alike.
        seed: when given, every estimate draws its probes from a generator reset to this seed (deterministic,
            for tests and debugging; eager only: ``torch.compile`` cannot create the generator, and with
            ``fullgraph=True`` raises saying so); by default the global RNG is used. A setting, not state: the
            ``jacobian_isometry`` pass has no ``seed`` parameter, so a seed set on a transformed model's probe
            (``probe.seed = 0``) is neither in ``state_dict`` nor replayed by ``orthofx.load``; set it again on
            the restored probes (``copy.deepcopy`` and pickling keep it).

    Attributes:
        estimate: the last estimate (0-d tensor with its graph) or ``None``; float32 for a half-precision block,
            whose squares are summed in float32 (a float16 estimate was inf above 65504 where the weighted
            penalty fits): :meth:`penalty` multiplies it by the weight, then rounds to the block's dtype.
        route_used: the route the last estimate took (after a fallback the probe keeps ``"double_vjp"``).

    >>> import torch, orthofx
    >>> from orthofx.nn import JacobianProbe
    >>> probe = JacobianProbe(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()), weight=0.1)
    >>> model = torch.nn.Sequential(probe, torch.nn.Linear(8, 2))
    >>> out = model(torch.randn(16, 8))                       # training mode: the probe estimates its defect
    >>> bool(torch.allclose(orthofx.penalty(model), 0.1 * probe.estimate))
    True
    >>> _ = model.eval()(torch.randn(16, 8))                  # eval mode: the block only
    >>> probe.estimate is None, float(orthofx.penalty(model))
    (True, 0.0)
    """

    batch_fraction: float = 1.0  # class defaults: probes pickled before these attributes existed
    calls_per_step: int = 1
    #: the dtype of the penalty of the current estimate (see :meth:`_estimate_and_dtype`); None: the estimate's
    _penalty_dtype: torch.dtype | None = None

    def __init__(self, block: nn.Module, weight: float = 1.0, probes: int = 1, kind: str = "full", every: int = 1,
                 per_sample: bool = False, *, normalize: bool = False, route: str = "auto", seed: int | None = None,
                 batch_fraction: float = 1.0):
        if not isinstance(block, nn.Module):
            raise LayerArgumentError(f"JacobianProbe wraps an nn.Module, got {type(block).__name__}")
        if isinstance(block, JacobianProbe):
            raise LayerArgumentError("the block is already a JacobianProbe; wrap it once")
        if kind not in metrics.JACOBIAN_KINDS:
            raise LayerArgumentError(f"kind must be one of {', '.join(metrics.JACOBIAN_KINDS)}, got {kind!r}")
        if route not in _ROUTES:
            raise LayerArgumentError(f"route must be one of {', '.join(_ROUTES)}, got {route!r}")
        weight_value = _real(weight)  # numpy's and 0-d tensors' numbers too; never a bool
        if weight_value is None or not 0 <= weight_value < math.inf:
            raise LayerArgumentError(f"weight must be a finite number >= 0, got {weight!r}")
        if seed is not None:
            seed = _seed(seed)
        # bool("no") is True: a string here is a mistake, not a switch (0 and 1 pass, as for every orthofx flag)
        per_sample = _flag(per_sample, "JacobianProbe: per_sample", LayerArgumentError)
        normalize = _flag(normalize, "JacobianProbe: normalize", LayerArgumentError)
        batch_fraction = metrics._check_fraction(batch_fraction, "JacobianProbe")
        clash = [name for name in _hidden_names() if name in block._modules or name in block._parameters
                 or name in block._buffers]
        if clash:
            raise LayerArgumentError(
                f"cannot wrap {type(block).__name__} in a JacobianProbe: its member(s) {', '.join(clash)} would be "
                "hidden by the probe's own attributes (model.get_submodule and checkpoint paths through them would "
                "reach the probe's instead); rename the member(s), or select the block's submodules")
        super().__init__()
        # The wrapped block is not registered as a child: the probe adopts its registries instead (see the module
        # docstring), so paths and state_dict keys are the block's.
        self.__dict__["_wrapped"] = block
        self.__dict__["_parameters"] = block._parameters
        self.__dict__["_buffers"] = block._buffers
        self.__dict__["_non_persistent_buffers_set"] = block._non_persistent_buffers_set
        self.__dict__["_modules"] = block._modules
        self._version = getattr(block, "_version", 1)  # state_dict metadata: the block's class version
        self.training = block.training
        self.penalty_weight = weight_value
        self.probes = metrics.jacobian_probe_count(probes, "JacobianProbe", LayerArgumentError)
        self.kind = kind
        self.every = _positive_int(every, "JacobianProbe: every", LayerArgumentError)
        self.per_sample = per_sample
        self.normalize = normalize
        self.route = route
        self.seed = seed
        self.batch_fraction = batch_fraction
        self.estimate: torch.Tensor | None = None
        self.route_used: str | None = None
        self.calls = 0  # phase of the next training-mode call with gradients, modulo ``every`` steps
        self.calls_per_step = 1  # calls of the block in one forward of the model (set by the pass from the graph)
        # this probe's own draws under torch.compile: two probes of one input in a graph must not be merged
        self._draw_shift = next(_DRAW_SHIFTS) * metrics.MAX_JACOBIAN_PROBES

    # ------------------------------------------------------------------------------------------ wrapping

    @property
    def block(self) -> nn.Module:
        """The wrapped module (shares its parameters, buffers and submodules with the probe).

        Except when the wrapped module has a submodule named ``block`` itself (torchvision's MBConv does): then,
        as for every other name, ``probe.block`` is that submodule, so that ``model.get_submodule`` and
        checkpoint paths through the probe (``features.1.0.block.0``) reach what they reach in the plain model;
        :meth:`to_plain` returns the wrapped module."""
        wrapped = self.__dict__["_wrapped"]
        return wrapped._modules["block"] if "block" in wrapped._modules else wrapped

    @property
    def _block(self) -> nn.Module:
        """The wrapped module, always (see :attr:`block`)."""
        return self.__dict__["_wrapped"]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            wrapped = self.__dict__.get("_wrapped")
            if wrapped is None:
                raise
            return getattr(wrapped, name)

    # Container protocols of the block (``model.layer1[0]`` keeps working on a wrapped Sequential); Python looks
    # special methods up on the class, so __getattr__ alone would not forward them.
    def __getitem__(self, index: Any) -> Any:
        return self._block[index]

    def __len__(self) -> int:
        return len(self._block)

    def __iter__(self):
        return iter(self._block)

    def __bool__(self) -> bool:  # a module is truthy whatever __len__ says about its block
        return True

    def train(self, mode: bool = True) -> JacobianProbe:
        super().train(mode)
        self._block.training = mode
        return self

    def _apply(self, fn, recurse=True):
        # the block's own _apply, on the registries the probe shares: a class-specific one (ConvNorm's running
        # filters, kept outside the buffers) must run for .to() / .double() of the probe too
        self._block._apply(fn, recurse)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._block._save_to_state_dict(destination, prefix, keep_vars)
        # the step in the ``every`` period is training state: a resumed run must estimate on the same steps
        keep_in_metadata(destination, prefix, PHASE_METADATA_KEY, int(self.calls))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._block._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                         unexpected_keys, error_msgs)
        calls = saved_count(local_metadata, PHASE_METADATA_KEY, prefix, "the probe's step in its every period",
                            "the probe's own step", LayerArgumentError, layer_label(self),
                            needed=self.every > 1 and any(key.startswith(prefix) for key in state_dict))
        if calls is not None:  # None: a state dict of the plain model, or from before the phase was saved
            self.restore_calls(calls)

    def restore_calls(self, calls: int) -> None:
        """Put the probe at step ``calls`` of its ``every`` period (a saved :attr:`calls`), modulo the period: a
        state saved with another ``every`` still lands inside it (under torch.compile the phase is a guarded
        constant, kept bounded). ``calls``: an integer >= 0 (numpy's and 0-d tensors' too); a float was stored as
        it came (``1.5``) and ``None`` met a raw TypeError."""
        calls = _positive_int(calls, f"{layer_label(self)}: restore_calls: calls (a saved JacobianProbe.calls)",
                              LayerArgumentError, minimum=0)
        self.calls = calls % (self.every * self.calls_per_step)

    def __getstate__(self) -> dict[str, Any]:
        # The estimate is a non-leaf tensor tied to one step's graph: not copied, pickled or saved.
        state = dict(self.__dict__)
        state["estimate"] = None
        return state

    def _replicate_for_data_parallel(self):
        # nn.DataParallel over several devices copies every module at each forward: a copy of the probe would run
        # the original block (its parameters on the first device) and keep its estimate on a copy that is thrown
        # away, so the penalty would silently miss it
        raise LayerArgumentError(
            f"{layer_label(self)}: nn.DataParallel over several devices cannot run a JacobianProbe (its replicas "
            "would run the original block on the first device and their estimates would be lost). Use "
            "DistributedDataParallel (one process per device), or DataParallel with one device")

    def to_plain(self) -> nn.Module:
        """The wrapped block (with the probe's training flag), for ``orthofx.freeze``."""
        self._block.training = self.training
        return self._block

    def extra_repr(self) -> str:
        fraction = "" if self.batch_fraction == 1 else f", batch_fraction={self.batch_fraction:g}"
        return (f"kind={self.kind}, probes={self.probes}, every={self.every}, per_sample={self.per_sample}, "
                f"normalize={self.normalize}, weight={self.penalty_weight}{fraction}")

    # ------------------------------------------------------------------------------------------ forward

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        tracer = fx_tracer_of(args, kwargs)
        if tracer is not None:
            # the block is not a submodule of the traced model (the probe shares its registries instead), so fx
            # could not trace through it, and the estimate is nested autograd on concrete tensors
            return record_as_leaf(self, tracer, args, kwargs, "in training mode it estimates the block's Jacobian "
                                  "with nested autograd on concrete tensors and keeps the estimate on the probe")
        block = self._block
        block.training = self.training
        if recomputing_in_backward():
            # activation checkpointing's recomputation: not a new call, no new estimate. The random state the
            # block's call started from in the forward (after the estimate's draws: probes, and the dropout masks
            # of the estimate's own passes) comes back first, so that a dropout in the block, or after it in the
            # checkpointed region, draws the forward's masks again (the region restores only its starting state)
            rng = recorded_for_recomputation((_RNG_RECORD, id(self)))
            if rng is not NOT_RECORDED and rng is not None:
                _set_rng_states(*rng)
            return block(*args, **kwargs)
        if getattr(_estimates_running, "count", 0):
            # inside the estimate of a probe around this one (nested blocks): one of its extra forward passes, not
            # a call of the step; this probe's own estimate is made at its real call
            return block(*args, **kwargs)
        region = checkpoint_region()  # the forward of a checkpointed region: its recomputation replays this call
        if not self.training or not torch.is_grad_enabled():
            self.estimate = None
            self._record_random_state(region, estimated=False)
            return block(*args, **kwargs)
        self._refuse_untraceable_estimate()
        # counted modulo one period of ``every`` steps: under torch.compile the count is a guarded constant, so a
        # bounded count gives ``every`` graphs instead of a recompilation at each step
        phase = self.calls % (self.every * self.calls_per_step)
        step, call = divmod(phase, self.calls_per_step)
        estimating = step % self.every == 0
        if not estimating or call == 0:
            # a step ``every`` skips has no estimate; a new step: the last step's estimate goes before this one is
            # made, not after. Its graph still holds the saved activations of the block's extra passes when no
            # backward went through it (a loss that left the penalty out), which would add to this forward's peak
            # memory
            self.estimate = None
        if not estimating or self._empty_batch(args, kwargs):
            # an empty batch has no Jacobian to estimate (the metric refuses it: its mean or normalisation over no
            # samples is NaN) and the penalty is zero for it, as on a skipped step; it is still a call of the step,
            # so the period keeps counting the model's forwards and the calls within one (a block called on two
            # subsets per forward keeps its pairs when one is empty)
            self._record_random_state(region, estimated=False)
            output = block(*args, **kwargs)
            self.calls = (phase + 1) % (self.every * self.calls_per_step)  # counted once it ran (see below)
            return output
        # the estimate first: a block opening with an in-place op (ReLU(inplace=True)) overwrites its input
        if torch.compiler.is_compiling() or torch._C._autograd._top_saved_tensors_default_hooks(False) is None:
            estimate = self._estimate(args, kwargs)
        else:
            # Inside activation checkpointing (non-reentrant), whose hooks would pack the estimate's saved tensors
            # too: its own VJP would then trigger a recomputation, and the recomputation in backward, which runs
            # only the block, would not match the tensors saved here. The estimate keeps its tensors itself.
            with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
                estimate = self._estimate(args, kwargs)
        self._record_random_state(region, estimated=True)
        output = block(*args, **kwargs)
        # counted once the call has run: a call that raised (an input of the wrong shape, out of memory) is no
        # step of the period, so the run that calls again keeps the schedule of the uninterrupted one
        self.calls = (phase + 1) % (self.every * self.calls_per_step)
        # a block called several times per forward: the estimates of one step's calls add up (in float32 for a
        # half-precision block, rounded once by the penalty)
        self.estimate = estimate if self.estimate is None else self.estimate + estimate
        self._penalty_dtype = _penalty_dtype_of(output, estimate)
        if not torch.compiler.is_compiling() and self.estimate.requires_grad:
            # for a penalty to tell a stale estimate (one read after an optimizer step, or after a backward freed
            # it) from this step's: :meth:`_estimate_for_penalty`. Kept on the tensor, which it describes
            stamp = _EstimateStamp(block.parameters())
            self.estimate.register_hook(stamp.mark_backwarded)
            self.estimate._orthofx_stamp = stamp
        return output

    def _empty_batch(self, args: tuple, kwargs: dict) -> bool:
        """Whether the Jacobian's variable (the block's first input) is a floating-point tensor with no elements, an
        empty batch: a check of its size only, with no guard or recompilation for non-empty batches under
        torch.compile (:func:`orthofx.metrics.known_empty`). ``False`` for a first input of another kind: the
        estimate then raises, saying what is wrong with it; ``False`` too for a batch of data-dependent size under
        torch.compile, whose estimate is 0 when it is empty (the metric divides by ``sym_max(size, 1)``)."""
        first = self._input_first(args, kwargs)[0]
        return bool(first) and isinstance(first[0], torch.Tensor) and first[0].is_floating_point() \
            and metrics.known_empty(first[0])

    def _record_random_state(self, region: tuple[Any, Any] | None, estimated: bool) -> None:
        """For the recomputation of the checkpointed ``region`` whose forward runs this call (None: no region, as
        under torch.compile): the random states the block's call starts from after this call's estimate drew its
        numbers (None when it made none, or the region restores no random state: nothing to restore)."""
        if region is None:
            return
        rng = _region_rng(region[0]) if estimated else None
        record_for_recomputation((_RNG_RECORD, id(self)), None if rng is None else (_rng_states(*rng), *rng), region)

    def _refuse_untraceable_estimate(self) -> None:
        """Refuse a training-mode estimate where it cannot be made: inside a ``torch.func`` transform (``vmap`` /
        ``grad`` of a ``functional_call``, e.g. per-sample gradients), whose wrapped tensors the estimate's own
        autograd calls reject (torch: "attempting to call Tensor.requires_grad_() ... inside of a function being
        transformed by a functorch transform"), and under ``torch.export``, which cannot capture it (torch:
        "attempted to apply meta conversion to view functorch tensor"); an exported program has no place for the
        estimate anyway. Eval mode (or no_grad) runs only the block, which both handle."""
        if in_export():
            where = "under torch.export"
        elif in_func_transform():
            where = ("inside a torch.func transform (vmap, grad, jacrev ... e.g. per-sample gradients of a "
                     "functional_call)")
        else:
            return
        raise LayerArgumentError(
            f"{layer_label(self)}: in training mode the probe estimates its block's Jacobian with nested autograd "
            f"on every call, which cannot run {where}. Put the probe in eval mode for this call (probe.eval(): it "
            f"then only runs its block and adds no penalty), or remove it (orthofx.freeze(model) or "
            f"probe.to_plain())")

    def _estimate(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The block's Jacobian estimate at these inputs (sets :attr:`route_used`)."""
        try:
            return as_estimate(lambda: self._estimate_at(*self._input_first(args, kwargs)))
        except RuntimeError as exc:
            if "use_reentrant" not in str(exc):
                raise
            # torch: "When use_reentrant=True, torch.utils.checkpoint is incompatible with .grad()": the estimate's
            # products are autograd.grad calls through the block
            raise LayerArgumentError(
                f"{layer_label(self)} ({type(self._block).__name__}): the block runs torch.utils.checkpoint with "
                "use_reentrant=True, through which the Jacobian's products (torch.autograd.grad) cannot be taken. "
                "Pass use_reentrant=False to its checkpoint calls (the same memory saving, and it supports them)"
            ) from exc

    def _input_first(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """``(args, kwargs)`` with the Jacobian's variable first in ``args``: a call that gives the block's first
        parameter by keyword (``block(x=h)``, which fx keeps as it is) has it moved there (the estimate passes it
        positionally)."""
        if args or not kwargs:
            return args, kwargs
        name = _first_parameter(self._block)
        if name is None or name not in kwargs:
            return args, kwargs
        rest = {key: value for key, value in kwargs.items() if key != name}
        return (kwargs[name],), rest

    def _estimate_at(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """:meth:`_estimate` once the Jacobian's variable is ``args[0]``."""
        if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
            got = args[0].dtype if args and isinstance(args[0], torch.Tensor) else type(args[0] if args else None)
            raise LayerArgumentError(
                f"{layer_label(self)} ({type(self._block).__name__}): the Jacobian is taken with respect to the first "
                f"argument of the block's forward, which must be a floating-point tensor (got {got}); regularise a "
                "block whose input is continuous (e.g. the layers after an embedding)")
        if self.seed is not None and torch.compiler.is_compiling():
            raise LayerArgumentError(
                f"{layer_label(self)}: seed={self.seed} makes a torch.Generator at each estimate, which torch.compile "
                "cannot trace; set the probe's seed to None (the probes then come from the global RNG: "
                "torch.manual_seed) or run it eagerly")
        generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)
        route = self.route
        # after a fallback, stay on the reverse route (eager only: a compiled estimate has one route, and reading
        # route_used there would guard on it and recompile once it is set)
        if route == "auto" and not torch.compiler.is_compiling() and self.route_used == "double_vjp":
            route = "double_vjp"
        # the other inputs are held fixed, like the first: the regulariser shapes this block's parameters only
        rest, fixed = torch.utils._pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, (args[1:], kwargs))
        block = metrics._Call(self._block, rest, fixed, label=layer_label(self))
        estimate, self.route_used = metrics._jacobian_isometry(
            block, args[0], probes=self.probes, kind=self.kind, per_sample=self.per_sample, generator=generator,
            normalize=self.normalize, route=route, batch_fraction=self.batch_fraction,
            what=f"jacobian_isometry of {layer_label(self)}", error=metrics._LayerJvpRouteError,
            draw_shift=getattr(self, "_draw_shift", 0),  # 0: a probe pickled before it had one
            full_precision=True)  # float32 for a half-precision block: the penalty weights it before rounding
        return estimate

    def penalty(self) -> torch.Tensor:
        """``weight * estimate``; without a current estimate (eval mode, a step ``every`` skips) the zero of
        :func:`~orthofx.nn.precision.zero_like_parameters`, in the block's dtype and on its device, which every
        absent penalty term is: a float32 zero turned a bfloat16 loss into float32 on the steps without one.

        In the dtype of the block's output (float32 under ``torch.autocast`` for a half-precision one, as
        autocast's reductions): a half-precision block's estimate is kept in float32 and multiplied by the weight
        there, then rounded once (:meth:`_estimate_and_dtype`); rounded first, a float16 estimate above 65504 was
        inf where ``weight * estimate`` fits."""
        estimate, dtype = self._estimate_and_dtype()
        return (self.penalty_weight * estimate).to(dtype)

    def _estimate_and_dtype(self) -> tuple[torch.Tensor, torch.dtype]:
        """``(estimate, dtype)`` for a penalty: :meth:`_estimate_for_penalty` (without a current one the zero
        :meth:`penalty` returns), in float32 for a half-precision block, and the dtype a penalty of it is returned
        in, once weighted: the block output's (:func:`~orthofx.metrics._estimate_dtype`). ``orthofx.penalty``
        multiplies each term by its weight in float32 and rounds the sum once."""
        estimate = self._estimate_for_penalty()
        if estimate is None:
            zero = zero_like_parameters(self)
            return zero, zero.dtype
        dtype = self._penalty_dtype
        return estimate, estimate.dtype if dtype is None else dtype

    def _estimate_for_penalty(self) -> torch.Tensor | None:
        """:attr:`estimate` for a penalty to add to a training loss (:meth:`penalty`, ``orthofx.penalty``).

        An estimate is made by the probe's training-mode forward, from that call's graph. Read with gradients
        enabled after an optimizer step changed the block's parameters, or after a backward went through it and
        freed its graph, it is stale: a loss written ``orthofx.penalty(gm) + task(gm(x))`` (Python evaluates the
        penalty before the forward) reads the last step's. Training on it would make torch raise at backward ("has
        been modified by an inplace operation" / "backward through the graph a second time"); its value is
        returned instead with a backward that raises a :class:`~orthofx.errors.LayerArgumentError` saying so and
        how to fix it, so that a stale read for logging still works. Not checked under ``torch.no_grad()``, under
        torch.compile, in activation checkpointing's recomputation, or for an estimate made by a compiled forward
        (none of those is trained on eagerly, or the check cannot run there). A fused optimizer (``fused=True``)
        writes the parameters without bumping their version counters, so a read after its step is not seen (nor
        does torch see the stale graph then): the gradients come from the earlier forward's tensors."""
        estimate = self.estimate
        if estimate is None or not torch.is_grad_enabled() or torch.compiler.is_compiling() \
                or recomputing_in_backward():
            return estimate
        stamp = getattr(estimate, "_orthofx_stamp", None)
        if stamp is None:
            return estimate
        if stamp.parameters_changed(self._block.parameters()):
            why = "the block's parameters changed since (an optimizer step, or another in-place update)"
        elif stamp.backwarded and _graph_freed(estimate):
            why = "a backward already went through it and freed its graph"
        else:
            return estimate
        return _StaleEstimate.apply(estimate, LayerArgumentError(
            f"{layer_label(self)}: the penalty read a Jacobian estimate made by an earlier forward of the block, and "
            f"{why}, so it cannot be trained on. The probe estimates the block's Jacobian in its training-mode "
            "forward, at that call's input, and a penalty reads the last estimate: call the penalty after this "
            "step's forward, `out = model(x); loss = criterion(out, y) + orthofx.penalty(model)` (in "
            "`orthofx.penalty(model) + criterion(model(x), y)` Python evaluates the penalty first, which then reads "
            "the last step's estimate). A penalty read under torch.no_grad() (for logging) is never refused"))
