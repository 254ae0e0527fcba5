"""A workload can never obtain another workload's configuration or identity over xDS, nor change what another
stream of its own node is served (issue: "a workload can take another workload's identity over xDS").

Every case runs against a real control plane (meshfed.controlplane.ControlPlane: token table, ADS, SDS issuer,
generators) with gRPC clients speaking ADS, as a proxy would: a foreign node id with a valid token; a second
workload of the same service account; node metadata naming another namespace, cluster or service account; a second
stream of a connected node with other (minimal) metadata; node metadata naming another kind of proxy than the node
id; the Kubernetes variant, a projected token bound to one pod presented for another pod's node id; the mTLS listener
for proxyless gRPC, where the identity comes from the client certificate (another service account, another
cluster's certificate, a sidecar's own SDS certificate presented for a sidecar node, a second stream with other
metadata); a token removed from the table; a token table entry bound to no node; and the serving edge's last check
that no certificate but the stream's own identity's ever leaves over SDS.
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
from federation.trust.ca import issue_workload
from federation.trust.spiffe import SpiffeId, TrustDomain
from federation.trust.store import init_root, issue_intermediate, load_cluster_ca
from gateway.auth import (
    PROXYLESS_NODE_KINDS,
    AuthenticationError,
    NodeMismatch,
    ProxyIdentity,
    TokenReviewAuthenticator,
    check_node,
    make_node_id,
)
from gateway.cache import NodeConflict, SnapshotCache
from gateway.context import InboundPort, ProxyInfo, ProxyKind
from gateway.generators.sds import certificate_secret
from gateway.peerauth import PEER_CERT_KEY, FirstOf, PeerCertificateAuthenticator
from gateway.push import ConfigKey, Kind, PushRequest
from gateway.sds import bundle_pem
from gateway.snapshot import CLUSTER, LISTENER, SECRET, Snapshot
from meshfed.controlplane import ControlPlane, ControlPlaneConfig, Listen, load_tokens
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
    issue_intermediate(tmp_path / "root", SpiffeId.cluster(td, ClusterId("west")), tmp_path / "west")
    write_private(tmp_path / "tokens.json", json.dumps({
        token: {"namespace": "default", "service_account": sa, "cluster": "east", "node_id": node}
        for token, (sa, node) in TOKENS.items()}))
    config = ControlPlaneConfig(
        clusterset=load_clusterset(DEMO), cluster=EAST, ca_dir=tmp_path / "east", federation_urls=(),
        xds=Listen("127.0.0.1", 0), dns=Listen("127.0.0.1", 0), admin=Listen("127.0.0.1", 0),
        gateway_host="127.0.0.1", gateway_port=15443, tokens_file=tmp_path / "tokens.json",
        xds_mtls=Listen("127.0.0.1", 0))
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


# ---- node kind -----------------------------------------------------------------------------------------------------


async def test_metadata_cannot_claim_another_kind_of_proxy(cp: ControlPlane) -> None:
    """sleep's own token and node id, but MESHFED_KIND=gateway: it would be served the east-west gateway's
    configuration (every exported service's SNI route and local endpoints). Refused."""
    err = await refused(cp, SLEEP_NODE, SLEEP_TOKEN, type_url=LISTENER, **sleep_meta(MESHFED_KIND="gateway"))
    assert "MESHFED_KIND='gateway'" in (err.details() or "")


# ---- token table ---------------------------------------------------------------------------------------------------


async def test_a_token_removed_from_the_table_stops_working(cp: ControlPlane, tmp_path: Path) -> None:
    async with channel(cp) as ch:
        await fetch(SotwClient(ch, SLEEP_NODE_2, SLEEP_TOKEN_2, **sleep_meta(SLEEP_NODE_2)), SECRET, ["default"])
    write_private(tmp_path / "tokens.json", json.dumps({
        token: {"namespace": "default", "service_account": sa, "cluster": "east", "node_id": node}
        for token, (sa, node) in TOKENS.items() if token != SLEEP_TOKEN_2}))
    async with channel(cp) as ch:
        client = SotwClient(ch, SLEEP_NODE_2, SLEEP_TOKEN_2, **sleep_meta(SLEEP_NODE_2))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await fetch(client, SECRET, ["default"])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
        # the others still work
        await fetch(SotwClient(ch, SLEEP_NODE, SLEEP_TOKEN, **sleep_meta()), SECRET, ["default"])


@pytest.mark.parametrize(("entry", "field"), [
    ({"namespace": "default", "service_account": "sleep", "cluster": "east"}, "'node_id'"),
    ({"namespace": "default", "service_account": "sleep", "cluster": "east", "node_id": ""}, "'node_id'"),
    ({"namespace": "default", "service_account": "sleep", "cluster": "east", "node_id": "sleep-0"}, "'node_id'"),
    ({"namespace": "default", "service_account": "sleep", "cluster": "east",
      "node_id": make_node_id(kind="sidecar", ip="127.0.0.2", pod="sleep-0", namespace="kube-system")}, "'node_id'"),
    ({"service_account": "sleep", "cluster": "east", "node_id": SLEEP_NODE}, "'namespace'"),
    ({"namespace": "default", "service_account": "sleep", "cluster": "east", "node_id": SLEEP_NODE, "admin": "yes"},
     "'admin'"),
])
def test_every_token_table_entry_is_bound_to_its_node(tmp_path: Path, entry: dict[str, str], field: str) -> None:
    """A token that names no node (or a node outside its namespace) would open any node of its service account:
    the table refuses it, naming the file and the field, never the token."""
    path = tmp_path / "tokens.json"
    write_private(path, json.dumps({"secret-token-" + "x" * 32: entry}))
    with pytest.raises(ValueError, match=field) as err:
        load_tokens(path)
    assert str(path) in str(err.value) and "secret-token" not in str(err.value)


# ---- the serving edge ----------------------------------------------------------------------------------------------


async def test_sds_never_sends_a_certificate_of_another_identity(cp: ControlPlane) -> None:
    """Whatever lands in a node's snapshot (a regeneration racing a node's reconnection as another identity, a
    generator bug), the ADS server sends a certificate only to a stream authenticated as its identity."""
    async with channel(cp) as ch:
        client = SotwClient(ch, SLEEP_NODE, SLEEP_TOKEN, **sleep_meta())
        got = await fetch(client, SECRET, ["default", "ROOTCA"])
        assert leaf_spiffe_ids(got["_resources"]) == [f"spiffe://{TD}/ns/default/sa/sleep"]
        reviews = cp.issuer.ensure(ProxyIdentity("default", "reviews", "east"))
        snap = cp.cache.get(SLEEP_NODE)
        assert snap is not None
        cp.cache.set_snapshot(SLEEP_NODE, snap.replace(SECRET, {"default": certificate_secret("default", reviews)}))
        resp = await asyncio.wait_for(client.recv(), 20)
        assert leaf_spiffe_ids(list(resp.resources)) == []
        assert cp.ads is not None and cp.ads.stats.secrets_withheld == 1
        cp.metrics.refresh(cp)
        assert cp.metrics.registry.get_sample_value("meshfed_xds_secrets_withheld_total", {"listener": "token"}) == 1


# ---- proxyless gRPC over the mTLS listener: the identity is the client certificate's ---------------------------------


PROBE_NODE = make_node_id(kind="grpc", ip="127.0.0.1", pod="probe-0", namespace="default")


def grpc_meta(node_id: str = PROBE_NODE, service_account: str = "probe", **overrides: str) -> dict[str, str]:
    meta = ProxyInfo(kind=ProxyKind.GRPC, cluster=EAST, node_id=node_id, namespace=DEFAULT,
                     service_account=service_account).metadata()
    meta.update(overrides)
    return meta


def workload_cert(tmp_path: Path, service_account: str, cluster: str = "east") -> tuple[bytes, bytes]:
    key, chain = issue_workload(load_cluster_ca(tmp_path / cluster), SpiffeId.workload(TrustDomain.parse(TD),
                                                                                       "default", service_account))
    return key, b"".join(chain)


def mtls_channel(cp: ControlPlane, tmp_path: Path, cert: tuple[bytes, bytes]) -> grpc.aio.Channel:
    assert cp.ads_mtls is not None
    creds = grpc.ssl_channel_credentials(root_certificates=bundle_pem(cp.bundle).encode(), private_key=cert[0],
                                         certificate_chain=cert[1])
    return grpc.aio.secure_channel(f"127.0.0.1:{cp.ads_mtls.port}", creds)


async def mtls_status(cp: ControlPlane, tmp_path: Path, cert: tuple[bytes, bytes], node_id: str,
                      meta: dict[str, str], type_url: str = LISTENER) -> grpc.aio.AioRpcError | None:
    async with mtls_channel(cp, tmp_path, cert) as ch:
        client = SotwClient(ch, node_id, None, **meta)
        try:
            await client.request(type_url, ["default"] if type_url == SECRET else None)
            await asyncio.wait_for(client.recv(), 20)
        except grpc.aio.AioRpcError as exc:
            return exc
        except TimeoutError:
            return None  # accepted, nothing to send yet
        return None


async def test_mtls_stream_is_bound_to_the_certificates_identity(cp: ControlPlane, tmp_path: Path) -> None:
    probe = workload_cert(tmp_path, "probe")
    assert await mtls_status(cp, tmp_path, probe, PROBE_NODE, grpc_meta(), CLUSTER) is None
    for meta in (grpc_meta(service_account="other"), grpc_meta(CLUSTER_ID="west"), grpc_meta(NAMESPACE="other")):
        err = await mtls_status(cp, tmp_path, probe, PROBE_NODE, meta)
        assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED, meta
    other_ns = make_node_id(kind="grpc", ip="127.0.0.1", pod="probe-0", namespace="kube-system")
    err = await mtls_status(cp, tmp_path, probe, other_ns, grpc_meta(other_ns, NAMESPACE="kube-system"))
    assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED
    # a certificate issued by another cluster's CA is not one of this cluster's workloads
    err = await mtls_status(cp, tmp_path, workload_cert(tmp_path, "probe", "west"), PROBE_NODE, grpc_meta())
    assert err is not None and err.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_sidecars_certificate_cannot_open_a_token_bound_node(cp: ControlPlane, tmp_path: Path) -> None:
    """sleep-0 takes its own certificate and key from SDS and presents them on the mTLS listener for sleep-1's
    sidecar node (whose token binds it): a certificate names a service account, not a workload, so it opens
    proxyless gRPC nodes only. Before the fix it was served sleep-1's node and fixed its metadata."""
    async with channel(cp) as ch:
        got = await fetch(SotwClient(ch, SLEEP_NODE, SLEEP_TOKEN, **sleep_meta()), SECRET, ["default"])
    secret = secret_pb2.Secret()
    got["_resources"][0].Unpack(secret)
    own = (secret.tls_certificate.private_key.inline_string.encode(),
           secret.tls_certificate.certificate_chain.inline_string.encode())
    for node_id in (SLEEP_NODE_2, SLEEP_NODE):
        err = await mtls_status(cp, tmp_path, own, node_id, sleep_meta(node_id), SECRET)
        assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "may only open" in (err.details() or "")
    assert cp.cache.node_metadata(SLEEP_NODE_2) is None


async def test_mtls_second_stream_cannot_change_what_the_first_is_served(cp: ControlPlane, tmp_path: Path) -> None:
    probe = workload_cert(tmp_path, "probe")
    async with mtls_channel(cp, tmp_path, probe) as ch:
        real = SotwClient(ch, PROBE_NODE, None, **grpc_meta())
        await real.request(CLUSTER)
        await asyncio.wait_for(real.recv(), 20)
        err = await mtls_status(cp, tmp_path, probe, PROBE_NODE, {"SERVICE_ACCOUNT": "probe"})
        assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "other node metadata" in (err.details() or "")
        other = workload_cert(tmp_path, "other")
        err = await mtls_status(cp, tmp_path, other, PROBE_NODE, grpc_meta(service_account="other"))
        assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert cp.cache.node_metadata(PROBE_NODE) == grpc_meta()


async def test_reconnecting_as_another_identity_is_never_served_the_previous_one(
        cp: ControlPlane, tmp_path: Path) -> None:
    """probe's node closes; a certificate of another service account of the namespace reopens the node id with
    metadata that cannot describe a proxy. Nothing generated for probe may be kept for it (before the fix, the
    control plane kept probe's ProxyInfo and the next partial push built probe's configuration for it)."""
    async with mtls_channel(cp, tmp_path, workload_cert(tmp_path, "probe")) as ch:
        real = SotwClient(ch, PROBE_NODE, None, **grpc_meta())
        await real.request(CLUSTER)
        await asyncio.wait_for(real.recv(), 20)
        assert cp.proxies[PROBE_NODE].service_account == "probe"
    await wait_until(lambda: PROBE_NODE not in cp.cache.connected())
    async with mtls_channel(cp, tmp_path, workload_cert(tmp_path, "other")) as ch:
        bad = grpc_meta(service_account="other", MESHFED_OUTBOUND_PORT="not-a-port")
        client = SotwClient(ch, PROBE_NODE, None, **bad)
        await client.request(CLUSTER)
        await wait_until(lambda: PROBE_NODE in cp.proxy_errors)
        assert cp.pushes is not None
        cp.pushes.submit(PushRequest(configs=frozenset({ConfigKey(Kind.CATALOG)}), reasons=frozenset({"test"})))
        await cp.pushes.flush()
        assert PROBE_NODE not in cp.proxies
        assert cp.cache.get(PROBE_NODE) is None


def test_a_certificate_and_a_token_must_prove_the_same_identity() -> None:
    """On a listener that takes both, a stream carrying both is refused unless they agree."""

    class Tokens:
        async def authenticate(self, *, metadata: Any) -> ProxyIdentity:
            return ProxyIdentity("default", "sleep", "east", node_id=SLEEP_NODE)

    class Certs(PeerCertificateAuthenticator):
        def __init__(self, sa: str) -> None:
            super().__init__(trust_domain=TD, cluster="east")
            self.sa = sa

        async def authenticate(self, *, metadata: Any) -> ProxyIdentity:
            return ProxyIdentity("default", self.sa, "east", node_kinds=PROXYLESS_NODE_KINDS)

    both = {PEER_CERT_KEY: "pem", "authorization": "Bearer t"}
    with pytest.raises(AuthenticationError, match="client certificate is"):
        asyncio.run(FirstOf(certificate=Certs("reviews"), token=Tokens()).authenticate(metadata=both))
    got = asyncio.run(FirstOf(certificate=Certs("sleep"), token=Tokens()).authenticate(metadata=both))
    assert got.node_id == SLEEP_NODE


async def wait_until(predicate: Any, limit: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_a_token_removed_from_tokens_json_closes_its_open_stream(cp: ControlPlane, tmp_path: Path) -> None:
    """The runner (or an operator) removes sleep's token from tokens.json: the control plane re-reads the file by
    itself and closes the stream sleep opened with it (UNAUTHENTICATED), so a revoked workload is served nothing
    more, no renewed certificate above all; reviews' stream is untouched."""
    async with channel(cp) as ch:
        sleep = SotwClient(ch, SLEEP_NODE, SLEEP_TOKEN, **sleep_meta())
        reviews = SotwClient(ch, REVIEWS_NODE, REVIEWS_TOKEN, **reviews_meta())
        assert leaf_spiffe_ids((await fetch(sleep, SECRET, ["default"]))["_resources"]) == [
            f"spiffe://{TD}/ns/default/sa/sleep"]
        await fetch(reviews, CLUSTER)
        write_private(tmp_path / "tokens.json", json.dumps({
            token: {"namespace": "default", "service_account": sa, "cluster": "east", "node_id": node}
            for token, (sa, node) in TOKENS.items() if token != SLEEP_TOKEN}))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(sleep.recv(), 20)  # bounds only a hung test; the poll is every 0.5 s
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
        assert cp.ads is not None and cp.ads.stats.streams_revoked == 1
        assert (await fetch(reviews, LISTENER))["_resources"]  # reviews is still served
