"""Two local runs (`meshfed up`, loopback) of clustersets with their own roots and trust domains, peered with
`meshfed peer add --from-run` both ways: each federation fetches the other's bundle from its SPIFFE bundle endpoint,
`meshfed peer list` and `meshfed status` show it, a root rotation on one side reaches the other through the endpoint,
and `meshfed ca rotate reissue` there waits for the peer to hold the new root before the new root signs."""

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
                for p in local.read_state(run).get("processes", []):
                    procs.stop(int(p["pid"]))


def peers(run: Path) -> list[dict[str, Any]]:
    done = meshfed("peer", "list", "--run-dir", str(run), "-o", "json", timeout=60)
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout)["peers"])


def fetched(run: Path, name: str, sequence: int) -> bool:
    row = next((p for p in peers(run) if p["name"] == name), None)
    st = row["status"] if row else None
    return bool(st) and st["bundle_source"] == "fetched" and st["bundle_sequence"] == sequence


def test_two_runs_peer_and_a_rotation_reaches_the_peer(runs: tuple[Path, Path]) -> None:
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

    root_a = local.read_state(run_a)["ca"]["root"]
    started = time.monotonic()
    done = meshfed("ca", "rotate", "add-root", "--root", root_a, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    wait_for("b holds a's two-root bundle", lambda: fetched(run_b, "demo", 2))
    print(f"add-root on demo -> the peer federation holds sequence 2 after {time.monotonic() - started:.1f}s")
    # reissue asks the running system, the peer included (b reports on its exchange calls what it holds).
    done = meshfed("ca", "rotate", "reissue", "--root", root_a, "--run-dir", str(run_a), timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "peer other (other.meshfed.local) holds the new root" in done.stdout + done.stderr
    # a's federation now serves under the new root; b still authenticates its bundle endpoint (with sequence 2).
    since = time.time()
    wait_for("b still refreshes a's bundle after reissue", lambda: _refreshed_after(run_b, "demo", since))


def _refreshed_after(run: Path, name: str, since: float) -> bool:
    from datetime import datetime

    st = next(p for p in peers(run) if p["name"] == name)["status"]
    last = st["last_refresh_at"]
    return bool(last) and datetime.fromisoformat(last).timestamp() > since and st["error"] == ""
