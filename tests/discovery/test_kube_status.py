"""Status written back: ExportStatusWriter applies a ServiceExport's conditions to its status subresource (server-
side apply, field manager meshfed) against the API double in strict mode with the CRDs meshfed installs; only
changes are written, a deleted export is skipped, a failure is retried at the next sync."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from discovery import convert, mcs
from discovery.kube import ExportStatusWriter, ImportWriter, SliceWriter, load_api_client
from discovery.model import (
    ClusterId,
    Condition,
    ConditionStatus,
    Endpoint,
    ServiceExport,
    ServiceImport,
    ServiceKey,
    ServicePort,
    ServiceTraits,
    ServiceType,
)
from meshfed.install.crds import CRDS
from tests.support.kubeapi import KubeApiDouble

KEY = ServiceKey.parse("reviews.default")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = datetime(2026, 1, 2, tzinfo=UTC)
BETA = "multicluster.x-k8s.io/v1beta1"


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[KubeApiDouble, Path]]:
    with KubeApiDouble(strict=True) as double:
        for crd in CRDS:
            double.put_object(crd)
        double.put_object({"apiVersion": BETA, "kind": "ServiceExport",
                           "metadata": {"name": "reviews", "namespace": "default", "generation": 2}})
        yield double, double.write_kubeconfig(tmp_path / "kubeconfig", context="east")


def _export(*conditions: Condition) -> ServiceExport:
    return ServiceExport(cluster=ClusterId("east"), key=KEY, created=T0, conditions=conditions, generation=2)


VALID = Condition(mcs.VALID, ConditionStatus.TRUE, "Valid", "Service default/reviews exists", 2, T0)
CONFLICT = Condition(mcs.CONFLICT, ConditionStatus.TRUE, "PortConflict,TypeConflict", "conflict on port 9080", 2)


def _status_patches(double: KubeApiDouble) -> list[str]:
    return [path for method, path in double.requests if method == "PATCH" and "/status" in path]


async def test_conditions_are_applied_once_per_change(api: tuple[KubeApiDouble, Path]) -> None:
    double, kubeconfig = api
    writer = ExportStatusWriter(api=load_api_client(kubeconfig=kubeconfig, context="east"),
                                version=lambda: "v1beta1", clock=lambda: T1)
    assert await writer.sync({KEY: _export(VALID, CONFLICT)}) == 1
    obj = double.get_object(BETA, "ServiceExport", "reviews")
    assert obj is not None
    assert obj["status"]["conditions"] == [
        {"type": "Valid", "status": "True", "reason": "Valid", "message": "Service default/reviews exists",
         "observedGeneration": 2, "lastTransitionTime": "2026-01-01T00:00:00Z"},
        # not stamped yet: the writer's clock fills the time the CRD requires
        {"type": "Conflict", "status": "True", "reason": "PortConflict,TypeConflict",
         "message": "conflict on port 9080", "observedGeneration": 2, "lastTransitionTime": "2026-01-02T00:00:00Z"},
    ]
    [patch] = _status_patches(double)
    assert "fieldManager=meshfed" in patch and "/apis/multicluster.x-k8s.io/v1beta1/" in patch
    # The same conditions again: nothing written.
    assert await writer.sync({KEY: _export(VALID, CONFLICT)}) == 0
    assert len(_status_patches(double)) == 1
    # A change is written.
    resolved = replace(CONFLICT, status=ConditionStatus.FALSE, reason="NoConflicts", message="all agree",
                       last_transition_time=T1)
    assert await writer.sync({KEY: _export(VALID, resolved)}) == 1
    obj = double.get_object(BETA, "ServiceExport", "reviews")
    assert obj is not None and obj["status"]["conditions"][1]["reason"] == "NoConflicts"
    assert writer.writes == 2


async def test_deleted_export_is_skipped_and_failures_retry(api: tuple[KubeApiDouble, Path]) -> None:
    double, kubeconfig = api
    writer = ExportStatusWriter(api=load_api_client(kubeconfig=kubeconfig, context="east"),
                                version=lambda: "v1beta1", clock=lambda: T1)
    ghost = replace(_export(VALID), key=ServiceKey.parse("ghost.default"))
    assert await writer.sync({ghost.key: ghost}) == 0  # no such object: 404, skipped
    assert writer.failures == 0
    double.inject_error(1, code=500, path_prefix="/apis/multicluster.x-k8s.io/")
    assert await writer.sync({KEY: _export(VALID)}) == 0
    assert writer.failures == 1
    assert await writer.sync({KEY: _export(VALID)}) == 1  # not recorded as written: tried again
    obj = double.get_object(BETA, "ServiceExport", "reviews")
    assert obj is not None and [c["type"] for c in obj["status"]["conditions"]] == ["Valid"]
    # An export without conditions yet (waiting for the federation) is left alone.
    assert await writer.sync({KEY: _export()}) == 0


def _import(name: str = "reviews", ns: str = "default", **kw: object) -> ServiceImport:
    return ServiceImport(key=ServiceKey.parse(f"{name}.{ns}"), type=ServiceType.CLUSTER_SET_IP,
                         ports=(ServicePort(port=9080, name="http", app_protocol="http"),),
                         clusters=(ClusterId("east"), ClusterId("west")), ips=("241.0.0.7",), **kw)  # type: ignore[arg-type]


async def test_service_imports_are_written_changed_and_removed(api: tuple[KubeApiDouble, Path]) -> None:
    double, kubeconfig = api
    client = load_api_client(kubeconfig=kubeconfig, context="east")
    # One left by an earlier run for a service no longer exported, and one somebody else owns.
    double.put_object({"apiVersion": BETA, "kind": "ServiceImport",
                       "metadata": {"name": "old", "namespace": "default",
                                    "labels": {"app.kubernetes.io/managed-by": "meshfed"}},
                       "spec": {"type": "ClusterSetIP", "ports": [{"port": 1}]}})
    double.put_object({"apiVersion": BETA, "kind": "ServiceImport",
                       "metadata": {"name": "theirs", "namespace": "default"},
                       "spec": {"type": "ClusterSetIP", "ports": [{"port": 1}]}})
    writer = ImportWriter(api=client, version=lambda: "v1beta1")
    traits = ServiceTraits(session_affinity="ClientIP", affinity_timeout=60, ip_families=("IPv4",))
    reviews = _import(traits=traits, labels=(("tier", "gold"),), annotations=(("team", "x"),))
    elsewhere = _import("db", ns="prod")  # no namespace prod in this cluster: skipped
    assert await writer.sync({reviews.key: reviews, elsewhere.key: elsewhere}) == 2  # old deleted, reviews written
    names = {o["metadata"]["name"] for o in double.objects(BETA, "ServiceImport")}
    assert names == {"reviews", "theirs"}
    obj = double.get_object(BETA, "ServiceImport", "reviews")
    assert obj is not None
    assert obj["spec"] == {"type": "ClusterSetIP", "sessionAffinity": "ClientIP", "ips": ["241.0.0.7"],
                           "ports": [{"port": 9080, "protocol": "TCP", "name": "http", "appProtocol": "http"}],
                           "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}, "ipFamilies": ["IPv4"],
                           "internalTrafficPolicy": "Cluster"}
    assert obj["status"] == {"clusters": [{"cluster": "east"}, {"cluster": "west"}]}
    assert obj["metadata"]["labels"] == {"tier": "gold", "app.kubernetes.io/managed-by": "meshfed"}
    assert obj["metadata"]["annotations"] == {"team": "x"}
    patches = [p for m, p in double.requests if m == "PATCH" and "/default/serviceimports/reviews" in p]
    assert len(patches) == 2 and all("fieldManager=meshfed" in p for p in patches)  # the object, its status
    # Unchanged: nothing written. Changed: written again.
    assert await writer.sync({reviews.key: reviews, elsewhere.key: elsewhere}) == 0
    west_only = replace(reviews, clusters=(ClusterId("west"),))
    assert await writer.sync({reviews.key: west_only}) == 1
    obj = double.get_object(BETA, "ServiceImport", "reviews")
    assert obj is not None and obj["status"]["clusters"] == [{"cluster": "west"}]
    # Unexported everywhere: removed; somebody else's stays.
    assert await writer.sync({}) == 1
    assert {o["metadata"]["name"] for o in double.objects(BETA, "ServiceImport")} == {"theirs"}
    assert writer.failures == 0


SLICES = "discovery.k8s.io/v1"


async def test_multicluster_endpoint_slices_follow_their_imports(api: tuple[KubeApiDouble, Path]) -> None:
    """One EndpointSlice per source cluster (and an IPv6 one where a cluster has IPv6 endpoints), with the
    KEP-1645 labels and an owner reference to the ServiceImport; written after it, changed with the endpoints,
    deleted when the export goes (also a leftover from an earlier run); the cluster's own slices stay."""
    double, kubeconfig = api
    client = load_api_client(kubeconfig=kubeconfig, context="east")
    double.put_object({"apiVersion": SLICES, "kind": "EndpointSlice", "addressType": "IPv4", "endpoints": [],
                       "metadata": {"name": "reviews-abc", "namespace": "default",
                                    "labels": {"kubernetes.io/service-name": "reviews"}}})
    double.put_object({"apiVersion": SLICES, "kind": "EndpointSlice", "addressType": "IPv4", "endpoints": [],
                       "metadata": {"name": "gone.west", "namespace": "default",
                                    "labels": {convert.MCS_SERVICE_NAME_LABEL: "gone",
                                               convert.SLICE_MANAGED_BY_LABEL: convert.SLICE_MANAGED_BY}}})
    imports = ImportWriter(api=client, version=lambda: "v1beta1")
    writer = SliceWriter(api=client, imports=imports)
    reviews = _import()
    east = (Endpoint(address="10.1.0.5", hostname="r-0", zone="z1", ports=(("http", 8080),)),
            Endpoint(address="10.1.0.6", ready=False, serving=False, ports=(("http", 8080),)))
    west = (Endpoint(address="fd00::7", ports=(("http", 9080),)),)
    table = {(ClusterId("east"), reviews.key): east, (ClusterId("west"), reviews.key): west}

    def endpoints(cluster: ClusterId, key: ServiceKey) -> tuple[Endpoint, ...]:
        return table.get((cluster, key), ())

    wanted = convert.imported_slices({reviews.key: reviews}, endpoints)
    assert sorted(name for _, name in wanted) == ["reviews.east", "reviews.west", "reviews.west.ipv6"]
    # Before its ServiceImport is written nothing can own a slice: only the leftover goes.
    assert await writer.sync(wanted) == 1
    assert [o["metadata"]["name"] for o in double.objects(SLICES, "EndpointSlice")] == ["reviews-abc"]
    assert await imports.sync({reviews.key: reviews}) == 1
    owner = double.get_object(BETA, "ServiceImport", "reviews")
    assert owner is not None
    assert await writer.sync(wanted) == 3
    obj = double.get_object(SLICES, "EndpointSlice", "reviews.east")
    assert obj is not None
    assert obj["metadata"]["labels"] == {"multicluster.kubernetes.io/service-name": "reviews",
                                         "multicluster.kubernetes.io/source-cluster": "east",
                                         "endpointslice.kubernetes.io/managed-by": "mcs-controller.meshfed.io"}
    assert obj["metadata"]["ownerReferences"] == [
        {"apiVersion": BETA, "kind": "ServiceImport", "name": "reviews", "uid": owner["metadata"]["uid"],
         "controller": False, "blockOwnerDeletion": False}]
    assert obj["addressType"] == "IPv4"
    assert obj["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}]
    assert obj["endpoints"] == [
        {"addresses": ["10.1.0.5"], "conditions": {"ready": True, "serving": True, "terminating": False},
         "hostname": "r-0", "zone": "z1"},
        {"addresses": ["10.1.0.6"], "conditions": {"ready": False, "serving": False, "terminating": False}}]
    west4 = double.get_object(SLICES, "EndpointSlice", "reviews.west")
    west6 = double.get_object(SLICES, "EndpointSlice", "reviews.west.ipv6")
    assert west4 is not None and west4["endpoints"] == [] and west4["ports"][0]["port"] == 9080
    assert west6 is not None and west6["addressType"] == "IPv6"
    assert [e["addresses"] for e in west6["endpoints"]] == [["fd00::7"]]
    assert west6["metadata"]["labels"]["multicluster.kubernetes.io/source-cluster"] == "west"
    patches = [p for m, p in double.requests if m == "PATCH" and "/endpointslices/" in p]
    assert len(patches) == 3 and all("fieldManager=meshfed" in p for p in patches)
    # Unchanged: nothing written; an endpoint gone: that slice only.
    assert await writer.sync(convert.imported_slices({reviews.key: reviews}, endpoints)) == 0
    table[(ClusterId("east"), reviews.key)] = east[:1]
    assert await writer.sync(convert.imported_slices({reviews.key: reviews}, endpoints)) == 1
    obj = double.get_object(SLICES, "EndpointSlice", "reviews.east")
    assert obj is not None and len(obj["endpoints"]) == 1
    # West stops exporting: its slices go.
    east_only = replace(reviews, clusters=(ClusterId("east"),))
    assert await imports.sync({reviews.key: east_only}) == 1
    assert await writer.sync(convert.imported_slices({reviews.key: east_only}, endpoints)) == 2
    assert sorted(o["metadata"]["name"] for o in double.objects(SLICES, "EndpointSlice")) == [
        "reviews-abc", "reviews.east"]
    # Unexported everywhere: the ServiceImport and its slices go; the cluster's own slice stays.
    assert await imports.sync({}) == 1
    assert await writer.sync(convert.imported_slices({}, endpoints)) == 1
    assert [o["metadata"]["name"] for o in double.objects(SLICES, "EndpointSlice")] == ["reviews-abc"]
    assert writer.failures == 0 and imports.failures == 0
