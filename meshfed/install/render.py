"""Pure renderers: a clusterset, its CA material and the install options in, Kubernetes objects out.

Nothing here reads or writes files or talks to a cluster; :mod:`meshfed.install.output` writes what
:func:`render_clusterset` returns and :mod:`meshfed.install.apply` applies it. The same inputs always give the
same objects in the same order (no timestamps, no random names), so a re-render is byte-identical and a re-apply
changes nothing.

Per cluster the manifests are, in apply order (``Manifest.phase``)::

    00-namespace.yaml         base          Namespace meshfed-system
    01-crds.yaml              base          ServiceExport, ServiceImport CRDs (multicluster.x-k8s.io v1beta1, v1alpha1),
                                            ClusterProperty CRD (about.k8s.io v1alpha1)
    02-rbac.yaml              base          ServiceAccounts, ClusterRole, ClusterRoleBinding
    03-clusterid.yaml         ca            ClusterProperties cluster.clusterset.k8s.io (the cluster id) and
                                            clusterset.k8s.io (the clusterset name), KEP-2149
    03-cacerts.yaml           ca            Secret cacerts: the cluster's intermediate CA (Istio plug-in layout)
    04-federation-ca.yaml     federation    Secret meshfed-federation-ca  (federation cluster only)
    05-federation.yaml        federation    federation service (+ PVC for SQLite, or an etcd StatefulSet)
    06-controlplane.yaml      controlplane  ConfigMap clusterset, Deployment and Service meshfed-controlplane,
                                            MutatingWebhookConfiguration meshfed-sidecar-injector
    07-gateway.yaml           gateway       Envoy bootstrap ConfigMap, Deployment, PDB, LoadBalancer Service

and, outside the apply plan, the cluster DNS pieces forwarding ``clusterset.local`` to the control plane Service's
DNS port (:mod:`meshfed.install.clusterdns`), for clusters whose DNS Service IP was given (``dns_service_ips``).

Across clusters the phases run in order: every cluster's base and CA, then the federation, then the control
planes, then the gateways (see :data:`PHASES`).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import ipaddress
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from discovery.clusterid import CLUSTER_ID_PROPERTY, CLUSTERSET_PROPERTY, identity_objects
from discovery.clusterset import ClusterSet, peers_file_text
from discovery.model import ClusterId, ClusterInfo, Locality, Namespace
from gateway.bootstrap import add_admin_listener, add_health_listener, render_bootstrap
from gateway.context import ProxyInfo, ProxyKind
from meshfed.inject import NAMESPACE_LABEL, PART_OF_LABEL, InjectConfig
from meshfed.install import RenderError
from meshfed.install.clusterdns import ClusterDns
from meshfed.install.crds import ALL_CRDS

Obj = dict[str, Any]

NAMESPACE = "meshfed-system"
DEFAULT_IMAGE = "ghcr.io/meshfed/meshfed:0.1.0"
DEFAULT_ETCD_IMAGE = "registry.k8s.io/etcd:3.5.15-0"
DEFAULT_CLUSTER_DOMAIN = "cluster.local"
XDS_AUDIENCE = "meshfed"
TOKEN_PLACEHOLDER = "__MESHFED_XDS_TOKEN__"

CONTROLPLANE = "meshfed-controlplane"
GATEWAY = "meshfed-eastwest-gateway"
FEDERATION = "meshfed-federation"
ETCD = "meshfed-etcd"
CACERTS = "cacerts"
FEDERATION_CA = "meshfed-federation-ca"
CLUSTERSET_CONFIGMAP = "meshfed-clusterset"
GATEWAY_BOOTSTRAP = "meshfed-eastwest-gateway-bootstrap"

XDS_PORT = 15010
XDS_MTLS_PORT = 15012  # ADS over mutual TLS for proxyless gRPC workloads (certificate-authenticated)
ADMIN_PORT = 15014
WEBHOOK_CONTAINER_PORT = 15017
WEBHOOK_PORT = 443
WEBHOOK_CONFIG = "meshfed-sidecar-injector"
WEBHOOK_NAME = "inject.meshfed.io"
WEBHOOK_TIMEOUT_SECONDS = 10
DNS_PORT = 53
DNS_CONTAINER_PORT = 5353
GATEWAY_PORT = 15443
GATEWAY_HEALTH_PORT = 15021
GATEWAY_METRICS_PORT = 15090  # /stats/prometheus only (as a sidecar's), for the cluster's Prometheus
ENVOY_ADMIN_PORT = 15000
FEDERATION_PORT = 8443
FEDERATION_METRICS_PORT = 15014  # the federation's GET /metrics (plain HTTP) for the cluster's Prometheus
PEERING_PORT = 8444  # the federation's SPIFFE bundle endpoint and service exchange with peer clustersets
FEDERATION_PEERS = "meshfed-federation-peers"  # ConfigMap: peers.yaml and the peers' bootstrap bundles
PEERS_DIR = "/etc/meshfed/peers"
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
ETCD_REPLICAS = 3

RUN_AS = 10001
CA_KEYS = ("ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem", "bundle.json")


class ApplyPhase(enum.StrEnum):
    """Apply phases, in order. Objects of one phase are applied in every cluster before the next phase starts."""

    BASE = "base"
    CA = "ca"
    FEDERATION = "federation"
    CONTROLPLANE = "controlplane"
    GATEWAY = "gateway"


PHASES: tuple[ApplyPhase, ...] = tuple(ApplyPhase)


@dataclass(frozen=True, slots=True)
class CAFiles:
    """One CA directory's files (Istio's plug-in CA layout) as bytes: what goes into a CA Secret."""

    ca_cert: bytes
    ca_key: bytes
    root_cert: bytes
    cert_chain: bytes
    bundle_json: bytes = b""

    def secret_data(self) -> dict[str, str]:
        files = {
            "ca-cert.pem": self.ca_cert,
            "ca-key.pem": self.ca_key,
            "root-cert.pem": self.root_cert,
            "cert-chain.pem": self.cert_chain,
        }
        if self.bundle_json:
            files["bundle.json"] = self.bundle_json
        return {k: base64.b64encode(v).decode("ascii") for k, v in files.items()}

    def __repr__(self) -> str:  # never show the key
        return f"CAFiles(ca_cert={len(self.ca_cert)}B, ca_key=<hidden>, root_cert={len(self.root_cert)}B)"


@dataclass(frozen=True, slots=True)
class InstallOptions:
    """Everything the manifests depend on besides the clusterset and the CA material."""

    image: str = DEFAULT_IMAGE
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    namespace: str = NAMESPACE
    federation_store: Literal["sqlite", "etcd"] = "sqlite"
    federation_cluster: str | None = None
    """The cluster that runs the federation service (default: the first cluster of the clusterset)."""
    federation_url: str | None = None
    """How the other clusters' control planes reach the federation service (its LoadBalancer address or DNS
    name). Default: the in-cluster name, which only works in the federation cluster itself."""
    etcd_image: str = DEFAULT_ETCD_IMAGE
    storage_size: str = "1Gi"
    storage_class: str | None = None
    gateway_replicas: int = 2
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN
    dns_service_ips: Mapping[str, str] = field(default_factory=dict)
    """Per cluster, the cluster IP the control plane Service gets (``spec.clusterIP``): where the cluster DNS
    forwards ``clusterset.local``. A cluster without one gets no cluster DNS pieces (they need an address)."""

    def svc_host(self, name: str) -> str:
        return f"{name}.{self.namespace}.svc.{self.cluster_domain}"


@dataclass(frozen=True, slots=True)
class Manifest:
    """One file of one cluster: its objects, in order."""

    cluster: ClusterId
    filename: str
    phase: ApplyPhase
    objects: tuple[Obj, ...]
    secret: bool = False
    """Holds private keys: written 0600."""
    description: str = ""


@dataclass(frozen=True, slots=True)
class Rendered:
    """Everything one render produced."""

    clusterset: ClusterSet
    federation_cluster: ClusterId
    manifests: tuple[Manifest, ...]
    warnings: tuple[str, ...] = ()
    cluster_dns: tuple[ClusterDns, ...] = ()
    """The ``clusterset.local`` forward of each cluster whose DNS Service IP is known (not in the apply plan)."""
    namespace: str = NAMESPACE

    def dns_for(self, cluster: str) -> ClusterDns | None:
        return next((d for d in self.cluster_dns if d.cluster == cluster), None)

    def for_cluster(self, cluster: str) -> tuple[Manifest, ...]:
        return tuple(m for m in self.manifests if m.cluster == cluster)


@dataclass(frozen=True, slots=True)
class ClusterCA:
    """The CA material one render needs: each cluster's intermediate and the federation service's."""

    clusters: Mapping[str, CAFiles]
    federation: CAFiles
    root_fingerprint: str = ""


# --------------------------------------------------------------------------------------------- helpers


def _labels(component: str, cluster: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": component,
        "app.kubernetes.io/part-of": "meshfed",
        "app.kubernetes.io/managed-by": "meshfed-install",
        "meshfed.io/cluster": cluster,
    }


def _selector(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": component}


def _meta(name: str, component: str, cluster: str, namespace: str | None) -> Obj:
    meta: Obj = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    meta["labels"] = _labels(component, cluster)
    return meta


def content_hash(*parts: Any) -> str:
    """A stable SHA-256 over JSON-serialisable parts (pod template annotations roll pods when config changes)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


