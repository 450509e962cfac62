"""The README's code blocks that ``tests/test_examples.py`` does not run, run as written, and do what the text next
to them says.

``tests/test_examples.py`` already runs the README's ```` ```python ```` blocks (the quickstart as
``examples/quickstart.py``, the others with ``exec``). Not run anywhere were the policy block (```` ```yaml ````),
the two untagged fences (``orthofx.attach``; freeze / export / load), the indented metrics lines and the command
line synopsis; nor was the printed line of the train/eval block compared with its comment. Each test here takes
its block from README.md at run time, supplies only the names the block uses but does not define (stated in each
test), and checks the claims against independent references: ``named_modules()`` with ``fnmatch`` for rule
selection, dense float64 matrices for orthogonality and singular values, the untransformed model run by torch for
exported outputs, argparse's own ``--help`` text for the options.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import os
import re

import pytest
import torch

import orthofx
from orthofx.cli import main
from references import circular_operator64

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "README.md")) as _handle:
    README = _handle.read()


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced block of ``text`` in order (language ``""`` for an untagged fence),
    found by walking the fences line by line, so an untagged block is never confused with a closing fence."""
    blocks, lang, body = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, body = line[3:].strip(), []
            else:
                blocks.append((lang, "\n".join(body) + "\n"))
                lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, "an unclosed fence in README.md"
    return blocks


def block_with(lang: str, needle: str) -> str:
    """The one ``lang`` block of the README that contains ``needle``."""
    found = [body for kind, body in fenced_blocks(README) if kind == lang and needle in body]
    assert len(found) == 1, (lang, needle, len(found))
    return found[0]


def indented_block_after(heading: str) -> list[str]:
    """The lines of the first 4-space-indented block of the README section ``heading`` (stripped)."""
    section = README.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"\n\n((?: {4}\S.*\n(?: {4,}.*\n)*)+)", "\n" + section)
    assert match, heading
    return [line.strip() for line in match.group(1).splitlines() if line.strip()]


def as_list(value) -> list:
    return [value] if isinstance(value, str) else list(value)


def test_the_fence_walker_sees_every_block():
    kinds = [kind for kind, _ in fenced_blocks(README)]
    assert kinds.count("python") >= 3 and kinds.count("yaml") == 1 and kinds.count("") >= 2
    assert len(re.findall(r"^```", README, re.M)) == 2 * len(kinds)


# ------------------------------------------------------------------------------------------------- Policies


def test_policy_block_plans_as_its_comments_say_on_resnet18():
    """Supplied: resnet18 (it has ``layer3``/``layer4`` and ``fc``; no ``MyAttention``, no eigh). The first rule
    takes the convs its glob and ``where`` select (found here with ``fnmatch`` on ``named_modules()``) at its
    weight, the second every other conv/linear but ``fc`` (the first rule's sites shadowed), the optional
    ``feeds`` rule matches nothing without error, the unnamed rules get ``<apply>[<index>]`` names and the
    absent leaf module is a capture warning."""
    text = block_with("yaml", "strong-late")
    model = orthofx.models.get("resnet18")
    plan = orthofx.explain(model, text)

    rules = orthofx.Policy.load(text).to_dict()["rules"]
    (first, strong_with), (second, rest_with) = ((rule["match"], rule["with"]) for rule in rules[:2])
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    globs, excluded = as_list(first["name"]), as_list(second["exclude"])   # to_dict writes one name as a string
    strong = {name for name, m in layers.items() if isinstance(m, torch.nn.Conv2d)
              and any(fnmatch.fnmatchcase(name, glob) for glob in globs) and m.groups == first["where"]["groups"]}
    rest = {name for name in layers if name not in strong and name not in excluded}
    assert strong and rest and excluded and all(name in layers for name in excluded)   # it excludes something

    applied = {}
    for entry in plan.entries:
        applied.setdefault(entry.rule_name, {})[entry.site.name] = entry.params
    assert set(applied) == {"strong-late", "orth_regularizer[1]"}
    assert set(applied["strong-late"]) == strong
    assert set(applied["orth_regularizer[1]"]) == rest
    assert all(p["weight"] == strong_with["weight"] for p in applied["strong-late"].values())
    assert all(p["weight"] == rest_with["weight"] for p in applied["orth_regularizer[1]"].values())
    assert {(site.name, by) for site, _, by in plan.shadowed} == {(name, "strong-late") for name in strong}
    assert plan.unmatched_optional == ["orth_regularizer[2]"]
    assert any("MyAttention" in warning for warning in plan.capture.warnings)


