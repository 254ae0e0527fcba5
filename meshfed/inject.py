"""Sidecar injection, pure: a pod (or a pod template) as decoded JSON/YAML in, a JSON patch and the injected pod out.

The mutating webhook (``meshfed.controlplane.webhook``) and ``meshfed inject`` (``meshfed.cmd_inject``) are the two
edges; both hand this module the object as the API server or the file has it, and nothing here does IO. The pod is
read once, at the top, into :class:`PodFacts` (the few things the rules look at); the rules decide on those, and
:func:`inject` writes the additions as RFC 6902 operations (what the webhook returns) and applies the same
additions to a copy (what ``meshfed inject`` prints). See docs/injection.md.

What a pod gets (``initContainers`` run in order; the sidecar is a native sidecar, Kubernetes 1.29+)::

    initContainers[0] meshfed-init    meshfed proxy capture ...   uid 0, only NET_ADMIN and NET_RAW, read-only root
    initContainers[1] meshfed-proxy   meshfed proxy run           restartPolicy Always, uid 1337, read-only root,
                                                                  startup/readiness on :15021/healthz/ready
    volumes           meshfed-xds-token (projected service-account token, audience ``meshfed``),
                      meshfed-run (memory), meshfed-xtables (memory, the capture's iptables lock)
    metadata.annotations["meshfed.io/status"]   what was added (JSON); its presence makes a second run a no-op
    containers[*] probes  httpGet and tcpSocket liveness/readiness/startup probes rewritten to the agent's
                          ``:15020/app-health/<container>/livez|readyz|startupz`` (kubelet's probes would meet the
                          capture and the sidecar's mTLS); the originals in ``MESHFED_APP_PROBES`` on the sidecar,
                          which the agent runs from inside the pod (``meshfed.appprobe``). Opt out:
                          ``meshfed.io/rewriteAppProbes: "false"``

With ``inject.meshfed.io/templates: grpc`` (proxyless gRPC) only ``meshfed-proxy`` is added, running
``meshfed proxy run --grpc`` (``meshfed.grpcagent``: no Envoy, no capture), with the token and run volumes; every app
container gets ``GRPC_XDS_BOOTSTRAP`` and the run volume's ``grpc/`` read-only.

Exception tree (this module)::

    InjectError (ValueError)   the pod cannot be injected; ``field`` names the offending field
                               (``spec.hostNetwork``, ``metadata.annotations["meshfed.io/proxyCPU"]``, ...)
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from discovery.fields import ConversionError, as_list, as_mapping
from meshfed.capture import (
    DEFAULT_INBOUND_PORT,
    DEFAULT_OUTBOUND_PORT,
    DEFAULT_PROXY_UID,
    CaptureError,
    parse_cidrs,
    parse_ports,
)

Obj = dict[str, Any]
PatchOp = dict[str, Any]

INIT_NAME = "meshfed-init"
PROXY_NAME = "meshfed-proxy"
TOKEN_VOLUME = "meshfed-xds-token"
RUN_VOLUME = "meshfed-run"
XTABLES_VOLUME = "meshfed-xtables"
OUR_CONTAINERS = (INIT_NAME, PROXY_NAME)
OUR_VOLUMES = (TOKEN_VOLUME, RUN_VOLUME, XTABLES_VOLUME)

TOKEN_DIR = "/var/run/secrets/meshfed/xds"
TOKEN_FILE = f"{TOKEN_DIR}/token"
RUN_DIR = "/var/run/meshfed"
TOKEN_SECONDS = 3600

ENVOY_ADMIN_PORT = 15000
AGENT_PORT = 15020
HEALTH_PORT = 15021
METRICS_PORT = 15090
RESERVED_PORTS: tuple[int, ...] = (
    ENVOY_ADMIN_PORT, DEFAULT_OUTBOUND_PORT, DEFAULT_INBOUND_PORT, AGENT_PORT, HEALTH_PORT, METRICS_PORT)
"""Ports the proxy binds in the pod's network namespace: an application container may not declare them."""

