"""Transformed models on a CUDA device (skipped where there is none; CI has none).

Issue 6, part 3: a transformed model moves with ``.to(device)`` and runs there (orthofx's layers create no
tensors on a fixed device), trains with the penalty and the optimizer hooks, keeps orthogonality, runs under
``torch.autocast`` with bfloat16 (orthogonal kernels built in float32, decompositions in float32 or float64), and
compiles with inductor (``fullgraph=True``) to the eager outputs. Every check compares the CUDA run with the
same computation on the CPU or with an exact reference, so none of them can pass by construction.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import orthofx
from orthofx import metrics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MODELS = {"small_cnn": {"width": 8}, "gcp_cnn": {"width": 8, "dim": 8}, "deep_mlp": {"depth": 4, "width": 16},
          "dbn_cnn": {"width": 8}, "resnet18": {"width": 8}}
CELLS = [
    ("lorth", "small_cnn"), ("orthogonal", "small_cnn"), ("convnorm", "small_cnn"), ("isometric", "small_cnn"),
    ("jacobian", "deep_mlp"), ("isometric", "deep_mlp"), ("orthogonal", "deep_mlp"),
    ("svd", "gcp_cnn"), ("svd", "dbn_cnn"), ("orthogonal", "gcp_cnn"),
]
BATCH = 8


def _setup(preset, name, seed=0):
    torch.manual_seed(seed)
    model = orthofx.models.get(name, **MODELS[name])
    x = orthofx.models.example_input(name, batch=BATCH)
    y = torch.arange(BATCH) % orthofx.models.num_classes(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = orthofx.transform(model, preset, example_inputs=(x,))
    return gm, x, y


@pytest.fixture(autouse=True)
def _strict_fp32():
    """fp32 on the GPU means fp32 here: TF32 would make CPU/GPU comparisons and orthogonality figures loose."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("preset,name", CELLS, ids=[f"{p}-{m}" for p, m in CELLS])
def test_moves_to_cuda_and_matches_cpu(preset, name):
    gm, x, y = _setup(preset, name)
    gm.eval()
    with torch.no_grad():
        expected = gm(x)
    gpu = gm.to("cuda")
    with torch.no_grad():
        out = gpu(x.cuda())
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=1e-4)
    # no orthofx buffer or parameter stayed behind on the CPU
    stray = [n for n, t in list(gpu.named_parameters()) + list(gpu.named_buffers()) if t.device.type != "cuda"]
    assert not stray, stray


@pytest.mark.parametrize("preset,name", CELLS, ids=[f"{p}-{m}" for p, m in CELLS])
def test_trains_on_cuda_like_on_cpu(preset, name):
    """Three SGD steps with the penalty and attached hooks give the same losses on both devices."""
    losses = {}
    for device in ("cpu", "cuda"):
        gm, x, y = _setup(preset, name)
        gm = gm.to(device)
        x, y = x.to(device), y.to(device)
        optimizer = torch.optim.SGD(gm.parameters(), lr=1e-2, momentum=0.9)
        handle = orthofx.attach(optimizer, gm)
        gm.train()
        seq = []
        for step in range(3):
            torch.manual_seed(100 + step)  # the Jacobian probes draw from the global generator
            loss = F.cross_entropy(gm(x), y) + orthofx.penalty(gm)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seq.append(float(loss))
        handle.remove()
        losses[device] = seq
    assert all(torch.isfinite(torch.tensor(losses["cuda"])))
    if preset == "jacobian":
        # Rademacher probes come from different generators on the two devices: same scale, not same values
        assert abs(losses["cuda"][0] - losses["cpu"][0]) <= 0.5 * abs(losses["cpu"][0])
    else:
        torch.testing.assert_close(torch.tensor(losses["cuda"]), torch.tensor(losses["cpu"]), atol=2e-3, rtol=2e-3)


