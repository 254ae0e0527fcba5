"""``meshfed status``: clusters, services, proxies and trust of a local run or a real federation.

Exit status: 0 healthy, 1 something is unhealthy (the Problems table says what), 2 the status could not be
gathered at all (no run, bad credentials, federation unreachable).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from meshfed import local, status
from meshfed.output import emit, fail, output_option

_TARGET = [
    click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), default=local.DEFAULT_RUN_DIR,
                 show_default=True, help="the local run (ignored with --federation)"),
    click.option("--federation", "federation_url", metavar="URL", default=None,
                 help="ask a real federation service instead of a local run (needs --cert, --key, --ca-bundle)"),
    click.option("--cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                 help="client certificate chain (a cluster's identity) for --federation"),
    click.option("--key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                 help="its private key"),
    click.option("--ca-bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                 help="the trust bundle (PEM roots) the federation's certificate must chain to"),
]


def target_options(fn: Callable[..., None]) -> Callable[..., None]:
    """--run-dir, or --federation with --cert, --key and --ca-bundle (status, dashboard)."""
    for opt in reversed(_TARGET):
        fn = opt(fn)
    return fn


@click.command("status")
@target_options
@output_option
def status_cmd(run_dir: Path, federation_url: str | None, cert: Path | None, key: Path | None,
               ca_bundle: Path | None, output: str) -> None:
    """Show the federation's clusters, services, proxies and trust; exit 1 if anything is unhealthy."""
    try:
        if federation_url:
            if cert is None or key is None or ca_bundle is None:
                fail("--federation needs --cert, --key and --ca-bundle",
                     hint="use a cluster's credentials, e.g. from 'meshfed ca issue'", code=2)
                return
            report = status.evaluate_remote(status.collect_remote(federation_url, cert=cert, key=key,
                                                                  ca_bundle=ca_bundle))
        else:
            report = status.evaluate_local(status.collect_local(run_dir))
    except status.StatusError as exc:
        hint = ("check the URL and credentials" if federation_url
                else f"start a run with 'meshfed up --run-dir {run_dir}', or pass --run-dir")
        fail(str(exc), hint=hint, code=2)
        return
    emit(output, report, status.sections(report))
    if not report["healthy"]:
        if output != "json":
            click.echo(f"unhealthy: {len(report['problems'])} problem(s), see the Problems table", err=True)
        raise SystemExit(1)
