"""``orthofx.explain`` says what ``orthofx.transform`` will do: sites on the meta device that a pass needs the weight
values of (transform refuses them before any pass runs), the sites whose scale a Stiefel constraint undoes
(ScaleLostWarning), the sites ``riemannian``'s ``free`` leaves unconstrained; and a differential check of explain
against transform over presets and random policies (what each says per site, no change to the model, no extra run
of it, the same error type)."""

import random
import warnings

import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import MetaWeightError
from orthofx.policy import presets
from orthofx.transform import manifest_of
from references import bitwise_equal, state_copy


def _meta(make):
    with torch.device("meta"):
        return make()


def _convs_and_linears():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 4),
                         nn.Tanh(), nn.Linear(4, 4))


def _statuses(plan):
    return {(row["site"], row["rule"]): row["status"] for row in plan.rows()}


# ------------------------------------------------------------------------------------------------ meta device

_READS_VALUES = {  # rule -> what transform raises at the meta layers it selects
    "orthogonal": {"match": {"type": ["Conv2d", "Linear"]}, "apply": "orthogonal_conv"},
    "init": {"match": {"type": ["Conv2d", "Linear"]}, "apply": "isometric_init"},
    "stiefel": {"match": {"type": "Linear", "name": "5"}, "apply": "riemannian"},
}
_READS_NO_VALUES = {
    "lorth": {"match": {"type": ["Conv2d", "Linear"]}, "apply": "orth_regularizer"},
    "convnorm": {"match": {"type": "Conv2d"}, "apply": "convnorm"},
}


@pytest.mark.parametrize("name", sorted(_READS_VALUES))
def test_explain_marks_meta_sites_a_pass_needs_values_of_and_transform_refuses_them(name):
    # explain said 'apply' where transform failed inside torch (isometric_init, riemannian: "Tensor.item() cannot
    # be called on meta tensors") or in from_conv (orthogonal_conv), after the passes before it had run
    rule = {"name": name, **_READS_VALUES[name]}
    plan = orthofx.explain(_meta(_convs_and_linears), {"rules": [rule]})
    statuses = [status for (site, _), status in _statuses(plan).items()]
    assert statuses and all(s.startswith(f"apply: fails: {rule['apply']} ") and s.endswith("on the meta device")
                            for s in statuses), statuses
    first = plan.entries[0]
    with pytest.raises(MetaWeightError, match=rf"rule '{name}': {first.site.name} .*meta device .*to_empty"):
        orthofx.transform(_meta(_convs_and_linears), {"rules": [rule]})


@pytest.mark.parametrize("name", sorted(_READS_NO_VALUES))
def test_passes_that_read_no_weight_values_still_apply_to_meta_layers(name):
    rule = {"name": name, **_READS_NO_VALUES[name]}
    plan = orthofx.explain(_meta(_convs_and_linears), {"rules": [rule]})
    assert set(_statuses(plan).values()) == {"apply"}
    gm = orthofx.transform(_meta(_convs_and_linears), {"rules": [rule]})
    assert [c.site for c in manifest_of(gm).changes] == [e.site.name for e in plan.entries]


def test_a_meta_refusal_comes_before_any_pass_writes_the_model_inplace():
    # convnorm (first rule) used to replace the conv of the user's model before riemannian failed on the meta Linear
    model = _meta(_convs_and_linears)
    conv = model[0]
    policy = {"rules": [{"match": {"type": "Conv2d"}, "apply": "convnorm"},
                        {"name": "stiefel", "match": {"type": "Linear", "name": "5"}, "apply": "riemannian"}]}
    assert _statuses(orthofx.explain(model, policy))[("5", "stiefel")].startswith("apply: fails: riemannian")
    with pytest.raises(MetaWeightError, match=r"rule 'stiefel': 5 \(Linear\(4->4\)\)"):
        orthofx.transform(model, policy, inplace=True)
    assert model[0] is conv and type(model[0]) is nn.Conv2d


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_explain_refuses_example_inputs_for_a_meta_model_as_transform_does(device):
    # with meta inputs the model runs (meta outputs) and transform raised torch's RuntimeError from its output
    # check; explain returned a plan either way
    x = torch.randn(2, 1, 6, 6, device=device)
    errors = []
    for function in (orthofx.explain, orthofx.transform):
        with pytest.raises(orthofx.TransformError, match=r"cannot run on example_inputs: .*meta device .*to_empty") \
                as info:
            function(_meta(_convs_and_linears), "lorth", example_inputs=(x,))
        errors.append(str(info.value))
    assert errors[0] == errors[1]


