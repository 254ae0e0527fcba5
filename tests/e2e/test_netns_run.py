"""Acceptance for issue 13: `meshfed up --network netns` on the demo, each cluster its own network and each
workload its own network namespace, then `meshfed down` leaving nothing behind and a second `up` in the same
directory.

One run for the module (tests in file order build on each other): a cross-cluster call by DNS name from inside
east's sleep pod answered by west with the caller's identity; a direct connection from east's pod to a west pod's
IP has no route; `status -o json` gives each workload's pod IP and is healthy; diagnose walks every hop; a
partition of west fails east's calls over to east's own reviews (success ratio printed) and heals; `down` leaves
no namespace, link or resolv.conf; a second `up` in the same run directory works and is taken down again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshfed import local, netns, procs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not netns.available()[0], reason=f"netns bed unavailable: {netns.available()[1]}"),
]

REPO = Path(__file__).resolve().parents[2]
RATINGS = "ratings.default.svc.clusterset.local"
REVIEWS = "reviews.default.svc.clusterset.local"

# Inside a pod: GET argv[1] with urllib (no curl needed); prints "STATUS BODY" or "error NAME ERRNO".
GET = r"""
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as resp:
        print(resp.status, resp.read().decode())
except urllib.error.HTTPError as exc:
    print(exc.code, exc.read().decode())
except OSError as exc:
    reason = getattr(exc, "reason", exc)
    print("error", type(reason).__name__, getattr(reason, "errno", ""))
"""


def meshfed(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshfed", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)


# Added to a copy of the demo: a west-only service on a plain TCP port (no appProtocol, a name that is not
# http*), exported, so east's sidecar carries it with tcp_proxy (the demo app behind it speaks HTTP/1.0 anyway).
TCP_SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: ledger, namespace: default, labels: {app: ledger}}
spec:
  selector: {app: ledger}
  ports: [{name: tcp-ledger, port: 7000, targetPort: 7000, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ledger-west-1, namespace: default, labels: {kubernetes.io/service-name: ledger}}
addressType: IPv4
ports: [{name: tcp-ledger, port: 7000, protocol: TCP}]
endpoints:
  - addresses: ["127.0.2.70"]
    conditions: {ready: true, serving: true, terminating: false}
    zone: eu-west-1a
---
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata: {name: ledger, namespace: default, creationTimestamp: "2026-01-03T00:00:00Z"}
"""
LEDGER = "ledger.default.svc.clusterset.local"


def up(run_dir: Path, clusterset: Path) -> subprocess.CompletedProcess[str]:
    return meshfed("up", str(clusterset), "--network", "netns", "--detach", "--lease-ttl", "5", "--run-dir",
                   str(run_dir), timeout=300)


def run_id(run_dir: Path) -> str:
    return local.read_state(run_dir).network.run_id


def cleanup(run_dir: Path) -> None:
    """Down, then (should down have failed) stop recorded pids and remove the recorded bed."""
    meshfed("down", "--run-dir", str(run_dir))
    if not (run_dir / local.STATE_FILE).exists():
        return
    state = local.read_state(run_dir)
    for rec in state.processes:
        procs.stop(rec.pid, start=rec.start_time)
    local.remove_network(run_dir, state)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    base = tmp_path_factory.mktemp("meshfed-netns")
    run_dir, demo = base / "run", base / "demo"
    shutil.copytree(REPO / "clusters" / "demo", demo)
    (demo / "west" / "ledger.yaml").write_text(TCP_SERVICE)
    done = up(run_dir, demo)
    try:
        assert done.returncode == 0, f"meshfed up failed:\n{done.stdout}\n{done.stderr}"
        assert "network: netns" in done.stderr
        yield run_dir
    finally:
        cleanup(run_dir)


def in_pod(run: Path, workload: str, url: str, timeout: float = 5) -> str:
    done = meshfed("exec", workload, "--run-dir", str(run), "--", sys.executable, "-I", "-c", GET, url, str(timeout))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def answer(line: str) -> dict[str, Any]:
    status, _, body = line.partition(" ")
    assert status == "200", line
    result: dict[str, Any] = json.loads(body)
    return result


