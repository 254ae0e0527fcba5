"""Acceptance: `meshfed up --detach` on the demo, then status, diagnose, failures and `meshfed down`.

One run for the whole module (the tests run in file order and each builds on the last): a cross-cluster call with
the caller's identity, `status -o json` with every address, `diagnose` all ok; then west's reviews workload stops
(traffic fails over to east's copy), west's control plane stops (its exports are withdrawn after the lease TTL and
status says west is unreachable), west's intermediate is replaced by one from a foreign root (diagnose names the
certificate hop), and `meshfed down` leaves no recorded process running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from federation.trust.spiffe import SpiffeId, TrustDomain
from federation.trust.store import init_root, issue_intermediate
from meshfed import local, procs
from meshfed.runstate import RunState, WorkloadState

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
LEASE_TTL = 3


def meshfed(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshfed", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)


def state_of(run: Path) -> RunState:
    return local.read_state(run)


def recorded_pids(run: Path) -> list[int]:
    return [p.pid for p in state_of(run).processes]


@contextlib.contextmanager
def detached_run(run_dir: Path, *up_args: str, timeout: float = 240) -> Iterator[Path]:
    """``meshfed up clusters/demo --detach UP_ARGS`` in ``run_dir``, then ``meshfed down`` and any leftover
    recorded process stopped by pid, also after a failure."""
    done = meshfed("up", "clusters/demo", "--detach", *up_args, "--run-dir", str(run_dir), timeout=timeout)
    try:
        assert done.returncode == 0, f"meshfed up failed:\n{done.stdout}\n{done.stderr}"
        yield run_dir
    finally:
        meshfed("down", "--run-dir", str(run_dir))
        for pid in recorded_pids(run_dir) if (run_dir / local.STATE_FILE).exists() else []:
            procs.stop(pid)  # leftovers (the last test asserts there are none)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with detached_run(tmp_path_factory.mktemp("meshfed-run") / "run", "--lease-ttl", str(LEASE_TTL)) as run_dir:
        yield run_dir


def client(run: Path, cluster: str) -> WorkloadState:
    return local.client_of(state_of(run), cluster)


def answers(run: Path, cluster: str, host: str, n: int) -> list[dict[str, Any]]:
    out = []
    for _ in range(n):
        status, body = local.call(client(run, cluster).outbound, host)
        out.append({"status": status, **(json.loads(body) if status == 200 else {"body": body[:200]})})
    return out


def wait_for(what: str, check: Any, *, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, ValueError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout:.0f}s (last: {last!r})")


def test_cross_cluster_call_carries_the_callers_identity(run: Path) -> None:
    status, body = local.call(client(run, "east").outbound, "ratings.default.svc.clusterset.local")
    assert status == 200, body
    answer = json.loads(body)
    assert answer["cluster"] == "west"
    assert answer["service"] == "ratings"
    assert answer["caller"] == client(run, "east").spiffe_id == "spiffe://demo.meshfed.local/ns/default/sa/sleep"


def test_status_json_lists_every_address_and_is_healthy(run: Path) -> None:
    done = meshfed("status", "--run-dir", str(run), "-o", "json")
    assert done.stdout, f"status printed nothing (exit {done.returncode}):\n{done.stderr}"
    report = json.loads(done.stdout)
    assert done.returncode == 0, report["problems"]
    assert report["healthy"] is True
    addr = report["addresses"]
    assert addr["federation"].startswith("https://127.0.0.1:")
    for cluster in ("east", "west"):
        c = addr["clusters"][cluster]
        for key in ("xds", "dns", "admin", "gateway", "gateway_admin"):
            assert c[key].startswith("127.0.0.1:"), (cluster, key, c[key])
    sleep_east = next(w for w in addr["workloads"] if w["workload"] == "sleep-east")
    assert sleep_east["sidecar_outbound"] == client(run, "east").outbound
    assert "ratings.default.svc.clusterset.local" in sleep_east["can_call"]
    assert {c["cluster"]: c["connected"] for c in report["clusters"]} == {"east": True, "west": True}
    ratings = next(s for s in report["services"] if s["service"] == "ratings.default")
    assert ratings["exported_by"] == ["west"] and ratings["clusterset_ip"].startswith("127.241.")
    assert ratings["ready"]["west"] == 1
    assert report["proxies"] and all(p["state"] == "synced" for p in report["proxies"])
    assert report["trust"]["phase"] == "stable"


def test_diagnose_all_hops_ok(run: Path) -> None:
    # Bounded convergence wait: a remote gateway host starts unhealthy until the sidecar's first active health
    # check passes (and the first one may race the gateway's own startup).
    def diagnosed() -> tuple[subprocess.CompletedProcess[str], dict[str, Any]] | None:
        done = meshfed("diagnose", "ratings.default", "--from", "east", "--run-dir", str(run), "-o", "json")
        return (done, json.loads(done.stdout)) if done.returncode == 0 else None

    try:
        done, result = wait_for("diagnose ok", diagnosed, timeout=40)
    except AssertionError:
        done = meshfed("diagnose", "ratings.default", "--from", "east", "--run-dir", str(run), "-o", "json")
        raise AssertionError(done.stdout) from None
    assert done.returncode == 0, result
    assert result["ok"] is True and result["first_failure"] is None
    by_name = {h["name"]: h["status"] for h in result["hops"]}
    # west's AuthorizationPolicy on ratings allows east's sleep (clusters/demo/west/authorizationpolicy-ratings.yaml)
    assert by_name == {"export": "ok", "import": "ok", "dns": "ok", "xds": "ok", "gateway": "ok",
                       "endpoints": "ok", "certificates": "ok", "policy": "ok", "request": "ok"}


def _register_by_hand(run: Path, cluster: str) -> None:
    """Join the federation as ``cluster`` the way operations.md's "Add a cluster" does, with an intermediate from
    the run's root, but with no control plane behind it (so it never heartbeats)."""
    import asyncio

    from discovery.model import ClusterId, ClusterInfo, NetworkId
    from federation.client import FederationClient, cluster_credentials

    done = meshfed("ca", "intermediate", "--root", str(run / "ca" / "root"), "--cluster", cluster, "--out",
                   str(run / "ca" / cluster))
    assert done.returncode == 0, done.stderr
    ctx, bundle = cluster_credentials(run / "ca" / cluster, ClusterId(cluster))

    async def register() -> None:
        async with FederationClient(state_of(run).federation.url, ssl_context=ctx, cluster=ClusterId(cluster),
                                    bundle=bundle) as fed:
            await fed.register(ClusterInfo(id=ClusterId(cluster), network=NetworkId(f"net-{cluster}"),
                                           gateway_host="127.0.0.1", gateway_port=1))

    asyncio.run(register())


