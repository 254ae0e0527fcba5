"""Pure builder of the ``clusterset.local`` lookup table: from a Registry to precomputed DNS wire answers.

The table follows the MCS DNS specification (KEP-1645 ``specification.md``, schema 1.0.0):

- ``dns-version.clusterset.local. TXT "1.0.0"``;
- a ClusterSetIP service: ``<svc>.<ns>.svc.clusterset.local`` A/AAAA with its ClusterSetIP(s); SRV on that bare
  name with one record per distinct port number, named or not (what the mcs-api conformance suite asks of
  ``nslookup -type=SRV <svc>.<ns>.svc.clusterset.local``), and one SRV
  ``_<port>._<proto>.<svc>.<ns>.svc.clusterset.local`` per named port, all targeting the service name; a PTR for
  each ClusterSetIP (those addresses belong to the clusterset, so no cluster-local PTR exists for them);
- a headless service: ``<svc>.<ns>.svc.clusterset.local`` A/AAAA with every ready endpoint of every exporting
  cluster, ``<hostname>.<clusterid>.<svc>.<ns>.svc.clusterset.local`` A/AAAA per ready endpoint; SRV on the bare
  name with one record per (cluster, hostname) and distinct port number, and SRV per named port and (cluster,
  hostname) pair, all targeting the per-endpoint names; with no ready endpoint the service has no name;
- ``<clusterid>.<svc>.<ns>.svc.clusterset.local`` never exists (NXDOMAIN): the KEP forbids names that pick one
  cluster's backends. Other names that exist only as parents of records (``svc.clusterset.local``,
  ``<ns>.svc.clusterset.local``, ``_<proto>.<svc>...``) answer NOERROR with no data.
- a service a peered clusterset exported to this one (docs/peering.md): ``<svc>.<ns>.svc.<peer>.clusterset.local``
  with the A/AAAA, PTR and SRV records of a ClusterSetIP service (its address is of this clusterset's range);
  ``svc.<peer>.clusterset.local`` and ``<ns>.svc.<peer>.clusterset.local`` exist as parents. Headless services are
  not served across a peering (no pod address crosses one).

Every answer is encoded once, here, keyed by the question as it appears on the wire (lower-cased name, type,
class IN), so the server only copies the client's ID, RD bit and question into it. Each key holds the variants a
server needs: plain UDP within 512 bytes, full answer for TCP, and EDNS answers by decreasing size (full, without
the additional section, truncated with TC set) to pick from by the client's advertised payload size.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from discovery.model import ClusterId, DiscoveryError, Endpoint, PeerImport, Registry, ServiceImport, ServiceType

APEX = "clusterset.local."
DNS_VERSION = "1.0.0"
# Service records change as endpoints come and go across clusters: keep caches short (CoreDNS uses 5 s too).
SERVICE_TTL = 5
# The schema version changes with a software upgrade only (the KEP's example uses 28800).
VERSION_TTL = 28800
# Negative answers are cached for min(SOA TTL, SOA minimum): short, so a new export resolves within seconds.
NEGATIVE_TTL = 5
APEX_TTL = 30
NAMESERVER = "ns.dns." + APEX
HOSTMASTER = "hostmaster." + APEX
EDNS_PAYLOAD = 1232
UDP_PAYLOAD = 512
TCP_MAX = 65535

# Resource record types and the one class served.
A, NS, SOA, PTR, TXT, AAAA, SRV, OPT, IXFR, AXFR, ANY = 1, 2, 6, 12, 16, 28, 33, 41, 251, 252, 255
IN = 1
TYPE_NAMES = {A: "A", NS: "NS", SOA: "SOA", PTR: "PTR", TXT: "TXT", AAAA: "AAAA", SRV: "SRV"}

RCODE_NOERROR, RCODE_FORMERR, RCODE_SERVFAIL, RCODE_NXDOMAIN, RCODE_NOTIMP, RCODE_REFUSED = 0, 1, 2, 3, 4, 5

# One answer variant: ((header bytes 2..12 with RD=0, the same with RD=1), bytes after the question, total length).
Variant = tuple[tuple[bytes, bytes], bytes, int]
# One table entry: (plain UDP answer fitting 512 bytes, plain TCP answer, EDNS UDP answers by decreasing size
# (the last always fits 512 bytes), EDNS TCP answer).
Entry = tuple[Variant, Variant, tuple[Variant, ...], Variant]

OPT_RR = b"\x00" + struct.pack("!HHIH", OPT, EDNS_PAYLOAD, 0, 0)


class DnsError(DiscoveryError):
    """Root of the DNS server's errors."""


