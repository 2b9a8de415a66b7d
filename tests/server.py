"""A real server for end-to-end tests: `charrnn serve` in a subprocess on a free 127.0.0.1 port."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import httpx
from httpx_sse import connect_sse

from conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, store: Path, env: dict[str, str] | None = None, command: list[str] | None = None,
                 log: Path | None = None, port: int | None = None, test_defaults: bool = True,
                 args: list[str] | None = None, preexec_fn: Callable[[], None] | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        defaults = {"CHARRNN_MODEL_STORE": str(store), "CHARRNN_DEFAULT_MODEL": "tiny", "CHARRNN_THREADS": "1"}
        inherited = {k: v for k, v in os.environ.items() if test_defaults or not k.startswith("CHARRNN_")}
        self.env = {**inherited, **(defaults if test_defaults else {}), **(env or {})}
        self.command = command or [sys.executable, "-m", "cli", "serve", "--host", "127.0.0.1",
                                   "--port", str(self.port), "--log-level", "warning", *(args or [])]
        self.log_path = log or store.parent / f"server-{self.port}.log"
        self.preexec_fn = preexec_fn  # runs in the child before exec, e.g. to lower its resource limits
        self.proc: subprocess.Popen | None = None

    def start(self, wait_ready: bool = True, timeout: float = 60) -> Server:
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command, env=self.env, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=self.preexec_fn)
        deadline = time.monotonic() + timeout
        path = "/readyz" if wait_ready else "/healthz"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + path, timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready in {timeout} s: {self.log_path.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self.log.close()

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 30), **kw)

    def metric(self, name: str, labels: str = "", headers: dict[str, str] | None = None) -> float:
        """The value of one sample of /metrics (0 if absent)."""
        r = httpx.get(self.url + "/metrics", headers=headers)
        assert r.status_code == 200, r.text
        text = r.text
        pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else r"(?:\{\})?") + r" (\S+)"
        match = re.search("^" + pattern + "$", text, flags=re.M)
        return float(match.group(1)) if match else 0.0


@contextmanager
def running(store: Path, env: dict[str, str] | None = None):
    server = Server(store, env).start()
    try:
        yield server
    finally:
        server.stop()


def generate(client: httpx.Client, **body) -> dict:
    """One non-streamed generation that must succeed."""
    r = client.post("/generate", json={"stream": False, **body})
    assert r.status_code == 200, r.text
    return r.json()


def stream_events(client: httpx.Client, body: dict | None = None, method: str = "POST", params=None) -> list:
    """All (event, data) pairs of one generation stream."""
    events = []
    kwargs = {"json": body} if method == "POST" else {"params": params}
    with connect_sse(client, method, "/generate", **kwargs) as source:
        assert source.response.status_code == 200, source.response.read()
        assert source.response.headers["content-type"].startswith("text/event-stream")
        for sse in source.iter_sse():
            events.append((sse.event, json.loads(sse.data), sse.id))
    return events


def streamed_text(events: list) -> str:
    return "".join(data["char"] for event, data, _ in events if event == "token")


class RedisServer:
    """A real `redis-server` on a free 127.0.0.1 port with its own folder. `persistence`: "rdb" saves a snapshot
    on shutdown (so a SIGTERM restart keeps data), "aof" logs every write before answering (so even SIGKILL
    keeps data), "none" keeps nothing."""

    OPTIONS = {"rdb": ["--save", "3600 1", "--appendonly", "no"],
               "aof": ["--save", "", "--appendonly", "yes", "--appendfsync", "always"],
               "none": ["--save", "", "--appendonly", "no"]}

    def __init__(self, folder: Path, persistence: str = "rdb"):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.folder = folder
        self.options = self.OPTIONS[persistence]
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.folder),
             *self.options, "--protected-mode", "yes", "--logfile", "redis.log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: redis saves its data to disk (with persistence) and exits; SIGKILL: it just dies."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(20)
