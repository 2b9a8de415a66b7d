"""Decoding in fp32 and bf16: speed, held-out loss, and whether a row depends on its batch.

    .venv/bin/python bench/decode_precision.py model_store/shakespeare.safetensors --data data/tinyshakespeare.txt

For each precision of the inference engine (`charrnn/engine.py`, what the server runs): the validation loss
measured by stepping one character at a time over the last 10% of the text (64 streams, the state carried),
the loss change against fp32, step rates (with sampling) at batch 1/64/256 with the server's thread count,
and the largest difference between a row's logits stepped alone and inside a batch, over every batch size
from 1 to 64 and a few up to 256 (0: a seeded request gives the same text alone or batched).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from charrnn.runtime import reexec_with_allocator_env


def stepped_val_loss(step, model, val_ids, streams: int = 64) -> float:
    import torch
    import torch.nn.functional as F

    n = (len(val_ids) - 1) // streams
    grid = torch.stack([val_ids[b * n : b * n + n + 1].long() for b in range(streams)])
    state = model.init_state(streams)
    total = 0.0
    for t in range(n):
        logits, state = step(grid[:, t], state)
        total += F.cross_entropy(logits.float(), grid[:, t + 1], reduction="sum").item()
    return total / (n * streams)


def step_rate(step, model, vocab_size: int, batch: int, seconds: float) -> float:
    import random

    import torch

    from charrnn.sampling import sample_next

    state = model.init_state(batch)
    ids = torch.zeros(batch, dtype=torch.long)
    gens = [random.Random(i) for i in range(batch)]  # as the server
    temps, none = [1.0] * batch, [None] * batch
    for _ in range(10):
        logits, state = step(ids, state)
        ids = sample_next(logits, temps, none, none, gens)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(5):
            logits, state = step(ids, state)
            ids = sample_next(logits, temps, none, none, gens)
        steps += 5
    return steps * batch / (time.perf_counter() - start)


def batch_dependence(step, model, vocab_size: int) -> float:
    import torch

    torch.manual_seed(0)
    worst = 0.0
    for B in [*range(1, 65), 100, 128, 200, 256]:
        ids = torch.randint(0, vocab_size, (B,))
        state = tuple(torch.randn_like(s) * 0.5 for s in model.init_state(B))
        batched, _ = step(ids, state)
        for j in {0, B // 2, B - 1}:
            alone, _ = step(ids[j : j + 1], tuple(s[:, j : j + 1].contiguous() for s in state))
            worst = max(worst, (alone - batched[j : j + 1]).abs().max().item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=1.5)
    args = parser.parse_args()
    reexec_with_allocator_env([str(Path(__file__).resolve()), *sys.argv[1:]])

    import torch

    from app.settings import Settings
    from charrnn.checkpoint import load_model
    from charrnn.engine import Engine
    from training.data import load_text, split

    torch.set_num_threads(Settings().decode_threads())
    model, vocab, _ = load_model(args.checkpoint)
    ids = torch.from_numpy(vocab.encode(load_text(args.data).text))
    _, val = split(ids, 0.1)
    variants = {precision: Engine(model, precision).step for precision in ("fp32", "bf16")}
    print(f"{torch.get_num_threads()} threads", flush=True)
    rows = {}
    for name, step in variants.items():
        loss = stepped_val_loss(step, model, val)
        rows[name] = {
            "val_loss": round(loss, 5),
            "val_bpc": round(loss / math.log(2), 5),
            "chars_per_s": {b: round(step_rate(step, model, len(vocab), b, args.seconds)) for b in (1, 64, 256)},
            "max_batch_dependence": batch_dependence(step, model, len(vocab)),
        }
        rows[name]["loss_change_vs_fp32"] = round(loss - rows["fp32"]["val_loss"], 5)
        print(json.dumps({name: rows[name]}), flush=True)


if __name__ == "__main__":
    main()