def _container_security() -> Obj:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pod_security() -> Obj:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _resources(cpu: str, memory: str, memory_limit: str) -> Obj:
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory_limit}}


def _copy_ca_init(opts: InstallOptions, source: str, target: str) -> Obj:
    """An init container copying a CA Secret's files into a memory volume as 0600 files owned by the process.

    Secret volumes show files as root-owned symlinks, group-readable through ``fsGroup``; the trust store refuses
    to load a key that is readable by anyone but its owner, so the process reads the private copy instead."""
    return {
        "name": "copy-ca",
        "image": opts.image,
        "imagePullPolicy": opts.image_pull_policy,
        "command": ["/bin/sh", "-c", f"set -eu; umask 077; cp -L {source}/* {target}/"],
        "securityContext": _container_security(),
        "resources": _resources("10m", "16Mi", "64Mi"),
        "volumeMounts": [
            {"name": "ca-secret", "mountPath": source, "readOnly": True},
            {"name": "ca", "mountPath": target},
        ],
    }


def _ca_volumes(secret: str) -> list[Obj]:
    return [
        {"name": "ca-secret", "secret": {"secretName": secret, "defaultMode": 0o440}},
        {"name": "ca", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
    ]


def _tcp_probe(port: str, period: int, failures: int) -> Obj:
    return {"tcpSocket": {"port": port}, "periodSeconds": period, "failureThreshold": failures, "timeoutSeconds": 2}


def _http_probe(path: str, port: str, period: int, failures: int) -> Obj:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "failureThreshold": failures,
            "timeoutSeconds": 2}


# --------------------------------------------------------------------------------------------- base


def namespace_objects(cluster: ClusterInfo, opts: InstallOptions) -> list[Obj]:
    meta = _meta(opts.namespace, "meshfed", cluster.id, None)
    meta["labels"]["topology.istio.io/network"] = str(cluster.network)
    return [{"apiVersion": "v1", "kind": "Namespace", "metadata": meta}]


def crd_objects() -> list[Obj]:
    return [json.loads(json.dumps(crd)) for crd in ALL_CRDS]


def _rule(groups: Sequence[str], resources: Sequence[str], verbs: Sequence[str]) -> Obj:
    return {"apiGroups": list(groups), "resources": list(resources), "verbs": list(verbs)}


READ = ("get", "list", "watch")


