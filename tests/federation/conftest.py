"""Federation test fixtures: a real etcd process on free loopback ports; a PKI per module (``pki``); the memory and
SQLite stores in turn (``store``).

``etcd`` (function scope) yields an :class:`EtcdServer`: ``client_url`` (``http://127.0.0.1:PORT``),
``store_url`` (``etcd://127.0.0.1:PORT``, what ``open_store`` and ``--store`` take), ``host``/``port``, and
``stop()``/``start()``/``restart()``/``kill9()`` to exercise outages; the process is stopped by pid at teardown.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from federation.store.memory import MemoryStore
from federation.store.sqlite import SqliteStore
from tests.federation.fedkit import Pki
from tests.support.procs import Proc, etcd_binary, free_port, port_open, wait_for


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki.create()


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    s: Any = MemoryStore(reap_interval_s=0.2) if request.param == "memory" else \
        SqliteStore(str(tmp_path / "fed.db"), reap_interval_s=0.2)
    yield s
    await s.close()


class EtcdServer:
    """One single-node etcd on loopback with its own data dir; restartable on the same dir and ports."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.peer_port = free_port(self.host)
        while self.peer_port == self.port:
            self.peer_port = free_port(self.host)
        self.proc: Proc | None = None
        self.starts = 0

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def store_url(self) -> str:
        return f"etcd://{self.host}:{self.port}"

    @property
    def endpoint(self) -> tuple[str, int]:
        return (self.host, self.port)

    def argv(self) -> list[str]:
        peer = f"http://{self.host}:{self.peer_port}"
        return [
            etcd_binary(),
            "--name", "default",
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"default={peer}",
        ]

    def start(self) -> None:
        assert self.proc is None or not self.proc.alive(), "etcd already running"
        self.starts += 1
        self.proc = Proc(self.argv(), log=self.root / f"etcd.{self.starts}.log")
        proc = self.proc

        def ready() -> bool:
            if not proc.alive():
                raise RuntimeError(f"etcd exited during start:\n{proc.output()[-3000:]}")
            return port_open(self.host, self.port)

        wait_for(ready, timeout=30, what=f"etcd on {self.client_url}")
        # The port opens a moment before etcd serves: wait until it has elected itself and answers a request.
        self._wait_serving()

    def _wait_serving(self) -> None:
        import json
        import urllib.request

        deadline = time.monotonic() + 30
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.client_url}/health", timeout=2) as resp:
                    if json.loads(resp.read()).get("health") in ("true", True):
                        return
            except Exception as exc:  # retried within the deadline
                last = exc
            time.sleep(0.05)
        raise TimeoutError(f"etcd on {self.client_url} not healthy after 30s: {last}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def kill9(self) -> None:
        if self.proc is not None:
            self.proc.kill9()
            self.proc.stop()

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path / "etcd")
    server.root.mkdir(parents=True, exist_ok=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()
