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


class RnnTiedToLinear(nn.Module):
    """An nn.RNN whose first hidden-to-hidden weight is a square Linear's weight (one gate block: the same matrix);
    ``linear_first`` calls the Linear first in the forward (graph order decides which site a pass meets first)."""

    def __init__(self, linear_first: bool = False, num_layers: int = 1):
        super().__init__()
        self.rnn = nn.RNN(4, 4, num_layers=num_layers)
        self.lin = nn.Linear(4, 4)
        self.rnn.weight_hh_l0 = self.lin.weight
        self.linear_first = linear_first

    def forward(self, x):
        if self.linear_first:
            return self.rnn(self.lin(x))[0]
        return self.lin(self.rnn(x)[0])
