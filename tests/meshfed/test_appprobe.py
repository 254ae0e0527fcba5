"""The agent's application probes (``meshfed.appprobe``): asked over HTTP as kubelet asks, they run the original
probe against a real application on loopback and answer as kubelet would judge it; a bad ``MESHFED_APP_PROBES``
is refused naming the variable and the entry."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from meshfed.agent import AgentError, agent_env
from meshfed.appprobe import AppProbe, AppProbeError, AppProbeServer, parse_app_probes
from tests.support.procs import free_port


class _App(http.server.BaseHTTPRequestHandler):
    status = 200
    seen: list[dict[str, str]] = []

    def log_message(self, format: str, *args: object) -> None:
        return

    def do_GET(self) -> None:
        type(self).seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
        self.send_response(type(self).status)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def app() -> Iterator[tuple[int, type[_App]]]:
    handler = type("App", (_App,), {"status": 200, "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1]), handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def ask(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_the_agent_answers_as_the_original_probe_would(app: tuple[int, type[_App]]) -> None:
    port, handler = app
    closed = free_port()  # nothing listens there
    probes = parse_app_probes(json.dumps({
        "/app-health/app/readyz": {"httpGet": {"path": "/ready?full=1", "port": port,
                                               "httpHeaders": [{"name": "X-Probe", "value": "yes"}]},
                                   "timeoutSeconds": 2},
        "/app-health/app/livez": {"tcpSocket": {"port": port}},
        "/app-health/db/livez": {"tcpSocket": {"port": closed}}}))
    with AppProbeServer(probes, host="127.0.0.1", port=0) as server:
        assert ask(server.port, "/app-health/app/readyz")[0] == 200
        assert handler.seen[-1]["path"] == "/ready?full=1" and handler.seen[-1]["x-probe"] == "yes"
        assert handler.seen[-1]["user-agent"].startswith("kube-probe/")
        handler.status = 302  # kubelet counts 200-399 as success
        assert ask(server.port, "/app-health/app/readyz")[0] == 200
        handler.status = 500
        code, text = ask(server.port, "/app-health/app/readyz")
        assert code == 503 and f"127.0.0.1:{port}/ready?full=1: 500" in text
        assert ask(server.port, "/app-health/app/livez")[0] == 200
        code, text = ask(server.port, "/app-health/db/livez")
        assert code == 503 and f"tcp 127.0.0.1:{closed}" in text
        code, text = ask(server.port, "/app-health/other/readyz")
        assert code == 404 and "no application probe" in text
    with pytest.raises(OSError):  # stopped: the port is closed again
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()


@pytest.mark.parametrize(("text", "message"), [
    ("{", "MESHFED_APP_PROBES: not JSON"),
    ("[]", "MESHFED_APP_PROBES: must be an object"),
    ('{"/x": {"tcpSocket": {"port": 1}}}', 'MESHFED_APP_PROBES["/x"]: the path must start with /app-health/'),
    ('{"/app-health/a/livez": {"exec": {}}}', "needs exactly one of httpGet, tcpSocket"),
    ('{"/app-health/a/livez": {"tcpSocket": {"port": "http"}}}', "tcpSocket.port: 'http' is not a port number"),
    ('{"/app-health/a/livez": {"httpGet": {"port": 80, "path": "x"}}}', "httpGet.path: 'x' must start with /"),
    ('{"/app-health/a/livez": {"httpGet": {"port": 80, "scheme": "ftp"}}}', "'FTP' is not HTTP or HTTPS"),
    ('{"/app-health/a/livez": {"tcpSocket": {"port": 80}, "timeoutSeconds": 0}}', "timeoutSeconds: 0"),
])
def test_bad_probe_descriptions_name_the_entry(text: str, message: str) -> None:
    with pytest.raises(AppProbeError, match=message.replace("[", r"\[").replace("?", r"\?")):
        parse_app_probes(text)


def test_the_sidecar_environment_carries_the_probes() -> None:
    env = {"POD_NAME": "reviews-0", "POD_NAMESPACE": "default", "POD_IP": "10.0.0.4", "MESHFED_CLUSTER": "east",
           "MESHFED_XDS_ADDRESS": "cp:15010", "MESHFED_XDS_TOKEN_FILE": "/t", "MESHFED_RUN_DIR": "/r",
           "MESHFED_APP_PROBES": '{"/app-health/app/livez": {"tcpSocket": {"port": 9080}}}'}
    agent = agent_env(env)
    assert agent.app_probes == (("/app-health/app/livez", AppProbe(kind="tcpSocket", port=9080)),)
    assert agent.agent_port == 15020
    with pytest.raises(AgentError, match=r"MESHFED_APP_PROBES\[\"/app-health/app/livez\"\].tcpSocket.port"):
        agent_env({**env, "MESHFED_APP_PROBES": '{"/app-health/app/livez": {"tcpSocket": {"port": 0}}}'})
