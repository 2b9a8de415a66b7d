"""Several training processes as one model: torchrun's environment -> a process group -> DistributedDataParallel.

    torchrun --nproc-per-node 2 -m charrnn train --data input.txt    # README, "Train on several processes or machines"

torchrun starts one process per worker and tells each where it stands in RANK, WORLD_SIZE, LOCAL_RANK and
LOCAL_WORLD_SIZE. Without them (a plain `charrnn train`) the world is one process and nothing here communicates.
Each worker reads its own rows of every batch; DDP averages the gradients, which for equal shares is the gradient
of the one-process mean loss. Rank 0 alone evaluates, logs and saves; the others wait at the next collective.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


class WorkerError(Exception):
    """Another worker failed or stopped answering; said in plain words."""


@dataclass
class World:
    rank: int = 0  # this worker, 0 .. size - 1 over all machines
    size: int = 1  # workers in all
    local_rank: int = 0  # this worker on its machine: its GPU
    local_size: int = 1  # workers on this machine: they share its CPUs
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives' tensors live
    timeout_minutes: float = 0.0

    @classmethod
    def from_env(cls) -> World:
        """The world torchrun describes, or one process when it did not start this one."""
        env = os.environ
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return cls()
        return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")),
                   int(env.get("LOCAL_WORLD_SIZE", "1")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def rows(self, batch_size: int) -> tuple[int, int]:
        """This worker's streams [start, stop) of a batch of `batch_size`: rank r reads the r-th equal share."""
        share = batch_size // self.size
        return self.rank * share, (self.rank + 1) * share

    def start(self, device: torch.device, timeout_minutes: float) -> None:
        """Join the other workers: gloo on CPUs, NCCL on GPUs, with a timeout so a silent worker is an error."""
        self.device, self.timeout_minutes = device, timeout_minutes
        if not self.distributed:
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)  # object collectives (broadcast, gather) go through this GPU
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=self.rank, world_size=self.size,
                                timeout=timedelta(minutes=timeout_minutes))

    def stop(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model to train: DDP around it when there are several workers (it starts from rank 0's weights)."""
        if not self.distributed:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def agree(self, loss: float, interrupted: bool, out_of_time: bool, save: bool,
              clock: float) -> tuple[float, bool, bool, bool, float]:
        """One small all-reduce per step: the mean loss, whether any worker wants to stop or save, rank 0's clock.

        Every worker takes the same decisions at the same step from it, and the learning rate of a schedule that
        follows the clock comes from rank 0's clock alone, so the workers' weights stay identical.
        """
        if not self.distributed:
            return loss, interrupted, out_of_time, save, clock
        votes = torch.tensor([loss, interrupted, out_of_time, save, clock if self.is_main else 0.0],
                             dtype=torch.float64, device=self.device)
        dist.all_reduce(votes)  # sum
        loss, interrupted, out_of_time, save, clock = votes.tolist()
        return loss / self.size, interrupted > 0, out_of_time > 0, save > 0, clock

    def share(self, value: T) -> T:
        """Rank 0's `value` on every worker."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """fn() run by rank 0 only; its result, or its error raised again, on every worker."""
        if not self.distributed:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # raised on every worker below, so none waits for a rank 0 that has gone
                error = e
        result, error = self.share((result, error))
        if error is not None:
            raise error
        return result

    def gather(self, value: Any) -> list[Any]:
        """Every worker's `value` (CPU tensors, small objects), in rank order."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def failure(self, error: BaseException) -> WorkerError | None:
        """A collective's error explained, or None for any other error.

        gloo raises a RuntimeError naming its transport ("Connection closed by peer", "Timed out waiting"),
        NCCL a DistBackendError.
        """
        if not self.distributed or not (isinstance(error, dist.DistError) or "gloo" in str(error)):
            return None
        return WorkerError(
            f"worker {self.rank} of {self.size} lost the others: {str(error).strip().splitlines()[0]}. Another "
            f"worker failed (see its messages) or did not answer within --dist-timeout ({self.timeout_minutes:g} "
            "minutes); the run can continue from its last save with --resume"
        )