def name_to_wire(name: str) -> bytes:
    """Encode an absolute domain name (lower-cased, uncompressed)."""
    out = bytearray()
    text = name.lower().rstrip(".")
    for label in text.split(".") if text else ():
        raw = label.encode("ascii")
        if not 0 < len(raw) <= 63:
            raise DnsError(f"name {name!r} has an empty label or one longer than 63 bytes")
        out.append(len(raw))
        out += raw
    out.append(0)
    if len(out) > 255:
        raise DnsError(f"name {name!r} is longer than 255 bytes on the wire")
    return bytes(out)


APEX_WIRE = name_to_wire(APEX)


@dataclass(frozen=True, slots=True)
class Record:
    """One resource record: owner (absolute, lower-case), type, TTL, rdata as text and as wire bytes."""

    name: str
    type: int
    ttl: int
    text: str
    rdata: bytes
    target: str = ""

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.type, f"TYPE{self.type}")

    def zone_line(self) -> str:
        return f"{self.name} {self.ttl} IN {self.type_name} {self.text}"


def address_record(name: str, ip: str, ttl: int = SERVICE_TTL) -> Record:
    addr = ipaddress.ip_address(ip)
    return Record(name, A if addr.version == 4 else AAAA, ttl, addr.compressed, addr.packed)


def srv_record(name: str, *, priority: int, weight: int, port: int, target: str, ttl: int = SERVICE_TTL) -> Record:
    rdata = struct.pack("!HHH", priority, weight, port) + name_to_wire(target)
    return Record(name, SRV, ttl, f"{priority} {weight} {port} {target}", rdata, target)


def txt_record(name: str, value: str, ttl: int) -> Record:
    raw = value.encode("ascii")
    return Record(name, TXT, ttl, f'"{value}"', bytes([len(raw)]) + raw)


def name_record(name: str, type_: int, target: str, ttl: int) -> Record:
    return Record(name, type_, ttl, target, name_to_wire(target), target)


def soa_record(serial: int) -> Record:
    refresh, retry, expire = 3600, 600, 86400
    rdata = name_to_wire(NAMESERVER) + name_to_wire(HOSTMASTER)
    rdata += struct.pack("!IIIII", serial, refresh, retry, expire, NEGATIVE_TTL)
    text = f"{NAMESERVER} {HOSTMASTER} {serial} {refresh} {retry} {expire} {NEGATIVE_TTL}"
    return Record(APEX, SOA, NEGATIVE_TTL, text, rdata)


def endpoint_label(endpoint: Endpoint) -> str:
    """The endpoint's hostname, or a name made from its address when it has none (the DNS spec's
    "unique, system-assigned identifier"): ``10-3-0-100``, or the exploded IPv6 address with dashes."""
    if endpoint.hostname:
        return endpoint.hostname
    return ipaddress.ip_address(endpoint.address).exploded.replace(".", "-").replace(":", "-")


def reverse_name(ip: str) -> str:
    return ipaddress.ip_address(ip).reverse_pointer + "."


# --------------------------------------------------------------------------------------------------------------
# Wire encoding of answers


_HEADS: dict[tuple[int, int, int, int, int], tuple[bytes, bytes]] = {}


def _heads(*, tc: bool, rcode: int, an: int, ns: int, ar: int) -> tuple[bytes, bytes]:
    """Header bytes 2..12 (flags and counts) for RD clear and RD set; QR and AA always set, RA clear."""
    key = (int(tc), rcode, an, ns, ar)
    found = _HEADS.get(key)
    if found is None:
        flags = 0x84 | (0x02 if tc else 0)
        counts = struct.pack("!HHHH", 1, an, ns, ar)
        found = (bytes((flags, rcode)) + counts, bytes((flags | 0x01, rcode)) + counts)
        _HEADS[key] = found
    return found


