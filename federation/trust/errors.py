"""Every error the trust package raises, in one tree (modelled on typed CA errors, not on strings).

Exception tree::

    TrustError
     +-- InvalidSpiffeId      a trust domain or SPIFFE ID that breaks the SPIFFE ID spec (also a ValueError)
     +-- BadCSR               a CSR that does not parse, whose signature is forged, or whose SANs/key are unusable
     +-- IdentityMismatch     the CSR asks for another identity than the caller was authenticated as, or this CA
     |                        may not sign that identity (e.g. a cluster identity of another cluster)
     +-- ForeignTrustDomain   an identity, certificate or bundle of another trust domain
     +-- InvalidTTL           a requested lifetime that is zero or negative
     |    +-- TTLExceeded     a requested lifetime above the CA's cap
     +-- CANotReady           the signing CA is expired, not yet valid, or its files are missing/inconsistent
     +-- ChainError           a certificate chain that does not verify to a root of the trust bundle
     +-- NotBound             a chain that verifies but is not bound to the identity/cluster it claims
     +-- BundleError          a trust bundle (PEM or SPIFFE JWKS) that cannot be read
     +-- RotationError        a rotation step refused because it would break trust (e.g. retiring a root in use)
     +-- CAStoreError         reading or writing a CA directory failed (file missing, unreadable, bad mode)

Third-party errors (``cryptography``'s ``ValueError``/``InvalidSignature``, ``OSError``) are wrapped at the point
they are caught with ``raise ... from exc``.
"""

from __future__ import annotations


class TrustError(Exception):
    """Root of every error the trust package raises."""


class InvalidSpiffeId(TrustError, ValueError):
    """A trust domain name or SPIFFE ID that is not valid per the SPIFFE ID specification."""


class BadCSR(TrustError):
    """The certificate signing request cannot be used: unparseable, bad signature, wrong SANs or key."""


class IdentityMismatch(TrustError):
    """The requested identity differs from the authenticated one, or this CA may not sign it."""


class ForeignTrustDomain(TrustError):
    """Something belongs to another trust domain than the one expected."""


class InvalidTTL(TrustError, ValueError):
    """A requested certificate lifetime that is not positive."""


class TTLExceeded(InvalidTTL):
    """A requested certificate lifetime above the CA's cap."""


class CANotReady(TrustError):
    """The CA cannot sign now: expired, not yet valid, or missing."""


class ChainError(TrustError):
    """A certificate chain that does not verify to one of the bundle's roots."""


class NotBound(TrustError):
    """A verified chain that is not bound to the identity or cluster it is presented as."""


class BundleError(TrustError):
    """A trust bundle that cannot be parsed or is inconsistent."""


class RotationError(TrustError):
    """A rotation step refused because it would break trust."""


class CAStoreError(TrustError):
    """A CA directory cannot be read or written."""
