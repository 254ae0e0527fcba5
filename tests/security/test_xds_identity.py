"""A workload can never obtain another workload's configuration or identity over xDS, nor change what another
stream of its own node is served (issue: "a workload can take another workload's identity over xDS").

Every case runs against a real control plane (meshfed.controlplane.ControlPlane: token table, ADS, SDS issuer,
generators) with gRPC clients speaking ADS, as a proxy would: a foreign node id with a valid token; a second
workload of the same service account; node metadata naming another namespace, cluster or service account; a second
stream of a connected node with other (minimal) metadata; and the Kubernetes variant, a projected token bound to
one pod presented for another pod's node id.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from discovery.clusterset import load_clusterset
from discovery.model import ClusterId, ServiceKey, cluster_id
from federation.trust.spiffe import SpiffeId, TrustDomain
from federation.trust.store import init_root, issue_intermediate
from gateway.auth import NodeMismatch, ProxyIdentity, TokenReviewAuthenticator, check_node, make_node_id
from gateway.cache import NodeConflict, SnapshotCache
from gateway.context import InboundPort, ProxyInfo, ProxyKind
from gateway.snapshot import LISTENER, SECRET, Snapshot
from meshfed.controlplane import ControlPlane, ControlPlaneConfig, Listen
from meshfed.local import write_private
from tests.gateway.xds_client import SotwClient
from tests.support.kubeapi import KubeApiDouble

EAST = cluster_id("east")
DEMO = Path(__file__).resolve().parents[2] / "clusters" / "demo"
TD = "demo.meshfed.local"
DEFAULT = ServiceKey.parse("reviews.default").namespace

REVIEWS_NODE = make_node_id(kind="sidecar", ip="127.0.0.1", pod="reviews-0", namespace="default")
SLEEP_NODE = make_node_id(kind="sidecar", ip="127.0.0.2", pod="sleep-0", namespace="default")
SLEEP_NODE_2 = make_node_id(kind="sidecar", ip="127.0.0.3", pod="sleep-1", namespace="default")
TOKENS = {"reviews-token-" + "r" * 32: ("reviews", REVIEWS_NODE), "sleep-token-" + "s" * 32: ("sleep", SLEEP_NODE),
          "sleep-token-two-" + "t" * 32: ("sleep", SLEEP_NODE_2)}
REVIEWS_TOKEN, SLEEP_TOKEN, SLEEP_TOKEN_2 = TOKENS


def reviews_meta() -> dict[str, str]:
    return ProxyInfo(kind=ProxyKind.SIDECAR, cluster=EAST, node_id=REVIEWS_NODE, namespace=DEFAULT,
                     service_account="reviews", services=(ServiceKey.parse("reviews.default"),),
                     inbound=(InboundPort(port=19080, app_port=19081, name="http"),), ip="127.0.0.1").metadata()


def sleep_meta(node_id: str = SLEEP_NODE, **overrides: str) -> dict[str, str]:
    meta = ProxyInfo(kind=ProxyKind.SIDECAR, cluster=EAST, node_id=node_id, namespace=DEFAULT,
                     service_account="sleep").metadata()
    meta.update(overrides)
    return meta


@pytest.fixture
async def cp(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    td = TrustDomain.parse(TD)
    init_root(tmp_path / "root", td)
    issue_intermediate(tmp_path / "root", SpiffeId.cluster(td, ClusterId("east")), tmp_path / "east")
    write_private(tmp_path / "tokens.json", json.dumps({
        token: {"namespace": "default", "service_account": sa, "cluster": "east", "node_id": node}
        for token, (sa, node) in TOKENS.items()}))
    config = ControlPlaneConfig(
        clusterset=load_clusterset(DEMO), cluster=EAST, ca_dir=tmp_path / "east", federation_urls=(),
        xds=Listen("127.0.0.1", 0), dns=Listen("127.0.0.1", 0), admin=Listen("127.0.0.1", 0),
        gateway_host="127.0.0.1", gateway_port=15443, tokens_file=tmp_path / "tokens.json")
    async with ControlPlane(config) as plane:
        yield plane


def channel(cp: ControlPlane) -> grpc.aio.Channel:
    assert cp.ads is not None
    return grpc.aio.insecure_channel(f"127.0.0.1:{cp.ads.port}")


async def fetch(client: SotwClient, type_url: str, names: list[str] | None = None) -> dict[str, Any]:
    await client.request(type_url, names)
    resp = await asyncio.wait_for(client.recv(), 20)
    await client.ack(resp, names)
    return {a.type_url: a for a in resp.resources} | {"_resources": list(resp.resources)}


def leaf_spiffe_ids(resources: list[Any]) -> list[str]:
    out = []
    for any_ in resources:
        s = secret_pb2.Secret()
        any_.Unpack(s)
        if s.HasField("tls_certificate"):
            chain = s.tls_certificate.certificate_chain
            leaf = x509.load_pem_x509_certificates(chain.inline_bytes or chain.inline_string.encode())[0]
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            out.extend(san.get_values_for_type(x509.UniformResourceIdentifier))
    return out


async def refused(cp: ControlPlane, node_id: str, token: str, type_url: str = SECRET, **meta: str) -> grpc.RpcError:
    async with channel(cp) as ch:
        client = SotwClient(ch, node_id, token, **meta)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await fetch(client, type_url, ["default"] if type_url == SECRET else None)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value.details()
        return err.value


async def listener_names(client: SotwClient) -> list[str]:
    got = await fetch(client, LISTENER)
    from envoy.config.listener.v3 import listener_pb2
    names = []
    for any_ in got["_resources"]:
        lis = listener_pb2.Listener()
        any_.Unpack(lis)
        names.append(lis.name)
    return sorted(names)


async def test_a_valid_token_cannot_open_another_workloads_node(cp: ControlPlane) -> None:
    """sleep's token + reviews' node id + SERVICE_ACCOUNT: sleep: refused, and the real reviews proxy keeps its
    inbound listener and its certificate (before the fix: the intruder received reviews' certificate and key)."""
    async with channel(cp) as ch:
        real = SotwClient(ch, REVIEWS_NODE, REVIEWS_TOKEN, **reviews_meta())
        got = await fetch(real, SECRET, ["default"])
        assert leaf_spiffe_ids(got["_resources"]) == [f"spiffe://{TD}/ns/default/sa/reviews"]
        before = await listener_names(real)
        assert any("inbound" in n for n in before), before
        err = await refused(cp, REVIEWS_NODE, SLEEP_TOKEN, **sleep_meta(REVIEWS_NODE))
        assert "issued to node" in (err.details() or "")
        # whatever the intruder tried, the real proxy's node is unchanged
        assert cp.cache.node_metadata(REVIEWS_NODE) == reviews_meta()
        assert cp.cache.identity(REVIEWS_NODE) == ProxyIdentity("default", "reviews", "east")


async def test_the_same_service_account_cannot_open_another_workloads_node(cp: ControlPlane) -> None:
    err = await refused(cp, SLEEP_NODE, SLEEP_TOKEN_2, **sleep_meta())
    assert "issued to node" in (err.details() or "")


@pytest.mark.parametrize("override", [{"NAMESPACE": "kube-system"}, {"CLUSTER_ID": "west"},
                                      {"SERVICE_ACCOUNT": "reviews"}])
async def test_metadata_cannot_name_another_identity(cp: ControlPlane, override: dict[str, str]) -> None:
    """SDS for a foreign identity: metadata naming another namespace, cluster or service account is refused (the
    generators derive the proxy's SPIFFE ID, hence its certificate, from that metadata)."""
    await refused(cp, SLEEP_NODE, SLEEP_TOKEN, **sleep_meta(**override))


async def test_sds_answers_only_for_the_authenticated_identity(cp: ControlPlane) -> None:
    async with channel(cp) as ch:
        client = SotwClient(ch, SLEEP_NODE, SLEEP_TOKEN, **sleep_meta())
        got = await fetch(client, SECRET, ["default", "ROOTCA"])
        assert leaf_spiffe_ids(got["_resources"]) == [f"spiffe://{TD}/ns/default/sa/sleep"]


async def test_a_second_stream_cannot_change_what_the_first_is_served(cp: ControlPlane) -> None:
    """With the node's own token, a stream with minimal metadata (or any other metadata) is refused while the
    real proxy is connected, and the real proxy's listeners survive the next push (before the fix: its inbound
    listener disappeared while status said synced)."""
    async with channel(cp) as ch:
        real = SotwClient(ch, REVIEWS_NODE, REVIEWS_TOKEN, **reviews_meta())
        before = await listener_names(real)
        minimal = {"SERVICE_ACCOUNT": "reviews"}
        err = await refused(cp, REVIEWS_NODE, REVIEWS_TOKEN, type_url=LISTENER, **minimal)
        assert "other node metadata" in (err.details() or "")
        other = reviews_meta() | {"MESHFED_INBOUND": ""}
        await refused(cp, REVIEWS_NODE, REVIEWS_TOKEN, type_url=LISTENER, **other)
        # the same metadata again (a proxy reconnecting, gRPC's second channel) is served
        async with channel(cp) as ch2:
            twin = SotwClient(ch2, REVIEWS_NODE, REVIEWS_TOKEN, **reviews_meta())
            assert await listener_names(twin) == before
        cp._changed("test")  # a full push: what the real proxy is served comes from its own metadata
        await asyncio.sleep(0.5)
        assert cp.cache.node_metadata(REVIEWS_NODE) == reviews_meta()
        snap = cp.cache.get(REVIEWS_NODE)
        assert snap is not None and sorted(snap.names(LISTENER)) == before


def test_cache_forgets_what_was_generated_for_a_previous_identity() -> None:
    """A node id reconnecting as another identity after its streams closed never sees the old snapshot."""
    cache = SnapshotCache()
    old = ProxyIdentity("default", "reviews", "east")
    cache.set_snapshot(REVIEWS_NODE, Snapshot.build({}))
    waker = cache.watch(REVIEWS_NODE, old, {"SERVICE_ACCOUNT": "reviews"})
    with pytest.raises(NodeConflict, match="connected as"):
        cache.watch(REVIEWS_NODE, ProxyIdentity("default", "sleep", "east"), {"SERVICE_ACCOUNT": "sleep"})
    assert cache.get(REVIEWS_NODE) is not None
    cache.unwatch(REVIEWS_NODE, waker)
    cache.watch(REVIEWS_NODE, ProxyIdentity("default", "sleep", "east"), {"SERVICE_ACCOUNT": "sleep"})
    assert cache.get(REVIEWS_NODE) is None  # regenerated for the new identity before anything is served


async def test_a_pod_bound_projected_token_binds_the_stream_to_its_pod() -> None:
    with KubeApiDouble() as api:
        token = "projected-" + "p" * 40
        api.register_token(token, namespace="default", service_account="sleep", audiences=["meshfed"], pod="sleep-0")
        auth = TokenReviewAuthenticator(api_url=api.url, credential=api.admin_token, audience="meshfed",
                                        cluster="east")
        identity = await auth.authenticate(metadata={"authorization": f"Bearer {token}"})
    assert identity == ProxyIdentity("default", "sleep", "east") and identity.pod == "sleep-0"
    check_node(identity, SLEEP_NODE, sleep_meta())
    with pytest.raises(NodeMismatch, match="minted for pod 'sleep-0'"):
        check_node(identity, SLEEP_NODE_2, sleep_meta(SLEEP_NODE_2))
