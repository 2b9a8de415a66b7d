"""Resume state of a training run: weights, optimizer, RNG, carried hidden state and position, in safetensors.

It lives in the run folder (`runs/<name>/resume.safetensors`), apart from the served checkpoint, and is
written atomically at every evaluation, so an interrupted run continues exactly where it last saved.
A run of several workers (training/distributed.py) keeps the hidden state of all its streams, in stream order,
and each worker's random number generators, so it resumes exactly with as many workers (format 2; format 1,
written by one process before there were workers, still reads as a run of one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from charrnn.checkpoint import CheckpointError, atomic_write, read_header

RESUME_FILE = "resume.safetensors"
RESUME_FORMAT = "charrnn-resume-2"
READABLE_FORMATS = ("charrnn-resume-1", RESUME_FORMAT)


@dataclass
class ResumeState:
    train_config: dict[str, Any]
    vocab: list[str]
    step: int
    best_val: float
    best_step: int
    elapsed_s: float
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng_cpu: list[torch.Tensor]  # one generator state per worker, by rank (one for a plain run)
    rng_cuda: list[torch.Tensor] | None  # the same on GPUs
    hidden: tuple[torch.Tensor, ...] | None  # the carried state of every stream (layers, batch, hidden)

    @property
    def world_size(self) -> int:
        """How many workers wrote it."""
        return len(self.rng_cpu)


def save_resume(run_dir: Path, rs: ResumeState) -> None:
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v.detach().cpu().contiguous() for k, v in rs.model.items()}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, pstate in rs.optimizer["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    for rank, state in enumerate(rs.rng_cpu):
        tensors[f"rng.cpu.{rank}"] = state.contiguous()
    for rank, state in enumerate(rs.rng_cuda or ()):
        tensors[f"rng.cuda.{rank}"] = state.cpu().contiguous()
    for i, h in enumerate(rs.hidden or ()):
        tensors[f"hidden.{i}"] = h.detach().cpu().contiguous()
    metadata = {
        "format_version": RESUME_FORMAT,
        "train_config": json.dumps(rs.train_config),
        "vocab": json.dumps(rs.vocab, ensure_ascii=False),
        "step": str(rs.step),
        "best_val": repr(rs.best_val),
        "best_step": str(rs.best_step),
        "elapsed_s": repr(rs.elapsed_s),
        "optim_groups": json.dumps(rs.optimizer["param_groups"]),
        "optim_scalars": json.dumps(scalars),
        "world_size": str(rs.world_size),
    }
    atomic_write(Path(run_dir) / RESUME_FILE, save(tensors, metadata=metadata))


def load_resume(run_dir: Path) -> ResumeState:
    path = Path(run_dir) / RESUME_FILE
    if not path.exists():
        raise CheckpointError(f"{run_dir}: no {RESUME_FILE} here; is this a run folder written by `charrnn train`?")
    meta = read_header(path).get("__metadata__") or {}
    if meta.get("format_version") not in READABLE_FORMATS:
        raise CheckpointError(f"{path}: not a resume file of format {' or '.join(READABLE_FORMATS)}")
    tensors = load_file(str(path))
    optim_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            optim_state.setdefault(int(idx), {})[name] = value
    for idx, values in json.loads(meta["optim_scalars"]).items():
        optim_state.setdefault(int(idx), {}).update(values)
    if meta["format_version"] == "charrnn-resume-1":  # one process, before there were workers: no rank in the names
        for kind in ("cpu", "cuda"):
            if f"rng.{kind}" in tensors:
                tensors[f"rng.{kind}.0"] = tensors.pop(f"rng.{kind}")
    world_size = int(meta.get("world_size", "1"))
    hidden = []
    while f"hidden.{len(hidden)}" in tensors:
        hidden.append(tensors[f"hidden.{len(hidden)}"])
    return ResumeState(
        train_config=json.loads(meta["train_config"]),
        vocab=json.loads(meta["vocab"]),
        step=int(meta["step"]),
        best_val=float(meta["best_val"]),
        best_step=int(meta["best_step"]),
        elapsed_s=float(meta["elapsed_s"]),
        model={k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")},
        optimizer={"state": optim_state, "param_groups": json.loads(meta["optim_groups"])},
        rng_cpu=[tensors[f"rng.cpu.{rank}"] for rank in range(world_size)],
        rng_cuda=[tensors[f"rng.cuda.{rank}"] for rank in range(world_size)] if "rng.cuda.0" in tensors else None,
        hidden=tuple(hidden) or None,
    )
