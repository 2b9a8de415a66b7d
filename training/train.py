"""The training loop: text file -> vocabulary -> TBPTT batches -> CharRNN -> best checkpoint in the model store.

Run it through the CLI: `charrnn train --data input.txt --name mytext` (see `charrnn train --help`).

Learning-rate schedules: `decay` (char-rnn's) keeps `lr` for the first `decay_after` epochs, then multiplies it
by `lr_decay` per epoch, applied smoothly per step: lr(e) = lr * lr_decay ** max(0, e - decay_after), where e is
the fractional epoch. `cosine` (nanoGPT's) rises linearly over `warmup_steps`, then follows half a cosine from
`lr` down to COSINE_FLOOR * lr at the end of the run: the last of --max-steps/--max-epochs, or of --max-minutes
by the clock, whichever comes first.

Regularisation (AWD-LSTM's, Merity et al. 2017; measured in docs/models.md): `dropout` (per element, or
`locked_dropout` with one mask per sequence), `weight_drop` (DropConnect on the hidden-to-hidden weights),
`embed_drop` (whole characters) and `weight_decay` (AdamW's, decoupled from the gradient).

Defaults that fit the machine (docs/models.md): `precision auto` times a few steps in fp32 and in bf16 autocast
where the CPU has bf16 units and keeps the faster; with `--max-minutes` and no size flag a speed probe picks
the model size the budget can train; validation and saves also come by the clock, so a short run leaves a model.

Where a new text starts (training/start.py): when a run ends, the best checkpoint's start state is chosen by
measurement among the candidates (zeros, a newline, the mean line-start state, a state fitted to the model,
and with `learn_start` the one trained with the model) and stored in it. `learn_start` P makes the start a
parameter: the first batch of every epoch starts from it, and at every later batch each stream is reset to it
with probability P (so a start is in distribution), its carried state otherwise.

Several workers (`torchrun --nproc-per-node N -m charrnn train ...`, training/distributed.py): each trains on
its share of every batch's streams and carries only their hidden state; rank 0 decides the measured defaults,
evaluates, logs and saves, and all stop at the same step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from charrnn.checkpoint import atomic_write, default_model_store, model_path, read_metadata, save_model
from charrnn.model import CharRNN, ModelConfig, State, detach_state
from charrnn.names import validate_model_name
from charrnn.runtime import available_cpus
from charrnn.engine import Engine, bf16_units, resolve_precision
from charrnn.vocab import Vocab
from training.data import Batches, Corpus, DataError, encode_corpus, load_text, split, val_batches
from training.distributed import World
from training.plot import plot_losses
from training.resume import RESUME_FILE, ResumeState, load_resume, save_resume
from training.start import PASSAGE_CHARS, choose_for_checkpoint

DEFAULT_SIZE = (2, 512, 64)  # layers, hidden, embed when no budget is given (char-rnn's big model)
PROBE_SIZES = ((2, 128), (2, 256), (2, 384), (2, 512))  # (layers, hidden) the speed probe tries, small to large
CHARS_PER_PARAM = 5  # the probe picks the largest size that sees this many characters per parameter (measured)
BF16_MIN_SPEEDUP = 1.1  # auto takes bf16 on a CPU only this much faster: a near tie stays fp32, run after run
PROBE_STEPS = 3  # timed steps per probed size or precision, after PROBE_WARMUP untimed ones
PROBE_WARMUP = 2  # one was not enough: a cold process timed fp32 at 0.7x its speed
FIRST_EVAL_S = 20.0  # the first validation pass and save after at most this (or 10% of --max-minutes if less)
EVAL_INTERVAL_S = 60.0  # then at least this often, besides every --eval-every steps,
EVAL_BUDGET_SHARE = 0.05  # or every 5% of --max-minutes if longer: long runs evaluate bigger models
LOG_FILE = "log.jsonl"  # in the run folder: one JSON object per line, each step once
COSINE_FLOOR = 0.1  # the cosine schedule ends at this fraction of --lr (nanoGPT's min_lr = lr / 10)


@dataclass
class TrainConfig:
    data: str  # UTF-8 text file to learn
    name: str  # model name: the checkpoint becomes <model_store>/<name>.safetensors
    model_store: str = ""  # "" = $CHARRNN_MODEL_STORE or model_store/
    run_dir: str = ""  # "" = runs/<name>: log, loss curve and resume state
    cell: str = "lstm"  # lstm | gru | rnn
    layers: int | None = None  # None: DEFAULT_SIZE, or the speed probe's choice under --max-minutes
    hidden: int | None = None
    embed: int | None = None
    dropout: float = 0.2
    learn_start: float = 0.0  # > 0: the start state is trained, each stream reset to it with this chance per batch
    choose_start: bool = True  # when the run ends, measure the candidate starts and store the best in the checkpoint
    locked_dropout: bool = False  # one dropout mask per sequence (variational) instead of per element
    weight_drop: float = 0.0  # DropConnect on the hidden-to-hidden weights
    embed_drop: float = 0.0  # drop whole characters' embeddings
    weight_decay: float = 0.0  # decoupled (AdamW); with rmsprop, L2
    optim: str = "adam"  # adam | rmsprop
    lr: float = 2e-3
    schedule: str = "decay"  # decay (char-rnn's, per epoch) | cosine (warmup, then down to COSINE_FLOOR * lr)
    lr_decay: float = 0.97  # per epoch, once decay_after epochs have passed (schedule decay)
    decay_after: float = 10.0
    warmup_steps: int = 0  # linear warmup (schedule cosine)
    grad_clip: float = 5.0  # max global gradient norm
    seq_len: int = 128  # characters per truncated-BPTT chunk
    batch_size: int = 64  # parallel streams
    eval_every: int = 200  # steps between validation passes (and checkpoint/resume saves)
    max_epochs: float = 50.0
    max_minutes: float | None = None  # wall-clock budget for this invocation
    max_steps: int | None = None
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # torch intra-op threads; None = the CPUs this process may use, shared by its workers
    precision: str = "auto"  # auto | fp32 | bf16 (autocast); auto: bf16 on CUDA, the faster of the two on CPU
    val_frac: float = 0.1  # last fraction of the text held out for validation
    sample_every: int = 0  # steps between printed samples (0 = never)
    sample_length: int = 200
    save_dtype: str = "fp32"  # fp32 | fp16 | bf16 weights in the served checkpoint
    dist_timeout: float = 10.0  # minutes a worker waits for the others (rank 0's validation too) before it fails

    def __post_init__(self) -> None:
        validate_model_name(self.name)
        if self.optim not in ("adam", "rmsprop"):
            raise ValueError(f"--optim must be adam or rmsprop, not {self.optim!r}")
        if self.schedule not in ("decay", "cosine"):
            raise ValueError(f"--schedule must be decay or cosine, not {self.schedule!r}")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("--weight-decay and --warmup-steps cannot be negative")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"--precision must be auto, fp32 or bf16, not {self.precision!r}")
        if self.save_dtype not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"--save-dtype must be fp32, fp16 or bf16, not {self.save_dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, not {self.device!r}")
        if not 0.0 <= self.learn_start < 1.0:
            raise ValueError(f"--learn-start must be a probability in [0, 1), not {self.learn_start}")
        if self.eval_every < 1:
            raise ValueError("--eval-every must be at least 1")
        if self.dist_timeout <= 0:
            raise ValueError("--dist-timeout must be a positive number of minutes")

    @property
    def store(self) -> Path:
        return Path(self.model_store) if self.model_store else default_model_store()

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name


@dataclass
class TrainResult:
    checkpoint: Path
    run_dir: Path
    steps: int
    best_val: float  # nats per character
    best_step: int
    seconds: float
    stopped_because: str


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device to use; on a machine with several workers, worker `local_rank` takes GPU `local_rank`."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DataError("--device cuda was asked for, but no CUDA device is available")
    if local_rank >= torch.cuda.device_count():
        raise DataError(f"worker {local_rank} of this machine has no GPU of its own: it has "
                        f"{torch.cuda.device_count()}; start at most that many (torchrun --nproc-per-node)")
    return torch.device("cuda", local_rank)


def learning_rate(cfg: TrainConfig, epoch: float, step: int = 0, progress: float = 0.0) -> float:
    """The rate for the next step: `decay` by the epoch, `cosine` by the step and the run's progress (0 to 1)."""
    if cfg.schedule == "decay":
        return cfg.lr * cfg.lr_decay ** max(0.0, epoch - cfg.decay_after)
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (COSINE_FLOOR + (1 - COSINE_FLOOR) * cosine)


