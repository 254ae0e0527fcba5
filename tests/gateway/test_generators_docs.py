"""docs/envoy-config.md shows the configuration our generators really produce: its generated blocks must equal
what the generators emit for the documented example mesh. Regenerate them with ``MESHFED_UPDATE_DOCS=1``."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format

from discovery.model import namespace
from gateway import generators as g
from gateway.context import InboundPort, ProxyInfo, ProxyKind, PushContext, WorkloadCert
from tests.gateway.mesh_fixtures import EAST, RATINGS, REVIEWS, TD, WEST, Mesh

DOC = Path(__file__).resolve().parents[2] / "docs" / "envoy-config.md"
KIND_NAMES = {g.LISTENER_TYPE: "listeners", g.ROUTE_TYPE: "routes", g.CLUSTER_TYPE: "clusters",
              g.ENDPOINT_TYPE: "endpoints", g.SECRET_TYPE: "secrets"}


def example() -> dict[str, str]:
    """The documented example: reviews in east calls ratings, which both clusters export (west has 2 pods)."""
    mesh = Mesh(east_gateway_port=15443, west_gateway_port=15443,
                gateway_hosts={EAST: "192.0.2.10", WEST: "198.51.100.20"})  # documentation addresses, never dialled
    mesh.pods[(EAST, REVIEWS)] = [("10.1.0.7", 15006)]
    mesh.pods[(EAST, RATINGS)] = [("10.1.0.8", 15006)]
    mesh.pods[(WEST, RATINGS)] = [("10.2.0.5", 15006), ("10.2.0.6", 15006)]
    mesh.exports[EAST] = {RATINGS}
    mesh.exports[WEST] = {RATINGS}
    cert = WorkloadCert(key_pem="<private key PEM>", chain_pem="<leaf PEM><intermediate PEM>")
    east = PushContext(registry=mesh.registry(EAST), trust_domain=TD, trust_bundle_pem="<trust bundle PEM>",
                       workload_certs={f"spiffe://{TD}/ns/default/sa/reviews": cert})
    west = PushContext(registry=mesh.registry(WEST), trust_domain=TD)
    sidecar = ProxyInfo(kind=ProxyKind.SIDECAR, cluster=EAST, namespace=namespace("default"),
                        node_id="sidecar~10.1.0.7~reviews-1.default~default.svc.cluster.local",
                        service_account="reviews", services=(REVIEWS,), inbound=(InboundPort(15006, 9080, "http"),),
                        outbound_port=15001, ip="10.1.0.7")
    gateway = ProxyInfo(kind=ProxyKind.GATEWAY, cluster=WEST, namespace=namespace("meshfed"),
                        node_id="router~198.51.100.20~eastwest-1.meshfed~meshfed.svc.cluster.local",
                        service_account="eastwest", gateway_port=15443, ip="0.0.0.0")
    return {"gateway": render(g.generate_all(gateway, west)), "sidecar": render(g.generate_all(sidecar, east))}


def _stable(value: Any, *, in_struct: bool = False) -> Any:
    """Sort the keys of protobuf Struct values (their JSON order is not stable); keep field order elsewhere."""
    if isinstance(value, dict):
        items = sorted(value.items()) if in_struct else value.items()
        return {k: _stable(v, in_struct=in_struct or k in ("filter_metadata", "json_format")) for k, v in items}
    if isinstance(value, list):
        return [_stable(v, in_struct=in_struct) for v in value]
    return value


def render(resources: dict[str, dict[str, Any]]) -> str:
    doc = {KIND_NAMES[t]: [_stable(json.loads(json_format.MessageToJson(m, preserving_proto_field_name=True)))
                           for _, m in sorted(by_name.items())]
           for t, by_name in resources.items() if by_name}
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=110)


def _block(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- BEGIN generated: {name} -->\n```yaml\n)(.*?)(```\n<!-- END generated: {name} -->)",
                      re.S)


def test_docs_show_the_generated_configuration() -> None:
    text = DOC.read_text()
    blocks = example()
    if os.environ.get("MESHFED_UPDATE_DOCS") == "1":
        for name, body in blocks.items():
            text = _block(name).sub(lambda m, b=body: m.group(1) + b + m.group(3), text)
        DOC.write_text(text)
    for name, body in blocks.items():
        found = _block(name).search(text)
        assert found is not None, f"{DOC}: no generated block {name!r}"
        assert found.group(2) == body, f"{DOC}: block {name!r} is stale; rerun with MESHFED_UPDATE_DOCS=1"
