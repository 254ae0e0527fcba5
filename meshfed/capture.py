"""Traffic capture rules for a pod's network namespace: pure generation, no IO.

``meshfed proxy capture`` (``meshfed.cmd_proxy``) turns its flags into a :class:`CaptureConfig`, reads the
namespace's ``nat`` table (``iptables-save -t nat``) at the edge (``meshfed.netfilter``) and asks this module
what to change: :func:`rules_for` gives the rules meshfed wants for one address family, :func:`parse_save`
reads what is installed, :func:`plan_apply` and :func:`plan_cleanup` give the ``iptables-restore --noflush``
text that gets from one to the other (``None`` when nothing needs to change, which makes a second run a no-op).

The rules, in the ``nat`` table (see docs/traffic-capture.md)::

    OUTPUT     -p tcp -> MESHFED_OUTPUT
      MESHFED_OUTPUT      the proxy's uid             -> RETURN (its own traffic: never captured, no loop)
                          out through lo              -> RETURN (127.0.0.0/8, ::1, the pod's own addresses)
                          excluded CIDRs, ports       -> RETURN
                          everything else             -> MESHFED_REDIRECT
      MESHFED_REDIRECT    REDIRECT --to-ports <outbound port, 15001>
    PREROUTING -p tcp -> MESHFED_INBOUND
      MESHFED_INBOUND     the proxy's ports (15000-15090, and the two capture ports) -> RETURN
                          excluded inbound ports      -> RETURN
                          everything else             -> MESHFED_IN_REDIRECT
      MESHFED_IN_REDIRECT REDIRECT --to-ports <inbound port, 15006>

Rules are spelled exactly as ``iptables-save`` prints them, so installed rules compare equal to wanted ones.

Exception tree (this module)::

    CaptureError          a flag value is not usable; the message names the flag and the value
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

CHAIN_PREFIX = "MESHFED_"
OUTPUT_CHAIN = "MESHFED_OUTPUT"
REDIRECT_CHAIN = "MESHFED_REDIRECT"
INBOUND_CHAIN = "MESHFED_INBOUND"
IN_REDIRECT_CHAIN = "MESHFED_IN_REDIRECT"
CHAINS = (INBOUND_CHAIN, IN_REDIRECT_CHAIN, OUTPUT_CHAIN, REDIRECT_CHAIN)
BUILTIN_CHAINS = ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")

DEFAULT_PROXY_UID = 1337
DEFAULT_OUTBOUND_PORT = 15001
DEFAULT_INBOUND_PORT = 15006


class CaptureError(ValueError):
    """A capture flag's value is not usable; the message names the flag."""


class Family(enum.Enum):
    V4 = "ipv4"
    V6 = "ipv6"

    @property
    def save_command(self) -> str:
        return "iptables-save" if self is Family.V4 else "ip6tables-save"

    @property
    def restore_command(self) -> str:
        return "iptables-restore" if self is Family.V4 else "ip6tables-restore"


@dataclass(frozen=True, slots=True, order=True)
class PortRange:
    """One TCP port or an inclusive range, as ``--dport`` spells it (``8080`` or ``8000:8099``)."""

    first: int
    last: int

    def __post_init__(self) -> None:
        if not 1 <= self.first <= self.last <= 65535:
            raise CaptureError(f"port range {self.first}-{self.last} is not within 1-65535 (first <= last)")

    @property
    def spec(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}:{self.last}"

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last


# The sidecar's own ports (admin 15000, capture 15001/15006, health and metrics up to 15090, as Istio reserves
# them): connections to them from outside the pod are for the proxy itself and are never redirected.
PROXY_PORTS = PortRange(15000, 15090)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    """What ``meshfed proxy capture`` was asked for."""

    proxy_uid: int = DEFAULT_PROXY_UID
    outbound_port: int = DEFAULT_OUTBOUND_PORT
    inbound_port: int = DEFAULT_INBOUND_PORT
    exclude_outbound_cidrs: tuple[Network, ...] = ()
    exclude_outbound_ports: tuple[PortRange, ...] = ()
    exclude_inbound_ports: tuple[PortRange, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.proxy_uid <= 0xFFFFFFFE:
            raise CaptureError(f"--proxy-uid {self.proxy_uid} is not a uid")
        if self.proxy_uid == 0:
            raise CaptureError("--proxy-uid 0: the proxy must not run as root, or no root traffic would be captured")
        for flag, port in (("--outbound-port", self.outbound_port), ("--inbound-port", self.inbound_port)):
            if not 1 <= port <= 65535:
                raise CaptureError(f"{flag} {port} is not a TCP port (1-65535)")
        if self.outbound_port == self.inbound_port:
            raise CaptureError(f"--outbound-port and --inbound-port are both {self.outbound_port}; they must differ")


def parse_ports(text: str, *, flag: str) -> tuple[PortRange, ...]:
    """``"22,8080,9000-9099"`` (``:`` works for ranges too) -> sorted, de-duplicated ranges; empty text -> ()."""
    out: set[PortRange] = set()
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        m = re.fullmatch(r"(\d{1,5})(?:[-:](\d{1,5}))?", item)
        if m is None:
            raise CaptureError(f"{flag}: {item!r} is not a port or a range (e.g. 8080 or 9000-9099)")
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) else first
        try:
            out.add(PortRange(first, last))
        except CaptureError as exc:
            raise CaptureError(f"{flag}: {item!r}: {exc}") from exc
    return tuple(sorted(out))


