"""Connection guards of `charrnn serve` (app/connections.py), against real servers: head deadline, keep-alive
timeout, connection cap, a low open-file limit, and the log of failed accepts."""

from __future__ import annotations

import json
import os
import resource
import selectors
import socket
import time

import httpx
import pytest

from app.connections import FD_RESERVE
from server import Server

HEAD = b"GET /healthz HTTP/1.1\r\nHost: test\r\n"


def connect(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=2)
        s.setblocking(False)
        socks.append(s)
    return socks


class Watch:
    """Reads every socket as the server writes; notes what each received and when the server closed it."""

    def __init__(self, socks: list[socket.socket]):
        self.t0 = time.monotonic()
        self.selector = selectors.DefaultSelector()
        self.received = {s: b"" for s in socks}
        self.closed_at: dict[socket.socket, float] = {}
        for s in socks:
            self.selector.register(s, selectors.EVENT_READ)

    def poll(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while self.selector.get_map() and time.monotonic() < end:
            for key, _ in self.selector.select(timeout=max(0.0, min(0.05, end - time.monotonic()))):
                try:
                    data = key.fileobj.recv(65536)
                except OSError:  # reset
                    data = b""
                self.received[key.fileobj] += data
                if not data:
                    self.closed_at[key.fileobj] = time.monotonic() - self.t0
                    self.selector.unregister(key.fileobj)

    def until_all_closed(self, seconds: float) -> None:
        self.poll(seconds)
        open_ = len(self.received) - len(self.closed_at)
        assert open_ == 0, f"{open_} of {len(self.received)} connections still open after {seconds} s"

    def refused(self) -> list[bytes]:
        return [r for r in self.received.values() if r.startswith(b"HTTP/1.1 503")]

    def close(self) -> None:
        for s in self.received:
            s.close()
        self.selector.close()


def response_of(s: socket.socket) -> bytes:
    """One whole response (Content-Length framed) read from a blocking socket."""
    s.setblocking(True)
    s.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += s.recv(4096)
    s.setblocking(False)
    return head + b"\r\n\r\n" + body


def send(socks: list[socket.socket], data: bytes, watch: Watch) -> None:
    for s in socks:
        if s not in watch.closed_at:
            try:
                s.send(data)
            except OSError:  # closed by the server since the last poll
                pass


def log_size(server: Server) -> int:
    return server.log_path.stat().st_size


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_slowloris_connections_are_closed_at_the_header_timeout_and_others_are_served(model_store, http):
    server = Server(model_store, {"CHARRNN_HEADER_TIMEOUT_S": "1"}, args=["--http", http]).start()
    try:
        socks = connect(server.port, 20)
        kept = socks[0]  # keep-alive: one whole request; the deadline starts again when its response ends
        kept.sendall(HEAD + b"\r\n")
        assert response_of(kept).startswith(b"HTTP/1.1 200")
        watch = Watch(socks)
        send(socks, HEAD, watch)
        for i in range(10):  # a header line every 0.3 s: the client is never silent, its head never ends
            watch.poll(0.3)
            send(socks, b"X-Slow: 1\r\n", watch)
            if i == 1:
                assert httpx.get(server.url + "/healthz", timeout=2).status_code == 200
        watch.until_all_closed(0.5)
        assert 0.8 < min(watch.closed_at.values()) and max(watch.closed_at.values()) < 2.0, watch.closed_at
        assert not any(watch.received.values())  # closed without an answer
        watch.close()
    finally:
        server.stop()


def test_silent_connections_and_idle_keep_alive_connections_are_closed(model_store):
    env = {"CHARRNN_HEADER_TIMEOUT_S": "1.5", "CHARRNN_KEEP_ALIVE_S": "0.3"}
    server = Server(model_store, env).start()
    try:
        kept = connect(server.port, 1)[0]
        kept.sendall(HEAD + b"\r\n")
        assert response_of(kept).startswith(b"HTTP/1.1 200")
        idle = Watch([kept])
        silent = Watch(connect(server.port, 50))  # connect, then send nothing
        idle.until_all_closed(1.2)
        assert idle.closed_at[kept] < 1.0  # CHARRNN_KEEP_ALIVE_S, not the head deadline
        silent.until_all_closed(3.0)
        assert 1.3 < min(silent.closed_at.values()) and max(silent.closed_at.values()) < 2.5
        assert httpx.get(server.url + "/healthz", timeout=2).status_code == 200
        idle.close()
        silent.close()
    finally:
        server.stop()


def test_past_the_connection_cap_a_new_connection_gets_503_then_service_resumes(model_store):
    server = Server(model_store, {"CHARRNN_MAX_CONNECTIONS": "20", "CHARRNN_HEADER_TIMEOUT_S": "2"}).start()
    try:
        time.sleep(0.2)  # the readiness probe's connection is gone
        watch = Watch(connect(server.port, 40))
        watch.poll(0.5)
        refused = watch.refused()
        # 20 held, the rest refused (one more if the readiness probe's connection was not yet gone)
        assert 20 <= len(refused) <= 21 and len(watch.closed_at) == len(refused), (len(refused), len(watch.closed_at))
        head, _, body = refused[0].partition(b"\r\n\r\n")
        assert b"\r\nretry-after: 1\r\n" in head and b"content-type: application/json" in head
        error = json.loads(body)["error"]
        assert error["type"] == "too_many_connections" and "CHARRNN_MAX_CONNECTIONS" in error["message"]
        r = httpx.get(server.url + "/healthz", timeout=2)  # an ordinary client, while the 20 are held
        assert r.status_code == 503 and r.json()["error"]["type"] == "too_many_connections"
        watch.until_all_closed(2.5)  # the held ones reach their head deadline
        assert httpx.get(server.url + "/healthz", timeout=2).status_code == 200
        watch.close()
    finally:
        server.stop()


def test_with_a_low_open_file_limit_connections_are_refused_not_dropped_and_the_log_stays_small(model_store):
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    server = Server(model_store, {"CHARRNN_HEADER_TIMEOUT_S": "1"}, preexec_fn=low_limit).start()
    try:
        before = log_size(server)
        watch = Watch(connect(server.port, 300))  # more than the server may open
        watch.until_all_closed(3.0)
        cap = 256 - FD_RESERVE  # held until their head deadline; the rest are told why, not dropped unanswered
        assert f"{cap} connections at most".encode() in server.log_path.read_bytes()
        assert len(watch.refused()) >= 300 - cap
        assert httpx.get(server.url + "/healthz", timeout=2).status_code == 200
        assert log_size(server) - before < 2_000
        watch.close()
    finally:
        server.stop()


def test_failed_accepts_log_a_line_a_second_on_the_asyncio_loop(model_store):
    # asyncio's loop logs a traceback per failed accept(), thousands a second (uvloop logs none): exhaust the
    # descriptors the way other files would, by lowering the running server's limit to what it holds now.
    server = Server(model_store, {"CHARRNN_HEADER_TIMEOUT_S": "1"}, args=["--loop", "asyncio"]).start()
    try:
        pid = server.proc.pid  # `charrnn serve` re-executes itself in place: this is the server
        limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{pid}/fd")) + 2, limits[1]))
        before = log_size(server)
        watch = Watch(connect(server.port, 30))
        watch.poll(2.5)
        text = server.log_path.read_bytes()[before:]
        assert text.count(b"Too many open files") <= 4 and len(text) < 1_000, text[:2000]
        resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
        watch.close()
        assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200
    finally:
        server.stop()
    text = server.log_path.read_bytes()[before:]  # shutdown too: each left-over accept retry fails then
    assert len(text) < 3_000, text[-2000:]
