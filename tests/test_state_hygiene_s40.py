"""Global-state hygiene and exception safety of orthofx's public calls (session 40).

The README promises no hidden global state and that nothing the user passed in is modified. These tests take a
snapshot of torch's process-wide state (grad / inference / autocast modes, default dtype, threads, deterministic
flags, matmul precision, the functions torch.fx and orthofx patch while tracing, warnings filters, the global random
generator) and of the user's model and inputs (values bit for bit, training flags, requires_grad, hooks), run a
public call that succeeds or raises midway (a bad policy, a forward that raises, a KeyboardInterrupt during
tracing, an unwritable export path), and compare.

The global random generator: ``freeze``, ``export`` and ``load`` draw numbers nobody reads (a plain ``nn.Conv2d``
built for the frozen form draws its default initialisation before its weight is overwritten; ``load`` replays a
policy whose random initialisations the saved weights replace), which shifted the user's random stream: a
checkpoint exported in the middle of training changed the batches and dropout masks of every later step. The
reference there is the same training run without the call.
"""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import orthofx

pytestmark = pytest.mark.usefixtures("one_thread")

# orthofx imports its API on first use (PEP 562), and that import of torch.fx's symbolic shapes imports sympy, which
# adds a warnings filter of its own: resolved here, or the first test of a process (any of them under xdist) saw
# the import's filter as state its call left
for _name in orthofx.__all__:
    getattr(orthofx, _name)


class _Net(nn.Module):
    """Convs and Linears (every preset has sites), a dropout (draws from the global generator in training mode),
    grad-mode and autocast blocks (orthofx patches torch's switches while tracing them)."""

    def __init__(self, raise_in_forward: BaseException | None = None):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)
        self.drop = nn.Dropout(0.25)
        self.raise_in_forward = raise_in_forward

    def forward(self, x):
        with torch.no_grad():
            x = x * 1.0
        with torch.autocast("cpu", enabled=False):
            h = torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3))
        if self.raise_in_forward is not None:
            raise self.raise_in_forward
        return self.head(self.drop(torch.relu(self.fc(h))))


def _model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return _Net(**kwargs)


def _x():
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _autocast_nesting():
    nesting = torch.autocast_increment_nesting() - 1
    torch.autocast_decrement_nesting()
    return nesting


def _global_state():
    autocast = torch.amp.autocast_mode.autocast
    return {
        "default dtype": torch.get_default_dtype(), "grad mode": torch.is_grad_enabled(),
        "inference mode": torch.is_inference_mode_enabled(), "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "deterministic warn only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn.benchmark": torch.backends.cudnn.benchmark, "cudnn.deterministic": torch.backends.cudnn.deterministic,
        "matmul precision": torch.get_float32_matmul_precision(), "anomaly": torch.is_anomaly_enabled(),
        "autocast cpu": (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")),
        # a block left open keeps torch's cache of weight casts for good (see tests/test_test_isolation_s41.py)
        "autocast nesting": _autocast_nesting(), "autocast cache": torch.is_autocast_cache_enabled(),
        "torch._C._set_grad_enabled": torch._C._set_grad_enabled,
        "autocast.__enter__/__exit__": (autocast.__enter__, autocast.__exit__),
        "Module.__call__/__getattr__": (nn.Module.__call__, nn.Module.__getattr__),
        "warnings filters": list(warnings.filters),
        "rng": torch.get_rng_state(),
    }


def _assert_same_global_state(before, after):
    changed = [key for key in before
               if not (torch.equal(before[key], after[key]) if key == "rng" else before[key] == after[key])]
    assert not changed, f"global state changed: {changed}"


def _user_state(model, inputs):
    return {
        "values": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "versions": {n: p._version for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                      len(m._state_dict_hooks), len(m._load_state_dict_pre_hooks)) for n, m in model.named_modules()},
        "attributes": {n: sorted(vars(m)) for n, m in model.named_modules()},
        "inputs": [t.clone() for t in inputs],
        "input versions": [t._version for t in inputs],
    }


def _assert_same_user_state(before, after):
    for key in ("versions", "training", "requires_grad", "hooks", "attributes", "input versions"):
        assert before[key] == after[key], key
    for name, value in before["values"].items():
        assert torch.equal(value, after["values"][name]), name
    for a, b in zip(before["inputs"], after["inputs"]):
        assert torch.equal(a, b)


def _call_leaves_state(call, model, inputs, raises=None):
    """Run ``call()``; the global and the user's state after it (and the exception, ``raises``) as before."""
    model.c1.weight.requires_grad_(False)  # a mix of flags, hooks and modes that a careless copy would reset
    model.fc.register_forward_pre_hook(lambda module, args: None)
    model.drop.eval()
    torch.manual_seed(123)
    glob, user = _global_state(), _user_state(model, inputs)
    if raises is None:
        call()
    else:
        with pytest.raises(raises):
            call()
    _assert_same_global_state(glob, _global_state())
    _assert_same_user_state(user, _user_state(model, inputs))


