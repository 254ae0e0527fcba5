"""``meshfed proxy run --grpc``, the proxyless template's agent, against a real control plane: two injected pods'
agents (a gRPC xDS server and a client) fetch their certificates over SDS with their tokens and write
``GRPC_XDS_BOOTSTRAP``; the client calls the server through gRPC's own xDS client (ADS over mutual TLS with those
files), and calls again on fresh connections after both pods' first certificates have expired: the control plane
re-issued them (short TTL), the agents rewrote the files and gRPC's ``file_watcher`` reloaded them."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from discovery.clusterset import load_clusterset
from discovery.model import cluster_id
from meshfed.controlplane import ControlPlane, ControlPlaneConfig, Listen
from meshfed.inject import GRPC_BOOTSTRAP, PROXY_NAME, TEMPLATES, InjectConfig, Injected, inject
from meshfed.local import free_port, http_get, write_private
from tests.support.procs import wait_for

DEMO = Path(__file__).resolve().parents[2] / "clusters" / "demo"
TTL = timedelta(seconds=12)

ECHO = """apiVersion: v1
kind: Service
metadata: {{name: echo-grpc, namespace: default, labels: {{app: echo-grpc}}}}
spec:
  selector: {{app: echo-grpc}}
  ports: [{{name: grpc, port: {port}, targetPort: {port}, protocol: TCP, appProtocol: grpc}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: echo-grpc-east-1, namespace: default, labels: {{kubernetes.io/service-name: echo-grpc}}}}
addressType: IPv4
ports: [{{name: grpc, port: {port}, protocol: TCP, appProtocol: grpc}}]
endpoints:
  - addresses: ["127.0.0.1"]
    conditions: {{ready: true, serving: true, terminating: false}}
    targetRef: {{kind: Pod, name: echo-grpc-0, namespace: default}}