def _rr(owner: bytes, record: Record) -> bytes:
    return owner + struct.pack("!HHIH", record.type, IN, record.ttl, len(record.rdata)) + record.rdata


def encode_entry(qname_len: int, answers: Sequence[Record], additional: Sequence[Record] = ()) -> Entry:
    """Encode one positive answer for a question whose name takes ``qname_len`` wire bytes.

    Answers are owned by the question name (a pointer to offset 12); additional records are owned by SRV targets,
    compressed against the target inside the SRV rdata (the target itself is never compressed, per RFC 2782).
    """
    offset = 12 + qname_len + 4
    answer_rrs: list[bytes] = []
    target_at: dict[str, int] = {}
    for record in answers:
        rr = _rr(b"\xc0\x0c", record)
        if record.type == SRV and record.target not in target_at:
            target_at[record.target] = offset + 2 + 10 + 6
        answer_rrs.append(rr)
        offset += len(rr)
    extra_rrs: list[bytes] = []
    for record in additional:
        at = target_at.get(record.name)
        owner = struct.pack("!H", 0xC000 | at) if at is not None and at < 0x4000 else name_to_wire(record.name)
        extra_rrs.append(_rr(owner, record))

    base = 12 + qname_len + 4

    def variant(rrs: list[bytes], extra: list[bytes], *, edns: bool) -> Variant:
        body = b"".join(rrs) + b"".join(extra) + (OPT_RR if edns else b"")
        heads = _heads(tc=False, rcode=0, an=len(rrs), ns=0, ar=len(extra) + int(edns))
        return heads, body, base + len(body)

    def truncated(*, edns: bool) -> Variant:
        heads = _heads(tc=True, rcode=0, an=0, ns=0, ar=int(edns))
        body = OPT_RR if edns else b""
        return heads, body, base + len(body)

    def for_tcp(*, edns: bool) -> Variant:
        full = variant(answer_rrs, extra_rrs, edns=edns)
        if full[2] <= TCP_MAX:
            return full
        rrs = list(answer_rrs)
        while rrs and variant(rrs, [], edns=edns)[2] > TCP_MAX:
            rrs.pop()
        return variant(rrs, [], edns=edns)

    plain_full = variant(answer_rrs, extra_rrs, edns=False)
    plain_small = variant(answer_rrs, [], edns=False) if extra_rrs else plain_full
    edns_full = variant(answer_rrs, extra_rrs, edns=True)
    edns_small = variant(answer_rrs, [], edns=True) if extra_rrs else edns_full
    udp = next((v for v in (plain_full, plain_small) if v[2] <= UDP_PAYLOAD), None) or truncated(edns=False)
    edns_choices = tuple(dict.fromkeys((edns_full, edns_small, truncated(edns=True))))
    tcp = plain_full if plain_full[2] <= TCP_MAX else for_tcp(edns=False)
    edns_tcp = edns_full if edns_full[2] <= TCP_MAX else for_tcp(edns=True)
    return udp, tcp, edns_choices, edns_tcp


