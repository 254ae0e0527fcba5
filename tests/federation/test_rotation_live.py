"""Root rotation on a running federation service and client, in process, with real TLS on loopback.

Regression for issue 18: after `reissue` the service kept serving its old-root certificate, and after
`retire-root` members' pooled connections (authenticated with their old-root leaves) got 401 on every heartbeat.
Here the service follows its CA directory (new serving leaf, new client-verification bundle, swapped in for new
connections), the client moves onto new credentials and closes the old connections, and `GET /v1/trust/status`
shows who still depends on the old root.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from discovery.model import ClusterId
from federation.client import FederationClient, Refused, Unreachable, cluster_credentials
from federation.service import create_app, serve
from federation.service.credentials import ServingCredentials
from federation.store.factory import open_store
from federation.trust.bundle import fingerprint, load_pem_certs
from federation.trust.spiffe import SpiffeId, TrustDomain
from federation.trust.store import (
    init_root,
    issue_intermediate,
    load_bundle,
    load_root,
    rotate_add_root,
    rotate_reissue,
    rotate_retire_root,
)
from federation.trust.tls import peer_chain_der
from tests.federation.fedkit import info
from tests.support.procs import free_port

TD = TrustDomain.parse("rotation.test")
EAST = ClusterId("east")


def _dirs(tmp: Path) -> tuple[Path, Path, Path]:
    root, fed, east = tmp / "root", tmp / "federation", tmp / "east"
    init_root(root, TD)
    issue_intermediate(root, SpiffeId.federation(TD), fed)
    issue_intermediate(root, SpiffeId.cluster(TD, EAST), east)
    return root, fed, east


async def _served_root(port: int, trust: Path) -> str:
    """The root the service's certificate chains to, as a new client connecting now sees it."""
    bundle = load_bundle(trust)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    _reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        sslobj = writer.get_extra_info("ssl_object")
        chain = [x509.load_der_x509_certificate(d) for d in peer_chain_der(sslobj)]
    finally:
        writer.close()
    root = bundle.issuing_root(chain)
    assert root is not None
    return root


@pytest.mark.timeout(120)
async def test_service_and_client_follow_a_full_rotation_without_restart(tmp_path: Path) -> None:
    root, fed_dir, east_dir = _dirs(tmp_path)
    old_root = load_root(root).state.active
    creds = ServingCredentials(fed_dir)
    store = open_store(f"sqlite:{tmp_path / 'fed.db'}")
    app = create_app(store=store, bundle=creds.bundle, serving=creds.info)
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    try:
        async with serve(app, host="127.0.0.1", port=port, ssl_context=creds.context, shutdown_timeout=0.5):
            ctx, bundle = cluster_credentials(east_dir, EAST)
            async with FederationClient(url, ssl_context=ctx, cluster=EAST, bundle=bundle) as client, \
                    client.fork() as fork:  # the agent's lease thread heartbeats through a fork: it must follow too
                await client.register(info("east"))
                await fork.heartbeat()
                status: dict[str, Any] = await client.trust_status()
                assert status["serving"]["root_fingerprint"] == old_root
                assert {c["root_fingerprint"] for c in status["connections"]} == {old_root}

                rotate_add_root(root)
                assert creds.poll()  # the bundle now trusts both roots
                assert len(creds.bundle().roots) == 2
                client.set_credentials(*cluster_credentials(east_dir, EAST), grace_s=0.1)  # as the control plane does
                await fork.heartbeat()
                rotate_reissue(root)
                new_root = load_root(root).state.active
                assert new_root != old_root
                assert creds.poll()
                # The service's own certificate moved (it used to keep the old one until a restart).
                assert await _served_root(port, fed_dir) == new_root
                assert (await client.trust_status())["serving"]["root_fingerprint"] == new_root

                # The member moves onto a new-root certificate; its old pooled connections are closed after grace.
                client.set_credentials(*cluster_credentials(east_dir, EAST), grace_s=0.1)
                assert client.old_sessions() >= 2  # its own old pool closing, the fork not moved yet
                await client.heartbeat()
                await fork.heartbeat()  # moves onto the new credentials
                for _ in range(100):
                    if client.old_sessions() == 0:
                        break
                    await asyncio.sleep(0.05)
                assert client.old_sessions() == 0

                async def connections() -> set[str | None]:
                    return {c["root_fingerprint"] for c in (await client.trust_status())["connections"]}

                for _ in range(100):
                    if await connections() == {new_root}:
                        break
                    await asyncio.sleep(0.05)
                assert await connections() == {new_root}

                # Retire: the service drops the old root from its verify store; the member keeps heartbeating.
                rotate_retire_root(root, force=True)
                assert creds.poll()
                assert creds.bundle().fingerprints == (new_root,)
                await client.heartbeat()
                await client.heartbeat()

            # A client still holding an old-root certificate is refused at the handshake now.
            stale = FederationClient(url, ssl_context=ctx, cluster=EAST, bundle=None)
            async with stale:
                # Refused by the TLS layer itself (the verify store was rebuilt without the old root), not a 401.
                with pytest.raises(Unreachable) as refused:
                    await stale.heartbeat()
                assert not isinstance(refused.value, Refused)
    finally:
        await store.close()


def test_a_half_written_directory_keeps_the_credentials_in_force(tmp_path: Path) -> None:
    _, fed_dir, _ = _dirs(tmp_path)
    creds = ServingCredentials(fed_dir)
    before = creds.info()
    (fed_dir / "ca-cert.pem").write_bytes(b"not a certificate")
    assert not creds.poll()
    assert creds.info()["leaf_fingerprint"] == before["leaf_fingerprint"]
    leaf = load_pem_certs((fed_dir / "cert-chain.pem").read_bytes(), what="chain")[0]
    assert fingerprint(leaf) == before["intermediate_fingerprint"]
