"""POST /generate and GET /generate: text, one character at a time, over server-sent events (or as JSON)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel

from app.errors import APIError, error_body
from app.auth import Client
from app.routes.deps import ClientDep, ServiceDep
from app.schemas import ErrorResponse, GenerateParams, GenerateRequest, GenerateResult, StartEvent, TokenEvent
from app.service import Generation, Service
from app.sse import event_frame, event_response, token_frame

router = APIRouter(tags=["generate"])

STREAM_DOC = """\
`stream: true` (the default) answers `text/event-stream`:

- `event: start`, `data: {"session_id": ..., "model": ...}`
- one `event: token` per character, `id:` its index, `data: {"char": "<c>", "index": <i>}`; when the request
  asked for `logprobs: k`, also `"logprob": <x>, "top_logprobs": [{"char": "<c>", "logprob": <x>}, ...]` (k
  entries, most likely first): the model's own log-probabilities, before temperature, penalties and cuts
- `event: done`, `data:` the same object as the non-streamed answer (with `logprobs`, one entry per character,
  when asked)
- on a failure after the stream started (or server shutdown): `event: error`,
  `data: {"error": {"type", "message"}}`, then the stream closes.

`stream: false` (POST only; GET always streams) answers one JSON object (GenerateResult).
"""


def _event(name: str, payload: type[BaseModel], **fields: dict) -> dict:
    """One kind of event as a client's SSE parser gives it: the `event` name and `data`, a JSON `payload`."""
    data = {"type": "string", "contentMediaType": "application/json",
            "contentSchema": {"$ref": f"#/components/schemas/{payload.__name__}"}}
    return {"type": "object", "title": f"{name} event",
            "properties": {"event": {"const": name}, **fields, "data": data}, "required": ["event", *fields, "data"]}


# The schema of one event. OpenAPI 3.2 has `itemSchema` for the items of a stream; 3.1 has only `schema`, which
# tools (schemathesis among them) read as the schema of each event of a text/event-stream.
EVENT = {
    "type": "object",
    "description": "One event of the stream; the stream is `start`, a `token` per character, then `done` or `error`.",
    "oneOf": [
        _event("start", StartEvent),
        _event("token", TokenEvent, id={"type": "string", "pattern": "^[0-9]+$", "description": "The index."}),
        _event("done", GenerateResult),
        _event("error", ErrorResponse),
    ],
}

SESSION_LINKS = {
    f"{verb}Session": {"operationRef": f"#/paths/~1sessions~1{{session_id}}/{verb.lower()}",
                       "parameters": {"session_id": "$response.body#/session_id"},
                       "description": "The session of a `stream: false` answer (a stream names it in `start`)."}
    for verb in ("Get", "Delete")
}

RESPONSES = {
    200: {"description": STREAM_DOC, "content": {"text/event-stream": {"schema": EVENT}}},
    404: {"model": ErrorResponse, "description": "Unknown model or session."},
    409: {"model": ErrorResponse, "description": "Session busy, bound to another model, or its model changed."},
    422: {"model": ErrorResponse, "description": "Invalid parameters, or prime characters not in the vocabulary."},
    429: {"model": ErrorResponse, "description": "Too many generations running (Retry-After given)."},
    503: {"model": ErrorResponse, "description": "Shutting down, or the session store (Redis) is unreachable "
                                                 "(Retry-After given)."},
}
POST_RESPONSES = {
    **RESPONSES,
    200: {**RESPONSES[200], "links": SESSION_LINKS},
    500: {"model": ErrorResponse, "description": "`stream: false`: the generation failed (a stream ends with an "
                                                 "`error` event instead)."},
}


async def _events(service: Service, gen: Generation) -> AsyncIterator[bytes]:
    metrics = service.metrics
    stream = gen.stream
    ended = False
    try:
        yield event_frame("start", {"session_id": gen.session.id, "model": gen.lm.name})
        index = 0
        last = None
        observe_gap = metrics.inter_char.observe
        wait_for = 1
        logprobs = stream.logprobs  # per delivered character, when asked; else None
        while (char := await stream.next_char(wait_for)) is not None:
            now = time.perf_counter()
            if last is None:
                metrics.time_to_first_char.observe(now - gen.started)
            else:
                observe_gap(now - last)
            last = now
            frame = token_frame(char, index, logprobs[index] if logprobs is not None else None)
            index += 1
            if wait_for > 1 and stream.pending and (more := await stream.next_char()) is not None:
                # already computed: taken without waiting
                frame += token_frame(more, index, logprobs[index] if logprobs is not None else None)
                index += 1
            yield frame
            wait_for = stream.per_write
        # Release the session before `done`, so a client may continue it as soon as it reads `done`.
        await service.finalize(gen)
        if stream.finish_reason in ("length", "stop"):
            yield event_frame("done", gen.result().model_dump(exclude_none=True))
        else:
            kind = "shutting_down" if stream.finish_reason == "shutdown" else "generation_failed"
            yield event_frame("error", error_body(kind, stream.error or "generation ended early"))
        ended = True
    finally:
        if not ended:
            metrics.streams_dropped.inc()
        with anyio.CancelScope(shield=True):
            await service.finalize(gen)


async def _ended_by_client(request: Request, gen: Generation, metrics) -> None:
    """Cancel a `stream: false` generation when its client goes away: nobody will read the answer, and the
    slot is someone else's (a client that resets its connections must not keep generations running)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    if not gen.stream.finished:
        metrics.streams_dropped.inc()
        gen.stream.finish("cancelled")


async def _respond(service: Service, req: GenerateRequest, request: Request, client: Client):
    gen = await service.start(req, client)
    if req.stream:
        return event_response(_events(service, gen), service.settings.sse_ping_s, service.settings.shutdown_grace_s)
    watcher = asyncio.create_task(_ended_by_client(request, gen, service.metrics))
    try:
        while await gen.stream.next_char() is not None:
            pass
    finally:
        watcher.cancel()
        await service.finalize(gen)
    if gen.stream.finish_reason == "cancelled":  # the client has gone: nginx's "client closed request"
        return Response(status_code=499)
    if gen.stream.finish_reason not in ("length", "stop"):
        status = 503 if gen.stream.finish_reason == "shutdown" else 500
        raise APIError(status, "generation_failed", gen.stream.error or "generation ended early")
    return gen.result()


# exclude_none: `logprobs` appears only when asked
@router.post("/generate", responses=POST_RESPONSES, response_model=GenerateResult, response_model_exclude_none=True)
async def generate(body: GenerateRequest, service: ServiceDep, request: Request, client: ClientDep):
    """Generate text continuing `prime` (or a session), streamed character by character."""
    return await _respond(service, body, request, client)


# response_class=Response: no JSON answer to document (FastAPI would add one for its default JSONResponse).
@router.get("/generate", responses=RESPONSES, response_class=Response)
async def generate_get(params: Annotated[GenerateParams, Query()], service: ServiceDep, request: Request,
                       client: ClientDep):
    """The same as POST with the parameters in the query string, always streamed (for `EventSource`); all but
    `logit_bias`, an object, which only POST takes."""
    # exclude_unset: a max_chars left out stays left out (Service.start clamps the default to the limit)
    req = GenerateRequest(**params.model_dump(exclude_unset=True), stream=True)
    return await _respond(service, req, request, client)
