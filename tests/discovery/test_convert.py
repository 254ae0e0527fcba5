"""Conversion of Kubernetes objects (as parsed YAML / API JSON) into the discovery model."""

from __future__ import annotations

import copy
import itertools
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import pytest
import yaml

from discovery import convert as cv
from discovery.model import (
    ClusterId,
    Endpoint,
    Protocol,
    Service,
    ServiceExport,
    ServiceKey,
    ServicePort,
    ServiceTraits,
)

EAST = ClusterId("east")
KEY = ServiceKey.parse("reviews.default")


def service(**spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "reviews", "namespace": "default", "labels": {"app": "reviews"}},
        "spec": {"selector": {"app": "reviews"}, "ports": [{"name": "http", "port": 9080}]},
    }
    body["spec"].update(spec)
    return body


def slice_(name: str = "reviews-1", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default", "labels": {cv.SERVICE_NAME_LABEL: "reviews"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 19080, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": ["127.0.1.10"],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "hostname": "reviews-0",
                "zone": "us-east-1a",
                "nodeName": "node-1",
            }
        ],
    }
    body.update(extra)
    return body


def export(ts: Any = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    return {
        "apiVersion": "multicluster.x-k8s.io/v1alpha1",
        "kind": "ServiceExport",
        "metadata": {"name": "reviews", "namespace": "default", "creationTimestamp": ts},
        "status": {"conditions": [{"type": "Valid", "status": "False"}]},
    }


def test_service_fields() -> None:
    obj = service(
        ports=[
            {"name": "http", "port": 9080, "protocol": "TCP", "appProtocol": "http", "targetPort": 8080},
            {"name": "grpc", "port": 9090, "targetPort": "grpc-port"},
            {"name": "dns", "port": 53, "protocol": "UDP"},
        ],
        clusterIP="10.0.0.12",
    )
    svc = cv.convert(obj, cluster=EAST)
    assert isinstance(svc, Service)
    assert svc.cluster == "east" and svc.key == KEY
    assert svc.ports == (
        ServicePort(port=9080, protocol=Protocol.TCP, name="http", app_protocol="http", target_port=8080),
        ServicePort(port=9090, protocol=Protocol.TCP, name="grpc", target_port="grpc-port"),
        ServicePort(port=53, protocol=Protocol.UDP, name="dns", target_port=53),
    )
    assert not svc.headless and svc.cluster_ip == "10.0.0.12"
    assert svc.labels == (("app", "reviews"),) and svc.selector == (("app", "reviews"),)
    assert svc.endpoints == ()


def test_headless_service_and_namespace_default() -> None:
    obj = service(clusterIP="None")
    del obj["metadata"]["namespace"]
    svc = cv.convert(obj, cluster=EAST)
    assert isinstance(svc, Service)
    assert svc.headless and svc.type == "Headless" and svc.cluster_ip == ""
    assert svc.key.namespace == "default"


def test_headless_service_may_have_no_ports() -> None:
    svc = cv.convert(service(clusterIP="None", ports=[]), cluster=EAST)
    assert isinstance(svc, Service) and svc.ports == ()


def test_external_name_is_kept_apart() -> None:
    got = cv.convert(service(type="ExternalName", externalName="db.example.org", ports=None), cluster=EAST)
    assert isinstance(got, cv.ExternalNameService)
    assert got.external_name == "db.example.org" and got.key == KEY


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        ({"ports": [{"name": "a", "port": 80}, {"name": "b", "port": "x"}]}, "spec.ports[1].port", "integer"),
        ({"ports": [{"name": "a", "port": 80}, {"name": "b", "port": 70000}]}, "spec.ports[1].port", "range"),
        ({"ports": [{"name": "a", "port": 80, "protocol": "HTTP"}]}, "spec.ports[0].protocol", "TCP, UDP"),
        ({"ports": [{"port": 80}, {"port": 81}]}, "spec.ports[0].name", "more than one port"),
        ({"ports": [{"name": "a", "port": 80}, {"name": "a", "port": 81}]}, "spec.ports[1].name", "duplicate"),
        ({"ports": [{"name": "a", "port": 80}, {"name": "b", "port": 80}]}, "spec.ports[1].port", "duplicate"),
        ({"ports": [{"name": "Bad_Name", "port": 80}]}, "spec.ports[0].name", "RFC 1123"),
        ({"ports": []}, "spec.ports", "at least one port"),
        ({"ports": "80"}, "spec.ports", "list"),
        ({"clusterIP": "nope"}, "spec.clusterIP", "IP address"),
        ({"type": "Ingress"}, "spec.type", "ClusterIP"),
        ({"selector": {"app": 3}}, "spec.selector.app", "strings"),
    ],
)
def test_service_errors_name_the_field(spec: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(cv.ConversionError) as info:
        cv.convert(service(**spec), cluster=EAST)
    assert info.value.field == field
    assert words in str(info.value)
    assert str(info.value).startswith(f"Service default/reviews: {field}: ")


@pytest.mark.parametrize(
    ("meta", "field"),
    [
        ({"namespace": "default"}, "metadata.name"),
        ({"name": "Reviews"}, "metadata.name"),
        ({"name": "reviews", "namespace": "Not_OK"}, "metadata.namespace"),
    ],
)
def test_bad_metadata(meta: dict[str, Any], field: str) -> None:
    obj = service()
    obj["metadata"] = meta
    with pytest.raises(cv.ConversionError) as info:
        cv.convert(obj, cluster=EAST)
    assert info.value.field == field


def test_endpoint_slice_fields() -> None:
    sl = cv.convert(slice_(), cluster=EAST)
    assert isinstance(sl, cv.EndpointSlice)
    assert sl.key == KEY and sl.name == "reviews-1" and sl.address_type == "IPv4"
    assert sl.ports == (("http", 19080, Protocol.TCP),)
    assert sl.endpoints == (
        Endpoint(
            address="127.0.1.10",
            ready=True,
            serving=True,
            terminating=False,
            hostname="reviews-0",
            zone="us-east-1a",
            node="node-1",
            ports=(("http", 19080),),
        ),
    )


def test_endpoint_condition_defaults() -> None:
    obj = slice_(
        endpoints=[{"addresses": ["127.0.1.10"]}, {"addresses": ["127.0.1.11"], "conditions": {"ready": False}}]
    )
    sl = cv.convert(obj, cluster=EAST)
    assert isinstance(sl, cv.EndpointSlice)
    first, second = sl.endpoints
    assert (first.ready, first.serving, first.terminating) == (True, True, False)
    # serving follows ready when absent; terminating defaults to false
    assert (second.ready, second.serving, second.terminating) == (False, False, False)


def test_ipv6_and_fqdn_slices() -> None:
    v6 = cv.convert(slice_(addressType="IPv6", endpoints=[{"addresses": ["::1"]}]), cluster=EAST)
    assert isinstance(v6, cv.EndpointSlice) and v6.endpoints[0].address == "::1"
    fqdn = cv.convert(slice_(addressType="FQDN", endpoints=[{"addresses": ["db.example.org"]}]), cluster=EAST)
    assert isinstance(fqdn, cv.EndpointSlice) and fqdn.endpoints == ()


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"addressType": "IPv4", "endpoints": [{"addresses": ["::1"]}]}, "endpoints[0].addresses[0]"),
        ({"endpoints": [{"addresses": ["127.0.1.1"]}, {"addresses": ["not-an-ip"]}]}, "endpoints[1].addresses[0]"),
        ({"endpoints": [{"addresses": []}]}, "endpoints[0].addresses"),
        (
            {"endpoints": [{"addresses": ["127.0.1.1"], "conditions": {"ready": "yes"}}]},
            "endpoints[0].conditions.ready",
        ),
        ({"endpoints": [{"addresses": ["127.0.1.1"], "hostname": "DB_0"}]}, "endpoints[0].hostname"),
        ({"ports": [{"name": "http", "port": 0}]}, "ports[0].port"),
        ({"addressType": "IPX"}, "addressType"),
    ],
)
def test_endpoint_slice_errors(extra: dict[str, Any], field: str) -> None:
    with pytest.raises(cv.ConversionError) as info:
        cv.convert(slice_(**extra), cluster=EAST)
    assert info.value.field == field
    assert "EndpointSlice default/reviews-1" in str(info.value)