# -------------------------------------------------------------------------------------------------- scale lost

H = 5


def _linears():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(H, H), nn.Tanh(), nn.Linear(H, H), nn.Tanh(), nn.Linear(H, 3))


def _init(site, **params):
    return {"name": "init", "match": {"name": site}, "apply": "isometric_init", "with": {"seed": 0, **params}}


def _stiefel(site, **params):
    return {"name": "stiefel", "match": {"name": site}, "apply": "riemannian", "with": params}


@pytest.mark.parametrize("order", ["init first", "stiefel first"])
def test_explain_says_which_sites_lose_a_scale_as_transform_and_report_do(order):
    # explain said 'apply' at both rules and nothing of the ScaleLostWarning transform then issued
    rules = [_init(["0", "2"], gain=2.0), _stiefel(["0", "4"], only_square=False)]
    if order == "stiefel first":
        rules.reverse()
    policy = {"rules": rules}
    x = torch.randn(3, H)
    plan = orthofx.explain(_linears(), policy, example_inputs=(x,))
    with pytest.warns(orthofx.ScaleLostWarning) as caught:
        gm = orthofx.transform(_linears(), policy, example_inputs=(x,))
    warned = sorted({str(w.message).split("'")[3] for w in caught if w.category is orthofx.ScaleLostWarning})
    warning_rule = "stiefel" if order == "init first" else "init"
    said = {site for (site, rule), status in _statuses(plan).items()
            if "ScaleLostWarning" in status and rule == warning_rule}
    assert warned == sorted(said) == ["0"]  # '2' is not constrained, '4' has no gain
    # the plan's notes are the report's
    assert plan.notes == [n for n in orthofx.report(gm).notes if "is lost" in n]
    # and the scale is gone on '0' only: its singular values (float64) are 1 at once (init: project) when the
    # constraint comes second, 2 until the first retraction when the initialisation comes second
    svals = {site: torch.linalg.svdvals(gm.get_submodule(site).weight.detach().double()) for site in ("0", "2")}
    torch.testing.assert_close(svals["2"], torch.full((H,), 2.0, dtype=torch.float64))
    expected = 1.0 if order == "init first" else 2.0
    torch.testing.assert_close(svals["0"], torch.full((H,), expected, dtype=torch.float64))


