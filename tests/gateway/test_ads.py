"""The ADS server against grpc.aio clients using the generated Envoy stubs: nonces, ACK/NACK, subscriptions,
delta, reconnects and authentication."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from gateway.ads import AdsServer, InflightBudget
from gateway.auth import ProxyIdentity, TokenTableAuthenticator, make_node_id
from gateway.cache import SnapshotCache, SyncState
from gateway.snapshot import CLUSTER, ENDPOINT
from tests.gateway.xds_client import DeltaClient, SotwClient, names_of, snapshot

NODE_A = make_node_id(kind="sidecar", ip="10.0.0.1", pod="a-1", namespace="shop")
NODE_B = make_node_id(kind="sidecar", ip="10.0.0.2", pod="b-1", namespace="shop")
NODE_OTHER = make_node_id(kind="sidecar", ip="10.0.0.3", pod="x-1", namespace="other")
SHOP = ProxyIdentity(namespace="shop", service_account="web", cluster="east")
OTHER = ProxyIdentity(namespace="other", service_account="x", cluster="east")


@pytest.fixture
def auth() -> TokenTableAuthenticator:
    return TokenTableAuthenticator()


@pytest.fixture
async def env(auth: TokenTableAuthenticator) -> AsyncIterator[tuple[SnapshotCache, AdsServer, grpc.aio.Channel]]:
    cache = SnapshotCache()
    async with AdsServer(cache=cache, authenticator=auth, host="127.0.0.1", port=0) as srv:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}")
        try:
            yield cache, srv, channel
        finally:
            await channel.close()


async def test_sotw_ack_flow_with_nonces_and_status(env, auth) -> None:
    cache, _, channel = env
    token = auth.issue(SHOP)
    s1 = snapshot({"a": (1,), "b": (2,)})
    cache.set_snapshot(NODE_A, s1)
    client = SotwClient(channel, NODE_A, token)
    await client.request(CLUSTER)  # empty names: wildcard
    r1 = await client.recv()
    assert r1.version_info == s1.version(CLUSTER)
    assert names_of(r1) == ["a", "b"] and r1.nonce
    st = cache.status_of(NODE_A, CLUSTER)
    assert st is not None and st.state == SyncState.STALE and st.sent_nonce == r1.nonce and st.acked_version == ""
    await client.ack(r1)
    await client.request(ENDPOINT, ["a"])  # requests are handled in order: once EDS is answered, the ACK was seen
    r_eds = await client.recv()
    assert r_eds.type_url == ENDPOINT and names_of(r_eds) == ["a"]
    st = cache.status_of(NODE_A, CLUSTER)
    assert st is not None and st.state == SyncState.SYNCED and st.acked_version == r1.version_info
    s2 = snapshot({"a": (1,), "b": (2,), "c": (3,)})
    assert cache.set_snapshot(NODE_A, s2)
    r2 = await client.recv()
    assert r2.version_info == s2.version(CLUSTER) != r1.version_info
    assert r2.nonce != r1.nonce and names_of(r2) == ["a", "b", "c"]
    st = cache.status_of(NODE_A, CLUSTER)
    assert st is not None and st.acked_version == r1.version_info and st.state == SyncState.STALE
    await client.ack(r2)
    await client.request(ENDPOINT, ["a", "c"])
    r3 = await client.recv()
    assert r3.type_url == ENDPOINT and names_of(r3) == ["a", "c"]
    st = cache.status_of(NODE_A, CLUSTER)
    assert st is not None and st.state == SyncState.SYNCED and st.acked_version == s2.version(CLUSTER)
    await client.close()


async def test_nack_keeps_last_good_records_error_and_does_not_resend(env, auth) -> None:
    cache, _, channel = env
    token = auth.issue(SHOP)
    good = snapshot({"a": (1,)})
    cache.set_snapshot(NODE_A, good)
    client = SotwClient(channel, NODE_A, token)
    await client.request(CLUSTER)
    r1 = await client.recv()
    await client.ack(r1)
    await client.request(ENDPOINT, ["a"])  # answered after the ACK before it was handled
    await client.recv()
    bad = snapshot({"a": (1,), "bad": (2,)})
    cache.set_snapshot(NODE_A, bad)
    r2 = await client.recv()
    assert r2.version_info == bad.version(CLUSTER)
    # Envoy's NACK: the last good version, the rejected response's nonce, and the error text
    await client.request(CLUSTER, version=r1.version_info, nonce=r2.nonce, error="cluster 'bad': invalid thing")
    await client.request(ENDPOINT, ["a", "bad"])  # answered only after the NACK before it was handled
    await client.recv()
    st = cache.status_of(NODE_A, CLUSTER)
    assert st is not None and st.state == SyncState.NACKED and st.acked_version == r1.version_info
    # the same content again must not be resent; a different one must
    assert not cache.set_snapshot(NODE_A, snapshot({"a": (1,), "bad": (2,)}))
    fixed = snapshot({"a": (1,), "fixed": (2,)})
    cache.set_snapshot(NODE_A, fixed)
    r3 = await client.recv()
    assert r3.version_info == fixed.version(CLUSTER), "the NACKed version was sent again"
    rows = [r for r in cache.status() if r.node_id == NODE_A and r.type_url == CLUSTER]
    assert len(rows) == 1
    # the NACK was for r2's nonce; r3 went out since, so the row shows the NACK history but is stale, not nacked
    assert rows[0].nack_error == "cluster 'bad': invalid thing" and rows[0].nack_version == bad.version(CLUSTER)
    assert rows[0].acked_version == r1.version_info and rows[0].nack_time is not None
    await client.request(CLUSTER, version=r1.version_info, nonce=r3.nonce, error="still bad")
    await client.request(ENDPOINT, ["a", "fixed"])  # a request after the NACK: once answered, the NACK was processed
    # The EDS push that followed r3 (``fixed`` dropped ``bad``) may still be unread: skip it, wait for the answer.
    for _ in range(3):
        answer = await client.recv()
        if answer.type_url == ENDPOINT and names_of(answer) == ["a", "fixed"]:
            break
    assert answer.type_url == ENDPOINT and names_of(answer) == ["a", "fixed"]
    st = cache.status_of(NODE_A, CLUSTER)
    assert st is not None and st.state == SyncState.NACKED and st.nack_error == "still bad"
    assert st.acked_version == r1.version_info
    await client.close()


async def test_stale_nonce_is_ignored(env, auth) -> None:
    cache, _, channel = env
    token = auth.issue(SHOP)
    cache.set_snapshot(NODE_A, snapshot({"a": (1,)}))
    client = SotwClient(channel, NODE_A, token)
    await client.request(CLUSTER)
    r1 = await client.recv()
    cache.set_snapshot(NODE_A, snapshot({"a": (2,), "b": (1,)}))
    r2 = await client.recv()
    # a late NACK of r1 (stale nonce) must not be recorded against the current response
    await client.request(CLUSTER, version="", nonce=r1.nonce, error="late")
    await client.ack(r2)
    await client.request(ENDPOINT, ["a"])
    await client.recv()
    st = cache.status_of(NODE_A, CLUSTER)
    assert st is not None and st.nack_error == "" and st.state == SyncState.SYNCED
    await client.close()


async def test_named_subscription_gets_only_requested_names(env, auth) -> None:
    cache, _, channel = env
    token = auth.issue(SHOP)
    cache.set_snapshot(NODE_A, snapshot({"a": (1,), "b": (2,), "c": (3,)}))
    client = SotwClient(channel, NODE_A, token)
    await client.request(ENDPOINT, ["a", "c", "missing"])
    r1 = await client.recv()
    assert names_of(r1) == ["a", "c"]
    await client.request(ENDPOINT, ["b"], version=r1.version_info, nonce=r1.nonce)  # ACK + change of names
    r2 = await client.recv()
    assert names_of(r2) == ["b"] and r2.version_info == r1.version_info
    await client.close()


async def test_named_subscription_dropped_and_requested_again_is_resent(env, auth) -> None:
    """gRPC's XdsClient, shared by a process's channels, unsubscribes a cluster when one channel closes (an empty
    CDS request: not wildcard once it named resources) and subscribes it again for the next channel; it forgot the
    resource, so the unchanged content must be sent again (also when both requests are handled in one pass)."""
    cache, _, channel = env
    token = auth.issue(SHOP)
    cache.set_snapshot(NODE_A, snapshot({"a": (1,), "b": (2,)}))
    client = SotwClient(channel, NODE_A, token)
    for type_url in (CLUSTER, ENDPOINT):
        await client.request(type_url, ["a"])
        r1 = await client.recv()
        assert r1.type_url == type_url and names_of(r1) == ["a"]
        await client.ack(r1, ["a"])
        await client.request(type_url, [], version=r1.version_info, nonce=r1.nonce)  # unsubscribe everything
        await client.request(type_url, ["a"], version=r1.version_info, nonce=r1.nonce)  # and subscribe again
        r2 = await client.recv()
        assert r2.type_url == type_url and names_of(r2) == ["a"] and r2.nonce != r1.nonce
        await client.ack(r2, ["a"])
    await client.close()


async def test_delta_subscribe_change_remove_unsubscribe(env, auth) -> None:
    cache, _, channel = env
    token = auth.issue(SHOP)
    cache.set_snapshot(NODE_A, snapshot({"a": (1,), "b": (2,), "c": (3,)}))
    client = DeltaClient(channel, NODE_A, token)
    await client.request(ENDPOINT, subscribe=["a", "b"])
    r1 = await client.recv()
    assert names_of(r1) == ["a", "b"] and not r1.removed_resources
    await client.ack(r1)
    cache.set_snapshot(NODE_A, snapshot({"a": (1, 11), "b": (2,), "c": (3,)}))
    r2 = await client.recv()
    assert names_of(r2) == ["a"] and not r2.removed_resources
    await client.ack(r2)
    cache.set_snapshot(NODE_A, snapshot({"a": (1, 11), "c": (3,)}))
    r3 = await client.recv()
    assert names_of(r3) == [] and list(r3.removed_resources) == ["b"]
    await client.ack(r3)
    await client.request(ENDPOINT, unsubscribe=["a"], subscribe=["c"])
    r4 = await client.recv()
    assert names_of(r4) == ["c"] and not r4.removed_resources
    await client.ack(r4)
    cache.set_snapshot(NODE_A, snapshot({"a": (5,), "c": (4,)}))  # both changed; only c is subscribed now
    r5 = await client.recv()
    assert names_of(r5) == ["c"] and not r5.removed_resources
    r4 = r5
    st = cache.status_of(NODE_A, ENDPOINT)
    assert st is not None and st.acked_version != "" and st.sent_nonce == r4.nonce
    await client.close()


async def test_delta_wildcard_and_reconnect_with_initial_versions(env, auth) -> None:
    cache, _, channel = env
    token = auth.issue(SHOP)
    cache.set_snapshot(NODE_A, snapshot({"a": (1,), "b": (2,), "gone": (3,)}))
    client = DeltaClient(channel, NODE_A, token)
    await client.request(CLUSTER)  # wildcard
    r1 = await client.recv()
    assert names_of(r1) == ["a", "b", "gone"]
    held = {r.name: r.version for r in r1.resources}
    await client.ack(r1)
    await client.close()
    # while disconnected: "a" keeps its content, "gone" disappears, "new" appears; cluster "b" has no content
    # change but its EDS does (EDS is another type), so CDS only differs in gone/new
    s2 = snapshot({"a": (1,), "b": (9,), "new": (4,)})
    cache.set_snapshot(NODE_A, s2)
    again = DeltaClient(channel, NODE_A, token)
    await again.request(CLUSTER, initial=held)
    r2 = await again.recv()
    assert names_of(r2) == ["new"]
    assert list(r2.removed_resources) == ["gone"]
    assert r2.system_version_info == s2.version(CLUSTER)
    await again.ack(r2)
    await again.request(ENDPOINT, subscribe=["a"])
    await again.recv()
    st = cache.status_of(NODE_A, CLUSTER)
    assert st is not None and st.state == SyncState.SYNCED
    await again.close()


async def test_delta_nack_recorded(env, auth) -> None:
    cache, _, channel = env
    token = auth.issue(SHOP)
    cache.set_snapshot(NODE_A, snapshot({"a": (1,)}))
    client = DeltaClient(channel, NODE_A, token)
    await client.request(CLUSTER)
    r1 = await client.recv()
    await client.request(CLUSTER, nonce=r1.nonce, error="no good")
    await client.request(ENDPOINT, subscribe=["a"])
    await client.recv()
    st = cache.status_of(NODE_A, CLUSTER)
    assert st is not None and st.state == SyncState.NACKED and st.nack_error == "no good"
    await client.close()


async def test_refused_without_token(env) -> None:
    cache, srv, channel = env
    cache.set_snapshot(NODE_A, snapshot({"a": (1,)}))
    client = SotwClient(channel, NODE_A, None)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.request(CLUSTER)  # the refusal may already end the call here
        await client.recv()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert srv.stats.streams_opened == 0


async def test_refused_with_unknown_token(env, auth) -> None:
    _, _, channel = env
    auth.issue(SHOP)
    client = DeltaClient(channel, NODE_A, "not-a-real-token-at-all")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.request(CLUSTER)  # the refusal may already end the call here
        await client.recv()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_refused_with_another_identitys_token(env, auth) -> None:
    cache, _, channel = env
    other_token = auth.issue(OTHER)
    cache.set_snapshot(NODE_A, snapshot({"a": (1,)}))
    client = SotwClient(channel, NODE_A, other_token)  # a token of namespace "other" claiming a "shop" node
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.request(CLUSTER)  # the refusal may already end the call here
        await client.recv()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "shop" in (err.value.details() or "")
    # and the right namespace but another service account named in the node metadata
    shop_token = auth.issue(SHOP)
    liar = SotwClient(channel, NODE_A, shop_token, SERVICE_ACCOUNT="admin")
    with pytest.raises(grpc.aio.AioRpcError) as err2:
        await liar.request(CLUSTER)  # the refusal may already end the call here
        await liar.recv()
    assert err2.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_pushes_only_to_changed_proxies(env, auth) -> None:
    cache, srv, channel = env
    token = auth.issue(SHOP)
    shared = {"a": (1,), "b": (2,)}
    cache.set_snapshot(NODE_A, snapshot(shared))
    cache.set_snapshot(NODE_B, snapshot(shared))
    ca, cb = SotwClient(channel, NODE_A, token), SotwClient(channel, NODE_B, token)
    for c in (ca, cb):
        await c.request(CLUSTER)
        await c.ack(await c.recv())
    before = srv.stats.sotw_responses
    changed_a = cache.set_snapshot(NODE_A, snapshot({"a": (1,), "b": (2,), "c": (3,)}))
    changed_b = cache.set_snapshot(NODE_B, snapshot(shared))  # regenerated, same content
    assert changed_a and not changed_b
    ra = await ca.recv()
    assert names_of(ra) == ["a", "b", "c"]
    final_b = snapshot({"a": (1,), "z": (2,)})
    cache.set_snapshot(NODE_B, final_b)
    rb = await cb.recv()  # the first thing B sees is its real change, not a resend of the unchanged one
    assert rb.version_info == final_b.version(CLUSTER) and names_of(rb) == ["a", "z"]
    assert srv.stats.sotw_responses == before + 2
    await ca.close()
    await cb.close()


async def test_no_node_id_is_invalid(env, auth) -> None:
    _, _, channel = env
    client = SotwClient(channel, "", auth.issue(SHOP))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.request(CLUSTER)  # the refusal may already end the call here
        await client.recv()
    assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED)


async def test_a_client_that_stops_reading_does_not_hold_up_other_pushes() -> None:
    cache = SnapshotCache()
    async with AdsServer(cache=cache, authenticator=None) as srv:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}")
        try:
            big = snapshot({f"c{i:05d}-{'x' * 200}": (i + 1,) for i in range(6000)})  # ~2 MB of clusters
            cache.set_snapshot(NODE_A, big)
            cache.set_snapshot(NODE_B, snapshot({"a": (1,)}))
            stuck = SotwClient(channel, NODE_A, None)
            await stuck.request(CLUSTER)  # and never reads
            healthy = SotwClient(channel, NODE_B, None)
            await healthy.request(CLUSTER)
            assert names_of(await healthy.recv()) == ["a"]
            # a second big response to the stuck client cannot be written while the first sits unread
            cache.set_snapshot(NODE_A, snapshot({f"d{i:05d}-{'x' * 200}": (i + 1,) for i in range(6000)}))
            for n in range(3):  # meanwhile the healthy client keeps getting its pushes
                cache.set_snapshot(NODE_B, snapshot({"a": (1,), f"b{n}": (2,)}))
                assert names_of(await healthy.recv()) == ["a", f"b{n}"]
            first = await stuck.recv()  # reading now lets the stuck writes finish
            assert len(first.resources) == 6000
            assert len((await stuck.recv()).resources) == 6000
            stuck.call.cancel()
            await healthy.close()
        finally:
            await channel.close()


async def test_inflight_budget_waits_for_answers_and_expires_unanswered() -> None:
    budget = InflightBudget(100, answer_timeout=0.3)
    await budget.reserve("1", 80)
    second = asyncio.create_task(budget.reserve("2", 50))
    await asyncio.sleep(0.05)
    assert not second.done() and budget.used == 80  # it cannot fit until "1" is answered
    budget.release("1")
    await asyncio.wait_for(second, 5)
    assert budget.used == 50
    await asyncio.wait_for(budget.reserve("3", 80), 5)  # "2" is never answered: it stops counting after 0.3 s
    assert budget.used == 80
    await asyncio.wait_for(budget.reserve("4", 1000), 5)  # one response always fits, however large
    budget.release("3")
    budget.release("4")
    assert budget.used == 0


async def test_a_full_budget_delays_pushes_until_proxies_answer() -> None:
    cache = SnapshotCache()
    async with AdsServer(cache=cache, authenticator=None, inflight_bytes=1) as srv:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}")
        try:
            cache.set_snapshot(NODE_A, snapshot({"a": (1,)}))
            cache.set_snapshot(NODE_B, snapshot({"b": (1,)}))
            ca, cb = SotwClient(channel, NODE_A, None), SotwClient(channel, NODE_B, None)
            await ca.request(CLUSTER)
            ra = await ca.recv()
            assert srv.inflight.used > 0  # A's response is in flight until A answers it
            await cb.request(CLUSTER)  # B's response has to wait for budget...
            await ca.ack(ra)  # ...which A's ACK frees
            assert names_of(await cb.recv()) == ["b"]
            await ca.close()
            await cb.close()
        finally:
            await channel.close()


async def test_a_big_delta_change_goes_out_in_several_responses_each_acked(env, auth, monkeypatch) -> None:
    """A catalog change touches thousands of resources: each delta response carries at most _DELTA_CHUNK bytes
    of them (the event loop builds one at a time), together exactly the change, and the proxy is synced once it
    ACKed them."""
    import gateway.ads as ads

    cache, _, channel = env
    token = auth.issue(SHOP)
    cache.set_snapshot(NODE_A, snapshot({"a": (1,)}))
    client = DeltaClient(channel, NODE_A, token)
    await client.request(CLUSTER)
    await client.ack(await client.recv())
    big = snapshot({f"c{i}": (i,) for i in range(300)})
    size = max(e.size for e in big.entries(CLUSTER).values())
    monkeypatch.setattr(ads, "_DELTA_CHUNK", size * 100)  # about 100 clusters per response
    cache.set_snapshot(NODE_A, big)
    names: list[str] = []
    removed: list[str] = []
    responses = 0
    while len(names) < 300:
        r = await client.recv()
        assert sum(len(x.resource.value) for x in r.resources) <= size * 100
        assert r.system_version_info == big.version(CLUSTER)
        names += names_of(r)
        removed += list(r.removed_resources)
        responses += 1
        await client.ack(r)
    assert responses >= 3
    assert sorted(names) == sorted(f"c{i}" for i in range(300)) and removed == ["a"]
    await client.request(ENDPOINT, subscribe=["c1"])  # handled after the ACKs above
    await client.recv()
    st = cache.status_of(NODE_A, CLUSTER)
    assert st is not None and st.state == SyncState.SYNCED
    await client.close()


async def test_a_change_a_stream_does_not_watch_wakes_it_not_and_leaves_it_synced(env, auth) -> None:
    """Sidecar-scoped proxies: a change of a resource a stream neither holds nor asked for does not wake it (no
    response, no pass over its types), and its status moves to the new version as synced; a change it watches does
    reach it."""
    cache, srv, channel = env
    s1 = snapshot({"a": (1,), "b": (2,)})
    cache.set_snapshot(NODE_A, s1)
    cache.set_snapshot(NODE_B, s1)
    delta = DeltaClient(channel, NODE_A, auth.issue(SHOP))
    sotw = SotwClient(channel, NODE_B, auth.issue(SHOP))
    await delta.request(ENDPOINT, subscribe=["a"])
    await sotw.request(ENDPOINT, ["a"])
    d1, o1 = await delta.recv(), await sotw.recv()
    assert names_of(d1) == ["a"] and names_of(o1) == ["a"]
    await delta.ack(d1)
    await sotw.ack(o1, ["a"])  # a SotW ACK repeats the names it wants
    for _ in range(200):  # bounded: until the server has both ACKs
        states = [cache.status_of(n, ENDPOINT) for n in (NODE_A, NODE_B)]
        if all(s is not None and s.state == SyncState.SYNCED for s in states):
            break
        await asyncio.sleep(0.01)
    skipped = srv.stats.wakeups_skipped
    s2 = snapshot({"a": (1,), "b": (2, 22)})  # only b changed
    assert cache.set_snapshot(NODE_A, s2) and cache.set_snapshot(NODE_B, s2)
    assert srv.stats.wakeups_skipped == skipped + 2
    for n in (NODE_A, NODE_B):
        st = cache.status_of(n, ENDPOINT)
        assert st is not None and st.state == SyncState.SYNCED and st.acked_version == s2.version(ENDPOINT)
    s3 = snapshot({"a": (1, 11), "b": (2, 22)})  # a changed: both streams get it, and only it
    cache.set_snapshot(NODE_A, s3)
    cache.set_snapshot(NODE_B, s3)
    d3, o3 = await delta.recv(), await sotw.recv()
    assert names_of(d3) == ["a"] and names_of(o3) == ["a"] and o3.version_info == s3.version(ENDPOINT)
    assert srv.stats.wakeups_skipped == skipped + 2
    await delta.close()
    await sotw.close()
