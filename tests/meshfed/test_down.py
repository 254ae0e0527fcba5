"""``meshfed down`` and the process records it reads: a recorded pid is signalled only while it still belongs to
the recorded process (same start time), and a run that is already stopped says so instead of stopping it again."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from meshfed import local, procs
from meshfed.cli import cli
from tests.support.runstate import state_from


def _exited_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def stopped_run(tmp_path: Path) -> Path:
    """A run directory whose processes have all exited and that 'meshfed down' stopped."""
    run_dir = tmp_path / "run"
    pid = _exited_pid()
    state = {"run_dir": str(run_dir), "clusters": {}, "federation": {"pid": pid, "url": "https://127.0.0.1:1"},
             "processes": [{"name": "federation", "pid": pid, "argv": ["x"], "log": "f.log", "start_time": 1}],
             "stopped_at": time.time()}
    local.write_state(run_dir, state_from(state))
    return run_dir


def test_start_records_the_start_time_and_a_reused_pid_is_not_signalled(tmp_path: Path) -> None:
    rec = procs.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], log_path=tmp_path / "s.log")
    try:
        assert rec.start_time is not None and rec.start_time == procs.start_time(rec.pid)
        assert procs.is_running(rec.pid, rec.start_time)
        # the same pid with another start time is another process: never signalled, counts as gone
        assert procs.is_running(rec.pid, rec.start_time + 1) is False
        assert procs.stop(rec.pid, start=rec.start_time + 1) is True
        assert procs.alive(rec.pid), "a process whose start time differs from the record was signalled"
        assert procs.stop(rec.pid, start=rec.start_time) is True
        assert not procs.alive(rec.pid)
    finally:
        procs.kill9(rec.pid)


def test_down_does_not_signal_a_pid_that_now_belongs_to_another_process(tmp_path: Path) -> None:
    """The recorded pid is alive but started at another time (pid reuse): down leaves it alone."""
    other = procs.start("other", [sys.executable, "-c", "import time; time.sleep(60)"], log_path=tmp_path / "o.log")
    try:
        run_dir = tmp_path / "run"
        assert other.start_time is not None
        local.write_state(run_dir, state_from({"clusters": {}, "processes": [
            {"name": "federation", "pid": other.pid, "argv": ["x"], "log": "f.log",
             "start_time": other.start_time - 5}]}))
        result = CliRunner().invoke(cli, ["down", "--run-dir", str(run_dir)])
        assert result.exit_code == 0, result.output
        assert procs.alive(other.pid)
        assert "nothing is running" in result.output
    finally:
        procs.stop(other.pid)


def test_a_second_down_says_nothing_is_running(tmp_path: Path) -> None:
    run_dir = stopped_run(tmp_path)
    result = CliRunner().invoke(cli, ["down", "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "nothing is running in" in result.output and "stopped at" in result.output
    assert "federation" not in result.output  # no table re-listing the old pids as stopped
    result = CliRunner().invoke(cli, ["down", "--run-dir", str(run_dir), "-o", "json"])
    assert json.loads(result.stdout)["stopped"] == []


def test_state_and_run_dir_are_private(tmp_path: Path) -> None:
    run_dir = stopped_run(tmp_path)
    assert (run_dir.stat().st_mode & 0o777) == 0o700
    assert ((run_dir / local.STATE_FILE).stat().st_mode & 0o777) == 0o600


def test_restart_starts_a_killed_process_again_and_records_it(tmp_path: Path) -> None:
    """Issue 10 item 7: a killed component of a local run is started again with 'meshfed restart NAME'."""
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    rec = procs.start("federation", argv, log_path=tmp_path / "run" / "federation.log")
    new_pid = 0
    try:
        run_dir = tmp_path / "run"
        local.write_state(run_dir, state_from({"cwd": str(tmp_path), "clusters": {}, "federation": {"pid": rec.pid},
                                               "processes": [{"name": "federation", "pid": rec.pid, "argv": argv,
                                                              "log": str(run_dir / "federation.log"),
                                                              "start_time": rec.start_time}]}))
        procs.kill9(rec.pid)
        assert procs.stop(rec.pid, timeout=5)
        result = CliRunner().invoke(cli, ["restart", "federation", "--run-dir", str(run_dir), "-o", "json"])
        assert result.exit_code == 0, result.output
        out = json.loads(result.stdout)
        new_pid = int(out["pid"])
        assert out["was_running"] is False and out["restarts"] == 1 and new_pid != rec.pid
        state = local.read_state(run_dir)
        assert state.federation is not None and state.federation.pid == new_pid and local.running(state)
        result = CliRunner().invoke(cli, ["restart", "nothing", "--run-dir", str(run_dir)])
        assert result.exit_code == 1 and "processes: federation" in result.output
    finally:
        procs.kill9(rec.pid)
        if new_pid:
            procs.stop(new_pid)


def test_supervisor_restarts_a_dead_process_with_backoff_and_not_after_down(tmp_path: Path) -> None:
    """Issue 10 item 7: a foreground 'meshfed up' starts a killed child again (backoff), counts it, and leaves
    processes stopped on purpose (held) or a run being stopped alone."""
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    run_dir = tmp_path / "run"
    recs = [procs.start(n, argv, log_path=run_dir / f"{n}.log") for n in ("federation", "east/sleep-east")]
    try:
        local.write_state(run_dir, state_from({"cwd": str(tmp_path), "clusters": {}, "processes": [
            {"name": r.name, "pid": r.pid, "argv": argv, "log": r.log, "start_time": r.start_time,
             "held": r.name == "east/sleep-east"} for r in recs]}))
        for r in recs:
            procs.kill9(r.pid)
            assert procs.stop(r.pid, timeout=5)
        sup = local.Supervisor(run_dir, initial_backoff=10.0)
        assert sup.tick(now=100.0) == ["federation"]  # the held one stays stopped
        first = local.read_state(run_dir).processes[0]
        assert first.restarts == 1 and local.is_running(first)
        procs.kill9(first.pid)
        assert procs.stop(first.pid, timeout=5)
        assert sup.tick(now=105.0) == []  # within the backoff
        assert sup.tick(now=111.0) == ["federation"]
        assert local.read_state(run_dir).processes[0].restarts == 2
        local.stop_run(run_dir)  # 'meshfed down': nothing is restarted any more
        assert sup.tick(now=1000.0) == [] and not local.running(local.read_state(run_dir))
    finally:
        left = local.read_state(run_dir, missing_ok=True)
        for p in left.processes if left is not None else ():
            procs.stop(p.pid)
