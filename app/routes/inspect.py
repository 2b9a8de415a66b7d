"""POST /inspect: what the model predicts and how one layer's units respond, character by character."""

from fastapi import APIRouter
from fastapi.responses import Response

from app.routes.deps import ServiceDep
from app.schemas import ErrorResponse, InspectRequest, InspectResult

router = APIRouter(tags=["inspect"])


@router.post("/inspect", response_model=InspectResult, responses={
    404: {"model": ErrorResponse, "description": "Unknown model."},
    422: {"model": ErrorResponse, "description": "Text too long or empty, unknown characters, no such layer."},
})
async def inspect(req: InspectRequest, service: ServiceDep) -> Response:
    """The model reads `text` from the zero state. For every character: the top-5 next-character predictions
    and the activation of every unit of `layer` (`tanh(c)` or `h`), plus units worth a look."""
    result = await service.inspect(req)
    # Serialised once by pydantic; a 2,000 x 512 activation table is too big to pass through jsonable_encoder.
    return Response(result.model_dump_json(), media_type="application/json")
