"""A local run's state (``<run-dir>/state.json``) as one typed value: what ``meshfed up`` started and where, which
``meshfed status``, ``down``, ``restart``, ``fault``, ``exec``, ``peer``, ``rotate`` and the dashboard read back.

The document is :class:`RunState`; :func:`read_state` and :func:`write_state` are its one codec
(:mod:`meshfed.jsondoc`: strict, an unknown or mistyped field is an error naming its path). The values are frozen:
the runner builds each new state with ``dataclasses.replace`` (or the ``with_*`` helpers here) and writes it before
it starts what the new record names, so ``meshfed down`` after a crash still finds everything.

Keys that are written only in some states (a workload's ``netns`` in a netns run, a gateway's ``pid`` once it
started, ``ready_at``, ``stopping_at``) are left out of the JSON while they hold their default, as the file has
always been written.

Errors (this module)::

    RunStateError (ValueError)      state.json unreadable, not JSON, or not a run state (names the file and path)
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

from federation.files import write_atomic
from meshfed import jsondoc
from meshfed.netplan import RUN_ID, NetPlan
from meshfed.procs import ProcRecord

STATE_FILE = "state.json"

T = TypeVar("T")


class RunStateError(ValueError):
    """A ``state.json`` that cannot be read as a run state."""


def _at_default(value: Any, *names: str) -> tuple[str, ...]:
    """The ``names`` of ``value``'s fields that hold their default (left out of the JSON)."""
    out = []
    for f in dataclasses.fields(value):
        if f.name not in names:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if getattr(value, f.name) == default:
            out.append(f.name)
    return tuple(out)


@dataclass(frozen=True)
class NetworkState:
    """How the run is networked: ``loopback``, or ``netns`` with the bed's plan and everything created for it (in
    the order it was created; :func:`meshfed.netns.teardown` removes exactly these)."""

    mode: str
    reason: str = ""
    run_id: str = ""
    plan: NetPlan | None = None  # the bed's addresses and names (meshfed.netplan)
    created: tuple[Mapping[str, str], ...] = ()
    removed_at: float | None = None
    teardown_problems: tuple[str, ...] = ()
    partitions: Mapping[str, tuple[str, ...]] | None = None  # cluster -> peers it is cut off from ([]: all)

    def json_omitted(self) -> tuple[str, ...]:
        omitted = _at_default(self, "removed_at", "teardown_problems", "partitions")
        if self.mode != "netns":
            omitted += ("run_id", "plan", "created")
        return omitted


@dataclass(frozen=True)
class CaState:
    root: str
    federation: str


@dataclass(frozen=True)
class FederationState:
    url: str
    pid: int
    log: str
    store: str
    lease_ttl_s: float
    bundle_endpoint: str
    peering_url: str
    spiffe_id: str
    peers_file: str
    metrics: str
    pod_urls: Mapping[str, str] | None = None  # netns: cluster -> the federation's URL on that cluster's bridge

    def json_omitted(self) -> tuple[str, ...]:
        return _at_default(self, "pod_urls")


@dataclass(frozen=True)
class ControlPlaneState:
    pid: int
    log: str
    xds: str
    dns: str
    admin: str
    xds_mtls: str


@dataclass(frozen=True)
class GatewayState:
    """A cluster's east-west gateway; ``pid``, ``log`` and ``node_id`` once its Envoy started."""

    address: str
    admin: str
    token: str
    netns: str = ""
    pid: int | None = None
    log: str = ""
    node_id: str = ""

    def json_omitted(self) -> tuple[str, ...]:
        return _at_default(self, "netns", "pid", "log", "node_id")


