"""Session 29's own small fixes (the lead's; helpers' work is in the other *_s29 test files)."""

from __future__ import annotations

import textwrap
import warnings

import torch
from torch import nn

from orthofx.cli import main
from orthofx.export import batch_too_small_for_dynamic


class _SeqFirstGRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 6)  # batch_first=False: input (L, N, H_in)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][-1])


def test_a_sequence_of_length_one_is_not_a_batch_of_one_for_a_seq_first_model():
    torch.manual_seed(0)
    model, x = _SeqFirstGRU().eval(), torch.randn(1, 3, 4)  # L = 1, N = 3
    assert model.rnn(x)[1].shape[1] == 3  # the reference: the layer reads dimension 1 as the batch
    assert batch_too_small_for_dynamic((x,)) == 0  # without the model: dimension 0
    assert batch_too_small_for_dynamic((x,), model) is None
    assert batch_too_small_for_dynamic((torch.randn(4, 1, 4),), model) == 0  # N = 1 is still a batch of one
    assert batch_too_small_for_dynamic((torch.randn(1, 4),), nn.Linear(4, 2)) == 0


def test_cli_exports_a_seq_first_model_with_sequence_length_one_with_a_dynamic_batch(capsys, tmp_path):
    model_file = tmp_path / "gru_model.py"
    model_file.write_text(textwrap.dedent("""\
        import torch
        from torch import nn

        class SeqFirst(nn.Module):
            def __init__(self):
                super().__init__()
                self.rnn = nn.GRU(4, 6)
                self.head = nn.Linear(6, 2)

            def forward(self, x):
                return self.head(self.rnn(x)[0][-1])

        def make():
            torch.manual_seed(0)
            return SeqFirst()
        """))
    path = tmp_path / "m.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["transform", f"{model_file}:make", "--policy", "lorth", "--input-shape", "1,3,4",
                     "--export", str(path)])
    out = capsys.readouterr().out
    assert code == 0 and path.exists(), out
    assert "fixed batch" not in out
    program = torch.export.load(str(path))
    # the written program takes another batch N (dimension 1) at the example's sequence length
    y = program.module()(torch.randn(1, 5, 4))
    assert y.shape == (5, 2)
