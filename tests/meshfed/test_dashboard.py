"""The dashboard's view (pure, from hand-made status reports and Prometheus rows) and its server (aiohttp, with a
fake source): the JSON API, server-sent events after every poll, assets from the package only, diagnose off the
event loop."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import ClientSession, web

from meshfed import diagnose, status
from meshfed.dashboard import server
from meshfed.dashboard import view as v


def report(*, gateway_alive: bool = True, problems: tuple[str, ...] = ()) -> dict[str, Any]:
    cluster = {"connected": True, "unreachable_since": None, "lease_age_s": 1.5, "lease_ttl_s": 15.0,
               "network": "n", "locality": "r/z", "controlplane_answers": True, "in_run": True}
    return {
        "kind": "local", "now": "2026-01-01T00:00:00+00:00",
        "clusters": [{**cluster, "cluster": "east", "gateway": "127.0.0.1:1"},
                     {**cluster, "cluster": "west", "gateway": "127.0.0.1:2", "connected": False,
                      "unreachable_since": "2026-01-01T00:00:00+00:00"}],
        "services": [
            {"service": "ratings.default", "type": "ClusterSetIP", "exported_by": ["west"],
             "imported_by": ["east", "west"], "problems": []},
            {"service": "reviews.default", "type": "ClusterSetIP", "exported_by": ["east", "west"],
             "imported_by": ["east", "west"], "problems": []},
        ],
        "processes": [{"name": "east/eastwest-gateway", "alive": True},
                      {"name": "west/eastwest-gateway", "alive": gateway_alive},
                      {"name": "east/controlplane", "alive": True}, {"name": "west/controlplane", "alive": True}],
        "trust": {"phase": "stable", "next_step": "nothing", "trust_domain": "td", "roots": []},
        "peers": [],
        "problems": list(problems),
        "prometheus": {"url": None, "reason": "test"},
    }


def metric(src: str, dst: str, svc: str, *, rate: float, ratio: float | None, p99: float = 12.0) -> dict[str, Any]:
    return {"source_cluster": src, "destination_cluster": dst, "destination_service": f"{svc}.svc.clusterset.local",
            "requests_per_s": rate, "errors_per_s": None, "error_ratio": ratio, "p50_ms": 3.0, "p99_ms": p99}


def _edges(view: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {(e["source"], e["destination"], e["service"]): e for e in view["edges"]}


def test_every_cross_cluster_import_is_an_edge_before_any_traffic() -> None:
    view = v.build(report())
    assert set(_edges(view)) == {("east", "west", "ratings.default"), ("east", "west", "reviews.default"),
                                 ("west", "east", "reviews.default")}
    assert {e["state"] for e in view["edges"]} == {v.IDLE}
    east, west = view["clusters"]
    assert east["exports"] == ["reviews.default"] and east["imports"] == ["ratings.default"]
    assert west["exports"] == ["ratings.default", "reviews.default"] and west["imports"] == []
    assert east["lease"]["state"] == "held" and west["lease"]["state"] == "expired"


def test_edge_numbers_come_from_prometheus_and_failures_mark_the_edge() -> None:
    metrics = [metric("east", "west", "ratings.default", rate=4.0, ratio=0.0),
               metric("west", "east", "reviews.default", rate=2.0, ratio=0.5)]
    edges = _edges(v.build(report(), metrics=metrics))
    ok = edges[("east", "west", "ratings.default")]
    assert (ok["state"], ok["requests_per_s"], ok["error_ratio"], ok["p99_ms"]) == (v.OK, 4.0, 0.0, 12.0)
    assert edges[("west", "east", "reviews.default")]["state"] == v.FAILING
    assert edges[("east", "west", "reviews.default")]["state"] == v.IDLE


def test_a_dead_gateway_fails_its_edges_and_the_scrape_counts_too() -> None:
    view = v.build(report(gateway_alive=False), metrics=[metric("east", "west", "ratings.default", rate=4.0,
                                                                ratio=0.0)])
    assert {c["name"]: c["gateway"]["state"] for c in view["clusters"]} == {"east": v.UP, "west": v.DOWN}
    assert _edges(view)[("east", "west", "ratings.default")]["state"] == v.FAILING
    assert _edges(view)[("west", "east", "reviews.default")]["state"] == v.IDLE
    scraped = v.build(report(), up={"gateway/east/": False, "gateway/west/": True})
    assert {c["name"]: c["gateway"]["state"] for c in scraped["clusters"]} == {"east": v.DOWN, "west": v.UP}


def test_problems_are_status_problems_then_the_dashboards_own() -> None:
    view = v.build(report(problems=("process x is not running",)), prometheus_error="connection refused")
    assert view["problems"] == ["process x is not running", "prometheus: connection refused"]
    assert not view["healthy"]
    gone = v.unavailable("no local run in /x")
    assert gone["problems"] == ["no local run in /x"] and gone["clusters"] == []


@dataclass
class FakeSource:
    """A source whose reports are the test's; its diagnose blocks its thread until released."""

    reports: list[dict[str, Any]] = field(default_factory=lambda: [report()])
    calls: int = 0
    release: threading.Event = field(default_factory=threading.Event)

    def report(self) -> dict[str, Any]:
        self.calls += 1
        if isinstance(self.reports[0], Exception):
            raise self.reports[0]
        return self.reports[min(self.calls, len(self.reports)) - 1]

    def prometheus_url(self, report: dict[str, Any]) -> str | None:
        return None

    def diagnose(self, service: str, caller: str) -> dict[str, Any]:
        if caller == "nowhere":
            raise diagnose.DiagnoseError("no cluster 'nowhere'")
        self.release.wait(timeout=10)
        return {"service": service, "from": caller, "ok": True, "hops": [], "first_failure": None}


