"""``meshfed diagnose SVC.NS --from CLUSTER``: walk the path a request takes and name the first hop that fails.

The hops, in the order a request meets them::

    1 export        the service is exported, valid and not in conflict in every exporting cluster
    2 import        the calling cluster imports it (its control plane's /status)
    3 dns           the caller's clusterset.local DNS answers <svc>.<ns>.svc.clusterset.local with the ClusterSetIP
    4 xds           the caller's client sidecar ACKed every xDS type (no NACK) and has a route for the host
    5 gateway       every remote exporting cluster's east-west gateway has the SNI filter chain for the service
    6 endpoints     some cluster has ready endpoints, and the caller's sidecar sees healthy hosts for the service
    7 certificates  every cluster's intermediate chains to a root of the bundle and is unexpired; the running control
                    planes use those intermediates; the caller sidecar's certificates are unexpired
    8 policy        the exporting clusters' AuthorizationPolicies allow the call (:func:`check_policy`)
    9 request       a real request through the caller's client sidecar gets an answer

Two halves: :func:`collect` gathers the evidence (HTTP to control planes and Envoy admins, a DNS query, trust
checks on the run's CA directories, one request), and :func:`evaluate` turns an :class:`Evidence` into hops with no
IO, one pure function per hop. Every hop is evaluated even after a failure, so the table shows the whole path;
``first_failure`` names the first one that failed.

Errors (this module)::

    DiagnoseError          the diagnosis could not start (no run, unknown cluster, bad service name)
"""

from __future__ import annotations

import asyncio
import difflib
import http
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from discovery.addresses import parse_hostport
from meshfed.authz_check import ClusterPolicies, policy_evidence, policy_hop
from meshfed.controlplane.status import ControlPlaneStatus, ImportRow
from meshfed.runstate import RunState, WorkloadState
from meshfed.status import StatusError, fetch_status

log = logging.getLogger("meshfed.diagnose")

OK, FAIL, SKIPPED = "ok", "FAIL", "skipped"


class DiagnoseError(Exception):
    """The diagnosis could not start; the message says what to do next."""


@dataclass(frozen=True, slots=True)
class Hop:
    number: int
    name: str
    status: str  # ok | FAIL | skipped
    detail: str
    next_step: str = ""


@dataclass(frozen=True, slots=True)
class Evidence:
    """Everything the hops look at, gathered by :func:`collect` (or built by hand in tests)."""

    service: str  # "ratings.default"
    caller: str  # cluster name
    statuses: Mapping[str, ControlPlaneStatus | None]  # cluster -> control plane /status (None: did not answer)
    client: WorkloadState  # the caller's client workload in the run's state
    gateways: Mapping[str, Mapping[str, Any] | None] = field(default_factory=dict)  # cluster -> gateway config_dump
    gateway_errors: Mapping[str, str] = field(default_factory=dict)
    dns_answer: Sequence[str] | None = None  # A records; None if the query failed
    dns_error: str = ""
    sidecar_config: Mapping[str, Any] | None = None  # caller sidecar config_dump
    sidecar_clusters: str | None = None  # caller sidecar /clusters text
    sidecar_certs: Mapping[str, Any] | None = None  # caller sidecar /certs
    sidecar_error: str = ""
    chain_errors: Mapping[str, str] = field(default_factory=dict)  # cluster -> "" (verified) or why not
    disk_fingerprints: Mapping[str, str] = field(default_factory=dict)  # cluster -> on-disk intermediate fp
    request: tuple[int, str] | None = None  # (HTTP status, body) of the real request; None if not sent
    request_error: str = ""
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    # AuthorizationPolicies selecting the service, per exporting cluster (meshfed.authz_check), and why not read.
    policies: Mapping[str, ClusterPolicies] = field(default_factory=dict)
    policy_error: str = ""
    # Clusters whose processes this run started (their gateways can be inspected); empty: every cluster in statuses.
    # A member joined by hand (known from the federation's member list) is outside it.
    run_clusters: Sequence[str] = ()

    @property
    def host(self) -> str:
        return f"{self.service}.svc.clusterset.local"

    def caller_import(self) -> ImportRow | None:
        st = self.statuses.get(self.caller)
        return st.import_of(self.service) if st else None

    def exporters(self) -> list[str]:
        """Clusters exporting the service: by their own status, plus those the caller's import lists."""
        out = [c for c, st in self.statuses.items() if st and any(
            s.service == self.service and s.exported for s in st.services)]
        imp = self.caller_import()
        for c in imp.clusters if imp else ():
            if c not in out:
                out.append(c)
        return out

    def known_services(self) -> set[str]:
        """Every Service name any answering control plane knows (its own, exported or not, and its imports)."""
        names: set[str] = set()
        for st in self.statuses.values():
            if st:
                names.update(s.service for s in st.services)
                names.update(i.service for i in st.imports)
        return names

    def in_run(self, cluster: str) -> bool:
        return not self.run_clusters or cluster in self.run_clusters

    def port(self) -> int | None:
        imp = self.caller_import()
        return imp.ports[0].port if imp and imp.ports else None


