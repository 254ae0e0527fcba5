"""The clusterset definition: ``clusters/<clusterset>/clusterset.yaml``.

The file names the clusterset, its SPIFFE trust domain, the ClusterSetIP range, the member clusters (name,
network, region, zone, optional east-west gateway address), federation settings, the outbound traffic policy of
capture-mode sidecars (``outboundTrafficPolicy.mode``) and the peer clustersets it federates with (``peers:``, see
docs/peering.md; the same entries make a federation's peers file, :func:`load_peers_file`). The format is documented
in ``docs/exporting.md``; :func:`parse_clusterset` is pure, :func:`load_clusterset` reads the file.

Exception tree (this module)::

    DiscoveryError
     +-- ClusterSetError     clusterset.yaml missing, unparsable, or breaking a rule; names the file and field
"""

from __future__ import annotations

import enum
import re
import urllib.parse
from collections.abc import Mapping, Sequence
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


class BundleProfile(enum.StrEnum):
    """How a peer's SPIFFE bundle endpoint is authenticated (SPIFFE Federation, section 5.2)."""

    HTTPS_SPIFFE = "https_spiffe"
    """The endpoint presents an X509-SVID for ``endpointSpiffeId``, checked against the last bundle trusted for the
    peer's trust domain (first: ``bootstrapBundle``); never the system's CA store."""
    HTTPS_WEB = "https_web"
    """Ordinary web PKI (the system's CA store, or ``caFile``), with the host name checked."""


PEER_FIELDS = ("name", "trustDomain", "bundleEndpoint", "bundleEndpointProfile", "endpointSpiffeId",
               "bootstrapBundle", "federation", "caFile")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}$")
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True, slots=True)
class PeerDecl:
    """One peer clusterset: another trust domain whose bundle we fetch and whose exported services we import."""

    name: str
    """How this clusterset names the peer (a DNS label, not ``svc``): ``<svc>.<ns>.svc.<name>.clusterset.local``."""
    trust_domain: str
    bundle_endpoint: str
    """The https URL of the peer's SPIFFE bundle endpoint."""
    profile: BundleProfile = BundleProfile.HTTPS_SPIFFE
    endpoint_spiffe_id: str = ""
    """https_spiffe: the SPIFFE ID the endpoint's certificate must carry (in the peer's trust domain)."""
    bootstrap_bundle: Path | None = None
    """https_spiffe: the first bundle trusted for the peer's trust domain (SPIFFE JWKS bundle.json, or PEM roots)."""
    federation: str = ""
    """The peer federation's peering URL (service exchange); empty: the bundle endpoint's origin."""
    ca_file: Path | None = None
    """https_web: a CA file to trust instead of the system store (tests, private CAs)."""

    @property
    def exchange_url(self) -> str:
        """Where the peer federation serves the services exported to us."""
        if self.federation:
            return self.federation.rstrip("/")
        parts = urllib.parse.urlsplit(self.bundle_endpoint)
        return f"{parts.scheme}://{parts.netloc}"

    def to_json(self) -> dict[str, str]:
        """The entry as clusterset.yaml / a peers file spells it (defaults left out)."""
        out = {"name": self.name, "trustDomain": self.trust_domain, "bundleEndpoint": self.bundle_endpoint,
               "bundleEndpointProfile": str(self.profile)}
        if self.endpoint_spiffe_id:
            out["endpointSpiffeId"] = self.endpoint_spiffe_id
        if self.bootstrap_bundle is not None:
            out["bootstrapBundle"] = str(self.bootstrap_bundle)
        if self.federation:
            out["federation"] = self.federation
        if self.ca_file is not None:
            out["caFile"] = str(self.ca_file)
        return out


def _https_url(value: str, *, file: str, field: str) -> str:
    parts = urllib.parse.urlsplit(value)
    if parts.scheme != "https" or not parts.hostname:
        raise ClusterSetError(f"{value!r} is not an https URL (https://host[:port]/path)", file=file, field=field)
    if "@" in parts.netloc:
        raise ClusterSetError(f"{value!r} must not carry userinfo (SPIFFE Federation 5.2)", file=file, field=field)
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError as exc:
        raise ClusterSetError(f"{value!r}: {exc}", file=file, field=field) from None
    return value


