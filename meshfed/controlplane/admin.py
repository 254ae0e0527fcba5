"""The control plane's admin HTTP endpoint, how ``meshfed status``, ``diagnose`` and Prometheus see it:

- ``/healthz``: the process is up (``{"status": "ok"}``);
- ``/readyz``: 200 once the first snapshot is served and, when federated, the first catalog arrived, else 503
  (``{"ready": ..., "federation_synced": ...}``);
- ``/status``: everything status and diagnose need (:mod:`meshfed.controlplane.status`);
- ``/metrics``: Prometheus text (:mod:`meshfed.telemetry`).

The server knows nothing of the control plane but the callables it is given.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from meshfed.controlplane.config import Listen


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool  # the first local snapshot is taken and every server is up
    federation_synced: bool  # not federated, or the federation's first catalog arrived


@dataclass(frozen=True)
class AdminEndpoints:
    """What the admin endpoint serves, asked at each request."""

    readiness: Callable[[], Readiness]
    status: Callable[[], Any]  # JSON-shaped
    metrics: Callable[[], tuple[bytes, str]]  # body, content type


async def serve_admin(stack: AsyncExitStack, listen: Listen, endpoints: AdminEndpoints) -> int:
    """Serve ``endpoints`` on ``listen`` until ``stack`` closes; returns the port bound (``listen.port`` may be 0)."""

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        state = endpoints.readiness()
        ok = state.ready and state.federation_synced
        return web.json_response({"ready": ok, "federation_synced": state.federation_synced},
                                 status=200 if ok else 503)

    async def metrics(request: web.Request) -> web.Response:
        body, content_type = endpoints.metrics()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def status(request: web.Request) -> web.Response:
        return web.json_response(endpoints.status(), dumps=lambda v: json.dumps(v, default=str))

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, listen.host, listen.port)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else listen.port
