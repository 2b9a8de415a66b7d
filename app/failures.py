"""What can go wrong in a generation, said without HTTP.

The parts below the routes raise these; `app/errors.py` (the HTTP edge) turns them into status codes and error
bodies. Nothing here imports a web framework or torch, so any module may raise them.
"""

from __future__ import annotations


class SessionStoreUnavailable(Exception):
    """The shared session store (Redis) cannot be reached."""


class SessionGone(Exception):
    """The session was deleted or expired between looking it up and locking it."""
