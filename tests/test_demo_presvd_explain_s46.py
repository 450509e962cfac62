"""``orthofx demo`` attaches its optimizer (the Riemannian updates, NOG and OLR run in it, as README tells users to
do), and ``explain`` says where ``pre_svd``'s ``weight: orthogonal`` will put L_orth on a layer instead of the hard
orthogonal layer, as ``transform`` then records."""

import textwrap
import warnings

import pytest
import torch
from torch import nn

import orthofx
import orthofx.cli
from orthofx.cli import main
from orthofx.transform import manifest_of

# ------------------------------------------------------------------------------------------------------ demo


@pytest.fixture
def demo_run(monkeypatch, capsys):
    """Run ``orthofx demo`` in-process; returns ``(exit status, stdout, stderr, transformed model, optimizer)``,
    the model and optimizer the demo trained (recorded by wrapping the demo's ``transform`` and torch's Adam)."""
    pytest.importorskip("sklearn")
    seen = {}
    transform = orthofx.cli.transform

    def recording_transform(*args, **kwargs):
        seen["gm"] = transform(*args, **kwargs)
        return seen["gm"]

    class RecordingAdam(torch.optim.Adam):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["optimizer"] = self

    monkeypatch.setattr(orthofx.cli, "transform", recording_transform)
    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)

    def run(*argv):
        code = main(["demo", *argv])
        out, err = capsys.readouterr()
        return code, out, err, seen.get("gm"), seen.get("optimizer")

    return run


