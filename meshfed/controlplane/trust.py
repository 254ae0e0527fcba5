"""The control plane's trust: this cluster's intermediate CA and trust bundle, re-read from the CA directory when
they change (``meshfed ca rotate ...``) without a restart, and the control plane's own leaves renewed before they
expire: its federation client certificate (a fresh TLS context handed to the federation client) and the serving
certificate of the mTLS ADS listener (rotated in place) and that of the injection webhook (reloaded into its
``ssl.SSLContext``, which new handshakes then use). Workload certificates are re-issued on a CA change, and
file-based ones (proxyless gRPC, :mod:`meshfed.certfiles`) kept current."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc

from discovery.model import ClusterId
from federation.client import FederationClient
from federation.trust.bundle import TrustBundle
from federation.trust.ca import IntermediateCA, issue_workload
from federation.trust.errors import TrustError
from federation.trust.spiffe import SpiffeId
from federation.trust.store import load_bundle, load_cluster_ca
from federation.trust.tls import client_ssl_context, load_identity
from gateway.sds import WorkloadCertIssuer, bundle_pem
from meshfed import xdstls
from meshfed.certfiles import CertFiles

log = logging.getLogger("meshfed.controlplane")

#: Lifetime of the control plane's own leaves (federation client, mTLS xDS serving).
LEAF_TTL = timedelta(hours=24)
#: The CA directory's files whose change means a new intermediate or bundle.
CA_FILES = ("ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem")


def renew_at(ttl: timedelta) -> datetime:
    """When a leaf issued now with ``ttl`` is renewed: at two thirds of its lifetime."""
    return datetime.now(UTC) + ttl * 2 / 3


class TrustRenewal:
    """The CA and bundle in force for one cluster's control plane, and its own leaves (see the module docstring).
    Raises ``TrustError`` at construction when the CA directory cannot be loaded."""

    def __init__(self, *, ca_dir: Path, cluster: ClusterId, poll_s: float, cert_files: CertFiles) -> None:
        self.ca_dir = ca_dir
        self.cluster = cluster
        self.poll_s = poll_s
        self.cert_files = cert_files
        self.ca: IntermediateCA = load_cluster_ca(ca_dir)
        self.bundle: TrustBundle = load_bundle(ca_dir)
        self.reloads = 0
        # The certificates the control plane itself presents (rotation reports them).
        self.fed_client_chain = b""
        self.mtls_serving_chain = b""
        self.federation_client: FederationClient | None = None
        self._fed_ctx: ssl.SSLContext | None = None
        self._fed_renew_at = datetime.max.replace(tzinfo=UTC)
        self._mtls_creds: xdstls.RotatingServerCredentials | None = None
        self._mtls_hosts: tuple[str, ...] = ()
        self._mtls_renew_at = datetime.max.replace(tzinfo=UTC)
        self.webhook_serving_chain = b""
        self._webhook_ctx: ssl.SSLContext | None = None
        self._webhook_hosts: tuple[str, ...] = ()
        self._webhook_renew_at = datetime.max.replace(tzinfo=UTC)

    # ---- the control plane's own leaves ---------------------------------------------------------------------

    def federation_context(self) -> ssl.SSLContext:
        """A client TLS context with a fresh leaf of this cluster's identity, trusting exactly the current bundle
        (so a retired root is gone)."""
        sid = SpiffeId.cluster(self.bundle.trust_domain, self.cluster)
        key_pem, chain = issue_workload(self.ca, sid, ttl=LEAF_TTL)
        self._fed_renew_at = renew_at(LEAF_TTL)
        self.fed_client_chain = b"".join(chain)
        self._fed_ctx = client_ssl_context(self.fed_client_chain, key_pem, self.bundle)
        return self._fed_ctx

    def serving_credentials(self, hosts: tuple[str, ...]) -> grpc.ServerCredentials:
        """Server credentials for the mTLS ADS listener, valid for ``hosts``; renewed in place from now on."""
        self._mtls_hosts = hosts
        key_pem, chain_pem = self._serving_certificate()
        self._mtls_creds = xdstls.RotatingServerCredentials(key_pem, chain_pem, bundle_pem(self.bundle).encode())
        return self._mtls_creds.credentials

    def _serving_certificate(self) -> tuple[bytes, bytes]:
        sid = SpiffeId.workload(self.bundle.trust_domain, "meshfed-system", "meshfed-controlplane")
        key_pem, chain_pem = xdstls.serving_certificate(self.ca, sid, self._mtls_hosts, ttl=LEAF_TTL)
        self._mtls_renew_at = renew_at(LEAF_TTL)
        self.mtls_serving_chain = chain_pem
        return key_pem, chain_pem

    def webhook_context(self, hosts: tuple[str, ...]) -> ssl.SSLContext:
        """A server TLS context for the injection webhook (no client certificate: the API server presents none),
        its certificate valid for ``hosts`` (the webhook Service's DNS names); renewed in place from now on."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._webhook_ctx, self._webhook_hosts = ctx, hosts
        self._load_webhook_certificate()
        return ctx

    def _load_webhook_certificate(self) -> None:
        assert self._webhook_ctx is not None
        sid = SpiffeId.workload(self.bundle.trust_domain, "meshfed-system", "meshfed-controlplane")
        key_pem, chain_pem = xdstls.serving_certificate(self.ca, sid, self._webhook_hosts, ttl=LEAF_TTL)
        load_identity(self._webhook_ctx, chain_pem, key_pem)
        self._webhook_renew_at = renew_at(LEAF_TTL)
        self.webhook_serving_chain = chain_pem

    # ---- the CA directory ------------------------------------------------------------------------------------

    def _ca_signature(self) -> tuple[tuple[str, float, int], ...]:
        out = []
        for name in CA_FILES:
            try:
                st = (self.ca_dir / name).stat()
                out.append((name, st.st_mtime, st.st_size))
            except OSError:
                out.append((name, 0.0, 0))
        return tuple(out)

    async def run(self, *, issuer: WorkloadCertIssuer, on_reload: Callable[[], None]) -> None:
        """Poll the CA directory; on a new intermediate or bundle re-issue ``issuer``'s workload certificates and
        call ``on_reload``; renew the own leaves at two thirds of their lifetime (or on a CA change)."""
        last = self._ca_signature()
        while True:
            await asyncio.sleep(self.poll_s)
            changed = False
            sig = self._ca_signature()
            if sig != last:
                try:
                    ca = await asyncio.to_thread(load_cluster_ca, self.ca_dir)
                    bundle = await asyncio.to_thread(load_bundle, self.ca_dir)
                except TrustError as exc:
                    # Caught half-written, or broken: retried on the next tick until it loads.
                    log.error("CA reload failed dir=%s error=%s; keeping the CA in force", self.ca_dir, exc)
                else:
                    last = sig
                    changed = ca.fingerprint != self.ca.fingerprint or bundle.fingerprints != self.bundle.fingerprints
                    self.ca, self.bundle = ca, bundle
            now = datetime.now(UTC)
            try:
                if self._fed_ctx is not None and (changed or now >= self._fed_renew_at):
                    # A fresh context (not the old one reloaded): it trusts exactly the new bundle, so a retired
                    # root is gone; the client moves its calls and its watch onto it and closes the pooled
                    # connections that authenticated with the previous certificate.
                    ctx = self.federation_context()
                    if self.federation_client is not None:
                        self.federation_client.set_credentials(ctx, self.bundle)
                    log.info("federation client certificate renewed cluster=%s", self.cluster)
                if self._mtls_creds is not None and (changed or now >= self._mtls_renew_at):
                    key_pem, chain_pem = self._serving_certificate()
                    self._mtls_creds.rotate(key_pem, chain_pem, bundle_pem(self.bundle).encode())
                    log.info("mTLS xDS serving certificate renewed cluster=%s", self.cluster)
                if self._webhook_ctx is not None and (changed or now >= self._webhook_renew_at):
                    await asyncio.to_thread(self._load_webhook_certificate)
                    log.info("injection webhook serving certificate renewed cluster=%s", self.cluster)
                if changed:
                    rotated = issuer.reissue_all(ca=self.ca)
                    self.reloads += 1
                    log.info("CA reloaded cluster=%s intermediate=%s roots=%s workload_certs_reissued=%d",
                             self.cluster, self.ca.fingerprint, ",".join(self.bundle.fingerprints), len(rotated))
                    on_reload()
                # File-based workload certificates (proxyless gRPC): rewritten when stale for this CA and bundle.
                await asyncio.to_thread(self.cert_files.refresh, self.ca, self.bundle)
            except TrustError as exc:
                log.error("certificate renewal failed cluster=%s error=%s; retrying", self.cluster, exc)