ANNOTATION_PREFIX = "meshfed.io/"
INJECT = "meshfed.io/inject"
STATUS = "meshfed.io/status"
EXCLUDE_OUTBOUND_CIDRS = "meshfed.io/excludeOutboundIPRanges"
EXCLUDE_OUTBOUND_PORTS = "meshfed.io/excludeOutboundPorts"
EXCLUDE_INBOUND_PORTS = "meshfed.io/excludeInboundPorts"
PROXY_CPU = "meshfed.io/proxyCPU"
PROXY_MEMORY = "meshfed.io/proxyMemory"
PROXY_CPU_LIMIT = "meshfed.io/proxyCPULimit"
PROXY_MEMORY_LIMIT = "meshfed.io/proxyMemoryLimit"
REWRITE_PROBES = "meshfed.io/rewriteAppProbes"
"""``"false"`` keeps the application's probes as they are (kubelet then reaches the app through the capture:
only an app port excluded from it, or a probe on another port, still works)."""
APP_PROBES_ENV = "MESHFED_APP_PROBES"
APP_HEALTH_PREFIX = "/app-health/"
PROBE_KINDS: Mapping[str, str] = {"livenessProbe": "livez", "readinessProbe": "readyz", "startupProbe": "startupz"}
TEMPLATES = "inject.meshfed.io/templates"
"""Which injection template a pod gets: ``sidecar`` (the default: capture + Envoy) or ``grpc`` (proxyless gRPC: no
Envoy, no capture; the agent writes ``GRPC_XDS_BOOTSTRAP`` and the workload certificates, docs/injection.md)."""
TEMPLATE_SIDECAR, TEMPLATE_GRPC = "sidecar", "grpc"
GRPC_DIR = f"{RUN_DIR}/grpc"
GRPC_BOOTSTRAP = f"{GRPC_DIR}/bootstrap.json"
KNOWN_ANNOTATIONS = frozenset({
    INJECT, STATUS, EXCLUDE_OUTBOUND_CIDRS, EXCLUDE_OUTBOUND_PORTS, EXCLUDE_INBOUND_PORTS,
    PROXY_CPU, PROXY_MEMORY, PROXY_CPU_LIMIT, PROXY_MEMORY_LIMIT, TEMPLATES, REWRITE_PROBES,
})
"""Every ``meshfed.io/`` pod annotation the injector reads or writes; another one is refused (a typo would
otherwise be ignored silently)."""

PART_OF_LABEL = "app.kubernetes.io/part-of"
"""meshfed's own pods carry ``app.kubernetes.io/part-of: meshfed``; they are never injected (the webhook's object
selector leaves them out, and the injector skips them)."""

NAMESPACE_LABEL = "meshfed.io/inject"
"""Namespaces whose pods the webhook injects carry this label with the value ``enabled``."""

STATUS_VERSION = "1"

# Kubernetes resource.Quantity, as the API server parses it.
_QUANTITY = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i|[numkMGTPE])?")


class InjectError(ValueError):
    """The pod cannot be injected. ``field`` is the path of the field that says why (as ``kubectl explain``
    spells it, with list indexes), ``reason`` the rest of the message."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True, slots=True)
class InjectConfig:
    """What an injected pod points at and runs: from ``meshfed install``'s options for a cluster, or flags."""

    cluster: str
    image: str
    xds_address: str
    """``HOST:PORT`` of the control plane's plain ADS port (the stream authenticates with the projected token)."""
    image_pull_policy: str = "IfNotPresent"
    audience: str = "meshfed"
    proxy_uid: int = DEFAULT_PROXY_UID
    cpu: str = "100m"
    memory: str = "128Mi"
    memory_limit: str = "1Gi"
    cpu_limit: str = ""
    xds_mtls_address: str = ""
    """``HOST:PORT`` of the control plane's mutual-TLS ADS port, which proxyless gRPC (template ``grpc``) uses;
    "": the template is refused."""


@dataclass(frozen=True, slots=True)
class ContainerPort:
    field: str
    port: int
    name: str


@dataclass(frozen=True, slots=True)
class ProbeFact:
    """One probe of an application container as the pod has it (``field`` its path), with the container's named
    ports (a probe may name its port)."""

    field: str
    index: int  # in spec.containers
    container: str
    kind: str  # livenessProbe | readinessProbe | startupProbe
    probe: Mapping[str, Any]
    named_ports: tuple[tuple[str, Any], ...]


@dataclass(frozen=True, slots=True)
class PodFacts:
    """What the rules look at, read from the pod once (``field`` paths kept for the messages)."""

    prefix: str
    annotations: Mapping[str, str]
    labels: Mapping[str, str]
    host_network: bool
    container_names: tuple[tuple[str, str], ...]
    """(field, name) of every container and init container."""
    volume_names: tuple[tuple[str, str], ...]
    ports: tuple[ContainerPort, ...]
    """Ports of the application's containers (and its own init containers), TCP only."""
    run_as_proxy: tuple[str, ...]
    """Fields that run an application container as the proxy's uid (its traffic would escape capture)."""
    has_fs_group: bool
    app_env: tuple[tuple[str, str], ...] = ()
    """(field, name) of the application containers' env variables (the grpc template adds two)."""
    app_mounts: tuple[tuple[str, str], ...] = ()
    """(field, mountPath) of the application containers' volume mounts (the grpc template adds one)."""
    probes: tuple[ProbeFact, ...] = ()
    """The application containers' liveness, readiness and startup probes (injection may move them)."""


