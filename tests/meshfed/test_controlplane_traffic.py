"""The control plane hands its own cluster's VirtualServices and DestinationRules to the generators, reports policy
problems in its status, and keeps the last good policy when a manifest breaks."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from envoy.config.listener.v3 import listener_pb2

from discovery.clusterset import OutboundTrafficMode, load_clusterset
from discovery.model import ClusterId, ServiceKey
from gateway.auth import make_node_id
from gateway.context import CaptureMode, ProxyInfo, ProxyKind
from gateway.generators import LISTENER_TYPE, capture
from meshfed.controlplane import ControlPlane, ControlPlaneConfig, Listen
from meshfed.local import write_private
from tests.gateway.xds_client import SotwClient

EAST = ClusterId("east")
REVIEWS = ServiceKey.parse("reviews.default")

BROKEN = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
    - route:
        - destination: {host: reviews, subset: east}
      mirror: {host: reviews}
"""

UNDEFINED_SUBSET = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
    - route:
        - destination: {host: reviews, subset: canary}
"""


def east_config(demo: Path, east_ca: Path, tmp_path: Path) -> ControlPlaneConfig:
    """East's control plane on the demo copy, unfederated, every port free, manifests polled every 100 ms."""
    return ControlPlaneConfig(
        clusterset=load_clusterset(demo), cluster=EAST, ca_dir=east_ca, federation_urls=(),
        xds=Listen("127.0.0.1", 0), dns=Listen("127.0.0.1", 0), admin=Listen("127.0.0.1", 0),
        gateway_host="127.0.0.1", gateway_port=15443, tokens_file=tmp_path / "tokens.json", manifest_poll_s=0.1)


async def _until(check: Callable[[], bool], *, within: float = 20.0) -> None:
    """Poll ``check`` every 100 ms, at most ``within`` seconds (the control plane polls manifests every 100 ms)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return
        await asyncio.sleep(0.1)
    raise TimeoutError("condition not met")


async def test_control_plane_applies_its_own_policies_and_reports_bad_ones(demo: Path, east_ca: Path,
                                                                           tmp_path: Path) -> None:
    config = east_config(demo, east_ca, tmp_path)
    async with ControlPlane(config) as cp:
        policies = cp.push_context().policies
        rule, route = policies.destination_rule(REVIEWS), policies.virtual_service(REVIEWS)
        assert rule is not None and [s.name for s in rule.subsets] == ["east", "west"]
        assert route is not None and [w.weight for w in route.http[0].route] == [90, 10]
        assert cp.status().manifest_problems == ()

        # An unsupported field: the file is rejected with the field's path, the last good VirtualService stays.
        vs_file = demo / "east" / "virtualservice-reviews.yaml"
        vs_file.write_text(BROKEN)
        await _until(lambda: any(p.field == "spec.http[0].mirror" for p in cp.status().manifest_problems))
        assert cp.push_context().policies.virtual_service(REVIEWS) == route

        # A route to a subset no DestinationRule defines is accepted, and reported as a warning.
        vs_file.write_text(UNDEFINED_SUBSET)
        await _until(lambda: any("'canary'" in p.message for p in cp.status().manifest_problems))
        [problem] = cp.status().manifest_problems
        assert problem.severity == "warning" and "503" in problem.message
        current = cp.push_context().policies.virtual_service(REVIEWS)
        assert current is not None and current.http[0].route[0].destination.subset == "canary"

        # Deleting the files removes the policies: the defaults apply again.
        vs_file.unlink()
        (demo / "east" / "destinationrule-reviews.yaml").unlink()
        await _until(lambda: not cp.push_context().policies)


DB_POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-paths, namespace: default}
spec:
  selector: {matchLabels: {app: db}}
  action: ALLOW
  rules:
    - to: [{operation: {paths: [/admin]}}]
"""


async def test_http_only_policy_fields_on_a_tcp_port_are_reported_and_the_outbound_policy_is_applied(
        demo: Path, east_ca: Path, tmp_path: Path) -> None:
    """The running control plane reports HTTP-only fields on TCP ports, and serves a capture-mode sidecar (node
    metadata MESHFED_CAPTURE=redirect, authenticated by its token) the virtual listeners, with the clusterset's
    REGISTRY_ONLY policy on the default chain and a chain for the ClusterSetIP east allocated to its export."""
    (demo / "east" / "authorizationpolicy-db.yaml").write_text(DB_POLICY)
    cs_file = demo / "clusterset.yaml"
    cs_file.write_text(cs_file.read_text() + "outboundTrafficPolicy:\n  mode: REGISTRY_ONLY\n")
    token = "c" * 24
    node = make_node_id(kind="sidecar", ip="127.0.0.1", pod="sleep-0", namespace="default")
    write_private(tmp_path / "tokens.json", json.dumps(
        {token: {"namespace": "default", "service_account": "sleep", "cluster": "east", "node_id": node}}))
    config = east_config(demo, east_ca, tmp_path)
    meta = ProxyInfo(kind=ProxyKind.SIDECAR, cluster=EAST, node_id=node, namespace=REVIEWS.namespace,
                     service_account="sleep", capture=CaptureMode.REDIRECT).metadata()
    async with ControlPlane(config) as cp:
        assert cp.push_context().outbound_mode is OutboundTrafficMode.REGISTRY_ONLY
        [problem] = cp.status().manifest_problems
        assert problem.severity == "warning"
        assert "AuthorizationPolicy default/db-paths: spec.rules[0].to[0].operation.paths is HTTP-only" in \
            problem.message
        assert "db.default:5432 (tcp)" in problem.message

        reviews_ip = cp.registry.imports[REVIEWS].ips[0]
        assert cp.ads is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{cp.ads.port}") as channel:
            client = SotwClient(channel, node, token, **meta)
            await client.request(LISTENER_TYPE)
            resp = await asyncio.wait_for(client.recv(), 10)
    listeners = {}
    for any_ in resp.resources:
        listener = listener_pb2.Listener()
        any_.Unpack(listener)
        listeners[listener.name] = listener
    assert set(listeners) == {capture.VIRTUAL_OUTBOUND}  # sleep serves no port: no virtualInbound
    out = listeners[capture.VIRTUAL_OUTBOUND]
    assert out.default_filter_chain.name == capture.BLACKHOLE_CLUSTER
    http = next(c for c in out.filter_chains if c.name == "http:9080")
    assert reviews_ip in {p.address_prefix for p in http.filter_chain_match.prefix_ranges}
