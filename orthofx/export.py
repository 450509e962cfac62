"""Freeze, export, save and load transformed models.

* :func:`freeze` bakes a transformed model into plain torch layers with the same eval outputs: every module that
  offers ``to_plain()`` (orthofx's layers do) is replaced by what it returns, and the penalty terms and optimizer
  hooks are dropped. Decompositions whose input does not depend on the model's inputs (decorrelated BatchNorm's
  running covariance in eval mode) are evaluated once and stored (the running whitening matrix); this is exact.
* :func:`export` writes ``.onnx`` (dynamo exporter, checked with ``onnx.checker`` and run with onnxruntime),
  ``.pt2`` (``torch.export``; reloaded and compared) or ``.pt`` (state_dict + policy, safe to load with
  ``torch.load(weights_only=True)``); the result reports the largest difference from the frozen model.
* :func:`load` replays a ``.pt`` file's policy on the original model and restores the weights, after checking
  that the replay builds the graph the file records (:data:`GRAPH_METADATA_KEY`).

All three leave torch's global random generators as they found them: a checkpoint exported in the middle of
training does not change the later batches, dropout masks or initialisations. ``freeze`` and ``export`` draw
nothing themselves (the plain layers they build skip torch's default initialisation, which they overwrite), and
run the model on the example inputs on a fork of the generators (:func:`_checked_run`: only a model that draws in
eval mode draws there). ``load`` replays a policy whose random starts the saved weights replace, on a fork of the
generators (:func:`_global_rng_kept`). A fork puts the global state back when it ends: numbers another thread
draws meanwhile are drawn again after it (``freeze`` without example inputs forks nothing).

A model that :func:`orthofx.transform` did not return but that holds transformed models (a transformed backbone
inside a bigger model: :func:`orthofx.penalty.transformed_parts`) is frozen part by part: :func:`freeze` returns a
copy of it (its own class, not a graph) in which each part is replaced by ``freeze(part)`` and any other orthofx
layer by its plain form, and ``.onnx`` / ``.pt2`` export that copy. ``.pt`` refuses it: the file holds one
policy, which :func:`load` replays on the model given, not on its parts; export a part to ``.pt`` on its own, or
save the whole model's weights with ``torch.save(model.state_dict(), path)``.

Decompositions and export
-------------------------
ONNX has no eigendecomposition or SVD. Where the graph computes a matrix square root or inverse square root from
one, ``V diag(lambda^(+-1/2)) V^T`` of a symmetric positive definite ``A`` (covariance pooling, ZCA whitening;
the patterns of :mod:`orthofx.passes.svd_conditioning`), the ``.onnx`` export replaces it by the coupled
Newton-Schulz iteration (matmuls only), which converges to ``A^(+-1/2)`` with an error that grows with the
condition number ``kappa(A)`` and falls with the number of iterations ``T``. The switch happens in the ONNX
path only, on a copy of the frozen model:

* ``freeze`` promises the same eval outputs (1e-5), for every input; Newton-Schulz cannot promise that without
  knowing the inputs' conditioning, and ``freeze`` has no inputs to check it on. So ``freeze`` and ``.pt2`` keep
  the exact decompositions (``torch.export`` can express them).
* ``export(..., ".onnx")`` has example inputs: with ``newton_schulz_iterations=None`` (default) it takes the first
  ``T`` of 5, 10, 15, 20, 30, 40, 60, 80 whose PyTorch Newton-Schulz form matches the exact frozen model within
  1e-5 on them (when none does, the fewest within 10 % of the best), exports that form, and compares
  onnxruntime's outputs with the *exact* frozen model's (so the 1e-4 check covers the approximation too).
  ``ExportResult.newton_schulz`` records the sites, ``T`` and the difference. Inputs whose covariances are much
  worse conditioned than the example inputs' need a larger ``T`` (pass ``newton_schulz_iterations``; iterating
  past convergence costs matmuls, not accuracy).
* Measured (``benchmarks/svd_passes.py --export``: float32, 6 x 6 covariances + eps I, square and inverse square
  roots): kappa ~ 1e1 and 1e2 need T = 10 (difference 2e-6 and 7e-6); kappa ~ 1e3, T = 15 (3e-5, which is the
  float32 ``eigh`` model's own distance from a float64 eigendecomposition); from kappa ~ 1e4 the float32 exact
  model is itself 4e-4 off the float64 result, the two float32 computations disagree by as much, and the export
  fails its 1e-4 check whatever T. Such models export to ``.pt2``; better, condition the covariance (P4's
  point: ``pre_svd``, or a larger ``eps``).
* A decomposition with no matmul-only form (``eigvalsh``, ``svdvals``, eigenvectors used for anything else)
  makes the ONNX export raise an :class:`~orthofx.ExportError` naming the site, the layer feeding it and the ways
  out (``.pt2``, or keeping the decomposition out of the ONNX graph).

Example::

    import torch, orthofx
    model = orthofx.models.get("small_cnn")
    x = orthofx.models.example_input("small_cnn")
    gm = orthofx.transform(model, "lorth", example_inputs=(x,))
    result = orthofx.export(gm, "model.onnx", example_inputs=(x,))
    print(result.max_abs_diff)              # about 1e-7: the ONNX model against the frozen one
    orthofx.export(gm, "model.pt")
    gm2 = orthofx.load(model, "model.pt")   # the policy replayed on `model`, the weights restored
    torch.testing.assert_close(gm2.eval()(x), gm.eval()(x))
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import fx, nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.fx.immutable_collections import immutable_dict, immutable_list

from .capture import (ModalGraphModule, RecurrentBatch, _join, batch_dim, batch_dynamic_shapes, buffers_kept,
                      capture, copy_model, module_edges_holding, one_trace_at_a_time, recurrent_batch_dims,
                      sequence_helper, unwrap_model)
from .errors import (SITE_ATTRIBUTE, ArgumentError, CaptureError, ExportError, LayerArgumentError, OrthofxError,
                     OrthofxWarning, TransformError, caller_stacklevel, first_few)
from .nn.conditioning import power_newton_schulz
from .nn.jacobian import JacobianProbe
from .nn.orthogonal import OrthogonalConv1d, OrthogonalConv2d, OrthogonalConv3d
from .nn.precision import HALF_PRECISION
from .nn.tracing import is_orthofx_module
from .passes.base import Manifest, each_mode, replace_module
# which conv the orthogonal preset leaves to L_orth as untrainable (load names it in a file an older orthofx wrote)
from .passes.orthogonal_conv import _FIXED_SHIFT, _fixed_shift_problem
# the constant-folding helpers fold_constant_decompositions runs on, shared rather than written twice
from .passes.svd_conditioning import (_constant_nodes, _copy_meta, _erase_dead, _free_attribute_name,
                                      _graph_modules, _mutated_attributes, _run_constants, decomposition_op,
                                      fold_constant_decompositions, foldable_seed, plain_decompositions,
                                      stand_in_call, to_newton_schulz)
from .penalty import part_site_path, transformed_parts
from .plan import build_plan, collect_sites, meta_tensors, producers_feeding
from .policy import Policy
from .transform import (ExampleCall, _observe, _outside_inference_mode, example_call, is_transformed, manifest_of,
                        output_tensors, store_manifest, transform, transform_private_copy)

__all__ = ["freeze", "export", "load", "ExportResult", "NewtonSchulzForm", "FORMAT_VERSION"]

#: Version of the ``.pt`` file layout written by :func:`export`.
FORMAT_VERSION = 1
#: ``.pt`` key that files written before the state dict kept its metadata hold (read, no longer written): the
#: Jacobian probes' step phases ``{module path: JacobianProbe.calls}``. The step now travels where the probe itself
#: puts it, the saved state dict's ``_metadata`` (``orthofx.nn.jacobian.PHASE_METADATA_KEY``), as in
#: ``gm.state_dict()``: one record of it.
PROBE_PHASES_KEY = "probe_calls"
#: Key, in the saved state dict's root metadata (``saved["state_dict"]._metadata[""]``), of the transformed model's
#: graph as :func:`_graph_signature` writes it: :func:`load` compares the graph its replay of the policy builds with
#: it, so that a model of another forward whose weights happen to fit (another activation module, the same layers
#: wired otherwise) is refused instead of restored into other computations. Files without it load unchecked.
GRAPH_METADATA_KEY = "orthofx_graph"
#: ``.pt`` key of the spatial input size of each ``method: cayley_fft`` conv of the saved model, ``{module path:
#: [n_1, ..., n_d]}`` (:func:`_cayley_input_sizes`; written only for a model that has such layers). Such a layer's
#: orthogonal operator is built for that one size, from the example inputs, and its ``cayley_kernel`` parameters fit
#: any size: :func:`load` checks that its replay built the same sizes, before the weights are restored. Files
#: written before the record load unchecked.
CAYLEY_SIZES_KEY = "cayley_input_sizes"
#: ONNX difference above which :func:`export` fails for outputs of magnitude up to about 100 (see
#: :func:`onnx_tolerance`).
ONNX_TOLERANCE = 1e-4
#: Rounding steps (units of the output dtype's resolution at the outputs' largest magnitude) an output may differ
#: by, where that is more than ONNX_TOLERANCE: onnxruntime and torch sum in other orders, so two correct runtimes
#: differ by a few rounding steps at the outputs' scale (float16: 1.2e-4 to 2.4e-4 on outputs of ~10; float32:
#: 1 to 4 steps, 7e-4 to 2e-3 on outputs of ~3e3 to ~8e3).
ROUNDING_ULPS = 8
#: Newton-Schulz iteration counts tried, in order, when ``export`` chooses them for an ONNX file.
NEWTON_SCHULZ_SCHEDULE = (5, 10, 15, 20, 30, 40, 60, 80)
#: Largest difference from the exact model (PyTorch, example inputs) at which the choice stops.
NEWTON_SCHULZ_TARGET = ONNX_TOLERANCE / 10
#: ``frozen.meta`` key of the decompositions ``freeze`` evaluated once: ``{site: [buffer names]}``.
FOLDED_KEY = "orthofx_folded"
#: Name prefix of the buffers holding those decompositions' stored results.
FOLDED_PREFIX = "orthofx_folded_"
#: Instance attribute (in ``module.__dict__``, so copies and pickles keep it) that :func:`freeze` sets on each plain
#: form it puts in place of an orthofx layer: the class name of the layer it was baked from. The plain form is often
#: a torch layer (``nn.Conv2d(padding_mode="circular")``) that nothing else tells from the user's own; ``.pt``
#: export needs to know (:func:`_check_replayable`).
BAKED_ATTRIBUTE = "orthofx_baked_from"
#: Name prefix of the buffers :func:`freeze` stores where a forward read an orthofx layer's state outside its call
#: (``F.linear(h, self.enc.weight.T)``) and no tensor of the layer's plain form holds that value.
READ_PREFIX = "orthofx_read_"


def _global_rng_kept(function):
    """``function`` run on a fork of torch's global random number generators (CPU, and each CUDA device holding
    a tensor among its arguments or a model's parameters and buffers), so that the caller's random stream goes on
    as if the call had not been made: :func:`load`, whose replay of a policy draws random initialisations that the
    saved weights then replace (a run that loads a checkpoint would otherwise get other batches and dropout masks
    afterwards; ``capture`` forks the generators for its own runs for the same reason). The fork restores a
    process-wide state: draws another thread makes meanwhile are made again after it (``freeze`` and ``export``,
    which a training script may run in a thread of their own, draw nothing and need no fork)."""
    @functools.wraps(function)
    def kept(*args: Any, **kwargs: Any) -> Any:
        with torch.random.fork_rng(devices=_cuda_devices(*args, *kwargs.values())):
            return function(*args, **kwargs)
    return kept


def _outside_inference_mode_call(function):
    """``function`` run outside ``torch.inference_mode`` (gradients stay off inside, as they were): the models
    :func:`freeze` and :func:`load` return are built from copies (load's own copy in the saved dtype, for a
    float64 file), and copies made inside inference mode are inference tensors, so the first ``loss.backward()``
    of the model fine-tuned afterwards raised torch's "Inference tensors cannot be saved for backward"
    (``transform`` leaves inference mode the same way)."""
    @functools.wraps(function)
    def outside(*args: Any, **kwargs: Any) -> Any:
        with _outside_inference_mode():
            return function(*args, **kwargs)
    return outside


def _cuda_devices(*values: Any) -> list[int]:
    """The indices of the CUDA devices holding a tensor among ``values`` (a model's parameters and buffers for a
    module), for :func:`torch.random.fork_rng`."""
    found = [list(v.parameters()) + list(v.buffers()) if isinstance(v, nn.Module) else v for v in values]
    tensors = [t for t in torch.utils._pytree.tree_leaves(found) if isinstance(t, torch.Tensor)]
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


def _modules_to_freeze(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every outermost module that needs freezing: one offering ``to_plain()`` (its
    plain torch form). This asks what ``freeze`` must replace, not whether a module is an orthofx layer
    (:func:`orthofx.nn.tracing.is_orthofx_layer`): a user's module may offer ``to_plain()`` too, a pass's
    monitor is replaced by a pass-through, and the frozen forms (``FourierConv`` ...) offer none."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in root.named_modules():
        if not name or not callable(getattr(module, "to_plain", None)):
            continue
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue
        found.append((name, module))
    return found


def _captured_with_orthofx_layers(model: nn.Module, example: ExampleCall | None) -> fx.GraphModule:
    """A model written with orthofx's layers (``orthofx.nn.OrthogonalConv2d`` ...) but not returned by
    :func:`orthofx.transform`, captured as ``transform`` would (orthofx layers kept as leaves; ``auto`` mode, so
    torch.export on the example call, keyword inputs included, where symbolic tracing fails) with a manifest that
    records no change: what :func:`freeze` and :func:`export` need. A model holding no orthofx layer is captured
    too, for calls of ``orthofx.nn.eigh_stable`` / ``svd_stable``; with none, it has nothing to freeze."""
    root = copy_model(unwrap_model(model))
    if is_orthofx_module(root) and callable(getattr(root, "to_plain", None)):  # _modules_to_freeze: below the root
        raise ExportError(f"{type(root).__name__} is a single orthofx layer, not a model holding one: its plain torch "
                          "form is layer.to_plain() (orthofx.freeze is for models; nn.Sequential(layer) works too)")
    policy = Policy(description="a model holding orthofx layers, frozen without a transform")
    call = None if example is None else example.fresh()  # capture may run the model (lazy layers, torch.export)
    layers = bool(_modules_to_freeze(root))
    try:
        gm, info = capture(root, mode="auto", example_inputs=None if call is None else call.args,
                           example_kwargs=None if call is None else call.kwargs)
    except Exception as exc:
        if layers:
            raise
        # a forward calling orthofx.nn.eigh_stable / svd_stable directly holds orthofx's custom ops, which only
        # freeze (from a graph) turns into plain torch.linalg calls
        raise ExportError(
            f"{type(root).__name__} was not produced by orthofx.transform and holds no orthofx layer, and it could "
            f"not be captured to look for calls of orthofx's decompositions ({_root_cause(exc)}). If its forward "
            "does not call orthofx.nn.eigh_stable / svd_stable, there is nothing to freeze: use the model as it is "
            "(torch.export / torch.onnx.export work on it directly); if it does, make it traceable (or pass "
            "example_inputs for torch.export capture), or call torch.linalg.eigh / svd in eval mode") from exc
    if not layers and not any(stand_in_call(n) for _, g in _graph_modules(gm) for n in g.graph.nodes):
        raise ExportError(f"{type(root).__name__} was not produced by orthofx.transform and holds no orthofx layer "
                          "and no call of orthofx.nn.eigh_stable / svd_stable (nothing to freeze): call "
                          "orthofx.transform(model, policy) first, or use the model as it is (torch.export / "
                          "torch.onnx.export work on it directly)")
    manifest = Manifest(policy=policy, plan=build_plan(gm, policy, info, model=root), capture=info)
    store_manifest(gm, manifest)
    if example is not None:
        # the input size at each site, as transform records it: a conv's singular values in report(frozen) need it
        try:
            _observe(gm, manifest.plan, example.fresh(), manifest)
        except TransformError:
            pass  # freeze's own run on the example (_run_example) says what is wrong with it, as an ExportError
    return gm


@one_trace_at_a_time
@_outside_inference_mode_call
def freeze(model: nn.Module, example_inputs: Any = None, *, example_kwargs: Any = None) -> nn.Module:
    """A copy of a transformed model made of plain torch layers, in eval mode, with the same eval outputs.

    A model written with orthofx's layers (``orthofx.nn``: orthogonal convs and linears, ConvNorm, ...) that
    :func:`orthofx.transform` did not return is frozen too: it is captured first (symbolic tracing, or
    torch.export on the example inputs where that fails), its orthofx layers kept as calls. A forward that also
    reads a layer's state (``F.linear(h, self.enc.weight.T)``, a tied decoder) then reads the plain form's baked
    tensor holding the same value (``enc.weight`` of the plain ``nn.Linear``), or a buffer ``orthofx_read_<n>``
    where none does; calls of ``orthofx.nn.eigh_stable`` / ``svd_stable`` become plain ``torch.linalg`` calls.

    A model holding transformed models (``nn.Sequential(gm, head)``, a wrapper whose ``self.backbone`` is a model
    ``orthofx.transform`` returned) is not captured: the copy is of the model's own class, each transformed part
    replaced by its frozen form (``freeze(part)``, a GraphModule with a frozen manifest) and each orthofx layer
    outside the parts by its plain form. The example call runs on the whole copy, before the parts are frozen.

    ``example_inputs`` (optional): the copy runs once on them (eval mode, no gradients) before its layers are
    baked, so layers whose plain form depends on the input size (ConvNorm's filters) cover those sizes even when
    the model has not run on them yet (for instance right after :func:`load`). ``example_kwargs`` (optional, a dict
    by name): the keyword inputs of that call, for a forward such as ``forward(self, x, *, mask=None)``; the example
    call is ``model(*example_inputs, **example_kwargs)``, as in :func:`orthofx.transform`.

    Penalty terms and optimizer hooks are dropped from the copy's manifest (``orthofx.penalty`` of it is zero);
    condition-number monitors become pass-throughs; the original model is not changed.

    Decompositions (eigh, svd ...) whose input does not depend on the model's inputs, such as decorrelated
    BatchNorm's ``eigh(running_cov + eps I)`` in eval mode, are evaluated once with what is computed from them
    before they meet the inputs (the whitening matrix ``W = V diag(lambda^-1/2) V^T``), and the results are stored
    as buffers (``orthofx_folded_<n>``; ``frozen.meta["orthofx_folded"]`` maps each site to them). This is exact.
    Decompositions of input-dependent matrices are kept (exact): :func:`export` replaces them by Newton-Schulz
    iterations for ONNX only (see the module docstring for why).

    Example::

        import torch, orthofx
        x = orthofx.models.example_input("small_cnn")
        gm = orthofx.transform(orthofx.models.get("small_cnn"), "orthogonal", example_inputs=(x,))
        frozen = orthofx.freeze(gm)            # plain nn.Conv2d / nn.Linear with baked weights
        torch.testing.assert_close(frozen(x), gm.eval()(x))
    """
    example = example_call(example_inputs, example_kwargs)
    if not is_transformed(model) and transformed_parts(model):
        return _freeze_parts(model, example)
    if is_transformed(model):
        manifest = manifest_of(model)
        frozen = copy_model(unwrap_model(model))
    else:  # captured from a copy of the model already: baked in place
        frozen = _captured_with_orthofx_layers(model, example)
        manifest = manifest_of(frozen)
    if isinstance(frozen, ModalGraphModule):
        # a forward with `if self.training:` branches: the frozen model is the eval-mode graph alone
        frozen = frozen.single_mode(training=False)
    frozen.eval()
    _run_example(frozen, example)
    reads = _layer_reads(frozen)
    _replace_by_plain_forms(frozen)
    _rebind_layer_reads(frozen, reads)
    _plain_custom_decompositions(frozen)
    frozen.recompile()
    names = _site_names(frozen)
    folded = fold_constant_decompositions(frozen)
    frozen.meta[FOLDED_KEY] = {names.get(node, node): buffers for node, buffers in folded.items()}
    plain_decompositions(frozen)
    store_manifest(frozen, dataclasses.replace(manifest, penalties=[], optimizer_hooks=[], frozen=True))
    return frozen


def _checked_run(module: nn.Module, call: ExampleCall) -> Any:
    """``module``'s output on ``call`` as freezing and each check of :func:`export` compute it: without gradients,
    on a copy of the inputs (:meth:`ExampleCall.fresh`), from the module's state as it is (its buffers kept,
    :func:`orthofx.capture.buffers_kept`), so that every run of the checks, on the frozen model and on the written
    one, computes the same function of the same values. On a fork of the random generators (a model that draws
    in eval mode, noise or MC dropout, draws the same numbers at each run and leaves the caller's stream where it
    was: numbers another thread draws during the run are drawn again after it)."""
    with torch.no_grad(), buffers_kept(module), torch.random.fork_rng(devices=_cuda_devices(module, call.args)):
        return call.run(module)


def _outputs(module: nn.Module, call: ExampleCall) -> list[torch.Tensor]:
    """The output tensors of :func:`_checked_run` (:func:`_tensor_copies`)."""
    return _tensor_copies(_checked_run(module, call))


def _tensor_copies(output: Any) -> list[torch.Tensor]:
    """The tensors of a model's output, copied (an output may be a buffer the run put back)."""
    return [t.detach().clone() for t in output_tensors(output)]