# ----------------------------------------------------------------- the global random generator (fixed here)

def _orthogonal_gm():
    model = _model().eval()
    return orthofx.transform(model, "orthogonal", example_inputs=(_x(),))


@pytest.mark.parametrize("preset", ["orthogonal", "convnorm"])
def test_freeze_leaves_the_global_generator(preset):
    gm = orthofx.transform(_model().eval(), preset, example_inputs=(_x(),))
    torch.manual_seed(5)
    before = torch.get_rng_state()
    frozen = orthofx.freeze(gm, (_x(),))
    assert torch.equal(torch.get_rng_state(), before)
    torch.testing.assert_close(frozen(_x()), gm.eval()(_x()), rtol=1e-5, atol=1e-5)  # still the same function


def test_export_pt2_leaves_the_global_generator(tmp_path):
    gm = _orthogonal_gm()
    torch.manual_seed(5)
    before = torch.get_rng_state()
    result = orthofx.export(gm, tmp_path / "m.pt2", (_x(),))
    assert torch.equal(torch.get_rng_state(), before)
    assert result.max_abs_diff < 1e-5


def test_failed_freeze_leaves_the_global_generator():
    gm = _orthogonal_gm()
    wrong = torch.zeros(4, 5, 8, 8)  # 5 channels: the model fails on them
    torch.manual_seed(5)
    before = _global_state()
    with pytest.raises(orthofx.ExportError):
        orthofx.freeze(gm, (wrong,))  # fails inside the forward's autocast block
    _assert_same_global_state(before, _global_state())


@pytest.mark.parametrize("preset", ["orthogonal", "isometric"])
def test_load_leaves_the_global_generator(tmp_path, preset):
    gm = orthofx.transform(_model().eval(), preset, example_inputs=(_x(),))
    orthofx.export(gm, tmp_path / "m.pt")
    fresh = _model(seed=7).eval()
    torch.manual_seed(5)
    before = torch.get_rng_state()
    restored = orthofx.load(fresh, tmp_path / "m.pt", (_x(),))
    assert torch.equal(torch.get_rng_state(), before)
    torch.testing.assert_close(restored.eval()(_x()), gm.eval()(_x()), rtol=0, atol=0)


def _train(gm, steps, checkpoint_at=None, path=None):
    """A few SGD steps with dropout and random batches from the global generator; at ``checkpoint_at`` the model
    is exported (``.pt2``, which freezes it) and written to ``.pt`` and loaded back, as a training script saving
    checkpoints would."""
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.05)
    gm.train()
    fresh = _model().eval()  # the original model, for load
    torch.manual_seed(11)
    data = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    for step in range(steps):
        if step == checkpoint_at:
            orthofx.export(gm, path / "ckpt.pt2", (_x(),))
            orthofx.export(gm, path / "ckpt.pt")
            orthofx.load(fresh, path / "ckpt.pt", (_x(),))
            gm.train()
        index = torch.randint(0, 32, (8,))
        loss = gm(data[index]).square().mean() + orthofx.penalty(gm)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in gm.state_dict().items()}


def test_checkpoint_export_in_the_middle_of_training_changes_nothing(tmp_path):
    """The reference is the same run without the checkpoint: the export must not move the random stream that
    draws the later batches and dropout masks."""
    plain = _train(_orthogonal_gm(), 3)
    checkpointed = _train(_orthogonal_gm(), 3, checkpoint_at=1, path=tmp_path)
    for name, value in plain.items():
        assert torch.equal(value, checkpointed[name]), name


def test_freeze_in_a_thread_does_not_rewind_the_main_threads_draws():
    """A checkpoint frozen in a background thread while training draws: forking the generators around freeze put
    the global state back when it ended, so the main thread drew again numbers it had drawn meanwhile (50 of 50
    repeated); freeze now draws nothing and forks only around its runs of the model on example inputs (none here:
    an orthogonal model needs none to freeze)."""
    import threading
    gm = _orthogonal_gm()
    torch.manual_seed(1)
    started, done = threading.Event(), threading.Event()

    def background():
        started.set()
        orthofx.freeze(gm)
        done.set()

    thread = threading.Thread(target=background)
    thread.start()
    started.wait()
    drawn = []
    while not done.is_set():
        drawn.append(torch.rand(1, dtype=torch.float64))  # 53 random bits: no repeat by chance
    thread.join()
    drawn += [torch.rand(1, dtype=torch.float64) for _ in range(50)]
    values = torch.cat(drawn)
    assert values.unique().numel() == values.numel()  # no number drawn twice