# ---- the hops (pure) -------------------------------------------------------------------------------------------------


def hop_export(ev: Evidence) -> Hop:
    exporters = ev.exporters()
    known = ev.known_services()
    answering = sorted(c for c, st in ev.statuses.items() if st)
    if not exporters and ev.service not in known and answering:
        near = difflib.get_close_matches(ev.service, sorted(known), n=1, cutoff=0.6)
        hint = f"did you mean {near[0]}? " if near else ""
        return Hop(1, "export", FAIL, f"no Service {ev.service} exists in any cluster ({', '.join(answering)})",
                   f"{hint}check the name and namespace (NAME.NAMESPACE); 'meshfed status' lists every service")
    if not exporters:
        runs = sorted(c for c, st in ev.statuses.items() if st and any(s.service == ev.service for s in st.services))
        return Hop(1, "export", FAIL, f"no cluster exports {ev.service}"
                   + (f" (the Service exists in {', '.join(runs)})" if runs else ""),
                   f"create a ServiceExport for {ev.service} in the cluster that runs it: meshfed export "
                   f"{ev.service} --cluster {runs[0] if runs else 'CLUSTER'}")
    bad, notes = [], []
    for c in exporters:
        st = ev.statuses.get(c)
        if not st:
            notes.append(f"{c}: control plane not answering, conditions unknown")
            continue
        svc = next((s for s in st.services if s.service == ev.service), None)
        if svc is None or not svc.exported:
            continue
        for cond in svc.conditions:
            if cond.type == "Valid" and cond.status == "False":
                bad.append(f"{c}: Valid=False ({cond.reason}): {cond.message}")
            if cond.type == "Conflict" and cond.status == "True":
                bad.append(f"{c}: Conflict=True ({cond.reason}): {cond.message}")
    if bad:
        return Hop(1, "export", FAIL, "; ".join(bad),
                   "make the exporting clusters agree on type and ports (the oldest export wins a conflict)")
    return Hop(1, "export", OK, f"exported by {', '.join(exporters)}" + (f" ({'; '.join(notes)})" if notes else ""))


def hop_import(ev: Evidence) -> Hop:
    st = ev.statuses.get(ev.caller)
    if not st:
        return Hop(2, "import", FAIL, f"{ev.caller}'s control plane does not answer /status",
                   f"check the {ev.caller} control plane process and its log")
    imp = ev.caller_import()
    if imp is None:
        fed = st.federation
        why = "" if fed.connected or not fed.configured else f" ({ev.caller} is not connected to the federation)"
        return Hop(2, "import", FAIL, f"{ev.caller} does not import {ev.service}{why}",
                   "check that an exporting cluster is connected (meshfed status: unreachable members' exports "
                   "are withdrawn after the lease TTL)")
    ips = ", ".join(imp.ips) or "(headless)"
    return Hop(2, "import", OK, f"{imp.type} {ips} from {', '.join(imp.clusters) or ev.caller}")