def test_no_scale_note_for_a_frozen_free_or_unscaled_weight():
    model = _linears()
    model[0].weight.requires_grad_(False)  # riemannian leaves a frozen weight as it is: its scale stays
    policy = {"rules": [_init(["0", "2", "4"], activation="relu", frozen="overwrite"),
                        _stiefel(["0", "2"], free="last", only_square=False),
                        {"name": "plain", "match": {"name": "4"}, "apply": "riemannian",
                         "with": {"only_square": False}}]}
    plan = orthofx.explain(model, policy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        orthofx.transform(model, policy)
    lost = [str(w.message) for w in caught if w.category is orthofx.ScaleLostWarning]
    assert len(lost) == 1 and "'4'" in lost[0]
    assert [n.split(":")[0] for n in plan.notes] == ["4"]
    assert _statuses(plan)[("2", "stiefel")] == "apply: left free (unconstrained, free: last)"


# ---------------------------------------------------------------------------------------------- riemannian free

def test_explain_says_the_site_riemannian_leaves_free():
    # explain said 'apply' at the free site, where transform constrains nothing
    model = _linears()
    policy = {"rules": [_stiefel(["0", "2"], free="first")]}
    statuses = _statuses(orthofx.explain(model, policy))
    assert statuses == {("0", "stiefel"): "apply: left free (unconstrained, free: first)", ("2", "stiefel"): "apply"}
    gm = orthofx.transform(model, policy)
    hooked = {hook.site for hook in manifest_of(gm).optimizer_hooks}
    assert hooked == {"2"}
    assert torch.equal(gm.get_submodule("0").weight, model[0].weight)
    w = gm.get_submodule("2").weight.detach().double()
    torch.testing.assert_close(w.T @ w, torch.eye(H, dtype=torch.float64))


# ----------------------------------------------------------------------------------- explain against transform

class _Net(nn.Module):
    runs = 0

    def __init__(self, variant):
        super().__init__()
        self.c1 = nn.LazyConv2d(4, 3, padding=1) if variant == "lazy" else nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.c3 = nn.Conv2d(4, 8, 1, stride=2)
        self.t = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.blk = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
        self.fc = nn.Linear(4, 3)
        self.sq = nn.Linear(4, 4)
        if variant == "tie":
            self.sq.weight = self.blk[0].weight
        if variant == "frozen":
            self.c2.weight.requires_grad_(False)

    def forward(self, x):
        if type(x) is torch.Tensor:  # a real run, not symbolic tracing
            type(self).runs += 1
        h = self.t(self.c3(self.c2(torch.relu(self.c1(x)))))
        h = self.sq(self.blk(h.mean((2, 3))))
        return self.fc(h) + torch.linalg.eigvalsh(h.T @ h / h.shape[0] + torch.eye(4)).sum()


def _random_rule(rng):
    apply = rng.choice(["orth_regularizer", "orthogonal_conv", "riemannian", "isometric_init", "pre_svd",
                        "svd_conditioning", "convnorm", "jacobian_isometry"])
    match = {"type": rng.sample(["Conv2d", "Linear", "ConvTranspose2d"], rng.randint(1, 3))}
    params = {}
    if apply == "orthogonal_conv":
        params = {"method": rng.choice(["auto", "bcop", "rko", "cayley_fft"]),
                  "padding": rng.choice(["circular", "keep"]), "init": rng.choice(["nearest", "random"]),
                  "on_impossible": rng.choice(["error", "skip", "regularize"])}
    elif apply == "riemannian":
        params = {"free": rng.choice(["none", "first", "last"]), "init": rng.choice(["keep", "project"]),
                  "only_square": rng.choice([True, False])}
    elif apply == "isometric_init":
        params = {"gain": rng.choice([1.0, 2.0]), "activation": rng.choice(["linear", "relu"]), "seed": 0}
    elif apply == "pre_svd":
        match = {"feeds": ["linalg.eigvalsh"]}
        params = {"weight": rng.choice(["lorth", "orthogonal", "srip"]), "nog": rng.choice([True, False])}
    elif apply == "svd_conditioning":
        match = {"op": ["linalg.eigvalsh"]}
    elif apply == "convnorm":
        match = {"type": "Conv2d"}
    elif apply == "jacobian_isometry":
        match = {"kind": "block", "name": rng.choice(["blk", "c1"])}
    if rng.random() < 0.3 and "type" in match:
        match["name"] = rng.choice(["c*", "blk.*", "fc", "sq", "t"])
    return {"match": match, "apply": apply, "with": params, "optional": rng.random() < 0.8}


def _tree(model):
    return ([(name, type(m), id(m), m.training) for name, m in model.named_modules()],
            [(name, id(p), p.requires_grad) for name, p in model.named_parameters(remove_duplicate=False)])


def _state(model):
    lazy = [m for m in model.modules() if isinstance(m, nn.modules.lazy.LazyModuleMixin)]
    return state_copy(model) if not lazy else {  # an uninitialised parameter has no values to copy
        k: v.detach().clone() for k, v in model.state_dict().items()
        if not isinstance(v, nn.parameter.UninitializedTensorMixin)}


def _agrees(plan, gm):
    """Each entry of ``plan`` against the Change transform recorded there; the problems found."""
    changes = {}
    for change in manifest_of(gm).changes:
        changes.setdefault((change.site, change.rule), []).append(change.status)
    problems = []
    for entry in plan.entries:
        statuses = changes.pop((entry.site.name, entry.rule_name), None)
        if statuses is None:
            problems.append(f"{entry.site.name}: explain 'apply' ({entry.outcome}), no Change")
            continue
        status, outcome = statuses[0], entry.outcome
        # orthogonal_conv's L_orth is 'regularised (...)', pre_svd's 'L_orth (fallback: ...)' (+ NOG / OLR)
        lorth = ("regularised", "L_orth (fallback")
        expected = (lorth if outcome.startswith("L_orth instead") else
                    ("skipped",) if outcome.startswith("left unchanged") else
                    ("free",) if outcome.startswith("left free") else None)
        if expected is not None and not status.startswith(expected) \
                or expected is None and status.startswith(("skipped", "free") + lorth):
            problems.append(f"{entry.site.name} ({entry.rule_name}): explain {outcome or 'apply'!r}, transform "
                            f"{status!r}")
    problems += [f"{site}: Change of rule {rule} not in the plan" for site, rule in changes]
    said = sorted((e.site.name, e.rule_name) for e in plan.entries if "ScaleLostWarning" in e.outcome)
    lost = sorted((c.site, c.rule) for c in manifest_of(gm).changes if "scale_lost" in c.after)
    if said != lost:
        problems.append(f"scale lost: explain {said}, transform {lost}")
    return problems


def _compare(policy, variant, with_inputs):
    def make():
        torch.manual_seed(0)
        return _Net(variant)

    x = (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),) if with_inputs else None
    model = make()
    state, tree = _state(model), _tree(model)
    _Net.runs = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            plan, explained = orthofx.explain(model, policy, example_inputs=x), None
        except Exception as exc:  # noqa: BLE001 - compared with transform's below
            plan, explained = None, exc
        runs = _Net.runs
        try:
            gm, transformed = orthofx.transform(make(), policy, example_inputs=x), None
        except Exception as exc:  # noqa: BLE001
            gm, transformed = None, exc
    problems = []
    if not bitwise_equal(_state(model), state) or _tree(model) != tree:
        problems.append("explain changed the model")
    if runs > (1 if variant == "lazy" and with_inputs else 0):  # only a lazy model runs, to get its shapes
        problems.append(f"explain ran the model {runs} times")
    refusal = next((e.refusal for e in plan.entries if e.refusal is not None), None) if plan is not None else None
    if explained is not None or transformed is not None:
        expected = explained or refusal
        if type(expected) is not type(transformed):
            problems.append(f"explain: {expected!r}, transform: {transformed!r}")
    elif refusal is not None:
        problems.append(f"explain refuses ({refusal!r}), transform does not")
    else:
        problems += _agrees(plan, gm)
    return problems


