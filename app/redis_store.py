"""Sessions in Redis, shared by every replica: `CHARRNN_SESSION_STORE=redis://host:6379/0`.

Each session is one hash, `charrnn:session:<id>`, with its model name, the sha256 of its model file, the
next input character, counters, a version (how many times it was saved), and the recurrent state as raw
float32 bytes (8 KB for a 2 x 512 model); the key expires `CHARRNN_SESSION_TTL_S` after the last save. While a
replica generates for a session it holds `charrnn:lock:<id>` (a random token, set only if absent, with an
expiry of `CHARRNN_SESSION_LOCK_TTL_S` that the holder renews), so a session generates on one replica at a
time and a crashed replica's lock lapses by itself. Saving checks the token in the same Lua script that
writes, so a replica that lost its lock to another cannot overwrite a newer state.

Redis restarts and outages (README, "Sessions in Redis: what an outage costs"):
- commands are retried on a fresh connection (app/redis_client.py), so a Redis that is back answers at once;
- while Redis cannot be reached, looking a session up raises `SessionStoreUnavailable` (the API answers 503)
  and new generations still run;
- a generation's final save that fails is kept here, with its lock token, and written again every
  PENDING_RETRY_S until Redis takes it (or the session's TTL passes): the characters generated during an
  outage are not lost, and the lock, renewed meanwhile, is released by that save. A lock still expires by
  itself if this replica dies, and what it kept in memory is then lost;
- a Redis that lost its data (no persistence, or killed before it saved) has lost the locks as well: a save
  whose lock is gone still writes if nobody saved the session since it was read (its version is unchanged,
  or the session is gone from Redis, which is then written again), and a lock renewal takes a lost lock
  again. Sessions that were not generating are lost with Redis's data: continuing them answers 404.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass

import torch
from redis.exceptions import RedisError

from app.metrics import Metrics
from app.redis_client import connect
from app.failures import SessionGone, SessionStoreUnavailable
from app.sessions import Session
from charrnn.model import State

log = logging.getLogger("charrnn")

PREFIX = "charrnn:"
PENDING_RETRY_S = 0.25  # how often saves that failed are tried again

# KEYS: session hash, lock. ARGV: token, ttl ms, the version read, then field/value pairs.
# 1: saved under our lock. 2: our lock was gone (it expired, or Redis lost it) but nobody saved the session
# since we read it (same version, or the session is gone from Redis), so it is saved. 0: another replica
# holds the lock or saved a newer state: nothing is written.
SAVE_AND_UNLOCK = """
local holder = redis.call('GET', KEYS[2])
local result = 1
if holder ~= ARGV[1] then
  if holder then return 0 end
  local version = redis.call('HGET', KEYS[1], 'version')
  if version and tonumber(version) ~= tonumber(ARGV[3]) then return 0 end
  result = 2
