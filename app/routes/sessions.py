"""GET /sessions/{id} and DELETE /sessions/{id}."""

from fastapi import APIRouter, Path, Response

from app.errors import APIError
from app.routes.deps import ClientDep, ServiceDep
from app.schemas import SESSION_ID_PATTERN, ErrorResponse, SessionInfo

router = APIRouter(prefix="/sessions", tags=["sessions"])

SessionId = Path(pattern=SESSION_ID_PATTERN)
NOT_FOUND = {404: {"model": ErrorResponse, "description": "No such session: never created, deleted or expired."}}
STORE_DOWN = {503: {"model": ErrorResponse, "description": "The session store (Redis) is unreachable; "
                                                           "Retry-After given."}}


def _not_found(session_id: str) -> APIError:
    return APIError(404, "session_not_found", f"no session {session_id!r}: it never existed, was deleted, or expired")


@router.get("/{session_id}", response_model=SessionInfo, responses={**NOT_FOUND, **STORE_DOWN})
async def get_session(service: ServiceDep, client: ClientDep, session_id: str = SessionId) -> SessionInfo:
    session = await service.find_session(client, session_id)
    if session is None:
        raise _not_found(session_id)
    return SessionInfo(session_id=session.id, model=session.model, created=session.created,
                       last_used=session.last_used, generated_chars=session.generated_chars, busy=session.busy)


@router.delete("/{session_id}", status_code=204, responses={
    **NOT_FOUND, 409: {"model": ErrorResponse, "description": "The session is generating."}, **STORE_DOWN})
async def delete_session(service: ServiceDep, client: ClientDep, session_id: str = SessionId) -> Response:
    session = await service.find_session(client, session_id)
    if session is None:
        raise _not_found(session_id)
    if session.busy:
        raise APIError(409, "session_busy", f"session {session_id} is generating; delete it when it is done")
    await service.sessions.delete(session_id)
    return Response(status_code=204)
