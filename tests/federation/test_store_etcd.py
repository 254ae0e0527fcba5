"""etcd-only behaviour: leases seen by every replica, endpoint failover, key prefixes, the raw key layout."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import aetcd

from discovery.model import ClusterId, ClusterInfo, NetworkId
from federation.records import EventKind, ExportSet, Member, StoreEvent
from federation.store.etcd import EtcdStore
from federation.store.factory import open_store
from tests.federation.conftest import EtcdServer
from tests.support.procs import free_port


def member(name: str, *, ttl: float, at: datetime) -> Member:
    info = ClusterInfo(id=ClusterId(name), network=NetworkId("net1"))
    return Member(info=info, registered_at=at, renewed_at=at, lease_ttl_s=ttl)


async def first(store: EtcdStore, *, after: int, match: object) -> StoreEvent:
    async def run() -> StoreEvent:
        async for e in store.watch(after=after):
            if match(e):  # type: ignore[operator]
                return e
        raise AssertionError("watch ended")

    return await asyncio.wait_for(run(), 20)


async def test_lease_expiry_reaches_every_replica_and_heartbeats_keep_it(etcd: EtcdServer) -> None:
    a = EtcdStore(endpoints=[etcd.endpoint])
    b = EtcdStore(endpoints=[etcd.endpoint])
    try:
        now = datetime.now(UTC)
        start = await a.put_member(member("east", ttl=2, at=now))
        await a.put_member(member("west", ttl=2, at=now))

        # Heartbeats from replica A keep "west" alive past its TTL while "east" (no heartbeats) expires.
        async def heartbeat() -> None:
            for _ in range(40):
                await a.renew(ClusterId("west"), now=datetime.now(UTC))
                await asyncio.sleep(0.5)

        beating = asyncio.create_task(heartbeat())
        try:
            gone = await first(b, after=start, match=lambda e: e.member is not None and e.member.unreachable_since)
        finally:
            beating.cancel()
        assert gone.cluster == "east" and gone.kind is EventKind.MEMBER
        assert gone.member is not None and gone.member.unreachable_since == now + timedelta(seconds=2)
        # Both replicas agree on the snapshot, and west is still reachable.
        sa, sb = await a.snapshot(), await b.snapshot()
        assert sa.members == sb.members
        states = {m.info.id: m.unreachable_since for m in sb.members}
        assert states[ClusterId("east")] is not None and states[ClusterId("west")] is None
        # The expiry event is in etcd's history: a replica that starts watching later still sees it.
        again = await first(a, after=start, match=lambda e: e.member is not None and e.member.unreachable_since)
        assert again.revision == gone.revision
        # Returning through replica B is seen by replica A.
        await b.renew(ClusterId("east"), now=datetime.now(UTC))
        back = await first(a, after=gone.revision, match=lambda e: e.cluster == "east")
        assert back.kind is EventKind.MEMBER and back.member is not None and back.member.unreachable_since is None
    finally:
        await a.close()
        await b.close()


async def test_member_lease_is_an_etcd_lease_on_the_alive_key(etcd: EtcdServer) -> None:
    store = EtcdStore(endpoints=[etcd.endpoint], prefix="/t1/")
    client = aetcd.Client(host=etcd.host, port=etcd.port)
    try:
        await store.put_member(member("east", ttl=30, at=datetime.now(UTC)))
        alive = await client.get(b"/t1/alive/east")
        assert alive is not None and alive.lease != 0
        info = await client.get_lease_info(alive.lease)
        assert 0 < info.TTL <= 30 and info.grantedTTL == 30
        assert [bytes(k) for k in info.keys] == [b"/t1/alive/east"]
        # Removing the member revokes the lease and deletes every key of the member.
        await store.remove_member(ClusterId("east"))
        assert (await client.get_lease_info(alive.lease)).TTL == -1
        assert not await client.get_prefix(b"/t1/")
    finally:
        await client.close()
        await store.close()


async def test_prefixes_isolate_federations_on_one_etcd(etcd: EtcdServer) -> None:
    a = open_store(f"{etcd.store_url}/fed-a")
    b = open_store(f"{etcd.store_url}/fed-b")
    try:
        now = datetime.now(UTC)
        await a.put_member(member("east", ttl=60, at=now))
        await a.put_exports(ExportSet(ClusterId("east"), 1, ()))
        snap_b = await b.snapshot()
        assert snap_b.members == () and snap_b.exports == ()
        assert [m.info.id for m in (await a.snapshot()).members] == ["east"]
    finally:
        await a.close()
        await b.close()


async def test_a_dead_endpoint_fails_over_to_the_next(etcd: EtcdServer) -> None:
    dead = ("127.0.0.1", free_port())
    store = open_store(f"etcd://{dead[0]}:{dead[1]},{etcd.host}:{etcd.port}")
    try:
        revision = await store.put_member(member("east", ttl=60, at=datetime.now(UTC)))
        assert revision > 0
        assert isinstance(store, EtcdStore) and store.endpoint == f"{etcd.host}:{etcd.port}"
        assert [m.info.id for m in (await store.snapshot()).members] == ["east"]
    finally:
        await store.close()