def controlplane_rules() -> list[Obj]:
    """What the control plane may do: read services and endpoints, own ServiceImports and export status, check
    xDS clients' tokens, and read Istio networking and security policies."""
    return [
        _rule([""], ["services", "namespaces", "pods", "nodes"], READ),
        _rule(["discovery.k8s.io"], ["endpointslices"], [*READ, "create", "update", "patch", "delete"]),
        _rule(["multicluster.x-k8s.io"], ["serviceexports"], READ),
        _rule(["multicluster.x-k8s.io"], ["serviceexports/status"], ["get", "update", "patch"]),
        _rule(["multicluster.x-k8s.io"], ["serviceimports"], [*READ, "create", "update", "patch", "delete"]),
        _rule(["multicluster.x-k8s.io"], ["serviceimports/status"], ["get", "update", "patch"]),
        _rule(["authentication.k8s.io"], ["tokenreviews"], ["create"]),
        # Only the injector's own configuration, to keep its caBundle equal to the clusterset's roots.
        {**_rule(["admissionregistration.k8s.io"], ["mutatingwebhookconfigurations"], ["get", "update"]),
         "resourceNames": [WEBHOOK_CONFIG]},
        _rule(["about.k8s.io"], ["clusterproperties"], READ),
        _rule(["networking.istio.io"],
              ["destinationrules", "virtualservices", "serviceentries", "gateways", "sidecars"], READ),
        _rule(["security.istio.io"], ["authorizationpolicies", "peerauthentications", "requestauthentications"],
              READ),
    ]


def rbac_objects(cluster: ClusterInfo, opts: InstallOptions, *, federation: bool) -> list[Obj]:
    cid = cluster.id
    out: list[Obj] = []
    accounts = [(CONTROLPLANE, True), (GATEWAY, False)]
    if federation:
        accounts.append((FEDERATION, False))
    for name, automount in accounts:
        out.append({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(name, name, cid, opts.namespace),
                    "automountServiceAccountToken": automount})
    out.append({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": _meta(CONTROLPLANE, CONTROLPLANE, cid, None),
        "rules": controlplane_rules(),
    })
    out.append({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": _meta(CONTROLPLANE, CONTROLPLANE, cid, None),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": CONTROLPLANE},
        "subjects": [{"kind": "ServiceAccount", "name": CONTROLPLANE, "namespace": opts.namespace}],
    })
    return out


def ca_secret(name: str, component: str, cluster: str, ca: CAFiles, opts: InstallOptions) -> Obj:
    meta = _meta(name, component, cluster, opts.namespace)
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque", "data": ca.secret_data()}


# --------------------------------------------------------------------------------------------- federation


def federation_store_url(opts: InstallOptions) -> str:
    if opts.federation_store == "sqlite":
        return "sqlite:/var/lib/meshfed/federation.db"
    peers = ",".join(f"{ETCD}-{i}.{opts.svc_host(ETCD)}:{ETCD_CLIENT_PORT}" for i in range(ETCD_REPLICAS))
    return f"etcd://{peers}"


