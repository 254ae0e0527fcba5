"""The east-west gateway container's program (``GATEWAY_SCRIPT``), run as the Deployment runs it — ``/bin/sh -c``
with the Deployment's environment — around a real Envoy with the rendered bootstrap.

Only the addresses are moved to loopback and free ports (the rendered ones are fixed in-cluster ports and a
cluster DNS name). Checks: the token lands in a 0600 bootstrap and nowhere else, Envoy runs with the pod's node
id, the :15021-style health listener answers from Envoy's /ready, a refreshed token makes the program stop Envoy
and exit (so the container restarts with it), and SIGTERM stops Envoy too.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from discovery.clusterset import load_clusterset
from meshfed.install.render import (
    ENVOY_ADMIN_PORT,
    GATEWAY_HEALTH_PORT,
    GATEWAY_METRICS_PORT,
    GATEWAY_SCRIPT,
    TOKEN_PLACEHOLDER,
    InstallOptions,
    gateway_bootstrap,
    gateway_objects,
)
from tests.support.procs import Proc, free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
NODE_ID = "gateway~10.1.2.3~meshfed-eastwest-gateway-abc.meshfed-system~meshfed-system.svc.cluster.local"


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _loopback_bootstrap(text: str, *, admin: int, health: int, xds: int, metrics: int) -> str:
    boot: dict[str, Any] = yaml.safe_load(text)
    boot["admin"]["address"]["socket_address"]["port_value"] = admin
    listener, prom = boot["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["port_value"] == GATEWAY_HEALTH_PORT
    listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": health}
    assert prom["address"]["socket_address"]["port_value"] == GATEWAY_METRICS_PORT
    prom["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": metrics}
    for cluster in boot["static_resources"]["clusters"]:
        sa = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        if cluster["name"] == "envoy-admin":
            assert sa["port_value"] == ENVOY_ADMIN_PORT
            sa["port_value"] = admin
        else:  # the control plane: nothing listens there, which leaves Envoy initializing
            cluster["type"] = "STATIC"
            sa.update({"address": "127.0.0.1", "port_value": xds})
    # Envoy opens its listeners (the health one too) once the first CDS/LDS fetch is done or has timed out;
    # there is no control plane here, so time out after 1s instead of the default 15s
    for source in ("cds_config", "lds_config"):
        boot["dynamic_resources"][source]["initial_fetch_timeout"] = "1s"
    return str(yaml.safe_dump(boot, sort_keys=False))


class Gateway:
    def __init__(self, tmp: Path) -> None:
        cs = load_clusterset(REPO / "clusters" / "demo")
        opts = InstallOptions()
        cluster = cs.cluster("east")
        [config, deployment, *_] = gateway_objects(cluster, opts, yaml.safe_dump(gateway_bootstrap(cluster, opts)))
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["/bin/sh", "-c", GATEWAY_SCRIPT]
        self.admin, self.health, self.metrics = free_port(), free_port(), free_port()
        self.template = tmp / "etc" / "bootstrap.yaml"
        self.template.parent.mkdir()
        self.template.write_text(_loopback_bootstrap(config["data"]["bootstrap.yaml"], admin=self.admin,
                                                     health=self.health, xds=free_port(),
                                                     metrics=self.metrics))
        self.token = tmp / "token"
        self.token.write_text("tok-1.abc_DEF-xyz")
        self.run_dir = tmp / "run"
        self.run_dir.mkdir()
        env = {e["name"]: e.get("value", "") for e in container["env"]}
        assert env["MESHFED_NODE_ID"].startswith("gateway~$(POD_IP)~$(POD_NAME).meshfed-system~")
        env.update({
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "MESHFED_NODE_ID": NODE_ID,
            "MESHFED_XDS_TOKEN_FILE": str(self.token),
            "MESHFED_BOOTSTRAP_TEMPLATE": str(self.template),
            "MESHFED_RUN_DIR": str(self.run_dir),
            "MESHFED_ENVOY_CONCURRENCY": "1",
            "MESHFED_TOKEN_POLL_SECONDS": "0.2",
        })
        self.proc = Proc(container["command"], log=tmp / "gateway.log", env=env)
        self.envoy_pid = 0

    def find_envoy(self) -> int:
        def found() -> bool:
            for pid in _children(self.proc.pid):
                try:
                    if b"bootstrap.yaml" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        self.envoy_pid = pid
                        return True
                except OSError:
                    continue
            return False

        wait_for(found, timeout=30, what="envoy started by the gateway program")
        return self.envoy_pid

    def stop(self) -> None:
        self.proc.stop()
        if self.envoy_pid and _alive(self.envoy_pid):
            os.kill(self.envoy_pid, signal.SIGKILL)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    gw = Gateway(tmp_path)
    try:
        yield gw
    finally:
        gw.stop()


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return 0, ""


def test_gateway_program_runs_envoy_with_the_token_and_restarts_on_refresh(gateway: Gateway) -> None:
    envoy = gateway.find_envoy()
    wait_for(lambda: _get(gateway.admin, "/server_info")[0] == 200, timeout=60, what="envoy admin")
    info = json.loads(_get(gateway.admin, "/server_info")[1])
    assert info["node"]["id"] == NODE_ID
    assert info["node"]["metadata"]["SERVICE_ACCOUNT"] == "meshfed-eastwest-gateway"
    assert info["command_line_options"]["concurrency"] == 1
    # the token is in the private bootstrap, in the ADS stream's metadata, and the placeholder is gone
    rendered = gateway.run_dir / "bootstrap.yaml"
    assert stat.S_IMODE(rendered.stat().st_mode) == 0o600
    text = rendered.read_text()
    assert TOKEN_PLACEHOLDER not in text
    meta = yaml.safe_load(text)["dynamic_resources"]["ads_config"]["grpc_services"][0]["initial_metadata"]
    assert meta == [{"key": "authorization", "value": "Bearer tok-1.abc_DEF-xyz"}]
    assert "tok-1" not in gateway.proc.output()
    # the health listener answers from Envoy's /ready once Envoy is live
    wait_for(lambda: _get(gateway.health, "/healthz/ready")[0] != 0, timeout=60, what="the health listener")
    assert _get(gateway.health, "/healthz/ready") == (200, "LIVE\n")
    # the cluster's Prometheus scrapes the gateway on :15090, which serves /stats/prometheus and nothing else
    code, text = _get(gateway.metrics, "/stats/prometheus")
    assert code == 200 and "envoy_server_live" in text
    assert _get(gateway.metrics, "/config_dump")[0] == 404
    assert _get(gateway.health, "/other")[0] == 404
    # kubelet refreshes the projected token: the program stops Envoy and exits 0, so the container restarts
    gateway.token.write_text("tok-2.new")
    wait_for(lambda: not gateway.proc.alive(), timeout=60, what="the gateway program to exit")
    assert gateway.proc.popen.returncode == 0
    wait_for(lambda: not _alive(envoy), timeout=30, what="envoy to stop")
    assert "xDS token refreshed" in gateway.proc.output()


def test_gateway_program_stops_envoy_on_sigterm(gateway: Gateway) -> None:
    envoy = gateway.find_envoy()
    wait_for(lambda: _get(gateway.admin, "/ready")[0] in (200, 503), timeout=60, what="envoy admin")
    os.kill(gateway.proc.pid, signal.SIGTERM)
    wait_for(lambda: not gateway.proc.alive(), timeout=60, what="the gateway program to exit")
    assert gateway.proc.popen.returncode == 0
    wait_for(lambda: not _alive(envoy), timeout=30, what="envoy to stop")
