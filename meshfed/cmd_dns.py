"""``meshfed dns``: serve ``clusterset.local`` standalone, from a local clusterset's manifests.

A local run knows every member's manifests, so the server loads all of them (``discovery.manifests``), derives the
ServiceImports over the whole clusterset (``discovery.mcs``), and answers as cluster ``--cluster`` would. It polls
the manifest folders and ``clusterset.yaml`` and rebuilds the table whenever they change; a malformed manifest is
reported and the last good version of that file stays in force, so names never vanish because of a typo.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from discovery.addresses import InvalidAddress, parse_hostport
from discovery.clusterset import ClusterSet, ClusterSetError, clusterset_file, load_clusterset
from discovery.dns.server import DnsServer, run
from discovery.dns.table import DnsError, DnsTable, build_table
from discovery.manifests import ClusterSetState, ManifestSource, derive_clusterset
from discovery.model import ClusterId, DiscoveryError, Registry
from discovery.source import ManifestProblem
from meshfed.output import fail

log = logging.getLogger("meshfed.dns.standalone")


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT``."""
    try:
        address = parse_hostport(text)
    except InvalidAddress as exc:
        raise click.BadParameter(f"{exc} (e.g. 127.0.0.1:5353 or [::1]:5353)") from exc
    return address.host, address.port


@dataclass
class ClusterSetWatch:
    """Every member's manifest source, kept across reloads so each keeps the last good version of its files."""

    directory: Path
    cluster: str
    clusterset: ClusterSet
    sources: dict[ClusterId, ManifestSource] = field(default_factory=dict)

    @classmethod
    def open(cls, directory: Path, cluster: str) -> ClusterSetWatch:
        clusterset = load_clusterset(directory)
        clusterset.cluster(cluster)  # raises naming the members when there is no such cluster
        watch = cls(directory=directory, cluster=cluster, clusterset=clusterset)
        watch._sync_sources()
        return watch

    def _sync_sources(self) -> None:
        for info in self.clusterset.clusters:
            if info.id not in self.sources:
                self.sources[info.id] = ManifestSource.for_cluster(self.clusterset, info.id)
        for gone in [c for c in self.sources if c not in self.clusterset.cluster_ids]:
            del self.sources[gone]

    def signature(self) -> tuple[Any, ...]:
        file = clusterset_file(self.directory)
        try:
            stat = file.stat()
            head: tuple[Any, ...] = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
        except OSError:
            head = ()
        return head, tuple((c, s.signature()) for c, s in sorted(self.sources.items()))

    def load(self) -> tuple[Registry, tuple[ManifestProblem, ...]]:
        """Re-read clusterset.yaml (keeping the old one if the new one is bad) and every member's manifests."""
        try:
            clusterset = load_clusterset(self.directory)
            clusterset.cluster(self.cluster)
        except ClusterSetError as exc:
            log.error("clusterset_rejected error=%s keeping=previous", exc)
        else:
            self.clusterset = clusterset
            self._sync_sources()
        snapshots = {}
        problems: list[ManifestProblem] = []
        for cid, source in sorted(self.sources.items()):
            result = source.load()
            snapshots[cid] = result.snapshot
            problems.extend(result.problems)
        state = ClusterSetState(
            clusterset=self.clusterset,
            snapshots=snapshots,
            problems=tuple(problems),
            mcs=derive_clusterset(self.clusterset, snapshots),
        )
        return state.registry(self.cluster), state.problems


async def serve_clusterset(
    *,
    directory: Path,
    cluster: str,
    host: str,
    port: int,
    interval: float = 1.0,
    stop: asyncio.Event,
    on_ready: Callable[[DnsServer], None] | None = None,
) -> None:
    """Serve the clusterset's DNS until ``stop`` is set, reloading when manifests change."""
    watch = await asyncio.to_thread(ClusterSetWatch.open, directory, cluster)
    serial = int(time.time())

    async def reload() -> DnsTable:
        nonlocal serial
        registry, problems = await asyncio.to_thread(watch.load)
        for problem in problems:
            log.warning("manifest_problem %s", problem)
        serial = max(serial + 1, int(time.time()))
        table = await server.update(registry, serial=serial)
        log.info(
            "dns_reloaded serial=%d services=%d skipped=%d problems=%d",
            table.serial, table.services, len(table.skipped), len(problems),
        )
        for reason in table.skipped:
            log.info("dns_not_published %s", reason)
        return table

    server = DnsServer(host=host, port=port)
    signature = await asyncio.to_thread(watch.signature)
    await reload()
    async with server:
        if on_ready is not None:
            on_ready(server)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval)
            except TimeoutError:
                pass
            if stop.is_set():
                break
            current = await asyncio.to_thread(watch.signature)
            if current == signature:
                continue
            signature = current
            try:
                await reload()
            except DiscoveryError as exc:  # keep serving the last good table
                log.error("dns_reload_failed error=%s", exc)


@click.command("dns")
@click.option(
    "--clusterset",
    "directory",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="clusterset folder (holds clusterset.yaml and one folder of manifests per cluster)",
)
@click.option("--cluster", required=True, help="the member cluster this server answers for")
@click.option("--listen", default="127.0.0.1:5353", show_default=True, help="HOST:PORT for UDP and TCP (port 0: any)")
@click.option("--interval", type=click.FloatRange(min=0.05), default=1.0, show_default=True,
              help="seconds between checks for manifest changes")
@click.option("--uvloop/--no-uvloop", default=True, show_default=True, help="run on uvloop when it is installed")
@click.option("--zone", "print_zone", is_flag=True, help="print the records as a zone file and exit (no server)")
def dns_cmd(directory: Path, cluster: str, listen: str, interval: float, uvloop: bool, print_zone: bool) -> None:
    """Serve clusterset.local (MCS DNS) for CLUSTER from the clusterset's manifests, reloading on change."""
    host, port = parse_listen(listen)
    if print_zone:
        try:
            registry, problems = ClusterSetWatch.open(directory, cluster).load()
        except ClusterSetError as exc:
            fail(str(exc), hint="--clusterset names a folder holding clusterset.yaml; --cluster one of its members")
        for problem in problems:
            click.echo(f"warning: {problem}", err=True)
        table = build_table(registry, serial=int(time.time()))
        click.echo(table.zone_text(), nl=False)
        for reason in table.skipped:
            click.echo(f"; not published: {reason}")
        return

    def ready(server: DnsServer) -> None:
        table = server.table
        click.echo(
            f"serving clusterset.local for cluster {cluster} on {host}:{server.port} "
            f"(udp+tcp, {table.services} services, serial {table.serial})"
        )
        sys.stdout.flush()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_clusterset(
            directory=directory, cluster=cluster, host=host, port=port, interval=interval, stop=stop, on_ready=ready
        )

    try:
        run(main(), use_uvloop=uvloop)
    except ClusterSetError as exc:
        fail(str(exc), hint="--clusterset names a folder holding clusterset.yaml; --cluster one of its members")
    except DnsError as exc:
        fail(str(exc), hint="pick another --listen port, or stop what holds it")
