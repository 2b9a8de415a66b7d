"""POST /inspect: what the model predicts and how some units of one layer respond, character by character."""

from fastapi import APIRouter
from fastapi.responses import Response

from app.routes.deps import ServiceDep
from app.schemas import ErrorResponse, InspectRequest, InspectResult

router = APIRouter(tags=["inspect"])


@router.post("/inspect", response_model=InspectResult, responses={
    404: {"model": ErrorResponse, "description": "Unknown model."},
    422: {"model": ErrorResponse,
          "description": "Text too long or empty, unknown characters, no such layer or unit, too many units."},
    429: {"model": ErrorResponse, "description": "One inspection computes and CHARRNN_INSPECT_QUEUE wait; "
                                                 "retry after the Retry-After header's seconds."},
})
async def inspect(req: InspectRequest, service: ServiceDep) -> Response:
    """The model reads `text` from its start state, as a new generation would. For every character: the top-5 next-character predictions
    and the value of the units asked for in `units` (default: the suggested ones) of `layer` (`tanh(c)` or
    `h`), plus units worth a look."""
    # The JSON is made in the inspect thread (Service.inspect), not here on the event loop.
    return Response(await service.inspect(req), media_type="application/json")