def parse_cidrs(text: str, *, flag: str) -> tuple[Network, ...]:
    """``"10.96.0.0/12,fd00::/8"`` -> networks, IPv4 first, de-duplicated; a bare address means one host."""
    out: list[Network] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            net = ipaddress.ip_network(item, strict=True)
        except ValueError as exc:
            hint = ""
            try:
                hint = f" (did you mean {ipaddress.ip_network(item, strict=False)}?)"
            except ValueError:
                pass
            raise CaptureError(f"{flag}: {item!r} is not an IPv4 or IPv6 CIDR{hint}") from exc
        if net not in out:
            out.append(net)
    return tuple(sorted(out, key=lambda n: (n.version, n)))


@dataclass(frozen=True, slots=True, order=True)
class Rule:
    """One rule: its chain and the rest of the line, as ``iptables-save`` prints it after ``-A CHAIN``."""

    chain: str
    spec: str

    @property
    def line(self) -> str:
        return f"-A {self.chain} {self.spec}"

    @property
    def target(self) -> str:
        m = re.search(r"(?:^|\s)-j (\S+)", self.spec)
        return m.group(1) if m else ""


@dataclass(frozen=True, slots=True)
class RuleSet:
    """meshfed's part of one family's ``nat`` table: its chains, the jumps into them, and their rules."""

    family: Family
    chains: tuple[str, ...]
    jumps: tuple[Rule, ...]
    rules: tuple[Rule, ...]

    @property
    def empty(self) -> bool:
        return not self.chains and not self.jumps and not self.rules

    def lines(self) -> list[str]:
        return [r.line for r in (*self.jumps, *self.rules)]

    def key(self) -> tuple[tuple[str, ...], tuple[Rule, ...], tuple[Rule, ...]]:
        """Equality of what is in force: chains as a set, jumps as a multiset, rules in order per chain."""
        per_chain = tuple(r for chain in sorted(self.chains) for r in self.rules if r.chain == chain)
        return tuple(sorted(self.chains)), tuple(sorted(self.jumps)), per_chain


def rules_for(config: CaptureConfig, family: Family) -> RuleSet:
    """The rules meshfed wants in ``family``'s ``nat`` table for ``config``."""
    out: list[Rule] = []

    def add(chain: str, spec: str) -> None:
        out.append(Rule(chain, spec))

    version = 4 if family is Family.V4 else 6
    # The proxy calling its own pod's address (a service whose endpoint is this very pod) goes to its inbound side,
    # like any caller's connection, instead of reaching the app with the mesh's TLS. Not 127.0.0.1 / ::1: that is
    # where the inbound side hands connections to the app, so this cannot loop.
    loopback = "127.0.0.1/32" if version == 4 else "::1/128"
    add(OUTPUT_CHAIN, f"! -d {loopback} -o lo -m owner --uid-owner {config.proxy_uid} -j {INBOUND_CHAIN}")
    add(OUTPUT_CHAIN, f"-m owner --uid-owner {config.proxy_uid} -j RETURN")
    add(OUTPUT_CHAIN, "-o lo -j RETURN")
    for net in config.exclude_outbound_cidrs:
        if net.version == version:
            add(OUTPUT_CHAIN, f"-d {net.with_prefixlen} -j RETURN")
    for ports in config.exclude_outbound_ports:
        add(OUTPUT_CHAIN, f"-p tcp -m tcp --dport {ports.spec} -j RETURN")
    add(OUTPUT_CHAIN, f"-j {REDIRECT_CHAIN}")
    add(REDIRECT_CHAIN, f"-p tcp -j REDIRECT --to-ports {config.outbound_port}")

    for ports in inbound_excluded(config):
        add(INBOUND_CHAIN, f"-p tcp -m tcp --dport {ports.spec} -j RETURN")
    add(INBOUND_CHAIN, f"-p tcp -j {IN_REDIRECT_CHAIN}")
    add(IN_REDIRECT_CHAIN, f"-p tcp -j REDIRECT --to-ports {config.inbound_port}")

    jumps = (Rule("PREROUTING", f"-p tcp -j {INBOUND_CHAIN}"), Rule("OUTPUT", f"-p tcp -j {OUTPUT_CHAIN}"))
    return RuleSet(family=family, chains=CHAINS, jumps=jumps, rules=tuple(out))