class _NoisyInEval(nn.Module):
    """Draws in eval mode too (noise injection): freeze's and export's runs on the example inputs draw."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        h = self.conv(x)
        return h + 0.01 * torch.randn_like(h)


@pytest.mark.parametrize("suffix", [None, ".pt2"])
def test_freeze_and_export_of_a_model_drawing_in_eval_leave_the_generator(tmp_path, suffix):
    torch.manual_seed(0)
    gm = orthofx.transform(_NoisyInEval().eval(), "lorth", example_inputs=(_x(),))
    torch.manual_seed(5)
    before = torch.get_rng_state()
    if suffix is None:
        orthofx.freeze(gm, (_x(),))
    else:
        orthofx.export(gm, tmp_path / f"m{suffix}", (_x(),))
    assert torch.equal(torch.get_rng_state(), before)


def test_kept_generator_follows_the_wrapped_functions_signature():
    """The fork wraps freeze / export / load without hiding their signature or docstring (help(), docs)."""
    import inspect
    for function in (orthofx.freeze, orthofx.export, orthofx.load):
        assert "example_inputs" in inspect.signature(function).parameters
        assert function.__doc__ and function.__module__ == "orthofx.export"


# -------------------------------------------------------- global and user state: guards for what already holds

def test_transform_and_explain_leave_state_on_success():
    model, x = _model(), _x()
    # "lorth" draws nothing (the presets that build layers or initialise at random use the generator, see the
    # isometric_init documentation and the report of this session)
    _call_leaves_state(lambda: orthofx.transform(model, "lorth", example_inputs=(x,)), model, (x,))
    _call_leaves_state(lambda: orthofx.explain(model, "orthogonal", example_inputs=(x,)), model, (x,))


def test_seeded_isometric_init_leaves_the_global_generator():
    """The documented promise: with a seed, isometric_init's matrices come from a private generator."""
    model, x = _model(), _x()
    policy = {"orthofx": 1, "rules": [{"match": {"type": ["Conv2d", "Linear"]}, "apply": "isometric_init",
                                       "with": {"seed": 3}}]}
    _call_leaves_state(lambda: orthofx.transform(model, policy, example_inputs=(x,)), model, (x,))


@pytest.mark.parametrize("policy, error", [
    ({"orthofx": 1, "rules": [{"match": {"type": "Conv2d"}, "apply": "no_such_pass"}]}, orthofx.PolicyError),
    ({"orthofx": 1, "rules": [{"match": {"type": "Conv2d"}, "apply": "orth_regularizer", "with": {"weight": -1}}]},
     orthofx.PolicyError),
    ({"orthofx": 1, "rules": [{"match": {"type": "GRU"}, "apply": "orth_regularizer"}]}, orthofx.PlanError),
])
def test_refused_policies_leave_state(policy, error):
    model, x = _model(), _x()
    _call_leaves_state(lambda: orthofx.transform(model, policy, example_inputs=(x,)), model, (x,), raises=error)


@pytest.mark.parametrize("exc, error", [(RuntimeError("boom"), orthofx.CaptureError),
                                        (KeyboardInterrupt(), KeyboardInterrupt)])
def test_forward_raising_while_traced_leaves_state(exc, error):
    """Raised inside the forward's no_grad / autocast blocks as the capture traces them (orthofx has patched
    torch._C._set_grad_enabled and autocast.__enter__ / __exit__ then, torch.fx nn.Module.__call__)."""
    model, x = _model(raise_in_forward=exc), _x()
    _call_leaves_state(lambda: orthofx.transform(model, "lorth", example_inputs=(x,)), model, (x,), raises=error)


def test_interrupt_inside_transform_leaves_state(monkeypatch):
    import importlib
    transform_module = importlib.import_module("orthofx.transform")  # the module, not the function
    model, x = _model(), _x()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(transform_module, "_capture_and_plan", interrupted)
    _call_leaves_state(lambda: orthofx.transform(model, "lorth", example_inputs=(x,)), model, (x,),
                       raises=KeyboardInterrupt)


def test_transform_inside_modes_keeps_them():
    model, x = _model(), _x()

    def in_modes():
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            orthofx.transform(model, "lorth", example_inputs=(x,))
            assert torch.is_autocast_enabled("cpu") and not torch.is_grad_enabled()
        with torch.inference_mode():
            orthofx.transform(model, "lorth", example_inputs=(x,))
            assert torch.is_inference_mode_enabled()

    _call_leaves_state(in_modes, model, (x,))


