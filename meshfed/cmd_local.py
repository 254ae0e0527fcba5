"""``meshfed up`` and ``meshfed down``: a whole federation on this machine, from a clusterset directory."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

import click

from discovery.addresses import parse_hostport
from discovery.clusterset import ClusterSetError
from discovery.model import DiscoveryError
from federation.trust.errors import TrustError
from meshfed import local, netns, runstate
from meshfed import prometheus as prom
from meshfed.output import console, emit, fail, output_option
from meshfed.runstate import RunState

RUN_DIR_OPTION = click.option(
    "--run-dir", type=click.Path(file_okay=False, path_type=Path), default=local.DEFAULT_RUN_DIR, show_default=True,
    help="where the run keeps its state, certificates and logs",
)


def summary_sections(state: RunState) -> list[tuple[str, list[str], list[list[Any]]]]:
    fed = state.federation
    rows: list[list[Any]] = []
    for name, c in state.clusters.items():
        cp = c.controlplane
        rows.append([name, cp.xds, cp.dns, cp.admin, c.gateway.address, c.gateway.admin])
    workloads: list[list[Any]] = []
    for name, c in state.clusters.items():
        for w in c.workloads:
            where = w.outbound or f"{w.pod_ip} in {w.netns}"
            workloads.append([name, w.name, w.service or "(client)", where, w.sidecar_admin, w.spiffe_id])
    fed_row = [fed.url, fed.store, fed.log] if fed is not None else [None, None, None]
    return [
        ("Federation", ["url", "store", "log"], [fed_row]),
        ("Clusters", ["cluster", "xds", "dns", "admin (status, metrics)", "gateway", "gateway admin"], rows),
        ("Workloads", ["cluster", "workload", "service", "sidecar outbound / pod", "sidecar admin", "identity"],
         workloads),
    ]


NETWORKS = ("auto", "netns", "loopback")


def pick_network(asked: str) -> tuple[str, str]:
    """The network mode for ``meshfed up --network ASKED`` and why: ``auto`` is netns where the bed can be built
    (root, with ip, iptables, setpriv), else loopback; ``netns`` where it cannot is an error."""
    ok, why = netns.available()
    if asked == "loopback":
        return "loopback", "asked for (--network loopback)"
    if asked == "netns":
        if not ok:
            raise local.LocalRunError(f"--network netns: {why}; use --network loopback")
        return "netns", f"asked for (--network netns); {why}"
    return ("netns", f"auto: {why}") if ok else ("loopback", f"auto: {why}")


def pod_call_example(state: RunState, client: str, url: str) -> str:
    """A command a person can paste to call ``url`` from inside a pod: curl where it is installed, else Python."""
    if shutil.which("curl"):
        inner = f"curl -s {url}"
    else:
        script = f"import urllib.request; print(urllib.request.urlopen({url!r}).read().decode())"
        inner = f"python3 -c {shlex.quote(script)}"
    run_dir = state.run_dir
    return f"meshfed exec {client} --run-dir {run_dir} -- {inner}"


@click.command("up")
@click.argument("clusterset", required=False, default="clusters/demo",
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@RUN_DIR_OPTION
@click.option("--detach", is_flag=True, help="return once the federation is up and proven (stop with 'meshfed down')")
@click.option("--supervise", is_flag=True,
              help="with --detach: leave a supervisor that starts again any child that dies (backoff); the "
                   "foreground mode always supervises")
@click.option("--lease-ttl", type=float, default=None, metavar="SECONDS",
              help="federation lease TTL (default: the clusterset's)")
@click.option("--timeout", type=float, default=90.0, show_default=True, metavar="SECONDS",
              help="how long to wait for each part to become ready")
@click.option("--bundle-refresh-hint", type=click.IntRange(min=1), default=None, metavar="SECONDS",
              help="spiffe_refresh_hint of the run's SPIFFE bundle endpoint (default 300; peers refresh at it)")
@click.option("--scrape-interval", type=click.FloatRange(min=0.1), default=prom.DEFAULT_SCRAPE_INTERVAL,
              show_default=True, metavar="SECONDS", help="how often the run's Prometheus scrapes every Envoy, control "
                                                         "plane and the federation (docs/observability.md)")
@click.option("--network", type=click.Choice(NETWORKS), default=lambda: os.environ.get("MESHFED_NETWORK", "auto"),
              show_default="auto, or $MESHFED_NETWORK",
              help="netns: a network per cluster and a network namespace per workload (needs root, ip, iptables); "
                   "loopback: everything on 127.0.0.0/8; auto: netns where it can be built, else loopback")
@output_option
def up_cmd(clusterset: Path, run_dir: Path, detach: bool, supervise: bool, lease_ttl: float | None, timeout: float,
           bundle_refresh_hint: int | None, scrape_interval: float, network: str, output: str) -> None:
    """Start a whole federation on this machine from CLUSTERSET (default clusters/demo)."""
    err = console(stderr=True)
    started = time.monotonic()

    def progress(message: str) -> None:
        err.print(f"[dim]{time.monotonic() - started:5.1f}s[/] {message}")

    try:
        mode, why = pick_network(network)
    except local.LocalRunError as exc:
        fail(str(exc))
        return
    progress(f"network: {mode} ({why})")
    run = local.LocalRun(clusterset_dir=clusterset, run_dir=run_dir, lease_ttl=lease_ttl, progress=progress,
                         ready_timeout=timeout, network=mode, network_reason=why,
                         bundle_refresh_hint=bundle_refresh_hint, scrape_interval=scrape_interval)
    try:
        state = run.start()
        progress("proving the federation: a cross-cluster request through a sidecar"
                 + (" (from inside the client's pod, by DNS name)" if mode == "netns" else ""))
        proof = local.prove(state, timeout=timeout)
    except local.LocalRunError as exc:
        local.stop_run(run_dir)
        fail(str(exc), hint=f"logs are under {run_dir}; 'meshfed up' stopped everything it started")
        return
    except (ClusterSetError, DiscoveryError, TrustError) as exc:
        local.stop_run(run_dir)
        fail(str(exc), hint="fix the clusterset definition or its manifests and run 'meshfed up' again")
        return
    state = replace(state, proof=proof)
    local.write_state(run_dir, state)
    answer = proof["answer"]
    progress(f"[green]ok[/]: {proof['from']} -> {proof['host']} answered by {answer.get('workload')} in cluster "
             f"{answer.get('cluster')}, caller seen as {answer.get('caller') or '(no identity)'}")
    emit(output, runstate.encode(state), summary_sections(state))
    if output != "json":
        out = console()
        out.print("\nWhere to look:")
        out.print(f"  meshfed status --run-dir {run_dir}            every address, sync state and health")
        client = local.client_of(state, proof["from"])
        first = next(iter(state.clusters.values()))
        dns = parse_hostport(first.controlplane.dns)
        if client.netns:
            url = f"http://{proof['host']}:{local.service_port(state, proof['host'].split('.svc.')[0])}/"
            out.print(f"  {pod_call_example(state, client.name, url)}   a call from inside a pod")
            out.print(f"  meshfed exec {client.name} --run-dir {run_dir} -- ip addr   the pod's own network")
            out.print(f"  meshfed fault partition {list(state.clusters)[-1]} --run-dir {run_dir}   cut a cluster "
                      "off (then 'meshfed fault heal')")
        else:
            out.print(f"  curl -H 'Host: {proof['host']}' http://{client.outbound}/   a call through a sidecar")
        out.print(f"  dig @{dns.host} -p {dns.port} {proof['host']}   clusterset.local DNS")
        target = proof["host"].split(".svc")[0]
        out.print(f"  meshfed diagnose {target} --from {proof['from']}   walk the path hop by hop")
    if detach:
        if supervise:
            rec = local.start_supervisor(run_dir)
            progress(f"supervisor pid {rec.pid} restarts any child that dies (log {rec.log})")
        return
    err.print("running; a process that dies is started again (backoff); Ctrl-C or 'meshfed down' stops everything")
    supervisor = local.Supervisor(run_dir)
    stop = {"now": False}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with contextlib.suppress(KeyboardInterrupt):
        while not stop["now"]:
            now = local.read_state(run_dir, missing_ok=True)
            if now is None or now.stopping_at or now.stopped_at:
                err.print("the run is stopping ('meshfed down' was run)")
                return
            for name in supervisor.tick():
                err.print(f"restarted {name} (it had exited; see its log)")
            time.sleep(0.5)
    stopped = local.stop_run(run_dir)
    err.print(f"stopped {len(stopped)} processes")


@click.command("down")
@RUN_DIR_OPTION
@output_option
def down_cmd(run_dir: Path, output: str) -> None:
    """Stop every process a local run started (by pid, newest first)."""
    try:
        before = local.read_state(run_dir)
    except local.LocalRunError as exc:
        fail(str(exc))
        return
    stopped = local.stop_run(run_dir)
    was_running = [s for s in stopped if s["was_running"]]
    left = [s for s in stopped if not s["stopped"]]
    after = local.read_state(run_dir, missing_ok=True)
    net = after.network if after is not None else before.network
    if net.teardown_problems:
        fail(f"the run's network was not fully removed: {'; '.join(net.teardown_problems)}",
             hint="run 'meshfed down' again as root; it removes only what the run recorded")
        return
    if net.removed_at and not was_running and before.network.created:
        console(stderr=True).print(f"removed the run's network (namespaces and links of run {net.run_id})")
    if not was_running:
        when = before.stopped_at
        since = f" (stopped at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(when))})" if when else ""
        message = f"nothing is running in {run_dir}{since}; 'meshfed up' starts a new run"
        if output == "json":
            emit(output, {"stopped": [], "message": message}, [])
        else:
            console(stderr=True).print(message)
        return
    emit(output, {"stopped": was_running},
         [("Stopped", ["process", "pid", "stopped"],
           [[s["name"], s["pid"], "yes" if s["stopped"] else "NO"] for s in was_running])])
    if left:
        fail(f"{len(left)} processes did not stop: {', '.join(str(s['pid']) for s in left)}")


@click.command("restart")
@click.argument("name")
@RUN_DIR_OPTION
@output_option
def restart_cmd(name: str, run_dir: Path, output: str) -> None:
    """Start one process of a running local run again, e.g. after it was killed: NAME as 'meshfed status -o json'
    lists it under processes (federation, east/controlplane, west/eastwest-gateway, east/sleep-east, ...)."""
    try:
        result = local.restart(run_dir, name)
    except local.LocalRunError as exc:
        fail(str(exc))
        return
    what = "stopped and started again" if result["was_running"] else "started again"
    emit(output, result, [(f"{name} {what}", ["process", "old pid", "pid", "restarts", "log"],
                           [[name, result["old_pid"], result["pid"], result["restarts"], result["log"]]])])


@click.command("supervise", hidden=True)
@RUN_DIR_OPTION
def supervise_cmd(run_dir: Path) -> None:
    """Restart the children of a detached run that die, until 'meshfed down' (started by 'up --detach --supervise')."""
    supervisor = local.Supervisor(run_dir)
    stop = {"now": False}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop["now"]:
        state = local.read_state(run_dir, missing_ok=True)
        if state is None or state.stopping_at or state.stopped_at:
            return
        for name in supervisor.tick():
            click.echo(f"{time.strftime('%H:%M:%S')} restarted {name}", err=True)
        time.sleep(0.5)


@click.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("workload")
@RUN_DIR_OPTION
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_cmd(workload: str, run_dir: Path, command: tuple[str, ...]) -> None:
    """Run COMMAND inside WORKLOAD's network namespace (a netns run), as 'kubectl exec' does: its resolv.conf
    points at the cluster's meshfed DNS and its TCP goes through its sidecar. WORKLOAD as 'meshfed status' lists
    it (sleep-east, reviews-west-0, ...) or eastwest-gateway-CLUSTER. Put '--' before COMMAND:
    meshfed exec sleep-east -- curl -s http://ratings.default.svc.clusterset.local:9080/"""
    try:
        state = local.read_state(run_dir)
        stopped = local.stopped_message(run_dir, state)
        if stopped:
            raise local.LocalRunError(stopped)
        pod = local.pod_of(state, workload)
    except local.LocalRunError as exc:
        fail(str(exc))
        return
    sys.stdout.flush()
    try:
        os.execvp("ip", netns.in_ns(pod, list(command)))
    except OSError as exc:
        fail(f"cannot run ip netns exec: {exc}")
