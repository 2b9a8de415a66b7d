"""Load benchmark: N concurrent SSE streams against a running char-rnn server on 127.0.0.1.

    .venv/bin/python bench/load.py --url http://127.0.0.1:8000 --streams 1 8 64 256 --server-pid PID

For each N it opens N streams at once (httpx + httpx-sse), each asking for `--chars` characters with a
`--prime-chars`-long prime, and reports aggregate chars/s, per-stream chars/s, time to first character and
inter-character gap (p50/p99), errors, and the server's RSS. Every loop is bounded: by the characters asked
for and by `--max-seconds` per sweep point. Only loopback URLs are accepted.

`bench/run_all.py` starts the servers itself and writes docs/benchmarks.md; use this script directly to
load a server you started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
from httpx_sse import aconnect_sse

PRIME = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\nFirst Citizen:\n"
    "You are all resolved rather to die than to famish?\n"
)


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if not (host == "localhost" or host.startswith("127.") or host == "::1"):
        raise SystemExit(f"refusing to load {host}: this benchmark only targets loopback addresses")


@dataclass
class StreamResult:
    chars: int = 0
    ttfc: float | None = None  # request sent -> first token event
    gaps: list[float] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def one_stream(client: httpx.AsyncClient, path: str, body: dict | None, deadline: float,
                     method: str = "POST") -> StreamResult:
    result = StreamResult()
    start = time.perf_counter()
    last = None
    try:
        kwargs = {"json": body} if method == "POST" else {}
        async with aconnect_sse(client, method, path, **kwargs) as source:
            if source.response.status_code != 200:
                result.error = f"HTTP {source.response.status_code}"
                return result
            async for sse in source.aiter_sse():
                if sse.event == "token":
                    now = time.perf_counter()
                    if last is None:
                        result.ttfc = now - start
                    else:
                        result.gaps.append(now - last)
                    last = now
                    result.chars += 1
                    if now > deadline:
                        break
                elif sse.event == "error":
                    result.error = json.loads(sse.data)["error"]["type"]
                    break
    except (httpx.HTTPError, OSError) as e:
        result.error = type(e).__name__
    result.seconds = time.perf_counter() - start
    return result


def server_rss_mib(pid: int | None) -> float | None:
    if not pid:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def sweep_point(url: str, streams: int, body: dict, max_seconds: float, path: str = "/generate",
                      method: str = "POST") -> dict:
    limits = httpx.Limits(max_connections=streams + 8, max_keepalive_connections=streams + 8)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(max_seconds + 60), limits=limits) as client:
        deadline = time.perf_counter() + max_seconds
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, path, body, deadline, method) for _ in range(streams)))
        wall = time.perf_counter() - start
    chars = sum(r.chars for r in results)
    ttfc = [r.ttfc for r in results if r.ttfc is not None]
    gaps = [g for r in results for g in r.gaps]
    per_stream = [(len(r.gaps)) / sum(r.gaps) for r in results if r.gaps and sum(r.gaps) > 0]
    return {
        "streams": streams,
        "chars": chars,
        "seconds": round(wall, 3),
        "agg_chars_per_s": chars / wall if wall else 0.0,
        "per_stream_chars_per_s": statistics.median(per_stream) if per_stream else 0.0,  # after the first char
        "ttfc_p50_ms": percentile(ttfc, 50) * 1000,
        "ttfc_p99_ms": percentile(ttfc, 99) * 1000,
        "gap_p50_ms": percentile(gaps, 50) * 1000,
        "gap_p99_ms": percentile(gaps, 99) * 1000,
        "errors": sum(1 for r in results if r.error),
        "error_kinds": sorted({r.error for r in results if r.error}),
    }


async def join_point(url: str, running: int, joins: int, body: dict, max_seconds: float) -> dict:
    """Time to first character of streams that arrive one at a time while `running` others are generating.

    The sweep's TTFC has all N streams arrive at once, so the last one waits for every prime; this is what a
    client arriving at a busy server sees. Bounded: `joins` short streams, background streams end by deadline.
    """
    limits = httpx.Limits(max_connections=running + 8, max_keepalive_connections=running + 8)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(max_seconds + 60), limits=limits) as client:
        deadline = time.perf_counter() + max_seconds
        background = [asyncio.create_task(one_stream(client, "/generate", {**body, "max_chars": 5000}, deadline))
                      for _ in range(running)]
        await asyncio.sleep(2.0)  # every background stream primed and stepping
        results = []
        for _ in range(joins):
            results.append(await one_stream(client, "/generate", {**body, "max_chars": 20}, deadline))
            await asyncio.sleep(0.05)
        still_running = sum(not t.done() for t in background)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
    ttfc = [r.ttfc for r in results if r.ttfc is not None]
    return {"running": running, "joins": joins, "still_running_at_end": still_running,
            "ttfc_p50_ms": percentile(ttfc, 50) * 1000, "ttfc_p99_ms": percentile(ttfc, 99) * 1000,
            "errors": sum(1 for r in results if r.error)}


def run_sweep(url: str, counts: list[int], chars: int, prime_chars: int, max_seconds: float,
              server_pid: int | None = None, model: str | None = None, temperature: float = 1.0) -> list[dict]:
    check_loopback(url)
    prime = (PRIME * (prime_chars // len(PRIME) + 1))[:prime_chars]
    rows = []
    for n in counts:
        body = {"prime": prime, "max_chars": chars, "temperature": temperature}
        if model:
            body["model"] = model
        row = asyncio.run(sweep_point(url, n, body, max_seconds))
        row["server_rss_mib"] = server_rss_mib(server_pid)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--chars", type=int, default=1000, help="characters per stream")
    parser.add_argument("--prime-chars", type=int, default=100)
    parser.add_argument("--max-seconds", type=float, default=30.0, help="bound per sweep point")
    parser.add_argument("--server-pid", type=int, help="read the server's RSS from /proc")
    parser.add_argument("--model")
    args = parser.parse_args()
    run_sweep(args.url, args.streams, args.chars, args.prime_chars, args.max_seconds, args.server_pid, args.model)


if __name__ == "__main__":
    main()
