"""The character-level RNN: embedding -> LSTM/GRU/RNN -> linear to the vocabulary.

This module imports only torch, so the trainer, the offline sampler and the server share it.
The recurrent state is passed in and returned (like the post's `rnn.step(x)`), never kept inside
the module, so one model serves many sessions.
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


class Stepper:
    """One-character decoding steps for a batch of independent sequences.

    `nn.LSTM` called with one time step reorders its weights on every call, which dominates at small batch.
    The cells are written out here with the input and recurrent weights fused into one matrix per layer, so a
    step is one matrix product per layer plus the output layer. Results equal `CharRNN.forward` up to float
    rounding.

    `precision="bf16"` keeps the weights in bfloat16 and multiplies in bfloat16 (states stay fp32): half the
    memory traffic, and on CPUs with bf16 units about twice the batched throughput. Both precisions give
    each row a result that does not depend on the other rows of the batch.
    """

    def __init__(self, model: CharRNN, precision: str = "fp32"):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, not {precision!r}")
        cfg = model.config
        self.config = cfg
        self.precision = precision
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.dtype = dtype
        self.embedding = model.embedding.weight.detach().to(dtype)
        self.layers: list[tuple[Tensor, ...]] = []
        for layer in range(cfg.layers):
            w_ih = getattr(model.rnn, f"weight_ih_l{layer}").detach()
            w_hh = getattr(model.rnn, f"weight_hh_l{layer}").detach()
            b_ih = getattr(model.rnn, f"bias_ih_l{layer}").detach()
            b_hh = getattr(model.rnn, f"bias_hh_l{layer}").detach()
            # (out, in) layout: F.linear on it is the fast kernel at batch 1 (a plain GEMV).
            if cfg.cell == "gru":  # the reset gate multiplies only the recurrent part of n, so keep them apart
                self.layers.append((w_ih.to(dtype).contiguous(), b_ih.to(dtype), w_hh.to(dtype).contiguous(),
                                    b_hh.to(dtype)))
            else:
                self.layers.append((torch.cat([w_ih, w_hh], dim=1).to(dtype).contiguous(), (b_ih + b_hh).to(dtype)))
        self.head_w = model.head.weight.detach().to(dtype).contiguous()  # (V, H)
        self.head_b = model.head.bias.detach().to(dtype)

    @torch.inference_mode()
    def step(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        """ids (B,) -> fp32 logits (B, V) for the next character, and the (fp32) state after `ids`."""
        dt = self.dtype
        x = self.embedding[ids]  # (B, E)
        cell = self.config.cell
        if cell == "lstm":
            h, c = state
            hs, cs = [], []
            for layer, (w, b) in enumerate(self.layers):
                gates = F.linear(torch.cat([x, h[layer].to(dt)], dim=1), w, b).float()  # (B, 4H): i, f, g, o
                i, f, g, o = gates.chunk(4, dim=1)
                c_new = torch.sigmoid(f) * c[layer] + torch.sigmoid(i) * torch.tanh(g)
                h_new = torch.sigmoid(o) * torch.tanh(c_new)
                hs.append(h_new)
                cs.append(c_new)
                x = h_new.to(dt)
            new_state: State = (torch.stack(hs), torch.stack(cs))
        elif cell == "gru":
            (h,) = state
            hs = []
            for layer, (w_i, b_i, w_h, b_h) in enumerate(self.layers):
                gi = F.linear(x, w_i, b_i).float()  # (B, 3H): r, z, n
                gh = F.linear(h[layer].to(dt), w_h, b_h).float()
                ir, iz, in_ = gi.chunk(3, dim=1)
                hr, hz, hn = gh.chunk(3, dim=1)
                r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
                n = torch.tanh(in_ + r * hn)
                h_new = (1 - z) * n + z * h[layer]
                hs.append(h_new)
                x = h_new.to(dt)
            new_state = (torch.stack(hs),)
        else:
            (h,) = state
            hs = []
            for layer, (w, b) in enumerate(self.layers):
                h_new = torch.tanh(F.linear(torch.cat([x, h[layer].to(dt)], dim=1), w, b).float())
                hs.append(h_new)
                x = h_new.to(dt)
            new_state = (torch.stack(hs),)
        return F.linear(x, self.head_w, self.head_b).float(), new_state
