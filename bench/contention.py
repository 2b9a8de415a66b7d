"""A stream's rate beside CPU-bound neighbours: is the server fair when another process wants the CPU?

    .venv/bin/python bench/contention.py                      # the default settings
    .venv/bin/python bench/contention.py --env CHARRNN_THREADS=2 --label "2 threads"
    .venv/bin/python bench/contention.py --repo ../other-checkout --label "another version"

Serves the bundled model (`charrnn serve`, allocator settings on) and measures one stream of `--chars`
characters (the median of `--repeats` runs) and 64 concurrent streams, first on an idle machine, then beside
1 and 2 neighbour processes that each keep one CPU busy (`--neighbour spin`, a pure-Python loop) or run a
2-thread PyTorch matrix product loop (`--neighbour torch`). Neighbours are started fresh for each point,
stop by themselves after `--neighbour-seconds` and are killed by PID after it. Prints one JSON line per point
and a Markdown table with each rate as a fraction of the idle rate (the target: one stream keeps at least
1/4 of its idle rate beside two neighbours on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from load import PRIME, sweep_point
from server_proc import charrnn_server, single_model_store

REPO = Path(__file__).resolve().parent.parent

NEIGHBOURS = {
    "spin": "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n",
    "torch": "import time, torch\ntorch.set_num_threads(2)\na = torch.randn(1024, 1024)\nend = time.time() + {seconds}\n"
             "while time.time() < end:\n    a @ a\n",
}


def start_neighbours(kind: str, count: int, seconds: float) -> list[subprocess.Popen]:
    code = NEIGHBOURS[kind].format(seconds=seconds)
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(count)]
    time.sleep(1.0 if kind == "torch" else 0.3)  # running before the measurement starts
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def measure_point(url: str, streams: int, chars: int, repeats: int, max_seconds: float) -> dict:
    body = {"prime": PRIME[:100], "max_chars": chars, "temperature": 1.0}
    rows = [asyncio.run(sweep_point(url, streams, body, max_seconds)) for _ in range(repeats)]
    rate = statistics.median(r["agg_chars_per_s"] for r in rows)
    return {"streams": streams, "chars_per_s": rate, "runs": [round(r["agg_chars_per_s"]) for r in rows],
            "gap_p99_ms": statistics.median(r["gap_p99_ms"] for r in rows),
            "errors": sum(r["errors"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", nargs="*", default=[], help="KEY=VALUE settings for the server")
    parser.add_argument("--label", default="default settings")
    parser.add_argument("--repo", type=Path, default=REPO, help="serve from this checkout (for A/B runs)")
    parser.add_argument("--neighbour", choices=sorted(NEIGHBOURS), default="spin")
    parser.add_argument("--chars", type=int, default=1000, help="characters of the one stream")
    parser.add_argument("--chars-64", type=int, default=300, help="characters of each of the 64 streams")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=40.0, help="bound per measurement")
    parser.add_argument("--neighbour-seconds", type=float, default=150.0)
    args = parser.parse_args()
    store = single_model_store(REPO / "model_store" / "shakespeare.safetensors")
    env = dict(kv.split("=", 1) for kv in args.env)
    results: dict[int, dict[int, dict]] = {}
    with charrnn_server(store, "shakespeare", args.repo, **env) as server:
        measure_point(server.url, 8, 200, 1, args.max_seconds)  # warm-up
        for neighbours in (0, 1, 2):
            procs = start_neighbours(args.neighbour, neighbours, args.neighbour_seconds)
            try:
                for streams, chars, repeats in ((1, args.chars, args.repeats), (64, args.chars_64, 1)):
                    row = measure_point(server.url, streams, chars, repeats, args.max_seconds)
                    row["neighbours"] = neighbours
                    results.setdefault(streams, {})[neighbours] = row
                    print(json.dumps(row), flush=True)
            finally:
                stop(procs)
    print(f"\n| server | streams | idle chars/s | beside 1 {args.neighbour} neighbour | beside 2 |")
    print("|---|---:|---:|---:|---:|")
    for streams, by_n in results.items():
        idle = by_n[0]["chars_per_s"]
        cells = [f"{by_n[n]['chars_per_s']:,.0f} ({by_n[n]['chars_per_s'] / idle:.2f})" for n in (1, 2)]
        print(f"| {args.label} | {streams} | {idle:,.0f} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