def _python_values(output: Any) -> list[tuple[str, Any]]:
    """``(position, value)`` of each Python number or string among the leaves of a model's output (``[1]``,
    ``['count']``)."""
    pytree = torch.utils._pytree
    return [(pytree.keystr(path), leaf) for path, leaf in pytree.tree_flatten_with_path(output)[0]
            if isinstance(leaf, (str, bytes, int, float, complex))]


def _describe_values(values: list[tuple[str, Any]]) -> str:
    return ", ".join(f"output{position} is {value!r} (a Python {type(value).__name__})"
                     for position, value in values[:3])


def _onnx_expected_outputs(frozen: nn.Module, example: ExampleCall) -> list[torch.Tensor]:
    """The output tensors of ``frozen`` on the example call (:func:`_outputs`), which the ONNX checks compare with;
    ExportError unless every output is a tensor (or None): an ONNX graph returns tensors only, and torch's exporter
    fails on a Python value ("'float' object has no attribute 'name'") or returns a size as one more tensor output
    than the model has."""
    output = _checked_run(frozen, example)
    values = _python_values(output)
    if values:
        raise ExportError(f"ONNX graphs return tensors only, and the model's {_describe_values(values)}. Fix: return "
                          "tensors only (torch.tensor(value) for a number the graph computes, nothing for a "
                          "constant), or export to .pt2, which keeps Python values among the outputs")
    return _tensor_copies(output)


def _check_onnx_layers(model: nn.Module) -> None:
    """ExportError for a layer torch's ONNX exporter writes wrongly: an LSTM with ``proj_size`` gets its cell state
    in the projected size (onnxruntime refuses the file: "Input initial_c must have shape ..."; a bidirectional
    multi-layer one fails the checker), as for the plain torch model. Said before the export, naming the layer."""
    projected = [name for name, m in model.named_modules() if isinstance(m, nn.LSTM) and m.proj_size > 0]
    if projected:
        raise ExportError(f"torch's ONNX exporter writes an LSTM with proj_size wrongly (its cell state takes the "
                          f"projected size, and onnxruntime refuses the file), and the model has such layers: "
                          f"{first_few([repr(n) for n in projected], 3)}. Export it to .pt2 (torch.export), which "
                          "keeps them exact, or use proj_size=0")


def _run_example(frozen: nn.Module, example: ExampleCall | None) -> None:
    """Run the copy being frozen (in eval mode) once on the example call, without gradients, so that layers whose
    plain form depends on the input size (ConvNorm's filters) know the sizes; inputs it fails on are an
    :class:`ExportError` that says so (not the layer torch failed in). The run changes no buffer and no input
    (:func:`_checked_run`)."""
    if example is None:
        return
    try:
        _checked_run(frozen, example)
    except Exception as exc:
        given = "example_inputs and example_kwargs" if example.kwargs else "example_inputs"
        raise ExportError(f"the model failed on {given} ({_root_cause(exc)}); pass inputs the model "
                          f"takes: {_describe_inputs(example)} given") from exc


def _replace_by_plain_forms(frozen: nn.Module) -> None:
    """Replace, in place, every module of ``frozen`` that offers ``to_plain()`` (:func:`_modules_to_freeze`) by
    its plain form, in eval mode. A module's plain form may itself hold orthofx layers (a probe around a block):
    repeated until none is left."""
    for _ in range(100):
        pending = _modules_to_freeze(frozen)
        if not pending:
            return
        for name, module in pending:
            with torch.no_grad():
                plain = module.to_plain()
            plain.eval()
            replace_module(frozen, name, plain)
            if _computes_otherwise(module, plain):
                plain.__dict__[BAKED_ATTRIBUTE] = type(module).__name__
    # a to_plain() that keeps returning a module with to_plain()
    raise ExportError("freeze did not terminate: a module's to_plain() keeps returning orthofx layers")


@dataclass
class _LayerReads:
    """Reads of orthofx layers' state in one graph of a model being frozen (:func:`_layer_reads`)."""

    graph_module: fx.GraphModule
    layers: list[str]               # paths, relative to graph_module, of the layers freeze replaces
    values: dict[fx.Node, Any]      # value of every node computed from the reads alone, before the replacement
    calls: list[tuple[fx.Node, nn.Module]]  # calls of a part of such a layer, and the part called


def _under(target: str, layers: list[str]) -> str | None:
    """The path in ``layers`` that the attribute or module path ``target`` lies strictly below, or ``None``."""
    return next((layer for layer in layers if target.startswith(layer + ".")), None)


def _layer_reads(frozen: nn.Module) -> list[_LayerReads]:
    """Where a graph of ``frozen`` uses an orthofx layer that :func:`_replace_by_plain_forms` will replace other
    than by calling it: a forward that calls ``self.enc`` and also reads ``self.enc.weight`` (weight tying) is
    traced into ``get_attr enc.raw_weight`` and the ops computing the weight from it, and the plain form has no
    ``raw_weight``; one that calls a part of the layer (``self.cn.conv(x)``) needs the plain form to hold the same
    part. Evaluates, before the replacement, every node computed from such reads and constants alone (the layer's
    computed weight, in eval mode), for :func:`_rebind_layer_reads`."""
    found: list[_LayerReads] = []
    if not isinstance(frozen, fx.GraphModule):
        return found
    layers = [name for name, _ in _modules_to_freeze(frozen)]
    for path, gm in list(_graph_modules(frozen)):
        local = [name[len(path) + 1:] if path else name for name in layers if not path or name.startswith(path + ".")]
        calls = [(n, gm.get_submodule(str(n.target))) for n in gm.graph.nodes
                 if n.op == "call_module" and _under(str(n.target), local) is not None]
        reads = [n for n in gm.graph.nodes if n.op == "get_attr" and _under(str(n.target), local) is not None]
        if not reads and not calls:
            continue
        # _mutated_attributes takes every attribute upstream of a tensor an in-place op writes as written (a conv's
        # weight read before `y += 1`): right for folding, which then folds less, but such a read would be refused;
        # the layers' state counts as written only where a write reaches it through views
        written = _mutated_attributes(gm.graph, views_only=True)
        mutated = {t for t in _mutated_attributes(gm.graph) if _under(t, local) is None or t in written}
        const, casts = _constant_nodes(gm, mutated)
        region: set[fx.Node] = set()
        stack = [n for n in reads if n in const]
        while stack:  # a cast to a traced value's dtype (w.type_as(x)) stays in the graph, after the read
            cur = stack.pop()
            if cur not in region:
                region.add(cur)
                stack.extend(u for u in cur.users if u in const and u not in casts)
        found.append(_LayerReads(gm, local, _run_constants(gm, list(region), const, casts), calls))
    return found


def _same_module(old: nn.Module, new: nn.Module) -> bool:
    """Whether ``new`` computes what ``old`` did: the same class and equal state."""
    if new is old:
        return True
    if type(new) is not type(old):
        return False
    a, b = old.state_dict(), new.state_dict()
    return a.keys() == b.keys() and all(
        not isinstance(a[k], torch.Tensor) or (a[k].shape == b[k].shape and torch.equal(a[k], b[k])) for k in a)


def _rebind_layer_reads(frozen: nn.Module, found: list[_LayerReads]) -> None:
    """After :func:`_replace_by_plain_forms`: make the reads :func:`_layer_reads` found read the plain forms.

    Walking the graph in order, a node computed from a replaced layer's old state whose value (recorded before the
    replacement) equals a tensor of that layer's plain form (same dtype, shape and values, not all equal: the tied
    weight of an ``OrthogonalLinear`` is its plain ``nn.Linear``'s ``weight``) becomes a read of it, so the tie holds
    in the frozen model; what is still computed from old state where it meets the rest of the graph is stored
    once as a buffer (``orthofx_read_<n>``, the value the unfrozen model computes in eval mode: exact). A read of
    state the model writes in its forward is an ExportError naming it."""
    for reads in found:
        gm, graph = reads.graph_module, reads.graph_module.graph
        for node, part in reads.calls:
            layer = _under(str(node.target), reads.layers)
            try:
                now = gm.get_submodule(str(node.target))
            except AttributeError:
                now = None
            if now is None or not _same_module(part, now):
                raise ExportError(f"the forward calls {str(node.target)!r}, a part of the orthofx layer {layer!r} "
                                  f"(a {type(part).__name__}), which freeze replaces by its plain form "
                                  f"(layer.to_plain(), a {type(gm.get_submodule(layer)).__name__}) that "
                                  f"{'has no such part' if now is None else 'holds another one there'}. Fix: call "
                                  "the layer itself, or keep the part in a module of its own that the forward calls")
        tensors = [(layer, f"{layer}.{name}", t) for layer in reads.layers
                   for name, t in (*gm.get_submodule(layer).named_parameters(),
                                   *gm.get_submodule(layer).named_buffers())]
        stale: set[fx.Node] = set()
        rebound: set[fx.Node] = set()
        sources: dict[fx.Node, set[str]] = {}  # the layers whose old state a node is computed from
        for node in list(graph.nodes):
            if not (node.op == "get_attr" and _under(str(node.target), reads.layers) is not None
                    or node in reads.values and any(i in stale for i in node.all_input_nodes)):
                continue
            sources[node] = ({_under(str(node.target), reads.layers)} if node.op == "get_attr" else
                             set().union(*(sources[i] for i in node.all_input_nodes if i in stale)))
            value = reads.values.get(node)
            # a tensor of those layers only, and not one of equal entries: another layer's tensor equal by chance
            # (a deep-copied clone's weight) or a zero-initialised bias would tie the read to it in the frozen
            # model, which then trains or loads them as one; the buffer below is exact too
            match = next((name for layer, name, t in tensors if layer in sources[node]
                          and isinstance(value, torch.Tensor) and t.dtype == value.dtype and t.shape == value.shape
                          and t.device == value.device and torch.equal(t, value)
                          and t.numel() > 1 and bool((t != t.reshape(-1)[0]).any())), None)
            if match is None:
                stale.add(node)
                continue
            with graph.inserting_before(node):
                new = graph.get_attr(match)
            _copy_meta(new, node)
            node.replace_all_uses_with(new)
            rebound |= {node, new}  # a later node may match too (a cast to the dtype it has): new is then unused
        _erase_dead(graph, stale | rebound)  # what only the rebound nodes used
        for node in [n for n in graph.nodes if n in stale and any(u not in stale for u in n.users)]:
            value = reads.values.get(node)
            if not isinstance(value, torch.Tensor):
                written = node not in reads.values
                what = "depends on state the forward writes in place" if written else "is not a tensor"
                fix = ("write a copy instead (layer.weight.clone().mul_(2), or the out-of-place layer.weight * 2)"
                       if written else "read the layer's weight as a tensor (layer.weight)")
                read = first_few(sorted({repr(str(n.target)) for n in stale if n.op == "get_attr"}), 3)
                raise ExportError(f"the forward reads the state of an orthofx layer that freeze replaces by its "
                                  f"plain form ({read}), and what it computes from it (node {node.name!r}) {what}, "
                                  f"so it cannot be stored. Fix: {fix}")
            buffer = _free_attribute_name(gm, READ_PREFIX)
            gm.register_buffer(buffer, value.detach().clone())
            with graph.inserting_before(node):
                new = graph.get_attr(buffer)
            _copy_meta(new, node)
            node.replace_all_uses_with(new)
        _erase_dead(graph, stale | rebound)
        graph.lint()
        gm.recompile()


def _plain_custom_decompositions(frozen: nn.Module) -> int:
    """Put the stand-in of :mod:`orthofx.nn.conditioning` with the same outputs in place of every call of the
    custom ops ``orthofx::eigh_stable`` / ``orthofx::svd_stable`` in the graphs of ``frozen`` (a hand-written
    forward calling ``orthofx.nn.eigh_stable``: ``torch.ops.orthofx.eigh_stable.default(A, taylor_order,
    clamp_gap, uplo)`` becomes ``stable_eigh(A, taylor_order=..., clamp_gap=..., UPLO=uplo)``, the reduced
    ``svd_stable`` ``stable_linalg_svd(A, full_matrices=False, ...)``), so that :func:`plain_decompositions` makes
    them run plain ``torch.linalg`` (a frozen model's ``.pt2`` then loads without orthofx) and
    :func:`fold_constant_decompositions` / ``to_newton_schulz`` see them as the transformed models' calls. In
    place; returns the number of calls changed."""
    changed = 0
    if not isinstance(frozen, fx.GraphModule):
        return changed
    for _, gm in list(_graph_modules(frozen)):
        for _ in each_mode(gm):
            nodes = [n for n in gm.graph.nodes if stand_in_call(n)]
            for node in nodes:
                node.target, node.args, node.kwargs = stand_in_call(node)
            if nodes:
                gm.recompile()
                changed += len(nodes)
    return changed


