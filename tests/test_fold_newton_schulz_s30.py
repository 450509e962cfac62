"""freeze folds Newton-Schulz matrix powers of constant matrices, as it folds constant decompositions.

``method: newton_schulz`` puts ``power_newton_schulz`` where an eigh of a running covariance was; before session
30 the frozen model kept those iterations (matmuls on every call) although their input is a buffer.
"""
import torch
from torch import nn

import orthofx
from orthofx.capture import capture
from orthofx.nn.conditioning import power_newton_schulz
from orthofx.passes.svd_conditioning import fold_constant_decompositions

def _ns_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is power_newton_schulz]


def _inv_sqrt_float64(a):
    lam, v = torch.linalg.eigh(a.double())
    return (v * lam.rsqrt()) @ v.mT


class _Whiten(nn.Module):
    """x @ (running_cov + eps I)^(-1/2) from a buffer (eval-mode whitening written by hand)."""

    def __init__(self, d=6):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        a = torch.randn(d, 3 * d, generator=g)
        self.register_buffer("running_cov", a @ a.T / (3 * d))
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        eye = torch.eye(self.running_cov.shape[0], dtype=self.running_cov.dtype)
        w = power_newton_schulz(self.running_cov + 1e-3 * eye, -0.5, iterations=30)
        return self.lin(x) @ w


class _InputPower(nn.Module):
    """The Newton-Schulz power of an input-dependent matrix: not a constant, never folded."""

    def forward(self, x):
        return power_newton_schulz(x.mT @ x + torch.eye(x.shape[-1]), -0.5, iterations=10)


def _dbn_newton_schulz():
    x = orthofx.models.example_input("dbn_cnn", batch=4)
    model = orthofx.models.get("dbn_cnn").eval()
    policy = {"orthofx": 1, "rules": [{"name": "ns", "match": {"op": ["linalg.eigh"]}, "apply": "svd_conditioning",
                                       "with": {"method": "newton_schulz", "iterations": 10}}]}
    return orthofx.transform(model, policy, example_inputs=(x,)), x


def test_freeze_folds_power_newton_schulz_of_running_covariance():
    gm, x = _dbn_newton_schulz()
    assert len(_ns_nodes(gm)) == 1  # the pass put the matrix power in the eigh's place
    frozen = orthofx.freeze(gm)
    assert _ns_nodes(frozen) == []  # failed before: the iterations stayed in the frozen graph
    # keyed by the site, as a folded decomposition is (it was the node name, "power_newton_schulz")
    assert frozen.meta["orthofx_folded"] == {"dbn:linalg.eigh": ["orthofx_folded_0"]}
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), gm.eval()(x), rtol=1e-6, atol=1e-6)


def test_folded_whitening_matrix_is_the_inverse_root_of_the_buffer():
    model = _Whiten().eval()
    gm, _ = capture(model, mode="fx")  # orthofx's tracer reads the buffer as a get_attr node
    folded = fold_constant_decompositions(gm)
    assert list(folded) == ["power_newton_schulz"] and _ns_nodes(gm) == []
    # the buffer is the root itself (the eye and the shift were folded with it), against float64 eigh
    eye = torch.eye(6)
    reference = _inv_sqrt_float64(model.running_cov + 1e-3 * eye)
    torch.testing.assert_close(gm.orthofx_folded_0.double(), reference, rtol=1e-4, atol=1e-4)
    x = torch.randn(5, 6)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)  # the same ops, run once


def test_newton_schulz_of_an_input_is_kept():
    gm, _ = capture(_InputPower(), mode="fx")
    assert fold_constant_decompositions(gm) == {}
    assert len(_ns_nodes(gm)) == 1
