"""CA directories on disk and root rotation: every phase is one idempotent step, and a leaf issued in any phase
keeps verifying against the bundle of the directory until the old root is retired."""

from __future__ import annotations

import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from federation.trust import (
    CAStoreError,
    ChainError,
    Phase,
    RotationError,
    SpiffeId,
    TrustDomain,
    issue_workload,
    store,
    verify_peer,
)
from federation.trust.ca import create_intermediate

TD = TrustDomain("example.org")
REVIEWS = SpiffeId.workload(TD, "default", "reviews")


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def leaf_from(cluster_dir: Path) -> list[bytes]:
    """A workload chain (PEM) issued by the CA currently in ``cluster_dir``."""
    _, chain = issue_workload(store.load_cluster_ca(cluster_dir), REVIEWS)
    return chain


def verifies(chain: list[bytes], cluster_dir: Path, tmp: Path) -> bool:
    """Does ``chain`` verify against the bundle the cluster dir trusts, per openssl AND our own verifier?"""
    (tmp / "leaf.pem").write_bytes(chain[0])
    (tmp / "inter.pem").write_bytes(chain[1])
    res = subprocess.run(
        ["openssl", "verify", "-CAfile", str(cluster_dir / "root-cert.pem"), "-untrusted", str(tmp / "inter.pem"),
         str(tmp / "leaf.pem")],
        capture_output=True, text=True, timeout=30, check=False,
    )
    ders = [x509.load_pem_x509_certificate(c).public_bytes(serialization.Encoding.DER) for c in chain]
    try:
        verify_peer([x509.load_der_x509_certificate(d) for d in ders], store.load_bundle(cluster_dir))
        ours = True
    except ChainError:
        ours = False
    assert ours == (res.returncode == 0), f"openssl and verify_peer disagree: {res.stdout}{res.stderr}"
    return ours


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    root, east, west = tmp_path / "root", tmp_path / "east", tmp_path / "west"
    store.init_root(root, TD)
    store.issue_intermediate(root, SpiffeId.cluster(TD, "east"), east)
    store.issue_intermediate(root, SpiffeId.cluster(TD, "west"), west)
    return root, east, west


def test_layout_and_key_modes(dirs: tuple[Path, Path, Path]) -> None:
    root, east, _ = dirs
    for name in ("state.json", "root-cert.pem", "root-key.pem", "bundle.pem", "bundle.json"):
        assert (root / name).is_file(), name
    for name in ("ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"):
        assert (east / name).is_file(), name
    keys = [root / "root-key.pem", east / "ca-key.pem", *(root / "roots").glob("*.key.pem")]
    assert len(keys) == 3
    for k in keys:
        assert mode(k) == 0o600, k
    assert mode(root) == 0o700
    chain = x509.load_pem_x509_certificates((east / "cert-chain.pem").read_bytes())
    assert chain[0] == x509.load_pem_x509_certificate((east / "ca-cert.pem").read_bytes())
    assert chain[1] == x509.load_pem_x509_certificate((root / "root-cert.pem").read_bytes())


def test_group_readable_key_is_refused(dirs: tuple[Path, Path, Path]) -> None:
    _, east, _ = dirs
    (east / "ca-key.pem").chmod(0o644)
    with pytest.raises(CAStoreError, match="chmod 600"):
        store.load_cluster_ca(east)


def test_init_and_intermediate_are_idempotent(dirs: tuple[Path, Path, Path]) -> None:
    root, east, _ = dirs
    before = (root / "root-key.pem").read_bytes(), (east / "ca-key.pem").read_bytes()
    _, created = store.init_root(root, TD)
    ca, created2 = store.issue_intermediate(root, SpiffeId.cluster(TD, "east"), east)
    assert (created, created2, ca) == (False, False, None)
    assert before == ((root / "root-key.pem").read_bytes(), (east / "ca-key.pem").read_bytes())
    with pytest.raises(CAStoreError, match="trust domain"):
        store.init_root(root, TrustDomain("other.org"))
    with pytest.raises(CAStoreError, match="already holds the CA"):
        store.issue_intermediate(root, SpiffeId.cluster(TD, "west"), east)