def _singular_values(weight: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(weight.detach().to(torch.float64).reshape(weight.shape[0], -1))


def test_demo_keeps_riemannian_weights_orthogonal(demo_run, tmp_path):
    # the demo trained the weights of the 'riemannian' sites as plain parameters, warning (orthofx's own warning)
    # that no optimizer was attached: its report labelled them riemannian with singular values 0.29..3.2
    source = tmp_path / "digits_mlp.py"
    source.write_text(textwrap.dedent("""
        import torch.nn as nn
        def model():
            return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                                 nn.Linear(64, 10))
    """))
    code, out, err, gm, _ = demo_run("--model", str(source), "--policy", "isometric", "--steps", "30",
                                     "--batch-size", "16")
    assert code == 0, err
    assert "no optimizer was attached" not in err and "warning" not in err
    sites = [c.site for c in manifest_of(gm).changes if c.pass_name == "riemannian"]
    assert sites == ["1", "3"]
    for site in sites:
        weight = gm.get_submodule(site).weight
        sigma = _singular_values(weight)
        assert (sigma - 1).abs().max() < 1e-4, (site, sigma.min(), sigma.max())
    assert "Riemannian update at '1', '3'" in out  # the demo says what attach runs


def test_demo_runs_nog_and_olr(demo_run):
    # the svd preset's NOG + OLR on gcp_cnn's Pre-SVD layer never ran: Adam stepped the raw gradient at the base lr
    code, out, err, gm, optimizer = demo_run("--model", "gcp_cnn", "--policy", "svd", "--steps", "3",
                                             "--batch-size", "16")
    assert code == 0, err
    assert "no optimizer was attached" not in err
    weight = gm.get_submodule("conv_last").weight
    # NOG: the gradient the last step used is its polar factor (every singular value 1; the raw one's are not)
    sigma = _singular_values(weight.grad)
    assert (sigma - 1).abs().max() < 1e-5, sigma
    # OLR: the weight alone in its own param group, its base lr restored after the step, the lr of the step recorded
    group = next(g for g in optimizer.param_groups if any(p is weight for p in g["params"]))
    assert group.get("orthofx_olr") == "conv_last" and len(group["params"]) == 1
    assert group["lr"] == 0.01 and 0 < group["orthofx_olr_lr"] <= 0.01
    assert "OLR at 'conv_last'" in out


def test_demo_step_a_hook_refuses_is_a_failed_run_not_bad_input(demo_run, tmp_path):
    # with the hooks attached, a Riemannian step gone inf is refused inside optimizer.step() by an OrthofxError,
    # whose exit status 2 says bad input: the demo's input was valid and its training failed (status 1)
    source = tmp_path / "square.py"
    source.write_text("import torch.nn as nn\nmodel = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.Tanh(), "
                      "nn.Linear(64, 10))\n")
    code, out, err, _, _ = demo_run("--model", str(source), "--policy", "isometric", "--steps", "2",
                                    "--batch-size", "8", "--lr", "1e308")
    assert code == 1 and "test accuracy" not in out
    last = err.split("\n")[-2]
    assert last.startswith("orthofx: error: training stopped at step 1 of 2, in optimizer.step(): riemannian: ")
    assert "NaN or inf" in last


# --------------------------------------------------------------------------------- pre_svd weight: orthogonal

_ORTHOGONAL = {"name": "presvd", "match": {"feeds": "linalg.eigh"}, "apply": "pre_svd",
               "with": {"weight": "orthogonal"}}


class _FeedsEigh(nn.Module):
    """``layer`` (a conv on 4 x 8 x 8 inputs, or a Linear on 8 features) feeding ``linalg.eigh`` of the covariance
    of its output channels; ``twin``, where given, a Linear sharing its weight."""

    def __init__(self, layer: nn.Module, twin: bool = False):
        super().__init__()
        self.pre = nn.Linear(8, 8) if isinstance(layer, nn.Linear) else nn.Conv2d(4, layer.in_channels, 1)
        self.layer = layer
        self.images = not isinstance(layer, nn.Linear)  # not h.dim(): symbolic tracing takes no tensor branch
        self.twin = None
        if twin:
            self.twin = nn.Linear(layer.in_features, layer.out_features)
            self.twin.weight = layer.weight

    def forward(self, x):
        h = self.layer(torch.tanh(self.pre(x)))
        f = h.flatten(2) if self.images else h.T.unsqueeze(0)
        cov = f @ f.transpose(1, 2) / f.shape[-1] + 1e-3 * torch.eye(f.shape[1])
        out = torch.linalg.eigh(cov)[0].sum()
        return out + self.twin(x).sum() if self.twin is not None else out


def _explained_and_transformed(model: nn.Module, policy: dict, x: torch.Tensor):
    """``{(site, rule): explain's row status}`` and ``{(site, rule): the Change}`` of the pre_svd sites."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = orthofx.explain(model, policy, example_inputs=(x,))
        gm = orthofx.transform(model, policy, example_inputs=(x,))
    rows = {(r["site"], r["rule"]): r["status"] for r in plan.rows() if r["pass"] == "pre_svd"}
    changes = {(c.site, c.rule): c for c in manifest_of(gm).changes if c.pass_name == "pre_svd"}
    return rows, changes


_IMAGES = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
_FEATURES = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))

_FALLBACKS = {
    # P0 Theorem 4: 1 x 1 at stride 2 maps 4 * 4 inputs per window to 8 outputs (neither RO nor CO)
    "strided 1x1": (lambda: _FeedsEigh(nn.Conv2d(4, 8, 1, stride=2)), _IMAGES,
                    "no orthogonal convolution exists (P0 Theorem 4)"),
    # a stride-1 depthwise conv: its orthogonal versions are fixed signed shifts, none of which trains
    "depthwise": (lambda: _FeedsEigh(nn.Conv2d(8, 8, 3, padding=1, groups=8)), _IMAGES,
                  "no trainable orthogonal convolution exists"),
    # a hard layer holds its own parameters: the twin would keep the old weight
    "tied": (lambda: _FeedsEigh(nn.Linear(8, 8), twin=True), _FEATURES, "its weight is tied to twin"),
}


@pytest.mark.parametrize("case", sorted(_FALLBACKS))
def test_explain_says_where_weight_orthogonal_falls_back_to_lorth(case):
    # explain said plain 'apply' where transform put L_orth on the layer (saying so only in its manifest)
    make, x, reason = _FALLBACKS[case]
    torch.manual_seed(0)
    rows, changes = _explained_and_transformed(make(), {"rules": [_ORTHOGONAL]}, x)
    change = changes[("layer", "presvd")]
    assert change.status.startswith(f"L_orth (fallback: {reason}")
    assert rows == {("layer", "presvd"): f"apply: L_orth instead: {change.after['fallback']}"}
    assert change.after["fallback"].startswith(reason)


def test_explain_says_a_layer_convnorm_wrapped_first_gets_lorth():
    policy = {"rules": [{"name": "cn", "match": {"type": "Conv2d", "name": "layer"}, "apply": "convnorm"},
                        _ORTHOGONAL]}
    torch.manual_seed(0)
    rows, changes = _explained_and_transformed(_FeedsEigh(nn.Conv2d(8, 8, 3, padding=1)), policy, _IMAGES)
    change = changes[("layer", "presvd")]
    assert change.status.startswith("L_orth (fallback: the layer is a ConvNormConv2d now")
    assert rows == {("layer", "presvd"): f"apply: L_orth instead: {change.after['fallback']}"}


@pytest.mark.parametrize("make, x", [
    (lambda: _FeedsEigh(nn.Conv2d(8, 8, 3, padding=1)), _IMAGES),
    (lambda: _FeedsEigh(nn.Conv2d(8, 16, 3, padding=1, groups=2)), _IMAGES),  # 4 -> 8 channels per group: trains
    (lambda: _FeedsEigh(nn.Linear(8, 8)), _FEATURES),
])
def test_explain_still_says_apply_where_the_hard_layer_is_built(make, x):
    torch.manual_seed(0)
    rows, changes = _explained_and_transformed(make(), {"rules": [_ORTHOGONAL]}, x)
    assert changes[("layer", "presvd")].status.startswith("orthogonal")
    assert rows == {("layer", "presvd"): "apply"}


def test_hard_layer_problem_is_the_one_reason_of_explain_and_apply():
    from orthofx.passes.orthogonal_conv import _impossibility
    from orthofx.passes.pre_svd import hard_layer_problem

    conv = nn.Conv2d(4, 8, 1, stride=2)
    assert hard_layer_problem(conv, "c", "keep") == _impossibility(conv, "keep") is not None
    assert hard_layer_problem(nn.Conv2d(8, 8, 3, padding=1), "c", "keep") is None
    # circular padding of another output size than the conv's own: orthogonal_conv refuses it too
    assert "padding" in hard_layer_problem(nn.Conv2d(8, 8, 3), "c", "circular")
    model = _FeedsEigh(nn.Linear(8, 8), twin=True)
    owners = orthofx.passes.base.parameter_owners(model)
    assert hard_layer_problem(model.layer, "layer", "keep") is None  # no owners given: ties left out
    assert hard_layer_problem(model.layer, "layer", "keep", owners) == (
        "its weight is tied to twin (a hard orthogonal layer would untie them)")


@pytest.mark.parametrize("case, params", [("depthwise", {"weight": "orthogonal"}), ("tied", {"weight": "orthogonal"}),
                                          ("tied", {"weight": "none", "nog": False, "olr": False})])
def test_a_meta_layer_is_refused_before_any_pass_whatever_the_outcome(case, params):
    # pre_svd reads the weight's values whatever it does (its orthogonality error, in the Change): an outcome of its
    # own (L_orth instead, left unchanged) kept planning's MetaWeightError from being given, and transform failed
    # inside torch ("Tensor.item() cannot be called on meta tensors") after the passes before it had run
    with torch.device("meta"):
        model = _FALLBACKS[case][0]()
    policy = {"rules": [{**_ORTHOGONAL, "with": params}]}
    rows = {r["site"]: r["status"] for r in orthofx.explain(model, policy).rows()}
    assert rows["layer"].startswith("apply: fails: pre_svd ") and rows["layer"].endswith("on the meta device")
    with pytest.raises(orthofx.errors.MetaWeightError, match="rule 'presvd': layer .*meta device"):
        orthofx.transform(model, policy)
