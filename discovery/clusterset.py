"""The clusterset definition: ``clusters/<clusterset>/clusterset.yaml``.

The file names the clusterset, its SPIFFE trust domain, the ClusterSetIP range, the member clusters (name,
network, region, zone, optional east-west gateway address), federation settings and the outbound traffic policy of
capture-mode sidecars (``outboundTrafficPolicy.mode``). The format is documented in
``docs/exporting.md``; :func:`parse_clusterset` is pure, :func:`load_clusterset` reads the file.

Exception tree (this module)::

    DiscoveryError
     +-- ClusterSetError     clusterset.yaml missing, unparsable, or breaking a rule; names the file and field
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from discovery.mcs import DEFAULT_CIDR, InvalidCidr, parse_cidr
from discovery.model import ClusterId, ClusterInfo, DiscoveryError, cluster_id, network_id

CLUSTERSET_FILE = "clusterset.yaml"
DEFAULT_CLUSTERSET_DIR = Path("clusters/demo")
DEFAULT_LEASE_TTL = 15.0
DEFAULT_HEARTBEAT_INTERVAL = 5.0

_DNS_NAME = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class ClusterSetError(DiscoveryError, ValueError):
    """clusterset.yaml is missing, unparsable or invalid. ``field`` is the path inside the file."""

    def __init__(self, message: str, *, file: str = "", field: str = "") -> None:
        self.file = file
        self.field = field
        self.reason = message
        where = ": ".join(p for p in (file, field) if p)
        super().__init__(f"{where}: {message}" if where else message)


class OutboundTrafficMode(enum.StrEnum):
    """What a capture-mode sidecar does with a connection to a destination the mesh does not know
    (``outboundTrafficPolicy.mode``, as Istio's MeshConfig spells it)."""

    ALLOW_ANY = "ALLOW_ANY"
    """Pass it through to the address the workload dialled (the default)."""
    REGISTRY_ONLY = "REGISTRY_ONLY"
    """Refuse it: the connection is closed."""


@dataclass(frozen=True, slots=True)
class FederationSettings:
    """How a member talks to the federation service."""

    lease_ttl: float = DEFAULT_LEASE_TTL
    """Seconds a cluster's lease lives without a heartbeat; its exports leave the catalog when it expires."""
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    """Seconds between a member's heartbeats (must be below ``lease_ttl``)."""


@dataclass(frozen=True, slots=True)
class ClusterSet:
    """A parsed clusterset.yaml. ``directory`` is the folder holding it (and one sub-folder per cluster)."""

    name: str
    trust_domain: str
    cidr: str
    clusters: tuple[ClusterInfo, ...]
    federation: FederationSettings = field(default_factory=FederationSettings)
    directory: Path | None = None
    outbound_traffic_mode: OutboundTrafficMode = OutboundTrafficMode.ALLOW_ANY

    @property
    def cluster_ids(self) -> tuple[ClusterId, ...]:
        return tuple(c.id for c in self.clusters)

    def cluster(self, name: str) -> ClusterInfo:
        """The member named ``name``; ClusterSetError naming the members when there is none."""
        for c in self.clusters:
            if c.id == name:
                return c
        members = ", ".join(self.cluster_ids) or "none"
        raise ClusterSetError(f"no cluster {name!r} in clusterset {self.name!r} (members: {members})")

    def cluster_dir(self, name: str) -> Path:
        """The folder holding cluster ``name``'s manifests."""
        self.cluster(name)
        if self.directory is None:
            raise ClusterSetError(f"clusterset {self.name!r} was not loaded from a directory")
        return self.directory / name


def _get(data: Mapping[str, Any], key: str, path: str, kind: type, *, required: bool, file: str) -> Any:
    value = data.get(key)
    if value is None:
        if required:
            raise ClusterSetError("required", file=file, field=path)
        return None
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ClusterSetError(f"must be a positive number, got {value!r}", file=file, field=path)
        return float(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ClusterSetError(f"must be an integer, got {value!r}", file=file, field=path)
        return value
    if not isinstance(value, kind):
        raise ClusterSetError(f"must be a {kind.__name__}, got {value!r}", file=file, field=path)
    return value


def parse_clusterset(data: Any, *, file: str = CLUSTERSET_FILE, directory: Path | None = None) -> ClusterSet:
    """Validate a parsed clusterset.yaml document; every error names ``file`` and the field path."""
    if not isinstance(data, Mapping):
        raise ClusterSetError("the file must hold one mapping (name, trustDomain, clusters, ...)", file=file)
    known = {"name", "trustDomain", "clustersetCIDR", "federation", "clusters", "outboundTrafficPolicy"}
    for k in data:
        if k not in known:
            raise ClusterSetError(f"unknown field (known: {', '.join(sorted(known))})", file=file, field=str(k))
    name = _get(data, "name", "name", str, required=True, file=file)
    if not _DNS_NAME.match(name) or "." in name:
        raise ClusterSetError(f"{name!r} is not an RFC 1123 label", file=file, field="name")
    trust_domain = _get(data, "trustDomain", "trustDomain", str, required=True, file=file)
    if not _DNS_NAME.match(trust_domain):
        raise ClusterSetError(
            f"{trust_domain!r} is not a trust domain (lower-case DNS name like demo.meshfed.local)",
            file=file,
            field="trustDomain",
        )
    cidr = _get(data, "clustersetCIDR", "clustersetCIDR", str, required=False, file=file) or DEFAULT_CIDR
    try:
        parse_cidr(cidr)
    except InvalidCidr as exc:
        raise ClusterSetError(str(exc), file=file, field="clustersetCIDR") from None
    fed_raw = _get(data, "federation", "federation", Mapping, required=False, file=file) or {}
    for k in fed_raw:
        if k not in ("leaseTTLSeconds", "heartbeatIntervalSeconds"):
            raise ClusterSetError(
                "unknown field (known: heartbeatIntervalSeconds, leaseTTLSeconds)", file=file, field=f"federation.{k}"
            )
    ttl = _get(fed_raw, "leaseTTLSeconds", "federation.leaseTTLSeconds", float, required=False, file=file)
    hb = _get(
        fed_raw, "heartbeatIntervalSeconds", "federation.heartbeatIntervalSeconds", float, required=False, file=file
    )
    fed = FederationSettings(
        lease_ttl=ttl if ttl is not None else DEFAULT_LEASE_TTL,
        heartbeat_interval=hb if hb is not None else DEFAULT_HEARTBEAT_INTERVAL,
    )
    if fed.heartbeat_interval >= fed.lease_ttl:
        raise ClusterSetError(
            f"heartbeat interval {fed.heartbeat_interval}s must be shorter than the lease TTL {fed.lease_ttl}s",
            file=file,
            field="federation.heartbeatIntervalSeconds",
        )
    outbound_mode = _outbound_mode(data, file)
    raw_clusters = _get(data, "clusters", "clusters", list, required=True, file=file)
    if not raw_clusters:
        raise ClusterSetError("at least one cluster is required", file=file, field="clusters")
    clusters: list[ClusterInfo] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(raw_clusters):
        path = f"clusters[{i}]"
        if not isinstance(raw, Mapping):
            raise ClusterSetError("must be a mapping (name, network, region, zone)", file=file, field=path)
        for k in raw:
            if k not in ("name", "network", "region", "zone", "gateway"):
                raise ClusterSetError(
                    "unknown field (known: gateway, name, network, region, zone)", file=file, field=f"{path}.{k}"
                )
        try:
            cid = cluster_id(_get(raw, "name", f"{path}.name", str, required=True, file=file))
        except DiscoveryError as exc:
            if isinstance(exc, ClusterSetError):
                raise
            raise ClusterSetError(str(exc), file=file, field=f"{path}.name") from None
        if cid in seen:
            raise ClusterSetError(f"duplicate cluster {cid!r} (also clusters[{seen[cid]}])", file=file, field=path)
        seen[cid] = i
        net_text = _get(raw, "network", f"{path}.network", str, required=False, file=file) or f"net-{cid}"
        try:
            net = network_id(net_text)
        except DiscoveryError as exc:
            raise ClusterSetError(str(exc), file=file, field=f"{path}.network") from None
        region = _get(raw, "region", f"{path}.region", str, required=False, file=file) or ""
        zone = _get(raw, "zone", f"{path}.zone", str, required=False, file=file) or ""
        gw = _get(raw, "gateway", f"{path}.gateway", Mapping, required=False, file=file) or {}
        for k in gw:
            if k not in ("host", "port"):
                raise ClusterSetError("unknown field (known: host, port)", file=file, field=f"{path}.gateway.{k}")
        gw_host = _get(gw, "host", f"{path}.gateway.host", str, required=False, file=file) or ""
        gw_port = _get(gw, "port", f"{path}.gateway.port", int, required=False, file=file)
        if gw_port is not None and not 1 <= gw_port <= 65535:
            raise ClusterSetError(f"port {gw_port} is out of range 1..65535", file=file, field=f"{path}.gateway.port")
        clusters.append(
            ClusterInfo(
                id=cid,
                network=net,
                region=region,
                zone=zone,
                gateway_host=gw_host,
                gateway_port=gw_port if gw_port is not None else 15443,
            )
        )
    return ClusterSet(
        name=name,
        trust_domain=trust_domain,
        cidr=cidr,
        clusters=tuple(clusters),
        federation=fed,
        directory=directory,
        outbound_traffic_mode=outbound_mode,
    )


def _outbound_mode(data: Mapping[str, Any], file: str) -> OutboundTrafficMode:
    raw = _get(data, "outboundTrafficPolicy", "outboundTrafficPolicy", Mapping, required=False, file=file) or {}
    for k in raw:
        if k != "mode":
            raise ClusterSetError("unknown field (known: mode)", file=file, field=f"outboundTrafficPolicy.{k}")
    mode = _get(raw, "mode", "outboundTrafficPolicy.mode", str, required=False, file=file)
    if mode is None:
        return OutboundTrafficMode.ALLOW_ANY
    try:
        return OutboundTrafficMode(mode)
    except ValueError:
        known = ", ".join(m.value for m in OutboundTrafficMode)
        raise ClusterSetError(f"{mode!r} is not an outbound traffic mode (known: {known})", file=file,
                              field="outboundTrafficPolicy.mode") from None


def clusterset_file(path: Path | str) -> Path:
    """``path`` itself when it names a file, else ``path/clusterset.yaml``."""
    p = Path(path)
    return p if p.suffix in (".yaml", ".yml") and not p.is_dir() else p / CLUSTERSET_FILE


def load_clusterset(path: Path | str = DEFAULT_CLUSTERSET_DIR) -> ClusterSet:
    """Read and validate a clusterset: ``path`` is its directory (or the clusterset.yaml file itself)."""
    file = clusterset_file(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ClusterSetError("no such file (a clusterset directory holds clusterset.yaml)", file=str(file)) from None
    except OSError as exc:
        raise ClusterSetError(f"cannot read: {exc.strerror or exc}", file=str(file)) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ClusterSetError(f"not valid YAML: {exc}", file=str(file)) from exc
    return parse_clusterset(data, file=str(file), directory=file.parent)
