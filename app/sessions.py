"""Sessions: the recurrent state a client continues from, bound to one model file.

A session stores the state *before* its last delivered character plus that character (`next_input`):
the next step feeds `next_input`, so continuing gives exactly the text that would have followed.
Idle sessions expire after a TTL; past `max_sessions` the least recently used idle one is evicted.
"""

from __future__ import annotations

import secrets
import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

import torch

from charrnn.model import State

from app.metrics import Metrics


def new_session_id() -> str:
    return secrets.token_urlsafe(24)  # 192 random bits


class StatePool:
    """The states of one model's sessions, in preallocated chunks of slots.

    A session then costs its floats and little else: no tensor objects or allocations of its own (10,000
    separate per-session tensors cost about 6 KB each on top of the state; see docs/benchmarks.md).
    Chunks are allocated empty, so memory is only touched for slots in use.
    """

    CHUNK = 1024

    def __init__(self, template: State):
        self.shapes = [(t.shape[0], t.shape[2]) for t in template]  # (layers, hidden) per state tensor
        self.dtypes = [t.dtype for t in template]
        self.chunks: list[tuple[torch.Tensor, ...]] = []
        self.free: list[int] = []

    def alloc(self) -> int:
        if not self.free:
            base = len(self.chunks) * self.CHUNK
            self.chunks.append(tuple(torch.empty((layers, self.CHUNK, hidden), dtype=dtype)
                                     for (layers, hidden), dtype in zip(self.shapes, self.dtypes)))
            self.free = list(range(base + self.CHUNK - 1, base - 1, -1))
        return self.free.pop()

    def read(self, slot: int) -> State:
        """Views (layers, 1, hidden) of the slot; valid until the slot is written again."""
        chunk, i = divmod(slot, self.CHUNK)
        return tuple(t[:, i : i + 1] for t in self.chunks[chunk])

    def write(self, slot: int, state: State) -> None:
        chunk, i = divmod(slot, self.CHUNK)
        for dst, src in zip(self.chunks[chunk], state):
            dst[:, i : i + 1].copy_(src)

    def release(self, slot: int) -> None:
        self.free.append(slot)

    @property
    def in_use(self) -> int:
        return len(self.chunks) * self.CHUNK - len(self.free)


@dataclass(slots=True)
class Session:
    """A session's facts and state. The state lives in a slot of a `StatePool` (sessions kept in this
    process), or in `loose` tensors of its own (sessions kept in Redis: only while generating here)."""

    id: str
    model: str
    model_sha256: str  # the model file this state belongs to
    pool: StatePool | None
    slot: int
    next_input: int
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    generated_chars: int = 0
    owner: str | None = None  # fingerprint of the API key that made it (app/auth.py); None without keys
    # The last characters it read or produced (uint16 ids, ending with `next_input`): the repetition window
    # of its next generation starts from them, so a continued session is penalized as one long generation.
    recent: bytes = b""
    busy: bool = False
    released: bool = False
    loose: State | None = None
    version: int = 0  # Redis: how many times it was saved there, when this replica read it

    @classmethod
    def create(cls, id: str, model: str, model_sha256: str, pool: StatePool | None, state: State,
               next_input: int, owner: str | None = None) -> Session:
        session = cls(id, model, model_sha256, pool, pool.alloc() if pool else -1, next_input, owner=owner)
        session.state = state
        return session

    def recent_ids(self) -> list[int]:
        return array("H", self.recent).tolist()

    def remember(self, ids: list[int]) -> None:
        self.recent = array("H", ids).tobytes()

    @property
    def state(self) -> State:
        return self.loose if self.pool is None else self.pool.read(self.slot)

    @state.setter
    def state(self, value: State) -> None:
        if self.pool is None:
            self.loose = value
        else:
            self.pool.write(self.slot, value)

    def release(self) -> None:
        """Give the slot back (the session is gone)."""
        if not self.released:
            self.released = True
            if self.pool is not None:
                self.pool.release(self.slot)
            self.loose = None