def federation_objects(cs: ClusterSet, cluster: ClusterInfo, opts: InstallOptions, fed_ca: CAFiles) -> list[Obj]:
    cid = cluster.id
    ns = opts.namespace
    out: list[Obj] = []
    sqlite = opts.federation_store == "sqlite"
    if sqlite:
        pvc_spec: Obj = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": opts.storage_size}}}
        if opts.storage_class:
            pvc_spec["storageClassName"] = opts.storage_class
        out.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                    "metadata": _meta(f"{FEDERATION}-data", FEDERATION, cid, ns), "spec": pvc_spec})
    else:
        out.extend(etcd_objects(cs, cluster, opts))
    peers = peers_configmap(cs, cluster, opts)
    args = [
        "federation", "serve",
        "--store", federation_store_url(opts),
        "--listen", f"0.0.0.0:{FEDERATION_PORT}",
        "--ca", "/etc/meshfed/federation-ca",
        "--lease-ttl", f"{cs.federation.lease_ttl:g}",
        "--cidr", cs.cidr,
        # The SPIFFE bundle endpoint and the exchange with peer clustersets (docs/peering.md); the peers file is
        # the ConfigMap below (a change reaches the pod through the kubelet and is re-read), the last good peer
        # bundles are kept on the data volume (sqlite) or in /tmp (etcd: every replica fetches its own).
        "--peering-listen", f"0.0.0.0:{PEERING_PORT}",
        "--peers", f"{PEERS_DIR}/peers.yaml",
        "--peer-state", "/var/lib/meshfed/peer-state" if sqlite else "/tmp/peer-state",
        # GET /metrics alone, plain HTTP, for the cluster's Prometheus (it cannot check SPIFFE identities)
        "--metrics-listen", f"0.0.0.0:{FEDERATION_METRICS_PORT}",
    ]
    mounts: list[Obj] = [{"name": "ca", "mountPath": "/etc/meshfed/federation-ca", "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"},
                         {"name": "peers", "mountPath": PEERS_DIR, "readOnly": True}]
    volumes: list[Obj] = [*_ca_volumes(FEDERATION_CA), {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                          {"name": "peers", "configMap": {"name": FEDERATION_PEERS}}]
    if sqlite:
        mounts.append({"name": "data", "mountPath": "/var/lib/meshfed"})
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": f"{FEDERATION}-data"}})
    container: Obj = {
        "name": "federation",
        "image": opts.image,
        "imagePullPolicy": opts.image_pull_policy,
        "args": args,
        "ports": [{"name": "https", "containerPort": FEDERATION_PORT, "protocol": "TCP"},
                  {"name": "peering", "containerPort": PEERING_PORT, "protocol": "TCP"},
                  {"name": "http-metrics", "containerPort": FEDERATION_METRICS_PORT, "protocol": "TCP"}],
        # The service speaks mutual TLS only, so kubelet (which has no client certificate) probes the socket.
        "startupProbe": _tcp_probe("https", 2, 60),
        "livenessProbe": _tcp_probe("https", 10, 3),
        "readinessProbe": _tcp_probe("https", 5, 2),
        "resources": _resources("100m", "128Mi", "512Mi"),
        "securityContext": _container_security(),
        "volumeMounts": mounts,
    }
    template_hash = content_hash(fed_ca.secret_data(), args, peers["data"])
    deployment: Obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(FEDERATION, FEDERATION, cid, ns),
        "spec": {
            "replicas": 1 if sqlite else 2,
            "strategy": {"type": "Recreate"} if sqlite else {
                "type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "selector": {"matchLabels": _selector(FEDERATION)},
            "template": {
                "metadata": {"labels": _labels(FEDERATION, cid),
                             "annotations": {"meshfed.io/config-hash": template_hash}},
                "spec": {
                    "serviceAccountName": FEDERATION,
                    "automountServiceAccountToken": False,
                    "securityContext": _pod_security(),
                    "initContainers": [_copy_ca_init(opts, "/etc/meshfed/federation-ca-secret",
                                                     "/etc/meshfed/federation-ca")],
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }
    service: Obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(FEDERATION, FEDERATION, cid, ns),
        "spec": {
            # Other clusters' control planes connect from outside this cluster.
            "type": "LoadBalancer" if len(cs.clusters) > 1 else "ClusterIP",
            "selector": _selector(FEDERATION),
            "ports": [{"name": "https", "port": FEDERATION_PORT, "targetPort": "https", "protocol": "TCP"},
                      {"name": "peering", "port": PEERING_PORT, "targetPort": "peering", "protocol": "TCP"}],
        },
    }
    out.extend([peers, deployment, service])
    return out


def peers_configmap(cs: ClusterSet, cluster: ClusterInfo, opts: InstallOptions) -> Obj:
    """The federation's peers file from the clusterset's ``peers:``, each bootstrap bundle beside it (a key of
    the same ConfigMap). ``meshfed peer add --peers-file`` edits a copy of ``peers.yaml`` for the same purpose."""
    data: dict[str, str] = {}
    decls = []
    for d in cs.peers:
        if d.bootstrap_bundle is not None:
            key = f"bootstrap-{d.name}.json"
            try:
                data[key] = d.bootstrap_bundle.read_text(encoding="utf-8")
            except OSError as exc:
                raise RenderError(f"peer {d.name}: bootstrap bundle {d.bootstrap_bundle}: {exc.strerror or exc}"
                                  ) from exc
            d = replace(d, bootstrap_bundle=Path(PEERS_DIR) / key)
        if d.ca_file is not None:
            raise RenderError(f"peer {d.name}: caFile is for local tests; a cluster install uses the system store")
        decls.append(d)
    data["peers.yaml"] = peers_file_text(decls)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(FEDERATION_PEERS, FEDERATION, cluster.id,
                                                                        opts.namespace), "data": data}


def etcd_objects(cs: ClusterSet, cluster: ClusterInfo, opts: InstallOptions) -> list[Obj]:
    """A three-member etcd for the federation store: a headless Service for peer names, a client Service, the
    StatefulSet, and a NetworkPolicy letting only the federation service (and the members) in."""
    cid = cluster.id
    ns = opts.namespace
    peer_host = opts.svc_host(ETCD)
    initial = ",".join(f"{ETCD}-{i}=http://{ETCD}-{i}.{peer_host}:{ETCD_PEER_PORT}" for i in range(ETCD_REPLICAS))
    ports = [
        {"name": "client", "port": ETCD_CLIENT_PORT, "targetPort": "client", "protocol": "TCP"},
        {"name": "peer", "port": ETCD_PEER_PORT, "targetPort": "peer", "protocol": "TCP"},
    ]
    headless: Obj = {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(ETCD, ETCD, cid, ns),
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": _selector(ETCD), "ports": ports},
    }
    pvc_spec: Obj = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": opts.storage_size}}}
    if opts.storage_class:
        pvc_spec["storageClassName"] = opts.storage_class
    container: Obj = {
        "name": "etcd",
        "image": opts.etcd_image,
        "imagePullPolicy": opts.image_pull_policy,
        "command": [
            "etcd",
            "--name=$(POD_NAME)",
            "--data-dir=/var/lib/etcd/data",
            f"--listen-client-urls=http://0.0.0.0:{ETCD_CLIENT_PORT}",
            f"--advertise-client-urls=http://$(POD_NAME).{peer_host}:{ETCD_CLIENT_PORT}",
            f"--listen-peer-urls=http://0.0.0.0:{ETCD_PEER_PORT}",
            f"--initial-advertise-peer-urls=http://$(POD_NAME).{peer_host}:{ETCD_PEER_PORT}",
            f"--initial-cluster={initial}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token=meshfed-{cs.name}",
            "--auto-compaction-mode=revision",
            "--auto-compaction-retention=10000",
        ],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "ports": [{"name": "client", "containerPort": ETCD_CLIENT_PORT, "protocol": "TCP"},
                  {"name": "peer", "containerPort": ETCD_PEER_PORT, "protocol": "TCP"}],
        "readinessProbe": _http_probe("/health", "client", 5, 3),
        "livenessProbe": _tcp_probe("client", 10, 6),
        "resources": _resources("100m", "256Mi", "1Gi"),
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/etcd"}],
    }
    statefulset: Obj = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta(ETCD, ETCD, cid, ns),
        "spec": {
            "serviceName": ETCD,
            "replicas": ETCD_REPLICAS,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": _selector(ETCD)},
            "template": {
                "metadata": {"labels": _labels(ETCD, cid)},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": _pod_security(),
                    "containers": [container],
                },
            },
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": pvc_spec}],
        },
    }
    policy: Obj = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(ETCD, ETCD, cid, ns),
        "spec": {
            "podSelector": {"matchLabels": _selector(ETCD)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": _selector(FEDERATION)}}],
                 "ports": [{"port": ETCD_CLIENT_PORT, "protocol": "TCP"}]},
                {"from": [{"podSelector": {"matchLabels": _selector(ETCD)}}],
                 "ports": [{"port": ETCD_PEER_PORT, "protocol": "TCP"},
                           {"port": ETCD_CLIENT_PORT, "protocol": "TCP"}]},
            ],
        },
    }
    return [headless, statefulset, policy]


