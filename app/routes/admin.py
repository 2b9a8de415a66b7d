"""POST /admin/reload: rescan the model store for new, changed and removed checkpoints."""

from fastapi import APIRouter

from app.routes.deps import ServiceDep
from app.schemas import ReloadReport

router = APIRouter(prefix="/admin", tags=["admin"])


@router.post("/reload", response_model=ReloadReport)
async def reload(service: ServiceDep) -> ReloadReport:
    """Load new files, replace changed ones, drop removed ones. Sessions of a replaced or removed model
    answer 409 `model_changed` when continued; streams already running finish on the old weights."""
    result = await service.reload()
    return ReloadReport(added=result.added, changed=result.changed, removed=result.removed,
                        unchanged=result.unchanged, errors=result.errors)