def model_config(cfg: TrainConfig, vocab_size: int, layers: int = 0, hidden: int = 0) -> ModelConfig:
    return ModelConfig(vocab_size, cfg.cell, layers or cfg.layers, hidden or cfg.hidden, cfg.embed, cfg.dropout,
                       weight_drop=cfg.weight_drop, embed_drop=cfg.embed_drop, locked_dropout=cfg.locked_dropout)


def make_model(cfg: TrainConfig, vocab_size: int, layers: int = 0, hidden: int = 0) -> CharRNN:
    """A fresh model; its start is a trained parameter under `learn_start`, else a fixed state chosen at the end."""
    model = CharRNN(model_config(cfg, vocab_size, layers, hidden))
    model.start.requires_grad_(cfg.learn_start > 0)
    return model


def make_optimizer(cfg: TrainConfig, model: CharRNN) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]  # a start that is not learned is not optimised
    if cfg.optim == "adam" and cfg.weight_decay:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optim == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    return torch.optim.RMSprop(params, lr=cfg.lr, alpha=0.95, weight_decay=cfg.weight_decay)


def carried_state(model: CharRNN, hidden: State | None, batch: int, new_epoch: bool, learn_start: float) -> State:
    """The state a batch is read from: the carried one, or at an epoch's start zeros (char-rnn's), or under
    `learn_start` the learned start, to which each stream is also reset with that probability at every batch.
    The start then enters the graph at every step (with zero gradient where no stream took it), as DDP needs."""
    if not learn_start:
        return model.init_state(batch) if new_epoch or hidden is None else hidden
    start = model.start_state(batch)
    if new_epoch or hidden is None:
        return start
    reset = (torch.rand(batch) < learn_start).to(start[0].device)[None, :, None]
    return tuple(torch.where(reset, s, h) for s, h in zip(start, hidden))


