"""What a cluster's own DNS needs so that pods resolve ``clusterset.local``: forward the zone to the cluster's
meshfed DNS, the control plane Service's DNS port (pure: text and objects, no IO).

CoreDNS and kube-dns forward to addresses only, never to names, so the block can be rendered only once the
Service's cluster IP is known: ``meshfed install --dns-service-ip CLUSTER=IP`` fixes the control plane Service's
``spec.clusterIP`` and the forward address together. The user's own Corefile is never rendered or replaced: these
pieces are files of their own beside the manifests (``DIR/<cluster>/cluster-dns/``), outside the apply plan, to be
added to the cluster DNS by hand (docs/install.md, docs/dns.md "Pointing cluster DNS at it").
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

import yaml

ZONE = "clusterset.local"
CACHE_SECONDS = 5
"""CoreDNS's cache for the zone: at most the TTL of the records meshfed serves (5 s), so answers do not outlive
them."""
DIRECTORY = "cluster-dns"
COREFILE_BLOCK = "coredns-clusterset.server"
KUBE_DNS_STUB = "kube-dns-stubdomains.yaml"
FILES = (COREFILE_BLOCK, KUBE_DNS_STUB)


@dataclass(frozen=True, slots=True)
class ClusterDns:
    """One cluster's forward of ``clusterset.local``: the meshfed DNS Service's cluster IP and port."""

    cluster: str
    ip: str
    port: int
    service: str
    """``namespace/name`` of the Service whose DNS port this forwards to (named in the files' comments)."""

    def __post_init__(self) -> None:
        ipaddress.ip_address(self.ip)  # ValueError for anything but an address: CoreDNS takes no names here

    @property
    def upstream(self) -> str:
        """``IP:PORT`` as CoreDNS's ``forward`` writes it (``[IPv6]:PORT``)."""
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{host}:{self.port}"

    def corefile_block(self) -> str:
        """A CoreDNS server block for the zone, to add beside the existing ``.:53`` block of the Corefile."""
        return (
            f"# meshfed install: cluster {self.cluster}. Forward {ZONE} to the cluster's meshfed DNS (Service\n"
            f"# {self.service}, port {self.port}). Add this block to the Corefile (ConfigMap kube-system/coredns)\n"
            "# beside the existing ones, or as a *.server key of an import ConfigMap (coredns-custom); do not\n"
            "# replace the Corefile with it. See docs/install.md, \"Cluster DNS\".\n"
            f"{ZONE}:53 {{\n"
            "    errors\n"
            f"    cache {CACHE_SECONDS}\n"
            f"    forward . {self.upstream}\n"
            "}\n"
        )

    def kube_dns_configmap(self) -> dict[str, Any]:
        """kube-dns's stub domain for the zone (kube-dns takes addresses only, and port 53 implied)."""
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "kube-dns", "namespace": "kube-system"},
            "data": {"stubDomains": json.dumps({ZONE: [self.ip if self.port == 53 else self.upstream]})},
        }

    def kube_dns_text(self) -> str:
        header = (
            f"# meshfed install: cluster {self.cluster}, for clusters running kube-dns instead of CoreDNS.\n"
            "# If your kube-dns ConfigMap already has stubDomains, add the clusterset.local entry to it instead\n"
            "# of applying this file (it replaces the stubDomains key). See docs/install.md, \"Cluster DNS\".\n"
        )
        return header + str(yaml.safe_dump(self.kube_dns_configmap(), sort_keys=False, default_flow_style=False))
