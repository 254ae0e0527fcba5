"""``meshfed dns`` as a real process over a copy of the demo clusterset: answers, reloads, keeps the last good state.

Everything a local run knows comes from the manifests under ``clusters/demo`` (copied to a temporary folder so the
test can edit them); the expected ClusterSetIPs come from ``discovery.mcs.allocate_ips`` over the same CIDR.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dns.zone
import pytest
from click.testing import CliRunner

from discovery.clusterset import load_clusterset
from discovery.mcs import allocate_ips
from discovery.model import ServiceKey, namespace, service_name
from meshfed.cli import cli
from meshfed.cmd_dns import parse_listen
from tests.support.procs import Proc, free_tcp_udp_port, wait_for

HOST = "127.0.0.1"
DEMO = Path(__file__).resolve().parents[2] / "clusters" / "demo"
REVIEWS = "reviews.default.svc.clusterset.local"
DB = "db.default.svc.clusterset.local"
DETAILS = "details.default.svc.clusterset.local"

pytestmark = pytest.mark.skipif(shutil.which("dig") is None, reason="dig (dnsutils) is not installed")

DETAILS_EXPORT = """apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata:
  name: details
  namespace: default
  creationTimestamp: "2026-02-01T00:00:00Z"
"""


def dig(port: int, *args: str) -> str:
    out = subprocess.run(
        ["dig", f"@{HOST}", "-p", str(port), "+tries=1", "+time=2", *args],
        capture_output=True, text=True, timeout=20, check=False,
    )
    return out.stdout


def short(port: int, name: str, type_: str = "A") -> set[str]:
    return {line.strip() for line in dig(port, "+short", name, type_).splitlines()} - {""}


def status(port: int, name: str) -> str:
    for line in dig(port, name, "A").splitlines():
        if "status:" in line:
            return line.split("status:")[1].split(",")[0].strip()
    return "no answer"


@pytest.fixture
def clusterset(tmp_path: Path) -> Path:
    target = tmp_path / "demo"
    shutil.copytree(DEMO, target)
    return target


@pytest.fixture
def standalone(clusterset: Path, tmp_path: Path) -> Iterator[tuple[int, Proc]]:
    port = free_tcp_udp_port(HOST)
    proc = Proc(
        [str(Path(sys.executable).parent / "meshfed"), "-v", "dns", "--clusterset", str(clusterset),
         "--cluster", "east",
         "--listen", f"{HOST}:{port}", "--interval", "0.1"],
        log=tmp_path / "meshfed-dns.log",
    )
    try:
        wait_for(lambda: not proc.alive() or status(port, REVIEWS) == "NOERROR", timeout=30, what="meshfed dns")
        assert proc.alive(), proc.output()
        yield port, proc
    finally:
        proc.stop()


def test_serves_the_demo_clusterset(standalone: tuple[int, Proc], clusterset: Path) -> None:
    port, proc = standalone
    cs = load_clusterset(clusterset)
    reviews = ServiceKey(namespace=namespace("default"), name=service_name("reviews"))
    ratings = ServiceKey(namespace=namespace("default"), name=service_name("ratings"))
    ips = allocate_ips([reviews, ratings], cs.cidr)
    assert short(port, REVIEWS) == {ips[reviews]}
    assert short(port, "ratings.default.svc.clusterset.local") == {ips[ratings]}
    assert short(port, "_http._tcp." + REVIEWS, "SRV") == {f"0 100 9080 {REVIEWS}."}
    # headless db: ready endpoints of both clusters, and per-cluster hostnames
    addresses = short(port, DB)
    assert {"127.0.1.30", "127.0.1.31", "127.0.2.30"} <= addresses and "127.0.1.32" not in addresses
    assert short(port, "db-0.west." + DB) == {"127.0.2.30"}
    assert short(port, "db-0.east." + DB) == {"127.0.1.30"}
    assert status(port, "east." + DB) == "NXDOMAIN"
    assert status(port, DETAILS) == "NXDOMAIN"  # not exported
    assert short(port, "dns-version.clusterset.local", "TXT") == {'"1.0.0"'}
    assert "serving clusterset.local for cluster east" in proc.output()


def test_reloads_on_manifest_changes_and_keeps_the_last_good_state(
    standalone: tuple[int, Proc], clusterset: Path
) -> None:
    port, proc = standalone
    export = clusterset / "east" / "serviceexport-details-default.yaml"
    export.write_text(DETAILS_EXPORT)
    wait_for(lambda: status(port, DETAILS) == "NOERROR", timeout=20, what="details exported")
    assert len(short(port, DETAILS)) == 1
    # a malformed manifest is reported; what was accepted stays in force
    (clusterset / "east" / "broken.yaml").write_text("apiVersion: v1\nkind: Service\nmetadata: [unclosed\n")
    reviews_file = clusterset / "west" / "reviews.yaml"
    reviews_file.write_text(reviews_file.read_text() + "\n  this is: [not yaml\n")
    wait_for(lambda: "broken.yaml" in proc.output(), timeout=20, what="the problem reported")
    assert status(port, DETAILS) == "NOERROR" and status(port, REVIEWS) == "NOERROR"
    export.unlink()
    wait_for(lambda: status(port, DETAILS) == "NXDOMAIN", timeout=20, what="details unexported")
    assert proc.alive()


def test_unknown_cluster_and_bad_listen_are_clear_errors(clusterset: Path) -> None:
    result = CliRunner().invoke(cli, ["dns", "--clusterset", str(clusterset), "--cluster", "north",
                                      "--listen", f"{HOST}:0"])
    assert result.exit_code == 1
    assert "north" in result.output and "east" in result.output
    with pytest.raises(Exception, match="HOST:PORT"):
        parse_listen("localhost")
    assert parse_listen("[::1]:53") == ("::1", 53)


def test_zone_option_prints_the_records_as_a_zone_file(clusterset: Path) -> None:
    result = CliRunner().invoke(cli, ["dns", "--clusterset", str(clusterset), "--cluster", "west", "--zone"])
    assert result.exit_code == 0, result.output
    zone = dns.zone.from_text(result.output, origin="clusterset.local.", relativize=False)
    assert zone.find_rdataset("db-0.west." + DB + ".", "A")[0].to_text() == "127.0.2.30"
    assert zone.find_rdataset("dns-version.clusterset.local.", "TXT")[0].to_text() == '"1.0.0"'
    assert zone.get_node("east." + DB + ".") is None