def autocast_for(cfg: TrainConfig, device: torch.device):
    if cfg.precision != "bf16":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    if device.type == "cpu" and not bf16_units():
        # oneDNN has no bf16 LSTM without bf16 units (AVX2 alone) and fails; without oneDNN the recurrent
        # layers run in fp32 and the rest in bf16 (`auto` takes fp32 on such a CPU).
        stack.enter_context(torch.backends.mkldnn.flags(enabled=False))
    stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
    return stack


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, hidden: State,
               cfg: TrainConfig) -> tuple[float, State]:
    """One truncated-BPTT update on inputs/targets (B, T); returns the loss and the detached carried state.

    `model` may be a CharRNN wrapped in DDP: its backward then averages the gradients over the workers.
    """
    with autocast_for(cfg, x.device):
        logits, hidden = model(x, hidden)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return loss.item(), detach_state(hidden)


@torch.inference_mode()
def evaluate(model: CharRNN, batches: Batches, device: torch.device) -> float:
    """Mean cross-entropy (nats/char) over the validation streams, each read from the model's start and carrying
    its state along."""
    was_training = model.training
    model.eval()
    state = model.start_state(batches.batch_size)
    total, count = 0.0, 0
    for step in range(len(batches)):
        x, y = batches.get(step)
        logits, state = model(x.to(device), state)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return total / count


@dataclass
class Probe:
    layers: int
    hidden: int
    params: int
    chars_per_s: float

    @property
    def size(self) -> str:
        return f"{self.layers}x{self.hidden}"


def probe_speed(cfg: TrainConfig, config: ModelConfig, batches: Batches, device: torch.device,
                workers: int = 1) -> Probe:
    """Characters per second of PROBE_STEPS training steps of a fresh model, on the real batches and settings.

    With several workers, `batches` is this worker's share and the speed is `workers` times its own: the others
    wait meanwhile, so it is timed as it will run, less the gradients' exchange.
    """
    model = make_model(cfg, config.vocab_size, config.layers, config.hidden).to(device).train()
    optimizer = make_optimizer(cfg, model)
    hidden = model.init_state(batches.batch_size)
    for i in range(PROBE_WARMUP + PROBE_STEPS):
        if i == PROBE_WARMUP:  # the first steps warm up the kernels and the allocator
            start = time.monotonic()
        x, y = batches.get(i % len(batches))
        _, hidden = train_step(model, optimizer, x.to(device), y.to(device), hidden, cfg)  # .item() syncs CUDA
    seconds = time.monotonic() - start
    chars = PROBE_STEPS * batches.chars_per_step * workers
    return Probe(config.layers, config.hidden, model.num_parameters(), chars / seconds)


