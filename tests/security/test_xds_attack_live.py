"""The probe's xDS attack, replayed against a real `meshfed up` (real control planes, real Envoy sidecars).

West's client workload takes its own, valid bootstrap token and opens an ADS stream as west's ratings sidecar
(ratings' node id, ``SERVICE_ACCOUNT`` of the client) asking for ratings' certificate over SDS; then ratings' own
token opens a second stream for ratings' node with minimal metadata. Both are refused with PERMISSION_DENIED and
receive nothing. After the next push (a new Service appears in west and reaches ratings' sidecar), ratings' Envoy
still holds its inbound listener and east's client still reaches ratings across the clusters. (At the time of the
probe the first stream received ratings' key, the cache took the intruder's metadata, and the real sidecar lost its
inbound listener at the next push while status said synced.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from discovery.model import ClusterId, Namespace
from gateway.context import ProxyInfo, ProxyKind
from gateway.snapshot import LISTENER, SECRET
from meshfed import local, procs
from meshfed.runstate import RunState

pytestmark = [pytest.mark.slow, pytest.mark.timeout(500)]

REPO = Path(__file__).resolve().parents[2]
PROBE_SERVICE = """
apiVersion: v1
kind: Service
metadata:
  name: probe
  namespace: default
spec:
  ports:
    - name: http
      port: 9080
      targetPort: 9080
      protocol: TCP
      appProtocol: http
"""


def meshfed(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshfed", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, RunState]]:
    base = tmp_path_factory.mktemp("meshfed-xds-attack")
    demo = base / "demo"
    shutil.copytree(REPO / "clusters" / "demo", demo)
    run_dir = base / "run"
    done = meshfed("up", str(demo), "--detach", "--run-dir", str(run_dir), timeout=240)
    try:
        assert done.returncode == 0, f"meshfed up failed:\n{done.stdout}\n{done.stderr}"
        yield demo, local.read_state(run_dir)
    finally:
        meshfed("down", "--run-dir", str(run_dir))
        if (run_dir / local.STATE_FILE).exists():
            for rec in local.read_state(run_dir).processes:
                procs.stop(rec.pid)


def first_answer(address: str, token: str, node_id: str, metadata: dict[str, str], type_url: str,
                 names: list[str]) -> tuple[grpc.StatusCode | None, str, int]:
    """Open one ADS stream; (status it ended with or None, details, resources received before that)."""
    request = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names)
    request.node.id = node_id
    request.node.metadata.update(metadata)
    received = 0
    with grpc.insecure_channel(address) as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        try:
            for response in stub.StreamAggregatedResources(iter([request]), timeout=15,
                                                           metadata=(("authorization", f"Bearer {token}"),)):
                received += len(response.resources)
                return None, "", received
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or "", received
    return None, "", received


def wait_for(what: str, check: Any, *, timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, ValueError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout:.0f}s (last: {last!r})")


def dump(admin: str, resource: str) -> str:
    status, body = local.http_get(f"http://{admin}/config_dump?resource={resource}", timeout=5)
    assert status == 200, body[:200]
    return body


def test_another_workloads_node_and_a_minimal_second_stream_are_refused(run: tuple[Path, RunState]) -> None:
    demo, state = run
    west = state.clusters["west"]
    xds = west.controlplane.xds
    ratings = next(w for w in west.workloads if w.service == "ratings")
    intruder = local.client_of(state, "west")
    assert ratings.node_id, ratings.name  # recorded once its sidecar started (the attack below claims it)
    assert "inbound|" in dump(ratings.sidecar_admin, "dynamic_listeners")

    # 1. the client's own valid token, ratings' node id, the client's service account: ratings' key over SDS
    claimed = ProxyInfo(kind=ProxyKind.SIDECAR, cluster=ClusterId("west"), node_id=ratings.node_id,
                        namespace=Namespace(ratings.namespace),
                        service_account=intruder.service_account).metadata()
    code, details, received = first_answer(xds, intruder.token, ratings.node_id, claimed, SECRET,
                                           ["default"])
    assert (code, received) == (grpc.StatusCode.PERMISSION_DENIED, 0), (code, details)
    assert "issued to node" in details
    # 2. ratings' own token, ratings' node id, minimal metadata, while the real sidecar is connected
    code, details, received = first_answer(xds, ratings.token, ratings.node_id,
                                           {"SERVICE_ACCOUNT": ratings.service_account}, LISTENER, [])
    assert (code, received) == (grpc.StatusCode.PERMISSION_DENIED, 0), (code, details)
    assert "other node metadata" in details

    # the next push reaches ratings' sidecar, which keeps its inbound listener, and east still reaches ratings
    (demo / "west" / "probe.yaml").write_text(PROBE_SERVICE)
    wait_for("the push with the new service reaches ratings' sidecar",
             lambda: "probe.default" in dump(ratings.sidecar_admin, "dynamic_active_clusters"))
    assert "inbound|" in dump(ratings.sidecar_admin, "dynamic_listeners")
    caller = local.client_of(state, "east")

    def reaches_ratings() -> bool:
        status, body = local.call(caller.outbound, "ratings.default.svc.clusterset.local")
        return status == 200 and json.loads(body)["cluster"] == "west"

    wait_for("east's client reaches west's ratings", reaches_ratings)