def _holds_state(module: nn.Module) -> bool:
    """Whether ``module`` (or a submodule) has a parameter or a buffer."""
    return next(module.parameters(), None) is not None or next(module.buffers(), None) is not None


def _computes_otherwise(module: nn.Module, plain: nn.Module) -> bool:
    """Whether ``plain``, the plain form :func:`freeze` puts in place of the orthofx layer ``module``, is a layer of
    its own with baked state (an orthogonal conv's circular ``nn.Conv2d``, a ``FrozenConvNormNd``), rather than
    what ``module`` wrapped (a Jacobian probe's block, the user's own) or a stateless pass-through (a condition
    monitor's), which the original model computes the same way."""
    return not any(plain is inner for inner in module.modules()) and _holds_state(plain)


def _freeze_parts(model: nn.Module, example: ExampleCall | None) -> nn.Module:
    """:func:`freeze` of a model that ``orthofx.transform`` did not return but that holds transformed models: a
    copy (the user's model is not changed), in eval mode, run once on the example call (so that every part sees
    the inputs it gets inside the model), in which each transformed part is replaced by ``freeze(part)`` and
    each orthofx layer outside the parts by its plain form. Each part keeps its eval outputs (freeze's promise),
    and the rest of the model is the same modules in eval mode, so the copy's eval outputs are the model's."""
    frozen = copy_model(unwrap_model(model))
    frozen.eval()
    _run_example(frozen, example)
    for _, part in transformed_parts(frozen):
        frozen_part = freeze(part)
        for alias in _paths_reaching(frozen, unwrap_model(part)):
            replace_module(frozen, alias, frozen_part)
    _replace_by_plain_forms(frozen)
    return frozen.eval()


def _paths_reaching(root: nn.Module, target: nn.Module) -> list[str]:
    """The outermost paths in ``root`` of ``target`` itself or a wrapper of it (``self.fast =
    torch.compile(self.backbone)``), each name of a module registered twice included, so that a part frozen once
    replaces every way the model reaches it."""
    # one path per (parent module, child name) edge: setting it replaces the target under every name through that
    # parent (walking every path instead was 2^depth for a module shared at every level of a nesting)
    return [_join(parent, name) for parent, name, _ in
            module_edges_holding(root, lambda module: unwrap_model(module) is target)]


def _describe_inputs(example: ExampleCall) -> str:
    """``shape (2, 1, 8, 8) float32 on cpu`` for each input (other values by type; keyword inputs as
    ``mask=...``), for error messages."""
    def describe(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return f"shape {tuple(x.shape)} {str(x.dtype).replace('torch.', '')} on {x.device}"
        return type(x).__name__

    parts = [describe(x) for x in example.args] + [f"{name}={describe(x)}" for name, x in example.kwargs.items()]
    return "; ".join(parts) or "no inputs"


def _site_names(gm: fx.GraphModule) -> dict[str, str]:
    """``{node name: site name}`` for the decompositions and Newton-Schulz powers of ``gm`` (what freeze may
    fold; nested graphs as ``<path>.<node>``): the site a pass recorded on the node, else the name
    :func:`orthofx.plan.collect_sites` gives a torch call."""
    names: dict[str, str] = {}
    for path, module in gm.named_modules():
        if not isinstance(module, fx.GraphModule):
            continue
        by_node = {site.node: site.name for site in collect_sites(module) if site.kind == "function"}
        for node in module.graph.nodes:
            site = node.meta.get("orthofx_site") or by_node.get(node.name)
            if site and foldable_seed(node):
                key = f"{path}.{node.name}" if path else node.name
                names[key] = f"{path}.{site}" if path else site
    return names


@dataclass
class _Decomposition:
    key: str            # node name (nested: <submodule path>.<node name>)
    site: str
    op: str
    producers: list[str]


def _decompositions(gm: fx.GraphModule) -> list[_Decomposition]:
    """Every decomposition call left in ``gm``'s graphs, with its site and the layers whose outputs it decomposes."""
    names = _site_names(gm)
    found = []
    for path, module in gm.named_modules():
        if not isinstance(module, fx.GraphModule):
            continue
        for node in module.graph.nodes:
            op = decomposition_op(node)
            if op is None:
                continue
            key = f"{path}.{node.name}" if path else node.name
            producers = [f"{path}.{p}" if path else p for p in producers_feeding(module, node)]
            found.append(_Decomposition(key, names.get(key, key), op, producers))
    return found


def _newton_schulz_nodes(gm: fx.GraphModule) -> dict[str, tuple[fx.GraphModule, fx.Node]]:
    nodes = {}
    for path, module in gm.named_modules():
        if isinstance(module, fx.GraphModule):
            for node in module.graph.nodes:
                if node.op == "call_function" and node.target is power_newton_schulz:
                    nodes[f"{path}.{node.name}" if path else node.name] = (module, node)
    return nodes


def _set_iterations(nodes: list[tuple[fx.GraphModule, fx.Node]], iterations: int) -> None:
    owners = {}
    for owner, node in nodes:
        node.kwargs = {**node.kwargs, "iterations": iterations}
        owners[id(owner)] = owner
    for owner in owners.values():
        owner.recompile()


def _no_onnx_form(left: list[_Decomposition], reasons: dict[str, str]) -> ExportError:
    parts = []
    for d in left:
        feeding = f", decomposing the output of {', '.join(repr(p) for p in d.producers)}" if d.producers else ""
        parts.append(f"{d.op} at site '{d.site}'{feeding}: {reasons.get(d.key, 'not a matrix power')}")
    return ExportError(
        "cannot export to ONNX: " + "; ".join(parts) + ". ONNX has no eigendecomposition or SVD, and the only "
        "decompositions orthofx can export are matrix square roots and inverse square roots computed from one "
        "(V diag(lambda^(1/2) or lambda^(-1/2)) V^T, replaced by Newton-Schulz iterations). Ways out: export to "
        ".pt2 (torch.export keeps the decomposition, exact); or keep the decomposition out of the ONNX graph "
        "(compute it in a submodule listed under capture.leaf_modules and export the model up to it, or give that "
        "submodule an ONNX translation of your own)")


@dataclass
class NewtonSchulzForm:
    """How the ``.onnx`` export replaced decompositions: the sites, the iteration count and the difference of the
    PyTorch Newton-Schulz form from the exact frozen model on the example inputs."""

    sites: list[str]
    iterations: int
    max_abs_diff: float
    chosen: bool  # True: iterations chosen on the example inputs; False: given

    def __str__(self) -> str:
        how = "chosen" if self.chosen else "given"
        return (f"Newton-Schulz at {', '.join(self.sites)} ({self.iterations} iterations, {how}; "
                f"max |diff| {self.max_abs_diff:.3g} from the exact decomposition)")


def _onnx_form(frozen: fx.GraphModule, example: ExampleCall, iterations: int | None, expected: list[torch.Tensor]
               ) -> tuple[fx.GraphModule, NewtonSchulzForm | None]:
    """The frozen model with its matrix powers computed by Newton-Schulz (a copy), or ``frozen`` itself when it has
    no decomposition; raises :class:`ExportError` for a decomposition with no matmul-only form. ``expected``:
    ``frozen``'s output tensors on ``example``, which the iteration count is chosen to reproduce."""
    if iterations is not None and (not isinstance(iterations, int) or isinstance(iterations, bool)
                                   or iterations < 1):
        raise ExportError(f"newton_schulz_iterations must be None (chosen on the example inputs) or an int >= 1, "
                          f"got {iterations!r}")
    found = _decompositions(frozen)
    if not found:
        return frozen, None
    form = copy_model(frozen)
    before = set(_newton_schulz_nodes(form))
    reasons = to_newton_schulz(form, iterations=iterations or NEWTON_SCHULZ_SCHEDULE[0])
    left = _decompositions(form)
    if left:
        raise _no_onnx_form(left, reasons)
    nodes = [v for k, v in _newton_schulz_nodes(form).items() if k not in before]
    schedule = (iterations,) if iterations is not None else NEWTON_SCHULZ_SCHEDULE
    tried: list[tuple[int, float]] = []
    for count in schedule:
        _set_iterations(nodes, count)
        tried.append((count, _max_diff(expected, _outputs(form, example))))
        if tried[-1][1] <= NEWTON_SCHULZ_TARGET:
            break
    # None reached the target (float32 rounding of an ill-conditioned matrix function): past convergence more
    # iterations only move rounding errors, so take the fewest within 10 % of the best difference.
    best = min(diff for _, diff in tried)
    count, diff = next((c, d) for c, d in tried if d <= NEWTON_SCHULZ_TARGET or d <= 1.1 * best)
    _set_iterations(nodes, count)
    return form, NewtonSchulzForm(sorted({d.site for d in found}), count, diff, iterations is None)


@dataclass
class ExportResult:
    """What :func:`export` wrote and how closely the written model reproduces the frozen one.

    Example::

        import orthofx
        x = orthofx.models.example_input("small_cnn")
        gm = orthofx.transform(orthofx.models.get("small_cnn"), "lorth", example_inputs=(x,))
        result = orthofx.export(gm, "small_cnn.pt2", example_inputs=(x,))
        print(result)
        assert result.format == "pt2" and result.max_abs_diff < 1e-5
    """

    path: str
    format: str
    max_abs_diff: float | None
    seconds: float
    #: ``.onnx`` only: the decompositions replaced by Newton-Schulz iterations (None when there were none).
    newton_schulz: NewtonSchulzForm | None = None

    def __str__(self) -> str:
        diff = "not checked" if self.max_abs_diff is None else f"max |diff| {self.max_abs_diff:.3g}"
        text = f"{self.format} -> {self.path} ({diff}, {self.seconds:.2f} s)"
        return text if self.newton_schulz is None else f"{text}; {self.newton_schulz}"


def _max_diff(expected: list[torch.Tensor], actual: list) -> float:
    """The largest absolute difference; a NaN or inf where the model's output is finite counts as ``inf``."""
    return max(_output_diffs(expected, actual), default=0.0)


def _output_diffs(expected: list[torch.Tensor], actual: list) -> list[float]:
    """The largest absolute difference of each output (0 for an empty one; a NaN or inf where the model's output
    is finite counts as ``inf``)."""
    if len(expected) != len(actual):
        raise ExportError(f"the exported model returns {len(actual)} outputs, the model {len(expected)}")
    diffs = []
    for e, a in zip(expected, actual):
        a = torch.as_tensor(a).detach()  # outputs of a reloaded .pt2 module require grad (its parameters do)
        if tuple(a.shape) != tuple(e.shape):
            raise ExportError(f"exported output shape {tuple(a.shape)} differs from the model's {tuple(e.shape)}")
        e = e.detach().cpu().double()
        if not bool(torch.isfinite(e).all()):
            raise ExportError("the frozen model's output on example_inputs is not finite (NaN or inf), so the "
                              "exported model cannot be checked against it; pass example inputs on which the "
                              "model gives finite outputs")
        diffs.append(float((e - a.double()).abs().nan_to_num(nan=float("inf")).max()) if e.numel() else 0.0)
    return diffs


def _worst_output(expected: list[torch.Tensor], actual: list) -> tuple[float, float]:
    """``(difference, tolerance)`` of the output whose difference is the largest fraction of its own tolerance
    (:func:`onnx_tolerance` of that output alone). Each output is held to its own scale: a large output (a sum
    of ~1e6) must not lend its tolerance to a small one (logits of ~1) whose translation is wrong."""
    return _worst_of(_output_diffs(expected, actual), expected)


def _worst_of(diffs: list[float], expected: list[torch.Tensor]) -> tuple[float, float]:
    """:func:`_worst_output` from the outputs' differences ``diffs`` (:func:`_output_diffs`)."""
    pairs = [(d, onnx_tolerance([e])) for d, e in zip(diffs, expected)]
    return max(pairs, key=lambda pair: pair[0] / pair[1], default=(0.0, ONNX_TOLERANCE))


def onnx_tolerance(expected: list[torch.Tensor]) -> float:
    """The largest ONNX difference :func:`export` accepts for the model's outputs ``expected``: ``ONNX_TOLERANCE``
    (1e-4), or ``ROUNDING_ULPS`` rounding steps of an output's dtype at its largest magnitude ``m``,
    ``8 eps(dtype) m``, when that is more.

    The absolute 1e-4 is a relative ``1e-4 / m``: for float32 outputs above ``1e-4 / (8 eps) ~ 100`` it falls to a
    few rounding steps, which two correct runtimes exceed (onnxruntime and torch sum in other orders). A correct
    float32 model with outputs of ~1.6e3 differed by 6e-4 (3 steps) and was refused as "should not be trusted";
    for float16 (eps 1e-3) this happens from outputs of ~0.01 (measured 1.2e-4 to 2.4e-4 on outputs of ~10).
    A wrong translation differs by a fraction of ``m``, orders of magnitude more than 8 steps. :func:`export`
    holds each output to its own tolerance (:func:`_worst_output`); of several outputs this is the largest."""
    tolerance = ONNX_TOLERANCE
    for e in expected:
        if e.is_floating_point() and e.numel():
            scale = float(e.detach().abs().max().double())
            if math.isfinite(scale):
                tolerance = max(tolerance, ROUNDING_ULPS * torch.finfo(e.dtype).eps * scale)
    return tolerance


def _check_finite_inputs(example: ExampleCall) -> list[str]:
    """Refuse a floating example tensor holding NaN, and return the labels of those holding +-inf.

    The export is checked by comparing the written model's outputs with the frozen model's on the example call
    (:func:`_output_diffs`), which needs finite outputs: NaN spreads through almost any model, and a NaN input
    named here says more than "the output is not finite". An infinite input is often meant: an additive attention
    mask (``nn.Transformer.generate_square_subsequent_mask``: 0 and -inf) gives finite outputs after the softmax,
    and those compare as any others; :func:`_check_finite_outputs` names the inputs where they are not finite."""
    infinite = []
    for label, x in example.named_inputs():
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()) or bool(torch.isfinite(x).all()):
            continue
        if bool(torch.isnan(x).any()):
            raise ExportError(f"{label} holds NaN; the export is checked on the example inputs, so pass ones without "
                              "NaN (+-inf is taken where the model's outputs stay finite, as with an additive "
                              "attention mask)")
        infinite.append(label)
    return infinite


def _check_finite_outputs(frozen: nn.Module, example: ExampleCall, infinite: list[str]) -> None:
    """Refuse example inputs holding +-inf (``infinite``: their labels, :func:`_check_finite_inputs`) on which the
    frozen model's outputs are not finite, naming those inputs: the check of the written model compares outputs."""
    if not infinite or all(bool(torch.isfinite(t).all()) for t in _outputs(frozen, example)):
        return
    raise ExportError(f"{', '.join(infinite)} hold{'s' if len(infinite) == 1 else ''} inf, and the frozen model's "
                      "output on the example inputs is not finite (NaN or inf), so the exported model cannot be "
                      "checked against it; pass example inputs on which the model gives finite outputs (an "
                      "additive attention mask with -inf is fine where no row is masked entirely)")


def _export_call(frozen: fx.GraphModule, example: ExampleCall) -> ExampleCall:
    """The example call as torch.export must receive it for ``frozen`` (export's own frozen copy, whose
    placeholders this may reorder in place).

    torch.export (and the dynamo ONNX exporter, which calls it) runs a GraphModule with ``fx.Interpreter``, which
    binds inputs by position only: the keyword inputs are passed after the positional ones in the dict's order,
    whatever their names. A dict in another order than the graph's placeholders, or a parameter left at its
    default between two given ones (``forward(x, scale=1.0, mask=None)`` called with ``mask=m``), would bind a
    tensor to the wrong input. So the keyword inputs are put in placeholder order, and the placeholders the example
    leaves at their default are moved after the given ones (they keep their default: the exported graph has no
    input for them, as in export capture). Calls by name bind as before; only ``frozen``'s positional order past
    the example's positional inputs changes. Without keyword inputs, and for graphs whose inputs are taken apart
    by pytree code (nested inputs) or collected by ``*args``, the call is returned unchanged.
    """
    if not example.kwargs or not isinstance(frozen, fx.GraphModule):
        return example  # a frozen model holding frozen parts is called through its own forward, by name
    placeholders = [node for node in frozen.graph.nodes if node.op == "placeholder"]
    position = {node.target: i for i, node in enumerate(placeholders)}
    pytree_code = type(frozen.graph._codegen) is not fx.graph.CodeGen  # nested inputs, taken apart by pytree code
    variadic = any(str(name).startswith("*") for name in position)
    if pytree_code or variadic or not set(example.kwargs) <= set(position):
        return example
    given = {node.target for node in placeholders[:len(example.args)]} | set(example.kwargs)
    order = [n for n in placeholders if n.target in given] + [n for n in placeholders if n.target not in given]
    if order != placeholders:
        first = next(node for node in frozen.graph.nodes if node.op != "placeholder")
        for node in order:
            first.prepend(node)
        frozen.recompile()
    return ExampleCall(example.args, {name: example.kwargs[name] for name in sorted(example.kwargs, key=position.get)})


Batches = dict[int, RecurrentBatch]  # recurrent_batch_dims: the example tensors whose batch is not dimension 0


