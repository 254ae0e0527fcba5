"""Acceptance (issue 18): a full root rotation on a running `meshfed up`, with traffic, and no downtime.

While a bounded request loop calls west's ratings from east's sleep (through the sidecars and west's east-west
gateway) and a second loop polls the federation's member list: `ca rotate add-root`, `reissue`, then, as soon as
`ca inspect` reports that nothing in use depends on the old root any more, `retire-root` without `--force` (long
before T). Every request must succeed, no member may ever be unreachable, and `meshfed status` must stay healthy
afterwards. The figure (requests, failures, seconds per phase) is printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from meshfed import local, procs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
LEASE_TTL = 3
TARGET = "ratings.default.svc.clusterset.local"  # exported by west only
GRPC_TARGET = "xds:///echo-grpc.default.svc.clusterset.local:7070"  # proxyless, in west


def meshfed(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshfed", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    run_dir = tmp_path_factory.mktemp("meshfed-rot") / "run"
    done = meshfed("up", "clusters/demo", "--detach", "--lease-ttl", str(LEASE_TTL), "--run-dir", str(run_dir),
                   timeout=240)
    try:
        assert done.returncode == 0, f"meshfed up failed:\n{done.stdout}\n{done.stderr}"
        yield run_dir
    finally:
        meshfed("down", "--run-dir", str(run_dir))
        if (run_dir / local.STATE_FILE).exists():
            for p in local.read_state(run_dir).processes:
                procs.stop(p.pid)


class Traffic(threading.Thread):
    """East's sleep -> west's ratings (or ``target``), one request after another, until stopped (bounded by
    ``limit_s``)."""

    def __init__(self, outbound: str, *, target: str = TARGET, limit_s: float = 300.0) -> None:
        super().__init__(daemon=True)
        self.outbound, self.target, self.limit_s = outbound, target, limit_s
        self.stop_event = threading.Event()
        self.results: list[tuple[float, int, str]] = []

    def run(self) -> None:
        deadline = time.monotonic() + self.limit_s
        while not self.stop_event.is_set() and time.monotonic() < deadline:
            try:
                status, body = local.call(self.outbound, self.target, timeout=5.0)
            except OSError as exc:
                status, body = 0, str(exc)
            self.results.append((time.monotonic(), status, "" if status == 200 else body[:200]))
            time.sleep(0.02)

    def failures(self) -> list[tuple[float, int, str]]:
        return [r for r in self.results if r[1] != 200]


class Members(threading.Thread):
    """The federation's own member list, polled with a fresh throwaway identity of east each time (a credential
    issued before the rotation would itself stop working after it)."""

    def __init__(self, url: str, ca_dir: Path, *, limit_s: float = 300.0) -> None:
        super().__init__(daemon=True)
        self.url, self.ca_dir, self.limit_s = url, ca_dir, limit_s
        self.stop_event = threading.Event()
        self.polls = 0
        self.unreachable: list[str] = []
        self.errors: list[str] = []

    def run(self) -> None:
        from meshfed.status import StatusError, _local_catalog

        deadline = time.monotonic() + self.limit_s
        while not self.stop_event.is_set() and time.monotonic() < deadline:
            try:
                members = asyncio.run(_local_catalog(self.url, self.ca_dir, "east")).members
            except (StatusError, OSError, ValueError) as exc:
                self.errors.append(str(exc))
            else:
                self.polls += 1
                names = {m["cluster"] for m in members}
                if names != {"east", "west"}:
                    self.unreachable.append(f"members are {sorted(names)}")
                self.unreachable += [f"{m['cluster']} unreachable since {m['unreachable_since']}"
                                     for m in members if m["unreachable_since"]]
            self.stop_event.wait(0.5)


def inspect(root: Path, run: Path) -> dict[str, Any]:
    done = meshfed("ca", "inspect", str(root), "--run-dir", str(run), "-o", "json")
    assert done.returncode == 0, done.stderr
    info: dict[str, Any] = json.loads(done.stdout)
    return info


def test_full_rotation_under_traffic_has_no_downtime(run: Path) -> None:
    state = local.read_state(run)
    root = Path(state.ca.root)
    traffic = Traffic(local.client_of(state, "east").outbound)
    members = Members(state.federation.url, Path(state.clusters["east"].ca))
    phases: dict[str, float] = {}
    traffic.start()
    members.start()
    try:
        time.sleep(2)  # some traffic before the rotation starts
        t = time.monotonic()
        done = meshfed("ca", "rotate", "add-root", "--root", str(root))
        assert done.returncode == 0, done.stderr
        phases["add-root"] = time.monotonic() - t

        # reissue at once: it waits itself until every proxy, control plane and the federation trust the new root
        t = time.monotonic()
        done = meshfed("ca", "rotate", "reissue", "--root", str(root))
        assert done.returncode == 0, done.stdout + done.stderr
        assert "every control plane, proxy and the federation trust the new root" in done.stdout, done.stdout
        assert "reload its control plane" not in done.stdout  # they reload themselves
        info: dict[str, Any] = {}
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            info = inspect(root, run)
            if info["convergence"].get("done"):
                break
            time.sleep(0.5)
        conv = info["convergence"]
        assert conv.get("done"), conv
        assert info["phase"] == "leaves-rolling"  # long before T: only convergence allows retiring now
        assert conv["proxies_total"] > 0 and conv["proxies_old"] == 0
        assert any("proxyless certificate files renewed" in line for line in conv["summary"]), conv
        assert any("federation serving cert renewed" in line for line in conv["summary"]), conv
        phases["reissue (waits for the bundle) -> converged"] = time.monotonic() - t

        t = time.monotonic()
        done = meshfed("ca", "rotate", "retire-root", "--root", str(root))
        assert done.returncode == 0, done.stdout + done.stderr
        assert "retired root" in done.stdout and "reports nothing uses the old root" in done.stdout
        # Keep the traffic and the member poll going for several lease TTLs after the old root is gone.
        time.sleep(4 * LEASE_TTL)
        phases["retire-root (+ 4 lease TTLs)"] = time.monotonic() - t
    finally:
        traffic.stop_event.set()
        members.stop_event.set()
        traffic.join(timeout=30)
        members.join(timeout=30)

    fails = traffic.failures()
    print(f"\nrotation under traffic: {len(traffic.results)} requests east sleep -> {TARGET}, "
          f"{len(fails)} failed; member polls {members.polls}, unreachable seen {len(members.unreachable)}")
    for name, secs in phases.items():
        print(f"  {name}: {secs:.1f} s")
    assert len(traffic.results) > 50
    assert fails == [], fails[:10]
    assert members.polls > 10 and members.unreachable == [], members.unreachable[:5]

    # Proxyless gRPC moved too: its certificate files were renewed by the control planes and re-read by gRPC. A new
    # proxyless client (east) reaches the long-running proxyless server (west) with new-root certificates, and an
    # Envoy sidecar with a new-root leaf is accepted by that server.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")}
    env.update(state.clusters["east"].grpc_client.env)
    done = subprocess.run([sys.executable, "-m", "meshfed.demogrpc", "call", GRPC_TARGET, "--message", "rotated",
                           "--timeout", "30"], cwd=REPO, env=env, capture_output=True, text=True, timeout=90,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = next(json.loads(line) for line in done.stdout.splitlines() if line.startswith("{"))
    assert answer["cluster"] == "west" and answer["message"] == "rotated", answer
    sleep = local.client_of(state, "east")
    with grpc.insecure_channel(sleep.outbound, options=[
            ("grpc.default_authority", "echo-grpc.default.svc.clusterset.local:7070")]) as channel:
        reply = channel.unary_unary("/meshfed.demo.Echo/Call")(b"via-envoy", timeout=30, wait_for_ready=True)
    assert json.loads(reply)["cluster"] == "west"

    status = meshfed("status", "--run-dir", str(run), "-o", "json")
    report = json.loads(status.stdout)
    assert status.returncode == 0, report["problems"]
    assert report["trust"]["phase"] == "stable"


def test_a_second_rotation_asks_explicit_addresses(run: Path) -> None:
    """The same, asking the system by address (as on a real installation) instead of through the run's state:
    --federation URL --cluster-ca DIR and one --controlplane NAME=ADMIN per cluster. Asking too little is refused
    with what could not be seen."""
    state = local.read_state(run)
    root = state.ca.root
    where = ["--federation", state.federation.url, "--cluster-ca", state.clusters["west"].ca]
    for name, c in state.clusters.items():
        where += ["--controlplane", f"{name}={c.controlplane.admin}"]
    done = meshfed("ca", "rotate", "add-root", "--root", root)
    assert done.returncode == 0, done.stderr
    done = meshfed("ca", "rotate", "reissue", "--root", root, *where)
    assert done.returncode == 0 and "trust the new root" in done.stdout, done.stdout + done.stderr
    east_only = ["--controlplane", f"east={state.clusters['east'].controlplane.admin}"]
    done = meshfed("ca", "rotate", "retire-root", "--root", root, *east_only, "--wait", "1s")
    assert done.returncode == 1 and "federation: did not report" in " ".join(done.stderr.split()), done.stderr
    east_only += where[:4]  # the federation, but not west's control plane: west is unknown
    done = meshfed("ca", "rotate", "retire-root", "--root", root, *east_only, "--wait", "1s")
    assert done.returncode == 1, done.stderr
    assert "west: a member of the federation whose control plane was not asked" in " ".join(done.stderr.split())
    done = meshfed("ca", "rotate", "retire-root", "--root", root, *where)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "reports nothing uses the old root" in done.stdout
    status = meshfed("status", "--run-dir", str(run), "-o", "json")
    assert status.returncode == 0, json.loads(status.stdout)["problems"]
