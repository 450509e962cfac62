"""The captured model takes its inputs as the model does: the forward's parameter kinds and defaults
(positional-only, keyword-only, ``*args`` before keyword-only parameters), and parameters that default to None and
drive Python control flow (``if mask is not None:``), in capture modes fx, export and auto.

Every call pattern is compared with the eager model (plain torch), or must fail with a precise error: a call the
model refuses fails with Python's own TypeError, and a call the graph was not captured for with an
:class:`~orthofx.errors.ArgumentError` that names the argument and the fix."""

from __future__ import annotations

import copy
import inspect
import pickle
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import orthofx
from orthofx.capture import capture
from orthofx.errors import ArgumentError, CaptureError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


def _input(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _layout(forward):
    """Name, kind and default of each parameter of ``forward``."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(forward).parameters.values()]


def _binding_error(call) -> str:
    """What Python's argument binding says about ``call()``, after ``forward()`` (the class name before it differs
    between the model and its captured copy): e.g. "takes 4 positional arguments but 5 were given"."""
    with pytest.raises(TypeError, match=r"forward\(\) ") as info:
        call()
    return str(info.value).split("forward() ", 1)[1]


# ----------------------------------------------------------------------------------------------- parameter kinds

class Kinds(nn.Module):
    """Positional-only ``w``, positional-or-keyword ``b``, keyword-only ``scale`` and ``offset`` (a default)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, w, /, b, *, scale, offset=0.5):
        return self.fc(x * w + b) * scale + offset


def _kinds_inputs(batch, seed=0):
    return _input(batch, 4, seed=seed), _input(batch, 4, seed=seed + 1), _input(batch, 4, seed=seed + 2), \
        _input(batch, 1, seed=seed + 3)


@pytest.mark.parametrize("mode", ["fx", "export", "auto"])
def test_captured_forward_keeps_positional_only_and_keyword_only_parameters(mode):
    torch.manual_seed(0)
    model = Kinds().eval()
    x, w, b, scale = _kinds_inputs(3)
    gm, info = capture(model, mode=mode, example_inputs=(x, w, b), example_kwargs={"scale": scale})
    assert info.mode == ("export" if mode == "export" else "fx")
    assert _layout(gm.forward) == _layout(model.forward)
    for batch in (3, 5):
        x, w, b, scale = _kinds_inputs(batch, seed=batch)
        for args, kwargs in [((x, w, b), {"scale": scale}), ((x, w), {"b": b, "scale": scale}),
                             ((x, w, b), {"scale": scale, "offset": 0.5})]:
            torch.testing.assert_close(gm(*args, **kwargs), model(*args, **kwargs))
    # what the model refuses (w by keyword, scale by position), the captured model refuses the same way
    # (the same binding error, not one raised later inside the graph)
    refusals = [((x,), {"w": w, "b": b, "scale": scale},
                 "got some positional-only arguments passed as keyword arguments: 'w'"),
                ((x, w, b, scale), {}, "takes 4 positional arguments but 5 were given")]
    for args, kwargs, refusal in refusals:
        assert _binding_error(lambda: model(*args, **kwargs)) == refusal
        assert _binding_error(lambda: gm(*args, **kwargs)) == refusal
    # copies, and unpickled ones (whose graph is traced again from its code), keep the kinds
    for clone in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm))):
        assert _layout(clone.forward) == _layout(model.forward)
        torch.testing.assert_close(clone(x, w, b, scale=scale), model(x, w, b, scale=scale))


class Rest(nn.Module):
    """A keyword-only ``scale`` after ``*rest``: fx's code put it before ``*rest``, so ``gm(x, a, b)`` bound ``a``
    to ``scale``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, *rest, scale=1.0):
        return self.fc(x + torch.stack(rest).sum(0)) * scale


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_keyword_only_parameter_after_star_args_stays_after_it(mode):
    torch.manual_seed(0)
    model = Rest().eval()
    x, a, b = _input(2, 4), _input(2, 4, seed=1), _input(2, 4, seed=2)
    gm, _ = capture(model, mode=mode, example_inputs=(x, a, b))
    assert _layout(gm.forward) == _layout(model.forward)
    x, a, b = _input(5, 4, seed=3), _input(5, 4, seed=4), _input(5, 4, seed=5)
    torch.testing.assert_close(gm(x, a, b), model(x, a, b))
    torch.testing.assert_close(gm(x, a, b, scale=1.0), model(x, a, b, scale=1.0))
    if mode == "fx":  # export captured scale at its default, and refuses another value
        torch.testing.assert_close(gm(x, a, b, scale=2.0), model(x, a, b, scale=2.0))
    else:
        with pytest.raises(ArgumentError, match=r"input 'scale'.*left at its default \(1\.0\).*got a float"):
            gm(x, a, b, scale=2.0)
    clone = pickle.loads(pickle.dumps(gm))
    assert _layout(clone.forward) == _layout(model.forward)
    torch.testing.assert_close(clone(x, a, b), model(x, a, b))


class Shifted(nn.Module):
    """``scale`` after ``shift``, both with defaults: given by keyword in the example, export's order put ``scale``
    first, and the model's positional call ``(x, shift, scale)`` bound ``shift`` to ``scale``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, shift=0.0, scale=1.0):
        return self.fc(x + shift) * scale


