"""Session 38: what a pass reads of weight values (meta-device refusal at planning) and Pre-SVD's planned outcome
come from the passes themselves (Pass.weight_values_read, PreSVD.planned_outcome); explain agrees with transform."""

import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import MetaWeightError
from orthofx.passes import get_pass


class _Feeds(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        return torch.linalg.eigvalsh(h.T @ h)


def test_pre_svd_with_nothing_asked_is_planned_as_left_unchanged_as_transform_records():
    policy = {"rules": [{"match": {"feeds": "linalg.eigvalsh"}, "apply": "pre_svd",
                         "with": {"weight": "none", "nog": False, "olr": False}}]}
    text = str(orthofx.explain(_Feeds(), policy))
    line = next(line for line in text.splitlines() if line.startswith("fc "))
    assert "left unchanged: nothing to apply" in line, text
    gm = orthofx.transform(_Feeds(), policy)
    (change,) = orthofx.manifest_of(gm).changes
    assert change.status == "skipped: nothing to apply (weight none, nog and olr off)"
    # a rule that asks for something is planned as the usual change
    asked = {"rules": [{"match": {"feeds": "linalg.eigvalsh"}, "apply": "pre_svd", "with": {"weight": "none"}}]}
    line = next(line for line in str(orthofx.explain(_Feeds(), asked)).splitlines() if line.startswith("fc "))
    assert line.rstrip().endswith("apply"), line


@pytest.mark.parametrize("name, params, reads", [
    ("orthogonal_conv", {"init": "nearest"}, True), ("orthogonal_conv", {"init": "random"}, False),
    ("isometric_init", {}, True), ("riemannian", {}, True), ("pre_svd", {}, True),
    ("orth_regularizer", {}, False), ("convnorm", {}, False), ("jacobian_isometry", {}, False),
    ("svd_conditioning", {}, False)])
def test_each_pass_says_whether_it_reads_weight_values(name, params, reads):
    cls = get_pass(name)
    said = cls().weight_values_read(cls.validate_params(params))
    assert (said is not None) == reads
    if reads:
        assert isinstance(said, str) and said and not said.startswith(name)


def test_a_meta_layer_is_refused_before_any_pass_runs_for_a_pass_reading_its_values():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    policy = {"rules": [{"match": {"type": "Linear"}, "apply": "isometric_init"}]}
    text = str(orthofx.explain(model, policy))
    assert "fails: isometric_init measures the weight's orthogonality defect" in text, text
    with pytest.raises(MetaWeightError, match="isometric_init measures"):
        orthofx.transform(model, policy)
    # L_orth reads the weight only when the penalty is computed: planned and applied
    gm = orthofx.transform(model, {"rules": [{"match": {"type": "Linear"}, "apply": "orth_regularizer"}]})
    assert len(orthofx.manifest_of(gm).changes) == 2