@dataclass(frozen=True, slots=True)
class Skipped:
    """Nothing to do; ``reason`` says why (opted out, already injected)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Injected:
    """The additions: ``patch`` (RFC 6902, relative to the pod object) and ``pod``, a copy with them applied."""

    patch: tuple[PatchOp, ...]
    pod: Obj


Outcome = Skipped | Injected


def _field(prefix: str, path: str) -> str:
    return f"{prefix}{path}"


def _mapping(value: Any, field: str) -> Mapping[str, Any]:
    try:
        return as_mapping(value, field)
    except ConversionError as exc:
        raise InjectError(exc.field, exc.reason) from None


def _list(value: Any, field: str) -> Sequence[Any]:
    try:
        return as_list(value, field)
    except ConversionError as exc:
        raise InjectError(exc.field, exc.reason) from None


def read_pod(pod: Any, *, prefix: str = "") -> PodFacts:
    """The pod's facts; ``prefix`` is prepended to field paths (``spec.template.`` for a Deployment)."""
    pod = _mapping(pod, prefix.rstrip(".") or "pod")
    meta = _mapping(pod.get("metadata"), _field(prefix, "metadata"))
    raw_annotations = _mapping(meta.get("annotations"), _field(prefix, "metadata.annotations"))
    annotations: dict[str, str] = {}
    for key, value in raw_annotations.items():
        if not isinstance(value, str):
            raise InjectError(_field(prefix, f"metadata.annotations[{json.dumps(key)}]"), "must be a string")
        annotations[str(key)] = value
    labels = {str(k): str(v) for k, v in _mapping(meta.get("labels"), _field(prefix, "metadata.labels")).items()}
    spec = _mapping(pod.get("spec"), _field(prefix, "spec"))
    if "spec" not in pod:
        raise InjectError(_field(prefix, "spec"), "is missing: not a pod (template)")
    containers = _list(spec.get("containers"), _field(prefix, "spec.containers"))
    if not containers:
        raise InjectError(_field(prefix, "spec.containers"), "a pod needs at least one container")
    names: list[tuple[str, str]] = []
    ports: list[ContainerPort] = []
    as_proxy: list[str] = []
    app_env: list[tuple[str, str]] = []
    app_mounts: list[tuple[str, str]] = []
    probes: list[ProbeFact] = []
    pod_sc = _mapping(spec.get("securityContext"), _field(prefix, "spec.securityContext"))
    for kind in ("initContainers", "containers"):
        for i, c in enumerate(_list(spec.get(kind), _field(prefix, f"spec.{kind}"))):
            where = _field(prefix, f"spec.{kind}[{i}]")
            c = _mapping(c, where)
            names.append((f"{where}.name", str(c.get("name", ""))))
            if c.get("name") in OUR_CONTAINERS:
                continue
            for j, p in enumerate(_list(c.get("ports"), f"{where}.ports")):
                p = _mapping(p, f"{where}.ports[{j}]")
                if p.get("protocol", "TCP") != "TCP":
                    continue
                number = p.get("containerPort")
                if not isinstance(number, int):
                    raise InjectError(f"{where}.ports[{j}].containerPort", "must be an integer port")
                ports.append(ContainerPort(f"{where}.ports[{j}].containerPort", number, str(p.get("name", ""))))
            if kind == "containers":
                named = tuple((str(p.get("name")), p.get("containerPort")) for p in _list(c.get("ports"), "ports")
                              if isinstance(p, Mapping) and p.get("name"))
                for probe_kind in PROBE_KINDS:
                    if c.get(probe_kind) is not None:
                        probes.append(ProbeFact(f"{where}.{probe_kind}", i, str(c.get("name", "")), probe_kind,
                                                dict(_mapping(c[probe_kind], f"{where}.{probe_kind}")), named))
                for j, e in enumerate(_list(c.get("env"), f"{where}.env")):
                    app_env.append((f"{where}.env[{j}].name", str(_mapping(e, f"{where}.env[{j}]").get("name"))))
                for j, m in enumerate(_list(c.get("volumeMounts"), f"{where}.volumeMounts")):
                    m = _mapping(m, f"{where}.volumeMounts[{j}]")
                    app_mounts.append((f"{where}.volumeMounts[{j}].mountPath", str(m.get("mountPath"))))
            sc = _mapping(c.get("securityContext"), f"{where}.securityContext")
            uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
            if uid == DEFAULT_PROXY_UID:
                as_proxy.append(f"{where}.securityContext.runAsUser" if "runAsUser" in sc
                                else _field(prefix, "spec.securityContext.runAsUser"))
    volumes = tuple(
        (_field(prefix, f"spec.volumes[{i}].name"), str(_mapping(v, _field(prefix, f"spec.volumes[{i}]")).get("name")))
        for i, v in enumerate(_list(spec.get("volumes"), _field(prefix, "spec.volumes"))))
    return PodFacts(
        prefix=prefix,
        annotations=annotations,
        labels=labels,
        host_network=spec.get("hostNetwork") is True,
        container_names=tuple(names),
        volume_names=volumes,
        ports=tuple(ports),
        run_as_proxy=tuple(as_proxy),
        has_fs_group="fsGroup" in pod_sc,
        app_env=tuple(app_env),
        app_mounts=tuple(app_mounts),
        probes=tuple(probes),
    )


