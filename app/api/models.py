"""GET /v1/models and /v1/samplers."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import GenerationDep
from app.api.schemas import ModelInfo, ModelList, SamplerInfo, SamplerList
from app.pipeline.samplers import SAMPLERS

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=ModelList)
async def list_models(generations: GenerationDep) -> ModelList:
    """Every model this server may load, with defaults and limits."""
    registry = generations.registry
    return ModelList(
        default_model=generations.default_model,
        models=[
            ModelInfo(
                id=m.id,
                family=m.family,
                description=m.description,
                source_kind=m.source.kind,
                dtype=m.dtype,
                default=m.id == generations.default_model,
                defaults=m.defaults.model_dump(),
                limits=m.limits.model_dump(),
                pinned_files=len(m.sha256),
            )
            for m in registry.models
        ],
    )


@router.get("/samplers", response_model=SamplerList)
async def list_samplers() -> SamplerList:
    """Every sampler name a request may use and the diffusers scheduler behind it."""
    return SamplerList(
        samplers=[
            SamplerInfo(
                name=s.name,
                scheduler_class=s.scheduler_class,
                description=s.description,
                stochastic=s.stochastic,
                overrides=dict(s.overrides),
            )
            for s in SAMPLERS.values()
        ]
    )
