"""The cluster binding: a chain proves a cluster only through its root-signed intermediate; and real mTLS over
loopback with the ``ssl`` contexts, the server learning the client's cluster from the handshake."""

from __future__ import annotations

import asyncio
import ssl
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from federation.trust import (
    ChainError,
    IntermediateCA,
    NotBound,
    RootCA,
    SpiffeId,
    TrustBundle,
    TrustDomain,
    cluster_of_peer,
    create_intermediate,
    create_root,
    federation_server_of_peer,
    issue_workload,
    workload_of_peer,
)
from federation.trust.ca import _LEAF_BC, _LEAF_EKU, _LEAF_KEY_USAGE, private_key_pem
from federation.trust.tls import client_ssl_context, peer_chain_der, server_ssl_context

TD = TrustDomain("example.org")


@pytest.fixture(scope="module")
def root() -> RootCA:
    return create_root(TD)


@pytest.fixture(scope="module")
def bundle(root: RootCA) -> TrustBundle:
    return TrustBundle(TD, (root.cert,))


@pytest.fixture(scope="module")
def east(root: RootCA) -> IntermediateCA:
    return create_intermediate(root, SpiffeId.cluster(TD, "east"))


@pytest.fixture(scope="module")
def west(root: RootCA) -> IntermediateCA:
    return create_intermediate(root, SpiffeId.cluster(TD, "west"))


@pytest.fixture(scope="module")
def fed(root: RootCA) -> IntermediateCA:
    return create_intermediate(root, SpiffeId.federation(TD))


def der(chain_pem: list[bytes]) -> list[bytes]:
    return [x509.load_pem_x509_certificate(p).public_bytes(serialization.Encoding.DER) for p in chain_pem]


def rogue_leaf(ca: IntermediateCA, identity: SpiffeId, key: ec.EllipticCurvePrivateKey | None = None) -> list[bytes]:
    """What a compromised (or buggy) east CA could mint, bypassing sign_csr's own checks."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(_LEAF_BC, critical=True)
        .add_extension(_LEAF_KEY_USAGE, critical=True)
        .add_extension(_LEAF_EKU, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]), critical=True)
        .sign(ca.key, ca._hash)
    )
    return [leaf.public_bytes(serialization.Encoding.DER), ca.cert.public_bytes(serialization.Encoding.DER)]


def test_a_cluster_cert_proves_its_cluster(east: IntermediateCA, west: IntermediateCA, bundle: TrustBundle) -> None:
    _, chain = issue_workload(east, east.authority)
    assert cluster_of_peer(der(chain), bundle) == "east"
    _, chain = issue_workload(west, west.authority)
    assert cluster_of_peer(der(chain), bundle) == "west"


def test_east_cert_claiming_west_is_not_bound(east: IntermediateCA, bundle: TrustBundle) -> None:
    chain = rogue_leaf(east, SpiffeId.cluster(TD, "west"))
    with pytest.raises(NotBound, match="east's intermediate can only act as"):
        cluster_of_peer(chain, bundle)


def test_east_leaf_presented_with_west_intermediate_fails(
    east: IntermediateCA, west: IntermediateCA, bundle: TrustBundle
) -> None:
    """Swap in west's intermediate to make the SAN say west: the signature no longer verifies."""
    chain = rogue_leaf(east, SpiffeId.cluster(TD, "west"))
    chain[1] = west.cert.public_bytes(serialization.Encoding.DER)
    with pytest.raises(ChainError, match="not signed by the intermediate"):
        cluster_of_peer(chain, bundle)


def test_workload_cert_cannot_act_as_cluster(east: IntermediateCA, bundle: TrustBundle) -> None:
    _, chain = issue_workload(east, SpiffeId.workload(TD, "default", "reviews"))
    with pytest.raises(NotBound):
        cluster_of_peer(der(chain), bundle)
    peer = workload_of_peer(der(chain), bundle)
    assert peer.authority == east.authority and peer.spiffe_id.service_account == "reviews"


def test_federation_cert_is_not_a_cluster(fed: IntermediateCA, bundle: TrustBundle) -> None:
    _, chain = issue_workload(fed, fed.authority)
    with pytest.raises(NotBound, match="not a cluster CA"):
        cluster_of_peer(der(chain), bundle)
    federation_server_of_peer(der(chain), bundle)


def test_chain_to_a_foreign_root_fails(bundle: TrustBundle) -> None:
    other_root = create_root(TD)  # same trust domain, different key
    impostor = create_intermediate(other_root, SpiffeId.cluster(TD, "east"))
    _, chain = issue_workload(impostor, impostor.authority)
    with pytest.raises(ChainError, match="does not chain to any root"):
        cluster_of_peer(der(chain), bundle)


def test_leaf_only_and_expired_chains_fail(east: IntermediateCA, bundle: TrustBundle) -> None:
    _, chain = issue_workload(east, east.authority, ttl=timedelta(hours=1))
    with pytest.raises(ChainError, match="leaf and intermediate"):
        cluster_of_peer(der(chain)[:1], bundle)
    with pytest.raises(ChainError, match="expired"):
        cluster_of_peer(der(chain), bundle, now=datetime.now(UTC) + timedelta(hours=2))
    with pytest.raises(ChainError, match="not DER"):
        cluster_of_peer([b"junk", b"junk"], bundle)


