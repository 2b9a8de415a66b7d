"""Training speed (characters per second) of the trainer's own step, for a few model sizes.

Run by hand on an otherwise idle machine:

    .venv/bin/python bench/train_speed.py                 # prints a markdown table
    .venv/bin/python bench/train_speed.py --write         # also puts it into docs/benchmarks.md

Each size runs `--warmup` steps, then `--steps` timed steps of batch 64 x seq 128 on tiny-shakespeare with
Adam and gradient clipping, in fp32 and in bf16 autocast. The process re-executes itself once with the
allocator settings the `charrnn` command uses, so the numbers are what `charrnn train` gets.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import re
import sys
import time
from pathlib import Path

from charrnn.runtime import reexec_with_allocator_env

REPO = Path(__file__).resolve().parent.parent

SIZES = [(2, 128), (2, 256), (2, 512), (3, 512)]
START, END = "<!-- train_speed:start -->", "<!-- train_speed:end -->"


def measure(layers: int, hidden: int, precision: str, steps: int, warmup: int) -> float:
    import torch

    from charrnn.model import CharRNN, ModelConfig
    from charrnn.vocab import Vocab
    from training.data import Batches, encode_corpus
    from training.train import TrainConfig, make_optimizer, train_step

    text = (REPO / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    vocab = Vocab.from_text(text)
    batches = Batches(encode_corpus(text, vocab), batch_size=64, seq_len=128)
    cfg = TrainConfig(data="", name="bench", layers=layers, hidden=hidden, embed=64, dropout=0.2, precision=precision)
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(len(vocab), "lstm", layers, hidden, cfg.embed, cfg.dropout)).train()
    optimizer = make_optimizer(cfg, model)
    hidden_state = model.init_state(64)
    for i in range(warmup):
        x, y = batches.get(i)
        _, hidden_state = train_step(model, optimizer, x, y, hidden_state, cfg)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        x, y = batches.get(i)
        _, hidden_state = train_step(model, optimizer, x, y, hidden_state, cfg)
    return steps * batches.chars_per_step / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="update the table in docs/benchmarks.md")
    args = parser.parse_args()
    reexec_with_allocator_env([str(Path(__file__).resolve()), *sys.argv[1:]])

    import torch

    epoch_chars = 1_003_854  # tiny-shakespeare's 90% training part
    rows = ["| model | params | fp32 chars/s | bf16 chars/s | bf16 / fp32 | tiny-shakespeare epoch fp32 / bf16 |",
            "|---|---:|---:|---:|---:|---:|"]
    for layers, hidden in SIZES:
        fp32 = measure(layers, hidden, "fp32", args.steps, args.warmup)
        bf16 = measure(layers, hidden, "bf16", args.steps, args.warmup)
        from charrnn.model import CharRNN, ModelConfig

        params = CharRNN(ModelConfig(65, "lstm", layers, hidden, 64)).num_parameters()
        rows.append(f"| {layers}x{hidden} LSTM | {params:,} | {fp32:,.0f} | {bf16:,.0f} | {bf16 / fp32:.2f}x | "
                    f"{epoch_chars / fp32:.0f} s / {epoch_chars / bf16:.0f} s |")
        print(rows[-1], flush=True)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else ""
    section = "\n".join([
        START,
        f"Measured {datetime.date.today().isoformat()} on {cpu} ({machine}).",
        f"Command: `.venv/bin/python bench/train_speed.py --steps {args.steps} --warmup {args.warmup} --write`",
        "(batch 64 x seq 128, Adam, clip 5, dropout 0.2, allocator settings on).",
        "",
        *rows,
        END,
    ])
    print()
    print(section)
    if args.write:
        doc = REPO / "docs" / "benchmarks.md"
        text = doc.read_text(encoding="utf-8") if doc.exists() else "# Benchmarks\n"
        if START in text:
            text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: section, text, flags=re.S)
        else:
            text = text.rstrip("\n") + "\n\n## Training speed (`bench/train_speed.py`)\n\n" + section + "\n"
        doc.write_text(text, encoding="utf-8")
        print(f"updated {doc.relative_to(REPO)}")


if __name__ == "__main__":
    main()
