"""Text file -> vocabulary -> compact id tensor -> train/val split -> contiguous TBPTT batches."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from charrnn.vocab import Vocab


class DataError(Exception):
    """A training file that cannot be used, explained in plain words."""


@dataclass
class Corpus:
    path: Path
    text: str
    sha256: str


def load_text(path: Path) -> Corpus:
    """Read a UTF-8 text file, refusing missing, empty, binary and non-UTF-8 files with a clear message."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    raw = path.read_bytes()
    if not raw:
        raise DataError(f"{path}: the file is empty")
    if b"\x00" in raw[:1_000_000]:
        raise DataError(f"{path}: looks like a binary file (it contains NUL bytes); give a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not valid UTF-8 (bad byte 0x{raw[e.start]:02x} at offset {e.start}); convert it to UTF-8 first"
        ) from None
    text = text.removeprefix("\ufeff")  # a BOM is not part of the text
    if not text:
        raise DataError(f"{path}: the file is empty")
    return Corpus(path=path, text=text, sha256=hashlib.sha256(raw).hexdigest())


def split(ids: Tensor, val_frac: float) -> tuple[Tensor, Tensor]:
    """First (1 - val_frac) of the characters for training, the rest for validation (nanoGPT's split)."""
    if not 0.0 < val_frac < 1.0:
        raise DataError(f"--val-frac must be between 0 and 1, not {val_frac}")
    n_train = int(len(ids) * (1.0 - val_frac))
    return ids[:n_train], ids[n_train:]


def encode_corpus(text: str, vocab: Vocab) -> Tensor:
    """All ids of the corpus as one compact integer tensor (uint8 for small vocabularies)."""
    return torch.from_numpy(vocab.encode(text))


class Batches:
    """Contiguous streams for truncated back-propagation through time.

    The ids are cut into `batch_size` equal streams laid side by side; step t reads columns
    [t*seq_len, (t+1)*seq_len) of every stream. Row b of one step continues row b of the step before,
    so the hidden state carries over from batch to batch (char-rnn style).
    """

    def __init__(self, ids: Tensor, batch_size: int, seq_len: int, what: str = "training"):
        if batch_size < 1 or seq_len < 1:
            raise DataError("--batch-size and --seq-len must be at least 1")
        stream_len = (len(ids) - 1) // batch_size
        if stream_len < seq_len:
            need = batch_size * seq_len + 1
            raise DataError(
                f"the {what} text has {len(ids)} characters, too short for one batch of "
                f"--batch-size {batch_size} x --seq-len {seq_len} (needs {need}); "
                "use a longer file or smaller --batch-size/--seq-len"
            )
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.steps = stream_len // seq_len  # batches per epoch
        used = self.steps * seq_len
        # (B, used + 1): the +1 is the target of the last input character.
        self.streams = torch.stack([ids[b * stream_len : b * stream_len + used + 1] for b in range(batch_size)])

    def __len__(self) -> int:
        return self.steps

    def get(self, step: int) -> tuple[Tensor, Tensor]:
        """Inputs and targets (B, T) as int64, for step `step` of an epoch."""
        t0 = step * self.seq_len
        chunk = self.streams[:, t0 : t0 + self.seq_len + 1].long()
        return chunk[:, :-1], chunk[:, 1:]

    @property
    def chars_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def rows(self, start: int, stop: int) -> Batches:
        """Streams [start, stop) only: one worker's share of every batch (training/distributed.py)."""
        share = copy.copy(self)
        share.streams, share.batch_size = self.streams[start:stop], stop - start
        return share


def val_batches(ids: Tensor, batch_size: int, seq_len: int) -> Batches:
    """Validation streams: as many as the validation text allows, up to `batch_size` (shorter chunks if need be)."""
    seq_len = max(1, min(seq_len, len(ids) - 1))
    streams = max(1, min(batch_size, (len(ids) - 1) // seq_len))
    return Batches(ids, streams, seq_len, what="validation")