@dataclass(frozen=True)
class WorkloadState:
    """A sidecar workload (an app with its Envoy, or the ``sleep`` client: ``service`` empty). On loopback the
    sidecar's ``outbound`` is an explicit listener; in a netns run the pod's traffic is captured (``outbound`` empty,
    ``netns``/``pod_ip``/``manifest_address`` set)."""

    name: str
    cluster: str
    namespace: str
    service: str
    service_account: str
    address: str
    token: str
    port_name: str
    service_port: int
    spiffe_id: str
    inbound: str = ""
    app: str = ""
    outbound: str = ""
    sidecar_admin: str = ""
    netns: str = ""
    pod_ip: str = ""
    manifest_address: str = ""
    app_pid: int | None = None
    sidecar_pid: int | None = None
    sidecar_log: str = ""
    node_id: str = ""

    def json_omitted(self) -> tuple[str, ...]:
        return _at_default(self, "netns", "pod_ip", "manifest_address", "app_pid", "sidecar_pid", "sidecar_log",
                           "node_id")


@dataclass(frozen=True)
class ProxylessState:
    """A proxyless gRPC server (``address`` is where it serves); ``pid``, ``log``, ``bootstrap``, ``node_id`` once
    started."""

    name: str
    cluster: str
    namespace: str
    service: str
    service_account: str
    address: str
    port_name: str
    service_port: int
    spiffe_id: str
    netns: str = ""
    pod_ip: str = ""
    manifest_address: str = ""
    pid: int | None = None
    log: str = ""
    bootstrap: str = ""
    node_id: str = ""

    def json_omitted(self) -> tuple[str, ...]:
        return _at_default(self, "netns", "pod_ip", "manifest_address", "pid", "log", "bootstrap", "node_id")


@dataclass(frozen=True)
class GrpcClientState:
    """The proxyless client identity of a cluster: the bootstrap (and environment) to call ``xds:///`` with."""

    bootstrap: str
    node_id: str
    env: Mapping[str, str]


@dataclass(frozen=True)
class ClusterState:
    controlplane: ControlPlaneState
    gateway: GatewayState
    ca: str
    workloads: tuple[WorkloadState, ...] = ()
    proxyless: tuple[ProxylessState, ...] = ()
    grpc_client: GrpcClientState | None = None

    def json_omitted(self) -> tuple[str, ...]:
        return _at_default(self, "grpc_client")

    def workload(self, name: str) -> WorkloadState | None:
        return next((w for w in self.workloads if w.name == name), None)

    def with_workload(self, name: str, **changes: Any) -> ClusterState:
        return replace(self, workloads=tuple(replace(w, **changes) if w.name == name else w for w in self.workloads))

    def with_proxyless(self, name: str, **changes: Any) -> ClusterState:
        return replace(self, proxyless=tuple(replace(w, **changes) if w.name == name else w for w in self.proxyless))


@dataclass(frozen=True)
class PrometheusState:
    """The run's Prometheus; ``url`` None (and ``reason``) where it is not installed."""

    url: str | None
    reason: str = ""
    address: str = ""
    pid: int | None = None
    log: str = ""
    config: str = ""
    scrape_interval_s: float | None = None

    def json_omitted(self) -> tuple[str, ...]:
        return _at_default(self, "reason", "address", "pid", "log", "config", "scrape_interval_s")


@dataclass(frozen=True)
class RunState:
    """``state.json``: the run, every process it started (in start order), each cluster's addresses."""

    clusterset: str
    name: str
    run_dir: str
    trust_domain: str
    started_at: float
    cwd: str = ""  # recorded paths are relative to it ('meshfed restart' starts from here too)
    processes: tuple[ProcRecord, ...] = ()
    clusters: Mapping[str, ClusterState] = field(default_factory=dict)
    network: NetworkState = NetworkState(mode="loopback")
    ca: CaState | None = None
    federation: FederationState | None = None
    prometheus: PrometheusState | None = None
    proof: Mapping[str, Any] | None = None  # the cross-cluster request 'meshfed up' proved the run with
    ready_at: float | None = None
    stopping_at: float | None = None
    stopped_at: float | None = None

    def json_omitted(self) -> tuple[str, ...]:
        return _at_default(self, "ca", "federation", "prometheus", "proof", "ready_at", "stopping_at", "stopped_at")

    def cluster(self, name: str) -> ClusterState:
        return self.clusters[name]

    def process(self, name: str) -> ProcRecord | None:
        return next((p for p in self.processes if p.name == name), None)

    def with_process(self, rec: ProcRecord) -> RunState:
        return replace(self, processes=(*self.processes, rec))

    def with_processes(self, change: Callable[[ProcRecord], ProcRecord]) -> RunState:
        """Every process record through ``change`` (which returns a record as it is, or a changed one)."""
        return replace(self, processes=tuple(change(p) for p in self.processes))

    def with_cluster(self, name: str, cluster: ClusterState) -> RunState:
        return replace(self, clusters={**self.clusters, name: cluster})

    def update_cluster(self, name: str, change: Callable[[ClusterState], ClusterState]) -> RunState:
        return self.with_cluster(name, change(self.clusters[name]))

    def services_port(self, service: str) -> int | None:
        """The port the run's workloads serve ``service`` (``NAME.NS``) on, if one does."""
        for c in self.clusters.values():
            for w in c.workloads:
                if w.service and f"{w.service}.{w.namespace}" == service:
                    return w.service_port
        return None


