"""The one inference path: everything that turns a trained model into characters runs through `Engine`.

`charrnn sample`, the trainer's samples, the server's decoder, `/inspect` and the benchmarks all call it;
training alone uses `CharRNN.forward` (`nn.LSTM`). The recurrent cells are written once, here.

The promise it keeps: **a row's result depends only on that row.** Stepped alone or inside a batch of any
size, at any position, read as part of one long prime or in slices, a sequence gets the same logits and the
same state, bit for bit. So a seeded request gives the same text whoever else the server is serving.
Three things make that true:
- every matrix product is a oneDNN matmul on weights packed once for an unknown batch size
  (`torch.ops.mkldnn._linear_pointwise`): one kernel for every batch size, each output row reduced in the
  same order whatever the rows around it (MKL's `F.linear` picks other kernels as the batch grows and moves
  rows by ~1e-6; `nn.LSTM` in bf16 by ~1e-2). tests/test_batch_invariance.py checks this as a property;
- stepping and reading a prime do the same arithmetic: per layer, the input projection (a table lookup for
  the first layer, whose input is a character) plus the recurrent projection, then the cell. Reading a prime
  runs a layer over all its characters before the next layer, so the input projections of a whole slice are
  one matrix product, and the recurrence runs a character at a time;
- the gates' sigmoid is computed through tanh (`sigmoid_of_halved_`), whose vectorised and leftover-element
  paths agree bit for bit, where `torch.sigmoid`'s do not.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from charrnn.model import CharRNN, State
from charrnn.sampling import sample_next
from charrnn.vocab import Vocab

PRECISIONS = ("fp32", "bf16")


def packed_matmul_available() -> bool:
    return torch.backends.mkldnn.is_available()


def bf16_units() -> bool:
    """Whether oneDNN multiplies bf16 natively on this CPU (AVX-512 bf16 or AVX-NE-CONVERT; not AVX2 alone)."""
    return packed_matmul_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_precision(precision: str) -> str:
    """`auto`: bf16 where the CPU multiplies bf16 natively (oneDNN says so), else fp32."""
    if precision == "auto":
        return "bf16" if bf16_units() else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, fp32 or bf16, not {precision!r}")
    return precision


def start_ids(vocab: Vocab, ids: Sequence[int]) -> list[int]:
    """The ids a new text reads from the model's start: the prime's, or a newline when the prime is empty
    (char-rnn's rule)."""
    return list(ids) if len(ids) else [vocab.index.get("\n", 0)]


class Linear:
    """x (B, K) fp32 -> x @ w.T + b (B, N) fp32, each output row a function of its input row alone.

    The weight is packed once for oneDNN with the batch size left open, so every call runs the same kernel.
    In bf16 the inputs and weights are bfloat16 and the products are accumulated in fp32. A CPU without bf16
    units gets the same numbers the slow way: inputs and weights rounded to bf16, multiplied by the fp32 kernel
    (a product of two bf16 values is exact in fp32), the result rounded to bf16.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, dtype: torch.dtype):
        self.dtype = dtype
        self.packed = packed_matmul_available()
        self.emulated = dtype == torch.bfloat16 and not bf16_units()
        compute = torch.float32 if self.emulated else dtype
        weight = weight.detach().to("cpu", dtype).to(compute).contiguous()
        self.bias = None if bias is None else bias.detach().to("cpu", dtype).to(compute).contiguous()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, None) if self.packed else weight

    def __call__(self, x: Tensor) -> Tensor:
        return self.raw(x).float()

    def raw(self, x: Tensor) -> Tensor:
        """The product in the compute dtype (bf16 stays bf16), for callers that add it to an fp32 tensor."""
        x = x.to(self.dtype)
        if self.emulated:
            x = x.float()
        if self.packed:
            out = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        else:
            out = F.linear(x, self.weight, self.bias)  # not batch-invariant in general; only without oneDNN
        return out.to(self.dtype) if self.emulated else out


class Layer:
    """One recurrent layer: where its input projection comes from, and its recurrent projection."""

    def __init__(self, inp: Linear | Tensor, rec: Linear):
        self.inp = inp  # layer 0: a (vocab, gates) table indexed by character; above: a Linear on h below
        self.rec = rec

    def project(self, x: Tensor) -> Tensor:
        """Input projections for ids (layer 0) or for the layer below's outputs."""
        return self.inp[x] if isinstance(self.inp, Tensor) else self.inp(x)


def sigmoid_of_halved_(x: Tensor) -> Tensor:
    """sigmoid(2x), in place, as 0.5 * tanh(x) + 0.5: the rows of the sigmoid gates are stored pre-halved.

    `torch.sigmoid` computes the elements that fill a whole vector register differently from the leftover
    ones (63 of 2,000 values differ in the last bit here), and which elements are leftovers depends on the
    batch size; `torch.tanh` gives the same bits either way, so this form keeps rows independent of the batch.
    Halving a weight is exact, so halving the rows instead of the gate values changes no bit.
    """
    return torch.tanh_(x).mul_(0.5).add_(0.5)


def lstm_cell(gi: Tensor, gh: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """PyTorch's LSTM, with the gates stored in the order i, f, o, g (see `Engine`), biases already in gi."""
    H = c.shape[1]
    gates = torch.add(gi, gh)  # fp32 (gh may be bf16)
    ifo = sigmoid_of_halved_(gates[:, : 3 * H])  # the three sigmoid gates in one call
    g = torch.tanh(gates[:, 3 * H :])
    c = torch.addcmul(ifo[:, H : 2 * H] * c, ifo[:, :H], g)  # f * c + i * g
    return ifo[:, 2 * H :] * torch.tanh(c), c


def gru_cell(gi: Tensor, gh: Tensor, h: Tensor) -> Tensor:
    """PyTorch's GRU: the reset gate scales only the recurrent part of n, so gi and gh stay apart."""
    ir, iz, in_ = gi.chunk(3, dim=1)
    hr, hz, hn = gh.chunk(3, dim=1)
    r, z = sigmoid_of_halved_(ir + hr), sigmoid_of_halved_(iz + hz)
    n = torch.tanh(in_ + r * hn)
    return (1 - z) * n + z * h


def rnn_cell(gi: Tensor, gh: Tensor, h: Tensor) -> Tensor:
    return torch.tanh(torch.add(gi, gh))


class Engine:
    """A trained model ready for inference: batch-invariant steps, primes, traces and sampling.

    States are tuples of fp32 tensors (layers, batch, hidden): (h, c) for an LSTM, (h,) otherwise, the
    same layout as `CharRNN.forward`, so training, checkpoints and sessions share it.

    Every new text is read from the model's start (`start`, chosen by training/start.py): wherever a state
    may be None below, None means the start. This is the one place that rule lives.
    """

    def __init__(self, model: CharRNN, precision: str = "auto"):
        cfg = model.config  # only the weights are copied: no dropout here, whatever mode the model is in
        self.config = cfg
        self.precision = resolve_precision(precision)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        rnn = model.rnn
        self.layers: list[Layer] = []
        with torch.no_grad():
            for layer in range(cfg.layers):
                w_ih, w_hh, b_ih, b_hh = (getattr(rnn, f"{name}_l{layer}").float().clone()  # ours to change
                                          for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
                H = cfg.hidden
                if cfg.cell == "lstm":  # PyTorch's gate order i, f, g, o -> i, f, o, g: the sigmoids side by side
                    order = torch.cat([torch.arange(2 * H), torch.arange(3 * H, 4 * H), torch.arange(2 * H, 3 * H)])
                    w_ih, w_hh, b_ih, b_hh = w_ih[order], w_hh[order], b_ih[order], b_hh[order]
                halved = {"lstm": 3 * H, "gru": 2 * H, "rnn": 0}[cfg.cell]  # rows of sigmoid gates (i, f, o; r, z)
                for t in (w_ih, w_hh, b_ih, b_hh):
                    t[:halved] *= 0.5
                if cfg.cell == "gru":  # b_hh belongs inside r * (W_hn h + b_hn)
                    in_bias, rec_bias = b_ih, b_hh
                else:
                    in_bias, rec_bias = b_ih + b_hh, None
                if layer == 0:  # the input is a character: its projection is a row of a table, in fp32
                    inp: Linear | Tensor = F.linear(model.embedding.weight.float(), w_ih, in_bias).cpu()
                else:
                    inp = Linear(w_ih, in_bias, dtype)
                self.layers.append(Layer(inp, Linear(w_hh, rec_bias, dtype)))
            self.head = Linear(model.head.weight.float(), model.head.bias.float(), dtype)
            self.start: State = tuple(s.detach().to("cpu", torch.float32).clone() for s in model.start_state(1))

    # --- states ---

    @property
    def state_size(self) -> int:
        return 2 if self.config.cell == "lstm" else 1

    def start_state(self, batch: int = 1) -> State:
        """The model's start for `batch` new texts: new tensors, so a caller may keep or change them."""
        return tuple(s.repeat(1, batch, 1) for s in self.start)

    def _cell(self, layer: int, gi: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """One time step of one layer for the rows of gi (their input projections)."""
        gh = self.layers[layer].rec.raw(h)
        if self.config.cell == "lstm":
            return lstm_cell(gi, gh, h, c)
        return (gru_cell if self.config.cell == "gru" else rnn_cell)(gi, gh, h), None

    # --- stepping ---

    @torch.inference_mode()
    def step(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        """ids (B,) -> logits (B, V) for the next character, and the state after `ids`."""
        lstm = self.config.cell == "lstm"
        x = ids
        hs, cs = [], []
        for layer, spec in enumerate(self.layers):
            h, c = self._cell(layer, spec.project(x), state[0][layer], state[1][layer] if lstm else None)
            hs.append(h)
            cs.append(c)
            x = h
        new_state = (torch.stack(hs), torch.stack(cs)) if lstm else (torch.stack(hs),)
        return self.head(x), new_state

    # --- reading text ---

    @torch.inference_mode()
    def read(self, prompts: Sequence[Sequence[int]], states: Sequence[State | None],
             keep_layer: int | None = None) -> tuple[list[State], list[tuple[Tensor, ...]]]:
        """Read each prompt from its state (None: the model's start); returns each one's state after it.

        Prompts of different lengths are read together, a layer at a time over all characters. A prompt's
        result equals stepping it one character at a time, and does not depend on the other prompts or on
        how it was cut into pieces. With `keep_layer`, also returns, per prompt, that layer's h (T, H) at
        every character (and c for an LSTM) and the last layer's h, for tracing.
        """
        L = self.config.layers
        lstm = self.config.cell == "lstm"
        n = len(prompts)
        starts = [s if s is not None else self.start_state(1) for s in states]
        if not any(prompts):
            if keep_layer is not None:
                raise ValueError("there is nothing to trace: every prompt is empty")
            return list(starts), []
        order = sorted(range(n), key=lambda r: -len(prompts[r]))  # longest first: active rows are a prefix
        lengths = [len(prompts[r]) for r in order]
        T = lengths[0]
        active = [sum(1 for length in lengths if length > t) for t in range(T)]  # rows still reading at step t
        offsets = [0]
        for count in active:
            offsets.append(offsets[-1] + count)
        # time-major packing: the characters of step t for the active rows, in `order`
        flat = torch.tensor([prompts[order[r]][t] for t in range(T) for r in range(active[t])], dtype=torch.long)
        h_all = [torch.cat([starts[r][0][layer] for r in order]) for layer in range(L)]
        c_all = [torch.cat([starts[r][1][layer] for r in order]) for layer in range(L)] if lstm else None
        x: Tensor = flat
        kept: list[Tensor] = []
        for layer, spec in enumerate(self.layers):
            gi_all = spec.project(x)  # (sum of lengths, gates): one matrix product for the whole slice
            keep_c = lstm and layer == keep_layer
            x, h_all[layer], c, cs = self._read_layer(layer, gi_all, active, offsets, h_all[layer],
                                                      c_all[layer] if lstm else None, keep_c)
            if lstm:
                c_all[layer] = c
            if layer == keep_layer:
                kept = [x] + ([cs] if keep_c else [])
        finals: list[State] = [()] * n
        for pos, r in enumerate(order):
            h = torch.stack([h_all[layer][pos] for layer in range(L)])[:, None]
            finals[r] = (h, torch.stack([c_all[layer][pos] for layer in range(L)])[:, None]) if lstm else (h,)
        traces: list[tuple[Tensor, ...]] = []
        if keep_layer is not None:
            for r in range(n):
                pos = order.index(r)
                rows = [offsets[t] + pos for t in range(lengths[pos])]
                traces.append(tuple(k[rows] for k in kept) + (x[rows],))
        return finals, traces

    def _read_layer(self, layer: int, gi_all: Tensor, active: list[int], offsets: list[int], h: Tensor,
                    c: Tensor | None, keep_c: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """One layer over packed time steps: at step t the first `active[t]` rows, whose input projections are
        gi_all[offsets[t]:offsets[t + 1]]. Returns its h at every packed position, the final h and c, and with
        `keep_c` its c at every packed position."""
        out = torch.empty(offsets[-1], self.config.hidden)
        cs = torch.empty_like(out) if keep_c else None
        for t, a in enumerate(active):
            lo, hi = offsets[t], offsets[t + 1]
            h_new, c_new = self._cell(layer, gi_all[lo:hi], h[:a], c[:a] if c is not None else None)
            h = h_new if a == h.shape[0] else torch.cat([h_new, h[a:]])  # rows past `a` have ended
            if c is not None:
                c = c_new if a == c.shape[0] else torch.cat([c_new, c[a:]])
            if cs is not None:
                cs[lo:hi] = c_new
            out[lo:hi] = h_new
        return out, h, c, cs

    @torch.inference_mode()
    def trace(self, ids: Sequence[int], layer: int) -> tuple[Tensor, Tensor | None, Tensor]:
        """Read `ids` from the model's start: `layer`'s h (T, H) and c (LSTM; else None) after every character,
        and the logits (T, V) for the character after each."""
        _, (kept,) = self.read([ids], [None], keep_layer=layer)
        h, c = kept[0], kept[1] if len(kept) == 3 else None
        return h, c, self.head(kept[-1])

    @torch.inference_mode()
    def score(self, ids: Sequence[int], state: State | None = None) -> tuple[Tensor, State]:
        """Read `ids` from `state` (None: the model's start): the model's log-probabilities (T, V) after each id, and the
        state after them all.

        Row t is `log_softmax` of the logits `step` gives after ids[t], bit for bit: the model's distribution of
        ids[t + 1] (the last row: of the character that follows). So ids[t + 1]'s log-probability is
        rows[t, ids[t + 1]]; ids[0] has none (to score it, start from the state before the character before
        it and put that character first, as a session's `next_input`). `charrnn.sampling.chosen_and_top`
        picks each row's chosen and top-k log-probabilities.
        """
        if not len(ids):
            return torch.empty(0, self.config.vocab_size), state if state is not None else self.start_state(1)
        (final,), (kept,) = self.read([ids], [state], keep_layer=self.config.layers - 1)
        return torch.log_softmax(self.head(kept[-1]), dim=-1), final  # kept[-1]: the last layer's h per id

    # --- generating ---

    def warm_up(self) -> None:
        """Read a short prime and take a few steps, so the first request does not pay for lazy set-up."""
        (state,), _ = self.read([[0] * 8], [None])
        ids = torch.zeros(1, dtype=torch.long)
        for _ in range(3):
            _, state = self.step(ids, state)

    def generate(self, vocab: Vocab, prime: str = "", length: int = 200, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 skip_unknown: bool = False) -> Iterator[str]:
        """Yield `length` characters continuing `prime`, read from the model's start (an empty prime: a newline).

        Draws like the server: one `random.Random(seed)` per generation, so the same seed gives the same
        text here and from the service.
        """
        generator = random.Random(seed)  # seed None: from the OS
        ids = start_ids(vocab, vocab.encode(prime, skip_unknown=skip_unknown).tolist())
        (state,), _ = self.read([ids[:-1]], [None])
        next_id = torch.tensor([ids[-1]])
        for _ in range(length):
            logits, state = self.step(next_id, state)
            next_id = sample_next(logits, temperature, top_k, top_p, generator)
            yield vocab.chars[int(next_id)]