def _batch_dims(model: nn.Module, example: ExampleCall, dynamic_batch: bool) -> Batches:
    """The example tensors whose batch is dimension 1 (:func:`orthofx.capture.recurrent_batch_dims`: the input
    ``(L, N, H_in)`` of a seq-first recurrent layer, a hidden state ``(D * num_layers, N, H_out)``); the others'
    is dimension 0. Empty without ``dynamic_batch`` (nothing is marked)."""
    return recurrent_batch_dims(model, example.args, example.kwargs) if dynamic_batch else {}


def _dynamic_shapes(model: nn.Module, example: ExampleCall, dynamic_batch: bool, dims: Batches):
    """The batch dimension of every tensor input marked ``Dim.AUTO`` (:func:`orthofx.capture.batch_dynamic_shapes`,
    as export capture marks them: dimension 0, or 1 for the tensors of ``dims``; nested inputs leaf by leaf, a
    ``*args`` parameter's inputs as one entry, keyword inputs by name): torch.export finds which of them are one
    batch (equal sizes it has to keep equal), which are free, and which the model fixes. One shared ``Dim`` would
    tie an input that is not batched (a lookup table) to the batch and fail."""
    return batch_dynamic_shapes(model, example.args, example.kwargs, dims) if dynamic_batch else None


def _batched_leaves(example: ExampleCall, shapes: list[tuple], dims: Batches) -> set[int]:
    """``id`` of each tensor of the example call (nested ones included) that the exported model takes with a
    symbolic batch dimension (:func:`orthofx.capture.batch_dim`); ``shapes``: the exported graph's input shapes,
    one per tensor leaf of the call in pytree order (symbolic sizes are not ints: :func:`_program_input_shapes`)."""
    leaves = output_tensors((example.args, example.kwargs))
    return {id(x) for x, shape in zip(leaves, shapes)
            if len(shape) > batch_dim(x, dims) and not isinstance(shape[batch_dim(x, dims)], int)}


def _program_input_shapes(program: Any) -> list[tuple]:
    """The shapes of an exported program's tensor inputs (pytree order), each size that the program fixes as an
    int and the free ones as ``SymInt``.

    A dimension marked ``Dim.AUTO`` that the model fixes (dimension 0 of an attention layer's ``(T, T)``
    ``attn_mask``, equal to the sequence length) is a ``SymInt`` too: torch.export gives it the constant's
    expression (``8``), and the ONNX exporter, which traces with ``backed_size_oblivious``, a symbol whose range is
    that one value (``s11: VR[8, 8]``, an input the ``.onnx`` graph names ``s11``). Taken for a batch, it was grown
    by one in the check on a larger batch, which then failed."""
    ranges = program.range_constraints

    def size(d: Any) -> Any:
        if not isinstance(d, torch.SymInt):
            return d
        if is_concrete_int(d):
            return d.node.maybe_as_int()
        bounds = ranges.get(d.node.expr)
        return int(bounds.lower) if bounds is not None and bounds.lower == bounds.upper else d

    placeholders = {node.name: node.meta.get("val") for node in program.graph.nodes if node.op == "placeholder"}
    values = [placeholders.get(name) for name in program.graph_signature.user_inputs if isinstance(name, str)]
    return [tuple(size(d) for d in v.shape) for v in values if isinstance(v, torch.Tensor)]


def _grown_batch(example: ExampleCall, batched: set[int], dims: Batches) -> ExampleCall:
    """``example`` with one more sample (a copy of the first) in the batch dimension
    (:func:`orthofx.capture.batch_dim`) of each tensor of ``batched``."""
    def grow(x: Any) -> Any:
        if not (isinstance(x, torch.Tensor) and id(x) in batched):
            return x
        dim = batch_dim(x, dims)
        return torch.cat([x, x.narrow(dim, 0, 1)], dim=dim)

    args, kwargs = torch.utils._pytree.tree_map(grow, (example.args, example.kwargs))
    return ExampleCall(tuple(args), dict(kwargs))


