"""The character-level RNN: embedding -> LSTM/GRU/RNN -> linear to the vocabulary.

This module imports only torch. The trainer trains it (`nn.LSTM`, fast over whole sequences); everything
that runs a trained model reads its weights through `charrnn.engine.Engine`. The recurrent state is passed
in and returned (like the post's `rnn.step(x)`), never kept inside the module, so one model serves many
sessions.

A model also holds its *start* (`start_state`): the state every new text is read from. training/start.py
chooses it by measurement when a run ends (or the trainer learns it, `--learn-start`); it is zero until then,
and in checkpoints written before starts existed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The state is always a tuple: (h, c) for an LSTM, (h,) for a GRU or a plain RNN.
# Each tensor is (layers, batch, hidden), so sessions stack and split along dim 1.
State = tuple[Tensor, ...]

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
# What nn.LSTM/GRU/RNN call for a whole sequence, used one layer at a time when the weights are dropped
LAYER_FUNCTIONS = {"lstm": torch.lstm, "gru": torch.gru, "rnn": torch.rnn_tanh}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int  # number of distinct characters
    cell: str = "lstm"  # lstm | gru | rnn
    layers: int = 2  # stacked recurrent layers
    hidden: int = 512  # units per layer
    embed: int = 64  # size of the character embedding fed to the first layer
    dropout: float = 0.0  # between layers and before the output layer (training only)
    # AWD-LSTM's regularisers (Merity et al. 2017), training only: the served weights are the same tensors
    weight_drop: float = 0.0  # DropConnect on the hidden-to-hidden weights, one mask per batch
    embed_drop: float = 0.0  # drops whole characters' embeddings, one mask per batch
    locked_dropout: bool = False  # `dropout` with one mask per sequence for all its steps (variational)

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, not {self.cell!r}")
        if self.vocab_size < 1 or self.layers < 1 or self.hidden < 1 or self.embed < 1:
            raise ValueError("vocab_size, layers, hidden and embed must be positive")
        for name in ("dropout", "weight_drop", "embed_drop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), not {getattr(self, name)}")

    @property
    def per_layer(self) -> bool:
        """Whether training steps the layers one at a time (DropConnect or locked masks between them)."""
        return self.weight_drop > 0 or (self.locked_dropout and self.dropout > 0)

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
        # The start: h (and c) of shape (layers, 1, hidden). Trained only under `--learn-start`.
        self.start = nn.ParameterList(nn.Parameter(torch.zeros(config.layers, 1, config.hidden), requires_grad=False)
                                      for _ in range(self.state_size))
        self.register_load_state_dict_pre_hook(_zero_start_if_missing)

    @property
    def state_size(self) -> int:
        """How many tensors make up the state: 2 for an LSTM (h, c), 1 otherwise."""
        return 2 if self.config.cell == "lstm" else 1

    def init_state(self, batch: int) -> State:
        """The all-zero state for `batch` independent sequences."""
        weight = self.head.weight
        shape = (self.config.layers, batch, self.config.hidden)
        return tuple(torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in range(self.state_size))

    def start_state(self, batch: int) -> State:
        """The state a new text is read from, for `batch` sequences (differentiable when the start is learned)."""
        return tuple(s.repeat(1, batch, 1) for s in self.start)

    @torch.no_grad()
    def set_start(self, state: State) -> None:
        """Make `state` (tensors of shape (layers, 1, hidden)) the start."""
        if len(state) != self.state_size or any(s.shape != p.shape for s, p in zip(state, self.start)):
            raise ValueError(f"a start of this model is {self.state_size} tensor(s) of shape "
                             f"{tuple(self.start[0].shape)}")
        for p, s in zip(self.start, state):
            p.copy_(s)

    def forward(self, ids: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """ids (B, T) of character indices -> logits (B, T, V) and the state after the last character."""
        B = ids.shape[0]
        if state is None:
            state = self.init_state(B)
        x = self._embed(ids)  # (B, T, E)
        if self.training and self.config.per_layer:
            out, new_state = self._layer_by_layer(x, state)
        elif self.config.cell == "lstm":
            out, (h, c) = self.rnn(x, state)
            new_state: State = (h, c)
        else:
            out, h = self.rnn(x, state[0])
            new_state = (h,)
        logits = self.head(self._dropout(out))  # (B, T, V)
        return logits, new_state

    def _embed(self, ids: Tensor) -> Tensor:
        """The characters' embeddings; in training with `embed_drop`, some characters' rows are all zero."""
        if not (self.training and self.config.embed_drop > 0):
            return self.embedding(ids)
        p = self.config.embed_drop  # one mask per batch: a dropped character looks like no character at all
        keep = torch.rand(self.config.vocab_size, 1, device=ids.device) >= p
        return F.embedding(ids, self.embedding.weight * keep / (1 - p))

    def _dropout(self, x: Tensor) -> Tensor:
        """`dropout` on (B, T, D): per element, or with one mask per sequence when locked."""
        if not (self.training and self.config.locked_dropout and self.config.dropout > 0):
            return self.drop(x)
        p = self.config.dropout
        return x * (torch.rand(x.shape[0], 1, x.shape[2], device=x.device) >= p) / (1 - p)

    def _layer_by_layer(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """The stack one layer at a time (what nn.LSTM does inside), so masks can go on weights and between layers."""
        cfg, rnn = self.config, self.rnn
        step = LAYER_FUNCTIONS[cfg.cell]
        finals: list[tuple[Tensor, ...]] = []
        for layer in range(cfg.layers):
            w_ih, w_hh, b_ih, b_hh = (getattr(rnn, f"{name}_l{layer}")
                                      for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            if cfg.weight_drop > 0:  # DropConnect: the same dropped recurrent weights at every step of the batch
                w_hh = F.dropout(w_hh, cfg.weight_drop, training=True)
            if layer > 0:
                x = self._dropout(x)
            hx = tuple(s[layer : layer + 1] for s in state)
            # positional: has_biases, num_layers, dropout, train, bidirectional, batch_first
            x, *final = step(x, hx if cfg.cell == "lstm" else hx[0], [w_ih, w_hh, b_ih, b_hh],
                             True, 1, 0.0, True, False, True)
            finals.append(tuple(final))
        return x, tuple(torch.cat(parts) for parts in zip(*finals))

    def num_parameters(self) -> int:
        """The weights' size (the start state is not counted)."""
        return sum(p.numel() for name, p in self.named_parameters() if not name.startswith("start."))


def _zero_start_if_missing(module: CharRNN, state_dict: dict, prefix: str, *_) -> None:
    """Checkpoints and resume files written before starts existed load with the zero start they had."""
    for i, p in enumerate(module.start):
        state_dict.setdefault(f"{prefix}start.{i}", torch.zeros_like(p))


def detach_state(state: State) -> State:
    """Cut the graph between truncated-BPTT chunks while keeping the values."""
    return tuple(s.detach() for s in state)
