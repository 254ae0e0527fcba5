"""Two local runs (`meshfed up`, loopback) of clustersets with their own roots and trust domains, peered with
`meshfed peer add --from-run` both ways: each federation fetches the other's bundle from its SPIFFE bundle endpoint,
`meshfed peer list` and `meshfed status` show it; a workload of one calls the service the other exported to it by
its peer name, over mTLS where each side's certificate chains to its own root only, and the callee sees the foreign
SPIFFE ID; a service not exported to the peer has no name and no route, and a caller the policy does not name is
refused; a full root rotation on the calling side (add-root, reissue, retire-root) runs under a request loop across
the peering with no failed request (the figures printed); and with the caller's bundle endpoint down, traffic keeps
flowing on the last good bundle while the peer's status shows its age and the error.

Run B ("other", trust domain other.meshfed.local) is the demo with west's ratings exported to peer "demo" (the
annotation meshfed.io/export-to-peers) and ratings' ALLOW policy naming demo's sleep
(demo.meshfed.local/ns/default/sa/sleep, from cluster east) beside its own."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshfed import local, procs
from meshfed.runstate import WorkloadState

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]


def meshfed(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshfed", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)


def wait_for(what: str, check: Any, *, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout:.0f}s (last: {last!r})")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    tmp = tmp_path_factory.mktemp("peering-runs")
    other = tmp / "clusters" / "other"
    shutil.copytree(REPO / "clusters" / "demo", other)
    for f in other.rglob("*.yaml"):  # its own trust domain everywhere (authorization policies name principals)
        f.write_text(f.read_text().replace("demo.meshfed.local", "other.meshfed.local"))
    cs = other / "clusterset.yaml"
    cs.write_text(cs.read_text().replace("name: demo", "name: other").replace("127.241.0.0/16", "127.242.0.0/16"))
    export = other / "west" / "serviceexport-ratings-default.yaml"
    export.write_text(export.read_text().replace(
        "  namespace: default\n", "  namespace: default\n  annotations:\n    meshfed.io/export-to-peers: demo\n"))
    policy = other / "west" / "authorizationpolicy-ratings.yaml"
    policy.write_text(policy.read_text().replace(
        'principals: ["other.meshfed.local/ns/default/sa/sleep"]',
        'principals: ["other.meshfed.local/ns/default/sa/sleep", "demo.meshfed.local/ns/default/sa/sleep"]'))
    assert "export-to-peers" in export.read_text() and "demo.meshfed.local/ns" in policy.read_text()
    run_a, run_b = tmp / "run-a", tmp / "run-b"
    try:
        for clusterset, run in ((str(REPO / "clusters" / "demo"), run_a), (str(other), run_b)):
            done = meshfed("up", clusterset, "--detach", "--network", "loopback", "--bundle-refresh-hint", "1",
                           "--run-dir", str(run))
            assert done.returncode == 0, f"meshfed up {clusterset} failed:\n{done.stdout}\n{done.stderr}"
        yield run_a, run_b
    finally:
        for run in (run_a, run_b):
            meshfed("down", "--run-dir", str(run))
            if (run / local.STATE_FILE).exists():
                for p in local.read_state(run).processes:
                    procs.stop(p.pid)


def peers(run: Path) -> list[dict[str, Any]]:
    done = meshfed("peer", "list", "--run-dir", str(run), "-o", "json", timeout=60)
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout)["peers"])


def fetched(run: Path, name: str, sequence: int) -> bool:
    row = next((p for p in peers(run) if p["name"] == name), None)
    st = row["status"] if row else None
    return bool(st) and st["bundle_source"] == "fetched" and st["bundle_sequence"] == sequence


PEER_RATINGS = "ratings.default.svc.other.clusterset.local"  # B's ratings as A names it (A calls B "other")
CALLER = "spiffe://demo.meshfed.local/ns/default/sa/sleep"


def client(run: Path, cluster: str = "east") -> WorkloadState:
    return local.client_of(local.read_state(run), cluster)


def call(run: Path, host: str = PEER_RATINGS, *, outbound: str = "") -> tuple[int, dict[str, Any] | str]:
    status, body = local.call(outbound or client(run).outbound, host, timeout=5.0)
    return status, (json.loads(body) if status == 200 else body[:300])


def dig_a(run: Path, name: str) -> list[str]:
    host, _, port = local.read_state(run).clusters["east"].controlplane.dns.rpartition(":")
    done = subprocess.run(["dig", f"@{host}", "-p", port, "+short", "+tries=1", "+time=2", name, "A"],
                          capture_output=True, text=True, timeout=30, check=False)
    return done.stdout.split()


def test_two_runs_peer_and_see_each_others_bundle(runs: tuple[Path, Path]) -> None:
    run_a, run_b = runs
    for name, peer_run, run in (("other", run_b, run_a), ("demo", run_a, run_b)):
        done = meshfed("peer", "add", name, "--from-run", str(peer_run), "--run-dir", str(run), timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    wait_for("a holds b's bundle", lambda: fetched(run_a, "other", 1))
    wait_for("b holds a's bundle", lambda: fetched(run_b, "demo", 1))
    row = next(p for p in peers(run_b) if p["name"] == "demo")
    assert row["trustDomain"] == "demo.meshfed.local" and row["status"]["error"] == ""
    done = meshfed("status", "--run-dir", str(run_b), "-o", "json", timeout=120)
    report = json.loads(done.stdout)
    assert [p["name"] for p in report["peers"]] == ["demo"], report["peers"]
    assert not [p for p in report["problems"] if p.startswith("peer ")], report["problems"]


def test_a_workload_calls_the_service_a_peer_exported_to_it(runs: tuple[Path, Path]) -> None:
    run_a, _ = runs
    status, answer = wait_for("a's sleep reaches b's ratings by its peer name",
                              lambda: (lambda r: r if r[0] == 200 else None)(call(run_a)), timeout=90)
    assert isinstance(answer, dict)
    assert (answer["service"], answer["cluster"]) == ("ratings", "west")  # B's west, through B's gateway
    assert answer["caller"] == CALLER  # the foreign SPIFFE ID, as B's sidecar verified it (A's root only)
    # Its own name and a ClusterSetIP of A's range, beside A's own ratings (never merged).
    (vip,) = dig_a(run_a, PEER_RATINGS)
    assert vip.startswith("127.241.") and vip not in dig_a(run_a, "ratings.default.svc.clusterset.local")
    # B's reviews is exported inside B only: no name, no route on A's side.
    assert dig_a(run_a, "reviews.default.svc.other.clusterset.local") == []
    status, body = call(run_a, "reviews.default.svc.other.clusterset.local")
    assert status == 404, body
    # A caller ratings' policy does not name (A's reviews workload, another service account): refused by B's
    # sidecar in the TLS handshake, so A's sidecar answers 503 and nothing reaches the app.
    reviews = next(w for w in local.read_state(run_a).clusters["east"].workloads if w.service == "reviews")
    status, body = call(run_a, outbound=reviews.outbound)
    assert status == 503, body
    # meshfed status lists the peer's service as every control plane of A serves it.
    done = meshfed("status", "--run-dir", str(run_a), "-o", "json", timeout=120)
    rows = [r for r in json.loads(done.stdout)["peer_services"] if r["host"] == PEER_RATINGS]
    assert {r["cluster"] for r in rows} == {"east", "west"}, rows
    assert all(r["ips"] == [vip] and r["peer"] == "other" and r["trust_domain"] == "other.meshfed.local"
               and r["ready"] >= 1 and r["ports"] == [9080] for r in rows), rows
    table = meshfed("status", "--run-dir", str(run_a), timeout=120).stdout
    assert "Peer services" in table and PEER_RATINGS in table


def test_a_root_rotation_on_the_calling_side_under_traffic_across_the_peering(runs: tuple[Path, Path]) -> None:
    from tests.e2e.test_rotation import Traffic

    run_a, run_b = runs
    root_a = local.read_state(run_a).ca.root
    traffic = Traffic(client(run_a).outbound, target=PEER_RATINGS)
    figures: dict[str, float] = {}
    traffic.start()
    try:
        time.sleep(2)
        started = time.monotonic()
        done = meshfed("ca", "rotate", "add-root", "--root", root_a, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        wait_for("b holds a's two-root bundle", lambda: fetched(run_b, "demo", 2))
        figures["add-root -> the peer holds the new root (s)"] = time.monotonic() - started
        # reissue asks the running system, the peer included (b reports on its exchange calls what it holds).
        done = meshfed("ca", "rotate", "reissue", "--root", root_a, "--run-dir", str(run_a), timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "peer other (other.meshfed.local) holds the new root" in done.stdout + done.stderr
        since = time.time()
        wait_for("b still refreshes a's bundle after reissue", lambda: _refreshed_after(run_b, "demo", since))
        wait_for("every certificate of a under the new root", lambda: _converged(root_a, run_a), timeout=120)
        retired = time.monotonic()
        done = meshfed("ca", "rotate", "retire-root", "--root", root_a, "--run-dir", str(run_a), timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        wait_for("b holds a's bundle without the old root", lambda: fetched(run_b, "demo", 3))
        figures["retire-root -> the peer drops the old root (s)"] = time.monotonic() - retired
        time.sleep(3)  # traffic on the new root alone
        figures["rotation, add-root to the end (s)"] = time.monotonic() - started
    finally:
        traffic.stop_event.set()
        traffic.join(timeout=30)
    failures = traffic.failures()
    print(f"\nrotation of demo's root under traffic demo/east sleep -> other's ratings: {len(traffic.results)} "
          f"requests, {len(failures)} failed; " + "; ".join(f"{k} {v:.1f}" for k, v in figures.items()))
    assert len(traffic.results) > 20
    assert failures == [], failures[:5]
    status, answer = call(run_a)
    assert status == 200 and isinstance(answer, dict) and answer["caller"] == CALLER


def test_the_callers_bundle_endpoint_down_keeps_traffic_on_the_last_good_bundle(runs: tuple[Path, Path]) -> None:
    run_a, run_b = runs
    done = meshfed("fault", "stop", "federation", "--run-dir", str(run_a), timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    try:
        st = wait_for("b notices a's bundle endpoint is down",
                      lambda: (lambda s: s if s["error_kind"] == "unreachable" else None)(_status(run_b, "demo")),
                      timeout=60)
        assert st["bundle_source"] == "fetched" and not st["expired"]  # the last good bundle is kept
        answers = [call(run_a)[0] for _ in range(20)]
        later = _status(run_b, "demo")
        assert answers == [200] * 20, answers
        assert later["bundle_age_s"] >= st["bundle_age_s"] and later["error"], later
        done = meshfed("status", "--run-dir", str(run_b), "-o", "json", timeout=120)
        problems = json.loads(done.stdout)["problems"]
        assert any(p.startswith("peer demo") for p in problems), problems
        print(f"\na's bundle endpoint down: 20/20 calls answered; b's copy of a's bundle is "
              f"{later['bundle_age_s']:.0f}s old, error: {later['error']}")
    finally:
        done = meshfed("fault", "start", "federation", "--run-dir", str(run_a), timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
    wait_for("b refreshes a's bundle again", lambda: _status(run_b, "demo")["error"] == "", timeout=60)


def _status(run: Path, name: str) -> dict[str, Any]:
    st: dict[str, Any] = next(p for p in peers(run) if p["name"] == name)["status"]
    return st


def _converged(root: str, run: Path) -> bool:
    done = meshfed("ca", "inspect", root, "--run-dir", str(run), "-o", "json", timeout=60)
    return done.returncode == 0 and bool(json.loads(done.stdout)["convergence"].get("done"))


def _refreshed_after(run: Path, name: str, since: float) -> bool:
    from datetime import datetime

    st = _status(run, name)
    last = st["last_refresh_at"]
    return bool(last) and datetime.fromisoformat(last).timestamp() > since and st["error"] == ""
