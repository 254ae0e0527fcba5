"""``meshfed peer``: add/list/remove on a federation's peers file (clear errors naming the field; the bootstrap bundle
copied 0600), a running federation picking up ``peer add`` without a restart, and the peers' lines and problems in
``meshfed status`` (pure evaluation)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from discovery.clusterset import load_peers_file
from federation.peering.records import PeerStatus
from meshfed import peerstatus
from meshfed.cli import cli
from meshfed.status import LocalInputs, evaluate_local, sections
from tests.federation.fedkit import eventually
from tests.federation.peerkit import Side
from tests.support.runstate import state_from

pytestmark = pytest.mark.timeout(120)


def _add(peers_file: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["peer", "add", *args, "--peers-file", str(peers_file)])
    return result.exit_code, result.output


def test_add_list_remove_on_a_peers_file(tmp_path: Path) -> None:
    b = Side("b", tmp_path)
    peers_file = tmp_path / "fed" / "peers.yaml"
    code, out = _add(peers_file, "bee", "--bundle-endpoint", b.bundle_endpoint, "--endpoint-spiffe-id",
                     "spiffe://b.test/meshfed/federation", "--bootstrap-bundle", str(b.root_dir / "bundle.json"))
    assert code == 0, out
    [decl] = load_peers_file(peers_file)
    assert (decl.name, decl.trust_domain, str(decl.profile)) == ("bee", "b.test", "https_spiffe")
    assert decl.bootstrap_bundle == (tmp_path / "fed" / "bootstrap" / "bee.json").resolve()
    assert oct(decl.bootstrap_bundle.stat().st_mode & 0o777) == "0o600"
    assert oct(peers_file.stat().st_mode & 0o777) == "0o600"
    # One peer per trust domain; names are DNS labels and not 'svc'; the endpoint must be https; the SPIFFE ID must
    # be in the peer's trust domain; a bootstrap bundle that is not one is named.
    (tmp_path / "junk.json").write_text('{"keys": [{"use": "x509-svid", "x5c": ["AAAA"]}]}')
    bad = [
        (["other", "--bundle-endpoint", b.bundle_endpoint, "--endpoint-spiffe-id",
          "spiffe://b.test/meshfed/federation", "--bootstrap-bundle", str(b.root_dir / "bundle.json")],
         "already peer bee"),
        (["svc", "--bundle-endpoint", b.bundle_endpoint, "--endpoint-spiffe-id", "spiffe://c.test/x",
          "--bootstrap-bundle", str(b.root_dir / "bundle.json")], "not a peer name"),
        (["cee", "--bundle-endpoint", "http://127.0.0.1:1/", "--endpoint-spiffe-id", "spiffe://c.test/x",
          "--bootstrap-bundle", str(b.root_dir / "bundle.json")],
         "--bundle-endpoint: 'http://127.0.0.1:1/' is not an https URL"),
        (["cee", "--bundle-endpoint", b.bundle_endpoint, "--trust-domain", "c.test", "--endpoint-spiffe-id",
          "spiffe://d.test/x", "--bootstrap-bundle", str(b.root_dir / "bundle.json")],
         "must be a SPIFFE ID in the peer's trust domain"),
        (["cee", "--bundle-endpoint", b.bundle_endpoint, "--endpoint-spiffe-id", "spiffe://c.test/x"],
         "--bootstrap-bundle: required for the https_spiffe profile"),
        (["cee", "--bundle-endpoint", b.bundle_endpoint, "--endpoint-spiffe-id", "spiffe://c.test/x",
          "--bootstrap-bundle", str(tmp_path / "junk.json")], "keys[0].x5c[0] is not a DER certificate"),
    ]
    for args, message in bad:
        code, out = _add(peers_file, *args)
        assert code != 0 and message in " ".join(out.split()), (args, out)
    assert [d.name for d in load_peers_file(peers_file)] == ["bee"]  # nothing accepted was lost
    result = CliRunner().invoke(cli, ["peer", "list", "--peers-file", str(peers_file), "-o", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert [p["name"] for p in doc["peers"]] == ["bee"] and doc["peers"][0]["trustDomain"] == "b.test"
    result = CliRunner().invoke(cli, ["peer", "list", "--peers-file", str(peers_file)])
    assert result.exit_code == 0 and "bee" in result.output and "b.test" in result.output
    result = CliRunner().invoke(cli, ["peer", "remove", "nope", "--peers-file", str(peers_file)])
    assert result.exit_code != 0 and "no peer 'nope'" in result.output
    result = CliRunner().invoke(cli, ["peer", "remove", "bee", "--peers-file", str(peers_file)])
    assert result.exit_code == 0 and load_peers_file(peers_file) == ()
    assert not (tmp_path / "fed" / "bootstrap" / "bee.json").exists()


async def test_a_running_federation_picks_up_peer_add(tmp_path: Path) -> None:
    a, b = Side("a", tmp_path), Side("b", tmp_path)
    a.declare()
    b.declare()
    a.start()
    b.start()
    try:
        code, out = await asyncio.to_thread(
            _add, a.peers_file, "b", "--bundle-endpoint", b.bundle_endpoint, "--endpoint-spiffe-id",
            "spiffe://b.test/meshfed/federation", "--bootstrap-bundle", str(b.root_dir / "bundle.json"))
        assert code == 0, out

        def fetched() -> bool:
            rows = a.member_get("/v1/peers")["peers"]
            return bool(rows) and rows[0]["bundle_source"] == "fetched"

        await eventually(fetched, within=30, what="a fetched b's bundle after 'meshfed peer add'")
        row = a.peer_status("b")
        assert row["bundle_sequence"] == 1 and row["bundle_roots"] == [f[:16] for f in b.bundle().fingerprints]
        result = await asyncio.to_thread(CliRunner().invoke, cli, ["peer", "remove", "b", "--peers-file",
                                                                   str(a.peers_file)])
        assert result.exit_code == 0
        await eventually(lambda: a.member_get("/v1/peers")["peers"] == [], within=30, what="peer removed")
        assert not (a.dir / "federation" / "peer-state" / "b.test" / "bundle.json").exists()
    finally:
        a.stop()
        b.stop()


def _row(**kw: object) -> PeerStatus:
    base: dict[str, object] = dict(name="b", trust_domain="b.test", bundle_endpoint="https://127.0.0.1:9/",
                                   profile="https_spiffe", endpoint_spiffe_id="spiffe://b.test/meshfed/federation",
                                   federation="https://127.0.0.1:9", bundle_source="fetched", bundle_sequence=3,
                                   bundle_roots=("aaaa",), fetched_at="2026-12-03T10:00:00+00:00",
                                   bundle_age_s=4000.0, expires_at="2026-12-04T10:00:00+00:00",
                                   services_imported=("reviews.default",))
    base.update(kw)
    return PeerStatus(**base)  # type: ignore[arg-type]


def test_status_shows_peers_and_their_problems() -> None:
    healthy = _row()
    down = _row(name="c", trust_domain="c.test", error_kind="unreachable", error="ConnectionRefused",
                failing_since="2026-12-03T10:30:00+00:00")
    refused = _row(name="d", trust_domain="d.test", error_kind="refused", refusals=2,
                   error="keys[0].x5c[0] is not a DER certificate")
    expired = _row(name="e", trust_domain="e.test", expired=True)
    never = _row(name="f", trust_domain="f.test", bundle_source="bootstrap", fetched_at=None, bundle_age_s=None)
    inp = LocalInputs(state=state_from({"clusters": {}, "processes": []}), alive={}, controlplanes={},
                      peers=(healthy, down, refused, expired, never))
    report = evaluate_local(inp)
    problems = [p for p in report["problems"] if p.startswith("peer ")]
    assert not any(p.startswith("peer b ") for p in problems)
    assert any("peer c (c.test): bundle endpoint https://127.0.0.1:9/ unreachable since 2026-12-03T10:30:00" in p
               and "keeping bundle sequence 3 fetched 67m ago" in p for p in problems), problems
    assert any("peer d (d.test): bundle refused (2 refusals so far): keys[0].x5c[0]" in p for p in problems)
    assert any("peer e (e.test): its bundle expired" in p for p in problems)
    assert any("peer f (f.test): no bundle fetched yet" in p for p in problems)
    assert not report["healthy"]
    [table] = [t for t in sections(report) if t[0] == "Peers"]
    assert [r[0] for r in table[2]] == ["b", "c", "d", "e", "f"]
    assert table[2][1][6] == "UNREACHABLE" and table[2][3][6] == "EXPIRED" and table[2][0][7] == "reviews.default"
    assert peerstatus.decode_peers(report["peers"], what="report") == (healthy, down, refused, expired, never)


def test_status_lists_peer_services_and_says_what_is_wrong_with_them() -> None:
    from meshfed.controlplane.status import ControlPlaneStatus, PeerServiceRow

    ready = PeerServiceRow(host="ratings.default.svc.b.clusterset.local", peer="b", trust_domain="b.test",
                           ips=("241.0.0.7",), ports=(9080,), ready=2, gateways=("192.0.2.1:15443",))
    empty = PeerServiceRow(host="db.data.svc.b.clusterset.local", peer="b", trust_domain="b.test",
                           ips=("241.0.0.9",), ports=(5432,), ready=0, gateways=("192.0.2.1:15443",))
    statuses = {"east": ControlPlaneStatus(cluster="east", peer_services=(ready, empty)),
                "west": ControlPlaneStatus(cluster="west", peer_error="ClusterSetIP CIDR 241.0.0.0/30 has 2 usable "
                                                                      "addresses, fewer than 3 services"),
                "north": None}
    problems: list[str] = []
    rows = peerstatus.peer_services(statuses, problems)
    assert [(r["cluster"], r["host"], r["ready"]) for r in rows] == [
        ("east", "ratings.default.svc.b.clusterset.local", 2), ("east", "db.data.svc.b.clusterset.local", 0)]
    assert problems == [
        "east: db.data.svc.b.clusterset.local (exported by peer b) has no ready endpoint behind the peer's gateways "
        "(192.0.2.1:15443)",
        "west: peer services not taken (the last accepted are served): ClusterSetIP CIDR 241.0.0.0/30 has 2 usable "
        "addresses, fewer than 3 services"]
    title, header, table = peerstatus.peer_service_table(rows)
    assert title.startswith("Peer services") and header[1] == "name"
    assert table[0] == ["east", "ratings.default.svc.b.clusterset.local", "b", "b.test", "241.0.0.7", "9080", 2,
                        "192.0.2.1:15443"]


def test_reissue_waits_until_every_peer_holds_the_new_root() -> None:
    """root-added: a peer federation authenticates our bundle endpoint with the bundle it holds; if our serving
    certificate moved under the new root before the peer fetched it, the peer would be locked out."""
    from meshfed.rotation import SystemReports, evaluate

    old, new = "a" * 64, "b" * 64
    added = {"phase": "root-added", "certificates": [
        {"role": "root (active)", "fingerprint": old}, {"role": "root (next)", "fingerprint": new}]}
    row = {"name": "b", "trust_domain": "b.test", "peer_holds_sequence": 1, "peer_holds_roots": [old[:16]],
           "peer_holds_reported_at": "2026-12-03T11:00:00+00:00"}
    silent = {"name": "c", "trust_domain": "c.test", "peer_holds_reported_at": None}
    fed = {"bundleFingerprints": [old, new], "serving": {"root_fingerprint": old}, "connections": [],
           "peers": [row, silent]}
    conv = evaluate(added, SystemReports(controlplanes={}, federation=fed))
    assert not conv.done and conv.blocking == (
        "peer b (b.test): holds our bundle sequence 1 without the new root (reported 2026-12-03T11:00:00+00:00); "
        "it refreshes at our spiffe_refresh_hint",)
    assert any("peer c (c.test) never reported" in s for s in conv.summary)
    row.update(peer_holds_sequence=2, peer_holds_roots=[old[:16], new[:16]])
    conv = evaluate(added, SystemReports(controlplanes={}, federation=fed))
    assert conv.done and "peer b (b.test) holds the new root" in conv.summary


def test_install_renders_the_peering_listener_and_the_peers_configmap(tmp_path: Path) -> None:
    """A cluster install serves the bundle endpoint too, and its peers file comes from the clusterset's peers:
    with each bootstrap bundle as a key of the same ConfigMap (paths rewritten to where it is mounted)."""
    import yaml

    from discovery.clusterset import parse_clusterset, parse_peers
    from meshfed.install.render import PEERING_PORT, PEERS_DIR, InstallOptions, peers_configmap

    b = Side("b", tmp_path)
    (tmp_path / "cs").mkdir()
    (tmp_path / "cs" / "b.json").write_bytes((b.root_dir / "bundle.json").read_bytes())
    cs = parse_clusterset({"name": "a", "trustDomain": "a.test", "clusters": [{"name": "east"}],
                           "peers": [{"name": "b", "trustDomain": "b.test", "bundleEndpoint": "https://fed.b.test/",
                                      "endpointSpiffeId": "spiffe://b.test/meshfed/federation",
                                      "bootstrapBundle": "b.json"}]}, directory=tmp_path / "cs")
    cm = peers_configmap(cs, cs.clusters[0], InstallOptions())
    assert cm["data"]["bootstrap-b.json"] == (b.root_dir / "bundle.json").read_text()
    [decl] = parse_peers(yaml.safe_load(cm["data"]["peers.yaml"])["peers"], file="configmap")
    assert decl.bootstrap_bundle == Path(PEERS_DIR) / "bootstrap-b.json" and decl.trust_domain == "b.test"
    assert PEERING_PORT == 8444