def _check_dynamic_batch(path: str, batched: set[int], example: ExampleCall, reference: nn.Module, run,
                         dims: Batches, measure=_max_diff) -> Any:
    """Run the exported model (``run(call) -> outputs``) on a batch one larger than the example's and compare
    with ``reference`` (``measure(expected, actual)``: the largest difference, or for ONNX
    :func:`_worst_output`); ``batched``: the tensors the exported model takes with a dynamic batch dimension
    (:func:`_batched_leaves`; dimension 1 for the tensors of ``dims``, a seq-first recurrent layer's input and
    hidden states)."""
    fix = ("pass dynamic_batch=False to export the example's batch size, or make the batch size a dynamic value "
           "in the model (no Python loop or list over the batch)")
    if not batched:
        raise ExportError(f"{path}: no input kept a dynamic batch dimension: the model fixes its batch size when "
                          f"traced; {fix}")
    grown = _grown_batch(example, batched, dims)
    try:
        expected = _outputs(reference, grown)
        actual = run(grown)
        return measure(expected, actual)
    except Exception as exc:
        raise ExportError(f"{path}: the exported model does not take a batch one larger than the example's "
                          f"({_root_cause(exc)}); {fix}") from exc


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _root_cause(exc: BaseException) -> str:
    """The innermost exception in ``exc``'s chain, as one line without terminal colour codes: exporters wrap
    the useful message (e.g. "No ONNX function found for orthofx.eigh_stable") in generic ones."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        # `raise ... from None` hides the context (Python's traceback does not show it either): inspect's
        # "missing a required argument" hid a StopIteration, which was reported instead
        inner = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if inner is None:
            break
        exc = inner
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _check_opset(opset: int) -> None:
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise ExportError(f"opset must be an int (e.g. opset=20), got {opset!r}")
    if opset < 18:
        raise ExportError(f"opset {opset} is not supported: opsets below 18 produce graphs onnxruntime rejects; use "
                          "opset >= 18")
    try:
        import onnx
    except ImportError:
        return  # reported by the export itself
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise ExportError(f"opset {opset} is newer than the installed onnx knows ({newest}); use opset <= {newest}")


def _export_onnx(frozen: nn.Module, path: str, example: ExampleCall, dynamic_batch: bool, opset: int,
                 reference: nn.Module, expected: list[torch.Tensor], dims: Batches
                 ) -> tuple[float, tuple[float, float]]:
    """Export ``frozen`` and return onnxruntime's largest difference from ``reference`` (``expected``: its output
    tensors on ``example``, computed once by the caller) and
    ``(difference, tolerance)`` of the output furthest beyond the difference it allows (:func:`_worst_output`,
    on the example call and on the larger batch): the export is wrong where that difference exceeds that
    tolerance.
    ``example``: the call as torch.export takes it (:func:`_export_call`); its keyword tensors become graph inputs
    named as the keywords. ``dims``: the tensors whose batch is dimension 1 (:func:`_batch_dims`)."""
    _check_opset(opset)
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ExportError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'orthofx[onnx]'") from exc
    try:
        onnx_program = torch.onnx.export(frozen, _onnx_positional(example), path, kwargs=example.kwargs or None,
                                         dynamo=True, opset_version=opset, verbose=False,
                                         dynamic_shapes=_dynamic_shapes(frozen, example, dynamic_batch, dims))
    except OSError as exc:
        raise ExportError(f"cannot write {path!r}: {exc}") from exc
    except Exception as exc:
        cause = _root_cause(exc)
        hint = ""
        if "onnx" in cause.lower() or "decomposition" in cause.lower() or "orthofx" in cause:
            hint = (". Decompositions (eigh, svd) and ops without an ONNX translation need an exportable form; "
                    ".pt2 export keeps them")
        raise ExportError(f"torch.onnx.export failed: {cause}{hint}{_leaf_hint(frozen)}"
                          f"{_packed_sequence_hint(frozen)}{_dataclass_output_hint(frozen, example)}") from exc
    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as exc:  # onnx's ValidationError / InferenceError
        raise ExportError(f"the exported file {path!r} fails the ONNX checker: {type(exc).__name__}: "
                          f"{str(exc)[:400]}. A dtype an ONNX op does not take (e.g. a bfloat16 conv from an autocast "
                          "block in the forward) is a usual cause: export to .pt2 (torch.export) instead") from exc
    written = {entry.domain: entry.version for entry in onnx.load(path, load_external_data=False).opset_import}
    if written.get("", opset) != opset:
        raise ExportError(f"{path}: asked for opset {opset}, the exporter wrote opset {written['']}; use an opset "
                          "this torch.onnx supports")
    hint = _onnxruntime_dtype_hint(frozen, example)
    session = _onnxruntime_call(lambda: onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]),
                                path, "load", hint)

    def run(call: ExampleCall) -> list:
        # only the tensors (pytree order: positional, then keyword) are graph inputs: other values (a float,
        # None) are baked in
        tensors = output_tensors((call.args, call.kwargs))
        feeds = {arg.name: x.detach().cpu().numpy() for arg, x in zip(session.get_inputs(), tensors)}
        return _onnxruntime_call(lambda: session.run(None, feeds), path, "run", hint)

    diff, worst = _onnx_measure(expected, run(example))
    if dynamic_batch:
        # the program's shapes: the .onnx graph names a dimension the model fixes as it names a free one
        program = getattr(onnx_program, "exported_program", None)
        shapes = ([tuple(arg.shape) for arg in session.get_inputs()] if program is None
                  else _program_input_shapes(program))
        batched = _batched_leaves(example, shapes, dims)
        grown_diff, grown_worst = _check_dynamic_batch(path, batched, example, reference, run, dims,
                                                       measure=_onnx_measure)
        diff = max(diff, grown_diff)
        worst = max(worst, grown_worst, key=lambda pair: pair[0] / pair[1])
    return diff, worst


def _onnx_measure(expected: list[torch.Tensor], actual: list) -> tuple[float, tuple[float, float]]:
    """The largest difference (what :class:`ExportResult` reports) and :func:`_worst_output` (what is checked),
    from one comparison of the outputs."""
    diffs = _output_diffs(expected, actual)
    return max(diffs, default=0.0), _worst_of(diffs, expected)


def _onnx_positional(example: ExampleCall) -> tuple:
    """The positional inputs as ``torch.onnx.export`` must receive them to pass them on as they are.

    Without ``kwargs``, torch.onnx.export takes a dict in the last place of its positional inputs for the keyword
    inputs (the TorchScript exporter's convention, which it keeps): ``forward(self, batch)`` with ``batch = {"x":
    x, "y": y}`` was exported as ``forward(x=x, y=y)``, and torch.export failed with "missing a required argument:
    'batch'". An empty dict after it is taken for the (empty) keyword inputs instead, and the dict stays the
    positional input; the ONNX graph then takes its tensors as flat inputs named after the keys (``batch_x``,
    ``batch_y``), in pytree order, as the feeds in :func:`_export_onnx` pass them."""
    if not example.kwargs and example.args and isinstance(example.args[-1], dict):
        return example.args + ({},)
    return example.args


def _onnxruntime_dtype_hint(frozen: nn.Module, example: ExampleCall) -> str:
    """The fix to add to an onnxruntime failure where the model or its inputs hold float64 tensors (a model moved
    to float64 with ``.double()``): onnxruntime's CPU provider has float64 kernels for few ops (no ``Conv`` or
    ``ConvTranspose``: "Could not find an implementation for Conv(11)"), so a float32 copy is what exports."""
    # parameters and inputs: a float32 model may keep float64 buffers of its own (statistics, precomputed factors)
    tensors = [*frozen.parameters(), *output_tensors((example.args, example.kwargs))]
    if not any(t.dtype == torch.float64 for t in tensors):
        return ""
    return ("; the model computes in float64, for which onnxruntime's CPU provider lacks most kernels (Conv, "
            "ConvTranspose): export a float32 copy (copy.deepcopy(model).float() with float32 example inputs)")


def _onnxruntime_call(call, path: str, what: str, hint: str = ""):
    """``call()`` (loading or running the exported file in onnxruntime), its failure an :class:`ExportError`: the
    file is valid ONNX (the checker passed), but onnxruntime's CPU provider may lack a kernel for one of its ops
    (e.g. a 3-D ConvTranspose, or a float64 Conv: ``hint``, :func:`_onnxruntime_dtype_hint`)."""
    try:
        return call()
    except Exception as exc:  # onnxruntime's own exception types (Fail, NotImplemented, InvalidGraph ...)
        raise ExportError(f"onnxruntime could not {what} {path!r}, so the export cannot be checked: "
                          f"{type(exc).__name__}: {str(exc)[:400]}. The file passed the ONNX checker; an op "
                          "onnxruntime's CPU provider does not implement is the usual cause: export to .pt2 "
                          f"(torch.export) instead, or check the file with the runtime you deploy on{hint}") from exc


def _leaf_hint(model: nn.Module) -> str:
    """The note on submodules kept as fx leaves, for an export failure: the model's, or for a frozen model holding
    frozen parts theirs (prefixed with the part's path)."""
    sources = [("", model)] if is_transformed(model) else transformed_parts(model)
    leaves = [part_site_path(path, leaf) for path, part in sources
              for leaf, _ in manifest_of(part).capture.leaf_fallbacks]
    if not leaves:
        return ""
    return (f". Submodules kept as fx leaves because they could not be traced ({', '.join(leaves)}) usually "
            "cannot be exported either: rewrite a branch on tensor values with torch.cond or torch.where")


def _dataclass_output_hint(frozen: nn.Module, example: ExampleCall) -> str:
    """The fix for an export failure on a dataclass the model returns that pytree does not know (torch.export and
    the ONNX exporter then stop at "Found <class ...> in output, which is not a known type"): registering it with
    a serialized name, which a ``.pt2`` file needs too (:func:`_export_pt2`). ``""`` when the output holds none.

    Example: a forward returning ``Out(logits, boxes)`` (``@dataclass class Out``, module ``det``) gets
    ``". Fix: torch.export.register_dataclass(Out, serialized_type_name='det.Out') ..."``."""
    try:
        output = _checked_run(frozen, example)
    except Exception:  # noqa: BLE001 - only a hint: the export's own error is reported
        return ""
    # the dataclasses in fields of those too: pytree stops at an unregistered one, so an export after registering
    # the outer class alone failed again on the one it holds (Out(boxes=Boxes(...)))
    classes: list[type] = []
    pending = [output]
    while pending:
        for leaf in torch.utils._pytree.tree_leaves(pending.pop()):
            if dataclasses.is_dataclass(leaf) and not isinstance(leaf, type) and type(leaf) not in classes:
                classes.append(type(leaf))
                pending.extend(getattr(leaf, field.name, None) for field in dataclasses.fields(leaf))
    if not classes:
        return ""
    calls = "; ".join(f"torch.export.register_dataclass({cls.__qualname__}, serialized_type_name="
                      f"'{cls.__module__}.{cls.__qualname__}')" for cls in classes)
    return (f". Fix: register the dataclasses the model returns with pytree, before exporting (and before "
            f"torch.export.load of a .pt2): {calls}; or return a tuple or dict")


def _packed_sequence_hint(model: nn.Module) -> str:
    """The note for an export failure of a model whose graph packs variable-length sequences
    (:func:`~orthofx.capture.sequence_helper` calls), which torch.export cannot follow into a recurrent layer."""
    helpers = sorted({str(node.args[0]) for module in model.modules() if isinstance(module, fx.GraphModule)
                      for node in module.graph.nodes
                      if node.op == "call_function" and node.target is sequence_helper})
    if not helpers:
        return ""
    return (f". The model calls torch.nn.utils.rnn.{', '.join(helpers)}: torch.export cannot trace a recurrent layer "
            "on a PackedSequence (the layer reads its batch sizes as Python numbers). Save the weights and policy "
            "instead (a .pt path, reloaded with orthofx.load), or give the recurrent layer padded tensors")


def _mutable_output_containers(program: Any) -> None:
    """Make ``program`` (an ExportedProgram of a GraphModule) return lists and dicts where it returned fx's
    ``immutable_list`` / ``immutable_dict``.

    torch.export runs a GraphModule with ``fx.Interpreter``, whose output containers are fx's immutable ones, and
    records their types as the program's output structure: the model returns ``[a, b]`` and the ``.pt2`` program an
    ``immutable_list``, on which ``out.append(...)`` or ``out["extra"] = ...`` raise. The structure is rewritten
    with the plain types (the leaves and their order are the same)."""
    pytree = torch.utils._pytree
    signature = program.module_call_graph[0].signature

    def plain(value: Any) -> Any:
        if isinstance(value, immutable_list):
            return [plain(v) for v in value]
        if isinstance(value, immutable_dict):
            return {k: plain(v) for k, v in value.items()}
        node = pytree.SUPPORTED_NODES.get(pytree._get_node_type(value))
        if node is None:
            return value
        children, context = node.flatten_fn(value)
        return node.unflatten_fn([plain(child) for child in children], context)

    leaves = [object() for _ in range(signature.out_spec.num_leaves)]
    signature.out_spec = pytree.tree_structure(plain(pytree.tree_unflatten(leaves, signature.out_spec)))


def _return_types_in(value: Any, where: str = "the output") -> list[tuple[str, type]]:
    """``(where, class)`` of each ``torch.return_types`` value (the named tuples of ``torch.max(x, dim=1)``,
    ``torch.sort``, ``torch.linalg.slogdet`` ...) in a model's output ``value``, e.g. ``[("output[1]",
    torch.return_types.max)]``: torch registers these classes with pytree without a serialized name."""
    if type(value).__module__ == "torch.return_types":
        return [(where, type(value))]
    if isinstance(value, (tuple, list)):
        items = enumerate(value)
    elif isinstance(value, dict):
        items = ((repr(k), v) for k, v in value.items())
    else:
        return []
    prefix = "output" if where == "the output" else where
    return [found for key, item in items for found in _return_types_in(item, f"{prefix}[{key}]")]


def _export_pt2(frozen: nn.Module, path: str, example: ExampleCall, dynamic_batch: bool, dims: Batches) -> float:
    """Export ``frozen`` with torch.export on ``example`` (the call as torch.export takes it, :func:`_export_call`;
    the program takes its keyword inputs by name), reload it and return its largest difference from ``frozen``.
    ``dims``: the tensors whose batch is dimension 1 (:func:`_batch_dims`).

    A program torch.export.load cannot read back because of its nested ``torch.no_grad()`` / ``torch.autocast``
    regions is written once more with the regions inlined (:func:`_read_back_inlined`), with an
    :class:`~orthofx.OrthofxWarning` saying what the file's program no longer does as the model."""
    try:
        program = torch.export.export(frozen, example.args, kwargs=example.kwargs or None,
                                      dynamic_shapes=_dynamic_shapes(frozen, example, dynamic_batch, dims))
    except Exception as exc:
        raise ExportError(f"torch.export failed: {_root_cause(exc)}{_leaf_hint(frozen)}"
                          f"{_packed_sequence_hint(frozen)}{_dataclass_output_hint(frozen, example)}") from exc
    _mutable_output_containers(program)
    _write_pt2(program, path, frozen, example)
    inlined = None
    try:
        loaded = torch.export.load(path).module()
    except Exception as exc:  # noqa: BLE001 - torch's deserialisation errors have no common type
        os.remove(path)  # a file torch.export.load cannot read is of no use
        program, loaded, inlined = _read_back_inlined(program, path, frozen, example, exc)
    diff = _max_diff(_outputs(frozen, example), _outputs(loaded, example))
    if dynamic_batch:  # on the program written: the inlined one where the first could not be read back
        batched = _batched_leaves(example, _program_input_shapes(program), dims)
        diff = max(diff, _check_dynamic_batch(path, batched, example, frozen,
                                              lambda call: _outputs(loaded, call), dims))
    if inlined is not None:
        regions, cause = inlined
        warnings.warn(_inlined_regions_note(path, regions, cause, diff, frozen, loaded, example), OrthofxWarning,
                      stacklevel=caller_stacklevel())
    return diff


def _write_pt2(program: Any, path: str, frozen: nn.Module, example: ExampleCall) -> None:
    """``torch.export.save`` of ``program`` to ``path``, atomically; an :class:`~orthofx.ExportError` saying what
    to change where torch cannot record the model's input or output classes."""
    # written next to the path and moved into place once complete: a save that fails part-way (a class it cannot
    # name, a full disk) leaves neither a truncated file nor a damaged earlier one at the path
    directory, name = os.path.split(os.path.abspath(path))
    partial = os.path.join(directory, f".{name}.{os.getpid()}.partial.pt2")
    try:
        try:
            torch.export.save(program, partial)
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    except NotImplementedError as exc:
        if "serializ" not in str(exc):
            raise ExportError(f"cannot write {path!r}: {_root_cause(exc)}") from exc
        returned = _return_types_in(_checked_run(frozen, example))
        if returned:
            where, kind = returned[0]
            fields = getattr(kind, "__match_args__", ("values", "indices"))
            call = f"torch.{kind.__name__.replace('linalg_', 'linalg.')}(...)"
            raise ExportError(
                f"cannot write {path!r}: the model returns a torch.return_types.{kind.__name__} as {where} (what "
                f"{call} returns, a named tuple of {', '.join(fields)}), a class torch.export.save cannot record in "
                "a .pt2 file (torch registers it with pytree without a serialized name). Fix: return its fields "
                f"as a plain tuple, e.g. `out = {call}; return {', '.join('out.' + f for f in fields)}`; or "
                "export to .onnx, whose outputs are flat") from exc
        # a class in the inputs or outputs (a NamedTuple, a registered dataclass) that pytree knows without a name
        raise ExportError(
            f"cannot write {path!r}: torch.export.save records the structure of the model's inputs and outputs by "
            f"class name, and a class there has none ({_root_cause(exc)}). Fix: register it with a name, here and "
            "before torch.export.load: a NamedTuple with torch.utils._pytree._register_namedtuple(cls, "
            "serialized_type_name='package.Class'), a dataclass with torch.export.register_dataclass(cls, "
            "serialized_type_name='package.Class'); or return (take) plain tuples and dicts; or export to .onnx, "
            "whose inputs and outputs are flat") from exc
    except (OSError, RuntimeError) as exc:
        raise ExportError(f"cannot write {path!r}: {_root_cause(exc)}") from exc


#: The higher-order ops in which torch.export records a forward's ``torch.autocast`` and ``torch.no_grad()`` /
#: ``torch.enable_grad()`` blocks (and what each stands for in :func:`_inlined_regions_note`).
_REGION_OPS = {"wrap_with_autocast": "torch.autocast", "wrap_with_set_grad_enabled": "torch.no_grad/enable_grad"}


def _region_kinds(program: Any) -> collections.Counter:
    """How many nodes of ``program`` (its graph and the graphs of its submodules) call a region op
    (:data:`_REGION_OPS`), by the kind of block it stands for; empty for a program without regions."""
    ops = {getattr(torch.ops.higher_order, name, None): kind for name, kind in _REGION_OPS.items()}
    ops.pop(None, None)  # an op this torch does not have
    return collections.Counter(ops[node.target] for module in program.graph_module.modules()
                               if isinstance(module, fx.GraphModule) for node in module.graph.nodes
                               if node.op == "call_function" and node.target in ops)


def _read_back_inlined(program: Any, path: str, frozen: nn.Module, example: ExampleCall, exc: Exception
                       ) -> tuple[Any, nn.Module, tuple[collections.Counter, str]]:
    """``(program written, its module read back, (regions, cause))`` after torch.export.load failed with ``exc`` on
    the file of ``program`` (removed already): where ``program`` holds autocast / grad-mode regions
    (:func:`_region_kinds`), it is written once more with the regions inlined (``run_decompositions({})``) and read
    back; ``regions`` counts the region ops by block kind, ``cause`` is the first failure. Otherwise, or where the
    retry fails too, the :class:`~orthofx.ExportError` of a file torch.export.load cannot read back.

    torch.export (torch 2.13) writes a program whose regions are nested (``torch.no_grad()`` inside
    ``torch.autocast(..., enabled=False)``, ``torch.enable_grad()`` inside ``torch.no_grad()``) with a region op
    whose node has no ``val`` field (an empty region after the inner block), and torch.export.load rejects it
    ("SpecViolationError: Node.meta wrap_with_autocast is missing val field"); the inlined program holds the same
    ops with the dtypes they were traced with, and no region."""
    cause = _root_cause(exc)
    regions = _region_kinds(program)
    retried = ""
    if regions:
        try:
            inlined = program.run_decompositions({})
            _mutable_output_containers(inlined)
            _write_pt2(inlined, path, frozen, example)
            return inlined, torch.export.load(path).module(), (regions, cause)
        except Exception as again:  # noqa: BLE001 - as above; reported with the first failure
            if os.path.exists(path):
                os.remove(path)
            retried = (f"; written again with its {sum(regions.values())} torch.autocast / torch.no_grad regions "
                       f"inlined (ExportedProgram.run_decompositions({{}})): {_root_cause(again)}")
    strings = [(p, v) for p, v in _python_values(_checked_run(frozen, example)) if isinstance(v, (str, bytes))]
    hint = (f"; the model's {_describe_values(strings)}: torch.export writes a string output but cannot read "
            "it back, so return tensors and numbers only") if strings else ""
    raise ExportError(f"torch.export.load cannot read back the file written to {path!r} ({cause}{retried})"
                      f"{hint}; the file was removed") from exc


#: The ambient autocast :func:`_inlined_regions_note` runs the model and the inlined program under.
_AMBIENT_AUTOCAST_DTYPE = torch.bfloat16


def _inlined_regions_note(path: str, regions: collections.Counter, cause: str, diff: float, frozen: nn.Module,
                          loaded: nn.Module, example: ExampleCall) -> str:
    """The warning of an export whose file holds the program with its autocast / grad-mode regions inlined
    (:func:`_read_back_inlined`): why, and what differs from the model, since the inlined program no longer
    switches autocast or gradients itself: its outputs and ``frozen``'s under an ambient ``torch.autocast``
    (bfloat16, on the inputs' device type), measured, and gradients that pass where a ``no_grad`` block stops them
    in the model."""
    kinds = " and ".join(f"{count} {kind}" for kind, count in sorted(regions.items()))
    device = (example.device() or torch.device("cpu")).type
    ambient = f"torch.autocast({device!r}, dtype=torch.{str(_AMBIENT_AUTOCAST_DTYPE).split('.')[-1]})"
    try:
        with torch.autocast(device, dtype=_AMBIENT_AUTOCAST_DTYPE):
            expected, actual = _outputs(frozen, example), _outputs(loaded, example)
        autocast_diff = _max_diff(expected, actual)
        scale = max((float(e.detach().abs().max()) for e in expected if e.is_floating_point() and e.numel()),
                    default=0.0)
        if autocast_diff <= 1e-5 * max(1.0, scale):
            under = f"under an ambient {ambient} the two still agree (max |diff| {autocast_diff:.3g})"
        else:
            under = (f"under an ambient {ambient} they differ by up to {autocast_diff:.3g} (outputs up to "
                     f"{scale:.3g}): the program does not switch autocast off (or on) where the model's "
                     "torch.autocast blocks do, so their ops run in the ambient autocast's dtype")
    except Exception as exc:  # noqa: BLE001 - a model or an op without a kernel in that dtype: reported as such
        under = f"under an ambient {ambient} they could not be compared ({_root_cause(exc)})"
    return (f"{path}: torch.export.load cannot read back the program torch.export writes for this model, whose "
            f"forward nests torch.no_grad()/torch.autocast blocks (a torch bug; its program holds {kinds} region "
            f"op(s); {cause}), so the file holds that program with the regions inlined "
            "(ExportedProgram.run_decompositions({})): the same ops in the dtypes they were traced with, outputs "
            f"within {diff:.3g} of the model's (no ambient autocast). Measured on the example inputs: {under}; and "
            "gradients are not turned off (or on) where the model's torch.no_grad/enable_grad blocks do: use the "
            "program for inference, not to differentiate through. To keep the blocks, do not nest them in the "
            "forward (e.g. .detach() in place of an inner torch.no_grad()), or save the weights and policy (a .pt "
            "path, reloaded with orthofx.load)")


def _path(path: Any) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise ExportError(f"the path must be a str or os.PathLike (e.g. 'model.pt'), got {type(path).__name__}")
    return os.fspath(path)


def check_export_path(path: Any) -> tuple[str, str]:
    """``(path, suffix)`` of a path :func:`export` can write (known suffix, existing directory, not a directory
    itself); :class:`orthofx.ExportError` otherwise. The CLI checks ``--export`` with it before transforming."""
    path = _path(path)
    suffix = os.path.splitext(path)[1].lower()
    if os.path.isdir(path) and not suffix:  # a directory, not a file name without a suffix: say so
        raise ExportError(f"cannot write {path!r}: it is an existing directory; give a file path in it ending in "
                          f".onnx, .pt2 or .pt (e.g. {os.path.join(path, 'model.pt2')!r})")
    if suffix not in (".onnx", ".pt2", ".pt"):
        raise ExportError(f"unknown export format {suffix or '(no suffix)'!r} for {path!r}; use .onnx, .pt2 or .pt")
    _check_directory(path)
    return path, suffix


def _check_directory(path: str) -> None:
    if os.path.isdir(path):
        raise ExportError(f"cannot write {path!r}: it is an existing directory; give a file path "
                          f"(e.g. {os.path.join(path, 'model' + os.path.splitext(path)[1])!r})")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ExportError(f"cannot write {path!r}: the directory {directory!r} does not exist; create it first "
                          "(os.makedirs(directory, exist_ok=True)) or choose another path")


def batch_too_small_for_dynamic(inputs: tuple, model: nn.Module | None = None) -> int | None:
    """The index of the first input with a tensor (the input itself, or one nested in it) whose batch is 0 or 1, or
    ``None``. torch.export specialises sizes 0 and 1, so such a batch cannot be traced as a dynamic batch (``.pt2``
    fixes it, ``.onnx`` fails in the exporter). The batch is dimension 0; with ``model``, dimension 1 for the
    tensors :func:`export` reads so (:func:`orthofx.capture.recurrent_batch_dims`: a seq-first recurrent layer's
    input ``(L, N, H_in)`` of sequence length L = 1 has a batch N it can trace, and one with N = 1 has none; a
    model without recurrent layers is not run)."""
    dims = recurrent_batch_dims(model, inputs) if model is not None else {}
    for i, x in enumerate(inputs):
        if any(_batch_too_small(t, dims) for t in output_tensors(x)):
            return i
    return None


def _batch_too_small(x: Any, dims: Batches | None = None) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[batch_dim(x, dims or {})] < 2


def _check_batch(example: ExampleCall, dynamic_batch: bool, dims: Batches | None = None) -> None:
    """Refuse a dynamic batch that the example's tensors, positional, keyword or nested in either (the leaves
    :func:`orthofx.capture.batch_dynamic_shapes` marks), cannot give (see :func:`batch_too_small_for_dynamic`).
    The batch is dimension 0, or 1 for the tensors of ``dims`` (:func:`_batch_dims`: a seq-first recurrent layer's
    input ``(L, N, H_in)``, a hidden state ``(D * num_layers, N, H_out)``); such a tensor whose dimensions 0 and 1
    have equal sizes is refused, since they cannot tell which one the batch is.

    A tensor that broadcasts over the batch of the others (a mask of shape ``(1, ...)``) is refused too: torch.export
    would fix its dimension 0 at 1 in a ``.pt2`` program, and the ONNX exporter fails on it ("1 not in VR[2,
    int_oo]"); expanded to the batch, it is exported with the batch of the others."""
    if not dynamic_batch:
        return
    dims = dims or {}
    named = [(label, x) for label, x in example.named_inputs() if isinstance(x, torch.Tensor) and x.dim() > 0]
    for label, x in named:
        read = dims.get(id(x))
        if read is not None and read.dim is None:
            raise ExportError(
                f"{label} (shape {tuple(x.shape)}) is {read.text()}, whose batch N is dimension 1, and its dimensions "
                f"0 and 1 have the same size {x.shape[0]}: orthofx finds which dimension of an input the layer "
                "reads as the batch from their sizes, so it cannot tell here. Fix: pass example inputs whose "
                "batch size differs from the sequence length (and from the number of layers for a hidden state), "
                "or dynamic_batch=False to export the example's shape")
    for label, x in named:
        dim = batch_dim(x, dims)
        if x.shape[dim] >= 2:
            continue
        where, whose = (f" in dimension {dim}", f"; it is {dims[id(x)].text()}, whose batch N is dimension {dim}"
                        ) if dim else ("", "")
        batched = [(other, t.shape[batch_dim(t, dims)]) for other, t in named if t.shape[batch_dim(t, dims)] >= 2]
        broadcast = ""
        if batched and not dim:  # a broadcast mask: dimension 0
            other, size = batched[0]
            broadcast = (f"; if it broadcasts over the batch ({other} has batch {size}), expand it to that batch in "
                         f"the example (.expand({size}, ...)): the exported model then takes it with the batch of "
                         f"{other}")
        raise ExportError(f"{label} has batch size {x.shape[dim]}{where} (shape {tuple(x.shape)}{whose}), from "
                          "which torch.export cannot trace a dynamic batch dimension (it specialises sizes 0 and 1). "
                          f"Fix: pass example inputs with a batch of 2 or more{broadcast}; or pass dynamic_batch=False "
                          "to export every input with the example's fixed shape")


@one_trace_at_a_time
def export(model: nn.Module, path: str | os.PathLike, example_inputs: Any = None, *, example_kwargs: Any = None,
           dynamic_batch: bool = True, opset: int = 20, newton_schulz_iterations: int | None = None) -> ExportResult:
    """Write a transformed model to ``path``; the suffix chooses the format (``.onnx``, ``.pt2``, ``.pt``).

    ``.onnx`` and ``.pt2`` export the :func:`freeze`-d model (batch dimension dynamic unless
    ``dynamic_batch=False``, which a batch of one in ``example_inputs`` needs), reload it and compare with the
    frozen model on ``example_inputs``; an ONNX difference above 1e-4 raises :class:`orthofx.ExportError` (or
    above 8 rounding steps of the outputs' dtype at their scale where that is more: float16 outputs, and float32
    outputs above ~100; see :func:`onnx_tolerance`).
    ``.pt`` stores the state_dict and the policy (no pickled code; :func:`load` restores it). A model transformed
    from a frozen or transformed one (``transform`` allows it when the first carries no penalty or hook) is refused
    with an :class:`orthofx.ExportError`: the file would hold the second policy only, which :func:`load` replays on
    the original model (:func:`_check_replayable`); transform the original once with both policies' rules, or,
    where the second transform replaced a layer inside one the first put in place (an orthogonal conv inside a
    ConvNorm layer, which no single policy builds), save the model with ``torch.save(gm, path)`` or export it to
    ``.pt2`` / ``.onnx``.

    ``example_kwargs`` (a dict by name): the keyword inputs of the example call
    ``model(*example_inputs, **example_kwargs)``, for a forward such as ``forward(self, x, *, mask=None)``. The
    exported model takes them by name: the ``.pt2`` program as ``program.module()(x, mask=m)``, the ``.onnx``
    graph as inputs named after the keywords (``session.run(None, {"x": ..., "mask": ...})``). Their dimension 0
    is dynamic too (torch.export and the ONNX exporter both allow it) and the check on a larger batch grows them
    with the positional inputs. Parameters the example leaves out keep their default in the exported graph, which
    has no input for them. ``.pt`` needs no example inputs.

    ``opset`` (``.onnx`` only): the ONNX opset version written; default 20; 18 up to the newest the installed
    onnx supports (``onnx.defs.onnx_opset_version()``), another an :class:`orthofx.ExportError`.

    ``.onnx`` only: matrix square roots / inverse square roots computed through eigh or svd are exported as
    Newton-Schulz iterations; ``newton_schulz_iterations`` fixes their number (default: chosen on the example
    inputs), and the check against the exact frozen model covers the approximation (module docstring).

    Example::

        import orthofx
        x = orthofx.models.example_input("gcp_cnn")
        gm = orthofx.transform(orthofx.models.get("gcp_cnn"), "svd", example_inputs=(x,))
        result = orthofx.export(gm, "gcp.onnx", example_inputs=(x,))
        print(result)   # onnx -> gcp.onnx (max |diff| 3e-07, ...); Newton-Schulz at cov_pool:linalg.eigh (10 ...)

        import torch                            # a forward with a keyword input: pass it in example_kwargs
        class Masked(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(6, 6)

            def forward(self, x, *, mask=None):
                return self.fc(x) * mask

        x, mask = torch.randn(4, 6), torch.ones(4, 6)
        gm = orthofx.transform(Masked(), "orthogonal", example_inputs=(x,), example_kwargs={"mask": mask})
        orthofx.export(gm, "masked.pt2", example_inputs=(x,), example_kwargs={"mask": mask})
        program = torch.export.load("masked.pt2").module()
        x3, mask3 = torch.randn(3, 6), torch.ones(3, 6)   # another batch size: the batch is dynamic
        torch.testing.assert_close(program(x3, mask=mask3), orthofx.freeze(gm)(x3, mask=mask3))
    """
    started = time.perf_counter()
    # a flag, not a truthy value: dynamic_batch="no" would export a dynamic batch
    if not isinstance(dynamic_batch, bool):
        raise ExportError(f"dynamic_batch must be True or False, got {dynamic_batch!r}; dynamic_batch=False exports "
                          "the example's batch size")
    path, suffix = check_export_path(path)
    if suffix == ".pt":
        if not is_transformed(model) and transformed_parts(model):
            raise _pt_of_parts_error(model, path)
        if not is_transformed(model):
            raise _pt_of_untransformed_error(model, path)
        manifest = manifest_of(model)
        if manifest.frozen:
            raise ExportError(f"cannot write the frozen model to {path!r}: a .pt file holds the weights and the "
                              "policy, which orthofx.load replays on the original model, and a frozen model's "
                              "plain layers do not come back that way. Export the transformed model before "
                              "freezing (orthofx.export(gm, 'model.pt'), then orthofx.freeze(orthofx.load(model, "
                              "'model.pt'), example_inputs=(x,))), or export the frozen model to .pt2 or .onnx")
        _check_replayable(unwrap_model(model), manifest, path)
        source = unwrap_model(model).state_dict()
        state = collections.OrderedDict((k, v.detach().cpu()) for k, v in source.items())
        # the metadata as Module.state_dict gives it (torch.load(weights_only=True) reads it back): the modules'
        # versions, and each Jacobian probe's step in its every period, which load_state_dict restores
        # (copied: the graph's record is the file's, not the model's own metadata)
        state._metadata = collections.OrderedDict(
            (key, dict(value)) for key, value in getattr(source, "_metadata", collections.OrderedDict()).items())
        state._metadata.setdefault("", {})[GRAPH_METADATA_KEY] = _graph_signature(unwrap_model(model))
        content = {"orthofx_format": FORMAT_VERSION, "policy": manifest.policy.to_yaml(), "state_dict": state}
        sizes = _cayley_input_sizes(unwrap_model(model))
        if sizes:  # the files of models without such layers stay as they were
            content[CAYLEY_SIZES_KEY] = sizes
        try:
            torch.save(content, path)
        except (OSError, RuntimeError) as exc:
            raise ExportError(f"cannot write {path!r}: {_root_cause(exc)}") from exc
        return ExportResult(path, "pt", None, time.perf_counter() - started)
    example = example_call(example_inputs, example_kwargs)
    if example is None:
        raise ExportError("export needs example_inputs=(x,) (and example_kwargs={'mask': m} for a forward taking "
                          "keyword inputs) to trace and to check the exported model")
    if suffix == ".onnx":
        _check_opset(opset)
        _check_onnx_layers(model)
    infinite = _check_finite_inputs(example)
    frozen = freeze(model, example.args, example_kwargs=example.kwargs)
    _check_finite_outputs(frozen, example, infinite)
    # found on the frozen copy: a run of the model itself could move its probes' step counters
    dims = _batch_dims(frozen, example, dynamic_batch)
    _check_batch(example, dynamic_batch, dims)
    call = _export_call(frozen, example)
    if suffix == ".onnx":
        expected = _onnx_expected_outputs(frozen, call)  # one run of the frozen model for every comparison below
        form, newton_schulz = _onnx_form(frozen, call, newton_schulz_iterations, expected)
        diff, (worst, tolerance) = _export_onnx(form, path, call, dynamic_batch, opset, frozen, expected, dims)
        if worst > tolerance:
            hint = ""
            if newton_schulz is not None:
                hint = (f". {newton_schulz}: the iteration has not converged, or the matrices are too "
                        "ill-conditioned for float32 to reproduce the exact decomposition; pass a larger "
                        "newton_schulz_iterations, improve the conditioning (P4: pre_svd, a larger eps), or export "
                        "to .pt2 (exact)")
            raise ExportError(f"onnxruntime's output differs from the frozen model by {worst:.3g} (> "
                              f"{tolerance:.3g}){hint}; the file {path} was written but should not be trusted")
        return ExportResult(path, "onnx", diff, time.perf_counter() - started, newton_schulz)
    diff = _export_pt2(frozen, path, call, dynamic_batch, dims)
    return ExportResult(path, "pt2", diff, time.perf_counter() - started)


def _pt_of_parts_error(model: nn.Module, path: str) -> ExportError:
    """Why :func:`export` refuses a ``.pt`` file of a model holding transformed parts, and what to do instead.

    The file holds the weights and one policy, which :func:`load` replays on the model it is given with
    ``transform(model, policy)``: it has no way to replay a part's policy on a submodule of a bigger model (nor
    the parts' own example inputs, which a part captured with torch.export needs)."""
    name = type(unwrap_model(model)).__name__
    paths = [p for p, _ in transformed_parts(model)]
    first = paths[0]
    return ExportError(
        f"cannot write {name} to {path!r}: a .pt file holds one transformed model's weights and the policy "
        f"orthofx.load replays on it, and {name} was not returned by orthofx.transform: it holds the transformed "
        f"part(s) {', '.join(repr(p) for p in paths)}, whose policies orthofx.load cannot replay inside it. Either "
        f"export a part on its own (orthofx.export(model.get_submodule({first!r}), 'part.pt'), restored with "
        "orthofx.load(<the part's original model>, 'part.pt')), or save the whole model's weights with "
        "torch.save(model.state_dict(), path) and restore them with model.load_state_dict(torch.load(path)) into a "
        "model built the same way (its parts transformed by the same policies); .pt2 and .onnx export the whole "
        "model frozen")


def _pt_of_untransformed_error(model: nn.Module, path: str) -> ExportError:
    """Why :func:`export` refuses a ``.pt`` file of a model :func:`orthofx.transform` did not return, and what
    works instead. Exporting it frozen to ``.pt2`` / ``.onnx`` is offered only where :func:`freeze` has orthofx
    layers to bake (:func:`_modules_to_freeze`): of a plain torch model it says "nothing to freeze", and
    torch.export / torch.onnx.export take the model as it is."""
    root = unwrap_model(model)
    name = type(root).__name__
    start = (f"cannot write {name} to {path!r}: a .pt file holds the weights and the policy orthofx.load replays, "
             "and this model was not returned by orthofx.transform. Save its weights with "
             "torch.save(model.state_dict(), path)")
    if _modules_to_freeze(root):
        return ExportError(f"{start}, or export it to .pt2 or .onnx (frozen)")
    if is_orthofx_module(root) and callable(getattr(root, "to_plain", None)):
        return ExportError(f"{start}, or export it to .pt2 or .onnx (frozen) inside a model "
                           "(orthofx.export(nn.Sequential(layer), 'layer.pt2', example_inputs=(x,)))")
    return ExportError(f"{start}. It holds no orthofx layer, so there is nothing to freeze: torch.export / "
                       "torch.onnx.export take it as it is (orthofx.export to .pt2 / .onnx takes it only where its "
                       "forward calls orthofx.nn.eigh_stable / svd_stable)")


def _not_from_this_transform(root: nn.Module, manifest: Manifest) -> tuple[str, str] | None:
    """``(path, what it is)`` of the first part of ``root`` that the transform recorded in ``manifest`` did not make
    from the original model, or ``None``: a plain layer :func:`freeze` baked from an orthofx layer
    (:data:`BAKED_ATTRIBUTE`), a decomposition ``freeze`` stored as a buffer (:data:`FOLDED_PREFIX`), or a module
    an orthofx pass put at a site (``replace_module`` records the site in it) that none of this manifest's changes
    names and that holds state: such a model was transformed from a frozen or transformed one. A user's own orthofx
    layers carry no site, so a model written with them passes; so do a frozen Jacobian probe's block and a monitor's
    stateless pass-through, which the original model computes the same way."""
    for path, what in _earlier_layers(root, manifest):
        return path, what
    for name, _ in root.named_buffers():
        if name.rpartition(".")[2].startswith(FOLDED_PREFIX):
            return name, "a decomposition result that orthofx.freeze computed once and stored"
    return None


def _earlier_layers(root: nn.Module, manifest: Manifest) -> Iterator[tuple[str, str]]:
    """``(path, what it is)`` of each module of ``root`` that an earlier ``orthofx.transform`` or ``orthofx.freeze``
    made, not the transform recorded in ``manifest`` (:func:`_not_from_this_transform` says which), in
    ``named_modules`` order, a module under two paths once per path."""
    own = {change.site for change in manifest.changes}
    for path, module in root.named_modules(remove_duplicate=False):
        baked = module.__dict__.get(BAKED_ATTRIBUTE)
        if baked is not None:
            yield path, f"a plain {type(module).__name__} that orthofx.freeze baked from the orthofx layer {baked}"
            continue
        placed = module.__dict__.get(SITE_ATTRIBUTE)
        if placed is not None and placed not in own and path not in own and _holds_state(module):
            yield path, f"the orthofx layer {type(module).__name__} that an earlier orthofx.transform put there"


def _check_replayable(root: nn.Module, manifest: Manifest, path: str) -> None:
    """Refuse a ``.pt`` file that :func:`load` could not restore: one of a model transformed from a frozen or
    transformed model (:func:`_not_from_this_transform`). The file holds this transform's policy only, and ``load``
    replays it on the original model, where the first policy's layers are the original ones again: their saved
    weights do not fit (an orthogonal layer's parameters against a conv's ``weight``), or, worse, fit a layer that
    computes something else (a frozen orthogonal conv's circular padding against the original zero padding).

    The advice depends on the model: one policy holding both transforms' rules rebuilds most such models, but not
    one whose second transform replaced a layer inside a layer of the first (:func:`_replaced_inside`: an
    ``OrthogonalConv2d`` inside a ConvNorm layer), since a layer takes one replacement in a transform."""
    found = _not_from_this_transform(root, manifest)
    if found is None:
        return
    where, what = found
    start = (f"cannot write {path!r}: the model's {where!r} is {what}, so it was transformed from a frozen or "
             "transformed model. A .pt file holds the weights and the last transform's policy only, which "
             "orthofx.load replays on the original model, where that part is as the original model has it, so the "
             "file could not restore this model")
    inside = _replaced_inside(root, manifest)
    if not inside:
        raise ExportError(f"{start}. Transform the original model once with a policy holding the rules of both "
                          "(Policy.from_dict({'rules': [*first.to_dict()['rules'], *second.to_dict()['rules']]})) "
                          "and export that to .pt, or export this model to .pt2 or .onnx (frozen; "
                          "orthofx.export(gm, 'model.pt2', example_inputs=(x,)))")
    site, layer, outer = inside[0]
    raise ExportError(f"{start}. Nor can one policy rebuild it: the second transform replaced {site!r} inside "
                      f"{outer!r} (by {layer}), and in one transform a layer takes one replacement, so the rules of "
                      "both in one policy give another model (one of the two layers there, not one inside the other). "
                      "Save this model with torch.save(gm, path) (the whole GraphModule, read back with "
                      "torch.load(path, weights_only=False) where orthofx is importable, with its outputs, penalty "
                      "and report), or export it "
                      "to .pt2 or .onnx for inference (frozen; orthofx.export(gm, 'model.pt2', example_inputs=(x,)))")


def _replaced_inside(root: nn.Module, manifest: Manifest) -> list[tuple[str, str, str]]:
    """``(site, class name, enclosing path)`` of the layers this transform (``manifest``) put at sites inside a
    module an earlier transform or freeze made (any of them, :func:`_earlier_layers`, not only the first one
    :func:`_not_from_this_transform` names: a model whose first ConvNorm layer kept its conv may hold an orthogonal
    conv in its second): the modules there that an orthofx pass placed at that very site (``replace_module``
    records it in them)."""
    earlier = list(dict.fromkeys(path for path, _ in _earlier_layers(root, manifest)))
    placed = []
    for site in dict.fromkeys(change.site for change in manifest.changes):
        outer = next((path for path in earlier if site.startswith(path + ".")), None)
        if outer is None:
            continue
        try:
            module = root.get_submodule(site)
        except AttributeError:
            continue
        if module.__dict__.get(SITE_ATTRIBUTE) == site:
            placed.append((site, type(module).__name__, outer))
    return placed


def _check_untransformed(root: nn.Module, path: str) -> None:
    """Refuse a model returned by :func:`orthofx.transform` or :func:`freeze` as the target of :func:`load`: the
    file's policy is replayed on the original model, and a second transform of a transformed one either finds no
    layer its rules match (they were replaced) or drops the first policy's penalty terms."""
    if not is_transformed(root):
        return
    what = "frozen by orthofx.freeze" if manifest_of(root).frozen else "returned by orthofx.transform"
    raise ExportError(f"cannot load {path!r} into a model {what}: orthofx.load replays the file's policy on the "
                      "original (untransformed) model and restores the weights; pass a fresh instance of the model "
                      "the file was exported from (e.g. orthofx.load(MyModel(), path)). The model was not changed")


def _other_format_hint(path: str) -> str:
    """Where a file :func:`export` writes in another format than ``.pt`` is read, by its suffix."""
    readers = {".pt2": "torch.export.load(path).module()",
               ".onnx": "onnxruntime.InferenceSession(path)"}
    reader = readers.get(os.path.splitext(path)[1].lower())
    return f" (a {os.path.splitext(path)[1]} file is read with {reader}, not orthofx.load)" if reader else ""


@one_trace_at_a_time
@_global_rng_kept
@_outside_inference_mode_call
def load(model: nn.Module, path: str | os.PathLike, example_inputs: Any = None, *,
         example_kwargs: Any = None, check_graph: bool = True) -> fx.GraphModule:
    """Replay the policy stored in a ``.pt`` file (written by :func:`export`) on ``model`` and restore the weights.

    The file is read with ``torch.load(weights_only=True)``: it holds tensors and the policy's YAML, no code.
    ``model`` is the original (untransformed) model; it is not modified. A model that computes otherwise than the
    saved one (another activation module, the same layers wired otherwise: the file records the transformed graph of a
    symbolically traced model) or that holds meta tensors is refused with an :class:`~orthofx.ExportError`, as are
    weights that do not fit it and a file of a newer format (a graph recorded by another orthofx or torch release only
    warns, :class:`~orthofx.OrthofxWarning`: the passes' graph edits and torch's tracer may differ there). The
    restored model has the saved parameters' dtype (a model saved after ``.double()`` comes back in float64 from a
    float32 ``model``) and the Jacobian probes' step within their ``every`` period, so it continues as the saved model
    would. Example inputs in the saved dtype work too: float64 ones replay the policy on a float64 copy of ``model``;
    half-precision ones are cast to ``model``'s dtype for the replay (a decomposition the policy replaces may have no
    half-precision kernel), and the result is converted. A model that torch.export captured in another dtype than
    ``model``'s (the file records it) is replayed on a copy converted to that dtype, whatever the example inputs'
    dtype (cast to it): such a graph holds its dtype.

    ``check_graph=False`` skips the comparison with the recorded graph, for a forward rewritten to compute the
    same thing in other operations (``x.relu()`` for ``F.relu(x)``); the weights are still checked.

    ``example_inputs`` and ``example_kwargs`` (a dict by name) are passed to :func:`orthofx.transform` as they
    were when the model was transformed: a model captured with torch.export (capture mode ``export``, or ``auto``
    when symbolic tracing fails) needs them, keyword inputs included for a forward such as
    ``forward(self, x, *, mask)``. So do ``method: cayley_fft`` convs, built for the spatial size of the example
    inputs: the file records each one's size, and inputs of another size are refused with an
    :class:`~orthofx.ExportError` (the saved ``cayley_kernel`` parameters would fit a layer of that size and
    compute another operator).

    Example::

        import torch, orthofx
        x = orthofx.models.example_input("small_cnn")
        gm = orthofx.transform(orthofx.models.get("small_cnn"), "orthogonal", example_inputs=(x,))
        orthofx.export(gm, "small_cnn.pt")                       # tensors + the policy's YAML, no pickled code
        restored = orthofx.load(orthofx.models.get("small_cnn"), "small_cnn.pt")   # any fresh copy of the model
        torch.testing.assert_close(restored(x), gm(x))
    """
    if not isinstance(check_graph, bool):
        raise ArgumentError(f"orthofx.load: check_graph must be True or False, got {check_graph!r}")
    path = _path(path)
    if os.path.isdir(path):
        raise ExportError(f"cannot read {path!r}: it is a directory; give the .pt file orthofx.export wrote")
    if not os.path.isfile(path):
        raise ExportError(f"cannot read {path!r}: no such file")
    # checked here so that their errors are not reported as the stored policy not fitting the model
    _check_untransformed(unwrap_model(model), path)
    _check_materialized(unwrap_model(model), path)
    example = example_call(example_inputs, example_kwargs)  # transform runs the model on copies of them
    written_by = "write it with orthofx.export(gm, 'model.pt') (a file of state_dict and policy, no pickled code)"
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ExportError(f"cannot read {path!r} as an orthofx .pt file: torch.load(weights_only=True) failed "
                          f"({_root_cause(exc)[:160]}), so the file is truncated, corrupt or of another format"
                          f"{_other_format_hint(path)}; {written_by}") from exc
    version = saved.get("orthofx_format") if isinstance(saved, dict) else None
    if type(version) is int and version > FORMAT_VERSION:  # noqa: E721 (a bool or 1.0 is no format number)
        raise ExportError(f"{path!r} was written by a newer orthofx (.pt format {version}; this orthofx reads format "
                          f"{FORMAT_VERSION}): upgrade orthofx where the file is loaded (pip install -U orthofx), or "
                          "re-export the model with this version. The model was not changed")
    if type(version) is not int or version != FORMAT_VERSION:  # noqa: E721
        raise ExportError(f"{path!r} is not an orthofx .pt file (format {FORMAT_VERSION}); {written_by}")
    lacking = [key for key, kind in (("policy", str), ("state_dict", dict)) if not isinstance(saved.get(key), kind)]
    if lacking:
        raise ExportError(f"{path!r} is not a complete orthofx .pt file: {' and '.join(repr(k) for k in lacking)} "
                          f"missing or of the wrong type; {written_by}")
    try:
        policy = Policy.from_yaml(saved["policy"])
    except OrthofxError as exc:
        raise ExportError(f"the policy stored in {path!r} is not a valid orthofx policy ({exc}): the file is damaged "
                          f"or was not written by orthofx.export; {written_by}") from exc
    if policy.capture.mode == "export" and example is None:
        # not "the policy does not apply to this model": the model is right, the example call is missing
        raise ExportError(f"the policy stored in {path!r} captures the model with torch.export (capture: "
                          "{mode: export}), which runs the model on example inputs, and none were given: pass "
                          "the example inputs orthofx.transform was given, orthofx.load(model, path, "
                          "example_inputs=(x,)) (and example_kwargs={...} for keyword inputs)")
    state = saved["state_dict"]
    _check_state_entries(state, path, written_by)
    phases = _saved_probe_phases(saved, path, written_by)
    sizes = _saved_cayley_input_sizes(saved, path, written_by)
    saved_dtype = _saved_dtype_of_inputs(model, state, example)
    captured = _captured_dtype(model, state)
    if captured is not None:
        # a torch.export graph holds the dtype it was captured in (constants, dtype checks, branches on x.dtype):
        # replayed in the model's dtype and converted, the restored model failed on the saved model's inputs
        converted = copy_model(unwrap_model(model)).to(captured)
        example_inputs, example_kwargs = _in_model_dtype(converted, example_inputs, example_kwargs)
    else:
        converted = _in_saved_dtype(model, saved_dtype)  # float64 example inputs: a float64 copy
        if saved_dtype in HALF_PRECISION:
            example_inputs, example_kwargs = _in_model_dtype(model, example_inputs, example_kwargs)
    try:
        if converted is None:
            gm = transform(model, policy, example_inputs=example_inputs, example_kwargs=example_kwargs)
        else:  # load's own copy: rewritten without a second copy of the weights
            gm = transform_private_copy(converted, policy, example_inputs=example_inputs,
                                        example_kwargs=example_kwargs)
    except OrthofxError as exc:
        hint = ""
        if isinstance(exc, CaptureError):  # capture with torch.export runs the model on the example call
            hint = (" A model that symbolic tracing cannot capture is captured with torch.export on the example "
                    "call: pass the example inputs orthofx.transform was given here too (example_inputs=(x,), and "
                    "example_kwargs={...} for keyword inputs).")
        elif example_inputs is None and example_kwargs is None:
            # a pass that needs the example inputs (cayley_fft's input size) says "pass example_inputs to
            # orthofx.transform", which load calls: the inputs go to load
            hint = (" If orthofx.transform was given example inputs, pass them here too: orthofx.load(model, "
                    "path, example_inputs=(x,)) replays the policy with them.")
        fixed = _fixed_shift_sites(model, state) if _FIXED_SHIFT in str(exc) else []
        if fixed:  # the right model: the file is older than the refusal of these layers
            raise ExportError(f"the policy stored in {path!r} now refuses layers of this model ({exc}). "
                              f"{_fixed_shift_recovery(path, fixed, refused=True)}") from exc
        raise ExportError(f"the policy stored in {path!r} does not apply to this model ({exc}); load with the "
                          f"original (untransformed) model the file was exported from.{hint}") from exc
    _check_cayley_input_sizes(gm, sizes, path)
    _check_saved_dtype_kinds(gm, state, path)
    _match_saved_dtype(gm, state)
    try:
        missing, unexpected = gm.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that do not fit
        mismatched = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        raise ExportError(f"the saved weights in {path!r} do not fit the model: "
                          f"{'; '.join(mismatched[:3]) or exc}; load with the model the file was exported "
                          "from") from exc
    except LayerArgumentError as exc:  # a damaged entry of the state dict's metadata (a probe's step)
        raise ExportError(f"{path!r} is damaged: {exc}; or re-export the model with orthofx.export(gm, "
                          "'model.pt')") from exc
    if missing or unexpected:
        fixed = _fixed_shift_sites(model, state)
        if fixed:  # the right model: "load with the model the file was exported from" would mislead
            raise ExportError(f"the saved weights in {path!r} do not fit the model: missing {list(missing)[:5]}, "
                              f"unexpected {list(unexpected)[:5]}. {_fixed_shift_recovery(path, fixed)}")
        raise ExportError(f"the saved weights in {path!r} do not fit the model: missing {list(missing)[:5]}, "
                          f"unexpected {list(unexpected)[:5]}; load with the model the file was exported from"
                          f"{_frozen_layers_hint(model, missing, unexpected)}")
    _restore_probe_phases(gm, phases, path)
    if check_graph:
        _check_same_graph(gm, state, path)
    return gm


def _fixed_shift_sites(model: nn.Module, state: dict) -> list[tuple[str, nn.Module]]:
    """``(name, conv)`` of each conv of ``model`` whose orthogonal versions are fixed signed shifts that cannot train
    (``orthogonal_conv._fixed_shift_problem``: one input and one output channel per group, taps reading one input
    per stride window, e.g. a stride-1 depthwise conv) and for which the saved ``state`` holds an orthogonal layer's
    parameters (``matrix``) instead of a ``weight``. An orthofx before that refusal replaced such a conv by a hard
    layer; the policy replayed now leaves it a conv (L_orth) or refuses it, so the file no longer loads."""
    found = []
    for name, module in unwrap_model(model).named_modules():
        if not name or not isinstance(module, nn.modules.conv._ConvNd) or f"{name}.weight" in state:
            continue
        # a transposed hard layer holds its conv's parameters under ``conv.`` (``name.conv.matrix``)
        holds_matrix = any(key in state for key in (f"{name}.matrix", f"{name}.conv.matrix"))
        if holds_matrix and _fixed_shift_problem(module) is not None:
            found.append((name, module))
    return found


def _fixed_shift_recovery(path: str, sites: list[tuple[str, nn.Module]], refused: bool = False) -> str:
    """Why a file :func:`_fixed_shift_sites` finds layers in does not load into the model it was exported from, and
    how to recover its weights: the hard layer rebuilt from its saved parameters gives its (fixed-shift) kernel,
    which becomes the plain conv's ``weight`` in the model the policy now makes."""
    names = [name for name, _ in sites]
    described = first_few([f"{name!r} ({type(conv).__name__}, in={conv.in_channels}, out={conv.out_channels}, "
                           f"groups={conv.groups})" for name, conv in sites], 3)
    builders = ", ".join(f"({name!r}, orthofx.nn.Orthogonal{type(conv).__name__}."
                         f"{'from_conv_transpose' if conv.transposed else 'from_conv'})" for name, conv in sites)
    now = ("refuses them (on_impossible: error)" if refused else
           "leaves them plain convs (L_orth, or skipped, as its on_impossible says)")
    policy = ("orthofx.Policy.from_yaml(saved['policy']) changed to leave them to L_orth ('on_impossible: "
              "regularize' in the rule's 'with:') or out of its match" if refused
              else "orthofx.Policy.from_yaml(saved['policy'])")
    recipe = ("saved = torch.load(PATH, weights_only=True); state = saved['state_dict']; for site, build in "
              "[BUILDERS]: hard = build(model.get_submodule(site), init='random'); hard.load_state_dict("
              "{k[len(site) + 1:]: state.pop(k) for k in [k for k in state if k.startswith(site + '.')]}); "
              "state.update({f'{site}.{n}': getattr(hard, n).detach() for n in ('weight', 'bias') "
              "if getattr(hard, n) is not None}). Then gm = orthofx.transform(model, POLICY) (with the example "
              "inputs it was given) and gm.load_state_dict(state)")
    recipe = recipe.replace("PATH", repr(path)).replace("BUILDERS", builders).replace("POLICY", policy)
    return (f"This is the model the file was exported from, but the file holds an exactly orthogonal layer's "
            f"parameters (matrix) at {described}: an earlier orthofx wrote it, which replaced such "
            "layers by hard ones. Their orthogonal versions are fixed signed shifts of each channel that cannot "
            "train (one input and one output channel per group and taps that read only one input per stride "
            f"window, e.g. a stride-1 depthwise conv), so the policy now {now}. To recover the weights (each hard "
            f"layer's fixed shift as the conv's kernel, which then trains): {recipe}. The convs keep their own "
            "padding (the hard layers wrapped around circularly, so outputs differ at the borders). Layers: "
            f"{first_few([repr(n) for n in names], 8)}")


def _frozen_layers_hint(model: nn.Module, missing: list[str], unexpected: list[str]) -> str:
    """Where the replay and the file hold other entries for the same layers (an orthofx layer in one, the plain
    layer in the other), the likely cause: a layer frozen (``requires_grad=False``) in one model and not in the
    other, as the passes that replace layers leave a frozen one as it is."""
    def layers(keys: list[str]) -> set[str]:
        return {key.rpartition(".")[0] for key in keys}
    # a plain layer's weight on one side only: the other side's entries are the orthofx layer's (raw_weight ...)
    both = sorted(name for name in layers(missing) & layers(unexpected)
                  if (f"{name}.weight" in missing) != (f"{name}.weight" in unexpected))
    root = unwrap_model(model)

    def frozen_here(name: str) -> bool:  # the passes skip a layer whose weight is frozen
        try:
            weight = getattr(root.get_submodule(name), "weight", None)
        except AttributeError:
            return False
        return isinstance(weight, torch.Tensor) and not weight.requires_grad
    # plain here and frozen here: the pass left it; plain in the file and replaced here: the saved one was frozen.
    # A layer plain here though trainable was declined for another cause (another configuration), not freezing
    frozen = [name for name in both if f"{name}.weight" in missing and frozen_here(name)]
    plain_in_file = [name for name in both if f"{name}.weight" in unexpected]
    if not frozen and not plain_in_file:
        return ""
    both = frozen or plain_in_file
    state = (f"frozen here (requires_grad=False: {first_few([repr(n) for n in frozen], 3)})" if frozen else
             "trainable here, so the saved model's was likely frozen (requires_grad=False)")
    return (f". The file and this model hold other entries for the layers {first_few([repr(n) for n in both], 3)}, "
            f"{state}: orthogonal_conv and pre_svd (weight: orthogonal) replace a layer but leave a frozen one as it "
            "is (frozen: skip), so freeze the same layers before orthofx.load as before orthofx.transform")


def _check_materialized(root: nn.Module, path: str) -> None:
    """Refuse a model whose tensors are on the meta device (built under ``torch.device("meta")``). ``load``
    restores the weights by copying them into the tensors of ``transform(model, policy)``, and a copy into a meta
    tensor does nothing: a policy that keeps the layers (``lorth``) returned a model with no weights at all, one
    whose torch warnings were the only sign."""
    if not isinstance(root, nn.Module):
        return  # transform says what the model should be
    meta = meta_tensors(root)
    if meta:
        raise ExportError(f"cannot load {path!r} into a model whose tensors are on the meta device (shapes without "
                          f"values: {first_few(meta, 3)}): orthofx.load copies the saved weights into the model's "
                          "tensors, which a meta tensor cannot hold, so the result would have no weights. Build the "
                          "model on a real device (outside torch.device('meta')), or materialize it first with "
                          "model.to_empty(device='cpu') (the file restores every saved parameter and buffer; set the "
                          "non-persistent buffers yourself). The model was not changed")


def _node_row(gm: fx.GraphModule, node: fx.Node) -> str:
    """One node of a graph as :func:`_graph_signature` records it: its name, what it calls (a module call with the
    module's class, so that ``nn.ReLU`` and ``nn.Tanh`` at the same path differ) and the nodes it reads, in order.
    Constants are left out: their reprs may hold object addresses, which differ from one process to the next."""
    target = node.target
    if node.op == "call_module":
        try:
            module = gm.get_submodule(target)
        except AttributeError:
            pass
        else:
            # a lazy layer becomes its cls_to_become when it first runs: a model saved after training and its
            # replay without example inputs hold the same layer
            lazy = isinstance(module, nn.modules.lazy.LazyModuleMixin)
            cls = getattr(module, "cls_to_become", None) if lazy else None
            target = f"{target}: {(cls or type(module)).__name__}"
    elif not isinstance(target, str):
        target = getattr(target, "__name__", None) or type(target).__name__
    return f"{node.name} = {node.op} {target}({', '.join(n.name for n in node.all_input_nodes)})"


def _graph_signature(gm: fx.GraphModule) -> dict:
    """What the transformed model computes, in plain types that ``torch.load(weights_only=True)`` reads: the capture
    mode and, for a symbolic trace, each graph's nodes (:func:`_node_row`; the training-mode graph first where the
    model has one per mode). A torch.export graph is recorded by its mode and the floating dtypes of the inputs it
    was captured with (``input_dtypes``, which :func:`load` replays it in): its ATen operators depend on the torch
    release, and a file must load on another one."""
    mode = manifest_of(gm).capture.mode
    graphs = []
    if mode == "fx":
        modes = (True, False) if isinstance(gm, ModalGraphModule) else (None,)
        graphs = [[_node_row(gm, node) for node in (gm.graph if training is None else gm.graph_for(training)).nodes]
                  for training in modes]
    record = {"capture": mode, "graphs": graphs, "written_by": _release()}
    if mode == "export":
        record["input_dtypes"] = sorted({str(dtype) for dtype in _captured_input_dtypes(gm)})
    return record


def _captured_input_dtypes(gm: fx.GraphModule) -> set[torch.dtype]:
    """The floating dtypes of the example inputs a torch.export capture of ``gm`` ran on (its placeholders'
    recorded values). Such a graph holds the dtypes it was captured in (a ``torch.eye(n, dtype=x.dtype)``, a branch
    on ``x.dtype``), so :func:`load` replays it in the same dtype."""
    values = (node.meta.get("val") for node in gm.graph.nodes if node.op == "placeholder")
    return {v.dtype for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()}


def _recorded_input_dtypes(state: dict) -> set[str] | None:
    """The ``input_dtypes`` of the file's graph record (:func:`_graph_signature`); ``None`` where there is none (an
    fx capture, a file from before the record), an empty set for an export capture without floating inputs."""
    saved = getattr(state, "_metadata", {}).get("", {})
    saved = saved.get(GRAPH_METADATA_KEY) if isinstance(saved, dict) else None
    dtypes = saved.get("input_dtypes") if isinstance(saved, dict) else None
    return {d for d in dtypes if isinstance(d, str)} if isinstance(dtypes, (list, tuple)) else None


def _release() -> str:
    """The releases that decide a transformed graph's nodes: orthofx's passes insert some of them and torch's
    tracer names them (torch's major.minor: patch releases and build tags such as ``+cpu`` do not change a graph)."""
    from . import __version__

    torch_release = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    return f"orthofx {__version__}, torch {torch_release}"


def _check_same_graph(gm: fx.GraphModule, state: dict, path: str) -> None:
    """Refuse a restored model whose graph differs from the one the file records (:data:`GRAPH_METADATA_KEY`; warn
    where another release wrote the record):
    the weights fit (checked before), but the model computes something else with them, so ``load`` would return
    a model that silently differs from the saved one (``nn.Tanh`` where the saved model had ``nn.ReLU``). Files
    written before the record, or by hand without it, are not checked."""
    saved = getattr(state, "_metadata", {}).get("", {})
    saved = saved.get(GRAPH_METADATA_KEY) if isinstance(saved, dict) else None
    if saved is None:
        return
    valid = (isinstance(saved, dict) and isinstance(saved.get("capture"), str)
             and isinstance(saved.get("graphs"), (list, tuple))
             and all(isinstance(g, (list, tuple)) and all(isinstance(r, str) for r in g) for g in saved["graphs"]))
    if not valid:
        raise ExportError(f"{path!r} is damaged: its record of the model's graph (state_dict._metadata['']["
                          f"{GRAPH_METADATA_KEY!r}]) is not what orthofx.export writes ({saved!r:.120}); re-export "
                          "the model with orthofx.export(gm, 'model.pt'), or delete the entry to load unchecked")
    problem = _graph_difference(saved, _graph_signature(gm), path)
    if problem is None:
        return
    if saved.get("written_by") != _release():
        # a pass's graph edits or torch's tracer may differ between releases: the difference need not be the model's
        warnings.warn(f"{problem}. The file was written by {saved.get('written_by') or 'an earlier release'} and this "
                      f"is {_release()}, whose graphs may differ for the same model: check the restored model's "
                      "outputs against the saved model's, or re-export it with this release", OrthofxWarning,
                      stacklevel=caller_stacklevel())
        return
    raise ExportError(f"{problem}; load with an instance of the model class the file was exported from, built as "
                      "it was (orthofx.load restores the weights into the model given, so it must compute what the "
                      "saved one did), or, for a forward rewritten to compute the same thing, pass "
                      "check_graph=False. The model was not changed")


def _graph_difference(saved: dict, own: dict, path: str) -> str | None:
    """How the graph record ``own`` of the restored model differs from the file's ``saved`` one, or ``None``."""
    if own["capture"] != saved["capture"]:
        how = {"fx": "symbolic tracing (fx)", "export": "torch.export"}
        return (f"the model given to orthofx.load is not the one {path!r} was exported from: orthofx captured the "
                f"saved model with {how.get(saved['capture'], saved['capture'])} and this one with "
                f"{how.get(own['capture'], own['capture'])}, so their forwards differ")
    graphs, new = [list(g) for g in saved["graphs"]], own["graphs"]
    if graphs == new:
        return None
    if len(graphs) != len(new):
        one, two = "one graph", "a graph per training mode (a forward branching on self.training)"
        return (f"the model given to orthofx.load is not the one {path!r} was exported from: the saved model has "
                f"{two if len(graphs) > 1 else one} and this one {two if len(new) > 1 else one}")
    index, before, after = next((i, b, a) for i, (b, a) in enumerate(zip(graphs, new)) if b != a)
    which = f"its {'training' if index == 0 else 'eval'}-mode graph" if len(new) > 1 else "its graph"
    at = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), min(len(before), len(after)))
    shown = [rows[at] if at < len(rows) else "(the end of the graph)" for rows in (before, after)]
    return (f"the model given to orthofx.load computes otherwise than the one {path!r} was exported from, though "
            f"its weights fit: at node {at} of {which} the saved model has '{shown[0]}' and this one '{shown[1]}' "
            f"({len(before)} and {len(after)} nodes)")


