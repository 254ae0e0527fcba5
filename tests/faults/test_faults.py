"""Faults on a running local federation (`meshfed up --detach`), each while a bounded request loop runs across
clusters: kill -9 of the federation service, of a control plane, and of an east-west gateway.

Each test prints the requests sent, those that failed and the seconds to recover, and asserts the promise:
- federation down: the data plane and the control planes keep the last catalog (no withdrawal, no failed request),
  and after a restart every member is connected again with its exports;
- a control plane down: its proxies keep their configuration (no failed request), and it comes back by itself
  through `meshfed restart`;
- west's gateway down: east's 90/10 split (the demo's VirtualService) loses only requests sent before the gateway
  failed its active health check; after that every request is answered by east.
- a third member publishes 20,000 services (``MESHFED_BIG_PUBLISH`` sets the number): east and west keep their
  leases (the federation's log shows no lease expired), the loop to west's ratings loses nothing, and east's
  control plane imports all of them. tests/federation/test_big_publish.py checks the same on SQLite and etcd with
  the leases watched in the store's event log.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest

from discovery.model import ClusterId
from federation.agent import AgentConfig, FederationAgent
from federation.client import FederationClient
from federation.trust import SpiffeId, create_intermediate, issue_workload
from federation.trust.store import load_root
from federation.trust.tls import client_ssl_context
from meshfed import local, procs
from meshfed.runstate import WorkloadState
from tests.e2e.test_local_run import LEASE_TTL, meshfed, recorded_pids, state_of, wait_for
from tests.federation.fedkit import info, snapshot

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BIG_PUBLISH = int(os.environ.get("MESHFED_BIG_PUBLISH", "20000"))
RATINGS = "ratings.default.svc.clusterset.local"  # exported by west only: every answer crosses clusters
REVIEWS = "reviews.default.svc.clusterset.local"  # both clusters; east splits 90/10 east/west


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    run_dir = tmp_path_factory.mktemp("meshfed-faults") / "run"
    done = meshfed("up", "clusters/demo", "--detach", "--lease-ttl", str(LEASE_TTL), "--run-dir", str(run_dir),
                   timeout=240)
    try:
        assert done.returncode == 0, f"meshfed up failed:\n{done.stdout}\n{done.stderr}"
        yield run_dir
    finally:
        meshfed("down", "--run-dir", str(run_dir))
        for pid in recorded_pids(run_dir) if (run_dir / local.STATE_FILE).exists() else []:
            procs.stop(pid)


@dataclass
class Loop:
    """East's sleep calling ``host`` through its sidecar, one request after another, until stopped (bounded)."""

    outbound: str
    host: str
    results: list[tuple[float, int, str]] = field(default_factory=list)  # (time, status, answering cluster)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Loop:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(30)

    def _run(self) -> None:
        for _ in range(100_000):  # bounded; stopped long before
            if self._stop.is_set():
                return
            try:
                status, body = local.call(self.outbound, self.host, timeout=5.0)
                cluster = json.loads(body).get("cluster", "") if status == 200 else body[:80]
            except (OSError, ValueError) as exc:
                status, cluster = 0, repr(exc)[:80]
            self.results.append((time.monotonic(), status, cluster))
            time.sleep(0.02)

    def failed(self, since: float = 0.0) -> list[tuple[float, int, str]]:
        return [r for r in self.results if r[0] >= since and r[1] != 200]

    def steady(self, n: int = 20) -> bool:
        """The last ``n`` requests all answered (the loop is warm: routes and endpoints in force)."""
        last = self.results[-n:]
        return len(last) == n and all(r[1] == 200 for r in last)

    def sent(self, since: float = 0.0) -> int:
        return sum(1 for r in self.results if r[0] >= since)


def sleep_east(run: Path) -> WorkloadState:
    return local.client_of(state_of(run), "east")


def kill9(run: Path, name: str) -> int:
    rec = next(p for p in state_of(run).processes if p.name == name)
    os.kill(rec.pid, signal.SIGKILL)
    wait_for(f"{name} gone", lambda: not procs.alive(rec.pid), timeout=10)
    return rec.pid


def east_imports(run: Path) -> set[str]:
    admin = state_of(run).clusters["east"].controlplane.admin
    _, body = local.http_get(f"http://{admin}/status")
    return {i["service"] for i in json.loads(body)["imports"]}


def healthy(run: Path) -> bool:
    return meshfed("status", "--run-dir", str(run), "-o", "json").returncode == 0


def report(what: str, loop: Loop, recovered_s: float, since: float) -> None:
    failed = loop.failed(since)
    print(f"\n{what}: {loop.sent(since)} requests to {loop.host} from the fault on, {len(failed)} failed, "
          f"recovered in {recovered_s:.1f} s" + (f"; failures: {failed[:5]}" if failed else ""))


def test_killing_the_federation_withdraws_nothing(run: Path) -> None:
    wait_for("healthy run", lambda: healthy(run), timeout=60)
    with Loop(sleep_east(run).outbound, RATINGS) as loop:
        wait_for("the request loop answered steadily", loop.steady, timeout=60)
        kill9(run, "federation")
        down_at = time.monotonic()
        seen: list[set[str]] = []
        for _ in range(int(LEASE_TTL * 3 / 0.5)):  # three lease TTLs of outage: nothing may be withdrawn
            seen.append(east_imports(run))
            time.sleep(0.5)
        done = meshfed("restart", "federation", "--run-dir", str(run), timeout=120)
        assert done.returncode == 0, done.stderr
        restarted = time.monotonic()
        wait_for("status healthy after the federation restarted", lambda: healthy(run), timeout=90)
        recovered = time.monotonic() - down_at
        time.sleep(1)
    report("federation kill -9", loop, recovered, down_at)
    print("failures at (s after the kill):", sorted({round(t - down_at, 1) for t, _, _ in loop.failed(down_at)}),
          f"restart done at {restarted - down_at:.1f} s")
    assert all("ratings.default" in s for s in seen), "an import was withdrawn during the federation outage"
    assert loop.failed(down_at) == [], loop.failed(down_at)[:5]
    assert loop.sent(down_at) > 20


