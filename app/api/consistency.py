"""Golden checks: GET /v1/consistency, POST /v1/consistency/run, GET/PUT /v1/consistency/baselines."""

from __future__ import annotations

from fastapi import APIRouter, Query

from app.api.deps import DispatcherDep, SettingsDep
from app.api.responses import ERROR_RESPONSES
from app.api.schemas import BaselineImportResult, ConsistencyReport
from app.errors import NotReady
from app.provenance.golden import BaselineDocument

router = APIRouter(prefix="/v1/consistency", tags=["consistency"])


def _monitor(dispatcher: DispatcherDep):  # noqa: ANN202 - the dispatcher's ConsistencyMonitor
    if dispatcher.consistency is None:
        raise NotReady("golden checks are not configured on this server")
    return dispatcher.consistency


@router.get("", response_model=ConsistencyReport)
async def consistency(dispatcher: DispatcherDep) -> ConsistencyReport:
    """Overall status and, per worker, its state, key, last check and expected vs actual hashes per case."""
    return ConsistencyReport.model_validate(_monitor(dispatcher).report(dispatcher.workers()))


@router.post("/run", response_model=ConsistencyReport, responses=ERROR_RESPONSES)
async def run_checks(dispatcher: DispatcherDep, settings: SettingsDep) -> ConsistencyReport:
    """Run the golden suite on every worker now (ahead of queued jobs) and answer with the verdicts."""
    monitor = _monitor(dispatcher)
    await dispatcher.run_checks(timeout_s=settings.job_timeout_s)
    return ConsistencyReport.model_validate(monitor.report(dispatcher.workers()))


@router.get("/baselines", response_model=BaselineDocument)
async def export_baselines(dispatcher: DispatcherDep) -> BaselineDocument:
    """Every recorded baseline (case, suite version, reproducibility key, hashes) as one JSON document."""
    return _monitor(dispatcher).store.export()


@router.put("/baselines", response_model=BaselineImportResult, responses=ERROR_RESPONSES)
async def import_baselines(
    document: BaselineDocument,
    dispatcher: DispatcherDep,
    replace: bool = Query(default=False, description="Drop every existing baseline first."),
) -> BaselineImportResult:
    """Merge (or replace) baselines, then re-check every worker against them."""
    count = _monitor(dispatcher).store.import_(document, replace=replace)
    for worker in dispatcher.workers():
        dispatcher.start_check(worker)
    return BaselineImportResult(imported=count, replaced_all=replace)