def choose_precision(cfg: TrainConfig, config: ModelConfig, batches: Batches, device: torch.device,
                     workers: int = 1) -> str:
    """`auto`: bf16 on a CUDA device that has it; on a CPU with bf16 units, whichever trains faster here.

    bf16 autocast trained 1.45-1.8x faster than fp32 on an AMD EPYC (docs/benchmarks.md) but 0.6-0.7x as fast
    on an Intel Xeon with AVX-512 bf16 (docs/models.md), both 2 vCPUs: so it is measured, not assumed.
    """
    if cfg.precision != "auto":
        return cfg.precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if resolve_precision("auto") == "fp32":
        return "fp32"
    fp32, bf16 = (probe_speed(replace(cfg, precision=p), config, batches, device, workers) for p in ("fp32", "bf16"))
    chosen = "bf16" if bf16.chars_per_s >= BF16_MIN_SPEEDUP * fp32.chars_per_s else "fp32"
    print(f"precision {chosen}: bf16 autocast trains {bf16.chars_per_s / fp32.chars_per_s:.2f}x as fast as fp32 "
          f"on this CPU ({fp32.size}, {bf16.chars_per_s:,.0f} vs {fp32.chars_per_s:,.0f} chars/s)")
    return chosen


def sees_enough(probe: Probe, seconds: float) -> bool:
    return probe.chars_per_s * seconds >= CHARS_PER_PARAM * probe.params


def choose_size(probes: list[Probe], seconds: float) -> Probe:
    """The largest probed size that sees CHARS_PER_PARAM characters per parameter in `seconds`, else the smallest."""
    fits = [p for p in probes if sees_enough(p, seconds)]
    return max(fits, key=lambda p: p.params) if fits else min(probes, key=lambda p: p.params)


def size_for_budget(cfg: TrainConfig, vocab_size: int, batches: Batches, device: torch.device,
                    deadline: float, workers: int = 1) -> Probe:
    """Probe PROBE_SIZES small to large (stopping at the first that would not see enough) and choose one."""
    started = time.monotonic()
    probes: list[Probe] = []
    for layers, hidden in PROBE_SIZES:
        config = model_config(cfg, vocab_size, layers, hidden)
        probes.append(probe_speed(cfg, config, batches, device, workers))
        if not sees_enough(probes[-1], deadline - time.monotonic()):
            break  # the larger sizes are slower and have more parameters
    left = deadline - time.monotonic()
    chosen = choose_size(probes, left)
    print(f"speed probe ({time.monotonic() - started:.1f} s): "
          + ", ".join(f"{p.size} {p.chars_per_s:,.0f} chars/s" for p in probes))
    print(f"size {chosen.size}: the largest that sees {CHARS_PER_PARAM} characters per parameter in the {left:.0f} s "
          "left (" + ", ".join(f"{p.size} {p.chars_per_s * left / p.params:.1f}" for p in probes) + ")")
    return chosen


def settle_defaults(cfg: TrainConfig, vocab_size: int, batches: Batches, device: torch.device,
                    deadline: float, workers: int = 1) -> TrainConfig:
    """cfg with the size and precision filled in: as given, else measured here (docs/models.md).

    With several workers, rank 0 measures on its share of the streams and shares its choice.
    """
    layers, hidden, embed = DEFAULT_SIZE
    left_out = cfg.layers is None and cfg.hidden is None and cfg.embed is None
    cfg = replace(cfg, layers=cfg.layers or layers, hidden=cfg.hidden or hidden, embed=cfg.embed or embed)
    if left_out and cfg.max_minutes:
        smallest = model_config(cfg, vocab_size, *PROBE_SIZES[0])
        cfg = replace(cfg, precision=choose_precision(cfg, smallest, batches, device, workers))
        chosen = size_for_budget(cfg, vocab_size, batches, device, deadline, workers)
        return replace(cfg, layers=chosen.layers, hidden=chosen.hidden)
    config = model_config(cfg, vocab_size)
    return replace(cfg, precision=choose_precision(cfg, config, batches, device, workers))


def bits(nats: float) -> float:
    return nats / math.log(2)


