"""The application probes the sidecar agent runs for kubelet (``meshfed proxy run``; docs/injection.md).

Injection (``meshfed.inject.probe_rewrites``) points each httpGet or tcpSocket liveness, readiness and startup
probe of an application container at the agent, ``GET :15020/app-health/<container>/<livez|readyz|startupz>``
(a port the capture leaves alone), and hands the originals to the agent in ``MESHFED_APP_PROBES``. The agent runs
the original from inside the pod, on loopback (as uid 1337, whose traffic is never captured), with the original
timeout, and answers as kubelet would judge it: 200 when the app answered 200-399 (httpGet) or accepted the
connection (tcpSocket), 503 naming what failed otherwise, 404 for a path it was not given. Without this, kubelet's
plain-text probe would meet the capture and the sidecar's mutual TLS and fail.

:func:`parse_app_probes` is pure (an error names the variable and the path); :class:`AppProbeServer` and
:func:`run_probe` do the IO.
"""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ENV = "MESHFED_APP_PROBES"
MAX_TIMEOUT_S = 60.0


class AppProbeError(ValueError):
    """``MESHFED_APP_PROBES`` does not describe probes; the message names the variable and the entry."""


@dataclass(frozen=True, slots=True)
class AppProbe:
    """One original probe: an HTTP GET (``path``, ``scheme``, ``headers``, ``host``) or a TCP connect."""

    kind: str  # "httpGet" | "tcpSocket"
    port: int
    timeout_s: float = 1.0
    path: str = "/"
    scheme: str = "HTTP"
    host: str = "127.0.0.1"
    headers: tuple[tuple[str, str], ...] = ()


def parse_app_probes(text: str) -> dict[str, AppProbe]:
    """``MESHFED_APP_PROBES`` (JSON: agent path -> ``{"httpGet"|"tcpSocket": {...}, "timeoutSeconds": N}``)."""
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise AppProbeError(f"{ENV}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise AppProbeError(f"{ENV}: must be an object of agent path -> probe")
    out: dict[str, AppProbe] = {}
    for path, entry in data.items():
        where = f"{ENV}[{json.dumps(path)}]"
        if not isinstance(path, str) or not path.startswith("/app-health/"):
            raise AppProbeError(f"{where}: the path must start with /app-health/")
        if not isinstance(entry, dict):
            raise AppProbeError(f"{where}: must be an object")
        out[path] = _probe(entry, where)
    return out


def _probe(entry: Mapping[str, Any], where: str) -> AppProbe:
    kinds = [k for k in ("httpGet", "tcpSocket") if k in entry]
    if len(kinds) != 1:
        raise AppProbeError(f"{where}: needs exactly one of httpGet, tcpSocket")
    kind = kinds[0]
    action = entry[kind]
    if not isinstance(action, dict):
        raise AppProbeError(f"{where}.{kind}: must be an object")
    port = action.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise AppProbeError(f"{where}.{kind}.port: {port!r} is not a port number")
    timeout = entry.get("timeoutSeconds", 1)
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not 0 < timeout <= MAX_TIMEOUT_S:
        raise AppProbeError(f"{where}.timeoutSeconds: {timeout!r} is not 1-{MAX_TIMEOUT_S:.0f} seconds")
    host = action.get("host") or "127.0.0.1"
    if not isinstance(host, str):
        raise AppProbeError(f"{where}.{kind}.host: must be a string")
    if kind == "tcpSocket":
        return AppProbe(kind=kind, port=port, timeout_s=float(timeout), host=host)
    path = action.get("path", "/")
    scheme = str(action.get("scheme", "HTTP")).upper()
    if not isinstance(path, str) or not path.startswith("/"):
        raise AppProbeError(f"{where}.httpGet.path: {path!r} must start with /")
    if scheme not in ("HTTP", "HTTPS"):
        raise AppProbeError(f"{where}.httpGet.scheme: {scheme!r} is not HTTP or HTTPS")
    headers: list[tuple[str, str]] = []
    for i, h in enumerate(action.get("httpHeaders") or ()):
        if not isinstance(h, dict) or not isinstance(h.get("name"), str) or not isinstance(h.get("value"), str):
            raise AppProbeError(f"{where}.httpGet.httpHeaders[{i}]: needs a string name and value")
        headers.append((h["name"], h["value"]))
    return AppProbe(kind=kind, port=port, timeout_s=float(timeout), path=path, scheme=scheme, host=host,
                    headers=tuple(headers))


def run_probe(probe: AppProbe) -> tuple[bool, str]:
    """Run ``probe`` against the app; (passed, what happened)."""
    if probe.kind == "tcpSocket":
        try:
            with socket.create_connection((probe.host, probe.port), timeout=probe.timeout_s):
                return True, f"tcp {probe.host}:{probe.port} accepted"
        except OSError as exc:
            return False, f"tcp {probe.host}:{probe.port}: {exc.strerror or exc}"
    conn: http.client.HTTPConnection
    if probe.scheme == "HTTPS":  # kubelet does not verify the app's certificate either
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        conn = http.client.HTTPSConnection(probe.host, probe.port, timeout=probe.timeout_s, context=context)
    else:
        conn = http.client.HTTPConnection(probe.host, probe.port, timeout=probe.timeout_s)
    headers = {"User-Agent": "kube-probe/meshfed", "Accept": "*/*", **dict(probe.headers)}
    try:
        conn.request("GET", probe.path, headers=headers)
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        return False, f"{probe.scheme.lower()} GET {probe.host}:{probe.port}{probe.path}: {exc}"
    finally:
        conn.close()
    what = f"{probe.scheme.lower()} GET {probe.host}:{probe.port}{probe.path}: {status}"
    return 200 <= status < 400, what


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        probe = self.server.probes.get(self.path.split("?", 1)[0])
        if probe is None:
            self._answer(404, f"no application probe at {self.path}")
            return
        passed, what = run_probe(probe)
        self._answer(200 if passed else 503, what)

    def _answer(self, code: int, text: str) -> None:
        body = (text + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    probes: Mapping[str, AppProbe]


class AppProbeServer:
    """Serve ``probes`` on ``host:port`` in a thread (a context manager; ``port`` 0 picks one)."""

    def __init__(self, probes: Mapping[str, AppProbe], *, host: str = "0.0.0.0", port: int = 15020) -> None:
        self._server = _Server((host, port), _Handler)
        self._server.probes = dict(probes)
        self._thread = threading.Thread(target=self._server.serve_forever, name="meshfed-app-probes", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def __enter__(self) -> AppProbeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