def hop_dns(ev: Evidence) -> Hop:
    imp = ev.caller_import()
    if ev.dns_answer is None:
        return Hop(3, "dns", FAIL, f"no answer for {ev.host}: {ev.dns_error}",
                   f"query it by hand: dig @<dns> {ev.host}; check the {ev.caller} control plane's DNS listener")
    if imp is None:
        if ev.dns_answer:
            return Hop(3, "dns", FAIL, f"{ev.host} -> {', '.join(ev.dns_answer)} but it is not imported",
                       "the DNS table is stale: check the control plane log")
        return Hop(3, "dns", SKIPPED, f"{ev.host} has no records (not imported)", "fix the import hop first")
    want = list(imp.ips)
    got = sorted(ev.dns_answer)
    if want and sorted(want) != got:
        return Hop(3, "dns", FAIL, f"{ev.host} -> {', '.join(got) or 'NXDOMAIN'}, expected {', '.join(want)}",
                   "the DNS table lags the registry: check the control plane log for DNS update errors")
    if not got:
        return Hop(3, "dns", FAIL, f"{ev.host} has no A records", "no ready endpoints behind a headless service?")
    return Hop(3, "dns", OK, f"{ev.host} -> {', '.join(got)}")


def _route_domains(config: Mapping[str, Any]) -> set[str]:
    domains: set[str] = set()
    for c in config.get("configs", []):
        for rc in c.get("dynamic_route_configs", []):
            for vh in rc.get("route_config", {}).get("virtual_hosts", []):
                domains.update(vh.get("domains", []))
    return domains


def hop_xds(ev: Evidence) -> Hop:
    st = ev.statuses.get(ev.caller)
    node = ev.client.node_id
    if not st:
        return Hop(4, "xds", SKIPPED, f"{ev.caller}'s control plane does not answer", "fix the import hop first")
    rows = [p for p in st.proxies if p.node_id == node]
    if not rows:
        return Hop(4, "xds", FAIL, f"sidecar {ev.client.name} has no xDS stream to {ev.caller}",
                   f"check the sidecar log {ev.client.sidecar_log} (bootstrap, token, xDS address)")
    nacks = [f"{r.type_url.rsplit('.', 1)[-1]}: {r.nack_error}" for r in rows if r.state == "nacked"]
    if nacks:
        return Hop(4, "xds", FAIL, "NACKed " + "; ".join(nacks),
                   "the control plane generated config Envoy rejects: see the error, then the generator")
    stale = [r.type_url.rsplit(".", 1)[-1] for r in rows if r.state != "synced"]
    if ev.sidecar_config is None:
        return Hop(4, "xds", FAIL, f"sidecar admin unreachable: {ev.sidecar_error}",
                   f"is the sidecar running? see {ev.client.sidecar_log}")
    domains = _route_domains(ev.sidecar_config)
    if ev.host not in domains:
        return Hop(4, "xds", FAIL, f"ACKed, but the sidecar has no route for {ev.host}"
                   + (f" (still syncing: {', '.join(stale)})" if stale else ""),
                   "the import is missing from this proxy's RDS: check the import hop and the push log")
    note = f"; syncing {', '.join(stale)}" if stale else ""
    return Hop(4, "xds", OK, f"{len(rows)} types ACKed, no NACK, route for {ev.host}{note}")


def gateway_server_names(config: Mapping[str, Any]) -> set[str]:
    names: set[str] = set()
    for c in config.get("configs", []):
        # a whole dump nests listeners under "dynamic_listeners"; ?resource=dynamic_listeners lists them directly
        for item in c.get("dynamic_listeners", [c]):
            listener = item.get("active_state", {}).get("listener", {})
            for fc in listener.get("filter_chains", []):
                names.update(fc.get("filter_chain_match", {}).get("server_names", []))
    return names