def test_export_capture_keeps_the_order_of_parameters_given_by_keyword():
    torch.manual_seed(0)
    model = Shifted().eval()
    gm, _ = capture(model, mode="export", example_inputs=(_input(3, 4),), example_kwargs={"scale": _input(3, 1)})
    assert _layout(gm.forward) == _layout(model.forward)
    x, scale = _input(5, 4, seed=1), _input(5, 1, seed=2)
    torch.testing.assert_close(gm(x, 0.0, scale), model(x, 0.0, scale))
    torch.testing.assert_close(gm(x, scale=scale), model(x, scale=scale))
    with pytest.raises(ArgumentError, match=r"input 'shift'.*left at its default \(0\.0\).*got a float \(1\.0\)"):
        gm(x, 1.0, scale)


# ------------------------------------------------------------------------ None-default arguments and control flow

class MaskedFill(nn.Module):
    """``if mask is not None:``: a trace with a traced ``mask`` always takes the branch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, mask=None):
        if mask is not None:
            x = x.masked_fill(mask, 0.0)
        return self.fc(x)


class CausalByDefault(nn.Module):
    """``if attn_mask is None:`` makes a causal mask: a trace with a traced ``attn_mask`` drops that branch, and the
    graph called without the argument ran attention without any mask (a silently different result)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12)

    def forward(self, x, attn_mask: Optional[Tensor] = None):
        q, k, v = self.qkv(x).chunk(3, -1)
        if attn_mask is None:
            attn_mask = x.new_ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def _mask_for(model, x, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = x.shape if isinstance(model, MaskedFill) else (x.shape[1], x.shape[1])
    mask = torch.rand(shape, generator=g) > 0.5
    if not isinstance(model, MaskedFill):
        mask |= torch.eye(x.shape[1], dtype=torch.bool)  # no row without a key
    return mask


def _name(model):
    return "mask" if isinstance(model, MaskedFill) else "attn_mask"


#: (mode, what the example does with the argument) -> per call pattern: None (same as the model) or the error
NEEDS_IT = r"input '{0}': this model was captured by symbolic tracing for calls that pass {0} .*got None. Fix: pass {0}"
REFUSES_IT = (r"input '{0}': this model was captured with symbolic tracing \(the forward branches on whether {0} is "
              r"None\) with {0} left at its default \(None\).*got a Tensor")
EXPORT_NEEDS_IT = (r"input '{0}': this model was captured with torch.export with a tensor for {0}.*got None. "
                   r"Fix: pass {0}")
EXPECTED = {
    ("fx", "given"): {"given": None, "omitted": NEEDS_IT, "none": NEEDS_IT},
    ("fx", "no example"): {"given": None, "omitted": NEEDS_IT, "none": NEEDS_IT},
    ("fx", "omitted"): {"given": REFUSES_IT, "omitted": None, "none": None},
    ("auto", "given"): {"given": None, "omitted": NEEDS_IT, "none": NEEDS_IT},
    ("auto", "no example"): {"given": None, "omitted": NEEDS_IT, "none": NEEDS_IT},
    ("auto", "omitted"): {"given": REFUSES_IT, "omitted": None, "none": None},
    ("export", "given"): {"given": None, "omitted": EXPORT_NEEDS_IT, "none": EXPORT_NEEDS_IT},
}


def _calls(model, batch, seed):
    x = _input(batch, 3, 4, seed=seed)
    name = _name(model)
    return x, {"given": {name: _mask_for(model, x, seed)}, "omitted": {}, "none": {name: None}}


def _check_calls(gm, model, expected, batches=(2, 5)):
    for batch in batches:
        x, calls = _calls(model, batch, seed=batch)
        for pattern, kwargs in calls.items():
            error = expected[pattern]
            if error is None:
                torch.testing.assert_close(gm(x, **kwargs), model(x, **kwargs), msg=f"call with {pattern} argument")
            else:
                with pytest.raises(ArgumentError, match=error.format(_name(model))):
                    gm(x, **kwargs)


@pytest.mark.parametrize("mode,example", list(EXPECTED), ids=["-".join(key) for key in EXPECTED])
@pytest.mark.parametrize("model_cls", [MaskedFill, CausalByDefault])
def test_none_default_argument_that_drives_control_flow(model_cls, mode, example):
    torch.manual_seed(0)
    model = model_cls().eval()
    x, calls = _calls(model, 2, seed=0)
    if example == "no example":
        gm, info = capture(model, mode=mode)
    else:
        gm, info = capture(model, mode=mode, example_inputs=(x,), example_kwargs=calls[example])
    assert info.mode == ("export" if mode == "export" else "fx")
    _check_calls(gm, model, EXPECTED[mode, example])
    if mode == "fx":  # the check is a call in the graph's code: copies and unpickled copies keep it
        _check_calls(pickle.loads(pickle.dumps(gm)), model, EXPECTED[mode, example], batches=(3,))
        assert any(_name(model) in w and "is None" in w for w in info.warnings)


class PassedOn(nn.Module):
    """A keyword-only ``attn_mask`` passed on to scaled_dot_product_attention, which takes None itself: the graph
    computes what the model does with or without it, and needs no check."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12)

    def forward(self, x, *, attn_mask: Optional[Tensor] = None):
        q, k, v = self.qkv(x).chunk(3, -1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


@pytest.mark.parametrize("mode", ["fx", "auto"])
@pytest.mark.parametrize("example", ["given", "omitted", "no example"])
def test_none_default_argument_passed_on_works_with_and_without_it(mode, example):
    torch.manual_seed(0)
    model = PassedOn().eval()
    x = _input(2, 3, 4)
    mask = torch.eye(3, dtype=torch.bool) | (torch.rand(3, 3) > 0.5)
    kwargs = {"given": {"attn_mask": mask}, "omitted": {}}.get(example)
    example = {} if kwargs is None else {"example_inputs": (x,), "example_kwargs": kwargs}
    gm, info = capture(model, mode=mode, **example)
    assert info.mode == "fx" and not any("is None" in w for w in info.warnings)
    assert _layout(gm.forward) == _layout(model.forward)
    causal = torch.ones(3, 3, dtype=torch.bool).tril()
    for call in ({}, {"attn_mask": None}, {"attn_mask": mask}, {"attn_mask": causal}):
        torch.testing.assert_close(gm(x, **call), model(x, **call))
    # keyword-only, as in the model: Python's own binding error
    assert _binding_error(lambda: gm(x, mask)) == _binding_error(lambda: model(x, mask)) \
        == "takes 2 positional arguments but 3 were given"


class Features(nn.Module):
    """``return_features: bool = False``: symbolic tracing fails on the branch, and auto captures with export."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x, return_features: bool = False):
        h = torch.relu(self.fc(x))
        if return_features:
            return self.head(h), h
        return self.head(h)


@pytest.mark.parametrize("mode", ["export", "auto"])
def test_flag_given_in_the_example_refuses_its_default_with_a_clear_error(mode):
    torch.manual_seed(0)
    model = Features().eval()
    gm, info = capture(model, mode=mode, example_inputs=(_input(2, 4),), example_kwargs={"return_features": True})
    assert info.mode == "export"
    x = _input(5, 4, seed=1)
    torch.testing.assert_close(gm(x, return_features=True), model(x, return_features=True))
    torch.testing.assert_close(gm(x, True), model(x, True))
    for call in ({}, {"return_features": False}):  # the model runs its other branch; the graph has only this one
        with pytest.raises(ArgumentError, match=r"input 'return_features'.*for return_features=True only.*got "
                                                r"False. Fix: pass return_features=True"):
            gm(x, **call)


class SizeLoopDefault(nn.Module):
    """Without ``mask``, the forward builds one in a Python loop over a size, which symbolic tracing cannot follow."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, mask=None):
        if mask is None:
            mask = torch.stack([x.new_full(x.shape[:-1], float(i % 2)) for i in range(x.shape[-1])], -1)
        return self.fc(x * mask)


def test_fx_capture_that_cannot_follow_the_examples_none_branch_names_the_argument():
    model = SizeLoopDefault().eval()
    with pytest.raises(CaptureError, match=r"cannot capture the forward of SizeLoopDefault with 'mask' left out, as "
                                           r"the example inputs leave it .*pass 'mask' in the example inputs.*"
                                           r"capture: \{mode: export\}") as caught:
        capture(model, mode="fx", example_inputs=(_input(2, 4),))
    assert caught.value.module_path == ""


def test_auto_capture_falls_back_to_export_for_the_examples_none_branch():
    torch.manual_seed(0)
    model = SizeLoopDefault().eval()
    gm, info = capture(model, mode="auto", example_inputs=(_input(2, 4),))
    assert info.mode == "export" and "'mask' left out" in info.fx_error
    x, mask = _input(5, 4, seed=1), _input(5, 4, seed=2)
    torch.testing.assert_close(gm(x), model(x))
    with pytest.raises(ArgumentError, match=r"input 'mask'.*torch.export with mask left at its default \(None\)"):
        gm(x, mask)
    # given in the example, the mask is an input of the fx graph
    gm, info = capture(model, mode="auto", example_inputs=(_input(2, 4), _input(2, 4, seed=3)))
    assert info.mode == "fx"
    torch.testing.assert_close(gm(x, mask), model(x, mask))


def test_transform_captures_the_examples_none_branch():
    """End to end: the example leaves the mask out, so the transformed model computes the causal default."""
    torch.manual_seed(0)
    model = CausalByDefault().eval()
    policy = {"capture": {"mode": "fx"}, "rules": [{"match": {"type": "Linear"}, "apply": "orth_regularizer"}]}
    gm = orthofx.transform(model, policy, example_inputs=(_input(2, 3, 4),))
    x = _input(4, 3, 4, seed=1)
    torch.testing.assert_close(gm(x), model(x))
    with pytest.raises(ArgumentError, match="input 'attn_mask'"):
        gm(x, attn_mask=torch.ones(3, 3, dtype=torch.bool))