def replace_pid(value: T, old: int, new: int) -> T:
    """``value`` (the state or a part of it) with every ``pid``-like field (``pid``, ``sidecar_pid``, ``app_pid``)
    that holds ``old`` holding ``new``: a restarted process is found where the old one was recorded."""
    out: Any = value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            current = getattr(value, f.name)
            if f.name.endswith("pid") and current == old:
                changes[f.name] = new
            elif isinstance(current, (tuple, Mapping)) or dataclasses.is_dataclass(current):
                changes[f.name] = replace_pid(current, old, new)
        out = replace(value, **changes)
    elif isinstance(value, tuple):
        out = tuple(replace_pid(v, old, new) for v in value)
    elif isinstance(value, Mapping):
        out = {k: replace_pid(v, old, new) for k, v in value.items()}
    result: T = out
    return result


def encode(state: RunState) -> dict[str, Any]:
    data: dict[str, Any] = jsondoc.encode(state)
    return data


def decode(data: Any, *, what: str = STATE_FILE) -> RunState:
    """``data`` (parsed ``state.json``) as a :class:`RunState`; :class:`RunStateError` naming the path if not."""
    try:
        state = jsondoc.decode(RunState, data, what=what)
    except jsondoc.DocumentError as exc:
        raise RunStateError(str(exc)) from exc
    plan = state.network.plan
    if plan is not None and not RUN_ID.match(plan.run_id):
        # The run id names the namespaces and links 'meshfed down' deletes: never anything but 4 hex digits.
        raise RunStateError(f"{what}: network.plan.run_id: {plan.run_id!r} is not 4 hex digits")
    if state.network.run_id and not RUN_ID.match(state.network.run_id):
        raise RunStateError(f"{what}: network.run_id: {state.network.run_id!r} is not 4 hex digits")
    return state


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) and make it 0700: the run directory and everything under it that holds
    tokens, keys or bootstraps is readable by the run's user only."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def write_state(run_dir: Path, state: RunState) -> None:
    """The run's ``state.json``: 0600 in a 0700 run directory (it holds every workload's xDS token)."""
    private_dir(run_dir)
    text = json.dumps(encode(state), indent=2, sort_keys=True).encode()
    write_atomic(run_dir / STATE_FILE, text, mode=0o600)


@overload
def read_state(run_dir: Path, *, missing_ok: Literal[False] = False) -> RunState: ...
@overload
def read_state(run_dir: Path, *, missing_ok: bool) -> RunState | None: ...


def read_state(run_dir: Path, *, missing_ok: bool = False) -> RunState | None:
    """The run in ``run_dir``; None (``missing_ok``) or :class:`NoRun` when there is none."""
    path = run_dir / STATE_FILE
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return None
        raise NoRun(f"no local run in {run_dir} ({STATE_FILE} missing); start one with 'meshfed up'") from None
    except OSError as exc:
        raise RunStateError(f"{path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise RunStateError(f"{path} is not valid JSON ({exc}); remove {run_dir} and run 'meshfed up'") from exc
    return decode(data, what=str(path))


class NoRun(RunStateError):
    """No ``state.json`` in the run directory."""
