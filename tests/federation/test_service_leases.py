"""Heartbeats show in the catalog (issue 10, item 7): ``renewedAt``/``leaseAgeSeconds`` of ``GET /v1/catalog``
follow each heartbeat, watch bookmarks carry every member's last renewal, and an agent's catalog follows them,
on the memory and SQLite stores (the etcd store's ``leases()`` is in the store contract test)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from discovery.model import ClusterId
from federation import wire
from federation.agent import AgentConfig
from federation.service import ServiceConfig
from tests.federation.fedkit import Pki, agent, eventually, in_process, info

pytestmark = pytest.mark.timeout(90)


CONFIG = ServiceConfig(lease_ttl_s=30.0, bookmark_interval_s=0.3)


async def test_catalog_renewed_at_follows_heartbeats(pki: Pki, store: Any) -> None:
    async with in_process(pki, store, config=CONFIG) as (url, _app), pki.client("east", url) as east, \
            pki.client("west", url) as west:
        registered = await east.register(info("east"))
        await west.register(info("west"))
        last = registered
        for _ in range(3):
            await asyncio.sleep(0.2)
            last = await east.heartbeat()
        assert last.renewed_at > registered.renewed_at
        # west sees east's last heartbeat in the catalog, not the registration time.
        async with aiohttp.ClientSession() as http, http.get(url + "/v1/catalog", ssl=pki.client_ssl("west")) as r:
            doc = await r.json()
        members = {m["cluster"]: m for m in doc["members"]}
        assert members["east"]["renewedAt"] == wire.time_json(last.renewed_at)
        assert members["east"]["leaseAgeSeconds"] < members["east"]["leaseTtlSeconds"]
        listing = await west.catalog()
        assert listing.catalog.members[ClusterId("east")].renewed_at == last.renewed_at


async def test_watch_bookmarks_carry_renewals(pki: Pki, store: Any) -> None:
    async with in_process(pki, store, config=CONFIG) as (url, _app), pki.client("east", url) as east, \
            pki.client("west", url) as west:
        await east.register(info("east"))
        await west.register(info("west"))
        start = (await west.catalog()).catalog.revision
        beat = await east.heartbeat()
        seen: list[dict[str, Any]] = []
        async with aiohttp.ClientSession() as http, http.get(
                f"{url}/v1/catalog/watch?revision={start}", ssl=pki.client_ssl("west")) as resp:
            async with asyncio.timeout(20):
                async for line in resp.content:
                    obj = json.loads(line)
                    if obj["type"] == "bookmark" and "leases" in obj:
                        seen.append(obj)
                        if obj["leases"].get("east") == wire.time_json(beat.renewed_at):
                            break
        assert wire.bookmark_leases_from_json(seen[-1])[ClusterId("east")] == beat.renewed_at


async def test_agent_catalog_follows_other_members_heartbeats(pki: Pki, store: Any) -> None:
    config = AgentConfig(heartbeat_interval_s=0.2, backoff_initial_s=0.05, backoff_max_s=0.5)
    async with in_process(pki, store, config=CONFIG) as (url, _app), \
            agent(pki, "east", url, config=config) as east, agent(pki, "west", url, config=config) as west:
        async with asyncio.timeout(20):
            await east.registered.wait()
            await west.registered.wait()
        await eventually(lambda: west.catalog is not None and ClusterId("east") in west.catalog.members, within=20)
        assert west.catalog is not None
        first = west.catalog.members[ClusterId("east")].renewed_at
        # Heartbeats make no revision; bookmarks carry them into west's catalog anyway, several times over.
        moved: set[object] = set()

        def renewed() -> bool:
            assert west.catalog is not None
            moved.add(west.catalog.members[ClusterId("east")].renewed_at)
            return len(moved - {first}) >= 3

        await eventually(renewed, within=30, what="east's renewals in west's catalog")
        # ... and its own heartbeats in its own catalog.
        own = set()

        def own_renewed() -> bool:
            assert east.catalog is not None
            own.add(east.catalog.members[ClusterId("east")].renewed_at)
            return len(own) >= 3

        await eventually(own_renewed, within=30, what="east's own renewals in its catalog")
