"""Each regulariser of `charrnn train` against the same baseline on tiny-shakespeare, under the same budget.

    .venv/bin/python experiments/regularisation.py run [--steps 1200] [--jobs 2]   # trains into runs/regularisation/
    .venv/bin/python experiments/regularisation.py table                           # the markdown table

Every variant is the baseline plus one option (`--extra` adds others, such as every option that helped),
trained for the same number of steps from the same seed with one thread each, `--jobs` at a time: a fixed step
budget makes the comparison independent of what else runs on the machine. A variant already trained for fewer
steps is resumed (exact) rather than retrained, except with the cosine schedule, whose shape is its length.
The loss is the trainer's best held-out loss (stream protocol) over the run, in nats per character.
docs/models.md shows the result.
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


def resumable(folder: Path, options: list[str]) -> bool:
    """Whether the folder holds an earlier, shorter run of these options that `--resume` can take further.

    Not for the cosine schedule, whose shape depends on the run's length.
    """
    results = [json.loads(p.read_text()) for p in folder.glob("result-*.json")]
    return bool(results) and all(r["options"] == options for r in results) and "cosine" not in options


def folder_of(name: str, options: list[str], steps: int) -> Path:
    """The run folder: one per variant, or per variant and length for the cosine schedule."""
    return OUT / (slug(name) + (f"-{steps}" if "cosine" in options else ""))


def train(name: str, options: list[str], steps: int) -> dict:
    folder = folder_of(name, options, steps)
    charrnn = str(Path(sys.executable).parent / "charrnn")
    if resumable(folder, options):  # a shorter run of the same variant goes on (resume is exact)
        command = [charrnn, "train", "--resume", str(folder), "--max-steps", str(steps)]
    else:
        command = [charrnn, "train", "--data", str(DATA), "--name", folder.name, "--run-dir", str(folder),
                   "--model-store", str(OUT / "store"), "--overwrite", "--max-steps", str(steps), *BASELINE, *options]
    started = time.monotonic()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return summarise(name, options, steps, round(time.monotonic() - started))


def summarise(name: str, options: list[str], steps: int, seconds: int | None = None) -> dict:
    """The run's best and last held-out loss from its log, kept in result.json beside it."""
    folder = folder_of(name, options, steps)
    vals = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    vals = [v for v in vals if v["type"] == "val" and v["step"] <= steps]
    best = min(vals, key=lambda v: v["val_loss"])
    result = {"name": name, "options": options, "steps": steps, "best_val": best["val_loss"],
              "best_step": best["step"], "last_val": vals[-1]["val_loss"],
              "seconds_this_invocation": seconds}
    (folder / f"result-{steps}.json").write_text(json.dumps(result, indent=1))
    print(f"{name}: best {result['best_val']:.4f} at step {result['best_step']}, last {result['last_val']:.4f}",
          flush=True)
    return result


def table() -> str:
    """One row per variant, one column per step budget: best held-out loss (its step), and the change."""
    results = [json.loads(p.read_text()) for p in OUT.glob("*/result-*.json")]
    budgets = sorted({r["steps"] for r in results})
    found = {(r["name"], r["steps"]): r for r in results}
    names = list(VARIANTS) + sorted({r["name"] for r in results} - set(VARIANTS))
    rows = ["| variant | options | " + " | ".join(f"{b:,} steps: best (step), vs baseline" for b in budgets) + " |",
            "|---|---|" + "---:|" * len(budgets)]
    for name in (n for n in names if any((n, b) in found for b in budgets)):
        cells = []
        for b in budgets:
            r, base = found.get((name, b)), found.get(("baseline", b))
            cells.append("—" if r is None else f"{r['best_val']:.4f} ({r['best_step']}), "
                         + ("—" if base is None else f"{r['best_val'] - base['best_val']:+.4f}"))
        options = next(found[name, b]["options"] for b in budgets if (name, b) in found)
        rows.append(f"| {name} | `{' '.join(options) or '-'}` | " + " | ".join(cells) + " |")
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
