"""The push debouncer: merging, quiet period, maximum delay, and pushes reaching only changed proxies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from gateway.ads import AdsServer
from gateway.cache import SnapshotCache
from gateway.push import PushDebouncer, PushRequest
from gateway.snapshot import CLUSTER
from tests.gateway.xds_client import SotwClient, names_of, snapshot


async def test_requests_in_the_quiet_period_merge_into_one_push() -> None:
    seen: list[PushRequest] = []

    async def regenerate(req: PushRequest) -> None:
        seen.append(req)

    async with PushDebouncer(regenerate=regenerate, quiet=0.2, max_delay=5.0) as pushes:
        pushes.submit(PushRequest(proxies=frozenset({"p1"}), reasons=frozenset({"endpoints"})))
        pushes.submit(PushRequest(services=frozenset({"reviews.default"}), reasons=frozenset({"export"})))
        pushes.submit(PushRequest(proxies=frozenset({"p2"})))
        async with asyncio.timeout(10):
            await pushes.flush()
    assert len(seen) == 1
    merged = seen[0]
    assert merged.proxies == {"p1", "p2"} and merged.services == {"reviews.default"} and not merged.full
    assert merged.reasons == {"endpoints", "export"} and merged.count == 3


async def test_max_delay_bounds_a_steady_trickle() -> None:
    seen: list[PushRequest] = []

    async def regenerate(req: PushRequest) -> None:
        seen.append(req)

    async with PushDebouncer(regenerate=regenerate, quiet=0.3, max_delay=0.6) as pushes:
        # a request every 0.05 s never leaves a 0.3 s quiet period; only max_delay lets pushes out meanwhile
        for i in range(40):
            pushes.submit(PushRequest(proxies=frozenset({f"p{i}"})))
            await asyncio.sleep(0.05)
        pushes_while_busy = len(seen)
        async with asyncio.timeout(10):
            await pushes.flush()
    assert pushes_while_busy >= 1
    assert sum(r.count for r in seen) == 40
    assert set().union(*(r.proxies for r in seen)) == {f"p{i}" for i in range(40)}


async def test_full_wins_and_failures_do_not_stop_the_updater() -> None:
    seen: list[PushRequest] = []

    async def regenerate(req: PushRequest) -> None:
        seen.append(req)
        if len(seen) == 1:
            raise RuntimeError("generator broke")

    async with PushDebouncer(regenerate=regenerate, quiet=0.05, max_delay=1.0) as pushes:
        pushes.submit(PushRequest(proxies=frozenset({"a"})))
        async with asyncio.timeout(10):
            await pushes.flush()
        pushes.submit(PushRequest(proxies=frozenset({"a"})))
        pushes.submit(PushRequest(full=True))
        async with asyncio.timeout(10):
            await pushes.flush()
    assert len(seen) == 2 and seen[1].full


def test_bad_knobs_are_refused() -> None:
    async def regenerate(req: PushRequest) -> None:
        return None

    with pytest.raises(ValueError, match="quiet"):
        PushDebouncer(regenerate=regenerate, quiet=2.0, max_delay=1.0)


@pytest.fixture
async def served() -> AsyncIterator[tuple[SnapshotCache, AdsServer, grpc.aio.Channel]]:
    cache = SnapshotCache()
    async with AdsServer(cache=cache, authenticator=None) as srv:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}")
        try:
            yield cache, srv, channel
        finally:
            await channel.close()


async def test_a_push_reaches_only_proxies_whose_snapshot_changed(served) -> None:
    cache, srv, channel = served
    world = {"reviews": (1,), "ratings": (2,)}
    watching = {  # proxy -> services it is configured for
        "sidecar~10.0.0.1~a.default~default.svc.cluster.local": {"reviews"},
        "sidecar~10.0.0.2~b.default~default.svc.cluster.local": {"ratings"},
    }

    def build(node: str) -> None:
        cache.set_snapshot(node, snapshot({s: world[s] for s in watching[node]}))

    async def regenerate(req: PushRequest) -> None:
        for node in (watching if req.full else req.proxies):
            build(node)  # every proxy named is regenerated; the cache decides who actually gets a push

    for node in watching:
        build(node)
    node_a, node_b = list(watching)
    ca, cb = SotwClient(channel, node_a, None), SotwClient(channel, node_b, None)
    for c in (ca, cb):
        await c.request(CLUSTER)
        await c.ack(await c.recv())
    async with PushDebouncer(regenerate=regenerate, quiet=0.05, max_delay=0.5) as pushes:
        world["reviews"] = (7,)
        watching[node_a] = {"reviews", "details"}
        world["details"] = (3,)
        before = srv.stats.sotw_responses
        pushes.submit(PushRequest(full=True, reasons=frozenset({"endpoints"})))
        ra = await ca.recv()
        assert names_of(ra) == ["details", "reviews"]
        assert pushes.pushes == 1
        # B was regenerated too but its content did not change: the next thing it sees is a real change
        watching[node_b] = {"ratings", "reviews"}
        pushes.submit(PushRequest(proxies=frozenset({node_b})))
        rb = await cb.recv()
        assert names_of(rb) == ["ratings", "reviews"]
        assert srv.stats.sotw_responses - before == 2
    await ca.close()
    await cb.close()
