"""``meshfed proxy run --grpc``: the proxyless gRPC pod's agent (template ``grpc``, docs/injection.md).

No Envoy. The agent opens its own ADS stream to the control plane's plain port, authenticated with the pod's
projected token (``authorization: Bearer``), as the node ``proxyless~IP~POD.NS~...`` of the pod, and asks only
for SDS: the ``default`` secret (the workload certificate of the identity the token proved; the control plane
never issues one for a claimed identity) and ``ROOTCA`` (the trust bundle). Each response is written to
``$MESHFED_RUN_DIR/grpc/{cert,key,ca}.pem`` (atomic renames, group-readable for the pod's fsGroup) and ACKed; the
control plane re-issues the certificate before it expires and pushes it on the same stream, so the files are
renewed without the application doing anything: gRPC's ``file_watcher`` provider re-reads them.

Beside them it writes ``bootstrap.json`` (``GRPC_XDS_BOOTSTRAP``; ``meshfed.agent.grpc_bootstrap``): the
application's node ``grpc~IP~POD.NS~...``, ADS over mutual TLS with those files to ``MESHFED_XDS_MTLS_ADDRESS``.
``GET :15021/healthz/ready`` answers 200 once the first certificate and the bootstrap are written.

The stream is reopened (bounded backoff) when it fails or when the kubelet refreshes the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
from aiohttp import web
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2

from federation.files import write_atomic
from gateway.bootstrap import to_json
from gateway.sds import CERT_SECRET, ROOT_SECRET
from gateway.snapshot import SECRET
from meshfed.agent import AgentEnv, AgentError, agent_node_id, grpc_bootstrap, grpc_proxy_info

log = logging.getLogger("meshfed.proxy.grpc")

CERT, KEY, CA, BOOTSTRAP = "cert.pem", "key.pem", "ca.pem", "bootstrap.json"
MAX_BACKOFF = 10.0


@dataclass(frozen=True, slots=True)
class Files:
    """Where the agent writes (``$MESHFED_RUN_DIR/grpc``)."""

    dir: Path

    @classmethod
    def of(cls, agent: AgentEnv) -> Files:
        return cls(Path(agent.run_dir) / "grpc")

    @property
    def cert(self) -> Path:
        return self.dir / CERT

    @property
    def key(self) -> Path:
        return self.dir / KEY

    @property
    def ca(self) -> Path:
        return self.dir / CA

    @property
    def bootstrap(self) -> Path:
        return self.dir / BOOTSTRAP


def _read_token(agent: AgentEnv) -> str:
    try:
        return Path(agent.token_file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise AgentError(f"MESHFED_XDS_TOKEN_FILE {agent.token_file}: {exc.strerror or exc}") from exc


def _node(agent: AgentEnv) -> base_pb2.Node:
    node_id = agent_node_id(agent)
    meta = struct_pb2.Struct()
    meta.update(grpc_proxy_info(agent, node_id=node_id).metadata())
    return base_pb2.Node(id=node_id, metadata=meta)


def write_secrets(files: Files, resources: list[secret_pb2.Secret]) -> tuple[bool, bool]:
    """Write what an SDS response carries; returns (certificate written, bundle written). Blocking IO."""
    cert = root = False
    for secret in resources:
        if secret.name == CERT_SECRET and secret.HasField("tls_certificate"):
            tls = secret.tls_certificate
            # key first: gRPC re-reads both, and refuses (keeping the old pair) a key that does not match
            write_atomic(files.key, tls.private_key.inline_string.encode(), mode=0o640)
            write_atomic(files.cert, tls.certificate_chain.inline_string.encode(), mode=0o640)
            cert = True
        elif secret.name == ROOT_SECRET and secret.HasField("validation_context"):
            write_atomic(files.ca, secret.validation_context.trusted_ca.inline_string.encode(), mode=0o644)
            root = True
    return cert, root


class GrpcAgent:
    """The SDS stream, the files and readiness (see the module docstring)."""

    def __init__(self, agent: AgentEnv, *, token_poll: float = 30.0, refresh_s: int = 5) -> None:
        self.agent = agent
        self.files = Files.of(agent)
        self.token_poll = token_poll
        self.refresh_s = refresh_s
        self.ready = False
        self.renewals = 0

    def prepare(self) -> None:
        """Create the directory (group-readable: the app runs as another uid in the pod's fsGroup) and render the
        bootstrap (an :class:`AgentError` if the environment cannot give one)."""
        self.files.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.files.dir, 0o750)
        boot = grpc_bootstrap(self.agent, cert_file=str(self.files.cert), key_file=str(self.files.key),
                              ca_file=str(self.files.ca), refresh_s=self.refresh_s)
        write_atomic(self.files.bootstrap, (to_json(boot) + "\n").encode(), mode=0o644)

    async def _stream_once(self, token: str) -> None:
        """One ADS stream: request the two secrets, write and ACK every response, until it ends or fails."""
        xds = self.agent.xds
        async with grpc.aio.insecure_channel(f"{xds.host}:{xds.port}") as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            call = stub.StreamAggregatedResources(metadata=(("authorization", f"Bearer {token}"),))
            names = [CERT_SECRET, ROOT_SECRET]
            await call.write(discovery_pb2.DiscoveryRequest(node=_node(self.agent), type_url=SECRET,
                                                            resource_names=names))
            async for response in call:
                secrets: list[secret_pb2.Secret] = []
                for any_ in response.resources:
                    s = secret_pb2.Secret()
                    any_.Unpack(s)
                    secrets.append(s)
                cert, _ = await asyncio.to_thread(write_secrets, self.files, secrets)
                if cert:
                    self.renewals += 1
                    log.info("workload certificate written dir=%s version=%s count=%d", self.files.dir,
                             response.version_info, self.renewals)
                if self.files.cert.exists() and self.files.ca.exists():
                    self.ready = True
                await call.write(discovery_pb2.DiscoveryRequest(
                    type_url=SECRET, resource_names=names, version_info=response.version_info,
                    response_nonce=response.nonce))

    async def _until_token_changes(self, token: str) -> None:
        while True:
            await asyncio.sleep(self.token_poll)
            try:
                if _read_token(self.agent) != token:
                    log.info("xds token refreshed; reopening the SDS stream with it")
                    return
            except AgentError as exc:
                log.warning("token not readable, keeping the stream: %s", exc)

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the stream open until ``stop`` is set; a failure reopens it after a backoff (at most
        ``MAX_BACKOFF`` seconds)."""
        backoff = 0.5
        while not stop.is_set():
            try:
                token = await asyncio.to_thread(_read_token, self.agent)
            except AgentError as exc:  # the kubelet has not (re)written it yet: wait, do not exit
                log.warning("%s; retrying in %.1fs", exc, backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            tasks = [asyncio.create_task(self._stream_once(token)),
                     asyncio.create_task(self._until_token_changes(token)),
                     asyncio.create_task(stop.wait())]
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in pending:
                t.cancel()
            for t in pending:
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await t
            if tasks[0] in done:  # the stream ended or failed (not a token refresh, not a stop): back off
                log.warning("SDS stream ended: %s; reopening in %.1fs", tasks[0].exception() or "closed", backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.ready else 503, text="ready\n" if self.ready else "not ready\n")

    async def serve(self, stop: asyncio.Event) -> None:
        """The agent's whole life: files, health port, stream; returns when ``stop`` is set."""
        self.prepare()
        app = web.Application()
        app.router.add_get("/healthz/ready", self._healthz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, "0.0.0.0", self.agent.health_port).start()
            await self.run(stop)
        finally:
            await runner.cleanup()