@pytest_asyncio.fixture
async def served() -> AsyncIterator[tuple[str, FakeSource]]:
    from meshfed.local import free_port

    source = FakeSource(reports=[report(), report(gateway_alive=False)])
    app = server.create_app(source, refresh_s=0.2)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", source
    finally:
        await runner.cleanup()


async def test_api_view_and_events_follow_the_polls(served: tuple[str, FakeSource]) -> None:
    url, _source = served
    async with ClientSession() as http:
        async with http.get(f"{url}/api/view") as resp:
            assert resp.status == 200
            first = await resp.json()
        assert [c["name"] for c in first["clusters"]] == ["east", "west"]
        views = []
        async with http.get(f"{url}/api/events") as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            buf = b""
            while len(views) < 3:
                buf += await asyncio.wait_for(resp.content.readany(), timeout=10)
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    lines = dict(line.split(": ", 1) for line in event.decode().splitlines() if ": " in line)
                    if lines.get("event") == "view":
                        views.append(json.loads(lines["data"]))
    # the second report (west's gateway dead) reaches the stream without the client asking again
    assert views[-1]["clusters"][1]["gateway"]["state"] == v.DOWN
    assert views[-1]["poll"]["count"] >= 2


async def test_a_failing_status_is_a_view_with_the_error(served: tuple[str, FakeSource]) -> None:
    url, source = served
    source.reports[:] = [status.StatusError("the run in /x was stopped")]  # type: ignore[list-item]
    async with ClientSession() as http:
        for _ in range(50):
            async with http.get(f"{url}/api/view") as resp:
                body = await resp.json()
            if body.get("error"):
                break
            await asyncio.sleep(0.1)
    assert body["problems"] == ["the run in /x was stopped"]


async def test_diagnose_runs_off_the_event_loop(served: tuple[str, FakeSource]) -> None:
    url, source = served
    async with ClientSession() as http:
        pending = asyncio.ensure_future(http.get(f"{url}/api/diagnose", params={"service": "a.b", "from": "east"}))
        await asyncio.sleep(0.3)
        async with http.get(f"{url}/api/view") as resp:  # answered while diagnose still blocks its thread
            assert resp.status == 200
        assert not pending.done()
        source.release.set()
        resp = await asyncio.wait_for(pending, timeout=10)
        assert (await resp.json())["from"] == "east"
        async with http.get(f"{url}/api/diagnose", params={"service": "a.b", "from": "nowhere"}) as bad:
            assert bad.status == 400 and "nowhere" in (await bad.json())["error"]
        async with http.get(f"{url}/api/diagnose") as bad:
            assert bad.status == 400


async def test_page_and_assets_come_from_the_package_and_name_no_other_host(served: tuple[str, FakeSource]) -> None:
    url, _ = served
    async with ClientSession() as http:
        async with http.get(f"{url}/") as resp:
            page = await resp.text()
        assert resp.status == 200
        for ref in re.findall(r'(?:src|href)="([^"]+)"', page):
            assert ref.startswith("/static/"), ref
            async with http.get(url + ref) as asset:
                assert asset.status == 200
                body = await asset.text()
            assert body == resources.files("meshfed.dashboard").joinpath(ref.removeprefix("/")).read_text()
        async with http.get(f"{url}/static/../server.py") as resp:
            assert resp.status == 404
        async with http.get(f"{url}/static/secret.txt") as resp:
            assert resp.status == 404
    static = resources.files("meshfed.dashboard").joinpath("static")
    for name in server.STATIC:
        text = static.joinpath(name).read_text()
        hosts = set(re.findall(r"https?://([^/\"' )]+)", text)) - {"www.w3.org"}  # the SVG namespace name
        assert not hosts, (name, hosts)


@pytest.mark.parametrize("listen", ["nope", "127.0.0.1:0"])
def test_dashboard_refuses_a_bad_listen_address(listen: str) -> None:
    from click.testing import CliRunner

    from meshfed.cli import cli

    done = CliRunner().invoke(cli, ["dashboard", "--listen", listen])
    assert done.exit_code == 2 and "--listen" in done.output