# --------------------------------------------------------------------------------------------- control plane


def federation_url_for(cluster: ClusterInfo, federation_cluster: str, opts: InstallOptions) -> str:
    if cluster.id == federation_cluster or not opts.federation_url:
        return f"https://{opts.svc_host(FEDERATION)}:{FEDERATION_PORT}"
    return opts.federation_url


PENDING_CONTROLPLANE_FLAGS: frozenset[str] = frozenset()
"""Flags the Deployment passes that ``meshfed controlplane`` does not take yet: none any more (``--source``,
``--xds-token-audience`` and ``--xds-mtls-listen`` all exist); the test that parses the rendered command line with
the real CLI allows exactly these."""


def xds_mtls_hosts(opts: InstallOptions) -> list[str]:
    """The names the control plane's mTLS ADS certificate is valid for: its Service's in-cluster names, short and
    fully qualified (gRPC checks the name in the bootstrap's ``server_uri`` against them)."""
    full = opts.svc_host(CONTROLPLANE)
    short = f"{CONTROLPLANE}.{opts.namespace}.svc"
    return [short, full] if short != full else [full]


def gateway_address(cluster: ClusterInfo, opts: InstallOptions) -> str:
    """Where other clusters reach this cluster's east-west gateway: the clusterset's ``gateway.host`` when set,
    else the gateway Service's in-cluster name (a placeholder until its LoadBalancer has an address)."""
    if cluster.gateway_host:
        return f"{cluster.gateway_host}:{cluster.gateway_port}"
    return f"{opts.svc_host(GATEWAY)}:{GATEWAY_PORT}"


def controlplane_args(cluster: ClusterInfo, federation_url: str, opts: InstallOptions) -> list[str]:
    """The ``meshfed controlplane`` command line the Deployment runs (the image's entrypoint is ``meshfed``)."""
    return [
        "controlplane",
        "--cluster", str(cluster.id),
        "--clusterset", "/etc/meshfed/clusterset.yaml",
        "--federation", federation_url,
        "--ca", "/etc/cacerts",
        "--xds-listen", f"0.0.0.0:{XDS_PORT}",
        "--xds-mtls-listen", f"0.0.0.0:{XDS_MTLS_PORT}",
        *(arg for host in xds_mtls_hosts(opts) for arg in ("--xds-mtls-host", host)),
        "--dns-listen", f"0.0.0.0:{DNS_CONTAINER_PORT}",
        "--admin-listen", f"0.0.0.0:{ADMIN_PORT}",
        "--gateway-address", gateway_address(cluster, opts),
        "--source", "kubernetes",
        "--xds-token-audience", XDS_AUDIENCE,
        "--webhook-listen", f"0.0.0.0:{WEBHOOK_CONTAINER_PORT}", "--webhook-configuration", WEBHOOK_CONFIG,
        *(arg for host in xds_mtls_hosts(opts) for arg in ("--webhook-host", host)),
        "--inject-image", opts.image,
        "--inject-image-pull-policy", opts.image_pull_policy,
        "--inject-xds-address", inject_config(str(cluster.id), opts).xds_address,
        "--inject-xds-mtls-address", inject_config(str(cluster.id), opts).xds_mtls_address,
    ]


def controlplane_objects(
    cs: ClusterSet, cluster: ClusterInfo, opts: InstallOptions, ca: CAFiles, clusterset_yaml: str, federation_url: str,
    dns: ClusterDns | None = None,
) -> list[Obj]:
    cid = cluster.id
    ns = opts.namespace
    config: Obj = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(CLUSTERSET_CONFIGMAP, CONTROLPLANE, cid, ns),
        "data": {"clusterset.yaml": clusterset_yaml},
    }
    args = controlplane_args(cluster, federation_url, opts)
    container: Obj = {
        "name": "controlplane",
        "image": opts.image,
        "imagePullPolicy": opts.image_pull_policy,
        "args": args,
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        ],
        "ports": [
            {"name": "grpc-xds", "containerPort": XDS_PORT, "protocol": "TCP"},
            {"name": "grpc-xds-mtls", "containerPort": XDS_MTLS_PORT, "protocol": "TCP"},
            {"name": "dns", "containerPort": DNS_CONTAINER_PORT, "protocol": "UDP"},
            {"name": "dns-tcp", "containerPort": DNS_CONTAINER_PORT, "protocol": "TCP"},
            {"name": "http-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
            {"name": "https-webhook", "containerPort": WEBHOOK_CONTAINER_PORT, "protocol": "TCP"},
        ],
        "startupProbe": _http_probe("/healthz", "http-admin", 2, 60),
        "livenessProbe": _http_probe("/healthz", "http-admin", 10, 3),
        "readinessProbe": _http_probe("/readyz", "http-admin", 5, 2),
        "resources": _resources("200m", "256Mi", "1Gi"),
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "ca", "mountPath": "/etc/cacerts", "readOnly": True},
            {"name": "clusterset", "mountPath": "/etc/meshfed", "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    template_hash = content_hash(ca.secret_data(), config["data"], args)
    deployment: Obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(CONTROLPLANE, CONTROLPLANE, cid, ns),
        "spec": {
            "replicas": 1,
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "selector": {"matchLabels": _selector(CONTROLPLANE)},
            "template": {
                "metadata": {"labels": _labels(CONTROLPLANE, cid),
                             "annotations": {"meshfed.io/config-hash": template_hash,
                                             "prometheus.io/scrape": "true",
                                             "prometheus.io/port": str(ADMIN_PORT)}},
                "spec": {
                    "serviceAccountName": CONTROLPLANE,
                    "securityContext": _pod_security(),
                    "initContainers": [_copy_ca_init(opts, "/etc/cacerts-secret", "/etc/cacerts")],
                    "containers": [container],
                    "volumes": [
                        *_ca_volumes(CACERTS),
                        {"name": "clusterset", "configMap": {"name": CLUSTERSET_CONFIGMAP}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                    ],
                },
            },
        },
    }
    service_spec: Obj = {"type": "ClusterIP"}
    if dns is not None:  # the cluster DNS forwards clusterset.local here (an address, never a name)
        service_spec["clusterIP"] = dns.ip
    service: Obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(CONTROLPLANE, CONTROLPLANE, cid, ns),
        "spec": {
            **service_spec,
            "selector": _selector(CONTROLPLANE),
            "ports": [
                {"name": "grpc-xds", "port": XDS_PORT, "targetPort": "grpc-xds", "protocol": "TCP",
                 "appProtocol": "grpc"},
                {"name": "grpc-xds-mtls", "port": XDS_MTLS_PORT, "targetPort": "grpc-xds-mtls", "protocol": "TCP",
                 "appProtocol": "grpc"},
                {"name": "dns", "port": DNS_PORT, "targetPort": "dns", "protocol": "UDP"},
                {"name": "dns-tcp", "port": DNS_PORT, "targetPort": "dns-tcp", "protocol": "TCP"},
                {"name": "http-admin", "port": ADMIN_PORT, "targetPort": "http-admin", "protocol": "TCP",
                 "appProtocol": "http"},
                {"name": "https-webhook", "port": WEBHOOK_PORT, "targetPort": "https-webhook", "protocol": "TCP",
                 "appProtocol": "https"},
            ],
        },
    }
    return [config, deployment, service, webhook_configuration(cluster, opts, ca)]