def hop_gateway(ev: Evidence) -> Hop:
    remote = [c for c in ev.exporters() if c != ev.caller]
    imp = ev.caller_import()
    if imp is not None:
        remote = [c for c in remote if c in imp.clusters]
    if not remote:
        return Hop(5, "gateway", SKIPPED, "no remote cluster exports it: calls stay in the cluster")
    port = ev.port()
    sni = f"outbound_.{port}_._.{ev.host}" if port else ""
    missing, seen = [], []
    outside = [c for c in remote if not ev.in_run(c)]
    remote = [c for c in remote if ev.in_run(c)]
    if outside and not remote:
        return Hop(5, "gateway", SKIPPED, f"exported by {', '.join(outside)}, which this run did not start: its "
                   "gateway's configuration cannot be read from here", "check that cluster's gateway by hand")
    for c in remote:
        cfg = ev.gateways.get(c)
        if cfg is None:
            missing.append(f"{c}: gateway admin unreachable ({ev.gateway_errors.get(c, 'not running')})")
            continue
        names = gateway_server_names(cfg)
        if sni in names or (not port and any(ev.host in n for n in names)):
            seen.append(c)
        else:
            missing.append(f"{c}: no filter chain for SNI {sni or ev.host}")
    if missing:
        return Hop(5, "gateway", FAIL, "; ".join(missing),
                   "the exporting cluster's gateway lacks its config: check that gateway's xDS sync in "
                   "meshfed status and its Envoy log")
    note = f" ({', '.join(outside)}: not in this run, not checked)" if outside else ""
    return Hop(5, "gateway", OK, f"SNI {sni} present on {', '.join(seen)}{note}")


def healthy_hosts(clusters_text: str, port: int | None, host: str) -> tuple[int, int]:
    """(healthy, total) hosts of the outbound cluster in an Envoy ``/clusters`` text dump."""
    healthy, total, _ = host_health(clusters_text, port, host)
    return healthy, total


def host_health(clusters_text: str, port: int | None, host: str) -> tuple[int, int, list[str]]:
    """(healthy, total, ["ADDR flags" of each unhealthy host]) of the outbound cluster in a ``/clusters`` dump."""
    prefix = f"outbound|{port}||{host}::" if port else None
    healthy = total = 0
    bad: list[str] = []
    for line in clusters_text.splitlines():
        if "::health_flags::" not in line:
            continue
        if prefix is not None and not line.startswith(prefix):
            continue
        if prefix is None and f"||{host}::" not in line:
            continue
        total += 1
        if line.rstrip().endswith("::healthy"):
            healthy += 1
        else:
            parts = line.rstrip().split("::")
            bad.append(f"{parts[1]} {parts[-1]}" if len(parts) > 2 else line.strip())
    return healthy, total, bad


def hop_endpoints(ev: Evidence) -> Hop:
    imp = ev.caller_import()
    if imp is None:
        return Hop(6, "endpoints", SKIPPED, "not imported", "fix the import hop first")
    ready = dict(imp.ready_by_cluster)
    if sum(ready.values()) == 0:
        return Hop(6, "endpoints", FAIL, f"no ready endpoint in any cluster ({ready or 'none'})",
                   "start the workloads (or fix their readiness probes) in an exporting cluster")
    if ev.sidecar_clusters is None:
        return Hop(6, "endpoints", FAIL, f"cannot read the sidecar's /clusters: {ev.sidecar_error}",
                   "is the sidecar running?")
    healthy, total, bad = host_health(ev.sidecar_clusters, ev.port(), ev.host)
    counts = ", ".join(f"{c}={n}" for c, n in sorted(ready.items()))
    if healthy == 0:
        flags = f" ({'; '.join(bad)})" if bad else ""
        return Hop(6, "endpoints", FAIL, f"ready: {counts}; but the sidecar has {total} hosts, none healthy{flags}",
                   "EDS has not reached the sidecar (no hosts), the health check of the remote gateway fails "
                   "(/failed_active_hc: is the gateway up?), or outlier detection ejected every host "
                   "(/failed_outlier_check)")
    return Hop(6, "endpoints", OK, f"ready: {counts}; sidecar sees {healthy}/{total} healthy hosts")


