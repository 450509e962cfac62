"""Session 44: a frozen ConvNorm layer's ``filter_for`` takes the sizes its unfrozen layer takes; a module kept as
a leaf whose own forward calls a layer inside a ``torch.cond`` branch."""

import copy
import warnings

import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import LayerArgumentError, TransformError
from orthofx.nn import ConvNormConv1d, ConvNormConv2d


def _frozen_convnorm(cls, conv, x):
    layer = cls(conv, momentum=0.5)
    layer(x)  # a training forward keeps the running filter the frozen layer takes
    return layer, layer.eval().to_plain()


def test_frozen_filter_for_takes_an_int_as_the_unfrozen_layer_does():
    torch.manual_seed(0)
    layer, frozen = _frozen_convnorm(ConvNormConv2d, nn.Conv2d(3, 4, 3, padding=1), torch.randn(1, 3, 8, 8))
    (grid,) = frozen.grids
    assert grid[0] == grid[1]
    torch.testing.assert_close(frozen.filter_for(grid[0]), layer.running_filter(grid[0]), rtol=0, atol=0)
    torch.testing.assert_close(frozen.filter_for(grid[0]), frozen.filter_for(grid), rtol=0, atol=0)
    assert frozen.filter_for(grid[0] + 1) is None
    layer1, frozen1 = _frozen_convnorm(ConvNormConv1d, nn.Conv1d(2, 3, 3, padding=1), torch.randn(1, 2, 9))
    (grid1,) = frozen1.grids
    torch.testing.assert_close(frozen1.filter_for(grid1[0]), layer1.running_filter(grid1), rtol=0, atol=0)


@pytest.mark.parametrize("grid", ["10", 8.9, [10, 10.5], None, True])
def test_frozen_filter_for_refuses_what_is_no_size(grid):
    _, frozen = _frozen_convnorm(ConvNormConv2d, nn.Conv2d(3, 4, 3, padding=1), torch.randn(1, 3, 8, 8))
    with pytest.raises(LayerArgumentError, match="FrozenConvNormNd: the FFT grid must be an int or 2 ints"):
        frozen.filter_for(grid)


class _CondLeaf(nn.Module):
    def __init__(self, branch: bool = True):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.branch = branch

    def forward(self, x):
        if not self.branch:
            return self.lin(x) if bool(x.sum() > 0) else -x
        return torch.cond(x.sum() > 0, lambda z: self.lin(z), lambda z: -z, (x,))


class _Outer(nn.Module):
    def __init__(self, branch: bool = True):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.h = _CondLeaf(branch)

    def forward(self, x):
        return self.h(self.a(x))


def _policy(mode, apply, **match):
    return {"orthofx": 1, "capture": {"mode": mode, "leaf_modules": ["_CondLeaf"]},
            "rules": [{"apply": apply, "match": {"type": ["Linear"], **match}}]}


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_a_leaf_calling_a_layer_in_a_cond_branch_keeps_it_a_site(mode):
    """transform's example run recorded each site's shapes with a hook: inside the branch torch refused it
    ("HOP: Unsafe side effect") and transform failed although the model runs."""
    torch.manual_seed(0)
    model = _Outer()
    reference = copy.deepcopy(model)
    x = torch.rand(3, 4) + 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = orthofx.transform(model, _policy(mode, "orth_regularizer"), example_inputs=(x,))
    for inp in (x, -x):  # both branches, against the untransformed model
        torch.testing.assert_close(gm(inp), reference(inp), rtol=0, atol=0)
    # the branch's layer is a site: its L_orth is in the penalty, as in the same model without the cond
    plain = copy.deepcopy(reference)
    plain.h.branch = False
    plain_gm = orthofx.transform(plain, _policy("fx", "orth_regularizer"), example_inputs=(x,))
    penalty = orthofx.penalty(gm)
    torch.testing.assert_close(penalty, orthofx.penalty(plain_gm), rtol=1e-6, atol=0)
    penalty.backward()
    assert gm.get_submodule("h.lin").weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_riemannian_layer_in_a_cond_branch_of_a_leaf_stays_orthogonal(mode):
    torch.manual_seed(0)
    x = torch.rand(8, 4) + 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = orthofx.transform(_Outer(), _policy(mode, "riemannian"), example_inputs=(x,))
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    orthofx.attach(optimizer, gm)
    before = gm.get_submodule("h.lin").weight.detach().clone()
    for _ in range(3):
        optimizer.zero_grad()
        gm(x).square().sum().backward()
        optimizer.step()
    weight = gm.get_submodule("h.lin").weight.detach().double()
    assert (weight - before).abs().max() > 1e-4
    torch.testing.assert_close(weight @ weight.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-5)


def test_jacobian_probe_in_a_cond_branch_of_a_leaf_says_how_to_leave_it_out():
    torch.manual_seed(0)
    x = torch.rand(3, 4) + 0.1
    with pytest.raises(TransformError, match=r"(?s)torch.cond.*jacobian_isometry probe.*match: \{exclude"):
        orthofx.transform(_Outer(), _policy("fx", "jacobian_isometry"), example_inputs=(x,))
    gm = orthofx.transform(_Outer(), _policy("fx", "jacobian_isometry", exclude=["h.lin"]), example_inputs=(x,))
    gm.train()
    gm(x).sum().backward()
    assert orthofx.penalty(gm) > 0


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, num_layers=2)  # nested tensors in eval without gradients

    def forward(self, x, pad):
        return self.enc(x, src_key_padding_mask=pad)


