"""Resume state of a training run: weights, optimizer, RNG, carried hidden state and position, in safetensors.

It lives in the run folder (`runs/<name>/resume.safetensors`), apart from the served checkpoint, and is
written atomically at every evaluation, so an interrupted run continues exactly where it last saved.
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
RESUME_FORMAT = "charrnn-resume-1"


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
    rng_cpu: torch.Tensor
    rng_cuda: torch.Tensor | None
    hidden: tuple[torch.Tensor, ...] | None


def save_resume(run_dir: Path, rs: ResumeState) -> None:
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v.detach().cpu().contiguous() for k, v in rs.model.items()}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, pstate in rs.optimizer["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    tensors["rng.cpu"] = rs.rng_cpu.contiguous()
    if rs.rng_cuda is not None:
        tensors["rng.cuda"] = rs.rng_cuda.cpu().contiguous()
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
    }
    atomic_write(Path(run_dir) / RESUME_FILE, save(tensors, metadata=metadata))


def load_resume(run_dir: Path) -> ResumeState:
    path = Path(run_dir) / RESUME_FILE
    if not path.exists():
        raise CheckpointError(f"{run_dir}: no {RESUME_FILE} here; is this a run folder written by `charrnn train`?")
    meta = read_header(path).get("__metadata__") or {}
    if meta.get("format_version") != RESUME_FORMAT:
        raise CheckpointError(f"{path}: not a resume file of format {RESUME_FORMAT}")
    tensors = load_file(str(path))
    optim_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            optim_state.setdefault(int(idx), {})[name] = value
    for idx, values in json.loads(meta["optim_scalars"]).items():
        optim_state.setdefault(int(idx), {}).update(values)
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
        rng_cpu=tensors["rng.cpu"],
        rng_cuda=tensors.get("rng.cuda"),
        hidden=tuple(hidden) or None,
    )
