"""Fixtures shared by the meshfed tests: a writable copy of the demo clusterset and east's CA directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from discovery.clusterset import load_clusterset
from discovery.model import ClusterId
from federation.trust.spiffe import SpiffeId, TrustDomain
from federation.trust.store import init_root, issue_intermediate
from meshfed.controlplane import ControlPlaneConfig
from meshfed.controlplane.config import Listen

DEMO = Path(__file__).resolve().parents[2] / "clusters" / "demo"


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    """A copy of clusters/demo the test may change."""
    dest = tmp_path / "demo"
    shutil.copytree(DEMO, dest)
    return dest


@pytest.fixture
def east_ca(tmp_path: Path) -> Path:
    """East's CA directory under a fresh root (the root's directory is its sibling ``root``)."""
    td = TrustDomain.parse("demo.meshfed.local")
    init_root(tmp_path / "root", td)
    issue_intermediate(tmp_path / "root", SpiffeId.cluster(td, ClusterId("east")), tmp_path / "east")
    return tmp_path / "east"


def kube_config(ca_dir: Path, kubeconfig: Path) -> ControlPlaneConfig:
    """East of the demo clusterset alone (unfederated) on the Kubernetes source at ``kubeconfig``, every listener
    on a free loopback port, xDS clients by token."""
    return ControlPlaneConfig(
        clusterset=load_clusterset(DEMO), cluster=ClusterId("east"), ca_dir=ca_dir, federation_urls=(),
        xds=Listen("127.0.0.1", 0), dns=Listen("127.0.0.1", 0), admin=Listen("127.0.0.1", 0),
        gateway_host="127.0.0.1", gateway_port=15443, source="kubernetes", kubeconfig=kubeconfig, xds_auth="tokens")
