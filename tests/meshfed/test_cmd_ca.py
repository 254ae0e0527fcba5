"""``meshfed ca`` end to end through click: init, intermediate, sign, issue, inspect, the rotation commands, and
clear errors. Keys must be 0600 and never appear in any output."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from spiffe import X509Svid

from federation.trust.ca import make_csr, private_key_pem
from federation.trust.spiffe import SpiffeId
from meshfed.cli import cli
from meshfed.cmd_ca import parse_duration

REVIEWS = "spiffe://example.org/ns/default/sa/reviews"


def run(*args: str | Path, ok: bool = True) -> Result:
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    text = res.output + (res.stderr if res.stderr_bytes is not None else "")
    assert "PRIVATE KEY" not in text
    if ok:
        assert res.exit_code == 0, text
    else:
        assert res.exit_code != 0, text
    return res


@pytest.fixture
def ca_dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    root, east, west = tmp_path / "root", tmp_path / "east", tmp_path / "west"
    run("ca", "init", "--trust-domain", "example.org", "--out", root)
    run("ca", "intermediate", "--root", root, "--cluster", "east", "--out", east)
    run("ca", "intermediate", "--root", root, "--cluster", "west", "--out", west, "--days", "30")
    return root, east, west


def test_init_intermediate_layout_and_modes(ca_dirs: tuple[Path, Path, Path]) -> None:
    root, east, _ = ca_dirs
    for key in (root / "root-key.pem", east / "ca-key.pem"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    res = run("ca", "init", "--trust-domain", "example.org", "--out", root)
    assert "already exists" in res.output


def test_sign_prints_a_chain_that_openssl_and_spiffe_accept(ca_dirs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, east, _ = ca_dirs
    key = ec.generate_private_key(ec.SECP256R1())
    csr = tmp_path / "req.csr"
    csr.write_bytes(make_csr(key, SpiffeId.parse(REVIEWS)))
    res = run("ca", "sign", "--ca", east, "--csr", csr, "--spiffe-id", REVIEWS, "--ttl", "30m")
    certs = x509.load_pem_x509_certificates(res.stdout.encode())
    assert len(certs) == 2
    life = certs[0].not_valid_after_utc - certs[0].not_valid_before_utc
    assert life.total_seconds() == 31 * 60  # 30 min plus the 1 min back-dating for clock skew
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(res.stdout.encode().split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n")
    proc = subprocess.run(
        ["openssl", "verify", "-CAfile", str(east / "root-cert.pem"), "-untrusted", str(east / "ca-cert.pem"),
         str(leaf)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(X509Svid.parse(res.stdout.encode(), private_key_pem(key)).spiffe_id) == REVIEWS


def test_sign_errors_are_clear(ca_dirs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, east, _ = ca_dirs
    key = ec.generate_private_key(ec.SECP256R1())
    csr = tmp_path / "req.csr"
    csr.write_bytes(make_csr(key, SpiffeId.parse(REVIEWS)))
    res = run("ca", "sign", "--ca", east, "--csr", csr, "--spiffe-id", "spiffe://example.org/ns/x/sa/y", ok=False)
    assert "authenticated as" in res.stderr
    res = run("ca", "sign", "--ca", east, "--csr", csr, "--spiffe-id", REVIEWS, "--ttl", "30d", ok=False)
    assert "exceeds" in res.stderr
    res = run("ca", "sign", "--ca", east, "--csr", csr, "--spiffe-id", REVIEWS, "--ttl", "soon", ok=False)
    assert "duration" in res.output + res.stderr
    res = run("ca", "sign", "--ca", east, "--csr", csr, "--spiffe-id", "spiffe://Example.org/x", ok=False)
    assert "lower-case" in res.stderr
    res = run("ca", "intermediate", "--root", tmp_path, "--cluster", "x", "--out", tmp_path / "x", ok=False)
    assert "not a meshfed root directory" in res.stderr
    res = run("ca", "init", "--trust-domain", "bad:443", "--out", tmp_path / "r2", ok=False)
    assert "port" in res.stderr


def test_issue_writes_cluster_identity(ca_dirs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, east, _ = ca_dirs
    out = tmp_path / "fedclient"
    run("ca", "issue", "--ca", east, "--out", out)
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
    svid = X509Svid.parse((out / "cert-chain.pem").read_bytes(), (out / "key.pem").read_bytes())
    assert str(svid.spiffe_id) == "spiffe://example.org/meshfed/cluster/east"


def test_inspect_and_rotation_via_cli(ca_dirs: tuple[Path, Path, Path]) -> None:
    root, east, west = ca_dirs

    def phase(d: Path) -> str:
        return str(json.loads(run("ca", "inspect", d, "-o", "json").stdout)["phase"])

    info = json.loads(run("ca", "inspect", root, "-o", "json").stdout)
    assert info["kind"] == "root" and info["phase"] == "stable" and len(info["intermediates"]) == 2
    table = run("ca", "inspect", east).stdout
    assert "phase" in table and "stable" in table
    run("ca", "rotate", "add-root", "--root", root)
    assert "nothing changed" in run("ca", "rotate", "add-root", "--root", root).stdout
    assert phase(root) == "root-added" and phase(west) == "root-added"
    res = run("ca", "rotate", "retire-root", "--root", root, ok=False)
    assert "reissue" in res.stderr
    run("ca", "rotate", "reissue", "--root", root, east)
    assert phase(root) == "reissuing" and phase(east) == "reissued" and phase(west) == "root-added"
    run("ca", "rotate", "reissue", "--root", root)
    assert phase(root) == "leaves-rolling"
    res = run("ca", "rotate", "retire-root", "--root", root, ok=False)
    assert "may be valid until" in res.stderr
    run("ca", "rotate", "retire-root", "--root", root, "--force")
    assert phase(root) == "stable" and phase(east) == "stable"
    assert "nothing to retire" in run("ca", "rotate", "retire-root", "--root", root).stdout


def test_parse_duration() -> None:
    assert parse_duration("24h").total_seconds() == 86400
    assert parse_duration("1h30m").total_seconds() == 5400
    assert parse_duration("7d").days == 7
    assert parse_duration("90s").total_seconds() == 90
