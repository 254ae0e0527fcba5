"""meshfed diagnose: each hop's verdict from evidence (pure), the first failure, and the certificate check against
real CA directories (a foreign root's intermediate is refused)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from federation.trust.spiffe import SpiffeId, TrustDomain
from federation.trust.store import init_root, issue_intermediate
from meshfed import diagnose
from meshfed.cli import cli
from meshfed.controlplane.status import decode_status
from meshfed.diagnose import FAIL, OK, SKIPPED, Evidence, chain_error, evaluate, parse_service, report
from meshfed.runstate import WorkloadState

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
HOST = "ratings.default.svc.clusterset.local"
NODE = "sidecar~127.0.0.1~sleep-east.default~default.svc.cluster.local"
SNI = f"outbound_.9080_._.{HOST}"
TYPES = ["Cluster", "ClusterLoadAssignment", "Listener", "RouteConfiguration", "Secret"]


def status(name: str) -> dict[str, Any]:
    st: dict[str, Any] = {"services": [], "imports": [], "proxies": [], "federation": {"connected": True},
                          "trust": {"intermediate_fingerprint": f"{name}fp"}}
    if name == "west":
        st["services"] = [{"service": "ratings.default", "exported": True, "conditions": [
            {"type": "Valid", "status": "True", "reason": "Valid", "message": "ok"},
            {"type": "Conflict", "status": "False", "reason": "NoConflicts", "message": "agree"}]}]
    else:
        st["imports"] = [{"service": "ratings.default", "type": "ClusterSetIP", "ips": ["127.241.0.9"],
                          "clusters": ["west"], "ports": [{"name": "http", "port": 9080}],
                          "ready_by_cluster": {"west": 1}}]
        st["proxies"] = [{"node_id": NODE, "type_url": f"type.googleapis.com/x.{t}", "state": "synced"}
                         for t in TYPES]
    return st


def client(**changes: Any) -> WorkloadState:
    """The caller's client workload as the run's state records it."""
    base = WorkloadState(name="sleep-east", cluster="east", namespace="default", service="", service_account="sleep",
                         address="127.0.0.10", token="t", port_name="http", service_port=9080,
                         spiffe_id="spiffe://mesh.local/ns/default/sa/sleep", node_id=NODE, outbound="127.0.0.1:5000")
    return replace(base, **changes)


def evidence(**changes: Any) -> Evidence:
    base: dict[str, Any] = {
        "service": "ratings.default", "caller": "east",
        "statuses": {"east": status("east"), "west": status("west")},
        "client": client(),
        "gateways": {"west": {"configs": [{"dynamic_listeners": [{"active_state": {"listener": {"filter_chains": [
            {"filter_chain_match": {"server_names": [SNI]}}]}}}]}]}},
        "dns_answer": ["127.241.0.9"],
        "sidecar_config": {"configs": [{"dynamic_route_configs": [{"route_config": {"virtual_hosts": [
            {"domains": [HOST, "ratings"]}]}}]}]},
        "sidecar_clusters": f"outbound|9080||{HOST}::127.0.0.1:7000::health_flags::healthy\n",
        "sidecar_certs": {"certificates": [{"cert_chain": [{"expiration_time": "2026-11-27T00:00:00Z"}]}]},
        "chain_errors": {"east": "", "west": ""},
        "disk_fingerprints": {"east": "eastfp", "west": "westfp"},
        "request": (200, json.dumps({"workload": "ratings-west-0", "cluster": "west", "caller": "spiffe://x"})),
        "now": NOW,
    }
    base.update(changes)
    # The statuses are written here as the JSON a control plane serves; the hops read them decoded.
    base["statuses"] = {name: None if st is None else decode_status(st) for name, st in base["statuses"].items()}
    return Evidence(**base)


def verdicts(ev: Evidence) -> dict[str, str]:
    return {h.name: h.status for h in evaluate(ev)}


def first(ev: Evidence) -> str | None:
    failure = report(ev, evaluate(ev))["first_failure"]
    return None if failure is None else str(failure["name"])


def test_a_healthy_path_is_all_ok_with_the_policy_hook_skipped() -> None:
    ev = evidence()
    assert verdicts(ev) == {"export": OK, "import": OK, "dns": OK, "xds": OK, "gateway": OK, "endpoints": OK,
                            "certificates": OK, "policy": SKIPPED, "request": OK}
    result = report(ev, evaluate(ev))
    assert result["ok"] is True and result["first_failure"] is None
    assert [h["hop"] for h in result["hops"]] == list(range(1, 10))


def test_conflicting_export_is_hop_1() -> None:
    west = status("west")
    west["services"][0]["conditions"][1] = {"type": "Conflict", "status": "True", "reason": "PortConflict",
                                            "message": "ports differ"}
    ev = evidence(statuses={"east": status("east"), "west": west})
    assert first(ev) == "export"
    assert "PortConflict" in evaluate(ev)[0].detail


def test_missing_import_is_hop_2_and_later_hops_say_why() -> None:
    east = status("east")
    east["imports"] = []
    ev = evidence(statuses={"east": east, "west": status("west")}, dns_answer=[])
    assert first(ev) == "import"
    assert verdicts(ev)["dns"] == SKIPPED and verdicts(ev)["endpoints"] == SKIPPED


def test_dns_answer_must_be_the_clusterset_ip() -> None:
    assert first(evidence(dns_answer=["127.241.0.1"])) == "dns"
    ev = evidence(dns_answer=None, dns_error="Timeout")
    assert first(ev) == "dns" and "Timeout" in evaluate(ev)[2].detail


def test_nack_or_missing_route_is_hop_4() -> None:
    east = status("east")
    east["proxies"][2].update(state="nacked", nack_error="bad listener")
    ev = evidence(statuses={"east": east, "west": status("west")})
    assert first(ev) == "xds" and "Listener: bad listener" in evaluate(ev)[3].detail
    no_route = evidence(sidecar_config={"configs": []})
    assert first(no_route) == "xds" and "no route" in evaluate(no_route)[3].detail
    no_stream = evidence(client=client(node_id="other", outbound="x"))
    assert first(no_stream) == "xds"


def test_missing_sni_chain_on_the_remote_gateway_is_hop_5() -> None:
    ev = evidence(gateways={"west": {"configs": []}})
    assert first(ev) == "gateway" and SNI in evaluate(ev)[4].detail
    down = evidence(gateways={"west": None}, gateway_errors={"west": "connection refused"})
    assert first(down) == "gateway" and "connection refused" in evaluate(down)[4].detail


def test_gateway_hop_reads_a_filtered_listener_dump_too() -> None:
    flat = {"configs": [{"active_state": {"listener": {"filter_chains": [
        {"filter_chain_match": {"server_names": [SNI]}}]}}}]}
    assert verdicts(evidence(gateways={"west": flat}))["gateway"] == OK


def test_no_ready_or_healthy_endpoint_is_hop_6() -> None:
    east = status("east")
    east["imports"][0]["ready_by_cluster"] = {"west": 0}
    assert first(evidence(statuses={"east": east, "west": status("west")})) == "endpoints"
    unhealthy = evidence(sidecar_clusters=f"outbound|9080||{HOST}::127.0.0.1:7000::health_flags::/failed_active_hc")
    assert first(unhealthy) == "endpoints"
    assert "/failed_active_hc" in evaluate(unhealthy)[5].detail


def test_certificate_problems_are_hop_7() -> None:
    ev = evidence(chain_errors={"east": "", "west": "intermediate does not chain to any root"})
    assert first(ev) == "certificates" and "west: intermediate does not chain" in evaluate(ev)[6].detail
    stale = evidence(disk_fingerprints={"east": "eastfp", "west": "newfp"})
    assert first(stale) == "certificates" and "restart" in evaluate(stale)[6].detail
    # Issue 18: heartbeats refused for a certificate reason while diagnose said ok.
    east = status("east")
    east["federation"]["heartbeat_error"] = "HTTP 401: client certificate does not identify a member cluster"
    refused = evidence(statuses={"east": east, "west": status("west")})
    assert first(refused) == "certificates"
    assert "east: its heartbeats to the federation are failing: HTTP 401" in evaluate(refused)[6].detail
    expired = evidence(sidecar_certs={"certificates": [{"cert_chain": [
        {"expiration_time": "2026-11-26T11:00:00Z", "subject_alt_names": [{"uri": "spiffe://x/sleep"}]}]}]})
    assert first(expired) == "certificates" and "spiffe://x/sleep expired" in evaluate(expired)[6].detail


def test_policy_hook_can_be_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    def deny(ev: Evidence) -> diagnose.Hop:
        return diagnose.Hop(8, "policy", FAIL, "denied by test policy")

    monkeypatch.setattr(diagnose, "POLICY_CHECK", deny)
    assert first(evidence()) == "policy"


def test_failed_request_is_hop_9() -> None:
    ev = evidence(request=(503, "no healthy upstream"))
    assert first(ev) == "request" and "HTTP 503" in evaluate(ev)[8].detail
    assert first(evidence(request=None, request_error="ConnectionRefusedError")) == "request"


def test_first_failure_is_the_lowest_hop() -> None:
    ev = dataclasses.replace(evidence(dns_answer=["1.2.3.4"]), request=(503, "x"))
    assert first(ev) == "dns"


def test_parse_service() -> None:
    assert parse_service("ratings.default") == "ratings.default"
    assert parse_service("ratings.default.svc.clusterset.local") == "ratings.default"
    with pytest.raises(diagnose.DiagnoseError, match="one peer 'other' exported to this clusterset"):
        parse_service("ratings.default.svc.other.clusterset.local")
    with pytest.raises(diagnose.DiagnoseError, match=r"NAME\.NAMESPACE"):
        parse_service("ratings")


def test_chain_check_against_real_ca_directories(tmp_path: Path) -> None:
    td = TrustDomain.parse("demo.meshfed.local")
    init_root(tmp_path / "root", td)
    issue_intermediate(tmp_path / "root", SpiffeId.cluster(td, "west"), tmp_path / "west")
    err, fp = chain_error(tmp_path / "west", "west", tmp_path / "root")
    assert err == "" and len(fp) == 64
    # an intermediate of the same name from a foreign root
    init_root(tmp_path / "foreign", td)
    issue_intermediate(tmp_path / "foreign", SpiffeId.cluster(td, "west"), tmp_path / "foreign-west")
    for name in ("ca-cert.pem", "ca-key.pem", "cert-chain.pem"):
        shutil.copy2(tmp_path / "foreign-west" / name, tmp_path / "west" / name)
    err, _ = chain_error(tmp_path / "west", "west", tmp_path / "root")
    assert "does not chain to any root" in err
    # a directory that holds another cluster's CA
    err, _ = chain_error(tmp_path / "foreign-west", "east", tmp_path / "foreign")
    assert "cluster/west may not sign" in err and "cluster/east" in err


def test_cli_unknown_run_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["diagnose", "ratings.default", "--from", "east", "--run-dir",
                                      str(tmp_path / "none")])
    assert result.exit_code == 2 and "meshfed up" in result.output


def test_a_service_no_cluster_has_is_named_with_the_nearest_name() -> None:
    """Issue 18 walk item 4: a typo is not told to create a ServiceExport."""
    ev = evidence(service="rating.default", request=(404, ""))
    hop = evaluate(ev)[0]
    assert hop.status == FAIL and "no Service rating.default exists in any cluster (east, west)" in hop.detail
    assert "did you mean ratings.default?" in hop.next_step


def test_an_unexported_service_is_told_how_to_export_it() -> None:
    east = status("east")
    east["services"] = [{"service": "details.default", "exported": False, "conditions": []}]
    hop = evaluate(evidence(service="details.default", statuses={"east": east, "west": status("west")}))[0]
    assert hop.status == FAIL and "the Service exists in east" in hop.detail
    assert "meshfed export details.default --cluster east" in hop.next_step


def test_request_hop_says_why_when_envoy_answers_with_no_body() -> None:
    """Issue 18 walk item 4: 'HTTP 404 through ADDR:' had nothing after the colon."""
    hop = evaluate(evidence(request=(404, "")))[8]
    assert hop.status == FAIL
    assert hop.detail == (f"HTTP 404 through 127.0.0.1:5000: Not Found, empty body: the sidecar has no route for "
                          f"Host {HOST} (see hop 4)")
    assert evaluate(evidence(request=(503, "")))[8].detail.endswith(": Service Unavailable, empty body")


def test_an_exporter_outside_the_run_is_not_reported_as_a_broken_gateway() -> None:
    east = status("east")
    east["imports"][0]["clusters"] = ["north"]
    hop = evaluate(evidence(statuses={"east": east, "west": status("west")}, gateways={},
                            run_clusters=("east", "west")))[4]
    assert hop.status == SKIPPED and "north, which this run did not start" in hop.detail


def test_cli_after_down_says_there_is_no_run(tmp_path: Path) -> None:
    from tests.meshfed.test_down import stopped_run

    result = CliRunner().invoke(cli, ["diagnose", "ratings.default", "--from", "east", "--run-dir",
                                      str(stopped_run(tmp_path))])
    assert result.exit_code == 2 and "no run to diagnose" in result.output and "was stopped" in result.output
