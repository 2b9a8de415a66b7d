"""Where a new text starts: the start metric, the candidate start states, and the choice between them.

A new text (a prime without a session, a scored text, a sample) is read from the model's start state
(`CharRNN.start`). The all-zero state is a poor one: the trainer carries the state from batch to batch, so
only the very first batch of a run ever starts from zeros, and the model hardly knows it.

The metric (`start_loss`): the mean -log p of the first PASSAGE_CHARS characters of passages that begin at a
line start (right after a newline), each read from the candidate start: the passage's first character is
read from the start (as a prime's first character is), and the next PASSAGE_CHARS are predicted. Measured on
held-out passages.

The candidates (`candidates`):
- `zero`: the all-zero state (every model before starts were chosen);
- `newline`, `two-newlines`: the state after reading "\\n" or "\\n\\n" from zeros;
- `mean-line-start`: the mean state (h and c) at line starts of the training text, each reached by reading
  the CONTEXT characters before it from zeros;
- `learned`: the start the trainer learned with the model (`charrnn train --learn-start P`), when it did;
- `tuned`: a start fitted to the trained model afterwards: the state itself optimised (Adam, weights frozen)
  on the metric over training-text passages, from the best of the others.
`choose_start` measures each on the held-out passages and keeps the lowest, as the trainer keeps the
checkpoint with the lowest held-out loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from charrnn.checkpoint import load_model, save_model
from charrnn.model import CharRNN, State
from charrnn.vocab import Vocab
from training.data import DataError

PASSAGE_CHARS = 32  # characters predicted per passage
PASSAGES = 2000  # held-out passages the metric reads (fewer when the text has fewer line starts)
CONTEXT = 256  # characters read before a line start for the mean state
MEAN_SAMPLES = 2000  # line starts of the training text the mean state averages
TUNE_STEPS = 300  # Adam steps of the tuned start
TUNE_BATCH = 128  # training passages per step
TUNE_LR = 0.02
SEED = 1337
BATCH = 256  # passages read at once when measuring
KINDS = ("zero", "newline", "two-newlines", "mean-line-start", "learned", "tuned")


@dataclass(frozen=True)
class StartLoss:
    nats: float  # mean -log p of the predicted characters
    passages: int
    by_position: tuple[float, ...]  # mean loss at each predicted position: [0] is the character after the first

    @property
    def chars(self) -> int:
        return self.passages * len(self.by_position)

    @property
    def bits(self) -> float:
        return self.nats / math.log(2)


def line_starts(ids: Tensor, newline: int, before: int = 0, after: int = PASSAGE_CHARS + 1) -> Tensor:
    """Positions p just after a newline with at least `before` characters before p and `after` from p on."""
    positions = (ids[:-1] == newline).nonzero().flatten() + 1
    return positions[(positions >= before) & (positions + after <= len(ids))]


def sample_positions(positions: Tensor, count: int, seed: int) -> Tensor:
    """Up to `count` of `positions`, drawn without replacement by a seeded generator, in text order."""
    if len(positions) <= count:
        return positions
    pick = torch.randperm(len(positions), generator=torch.Generator().manual_seed(seed))[:count]
    return positions[pick.sort().values]


def passages(ids: Tensor, vocab: Vocab, count: int = PASSAGES, chars: int = PASSAGE_CHARS,
             seed: int = SEED) -> Tensor:
    """(N, chars + 1) int64: up to `count` passages of `ids` that start at a line start, in text order."""
    if "\n" not in vocab.index:
        raise DataError("the text has no newline, so no line starts to measure a start on")
    starts = sample_positions(line_starts(ids, vocab.index["\n"], after=chars + 1), count, seed)
    if not len(starts):
        raise DataError(f"the held-out text has no line start followed by {chars + 1} characters")
    return ids.long()[starts[:, None] + torch.arange(chars + 1)]


def _expand(state: State, batch: int) -> State:
    return tuple(s.expand(-1, batch, -1).contiguous() for s in state)


def _device(model: CharRNN) -> torch.device:
    return model.head.weight.device


@torch.inference_mode()
def start_loss(model: CharRNN, texts: Tensor, state: State) -> StartLoss:
    """The metric: each passage's first character read from `state`, the next ones predicted, in eval mode."""
    was_training = model.training
    model.eval()
    device = _device(model)
    state = tuple(s.to(device).float() for s in state)
    total = torch.zeros(texts.shape[1] - 1, dtype=torch.float64)
    for i in range(0, len(texts), BATCH):
        chunk = texts[i : i + BATCH].to(device)
        logits, _ = model(chunk[:, :-1], _expand(state, len(chunk)))
        losses = F.cross_entropy(logits.float().transpose(1, 2), chunk[:, 1:], reduction="none")  # (B, T)
        total += losses.sum(0).double().cpu()
    model.train(was_training)
    by_position = (total / len(texts)).tolist()
    return StartLoss(sum(by_position) / len(by_position), len(texts), tuple(by_position))


@torch.inference_mode()
def prefix_state(model: CharRNN, vocab: Vocab, text: str) -> State:
    """The state after reading `text` from zeros."""
    was_training = model.training
    model.eval()
    ids = torch.from_numpy(vocab.encode(text)).long()[None].to(_device(model))
    _, state = model(ids, model.init_state(1))
    model.train(was_training)
    return tuple(s.float() for s in state)


