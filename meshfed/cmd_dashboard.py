"""``meshfed dashboard``: serve the live view of a local run or a real federation (docs/dashboard.md)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import click

from discovery.addresses import InvalidAddress, parse_hostport
from meshfed.cmd_status import target_options
from meshfed.dashboard.server import LocalSource, RemoteSource, Source, serve
from meshfed.output import console, fail

DEFAULT_LISTEN = "127.0.0.1:15080"


@click.command("dashboard")
@target_options
@click.option("--prometheus", "prometheus_url", metavar="URL", default=None,
              help="with --federation: the Prometheus whose recording rules give the edges' numbers (a local run "
                   "uses its own)")
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, metavar="HOST:PORT",
              help="where to serve the page")
@click.option("--refresh", type=click.FloatRange(min=0.2), default=2.0, show_default=True, metavar="SECONDS",
              help="how often the status and Prometheus are asked (every open page gets the change at once)")
def dashboard_cmd(run_dir: Path, federation_url: str | None, cert: Path | None, key: Path | None,
                  ca_bundle: Path | None, prometheus_url: str | None, listen: str, refresh: float) -> None:
    """Serve a live page of the clusters, gateways, services, traffic, leases, trust and problems."""
    try:
        address = parse_hostport(listen, min_port=1)
    except InvalidAddress as exc:
        raise click.BadParameter(f"{exc}, e.g. 127.0.0.1:15080", param_hint="--listen") from exc
    source: Source
    if federation_url:
        if cert is None or key is None or ca_bundle is None:
            fail("--federation needs --cert, --key and --ca-bundle",
                 hint="use a cluster's credentials, e.g. from 'meshfed ca issue'", code=2)
            return
        source = RemoteSource(federation_url, cert, key, ca_bundle, prometheus=prometheus_url)
    else:
        source = LocalSource(run_dir)
    err = console(stderr=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(source, host=address.host, port=address.port, refresh_s=refresh,
                          ready=lambda url: err.print(f"dashboard on {url} (Ctrl-C stops it)")))
