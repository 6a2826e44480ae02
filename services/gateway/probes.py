"""The gateway's probes, none behind the API key: ``/health`` and ``/ping`` (liveness; SageMaker's
``/ping`` as vLLM serves it), ``/ready`` (a prefill and a decode worker reachable, not draining),
``/load`` (vLLM's: generation requests in flight), ``/version`` and ``/metrics`` (Prometheus)."""

from __future__ import annotations

import importlib.metadata
import logging
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from baton.services.gateway import metrics
from baton.services.gateway.backend import Backend

if TYPE_CHECKING:
    from baton.services.gateway.app import GatewayState

logger = logging.getLogger(__name__)


def add_probes(app: FastAPI, backend: Backend, state: GatewayState, model_name: str) -> None:
    """Register the probes on ``app``; ``model_name`` labels the metrics."""
    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": "ok"})

    async def ping() -> Response:
        """SageMaker's probe, as vLLM serves it: /health's answer."""
        return await health()

    app.get("/ping")(ping)
    app.post("/ping", name="ping_post")(ping)

    @app.get("/load")
    async def load() -> Response:
        """vLLM's load figure: the generation requests in flight on this gateway."""
        return JSONResponse({"server_load": state.in_flight})

    @app.get("/ready")
    async def ready() -> Response:
        """200 while a prefill and a decode worker are reachable and the gateway is not
        draining; the body counts the reachable workers of each role."""
        workers = {"prefill": 0, "decode": 0}
        try:
            workers = await backend.reachable()
        except Exception:
            logger.exception("backend readiness check failed")
        ok = not state.draining and workers["prefill"] > 0 and workers["decode"] > 0
        return JSONResponse({"ready": ok, "draining": state.draining, "workers": workers}, status_code=200 if ok else 503)

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": importlib.metadata.version("baton")})

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render(model_name, backend.kv_cache_usage())
        return Response(body, media_type=content_type)
