"""``meshfed proxy``: the sidecar's side of a pod, run inside the pod's network namespace.

``meshfed proxy capture`` installs (or with ``--cleanup`` removes) the iptables ``nat`` rules that send the pod's
TCP traffic through its sidecar: outbound to ``--outbound-port``, inbound to ``--inbound-port``. The rules come
from ``meshfed.capture`` (pure), the tables are read and written by ``meshfed.netfilter``; this module only
decides per address family and prints. See docs/traffic-capture.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import click

from meshfed import netfilter
from meshfed.capture import (
    DEFAULT_INBOUND_PORT,
    DEFAULT_OUTBOUND_PORT,
    DEFAULT_PROXY_UID,
    CaptureConfig,
    CaptureError,
    Family,
    installed,
    parse_cidrs,
    parse_ports,
    plan_apply,
    plan_cleanup,
    restore_text,
    rules_for,
)
from meshfed.output import fail


@click.group("proxy")
def proxy() -> None:
    """The sidecar's data plane inside a pod's network namespace."""


def _joined(values: Sequence[str]) -> str:
    return ",".join(values)


@proxy.command("capture")
@click.option("--proxy-uid", type=int, default=DEFAULT_PROXY_UID, show_default=True,
              help="uid the proxy runs as; its own traffic is never captured")
@click.option("--outbound-port", type=int, default=DEFAULT_OUTBOUND_PORT, show_default=True,
              help="the sidecar's outbound (use_original_dst) listener")
@click.option("--inbound-port", type=int, default=DEFAULT_INBOUND_PORT, show_default=True,
              help="the sidecar's inbound listener")
@click.option("--exclude-outbound-cidrs", multiple=True, metavar="CIDR[,CIDR...]",
              help="destinations left alone (IPv4 and IPv6; comma-separated, repeatable)")
@click.option("--exclude-outbound-ports", multiple=True, metavar="PORT[,PORT...]",
              help="destination ports left alone (8080 or 9000-9099; comma-separated, repeatable)")
@click.option("--exclude-inbound-ports", multiple=True, metavar="PORT[,PORT...]",
              help="workload ports not sent to the sidecar (15000-15090 never are)")
@click.option("--dry-run", is_flag=True, help="print the rules (or, with --cleanup, what would go) and change nothing")
@click.option("--cleanup", is_flag=True, help="remove meshfed's chains and the jumps to them, nothing else")
def capture_cmd(
    proxy_uid: int,
    outbound_port: int,
    inbound_port: int,
    exclude_outbound_cidrs: tuple[str, ...],
    exclude_outbound_ports: tuple[str, ...],
    exclude_inbound_ports: tuple[str, ...],
    dry_run: bool,
    cleanup: bool,
) -> None:
    """Redirect the pod's TCP traffic through its sidecar with iptables (nat table, MESHFED_* chains).

    Run it inside the pod's network namespace; it refuses the root namespace unless --dry-run. A second run
    changes nothing; --cleanup removes exactly what it added."""
    try:
        config = CaptureConfig(
            proxy_uid=proxy_uid,
            outbound_port=outbound_port,
            inbound_port=inbound_port,
            exclude_outbound_cidrs=parse_cidrs(_joined(exclude_outbound_cidrs), flag="--exclude-outbound-cidrs"),
            exclude_outbound_ports=parse_ports(_joined(exclude_outbound_ports), flag="--exclude-outbound-ports"),
            exclude_inbound_ports=parse_ports(_joined(exclude_inbound_ports), flag="--exclude-inbound-ports"),
        )
    except CaptureError as exc:
        fail(str(exc), code=2)
    try:
        if cleanup:
            _cleanup(dry_run=dry_run)
        elif dry_run:
            _print_rules(config)
        else:
            _apply(config)
    except netfilter.NetfilterError as exc:
        fail(str(exc))


def _print_rules(config: CaptureConfig) -> None:
    v6 = netfilter.ipv6_present()
    for family in Family:
        wanted = rules_for(config, family)
        if family is Family.V4:
            click.echo(f"# {family.value}: {family.restore_command} --noflush")
        else:
            here = "yes" if v6 else "no, so these would be skipped"
            click.echo(f"# {family.value}: {family.restore_command} --noflush, only where the namespace has a "
                       f"global IPv6 address on a non-loopback interface (here: {here})")
        click.echo(restore_text([*(f":{c} - [0:0]" for c in wanted.chains), *wanted.lines()]), nl=False)


def _apply(config: CaptureConfig) -> None:
    netfilter.ensure_pod_namespace()
    v6 = netfilter.ipv6_present()
    for family in (Family.V4, Family.V6) if v6 else (Family.V4,):
        if not netfilter.tool_available(family):
            raise netfilter.NetfilterError(
                f"{family.restore_command} not found: {netfilter.INSTALL_HINT}")
        wanted = rules_for(config, family)
        text = plan_apply(netfilter.read_nat(family), wanted)
        if text is None:
            click.echo(f"{family.value}: already in place, nothing changed")
            continue
        netfilter.restore(family, text)
        now = installed(netfilter.read_nat(family), family)
        if now.key() != wanted.key():
            raise netfilter.NetfilterError(
                f"{family.value}: the nat table after {family.restore_command} does not match the wanted rules "
                f"(wanted {wanted.lines()}, found {now.lines()})")
        click.echo(f"{family.value}: installed {len(wanted.chains)} chains, {len(wanted.jumps)} jumps, "
                   f"{len(wanted.rules)} rules (outbound -> {config.outbound_port}, inbound -> "
                   f"{config.inbound_port}, proxy uid {config.proxy_uid} not captured)")
    if not v6:
        click.echo("ipv6: skipped (no global IPv6 address on a non-loopback interface)")


def _cleanup(*, dry_run: bool) -> None:
    if not dry_run:
        netfilter.ensure_pod_namespace()
    for family in Family:
        if family is Family.V6 and not netfilter.ipv6_enabled():
            click.echo("ipv6: skipped (IPv6 is disabled here)")
            continue
        if not netfilter.tool_available(family):
            if family is Family.V4:
                raise netfilter.NetfilterError(
                    f"{family.save_command} not found: {netfilter.INSTALL_HINT}")
            continue
        text = plan_cleanup(netfilter.read_nat(family), family)
        if text is None:
            click.echo(f"{family.value}: nothing to remove")
        elif dry_run:
            click.echo(f"# {family.value}: {family.restore_command} --noflush")
            click.echo(text, nl=False)
        else:
            netfilter.restore(family, text)
            click.echo(f"{family.value}: removed meshfed's chains and the jumps to them")
