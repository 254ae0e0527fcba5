"""``meshfed diagnose SVC.NS --from CLUSTER``: which hop of a cross-cluster call is broken.

Exit status: 0 every hop ok (or skipped), 1 a hop failed (the first failure is named), 2 the diagnosis could not
start (no run, unknown cluster, bad service name).
"""

from __future__ import annotations

from pathlib import Path

import click

from meshfed import diagnose, local
from meshfed.output import console, emit, fail, output_option


@click.command("diagnose")
@click.argument("service", metavar="SVC.NS")
@click.option("--from", "caller", required=True, metavar="CLUSTER", help="the calling cluster")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), default=local.DEFAULT_RUN_DIR,
              show_default=True, help="the local run to diagnose")
@output_option
def diagnose_cmd(service: str, caller: str, run_dir: Path, output: str) -> None:
    """Walk the path a request from CLUSTER to SVC.NS takes and name the first hop that fails."""
    try:
        ev = diagnose.collect(run_dir, service, caller)
    except diagnose.DiagnoseError as exc:
        fail(str(exc), hint=f"e.g. meshfed diagnose ratings.default --from east --run-dir {run_dir}", code=2)
        return
    hops = diagnose.evaluate(ev)
    result = diagnose.report(ev, hops)
    rows = [[h.number, h.name, h.status, h.detail, h.next_step if h.status != diagnose.OK else ""] for h in hops]
    emit(output, result, [(f"{ev.host} from {caller}", ["#", "hop", "result", "detail", "what to do"], rows)])
    first = result["first_failure"]
    if first is not None:
        if output != "json":
            console(stderr=True).print(f"[bold red]first failing hop: {first['hop']} {first['name']}[/]: "
                                       f"{first['detail']}")
        raise SystemExit(1)
