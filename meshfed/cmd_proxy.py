"""``meshfed proxy``: the sidecar's side of a pod, run inside the pod's network namespace.

``meshfed proxy capture`` installs (or with ``--cleanup`` removes) the iptables ``nat`` rules that send the pod's
TCP traffic through its sidecar: outbound to ``--outbound-port``, inbound to ``--inbound-port``. The rules come
from ``meshfed.capture`` (pure), the tables are read and written by ``meshfed.netfilter``; this module only
decides per address family and prints. See docs/traffic-capture.md.

``meshfed proxy run`` is the sidecar container's program: the Envoy bootstrap from the pod's environment
(``meshfed.agent``, pure), Envoy started as the proxy uid, signals forwarded, Envoy restarted when the projected
xDS token is refreshed (its ADS stream presents the token only when it opens). See docs/injection.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

import click

from gateway import envoy
from gateway.bootstrap import write_bootstrap
from meshfed import netfilter
from meshfed.agent import AgentEnv, AgentError, agent_env, bootstrap, proxy_info
from meshfed.appprobe import AppProbeServer
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

log = logging.getLogger("meshfed.proxy")


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


# --------------------------------------------------------------------------------------------- proxy run

TOKEN_POLL_SECONDS = 30.0
STOP_GRACE_SECONDS = 20.0


@proxy.command("run")
@click.option("--proxy-uid", type=int, default=DEFAULT_PROXY_UID, show_default=True,
              help="uid Envoy runs as; started as root, the agent drops to it (its traffic is never captured)")
@click.option("--token-poll", type=float, default=TOKEN_POLL_SECONDS, show_default=True, metavar="SECONDS",
              help="how often the projected token is checked; a new one restarts Envoy with it")
@click.option("--log-level", default="warning", show_default=True, help="Envoy's log level")
@click.option("--grpc", "grpc_", is_flag=True,
              help="proxyless gRPC (template grpc): no Envoy; write GRPC_XDS_BOOTSTRAP and the workload "
                   "certificates (renewed over SDS) into $MESHFED_RUN_DIR/grpc")
def run_cmd(proxy_uid: int, token_poll: float, log_level: str, grpc_: bool) -> None:
    """Run the pod's sidecar: write Envoy's bootstrap from the environment (downward API, MESHFED_*), start
    Envoy as the proxy uid, forward SIGTERM/SIGINT to it and exit with it.

    Envoy's ADS stream authenticates with the projected token in MESHFED_XDS_TOKEN_FILE; when the kubelet
    refreshes it, Envoy is restarted with the new one. Readiness: GET :15021/healthz/ready (Envoy's /ready).
    The application probes injection moved here (MESHFED_APP_PROBES) are answered on :15020/app-health/....

    With --grpc there is no Envoy: the agent fetches the pod's certificate over SDS with the token and writes
    the files and bootstrap a proxyless gRPC application reads (docs/injection.md)."""
    if grpc_:
        raise SystemExit(_run_grpc(token_poll))
    try:
        agent = agent_env(os.environ)
        proxy_info(agent)
    except AgentError as exc:
        fail(str(exc), code=2)
    if proxy_uid != os.getuid() and os.getuid() != 0:
        fail(f"--proxy-uid {proxy_uid}: running as uid {os.getuid()}, which can start Envoy only as itself")
    raise SystemExit(_supervise(agent, proxy_uid=proxy_uid, token_poll=token_poll, log_level=log_level))


def _read_token(agent: AgentEnv) -> str:
    try:
        return Path(agent.token_file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise AgentError(f"MESHFED_XDS_TOKEN_FILE {agent.token_file}: {exc.strerror or exc}") from exc


def _start(agent: AgentEnv, token: str, *, proxy_uid: int, log_level: str) -> subprocess.Popen[bytes]:
    run_dir = Path(agent.run_dir)
    path = write_bootstrap(run_dir / "envoy-bootstrap.json", bootstrap(agent, token))
    drop = proxy_uid != os.getuid()
    if drop:  # only root gets here: the bootstrap (0600, it holds the token) must be readable by Envoy
        os.chown(path, proxy_uid, proxy_uid)
    argv = envoy.command(path, log_level=log_level, binary=envoy.real_binary() if drop else None)
    log.info("starting envoy node=%s xds=%s uid=%d", agent.node_id, agent.xds, proxy_uid)
    return subprocess.Popen(argv, user=proxy_uid if drop else None, group=proxy_uid if drop else None,
                            extra_groups=[] if drop else None)


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def _supervise(agent: AgentEnv, *, proxy_uid: int, token_poll: float, log_level: str) -> int:
    """Run Envoy until it exits or a signal arrives (forwarded to it at once); returns the exit status."""
    received: list[int] = []
    current: list[subprocess.Popen[bytes]] = []

    def on_signal(signum: int, frame: object) -> None:
        received.append(signum)
        for proc in current:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    probes: contextlib.ExitStack = contextlib.ExitStack()
    try:
        if agent.app_probes:  # kubelet's probes of the app, moved here by injection (meshfed.appprobe)
            try:
                server = probes.enter_context(AppProbeServer(dict(agent.app_probes), port=agent.agent_port))
            except OSError as exc:
                click.echo(f"error: the application probes' port {agent.agent_port}: {exc.strerror or exc}",
                           err=True)
                return 1
            log.info("application probes on :%d: %s", server.port, ", ".join(p for p, _ in agent.app_probes))
        token = ""
        while not received:  # one round per Envoy process: it exits, or is restarted for a new token
            try:
                token = _read_token(agent)
                current[:] = [_start(agent, token, proxy_uid=proxy_uid, log_level=log_level)]
            except (AgentError, OSError, envoy.EnvoyError) as exc:
                click.echo(f"error: {exc}", err=True)
                return 1
            proc = current[0]
            if received:  # a signal between the check and the start
                proc.send_signal(received[0])
            while True:
                try:
                    code: int | None = proc.wait(timeout=token_poll)
                except subprocess.TimeoutExpired:
                    code = None
                if received:
                    status = _stop(proc, received[0])
                    log.info("envoy stopped on signal %d status=%d", received[0], status)
                    return 0 if status in (0, -received[0]) else status
                if code is not None:
                    click.echo(f"envoy exited with status {code}", err=True)
                    return code if code > 0 else 1
                try:
                    fresh = _read_token(agent)
                except AgentError as exc:
                    log.warning("token not readable, keeping the running envoy: %s", exc)
                    continue
                if fresh != token:
                    log.info("xds token refreshed; restarting envoy so its next ADS stream presents it")
                    _stop(proc)
                    break
        return 0
    finally:
        probes.close()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _run_grpc(token_poll: float) -> int:
    import asyncio

    from meshfed.grpcagent import GrpcAgent

    try:
        agent = agent_env(os.environ)
        refresh = os.environ.get("MESHFED_GRPC_REFRESH_SECONDS", "").strip() or "5"
        if not refresh.isdigit() or int(refresh) < 1:
            raise AgentError(f"MESHFED_GRPC_REFRESH_SECONDS={refresh!r} is not a whole number of seconds >= 1")
        worker = GrpcAgent(agent, token_poll=token_poll, refresh_s=int(refresh))
        worker.prepare()
    except (AgentError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        return 2

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(s, stop.set)
        await worker.serve(stop)

    try:
        asyncio.run(main())
    except (AgentError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        return 1
    return 0
