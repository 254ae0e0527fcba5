"""The IO edge of a netns local run: builds a :class:`meshfed.netplan.NetPlan` with ``ip`` (bridges, veth pairs,
network namespaces, routes, ``/etc/netns/<ns>/resolv.conf``) and iptables inside the namespaces it made, and
removes exactly what it made.

Every item is *recorded before it is created* (``record`` is called first, and the local runner writes it to the
run's ``state.json`` at once), so :func:`teardown` removes everything also after ``meshfed up`` crashed halfway.
Teardown deletes only recorded names that :func:`meshfed.netplan.is_ours` accepts for the run's id, and only those
that still exist. iptables runs only through ``ip netns exec <one of our namespaces>``, never in the root
namespace; the root namespace gets only the bridges (with one address each) and the host ends of the veth pairs.

Exception tree (this module)::

    NetnsError      an ``ip``/``iptables`` command failed, or the bed cannot be built here; the message has its
                    stderr or the reason
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from meshfed.capture import DEFAULT_INBOUND_PORT, DEFAULT_OUTBOUND_PORT
from meshfed.netplan import (
    GW_CLUSTER_IF,
    GW_PUBLIC_IF,
    POD_IF,
    PROXY_UID,
    RUN_ID,
    NetPlan,
    free_slot,
    gateway_rules,
    heal_rules,
    is_ours,
    partition_rules,
    pod_filter_rules,
    resolv_conf,
)

log = logging.getLogger("meshfed.netns")

TIMEOUT = 60.0
ETC_NETNS = Path("/etc/netns")
RUN_ROOT = Path("/run")  # the proxy directory of run <id>: /run/meshfed-<id> (owned by the proxy uid, 0700)
CAPTURE_OUTBOUND = DEFAULT_OUTBOUND_PORT
CAPTURE_INBOUND = DEFAULT_INBOUND_PORT
TOOLS = ("ip", "iptables-restore", "setpriv", "sysctl")

Record = Callable[[Mapping[str, str]], None]


class NetnsError(Exception):
    """A command building or removing the bed failed, or the bed cannot be built on this machine."""


#: Run in a throw-away network namespace by :func:`available`: what the bed needs of the kernel and the tools.
PROBE = "ip link set lo up && ip link add mfprobe type bridge && iptables-save -t nat >/dev/null"


@functools.cache
def available() -> tuple[bool, str]:
    """Whether this machine can hold the netns bed, and why (or why not), in words for ``meshfed up``. Besides
    root and the tools, it tries what the bed does (a namespace, a bridge, iptables) in an anonymous namespace made
    by ``unshare`` (a container without the capabilities fails here): nothing is named, nothing is left."""
    if os.geteuid() != 0:
        return False, "not root (network namespaces and iptables need root)"
    missing = [t for t in (*TOOLS, "unshare") if shutil.which(t) is None]
    if missing:
        return False, f"{', '.join(missing)} not found (Debian: iproute2, iptables, util-linux, procps)"
    done = run(["unshare", "--net", "--mount", "sh", "-c", PROBE], check=False)
    if done.returncode != 0:
        return False, f"cannot make a network namespace here: {(done.stderr or done.stdout).strip()[:200]}"
    return True, "root, with ip, iptables, setpriv and sysctl"


def new_run_id() -> str:
    return secrets.token_hex(2)


def run(argv: Sequence[str], *, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one command (bounded); ``NetnsError`` with its stderr if it fails and ``check``."""
    try:
        done = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except FileNotFoundError as exc:
        raise NetnsError(f"{argv[0]} not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"{' '.join(argv)} did not finish within {TIMEOUT:.0f}s") from exc
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()}")
    return done