_CAYLEY_TYPES = (OrthogonalConv1d, OrthogonalConv2d, OrthogonalConv3d)


def _cayley_input_sizes(root: nn.Module) -> dict[str, list[int]]:
    """``{module path: spatial input size}`` of each ``method='cayley_fft'`` conv of ``root`` (what
    :data:`CAYLEY_SIZES_KEY` records), in plain types that ``torch.load(weights_only=True)`` reads."""
    return {name: [int(n) for n in module.input_size] for name, module in root.named_modules()
            if isinstance(module, _CAYLEY_TYPES) and module.input_size is not None}


def _saved_cayley_input_sizes(saved: dict, path: str, written_by: str) -> dict[str, tuple[int, ...]] | None:
    """The file's record of its cayley_fft convs' input sizes (:data:`CAYLEY_SIZES_KEY`); ``None`` for a file
    written before the record (its sizes are not checked)."""
    if CAYLEY_SIZES_KEY not in saved:
        return None
    sizes = saved[CAYLEY_SIZES_KEY]
    valid = isinstance(sizes, dict) and all(
        isinstance(k, str) and isinstance(v, (list, tuple)) and v
        and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in v) for k, v in sizes.items())
    if not valid:
        raise ExportError(f"{path!r} is damaged: {CAYLEY_SIZES_KEY!r} must map module paths to spatial input sizes "
                          f"(lists of ints > 0), found {sizes!r:.120}; {written_by}")
    return {name: tuple(size) for name, size in sizes.items()}