def _annotation_field(facts: PodFacts, key: str) -> str:
    return _field(facts.prefix, f"metadata.annotations[{json.dumps(key)}]")


def template_of(facts: PodFacts) -> str:
    """The pod's injection template (``inject.meshfed.io/templates``), checked."""
    value = facts.annotations.get(TEMPLATES, TEMPLATE_SIDECAR).strip() or TEMPLATE_SIDECAR
    if value not in (TEMPLATE_SIDECAR, TEMPLATE_GRPC):
        raise InjectError(_annotation_field(facts, TEMPLATES),
                          f"{value!r} is not a template (known: {TEMPLATE_SIDECAR}, {TEMPLATE_GRPC})")
    return value


def _containers_of(template: str) -> tuple[str, ...]:
    return (PROXY_NAME,) if template == TEMPLATE_GRPC else OUR_CONTAINERS


def _volumes_of(template: str) -> tuple[str, ...]:
    return (TOKEN_VOLUME, RUN_VOLUME) if template == TEMPLATE_GRPC else OUR_VOLUMES


def _injected_already(facts: PodFacts, template: str) -> bool:
    ours = {name for _, name in facts.container_names if name in OUR_CONTAINERS}
    return STATUS in facts.annotations and ours == set(_containers_of(template))


def check(facts: PodFacts) -> None:
    """Refuse a pod the sidecar cannot work in; the error names the field."""
    for key in facts.annotations:
        if key.startswith(ANNOTATION_PREFIX) and key not in KNOWN_ANNOTATIONS:
            raise InjectError(_annotation_field(facts, key),
                              f"unknown meshfed annotation (known: {', '.join(sorted(KNOWN_ANNOTATIONS))})")
    inject = facts.annotations.get(INJECT)
    if inject is not None and inject not in ("true", "false"):
        raise InjectError(_annotation_field(facts, INJECT), f"{inject!r} must be \"true\" or \"false\"")
    template = template_of(facts)
    if facts.host_network:
        raise InjectError(_field(facts.prefix, "spec.hostNetwork"),
                          "a pod on the host's network cannot have its traffic captured (the rules would apply to "
                          "the node); set meshfed.io/inject: \"false\" on it")
    for field, name in facts.container_names:
        if name in OUR_CONTAINERS:
            raise InjectError(field, f"a container is already named {name!r}, which the injector adds "
                                     f"(and the pod is not marked injected: {STATUS} and "
                                     f"{' and '.join(_containers_of(template))})")
    for field, name in facts.volume_names:
        if name in OUR_VOLUMES:
            raise InjectError(field, f"a volume is already named {name!r}, which the injector adds")
    for port in facts.ports:
        if port.port in RESERVED_PORTS:
            raise InjectError(port.field, f"port {port.port} is the sidecar's (it uses "
                                          f"{', '.join(map(str, RESERVED_PORTS))} in the pod's network namespace)")
    if template == TEMPLATE_GRPC:
        ours = {e["name"] for e in GRPC_APP_ENV}
        for field, name in facts.app_env:
            if name in ours:
                raise InjectError(field, f"{name} is set by the grpc template (the agent writes the bootstrap)")
        for field, path in facts.app_mounts:
            if path.rstrip("/") == GRPC_DIR:
                raise InjectError(field, f"{GRPC_DIR} is where the grpc template mounts the agent's files")
    if facts.run_as_proxy:
        raise InjectError(facts.run_as_proxy[0], f"uid {DEFAULT_PROXY_UID} is the proxy's: a container running "
                                                 "as it would bypass traffic capture")


@dataclass(frozen=True, slots=True)
class Settings:
    """The annotations' values, checked."""

    capture_args: tuple[str, ...]
    resources: Obj


