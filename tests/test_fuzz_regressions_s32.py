"""Regressions found by the session-32 fuzz round (areas the earlier rounds left out: float64 / bfloat16 / float16
models and CPU autocast (bfloat16, float16) training steps with every preset; transforming a transformed or frozen
model again, with every pair of presets, and ``explain`` against ``transform``; ``state_dict`` round trips into a
freshly transformed model, ``.pt`` export + ``orthofx.load`` into a float64 / eval-mode copy, ``.to(dtype)`` after
transform, ``requires_grad_(False)`` on part of the parameters; ``torch.func`` (``functional_call``, ``grad``,
per-sample ``vmap(grad(...))`` against a loop); malformed and odd policies; the CLI with odd arguments). Drivers:
``.snap/s32/fuzz/`` (``driver_*.py``; ``r_*.py`` are the reductions). All eight findings are fixed.

- Export capture (a top-level forward symbolic tracing cannot follow, e.g. ``side = int(n ** 0.5)`` of a token
  count) wrote the forward's size reads as ``torch.ops.aten.sym_size.int(x, 0)``, which has no batching rule:
  ``torch.func.vmap`` of the transformed model (per-sample gradients, the README's ``vmap(grad(...))``) raised
  torch's bare "RuntimeError: Batching rule not implemented for aten::sym_size.int", where the model itself and
  every fx-captured transformed model run. Root cause: ``capture.py:_ExportRebuild._copy`` (and its ``_resolve``
  for sizes shared between calls) copied the ATen size ops as they are. Expected: the method call symbolic tracing
  records (``x.size(0)``), which vmap batches. Fixed: ``capture._size_method_form`` rewrites ``sym_size``,
  ``sym_stride``, ``sym_numel`` and ``sym_storage_offset`` to ``size`` / ``stride`` / ``numel`` /
  ``storage_offset`` calls (``_is_symbolic_size`` still knows them by export's symbolic value).
- ``orthofx.explain`` of a transformed model carrying penalty terms or optimizer hooks printed a plan ("4
  change(s) planned") while ``orthofx.transform`` with the same arguments refuses it (``TransformError``: the second
  manifest would drop the first policy's terms and hooks): the dry run disagreed with the run. Root cause:
  ``transform.py:explain`` did not call ``_refuse_dropping_attachments``. Expected: the same ``TransformError``
  (what, why, and the two fixes: one policy holding both rule lists, or ``freeze`` first). Fixed.
- A ``where:`` value of the wrong type or form (``groups: '1'`` quoted in YAML, ``padding: same``, ``kernel_size:
  [3]``, ``stride: 2`` on a layer with stride 1) made the rule match nothing with the generic "matched no module
  site; the graph's module sites: Conv2d x3 ... Fix the match", which names neither ``where`` nor the values the
  layers have; only a misspelt attribute got a hint. Root cause: ``plan.py:_missing_attribute_hint`` looked at
  attribute names only. Expected: the message says which ``where`` entry filtered every layer out, the values those
  layers hold and the value given, with their types. Fixed (``plan._unmatched_value_hint``): `` The rule's where:
  'groups' is an integer (1) on each of the 3 layer(s) it selects without 'where', never a string ('1').``
- Same family, for ``name:``: a rule whose name pattern matched no layer (``re:conv``, which must match the whole
  name; ``Conv1`` for ``conv1``; ``conv1.*`` for the layer ``conv1`` itself) got the same generic message listing
  the graph's module *types*, though names were the selector that failed. Root cause: ``plan.py:build_plan``'s
  no-match message had hints for ``where`` and ``exclude`` only. Expected: the names of the layers the rule selects
  otherwise (those its pass can take) and the likely slip. Fixed (``plan._unmatched_name_hint``).
- ``orthofx.load`` of a ``.pt`` saved after ``gm.to(torch.bfloat16)`` (``svd`` preset) with bfloat16
  example inputs (the inputs the saved model takes) fails with ``ExportError`` "the policy stored in ... does not
  apply to this model (the model failed on example_inputs before any rewrite: Input type (c10::BFloat16) and bias
  type (float) should be the same ...); load with the original (untransformed) model", though it is that model;
  float32 example inputs load it exactly. Root cause: ``export.py:_in_saved_dtype`` reads the saved dtype from every
  floating tensor, and the condition monitor keeps its buffers in float64 through ``.to(dtype)``, so it sees two
  dtypes and does not convert the model; converting alone does not fix it either (the bfloat16 model cannot run
  ``eigh`` on the CPU before the rewrite). Expected: load works (transform in the model's dtype on the example
  inputs cast to it, then convert, as float32 inputs do), or the error says to pass float32 example inputs. Fixed
  in session 32: the saved dtype is read from the model's own parameters (``export._saved_dtype_of_inputs``), and
  for a half-precision save the example inputs are cast to the model's dtype for the replay
  (``export._example_in_model_dtype``); the model is converted afterwards, as with float32 inputs.
- ``orthofx.transform`` / ``explain`` of a TorchScript model (``torch.jit.script(model)`` or ``torch.jit.trace``)
  raised torch's bare "RuntimeError: get_submodule is not supported on ScriptModules" with example inputs (the
  export fallback), and without them a ``CaptureError`` whose fixes (``leaf_modules``, ``concrete_args``,
  torch.export) cannot help. Root cause: ``capture.py:capture`` let a top-level ``ScriptModule`` reach both
  tracers (the README covers TorchScript *submodules*: kept as leaves, warned). Expected: a ``CaptureError`` saying
  it is TorchScript and to transform the ``nn.Module`` it was made from, then script. Fixed.
- CLI: ``orthofx explain model.py --input-shape 2,5`` for a model taking token ids (an ``nn.Embedding``) or two
  inputs exits 2 with torch's error and "give the shape of one input the model takes", though the shape is right:
  the CLI's example input is one random floating-point tensor, which such a model cannot take whatever its shape.
  Root cause: ``cli.py:_example``'s message. Expected: it says what the CLI gives and the two ways out (leave out
  ``--input-shape``, or example inputs from Python). Fixed (message only).
- The ``isometric`` preset on the built-in ``dbn_cnn`` gives NaN gradients on the first training step for
  some inputs (seeds 1, 2, 3 of 0-5 in float32; 1, 3, 5 in float64, where a later step then fails with a bare
  ``torch._C._LinAlgError`` from the model's ``eigh``); the plain model's gradients are finite. Root cause:
  ``passes/isometric_init.py`` gives ``conv1`` (1 -> 16 channels, 5 x 5) a delta-orthogonal kernel (the centre
  tap only, as P2 prescribes), so every pixel's 16 features lie on one line and the decorrelated BatchNorm's
  covariance has 15 eigenvalues tied at ``eps``: the plain ``eigh`` backward divides by their differences. The
  same mechanism as session 31's ``orthogonal``-preset finding (fixed there by spreading the nearest start over
  the taps). Expected: finite first-step gradients (an orthogonal kernel over all taps for a column-orthogonal
  conv that feeds a decomposition, or a plan warning naming the conv, the decomposition and the ``svd`` preset's
  stable ``eigh`` as the fix). Fixed with the warning: an exact isometry under zero padding has only the centre
  tap (P0 Proposition 6), so the kernel stays; ``isometric_init`` warns (``OrthofxWarning``) when a delta-orthogonal
  conv narrows its outputs and feeds a decomposition no ``svd_conditioning`` rule makes stable, and names that rule
  as the fix, which gives finite gradients (``tests/test_isometric_narrowing_s32.py``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import orthofx

pytestmark = pytest.mark.usefixtures("one_thread")


class _PatchTokens(nn.Module):
    """Tokens back to a square image whose side is ``int(n ** 0.5)`` of the token count: ``int()`` of a traced
    size fails under fx, so capture mode ``auto`` uses torch.export."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        b, n, _ = tokens.shape
        side = int(n ** 0.5)
        x = self.embed(tokens).transpose(1, 2).reshape(b, -1, side, side)
        return self.head(torch.tanh(self.conv(x)).mean(dim=(2, 3)))


