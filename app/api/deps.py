"""Request-scoped dependencies as Annotated aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.scheduler.dispatcher import Dispatcher
from app.settings import Settings
from app.store.archive import Archive


def get_dispatcher(request: Request) -> Dispatcher:
    """The app's dispatcher, created in the lifespan."""
    return request.app.state.dispatcher


def get_archive(request: Request) -> Archive:
    """The app's archive (ledger, image store, signing keys), opened in the lifespan."""
    return request.app.state.archive


def get_settings(request: Request) -> Settings:
    """The app's settings."""
    return request.app.state.settings


DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
ArchiveDep = Annotated[Archive, Depends(get_archive)]
