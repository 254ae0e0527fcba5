"""The dashboard's web server (aiohttp): the page and its assets from the package, the view as JSON, live updates
as server-sent events, and ``meshfed diagnose`` on demand.

Routes::

    GET /                          the page (static/index.html)
    GET /static/{name}             app.js, style.css (from the package; nothing from elsewhere)
    GET /api/view                  the current view (meshfed.dashboard.view)
    GET /api/events                text/event-stream: an ``event: view`` with the whole view at connect and after
                                   every poll
    GET /api/diagnose?service=SVC.NS&from=CLUSTER    the diagnose report (local runs only)

One poller per server gathers the status (:mod:`meshfed.status`, in a worker thread: it blocks) and asks
Prometheus every ``refresh_s`` seconds; every client shares its result. Diagnose also runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from meshfed import diagnose, status
from meshfed import prometheus as prom
from meshfed.dashboard import view as viewmod

log = logging.getLogger("meshfed.dashboard")

STATIC = {"app.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}
KEEPALIVE_S = 15.0


@dataclass(frozen=True, slots=True)
class LocalSource:
    """A local run: its status (as ``meshfed status --run-dir``), its Prometheus from state.json."""

    run_dir: Path

    def report(self) -> dict[str, Any]:
        return status.evaluate_local(status.collect_local(self.run_dir))

    def prometheus_url(self, report: dict[str, Any]) -> str | None:
        url = (report.get("prometheus") or {}).get("url")
        return str(url) if url else None

    def diagnose(self, service: str, caller: str) -> dict[str, Any]:
        ev = diagnose.collect(self.run_dir, service, caller)
        return diagnose.report(ev, diagnose.evaluate(ev))


@dataclass(frozen=True, slots=True)
class RemoteSource:
    """A real federation (as ``meshfed status --federation``), with the Prometheus given on the command line."""

    url: str
    cert: Path
    key: Path
    ca_bundle: Path
    prometheus: str | None = None

    def report(self) -> dict[str, Any]:
        return status.evaluate_remote(status.collect_remote(self.url, cert=self.cert, key=self.key,
                                                            ca_bundle=self.ca_bundle))

    def prometheus_url(self, report: dict[str, Any]) -> str | None:
        return self.prometheus

    def diagnose(self, service: str, caller: str) -> dict[str, Any]:
        raise diagnose.DiagnoseError("diagnose needs a local run (--run-dir): it calls through the caller's "
                                     "sidecar and reads its control plane")


class Source(Protocol):
    """Where the view comes from (a local run, a real federation; tests use a fake). Its calls block."""

    def report(self) -> dict[str, Any]: ...

    def prometheus_url(self, report: dict[str, Any]) -> str | None: ...

    def diagnose(self, service: str, caller: str) -> dict[str, Any]: ...


def gather(source: Source) -> dict[str, Any]:
    """One view (blocking: status collection and Prometheus queries)."""
    now = datetime.now(UTC).isoformat()
    try:
        report = source.report()
    except status.StatusError as exc:
        return viewmod.unavailable(str(exc), now=now)
    url = source.prometheus_url(report)
    metrics: list[dict[str, Any]] = []
    up: dict[str, bool] | None = None
    error = ""
    if url:
        try:
            metrics = prom.edges(url)
            up = prom.targets_up(url)
        except prom.PrometheusError as exc:
            error = str(exc)
    else:
        reason = (report.get("prometheus") or {}).get("reason")
        error = "" if report.get("kind") == "remote" else f"no Prometheus ({reason or 'not started'})"
    return viewmod.build(report, metrics=metrics, up=up, prometheus_url=url, prometheus_error=error, now=now)


@dataclass
class Hub:
    """The latest view and its version (one per poll); SSE handlers wait on it."""

    view: dict[str, Any] = field(default_factory=dict)
    version: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def publish(self, view: dict[str, Any]) -> None:
        """Every poll is published (its ``now`` moves even when nothing else did: the page shows how fresh it is)."""
        async with self.changed:
            self.view = view
            self.version += 1
            self.changed.notify_all()


_HUB = web.AppKey("hub", Hub)
_SOURCE = web.AppKey("source", Source)
_REFRESH = web.AppKey("refresh", float)
_POLLS = web.AppKey("polls", dict)


def _asset(name: str) -> bytes:
    return resources.files("meshfed.dashboard").joinpath("static", name).read_bytes()


async def index(request: web.Request) -> web.Response:
    return web.Response(body=_asset("index.html"), content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-store"})


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC or name == "index.html":
        raise web.HTTPNotFound()
    return web.Response(body=_asset(name), content_type=STATIC[name], charset="utf-8",
                        headers={"Cache-Control": "no-store"})


async def _current(app: web.Application) -> dict[str, Any]:
    hub = app[_HUB]
    if not hub.version:
        async with hub.changed:
            await asyncio.wait_for(hub.changed.wait_for(lambda: hub.version > 0), timeout=60)
    return hub.view


async def api_view(request: web.Request) -> web.Response:
    return web.json_response(await _current(request.app))


def _moved(hub: Hub, sent: int) -> bool:
    return hub.version != sent


async def api_events(request: web.Request) -> web.StreamResponse:
    hub = request.app[_HUB]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    sent = 0
    while True:
        async with hub.changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hub.changed.wait_for(functools.partial(_moved, hub, sent)),
                                       timeout=KEEPALIVE_S)
            version, view = hub.version, hub.view
        try:
            if version != sent:
                await response.write(f"id: {version}\nevent: view\ndata: {json.dumps(view)}\n\n".encode())
                sent = version
            else:
                await response.write(b": keepalive\n\n")
        except (ConnectionResetError, RuntimeError):
            return response


async def api_diagnose(request: web.Request) -> web.Response:
    service, caller = request.query.get("service", ""), request.query.get("from", "")
    if not service or not caller:
        return web.json_response({"error": "give service=SVC.NS and from=CLUSTER"}, status=400)
    source: Source = request.app[_SOURCE]
    try:
        result = await asyncio.to_thread(source.diagnose, service, caller)
    except diagnose.DiagnoseError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response(result)


async def _poll(app: web.Application) -> None:
    source: Source = app[_SOURCE]
    refresh = app[_REFRESH]
    polls = app[_POLLS]
    while True:
        started = time.monotonic()
        try:
            view = await asyncio.to_thread(gather, source)
        except Exception as exc:  # a bug in one round must not end the live view; logged, next round retries
            log.exception("dashboard poll failed")
            view = viewmod.unavailable(f"dashboard: {type(exc).__name__}: {exc}",
                                       now=datetime.now(UTC).isoformat())
        polls["count"] = polls.get("count", 0) + 1
        polls["last_s"] = round(time.monotonic() - started, 3)
        view["poll"] = dict(polls)  # how long gathering took (status, Prometheus), for a person wondering
        await app[_HUB].publish(view)
        await asyncio.sleep(max(0.0, refresh - (time.monotonic() - started)))


async def _poller(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(_poll(app))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def create_app(source: Source, *, refresh_s: float = 2.0) -> web.Application:
    app = web.Application()
    app[_HUB] = Hub()
    app[_SOURCE] = source
    app[_REFRESH] = refresh_s
    app[_POLLS] = {}
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/api/view", api_view)
    app.router.add_get("/api/events", api_events)
    app.router.add_get("/api/diagnose", api_diagnose)
    app.cleanup_ctx.append(_poller)
    return app


async def serve(source: Source, *, host: str, port: int, refresh_s: float = 2.0,
                ready: Callable[[str], None] = lambda _url: None) -> None:
    """Serve until cancelled (or SIGINT/SIGTERM through the caller)."""
    app = create_app(source, refresh_s=refresh_s)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
        ready(f"http://{host}:{port}/")
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