def test_an_export_captured_model_runs_under_vmap_and_gives_per_sample_gradients():
    torch.manual_seed(0)
    tokens = torch.randn(3, 16, 6)
    model = _PatchTokens()
    gm = orthofx.transform(model, "lorth", example_inputs=(tokens,))
    assert orthofx.manifest_of(gm).capture.mode == "export"
    gm.eval()
    params = {k: v.detach() for k, v in gm.named_parameters()}

    def loss(p, sample):
        return functional_call(gm, p, (sample.unsqueeze(0),)).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, tokens)
    # reference: the original (untransformed, uncaptured) model, one sample at a time, plain autograd
    for i in range(tokens.shape[0]):
        model.zero_grad()
        model(tokens[i:i + 1]).square().sum().backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        outputs = vmap(lambda sample: gm(sample.unsqueeze(0)).squeeze(0))(tokens)
        torch.testing.assert_close(outputs, model(tokens), rtol=1e-5, atol=1e-6)
    assert [node.target for node in gm.graph.nodes if node.op == "call_method"] == ["size"]  # tokens.size(0)


def _two_convs() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))


@pytest.mark.parametrize("first", ["lorth", "isometric"])
def test_explain_refuses_a_transformed_model_that_transform_refuses(first):
    x = torch.randn(2, 3, 6, 6)
    model = _two_convs()
    if first == "isometric":  # Riemannian hooks on a square Linear
        model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
        x = torch.randn(2, 4)
    gm = orthofx.transform(model, first, example_inputs=(x,))
    with pytest.raises(orthofx.TransformError) as by_transform:
        orthofx.transform(gm, "orthogonal", example_inputs=(x,))
    with pytest.raises(orthofx.TransformError) as by_explain:
        orthofx.explain(gm, "orthogonal", example_inputs=(x,))
    assert str(by_explain.value) == str(by_transform.value)
    assert "already transformed" in str(by_explain.value) and "orthofx.freeze" in str(by_explain.value)
    # the advice works: the frozen model explains and transforms alike
    frozen = orthofx.freeze(gm, (x,))
    plan = orthofx.explain(frozen, "orthogonal", example_inputs=(x,))
    changes = orthofx.manifest_of(orthofx.transform(frozen, "orthogonal", example_inputs=(x,))).changes
    assert [(e.site.name, e.pass_name) for e in plan.entries] == [(c.site, c.pass_name) for c in changes]