@pytest.mark.parametrize("preset, variant", [(preset, "plain") for preset in presets()]
                         + [("lorth", "tie"), ("isometric", "tie"), ("svd", "frozen")])
def test_presets_explain_what_transform_does(preset, variant):
    assert _compare(preset, variant, with_inputs=preset == "orthogonal") == []


@pytest.mark.parametrize("seed", range(7))
def test_random_policies_explain_what_transform_does(seed):
    rng = random.Random(seed)
    problems = []
    for _ in range(2):
        policy = {"rules": [_random_rule(rng) for _ in range(rng.randint(1, 3))]}
        variant = rng.choice(["plain", "tie", "frozen", "lazy"])
        for problem in _compare(policy, variant, with_inputs=rng.random() < 0.6):
            problems.append(f"{variant} {policy}: {problem}")
    assert problems == []


@pytest.mark.parametrize("variant", ["plain", "tie", "frozen"])
def test_presvd_weight_orthogonal_explains_its_lorth_fallback(variant):
    # the tied 'sq' fell back to L_orth at transform where explain said plain 'apply'
    policy = {"rules": [{"match": {"feeds": ["linalg.eigvalsh"]}, "apply": "pre_svd",
                         "with": {"weight": "orthogonal"}}]}
    assert _compare(policy, variant, with_inputs=True) == []


@pytest.mark.parametrize("policy", [
    {"rules": [{"match": {"type": "Conv2d"}, "apply": "no_such_pass"}]},
    {"rules": [{"match": {"type": "Conv2d"}, "apply": "orth_regularizer", "with": {"weight": -1.0}}]},
    {"rules": [{"match": {"type": "GRU"}, "apply": "orth_regularizer"}]},
    {"rules": [{"match": {"type": "Linear", "where": {"bias": 3}}, "apply": "orth_regularizer"}]},
    {"rules": [{"match": {"type": "Conv2d", "name": "c2"}, "apply": "orthogonal_conv",
                "with": {"method": "cayley_fft", "padding": "keep"}}]},
    {"rules": [{"match": {"type": "Linear", "name": "sq"}, "apply": "riemannian", "with": {"free": "first"}},
               {"match": {"type": "Linear", "name": "blk.0"}, "apply": "riemannian"}]},
    "no_such_preset",
])
def test_bad_policies_raise_the_same_error_type_in_explain_and_transform(policy):
    assert _compare(policy, "tie", with_inputs=False) == []
