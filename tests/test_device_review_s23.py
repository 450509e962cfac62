"""Session 23 device / dtype review: tensors orthofx creates follow the model's device and dtype.

The review moved every preset's transformed models (built-ins and corpus models) to the meta device and ran
forward, penalty, backward and attached optimizer steps there, which raises on any CPU tensor made inside
orthofx's code; it found none in those paths. What it did find is below.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthofx
from orthofx.nn.jacobian import JacobianProbe


@pytest.mark.parametrize("dtype,device", [(torch.float64, "cpu"), (torch.bfloat16, "cpu"), (torch.float64, "meta")],
                         ids=["float64", "bfloat16", "float64-meta"])
def test_probe_penalty_without_estimate_is_a_zero_in_the_blocks_dtype_and_device(dtype, device):
    """``probe.penalty()`` with no current estimate (eval mode) was a float32 zero whatever the block's dtype: a
    bfloat16 model's loss became float32 on the steps without an estimate, and differed from the zero
    ``orthofx.penalty_terms`` reports for the same probe."""
    probe = JacobianProbe(nn.Sequential(nn.Linear(3, 3), nn.Tanh())).to(device=device, dtype=dtype).eval()
    probe(torch.randn(4, 3).to(device=device, dtype=dtype))
    assert probe.estimate is None
    zero = probe.penalty()
    expected = torch.zeros((), dtype=dtype, device=device)  # plain torch: what a zero like the weights is
    assert (zero.dtype, zero.device, zero.shape) == (expected.dtype, expected.device, expected.shape)
    if device != "meta":
        assert zero.item() == 0.0
        reported = orthofx.penalty_terms(nn.Sequential(probe))["JacobianProbe/0"]
        assert reported.dtype == zero.dtype
        loss = torch.ones((), dtype=dtype) + zero  # a task loss in the model's dtype keeps it
        assert loss.dtype == dtype



def test_srip_penalty_compiles_fullgraph_and_its_start_vector_follows_the_weight():
    """SRIP's power iteration drew its start vector from a CPU ``torch.Generator`` at every penalty: a host-to-device
    copy per step on a GPU, and a graph break under ``torch.compile(fullgraph=True)`` ("opaque object created in
    the middle of the program"). The compiled penalty must equal the eager one, and both the float64 reference
    sigma_max(W W^T - I) of a dense eigendecomposition."""
    from orthofx.passes.pre_svd import srip

    torch.manual_seed(0)
    weight = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    W = weight.reshape(2, 3, -1)
    gram = W @ W.mT
    reference = torch.linalg.eigvalsh(gram - torch.eye(3, dtype=gram.dtype)).abs().amax(dim=-1).sum()
    assert float(srip(weight, groups=2, iterations=200)) == pytest.approx(float(reference), rel=1e-9)
    compiled = torch.compile(lambda w: srip(w, groups=2, iterations=50), fullgraph=True, backend="eager")
    assert float(compiled(weight)) == pytest.approx(float(srip(weight, groups=2, iterations=50)), rel=1e-12)
    on_meta = srip(weight.to("meta"), groups=2)
    assert on_meta.device.type == "meta" and on_meta.dtype == torch.float64
