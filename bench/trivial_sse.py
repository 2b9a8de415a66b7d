"""A server with no model: streams pre-made characters through the service's SSE framing as fast as it can.

Used by bench/ceiling.py to measure what uvicorn + the event framing can emit on this machine:
    .venv/bin/python -m uvicorn trivial_sse:app --app-dir bench --port 8001
"""

from __future__ import annotations

from fastapi import FastAPI, Query

from app.sse import event_response, token_frame

app = FastAPI()
TEXT = "To be, or not to be, that is the question:\n"


@app.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@app.get("/generate")
async def generate(max_chars: int = Query(1000, ge=1, le=1_000_000)):
    async def frames():
        for i in range(max_chars):
            yield token_frame(TEXT[i % len(TEXT)], i)

    return event_response(frames())
