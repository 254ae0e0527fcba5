"""``meshfed proxy run``, the sidecar agent: its environment read (errors name the variable), its bootstrap
accepted by Envoy (``--mode validate``), and the real thing: the agent started with an injected sidecar's
environment against a real control plane, Envoy ready on the health port with the capture-mode listeners from
ADS (authenticated with the token file), restarted with a refreshed token, and stopped by SIGTERM with the agent."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from discovery.clusterset import load_clusterset
from discovery.model import ServiceKey, cluster_id, namespace
from gateway.context import CaptureMode, InboundPort, ProxyInfo, ProxyKind
from gateway.envoy import validate
from meshfed.agent import AgentError, agent_env, bootstrap, proxy_info, sidecar_env
from meshfed.controlplane import ControlPlane, ControlPlaneConfig, Listen
from meshfed.inject import InjectConfig, Injected, inject
from meshfed.local import free_port, http_get, write_private
from tests.support.procs import port_open, wait_for

DEMO = Path(__file__).resolve().parents[2] / "clusters" / "demo"
NODE = "sidecar~127.0.0.1~sleep-0.default~default.svc.cluster.local"


def injected_env(tmp_path: Path, xds: str) -> dict[str, str]:
    """The sidecar's environment as the injector writes it, with the downward API's values filled in."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sleep-0"},
           "spec": {"containers": [{"name": "app", "image": "sleep", "ports": [{"containerPort": 9080}]}]}}
    out = inject(pod, InjectConfig(cluster="east", image="x", xds_address=xds))
    assert isinstance(out, Injected)
    sidecar = out.pod["spec"]["initContainers"][1]
    downward = {"metadata.name": "sleep-0", "metadata.namespace": "default", "status.podIP": "127.0.0.1",
                "spec.serviceAccountName": "sleep", "spec.nodeName": "node-1"}
    env = {e["name"]: e["value"] if "value" in e else downward[e["valueFrom"]["fieldRef"]["fieldPath"]]
           for e in sidecar["env"]}
    env["MESHFED_XDS_TOKEN_FILE"] = str(tmp_path / "token")
    env["MESHFED_RUN_DIR"] = str(tmp_path / "run")
    return env


def test_environment_errors_name_the_variable(tmp_path: Path) -> None:
    env = injected_env(tmp_path, "meshfed-controlplane.meshfed-system.svc:15010")
    for name in ("POD_NAME", "POD_IP", "MESHFED_CLUSTER", "MESHFED_XDS_ADDRESS"):
        with pytest.raises(AgentError, match=name):
            agent_env({k: v for k, v in env.items() if k != name})
    with pytest.raises(AgentError, match="MESHFED_XDS_ADDRESS"):
        agent_env({**env, "MESHFED_XDS_ADDRESS": "controlplane"})
    with pytest.raises(AgentError, match="MESHFED_OUTBOUND_PORT"):
        agent_env({**env, "MESHFED_OUTBOUND_PORT": "x"})
    with pytest.raises(AgentError, match="MESHFED_INBOUND"):
        proxy_info(agent_env({**env, "MESHFED_INBOUND": "nope"}))