@pytest.mark.parametrize("where, hint", [
    ({"groups": "1"}, "'groups' is an integer (1) on each of the 2 layer(s) it selects without 'where', "
                      "never a string ('1')"),
    ({"padding": "same"}, "'padding' is [1, 1] on each of the 2 layer(s) it selects without 'where', "
                          "never a string ('same')"),
    ({"kernel_size": [3]}, "'kernel_size' is [3, 3] on each of the 2 layer(s) it selects without 'where', "
                           "never [3]"),
    ({"out_channels": 8}, "'out_channels' is one of an integer (4), an integer (5) on the 2 layer(s) it selects "
                          "without 'where', never an integer (8)"),
])
def test_a_where_value_no_layer_holds_is_named_with_the_values_they_hold(where, hint):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1))
    policy = {"rules": [{"match": {"type": "Conv2d", "where": where}, "apply": "orth_regularizer"}]}
    with pytest.raises(orthofx.PlanError, match="matched no module site") as info:
        orthofx.explain(model, policy)
    assert f"The rule's where: {hint}." in str(info.value)


def test_a_where_that_filters_only_in_combination_adds_no_value_hint():
    # bias: true selects the first conv and kernel_size: 5 none: only kernel_size is named
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, bias=False))
    policy = {"rules": [{"match": {"type": "Conv2d", "where": {"bias": True, "kernel_size": 5}},
                         "apply": "orth_regularizer"}]}
    with pytest.raises(orthofx.PlanError) as info:
        orthofx.explain(model, policy)
    message = str(info.value)
    assert "'kernel_size' is [3, 3] on each of the 2 layer(s)" in message and "'bias'" not in message
    # each entry matching some layer, the two together none: the generic message only
    policy["rules"][0]["match"]["where"] = {"bias": False, "in_channels": 3}
    with pytest.raises(orthofx.PlanError) as info:
        orthofx.explain(model, policy)
    assert "The rule's where" not in str(info.value)