def test_rotation_phases_keep_every_leaf_verifying(dirs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    root, east, west = dirs
    t0 = datetime.now(UTC)
    assert store.inspect_dir(root)["phase"] == Phase.STABLE
    leaf_stable = leaf_from(east)
    assert verifies(leaf_stable, west, tmp_path)

    # phase 1: add the new root (twice: the second run changes nothing)
    r1 = store.rotate_add_root(root, now=t0)
    r1b = store.rotate_add_root(root, now=t0)
    assert r1.changed and not r1b.changed and r1.phase == Phase.ROOT_ADDED
    assert len(store.load_bundle(root).roots) == 2 and len(store.load_bundle(west).roots) == 2
    assert store.load_bundle(root).sequence == 2
    assert store.inspect_dir(east)["phase"] == "root-added"
    leaf_added = leaf_from(east)
    assert verifies(leaf_stable, west, tmp_path) and verifies(leaf_added, west, tmp_path)
    with pytest.raises(RotationError, match="reissue"):
        store.rotate_retire_root(root, now=t0)

    # phase 2: reissue east only, then the rest
    r2 = store.rotate_reissue(root, cluster_dirs=[east], now=t0)
    assert r2.changed and r2.phase == Phase.REISSUING
    assert store.inspect_dir(east)["phase"] == "reissued"
    leaf_reissued = leaf_from(east)
    for leaf in (leaf_stable, leaf_added, leaf_reissued):
        assert verifies(leaf, west, tmp_path) and verifies(leaf, east, tmp_path)
    with pytest.raises(RotationError, match="west"):
        store.rotate_retire_root(root, now=t0)
    r2b = store.rotate_reissue(root, now=t0)
    r2c = store.rotate_reissue(root, now=t0)
    assert r2b.changed and not r2c.changed and r2c.phase == Phase.LEAVES_ROLLING
    info = store.inspect_dir(root, now=t0)
    assert info["phase"] == "leaves-rolling" and info["old_leaves_valid_until"]
    assert verifies(leaf_stable, east, tmp_path)

    # phase 3: leaves roll over; retiring before they can have expired is refused
    with pytest.raises(RotationError, match="may be valid until"):
        store.rotate_retire_root(root, now=t0)
    later = t0 + timedelta(hours=49)
    assert store.inspect_dir(root, now=later)["phase"] == "ready-to-retire"

    # phase 4: retire (twice: the second run is a no-op)
    leaf_new = leaf_from(west)
    r4 = store.rotate_retire_root(root, now=later)
    r4b = store.rotate_retire_root(root, now=later)
    assert r4.changed and not r4b.changed and r4.phase == Phase.STABLE
    assert len(store.load_bundle(east).roots) == 1 and store.load_bundle(root).sequence == 3
    assert verifies(leaf_new, east, tmp_path) and verifies(leaf_reissued, west, tmp_path)
    assert not verifies(leaf_stable, west, tmp_path)  # old root gone
    # and a fresh rotation can start again
    assert store.rotate_add_root(root, now=later).phase == Phase.ROOT_ADDED


def test_retire_refused_for_unknown_dir_still_under_old_root(dirs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    root, east, west = dirs
    t0 = datetime.now(UTC)
    store.rotate_add_root(root, now=t0)
    store.rotate_reissue(root, cluster_dirs=[east, west], now=t0)
    # a copy of west's old CA that the state does not know about (e.g. a restored backup in use)
    stale = tmp_path / "stale"
    rd = store.load_root(root)
    old_fp = rd.state.old_root
    assert old_fp is not None
    old_ca = create_intermediate(rd.roots[old_fp], SpiffeId.cluster(TD, "stale"))
    store.write_cluster_dir(stale, old_ca, rd.bundle)
    with pytest.raises(RotationError, match="stale"):
        store.rotate_retire_root(root, cluster_dirs=[east, west, stale], force=True, now=t0)


def test_missing_and_broken_dirs_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CAStoreError, match="not a meshfed root directory"):
        store.load_root(tmp_path)
    with pytest.raises(CAStoreError, match="neither a root directory"):
        store.inspect_dir(tmp_path)
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(CAStoreError, match=r"state\.json"):
        store.load_root(tmp_path)


def test_decommissioned_cluster_can_be_forgotten(dirs: tuple[Path, Path, Path]) -> None:
    import shutil

    root, _, west = dirs
    t0 = datetime.now(UTC)
    store.rotate_add_root(root, now=t0)
    shutil.rmtree(west)  # west is decommissioned mid-rotation
    store.rotate_reissue(root, now=t0)  # only east still exists
    with pytest.raises(RotationError, match="directory gone"):
        store.rotate_retire_root(root, force=True, now=t0)
    with pytest.raises(RotationError, match="no such intermediate"):
        store.rotate_retire_root(root, force=True, forget=["spiffe://example.org/meshfed/cluster/north"], now=t0)
    res = store.rotate_retire_root(root, force=True, forget=["spiffe://example.org/meshfed/cluster/west"], now=t0)
    assert res.phase == Phase.STABLE
    assert [r.authority for r in store.load_root(root).state.intermediates] == [
        "spiffe://example.org/meshfed/cluster/east"
    ]