def test_a_member_added_by_hand_is_seen_goes_unreachable_and_is_removed(run: Path) -> None:
    """Issue 18 walk item 3: status sees a member the run did not start, turns unhealthy when its lease lapses, and
    'meshfed federation remove' takes it out; diagnose --from it explains instead of 'no cluster'."""
    _register_by_hand(run, "north")

    def north_unreachable() -> dict[str, Any] | None:
        done = meshfed("status", "--run-dir", str(run), "-o", "json")
        report = json.loads(done.stdout)
        north = next((c for c in report["clusters"] if c["cluster"] == "north"), None)
        return report if done.returncode == 1 and north and north["unreachable_since"] else None

    report = wait_for("north unreachable in status", north_unreachable, timeout=60)
    assert any(p.startswith("north: unreachable since") and "meshfed federation remove north" in p
               for p in report["problems"]), report["problems"]
    members = meshfed("federation", "members", "--run-dir", str(run), "-o", "json")
    assert "north" in {m["cluster"] for m in json.loads(members.stdout)["members"]}
    diag = meshfed("diagnose", "ratings.default", "--from", "north", "--run-dir", str(run))
    assert diag.returncode == 2 and "member of the federation that this run did not start" in diag.stderr
    removed = meshfed("federation", "remove", "north", "--run-dir", str(run))
    assert removed.returncode == 0 and "removed north" in removed.stdout, removed.stderr

    def healthy_without_north() -> bool:
        done = meshfed("status", "--run-dir", str(run), "-o", "json")
        report = json.loads(done.stdout)
        return done.returncode == 0 and "north" not in {c["cluster"] for c in report["clusters"]}

    wait_for("status healthy again without north", healthy_without_north, timeout=60)
    shutil.rmtree(run / "ca" / "north")


