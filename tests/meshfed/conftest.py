"""Fixtures shared by the meshfed tests: a writable copy of the demo clusterset and east's CA directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from discovery.model import ClusterId
from federation.trust.spiffe import SpiffeId, TrustDomain
from federation.trust.store import init_root, issue_intermediate

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
