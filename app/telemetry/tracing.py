"""OpenTelemetry traces: off unless the standard OTEL_* variables ask for them; context crosses into workers.

A generation is one trace: `generation` in the HTTP process (with `queue wait` and `sign and store`
children) and `render image` in the worker that drew each image, linked by the W3C trace context
carried in the worker message. Without a configured exporter the API's no-op tracer is used.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager

from opentelemetry import context, propagate, trace
from opentelemetry.trace import Span

__all__ = [
    "Span", "carrier", "child_span", "configure_tracing", "current_ids", "epoch_ns", "from_carrier", "tracer"
]

log = logging.getLogger("app.telemetry.tracing")

TRACER_NAME = "sameseed"
_configured = False


def requested(environ: Mapping[str, str] = os.environ) -> str | None:
    """The exporter the standard variables ask for (`otlp`, `console`), or None: tracing off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return None if exporter == "none" else exporter
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return "otlp" if endpoint else None


def configure_tracing(**attributes: str) -> bool:
    """Install an SDK tracer provider exporting as the OTEL_* variables say; False (no-op tracing) when off."""
    global _configured
    exporter_name = requested()
    if exporter_name is None or _configured:
        return _configured
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if exporter_name == "otlp":  # http/protobuf; endpoint, headers and timeout from OTEL_EXPORTER_OTLP_*
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    elif exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        log.warning("OTEL_TRACES_EXPORTER=%s is not supported here (otlp, console); tracing stays off", exporter_name)
        return False
    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are read by Resource.create
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "sameseed"), **attributes})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _configured = True
    log.info("tracing on: exporting spans with %s", exporter_name)
    return True


def shutdown_tracing() -> None:
    """Flush and stop the tracer provider, if one was installed."""
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if shutdown is not None:
        shutdown()


def child_span(name: str) -> AbstractContextManager[object]:
    """A span under the current one, or nothing when no traced span is open (golden checks, tracing off)."""
    if not trace.get_current_span().is_recording():
        return contextlib.nullcontext()
    return tracer().start_as_current_span(name)


def tracer() -> trace.Tracer:
    """The tracer Sameseed's spans come from (a no-op one while tracing is off)."""
    return trace.get_tracer(TRACER_NAME)


def carrier() -> dict[str, str]:
    """The current trace context as W3C headers (`traceparent`, ...), to send with work; empty when none."""
    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers


def from_carrier(headers: Mapping[str, str] | None) -> context.Context:
    """The trace context a carrier holds (the empty context when it holds none)."""
    return propagate.extract(dict(headers or {}))


def epoch_ns(monotonic_s: float) -> int:
    """A time.monotonic() instant as epoch nanoseconds, for spans whose start was only noted then."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


def current_ids() -> dict[str, str]:
    """`trace_id` and `span_id` (hex) of the current span, for log lines; empty outside a span."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return {}
    return {"trace_id": f"{span_context.trace_id:032x}", "span_id": f"{span_context.span_id:016x}"}