def test_intermediate_that_can_sign_cas_is_refused(root: RootCA, bundle: TrustBundle) -> None:
    """An intermediate without pathlen 0 is not one we issue: refuse it even if the root signed it."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "loose")]))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://example.org/meshfed/cluster/x")]),
            critical=False,
        )
        .sign(root.key, root.cert.signature_hash_algorithm)  # type: ignore[arg-type]
    )
    loose = IntermediateCA(cert, key, chain=(root.cert,))
    chain = rogue_leaf(loose, SpiffeId.cluster(TD, "x"))
    with pytest.raises(ChainError, match="pathlen"):
        cluster_of_peer(chain, bundle)


# -- real mTLS on loopback --------------------------------------------------------------------------------------------


async def _serve_and_connect(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, bundle: TrustBundle
) -> tuple[str, list[bytes]]:
    """Server answers with the cluster it derives from the client's chain; returns (answer, server chain)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sslobj = writer.get_extra_info("ssl_object")
            try:
                answer = "cluster=" + cluster_of_peer(peer_chain_der(sslobj), bundle)
            except (NotBound, ChainError) as exc:
                answer = f"refused: {type(exc).__name__}"
            writer.write(answer.encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
            server_chain = peer_chain_der(writer.get_extra_info("ssl_object"))
            line = await reader.readline()
            writer.close()
            await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
    return line.decode().strip(), server_chain


def _identity(ca: IntermediateCA, sid: SpiffeId) -> tuple[bytes, bytes]:
    key_pem, chain = issue_workload(ca, sid)
    return b"".join(chain), key_pem


async def test_mtls_server_learns_the_clients_cluster(
    east: IntermediateCA, fed: IntermediateCA, bundle: TrustBundle
) -> None:
    srv_chain, srv_key = _identity(fed, fed.authority)
    cli_chain, cli_key = _identity(east, east.authority)
    answer, server_chain = await _serve_and_connect(
        server_ssl_context(srv_chain, srv_key, bundle), client_ssl_context(cli_chain, cli_key, bundle), bundle
    )
    assert answer == "cluster=east"
    federation_server_of_peer(server_chain, bundle)  # the client checks it talks to the federation service


async def test_mtls_rogue_west_cert_from_east_is_refused(
    east: IntermediateCA, fed: IntermediateCA, bundle: TrustBundle
) -> None:
    """The handshake succeeds (the chain is valid under the root), the binding does not."""
    srv_chain, srv_key = _identity(fed, fed.authority)
    key = ec.generate_private_key(ec.SECP256R1())
    rogue = rogue_leaf(east, SpiffeId.cluster(TD, "west"), key)
    rogue_pem = b"".join(x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM) for d in rogue)
    answer, _ = await _serve_and_connect(
        server_ssl_context(srv_chain, srv_key, bundle),
        client_ssl_context(rogue_pem, private_key_pem(key), bundle),
        bundle,
    )
    assert answer == "refused: NotBound"


async def test_mtls_client_of_a_foreign_root_cannot_connect(fed: IntermediateCA, bundle: TrustBundle) -> None:
    srv_chain, srv_key = _identity(fed, fed.authority)
    foreign = create_intermediate(create_root(TD), SpiffeId.cluster(TD, "east"))
    cli_chain, cli_key = _identity(foreign, foreign.authority)
    foreign_bundle = TrustBundle(TD, (foreign.chain[0],))
    answer = ""
    try:
        answer, _ = await _serve_and_connect(
            server_ssl_context(srv_chain, srv_key, bundle),
            client_ssl_context(cli_chain, cli_key, foreign_bundle.with_root(bundle.roots[0])),
            bundle,
        )
    except (ssl.SSLError, ConnectionError):
        answer = "handshake failed"
    # TLS 1.3: the client may finish its side before the server's alert; then it reads nothing
    assert answer in ("handshake failed", "")


def test_peer_chain_from_known_intermediates(east: IntermediateCA, bundle: TrustBundle) -> None:
    """Fallback for a TLS stack that exposes only the leaf: match the leaf's AKI among known intermediates."""
    _, chain = issue_workload(east, east.authority)
    leaf_der = der(chain)[0]

    class LeafOnly:  # the one method ssl exposes publicly on 3.11
        def getpeercert(self, binary_form: bool = False) -> bytes:
            return leaf_der

    known = [east.cert.public_bytes(serialization.Encoding.DER)]
    got = peer_chain_der(LeafOnly(), known_intermediates=known)  # type: ignore[arg-type]
    assert cluster_of_peer(got, bundle) == "east"
    with pytest.raises(ChainError, match="intermediate"):
        peer_chain_der(LeafOnly(), known_intermediates=[])  # type: ignore[arg-type]


def test_private_key_pem_is_pkcs8(east: IntermediateCA) -> None:
    key_pem, _ = issue_workload(east, east.authority)
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert private_key_pem(serialization.load_pem_private_key(key_pem, None)) == key_pem  # type: ignore[arg-type]
