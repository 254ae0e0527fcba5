"""The control plane hands its own cluster's VirtualServices and DestinationRules to the generators, reports policy
problems in its status, and keeps the last good policy when a manifest breaks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from discovery.clusterset import OutboundTrafficMode, load_clusterset
from discovery.model import ClusterId, ServiceKey
from meshfed.controlplane import ControlPlane, ControlPlaneConfig, Listen

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
    config = ControlPlaneConfig(
        clusterset=load_clusterset(demo), cluster=EAST, ca_dir=east_ca, federation_urls=(),
        xds=Listen("127.0.0.1", 0), dns=Listen("127.0.0.1", 0), admin=Listen("127.0.0.1", 0),
        gateway_host="127.0.0.1", gateway_port=15443, tokens_file=tmp_path / "tokens.json", manifest_poll_s=0.1)
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
    (demo / "east" / "authorizationpolicy-db.yaml").write_text(DB_POLICY)
    cs_file = demo / "clusterset.yaml"
    cs_file.write_text(cs_file.read_text() + "outboundTrafficPolicy:\n  mode: REGISTRY_ONLY\n")
    config = ControlPlaneConfig(
        clusterset=load_clusterset(demo), cluster=EAST, ca_dir=east_ca, federation_urls=(),
        xds=Listen("127.0.0.1", 0), dns=Listen("127.0.0.1", 0), admin=Listen("127.0.0.1", 0),
        gateway_host="127.0.0.1", gateway_port=15443, tokens_file=tmp_path / "tokens.json", manifest_poll_s=0.1)
    async with ControlPlane(config) as cp:
        assert cp.push_context().outbound_mode is OutboundTrafficMode.REGISTRY_ONLY
        [problem] = cp.status().manifest_problems
        assert problem.severity == "warning"
        assert "AuthorizationPolicy default/db-paths: spec.rules[0].to[0].operation.paths is HTTP-only" in \
            problem.message
        assert "db.default:5432 (tcp)" in problem.message
