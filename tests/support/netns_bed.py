"""Pods as network namespaces, for the captured-traffic tests and ``bench/dataplane.py``.

A :class:`Bed` is a set of namespaces this process creates (``<prefix>-<tag>-<role>``), joined by veth pairs whose
two ends are created inside the namespaces (nothing appears in the root namespace), with the addresses and routes
given. Envoys run inside them as the proxy uid (1337) and reach their control plane, which runs in this process on
the root namespace's loopback, through a unix socket relayed here (a namespace cannot reach the root namespace's
loopback, a socket file it can); their admin API is a unix socket too (:class:`UnixAdmin`). A server of this
process can also listen inside a namespace on sockets made there (:func:`bound_sockets`: the DNS server a pod's
``/etc/netns/<ns>/resolv.conf`` names, :func:`resolver`). Everything is stopped by pid and removed when the ``bed``
context ends, also after a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from gateway.bootstrap import render_bootstrap, write_bootstrap
from gateway.context import ProxyInfo
from gateway.envoy import AdminError, EnvoyAdmin, command
from tests.gateway.envoy_fixtures import ControlPlane, wait_until
from tests.support.procs import Proc

REPO = Path(__file__).resolve().parents[2]
PROXY_UID = 1337
NETNS_ETC = Path("/etc/netns")  # `ip netns exec NAME` bind-mounts NETNS_ETC/NAME/* over /etc/*
#: Every namespace a bed of this process made (a concurrent run's are not ours).
CREATED: set[str] = set()


@dataclass(frozen=True, slots=True)
class Link:
    """A veth pair between two roles, with each end's address (``ip/prefix``; IPv6 ones get ``nodad``)."""

    a: str
    a_addrs: tuple[str, ...]
    b: str
    b_addrs: tuple[str, ...]


class UnixAdmin(EnvoyAdmin):
    """Envoy's admin API on a unix socket."""

    def __init__(self, path: Path) -> None:
        super().__init__("localhost", 80)
        self.path = path

    async def _get(self, path: str, params: dict[str, str] | None = None) -> tuple[int, str]:
        try:
            async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(self.path)),
                                             timeout=self._timeout) as session, \
                    session.get("http://localhost" + path, params=params) as resp:
                return resp.status, await resp.text()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise AdminError(f"GET {path} on {self.path} failed: {exc}") from exc


@dataclass
class Bed:
    prefix: str
    tag: str
    tmp: Path
    roles: tuple[str, ...]
    interfaces: dict[tuple[str, str], str] = field(default_factory=dict)  # (role, peer role) -> interface
    procs: list[Proc] = field(default_factory=list)
    popens: list[subprocess.Popen[str]] = field(default_factory=list)
    servers: list[asyncio.AbstractServer] = field(default_factory=list)

    def ns(self, role: str) -> str:
        return f"{self.prefix}-{self.tag}-{role}"

    def names(self) -> list[str]:
        return [self.ns(r) for r in self.roles]

    def log(self, role: str) -> Path:
        return self.tmp / f"{role}.log"

    def stop_processes(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.stop()
        for popen in self.popens:
            with contextlib.suppress(Exception):
                popen.kill()
                popen.communicate(timeout=30)
        for server in self.servers:
            server.close()


def run(argv: Sequence[str]) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {done.returncode}: {done.stdout}{done.stderr}")
    return done.stdout


@contextlib.contextmanager
def bed(prefix: str, roles: Sequence[str], links: Sequence[Link],
        default_routes: Sequence[tuple[str, str]] = ()) -> Iterator[Bed]:
    """Namespaces for ``roles``, the ``links`` between them, and a default route in role ``r`` through its link to
    ``peer`` for each ``(r, peer)`` of ``default_routes`` (a ClusterSetIP needs a route for ``connect()`` to start;
    the capture rules then redirect it). Removed, with every process started in them, on exit."""
    tag = secrets.token_hex(3)
    tmp = Path(tempfile.mkdtemp(prefix=f"meshfed-{prefix}-"))
    tmp.chmod(0o755)  # Envoys run as uid 1337: they read their bootstraps here
    b = Bed(prefix=prefix, tag=tag, tmp=tmp, roles=tuple(roles))
    try:
        for ns in b.names():
            CREATED.add(ns)
            run(["ip", "netns", "add", ns])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
        for i, link in enumerate(links):
            if_a, if_b = f"{prefix}{tag}{i}a", f"{prefix}{tag}{i}b"
            b.interfaces[(link.a, link.b)], b.interfaces[(link.b, link.a)] = if_a, if_b
            run(["ip", "-n", b.ns(link.a), "link", "add", if_a, "type", "veth", "peer", "name", if_b,
                 "netns", b.ns(link.b)])
            for role, ifname, addrs in ((link.a, if_a, link.a_addrs), (link.b, if_b, link.b_addrs)):
                for addr in addrs:
                    run(["ip", "-n", b.ns(role), "addr", "add", addr, "dev", ifname, *(["nodad"] if ":" in addr
                                                                                       else [])])
                run(["ip", "-n", b.ns(role), "link", "set", ifname, "up"])
        for role, peer in default_routes:
            run(["ip", "-n", b.ns(role), "route", "add", "default", "dev", b.interfaces[(role, peer)]])
        yield b
    finally:
        b.stop_processes()
        for ns in b.names():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=60, check=False)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)  # a resolver(); the name is this bed's own
        shutil.rmtree(tmp, ignore_errors=True)