# --------------------------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True, slots=True)
class DnsTable:
    """An immutable, precomputed answer table for ``clusterset.local`` (plus PTRs of ClusterSetIPs).

    ``answers`` is keyed by question wire bytes (lower-cased name, type, class IN); ``names`` holds every name that
    exists in the zone (wire, lower-cased), including empty non-terminals, to tell NODATA from NXDOMAIN;
    ``soa`` is the zone's SOA record, sent in the authority section of negative answers.
    """

    records: tuple[Record, ...]
    serial: int
    answers: Mapping[bytes, Entry]
    names: frozenset[bytes]
    soa: Record
    skipped: tuple[str, ...] = ()
    services: int = 0
    soa_tail: bytes = field(default=b"", repr=False)

    @classmethod
    def compile(
        cls,
        records: Iterable[Record],
        *,
        serial: int,
        empty_non_terminals: Iterable[str] = (),
        skipped: Iterable[str] = (),
        services: int = 0,
    ) -> DnsTable:
        rrsets: dict[tuple[str, int], list[Record]] = {}
        seen: set[tuple[str, int, str]] = set()
        ordered: list[Record] = []
        for record in records:
            ident = (record.name, record.type, record.text)
            if ident in seen:
                continue
            seen.add(ident)
            ordered.append(record)
            rrsets.setdefault((record.name, record.type), []).append(record)

        by_name: dict[str, list[Record]] = {}
        for record in ordered:
            by_name.setdefault(record.name, []).append(record)

        answers: dict[bytes, Entry] = {}
        for (name, type_), rrset in rrsets.items():
            wire = name_to_wire(name)
            additional: list[Record] = []
            if type_ == SRV:
                for target in dict.fromkeys(r.target for r in rrset):
                    additional += rrsets.get((target, A), []) + rrsets.get((target, AAAA), [])
            answers[wire + struct.pack("!HH", type_, IN)] = encode_entry(len(wire), rrset, additional)
        for name, rrs in by_name.items():
            wire = name_to_wire(name)
            answers[wire + struct.pack("!HH", ANY, IN)] = encode_entry(len(wire), rrs)

        names = {name_to_wire(n) for n in by_name if _in_zone(n)}
        names.update(name_to_wire(n) for n in empty_non_terminals)
        soa = next((r for r in ordered if r.type == SOA), None) or soa_record(serial)
        tail = struct.pack("!HHIH", SOA, IN, soa.ttl, len(soa.rdata)) + soa.rdata
        return cls(
            records=tuple(ordered),
            serial=serial,
            answers=answers,
            names=frozenset(names),
            soa=soa,
            skipped=tuple(skipped),
            services=services,
            soa_tail=tail,
        )

    def lookup(self, name: str, type_: int) -> Entry | None:
        return self.answers.get(name_to_wire(name) + struct.pack("!HH", type_, IN))

    def exists(self, name: str) -> bool:
        return name_to_wire(name) in self.names

    def zone_text(self) -> str:
        """The records of ``clusterset.local`` as a zone file (the PTRs live in reverse zones and are left out)."""
        lines = [f"$ORIGIN {APEX}", f"$TTL {SERVICE_TTL}"]
        lines += [r.zone_line() for r in self.records if _in_zone(r.name)]
        return "\n".join(lines) + "\n"


def _in_zone(name: str) -> bool:
    return name == APEX or name.endswith("." + APEX)


def build_table(
    registry: Registry,
    *,
    serial: int | None = None,
    nameserver_addresses: Sequence[str] = (),
) -> DnsTable:
    """Build the lookup table for every ServiceImport of ``registry`` (pure; run it off the event loop).

    ``serial`` defaults to the registry's revision. ``nameserver_addresses`` gives ``ns.dns.clusterset.local``
    (the SOA's and NS record's name server) its addresses, when the server knows them.
    """
    zone_serial = (registry.revision if serial is None else serial) % 2**32
    records: list[Record] = [
        soa_record(zone_serial),
        name_record(APEX, NS, NAMESERVER, APEX_TTL),
        txt_record("dns-version." + APEX, DNS_VERSION, VERSION_TTL),
    ]
    ents: list[str] = ["svc." + APEX]
    if nameserver_addresses:
        records += [address_record(NAMESERVER, ip, APEX_TTL) for ip in nameserver_addresses]
        ents.append("dns." + APEX)
    skipped: list[str] = []
    served = 0
    for key, imported in sorted(registry.imports.items()):
        host = f"{key.name}.{key.namespace}.svc.{APEX}"
        if imported.type is ServiceType.HEADLESS:
            found = _headless_records(registry, imported, host)
        else:
            found = _cluster_set_ip_records(imported, host)
        if isinstance(found, str):
            skipped.append(f"{key}: {found}")
            continue
        service_records, service_ents = found
        records += service_records
        ents += service_ents
        ents.append(f"{key.namespace}.svc.{APEX}")
        served += 1
    for peer in registry.peers:
        if peer.type is ServiceType.HEADLESS:
            skipped.append(f"{peer.host}: a headless service is not served across a peering")
            continue
        found = _cluster_set_ip_records(peer, peer.host + ".")
        if isinstance(found, str):
            skipped.append(f"{peer.host}: {found}")
            continue
        records += found[0]
        ents += [*found[1], f"svc.{peer.peer}.{APEX}", f"{peer.key.namespace}.svc.{peer.peer}.{APEX}"]
        served += 1
    return DnsTable.compile(records, serial=zone_serial, empty_non_terminals=ents, skipped=skipped, services=served)


