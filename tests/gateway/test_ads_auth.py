"""xDS client authentication: bootstrap token table and Kubernetes TokenReview (against the API test double),
alone and through the ADS server."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from gateway.ads import AdsServer
from gateway.auth import (
    AuthenticationError,
    NodeMismatch,
    ProxyIdentity,
    TokenReviewAuthenticator,
    TokenTableAuthenticator,
    check_node,
    make_node_id,
    parse_node_id,
)
from gateway.cache import SnapshotCache
from gateway.snapshot import CLUSTER
from tests.gateway.xds_client import SotwClient, names_of, snapshot
from tests.support.kubeapi import KubeApiDouble

AUD = "meshfed"


@pytest.fixture
def kube() -> Iterator[KubeApiDouble]:
    with KubeApiDouble() as api:
        yield api


def reviewer(api: KubeApiDouble, credential: str | None = None) -> TokenReviewAuthenticator:
    return TokenReviewAuthenticator(api_url=api.url, credential=credential or api.admin_token, audience=AUD,
                                    cluster="east")


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def test_token_review_accepts_a_service_account_token(kube: KubeApiDouble) -> None:
    token = kube.issue_token("shop", "web", audiences=[AUD])
    identity = await reviewer(kube).authenticate(metadata=bearer(token))
    assert identity == ProxyIdentity(namespace="shop", service_account="web", cluster="east")
    reviews = [(m, p) for m, p in kube.requests if p.startswith("/apis/authentication.k8s.io/v1/tokenreviews")]
    assert [m for m, _ in reviews] == ["POST"]


async def test_token_review_results_are_cached_briefly(kube: KubeApiDouble) -> None:
    token = kube.issue_token("shop", "web", audiences=[AUD])
    auth = reviewer(kube)
    for _ in range(3):
        assert (await auth.authenticate(metadata=bearer(token))).service_account == "web"
    assert sum(1 for _, p in kube.requests if "tokenreviews" in p) == 1
    uncached = TokenReviewAuthenticator(api_url=kube.url, credential=kube.admin_token, audience=AUD, cluster="east",
                                        cache_seconds=0)
    await uncached.authenticate(metadata=bearer(token))
    kube.revoke_token(token)
    with pytest.raises(AuthenticationError):
        await uncached.authenticate(metadata=bearer(token))


async def test_token_review_refusals(kube: KubeApiDouble) -> None:
    wrong_audience = kube.issue_token("shop", "web", audiences=["something-else"])
    with pytest.raises(AuthenticationError, match="audience"):
        await reviewer(kube).authenticate(metadata=bearer(wrong_audience))
    revoked = kube.issue_token("shop", "web", audiences=[AUD])
    kube.revoke_token(revoked)
    with pytest.raises(AuthenticationError, match="refused"):
        await reviewer(kube).authenticate(metadata=bearer(revoked))
    good = kube.issue_token("shop", "web", audiences=[AUD])
    with pytest.raises(AuthenticationError, match="401"):
        await reviewer(kube, credential="not-the-admin").authenticate(metadata=bearer(good))
    with pytest.raises(AuthenticationError, match="Bearer"):
        await reviewer(kube).authenticate(metadata={})


async def test_token_table_is_exact() -> None:
    auth = TokenTableAuthenticator()
    ident = ProxyIdentity("shop", "web", "east")
    token = auth.issue(ident)
    assert await auth.authenticate(metadata=bearer(token)) == ident
    for bad in (token[:-1], token + "x", "", "Basic " + token):
        with pytest.raises(AuthenticationError):
            await auth.authenticate(metadata={"authorization": bad} if bad.startswith("Basic") else bearer(bad))
    with pytest.raises(ValueError, match="shorter"):
        auth.add("short", ident)


def test_node_ids_bind_to_identities() -> None:
    ident = ProxyIdentity("shop", "web", "east")
    node = make_node_id(kind="sidecar", ip="10.1.2.3", pod="web-7f9", namespace="shop")
    assert node == "sidecar~10.1.2.3~web-7f9.shop~shop.svc.cluster.local"
    info = check_node(ident, node, {"SERVICE_ACCOUNT": "web"})
    assert (info.kind, info.ip, info.pod, info.namespace, info.domain) == ("sidecar", "10.1.2.3", "web-7f9", "shop",
                                                                           "cluster.local")
    with pytest.raises(NodeMismatch, match="namespace 'other'"):
        check_node(ident, make_node_id(kind="router", ip="10.1.2.3", pod="gw", namespace="other"), {})
    with pytest.raises(NodeMismatch, match="service account 'admin'"):
        check_node(ident, node, {"SERVICE_ACCOUNT": "admin"})
    with pytest.raises(NodeMismatch, match="no SERVICE_ACCOUNT"):
        check_node(ident, node, {})
    for bad in ("sidecar~1.2.3.4~pod~shop.svc.cluster.local", "x~1~p.shop~shop.svc.c", "sidecar~1~p.a~b.svc.c", "a"):
        with pytest.raises(NodeMismatch):
            parse_node_id(bad)


async def test_ads_with_token_review(kube: KubeApiDouble) -> None:
    cache = SnapshotCache()
    node = make_node_id(kind="sidecar", ip="127.0.0.1", pod="web-1", namespace="shop")
    cache.set_snapshot(node, snapshot({"a": (1,)}))
    async with AdsServer(cache=cache, authenticator=reviewer(kube)) as srv, \
            grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        client = SotwClient(channel, node, kube.issue_token("shop", "web", audiences=[AUD]))
        await client.request(CLUSTER)
        assert names_of(await client.recv()) == ["a"]
        assert cache.identity(node) == ProxyIdentity("shop", "web", "east")
        await client.close()
        intruder = SotwClient(channel, node, kube.issue_token("other", "web", audiences=[AUD]))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await intruder.request(CLUSTER)
            await intruder.recv()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        stranger = SotwClient(channel, node, "not-a-kubernetes-token")
        with pytest.raises(grpc.aio.AioRpcError) as err2:
            await stranger.request(CLUSTER)
            await stranger.recv()
        assert err2.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_revoked_token_closes_the_streams_it_opened_and_only_those() -> None:
    """Removing a workload's token from the table ends its open stream with UNAUTHENTICATED (it would otherwise be
    served, new certificates included, until it reconnected); another workload's stream stays open and served."""
    web = ProxyIdentity(namespace="shop", service_account="web", cluster="east")
    db = ProxyIdentity(namespace="shop", service_account="db", cluster="east")
    node_web = make_node_id(kind="sidecar", ip="10.0.0.1", pod="web-1", namespace="shop")
    node_db = make_node_id(kind="sidecar", ip="10.0.0.2", pod="db-1", namespace="shop")
    web_token, db_token = "w" * 32, "d" * 32
    table = TokenTableAuthenticator({web_token: web, db_token: db})
    cache = SnapshotCache()
    cache.set_snapshot(node_web, snapshot({"a": (1,)}))
    cache.set_snapshot(node_db, snapshot({"a": (1,)}))
    async with AdsServer(cache=cache, authenticator=table) as srv, \
            grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        web_stream, db_stream = SotwClient(channel, node_web, web_token), SotwClient(
            channel, node_db, db_token, SERVICE_ACCOUNT="db")
        for client in (web_stream, db_stream):
            await client.request(CLUSTER)
            first = await client.recv()
            assert names_of(first) == ["a"]
            await client.ack(first)
        table.reset({db_token: db})  # web's token is gone
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await web_stream.recv()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in (err.value.details() or "")
        assert srv.stats.streams_revoked == 1
        cache.set_snapshot(node_db, snapshot({"a": (1,), "b": (2,)}))
        assert names_of(await db_stream.recv()) == ["a", "b"]
        refused = SotwClient(channel, node_web, web_token)  # and the token opens nothing new
        await refused.request(CLUSTER)
        with pytest.raises(grpc.aio.AioRpcError) as again:
            await refused.recv()
        assert again.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await db_stream.close()
