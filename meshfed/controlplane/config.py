"""What a control plane is told: its listen addresses and settings (``ControlPlaneConfig``), and the two files a
local run (``meshfed up``) writes for it, read here into typed values:

- ``runtime.json``: the loopback ports the runner picked for each endpoint address, replacing the manifests'
  placeholder ports (:func:`load_runtime`);
- ``tokens.json``: the per-workload xDS bootstrap tokens, 0600 (:func:`load_tokens`).

How the control plane follows these files while it runs is in :mod:`meshfed.controlplane.localrun`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from discovery.addresses import HostPort, InvalidAddress, parse_hostport
from discovery.clusterset import ClusterSet
from discovery.model import ClusterId
from gateway.auth import ProxyIdentity, parse_token_table

#: Where the cluster's objects come from, and how xDS clients authenticate (``ControlPlaneConfig``).
SOURCES = ("manifests", "kubernetes")
XDS_AUTH = ("tokens", "tokenreview")


#: A listen address (port 0: any free port).
Listen = HostPort


def parse_listen(text: str, *, what: str) -> Listen:
    """A ``HOST:PORT`` flag (an empty host is 127.0.0.1); ``ValueError`` naming the flag ``what``."""
    try:
        return parse_hostport(text, default_host="127.0.0.1")
    except InvalidAddress as exc:
        raise ValueError(f"{what} {exc}") from exc


@dataclass(frozen=True, slots=True)
class ControlPlaneConfig:
    clusterset: ClusterSet
    cluster: ClusterId
    ca_dir: Path
    federation_urls: tuple[str, ...]
    xds: Listen
    dns: Listen
    admin: Listen
    gateway_host: str
    gateway_port: int
    tokens_file: Path | None = None
    runtime_file: Path | None = None
    debounce_quiet_s: float = 0.1
    debounce_max_s: float = 1.0
    manifest_poll_s: float = 0.5
    workload_cert_ttl: timedelta = timedelta(hours=24)
    # Where the cluster's objects come from: "manifests" (clusters/<set>/<cluster>/*.yaml) or "kubernetes".
    source: str = "manifests"
    kubeconfig: Path | None = None
    kube_context: str | None = None
    in_cluster: bool = False
    # How xDS clients authenticate: "tokens" (per-workload bootstrap tokens) or "tokenreview" (projected
    # service-account tokens checked with the Kubernetes TokenReview API).
    xds_auth: str = "tokens"
    token_audience: str = "meshfed"
    first_sync_timeout_s: float = 60.0
    # How often the CA directory is checked for a new intermediate or bundle (root rotation).
    trust_poll_s: float = 2.0
    # A second ADS listener over mutual TLS for proxyless gRPC workloads, which authenticate with their workload
    # certificate instead of a token (gateway.peerauth, docs/proxyless-grpc.md). None: not served.
    xds_mtls: Listen | None = None
    # Names (IPs or DNS) the mTLS listener's certificate is valid for; the listen host when empty.
    xds_mtls_hosts: tuple[str, ...] = ()
    # certfiles.json: directories of file-based workload certificates (proxyless gRPC) this control plane keeps
    # current, as a node agent would (meshfed.certfiles). None: none.
    cert_files: Path | None = None
    # The sidecar injection webhook (HTTPS, meshfed.controlplane.webhook). None: not served.
    webhook: Listen | None = None
    # DNS names (or IPs) its serving certificate is valid for: the webhook Service's names; the listen host when
    # empty.
    webhook_hosts: tuple[str, ...] = ()
    # The MutatingWebhookConfiguration whose caBundle the control plane keeps equal to the clusterset's roots
    # (source kubernetes; "": left alone). The install names meshfed-sidecar-injector.
    webhook_configuration: str = ""
    # What injected pods run and where their sidecars find ADS (meshfed.inject.InjectConfig).
    inject_image: str = ""
    inject_image_pull_policy: str = "IfNotPresent"
    inject_xds_address: str = ""
    inject_xds_mtls_address: str = ""  # proxyless gRPC pods' mutual-TLS ADS address ("": template grpc refused)

    def check(self) -> None:
        """Raise ``ValueError`` for a setting outside its choices."""
        if self.source not in SOURCES:
            raise ValueError(f"source {self.source!r} is not 'manifests' or 'kubernetes'")
        if self.xds_auth not in XDS_AUTH:
            raise ValueError(f"xds auth {self.xds_auth!r} is not 'tokens' or 'tokenreview'")
        if self.webhook is not None and not (self.inject_image and self.inject_xds_address):
            raise ValueError("--webhook-listen needs --inject-image and --inject-xds-address (what injected pods run "
                             "and where their sidecars reach ADS)")


@dataclass(frozen=True, slots=True)
class EndpointOverride:
    """What a local run's ``runtime.json`` says of one endpoint address."""

    ports: tuple[tuple[str, int], ...]
    service_account: str = ""
    # False when the runner stopped the workload: its endpoint leaves the ready set, as a deleted pod leaves its
    # EndpointSlice in Kubernetes. None keeps what the manifests say.
    ready: bool | None = None
    # The address the workload really has (a netns run's pod IP), replacing the manifests' placeholder; "" keeps it.
    address: str = ""


def load_runtime(path: Path | None) -> dict[str, EndpointOverride]:
    """``runtime.json``: ``{"endpoints": {"127.0.2.10": {"ports": {"http": 40123}, "service_account": "x"}}}``
    (a netns run adds ``"address": "10.2.1.1"``, the pod's IP, per endpoint)."""
    if path is None or not path.exists():
        return {}
    data = json.loads(path.read_text())
    out: dict[str, EndpointOverride] = {}
    for address, entry in data.get("endpoints", {}).items():
        ports = tuple(sorted((str(k), int(v)) for k, v in entry.get("ports", {}).items()))
        ready = entry.get("ready")
        out[address] = EndpointOverride(ports=ports, service_account=str(entry.get("service_account", "")),
                                        ready=None if ready is None else bool(ready),
                                        address=str(entry.get("address", "")))
    return out


def load_tokens(path: Path | None) -> dict[str, ProxyIdentity]:
    """``tokens.json``: ``{TOKEN: {"namespace": ..., "service_account": ..., "cluster": ..., "node_id": ...}}``
    (0600). ``node_id`` binds the token to the one proxy it was written for (gateway.auth.check_node); an entry
    without one is an error (gateway.auth.parse_token_table), as is a file that is not JSON."""
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not JSON: {exc}") from exc
    return parse_token_table(data, source=str(path))