@pytest.mark.parametrize("policy", ["lorth", "jacobian", "orthogonal"])
def test_transformer_encoder_with_a_padding_mask_transforms(policy):
    """transform's example run (eval, no gradients) takes torch's fast path, which hands nested tensors to the
    encoder's layers: recording their shapes raised "NestedTensorImpl doesn't support sizes", and transform blamed
    a Python branch."""
    torch.manual_seed(0)
    model = _Encoder()
    reference = copy.deepcopy(model)
    x, pad = torch.randn(3, 8, 16), torch.zeros(3, 8, dtype=torch.bool)
    pad[0, 5:] = True
    pad[2, 3:] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = orthofx.transform(model, policy, example_inputs=(x, pad))
    assert "enc.layers.1.linear2" in orthofx.report(gm).__str__()
    keep = ~pad  # the fast path leaves padded positions zero, the slow path computes them
    gm.eval()
    with torch.no_grad():
        fast = gm(x, pad)
    slow = gm(x, pad)
    torch.testing.assert_close(fast[keep], slow[keep].detach(), rtol=0, atol=1e-5)
    if policy != "orthogonal":  # regularisers change no output
        reference.eval()
        with torch.no_grad():
            torch.testing.assert_close(fast, reference(x, pad), rtol=0, atol=0)


class _Lstm(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.rnn = nn.LSTM(8, 8, num_layers=2, batch_first=batch_first)
        self.fc = nn.Linear(8, 8)

    def forward(self, x, state):
        return self.fc(self.rnn(x, state)[0])


@pytest.mark.parametrize("batch_first", [True, False])
def test_export_names_the_ambiguous_hidden_state_not_an_input_of_its_shape(batch_first, tmp_path):
    """x (2, 2, 8) and h_0 (num_layers 2, N 2, 8) share a shape: the batch of h_0 cannot be told from its sizes, and
    the refusal named x (example_inputs[0]) as the hidden state, matched by shape (a review)."""
    x, state = torch.randn(2, 2, 8), (torch.randn(2, 2, 8), torch.randn(2, 2, 8))
    gm = orthofx.transform(_Lstm(batch_first), "lorth", example_inputs=(x, state))
    with pytest.raises(orthofx.ExportError) as info:
        orthofx.export(gm, str(tmp_path / "m.pt2"), example_inputs=(x, state))
    message = str(info.value)
    if batch_first:  # x's batch is dimension 0: only h_0 is ambiguous
        assert message.startswith("example_inputs[1][0] (shape (2, 2, 8)) is the hidden state"), message
    else:  # seq-first: x (L 2, N 2) is ambiguous itself, and read as the layer's input
        assert message.startswith("example_inputs[0] (shape (2, 2, 8)) is the input of the seq-first"), message


class _StateListGru(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(8, 8)  # seq-first
        self.fc = nn.Linear(8, 8)

    def forward(self, state, x):
        h = state.pop(0)  # changes the list it is given
        return self.fc(self.gru(x, h)[0])


def test_recurrent_layout_pairs_each_input_with_its_own_copy_when_the_forward_changes_a_list():
    """The final read: the run's copies were listed after the run, so a forward popping from a list it is given
    shifted them: h_0 was read as the GRU's input and x was left out (the .pt2 export then kept no dynamic batch)."""
    from orthofx.capture import recurrent_batch_dims

    h0, x = torch.randn(1, 3, 8), torch.randn(5, 3, 8)  # h_0 (layers 1, N 3, 8), x (L 5, N 3, 8)
    state = [h0]
    found = recurrent_batch_dims(_StateListGru(), ([h0], x))
    assert {id(h0): "hidden state", id(x): "input"} == {key: read.role for key, read in found.items()}
    assert all(read.dim == 1 for read in found.values())
    assert state == [h0]  # the caller's list is not the one the run changed


def _orthofx_warnings(caught):
    return [w for w in caught if issubclass(w.category, orthofx.OrthofxWarning)]


def test_warnings_point_at_the_users_line():
    """An audit: ten warnings used a fixed stacklevel and named a line of orthofx or torch; they name the caller's
    line now (errors.caller_stacklevel)."""
    torch.manual_seed(0)
    scale_lost = {"orthofx": 1, "rules": [
        {"match": {"type": "Linear"}, "apply": "isometric_init", "with": {"gain": 2.0}},
        {"match": {"type": "Linear"}, "apply": "riemannian", "with": {"init": "project"}}]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        orthofx.transform(nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16)), scale_lost)
    found = [w for w in _orthofx_warnings(caught) if issubclass(w.category, orthofx.ScaleLostWarning)]
    assert found and all(w.filename == __file__ for w in found), [(w.filename, w.lineno) for w in found]

    every = {"orthofx": 1, "rules": [{"match": {"type": "Linear"}, "apply": "orth_regularizer",
                                      "with": {"every": 3}}]}
    gm = orthofx.transform(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)), every)
    state = dict(gm.state_dict())  # a plain dict: no _metadata
    other = orthofx.transform(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)), every)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        other.load_state_dict(state)
    found = _orthofx_warnings(caught)
    assert found and all(w.filename == __file__ for w in found), [(w.filename, w.lineno) for w in found]

    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    model[0]._register_state_dict_hook(lambda module, state, prefix, local_metadata: state)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        orthofx.transform(model, "orthogonal", example_inputs=(torch.randn(1, 4, 8, 8),))
    found = [w for w in _orthofx_warnings(caught) if "state-dict hook" in str(w.message) or
             "state_dict hook" in str(w.message)]
    assert found and all(w.filename == __file__ for w in found), [(w.filename, w.lineno, str(w.message)[:80])
                                                                   for w in _orthofx_warnings(caught)]
