"""The control plane's pure pieces (runtime overrides, tokens, central export conditions) and one real process:
a control plane without a federation serving DNS, status and xDS auth from the demo manifests."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.message
import dns.rcode
import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from discovery.clusterset import load_clusterset
from discovery.model import (
    ClusterId,
    Condition,
    ConditionStatus,
    Endpoint,
    Registry,
    Service,
    ServiceExport,
    ServiceImport,
    ServiceKey,
    ServicePort,
    ServiceType,
    cluster_id,
)
from federation.catalog import Catalog, CatalogService
from meshfed.controlplane import (
    ControlPlane,
    ControlPlaneConfig,
    EndpointOverride,
    Listen,
    apply_runtime,
    load_runtime,
    load_tokens,
    with_export_conditions,
)
from meshfed.controlplane.status import decode_status, encode_status
from meshfed.local import http_get, write_private
from meshfed.rotation import ProxySecrets

EAST = cluster_id("east")
REVIEWS = ServiceKey.parse("reviews.default")
DEMO = Path(__file__).resolve().parents[2] / "clusters" / "demo"


def _service(*addresses: str) -> Service:
    return Service(cluster=EAST, key=REVIEWS, ports=(ServicePort(port=9080, name="http"),),
                   endpoints=tuple(Endpoint(address=a, ports=(("http", 9080),)) for a in addresses))


def test_runtime_overrides_replace_placeholder_ports_and_service_accounts(tmp_path: Path) -> None:
    path = tmp_path / "runtime.json"
    path.write_text(json.dumps({"endpoints": {"127.0.1.10": {"ports": {"http": 41000},
                                                             "service_account": "reviews"}}}))
    runtime = load_runtime(path)
    assert runtime == {"127.0.1.10": EndpointOverride(ports=(("http", 41000),), service_account="reviews")}
    [svc] = apply_runtime({REVIEWS: _service("127.0.1.10", "127.0.1.11")}, runtime)
    first, second = svc.endpoints
    assert first.port_for("http", 0) == 41000 and first.service_account == "reviews"
    assert second.port_for("http", 0) == 9080 and second.service_account == ""  # not in the overrides: untouched


def test_missing_runtime_and_tokens_files_mean_none(tmp_path: Path) -> None:
    assert load_runtime(tmp_path / "absent.json") == {}
    assert load_tokens(None) == {}


def test_tokens_file_maps_tokens_to_identities(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    node = "sidecar~127.0.0.1~sleep-0.default~default.svc.cluster.local"
    write_private(path, json.dumps({"t" * 20: {"namespace": "default", "service_account": "sleep",
                                               "cluster": "east", "node_id": node}}))
    assert os.stat(path).st_mode & 0o777 == 0o600
    [(token, identity)] = load_tokens(path).items()
    assert token == "t" * 20 and identity.service_account == "sleep" and identity.cluster == "east"
    assert identity.node_id == node


def test_export_conditions_come_from_the_central_catalog() -> None:
    export = ServiceExport(cluster=EAST, key=REVIEWS, created=datetime(2026, 1, 1, tzinfo=UTC))
    registry = Registry(local=EAST).with_shard(EAST, [_service("127.0.1.10")], [export])
    conflict = Condition(type="Conflict", status=ConditionStatus.TRUE, reason="PortConflict",
                         message="conflict on port 9080 with cluster west")
    other = Condition(type="Conflict", status=ConditionStatus.FALSE, reason="NoConflicts", message="")
    imp = ServiceImport(key=REVIEWS, type=ServiceType.CLUSTER_SET_IP, ports=(ServicePort(port=9080),),
                        clusters=(EAST, ClusterId("west")))
    catalog = Catalog(revision=3, services={
        REVIEWS: CatalogService(import_=imp, conditions=((EAST, conflict), (ClusterId("west"), other)))})
    updated = with_export_conditions(registry, catalog)
    assert updated.exports[EAST][REVIEWS].conditions == (conflict,)  # only this cluster's, not west's
    assert with_export_conditions(updated, catalog) is updated  # nothing changed: the same value


def test_an_export_of_a_missing_service_is_reported_no_service_when_federated() -> None:
    """The federation never sees an export whose Service does not exist (nothing is published for it), so the
    control plane reports ``Valid=False, NoService`` itself, and ``InvalidServiceType`` for an ExternalName."""
    ghost = ServiceExport(cluster=EAST, key=ServiceKey.parse("ghost.default"), created=datetime(2026, 1, 1, tzinfo=UTC))
    external = ServiceExport(cluster=EAST, key=ServiceKey.parse("ext.default"),
                             created=datetime(2026, 1, 1, tzinfo=UTC))
    registry = Registry(local=EAST).with_shard(EAST, [_service("127.0.1.10")], [ghost, external])
    updated = with_export_conditions(registry, Catalog(revision=1, services={}),
                                     unsupported={external.key: "Service default/ext is of type ExternalName"})
    by_type = {c.type: c for c in updated.exports[EAST][ghost.key].conditions}
    assert (by_type["Valid"].status, by_type["Valid"].reason) == (ConditionStatus.FALSE, "NoService")
    assert "ghost" in by_type["Valid"].message and by_type["Ready"].reason == "Failed"
    ext = {c.type: c for c in updated.exports[EAST][external.key].conditions}
    assert ext["Valid"].reason == "InvalidServiceType"
    assert with_export_conditions(updated, Catalog(revision=1, services={}),
                                  unsupported={external.key: "Service default/ext is of type ExternalName"}) \
        is updated


async def test_unfederated_control_plane_serves_dns_status_and_refuses_unauthenticated_xds(
        east_ca: Path, tmp_path: Path) -> None:
    cs = load_clusterset(DEMO)
    config = ControlPlaneConfig(
        clusterset=cs, cluster=EAST, ca_dir=east_ca, federation_urls=(), xds=Listen("127.0.0.1", 0),
        dns=Listen("127.0.0.1", 0), admin=Listen("127.0.0.1", 0), gateway_host="127.0.0.1", gateway_port=15443,
        tokens_file=tmp_path / "tokens.json")
    async with ControlPlane(config) as cp:
        assert cp.ads is not None and cp.dns is not None
        status, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{cp.admin_port}/status")
        assert status == 200
        data = json.loads(body)
        assert data["cluster"] == "east" and data["federation"] == {"configured": False}
        assert {s["service"] for s in data["services"]} >= {"reviews.default", "details.default"}
        # One codec: what was served decodes into the typed value and encodes back to the same JSON.
        typed = decode_status(data)
        assert typed.cluster == "east" and not typed.federation.configured and encode_status(typed) == data
        status, _ = await asyncio.to_thread(http_get, f"http://127.0.0.1:{cp.admin_port}/readyz")
        assert status == 200
        # Headless db is exported by east: its ready pod addresses are answered from east's own shard.
        query = dns.message.make_query("db.default.svc.clusterset.local", "A")
        answer = await dns.asyncquery.udp(query, "127.0.0.1", port=cp.dns.port, timeout=3)
        assert answer.rcode() == dns.rcode.NOERROR
        assert {r.address for rrset in answer.answer for r in rrset} == {"127.0.1.30", "127.0.1.31"}
        # An xDS stream without a bootstrap token is refused.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{cp.ads.port}") as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            call = stub.StreamAggregatedResources()
            await call.write(discovery_pb2.DiscoveryRequest(type_url="x"))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _demo_objects() -> list[dict[str, object]]:
    """East's demo objects as a Kubernetes API server would hold them (read from the demo manifests)."""
    import yaml

    docs: list[dict[str, object]] = []
    for path in sorted((DEMO / "east").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


async def test_control_plane_on_the_kubernetes_api_with_tokenreview_auth(east_ca: Path, tmp_path: Path) -> None:
    """The same control plane fed by the real ``kubernetes`` client against the API server test double
    (tests/support/kubeapi.py), authenticating proxies with TokenReview."""
    from gateway.auth import make_node_id
    from gateway.context import ProxyInfo, ProxyKind
    from tests.support.kubeapi import KubeApiDouble

    with KubeApiDouble() as api:
        for obj in _demo_objects():
            api.put_object(obj)
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        config = ControlPlaneConfig(
            clusterset=load_clusterset(DEMO), cluster=EAST, ca_dir=east_ca, federation_urls=(),
            xds=Listen("127.0.0.1", 0), dns=Listen("127.0.0.1", 0), admin=Listen("127.0.0.1", 0),
            gateway_host="127.0.0.1", gateway_port=15443, source="kubernetes", kubeconfig=kubeconfig,
            xds_auth="tokenreview", token_audience="meshfed")
        async with ControlPlane(config) as cp:
            assert cp.ads is not None
            assert {str(s.key) for s in cp.registry.services(EAST)} >= {"reviews.default", "details.default"}
            # The control plane wrote its exports' conditions back to their status subresource (unfederated: the
            # clusterset is east alone, so reviews is valid, exported and without conflicts).
            def status_reasons() -> dict[str, str]:
                obj = api.get_object("multicluster.x-k8s.io/v1alpha1", "ServiceExport", "reviews", "default")
                conds = (obj or {}).get("status", {}).get("conditions", [])
                return {c["type"]: c["reason"] for c in conds if c.get("lastTransitionTime")}
            assert cp.status_writer is not None
            for _ in range(100):
                if status_reasons() and cp.status_writer.writes >= 2:  # reviews and db
                    break
                await asyncio.sleep(0.05)
            assert status_reasons() == {"Valid": "Valid", "Ready": "Exported", "Conflict": "NoConflicts"}
            assert cp.status_writer.writes >= 2
            # ... and the clusterset's ServiceImports (east alone: reviews and db), spec and status.clusters.
            for _ in range(100):
                imported = api.objects("multicluster.x-k8s.io/v1alpha1", "ServiceImport")
                if len(imported) == 2 and all(o.get("status") for o in imported) and cp.import_writer is not None \
                        and cp.import_writer.writes == 2:
                    break
                await asyncio.sleep(0.05)
            imports = {o["metadata"]["name"]: o for o in api.objects("multicluster.x-k8s.io/v1alpha1",
                                                                     "ServiceImport")}
            assert set(imports) == {"reviews", "db"}
            assert imports["reviews"]["spec"]["type"] == "ClusterSetIP" and imports["reviews"]["spec"]["ips"]
            assert imports["db"]["spec"]["type"] == "Headless" and "ips" not in imports["db"]["spec"]
            assert imports["reviews"]["status"]["clusters"] == [{"cluster": "east"}]
            assert imports["reviews"]["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "meshfed"
            # ... and their multicluster EndpointSlices, owned by them, which the source does not read back as
            # east's own endpoints.
            def mcs_slices() -> dict[str, dict[str, Any]]:
                return {o["metadata"]["name"]: o for o in api.objects("discovery.k8s.io/v1", "EndpointSlice")
                        if "multicluster.kubernetes.io/service-name" in o["metadata"].get("labels", {})}
            for _ in range(100):
                if set(mcs_slices()) == {"reviews.east", "db.east"}:
                    break
                await asyncio.sleep(0.05)
            slices = mcs_slices()
            assert set(slices) == {"reviews.east", "db.east"}
            assert slices["reviews.east"]["metadata"]["ownerReferences"][0]["uid"] == \
                imports["reviews"]["metadata"]["uid"]
            own = cp.registry.service(EAST, REVIEWS)
            assert own is not None and own.endpoints
            assert sorted(e["addresses"][0] for e in slices["reviews.east"]["endpoints"]) == \
                sorted(e.address for e in own.endpoints)
            status_writes = cp.status_writer.writes
            # A change in the API server reaches the registry through the watch.
            api.delete_object("v1", "Service", "details", "default")
            for _ in range(100):
                if "details.default" not in {str(s.key) for s in cp.registry.services(EAST)}:
                    break
                await asyncio.sleep(0.05)
            assert "details.default" not in {str(s.key) for s in cp.registry.services(EAST)}
            # Nothing about the exports changed (only details, which is not exported): no status written again,
            # though the status write itself came back through the watch as a change of the ServiceExport.
            assert cp.status_writer.writes == status_writes
            # East's demo VirtualService and DestinationRule came from the API server into the push context.
            policies = cp.push_context().policies
            assert policies.virtual_service(REVIEWS) is not None and policies.destination_rule(REVIEWS) is not None
            assert cp.push_context().authz == ()
            # An AuthorizationPolicy written to the API server reaches the push context through the watch ...
            api.put_object({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                            "metadata": {"name": "reviews-deny-admin", "namespace": "default"},
                            "spec": {"selector": {"matchLabels": {"app": "reviews"}}, "action": "DENY",
                                     "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]}})
            for _ in range(100):
                if cp.push_context().authz:
                    break
                await asyncio.sleep(0.05)
            [policy] = cp.push_context().authz
            assert (policy.cluster, policy.policy_id, policy.action.value) == (EAST, "default.reviews-deny-admin",
                                                                               "DENY")
            # ... and leaves it when deleted.
            api.delete_object("security.istio.io/v1", "AuthorizationPolicy", "reviews-deny-admin", "default")
            for _ in range(100):
                if not cp.push_context().authz:
                    break
                await asyncio.sleep(0.05)
            assert cp.push_context().authz == ()
            # A proxy with a projected service-account token for the right audience gets its configuration.
            token = api.issue_token("default", "sleep", audiences=["meshfed"])
            node = make_node_id(kind="sidecar", ip="127.0.0.1", pod="sleep-0", namespace="default")
            proxy = ProxyInfo(kind=ProxyKind.SIDECAR, cluster=EAST, node_id=node,
                              namespace=ProxyInfo.from_node(node, {"MESHFED_KIND": "sidecar", "CLUSTER_ID": "east",
                                                                   "NAMESPACE": "default"}).namespace,
                              service_account="sleep", outbound_port=15001)
            request = discovery_pb2.DiscoveryRequest(
                type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster")
            request.node.id = node
            for k, v in proxy.metadata().items():
                request.node.metadata.fields[k].string_value = v
            async with grpc.aio.insecure_channel(f"127.0.0.1:{cp.ads.port}") as channel:
                stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
                call = stub.StreamAggregatedResources(metadata=(("authorization", f"Bearer {token}"),))
                await call.write(request)
                response = await asyncio.wait_for(call.read(), 10)
                assert response.type_url.endswith("Cluster") and len(response.resources) > 0
                call.cancel()
            wrong = api.issue_token("default", "sleep", audiences=["someone-else"])
            async with grpc.aio.insecure_channel(f"127.0.0.1:{cp.ads.port}") as channel:
                stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
                call = stub.StreamAggregatedResources(metadata=(("authorization", f"Bearer {wrong}"),))
                await call.write(request)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call.read()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_root_rotation_reaches_proxies_without_a_restart(east_ca: Path, tmp_path: Path) -> None:
    """`meshfed ca rotate add-root` then `reissue`: the running control plane re-reads its CA directory, hands
    the connected proxy a trust bundle with both roots, then a workload certificate from the new intermediate."""
    from cryptography import x509
    from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

    from federation.trust.store import rotate_add_root, rotate_reissue
    from gateway.auth import make_node_id
    from gateway.context import ProxyInfo, ProxyKind
    from tests.gateway.xds_client import SotwClient

    secret_type = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    token = "t" * 24
    write_private(tmp_path / "tokens.json", json.dumps(
        {token: {"namespace": "default", "service_account": "sleep", "cluster": "east",
                 "node_id": make_node_id(kind="sidecar", ip="127.0.0.1", pod="sleep-0", namespace="default")}}))
    config = ControlPlaneConfig(
        clusterset=load_clusterset(DEMO), cluster=EAST, ca_dir=east_ca, federation_urls=(),
        xds=Listen("127.0.0.1", 0), dns=Listen("127.0.0.1", 0), admin=Listen("127.0.0.1", 0),
        gateway_host="127.0.0.1", gateway_port=15443, tokens_file=tmp_path / "tokens.json", trust_poll_s=0.1)
    node = make_node_id(kind="sidecar", ip="127.0.0.1", pod="sleep-0", namespace="default")
    meta = ProxyInfo(kind=ProxyKind.SIDECAR, cluster=EAST, node_id=node,
                     namespace=ServiceKey.parse("sleep.default").namespace, service_account="sleep").metadata()

    async def secrets(client: SotwClient, version: str = "", nonce: str = "") -> dict[str, secret_pb2.Secret]:
        await client.request(secret_type, ["default", "ROOTCA"], version=version, nonce=nonce)
        resp = await asyncio.wait_for(client.recv(), 10)
        out = {}
        for any_ in resp.resources:
            s = secret_pb2.Secret()
            any_.Unpack(s)
            out[s.name] = s
        secrets.last = (resp.version_info, resp.nonce)  # type: ignore[attr-defined]
        return out

    def issuer_of(s: secret_pb2.Secret) -> bytes:
        source = s.tls_certificate.certificate_chain
        chain = source.inline_bytes or source.inline_string.encode()
        leaf = x509.load_pem_x509_certificates(chain)[0]
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
        assert aki is not None
        return aki

    def root_count(s: secret_pb2.Secret) -> int:
        ca = s.validation_context.trusted_ca
        return len(x509.load_pem_x509_certificates(ca.inline_bytes or ca.inline_string.encode()))

    async with ControlPlane(config) as cp:
        assert cp.ads is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{cp.ads.port}") as channel:
            client = SotwClient(channel, node, token, **meta)
            first = await secrets(client)
            old_intermediate = cp.ca.fingerprint
            assert root_count(first["ROOTCA"]) == 1
            root = east_ca.parent / "root"
            await asyncio.to_thread(rotate_add_root, root, cluster_dirs=[east_ca])
            got = first
            for _ in range(50):  # bounded: the new bundle arrives as a push
                version, nonce = secrets.last  # type: ignore[attr-defined]
                got = await secrets(client, version, nonce)
                if root_count(got["ROOTCA"]) == 2:
                    break
            assert root_count(got["ROOTCA"]) == 2
            await asyncio.to_thread(rotate_reissue, root, cluster_dirs=[east_ca])
            for _ in range(50):
                version, nonce = secrets.last  # type: ignore[attr-defined]
                got = await secrets(client, version, nonce)
                if issuer_of(got["default"]) != issuer_of(first["default"]):
                    break
            assert cp.ca.fingerprint != old_intermediate
            ski = cp.ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
            assert issuer_of(got["default"]) == ski  # signed by the re-issued intermediate, no restart
            # /status reports what the proxy holds by fingerprint once it ACKed it (rotation convergence).
            new_root = cp.bundle.issuing_root([cp.ca.cert])
            rotation = cp.status().rotation
            assert new_root is not None and rotation is not None and rotation.intermediate.root_fingerprint == new_root
            version, nonce = secrets.last  # type: ignore[attr-defined]
            await client.request(secret_type, ["default", "ROOTCA"], version=version, nonce=nonce)  # the ACK
            report = ProxySecrets()
            for _ in range(100):
                rotation = cp.status().rotation
                assert rotation is not None
                report = next(p for p in rotation.proxies if p.node_id == node)
                if report.state == "acked":
                    break
                await asyncio.sleep(0.05)
            assert report.state == "acked" and report.leaf_root == new_root
            assert new_root in report.bundle_roots and len(report.bundle_roots) == 2
            await client.close()


@pytest.mark.parametrize(("cluster_value", "clusterset_value", "wrong"), [
    ("west", "demo", "'west'"), ("east", "elsewhere", "'elsewhere'"), ("east", "demo", None)])
async def test_cluster_identity_is_checked_against_the_cluster_property(
        east_ca: Path, tmp_path: Path, cluster_value: str, clusterset_value: str, wrong: str | None) -> None:
    """KEP-2149: a cluster whose ClusterProperty names another cluster (or clusterset) than the clusterset
    definition gives is refused before anything starts, naming both values; one that agrees starts."""
    from discovery.clusterid import IdentityMismatch, identity_objects
    from meshfed.install.crds import ALL_CRDS
    from tests.meshfed.conftest import kube_config
    from tests.support.kubeapi import KubeApiDouble

    with KubeApiDouble(strict=True) as api:
        for crd in ALL_CRDS:
            api.put_object(crd)
        for obj in identity_objects(ClusterId(cluster_value), clusterset_value):
            api.put_object(obj)
        config = kube_config(east_ca, api.write_kubeconfig(tmp_path / "kubeconfig"))
        if wrong is None:
            async with ControlPlane(config) as cp:
                assert cp.ads is not None
            return
        with pytest.raises(IdentityMismatch) as info:
            async with ControlPlane(config):
                pytest.fail("the control plane started")
        message = str(info.value)
        assert wrong in message and ("'east'" in message or "'demo'" in message)


async def test_the_injectors_ca_bundle_follows_the_clustersets_roots_through_a_rotation(
        east_ca: Path, tmp_path: Path) -> None:
    """On the Kubernetes source with ``webhook_configuration``, the control plane writes the clusterset's roots
    into every webhook's caBundle (what the install rendered holds the first root only), and writes both roots as
    soon as ``add-root`` puts the new one in the bundle: before ``reissue`` moves the webhook's serving certificate
    to it, so the API server can verify that certificate throughout."""
    import base64
    import dataclasses

    from federation.trust.store import rotate_add_root
    from gateway.sds import bundle_pem
    from tests.meshfed.conftest import kube_config
    from tests.support.kubeapi import KubeApiDouble

    stale = b"-----BEGIN CERTIFICATE-----\nc3RhbGU=\n-----END CERTIFICATE-----\n"  # what an old install left
    hook = {"name": "inject.meshfed.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "clientConfig": {"service": {"name": "meshfed-controlplane", "namespace": "meshfed-system",
                                         "path": "/inject", "port": 443},
                             "caBundle": base64.b64encode(stale).decode()}}
    with KubeApiDouble() as api:
        api.put_object({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
                        "metadata": {"name": "meshfed-sidecar-injector"}, "webhooks": [hook]})
        config = dataclasses.replace(kube_config(east_ca, api.write_kubeconfig(tmp_path / "kubeconfig")),
                                     webhook_configuration="meshfed-sidecar-injector", trust_poll_s=0.2)

        def ca_bundle() -> str:
            obj = api.get_object("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration",
                                 "meshfed-sidecar-injector")
            assert obj is not None
            return base64.b64decode(obj["webhooks"][0]["clientConfig"]["caBundle"]).decode()

        async def until_bundle(want: str) -> None:
            for _ in range(200):
                if ca_bundle() == want:
                    return
                await asyncio.sleep(0.05)
            assert ca_bundle() == want

        async with ControlPlane(config) as cp:
            await until_bundle(bundle_pem(cp.bundle))
            assert cp.status().webhook_ca_error == ""
            rotate_add_root(east_ca.parent / "root", cluster_dirs=[east_ca])
            for _ in range(200):
                if len(cp.bundle.roots) == 2:
                    break
                await asyncio.sleep(0.05)
            assert len(cp.bundle.roots) == 2
            await until_bundle(bundle_pem(cp.bundle))
            assert ca_bundle().count("BEGIN CERTIFICATE") == 2
            assert cp.status().webhook_ca_error == ""