def _expired_certs(certs: Mapping[str, Any], now: datetime) -> list[str]:
    out = []
    for entry in certs.get("certificates", []):
        for cert in entry.get("cert_chain", []) + entry.get("ca_cert", []):
            exp = cert.get("expiration_time")
            if not exp:
                continue
            try:
                when = datetime.fromisoformat(str(exp).replace("Z", "+00:00"))
            except ValueError:
                continue
            if when <= now:
                sans = ",".join(s.get("uri", "") for s in cert.get("subject_alt_names", []))
                out.append(f"{sans or cert.get('serial_number')} expired at {exp}")
    return out


def hop_certificates(ev: Evidence) -> Hop:
    bad = [f"{c}: {err}" for c, err in sorted(ev.chain_errors.items()) if err]
    for c, st in sorted(ev.statuses.items()):
        disk = ev.disk_fingerprints.get(c)
        running = st.trust.intermediate_fingerprint if st else ""
        if st and disk and running and disk != running:
            bad.append(f"{c}: the control plane runs intermediate {running[:16]} but its CA directory holds "
                       f"{disk[:16]} (it re-reads the directory every two seconds: if this stays, its log says "
                       "why, `CA reload failed`; restart it to load the new one)")
        heartbeat = st.federation.heartbeat_error if st else None
        if heartbeat:
            bad.append(f"{c}: its heartbeats to the federation are failing: {heartbeat}")
    if ev.sidecar_certs is not None:
        bad += [f"caller sidecar: {x}" for x in _expired_certs(ev.sidecar_certs, ev.now)]
    if bad:
        return Hop(7, "certificates", FAIL, "; ".join(bad),
                   "re-issue the cluster's intermediate from the clusterset root (meshfed ca intermediate / ca "
                   "rotate reissue; running control planes pick it up by themselves); during a root rotation, "
                   "`meshfed ca inspect` lists what still depends on the old root; see docs/troubleshooting.md")
    checked = ", ".join(sorted(ev.chain_errors)) or "no cluster"
    return Hop(7, "certificates", OK, f"intermediates of {checked} chain to the root bundle and are unexpired")


PolicyCheck = Callable[[Evidence], Hop]


def check_policy(ev: Evidence) -> Hop:
    """Hop 8. The exporting clusters' AuthorizationPolicies, evaluated for the request hop 9 sends."""
    status, detail, next_step = policy_hop(ev.policies, principal=ev.client.spiffe_id,
                                           caller=ev.caller, service=ev.service, error=ev.policy_error)
    return Hop(8, "policy", status, detail, next_step)


POLICY_CHECK: PolicyCheck = check_policy


def hop_request(ev: Evidence) -> Hop:
    if ev.request is None:
        return Hop(9, "request", FAIL, f"no answer through {_via(ev)}: {ev.request_error}",
                   "the sidecar's outbound listener is not answering; check the sidecar")
    status, body = ev.request
    if status != 200:
        return Hop(9, "request", FAIL, f"HTTP {status} through {_via(ev)}: {_why(status, body, ev)}",
                   "the earlier hops name the cause; 503 with no healthy upstream means no endpoint answered")
    try:
        answer = json.loads(body)
        who = f"answered by {answer.get('workload')} in {answer.get('cluster')}, caller {answer.get('caller')}"
    except ValueError:
        who = "answered (not the demo app)"
    return Hop(9, "request", OK, f"HTTP 200 via {_via(ev)}: {who}")


def _via(ev: Evidence) -> str:
    """How the request hop called: the sidecar's outbound listener, or (netns run) from inside the client's pod."""
    if ev.client.netns:
        return f"pod {ev.client.netns} (captured by its sidecar)"
    return ev.client.outbound


def _why(status: int, body: str, ev: Evidence) -> str:
    """The answer's body, or (Envoy answers some errors with none) the status's meaning for this request."""
    text = " ".join(body.split())[:200]
    if text:
        return text
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "unknown status"
    if status == 404:
        return f"{phrase}, empty body: the sidecar has no route for Host {ev.host} (see hop 4)"
    return f"{phrase}, empty body"


def evaluate(ev: Evidence) -> list[Hop]:
    """Every hop, in path order (pure)."""
    return [hop_export(ev), hop_import(ev), hop_dns(ev), hop_xds(ev), hop_gateway(ev), hop_endpoints(ev),
            hop_certificates(ev), POLICY_CHECK(ev), hop_request(ev)]


