"""The Multi-Cluster Services API CRDs (``multicluster.x-k8s.io``): ServiceExport and ServiceImport, each served
at ``v1beta1`` (the storage version) and ``v1alpha1`` (for clients that predate it; conversion ``None``: the
two differ only by fields added in v1beta1, which a v1alpha1 reader does not see).

Written here as plain data (``apiextensions.k8s.io/v1`` CustomResourceDefinitions with structural
``openAPIV3Schema``), so the renderer needs no package data files. The schemas describe the fields that
``discovery.mcs`` reads and writes: a ServiceExport has ``status.conditions`` and, in v1beta1,
``spec.exportedLabels`` / ``spec.exportedAnnotations``; a ServiceImport has ``spec.type`` (ClusterSetIP or
Headless), ``spec.ports``, ``spec.ips``, session affinity, in v1beta1 also ``ipFamilies``,
``internalTrafficPolicy``, ``trafficDistribution`` and ``status.conditions``, and ``status.clusters`` (the member
clusters that export the service).
"""

from __future__ import annotations

from typing import Any

from discovery import clusterid

GROUP = "multicluster.x-k8s.io"
STORAGE_VERSION = "v1beta1"
#: Every version served, the storage version first.
VERSIONS = ("v1beta1", "v1alpha1")

_CONDITION: dict[str, Any] = {
    "type": "object",
    "required": ["type", "status", "lastTransitionTime", "reason", "message"],
    "properties": {
        "type": {"type": "string", "maxLength": 316,
                 "pattern": r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                            r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"},
        "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
        "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
        "lastTransitionTime": {"type": "string", "format": "date-time"},
        "reason": {"type": "string", "maxLength": 1024, "minLength": 1,
                   "pattern": r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"},
        "message": {"type": "string", "maxLength": 32768},
    },
}

_PORT: dict[str, Any] = {
    "type": "object",
    "required": ["port"],
    "properties": {
        "name": {"type": "string", "description": "The port's name; must match the exported Services' port name."},
        "protocol": {"type": "string", "enum": ["TCP", "UDP", "SCTP"], "default": "TCP"},
        "appProtocol": {"type": "string", "description": "The application protocol, e.g. http or grpc."},
        "port": {"type": "integer", "format": "int32", "minimum": 1, "maximum": 65535},
    },
}


_STRING_MAP: dict[str, Any] = {"type": "object", "additionalProperties": {"type": "string"}}


def _crd(kind: str, plural: str, short: list[str], schemas: dict[str, dict[str, Any]], description: str,
         columns: list[dict[str, Any]]) -> dict[str, Any]:
    """A CRD serving ``schemas[version]`` at each of :data:`VERSIONS`."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "meshfed", "multicluster.x-k8s.io/api": STORAGE_VERSION},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower(),
                      "shortNames": short, "categories": ["multicluster"]},
            "conversion": {"strategy": "None"},
            "versions": [{
                "name": version,
                "served": True,
                "storage": version == STORAGE_VERSION,
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": description,
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        **schemas[version],
                    },
                }},
            } for version in VERSIONS],
        },
    }


def _conditions() -> dict[str, Any]:
    return {"type": "array", "items": _CONDITION, "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"]}


_EXPORT_STATUS: dict[str, Any] = {"status": {
    "type": "object",
    "description": "What the MCS controller concluded about this export.",
    "properties": {"conditions": _conditions()},
}}

SERVICE_EXPORT_CRD: dict[str, Any] = _crd(
    "ServiceExport", "serviceexports", ["svcex", "svcexport"],
    {
        "v1alpha1": _EXPORT_STATUS,
        "v1beta1": {
            "spec": {"type": "object", "properties": {"exportedLabels": _STRING_MAP,
                                                      "exportedAnnotations": _STRING_MAP}},
            **_EXPORT_STATUS,
        },
    },
    "Declares that the Service of the same name and namespace is exported to the clusterset.",
    [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}],
)


def _import_spec(max_ips: int, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["ports", "type"],
        "properties": {
            "type": {"type": "string", "enum": ["ClusterSetIP", "Headless"]},
            "ports": {"type": "array", "items": _PORT, "x-kubernetes-list-type": "atomic"},
            "ips": {"type": "array", "maxItems": max_ips, "items": {"type": "string"}},
            "sessionAffinity": {"type": "string", "enum": ["None", "ClientIP"]},
            "sessionAffinityConfig": {
                "type": "object",
                "properties": {"clientIP": {
                    "type": "object",
                    "properties": {"timeoutSeconds": {"type": "integer", "format": "int32",
                                                      "minimum": 1, "maximum": 86400}},
                }},
            },
            **extra,
        },
    }


_CLUSTERS: dict[str, Any] = {
    "type": "array",
    "items": {"type": "object", "required": ["cluster"], "properties": {"cluster": {"type": "string"}}},
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["cluster"],
}

SERVICE_IMPORT_CRD: dict[str, Any] = _crd(
    "ServiceImport", "serviceimports", ["svcim", "svcimport"],
    {
        "v1alpha1": {
            "spec": _import_spec(1, {}),
            "status": {"type": "object", "properties": {"clusters": _CLUSTERS}},
        },
        "v1beta1": {
            "spec": _import_spec(2, {
                "ipFamilies": {"type": "array", "maxItems": 2,
                               "items": {"type": "string", "enum": ["IPv4", "IPv6"]}},
                "internalTrafficPolicy": {"type": "string", "enum": ["Cluster", "Local"]},
                "trafficDistribution": {"type": "string"},
            }),
            "status": {"type": "object", "properties": {
                "clusters": _CLUSTERS,
                "endpointSliceObjects": {"type": "string", "enum": ["Present", "Absent"]},
                "conditions": _conditions(),
            }},
        },
    },
    "A service exported by one or more member clusters, as this cluster sees it.",
    [
        {"name": "Type", "type": "string", "jsonPath": ".spec.type"},
        {"name": "IP", "type": "string", "jsonPath": ".spec.ips"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
)

CRDS: tuple[dict[str, Any], ...] = (SERVICE_EXPORT_CRD, SERVICE_IMPORT_CRD)

#: KEP-2149's ClusterProperty (``about.k8s.io/v1alpha1``, cluster-scoped): ``spec.value`` holds a property of the
#: cluster, e.g. its id in ``cluster.clusterset.k8s.io``.
CLUSTER_PROPERTY_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{clusterid.PLURAL}.{clusterid.GROUP}",
                 "labels": {"app.kubernetes.io/part-of": "meshfed"},
                 # about.k8s.io is a protected *.k8s.io group: the API server wants this annotation to be a URL.
                 "annotations": {"api-approved.kubernetes.io":
                                 "https://github.com/kubernetes/enhancements/tree/master/keps/sig-multicluster/"
                                 "2149-clusterid"}},
    "spec": {
        "group": clusterid.GROUP,
        "scope": "Cluster",
        "names": {"kind": "ClusterProperty", "listKind": "ClusterPropertyList", "plural": clusterid.PLURAL,
                  "singular": "clusterproperty"},
        "versions": [{
            "name": clusterid.VERSION,
            "served": True,
            "storage": True,
            "additionalPrinterColumns": [
                {"name": "Value", "type": "string", "jsonPath": ".spec.value"},
                {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
            ],
            "schema": {"openAPIV3Schema": {
                "type": "object",
                "description": "A property of this cluster (KEP-2149), e.g. its id in its clusterset.",
                "properties": {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "metadata": {"type": "object"},
                    "spec": {"type": "object", "required": ["value"], "properties": {
                        "value": {"type": "string", "minLength": 1, "maxLength": 128000},
                    }},
                },
                "required": ["spec"],
            }},
        }],
    },
}

#: Every CRD ``meshfed install`` installs.
ALL_CRDS: tuple[dict[str, Any], ...] = (*CRDS, CLUSTER_PROPERTY_CRD)
