"""A federation server that closes connections right after the TLS handshake (stopping or restarting) is
unreachable, not a refusal: the agent retries what it was publishing instead of dropping it as rejected."""

from __future__ import annotations

import asyncio

import pytest

from federation.client import Unreachable
from federation.records import ExportSet
from tests.federation.fedkit import Pki, info
from tests.support.procs import free_port

pytestmark = pytest.mark.timeout(60)


async def test_server_closing_after_handshake_is_unreachable_not_refused() -> None:
    pki = Pki.create()
    accepted: list[int] = []

    async def hang_up(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        writer.close()

    port = free_port()
    server = await asyncio.start_server(hang_up, "127.0.0.1", port, ssl=pki.server_ssl())
    try:
        async with pki.client("east", f"https://127.0.0.1:{port}", request_timeout_s=5.0) as client:
            for _ in range(5):
                with pytest.raises(Unreachable):
                    await client.register(info("east"))
                with pytest.raises(Unreachable):
                    await client.publish(ExportSet(cluster=info("east").id, generation=1, services=()))
        assert accepted  # the handshakes did reach the server
    finally:
        server.close()
        await server.wait_closed()