def test_slice_without_service_label() -> None:
    obj = slice_()
    obj["metadata"]["labels"] = {}
    with pytest.raises(cv.ConversionError) as info:
        cv.convert(obj, cluster=EAST)
    assert info.value.field == "metadata.labels.kubernetes.io/service-name"


def test_service_export() -> None:
    e = cv.convert(export(), cluster=EAST)
    assert e == ServiceExport(cluster=EAST, key=KEY, created=datetime(2026, 1, 1, tzinfo=UTC))
    # YAML turns an unquoted timestamp into a datetime; offsets are normalised to UTC
    parsed = yaml.safe_load("ts: 2026-01-01T02:00:00+02:00")["ts"]
    e2 = cv.convert(export(parsed), cluster=EAST)
    assert isinstance(e2, ServiceExport) and e2.created == datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("ts", [None, "", "yesterday", 12])
def test_service_export_needs_a_timestamp(ts: Any) -> None:
    with pytest.raises(cv.ConversionError) as info:
        cv.convert(export(ts), cluster=EAST)
    assert info.value.field == "metadata.creationTimestamp"


def test_unknown_and_malformed_objects() -> None:
    with pytest.raises(cv.UnsupportedKind) as info:
        cv.convert({"apiVersion": "networking.istio.io/v1", "kind": "Gateway", "metadata": {"name": "x"}}, cluster=EAST)
    assert (info.value.api_version, info.value.kind) == ("networking.istio.io/v1", "Gateway")
    assert "networking.istio.io/v1" in str(info.value) and "Gateway" in str(info.value)
    with pytest.raises(cv.ConversionError) as missing:
        cv.convert({"apiVersion": "v1"}, cluster=EAST)
    assert missing.value.field == "kind"
    with pytest.raises(cv.ConversionError):
        cv.convert(["not", "an", "object"], cluster=EAST)
    assert not cv.is_known({"apiVersion": "v1", "kind": "ConfigMap"})
    assert cv.is_known(service())


