"""Per-client limits: requests per window, new sessions per window, generations running at once.

A client is its API key, or its address on a server without keys (`app/auth.py`). The windows are counted
by the `limits` library (sliding window counters); the running generations by a counter here. Both live in
this process, or in Redis when the session store is Redis, so that replicas share them. If Redis cannot be
reached the limits let requests through (logged, and counted in `charrnn_session_store_errors{op="limits"}`):
a Redis outage already degrades sessions and should not also refuse every request.
"""

from __future__ import annotations

import logging
import math
import secrets
import time

from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from redis import asyncio as aioredis
from redis.exceptions import RedisError

from app.auth import Client
from app.metrics import Metrics
from app.redis_client import client_options, connect
from app.settings import Settings

log = logging.getLogger("charrnn")

PREFIX = "charrnn:streams:"

# KEYS: the client's set of running generations (token -> expiry, ms). ARGV: token, ttl ms, limit.
# Expired entries (their replica crashed) are dropped first, so a crash frees its slots by itself.
ACQUIRE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
# The same entry pushed further; added again if Redis lost it (restarted without its data), so the generations
# running here count again.
RENEW = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""


class Quotas:
    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.request_limit: RateLimitItem | None = parse(settings.client_rate) if settings.client_rate else None
        self.session_limit: RateLimitItem | None = (parse(settings.client_sessions) if settings.client_sessions
                                                    else None)
        self.max_streams = settings.client_max_streams
        self.redis: aioredis.Redis | None = None
        if settings.session_store == "memory":
            storage = MemoryStorage()
        else:
            storage = RedisStorage("async+" + settings.session_store, implementation="redispy",
                                   key_prefix="charrnn:limits", **client_options())
            self.redis = connect(settings.session_store)
            self._acquire = self.redis.register_script(ACQUIRE)
            self._renew = self.redis.register_script(RENEW)
        self.limiter = SlidingWindowCounterRateLimiter(storage)
        self.streams: dict[str, int] = {}  # client id -> generations running here (memory)
        self.held: dict[str, str] = {}  # token -> client id, for the generations running here (Redis)
        self._last_warning = 0.0

    def _unavailable(self, error: Exception) -> None:
        self.metrics.session_store_errors.labels(op="limits").inc()
        if time.monotonic() - self._last_warning > 10:  # one line per 10 s, however many requests fail
            self._last_warning = time.monotonic()
            log.warning("per-client limits not enforced: the limits store (Redis) is unreachable: %s", error)

    async def _hit(self, limit: RateLimitItem | None, kind: str, client: Client) -> int | None:
        """Count one against the client's window: None if allowed, else the seconds until it would be."""
        if limit is None:
            return None
        try:
            if await self.limiter.hit(limit, kind, client.id):
                return None
            stats = await self.limiter.get_window_stats(limit, kind, client.id)
        except Exception as e:  # the storage's errors are those of its client library
            self._unavailable(e)
            return None
        return max(1, math.ceil(stats.reset_time - time.time()))

    async def hit_request(self, client: Client) -> int | None:
        return await self._hit(self.request_limit, "requests", client)

    async def hit_session(self, client: Client) -> int | None:
        return await self._hit(self.session_limit, "sessions", client)

    async def start_stream(self, client: Client) -> str | None:
        """Take one of the client's generation slots: a token for `end_stream`, or None past the limit."""
        token = secrets.token_hex(8)
        if not self.max_streams:
            return token
        if self.redis is None:
            if self.streams.get(client.id, 0) >= self.max_streams:
                return None
            self.streams[client.id] = self.streams.get(client.id, 0) + 1
            self.held[token] = client.id
            return token
        ttl_ms = int(self.settings.session_lock_ttl_s * 1000)
        try:
            if not await self._acquire(keys=[PREFIX + client.id], args=[token, ttl_ms, self.max_streams]):
                return None
        except (RedisError, OSError) as e:
            self._unavailable(e)
            return token
        self.held[token] = client.id
        return token

    async def end_stream(self, token: str) -> None:
        client_id = self.held.pop(token, None)
        if client_id is None:
            return
        if self.redis is None:
            left = self.streams[client_id] - 1
            if left:
                self.streams[client_id] = left
            else:
                del self.streams[client_id]
            return
        try:
            await self.redis.zrem(PREFIX + client_id, token)
        except (RedisError, OSError) as e:
            self._unavailable(e)  # the entry expires by itself

    async def renew(self) -> None:
        """Keep this replica's running generations counted in Redis (called with the session lock renewal)."""
        if self.redis is None:
            return
        ttl_ms = int(self.settings.session_lock_ttl_s * 1000)
        for token, client_id in list(self.held.items()):
            try:
                await self._renew(keys=[PREFIX + client_id], args=[token, ttl_ms])
                if token not in self.held:  # it ended meanwhile: take back what the renewal may have added
                    await self.redis.zrem(PREFIX + client_id, token)
            except (RedisError, OSError) as e:
                self._unavailable(e)
                return

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
