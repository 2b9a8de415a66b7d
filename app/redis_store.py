"""Sessions in Redis, shared by every replica: `CHARRNN_SESSION_STORE=redis://host:6379/0`.

Each session is one hash, `charrnn:session:<id>`, with its model name, the sha256 of its model file, the
next input character, counters, and the recurrent state as raw float32 bytes (8 KB for the bundled model);
the key expires `CHARRNN_SESSION_TTL_S` after the last save. While a replica generates for a session it
holds `charrnn:lock:<id>` (a random token, set only if absent, with an expiry of `CHARRNN_SESSION_LOCK_TTL_S`
that the holder renews), so a session generates on one replica at a time and a crashed replica's lock
lapses by itself. Saving checks the token in the same Lua script that writes, so a replica that lost its
lock cannot overwrite a newer state.

If Redis cannot be reached, looking a session up raises `SessionStoreUnavailable` (the API answers 503),
while a new generation still runs; only its session is not kept. redis-py reconnects by itself once Redis
is back.
"""

from __future__ import annotations

import logging
import secrets
import time

import torch
from redis import asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from charrnn.model import State

from app.metrics import Metrics
from app.sessions import Session, SessionGone, SessionStoreUnavailable

log = logging.getLogger("charrnn")

PREFIX = "charrnn:"

