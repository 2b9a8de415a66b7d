"""Running streams beside a client that sends long primes back to back: do primes share the decode thread fairly?

    .venv/bin/python bench/long_prime.py
    .venv/bin/python bench/long_prime.py --repo ../other-checkout --label "another version"

Serves the bundled model with default settings and measures 8 concurrent streams (`--chars` each, 100-char
primes), first alone, then while one client sends `--prime-chars`-character primes back to back (`max_chars`
1, `stream: false`) until the 8 are done. Reports the 8 streams' aggregate rate and p99 gap between
characters in both phases (the target: at least half the rate, p99 gap under 50 ms), how many long primes
were served meanwhile and their latency, and the time to first character of short-prime streams that
arrive one at a time during each phase. Every loop is bounded by characters and by `--max-seconds`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import httpx

from load import PRIME, one_stream, percentile, sweep_point
from server_proc import charrnn_server, single_model_store

REPO = Path(__file__).resolve().parent.parent


async def phase(url: str, args, flood: bool) -> dict:
    text = (REPO / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    long_prime = text[: args.prime_chars]
    stop_at = time.perf_counter() + args.max_seconds
    body = {"prime": PRIME[:100], "max_chars": args.chars, "temperature": 1.0}
    done = asyncio.Event()
    flood_latencies: list[float] = []
    joins: list[float] = []

    async def flooder(client: httpx.AsyncClient) -> None:
        while not done.is_set() and time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            r = await client.post("/generate", json={"prime": long_prime, "max_chars": 1, "stream": False})
            assert r.status_code == 200, r.text
            flood_latencies.append(time.perf_counter() - t0)

    async def joiner(client: httpx.AsyncClient) -> None:  # short primes arriving one at a time
        await asyncio.sleep(1.0)
        while not done.is_set() and len(joins) < 10 and time.perf_counter() < stop_at:
            r = await one_stream(client, "/generate", {**body, "max_chars": 5}, stop_at)
            if r.ttfc is not None:
                joins.append(r.ttfc)
            await asyncio.sleep(0.2)

    async with httpx.AsyncClient(base_url=url, timeout=args.max_seconds + 60) as client:
        helpers = [asyncio.create_task(joiner(client))]
        if flood:
            helpers.append(asyncio.create_task(flooder(client)))
            await asyncio.sleep(0.5)  # the first long prime is being read
        row = await sweep_point(url, 8, body, args.max_seconds)
        done.set()
        await asyncio.gather(*helpers)
    row.update(flood=flood, long_primes_served=len(flood_latencies),
               long_prime_latency_p50_s=percentile(flood_latencies, 50) if flood_latencies else None,
               join_ttfc_p50_ms=percentile(joins, 50) * 1000, join_ttfc_p99_ms=percentile(joins, 99) * 1000)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=REPO, help="serve from this checkout (for A/B runs)")
    parser.add_argument("--label", default="this version")
    parser.add_argument("--chars", type=int, default=3000, help="characters of each of the 8 streams")
    parser.add_argument("--prime-chars", type=int, default=10_000)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    args = parser.parse_args()
    store = single_model_store(REPO / "model_store" / "shakespeare.safetensors")
    with charrnn_server(store, "shakespeare", args.repo) as server:
        asyncio.run(sweep_point(server.url, 8, {"prime": PRIME[:100], "max_chars": 200}, 30))  # warm-up
        alone = asyncio.run(phase(server.url, args, flood=False))
        print(json.dumps(alone), flush=True)
        flooded = asyncio.run(phase(server.url, args, flood=True))
        print(json.dumps(flooded), flush=True)
    ratio = flooded["agg_chars_per_s"] / alone["agg_chars_per_s"]
    print("\n| server | 8 streams chars/s alone | beside the long primes | ratio | gap p99 ms alone / beside | "
          "long primes served (p50 s) | short-prime TTFC p50 / p99 ms alone | beside |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.label} | {alone['agg_chars_per_s']:,.0f} | {flooded['agg_chars_per_s']:,.0f} | {ratio:.2f} | "
          f"{alone['gap_p99_ms']:.1f} / {flooded['gap_p99_ms']:.1f} | {flooded['long_primes_served']} "
          f"({flooded['long_prime_latency_p50_s'] or 0:.2f}) | {alone['join_ttfc_p50_ms']:.0f} / "
          f"{alone['join_ttfc_p99_ms']:.0f} | {flooded['join_ttfc_p50_ms']:.0f} / {flooded['join_ttfc_p99_ms']:.0f} |")


if __name__ == "__main__":
    main()