def settings(facts: PodFacts, config: InjectConfig) -> Settings:
    args = ["proxy", "capture", "--proxy-uid", str(config.proxy_uid),
            "--outbound-port", str(DEFAULT_OUTBOUND_PORT), "--inbound-port", str(DEFAULT_INBOUND_PORT)]
    for key, flag, parse in ((EXCLUDE_OUTBOUND_CIDRS, "--exclude-outbound-cidrs", "cidrs"),
                             (EXCLUDE_OUTBOUND_PORTS, "--exclude-outbound-ports", "ports"),
                             (EXCLUDE_INBOUND_PORTS, "--exclude-inbound-ports", "ports")):
        value = facts.annotations.get(key)
        if value is None or not value.strip():
            continue
        try:
            if parse == "cidrs":
                normal = ",".join(n.with_prefixlen for n in parse_cidrs(value, flag=key))
            else:
                normal = ",".join(r.spec.replace(":", "-") for r in parse_ports(value, flag=key))
        except CaptureError as exc:
            raise InjectError(_annotation_field(facts, key), str(exc).removeprefix(f"{key}: ")) from exc
        args += [flag, normal]
    requests: Obj = {"cpu": config.cpu, "memory": config.memory}
    limits: Obj = {"memory": config.memory_limit}
    if config.cpu_limit:
        limits["cpu"] = config.cpu_limit
    for key, target, name in ((PROXY_CPU, requests, "cpu"), (PROXY_MEMORY, requests, "memory"),
                              (PROXY_CPU_LIMIT, limits, "cpu"), (PROXY_MEMORY_LIMIT, limits, "memory")):
        value = facts.annotations.get(key)
        if value is None:
            continue
        if not _QUANTITY.fullmatch(value.strip()):
            raise InjectError(_annotation_field(facts, key),
                              f"{value!r} is not a Kubernetes quantity (e.g. 100m, 0.5, 128Mi, 1Gi)")
        target[name] = value.strip()
    return Settings(capture_args=tuple(args), resources={"requests": requests, "limits": limits})


def inbound_metadata(facts: PodFacts, *, protocol: str = "") -> str:
    """``MESHFED_INBOUND`` for the sidecar: each application TCP port once, ``PORT:PORT:NAME:PROTOCOL`` (in a pod
    the app listens on the port itself; ``grpc`` when the port's name says so, as Istio's naming rule)."""
    seen: dict[int, ContainerPort] = {}
    for p in facts.ports:
        seen.setdefault(p.port, p)
    out = []
    for port in sorted(seen):
        name = seen[port].name
        proto = protocol or ("grpc" if name == "grpc" or name.startswith("grpc-") else "http")
        out.append(f"{port}:{port}:{name or proto}:{proto}")
    return ",".join(out)


@dataclass(frozen=True, slots=True)
class ProbeRewrite:
    """One application probe moved to the agent: ``container``'s ``kind`` (``readinessProbe``...) at index
    ``index`` of ``spec.containers`` becomes ``probe``; ``original`` is what the agent runs (named ports resolved)."""

    index: int
    kind: str
    path: str
    probe: Obj
    original: Obj


def probe_rewrites(facts: PodFacts) -> tuple[ProbeRewrite, ...]:
    """The probes to move to the agent (httpGet and tcpSocket; exec and grpc stay: they do not cross the
    capture's inbound path, or, for grpc, kubelet's client cannot be relayed as a plain check). Named ports are
    resolved against the container's own ports; a name it does not declare is refused naming the field."""
    if facts.annotations.get(REWRITE_PROBES, "true").strip() == "false":
        return ()
    out: list[ProbeRewrite] = []
    for fact in facts.probes:
        probe, where = fact.probe, fact.field
        handler = next((h for h in ("httpGet", "tcpSocket") if h in probe), None)
        if handler is None:
            continue
        action = dict(_mapping(probe[handler], f"{where}.{handler}"))
        port = action.get("port")
        named = dict(fact.named_ports)
        if isinstance(port, str) and not port.isdigit():
            if not isinstance(named.get(port), int):
                raise InjectError(f"{where}.{handler}.port",
                                  f"{port!r} names no port of container {fact.container!r} (its ports: "
                                  f"{', '.join(sorted(named)) or 'none'})")
            port = named[port]
        try:
            number = int(port)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise InjectError(f"{where}.{handler}.port", f"{port!r} is not a port") from None
        if not 0 < number < 65536:
            raise InjectError(f"{where}.{handler}.port", f"{number} is not a port (1-65535)")
        if number in RESERVED_PORTS:
            continue  # a probe of the sidecar's own ports: nothing of the app's to relay
        action["port"] = number
        path = f"{APP_HEALTH_PREFIX}{fact.container}/{PROBE_KINDS[fact.kind]}"
        timing = {k: v for k, v in probe.items() if k not in ("httpGet", "tcpSocket")}
        out.append(ProbeRewrite(index=fact.index, kind=fact.kind, path=path,
                                probe={**timing, "httpGet": {"path": path, "port": AGENT_PORT, "scheme": "HTTP"}},
                                original={handler: action, "timeoutSeconds": probe.get("timeoutSeconds", 1)}))
    return tuple(out)