@torch.inference_mode()
def mean_line_start(model: CharRNN, train_ids: Tensor, vocab: Vocab, samples: int = MEAN_SAMPLES,
                    context: int = CONTEXT, seed: int = SEED) -> State:
    """The mean state at up to `samples` line starts of `train_ids`, each read from zeros over the `context`
    characters before it."""
    positions = sample_positions(line_starts(train_ids, vocab.index["\n"], before=context, after=0), samples, seed)
    if not len(positions):
        raise DataError(f"the training text has no line start with {context} characters before it")
    was_training = model.training
    model.eval()
    device = _device(model)
    sums: list[Tensor] | None = None
    for i in range(0, len(positions), BATCH):
        at = positions[i : i + BATCH]
        chunk = train_ids.long()[at[:, None] - context + torch.arange(context)].to(device)
        _, state = model(chunk, model.init_state(len(chunk)))
        part = [s.float().sum(1, keepdim=True) for s in state]
        sums = part if sums is None else [a + b for a, b in zip(sums, part)]
    model.train(was_training)
    return tuple(s / len(positions) for s in sums)


def tune_start(model: CharRNN, train_ids: Tensor, vocab: Vocab, init: State, steps: int = TUNE_STEPS,
               batch: int = TUNE_BATCH, lr: float = TUNE_LR, seed: int = SEED) -> State:
    """A start fitted to the model: `init` optimised with Adam on the metric over training passages.

    The weights stay as they are (no gradient flows into them); only the state's tensors change. Each step reads
    `batch` passages drawn at random from the training text's line starts.
    """
    positions = line_starts(train_ids, vocab.index["\n"])
    if not len(positions):
        raise DataError("the training text has no line start to fit a start on")
    device = _device(model)
    was_training = model.training
    model.eval()  # no dropout; on a CPU the LSTM's backward runs in eval mode
    frozen = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    state = [s.detach().to(device).float().clone().requires_grad_(True) for s in init]
    optimizer = torch.optim.Adam(state, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    ids = train_ids.long()
    offsets = torch.arange(PASSAGE_CHARS + 1)
    try:
        for _ in range(steps):
            at = positions[torch.randint(len(positions), (batch,), generator=generator)]
            chunk = ids[at[:, None] + offsets].to(device)
            logits, _ = model(chunk[:, :-1], tuple(s.expand(-1, batch, -1) for s in state))
            loss = F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        for p, requires in zip(model.parameters(), frozen):
            p.requires_grad_(requires)
        model.train(was_training)
    return tuple(s.detach() for s in state)


@dataclass(frozen=True)
class Candidate:
    kind: str
    state: State
    loss: StartLoss  # the metric on the held-out passages


def candidates(model: CharRNN, train_ids: Tensor, val_ids: Tensor, vocab: Vocab, learned: bool = False,
               tune: bool = True, log: Callable[[str], None] = lambda _: None) -> list[Candidate]:
    """Every candidate start of `model` (KINDS; `learned` only when the trainer learned one), each measured on
    held-out passages of `val_ids`; `tuned` starts from the best of the others."""
    texts = passages(val_ids, vocab)
    L, H = model.config.layers, model.config.hidden
    states: dict[str, State] = {
        "zero": tuple(torch.zeros(L, 1, H) for _ in range(model.state_size)),
        "newline": prefix_state(model, vocab, "\n"),
        "two-newlines": prefix_state(model, vocab, "\n\n"),
        "mean-line-start": mean_line_start(model, train_ids, vocab),
    }
    if learned:
        states["learned"] = tuple(s.detach().float() for s in model.start_state(1))
    found = []
    for kind, state in states.items():
        found.append(Candidate(kind, tuple(s.cpu() for s in state), start_loss(model, texts, state)))
        log(f"start {kind}: {found[-1].loss.nats:.4f} nats/char over the first {PASSAGE_CHARS} characters")
    if tune:
        best = min(found, key=lambda c: c.loss.nats)
        state = tune_start(model, train_ids, vocab, best.state)
        found.append(Candidate("tuned", tuple(s.cpu() for s in state), start_loss(model, texts, state)))
        log(f"start tuned (from {best.kind}): {found[-1].loss.nats:.4f} nats/char")
    return found


def best(found: list[Candidate]) -> Candidate:
    return min(found, key=lambda c: c.loss.nats)


def describe(chosen: Candidate, found: list[Candidate]) -> dict:
    """What a checkpoint's `start` metadata says of a measured choice."""
    return {"kind": chosen.kind, "chosen": True,
            "metric": {"passages": chosen.loss.passages, "predicted_chars": PASSAGE_CHARS,
                       "at": "held-out line starts"},
            "loss": round(chosen.loss.nats, 5),
            "candidates": {c.kind: round(c.loss.nats, 5) for c in found}}


def choose_for_checkpoint(path: Path, train_ids: Tensor, val_ids: Tensor, device: torch.device | str = "cpu",
                          log: Callable[[str], None] = lambda _: None) -> dict:
    """Measure the candidate starts of the checkpoint at `path` and write the best into it (atomically, the
    weights and facts unchanged). Its stored start is the `learned` candidate when its metadata says it was
    learned. Returns what its metadata now says of the start."""
    model, vocab, info = load_model(path, str(device))
    found = candidates(model, train_ids, val_ids, vocab, learned=info.start.get("kind") == "learned", log=log)
    chosen = best(found)
    model.set_start(tuple(s.to(device) for s in chosen.state))
    start = describe(chosen, found)
    training = {k: v for k, v in info.training.items() if k != "weights_dtype"}
    save_model(path, model, vocab, training, dtype=info.training.get("weights_dtype", "fp32"), start=start)
    return start
