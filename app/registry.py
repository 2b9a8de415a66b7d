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

from charrnn.checkpoint import SUFFIX, CheckpointError, CheckpointInfo, load_model
from charrnn.names import is_model_name
from charrnn.engine import Engine, resolve_precision
from charrnn.model import ModelConfig
from charrnn.vocab import Vocab

log = logging.getLogger("charrnn")


@dataclass
class LoadedModel:
    name: str
    path: Path
    sha256: str
    engine: Engine  # the only way the service runs the model (charrnn/engine.py)
    vocab: Vocab
    info: CheckpointInfo
    parameters: int
    stamp: tuple[int, int, int] = (0, 0, 0)  # inode, size, mtime of the file when it was hashed
    loaded_at: float = field(default_factory=time.time)

    @property
    def config(self) -> ModelConfig:
        return self.engine.config


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
            result.errors[self.store.name] = "model store folder does not exist"
        else:
            for path in sorted(self.store.glob(f"*{SUFFIX}")):
                name = path.name[: -len(SUFFIX)]
                if path.name.startswith("."):
                    continue  # temporary files of atomic writes
                if not is_model_name(name):
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
                engine = Engine(model, self.precision)
                engine.warm_up()
                loaded = LoadedModel(name, path, sha, engine, vocab, info, model.num_parameters(), stamp)
            except Exception as e:  # whatever is wrong with one file, the others load and the server serves
                # named by file name alone: the store's place on this machine is not the client's business
                why = str(e).replace(str(path), path.name) if isinstance(e, (CheckpointError, OSError)) \
                    else f"{path.name}: cannot load ({type(e).__name__})"
                result.errors[path.name] = why
                log.warning("skipping %s: %s", path, e)
                continue
            (result.changed if name in self.models else result.added).append(name)
            self.models[name] = loaded
        return result
