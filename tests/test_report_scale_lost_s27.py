"""The report says which sites lose a scale to a Stiefel constraint (``isometric_init`` with a gain and
``riemannian`` on one weight, in either order): the table's ``lorth`` of the current weight shows the scale as long
as no optimizer step has run, so before this note the report alone did not tell that the gain would be gone."""

import math
import warnings

import torch
from torch import nn

import orthofx

H = 6


def _transform_quietly(model, policy):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", orthofx.ScaleLostWarning)
        return orthofx.transform(model, policy, example_inputs=(torch.randn(2, H),))


def _init(site, **params):
    return {"name": "init", "match": {"name": site}, "apply": "isometric_init", "with": params}


def _stiefel(site):
    return {"name": "stiefel", "match": {"name": site}, "apply": "riemannian"}


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(H, H), nn.ReLU(), nn.Linear(H, H), nn.ReLU(), nn.Linear(H, 3))


def test_init_then_riemannian_notes_the_lost_scale_under_the_table():
    gm = _transform_quietly(_model(), {"rules": [_init("0", activation="relu"), _stiefel("0")]})
    report = orthofx.report(gm)
    lost = [note for note in report.notes if "is lost" in note]
    assert lost == ["0: riemannian (rule 'stiefel'): the scale 1.414 is lost: riemannian keeps the weight on the "
                    "Stiefel manifold, where all singular values are 1 (ScaleLostWarning)"]
    assert "note: " + lost[0] in str(report)
    assert report.to_dict()["notes"] == report.notes


def test_riemannian_then_init_notes_the_scale_the_first_step_drops():
    gm = _transform_quietly(_model(), {"rules": [_stiefel("2"), _init("2", gain=3.0)]})
    change = next(c for c in orthofx.manifest_of(gm).changes if c.pass_name == "isometric_init")
    assert math.isclose(change.after["scale_lost"], 3.0, rel_tol=1e-12)
    report = orthofx.report(gm)
    assert [note for note in report.notes if "is lost" in note] == [
        "2: isometric_init (rule 'init'): the scale 3 is lost: riemannian keeps the weight on the Stiefel "
        "manifold, where all singular values are 1 (ScaleLostWarning)"]
    # what the note foretells: the table's lorth is that of 3 Q now, ||9 I - I||^2 = 64 H; after one step, 0
    row = next(r for r in report.rows if r["site"] == "2")
    assert math.isclose(row["lorth"], 64 * H, rel_tol=1e-6)
    optimizer = torch.optim.SGD(gm.parameters(), lr=1e-3)
    orthofx.attach(optimizer, gm)
    gm(torch.randn(4, H)).square().mean().backward()
    optimizer.step()
    row = next(r for r in orthofx.report(gm).rows if r["site"] == "2")
    assert row["lorth"] < 1e-9


def test_no_note_without_a_lost_scale():
    for policy in ({"rules": [_init("0"), _stiefel("0")]},               # gain 1: nothing lost
                   {"rules": [_init("0", activation="relu"), _stiefel("2")]}):  # different layers
        gm = _transform_quietly(_model(), policy)
        assert not [note for note in orthofx.report(gm).notes if "is lost" in note]
        assert all("scale_lost" not in c.after for c in orthofx.manifest_of(gm).changes)
