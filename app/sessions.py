"""Sessions: the recurrent state a client continues from, bound to one model file.

A session stores the state *before* its last delivered character plus that character (`next_input`):
the next step feeds `next_input`, so continuing gives exactly the text that would have followed.
Idle sessions expire after a TTL; past `max_sessions` the least recently used idle one is evicted.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from charrnn.model import State

from app.metrics import Metrics


def new_session_id() -> str:
    return secrets.token_urlsafe(24)  # 192 random bits


@dataclass
class Session:
    id: str
    model: str
    model_sha256: str  # the model file this state belongs to
    state: State
    next_input: int
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    generated_chars: int = 0
    busy: bool = False


class MemorySessionStore:
    """Sessions in this process (the default). Async methods, so a shared backend can take its place."""

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
        """Mark the session busy; False if a generation already holds it."""
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
        found = self._sessions.pop(session_id, None) is not None
        self.metrics.sessions_active.set(len(self._sessions))
        return found

    async def expire(self) -> int:
        """Drop every idle session past its TTL; returns how many."""
        now = time.time()
        stale = [sid for sid, s in self._sessions.items() if self._expired(s, now)]
        for sid in stale:
            self._drop(sid, "ttl")
        return len(stale)

    def _drop(self, session_id: str, why: str) -> None:
        if self._sessions.pop(session_id, None) is not None:
            self.metrics.sessions_evicted.labels(why=why).inc()
            self.metrics.sessions_active.set(len(self._sessions))

    def _evict_over_capacity(self) -> None:
        while len(self._sessions) > self.max_sessions:
            victim = next((sid for sid, s in self._sessions.items() if not s.busy), None)
            if victim is None:
                return  # every session is generating; the stream cap bounds this
            self._drop(victim, "lru")