def test_adding_a_kind_is_one_entry_in_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    marker = ("example.meshfed.io/v1", "Thing")
    monkeypatch.setattr(cv, "CONVERTERS", MappingProxyType(
        {**cv.CONVERTERS, marker: lambda obj, cluster: ("thing", cluster, obj["metadata"]["name"])}))
    got = cv.convert({"apiVersion": marker[0], "kind": marker[1], "metadata": {"name": "t"}}, cluster=EAST)
    assert got == ("thing", "east", "t")


def test_the_table_lists_every_kind_meshfed_converts() -> None:
    """One explicit table (no registration on import): the core kinds, Istio's traffic kinds, AuthorizationPolicy."""
    kinds = {kind for _, kind in cv.CONVERTERS}
    assert kinds == {"Service", "EndpointSlice", "ServiceExport", "DestinationRule", "VirtualService",
                     "AuthorizationPolicy"}
    assert ("security.istio.io/v1beta1", "AuthorizationPolicy") in cv.CONVERTERS
    assert ("networking.istio.io/v1alpha3", "VirtualService") in cv.CONVERTERS


def test_conversion_does_not_mutate_input() -> None:
    obj = service(ports=[{"name": "http", "port": 9080}])
    before = copy.deepcopy(obj)
    cv.convert(obj, cluster=EAST)
    assert obj == before


def test_assemble_merges_slices_whatever_the_order() -> None:
    svc = cv.convert(service(), cluster=EAST)
    a = cv.convert(
        slice_("reviews-a", endpoints=[{"addresses": ["127.0.1.2"]}, {"addresses": ["127.0.1.1"]}]), cluster=EAST
    )
    b = cv.convert(
        slice_(
            "reviews-b",
            ports=[{"name": "admin", "port": 15000}],
            endpoints=[{"addresses": ["127.0.1.3"]}, {"addresses": ["127.0.1.1"], "conditions": {"ready": False}}],
        ),
        cluster=EAST,
    )
    results = set()
    for order in itertools.permutations([svc, a, b]):
        got = cv.assemble(order)
        results.add(got.services[KEY])
    assert len(results) == 1
    (merged,) = results
    assert [e.address for e in merged.endpoints] == ["127.0.1.1", "127.0.1.2", "127.0.1.3"]
    first = merged.endpoints[0]
    # 127.0.1.1 appears in both slices: conditions from the first slice by name, ports united
    assert first.ready is True
    assert dict(first.ports) == {"http": 19080, "admin": 15000}


def test_assemble_reports_orphans_and_external_names() -> None:
    orphan = cv.convert(slice_("ghost-1"), cluster=EAST)
    ext = cv.convert(service(type="ExternalName", externalName="x.example.org"), cluster=EAST)
    exp = cv.convert(export(), cluster=EAST)
    got = cv.assemble([orphan, ext, exp])
    assert got.services == {}
    assert got.orphan_slices == (orphan,)
    assert KEY in got.unsupported and "ExternalName" in got.unsupported[KEY]
    assert got.exports == {KEY: exp}


def test_service_export_object_round_trips() -> None:
    created = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    obj = cv.service_export_object(KEY, created)
    assert obj["metadata"]["creationTimestamp"] == "2026-03-04T05:06:07Z"
    assert cv.convert(obj, cluster=EAST) == ServiceExport(cluster=EAST, key=KEY, created=created)


