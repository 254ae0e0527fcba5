"""Pure conversion of Kubernetes objects (dicts, as parsed YAML or API JSON) into the discovery model.

Nothing here does IO: the manifest source (``discovery.manifests``) and the Kubernetes API source feed objects in
and get model values back. Every kind meshfed understands is in one table, :data:`CONVERTERS` (by
``(apiVersion, kind)``, as ``gateway.generators.GENERATORS`` is by type URL): the core kinds converted here, Istio's
traffic kinds (``discovery.policy``) and AuthorizationPolicy (``discovery.authz``); adding a kind is one entry
there. Conversion errors name the field path inside the object (``spec.ports[1].port``); callers add the file and
document index, or the API object reference.

Exceptions: ``ConversionError`` and ``UnsupportedKind`` (``discovery.fields``, re-exported here).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from types import MappingProxyType
from typing import Any

from discovery import authz, policy
from discovery.fields import (
    ConversionError,
    UnsupportedKind,
    as_bool,
    as_int,
    as_list,
    as_mapping,
    as_str,
    as_string_map,
    format_timestamp,
    object_ref,
    parse_timestamp,
    type_of,
)
from discovery.model import (
    DEFAULT_AFFINITY_TIMEOUT,
    SESSION_AFFINITY_CLIENT_IP,
    ClusterId,
    Condition,
    DiscoveryError,
    Endpoint,
    Namespace,
    Protocol,
    Service,
    ServiceExport,
    ServiceImport,
    ServiceKey,
    ServicePort,
    ServiceTraits,
    namespace,
    service_name,
)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MCS_GROUP = "multicluster.x-k8s.io"
MCS_VERSION = "v1alpha1"
MCS_API_VERSION = f"{MCS_GROUP}/{MCS_VERSION}"
#: The MCS API versions meshfed reads, preferred first (v1beta1 is the storage version meshfed installs).
MCS_VERSIONS = ("v1beta1", "v1alpha1")


# --------------------------------------------------------------------------------------------------------------
# Converted values that the model does not hold itself


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    """A converted ``discovery.k8s.io/v1`` EndpointSlice: the endpoints of one slice of ``key``'s Service.

    ``endpoints`` already carry the slice's ports (by port name). FQDN slices convert with no endpoints.
    """

    cluster: ClusterId
    key: ServiceKey
    name: str
    address_type: str
    endpoints: tuple[Endpoint, ...]
    ports: tuple[tuple[str, int, Protocol], ...] = ()


@dataclass(frozen=True, slots=True)
class ExternalNameService:
    """A Service of type ExternalName: valid Kubernetes, but not something meshfed can export (the MCS API
    marks its export ``Valid=False, InvalidServiceType``)."""

    cluster: ClusterId
    key: ServiceKey
    external_name: str


Converted = Service | EndpointSlice | ServiceExport | ExternalNameService | Any
ConverterFn = Callable[[Mapping[str, Any], ClusterId], Any]


def is_known(obj: Mapping[str, Any]) -> bool:
    """True when the object's (apiVersion, kind) is in :data:`CONVERTERS`."""
    try:
        return type_of(obj) in CONVERTERS
    except ConversionError:
        return False


def convert(obj: Any, *, cluster: ClusterId) -> Converted:
    """Convert one raw Kubernetes object of any kind in :data:`CONVERTERS` into its model value.

    Raises :class:`UnsupportedKind` for kinds without a converter and :class:`ConversionError` (with the field
    path and the object's reference) for objects that break the rules.
    """
    api_version, kind = type_of(obj)
    fn = CONVERTERS.get((api_version, kind))
    if fn is None:
        raise UnsupportedKind(api_version, kind)
    try:
        return fn(obj, cluster)
    except ConversionError as exc:
        raise exc.within(object_ref(obj)) from None
    except DiscoveryError as exc:  # a model rule we did not pre-check: still name the object
        raise ConversionError("", str(exc), obj=object_ref(obj)) from exc


# --------------------------------------------------------------------------------------------------------------
# Field helpers: each takes the path so errors can name it


