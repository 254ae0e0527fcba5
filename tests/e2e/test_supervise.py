"""Issue 10 item 7 on a real run: ``meshfed up --detach --supervise`` starts a killed federation service again
(status shows the restart and turns healthy again), and ``meshfed down`` stops the supervisor first, so nothing is
restarted behind it and nothing is left running."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshfed import local, procs
from meshfed.procs import ProcRecord

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

REPO = Path(__file__).resolve().parents[2]


def meshfed(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshfed", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    run_dir = tmp_path_factory.mktemp("od-supervise") / "run"
    done = meshfed("up", "clusters/demo", "--detach", "--supervise", "--lease-ttl", "5", "--run-dir", str(run_dir),
                   timeout=300)
    try:
        assert done.returncode == 0, f"meshfed up failed:\n{done.stdout}\n{done.stderr}"
        yield run_dir
    finally:
        meshfed("down", "--run-dir", str(run_dir))
        for p in (s.processes if (s := local.read_state(run_dir, missing_ok=True)) else ()):
            procs.stop(p.pid)


def _record(run: Path, name: str) -> ProcRecord:
    return next(p for p in local.read_state(run).processes if p.name == name)


def test_a_killed_federation_service_is_started_again(run: Path) -> None:
    assert local.is_running(_record(run, local.SUPERVISOR))
    old = _record(run, "federation")
    procs.kill9(old.pid)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        rec = _record(run, "federation")
        if rec.restarts and local.is_running(rec):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"the federation was not restarted: {_record(run, 'federation')}")
    assert rec.pid != old.pid
    deadline = time.monotonic() + 90
    report: dict[str, Any] = {}
    while time.monotonic() < deadline:
        done = meshfed("status", "--run-dir", str(run), "-o", "json")
        report = json.loads(done.stdout)
        if done.returncode == 0:
            break
        time.sleep(1)
    else:
        raise AssertionError(f"status did not turn healthy after the restart: {report.get('problems')}")
    fed = next(p for p in report["processes"] if p["name"] == "federation")
    assert fed["restarts"] == 1 and fed["alive"]


def test_down_stops_the_supervisor_and_everything(run: Path) -> None:
    done = meshfed("down", "--run-dir", str(run))
    assert done.returncode == 0, done.stderr
    state = local.read_state(run)
    assert not local.running(state), local.running(state)
    time.sleep(2)  # a supervisor still alive would have restarted something by now
    assert not local.running(local.read_state(run))
