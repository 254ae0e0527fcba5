"""The sidecar agent's pure part (``meshfed proxy run``): the pod's environment in, the Envoy bootstrap out.

The injected sidecar container (``meshfed.inject``) gets its identity from the downward API and its settings as
environment variables; :func:`agent_env` reads them into an :class:`AgentEnv` (an error names the variable),
:func:`proxy_info` turns that into the node ``ProxyInfo`` (through ``ProxyInfo.from_node``, the control plane's
own reader of node metadata, so the two cannot disagree) and :func:`bootstrap` renders Envoy's bootstrap: ADS to
``MESHFED_XDS_ADDRESS`` with the projected token as the stream's bearer token, admin on loopback, and the health
listener kubelet probes (``/healthz/ready`` on :15021, answered from Envoy's ``/ready``) and Prometheus's
(``/stats/prometheus`` on :15090). The process side (files, Envoy,
signals) is ``meshfed.cmd_proxy``.

Exception tree (this module)::

    AgentError (ValueError)   an environment variable that is missing or unusable (names it)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from discovery.addresses import HostPort, InvalidAddress, parse_hostport
from gateway.bootstrap import (
    BootstrapError,
    add_admin_listener,
    add_health_listener,
    render_bootstrap,
    render_grpc_bootstrap,
)
from gateway.context import (
    META_CAPTURE,
    META_CAPTURE_BIND,
    META_CLUSTER,
    META_INBOUND,
    META_INBOUND_CAPTURE_PORT,
    META_IP,
    META_KIND,
    META_NAMESPACE,
    META_OUTBOUND_PORT,
    META_SERVICE_ACCOUNT,
    META_SERVICES,
    ProxyInfo,
    ProxyInfoError,
    ProxyKind,
)
from meshfed.appprobe import AppProbe, AppProbeError, parse_app_probes
from meshfed.inject import AGENT_PORT, ENVOY_ADMIN_PORT, HEALTH_PORT, METRICS_PORT


class AgentError(ValueError):
    """The environment does not describe a sidecar; the message names the variable."""


@dataclass(frozen=True, slots=True)
class AgentEnv:
    """What ``meshfed proxy run`` is told by its environment (docs/injection.md, the sidecar's environment)."""

    pod_name: str
    namespace: str
    pod_ip: str
    service_account: str
    cluster: str
    xds: HostPort
    token_file: str
    run_dir: str
    capture: str = "redirect"
    outbound_port: int = 15001
    inbound_capture_port: int = 15006
    capture_bind: str = "0.0.0.0"
    inbound: str = ""
    admin_port: int = ENVOY_ADMIN_PORT
    admin_address: str = "127.0.0.1"
    health_port: int = HEALTH_PORT
    metrics_port: int = METRICS_PORT
    services: str = ""
    """``MESHFED_SERVICES``: the services the pod backs (``name.namespace``, comma-separated), when known."""
    cluster_domain: str = "cluster.local"
    xds_mtls: HostPort | None = None
    """``MESHFED_XDS_MTLS_ADDRESS``: the control plane's mutual-TLS ADS port (proxyless gRPC, ``--grpc``)."""
    app_probes: tuple[tuple[str, AppProbe], ...] = ()
    """``MESHFED_APP_PROBES``: the application probes injection moved to the agent (``meshfed.appprobe``)."""
    agent_port: int = AGENT_PORT
    """``MESHFED_AGENT_PORT``: where the agent answers them (15020)."""

    @property
    def node_id(self) -> str:
        """Istio's sidecar node id shape: ``sidecar~IP~POD.NAMESPACE~NAMESPACE.svc.DOMAIN``."""
        return f"sidecar~{self.pod_ip}~{self.pod_name}.{self.namespace}~{self.namespace}.svc.{self.cluster_domain}"


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise AgentError(f"{name}={text!r} is not a number") from None


def agent_env(env: Mapping[str, str]) -> AgentEnv:
    """Read the sidecar's environment; a missing or bad variable is an :class:`AgentError` naming it."""

    def need(name: str) -> str:
        value = env.get(name, "").strip()
        if not value:
            raise AgentError(f"{name} is not set (the injected sidecar gets it from the pod spec; "
                             "see docs/injection.md)")
        return value

    address = need("MESHFED_XDS_ADDRESS")
    try:
        xds = parse_hostport(address, min_port=1)
    except InvalidAddress as exc:
        raise AgentError(f"MESHFED_XDS_ADDRESS: {exc}") from None
    mtls_text = env.get("MESHFED_XDS_MTLS_ADDRESS", "").strip()
    try:
        xds_mtls = parse_hostport(mtls_text, min_port=1) if mtls_text else None
    except InvalidAddress as exc:
        raise AgentError(f"MESHFED_XDS_MTLS_ADDRESS: {exc}") from None
    try:
        probes = parse_app_probes(env.get("MESHFED_APP_PROBES", ""))
    except AppProbeError as exc:
        raise AgentError(str(exc)) from None
    return AgentEnv(
        app_probes=tuple(sorted(probes.items())),
        agent_port=_int(env, "MESHFED_AGENT_PORT", AGENT_PORT),
        pod_name=need("POD_NAME"),
        namespace=need("POD_NAMESPACE"),
        pod_ip=need("POD_IP"),
        service_account=env.get("SERVICE_ACCOUNT", "").strip() or "default",
        cluster=need("MESHFED_CLUSTER"),
        xds=xds,
        token_file=need("MESHFED_XDS_TOKEN_FILE"),
        run_dir=need("MESHFED_RUN_DIR"),
        capture=env.get("MESHFED_CAPTURE", "redirect").strip() or "redirect",
        outbound_port=_int(env, "MESHFED_OUTBOUND_PORT", 15001),
        inbound_capture_port=_int(env, "MESHFED_INBOUND_CAPTURE_PORT", 15006),
        capture_bind=env.get("MESHFED_CAPTURE_BIND", "0.0.0.0").strip() or "0.0.0.0",
        inbound=env.get("MESHFED_INBOUND", "").strip(),
        admin_port=_int(env, "MESHFED_ADMIN_PORT", ENVOY_ADMIN_PORT),
        admin_address=env.get("MESHFED_ADMIN_ADDRESS", "").strip() or "127.0.0.1",
        health_port=_int(env, "MESHFED_HEALTH_PORT", HEALTH_PORT),
        metrics_port=_int(env, "MESHFED_METRICS_PORT", METRICS_PORT),
        services=env.get("MESHFED_SERVICES", "").strip(),
        cluster_domain=env.get("MESHFED_CLUSTER_DOMAIN", "").strip() or "cluster.local",
        xds_mtls=xds_mtls,
    )


def proxy_info(agent: AgentEnv) -> ProxyInfo:
    """The node this sidecar presents, read back the way the control plane reads it."""
    metadata = {
        META_KIND: str(ProxyKind.SIDECAR),
        META_CLUSTER: agent.cluster,
        META_NAMESPACE: agent.namespace,
        META_SERVICE_ACCOUNT: agent.service_account,
        META_INBOUND: agent.inbound,
        META_SERVICES: agent.services,
        META_OUTBOUND_PORT: str(agent.outbound_port),
        META_IP: agent.pod_ip,
        META_CAPTURE: agent.capture,
        META_INBOUND_CAPTURE_PORT: str(agent.inbound_capture_port),
        META_CAPTURE_BIND: agent.capture_bind,
    }
    try:
        return ProxyInfo.from_node(agent.node_id, metadata)
    except ProxyInfoError as exc:
        raise AgentError(f"the sidecar's environment does not describe a proxy: {exc}") from exc


def sidecar_env(proxy: ProxyInfo, *, pod: str, xds: str, token_file: str, run_dir: str, admin_port: int,
                admin_address: str = "127.0.0.1") -> dict[str, str]:
    """The environment that makes :func:`agent_env` and :func:`proxy_info` give back ``proxy``: what the injected
    pod spec sets (``meshfed.inject``), for a sidecar started by hand (the local netns bed)."""
    meta = proxy.metadata()
    env = {
        "POD_NAME": pod,
        "POD_NAMESPACE": str(proxy.namespace),
        "POD_IP": proxy.ip,
        "SERVICE_ACCOUNT": proxy.service_account,
        "MESHFED_CLUSTER": str(proxy.cluster),
        "MESHFED_XDS_ADDRESS": xds,
        "MESHFED_XDS_TOKEN_FILE": token_file,
        "MESHFED_RUN_DIR": run_dir,
        "MESHFED_OUTBOUND_PORT": meta[META_OUTBOUND_PORT],
        "MESHFED_INBOUND": meta[META_INBOUND],
        "MESHFED_SERVICES": meta[META_SERVICES],
        "MESHFED_ADMIN_PORT": str(admin_port),
        "MESHFED_ADMIN_ADDRESS": admin_address,
        "MESHFED_CAPTURE": meta.get(META_CAPTURE, "none"),
    }
    if proxy.captured:
        env["MESHFED_INBOUND_CAPTURE_PORT"] = meta[META_INBOUND_CAPTURE_PORT]
        env["MESHFED_CAPTURE_BIND"] = meta[META_CAPTURE_BIND]
    return env


def bootstrap(agent: AgentEnv, token: str) -> dict[str, Any]:
    """Envoy's bootstrap for this sidecar, authenticating its ADS stream with ``token``."""
    token = token.strip()
    try:
        out = render_bootstrap(proxy_info(agent), xds_host=agent.xds.host, xds_port=agent.xds.port,
                               admin_port=agent.admin_port, token=token, delta=True)
        out["admin"]["address"]["socket_address"]["address"] = agent.admin_address
        add_health_listener(out, port=agent.health_port, admin_port=agent.admin_port)
        return add_admin_listener(out, name="prometheus", port=agent.metrics_port, admin_port=agent.admin_port,
                                  routes={"/stats/prometheus": "/stats/prometheus"})
    except BootstrapError as exc:
        raise AgentError(f"cannot render the Envoy bootstrap: {exc} (token file {agent.token_file})") from exc


# --------------------------------------------------------------------------------------------- proxyless gRPC

def grpc_node_id(agent: AgentEnv, kind: str = "grpc") -> str:
    """The application's node (``grpc~...``, in ``GRPC_XDS_BOOTSTRAP``); the agent's own SDS stream is the
    ``proxyless~...`` node of the same pod, so the two streams never share a node (each fixes its own)."""
    return f"{kind}~{agent.pod_ip}~{agent.pod_name}.{agent.namespace}~{agent.namespace}.svc.{agent.cluster_domain}"


def agent_node_id(agent: AgentEnv) -> str:
    return grpc_node_id(agent, "proxyless")


def grpc_proxy_info(agent: AgentEnv, *, node_id: str | None = None) -> ProxyInfo:
    """The proxyless node the application presents (its ``MESHFED_INBOUND`` ports are the ones it serves)."""
    metadata = {
        META_KIND: str(ProxyKind.GRPC),
        META_CLUSTER: agent.cluster,
        META_NAMESPACE: agent.namespace,
        META_SERVICE_ACCOUNT: agent.service_account,
        META_INBOUND: agent.inbound,
        META_SERVICES: agent.services,
        META_IP: agent.pod_ip,
    }
    try:
        return ProxyInfo.from_node(node_id or grpc_node_id(agent), metadata)
    except ProxyInfoError as exc:
        raise AgentError(f"the agent's environment does not describe a proxyless gRPC node: {exc}") from exc


def grpc_bootstrap(agent: AgentEnv, *, cert_file: str, key_file: str, ca_file: str,
                   refresh_s: int = 5) -> dict[str, Any]:
    """``GRPC_XDS_BOOTSTRAP`` for the pod's application: ADS over mutual TLS to ``MESHFED_XDS_MTLS_ADDRESS`` with
    the workload certificate (gRPC's bootstrap cannot send the token: no call credentials on its xDS channel),
    and the ``default`` ``file_watcher`` certificate provider re-reading the same files every ``refresh_s``."""
    if agent.xds_mtls is None:
        raise AgentError("MESHFED_XDS_MTLS_ADDRESS is not set (proxyless gRPC reaches the control plane over "
                         "mutual TLS; see docs/injection.md)")
    try:
        return render_grpc_bootstrap(grpc_proxy_info(agent), xds_host=agent.xds_mtls.host,
                                     xds_port=agent.xds_mtls.port, cert_file=cert_file, key_file=key_file,
                                     ca_file=ca_file, refresh_s=refresh_s, xds_tls=True)
    except BootstrapError as exc:
        raise AgentError(f"cannot render the gRPC bootstrap: {exc}") from exc