def test_failed_exports_leave_state(tmp_path):
    gm = orthofx.transform(_model(), "lorth", example_inputs=(_x(),))
    x = _x()
    unwritable = tmp_path / "missing-dir" / "m.pt2"
    _call_leaves_state(lambda: orthofx.export(gm, unwritable, (x,)), gm, (x,), raises=orthofx.ExportError)
    _call_leaves_state(lambda: orthofx.export(gm, tmp_path / "m.xyz", (x,)), gm, (x,), raises=orthofx.ExportError)
    other = _model()
    _call_leaves_state(lambda: orthofx.load(other, tmp_path / "none.pt", (x,)), gm, (x,),
                       raises=orthofx.ExportError)


def test_penalty_report_attach_freeze_leave_state():
    x = _x()
    gm = orthofx.transform(_model(), "lorth", example_inputs=(x,))
    _call_leaves_state(lambda: orthofx.penalty(gm), gm, (x,))
    _call_leaves_state(lambda: str(orthofx.report(gm)), gm, (x,))
    _call_leaves_state(lambda: orthofx.freeze(gm, (x,)), gm, (x,))
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    _call_leaves_state(lambda: orthofx.attach(optimizer, gm).remove(), gm, (x,))


# ------------------------------------------------------------------------------ concurrency (not fixed here)

_CONCURRENT = textwrap.dedent("""
    import threading
    import torch, orthofx
    from torch import nn

    originals = (torch._C._set_grad_enabled, torch.amp.autocast_mode.autocast.__enter__, nn.Module.__call__)
    # thread 0 traces first and finishes first while thread 1 is still tracing: the patches are undone in the
    # order they were made, not the reverse (with the transforms serialised, thread 0's wait times out once)
    traced, finished = [threading.Event(), threading.Event()], threading.Event()

    class Net(nn.Module):
        def __init__(self, i):
            super().__init__()
            self.i, self.a, self.b = i, nn.Linear(4 + i, 4 + i), nn.Linear(4 + i, 4 + i)

        def forward(self, x):
            with torch.no_grad():
                h = self.a(x)
            if not traced[self.i].is_set():  # the first trace only (a transform runs the forward again)
                traced[self.i].set()
                (traced[1] if self.i == 0 else finished).wait(timeout=2.0)
            with torch.no_grad():
                h = h + 1
            return self.b(h)

    def run(i, out):
        torch.manual_seed(i)
        try:
            if i == 1:
                traced[0].wait(timeout=2.0)
            out[i] = orthofx.transform(Net(i), "lorth", example_inputs=(torch.randn(2, 4 + i),)).code
        except Exception as exc:
            out[i] = exc
        if i == 0:
            finished.set()

    concurrent, sequential = {}, {}
    threads = [threading.Thread(target=run, args=(i, concurrent)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    now = (torch._C._set_grad_enabled, torch.amp.autocast_mode.autocast.__enter__, nn.Module.__call__)
    restored = [a is b for a, b in zip(originals, now)]
    for event in (*traced, finished):
        event.set()
    for i in range(2):
        run(i, sequential)
    print("RESULT", restored, concurrent == sequential, [type(v).__name__ for v in concurrent.values()])
""")


def test_concurrent_transforms_match_sequential_and_restore_torch():
    """Run in a subprocess: the failure leaves torch patched for the rest of the process."""
    done = subprocess.run([sys.executable, "-c", _CONCURRENT], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    line = [row for row in done.stdout.splitlines() if row.startswith("RESULT")]
    assert line, done.stderr[-2000:]
    assert line[0] == "RESULT [True, True, True] True ['str', 'str']", line[0]


class _Gate(nn.Module):
    """Identity. With ``wait``, its first call (one of the Jacobian estimate's extra forward passes: the probe
    estimates before it runs the block) signals ``entered`` and waits for ``release``."""

    def __init__(self, entered=None, release=None):
        super().__init__()
        self.entered, self.release, self.calls = entered, release, 0

    def forward(self, x):
        self.calls += 1
        if self.entered is not None and self.calls == 1:
            self.entered.set()
            self.release.wait(timeout=5.0)
        return x


def _probe(gate):
    from orthofx.nn.jacobian import JacobianProbe
    torch.manual_seed(0)
    return JacobianProbe(nn.Sequential(nn.Linear(4, 4), gate, nn.Tanh()), seed=0).train()


def test_probe_estimates_while_another_thread_estimates():
    """Two models trained in two threads: each probe's estimate is its own; the reference is the same call made
    alone."""
    import threading
    entered, release = threading.Event(), threading.Event()
    busy, probe = _probe(_Gate(entered, release)), _probe(_Gate())
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
    other = threading.Thread(target=busy, args=(x,))
    other.start()
    try:
        assert entered.wait(timeout=5.0)
        probe(x)
    finally:
        release.set()
        other.join()
    alone = _probe(_Gate())
    alone(x)
    assert probe.estimate is not None
    torch.testing.assert_close(probe.estimate, alone.estimate)
