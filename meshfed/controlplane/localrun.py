"""How a control plane follows the files a local run (``meshfed up``) keeps writing while it runs: the runner
adds workloads (new tokens in ``tokens.json``) and starts or stops them (ports and readiness in ``runtime.json``).
The files' formats are read in :mod:`meshfed.controlplane.config`."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from discovery.model import Endpoint, Service
from gateway.auth import ProxyIdentity, TokenTableAuthenticator
from meshfed.controlplane.config import EndpointOverride, load_tokens

log = logging.getLogger("meshfed.controlplane")


def apply_runtime(services: Mapping[Any, Service], runtime: Mapping[str, EndpointOverride]) -> list[Service]:
    """The services with each endpoint's ports (and service account, and in a netns run its address) replaced from
    the local run's overrides."""
    if not runtime:
        return list(services.values())
    out: list[Service] = []
    for svc in services.values():
        endpoints: list[Endpoint] = []
        for ep in svc.endpoints:
            ov = runtime.get(ep.address)
            if ov is not None:
                ep = replace(ep, ports=ov.ports or ep.ports, service_account=ov.service_account or ep.service_account)
                if ov.address:
                    ep = replace(ep, address=ov.address)
                if ov.ready is not None:
                    ep = replace(ep, ready=ov.ready, serving=ov.ready)
            endpoints.append(ep)
        out.append(replace(svc, endpoints=tuple(endpoints)))
    return out


def file_mtime(path: Path | None) -> float:
    """When ``path`` last changed (0.0: no such file, or none configured), to notice the runner rewrote it."""
    try:
        return path.stat().st_mtime if path is not None else 0.0
    except OSError:
        return 0.0


@dataclass
class ReloadingTokens(TokenTableAuthenticator):
    """The token table, re-read when ``tokens.json`` changes (the runner adds workloads while we run). Each read
    replaces the whole table, so a token removed from the file stops working; a file that cannot be read keeps
    the previous table (and is logged), except at start, where it is an error."""

    path: Path | None = None
    stamp: tuple[int, int, int] = (0, 0, 0)  # (inode, size, mtime ns): the runner replaces the file atomically

    def __post_init__(self) -> None:
        super().__init__({})
        if self.path is not None and self.path.exists():
            self.stamp = self._stamp(self.path)
            self.reset(load_tokens(self.path))

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int, int]:
        st = path.stat()
        return st.st_ino, st.st_size, st.st_mtime_ns

    def reload(self) -> None:
        if self.path is None:
            return
        try:
            stamp = self._stamp(self.path)
        except FileNotFoundError:
            return
        if stamp == self.stamp:
            return
        self.stamp = stamp
        try:
            self.reset(load_tokens(self.path))
        except (OSError, ValueError) as exc:
            log.error("xds token table not reloaded, keeping the previous one: %s", exc)

    async def authenticate(self, *, metadata: Mapping[str, str]) -> ProxyIdentity:
        self.reload()
        return await super().authenticate(metadata=metadata)
