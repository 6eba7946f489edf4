"""Golden checks: GET /v1/consistency, POST /v1/consistency/run, GET/PUT /v1/consistency/baselines."""

from __future__ import annotations

from fastapi import APIRouter, Query

from app.api.deps import ConsistencyDep, GenerationDep, SettingsDep
from app.api.json_bodies import JsonBodyRoute
from app.api.responses import ERROR_RESPONSES
from app.api.schemas import BaselineImportResult, ConsistencyReport
from app.provenance.golden import BaselineDocument

router = APIRouter(prefix="/v1/consistency", tags=["consistency"], route_class=JsonBodyRoute)


@router.get("", response_model=ConsistencyReport)
async def consistency(monitor: ConsistencyDep, generations: GenerationDep) -> ConsistencyReport:
    """Overall status and, per worker, its state, key, last check and expected vs actual hashes per case."""
    return ConsistencyReport.model_validate(monitor.report(generations.workers()))


@router.post("/run", response_model=ConsistencyReport, responses=ERROR_RESPONSES)
async def run_checks(monitor: ConsistencyDep, generations: GenerationDep, settings: SettingsDep) -> ConsistencyReport:
    """Run the golden suite on every worker now (ahead of queued jobs) and answer with the verdicts."""
    await monitor.run_checks(timeout_s=settings.job_timeout_s)
    return ConsistencyReport.model_validate(monitor.report(generations.workers()))


@router.get("/baselines", response_model=BaselineDocument)
async def export_baselines(monitor: ConsistencyDep) -> BaselineDocument:
    """Every recorded baseline (case, suite version, reproducibility key, hashes) as one JSON document."""
    return monitor.store.export()


@router.put("/baselines", response_model=BaselineImportResult, responses=ERROR_RESPONSES)
async def import_baselines(
    document: BaselineDocument,
    monitor: ConsistencyDep,
    generations: GenerationDep,
    replace: bool = Query(default=False, description="Drop every existing baseline first."),
) -> BaselineImportResult:
    """Merge (or replace) baselines, then re-check every worker against them."""
    count = monitor.store.import_(document, replace=replace)
    for worker in generations.workers():
        monitor.start_check(worker)
    return BaselineImportResult(imported=count, replaced_all=replace)