def resolver(b: Bed, role: str, nameserver: str) -> Path:
    """``role``'s own ``/etc/resolv.conf`` (what every ``ip netns exec`` there sees): only ``nameserver``."""
    etc = NETNS_ETC / b.ns(role)
    etc.mkdir(parents=True, exist_ok=True)
    path = etc / "resolv.conf"
    path.write_text(f"nameserver {nameserver}\noptions timeout:2 attempts:3\n")
    return path


# Runs in the namespace: bind UDP and TCP on HOST:PORT there and pass both sockets back over the unix socket FD.
BIND = r"""
import socket, sys
chan, host, port = socket.socket(fileno=int(sys.argv[1])), sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
udp, tcp = socket.socket(family, socket.SOCK_DGRAM), socket.socket(family, socket.SOCK_STREAM)
udp.bind((host, port))
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind((host, port))
socket.send_fds(chan, [b"bound"], [udp.fileno(), tcp.fileno()])
"""


def bound_sockets(b: Bed, role: str, host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket bound to ``host:port`` inside ``role``'s namespace, for a server of this process
    (a socket stays in the namespace it was made in): a short child made them there and passed them back."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with mine, theirs:
        done = subprocess.run(["ip", "netns", "exec", b.ns(role), sys.executable, "-I", "-c", BIND,
                               str(theirs.fileno()), host, str(port)], pass_fds=(theirs.fileno(),),
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, f"binding {host}:{port} in {role}: {done.stderr}"
        mine.settimeout(10)
        msg, fds, _flags, _addr = socket.recv_fds(mine, 16, 2)
    assert msg == b"bound" and len(fds) == 2, (msg, fds)
    return socket.socket(fileno=fds[0]), socket.socket(fileno=fds[1])


def capture_rules(b: Bed, role: str, *args: str) -> str:
    """``meshfed proxy capture ARGS`` inside ``role``'s namespace (this tree first on the path)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(["ip", "netns", "exec", b.ns(role), sys.executable, "-m", "meshfed", "proxy", "capture",
                           *args], capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, f"meshfed proxy capture in {role}: {done.stdout}{done.stderr}"
    return done.stdout


def start_script(b: Bed, role: str, script: str, *args: str) -> None:
    """Run a Python ``script`` in ``role``'s namespace until the bed ends; it must print ``ready`` first."""
    popen = subprocess.Popen(["ip", "netns", "exec", b.ns(role), sys.executable, "-I", "-c", script, *args],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    b.popens.append(popen)
    assert popen.stdout is not None
    line = popen.stdout.readline()  # bounded: the script prints "ready" at once or exits (EOF)
    assert line.strip() == "ready", popen.stderr.read() if popen.stderr else line


def _relay_to(port: int) -> Any:
    """A stream handler relaying each connection to ``port`` on the root namespace's loopback."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:  # the control plane is gone (teardown): the Envoy retries until it is stopped
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    return handle


async def relay(b: Bed, name: str, port: int) -> Path:
    """A unix socket (in the bed's directory) relayed to ``port`` on the root namespace's loopback."""
    path = b.tmp / f"{name}.sock"
    server = await asyncio.start_unix_server(_relay_to(port), path=str(path))
    path.chmod(0o666)
    b.servers.append(server)
    return path


async def tcp_relay(b: Bed, role: str, port: int, target: int) -> None:
    """A TCP listener on ``role``'s own 127.0.0.1:``port`` (made there, served by this process) relayed to
    ``target`` on the root namespace's loopback: a pod dialling its control plane by address and port."""
    _, tcp = bound_sockets(b, role, "127.0.0.1", port)
    tcp.listen(16)
    b.servers.append(await asyncio.start_server(_relay_to(target), sock=tcp))


async def start_envoy(b: Bed, cp: ControlPlane, proxy: ProxyInfo, role: str, *,
                      log_level: str = "info") -> UnixAdmin:
    """An Envoy for ``proxy`` in ``role``'s namespace, as the proxy uid, configured by ``cp``; waits for /ready."""
    token = cp.add_proxy(proxy)
    xds = await relay(b, f"ads-{role}", cp.port)
    boot: dict[str, Any] = render_bootstrap(proxy, xds_host="127.0.0.1", xds_port=1, admin_port=1, token=token)
    xds_cluster = boot["static_resources"]["clusters"][0]
    xds_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] = {
        "pipe": {"path": str(xds)}}
    own = b.tmp / f"envoy-{role}"  # the Envoy's own directory (uid 1337 creates its admin socket there)
    own.mkdir()
    os.chown(own, PROXY_UID, PROXY_UID)
    admin = own / "admin.sock"
    boot["admin"]["address"] = {"pipe": {"path": str(admin)}}
    path = write_bootstrap(b.tmp / f"{role}.yaml", boot)
    path.chmod(0o644)
    argv = ["ip", "netns", "exec", b.ns(role), "setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}",
            "--clear-groups", *command(path, log_level=log_level)]
    proc = Proc(argv, log=b.log(role))
    b.procs.append(proc)
    envoy = UnixAdmin(admin)

    async def ready() -> bool:
        if not proc.alive():
            raise RuntimeError(f"envoy in {role} exited:\n{proc.output()[-3000:]}")
        return await envoy.ready()

    await wait_until(ready, within=60, what=f"envoy in {role} /ready")
    return envoy


async def run_in(b: Bed, role: str, script: str, *args: str, uid: int | None = None, within: float = 120) -> str:
    """Run a Python ``script`` to completion in ``role``'s namespace (as ``uid`` if given); its stdout."""
    argv = ["ip", "netns", "exec", b.ns(role)]
    if uid is not None:
        argv += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    proc = await asyncio.create_subprocess_exec(*argv, sys.executable, "-I", "-c", script, *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=within)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode()
    return out.decode().strip()
