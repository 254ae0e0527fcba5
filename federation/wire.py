"""The federation API's JSON form: records <-> plain JSON values, validated field by field.

Everything that crosses HTTP goes through here, in both directions: the service decodes request bodies and
encodes responses, the client does the reverse, with the same functions. A body that breaks a rule raises
``WireError`` naming the offending field as a path (``services[2].ports[0].port``), which the service answers
with 400 and ``{"error": ..., "field": ...}``.

Bodies are parsed with ``loads`` (never ``json.loads`` directly), which turns hostile JSON into ``WireError`` too:
bytes that are not UTF-8 JSON (``field`` None: the body as a whole), nesting deeper than ``MAX_DEPTH`` (the path
where it got too deep), and numbers no field can hold (integers longer than 20 digits, non-finite floats, ``NaN``):
those parse into an ``Unrepresentable`` placeholder, so the decoder that meets it names the field
(``generation: 1000...0 is out of range``). Request bodies are strict: a field this API does not know is rejected by
name (a typo such as ``generaton`` must not be dropped silently), and so is a null (leave a field out for its
default). What the client decodes from the service's
responses is lenient about unknown fields, so a newer service may add some.

Exception tree (this module)::

    FederationError (federation.records)
     +-- WireError        a JSON value that does not decode; ``field`` is the path of the offending value, or None
          |               for the body as a whole (not JSON at all)
          +-- ForeignCluster  a body naming another cluster than the caller's (403)
          +-- LimitExceeded   a well-formed body over one of the publish ``Limits`` (422; ``limit`` names it)
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from discovery.model import (
    DEFAULT_TRAITS,
    ClusterId,
    ClusterInfo,
    Condition,
    ConditionStatus,
    DiscoveryError,
    Endpoint,
    Locality,
    LocalitySummary,
    NetworkId,
    Protocol,
    RemoteEndpoints,
    ServiceImport,
    ServiceKey,
    ServicePort,
    ServiceTraits,
    ServiceType,
    cluster_id,
    namespace,
    network_id,
    service_name,
)
from federation.catalog import Catalog, CatalogService, Change, MemberChange, ServiceChange
from federation.peering.records import PeerBundleView, PeerService, PeerSnapshot
from federation.records import ExportedService, ExportSet, FederationError, Member

Json = Any
T = TypeVar("T")

MAX_SERVICES = 100_000
MAX_ENDPOINTS = 100_000
MAX_DEPTH = 64  # nesting levels of a body (the API's own documents need fewer than 10)
MAX_INT_DIGITS = 20  # 2**63 has 19; longer integer literals parse into Unrepresentable


@dataclass(frozen=True, slots=True)
class Limits:
    """What one member may publish (``meshfed federation serve --max-...``). A publish over a limit is answered 422
    (413 for the body size) naming the limit; nothing already stored changes."""

    services: int = 20_000  # services in one export set: --max-services
    endpoints: int = 5_000  # pod addresses of one exported service: --max-endpoints
    ports: int = 100  # ports of one exported service
    localities: int = 1_000  # locality summaries of one exported service
    body_bytes: int = 64 * 1024 * 1024  # one request body: --max-body-bytes (413)


DEFAULT_LIMITS = Limits()


class WireError(FederationError, ValueError):
    """A JSON value that does not decode; ``field`` names where (``services[2].ports[0].port``), None for the body
    as a whole."""

    def __init__(self, message: str, *, field: str | None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.reason = message


class ForeignCluster(WireError):
    """A body that speaks for a cluster other than the one in the path (the service answers 403)."""


class LimitExceeded(WireError):
    """A body over one of the publish ``Limits``: ``limit`` is its name (``maxServices``), ``maximum`` its value."""

    def __init__(self, message: str, *, field: str | None, limit: str, maximum: int) -> None:
        super().__init__(message, field=field)
        self.limit, self.maximum = limit, maximum


# --- parsing ----------------------------------------------------------------------------------------------------


class Unrepresentable:
    """A JSON number no field of this API can hold (a 5,000-digit integer, ``1e999``, ``NaN``): kept as its text
    so that the decoder meeting it names the field, instead of the parser failing without one."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text if len(self.text) <= 24 else f"{self.text[:10]}...({len(self.text)} characters)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Unrepresentable) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


def _parse_int(text: str) -> int | Unrepresentable:
    return Unrepresentable(text) if len(text.lstrip("-")) > MAX_INT_DIGITS else int(text)


def _parse_float(text: str) -> float | Unrepresentable:
    value = float(text)
    return value if math.isfinite(value) else Unrepresentable(text)


