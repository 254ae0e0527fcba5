"""The OpenAPI 3.1 document of the federation API (served at ``GET /v1/openapi.json``).

Written by hand next to the routes; ``tests/federation/test_openapi.py`` checks that every route of the app is
documented, that every documented route exists, and that the responses the tests receive validate against these
schemas.
"""

from __future__ import annotations

import copy
from typing import Any

_REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": _REF + name}


def _obj(props: dict[str, Any], required: list[str] | None = None, *, extra: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = required
    if not extra:
        out["additionalProperties"] = False
    return out


_STR = {"type": "string"}
_INT = {"type": "integer"}
_BOOL = {"type": "boolean"}
_TIME = {"type": "string", "format": "date-time"}
_STRMAP = {"type": "object", "additionalProperties": _STR}
# What the MCS conflict rules compare besides type and ports (each left out at its default; older peers send none).
_TRAITS = {
    "sessionAffinity": {"enum": ["None", "ClientIP"]},
    "sessionAffinityTimeoutSeconds": {"type": "integer", "minimum": 0, "maximum": 86400},
    "internalTrafficPolicy": {"enum": ["Cluster", "Local"]},
    "trafficDistribution": _STR,
    "ipFamilies": {"type": "array", "items": {"enum": ["IPv4", "IPv6"]}, "maxItems": 2},
}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
_LABEL = {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}

SCHEMAS: dict[str, Any] = {
    "Error": _obj({"error": _STR, "field": {"type": ["string", "null"],
                                            "description": "path of the offending field, e.g. services[2].ports[0]"}},
                  ["error", "field"]),
    "LimitError": {"allOf": [_ref("Error"), _obj({
        "limit": {"enum": ["maxServices", "maxEndpoints", "maxPorts", "maxLocalities", "maxBodyBytes"],
                  "description": "the publish limit the body went over (meshfed federation serve --max-...)"},
        "maximum": _INT}, ["limit", "maximum"])]},
    "Gateway": _obj({"host": _STR, "port": _PORT}, ["host", "port"]),
    # Request bodies are strict: the service refuses a field it does not know (400 naming it).
    "Registration": _obj({"network": _LABEL, "region": _STR, "zone": _STR, "gateway": _ref("RegistrationGateway")},
                         ["network"], extra=False),
    "RegistrationGateway": _obj({"host": _STR, "port": _PORT}, extra=False),
    "Member": _obj({
        "cluster": _LABEL, "network": _LABEL, "region": _STR, "zone": _STR, "gateway": _ref("Gateway"),
        "registeredAt": _TIME, "renewedAt": _TIME, "leaseTtlSeconds": {"type": "number"},
        "leaseAgeSeconds": {"type": "number", "minimum": 0}, "connected": _BOOL,
        "unreachableSince": {"type": ["string", "null"], "format": "date-time"},
    }, ["cluster", "network", "gateway", "registeredAt", "renewedAt", "leaseTtlSeconds", "connected",
        "unreachableSince"]),
    "RegisterResult": _obj({"member": _ref("Member"), "revision": _INT}, ["member", "revision"]),
    "HeartbeatResult": _obj({"member": _ref("Member")}, ["member"]),
    "DeregisterResult": _obj({"cluster": _LABEL, "revision": _INT}, ["cluster", "revision"]),
    "Port": _obj({"port": _PORT, "protocol": {"enum": ["TCP", "UDP", "SCTP"]}, "name": _STR, "appProtocol": _STR,
                  "targetPort": {"type": ["integer", "string"]}}, ["port"], extra=False),
    "Endpoint": _obj({
        "address": _STR, "ready": _BOOL, "serving": _BOOL, "terminating": _BOOL, "hostname": _STR, "zone": _STR,
        "node": _STR, "ports": {"type": "array", "items": _obj({"name": _STR, "port": _PORT}, ["port"], extra=False)},
        "labels": {"type": "object", "additionalProperties": _STR}, "serviceAccount": _STR,
    }, ["address"], extra=False),
    "LocalitySummary": _obj({"region": _STR, "zone": _STR, "cluster": _STR, "network": _STR,
                             "ready": {"type": "integer", "minimum": 0}, "weight": {"type": "integer", "minimum": 0}},
                            ["ready"], extra=False),
    "ExportedService": _obj({
        "namespace": _LABEL, "name": _LABEL, "type": {"enum": ["ClusterSetIP", "Headless"]},
        "ports": {"type": "array", "items": _ref("Port")}, "created": _TIME,
        "localities": {"type": "array", "items": _ref("LocalitySummary")},
        "endpoints": {"type": "array", "items": _ref("Endpoint"),
                      "description": "pod addresses; served only to clusters on the publisher's network"},
        **_TRAITS,
        "exportedLabels": _STRMAP, "exportedAnnotations": _STRMAP,
        "exportToPeers": {"type": "array", "items": _LABEL, "maxItems": 64,
                          "description": "peer clustersets the service is exported to (not 'svc'); absent: none"},
    }, ["namespace", "name", "ports", "created"], extra=False),
    "ExportSet": _obj({"generation": {"type": "integer", "minimum": 1},
                       "services": {"type": "array", "items": _ref("ExportedService")}},
                      ["generation", "services"], extra=False),
    "PublishResult": _obj({"cluster": _LABEL, "generation": _INT, "services": _INT, "revision": _INT},
                          ["cluster", "generation", "revision"]),
    "StaleGeneration": {"allOf": [_ref("Error"), _obj({"generation": _INT, "storedGeneration": _INT},
                                                      ["generation", "storedGeneration"])]},
    "Condition": _obj({"cluster": _LABEL, "type": _STR, "status": {"enum": ["True", "False", "Unknown"]},
                       "reason": _STR, "message": _STR, "observedGeneration": _INT, "lastTransitionTime": _TIME},
                      ["cluster", "type", "status"]),
    "RemoteEndpoints": _obj({"cluster": _LABEL, "network": _STR, "gateway": _ref("Gateway"),
                             "localities": {"type": "array", "items": _ref("LocalitySummary")},
                             "endpoints": {"type": "array", "items": _ref("Endpoint")}},
                            ["cluster", "network", "gateway", "localities", "endpoints"]),
    "CatalogService": _obj({
        "namespace": _LABEL, "name": _LABEL, "type": {"enum": ["ClusterSetIP", "Headless"]},
        "ports": {"type": "array", "items": _ref("Port")}, "ips": {"type": "array", "items": _STR},
        "clusters": {"type": "array", "items": _LABEL},
        "conditions": {"type": "array", "items": _ref("Condition")},
        "endpoints": {"type": "array", "items": _ref("RemoteEndpoints")},
        **_TRAITS,
        "labels": _STRMAP, "annotations": _STRMAP,
    }, ["namespace", "name", "type", "ports", "ips", "clusters", "conditions", "endpoints"]),
    "Catalog": _obj({"revision": _INT, "members": {"type": "array", "items": _ref("Member")},
                     "services": {"type": "array", "items": _ref("CatalogService")},
                     "trustBundle": {"type": "string", "description": "PEM roots of the trust domain"},
                     "peers": _ref("Peers")},
                    ["revision", "members", "services", "trustBundle"]),
    "PeerBundle": _obj({"peer": _LABEL, "trustDomain": _STR, "pem": {"type": "string",
                                                                     "description": "PEM roots of that trust "
                                                                                    "domain only"},
                        "sequence": _INT, "fetchedAt": _TIME, "refreshHintSeconds": _INT, "expiresAt": _TIME},
                       ["peer", "trustDomain", "pem", "sequence", "fetchedAt", "expiresAt"]),
    "PeerService": _obj({"peer": _LABEL, "trustDomain": _STR, "namespace": _LABEL, "name": _LABEL,
                         "type": {"enum": ["ClusterSetIP", "Headless"]},
                         "ports": {"type": "array", "items": _ref("Port")},
                         "endpoints": {"type": "array", "items": _ref("RemoteEndpoints"),
                                       "description": "one per exporting cluster: its east-west gateway"}},
                        ["peer", "trustDomain", "namespace", "name", "ports", "endpoints"]),
    "Peers": _obj({"version": _INT, "bundles": {"type": "array", "items": _ref("PeerBundle")},
                   "services": {"type": "array", "items": _ref("PeerService")}},
                  ["version", "bundles", "services"]),
    "PeerStatus": _obj({"name": _LABEL, "trust_domain": _STR, "bundle_endpoint": _STR, "profile": _STR,
                        "bundle_source": {"enum": ["fetched", "bootstrap", "none"]},
                        "bundle_sequence": {"type": ["integer", "null"]},
                        "bundle_age_s": {"type": ["number", "null"]}, "error": _STR, "error_kind": _STR},
                       ["name", "trust_domain", "bundle_endpoint", "bundle_source", "error"]),
    "PeersStatus": _obj({"peers": {"type": "array", "items": _ref("PeerStatus")}, "version": _INT},
                        ["peers", "version"]),
    "WatchLine": {"oneOf": [
        _obj({"revision": _INT, "type": {"const": "service"}, "namespace": _LABEL, "name": _LABEL,
              "service": {"oneOf": [_ref("CatalogService"), {"type": "null"}]}},
             ["revision", "type", "namespace", "name", "service"]),
        _obj({"revision": _INT, "type": {"const": "member"}, "cluster": _LABEL,
              "member": {"oneOf": [_ref("Member"), {"type": "null"}]}}, ["revision", "type", "cluster", "member"]),
        _obj({"revision": _INT, "type": {"const": "peers"}, "peers": _ref("Peers")}, ["revision", "type", "peers"]),
        _obj({"revision": _INT, "type": {"const": "bookmark"},
              "leases": {"type": "object", "additionalProperties": _TIME,
                         "description": "each connected member's last lease renewal (heartbeats make no revision)"}},
             ["revision", "type"]),
    ]},
    "Gone": {"allOf": [_ref("Error"), _obj({"revision": _INT, "oldest": _INT, "current": _INT},
                                           ["revision", "oldest"])]},
    "TrustBundle": _obj({"trustDomain": _STR, "sequence": _INT, "pem": _STR,
                         "jwks": _obj({"keys": {"type": "array", "items": {"type": "object"}}}, ["keys"])},
                        ["trustDomain", "pem", "jwks"]),
    "TrustStatus": _obj({
        "trustDomain": _STR, "bundleSequence": _INT, "bundleFingerprints": {"type": "array", "items": _STR},
        "serving": {"type": ["object", "null"], "properties": {
            "spiffe_id": _STR, "leaf_fingerprint": _STR, "intermediate_fingerprint": _STR,
            "root_fingerprint": {"type": ["string", "null"]}, "not_after": _TIME, "issued_at": _TIME,
            "bundle_fingerprints": {"type": "array", "items": _STR}, "bundle_sequence": _INT, "reloads": _INT}},
        "connections": {"type": "array", "items": _obj({
            "cluster": _STR, "leaf_fingerprint": _STR, "intermediate_fingerprint": _STR,
            "root_fingerprint": {"type": ["string", "null"]}, "since": _TIME, "last_request": _TIME})},
        "members": {"type": "array", "items": _STR},
    }, ["trustDomain", "bundleFingerprints", "serving", "connections", "members"]),
    "Health": _obj({"status": {"const": "ok"}}, ["status"]),
    "Ready": _obj({"status": {"enum": ["ready", "unready"]}, "revision": _INT, "error": _STR}, ["status"]),
}


def _resp(description: str, schema: str | None, *, media: str = "application/json") -> dict[str, Any]:
    out: dict[str, Any] = {"description": description}
    if schema is not None:
        out["content"] = {media: {"schema": _ref(schema)}}
    return out


_ERR = {
    "400": _resp("Malformed request; `field` names the offending field", "Error"),
    "401": _resp("No client certificate that identifies a member cluster", "Error"),
    "503": _resp("The store is unreachable", "Error"),
}
_FORBIDDEN = {"403": _resp("The caller's certificate belongs to another cluster", "Error")}
_TOO_LARGE = {"413": _resp("The body is larger than maxBodyBytes", "LimitError")}
_CLUSTER_PARAM = {"name": "cluster", "in": "path", "required": True, "schema": _LABEL,
                  "description": "The cluster id; must be the caller's own (from its client certificate)"}


def _op(summary: str, responses: dict[str, Any], *, body: str | None = None, params: list[Any] | None = None,
        public: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": dict(responses)}
    if not public:
        op["responses"].update({k: v for k, v in _ERR.items() if k not in op["responses"]})
    else:
        op["security"] = []
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
    if params:
        op["parameters"] = params
    return op


PATHS: dict[str, Any] = {
    "/v1/clusters/{cluster}": {
        "put": _op("Register a cluster (or update its network, locality and gateway) and start its lease",
                   {"200": _resp("Registered", "RegisterResult"), **_FORBIDDEN, **_TOO_LARGE}, body="Registration",
                   params=[_CLUSTER_PARAM]),
        "delete": _op("Leave the federation: remove the member and its exports",
                      {"200": _resp("Removed", "DeregisterResult"), "404": _resp("Not registered", "Error"),
                       **_FORBIDDEN}, params=[_CLUSTER_PARAM]),
    },
    "/v1/clusters/{cluster}/heartbeat": {
        "post": _op("Renew the cluster's lease (brings an unreachable member back)",
                    {"200": _resp("Renewed", "HeartbeatResult"),
                     "404": _resp("Not registered (or removed): register again", "Error"), **_FORBIDDEN},
                    params=[_CLUSTER_PARAM]),
    },
    "/v1/clusters/{cluster}/exports": {
        "put": _op("Replace the cluster's export set; the generation must increase (same generation and content is "
                   "idempotent)",
                   {"200": _resp("Stored durably", "PublishResult"),
                    "404": _resp("Not registered: register first", "Error"),
                    "409": _resp("Stale generation", "StaleGeneration"), **_FORBIDDEN, **_TOO_LARGE,
                    "422": _resp("Over a publish limit (services per member, endpoints or ports per service); "
                                 "nothing stored changes", "LimitError")},
                   body="ExportSet", params=[_CLUSTER_PARAM]),
    },
    "/v1/catalog": {
        "get": _op("The merged catalog as the caller sees it (pod addresses only from its own network)",
                   {"200": _resp("Catalog", "Catalog")}),
    },
    "/v1/catalog/watch": {
        "get": _op(
            "Stream the catalog's changes after a revision as NDJSON (one WatchLine per line); each batch ends "
            "with a bookmark line carrying the revision to resume from; idle streams get a bookmark every few "
            "seconds",
            {"200": _resp("Stream of changes", "WatchLine", media="application/x-ndjson"),
             "410": _resp("Revision too old or unknown to this replica: relist with GET /v1/catalog", "Gone")},
            params=[{"name": "revision", "in": "query", "required": True,
                     "schema": {"type": "integer", "minimum": 0}},
                    {"name": "peers", "in": "query", "required": False, "schema": {"enum": ["1"]},
                     "description": "1: also stream 'peers' lines (the peer snapshot, when the stream opens and "
                                    "whenever it changes)"}]),
    },
    "/v1/trust-bundle": {
        "get": _op("The trust bundle: PEM roots and SPIFFE JWKS", {"200": _resp("Bundle", "TrustBundle")}),
    },
    "/v1/trust/status": {
        "get": _op("Root rotation convergence as the federation sees it: the certificate it serves (and the root it "
                   "chains to), the roots it verifies clients with, and the chain each open member connection "
                   "authenticated with", {"200": _resp("Trust status", "TrustStatus")}),
    },
    "/v1/peers": {
        "get": _op("Each peer clusterset: bundle endpoint, the bundle held for its trust domain (sequence, age, "
                   "expiry), last refresh and error, services exchanged", {"200": _resp("Peers", "PeersStatus")}),
    },
    "/v1/openapi.json": {
        "get": _op("This document", {"200": {"description": "OpenAPI 3.1 document",
                                             "content": {"application/json": {"schema": {"type": "object"}}}}},
                   public=True),
    },
    "/healthz": {"get": _op("Liveness", {"200": _resp("Alive", "Health")}, public=True)},
    "/readyz": {"get": _op("Readiness: the catalog is loaded and the store reachable",
                           {"200": _resp("Ready", "Ready"), "503": _resp("Not ready", "Ready")}, public=True)},
    "/metrics": {"get": _op("Prometheus metrics", {"200": {"description": "Prometheus text format",
                                                           "content": {"text/plain": {"schema": _STR}}}},
                            public=True)},
}


def document() -> dict[str, Any]:
    return copy.deepcopy({
        "openapi": "3.1.0",
        "info": {"title": "meshfed federation API", "version": "1",
                 "description": "Membership, exports and the merged catalog shared by meshfed clusters. Every call "
                                "is mutual TLS; the client certificate names the calling cluster."},
        "servers": [{"url": "https://federation.meshfed.local:8443"}],
        "security": [{"clusterCertificate": []}],
        "paths": PATHS,
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {"clusterCertificate": {
                           "type": "mutualTLS",
                           "description": "A certificate for spiffe://<td>/meshfed/cluster/<cluster> issued by that "
                                          "cluster's intermediate CA"}}},
    })
