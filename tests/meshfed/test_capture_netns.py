"""``meshfed proxy capture`` for real, inside network namespaces these tests create.

A "pod" namespace and a "peer" namespace joined by a veth pair (10.250.N.0/24 and fdca:fe:N::/64, inside the
two namespaces only; nothing is added to the root namespace). The command runs in the pod with ``ip netns exec``;
small stdlib servers and clients, also started in the namespaces, prove what the rules do to real connections:
the listener on the outbound port reads SO_ORIGINAL_DST and answers with the address the client dialled.
Everything is removed in a ``finally``; :func:`test_nothing_left` checks it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import select
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROXY_UID = 1337

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and iptables need root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="`ip` (iproute2) is not installed"),
    pytest.mark.skipif(
        shutil.which("iptables-restore") is None or shutil.which("iptables-save") is None,
        reason="Debian's iptables package is not installed",
    ),
]

# Listeners: [[family, host, port, reply]] where reply "origdst" answers SO_ORIGINAL_DST ("ip:port"), anything
# else is answered as is. One thread per listener; the process ends when its stdin closes or after 120 s.
SERVER = r"""
import json, socket, struct, sys, threading
specs = json.loads(sys.argv[1])
def orig(conn, fam):
    if fam == 4:
        raw = conn.getsockopt(socket.SOL_IP, 80, 16)
        return socket.inet_ntop(socket.AF_INET, raw[4:8]) + ":" + str(struct.unpack("!H", raw[2:4])[0])
    raw = conn.getsockopt(socket.IPPROTO_IPV6, 80, 28)
    return "[" + socket.inet_ntop(socket.AF_INET6, raw[8:24]) + "]:" + str(struct.unpack("!H", raw[2:4])[0])
def serve(sock, fam, reply):
    while True:
        conn, _ = sock.accept()
        with conn:
            try:
                text = orig(conn, fam) if reply == "origdst" else reply
            except Exception as exc:
                text = "no-origdst:" + repr(exc)
            conn.sendall(text.encode())
for fam, host, port, reply in specs:
    sock = socket.socket(socket.AF_INET if fam == 4 else socket.AF_INET6)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == 6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    sock.listen(16)
    threading.Thread(target=serve, args=(sock, fam, reply), daemon=True).start()
print("ready", flush=True)
import select
select.select([sys.stdin], [], [], 120)
"""

CLIENT = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
with socket.create_connection((host, port), timeout=20) as s:
    data = b""
    while chunk := s.recv(4096):
        data += chunk
print(data.decode())
"""


