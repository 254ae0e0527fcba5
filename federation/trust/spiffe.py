"""Validating SPIFFE types: :class:`TrustDomain` and :class:`SpiffeId`.

The rules follow the SPIFFE ID specification: the scheme is ``spiffe``, the trust domain is made of lower-case
letters, digits, ``.``, ``-`` and ``_`` (no port, no userinfo, no upper case, no percent-encoding), the path is a
series of non-empty segments of letters, digits, ``.``, ``-`` and ``_`` with no ``.``/``..`` segment, no trailing
slash, no query and no fragment, and the whole ID is at most 2048 bytes.

meshfed uses two kinds of path:

* workloads: ``spiffe://<td>/ns/<namespace>/sa/<service account>`` (the Istio convention), and
* authorities of the federation: ``spiffe://<td>/meshfed/cluster/<cluster>`` (a cluster's identity toward the
  federation service, also carried by that cluster's intermediate CA) and ``spiffe://<td>/meshfed/federation``
  (the federation service itself).

Errors raise :class:`federation.trust.errors.InvalidSpiffeId`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from discovery.model import ClusterId, DiscoveryError, cluster_id
from federation.trust.errors import InvalidSpiffeId

SCHEME_PREFIX = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN = 255
_TD_CHARS = re.compile(r"^[a-z0-9._-]+$")
_SEGMENT_CHARS = re.compile(r"^[A-Za-z0-9._-]+$")
MESHFED_SEGMENT = "meshfed"


@dataclass(frozen=True, order=True)
class TrustDomain:
    """A SPIFFE trust domain name such as ``cluster.local`` or ``example.org``."""

    name: str

    def __post_init__(self) -> None:
        name = self.name
        if not isinstance(name, str) or not name:
            raise InvalidSpiffeId("trust domain is empty")
        if len(name) > MAX_TRUST_DOMAIN:
            raise InvalidSpiffeId(f"trust domain {name[:40]!r}... is longer than {MAX_TRUST_DOMAIN} characters")
        if ":" in name:
            raise InvalidSpiffeId(f"trust domain {name!r} must not contain a port or ':'")
        if "@" in name:
            raise InvalidSpiffeId(f"trust domain {name!r} must not contain userinfo ('@')")
        if not _TD_CHARS.match(name):
            raise InvalidSpiffeId(
                f"trust domain {name!r} may only contain lower-case letters, digits, '.', '-' and '_'"
            )

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        """A trust domain from ``example.org`` or ``spiffe://example.org`` (with no path)."""
        if not isinstance(text, str):
            raise InvalidSpiffeId(f"trust domain must be a string, not {type(text).__name__}")
        if text.startswith(SCHEME_PREFIX):
            sid = SpiffeId.parse(text)
            if sid.path:
                raise InvalidSpiffeId(f"{text!r} has a path; a trust domain is only spiffe://<name>")
            return sid.trust_domain
        if "://" in text:
            raise InvalidSpiffeId(f"trust domain {text!r} has a scheme other than spiffe")
        return cls(text)

    def id(self) -> SpiffeId:
        """The trust domain's own ID, ``spiffe://<name>``."""
        return SpiffeId(self, "")

    def __str__(self) -> str:
        return self.name


def _check_path(path: str, *, where: str) -> None:
    if path == "":
        return
    if not path.startswith("/"):
        raise InvalidSpiffeId(f"{where}: path {path!r} must start with '/'")
    for seg in path[1:].split("/"):
        if seg == "":
            raise InvalidSpiffeId(f"{where}: path {path!r} has an empty segment (double or trailing '/')")
        if seg in (".", ".."):
            raise InvalidSpiffeId(f"{where}: path {path!r} has a '.' or '..' segment")
        if not _SEGMENT_CHARS.match(seg):
            raise InvalidSpiffeId(
                f"{where}: path segment {seg!r} may only contain letters, digits, '.', '-' and '_'"
            )


