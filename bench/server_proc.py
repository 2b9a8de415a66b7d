"""Start a server process on a free 127.0.0.1 port for a benchmark, and stop it (by its PID) afterwards."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from charrnn.runtime import ALLOCATOR_ENV

REPO = Path(__file__).resolve().parent.parent


def single_model_store(checkpoint: Path) -> Path:
    """A store under runs/ holding only `checkpoint` (a link), so a server loads that model alone."""
    store = REPO / "runs" / "bench-stores" / checkpoint.stem
    store.mkdir(parents=True, exist_ok=True)
    link = store / checkpoint.name
    if not link.exists():
        link.symlink_to(checkpoint.resolve())
    return store


# A benchmark is one client playing many users: the per-client limits (docs/security.md) would refuse it.
NO_CLIENT_LIMITS = {"CHARRNN_CLIENT_RATE": "", "CHARRNN_CLIENT_SESSIONS": "", "CHARRNN_CLIENT_MAX_STREAMS": "0"}


def charrnn_server(store: Path, name: str, repo: Path = REPO, client_limits: bool = False, **env: str) -> ServerProcess:
    """`charrnn serve` of `repo` (another checkout for A/B runs) serving `store`, with the allocator settings
    and, unless `client_limits`, without per-client limits."""
    module = "cli" if (repo / "cli").is_dir() else "charrnn"  # earlier versions: python -m charrnn
    command = [sys.executable, "-m", module, "serve", "--host", "127.0.0.1", "--log-level", "warning"]
    limits = {} if client_limits else NO_CLIENT_LIMITS
    # No JSON line per request: earlier versions, which A/B runs compare with, logged nothing at this level.
    env = {"CHARRNN_MODEL_STORE": str(store), "CHARRNN_DEFAULT_MODEL": name, **ALLOCATOR_ENV,
           "CHARRNN_NO_REEXEC": "1", "CHARRNN_ACCESS_LOG": "false", **limits, **env}
    return ServerProcess(command, cwd=repo, env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, command: list[str], env: dict[str, str] | None = None, ready_path: str = "/readyz",
                 cwd: Path = REPO):
        self.cwd = cwd
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [*command, "--port", str(self.port)]
        self.env = {**os.environ, **(env or {})}
        self.ready_path = ready_path
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        self.proc = subprocess.Popen(self.command, env=self.env, cwd=self.cwd)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.__exit__()
        raise RuntimeError("server did not become ready")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