# KEYS: session hash, lock. ARGV: token, ttl ms, then field/value pairs. Writes only while holding the lock.
SAVE_AND_UNLOCK = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[2])
return 1
"""
UNLOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"


def encode_state(state: State) -> tuple[bytes, str]:
    """The state tensors (each (layers, 1, hidden), fp32) as raw bytes, and their shape as 'n,layers,hidden'."""
    layers, _, hidden = state[0].shape
    data = b"".join(t.detach().to(torch.float32).contiguous().numpy().tobytes() for t in state)
    return data, f"{len(state)},{layers},{hidden}"


def decode_state(data: bytes, shape: str) -> State:
    n, layers, hidden = (int(x) for x in shape.split(","))
    if len(data) != n * layers * hidden * 4:
        raise ValueError(f"state has {len(data)} bytes, expected {n * layers * hidden * 4} for shape {shape}")
    flat = torch.frombuffer(bytearray(data), dtype=torch.float32)
    return tuple(flat.view(n, layers, 1, hidden).unbind(0))


class RedisSessionStore:
    keeps_states = False  # states live in Redis between generations

    def __init__(self, url: str, ttl_s: float, lock_ttl_s: float, metrics: Metrics):
        # One quick retry on a fresh connection (after a Redis restart the pooled one is dead), then give up.
        self.redis = aioredis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=1,
                                             retry=Retry(NoBackoff(), 1), decode_responses=False)
        self.ttl_ms = int(ttl_s * 1000)
        self.lock_ttl_ms = int(lock_ttl_s * 1000)
        self.metrics = metrics
        self.held: dict[str, str] = {}  # session id -> lock token, for the sessions generating here
        self._save = self.redis.register_script(SAVE_AND_UNLOCK)
        self._unlock = self.redis.register_script(UNLOCK)
        self._renew = self.redis.register_script(RENEW)

    @staticmethod
    def _keys(session_id: str) -> tuple[str, str]:
        return f"{PREFIX}session:{session_id}", f"{PREFIX}lock:{session_id}"

    def _unavailable(self, op: str, error: Exception) -> SessionStoreUnavailable:
        self.metrics.session_store_errors.labels(op=op).inc()
        return SessionStoreUnavailable(f"the session store (Redis) is unreachable: {error}")

    def _fields(self, session: Session) -> dict[str, bytes | str]:
        data, shape = encode_state(session.state)
        return {"model": session.model, "sha256": session.model_sha256, "next_input": str(session.next_input),
                "created": repr(session.created), "last_used": repr(session.last_used),
                "generated_chars": str(session.generated_chars), "owner": session.owner or "",
                "recent": session.recent,
                "shape": shape, "state": data}

    @staticmethod
    def _apply(session: Session, raw: dict[bytes, bytes]) -> None:
        session.state = decode_state(raw[b"state"], raw[b"shape"].decode())
        session.next_input = int(raw[b"next_input"])
        session.generated_chars = int(raw[b"generated_chars"])
        session.last_used = float(raw[b"last_used"])
        session.recent = raw.get(b"recent", b"")

    async def get(self, session_id: str) -> Session | None:
        key, lock = self._keys(session_id)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                raw, locked = await pipe.hgetall(key).exists(lock).execute()
        except (RedisError, OSError) as e:
            raise self._unavailable("get", e) from e
        if not raw:
            return None
        session = Session(session_id, raw[b"model"].decode(), raw[b"sha256"].decode(), None, -1, 0,
                          created=float(raw[b"created"]), owner=raw.get(b"owner", b"").decode() or None,
                          busy=bool(locked))
        self._apply(session, raw)
        return session

    async def acquire(self, session: Session) -> bool:
        """Take the session's lock; then re-read it, since another replica may have saved a newer state."""
        key, lock = self._keys(session.id)
        token = secrets.token_hex(16)
        try:
            if not await self.redis.set(lock, token, nx=True, px=self.lock_ttl_ms):
                return False
            raw = await self.redis.hgetall(key)
            if not raw:
                await self._unlock(keys=[lock], args=[token])
                raise SessionGone(session.id)
        except (RedisError, OSError) as e:
            raise self._unavailable("acquire", e) from e
        self._apply(session, raw)
        self.held[session.id] = token
        session.busy = True
        return True

    async def add(self, session: Session) -> None:
        """A new session, locked for its first generation. Without Redis the generation still runs."""
        key, lock = self._keys(session.id)
        token = secrets.token_hex(16)
        session.busy = True
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(lock, token, px=self.lock_ttl_ms).hset(key, mapping=self._fields(session))
                await pipe.pexpire(key, self.ttl_ms).execute()
            self.held[session.id] = token
        except (RedisError, OSError) as e:
            log.warning("session %s will not be kept: %s", session.id, self._unavailable("add", e))

    async def save(self, session: Session) -> None:
        """Write the session and unlock it, if this replica still holds its lock."""
        session.busy = False
        session.last_used = time.time()
        token = self.held.pop(session.id, None)
        try:
            if token is None:
                return  # never stored (Redis was down when it started)
            key, lock = self._keys(session.id)
            args = [token, self.ttl_ms]
            for name, value in self._fields(session).items():
                args += [name, value]
            if not await self._save(keys=[key, lock], args=args):
                log.warning("session %s not saved: its lock expired and was taken elsewhere", session.id)
        except (RedisError, OSError) as e:
            log.warning("session %s not saved: %s", session.id, self._unavailable("save", e))
        finally:
            session.release()

    async def delete(self, session_id: str) -> bool:
        key, _ = self._keys(session_id)
        try:
            return bool(await self.redis.delete(key))
        except (RedisError, OSError) as e:
            raise self._unavailable("delete", e) from e

    async def renew_locks(self) -> None:
        """Extend the locks of the sessions generating here (called every third of the lock's expiry)."""
        for session_id, token in list(self.held.items()):
            _, lock = self._keys(session_id)
            try:
                await self._renew(keys=[lock], args=[token, self.lock_ttl_ms])
            except (RedisError, OSError) as e:
                self._unavailable("renew", e)
                return

    async def ping(self) -> None:
        try:
            await self.redis.ping()
        except (RedisError, OSError) as e:
            raise self._unavailable("ping", e) from e

    async def expire(self) -> int:
        """Redis expires sessions itself; this only refreshes the sessions gauge (a SCAN of the keys)."""
        try:
            count = 0
            async for _ in self.redis.scan_iter(match=f"{PREFIX}session:*", count=1000):
                count += 1
        except (RedisError, OSError) as e:
            self._unavailable("scan", e)
            return 0
        self.metrics.sessions_active.set(count)
        return 0

    async def close(self) -> None:
        await self.redis.aclose()
