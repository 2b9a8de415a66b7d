"""Errors at the edge: every failure a client sees is JSON `{"error": {"type", "message"}}` with a 4xx/5xx.

Under /v1/ (the OpenAI-compatible routes) the same errors come in OpenAI's envelope,
`{"error": {"message", "type", "param", "code"}}`, with our type as `code`, and 400 where we say 422.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.failures import SessionStoreUnavailable

log = logging.getLogger("charrnn")


class APIError(Exception):
    """An error answered to the client: HTTP status, a short machine-readable type and a plain sentence."""

    def __init__(self, status: int, type: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type, message, headers or {}


def invalid(message: str) -> APIError:
    return APIError(422, "invalid_request", message)


def error_body(type: str, message: str) -> dict:
    return {"error": {"type": type, "message": message}}


OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def error_reply(path: str, status: int, type: str, message: str, param: str | None = None) -> tuple[int, dict]:
    """The status and body of an error on `path`: ours, or OpenAI's envelope under /v1/."""
    if not path.startswith("/v1/"):
        return status, error_body(type, message)
    status = 400 if status == 422 else status
    kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return status, {"error": {"message": message, "type": kind, "param": param, "code": type}}


async def send_error(scope, send, status: int, type: str, message: str, headers: dict[str, str] | None = None) -> None:
    """Answer an error straight from ASGI middleware (before any route), in the same JSON shape."""
    status, payload = error_reply(scope.get("path", ""), status, type, message)
    body = json.dumps(payload).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _describe(errors: list[dict]) -> str:
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query"))
        parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else e.get("msg", "invalid"))
    return "; ".join(parts) + (f" (and {len(errors) - 5} more)" if len(errors) > 5 else "")


METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> str:
    """Every method some route of this path answers. Starlette's 405 names only the first route that matched
    the path, and /generate (GET, POST) and /sessions/{id} (GET, DELETE) have one route per method."""
    routes = request.app.router.routes
    return ", ".join(m for m in METHODS
                     if any(r.matches({**request.scope, "method": m})[0] is Match.FULL for r in routes))


def reply(request: Request, status: int, type: str, message: str, headers: dict[str, str] | None = None,
          param: str | None = None) -> JSONResponse:
    status, body = error_reply(request.url.path, status, type, message, param)
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None and exc.status in (409, 429, 503):
            metrics.rejected.labels(reason=exc.type).inc()
        return reply(request, exc.status, exc.type, exc.message, exc.headers, getattr(exc, "param", None))

    @app.exception_handler(SessionStoreUnavailable)
    async def store_unavailable(request: Request, exc: SessionStoreUnavailable) -> JSONResponse:
        return await api_error(request, APIError(
            503, "session_store_unavailable",
            f"{exc}; sessions cannot be continued or looked up until it is back "
            "(new generations without session_id still work)", headers={"Retry-After": "5"}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        fields = [str(p) for p in (errors[0].get("loc", ()) if errors else ()) if p not in ("body", "query", "path")]
        return reply(request, 422, "invalid_request", _describe(errors), param=".".join(fields) or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # 400: FastAPI could not read the body as JSON text at all (not UTF-8, nested too deep).
        kind = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405 and (allow := allowed_methods(request)):
            headers = {**(headers or {}), "Allow": allow}
        return reply(request, exc.status_code, kind, str(exc.detail), headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return reply(request, 500, "internal_error", "the server failed to handle this request")