def report(ev: Evidence, hops: Sequence[Hop]) -> dict[str, Any]:
    first = next((h for h in hops if h.status == FAIL), None)
    return {
        "service": ev.service, "from": ev.caller, "host": ev.host,
        "ok": first is None,
        "first_failure": None if first is None else {"hop": first.number, "name": first.name, "detail": first.detail,
                                                     "next_step": first.next_step},
        "hops": [{"hop": h.number, "name": h.name, "status": h.status, "detail": h.detail, "next_step": h.next_step}
                 for h in hops],
    }


# ---- collection (IO) -------------------------------------------------------------------------------------------------


def parse_service(text: str) -> str:
    peer = text.removesuffix(".clusterset.local").split(".")
    if text.endswith(".clusterset.local") and len(peer) == 4 and peer[2] == "svc" and all(peer):
        raise DiagnoseError(
            f"service {text!r} is one peer {peer[3]!r} exported to this clusterset (docs/peering.md): diagnose walks "
            f"the clusterset's own services; for a peer's, 'meshfed status' shows its Peer services row (ready "
            f"endpoints, gateways) and the peer's bundle, and 'meshfed peer list' the peer itself")
    parts = text.removesuffix(".svc.clusterset.local").split(".")
    if len(parts) != 2 or not all(parts):
        raise DiagnoseError(f"service {text!r}: expected NAME.NAMESPACE, e.g. ratings.default")
    return ".".join(parts)