def check_writable(folder: Path, what: str) -> None:
    """Create `folder` if needed and write a file in it, so a run that could not save fails before it trains."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise DataError(f"cannot write the {what} {folder}: {e.strerror or e} (uid {os.getuid()}); "
                        "make it writable or choose another one") from None


def tidy_run_files(cfg: TrainConfig, resumed: ResumeState | None) -> None:
    """Before a run trains: remove the temporary files of this run's own writes that a killed process left (the
    checkpoint's in the model store, the resume file's in the run folder; no other names), and make the log
    start where the run does: a new run starts a new log, a resumed one cuts it after the step it resumes from,
    so that a step a resume redoes appears once."""
    for folder, name in ((cfg.store, model_path(cfg.store, cfg.name).name), (cfg.run_path, RESUME_FILE)):
        ours = re.compile(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}\.tmp")  # atomic_write's mkstemp names
        for path in folder.glob(f".{name}.*.tmp"):
            if ours.fullmatch(path.name):
                path.unlink(missing_ok=True)
    log = cfg.run_path / LOG_FILE
    if resumed is None:
        log.unlink(missing_ok=True)
    elif log.exists():
        lines = log.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if json.loads(line).get("step", 0) <= resumed.step]
        if len(kept) < len(lines):
            atomic_write(log, "".join(kept).encode("utf-8"))


def check_folders(cfg: TrainConfig, resumed: ResumeState | None, overwrite: bool) -> None:
    """Refuse to write over another run, and fail before training if the results could not be saved."""
    if resumed is None and (cfg.run_path / RESUME_FILE).exists() and not overwrite:
        raise DataError(
            f"{cfg.run_path} already holds a run; continue it with --resume {cfg.run_path}, "
            "pick another --name, or pass --overwrite to start over"
        )
    check_writable(cfg.run_path, "run folder")
    check_writable(cfg.store, "model store")


@dataclass
class Data:
    corpus: Corpus
    vocab: Vocab
    train_ids: torch.Tensor
    val_ids: torch.Tensor
    batches: Batches  # this worker's streams of the training part
    val: Batches  # the held-out part's streams (rank 0 evaluates)


def load_data(cfg: TrainConfig, world: World, resumed: ResumeState | None) -> Data:
    """The text, its vocabulary (the resumed run's, or an error), this worker's training streams and the held-out."""
    corpus = load_text(Path(cfg.data))
    vocab = Vocab.from_text(corpus.text)
    if resumed is not None and resumed.vocab != vocab.chars:
        raise DataError(
            f"{cfg.data}: its character vocabulary differs from the one the resumed run was trained with; "
            "resume with the same data file"
        )
    train_ids, val_ids = split(encode_corpus(corpus.text, vocab), cfg.val_frac)
    batches = Batches(train_ids, cfg.batch_size, cfg.seq_len).rows(*world.rows(cfg.batch_size))
    if len(val_ids) < 2:
        raise DataError(f"{cfg.data}: too short to hold out a validation part (raise --val-frac or use more text)")
    return Data(corpus, vocab, train_ids, val_ids, batches, val_batches(val_ids, cfg.batch_size, cfg.seq_len))


@dataclass
class Progress:
    step: int = 0
    best_val: float = math.inf  # nats per character
    best_step: int = 0
    elapsed_before: float = 0.0  # seconds trained by the invocations before this one


def settle_start(cfg: TrainConfig, checkpoint: Path, data: Data, device: torch.device, progress: Progress,
                 interrupted: bool, log) -> None:
    """When the run ends, the best checkpoint's start chosen by measurement (training/start.py) and stored in it."""
    how = f"charrnn choose-start {cfg.name} --data {cfg.data}"
    if not cfg.choose_start:
        return
    if interrupted:
        log(f"start: not chosen (interrupted); the checkpoint starts from its {'learned' if cfg.learn_start else 'zero'} "
            f"start until `{how}` or a resumed run that ends chooses one")
        return
    if read_metadata(checkpoint).start.get("chosen"):
        return  # this invocation saved no better weights: their start is chosen already
    try:
        start = choose_for_checkpoint(checkpoint, data.train_ids, data.val_ids, device, log=log)
    except DataError as e:
        log(f"start: not chosen ({e}); the checkpoint keeps its {'learned' if cfg.learn_start else 'zero'} start")
        return
    log(f"start: {start['kind']}, {start['loss']:.4f} nats/char over the first {PASSAGE_CHARS} characters of "
        f"held-out lines (zero: {start['candidates']['zero']:.4f})")
    with open(cfg.run_path / LOG_FILE, "a", encoding="utf-8") as f:
        entry = {"type": "start", "step": progress.step, "checkpoint_step": progress.best_step, **start}
        f.write(json.dumps(entry) + "\n")


def restore(resumed: ResumeState, model: CharRNN, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
            world: World, device: torch.device) -> tuple[Progress, State | None]:
    """Weights, optimizer and position from a resume file; this worker's streams' hidden state and random numbers."""
    model.load_state_dict(resumed.model)
    optimizer.load_state_dict(resumed.optimizer)
    if resumed.world_size == world.size:  # the same workers on the same streams: exactly where it stopped
        torch.set_rng_state(resumed.rng_cpu[world.rank])
        if resumed.rng_cuda is not None and device.type == "cuda":
            torch.cuda.set_rng_state(resumed.rng_cuda[world.rank])
    else:
        torch.manual_seed(cfg.seed + resumed.step + world.rank)  # fresh dropout masks for the new split
        print(f"resuming with {world.size} worker(s) where the run had {resumed.world_size}: the stream split "
              f"changed ({cfg.batch_size // world.size} of the {cfg.batch_size} streams each) and the workers' "
              "random numbers are seeded anew, so the run goes on, but not bit for bit as it would have")
    start, stop = world.rows(cfg.batch_size)
    hidden = tuple(h[:, start:stop].to(device) for h in resumed.hidden) if resumed.hidden else None
    return Progress(resumed.step, resumed.best_val, resumed.best_step, resumed.elapsed_s), hidden


class CtrlC:
    """The first Ctrl-C (SIGINT) asks the loop to stop after the step it is in; a second one raises at once.

    A flag rather than an exception in the middle of a step or of a collective: the state saved is that of whole
    steps, and every worker (torchrun passes the signal on to each) stops at the same step.
    """

    def __init__(self) -> None:
        self.pressed = False
        self.installed = False

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():  # only there can Python catch signals
            self.previous = signal.signal(signal.SIGINT, self.press)
            self.installed = True
        return self

    def press(self, signum: int, frame) -> None:
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True

    def __exit__(self, *exc) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, self.previous)


