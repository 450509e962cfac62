"""Small recurrent models the recurrent-layer tests share: an nn.RNN / LSTM / GRU over a sequence, and a cell
stepped over it in a Python loop, each with a Linear head."""

from torch import nn


class Sequence(nn.Module):
    """A recurrent layer over a sequence and a Linear head on its last step."""

    def __init__(self, rnn: nn.Module, width: int):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y[:, -1])


class CellLoop(nn.Module):
    """A cell stepped over the sequence in a Python loop (traced unrolled: one site called several times)."""

    def __init__(self, cell: nn.Module):
        super().__init__()
        self.rnn = cell
        self.head = nn.Linear(cell.hidden_size, 3)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], self.rnn.hidden_size)
        state = (h, h) if isinstance(self.rnn, nn.LSTMCell) else h
        for t in range(x.shape[1]):
            state = self.rnn(x[:, t], state)
        return self.head(state[0] if isinstance(state, tuple) else state)
