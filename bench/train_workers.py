"""Training speed of one process and of two torchrun workers on this machine, as `charrnn train` reports it.

Run by hand on an otherwise idle machine (about 3 minutes on 2 vCPUs):

    .venv/bin/python bench/train_workers.py     # prints a markdown table

For each size it runs `charrnn train` (one process, every CPU) and
`torchrun --standalone --nproc-per-node 2 -m charrnn train` (two workers, half the CPUs each) with the same
global batch, 64 streams x 128 characters of tiny-shakespeare in fp32 without dropout, and reads the trainer's
own chars/s from the run log: the median of its 10-step windows after the first (which holds the warm-up; the
median leaves out the window with the first validation pass too). Without dropout the two runs compute the
same steps up to rounding, so the training loss of their last logged step is shown too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from charrnn.model import CharRNN, ModelConfig

REPO = Path(__file__).resolve().parent.parent
SIZES = {(2, 256): 60, (2, 512): 40}  # (layers, hidden): steps, about 15-35 s a run here


def measure(workers: int, layers: int, hidden: int, steps: int, folder: Path) -> tuple[float, float]:
    """(chars/s, training loss at the last logged step) of one run."""
    # Both through `-m charrnn`, the `charrnn` command, which re-executes itself under the allocator settings
    # (charrnn/runtime.py): worth up to 1.65x for nn.LSTM, so one side without them would not be comparable.
    launch = ([sys.executable, "-m", "charrnn"] if workers == 1 else
              [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(workers),
               "-m", "charrnn"])
    run = folder / f"{workers}-{layers}x{hidden}"
    subprocess.run([*launch, "train", "--data", str(REPO / "data" / "tinyshakespeare.txt"), "--name", "bench",
                    "--run-dir", str(run), "--model-store", str(folder / "store"), "--layers", str(layers),
                    "--hidden", str(hidden), "--embed", "64", "--batch-size", "64", "--seq-len", "128",
                    "--precision", "fp32", "--dropout", "0", "--max-steps", str(steps), "--eval-every", "100000"],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["type"] == "train"]
    return statistics.median(r["chars_per_s"] for r in rows if r["step"] > 10), rows[-1]["loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()

    print("| model | params | 1 process chars/s | 2 workers chars/s | 2 workers / 1 process | loss at the end, 1 / 2 |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for (layers, hidden), steps in SIZES.items():
            params = CharRNN(ModelConfig(65, "lstm", layers, hidden, 64)).num_parameters()
            (one, loss_one), (two, loss_two) = (measure(n, layers, hidden, steps, Path(tmp)) for n in (1, 2))
            print(f"| {layers}x{hidden} LSTM | {params:,} | {one:,.0f} | {two:,.0f} | {two / one:.2f}x | "
                  f"{loss_one:.4f} / {loss_two:.4f} (step {steps}) |", flush=True)


if __name__ == "__main__":
    main()