def in_ns(netns: str, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside ``netns`` (``ip netns exec`` also bind-mounts its ``/etc/netns/<ns>/resolv.conf``)."""
    return ["ip", "netns", "exec", netns, *argv]


def as_proxy_uid() -> list[str]:
    """The argv prefix that runs a command as the proxy uid (whose traffic the capture rules leave alone)."""
    return ["setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups"]


def proxy_dir(run_id: str) -> Path:
    return RUN_ROOT / f"meshfed-{run_id}"


def make_proxy_dir(run_id: str, record: Record) -> Path:
    """The directory the run's Envoys (as the proxy uid) read their bootstraps from: owned by that uid, 0700."""
    path = proxy_dir(run_id)
    record({"kind": "dir", "name": path.name, "path": str(path)})
    path.mkdir(mode=0o700, exist_ok=True)
    os.chown(path, PROXY_UID, PROXY_UID)
    os.chmod(path, 0o700)
    return path


def root_prefixes() -> list[str]:
    """Every IPv4 route destination (all tables) and address of the root namespace, as CIDRs."""
    out: list[str] = []
    routes = json.loads(run(["ip", "-4", "-j", "route", "show", "table", "all"]).stdout or "[]")
    for r in routes:
        dst = str(r.get("dst", ""))
        if dst and dst != "default":
            out.append(dst)
    for link in json.loads(run(["ip", "-4", "-j", "addr", "show"]).stdout or "[]"):
        for a in link.get("addr_info", []):
            out.append(f"{a['local']}/{a.get('prefixlen', 32)}")
    return out


@contextlib.contextmanager
def slot_lock() -> Iterator[None]:
    """Held while a run picks its slot and builds its bridges, so two runs starting together never pick the same
    one (Linux would accept the same address on two bridges without complaint). An exclusive ``flock`` on the
    ``/run`` directory itself: nothing is created, and the kernel releases it if the process dies."""
    fd = os.open(RUN_ROOT, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def pick_slot() -> int:
    slot = free_slot(root_prefixes())
    if slot is None:
        raise NetnsError("every 10.x/12 slot overlaps a route or address of this machine; no room for the bed")
    return slot


def namespaces() -> set[str]:
    done = run(["ip", "netns", "list"], check=False)
    return {line.split()[0] for line in done.stdout.splitlines() if line.strip()}


def links() -> set[str]:
    done = run(["ip", "-o", "link", "show"], check=False)
    names: set[str] = set()
    for line in done.stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.add(parts[1].strip().split("@")[0])
    return names


# ---- building ------------------------------------------------------------------------------------------------


def build(plan: NetPlan, record: Record) -> None:
    """Create the plan's bridges, gateway and pod namespaces, links, routes, resolv.conf files and rules. Each item
    is passed to ``record`` before it is created; a failure raises ``NetnsError`` (the caller tears down)."""
    _bridge(plan.public_bridge, f"{plan.public_root_ip}/{plan.public_cidr.split('/')[1]}", record)
    if plan.vip_root_ip:
        run(["ip", "addr", "add", f"{plan.vip_root_ip}/{plan.vip_cidr.split('/')[1]}", "dev", plan.public_bridge])
    for c in plan.clusters:
        _bridge(c.bridge, f"{c.root_ip}/{c.cidr.split('/')[1]}", record)
    for c in plan.clusters:
        gw = c.gateway
        _netns(gw.netns, record)
        _veth(gw.cluster_host_if, gw.netns, GW_CLUSTER_IF, c.bridge, f"{gw.cluster_ip}/16", record)
        _veth(gw.public_host_if, gw.netns, GW_PUBLIC_IF, plan.public_bridge,
              f"{gw.public_ip}/{plan.public_cidr.split('/')[1]}", record)
        run(in_ns(gw.netns, ["sysctl", "-qw", "net.ipv4.ip_forward=1"]))
        run(in_ns(gw.netns, ["iptables-restore", "--noflush"]), stdin=gateway_rules(plan, c))
    for pod in plan.pods:
        _netns(pod.netns, record)
        _veth(pod.host_if, pod.netns, POD_IF, pod.bridge, pod.cidr, record)
        for dst in (plan.public_cidr, plan.vip_cidr):
            run(["ip", "-n", pod.netns, "route", "add", dst, "via", pod.gateway_ip, "dev", POD_IF])
        if not ETC_NETNS.exists():  # ours: removed again when empty
            record({"kind": "etc-netns", "name": "", "path": str(ETC_NETNS)})
            ETC_NETNS.mkdir(mode=0o755, exist_ok=True)
        conf = ETC_NETNS / pod.netns
        record({"kind": "dir", "name": pod.netns, "path": str(conf)})
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "resolv.conf").write_text(resolv_conf(pod))
        run(in_ns(pod.netns, ["iptables-restore", "--noflush"]), stdin=pod_filter_rules(pod))
    log.info("netns bed built run=%s slot=%d namespaces=%d", plan.run_id, plan.slot, len(plan.namespaces()))


def _bridge(name: str, address: str, record: Record) -> None:
    record({"kind": "link", "name": name})
    run(["ip", "link", "add", name, "type", "bridge"])
    run(["ip", "addr", "add", address, "dev", name])
    run(["ip", "link", "set", name, "up"])


def _netns(name: str, record: Record) -> None:
    record({"kind": "netns", "name": name})
    run(["ip", "netns", "add", name])
    run(["ip", "-n", name, "link", "set", "lo", "up"])


def _veth(host_if: str, netns: str, inner: str, bridge: str, address: str, record: Record) -> None:
    """A veth pair: ``host_if`` on ``bridge`` in the root namespace, ``inner`` with ``address`` inside ``netns``."""
    record({"kind": "link", "name": host_if})
    run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", inner, "netns", netns])
    run(["ip", "link", "set", host_if, "master", bridge, "up"])
    run(["ip", "-n", netns, "addr", "add", address, "dev", inner])
    run(["ip", "-n", netns, "link", "set", inner, "up"])


# ---- removing -------------------------------------------------------------------------------------------------


def teardown(created: Iterable[Mapping[str, str]], run_id: str) -> list[str]:
    """Remove every recorded item of run ``run_id`` that still exists (namespaces first, which takes their veth
    ends along, then links, then resolv.conf directories); returns what could not be removed (empty: all gone).
    Names that are not the run's own are never touched."""
    items = list(created)
    problems: list[str] = []
    present_ns = namespaces()
    for item in items:
        name = item.get("name", "")
        if item.get("kind") == "netns" and is_ours(name, run_id) and name in present_ns:
            done = run(["ip", "netns", "del", name], check=False)
            if done.returncode != 0:
                problems.append(f"netns {name}: {done.stderr.strip()}")
    present_links = links()
    for item in reversed(items):
        name = item.get("name", "")
        if item.get("kind") == "link" and is_ours(name, run_id) and name in present_links:
            done = run(["ip", "link", "del", name], check=False)
            if done.returncode != 0 and name in links():
                problems.append(f"link {name}: {done.stderr.strip()}")
    for item in items:
        name = item.get("name", "")
        path = Path(item.get("path", ""))
        ours = (is_ours(name, run_id) and path == ETC_NETNS / name) or path == proxy_dir(run_id)
        if item.get("kind") == "dir" and ours and RUN_ID.match(run_id):
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(path)
    if any(i.get("kind") == "etc-netns" for i in items):
        with contextlib.suppress(OSError):  # only when empty: another run's (or anyone's) files keep it
            ETC_NETNS.rmdir()
    left_ns = namespaces() & {i["name"] for i in items if i.get("kind") == "netns" and is_ours(i["name"], run_id)}
    left_links = links() & {i["name"] for i in items if i.get("kind") == "link" and is_ours(i["name"], run_id)}
    problems += [f"netns {n} still exists" for n in sorted(left_ns)]
    problems += [f"link {n} still exists" for n in sorted(left_links)]
    log.info("netns bed removed run=%s items=%d problems=%d", run_id, len(items), len(problems))
    return problems


def leftovers(run_id: str) -> list[str]:
    """Namespaces and links of run ``run_id`` that exist now (a test's check that teardown left nothing)."""
    return sorted(n for n in namespaces() | links() if is_ours(n, run_id))


# ---- faults -----------------------------------------------------------------------------------------------------


def partition(plan: NetPlan, cluster: str, peers: Sequence[str] = ()) -> bool:
    """Cut ``cluster`` off the public network, or (``peers``: other clusters) off those clusters' gateways only:
    iptables DROP on its gateway's public leg, inside the gateway's namespace. False if nothing changed."""
    c = plan.cluster(cluster)
    addresses = [plan.cluster(p).gateway.public_ip for p in peers]
    current = _partition_rules_now(plan, cluster)
    if current is not None and f"-A MESHFED_PARTITION -i {GW_PUBLIC_IF} -j DROP" in current:
        return False  # already cut off from everyone
    if not addresses and current is not None:
        heal(plan, cluster)  # from some peers to all of them
        current = None
    new = [a for a in addresses if current is None or f"-s {a}/32" not in current]
    if addresses and not new:
        return False
    run(in_ns(c.gateway.netns, ["iptables-restore", "--noflush"]),
        stdin=partition_rules(c, new, new_chain=current is None))
    return True


def heal(plan: NetPlan, cluster: str) -> bool:
    """Undo :func:`partition`; False if ``cluster`` was not partitioned."""
    c = plan.cluster(cluster)
    if not partitioned(plan, cluster):
        return False
    run(in_ns(c.gateway.netns, ["iptables-restore", "--noflush"]), stdin=heal_rules())
    return True


def _partition_rules_now(plan: NetPlan, cluster: str) -> str | None:
    """The partition chain's rules in ``cluster``'s gateway namespace, None if there is no partition."""
    done = run(in_ns(plan.cluster(cluster).gateway.netns, ["iptables-save", "-t", "filter"]))
    if ":MESHFED_PARTITION" not in done.stdout:
        return None
    return "\n".join(line for line in done.stdout.splitlines() if line.startswith("-A MESHFED_PARTITION"))


def partitioned(plan: NetPlan, cluster: str) -> bool:
    return _partition_rules_now(plan, cluster) is not None



def describe(plan: NetPlan) -> dict[str, Any]:
    """The plan in a few lines for ``meshfed up``'s progress and ``status``."""
    return {"slot": plan.slot_cidr, "public": plan.public_cidr, "vips": plan.vip_alloc_cidr or plan.vip_cidr,
            "clusters": {c.cluster: c.cidr for c in plan.clusters}}
