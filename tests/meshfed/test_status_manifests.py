"""Issue 10 item 5, from the control plane to ``meshfed status``: a malformed YAML, a port 70000 and an unknown
AuthorizationPolicy field in east's manifests each reach the status report (they were on /status but status
printed none and exited 0)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

from discovery.clusterset import load_clusterset
from discovery.model import cluster_id
from meshfed.controlplane import ControlPlane, ControlPlaneConfig, Listen
from meshfed.controlplane.status import decode_status
from meshfed.local import http_get
from meshfed.status import LocalInputs, evaluate_local
from tests.support.runstate import state_from

BAD = {
    "broken.yaml": "apiVersion: v1\nkind: Service\nmetadata: {name: broken\n",
    "port.yaml": ("apiVersion: v1\nkind: Service\nmetadata: {name: big, namespace: default}\n"
                  "spec:\n  ports: [{name: http, port: 70000}]\n"),
    "authz.yaml": ("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
                   "metadata: {name: typo, namespace: default}\nspec:\n  action: ALLOW\n  rulez: []\n"),
    "ghost.yaml": ("apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\n"
                   "metadata: {name: ghost, namespace: default, creationTimestamp: \"2026-01-01T00:00:00Z\"}\n"),
}


async def test_every_manifest_problem_of_a_control_plane_reaches_status(demo: Path, east_ca: Path,
                                                                       tmp_path: Path) -> None:
    for name, text in BAD.items():
        (demo / "east" / name).write_text(text)
    config = ControlPlaneConfig(
        clusterset=load_clusterset(demo), cluster=cluster_id("east"), ca_dir=east_ca, federation_urls=(),
        xds=Listen("127.0.0.1", 0), dns=Listen("127.0.0.1", 0), admin=Listen("127.0.0.1", 0),
        gateway_host="127.0.0.1", gateway_port=15443, tokens_file=tmp_path / "tokens.json")
    async with ControlPlane(config) as cp:
        code, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{cp.admin_port}/status")
    assert code == 200
    st = decode_status(json.loads(body))  # as meshfed status reads it
    addr = "127.0.0.1:1"
    state = {"clusters": {"east": {"controlplane": {"pid": 1, "admin": addr, "xds": addr, "dns": addr},
                                   "gateway": {"address": addr, "admin": addr}, "workloads": []}},
             "processes": [{"name": "east/controlplane", "pid": 1, "log": "x"}]}
    report = evaluate_local(LocalInputs(state=state_from(state), alive={1: True}, controlplanes={"east": st},
                                        members=[{"cluster": "east", "renewed_at": datetime.now(UTC).isoformat()}]))
    assert any("ghost.default" in p and "NoService" in p for p in report["problems"]), report["problems"]
    mine = [p for p in report["problems"] if p.startswith("east: manifest")]
    for name in BAD:
        if name == "ghost.yaml":  # a valid manifest: the export of a missing Service, reported as NoService
            continue
        assert any(name in p for p in mine), (name, mine)
    assert any("70000" in p for p in mine) and any("rulez" in p for p in mine), mine
    assert report["healthy"] is False
