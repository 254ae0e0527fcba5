"""The ``meshfed`` command: one click group; each subcommand family lives in its own ``meshfed.cmd_*`` module
and is registered here, in one place."""

from __future__ import annotations

import logging
import sys

import click

from meshfed import cmd_ca, cmd_controlplane, cmd_export, cmd_fault, cmd_federation, cmd_local, cmd_peer, cmd_proxy
from meshfed.cmd_dashboard import dashboard_cmd
from meshfed.cmd_diagnose import diagnose_cmd
from meshfed.cmd_dns import dns_cmd
from meshfed.cmd_inject import inject_cmd
from meshfed.cmd_install import install_cmd
from meshfed.cmd_status import status_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug), one event per line on stderr.")
@click.version_option(package_name="meshfed")
def cli(verbose: int) -> None:
    """meshfed federates service meshes across Kubernetes clusters."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s")


cli.add_command(cmd_ca.ca)
cli.add_command(cmd_federation.federation)
cli.add_command(cmd_peer.peer)
cli.add_command(cmd_export.export_cmd)
cli.add_command(cmd_export.unexport_cmd)
cli.add_command(dns_cmd)
cli.add_command(install_cmd)
cli.add_command(cmd_controlplane.controlplane)
cli.add_command(cmd_local.up_cmd)
cli.add_command(cmd_local.down_cmd)
cli.add_command(cmd_local.restart_cmd)
cli.add_command(cmd_local.supervise_cmd)
cli.add_command(cmd_local.exec_cmd)
cli.add_command(cmd_fault.fault)
cli.add_command(status_cmd)
cli.add_command(diagnose_cmd)
cli.add_command(dashboard_cmd)
cli.add_command(cmd_proxy.proxy)
cli.add_command(inject_cmd)


def main() -> None:
    cli()
