"""The demo workload: a tiny HTTP service that says who it is and who called it.

It answers every path with JSON naming its service, cluster and workload, and the caller's SPIFFE ID as its
sidecar forwarded it in ``x-forwarded-client-cert`` (the ``URI=`` field), so a person or a test can see that a
request crossed clusters with the caller's identity intact. Run: ``python -m meshfed.demoapp --listen
127.0.0.1:PORT --service reviews --cluster west --workload reviews-west-0``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal

from aiohttp import web

from discovery.addresses import parse_hostport


def caller_identity(xfcc: str) -> str:
    """The ``URI=`` value of the last element of an ``x-forwarded-client-cert`` header ("" if none)."""
    if not xfcc:
        return ""
    last = xfcc.split(",")[-1]
    for field in last.split(";"):
        key, _, value = field.partition("=")
        if key.strip().lower() == "uri":
            return value.strip().strip('"')
    return ""


def make_app(*, service: str, cluster: str, workload: str) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        body = {
            "service": service,
            "cluster": cluster,
            "workload": workload,
            "path": request.path,
            "method": request.method,
            "caller": caller_identity(request.headers.get("x-forwarded-client-cert", "")),
            "headers": {k.lower(): v for k, v in request.headers.items()},
        }
        return web.Response(text=json.dumps(body), content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def serve(*, host: str, port: int, service: str, cluster: str, workload: str) -> None:
    runner = web.AppRunner(make_app(service=service, cluster=cluster, workload=workload), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="meshfed-demoapp")
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--service", required=True)
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--workload", required=True)
    args = parser.parse_args()
    listen = parse_hostport(args.listen)
    asyncio.run(serve(host=listen.host, port=listen.port, service=args.service, cluster=args.cluster,
                      workload=args.workload))


if __name__ == "__main__":
    main()