def test_stopping_wests_reviews_fails_over_to_east(run: Path) -> None:
    host = "reviews.default.svc.clusterset.local"
    # Before: west's client prefers its own cluster's copy (locality weights), so some answers come from west.
    before = answers(run, "west", host, 12)
    assert all(a["status"] == 200 for a in before)
    assert any(a["cluster"] == "west" for a in before)
    stopped = local.stop_workload(run, "west", "reviews-west-0")
    assert stopped["sidecar_pid"] and stopped["app_pid"]
    for cluster in ("west", "east"):
        wait_for(f"{cluster}'s calls to reviews all answered by east",
                 lambda c=cluster: all(a["status"] == 200 and a["cluster"] == "east"
                                       for a in answers(run, c, host, 20)))


def test_stopping_wests_control_plane_withdraws_its_exports(run: Path) -> None:
    west = state_of(run).clusters["west"].controlplane
    assert procs.stop(west.pid)
    east_admin = state_of(run).clusters["east"].controlplane.admin

    def withdrawn() -> bool:
        _, body = local.http_get(f"http://{east_admin}/status")
        imports = {i["service"] for i in json.loads(body)["imports"]}
        return "ratings.default" not in imports

    wait_for("east drops the import of west-only ratings", withdrawn, timeout=LEASE_TTL * 10)
    done = meshfed("status", "--run-dir", str(run), "-o", "json")
    report = json.loads(done.stdout)
    assert done.returncode == 1
    west_row = next(c for c in report["clusters"] if c["cluster"] == "west")
    assert west_row["connected"] is False and west_row["unreachable_since"]
    assert west_row["controlplane_up"] is False
    assert any("west: unreachable since" in p for p in report["problems"])
    assert any("west/controlplane" in p and "not running" in p for p in report["problems"])


def test_foreign_intermediate_is_named_by_diagnose(run: Path, tmp_path: Path) -> None:
    state = state_of(run)
    td = TrustDomain.parse(state.trust_domain)
    init_root(tmp_path / "foreign-root", td)
    issue_intermediate(tmp_path / "foreign-root", SpiffeId.cluster(td, "west"), tmp_path / "foreign-west")
    west_ca = Path(state.clusters["west"].ca)
    for name in ("ca-cert.pem", "ca-key.pem", "cert-chain.pem"):  # root-cert.pem (the real bundle) stays
        shutil.copy2(tmp_path / "foreign-west" / name, west_ca / name)
    # Restart west's control plane on the broken CA, recorded in the run so `meshfed down` stops it too.
    old = next(p for p in state.processes if p.name == "west/controlplane")
    rec = procs.start("west/controlplane", old.argv, log_path=Path(old.log))
    local.write_state(run, dataclasses.replace(state, processes=(*state.processes, rec)))

    done = meshfed("diagnose", "reviews.default", "--from", "east", "--run-dir", str(run), "-o", "json")
    result = json.loads(done.stdout)
    assert done.returncode == 1, result
    cert_hop = next(h for h in result["hops"] if h["name"] == "certificates")
    assert cert_hop["status"] == "FAIL"
    assert "west" in cert_hop["detail"] and "does not chain" in cert_hop["detail"]
    assert result["first_failure"]["name"] == "certificates", result["hops"]
    # east still serves reviews itself: the request hop still gets an answer, from east
    request_hop = next(h for h in result["hops"] if h["name"] == "request")
    assert request_hop["status"] == "ok", request_hop


def test_down_leaves_no_process(run: Path) -> None:
    pids = recorded_pids(run)
    done = meshfed("down", "--run-dir", str(run))
    assert done.returncode == 0, done.stderr
    assert [pid for pid in pids if procs.alive(pid)] == []
