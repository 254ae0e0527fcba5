"""CA material for an install (an IO edge): the root directory and one intermediate per cluster plus the
federation service's, made and read through :mod:`federation.trust.store` (no cryptography of our own).

Layout under the root directory::

    ROOT/                         the root CA (``meshfed ca init``), keys 0600, directory 0700
    ROOT/intermediates/<cluster>/ that cluster's intermediate (Istio plug-in layout)
    ROOT/intermediates/federation/ the federation service's intermediate

A missing intermediate is issued; an existing one is reused as it is, which is what makes a re-render
byte-identical.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from discovery.clusterset import ClusterSet
from federation.trust import store
from federation.trust.errors import TrustError
from federation.trust.spiffe import SpiffeId, TrustDomain
from meshfed.install import RenderError
from meshfed.install.render import CAFiles, ClusterCA

log = logging.getLogger("meshfed.install")

INTERMEDIATES = "intermediates"
FEDERATION_DIR = "federation"


@dataclass(frozen=True, slots=True)
class CAReport:
    """What :func:`prepare_ca` did: ``created`` lists the CA directories it made (root and intermediates)."""

    root: Path
    created: tuple[str, ...]
    ca: ClusterCA


def _read(path: Path) -> CAFiles:
    try:
        bundle_json = (path / store.BUNDLE_JSON).read_bytes() if (path / store.BUNDLE_JSON).exists() else b""
        return CAFiles(
            ca_cert=store.read_file(path / store.CA_CERT),
            ca_key=store.read_file(path / store.CA_KEY, private=True),
            root_cert=store.read_file(path / store.ROOT_CERT),
            cert_chain=store.read_file(path / store.CERT_CHAIN),
            bundle_json=bundle_json,
        )
    except (TrustError, OSError) as exc:
        raise RenderError(f"CA directory {path}: {exc}") from exc


def prepare_ca(cs: ClusterSet, root: Path, *, create_root: bool) -> CAReport:
    """Load (or, with ``create_root``, create) the root in ``root`` and make sure every cluster of ``cs`` and the
    federation service have an intermediate under it. Raises RenderError naming the directory on failure."""
    created: list[str] = []
    try:
        td = TrustDomain.parse(cs.trust_domain)
        if create_root:
            rd, made = store.init_root(root, td)
            if made:
                created.append(str(root))
        else:
            rd = store.load_root(root)
        if rd.state.trust_domain != td:
            raise RenderError(
                f"--root {root}: holds the root of trust domain {rd.state.trust_domain}, but clusterset "
                f"{cs.name!r} uses {td}"
            )
        clusters: dict[str, CAFiles] = {}
        authorities = [(str(c.id), SpiffeId.cluster(td, str(c.id)), root / INTERMEDIATES / str(c.id))
                       for c in cs.clusters]
        authorities.append((FEDERATION_DIR, SpiffeId.federation(td), root / INTERMEDIATES / FEDERATION_DIR))
        for name, authority, out in authorities:
            _ca, made = store.issue_intermediate(root, authority, out)
            if made:
                created.append(str(out))
                log.info("event=intermediate_created authority=%s dir=%s", authority, out)
            if name != FEDERATION_DIR:
                clusters[name] = _read(out)
        federation = _read(root / INTERMEDIATES / FEDERATION_DIR)
        return CAReport(root, tuple(created),
                        ClusterCA(clusters=clusters, federation=federation, root_fingerprint=rd.active.fingerprint))
    except TrustError as exc:
        raise RenderError(f"CA directory {root}: {exc}") from exc