def test_orthogonal_layers_stay_orthogonal_on_cuda_under_bf16_autocast():
    gm, x, y = _setup("orthogonal", "small_cnn")
    gm = gm.cuda().train()
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.05)
    x, y = x.cuda(), y.cuda()
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = gm(x)
            loss = F.cross_entropy(out.float(), y)
        assert out.dtype == torch.bfloat16
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    layers = {n: m for n, m in gm.named_modules() if type(m).__name__ == "OrthogonalConv2d"}
    assert layers
    for n, m in layers.items():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            w = m.weight
        assert w.dtype == torch.float32, n
        sv = metrics.conv_singular_values(w.detach().double().cpu(), 8, stride=m.stride[0])
        assert float((sv - 1).abs().max()) <= 1e-5, (n, float((sv - 1).abs().max()))


def test_svd_preset_under_bf16_autocast_on_cuda_is_finite_and_monitored():
    gm, x, y = _setup("svd", "gcp_cnn")
    gm = gm.cuda().train()
    x, y = x.cuda(), y.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(gm(x).float(), y) + orthofx.penalty(gm)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in gm.parameters() if p.grad is not None)
    assert "kappa" in str(orthofx.report(gm)).lower()


#: torch 2.11 on an H200 (session 12): the compiled Jacobian estimate of the ResNet-18 (BatchNorm in its blocks)
#: differed from eager with inductor, by 1e-4-5e-4 of the penalty and up to 9 % of a gradient's largest entry, on
#: some calls and not others (it depended on the BatchNorm running statistics; calls after two training calls
#: matched). The same graph with aot_eager on CUDA, and inductor on CPU (torch 2.13), match a float64 reference to
#: 1e-5 on every call: an inductor CUDA code-generation fault, not yet reduced to a torch report.
_INDUCTOR_CUDA_BN_JACOBIAN = pytest.mark.xfail(
    reason="torch 2.11 inductor on CUDA: the compiled Jacobian estimate through BatchNorm blocks differs from eager "
           "on some calls (see the comment above)", strict=False)


@pytest.mark.parametrize("preset,name,backend", [
    ("orthogonal", "small_cnn", "inductor"), ("lorth", "small_cnn", "inductor"), ("convnorm", "small_cnn", "inductor"),
    ("svd", "gcp_cnn", "inductor"), ("jacobian", "deep_mlp", "inductor"), ("jacobian", "resnet18", "aot_eager"),
    pytest.param("jacobian", "resnet18", "inductor", marks=_INDUCTOR_CUDA_BN_JACOBIAN)])
def test_compiled_fullgraph_matches_eager_on_cuda(preset, name, backend, fixed_probe_signs):
    gm, x, y = _setup(preset, name)
    gm = gm.cuda().train()
    x, y = x.cuda(), y.cuda()

    def loss_fn(inputs):
        return F.cross_entropy(gm(inputs), y) + orthofx.penalty(gm)

    torch._dynamo.reset()
    try:
        compiled = fixed_probe_signs.from_first_probe(torch.compile(loss_fn, fullgraph=True, backend=backend))
        got = compiled(x)
        got.backward()
        grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}
        gm.zero_grad(set_to_none=True)
        expected = fixed_probe_signs.from_first_probe(loss_fn)(x)
        expected.backward()
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    for n, p in gm.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, atol=1e-4 * max(1.0, float(p.grad.abs().max())),
                                       rtol=1e-3, msg=lambda m: f"{n}: {m}")
    gm.zero_grad(set_to_none=True)


@pytest.mark.parametrize("preset", ["convnorm", "lorth", "orthogonal"])
def test_inductor_under_bf16_autocast_matches_eager_on_cuda(preset):
    # ConvNorm's FFT once met a bfloat16 conv output here and inductor could not trace it
    gm, x, y = _setup(preset, "small_cnn")
    gm = gm.cuda().train()
    x, y = x.cuda(), y.cuda()

    def loss_fn(inputs):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return F.cross_entropy(gm(inputs).float(), y) + orthofx.penalty(gm)

    torch._dynamo.reset()
    try:
        got = torch.compile(loss_fn, fullgraph=True)(x)
        expected = loss_fn(x)
    finally:
        torch._dynamo.reset()
    assert torch.isfinite(got)
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)


def test_frozen_model_on_cuda_matches_transformed():
    gm, x, _ = _setup("orthogonal", "small_cnn")
    gm = gm.cuda().eval()
    frozen = orthofx.freeze(gm)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x.cuda()), gm(x.cuda()), atol=1e-5, rtol=1e-5)
