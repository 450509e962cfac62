"""Session 45, final read: pre_svd's hard layers (``weight: orthogonal``) get orthogonal_conv's check of example
inputs not divisible by the stride (status, ``after`` keys, warning, report figures: references are dense float64
Jacobians); an attached optimizer whose hooked weights never get a gradient takes the unattached check's fast
path; the texts fixed with them."""

import copy
import math
import warnings

import torch
from torch import nn

import orthofx
from orthofx.export import _fixed_shift_recovery
from orthofx.passes import base
from orthofx.passes import orthogonal_conv
from orthofx.passes.base import describe_module

PRE_SVD_HARD = """
orthofx: 1
rules:
  - match: {feeds: linalg.eigh}
    apply: pre_svd
    with: {weight: orthogonal, nog: false, padding: circular}
"""


class _StridedConvIntoEigh(nn.Module):
    """A strided conv feeding eigh (the covariance of its output channels)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, padding_mode="circular")

    def forward(self, x):
        y = self.conv(x).flatten(2)
        return torch.linalg.eigh(y @ y.transpose(1, 2) + torch.eye(8))[0]


def _transform_pre_svd(size):
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = orthofx.transform(_StridedConvIntoEigh(), orthofx.Policy.from_yaml(PRE_SVD_HARD),
                               example_inputs=(torch.randn(2, 4, size, size),))
    change = next(c for c in orthofx.manifest_of(gm).changes if c.site == "conv")
    off_grid = [str(w.message) for w in caught
                if issubclass(w.category, orthofx.OrthofxWarning) and "not orthogonal on the example" in str(w.message)]
    return gm, change, off_grid


def _dense_extremes(layer, size):
    """The extreme singular values of ``layer``'s dense float64 Jacobian on 4 x size x size inputs."""
    layer = copy.deepcopy(layer).double()
    n = 4 * size * size
    jacobian = torch.autograd.functional.jacobian(lambda z: layer(z.reshape(1, 4, size, size)).reshape(-1),
                                                  torch.zeros(n, dtype=torch.float64))
    values = torch.linalg.svdvals(jacobian)
    return float(values.min()), float(values.max())


def _report_row(gm, site):
    return next(row for row in orthofx.report(gm).rows if row["site"] == site)


def test_pre_svd_hard_layer_on_a_size_not_divisible_by_the_stride_says_so():
    gm, change, off_grid = _transform_pre_svd(7)
    assert change.status == ("orthogonal: hard kernel; not orthogonal on the example's 7x7 input: not divisible by "
                             "stride 2")
    assert change.after["not_orthogonal_on"] == (7, 7)
    assert change.after["not_orthogonal_on_sizes"] == [(7, 7)]
    assert len(off_grid) == 1 and off_grid[0].startswith("pre_svd: 'conv' (7x7 input, stride 2)")
    low, high = _dense_extremes(gm.get_submodule("conv"), 7)
    assert high / low > 5  # really not orthogonal there (the check is not vacuous)
    row = _report_row(gm, "conv")
    assert math.isclose(row["sigma_min"], low, rel_tol=1e-5)
    assert math.isclose(row["sigma_max"], high, rel_tol=1e-5)


def test_pre_svd_hard_layer_on_a_divisible_size_stays_exact_and_quiet():
    gm, change, off_grid = _transform_pre_svd(8)
    assert change.status == "orthogonal (hard)"
    assert "not_orthogonal_on" not in change.after and "not_orthogonal_on_sizes" not in change.after
    assert off_grid == []
    low, high = _dense_extremes(gm.get_submodule("conv"), 8)
    row = _report_row(gm, "conv")
    assert math.isclose(low, 1, rel_tol=1e-5) and math.isclose(high, 1, rel_tol=1e-5)
    assert math.isclose(row["sigma_min"], 1, rel_tol=1e-5) and math.isclose(row["sigma_max"], 1, rel_tol=1e-5)


