"""A/B: `bench/load.py` at 1 and 64 streams against another checkout's server and this one's, alternating.

    .venv/bin/python bench/ab_load.py --before ../old-checkout [--rounds 2]

Both servers serve only the bundled model with the benchmark settings of `server_proc.charrnn_server` (no
per-client limits, no access log), one at a time, on 127.0.0.1; each is stopped by its PID. Prints one JSON
line per sweep point, labelled.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from server_proc import REPO, charrnn_server, single_model_store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the other checkout")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--chars", type=int, default=1000)
    args = parser.parse_args()
    store = single_model_store(REPO / "model_store" / "shakespeare.safetensors")
    for round_ in range(args.rounds):
        for label, repo in (("before", args.before.resolve()), ("after", REPO)):
            with charrnn_server(store, "shakespeare", repo) as server:
                run = subprocess.run([sys.executable, "bench/load.py", "--url", server.url, "--streams", "1", "64",
                                      "--chars", str(args.chars), "--server-pid", str(server.pid)],
                                     capture_output=True, text=True, cwd=REPO, check=True)
            for line in run.stdout.splitlines():
                if line.startswith("{"):
                    print(json.dumps({"version": label, "round": round_, **json.loads(line)}))


if __name__ == "__main__":
    main()
