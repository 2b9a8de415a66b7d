"""The character-level RNN: embedding -> LSTM/GRU/RNN -> linear to the vocabulary.

This module imports only torch. The trainer trains it (`nn.LSTM`, fast over whole sequences); everything
that runs a trained model reads its weights through `charrnn.engine.Engine`. The recurrent state is passed
in and returned (like the post's `rnn.step(x)`), never kept inside the module, so one model serves many
sessions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

# The state is always a tuple: (h, c) for an LSTM, (h,) for a GRU or a plain RNN.
# Each tensor is (layers, batch, hidden), so sessions stack and split along dim 1.
State = tuple[Tensor, ...]

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int  # number of distinct characters
    cell: str = "lstm"  # lstm | gru | rnn
    layers: int = 2  # stacked recurrent layers
    hidden: int = 512  # units per layer
    embed: int = 64  # size of the character embedding fed to the first layer
    dropout: float = 0.0  # between layers and before the output layer (training only)

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, not {self.cell!r}")
        if self.vocab_size < 1 or self.layers < 1 or self.hidden < 1 or self.embed < 1:
            raise ValueError("vocab_size, layers, hidden and embed must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


class CharRNN(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embed)
        self.rnn = CELLS[config.cell](
            config.embed,
            config.hidden,
            num_layers=config.layers,
            dropout=config.dropout if config.layers > 1 else 0.0,
            batch_first=True,
        )
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden, config.vocab_size)

    @property
    def state_size(self) -> int:
        """How many tensors make up the state: 2 for an LSTM (h, c), 1 otherwise."""
        return 2 if self.config.cell == "lstm" else 1

    def init_state(self, batch: int) -> State:
        """The all-zero state for `batch` independent sequences."""
        weight = self.head.weight
        shape = (self.config.layers, batch, self.config.hidden)
        return tuple(torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in range(self.state_size))

    def forward(self, ids: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """ids (B, T) of character indices -> logits (B, T, V) and the state after the last character."""
        B = ids.shape[0]
        if state is None:
            state = self.init_state(B)
        x = self.embedding(ids)  # (B, T, E)
        if self.config.cell == "lstm":
            out, (h, c) = self.rnn(x, state)
            new_state: State = (h, c)
        else:
            out, h = self.rnn(x, state[0])
            new_state = (h,)
        logits = self.head(self.drop(out))  # (B, T, V)
        return logits, new_state

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def detach_state(state: State) -> State:
    """Cut the graph between truncated-BPTT chunks while keeping the values."""
    return tuple(s.detach() for s in state)