def inbound_excluded(config: CaptureConfig) -> tuple[PortRange, ...]:
    """Inbound ports never redirected: the proxy's range, both capture ports (when outside it), the flag's."""
    ranges = {PROXY_PORTS, *config.exclude_inbound_ports}
    for port in (config.outbound_port, config.inbound_port):
        if not any(port in r for r in ranges):
            ranges.add(PortRange(port, port))
    return tuple(sorted(ranges))


@dataclass(frozen=True, slots=True)
class NatTable:
    """One family's ``nat`` table as ``iptables-save -t nat`` printed it (counters ignored)."""

    chains: tuple[str, ...]
    rules: tuple[Rule, ...]


def parse_save(text: str) -> NatTable:
    """The ``*nat`` section of ``iptables-save`` output; no ``*nat`` section means an empty table."""
    chains: list[str] = []
    rules: list[Rule] = []
    in_nat = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            in_nat = line == "*nat"
            continue
        if not in_nat:
            continue
        if line == "COMMIT":
            in_nat = False
        elif line.startswith(":"):
            chains.append(line[1:].split()[0])
        elif line.startswith("-A "):
            chain, _, spec = line[3:].partition(" ")
            rules.append(Rule(chain, spec.strip()))
    return NatTable(chains=tuple(chains), rules=tuple(rules))


def installed(table: NatTable, family: Family) -> RuleSet:
    """meshfed's part of ``table``: every ``MESHFED_*`` chain, its rules, and the rules elsewhere jumping into one."""
    ours = tuple(c for c in table.chains if c.startswith(CHAIN_PREFIX))
    jumps = tuple(r for r in table.rules if r.chain not in ours and r.target.startswith(CHAIN_PREFIX))
    rules = tuple(r for r in table.rules if r.chain in ours)
    return RuleSet(family=family, chains=ours, jumps=jumps, rules=rules)


def restore_text(lines: Iterable[str]) -> str:
    return "\n".join(["*nat", *lines, "COMMIT", ""])


def _removal(current: RuleSet, *, keep: Sequence[str] = ()) -> list[str]:
    """Lines deleting the jumps into meshfed's chains and emptying them; chains not in ``keep`` are deleted."""
    lines = [f"-D {r.chain} {r.spec}" for r in current.jumps]
    lines += [f"-F {c}" for c in current.chains]
    lines += [f"-X {c}" for c in current.chains if c not in keep]
    return lines


def plan_apply(table: NatTable, wanted: RuleSet) -> str | None:
    """``iptables-restore --noflush`` input turning ``table`` into one with exactly ``wanted`` as meshfed's part;
    ``None`` when that is already so. One transaction: it applies whole or not at all."""
    current = installed(table, wanted.family)
    if current.key() == wanted.key():
        return None
    lines = [f":{c} - [0:0]" for c in wanted.chains if c not in current.chains]
    lines += _removal(current, keep=wanted.chains)
    lines += wanted.lines()
    return restore_text(lines)


def plan_cleanup(table: NatTable, family: Family) -> str | None:
    """``iptables-restore --noflush`` input removing meshfed's chains and the jumps to them; ``None`` if none."""
    current = installed(table, family)
    if current.empty:
        return None
    return restore_text(_removal(current))


def has_global_ipv6(if_inet6: str) -> bool:
    """Whether ``/proc/net/if_inet6`` lists an address of global scope (ULA included) on an interface other
    than ``lo``: only then does the namespace get ip6tables rules."""
    for line in if_inet6.splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[3] == "00" and parts[5] != "lo":
            return True
    return False

