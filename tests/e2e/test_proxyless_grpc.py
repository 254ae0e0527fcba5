"""Acceptance: proxyless gRPC across clusters, on the real composition (`meshfed up` on the demo clusterset).

West runs ``echo-grpc`` as a gRPC xDS server (``python -m meshfed.demogrpc serve``, no sidecar) configured by
west's control plane; east's proxyless client identity (``grpc-client``) calls
``xds:///echo-grpc.default.svc.clusterset.local:7070`` with gRPC's own xDS client, configured by east's control
plane over its certificate-authenticated (mutual TLS) ADS listener. The call crosses west's east-west gateway
with mTLS end to end; the server reads the caller's SPIFFE ID from its TLS auth context. An Envoy sidecar calls
the same service over HTTP/2. The control plane refuses a certificate from another cluster's CA, and the gRPC
server refuses plaintext.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from federation.trust.ca import issue_workload
from federation.trust.spiffe import SpiffeId, TrustDomain
from federation.trust.store import load_cluster_ca
from meshfed import local, procs
from meshfed.runstate import RunState

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

REPO = Path(__file__).resolve().parents[2]
TARGET = "xds:///echo-grpc.default.svc.clusterset.local:7070"
TD = "demo.meshfed.local"


def meshfed(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshfed", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)


POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: echo-grpc-callers
  namespace: default
spec:
  selector:
    matchLabels:
      app: echo-grpc
  action: ALLOW
  rules:
    - from:
        - source:
            principals: ["demo.meshfed.local/ns/default/sa/grpc-client", "demo.meshfed.local/ns/default/sa/sleep"]
      to:
        - operation:
            paths: ["/meshfed.demo.Echo/Call"]
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunState]:
    base = tmp_path_factory.mktemp("meshfed-grpc")
    demo = base / "demo"
    shutil.copytree(REPO / "clusters" / "demo", demo)
    (demo / "west" / "authz-echo-grpc.yaml").write_text(POLICY)  # west's policy for its gRPC server
    run_dir = base / "run"
    done = meshfed("up", str(demo), "--detach", "--run-dir", str(run_dir), timeout=240)
    try:
        assert done.returncode == 0, f"meshfed up failed:\n{done.stdout}\n{done.stderr}"
        yield local.read_state(run_dir)
    finally:
        meshfed("down", "--run-dir", str(run_dir))
        if (run_dir / local.STATE_FILE).exists():
            for rec in local.read_state(run_dir).processes:
                procs.stop(rec.pid)


def grpc_call(state: RunState, cluster: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")}
    env.update(state.clusters[cluster].grpc_client.env)
    return subprocess.run([sys.executable, "-m", "meshfed.demogrpc", "call", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=90, check=False)


def test_proxyless_client_in_east_reaches_proxyless_server_in_west_over_mtls(run: RunState) -> None:
    server = run.clusters["west"].proxyless[0]
    assert server.service == "echo-grpc"
    done = grpc_call(run, "east", TARGET, "--message", "from-east", "--timeout", "30", "--count", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    answers = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(answers) == 3
    for answer in answers:
        assert (answer["service"], answer["cluster"], answer["message"]) == ("echo-grpc", "west", "from-east")
        # The server saw the caller's certificate (mTLS through the passthrough gateway), issued by east's CA.
        assert answer["caller"] == f"spiffe://{TD}/ns/default/sa/grpc-client", answer
    # It went through west's gateway: the gateway counted connections on echo-grpc's SNI chain.
    status, text = local.http_get(f"http://{run.clusters['west'].gateway.admin}/stats/prometheus")
    assert status == 200
    assert 'destination_service="echo-grpc.default.svc.clusterset.local"' in text or \
        "outbound_.7070_._.echo-grpc" in text


def test_envoy_sidecar_calls_the_proxyless_server_over_http2(run: RunState) -> None:
    sleep = local.client_of(run, "east")
    with grpc.insecure_channel(sleep.outbound, options=[
            ("grpc.default_authority", "echo-grpc.default.svc.clusterset.local:7070")]) as channel:
        reply = channel.unary_unary("/meshfed.demo.Echo/Call")(b"via-envoy", timeout=30, wait_for_ready=True)
    answer = json.loads(reply)
    assert answer["cluster"] == "west" and answer["caller"] == f"spiffe://{TD}/ns/default/sa/sleep", answer


def _ads_first_response(address: str, cert: tuple[bytes, bytes], bundle: bytes, node_id: str,
                        service_account: str) -> grpc.StatusCode | None:
    """Open an ADS stream with a client certificate; the status it ends with (None: it got a response)."""
    creds = grpc.ssl_channel_credentials(root_certificates=bundle, private_key=cert[0], certificate_chain=cert[1])
    with grpc.secure_channel(address, creds) as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        request = discovery_pb2.DiscoveryRequest(
            type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster")
        request.node.id = node_id
        request.node.metadata.update({"MESHFED_KIND": "grpc", "CLUSTER_ID": "east", "NAMESPACE": "default",
                                      "SERVICE_ACCOUNT": service_account})
        try:
            for _ in stub.StreamAggregatedResources(iter([request]), timeout=10):
                return None
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return None


def test_mtls_ads_accepts_own_cluster_certificates_and_refuses_other_clusters(run: RunState) -> None:
    east = run.clusters["east"]
    ca_root = Path(run.ca.root).parent
    bundle = (Path(east.grpc_client.bootstrap).parent / "ca.pem").read_bytes()
    sid = SpiffeId.workload(TrustDomain.parse(TD), "default", "probe")
    node = "grpc~127.0.0.1~probe-1.default~default.svc.cluster.local"
    own = issue_workload(load_cluster_ca(ca_root / "east"), sid)
    foreign = issue_workload(load_cluster_ca(ca_root / "west"), sid)
    address = east.controlplane.xds_mtls
    assert _ads_first_response(address, (own[0], b"".join(own[1])), bundle, node, "probe") is None
    assert _ads_first_response(address, (foreign[0], b"".join(foreign[1])), bundle, node, "probe") == \
        grpc.StatusCode.UNAUTHENTICATED
    # The node must be the certificate's identity: another service account is refused.
    assert _ads_first_response(address, (own[0], b"".join(own[1])), bundle, node, "other") == \
        grpc.StatusCode.PERMISSION_DENIED


def test_proxyless_server_refuses_plaintext(run: RunState) -> None:
    server = run.clusters["west"].proxyless[0]
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/meshfed.demo.Echo/Call")(b"plain", timeout=5)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)  # type: ignore[attr-defined]


def test_status_traffic_section_shows_east_to_west(run: RunState) -> None:
    """After the calls above (the sidecar's gRPC call and `meshfed up`'s own proof), `meshfed status` reports the
    east -> west pair from the callers' sidecars, with its request count and error rate."""
    done = meshfed("status", "--run-dir", run.run_dir, "-o", "json")
    assert done.returncode in (0, 1), done.stderr
    report = json.loads(done.stdout)
    pairs = {(r["source_cluster"], r["destination_cluster"]): r for r in report["traffic"]}
    east_west = pairs[("east", "west")]
    assert east_west["requests"] >= 2 and 0 <= east_west["error_rate"] < 1, east_west
    assert all("unknown" not in key for pair in pairs for key in pair)
    text = meshfed("status", "--run-dir", run.run_dir)
    assert "Traffic" in text.stdout, text.stdout


def test_authorization_policy_applies_to_the_proxyless_server(run: RunState) -> None:
    """West's ALLOW policy (these principals, only /meshfed.demo.Echo/Call) is compiled into the gRPC server's
    RBAC: the allowed method works (above); another method is refused by RBAC (PERMISSION_DENIED), not by the
    application (which would answer UNIMPLEMENTED)."""
    done = grpc_call(run, "east", TARGET, "--method", "/meshfed.demo.Echo/Other", "--timeout", "30")
    assert done.returncode == 1
    assert "PERMISSION_DENIED" in done.stderr, done.stderr[-2000:]
