"""The federation's current :class:`PeerSnapshot` and a way to wait for the next one (what the member API serves in
``GET /v1/catalog`` and streams as ``peers`` lines on the watch). The peer manager publishes into it; a publish with
the same content as the current snapshot changes nothing (no new version, no wake-up)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from typing import Any

from federation.peering.records import EMPTY, PeerBundleView, PeerService, PeerSnapshot


class PeerHub:
    def __init__(self) -> None:
        self.snapshot: PeerSnapshot = EMPTY
        self._changed = asyncio.Condition()
        # What `GET /v1/peers` answers (set by the peer manager; [] without peers).
        self.status: Callable[[], list[dict[str, Any]]] = list

    async def publish(self, bundles: Mapping[str, PeerBundleView], services: tuple[PeerService, ...]) -> bool:
        """Make ``bundles`` and ``services`` the current snapshot; True if that changed anything."""
        new = PeerSnapshot(version=self.snapshot.version + 1, bundles=dict(bundles), services=services)
        if new.same_content(self.snapshot):
            return False
        self.snapshot = new
        async with self._changed:
            self._changed.notify_all()
        return True

    async def wait_changed(self, version: int, *, wait_s: float) -> bool:
        """Wait until the snapshot's version differs from ``version`` (True) or ``wait_s`` passes (False)."""
        if self.snapshot.version != version:
            return True
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(lambda: self.snapshot.version != version), wait_s)
        return self.snapshot.version != version
