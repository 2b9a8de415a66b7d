"""Ceilings of this machine for one checkpoint, without HTTP: what the server could at best deliver.

    .venv/bin/python bench/ceiling.py model_store/shakespeare.safetensors

- model step rate at batch 1, 8, 64, 256: one decoding step (`Engine.step`, the server's step) plus
  sampling with per-row parameters and generators (`sample_next`, the server's sampler), states kept
  in one batch tensor, so no per-stream bookkeeping is counted;
- SSE emission rate: `bench/trivial_sse.py` served by uvicorn, streaming pre-made characters through the
  server's own event framing with no model at all, read by the load benchmark's client.

Prints JSON; `bench/report.py` runs it and writes docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from charrnn.runtime import reexec_with_allocator_env

REPO = Path(__file__).resolve().parent.parent


def model_step_rate(checkpoint: Path, batch: int, seconds: float = 2.0, threads: int | None = None) -> float:
    """Characters per second of batched decoding steps with sampling."""
    import torch

    import random

    from charrnn.checkpoint import load_model
    from charrnn.engine import Engine
    from charrnn.sampling import sample_next

    if threads:
        torch.set_num_threads(threads)
    model, vocab, _ = load_model(checkpoint)
    stepper = Engine(model)  # what the server decodes with
    state = stepper.start_state(batch)
    ids = torch.full((batch,), vocab.index.get("\n", 0))
    gens = [random.Random(i) for i in range(batch)]
    temps, ks, ps = [1.0] * batch, [None] * batch, [None] * batch
    for _ in range(20):  # warm-up
        logits, state = stepper.step(ids, state)
        ids = sample_next(logits, temps, ks, ps, gens)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            logits, state = stepper.step(ids, state)
            ids = sample_next(logits, temps, ks, ps, gens)
        steps += 10
    return steps * batch / (time.perf_counter() - start)


def sse_emission_rate(streams: int = 64, chars: int = 2000, max_seconds: float = 30.0) -> dict:
    """Events per second through uvicorn + the server's SSE framing, with a trivial generator."""
    import asyncio

    from load import sweep_point
    from server_proc import ServerProcess

    cmd = [sys.executable, "-m", "uvicorn", "trivial_sse:app", "--app-dir", str(REPO / "bench"),
           "--host", "127.0.0.1", "--log-level", "warning"]
    with ServerProcess(cmd, ready_path="/healthz") as server:
        row = asyncio.run(sweep_point(server.url, streams, None, max_seconds, path=f"/generate?max_chars={chars}",
                                      method="GET"))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--sse-streams", type=int, default=64)
    args = parser.parse_args()
    reexec_with_allocator_env([str(Path(__file__).resolve()), *sys.argv[1:]])
    result = {f"model_chars_per_s_{t}_thread": {b: round(model_step_rate(args.checkpoint, b, args.seconds, t))
                                                 for b in args.batches} for t in (1, 2)}
    result["sse"] = sse_emission_rate(args.sse_streams)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
