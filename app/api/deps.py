"""Request-scoped dependencies as Annotated aliases: the services routes call, created in the lifespan."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.errors import NotReady
from app.services.consistency import ConsistencyMonitor
from app.services.generation import GenerationService
from app.services.jobs import ADMIN, JobService
from app.settings import Settings
from app.store.archive import Archive


def get_generations(request: Request) -> GenerationService:
    """The app's generation service."""
    return request.app.state.generations


def get_consistency(request: Request) -> ConsistencyMonitor:
    """The app's golden-check monitor; 503 when golden checks are not configured."""
    monitor = getattr(request.app.state, "consistency", None)
    if monitor is None:
        raise NotReady("golden checks are not configured on this server")
    return monitor


def get_archive(request: Request) -> Archive:
    """The app's archive (ledger, image store, signing keys), opened in the lifespan."""
    return request.app.state.archive


def get_jobs(request: Request) -> JobService:
    """The app's job service (asynchronous jobs, event streams, cancellation)."""
    return request.app.state.jobs


def get_owner(request: Request) -> str | None:
    """Who made the request: the sha256 (hex) of its API key when keys are on (ADMIN for an admin key), else None."""
    if getattr(request.state, "api_key_admin", False):
        return ADMIN
    return getattr(request.state, "api_key_owner", None)


def get_settings(request: Request) -> Settings:
    """The app's settings."""
    return request.app.state.settings


GenerationDep = Annotated[GenerationService, Depends(get_generations)]
ConsistencyDep = Annotated[ConsistencyMonitor, Depends(get_consistency)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
ArchiveDep = Annotated[Archive, Depends(get_archive)]
JobsDep = Annotated[JobService, Depends(get_jobs)]
OwnerDep = Annotated[str | None, Depends(get_owner)]
