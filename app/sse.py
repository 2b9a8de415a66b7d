"""Server-sent event framing: each event encoded once, straight to bytes (sse-starlette passes bytes through).

At tens of thousands of characters per second, building an event object and JSON-encoding a dict per
character costs more than the model step; a token event here is one bytes-format of cached pieces.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from functools import lru_cache

import anyio
from sse_starlette import EventSourceResponse, ServerSentEvent

SEP = b"\r\n"


@lru_cache(maxsize=4096)
def _char_json(char: str) -> bytes:
    return json.dumps(char).encode()  # escapes newline, quotes, control characters; keeps it on one line


def token_frame(char: str, index: int, logprob: tuple[float, Sequence[tuple[str, float]]] | None = None) -> bytes:
    """`id: <i>` / `event: token` / `data: {"char": <c>, "index": <i>}`; with `logprob` (the character's and
    the top (char, logprob) pairs) the data also has `"logprob": <x>, "top_logprobs": [{"char", "logprob"}, ...]`."""
    if logprob is None:
        return b'id: %d\r\nevent: token\r\ndata: {"char": %s, "index": %d}\r\n\r\n' % (index, _char_json(char), index)
    mine, top = logprob
    alternatives = b", ".join(b'{"char": %s, "logprob": %r}' % (_char_json(c), x) for c, x in top)
    return (b'id: %d\r\nevent: token\r\ndata: {"char": %s, "index": %d, "logprob": %r, "top_logprobs": [%s]}\r\n\r\n'
            % (index, _char_json(char), index, mine, alternatives))


def event_frame(event: str, data: dict) -> bytes:
    return b"event: %s\r\ndata: %s\r\n\r\n" % (event.encode(), json.dumps(data).encode())


class _Ping(ServerSentEvent):
    """The keep-alive: one comment line, sent between two events, with no blank line after it. A blank line
    ends an event, and clients that keep the last event id (the spec says to; httpx-sse does) then hand out an
    empty event with that id after every ping, which no JSON reader takes."""

    def encode(self) -> bytes:
        return b": ping" + SEP


def event_response(frames: AsyncIterator[bytes], ping_s: float = 15.0, grace_s: float = 0.0) -> EventSourceResponse:
    return EventSourceResponse(
        frames,
        ping=ping_s,
        ping_message_factory=_Ping,
        sep="\r\n",
        headers={"X-Accel-Buffering": "no"},  # proxies: pass characters through as they come
        shutdown_event=anyio.Event(),
        shutdown_grace_period=grace_s,
    )
