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
        max_epochs=100.0, max_steps=10, seed=7, device="cpu",
    )
    settings.update(overrides)
    return TrainConfig(**settings)
