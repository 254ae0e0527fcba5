"""The injected spec runs: a pod spec goes through the webhook's ``review`` (AdmissionReview in, JSONPatch out,
applied with ``jsonpatch``), and the containers it injected are run, in order, in east's pod namespace of the
capture bed (``tests.e2e.test_capture_dataplane``'s layout, IPv4): ``meshfed-init``'s command line as it stands
in the patch (``meshfed proxy capture ...``, as root), then ``meshfed-proxy``'s (``meshfed proxy run``, with the
patch's environment and the downward API's values filled in; the agent drops to uid 1337 itself). Once the
sidecar's ``/healthz/ready`` on :15021 answers 200, the pod's application, which knows nothing of the mesh, calls
west's services by DNS name: plain TCP to echo and HTTP to ratings, through the injected sidecar, west's east-west
gateway and west's sidecar. The sidecar's ADS reaches east's control plane (in this process) through a relay on the
pod's own loopback, the way it would reach the control plane Service.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import jsonpatch
import pytest

from discovery.dns.server import DnsServer
from meshfed.agent import agent_env, proxy_info
from meshfed.controlplane.webhook import review
from meshfed.inject import InjectConfig
from tests.e2e.test_capture_dataplane import (
    APPS,
    CLIENT,
    ECHO_NAME,
    NETNS_MARKS,
    RATINGS_URL,
    Addresses,
    planes,
)
from tests.gateway.envoy_fixtures import ControlPlane, wait_until
from tests.gateway.mesh_fixtures import TD
from tests.support.netns_bed import (
    CREATED,
    REPO,
    Bed,
    Link,
    bed,
    bound_sockets,
    capture_rules,
    resolver,
    run,
    run_in,
    start_envoy,
    start_script,
    tcp_relay,
)

pytestmark = NETNS_MARKS  # root, ip, setpriv and iptables, as the capture bed needs

XDS_PORT = 15010  # inside the pod's namespace (its own loopback), relayed to east's control plane

READY = r"""
import sys, urllib.request
try:
    print(urllib.request.urlopen("http://127.0.0.1:15021/healthz/ready", timeout=2).status)
except Exception as exc:
    print(f"error {exc}")
"""


#: The application's own health endpoint, on the pod's loopback and address (port 8080, ``/ready``), as a pod
#: with a kubelet readiness probe has it.
HEALTH_APP = r"""
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        self.send_response(200 if self.path == "/ready" else 500)
        self.send_header("Content-Length", "0")
        self.end_headers()
server = http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H)
print("ready", flush=True)
server.serve_forever()
"""

#: What kubelet does from the node: GET argv[1], print the status (or the error).
KUBELET_GET = r"""
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
        print(r.status, r.read().decode().strip())
except urllib.error.HTTPError as exc:
    print(exc.code, exc.read().decode().strip())
except Exception as exc:
    print("error", type(exc).__name__)