def app_probes_env(rewrites: Sequence[ProbeRewrite]) -> str:
    """``MESHFED_APP_PROBES``: agent path -> the original probe (``httpGet`` or ``tcpSocket``, ``timeoutSeconds``)."""
    return json.dumps({r.path: r.original for r in rewrites}, separators=(",", ":"), sort_keys=True)


def _env_field(name: str, path: str) -> Obj:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _security(uid: int, *, add: Sequence[str] = ()) -> Obj:
    sc: Obj = {
        "runAsUser": uid,
        "runAsGroup": uid,
        "runAsNonRoot": uid != 0,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    if add:
        sc["capabilities"] = {"add": list(add), "drop": ["ALL"]}
    return sc


def _probe(period: int, failures: int) -> Obj:
    return {"httpGet": {"path": "/healthz/ready", "port": HEALTH_PORT}, "periodSeconds": period,
            "failureThreshold": failures, "timeoutSeconds": 3}


def containers(facts: PodFacts, config: InjectConfig, s: Settings,
               rewrites: Sequence[ProbeRewrite] = ()) -> tuple[Obj, Obj]:
    """The capture init container and the native sidecar (which runs the ``rewrites``' original probes)."""
    init: Obj = {
        "name": INIT_NAME,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "args": list(s.capture_args),
        "securityContext": _security(0, add=("NET_ADMIN", "NET_RAW")),
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
        "volumeMounts": [{"name": XTABLES_VOLUME, "mountPath": "/run"}],
    }
    proxy: Obj = {
        "name": PROXY_NAME,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "restartPolicy": "Always",
        "args": ["proxy", "run"],
        "env": [
            _env_field("POD_NAME", "metadata.name"),
            _env_field("POD_NAMESPACE", "metadata.namespace"),
            _env_field("POD_IP", "status.podIP"),
            _env_field("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            _env_field("NODE_NAME", "spec.nodeName"),
            {"name": "MESHFED_CLUSTER", "value": config.cluster},
            {"name": "MESHFED_XDS_ADDRESS", "value": config.xds_address},
            {"name": "MESHFED_XDS_TOKEN_FILE", "value": TOKEN_FILE},
            {"name": "MESHFED_RUN_DIR", "value": RUN_DIR},
            {"name": "MESHFED_CAPTURE", "value": "redirect"},
            {"name": "MESHFED_OUTBOUND_PORT", "value": str(DEFAULT_OUTBOUND_PORT)},
            {"name": "MESHFED_INBOUND_CAPTURE_PORT", "value": str(DEFAULT_INBOUND_PORT)},
            {"name": "MESHFED_CAPTURE_BIND", "value": "0.0.0.0"},
            {"name": "MESHFED_INBOUND", "value": inbound_metadata(facts)},
            *([{"name": APP_PROBES_ENV, "value": app_probes_env(rewrites)}] if rewrites else []),
        ],
        "ports": [
            {"name": "mf-health", "containerPort": HEALTH_PORT, "protocol": "TCP"},
            {"name": "http-envoy-prom", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        # The startup probe holds the application's containers until Envoy has its configuration (native
        # sidecars start in order, each after the previous one is started).
        "startupProbe": _probe(1, 600),
        "readinessProbe": _probe(5, 3),
        "resources": s.resources,
        "securityContext": _security(config.proxy_uid),
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": RUN_VOLUME, "mountPath": RUN_DIR},
        ],
    }
    return init, proxy


def grpc_agent(facts: PodFacts, config: InjectConfig, s: Settings) -> Obj:
    """The proxyless template's one container: ``meshfed proxy run --grpc`` as a native sidecar, which writes
    ``GRPC_XDS_BOOTSTRAP`` and the workload certificates into the shared run volume (no Envoy, no capture)."""
    if not config.xds_mtls_address:
        raise InjectError(_annotation_field(facts, TEMPLATES),
                          "the control plane serves no mutual-TLS ADS address (xds_mtls_address), which "
                          "proxyless gRPC needs")
    agent: Obj = {
        "name": PROXY_NAME,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "restartPolicy": "Always",
        "args": ["proxy", "run", "--grpc"],
        "env": [
            _env_field("POD_NAME", "metadata.name"),
            _env_field("POD_NAMESPACE", "metadata.namespace"),
            _env_field("POD_IP", "status.podIP"),
            _env_field("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            {"name": "MESHFED_CLUSTER", "value": config.cluster},
            {"name": "MESHFED_XDS_ADDRESS", "value": config.xds_address},
            {"name": "MESHFED_XDS_MTLS_ADDRESS", "value": config.xds_mtls_address},
            {"name": "MESHFED_XDS_TOKEN_FILE", "value": TOKEN_FILE},
            {"name": "MESHFED_RUN_DIR", "value": RUN_DIR},
            {"name": "MESHFED_CAPTURE", "value": "none"},
            {"name": "MESHFED_INBOUND", "value": inbound_metadata(facts, protocol="grpc")},
        ],
        "ports": [{"name": "mf-health", "containerPort": HEALTH_PORT, "protocol": "TCP"}],
        # Ready once the bootstrap and the first certificates are written: the app starts after that.
        "startupProbe": _probe(1, 600),
        "readinessProbe": _probe(5, 3),
        "resources": {"requests": {"cpu": "10m", "memory": "48Mi"}, "limits": s.resources["limits"]},
        "securityContext": _security(config.proxy_uid),
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": RUN_VOLUME, "mountPath": RUN_DIR},
        ],
    }
    return agent


GRPC_APP_ENV: tuple[Obj, ...] = (
    {"name": "GRPC_XDS_BOOTSTRAP", "value": GRPC_BOOTSTRAP},
    {"name": "GRPC_EXPERIMENTAL_XDS_SNI", "value": "true"},
)
GRPC_APP_MOUNT: Obj = {"name": RUN_VOLUME, "mountPath": GRPC_DIR, "subPath": "grpc", "readOnly": True}


def volumes(config: InjectConfig, template: str = TEMPLATE_SIDECAR) -> list[Obj]:
    return [v for v in _all_volumes(config) if v["name"] in _volumes_of(template)]


def _all_volumes(config: InjectConfig) -> list[Obj]:
    return [
        {"name": TOKEN_VOLUME, "projected": {"defaultMode": 0o440, "sources": [{"serviceAccountToken": {
            "audience": config.audience, "expirationSeconds": TOKEN_SECONDS, "path": "token"}}]}},
        {"name": RUN_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
        {"name": XTABLES_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
    ]


def _pointer(*parts: str) -> str:
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


def inject(pod: Any, config: InjectConfig, *, prefix: str = "") -> Outcome:
    """Inject ``pod`` (a Pod or a pod template, as decoded JSON), or say why not. ``prefix`` only changes the
    field paths in messages. Raises :class:`InjectError` for a pod the sidecar cannot work in."""
    facts = read_pod(pod, prefix=prefix)
    if facts.annotations.get(INJECT) == "false":
        return Skipped(f"{INJECT} is \"false\"")
    if facts.labels.get(PART_OF_LABEL) == "meshfed":
        return Skipped(f"one of meshfed's own pods ({PART_OF_LABEL}: meshfed), which are never injected")
    template = template_of(facts)
    if _injected_already(facts, template):
        return Skipped(f"already injected ({STATUS} and containers {', '.join(_containers_of(template))} present)")
    check(facts)
    s = settings(facts, config)
    # Proxyless gRPC pods have no capture: kubelet's probes reach the app as they are.
    rewrites = () if template == TEMPLATE_GRPC else probe_rewrites(facts)
    added = ([grpc_agent(facts, config, s)] if template == TEMPLATE_GRPC
             else list(containers(facts, config, s, rewrites)))
    vols = volumes(config, template)
    status = json.dumps({"version": STATUS_VERSION, "template": template,
                         "initContainers": list(_containers_of(template)),
                         "volumes": list(_volumes_of(template)),
                         **({"probes": [r.path for r in rewrites]} if rewrites else {})}, separators=(",", ":"))
    out: Obj = copy.deepcopy(dict(pod))
    ops: list[PatchOp] = []

    meta = out.get("metadata")
    if not isinstance(meta, dict):
        ops.append({"op": "add", "path": "/metadata", "value": {"annotations": {STATUS: status}}})
        out["metadata"] = {"annotations": {STATUS: status}}
    elif not isinstance(meta.get("annotations"), dict):
        ops.append({"op": "add", "path": "/metadata/annotations", "value": {STATUS: status}})
        meta["annotations"] = {STATUS: status}
    else:
        ops.append({"op": "add", "path": _pointer("metadata", "annotations", STATUS), "value": status})
        meta["annotations"][STATUS] = status

    spec: Obj = out["spec"]
    if spec.get("initContainers"):
        for i, c in enumerate(added):
            ops.append({"op": "add", "path": f"/spec/initContainers/{i}", "value": c})
        spec["initContainers"][0:0] = copy.deepcopy(added)
    else:
        ops.append({"op": "add", "path": "/spec/initContainers", "value": added})
        spec["initContainers"] = copy.deepcopy(added)

    if template == TEMPLATE_GRPC:  # the app reads the bootstrap and certificates from the shared volume
        for i, c in enumerate(spec["containers"]):
            for key, values in (("env", list(GRPC_APP_ENV)), ("volumeMounts", [GRPC_APP_MOUNT])):
                if c.get(key):
                    for v in values:
                        ops.append({"op": "add", "path": f"/spec/containers/{i}/{key}/-", "value": v})
                    c[key].extend(copy.deepcopy(values))
                else:
                    ops.append({"op": "add", "path": f"/spec/containers/{i}/{key}", "value": values})
                    c[key] = copy.deepcopy(values)

    for r in rewrites:
        ops.append({"op": "replace", "path": f"/spec/containers/{r.index}/{r.kind}", "value": r.probe})
        spec["containers"][r.index][r.kind] = copy.deepcopy(r.probe)

    if spec.get("volumes"):
        for v in vols:
            ops.append({"op": "add", "path": "/spec/volumes/-", "value": v})
        spec["volumes"].extend(copy.deepcopy(vols))
    else:
        ops.append({"op": "add", "path": "/spec/volumes", "value": vols})
        spec["volumes"] = copy.deepcopy(vols)

    # The projected token is readable by the pod's fsGroup (mode 0440); every container's processes have that
    # group, the proxy's too. Without an fsGroup only root could read it.
    if not facts.has_fs_group:
        if isinstance(spec.get("securityContext"), dict):
            ops.append({"op": "add", "path": "/spec/securityContext/fsGroup", "value": config.proxy_uid})
            spec["securityContext"]["fsGroup"] = config.proxy_uid
        else:
            ops.append({"op": "add", "path": "/spec/securityContext", "value": {"fsGroup": config.proxy_uid}})
            spec["securityContext"] = {"fsGroup": config.proxy_uid}
    return Injected(patch=tuple(copy.deepcopy(ops)), pod=out)


# --------------------------------------------------------------------------------------------- whole objects

TEMPLATE_PATHS: Mapping[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}
"""Where each workload kind holds its pod (template); other kinds pass through unchanged."""


@dataclass(frozen=True, slots=True)
class ObjectOutcome:
    """One object after injection: ``obj`` (a new object, or a copy of the input when nothing changed) and, per
    pod (template) in it, what happened (``"injected"``, ``"items[1]: not injected: ..."``)."""

    obj: Obj
    notes: tuple[str, ...]


def inject_object(obj: Any, config: InjectConfig, *, prefix: str = "") -> ObjectOutcome:
    """Inject every pod (template) in ``obj``: a workload, or a ``List`` of them (``items``). ``prefix`` goes
    before field paths in errors (``items[2].``)."""
    if not isinstance(obj, Mapping):
        raise InjectError(prefix.rstrip(".") or "document", f"must be an object, not {type(obj).__name__}")
    kind = obj.get("kind")
    if not isinstance(kind, str) or not kind:
        raise InjectError(f"{prefix}kind", "is missing")
    if kind == "List" or (kind.endswith("List") and "items" in obj):
        items = _list(obj.get("items"), f"{prefix}items")
        outs = [inject_object(item, config, prefix=f"{prefix}items[{i}].") for i, item in enumerate(items)]
        return ObjectOutcome({**obj, "items": [o.obj for o in outs]},
                             tuple(f"items[{i}]: {n}" for i, o in enumerate(outs) for n in o.notes))
    path = TEMPLATE_PATHS.get(kind)
    if path is None:
        return ObjectOutcome(dict(obj), ())
    holder: Any = obj
    for i, key in enumerate(path):
        holder = _mapping(holder, prefix + ".".join(path[:i]) if i else prefix.rstrip(".") or "document")
        if key not in holder:
            raise InjectError(prefix + ".".join(path[: i + 1]), "is missing")
        holder = holder[key]
    where = prefix + "".join(f"{k}." for k in path)
    outcome = inject(holder, config, prefix=where)
    if isinstance(outcome, Skipped):
        return ObjectOutcome(dict(obj), (f"not injected: {outcome.reason}",))
    new: Obj = copy.deepcopy(dict(obj))
    if not path:
        return ObjectOutcome(outcome.pod, ("injected",))
    target = new
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = outcome.pod
    return ObjectOutcome(new, ("injected",))