def train(cfg: TrainConfig, resume_from: Path | None = None, overwrite: bool = False) -> TrainResult:
    """Train until max_epochs, max_steps or max_minutes, keeping the best-by-validation checkpoint.

    Started by torchrun, this process is one of several workers (training/distributed.py); rank 0 speaks for all.
    """
    world = World.from_env()
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(sys.stdout if world.is_main else devnull):
        try:
            result = train_worker(cfg, world, resume_from, overwrite)
        except Exception as e:
            failure = world.failure(e)
            if failure is None:
                raise
            raise failure from e
    world.stop()
    return result


def train_worker(cfg: TrainConfig, world: World, resume_from: Path | None, overwrite: bool) -> TrainResult:
    started = time.monotonic()
    resumed: ResumeState | None = load_resume(resume_from) if resume_from is not None else None
    if cfg.batch_size % world.size:
        raise DataError(f"--batch-size {cfg.batch_size} does not split into {world.size} equal shares of streams: "
                        f"make it a multiple of the number of workers")
    # torch's default counts every CPU of the host, also in a container limited to fewer; a machine's workers share
    torch.set_num_threads(cfg.threads or max(1, available_cpus() // world.local_size))
    device = resolve_device(cfg.device, world.local_rank)
    world.start(device, cfg.dist_timeout)

    data = load_data(cfg, world, resumed)
    corpus, vocab, batches, val = data.corpus, data.vocab, data.batches, data.val
    deadline = started + cfg.max_minutes * 60 if cfg.max_minutes else math.inf  # the probes count against it

    def prepare() -> tuple[TrainConfig, float]:
        check_folders(cfg, resumed, overwrite)
        tidy_run_files(cfg, resumed)
        return settle_defaults(cfg, len(vocab), batches, device, deadline, world.size), time.monotonic() - started

    cfg, clock = world.on_main(prepare)  # clock: seconds since the start, by rank 0's clock (see World.agree)

    torch.manual_seed(cfg.seed)
    model = make_model(cfg, len(vocab)).to(device)
    optimizer = make_optimizer(cfg, model)
    if world.rank > 0:
        torch.manual_seed(cfg.seed + world.rank)  # the same initial weights, but dropout masks of its own
    progress, hidden = restore(resumed, model, optimizer, cfg, world, device) if resumed else (Progress(), None)
    trained = world.wrap(model)  # evaluation, sampling and saving use the model itself

    run_dir = cfg.run_path
    steps_per_epoch = len(batches)
    total_steps = math.ceil(cfg.max_epochs * steps_per_epoch)
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    checkpoint = model_path(cfg.store, cfg.name)
    log_path = run_dir / LOG_FILE
    chars_per_step = cfg.batch_size * cfg.seq_len  # all workers together

    print(
        f"{cfg.data}: {len(corpus.text):,} characters, vocabulary {len(vocab)}, "
        f"train {len(data.train_ids):,} / val {len(data.val_ids):,}; {steps_per_epoch} steps per epoch"
    )
    print(
        f"model: {cfg.cell} {cfg.layers}x{cfg.hidden}, {model.num_parameters():,} parameters; device {device}, "
        f"precision {cfg.precision}, {torch.get_num_threads()} threads"
        + (f"; {world.size} workers of {batches.batch_size} streams each" if world.distributed else "")
        + (f"; resuming at step {progress.step}" if resumed else "")
    )

    def facts() -> dict:
        return {
            "data_file": Path(cfg.data).name,
            "data_sha256": corpus.sha256,
            "data_chars": len(corpus.text),
            "steps": progress.step,
            "epoch": round(progress.step / steps_per_epoch, 3),
            "best_val_loss": progress.best_val,
            "best_val_bpc": bits(progress.best_val),
            "train_seconds": round(progress.elapsed_before + time.monotonic() - started, 1),
            "train_config": asdict(cfg),
            "workers": world.size,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch_version": torch.__version__,
        }

    def checkpoint_and_log() -> float:
        """Rank 0 evaluates and saves; every worker first hands it its streams' state and its random numbers."""
        cuda = device.type == "cuda"
        states = world.gather((tuple(h.cpu() for h in hidden), torch.get_rng_state(),
                               torch.cuda.get_rng_state() if cuda else None))
        if not world.is_main:
            return math.nan
        val_loss = evaluate(model, val, device)
        improved = val_loss < progress.best_val
        if improved:
            progress.best_val, progress.best_step = val_loss, progress.step
            save_model(checkpoint, model, vocab, facts(), dtype=cfg.save_dtype,
                       start={"kind": "learned" if cfg.learn_start else "zero", "chosen": False})
        save_resume(
            run_dir,
            ResumeState(
                train_config=asdict(cfg),
                vocab=vocab.chars,
                step=progress.step,
                best_val=progress.best_val,
                best_step=progress.best_step,
                elapsed_s=progress.elapsed_before + time.monotonic() - started,
                model=model.state_dict(),
                optimizer=optimizer.state_dict(),
                rng_cpu=[rng for _, rng, _ in states],
                rng_cuda=[rng for _, _, rng in states] if cuda else None,
                hidden=tuple(torch.cat(rows, dim=1) for rows in zip(*(h for h, _, _ in states))),  # in rank order
            ),
        )
        write_log({"type": "val", "step": progress.step, "epoch": progress.step / steps_per_epoch,
                   "val_loss": val_loss, "val_bpc": bits(val_loss), "best": improved})
        return val_loss

    def write_log(entry: dict) -> None:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")

    model.train()
    stopped_because = "max_epochs" if total_steps == math.ceil(cfg.max_epochs * steps_per_epoch) else "max_steps"
    loss_ema: float | None = None
    val_loss = math.nan
    last_eval_step = progress.step if resumed else -1
    bar = tqdm(total=total_steps, initial=progress.step, unit="step", dynamic_ncols=True, smoothing=0.1,
               disable=not world.is_main)
    window_start, window_chars = time.monotonic(), 0
    chars_per_s = 0.0
    # by the clock too: the first validation and save come early, so a short run always leaves a model
    next_eval = time.monotonic() + min(FIRST_EVAL_S, 0.1 * 60 * (cfg.max_minutes or math.inf))
    eval_interval = max(EVAL_INTERVAL_S, EVAL_BUDGET_SHARE * 60 * (cfg.max_minutes or 0))
    try:
        with CtrlC() as ctrl_c:
            while progress.step < total_steps:
                step = progress.step
                pos = step % steps_per_epoch
                hidden = carried_state(model, hidden, batches.batch_size, pos == 0, cfg.learn_start)
                fraction = step / total_steps
                if cfg.max_minutes:  # the cosine ends with the budget when the clock runs out first
                    fraction = max(fraction, clock / (60 * cfg.max_minutes))
                lr = learning_rate(cfg, step / steps_per_epoch, step, fraction)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x, y = batches.get(pos)
                loss_value, hidden = train_step(trained, optimizer, x.to(device), y.to(device), hidden, cfg)
                step = progress.step = step + 1
                now = time.monotonic()
                loss_value, interrupted, out_of_time, save, clock = world.agree(
                    loss_value, ctrl_c.pressed, now >= deadline, step % cfg.eval_every == 0 or now >= next_eval,
                    now - started)

                loss_ema = loss_value if loss_ema is None else 0.95 * loss_ema + 0.05 * loss_value
                window_chars += chars_per_step
                if step % 10 == 0 and world.is_main:
                    chars_per_s = window_chars / max(now - window_start, 1e-9)
                    window_start, window_chars = now, 0
                    write_log({"type": "train", "step": step, "epoch": step / steps_per_epoch, "loss": loss_value,
                               "lr": lr, "chars_per_s": round(chars_per_s)})
                bar.update(1)
                bar.set_postfix(loss=f"{loss_ema:.3f}", val=f"{val_loss:.3f}", cps=f"{chars_per_s / 1000:.1f}k")
                if interrupted or out_of_time:  # one step at least, so there is a model
                    stopped_because = "interrupted" if interrupted else "max_minutes"
                    break
                if save:
                    val_loss = checkpoint_and_log()
                    last_eval_step, next_eval = step, time.monotonic() + eval_interval
                    bar.write(f"step {step} epoch {step / steps_per_epoch:.2f}: val {val_loss:.4f} nats/char "
                              f"({bits(val_loss):.3f} bits/char), best {progress.best_val:.4f}")
                if cfg.sample_every and step % cfg.sample_every == 0 and world.is_main:
                    # drawn by the inference engine from the current weights: no dropout, as the server would
                    engine = Engine(model)
                    text = "".join(engine.generate(vocab, "", cfg.sample_length, temperature=1.0, seed=cfg.seed))
                    write_log({"type": "sample", "step": step, "temperature": 1.0, "text": text})
                    bar.write(f"--- sample at step {step} ---\n{text}\n---")
    except KeyboardInterrupt:  # a second Ctrl-C: one process stops where it is; workers cannot agree any more
        if world.distributed:
            raise
        stopped_because = "interrupted"
    finally:
        bar.close()
    step = progress.step
    if step != last_eval_step and step > 0:
        val_loss = checkpoint_and_log()
    if world.is_main and checkpoint.exists():
        settle_start(cfg, checkpoint, data, device, progress, interrupted=stopped_because == "interrupted", log=print)
    seconds = time.monotonic() - started
    if world.is_main and not plot_losses(log_path, run_dir / "loss.png"):
        print("no loss curve: matplotlib is not installed (pip install 'charrnn[train]')")
    print(
        f"stopped ({stopped_because}) at step {step}, epoch {step / steps_per_epoch:.2f}, after {seconds:.0f} s; "
        f"best val loss {progress.best_val:.4f} nats/char ({bits(progress.best_val):.3f} bits/char) "
        f"at step {progress.best_step}"
    )
    command = "torchrun <the same options> -m charrnn train" if world.distributed else "charrnn train"
    print(f"checkpoint: {checkpoint}\nrun folder: {run_dir} (resume with: {command} --resume {run_dir})")
    return TrainResult(checkpoint, run_dir, step, progress.best_val, progress.best_step, seconds, stopped_because)


def config_from_resume(run_dir: Path, /, **overrides) -> TrainConfig:
    """The run's own config, with budget/device options replaced where given (None = keep)."""
    stored = load_resume(run_dir).train_config
    known = {f.name for f in fields(TrainConfig)}
    stored = {k: v for k, v in stored.items() if k in known}
    stored.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**stored)
