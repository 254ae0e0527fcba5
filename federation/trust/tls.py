"""TLS for the federation service (the IO edge): ``ssl.SSLContext`` builders and the peer's chain.

Both sides present ``leaf + intermediate`` (a cluster's ``cert-chain``) and trust only the bundle's roots, so
OpenSSL builds and verifies the chain during the handshake. To learn *which cluster* the peer is, the server then
needs the intermediate too (see :mod:`federation.trust.identity`); Python 3.11's public ``getpeercert`` gives
only the leaf. :func:`peer_chain_der` therefore uses, in order:

1. ``SSLObject.get_verified_chain()`` (public from Python 3.13),
2. the same method on the private ``_sslobj`` (present since CPython 3.10), then ``get_unverified_chain()``,
3. the leaf plus, from ``known_intermediates``, the one whose subject key id equals the leaf's authority key id.

Whatever the source, :func:`federation.trust.identity.cluster_of_peer` verifies the chain again from scratch
against the bundle, so the source is never trusted, it only supplies candidate certificates.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from federation.trust.bundle import TrustBundle
from federation.trust.errors import CAStoreError, ChainError

PemSource = bytes | Path


def load_identity(ctx: ssl.SSLContext, cert_chain: PemSource, key: PemSource) -> None:
    """Load cert chain and key from paths, or from bytes through a private (0700 dir, 0600 files) temp copy."""
    try:
        if isinstance(cert_chain, Path) and isinstance(key, Path):
            ctx.load_cert_chain(certfile=str(cert_chain), keyfile=str(key))
            return
        with tempfile.TemporaryDirectory(prefix="meshfed-tls-") as tmp:
            os.chmod(tmp, 0o700)
            paths = []
            for name, src in (("chain.pem", cert_chain), ("key.pem", key)):
                if isinstance(src, Path):
                    paths.append(str(src))
                    continue
                p = Path(tmp) / name
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(src)
                paths.append(str(p))
            ctx.load_cert_chain(certfile=paths[0], keyfile=paths[1])
    except (ssl.SSLError, OSError) as exc:
        raise CAStoreError(f"cannot load TLS certificate chain and key: {exc}") from exc


def _base(purpose: int, bundle: TrustBundle) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # identities are SPIFFE URI SANs, checked after the handshake
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=bundle.to_pem().decode())
    return ctx


def server_ssl_context(cert_chain: PemSource, key: PemSource, bundle: TrustBundle) -> ssl.SSLContext:
    """Server side: present ``cert_chain`` (leaf + intermediate), require a client certificate chaining to a root
    of ``bundle`` (CERT_REQUIRED)."""
    ctx = _base(ssl.PROTOCOL_TLS_SERVER, bundle)
    load_identity(ctx, cert_chain, key)
    return ctx


def client_ssl_context(cert_chain: PemSource, key: PemSource, bundle: TrustBundle) -> ssl.SSLContext:
    """Client side: present ``cert_chain``, verify the server against ``bundle``; check the server's SPIFFE ID
    after the handshake with :func:`federation.trust.identity.federation_server_of_peer`."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT, bundle)
    load_identity(ctx, cert_chain, key)
    return ctx


class SwappableServerContext:
    """A server ``ssl.SSLContext`` whose certificate *and* trust can be replaced for new connections.

    An ``SSLContext`` can add roots but never drop one, and a listening server (aiohttp's ``TCPSite``) keeps the
    context it was started with. :attr:`context` is that outer context; its ``sni_callback`` (called for every
    ClientHello, with ``None`` when the client sends no SNI) moves the connection onto the current inner context,
    whose certificate and verify store OpenSSL then uses. :meth:`replace` builds a fresh inner context (so a retired
    root really is gone) and swaps it in; connections already open keep theirs."""

    def __init__(self, cert_chain: PemSource, key: PemSource, bundle: TrustBundle) -> None:
        self._current = server_ssl_context(cert_chain, key, bundle)
        self.context = server_ssl_context(cert_chain, key, bundle)
        self.context.sni_callback = self._select
        self.swaps = 0

    def replace(self, cert_chain: PemSource, key: PemSource, bundle: TrustBundle) -> None:
        """Serve ``cert_chain`` and trust exactly ``bundle`` from the next handshake on (raises, keeping the
        current context, if they do not load)."""
        self._current = server_ssl_context(cert_chain, key, bundle)
        self.swaps += 1

    def _select(self, ssl_object: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        ssl_object.context = self._current


def _ski(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return None


def _aki(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except x509.ExtensionNotFound:
        return None


def _chain_from(obj: Any, name: str) -> list[bytes] | None:
    fn = getattr(obj, name, None)
    if fn is None:
        return None
    chain = fn()
    if not chain:
        return None
    out: list[bytes] = []
    for c in chain:
        # 3.13 public API returns DER bytes; 3.10-3.12 _ssl.Certificate objects have public_bytes(format).
        out.append(c if isinstance(c, bytes) else bytes(c.public_bytes(ssl._ssl.ENCODING_DER)))  # type: ignore[attr-defined]
    return out


def peer_chain_der(
    ssl_object: ssl.SSLObject | ssl.SSLSocket, *, known_intermediates: Sequence[bytes] = ()
) -> list[bytes]:
    """The peer's chain as DER, leaf first (see the module docstring for where it comes from)."""
    for holder in (ssl_object, getattr(ssl_object, "_sslobj", None)):
        if holder is None:
            continue
        for name in ("get_verified_chain", "get_unverified_chain"):
            chain = _chain_from(holder, name)
            if chain and len(chain) >= 2:
                return chain
    leaf_der = ssl_object.getpeercert(binary_form=True)
    if not leaf_der:
        raise ChainError("peer presented no certificate")
    leaf = x509.load_der_x509_certificate(leaf_der)
    aki = _aki(leaf)
    for der in known_intermediates:
        inter = x509.load_der_x509_certificate(der)
        if aki is not None and _ski(inter) == aki and inter.subject == leaf.issuer:
            return [leaf_der, inter.public_bytes(serialization.Encoding.DER)]
    raise ChainError("cannot obtain the peer's intermediate: not in its TLS chain nor among the known intermediates")
