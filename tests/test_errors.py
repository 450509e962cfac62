"""Bad arguments to public functions and classes raise orthofx.errors.ArgumentError, which is still a ValueError."""

import pytest
import torch
from torch import nn

import orthofx
from orthofx import metrics, models, theory
from orthofx.errors import ArgumentError, LayerArgumentError, OrthofxError
from orthofx.nn import conditioning, stiefel
from orthofx.nn.jacobian import JacobianProbe
from orthofx.passes.orth_regularizer import lorth_term
from orthofx.passes.pre_svd import polar_factor, srip
from orthofx.passes.riemannian import StiefelHook
from orthofx.passes.svd_conditioning import to_newton_schulz
from orthofx.policy import canonical_op

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {
    # metrics
    "conv_singular_values: input_size not divisible by the stride":
        lambda: metrics.conv_singular_values(torch.randn(4, 2, 3, 3), input_size=5, stride=2),
    "conv_singular_values: a Linear weight":
        lambda: metrics.conv_singular_values(torch.randn(4, 2), input_size=8),
    "linear_singular_values: a conv weight":
        lambda: metrics.linear_singular_values(torch.randn(4, 2, 3, 3)),
    "lorth: unknown case": lambda: metrics.lorth(torch.randn(4, 2, 3, 3), case="XO"),
    "orthogonality_error: conv without input_size": lambda: metrics.orthogonality_error(torch.randn(4, 2, 3, 3)),
    "spectral_norm_bound: negative iterations": lambda: metrics.spectral_norm_bound(torch.randn(4, 4), iterations=-1),
    "jacobian_isometry: integer input":
        lambda: metrics.jacobian_isometry(nn.Identity(), torch.ones(2, 3, dtype=torch.int64)),
    "jacobian_isometry: unknown kind": lambda: metrics.jacobian_isometry(nn.Identity(), torch.randn(2, 3), kind="x"),
    "isometry_moments: n too small": lambda: metrics.isometry_moments(torch.ones(4), n=2),
    # theory
    "orthogonal_conv_exists: zero channels": lambda: theory.orthogonal_conv_exists(0, 4, 3),
    "orthogonal_conv_exists: groups do not divide": lambda: theory.orthogonal_conv_exists(3, 4, 3, groups=2),
    "orthogonal_conv_exists: unknown padding": lambda: theory.orthogonal_conv_exists(2, 4, 3, padding="same"),
    "orthogonality_case: dims 4": lambda: theory.orthogonality_case(2, 4, dims=4),
    "orthogonality_case: stride tuple of the wrong length": lambda: theory.orthogonality_case(2, 4, stride=(1, 2, 3)),
    # orthofx.nn.stiefel
    "tangent_projection: shapes differ": lambda: stiefel.tangent_projection(torch.eye(3), torch.randn(3, 2)),
    "retract: a vector": lambda: stiefel.retract(torch.ones(3), torch.ones(3)),
    "retract: unknown method": lambda: stiefel.retract(torch.eye(3), torch.zeros(3, 3), method="cayley"),
    "flatten_weight: groups do not divide": lambda: stiefel.flatten_weight(torch.randn(5, 2, 3, 3), groups=2),
    # orthofx.nn.conditioning
    "stable_eigh: bad UPLO": lambda: conditioning.stable_eigh(torch.eye(3), UPLO="X"),
    "power_newton_schulz: bad power": lambda: conditioning.power_newton_schulz(torch.eye(3), power=2.0),
    "DecompositionMonitor: unknown source": lambda: conditioning.DecompositionMonitor(source="x"),
    # orthofx.nn.jacobian
    "JacobianProbe: not a module": lambda: JacobianProbe(lambda x: x),
    "JacobianProbe: unknown kind": lambda: JacobianProbe(nn.Linear(2, 2), kind="diag"),
    "JacobianProbe: probes 0": lambda: JacobianProbe(nn.Linear(2, 2), probes=0),
    # policy
    "canonical_op: unknown op": lambda: canonical_op("linalg.eigg"),
    # passes
    "polar_factor: a vector": lambda: polar_factor(torch.ones(3)),
    "srip: iterations 0": lambda: srip(torch.randn(4, 4), iterations=0),
    "to_newton_schulz: iterations 0": lambda: to_newton_schulz(torch.fx.symbolic_trace(nn.Identity()), iterations=0),
    "StiefelHook: unknown retraction": lambda: StiefelHook("fc", "rule", retraction="cayley"),
    "lorth_term: not a conv or linear": lambda: lorth_term(nn.Embedding(3, 4), "emb", "rule", 0.1),
}


@pytest.mark.parametrize("call", list(CASES.values()), ids=list(CASES))
def test_bad_argument_raises_argument_error(call):
    with pytest.raises(ArgumentError) as info:
        call()
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, OrthofxError)
    assert str(info.value)  # the message says what was wrong


def test_models_get_unknown_name_is_an_argument_error():
    # models.py imports nothing of orthofx (tests/test_models.py checks that contract) but raises orthofx's
    # ArgumentError, looked up when raised; the message lists the models and suggests the closest name.
    with pytest.raises(ArgumentError, match="did you mean 'resnet18'"):
        models.get("resnet19")


def test_error_hierarchy():
    assert issubclass(LayerArgumentError, ArgumentError)
    assert issubclass(ArgumentError, OrthofxError) and issubclass(ArgumentError, ValueError)
    assert orthofx.ArgumentError is ArgumentError
    assert "ArgumentError" in orthofx.__all__ and "ArgumentError" in orthofx.errors.__all__