def chain_error(ca_dir: Path, cluster: str, root_dir: Path) -> tuple[str, str]:
    """("" or why the cluster's intermediate does not verify, its fingerprint) — a throwaway leaf under the cluster's
    intermediate is verified against the run's root bundle with the trust package's own peer check."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from federation.trust.ca import issue_workload
    from federation.trust.errors import TrustError
    from federation.trust.identity import cluster_of_peer
    from federation.trust.spiffe import SpiffeId
    from federation.trust.store import load_bundle, load_cluster_ca

    try:
        bundle = load_bundle(root_dir)
        ca = load_cluster_ca(ca_dir)
        _key, chain = issue_workload(ca, SpiffeId.cluster(bundle.trust_domain, cluster))
        ders = [x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER) for pem in chain]
        got = cluster_of_peer(ders, bundle)
        if str(got) != cluster:
            return f"intermediate in {ca_dir} belongs to cluster {got}, not {cluster}", ca.fingerprint
        return "", ca.fingerprint
    except TrustError as exc:
        return f"{exc}", ""
    except (OSError, ValueError) as exc:
        return f"cannot read {ca_dir}: {exc}", ""


async def _admin(admin: str) -> tuple[dict[str, Any] | None, str | None, dict[str, Any] | None, str]:
    from gateway.envoy import AdminError, EnvoyAdmin

    address = parse_hostport(admin)
    env = EnvoyAdmin(address.host, address.port, timeout=3.0)
    try:
        config = await env.config_dump()
        clusters = await env.clusters_text()
        status, body = await env._get("/certs")
        certs = json.loads(body) if status == 200 else None
    except (AdminError, ValueError) as exc:
        return None, None, None, str(exc)
    return config, clusters, certs, ""


async def _gateway_config(admin: str) -> tuple[dict[str, Any] | None, str]:
    from gateway.envoy import AdminError, EnvoyAdmin

    address = parse_hostport(admin)
    try:
        return await EnvoyAdmin(address.host, address.port, timeout=3.0).config_dump(resource="dynamic_listeners"), ""
    except AdminError as exc:
        return None, str(exc)


async def _dns(server: str, name: str) -> tuple[list[str] | None, str]:
    import dns.asyncquery
    import dns.exception
    import dns.message
    import dns.rcode
    import dns.rdatatype

    address = parse_hostport(server)
    query = dns.message.make_query(name, dns.rdatatype.A)
    try:
        resp = await dns.asyncquery.udp(query, address.host, port=address.port, timeout=2.0)
    except (dns.exception.DNSException, OSError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    if resp.rcode() == dns.rcode.NXDOMAIN:
        return [], ""
    return [r.address for rrset in resp.answer for r in rrset if r.rdtype == dns.rdatatype.A], ""


async def _gather(state: RunState, service: str, caller: str, client: WorkloadState,
                  statuses: Mapping[str, ControlPlaneStatus | None], exporters: Sequence[str]) -> dict[str, Any]:
    host = f"{service}.svc.clusterset.local"
    remote = [c for c in exporters if c != caller and c in state.clusters]
    results = await asyncio.gather(
        _dns(state.clusters[caller].controlplane.dns, host),
        _admin(client.sidecar_admin),
        *(_gateway_config(state.clusters[c].gateway.admin) for c in remote),
    )
    dns_answer, dns_error = results[0]
    config, clusters, certs, sidecar_error = results[1]
    gateways = {c: r[0] for c, r in zip(remote, results[2:], strict=True)}
    gateway_errors = {c: r[1] for c, r in zip(remote, results[2:], strict=True) if r[1]}
    return {"dns_answer": dns_answer, "dns_error": dns_error, "sidecar_config": config, "sidecar_clusters": clusters,
            "sidecar_certs": certs, "sidecar_error": sidecar_error, "gateways": gateways,
            "gateway_errors": gateway_errors}


def collect(run_dir: Path, service: str, caller: str, *, request_timeout: float = 5.0) -> Evidence:
    """Gather the evidence for ``service`` called from ``caller``'s client workload in a local run."""
    from meshfed import local

    service = parse_service(service)
    try:
        state = local.read_state(run_dir)
    except local.LocalRunError as exc:
        raise DiagnoseError(str(exc)) from exc
    stopped = local.stopped_message(run_dir, state)
    if stopped:
        raise DiagnoseError(f"no run to diagnose: {stopped}")
    if caller not in state.clusters:
        members = federation_members(state)
        if caller in members:
            raise DiagnoseError(
                f"{caller} is a member of the federation that this run did not start (joined by hand): diagnose "
                "needs its client sidecar and control plane, which only that cluster's operator has; diagnose from "
                f"{' or '.join(state.clusters)}, and see 'meshfed status' for {caller}'s lease")
        known = sorted(set(state.clusters) | set(members))
        raise DiagnoseError(f"no cluster {caller!r} in this run or its federation (clusters: {', '.join(known)})")
    try:
        client = local.client_of(state, caller)
    except local.LocalRunError as exc:
        raise DiagnoseError(str(exc)) from exc
    statuses: dict[str, ControlPlaneStatus | None] = {}
    for name, c in state.clusters.items():
        try:
            statuses[name] = fetch_status(c.controlplane.admin, what=name)
        except StatusError:
            statuses[name] = None
    partial = Evidence(service=service, caller=caller, statuses=statuses, client=client)
    gathered = asyncio.run(_gather(state, service, caller, client, statuses, partial.exporters()))
    chain_errors: dict[str, str] = {}
    fingerprints: dict[str, str] = {}
    if state.ca is None:
        raise DiagnoseError(f"the run in {run_dir} has no certificate authority recorded (it did not start)")
    root = Path(state.ca.root)
    for name, c in state.clusters.items():
        chain_errors[name], fingerprints[name] = chain_error(Path(c.ca), name, root)
    request: tuple[int, str] | None = None
    request_error = ""
    try:
        request = local.request(state, client, partial.host, timeout=request_timeout)
    except OSError as exc:
        request_error = f"{type(exc).__name__}: {exc}"
    policies, policy_error = policy_evidence(state.clusterset, service, partial.exporters())
    return Evidence(service=service, caller=caller, statuses=statuses, client=client,
                    chain_errors=chain_errors, disk_fingerprints=fingerprints, request=request,
                    request_error=request_error, policies=policies, policy_error=policy_error,
                    run_clusters=tuple(state.clusters), **gathered)


def federation_members(state: RunState) -> list[str]:
    """The cluster names the federation's member list holds (empty if it does not answer)."""
    from meshfed.status import local_members

    return [str(m["cluster"]) for m in local_members(state) or ()]
