"""File-based workload certificates (proxyless gRPC) follow the cluster's CA: renewed on rotation, not otherwise."""

from __future__ import annotations

import stat
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from federation.trust.bundle import load_pem_certs
from federation.trust.spiffe import SpiffeId, TrustDomain
from federation.trust.store import (
    init_root,
    issue_intermediate,
    load_bundle,
    load_cluster_ca,
    load_root,
    rotate_add_root,
    rotate_reissue,
)
from meshfed import certfiles

TD = TrustDomain.parse("files.test")


def test_files_follow_add_root_and_reissue(tmp_path: Path) -> None:
    root, east = tmp_path / "root", tmp_path / "east"
    init_root(root, TD)
    issue_intermediate(root, SpiffeId.cluster(TD, "east"), east)
    spec = certfiles.Spec(dir=tmp_path / "grpc" / "client", spiffe_id=str(SpiffeId.workload(TD, "default", "c")),
                          refresh_s=5)
    registry = tmp_path / "certfiles.json"
    certfiles.write_files(spec, load_cluster_ca(east), load_bundle(east))
    certfiles.register(registry, spec)
    assert stat.S_IMODE((spec.dir / "key.pem").stat().st_mode) == 0o600
    files = certfiles.CertFiles(registry)
    assert files.refresh(load_cluster_ca(east), load_bundle(east)) == 0  # adopted as written, nothing stale
    later = datetime.now(UTC) + timedelta(seconds=10)
    old_root = load_root(root).state.active
    assert replace(files.report(load_bundle(east), now=later)[0], leaf_root=old_root, settled=True) == \
        files.report(load_bundle(east), now=later)[0]

    rotate_add_root(root)
    assert files.refresh(load_cluster_ca(east), load_bundle(east)) == 1  # the bundle gained a root
    assert len(load_pem_certs((spec.dir / "ca.pem").read_bytes(), what="ca")) == 2
    assert not files.report(load_bundle(east))[0].settled  # gRPC has not had a refresh interval yet
    rotate_reissue(root)
    ca = load_cluster_ca(east)
    assert files.refresh(ca, load_bundle(east)) == 1  # the intermediate was re-issued
    assert files.refresh(ca, load_bundle(east)) == 0
    chain = load_pem_certs((spec.dir / "cert.pem").read_bytes(), what="cert")
    assert chain[1] == ca.cert
    report = files.report(load_bundle(east), now=datetime.now(UTC) + timedelta(seconds=10))[0]
    assert report.leaf_root == load_root(root).state.active and report.settled
