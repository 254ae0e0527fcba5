"""Agents against a real service on SQLite: propagation both ways into the registry, three clusters, lease expiry
withdrawing and return restoring, a federation outage withdrawing nothing, and kill -9 of the service process
mid-stream with no acknowledged export lost."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from discovery.model import ClusterId, Registry
from federation import catalog as cat
from federation.agent import AgentConfig, apply_catalog
from federation.service import ServiceConfig, state_of
from federation.store.sqlite import SqliteStore
from tests.federation.fedkit import (
    Pki,
    ServiceProcess,
    agent,
    eventually,
    has,
    in_process,
    key,
    lacks,
    publish_growing,
    snapshot,
)

pytestmark = pytest.mark.timeout(120)


async def test_two_agents_propagate_both_ways_into_registry(pki: Pki, tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "fed.db"))
    try:
        async with in_process(pki, store) as (url, _app), agent(pki, "east", url) as east, \
                agent(pki, "west", url) as west:
            east.publish(*snapshot("east", ["reviews"], addr_base=1))
            west.publish(*snapshot("west", ["ratings"], addr_base=2))
            async with asyncio.timeout(20):
                await west.wait_for(has("east", "reviews"))
                # east's catalog must hold both exports: the publishes may be merged in either order, so a catalog
                # that already has west's ratings can still predate east's own reviews
                await east.wait_for(lambda c: has("west", "ratings")(c) and has("east", "reviews")(c))
            registry = east.apply(Registry(local=ClusterId("east")))
            remote = registry.remote[ClusterId("west")][key("ratings")]
            assert remote.gateway_host == "127.0.0.1" and remote.ready == 1
            assert [e.address for e in remote.endpoints] == ["10.2.0.1"]  # same network: pod addresses
            assert ClusterId("east") not in registry.remote  # our own services are not remote
            assert set(registry.imports) == {key("reviews"), key("ratings")}
            assert registry.clusters[ClusterId("west")].network == "net1"
            # A change replaces the shard; withdrawing an export removes it elsewhere.
            west.publish(*snapshot("west", ["details"], addr_base=2))
            async with asyncio.timeout(20):
                await east.wait_for(lambda c: has("west", "details")(c) and lacks("west", "ratings")(c))
            registry = east.apply(registry)
            assert set(registry.remote[ClusterId("west")]) == {key("details")}
            # The agent's incremental apply equals applying the whole catalog to an empty registry.
            assert east.catalog is not None
            whole = apply_catalog(Registry(local=ClusterId("east")), east.catalog)
            mine = {c: dict(v) for c, v in registry.remote.items() if v}
            assert mine == {c: dict(v) for c, v in whole.remote.items()}
            assert dict(registry.imports) == dict(whole.imports) and dict(registry.clusters) == dict(whole.clusters)
            assert east.apply(registry) is registry  # nothing new: nothing replaced
    finally:
        await store.close()


async def test_three_agents_lease_expiry_and_return(pki: Pki, tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "fed.db"), reap_interval_s=0.2)
    config = ServiceConfig(lease_ttl_s=1.0, bookmark_interval_s=0.5)
    try:
        async with in_process(pki, store, config=config) as (url, _app), agent(pki, "east", url) as east, \
                agent(pki, "west", url, network="net2") as west:
            async with agent(pki, "north", url) as north:
                north.publish(*snapshot("north", ["inventory"], addr_base=3))
                async with asyncio.timeout(20):
                    await east.wait_for(has("north", "inventory"))
                    await west.wait_for(has("north", "inventory"))
                west_view = west.catalog
                assert west_view is not None
                shard = west_view.services[key("inventory")].shard(ClusterId("north"))
                assert shard is not None and shard.endpoints == ()  # other network: summary only
            # north's agent is gone: no heartbeats, the lease expires, its export is withdrawn everywhere.
            async with asyncio.timeout(20):
                c = await east.wait_for(lacks("north", "inventory"))
                await west.wait_for(lacks("north", "inventory"))
            assert c.members[ClusterId("north")].unreachable_since is not None
            # It comes back: its exports are restored from the store without publishing again.
            async with agent(pki, "north", url):
                async with asyncio.timeout(20):
                    c = await east.wait_for(has("north", "inventory"))
                    await west.wait_for(has("north", "inventory"))
                assert c.members[ClusterId("north")].unreachable_since is None
    finally:
        await store.close()


@pytest.mark.parametrize("backoff", [
    AgentConfig(backoff_initial_s=0.05, backoff_max_s=0.5),
    # The defaults a control plane runs with: after an outage of several lease TTLs the agents' retry backoff has
    # grown past the lease TTL. The restarted federation renews every lease that was alive (grace), but an agent
    # whose next retry came later than one TTL after that lost its lease: its exports were withdrawn, then restored
    # at its next heartbeat (east's sidecar answered 404/503 for west's ratings for that moment).
    AgentConfig(),
], ids=["fast-backoff", "default-backoff"])
async def test_federation_outage_withdraws_nothing(pki: Pki, tmp_path: Path, backoff: AgentConfig,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="meshfed.federation.store")
    db = str(tmp_path / "fed.db")
    config = ServiceConfig(lease_ttl_s=1.0, bookmark_interval_s=0.5)
    withdrawals: list[str] = []

    def watch_for_withdrawal(c: cat.Catalog) -> None:
        if not has("west", "ratings")(c) and seen_once:
            withdrawals.append(f"revision {c.revision}")

    seen_once = False
    store = SqliteStore(db, reap_interval_s=0.2)
    port_holder: dict[str, Any] = {}
    async with in_process(pki, store, config=config) as (url, _app):
        port_holder["url"] = url
    await store.close()
    url = port_holder["url"]
    port = int(url.rsplit(":", 1)[1])
    from federation.service import create_app, serve

    async def service() -> Any:
        s = SqliteStore(db, reap_interval_s=0.2)
        app = create_app(store=s, bundle=lambda: pki.bundle, config=config)
        return s, serve(app, host="127.0.0.1", port=port, ssl_context=pki.server_ssl(), shutdown_timeout=0.2)

    s1, running = await service()
    await running.__aenter__()
    async with agent(pki, "east", url, config=backoff) as east, agent(pki, "west", url, config=backoff) as west:
        west.publish(*snapshot("west", ["ratings"]))
        async with asyncio.timeout(20):
            await east.wait_for(has("west", "ratings"))
        seen_once = True
        east.on_update = watch_for_withdrawal  # every later catalog east applies is checked
        await running.__aexit__(None, None, None)
        await s1.close()
        # The federation is down for several lease TTLs; both agents keep trying.
        await asyncio.sleep(4.0)
        assert east.catalog is not None and has("west", "ratings")(east.catalog)
        reconnects = east.reconnects
        assert reconnects > 0
        caplog.clear()
        s2, running = await service()
        await running.__aenter__()
        try:
            east.publish(*snapshot("east", ["reviews"]))
            # Bounds only a hung test: the restarted service, both agents and SQLite's threads share this process,
            # and on a loaded 2-core machine a reconnect can wait out a request timeout (5 s) more than once.
            async with asyncio.timeout(60):
                await west.wait_for(has("east", "reviews"))
                await east.wait_for(lambda c: c.revision > 0 and east.connected)
            # Leases renewed by the restart's grace run out one TTL later unless the agents heartbeat in time:
            # watch a few TTLs for a withdrawal.
            await asyncio.sleep(3 * config.lease_ttl_s)
            assert has("west", "ratings")(east.catalog) if east.catalog else False
        finally:
            await running.__aexit__(None, None, None)
            await s2.close()
    assert withdrawals == []
    # East's watch may have been away while a lease lapsed and came back (both in one batch): the store's own log
    # says whether the restarted federation let a live member's lease run out.
    expired = [r.getMessage() for r in caplog.records if "lease expired" in r.getMessage()]
    assert expired == [], expired


async def test_kill9_service_loses_no_acknowledged_export(pki: Pki, tmp_path: Path) -> None:
    svc = ServiceProcess(pki, tmp_path, f"sqlite:{tmp_path / 'fed.db'}", lease_ttl=3.0)
    svc.start()
    try:
        config = AgentConfig(backoff_initial_s=0.05, backoff_max_s=0.3)
        async with agent(pki, "east", svc.url, config=config) as east, \
                agent(pki, "west", svc.url, config=config) as west:
            acked: list[int] = []
            task = asyncio.create_task(publish_growing(east, "east", rounds=40, ack_within=0.3, acked=acked))
            await eventually(lambda: len(acked) >= 5, within=20, what="first publishes acknowledged")
            svc.kill9()
            killed_after = list(acked)
            await asyncio.sleep(0.5)
            svc.start()
            await asyncio.wait_for(task, 60)
            assert east.acknowledged is not None
            last = east.acknowledged
            # Everything acknowledged before the kill (and after) is in what west ends up seeing.
            async with asyncio.timeout(30):
                c = await west.wait_for(lambda c: all(has("east", f"svc{i}")(c) for i in range(40)))
            for i in killed_after:
                assert has("east", f"svc{i}")(c)
            assert len(last.services) == 40
            assert west.reconnects > 0 and east.reconnects > 0  # both really lost the stream and resumed
    finally:
        svc.stop()


async def test_agent_apply_drops_departed_cluster(pki: Pki, tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "fed.db"))
    try:
        async with in_process(pki, store) as (url, app), agent(pki, "east", url) as east:
            async with agent(pki, "west", url) as west:
                west.publish(*snapshot("west", ["ratings"]))
                async with asyncio.timeout(20):
                    await east.wait_for(has("west", "ratings"))
                registry = east.apply(Registry(local=ClusterId("east")))
                assert key("ratings") in registry.remote[ClusterId("west")]
            async with pki.client("west", url) as leaving:
                await leaving.deregister()
            async with asyncio.timeout(20):
                c = await east.wait_for(lambda c: ClusterId("west") not in c.members)
            registry = east.apply(registry)
            assert registry.remote[ClusterId("west")] == {} and key("ratings") not in registry.imports
            assert state_of(app).catalog.services == c.services
    finally:
        await store.close()


async def test_failing_update_callback_does_not_stop_the_agent(pki: Pki, tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "fed.db"))
    calls: list[int] = []

    def broken(c: cat.Catalog) -> None:
        calls.append(c.revision)
        raise RuntimeError("consumer bug")

    try:
        async with in_process(pki, store) as (url, _app), agent(pki, "east", url) as east, \
                agent(pki, "west", url) as west:
            east.on_update = broken
            west.publish(*snapshot("west", ["one"]))
            async with asyncio.timeout(20):
                await east.wait_for(has("west", "one"))
            west.publish(*snapshot("west", ["one", "two"]))
            async with asyncio.timeout(20):
                await east.wait_for(has("west", "two"))
            assert len(calls) >= 2
    finally:
        await store.close()