def parse_peer(raw: Any, *, file: str, path: str, base: Path | None = None) -> PeerDecl:
    """One entry of ``peers:``; ``base`` resolves relative file paths (the directory of the file holding it)."""
    if not isinstance(raw, Mapping):
        raise ClusterSetError(f"must be a mapping ({', '.join(PEER_FIELDS)})", file=file, field=path)
    for k in raw:
        if k not in PEER_FIELDS:
            raise ClusterSetError(f"unknown field (known: {', '.join(sorted(PEER_FIELDS))})", file=file,
                                  field=f"{path}.{k}")
    name = _get(raw, "name", f"{path}.name", str, required=True, file=file)
    if not _LABEL.match(name) or name == "svc":
        raise ClusterSetError(f"{name!r} is not a peer name (an RFC 1123 label, not 'svc')", file=file,
                              field=f"{path}.name")
    td = _get(raw, "trustDomain", f"{path}.trustDomain", str, required=True, file=file)
    if not _TRUST_DOMAIN.match(td):
        raise ClusterSetError(f"{td!r} is not a trust domain (lower-case letters, digits, '.', '-', '_')", file=file,
                              field=f"{path}.trustDomain")
    endpoint = _https_url(_get(raw, "bundleEndpoint", f"{path}.bundleEndpoint", str, required=True, file=file),
                          file=file, field=f"{path}.bundleEndpoint")
    profile_text = _get(raw, "bundleEndpointProfile", f"{path}.bundleEndpointProfile", str, required=False,
                        file=file) or BundleProfile.HTTPS_SPIFFE.value
    try:
        profile = BundleProfile(profile_text)
    except ValueError:
        raise ClusterSetError(f"{profile_text!r} is not a bundle endpoint profile (known: https_spiffe, https_web)",
                              file=file, field=f"{path}.bundleEndpointProfile") from None
    endpoint_id = _get(raw, "endpointSpiffeId", f"{path}.endpointSpiffeId", str, required=False, file=file) or ""

    def file_path(key: str) -> Path | None:
        text = _get(raw, key, f"{path}.{key}", str, required=False, file=file)
        if not text:
            return None
        p = Path(text)
        return p if p.is_absolute() or base is None else base / p

    bootstrap, ca_file = file_path("bootstrapBundle"), file_path("caFile")
    if profile is BundleProfile.HTTPS_SPIFFE:
        if not endpoint_id:
            raise ClusterSetError("required for the https_spiffe profile (the endpoint server's SPIFFE ID)",
                                  file=file, field=f"{path}.endpointSpiffeId")
        if bootstrap is None:
            raise ClusterSetError("required for the https_spiffe profile (the first bundle trusted for the peer)",
                                  file=file, field=f"{path}.bootstrapBundle")
        if ca_file is not None:
            raise ClusterSetError("only for the https_web profile (https_spiffe never uses a CA file)", file=file,
                                  field=f"{path}.caFile")
    if endpoint_id:
        prefix = f"spiffe://{td}/"
        if not endpoint_id.startswith(prefix) or len(endpoint_id) == len(prefix):
            raise ClusterSetError(f"{endpoint_id!r} must be a SPIFFE ID in the peer's trust domain ({prefix}...): "
                                  "meshfed fetches self-serving bundle endpoints only", file=file,
                                  field=f"{path}.endpointSpiffeId")
    fed = _get(raw, "federation", f"{path}.federation", str, required=False, file=file) or ""
    if fed:
        _https_url(fed, file=file, field=f"{path}.federation")
    return PeerDecl(name=name, trust_domain=td, bundle_endpoint=endpoint, profile=profile,
                    endpoint_spiffe_id=endpoint_id, bootstrap_bundle=bootstrap, federation=fed, ca_file=ca_file)


def parse_peers(raw: Any, *, file: str, path: str = "peers", own_trust_domain: str = "",
                base: Path | None = None) -> tuple[PeerDecl, ...]:
    """A ``peers:`` list: every entry valid, names and trust domains distinct, none our own trust domain."""
    if raw is None:
        return ()
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise ClusterSetError("must be a list of peers", file=file, field=path)
    out: list[PeerDecl] = []
    names: dict[str, int] = {}
    domains: dict[str, int] = {}
    for i, entry in enumerate(raw):
        peer = parse_peer(entry, file=file, path=f"{path}[{i}]", base=base)
        if peer.name in names:
            raise ClusterSetError(f"duplicate peer {peer.name!r} (also {path}[{names[peer.name]}])", file=file,
                                  field=f"{path}[{i}].name")
        if peer.trust_domain in domains:
            first = domains[peer.trust_domain]
            raise ClusterSetError(f"trust domain {peer.trust_domain!r} is already peer {path}[{first}] (one peer "
                                  "per trust domain: bundles are never merged)", file=file,
                                  field=f"{path}[{i}].trustDomain")
        if own_trust_domain and peer.trust_domain == own_trust_domain:
            raise ClusterSetError(f"{peer.trust_domain!r} is this clusterset's own trust domain", file=file,
                                  field=f"{path}[{i}].trustDomain")
        names[peer.name], domains[peer.trust_domain] = i, i
        out.append(peer)
    return tuple(out)


def load_peers_file(path: Path, *, own_trust_domain: str = "") -> tuple[PeerDecl, ...]:
    """A federation's peers file (``{"peers": [...]}``, YAML or JSON); a missing file is no peers."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ()
    except OSError as exc:
        raise ClusterSetError(f"cannot read: {exc.strerror or exc}", file=str(path)) from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ClusterSetError(f"not valid YAML: {exc}", file=str(path)) from exc
    if not isinstance(data, Mapping) or set(data) - {"peers"}:
        raise ClusterSetError("a peers file holds one mapping with a 'peers' list", file=str(path))
    return parse_peers(data.get("peers"), file=str(path), own_trust_domain=own_trust_domain, base=path.parent)


def peers_file_text(peers: Sequence[PeerDecl]) -> str:
    """A peers file holding ``peers`` (what :func:`load_peers_file` reads)."""
    return yaml.safe_dump({"peers": [p.to_json() for p in peers]}, sort_keys=False)


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
    peers: tuple[PeerDecl, ...] = ()

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
    known = {"name", "trustDomain", "clustersetCIDR", "federation", "clusters", "outboundTrafficPolicy", "peers"}
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
        peers=parse_peers(data.get("peers"), file=file, own_trust_domain=trust_domain, base=directory),
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