def _check_cayley_input_sizes(gm: nn.Module, saved: dict[str, tuple[int, ...]] | None, path: str) -> None:
    """Refuse a replay whose ``method='cayley_fft'`` convs were built for other input sizes than the saved model's
    (``saved``: :func:`_saved_cayley_input_sizes`; nothing to check for ``None``).

    The replay builds each such layer for the spatial size of the example inputs ``load`` is given, and the saved
    ``cayley_kernel`` parameters fit a layer of any size: restored into one of another size, they would give another
    operator (a circular convolution on another grid) and a model that refuses the saved model's inputs."""
    if saved is None:
        return
    built = {name: tuple(size) for name, size in _cayley_input_sizes(gm).items()}
    other = [(name, saved[name], size) for name, size in built.items() if name in saved and saved[name] != size]
    if not other:
        return
    shown = first_few((f"'{name}' (saved for {was}, built here for {now})" for name, was, now in other), 3)
    raise ExportError(f"the example inputs given to orthofx.load do not have the size the model in {path!r} was "
                      "transformed for: its method 'cayley_fft' layers are built for the spatial size of the example "
                      f"inputs, and the saved ones were built for other spatial sizes: {shown}. Such a layer's "
                      "orthogonal operator is defined on that one input size, and its saved cayley_kernel parameters "
                      "fit any size, so they would compute another operator and the model would refuse the saved "
                      "size. Pass example inputs of the saved size (those orthofx.transform was given); for another "
                      "input size, transform the original model with example inputs of that size. The model was not "
                      "changed")