---
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata: {{name: echo-grpc, namespace: default, creationTimestamp: "2026-01-04T00:00:00Z"}}
"""

CLIENT = """
import json, sys
import grpc, grpc.experimental
from meshfed.demogrpc import METHOD
creds = grpc.xds_channel_credentials(grpc.experimental.insecure_channel_credentials())
for line in sys.stdin:  # one call per line, each on a new channel and connection (a fresh TLS handshake)
    try:
        with grpc.secure_channel(sys.argv[1], creds, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            reply = ch.unary_unary(METHOD)(line.strip().encode(), timeout=30, wait_for_ready=True)
        print(reply.decode(), flush=True)
    except grpc.RpcError as exc:
        print(json.dumps({"error": f"{exc.code().name}: {exc.details()}"}), flush=True)
"""


def agent_env(pod: str, sa: str, port: int, xds: str, mtls: str, run: Path, token: Path) -> dict[str, str]:
    """The agent's environment as the grpc template writes it, the downward API's values filled in."""
    obj = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "annotations": {TEMPLATES: "grpc"}},
           "spec": {"serviceAccountName": sa,
                    "containers": [{"name": "app", "image": "app", "ports": [{"containerPort": port}]}]}}
    out = inject(obj, InjectConfig(cluster="east", image="x", xds_address=xds, xds_mtls_address=mtls))
    assert isinstance(out, Injected)
    [agent] = [c for c in out.pod["spec"]["initContainers"] if c["name"] == PROXY_NAME]
    assert agent["args"] == ["proxy", "run", "--grpc"]
    downward = {"metadata.name": pod, "metadata.namespace": "default", "status.podIP": "127.0.0.1",
                "spec.serviceAccountName": sa}
    env = {e["name"]: e["value"] if "value" in e else downward[e["valueFrom"]["fieldRef"]["fieldPath"]]
           for e in agent["env"]}
    app_env = {e["name"]: e["value"] for e in out.pod["spec"]["containers"][0]["env"]}
    assert app_env["GRPC_XDS_BOOTSTRAP"] == GRPC_BOOTSTRAP
    env.update(MESHFED_XDS_TOKEN_FILE=str(token), MESHFED_RUN_DIR=str(run), MESHFED_HEALTH_PORT=str(free_port()),
               MESHFED_GRPC_REFRESH_SECONDS="1")
    return env


def leaf(run: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((run / "grpc" / "cert.pem").read_bytes())


def ready(proc: subprocess.Popen[bytes], health: str) -> bool:
    assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
    try:
        return http_get(f"http://127.0.0.1:{health}/healthz/ready")[0] == 200
    except OSError:
        return False


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_proxyless_call_across_a_certificate_renewal(east_ca: Path, tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    shutil.copytree(DEMO, demo)
    port = free_port()
    (demo / "east" / "echo-grpc.yaml").write_text(ECHO.format(port=port))
    pods = {"echo-grpc-0": "echo-grpc", "client-0": "grpc-client"}
    tokens = {f"tok-{pod}-" + "x" * 16: {"namespace": "default", "service_account": sa, "cluster": "east",
                                        "node_id": f"proxyless~127.0.0.1~{pod}.default~default.svc.cluster.local"}
              for pod, sa in pods.items()}
    write_private(tmp_path / "tokens.json", json.dumps(tokens))
    config = ControlPlaneConfig(
        clusterset=load_clusterset(demo), cluster=cluster_id("east"), ca_dir=east_ca, federation_urls=(),
        xds=Listen("127.0.0.1", 0), dns=Listen("127.0.0.1", 0), admin=Listen("127.0.0.1", 0),
        gateway_host="127.0.0.1", gateway_port=15443, tokens_file=tmp_path / "tokens.json",
        xds_mtls=Listen("127.0.0.1", 0), workload_cert_ttl=TTL)
    procs: list[subprocess.Popen[Any]] = []
    async with ControlPlane(config) as cp:
        assert cp.ads is not None and cp.ads_mtls is not None
        try:
            envs: dict[str, dict[str, str]] = {}
            for (pod, sa), token in zip(pods.items(), tokens, strict=True):
                (tmp_path / pod).mkdir()
                (tmp_path / pod / "token").write_text(token + "\n")
                envs[pod] = agent_env(pod, sa, port, f"127.0.0.1:{cp.ads.port}", f"127.0.0.1:{cp.ads_mtls.port}",
                                      tmp_path / pod / "run", tmp_path / pod / "token")
                procs.append(await asyncio.to_thread(
                    subprocess.Popen, [sys.executable, "-m", "meshfed", "proxy", "run", "--grpc", "--token-poll", "1"],
                    env={**os.environ, **envs[pod]}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
            for proc, pod in zip(procs, pods, strict=True):
                await asyncio.to_thread(wait_for, lambda p=proc, e=envs[pod]: ready(p, e["MESHFED_HEALTH_PORT"]),
                                        timeout=60, what=f"{pod}'s agent")
            runs = {pod: tmp_path / pod / "run" for pod in pods}
            boot = json.loads((runs["client-0"] / "grpc" / "bootstrap.json").read_text())
            assert boot["node"]["id"] == "grpc~127.0.0.1~client-0.default~default.svc.cluster.local"
            assert boot["xds_servers"][0]["channel_creds"][0]["type"] == "tls"
            assert (runs["client-0"] / "grpc" / "key.pem").stat().st_mode & 0o007 == 0
            first = {pod: leaf(run) for pod, run in runs.items()}
            sans = first["client-0"].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert [str(u) for u in sans.get_values_for_type(x509.UniformResourceIdentifier)] == [
                "spiffe://demo.meshfed.local/ns/default/sa/grpc-client"]

            grpc_env = {"GRPC_EXPERIMENTAL_XDS_SNI": "true"}
            server = await asyncio.to_thread(
                subprocess.Popen, [sys.executable, "-m", "meshfed.demogrpc", "serve", "--listen", f"127.0.0.1:{port}",
                 "--service", "echo-grpc", "--cluster", "east", "--workload", "echo-grpc-0"],
                env={**os.environ, **grpc_env, "GRPC_XDS_BOOTSTRAP": str(runs["echo-grpc-0"] / "grpc" /
                                                                        "bootstrap.json")},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(server)
            client = await asyncio.to_thread(
                subprocess.Popen, [sys.executable, "-c", CLIENT, f"xds:///echo-grpc.default.svc.clusterset.local:{port}"],
                env={**os.environ, **grpc_env, "GRPC_XDS_BOOTSTRAP": str(runs["client-0"] / "grpc" /
                                                                        "bootstrap.json")},
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            procs.append(client)
            assert client.stdin is not None and client.stdout is not None

            def call(message: str) -> dict[str, Any]:
                assert client.stdin is not None and client.stdout is not None
                client.stdin.write(message + "\n")
                client.stdin.flush()
                answer: dict[str, Any] = json.loads(client.stdout.readline())
                return answer

            before = await asyncio.to_thread(call, "before")
            assert before.get("message") == "before", before
            assert before["caller"] == "spiffe://demo.meshfed.local/ns/default/sa/grpc-client"

            # Wait (bounded) until both pods' first leaves have expired and both were renewed.
            expired = max(c.not_valid_after_utc for c in first.values())

            def renewed() -> bool:
                return datetime.now(UTC) > expired + timedelta(seconds=2) and all(
                    leaf(run).serial_number != first[pod].serial_number for pod, run in runs.items())

            await asyncio.to_thread(wait_for, renewed, timeout=90, what="both certificates renewed and expired")
            for pod, run in runs.items():
                assert leaf(run).not_valid_before_utc < datetime.now(UTC) < leaf(run).not_valid_after_utc, pod
            after = await asyncio.to_thread(call, "after")
            assert after.get("message") == "after", after
            assert after["caller"] == "spiffe://demo.meshfed.local/ns/default/sa/grpc-client"
        finally:
            for proc in reversed(procs):
                if proc.stdin is not None:
                    proc.stdin.close()
                await asyncio.to_thread(stop, proc)


def test_grpc_environment_errors_name_the_variable(tmp_path: Path) -> None:
    from meshfed.agent import AgentError, grpc_bootstrap
    from meshfed.agent import agent_env as read_env

    env = agent_env("client-0", "grpc-client", 7070, "cp.meshfed-system.svc:15010", "cp.meshfed-system.svc:15012",
                    tmp_path / "run", tmp_path / "token")
    files = {"cert_file": "c", "key_file": "k", "ca_file": "a"}
    boot = grpc_bootstrap(read_env(env), **files)
    assert boot["xds_servers"][0]["server_uri"] == "cp.meshfed-system.svc:15012"
    assert boot["certificate_providers"]["default"]["plugin_name"] == "file_watcher"
    assert boot["node"]["metadata"]["MESHFED_KIND"] == "grpc"
    with pytest.raises(AgentError, match="MESHFED_XDS_MTLS_ADDRESS"):
        grpc_bootstrap(read_env({k: v for k, v in env.items() if k != "MESHFED_XDS_MTLS_ADDRESS"}), **files)
    with pytest.raises(AgentError, match="MESHFED_XDS_MTLS_ADDRESS"):
        read_env({**env, "MESHFED_XDS_MTLS_ADDRESS": "nohostport"})