@dataclass(frozen=True, order=True)
class SpiffeId:
    """A SPIFFE ID: trust domain plus path (``""`` or ``/seg/seg...``)."""

    trust_domain: TrustDomain
    path: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain):
            raise InvalidSpiffeId(f"trust_domain must be a TrustDomain, not {type(self.trust_domain).__name__}")
        _check_path(self.path, where=f"SPIFFE ID in {self.trust_domain}")
        if len(str(self).encode()) > MAX_ID_BYTES:
            raise InvalidSpiffeId(f"SPIFFE ID is longer than {MAX_ID_BYTES} bytes")

    # -- constructors ---------------------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse ``spiffe://<trust domain>[/path]`` strictly (no query, fragment, port, userinfo, upper case)."""
        if not isinstance(text, str) or not text:
            raise InvalidSpiffeId("SPIFFE ID is empty")
        if len(text.encode()) > MAX_ID_BYTES:
            raise InvalidSpiffeId(f"SPIFFE ID is longer than {MAX_ID_BYTES} bytes")
        if not text.startswith(SCHEME_PREFIX):
            raise InvalidSpiffeId(f"{text!r} is not a SPIFFE ID: the scheme must be exactly 'spiffe://'")
        rest = text[len(SCHEME_PREFIX) :]
        for ch, what in (("?", "query"), ("#", "fragment"), ("%", "percent-encoding")):
            if ch in rest:
                raise InvalidSpiffeId(f"{text!r}: a SPIFFE ID must not contain a {what} ({ch!r})")
        td, slash, path = rest.partition("/")
        if not td:
            raise InvalidSpiffeId(f"{text!r}: the trust domain is missing")
        try:
            trust_domain = TrustDomain(td)
        except InvalidSpiffeId as exc:
            raise InvalidSpiffeId(f"{text!r}: {exc}") from exc
        return cls(trust_domain, slash + path if slash else "")

    @classmethod
    def workload(cls, td: TrustDomain, ns: str, sa: str) -> SpiffeId:
        """``spiffe://<td>/ns/<ns>/sa/<sa>``."""
        return cls(td, f"/ns/{ns}/sa/{sa}")

    @classmethod
    def cluster(cls, td: TrustDomain, cluster: str) -> SpiffeId:
        """A cluster's identity toward the federation: ``spiffe://<td>/meshfed/cluster/<cluster>``.

        The cluster name must be a valid cluster id (an RFC 1123 label)."""
        try:
            cid = cluster_id(cluster)
        except DiscoveryError as exc:
            raise InvalidSpiffeId(str(exc)) from exc
        return cls(td, f"/{MESHFED_SEGMENT}/cluster/{cid}")

    @classmethod
    def federation(cls, td: TrustDomain) -> SpiffeId:
        """The federation service's identity: ``spiffe://<td>/meshfed/federation``."""
        return cls(td, f"/{MESHFED_SEGMENT}/federation")

    # -- views ----------------------------------------------------------------------------------------------------
    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path[1:].split("/")) if self.path else ()

    @property
    def namespace(self) -> str | None:
        """The namespace of a workload ID (``/ns/<ns>/sa/<sa>``), else None."""
        s = self.segments
        return s[1] if len(s) == 4 and s[0] == "ns" and s[2] == "sa" else None

    @property
    def service_account(self) -> str | None:
        s = self.segments
        return s[3] if len(s) == 4 and s[0] == "ns" and s[2] == "sa" else None

    @property
    def is_workload(self) -> bool:
        return self.namespace is not None

    @property
    def cluster_name(self) -> ClusterId | None:
        """The cluster of a cluster identity (``/meshfed/cluster/<name>``), else None."""
        s = self.segments
        if len(s) == 3 and s[0] == MESHFED_SEGMENT and s[1] == "cluster":
            try:
                return cluster_id(s[2])
            except DiscoveryError:
                return None
        return None

    @property
    def is_federation(self) -> bool:
        return self.segments == (MESHFED_SEGMENT, "federation")

    @property
    def is_meshfed(self) -> bool:
        """True for IDs in meshfed's reserved ``/meshfed/...`` space (cluster and federation identities)."""
        s = self.segments
        return bool(s) and s[0] == MESHFED_SEGMENT

    def member_of(self, td: TrustDomain) -> bool:
        return self.trust_domain == td

    def __str__(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain.name}{self.path}"