def test_killing_a_control_plane_leaves_its_proxies_serving(run: Path) -> None:
    with Loop(sleep_east(run).outbound, RATINGS) as loop:
        wait_for("the request loop answered steadily", loop.steady, timeout=60)
        kill9(run, "east/controlplane")
        down_at = time.monotonic()
        time.sleep(LEASE_TTL)  # east's lease may lapse (its heartbeats stop): its proxies keep what they hold
        done = meshfed("restart", "east/controlplane", "--run-dir", str(run), timeout=120)
        assert done.returncode == 0, done.stderr
        wait_for("status healthy after east's control plane restarted", lambda: healthy(run), timeout=90)
        recovered = time.monotonic() - down_at
        time.sleep(1)
    report("east control plane kill -9", loop, recovered, down_at)
    assert loop.failed(down_at) == [], loop.failed(down_at)[:5]
    assert "ratings.default" in east_imports(run)


def test_killing_a_gateway_fails_the_split_over_within_the_health_check_window(run: Path) -> None:
    admin = sleep_east(run).sidecar_admin
    gw_port = state_of(run).clusters["west"].gateway.address.rpartition(":")[2]
    subset = f"outbound|9080|west|{REVIEWS}"

    def west_subset_marked_down() -> bool:
        _, text = local.http_get(f"http://{admin}/clusters")
        return any(x.startswith(f"{subset}::127.0.0.1:{gw_port}::health_flags::") and "failed_active_hc" in x
                   for x in text.splitlines())

    with Loop(sleep_east(run).outbound, REVIEWS) as loop:
        wait_for("the request loop answered steadily", loop.steady, timeout=60)
        kill9(run, "west/eastwest-gateway")
        down_at = time.monotonic()
        wait_for("west's gateway failing east's health check", west_subset_marked_down, timeout=60)
        marked = time.monotonic()
        time.sleep(5)
        after = loop.sent(marked)
        failed_after = loop.failed(marked)
    report(f"west gateway kill -9 (marked down after {marked - down_at:.1f} s)", loop, marked - down_at, down_at)
    assert failed_after == [], failed_after[:5]
    assert after > 20
    done = meshfed("restart", "west/eastwest-gateway", "--run-dir", str(run), timeout=120)
    assert done.returncode == 0, done.stderr
    wait_for("status healthy after west's gateway restarted", lambda: healthy(run), timeout=90)


async def _publish_as_north(run: Path, services: int) -> tuple[int, float]:
    """A third member, ``north``, joins the run's federation with a cluster certificate from the run's root (as
    `meshfed ca intermediate` makes one), publishes ``services`` services, waits for the acknowledgement and until
    east's control plane imports them all, then leaves (deregisters: its exports are withdrawn). Returns the
    acknowledged generation and when east had imported them (monotonic)."""
    root = load_root(run / "ca" / "root")
    td = root.bundle.trust_domain
    ca = create_intermediate(root.active, SpiffeId.cluster(td, "north"))
    key, chain = issue_workload(ca, SpiffeId.cluster(td, "north"), ttl=timedelta(hours=1))
    ssl = client_ssl_context(b"".join(chain), key, root.bundle)
    url = state_of(run).federation.url
    async with FederationClient(url, ssl_context=ssl, cluster=ClusterId("north"), bundle=root.bundle,
                                request_timeout_s=120.0) as client:
        async with FederationAgent(client, info=info("north", "net3"), config=AgentConfig()) as north:
            generation = north.publish(*snapshot("north", [f"big{i}" for i in range(services)], addr_base=30))
            async with asyncio.timeout(300):
                acked = await north.wait_published(generation)
                last = f"big{services - 1}.default"
                while not await asyncio.to_thread(lambda: last in east_imports(run)):  # noqa: ASYNC110 - bounded
                    await asyncio.sleep(0.5)
            imported = time.monotonic()
        await client.deregister()
    return acked, imported


def test_a_big_publish_by_a_third_member_costs_no_lease_and_no_request(run: Path) -> None:
    wait_for("healthy run", lambda: healthy(run), timeout=60)
    fed_log = Path(state_of(run).federation.log)
    log_from = fed_log.stat().st_size
    with Loop(sleep_east(run).outbound, RATINGS) as loop:
        wait_for("the request loop answered steadily", loop.steady, timeout=60)
        started = time.monotonic()
        acked, imported = asyncio.run(_publish_as_north(run, BIG_PUBLISH))
        published = imported - started
        wait_for("north's services withdrawn from east", lambda: not any(
            s.startswith("big") for s in east_imports(run)), timeout=300)
        settled = time.monotonic() - started
        time.sleep(LEASE_TTL)
    with fed_log.open("rb") as f:
        f.seek(log_from)
        log = f.read().decode(errors="replace")
    expired = [line for line in log.splitlines() if "lease expired" in line]
    report(f"{BIG_PUBLISH}-service publish by north (imported by east {published:.1f} s after it began, "
           f"withdrawn {settled:.1f} s after)",
           loop, settled, started)
    assert acked >= 1
    assert expired == [], expired[:5]
    assert loop.failed(started) == [], loop.failed(started)[:5]
    assert loop.sent(started) > 20
    assert healthy(run)
