"""``meshfed ca``: the shared-root certificate authority (root, per-cluster intermediates, workload certs)."""

from __future__ import annotations

import click


@click.group()
def ca() -> None:
    """Create and operate the clusterset's root and per-cluster intermediate CAs."""
