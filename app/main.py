"""The FastAPI app: `uvicorn app.main:app` (or `charrnn serve`) serves every model in the model store."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Security
from fastapi.middleware.cors import CORSMiddleware
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles

from app.auth import Guard, KeyRing, load_keys
from app.errors import install_error_handlers
from app.logs import configure_logging
from app.middleware import AccessLog, BodyLimit, RequestMetrics
from app.openapi import install_openapi
from app.schemas import ErrorResponse
from app.routes import admin, generate, health, inspect, models, openai, page, sessions
from app.service import Service
from app.settings import Settings

log = logging.getLogger("charrnn")

SHUTDOWN_TRACE_AFTER_S = 5.0  # past the grace period: dump every thread's stack if the process has not exited
STORE_CLOSE_TIMEOUT_S = 3.0  # closing Redis at the end of a stop (its last saves included) takes at most this


class _LoopExecutor(ThreadPoolExecutor):
    """The event loop's default executor, which does not wait for its threads when the loop closes.

    asyncio runs DNS lookups there (the Redis host's name, at every new connection). At the end of
    `asyncio.run` the loop waits for those threads, and a lookup stuck in the resolver's timeouts held a stop
    past its grace period: in the container check a replica was killed 15 s after its app had shut down, its
    main thread in `asyncio.runners.close`, with lookups of `redis` failing. Nothing such a thread does is
    needed once the app has shut down; `charrnn serve` then leaves without waiting for them (cli/main.py)."""

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=False, cancel_futures=True)


async def _expire_sessions(service: Service) -> None:
    interval = min(60.0, max(0.5, service.settings.session_ttl_s / 4))
    while True:
        await asyncio.sleep(interval)
        await service.sessions.expire()


async def _renew_session_locks(service: Service) -> None:
    while True:
        await asyncio.sleep(service.settings.session_lock_ttl_s / 3)
        await service.sessions.renew_locks()
        await service.quotas.renew()


async def _retry_session_saves(service: Service) -> None:
    """Saves the session store did not take (Redis was unreachable) are written as soon as it is back."""
    from app.redis_store import PENDING_RETRY_S

    while True:
        await asyncio.sleep(PENDING_RETRY_S)
        if service.sessions.pending:
            await service.sessions.flush_pending()


async def _poll_model_store(service: Service) -> None:
    """Pick up new, changed and removed checkpoints without a restart (CHARRNN_RELOAD_INTERVAL_S)."""
    while True:
        await asyncio.sleep(service.settings.reload_interval_s)
        try:
            result = await service.reload()
        except Exception:  # keep polling: a later scan may succeed
            log.exception("model store scan failed")
            continue
        if result.added or result.changed or result.removed:
            log.info("model store changed: added %s, changed %s, removed %s",
                     result.added, result.changed, result.removed)


async def _watch_for_shutdown(service: Service) -> None:
    """uvicorn's SIGTERM handler (as patched by sse-starlette) sets AppStatus.should_exit; end streams then."""
    from sse_starlette.sse import AppStatus

    while not AppStatus.should_exit:
        await asyncio.sleep(0.1)
    log.info("shutting down: ending %d open streams", service.running)
    # If the process is still here well after its grace period, say where every thread is (on stderr, so
    # `docker logs` shows what a stop waited for before the container runtime killed it).
    faulthandler.dump_traceback_later(service.settings.shutdown_grace_s + SHUTDOWN_TRACE_AFTER_S, exit=False)
    service.begin_shutdown()


def _refusals(keys: bool, admin: bool) -> dict:
    """The refusals of app.auth.Guard a route can answer, for the OpenAPI document."""
    refusals = {429: {"model": ErrorResponse, "description": "Past a per-client limit (Retry-After given)."}}
    if keys:
        refusals[401] = {"model": ErrorResponse, "description": "No API key, or not a valid one."}
    if admin:
        refusals[403] = {"model": ErrorResponse, "description": "Not an admin key, or (without admin keys) "
                                                               "not from loopback."}
    return refusals


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings.access_log)
    api_keys = KeyRing(load_keys(settings.api_keys, settings.api_keys_file, "CHARRNN_API_KEYS"))
    admin_keys = KeyRing(load_keys(settings.admin_keys, settings.admin_keys_file, "CHARRNN_ADMIN_KEYS"))
    cors_origins = frozenset(o.strip() for o in settings.cors_origins.split(",") if o.strip())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        torch.set_num_threads(settings.decode_threads())
        asyncio.get_running_loop().set_default_executor(_LoopExecutor(thread_name_prefix="loop"))
        service: Service = app.state.service
        result = await service.reload()
        for name, why in result.errors.items():
            log.warning("model store: skipped %s: %s", name, why)
        log.info("loaded models: %s", ", ".join(sorted(service.registry.models)) or "none")
        tasks = [asyncio.create_task(job(service)) for job in (_expire_sessions, _watch_for_shutdown,
                                                                _renew_session_locks, _retry_session_saves)]
        if settings.reload_interval_s > 0:
            tasks.append(asyncio.create_task(_poll_model_store(service)))
        try:
            yield
        finally:
            service.begin_shutdown()
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            service.executor.shutdown(wait=False, cancel_futures=True)
            service.inspector.shutdown(wait=False, cancel_futures=True)
            for closing in (service.sessions.close(), service.quotas.close()):  # each bounded: a stop must end
                try:
                    await asyncio.wait_for(closing, STORE_CLOSE_TIMEOUT_S)
                except Exception:  # TimeoutError included
                    log.exception("closing the session or limits store failed")
            log.info("application shut down")

    app = FastAPI(
        title="char-rnn service",
        version="0.1.0",
        description="Character-level RNN language models, streamed one character at a time over server-sent events.",
        lifespan=lifespan,
    )
    app.state.service = Service(settings)
    app.state.metrics = app.state.service.metrics
    install_error_handlers(app)
    # Declares the key scheme in the OpenAPI document; app.auth.Guard does the checking, before any route.
    keys = bool(api_keys or admin_keys)
    bearer = [Security(HTTPBearer(auto_error=False))] if api_keys else []
    for router in (generate.router, inspect.router, models.router, sessions.router, openai.router,
                   health.metrics_router):
        app.include_router(router, dependencies=bearer, responses=_refusals(keys, False))
    app.include_router(health.router)  # /healthz and /readyz: open to anyone
    app.include_router(admin.router, dependencies=[Security(HTTPBearer(auto_error=False))] if keys else [],
                       responses=_refusals(keys, True))
    app.include_router(page.router)
    app.mount("/static", StaticFiles(directory=page.STATIC), name="static")
    install_openapi(app, settings)  # /openapi.json with this server's limits and every answer it gives
    # Outermost last: ids and the access log, metrics, CORS preflights, then keys and limits, then body size.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(Guard, api_keys=api_keys, admin_keys=admin_keys, cors_origins=cors_origins,
                       quotas=app.state.service.quotas)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=sorted(cors_origins), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id", "Last-Event-ID"],
                           expose_headers=["X-Request-Id", "Retry-After"])
    app.add_middleware(RequestMetrics, metrics=app.state.service.metrics)
    app.add_middleware(AccessLog)
    return app


app = create_app()