def _saved_probe_phases(saved: dict, path: str, written_by: str) -> dict[str, int]:
    """The probe steps of a file written before they travelled in the state dict's metadata
    (:data:`PROBE_PHASES_KEY`); ``{}`` for newer files."""
    phases = saved.get(PROBE_PHASES_KEY, {})
    valid = isinstance(phases, dict) and all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in phases.items())
    if not valid:
        raise ExportError(f"{path!r} is damaged: {PROBE_PHASES_KEY!r} must map module paths to step counts "
                          f"(ints >= 0), found {phases!r:.120}; {written_by}")
    return phases


def _restore_probe_phases(gm: nn.Module, phases: dict[str, int], path: str) -> None:
    """Put each Jacobian probe of ``gm`` at the step of its ``every`` period an older file saved it at
    (:func:`_saved_probe_phases`), so that the restored model makes its next estimate on the step the saved one
    would (a fresh probe starts a period). Newer files' steps are restored by ``load_state_dict``."""
    probes = {name: module for name, module in gm.named_modules() if isinstance(module, JacobianProbe)}
    strangers = sorted(set(phases) - set(probes))
    if strangers:
        raise ExportError(f"{path!r} holds Jacobian probe steps for {strangers[:5]}, which are no Jacobian probes "
                          f"of this model (its probes: {sorted(probes)[:5]}); load with the model the file was "
                          "exported from")
    for name, calls in phases.items():
        probes[name].restore_calls(calls)


def _check_state_entries(state: dict, path: str, written_by: str) -> None:
    """Refuse a saved state_dict with entries that are not ``name -> tensor`` (a hand-edited or foreign file),
    which ``load_state_dict`` fails on with an AttributeError (a non-string key) or accepts silently."""
    bad = [(k, v) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        shown = ", ".join(f"{k!r}: {type(v).__name__}" for k, v in bad[:3])
        raise ExportError(f"the saved weights in {path!r} are damaged: a state_dict maps parameter names (str) to "
                          f"tensors, and {len(bad)} entr{'y does' if len(bad) == 1 else 'ies do'} not ({shown}); "
                          f"{written_by}")


def _dtype_kind(dtype: torch.dtype) -> str:
    """The kind of value a tensor of ``dtype`` holds: ``'bool'``, ``'integer'``, ``'floating'`` or ``'complex'``.

    A cast within a kind keeps the value up to rounding (float64 -> float32, int32 -> int64); a cast across kinds
    changes what it means (True -> 1.0, 2.7 -> 2, 1+2j -> 1)."""
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "floating" if dtype.is_floating_point else "integer"


def _check_saved_dtype_kinds(gm: nn.Module, state: dict, path: str) -> None:
    """Refuse saved tensors whose dtype is of another kind (:func:`_dtype_kind`) than the model's tensor of the same
    name, before ``load_state_dict`` fills ``gm`` (a fresh transform; ``model`` is never written).

    ``load_state_dict`` copies each saved tensor with ``copy_``, which casts to the model's dtype whatever it is:
    an int64 or bool tensor (a hand-edited or foreign file) became float weights silently, a complex one lost its
    imaginary part, a float one was truncated into an integer buffer (BatchNorm's ``num_batches_tracked``). Within
    a kind the cast is wanted: the file's floating dtype is restored (:func:`_match_saved_dtype`) and an int32
    count widens into the model's int64. Keys the model lacks are reported by the missing/unexpected check."""
    targets = gm.state_dict(keep_vars=True)
    wrong = [(key, tensor.dtype, targets[key].dtype) for key, tensor in state.items()
             if isinstance(targets.get(key), torch.Tensor)
             and _dtype_kind(tensor.dtype) != _dtype_kind(targets[key].dtype)]
    if not wrong:
        return
    shown = first_few((f"{key!r} is {saved} in the file but {model} ({_dtype_kind(model)}) in the model"
                       for key, saved, model in wrong), 3)
    key, _, model_dtype = wrong[0]
    raise ExportError(f"the saved weights in {path!r} have the wrong kind of dtype: {shown}. Loading would "
                      "cast them silently (bool/integer to float, complex dropping its imaginary part, float "
                      "truncated to integer), so the file was hand-edited or not written for this model. Re-export "
                      "the model with orthofx.export(gm, 'model.pt'), or convert the tensor in the file to the "
                      f"model's dtype (saved['state_dict'][{key!r}] = tensor.to({model_dtype}), if its values are "
                      "meant so). The model was not changed")


def _in_saved_dtype(model: nn.Module, saved_dtype: torch.dtype | None) -> nn.Module | None:
    """A copy of ``model`` converted to ``saved_dtype``, the dtype of the saved parameters when the example inputs
    are in it and the model is not (:func:`_saved_dtype_of_inputs`); ``None`` when there is none or it is a half
    precision (:func:`_in_model_dtype` then casts the inputs instead). ``model`` itself is not changed.

    ``load`` replays the policy on the example call before it restores the weights: a ``.pt`` of a model saved
    after ``.double()``, loaded with float64 example inputs into the float32 model ``load`` is normally given, failed
    there ("Input type (double) and bias type (float) should be the same"), reported as the policy not fitting the
    model. With float32 example inputs the model is transformed as it is and converted afterwards
    (:func:`_match_saved_dtype`)."""
    if saved_dtype is None or saved_dtype in HALF_PRECISION:
        return None
    return copy_model(unwrap_model(model)).to(saved_dtype)


def _saved_dtype_of_inputs(model: nn.Module, state: dict, example: ExampleCall | None) -> torch.dtype | None:
    """The one floating dtype of the saved parameters when the example inputs are in it and the model is not, else
    ``None``. The saved tensors of the model's own parameters (by name) decide, where there are any: a pass's
    float64 buffers (a condition monitor's statistics, kept in float64 through ``.to(dtype)``) say nothing of the
    dtype the model was saved in."""
    if example is None:
        return None
    saved, current = _parameter_dtypes(model, state)
    saved = saved or {t.dtype for t in state.values() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    inputs = {t.dtype for _, t in example.named_inputs() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    if len(saved) != 1 or inputs != saved or not current or current == saved:
        return None
    return saved.pop()


def _parameter_dtypes(model: nn.Module, state: dict) -> tuple[set[torch.dtype], set[torch.dtype]]:
    """``(saved, current)``: the floating dtypes of the saved tensors of ``model``'s floating parameters (by name)
    and of those parameters now."""
    names = {name for name, p in model.named_parameters() if p.is_floating_point()}
    saved = {t.dtype for key, t in state.items() if key in names and isinstance(t, torch.Tensor)
             and t.is_floating_point()}
    return saved, {p.dtype for p in model.parameters() if p.is_floating_point()}


def _captured_dtype(model: nn.Module, state: dict) -> torch.dtype | None:
    """The dtype the saved model was captured in with torch.export, where the file records one
    (:func:`_graph_signature`'s ``input_dtypes``), the saved parameters of ``model`` are all in it and ``model``'s
    are not; else ``None``. :func:`load` replays such a policy on a copy converted to it, whatever the dtype of the
    example inputs (cast to it): a replay in ``model``'s dtype captures another graph."""
    saved, current = _parameter_dtypes(unwrap_model(model), state)
    if len(saved) != 1 or current == saved:
        return None
    (dtype,) = saved
    # no floating input (token ids): the graph's dtype choices follow its parameters', which were saved in it
    return dtype if _recorded_input_dtypes(state) in ({str(dtype)}, set()) else None


def _in_model_dtype(model: nn.Module, example_inputs: Any, example_kwargs: Any) -> tuple[Any, Any]:
    """``(example_inputs, example_kwargs)`` with their floating tensors cast to the model's one floating dtype
    (unchanged for a model of several). For a model saved in a half precision with example inputs in it: the policy
    is replayed on the model as it was transformed (in float32, say) and the restored model converted afterwards
    (:func:`_match_saved_dtype`). Converting the model first, as for float64 (:func:`_in_saved_dtype`), would run it
    in half precision before the rewrite, where a decomposition has no kernel (``eigh`` in bfloat16 on a CPU) that
    the transform then replaces."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1:
        return example_inputs, example_kwargs
    (dtype,) = dtypes

    def cast(value):
        return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
    return torch.utils._pytree.tree_map(cast, (example_inputs, example_kwargs))


def _match_saved_dtype(gm: nn.Module, state: dict) -> None:
    """Give ``gm`` (the fresh transform ``load`` fills) the floating dtype of the saved parameters, when they all
    have one and it differs from the model's.

    ``load_state_dict`` copies each saved tensor into the model's tensor of the same name, cast to its dtype: a
    model saved after ``.double()`` came back in float32 (its weights rounded) from the float32 model ``load`` is
    normally given, and one saved after ``.half()`` computed in float32, so neither reproduced the saved model.
    The model is converted as the saved one was (``gm.to(dtype)``; ``model`` itself is not changed). Saved
    parameters of several floating dtypes (a model converted in parts) are loaded into the model's dtypes."""
    params = dict(gm.named_parameters(remove_duplicate=False))
    saved = {state[k].dtype for k in params if k in state and state[k].is_floating_point()}
    current = {p.dtype for p in params.values() if p.is_floating_point()}
    if len(saved) == 1 and len(current) == 1 and saved != current:
        gm.to(saved.pop())