def _port_number(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConversionError(path, f"must be an integer port 1..65535, got {value!r}")
    if not 1 <= value <= 65535:
        raise ConversionError(path, f"port {value} is out of range 1..65535")
    return value


def _protocol(value: Any, path: str) -> Protocol:
    text = as_str(value, path, default="TCP")
    try:
        return Protocol(text)
    except ValueError:
        raise ConversionError(path, f"protocol {text!r} is not one of TCP, UDP, SCTP") from None


def _key(obj: Mapping[str, Any]) -> ServiceKey:
    meta = as_mapping(obj.get("metadata"), "metadata", required=True)
    name = as_str(meta.get("name"), "metadata.name", required=True)
    ns = as_str(meta.get("namespace"), "metadata.namespace", default="default")
    try:
        ns_v: Namespace = namespace(ns)
    except DiscoveryError as exc:
        raise ConversionError("metadata.namespace", str(exc)) from None
    try:
        return ServiceKey(namespace=ns_v, name=service_name(name))
    except DiscoveryError as exc:
        raise ConversionError("metadata.name", str(exc)) from None


# --------------------------------------------------------------------------------------------------------------
# The core kinds


def convert_service(obj: Mapping[str, Any], cluster: ClusterId) -> Service | ExternalNameService:
    """A v1 Service (no endpoints yet; :func:`assemble` attaches its EndpointSlices)."""
    key = _key(obj)
    meta = as_mapping(obj.get("metadata"), "metadata")
    spec = as_mapping(obj.get("spec"), "spec")
    svc_type = as_str(spec.get("type"), "spec.type", default="ClusterIP")
    if svc_type not in ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"):
        raise ConversionError(
            "spec.type", f"{svc_type!r} is not one of ClusterIP, NodePort, LoadBalancer, ExternalName"
        )
    if svc_type == "ExternalName":
        return ExternalNameService(
            cluster=cluster, key=key, external_name=as_str(spec.get("externalName"), "spec.externalName")
        )
    cluster_ip = as_str(spec.get("clusterIP"), "spec.clusterIP")
    headless = cluster_ip == "None"
    if cluster_ip and not headless:
        try:
            ipaddress.ip_address(cluster_ip)
        except ValueError:
            raise ConversionError("spec.clusterIP", f"{cluster_ip!r} is neither an IP address nor None") from None
    raw_ports = as_list(spec.get("ports"), "spec.ports")
    if not raw_ports and not headless:
        raise ConversionError("spec.ports", "required: a Service that is not headless needs at least one port")
    ports: list[ServicePort] = []
    names: dict[str, int] = {}
    numbers: dict[tuple[int, Protocol], int] = {}
    for i, raw in enumerate(raw_ports):
        path = f"spec.ports[{i}]"
        item = as_mapping(raw, path, required=True)
        port = _port_number(item.get("port"), f"{path}.port")
        protocol = _protocol(item.get("protocol"), f"{path}.protocol")
        name = as_str(item.get("name"), f"{path}.name")
        if not name and len(raw_ports) > 1:
            raise ConversionError(f"{path}.name", "required when a Service has more than one port")
        if name:
            if name in names:
                raise ConversionError(f"{path}.name", f"duplicate port name {name!r} (also spec.ports[{names[name]}])")
            names[name] = i
        if (port, protocol) in numbers:
            raise ConversionError(
                f"{path}.port", f"duplicate port {port}/{protocol} (also spec.ports[{numbers[(port, protocol)]}])"
            )
        numbers[(port, protocol)] = i
        app_protocol = as_str(item.get("appProtocol"), f"{path}.appProtocol")
        target: int | str
        raw_target = item.get("targetPort")
        if raw_target is None or raw_target == "":
            target = port
        elif isinstance(raw_target, str):
            target = raw_target
        else:
            target = _port_number(raw_target, f"{path}.targetPort")
        try:
            ports.append(
                ServicePort(port=port, protocol=protocol, name=name, app_protocol=app_protocol, target_port=target)
            )
        except DiscoveryError as exc:
            raise ConversionError(f"{path}.name", str(exc)) from None
    return Service(
        cluster=cluster,
        key=key,
        ports=tuple(ports),
        headless=headless,
        cluster_ip="" if headless else cluster_ip,
        labels=as_string_map(meta.get("labels"), "metadata.labels"),
        selector=as_string_map(spec.get("selector"), "spec.selector"),
        traits=_traits(spec, "" if headless else cluster_ip),
    )


def _traits(spec: Mapping[str, Any], cluster_ip: str) -> ServiceTraits:
    """The Service fields the MCS API compares across clusters. ``ipFamilies`` left out of the object is the
    family of its clusterIP when it has one (what the API server would fill in), else unknown."""
    affinity = as_str(spec.get("sessionAffinity"), "spec.sessionAffinity", default="None")
    if affinity not in ("None", SESSION_AFFINITY_CLIENT_IP):
        raise ConversionError("spec.sessionAffinity", f"{affinity!r} is not one of None, ClientIP")
    config = as_mapping(spec.get("sessionAffinityConfig"), "spec.sessionAffinityConfig")
    client_ip = as_mapping(config.get("clientIP"), "spec.sessionAffinityConfig.clientIP")
    timeout = as_int(client_ip.get("timeoutSeconds"), "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                     default=DEFAULT_AFFINITY_TIMEOUT, low=1, high=86400)
    policy_ = as_str(spec.get("internalTrafficPolicy"), "spec.internalTrafficPolicy", default="Cluster")
    if policy_ not in ("Cluster", "Local"):
        raise ConversionError("spec.internalTrafficPolicy", f"{policy_!r} is not one of Cluster, Local")
    families: list[str] = []
    for i, raw in enumerate(as_list(spec.get("ipFamilies"), "spec.ipFamilies")):
        fam = as_str(raw, f"spec.ipFamilies[{i}]", required=True)
        if fam not in ("IPv4", "IPv6") or fam in families:
            raise ConversionError(f"spec.ipFamilies[{i}]", f"{fam!r} is not IPv4 or IPv6 once each")
        families.append(fam)
    if len(families) > 2:
        raise ConversionError("spec.ipFamilies", "at most two families")
    if not families and cluster_ip:
        families.append(f"IPv{ipaddress.ip_address(cluster_ip).version}")
    return ServiceTraits(
        session_affinity=affinity,
        affinity_timeout=timeout if affinity == SESSION_AFFINITY_CLIENT_IP else 0,
        internal_traffic_policy=policy_,
        traffic_distribution=as_str(spec.get("trafficDistribution"), "spec.trafficDistribution"),
        ip_families=tuple(families),
    )


def convert_endpoint_slice(obj: Mapping[str, Any], cluster: ClusterId) -> EndpointSlice:
    """A discovery.k8s.io/v1 EndpointSlice, linked to its Service by the ``kubernetes.io/service-name`` label."""
    meta = as_mapping(obj.get("metadata"), "metadata", required=True)
    slice_name = as_str(meta.get("name"), "metadata.name", required=True)
    labels = as_mapping(meta.get("labels"), "metadata.labels")
    svc = labels.get(SERVICE_NAME_LABEL)
    label_path = f"metadata.labels.{SERVICE_NAME_LABEL}"
    if not isinstance(svc, str) or not svc:
        raise ConversionError(label_path, "required: it links the slice to its Service")
    ns = as_str(meta.get("namespace"), "metadata.namespace", default="default")
    try:
        key = ServiceKey(namespace=namespace(ns), name=service_name(svc))
    except DiscoveryError as exc:
        raise ConversionError(label_path, str(exc)) from None
    address_type = as_str(obj.get("addressType"), "addressType", required=True)
    if address_type not in ("IPv4", "IPv6", "FQDN"):
        raise ConversionError("addressType", f"{address_type!r} is not one of IPv4, IPv6, FQDN")
    ports: list[tuple[str, int, Protocol]] = []
    for i, raw in enumerate(as_list(obj.get("ports"), "ports")):
        path = f"ports[{i}]"
        item = as_mapping(raw, path, required=True)
        if item.get("port") is None:  # nil port: "all ports", nothing to route to by number
            continue
        ports.append(
            (
                as_str(item.get("name"), f"{path}.name"),
                _port_number(item.get("port"), f"{path}.port"),
                _protocol(item.get("protocol"), f"{path}.protocol"),
            )
        )
    port_map = tuple((name, number) for name, number, _ in ports)
    endpoints: list[Endpoint] = []
    raw_endpoints = as_list(obj.get("endpoints"), "endpoints")
    if address_type == "FQDN":
        raw_endpoints = []
    want_version = 4 if address_type == "IPv4" else 6
    for i, raw in enumerate(raw_endpoints):
        path = f"endpoints[{i}]"
        item = as_mapping(raw, path, required=True)
        addresses = as_list(item.get("addresses"), f"{path}.addresses")
        if not addresses:
            raise ConversionError(f"{path}.addresses", "required: at least one address")
        address = as_str(addresses[0], f"{path}.addresses[0]", required=True)
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            raise ConversionError(f"{path}.addresses[0]", f"{address!r} is not an IP address") from None
        if ip.version != want_version:
            raise ConversionError(f"{path}.addresses[0]", f"{address!r} is not an {address_type} address")
        cond = as_mapping(item.get("conditions"), f"{path}.conditions")
        ready = as_bool(cond.get("ready"), f"{path}.conditions.ready", True)
        serving = as_bool(cond.get("serving"), f"{path}.conditions.serving", ready)
        terminating = as_bool(cond.get("terminating"), f"{path}.conditions.terminating", False)
        hostname = as_str(item.get("hostname"), f"{path}.hostname")
        try:
            endpoints.append(
                Endpoint(
                    address=str(ip),
                    ready=ready,
                    serving=serving,
                    terminating=terminating,
                    hostname=hostname,
                    zone=as_str(item.get("zone"), f"{path}.zone"),
                    node=as_str(item.get("nodeName"), f"{path}.nodeName"),
                    ports=port_map,
                )
            )
        except DiscoveryError as exc:
            raise ConversionError(f"{path}.hostname", str(exc)) from None
    return EndpointSlice(
        cluster=cluster,
        key=key,
        name=slice_name,
        address_type=address_type,
        endpoints=tuple(endpoints),
        ports=tuple(ports),
    )


def convert_service_export(obj: Mapping[str, Any], cluster: ClusterId) -> ServiceExport:
    """A ServiceExport (v1alpha1 or v1beta1): its name and namespace name the exported Service; v1beta1's
    ``spec.exportedLabels`` / ``spec.exportedAnnotations`` are what the ServiceImport carries. Conditions are
    ours to compute, so any ``status`` in the object is ignored (the previous conditions, whose transition times
    are kept, are the control plane's own: ``discovery.mcs.carry_conditions``)."""
    key = _key(obj)
    meta = as_mapping(obj.get("metadata"), "metadata")
    spec = as_mapping(obj.get("spec"), "spec")
    created = parse_timestamp(meta.get("creationTimestamp"), "metadata.creationTimestamp")
    return ServiceExport(
        cluster=cluster,
        key=key,
        created=created,
        generation=as_int(meta.get("generation"), "metadata.generation", default=0, low=0, high=2**63 - 1),
        exported_labels=as_string_map(spec.get("exportedLabels"), "spec.exportedLabels"),
        exported_annotations=as_string_map(spec.get("exportedAnnotations"), "spec.exportedAnnotations"),
        peers=export_peers(dict(as_string_map(meta.get("annotations"), "metadata.annotations")).get(EXPORT_TO_PEERS)),
    )


#: The ServiceExport annotation that shares a service with peered clustersets (docs/peering.md): a comma-separated
#: list of peer names. Without it an export stays inside its clusterset.
EXPORT_TO_PEERS = "meshfed.io/export-to-peers"


def export_peers(value: str | None) -> tuple[str, ...]:
    """The peer names of an ``meshfed.io/export-to-peers`` value, sorted and deduplicated; a name that is not an RFC
    1123 label (or is ``svc``, which the peer naming reserves) is an error naming the annotation."""
    if not value or not value.strip():
        return ()
    path = f"metadata.annotations[{EXPORT_TO_PEERS}]"
    names = [n.strip() for n in value.split(",")]
    for name in names:
        if not name or len(name) > 63 or not _PEER_NAME.match(name) or name == "svc":
            raise ConversionError(path, f"{name!r} is not a peer name (a comma-separated list of RFC 1123 labels, "
                                        "not 'svc')")
    return tuple(sorted(set(names)))


_PEER_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "meshfed"


def service_import_object(imp: ServiceImport, *, version: str) -> dict[str, Any]:
    """The Kubernetes ServiceImport object of a derived import at MCS API ``version``: ``spec`` (type, ports, ips,
    the oldest export's traits) and ``status.clusters``; its labels and annotations are the oldest export's
    ``exportedLabels`` / ``exportedAnnotations``, plus the label that marks meshfed as the writer. v1alpha1 holds
    one address and none of v1beta1's newer fields."""
    ports = []
    for p in imp.ports:
        port: dict[str, Any] = {"port": p.port, "protocol": str(p.protocol)}
        if p.name:
            port["name"] = p.name
        if p.app_protocol:
            port["appProtocol"] = p.app_protocol
        ports.append(port)
    t = imp.traits
    spec: dict[str, Any] = {"type": str(imp.type), "ports": ports, "sessionAffinity": t.session_affinity}
    if imp.ips:
        spec["ips"] = list(imp.ips[:1] if version == "v1alpha1" else imp.ips[:2])
    if t.affinity_timeout:
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": t.affinity_timeout}}
    if version != "v1alpha1":
        if t.ip_families:
            spec["ipFamilies"] = list(t.ip_families)
        spec["internalTrafficPolicy"] = t.internal_traffic_policy
        if t.traffic_distribution:
            spec["trafficDistribution"] = t.traffic_distribution
    metadata: dict[str, Any] = {"name": imp.key.name, "namespace": imp.key.namespace,
                                "labels": {**dict(imp.labels), MANAGED_BY_LABEL: MANAGED_BY}}
    if imp.annotations:
        metadata["annotations"] = dict(imp.annotations)
    return {"apiVersion": f"{MCS_GROUP}/{version}", "kind": "ServiceImport", "metadata": metadata, "spec": spec,
            "status": {"clusters": [{"cluster": c} for c in imp.clusters]}}


#: The labels of a multicluster EndpointSlice (KEP-1645 "Using EndpointSlice objects to track endpoints").
MCS_SERVICE_NAME_LABEL = "multicluster.kubernetes.io/service-name"
MCS_SOURCE_CLUSTER_LABEL = "multicluster.kubernetes.io/source-cluster"
SLICE_MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
#: meshfed's value of ``endpointslice.kubernetes.io/managed-by``: not the endpoint slice controller's, so that
#: controller leaves the slices alone.
SLICE_MANAGED_BY = "mcs-controller.meshfed.io"


@dataclass(frozen=True, slots=True)
class ImportedSlice:
    """One multicluster EndpointSlice meshfed writes into an importing cluster: the endpoints one source cluster
    has for an imported service, of one address family. ``name`` is ``<svc>.<cluster>`` (``.ipv6`` appended for
    the IPv6 slice); service names and cluster ids are DNS labels, so no two (service, cluster) pairs share it."""

    key: ServiceKey
    source: ClusterId
    address_type: str
    ports: tuple[tuple[str, int, Protocol, str], ...]  # (name, number, protocol, appProtocol)
    endpoints: tuple[Endpoint, ...]

    @property
    def name(self) -> str:
        base = f"{self.key.name}.{self.source}"
        return base if self.address_type == "IPv4" else f"{base}.ipv6"


def imported_slices(imports: Mapping[ServiceKey, ServiceImport],
                    endpoints: Callable[[ClusterId, ServiceKey], Iterable[Endpoint]]) -> dict[tuple[ServiceKey, str],
                                                                                             ImportedSlice]:
    """The multicluster EndpointSlices of ``imports``, keyed by (service, slice name): one per source cluster
    (an IPv4 one, even with no endpoints, so every source shows; an IPv6 one besides when that cluster has IPv6
    endpoints), with ``endpoints(cluster, key)``'s endpoints and the import's ports at the numbers the endpoints
    use."""
    out: dict[tuple[ServiceKey, str], ImportedSlice] = {}
    for key, imp in sorted(imports.items()):
        for source in sorted(set(imp.clusters)):
            eps = sorted(endpoints(source, key), key=lambda e: _address_sort_key(e.address))
            for family, address_type in ((4, "IPv4"), (6, "IPv6")):
                members = tuple(e for e in eps if e.ip_version == family)
                if family == 6 and not members:
                    continue
                first = members[0] if members else None
                ports = tuple((p.name, first.port_for(p.name, p.port) if first is not None else p.port, p.protocol,
                               p.app_protocol) for p in imp.ports)
                sl = ImportedSlice(key=key, source=source, address_type=address_type, ports=ports,
                                   endpoints=members)
                out[(key, sl.name)] = sl
    return out


def imported_slice_object(sl: ImportedSlice, *, owner: tuple[str, str]) -> dict[str, Any]:
    """The ``discovery.k8s.io/v1`` EndpointSlice object of ``sl``, owned (not as controller) by the ServiceImport
    ``owner`` = (apiVersion, uid), as KEP-1645 has it."""
    ports = []
    for name, number, protocol, app_protocol in sl.ports:
        port: dict[str, Any] = {"name": name, "port": number, "protocol": str(protocol)}
        if app_protocol:
            port["appProtocol"] = app_protocol
        ports.append(port)
    endpoints = []
    for e in sl.endpoints:
        item: dict[str, Any] = {"addresses": [e.address],
                                "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating}}
        if e.hostname:
            item["hostname"] = e.hostname
        if e.zone:
            item["zone"] = e.zone
        endpoints.append(item)
    api_version, uid = owner
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": sl.name,
            "namespace": sl.key.namespace,
            "labels": {MCS_SERVICE_NAME_LABEL: sl.key.name, MCS_SOURCE_CLUSTER_LABEL: sl.source,
                       SLICE_MANAGED_BY_LABEL: SLICE_MANAGED_BY},
            "ownerReferences": [{"apiVersion": api_version, "kind": "ServiceImport", "name": sl.key.name,
                                 "uid": uid, "controller": False, "blockOwnerDeletion": False}],
        },
        "addressType": sl.address_type,
        "ports": ports,
        "endpoints": endpoints,
    }


def condition_object(c: Condition) -> dict[str, Any]:
    """A condition as the Kubernetes ``metav1.Condition`` JSON of a ServiceExport's ``status.conditions``."""
    out: dict[str, Any] = {"type": c.type, "status": str(c.status), "reason": c.reason, "message": c.message,
                           "observedGeneration": c.observed_generation}
    if c.last_transition_time is not None:
        out["lastTransitionTime"] = format_timestamp(c.last_transition_time)
    return out


# --------------------------------------------------------------------------------------------------------------
# Assembling one cluster's state from converted objects


def merge_endpoints(slices: Iterable[EndpointSlice]) -> tuple[Endpoint, ...]:
    """The endpoints of several slices of one Service, one per address.

    Slices are taken in name order; an address listed in more than one slice (a rollout moving it) keeps the
    conditions of the first and the union of ports. The result is sorted by address, so it does not depend on
    the order slices arrived in.
    """
    by_address: dict[str, Endpoint] = {}
    for sl in sorted(slices, key=lambda s: s.name):
        for ep in sl.endpoints:
            seen = by_address.get(ep.address)
            if seen is None:
                by_address[ep.address] = ep
            else:
                merged = dict(seen.ports)
                for name, number in ep.ports:
                    merged.setdefault(name, number)
                by_address[ep.address] = replace(seen, ports=tuple(sorted(merged.items())))
    return tuple(by_address[a] for a in sorted(by_address, key=_address_sort_key))


def _address_sort_key(address: str) -> tuple[int, int]:
    ip = ipaddress.ip_address(address)
    return (ip.version, int(ip))


@dataclass(frozen=True, slots=True)
class ClusterObjects:
    """One cluster's converted core objects, assembled: Services with their endpoints, and ServiceExports.

    ``unsupported`` lists Services that exist but cannot be exported (ExternalName), with why, for the MCS
    ``InvalidServiceType`` reason. ``orphan_slices`` are EndpointSlices whose Service is not there.
    """

    services: Mapping[ServiceKey, Service]
    exports: Mapping[ServiceKey, ServiceExport]
    unsupported: Mapping[ServiceKey, str]
    orphan_slices: tuple[EndpointSlice, ...] = ()


def assemble(objects: Iterable[Any]) -> ClusterObjects:
    """Group converted objects of one cluster: attach each Service's EndpointSlices to it (merged), index
    ServiceExports by key. Objects of other kinds are ignored here. Later duplicates of a key replace earlier
    ones, so feed objects in a deterministic order."""
    services: dict[ServiceKey, Service] = {}
    unsupported: dict[ServiceKey, str] = {}
    exports: dict[ServiceKey, ServiceExport] = {}
    slices: dict[ServiceKey, dict[str, EndpointSlice]] = {}
    for obj in objects:
        if isinstance(obj, Service):
            services[obj.key] = obj
            unsupported.pop(obj.key, None)
        elif isinstance(obj, ExternalNameService):
            unsupported[obj.key] = f"Service {obj.key.namespace}/{obj.key.name} is of type ExternalName"
            services.pop(obj.key, None)
        elif isinstance(obj, EndpointSlice):
            slices.setdefault(obj.key, {})[obj.name] = obj
        elif isinstance(obj, ServiceExport):
            exports[obj.key] = obj
    out: dict[ServiceKey, Service] = {}
    for key in sorted(services):
        svc = services[key]
        out[key] = replace(svc, endpoints=merge_endpoints(slices.get(key, {}).values()))
    orphans = tuple(sl for key in sorted(slices) if key not in services for _, sl in sorted(slices[key].items()))
    return ClusterObjects(
        services=out,
        exports={k: exports[k] for k in sorted(exports)},
        unsupported={k: unsupported[k] for k in sorted(unsupported)},
        orphan_slices=orphans,
    )


def service_export_object(key: ServiceKey, created: datetime, *, version: str = MCS_VERSIONS[0]) -> dict[str, Any]:
    """The Kubernetes ServiceExport object for ``key`` (what ``meshfed export`` writes or creates), at MCS API
    ``version`` (v1beta1 unless the cluster serves only v1alpha1)."""
    return {
        "apiVersion": f"{MCS_GROUP}/{version}",
        "kind": "ServiceExport",
        "metadata": {
            "name": key.name,
            "namespace": key.namespace,
            "creationTimestamp": format_timestamp(created),
        },
    }


# --------------------------------------------------------------------------------------------------------------
# The table

#: Every kind meshfed converts, by (apiVersion, kind); any other kind raises :class:`UnsupportedKind`.
CONVERTERS: Mapping[tuple[str, str], ConverterFn] = MappingProxyType({
    ("v1", "Service"): convert_service,
    ("discovery.k8s.io/v1", "EndpointSlice"): convert_endpoint_slice,
    **{(f"{MCS_GROUP}/{v}", "ServiceExport"): convert_service_export for v in MCS_VERSIONS},
    **{(f"{policy.NETWORKING_GROUP}/{v}", "DestinationRule"): policy.convert_destination_rule
       for v in policy.NETWORKING_VERSIONS},
    **{(f"{policy.NETWORKING_GROUP}/{v}", "VirtualService"): policy.convert_virtual_service
       for v in policy.NETWORKING_VERSIONS},
    **{(v, authz.KIND): authz.convert_authorization_policy for v in authz.API_VERSIONS},
})

__all__ = [
    "CONVERTERS",
    "MCS_API_VERSION",
    "MCS_GROUP",
    "MCS_VERSION",
    "MCS_VERSIONS",
    "SERVICE_NAME_LABEL",
    "ClusterObjects",
    "ConversionError",
    "Converted",
    "ConverterFn",
    "EndpointSlice",
    "ExternalNameService",
    "UnsupportedKind",
    "assemble",
    "convert",
    "convert_endpoint_slice",
    "convert_service",
    "convert_service_export",
    "format_timestamp",
    "is_known",
    "merge_endpoints",
    "object_ref",
    "parse_timestamp",
    "service_export_object",
    "service_import_object",
    "type_of",
]