def assert_ratings_answered_again(run: Path) -> None:
    """East's calls to west-only ratings succeed again (bounded wait while health checks see west's gateway)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if in_pod(run, "sleep-east", f"http://{RATINGS}:9080/").startswith("200 "):
            break
        time.sleep(1)
    assert answer(in_pod(run, "sleep-east", f"http://{RATINGS}:9080/"))["cluster"] == "west"


def test_cross_cluster_call_by_dns_name_from_inside_easts_pod(run: Path) -> None:
    got = answer(in_pod(run, "sleep-east", f"http://{RATINGS}:9080/"))
    assert got["cluster"] == "west" and got["workload"] == "ratings-west-0"
    assert got["caller"] == "spiffe://demo.meshfed.local/ns/default/sa/sleep"
    # the caller's certificate names its cluster: east's sidecar made the mTLS connection, west's checked it
    assert 'Subject="OU=east' in got["headers"]["x-forwarded-client-cert"]


# In a pod: a plain TCP connection to argv[1]:argv[2], an HTTP/1.0 request written by hand, the answer's body.
RAW_TCP = r"""
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as s:
    s.sendall(b"GET / HTTP/1.0\r\nHost: ledger\r\n\r\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
print(data.split(b"\r\n\r\n", 1)[-1].decode())
"""


def test_cross_cluster_tcp_by_dns_name_from_inside_easts_pod(run: Path) -> None:
    done = meshfed("exec", "sleep-east", "--run-dir", str(run), "--", sys.executable, "-I", "-c", RAW_TCP, LEDGER,
                   "7000")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["cluster"] == "west" and got["service"] == "ledger"
    assert "x-forwarded-client-cert" not in got["headers"]  # carried as TCP: no HTTP connection manager on the way


def test_east_pod_has_no_route_to_a_west_pod(run: Path) -> None:
    state = local.read_state(run)
    west_ratings = next(w for w in state.clusters["west"].workloads if w.name == "ratings-west-0")
    assert in_pod(run, "sleep-east", f"http://{west_ratings.pod_ip}:9080/") == "error OSError 101"  # ENETUNREACH
    # ... and neither has the east-west gateway's cluster side, nor the root namespace an address in west's pods
    gw = state.clusters["west"].gateway.admin.split(":")[0]
    assert in_pod(run, "sleep-east", f"http://{gw}:15000/ready") == "error OSError 101"


def test_authorization_by_source_cluster(run: Path) -> None:
    """West's policy on ratings allows the sleep principal from cluster east only (source.cluster, taken from the
    caller's certificate): west's own sleep, the same principal, is refused."""
    line = in_pod(run, "sleep-west", f"http://{RATINGS}:9080/")
    assert line.split()[0] == "403", line
    assert answer(in_pod(run, "sleep-east", f"http://{RATINGS}:9080/"))["cluster"] == "west"


# In a pod: a TLS handshake with SNI argv[3] to argv[1]:argv[2]; prints "handshake ok" or "refused NAME".
TLS = r"""
import socket, ssl, sys
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=sys.argv[3]) as tls:
            print("handshake ok")
except (OSError, ssl.SSLError) as exc:
    print("refused", type(exc).__name__)