def test_service_traits_for_the_mcs_conflict_rules() -> None:
    s = cv.convert(service(clusterIP="10.0.0.7", sessionAffinity="ClientIP", internalTrafficPolicy="Local",
                           trafficDistribution="PreferClose"), cluster=EAST)
    assert isinstance(s, Service)
    # ClientIP without a config gets Kubernetes' default timeout; ipFamilies left out is the clusterIP's family
    assert s.traits == ServiceTraits(session_affinity="ClientIP", affinity_timeout=10800,
                                     internal_traffic_policy="Local", traffic_distribution="PreferClose",
                                     ip_families=("IPv4",))
    s2 = cv.convert(service(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}},
                            ipFamilies=["IPv6", "IPv4"]), cluster=EAST)
    assert isinstance(s2, Service)
    assert (s2.traits.affinity_timeout, s2.traits.ip_families) == (60, ("IPv6", "IPv4"))
    plain = cv.convert(service(), cluster=EAST)
    assert isinstance(plain, Service) and plain.traits == ServiceTraits()


@pytest.mark.parametrize(("spec", "field"), [
    ({"sessionAffinity": "Cookie"}, "spec.sessionAffinity"),
    ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}},
     "spec.sessionAffinityConfig.clientIP.timeoutSeconds"),
    ({"internalTrafficPolicy": "Node"}, "spec.internalTrafficPolicy"),
    ({"ipFamilies": ["IPv4", "IPv4"]}, "spec.ipFamilies[1]"),
    ({"trafficDistribution": 3}, "spec.trafficDistribution"),
])
def test_bad_service_traits_name_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(cv.ConversionError) as info:
        cv.convert(service(**spec), cluster=EAST)
    assert info.value.field == field


def test_service_export_v1beta1_spec() -> None:
    obj = export()
    obj["apiVersion"] = "multicluster.x-k8s.io/v1beta1"
    obj["metadata"]["generation"] = 4
    obj["spec"] = {"exportedLabels": {"tier": "gold", "a": "b"}, "exportedAnnotations": {"team": "x"}}
    e = cv.convert(obj, cluster=EAST)
    assert isinstance(e, ServiceExport)
    assert e.exported_labels == (("a", "b"), ("tier", "gold")) and e.exported_annotations == (("team", "x"),)
    assert e.generation == 4 and e.conditions == ()
    obj["spec"]["exportedLabels"] = {"tier": 1}
    with pytest.raises(cv.ConversionError) as info:
        cv.convert(obj, cluster=EAST)
    assert info.value.field == "spec.exportedLabels.tier"


def test_service_import_object_per_version() -> None:
    from discovery.model import ServiceImport, ServiceType

    imp = ServiceImport(key=KEY, type=ServiceType.CLUSTER_SET_IP, ports=(ServicePort(port=9080, name="http"),),
                        clusters=(EAST,), ips=("241.0.0.7", "fd00::7"),
                        traits=ServiceTraits(ip_families=("IPv4", "IPv6"), traffic_distribution="PreferClose"))
    beta = cv.service_import_object(imp, version="v1beta1")
    assert beta["apiVersion"] == "multicluster.x-k8s.io/v1beta1"
    assert beta["spec"]["ips"] == ["241.0.0.7", "fd00::7"] and beta["spec"]["trafficDistribution"] == "PreferClose"
    alpha = cv.service_import_object(imp, version="v1alpha1")
    assert alpha["spec"]["ips"] == ["241.0.0.7"]  # v1alpha1 holds one address and none of v1beta1's fields
    assert not {"ipFamilies", "internalTrafficPolicy", "trafficDistribution"} & set(alpha["spec"])
    assert alpha["status"] == {"clusters": [{"cluster": "east"}]}


def test_service_export_to_peers_only_by_its_annotation() -> None:
    obj = export()
    plain = cv.convert(obj, cluster=EAST)
    assert isinstance(plain, ServiceExport) and plain.peers == ()  # stays inside its clusterset
    obj["metadata"]["annotations"] = {cv.EXPORT_TO_PEERS: " other, b ,other"}
    shared = cv.convert(obj, cluster=EAST)
    assert isinstance(shared, ServiceExport) and shared.peers == ("b", "other")
    for bad in ("svc", "b,,c", "B", "-x"):
        obj["metadata"]["annotations"] = {cv.EXPORT_TO_PEERS: bad}
        with pytest.raises(cv.ConversionError) as info:
            cv.convert(obj, cluster=EAST)
        assert info.value.field == f"metadata.annotations[{cv.EXPORT_TO_PEERS}]", bad
