"""Connection guards that `charrnn serve` puts around uvicorn: a deadline for each request head, a cap on open
connections, a raised open-file limit, and a bounded log when accept() runs out of file descriptors.

uvicorn closes only idle keep-alive connections: one that sends a header line now and then (slowloris) or
nothing at all holds its socket, a file descriptor, forever. `charrnn serve` passes `protocol_class(...)` to
uvicorn as its HTTP protocol; `uvicorn app.main:app` run directly gets none of these guards.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from typing import Literal

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # uvicorn[standard] brings httptools

# Descriptors kept out of the connection cap: the loop, listening socket, stdio, model files while they load,
# Redis connections, threads' files. A served process holds about 15; the rest absorbs a burst of connections
# that the loop accepts in one go before any of them reaches the cap check.
FD_RESERVE = 64


def raise_open_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (common server practice); return the soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # some platforms refuse; the cap below still follows the soft limit
            pass
    return soft


def connection_cap(wanted: int, open_file_limit: int) -> int:
    """`wanted` connections, but never so many that they leave fewer than FD_RESERVE descriptors free."""
    if open_file_limit == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, open_file_limit - FD_RESERVE))


def _refusal(cap: int) -> bytes:
    """The whole answer to a connection past the cap: written at connect, before any request is read."""
    body = json.dumps({"error": {"type": "too_many_connections", "message":
                       f"the server holds its limit of {cap} connections (CHARRNN_MAX_CONNECTIONS, capped by "
                       "the open-file limit); retry shortly"}}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {len(body)}"
            "\r\nretry-after: 1\r\nconnection: close\r\n\r\n")
    return head.encode() + body


class _Guarded:
    """Mixin over a uvicorn HTTP protocol: the head deadline and the cap. `protocol_class` fills the settings."""

    header_timeout_s: float
    max_connections: int
    refusal: bytes

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.head_deadline: asyncio.TimerHandle | None = None
        self.refused = False
        super().connection_made(transport)
        # The cap is checked here, not with uvicorn's `limit_concurrency`: that one is checked only once a
        # request head is complete, so idle and slowloris sockets are never refused and still use up the
        # descriptors; and it also counts running tasks, so long streams would turn requests away, which
        # CHARRNN_MAX_STREAMS already answers with a 429.
        if len(self.connections) > self.max_connections:
            self.refused = True
            transport.write(self.refusal)
            transport.close()  # at once: a lingering close would hold a descriptor per refused connection
            return
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_arrived()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self.refused:  # a refused connection's request is never run
            super().data_received(data)

    def _await_head(self) -> None:
        self._head_arrived()
        self.head_deadline = self.loop.call_later(self.header_timeout_s, self._head_too_late)

    def _head_arrived(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def _head_too_late(self) -> None:
        self.head_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


class GuardedHttpTools(_Guarded, HttpToolsProtocol):
    def on_headers_complete(self) -> None:
        self._head_arrived()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)  # the next request's head is already here
        super().on_response_complete()
        if not pipelined and not self.transport.is_closing():
            self._await_head()


class GuardedH11(_Guarded, H11Protocol):
    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # h11 has parsed a request head (or failed on one)
            self._head_arrived()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # starts a pipelined request, if one is buffered
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._await_head()


def protocol_class(header_timeout_s: float, max_connections: int,
                   http: Literal["auto", "httptools", "h11"] = "auto") -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol with the guards: httptools (uvicorn's "auto" here) or h11."""
    base = GuardedH11 if http == "h11" else GuardedHttpTools
    return type(base.__name__, (base,), {"header_timeout_s": header_timeout_s, "max_connections": max_connections,
                                         "refusal": _refusal(max_connections)})


# What asyncio's selector loop logs when accept() runs out of descriptors, in Python 3.11: a traceback per failed
# accept(), and, since each failure schedules its own retry (CPython gh-151615), a traceback per left-over retry
# once the listening socket is closed at shutdown.
ACCEPT_ERRORS = ("socket.accept() out of system resource", "Exception in callback BaseSelectorEventLoop._start_serving")


class AcceptErrorLogLimit(logging.Filter):
    """At most one line per `interval_s` for each of ACCEPT_ERRORS, with a count of those left out.

    Unfiltered, 1,100 idle sockets at a 1,024-descriptor limit wrote 169,026 to 285,829 tracebacks (68 to 116 MB)
    in 25 s. uvloop, the default loop, logs nothing there (libuv closes what it cannot accept); this is for
    `--loop asyncio` and installs without uvloop. The retries still multiply while descriptors are short: CPU
    time, no longer log.
    """

    def __init__(self, interval_s: float = 1.0):
        super().__init__()
        self.interval_s = interval_s
        self.next_line_at = {prefix: 0.0 for prefix in ACCEPT_ERRORS}
        self.left_out = {prefix: 0 for prefix in ACCEPT_ERRORS}

    def filter(self, record: logging.LogRecord) -> bool:
        prefix = next((p for p in ACCEPT_ERRORS if str(record.msg).startswith(p)), None)
        if prefix is None:
            return True
        now = time.monotonic()
        if now < self.next_line_at[prefix]:
            self.left_out[prefix] += 1
            return False
        error = record.exc_info[1] if record.exc_info else None
        record.msg = f"{prefix}: {error!r} ({self.left_out[prefix]} more since the last such line)"
        record.args, record.exc_info, record.exc_text = None, None, None
        self.next_line_at[prefix], self.left_out[prefix] = now + self.interval_s, 0
        return True


def limit_accept_error_log(interval_s: float = 1.0) -> None:
    logging.getLogger("asyncio").addFilter(AcceptErrorLogLimit(interval_s))
