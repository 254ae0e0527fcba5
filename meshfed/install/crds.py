"""The Multi-Cluster Services API CRDs (``multicluster.x-k8s.io/v1alpha1``): ServiceExport and ServiceImport.

Written here as plain data (``apiextensions.k8s.io/v1`` CustomResourceDefinitions with structural
``openAPIV3Schema``), so the renderer needs no package data files. The schemas describe the fields that
``discovery.mcs`` reads and writes: a ServiceExport has no spec, only ``status.conditions``; a ServiceImport has
``spec.type`` (ClusterSetIP or Headless), ``spec.ports``, ``spec.ips``, session affinity, and
``status.clusters`` (the member clusters that export the service).
"""

from __future__ import annotations

from typing import Any

GROUP = "multicluster.x-k8s.io"
VERSION = "v1alpha1"

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


def _crd(kind: str, plural: str, short: list[str], schema: dict[str, Any], description: str,
         columns: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "meshfed", "multicluster.x-k8s.io/api": "v1alpha1"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower(),
                      "shortNames": short, "categories": ["multicluster"]},
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": description,
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        **schema,
                    },
                }},
            }],
        },
    }


SERVICE_EXPORT_CRD: dict[str, Any] = _crd(
    "ServiceExport", "serviceexports", ["svcex"],
    {"status": {
        "type": "object",
        "description": "What the MCS controller concluded about this export.",
        "properties": {"conditions": {
            "type": "array",
            "items": _CONDITION,
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        }},
    }},
    "Declares that the Service of the same name and namespace is exported to the clusterset.",
    [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}],
)

SERVICE_IMPORT_CRD: dict[str, Any] = _crd(
    "ServiceImport", "serviceimports", ["svcim"],
    {
        "spec": {
            "type": "object",
            "required": ["ports", "type"],
            "properties": {
                "type": {"type": "string", "enum": ["ClusterSetIP", "Headless"]},
                "ports": {"type": "array", "items": _PORT, "x-kubernetes-list-type": "atomic"},
                "ips": {"type": "array", "maxItems": 1, "items": {"type": "string"}},
                "sessionAffinity": {"type": "string", "enum": ["None", "ClientIP"]},
                "sessionAffinityConfig": {
                    "type": "object",
                    "properties": {"clientIP": {
                        "type": "object",
                        "properties": {"timeoutSeconds": {"type": "integer", "format": "int32",
                                                          "minimum": 1, "maximum": 86400}},
                    }},
                },
            },
        },
        "status": {
            "type": "object",
            "properties": {"clusters": {
                "type": "array",
                "items": {"type": "object", "required": ["cluster"],
                          "properties": {"cluster": {"type": "string"}}},
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["cluster"],
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
