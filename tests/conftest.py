"""Shared fixtures: small texts and tiny training configs, so the suite stays fast on two CPU cores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.train import TrainConfig

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"

torch.set_num_threads(1)  # tiny models: one thread is faster and keeps results deterministic


@pytest.fixture
def shakespeare_slice(tmp_path: Path) -> Path:
    """The first 20,000 characters of tiny-shakespeare as a file of its own."""
    path = tmp_path / "slice.txt"
    path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    return path


def tiny_config(tmp_path: Path, data: Path, name: str = "tiny", **overrides) -> TrainConfig:
    settings = dict(
        data=str(data), name=name, model_store=str(tmp_path / "store"), run_dir=str(tmp_path / "runs" / name),
        layers=2, hidden=32, embed=16, dropout=0.1, seq_len=16, batch_size=8, eval_every=5,
        max_epochs=100.0, max_steps=10, seed=7, device="cpu", threads=1, precision="fp32",  # not timed: repeatable
    )
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="session")
def model_store(tmp_path_factory) -> Path:
    """A model store with small trained checkpoints: `tiny` (LSTM) and `lines` (overfit, newlines/unicode)."""
    from training.train import train

    root = tmp_path_factory.mktemp("models")
    store = root / "store"
    data = root / "slice.txt"
    data.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    train(tiny_config(root, data, name="tiny", model_store=str(store), max_steps=40, eval_every=40, lr=1e-2))
    lines = root / "lines.txt"
    lines.write_text("first line\r\nsecond  é東 line\n\ttab\n" * 80, encoding="utf-8")
    train(tiny_config(root, lines, name="lines", model_store=str(store), layers=1, hidden=64, dropout=0.0,
                      max_steps=150, eval_every=150, lr=1e-2, seq_len=32, batch_size=4))
    return store


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    """A real redis-server on a free 127.0.0.1 port, one per test module (tests/server.py RedisServer)."""
    from server import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def bundled_server(tmp_path_factory):
    """`charrnn serve` with default settings serving only the bundled model, one per test module."""
    from server import Server

    store = tmp_path_factory.mktemp("bundled")
    (store / "shakespeare.safetensors").symlink_to(REPO / "model_store" / "shakespeare.safetensors")
    srv = Server(store, env={"CHARRNN_MODEL_STORE": str(store)}, test_defaults=False).start()
    yield srv
    srv.stop()