def test_policy_block_feeds_rule_selects_the_layers_under_the_eigh():
    """Supplied: dbn_cnn, whose decorrelated BatchNorm eigendecomposes a covariance of features. The third rule
    alone (``feeds: linalg.eigh``) selects exactly the conv/linear layers whose weights the eigh's input depends
    on, found here by autograd from the matrix ``torch.linalg.eigh`` receives in a plain forward."""
    text = block_with("yaml", "feeds: linalg.eigh")
    rules = orthofx.Policy.load(text).to_dict()["rules"]
    (feeds_rule,) = [rule for rule in rules if (rule.get("match") or {}).get("feeds")]
    model = orthofx.models.get("dbn_cnn")
    x = orthofx.models.example_input("dbn_cnn")
    plan = orthofx.explain(model, {"rules": [feeds_rule]}, example_inputs=(x,))

    seen = []

    class RecordEigh(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.linalg.eigh:
                seen.append(args[0])
            return func(*args, **(kwargs or {}))

    with RecordEigh():
        model(x)
    assert seen, "dbn_cnn no longer calls torch.linalg.eigh"
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    grads = torch.autograd.grad(sum(a.sum() for a in seen), [m.weight for m in layers.values()], allow_unused=True)
    upstream = {name for name, grad in zip(layers, grads) if grad is not None}
    assert upstream and {entry.site.name for entry in plan.entries} == upstream


# ------------------------------------------------------------------------------------------- attach (untagged)


def test_attach_block_keeps_the_riemannian_weights_orthonormal():
    """Supplied: ``gm``, small_cnn with a ``riemannian`` rule on its stride-1 convs. After the block's SGD with
    momentum steps a few times, each flattened weight still has orthonormal rows (or columns), checked on the
    dense float64 Gram matrix; ``handle`` has ``remove`` and ``skipped`` as the text says."""
    block = block_with("", "orthofx.attach(optimizer, gm)")
    torch.manual_seed(0)
    x = orthofx.models.example_input("small_cnn")
    policy = {"rules": [{"match": {"type": "Conv2d", "where": {"stride": 1}}, "apply": "riemannian"}]}
    gm = orthofx.transform(orthofx.models.get("small_cnn"), policy, example_inputs=(x,))
    namespace = {"torch": torch, "orthofx": orthofx, "gm": gm}
    exec(compile(block, "<README attach block>", "exec"), namespace)
    optimizer, handle = namespace["optimizer"], namespace["handle"]
    assert callable(handle.remove) and handle.skipped is not None
    before = {name: m.weight.detach().clone() for name, m in gm.named_modules() if isinstance(m, torch.nn.Conv2d)}
    for _ in range(3):
        gm(torch.randn(8, *x.shape[1:])).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    hooked = [name for name, m in gm.named_modules() if isinstance(m, torch.nn.Conv2d) and m.stride == (1, 1)]
    assert hooked == ["conv1", "conv3"]
    for name in hooked:
        w = dict(gm.named_modules())[name].weight.detach().to(torch.float64).flatten(1)
        assert not torch.equal(w, before[name].to(torch.float64).flatten(1)), name   # the steps moved it
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        assert (gram - torch.eye(len(gram), dtype=torch.float64)).abs().max() < 1e-5, name


# --------------------------------------------------------------------------- freeze / export / load (untagged)


@pytest.mark.slow   # an ONNX and a .pt2 export: 4 s alone, 14 s beside other work on 2 cores
def test_save_block_writes_the_files_it_names(tmp_path, monkeypatch):
    """Supplied: ``model`` (small_cnn), ``x`` (its example input, batch 2) and ``gm`` (the lorth preset, which
    adds penalty terms only, so every output below must equal the untransformed model's, run by torch). The block
    writes ``model.onnx`` with ``model.onnx.data`` beside it, ``model.pt2`` and a ``model.pt`` that
    ``torch.load(weights_only=True)`` reads; ``freeze`` gives plain torch layers."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)
    block = block_with("", 'orthofx.export(gm, "model.pt2"')
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = orthofx.models.get("small_cnn").eval()
    x = orthofx.models.example_input("small_cnn")
    with torch.no_grad():
        expected = model(x)
    gm = orthofx.transform(model, "lorth", example_inputs=(x,)).eval()
    namespace = {"torch": torch, "orthofx": orthofx, "model": model, "x": x, "gm": gm}
    exec(compile(block, "<README save block>", "exec"), namespace)

    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.onnx.data", "model.pt", "model.pt2"]
    frozen, loaded = namespace["frozen"], namespace["gm"]
    kinds = {type(m).__module__.split(".")[0] for m in frozen.modules()}
    assert kinds == {"torch"}, kinds
    with torch.no_grad():
        assert torch.allclose(frozen.eval()(x), expected, atol=1e-6)
        assert torch.allclose(loaded.eval()(x), expected, atol=1e-6)
        program = torch.export.load("model.pt2")
        assert torch.allclose(program.module()(x), expected, atol=1e-6)
    saved = torch.load("model.pt", weights_only=True)
    assert "policy" in saved and "state_dict" in saved
    import onnxruntime

    session = onnxruntime.InferenceSession("model.onnx")
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert abs(out - expected.numpy()).max() < 1e-4


# --------------------------------------------------------------------------------------- metrics and theory


def test_metrics_lines_run_and_match_dense_references():
    """Supplied: a 32 -> 16 channel 3 x 3 kernel ``weight``, ``input_size`` 8 x 8 and the matching ``c_in``,
    ``c_out``, ``kernel_size``, ``stride``. The singular values are the dense circular operator's, the bound is
    at least the largest of them, existence comes back as ``(exists, case, reason)`` with P0's Theorem 4 case
    (RO: ``M <= C S^d``; exists iff ``M <= C k^d``) and the constants as ``(alpha', alpha)``."""
    lines = indented_block_after("Reports, metrics and theory")
    assert len(lines) == 5 and all(line.startswith("orthofx.") for line in lines)
    torch.manual_seed(0)
    c_in, c_out, kernel_size, stride, input_size = 32, 16, 3, 1, (8, 8)
    weight = torch.randn(c_out, c_in, kernel_size, kernel_size, dtype=torch.float64) / 10
    env = {"orthofx": orthofx, "weight": weight, "input_size": input_size, "c_in": c_in, "c_out": c_out,
           "kernel_size": kernel_size, "stride": stride}
    lorth, sigma, bound, exists, constants = (eval(line.split("#")[0], env) for line in lines)

    assert float(lorth) > 0
    dense = torch.linalg.svdvals(circular_operator64(weight, grid=input_size))
    assert torch.allclose(torch.sort(sigma.flatten()).values, torch.sort(dense).values, atol=1e-9)
    assert float(bound) >= float(dense.max()) - 1e-9
    is_there, case, reason = exists
    assert (is_there, case) == (c_out <= c_in * kernel_size ** 2, "RO") and isinstance(reason, str)
    assert len(constants) == 2
    linear = torch.randn(10, 32, dtype=torch.float64)   # "2-D weights: linear": ||W W^T - I||_F^2
    by_hand = (linear @ linear.T - torch.eye(10, dtype=torch.float64)).square().sum()
    assert float(orthofx.metrics.lorth(linear)) == pytest.approx(float(by_hand), rel=1e-10)


# -------------------------------------------------------------------------------------------- command line


def test_command_line_synopsis_names_only_options_the_commands_have(capsys):
    """Every ``--option`` of each synopsis line is in that command's own ``--help`` text (argparse's), and the
    demo's bracketed defaults are the ones ``orthofx demo --help`` states."""
    lines = indented_block_after("Command line")
    commands = {}
    for line in lines:
        if line.startswith("orthofx "):
            words = line.split()
            current = words[1] if not words[1].startswith("-") else ""
            commands.setdefault(current, set())
        commands[current].update(re.findall(r"--[a-z][a-z-]*", line))
    assert set(commands) == {"demo", "presets", "check", "explain", "transform", ""}
    for command, options in commands.items():
        with pytest.raises(SystemExit) as info:
            main([command, "--help"] if command else ["--help"])
        assert info.value.code == 0
        help_text = capsys.readouterr().out
        missing = sorted(option for option in options if option not in help_text)
        assert not missing, (command, missing)
    demo_line = next(line for line in lines if line.startswith("orthofx demo"))
    defaults = dict(re.findall(r"--([a-z-]+) (\S+?)\]?(?=\s|$)", demo_line))
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())
    for option, value in defaults.items():
        assert f"(default: {value})" in help_text.split(f"--{option} ", 1)[1].split(" --", 1)[0], (option, value)


# ------------------------------------------------------------------------------------------- train / eval


def test_train_eval_block_prints_what_its_comment_says():
    """The block's comment after ``print(...)`` is the line it prints."""
    block = block_with("python", "manifest_of(gm).capture.summary()")
    comment = block.split("summary())", 1)[1].split("#", 1)[1].strip()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "<README train/eval block>", "exec"), {})
    assert out.getvalue().strip() == comment