def test_orthogonal_conv_still_marks_its_off_grid_layers_through_the_shared_helper():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1, padding_mode="circular"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = orthofx.transform(model, "orthogonal", example_inputs=(torch.randn(1, 4, 7, 7),))
    change = next(c for c in orthofx.manifest_of(gm).changes if c.site == "0")
    assert change.status.startswith("hard kernel") and change.after["not_orthogonal_on_sizes"] == [(7, 7)]
    messages = [str(w.message) for w in caught if "not orthogonal on the example" in str(w.message)]
    assert len(messages) == 1 and messages[0].startswith("orthogonal_conv: '0' (7x7 input, stride 2)")


def _riemannian_backbone():
    torch.manual_seed(0)
    gm = orthofx.transform(nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)], nn.Linear(8, 2)), "isometric",
                           example_inputs=(torch.randn(4, 8),))
    hooked = [p for p in gm.parameters() if p in base._HOOKED_WEIGHTS]
    assert hooked  # the preset hooks the weights (else the test would check nothing)
    return gm, hooked


def _steps(gm, optimizer, count):
    for _ in range(count):
        optimizer.zero_grad()
        gm(torch.randn(4, 8)).sum().backward()
        optimizer.step()


def test_attached_optimizer_with_a_frozen_backbone_takes_the_fast_path():
    gm, hooked = _riemannian_backbone()
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.01)
    orthofx.attach(optimizer, gm)
    for parameter in hooked:
        parameter.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", orthofx.OrthofxWarning)
        _steps(gm, optimizer, 3)
    # the int form (its group count): no list of hooked weights walked at every step
    assert optimizer.__dict__[base._UNATTACHED_CHECKED] == len(optimizer.param_groups)


def test_unattached_optimizer_with_a_frozen_backbone_still_warns_once_unfrozen():
    gm, hooked = _riemannian_backbone()
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.01)  # not attached
    for parameter in hooked:
        parameter.requires_grad_(False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _steps(gm, optimizer, 2)
        assert not [w for w in caught if "no optimizer was attached" in str(w.message)]
        assert len(optimizer.__dict__[base._UNATTACHED_CHECKED].hooked) == len(hooked)
        for parameter in hooked:
            parameter.requires_grad_(True)
        _steps(gm, optimizer, 1)
    assert len([w for w in caught if "no optimizer was attached" in str(w.message)]) == 1


def test_fixed_shift_recovery_names_the_matrix_only():
    text = _fixed_shift_recovery("old.pt", [("dw", nn.Conv2d(4, 4, 3, groups=4))])
    assert "parameters (matrix) at 'dw'" in text and "block_shift" not in text


def test_example_sizes_of_a_linear_is_empty():
    class _Manifest:
        all_input_shapes = {"fc": [(2, 16), (3, 16)]}
        input_shapes = {"fc": (2, 16)}

    assert orthogonal_conv.example_sizes(_Manifest(), "fc", 0) == []
    assert orthogonal_conv.example_sizes(_Manifest(), "fc", 1) == [(16,)]


def test_orthogonal_conv_docstring_states_the_one_input_per_window_rule():
    doc = " ".join(orthogonal_conv.__doc__.split())  # line breaks fall anywhere
    assert "one input per stride window" in doc and "(``k >= S``) trains" not in doc


def test_per_dimension_text_is_the_one_stride_and_kernel_format():
    from orthofx.passes.base import per_dimension_text  # here: the other tests also run on code without it

    assert per_dimension_text((2, 2)) == "2" and per_dimension_text((2, 1)) == "2x1" and per_dimension_text([3]) == "3"
    assert describe_module(nn.Conv2d(3, 8, (3, 1), stride=(2, 2))) == "Conv2d(3->8, k=3x1, s=2)"
    assert describe_module(nn.Conv3d(3, 8, 3, stride=(1, 2, 2), groups=1)) == "Conv3d(3->8, k=3, s=1x2x2)"