def _srv_names(imported: ServiceImport | PeerImport, host: str) -> list[tuple[str, int, str]]:
    """(SRV owner, service port, parent ENT ``_<proto>.<host>``) for each named port."""
    out = []
    for port in imported.ports:
        if port.name:
            proto = port.protocol.value.lower()
            out.append((f"_{port.name}._{proto}.{host}", port.port, f"_{proto}.{host}"))
    return out


def _distinct_ports(imported: ServiceImport | PeerImport) -> list[int]:
    """The service's port numbers, each once (a port served over TCP and UDP is one SRV target and port)."""
    return sorted({port.port for port in imported.ports})


def _port_names(imported: ServiceImport) -> dict[int, str]:
    """For each distinct port number, the name of its first port (to find an endpoint's own port number)."""
    names: dict[int, str] = {}
    for port in sorted(imported.ports, key=lambda p: (p.port, p.protocol, p.name)):
        names.setdefault(port.port, port.name)
    return names


def _cluster_set_ip_records(imported: ServiceImport | PeerImport, host: str) -> tuple[list[Record], list[str]] | str:
    ips: list[str] = []
    for ip in imported.ips:
        try:
            ips.append(ipaddress.ip_address(ip).compressed)
        except ValueError:
            continue
    if not ips:
        return "no ClusterSetIP allocated yet"
    records = [address_record(host, ip) for ip in ips]
    records += [name_record(reverse_name(ip), PTR, host, SERVICE_TTL) for ip in ips]
    records += [srv_record(host, priority=0, weight=100, port=port, target=host) for port in _distinct_ports(imported)]
    ents: list[str] = []
    for owner, port, parent in _srv_names(imported, host):
        records.append(srv_record(owner, priority=0, weight=100, port=port, target=host))
        ents.append(parent)
    return records, ents


def _ready_endpoints(registry: Registry, imported: ServiceImport) -> list[tuple[ClusterId, Endpoint]]:
    """Ready endpoints of each exporting cluster: its shard when this registry holds it, else the endpoints the
    federation shares for it (same-network remotes only carry pod addresses)."""
    found: list[tuple[ClusterId, Endpoint]] = []
    for cluster in sorted(set(imported.clusters)):
        endpoints = registry.source_endpoints(cluster, imported.key)
        found += [(cluster, e) for e in sorted(endpoints, key=lambda e: (e.address, e.hostname)) if e.ready]
    return found


def _headless_records(registry: Registry, imported: ServiceImport, host: str) -> tuple[list[Record], list[str]] | str:
    endpoints = _ready_endpoints(registry, imported)
    if not endpoints:
        return "headless service with no ready endpoint in any exporting cluster"
    records = [address_record(host, ip) for ip in dict.fromkeys(e.address for _, e in endpoints)]
    # One name per (cluster, hostname); the first endpoint of a hostname gives the SRV its port.
    members: dict[str, Endpoint] = {}
    for cluster, endpoint in endpoints:
        member = f"{endpoint_label(endpoint)}.{cluster}.{host}"
        if len(member) > 253:  # longer than a DNS name may be: the address stays under the service name only
            continue
        records.append(address_record(member, endpoint.address))
        members.setdefault(member, endpoint)
    ents: list[str] = []
    weight = max(1, 100 // max(1, len(members)))
    for port, name in _port_names(imported).items():
        for member, endpoint in members.items():
            records.append(srv_record(host, priority=0, weight=weight, port=endpoint.port_for(name, port),
                                      target=member))
    for owner, port, parent in _srv_names(imported, host):
        name = owner.split(".", 1)[0][1:]
        for member, endpoint in members.items():
            number = endpoint.port_for(name, port)
            records.append(srv_record(owner, priority=0, weight=weight, port=number, target=member))
        ents.append(parent)
    return records, ents