def loads(raw: bytes | str) -> Json:
    """A request or response body as JSON values, every failure a ``WireError`` (see the module docstring)."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes | bytearray) else raw
    except UnicodeDecodeError as exc:
        raise WireError(f"body is not JSON: not UTF-8 at byte {exc.start}", field=None) from exc
    try:
        value = _parse_in_pieces(text) if len(text) > _PIECES_OVER else _PARSER.decode(text)
    except RecursionError as exc:
        raise WireError(f"nested more than {MAX_DEPTH} levels deep", field=_deep_path(text)) from exc
    except ValueError as exc:  # json.JSONDecodeError
        raise WireError(f"body is not JSON: {exc}", field=None) from exc
    path = _too_deep(value)
    if path is not None:
        raise WireError(f"nested more than {MAX_DEPTH} levels deep", field=path)
    return value


_PARSER = json.JSONDecoder(parse_int=_parse_int, parse_float=_parse_float, parse_constant=Unrepresentable)
_PIECES_OVER = 256 * 1024  # characters; a larger body is parsed in pieces
_SPACE = re.compile(r"[ \t\n\r]*")


def _parse_in_pieces(text: str) -> Json:
    """``_PARSER.decode(text)``, but the top-level object's values and the items of top-level arrays (and of
    arrays that are its values) are parsed one at a time: a single ``json.loads`` of megabytes holds the GIL for
    its whole duration, and the thread waiting for it may be an event loop answering heartbeats."""

    def skip(i: int) -> int:
        match = _SPACE.match(text, i)
        return match.end() if match else i

    def value(i: int, depth: int) -> tuple[Json, int]:
        i = skip(i)
        if depth < 2 and text.startswith("[", i):
            items: list[Json] = []
            i = skip(i + 1)
            if text.startswith("]", i):
                return items, i + 1
            while True:
                item, i = value(i, depth + 1)
                items.append(item)
                i = skip(i)
                if text.startswith(",", i):
                    i += 1
                elif text.startswith("]", i):
                    return items, i + 1
                else:
                    raise ValueError(f"expected ',' or ']' at character {i}")
        if depth < 1 and text.startswith("{", i):
            members: dict[str, Json] = {}
            i = skip(i + 1)
            if text.startswith("}", i):
                return members, i + 1
            while True:
                key, i = _PARSER.raw_decode(text, skip(i))
                if not isinstance(key, str):
                    raise ValueError(f"expected a key at character {i}")
                i = skip(i)
                if not text.startswith(":", i):
                    raise ValueError(f"expected ':' at character {i}")
                members[key], i = value(i + 1, depth + 1)
                i = skip(i)
                if text.startswith(",", i):
                    i += 1
                elif text.startswith("}", i):
                    return members, i + 1
                else:
                    raise ValueError(f"expected ',' or '}}' at character {i}")
        return _PARSER.raw_decode(text, i)

    result, end = value(0, 0)
    if skip(end) != len(text):
        raise ValueError(f"extra data at character {skip(end)}")
    return result


def _too_deep(value: Json) -> str | None:
    """The path at which ``value`` nests deeper than ``MAX_DEPTH`` (iterative: no recursion on hostile input)."""
    stack: list[tuple[Json, str, int]] = [(value, "", 1)]  # the body itself is level 1
    while stack:
        item, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            return path
        if isinstance(item, dict):
            stack.extend((v, _join(path, str(k)), depth + 1) for k, v in item.items() if isinstance(v, dict | list))
        elif isinstance(item, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(item) if isinstance(v, dict | list))
    return None


def _deep_path(text: str) -> str:
    """Where ``text`` (too deep for the parser) first nests deeper than ``MAX_DEPTH``: a scan of brackets, keys and
    indexes outside strings. Only runs on a body the parser refused."""
    stack: list[list[Any]] = []  # [kind, key or index]
    key = ""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            key = text[i + 1:j]
            i = j + 1
            continue
        if c in "[{":
            stack.append(["[" if c == "[" else "{", 0 if c == "[" else ""])
            if len(stack) > MAX_DEPTH:
                break
        elif c in "]}" and stack:
            stack.pop()
        elif c == "," and stack and stack[-1][0] == "[":
            stack[-1][1] += 1
        elif c == ":" and stack and stack[-1][0] == "{":
            stack[-1][1] = key
        i += 1
    path = ""
    for kind, at in stack[:-1]:
        path = f"{path}[{at}]" if kind == "[" else _join(path, str(at))
    return path


# --- decoding helpers -------------------------------------------------------------------------------------------


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _obj(value: Json, path: str, known: frozenset[str] | None = None) -> Mapping[str, Json]:
    """``value`` as a JSON object; with ``known`` (request bodies), a key outside it is refused by name."""
    if not isinstance(value, dict):
        raise WireError("must be a JSON object", field=path or None)
    if known is not None:
        if not known.issuperset(value):
            unknown = sorted(k for k in value if k not in known)[0]
            raise WireError(f"is not a field of this object (known: {', '.join(sorted(known))})",
                            field=_join(path, unknown))
        for key in sorted(value):
            if value[key] is None:
                raise WireError("must not be null (leave the field out for its default)", field=_join(path, key))
    return value


def _list(value: Json, path: str, *, limit: int = MAX_ENDPOINTS, name: str = "") -> Sequence[Json]:
    """``value`` as a JSON array of at most ``limit`` items; ``name`` (a ``Limits`` field's public name) makes an
    overlong one a ``LimitExceeded`` (422) instead of a plain ``WireError``."""
    if not isinstance(value, list):
        raise WireError("must be a JSON array", field=path)
    if len(value) > limit:
        message = f"has {len(value)} items, more than the limit {limit}"
        if name:
            raise LimitExceeded(f"{message} ({name})", field=path, limit=name, maximum=limit)
        raise WireError(message, field=path)
    return value


def _absent(obj: Mapping[str, Json], key: str, default: Json) -> Json:
    """``obj[key]``, or ``default`` when it is missing or null (any other value is checked by the caller)."""
    value = obj.get(key)
    return default if value is None else value


def _req(obj: Mapping[str, Json], key: str, path: str) -> Json:
    if key not in obj:
        raise WireError("is required", field=_join(path, key))
    return obj[key]


def _str(obj: Mapping[str, Json], key: str, path: str, *, default: str | None = None) -> str:
    if key not in obj or obj[key] is None:
        if default is None:
            raise WireError("is required", field=_join(path, key))
        return default
    value = obj[key]
    if not isinstance(value, str):
        raise WireError("must be a string", field=_join(path, key))
    return value


def _int(obj: Mapping[str, Json], key: str, path: str, *, default: int | None = None, low: int | None = None,
         high: int | None = None) -> int:
    if key not in obj or obj[key] is None:
        if default is None:
            raise WireError("is required", field=_join(path, key))
        return default
    value = obj[key]
    if isinstance(value, Unrepresentable):
        raise WireError(f"{value!r} is out of range", field=_join(path, key))
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireError("must be an integer", field=_join(path, key))
    if high is None:
        high = 2**63 - 1
    if low is not None and value < low:
        raise WireError(f"must be at least {low}", field=_join(path, key))
    if high is not None and value > high:
        raise WireError(f"must be at most {high}", field=_join(path, key))
    return value


def _float(obj: Mapping[str, Json], key: str, path: str, *, default: float | None = None) -> float:
    if key not in obj or obj[key] is None:
        if default is None:
            raise WireError("is required", field=_join(path, key))
        return default
    value = obj[key]
    if isinstance(value, Unrepresentable):
        raise WireError(f"{value!r} is out of range", field=_join(path, key))
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise WireError("must be a number", field=_join(path, key))
    return float(value)


def _bool(obj: Mapping[str, Json], key: str, path: str, *, default: bool) -> bool:
    if key not in obj or obj[key] is None:
        return default
    value = obj[key]
    if not isinstance(value, bool):
        raise WireError("must be true or false", field=_join(path, key))
    return value


def _checked(fn: Callable[[str], T], value: str, path: str) -> T:
    try:
        return fn(value)
    except (DiscoveryError, ValueError) as exc:
        raise WireError(str(exc), field=path) from exc


def _time(obj: Mapping[str, Json], key: str, path: str, *, optional: bool = False) -> datetime | None:
    if key not in obj or obj[key] is None:
        if optional:
            return None
        raise WireError("is required", field=_join(path, key))
    text = obj[key]
    if not isinstance(text, str):
        raise WireError("must be an RFC 3339 time string", field=_join(path, key))
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise WireError(f"{text!r} is not an RFC 3339 time", field=_join(path, key)) from exc
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _req_time(obj: Mapping[str, Json], key: str, path: str) -> datetime:
    value = _time(obj, key, path)
    assert value is not None
    return value


def time_json(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _enum(obj: Mapping[str, Json], key: str, path: str, kind: type[T], default: T) -> T:
    if key not in obj or obj[key] is None:
        return default
    value = obj[key]
    try:
        return kind(value)  # type: ignore[call-arg]
    except ValueError as exc:
        allowed = ", ".join(str(v) for v in kind)  # type: ignore[attr-defined]
        raise WireError(f"{value!r} is not one of {allowed}", field=_join(path, key)) from exc


# --- small values ---------------------------------------------------------------------------------------------------


def port_json(p: ServicePort) -> Json:
    out: dict[str, Json] = {"port": p.port, "protocol": str(p.protocol)}
    if p.name:
        out["name"] = p.name
    if p.app_protocol:
        out["appProtocol"] = p.app_protocol
    if p.target_port:
        out["targetPort"] = p.target_port
    return out


_PORT_FIELDS = frozenset({"port", "protocol", "name", "appProtocol", "targetPort"})
_ENDPOINT_FIELDS = frozenset({"address", "ready", "serving", "terminating", "hostname", "zone", "node",
                              "serviceAccount", "ports", "labels"})
_ENDPOINT_PORT_FIELDS = frozenset({"name", "port"})
_LOCALITY_FIELDS = frozenset({"region", "zone", "cluster", "network", "ready", "weight"})
_REGISTRATION_FIELDS = frozenset({"network", "region", "zone", "gateway"})
_GATEWAY_FIELDS = frozenset({"host", "port"})
_TRAITS_FIELDS = frozenset({"sessionAffinity", "sessionAffinityTimeoutSeconds", "internalTrafficPolicy",
                            "trafficDistribution", "ipFamilies"})
_EXPORTED_FIELDS = frozenset({"namespace", "name", "type", "ports", "created", "localities", "endpoints",
                              "exportedLabels", "exportedAnnotations", "exportToPeers"}) | _TRAITS_FIELDS
_EXPORT_SET_FIELDS = frozenset({"generation", "services"})


def _known(fields: frozenset[str], strict: bool) -> frozenset[str] | None:
    return fields if strict else None


def port_from_json(value: Json, path: str, *, strict: bool = False) -> ServicePort:
    o = _obj(value, path, _known(_PORT_FIELDS, strict))
    port = _int(o, "port", path, low=1, high=65535)
    protocol = _enum(o, "protocol", path, Protocol, Protocol.TCP)
    name = _str(o, "name", path, default="")
    target = o.get("targetPort", 0)
    if target is None:
        target = 0
    if isinstance(target, bool) or not isinstance(target, int | str):
        raise WireError("must be a port number or a port name", field=_join(path, "targetPort"))
    if isinstance(target, int) and not 0 <= target <= 65535:
        raise WireError("must be in 0..65535", field=_join(path, "targetPort"))
    try:
        return ServicePort(port=port, protocol=protocol, name=name,
                           app_protocol=_str(o, "appProtocol", path, default=""), target_port=target)
    except DiscoveryError as exc:
        raise WireError(str(exc), field=_join(path, "name")) from exc


def endpoint_json(e: Endpoint) -> Json:
    """An endpoint; fields at their default value are left out (the decoder restores them)."""
    out: dict[str, Json] = {"address": e.address}
    if not e.ready:
        out["ready"] = False
    if not e.serving:
        out["serving"] = False
    if e.terminating:
        out["terminating"] = True
    for name, value in (("hostname", e.hostname), ("zone", e.zone), ("node", e.node),
                        ("serviceAccount", e.service_account)):
        if value:
            out[name] = value
    if e.ports:
        out["ports"] = [{"name": n, "port": p} for n, p in e.ports]
    if e.labels:
        out["labels"] = dict(e.labels)
    return out


def endpoint_from_json(value: Json, path: str, *, strict: bool = False) -> Endpoint:
    o = _obj(value, path, _known(_ENDPOINT_FIELDS, strict))
    address = _str(o, "address", path)
    ports: list[tuple[str, int]] = []
    for i, item in enumerate(_list(o.get("ports", []), _join(path, "ports"), limit=1000)):
        ip = f"{_join(path, 'ports')}[{i}]"
        po = _obj(item, ip, _known(_ENDPOINT_PORT_FIELDS, strict))
        ports.append((_str(po, "name", ip, default=""), _int(po, "port", ip, low=1, high=65535)))
    labels_raw = _obj(_absent(o, "labels", {}), _join(path, "labels"))
    labels: list[tuple[str, str]] = []
    for k, v in sorted(labels_raw.items()):
        if not isinstance(v, str):
            raise WireError("must be a string", field=_join(_join(path, "labels"), k))
        labels.append((k, v))
    hostname = _str(o, "hostname", path, default="")
    try:
        return Endpoint(
            address=address, ready=_bool(o, "ready", path, default=True),
            serving=_bool(o, "serving", path, default=True),
            terminating=_bool(o, "terminating", path, default=False), hostname=hostname,
            zone=_str(o, "zone", path, default=""), node=_str(o, "node", path, default=""),
            ports=tuple(ports), labels=tuple(labels), service_account=_str(o, "serviceAccount", path, default=""),
        )
    except DiscoveryError as exc:
        field = "hostname" if hostname and "hostname" in str(exc) else "address"
        raise WireError(str(exc), field=_join(path, field)) from exc


def locality_summary_json(s: LocalitySummary) -> Json:
    loc = s.locality
    return {"region": loc.region, "zone": loc.zone, "cluster": loc.cluster, "network": loc.network,
            "ready": s.ready, "weight": s.weight}


def locality_summary_from_json(value: Json, path: str, *, strict: bool = False) -> LocalitySummary:
    o = _obj(value, path, _known(_LOCALITY_FIELDS, strict))
    loc = Locality(region=_str(o, "region", path, default=""), zone=_str(o, "zone", path, default=""),
                   cluster=_str(o, "cluster", path, default=""), network=_str(o, "network", path, default=""))
    return LocalitySummary(locality=loc, ready=_int(o, "ready", path, low=0),
                           weight=_int(o, "weight", path, default=1, low=0, high=1_000_000))


def condition_json(c: Condition) -> Json:
    out: Json = {"type": c.type, "status": str(c.status), "reason": c.reason, "message": c.message}
    if c.observed_generation:
        out["observedGeneration"] = c.observed_generation
    if c.last_transition_time is not None:
        out["lastTransitionTime"] = time_json(c.last_transition_time)
    return out


def condition_from_json(value: Json, path: str) -> Condition:
    o = _obj(value, path)
    return Condition(type=_str(o, "type", path), status=_enum(o, "status", path, ConditionStatus,
                                                               ConditionStatus.UNKNOWN),
                     reason=_str(o, "reason", path, default=""), message=_str(o, "message", path, default=""),
                     observed_generation=_int(o, "observedGeneration", path, default=0, low=0, high=2**63 - 1),
                     last_transition_time=_time(o, "lastTransitionTime", path, optional=True))


def traits_json(t: ServiceTraits) -> Json:
    """A service's compared traits; fields at their default are left out (the decoder restores them), so a peer
    that predates them sends and reads the same JSON as before."""
    out: dict[str, Json] = {}
    if t.session_affinity != DEFAULT_TRAITS.session_affinity:
        out["sessionAffinity"] = t.session_affinity
    if t.affinity_timeout:
        out["sessionAffinityTimeoutSeconds"] = t.affinity_timeout
    if t.internal_traffic_policy != DEFAULT_TRAITS.internal_traffic_policy:
        out["internalTrafficPolicy"] = t.internal_traffic_policy
    if t.traffic_distribution:
        out["trafficDistribution"] = t.traffic_distribution
    if t.ip_families:
        out["ipFamilies"] = list(t.ip_families)
    return out


def traits_from_json(o: Mapping[str, Json], path: str) -> ServiceTraits:
    """The traits fields of ``o`` (an exported or catalog service); missing ones take their defaults."""
    families: list[str] = []
    for i, x in enumerate(_list(o.get("ipFamilies", []), _join(path, "ipFamilies"), limit=2)):
        if not isinstance(x, str):
            raise WireError("must be IPv4 or IPv6", field=f"{_join(path, 'ipFamilies')}[{i}]")
        families.append(x)
    try:
        return ServiceTraits(
            session_affinity=_str(o, "sessionAffinity", path, default=DEFAULT_TRAITS.session_affinity),
            affinity_timeout=_int(o, "sessionAffinityTimeoutSeconds", path, default=0, low=0, high=86400),
            internal_traffic_policy=_str(o, "internalTrafficPolicy", path,
                                         default=DEFAULT_TRAITS.internal_traffic_policy),
            traffic_distribution=_str(o, "trafficDistribution", path, default=""),
            ip_families=tuple(families))
    except DiscoveryError as exc:
        raise WireError(str(exc), field=path or None) from exc


def pairs_json(pairs: tuple[tuple[str, str], ...]) -> Json:
    return dict(pairs)


def pairs_from_json(o: Mapping[str, Json], key: str, path: str) -> tuple[tuple[str, str], ...]:
    """A JSON object of strings (labels, annotations) as sorted pairs; missing: none."""
    raw = _obj(_absent(o, key, {}), _join(path, key))
    out = []
    for k in sorted(raw):
        v = raw[k]
        if not isinstance(v, str):
            raise WireError("must be a string", field=_join(_join(path, key), k))
        out.append((k, v))
    return tuple(out)


def gateway_json(host: str, port: int) -> Json:
    return {"host": host, "port": port}


# --- members ------------------------------------------------------------------------------------------------------


def registration_json(info: ClusterInfo) -> Json:
    """The body of ``PUT /v1/clusters/{cluster}``."""
    return {"network": info.network, "region": info.region, "zone": info.zone,
            "gateway": gateway_json(info.gateway_host, info.gateway_port)}


def registration_from_json(value: Json, cluster: ClusterId, *, strict: bool = True) -> ClusterInfo:
    """The body of ``PUT /v1/clusters/{cluster}`` (strict: unknown fields refused)."""
    o = _obj(value, "", _known(_REGISTRATION_FIELDS, strict))
    net = _checked(network_id, _str(o, "network", ""), "network")
    gw = _obj(_absent(o, "gateway", {}), "gateway", _known(_GATEWAY_FIELDS, strict))
    host = _str(gw, "host", "gateway", default="")
    if host and not _is_host(host):
        raise WireError(f"{host!r} is neither an IP address nor a DNS name", field="gateway.host")
    port = _int(gw, "port", "gateway", default=15443, low=1, high=65535)
    return ClusterInfo(id=cluster, network=net, region=_str(o, "region", "", default=""),
                       zone=_str(o, "zone", "", default=""), gateway_host=host, gateway_port=port)


_DNS_LABEL = r"[a-zA-Z0-9]([-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?"
_DNS_NAME = re.compile(rf"^(?=.{{1,253}}$){_DNS_LABEL}(\.{_DNS_LABEL})*$")


def _is_host(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return bool(_DNS_NAME.match(text))


def member_json(m: Member, *, now: datetime | None = None) -> Json:
    now = now or datetime.now(UTC)
    return {
        "cluster": m.info.id, "network": m.info.network, "region": m.info.region, "zone": m.info.zone,
        "gateway": gateway_json(m.info.gateway_host, m.info.gateway_port),
        "registeredAt": time_json(m.registered_at), "renewedAt": time_json(m.renewed_at),
        "leaseTtlSeconds": m.lease_ttl_s,
        "leaseAgeSeconds": round(max(0.0, (now - m.renewed_at).total_seconds()), 3),
        "connected": m.unreachable_since is None,
        "unreachableSince": time_json(m.unreachable_since) if m.unreachable_since else None,
    }


def member_from_json(value: Json, path: str = "") -> Member:
    o = _obj(value, path)
    cluster = _checked(cluster_id, _str(o, "cluster", path), _join(path, "cluster"))
    info = _registration_at(o, cluster, path)
    return Member(info=info, registered_at=_req_time(o, "registeredAt", path),
                  renewed_at=_req_time(o, "renewedAt", path), lease_ttl_s=_float(o, "leaseTtlSeconds", path),
                  unreachable_since=_time(o, "unreachableSince", path, optional=True))


def _registration_at(o: Mapping[str, Json], cluster: ClusterId, path: str) -> ClusterInfo:
    try:
        return registration_from_json(o, cluster, strict=False)
    except WireError as exc:
        raise WireError(exc.reason, field=_join(path, exc.field or "")) from exc


# --- exports --------------------------------------------------------------------------------------------------------


def exported_service_json(s: ExportedService) -> Json:
    return {
        "namespace": s.key.namespace, "name": s.key.name, "type": str(s.type),
        "ports": [port_json(p) for p in s.ports], "created": time_json(s.created),
        "localities": [locality_summary_json(x) for x in s.localities],
        "endpoints": [endpoint_json(e) for e in s.endpoints],
        **traits_json(s.traits), **labels_json(s.exported_labels, s.exported_annotations, "exported"),
        **export_peers_json(s.peers),
    }


MAX_EXPORT_PEERS = 64  # peer names one exported service may list
_PEER_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def export_peers_json(peers: tuple[str, ...]) -> Json:
    """``exportToPeers`` (the peer clustersets a service is exported to), left out when empty."""
    return {"exportToPeers": list(peers)} if peers else {}


def export_peers_from_json(o: Mapping[str, Json], path: str) -> tuple[str, ...]:
    """``exportToPeers``: distinct peer names (RFC 1123 labels, not ``svc``), sorted; () when absent."""
    raw = _list(_absent(o, "exportToPeers", []), _join(path, "exportToPeers"), limit=MAX_EXPORT_PEERS)
    out: set[str] = set()
    for i, name in enumerate(raw):
        where = f"{_join(path, 'exportToPeers')}[{i}]"
        if not isinstance(name, str) or not _PEER_NAME.match(name) or name == "svc":
            raise WireError(f"{name!r} is not a peer name (an RFC 1123 label, not 'svc')", field=where)
        out.add(name)
    return tuple(sorted(out))


def labels_json(labels: tuple[tuple[str, str], ...], annotations: tuple[tuple[str, str], ...],
                 prefix: str) -> Json:
    """``labels`` / ``annotations`` under their (``prefix``ed) names, each left out when empty."""
    out: dict[str, Json] = {}
    if labels:
        out[f"{prefix}Labels" if prefix else "labels"] = pairs_json(labels)
    if annotations:
        out[f"{prefix}Annotations" if prefix else "annotations"] = pairs_json(annotations)
    return out


def exported_service_from_json(value: Json, path: str, *, cluster: ClusterId,
                               limits: Limits = DEFAULT_LIMITS) -> ExportedService:
    """One service of a publish (a request body: strict, and bounded by ``limits``)."""
    o = _obj(value, path, _EXPORTED_FIELDS)
    ns = _checked(namespace, _str(o, "namespace", path), _join(path, "namespace"))
    name = _checked(service_name, _str(o, "name", path), _join(path, "name"))
    ports_raw = _list(_req(o, "ports", path), _join(path, "ports"), limit=limits.ports, name="maxPorts")
    ports = tuple(port_from_json(p, f"{_join(path, 'ports')}[{i}]", strict=True) for i, p in enumerate(ports_raw))
    seen: dict[int, int] = {}
    for i, p in enumerate(ports):
        if p.port in seen:
            raise WireError(f"port {p.port} is listed twice", field=f"{_join(path, 'ports')}[{i}].port")
        seen[p.port] = i
    localities = tuple(
        locality_summary_from_json(x, f"{_join(path, 'localities')}[{i}]", strict=True)
        for i, x in enumerate(_list(o.get("localities", []), _join(path, "localities"), limit=limits.localities,
                                    name="maxLocalities"))
    )
    for i, loc in enumerate(localities):
        if loc.locality.cluster and loc.locality.cluster != cluster:
            raise ForeignCluster(f"names cluster {loc.locality.cluster!r}, not the publisher {cluster!r}",
                                 field=f"{_join(path, 'localities')}[{i}].cluster")
    endpoints = tuple(
        endpoint_from_json(x, f"{_join(path, 'endpoints')}[{i}]", strict=True)
        for i, x in enumerate(_list(o.get("endpoints", []), _join(path, "endpoints"), limit=limits.endpoints,
                                    name="maxEndpoints"))
    )
    return ExportedService(key=ServiceKey(namespace=ns, name=name),
                           type=_enum(o, "type", path, ServiceType, ServiceType.CLUSTER_SET_IP), ports=ports,
                           created=_req_time(o, "created", path), localities=localities, endpoints=endpoints,
                           traits=traits_from_json(o, path),
                           exported_labels=pairs_from_json(o, "exportedLabels", path),
                           exported_annotations=pairs_from_json(o, "exportedAnnotations", path),
                           peers=export_peers_from_json(o, path))


def export_set_json(e: ExportSet) -> Json:
    """The body of ``PUT /v1/clusters/{cluster}/exports``."""
    return {"generation": e.generation, "services": [exported_service_json(s) for s in e.services]}


class DecodeCache:
    """Each cluster's last decoded services by their raw JSON: a republished service whose JSON is unchanged is
    taken from here instead of being decoded and validated again (the result depends only on the JSON and the
    cluster). Holds one entry per exported service."""

    def __init__(self) -> None:
        self._by_cluster: dict[ClusterId, dict[tuple[str, str], tuple[Json, ExportedService]]] = {}

    def lookup(self, cluster: ClusterId) -> dict[tuple[str, str], tuple[Json, ExportedService]]:
        return self._by_cluster.get(cluster, {})

    def store(self, cluster: ClusterId, entries: dict[tuple[str, str], tuple[Json, ExportedService]]) -> None:
        self._by_cluster[cluster] = entries

    def forget(self, cluster: ClusterId) -> None:
        self._by_cluster.pop(cluster, None)


def export_set_from_json(value: Json, cluster: ClusterId, *, cache: DecodeCache | None = None,
                         limits: Limits = DEFAULT_LIMITS) -> ExportSet:
    """The body of ``PUT /v1/clusters/{cluster}/exports``: strict (unknown fields refused) and within ``limits``
    (``LimitExceeded`` naming the limit otherwise)."""
    o = _obj(value, "", _EXPORT_SET_FIELDS)
    generation = _int(o, "generation", "", low=1, high=2**63 - 1)
    raw = _list(_req(o, "services", ""), "services", limit=limits.services, name="maxServices")
    previous = cache.lookup(cluster) if cache is not None else {}
    entries: dict[tuple[str, str], tuple[Json, ExportedService]] = {}
    services: list[ExportedService] = []
    for i, s in enumerate(raw):
        ident: tuple[str, str] | None = None
        if isinstance(s, dict) and isinstance(s.get("namespace"), str) and isinstance(s.get("name"), str):
            ident = (s["namespace"], s["name"])
        hit = previous.get(ident) if ident is not None else None
        svc = hit[1] if hit is not None and hit[0] == s else \
            exported_service_from_json(s, f"services[{i}]", cluster=cluster, limits=limits)
        if ident is not None:
            entries[ident] = (s, svc)
        services.append(svc)
    seen: dict[ServiceKey, int] = {}
    for i, s in enumerate(services):
        if s.key in seen:
            raise WireError(f"service {s.key} is listed twice (first at services[{seen[s.key]}])",
                            field=f"services[{i}].name")
        seen[s.key] = i
    if cache is not None:
        cache.store(cluster, entries)
    return ExportSet(cluster=cluster, generation=generation, services=tuple(sorted(services, key=_service_order)))


def _service_order(s: ExportedService) -> tuple[str, str]:
    # The order of ServiceKey, on plain strings (comparing the dataclasses builds tuples on every comparison).
    return (s.key.namespace, s.key.name)


def _item_order(item: tuple[ServiceKey, CatalogService]) -> tuple[str, str]:
    return (item[0].namespace, item[0].name)


# --- catalog --------------------------------------------------------------------------------------------------------


def remote_endpoints_json(r: RemoteEndpoints) -> Json:
    return {"cluster": r.cluster, "network": r.network, "gateway": gateway_json(r.gateway_host, r.gateway_port),
            "localities": [locality_summary_json(x) for x in r.localities],
            "endpoints": [endpoint_json(e) for e in r.endpoints]}


def remote_endpoints_from_json(value: Json, path: str) -> RemoteEndpoints:
    o = _obj(value, path)
    gw = _obj(_absent(o, "gateway", {}), _join(path, "gateway"))
    return RemoteEndpoints(
        cluster=_checked(cluster_id, _str(o, "cluster", path), _join(path, "cluster")),
        network=NetworkId(_str(o, "network", path, default="")),
        gateway_host=_str(gw, "host", _join(path, "gateway"), default=""),
        gateway_port=_int(gw, "port", _join(path, "gateway"), default=15443, low=1, high=65535),
        localities=tuple(locality_summary_from_json(x, f"{_join(path, 'localities')}[{i}]")
                         for i, x in enumerate(_list(o.get("localities", []), _join(path, "localities")))),
        endpoints=tuple(endpoint_from_json(x, f"{_join(path, 'endpoints')}[{i}]")
                        for i, x in enumerate(_list(o.get("endpoints", []), _join(path, "endpoints")))),
    )


def catalog_service_json(s: CatalogService) -> Json:
    imp = s.import_
    return {
        "namespace": imp.key.namespace, "name": imp.key.name, "type": str(imp.type),
        "ports": [port_json(p) for p in imp.ports], "ips": list(imp.ips), "clusters": list(imp.clusters),
        "conditions": [dict(condition_json(c), cluster=cl) for cl, c in s.conditions],
        "endpoints": [remote_endpoints_json(r) for r in s.endpoints],
        **traits_json(imp.traits), **labels_json(imp.labels, imp.annotations, ""),
    }


def catalog_service_from_json(value: Json, path: str) -> CatalogService:
    o = _obj(value, path)
    key = ServiceKey(namespace=_checked(namespace, _str(o, "namespace", path), _join(path, "namespace")),
                     name=_checked(service_name, _str(o, "name", path), _join(path, "name")))
    ports = tuple(port_from_json(p, f"{_join(path, 'ports')}[{i}]")
                  for i, p in enumerate(_list(o.get("ports", []), _join(path, "ports"))))
    ips = tuple(str(x) for x in _list(o.get("ips", []), _join(path, "ips")))
    clusters = tuple(_checked(cluster_id, str(x), f"{_join(path, 'clusters')}[{i}]")
                     for i, x in enumerate(_list(o.get("clusters", []), _join(path, "clusters"))))
    conditions: list[tuple[ClusterId, Condition]] = []
    for i, c in enumerate(_list(o.get("conditions", []), _join(path, "conditions"))):
        cp = f"{_join(path, 'conditions')}[{i}]"
        conditions.append((_checked(cluster_id, _str(_obj(c, cp), "cluster", cp), _join(cp, "cluster")),
                           condition_from_json(c, cp)))
    endpoints = tuple(remote_endpoints_from_json(x, f"{_join(path, 'endpoints')}[{i}]")
                      for i, x in enumerate(_list(o.get("endpoints", []), _join(path, "endpoints"))))
    imp = ServiceImport(key=key, type=_enum(o, "type", path, ServiceType, ServiceType.CLUSTER_SET_IP), ports=ports,
                        clusters=clusters, ips=ips, traits=traits_from_json(o, path),
                        labels=pairs_from_json(o, "labels", path),
                        annotations=pairs_from_json(o, "annotations", path))
    return CatalogService(import_=imp, conditions=tuple(conditions), endpoints=endpoints)


def catalog_json(c: Catalog, *, now: datetime | None = None) -> Json:
    """The body of ``GET /v1/catalog`` without the trust bundle (the service adds ``trustBundle``)."""
    now = now or datetime.now(UTC)
    return {"revision": c.revision,
            "members": [member_json(m, now=now) for _, m in sorted(c.members.items())],
            "services": [catalog_service_json(s) for _, s in sorted(c.services.items(), key=_item_order)]}


def catalog_from_json(value: Json) -> Catalog:
    o = _obj(value, "")
    members = [member_from_json(m, f"members[{i}]") for i, m in enumerate(_list(_req(o, "members", ""), "members"))]
    services = [catalog_service_from_json(s, f"services[{i}]")
                for i, s in enumerate(_list(_req(o, "services", ""), "services", limit=MAX_SERVICES * 10))]
    return Catalog(revision=_int(o, "revision", "", low=0), members={m.info.id: m for m in members},
                   services={s.import_.key: s for s in services})


# --- watch events ---------------------------------------------------------------------------------------------------


def change_json(revision: int, change: Change, *, now: datetime | None = None) -> Json:
    if isinstance(change, ServiceChange):
        return {"revision": revision, "type": "service", "namespace": change.key.namespace, "name": change.key.name,
                "service": catalog_service_json(change.service) if change.service else None}
    return {"revision": revision, "type": "member", "cluster": change.cluster,
            "member": member_json(change.member, now=now) if change.member else None}


def bookmark_json(revision: int, *, leases: Mapping[ClusterId, datetime] | None = None) -> Json:
    """A bookmark line; ``leases`` (each connected member's last renewal) lets watchers follow heartbeats, which
    make no revision."""
    out: Json = {"revision": revision, "type": "bookmark"}
    if leases:
        out["leases"] = {c: time_json(at) for c, at in sorted(leases.items())}
    return out


def bookmark_leases_from_json(value: Json) -> dict[ClusterId, datetime]:
    """The ``leases`` of a bookmark line (empty when it has none)."""
    o = _obj(value, "")
    raw = _obj(_absent(o, "leases", {}), "leases")
    out: dict[ClusterId, datetime] = {}
    for name in raw:
        cluster = _checked(cluster_id, str(name), f"leases.{name}")
        out[cluster] = _req_time(raw, name, "leases")
    return out


def change_from_json(value: Json) -> tuple[int, Change | None]:
    """One watch line: ``(revision, change)``; ``change`` is None for a bookmark (the batch up to it is complete)."""
    o = _obj(value, "")
    revision = _int(o, "revision", "", low=0)
    kind = _str(o, "type", "")
    if kind == "bookmark":
        return revision, None
    if kind == "service":
        key = ServiceKey(namespace=_checked(namespace, _str(o, "namespace", ""), "namespace"),
                         name=_checked(service_name, _str(o, "name", ""), "name"))
        raw = o.get("service")
        return revision, ServiceChange(key=key, service=catalog_service_from_json(raw, "service") if raw else None)
    if kind == "member":
        cluster = _checked(cluster_id, _str(o, "cluster", ""), "cluster")
        raw = o.get("member")
        return revision, MemberChange(cluster=cluster, member=member_from_json(raw, "member") if raw else None)
    raise WireError(f"unknown change type {kind!r}", field="type")


# --- peers (members' listing and watch; the federation-to-federation exchange) --------------------------------------


def peer_bundle_json(b: PeerBundleView) -> Json:
    return {"peer": b.peer, "trustDomain": b.trust_domain, "pem": b.roots_pem, "sequence": b.sequence,
            "fetchedAt": time_json(b.fetched_at), "refreshHintSeconds": b.refresh_hint_s,
            "expiresAt": time_json(b.expires_at)}


def peer_bundle_from_json(value: Json, path: str) -> PeerBundleView:
    o = _obj(value, path)
    return PeerBundleView(peer=_str(o, "peer", path), trust_domain=_str(o, "trustDomain", path),
                          roots_pem=_str(o, "pem", path), sequence=_int(o, "sequence", path, low=0),
                          fetched_at=_req_time(o, "fetchedAt", path),
                          refresh_hint_s=_int(o, "refreshHintSeconds", path, low=0),
                          expires_at=_req_time(o, "expiresAt", path))


def offered_service_json(s: PeerService) -> Json:
    """One service as the exchange offers it to a peer (no pod addresses ever cross a peering)."""
    return {"namespace": s.key.namespace, "name": s.key.name, "type": str(s.type),
            "ports": [port_json(p) for p in s.ports],
            "endpoints": [remote_endpoints_json(replace(r, endpoints=())) for r in s.endpoints]}


def peer_service_json(s: PeerService) -> Json:
    return {"peer": s.peer, "trustDomain": s.trust_domain, **offered_service_json(s)}


def offered_service_from_json(value: Json, path: str, *, peer: str, trust_domain: str) -> PeerService:
    """One offered service; ``peer`` and ``trust_domain`` come from our own declaration, never from the body."""
    o = _obj(value, path)
    key = ServiceKey(namespace=_checked(namespace, _str(o, "namespace", path), _join(path, "namespace")),
                     name=_checked(service_name, _str(o, "name", path), _join(path, "name")))
    raw_ports = _list(_req(o, "ports", path), _join(path, "ports"), limit=DEFAULT_LIMITS.ports)
    ports = tuple(port_from_json(p, f"{_join(path, 'ports')}[{i}]") for i, p in enumerate(raw_ports))
    endpoints = tuple(replace(remote_endpoints_from_json(x, f"{_join(path, 'endpoints')}[{i}]"), endpoints=())
                      for i, x in enumerate(_list(o.get("endpoints", []), _join(path, "endpoints"), limit=1_000)))
    return PeerService(peer=peer, trust_domain=trust_domain, key=key,
                       type=_enum(o, "type", path, ServiceType, ServiceType.CLUSTER_SET_IP), ports=ports,
                       endpoints=endpoints)


def peer_service_from_json(value: Json, path: str) -> PeerService:
    o = _obj(value, path)
    return offered_service_from_json(o, path, peer=_str(o, "peer", path), trust_domain=_str(o, "trustDomain", path))


def peer_snapshot_json(snap: PeerSnapshot) -> Json:
    return {"version": snap.version,
            "bundles": [peer_bundle_json(b) for _, b in sorted(snap.bundles.items())],
            "services": [peer_service_json(s) for s in snap.services]}


def peer_snapshot_from_json(value: Json, path: str = "peers") -> PeerSnapshot:
    o = _obj(value, path)
    bundles = [peer_bundle_from_json(b, f"{path}.bundles[{i}]")
               for i, b in enumerate(_list(o.get("bundles", []), f"{path}.bundles"))]
    services = [peer_service_from_json(x, f"{path}.services[{i}]")
                for i, x in enumerate(_list(o.get("services", []), f"{path}.services", limit=MAX_SERVICES))]
    return PeerSnapshot(version=_int(o, "version", path, low=0), bundles={b.trust_domain: b for b in bundles},
                        services=tuple(services))


def peers_line_json(revision: int, snap: PeerSnapshot) -> Json:
    """A watch line carrying the whole peer snapshot (sent when the stream opens and whenever it changes)."""
    return {"revision": revision, "type": "peers", "peers": peer_snapshot_json(snap)}
