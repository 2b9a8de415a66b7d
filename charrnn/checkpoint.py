"""The checkpoint format: one self-contained safetensors file per model.

Layout of `<name>.safetensors`:
- tensors: the model's state dict (fp32, or fp16/bf16 when saved smaller), with its start state `start.0`
  (h) and `start.1` (c, LSTM);
- metadata header (strings): `format_version`, `config` (JSON of ModelConfig), `vocab` (JSON list of the
  characters), `training` (JSON of training facts: data file and sha256, steps, epoch, best val loss,
  train config, created time) and `start` (JSON: which start the state is and what it measured,
  training/start.py). A file written before starts existed has neither: it loads with the zero start.

Nothing is pickled. `read_metadata` parses the header with the standard library only, so a checkpoint can be
inspected without torch. Writes go through `atomic_write`, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charrnn.names import validate_model_name

FORMAT_VERSION = "1"
SUFFIX = ".safetensors"
MAX_HEADER_BYTES = 100_000_000  # a header larger than this is not one of ours
# What a checkpoint without a chosen start starts from: zeros, as every model did before starts were chosen
ZERO_START = {"kind": "zero", "chosen": False}


class CheckpointError(Exception):
    """A checkpoint file is missing, truncated, or not in our format."""


def default_model_store() -> Path:
    """`CHARRNN_MODEL_STORE` if set, else `model_store/` in the current directory."""
    return Path(os.environ.get("CHARRNN_MODEL_STORE", "model_store"))


def model_path(store: Path, name: str) -> Path:
    return Path(store) / f"{validate_model_name(name)}{SUFFIX}"


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix.

    A temporary file in the same folder is written, flushed and fsynced, then renamed over `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint should read like any other file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Make the rename itself durable.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_header(path: Path) -> dict[str, Any]:
    """The raw safetensors JSON header (tensor table and `__metadata__`), read without torch."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: header size {n} is implausible; not a safetensors file")
            raw = f.read(n)
            f.seek(0, os.SEEK_END)
            size = f.tell()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    if len(raw) < n:
        raise CheckpointError(f"{path}: truncated header")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise CheckpointError(f"{path}: __metadata__ is not an object of strings")
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
            raise CheckpointError(f"{path}: tensor entry {name!r} is malformed")
    data_end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + data_end > size:
        raise CheckpointError(f"{path}: truncated (expected {8 + n + data_end} bytes, found {size})")
    return header


@dataclass
class CheckpointInfo:
    """Everything a checkpoint says about itself, without its weights."""

    config: dict[str, Any]
    vocab: list[str]
    training: dict[str, Any]
    format_version: str
    start: dict[str, Any] = field(default_factory=lambda: dict(ZERO_START))


def read_metadata(path: Path) -> CheckpointInfo:
    """Read config, vocabulary and training facts from the header (standard library only)."""
    meta = read_header(path).get("__metadata__") or {}
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a char-rnn checkpoint of format {FORMAT_VERSION} (found {version!r})")
    try:
        info = CheckpointInfo(
            config=json.loads(meta["config"]),
            vocab=json.loads(meta["vocab"]),
            training=json.loads(meta.get("training", "{}")),
            format_version=version,
            start=json.loads(meta["start"]) if "start" in meta else dict(ZERO_START),
        )
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: metadata incomplete or malformed ({e})") from None
    if not (isinstance(info.config, dict) and isinstance(info.training, dict) and isinstance(info.vocab, list)
            and all(isinstance(c, str) for c in info.vocab) and isinstance(info.start, dict)):
        raise CheckpointError(f"{path}: metadata malformed (config, training and start must be objects, vocab a "
                              "list of strings)")
    return info


# --- torch-dependent parts below; imported lazily so the functions above work without torch. ---


def save_model(path: Path, model, vocab, training: dict[str, Any], dtype: str = "fp32",
               start: dict[str, Any] | None = None) -> None:
    """Write model weights (with the start state) + config + vocabulary + training facts + what the start is, as one
    safetensors file, atomically."""
    import torch
    from safetensors.torch import save

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    # the start stays fp32 whatever the weights' dtype: it is tiny, and its measured loss is then the stored one's
    tensors = {k: v.detach().to("cpu", torch.float32 if k.startswith("start.") else torch_dtype).contiguous()
               for k, v in model.state_dict().items()}
    metadata = {
        "format_version": FORMAT_VERSION,
        "config": json.dumps(model.config.to_dict()),
        "vocab": json.dumps(vocab.chars, ensure_ascii=False),
        "training": json.dumps({**training, "weights_dtype": dtype}, ensure_ascii=False),
        "start": json.dumps(start or ZERO_START),
    }
    atomic_write(Path(path), save(tensors, metadata=metadata))


def load_model(path: Path, device: str = "cpu"):
    """Load (model, vocab, info) from a checkpoint. Weights come back as fp32 in eval mode."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from charrnn.model import CharRNN, ModelConfig
    from charrnn.vocab import Vocab

    info = read_metadata(path)
    try:
        config = ModelConfig(**info.config)
        vocab = Vocab(info.vocab)
        tensors = load_file(str(path), device="cpu")
        model = CharRNN(config)
        model.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()})
    except (SafetensorError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot load ({e})") from None
    if len(vocab) != config.vocab_size:
        raise CheckpointError(f"{path}: vocabulary has {len(vocab)} characters, config says {config.vocab_size}")
    return model.to(device).eval(), vocab, info
