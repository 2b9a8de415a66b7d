"""Held-out loss of a trained model, measured three ways (nats per character; bits = nats / ln 2).

Run it through the CLI: `charrnn evaluate shakespeare --data data/tinyshakespeare.txt [--protocol windows]
[--dynamic]` (see `charrnn evaluate --help`). Each function takes the held-out ids (training.data.split) and
says exactly what it measures:

- `stream_loss`: the trainer's validation: the text as up to 64 contiguous streams from the model's start,
  hidden state carried.
- `windows_loss`: nanoGPT's `estimate_loss`: random 256-character windows, each read from the zero state.
- `dynamic_evaluation`: Krause et al. (2018) with plain SGD: one stream that keeps learning as it reads, its
  learning rate chosen on the first half of the text and reported on the second, beside the static loss there.

Scoring uses the weights as given (the CLI loads them as fp32), with dropout off; nothing here writes a checkpoint.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from charrnn.model import CharRNN, detach_state
from training.data import DataError, val_batches
from training.train import evaluate

WINDOW = 256  # nanoGPT shakespeare_char's block_size: characters per window
WINDOW_BATCHES = 200  # nanoGPT's eval_iters
WINDOW_BATCH_SIZE = 64  # nanoGPT's batch_size: windows per batch
SEED = 1337  # window starts come from a generator seeded with this
SEGMENT = 64  # dynamic evaluation: characters scored between two SGD steps
# Half-decade steps for the step on a segment's *mean* loss: on the six bundled models the best was 0.03 to 0.3,
# 1e-3 gained little and 1.0 made latex worse than static (docs/experiments.md).
LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


@dataclass(frozen=True)
class Loss:
    nats: float  # mean -log p(next character), natural log
    chars: int  # predicted characters it is the mean of

    @property
    def bits(self) -> float:
        return self.nats / math.log(2)


@dataclass(frozen=True)
class WindowsLoss(Loss):
    windows: int = 0
    by_position: tuple[float, ...] = ()  # mean loss at each position of a window: [0] has no context at all


@dataclass(frozen=True)
class DynamicResult:
    lr: float  # the SGD learning rate used on the reported half
    tuning: dict[float, float]  # learning rate -> dynamic loss on the first half (empty when lr was given)
    tuned_chars: int  # characters of the first half
    static: Loss  # the second half, one stream, state carried, fixed weights
    dynamic: Loss  # the same characters, read by a copy that takes an SGD step after each segment


def _device(model: CharRNN) -> torch.device:
    return model.head.weight.device


def stream_loss(model: CharRNN, val_ids: Tensor, batch_size: int = 64, seq_len: int = 128) -> Loss:
    """The trainer's validation loss (training.train.evaluate on training.data.val_batches).

    `val_ids` is cut into up to `batch_size` equal contiguous streams, read `seq_len` characters at a time;
    each stream starts from the model's start state and carries its state to the end. The mean of -log p over every
    predicted character; the tail that does not fill a whole chunk of every stream is not scored.
    """
    batches = val_batches(val_ids, batch_size, seq_len)
    nats = evaluate(model, batches, _device(model))
    return Loss(nats, len(batches) * batches.batch_size * batches.seq_len)


def window_starts(n_ids: int, window: int, batches: int, batch_size: int, seed: int) -> list[Tensor]:
    """nanoGPT's draws: per batch, `batch_size` starts uniform in [0, n_ids - window), from one seeded generator."""
    if n_ids < window + 1:
        raise DataError(f"the held-out text has {n_ids} characters, too short for a window of {window} "
                        f"(needs {window + 1}); use a smaller --window")
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(n_ids - window, (batch_size,), generator=generator) for _ in range(batches)]


