"""The app factory: create_app(settings) wires routers, error handlers and the worker pool."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import app
from app.api import a1111, consistency, generations, health, metrics, models, openai_images, provenance, reproduce
from app.api.auth import install_api_keys
from app.api.docs import install_offline_docs
from app.api.introspection import accepted_fields, allowed_methods, unknown_field_message
from app.api.limits import BodyLimitMiddleware
from app.api.openapi import install_openapi, operation_id
from app.errors import (
    ERROR_CLASSES,
    InvalidRequest,
    MalformedRequest,
    SameseedError,
    StorageUnavailable,
    for_http_status,
)
from app.provenance.golden import load_suite
from app.scheduler.dispatcher import Dispatcher
from app.services.consistency import ConsistencyMonitor
from app.services.generation import GenerationService
from app.services.jobs import JobService
from app.settings import Settings
from app.store.archive import Archive
from app.store.baselines import baseline_store
from app.store.ledger import LedgerError
from app.telemetry.http import RequestTiming
from app.telemetry.metrics import Metrics
from app.worker.messages import WorkerConfig
from app.worker.plan import Startup, prepare
from app.worker.pool import WorkerPool

log = logging.getLogger("app.main")

PoolFactory = Callable[[list[WorkerConfig]], WorkerPool]


def create_app(
    settings: Settings, pool_factory: PoolFactory | None = None, *, startup: Startup | None = None
) -> FastAPI:
    """Build the FastAPI app; the registry is validated now, workers start in the lifespan."""
    startup = startup or prepare(settings)
    if pool_factory is None:
        def pool_factory(configs: list[WorkerConfig]) -> WorkerPool:
            return WorkerPool(configs, start_timeout_s=settings.worker_start_timeout_s)

    suite = load_suite(settings.golden_suite)
    archive = Archive(settings)  # an unreadable SAMESEED_SIGNING_KEY_FILE fails here too

    @asynccontextmanager
    async def lifespan(fastapi_app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        await archive.start()
        fastapi_app.state.archive = archive
        metrics_ = fastapi_app.state.metrics
        metrics_.zero_counters(
            workers=[c.worker_id for c in startup.configs],
            models=[m.id for m in startup.registry.models],
            outcomes=["ok", *ERROR_CLASSES],
        )
        dispatcher = Dispatcher(
            pool=pool_factory(startup.configs),
            max_queue=settings.max_queue,
            job_timeout_s=settings.job_timeout_s,
            metrics=metrics_,
            max_batch=settings.max_batch,
            batch_wait_s=settings.batch_wait_ms / 1000,
        )
        monitor = ConsistencyMonitor(
            suite=suite,
            store=baseline_store(settings, archive),
            registry=startup.registry,
            metrics=metrics_,
            interval_s=settings.consistency_interval_s,
            quarantine_on_drift=settings.quarantine_on_drift,
            require_consistency=settings.ready_requires_consistency,
        )
        monitor.attach(dispatcher)
        fastapi_app.state.dispatcher = dispatcher  # the serve wiring drains it on SIGTERM
        fastapi_app.state.consistency = monitor
        fastapi_app.state.generations = GenerationService(
            registry=startup.registry,
            default_model=startup.default_model,
            dispatcher=dispatcher,
            archive=archive,
            metrics=metrics_,
        )
        jobs = JobService(
            generations=fastapi_app.state.generations, ledger=archive.ledger, present=generations.present_result,
            node=settings.node_name(),
        )
        fastapi_app.state.jobs = jobs
        await jobs.start()  # jobs a previous process left unfinished are reported failed before any new one
        dispatcher.start()
        monitor.start_periodic()
        try:
            yield
        finally:
            try:
                monitor.stop()
                await dispatcher.close()
                await jobs.stop()
            finally:
                await archive.stop()

    fastapi_app = FastAPI(
        title="Sameseed",
        version=app.__version__,
        description="Deterministic Stable Diffusion generation with provenance manifests.",
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
    )
    install_openapi(fastapi_app)
    fastapi_app.state.settings = settings
    fastapi_app.state.metrics = Metrics()
    fastapi_app.state.metrics.describe_build(app.__version__)
    routers = (generations, health, models, metrics, provenance, consistency, reproduce, openai_images, a1111)
    for router in (module.router for module in routers):
        fastapi_app.include_router(router)
    install_offline_docs(fastapi_app)
    install_error_handlers(fastapi_app)
    fastapi_app.add_middleware(BodyLimitMiddleware)
    install_api_keys(fastapi_app, settings)
    fastapi_app.add_middleware(RequestTiming, histogram=fastapi_app.state.metrics.http_duration)  # outermost
    return fastapi_app


def _param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or None


def _validation_message(error: dict[str, Any], accepted: Sequence[str] = ()) -> str:
    param = _param(tuple(error.get("loc", ())))
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return unknown_field_message(str(param), accepted)
    if kind == "missing":
        return f"{param} is required" if param else "a JSON object body is required"
    if param is None:
        return f"request body: {error.get('msg')}"
    given = error.get("input")
    shown = repr(given) if not isinstance(given, (dict, list)) else type(given).__name__
    return f"{param}: {error.get('msg')} (got {shown[:80]})"


def install_error_handlers(fastapi_app: FastAPI) -> None:
    """Route every error through the one error body."""

    @fastapi_app.exception_handler(SameseedError)
    async def _domain(request: Request, exc: SameseedError) -> JSONResponse:
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:  # 429s and storage failures feed the alert rules
            metrics.errors.labels(type=exc.type).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

    @fastapi_app.exception_handler(LedgerError)
    async def _ledger(request: Request, exc: LedgerError) -> JSONResponse:
        # a read whose database connection is lost (writes already answer storage_unavailable): a 503, not a bug
        return await _domain(request, StorageUnavailable(f"the ledger cannot be used now ({exc})"))

    @fastapi_app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            detail = errors[0].get("ctx", {}).get("error", "invalid JSON")
            return JSONResponse(
                MalformedRequest(f"the body is not valid JSON: {detail}").body(), status_code=400
            )
        first = errors[0] if errors else {}
        where = first.get("loc", ("body",))[0] if first.get("loc") else "body"
        accepted = accepted_fields(request.scope.get("route"), where)
        message = _validation_message(first, accepted)
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more: " + "; ".join(
                _validation_message(e, accepted) for e in errors[1:4]
            ) + ")"
        return JSONResponse(
            InvalidRequest(message, param=_param(tuple(first.get("loc", ())))).body(), status_code=422
        )

    @fastapi_app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI answers 400 itself when a JSON body cannot be decoded (not UTF-8, nested too deeply)
        detail = str(exc.detail)
        if exc.status_code == 400:
            detail = "the body cannot be parsed as JSON (not UTF-8, or nested too deeply)"
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            # Starlette's Allow names the first route of this path only; a path can have several
            allowed = allowed_methods(request.app.router.routes, request.scope)
            headers = {**(headers or {}), "Allow": ", ".join(allowed)}
            detail = f"{request.method} is not allowed on {request.url.path}; allowed: {', '.join(allowed)}"
        error = for_http_status(exc.status_code, detail)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=headers)

    @fastapi_app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(
            SameseedError(f"internal error ({type(exc).__name__}); this is a bug").body(), status_code=500
        )
