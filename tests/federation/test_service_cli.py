"""``meshfed federation serve`` argument errors (the process itself runs in test_agent*.py)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from federation.trust.store import write_cluster_dir
from meshfed.cli import cli
from tests.federation.fedkit import Pki


def test_bad_listen_address_is_named(tmp_path: Path) -> None:
    pki = Pki.create()
    ca = pki.write_federation_dir(tmp_path / "fed-ca")
    result = CliRunner().invoke(cli, ["federation", "serve", "--store", f"sqlite:{tmp_path / 'f.db'}",
                                      "--listen", "nope", "--ca", str(ca)])
    assert result.exit_code == 2 and "--listen" in result.output and "HOST:PORT" in result.output


def test_cluster_ca_is_not_a_federation_ca(tmp_path: Path) -> None:
    pki = Pki.create()
    write_cluster_dir(tmp_path / "east-ca", pki.cluster_ca("east"), pki.bundle)
    result = CliRunner().invoke(cli, ["federation", "serve", "--store", f"sqlite:{tmp_path / 'f.db'}",
                                      "--listen", "127.0.0.1:1", "--ca", str(tmp_path / "east-ca")])
    assert result.exit_code == 1
    assert "meshfed/cluster/east" in result.output and "not of the federation service" in result.output


def test_bad_store_url_is_named(tmp_path: Path) -> None:
    pki = Pki.create()
    ca = pki.write_federation_dir(tmp_path / "fed-ca")
    result = CliRunner().invoke(cli, ["federation", "serve", "--store", "redis://x", "--listen", "127.0.0.1:1",
                                      "--ca", str(ca)])
    assert result.exit_code == 1 and "redis://x" in result.output