def test_bootstrap_from_the_injected_environment_is_accepted_by_envoy(tmp_path: Path) -> None:
    agent = agent_env(injected_env(tmp_path, "meshfed-controlplane.meshfed-system.svc:15010"))
    info = proxy_info(agent)
    assert info.node_id == NODE and info.captured and info.service_account == "sleep"
    assert [(p.port, p.app_port) for p in info.inbound] == [(9080, 9080)]
    boot = bootstrap(agent, "tok-123\n")
    meta = boot["node"]["metadata"]
    assert meta["MESHFED_CAPTURE"] == "redirect" and meta["CLUSTER_ID"] == "east" and meta["NAMESPACE"] == "default"
    assert boot["dynamic_resources"]["ads_config"]["grpc_services"][0]["initial_metadata"] == [
        {"key": "authorization", "value": "Bearer tok-123"}]
    assert boot["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 15000}
    listeners = {x["name"]: x for x in boot["static_resources"]["listeners"]}
    assert listeners["health"]["address"]["socket_address"]["port_value"] == 15021
    assert listeners["prometheus"]["address"]["socket_address"]["port_value"] == 15090
    assert [c["name"] for c in boot["static_resources"]["clusters"]].count("envoy-admin") == 1
    path = tmp_path / "b.json"
    path.write_text(json.dumps(boot))
    validate(path)


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


async def start_agent(tmp_path: Path, xds_port: int, *, probes: str = "", probe_port: int = 0
                      ) -> tuple[subprocess.Popen[bytes], int, int, int]:
    """``meshfed proxy run`` with the injector's environment (ports moved to free ones on loopback); ``probes``:
    its ``MESHFED_APP_PROBES``, answered on ``probe_port``."""
    env = injected_env(tmp_path, f"127.0.0.1:{xds_port}")
    (tmp_path / "run").mkdir()
    admin, health, metrics = free_port(), free_port(), free_port()
    env.update(MESHFED_ADMIN_PORT=str(admin), MESHFED_HEALTH_PORT=str(health), MESHFED_METRICS_PORT=str(metrics),
               MESHFED_OUTBOUND_PORT=str(free_port()), MESHFED_INBOUND_CAPTURE_PORT=str(free_port()),
               MESHFED_CAPTURE_BIND="127.0.0.1", MESHFED_APP_PROBES=probes,
               MESHFED_AGENT_PORT=str(probe_port or free_port()))
    agent = await asyncio.to_thread(
        subprocess.Popen,
        [sys.executable, "-m", "meshfed", "proxy", "run", "--proxy-uid", str(os.getuid()), "--token-poll", "0.2"],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return agent, admin, health, metrics


def agent_ready(agent: subprocess.Popen[bytes], health: int) -> bool:
    assert agent.poll() is None, agent.stdout.read().decode() if agent.stdout else ""
    try:
        return http_get(f"http://127.0.0.1:{health}/healthz/ready")[0] == 200
    except OSError:
        return False


def stop(agent: subprocess.Popen[bytes]) -> None:
    if agent.poll() is None:
        agent.kill()
        agent.wait()


def _gone(pid: int) -> bool:
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


async def test_proxy_run_against_a_real_control_plane(east_ca: Path, tmp_path: Path) -> None:
    identity = {"namespace": "default", "service_account": "sleep", "cluster": "east", "node_id": NODE}
    tokens = tmp_path / "tokens.json"
    write_private(tokens, json.dumps({"a" * 24: identity, "b" * 24: identity}))
    config = ControlPlaneConfig(
        clusterset=load_clusterset(DEMO), cluster=cluster_id("east"), ca_dir=east_ca, federation_urls=(),
        xds=Listen("127.0.0.1", 0), dns=Listen("127.0.0.1", 0), admin=Listen("127.0.0.1", 0),
        gateway_host="127.0.0.1", gateway_port=15443, tokens_file=tokens)
    async with ControlPlane(config) as cp:
        assert cp.ads is not None
        (tmp_path / "token").write_text("a" * 24)
        probe_port = free_port()
        # kubelet's probes of the app as injection moved them: the control plane's admin port stands in for the
        # app (open), a free port for one that is down.
        probes = json.dumps({"/app-health/app/livez": {"tcpSocket": {"port": cp.admin_port}},
                             "/app-health/app/readyz": {"httpGet": {"path": "/readyz", "port": cp.admin_port}},
                             "/app-health/down/livez": {"tcpSocket": {"port": free_port()}}})
        agent, admin, health, metrics = await start_agent(tmp_path, cp.ads.port, probes=probes,
                                                          probe_port=probe_port)
        try:
            def ready() -> bool:
                return agent_ready(agent, health)

            await asyncio.to_thread(wait_for, ready, timeout=60, what="the sidecar's readiness")
            for path, want in (("/app-health/app/livez", 200), ("/app-health/app/readyz", 200),
                               ("/app-health/down/livez", 503), ("/app-health/nope/livez", 404)):
                got = (await asyncio.to_thread(http_get, f"http://127.0.0.1:{probe_port}{path}"))[0]
                assert got == want, (path, got)
            status, listeners = await asyncio.to_thread(http_get, f"http://127.0.0.1:{admin}/listeners")
            assert status == 200 and "virtualOutbound" in listeners and "virtualInbound" in listeners
            status, prom = await asyncio.to_thread(http_get, f"http://127.0.0.1:{metrics}/stats/prometheus")
            assert status == 200 and "envoy_server_live" in prom
            status, _ = await asyncio.to_thread(http_get, f"http://127.0.0.1:{metrics}/config_dump")
            assert status == 404  # only the Prometheus path is served there, never the rest of admin
            assert (tmp_path / "run" / "envoy-bootstrap.json").stat().st_mode & 0o077 == 0
            [first] = _children(agent.pid)

            # A refreshed token restarts Envoy with it (the ADS stream presents the token only when it opens).
            (tmp_path / "token").write_text("b" * 24)
            await asyncio.to_thread(wait_for, lambda: _children(agent.pid) not in ([], [first]), timeout=60,
                                    what="a new envoy")
            await asyncio.to_thread(wait_for, ready, timeout=60, what="readiness after the restart")
            boot = json.loads((tmp_path / "run" / "envoy-bootstrap.json").read_text())
            assert boot["dynamic_resources"]["ads_config"]["grpc_services"][0]["initial_metadata"][0][
                "value"] == "Bearer " + "b" * 24
            [second] = _children(agent.pid)

            agent.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(agent.wait, 30) == 0
            assert await asyncio.to_thread(_gone, second)
            assert not port_open("127.0.0.1", admin)
        finally:
            await asyncio.to_thread(stop, agent)


async def test_proxy_run_with_a_projected_token_checked_by_tokenreview(east_ca: Path, tmp_path: Path) -> None:
    """The production authentication: the control plane on the Kubernetes API (the test double) checks the
    agent's token with TokenReview, for meshfed's audience and bound to the pod the node id names."""
    from tests.support.kubeapi import KubeApiDouble

    with KubeApiDouble() as api:
        for path in sorted((DEMO / "east").glob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if doc:
                    api.put_object(doc)
        api.register_token("c" * 24, namespace="default", service_account="sleep", audiences=["meshfed"],
                           pod="sleep-0")
        config = ControlPlaneConfig(
            clusterset=load_clusterset(DEMO), cluster=cluster_id("east"), ca_dir=east_ca, federation_urls=(),
            xds=Listen("127.0.0.1", 0), dns=Listen("127.0.0.1", 0), admin=Listen("127.0.0.1", 0),
            gateway_host="127.0.0.1", gateway_port=15443, source="kubernetes",
            kubeconfig=api.write_kubeconfig(tmp_path / "kubeconfig"), xds_auth="tokenreview",
            token_audience="meshfed")
        async with ControlPlane(config) as cp:
            assert cp.ads is not None
            (tmp_path / "token").write_text("c" * 24 + "\n")
            agent, admin, health, _ = await start_agent(tmp_path, cp.ads.port)
            try:
                await asyncio.to_thread(wait_for, lambda: agent_ready(agent, health), timeout=60,
                                        what="the sidecar's readiness")
                status, listeners = await asyncio.to_thread(http_get, f"http://127.0.0.1:{admin}/listeners")
                assert status == 200 and "virtualOutbound" in listeners
                assert any("tokenreviews" in path for _, path in api.requests)
            finally:
                await asyncio.to_thread(stop, agent)


def test_sidecar_env_gives_back_the_proxy() -> None:
    """What the local netns bed starts its sidecars with: the environment that reads back as the same node."""
    proxy = ProxyInfo(kind=ProxyKind.SIDECAR, cluster=cluster_id("east"),
                      node_id="sidecar~10.1.2.3~reviews-v1.default~default.svc.cluster.local",
                      namespace=namespace("default"), service_account="reviews",
                      services=(ServiceKey.parse("reviews.default"),), inbound=(InboundPort(9080, 9080, "http"),),
                      ip="10.1.2.3", capture=CaptureMode.REDIRECT)
    env = sidecar_env(proxy, pod="reviews-v1", xds="10.0.0.1:15010", token_file="/t", run_dir="/r",
                      admin_port=15000, admin_address="0.0.0.0")
    agent = agent_env(env)
    assert proxy_info(agent) == proxy
    assert bootstrap(agent, "tok")["admin"]["address"]["socket_address"] == {"address": "0.0.0.0",
                                                                              "port_value": 15000}