def webhook_configuration(cluster: ClusterInfo, opts: InstallOptions, ca: CAFiles) -> Obj:
    """The MutatingWebhookConfiguration sending new pods of opted-in namespaces to the control plane's
    ``/inject``: its ``caBundle`` is the cluster's root, which the webhook's serving certificate (issued by the
    cluster's intermediate for the Service's names, ``--webhook-host``) chains to; the running control plane keeps
    it equal to the clusterset's roots through rotations (``--webhook-configuration``). meshfed's own pods and namespace
    are never sent; ``failurePolicy: Fail`` therefore only holds back pods of namespaces that asked for the mesh."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": _meta(WEBHOOK_CONFIG, CONTROLPLANE, cluster.id, None),
        "webhooks": [{
            "name": WEBHOOK_NAME,
            "admissionReviewVersions": ["v1"],
            "clientConfig": {
                "service": {"name": CONTROLPLANE, "namespace": opts.namespace, "path": "/inject",
                            "port": WEBHOOK_PORT},
                "caBundle": base64.b64encode(ca.root_cert).decode("ascii"),
            },
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"],
                       "scope": "Namespaced"}],
            "namespaceSelector": {
                "matchLabels": {NAMESPACE_LABEL: "enabled"},
                "matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                                      "values": [opts.namespace, "kube-system"]}],
            },
            "objectSelector": {"matchExpressions": [
                {"key": PART_OF_LABEL, "operator": "NotIn", "values": ["meshfed"]}]},
            "failurePolicy": "Fail",
            "matchPolicy": "Equivalent",
            "reinvocationPolicy": "IfNeeded",
            "sideEffects": "None",
            "timeoutSeconds": WEBHOOK_TIMEOUT_SECONDS,
        }],
    }


# --------------------------------------------------------------------------------------------- gateway


GATEWAY_SCRIPT = r"""set -eu
umask 077
render() {
  token=$(cat "$MESHFED_XDS_TOKEN_FILE")
  sed "s|__MESHFED_XDS_TOKEN__|$token|" "$MESHFED_BOOTSTRAP_TEMPLATE" > "$MESHFED_RUN_DIR/bootstrap.yaml.tmp"
  mv "$MESHFED_RUN_DIR/bootstrap.yaml.tmp" "$MESHFED_RUN_DIR/bootstrap.yaml"
  cp "$MESHFED_XDS_TOKEN_FILE" "$MESHFED_RUN_DIR/token.seen"
}
render
envoy -c "$MESHFED_RUN_DIR/bootstrap.yaml" --service-node "$MESHFED_NODE_ID" \
  --concurrency "${MESHFED_ENVOY_CONCURRENCY:-2}" --disable-hot-restart --drain-time-s 20 &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true; wait "$pid" || true; exit 0' TERM INT
while kill -0 "$pid" 2>/dev/null; do
  sleep "${MESHFED_TOKEN_POLL_SECONDS:-60}" &
  wait $! || true
  if ! cmp -s "$MESHFED_XDS_TOKEN_FILE" "$MESHFED_RUN_DIR/token.seen"; then
    echo "meshfed gateway: xDS token refreshed; restarting so the next ADS stream presents it" >&2
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" || true
    exit 0
  fi
