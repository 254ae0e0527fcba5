"""Agents against two service replicas (``meshfed federation serve`` processes) over one real etcd: the replicas
agree, propagation crosses replicas both ways, a lease expiry seen through one replica withdraws everywhere, and
kill -9 of a replica moves its agent to the other without losing an acknowledged export."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from discovery.model import ClusterId
from federation.agent import AgentConfig
from tests.federation.fedkit import Pki, ServiceProcess, agent, eventually, has, key, lacks, publish_growing, snapshot

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


@pytest.fixture
def replicas(pki: Pki, tmp_path: Path, etcd: Any) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    a = ServiceProcess(pki, tmp_path, etcd.store_url, lease_ttl=2.0, name="replica-a")
    b = ServiceProcess(pki, tmp_path, etcd.store_url, lease_ttl=2.0, name="replica-b")
    a.start()
    b.start()
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


async def test_two_replicas_agree_and_propagate_across(pki: Pki, replicas: tuple[ServiceProcess, ServiceProcess]
                                                       ) -> None:
    a, b = replicas
    async with agent(pki, "east", a.url) as east, agent(pki, "west", b.url) as west:
        east.publish(*snapshot("east", ["reviews"], addr_base=1))
        west.publish(*snapshot("west", ["ratings"], addr_base=2))
        async with asyncio.timeout(30):
            await west.wait_for(has("east", "reviews"))
            await east.wait_for(has("west", "ratings"))
        # Both replicas serve the same catalog at the same revision.
        async with pki.client("north", a.url) as via_a, pki.client("north", b.url) as via_b:
            for _ in range(100):
                la, lb = await via_a.catalog(), await via_b.catalog()
                if la.catalog.revision == lb.catalog.revision:
                    break
                await asyncio.sleep(0.1)
            assert la.catalog.revision == lb.catalog.revision
            assert la.catalog.services == lb.catalog.services
            assert set(la.catalog.services) == {key("reviews"), key("ratings")}
            ips = {k: s.import_.ips for k, s in la.catalog.services.items()}
            assert ips == {k: s.import_.ips for k, s in lb.catalog.services.items()}


async def test_lease_expiry_through_etcd_withdraws_and_return_restores(
        pki: Pki, replicas: tuple[ServiceProcess, ServiceProcess]) -> None:
    a, b = replicas
    async with agent(pki, "east", b.url) as east:
        async with agent(pki, "north", a.url) as north:
            north.publish(*snapshot("north", ["inventory"], addr_base=3))
            async with asyncio.timeout(30):
                await east.wait_for(has("north", "inventory"))
        async with asyncio.timeout(30):
            c = await east.wait_for(lacks("north", "inventory"))
        assert c.members[ClusterId("north")].unreachable_since is not None
        async with agent(pki, "north", a.url):
            async with asyncio.timeout(30):
                c = await east.wait_for(has("north", "inventory"))
        assert c.members[ClusterId("north")].unreachable_since is None


async def test_kill9_replica_agent_fails_over(pki: Pki, replicas: tuple[ServiceProcess, ServiceProcess]) -> None:
    a, b = replicas
    config = AgentConfig(backoff_initial_s=0.05, backoff_max_s=0.3)
    async with agent(pki, "east", [a.url, b.url], config=config) as east, \
            agent(pki, "west", [b.url, a.url], config=config) as west:
        acked: list[int] = []
        task = asyncio.create_task(publish_growing(east, "east", rounds=30, ack_within=0.5, acked=acked))
        await eventually(lambda: len(acked) >= 5, within=30, what="first publishes acknowledged")
        a.kill9()
        before = list(acked)
        await asyncio.wait_for(task, 90)
        async with asyncio.timeout(30):
            c = await west.wait_for(lambda c: all(has("east", f"svc{i}")(c) for i in range(30)))
        for i in before:
            assert has("east", f"svc{i}")(c)
        assert east.client.url == b.url and east.reconnects > 0


async def test_etcd_restart_loses_nothing(pki: Pki, replicas: tuple[ServiceProcess, ServiceProcess],
                                          etcd: Any) -> None:
    a, _b = replicas
    async with agent(pki, "east", a.url) as east, agent(pki, "west", a.url) as west:
        gen = east.publish(*snapshot("east", ["reviews"]))
        async with asyncio.timeout(30):
            await east.wait_published(gen)
        etcd.restart()
        gen = east.publish(*snapshot("east", ["reviews", "details"]))
        async with asyncio.timeout(60):
            await east.wait_published(gen)
            await west.wait_for(lambda c: has("east", "reviews")(c) and has("east", "details")(c))


async def test_federation_outage_on_etcd_withdraws_nothing(pki: Pki,
                                                           replicas: tuple[ServiceProcess, ServiceProcess]) -> None:
    a, b = replicas
    withdrawn: list[int] = []
    armed = False

    def check(c: Any) -> None:
        if armed and not has("west", "ratings")(c):
            withdrawn.append(c.revision)

    async with agent(pki, "east", [a.url, b.url]) as east, agent(pki, "west", [b.url, a.url]) as west:
        west.publish(*snapshot("west", ["ratings"]))
        async with asyncio.timeout(30):
            await east.wait_for(has("west", "ratings"))
        armed = True
        east.on_update = check
        # Every replica down for more than twice the lease TTL: etcd expires the leases meanwhile.
        a.kill9()
        b.kill9()
        await asyncio.sleep(5.0)
        assert east.catalog is not None and has("west", "ratings")(east.catalog)
        a.start()
        b.start()
        east.publish(*snapshot("east", ["reviews"]))
        async with asyncio.timeout(60):
            await west.wait_for(has("east", "reviews"))
            c = await east.wait_for(lambda c: c.members[ClusterId("west")].unreachable_since is None
                                    and has("west", "ratings")(c))
        assert c.members[ClusterId("west")].unreachable_since is None
    assert withdrawn == []


async def test_readyz_follows_the_store(pki: Pki, replicas: tuple[ServiceProcess, ServiceProcess], etcd: Any) -> None:
    a, _b = replicas
    ctx = pki.client_ssl("east")

    async def ready() -> int:
        async with aiohttp.ClientSession() as http, http.get(f"{a.url}/readyz", ssl=ctx) as resp:
            return resp.status

    for _ in range(100):
        if await ready() == 200:
            break
        await asyncio.sleep(0.1)
    assert await ready() == 200
    etcd.stop()
    try:
        for _ in range(100):
            if await ready() == 503:
                break
            await asyncio.sleep(0.1)
        assert await ready() == 503
    finally:
        etcd.start()
    for _ in range(200):
        if await ready() == 200:
            break
        await asyncio.sleep(0.1)
    assert await ready() == 200
