"""The IO edge of traffic capture: which network namespace this process is in, and ``iptables-save`` /
``iptables-restore`` (and the ip6tables pair) run as subprocesses. What to change comes from ``meshfed.capture``.

Exception tree (this module)::

    NetfilterError            an iptables tool is missing or failed; the message has its stderr
     +-- RootNamespaceError   refusing to change the root network namespace's tables
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

from meshfed.capture import Family, NatTable, has_global_ipv6, parse_save

log = logging.getLogger("meshfed.capture")

TOOL_TIMEOUT = 30.0
IF_INET6 = Path("/proc/net/if_inet6")
INSTALL_HINT = "install Debian's iptables package (apt-get install iptables)"


class NetfilterError(Exception):
    """An iptables tool is missing or failed."""


class RootNamespaceError(NetfilterError):
    """This process is in the root network namespace, whose firewall meshfed never changes."""


def netns_inode(pid: int | str) -> int | None:
    """The inode of ``/proc/<pid>/ns/net`` (identifies a network namespace), or ``None`` if it cannot be read."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def _is_kthreadd(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "kthreadd"
    except OSError:
        return False


def ensure_pod_namespace() -> None:
    """Refuse unless this process is in a network namespace other than the root one.

    The root namespace is pid 1's; where pid 1's namespace cannot be read (a sandbox hiding it), the kernel
    thread daemon's (pid 2, always in the initial namespace) stands in. If neither can be read, refuse: meshfed
    cannot tell, and a wrong guess would change the host's firewall."""
    own = netns_inode("self")
    references = [netns_inode(1)]
    if _is_kthreadd(2):
        references.append(netns_inode(2))
    known = [r for r in references if r is not None]
    if own is None or not known:
        raise RootNamespaceError(
            "cannot tell whether this is the root network namespace (/proc/self/ns/net or /proc/1/ns/net "
            "unreadable); refusing to change iptables rules"
        )
    if own in known:
        raise RootNamespaceError(
            "refusing to change the root network namespace's iptables rules: `meshfed proxy capture` belongs "
            f"inside a pod's network namespace (this process is in net namespace {own}, the root one: pid 1's or "
            "the kernel threads'). Run it there, e.g. `ip netns exec NS meshfed proxy capture`, or use --dry-run "
            "to print the rules"
        )


def ipv6_present() -> bool:
    """Whether this namespace has a global (or ULA) IPv6 address on a non-loopback interface."""
    try:
        return has_global_ipv6(IF_INET6.read_text())
    except OSError:
        return False  # IPv6 disabled in this kernel or namespace


def ipv6_enabled() -> bool:
    """Whether this kernel and namespace have IPv6 at all (without it ip6tables-save fails)."""
    return IF_INET6.exists()


def tool_available(family: Family) -> bool:
    return shutil.which(family.save_command) is not None and shutil.which(family.restore_command) is not None


def _run(argv: list[str], *, stdin: str | None = None) -> str:
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False)
    except FileNotFoundError as exc:
        raise NetfilterError(f"{argv[0]} not found: {INSTALL_HINT}") from exc
    except subprocess.TimeoutExpired as exc:
        raise NetfilterError(f"{argv[0]} did not finish within {TOOL_TIMEOUT:.0f} s") from exc
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip()
        raise NetfilterError(f"{' '.join(argv)} failed (exit {done.returncode}): {detail}")
    return done.stdout


def read_nat(family: Family) -> NatTable:
    """``iptables-save -t nat`` (or ip6tables-save) of this namespace, parsed."""
    return parse_save(_run([family.save_command, "-t", "nat"]))


def restore(family: Family, text: str) -> None:
    """Apply ``text`` with ``iptables-restore --noflush``: one transaction, nothing outside it is touched."""
    log.info("restore family=%s lines=%d", family.value, text.count("\n"))
    _run([family.restore_command, "--noflush"], stdin=text)
