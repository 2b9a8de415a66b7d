"""The whole serving benchmark in one command; writes its tables into docs/benchmarks.md.

    .venv/bin/python bench/report.py            # about 10 minutes on a 2-core machine

For the bundled model and for a 2x256 model (trained here for 300 steps if `runs/bench-models/` lacks it):
1. the ceilings without HTTP (`bench/ceiling.py`): model steps with sampling at batch 1/8/64/256 with 1 and
   2 threads, and the SSE emission rate of uvicorn + the service's framing with a trivial generator;
2. `charrnn serve` loaded with 1, 8, 64 and 256 concurrent streams (`bench/load.py`), 100-character primes;
   and the time to first character of 20 streams that arrive one at a time while 63 others run;
3. the naive baseline: the same server with `CHARRNN_BATCHING=off`, at 1, 8 and 64 streams;
4. the RSS cost of 10,000 idle sessions on a fresh server;
then the ratios the performance targets are stated in. Every server runs on 127.0.0.1 and is stopped by
its PID; every load is bounded in characters and seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

from load import PRIME, join_point, run_sweep, server_rss_mib
from server_proc import ALLOCATOR_ENV, ServerProcess, charrnn_server, single_model_store

REPO = Path(__file__).resolve().parent.parent

START, END = "<!-- serving:start -->", "<!-- serving:end -->"


def ensure_small_model() -> Path:
    store = REPO / "runs" / "bench-models"
    path = store / "shakespeare-2x256.safetensors"
    if not path.exists():
        subprocess.run([sys.executable, "-m", "cli", "train", "--data", str(REPO / "data" / "tinyshakespeare.txt"),
                        "--name", "shakespeare-2x256", "--layers", "2", "--hidden", "256", "--max-steps", "300",
                        "--eval-every", "300", "--precision", "bf16", "--model-store", str(store),
                        "--run-dir", str(REPO / "runs" / "bench-2x256"), "--overwrite"],
                       check=True, cwd=REPO, env={**__import__("os").environ, **ALLOCATOR_ENV})
    return path


def ceilings(checkpoint: Path) -> dict:
    out = subprocess.run([sys.executable, str(REPO / "bench" / "ceiling.py"), str(checkpoint)], check=True,
                         capture_output=True, text=True, cwd=REPO).stdout
    return json.loads(out[out.index("{"):])


async def make_idle_sessions(url: str, count: int, concurrency: int = 32) -> int:
    made = 0
    queue = iter(range(count))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal made
        for _ in queue:
            r = await client.post("/generate", json={"prime": "A", "max_chars": 1, "stream": False})
            made += r.status_code == 200

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return made


def server(store: Path, name: str, **env: str) -> ServerProcess:
    return charrnn_server(store, name, **env)


def measure(checkpoint: Path, args) -> dict:
    name = checkpoint.stem
    store = single_model_store(checkpoint)  # this model alone, whatever else model_store/ holds
    print(f"== {name}: ceilings", flush=True)
    result = {"name": name, "ceiling": ceilings(checkpoint)}
    print(f"== {name}: batched server", flush=True)
    with server(store, name) as srv:
        result["batched"] = run_sweep(srv.url, args.streams, args.chars, 100, args.max_seconds, srv.pid)
        prime = (PRIME * 2)[:100]
        result["join"] = asyncio.run(join_point(srv.url, 63, 20, {"prime": prime, "temperature": 1.0}, 60))
        print(json.dumps(result["join"]), flush=True)
    print(f"== {name}: naive server (CHARRNN_BATCHING=off)", flush=True)
    with server(store, name, CHARRNN_BATCHING="off") as srv:
        result["naive"] = run_sweep(srv.url, [n for n in args.streams if n <= 64], args.chars, 100,
                                    args.max_seconds, srv.pid)
    print(f"== {name}: {args.idle_sessions} idle sessions", flush=True)
    with server(store, name, CHARRNN_MAX_SESSIONS=str(args.idle_sessions + 100)) as srv:
        asyncio.run(make_idle_sessions(srv.url, 200))  # warm up the request path first
        before = server_rss_mib(srv.pid)
        t0 = time.monotonic()
        made = asyncio.run(make_idle_sessions(srv.url, args.idle_sessions))
        time.sleep(1)
        after = server_rss_mib(srv.pid)
        sessions = httpx.get(srv.url + "/metrics").text
        active = float(re.search(r"^charrnn_sessions_active (\S+)$", sessions, re.M).group(1))
        result["idle"] = {"made": made, "active": active, "rss_before_mib": before, "rss_after_mib": after,
                          "seconds": round(time.monotonic() - t0, 1)}
    print(json.dumps(result["idle"]), flush=True)
    return result


def row_by(rows: list[dict], n: int) -> dict | None:
    return next((r for r in rows if r["streams"] == n), None)


def render(results: list[dict], args) -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    lines = [START, f"Measured {datetime.date.today().isoformat()} on {cpu} (2 cores, torch {torch.__version__}), "
             f"client and server on the same machine.",
             f"Command: `.venv/bin/python bench/report.py` ({args.chars} characters per stream, 100-character "
             f"primes, at most {args.max_seconds:g} s per point).", ""]
    for res in results:
        c = res["ceiling"]
        best = {int(b): max(c["model_chars_per_s_1_thread"][b], c["model_chars_per_s_2_thread"][b])
                for b in c["model_chars_per_s_1_thread"]}
        sse = c["sse"]["agg_chars_per_s"]
        lines += [f"#### {res['name']}", "",
                  "Ceilings without HTTP (chars/s): model step + sampling, 1 / 2 threads; SSE emission with a trivial "
                  "generator.", "",
                  "| batch | 1 thread | 2 threads |", "|---:|---:|---:|"]
        for b in best:
            lines.append(f"| {b} | {c['model_chars_per_s_1_thread'][str(b)]:,} | {c['model_chars_per_s_2_thread'][str(b)]:,} |")
        lines += ["", f"SSE emission ceiling (64 streams, trivial generator): **{sse:,.0f} events/s**.", "",
                  "| server | streams | chars/s (all) | chars/s per stream | TTFC p50 / p99 ms | gap p50 / p99 ms | "
                  "errors | RSS MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for label, rows in (("batched", res["batched"]), ("naive", res["naive"])):
            for r in rows:
                lines.append(f"| {label} | {r['streams']} | {r['agg_chars_per_s']:,.0f} | "
                             f"{r['per_stream_chars_per_s']:,.0f} | {r['ttfc_p50_ms']:.0f} / {r['ttfc_p99_ms']:.0f} | "
                             f"{r['gap_p50_ms']:.2f} / {r['gap_p99_ms']:.2f} | {r['errors']} | "
                             f"{r['server_rss_mib'] or 0:.0f} |")
        b1, b64, b256 = (row_by(res["batched"], n) for n in (1, 64, 256))
        n64 = row_by(res["naive"], 64)
        idle = res["idle"]
        idle_mb = (idle["rss_after_mib"] - idle["rss_before_mib"]) * 1.048576
        limit64 = min(best[64], sse)
        checks = [
            ("64 streams vs naive baseline", f"{b64['agg_chars_per_s'] / n64['agg_chars_per_s']:.2f}x", "≥ 10x",
             b64["agg_chars_per_s"] / n64["agg_chars_per_s"] >= 10),
            ("64 streams vs min(model ceiling at 64, SSE ceiling)",
             f"{b64['agg_chars_per_s'] / limit64:.0%} of {limit64:,.0f}", "≥ 50%", b64["agg_chars_per_s"] / limit64 >= 0.5),
            ("1 stream (after its first character) vs batch-1 model step rate",
             f"{b1['per_stream_chars_per_s'] / best[1]:.0%} of {best[1]:,}", "≥ 70%",
             b1["per_stream_chars_per_s"] / best[1] >= 0.7),
            ("time to first character p99, 64 streams", f"{b64['ttfc_p99_ms']:.0f} ms", "≤ 50 ms",
             b64["ttfc_p99_ms"] <= 50),
            *([("256 concurrent streams", f"{b256['errors']} errors", "0 errors", b256["errors"] == 0)] if b256 else []),
            *([("(not a target) time to first character p99 of a stream joining 63 running ones",
                f"{res['join']['ttfc_p99_ms']:.0f} ms (p50 {res['join']['ttfc_p50_ms']:.0f})", "—", None)]
              if "join" in res else []),
            (f"{idle['made']:,} idle sessions", f"{idle_mb:.1f} MB RSS ({idle['active']:.0f} held)", "≤ 50 MB",
             idle_mb <= 50),
        ]
        lines += ["", "| target | measured | goal | met |", "|---|---:|---:|---|"]
        lines += [f"| {what} | {got} | {goal} | {'—' if ok is None else 'yes' if ok else '**no**'} |"
                  for what, got, goal, ok in checks]
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--chars", type=int, default=1000)
    parser.add_argument("--max-seconds", type=float, default=30.0)
    parser.add_argument("--idle-sessions", type=int, default=10_000)
    parser.add_argument("--models", nargs="+", type=Path,
                        help="checkpoints [default: model_store/shakespeare.safetensors and a 2x256 model]")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--from-json", type=Path, help="render saved results (runs/bench-report.json) again")
    args = parser.parse_args()
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        models = args.models or [REPO / "model_store" / "shakespeare.safetensors", ensure_small_model()]
        results = [measure(m, args) for m in models]
        (REPO / "runs").mkdir(exist_ok=True)
        (REPO / "runs" / "bench-report.json").write_text(json.dumps(results, indent=2))
    section = render(results, args)
    print(section)
    if not args.no_write:
        doc = REPO / "docs" / "benchmarks.md"
        text = doc.read_text(encoding="utf-8")
        if START in text:
            text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: section, text, flags=re.S)
        else:
            text = text.rstrip("\n") + "\n\n## Serving (`bench/report.py`)\n\n" + section + "\n"
        doc.write_text(text, encoding="utf-8")
        print("updated docs/benchmarks.md")


if __name__ == "__main__":
    main()