end
redis.call('HSET', KEYS[1], 'version', tonumber(ARGV[3]) + 1, unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if holder then redis.call('DEL', KEYS[2]) end
return result
"""
UNLOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
# 1: renewed; 2: the lock was gone (Redis lost it) and is ours again; 0: another replica holds it now
RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 2
"""


@dataclass
class PendingSave:
    """A final save that Redis did not take: the fields to write, the lock token and the version read."""

    fields: dict[str, bytes | str]
    token: str
    version: int
    since: float  # time.monotonic() of the first failure
    reported: bool = False  # its first failure was logged


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
    """A `SessionStore` (app/sessions.py) in Redis, shared by every replica."""

    keeps_states = False  # states live in Redis between generations

    def __init__(self, url: str, ttl_s: float, lock_ttl_s: float, metrics: Metrics):
        self.redis = connect(url)
        self.ttl_ms = int(ttl_s * 1000)
        self.lock_ttl_ms = int(lock_ttl_s * 1000)
        self.metrics = metrics
        self.held: dict[str, str] = {}  # session id -> lock token, for the sessions generating here
        self.waiting: dict[str, PendingSave] = {}  # session id -> its final save, not yet taken by Redis
        self._writing: dict[str, asyncio.Lock] = {}  # session id -> the turn of its waiting save's writes
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
        session.version = int(raw.get(b"version", b"0"))

    async def get(self, session_id: str) -> Session | None:
        await self._flush(session_id)  # a save of it that waits must land first, or it reads an older state
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
        await self._flush(session.id)
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
        """A new session, locked for its first generation. Without Redis the generation still runs, and its
        final save is kept until Redis is back."""
        key, lock = self._keys(session.id)
        token = secrets.token_hex(16)
        session.busy = True
        self.held[session.id] = token  # whether or not Redis takes it now: the final save then retries
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(lock, token, px=self.lock_ttl_ms).hset(key, mapping={**self._fields(session), "version": 0})
                await pipe.pexpire(key, self.ttl_ms).execute()
        except (RedisError, OSError) as e:
            log.warning("session %s is not in Redis yet: %s", session.id, self._unavailable("add", e))

    async def save(self, session: Session) -> None:
        """Write the session and unlock it, if no other replica took it meanwhile. If Redis does not answer, the
        save is kept and tried again (`flush_pending`) until it does."""
        session.busy = False
        session.last_used = time.time()
        token = self.held.pop(session.id, None)
        try:
            if token is None:
                return
            pending = PendingSave(self._fields(session), token, session.version, time.monotonic())
            self.waiting[session.id] = pending
            await self._write(session.id, pending)
        finally:
            session.release()

    async def _write(self, session_id: str, pending: PendingSave) -> bool:
        """Try one waiting save: True once Redis has answered (saved or refused), False if it did not. Tries of
        the same session's save (the retry loop, a lookup) take turns, so a save is written once."""
        turn = self._writing.setdefault(session_id, asyncio.Lock())
        try:
            async with turn:
                if self.waiting.get(session_id) is not pending:
                    return True  # written (or given up) while this one waited its turn
                return await self._try(session_id, pending)
        finally:
            if not turn.locked() and self._writing.get(session_id) is turn:
                del self._writing[session_id]

    async def _try(self, session_id: str, pending: PendingSave) -> bool:
        key, lock = self._keys(session_id)
        args: list = [pending.token, self.ttl_ms, pending.version]
        for name, value in pending.fields.items():
            args += [name, value]
        try:
            result = await self._save(keys=[key, lock], args=args)
        except (RedisError, OSError) as e:
            self._unavailable("save", e)
            if not pending.reported:
                pending.reported = True
                log.warning("session %s: its last save waits for Redis (%s); tried again every %g s",
                            session_id, e, PENDING_RETRY_S)
            if time.monotonic() - pending.since > self.ttl_ms / 1000:
                self.waiting.pop(session_id, None)
                log.warning("session %s lost: Redis did not take its last save within the session TTL", session_id)
            return False
        self.waiting.pop(session_id, None)
        if result == 0:
            log.warning("session %s not saved: another replica took it and saved it since it was read here",
                        session_id)
        elif result == 2:
            log.info("session %s saved without its lock: the lock had expired, or Redis lost it "
                     "(restarted without its data), and no one saved the session since it was read", session_id)
        return True

    async def _flush(self, session_id: str) -> None:
        pending = self.waiting.get(session_id)
        if pending is not None and not await self._write(session_id, pending):
            raise SessionStoreUnavailable(f"session {session_id}'s last save is waiting for the session store "
                                          "(Redis), which is unreachable")

    async def flush_pending(self) -> None:
        """Write the saves that failed (called every PENDING_RETRY_S); stop at the first that fails again."""
        for session_id, pending in list(self.waiting.items()):
            if self.waiting.get(session_id) is pending and not await self._write(session_id, pending):
                return

    @property
    def pending(self) -> int:
        return len(self.waiting)

    async def delete(self, session_id: str) -> bool:
        key, _ = self._keys(session_id)
        self.waiting.pop(session_id, None)
        try:
            return bool(await self.redis.delete(key))
        except (RedisError, OSError) as e:
            raise self._unavailable("delete", e) from e

    async def renew_locks(self) -> None:
        """Extend the locks of the sessions generating here and of those whose save waits (called every third of
        the lock's expiry); a lock that Redis lost is taken again."""
        tokens = {**{sid: p.token for sid, p in self.waiting.items()}, **self.held}
        for session_id, token in tokens.items():
            _, lock = self._keys(session_id)
            try:
                if not await self._renew(keys=[lock], args=[token, self.lock_ttl_ms]):
                    log.warning("session %s: its lock expired and another replica holds it now", session_id)
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
        await self.flush_pending()
        if self.waiting:
            log.warning("%d session saves never reached Redis and are lost: %s", len(self.waiting),
                        ", ".join(self.waiting))
        await self.redis.aclose()
