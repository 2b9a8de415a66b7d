"""What a client with no credentials can do to everyone else, measured against a local server (docs/security.md).

    python bench/abuse.py                      # this checkout, default settings, the bundled model
    python bench/abuse.py --repo ../old        # the same attacks on another checkout (before/after)

Attacker and victim are different clients: the attacker's sockets are bound to 127.0.0.2, the victim's to
127.0.0.3 (Linux routes all of 127/8 to loopback), so per-address limits tell them apart as they would two
hosts. Every loop is bounded by a count and a time limit.

1. abandoned: 256 `stream: false` requests for 5,000 characters, each connection reset right after sending.
2. evict: the victim keeps one session; the attacker makes up to 10,000 one-character generations (the
   default CHARRNN_MAX_SESSIONS), then the victim continues its session.
3. cross-site: a body-less, preflight-free POST /admin/reload as another site's page would send it.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import struct
import time
from pathlib import Path

import httpx

from server_proc import REPO, charrnn_server, single_model_store

ATTACKER, VICTIM = "127.0.0.2", "127.0.0.3"


def client(url: str, address: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=30, transport=httpx.HTTPTransport(local_address=address))


def metric(url: str, name: str) -> float:
    text = client(url, "127.0.0.4").get("/metrics").text
    return sum(float(m.group(1)) for m in re.finditer("^" + re.escape(name) + r"(?:\{[^}]*\})? (\S+)$", text, re.M))


def abandoned(url: str) -> dict:
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"prime": "ROMEO:", "max_chars": 5000, "stream": False}).encode()
    request = (f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    started = time.monotonic()
    for _ in range(256):
        s = socket.socket()
        s.bind((ATTACKER, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(request)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
        s.close()
    sent_s = time.monotonic() - started
    time.sleep(1.0)
    running = metric(url, "charrnn_streams_running")
    with client(url, VICTIM) as c:
        t0 = time.monotonic()
        status = c.post("/generate", json={"prime": "A", "max_chars": 20, "stream": False}).status_code
        victim_ms = (time.monotonic() - t0) * 1000
    time.sleep(4.0)
    return {"sent_s": round(sent_s, 2), "running_after_1s": running, "victim_status": status,
            "victim_ms": round(victim_ms, 1), "running_after_5s": metric(url, "charrnn_streams_running"),
            "dropped_counted": metric(url, "charrnn_streams_dropped_total")}


def evict(url: str) -> dict:
    with client(url, VICTIM) as victim, client(url, ATTACKER) as attacker:
        mine = victim.post("/generate", json={"prime": "ROMEO:", "max_chars": 5, "stream": False}).json()
        statuses: dict[int, int] = {}
        started = time.monotonic()
        for _ in range(10_000):
            if time.monotonic() - started > 120:
                break
            r = attacker.post("/generate", json={"prime": "a", "max_chars": 1, "stream": False})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        seconds = time.monotonic() - started
        after = victim.post("/generate", json={"session_id": mine["session_id"], "max_chars": 5, "stream": False})
    return {"attacker_statuses": statuses, "attack_s": round(seconds, 1), "victim_continues": after.status_code,
            "evicted": metric(url, "charrnn_sessions_evicted_total")}


def cross_site(url: str) -> dict:
    with client(url, "127.0.0.1") as c:
        r = c.post("/admin/reload", headers={"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"})
    return {"status": r.status_code, "body": r.text[:120]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout to run the server from")
    parser.add_argument("--model", type=Path, default=REPO / "model_store" / "shakespeare.safetensors")
    args = parser.parse_args()
    store = single_model_store(args.model)
    results = {}
    for name, attack in (("abandoned", abandoned), ("evict", evict), ("cross_site", cross_site)):
        with charrnn_server(store, args.model.stem, args.repo.resolve(), client_limits=True) as server:
            results[name] = attack(server.url)  # a fresh server for each attack
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
