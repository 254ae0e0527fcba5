"""meshfed status: the pure evaluation (every unhealthy condition is named and flips the exit) and the CLI's errors."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from meshfed.cli import cli
from meshfed.controlplane.status import decode_status
from meshfed.jsondoc import decode
from meshfed.rotation import RotationReport
from meshfed.runstate import RunState
from meshfed.status import (
    EXPIRY_FRACTION,
    LocalInputs,
    RemoteInputs,
    cert_health,
    evaluate_local,
    evaluate_remote,
    sections,
)
from tests.support.runstate import state_from

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"


def iso(delta: timedelta) -> str:
    return (NOW + delta).isoformat()


def cond(ctype: str, status: str, reason: str, message: str) -> dict[str, str]:
    return {"type": ctype, "status": status, "reason": reason, "message": message}


GOOD_CONDS = [cond("Valid", "True", "Valid", "ok"), cond("Conflict", "False", "NoConflicts", "agree")]


def run_state() -> RunState:
    clusters = {}
    pid = 100
    processes = [{"name": "federation", "pid": 1, "log": "/run/federation.log"}]
    for name in ("east", "west"):
        pid += 1
        processes.append({"name": f"{name}/controlplane", "pid": pid, "log": f"/run/{name}/controlplane.log"})
        clusters[name] = {
            "controlplane": {"pid": pid, "xds": f"127.0.0.1:{pid}1", "dns": f"127.0.0.1:{pid}2",
                             "admin": f"127.0.0.1:{pid}3", "log": f"/run/{name}/controlplane.log"},
            "gateway": {"address": f"127.0.0.1:{pid}4", "admin": f"127.0.0.1:{pid}5"},
            "workloads": [{"name": f"sleep-{name}", "service": "", "outbound": f"127.0.0.1:{pid}6",
                           "sidecar_admin": f"127.0.0.1:{pid}7", "app": "",
                           "spiffe_id": "spiffe://demo.meshfed.local/ns/default/sa/sleep"}],
        }
    return state_from({"run_dir": "/run", "federation": {"url": "https://127.0.0.1:4000", "pid": 1, "lease_ttl_s": 3},
                       "processes": processes, "clusters": clusters})


def cp_status(name: str) -> dict[str, Any]:
    members = [{"cluster": c, "network": f"net-{c}", "unreachable_since": None, "renewed_at": iso(timedelta(0)),
                "gateway": "x"} for c in ("east", "west")]
    services = [{"service": "reviews.default", "type": "ClusterSetIP", "exported": True, "ready": 2,
                 "conditions": copy.deepcopy(GOOD_CONDS)}]
    if name == "west":
        services.append({"service": "ratings.default", "type": "ClusterSetIP", "exported": True, "ready": 1,
                         "conditions": copy.deepcopy(GOOD_CONDS)})
    return {
        "cluster": name, "network": f"net-{name}", "region": "r", "zone": "z",
        "services": services,
        "imports": [{"service": "ratings.default", "type": "ClusterSetIP", "ips": ["127.241.0.9"],
                     "clusters": ["west"], "ports": [{"name": "http", "port": 9080}],
                     "ready_by_cluster": {"west": 1}}],
        "proxies": [{"node_id": f"sidecar~127.0.0.1~sleep-{name}.default~x", "type_url": t, "state": "synced",
                     "connected": True, "nack_error": ""} for t in (CDS, LDS)],
        "proxy_errors": {},
        "federation": {"configured": True, "connected": True, "members": members},
        "trust": {"intermediate_fingerprint": f"{name}fp", "intermediate_not_before": iso(-timedelta(days=1)),
                  "intermediate_not_after": iso(timedelta(days=364)),
                  "workload_certs": [{"spiffe_id": "spiffe://demo.meshfed.local/ns/default/sa/sleep",
                                      "not_before": iso(-timedelta(hours=1)), "not_after": iso(timedelta(hours=23))}]},
    }


def root() -> dict[str, Any]:
    return {"phase": "stable", "next_step": "nothing to do", "trust_domain": "demo.meshfed.local",
            "certificates": [{"role": "root (active)", "fingerprint": "abc", "not_before": iso(-timedelta(days=1)),
                              "not_after": iso(timedelta(days=3650))}]}


def inputs(**changes: Any) -> LocalInputs:
    state = run_state()
    base: dict[str, Any] = {
        "state": state,
        "alive": {p.pid: True for p in state.processes},
        "controlplanes": {"east": cp_status("east"), "west": cp_status("west")},
        "root": root(),
        "now": NOW,
    }
    base.update(changes)
    # The statuses are written here as the JSON a control plane serves; the evaluation reads them decoded.
    base["controlplanes"] = {name: None if st is None else decode_status(st)
                             for name, st in base["controlplanes"].items()}
    return LocalInputs(**base)


def reports(controlplanes: dict[str, Any]) -> dict[str, RotationReport | None]:
    """``rotation`` sections written as JSON, decoded."""
    return {name: None if rep is None else decode(RotationReport, rep, what=name)
            for name, rep in controlplanes.items()}


def test_healthy_run_reports_every_section_and_address() -> None:
    report = evaluate_local(inputs())
    assert report["problems"] == [] and report["healthy"] is True
    assert [c["cluster"] for c in report["clusters"]] == ["east", "west"]
    assert all(c["connected"] and c["controlplane_up"] for c in report["clusters"])
    ratings = next(s for s in report["services"] if s["service"] == "ratings.default")
    assert ratings["exported_by"] == ["west"] and ratings["clusterset_ip"] == "127.241.0.9"
    assert ratings["imported_by"] == ["east", "west"] and ratings["ready"] == {"west": 1}
    assert {p["state"] for p in report["proxies"]} == {"synced"}
    assert report["trust"]["phase"] == "stable"
    addr = report["addresses"]
    assert addr["federation"] == "https://127.0.0.1:4000"
    assert set(addr["clusters"]["east"]) >= {"xds", "dns", "admin", "gateway", "gateway_admin"}
    sleep = next(w for w in addr["workloads"] if w["workload"] == "sleep-east")
    assert "ratings.default.svc.clusterset.local" in sleep["can_call"]
    json.dumps(report)  # JSON-able as is
    titles = [t for t, _, _ in sections(report)]
    assert titles[:3] == ["Clusters", "Services", "Proxies"] and "Problems" not in titles


def test_dead_process_is_named_with_its_log() -> None:
    inp = inputs()
    alive = dict(inp.alive)
    alive[102] = False  # west/controlplane
    report = evaluate_local(inputs(alive=alive))
    assert report["healthy"] is False
    assert any("west/controlplane (pid 102) is not running" in p and "controlplane.log" in p
               for p in report["problems"])
    assert next(c for c in report["clusters"] if c["cluster"] == "west")["controlplane_up"] is False


def test_unreachable_member_and_silent_control_plane() -> None:
    east = cp_status("east")
    east["federation"]["members"][1]["unreachable_since"] = iso(-timedelta(seconds=5))
    report = evaluate_local(inputs(controlplanes={"east": east, "west": None},
                                   errors={"west": "GET http://x/status failed: refused"}))
    assert report["healthy"] is False
    west = next(c for c in report["clusters"] if c["cluster"] == "west")
    assert west["connected"] is False and west["unreachable_since"] and west["exports"] is None
    assert any(p.startswith("west: unreachable since") for p in report["problems"])
    assert any("west: control plane status unavailable" in p for p in report["problems"])


def test_the_federations_member_list_wins_over_the_control_planes_view() -> None:
    members = [{"cluster": "east", "unreachable_since": None, "renewed_at": iso(timedelta(0))},
               {"cluster": "west", "unreachable_since": iso(-timedelta(seconds=1)), "renewed_at": iso(timedelta(0))}]
    report = evaluate_local(inputs(members=members))
    assert any(p.startswith("west: unreachable since") for p in report["problems"])


def test_nack_names_the_type_and_error() -> None:
    east = cp_status("east")
    east["proxies"][1].update(state="nacked", nack_error="listener 'x': duplicate filter chain")
    report = evaluate_local(inputs(controlplanes={"east": east, "west": cp_status("west")}))
    assert report["healthy"] is False
    assert any("NACKed LDS: listener 'x': duplicate filter chain" in p for p in report["problems"])
    proxy = next(p for p in report["proxies"] if p["cluster"] == "east")
    assert proxy["state"] == "nacked"
    rows = next(r for t, _, r in sections(report) if t == "Proxies")
    assert any("LDS nacked (listener 'x'" in row[4] for row in rows)


def test_conflict_and_invalid_exports_carry_the_kep_message() -> None:
    west = cp_status("west")
    west["services"][0]["conditions"] = [cond("Valid", "True", "Valid", "ok"),
                                         cond("Conflict", "True", "PortConflict",
                                              "port 9080 differs: east has http, west has grpc")]
    west["services"][1]["conditions"] = [cond("Valid", "False", "NoService", "Service default/ratings not found")]
    report = evaluate_local(inputs(controlplanes={"east": cp_status("east"), "west": west}))
    reviews = next(s for s in report["services"] if s["service"] == "reviews.default")
    assert reviews["conflict"] == "port 9080 differs: east has http, west has grpc"
    assert any("PortConflict" in p for p in report["problems"])
    assert any("ratings.default exported from west is not valid (NoService)" in p for p in report["problems"])


def test_expiring_certificates_are_unhealthy() -> None:
    east = cp_status("east")
    # 24 h leaf with 2 h left: 8% of its lifetime
    east["trust"]["workload_certs"][0].update(not_before=iso(-timedelta(hours=22)), not_after=iso(timedelta(hours=2)))
    report = evaluate_local(inputs(controlplanes={"east": east, "west": cp_status("west")}))
    assert any("workload certificate" in p and "expiring" in p for p in report["problems"])


def test_cert_health_boundaries() -> None:
    start = iso(-timedelta(hours=90))
    assert cert_health(start, iso(timedelta(hours=10)), NOW)[0] == "ok"  # exactly 10% left is not < 10%
    assert cert_health(start, iso(timedelta(hours=9)), NOW)[0] == "expiring"
    assert cert_health(start, iso(-timedelta(seconds=1)), NOW) == ("expired", 0.0)
    assert cert_health(None, None, NOW) == ("unknown", None)
    assert EXPIRY_FRACTION == 0.10


def test_remote_report_from_a_catalog() -> None:
    inp = RemoteInputs(
        url="https://fed:443",
        members=[{"cluster": "east", "renewed_at": iso(-timedelta(seconds=2)), "unreachable_since": None},
                 {"cluster": "west", "renewed_at": iso(-timedelta(seconds=60)),
                  "unreachable_since": iso(-timedelta(seconds=50))}],
        services=[{"service": "reviews.default", "type": "ClusterSetIP", "ips": ["241.0.0.1"],
                   "clusters": ["east"], "ports": [{"name": "http", "port": 9080}],
                   "ready_by_cluster": {"east": 2},
                   "conditions": [["east", cond("Conflict", "True", "TypeConflict", "east says Headless")]]}],
        roots=[{"fingerprint": "r1", "not_before": iso(-timedelta(days=1)), "not_after": iso(timedelta(days=9))}],
        revision=7, now=NOW)
    report = evaluate_remote(inp)
    assert report["healthy"] is False
    assert report["clusters"][0]["lease_age_s"] == 2.0 and report["clusters"][0]["exports"] == 1
    assert any(p.startswith("west: unreachable since") for p in report["problems"])
    assert any("TypeConflict" in p for p in report["problems"])
    assert report["trust"]["roots"][0]["health"] == "ok"


def test_cli_without_a_run_exits_2_with_what_to_do(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["status", "--run-dir", str(tmp_path / "none")])
    assert result.exit_code == 2
    assert "meshfed up" in result.output


def test_cli_federation_needs_credentials() -> None:
    result = CliRunner().invoke(cli, ["status", "--federation", "https://127.0.0.1:1"])
    assert result.exit_code == 2
    assert "--cert" in result.output


def test_failing_heartbeats_are_a_problem_naming_the_certificate_error() -> None:
    """Issue 18: heartbeats failed with 401 for ~15 s while status still exited 0 (the lease had not run out)."""
    east = cp_status("east")
    error = ("heartbeat: HTTP 401: client certificate does not identify a member cluster: intermediate "
             "'CN=east' does not chain to any root of the demo.meshfed.local bundle (abc)")
    east["federation"].update(heartbeat_error=error, heartbeat_failing_since=iso(-timedelta(seconds=1)))
    report = evaluate_local(inputs(controlplanes={"east": east, "west": cp_status("west")}))
    assert report["healthy"] is False
    assert any(p.startswith("east: heartbeats to the federation failing since") and "does not chain" in p
               for p in report["problems"])


def _rotation_root() -> dict[str, Any]:
    certs = [{"role": "root (old)", "fingerprint": "old" * 5, "not_before": iso(-timedelta(days=1)),
              "not_after": iso(timedelta(days=3650))},
             {"role": "root (active)", "fingerprint": "new" * 5, "not_before": iso(-timedelta(hours=1)),
              "not_after": iso(timedelta(days=3650))}]
    return {**root(), "phase": "leaves-rolling", "certificates": certs}


def _rotation_report(leaf_root: str, *, acked: bool = True) -> dict[str, Any]:
    new = "new" * 5
    return {"intermediate": {"fingerprint": "i", "root_fingerprint": new}, "bundle_fingerprints": ["old" * 5, new],
            "federation_client": {"leaf_fingerprint": "l", "root_fingerprint": new},
            "xds_serving": {"leaf_fingerprint": "x", "root_fingerprint": new},
            "proxies": [{"node_id": "sidecar~a", "state": "acked" if acked else "pending",
                         "leaf_fingerprint": "p", "leaf_root": leaf_root, "bundle_roots": ["old" * 5, new]}]}


def test_rotation_convergence_is_shown_and_is_progress_not_a_problem() -> None:
    new, old = "new" * 5, "old" * 5
    east, west = cp_status("east"), cp_status("west")
    east["rotation"], west["rotation"] = _rotation_report(old), _rotation_report(new)
    fed = {"bundleFingerprints": [old, new], "serving": {"root_fingerprint": new},
           "connections": [{"cluster": "east", "root_fingerprint": new}, {"cluster": "west", "root_fingerprint": new}]}
    report = evaluate_local(inputs(controlplanes={"east": east, "west": west}, root=_rotation_root(),
                                   federation_trust=fed))
    rot = report["trust"]["rotation"]
    assert rot["done"] is False and rot["proxies_total"] == 2 and rot["proxies_old"] == 1
    assert "1 of 2 proxies still hold leaves from the old root" in rot["lines"]
    assert "federation serving cert renewed" in rot["lines"]
    assert any("east: proxy sidecar~a holds a leaf from root oldoldoldoldold" in b for b in rot["blocking"])
    assert report["healthy"] is True  # a rotation in progress is not unhealthy
    assert any(t.startswith("Rotation convergence (not converged)") for t, _, _ in sections(report))
    east["rotation"] = _rotation_report(new)
    report = evaluate_local(inputs(controlplanes={"east": east, "west": west}, root=_rotation_root(),
                                   federation_trust=fed))
    assert report["trust"]["rotation"]["done"] is True


def test_rotation_blocks_on_what_cannot_be_seen() -> None:
    """Unknown is not moved: a pending proxy, a silent control plane, an old-root federation connection."""
    from meshfed.rotation import SystemReports, evaluate

    new, old = "new" * 5, "old" * 5
    fed = {"bundleFingerprints": [old, new], "serving": {"root_fingerprint": old},
           "connections": [{"cluster": "west", "root_fingerprint": old, "since": "t"}]}
    conv = evaluate(_rotation_root(), SystemReports(
        controlplanes=reports({"east": _rotation_report(new, acked=False), "west": None}), federation=fed,
        errors={"west": "refused"}))
    text = "\n".join(conv.blocking)
    assert not conv.done
    assert "east: proxy sidecar~a has not ACKed its current certificates" in text
    assert "west: control plane did not report its certificates (refused)" in text
    assert "federation: its serving certificate chains to root oldoldoldoldold" in text
    assert "a connection of west authenticated with a certificate from root oldoldoldoldold" in text
    assert not evaluate(_rotation_root(), SystemReports(controlplanes={}, federation=None)).done
    # A member nobody asked about is unknown, hence not moved.
    fine = {"bundleFingerprints": [old, new], "serving": {"root_fingerprint": new}, "connections": [],
            "members": ["east", "west"]}
    conv = evaluate(_rotation_root(), SystemReports(controlplanes=reports({"east": _rotation_report(new)}),
                                                    federation=fine))
    assert conv.blocking == ("west: a member of the federation whose control plane was not asked "
                             "(--controlplane west=ADMIN_ADDRESS)",)
    stable = evaluate(root(), SystemReports(controlplanes={}, federation=None))
    assert not stable.in_rotation and not stable.done


def test_reissue_waits_until_everything_trusts_the_next_root() -> None:
    """In root-added, the next root must be in every bundle before it signs: a proxy still validating with the
    old bundle would refuse the first re-issued leaf it sees."""
    from meshfed.rotation import SystemReports, evaluate

    old, new = "old" * 5, "new" * 5
    added = {**root(), "phase": "root-added", "certificates": [
        {"role": "root (active)", "fingerprint": old}, {"role": "root (next)", "fingerprint": new}]}
    behind = {**_rotation_report(old), "bundle_fingerprints": [old, new]}
    behind["proxies"][0]["bundle_roots"] = [old]
    fed = {"bundleFingerprints": [old, new], "serving": {"root_fingerprint": old}, "connections": []}
    conv = evaluate(added, SystemReports(controlplanes=reports({"east": behind}), federation=fed))
    assert not conv.done and conv.blocking == ("east: proxy sidecar~a does not trust the new root yet",)
    behind["proxies"][0]["bundle_roots"] = [old, new]
    conv = evaluate(added, SystemReports(controlplanes=reports({"east": behind}), federation=fed))
    assert conv.done and conv.summary == ("1 of 1 proxies trust the new root", "federation trusts the new root")


def test_manifest_problems_of_a_control_plane_are_shown_and_unhealthy() -> None:
    """Issue 10 item 5: a malformed YAML, a port out of range and an unknown policy field each reach the report."""
    east = cp_status("east")
    east["manifest_problems"] = [
        {"file": "clusters/demo/east/bad.yaml", "document": 0, "field": "", "message": "not valid YAML: mapping",
         "severity": "error"},
        {"file": "clusters/demo/east/reviews.yaml", "document": 2, "field": "spec.ports[0].port",
         "message": "must be an integer port 1..65535, got 70000", "severity": "error"},
        {"file": "clusters/demo/east/authz.yaml", "document": 1, "field": "spec.rulez",
         "message": "unknown field", "severity": "error"},
        {"file": "", "document": 0, "field": "", "message": "route to undefined subset v9", "severity": "warning"},
    ]
    report = evaluate_local(inputs(controlplanes={"east": east, "west": cp_status("west")}))
    assert report["healthy"] is False
    mine = [p for p in report["problems"] if p.startswith("east: manifest")]
    assert len(mine) == 4
    assert "reviews.yaml: document 2: spec.ports[0].port: must be an integer port 1..65535, got 70000" in mine[1]
    assert "spec.rulez: unknown field" in mine[2] and "(warning)" in mine[3]
    problems = next(r for t, _, r in sections(report) if t == "Problems")
    assert len(problems) == 4


def test_a_member_the_run_did_not_start_is_listed_and_judged_by_its_lease() -> None:
    """Issue 18 walk item 3: a cluster added by hand shows up; once its lease lapses the run is unhealthy."""
    members = [{"cluster": c, "unreachable_since": None, "renewed_at": iso(timedelta(0)), "network": f"net-{c}",
                "gateway": "127.0.0.1:1"} for c in ("east", "west", "north")]
    report = evaluate_local(inputs(members=members))
    assert report["healthy"] is True, report["problems"]
    north = next(c for c in report["clusters"] if c["cluster"] == "north")
    assert north["connected"] and north["in_run"] is False and north["network"] == "net-north"
    row = next(r for t, _, rows in sections(report) if t == "Clusters" for r in rows if r[0] == "north")
    assert row[-1] == "- (not in this run)"
    members[2]["unreachable_since"] = iso(-timedelta(seconds=3))
    report = evaluate_local(inputs(members=members))
    assert report["healthy"] is False
    assert any(p.startswith("north: unreachable since") and "meshfed federation remove north" in p
               for p in report["problems"])


def test_a_traffic_pair_failing_in_the_window_is_unhealthy() -> None:
    """Issue 18 walk item 5: 14 % errors leave the exit code non-zero; an old outage (totals only) does not."""
    row = {"source_cluster": "east", "destination_cluster": "west", "requests": 100, "errors": 14,
           "error_rate": 0.14, "rps": 7.0, "window_error_rate": 0.14, "window_s": 1.0}
    report = evaluate_local(inputs(traffic=[row]))
    assert report["healthy"] is False
    assert any(p.startswith("traffic east -> west: 14.0% of calls failed") for p in report["problems"])
    calm = {**row, "window_error_rate": 0.0}
    assert evaluate_local(inputs(traffic=[calm]))["healthy"] is True
    idle = {**row, "window_error_rate": None, "rps": 0.0}
    assert evaluate_local(inputs(traffic=[idle]))["healthy"] is True


def test_the_workloads_header_names_both_kinds_of_names() -> None:
    """Issue 18 walk item 5: the header promised clusterset.local names but listed cluster.local ones."""
    east = cp_status("east")
    east["services"].append({"service": "details.default", "type": "ClusterSetIP", "exported": False, "ready": 1,
                             "conditions": []})
    report = evaluate_local(inputs(controlplanes={"east": east, "west": cp_status("west")}))
    _, columns, rows = next(s for s in sections(report) if s[0] == "Workloads")
    sleep = next(r for r in rows if r[1] == "sleep-east")
    assert "details.default (local)" in sleep[5] and "ratings.default" in sleep[5]
    assert "svc.clusterset.local" in columns[5] and "(local): NAME.NS.svc.cluster.local" in columns[5]


def test_cli_after_down_says_the_run_was_stopped(tmp_path: Path) -> None:
    """Issue 18 walk item 5: after 'meshfed down' status says so (exit 2), not a list of dead processes."""
    from tests.meshfed.test_down import stopped_run

    run_dir = stopped_run(tmp_path)
    result = CliRunner().invoke(cli, ["status", "--run-dir", str(run_dir)])
    assert result.exit_code == 2, result.output
    assert "was stopped ('meshfed down' at" in result.output and "problem" not in result.output
