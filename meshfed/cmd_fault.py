"""``meshfed fault``: break a local run on purpose, to watch failover: partition a cluster's network (netns runs),
stop a component and start it again."""

from __future__ import annotations

from pathlib import Path

import click

from meshfed import local
from meshfed.cmd_local import RUN_DIR_OPTION
from meshfed.output import emit, fail, output_option


@click.group("fault")
def fault() -> None:
    """Partition a cluster (netns runs), or stop and start a component of a local run."""


@fault.command("partition")
@click.argument("cluster")
@click.option("--from", "peers", multiple=True, metavar="CLUSTER",
              help="cut only the traffic between CLUSTER and this one (repeatable); default: every other cluster")
@RUN_DIR_OPTION
@output_option
def partition_cmd(cluster: str, peers: tuple[str, ...], run_dir: Path, output: str) -> None:
    """Cut CLUSTER's east-west gateway off the public network (iptables DROP inside its namespace): nothing
    crosses between CLUSTER and the others until 'meshfed fault heal CLUSTER'."""
    try:
        changed = local.partition(run_dir, cluster, peers)
    except local.LocalRunError as exc:
        fail(str(exc))
        return
    what = f"from {', '.join(peers)}" if peers else "from every other cluster"
    message = f"{cluster} partitioned {what}" if changed else f"{cluster} was already partitioned {what}"
    emit(output, {"cluster": cluster, "peers": list(peers), "changed": changed, "message": message},
         [("Fault", ["cluster", "partitioned", "changed"], [[cluster, what, "yes" if changed else "no"]])])


@fault.command("heal")
@click.argument("cluster")
@RUN_DIR_OPTION
@output_option
def heal_cmd(cluster: str, run_dir: Path, output: str) -> None:
    """Undo 'meshfed fault partition CLUSTER'."""
    try:
        changed = local.partition(run_dir, cluster, heal=True)
    except local.LocalRunError as exc:
        fail(str(exc))
        return
    message = f"{cluster} healed" if changed else f"{cluster} was not partitioned"
    emit(output, {"cluster": cluster, "changed": changed, "message": message},
         [("Fault", ["cluster", "healed"], [[cluster, "yes" if changed else "was not partitioned"]])])


@fault.command("stop")
@click.argument("component")
@RUN_DIR_OPTION
@output_option
def stop_cmd(component: str, run_dir: Path, output: str) -> None:
    """Stop COMPONENT by pid and keep it stopped: federation, CLUSTER/controlplane, eastwest-gateway-CLUSTER, or a
    workload (reviews-west-0: its endpoint leaves the ready set)."""
    try:
        result = local.stop_component(run_dir, component)
    except local.LocalRunError as exc:
        fail(str(exc))
        return
    emit(output, result, [("Stopped", ["component"], [[result["component"]]])])


@fault.command("start")
@click.argument("component")
@RUN_DIR_OPTION
@output_option
def start_cmd(component: str, run_dir: Path, output: str) -> None:
    """Start COMPONENT again as it was first started (after 'meshfed fault stop', or after it died)."""
    try:
        result = local.start_component(run_dir, component)
    except local.LocalRunError as exc:
        fail(str(exc))
        return
    emit(output, result, [("Started", ["component"], [[result["component"]]])])