class SessionStore(Protocol):
    """Where sessions live: `MemorySessionStore` (this process, the default) or `RedisSessionStore`
    (app/redis_store.py, shared by replicas). Lookups and saves may raise `SessionStoreUnavailable`."""

    keeps_states: bool  # True: states stay in this process's slot pools; False: they travel with the session

    async def get(self, session_id: str) -> Session | None:
        """The session, or None if there is none (or it expired)."""

    async def acquire(self, session: Session) -> bool:
        """Mark the session busy; False if a generation already holds it. The state is then current."""

    async def add(self, session: Session) -> None:
        """A new session, busy with its first generation."""

    async def save(self, session: Session) -> None:
        """Store the session as it is now and release it."""

    async def delete(self, session_id: str) -> bool:
        """Forget the session; False if there was none."""

    async def ping(self) -> None:
        """Raise SessionStoreUnavailable unless the store answers."""

    async def renew_locks(self) -> None:
        """Keep the locks of the sessions generating here from expiring."""

    async def flush_pending(self) -> None:
        """Write the saves that failed, as far as the store takes them."""

    @property
    def pending(self) -> int:
        """Saves that failed and wait to be written again."""

    async def expire(self) -> int:
        """Drop idle sessions past their TTL (where the store does not itself); returns how many."""

    async def close(self) -> None:
        """Let go of the store's connections."""


class MemorySessionStore:
    """Sessions in this process (the default)."""

    keeps_states = True  # sessions' states stay here, in per-model slot pools

    def __init__(self, max_sessions: int, ttl_s: float, metrics: Metrics):
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self.metrics = metrics
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._sessions)

    def _expired(self, session: Session, now: float) -> bool:
        return not session.busy and now - session.last_used > self.ttl_s

    async def get(self, session_id: str) -> Session | None:
        session = self._sessions.get(session_id)
        if session is not None and self._expired(session, time.time()):
            self._drop(session_id, "ttl")
            return None
        return session

    async def acquire(self, session: Session) -> bool:
        """Mark the session busy; False if a generation already holds it. The state is then current."""
        if session.busy:
            return False
        session.busy = True
        return True

    async def save(self, session: Session) -> None:
        """Store the session as it is now, release it, and mark it most recently used."""
        session.busy = False
        session.last_used = time.time()
        self._sessions[session.id] = session
        self._sessions.move_to_end(session.id)
        self._evict_over_capacity()
        self.metrics.sessions_active.set(len(self._sessions))

    async def add(self, session: Session) -> None:
        """A new session, busy with its first generation."""
        session.busy = True
        self._sessions[session.id] = session
        self._evict_over_capacity()
        self.metrics.sessions_active.set(len(self._sessions))

    async def delete(self, session_id: str) -> bool:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            session.release()
        self.metrics.sessions_active.set(len(self._sessions))
        return session is not None

    async def ping(self) -> None:
        """Raises SessionStoreUnavailable if the store cannot be reached (never, in memory)."""

    async def renew_locks(self) -> None:
        pass  # a session's busy flag lives with it in this process: nothing to expire

    async def flush_pending(self) -> None:
        pass  # a save here cannot fail: nothing waits to be written

    @property
    def pending(self) -> int:
        """Saves that failed and wait to be written again (Redis); none here."""
        return 0

    async def close(self) -> None:
        pass

    async def expire(self) -> int:
        """Drop every idle session past its TTL; returns how many."""
        now = time.time()
        stale = [sid for sid, s in self._sessions.items() if self._expired(s, now)]
        for sid in stale:
            self._drop(sid, "ttl")
        return len(stale)

    def _drop(self, session_id: str, why: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            session.release()
            self.metrics.sessions_evicted.labels(why=why).inc()
            self.metrics.sessions_active.set(len(self._sessions))

    def _evict_over_capacity(self) -> None:
        while len(self._sessions) > self.max_sessions:
            victim = next((sid for sid, s in self._sessions.items() if not s.busy), None)
            if victim is None:
                return  # every session is generating; the stream cap bounds this
            self._drop(victim, "lru")
