"""The proxyless gRPC demo: an echo service and a client that use gRPC's own xDS support, no Envoy.

Both read ``GRPC_XDS_BOOTSTRAP`` (written by ``meshfed up`` or ``gateway.bootstrap.render_grpc_bootstrap``).

- ``serve``: a gRPC server created with ``xds=True`` and xDS server credentials, so its listener, mTLS and
  authorization come from the control plane (``gateway.generators.proxyless``). ``/meshfed.demo.Echo/Call``
  answers JSON naming the service, cluster and workload, the message, and the caller's SPIFFE ID as the TLS
  handshake proved it (gRPC's auth context; there is no header to forge).
- ``call``: a client of ``xds:///<svc>.<ns>.svc.clusterset.local:<port>`` with xDS channel credentials: routes,
  endpoints in every cluster (local pods, remote gateways) and mTLS come from the control plane.

Run: ``python -m meshfed.demogrpc serve --listen 127.0.0.1:PORT --service echo-grpc --cluster west --workload w``
and ``python -m meshfed.demogrpc call xds:///echo-grpc.default.svc.clusterset.local:7070 --message hi``.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from concurrent import futures
from typing import Any

import grpc
import grpc.experimental

log = logging.getLogger("meshfed.demogrpc")

SERVICE = "meshfed.demo.Echo"
METHOD = f"/{SERVICE}/Call"


class DemoGrpcError(Exception):
    """A call failed; the message names the target and gRPC's status."""


def caller_of(context: Any) -> str:
    """The caller's SPIFFE ID from the server-side auth context ("" on a plaintext connection)."""
    auth = context.auth_context() or {}
    for key in ("peer_spiffe_id", "x509_subject_alternative_name", "x509_uri_subject_alternative_name"):
        for value in auth.get(key, []):
            text = value.decode() if isinstance(value, bytes) else str(value)
            if text.startswith("spiffe://"):
                return text
    return ""


def handler(*, service: str, cluster: str, workload: str) -> grpc.GenericRpcHandler:
    def call(request: bytes, context: Any) -> bytes:
        caller = caller_of(context)
        log.info("call caller=%s bytes=%d", caller or "-", len(request))
        return json.dumps({"service": service, "cluster": cluster, "workload": workload, "caller": caller,
                           "message": request.decode(errors="replace")}).encode()

    return grpc.method_handlers_generic_handler(SERVICE, {"Call": grpc.unary_unary_rpc_method_handler(call)})


def make_server(*, listen: str, service: str, cluster: str, workload: str, xds: bool = True) -> tuple[Any, int]:
    """A started server (``xds=True``: configured by the control plane; else plaintext) and its bound port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), xds=xds)
    server.add_generic_rpc_handlers([handler(service=service, cluster=cluster, workload=workload)])
    if xds:
        port = server.add_secure_port(listen, grpc.xds_server_credentials(grpc.insecure_server_credentials()))
    else:
        port = server.add_insecure_port(listen)
    if not port:
        raise DemoGrpcError(f"cannot listen on {listen}")
    server.start()
    return server, port


def call(target: str, message: str = "hello", *, timeout: float = 10.0, xds: bool = True,
         method: str = METHOD) -> dict[str, Any]:
    """One unary call; the server's JSON answer."""
    creds = grpc.xds_channel_credentials(grpc.experimental.insecure_channel_credentials()) if xds else None
    try:
        with (grpc.secure_channel(target, creds) if creds is not None else grpc.insecure_channel(target)) as channel:
            stub = channel.unary_unary(method)
            reply = stub(message.encode(), timeout=timeout, wait_for_ready=True)
    except grpc.RpcError as exc:
        raise DemoGrpcError(f"{target}: {exc.code().name}: {exc.details()}") from exc
    answer: dict[str, Any] = json.loads(reply)
    return answer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshfed.demogrpc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the echo service as a gRPC xDS server")
    s.add_argument("--listen", required=True, metavar="HOST:PORT")
    s.add_argument("--service", default="echo-grpc")
    s.add_argument("--cluster", default="")
    s.add_argument("--workload", default="")
    s.add_argument("--plaintext", action="store_true", help="no xDS: a plain insecure server (debugging)")
    c = sub.add_parser("call", help="call the echo service once and print its JSON answer")
    c.add_argument("target", help="e.g. xds:///echo-grpc.default.svc.clusterset.local:7070")
    c.add_argument("--message", default="hello")
    c.add_argument("--timeout", type=float, default=10.0)
    c.add_argument("--count", type=int, default=1)
    c.add_argument("--method", default=METHOD, help="full method name (authorization tests call others)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "call":
        try:
            for _ in range(max(1, args.count)):
                print(json.dumps(call(args.target, args.message, timeout=args.timeout, method=args.method)),
                      flush=True)
        except DemoGrpcError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    server, port = make_server(listen=args.listen, service=args.service, cluster=args.cluster,
                               workload=args.workload, xds=not args.plaintext)
    log.info("serving service=%s port=%d xds=%s", args.service, port, not args.plaintext)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
