"""The one way the service connects to Redis (sessions, per-client limits): asyncio clients that survive a restart.

After Redis restarts, every pooled connection is dead and fails once. The asyncio client retries a command on a
fresh connection only with the asyncio `Retry` (`redis.asyncio.retry`); the synchronous one, which it accepts
as well, never fires there, so each dead connection used to fail one request. A command is retried RETRIES
times, BACKOFF_BASE_S doubling up to BACKOFF_CAP_S apart, on connection errors (making the connection is
retried the same way): after a restart every command is answered; while Redis is down, a command fails in
about 0.9 s (connection refused, measured). Timeouts are not retried: a host that does not answer (or a name
that does not resolve in time) costs one timeout per command, not one per try.
"""

from __future__ import annotations

from typing import Any

from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError

RETRIES = 2
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 0.2
SOCKET_TIMEOUT_S = 2
CONNECT_TIMEOUT_S = 1


def client_options() -> dict[str, Any]:
    """Keyword arguments for `redis.asyncio.Redis.from_url` (also given to the `limits` library's storage)."""
    return {"socket_timeout": SOCKET_TIMEOUT_S, "socket_connect_timeout": CONNECT_TIMEOUT_S,
            "retry": Retry(ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S), RETRIES,
                           supported_errors=(ConnectionError, OSError))}


def connect(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, decode_responses=False, **client_options())
