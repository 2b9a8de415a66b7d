"""GET /models and GET /models/{name}: what is loaded, with its vocabulary and training facts."""

from fastapi import APIRouter, Path

from app.errors import APIError
from app.registry import LoadedModel
from app.routes.deps import ServiceDep
from app.schemas import MAX_MODEL_NAME, MODEL_NAME_PATTERN, ErrorResponse, ModelInfo, ModelList

router = APIRouter(prefix="/models", tags=["models"])


def describe(lm: LoadedModel) -> ModelInfo:
    cfg, training = lm.config, lm.info.training
    return ModelInfo(
        name=lm.name, cell=cfg.cell, layers=cfg.layers, hidden=cfg.hidden, embed=cfg.embed,
        parameters=lm.parameters, vocab_size=len(lm.vocab), vocabulary=lm.vocab.chars,
        val_loss=training.get("best_val_loss"), val_bpc=training.get("best_val_bpc"),
        trained_on=training.get("data_file"), trained_steps=training.get("steps"), created=training.get("created"),
        sha256=lm.sha256, start=lm.info.start.get("kind", "zero"),
    )


@router.get("", response_model=ModelList)
async def list_models(service: ServiceDep) -> ModelList:
    models = [describe(lm) for _, lm in sorted(service.registry.models.items())]
    return ModelList(models=models, default=service.default_model_name())


@router.get("/{name}", response_model=ModelInfo, responses={404: {"model": ErrorResponse}})
async def get_model(service: ServiceDep,
                    name: str = Path(pattern=MODEL_NAME_PATTERN, max_length=MAX_MODEL_NAME)) -> ModelInfo:
    lm = service.registry.get(name)
    if lm is None:
        raise APIError(404, "model_not_found", f"no model named {name!r}; GET /models lists them")
    return describe(lm)
