"""GET /healthz and /readyz."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

import app
from app.api.deps import GenerationDep
from app.api.schemas import HealthResponse, ReadyResponse, StorageStatus, WorkerStatus

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse)
async def healthz() -> HealthResponse:
    """200 while the server process is alive."""
    return HealthResponse(status="ok", version=app.__version__)


@router.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
async def readyz(generations: GenerationDep, request: Request) -> JSONResponse:
    """200 when a worker takes user work and storage can be written, else 503; lists every worker either way."""
    monitor = getattr(request.app.state, "consistency", None)
    dispatcher = generations.dispatcher
    archive = getattr(request.app.state, "archive", None)
    storage_error = await archive.health.check() if archive is not None else None
    body = ReadyResponse(
        ready=dispatcher.ready() and storage_error is None,
        draining=dispatcher.draining,
        queue_depth=dispatcher.waiting_jobs(),
        storage=StorageStatus(
            ok=storage_error is None,
            error=storage_error,
            ledger=archive.ledger.backend if archive is not None else "sqlite",
        ),
        checking=monitor.checking() if monitor else [],
        workers=[
            WorkerStatus(**w.describe(), consistency=monitor.worker(w.id).state if monitor else None)
            for w in dispatcher.workers()
        ],
        warnings=getattr(request.app.state, "warnings", []),
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if body.ready else 503)


# Load balancers and orchestrators often probe with HEAD: same answers, outside the OpenAPI spec.
router.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)
router.add_api_route("/readyz", readyz, methods=["HEAD"], include_in_schema=False)
