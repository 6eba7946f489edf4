"""Traces: off by default; when on, one trace per generation across the HTTP process and the worker, in the logs."""

import io
import json
import logging
import threading
from multiprocessing import Pipe

import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from app.main import create_app
from app.settings import Settings
from app.telemetry import tracing
from app.telemetry.logs import JsonFormatter
from app.worker.messages import ImageRendered, RenderImage, Shutdown
from app.worker.process import serve
from tests.support.engines import FakeEngine
from tests.support.fakes import FakePool
from tests.unit.test_worker_loop import CONFIG, PARAMS


@pytest.fixture()
def spans(monkeypatch):
    """Record spans in memory: a local SDK provider stands in for the one OTEL_* variables would install."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    local = provider.get_tracer("sameseed")
    modules = ("app.services.generation", "app.scheduler.dispatcher", "app.worker.process", "app.telemetry.tracing")
    for module in modules:
        monkeypatch.setattr(f"{module}.tracer", lambda: local)
    yield exporter
    provider.shutdown()


def fake_app(tmp_path):
    pools = []

    def factory(configs):
        pools.append(FakePool(configs, auto=True))
        return pools[0]

    return create_app(Settings(data_dir=tmp_path, workers="cpu:1"), pool_factory=factory), pools


@pytest.mark.parametrize(
    ("environ", "exporter"),
    [
        ({}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "otlp"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, "otlp"),
        ({"OTEL_TRACES_EXPORTER": "console"}, "console"),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, None),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, None),
    ],
)
def test_the_standard_variables_turn_tracing_on_and_nothing_else_does(environ, exporter):
    assert tracing.requested(environ) == exporter


def test_off_by_default_no_trace_context_travels_to_workers(tmp_path):
    application, pools = fake_app(tmp_path)
    with TestClient(application) as client:
        assert client.post("/v1/generations", json={"prompt": "a", "seed": 1}).status_code == 200
    sent = [m for _, m in pools[0].sent if isinstance(m, RenderImage)]
    assert sent and all(m.trace_context is None for m in sent)


def test_a_generation_is_one_trace_and_its_context_reaches_the_worker_message(tmp_path, spans):
    application, pools = fake_app(tmp_path)
    with TestClient(application) as client:
        body = client.post("/v1/generations", json={"prompt": "a", "seed": 1, "num_images": 2}).json()
    finished = {span.name: span for span in spans.get_finished_spans()}
    assert {"generation", "render images", "queue wait", "sign and store"} <= set(finished)
    root = finished["generation"]
    assert root.parent is None and root.attributes["sameseed.model"] == "sameseed-tiny"
    assert finished["render images"].attributes["sameseed.generation_id"] == body["id"]
    trace_id = root.context.trace_id
    assert {span.context.trace_id for span in finished.values()} == {trace_id}
    assert finished["sign and store"].parent.span_id == root.context.span_id
    assert finished["queue wait"].parent.span_id == finished["render images"].context.span_id
    messages = [m for _, m in pools[0].sent if isinstance(m, RenderImage) and m.job_id == body["id"]]
    assert len(messages) == 2
    assert all(m.trace_context["traceparent"].split("-")[1] == f"{trace_id:032x}" for m in messages)


def test_the_worker_renders_inside_the_generations_trace_and_logs_its_trace_id(spans):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("app.worker")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    parent_conn, child_conn = Pipe(duplex=True)
    thread = threading.Thread(target=serve, args=(FakeEngine(CONFIG), child_conn, "w0"), daemon=True)
    thread.start()
    try:
        context = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
        parent_conn.send(RenderImage("gen_1", 0, PARAMS, trace_context=context))
        assert parent_conn.poll(5) and isinstance(parent_conn.recv(), ImageRendered)
        parent_conn.send(RenderImage("golden_1", 0, PARAMS))  # no context: no span, no trace id
        assert parent_conn.poll(5) and isinstance(parent_conn.recv(), ImageRendered)
    finally:
        parent_conn.send(Shutdown())
        thread.join(timeout=5)
        logger.removeHandler(handler)
    (render,) = spans.get_finished_spans()
    assert render.name == "render image" and render.attributes["sameseed.worker_id"] == "w0"
    assert f"{render.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert f"{render.parent.span_id:016x}" == "b7ad6b7169203331"
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    traced = [line for line in lines if line.get("generation_id") == "gen_1"]
    untraced = [line for line in lines if line.get("generation_id") == "golden_1"]
    assert traced and all(line["trace_id"] == "0af7651916cd43dd8448eb211c80319c" for line in traced)
    assert untraced and all("trace_id" not in line for line in untraced)


def test_pipeline_steps_are_spans_only_inside_a_traced_image(spans):
    with tracing.child_span("denoise"):  # a golden check: no traced parent, no span of its own
        pass
    assert spans.get_finished_spans() == ()
    with tracing.tracer().start_as_current_span("render image") as parent:
        with tracing.child_span("denoise"):
            pass
    denoise, render = spans.get_finished_spans()
    assert denoise.name == "denoise" and denoise.parent.span_id == parent.get_span_context().span_id
