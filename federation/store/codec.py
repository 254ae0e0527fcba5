"""The stored form of federation records: JSON, shared by the SQLite and etcd stores.

Encoding is canonical (sorted keys, no spaces), so two encodings of equal records are equal byte strings; the
stores use that to recognise an idempotent re-publish of the same generation. Timestamps are ISO 8601 strings and
keep their UTC offset. Decoding validates through the ``discovery.model`` constructors, so a damaged record fails
loudly with :class:`CorruptRecord` naming the record, instead of travelling further as a half-valid value.

Exception tree (this module)::

    FederationError                (federation.records)
     +-- StoreUnavailable
          +-- CorruptRecord        a stored record that does not decode (names the record and the field)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar, cast

from discovery.model import (
    ClusterId,
    ClusterInfo,
    DiscoveryError,
    Endpoint,
    Locality,
    LocalitySummary,
    Protocol,
    ServiceKey,
    ServicePort,
    ServiceType,
    cluster_id,
    namespace,
    network_id,
    service_name,
)
from federation import wire
from federation.records import (
    EventKind,
    ExportedService,
    ExportSet,
    Member,
    StoreEvent,
    StoreUnavailable,
)

Json = dict[str, Any]
_R = TypeVar("_R")


class CorruptRecord(StoreUnavailable):
    """A stored record does not decode; the message names the record and what is wrong with it."""


def dumps(obj: Json) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _ts(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _parse_ts(value: object, field: str) -> datetime:
    if not isinstance(value, str):
        raise ValueError(f"{field}: expected an ISO 8601 timestamp, got {value!r}")
    return datetime.fromisoformat(value)


# ---- members ---------------------------------------------------------------------------------------------------


def member_to_json(member: Member) -> Json:
    info = member.info
    return {
        "info": {
            "id": info.id,
            "network": info.network,
            "region": info.region,
            "zone": info.zone,
            "gateway_host": info.gateway_host,
            "gateway_port": info.gateway_port,
        },
        "registered_at": _ts(member.registered_at),
        "renewed_at": _ts(member.renewed_at),
        "lease_ttl_s": member.lease_ttl_s,
        "unreachable_since": _ts(member.unreachable_since),
    }


def member_from_json(obj: Mapping[str, Any]) -> Member:
    info = obj["info"]
    unreachable = obj.get("unreachable_since")
    return Member(
        info=ClusterInfo(
            id=cluster_id(str(info["id"])),
            network=network_id(str(info["network"])),
            region=str(info.get("region", "")),
            zone=str(info.get("zone", "")),
            gateway_host=str(info.get("gateway_host", "")),
            gateway_port=int(info.get("gateway_port", 15443)),
        ),
        registered_at=_parse_ts(obj["registered_at"], "registered_at"),
        renewed_at=_parse_ts(obj["renewed_at"], "renewed_at"),
        lease_ttl_s=float(obj["lease_ttl_s"]),
        unreachable_since=None if unreachable is None else _parse_ts(unreachable, "unreachable_since"),
    )


# ---- exports ---------------------------------------------------------------------------------------------------


def _port_to_json(p: ServicePort) -> Json:
    return {
        "port": p.port,
        "protocol": str(p.protocol),
        "name": p.name,
        "app_protocol": p.app_protocol,
        "target_port": p.target_port,
    }


def _port_from_json(o: Mapping[str, Any]) -> ServicePort:
    target = o.get("target_port", 0)
    return ServicePort(
        port=int(o["port"]),
        protocol=Protocol(o.get("protocol", "TCP")),
        name=str(o.get("name", "")),
        app_protocol=str(o.get("app_protocol", "")),
        target_port=target if isinstance(target, str) else int(target),
    )


def _locality_to_json(s: LocalitySummary) -> Json:
    loc = s.locality
    return {
        "locality": {"region": loc.region, "zone": loc.zone, "cluster": loc.cluster, "network": loc.network},
        "ready": s.ready,
        "weight": s.weight,
    }


def _locality_from_json(o: Mapping[str, Any]) -> LocalitySummary:
    loc = o["locality"]
    return LocalitySummary(
        locality=Locality(
            region=str(loc.get("region", "")),
            zone=str(loc.get("zone", "")),
            cluster=str(loc.get("cluster", "")),
            network=str(loc.get("network", "")),
        ),
        ready=int(o["ready"]),
        weight=int(o["weight"]),
    )


def _pairs(value: Sequence[tuple[str, Any]]) -> list[list[Any]]:
    return [[a, b] for a, b in value]


def _endpoint_to_json(e: Endpoint) -> Json:
    return {
        "address": e.address,
        "ready": e.ready,
        "serving": e.serving,
        "terminating": e.terminating,
        "hostname": e.hostname,
        "zone": e.zone,
        "node": e.node,
        "ports": _pairs(e.ports),
        "labels": _pairs(e.labels),
        "service_account": e.service_account,
    }


def _endpoint_from_json(o: Mapping[str, Any]) -> Endpoint:
    return Endpoint(
        address=str(o["address"]),
        ready=bool(o.get("ready", True)),
        serving=bool(o.get("serving", True)),
        terminating=bool(o.get("terminating", False)),
        hostname=str(o.get("hostname", "")),
        zone=str(o.get("zone", "")),
        node=str(o.get("node", "")),
        ports=tuple((str(n), int(p)) for n, p in o.get("ports", ())),
        labels=tuple((str(k), str(v)) for k, v in o.get("labels", ())),
        service_account=str(o.get("service_account", "")),
    )


def _service_to_json(s: ExportedService) -> Json:
    return {
        "key": {"namespace": s.key.namespace, "name": s.key.name},
        "type": str(s.type),
        "ports": [_port_to_json(p) for p in s.ports],
        "created": _ts(s.created),
        "localities": [_locality_to_json(loc) for loc in s.localities],
        "endpoints": [_endpoint_to_json(e) for e in s.endpoints],
        # The wire's codec for what the MCS rules compare: left out at defaults, so older records still decode.
        **wire.traits_json(s.traits), **wire.labels_json(s.exported_labels, s.exported_annotations, "exported"),
        **wire.export_peers_json(s.peers),
    }


def _service_from_json(o: Mapping[str, Any]) -> ExportedService:
    key = o["key"]
    return ExportedService(
        key=ServiceKey(namespace=namespace(str(key["namespace"])), name=service_name(str(key["name"]))),
        type=ServiceType(o["type"]),
        ports=tuple(_port_from_json(p) for p in o.get("ports", ())),
        created=_parse_ts(o["created"], "created"),
        localities=tuple(_locality_from_json(loc) for loc in o.get("localities", ())),
        endpoints=tuple(_endpoint_from_json(e) for e in o.get("endpoints", ())),
        traits=wire.traits_from_json(o, ""),
        exported_labels=wire.pairs_from_json(o, "exportedLabels", ""),
        exported_annotations=wire.pairs_from_json(o, "exportedAnnotations", ""),
        peers=wire.export_peers_from_json(o, ""),
    )


def exports_to_json(exports: ExportSet) -> Json:
    return {
        "cluster": exports.cluster,
        "generation": exports.generation,
        "services": [_service_to_json(s) for s in exports.services],
    }


def exports_from_json(obj: Mapping[str, Any]) -> ExportSet:
    return ExportSet(
        cluster=cluster_id(str(obj["cluster"])),
        generation=int(obj["generation"]),
        services=tuple(_service_from_json(s) for s in obj.get("services", ())),
    )


# ---- text entry points with clear errors -----------------------------------------------------------------------


def _load(text: str | bytes, what: str) -> Mapping[str, Any]:
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptRecord(f"{what}: not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise CorruptRecord(f"{what}: expected a JSON object, got {type(obj).__name__}")
    return cast(Mapping[str, Any], obj)


def encode_member(member: Member) -> str:
    return dumps(member_to_json(member))


def _decode(text: str | bytes, what: str, from_json: Callable[[Mapping[str, Any]], _R]) -> _R:
    """Parse one stored record; anything malformed is a CorruptRecord naming ``what``."""
    obj = _load(text, what)
    try:
        return from_json(obj)
    except (KeyError, TypeError, ValueError, DiscoveryError) as exc:
        raise CorruptRecord(f"{what}: {type(exc).__name__}: {exc}") from exc


def decode_member(text: str | bytes, *, what: str = "member record") -> Member:
    return _decode(text, what, member_from_json)


def encode_exports(exports: ExportSet) -> str:
    """``dumps(exports_to_json(exports))``, byte for byte, but one service at a time: a single ``json.dumps`` of
    20,000 services holds the GIL for a quarter of a second, stalling the event loop of the thread that waits."""
    head = dumps({"cluster": exports.cluster, "generation": exports.generation, "services": []})
    assert head.endswith("[]}")
    return head[:-2] + ",".join(dumps(_service_to_json(s)) for s in exports.services) + "]}"


def decode_exports(text: str | bytes, *, what: str = "export set record") -> ExportSet:
    """The inverse of ``encode_exports``; a canonical record is parsed one service at a time (one ``json.loads``
    of a large record holds the GIL as long as its encoding would)."""
    services = _split_services(text)
    if services is None:
        return _decode(text, what, exports_from_json)
    head, items = services
    return _decode(head, what, lambda obj: exports_from_json({**obj, "services": [
        _load(item, f"{what}: services[{i}]") for i, item in enumerate(items)]}))


_DECODER = json.JSONDecoder()
_SERVICES = ',"services":['


def _split_services(text: str | bytes) -> tuple[str, list[str]] | None:
    """``(the record without its services, each service's JSON text)`` for a canonical record, else None."""
    if isinstance(text, bytes | bytearray):
        try:
            text = text.decode()
        except UnicodeDecodeError:
            return None
    at = text.find(_SERVICES)
    if at < 0 or not text.endswith("]}"):
        return None
    head = text[:at] + ',"services":[]}'
    items: list[str] = []
    i, end = at + len(_SERVICES), len(text) - 2
    try:
        while i < end:
            _, j = _DECODER.raw_decode(text, i)
            items.append(text[i:j])
            i = j + 1 if j < end and text[j] == "," else j
            if j < end and text[j] not in ",":
                return None
    except ValueError:
        return None
    return (head, items) if i == end else None


def event_body(event: StoreEvent) -> str | None:
    """The JSON body an event log row keeps (the member or the export set; nothing for a removal)."""
    if event.kind is EventKind.MEMBER and event.member is not None:
        return encode_member(event.member)
    if event.kind is EventKind.EXPORTS and event.exports is not None:
        return encode_exports(event.exports)
    return None


def decode_event(revision: int, kind: str, cluster: str, body: str | None) -> StoreEvent:
    what = f"event at revision {revision}"
    try:
        ek = EventKind(kind)
    except ValueError as exc:
        raise CorruptRecord(f"{what}: unknown kind {kind!r}") from exc
    cid = ClusterId(cluster)
    if ek is EventKind.MEMBER:
        if body is None:
            raise CorruptRecord(f"{what}: member event without a body")
        return StoreEvent(revision=revision, kind=ek, cluster=cid, member=decode_member(body, what=what))
    if ek is EventKind.EXPORTS:
        if body is None:
            raise CorruptRecord(f"{what}: exports event without a body")
        return StoreEvent(revision=revision, kind=ek, cluster=cid, exports=decode_exports(body, what=what))
    return StoreEvent(revision=revision, kind=ek, cluster=cid)
