"""GET /metrics: Prometheus text format, or OpenMetrics when negotiated."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client.exposition import choose_encoder

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Every series of this server: Prometheus text, or OpenMetrics when the Accept header asks for it."""
    generations = getattr(request.app.state, "generations", None)
    if generations is not None:
        generations.dispatcher.refresh_metrics()
    encode, content_type = choose_encoder(request.headers.get("accept", ""))  # as prometheus_client's own ASGI app
    return Response(encode(request.app.state.metrics.registry), headers={"Content-Type": content_type})
