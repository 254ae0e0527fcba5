"""Child processes of a local run: started with their log under the run directory, recorded by pid and start time,
stopped by pid (SIGTERM, then SIGKILL), so `meshfed down` and a test fixture leave nothing running.

A pid alone does not name a process for long: once a recorded process has exited, the kernel may hand its pid to
an unrelated one. So :func:`start` records the process's start time (field 22 of ``/proc/<pid>/stat``, clock ticks
since boot, fixed for the life of the process and unchanged by ``exec``), and :func:`is_running` and :func:`stop`
with ``start_time`` act on a pid only while it still belongs to that same process."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("meshfed.procs")


@dataclass(frozen=True, slots=True)
class ProcRecord:
    """A started process as the run's state file records it."""

    name: str
    pid: int
    argv: tuple[str, ...]
    log: str
    start_time: int | None = None  # /proc/<pid>/stat starttime; None where /proc is not available
    env: Mapping[str, str] | None = None  # extra environment it was started with ('meshfed restart' replays it)
    restarts: int = 0  # how often 'meshfed restart' or the supervisor started it again
    restarted_at: float | None = None
    held: bool = False  # stopped on purpose: a supervisor leaves it stopped

    def json_omitted(self) -> tuple[str, ...]:
        """Only what a restart or a stop recorded (the file as a run writes it)."""
        return tuple(name for name, unset in (("env", self.env is None), ("restarts", not self.restarts),
                                              ("restarted_at", self.restarted_at is None),
                                              ("held", not self.held and self.restarted_at is None)) if unset)


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session, stdin from /dev/null, stdout and stderr appended to ``log_path``; the
    caller owns the returned process (test fixtures keep it to read its exit status)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as fh:
        return subprocess.Popen(
            list(argv),
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )


def start(
    name: str,
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ProcRecord:
    """Start ``argv`` in its own session (so Ctrl-C on the terminal does not reach it twice), output to a log."""
    popen = spawn(argv, log_path=log_path, env=env, cwd=cwd)
    log.info("started name=%s pid=%d argv0=%s", name, popen.pid, argv[0])
    return ProcRecord(name=name, pid=popen.pid, argv=tuple(argv), log=str(log_path), start_time=start_time(popen.pid))


def start_time(pid: int) -> int | None:
    """The start time of ``pid`` (clock ticks since boot), or None if there is no such process (or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the command name in parentheses may hold spaces
    try:
        return int(fields[19])  # field 22 of the whole line; fields[0] here is field 3 (state)
    except (IndexError, ValueError):
        return None


def is_running(pid: int, recorded_start: int | None) -> bool:
    """True while ``pid`` is alive and still the process that was recorded (same start time). Without a recorded
    start time (a state file from an older version) only liveness can be checked."""
    if not alive(pid):
        return False
    if recorded_start is None:
        return True
    return start_time(pid) == recorded_start


def alive(pid: int) -> bool:
    try:
        # Reap it if it is our child and has exited, so a zombie does not count as alive.
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def stop(pid: int, *, timeout: float = 10.0, start: int | None = None) -> bool:
    """Stop ``pid``: SIGTERM, wait up to ``timeout`` seconds, then SIGKILL. True if it is gone. With ``start`` (the
    recorded start time), a pid that belongs to another process is never signalled (it counts as gone), also when
    the pid is reused between the SIGTERM and the SIGKILL."""
    if not alive(pid):
        return True
    if not is_running(pid, start):
        log.warning("not signalling pid=%d: it is no longer the recorded process (pid reused)", pid)
        return True
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_running(pid, start):
            return True
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not is_running(pid, start):
            return True
        time.sleep(0.05)
    log.warning("process did not exit pid=%d", pid)
    return False


def kill9(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