"""


def test_unknown_sni_is_refused_at_the_gateway(run: Path) -> None:
    """From east's pod as the proxy uid (not captured, as a sidecar dials): west's gateway passes a known SNI through
    (the handshake reaches ratings' sidecar) and closes a connection whose SNI names no exported service."""
    gw = local.read_state(run).clusters["west"].gateway.address
    host, port = gw.rsplit(":", 1)

    def handshake(sni: str) -> str:
        done = meshfed("exec", "sleep-east", "--run-dir", str(run), "--", *netns.as_proxy_uid(), sys.executable,
                       "-I", "-c", TLS, host, port, sni)
        return done.stdout.strip() or done.stderr

    assert handshake(f"outbound_.9080_._.{RATINGS}") == "handshake ok"
    assert handshake("outbound_.9080_._.nothing.default.svc.clusterset.local").startswith("refused")


CONNECT = ("import socket, sys\n"
           "try:\n"
           "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close(); print('ok')\n"
           "except OSError as exc:\n"
           "    print(type(exc).__name__, exc.errno)\n")


def test_pods_reach_their_clusters_control_plane_dns_and_the_federation_on_the_bridge(run: Path) -> None:
    state = local.read_state(run)
    east, west = state.clusters["east"], state.clusters["west"]
    fed = state.federation.pod_urls
    targets = {"xds": east.controlplane.xds, "federation": fed["east"].removeprefix("https://")}
    for what, address in targets.items():
        host, port = address.rsplit(":", 1)
        done = meshfed("exec", "sleep-east", "--run-dir", str(run), "--", sys.executable, "-I", "-c", CONNECT, host,
                       port)
        assert done.stdout.strip() == "ok", (what, done.stdout, done.stderr)
    host, port = west.controlplane.xds.rsplit(":", 1)  # another cluster's control plane: no route
    done = meshfed("exec", "sleep-east", "--run-dir", str(run), "--", sys.executable, "-I", "-c", CONNECT, host, port)
    assert done.stdout.strip() == "OSError 101"


def test_status_gives_pod_ips_and_is_healthy(run: Path) -> None:
    done = meshfed("status", "--run-dir", str(run), "-o", "json")
    report = json.loads(done.stdout)
    assert done.returncode == 0, report["problems"]
    state = local.read_state(run)
    pods = {w["workload"]: w["pod_ip"] for w in report["addresses"]["workloads"]}
    plan = state.network.plan
    assert plan is not None
    east_net, west_net = (c.cidr.rsplit(".", 2)[0] for c in plan.clusters)
    assert pods["sleep-east"].startswith(east_net + ".") and pods["ratings-west-0"].startswith(west_net + ".")
    assert len(set(pods.values())) == len(pods)
    for name in ("east", "west"):
        c = report["addresses"]["clusters"][name]
        assert c["dns"].endswith(":53") and c["admin"].startswith("127.0.0.1:")


def test_diagnose_walks_every_hop_from_the_pod(run: Path) -> None:
    deadline = time.monotonic() + 60
    result: dict[str, Any] = {}
    while time.monotonic() < deadline:
        done = meshfed("diagnose", "ratings.default", "--from", "east", "--run-dir", str(run), "-o", "json")
        result = json.loads(done.stdout)
        if done.returncode == 0:
            break
        time.sleep(1)
    assert result.get("ok") is True, result
    request = next(h for h in result["hops"] if h["name"] == "request")
    assert "via pod" in request["detail"] and "ratings-west-0" in request["detail"]


# In a pod: GET argv[1] up to argv[2] times, 0.2 s apart, stopping early once argv[3] answers in a row came from
# cluster argv[4] (or, with argv[3] == "0", once one came from it); prints the answering clusters ("failed" for
# errors) as JSON.
LOOP = r"""
import json, sys, time, urllib.request
url, most, run, want = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
out = []
for _ in range(most):
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            out.append(json.loads(resp.read())["cluster"])
    except (OSError, ValueError):
        out.append("failed")
    if (run == 0 and out[-1] == want) or (run and out[-run:] == [want] * run):
        break
    time.sleep(0.2)
print(json.dumps(out))
"""


def loop_in_pod(run: Path, workload: str, url: str, most: int, streak: int, want: str) -> list[str]:
    done = meshfed("exec", workload, "--run-dir", str(run), "--", sys.executable, "-I", "-c", LOOP, url, str(most),
                   str(streak), want, timeout=900)
    assert done.returncode == 0, done.stderr
    result: list[str] = json.loads(done.stdout)
    return result


def test_partition_of_west_fails_over_to_easts_own_pods_and_heals(run: Path) -> None:
    """East's VirtualService sends reviews 90/10 to its east and west subsets (clusters/demo/east). Partition west:
    the west share fails until east's sidecar's health check gives up on west's gateway, then the subset falls
    back to east's pods (docs/traffic-policy.md) and no request is lost; west-only ratings fails until the heal."""
    url = f"http://{REVIEWS}:9080/"
    before = loop_in_pod(run, "sleep-east", url, 100, 0, "west")
    assert before[-1] == "west", before  # the west share is in rotation before the partition
    done = meshfed("fault", "partition", "west", "--run-dir", str(run))
    assert done.returncode == 0, done.stderr
    try:
        assert not in_pod(run, "sleep-east", f"http://{RATINGS}:9080/", timeout=3).startswith("200 ")
        during = loop_in_pod(run, "sleep-east", url, 200, 20, "east")
        ok = sum(1 for o in during if o == "east")
        settled = next(i for i in range(len(during)) if all(o == "east" for o in during[i:]))
        lost = f"all of them among the first {settled}" if settled else "none"
        print(f"\nreviews from east during west's partition: success ratio {ok / len(during):.2f} ({ok}/{len(during)}"
              f" answered by east's pods; {during.count('failed')} failed: {lost}; every request after that answered)")
        assert "west" not in during
        assert during[-20:] == ["east"] * 20, during  # after the health check window: nothing lost
        done = meshfed("status", "--run-dir", str(run), "-o", "json")
        status = json.loads(done.stdout)
        assert done.returncode == 1
        assert any(p.startswith("west: partitioned from every other cluster") for p in status["problems"])
        assert status["addresses"]["network"]["partitions"] == {"west": []}
    finally:
        healed = meshfed("fault", "heal", "west", "--run-dir", str(run))
    assert healed.returncode == 0, healed.stderr
    assert "west" not in local.read_state(run).network.partitions
    assert_ratings_answered_again(run)


def test_fault_stop_and_start_a_component(run: Path) -> None:
    stopped = meshfed("fault", "stop", "eastwest-gateway-west", "--run-dir", str(run), "-o", "json")
    assert stopped.returncode == 0, stopped.stderr
    state = local.read_state(run)
    gw = next(p for p in state.processes if p.name == "west/eastwest-gateway")
    assert gw.held is True and not local.is_running(gw)
    assert not in_pod(run, "sleep-east", f"http://{RATINGS}:9080/", timeout=3).startswith("200 ")
    started = meshfed("fault", "start", "eastwest-gateway-west", "--run-dir", str(run), "-o", "json")
    assert started.returncode == 0, started.stderr
    assert_ratings_answered_again(run)

    # a workload: west's only reviews pod stops (its endpoint leaves the ready set), west's calls go to east, and
    # back once it is started again (app and sidecar in its namespace, as first started)
    url = f"http://{REVIEWS}:9080/"
    assert meshfed("fault", "stop", "reviews-west-0", "--run-dir", str(run)).returncode == 0
    assert loop_in_pod(run, "sleep-west", url, 100, 10, "east")[-10:] == ["east"] * 10
    assert meshfed("fault", "start", "reviews-west-0", "--run-dir", str(run)).returncode == 0
    assert loop_in_pod(run, "sleep-west", url, 100, 5, "west")[-5:] == ["west"] * 5


def test_down_leaves_nothing_and_a_second_up_works(run: Path) -> None:
    first = run_id(run)
    pids = [p.pid for p in local.read_state(run).processes]
    done = meshfed("down", "--run-dir", str(run))
    assert done.returncode == 0, done.stderr
    assert [pid for pid in pids if procs.alive(pid)] == []
    assert netns.leftovers(first) == []
    assert not any(n.startswith(f"mf-{first}-") for n in os.listdir(netns.ETC_NETNS)) if netns.ETC_NETNS.exists() \
        else True
    assert not netns.proxy_dir(first).exists()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert f"mf-{first}-" not in listed and f"mf{first}" not in links

    again = up(run, Path(local.read_state(run).clusterset))
    try:
        assert again.returncode == 0, f"second meshfed up failed:\n{again.stdout}\n{again.stderr}"
        second = run_id(run)
        assert second != first and netns.leftovers(second)
        assert answer(in_pod(run, "sleep-east", f"http://{RATINGS}:9080/"))["cluster"] == "west"
    finally:
        done = meshfed("down", "--run-dir", str(run))
    assert done.returncode == 0, done.stderr
    assert netns.leftovers(second) == []


def test_down_cleans_up_after_up_was_killed(tmp_path: Path) -> None:
    """`meshfed up` killed (SIGKILL) halfway: what it had made is in state.json, and `meshfed down` removes it."""
    run_dir = tmp_path / "run"
    popen = subprocess.Popen([sys.executable, "-m", "meshfed", "up", "clusters/demo", "--network", "netns",
                              "--run-dir", str(run_dir)], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and popen.poll() is None:
            state = local.read_state(run_dir, missing_ok=True)
            if state is not None and any(p.name.endswith("/controlplane") for p in state.processes):
                break
            time.sleep(0.2)
        assert popen.poll() is None, "meshfed up exited before it could be killed"
        popen.kill()
        popen.wait(timeout=30)
        state = local.read_state(run_dir)
        rid = state.network.run_id
        assert netns.leftovers(rid), "the killed up had built its network"
        assert local.running(state), "the killed up had started processes"
        done = meshfed("down", "--run-dir", str(run_dir))
        assert done.returncode == 0, done.stderr
        assert netns.leftovers(rid) == []
        assert local.running(local.read_state(run_dir)) == []
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait(timeout=30)
        cleanup(run_dir)