@torch.inference_mode()
def windows_loss(model: CharRNN, val_ids: Tensor, window: int = WINDOW, batches: int = WINDOW_BATCHES,
                 batch_size: int = WINDOW_BATCH_SIZE, seed: int = SEED) -> WindowsLoss:
    """nanoGPT's held-out loss: the mean of -log p over every position of `batches` x `batch_size` random windows.

    A window starting at i reads val_ids[i : i + window] from the zero state and predicts
    val_ids[i + 1 : i + window + 1]; starts are drawn as `window_starts` draws them. Each window is scored on
    its own, so its first characters are predicted with little or no context; `by_position` gives the mean
    loss at each position.
    """
    was_training = model.training
    model.eval()
    device = _device(model)
    ids = val_ids.to(device).long()
    offsets = torch.arange(window + 1, device=device)
    by_position = torch.zeros(window, dtype=torch.float64, device=device)
    for starts in window_starts(len(val_ids), window, batches, batch_size, seed):
        chunk = ids[starts.to(device)[:, None] + offsets]  # (B, window + 1)
        logits, _ = model(chunk[:, :-1])  # (B, window, V)
        losses = F.cross_entropy(logits.float().transpose(1, 2), chunk[:, 1:], reduction="none")  # (B, window)
        by_position += losses.sum(0, dtype=torch.float64)
    model.train(was_training)
    count = batches * batch_size
    mean_by_position = (by_position / count).tolist()
    return WindowsLoss(sum(mean_by_position) / window, count * window, count, tuple(mean_by_position))


def _learner(model: CharRNN) -> CharRNN:
    """A fp32 copy of `model` without dropout that can take gradient steps; `model` itself is never changed.

    It stays in training mode with every dropout and regulariser off (the config's too: weight drop, locked
    and embedding dropout act in training mode), which computes what eval mode computes: cuDNN runs an
    LSTM's backward pass only in training mode.
    """
    learner = copy.deepcopy(model).float()
    learner.config = replace(learner.config, dropout=0.0, weight_drop=0.0, embed_drop=0.0,
                             locked_dropout=False)
    learner.rnn.dropout = 0.0
    learner.drop.p = 0.0
    learner.requires_grad_(True)
    learner.start.requires_grad_(False)  # the weights learn; where the stream starts stays the model's
    return learner.train()


def dynamic_loss(model: CharRNN, ids: Tensor, lr: float, segment: int = SEGMENT) -> Loss:
    """Dynamic evaluation with plain SGD over one stream: the mean of -log p over ids[1:].

    The stream starts from the model's start state and carries its state throughout. Segment by segment (`segment`
    characters, the last one shorter): score it with the weights as they are (adding its loss), then take
    one SGD step, w -= lr * grad, on all parameters for that segment's mean loss, the gradient truncated at
    the segment's start as in truncated BPTT; go on to the next segment. It works on a copy of `model`
    (`_learner`), so `model` and the checkpoint it came from are never changed. With lr = 0 no step is taken
    and this is the static loss of the same single stream.
    """
    if len(ids) < 2:
        raise DataError("dynamic evaluation needs at least 2 held-out characters")
    learner = _learner(model)
    optimizer = torch.optim.SGD(learner.parameters(), lr=lr)
    ids = ids.to(_device(learner)).long()[None, :]  # (1, N): a single stream
    state = learner.start_state(1)
    total = torch.zeros((), dtype=torch.float64, device=ids.device)
    for t0 in range(0, ids.shape[1] - 1, segment):
        x, y = ids[:, t0 : t0 + segment], ids[:, t0 + 1 : t0 + segment + 1]
        x = x[:, : y.shape[1]]
        with torch.inference_mode(lr == 0):
            logits, state = learner(x, state)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")
        total += loss.detach()
        if lr:
            optimizer.zero_grad(set_to_none=True)
            (loss / y.numel()).backward()
            optimizer.step()
            state = detach_state(state)
    count = len(ids[0]) - 1
    nats = total.item() / count
    return Loss(nats if math.isfinite(nats) else math.inf, count)


def dynamic_evaluation(model: CharRNN, val_ids: Tensor, lr: float | None = None, segment: int = SEGMENT,
                       grid: tuple[float, ...] = LR_GRID) -> DynamicResult:
    """Dynamic against static loss on the second half of `val_ids`, with a learning rate chosen on the first.

    The first half, val_ids[: n // 2], picks the learning rate of `grid` with the lowest `dynamic_loss` (unless
    `lr` is given). On the second half, val_ids[n // 2 :], both figures read the same single stream from the
    model's start and the checkpoint's weights: `static` with fixed weights, `dynamic` with an SGD step per
    segment. Neither half's result depends on the other's weights.
    """
    half = len(val_ids) // 2
    tune, report = val_ids[:half], val_ids[half:]
    tuning: dict[float, float] = {}
    if lr is None:
        tuning = {rate: dynamic_loss(model, tune, rate, segment).nats for rate in grid}
        lr = min(tuning, key=tuning.get)
    return DynamicResult(lr, tuning, len(tune), dynamic_loss(model, report, 0.0, segment),
                         dynamic_loss(model, report, lr, segment))
