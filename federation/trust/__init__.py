"""Trust for the clusterset: one root, an intermediate CA per cluster, SPIFFE workload certificates, bundles and
root rotation.

Pure core: :mod:`.spiffe` (ID types), :mod:`.ca` (root, intermediates, signing), :mod:`.bundle` (trust bundles),
:mod:`.identity` (binding a peer's chain to a cluster), :mod:`.rotation` (rotation state and phases).
IO edges: :mod:`.store` (CA directories on disk) and :mod:`.tls` (``ssl`` contexts, the peer's chain).

Errors: see the tree in :mod:`.errors`.
"""

from federation.trust.bundle import TrustBundle, fingerprint
from federation.trust.ca import (
    DEFAULT_MAX_TTL,
    DEFAULT_TTL,
    IntermediateCA,
    RootCA,
    create_intermediate,
    create_root,
    issue_workload,
    make_csr,
    sign_csr,
)
from federation.trust.errors import (
    BadCSR,
    BundleError,
    CANotReady,
    CAStoreError,
    ChainError,
    ForeignTrustDomain,
    IdentityMismatch,
    InvalidSpiffeId,
    InvalidTTL,
    NotBound,
    RotationError,
    TrustError,
    TTLExceeded,
)
from federation.trust.identity import (
    VerifiedPeer,
    cluster_of_peer,
    federation_server_of_peer,
    verify_peer,
    workload_of_peer,
)
from federation.trust.rotation import Phase, RootState
from federation.trust.spiffe import SpiffeId, TrustDomain

__all__ = [
    "DEFAULT_MAX_TTL",
    "DEFAULT_TTL",
    "BadCSR",
    "BundleError",
    "CANotReady",
    "CAStoreError",
    "ChainError",
    "ForeignTrustDomain",
    "IdentityMismatch",
    "IntermediateCA",
    "InvalidSpiffeId",
    "InvalidTTL",
    "NotBound",
    "Phase",
    "RootCA",
    "RootState",
    "RotationError",
    "SpiffeId",
    "TTLExceeded",
    "TrustBundle",
    "TrustDomain",
    "TrustError",
    "VerifiedPeer",
    "cluster_of_peer",
    "create_intermediate",
    "create_root",
    "federation_server_of_peer",
    "fingerprint",
    "issue_workload",
    "make_csr",
    "sign_csr",
    "verify_peer",
    "workload_of_peer",
]
