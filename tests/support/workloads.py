"""Stand-in workloads and plain clients for end-to-end tests: small aiohttp apps on loopback, an HTTP GET, and a
TLS handshake probe. Each app is started by the calling fixture and cleaned up by it (``runner.cleanup()``)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web

from gateway.context import WorkloadCert

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def serve_app(port: int, handle: Handler) -> web.AppRunner:
    """Serve ``handle`` for every method and path on 127.0.0.1:``port``; the caller cleans the runner up."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def echo_app(port: int, name: str) -> web.AppRunner:
    """A workload: answers every request with its own name, the x-forwarded-client-cert it received and the
    Host it was asked for."""

    async def handle(request: web.Request) -> web.Response:
        return web.json_response({"app": name, "xfcc": request.headers.get("x-forwarded-client-cert", ""),
                                  "host": request.host})

    return await serve_app(port, handle)


async def http_get(port: int, path: str = "/", *, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """GET http://127.0.0.1:``port````path`` (10 s at most); the status and the body as text."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session, session.get(
            f"http://127.0.0.1:{port}{path}", headers=headers) as resp:
        return resp.status, await resp.text()


async def tls_handshake(port: int, sni: str, *, cert: WorkloadCert | None, bundle: str | None,
                        tmp: Path) -> ssl.SSLObject | None:
    """Try a TLS handshake to 127.0.0.1:port with ``sni`` (and ``cert`` as the client certificate); the SSL
    object (peer certificate) on success, None if refused. The key is written to ``tmp`` with mode 0600."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if bundle is None:
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cadata=bundle)
    if cert is not None:
        (tmp / "c.pem").write_text(cert.chain_pem)
        (tmp / "k.pem").write_text(cert.key_pem)
        (tmp / "k.pem").chmod(0o600)
        ctx.load_cert_chain(tmp / "c.pem", tmp / "k.pem")
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        _reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=sni), timeout=10)
    except (ssl.SSLError, ConnectionError, OSError, asyncio.IncompleteReadError):
        return None
    obj = writer.get_extra_info("ssl_object")
    writer.close()
    try:
        await writer.wait_closed()
    except (ssl.SSLError, ConnectionError, OSError):
        pass
    return obj  # type: ignore[no-any-return]
