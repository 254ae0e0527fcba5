"""Cluster identity per KEP-2149 (ClusterId for ClusterSet identification): the cluster-scoped ``ClusterProperty``
objects of ``about.k8s.io/v1alpha1`` named ``cluster.clusterset.k8s.io`` (the cluster's id, unique in its
clusterset) and ``clusterset.k8s.io`` (the clusterset's name), each holding ``spec.value``.

Pure: the objects ``meshfed install`` writes (:func:`cluster_property_object`, :func:`identity_objects`) and the
check the control plane makes at start (:func:`check_identity`) against what the cluster says, read by
``discovery.kube.client.read_cluster_properties_sync``.

Exceptions::

    DiscoveryError
     └── IdentityMismatch   the cluster's ClusterProperty disagrees with the clusterset definition
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from discovery.model import ClusterId, DiscoveryError

GROUP = "about.k8s.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
PLURAL = "clusterproperties"
CLUSTER_ID_PROPERTY = "cluster.clusterset.k8s.io"
CLUSTERSET_PROPERTY = "clusterset.k8s.io"


class IdentityMismatch(DiscoveryError):
    """A ``ClusterProperty`` in the cluster names another cluster (or clusterset) than the clusterset definition
    the control plane was started with."""


def cluster_property_object(name: str, value: str) -> dict[str, Any]:
    """The ``ClusterProperty`` ``name`` holding ``value``."""
    return {"apiVersion": API_VERSION, "kind": "ClusterProperty",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "meshfed"}},
            "spec": {"value": value}}


def identity_objects(cluster: ClusterId, clusterset: str) -> list[dict[str, Any]]:
    """The two KEP-2149 properties of ``cluster`` in ``clusterset``."""
    return [cluster_property_object(CLUSTER_ID_PROPERTY, str(cluster)),
            cluster_property_object(CLUSTERSET_PROPERTY, clusterset)]


def check_identity(properties: Mapping[str, str], *, cluster: ClusterId, clusterset: str) -> None:
    """Raise :class:`IdentityMismatch`, naming both values, when the cluster's properties (name -> value; a
    property the cluster does not have is absent, and then nothing is checked) disagree with ``cluster`` /
    ``clusterset`` from the clusterset definition."""
    found = properties.get(CLUSTER_ID_PROPERTY)
    if found is not None and found != cluster:
        raise IdentityMismatch(
            f"ClusterProperty {CLUSTER_ID_PROPERTY} in this cluster says the cluster id is {found!r}, but the "
            f"clusterset definition ({clusterset!r}) starts it as {str(cluster)!r}: pass --cluster {found} if that "
            f"is this cluster, or fix the ClusterProperty (meshfed install writes it)")
    found_set = properties.get(CLUSTERSET_PROPERTY)
    if found_set is not None and found_set != clusterset:
        raise IdentityMismatch(
            f"ClusterProperty {CLUSTERSET_PROPERTY} in this cluster says it belongs to clusterset {found_set!r}, but "
            f"the clusterset definition is {clusterset!r}")
