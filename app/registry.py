"""The model registry: every `<name>.safetensors` of the model store, loaded, warmed up, kept by name.

`scan()` compares the folder with what is loaded: new files are loaded, changed files (by sha256) replace
their model, removed files unload theirs. A file that fails to load is reported and skipped; if it replaced
a good file, the good version stays loaded until a loadable one appears.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.utils.rnn import pack_padded_sequence

from charrnn.checkpoint import SUFFIX, CheckpointError, CheckpointInfo, MODEL_NAME_RE, load_model
from charrnn.model import CharRNN, State, Stepper
from charrnn.vocab import Vocab

log = logging.getLogger("charrnn")


@dataclass
class LoadedModel:
    name: str
    path: Path
    sha256: str
    model: CharRNN
    stepper: Stepper
    vocab: Vocab
    info: CheckpointInfo
    stamp: tuple[int, int, int] = (0, 0, 0)  # inode, size, mtime of the file when it was hashed
    loaded_at: float = field(default_factory=time.time)

    @property
    def newline_id(self) -> int:
        return self.vocab.index.get("\n", 0)

    @torch.inference_mode()
    def prime(self, ids: list[int], state: State | None) -> State:
        """Run `ids` through the model in one pass (batch 1) and return the state after them."""
        return self.prime_batch([ids], [state])[0]

    @torch.inference_mode()
    def prime_batch(self, prompts: list[list[int]], states: list[State | None]) -> list[State]:
        """Read several primes of any lengths in one packed pass; returns each one's state after its prime.

        With bf16 decoding the pass runs under bf16 autocast (about 1.8x faster; see docs/benchmarks.md).
        """
        model = self.model
        fresh = model.init_state(1)
        starts = [s if s is not None else fresh for s in states]
        if not any(prompts):
            return starts
        lengths = torch.tensor([max(1, len(p)) for p in prompts])
        padded = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
        for row, p in enumerate(prompts):
            padded[row, : len(p)] = torch.tensor(p, dtype=torch.long)
        packed = pack_padded_sequence(model.embedding(padded), lengths, batch_first=True, enforce_sorted=False)
        h0 = tuple(torch.cat([s[i] for s in starts], dim=1) for i in range(len(fresh)))
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.stepper.precision == "bf16")
        with autocast:
            _, hn = model.rnn(packed, h0 if model.config.cell == "lstm" else h0[0])
        hn = hn if isinstance(hn, tuple) else (hn,)
        out = []
        for row, p in enumerate(prompts):
            # an empty prompt keeps its start state (it was run on a dummy character only to keep shapes)
            out.append(starts[row] if not p else tuple(t[:, row : row + 1].float().clone() for t in hn))
        return out

    def warm_up(self) -> None:
        """One prime pass and a few steps, so the first request does not pay for lazy initialisation."""
        state = self.prime([self.newline_id] * 8, None)
        ids = torch.tensor([self.newline_id])
        for _ in range(3):
            _, state = self.stepper.step(ids, state)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ScanResult:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


def resolve_precision(precision: str) -> str:
    """`auto` means bf16 where the CPU multiplies bf16 natively, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


class Registry:
    def __init__(self, store: Path, precision: str = "auto"):
        self.store = Path(store)
        self.precision = resolve_precision(precision)
        self.models: dict[str, LoadedModel] = {}

    def get(self, name: str) -> LoadedModel | None:
        return self.models.get(name)

    def scan(self) -> ScanResult:
        result = ScanResult()
        found: dict[str, Path] = {}
        if not self.store.is_dir():
            result.errors[str(self.store)] = "model store folder does not exist"
        else:
            for path in sorted(self.store.glob(f"*{SUFFIX}")):
                name = path.name[: -len(SUFFIX)]
                if path.name.startswith("."):
                    continue  # temporary files of atomic writes
                if not MODEL_NAME_RE.match(name) or ".." in name:
                    result.errors[path.name] = "file name is not a valid model name"
                    continue
                found[name] = path
        for name in list(self.models):
            if name not in found:
                del self.models[name]
                result.removed.append(name)
        for name, path in found.items():
            try:
                current = self.models.get(name)
                st = path.stat()
                stamp = (st.st_ino, st.st_size, st.st_mtime_ns)  # atomic writes give a new inode
                if current is not None and current.stamp == stamp:
                    result.unchanged.append(name)  # not even read: polling the store stays cheap
                    continue
                sha = file_sha256(path)
                if current is not None and current.sha256 == sha:
                    current.stamp = stamp
                    result.unchanged.append(name)
                    continue
                model, vocab, info = load_model(path)
                loaded = LoadedModel(name, path, sha, model, Stepper(model, self.precision), vocab, info, stamp)
                loaded.warm_up()
            except (CheckpointError, OSError, RuntimeError, ValueError) as e:
                result.errors[path.name] = str(e)
                log.warning("skipping %s: %s", path.name, e)
                continue
            (result.changed if name in self.models else result.added).append(name)
            self.models[name] = loaded
        return result
