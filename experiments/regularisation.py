"""Each regulariser of `charrnn train` against the same baseline on tiny-shakespeare, under the same budget.

    .venv/bin/python experiments/regularisation.py run [--steps 1200] [--jobs 2]   # trains into runs/regularisation/
    .venv/bin/python experiments/regularisation.py table                           # the markdown table

Every variant is the baseline plus one option (the last adds every option that helped), trained for the same
number of steps from the same seed with one thread each, `--jobs` at a time: a fixed step budget makes the
comparison independent of what else runs on the machine. The loss is the trainer's best held-out loss
(stream protocol) over the run, in nats per character. docs/models.md shows the result.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "runs" / "regularisation"
DATA = REPO / "data" / "tinyshakespeare.txt"
BASELINE = ["--layers", "2", "--hidden", "256", "--dropout", "0.2", "--lr", "2e-3", "--precision", "fp32",
            "--eval-every", "100", "--seed", "1337", "--threads", "1"]
VARIANTS = {
    "baseline": [],
    "locked dropout": ["--locked-dropout"],
    "weight drop 0.25": ["--weight-drop", "0.25"],
    "embedding drop 0.1": ["--embed-drop", "0.1"],
    "weight decay 0.1": ["--weight-decay", "0.1"],
    "cosine, 100 warmup steps": ["--schedule", "cosine", "--warmup-steps", "100"],
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def train(name: str, options: list[str], steps: int) -> dict:
    folder = OUT / slug(name)
    command = [str(Path(sys.executable).parent / "charrnn"), "train", "--data", str(DATA), "--name", slug(name),
               "--run-dir", str(folder), "--model-store", str(OUT / "store"), "--overwrite",
               "--max-steps", str(steps), *BASELINE, *options]
    started = time.monotonic()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    vals = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    vals = [v for v in vals if v["type"] == "val"]
    best = min(vals, key=lambda v: v["val_loss"])
    result = {"name": name, "options": options, "steps": steps, "best_val": best["val_loss"],
              "best_step": best["step"], "last_val": vals[-1]["val_loss"], "seconds": time.monotonic() - started}
    (folder / "result.json").write_text(json.dumps(result, indent=1))
    print(f"{name}: best {result['best_val']:.4f} at step {result['best_step']}, last {result['last_val']:.4f}",
          flush=True)
    return result


def table() -> str:
    results = [json.loads(p.read_text()) for p in sorted(OUT.glob("*/result.json"))]
    base = next(r for r in results if r["name"] == "baseline")
    order = list(VARIANTS) + sorted(r["name"] for r in results if r["name"] not in VARIANTS)
    rows = ["| variant | options | best held-out loss (step) | vs baseline | last |", "|---|---|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: order.index(r["name"])):
        rows.append(f"| {r['name']} | `{' '.join(r['options']) or '-'}` | {r['best_val']:.4f} ({r['best_step']}) "
                    f"| {r['best_val'] - base['best_val']:+.4f} | {r['last_val']:.4f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["run", "table"])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument("--extra", nargs=2, action="append", metavar=("NAME", "OPTIONS"), default=[],
                        help="another variant: a name and its options as one string")
    args = parser.parse_args()
    if args.what == "table":
        print(table())
        return
    variants = {k: v for k, v in VARIANTS.items() if not args.only or k in args.only}
    variants.update({name: options.split() for name, options in args.extra})
    OUT.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda item: train(item[0], item[1], args.steps), variants.items()))
    print(table())


if __name__ == "__main__":
    main()