@dataclass
class PodPair:
    tag: str
    pod: str
    peer: str
    pod_if: str
    peer_if: str
    n: int
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def pod_ip(self) -> str:
        return f"10.250.{self.n}.1"

    @property
    def peer_ip(self) -> str:
        return f"10.250.{self.n}.2"

    @property
    def peer_ip2(self) -> str:
        return f"10.250.{self.n}.3"

    @property
    def pod_ip6(self) -> str:
        return f"fdca:fe:{self.n:x}::1"

    @property
    def peer_ip6(self) -> str:
        return f"fdca:fe:{self.n:x}::2"

    def meshfed(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``ip netns exec POD python -m meshfed ARGS`` with this tree first on the path."""
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        return subprocess.run(["ip", "netns", "exec", self.pod, sys.executable, "-m", "meshfed", *args],
                              capture_output=True, text=True, timeout=120, env=env, check=False)

    def capture(self, *args: str) -> str:
        done = self.meshfed("proxy", "capture", *args)
        assert done.returncode == 0, f"meshfed proxy capture {' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout

    def save(self, ns: str, tool: str = "iptables-save") -> str:
        """The nat table as text, without the timestamps and counters that change by themselves."""
        out = run(["ip", "netns", "exec", ns, tool, "-t", "nat"])
        lines = [re.sub(r"\[\d+:\d+\]", "[-]", line) for line in out.splitlines() if not line.startswith("#")]
        return "\n".join(lines)

    def serve(self, ns: str, specs: Sequence[tuple[int, str, int, str]]) -> None:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-I", "-c", SERVER, json.dumps(specs)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else ""
        if line.strip() != "ready":
            proc.kill()
            _, err = proc.communicate(timeout=30)
            raise AssertionError(f"server in {ns} did not start: {line!r} {err}")

    def dial(self, ns: str, host: str, port: int, *, uid: int | None = None) -> str:
        """Connect from ``ns`` (as ``uid`` if given) and return what the server sent back."""
        argv = ["ip", "netns", "exec", ns]
        if uid is not None:
            argv += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        argv += [sys.executable, "-I", "-c", CLIENT, host, str(port)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, f"dial {host}:{port} from {ns} (uid {uid}): {done.stderr}"
        return done.stdout.strip()


def run(argv: Sequence[str]) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr}")
    return done.stdout


CREATED: set[str] = set()  # every namespace this module made (another run's cap-* namespaces are not ours)


def netns_names() -> list[str]:
    return [line.split()[0] for line in run(["ip", "netns", "list"]).splitlines() if line.strip()]


@contextlib.contextmanager
def pod_pair() -> Iterator[PodPair]:
    tag = secrets.token_hex(3)
    pair = PodPair(tag=tag, pod=f"cap-{tag}-pod", peer=f"cap-{tag}-peer", pod_if=f"cap{tag}a",
                   peer_if=f"cap{tag}b", n=secrets.randbelow(250) + 1)
    try:
        for ns in (pair.pod, pair.peer):
            CREATED.add(ns)
            run(["ip", "netns", "add", ns])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
        # both ends created directly inside the namespaces: nothing appears in the root namespace
        run(["ip", "-n", pair.pod, "link", "add", pair.pod_if, "type", "veth", "peer", "name", pair.peer_if,
             "netns", pair.peer])
        for ns, ifname, addrs in ((pair.pod, pair.pod_if, (f"{pair.pod_ip}/24",)),
                                  (pair.peer, pair.peer_if, (f"{pair.peer_ip}/24", f"{pair.peer_ip2}/24"))):
            for addr in addrs:
                run(["ip", "-n", ns, "addr", "add", addr, "dev", ifname])
            run(["ip", "-n", ns, "link", "set", ifname, "up"])
        yield pair
    finally:
        for proc in pair.procs:
            with contextlib.suppress(Exception):
                proc.kill()
                proc.communicate(timeout=30)
        for ns in (pair.pod, pair.peer):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=60, check=False)


def add_ipv6(pair: PodPair) -> None:
    for ns, ifname, addr in ((pair.pod, pair.pod_if, pair.pod_ip6), (pair.peer, pair.peer_if, pair.peer_ip6)):
        run(["ip", "-n", ns, "addr", "add", f"{addr}/64", "dev", ifname, "nodad"])


@pytest.fixture
def pair() -> Iterator[PodPair]:
    with pod_pair() as p:
        yield p


def test_capture_redirects_real_connections(pair: PodPair) -> None:
    # the peer's services: anything that reaches it answers "peer"
    pair.serve(pair.peer, [(4, "0.0.0.0", 8080, "peer"), (4, "0.0.0.0", 5432, "peer-db")])
    # the pod: the sidecar's two capture listeners, an application port, an excluded one, a proxy port, loopback
    pair.serve(pair.pod, [(4, "0.0.0.0", 15001, "origdst"), (4, "0.0.0.0", 15006, "origdst"),
                          (4, "0.0.0.0", 9080, "app"), (4, "0.0.0.0", 9090, "app-excluded"),
                          (4, "0.0.0.0", 15020, "proxy-admin"), (4, "127.0.0.1", 7070, "local")])
    # before capture, the pod reaches the peer directly
    assert pair.dial(pair.pod, pair.peer_ip, 8080) == "peer"

    out = pair.capture("--exclude-outbound-cidrs", f"{pair.peer_ip2}/32", "--exclude-outbound-ports", "5432",
                       "--exclude-inbound-ports", "9090")
    assert "ipv4: installed" in out

    # outbound: the listener on 15001 sees the destination the workload dialled
    assert pair.dial(pair.pod, pair.peer_ip, 8080) == f"{pair.peer_ip}:8080"
    assert pair.dial(pair.pod, pair.peer_ip, 9999) == f"{pair.peer_ip}:9999"
    # the proxy's own uid is not captured: it reaches the peer itself (no loop back into 15001)
    assert pair.dial(pair.pod, pair.peer_ip, 8080, uid=PROXY_UID) == "peer"
    # ... and another uid is captured like root
    assert pair.dial(pair.pod, pair.peer_ip, 8080, uid=PROXY_UID + 1) == f"{pair.peer_ip}:8080"
    # excluded destination and excluded port go straight out
    assert pair.dial(pair.pod, pair.peer_ip2, 8080) == "peer"
    assert pair.dial(pair.pod, pair.peer_ip, 5432) == "peer-db"
    # loopback and the pod's own address stay local
    assert pair.dial(pair.pod, "127.0.0.1", 7070) == "local"
    assert pair.dial(pair.pod, pair.pod_ip, 9080) == "app"

    # inbound: a connection from the peer to a workload port lands on 15006, which sees the port dialled
    assert pair.dial(pair.peer, pair.pod_ip, 9080) == f"{pair.pod_ip}:9080"
    # excluded inbound port and the proxy's own ports reach their listener unchanged
    assert pair.dial(pair.peer, pair.pod_ip, 9090) == "app-excluded"
    assert pair.dial(pair.peer, pair.pod_ip, 15020) == "proxy-admin"

    # the peer namespace itself was never touched
    assert "MESHFED" not in pair.save(pair.peer)


def test_capture_ipv6(pair: PodPair) -> None:
    add_ipv6(pair)
    pair.serve(pair.peer, [(6, "::", 8080, "peer6")])
    pair.serve(pair.pod, [(6, "::", 15001, "origdst"), (6, "::", 15006, "origdst"), (6, "::1", 7070, "local6")])
    assert pair.dial(pair.pod, pair.peer_ip6, 8080) == "peer6"
    out = pair.capture()
    assert "ipv4: installed" in out and "ipv6: installed" in out
    assert pair.dial(pair.pod, pair.peer_ip6, 8080) == f"[{pair.peer_ip6}]:8080"
    assert pair.dial(pair.pod, pair.peer_ip6, 8080, uid=PROXY_UID) == "peer6"
    assert pair.dial(pair.pod, "::1", 7070) == "local6"
    assert pair.dial(pair.peer, pair.pod_ip6, 9080) == f"[{pair.pod_ip6}]:9080"
    saved = pair.save(pair.pod, "ip6tables-save")
    assert "-A MESHFED_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in saved
    pair.capture("--cleanup")
    assert "MESHFED" not in pair.save(pair.pod, "ip6tables-save")
    assert "MESHFED" not in pair.save(pair.pod)


def test_idempotent_and_cleanup_restores_iptables_save(pair: PodPair) -> None:
    add_ipv6(pair)
    # someone else's rules in the pod's nat table: capture must leave them alone
    run(["ip", "netns", "exec", pair.pod, "iptables", "-t", "nat", "-A", "OUTPUT", "-d", "192.0.2.7", "-j",
         "RETURN"])
    run(["ip", "netns", "exec", pair.pod, "iptables", "-t", "nat", "-N", "OTHER_CHAIN"])
    before = pair.save(pair.pod), pair.save(pair.pod, "ip6tables-save")

    first = pair.capture("--exclude-outbound-ports", "5432,6000-6010")
    after_first = pair.save(pair.pod), pair.save(pair.pod, "ip6tables-save")
    assert after_first != before
    assert "-A OUTPUT -d 192.0.2.7/32 -j RETURN" in after_first[0] and ":OTHER_CHAIN" in after_first[0]
    assert "installed" in first

    second = pair.capture("--exclude-outbound-ports", "5432,6000-6010")
    assert "ipv4: already in place, nothing changed" in second
    assert "ipv6: already in place, nothing changed" in second
    assert (pair.save(pair.pod), pair.save(pair.pod, "ip6tables-save")) == after_first

    # other flags: the rules are replaced (one jump each still), not added to
    pair.capture("--exclude-outbound-ports", "5432")
    changed = pair.save(pair.pod)
    assert changed.count("-j MESHFED_OUTPUT") == 1 and "6000:6010" not in changed

    pair.capture("--cleanup")
    assert (pair.save(pair.pod), pair.save(pair.pod, "ip6tables-save")) == before
    again = pair.capture("--cleanup")
    assert "ipv4: nothing to remove" in again
    assert (pair.save(pair.pod), pair.save(pair.pod, "ip6tables-save")) == before


def test_dry_run_changes_nothing(pair: PodPair) -> None:
    before = pair.save(pair.pod)
    out = pair.capture("--dry-run")
    assert "-A MESHFED_OUTPUT -m owner --uid-owner 1337 -j RETURN" in out
    assert pair.save(pair.pod) == before
    pair.capture()
    installed = pair.save(pair.pod)
    cleanup_plan = pair.capture("--cleanup", "--dry-run")
    assert "-X MESHFED_OUTPUT" in cleanup_plan
    assert pair.save(pair.pod) == installed


def test_nothing_left() -> None:
    """A pair torn down after a failure inside it leaves no namespace, link or process behind."""
    procs: list[subprocess.Popen[str]] = []
    with pytest.raises(RuntimeError), pod_pair() as p:
        p.serve(p.pod, [(4, "0.0.0.0", 15001, "origdst")])
        procs = p.procs
        assert p.capture()
        raise RuntimeError("a failing test")
    assert not [n for n in netns_names() if n.startswith(f"cap-{p.tag}")]
    assert p.pod_if not in run(["ip", "link", "show"]) and p.peer_if not in run(["ip", "link", "show"])
    assert all(proc.poll() is not None for proc in procs)
    # and no earlier test of this module left one either
    assert CREATED and not CREATED & set(netns_names())