"""


def sleep_pod() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sleep-1", "namespace": "default"},
            "spec": {"serviceAccountName": "sleep", "containers": [{
                "name": "sleep", "image": "sleep:1", "ports": [{"name": "http-health", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": "http-health"}, "periodSeconds": 5}}]}}


def injected(pod: dict[str, Any]) -> dict[str, Any]:
    """The pod as the API server stores it after the webhook answered."""
    config = InjectConfig(cluster="east", image="registry.example/meshfed:test", xds_address=f"127.0.0.1:{XDS_PORT}")
    body = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "1", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": "CREATE",
        "namespace": "default", "object": pod}}
    status, out = review(json.dumps(body).encode(), config)
    assert status == 200 and out["response"]["allowed"], out
    patched: dict[str, Any] = jsonpatch.apply_patch(pod, json.loads(base64.b64decode(out["response"]["patch"])))
    return patched


def downward(pod: dict[str, Any], container: dict[str, Any], pod_ip: str) -> dict[str, str]:
    values = {"metadata.name": pod["metadata"]["name"], "metadata.namespace": pod["metadata"]["namespace"],
              "status.podIP": pod_ip, "spec.serviceAccountName": pod["spec"]["serviceAccountName"],
              "spec.nodeName": "node-1"}
    return {e["name"]: e["value"] if "value" in e else values[e["valueFrom"]["fieldRef"]["fieldPath"]]
            for e in container.get("env", [])}


@pytest.fixture
async def pod_mesh() -> AsyncIterator[tuple[Bed, subprocess.Popen[bytes], str]]:
    ips = Addresses(secrets.randbelow(250) + 1)
    p = planes(ips)
    east_reg, west_reg, east_ctx, west_ctx, echo, gateway = (p.east_reg, p.west_reg, p.east_ctx, p.west_ctx,
                                                             p.echo, p.gateway)
    links = [Link("east", (f"{ips.east_ip}/24",), "gw", (f"{ips.gateway_ip}/24",)),
             *ips.links()[1:]]
    pod = injected(sleep_pod())
    init, sidecar = pod["spec"]["initContainers"]
    with bed("inj", ("east", "gw", "west", "eastdns", "westdns"), links,
             default_routes=(("east", "gw"), ("west", "gw"))) as b:
        resolver(b, "east", ips.east_dns_ip)
        resolver(b, "west", ips.west_dns_ip)
        async with ControlPlane(ctx=east_ctx) as east_cp, ControlPlane(ctx=west_ctx) as west_cp, \
                DnsServer(sockets=bound_sockets(b, "eastdns", ips.east_dns_ip, 53), registry=east_reg) as east_dns, \
                DnsServer(sockets=bound_sockets(b, "westdns", ips.west_dns_ip, 53), registry=west_reg) as west_dns:
            await east_dns.update(east_reg)
            await west_dns.update(west_reg)
            agent: subprocess.Popen[bytes] | None = None
            try:
                start_script(b, "west", APPS)
                capture_rules(b, "west")
                await start_envoy(b, west_cp, echo, "west")
                await start_envoy(b, west_cp, gateway, "gw")

                pyenv = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
                # 1. the init container, as the patch has it (the image's entrypoint is `meshfed`)
                done = await asyncio.to_thread(
                    subprocess.run, ["ip", "netns", "exec", b.ns("east"), sys.executable, "-m", "meshfed",
                                     *init["args"]], capture_output=True, text=True, timeout=120, env=pyenv,
                    check=False)
                assert done.returncode == 0, done.stdout + done.stderr
                assert "ipv4: installed" in done.stdout
                # 2. the native sidecar, with the patch's environment; the volumes' files where the env says
                env = downward(pod, sidecar, ips.east_ip)
                run_dir = b.tmp / "east-run"
                run_dir.mkdir()
                env["MESHFED_RUN_DIR"] = str(run_dir)
                token_file = b.tmp / "east-token"
                env["MESHFED_XDS_TOKEN_FILE"] = str(token_file)
                token_file.write_text(east_cp.add_proxy(proxy_info(agent_env(env))))
                await tcp_relay(b, "east", XDS_PORT, east_cp.port)
                agent = await asyncio.to_thread(
                    subprocess.Popen, ["ip", "netns", "exec", b.ns("east"), sys.executable, "-m", "meshfed",
                                       *sidecar["args"]], env={**pyenv, **env},
                    stdout=b.log("east").open("wb"), stderr=subprocess.STDOUT)

                async def ready() -> bool:
                    assert agent is not None and agent.poll() is None, b.log("east").read_text(errors="replace")
                    return await run_in(b, "east", READY, within=30) == "200"

                await wait_until(ready, within=90, what="the injected sidecar's /healthz/ready")
                start_script(b, "east", HEALTH_APP)  # last: the test stops it (b.popens[-1])
                yield b, agent, ips.east_ip
            finally:
                if agent is not None and agent.poll() is None:
                    agent.send_signal(signal.SIGTERM)
                    try:
                        agent.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        agent.kill()
                        agent.wait()
                b.stop_processes()


async def test_the_injected_containers_put_the_pod_in_the_mesh(
        pod_mesh: tuple[Bed, subprocess.Popen[bytes], str]) -> None:
    b, agent, ip = pod_mesh
    assert await run_in(b, "east", CLIENT, "resolve", ECHO_NAME, within=60) != ""
    assert await run_in(b, "east", CLIENT, "echo", ECHO_NAME, "5432", str(1 << 16), within=60) == "ok"
    status, _, xfcc = (await run_in(b, "east", CLIENT, "http", RATINGS_URL, within=60)).partition(" ")
    assert status == "200"
    assert f"URI=spiffe://{TD}/ns/default/sa/sleep" in xfcc  # the sidecar's identity: the injected pod's account
    # Envoy runs as the proxy uid (the agent, root in the pod's namespace, dropped to it): the capture rules'
    # exception for its own connections is what let the calls above leave without looping back into 15001.
    [envoy_pid] = await asyncio.to_thread(_children, agent.pid)
    status_text = await asyncio.to_thread(_read, f"/proc/{envoy_pid}/status")
    assert "Uid:\t1337\t1337\t1337\t1337" in status_text, status_text
    # kubelet's readiness probe, as injection rewrote it, asked from the node (the gateway's namespace stands in):
    # the agent runs the original against the app inside the pod. The original, asked from outside, meets the
    # capture and the sidecar's mutual TLS and fails: why it was moved.
    pod = injected(sleep_pod())
    probe = pod["spec"]["containers"][0]["readinessProbe"]
    assert probe == {"httpGet": {"path": "/app-health/sleep/readyz", "port": 15020, "scheme": "HTTP"},
                     "periodSeconds": 5}
    node_view = await run_in(b, "gw", KUBELET_GET, f"http://{ip}:15020/app-health/sleep/readyz", within=60)
    assert node_view == "200 http GET 127.0.0.1:8080/ready: 200", node_view
    assert not (await run_in(b, "gw", KUBELET_GET, f"http://{ip}:8080/ready", within=60)).startswith("200")
    b.popens[-1].kill()  # the application goes down: the probe says so
    b.popens[-1].wait(timeout=30)
    node_view = await run_in(b, "gw", KUBELET_GET, f"http://{ip}:15020/app-health/sleep/readyz", within=60)
    assert node_view.startswith("503 http GET 127.0.0.1:8080/ready:"), node_view
    # The agent stops with SIGTERM and takes Envoy with it.
    agent.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(agent.wait, 30) == 0
    assert await run_in(b, "east", READY, within=30) != "200"


def _children(pid: int) -> list[int]:
    return [int(p) for p in _read(f"/proc/{pid}/task/{pid}/children").split()]


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def test_nothing_left() -> None:
    listed = set(run(["ip", "netns", "list"]).split())
    assert not {ns for ns in CREATED if ns in listed}
