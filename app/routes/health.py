"""GET /healthz (alive), GET /readyz (models loaded and warm; session store reachable), GET /metrics."""

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.routes.deps import ServiceDep
from app.schemas import Health
from app.failures import SessionStoreUnavailable

router = APIRouter(tags=["health"])
metrics_router = APIRouter(tags=["health"])  # apart: with API keys it needs one, health and readiness do not


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
async def readyz(service: ServiceDep):
    if service.draining:
        return JSONResponse(Health(status="unavailable", detail="shutting down").model_dump(), status_code=503)
    if not service.ready:
        detail = f"no model loaded from {service.settings.model_store} yet"
        return JSONResponse(Health(status="unavailable", models=0, detail=detail).model_dump(), status_code=503)
    # Degraded (still 200: new generations work without the store, and every replica shares it, so taking this
    # one out of a load balancer would not help) until a command really succeeds and no save waits for it.
    try:
        await service.sessions.ping()
    except SessionStoreUnavailable as e:
        return Health(status="degraded", models=len(service.registry.models),
                      detail=f"{e}; continuing sessions answers 503 until it is back")
    await service.sessions.flush_pending()  # the saves that wait are tried now, not at the next retry tick
    if service.sessions.pending:
        return Health(status="degraded", models=len(service.registry.models),
                      detail=f"{service.sessions.pending} session saves wait for the session store (Redis)")
    return Health(status="ready", models=len(service.registry.models))


@metrics_router.get("/metrics", response_class=Response, responses={200: {
    "description": "Prometheus text format.", "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(service: ServiceDep) -> Response:
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