class _CovPool(nn.Module):
    """1x1 conv, per-sample covariance, ``eigh`` (the svd preset's stable decomposition with a float64 monitor)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        f = self.conv(x).flatten(2)
        cov = f @ f.transpose(1, 2) / f.shape[-1] + 1e-3 * torch.eye(4)
        return self.fc(torch.linalg.eigh(cov)[0])


def test_load_of_a_bfloat16_svd_model_with_bfloat16_example_inputs(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    model = _CovPool()
    gm = orthofx.transform(model, "svd", example_inputs=(x,)).to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    path = tmp_path / "m.pt"
    orthofx.export(gm, path, example_inputs=(xb,))
    # float32 example inputs load it (converted to bfloat16 afterwards): the same outputs
    gm.eval()
    with torch.no_grad():
        expected = gm(xb)
    by_float32 = orthofx.load(model, path, example_inputs=(x,)).eval()
    with torch.no_grad():
        torch.testing.assert_close(by_float32(xb), expected, rtol=0, atol=0)
    # the example inputs the saved model takes: "the policy does not apply to this model" (it does)
    by_bfloat16 = orthofx.load(model, path, example_inputs=(xb,)).eval()
    with torch.no_grad():
        torch.testing.assert_close(by_bfloat16(xb), expected, rtol=0, atol=0)


@pytest.mark.parametrize("pattern, note", [
    ("re:conv", "'re:conv' must match a whole name and matches only part of conv1, conv2 (write 're:.*conv.*', "
                "or a glob)"),
    ("Conv1", "'Conv1' matches conv1 in another case (names are case-sensitive)"),
    ("conv1.*", "the closest name to 'conv1.*' is conv1"),
])
def test_a_name_pattern_that_matches_no_layer_is_named_with_the_layer_names(pattern, note):
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(3, 4, 3))
    model.add_module("act", nn.ReLU())
    model.add_module("conv2", nn.Conv2d(4, 4, 3))
    policy = {"rules": [{"match": {"name": pattern}, "apply": "orth_regularizer"}]}
    with pytest.raises(orthofx.PlanError, match="matched no module site") as info:
        orthofx.explain(model, policy)
    # the layers the pass could take, not the ReLU the name-only rule would select too
    assert (f"Its name pattern(s) ({pattern}) match none of the 2 site(s) it selects otherwise: conv1, conv2; "
            f"{note}.") in str(info.value)


@pytest.mark.parametrize("make", ["script", "trace"])
@pytest.mark.parametrize("with_inputs", [True, False])
def test_a_torchscript_model_is_refused_saying_to_transform_the_module_it_came_from(make, with_inputs):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    scripted = torch.jit.script(model) if make == "script" else torch.jit.trace(model, x)
    example = (x,) if with_inputs else None
    for call in (orthofx.transform, orthofx.explain):
        with pytest.raises(orthofx.CaptureError, match=r"the model is a TorchScript module \(RecursiveScriptModule, "
                                                        r"made by torch\.jit\.script or torch\.jit\.trace\).*"
                                                        r"transform the nn\.Module it was made from"):
            call(scripted, "lorth", example_inputs=example)
    # the advice works: the module it was made from transforms; its penalty is 0.01 x P0's L_orth of the two
    # square kernels, ||conv(K, K, padding k - 1) - I_r0||_F^2, in float64
    gm = orthofx.transform(model, "lorth", example_inputs=example)
    expected = 0.0
    for conv in (model[0], model[2]):
        k = conv.weight.detach().double()
        gram = torch.nn.functional.conv2d(k, k, padding=2)
        gram[torch.arange(4), torch.arange(4), 2, 2] -= 1.0
        expected += 0.01 * float(gram.square().sum())
    assert float(orthofx.penalty(gm)) == pytest.approx(expected, rel=1e-4)


def _cli(capsys, *argv):
    from orthofx.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("forward, shape", [
    ("self.fc(self.emb(ids))", "2,5"),             # token ids: an nn.Embedding refuses a float tensor
    ("self.fc(self.emb(ids.long()) + extra)", "2,5"),  # a second input the CLI cannot give
])
def test_the_cli_says_its_example_input_is_one_float_tensor_when_the_model_refuses_it(capsys, tmp_path, forward,
                                                                                     shape):
    extra = ", extra" if "extra" in forward else ""
    path = tmp_path / "tokens.py"
    path.write_text("import torch\nfrom torch import nn\n\n"
                    "class Tokens(nn.Module):\n"
                    "    def __init__(self):\n"
                    "        super().__init__()\n"
                    "        self.emb = nn.Embedding(10, 8)\n"
                    "        self.fc = nn.Linear(8, 8)\n\n"
                    f"    def forward(self, ids{extra}):\n"
                    f"        return {forward}\n\n"
                    "model = Tokens()\n")
    code, out, err = _cli(capsys, "explain", str(path), "--policy", "lorth", "--input-shape", shape)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert ("The CLI gives the model one random floating-point input: for a model taking several inputs or integer "
            "ids (token indices), leave out --input-shape, or call orthofx.transform(model, policy, "
            "example_inputs=(...)) in Python") in err
    code, out, err = _cli(capsys, "explain", str(path), "--policy", "lorth")  # the advice works
    assert code == 0, err
    assert "Linear(8->8)" in out


def test_isometric_preset_on_dbn_cnn_warns_and_the_named_fix_gives_finite_gradients():
    stable = orthofx.Policy.load("svd").to_dict()["rules"][0]
    assert stable["apply"] == "svd_conditioning"
    fixed = {"orthofx": 1, "rules": orthofx.Policy.load("isometric").to_dict()["rules"] + [stable]}
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        model = orthofx.models.get("dbn_cnn")
        x = orthofx.models.example_input("dbn_cnn")
        with pytest.warns(orthofx.errors.OrthofxWarning, match="'conv1'.*feeds dbn:linalg.eigh.*svd_conditioning"):
            orthofx.transform(model, "isometric", example_inputs=(x,))
        torch.manual_seed(seed)
        gm = orthofx.transform(model, fixed, example_inputs=(x,)).train()
        gm(x).square().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in gm.parameters() if p.grad is not None), seed