done
wait "$pid"
"""
"""The gateway container's program: put the projected service-account token into Envoy's bootstrap (Envoy's
``initial_metadata`` is static), run Envoy, and exit when kubelet refreshes the token so the container restarts
with the new one (the ADS stream authenticates with it only when it opens)."""


def inject_config(cluster: str, opts: InstallOptions) -> InjectConfig:
    """What the sidecar injector gives a pod of ``cluster``: the install's image, its control plane Service's
    plain ADS port, the xDS token audience the control plane checks."""
    return InjectConfig(cluster=cluster, image=opts.image, image_pull_policy=opts.image_pull_policy,
                        xds_address=f"{opts.svc_host(CONTROLPLANE)}:{XDS_PORT}", audience=XDS_AUDIENCE,
                        xds_mtls_address=f"{opts.svc_host(CONTROLPLANE)}:{XDS_MTLS_PORT}")


def gateway_node_id(opts: InstallOptions) -> str:
    """The node id each gateway pod presents (Kubernetes expands ``$(POD_IP)``/``$(POD_NAME)`` in env values)."""
    return f"gateway~$(POD_IP)~$(POD_NAME).{opts.namespace}~{opts.namespace}.svc.{opts.cluster_domain}"


def gateway_bootstrap(cluster: ClusterInfo, opts: InstallOptions) -> Obj:
    """The Envoy bootstrap for the east-west gateway: ADS from the control plane Service, plus a static health
    listener on :15021 answering ``/healthz/ready`` from Envoy's own ``/ready`` and one on :15090 serving
    ``/stats/prometheus`` alone (admin stays on loopback)."""
    proxy = ProxyInfo(
        kind=ProxyKind.GATEWAY,
        cluster=cluster.id,
        node_id=f"gateway~0.0.0.0~{GATEWAY}.{opts.namespace}~{opts.namespace}.svc.{opts.cluster_domain}",
        namespace=Namespace(opts.namespace),
        service_account=GATEWAY,
        gateway_port=GATEWAY_PORT,
        ip="0.0.0.0",
    )
    bootstrap = render_bootstrap(
        proxy,
        xds_host=opts.svc_host(CONTROLPLANE),
        xds_port=XDS_PORT,
        admin_port=ENVOY_ADMIN_PORT,
        token=TOKEN_PLACEHOLDER,
        delta=True,
        locality=Locality(region=cluster.region, zone=cluster.zone, cluster=str(cluster.id),
                          network=str(cluster.network)),
    )
    add_health_listener(bootstrap, port=GATEWAY_HEALTH_PORT, admin_port=ENVOY_ADMIN_PORT)
    return add_admin_listener(bootstrap, name="prometheus", port=GATEWAY_METRICS_PORT, admin_port=ENVOY_ADMIN_PORT,
                              routes={"/stats/prometheus": "/stats/prometheus"})


def gateway_objects(cluster: ClusterInfo, opts: InstallOptions, bootstrap_yaml: str) -> list[Obj]:
    cid = cluster.id
    ns = opts.namespace
    config: Obj = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(GATEWAY_BOOTSTRAP, GATEWAY, cid, ns),
        "data": {"bootstrap.yaml": bootstrap_yaml},
    }
    container: Obj = {
        "name": "envoy",
        "image": opts.image,
        "imagePullPolicy": opts.image_pull_policy,
        "command": ["/bin/sh", "-c", GATEWAY_SCRIPT],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "MESHFED_NODE_ID", "value": gateway_node_id(opts)},
            {"name": "MESHFED_XDS_TOKEN_FILE", "value": "/var/run/secrets/meshfed/xds/token"},
            {"name": "MESHFED_BOOTSTRAP_TEMPLATE", "value": "/etc/meshfed/envoy/bootstrap.yaml"},
            {"name": "MESHFED_RUN_DIR", "value": "/var/run/meshfed"},
            {"name": "MESHFED_ENVOY_CONCURRENCY", "value": "2"},
        ],
        "ports": [
            {"name": "tls", "containerPort": GATEWAY_PORT, "protocol": "TCP"},
            {"name": "http-health", "containerPort": GATEWAY_HEALTH_PORT, "protocol": "TCP"},
            {"name": "http-envoy-prom", "containerPort": GATEWAY_METRICS_PORT, "protocol": "TCP"},
        ],
        "startupProbe": _http_probe("/healthz/ready", "http-health", 2, 60),
        "livenessProbe": _tcp_probe("http-health", 10, 3),
        "readinessProbe": _http_probe("/healthz/ready", "http-health", 5, 2),
        "resources": _resources("100m", "128Mi", "1Gi"),
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "bootstrap", "mountPath": "/etc/meshfed/envoy", "readOnly": True},
            {"name": "xds-token", "mountPath": "/var/run/secrets/meshfed/xds", "readOnly": True},
            {"name": "run", "mountPath": "/var/run/meshfed"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    deployment: Obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(GATEWAY, GATEWAY, cid, ns),
        "spec": {
            "replicas": opts.gateway_replicas,
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "selector": {"matchLabels": _selector(GATEWAY)},
            "template": {
                "metadata": {"labels": {**_labels(GATEWAY, cid), "topology.istio.io/network": str(cluster.network)},
                             "annotations": {"meshfed.io/config-hash": content_hash(config["data"])}},
                "spec": {
                    "serviceAccountName": GATEWAY,
                    "automountServiceAccountToken": False,
                    "securityContext": _pod_security(),
                    "terminationGracePeriodSeconds": 30,
                    "containers": [container],
                    "volumes": [
                        {"name": "bootstrap", "configMap": {"name": GATEWAY_BOOTSTRAP}},
                        {"name": "xds-token", "projected": {"defaultMode": 0o440, "sources": [{
                            "serviceAccountToken": {"audience": XDS_AUDIENCE, "expirationSeconds": 86400,
                                                    "path": "token"}}]}},
                        {"name": "run", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                    ],
                    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                        "weight": 100,
                        "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                            "labelSelector": {"matchLabels": _selector(GATEWAY)}},
                    }]}},
                },
            },
        },
    }
    pdb: Obj = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(GATEWAY, GATEWAY, cid, ns),
        "spec": {"minAvailable": 1, "selector": {"matchLabels": _selector(GATEWAY)}},
    }
    service_meta = _meta(GATEWAY, GATEWAY, cid, ns)
    service_meta["labels"]["topology.istio.io/network"] = str(cluster.network)
    service: Obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": service_meta,
        "spec": {
            "type": "LoadBalancer",
            "selector": _selector(GATEWAY),
            "ports": [
                {"name": "tls", "port": GATEWAY_PORT, "targetPort": "tls", "protocol": "TCP"},
                {"name": "http-health", "port": GATEWAY_HEALTH_PORT, "targetPort": "http-health", "protocol": "TCP"},
            ],
        },
    }
    if opts.gateway_replicas < 2:
        return [config, deployment, service]
    return [config, deployment, pdb, service]


# --------------------------------------------------------------------------------------------- everything


def _yaml(data: Any) -> str:
    return str(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))


def render_clusterset(
    cs: ClusterSet, ca: ClusterCA, opts: InstallOptions, *, clusterset_yaml: str
) -> Rendered:
    """Every cluster's manifests. ``clusterset_yaml`` is the clusterset file's text (the control planes read it)."""
    if not cs.clusters:
        raise RenderError(f"clusterset {cs.name!r} has no clusters")
    fed_name = opts.federation_cluster or str(cs.clusters[0].id)
    try:
        fed_cluster = cs.cluster(fed_name)
    except ValueError as exc:
        raise RenderError(f"--federation-cluster: {exc}") from None
    if opts.gateway_replicas < 1:
        raise RenderError(f"--gateway-replicas must be at least 1, got {opts.gateway_replicas}")
    if opts.federation_url is not None and not opts.federation_url.startswith("https://"):
        raise RenderError(f"--federation-url {opts.federation_url!r} must be an https:// URL")
    warnings: list[str] = []
    if len(cs.clusters) > 1 and not opts.federation_url:
        warnings.append(
            f"no --federation-url: the control planes outside {fed_name} are pointed at the federation service's "
            f"in-cluster name; give the address of Service {opts.namespace}/{FEDERATION} in {fed_name} (its "
            "LoadBalancer) and render again"
        )
    cluster_dns = _cluster_dns(cs, opts, warnings)
    for c in cs.clusters:
        if not c.gateway_host:
            warnings.append(
                f"cluster {c.id} has no gateway.host in the clusterset: once Service {opts.namespace}/{GATEWAY} in "
                f"{c.id} has a LoadBalancer address, write it into clusterset.yaml and render and apply again"
            )
    manifests: list[Manifest] = []
    for cluster in cs.clusters:
        cid = cluster.id
        files = ca.clusters.get(str(cid))
        if files is None:
            raise RenderError(f"no CA material for cluster {cid}")
        is_fed = cid == fed_cluster.id

        def add(filename: str, phase: ApplyPhase, objs: list[Obj], desc: str, *, secret: bool = False,
                _cid: ClusterId = cid) -> None:
            manifests.append(Manifest(_cid, filename, phase, tuple(objs), secret, desc))

        add("00-namespace.yaml", ApplyPhase.BASE, namespace_objects(cluster, opts), f"Namespace {opts.namespace}")
        add("01-crds.yaml", ApplyPhase.BASE, crd_objects(), "CRDs: ServiceExport, ServiceImport, ClusterProperty")
        add("02-rbac.yaml", ApplyPhase.BASE, rbac_objects(cluster, opts, federation=is_fed),
            "ServiceAccounts, ClusterRole and ClusterRoleBinding of the control plane")
        add("03-cacerts.yaml", ApplyPhase.CA, [ca_secret(CACERTS, CONTROLPLANE, cid, files, opts)],
            f"Secret {CACERTS}: the cluster's intermediate CA", secret=True)
        # KEP-2149 identity; in the phase after the CRDs', so ClusterProperty is served by then.
        add("03-clusterid.yaml", ApplyPhase.CA, identity_objects(cid, cs.name),
            f"ClusterProperties {CLUSTER_ID_PROPERTY} = {cid}, {CLUSTERSET_PROPERTY} = {cs.name}")
        if is_fed:
            add("04-federation-ca.yaml", ApplyPhase.FEDERATION,
                [ca_secret(FEDERATION_CA, FEDERATION, cid, ca.federation, opts)],
                f"Secret {FEDERATION_CA}: the federation service's CA", secret=True)
            add("05-federation.yaml", ApplyPhase.FEDERATION, federation_objects(cs, cluster, opts, ca.federation),
                f"federation service ({opts.federation_store})")
        add("06-controlplane.yaml", ApplyPhase.CONTROLPLANE,
            controlplane_objects(cs, cluster, opts, files, clusterset_yaml,
                                 federation_url_for(cluster, fed_cluster.id, opts),
                                 next((d for d in cluster_dns if d.cluster == cid), None)),
            "control plane: clusterset ConfigMap, Deployment, Service, sidecar injection webhook")
        add("07-gateway.yaml", ApplyPhase.GATEWAY,
            gateway_objects(cluster, opts, _yaml(gateway_bootstrap(cluster, opts))),
            "east-west gateway: Envoy bootstrap ConfigMap, Deployment, LoadBalancer Service on 15443")
    return Rendered(cs, fed_cluster.id, tuple(manifests), tuple(warnings), cluster_dns, opts.namespace)


def _cluster_dns(cs: ClusterSet, opts: InstallOptions, warnings: list[str]) -> tuple[ClusterDns, ...]:
    """Each cluster's ``clusterset.local`` forward to its control plane Service, where its address is given."""
    names = [str(c.id) for c in cs.clusters]
    unknown = sorted(set(opts.dns_service_ips) - set(names))
    if unknown:
        raise RenderError(f"--dns-service-ip: no cluster {', '.join(unknown)} in clusterset {cs.name!r} "
                          f"(clusters: {', '.join(names)})")
    out: list[ClusterDns] = []
    for name in names:
        ip = opts.dns_service_ips.get(name)
        if ip is None:
            warnings.append(
                f"cluster {name} has no --dns-service-ip: its cluster DNS pieces for clusterset.local are not "
                f"rendered (CoreDNS forwards to addresses only); give the cluster IP Service "
                f"{opts.namespace}/{CONTROLPLANE} has (or should get) in {name} as --dns-service-ip {name}=IP"
            )
            continue
        try:
            address = str(ipaddress.ip_address(ip))
        except ValueError:
            raise RenderError(f"--dns-service-ip {name}={ip}: {ip!r} is not an IP address") from None
        out.append(ClusterDns(cluster=name, ip=address, port=DNS_PORT, service=f"{opts.namespace}/{CONTROLPLANE}"))
    return tuple(out)


def object_ref(obj: Mapping[str, Any]) -> str:
    """``Kind namespace/name`` or ``Kind name`` for cluster-scoped objects (how messages name objects)."""
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    name = meta.get("name", "?")
    return f"{obj.get('kind', '?')} {ns}/{name}" if ns else f"{obj.get('kind', '?')} {name}"
